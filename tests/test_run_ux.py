"""What a person at the keyboard meets in every train script, run as subprocesses: Ctrl-C saves and says how to
continue, resuming takes only --out_dir, a signal during start-up exits cleanly, bad values are refused before any
work with one line, --help shows the script's own keys, and a split smaller than one batch still trains."""
import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, TINY_SLM, run_script, signal_when_logged

import sweep
from common import UserError, configure
from data import write_sign_csvs, write_sleep_sounds

SCRIPTS = ('train_slm.py', 'train_spoter.py', 'train_audio.py', 'train_kd.py', 'train_vae.py')


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, corpus):
    """Tiny data in the real formats and the arguments that make each script take a few seconds."""
    folder = tmp_path_factory.mktemp('ux')
    csvs = write_sign_csvs(str(folder / 'signs'), num_classes=4, clips_per_class=(8, 3, 3), seed=0)
    manifest = write_sleep_sounds(str(folder / 'sounds'), n_clips=60, seed=2)
    audio = ['--device=cpu', '--clip_seconds=0.5', '--num_workers=0', f'--manifest={manifest}',
             f"--cache_dir={folder / 'cache'}"]
    return {
        'train_slm.py': [*TINY_SLM, f'--dataset={corpus}', '--max_iters=300', '--eval_interval=150'],
        'train_spoter.py': ['--device=cpu', '--batch_size=4', '--max_epochs=3', '--log_interval=1',
                            *(f'--{k}_csv={p}' for k, p in zip(('train', 'val', 'test'), csvs))],
        'train_audio.py': [*audio, '--batch_size=2', '--max_epochs=3', '--patience=99', '--log_interval=1'],
        'train_vae.py': ['--device=cpu', '--batch_size=32', '--dataset_kind=grids', '--num_images=600',
                         '--max_epochs=3', '--log_interval=1', f"--cache_dir={folder / 'cache'}"],
        'audio': audio, 'folder': folder,
    }


def events(run_dir):
    return [json.loads(line) for line in (run_dir / 'events.jsonl').read_text().splitlines()]


def weights(path):
    return torch.load(path, weights_only=True)['model_state_dict']


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize('script', ['train_slm.py', 'train_spoter.py', 'train_audio.py', 'train_vae.py'])
def test_ctrl_c_saves_then_resume_with_only_out_dir_finishes_the_run(inputs, tmp_path, script):
    waits = {'train_slm.py': 'iter 5/'}.get(script, 'step 2/')  # a progress line of the first epoch
    code, stdout, stderr = signal_when_logged(script, *inputs[script], cwd=tmp_path, out_dir='out/c', text=waits,
                                              sig=signal.SIGINT)
    run_dir = tmp_path / 'out' / 'c'
    assert code == 130 and 'Traceback' not in stderr, stderr
    assert re.search(rf"^stopped \(Ctrl-C\) at (iter|epoch) .* \| saved out/c/last.pt \| continue: python "
                     rf"{re.escape(str(ROOT / script))} --out_dir=out/c --init_from=resume$", stdout, re.M), stdout
    assert events(run_dir)[-1]['event'] == 'end' and events(run_dir)[-1]['reason'] == 'interrupted'
    saved = torch.load(run_dir / 'last.pt', weights_only=True)
    assert saved['iter_num' if script == 'train_slm.py' else 'step_in_epoch'] > 0  # it stopped mid-way, not at 0
    # the command it printed, as printed: every other key (tiny model, data, device) comes from the saved run
    run_script(script, '--out_dir=out/c', '--init_from=resume', cwd=tmp_path)
    facts = json.loads((run_dir / 'config.json').read_text())
    assert facts['changed'] == {} and facts['resumed_from'] == 'out/c/last.pt'
    assert events(run_dir)[-1]['reason'] == 'done'
    if script == 'train_slm.py':  # and the run continued exactly (the SIGTERM tests check every script)
        run_script(script, *inputs[script], '--out_dir=out/u', cwd=tmp_path)
        a, b = weights(run_dir / 'last.pt'), weights(tmp_path / 'out' / 'u' / 'last.pt')
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_aborts_at_once(inputs, tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / 'train_slm.py'), *inputs['train_slm.py'],
                             '--max_iters=100000', '--eval_interval=100000', '--out_dir=out/x'], cwd=tmp_path,
                            env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / 'out' / 'x' / 'log.txt', time.time() + 120
    while not (log.exists() and 'iter 5/' in log.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # before the loop comes round to saving
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'Traceback' not in stderr
    assert 'aborted by a second Ctrl-C' in stderr or 'stopped (Ctrl-C)' in stdout  # the first may win the race


@pytest.mark.parametrize('script', SCRIPTS)
@pytest.mark.parametrize('sig, code, message', [(signal.SIGTERM, 143, 'stopped by SIGTERM before a run directory'),
                                                (signal.SIGINT, 130, 'interrupted (Ctrl-C) before a run directory')])
def test_a_signal_during_start_up_exits_cleanly_and_writes_nothing(tmp_path, script, sig, code, message):
    proc = subprocess.Popen([sys.executable, str(ROOT / script), '--out_dir=out/early'], cwd=tmp_path, env=SCRIPT_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # inside the imports (torch alone takes ~1.5 s here)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code and message in stderr and 'Traceback' not in stderr, (proc.returncode, stderr)
    assert not (tmp_path / 'out').exists()


def test_ctrl_c_while_the_built_in_data_is_made_leaves_no_half_file(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / 'train_vae.py'), '--num_images=200000', '--device=cpu'],
                            cwd=tmp_path, env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4.0)  # the sprites take ~80 s: well inside
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'interrupted (Ctrl-C) before a run directory was written' in stderr, stderr
    assert not list(tmp_path.rglob('*.npz*')) and not (tmp_path / 'out').exists()


BAD_VALUES = [  # (script, arguments, the error line's text): a value refused before data preparation
    ('train_slm.py', ['--dtype=fp16'], "command line: dtype='fp16': expected one of 'auto', 'float32', 'bfloat16'"),
    ('train_slm.py', ['--n_embd=100', '--n_head=3'], "n_embd=100 is not a multiple of n_head=3"),
    ('train_spoter.py', ['--pos_embedding=sinusoidal'], "pos_embedding='sinusoidal': expected one of 'learned', "
                                                        "'single'"),
    ('train_audio.py', ['--arch=cnn'], "arch='cnn': expected one of 'crnn', 'tinycnn', 'tinycnn_cbam'; did you mean "
                                       "'crnn'?"),
    ('train_audio.py', ['--cbam_kernel=4'], "cbam_kernel=4: expected an odd size"),
    ('train_kd.py', ['--alpha=1.5'], "alpha=1.5: expected a value in [0, 1]"),
    ('train_vae.py', ['--recon_loss=bce'], "recon_loss='bce': expected one of 'ce', 'focal'"),
]
MORE_BAD_VALUES = [  # the same checks, made by configure() on the script's own defaults (no process to start)
    ('train_slm.py', ['--dropout=1.0'], "command line: dropout=1.0: expected a value in [0, 1)"),
    ('train_slm.py', ['--device=gpu'], "device='gpu': expected one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"),
    ('train_spoter.py', ['--batch_size=0'], "batch_size=0: expected a value in [1, inf)"),
    ('train_spoter.py', ['--checkpoint_epochs=[10, 0]'], "checkpoint_epochs=[10, 0]: expected a value in [1, inf)"),
    ('train_audio.py', ['--model=crnn'], "unknown config key 'model' (renamed 'arch')"),
    ('train_kd.py', ['--rnn_pool=max'], "rnn_pool='max': expected one of 'last', 'mean'"),
    ('train_kd.py', ['--temperature=0'], "temperature=0.0: expected a value in (0, inf)"),
    ('train_vae.py', ['--latent_dim=0'], "latent_dim=0: expected a value in [1, inf)"),
    ('train_vae.py', ['--val_fraction=1.0'], "val_fraction=1.0: expected a value in (0, 1)"),
    ('train_vae.py', ['--objective=elbo'], "objective='elbo': expected one of 'beta', 'capacity', 'tc', 'factor'"),
    ('sample.py', ['--num_samples=0'], "num_samples=0: expected a value in [1, inf)"),
]


@pytest.mark.parametrize('script, args, message', BAD_VALUES)
def test_a_bad_value_is_one_line_before_any_work(tmp_path, script, args, message):
    t0 = time.time()
    proc = run_script(script, *args, '--out_dir=out/bad', cwd=tmp_path, check=False)
    seconds = time.time() - t0  # reported, not asserted: the interpreter and torch's import are most of it
    assert proc.returncode == 2 and proc.stderr.startswith('error: ') and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout, (proc.stdout, seconds)
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'cache').exists()  # no run, no data prepared


@pytest.mark.parametrize('script, args, message', MORE_BAD_VALUES)
def test_configure_refuses_a_bad_value_of_each_script(script, args, message):
    with pytest.raises(UserError) as e:
        configure(dict(sweep.script_defaults(script)), args)
    assert message in str(e.value)


def test_a_bad_value_aimed_at_a_finished_run_changes_nothing(inputs, tmp_path):
    run_script('train_spoter.py', *inputs['train_spoter.py'], '--max_epochs=1', '--out_dir=out/kept', cwd=tmp_path)
    before = digests(tmp_path / 'out' / 'kept')
    for args in (['--opt=adam'], ['--init_from=resume', '--max_frames=0'], ['--init_from=resume', '--num_classes=7']):
        proc = run_script('train_spoter.py', '--out_dir=out/kept', '--overwrite=True', *args, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
    assert "num_classes=7 (the checkpoint's: 0)" in proc.stderr
    assert digests(tmp_path / 'out' / 'kept') == before


def test_resume_applies_and_lists_a_changed_training_key(inputs, tmp_path):
    """The learning rate rule: the config's (here changed on the command line) is the one the optimizer uses and
    scalars.csv logs; the checkpoint's optimizer state keeps only its moments."""
    run_script('train_spoter.py', *inputs['train_spoter.py'], '--max_epochs=1', '--out_dir=out/lr', cwd=tmp_path)
    proc = run_script('train_spoter.py', '--out_dir=out/lr', '--init_from=resume', '--max_epochs=2',
                      '--learning_rate=1e-4', cwd=tmp_path)
    assert 'changed: max_epochs 1 -> 2, learning_rate 0.0003 -> 0.0001' in proc.stdout
    run_dir = tmp_path / 'out' / 'lr'
    assert json.loads((run_dir / 'config.json').read_text())['changed'] == {'max_epochs': [1, 2],
                                                                            'learning_rate': [0.0003, 0.0001]}
    ckpt = torch.load(run_dir / 'last.pt', weights_only=True)
    assert ckpt['optimizer_state_dict']['param_groups'][0]['lr'] == 1e-4 and ckpt['args']['learning_rate'] == 1e-4
    lrs = [line.split(',')[2] for line in (run_dir / 'scalars.csv').read_text().splitlines()[1:]]
    assert lrs == ['0.0003', '0.0001']


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_shows_the_scripts_own_keys_with_whole_comments(script, capsys):
    with pytest.raises(SystemExit):  # configure() on the script's own globals, as `python script --help` runs it
        configure(dict(sweep.script_defaults(script)), ['--help'])
    out = capsys.readouterr().out
    keys = re.findall(r'^  --(\w+)=', out, re.M)
    assert {'out_dir', 'init_from', 'seed', 'device', 'dtype', 'compile', 'log_interval'} <= set(keys)
    assert not {'UNK', 'AUDIO_FEATURES', 'AUDIO_RECIPE', 'SCHEMA_VERSION', 'PAD'} & set(keys)
    assert all(re.search(rf'^  --{k}=.*# \S', out, re.M) for k in keys), out  # every key has its text
    if script in ('train_audio.py', 'train_kd.py'):  # a comment continued on the next line is shown whole
        assert re.search(r"# DataLoader workers \(seed 001: 4;\s+on 2 cores 0 is fastest", out)
    if script == 'train_slm.py':  # a key reassigned below configure() keeps the text of its default
        assert re.search(r"--stride=0\s+# distance between training window starts", out)


def test_help_runs_as_a_command(tmp_path):
    proc = run_script('train_vae.py', '--help', cwd=tmp_path)
    assert proc.stdout.startswith('usage: python train_vae.py [config.py ...] [--key=value ...]')
    assert re.search(r"^  --max_epochs=30\s+# training epochs", proc.stdout, re.M)  # reassigned below too


def test_a_split_smaller_than_one_batch_trains_on_the_partial_batch(inputs, tmp_path):
    folder = inputs['folder']
    proc = run_script('train_audio.py', *inputs['audio'], '--batch_size=64', '--max_epochs=1', '--out_dir=out/a',
                      cwd=tmp_path)
    n_train = int(re.search(r'^train: (\d+) clips', proc.stdout, re.M)[1])
    assert n_train < 64 and f"train: {n_train} clips cannot fill batch_size=64 on 1 rank(s): batches of {n_train}" \
        in proc.stdout
    assert events(tmp_path / 'out' / 'a')[-1]['reason'] == 'done'
    proc = run_script('train_vae.py', '--device=cpu', '--dataset_kind=grids', '--num_images=40', '--max_epochs=1',
                      f"--cache_dir={folder / 'cache'}", '--out_dir=out/v', cwd=tmp_path)
    assert 'train: 38 images cannot fill batch_size=64: batches of 38' in proc.stdout
    assert torch.load(tmp_path / 'out' / 'v' / 'last.pt', weights_only=True)['iter_num'] == 1


def slurm_job_env(tmp_path):
    """The environment of SLURM job 4242 with a stand-in scontrol on PATH that appends its arguments to
    tmp_path/scontrol.txt."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'scontrol').write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.txt'}\n")
    (bin_dir / 'scontrol').chmod(0o755)
    return dict(SCRIPT_ENV, SLURM_JOB_ID='4242', PATH=f"{bin_dir}:{SCRIPT_ENV['PATH']}")


def test_under_slurm_the_warning_signal_saves_and_requeues_the_job(inputs, tmp_path):
    """SIGUSR1 with SLURM_JOB_ID set: save, then `scontrol requeue <job>` (a stand-in scontrol on PATH records its
    arguments); SIGTERM (scancel) saves without requeueing. The real scheduler: tests/test_slurm.py."""
    env = slurm_job_env(tmp_path)
    for sig, out_dir in ((signal.SIGUSR1, 'out/warned'), (signal.SIGTERM, 'out/cancelled')):
        proc = subprocess.Popen([sys.executable, str(ROOT / 'train_slm.py'), *inputs['train_slm.py'],
                                 f'--out_dir={out_dir}'], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
        log, deadline = tmp_path / out_dir / 'log.txt', time.time() + 60
        while not (log.exists() and 'iter 20/' in log.read_text()) and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert proc.returncode == 0 and (tmp_path / out_dir / 'last.pt').exists()
        end = events(tmp_path / out_dir)[-1]
        assert end['reason'] == 'signal' and end.get('requeue') == ('4242' if sig == signal.SIGUSR1 else None)
    assert (tmp_path / 'scontrol.txt').read_text() == 'requeue 4242\n'  # once: for SIGUSR1 only
    assert 'requeued SLURM job 4242' in (tmp_path / 'out/warned/log.txt').read_text()


@pytest.mark.parametrize('delay', [0.3, 1.0])  # inside common's import of torch, then in the script's own start-up
def test_under_slurm_the_warning_signal_during_start_up_requeues_at_once(tmp_path, delay):
    env = slurm_job_env(tmp_path)
    proc = subprocess.Popen([sys.executable, str(ROOT / 'train_slm.py'), '--out_dir=out/early'], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGUSR1)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0 and 'Traceback' not in stderr and 'requeued SLURM job 4242' in stderr, stderr
    assert (tmp_path / 'scontrol.txt').read_text() == 'requeue 4242\n' and not (tmp_path / 'out').exists()
