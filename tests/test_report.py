"""report.py on constructed run directories: the leaderboard schema, ranking on validation with test beside it,
one ranking per script, incomplete runs listed, grouped mean/std over seeds, SVGs that parse and whose texts fit
(ticks, titles, legends, what was left out), index.html, rendered in a real browser, and corrupt or missing input."""
import csv
import html.parser
import json
import re
import shutil
import statistics
import subprocess
import sys
import urllib.parse
import xml.etree.ElementTree as ET
import zlib

import pytest
from conftest import ROOT, SCRIPT_ENV

import report
from common import UserError, config_hash

SVG = '{http://www.w3.org/2000/svg}'


def make_run(folder, name, val_curve, test=None, seed=42, done=True, script='train_audio.py', metric='val/macro_f1',
             **config):
    """A run directory as a train script writes it: config.json, events.jsonl, scalars.csv (`metric` its validation
    column), model.txt."""
    path = folder / name
    path.mkdir(parents=True)
    config = dict(arch='tinycnn', seed=seed, out_dir=str(path), max_epochs=len(val_curve), **config)
    (path / 'config.json').write_text(json.dumps(dict(config=config, config_hash=config_hash(config),
                                                      argv=[script, '--x=1'], git_commit='abc')))
    events = [dict(event='start', time_s=0.0)] + [dict(event='eval', epoch=i + 1, time_s=2.0 * (i + 1))
                                                  for i in range(len(val_curve))]
    if done:
        events.append(dict(event='end', reason='done', time_s=2.0 * len(val_curve) + 1, **(
            {metric.replace('val/', 'test/'): test} if test is not None else {})))
    (path / 'events.jsonl').write_text(''.join(json.dumps(dict(schema_version=1, **e)) + '\n' for e in events))
    rows = ''.join(f"{i + 1},{2.0 * (i + 1)},0.001,{1.0 / (i + 1)},{v}\n" for i, v in enumerate(val_curve))
    (path / 'scalars.csv').write_text(f'epoch,time_s,lr,train/loss,{metric}\n' + rows)
    (path / 'model.txt').write_text('TinyCNN(...)\nparameters: 23,491\n')
    return path


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / 'out'
    # 'b' has the best validation and the worst test: it must still rank first
    make_run(folder, 'a', [0.5, 0.6, 0.55], test=0.9, lr=0.1)
    make_run(folder, 'b', [0.7, 0.8], test=0.2, lr=0.2)
    make_run(folder, 'b2', [0.7, 0.6], test=0.4, lr=0.2, seed=7)
    make_run(folder, 'c', [0.95], done=False, lr=0.3)  # best val of all, but not finished
    return folder


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_leaderboard_schema_and_ranking_on_validation(runs):
    report.report(str(runs))
    with open(runs / 'leaderboard.csv') as f:
        assert next(csv.reader(f)) == report.COLUMNS
    rows = read_csv(runs / 'leaderboard.csv')
    assert [(r['run'], r['rank'], r['status']) for r in rows] == [
        ('b', '1', 'done'), ('b2', '2', 'done'), ('a', '3', 'done'),
        ('c', '', "incomplete: no end event 'done' (running, stopped or failed)")]
    assert [float(r['best_val']) for r in rows] == [0.8, 0.7, 0.6, 0.95]
    assert [r['test'] for r in rows] == ['0.2', '0.4', '0.9', '']  # beside, never used to rank
    b = rows[0]
    assert (b['script'], b['val_metric'], b['test_metric'], b['seed'], b['steps'], b['step_unit'], b['params'],
            b['wall_time_s']) == ('train_audio.py', 'val/macro_f1', 'test/macro_f1', '42', '2', 'epoch', '23491',
                                  '5')
    # settings: the keys that differ between runs of the script (seed, out_dir aside)
    assert b['settings'] == 'lr=0.2 max_epochs=2'
    assert b['config_hash'] == json.loads((runs / 'b' / 'config.json').read_text())['config_hash']


def test_grouped_mean_and_std_over_seeds(runs, tmp_path):
    make_run(runs, 'b3', [0.5], test=0.6, lr=0.2, seed=8)  # max_epochs 1: its own group
    make_run(runs, 'b4', [0.65, 0.75], test=0.6, lr=0.2, seed=9)
    report.report(str(runs))
    groups = {g['settings']: g for g in read_csv(runs / 'leaderboard_grouped.csv')}
    g = groups['lr=0.2 max_epochs=2']
    assert g['runs'] == '3' and g['seeds'] == '42 7 9' and g['rank'] == '1'
    assert float(g['val_mean']) == pytest.approx(statistics.fmean([0.8, 0.7, 0.75]))
    assert float(g['val_std']) == pytest.approx(0.05)  # sample std of 0.8, 0.7, 0.75
    assert float(g['test_mean']) == pytest.approx(0.4) and float(g['test_std']) == pytest.approx(0.2)  # 0.2 0.4 0.6
    assert groups['lr=0.2 max_epochs=1']['val_std'] == ''  # one seed: no std
    assert 'lr=0.3 max_epochs=1' not in groups  # the unfinished run is in no group


def test_svgs_parse_with_one_path_per_curve(runs):
    rows, groups, names = report.report(str(runs))
    assert names == ['train_audio_leaderboard.svg', 'train_audio_train_loss.svg', 'train_audio_val.svg']
    for name in names:
        root = ET.parse(runs / 'figures' / name).getroot()
        assert root.tag == f'{SVG}svg'
    val = ET.parse(runs / 'figures' / 'train_audio_val.svg').getroot()
    paths = val.findall(f'{SVG}path')
    assert len(paths) == 3  # the three finished runs; the incomplete one is not drawn
    assert [p.find(f'{SVG}title').text for p in paths] == ['b', 'b2', 'a']
    assert [len(p.get('d').split('L')) for p in paths] == [2, 2, 3]  # one vertex per scalars.csv row
    texts = [t.text for t in val.iter(f'{SVG}text')]
    assert 'epoch' in texts and 'val/macro_f1' in texts  # axis labels, and the legend names each run
    bars = ET.parse(runs / 'figures' / 'train_audio_leaderboard.svg').getroot().findall(f'{SVG}rect[@class="bar"]')
    assert len(bars) == 3


def test_metrics_per_script(tmp_path):
    folder = tmp_path / 'out'
    path = make_run(folder, 'slm', [3.0, 2.0, 2.5], script='train_slm.py')
    (path / 'scalars.csv').write_text('iter,time_s,lr,train/loss,val/loss\n0,1,1,3,3.0\n10,2,1,2,2.0\n20,3,1,2,2.5\n')
    report.report(str(folder))
    (row,) = read_csv(folder / 'leaderboard.csv')
    assert (row['val_metric'], row['best_val'], row['steps'], row['step_unit']) == ('val/loss', '2', '20', 'iter')


@pytest.mark.parametrize('name, content, message', [
    ('config.json', '{"config": {', 'config.json: not a run'),
    ('events.jsonl', '{"event": "start"}\n{"event": "en', 'events.jsonl, line 2: not a JSON object'),
    ('scalars.csv', 'epoch,time_s,val/macro_f1\n1,2.0,0.5\n2,oops,0.6\n', 'scalars.csv, line 3:'),
    ('scalars.csv', 'epoch,time_s,val/macro_f1\n1,2.0\n', 'scalars.csv, line 2: 2 values for 3 columns'),
    ('scalars.csv', '', 'scalars.csv: expected a header'),
])
def test_corrupt_files_stop_the_report_and_nothing_is_overwritten(runs, name, content, message):
    report.report(str(runs))
    before = {p: p.read_bytes() for p in runs.rglob('*') if 'leaderboard' in p.name or p.suffix in ('.svg', '.html')}
    assert len(before) == 7  # leaderboard.csv, _grouped.csv, _train_audio.csv, three figures, index.html
    (runs / 'a' / name).write_text(content)
    with pytest.raises(UserError, match=message) as error:
        report.report(str(runs))
    assert str(runs / 'a') in str(error.value) and 'nothing was written' in str(error.value)
    assert {p: p.read_bytes() for p in before} == before


def test_missing_files_list_the_run_as_incomplete(runs):
    (runs / 'a' / 'scalars.csv').unlink()
    report.report(str(runs))
    rows = {r['run']: r for r in read_csv(runs / 'leaderboard.csv')}
    assert rows['a']['status'] == 'incomplete: no scalars.csv' and rows['a']['rank'] == ''
    assert [r['rank'] for r in rows.values() if r['status'] == 'done'] == ['1', '2']


def test_cli_no_runs_is_a_clear_error(tmp_path):
    (tmp_path / 'empty').mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / 'report.py'), 'empty'], cwd=tmp_path, env=SCRIPT_ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: empty: no run directories (folders holding config.json, events.jsonl, "
                                   "scalars.csv); nothing was written")
    assert list((tmp_path / 'empty').iterdir()) == []


# -----------------------------------------------------------------------------
# one leaderboard per script; figures whose texts fit; index.html
# -----------------------------------------------------------------------------

def svg(folder, name):
    return ET.parse(folder / 'figures' / name).getroot()


def texts(root, cls):
    return [t for t in root.iter(f'{SVG}text') if t.get('class') == cls]


def test_each_script_is_ranked_alone_even_on_the_same_metric(tmp_path):
    folder = tmp_path / 'out'
    make_run(folder, 'slm', [3.0, 2.0], test=2.1, script='train_slm.py', metric='val/loss')
    make_run(folder, 'vae', [120.0, 100.0], script='train_vae.py', metric='val/loss')
    make_run(folder, 'vae2', [60.0, 50.0], script='train_vae.py', metric='val/loss', beta=4)
    rows, groups, names = report.report(str(folder))
    # the SLM's 2.0 is the lowest val/loss of all, yet it ranks only among SLM runs; the VAE runs rank on their own
    assert [(r['script'], r['run'], r['rank']) for r in rows] == [
        ('train_slm.py', 'slm', 1), ('train_vae.py', 'vae2', 1), ('train_vae.py', 'vae', 2)]
    assert [(g['script'], g['rank']) for g in groups] == [('train_slm.py', 1), ('train_vae.py', 1),
                                                         ('train_vae.py', 2)]
    assert [r['run'] for r in read_csv(folder / 'leaderboard_train_slm.csv')] == ['slm']
    assert [(r['run'], r['rank']) for r in read_csv(folder / 'leaderboard_train_vae.csv')] == [('vae2', '1'),
                                                                                              ('vae', '2')]
    assert read_csv(folder / 'leaderboard_train_slm.csv')[0]['test'] == '2.1'
    assert names == [f'train_{s}_{kind}.svg' for s in ('slm', 'vae') for kind in ('leaderboard', 'train_loss', 'val')]
    assert [p.find(f'{SVG}title').text for p in svg(folder, 'train_vae_val.svg').findall(f'{SVG}path')] == \
        ['vae2', 'vae']
    page = (folder / 'index.html').read_text()
    slm, vae = page.split('<section id="train_slm">')[1], page.split('<section id="train_vae">')[1]
    assert 'href="slm/"' in slm.split('</table>')[0] and 'vae' not in slm.split('</table>')[0]
    assert 'href="vae2/"' in vae and 'href="vae/"' in vae and 'slm/' not in vae


def test_a_one_point_run_is_drawn_as_a_marker(runs):
    make_run(runs, 'once', [0.65], test=0.5)
    report.report(str(runs))
    root = svg(runs, 'train_audio_val.svg')
    (marker,) = root.findall(f'{SVG}circle[@class="marker"]')
    assert marker.find(f'{SVG}title').text == 'once'
    assert 0 < float(marker.get('cx')) < float(root.get('width')) and 0 < float(marker.get('cy')) < \
        float(root.get('height'))
    assert 'once' in [t.text for t in texts(root, 'legend')]


def test_epoch_and_iteration_axes_have_whole_number_ticks(runs, tmp_path):
    report.report(str(runs))  # epochs 1..3: a 0.5 step would be the round choice for 5 ticks
    for name in ('train_audio_val.svg', 'train_audio_train_loss.svg'):
        labels = [t.text for t in texts(svg(runs, name), 'xtick')]
        assert labels == ['1', '2', '3'], labels
    assert report.nice_ticks(1, 3) == [1, 1.5, 2, 2.5, 3]  # a real-valued axis keeps round halves
    assert report.nice_ticks(1, 3, integer=True) == [1, 2, 3]
    assert report.nice_ticks(5, 5, integer=True) == [4, 5, 6]  # one point: a band of whole numbers
    assert report.nice_ticks(0, 120, integer=True) == [0, 20, 40, 60, 80, 100, 120]
    assert report.tick_labels([0.4, 0.6, 0.8]) == ['0.4', '0.6', '0.8']
    assert report.tick_labels([0.0, 0.05, 0.1]) == ['0.00', '0.05', '0.10']


def test_axis_titles_sit_clear_of_the_tick_labels(runs):
    report.report(str(runs))
    size = report.FONT  # a text's box: ascent about 0.8 size above its baseline, descent 0.25 below
    for name in ('train_audio_val.svg', 'train_audio_train_loss.svg', 'train_audio_leaderboard.svg'):
        root = svg(runs, name)
        (xtitle,) = texts(root, 'xtitle')
        lowest_tick = max(float(t.get('y')) for t in texts(root, 'xtick'))
        assert float(xtitle.get('y')) - 0.8 * size > lowest_tick + 0.25 * size, name
    for name in ('train_audio_val.svg', 'train_audio_train_loss.svg'):
        root = svg(runs, name)
        (ytitle,) = texts(root, 'ytitle')  # rotated -90: its glyphs reach 0.25 size right of its x
        leftmost = min(float(t.get('x')) - report.text_width(t.text) for t in texts(root, 'ytick'))  # anchored at end
        assert float(ytitle.get('x')) + 0.25 * size < leftmost, name


def extent(t):
    """(left, right) of an SVG text from its x, anchor and report.text_width."""
    x, width = float(t.get('x')), report.text_width(t.text or '', float(t.get('font-size') or report.FONT))
    return {'end': (x - width, x), 'middle': (x - width / 2, x + width / 2)}.get(t.get('text-anchor'), (x, x + width))


def test_every_text_fits_the_canvas_with_long_run_names(tmp_path):
    folder = tmp_path / 'out'
    for i in range(12):  # names as long as a KD campaign's
        make_run(folder, f'kd_tinycnn_cbam_r8_k7_alpha0.{i}_T4_teacher_crnn_mixup_specaug/seed4{i}',
                 [0.3 + 0.01 * i, 0.4 + 0.01 * i], test=0.5, script='train_kd.py', alpha=i / 10)
    report.report(str(folder))
    for name in ('train_kd_val.svg', 'train_kd_train_loss.svg', 'train_kd_leaderboard.svg'):
        root = svg(folder, name)
        width = float(root.get('width'))
        legend = texts(root, 'legend' if 'leaderboard' not in name else 'label')
        assert len(legend) >= 10, name
        for t in root.iter(f'{SVG}text'):
            if t.get('class') != 'ytitle':  # rotated: its extent is vertical
                left, right = extent(t)
                assert 0 <= left and right <= width, (name, t.text, right, width)
    # the estimate is an upper bound: at least the 0.55 em a DejaVu/Arial lower-case letter or digit averages
    assert report.text_width('kd_tinycnn_alpha0.9_T4/seed42') >= 0.55 * report.FONT * 29


def test_figures_say_how_many_runs_they_draw_and_which_limit_left_the_rest_out(runs, monkeypatch):
    report.report(str(runs))  # b, b2, a finished; c did not
    assert [t.text for t in texts(svg(runs, 'train_audio_val.svg'), 'note')] == [
        '3 of 4 runs drawn (left out: 1 not finished)']
    monkeypatch.setattr(report, 'top', 2)
    report.report(str(runs))
    for name in ('train_audio_val.svg', 'train_audio_train_loss.svg', 'train_audio_leaderboard.svg'):
        assert [t.text for t in texts(svg(runs, name), 'note')] == [
            '2 of 4 runs drawn (left out: 1 beyond --top=2, 1 not finished)'], name
    assert 'beyond --top=2' in (runs / 'index.html').read_text()
    (runs / 'c' / 'scalars.csv').unlink()
    (runs / 'c' / 'events.jsonl').unlink()
    (runs / 'c' / 'config.json').unlink()  # c is no train_audio.py run any more: every such run is drawn
    monkeypatch.setattr(report, 'top', 10)
    report.report(str(runs))
    assert texts(svg(runs, 'train_audio_val.svg'), 'note') == []


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ('href', 'src')]


def test_index_html_is_one_self_contained_page_with_statuses_and_links(runs):
    (runs / 'a' / 'log.txt').write_text('epoch 1 | ...\n')
    make_run(runs, 'd', [float('nan'), 0.5], test=0.1)  # a diverged evaluation: a warning, listed on the page too
    _, _, names = report.report(str(runs))
    page = (runs / 'index.html').read_text()
    parser = Links()
    parser.feed(page)
    assert 'script' not in parser.tags and 'img' not in parser.tags and 'link' not in parser.tags
    assert parser.tags.count('svg') == len(names) == 3  # every figure inline
    for link in parser.links:  # relative, and to files that exist (a missing one is no link)
        assert not re.match(r'^([a-z]+:|/)', link), link
        if not link.startswith('#'):
            assert (runs / urllib.parse.unquote(link)).exists(), link
    for run in ('a', 'b', 'b2', 'c', 'd'):
        for name in ('config.json', 'scalars.csv', 'events.jsonl'):
            assert f'{run}/{name}' in parser.links
    assert f'<code>python report.py {runs}</code>' in page  # the command as run, which names the folder
    assert 'a/log.txt' in parser.links and 'b/log.txt' not in parser.links  # b has no log.txt
    assert "incomplete: no end event &#x27;done&#x27;" in page or "incomplete: no end event 'done'" in page
    assert page.count('>done</span>') == 4 and 'leaderboard_train_audio.csv' in parser.links
    assert 'Over seeds' in page  # b and b2 differ only in their seed
    assert 'd/scalars.csv: skipped non-finite values (inf, nan): val/macro_f1 1' in page.split('id="warnings"')[1]


# -----------------------------------------------------------------------------
# in a real browser: Debian's chromium (apt-get install -y chromium); skipped where there is none
# -----------------------------------------------------------------------------
CHROMIUM = next(filter(None, map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome'))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason='no chromium binary (Debian: apt-get install -y chromium)')


def chromium(tmp_path, *args):
    proc = subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', f'--user-data-dir={tmp_path}/cr',
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def png_pixels(path):
    """(height, width, channels) uint8 pixels of an 8-bit RGB or RGBA PNG (what chromium writes)."""
    import numpy as np
    data, pos, idat = path.read_bytes(), 8, b''
    while pos < len(data):
        n, kind = int.from_bytes(data[pos:pos + 4], 'big'), data[pos + 4:pos + 8]
        if kind == b'IHDR':
            width, height = (int.from_bytes(data[pos + i:pos + i + 4], 'big') for i in (8, 12))
            depth, color = data[pos + 16], data[pos + 17]
        idat += data[pos + 8:pos + 8 + n] if kind == b'IDAT' else b''
        pos += 12 + n
    assert depth == 8 and color in (2, 6), (depth, color)
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * bpp)
    out, prev = np.zeros((height, width * bpp), np.uint8), np.zeros(width * bpp, np.int64)
    for y in range(height):  # undo each row's filter (PNG spec 9.2): none, sub, up, average, paeth
        kind, row = raw[y, 0], raw[y, 1:].astype(np.int64)
        if kind == 2:
            row = row + prev
        elif kind in (1, 3, 4):
            for i in range(width * bpp):
                a, b = (row[i - bpp] if i >= bpp else 0), prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                if kind == 1:
                    p = a
                elif kind == 3:
                    p = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    p = a if pa <= pb and pa <= pc else b if pb <= pc else c
                row[i] = (row[i] + p) & 255
        prev = row & 255
        out[y] = prev
    return out.reshape(height, width, bpp)


@needs_chromium
def test_index_html_renders_in_chromium(runs, tmp_path):
    report.report(str(runs))
    shot = tmp_path / 'shot.png'
    chromium(tmp_path, f'--screenshot={shot}', '--window-size=800,1200', (runs / 'index.html').as_uri())
    pixels = png_pixels(shot)[..., :3].astype(int)
    assert pixels.shape[:2] == (1200, 800)
    ink = (pixels.min(axis=2) < 200).mean()
    assert ink > 0.01, f'a near-blank page: {ink:.2%} of pixels are not white'
    blue = (abs(pixels - [0x1f, 0x77, 0xb4]).max(axis=2) < 40).sum()  # the first curve's colour: a figure is drawn
    assert blue > 50, blue


@needs_chromium
def test_no_figure_text_leaves_its_canvas_or_overlaps_another_in_chromium(tmp_path):
    """The layout rests on an estimate of text widths; here the browser measures every text (getBBox) instead."""
    folder = tmp_path / 'out'
    for i in range(6):
        make_run(folder, f'kd_tinycnn_cbam_r8_k7_alpha0.{i}_T4_teacher_crnn/seed4{i}', [0.3, 0.4 + 0.01 * i],
                 test=0.5, script='train_kd.py', alpha=i / 10)
    make_run(folder, 'kd_once/seed1', [0.41], test=0.5, script='train_kd.py', alpha=0.9)
    report.report(str(folder))
    measure = ("<script>const out = []; document.querySelectorAll('svg').forEach((svg, n) => "
               "svg.querySelectorAll('text').forEach(t => {"
               " const b = t.getBBox(), m = t.getCTM(), p = svg.createSVGPoint();"
               " const corners = [[b.x, b.y], [b.x + b.width, b.y + b.height]].map(([x, y]) => { p.x = x; p.y = y;"
               " const q = p.matrixTransform(m); return [q.x, q.y]; });"
               " out.push([n, t.getAttribute('class'), +svg.getAttribute('width'), +svg.getAttribute('height'),"
               " Math.min(corners[0][0], corners[1][0]), Math.min(corners[0][1], corners[1][1]),"
               " Math.max(corners[0][0], corners[1][0]), Math.max(corners[0][1], corners[1][1])]); }));"
               " document.getElementById('out').textContent = JSON.stringify(out);</script>")
    page = tmp_path / 'measure.html'
    figures = ''.join(p.read_text() for p in sorted((folder / 'figures').iterdir()))
    page.write_text('<!DOCTYPE html><html><body>' + figures
                    + '<pre id="out"></pre>' + measure + '</body></html>')
    dom = chromium(tmp_path, '--dump-dom', '--virtual-time-budget=5000', page.as_uri())
    boxes = json.loads(html.unescape(re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)[1]))
    assert len(boxes) > 50
    for n, cls, width, height, x0, y0, x1, y1 in boxes:
        assert 0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height, (n, cls, x0, y0, x1, y1, width, height)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a[0] == b[0]:  # the same figure
                apart = a[6] <= b[4] + 0.5 or b[6] <= a[4] + 0.5 or a[7] <= b[5] + 0.5 or b[7] <= a[5] + 0.5
                assert apart, (a, b)
