"""
Run a campaign: a list of train_*.py runs (script, config file, overrides) over one or more seeds, one at a time,
each as a subprocess of this same interpreter, or printed as sbatch lines. Restarted, it picks up where it was:
a run whose out_dir holds a finished run (end event 'done') with the same config hash is skipped, one with a
different hash is re-run from scratch (the script moves the old run aside to <out_dir>.replaced-<time>), a
half-finished one with the same hash is resumed from its last.pt, one that another process is writing now (its lock)
is left to it. A run directory whose facts cannot be read (a garbage line in events.jsonl, a config.json missing
beside its checkpoints, a scalars.csv best_of cannot rank) stops the sweep, the plan too, with one message naming the
file, before anything runs: the sweep never guesses that a run it cannot read may be replaced.

    python sweep.py config/campaign_audio.py --dry_run=True      # the plan: skip / run / resume / rerun / wait, why
    python sweep.py config/campaign_audio.py                     # run it (again: only what is not done yet)
    python sweep.py config/campaign_audio.py --sbatch=True       # one sbatch line per run instead
    python sweep.py config/campaign_audio_quick.py --seeds="[1, 2, 3]"

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
Names in a campaign config that start with '_' are the config's own helpers, not keys.
"""
import ast
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time

from common import STOP, UserError, config_hash, configure, lock_holder, read_events, run_finished

# -----------------------------------------------------------------------------
# default config (a campaign config file sets runs and seeds; the command line the rest)
# -----------------------------------------------------------------------------
runs = []  # the campaign: a list of run dicts (name, script, config, overrides, after, best_of), in order
seeds = [42]  # every run is made once per seed (seed loop inside the run loop: a phase ends before the next)
out_root = 'out/campaign'  # run i, seed s writes to <out_root>/<name>/seed<s>; the campaign log is sweep.jsonl here
dry_run = False  # print the plan (skip / run / resume / rerun / wait / running, and why) and run nothing
sbatch = False  # print one sbatch line per run that is not done, instead of running them
sbatch_args = '--gres=gpu:1 --requeue'  # extra sbatch options for every line
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
        unknown = set(run) - {'name', 'script', 'config', 'overrides', 'after', 'best_of'}
        if unknown:
            raise UserError(f"campaign run '{run['name']}': unknown field(s) {sorted(unknown)}")
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


def execute(plan):
    """Run one planned run as a subprocess; its output goes to the terminal and to out_dir/sweep_log.txt. A Ctrl-C
    reaches the run too (one process group): the sweep waits while it saves, then stops (a second Ctrl-C aborts)."""
    os.makedirs(plan['out_dir'], exist_ok=True)
    cmd = command(plan)
    t0, STOP.armed = time.time(), True
    with open(os.path.join(plan['out_dir'], 'sweep_log.txt'), 'a') as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} | {plan['action']} | {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    finished = run_state(plan['out_dir'])[:2] == (plan['config_hash'], True)
    STOP.armed = False
    if code == GATED_EXIT_CODE:
        status = 'gated'
    elif code == 0 and finished:
        status = 'done'
    else:
        status = 'interrupted' if code in (0, 130) else 'failed'  # saved and stopped (a signal, Ctrl-C): resumable
    return dict(status=status, returncode=code, seconds=round(time.time() - t0, 1))


def record(entry):
    """Append one line to <out_root>/sweep.jsonl: the campaign's own history of what it ran and how it ended."""
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, 'sweep.jsonl'), 'a') as f:
        f.write(json.dumps(dict(time=time.strftime('%Y-%m-%d %H:%M:%S'), **entry)) + '\n')


def sbatch_line(plan):
    if plan['action'] in LEFT_ALONE:
        return f"# {plan['action']} {plan['name']} seed {plan['seed']}: {plan['reason']}"
    cmd = command(plan)
    if plan['action'] == 'run':  # requeue-safe: a requeued job continues its own last.pt
        cmd[-1] = '--init_from=auto'
    return (f"sbatch --job-name={plan['name']}-s{plan['seed']} --output={plan['out_dir']}/slurm-%j.out "
            f"{sbatch_args} --wrap {shlex.quote(shlex.join(cmd))}")


# -----------------------------------------------------------------------------
# the campaign: check everything, then each run in order, seeds inside
# -----------------------------------------------------------------------------

def plan_all():
    """Every run's decision now; later phases show 'wait' until their inputs have finished. Reading every run
    directory first is what makes a fact the sweep cannot read stop it before anything runs (or is printed)."""
    by_name = {run['name']: run for run in runs}
    return [decide(run, seed, by_name) for run in runs for seed in seeds]


def print_plan():
    """--dry_run / --sbatch: the plan, one line per run and seed."""
    for plan in plan_all():
        if sbatch:
            print(sbatch_line(plan))
        else:
            print(f"{plan['name']} seed {plan['seed']} | {plan['action']} | {plan['out_dir']} | {plan['reason']}")


def run_campaign():
    """Every run, one at a time, each decided just before it starts (earlier runs may have changed its inputs).
    Returns [(plan, result)]; a failed run is recorded and the next one starts unless stop_on_error."""
    by_name = {run['name']: run for run in runs}
    todo = [(run, seed) for run in runs for seed in seeds]
    summary = []
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
    if dry_run or sbatch:
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
    sys.exit(130 if STOP.reason == 'interrupted' else 1 if counts.get('failed') else 0)
