"""sweep.py, report.py and sample.py on damaged, locked, foreign or odd input: one `error:` line (or a warning) that
names the file, line or value, and every file that was there before is byte-identical afterwards. Nothing unreadable
is ever read as "rerun"; nothing is started twice; a replaced run is moved aside, never deleted."""
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV
from test_sweep import FAKE

import report
import sweep
from common import UserError, configure
from data import CharTokenizer
from model import CharTransformer, TransformerConfig

ENV = dict(SCRIPT_ENV, PYTHONPATH=str(ROOT))
HOLDER = 'pid 4242 on testhost since 2026-12-01T12:00:00'


def snapshot(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def cli(tool, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / tool), *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)


def assert_refused(proc, *parts):
    """Exit 2, one line on stderr: 'error: ...' holding every part; no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), proc.stdout + proc.stderr
    assert all(part in lines[0] for part in parts), lines[0]


@pytest.fixture
def held_lock():
    """hold(out_dir): take out_dir's lock as a live train script does (flock on .lock, holder in the file)."""
    fds = []

    def hold(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / '.lock', os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{HOLDER}\n".encode())
        fds.append(fd)
    yield hold
    for fd in fds:
        os.close(fd)


# -----------------------------------------------------------------------------
# sweep.py
# -----------------------------------------------------------------------------
CAMPAIGN = """out_root = 'out/c'
runs = [dict(name='a', script='train_fake.py'),
        dict(name='b', script='train_fake.py', overrides=dict(lr=0.2), after=['a']),
        dict(name='d', script='train_fake.py', best_of=dict(runs=['a', 'b'], metric='val/loss', mode='min',
                                                            keys=['lr']))]
"""


@pytest.fixture(scope='module')
def finished_campaign(tmp_path_factory):
    """A campaign of three fake runs, all finished (d copied lr from a: the lower val/loss), run once per module."""
    folder = tmp_path_factory.mktemp('campaign')
    (folder / 'train_fake.py').write_text(FAKE)
    (folder / 'camp.py').write_text(CAMPAIGN)
    proc = cli('sweep.py', 'camp.py', cwd=folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for run_dir in (folder / 'out/c').glob('*/seed42'):  # the fake script saves no checkpoints; real ones do
        for name in ('last.pt', 'best.pt'):
            (run_dir / name).write_bytes(b'weights')
    return folder


@pytest.fixture
def camp(finished_campaign, tmp_path):
    """A copy of the finished campaign to damage."""
    shutil.copytree(finished_campaign, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_the_finished_campaign_plans_skips(camp):
    proc = cli('sweep.py', 'camp.py', '--dry_run=True', cwd=camp)
    assert proc.returncode == 0 and [line.split(' | ')[1] for line in proc.stdout.splitlines()] == ['skip'] * 3
    assert 'best_of: a (mean val/loss 0.1000)' in proc.stdout


def append(path, text):
    with open(path, 'ab') as f:
        f.write(text if isinstance(text, bytes) else text.encode())


def cut_last_line(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - len(data.splitlines()[-1]) // 2 - 1])  # as a kill mid-write leaves it


A = 'out/c/a/seed42'
SWEEP_FAULTS = {  # name: (damage done to the finished campaign, what the error names)
    'garbage line in events.jsonl': (lambda c: append(c / A / 'events.jsonl', 'garbage\n'),
                                     [f'{A}/events.jsonl, line 3: not a JSON object', 'fix the file']),
    'truncated last line of events.jsonl': (lambda c: cut_last_line(c / A / 'events.jsonl'),
                                            [f'{A}/events.jsonl, line 2: not a JSON object']),
    'JSON that is no object in events.jsonl': (lambda c: append(c / A / 'events.jsonl', '\n42\n'),
                                               [f'{A}/events.jsonl, line 4: not a JSON object']),
    'events.jsonl not UTF-8': (lambda c: append(c / A / 'events.jsonl', b'\xff\xfe\n'),
                               [f'{A}/events.jsonl, line 3: not a JSON object', 'utf-8']),
    'config.json not JSON': (lambda c: (c / A / 'config.json').write_text('{"config": {'),
                             [f'{A}/config.json: not readable as JSON', 'line 1']),
    'config.json without config_hash': (lambda c: (c / A / 'config.json').write_text('{"config": {}}'),
                                        [f"{A}/config.json: not a run's config.json"]),
    'config.json missing beside last.pt': (lambda c: (c / A / 'config.json').unlink(),
                                           [f'{A}/config.json: missing, but the folder holds last.pt, best.pt',
                                            'restore config.json']),
    'a file where the run directory goes': (lambda c: (shutil.rmtree(c / A), (c / A).write_text('x')),
                                            [f'{A}: a file where the run directory goes']),
    # the facts best_of reads: scalars.csv of the runs it chooses among
    'garbage cell in a best_of scalars.csv': (
        lambda c: append(c / A / 'scalars.csv', '2,0.1,0.1,1.0,oops\n'),
        [f"{A}/scalars.csv, line 3: column 'val/loss' holds 'oops', not a number"]),
    'truncated best_of scalars.csv row': (lambda c: append(c / A / 'scalars.csv', '2,0.1\n'),
                                          [f'{A}/scalars.csv, line 3: 2 values for 5 columns']),
    'best_of metric column renamed': (
        lambda c: (c / A / 'scalars.csv').write_text('epoch,time_s,lr,train/loss,val/lossx\n1,0.1,0.1,1.0,0.1\n'),
        [f"{A}/scalars.csv: no column 'val/loss' (columns: epoch, time_s, lr, train/loss, val/lossx)"]),
    'best_of metric never finite': (
        lambda c: (c / A / 'scalars.csv').write_text('epoch,time_s,lr,train/loss,val/loss\n1,0.1,0.1,1.0,nan\n'
                                                     '2,0.1,0.1,1.0,inf\n3,0.1,0.1,1.0,\n'),
        [f'{A}/scalars.csv: no finite val/loss value: best_of cannot rank this run']),
    'best_of scalars.csv missing': (lambda c: (c / A / 'scalars.csv').unlink(),
                                    [f'{A}/scalars.csv: missing, but the run finished']),
    'best_of pick has no such key': (
        lambda c: (c / A / 'config.json').write_text(json.dumps(dict(json.loads((c / A / 'config.json').read_text()),
                                                                     config={'seed': 42}))),
        [f"{A}/config.json: its config has no ['lr'], which best_of copies"]),
}
RUN_TOO = {'garbage line in events.jsonl', 'truncated last line of events.jsonl', 'config.json missing beside last.pt',
           'garbage cell in a best_of scalars.csv'}  # also run for real (the plan and the run read facts the same way)


@pytest.mark.parametrize('fault', SWEEP_FAULTS)
def test_unreadable_facts_stop_the_sweep_and_change_nothing(camp, fault):
    damage, parts = SWEEP_FAULTS[fault]
    damage(camp)
    before = snapshot(camp)
    proc = cli('sweep.py', 'camp.py', '--dry_run=True', cwd=camp)
    assert_refused(proc, *parts, 'nothing was run')
    assert not proc.stdout  # not half a plan: every run directory is read before the first line
    if fault in RUN_TOO:
        assert_refused(cli('sweep.py', 'camp.py', cwd=camp), *parts)
        assert_refused(cli('sweep.py', 'camp.py', '--status=True', cwd=camp), *parts)
        assert_refused(cli('sweep.py', 'camp.py', '--submit=slurm', '--dry_run=True', cwd=camp), *parts)
    assert snapshot(camp) == before


def test_non_finite_validation_values_never_win_best_of(camp):
    before = snapshot(camp)
    # b's curve gains a -inf and a nan (a diverged evaluation): read as no value, so a (0.1) still beats b (0.2)
    append(camp / 'out/c/b/seed42/scalars.csv', '2,0.2,0.2,1.0,-inf\n3,0.3,0.2,1.0,nan\n')
    proc = cli('sweep.py', 'camp.py', '--dry_run=True', cwd=camp)
    assert proc.returncode == 0, proc.stderr
    assert 'd seed 42 | skip | out/c/d/seed42 | done with the same config hash' in proc.stdout
    assert 'best_of: a (mean val/loss 0.1000)' in proc.stdout
    changed = {k for k in snapshot(camp) if snapshot(camp)[k] != before.get(k)}
    assert changed == {'out/c/b/seed42/scalars.csv'}  # only what the test itself appended


def test_a_locked_run_is_running_never_started_twice(camp, held_lock):
    a, new = camp / A, camp / 'out/c/e/seed42'
    held_lock(a)
    append(a / 'events.jsonl', '{"event": "ev')  # its writer is mid-line: not read while it holds the lock
    held_lock(new)  # a run whose job holds its lock but has written nothing yet
    (camp / 'camp.py').write_text(CAMPAIGN + "runs.append(dict(name='e', script='train_fake.py'))\n")
    before = snapshot(camp)
    plan = cli('sweep.py', 'camp.py', '--dry_run=True', cwd=camp)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines() == [
        f'a seed 42 | running | {A} | being written by {HOLDER}',
        f'b seed 42 | wait | out/c/b/seed42 | waits for a seed 42: being written by {HOLDER}',
        f'd seed 42 | wait | out/c/d/seed42 | best_of waits for a seed 42: being written by {HOLDER}',
        f'e seed 42 | running | out/c/e/seed42 | being written by {HOLDER}']
    sbatch = cli('sweep.py', 'camp.py', '--submit=slurm', '--dry_run=True', cwd=camp).stdout.splitlines()
    assert sbatch[0] == f'# a seed 42 | running | no job | being written by {HOLDER}'
    assert sbatch[1] == '# b seed 42 | blocked | no job | waits for a seed 42, which has no live job to start after ' \
                        '(see its line)'  # nothing to start after: a is no job of this campaign
    assert sbatch[3].startswith('# e seed 42 | running |')
    assert cli('sweep.py', 'camp.py', '--status=True', cwd=camp).stdout.splitlines()[:2] == [
        f'a seed 42 | running | no job | being written by {HOLDER}',
        f'b seed 42 | not started | no job | waits for a seed 42: being written by {HOLDER}']
    proc = cli('sweep.py', 'camp.py', cwd=camp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'  running: a seed 42 (being written by {HOLDER})' in proc.stdout
    assert f'  blocked: b seed 42 (waits for a seed 42: being written by {HOLDER})' in proc.stdout
    history = [json.loads(line) for line in (camp / 'out/c/sweep.jsonl').read_text().splitlines()][-4:]
    assert [(h['name'], h['action'], h['status']) for h in history] == [
        ('a', 'running', 'running'), ('b', 'wait', 'blocked'), ('d', 'wait', 'blocked'), ('e', 'running', 'running')]
    after = snapshot(camp)
    assert {k for k in after if after[k] != before.get(k)} == {'out/c/sweep.jsonl'}  # the campaign's own history
    assert before['out/c/sweep.jsonl'] == after['out/c/sweep.jsonl'][:len(before['out/c/sweep.jsonl'])]


def test_a_garbage_line_in_sweep_jsonl_stops_status_and_submission(camp):
    """--status and --submit=slurm read the campaign's history (its jobs): a line they cannot read is one error and
    nothing is submitted (a run here only appends to it, and goes on)."""
    append(camp / 'out/c/sweep.jsonl', '{"name": "a", "se\n')
    before = snapshot(camp)
    for args in (['--status=True'], ['--submit=slurm'], ['--submit=slurm', '--dry_run=True']):
        assert_refused(cli('sweep.py', 'camp.py', *args, cwd=camp), 'out/c/sweep.jsonl, line 4: not a JSON object',
                       'fix or delete the line')
    assert snapshot(camp) == before


def test_a_changed_config_reruns_and_the_old_run_is_moved_aside(camp):
    (camp / 'camp.py').write_text(CAMPAIGN.replace("dict(name='a', script='train_fake.py')",
                                                   "dict(name='a', script='train_fake.py', overrides=dict(lr=0.05))"))
    old = {k: v for k, v in snapshot(camp / A).items()}
    plan = cli('sweep.py', 'camp.py', '--dry_run=True', cwd=camp).stdout.splitlines()
    assert plan[0].startswith(f'a seed 42 | rerun | {A} | config hash ')
    assert plan[0].endswith(f': --overwrite=True moves the old run aside to {A}.replaced-<YYYYmmdd-HHMMSS>')
    assert cli('sweep.py', 'camp.py', cwd=camp).returncode == 0
    (aside,) = (camp / 'out/c/a').glob('seed42.replaced-*')
    kept = snapshot(aside)
    for name, data in old.items():  # every file of the old run, byte for byte (the sweep's own log goes on growing)
        if name == 'sweep_log.txt':
            assert data == (kept.get(name) or snapshot(camp / A)[name])[:len(data)]
        else:
            assert kept[name] == data, name
    assert json.loads((camp / A / 'config.json').read_text())['config']['lr'] == 0.05


def test_a_campaign_of_the_wrong_shape_is_one_message(tmp_path, monkeypatch):
    (tmp_path / 'train_fake.py').write_text(FAKE)
    (tmp_path / 'camp.py').write_text("runs = [dict(name='a', script='train_fake.py', after='b')]\n")
    (tmp_path / 'campaigns').mkdir()
    before = snapshot(tmp_path)
    assert_refused(cli('sweep.py', 'camp.py', cwd=tmp_path),
                   "campaign run 'a': after='b': expected a list of run names")
    assert_refused(cli('sweep.py', 'campaigns', cwd=tmp_path), 'config file is a directory: campaigns')
    assert snapshot(tmp_path) == before
    monkeypatch.chdir(tmp_path)
    ok = dict(name='ok', script='train_fake.py')
    for runs, seeds, message in (
            ([dict(ok, overrides=['lr', 0.1])], [1], "'ok': overrides=['lr', 0.1]: expected a dict"),
            ([ok, dict(name='x', script='train_fake.py', best_of=['ok'])], [1], "'x': best_of=['ok']: expected dict("),
            ([ok, dict(name='x', script='train_fake.py', best_of=dict(runs=['ok'], metric='val/loss', mode='best',
                                                                      keys=['lr']))], [1], "'x': best_of="),
            ([ok, dict(name='x', script='train_fake.py', best_of=dict(runs=['ok'], keys=['lr']))], [1],
             "'x': best_of="),
            ([ok, dict(name='x', script='train_fake.py', best_of=dict(runs=[], metric='val/loss', keys=['lr']))], [1],
             "'x': best_of="),
            ([ok], [], "seeds=[]: expected a list of distinct integers"),
            ([ok], ['1'], "seeds=['1']: expected a list of distinct integers"),
            ([ok], [1, 1], "seeds=[1, 1]: expected a list of distinct integers")):
        monkeypatch.setattr(sweep, 'runs', runs)
        monkeypatch.setattr(sweep, 'seeds', seeds)
        with pytest.raises(UserError) as e:
            sweep.check_campaign()
        assert message in str(e.value)
    assert snapshot(tmp_path) == before


# -----------------------------------------------------------------------------
# report.py
# -----------------------------------------------------------------------------
HEADER = 'epoch,time_s,lr,train/loss,val/macro_f1\n'


def make_run(folder, name, rows, seed=42, end=None, script='train_audio.py'):
    """A finished run directory (config.json, events.jsonl with an end event, scalars.csv with the rows given)."""
    path = folder / name
    path.mkdir(parents=True)
    config = dict(seed=seed, out_dir=str(path), lr=0.1)
    (path / 'config.json').write_text(json.dumps(dict(config=config, config_hash='h' * 64, argv=[script])))
    events = [dict(event='start', time_s=0.0), dict(dict(event='end', reason='done', time_s=3.0), **(end or {}))]
    (path / 'events.jsonl').write_text(''.join(json.dumps(dict(schema_version=1, **e)) + '\n' for e in events))
    (path / 'scalars.csv').write_text(rows if rows.startswith('epoch') or rows.startswith('iter') else HEADER + rows)
    return path


@pytest.fixture
def board(tmp_path):
    folder = tmp_path / 'out'
    make_run(folder, 'good', '1,1,0.1,1.0,0.5\n2,2,0.1,0.9,0.6\n')
    return folder


def leaderboard(folder):
    import csv
    with open(folder / 'leaderboard.csv', newline='') as f:
        return {r['run']: r for r in csv.DictReader(f)}


def test_non_finite_cells_are_skipped_and_never_win(board, capsys):
    # inf would be the best val/macro_f1 of all (mode max) and -inf, nan, '' no value: all are skipped
    make_run(board, 'diverged', '1,1,0.1,1.0,0.7\n2,2,0.1,inf,inf\n3,3,0.1,nan,-inf\n4,4,0.1,,nan\n5,5,0.1,1.0,\n')
    report.report(str(board))
    rows = leaderboard(board)
    assert (rows['diverged']['rank'], rows['diverged']['best_val'], rows['diverged']['steps']) == ('1', '0.7', '5')
    assert rows['good']['rank'] == '2'
    warning = capsys.readouterr().err
    assert 'diverged/scalars.csv: skipped non-finite values (inf, nan): train/loss 2, val/macro_f1 3' in warning
    import xml.etree.ElementTree as ET
    curves = ET.parse(board / 'figures' / 'train_audio_val.svg').getroot().findall('{http://www.w3.org/2000/svg}path')
    assert [len(p.get('d').split('L')) for p in curves] == [1, 2]  # diverged: its one finite point; good: two
    assert 'nan' not in (board / 'figures' / 'train_audio_train_loss.svg').read_text()


REPORT_FAULTS = {  # name: (files of a run 'bad' beside 'good', what the error names)
    'garbage cell': ({'scalars.csv': HEADER + '1,1,0.1,1.0,0.5\n2,2,0.1,1.0,abc\n'},
                     "bad/scalars.csv, line 3: column 'val/macro_f1' holds 'abc', not a number"),
    'empty step cell': ({'scalars.csv': HEADER + ',1,0.1,1.0,0.5\n'},
                        "bad/scalars.csv, line 2: column 'epoch' holds '', expected the epoch number"),
    'inf step cell': ({'scalars.csv': HEADER + 'inf,1,0.1,1.0,0.5\n'},
                      "bad/scalars.csv, line 2: column 'epoch' holds 'inf', expected the epoch number"),
    'scalars.csv not UTF-8': ({'scalars.csv': HEADER.encode() + b'1,1,0.1,1.0,\xff\n'},
                              'bad/scalars.csv: not readable as CSV'),
    'events line that is no object': ({'events.jsonl': '{"event": "start"}\n[1, 2]\n'},
                                      'bad/events.jsonl, line 2: not a JSON object'),
    'events.jsonl not UTF-8': ({'events.jsonl': b'{"event": "start"}\n\xff\n'},
                               'bad/events.jsonl, line 2: not a JSON object'),
    'config.json not UTF-8': ({'config.json': b'\xff\xfe{}'}, "bad/config.json: not a run's config.json"),
    'config.json a list': ({'config.json': '[]'}, "bad/config.json: not a run's config.json"),
}


@pytest.mark.parametrize('fault', REPORT_FAULTS)
def test_unreadable_facts_stop_the_report_and_nothing_is_written(board, fault):
    files, message = REPORT_FAULTS[fault]
    report.report(str(board))  # a leaderboard from before: it must stay as it was
    bad = make_run(board, 'bad', '1,1,0.1,1.0,0.5\n')
    for name, data in files.items():
        (bad / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    before = snapshot(board)
    with pytest.raises(UserError) as e:
        report.report(str(board))
    assert message in str(e.value) and 'nothing was written' in str(e.value)
    assert snapshot(board) == before


def test_a_run_without_its_metric_is_listed_unscored_with_a_warning(board, capsys):
    make_run(board, 'renamed', 'epoch,time_s,lr,train/loss,val/f1\n1,1,0.1,1.0,0.9\n')
    make_run(board, 'all_nan', '1,1,0.1,1.0,nan\n2,2,0.1,1.0,\n')
    make_run(board, 'no_rows', HEADER)
    rows, groups, _ = report.report(str(board))
    board_rows = leaderboard(board)
    assert board_rows['renamed']['status'] == 'done, unscored: no val/macro_f1 column in scalars.csv'
    assert board_rows['all_nan']['status'] == 'done, unscored: no finite val/macro_f1 value in scalars.csv'
    assert board_rows['no_rows']['status'] == 'done, unscored: no finite val/macro_f1 value in scalars.csv'
    assert [board_rows[n]['rank'] for n in ('renamed', 'all_nan', 'no_rows', 'good')] == ['', '', '', '1']
    assert len(groups) == 1  # only 'good' is scored
    err = capsys.readouterr().err
    assert 'renamed: no val/macro_f1 column in scalars.csv (columns: epoch, time_s, lr, train/loss, val/f1); ' \
           'listed unscored' in err
    assert err.count('listed unscored') == 3


def test_odd_end_event_and_time_values_are_left_empty(board, capsys):
    make_run(board, 'nan_test', '1,1,0.1,1.0,0.4\n', end={'test/macro_f1': float('nan'), 'time_s': 'soon'})
    make_run(board, 'str_test', '1,1,0.1,1.0,0.3\n', end={'test/macro_f1': 'n/a'})
    (board / 'str_test' / 'model.txt').write_bytes(b'\xff\xfe binary\nparameters: 1,234\n')
    report.report(str(board))
    rows = leaderboard(board)
    assert (rows['nan_test']['test'], rows['nan_test']['rank'], rows['str_test']['test']) == ('', '2', '')
    assert rows['str_test']['params'] == '1234' and rows['nan_test']['wall_time_s'] == '0'
    err = capsys.readouterr().err
    assert "the end event's test/macro_f1 is nan, not a finite number; left empty" in err
    assert "the end event's test/macro_f1 is 'n/a'" in err


def test_replaced_and_running_runs_are_listed_never_ranked(board, held_lock):
    make_run(board, 'seed1.replaced-20261201-120000', '1,1,0.1,1.0,0.99\n')  # the best score, but superseded
    running = make_run(board, 'live', '1,1,0.1,1.0,0.98\n')
    held_lock(running)
    report.report(str(board))
    rows = leaderboard(board)
    assert rows['seed1.replaced-20261201-120000']['status'] == 'replaced (moved aside by --overwrite=True)'
    assert rows['live']['status'] == f'incomplete: running (being written by {HOLDER})'
    assert [r['run'] for r in rows.values() if r['rank']] == ['good']


def test_report_cli_names_what_it_expects(tmp_path, board):
    (tmp_path / 'notes.txt').write_text('x')
    before = snapshot(tmp_path)
    assert_refused(cli('report.py', 'out/nonexistent', cwd=tmp_path), 'out/nonexistent: no such folder',
                   'report.py reads a folder of run directories')
    assert_refused(cli('report.py', 'notes.txt', cwd=tmp_path), 'notes.txt: a file, not a folder')
    assert_refused(cli('report.py', 'out', 'missing.py', cwd=tmp_path), 'config file not found: missing.py')
    assert_refused(cli('report.py', 'out', '--top=0', cwd=tmp_path), 'top=0: expected a value in [1, inf)')
    assert_refused(cli('report.py', 'out', '--sellect=a', cwd=tmp_path), "unknown config key 'sellect'")
    (board / 'good' / 'scalars.csv').write_text(HEADER + '1,1,0.1,1.0,oops\n')
    before = snapshot(tmp_path)
    assert_refused(cli('report.py', 'out', cwd=tmp_path), "good/scalars.csv, line 2: column 'val/macro_f1'")
    assert snapshot(tmp_path) == before
    helped = cli('report.py', '--help', cwd=tmp_path)
    assert helped.returncode == 0 and helped.stdout.splitlines()[0] == \
        'usage: python report.py FOLDER [FOLDER ...] [config.py ...] [--select=text] [--top=N]'
    assert '--select=' in helped.stdout and '--top=10' in helped.stdout and 'config.py ...] [--key' not in helped.stdout


# -----------------------------------------------------------------------------
# sample.py
# -----------------------------------------------------------------------------
ARGS = dict(vocab_size=99, block_size=32, n_layer=1, n_head=2, n_embd=32, d_ff=64, dropout=0.0)


@pytest.fixture(scope='module')
def slm(tmp_path_factory):
    """A train_slm.py-shaped checkpoint of a small random model (weights scaled up: logits far apart, no near ties)."""
    torch.manual_seed(0)
    model = CharTransformer(TransformerConfig(**ARGS))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(25)
    path = tmp_path_factory.mktemp('slm') / 'last.pt'
    torch.save(dict(schema_version=1, script='train_slm.py', model_state_dict=model.state_dict(), model_args=ARGS,
                    tokenizer=CharTokenizer().to_dict(), args=dict(n_layer=1)), path)
    return model.eval(), path


def samples(proc):
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split('---------------\n')[:-1]


def test_temperature_zero_is_greedy_argmax(slm, tmp_path):
    model, path = slm
    runs = [samples(cli('sample.py', f'--ckpt={path}', '--start=def ', '--temperature=0', '--max_new_tokens=20',
                        '--num_samples=2', f'--seed={s}', '--device=cpu', cwd=tmp_path)) for s in (1, 2)]
    tokenizer, ids = CharTokenizer(), torch.tensor([CharTokenizer().encode('def ')])
    with torch.no_grad():  # the reference: the argmax of the model's logits over the whole prefix, token by token
        for _ in range(20):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    expected = tokenizer.decode(ids[0].tolist()) + '\n'
    assert runs[0] == runs[1] == [expected, expected]


def foreign_checkpoint(path, script):
    """A checkpoint of another train script: its config keys, weights and model_args, no tokenizer."""
    args = configure(dict(sweep.script_defaults(script)), [])
    fields = dict(schema_version=1, model_state_dict={'w': torch.zeros(2)}, model_args={'n': 1}, args=args)
    torch.save(dict(fields, script=script) if script == 'train_audio.py' else fields, path)  # vae: from before


SAMPLE_FAULTS = {  # name: (arguments, files to make first, what the error says)
    'num_samples=0': (['--num_samples=0', '--ckpt=none.pt'], {}, 'num_samples=0: expected a value in [1, inf)'),
    'num_samples=-1': (['--num_samples=-1', '--ckpt=none.pt'], {}, 'num_samples=-1: expected a value in [1, inf)'),
    'temperature=-0.5': (['--temperature=-0.5', '--ckpt=none.pt'], {}, 'temperature=-0.5: expected a value in [0,'),
    'top_k=-1': (['--top_k=-1', '--ckpt=none.pt'], {}, 'top_k=-1: expected a value in [0, inf)'),
    'seed=2**64': ([f'--seed={2 ** 64}', '--ckpt=none.pt'], {}, 'expected a value in [0, 1e19]'),
    'max_new_tokens=-1': (['--max_new_tokens=-1', '--ckpt=none.pt'], {}, 'max_new_tokens=-1: expected a value'),
    # the prompt is refused before the checkpoint is looked at (none.pt does not exist)
    'empty prompt': (['--start=', '--ckpt=none.pt'], {}, 'the prompt is empty'),
    'empty prompt file': (['--start=FILE:p.txt', '--ckpt=none.pt'], {'p.txt': b''}, 'the prompt is empty'),
    'prompt file missing': (['--start=FILE:gone.txt', '--ckpt=none.pt'], {}, "prompt file 'gone.txt': not found"),
    'prompt file a folder': (['--start=FILE:d', '--ckpt=none.pt'], {'d/x': b''}, "prompt file 'd': a folder"),
    'prompt file not UTF-8': (['--start=FILE:p.txt', '--ckpt=none.pt'], {'p.txt': b'def \xff\n'},
                              'prompt file p.txt: not UTF-8 text (byte 4: invalid start byte)'),
    'out_dir missing': (['--out_dir=out/nope'], {}, "out_dir='out/nope': no such folder"),
    'out_dir without checkpoints': (['--out_dir=out/r'], {'out/r/log.txt': b'x'},
                                    "out_dir='out/r' holds no best.pt or last.pt"),
    'ckpt a folder': (['--ckpt=out/r'], {'out/r/log.txt': b'x'}, "ckpt='out/r' is a folder"),
    'ckpt not a checkpoint': (['--ckpt=x.pt'], {'x.pt': b'not a zip'}, 'x.pt is not a readable checkpoint'),
}


@pytest.mark.parametrize('fault', SAMPLE_FAULTS)
def test_sample_refuses_bad_input_with_one_line(tmp_path, fault):
    args, files, message = SAMPLE_FAULTS[fault]
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    before = snapshot(tmp_path)
    assert_refused(cli('sample.py', *args, '--device=cpu', cwd=tmp_path), message)
    assert snapshot(tmp_path) == before


def test_sample_names_the_script_of_a_foreign_checkpoint(slm, tmp_path):
    foreign_checkpoint(tmp_path / 'audio.pt', 'train_audio.py')
    foreign_checkpoint(tmp_path / 'vae.pt', 'train_vae.py')  # no 'script' in it: judged by its config keys
    bad_args = torch.load(slm[1], weights_only=True)
    torch.save(dict(bad_args, model_args=dict(ARGS, n_layers=2)), tmp_path / 'odd.pt')
    before = snapshot(tmp_path)
    assert_refused(cli('sample.py', '--ckpt=audio.pt', cwd=tmp_path),
                   'audio.pt was written by train_audio.py, not train_slm.py')
    assert_refused(cli('sample.py', '--ckpt=vae.pt', cwd=tmp_path),
                   'vae.pt was written by train_vae.py (judged by its config keys), not train_slm.py')
    assert_refused(cli('sample.py', '--ckpt=odd.pt', cwd=tmp_path),
                   "odd.pt: a train_slm.py checkpoint this model.py cannot rebuild (TypeError")
    assert snapshot(tmp_path) == before


def test_zero_new_tokens_prints_the_prompt(slm, tmp_path):
    out = samples(cli('sample.py', f'--ckpt={slm[1]}', '--start=def f', '--max_new_tokens=0', '--num_samples=2',
                      '--device=cpu', cwd=tmp_path))
    assert out == ['def f\n', 'def f\n']
