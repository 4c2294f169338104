"""Shared fixtures: tiny data in the real formats, written into tmp dirs, and a runner for the scripts."""
import os
import signal
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
    common.STOP.armed, common.STOP.reason = False, None


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
