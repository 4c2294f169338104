"""sweep.py --submit=slurm on a real SLURM (`python -m pytest -m slurm tests/test_slurm_sweep.py`): the quick audio
campaign as jobs ends with the leaderboard of the same campaign run here, submitting again submits nothing new, a
failed run holds back its dependants until it is resubmitted on request, --dry_run prints the exact commands and
submits nothing, --status says where each run stands, and SLURM's warning signal reaches the run through the sweep,
which requeues the job and resumes the run to the weights of an uninterrupted one."""
import csv
import json
import shlex
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, TINY_SLM
from test_sweep import FAKE

pytestmark = pytest.mark.slurm
# every job 1 CPU and 1 GB (without --mem a job takes the node's whole memory): two jobs at a time on 2 cores
JOB_ARGS = '--sbatch_args=--cpus-per-task=1 --mem=1G'
# test_kd's tiny sounds, 300 of them and 2 epochs so that the runs' scores differ: seconds per run
QUICK_TINY = dict(builtin_clips=300, clip_seconds=0.5, batch_size=8, max_epochs=2, cache_dir='cache')
# the leaderboard columns that must agree (config_hash differs: KD runs name their teacher under out_root)
SAME = ['rank', 'status', 'script', 'run', 'settings', 'seed', 'val_metric', 'best_val', 'test_metric', 'test',
        'steps', 'params']


@pytest.fixture
def env(slurm):
    return dict(slurm.env, **{k: SCRIPT_ENV[k] for k in ('PYTHONUNBUFFERED', 'OMP_NUM_THREADS')},
                PYTHONPATH=str(ROOT))


@pytest.fixture(autouse=True)
def cancel_leftovers(slurm, tmp_path):
    """A failed test leaves no job of its own behind to hold up the next."""
    yield
    for history in tmp_path.glob('out/*/sweep.jsonl'):
        slurm('scancel', *{str(job) for job in submitted(history.parent).values()}, check=False)


def sweep(cwd, env, *args):
    proc = subprocess.run([sys.executable, str(ROOT / 'sweep.py'), 'camp.py', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.splitlines()


def submitted(root):
    """{'name:seed': job id} of the latest submission of each run and seed in root/sweep.jsonl."""
    lines = [json.loads(line) for line in (root / 'sweep.jsonl').read_text().splitlines()]
    return {f"{h['name']}:{h['seed']}": h['job'] for h in lines if 'job' in h}


def wait_for(what, seconds=120):
    deadline = time.time() + seconds
    while not what() and time.time() < deadline:
        time.sleep(0.2)
    assert what()


def reason(slurm, job):
    return slurm('squeue', '-h', '-j', job, '-o', '%r', check=False)


def leaderboard(cwd, env, root):
    proc = subprocess.run([sys.executable, str(ROOT / 'report.py'), root], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [{k: row[k] for k in SAME} for row in csv.DictReader((cwd / root / 'leaderboard.csv').open())]


def test_quick_campaign_as_jobs_ends_with_the_local_leaderboard(slurm, env, tmp_path):
    """config/campaign_audio_quick.py (31 runs: phase 1, then KD after it with best_of), made tiny, run here with
    submit='local' and submitted with submit='slurm' (submitted again while its jobs are queued or running, and once
    they have ended, it submits nothing); both wall times are printed."""
    (tmp_path / 'camp.py').write_text(f"exec(open({str(ROOT / 'config/campaign_audio_quick.py')!r}).read())\n"
                                      f"for _run in runs:\n    _run['overrides'].update({QUICK_TINY!r})\n")
    t0 = time.time()
    sweep(tmp_path, env, '--out_root=out/local')
    local_s = time.time() - t0
    t0 = time.time()
    lines = sweep(tmp_path, env, '--out_root=out/slurm', '--submit=slurm', JOB_ARGS)
    jobs = submitted(tmp_path / 'out/slurm')
    assert len(jobs) == 31 and lines[-1] == 'sweep | submitted 31 job(s)'
    assert lines[0] == f"crnn seed 42 | submitted | job {jobs['crnn:42']} | starts when it can"
    phase_1 = [jobs[n] for n in ['crnn:42', 'tinycnn:42'] + [f'cbam_r{r}_k{k}:42' for r in (4, 8, 16)
                                                             for k in (3, 7, 11)]]
    assert lines[11] == f"kd_tinycnn_a0.0 seed 42 | submitted | job {jobs['kd_tinycnn_a0.0:42']} | after " + \
        ', '.join(phase_1)
    # submitted again while they are queued or running: nothing new
    again = sweep(tmp_path, env, '--out_root=out/slurm', '--submit=slurm', JOB_ARGS)
    assert again[-1] == 'sweep | submitted 0 job(s)' and 'queued' in {line.split(' | ')[1] for line in again}
    assert submitted(tmp_path / 'out/slurm') == jobs
    assert [slurm.wait(job) for job in jobs.values()] == ['COMPLETED'] * 31
    slurm_s = time.time() - t0
    again = sweep(tmp_path, env, '--out_root=out/slurm', '--submit=slurm', JOB_ARGS)
    assert again[-1] == 'sweep | submitted 0 job(s)' and [line.split(' | ')[1] for line in again[:-1]] == ['done'] * 31
    local, jobs_board = leaderboard(tmp_path, env, 'out/local'), leaderboard(tmp_path, env, 'out/slurm')
    assert len(local) == 31 and {row['status'] for row in local} == {'done'}
    assert jobs_board == local
    print(f"\nquick campaign (31 runs, tiny): local {local_s:.1f} s | SLURM, 2 jobs at a time {slurm_s:.1f} s")


def fake_campaign(folder, **fails):
    (folder / 'train_fake.py').write_text(FAKE)
    (folder / 'camp.py').write_text(
        f"out_root = 'out/c'\nruns = [dict(name='ok', script='train_fake.py'),\n"
        f"        dict(name='bad', script='train_fake.py', overrides=dict(fail={fails.get('bad', 0)})),\n"
        f"        dict(name='dep', script='train_fake.py', after=['bad']),\n"
        f"        dict(name='held', script='train_fake.py', sbatch='--hold')]\n")


def test_a_failed_run_holds_its_dependants_until_resubmitted_and_status_says_so(slurm, env, tmp_path):
    fake_campaign(tmp_path, bad=2)  # the fake script exits 2, as a script does on a bad value
    sweep(tmp_path, env, '--submit=slurm', JOB_ARGS)
    jobs = submitted(tmp_path / 'out/c')
    assert slurm.wait(jobs['ok:42']) == 'COMPLETED' and slurm.wait(jobs['bad:42']) == 'FAILED'
    wait_for(lambda: reason(slurm, jobs['dep:42']) == 'DependencyNeverSatisfied')  # afterok: dep never starts
    status = sweep(tmp_path, env, '--status=True')
    assert status[0].startswith(f"ok seed 42 | done | job {jobs['ok:42']} | done with the same config hash ")
    assert status[1:] == [
        f"bad seed 42 | failed | job {jobs['bad:42']} | job FAILED (exit 2:0); see out/c/bad/seed42/sweep_log.txt",
        f"dep seed 42 | blocked | job {jobs['dep:42']} | job PENDING (DependencyNeverSatisfied): a run it waits "
        f"for ended without finishing",
        f"held seed 42 | queued | job {jobs['held:42']} | job PENDING (JobHeldUser)"]
    # submitted again: the failed run is not, unless asked
    again = sweep(tmp_path, env, '--submit=slurm', JOB_ARGS)
    assert again[-1] == 'sweep | submitted 0 job(s)' and submitted(tmp_path / 'out/c') == jobs
    assert again[1].endswith('--resubmit_failed=True submits it again') and again[2].startswith('dep seed 42 | blocked')
    assert not (tmp_path / 'out/c/dep/seed42/events.jsonl').exists()  # it never ran
    # the campaign fixed and resubmitted on request: bad runs again, dep's stuck job is replaced by one after it
    fake_campaign(tmp_path)
    again = sweep(tmp_path, env, '--submit=slurm', '--resubmit_failed=True', JOB_ARGS)
    new = submitted(tmp_path / 'out/c')
    assert again[-1] == 'sweep | submitted 2 job(s)' and new['held:42'] == jobs['held:42']
    assert again[2] == f"dep seed 42 | submitted | job {new['dep:42']} | after {new['bad:42']}"
    assert slurm.wait(new['dep:42']) == 'COMPLETED' and slurm.state(jobs['dep:42']) == 'CANCELLED'
    status = sweep(tmp_path, env, '--status=True')
    assert [line.split(' | ')[:3] for line in status] == [
        ['ok seed 42', 'done', f"job {jobs['ok:42']}"], ['bad seed 42', 'done', f"job {new['bad:42']}"],
        ['dep seed 42', 'done', f"job {new['dep:42']}"], ['held seed 42', 'queued', f"job {jobs['held:42']}"]]


def test_dry_run_prints_the_commands_a_submission_runs_and_submits_nothing(slurm, env, tmp_path):
    (tmp_path / 'train_fake.py').write_text(FAKE)
    (tmp_path / 'camp.py').write_text("out_root = 'out/c'\nruns = [dict(name='first', script='train_fake.py'),\n"
                                      "        dict(name='second', script='train_fake.py', after=['first'])]\n")
    queue = slurm('squeue', '-h', '-o', '%i %j')
    lines = sweep(tmp_path, env, '--submit=slurm', '--dry_run=True', JOB_ARGS)
    assert lines[-1] == 'sweep | would submit 2 job(s)'
    planned = [shlex.split(line) for line in lines[:-1]]
    assert planned[1][-3] == '--dependency=afterok:<job of first:42>'
    assert slurm('squeue', '-h', '-o', '%i %j') == queue == '' and not (tmp_path / 'out').exists()
    # exactly what the submission then runs
    sweep(tmp_path, env, '--submit=slurm', JOB_ARGS)
    jobs = submitted(tmp_path / 'out/c')
    recorded = [shlex.split(json.loads(line)['sbatch']) for line in (tmp_path / 'out/c/sweep.jsonl').open()]
    assert recorded == [planned[0], [a.replace('<job of first:42>', jobs['first:42']) for a in planned[1]]]
    assert slurm.wait(jobs['second:42']) == 'COMPLETED'


def test_sigusr1_reaches_the_run_requeues_the_job_and_it_resumes_to_the_same_weights(slurm, env, tmp_path, corpus):
    """scancel --signal=USR1 --batch is what SLURM's warning before a time limit does (--signal=B:USR1@N): only the
    batch shell, the job's sweep, gets it; the run must save last.pt and requeue the job, which resumes it."""
    tiny = dict(dict(a.removeprefix('--').split('=', 1) for a in TINY_SLM), log_interval='50')
    overrides = ', '.join(f"{k}={v if v[0].isdigit() else repr(v)}" for k, v in tiny.items())
    (tmp_path / 'camp.py').write_text(
        f"out_root = 'out/c'\nruns = [dict(name='slm', script='train_slm.py', overrides=dict({overrides}, "
        f"dataset={str(corpus)!r}, max_iters=3000, eval_interval=100000))]\n")
    sweep(tmp_path, env, '--out_root=out/local')  # the uninterrupted run
    sweep(tmp_path, env, '--submit=slurm', JOB_ARGS)
    job, run = submitted(tmp_path / 'out/c')['slm:42'], tmp_path / 'out/c/slm/seed42'
    wait_for(lambda: (run / 'log.txt').exists() and 'iter 100/' in (run / 'log.txt').read_text())
    slurm('scancel', '--signal=USR1', '--batch', job)
    assert slurm.wait(job, states=('PENDING',)) == 'PENDING'  # requeued; SLURM holds it back ~2 minutes
    deadline = time.time() + 120
    while not slurm.start_now(job) and time.time() < deadline:
        time.sleep(0.2)
    assert slurm.wait(job) == 'COMPLETED'
    events = [json.loads(line) for line in (run / 'events.jsonl').read_text().splitlines()]
    ends = [e for e in events if e['event'] == 'end']
    assert [(e['reason'], e.get('requeue')) for e in ends] == [('signal', job), ('done', None)]
    attempts = [json.loads(line) for line in (tmp_path / 'out/c/sweep.jsonl').read_text().splitlines()][1:]
    assert [(h['action'], h['status']) for h in attempts] == [('run', 'interrupted'), ('resume', 'done')]
    assert (run / f'slurm-{job}.out').read_text().count('sweep 1/1 | slm seed 42 |') == 4  # both starts, appended
    ours, reference = (torch.load(path / 'last.pt', weights_only=True)['model_state_dict']
                       for path in (run, tmp_path / 'out/local/slm/seed42'))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
