"""
Read every run directory under a folder (what train_*.py wrote: config.json, events.jsonl, scalars.csv,
model.txt) and write leaderboards, SVG figures and one index.html beside them. Training emits facts; this only
reads them.

    python report.py out/                      # out/index.html, leaderboard*.csv, figures/*.svg
    python report.py out/campaign_audio --select=kd_ --top=5

Runs are grouped by the script that wrote them (config.json's argv[0]) and ranked within it, never against another
script's runs, on the script's validation metric (METRICS below); the test metric is reported beside it and never
used to select or rank. leaderboard.csv holds every run (rank restarts per script), leaderboard_<script>.csv one
script's; figures/<script>_*.svg draw the best --top finished runs of a script and say how many of its runs they
leave out, and why. index.html is one self-contained page (no script, nothing fetched): every leaderboard, each
run's status, the figures inline and relative links to each run's files, so one copied file shows a campaign. A run
that did not finish (no end event 'done', no scalars.csv, ...) is listed with status 'incomplete: why' ('incomplete:
running (being written by ...)' while a process holds its lock); a finished run without a score is listed 'done,
unscored: why' (its scalars.csv has no such column, or no finite value in it) and said in a warning line; a run that
--overwrite=True moved aside (<out_dir>.replaced-<time>) is listed 'replaced' and never ranked. In scalars.csv an
empty cell is no value, and so is inf or nan (a diverged evaluation): skipped in the figures and never the best
score (a warning counts them); a cell that is not a number at all, like a file that exists but cannot be read
(corrupt JSON or CSV), stops the report with one message naming the file, line and column, before anything is
written. Every file is written atomically.
"""
import csv
import io
import json
import math
import os
import re
import statistics
import sys
import time
import urllib.parse

from common import (HASH_EXCLUDED_KEYS, UserError, configure, declared_keys, lock_holder, read_events, run_finished,
                    write_atomic)

# -----------------------------------------------------------------------------
# default config (positional arguments are the folders to read; one that ends in .py is a config file)
# -----------------------------------------------------------------------------
select = ''  # only runs whose path under the folder contains this text ('' = every run)
top = 10  # the curves figures draw the best `top` finished runs of each script (by the validation metric); [1, inf)
if __name__ == '__main__':
    if '--help' in sys.argv or '-h' in sys.argv:  # configure's usage line names config files only, not FOLDER
        print("usage: python report.py FOLDER [FOLDER ...] [config.py ...] [--select=text] [--top=N]\n"
              "  FOLDER: a folder of run directories (what train_*.py and sweep.py write, e.g. out/)")
        for key, comment in declared_keys(os.path.abspath(__file__)).items():
            print(f"  --{key}={globals()[key]!r}".ljust(40) + f" # {comment}")
        sys.exit(0)
    folders = [a for a in sys.argv[1:] if not a.startswith('--') and (os.path.isdir(a) or not a.endswith('.py'))]
    for folder in folders:  # else configure would read it as a config file and say that is not found
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: " + ("a file, not a folder" if os.path.exists(folder) else "no such folder")
                            + "; report.py reads a folder of run directories (what train_*.py and sweep.py write, "
                              "e.g. python report.py out/); nothing was written")
    config = configure(globals(), [a for a in sys.argv[1:] if a not in folders])
# -----------------------------------------------------------------------------

# The metric each script is selected on: (validation column of scalars.csv, test key of the end event, better).
# Scripts not listed use val/loss (lower is better). Defined here once; the leaderboard names it on every row.
METRICS = {
    'train_audio.py': ('val/macro_f1', 'test/macro_f1', 'max'),
    'train_kd.py': ('val/macro_f1', 'test/macro_f1', 'max'),
    'train_spoter.py': ('val/acc', 'test/acc', 'max'),
    'train_slm.py': ('val/loss', 'test/loss', 'min'),
    'train_vae.py': ('val/loss', 'test/loss', 'min'),
}
DEFAULT_METRIC = ('val/loss', 'test/loss', 'min')
# leaderboard.csv: one row per run directory (finished or not), by script, in rank order within each script
COLUMNS = ['rank', 'status', 'script', 'run', 'settings', 'seed', 'config_hash', 'val_metric', 'best_val',
           'test_metric', 'test', 'steps', 'step_unit', 'wall_time_s', 'params', 'git_commit']
# leaderboard_grouped.csv: finished runs that differ only in their seed, as mean and sample std over seeds
GROUPED_COLUMNS = ['rank', 'script', 'settings', 'runs', 'seeds', 'val_metric', 'val_mean', 'val_std',
                   'test_metric', 'test_mean', 'test_std', 'params']
RUN_FILES = ('config.json', 'events.jsonl', 'scalars.csv')  # a folder holding any of these is a run directory


# -----------------------------------------------------------------------------
# reading one run directory
# -----------------------------------------------------------------------------

def find_runs(folder):
    """Every run directory under folder (not descending into a run directory), sorted."""
    found = []
    for path, dirs, files in os.walk(folder):
        if any(name in files for name in RUN_FILES):
            found.append(path)
            dirs[:] = []  # its subfolders (figures/) belong to it
        dirs.sort()
    return sorted(found)


WARNINGS = []  # this report's warning lines, also listed in index.html


def warn(message):
    WARNINGS.append(message)
    print(f"warning: {message}", file=sys.stderr)


def read_scalars(path):
    """-> (header, rows as {column: float or None}); the first column is the x axis ('iter' or 'epoch'), a finite
    number on every row. An empty cell, inf and nan are None (no value: never plotted, never the best); a cell that
    is not a number is a UserError naming the line and column."""
    try:
        with open(path, newline='') as f:
            lines = list(csv.reader(f))
    except (OSError, ValueError, csv.Error) as e:  # not UTF-8 (a ValueError), a folder, no permission
        raise UserError(f"{path}: not readable as CSV ({e}) (nothing was written)") from None
    if not lines or len(lines[0]) < 2 or lines[0][0] not in ('iter', 'epoch'):
        raise UserError(f"{path}: expected a header starting with 'iter' or 'epoch' and at least two columns, got "
                        f"{lines[0] if lines else 'an empty file'} (nothing was written)")
    header, rows, non_finite = lines[0], [], {}
    for n, values in enumerate(lines[1:], 2):
        if len(values) != len(header):
            raise UserError(f"{path}, line {n}: {len(values)} values for {len(header)} columns (nothing was written)")
        row = {}
        for k, v in zip(header, values):
            try:
                row[k] = float(v) if v != '' else None
            except ValueError:
                raise UserError(f"{path}, line {n}: column {k!r} holds {v!r}, not a number (nothing was "
                                f"written)") from None
            if row[k] is not None and not math.isfinite(row[k]):
                row[k], non_finite[k] = None, non_finite.get(k, 0) + 1
        if row[header[0]] is None:  # the x axis of every curve and the run's step count
            raise UserError(f"{path}, line {n}: column {header[0]!r} holds {values[0]!r}, expected the {header[0]} "
                            f"number (nothing was written)")
        rows.append(row)
    if non_finite:
        warn(f"{path}: skipped non-finite values (inf, nan): " + ', '.join(f"{k} {c}" for k, c in non_finite.items()))
    return header, rows


def events_of(path):
    """common.read_events; a line that is not a JSON object is an error naming the file and the line."""
    try:
        return read_events(path)
    except UserError as e:
        raise UserError(f"{e}; fix or move this run directory (nothing was written)") from None


def number(value):
    """A finite int or float from a JSON fact, else None (a string, null, nan, a bool)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def wall_time(events):
    """Seconds of training over every process that wrote this run: each 'start' begins a new clock."""
    total, segment = 0.0, 0.0
    for e in events:
        if e.get('event') == 'start':
            total, segment = total + segment, 0.0
        segment = max(segment, float(number(e.get('time_s')) or 0.0))
    return round(total + segment, 1)


REPLACED = re.compile(r'\.replaced-\d{8}-\d{6}(-[0-9a-f]{4})?$')  # how --overwrite=True names a run it moved aside


def read_run(path, folder):
    """Everything the leaderboard and figures need from one run directory. Missing facts -> status
    'incomplete: why'; facts that exist but cannot be read -> UserError."""
    run = dict(run=os.path.relpath(path, folder), path=path, status='done', script='', seed='', config={},
               config_hash='', git_commit='', git_dirty=False, events=[], header=[], rows=[], params='')
    missing = [name for name in RUN_FILES if not os.path.exists(os.path.join(path, name))]
    if 'config.json' not in missing:
        try:
            with open(os.path.join(path, 'config.json')) as f:
                facts = json.load(f)
            run.update(config=dict(facts['config']), config_hash=facts['config_hash'],
                       git_commit=facts.get('git_commit') or '', git_dirty=facts.get('git_dirty') is True,
                       script=os.path.basename(facts['argv'][0]))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise UserError(f"{path}/config.json: not a run's config.json ({type(e).__name__}: {e}); fix or move "
                            f"this run directory (nothing was written)") from None
        run['seed'] = run['config'].get('seed', '')
    if 'events.jsonl' not in missing:
        run['events'] = events_of(path)
    if 'scalars.csv' not in missing:
        run['header'], run['rows'] = read_scalars(os.path.join(path, 'scalars.csv'))
    model_txt = os.path.join(path, 'model.txt')
    if os.path.exists(model_txt):
        with open(model_txt, errors='replace') as f:
            match = re.search(r'^parameters: ([\d,]+)', f.read(), re.M)
        run['params'] = int(match[1].replace(',', '')) if match else ''
    val, test, better = METRICS.get(run['script'], DEFAULT_METRIC)
    run.update(val_metric=val, test_metric=test, better=better)
    holder = lock_holder(path)
    values = [r[val] for r in run['rows'] if r.get(val) is not None]
    if REPLACED.search(path):  # superseded by the run now in its out_dir: listed, never ranked
        run['status'] = "replaced (moved aside by --overwrite=True)"
    elif holder:
        run['status'] = f"incomplete: running (being written by {holder})"
    elif missing:
        run['status'] = f"incomplete: no {', '.join(missing)}"
    elif not run_finished(run['events']):
        run['status'] = "incomplete: no end event 'done' (running, stopped or failed)"
    elif not values:  # finished, but nothing to rank it by: said, never a silently scoreless 'done'
        why = (f"no {val} column in scalars.csv" if val not in run['header'] else
               f"no finite {val} value in scalars.csv")
        run['status'] = f"done, unscored: {why}"
        warn(f"{path}: {why} (columns: {', '.join(run['header'])}); listed unscored")
    run['best_val'] = (max if better == 'max' else min)(values) if values else ''
    end = run_finished(run['events']) if run['status'].startswith('done') else None
    test_value = number(end.get(test)) if end else None
    if end and test in end and test_value is None:
        warn(f"{path}/events.jsonl: the end event's {test} is {end[test]!r}, not a finite number; left empty")
    run['test'] = '' if test_value is None else test_value
    run['steps'] = int(run['rows'][-1][run['header'][0]]) if run['rows'] else ''
    run['step_unit'] = run['header'][0] if run['header'] else ''
    run['wall_time_s'] = wall_time(run['events']) if run['events'] else ''
    return run


# -----------------------------------------------------------------------------
# leaderboard rows: settings that vary, ranks by validation, grouped over seeds
# -----------------------------------------------------------------------------

def seedless(run):
    """The run's config without its seed and the I/O-only keys; a path segment 'seed<S>' (how sweep.py names
    out_dirs, e.g. a KD teacher_ckpt) reads as 'seed*', so runs that differ only in their seed compare equal."""
    pattern = re.compile(rf'(^|[/\\])seed{re.escape(str(run["seed"]))}(?=$|[/\\])')

    def norm(v):
        if isinstance(v, str):
            return pattern.sub(r'\1seed*', v)
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {k: norm(v) for k, v in run['config'].items() if k not in HASH_EXCLUDED_KEYS and k != 'seed'}


def settings(runs):
    """For each run, 'key=value ...' over the keys whose values differ between runs of the same script."""
    for script in {r['script'] for r in runs}:
        same = [r for r in runs if r['script'] == script]
        configs = [seedless(r) for r in same]
        keys = sorted({k for c in configs for k in c if len({json.dumps(x.get(k)) for x in configs}) > 1})
        for r, c in zip(same, configs):
            r['settings'] = ' '.join(f"{k}={c.get(k)}" for k in keys)


def rank(items, value_key):
    """Sort by script (runs without a config.json last), then best first (finished, ranked rows before the rest);
    number the ranks within each script: two scripts are never ranked together, even on the same metric name."""
    def order(r):
        v = r[value_key]
        return (r['script'] == '', r['script'], v == '' or r.get('status', 'done') != 'done',
                0 if v == '' else (-v if r['better'] == 'max' else v), r.get('run', r.get('settings', '')))
    items = sorted(items, key=order)
    counters = {}
    for r in items:
        if r[value_key] != '' and r.get('status', 'done') == 'done':
            counters[r['script']] = counters.get(r['script'], 0) + 1
            r['rank'] = counters[r['script']]
        else:
            r['rank'] = ''
    return items


def grouped(runs):
    """Finished runs equal in every key but the seed -> one row: mean and sample std (n-1) over seeds."""
    groups = {}
    for r in runs:
        if r['status'] == 'done' and r['best_val'] != '':
            groups.setdefault((r['script'], json.dumps(seedless(r), sort_keys=True)), []).append(r)
    out = []
    for members in groups.values():
        vals = [m['best_val'] for m in members]
        tests = [m['test'] for m in members if isinstance(m['test'], (int, float))]
        first = members[0]
        out.append(dict(script=first['script'], settings=first['settings'], runs=len(members),
                        seeds=' '.join(str(m['seed']) for m in members), val_metric=first['val_metric'],
                        better=first['better'], val_mean=statistics.fmean(vals),
                        val_std=statistics.stdev(vals) if len(vals) > 1 else '', test_metric=first['test_metric'],
                        test_mean=statistics.fmean(tests) if tests else '',
                        test_std=statistics.stdev(tests) if len(tests) > 1 else '', params=first['params']))
    return rank(out, 'val_mean')


def validate(rows, columns, name):
    """The fixed schema, checked before anything is written: every column, no other, numbers finite."""
    for i, row in enumerate(rows):
        if list(row) != columns:
            raise UserError(f"{name} row {i}: columns {list(row)} differ from the schema {columns}")
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{name} row {i} ({row.get('run', row.get('settings'))}): {k} is {v}; "
                                f"a leaderboard holds finite numbers or nothing")


def to_csv(rows, columns):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


# -----------------------------------------------------------------------------
# SVG figures with the standard library: line charts (one <path> per curve) and a bar chart. Nothing here can ask a
# renderer how wide a text is, so the layout uses an upper estimate (text_width) and the canvas grows to hold it.
# -----------------------------------------------------------------------------
COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22',
          '#17becf']
FONT = 12  # px: every text but the titles (15 px)


def esc(text):
    return str(text).replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;').replace('"', '&quot;')


def text_width(text, size=FONT):
    """An upper estimate of text's width in px in the usual sans-serif fonts (DejaVu Sans, Liberation Sans, Arial)."""
    return size * sum(0.34 if c in " .,:;'`|!ijlI" else 0.42 if c in '"()[]{}/-frt' else
                      1.0 if c in 'mwMW%@&\u2026' else 0.84 if c.isupper() or c in '=+<>~#$^' else 0.64
                      for c in str(text))


def shorten(text, limit):
    """text, or its start and end around an ellipsis when it is longer than limit characters."""
    return text if len(text) <= limit else text[:limit // 2 - 1] + '\u2026' + text[-(limit - limit // 2):]


def wrap(text, limit=32, max_lines=2):
    """text as at most max_lines lines of at most limit characters, broken after a '/', '_', '-' or space near the
    limit; what still does not fit loses its middle (the full text is in the tooltip)."""
    lines, rest = [], str(text)
    while len(rest) > limit and len(lines) < max_lines - 1:
        cut = max(rest.rfind(c, 0, limit) for c in '/_- ') + 1
        cut = cut if cut > limit // 2 else limit
        lines, rest = lines + [rest[:cut]], rest[cut:]
    return lines + [shorten(rest, limit)]


def nice_ticks(lo, hi, n=5, integer=False):
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]; integer=True (an epoch or
    iteration axis) keeps them whole numbers, at least 1 apart."""
    if hi <= lo:  # a single value: a band around it
        pad = 1 if integer else abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    step = max(1, round(step)) if integer else step
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(math.ceil((hi - first) / step - 1e-9) + 1)]


def tick_labels(ticks):
    """The tick values as text, all with the decimals their spacing needs (0.4, 0.6; 1, 2; 0.05, 0.10)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
    decimals = max(0, -math.floor(math.log10(step) + 1e-6))
    return [f"{t:.{decimals}f}" for t in ticks]


def svg_start(width, height, title, note):
    """The <svg> element (its viewBox lets a page scale it), a white canvas, the title and, under it, the note."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'font-family="sans-serif" font-size="{FONT}">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text class="title" x="10" y="22" font-size="15">{esc(title)}</text>']
    if note:
        out.append(f'<text class="note" x="10" y="42" fill="#a03030">{esc(note)}</text>')
    return out


def line_chart(title, xlabel, ylabel, series, note='', integer_x=False):
    """series: [(label, xs, ys)] -> SVG text: one <path> per series (one of a single point is also drawn as a
    <circle class="marker">), round ticks (whole numbers when integer_x), axis titles clear of the tick labels, the
    note under the title and the legend under the plot, in as many columns as fit (long names on two lines).
    Below the plot: tick marks 5 px, tick labels' baseline at +19, the x-axis title's at +42, the legend from +56."""
    w, h = 480, 280  # the plot area
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy]
    lo, hi = min(ys), max(ys)
    pad = 0.04 * (hi - lo)  # so that no curve runs along the frame (a metric in [0, 1] stays in it)
    lo, hi = max(0.0, lo - pad) if lo >= 0 else lo - pad, min(1.0, hi + pad) if hi <= 1 else hi + pad
    xt, yt = nice_ticks(min(xs), max(xs), integer=integer_x), nice_ticks(lo, hi)
    xl, yl = tick_labels(xt), tick_labels(yt)
    top_ = 58 if note else 40
    left = 38 + max(map(text_width, yl)) + 8  # the y-axis title's band (x 0..30), the tick labels, 8 px to the axis
    legends = [wrap(label) for label, _, _ in series]
    column = 26 + max(text_width(line) for lines in legends for line in lines) + 16  # swatch, name, gap
    width = math.ceil(max(left + w + 20, 10 + column, 20 + text_width(title, 15), 20 + text_width(note)))
    columns = max(1, int((width - 10) // column))
    rows = [legends[i:i + columns] for i in range(0, len(legends), columns)]
    row_y = [top_ + h + 56 + sum(14 * max(map(len, r)) + 6 for r in rows[:i]) for i in range(len(rows) + 1)]
    height = math.ceil(row_y[-1] + 4)

    def px(x):
        return left + 6 + (x - xt[0]) / (xt[-1] - xt[0]) * (w - 12)  # 6 px in: a first point is off the axis

    def py(y):
        return top_ + h - (y - yt[0]) / (yt[-1] - yt[0]) * h
    out = svg_start(width, height, title, note)
    out += [f'<line x1="{left:.1f}" y1="{top_ + h}" x2="{left + w:.1f}" y2="{top_ + h}" stroke="black"/>',
            f'<line x1="{left:.1f}" y1="{top_}" x2="{left:.1f}" y2="{top_ + h}" stroke="black"/>']
    for x, label in zip(xt, xl):
        out.append(f'<line x1="{px(x):.1f}" y1="{top_ + h}" x2="{px(x):.1f}" y2="{top_ + h + 5}" stroke="black"/>'
                   f'<text class="xtick" x="{px(x):.1f}" y="{top_ + h + 19}" text-anchor="middle">{label}</text>')
    for y, label in zip(yt, yl):
        out.append(f'<line x1="{left - 5:.1f}" y1="{py(y):.1f}" x2="{left + w:.1f}" y2="{py(y):.1f}" stroke="#ddd"/>'
                   f'<text class="ytick" x="{left - 8:.1f}" y="{py(y) + 4:.1f}" text-anchor="end">{label}</text>')
    out.append(f'<text class="xtitle" x="{left + w / 2:.1f}" y="{top_ + h + 42}" text-anchor="middle">'
               f'{esc(xlabel)}</text>')
    out.append(f'<text class="ytitle" x="22" y="{top_ + h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 22 {top_ + h / 2})">{esc(ylabel)}</text>')
    for i, ((label, sx, sy), lines) in enumerate(zip(series, legends)):
        color, tip = COLORS[i % len(COLORS)], f'<title>{esc(label)}</title>'
        d = ' '.join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(v):.1f}" for j, (x, v) in enumerate(zip(sx, sy)))
        out.append(f'<path class="curve" d="{d}" fill="none" stroke="{color}" stroke-width="1.8">{tip}</path>')
        lx, ly = 10 + column * (i % columns), row_y[i // columns] + 7  # this legend entry's swatch
        if len(sx) == 1:  # a path of one point draws nothing
            out.append(f'<circle class="marker" cx="{px(sx[0]):.1f}" cy="{py(sy[0]):.1f}" r="4" fill="{color}" '
                       f'stroke="white">{tip}</circle><circle cx="{lx + 10:.1f}" cy="{ly}" r="4" fill="{color}"/>')
        else:
            out.append(f'<line x1="{lx:.1f}" y1="{ly}" x2="{lx + 20:.1f}" y2="{ly}" stroke="{color}" '
                       f'stroke-width="3"/>')
        for j, line in enumerate(lines):
            out.append(f'<text class="legend" x="{lx + 26:.1f}" y="{ly + 4 + 14 * j}">{esc(line)}{tip}</text>')
    return '\n'.join(out + ['</svg>']) + '\n'


def bar_chart(title, xlabel, bars, note=''):
    """bars: [(label, value, after)] -> a horizontal bar chart, best first, the value and `after` (the test value)
    right of each bar, long names on two lines; the canvas as wide as names and values need; the note under the
    title."""
    w = 260
    labels = [wrap(label) for label, _, _ in bars]
    bar_h = 34 if any(len(lines) > 1 for lines in labels) else 22  # a bar is bar_h - 6 px high
    values = [v for _, v, _ in bars]
    texts = [f"{v:.4g} {after}".strip() for _, v, after in bars]
    xt = nice_ticks(min(0.0, min(values)), max(0.0, max(values)))
    top_ = 58 if note else 40
    left = 10 + max(text_width(line) for lines in labels for line in lines) + 8
    axis_y = top_ + bar_h * len(bars)
    width = math.ceil(max(left + w + 4 + max(map(text_width, texts)) + 10, 20 + text_width(title, 15),
                          20 + text_width(note)))
    height = axis_y + 50

    def px(x):
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * w
    out = svg_start(width, height, title, note)
    for i, ((label, value, _), lines, text) in enumerate(zip(bars, labels, texts)):
        y, tip = top_ + bar_h * i, f'<title>{esc(label)}</title>'
        middle = y + (bar_h - 6) / 2
        out.append(f'<rect class="bar" x="{px(min(0.0, value)):.1f}" y="{y}" width="{abs(px(value) - px(0.0)):.1f}" '
                   f'height="{bar_h - 6}" fill="{COLORS[0]}">{tip}</rect>'
                   f'<text class="value" x="{max(px(value), px(0.0)) + 4:.1f}" y="{middle + 4}">{esc(text)}</text>')
        for j, line in enumerate(lines):
            out.append(f'<text class="label" x="{left - 8:.1f}" y="{middle + 4 + 14 * j - 7 * (len(lines) - 1)}" '
                       f'text-anchor="end">{esc(line)}{tip}</text>')
    out.append(f'<line x1="{left:.1f}" y1="{axis_y}" x2="{left + w:.1f}" y2="{axis_y}" stroke="black"/>')
    for x, label in zip(xt, tick_labels(xt)):
        out.append(f'<line x1="{px(x):.1f}" y1="{axis_y}" x2="{px(x):.1f}" y2="{axis_y + 5}" stroke="black"/>'
                   f'<text class="xtick" x="{px(x):.1f}" y="{axis_y + 19}" text-anchor="middle">{label}</text>')
    out.append(f'<text class="xtitle" x="{left + w / 2:.1f}" y="{axis_y + 42}" text-anchor="middle">{esc(xlabel)}'
               f'</text>')
    return '\n'.join(out + ['</svg>']) + '\n'


def stem_of(script):
    """The name a script's files carry: train_slm.py -> train_slm (a run without config.json: unknown_script)."""
    return script.removesuffix('.py') or 'unknown_script'


def left_out(runs, drawn, column):
    """'N of M runs drawn (left out: 3 beyond --top=10, 2 not finished)' for a figure of a script's runs that draws
    only `drawn`; '' when it draws them all."""
    shown, why = {r['run'] for r in drawn}, {}
    for r in runs:
        if r['run'] not in shown:
            reason = (f"beyond --top={top}" if r['rank'] != '' and r['rank'] > top else
                      f"no {column} value" if r['rank'] != '' else
                      'replaced' if r['status'].startswith('replaced') else
                      'running' if r['status'].startswith('incomplete: running') else
                      'unscored' if r['status'].startswith('done') else 'not finished')
            why[reason] = why.get(reason, 0) + 1
    return (f"{len(drawn)} of {len(runs)} runs drawn (left out: " + ', '.join(f'{n} {k}' for k, n in why.items())
            + ')') if why else ''


def figures(ranked):
    """{file name: SVG text}: per script, the val metric and train loss of its best `top` finished runs, and the
    leaderboard as bars of the best validation value with the test value beside each. A figure that leaves some of
    the script's runs out says how many and why."""
    out = {}
    for script in sorted({r['script'] for r in ranked if r['rank'] != ''}):
        runs = [r for r in ranked if r['script'] == script]
        best = [r for r in runs if r['rank'] != ''][:top]
        stem, unit, val = stem_of(script), best[0]['step_unit'], best[0]['val_metric']
        for column, name in ((val, 'val'), ('train/loss', 'train_loss')):
            drawn, series = [], []
            for r in best:
                points = [(row[unit], row[column]) for row in r['rows']
                          if row.get(unit) is not None and row.get(column) is not None]
                if points:
                    drawn.append(r)
                    series.append((r['run'], [x for x, _ in points], [y for _, y in points]))
            if series:
                whole = unit == 'epoch' or all(float(x).is_integer() for _, sx, _ in series for x in sx)
                out[f'{stem}_{name}.svg'] = line_chart(f'{script}: {column}', unit, column, series,
                                                       left_out(runs, drawn, column), integer_x=whole)
        bars = [(r['run'], r['best_val'], f"(test {r['test']:.4g})" if r['test'] != '' else '') for r in best]
        out[f'{stem}_leaderboard.svg'] = bar_chart(f"{script}: best {val} (ranked on validation)", val, bars,
                                                   left_out(runs, best, val))
    return out


# -----------------------------------------------------------------------------
# index.html: the whole report in one self-contained file (no script, nothing fetched), to judge a campaign by
# copying one file off a cluster; its links to the run directories' files are relative, so they work beside them
# -----------------------------------------------------------------------------
STYLE = """body{font-family:system-ui,sans-serif;margin:20px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 4px;border-bottom:2px solid #333}
h3{font-size:15px;margin:18px 0 4px}p{margin:4px 0}.meta{color:#555;font-size:13px}nav a{margin-right:14px}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.mono,code{font-family:ui-monospace,monospace;font-size:12px}td.mono{max-width:28em}
td.run{min-width:13em;max-width:22em;overflow-wrap:anywhere}td.files{min-width:12.5em;font-size:12px}
td.state{min-width:9em}.badge{padding:1px 6px;border-radius:3px;display:inline-block}
.done{background:#dff3dc}.unscored{background:#fcefd2}.incomplete{background:#fadcdc}.running{background:#dce8fa}
.replaced{background:#eee;color:#666}.missing{color:#999;text-decoration:line-through}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start;margin-top:10px}figure{margin:0}
figure svg{max-width:100%;height:auto;border:1px solid #ddd}figcaption{font-size:12px}
ul.warnings{font-size:13px;font-family:ui-monospace,monospace}"""
LINKED_FILES = ('config.json', 'log.txt', 'scalars.csv', 'events.jsonl')  # each run's row links to these


def href(*parts):
    """A link relative to FOLDER, where index.html is, to parts joined."""
    return esc(urllib.parse.quote('/'.join(p.replace(os.sep, '/') for p in parts)))


def fmt(value, spec='.4g'):
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else esc(value)


def duration(seconds):
    if seconds == '':
        return ''
    s = round(seconds)
    return (f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s" if s >= 60
            else f"{s} s")


def badge(status):
    kind = ('done' if status == 'done' else 'unscored' if status.startswith('done') else
            'replaced' if status.startswith('replaced') else
            'running' if status.startswith('incomplete: running') else 'incomplete')
    return f'<span class="badge {kind}">{esc(status)}</span>'


def table(head, rows):
    """head: column titles; rows: lists of cells, each HTML or (HTML, class of the cell)."""
    cells = ''.join(f'<th>{esc(h)}</th>' for h in head)
    body = ''.join('<tr>' + ''.join(f'<td class="{c[1]}">{c[0]}</td>' if isinstance(c, tuple) else f'<td>{c}</td>'
                                    for c in row) + '</tr>\n' for row in rows)
    return f'<div class="scroll"><table><thead><tr>{cells}</tr></thead><tbody>\n{body}</tbody></table></div>'


def commit_of(r):
    return (str(r['git_commit'])[:10] or '?') + (' (dirty)' if r['git_dirty'] else '')


def script_section(script, runs, groups, svgs):
    """One script's part of index.html: its leaderboard (status, settings, scores, links to each run's files), its
    groups over seeds when a setting ran with more than one seed, and its figures inline."""
    stem, val, test, better = stem_of(script), runs[0]['val_metric'], runs[0]['test_metric'], runs[0]['better']
    commits = sorted({commit_of(r) for r in runs if r['config']})
    out = [f'<section id="{esc(stem)}"><h2>{esc(script or "runs without config.json (script unknown)")}</h2>',
           f'<p class="meta">{len(runs)} runs, '
           + (f'ranked on <b>{esc(val)}</b> ({"higher" if better == "max" else "lower"} is better), {esc(test)} '
              f'beside it | ' if script else 'never ranked: without config.json no run says which script wrote it | ')
           + (f'commit <code>{esc(commits[0])}</code> | ' if len(commits) == 1 else '')
           + f'<a href="{href(f"leaderboard_{stem}.csv")}">leaderboard_{esc(stem)}.csv</a></p>']
    head = ['rank', 'status', 'run', 'settings', 'seed', f'best {val}', test, 'steps', 'wall time', 'params'] + (
        ['commit'] if len(commits) > 1 else []) + ['files']
    rows = []
    for r in runs:
        files = ' '.join(f'<a href="{href(r["run"], name)}">{name}</a>' if os.path.exists(os.path.join(r['path'], name))
                         else f'<span class="missing" title="not in the run directory">{name}</span>'
                         for name in LINKED_FILES)
        rows.append([(r['rank'], 'n'), (badge(r['status']), 'state'),
                     (f'<a href="{href(r["run"])}/">{esc(r["run"])}</a>', 'run'), (esc(r['settings']), 'mono'),
                     (esc(r['seed']), 'n'), (fmt(r['best_val']), 'n'), (fmt(r['test']), 'n'),
                     (f"{r['steps']} {r['step_unit']}" if r['steps'] != '' else '', 'n'),
                     (duration(r['wall_time_s']), 'n'), (fmt(r['params'], ','), 'n')]
                    + ([(esc(commit_of(r)), 'mono')] if len(commits) > 1 else []) + [(files, 'files')])
    out.append(table(head, rows))
    if any(g['runs'] > 1 for g in groups):
        def mean_std(mean, std):
            return fmt(mean) + (f" ± {std:.2g}" if std != '' else '')
        out.append('<h3>Over seeds: mean ± sample std</h3>')
        out.append(table(['rank', 'settings', 'runs', 'seeds', val, test], [
            [(g['rank'], 'n'), (esc(g['settings']), 'mono'), (g['runs'], 'n'), esc(g['seeds']),
             (mean_std(g['val_mean'], g['val_std']), 'n'), (mean_std(g['test_mean'], g['test_std']), 'n')]
            for g in groups]))
    names = [n for n in (f'{stem}_val.svg', f'{stem}_train_loss.svg', f'{stem}_leaderboard.svg') if n in svgs]
    out.append('<div class="figs">' + ''.join(f'<figure>{svgs[n]}<figcaption><a href="figures/{href(n)}">figures/'
                                              f'{esc(n)}</a></figcaption></figure>' for n in names) + '</div>'
               if names else '<p class="meta">No figures: no finished run with a score.</p>')
    return out + ['</section>']


def index_html(folder, ranked, groups, svgs):
    """The page: what was read, by which command, when; a section per script; this report's warnings last."""
    name = os.path.basename(os.path.abspath(folder))
    scripts = sorted({r['script'] for r in ranked}, key=lambda s: (s == '', s))
    states = {}
    for r in ranked:
        state = re.split(r'[:(]', r['status'])[0].strip()  # done, done, unscored, incomplete, replaced
        states[state] = states.get(state, 0) + 1
    command = 'python report.py ' + folder + ''.join(f" --{k}={v}" for k, v, default in (
        ('select', select, ''), ('top', top, 10)) if v != default)
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f'<title>{esc(name)}: report</title>', f'<style>{STYLE}</style>', '</head><body>',
           f'<h1>{esc(name)}: {len(ranked)} runs of {len(scripts)} script{"s" * (len(scripts) != 1)}</h1>',
           f'<p class="meta">{", ".join(f"{n} {s}" for s, n in states.items())} | <code>{esc(command)}</code> '
           f'at {time.strftime("%Y-%m-%d %H:%M %Z")} | '
           f'<a href="leaderboard.csv">leaderboard.csv</a> <a href="leaderboard_grouped.csv">leaderboard_grouped.csv'
           f'</a></p>',
           '<p class="meta">Each script is ranked on its own validation metric, never together with another script; '
           'the test value is beside it, never used to rank or select.</p>',
           '<nav>' + ''.join(f'<a href="#{esc(stem_of(s))}">{esc(s or stem_of(s))}</a>' for s in scripts)
           + (f'<a href="#warnings">{len(WARNINGS)} warning{"s" * (len(WARNINGS) != 1)}</a>' if WARNINGS else '')
           + '</nav>']
    for script in scripts:
        out += script_section(script, [r for r in ranked if r['script'] == script],
                              [g for g in groups if g['script'] == script], svgs)
    if WARNINGS:
        out.append('<section id="warnings"><h2>Warnings</h2><ul class="warnings">'
                   + ''.join(f'<li>{esc(w)}</li>' for w in WARNINGS) + '</ul></section>')
    return '\n'.join(out + ['</body></html>']) + '\n'


def report(folder):
    """Read, validate, render everything in memory; only then write (atomically). Returns the ranked rows."""
    WARNINGS.clear()
    paths = [p for p in find_runs(folder) if select in os.path.relpath(p, folder)]
    if not paths:
        raise UserError(f"{folder}: no run directories (folders holding {', '.join(RUN_FILES)})"
                        + (f" matching select={select!r}" if select else "") + "; nothing was written")
    runs = [read_run(p, folder) for p in paths]
    settings(runs)
    ranked = rank(runs, 'best_val')
    rows = [{k: r[k] for k in COLUMNS} for r in ranked]
    group_runs = grouped(runs)
    groups = [{k: g[k] for k in GROUPED_COLUMNS} for g in group_runs]
    validate(rows, COLUMNS, 'leaderboard.csv')
    validate(groups, GROUPED_COLUMNS, 'leaderboard_grouped.csv')
    tables = {'leaderboard.csv': to_csv(rows, COLUMNS), 'leaderboard_grouped.csv': to_csv(groups, GROUPED_COLUMNS)}
    for script in {r['script'] for r in rows}:  # one leaderboard per script, as index.html shows them
        tables[f'leaderboard_{stem_of(script)}.csv'] = to_csv([r for r in rows if r['script'] == script], COLUMNS)
    svgs = figures(ranked)
    page = index_html(folder, ranked, group_runs, svgs)
    for name, text in tables.items():
        write_atomic(os.path.join(folder, name), text.encode())
    os.makedirs(os.path.join(folder, 'figures'), exist_ok=True)
    for name, text in svgs.items():
        write_atomic(os.path.join(folder, 'figures', name), text.encode())
    write_atomic(os.path.join(folder, 'index.html'), page.encode())
    return rows, groups, sorted(svgs)


if __name__ == '__main__':
    if not folders:
        raise UserError("usage: python report.py FOLDER [--select=text] [--top=N]: FOLDER holds run directories")
    for folder in folders:
        rows, groups, svgs = report(folder)
        for r in rows:
            val = f"{r['best_val']:.4f}" if r['best_val'] != '' else '-'
            test = f"{r['test']:.4f}" if isinstance(r['test'], (int, float)) else '-'
            print(f"rank {r['rank'] or '-'} | {r['script'] or '-'} | {r['run']} | {r['val_metric']} {val} | "
                  f"{r['test_metric']} {test} | {r['status']}")
        print(f"report | {len(rows)} runs | {len(groups)} groups | {os.path.join(folder, 'leaderboard.csv')} | "
              f"{len(svgs)} figures in {os.path.join(folder, 'figures')} | {os.path.join(folder, 'index.html')}")
