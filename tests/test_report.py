"""report.py on constructed run directories: the leaderboard schema, ranking on validation with test beside it,
incomplete runs listed, grouped mean/std over seeds, SVGs that parse, and corrupt or missing input."""
import csv
import json
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import ROOT, SCRIPT_ENV

import report
from common import UserError, config_hash

SVG = '{http://www.w3.org/2000/svg}'


def make_run(folder, name, val_curve, test=None, seed=42, done=True, script='train_audio.py', **config):
    """A run directory as a train script writes it: config.json, events.jsonl, scalars.csv, model.txt."""
    path = folder / name
    path.mkdir(parents=True)
    config = dict(arch='tinycnn', seed=seed, out_dir=str(path), max_epochs=len(val_curve), **config)
    (path / 'config.json').write_text(json.dumps(dict(config=config, config_hash=config_hash(config),
                                                      argv=[script, '--x=1'], git_commit='abc')))
    events = [dict(event='start', time_s=0.0)] + [dict(event='eval', epoch=i + 1, time_s=2.0 * (i + 1))
                                                  for i in range(len(val_curve))]
    if done:
        events.append(dict(event='end', reason='done', time_s=2.0 * len(val_curve) + 1, **(
            {'test/macro_f1': test} if test is not None else {})))
    (path / 'events.jsonl').write_text(''.join(json.dumps(dict(schema_version=1, **e)) + '\n' for e in events))
    rows = ''.join(f"{i + 1},{2.0 * (i + 1)},0.001,{1.0 / (i + 1)},{v}\n" for i, v in enumerate(val_curve))
    (path / 'scalars.csv').write_text('epoch,time_s,lr,train/loss,val/macro_f1\n' + rows)
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
    before = {p: p.read_bytes() for p in runs.rglob('*') if 'leaderboard' in p.name or p.suffix == '.svg'}
    assert len(before) == 5
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
