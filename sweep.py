"""
Run a campaign: a list of train_*.py runs (script, config file, overrides) over one or more seeds, one at a time,
each as a subprocess of this same interpreter, or printed as sbatch lines. Restarted, it picks up where it was:
a run whose out_dir holds a finished run (end event 'done') with the same config hash is skipped, one with a
different hash is re-run from scratch, a half-finished one with the same hash is resumed from its last.pt.

    python sweep.py config/campaign_audio.py --dry_run=True      # the plan: skip / run / resume / rerun, and why
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
import json
import os
import shlex
import subprocess
import sys
import time

from common import STOP, UserError, config_hash, configure, read_events, run_finished

# -----------------------------------------------------------------------------
# default config (a campaign config file sets runs and seeds; the command line the rest)
# -----------------------------------------------------------------------------
runs = []  # the campaign: a list of run dicts (name, script, config, overrides, after, best_of), in order
seeds = [42]  # every run is made once per seed (seed loop inside the run loop: a phase ends before the next)
out_root = 'out/campaign'  # run i, seed s writes to <out_root>/<name>/seed<s>; the campaign log is sweep.jsonl here
dry_run = False  # print the plan (skip / run / resume / rerun / wait, and why) and run nothing
sbatch = False  # print one sbatch line per run that is not done, instead of running them
sbatch_args = '--gres=gpu:1 --requeue'  # extra sbatch options for every line
stop_on_error = False  # stop the campaign at the first failed run (default: record it and go on)
if __name__ == '__main__':
    config = configure(globals())
# -----------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
SET_BY_SWEEP = ('seed', 'out_dir', 'init_from', 'overwrite')  # every script must have these; the sweep sets them
GATED_EXIT_CODE = 3  # a script that refuses to run on its gate (train_kd.py) exits 3: recorded 'gated', not failed


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
    names = set()
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not run.get('name') or not run.get('script'):
            raise UserError(f"campaign run #{i}: expected a dict with 'name' and 'script', got {run!r}")
        unknown = set(run) - {'name', 'script', 'config', 'overrides', 'after', 'best_of'}
        if unknown:
            raise UserError(f"campaign run '{run['name']}': unknown field(s) {sorted(unknown)}")
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

def run_state(out_dir):
    """-> (recorded config_hash or None, finished: bool (common.run_finished), has last.pt, why not readable or
    None)."""
    try:
        with open(os.path.join(out_dir, 'config.json')) as f:
            recorded = json.load(f)['config_hash']
        events = read_events(out_dir)
    except FileNotFoundError:
        return None, False, os.path.exists(os.path.join(out_dir, 'last.pt')), None
    except (ValueError, KeyError, TypeError, UserError) as e:
        return None, False, os.path.exists(os.path.join(out_dir, 'last.pt')), f"unreadable facts ({e})"
    return recorded, run_finished(events) is not None, os.path.exists(os.path.join(out_dir, 'last.pt')), None


def best_metric(out_dir, metric, mode):
    """The best value of a validation column of a run's scalars.csv (None if it has none)."""
    import csv
    path = os.path.join(out_dir, 'scalars.csv')
    if not os.path.exists(path):
        return None
    with open(path, newline='') as f:
        values = [float(row[metric]) for row in csv.DictReader(f) if row.get(metric) not in (None, '')]
    return (max if mode == 'max' else min)(values) if values else None


# -----------------------------------------------------------------------------
# the decision for one run: skip / run / resume / rerun / wait
# -----------------------------------------------------------------------------

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
            out_dir = out_dir_of(by_name[name], seed)
            recorded, finished, _, _ = run_state(out_dir)
            value = best_metric(out_dir, spec['metric'], spec.get('mode', 'max')) if finished else None
            if value is None:
                return None, f"best_of waits for {name} seed {seed} to finish"
            values.append(value)
        scores[name] = sum(values) / len(values)
    pick = (max if spec.get('mode', 'max') == 'max' else min)(scores, key=scores.get)
    with open(os.path.join(out_dir_of(by_name[pick], seeds[0]), 'config.json')) as f:
        chosen = json.load(f)['config']
    overrides.update({k: chosen[k] for k in spec['keys']})
    return overrides, f"best_of: {pick} (mean {spec['metric']} {scores[pick]:.4f})"


def decide(run, seed, by_name):
    """-> dict(action, reason, args, config_hash, out_dir); action in skip, run, resume, rerun, wait."""
    out_dir = out_dir_of(run, seed)
    plan = dict(name=run['name'], seed=seed, out_dir=out_dir, script=run['script'], args=None, config_hash=None)
    for other in run.get('after', []):
        if not run_state(out_dir_of(by_name[other], seed))[1]:
            return dict(plan, action='wait', reason=f"waits for {other} seed {seed} to finish")
    overrides, note = resolve_overrides(run, by_name)
    if overrides is None:
        return dict(plan, action='wait', reason=note)
    wanted = config_hash(predict_config(run, seed, overrides))
    plan.update(args=script_args(run, seed, overrides), config_hash=wanted)
    recorded, finished, has_last, broken = run_state(out_dir)
    note = f" ({note})" if note else ""
    if broken:
        return dict(plan, action='rerun', reason=f"{broken}{note}")
    if recorded is None:
        action, reason = ('rerun', "checkpoints but no config.json") if has_last else ('run', "no run yet")
    elif recorded != wanted:
        action, reason = 'rerun', f"config hash {recorded[:12]} differs from {wanted[:12]}"
    elif finished:
        action, reason = 'skip', f"done with the same config hash {wanted[:12]}"
    elif has_last:
        action, reason = 'resume', "same config hash, not finished: continue from last.pt"
    else:
        action, reason = 'rerun', "same config hash, not finished, no last.pt to resume from"
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
    if plan['action'] in ('skip', 'wait'):
        return f"# {plan['action']} {plan['name']} seed {plan['seed']}: {plan['reason']}"
    cmd = command(plan)
    if plan['action'] == 'run':  # requeue-safe: a requeued job continues its own last.pt
        cmd[-1] = '--init_from=auto'
    return (f"sbatch --job-name={plan['name']}-s{plan['seed']} --output={plan['out_dir']}/slurm-%j.out "
            f"{sbatch_args} --wrap {shlex.quote(shlex.join(cmd))}")


# -----------------------------------------------------------------------------
# the campaign: check everything, then each run in order, seeds inside
# -----------------------------------------------------------------------------

def print_plan():
    """--dry_run / --sbatch: each run's decision now; later phases show 'wait' until their inputs have finished."""
    by_name = {run['name']: run for run in runs}
    for run in runs:
        for seed in seeds:
            plan = decide(run, seed, by_name)
            if sbatch:
                print(sbatch_line(plan))
            else:
                print(f"{plan['name']} seed {seed} | {plan['action']} | {plan['out_dir']} | {plan['reason']}")


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
        if plan['action'] in ('skip', 'wait'):
            result = dict(status='skipped' if plan['action'] == 'skip' else 'blocked', returncode=None, seconds=0.0)
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
    summary = run_campaign()
    counts = {}
    for _, result in summary:
        counts[result['status']] = counts.get(result['status'], 0) + 1
    print("sweep done | " + " | ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    for plan, result in summary:
        if result['status'] in ('failed', 'interrupted', 'blocked'):
            print(f"  {result['status']}: {plan['name']} seed {plan['seed']} ({plan['out_dir']}/sweep_log.txt)")
    sys.exit(130 if STOP.reason == 'interrupted' else 1 if counts.get('failed') else 0)
