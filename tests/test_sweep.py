"""sweep.py: skip / run / resume / rerun decisions on constructed run directories, the dry-run plan, a campaign
checked before its first run, a failing or gated run recorded while the campaign goes on, and a tiny real
campaign of train_slm.py runs through sweep.py and report.py."""
import csv
import json
import os
import shlex
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
if fail == 3:  # as train_kd.py's gate: one gate event is all it writes
    import json, os
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'events.jsonl'), 'a') as f:
        f.write(json.dumps(dict(schema_version=1, event='gate', passed=False, gap=-0.1)) + '\\n')
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
                         (dict(name='z', script='train_fake.py', after=['later']), "'z': it depends on 'later'"),
                         (dict(name='s', script='train_fake.py', sbatch=30), "'s': sbatch=30: expected a string")):
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
    # the next plan: the finished run is skipped, the failed and gated ones are tried again (the gated run's folder
    # holds only its gate event)
    assert sorted(p.name for p in (tmp_path / 'out/c/gated/seed42').iterdir()) == ['events.jsonl', 'sweep_log.txt']
    by_name = {r['name']: r for r in sweep.runs}
    assert [sweep.decide(r, 42, by_name)['action'] for r in sweep.runs] == ['run', 'run', 'skip']
    # stop_on_error stops at the first failure
    monkeypatch.setattr(sweep, 'stop_on_error', True)
    monkeypatch.setattr(sweep, 'out_root', 'out/d')
    assert [r['status'] for _, r in sweep.run_campaign()] == ['failed']
    assert not (tmp_path / 'out/d/gated').exists()


def test_dry_run_prints_the_plan_and_the_sbatch_commands_and_runs_nothing(fake_campaign, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setattr(sweep, 'seeds', [1, 2])
    monkeypatch.setattr(sweep, 'runs', [dict(name='a', script='train_fake.py'),
                                        dict(name='b', script='train_fake.py', after=['a'], sbatch='--time=30')])
    sweep.print_plan()
    assert capsys.readouterr().out.splitlines() == [
        'a seed 1 | run | out/c/a/seed1 | no run yet', 'a seed 2 | run | out/c/a/seed2 | no run yet',
        'b seed 1 | wait | out/c/b/seed1 | waits for a seed 1 to finish',
        'b seed 2 | wait | out/c/b/seed2 | waits for a seed 2 to finish']
    for key, value in dict(submit='slurm', dry_run=True, sbatch_args='--time=1:00:00 --mem=1G').items():
        monkeypatch.setattr(sweep, key, value)
    assert sweep.submit_campaign(['camp.py', '--seeds=[1, 2]', '--submit=slurm', '--dry_run=True']) == 4
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    body = [sys.executable, str(ROOT / 'sweep.py'), 'camp.py', '--seeds=[1, 2]', '--submit=local']
    job = ['sbatch', '--parsable', '--job-name=a-s1', f'--chdir={tmp_path}', '--output=out/c/a/seed1/slurm-%j.out',
           '--open-mode=append', '--requeue', '--signal=B:USR1@120', '--time=1:00:00', '--mem=1G']
    assert commands[0] == [*job, '--wrap', 'exec ' + shlex.join([*body, '--only=a:1'])]
    # b waits for a of the same seed: afterok on the job a would get; the run's own options after the campaign's
    assert commands[2] == [*job[:2], '--job-name=b-s1', job[3], '--output=out/c/b/seed1/slurm-%j.out', *job[5:],
                           '--time=30', '--dependency=afterok:<job of a:1>', '--wrap',
                           'exec ' + shlex.join([*body, '--only=b:1'])]
    assert '--dependency=afterok:<job of a:2>' in commands[3]
    assert not (tmp_path / 'out').exists()


def fake_slurm(states):
    """A stand-in for sweep.slurm: squeue and scontrol answer from states {job id: (state, reason, exit code)}, sbatch
    hands out ids from 100 on (the calls are kept in .calls)."""
    calls = []

    def slurm(*cmd):
        calls.append(cmd)
        if cmd[0] == 'squeue':
            listed = [j for j in cmd[3].split(',') if j in states and states[j][0] in sweep.LIVE]
            return 0, ''.join(f"{j} {states[j][0]} {states[j][1]}\n" for j in listed), ''
        if cmd[0] == 'scontrol':
            if cmd[3] not in states:
                return 1, '', 'slurm_load_jobs error: Invalid job id specified'
            state, reason, code = states[cmd[3]]
            return 0, f"JobId={cmd[3]} JobName=x\n   JobState={state} Reason={reason} Dependency=(null)\n" \
                      f"   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode={code}\n", ''
        if cmd[0] == 'sbatch':
            job = str(100 + sum(c[0] == 'sbatch' for c in calls) - 1)
            states[job] = ('PENDING', 'Dependency' if any(a.startswith('--dependency') for a in cmd) else 'None', '0:0')
            return 0, f"{job}\n", ''
        return 0, '', ''  # scancel
    slurm.calls = calls
    return slurm


def test_submissions_follow_the_facts_and_the_jobs(fake_campaign, tmp_path, monkeypatch, capsys):
    """Which runs get a job, after which jobs: done runs drop out of dependencies, live jobs are waited for, a run
    whose job failed is left (and so are its dependants) until resubmit_failed, when a job stuck behind it is
    cancelled and submitted anew; a second submission submits nothing."""
    monkeypatch.setattr(sweep, 'seeds', [1, 2])
    a = dict(name='a', script='train_fake.py')
    runs = [a, dict(name='b', script='train_fake.py', after=['a']),
            dict(name='d', script='train_fake.py', best_of=dict(runs=['a'], metric='val/loss', keys=['lr']))]
    monkeypatch.setattr(sweep, 'runs', runs)
    monkeypatch.setattr(sweep, 'submit', 'slurm')
    write_run(sweep.out_dir_of(a, 2), sweep.predict_config(a, 2, {}), [('start', {}), ('end', {'reason': 'done'})])
    sweep.record(dict(name='a', seed=1, job='11', dependencies=[], sbatch='sbatch ...'))
    sweep.record(dict(name='b', seed=2, job='13', dependencies=[], sbatch='sbatch ...'))
    sweep.record(dict(name='b', seed=2, out_dir='out/c/b/seed2', action='run', status='failed'))
    sweep.record(dict(name='d', seed=2, job='14', dependencies=['11', '13'], sbatch='sbatch ...'))
    states = {'11': ('RUNNING', 'None', '0:0'), '13': ('FAILED', 'NonZeroExitCode', '1:0'),
              '14': ('PENDING', sweep.NEVER_STARTS, '0:0')}
    monkeypatch.setattr(sweep, 'slurm', fake_slurm(states))
    monkeypatch.setattr(sweep, 'dry_run', True)
    assert sweep.submit_campaign(['camp.py']) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '# a seed 1 | running | job 11 | job RUNNING (None)'
    assert lines[1].startswith('# a seed 2 | done | no job | done with the same config hash')
    assert lines[2].startswith('sbatch ') and '--dependency=afterok:11 ' in lines[2]  # a seed 2 is done: dropped
    assert lines[3] == ('# b seed 2 | failed | job 13 | job FAILED (exit 1:0); see out/c/b/seed2/sweep_log.txt; '
                        '--resubmit_failed=True submits it again')
    assert '--dependency=afterok:11 ' in lines[4] and '--only=d:1' in lines[4]  # best_of: every seed of a
    assert lines[5].startswith(f'# d seed 2 | blocked | job 14 | job PENDING ({sweep.NEVER_STARTS})')
    assert [c[0] for c in sweep.slurm.calls] == ['squeue', 'scontrol']  # 13 ended: squeue no longer lists it
    monkeypatch.setattr(sweep, 'resubmit_failed', True)
    monkeypatch.setattr(sweep, 'dry_run', False)
    assert sweep.submit_campaign(['camp.py']) == 4
    submitted = [c for c in sweep.slurm.calls if c[0] in ('sbatch', 'scancel')]
    assert [c[0] for c in submitted] == ['sbatch', 'sbatch', 'sbatch', 'scancel', 'sbatch']
    assert submitted[3] == ('scancel', '14') and '--dependency=afterok:11' in submitted[4]
    assert not any(a.startswith('--dependency') for a in submitted[1])  # b seed 2: a seed 2 is done
    jobs = [h for h in history(tmp_path) if 'job' in h][-4:]
    assert [(h['name'], h['seed'], h['job'], h['dependencies']) for h in jobs] == [
        ('b', 1, '100', ['11']), ('b', 2, '101', []), ('d', 1, '102', ['11']), ('d', 2, '103', ['11'])]
    assert jobs[0]['sbatch'].startswith('sbatch --parsable --job-name=b-s1 ') and 'time' in jobs[0]
    assert (tmp_path / 'out/c/b/seed1').is_dir()  # where its slurm-<id>.out goes
    capsys.readouterr()
    assert sweep.submit_campaign(['camp.py']) == 0  # every job is live now
    assert [line.split(' | ')[1] for line in capsys.readouterr().out.splitlines()] == \
        ['running', 'done', 'queued', 'queued', 'queued', 'queued']


def test_status_words_from_facts_jobs_and_attempts():
    plan = dict(action='run', reason='no run yet', out_dir='out/c/a/seed1')

    def job(state, reason='None', exit_code=None):
        return dict(id='7', state=state, reason=reason, exit_code=exit_code)
    assert sweep.standing(dict(plan, action='skip', reason='done with ...'), job('RUNNING'), None) == \
        ('done', 'done with ...')  # the facts first: a run that is done is done
    assert sweep.standing(dict(plan, action='running', reason='being written by pid 1'), None, None)[0] == 'running'
    assert sweep.standing(plan, job('PENDING', 'Priority'), None) == ('queued', 'job PENDING (Priority)')
    assert sweep.standing(dict(plan, action='wait', reason='waits for b seed 1 to finish'),
                          job('PENDING', 'Dependency'), None) == \
        ('queued', 'job PENDING (Dependency): waits for b seed 1 to finish')
    assert sweep.standing(plan, job('REQUEUED'), 'interrupted')[0] == 'queued'  # requeued after SIGUSR1
    assert sweep.standing(plan, job('RUNNING'), None)[0] == 'running'  # started, no lock yet
    assert sweep.standing(plan, job('PENDING', sweep.NEVER_STARTS), None)[0] == 'blocked'
    assert sweep.standing(plan, job('FAILED', 'NonZeroExitCode', '2:0'), 'failed') == \
        ('failed', 'job FAILED (exit 2:0); see out/c/a/seed1/sweep_log.txt')
    assert sweep.standing(plan, job('FAILED', 'NonZeroExitCode', '3:0'), None)[0] == 'gated'
    assert sweep.standing(plan, job('CANCELLED', 'None', '0:15'), 'interrupted')[0] == 'stopped'
    assert sweep.standing(plan, job('UNKNOWN', ''), None)[0] == 'failed'  # gone from the scheduler, run not done
    # a job that exited 0 finished its run: a run that is not done now (its config changed) is simply not started
    assert sweep.standing(dict(plan, action='rerun', reason='config hash differs'), job('COMPLETED'), 'done') == \
        ('not started', 'config hash differs')
    # local mode: no job, how the last attempt ended
    assert sweep.standing(plan, None, 'gated') == ('gated', 'its last attempt gated; see out/c/a/seed1/sweep_log.txt')
    assert sweep.standing(plan, None, None) == ('not started', 'no run yet')


def test_status_and_the_job_body_in_local_mode(fake_campaign, tmp_path, monkeypatch):
    """--status from facts and sweep.jsonl alone; --only runs just one run and seed, and its exit code is what
    afterok reads: 0 only when the run is done."""
    (tmp_path / 'camp.py').write_text("out_root = 'out/c'\nseeds = [1]\n"
                                      "runs = [dict(name='a', script='train_fake.py'),\n"
                                      "        dict(name='bad', script='train_fake.py', overrides=dict(fail=1)),\n"
                                      "        dict(name='gated', script='train_fake.py', overrides=dict(fail=3)),\n"
                                      "        dict(name='b', script='train_fake.py', after=['a'])]\n")
    assert sweep_cli(tmp_path, '--only=a:1').returncode == 0
    assert sweep_cli(tmp_path, '--only=bad:1').returncode == 1
    assert sweep_cli(tmp_path, '--only=gated:1').returncode == 3
    assert not (tmp_path / 'out/c/b').exists()
    proc = sweep_cli(tmp_path, '--status=True')
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith('a seed 1 | done | no job | done with the same config hash')
    assert lines[1:] == ['bad seed 1 | failed | no job | its last attempt failed; see out/c/bad/seed1/sweep_log.txt',
                         'gated seed 1 | gated | no job | its last attempt gated; see out/c/gated/seed1/sweep_log.txt',
                         'b seed 1 | not started | no job | no run yet']
    monkeypatch.setattr(sweep, 'runs', [dict(name='b', script='train_fake.py')])
    for keys, message in ((dict(only='b:2'), "only='b:2': no such run and seed"),
                          (dict(only='b:42', submit='slurm'), "submit='slurm' submits the campaign")):
        for key, value in keys.items():
            monkeypatch.setattr(sweep, key, value)
        with pytest.raises(UserError, match=message):
            sweep.check_campaign()


def sweep_in_its_first_run(tmp_path, corpus):
    """A two-run SLM campaign started in its own session (as a terminal or a batch shell starts it), returned once
    its first run has taken 5 steps."""
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
    return proc


def test_sigterm_to_the_sweep_alone_reaches_its_run(tmp_path, corpus):
    """What scancel and SLURM's warning do to a job's batch shell: the signal goes to the sweep only; the sweep passes
    it on, the run saves last.pt and stops, the sweep records it 'interrupted' and stops; the next sweep resumes."""
    import signal
    proc = sweep_in_its_first_run(tmp_path, corpus)
    proc.send_signal(signal.SIGTERM)  # the sweep's pid only, not its process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and 'Traceback' not in stderr, stderr
    assert [(h['name'], h['status'], h['returncode']) for h in history(tmp_path)] == [('a', 'interrupted', 0)]
    assert 'stopping (signal)' in stdout and not (tmp_path / 'out/c/b').exists()
    assert (tmp_path / 'out/c/a/seed42/last.pt').exists()
    assert 'a seed 42 | resume |' in sweep_cli(tmp_path, '--dry_run=True').stdout


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
    proc = sweep_in_its_first_run(tmp_path, corpus)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr
    assert [(h['name'], h['status'], h['returncode']) for h in history(tmp_path)] == [('a', 'interrupted', 130)]
    assert 'stopping (interrupted)' in stdout and not (tmp_path / 'out/c/b').exists()
    plan = sweep_cli(tmp_path, '--dry_run=True').stdout
    assert 'a seed 42 | resume |' in plan and 'b seed 42 | run |' in plan
