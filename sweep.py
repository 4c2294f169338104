"""
Run a campaign: a list of train_*.py runs (script, config file, overrides) over one or more seeds, one at a time,
each as a subprocess of this same interpreter, or submitted to SLURM as one job per run and seed. Restarted, it picks
up where it was: a run whose out_dir holds a finished run (end event 'done') with the same config hash is skipped, one
with a different hash is re-run from scratch (the script moves the old run aside to <out_dir>.replaced-<time>), a
half-finished one with the same hash is resumed from its last.pt, one that another process is writing now (its lock)
is left to it. A run directory whose facts cannot be read (a garbage line in events.jsonl, a config.json missing
beside its checkpoints, a scalars.csv best_of cannot rank) stops the sweep, the plan too, with one message naming the
file, before anything runs: the sweep never guesses that a run it cannot read may be replaced.

    python sweep.py config/campaign_audio.py --dry_run=True      # the plan: skip / run / resume / rerun / wait, why
    python sweep.py config/campaign_audio.py                     # run it (again: only what is not done yet)
    python sweep.py config/campaign_audio.py --status=True       # one line per run and seed: done, failed, ...
    python sweep.py config/campaign_audio_quick.py --seeds="[1, 2, 3]"
    python sweep.py config/campaign_audio.py --submit=slurm --dry_run=True   # the sbatch commands, submits nothing
    python sweep.py config/campaign_audio.py --submit=slurm --sbatch_args='--partition=gpu --gres=gpu:1 --time=4:00:00'
    python sweep.py config/campaign_audio.py --submit=slurm --status=True    # ... with each run's job and its state

With --submit=slurm every run and seed that is not done becomes one sbatch job (its id recorded in sweep.jsonl);
`after` and `best_of` become --dependency=afterok on the jobs of those runs (after: the same seed; best_of: every
seed), dropped for runs that are done already. A job's body is this sweep for just that run and seed
(`exec python sweep.py CAMPAIGN [the same keys] --submit=local --only=<name>:<seed>`), so the skip / run / resume /
rerun decision, best_of and the KD gate are taken when the job starts, by the same code as here. The job asks for
SIGUSR1 warning_seconds before its time limit (--signal=B:USR1@N --requeue); the sweep passes it on to the run,
which saves last.pt and requeues the job; started again, the job's sweep resumes the run. Submitted again, the
campaign submits nothing for runs that are done or whose job is still queued or running (squeue, scontrol); runs
whose job ended without finishing them are submitted again only with --resubmit_failed=True.

A campaign config is plain Python setting the keys below; `runs` is a list of dicts:
    name      the run's name; its out_dir is <out_root>/<name>/seed<seed>
    script    'train_audio.py', 'train_kd.py', ... (looked up in the current folder, then beside this file)
    config    a config file for the script, or '' (optional)
    overrides {key: value} passed as --key=value; in strings '{out_root}' and '{seed}' are filled in, so a run can
              name another run's files, e.g. teacher_ckpt='{out_root}/crnn/seed{seed}/best.pt'
    after     names of runs (same seed) that must have finished first; until then this run waits (optional)
    best_of   dict(runs=[names], metric='val/macro_f1', mode='max', keys=[...]) (optional): just before the run
              starts, copy `keys` from the config of the best of those runs, by the mean over seeds of each one's
              best validation metric in its scalars.csv (validation only: test never selects anything)
    sbatch    sbatch options of this run's job, after sbatch_args, e.g. '--time=30' (optional; submit='slurm')
Names in a campaign config that start with '_' are the config's own helpers, not keys.
"""
import ast
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

from common import STOP, UserError, config_hash, configure, lock_holder, read_events, run_finished

# -----------------------------------------------------------------------------
# default config (a campaign config file sets runs and seeds; the command line the rest)
# -----------------------------------------------------------------------------
runs = []  # the campaign: a list of run dicts (name, script, config, overrides, after, best_of, sbatch), in order
seeds = [42]  # every run is made once per seed (seed loop inside the run loop: a phase ends before the next)
out_root = 'out/campaign'  # run i, seed s writes to <out_root>/<name>/seed<s>; the campaign log is sweep.jsonl here
submit = 'local'  # 'local' (run here, one at a time) | 'slurm' (one sbatch job per run and seed, then return)
dry_run = False  # print the plan (local: skip / run / resume / ..., and why; slurm: the sbatch commands), do nothing
status = False  # print where each run and seed stands (done / running / queued / failed / ...) and do nothing else
only = ''  # '<name>:<seed>': just this run and seed, here (the body of each SLURM job); '' = every run and seed
sbatch_args = '--gres=gpu:1'  # sbatch options of every job, e.g. '--partition=gpu --gres=gpu:1 --time=4:00:00'
warning_seconds = 120  # SIGUSR1 this long before a job's time limit: its run saves and requeues the job; [1, 65535]
resubmit_failed = False  # submit='slurm': also submit again the runs whose job ended without finishing them
stop_on_error = False  # stop the campaign at the first failed run (default: record it and go on)
if __name__ == '__main__':
    config = configure(globals())
# -----------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
SET_BY_SWEEP = ('seed', 'out_dir', 'init_from', 'overwrite')  # every script must have these; the sweep sets them
GATED_EXIT_CODE = 3  # a script that refuses to run on its gate (train_kd.py) exits 3: recorded 'gated', not failed
LEFT_ALONE = {'skip': 'skipped', 'wait': 'blocked', 'running': 'running'}  # actions that start nothing -> status


def script_path(script):
    for path in (script, os.path.join(HERE, script)):
        if os.path.isfile(path):
            return path
    return None


_defaults_cache = {}


def script_defaults(script):
    """The globals a script hands to configure(): its source above `config = configure(globals())`, executed once.
    Running the script's own prefix (imports and defaults) rather than parsing its defaults is what makes the
    predicted config, and so the config hash, the one the script will compute itself."""
    path = os.path.abspath(script_path(script))
    if path not in _defaults_cache:
        with open(path) as f:
            source = f.read()
        marker = 'config = configure(globals())'
        if marker not in source:
            raise UserError(f"{script}: no '{marker}' line, so its config cannot be predicted")
        g = {'__file__': path, '__name__': '__sweep__'}
        exec(compile(source[:source.index(marker)], path, 'exec'), g)
        _defaults_cache[path] = g
    return _defaults_cache[path]


def fill(value, seed):
    """'{out_root}' and '{seed}' in strings (also inside lists) -> this campaign's values."""
    if isinstance(value, str):
        return value.replace('{out_root}', out_root).replace('{seed}', str(seed))
    if isinstance(value, (list, tuple)):
        return type(value)(fill(v, seed) for v in value)
    return value


def arg_text(value):
    """The text after --key= that configure() reads back as `value`: a plain string as typed when it is not itself
    a Python literal (--device=cpu), else the literal (--alpha=0.3, --dataset='123')."""
    if isinstance(value, str):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return repr(value)


def script_args(run, seed, overrides):
    """The script's command-line arguments, without init_from/overwrite: config file, then --key=value."""
    values = {**{k: fill(v, seed) for k, v in overrides.items()}, 'seed': seed, 'out_dir': out_dir_of(run, seed)}
    return ([run['config']] if run.get('config') else []) + [f"--{k}={arg_text(v)}" for k, v in values.items()]


def predict_config(run, seed, overrides):
    """The final config the script will get (configure on a copy of its defaults), or UserError naming the run."""
    try:
        return configure(dict(script_defaults(run['script'])), script_args(run, seed, overrides))
    except UserError as e:
        raise UserError(f"campaign run '{run['name']}' ({run['script']}): {e}") from None


def out_dir_of(run, seed):
    return os.path.join(out_root, run['name'], f'seed{seed}')


def check_campaign():
    """Every run's script, keys and values, before the first run starts: one clear message naming the run."""
    if not runs:
        raise UserError("the campaign has no runs: a campaign config sets runs = [dict(name=..., script=...), ...]")
    if not seeds or not all(type(s) is int for s in seeds) or len(set(seeds)) < len(seeds):
        raise UserError(f"seeds={seeds!r}: expected a list of distinct integers, e.g. seeds = [1, 2, 3]")
    names = set()
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not run.get('name') or not run.get('script'):
            raise UserError(f"campaign run #{i}: expected a dict with 'name' and 'script', got {run!r}")
        unknown = set(run) - {'name', 'script', 'config', 'overrides', 'after', 'best_of', 'sbatch'}
        if unknown:
            raise UserError(f"campaign run '{run['name']}': unknown field(s) {sorted(unknown)}")
        sbatch_options(run)
        # the shapes the code below relies on: a slip in the campaign file is one message, not a traceback
        if not isinstance(run.get('overrides', {}), dict):
            raise UserError(f"campaign run '{run['name']}': overrides={run['overrides']!r}: expected a dict")
        if not isinstance(run.get('after', []), list):
            raise UserError(f"campaign run '{run['name']}': after={run['after']!r}: expected a list of run names")
        spec = run.get('best_of', {})
        if not isinstance(spec, dict) or spec and not (
                set(spec) <= {'runs', 'metric', 'mode', 'keys'} and isinstance(spec.get('runs'), list) and spec['runs']
                and isinstance(spec.get('metric'), str) and spec.get('mode', 'max') in ('max', 'min')
                and isinstance(spec.get('keys'), list)):
            raise UserError(f"campaign run '{run['name']}': best_of={spec!r}: expected dict(runs=[names], "
                            f"metric='val/...', mode='max' or 'min', keys=[config keys])")
        if run['name'] in names:
            raise UserError(f"campaign run '{run['name']}' is listed twice (names must be unique: they name out_dirs)")
        names.add(run['name'])
        if script_path(run['script']) is None:
            raise UserError(f"campaign run '{run['name']}': script {run['script']} not found (expected a train_*.py "
                            f"in the current folder or beside sweep.py)")
        defaults = script_defaults(run['script'])
        missing = [k for k in SET_BY_SWEEP if k not in defaults]
        if missing:
            raise UserError(f"campaign run '{run['name']}': {run['script']} has no key(s) {missing}, which the sweep "
                            f"sets")
        clash = [k for k in run.get('overrides', {}) if k in SET_BY_SWEEP]
        if clash:
            raise UserError(f"campaign run '{run['name']}': overrides set {clash}; the sweep sets those itself")
        for other in run.get('after', []) + run.get('best_of', {}).get('runs', []):
            if other not in names:
                raise UserError(f"campaign run '{run['name']}': it depends on '{other}', which is not an earlier run")
        unknown = [k for k in run.get('best_of', {}).get('keys', []) if k not in defaults]
        if unknown:
            raise UserError(f"campaign run '{run['name']}' ({run['script']}): best_of keys {unknown} are not keys "
                            f"of {run['script']} (see python {run['script']} --help)")
        for seed in seeds:
            predict_config(run, seed, run.get('overrides', {}))
    if only and not pairs():
        raise UserError(f"only={only!r}: no such run and seed in the campaign (expected '<name>:<seed>', e.g. "
                        f"'{runs[0]['name']}:{seeds[0]}')")
    if only and submit == 'slurm' and not status:
        raise UserError(f"only={only!r} runs one run here (the body of a job); submit='slurm' submits the campaign")


def sbatch_options(run):
    """sbatch_args, then the run's own sbatch options, as a list (split as a shell would)."""
    options = run.get('sbatch', '')
    if not isinstance(options, str):
        raise UserError(f"campaign run '{run['name']}': sbatch={options!r}: expected a string of sbatch options, "
                        f"e.g. '--time=30'")
    try:
        return shlex.split(sbatch_args) + shlex.split(options)
    except ValueError as e:  # an unclosed quote
        raise UserError(f"campaign run '{run['name']}': sbatch_args={sbatch_args!r}, sbatch={options!r}: {e}") \
            from None


def pairs():
    """The (run, seed) pairs this sweep is about, in campaign order (seeds inside runs): all, or the one `only`
    names."""
    return [(run, seed) for run in runs for seed in seeds if not only or only == f"{run['name']}:{seed}"]


# -----------------------------------------------------------------------------
# reading a run directory: the facts the scripts wrote (config.json, events.jsonl, scalars.csv)
# -----------------------------------------------------------------------------

RUN_FILES = ('last.pt', 'best.pt', 'events.jsonl', 'scalars.csv')  # what a run leaves beside its config.json
MOVED_ASIDE = "--overwrite=True moves the old run aside to {}.replaced-<YYYYmmdd-HHMMSS>"


def unreadable(what):
    """The error for a fact the sweep cannot read ('file[, line N]: why'): it stops the sweep, since any guess about
    such a run (rerun it?) could replace it."""
    return UserError(f"{what}; fix the file, or move the run directory aside to run it afresh (nothing was run)")


def read_config(out_dir):
    """A run directory's config.json as a dict with 'config' and 'config_hash', or None when there is none."""
    path = os.path.join(out_dir, 'config.json')
    try:
        with open(path) as f:
            facts = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # not JSON, not UTF-8 (ValueError both), a folder, no permission
        raise unreadable(f"{path}: not readable as JSON ({e})") from None
    if not (isinstance(facts, dict) and isinstance(facts.get('config'), dict)
            and isinstance(facts.get('config_hash'), str)):
        raise unreadable(f"{path}: not a run's config.json (expected an object with 'config' and 'config_hash')")
    return facts


def events_of(out_dir):
    """common.read_events; a line that is not a JSON object stops the sweep, naming the file and the line."""
    try:
        return read_events(out_dir)
    except UserError as e:
        raise unreadable(str(e)) from None
    except OSError as e:  # events.jsonl is a folder, or unreadable
        raise unreadable(f"{os.path.join(out_dir, 'events.jsonl')}: not readable ({e})") from None


def run_state(out_dir):
    """-> (recorded config_hash or None, finished: bool (common.run_finished), has last.pt). Facts that exist but
    cannot be read, and run files without the config.json that says what they are, are a UserError naming the file."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: a file where the run directory goes; move it (nothing was run)")
    facts, has_last = read_config(out_dir), os.path.exists(os.path.join(out_dir, 'last.pt'))
    if facts is None:
        held = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
        if held == ['events.jsonl'] and all(e.get('event') == 'gate' for e in events_of(out_dir)):
            return None, False, False  # only a gate's refusals (train_kd.py writes nothing else): nothing ran yet
        if held:
            raise unreadable(f"{os.path.join(out_dir, 'config.json')}: missing, but the folder holds "
                             f"{', '.join(held)}: what they are is unknown (restore config.json)")
        return None, False, False
    return facts['config_hash'], run_finished(events_of(out_dir)) is not None, has_last


def best_metric(out_dir, metric, mode):
    """The best finite value of a validation column of a finished run's scalars.csv (inf and nan never win).
    A missing file or column, a cell that is not a number, or no finite value at all is a UserError: best_of
    cannot rank the run."""
    path = os.path.join(out_dir, 'scalars.csv')
    try:
        with open(path, newline='') as f:
            lines = list(csv.reader(f))
    except FileNotFoundError:
        raise unreadable(f"{path}: missing, but the run finished: best_of ranks runs by it") from None
    except (OSError, ValueError, csv.Error) as e:
        raise unreadable(f"{path}: not readable ({e})") from None
    header = lines[0] if lines else []
    if metric not in header:
        raise unreadable(f"{path}: no column {metric!r} (columns: {', '.join(header) or 'none'}): best_of cannot "
                         f"rank this run by it")
    column, values = header.index(metric), []
    for n, row in enumerate(lines[1:], 2):
        if len(row) != len(header):
            raise unreadable(f"{path}, line {n}: {len(row)} values for {len(header)} columns")
        try:
            value = float(row[column]) if row[column] != '' else None
        except ValueError:
            raise unreadable(f"{path}, line {n}: column {metric!r} holds {row[column]!r}, not a number") from None
        if value is not None and math.isfinite(value):  # a diverged evaluation (inf, nan) is no score
            values.append(value)
    if not values:
        raise unreadable(f"{path}: no finite {metric} value: best_of cannot rank this run")
    return (max if mode == 'max' else min)(values)


# -----------------------------------------------------------------------------
# the decision for one run: skip / run / resume / rerun / wait / running
# -----------------------------------------------------------------------------

def unfinished(run, seed):
    """Why another run does not count as finished yet (None when it does): being written, or no end event 'done'."""
    out_dir = out_dir_of(run, seed)
    holder = lock_holder(out_dir)  # before reading: a run being written may hold a half-written line
    if holder:
        return f"waits for {run['name']} seed {seed}: being written by {holder}"
    return None if run_state(out_dir)[1] else f"waits for {run['name']} seed {seed} to finish"


def resolve_overrides(run, by_name):
    """run's overrides with best_of filled in, or (None, why) while the runs it chooses among are not all done."""
    overrides = dict(run.get('overrides', {}))
    spec = run.get('best_of')
    if not spec:
        return overrides, None
    scores = {}
    for name in spec['runs']:
        values = []
        for seed in seeds:
            why = unfinished(by_name[name], seed)
            if why:
                return None, f"best_of {why}"
            values.append(best_metric(out_dir_of(by_name[name], seed), spec['metric'], spec.get('mode', 'max')))
        scores[name] = sum(values) / len(values)
    pick = (max if spec.get('mode', 'max') == 'max' else min)(scores, key=scores.get)
    picked = out_dir_of(by_name[pick], seeds[0])
    chosen = read_config(picked)['config']
    missing = [k for k in spec['keys'] if k not in chosen]
    if missing:
        raise unreadable(f"{os.path.join(picked, 'config.json')}: its config has no {missing}, which best_of copies")
    overrides.update({k: chosen[k] for k in spec['keys']})
    return overrides, f"best_of: {pick} (mean {spec['metric']} {scores[pick]:.4f})"


def decide(run, seed, by_name):
    """-> dict(action, reason, args, config_hash, out_dir); action in skip, run, resume, rerun, wait, running."""
    out_dir = out_dir_of(run, seed)
    plan = dict(name=run['name'], seed=seed, out_dir=out_dir, script=run['script'], args=None, config_hash=None)
    holder = lock_holder(out_dir)  # first: another process (a sweep, a job) writes it now; never a second writer
    if holder:
        return dict(plan, action='running', reason=f"being written by {holder}")
    for other in run.get('after', []):
        why = unfinished(by_name[other], seed)
        if why:
            return dict(plan, action='wait', reason=why)
    overrides, note = resolve_overrides(run, by_name)
    if overrides is None:
        return dict(plan, action='wait', reason=note)
    wanted = config_hash(predict_config(run, seed, overrides))
    plan.update(args=script_args(run, seed, overrides), config_hash=wanted)
    recorded, finished, has_last = run_state(out_dir)
    note = f" ({note})" if note else ""
    if recorded is None:
        action, reason = 'run', "no run yet"
    elif recorded != wanted:  # the campaign changed: its decision, but the old run is kept, and the plan says where
        action, reason = 'rerun', (f"config hash {recorded[:12]} differs from {wanted[:12]}: "
                                   f"{MOVED_ASIDE.format(out_dir)}")
    elif finished:
        action, reason = 'skip', f"done with the same config hash {wanted[:12]}"
    elif has_last:
        action, reason = 'resume', "same config hash, not finished: continue from last.pt"
    else:
        action, reason = 'rerun', (f"same config hash, not finished, no last.pt to resume from: "
                                   f"{MOVED_ASIDE.format(out_dir)}")
    return dict(plan, action=action, reason=reason + note)


def command(plan, interpreter=sys.executable):
    init = {'run': ['--init_from=scratch'], 'resume': ['--init_from=resume'],
            'rerun': ['--init_from=scratch', '--overwrite=True']}[plan['action']]
    return [interpreter, script_path(plan['script']), *plan['args'], *init]


FORWARDED = (signal.SIGTERM, signal.SIGUSR1)  # scancel; SLURM's warning before a time limit (--signal=B:USR1@N)


def execute(plan):
    """Run one planned run as a subprocess; its output goes to the terminal and to out_dir/sweep_log.txt. A Ctrl-C
    reaches the run too (one process group): the sweep waits while it saves, then stops (a second Ctrl-C aborts).
    SIGTERM and SIGUSR1 sent to the sweep alone are passed on to the run, and stop the sweep after it: under SLURM
    the sweep is the job's batch shell (exec), the one process SLURM's warning signal reaches. Ctrl-C is not passed
    on: the run has it already, and a second one would abort it."""
    os.makedirs(plan['out_dir'], exist_ok=True)
    cmd = command(plan)
    t0, STOP.armed, proc, pending = time.time(), True, None, []
    seen = {e.get('run_id') for e in events_of(plan['out_dir'])}  # this attempt's events have a new run_id

    def forward(signum, frame):
        previous[signum](signum, frame)  # common.STOP, armed: the sweep stops after this run
        if proc:
            proc.send_signal(signum)
        else:  # the run is being started: it gets the signal as soon as it is
            pending.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        with open(os.path.join(plan['out_dir'], 'sweep_log.txt'), 'a') as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} | {plan['action']} | {shlex.join(cmd)}\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            for signum in pending:
                proc.send_signal(signum)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    finished = run_state(plan['out_dir'])[:2] == (plan['config_hash'], True)
    STOP.armed = False
    # saved and stopped (a signal, Ctrl-C): resumable, also when the scheduler's kill after a requeue was faster
    saved = any(e.get('event') == 'end' and e.get('reason') in ('signal', 'interrupted') and e.get('run_id') not in
                seen for e in events_of(plan['out_dir']))
    if code == GATED_EXIT_CODE:
        status = 'gated'
    elif code == 0 and finished:
        status = 'done'
    else:
        status = 'interrupted' if code in (0, 130) or saved else 'failed'
    return dict(status=status, returncode=code, seconds=round(time.time() - t0, 1))


def record(entry):
    """Append one line to <out_root>/sweep.jsonl: the campaign's own history of what it ran or submitted and how it
    ended. One short write, so the lines of jobs that end at the same time never mix."""
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, 'sweep.jsonl'), 'a') as f:
        f.write(json.dumps(dict(time=time.strftime('%Y-%m-%d %H:%M:%S'), **entry)) + '\n')


def read_history():
    """What sweep.jsonl says of each run and seed: {(name, seed): (its latest job's id or None, how its latest attempt
    since that job ended: a status, or None)}. A submission line holds a job; an attempt line, an action that starts
    the run. A line that is not a JSON object stops the sweep, naming it."""
    path, history = os.path.join(out_root, 'sweep.jsonl'), {}
    try:
        with open(path, 'rb') as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return history
    except OSError as e:
        raise UserError(f"{path}: not readable ({e}); nothing was run") from None
    for n, raw in enumerate(lines, 1):
        try:
            entry = json.loads(raw) if raw.strip() else {}
            if not isinstance(entry, dict):
                raise ValueError(f"a JSON {type(entry).__name__}")
        except ValueError as e:  # UnicodeDecodeError is one too
            raise UserError(f"{path}, line {n}: not a JSON object ({e}); fix or delete the line (nothing was run)") \
                from None
        key = (entry.get('name'), entry.get('seed'))
        if 'job' in entry:
            history[key] = (entry['job'], None)
        elif entry.get('action') in ('run', 'resume', 'rerun'):
            history[key] = (history.get(key, (None, None))[0], entry.get('status'))
    return history


# -----------------------------------------------------------------------------
# SLURM: one job per run and seed, after the jobs of the runs it depends on; where each run and seed stands
# -----------------------------------------------------------------------------

QUEUED = ('PENDING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'RESV_DEL_HOLD')  # job states: waiting to (re)start
LIVE = QUEUED + ('RUNNING', 'CONFIGURING', 'COMPLETING', 'SUSPENDED', 'RESIZING', 'SIGNALING', 'STAGE_OUT', 'STOPPED')
NEVER_STARTS = 'DependencyNeverSatisfied'  # SLURM's reason for a job after one that ended with an exit code not 0
ENDED = ('failed', 'gated', 'stopped', 'blocked')  # standing(): a job that ended, or never starts, short of 'done'
# what a command does and how it submits, not what the campaign is: a job's command leaves them out (and sets its own)
MODE_KEYS = ('submit', 'dry_run', 'status', 'only', 'resubmit_failed', 'sbatch_args', 'warning_seconds')


def slurm(*cmd):
    """Run a SLURM command -> (exit code, stdout, stderr); one clear error where SLURM is not installed here."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found: SLURM jobs need its sbatch, squeue and scontrol on PATH") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{cmd[0]} gave no answer in 120 s: is slurmctld up? (nothing more was submitted)") from None
    return out.returncode, out.stdout, out.stderr.strip()


def job_states(ids):
    """{job id: dict(id, state, reason, exit_code)} of the jobs sweep.jsonl records: squeue lists the queued and
    running ones, `scontrol show job` those that ended (slurmctld keeps them MinJobAge, 300 s by default); a job
    neither knows is 'UNKNOWN'. Any other answer (slurmctld down) stops the sweep: a live job taken for an ended one
    would be submitted twice."""
    ids, jobs = list(dict.fromkeys(ids)), {}
    if ids:
        code, out, err = slurm('squeue', '-h', '-j', ','.join(ids), '-o', '%i %T %r')
        if code and 'Invalid job id' not in err:
            raise UserError(f"squeue: {err} (nothing was submitted)")
        for line in out.splitlines():
            job, state, reason = line.split(' ', 2)
            jobs[job] = dict(id=job, state=state, reason=reason, exit_code=None)
    for job in ids:
        if job not in jobs:
            code, out, err = slurm('scontrol', 'show', 'job', job)
            if code and 'Invalid job id' not in err:
                raise UserError(f"scontrol show job {job}: {err} (nothing was submitted)")
            fields = dict(word.split('=', 1) for word in out.split() if '=' in word)
            jobs[job] = dict(id=job, state=fields.get('JobState', 'UNKNOWN'), reason=fields.get('Reason', ''),
                             exit_code=fields.get('ExitCode'))
    return jobs


def standing(plan, job, attempt):
    """Where one run and seed stands -> (word, detail); word: done, running, queued, blocked (its job never starts),
    failed, gated, stopped (saved on a signal, resumable) or not started. The run directory first (decide()'s plan:
    facts and lock), then its latest job (None, or a job_states() dict), then how its latest attempt since that job
    ended (a sweep.jsonl status, or None)."""
    if plan['action'] in ('skip', 'running'):
        return ('done' if plan['action'] == 'skip' else 'running'), plan['reason']
    waits = f": {plan['reason']}" if plan['action'] == 'wait' else ''
    if job and job['reason'] == NEVER_STARTS:
        return 'blocked', f"job {job['state']} ({NEVER_STARTS}): a run it waits for ended without finishing"
    if job and job['state'] in LIVE:
        return ('queued' if job['state'] in QUEUED else 'running'), f"job {job['state']} ({job['reason']}){waits}"
    ended = job is not None and job['state'] != 'COMPLETED'  # a job exits 0 only when its run is done
    if ended or attempt in ('failed', 'gated', 'interrupted'):
        gated = attempt == 'gated' or ended and job['exit_code'] == f'{GATED_EXIT_CODE}:0'
        how = (f"job {job['state']}" + (f" (exit {job['exit_code']})" if job['exit_code'] else '') if ended else
               f"its last attempt {attempt}")
        return ('gated' if gated else 'stopped' if attempt == 'interrupted' else 'failed'), \
            f"{how}; see {plan['out_dir']}/sweep_log.txt"
    return 'not started', plan['reason']


def status_line(name, seed, word, job, detail):
    """One line of --status and of a submission, the same shape in both (grep/awk on ' | ')."""
    return f"{name} seed {seed} | {word} | {f'job {job}' if job else 'no job'} | {detail}"


def campaign_now():
    """[(run, seed, plan, job id, job, attempt)] per run and seed, what --status and submit='slurm' start from: its
    decision (plan_all: every run directory read first), its latest job and attempt in sweep.jsonl, and that job's
    state, asked of the scheduler for the runs that are not done."""
    plans, history = plan_all(), read_history()
    now = [(run, seed, plan, *history.get((run['name'], seed), (None, None))) for (run, seed), plan in
           zip(pairs(), plans)]
    jobs = job_states([job for _, _, plan, job, _ in now if job and plan['action'] != 'skip'])
    return [(run, seed, plan, job, jobs.get(job), attempt) for run, seed, plan, job, attempt in now]


def print_status():
    """--status: one line per run and seed, from its run directory, sweep.jsonl and, where that records jobs, the
    scheduler. Changes nothing."""
    for run, seed, plan, job_id, job, attempt in campaign_now():
        word, detail = standing(plan, job, attempt)
        print(status_line(run['name'], seed, word, job_id, detail))


def dependencies(run, seed):
    """The (name, seed) pairs whose jobs this run's job starts after: `after` runs, same seed; `best_of` runs, every
    seed (the pick is the mean over seeds)."""
    return list(dict.fromkeys([(name, seed) for name in run.get('after', [])] +
                              [(name, s) for name in run.get('best_of', {}).get('runs', []) for s in seeds]))


def sbatch_command(run, seed, after, argv):
    """The sbatch command of one run and seed, after the jobs `after`. Its body is this sweep (same interpreter,
    folder, campaign and keys: argv less MODE_KEYS) for just that run and seed, so its decision, best_of and gate are
    taken when it starts, by the same code; exec makes that sweep the batch shell, which SLURM's warning (B:)
    reaches."""
    body = [sys.executable, os.path.abspath(__file__),
            *[a for a in argv if not (a.startswith('--') and a[2:].split('=', 1)[0] in MODE_KEYS)],
            '--submit=local', f"--only={run['name']}:{seed}"]
    return ['sbatch', '--parsable', f"--job-name={run['name']}-s{seed}", f'--chdir={os.getcwd()}',
            f"--output={out_dir_of(run, seed)}/slurm-%j.out", '--open-mode=append',  # a requeued job adds to it
            '--requeue', f'--signal=B:USR1@{warning_seconds}', *sbatch_options(run),
            *([f"--dependency=afterok:{':'.join(after)}"] if after else []), '--wrap', f"exec {shlex.join(body)}"]


def submit_campaign(argv):
    """submit='slurm': one job per run and seed that is neither done nor has a live job, in campaign order, after the
    live jobs of the runs it depends on (those that are done drop out). A run whose job ended short of done is
    submitted again only with resubmit_failed (a job stuck behind it is cancelled and submitted anew); one that
    depends on a run with no job to wait for is not submitted. dry_run prints the commands instead, `<job of
    name:seed>` for the ids it would get. One line per run and seed; returns how many jobs were submitted."""
    ids, submitted, note = {}, 0, '# ' if dry_run else ''  # ids: what dependants wait for ('' = nothing: it is done)
    for run, seed, plan, job_id, job, attempt in campaign_now():
        key, (word, detail) = (run['name'], seed), standing(plan, job, attempt)
        if word == 'done' or job and job['state'] in LIVE and word != 'blocked':
            ids[key] = '' if word == 'done' else job_id
        if key in ids or word == 'running':  # running without a live job: another process writes it, no job of ours
            print(note + status_line(*key, word, job_id, detail))
            continue
        if job and word in ENDED and not resubmit_failed:
            print(note + status_line(*key, word, job_id, f"{detail}; --resubmit_failed=True submits it again"))
            continue
        missing = [f"{name} seed {s}" for name, s in dependencies(run, seed) if (name, s) not in ids]
        if missing:
            why = f"waits for {', '.join(missing)}, which has no live job to start after (see its line)"
            print(note + status_line(*key, 'blocked', job_id, why))
            continue
        after = [ids[d] for d in dependencies(run, seed) if ids[d]]
        cmd = sbatch_command(run, seed, after, argv)
        cancel = ['scancel', job_id] if word == 'blocked' else None  # its job waits for an ended one: never starts
        submitted += 1
        if dry_run:
            print('\n'.join(shlex.join(c) for c in (cancel, cmd) if c))
            ids[key] = f'<job of {run["name"]}:{seed}>'
            continue
        if cancel:
            slurm(*cancel)
        os.makedirs(plan['out_dir'], exist_ok=True)  # the job's slurm-<id>.out goes there from its first line
        code, out, err = slurm(*cmd)
        if code:
            raise UserError(f"sbatch refused {run['name']} seed {seed}: {err} ({submitted - 1} job(s) submitted "
                            f"before it are in sweep.jsonl: submitting again skips them)")
        ids[key] = out.strip().split(';')[0]  # --parsable: 'id' or 'id;cluster'
        record(dict(name=run['name'], seed=seed, job=ids[key], dependencies=after, sbatch=shlex.join(cmd)))
        print(status_line(*key, 'submitted', ids[key], f"after {', '.join(after)}" if after else "starts when it can"))
    return submitted


# -----------------------------------------------------------------------------
# the campaign: check everything, then each run in order, seeds inside
# -----------------------------------------------------------------------------

def plan_all():
    """Every run's decision now; later phases show 'wait' until their inputs have finished. Reading every run
    directory first is what makes a fact the sweep cannot read stop it before anything runs (or is printed)."""
    by_name = {run['name']: run for run in runs}
    return [decide(run, seed, by_name) for run, seed in pairs()]


def print_plan():
    """--dry_run: the plan, one line per run and seed."""
    for plan in plan_all():
        print(f"{plan['name']} seed {plan['seed']} | {plan['action']} | {plan['out_dir']} | {plan['reason']}")


def run_campaign():
    """Every run, one at a time, each decided just before it starts (earlier runs may have changed its inputs).
    Returns [(plan, result)]; a failed run is recorded and the next one starts unless stop_on_error."""
    by_name, todo, summary = {run['name']: run for run in runs}, pairs(), []
    for i, (run, seed) in enumerate(todo):
        plan = decide(run, seed, by_name)
        print(f"sweep {i + 1}/{len(todo)} | {plan['name']} seed {seed} | {plan['action']} | {plan['reason']}",
              flush=True)
        if plan['action'] in LEFT_ALONE:
            result = dict(status=LEFT_ALONE[plan['action']], returncode=None, seconds=0.0)
        else:
            result = execute(plan)
        record(dict(name=plan['name'], seed=seed, out_dir=plan['out_dir'], action=plan['action'],
                    reason=plan['reason'], config_hash=plan['config_hash'], **result))
        summary.append((plan, result))
        print(f"sweep {i + 1}/{len(todo)} | {plan['name']} seed {seed} | {result['status']} | "
              f"{result['seconds']:.1f}s", flush=True)
        if STOP.reason:  # Ctrl-C or SIGTERM: the run saved its last.pt; the next sweep resumes it
            print(f"sweep | stopping ({STOP.reason}): {plan['name']} seed {seed} ended {result['status']}; run the "
                  f"same command again to continue", flush=True)
            break
        if result['status'] == 'failed' and stop_on_error:
            print(f"sweep | stopping: {plan['name']} seed {seed} failed (exit {result['returncode']}) and "
                  f"stop_on_error=True", flush=True)
            break
    return summary


if __name__ == '__main__':
    check_campaign()
    if status:
        print_status()
        sys.exit(0)
    if submit == 'slurm':
        print(f"sweep | {'would submit' if dry_run else 'submitted'} {submit_campaign(sys.argv[1:])} job(s)")
        sys.exit(0)
    if dry_run:
        print_plan()
        sys.exit(0)
    plan_all()  # every run directory read before the first run starts (each is decided again just before it runs)
    summary = run_campaign()
    counts = {}
    for _, result in summary:
        counts[result['status']] = counts.get(result['status'], 0) + 1
    print("sweep done | " + " | ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    for plan, result in summary:
        if result['status'] in ('failed', 'interrupted'):
            print(f"  {result['status']}: {plan['name']} seed {plan['seed']} ({plan['out_dir']}/sweep_log.txt)")
        elif result['status'] in ('blocked', 'running'):  # it never started here: why
            print(f"  {result['status']}: {plan['name']} seed {plan['seed']} ({plan['reason']})")
    if only:  # the body of a job: afterok starts its dependants on exit 0 only, when this run is done; else the run's
        ended = summary[0][1]  # own exit code (2 bad input, 3 gated: what --status shows), or 1 (none, or a signal)
        sys.exit(0 if ended['status'] in ('done', 'skipped') else max(ended['returncode'] or 1, 1))
    sys.exit(130 if STOP.reason == 'interrupted' else 1 if counts.get('failed') else 0)
