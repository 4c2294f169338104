"""train_audio.py run as a user runs it, on a tiny WAV set + manifest: the three configs, artifacts, early
stopping, resume equivalence, pre-emption, and bad input."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, run_script, sigterm_when_logged

from data import write_sleep_sounds

TINY = ['--device=cpu', '--clip_seconds=0.5', '--batch_size=8', '--num_workers=0']


@pytest.fixture(scope='module')
def sounds(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sounds')
    manifest = write_sleep_sounds(str(folder), n_clips=60, seed=2)
    return [f'--manifest={manifest}', f"--cache_dir={folder / 'cache'}"]


def audio(cwd, *args, check=True):
    return run_script('train_audio.py', *TINY, *args, cwd=cwd, check=check)


EPOCH_1_DONE = 'epoch 1/1000 | train/loss'  # the line of the first finished epoch


def events(run_dir):
    return [json.loads(line) for line in (run_dir / 'events.jsonl').read_text().splitlines()]


def weights(path):
    return torch.load(path, weights_only=True)['model_state_dict']


@pytest.mark.parametrize('config,params', [('audio_tinycnn', '23,491'), ('audio_crnn', '73,411'),
                                           ('audio_tinycnn_cbam', '23,801')])
def test_configs_train_and_write_their_artifacts(tmp_path, sounds, config, params):
    workers = ['--num_workers=2'] if config == 'audio_tinycnn_cbam' else []  # lazy HDF5 opens in 2 workers
    audio(tmp_path, f'{ROOT}/config/{config}.py', *sounds, '--max_epochs=2', '--out_dir=out/run', *workers)
    run = tmp_path / 'out' / 'run'
    assert f'parameters: {params}' in (run / 'model.txt').read_text()
    header = (run / 'scalars.csv').read_text().splitlines()[0].split(',')
    assert header[:4] == ['epoch', 'time_s', 'lr', 'train/loss'] and {'val/loss', 'val/acc', 'val/macro_f1'} <= set(header)
    end = events(run)[-1]
    assert end['event'] == 'end' and {'test/acc', 'test/macro_f1', 'per_class', 'confusion'} <= set(end)
    assert set(end['per_class']) == {'quiet', 'breathe', 'snore'}
    confusion = torch.tensor(end['confusion'])
    assert abs(confusion.diagonal().sum().item() / confusion.sum().item() - end['test/acc']) < 1e-9
    assert (run / 'confusion_matrix.csv').read_text().startswith('true\\pred,quiet,breathe,snore')
    assert len((run / 'test_per_class.csv').read_text().splitlines()) == 4
    ckpt = torch.load(run / 'best.pt', weights_only=True)
    assert {'optimizer_state_dict', 'rng_state', 'input_stats', 'model_args', 'args'} <= set(ckpt)
    assert ckpt['model_args']['arch'] == config.removeprefix('audio_')


def test_early_stopping_is_strict_and_the_test_uses_best(tmp_path, sounds):
    # lr 0: val macro-F1 never strictly improves after epoch 1, so patience 2 stops after epoch 3
    audio(tmp_path, *sounds, '--learning_rate=0', '--patience=2', '--max_epochs=10', '--out_dir=out/es')
    end = events(tmp_path / 'out' / 'es')[-1]
    assert end['epochs'] == 3 and end['stopped'] == 'early_stop'
    assert torch.load(tmp_path / 'out' / 'es' / 'best.pt', weights_only=True)['epoch'] == 1


def test_resume_equals_uninterrupted(tmp_path, sounds):
    audio(tmp_path, *sounds, '--max_epochs=4', '--patience=99', '--out_dir=out/a')
    audio(tmp_path, *sounds, '--max_epochs=2', '--patience=99', '--out_dir=out/b')
    audio(tmp_path, *sounds, '--max_epochs=4', '--patience=99', '--out_dir=out/b', '--init_from=resume')
    a, b = weights(tmp_path / 'out' / 'a' / 'last.pt'), weights(tmp_path / 'out' / 'b' / 'last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda name: [r.split(',')[3:] for r in (tmp_path / 'out' / name / 'scalars.csv').read_text().splitlines()]  # noqa: E731
    assert [r[:4] for r in rows('a')] == [r[:4] for r in rows('b')]  # train/val losses, acc, F1 per epoch


def test_sigterm_mid_epoch_then_auto_resume_is_exact(tmp_path, sounds):
    code, stdout, stderr = sigterm_when_logged('train_audio.py', *TINY, '--batch_size=2', *sounds, '--max_epochs=1000',
                                               '--patience=999', cwd=tmp_path, out_dir='out/s', text=EPOCH_1_DONE,
                                               delay=0.2)  # land inside epoch 2
    assert code == 0 and 'stopped (signal) at epoch' in stdout, stderr
    total = torch.load(tmp_path / 'out' / 's' / 'last.pt', weights_only=True)['epoch'] + 2
    common = [*TINY, '--batch_size=2', *sounds, f'--max_epochs={total}', '--patience=999']
    run_script('train_audio.py', *common, '--out_dir=out/s', '--init_from=auto', cwd=tmp_path)
    run_script('train_audio.py', *common, '--out_dir=out/u', cwd=tmp_path)
    resumed, straight = weights(tmp_path / 'out' / 's' / 'last.pt'), weights(tmp_path / 'out' / 'u' / 'last.pt')
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, sounds):
    audio(tmp_path, *sounds, '--max_epochs=1', '--out_dir=out/n')
    last = tmp_path / 'out' / 'n' / 'last.pt'
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    # lr 1e308 sends the weights to +-inf in one Adam step, so a later loss is nan
    proc = audio(tmp_path, *sounds, '--max_epochs=3', '--out_dir=out/n', '--init_from=resume',
                 '--learning_rate=1e308', check=False)
    assert proc.returncode == 1 and 'training loss is nan' in proc.stderr, proc.stderr
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert events(tmp_path / 'out' / 'n')[-1]['event'] == 'error'


def test_bad_inputs_are_clear_and_destroy_nothing(tmp_path, sounds):
    audio(tmp_path, *sounds, '--max_epochs=1', '--out_dir=out/kept')
    kept = {p.name: p.read_bytes() for p in (tmp_path / 'out' / 'kept').iterdir()}
    manifest = sounds[0].split('=', 1)[1]
    bad = tmp_path / 'bad.csv'
    bad.write_text(open(manifest).read().replace('snore', 'dog'))
    cases = [
        (['--class_weights=[1.0, 2.0]'], 'class_weights=[1.0, 2.0]: expected 3 weights'),
        ([f'--manifest={bad}', f'--audio_root={ROOT}'], "label 'dog' is not in label_map"),
        (['--data=waves.npz'], 'give exactly one audio source'),
        ([], 'already holds'),  # a scratch start into a run directory with checkpoints
    ]
    for extra, message in cases:  # --overwrite=True: even a start allowed to overwrite fails before it writes
        overwrite = ['--overwrite=True'] if extra else []
        proc = audio(tmp_path, *sounds, *extra, *overwrite, '--out_dir=out/kept', check=False)
        assert proc.returncode == 2 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / 'out' / 'kept').iterdir()} == kept


def test_torchrun_two_processes(tmp_path, sounds):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(ROOT / 'train_audio.py'), *TINY, *sounds, '--max_epochs=1', '--out_dir=out/ddp']
    proc = subprocess.run(cmd, cwd=tmp_path, env=SCRIPT_ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads((tmp_path / 'out' / 'ddp' / 'config.json').read_text())
    assert facts['world_size'] == 2 and events(tmp_path / 'out' / 'ddp')[-1]['reason'] == 'done'
