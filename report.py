"""
Read every run directory under a folder (what train_*.py wrote: config.json, events.jsonl, scalars.csv,
model.txt) and write a leaderboard and SVG figures beside them. Training emits facts; this only reads them.

    python report.py out/                                   # out/leaderboard.csv, leaderboard_grouped.csv, figures/
    python report.py out/campaign_audio --select=kd_ --top=5

Runs are ranked by their validation metric (METRICS below, one per script); the test metric is reported beside
it and never used to select or rank. A run that did not finish (no end event 'done', no scalars.csv, ...) is listed
with status 'incomplete: why' ('incomplete: running (being written by ...)' while a process holds its lock); a
finished run without a score is listed 'done, unscored: why' (its scalars.csv has no such column, or no finite
value in it) and said in a warning line; a run that --overwrite=True moved aside (<out_dir>.replaced-<time>) is
listed 'replaced' and never ranked. In scalars.csv an empty cell is no value, and so is inf or nan (a diverged
evaluation): skipped in the figures and never the best score (a warning counts them); a cell that is not a number
at all, like a file that exists but cannot be read (corrupt JSON or CSV), stops the report with one message naming
the file, line and column, before anything is written. Every file is written atomically.
"""
import csv
import io
import json
import math
import os
import re
import statistics
import sys

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
# leaderboard.csv: one row per run directory (finished or not), in rank order within each validation metric
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


def warn(message):
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
               config_hash='', git_commit='', events=[], header=[], rows=[], params='')
    missing = [name for name in RUN_FILES if not os.path.exists(os.path.join(path, name))]
    if 'config.json' not in missing:
        try:
            with open(os.path.join(path, 'config.json')) as f:
                facts = json.load(f)
            run.update(config=dict(facts['config']), config_hash=facts['config_hash'], git_commit=facts.get(
                'git_commit') or '', script=os.path.basename(facts['argv'][0]))
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
    """Sort by validation metric name, then best first (finished, ranked rows before the rest); number ranks."""
    def order(r):
        v = r[value_key]
        return (r['val_metric'], v == '' or r.get('status', 'done') != 'done',
                0 if v == '' else (-v if r['better'] == 'max' else v), r.get('run', r.get('settings', '')))
    items = sorted(items, key=order)
    counters = {}
    for r in items:
        if r[value_key] != '' and r.get('status', 'done') == 'done':
            counters[r['val_metric']] = counters.get(r['val_metric'], 0) + 1
            r['rank'] = counters[r['val_metric']]
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
# SVG figures with the standard library: line charts (one <path> per curve) and a bar chart
# -----------------------------------------------------------------------------
COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22',
          '#17becf']


def esc(text):
    return str(text).replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;').replace('"', '&quot;')


def nice_ticks(lo, hi, n=5):
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(int(math.ceil((hi - first) / step)) + 1)]


def line_chart(title, xlabel, ylabel, series, width=720, height=420):
    """series: [(label, xs, ys)] -> SVG text with axes, ticks, a legend and one <path> per series."""
    left, right, top_, bottom = 70, 200, 40, 50
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    w, h = width - left - right, height - top_ - bottom

    def px(x):
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * w

    def py(y):
        return top_ + h - (y - yt[0]) / (yt[-1] - yt[0]) * h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left + w / 2}" y="22" text-anchor="middle" font-size="15">{esc(title)}</text>',
           f'<line x1="{left}" y1="{top_ + h}" x2="{left + w}" y2="{top_ + h}" stroke="black"/>',
           f'<line x1="{left}" y1="{top_}" x2="{left}" y2="{top_ + h}" stroke="black"/>']
    for x in xt:
        out.append(f'<line x1="{px(x):.1f}" y1="{top_ + h}" x2="{px(x):.1f}" y2="{top_ + h + 5}" stroke="black"/>'
                   f'<text x="{px(x):.1f}" y="{top_ + h + 18}" text-anchor="middle">{x:g}</text>')
    for y in yt:
        out.append(f'<line x1="{left - 5}" y1="{py(y):.1f}" x2="{left + w}" y2="{py(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 10}" text-anchor="middle">{esc(xlabel)}</text>')
    out.append(f'<text x="16" y="{top_ + h / 2}" text-anchor="middle" transform="rotate(-90 16 {top_ + h / 2})">'
               f'{esc(ylabel)}</text>')
    for i, (label, sx, sy) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        d = ' '.join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y) in enumerate(zip(sx, sy)))
        out.append(f'<path class="curve" d="{d}" fill="none" stroke="{color}" stroke-width="1.8">'
                   f'<title>{esc(label)}</title></path>')
        ly = top_ + 10 + 18 * i
        out.append(f'<line x1="{left + w + 15}" y1="{ly}" x2="{left + w + 35}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="3"/><text x="{left + w + 40}" y="{ly + 4}">{esc(label[:24])}</text>')
    return '\n'.join(out + ['</svg>']) + '\n'


def bar_chart(title, xlabel, bars, width=720):
    """bars: [(label, value, note)] -> a horizontal bar chart, best first, the note (test) after each bar."""
    left, right, bar_h = 220, 140, 22
    height = 70 + bar_h * len(bars)
    values = [v for _, v, _ in bars]
    xt = nice_ticks(min(0.0, min(values)), max(values))
    w = width - left - right

    def px(x):
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * w
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left + w / 2}" y="22" text-anchor="middle" font-size="15">{esc(title)}</text>']
    for i, (label, value, note) in enumerate(bars):
        y = 40 + bar_h * i
        out.append(f'<rect class="bar" x="{px(min(0.0, value)):.1f}" y="{y}" width="{abs(px(value) - px(0.0)):.1f}" '
                   f'height="{bar_h - 6}" fill="{COLORS[0]}"/>'
                   f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{esc(label[:32])}</text>'
                   f'<text x="{max(px(value), px(0.0)) + 4:.1f}" y="{y + 12}">{value:.4g} {esc(note)}</text>')
    axis_y = 40 + bar_h * len(bars)
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + w}" y2="{axis_y}" stroke="black"/>')
    for x in xt:
        out.append(f'<line x1="{px(x):.1f}" y1="{axis_y}" x2="{px(x):.1f}" y2="{axis_y + 5}" stroke="black"/>'
                   f'<text x="{px(x):.1f}" y="{axis_y + 18}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    return '\n'.join(out + ['</svg>']) + '\n'


def figures(ranked):
    """{file name: SVG text}: per script, the val metric and train loss of its best `top` finished runs, and the
    leaderboard as bars of the best validation value with the test value beside each."""
    out = {}
    for script in sorted({r['script'] for r in ranked if r['rank'] != ''}):
        best = [r for r in ranked if r['script'] == script and r['rank'] != ''][:top]
        stem, unit = script.removesuffix('.py') or 'runs', best[0]['step_unit']
        for column, name in ((best[0]['val_metric'], 'val'), ('train/loss', 'train_loss')):
            series = [(r['run'], [row[unit] for row in r['rows'] if row.get(column) is not None],
                       [row[column] for row in r['rows'] if row.get(column) is not None]) for r in best]
            series = [s for s in series if s[1]]
            if series:
                out[f'{stem}_{name}.svg'] = line_chart(f'{script}: {column}', unit, column, series)
        bars = [(r['run'], r['best_val'], f"(test {r['test']:.4g})" if r['test'] != '' else '') for r in best]
        out[f'{stem}_leaderboard.svg'] = bar_chart(f"{script}: best {best[0]['val_metric']} (ranked on validation)",
                                                   best[0]['val_metric'], bars)
    return out


def report(folder):
    """Read, validate, render everything in memory; only then write (atomically). Returns the ranked rows."""
    paths = [p for p in find_runs(folder) if select in os.path.relpath(p, folder)]
    if not paths:
        raise UserError(f"{folder}: no run directories (folders holding {', '.join(RUN_FILES)})"
                        + (f" matching select={select!r}" if select else "") + "; nothing was written")
    runs = [read_run(p, folder) for p in paths]
    settings(runs)
    ranked = rank(runs, 'best_val')
    rows = [{k: r[k] for k in COLUMNS} for r in ranked]
    groups = [{k: g[k] for k in GROUPED_COLUMNS} for g in grouped(runs)]
    validate(rows, COLUMNS, 'leaderboard.csv')
    validate(groups, GROUPED_COLUMNS, 'leaderboard_grouped.csv')
    svgs = figures(ranked)
    write_atomic(os.path.join(folder, 'leaderboard.csv'), to_csv(rows, COLUMNS).encode())
    write_atomic(os.path.join(folder, 'leaderboard_grouped.csv'), to_csv(groups, GROUPED_COLUMNS).encode())
    os.makedirs(os.path.join(folder, 'figures'), exist_ok=True)
    for name, text in svgs.items():
        write_atomic(os.path.join(folder, 'figures', name), text.encode())
    return rows, groups, sorted(svgs)


if __name__ == '__main__':
    if not folders:
        raise UserError("usage: python report.py FOLDER [--select=text] [--top=N]: FOLDER holds run directories")
    for folder in folders:
        rows, groups, svgs = report(folder)
        for r in rows:
            val = f"{r['best_val']:.4f}" if r['best_val'] != '' else '-'
            test = f"{r['test']:.4f}" if isinstance(r['test'], (int, float)) else '-'
            print(f"rank {r['rank'] or '-'} | {r['run']} | {r['val_metric']} {val} | {r['test_metric']} {test} | "
                  f"{r['status']}")
        print(f"report | {len(rows)} runs | {len(groups)} groups | {os.path.join(folder, 'leaderboard.csv')} | "
              f"{len(svgs)} figures in {os.path.join(folder, 'figures')}")
