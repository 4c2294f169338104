"""Unit tests for common.py: configurator, config hash, device/precision, checkpoints, init resolution, run dir."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import csv
import hashlib
import json
import math
import os
import platform
import random
import re

import numpy as np
import pytest
import torch

import common
from common import UserError

# -----------------------------------------------------------------------------
# configure
# -----------------------------------------------------------------------------

SCRIPT = """\
import os
batch_size = 12  # sequences per optimizer step
learning_rate = 3e-4  # peak learning rate (AdamW)
compile = False  # torch.compile the model
device = 'auto'  # 'auto' | 'cpu' | 'cuda'
name = 'run'  # a free-form run name
extra = None  # anything goes here
betas = [0.9, 0.95]  # AdamW betas
_private = 5
"""
DEFAULTS = dict(batch_size=12, learning_rate=3e-4, compile=False, device='auto', name='run', extra=None,
                betas=[0.9, 0.95])
COMMENTS = dict(batch_size='sequences per optimizer step', learning_rate='peak learning rate (AdamW)',
                compile='torch.compile the model', device="'auto' | 'cpu' | 'cuda'", name='a free-form run name',
                extra='anything goes here', betas='AdamW betas')


@pytest.fixture
def g(tmp_path, monkeypatch):
    """The globals of a small script, as configure(globals()) would see them at its call site."""
    monkeypatch.setattr(sys, 'excepthook', sys.excepthook)  # configure() installs its own hook: restore it
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT)
    glob = {'__name__': '__main__', '__file__': str(script)}
    exec(compile(SCRIPT, str(script), 'exec'), glob)
    return glob


def write_cfg(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_configure_defaults_unchanged(g):
    config = common.configure(g, [])
    assert config == DEFAULTS
    assert [type(v) for v in config.values()] == [type(v) for v in DEFAULTS.values()]
    assert sys.excepthook is common._excepthook


def test_configure_file_then_cli_precedence(g, tmp_path):
    cfg = write_cfg(tmp_path, "batch_size = 32\nlearning_rate = 1e-3\nname = 'from_file'\n")
    config = common.configure(g, [cfg, '--batch_size=64'])
    assert config == dict(DEFAULTS, batch_size=64, learning_rate=1e-3, name='from_file')
    assert g['batch_size'] == 64 and g['learning_rate'] == 1e-3  # the script's globals are updated too


def test_configure_two_config_files_apply_in_order(g, tmp_path):
    a = write_cfg(tmp_path, "batch_size = 32\nname = 'a'\n", 'a.py')
    b = write_cfg(tmp_path, "batch_size = 48\n", 'b.py')
    config = common.configure(g, [a, b])
    assert config['batch_size'] == 48 and config['name'] == 'a'


def test_configure_cli_beats_file_regardless_of_argv_order(g, tmp_path):
    cfg = write_cfg(tmp_path, "batch_size = 32\n")
    assert common.configure(g, ['--batch_size=64', cfg])['batch_size'] == 64


def test_configure_int_for_float_default_becomes_float(g, tmp_path):
    config = common.configure(g, ['--learning_rate=1'])
    assert config['learning_rate'] == 1.0 and type(config['learning_rate']) is float
    cfg = write_cfg(tmp_path, "learning_rate = 2\n")
    config = common.configure(g, [cfg])
    assert config['learning_rate'] == 2.0 and type(config['learning_rate']) is float


@pytest.mark.parametrize('text, expected', [
    ('3', 3), ("'x'", 'x'), ('[1, 2]', [1, 2]), ('hello', 'hello'), ('1.5', 1.5), ('None', None)])
def test_configure_none_default_accepts_any_literal(g, text, expected):
    value = common.configure(g, [f'--extra={text}'])['extra']
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize('arg, key, expected', [
    ('--name=a=b', 'name', 'a=b'),        # everything after the first '='
    ('--name=123', 'name', '123'),        # a str key takes the text as typed
    ('--name=[1]', 'name', '[1]'),
    ("--name='quoted'", 'name', 'quoted'),  # a str literal is still parsed
    ('--device=cpu', 'device', 'cpu'),    # not a Python literal: a plain string
    ('--extra=cuda:0', 'extra', 'cuda:0'),
    ('--compile=True', 'compile', True),
    ('--betas=[0.8, 0.99]', 'betas', [0.8, 0.99]),
])
def test_configure_cli_values(g, arg, key, expected):
    value = common.configure(g, [arg])[key]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize('arg, key, value, expected_type', [
    ('--batch_size=1.5', 'batch_size', '1.5', 'int'),
    ('--compile=1', 'compile', '1', 'bool'),
    ('--batch_size=[1, 2]', 'batch_size', '[1, 2]', 'int'),
    ('--learning_rate=True', 'learning_rate', 'True', 'float'),  # a bool is not an int for a float default
    ('--batch_size=big', 'batch_size', "'big'", 'int'),
    ('--betas=(0.9, 0.95)', 'betas', '(0.9, 0.95)', 'list'),
])
def test_configure_wrong_type_cli(g, arg, key, value, expected_type):
    with pytest.raises(UserError) as e:
        common.configure(g, [arg])
    msg = str(e.value)
    assert f"{key}={value}" in msg and f"expected {expected_type}" in msg
    assert 'command line' in msg


def test_configure_wrong_type_in_config_file(g, tmp_path):
    cfg = write_cfg(tmp_path, "batch_size = 'big'\n")
    with pytest.raises(UserError) as e:
        common.configure(g, [cfg])
    msg = str(e.value)
    assert cfg in msg and "batch_size='big'" in msg and 'expected int' in msg


def test_configure_unknown_cli_key_suggests_closest(g):
    with pytest.raises(UserError) as e:
        common.configure(g, ['--batch_sise=3'])
    msg = str(e.value)
    assert "'batch_sise'" in msg and "did you mean 'batch_size'" in msg


def test_configure_unknown_key_in_config_file_suggests_closest(g, tmp_path):
    cfg = write_cfg(tmp_path, "batch_sise = 3\n")
    with pytest.raises(UserError) as e:
        common.configure(g, [cfg])
    msg = str(e.value)
    assert cfg in msg and "'batch_sise'" in msg and "did you mean 'batch_size'" in msg


def test_configure_unknown_key_without_close_match_has_no_hint(g):
    with pytest.raises(UserError) as e:
        common.configure(g, ['--zzzzzzzz=1'])
    assert "'zzzzzzzz'" in str(e.value) and 'did you mean' not in str(e.value)


def test_configure_missing_config_file(g, tmp_path):
    missing = str(tmp_path / 'nope.py')
    with pytest.raises(UserError) as e:
        common.configure(g, [missing])
    assert missing in str(e.value)


@pytest.mark.parametrize('arg', ['--batch_size', '--name'])
def test_configure_arg_without_equals(g, arg):
    with pytest.raises(UserError) as e:
        common.configure(g, [arg])
    assert arg in str(e.value)
    assert g['batch_size'] == 12 and g['name'] == 'run'


def test_configure_config_file_may_import_modules(g, tmp_path):
    cfg = write_cfg(tmp_path, "import math\nlearning_rate = math.sqrt(4) * 1e-4\n")
    config = common.configure(g, [cfg])
    assert config['learning_rate'] == pytest.approx(2e-4)
    assert 'math' not in config


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_configure_help_lists_keys_defaults_comments(g, capsys, flag):
    with pytest.raises(SystemExit) as e:
        common.configure(g, ['--batch_size=3', flag])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for key, default in DEFAULTS.items():
        matching = [ln for ln in lines if f"--{key}={default!r}" in ln]
        assert len(matching) == 1, (key, lines)
        assert matching[0].rstrip().endswith(f"# {COMMENTS[key]}"), matching[0]
    assert not any('_private' in ln for ln in lines)
    assert g['batch_size'] == 12  # --help does not apply overrides


# -----------------------------------------------------------------------------
# config_hash
# -----------------------------------------------------------------------------

BASE_CONFIG = dict(batch_size=16, learning_rate=3e-4, dataset='', hooks=['act_stats'], seed=1337, out_dir='out/a',
                   init_from='scratch', overwrite=False, log_interval=10, eval_interval=200, eval_only=False,
                   num_workers=0, cache_dir='cache')


@pytest.mark.parametrize('key, value', [('out_dir', 'out/b'), ('init_from', 'resume'), ('overwrite', True),
                                        ('log_interval', 1), ('eval_interval', 5), ('eval_only', True),
                                        ('num_workers', 4), ('cache_dir', '/scratch/cache')])
def test_config_hash_ignores_io_keys(key, value):
    assert common.config_hash(dict(BASE_CONFIG, **{key: value})) == common.config_hash(BASE_CONFIG)


@pytest.mark.parametrize('key, value', [('batch_size', 17), ('learning_rate', 3.1e-4), ('dataset', 'x.txt'),
                                        ('hooks', []), ('seed', 1), ('new_key', 0)])
def test_config_hash_changes_with_result_keys(key, value):
    assert common.config_hash(dict(BASE_CONFIG, **{key: value})) != common.config_hash(BASE_CONFIG)


def test_config_hash_is_sha256_of_canonical_json():
    kept = {k: v for k, v in BASE_CONFIG.items() if k not in common.HASH_EXCLUDED_KEYS}
    expected = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    assert common.config_hash(BASE_CONFIG) == expected
    reordered = dict(reversed(list(BASE_CONFIG.items())))
    assert common.config_hash(reordered) == expected


# -----------------------------------------------------------------------------
# pick_device, autocast_context
# -----------------------------------------------------------------------------

def test_pick_device_cpu():
    assert common.pick_device('cpu') == 'cpu'


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize('device', ['cuda', 'cuda:0'])
def test_pick_device_cuda_unavailable(device):
    with pytest.raises(UserError) as e:
        common.pick_device(device)
    assert device in str(e.value)


@pytest.mark.parametrize('device', ['tpu', 'CPU', 'gpu', ''])
def test_pick_device_invalid(device):
    with pytest.raises(UserError):
        common.pick_device(device)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend two CUDA devices and no MPS; no SLURM, no CUDA_VISIBLE_DEVICES."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    monkeypatch.delenv('SLURM_JOB_ID', raising=False)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    return monkeypatch


def test_pick_device_auto_slurm_rule(fake_cuda):
    assert common.pick_device('auto') == 'cuda'  # no SLURM
    fake_cuda.setenv('SLURM_JOB_ID', '123')
    assert common.pick_device('auto') == 'cpu'  # a SLURM job given no GPU never grabs one
    fake_cuda.setenv('CUDA_VISIBLE_DEVICES', '')
    assert common.pick_device('auto') == 'cpu'
    fake_cuda.setenv('CUDA_VISIBLE_DEVICES', '0')
    assert common.pick_device('auto') == 'cuda'


@pytest.mark.parametrize('gpus, local_rank, local_world, torchrun, expected', [
    (1, 0, 1, True, 'cuda:0'),  # one process, one GPU
    (4, 3, 4, True, 'cuda:3'),  # torchrun --nproc_per_node=4 on a 4-GPU node
    (8, 1, 2, True, 'cuda:1'),  # fewer ranks than GPUs: the first ones
    (1, 1, 2, False, 'cuda:0'),  # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
    (1, 1, 2, True, "2 processes on this node but 1 GPU(s) visible to them"),  # torchrun ranks share one GPU
    (2, 2, 4, True, "4 processes on this node but 2 GPU(s) visible to them: start one process per GPU "
                    "(torchrun --nproc_per_node=2)"),
    (2, 2, 4, False, "4 processes on this node but 2 GPU(s)"),
])
def test_every_rank_gets_a_device_that_exists_or_one_line_naming_the_counts(fake_cuda, gpus, local_rank, local_world,
                                                                           torchrun, expected):
    fake_cuda.setattr(torch.cuda, 'device_count', lambda: gpus)
    chosen, joined = [], []
    fake_cuda.setattr(torch.cuda, 'set_device', chosen.append)
    fake_cuda.setattr(common.dist, 'init_process_group', lambda backend, timeout: joined.append(backend))
    fake_cuda.setattr(common.dist, 'new_group', lambda backend, timeout: None)  # rank0_first's group
    fake_cuda.setenv('RANK', str(local_rank))
    fake_cuda.setenv('LOCAL_RANK', str(local_rank))
    fake_cuda.setenv('WORLD_SIZE', str(local_world))
    fake_cuda.setenv('LOCAL_WORLD_SIZE', str(local_world))
    if torchrun:
        fake_cuda.setenv('TORCHELASTIC_RUN_ID', 'job')
    else:
        fake_cuda.delenv('TORCHELASTIC_RUN_ID', raising=False)
    if expected.startswith('cuda'):
        assert common.init_distributed('auto') == (True, local_rank, local_world, expected)
        assert chosen == [expected] and joined == ['nccl']
        assert int(expected.split(':')[1]) < gpus  # never an ordinal the process cannot see
    else:
        with pytest.raises(UserError, match=re.escape(expected)):
            common.init_distributed('auto')
        assert chosen == [] and joined == []  # refused before any process group or device was touched


def test_pick_device_auto_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    assert common.pick_device('auto') == 'cpu'


def test_pick_device_cuda_index(fake_cuda):
    assert common.pick_device('cuda') == 'cuda'
    assert common.pick_device('cuda:1') == 'cuda:1'
    with pytest.raises(UserError) as e:
        common.pick_device('cuda:2')
    assert 'cuda:2' in str(e.value)


@pytest.mark.parametrize('device', ['cuda:abc', 'cuda:-1', 'cuda0'])
def test_pick_device_malformed_cuda_is_user_error(fake_cuda, device):
    with pytest.raises(UserError):
        common.pick_device(device)


def test_autocast_context_cpu():
    name, ctx = common.autocast_context('cpu', 'auto')
    assert name == 'float32' and isinstance(ctx, contextlib.nullcontext)
    name, ctx = common.autocast_context('cpu', 'float32')
    assert name == 'float32' and isinstance(ctx, contextlib.nullcontext)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'fp32'])
def test_autocast_context_cpu_refuses(dtype):
    with pytest.raises(UserError) as e:
        common.autocast_context('cpu', dtype)
    assert dtype in str(e.value)


# -----------------------------------------------------------------------------
# checkpoints
# -----------------------------------------------------------------------------

def tiny_state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()  # so the optimizer has exp_avg / exp_avg_sq state
    return model, opt


def ckpt_fields(model, opt, **extra):
    return dict(model_state_dict=model.state_dict(), optimizer_state_dict=opt.state_dict(),
                model_args={'in': 3, 'out': 2}, args={'batch_size': 4}, **extra)


def draws():
    return torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal(), random.gauss(0, 1)


def test_checkpoint_round_trip_with_rng(tmp_path):
    model, opt = tiny_state(0)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    path = str(tmp_path / 'last.pt')
    common.save_checkpoint(path, rng_state=common.rng_state(), iter_num=7, **ckpt_fields(model, opt))
    expected = draws()
    common.seed_everything(999)  # move every RNG elsewhere
    assert not torch.equal(torch.rand(3), expected[0])

    ckpt = common.load_checkpoint(path)
    assert ckpt['schema_version'] == common.SCHEMA_VERSION == 1
    assert 'git_commit' in ckpt and ckpt['iter_num'] == 7
    assert ckpt['model_args'] == {'in': 3, 'out': 2} and ckpt['args'] == {'batch_size': 4}
    common.set_rng_state(ckpt['rng_state'])
    got = draws()
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]

    model2, opt2 = tiny_state(1)
    model2.load_state_dict(ckpt['model_state_dict'])
    opt2.load_state_dict(ckpt['optimizer_state_dict'])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for k in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(opt.state[p][k], opt2.state[p2][k])


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    model, opt = tiny_state(0)
    path = str(tmp_path / 'last.pt')
    common.save_checkpoint(path, **ckpt_fields(model, opt), iter_num=1)
    original = Path(path).read_bytes()

    def failing_replace(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, 'replace', failing_replace)
    with pytest.raises(OSError):
        common.save_checkpoint(path, **ckpt_fields(*tiny_state(5)), iter_num=2)
    monkeypatch.undo()
    assert Path(path).read_bytes() == original
    ckpt = common.load_checkpoint(path)
    assert ckpt['iter_num'] == 1
    assert torch.equal(ckpt['model_state_dict']['weight'], model.weight)


def test_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    common.save_checkpoint(path, **ckpt_fields(*tiny_state(0)))

    def failing_replace(src, dst):
        raise OSError("simulated failure")

    monkeypatch.setattr(os, 'replace', failing_replace)
    with pytest.raises(OSError):
        common.save_checkpoint(path, **ckpt_fields(*tiny_state(1)))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pt']


def assert_unreadable(path, *words):
    with pytest.raises(UserError) as e:
        common.load_checkpoint(str(path))
    msg = str(e.value)
    assert str(path) in msg and '\n' not in msg
    for w in words:
        assert w in msg
    return msg


def test_load_checkpoint_truncated(tmp_path):
    good = tmp_path / 'good.pt'
    common.save_checkpoint(str(good), **ckpt_fields(*tiny_state(0)))
    data = good.read_bytes()
    bad = tmp_path / 'truncated.pt'
    bad.write_bytes(data[:len(data) // 2])
    assert_unreadable(bad, 'not a readable checkpoint')


def test_load_checkpoint_foreign_dict(tmp_path):
    path = tmp_path / 'foreign.pt'
    torch.save({'a': 1}, path)
    msg = assert_unreadable(path, 'missing')
    for k in ('model_state_dict', 'model_args', 'args'):
        assert k in msg


def test_load_checkpoint_not_a_dict(tmp_path):
    path = tmp_path / 'list.pt'
    torch.save([1, 2, 3], path)
    assert_unreadable(path, 'missing')


def test_load_checkpoint_custom_required(tmp_path):
    path = tmp_path / 'c.pt'
    common.save_checkpoint(str(path), weights={'w': torch.ones(2)})
    assert torch.equal(common.load_checkpoint(str(path), required=('weights',))['weights']['w'], torch.ones(2))
    assert_unreadable(path, 'missing', 'model_state_dict')


def test_load_checkpoint_random_bytes(tmp_path):
    path = tmp_path / 'noise.pt'
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_unreadable(path, 'not a readable checkpoint')


class _Payload:
    """Unpickling this creates a file: the stand-in for code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_load_checkpoint_refuses_code(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pt'
    torch.save(dict(model_state_dict={'w': _Payload(str(marker))}, model_args={}, args={}), path)
    assert not marker.exists()
    assert_unreadable(path, 'not a readable checkpoint')
    assert not marker.exists()
    # control: the payload is live, an unsafe load would have run it
    obj = torch.load(path, weights_only=False)
    obj['model_state_dict']['w'].close()
    assert marker.exists()


def test_load_checkpoint_missing_file(tmp_path):
    path = tmp_path / 'nowhere' / 'last.pt'
    with pytest.raises(UserError) as e:
        common.load_checkpoint(str(path))
    assert str(path) in str(e.value)


# -----------------------------------------------------------------------------
# resolve_init
# -----------------------------------------------------------------------------

def test_resolve_init_scratch_new_and_empty_dir(tmp_path):
    assert common.resolve_init('scratch', str(tmp_path / 'new'), False) is None
    assert common.resolve_init('scratch', str(tmp_path), False) is None


@pytest.mark.parametrize('held', ['last.pt', 'best.pt'])
def test_resolve_init_scratch_refuses_to_overwrite(tmp_path, held):
    ckpt = tmp_path / held
    ckpt.write_bytes(b'precious checkpoint bytes')
    with pytest.raises(UserError) as e:
        common.resolve_init('scratch', str(tmp_path), False)
    assert '--overwrite' in str(e.value) and held in str(e.value)
    assert ckpt.read_bytes() == b'precious checkpoint bytes'
    assert common.resolve_init('scratch', str(tmp_path), True) is None
    assert ckpt.read_bytes() == b'precious checkpoint bytes'


def test_resolve_init_resume(tmp_path):
    last = tmp_path / 'last.pt'
    with pytest.raises(UserError) as e:
        common.resolve_init('resume', str(tmp_path), False)
    assert str(last) in str(e.value)
    last.write_bytes(b'x')
    assert common.resolve_init('resume', str(tmp_path), False) == str(last)


def test_resolve_init_auto(tmp_path):
    assert common.resolve_init('auto', str(tmp_path), False) is None
    (tmp_path / 'last.pt').write_bytes(b'x')
    assert common.resolve_init('auto', str(tmp_path), False) == str(tmp_path / 'last.pt')


@pytest.mark.parametrize('value', ['fresh', 'gpt2', ''])
def test_resolve_init_unknown(tmp_path, value):
    with pytest.raises(UserError) as e:
        common.resolve_init(value, str(tmp_path), False)
    assert repr(value) in str(e.value)


# -----------------------------------------------------------------------------
# RunDir
# -----------------------------------------------------------------------------

CONFIG = dict(batch_size=4, learning_rate=1e-3, out_dir='out/x')


def close(run):
    for f in (getattr(run, '_log', None), getattr(run, '_events', None)):
        if f is not None:
            f.close()


def read_events(out):
    return [json.loads(line) for line in (out / 'events.jsonl').read_text().splitlines()]


def read_csv(out):
    with open(out / 'scalars.csv', newline='') as f:
        return list(csv.reader(f))


def test_rundir_config_json(tmp_path):
    out = tmp_path / 'run'
    run = common.RunDir(str(out), CONFIG, device='cpu', world_size=1, hooks=['act_stats'])
    close(run)
    facts = json.loads((out / 'config.json').read_text())
    required = {'config', 'run_id', 'config_hash', 'git_commit', 'git_dirty', 'argv', 'python', 'torch', 'start_time',
                'resumed_from', 'changed'}
    assert required | {'device', 'world_size', 'hooks'} == set(facts)
    assert facts['config'] == CONFIG
    assert facts['run_id'] == run.run_id
    assert facts['config_hash'] == run.config_hash == common.config_hash(CONFIG)
    assert facts['argv'] == sys.argv
    assert facts['python'] == platform.python_version() and facts['torch'] == torch.__version__
    assert facts['device'] == 'cpu' and facts['world_size'] == 1 and facts['hooks'] == ['act_stats']
    assert facts['git_dirty'] in (True, False, None)
    assert not [p.name for p in out.iterdir() if '.tmp' in p.name]


def test_rundir_print_event_scalars(tmp_path, capsys):
    out = tmp_path / 'run'
    run = common.RunDir(str(out), CONFIG)
    run.print('hello', 3)
    run.event('start', iter=0, note='x')
    run.event('eval', iter=10, **{'val/loss': 1.25})
    run.scalars({'iter': 0, 'val/loss': 2.5})
    run.scalars({'iter': 10, 'val/loss': 0.1234567891})
    with pytest.raises(UserError) as e:
        run.scalars({'iter': 20, 'train/loss': 1.0})
    assert 'scalars.csv' in str(e.value)
    with pytest.raises(UserError):
        run.scalars({'val/loss': 1.0, 'iter': 20})  # same columns, another order: still a different header
    close(run)

    start = f"run {out} | new | config_hash {run.config_hash[:12]}\n"  # every run says where its files go
    assert capsys.readouterr().out == start + 'hello 3\n'
    assert (out / 'log.txt').read_text() == start + 'hello 3\n'
    events = read_events(out)
    assert [e['event'] for e in events] == ['start', 'eval']
    assert all(e['schema_version'] == 1 and e['run_id'] == run.run_id for e in events)
    assert events[0]['iter'] == 0 and events[0]['note'] == 'x' and events[1]['val/loss'] == 1.25
    assert read_csv(out) == [['iter', 'val/loss'], ['0', '2.5'], ['10', '0.123457']]


def test_rundir_resume_appends_and_fresh_start_truncates(tmp_path):
    out = tmp_path / 'run'
    first = common.RunDir(str(out), CONFIG)
    first.print('first')
    first.event('start', iter=0)
    first.scalars({'iter': 0, 'loss': 2.0})
    close(first)

    second = common.RunDir(str(out), CONFIG, resumed_from=str(out / 'last.pt'), changed={'batch_size': [2, 4]})
    with pytest.raises(UserError):
        second.scalars({'step': 5, 'loss': 1.0})  # the header comes from the existing file
    second.print('second')
    second.event('start', iter=5)
    second.scalars({'iter': 5, 'loss': 1.5})
    close(second)
    assert [(e['event'], e['iter'], e['run_id']) for e in read_events(out)] == [
        ('start', 0, first.run_id), ('start', 5, second.run_id)]
    assert read_csv(out) == [['iter', 'loss'], ['0', '2'], ['5', '1.5']]
    log = (out / 'log.txt').read_text().splitlines()
    assert log[1] == 'first' and log[3] == 'second' and len(log) == 4
    assert log[2] == f"run {out} | from {out / 'last.pt'} | changed: batch_size 2 -> 4 | config_hash " \
                     f"{second.config_hash[:12]}"
    facts = json.loads((out / 'config.json').read_text())
    assert facts['run_id'] == second.run_id and facts['changed'] == {'batch_size': [2, 4]}
    assert facts['resumed_from'] == str(out / 'last.pt')

    third = common.RunDir(str(out), CONFIG)
    assert not (out / 'scalars.csv').exists()
    third.event('start', iter=0)
    third.scalars({'step': 0, 'acc': 0.5})  # a fresh run fixes a new header
    close(third)
    assert [e['run_id'] for e in read_events(out)] == [third.run_id]
    assert read_csv(out) == [['step', 'acc'], ['0', '0.5']]
    assert (out / 'log.txt').read_text().startswith('run ') and len((out / 'log.txt').read_text().splitlines()) == 1


def test_rundir_non_master_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'rank1'
    run = common.RunDir(str(out), CONFIG, master=False, device='cpu')
    run.print('hidden')
    run.event('start', iter=0)
    run.scalars({'iter': 0, 'loss': 1.0})
    run.write_text('model.txt', 'x')
    assert not out.exists()
    assert capsys.readouterr().out == ''
    assert run.config_hash == common.config_hash(CONFIG)


def test_rundir_write_text(tmp_path):
    out = tmp_path / 'run'
    run = common.RunDir(str(out), CONFIG)
    run.write_text('samples.txt', 'a\n', mode='a')
    run.write_text('samples.txt', 'b\n', mode='a')
    close(run)
    assert (out / 'samples.txt').read_text() == 'a\nb\n'


# -----------------------------------------------------------------------------
# matmul_peak_flops
# -----------------------------------------------------------------------------

def test_matmul_peak_flops_cpu():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    flops = common.matmul_peak_flops('cpu', 64, 64, 64)
    assert isinstance(flops, float) and math.isfinite(flops) and flops > 0
    assert torch.equal(torch.rand(3), expected)  # measuring must not move the training RNG


@pytest.mark.parametrize('device', ['mps', 'meta', 'xla'])
def test_matmul_peak_flops_unknown_device(device):
    assert common.matmul_peak_flops(device, 64, 64, 64) is None


# -----------------------------------------------------------------------------
# declared values, --help, the keys given, and the resume rule
# -----------------------------------------------------------------------------

DECLARED = """\
from math import pi
from os import sep
arch = 'cnn'  # 'cnn' | 'rnn' (slower) | 'mlp'
device = 'auto'  # 'auto' | 'cpu' | 'cuda:N'
init_from = 'scratch'  # 'scratch' | 'resume' | a checkpoint path
dropout = 0.1  # on each branch, in [0, 1)
batch_size = 8  # betas (0.5, 0.9) in prose are not a range; this one is: [1, inf)
milestones = [10, 20]  # epochs, each in (0, inf)
alpha = 0.5  # weight of the first term,
#   the second gets 1 - alpha, [0, 1]
# a section title, not a continuation
stride = 0  # 0 = batch_size
config = configure(globals())
stride = stride or batch_size
"""


@pytest.fixture
def declared(tmp_path):
    script = tmp_path / 'declared.py'
    script.write_text(DECLARED)
    g = {'__name__': '__main__', '__file__': str(script), 'configure': lambda g: None}
    exec(compile(DECLARED.split('config =')[0], str(script), 'exec'), g)
    return g


@pytest.mark.parametrize('arg, message', [
    ('--arch=cnns', "command line: arch='cnns': expected one of 'cnn', 'rnn', 'mlp'; did you mean 'cnn'?"),
    ('--device=cuda:x', "device='cuda:x': expected one of 'auto', 'cpu', 'cuda:N'"),
    ('--dropout=1.0', "dropout=1.0: expected a value in [0, 1)"),
    ('--dropout=-0.1', "dropout=-0.1: expected a value in [0, 1)"),
    ('--batch_size=0', "batch_size=0: expected a value in [1, inf)"),
    ('--milestones=[10, 0]', "milestones=[10, 0]: expected a value in (0, inf)"),
    ('--alpha=1.5', "alpha=1.5: expected a value in [0, 1]"),  # declared on the comment's continuation line
])
def test_configure_refuses_values_outside_what_the_comment_declares(declared, arg, message):
    with pytest.raises(UserError) as e:
        common.configure(declared, [arg])
    assert message in str(e.value)


@pytest.mark.parametrize('arg, value', [('--device=cuda:1', 'cuda:1'), ('--init_from=out/a/best.pt', 'out/a/best.pt'),
                                        ('--dropout=0', 0.0), ('--alpha=1', 1.0), ('--batch_size=1', 1),
                                        ('--arch=rnn', 'rnn'), ('--stride=-3', -3)])
def test_configure_accepts_what_the_comment_declares(declared, arg, value):
    assert common.configure(declared, [arg])[arg[2:].split('=')[0]] == value


def test_configure_checks_values_from_config_files_too(declared, tmp_path):
    cfg = write_cfg(tmp_path, "dropout = 2.0\n")
    with pytest.raises(UserError, match=r"config file .*cfg.py: dropout=2.0: expected a value in \[0, 1\)"):
        common.configure(declared, [cfg])


def test_help_shows_own_keys_whole_comments_and_keys_reassigned_later(declared, capsys):
    with pytest.raises(SystemExit):
        common.configure(declared, ['--help'])
    out = capsys.readouterr().out
    keys = [line.split('=')[0].strip() for line in out.splitlines() if line.startswith('  --')]
    assert keys == ['--arch', '--device', '--init_from', '--dropout', '--batch_size', '--milestones', '--alpha',
                    '--stride']  # no imported constants (pi, sep)
    assert "# weight of the first term, the second gets 1 - alpha, [0, 1]" in out
    assert "section title" not in out and "# 0 = batch_size" in out


def test_configure_records_the_keys_given_and_where(declared, tmp_path):
    cfg = write_cfg(tmp_path, "batch_size = 8  # the default's value, given all the same\nfor _i in range(2):\n"
                              "    dropout = 0.2\n")
    common.configure(declared, [cfg, '--arch=rnn'])
    assert declared['_given'] == {'batch_size': f'config file {cfg}', 'dropout': f'config file {cfg}',
                                  'arch': 'command line'}


def resume_script(tmp_path, saved_args, **extra):
    """A script's globals after configure(), and a last.pt in its out_dir made with saved_args."""
    out = tmp_path / 'run'
    out.mkdir(exist_ok=True)
    model, opt = tiny_state(0)
    common.save_checkpoint(str(out / 'last.pt'), **dict(ckpt_fields(model, opt), args=saved_args))
    return dict(out_dir=str(out), init_from='resume', overwrite=False, lr=0.1, n_layer=2, seed=1, **extra)


def test_start_from_continues_the_saved_run_and_applies_only_the_keys_given(tmp_path):
    saved = dict(out_dir='elsewhere', init_from='scratch', overwrite=True, lr=0.5, n_layer=4, seed=7)
    config = resume_script(tmp_path, saved)
    g = dict(config, _given={'lr': 'command line', 'init_from': 'command line', 'out_dir': 'command line'})
    ckpt, path, changed = common.start_from(g, config, fixed=('n_layer', 'seed'))
    assert path == str(tmp_path / 'run' / 'last.pt') and ckpt['args'] == saved
    assert config == dict(out_dir=str(tmp_path / 'run'), init_from='resume', overwrite=False, lr=0.1, n_layer=4,
                          seed=7)  # this command's out_dir/init_from/overwrite, the run's architecture and seed
    assert changed == {'lr': [0.5, 0.1]} and g['n_layer'] == 4 and g['lr'] == 0.1


def test_start_from_refuses_a_given_fixed_key_that_contradicts_the_checkpoint(tmp_path):
    config = resume_script(tmp_path, dict(lr=0.1, n_layer=4, seed=1))
    g = dict(config, _given={'n_layer': 'command line', 'seed': 'command line'})
    with pytest.raises(UserError) as e:
        common.start_from(g, config, fixed=('n_layer', 'seed'))
    assert "n_layer=2 (the checkpoint's: 4)" in str(e.value) and 'seed' not in str(e.value).split(':')[1]
    assert config['n_layer'] == 2  # nothing was applied


def test_start_from_without_a_checkpoint_changes_nothing(tmp_path):
    config = dict(out_dir=str(tmp_path / 'new'), init_from='auto', overwrite=False, lr=0.1)
    assert common.start_from(dict(config), config) == (None, None, {}) and config['lr'] == 0.1


def test_load_optimizer_state_keeps_the_moments_and_the_built_hyperparameters():
    model, opt = tiny_state(0)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.5, betas=(0.8, 0.9))
    common.load_optimizer_state(fresh, opt.state_dict())
    group = fresh.param_groups[0]
    assert (group['lr'], group['weight_decay'], group['betas']) == (0.01, 0.5, (0.8, 0.9))
    for p in model.parameters():
        assert torch.equal(fresh.state[p]['exp_avg'], opt.state[p]['exp_avg'])
    plain = torch.optim.AdamW(model.parameters(), lr=0.01)
    plain.load_state_dict(opt.state_dict())
    assert plain.param_groups[0]['lr'] == 0.1  # what torch alone does: the saved learning rate wins


def test_compile_model_falls_back_to_eager_when_compilation_fails():
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")
    model = torch.nn.Linear(3, 2)
    assert common.compile_model(model, False) is model
    compiled = common.compile_model(model, True, backend=failing_backend)
    x = torch.randn(4, 3)
    assert torch.equal(compiled(x), model(x))


# -----------------------------------------------------------------------------
# stop signals, finished runs, log lines, progress, MFU
# -----------------------------------------------------------------------------

def test_stop_signals_arm_then_set_a_reason_and_a_second_ctrl_c_aborts():
    import signal
    import time
    with pytest.raises(SystemExit) as e:  # unarmed: nothing to save, stop now
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert e.value.code == 128 + signal.SIGTERM
    common.STOP.armed = True  # what RunDir() does
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert common.STOP.reason == 'signal' and common.step_check(False, torch.tensor(1.5)) == ([1.5], 'signal')
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert common.STOP.reason == 'interrupted'  # Ctrl-C wins over an earlier SIGTERM: the exit code says 130
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_run_finished_and_read_events(tmp_path):
    def ev(name, **kw):
        return dict(event=name, **kw)
    done = [ev('start'), ev('eval'), ev('end', reason='done', best=1)]
    assert common.run_finished(done) == done[-1]
    assert common.run_finished(done + [ev('start', eval_only=True), ev('end', reason='eval_only')]) == done[-1]
    assert common.run_finished(done + [ev('start')]) is None  # resumed again: running or stopped
    assert common.run_finished([ev('start'), ev('end', reason='interrupted')]) is None
    assert common.run_finished([]) is None
    (tmp_path / 'events.jsonl').write_text('{"event": "start"}\n\n{"event": "end", "reason": "done"}\nnot json\n')
    with pytest.raises(UserError, match=r"events.jsonl, line 4: not a JSON object"):
        common.read_events(str(tmp_path))
    assert common.read_events(str(tmp_path / 'none')) == []


@pytest.mark.parametrize('value, spec, text', [(None, '.4f', '-'), (float('nan'), '.4f', '-'), (0.5, '.1%', '50.0%'),
                                               (1.23456, '.4f', '1.2346'), (3, 'd', '3')])
def test_fmt_prints_a_missing_value_as_a_dash(value, spec, text):
    assert common.fmt(value, spec) == text


def test_hms_fields_and_clock(monkeypatch):
    assert [common.hms(s) for s in (None, 5.25, 65, 3 * 3600 + 120)] == ['-', '5.2s', '1m05s', '3h02m']
    assert common.fields({'train/loss': 1.5, 'val/loss': None, 'val/active_dims': 3}) == \
        'train/loss 1.5000 | val/loss - | val/active_dims 3'
    now = [100.0]
    monkeypatch.setattr(common.time, 'time', lambda: now[0])
    clock = common.Clock(done=20, total=120)  # a run resumed at step 20 of 120
    assert clock(20) == 'elapsed 0.0s | eta -'
    now[0] = 110.0
    assert clock(30) == 'elapsed 10.0s | eta 1m30s'  # 10 steps in 10 s, 90 to go


def test_progress_reports_done_total_rate_and_a_last_line(monkeypatch):
    now, lines = [0.0], []
    monkeypatch.setattr(common.time, 'time', lambda: now[0])

    def items():
        for i in range(10):
            now[0] += 1.0  # one second per chunk of 100
            yield i
    assert list(common.progress(items(), 'sprites', total=1000, chunk=100, log=lines.append, every=4.0)) == \
        list(range(10))
    assert lines == ['sprites: 400/1,000 | 100.0/s | eta 6.0s', 'sprites: 800/1,000 | 100.0/s | eta 2.0s',
                     'sprites: 1,000/1,000 | 10.0s']
    lines.clear()
    list(common.progress(iter(range(3)), 'rows', log=lines.append))
    assert lines == ['rows: 3 | 0.0s']


def test_mfu_above_100_percent_measures_the_peak_again(monkeypatch):
    peaks, lines = iter([1e9, 5e9]), []
    monkeypatch.setattr(common, 'matmul_peak_flops', lambda *a: next(peaks))
    mfu = common.MFU('cpu', flops_per_step=2e9, matmul_shape=(8, 8, 8), log=lines.append)
    assert 'mfu: against 1.0 GFLOP/s' in lines[0]
    assert mfu(1.0) == pytest.approx(2e9 / 5e9)  # 2 GFLOP/s beat the busy start-up figure: measured again
    assert 'peak measured again: 5.0 GFLOP/s (was 1.0' in lines[1] and mfu(4.0) == pytest.approx(0.1)


def test_progress_without_its_last_line(monkeypatch):
    lines = []
    list(common.progress(iter(range(3)), 'clips', total=3, log=lines.append, last=False))
    assert lines == []
