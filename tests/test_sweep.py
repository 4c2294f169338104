"""sweep.py: skip / run / resume / rerun decisions on constructed run directories, the dry-run plan, a campaign
checked before its first run, a failing or gated run recorded while the campaign goes on, and a tiny real
campaign of train_slm.py runs through sweep.py and report.py."""
import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPT_ENV, TINY_SLM

import sweep
from common import UserError, config_hash

# a stand-in train script (same configure / RunDir plumbing as the real ones) that exits with --fail's code
FAKE = """
import sys
from common import RunDir, configure
out_dir = 'out/fake'  # run directory
init_from = 'scratch'  # scratch | resume | auto
overwrite = False  # allow scratch over checkpoints
seed = 0  # seed
fail = 0  # exit with this code before training (3 = refused by a gate)
lr = 0.1  # a knob
config = configure(globals())
if fail:
    print(f"fake: exiting {fail}")
    sys.exit(fail)
run = RunDir(out_dir, config)
run.event('start', epoch=0)
run.scalars({'epoch': 1, 'time_s': 0.1, 'lr': lr, 'train/loss': 1.0, 'val/loss': lr})
run.event('end', reason='done', epochs=1)
"""
ENV = dict(SCRIPT_ENV, PYTHONPATH=str(ROOT))


def campaign(tmp_path, text):
    (tmp_path / 'train_fake.py').write_text(FAKE)
    (tmp_path / 'camp.py').write_text(text)
    return sweep_cli(tmp_path)


def sweep_cli(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / 'sweep.py'), 'camp.py', *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)


def history(tmp_path, root='out/c'):
    return [json.loads(line) for line in (tmp_path / root / 'sweep.jsonl').read_text().splitlines()]


@pytest.fixture
def slm_campaign(tmp_path, monkeypatch):
    """sweep's module state set to a one-run train_slm.py campaign rooted in tmp_path."""
    monkeypatch.setattr(sweep, 'out_root', str(tmp_path / 'out'))
    monkeypatch.setattr(sweep, 'seeds', [1])
    run = dict(name='a', script='train_slm.py', overrides=dict(n_layer=1, max_iters=4))
    monkeypatch.setattr(sweep, 'runs', [run])
    return run


def write_run(out_dir, config, events, last=True):
    """A run directory as a train script leaves it: config.json with its hash, events.jsonl, maybe last.pt."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(dict(config=config, config_hash=config_hash(config)), f)
    with open(os.path.join(out_dir, 'events.jsonl'), 'w') as f:
        f.writelines(json.dumps(dict(schema_version=1, event=e, **extra)) + '\n' for e, extra in events)
    for name in ('last.pt', 'best.pt'):
        path = os.path.join(out_dir, name)
        if last:
            open(path, 'wb').close()
        elif os.path.exists(path):
            os.remove(path)


def test_decisions_come_from_config_hash_and_end_event(slm_campaign):
    by_name = {'a': slm_campaign}
    out_dir = sweep.out_dir_of(slm_campaign, 1)
    predicted = sweep.predict_config(slm_campaign, 1, slm_campaign['overrides'])
    assert predicted['n_layer'] == 1 and predicted['seed'] == 1 and predicted['out_dir'] == out_dir

    def action():
        return sweep.decide(slm_campaign, 1, by_name)['action']
    assert action() == 'run'
    write_run(out_dir, predicted, [('start', {}), ('end', {'reason': 'done'})])
    assert action() == 'skip'
    # every file there, checkpoints too, but no end event: not done, resumed (never judged by files alone)
    write_run(out_dir, predicted, [('start', {}), ('eval', {})])
    assert action() == 'resume'
    write_run(out_dir, predicted, [('start', {}), ('end', {'reason': 'signal'})])
    assert action() == 'resume'
    # finished, then resumed again and killed: the last lifecycle event is a start
    write_run(out_dir, predicted, [('start', {}), ('end', {'reason': 'done'}), ('start', {})])
    assert action() == 'resume'
    write_run(out_dir, predicted, [('start', {})], last=False)
    assert action() == 'rerun'  # same hash but nothing to resume from
    write_run(out_dir, dict(predicted, n_layer=2), [('start', {}), ('end', {'reason': 'done'})])
    plan = sweep.decide(slm_campaign, 1, by_name)
    assert plan['action'] == 'rerun' and 'differs' in plan['reason']
    assert sweep.command(plan)[-2:] == ['--init_from=scratch', '--overwrite=True']
    # init_from / out_dir / overwrite are not part of the hash: a different init_from still skips
    write_run(out_dir, dict(predicted, init_from='auto'), [('start', {}), ('end', {'reason': 'done'})])
    assert action() == 'skip'


def test_after_waits_and_best_of_picks_on_validation(slm_campaign, monkeypatch, tmp_path):
    b = dict(name='b', script='train_slm.py', overrides=dict(n_layer=1), after=['a'])
    c = dict(name='c', script='train_slm.py', overrides=dict(n_layer=1, learning_rate=1e-3))
    d = dict(name='d', script='train_slm.py', overrides=dict(n_layer=1),
             best_of=dict(runs=['a', 'c'], metric='val/loss', mode='min', keys=['learning_rate']))
    monkeypatch.setattr(sweep, 'runs', [slm_campaign, b, c, d])
    by_name = {r['name']: r for r in sweep.runs}
    assert sweep.decide(b, 1, by_name)['action'] == 'wait'
    assert sweep.decide(d, 1, by_name)['action'] == 'wait'
    # a: lower val loss but higher test loss; c: the reverse. best_of must pick a (validation), lr 3e-4
    for run, val, test in ((slm_campaign, 1.5, 9.0), (c, 2.0, 0.1)):
        out_dir = sweep.out_dir_of(run, 1)
        write_run(out_dir, sweep.predict_config(run, 1, run['overrides']),
                  [('start', {}), ('end', {'reason': 'done', 'test/loss': test})])
        with open(os.path.join(out_dir, 'scalars.csv'), 'w') as f:
            f.write(f"iter,time_s,lr,train/loss,val/loss\n0,0.1,0.1,3.0,{val + 1}\n2,0.2,0.1,2.0,{val}\n")
    assert sweep.decide(b, 1, by_name)['action'] == 'run'
    plan = sweep.decide(d, 1, by_name)
    assert plan['action'] == 'run' and 'best_of: a' in plan['reason']
    assert '--learning_rate=0.0003' in plan['args']


def test_campaign_is_checked_before_the_first_run(tmp_path, monkeypatch):
    proc = campaign(tmp_path, "out_root = 'out/c'\nruns = [dict(name='ok', script='train_fake.py'),\n"
                              "        dict(name='typo', script='train_fake.py', overrides=dict(lrr=0.5))]\n")
    assert proc.returncode == 2
    assert "campaign run 'typo' (train_fake.py)" in proc.stderr and "'lrr'" in proc.stderr and "'lr'" in proc.stderr
    assert not (tmp_path / 'out').exists()  # not even the first, valid run started
    monkeypatch.chdir(tmp_path)
    for bad, message in ((dict(name='gone', script='train_nope.py'), "'gone': script train_nope.py not found"),
                         (dict(name='x', script='train_fake.py', overrides=dict(lr='fast')),
                          r"'x' \(train_fake.py\): command line: lr=.fast. is a str, expected float"),
                         (dict(name='y', script='train_fake.py', overrides=dict(seed=3)), r"'y': overrides set \['seed'\]"),
                         (dict(name='z', script='train_fake.py', after=['later']), "'z': it depends on 'later'")):
        monkeypatch.setattr(sweep, 'runs', [dict(name='ok', script='train_fake.py'), bad])
        with pytest.raises(UserError, match=f"campaign run {message}"):
            sweep.check_campaign()


@pytest.fixture
def fake_campaign(tmp_path, monkeypatch):
    (tmp_path / 'train_fake.py').write_text(FAKE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('PYTHONPATH', str(ROOT))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setattr(sweep, 'out_root', 'out/c')
    monkeypatch.setattr(sweep, 'seeds', [42])


def test_failed_run_is_recorded_and_the_campaign_goes_on(fake_campaign, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, 'runs', [dict(name='bad', script='train_fake.py', overrides=dict(fail=1)),
                                        dict(name='gated', script='train_fake.py', overrides=dict(fail=3)),
                                        dict(name='good', script='train_fake.py')])
    sweep.check_campaign()
    summary = sweep.run_campaign()
    assert [(p['name'], r['status'], r['returncode']) for p, r in summary] == \
        [('bad', 'failed', 1), ('gated', 'gated', 3), ('good', 'done', 0)]
    assert [(h['name'], h['status']) for h in history(tmp_path)] == [('bad', 'failed'), ('gated', 'gated'),
                                                                     ('good', 'done')]
    assert 'fake: exiting 1' in (tmp_path / 'out/c/bad/seed42/sweep_log.txt').read_text()
    # the next plan: the finished run is skipped, the failed and gated ones are tried again
    by_name = {r['name']: r for r in sweep.runs}
    assert [sweep.decide(r, 42, by_name)['action'] for r in sweep.runs] == ['run', 'run', 'skip']
    # stop_on_error stops at the first failure
    monkeypatch.setattr(sweep, 'stop_on_error', True)
    monkeypatch.setattr(sweep, 'out_root', 'out/d')
    assert [r['status'] for _, r in sweep.run_campaign()] == ['failed']
    assert not (tmp_path / 'out/d/gated').exists()


def test_dry_run_and_sbatch_print_the_plan_and_run_nothing(fake_campaign, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, 'seeds', [1, 2])
    monkeypatch.setattr(sweep, 'runs', [dict(name='a', script='train_fake.py'),
                                        dict(name='b', script='train_fake.py', after=['a'])])
    sweep.print_plan()
    assert capsys.readouterr().out.splitlines() == [
        'a seed 1 | run | out/c/a/seed1 | no run yet', 'a seed 2 | run | out/c/a/seed2 | no run yet',
        'b seed 1 | wait | out/c/b/seed1 | waits for a seed 1 to finish',
        'b seed 2 | wait | out/c/b/seed2 | waits for a seed 2 to finish']
    monkeypatch.setattr(sweep, 'sbatch', True)
    monkeypatch.setattr(sweep, 'sbatch_args', '--time=1:00:00')
    sweep.print_plan()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('sbatch --job-name=a-s1 --output=out/c/a/seed1/slurm-%j.out --time=1:00:00 --wrap ')
    assert '--seed=1 --out_dir=out/c/a/seed1 --init_from=auto' in lines[0]
    assert lines[2].startswith('# wait b seed 1')
    assert not (tmp_path / 'out').exists()


def test_tiny_slm_campaign_through_sweep_and_report(tmp_path, corpus):
    """For real: a tiny train_slm.py run through sweep.py; stopped before its end event it is resumed from
    last.pt; report.py reads what it wrote."""
    tiny = dict(a.removeprefix('--').split('=', 1) for a in TINY_SLM)
    overrides = ', '.join(f"{k}={v if v[0].isdigit() else repr(v)}" for k, v in tiny.items())
    (tmp_path / 'camp.py').write_text(
        f"out_root = 'out/c'\nruns = [dict(name='a', script='train_slm.py', overrides=dict({overrides}, "
        f"dataset={str(corpus)!r}, max_iters=4, eval_interval=2))]\n")
    proc = sweep_cli(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = tmp_path / 'out/c/a/seed42/events.jsonl'
    events.write_text(''.join(events.read_text().splitlines(keepends=True)[:-1]))  # as if killed before the end
    proc = sweep_cli(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(h['action'], h['status']) for h in history(tmp_path)] == [('run', 'done'), ('resume', 'done')]
    assert "run out/c/a/seed42 | from out/c/a/seed42/last.pt | config_hash" in \
        (tmp_path / 'out/c/a/seed42/log.txt').read_text()
    # under the resume rule (the saved config is the base, the sweep's keys change nothing) the hash stays the plan's,
    # and the next sweep skips the run as done
    planned = [h['config_hash'] for h in history(tmp_path)]
    facts = json.loads((tmp_path / 'out/c/a/seed42/config.json').read_text())
    assert planned[0] == planned[1] == facts['config_hash'] and facts['changed'] == {}
    assert sweep_cli(tmp_path).returncode == 0 and history(tmp_path)[-1]['action'] == 'skip'
    proc = subprocess.run([sys.executable, str(ROOT / 'report.py'), 'out/c'], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (row,) = list(csv.DictReader((tmp_path / 'out/c/leaderboard.csv').open()))
    facts = json.loads((tmp_path / 'out/c/a/seed42/config.json').read_text())
    assert (row['rank'], row['status'], row['script'], row['run'], row['seed']) == \
        ('1', 'done', 'train_slm.py', 'a/seed42', '42')
    assert row['config_hash'] == facts['config_hash'] and row['steps'] == '4' and row['step_unit'] == 'iter'
    assert int(row['params']) > 0 and row['val_metric'] == 'val/loss' and float(row['best_val']) > 0
    assert (tmp_path / 'out/c/figures/train_slm_val.svg').exists()


def test_unknown_best_of_key_is_a_clear_error(slm_campaign, monkeypatch):
    d = dict(name='d', script='train_slm.py', best_of=dict(runs=['a'], metric='val/loss', keys=['n_layr']))
    monkeypatch.setattr(sweep, 'runs', [slm_campaign, d])
    with pytest.raises(UserError, match=r"campaign run 'd' \(train_slm.py\): best_of keys \['n_layr'\]"):
        sweep.check_campaign()


def test_ctrl_c_stops_the_run_and_the_campaign_and_the_next_sweep_resumes(tmp_path, corpus):
    """Ctrl-C reaches the sweep and its run (one process group, as in a terminal): the run saves last.pt and exits
    130, the sweep waits for it, records it 'interrupted', starts nothing more and exits 130."""
    import signal
    import time
    tiny = dict(a.removeprefix('--').split('=', 1) for a in TINY_SLM)
    overrides = ', '.join(f"{k}={v if v[0].isdigit() else repr(v)}" for k, v in tiny.items())
    (tmp_path / 'camp.py').write_text(
        f"out_root = 'out/c'\nruns = [dict(name=n, script='train_slm.py', overrides=dict({overrides}, "
        f"dataset={str(corpus)!r}, max_iters=100000, eval_interval=100000)) for n in ('a', 'b')]\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / 'sweep.py'), 'camp.py'], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log, deadline = tmp_path / 'out/c/a/seed42/log.txt', time.time() + 120
    while not (log.exists() and 'iter 5/' in log.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr
    assert [(h['name'], h['status'], h['returncode']) for h in history(tmp_path)] == [('a', 'interrupted', 130)]
    assert 'stopping (interrupted)' in stdout and not (tmp_path / 'out/c/b').exists()
    plan = sweep_cli(tmp_path, '--dry_run=True').stdout
    assert 'a seed 42 | resume |' in plan and 'b seed 42 | run |' in plan
