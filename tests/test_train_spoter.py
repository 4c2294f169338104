"""train_spoter.py run as a user runs it, on tiny SPOTER CSVs: checkpoints, best.pt for the test, resume
equivalence, eval_only predictions and features, and bad input."""
import csv
import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, run_script, sigterm_when_logged

from data import write_sign_csvs


def spoter(cwd, *args, check=True):
    return run_script('train_spoter.py', '--device=cpu', '--batch_size=8', *args, cwd=cwd, check=check)


EPOCH_1_DONE = 'epoch 1/1000 | train/loss'  # the line of the first finished epoch


def events(run_dir):
    return [json.loads(line) for line in (run_dir / 'events.jsonl').read_text().splitlines()]


def weights(path):
    return torch.load(path, weights_only=True)['model_state_dict']


@pytest.fixture(scope='module')
def csvs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('signs')
    train, val, test = write_sign_csvs(str(folder), num_classes=4, clips_per_class=(8, 3, 3), seed=0)
    return [f'--train_csv={train}', f'--val_csv={val}', f'--test_csv={test}']


@pytest.fixture(scope='module')
def trained(tmp_path_factory, csvs):
    work = tmp_path_factory.mktemp('spoter')
    spoter(work, *csvs, '--max_epochs=3', '--checkpoint_epochs=[1, 3]', '--out_dir=out/run')
    return work / 'out' / 'run'


def test_checkpoints_reports_and_the_test_on_best(trained, csvs, tmp_path):
    names = {p.name for p in trained.iterdir()}
    assert {'epoch_1.pt', 'epoch_3.pt', 'best.pt', 'last.pt', 'predictions.csv', 'confusion_matrix.csv',
            'scalars.csv', 'events.jsonl', 'config.json', 'model.txt'} <= names
    assert 'epoch_2.pt' not in names
    ckpt = torch.load(trained / 'epoch_1.pt', weights_only=True)
    assert ckpt['epoch'] == 1 and {'model_state_dict', 'optimizer_state_dict', 'args', 'metrics'} <= set(ckpt)
    assert {'train/acc', 'train/loss', 'val/acc'} <= set(ckpt['metrics'])
    end = events(trained)[-1]
    assert end['event'] == 'end' and {'test/acc', 'test/top5', 'per_class_acc'} <= set(end)
    header = (trained / 'scalars.csv').read_text().splitlines()[0].split(',')
    assert header[:4] == ['epoch', 'time_s', 'lr', 'train/loss'] and 'val/acc' in header
    with open(trained / 'predictions.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(rows[0]) >= {'row', 'true_label', 'pred_1', 'prob_1', 'pred_4', 'prob_4'}
    confusion = np.loadtxt(trained / 'confusion_matrix.csv', delimiter=',', skiprows=1)[:, 1:]
    assert confusion.sum() == 12 and np.isclose(np.trace(confusion) / 12, end['test/acc'])
    # the end event's test figures are best.pt's: scoring best.pt again gives them back
    proc = spoter(trained, *csvs, f'--out_dir={trained}', '--eval_only=True', '--init_from=best.pt')
    assert events(trained)[-1]['test/acc'] == end['test/acc'], proc.stdout


def test_resume_equals_uninterrupted(tmp_path, csvs):
    spoter(tmp_path, *csvs, '--max_epochs=4', '--out_dir=out/a')
    spoter(tmp_path, *csvs, '--max_epochs=2', '--out_dir=out/b')
    spoter(tmp_path, *csvs, '--max_epochs=4', '--out_dir=out/b', '--init_from=resume')
    a, b = weights(tmp_path / 'out' / 'a' / 'last.pt'), weights(tmp_path / 'out' / 'b' / 'last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_only_writes_predictions_and_features(trained, csvs, tmp_path):
    run_dir = tmp_path / 'run'
    import shutil
    shutil.copytree(trained, run_dir)
    (run_dir / 'predictions.csv').unlink()
    spoter(tmp_path, csvs[2], f'--out_dir={run_dir}', '--eval_only=True', '--init_from=epoch_1.pt',
           '--dump_features=True')
    assert (run_dir / 'predictions.csv').exists()
    with h5py.File(run_dir / 'features_epoch_1.h5') as f:
        assert f['features'].shape == (12, 108) and f['labels'].shape == (12,)
        lengths, attention = f['lengths'][:], f['attention'][:]
    assert np.allclose([attention[i, :n].sum() for i, n in enumerate(lengths)], 1, atol=1e-4)


def test_bad_inputs_are_clear_and_destroy_nothing(trained, csvs, tmp_path):
    before = hashlib.sha256((trained / 'last.pt').read_bytes()).hexdigest()
    proc = spoter(tmp_path, *csvs, f'--out_dir={trained}', check=False)
    assert proc.returncode == 2 and 'already holds' in proc.stderr and 'Traceback' not in proc.stderr
    proc = spoter(tmp_path, csvs[2], '--eval_only=True', '--out_dir=out/none', check=False)
    assert proc.returncode == 2 and 'eval_only=True needs a checkpoint' in proc.stderr
    proc = spoter(tmp_path, '--opt=adam', check=False)
    assert proc.returncode == 2 and "opt='adam': expected one of 'adamw', 'sgd'; did you mean 'adamw'?" in proc.stderr
    proc = spoter(tmp_path, '--optimizer=sgd', check=False)
    assert proc.returncode == 2 and "unknown config key 'optimizer' (renamed 'opt')" in proc.stderr
    assert hashlib.sha256((trained / 'last.pt').read_bytes()).hexdigest() == before


def test_val_classes_unseen_in_training_are_an_error(tmp_path, csvs):
    train_csv, val_csv = csvs[0].split('=', 1)[1], csvs[1].split('=', 1)[1]
    # keep only classes 0..2 in a new training file
    with open(train_csv) as f:
        rows = list(csv.DictReader(f))
    small = tmp_path / 'train_small.csv'
    with open(small, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r['labels']) < 3)
    proc = spoter(tmp_path, f'--train_csv={small}', f'--val_csv={val_csv}', check=False)
    assert proc.returncode == 2 and 'never occur in' in proc.stderr and '[3]' in proc.stderr


def test_sigterm_mid_epoch_then_auto_resume_is_exact(tmp_path, csvs):
    code, stdout, stderr = sigterm_when_logged('train_spoter.py', '--device=cpu', '--batch_size=4', *csvs,
                                               '--max_epochs=1000', cwd=tmp_path, out_dir='out/s', text=EPOCH_1_DONE,
                                               delay=0.3)  # land somewhere inside epoch 2 (8 steps of ~0.1 s)
    assert code == 0 and 'stopped (signal) at epoch' in stdout, stderr
    saved = torch.load(tmp_path / 'out' / 's' / 'last.pt', weights_only=True)
    total = saved['epoch'] + 2
    spoter(tmp_path, '--batch_size=4', *csvs, f'--max_epochs={total}', '--out_dir=out/s', '--init_from=auto')
    spoter(tmp_path, '--batch_size=4', *csvs, f'--max_epochs={total}', '--out_dir=out/u')
    resumed, straight = weights(tmp_path / 'out' / 's' / 'last.pt'), weights(tmp_path / 'out' / 'u' / 'last.pt')
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_torchrun_two_processes(tmp_path, csvs):
    import subprocess
    import sys
    from conftest import ROOT, SCRIPT_ENV
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(ROOT / 'train_spoter.py'), '--device=cpu', '--batch_size=4', *csvs, '--max_epochs=2', '--out_dir=out/d']
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / 'out' / 'd'
    ckpt = torch.load(run_dir / 'last.pt', weights_only=True)
    assert ckpt['epoch'] == 2 and len(ckpt['rng_state']) == 2
    assert json.loads((run_dir / 'config.json').read_text())['world_size'] == 2
    assert events(run_dir)[-1]['event'] == 'end' and 'test/acc' in events(run_dir)[-1]


def test_a_real_data_config_without_its_csvs_stops_before_writing_anything(tmp_path):
    proc = spoter(tmp_path, ROOT / 'config/spoter_wlasl100.py', check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: num_classes=100 but no train_csv was given, and the built-in signs have builtin_classes=10: give "
        "--train_csv, --val_csv and --test_csv (the config's first comment names the files), or --num_classes=0 "
        "for the built-in signs"]
    assert list(tmp_path.iterdir()) == []  # no built-in CSVs, no cache, no run directory
