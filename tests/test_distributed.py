"""The DDP plumbing of common.py in real 2-process gloo groups (each rank its own process, as torchrun starts them):
rank 0's long data preparation outlasting the process group's collective timeout, a failure in it, and the one
collective of a training step (step_check). Then the single-process pieces that keep GPU runs exact: RNG states
per device, rank count changes, per-rank generators, the fused flag, bf16 only where native, deterministic kernels."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, _free_port

import common

PROGRAM = """
import datetime, sys, time
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import common
mode = sys.argv[1]
ddp, rank, world, device = common.init_distributed('cpu', timeout=datetime.timedelta(seconds=3))
master = rank == 0
if mode == 'barrier':  # what the scripts did before: the process group's own barrier
    if master:
        time.sleep(8)  # a cache build longer than the timeout
    dist.barrier()
elif mode in ('wait', 'fail'):
    with common.rank0_first(ddp, master):
        if master:
            time.sleep(8)
            if mode == 'fail':
                raise common.UserError('manifest.csv: bad label')
        print(f'rank {{rank}} prepared', flush=True)
    dist.barrier()  # the process group itself is still healthy after the long wait
elif mode == 'check':
    if rank == 1:
        common.STOP.reason = 'signal'  # SIGTERM reached rank 1 only
    loss = torch.tensor([1.0, 3.0][rank])
    other = torch.tensor([2.0, float('nan')][rank])
    print(f'rank {{rank}} check', common.step_check(ddp, loss, other), flush=True)
common.finish(ddp)
print(f'rank {{rank}} done', flush=True)
"""


def two_ranks(tmp_path, mode, timeout=90):
    """Run PROGRAM as ranks 0 and 1 of a gloo group; -> [(exit code, stdout + stderr)] per rank."""
    program = tmp_path / 'ranks.py'
    program.write_text(PROGRAM.format(root=str(ROOT)))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(program), mode], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(SCRIPT_ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE='2',
                                       LOCAL_WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)))
             for r in (0, 1)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def test_the_process_groups_barrier_times_out_while_rank_0_builds(tmp_path):
    """The control: with a 3 s collective timeout, rank 1 gives up on a plain barrier while rank 0 works 8 s."""
    (code0, _), (code1, out1) = two_ranks(tmp_path, 'barrier')
    assert code1 != 0 and 'timed out' in out1.lower(), out1[-2000:]


def test_rank0_first_outlasts_the_collective_timeout(tmp_path):
    (code0, out0), (code1, out1) = two_ranks(tmp_path, 'wait')
    assert code0 == 0 and code1 == 0, (out0[-2000:], out1[-2000:])
    assert 'rank 0 prepared' in out0 and 'rank 1 prepared' in out1 and 'rank 1 done' in out1


def test_a_failure_on_rank_0_stops_the_waiting_ranks_at_once(tmp_path):
    (code0, out0), (code1, out1) = two_ranks(tmp_path, 'fail')
    assert code0 == 2 and 'error: manifest.csv: bad label' in out0, out0[-2000:]
    assert code1 == 1 and 'error: rank 0 stopped while preparing the data' in out1, out1[-2000:]
    assert 'rank 1 prepared' not in out1


def test_step_check_gives_every_rank_the_mean_and_the_same_stop(tmp_path):
    """One all_reduce: rank 1's SIGTERM and rank 1's NaN reach rank 0; the loss is the mean over ranks."""
    results = two_ranks(tmp_path, 'check')
    for rank, (code, out) in enumerate(results):
        assert code == 0, out[-2000:]
        assert f"rank {rank} check ([2.0, nan], 'signal')" in out, out[-2000:]


def test_step_check_in_one_process_is_each_value_exactly():
    loss = torch.tensor(0.1, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float64) + loss.double() + loss.double() / 3
    values, reason = common.step_check(False, loss, total, torch.tensor(7))
    assert values == [loss.item(), loss.item() + loss.item() / 3, 7.0] and reason is None  # float64 sums kept


# -----------------------------------------------------------------------------
# RNG states: per device, per rank, named generators
# -----------------------------------------------------------------------------

def draws(generator=None):
    return (torch.rand(3), np.random.rand(2), random.random(),
            None if generator is None else torch.rand(2, generator=generator))


@pytest.fixture
def notes():
    common.NOTES.clear()
    yield common.NOTES
    common.NOTES.clear()


def test_rng_state_records_the_device_and_named_generators(notes):
    augment = torch.Generator().manual_seed(5)
    torch.rand(1, generator=augment)
    state = common.rng_state('cpu', augment=augment)
    assert state['device'] == 'cpu' and 'cuda' not in state and set(state['generators']) == {'augment'}
    expected = draws(augment)
    common.seed_everything(123)
    augment.manual_seed(0)
    common.set_rng_state(state, 'cpu', augment=augment)
    got = draws(augment)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[3], expected[3])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and notes == []


def test_restore_rng_per_rank_and_a_changed_rank_count_is_said(notes):
    states = []
    for rank in (0, 1):  # what rng_states_all_ranks gathers from two ranks
        common.seed_everything(100 + rank)
        augment = torch.Generator().manual_seed(200 + rank)
        states.append(common.rng_state('cpu', augment=augment))
    expected = [torch.rand(2, generator=torch.Generator().manual_seed(200 + r)) for r in (0, 1)]
    for rank in (0, 1):  # the same two ranks resume: each its own streams
        augment = torch.Generator()
        common.restore_rng(states, rank, 2, 'cpu', augment=augment)
        assert torch.equal(torch.rand(2, generator=augment), expected[rank])
    assert notes == []
    augment = torch.Generator()
    common.restore_rng(states, 0, 1, 'cpu', augment=augment)  # one process now: rank 0's, and the log says so
    assert torch.equal(torch.rand(2, generator=augment), expected[0])
    assert notes == ["resume: the checkpoint holds the RNG states of 2 rank(s), this run has 1: every rank continues "
                     "from rank 0's (the random streams, batch order included, differ from an uninterrupted run)"]


def test_a_cpu_checkpoint_resumed_on_a_gpu_says_the_gpu_generator_starts_fresh(notes):
    state = common.rng_state('cpu')
    common.set_rng_state(state, 'cuda:1')  # no CUDA call: there is no CUDA state to restore
    assert notes == ["resume: the checkpoint's RNG states are from cpu, this run is on cuda:1: its cuda:1 generator "
                     "starts from the seed (dropout differs from an uninterrupted run from here on)"]


def test_an_older_checkpoints_rng_state_still_loads(notes):
    state = common.rng_state('cpu')
    del state['device'], state['generators']  # the layout before device and generators were recorded
    expected = draws()
    common.seed_everything(1)
    common.set_rng_state(state, 'cpu', augment=torch.Generator())
    assert torch.equal(draws()[0], expected[0]) and notes == []


def test_the_fused_flag_of_the_new_optimizer_survives_loading_a_state_saved_without_it():
    params = [torch.nn.Parameter(torch.randn(4))]
    saved = torch.optim.AdamW(params, lr=1e-3, fused=False)
    params[0].grad = torch.randn(4)
    saved.step()
    resumed = torch.optim.AdamW(params, lr=1e-3, fused=True)  # built on the device it resumes on
    common.load_optimizer_state(resumed, saved.state_dict())
    assert resumed.param_groups[0]['fused'] is True
    assert torch.equal(resumed.state[params[0]]['exp_avg'], saved.state[params[0]]['exp_avg'])


@pytest.mark.filterwarnings('ignore:CUDA is not available')  # the autocast context is only built here, never entered
@pytest.mark.parametrize('native, expected', [(True, 'bfloat16'), (False, 'float32')])
def test_auto_dtype_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, native, expected):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # a V100 or T4: bf16 only emulated
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', is_bf16_supported)
    assert common.autocast_context('cuda:0', 'auto')[0] == expected and asked == [False]


def test_set_kernels_deterministic_tf32_and_flush_to_zero(monkeypatch):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    try:
        common.set_kernels(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
        common.set_kernels(False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        tiny = torch.tensor([1e-39])  # subnormal: flushed (to zero, on the x86 and ARM CPUs torch supports)
        assert (tiny * 1.0).item() == 0.0 or not torch.set_flush_denormal(True)
    finally:
        torch.set_flush_denormal(False)  # the other tests in this process see floats as they were
        torch.use_deterministic_algorithms(False)


def test_after_finish_a_late_sigterm_or_sigusr1_cannot_kill_the_finished_process(tmp_path):
    """SLURM's time-limit warning can arrive just as a run ends; while Python shuts down it has put the default
    handlers back, and the signal would kill a job whose run is saved (state FAILED). finish() ignores both."""
    code = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r}); import common; common.STOP.armed = True; "
            "common.finish(False); "
            "assert signal.getsignal(signal.SIGUSR1) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN; "
            "os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGTERM); print('exited cleanly')")
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=SCRIPT_ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and 'exited cleanly' in proc.stdout, proc.stderr
