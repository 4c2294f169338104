"""train_vae.py run as a user runs it, on tiny data in the real formats: figures and the [VISUALIZATION] line,
scalars and the end event, eval_only, padded grids with class weights and capacity annealing, resume equivalence,
and every bad-input path (clear message, exit 2, nothing in the existing run lost)."""
import base64
import csv
import hashlib
import json
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script, sigterm_when_logged

from data import make_color_grids, make_sprites, write_dsprites_npz

TINY = ['--device=cpu', '--batch_size=32', '--mig_samples=300']


def vae(cwd, *args, check=True):
    return run_script('train_vae.py', *TINY, *args, cwd=cwd, check=check)


EPOCH_1_DONE = 'epoch 1/1000 | train/loss'  # the line of the first finished epoch


def events(run_dir):
    return [json.loads(line) for line in (run_dir / 'events.jsonl').read_text().splitlines()]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp('vae')
    proc = vae(work, '--num_images=400', '--max_epochs=2', '--out_dir=out/run')
    return work, work / 'out' / 'run', proc.stdout


def svg_labels(path):
    """(title, row labels, column labels, the embedded PNG's bytes) of a labeled figure: row labels are the texts
    right-aligned left of the picture, column labels those centred above it."""
    root = ElementTree.parse(path).getroot()
    ns = '{http://www.w3.org/2000/svg}'
    texts = root.findall(f'{ns}text')
    image = root.find(f'{ns}image')
    rows = [t.text for t in texts if t.get('text-anchor') == 'end']
    cols = [t.text for t in texts if t.get('text-anchor') == 'middle']
    return texts[0].text, rows, cols, base64.b64decode(image.get('href').split(',', 1)[1])


def test_smoke_run_writes_figures_scalars_and_mig(trained):
    work, run_dir, stdout = trained
    figures = run_dir / 'figures'
    for name in ('reconstructions_epoch_1.png', 'reconstructions_epoch_2.png', 'reconstructions_best.png',
                 'traversals_best.png'):
        assert (figures / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert f"[VISUALIZATION] Saved: out/run/figures/{name}" in stdout
    assert list(work.glob('cache/vae/sprites_*.npz'))  # the built-in sprites went through the dSprites loader
    best_epoch = torch.load(run_dir / 'best.pt', weights_only=True)['epoch']
    best_eval = [e for e in events(run_dir) if e['event'] == 'eval'][best_epoch - 1]
    title, rows, cols, pixels = svg_labels(figures / 'traversals_best.svg')
    assert pixels == (figures / 'traversals_best.png').read_bytes()  # the labeled figure shows the PNG's own pixels
    assert f"epoch {best_epoch}, best.pt" in title
    assert rows == [f"z{j} KL {best_eval[f'val/kl_dim_{j}']:.2f}" for j in range(10)]  # row j: latent j and its KL
    assert cols == ['-3.0', '-2.2', '-1.5', '-0.8', '+0.0', '+0.8', '+1.5', '+2.2', '+3.0']  # the traversal values
    title, rows, cols, pixels = svg_labels(figures / 'reconstructions_epoch_2.svg')
    assert 'epoch 2' in title and rows == ['training image', 'reconstruction'] and len(cols) == 10
    assert pixels == (figures / 'reconstructions_epoch_2.png').read_bytes()
    header = (run_dir / 'scalars.csv').read_text().splitlines()[0].split(',')
    assert header[:5] == ['epoch', 'time_s', 'lr', 'train/loss', 'val/loss']  # the leading columns of every script
    assert {'train/recon', 'train/kl', 'val/recon', 'val/kl', 'val/kl_dim_0', 'val/kl_dim_9', 'val/active_dims',
            'val/pixel_acc', 'val/fg_iou', 'val/recall_0', 'val/recall_1', 'mig', 'samples_per_s'} <= set(header)
    assert 'val/kl_dim_10' not in header
    end = events(run_dir)[-1]
    assert end['event'] == 'end' and end['epochs'] == 2 and 0.0 <= end['mig'] <= 1.0
    assert set(end['mig_per_factor']) == {'shape', 'scale', 'orientation', 'posX', 'posY'}  # colour is constant
    rows = list(csv.DictReader((run_dir / 'scalars.csv').open()))  # MIG per epoch: best.pt's row is the end's MIG
    assert float(rows[best_epoch - 1]['mig']) == pytest.approx(end['mig'], rel=1e-5)
    ckpt = torch.load(run_dir / 'last.pt', weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['iter_num'] == 2 * (380 // 32) and ckpt['model_args']['num_classes'] == 2
    last_eval = [e for e in events(run_dir) if e['event'] == 'eval'][-1]
    kl_dims = [last_eval[f'val/kl_dim_{j}'] for j in range(10)]
    assert np.isclose(sum(kl_dims), last_eval['val/kl'], rtol=1e-5)
    assert last_eval['val/active_dims'] == sum(k > 0.05 for k in kl_dims)


def test_eval_only_writes_figures_and_metrics_of_a_checkpoint(trained):
    work, run_dir, _ = trained
    before = digest(run_dir / 'best.pt')
    proc = vae(work, '--num_images=400', '--out_dir=out/run', '--eval_only=True', '--init_from=best.pt')
    assert '[VISUALIZATION] Saved: out/run/figures/traversals_eval.png (labeled: traversals_eval.svg)' in proc.stdout
    title, rows, _, _ = svg_labels(run_dir / 'figures' / 'traversals_eval.svg')
    best_epoch = torch.load(run_dir / 'best.pt', weights_only=True)['epoch']
    assert title.endswith(f"best.pt (epoch {best_epoch}): z_j from -3 to 3 (KL in nats)") and len(rows) == 10
    end = events(run_dir)[-1]
    best = torch.load(run_dir / 'best.pt', weights_only=True)['metrics']
    assert end['reason'] == 'eval_only' and end['val/fg_iou'] == best['val/fg_iou'] and end['val/kl'] == best['val/kl']
    trained_end = [e for e in events(run_dir) if e['event'] == 'end' and e['reason'] == 'done'][-1]
    assert end['mig'] == trained_end['mig']  # the same weights and the same images
    assert digest(run_dir / 'best.pt') == before


def test_padded_grids_focal_class_weights_capacity_and_a_figure_that_cannot_be_written(tmp_path):
    grids = make_color_grids(200, seed=1, size=20, num_classes=4)
    np.savez(tmp_path / 'grids.npz', grids=grids)
    run_dir = tmp_path / 'out' / 'g'
    run_dir.mkdir(parents=True)
    (run_dir / 'figures').write_text('a file where the figures folder should be')
    proc = vae(tmp_path, '--data=grids.npz', '--dataset_kind=grids', '--max_epochs=1', '--recon_loss=focal',
               '--use_class_weights=True', '--class_weight_method=balanced', '--objective=capacity',
               '--capacity_stop_iter=10', '--out_dir=out/g')
    assert 'data 20x20 padded to 32x32 with class 0; the padding is masked out of the loss' in proc.stdout
    header = (run_dir / 'scalars.csv').read_text().splitlines()[0].split(',')
    assert {'val/recall_0', 'val/recall_3', 'capacity'} <= set(header) and 'val/recall_4' not in header
    row = dict(zip(header, (run_dir / 'scalars.csv').read_text().splitlines()[1].split(',')))
    assert float(row['capacity']) == 12.5  # 190 // 32 = 5 of capacity_stop_iter=10 steps: half of 25 nats
    assert torch.load(run_dir / 'last.pt', weights_only=True)['model_args']['image_size'] == 32
    # the pictures failed (figures/ is a file), the run did not
    assert '[VISUALIZATION] Failed: out/g/figures/reconstructions_epoch_1.png' in proc.stdout
    errors = [e for e in events(run_dir) if e['event'] == 'error']
    assert errors and errors[0]['figure'] == 'reconstructions_epoch_1.png' and errors[0]['fatal'] is False
    assert events(run_dir)[-1]['event'] == 'end' and 'mig' not in events(run_dir)[-1]  # no factors, no MIG


def test_seed_option_config_runs_the_plain_beta_vae(tmp_path):
    # the default objective is FactorVAE; seed 002's option configs must still train recon + beta KL
    vae(tmp_path, ROOT / 'config' / 'vae_option_a.py', '--num_images=200', '--max_epochs=1', '--out_dir=out/a')
    run_dir = tmp_path / 'out' / 'a'
    config = json.loads((run_dir / 'config.json').read_text())['config']
    assert (config['objective'], config['recon_loss'], config['dataset_kind']) == ('beta', 'focal', 'grids')
    row = next(csv.DictReader((run_dir / 'scalars.csv').open()))
    val_loss, recon, kl = float(row['val/loss']), float(row['val/recon']), float(row['val/kl'])
    assert val_loss == pytest.approx(recon + config['beta'] * kl, rel=1e-4)
    assert float(row['train/tc']) == 0  # no discriminator in the plain objective


def test_resume_equals_uninterrupted_and_nan_keeps_the_last_checkpoint(tmp_path):
    common = ['--dataset_kind=grids', '--num_images=200', '--recon_loss=focal', '--use_class_weights=True',
              '--objective=factor', '--disc_hidden=32']  # FactorVAE: the discriminator's state resumes too
    vae(tmp_path, *common, '--max_epochs=4', '--out_dir=out/a')
    vae(tmp_path, *common, '--max_epochs=2', '--out_dir=out/b')
    before = digest(tmp_path / 'out' / 'b' / 'last.pt')
    proc = vae(tmp_path, *common, '--max_epochs=4', '--out_dir=out/b', '--init_from=resume', '--learning_rate=1e30',
               check=False)  # the first step blows the weights up: the loss of the second is not finite
    assert proc.returncode != 0 and 'training loss is' in proc.stderr and 'last.pt kept' in proc.stderr
    assert digest(tmp_path / 'out' / 'b' / 'last.pt') == before
    assert events(tmp_path / 'out' / 'b')[-1]['event'] == 'error'
    proc = vae(tmp_path, *common, '--max_epochs=4', '--out_dir=out/b', '--init_from=resume', '--disc_hidden=64',
               check=False)
    assert proc.returncode == 2 and "disc_hidden=64 (the checkpoint's: 32)" in proc.stderr, proc.stderr
    assert digest(tmp_path / 'out' / 'b' / 'last.pt') == before
    vae(tmp_path, *common, '--max_epochs=4', '--out_dir=out/b', '--init_from=resume')
    a = torch.load(tmp_path / 'out' / 'a' / 'last.pt', weights_only=True)
    b = torch.load(tmp_path / 'out' / 'b' / 'last.pt', weights_only=True)
    for key in ('model_state_dict', 'discriminator_state_dict'):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a['metrics'] == b['metrics'] and a['iter_num'] == b['iter_num'] == 4 * (190 // 32)


def test_sigterm_mid_epoch_then_auto_resume_is_exact(tmp_path):
    grids = ['--dataset_kind=grids', '--num_images=600', '--objective=tc']  # 17 steps per epoch; TC samples too
    code, stdout, stderr = sigterm_when_logged('train_vae.py', *TINY, *grids, '--max_epochs=1000', cwd=tmp_path,
                                               out_dir='out/s', text=EPOCH_1_DONE, delay=0.2)  # inside epoch 2
    assert code == 0 and 'stopped (signal) at epoch' in stdout, stderr
    saved = torch.load(tmp_path / 'out' / 's' / 'last.pt', weights_only=True)
    assert events(tmp_path / 'out' / 's')[-1]['reason'] == 'signal'
    total = saved['epoch'] + 2
    vae(tmp_path, *grids, f'--max_epochs={total}', '--out_dir=out/s', '--init_from=auto')
    vae(tmp_path, *grids, f'--max_epochs={total}', '--out_dir=out/u')
    a = torch.load(tmp_path / 'out' / 's' / 'last.pt', weights_only=True)
    b = torch.load(tmp_path / 'out' / 'u' / 'last.pt', weights_only=True)
    assert all(torch.equal(a['model_state_dict'][k], b['model_state_dict'][k]) for k in a['model_state_dict'])
    assert a['iter_num'] == b['iter_num'] and a['metrics'] == b['metrics']


def test_bad_inputs_are_clear_and_destroy_nothing(trained, tmp_path):
    work, run_dir, _ = trained
    kept = {name: digest(run_dir / name) for name in ('last.pt', 'best.pt', 'log.txt', 'scalars.csv', 'events.jsonl')}
    np.savez(tmp_path / 'no_array.npz', images=np.zeros((4, 8, 8), np.uint8))
    np.savez(tmp_path / 'too_big.npz', grids=np.full((40, 8, 8), 7, np.uint8))
    imgs, classes = make_sprites(40, seed=0)
    write_dsprites_npz(str(tmp_path / 'short_factors.npz'), imgs, classes)
    with np.load(tmp_path / 'short_factors.npz', allow_pickle=True) as f:
        arrays = dict(f)
    np.savez(tmp_path / 'short_factors.npz', **dict(arrays, latents_classes=arrays['latents_classes'][:30]))
    cases = [(['--class_weight_method=median'], "class_weight_method='median': expected one of 'inverse', "
                                                "'sqrt_inverse', 'balanced'"),
             (['--objective=elbo'], "objective='elbo': expected one of 'beta', 'capacity', 'tc'"),
             (['--objective=tc', '--batch_size=1'], "objective='tc' needs batch_size >= 2 (got 1)"),
             ([f'--data={tmp_path}/no_array.npz'], "no_array.npz: no grid array; expected an array named one of"),
             ([f'--data={tmp_path}/too_big.npz', '--num_classes=5'], "too_big.npz: class id 7 >= num_classes=5"),
             ([f'--data={tmp_path}/short_factors.npz'], "short_factors.npz: factors have shape (30, 6)")]
    # each aimed at the existing run with --overwrite=True: still nothing lost. Every data check (dtype, negative
    # ids, missing or corrupt files) runs at this same point, before the run directory is touched; their messages
    # are tested in test_vae_data.py
    for args, message in cases:
        proc = vae(work, '--out_dir=out/run', '--overwrite=True', *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and 'Traceback' not in proc.stderr, (args, proc.stderr)
    proc = vae(work, '--out_dir=out/run', check=False)
    assert proc.returncode == 2 and 'already holds' in proc.stderr
    proc = vae(work, '--eval_only=True', '--out_dir=out/none', check=False)
    assert proc.returncode == 2 and 'eval_only=True needs a checkpoint' in proc.stderr
    assert {name: digest(run_dir / name) for name in kept} == kept
