"""The scripts on a real SLURM (`python -m pytest -m slurm`): every documented sbatch line runs to COMPLETED, the
warning signal before a time limit (or pre-emption) saves and requeues the job, which continues to the weights of
an uninterrupted run, and scancel leaves a resumable last.pt without requeueing."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_SLM, run_script

from data import make_sprites, write_dsprites_npz, write_sleep_sounds

pytestmark = pytest.mark.slurm
SCRIPTS = ('train_slm.py', 'train_spoter.py', 'train_audio.py', 'train_kd.py', 'train_vae.py')


def test_the_cluster_runs_a_job(slurm, tmp_path):
    job = slurm('sbatch', '--parsable', '--gres=gpu:1', '--wrap', 'echo hello from $SLURM_JOB_ID', cwd=tmp_path)
    assert slurm.wait(job) == 'COMPLETED'
    assert (tmp_path / f'slurm-{job}.out').read_text().strip() == f'hello from {job}'


def documented_sbatch_lines():
    """Every sbatch command in README.md and the scripts' docstrings, continuation lines joined."""
    lines = []
    for path in [ROOT / 'README.md', *(ROOT / s for s in SCRIPTS)]:
        for line in path.read_text().replace('\\\n', ' ').splitlines():
            if line.strip().startswith('sbatch '):
                lines.append(' '.join(line.split()))
    return list(dict.fromkeys(lines))


@pytest.fixture
def workdir(slurm, tmp_path, corpus):
    """A copy of the project to submit from (jobs write out/ and cache/ there), tiny data, and the environment of
    a job: this interpreter first on PATH, one thread per process."""
    for path in ROOT.glob('*.py'):
        shutil.copy(path, tmp_path)
    shutil.copytree(ROOT / 'config', tmp_path / 'config')
    env = dict(slurm.env, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    manifest = write_sleep_sounds(str(tmp_path / 'sounds'), n_clips=60, seed=2)
    write_dsprites_npz(str(tmp_path / 'sprites.npz'), *make_sprites(600, seed=0))
    return tmp_path, env, manifest


def sbatch(line, cwd, env):
    """Submit one sbatch command line (as a shell would split it) with --parsable; return the job id."""
    args = shlex.split(line)
    out = subprocess.run([args[0], '--parsable', *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().split(';')[0]


def test_every_documented_sbatch_line_runs_to_completed(slurm, workdir, corpus):
    cwd, env, manifest = workdir
    audio = f'--manifest={manifest} --clip_seconds=0.5 --max_epochs=1 --num_workers=0 --batch_size=8 --device=cpu'
    short = {  # the lines as written, shortened by overrides (and '...' filled in with tiny data)
        'train_slm.py': f"{' '.join(TINY_SLM)} --dataset={corpus} --max_iters=4 --eval_interval=2",
        'train_spoter.py': '--device=cpu --max_epochs=1 --batch_size=8 --builtin_classes=4 --num_classes=0',
        'train_audio.py': audio, 'train_kd.py': f'{audio} --gate=False',
        'train_vae.py': '--device=cpu --data=sprites.npz --max_epochs=1 --batch_size=32 --mig_samples=600',
    }
    lines = documented_sbatch_lines()
    assert len(lines) >= 6 and {s for s in SCRIPTS if any(s in line for line in lines)} == set(SCRIPTS)
    # the KD line reads the teacher the audio line trains (out/audio_crnn/best.pt): it goes after it
    lines.sort(key=lambda line: 'train_kd.py' in line)
    jobs = {}
    for i, line in enumerate(lines):
        script = next(s for s in SCRIPTS if s in line)
        line = re.sub(r'--(manifest|data|train_csv|val_csv|test_csv)=\.\.\. ', '', line)
        extra = f' {short[script]} --out_dir=out/line{i}'  # each its own run: two lines train the same config
        if script == 'train_kd.py':
            audio = next(j for j, (text, _) in enumerate(jobs.items()) if 'config/audio_crnn.py' in text)
            assert slurm.wait(list(jobs.values())[audio]) == 'COMPLETED'
            extra += f' --teacher_ckpt=out/line{audio}/best.pt'
        line = line[:-1] + extra + '"'  # the overrides go at the end of the --wrap command
        jobs[line] = sbatch(line, cwd, env)
    for line, job in jobs.items():
        assert slurm.wait(job) == 'COMPLETED', (line, (cwd / f'slurm-{job}.out').read_text()[-3000:])
        assert re.search(r'^done at ', (cwd / f'slurm-{job}.out').read_text(), re.M), line  # trained to its end


def events(run_dir):
    return [json.loads(line) for line in (run_dir / 'events.jsonl').read_text().splitlines()]


def weights(path):
    return torch.load(path, weights_only=True)['model_state_dict']


SLM_LONG = [*TINY_SLM, '--log_interval=100', '--eval_interval=1000']


def submit_slm(cwd, env, corpus, out_dir, iters, options=''):
    """The documented line's shape: --requeue, the warning signal for the batch shell, exec python."""
    command = shlex.join(['exec', 'python', 'train_slm.py', *SLM_LONG, f'--dataset={corpus}', f'--max_iters={iters}',
                          f'--out_dir={out_dir}', '--init_from=auto'])
    return sbatch(f"sbatch --requeue --signal=B:USR1@120 {options} --wrap {shlex.quote(command)}", cwd, env)


def wait_logged(path, text, timeout=120):
    deadline = time.time() + timeout
    while not (path.exists() and text in path.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists() and text in path.read_text(), f"{path} never logged {text!r}"


def restart_when_requeued(slurm, job, timeout=120):
    """A requeued job waits ~2 minutes (SLURM's hold on requeued jobs) before it may start: start it now."""
    deadline = time.time() + timeout
    while not slurm.start_now(job) and time.time() < deadline:
        time.sleep(0.2)
    assert slurm.state(job) in ('PENDING', 'RUNNING', 'COMPLETED'), slurm('scontrol', 'show', 'job', job)


def job_story(slurm, job, cwd, out_dir):
    """What a failed assertion should show: the scheduler's record, the job's output and the run's log."""
    outputs = ''.join(p.read_text() for p in sorted(cwd.glob(f'slurm-{job}*.out')))
    return '\n'.join([slurm('scontrol', 'show', 'job', str(job), check=False), outputs,
                      (cwd / out_dir / 'log.txt').read_text()])


def restarts(slurm, job):
    return int(re.search(r'Restarts=(\d+)', slurm('scontrol', 'show', 'job', job))[1])


def test_the_warning_signal_saves_requeues_and_the_job_ends_exactly_where_an_uninterrupted_run_does(
        slurm, workdir, corpus):
    cwd, env, _ = workdir
    job = submit_slm(cwd, env, corpus, 'out/warned', 4000)
    wait_logged(cwd / 'out/warned/log.txt', 'iter 1000/4000')
    slurm('scancel', '--signal=USR1', '--batch', job)  # what SLURM sends at --signal=B:USR1@120
    restart_when_requeued(slurm, job)
    run_script('train_slm.py', *SLM_LONG, f'--dataset={corpus}', '--max_iters=4000', '--out_dir=out/whole', cwd=cwd)
    assert slurm.wait(job) == 'COMPLETED' and restarts(slurm, job) == 1
    ends = [e for e in events(cwd / 'out/warned') if e['event'] == 'end']
    assert [(e['reason'], e.get('requeue')) for e in ends] == [('signal', job), ('done', None)]
    assert f"requeued SLURM job {job}" in (cwd / 'out/warned/log.txt').read_text()
    a, b = weights(cwd / 'out/warned/last.pt'), weights(cwd / 'out/whole/last.pt')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_time_limit_continues_the_run_through_requeues_to_the_uninterrupted_weights(slurm, workdir, corpus):
    cwd, env, _ = workdir
    # the warning comes 45-105 s before the 2-minute limit (SLURM may send it up to 60 s early), so 15-75 s into a
    # job: 60,000 steps (~100 s at 1.7 ms a step on one thread, more on a slower machine) are more than one job
    # can hold, and every job makes progress
    iters = 60000
    job = submit_slm(cwd, env, corpus, 'out/limited', iters, options='--time=2 --signal=B:USR1@45')
    reference = subprocess.Popen([sys.executable, 'train_slm.py', *SLM_LONG, f'--dataset={corpus}',
                                  f'--max_iters={iters}', '--out_dir=out/whole'], cwd=cwd, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while slurm.state(job) != 'COMPLETED' and time.time() < deadline:
        state = slurm.state(job)
        assert state not in ('FAILED', 'TIMEOUT', 'CANCELLED'), job_story(slurm, job, cwd, 'out/limited')
        if not (state == 'PENDING' and restarts(slurm, job) and slurm.start_now(job)):
            time.sleep(0.5)
    assert reference.wait(timeout=600) == 0 and slurm.state(job) == 'COMPLETED'
    survived = restarts(slurm, job)
    print(f"time-limit test: {survived} requeue(s) survived")
    assert survived >= 1
    reasons = [e['reason'] for e in events(cwd / 'out/limited') if e['event'] == 'end']
    assert reasons == ['signal'] * survived + ['done']
    a, b = weights(cwd / 'out/limited/last.pt'), weights(cwd / 'out/whole/last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scancel_leaves_a_resumable_last_pt_and_no_requeue(slurm, workdir, corpus):
    cwd, env, _ = workdir
    job = submit_slm(cwd, env, corpus, 'out/cancelled', 4000)
    wait_logged(cwd / 'out/cancelled/log.txt', 'iter 1000/4000')
    slurm('scancel', job)
    assert slurm.wait(job) == 'CANCELLED'
    time.sleep(3)
    assert slurm.state(job) == 'CANCELLED' and restarts(slurm, job) == 0
    end = events(cwd / 'out/cancelled')[-1]
    assert end['event'] == 'end' and end['reason'] == 'signal' and 'requeue' not in end
    run_script('train_slm.py', '--out_dir=out/cancelled', '--init_from=resume', cwd=cwd)
    run_script('train_slm.py', *SLM_LONG, f'--dataset={corpus}', '--max_iters=4000', '--out_dir=out/whole', cwd=cwd)
    a, b = weights(cwd / 'out/cancelled/last.pt'), weights(cwd / 'out/whole/last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_torchrun_job_saves_on_every_rank_at_scancel_and_continues(slurm, workdir, corpus):
    cwd, env, _ = workdir
    command = shlex.join(['exec', 'torchrun', '--standalone', '--nproc_per_node=2', 'train_slm.py', *SLM_LONG,
                          f'--dataset={corpus}', '--max_iters=4000', '--out_dir=out/ddp', '--init_from=auto'])
    job = sbatch(f"sbatch --requeue --cpus-per-task=2 --wrap {shlex.quote(command)}", cwd, env)
    wait_logged(cwd / 'out/ddp/log.txt', 'iter 500/4000')
    slurm('scancel', job)  # SIGTERM to torchrun and to both ranks, as at a time limit
    assert slurm.wait(job) == 'CANCELLED'
    end = events(cwd / 'out/ddp')[-1]
    assert end['event'] == 'end' and end['reason'] == 'signal'
    saved = torch.load(cwd / 'out/ddp/last.pt', weights_only=True)
    assert saved['iter_num'] == end['iter'] > 0 and len(saved['rng_state']) == 2  # both ranks' state
    job = sbatch(f"sbatch --requeue --cpus-per-task=2 --wrap {shlex.quote(command)}", cwd, env)  # the same line
    assert slurm.wait(job) == 'COMPLETED'
    assert torch.load(cwd / 'out/ddp/last.pt', weights_only=True)['iter_num'] == 4000
