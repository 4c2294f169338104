"""
Plumbing shared by every train_*.py: the configurator, device/seed, the run directory (facts), checkpoints,
DDP and pre-emption signals. Nothing here is a research knob: optimizers, schedules, data and eval loops live
in the scripts, where a forker edits them.
"""
import ast
import contextlib
import csv
import datetime
import difflib
import functools
import hashlib
import io
import json
import os
import pickle
import platform
import random
import re
import signal
import subprocess
import sys
import time
import tokenize
import uuid

import numpy as np
import torch
import torch.distributed as dist

SCHEMA_VERSION = 1
# keys that only say where/how often to write; they never change a result, so they stay out of config_hash
HASH_EXCLUDED_KEYS = {'out_dir', 'init_from', 'overwrite', 'log_interval', 'eval_interval', 'eval_only', 'num_workers',
                      'cache_dir'}  # where things go and how fast, never what a run computes
CONFIG_TYPES = (bool, int, float, str, type(None), list, tuple, dict)


class UserError(Exception):
    """Bad input (config, data, checkpoint): printed as one line, no traceback, exit code 2."""


def _excepthook(kind, value, tb, _default=sys.excepthook):
    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr)
        sys.exit(2)  # excepthook exit: the interpreter still runs atexit handlers
    _default(kind, value, tb)


# -----------------------------------------------------------------------------
# configurator: defaults are the script's globals; config files, then --key=value, override them
# -----------------------------------------------------------------------------

def _key_comments(path):
    """Map each top-level `key = value  # comment` of a script to its comment (for --help)."""
    with open(path) as f:
        source = f.read()
    comments = {tok.start[0]: tok.string.lstrip('# ') for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    return {node.targets[0].id: comments.get(node.lineno, '') for node in ast.parse(source).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def _check_type(key, value, default, source):
    """int is accepted for a float default, anything for a None default; otherwise the type must match."""
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    raise UserError(f"{source}: {key}={value!r} is a {type(value).__name__}, expected {type(default).__name__} "
                    f"(default {default!r})")


def _unknown(key, known, source):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"{source}: unknown config key '{key}'{hint} (see --help for every key)")


def configure(g, argv=None):
    """Apply config files (positional args, executed as Python in the script's globals g) and then --key=value
    overrides to the script's default globals; return the final config as a JSON-able dict."""
    sys.excepthook = _excepthook
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: v for k, v in g.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)}
    if '--help' in argv or '-h' in argv:
        comments = _key_comments(g['__file__']) if g.get('__file__') else {}
        print(f"usage: python {os.path.basename(g.get('__file__', 'script.py'))} [config.py ...] [--key=value ...]\n")
        for k, v in defaults.items():
            print(f"  --{k}={v!r}".ljust(40) + f" # {comments.get(k, '')}")
        sys.exit(0)
    # config files first, then --key=value, each in the order given: the command line always has the last word
    for arg in sorted(argv, key=lambda a: a.startswith('--')):
        if not arg.startswith('--'):  # a config file: plain Python run in the script's globals
            if not os.path.isfile(arg):
                raise UserError(f"config file not found: {arg} (expected a path to a .py file of key = value lines)")
            before = dict(g)
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), g)
            for k, v in list(g.items()):
                if k.startswith('_') or not isinstance(v, CONFIG_TYPES) or (k in before and before[k] is v):
                    continue
                if k not in defaults:
                    raise _unknown(k, defaults, f"config file {arg}")
                g[k] = _check_type(k, v, defaults[k], f"config file {arg}")
        else:
            if '=' not in arg:
                raise UserError(f"command line: '{arg}' is not of the form --key=value")
            key, text = arg[2:].split('=', 1)  # '--start=a=b' keeps 'a=b'
            if key not in defaults:
                raise _unknown(key, defaults, "command line")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # not a Python literal: a plain string, e.g. --device=cpu
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = text  # a string key takes the text as typed, e.g. --start=123
            g[key] = _check_type(key, value, defaults[key], "command line")
    return {k: g[k] for k in defaults}


def config_hash(config):
    """sha256 of the canonical JSON of every key that can change a result."""
    kept = {k: v for k, v in config.items() if k not in HASH_EXCLUDED_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


# -----------------------------------------------------------------------------
# device, precision, seeds, distributed
# -----------------------------------------------------------------------------

def pick_device(device):
    """'auto': cuda, then mps, then cpu; under SLURM cuda only if the job was given GPUs."""
    if device == 'auto':
        slurm_without_gpu = 'SLURM_JOB_ID' in os.environ and not os.environ.get('CUDA_VISIBLE_DEVICES')
        if torch.cuda.is_available() and not slurm_without_gpu:
            return 'cuda'
        if torch.backends.mps.is_available():
            return 'mps'
        return 'cpu'
    if device.startswith('cuda'):
        match = re.fullmatch(r'cuda(?::(\d+))?', device)
        if not match:
            raise UserError(f"device={device!r}: expected 'cuda' or 'cuda:N'")
        index = int(match.group(1) or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise UserError(f"device={device!r} requested but {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    if device == 'mps' and not torch.backends.mps.is_available():
        raise UserError("device='mps' requested but MPS is not available on this machine")
    if device not in ('cpu', 'mps'):
        raise UserError(f"device={device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def autocast_context(device, dtype):
    """Returns (resolved dtype name, context manager). 'auto' = bf16 autocast on CUDA where supported, else fp32."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
    if dtype == 'float32':
        return dtype, contextlib.nullcontext()
    if dtype == 'bfloat16' and device.startswith('cuda'):
        return dtype, torch.autocast('cuda', dtype=torch.bfloat16)
    raise UserError(f"dtype={dtype!r} on device {device!r}: expected 'auto', 'float32', or 'bfloat16' on CUDA")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(device):
    """Under torchrun (RANK set): join the process group (nccl on CUDA, gloo on CPU) and pick this rank's device.
    Returns (ddp, rank, world_size, device)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1, pick_device(device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    device = pick_device(device)
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return True, rank, world_size, device


def finish_distributed(ddp):
    """Leave the process group together: a rank that tears gloo down while another is still busy (rank 0 running the
    test) can abort at exit, so every rank waits at a barrier first."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def all_ranks_any(flag, ddp, device):
    """True on every rank if `flag` is true on any rank (so all ranks stop at the same iteration)."""
    if not ddp:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopSignal:
    """SIGTERM/SIGUSR1 (SLURM pre-emption, scancel) set `requested`; the loop saves last.pt and exits 0."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, getattr(signal, 'SIGUSR1', None)):
            if sig is not None:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def matmul_peak_flops(device, m=4096, k=256, n=1024):
    """FLOP/s to compute MFU against: the datasheet dense peak on known GPUs (bf16), else the measured median of
    an fp32 (m,k)@(k,n) matmul on this device (CPU: the honest peak of this machine, not an A100's)."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        for key, peak in (('H200', 989e12), ('H100', 989e12), ('A100', 312e12), ('L40', 181e12), ('A10', 125e12)):
            if key in name:
                return peak
        return None
    if device != 'cpu':
        return None
    g = torch.Generator().manual_seed(0)  # its own generator: measuring must not move the training RNG
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    t_end = time.perf_counter() + 0.5
    while time.perf_counter() < t_end:  # CPUs reach full speed only after ~0.1-0.3 s of work (clocks, thread pool)
        a @ b
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / sorted(times)[len(times) // 2]


# -----------------------------------------------------------------------------
# run directory: config.json, log.txt, events.jsonl, scalars.csv (training emits facts, report.py reads them)
# -----------------------------------------------------------------------------

def _git(*args):
    try:
        out = subprocess.run(['git', *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


@functools.lru_cache(maxsize=1)
def git_commit():
    return _git('rev-parse', 'HEAD')


class RunDir:
    """Writes the run directory on rank 0; on other ranks every method is a no-op (printing included)."""

    def __init__(self, out_dir, config, resume, master=True, **provenance):
        self.out_dir, self.master, self.start = out_dir, master, time.time()
        self.run_id = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-') + uuid.uuid4().hex[:6]
        self.config_hash = config_hash(config)
        if not master:
            return
        os.makedirs(out_dir, exist_ok=True)
        mode = 'a' if resume else 'w'  # a resumed run appends to its own history
        self._log = open(os.path.join(out_dir, 'log.txt'), mode)
        self._events = open(os.path.join(out_dir, 'events.jsonl'), mode)
        scalars = os.path.join(out_dir, 'scalars.csv')
        if not resume and os.path.exists(scalars):
            os.remove(scalars)
        self._scalar_columns = None
        if os.path.exists(scalars):
            with open(scalars) as f:
                self._scalar_columns = next(csv.reader(f), None)
        status = _git('status', '--porcelain')
        facts = dict(config=config, run_id=self.run_id, config_hash=self.config_hash, git_commit=git_commit(),
                     git_dirty=bool(status) if status is not None else None, argv=sys.argv,
                     python=platform.python_version(), torch=torch.__version__,
                     start_time=datetime.datetime.now().isoformat(timespec='seconds'), **provenance)
        write_atomic(os.path.join(out_dir, 'config.json'), json.dumps(facts, indent=2).encode())

    def print(self, *args):
        if self.master:
            line = ' '.join(str(a) for a in args)
            print(line, flush=True)
            self._log.write(line + '\n')
            self._log.flush()

    def event(self, name, **fields):
        if self.master:
            record = dict(schema_version=SCHEMA_VERSION, event=name, run_id=self.run_id,
                          time_s=round(time.time() - self.start, 3), **fields)
            self._events.write(json.dumps(record) + '\n')
            self._events.flush()

    def scalars(self, row):
        """Append one evaluation row; the header is fixed by the first row ever written to this file."""
        if not self.master:
            return
        path = os.path.join(self.out_dir, 'scalars.csv')
        if self._scalar_columns is None:
            self._scalar_columns = list(row)
            with open(path, 'w', newline='') as f:
                csv.writer(f).writerow(self._scalar_columns)
        if list(row) != self._scalar_columns:
            raise UserError(f"{path}: columns {list(row)} differ from the file's header {self._scalar_columns}")
        with open(path, 'a', newline='') as f:
            csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.values()])

    def write_text(self, name, text, mode='w'):
        if self.master:
            with open(os.path.join(self.out_dir, name), mode) as f:
                f.write(text)


# -----------------------------------------------------------------------------
# checkpoints: atomic save, weights_only load, exact RNG state
# -----------------------------------------------------------------------------

def write_atomic(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the old file's place
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def rng_state():
    """Python, numpy and torch (and CUDA) RNG states, as tensors and plain types so weights_only can load them."""
    np_state = np.random.get_state()
    state = dict(python=random.getstate(), numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                   *np_state[2:]], torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def rng_states_all_ranks(ddp):
    """One rng_state() per rank (a collective under DDP), so every rank's dropout stream resumes exactly."""
    if not ddp:
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state):
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(path, **fields):
    """torch.save to a temporary file beside `path`, then os.replace: a kill mid-save never loses the old one."""
    buffer = io.BytesIO()
    torch.save(dict(schema_version=SCHEMA_VERSION, git_commit=git_commit(), **fields), buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path, required=('model_state_dict', 'model_args', 'args')):
    """Load with weights_only=True (a checkpoint can never run code); a bad file is one clear error."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:  # torch's own message advises weights_only=False: never for a file you got
        raise UserError(f"{path} is not a readable checkpoint of this project: not a torch.save file of tensors and "
                        f"plain types (other Python objects are refused: loading them could run code)") from None
    except Exception as e:  # truncated zip, random bytes: all the same to a user
        reason = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{path} is not a readable checkpoint of this project ({type(e).__name__}: {reason})") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this project: missing {missing}")
    return ckpt


def resolve_init(init_from, out_dir, overwrite):
    """'scratch' | 'resume' | 'auto' | a checkpoint path (e.g. 'best.pt', looked up in out_dir too)
    -> None (start fresh) or the checkpoint path to start from."""
    last = os.path.join(out_dir, 'last.pt')
    if init_from.endswith('.pt'):
        path = init_from if os.path.exists(init_from) else os.path.join(out_dir, init_from)
        if not os.path.exists(path):
            raise UserError(f"init_from={init_from!r}: no such checkpoint (looked in . and in {out_dir})")
        return path
    if init_from == 'auto' and os.path.exists(last):
        return last
    if init_from == 'resume':
        if not os.path.exists(last):
            raise UserError(f"init_from='resume' but {last} does not exist (use init_from='scratch' or 'auto')")
        return last
    if init_from in ('scratch', 'auto'):
        held = [f for f in ('last.pt', 'best.pt') if os.path.exists(os.path.join(out_dir, f))]
        if held and not overwrite:
            raise UserError(f"out_dir {out_dir} already holds {', '.join(held)}: refusing to start from scratch over "
                            f"it; use --init_from=resume or auto, another --out_dir, or --overwrite=True")
        return None
    raise UserError(f"init_from={init_from!r}: expected 'scratch', 'resume', 'auto' or a path to a .pt file")
