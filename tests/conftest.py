"""Shared fixtures: tiny data in the real formats, written into tmp dirs, and a runner for the scripts."""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# one thread per script: bit-exact comparisons between runs need the same float reduction order
SCRIPT_ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
# a model small enough that a subprocess run takes a few seconds on 2 CPU cores
TINY_SLM = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--d_ff=64', '--block_size=32', '--batch_size=4',
            '--eval_iters=2', '--sample_tokens=16', '--log_interval=1', '--device=cpu']


def run_script(script, *args, cwd, check=True, timeout=240):
    """Run a project script as a user would (python script.py args) from `cwd`; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=SCRIPT_ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def signal_when_logged(script, *args, cwd, out_dir, text, delay=0.0, sig=signal.SIGTERM):
    """Start a project script, wait until `text` shows in out_dir/log.txt (then `delay` s more), send `sig`
    (SIGTERM as SLURM does before pre-emption, SIGINT as Ctrl-C does) and return (exit code, stdout, stderr) once it
    has saved and exited."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args), f'--out_dir={out_dir}'], cwd=cwd,
                            env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = Path(cwd) / out_dir / 'log.txt', time.time() + 120
    while not (log.exists() and text in log.read_text()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if not (log.exists() and text in log.read_text()):
        proc.kill()
        raise AssertionError(f"{script} never logged {text!r}:\n{proc.communicate()[1][-3000:]}")
    time.sleep(delay)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


sigterm_when_logged = signal_when_logged


@pytest.fixture(autouse=True)
def _disarmed_stop_signals():
    """A test that makes a RunDir in this process arms common.STOP (Ctrl-C would then only set a flag): undo it."""
    yield
    import common
    common.STOP.armed, common.STOP.reason, common.STOP.signals = False, None, []


def python_like_text(n_lines):
    """Deterministic Python-looking text (ASCII plus one non-ASCII character to exercise the UNK path)."""
    lines = []
    for i in range(n_lines):
        lines.append(f"def function_{i}(x, y={i % 7}):\n    return x * {i % 5} + y  # note {i % 3}\n\n")
    lines.append("# caf\u00e9\n")
    return ''.join(lines)


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp('corpus') / 'corpus.txt'
    path.write_text(python_like_text(600))
    return path


# -----------------------------------------------------------------------------
# a real single-node SLURM (munge + slurmctld + slurmd as root, every address on loopback) for `-m slurm` tests
# -----------------------------------------------------------------------------

SLURM_CONF = """ClusterName=tests
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Slurm:
    """The test cluster: `env` points sbatch/squeue/scontrol at it (SLURM_CONF); helpers wait on job states."""

    def __init__(self, root, env):
        self.root, self.env = root, env

    def __call__(self, *command, check=True, cwd=None):
        out = subprocess.run(command, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {out.returncode}: {out.stderr}")
        return out.stdout.strip()

    def state(self, job):
        """The job's state (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...), from scontrol: finished jobs stay
        listed for MinJobAge."""
        text = self('scontrol', 'show', 'job', str(job), check=False)
        return next((w.split('=')[1] for w in text.split() if w.startswith('JobState=')), 'UNKNOWN')

    def start_now(self, job):
        """Lift the hold (~2 minutes) SLURM puts on a requeued job, once its last run has left the node: a job started
        in the second its last run was killed in fails at once ('Killing non-startable batch job: Job credential
        revoked': slurmd revokes the old run's credential with one-second resolution). True if it was lifted."""
        if self.state(job) != 'PENDING' or self('sinfo', '-h', '-o', '%T', check=False) != 'idle':
            return False
        time.sleep(2)  # the revocation's second is over
        self('scontrol', 'update', f'JobId={job}', 'StartTime=now', check=False)  # it may have started meanwhile
        return True

    def wait(self, job, states=('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY'),
             timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(job)
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job} still {self.state(job)} after {timeout} s")


@pytest.fixture(scope='session')
def slurm(tmp_path_factory):
    """Start munged, slurmctld and slurmd (as root, state and logs in a temp dir), yield a Slurm, stop them by their
    own PIDs. Skipped where SLURM is not installed or this user cannot run it."""
    missing = [c for c in ('munged', 'slurmctld', 'slurmd', 'sbatch') if not shutil.which(c)]
    if missing or os.geteuid() != 0:
        pytest.skip(f"a single-node SLURM needs root and {', '.join(missing) or 'its daemons'} "
                    f"(apt-get install -y slurm-wlm munge)")
    root = tmp_path_factory.mktemp('slurm')
    for folder in ('state', 'spool'):
        (root / folder).mkdir()
    key = root / 'munge.key'
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**20 - 1024
    conf = root / 'slurm.conf'
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), root=root, ctld_port=_free_port(),
                                      d_port=_free_port(), cpus=os.cpu_count(), memory=memory))
    (root / 'gres.conf').write_text("Name=gpu File=/dev/null\n")  # a GPU in name only (torch sees none), so
    env = dict(os.environ, SLURM_CONF=str(conf))  # --gres=gpu:1 lines run as documented, on the CPU
    subprocess.run(['munged', '--force', f'--key-file={key}', f'--socket={root}/munge.socket',
                    f'--pid-file={root}/munged.pid', f'--log-file={root}/munged.log', f'--seed-file={root}/munge.seed'],
                   check=True, env=env)
    subprocess.run(['slurmctld', '-f', str(conf)], check=True, env=env)
    subprocess.run(['slurmd', '-f', str(conf)], check=True, env=env)
    cluster, deadline = Slurm(root, env), time.time() + 60
    while 'idle' not in cluster('sinfo', '-h', '-o', '%T', check=False) and time.time() < deadline:
        time.sleep(0.5)
    try:
        assert 'idle' in cluster('sinfo', '-h', '-o', '%T', check=False), (root / 'slurmctld.log').read_text()[-2000:]
        yield cluster
    finally:
        for name in ('slurmd', 'slurmctld', 'munged'):
            pid_file = root / f'{name}.pid'
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
