"""
Plumbing shared by every train_*.py: stop signals, the configurator and the resume rule, device/seed, DDP, the
run directory (facts, log lines, progress), checkpoints. Nothing here is a research knob: optimizers, schedules,
data and eval loops live in the scripts, where a forker edits them.
"""
import ast
import atexit
import contextlib
import csv
import datetime
import difflib
import errno
import fcntl
import fnmatch
import functools
import hashlib
import io
import json
import math
import os
import pickle
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tokenize
import traceback
import uuid


class UserError(Exception):
    """Bad input (config, data, checkpoint): printed as one line, no traceback, exit code 2."""


# -----------------------------------------------------------------------------
# stop signals: installed when this module is imported, before numpy and torch load (~1.5 s), so no moment of a
# script's start-up is unguarded; the scripts import common first for that reason
# -----------------------------------------------------------------------------

def requeue_job(job):
    """`scontrol requeue` this SLURM job, as PyTorch Lightning's auto-requeue does: SLURM sends the warning signal
    that the job asked for (sbatch --signal=B:USR1@90) before its time limit, and requeues nothing by itself. The
    requeued job runs the same command again, which continues from last.pt if it says --init_from=auto."""
    try:
        out = subprocess.run(['scontrol', 'requeue', job], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return f"requeued SLURM job {job}: it continues from last.pt when it starts again (--init_from=auto)"
        why = (out.stderr or out.stdout).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    return f"could not requeue SLURM job {job} ({why}); continue: sbatch the same command again (--init_from=auto)"


class StopSignal:
    """Ctrl-C (SIGINT), SIGTERM and SIGUSR1 (SLURM pre-emption, scancel). Until a run directory is written
    (`armed`), they stop the process at once: nothing has been written, nothing is lost (Ctrl-C exits 130, the others
    128 + the signal number). Once armed, they only set `reason` ('interrupted' for Ctrl-C, else 'signal'): the loop
    finishes its step, saves last.pt, writes the end event and exits. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.reason, self.armed, self.signals = None, False, []  # signals: the names of those received once armed
        self.importing = True  # while this module loads numpy and torch (below)
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, 'SIGUSR1', None)):
            if sig is not None:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        ctrl_c = signum == signal.SIGINT
        if not self.armed or (ctrl_c and self.reason == 'interrupted'):
            job = os.environ.get('SLURM_JOB_ID') if signum == getattr(signal, 'SIGUSR1', None) else None
            code = 0 if job else 130 if ctrl_c else 128 + signum
            if self.importing:  # an exception unwinding through torch's C++ import code aborts the process (core)
                print("interrupted (Ctrl-C)" if ctrl_c else f"stopped by {signal.Signals(signum).name}", "before a "
                      "run directory was written (loading torch): nothing to save" + (f"; {requeue_job(job)}" if job
                                                                                     else ''), file=sys.stderr)
                os._exit(code)  # nothing is open or written yet
            if ctrl_c:
                raise KeyboardInterrupt  # the excepthook below turns it into one line and exit code 130
            print(f"stopped by {signal.Signals(signum).name} before a run directory was written: nothing to save"
                  + (f"; {requeue_job(job)}" if job else ''), file=sys.stderr, flush=True)
            raise SystemExit(code)
        self.reason = 'interrupted' if ctrl_c else self.reason or 'signal'
        self.signals.append(signal.Signals(signum).name)


def _excepthook(kind, value, tb, _default=sys.excepthook):
    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr)
        if 'torch.distributed' in sys.modules and dist.is_initialized():  # left standing, gloo aborts the exit
            dist.destroy_process_group()
        sys.exit(2)  # excepthook exit: the interpreter still runs atexit handlers
    if issubclass(kind, BrokenPipeError):  # `python train_slm.py --help | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        sys.exit(0)
    if issubclass(kind, OSError) and (value.filename or value.errno in DISK_ERRORS):  # full, read-only, ...
        where = f"{value.filename}: " if value.filename else ''
        with contextlib.suppress(Exception):  # the error event, where the disk still takes it
            _RUN[0].event('error', message=f"{where}{value.strerror}")
        print(f"error: {where}{value.strerror or value}" + ("; stopped, the last checkpoint is kept as it was"
                                                           if _RUN else ''), file=sys.stderr)
        sys.exit(2)
    if issubclass(kind, KeyboardInterrupt):
        print("aborted by a second Ctrl-C: the run directory keeps what it saved last" if STOP.armed else
              "interrupted (Ctrl-C) before a run directory was written: nothing to save", file=sys.stderr)
        sys.exit(130)
    _default(kind, value, tb)


DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.EIO}
_RUN = []  # the RunDir of this process, once there is one: an OSError still writes its error event
sys.excepthook = _excepthook
STOP = StopSignal()

import numpy as np  # noqa: E402  (after the stop signals, see above)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

STOP.importing = False

SCHEMA_VERSION = 1
# keys that only say where/how often to write; they never change a result, so they stay out of config_hash
HASH_EXCLUDED_KEYS = {'out_dir', 'init_from', 'overwrite', 'log_interval', 'eval_interval', 'eval_only', 'num_workers',
                      'cache_dir', 'deterministic'}  # where things go and how, never what a run computes
INVOCATION_KEYS = ('out_dir', 'init_from', 'overwrite', 'eval_only')  # on resume: this command's, not the saved run's
RENAMED_KEYS = {'model': 'arch', 'optimizer': 'opt'}  # old key -> its name now (train_audio/kd.py, train_spoter.py)
CONFIG_TYPES = (bool, int, float, str, type(None), list, tuple, dict)


# -----------------------------------------------------------------------------
# configurator: defaults are the script's globals; config files, then --key=value, override them
# -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def declared_keys(path):
    """{key: comment} of a script's own defaults: the top-level `key = value  # comment` lines above its configure()
    call (the first assignment of each key). A comment goes on over the comment-only lines right below it that are
    indented after the '#' (a section title such as '# data' is not)."""
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip('#').strip() for tok in
                tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body
    end = next((node.lineno for node in body if any(isinstance(n, ast.Call) and getattr(n.func, 'id', '') ==
                                                     'configure' for n in ast.walk(node))), len(lines) + 1)
    keys = {}
    for node in body:
        if node.lineno >= end or not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
            continue
        text, n = comments.get(node.end_lineno, comments.get(node.lineno, '')), node.end_lineno
        while n < len(lines) and re.match(r'\s*#\s{2,}\S', lines[n]):  # an indented continuation line
            text, n = f"{text} {comments[n + 1]}", n + 1
        keys.setdefault(node.targets[0].id, text)
    return keys


def _choices(comment):
    """The values a comment that starts with a closed list of quoted values declares ("'crnn' | 'tinycnn'", each
    maybe followed by a (note); ':N' in a value stands for digits, as in 'cuda:N'), else None."""
    values, pos = [], 0
    while (item := re.compile(r"\s*'([^']*)'(?:\s*\([^()]*\))?").match(comment, pos)):
        values.append(item[1])
        bar = re.compile(r"\s*\|").match(comment, item.end())
        if not bar:
            return values if len(values) > 1 else None
        pos = bar.end()
    return None  # no values, or an open list ('scratch' | 'resume' | a checkpoint path)


_RANGE = re.compile(r"([\[(])(-?(?:inf|\d[\d._e+-]*)), (-?(?:inf|\d[\d._e+-]*))([\])])\s*$")  # ends: [1, inf)


def check_value(key, value, comment, source):
    """The choices (see _choices) or the range that a key's comment declares: it ends with an interval such as
    [1, inf), (0, 1] or [0, 1)."""
    choices = _choices(comment)
    if choices and isinstance(value, str) and not any(re.fullmatch(re.escape(c).replace(':N', r':\d+'), value)
                                                      for c in choices):
        close = difflib.get_close_matches(value, choices, n=1)
        raise UserError(f"{source}: {key}={value!r}: expected one of {', '.join(map(repr, choices))}"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    interval = _RANGE.search(comment)
    for v in (value if isinstance(value, (list, tuple)) else [value]) if interval else []:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi = float(interval[2]), float(interval[3])
            if not ((lo < v if interval[1] == '(' else lo <= v) and (v < hi if interval[4] == ')' else v <= hi)):
                raise UserError(f"{source}: {key}={value!r}: expected a value in {interval[0]}")


def _check_declared(g, config, given, fallback):
    """check_value() for every key of config, against the comments of the script whose globals g are; the source
    named in an error is where the value was given, else `fallback`."""
    comments = declared_keys(os.path.abspath(g['__file__'])) if g.get('__file__') else {}
    for k, v in config.items():
        check_value(k, v, comments.get(k, ''), given.get(k, fallback))


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
    hint = (f" (renamed '{RENAMED_KEYS[key]}')" if RENAMED_KEYS.get(key) in known else
            f"; did you mean '{close[0]}'?" if close else "")
    return UserError(f"{source}: unknown config key '{key}'{hint} (see --help for every key)")


def _assigned(source):
    """Names a config file assigns at its top level (in loops and ifs too, not inside functions or comprehensions)."""
    names, todo = set(), list(ast.parse(source).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp,
                                   ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            todo.extend(ast.iter_child_nodes(node))
    return names


def configure(g, argv=None, usage=None):
    """Apply config files (positional args, executed as Python in the script's globals g) and then --key=value
    overrides to the script's defaults; check every value against the choices or range its comment declares; return
    the final config as a JSON-able dict. The keys given (and where) are kept in g['_given'] for start_from()."""
    argv = sys.argv[1:] if argv is None else argv
    path = g.get('__file__')
    comments = declared_keys(os.path.abspath(path)) if path else {}
    defaults = {k: g[k] for k in (comments or g) if not k.startswith('_') and isinstance(g.get(k), CONFIG_TYPES)}
    if '--help' in argv or '-h' in argv:
        print(f"usage: python {usage or os.path.basename(path) + ' [config.py ...] [--key=value ...]'}\n")
        for k, v in defaults.items():
            print(textwrap.fill(comments.get(k, ''), 118, initial_indent=f"  --{k}={v!r}".ljust(40) + ' # ',
                                subsequent_indent=' ' * 43) if comments.get(k) else f"  --{k}={v!r}".ljust(40) + ' #')
        sys.exit(0)
    given = {}
    # config files first, then --key=value, each in the order given: the command line always has the last word
    for arg in sorted(argv, key=lambda a: a.startswith('--')):
        if not arg.startswith('--'):  # a config file: plain Python run in the script's globals
            if not os.path.isfile(arg):
                raise UserError(f"config file {'is a directory' if os.path.isdir(arg) else 'not found'}: {arg} "
                                f"(expected a path to a .py file of key = value lines)")
            try:
                with open(arg, encoding='utf-8') as f:
                    source = f.read()
                code, assigned = compile(source, arg, 'exec'), _assigned(source)
            except (SyntaxError, UnicodeDecodeError) as e:
                where = f"line {e.lineno}: {e.msg}" if isinstance(e, SyntaxError) else f"not UTF-8 text ({e.reason})"
                raise UserError(f"config file {arg}, {where}") from None
            before = dict(g)
            try:
                exec(code, g)
            except Exception as e:  # the config's own code failed: name its line, not configure()'s
                line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__))
                             if fr.filename == arg), '?')
                raise UserError(f"config file {arg}, line {line}: {type(e).__name__}: {e}") from None
            for k, v in list(g.items()):
                if k.startswith('_') or not isinstance(v, CONFIG_TYPES) or (k in before and before[k] is v and
                                                                            k not in assigned):
                    continue
                if k not in defaults:
                    raise _unknown(k, defaults, f"config file {arg}")
                g[k], given[k] = _check_type(k, v, defaults[k], f"config file {arg}"), f"config file {arg}"
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
            g[key], given[key] = _check_type(key, value, defaults[key], "command line"), "command line"
    config = {k: g[k] for k in defaults}
    _check_declared(g, config, given, f"the default of {os.path.basename(path or '')}")
    g['_given'] = given
    return config


def config_hash(config):
    """sha256 of the canonical JSON of every key that can change a result."""
    kept = {k: v for k, v in config.items() if k not in HASH_EXCLUDED_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def start_from(g, config, fixed=()):
    """Resolve init_from and load the checkpoint to start from. With one, the run continues as it was: its saved
    config is the base, and only the keys given now (command line, config files) change it. A `fixed` key
    (architecture, data, seed) given with another value than the checkpoint's is an error; any other changed key
    is applied. Updates config and the script's globals g in place; returns (checkpoint or None, its path,
    {key: [saved value, new value]} for the keys changed)."""
    if int(os.environ.get('RANK', 0)) == 0:  # rank 0 writes the run directory, so it holds the lock
        lock_run_dir(config['out_dir'])  # first: deciding to resume reads the directory another run may be writing
    path = resolve_init(config['init_from'], config['out_dir'], config.get('overwrite'), config.get('eval_only'))
    if path is None:
        return None, None, {}
    ckpt, given = load_checkpoint(path), g.get('_given', {})
    saved = {RENAMED_KEYS.get(k, k): v for k, v in ckpt['args'].items()}  # a run saved before a key was renamed
    script = os.path.basename(g.get('__file__') or sys.argv[0])
    foreign = sorted(set(saved) - set(config))
    if foreign:
        raise UserError(f"{path} was written by {ckpt.get('script') or 'another script'}, not {script}: its config "
                        f"has keys {script} does not know: {', '.join(foreign[:4])}" + (', ...' if foreign[4:] else ''))
    clash = [f"{k}={config[k]!r} (the checkpoint's: {saved[k]!r})" for k in fixed
             if k in given and k in saved and config[k] != saved[k]]
    if clash:
        raise UserError(f"{path}: {', '.join(clash)}: a run keeps its architecture, data and seed when it continues; "
                        f"drop {'this' if len(clash) == 1 else 'these'} or start a new run (another --out_dir)")
    changed = {}
    for k in config:
        if k in INVOCATION_KEYS or k not in saved:
            continue
        if k not in given:
            config[k] = g[k] = saved[k]
        elif config[k] != saved[k]:
            changed[k] = [saved[k], config[k]]
    _check_declared(g, config, given, path)  # the saved values too: a key's declared range may be newer than the run
    return ckpt, path, changed


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
    """Returns (resolved dtype name, context manager). 'auto' = bf16 autocast on CUDA GPUs that compute in bf16
    natively (Ampere and later), else fp32: a V100 or T4 only emulates bf16, slower than fp32."""
    if dtype == 'auto':
        native = device.startswith('cuda') and torch.cuda.is_bf16_supported(including_emulation=False)
        dtype = 'bfloat16' if native else 'float32'
    if dtype == 'float32':
        return dtype, contextlib.nullcontext()
    if dtype == 'bfloat16' and device.startswith('cuda'):
        return dtype, torch.autocast('cuda', dtype=torch.bfloat16)
    raise UserError(f"dtype={dtype!r} on device {device!r}: expected 'auto', 'float32', or 'bfloat16' on CUDA")


def set_kernels(deterministic):
    """The config key `deterministic`. False (the default): TF32 matmuls and convolutions on Ampere+ GPUs (about
    3 significant digits per product, much faster) and cuDNN's own kernel choice. True: TF32 off, torch's
    deterministic algorithms (an op without one stops with torch's error naming it), so a CUDA run repeats and
    resumes bit for bit on the same GPU and software. The CPU kernels are deterministic either way.
    Always, on x86 and ARM CPUs: subnormal floats (below 1.2e-38) are flushed to zero. A long run leaves a share of
    its Adam moments there (train_vae.py's default run: 21% by epoch 30), where each operation on them takes the
    CPU's slow path (bench.py subnormal); flushing changes a value only where it was already below 1.2e-38."""
    torch.set_flush_denormal(True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS repeats its sums only with this set


def compile_model(model, enabled, backend='inductor'):
    """torch.compile when asked (opt-in). Where compilation fails, the model runs eagerly instead of stopping the
    run (dynamo's suppress_errors: a warning, then the plain module's code)."""
    if not enabled:
        return model
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model, backend=backend)


def workers_import_only_modules():
    """Call before a DataLoader with workers. Workers started by spawn or forkserver (macOS; Linux from Python
    3.14) first re-run the main script, and ours are flat module code: each worker would start a training run of
    its own. With __main__ marked as having no file (as in an interactive session) they import only the modules
    of what they unpickle: data.py's dataset. Under fork (Linux up to 3.13) nothing changes."""
    main = sys.modules['__main__']
    main.__spec__ = main.__file__ = None  # __spec__: run as python -m, workers would re-import it by name


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_device(local_rank, local_world, visible, torchrun):
    """The CUDA device of one rank: cuda:LOCAL_RANK where every rank of the node sees its GPUs (torchrun
    --nproc_per_node), cuda:0 where a launcher gave each process one GPU of its own (srun --gpus-per-task=1 binds
    one per task; torchrun's ranks share one environment, so never there), else an error naming the counts (two
    ranks on one GPU fail in nccl)."""
    if visible >= local_world:
        return f'cuda:{local_rank}'
    if visible == 1 and not torchrun:
        return 'cuda:0'
    raise UserError(f"{local_world} processes on this node but {visible} GPU(s) visible to them: start one process "
                    f"per GPU (torchrun --nproc_per_node={visible}), or one task per GPU (srun --gpus-per-task=1)")


DATA_WAIT = datetime.timedelta(days=1)  # how long ranks wait for rank 0's data preparation (rank0_first)
_WAIT_GROUP = []  # the gloo group rank0_first waits on, made by init_distributed


def init_distributed(device, timeout=None):
    """Under torchrun (RANK set): join the process group (nccl on CUDA, gloo on CPU; collectives time out after
    `timeout`, torch's default 10 minutes when None) and pick this rank's device. Returns (ddp, rank, world_size,
    device)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1, pick_device(device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    device = pick_device(device)
    if device.startswith('cuda'):
        device = rank_device(local_rank, int(os.environ.get('LOCAL_WORLD_SIZE', world_size)),
                             torch.cuda.device_count(), torchrun='TORCHELASTIC_RUN_ID' in os.environ)
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo', timeout=timeout)
    sys.excepthook = _excepthook  # torch's own wraps it, buffering its stderr: the error line was lost at sys.exit
    _WAIT_GROUP[:] = [dist.new_group(backend='gloo', timeout=DATA_WAIT)]
    return True, rank, world_size, device


@contextlib.contextmanager
def rank0_first(ddp, master):
    """`with rank0_first(ddp, master) as log: <prepare data>`: rank 0 runs the block first (it builds the caches;
    log is print), then the other ranks run it (and find them built; log is silent). They wait on a gloo group of
    their own with a timeout of DATA_WAIT, not in a barrier of the process group: a first build on a real corpus
    can outlast its collective timeout, which kills the job. If rank 0 fails in the block, the others stop at once."""
    if not ddp:
        yield print
        return
    done = [False]
    if master:
        try:
            yield print
            done = [True]
        finally:  # tell the others, whether the block ran through or raised
            dist.broadcast_object_list(done, src=0, group=_WAIT_GROUP[0])
        return
    dist.broadcast_object_list(done, src=0, group=_WAIT_GROUP[0])
    if not done[0]:
        raise SystemExit(f"error: rank 0 stopped while preparing the data (its error is above); rank "
                         f"{dist.get_rank()} stops too")
    yield lambda *args, **kwargs: None


def finish(ddp, stopped=None):
    """Leave the process group together (a rank that tears gloo down while another is still busy can abort at
    exit, so every rank waits at a barrier first); a run stopped by Ctrl-C then exits 130, as a shell expects.
    Everything is saved by now, so a late SIGTERM or SLURM's time-limit SIGUSR1 is ignored from here: Python puts
    the default handlers back while it shuts down, and one arriving then would kill a finished job (FAILED)."""
    for sig in (signal.SIGTERM, getattr(signal, 'SIGUSR1', None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if stopped == 'interrupted':
        sys.exit(130)


def step_check(ddp, *values):
    """The one host sync of a training step, after its backward and before its update: the step's values (loss
    first) as floats (under DDP their mean over ranks), and why to stop after this step (None, 'signal' or
    'interrupted', from common.STOP). Under DDP one all_reduce carries both, so every rank gets the same answers:
    all save at the same step, and a NaN on any rank stops every rank before the update. Doubles: a loss summed
    over micro-batches in float64 stays the exact sum."""
    flat = torch.stack([v.detach().double().reshape(()) for v in values])  # (len(values),)
    if not ddp:
        return flat.tolist(), STOP.reason
    reasons = [STOP.reason == 'interrupted', STOP.reason == 'signal']
    both = torch.cat([flat, torch.tensor(reasons, dtype=torch.float64, device=flat.device)])
    dist.all_reduce(both)  # sums: values over ranks, and how many ranks were asked to stop (Ctrl-C first)
    *totals, interrupted, signalled = both.tolist()
    reason = 'interrupted' if interrupted else 'signal' if signalled else None
    return [t / dist.get_world_size() for t in totals], reason


def matmul_peak_flops(device, m=4096, k=256, n=1024, repeats=20):
    """FLOP/s to compute MFU against: the datasheet dense peak on known GPUs (bf16), else the best of `repeats` fp32
    (m,k)@(k,n) matmuls on this device (CPU: the honest peak of this machine; the best, because a busy CPU only
    ever makes a matmul slower)."""
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
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / min(times)


class MFU:
    """Model FLOPs utilisation of a step: its FLOPs per second over the peak measured on this device. MFU above
    100% means the peak was measured while something else held the device: it is measured again (the best one is
    kept) and, if the step is still faster, the step's own rate becomes the peak: it is a lower bound of it."""

    def __init__(self, device, flops_per_step, matmul_shape, log=print):
        self.device, self.flops, self.shape, self.log = device, flops_per_step, matmul_shape, log
        self.peak = matmul_peak_flops(device, *matmul_shape)
        if self.peak:
            m, k, n = matmul_shape
            log(f"mfu: against {self.peak / 1e9:,.1f} GFLOP/s, " + ("the bf16 datasheet peak of this GPU" if device
                .startswith('cuda') else f"the best of 20 fp32 ({m}x{k})@({k}x{n}) matmuls on {device}, measured now"))

    def __call__(self, seconds_per_step):
        if not self.peak or not self.flops:
            return None
        if self.flops / seconds_per_step > self.peak:
            old = self.peak
            self.peak = max(self.peak, matmul_peak_flops(self.device, *self.shape), self.flops / seconds_per_step)
            self.log(f"mfu: peak measured again: {self.peak / 1e9:.1f} GFLOP/s (was {old / 1e9:.1f}: a step beat it, "
                     f"so the device was busy when it was measured)")
        return self.flops / seconds_per_step / self.peak


# -----------------------------------------------------------------------------
# log lines: one number format, durations, ETA, and progress of data preparation
# -----------------------------------------------------------------------------

def fmt(value, spec='.4f'):
    """A number in a log line; a missing value (None, nan) prints as '-'."""
    return '-' if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def hms(seconds):
    """12.3s, 4m05s, 2h07m; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return '-'
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s" if seconds < 3600 else \
        f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def fields(metrics):
    """'name value | name value' for the metrics of an eval or epoch line (the names of scalars.csv's columns)."""
    return ' | '.join(f"{k} {fmt(v, 'd' if isinstance(v, int) else '.4f')}" for k, v in metrics.items())


def step_line(where, loss, lr, seconds_per_step, mfu, clock):
    """The progress line of every script's training steps: 'iter 120/2000 | loss 1.2345 | lr 3.0e-04 |
    45.1 ms/step | mfu 61.2% | elapsed 1m05s | eta 3m10s'."""
    return (f"{where} | loss {loss:.4f} | lr {lr:.1e} | {1000 * seconds_per_step:.1f} ms/step | "
            f"mfu {fmt(mfu, '.1%')} | {clock}")


def epoch_line(where, metrics, samples_per_s, seconds_per_step, data_share, clock):
    """The line of every epoch script's finished epochs: the epoch's scalars.csv values by their column names, then
    samples/s over all ranks, ms/step, the share of the time spent making batches, elapsed, ETA."""
    return (f"{where} | {fields(metrics)} | {samples_per_s:.1f} samples/s | {1000 * seconds_per_step:.1f} ms/step | "
            f"data {data_share:.0%} | {clock}")


class Clock:
    """Elapsed time and ETA of a loop of `total` steps, from this process's own pace (the steps a resumed run made
    before are not timed)."""

    def __init__(self, done, total):
        self.first, self.total, self.t0 = done, total, time.time()

    def __call__(self, done):
        elapsed = time.time() - self.t0
        rate = (done - self.first) / elapsed if done > self.first else None
        return f"elapsed {hms(elapsed)} | eta {hms((self.total - done) / rate if rate else None)}"


def progress(items, what, total=None, chunk=1, log=print, every=5.0, last=True):
    """Yield from items, printing 'what: done/total | rate/s | eta' every `every` seconds and (if `last`) one last
    line with the time taken: the loops of data preparation (built-in data, caches). Each item counts `chunk`."""
    t0 = shown = time.time()
    done = 0
    for item in items:
        yield item
        done, now = min(done + chunk, total or math.inf), time.time()
        if now - shown >= every:
            rate, shown = done / (now - t0), now
            log(f"{what}: {done:,}" + (f"/{total:,} | {rate:,.1f}/s | eta {hms((total - done) / rate)}" if total
                                      else f" | {rate:,.1f}/s"))
    if last:
        log(f"{what}: {done:,}" + (f"/{total:,}" if total else '') + f" | {hms(time.time() - t0)}")


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


FACT_FILES = ('events.jsonl', 'scalars.csv', 'samples.txt')  # appended during a run; a checkpoint records how far
EMPTY_SHA256 = hashlib.sha256().hexdigest()
LIFECYCLE = ('start', 'end', 'error')  # events that stay when a resumed run cuts its facts back: they are history


def _read_bytes(path):
    return open(path, 'rb').read() if os.path.exists(path) else b''


class RunDir:
    """Writes the run directory on rank 0; on other ranks every method is a no-op (printing included). Made after
    every start check has passed, it is the first write to out_dir (the lock aside). A fresh start with overwrite
    moves the old run aside; a resumed one first cuts its facts back to what its checkpoint covers, so a kill and a
    resume leave the same rows as an uninterrupted run. Creating it arms the stop signals: from here on Ctrl-C and
    SIGTERM let the loop save before it exits."""

    def __init__(self, out_dir, config, ckpt=None, resumed_from=None, changed=None, master=True, **provenance):
        self.out_dir, self.master, self.start = out_dir, master, time.time()
        self.run_id = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-') + uuid.uuid4().hex[:6]
        self.config_hash = config_hash(config)
        STOP.armed = True
        if not master:
            return
        # this run's own last.pt continues its history; an evaluation adds to it; any other start begins a new one
        same_run = resumed_from is not None and os.path.abspath(resumed_from) == os.path.abspath(
            os.path.join(out_dir, 'last.pt'))
        keep = same_run or bool(config.get('eval_only'))
        cut = same_run and not config.get('eval_only') and bool(ckpt and ckpt.get('facts'))
        facts = self._cut_back(ckpt['facts'], resumed_from) if cut else None  # checked before anything is written
        notes = [self._move_aside()] if not keep and config.get('overwrite') else []
        notes += self._remove_stale_tmp() + NOTES
        NOTES.clear()
        _RUN[:] = [self]  # an OSError from here on also writes an error event
        os.makedirs(out_dir, exist_ok=True)
        self._log = open(os.path.join(out_dir, 'log.txt'), 'a' if keep else 'w')
        self._facts = {}  # name -> [size, sha256 of the bytes]: how far the next checkpoint covers
        for name in FACT_FILES:
            path = os.path.join(out_dir, name)
            old = _read_bytes(path)
            data = facts[name] if facts else old if keep else b''
            if data != old:  # cut back (resume), or emptied (a fresh start)
                write_atomic(path, data) if data else os.remove(path)
            self._facts[name] = [len(data), hashlib.sha256(data)]
        self._scalar_columns = next(csv.reader(io.StringIO(self._facts_text('scalars.csv'))), None)
        status = _git('status', '--porcelain')
        info = dict(config=config, run_id=self.run_id, config_hash=self.config_hash, git_commit=git_commit(),
                    git_dirty=bool(status) if status is not None else None, argv=sys.argv,
                    python=platform.python_version(), torch=torch.__version__,
                    start_time=datetime.datetime.now().isoformat(timespec='seconds'), resumed_from=resumed_from,
                    changed=changed or {}, **provenance)
        write_atomic(os.path.join(out_dir, 'config.json'), json.dumps(info, indent=2).encode())
        news = ', '.join(f"{k} {old!r} -> {new!r}" for k, (old, new) in (changed or {}).items())
        self.print(f"run {out_dir} | " + (f"from {resumed_from}" + (f" | changed: {news}" if news else '')
                                          if resumed_from else 'new') + f" | config_hash {self.config_hash[:12]}")
        for note in filter(None, notes):
            self.print(note)

    def _cut_back(self, covered, ckpt_path):
        """{fact file: its bytes as the checkpoint saw them}, plus the lifecycle events written after it (a stop's
        end event). A file that no longer starts with what the checkpoint covered was edited: refused."""
        kept = {}
        for name in FACT_FILES:
            path, (size, digest) = os.path.join(self.out_dir, name), covered.get(name, (0, EMPTY_SHA256))
            data = _read_bytes(path)
            if len(data) < size or hashlib.sha256(data[:size]).hexdigest() != digest:
                raise UserError(f"{path} is not what {ckpt_path} recorded ({size:,} bytes, sha256 {digest[:12]}; "
                                f"now {len(data):,} bytes): it was edited or cut since; restore it, or start a new "
                                f"run (another --out_dir, or --init_from=scratch --overwrite=True)")
            kept[name] = data[:size]
            if name == 'events.jsonl':  # after the checkpoint: keep the stops and errors, drop the evals it lost
                for line in data[size:].splitlines(keepends=True):
                    with contextlib.suppress(ValueError):
                        if line.endswith(b'\n') and json.loads(line).get('event') in LIFECYCLE:
                            kept[name] += line
        return kept

    def _move_aside(self):
        """overwrite=True: the old run's files go to a sibling folder named by the time, never deleted."""
        old = sorted(n for n in os.listdir(self.out_dir) if not any(fnmatch.fnmatch(n, k) for k in KEPT_IN_PLACE)) \
            if os.path.isdir(self.out_dir) else []
        if not old:
            return None
        aside = f"{self.out_dir.rstrip(os.sep)}.replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        aside += f"-{uuid.uuid4().hex[:4]}" if os.path.exists(aside) else ''
        os.makedirs(aside)
        for name in old:
            os.rename(os.path.join(self.out_dir, name), os.path.join(aside, name))
        return f"overwrite: the old run ({len(old)} files) moved to {aside}"

    def _remove_stale_tmp(self):
        """Temporary files of saves a killed process never finished (this process holds the lock: none is live)."""
        stale = [os.path.join(folder, n) for folder in (self.out_dir, os.path.join(self.out_dir, 'figures'))
                 if os.path.isdir(folder) for n in os.listdir(folder) if re.search(r'\.tmp\d+$', n)]
        for path in stale:
            os.remove(path)
        return [f"removed {len(stale)} temporary file(s) of an unfinished save: {', '.join(stale[:3])}"] if stale \
            else []

    def _facts_text(self, name):
        return _read_bytes(os.path.join(self.out_dir, name)).decode('utf-8', errors='replace')

    def _append(self, name, text):
        """Append to a fact file, and to the size and digest the next checkpoint records."""
        data, path = text.encode(), os.path.join(self.out_dir, name)
        try:
            with open(path, 'ab') as f:
                f.write(data)
        except OSError as e:  # a full disk: name the file (the excepthook makes it one line)
            raise OSError(e.errno, e.strerror, path) from None
        self._facts[name][0] += len(data)
        self._facts[name][1].update(data)

    def covered(self):
        """{fact file: [size, sha256]} written so far: saved in each checkpoint, checked and cut back to on resume."""
        return {name: [size, digest.hexdigest()] for name, (size, digest) in self._facts.items()}

    def save_checkpoint(self, name, **fields):
        """save_checkpoint() into out_dir/<name>, with the run's config_hash and how far its facts go."""
        save_checkpoint(os.path.join(self.out_dir, name), config_hash=self.config_hash, facts=self.covered(), **fields)

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
            self._append('events.jsonl', json.dumps(record) + '\n')

    def scalars(self, row):
        """Append one evaluation row; the header is fixed by the first row ever written to this file."""
        if not self.master:
            return
        if self._scalar_columns is None:
            self._scalar_columns = list(row)
            self._append('scalars.csv', ','.join(self._scalar_columns) + '\n')
        if list(row) != self._scalar_columns:
            raise UserError(f"{self.out_dir}/scalars.csv: columns {list(row)} differ from the file's header "
                            f"{self._scalar_columns}")
        line = io.StringIO()
        csv.writer(line, lineterminator='\n').writerow(['' if v is None else f"{v:.6g}" if isinstance(v, float)
                                                        else v for v in row.values()])
        self._append('scalars.csv', line.getvalue())

    def write_text(self, name, text, mode='w'):
        if not self.master:
            return
        if name in FACT_FILES:  # samples.txt: appended, and covered by the checkpoints like the other facts
            if mode == 'w':
                self._facts[name] = [0, hashlib.sha256()]
                write_atomic(os.path.join(self.out_dir, name), b'')
            self._append(name, text)
        else:
            with open(os.path.join(self.out_dir, name), mode) as f:
                f.write(text)

    def end(self, reason, where, summary=None, **facts):
        """The end event (reason and facts) and the run's last line: what a finished run reached and where its files
        are, or for a stopped one ('interrupted', 'signal') the one command that continues it."""
        job = os.environ.get('SLURM_JOB_ID') if reason == 'signal' and 'SIGUSR1' in STOP.signals else None
        self.event('end', reason=reason, **facts, **({'requeue': job} if job else {}))
        if job:  # SLURM's warning before a time limit or pre-emption: this job goes back to the queue
            self.print(f"stopped (SIGUSR1) at {where} | saved {self.out_dir}/last.pt | " + requeue_job(job))
        elif reason in ('interrupted', 'signal'):
            torchrun = int(os.environ.get('WORLD_SIZE', 1)) > 1
            self.print(f"stopped ({'Ctrl-C' if reason == 'interrupted' else 'signal'}) at {where} | saved "
                       f"{self.out_dir}/last.pt | continue: {'torchrun ...' if torchrun else 'python'} {sys.argv[0]} "
                       f"--out_dir={self.out_dir} --init_from=resume")
        else:
            saved = [n for n in ('best.pt', 'last.pt') if os.path.exists(os.path.join(self.out_dir, n))]
            self.print(f"{reason} at {where} | " + (f"{fields(summary)} | " if summary else '') +
                       f"took {hms(time.time() - self.start)} | {self.out_dir}: {' '.join(saved) or 'no checkpoints'}")


LOCK_FILE = '.lock'  # in every run directory while a process writes it: "pid N on host since time"
KEPT_IN_PLACE = (LOCK_FILE, 'sweep_log.txt', 'slurm-*.out')  # overwrite moves the rest: sweep.py's log of every
# attempt and a SLURM job's own (open) output stay


def lock_run_dir(out_dir):
    """Take the run directory's lock for the life of this process: an OS lock (flock) on out_dir/.lock, so a
    killed process never leaves a stale one. A second writer gets one error naming the holder. At exit the lock file
    goes, and so do the folders this call made if the run left them empty (a refused start changes nothing)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir!r} is a file; expected a run directory (a folder, made if missing)")
    made, parent = [], os.path.abspath(out_dir)
    while not os.path.exists(parent):  # the folders makedirs will create, deepest first
        made.append(parent)
        parent = os.path.dirname(parent)
    path = os.path.join(out_dir, LOCK_FILE)
    if os.path.abspath(path) in _LOCKED:
        return  # this process holds it already
    try:
        os.makedirs(out_dir, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors='replace').strip() or 'another process'
                os.close(fd)
                raise UserError(f"out_dir {out_dir} is being written by {holder}: one process writes a run "
                                f"directory; wait for it to end, stop it, or use another --out_dir") from None
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break  # else its holder removed the file between our open and flock: lock the new one
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode())
    except OSError as e:
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise UserError(f"out_dir {out_dir}: cannot write a run directory there ({e.strerror})") from None
    _LOCKED.add(os.path.abspath(path))
    atexit.register(_unlock_run_dir, fd, path, made)


_LOCKED = set()  # the lock files this process holds


def _unlock_run_dir(fd, path, made):
    if os.path.abspath(path) not in _LOCKED:
        return  # released already
    _LOCKED.discard(os.path.abspath(path))
    with contextlib.suppress(OSError):
        os.remove(path)  # before the lock goes: a process that opened it meanwhile sees it is gone and retries
    os.close(fd)
    for folder in made:  # only if still empty: the run wrote nothing there
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def lock_holder(out_dir):
    """None if no process holds out_dir's lock now, else who does ('pid N on host since time')."""
    try:
        fd = os.open(os.path.join(out_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # we could take it, so nobody holds it; closing the file releases it again
    except BlockingIOError:
        return os.read(fd, 200).decode(errors='replace').strip() or 'another process'
    finally:
        os.close(fd)


def read_events(out_dir):
    """A run directory's events.jsonl as a list (empty when there is none); a line that is not JSON is a UserError
    naming the file and the line."""
    path, records = os.path.join(out_dir, 'events.jsonl'), []
    if not os.path.exists(path):
        return records
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode()
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"a JSON {type(record).__name__}")
                    records.append(record)
            except ValueError as e:  # UnicodeDecodeError is one too
                raise UserError(f"{path}, line {n}: not a JSON object ({e})") from None
    return records


def run_finished(events):
    """The end event of a finished training run, else None: its last start/end event (eval_only passes aside, a
    resumed run appends its own) must be an end with reason 'done'."""
    lifecycle = [e for e in events if e.get('event') in ('start', 'end') and not e.get('eval_only')
                 and e.get('reason') != 'eval_only']
    done = bool(lifecycle) and lifecycle[-1]['event'] == 'end' and lifecycle[-1].get('reason') == 'done'
    return lifecycle[-1] if done else None


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
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:  # a failed write names no file: say which one
            raise OSError(e.errno, e.strerror, path) from None
        raise


def rng_state(device='cpu', **generators):
    """Python, numpy and torch RNG states, the generator of the one accelerator this process uses (its device name
    recorded with it) and any named torch.Generator (SPOTER's augmentations), as tensors and plain types so
    weights_only can load them."""
    np_state = np.random.get_state()
    state = dict(python=random.getstate(), numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                   *np_state[2:]], torch=torch.get_rng_state(), device=device,
                 generators={name: g.get_state() for name, g in generators.items()})
    if device.startswith('cuda'):
        state['cuda'] = torch.cuda.get_rng_state(device)
    elif device == 'mps':
        state['mps'] = torch.mps.get_rng_state()
    return state


def rng_states_all_ranks(ddp, device='cpu', **generators):
    """One rng_state() per rank (a collective under DDP), so every rank's dropout stream resumes exactly."""
    if not ddp:
        return [rng_state(device, **generators)]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state(device, **generators))
    return states


NOTES = []  # lines for the run's log said before its RunDir exists (a resume's RNG layout); RunDir prints them


def set_rng_state(state, device='cpu', **generators):
    """Restore rng_state()'s output. The accelerator's generator is restored when this process uses the same kind
    of device (the state of the one it used goes to the one it uses now); otherwise it keeps its seed, said in
    NOTES. Checkpoints of older versions (no device recorded: every CUDA device's state, or none) load too."""
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    for name, g in generators.items():
        if name in state.get('generators', {}):
            g.set_state(state['generators'][name])
    saved = state.get('device', 'cuda' if state.get('cuda') is not None else 'cpu')
    kind, saved_kind, cuda = device.split(':')[0], saved.split(':')[0], state.get('cuda')
    if isinstance(cuda, list):  # older checkpoints: one state per visible device; the run used the first
        cuda = cuda[0] if cuda else None
    if kind == saved_kind == 'cuda' and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    elif kind == saved_kind == 'mps':
        torch.mps.set_rng_state(state['mps'])
    elif kind != 'cpu':
        NOTES.append(f"resume: the checkpoint's RNG states are from {saved}, this run is on {device}: its {device} "
                     f"generator starts from the seed (dropout differs from an uninterrupted run from here on)")


def restore_rng(states, rank, world_size, device, **generators):
    """This rank's RNG states from a checkpoint's list (rng_states_all_ranks). When the rank count changed, each
    rank takes rank 0's (a line in the log says so: the random streams differ from an uninterrupted run)."""
    if len(states) != world_size and rank == 0:
        NOTES.append(f"resume: the checkpoint holds the RNG states of {len(states)} rank(s), this run has "
                     f"{world_size}: every rank continues from rank 0's (the random streams, batch order included, "
                     f"differ from an uninterrupted run)")
    set_rng_state(states[rank] if len(states) == world_size else states[0], device, **generators)


def load_optimizer_state(optimizer, state):
    """Load an optimizer's moments and step counts but keep the hyperparameters it was built with (learning rate,
    weight decay, betas, fused, ...): the saved state carries the old ones, and the config decides (on resume it is
    the saved config unless this command line changed a key)."""
    built = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, built):
        group.update(values)


def save_checkpoint(path, **fields):
    """torch.save to a temporary file beside `path`, then os.replace: a kill mid-save never loses the old one."""
    buffer = io.BytesIO()
    torch.save(dict(schema_version=SCHEMA_VERSION, git_commit=git_commit(), script=os.path.basename(sys.argv[0]),
                    **fields), buffer)
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
        reason = (str(e).strip().splitlines() or ['the file is empty' if os.path.getsize(path) == 0 else ''])[0][:200]
        raise UserError(f"{path} is not a readable checkpoint of this project ({type(e).__name__}: {reason})") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this project: missing {missing}")
    return ckpt


def resolve_init(init_from, out_dir, overwrite, eval_only=False):
    """'scratch' | 'resume' | 'auto' | a checkpoint path (e.g. 'best.pt', looked up in out_dir too)
    -> None (start fresh) or the checkpoint path to start from. A start that would replace an out_dir's checkpoints
    (scratch, auto without last.pt, another checkpoint) needs overwrite; eval_only writes no checkpoint."""
    last = os.path.join(out_dir, 'last.pt')
    held = [f for f in ('last.pt', 'best.pt') if os.path.exists(os.path.join(out_dir, f))]
    if init_from.endswith('.pt'):
        path = init_from if os.path.exists(init_from) else os.path.join(out_dir, init_from)
        if not os.path.exists(path):
            raise UserError(f"init_from={init_from!r}: no such checkpoint (looked in . and in {out_dir})")
        if held and not (overwrite or eval_only or os.path.abspath(path) == os.path.abspath(last)):
            raise UserError(f"out_dir {out_dir} already holds {', '.join(held)}: starting from {path} would replace "
                            f"them; use --init_from=resume to continue that run, another --out_dir, or "
                            f"--overwrite=True (the old run is moved aside)")
        return path
    if init_from == 'auto' and os.path.exists(last):
        return last
    if init_from == 'resume':
        if not os.path.exists(last):
            raise UserError(f"init_from='resume' but {last} does not exist (use init_from='scratch' or 'auto')")
        return last
    if init_from in ('scratch', 'auto'):
        if held and not overwrite:
            raise UserError(f"out_dir {out_dir} already holds {', '.join(held)}: refusing to start from scratch over "
                            f"it; use --init_from=resume or auto, another --out_dir, or --overwrite=True (the old run "
                            f"is moved aside)")
        return None
    raise UserError(f"init_from={init_from!r}: expected 'scratch', 'resume', 'auto' or a path to a .pt file")
