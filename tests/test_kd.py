"""train_kd.py run as a user runs it, on a tiny WAV set + manifest, with a teacher trained by train_audio.py:
alpha = 0 is the student baseline bit for bit, the gate, the teacher-logits cache, resume, bad input, and the
defaults train_audio.py and train_kd.py share. (The KD loss formula is tested in test_audio_model.py.)"""
import hashlib
import json
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, run_script, sigterm_when_logged, signal_when_logged

import sweep
from common import configure
from data import AUDIO_FEATURES, AUDIO_RECIPE, write_sleep_sounds
from model import audio_model

TINY = ['--device=cpu', '--clip_seconds=0.5', '--batch_size=8', '--num_workers=0']
METRIC_COLUMNS = ['train/loss', 'val/loss', 'val/acc', 'val/macro_f1']  # what train_audio.py also writes


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Tiny sounds, a CRNN teacher and a TinyCNN baseline (2 epochs each, train_audio.py)."""
    folder = tmp_path_factory.mktemp('kd')
    manifest = write_sleep_sounds(str(folder / 'sounds'), n_clips=60, seed=2)
    data = [f'--manifest={manifest}', f"--cache_dir={folder / 'cache'}"]
    for name, arch in (('teacher', 'crnn'), ('baseline', 'tinycnn')):
        run_script('train_audio.py', *TINY, *data, f'--arch={arch}', '--max_epochs=2', f'--out_dir={name}',
                   cwd=folder)
    return folder, data


def kd(cwd, *args, check=True):
    return run_script('train_kd.py', *TINY, *args, cwd=cwd, check=check)


EPOCH_1_DONE = 'epoch 1/1000 | train/loss'  # the line of the first finished epoch


def events(run_dir):
    return [json.loads(line) for line in (run_dir / 'events.jsonl').read_text().splitlines()]


def weights(path):
    return torch.load(path, weights_only=True)['model_state_dict']


def columns(run_dir, names):
    lines = [line.split(',') for line in (run_dir / 'scalars.csv').read_text().splitlines()]
    return [[row[lines[0].index(name)] for name in names] for row in lines[1:]]


def finished_run(folder, best_val_macro_f1):
    """A run directory whose events say it finished with this best val macro-F1 (what the gate reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [dict(schema_version=1, event='start'), dict(schema_version=1, event='end', reason='done',
                                                         best_val_macro_f1=best_val_macro_f1)]
    (folder / 'events.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in lines))
    return folder


def test_alpha_zero_reproduces_the_student_baseline(setup):
    folder, data = setup
    kd(folder, *data, '--teacher_ckpt=teacher/best.pt', '--alpha=0.0', '--gate=False', '--max_epochs=2',
       '--out_dir=kd0')
    base, distilled = folder / 'baseline', folder / 'kd0'
    assert columns(base, METRIC_COLUMNS) == columns(distilled, METRIC_COLUMNS)
    for name in ('best.pt', 'last.pt'):
        a, b = weights(base / name), weights(distilled / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    end_base, end_kd = events(base)[-1], events(distilled)[-1]
    assert end_kd['reason'] == 'done' and end_kd['confusion'] == end_base['confusion']
    assert end_kd['test/macro_f1'] == end_base['test/macro_f1'] and end_kd['per_class'] == end_base['per_class']
    # KD's own artifacts: the loss term by term, the per-class test files, the gate decision
    header = (distilled / 'scalars.csv').read_text().splitlines()[0].split(',')
    assert {'train/kd', 'train/ce', *METRIC_COLUMNS} <= set(header)
    assert [float(loss) for loss, ce in columns(distilled, ['train/loss', 'train/ce'])] == \
        [float(ce) for loss, ce in columns(distilled, ['train/loss', 'train/ce'])]  # alpha 0: loss = CE
    assert (distilled / 'confusion_matrix.csv').read_bytes() == (base / 'confusion_matrix.csv').read_bytes()
    assert (distilled / 'test_per_class.csv').read_bytes() == (base / 'test_per_class.csv').read_bytes()
    assert [e for e in events(distilled) if e['event'] == 'gate'][0]['reason'] == 'gate=False'


def test_gate_refuses_below_the_gap_and_writes_only_its_event(setup, tmp_path):
    folder, data = setup
    teacher = finished_run(tmp_path / 'crnn', 0.80)
    (teacher / 'best.pt').write_bytes((folder / 'teacher' / 'best.pt').read_bytes())
    baselines = [str(finished_run(tmp_path / 'tiny', 0.70)), str(finished_run(tmp_path / 'cbam', 0.78))]
    proc = kd(tmp_path, *data, f"--teacher_ckpt={teacher / 'best.pt'}", f'--gate_baselines={baselines}',
              '--out_dir=refused', check=False)
    assert proc.returncode == 3 and 'gate_min_gap 0.03' in proc.stderr, proc.stderr
    assert [p.name for p in (tmp_path / 'refused').iterdir()] == ['events.jsonl']
    [gate] = events(tmp_path / 'refused')
    assert gate['event'] == 'gate' and gate['passed'] is False and gate['teacher_val_macro_f1'] == 0.80
    assert gate['baseline_val_macro_f1'] == 0.78 and gate['baseline'] == baselines[1]


def test_gate_passes_then_the_logits_cache_is_reused_and_resume_is_exact(setup, tmp_path):
    folder, data = setup
    data = [data[0], f"--cache_dir={tmp_path / 'cache'}"]  # a fresh cache: the first run computes the logits
    teacher = finished_run(tmp_path / 'crnn', 0.80)
    (teacher / 'best.pt').write_bytes((folder / 'teacher' / 'best.pt').read_bytes())
    baselines = [str(finished_run(tmp_path / 'tiny', 0.70)), str(finished_run(tmp_path / 'cbam', 0.77))]
    recipe = ['--alpha=0.6', '--temperature=3.0']
    proc = kd(tmp_path, *data, *recipe, f"--teacher_ckpt={teacher / 'best.pt'}", f'--gate_baselines={baselines}',
              '--max_epochs=2', '--out_dir=straight')
    assert ': computed (' in proc.stdout
    gate = [e for e in events(tmp_path / 'straight') if e['event'] == 'gate'][0]
    assert gate['passed'] is True and gate['teacher_val_macro_f1'] == 0.80 and gate['baseline_val_macro_f1'] == 0.77
    for loss, kd_term, ce in columns(tmp_path / 'straight', ['train/loss', 'train/kd', 'train/ce']):
        assert float(loss) == pytest.approx(0.6 * float(kd_term) + 0.4 * float(ce), rel=1e-4)
    [cached] = (tmp_path / 'cache').rglob('train.teacher_*.npy')
    # its name: the feature cache's identity, the teacher's bytes, and the device kind and dtype that computed it
    with h5py.File(cached.parent / 'train.h5', 'r') as f:
        key = {k: str(f.attrs[k]) for k in ('feature_hash', 'dataset_hash', 'label_map', 'n_samples', 'source')}
    key.update(teacher=hashlib.sha256((teacher / 'best.pt').read_bytes()).hexdigest(), device='cpu', dtype='float32')
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    assert cached.name == f"train.teacher_{digest[:16]}.npy"
    # the cache holds exactly the teacher's logits of the training clips, with the teacher's input normalisation
    ckpt = torch.load(teacher / 'best.pt', weights_only=True)
    net = audio_model(**ckpt['model_args'])
    net.load_state_dict(ckpt['model_state_dict'])
    with h5py.File(cached.parent / 'train.h5', 'r') as f:
        x = torch.from_numpy(f['features'][()])[:, None]  # (N, 1, n_mels, T)
    with torch.no_grad():
        expected = net.eval()((x - ckpt['input_stats']['mean']) / ckpt['input_stats']['std'])
    assert torch.allclose(torch.from_numpy(np.load(cached)), expected, atol=1e-5)

    # the same teacher bytes elsewhere: the cache is reused; the run, interrupted after 1 epoch and resumed, is exact
    common = [*data, *recipe, '--teacher_ckpt=' + str(folder / 'teacher' / 'best.pt'), '--gate=False']
    proc = kd(tmp_path, *common, '--max_epochs=1', '--out_dir=resumed')
    assert f'{cached}: reused' in proc.stdout
    kd(tmp_path, *common, '--max_epochs=2', '--out_dir=resumed', '--init_from=resume')
    a, b = weights(tmp_path / 'straight' / 'last.pt'), weights(tmp_path / 'resumed' / 'last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = [*METRIC_COLUMNS, 'train/kd', 'train/ce']
    assert columns(tmp_path / 'straight', names) == columns(tmp_path / 'resumed', names)

    # another teacher (one weight changed): a new cache file, the first one untouched
    before = cached.read_bytes()
    ckpt['model_state_dict']['head.bias'] += 1.0
    torch.save(ckpt, tmp_path / 'other.pt')
    proc = kd(tmp_path, *data, *recipe, f"--teacher_ckpt={tmp_path / 'other.pt'}", '--gate=False', '--max_epochs=1',
              '--out_dir=other')
    assert ': computed (' in proc.stdout and len(list((tmp_path / 'cache').rglob('train.teacher_*.npy'))) == 2
    assert cached.read_bytes() == before


def test_sigterm_mid_epoch_then_auto_resume_is_exact(setup, tmp_path):
    folder, data = setup
    common = [*data, '--teacher_ckpt=' + str(folder / 'teacher' / 'best.pt'), '--gate=False', '--batch_size=2',
              '--patience=999']
    code, stdout, stderr = sigterm_when_logged('train_kd.py', *TINY, *common, '--max_epochs=1000', cwd=tmp_path,
                                               out_dir='s', text=EPOCH_1_DONE, delay=0.2)  # inside epoch 2
    assert code == 0 and 'stopped (signal) at epoch' in stdout, stderr
    total = torch.load(tmp_path / 's' / 'last.pt', weights_only=True)['epoch'] + 1
    kd(tmp_path, *common, f'--max_epochs={total}', '--out_dir=s', '--init_from=auto')
    kd(tmp_path, *common, f'--max_epochs={total}', '--out_dir=u')
    a, b = weights(tmp_path / 's' / 'last.pt'), weights(tmp_path / 'u' / 'last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_resume_with_only_out_dir_continues_exactly(setup, tmp_path):
    folder, data = setup
    common = [*TINY, *data, '--teacher_ckpt=' + str(folder / 'teacher' / 'best.pt'), '--gate=False', '--batch_size=2',
              '--max_epochs=2', '--log_interval=1']
    code, stdout, stderr = signal_when_logged('train_kd.py', *common, cwd=tmp_path, out_dir='c', text='step 2/',
                                              sig=signal.SIGINT)
    assert code == 130 and 'stopped (Ctrl-C) at epoch 1/2' in stdout and '--out_dir=c --init_from=resume' in stdout
    assert events(tmp_path / 'c')[-1]['reason'] == 'interrupted'
    run_script('train_kd.py', '--out_dir=c', '--init_from=resume', cwd=tmp_path)  # teacher, data: the saved run's
    run_script('train_kd.py', *common, '--out_dir=u', cwd=tmp_path)
    a, b = weights(tmp_path / 'c' / 'last.pt'), weights(tmp_path / 'u' / 'last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_are_clear_and_destroy_nothing(setup, tmp_path):
    folder, data = setup
    good = folder / 'teacher' / 'best.pt'
    kd(tmp_path, *data, f'--teacher_ckpt={good}', '--gate=False', '--max_epochs=1', '--out_dir=kept')
    kept = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / 'kept').iterdir()}
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint at all')
    ckpt = torch.load(good, weights_only=True)
    ckpt['model_args']['num_classes'] = 4
    torch.save(ckpt, tmp_path / 'four.pt')
    unfinished = finished_run(tmp_path / 'unfinished', 0.5)
    (unfinished / 'events.jsonl').write_text(json.dumps(dict(schema_version=1, event='start')) + '\n')
    cases = [
        ([f"--teacher_ckpt={tmp_path / 'missing.pt'}"], 'checkpoint not found'),
        ([f"--teacher_ckpt={tmp_path / 'junk.pt'}"], 'junk.pt is not a readable checkpoint'),
        ([f"--teacher_ckpt={tmp_path / 'four.pt'}"], 'a 4-class model, but label_map'),
        ([f'--teacher_ckpt={good}', '--clip_seconds=1.0', '--n_mels=32'],
         'trained on other features; this run has clip_seconds=1.0 (teacher: 0.5), n_mels=32 (teacher: 64)'),
        ([f'--teacher_ckpt={good}', f"--gate_baselines=['{tmp_path / 'nowhere'}']"], 'not found'),
        ([f'--teacher_ckpt={good}', f"--gate_baselines=['{unfinished}']"], 'has not finished'),
    ]
    for extra, message in cases:  # --overwrite=True: even a start allowed to overwrite fails before it writes
        proc = kd(tmp_path, *data, *extra, '--overwrite=True', '--out_dir=kept', check=False)
        assert proc.returncode == 2 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / 'kept').iterdir()} == kept


def test_the_shared_defaults_of_train_audio_and_train_kd_never_drift():
    audio, distil = (configure(dict(sweep.script_defaults(s)), []) for s in ('train_audio.py', 'train_kd.py'))
    shared = set(audio) & set(distil)
    assert set(AUDIO_FEATURES) | set(AUDIO_RECIPE) <= shared  # seed 001's recipe: in both scripts
    assert {k: audio[k] for k in shared - {'out_dir'}} == {k: distil[k] for k in shared - {'out_dir'}}
    assert {k: audio[k] for k in AUDIO_FEATURES} == AUDIO_FEATURES


@pytest.mark.parametrize('campaign', ['campaign_audio', 'campaign_audio_quick'])
def test_campaign_configs_use_the_real_keys_and_kd_gets_the_teachers_features(campaign, monkeypatch):
    plan = {}
    exec((ROOT / 'config' / f'{campaign}.py').read_text(), plan)
    for key in ('runs', 'seeds', 'out_root'):
        monkeypatch.setattr(sweep, key, plan[key])
    sweep.check_campaign()  # every run's overrides pass its script's configurator (unknown keys are errors)
    runs = {run['name']: run for run in plan['runs']}
    teacher = sweep.predict_config(runs['crnn'], 42, runs['crnn']['overrides'])
    for name in ('kd_tinycnn_a0.0', 'kd_tinycnn_cbam_a0.9_T3'):
        student = sweep.predict_config(runs[name], 42, runs[name]['overrides'])
        assert {k: student[k] for k in AUDIO_FEATURES} == {k: teacher[k] for k in AUDIO_FEATURES}
        assert student['teacher_ckpt'] == f"{plan['out_root']}/crnn/seed42/best.pt"


@pytest.mark.parametrize('script', ['train_audio.py', 'train_kd.py'])
@pytest.mark.parametrize('method', ['spawn', 'forkserver'])
def test_dataloader_workers_under_spawn_and_forkserver_train_as_without_workers(setup, tmp_path, script, method):
    """macOS starts workers by spawn, Linux from Python 3.14 by forkserver: each worker then re-runs the main module
    before it unpickles its dataset. The scripts train as they do in one process (KD at alpha 0 = the baseline)."""
    folder, data = setup
    extra = ['--teacher_ckpt=' + str(folder / 'teacher' / 'best.pt'), '--alpha=0.0', '--gate=False'] \
        if script == 'train_kd.py' else []
    args = [*TINY, '--num_workers=2', *data, *extra, '--max_epochs=2', '--out_dir=workers']
    launcher = (f"import multiprocessing, runpy, sys; multiprocessing.set_start_method({method!r}); "
                f"sys.argv = {[script, *args]!r}; sys.path.insert(0, {str(ROOT)!r}); "
                f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, '-c', launcher], cwd=tmp_path, env=SCRIPT_ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(folder / 'baseline' / 'last.pt'), weights(tmp_path / 'workers' / 'last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
