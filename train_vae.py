"""
Train a beta-VAE (Higgins et al. 2017; capacity annealing: Burgess et al. 2018; beta-TCVAE: Chen et al. 2018;
FactorVAE's discriminator: Kim & Mnih 2018) on categorical images: every pixel is one of C classes (class 0 =
background), the decoder predicts C logits per pixel, the reconstruction loss is cross-entropy or focal loss
(optionally class-weighted) summed over pixels. Without data it trains on built-in procedural dSprites-like sprites
with known factors, written as a dSprites npz and read back by the same loader. Writes reconstruction grids at
every checkpoint, latent traversals at the best one, KL per latent, foreground IoU and, where the data has factors,
MIG (Chen et al. 2018).

    python train_vae.py                                                   # built-in sprites, ~36 min, 1 CPU thread
    python train_vae.py config/vae_dsprites.py --data=dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz
    python train_vae.py config/vae_option_b.py --quick_test=True          # seed 002's options A/B/C on colour grids
    python train_vae.py config/vae_grids.py --data=my_grids.npz           # any (N, H, W) integer grids
    python train_vae.py --eval_only=True --init_from=best.pt              # figures + metrics of a trained model
    sbatch --requeue --gres=gpu:1 --wrap "python train_vae.py config/vae_dsprites.py --data=... --init_from=auto"
"""
import math
import os
import time

import numpy as np
import torch

from common import (RunDir, StopSignal, UserError, autocast_context, configure, init_distributed, load_checkpoint,
                    resolve_init, rng_state, save_checkpoint, seed_everything, set_rng_state, write_atomic)
from data import builtin_vae_data, load_vae_data, pad_images, palette, png_bytes, tile_images
from model import (BetaVAE, TCDiscriminator, capacity_at, class_weights, discriminator_loss, focal_loss, kl_per_dim,
                   mig, mig_per_factor, reparameterize, total_correlation, vae_objective)

# -----------------------------------------------------------------------------
# default config: every knob, one per line (config files and --key=value override these)
# -----------------------------------------------------------------------------
out_dir = 'out/vae'  # run directory; fixed, so a requeued job finds its own checkpoint
init_from = 'scratch'  # 'scratch' | 'resume' | 'auto' | a checkpoint (e.g. 'best.pt', for eval_only)
overwrite = False  # allow init_from='scratch' into an out_dir that already holds checkpoints
eval_only = False  # write the figures and metrics of the init_from checkpoint (val split, MIG), do not train
# data
data = ''  # .npz (dSprites 'imgs' or 'grids') or .h5 of (N, H, W) class ids; '' = built-in data of dataset_kind
dataset_kind = 'sprites'  # built-in data: 'sprites' (64x64, 2 classes, 5 known factors) | 'grids' (30x30, 10 colours)
num_images = 50_000  # built-in: images made (sprites 0 = all 737,280, grids 0 = 10,000); a file: subset (0 = all)
num_classes = 0  # C; 0 = one more than the largest class id in the data
val_fraction = 0.05  # share of the images held out for val/loss, the metrics and best.pt
cache_dir = 'cache'  # the built-in data is written here once, keyed by its generator settings
# model
latent_dim = 10  # latents; KL_j > 0.05 nats counts as active
# objective: recon (summed over pixels, mean over the batch) + beta * KL (summed over latents)
objective = 'factor'  # 'beta': recon + beta KL | 'capacity': recon + capacity_gamma |KL - C|, C annealed |
#                       'tc': recon + KL + (beta - 1) TC, beta-TCVAE, TC estimated from each batch's posteriors |
#                       'factor': recon + beta KL + factor_gamma TC, TC from a discriminator (Kim & Mnih: beta 1)
#                       (val/loss leaves their TC out: its estimates need sampling or the discriminator)
beta = 4.0  # KL weight against the pixel-summed reconstruction term (not a per-pixel mean)
capacity_max = 25.0  # 'capacity': final KL target C in nats
capacity_stop_iter = 100_000  # 'capacity': C rises linearly from 0 to capacity_max over these iterations
capacity_gamma = 1000.0  # 'capacity': weight of |KL - C|
factor_gamma = 35.0  # 'factor': weight of the TC (Kim & Mnih: 10-100 on dSprites)
disc_hidden = 256  # 'factor': width of its 6 hidden layers (Kim & Mnih: 1000; bench.py vae: +13% a step, 1000 +87%)
disc_learning_rate = 5e-4  # 'factor': its Adam, betas (0.5, 0.9); Kim & Mnih give it the VAE's rate (both 1e-4)
recon_loss = 'ce'  # 'ce' (cross-entropy) | 'focal' (Lin et al. 2017)
focal_gamma = 2.0  # focal loss exponent; 0 = cross-entropy
use_class_weights = False  # weight each pixel's loss by its class's weight (mean pixel weight 1 over the data)
class_weight_method = 'sqrt_inverse'  # 'inverse' N/(C n_c) | 'sqrt_inverse' its root | 'balanced' median-frequency
# optimization
max_epochs = 30  # training epochs; on the built-in sprites FactorVAE opens its 4th latent at epoch ~17-22
quick_test = False  # seed 002's quick test: 5 epochs, whatever max_epochs says
batch_size = 64  # images per step
learning_rate = 5e-4  # Adam, constant; the literature's 1e-4 is for ~300k-step runs (config/vae_dsprites.py)
mig_samples = 10_000  # images encoded for MIG (data with factors only)
mig_interval = 1  # also measure MIG into scalars.csv every this many epochs (0 = only at the end, with best.pt)
log_interval = 1  # print a line every this many epochs
# system
seed = 1337  # model init, data split, batch order, sampling noise
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'float32'  # 'float32' | 'bfloat16' (CUDA autocast) | 'auto'
config = configure(globals())
# -----------------------------------------------------------------------------

# setup: device, seeds, what to start from; every check before the run directory is touched
ddp, _, _, device = init_distributed(device)
if ddp:
    raise UserError("train_vae.py runs in one process: launch it with python, not torchrun")
dtype, autocast = autocast_context(device, dtype)
for key, value, allowed in (('objective', objective, ('beta', 'capacity', 'tc', 'factor')),
                            ('recon_loss', recon_loss, ('ce', 'focal')),
                            ('class_weight_method', class_weight_method, ('inverse', 'sqrt_inverse', 'balanced')),
                            ('dataset_kind', dataset_kind, ('sprites', 'grids'))):
    if value not in allowed:
        raise UserError(f"{key}={value!r}: expected one of {', '.join(map(repr, allowed))}")
if objective == 'tc' and batch_size < 2:  # the TC estimate needs other images of the batch to stand in for q(z)
    raise UserError(f"objective='tc' needs batch_size >= 2 (got {batch_size}): the total correlation is estimated "
                    f"from the other images of each batch")
max_epochs = 5 if quick_test else max_epochs
resume_path = resolve_init(init_from, out_dir, overwrite or eval_only)
ckpt = load_checkpoint(resume_path) if resume_path else None
if eval_only and not ckpt:
    raise UserError("eval_only=True needs a checkpoint: --init_from=best.pt (or last.pt, or a path)")
seed_everything(seed)

# data: class ids (N, H, W), padded to a side the net takes; a fixed split into train and val
data_path = data or builtin_vae_data(dataset_kind, cache_dir, num_images, seed=0)
images, factors, factor_names, found_classes = load_vae_data(data_path, num_classes)
pick = np.random.default_rng(seed)
if data and num_images and num_images < len(images):  # a random subset of a large file (e.g. dSprites)
    chosen = np.sort(pick.choice(len(images), num_images, replace=False))
    images, factors = images[chosen], None if factors is None else factors[chosen]
height, width = images.shape[1:]
images, mask = pad_images(images)  # (N, S, S), mask (S, S): 1 on real pixels
order = pick.permutation(len(images))
n_val = max(1, int(len(images) * val_fraction))
val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
if len(train_idx) < batch_size:
    raise UserError(f"data {data_path}: {len(train_idx)} training images cannot fill one batch of {batch_size}")
model_args = dict(in_classes=found_classes, image_size=images.shape[1], latent_dim=latent_dim)
if ckpt:  # the architecture comes from the checkpoint; the data must fit it
    for key in ('image_size', 'latent_dim'):
        if model_args[key] != ckpt['model_args'][key] and (key != 'latent_dim' or not eval_only):
            raise UserError(f"{resume_path}: {key}={ckpt['model_args'][key]} in the checkpoint, {model_args[key]} "
                            f"for this config/data ({data_path}); use the data and keys it was trained with")
    if found_classes > ckpt['model_args']['in_classes']:
        raise UserError(f"data {data_path} has {found_classes} classes; {resume_path} was trained on "
                        f"{ckpt['model_args']['in_classes']}")
    model_args = ckpt['model_args']
C = model_args['in_classes']
counts = sum(np.bincount(images[train_idx[s:s + 4096]][:, mask > 0].reshape(-1), minlength=C)  # real pixels
             for s in range(0, len(train_idx), 4096))
weights = class_weights(counts, class_weight_method).to(device) if use_class_weights else None

# model (+ resume), optimizer
model = BetaVAE(**model_args, class_frequencies=counts / counts.sum()).to(device)
if ckpt:
    model.load_state_dict(ckpt['model_state_dict'])
opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
discriminator = TCDiscriminator(model_args['latent_dim'], disc_hidden).to(device) if objective == 'factor' else None
if discriminator is not None:
    disc_opt = torch.optim.Adam(discriminator.parameters(), lr=disc_learning_rate, betas=(0.5, 0.9))
    if ckpt and ckpt.get('discriminator_state_dict') and not eval_only:  # absent: a run switching objectives
        saved_hidden = ckpt['discriminator_state_dict']['net.0.weight'].shape[0]
        if saved_hidden != disc_hidden:
            raise UserError(f"{resume_path}: its discriminator is {saved_hidden} wide, disc_hidden={disc_hidden}; "
                            f"resume with --disc_hidden={saved_hidden}")
        discriminator.load_state_dict(ckpt['discriminator_state_dict'])
        disc_opt.load_state_dict(ckpt['disc_optimizer_state_dict'])
epoch, step_in_epoch, iter_num, best_val_loss, history = 0, 0, 0, math.inf, {}
if ckpt and not eval_only:
    opt.load_state_dict(ckpt['optimizer_state_dict'])
    for group in opt.param_groups:  # the config's learning rate wins (the state dict carries the old one)
        group['lr'] = learning_rate
    set_rng_state(ckpt['rng_state'])
    epoch, step_in_epoch, iter_num = ckpt['epoch'], ckpt['step_in_epoch'], ckpt['iter_num']
    best_val_loss, history = ckpt['best_metric'], ckpt['epoch_sums']
mask_t = None if mask.all() else torch.from_numpy(mask).to(device)  # padding is left out of the loss and metrics
figure_idx = np.sort(np.random.default_rng(seed + 1).choice(train_idx, min(10, len(train_idx)), replace=False))
colours = palette(C)

# run directory (eval_only appends to the run it evaluates)
run = RunDir(out_dir, config, resume=ckpt is not None, device=device, dtype=dtype, world_size=1,
             data={'path': os.path.abspath(data_path), 'builtin': not data})
run.write_text('model.txt', f"{model}\nparameters: {sum(p.numel() for p in model.parameters()):,}\n")
run.event('start', epoch=epoch, resumed_from=resume_path, config_hash=run.config_hash, eval_only=eval_only)
run.print(f"data {data_path} | {len(images):,} images {height}x{width} | {C} classes | train {len(train_idx):,} | "
          f"val {len(val_idx):,} | factors {factor_names or (factors.shape[1] if factors is not None else 'none')}")
if not mask.all():
    run.print(f"data {height}x{width} padded to {images.shape[1]}x{images.shape[2]} with class 0; "
              f"the padding is masked out of the loss and metrics")
run.print(f"class pixel shares {np.round(counts / counts.sum(), 4).tolist()} | class weights "
          f"{[round(float(w), 3) for w in weights] if weights is not None else 'off'}")


def batch_of(indices):
    return torch.from_numpy(images[indices]).long().to(device)  # (B, S, S) class ids


def kl_target():
    """The capacity objective's C at this iteration (Burgess et al.: rising linearly); 0 for the others."""
    return capacity_at(iter_num, capacity_max, capacity_stop_iter) if objective == 'capacity' else 0.0


def reconstruction_loss(logits, targets):
    """Per image (B,): CE or focal, class-weighted or not, summed over real pixels."""
    return focal_loss(logits.float(), targets, focal_gamma if recon_loss == 'focal' else 0.0, weights, mask_t)


@torch.no_grad()
def evaluate(indices, chunk=256):
    """Val metrics in eval mode (z = mu, no sampling): loss terms, KL per latent, pixel accuracy, per-class
    recall, foreground IoU (pixels of any class > 0, predicted vs true)."""
    model.eval()
    recon_sum, kl_sum, confusion = 0.0, torch.zeros(model.latent_dim), torch.zeros(C * C, dtype=torch.long)
    valid = torch.from_numpy(mask > 0).to(device)
    for start in range(0, len(indices), chunk):
        x = batch_of(indices[start:start + chunk])
        with autocast:
            logits, mu, logvar = model(x)
        recon_sum += reconstruction_loss(logits, x).sum().item()
        kl_sum += kl_per_dim(mu.float(), logvar.float()).sum(0).cpu()
        pairs = (x * C + logits.argmax(1))[:, valid]  # true * C + predicted, real pixels only
        confusion += torch.bincount(pairs.reshape(-1), minlength=C * C).cpu()
    model.train()
    confusion = confusion.view(C, C).double()  # rows: true class, columns: predicted
    kl_dims = kl_sum / len(indices)
    recon, kl = recon_sum / len(indices), kl_dims.sum().item()
    fg_both, fg_true, fg_pred = confusion[1:, 1:].sum(), confusion[1:].sum(), confusion[:, 1:].sum()
    metrics = {'val/loss': vae_objective(recon, kl, objective, beta, kl_target(), capacity_gamma),
               'recon': recon, 'kl': kl, **{f'kl_dim_{j}': v for j, v in enumerate(kl_dims.tolist())},
               'active_dims': int((kl_dims > 0.05).sum()),
               'pixel_acc': (confusion.trace() / confusion.sum()).item(),
               'fg_iou': (fg_both / max(fg_true + fg_pred - fg_both, 1)).item()}
    recall = confusion.diagonal() / confusion.sum(1).clamp_min(1)
    return metrics | {f'recall_{c}': r for c, r in enumerate(recall.tolist())}


def save_figure(name, rgb_fn):
    """A picture must never stop training: any failure becomes an error event and a log line."""
    path = os.path.join(out_dir, 'figures', name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, png_bytes(rgb_fn()))
        run.print(f"[VISUALIZATION] Saved: {path}")
    except Exception as e:
        run.event('error', fatal=False, figure=name, message=f"{type(e).__name__}: {e}")
        run.print(f"[VISUALIZATION] Failed: {path} ({type(e).__name__}: {e}); training continues")


@torch.no_grad()
def decoded(z):
    return model.decode(z).argmax(1)[:, :height, :width].cpu().numpy()  # (B, H, W) class ids, padding cropped


def reconstruction_grid():
    """Top row: 10 fixed training images; bottom row: their reconstructions (eval mode, z = mu)."""
    model.eval()
    x = batch_of(figure_idx)
    recon = decoded(model.encode(x)[0])
    model.train()
    return tile_images([list(x[:, :height, :width].cpu().numpy()), list(recon)], colours, scale=max(1, 128 // width))


def traversal_grid(steps=9):
    """Row j: latent j of the first figure image swept over -3..3 (prior sigmas), the other latents at their
    means; rows ordered by latent index."""
    model.eval()
    mu = model.encode(batch_of(figure_idx[:1]))[0][0]
    z = mu.repeat(model.latent_dim * steps, 1)  # (D * steps, D)
    for j in range(model.latent_dim):
        z[j * steps:(j + 1) * steps, j] = torch.linspace(-3, 3, steps, device=device)
    frames = decoded(z)
    model.train()
    return tile_images([list(frames[j * steps:(j + 1) * steps]) for j in range(model.latent_dim)], colours,
                       scale=max(1, 64 // width))


@torch.no_grad()
def disentanglement():
    """MIG of the encoder means of up to mig_samples images (all splits) against the data's factors."""
    model.eval()
    chosen = np.sort(np.random.default_rng(seed + 2).choice(len(images), min(mig_samples, len(images)), replace=False))
    means = torch.cat([model.encode(batch_of(chosen[s:s + 256]))[0].float().cpu() for s in range(0, len(chosen), 256)])
    model.train()
    gaps = mig_per_factor(means.numpy(), factors[chosen])
    names = factor_names or [str(k) for k in range(factors.shape[1])]
    return mig(means.numpy(), factors[chosen]), {names[k]: round(g, 4) for k, g in gaps.items()}


def summary(metrics):
    return (f"recon {metrics['recon']:.2f} | kl {metrics['kl']:.2f} | active {metrics['active_dims']} | "
            f"acc {metrics['pixel_acc']:.4f} | fg_iou {metrics['fg_iou']:.4f}"
            + (f" | mig {metrics['mig']:.4f}" if 'mig' in metrics else ''))


def checkpoint(names, metrics):
    for name in names:
        save_checkpoint(os.path.join(out_dir, name), epoch=epoch, step_in_epoch=step_in_epoch, iter_num=iter_num,
                        model_state_dict=model.state_dict(), optimizer_state_dict=opt.state_dict(), args=config,
                        model_args=model_args, rng_state=rng_state(), metrics=metrics, best_metric=best_val_loss,
                        epoch_sums=history, config_hash=run.config_hash,
                        discriminator_state_dict=discriminator.state_dict() if discriminator is not None else None,
                        disc_optimizer_state_dict=disc_opt.state_dict() if discriminator is not None else None)


# -----------------------------------------------------------------------------
# eval_only: the figures and metrics of a trained model, no training
# -----------------------------------------------------------------------------
if eval_only:
    metrics = evaluate(val_idx)
    save_figure('reconstructions_eval.png', reconstruction_grid)
    save_figure('traversals_eval.png', traversal_grid)
    if factors is not None:
        metrics['mig'], metrics['mig_per_factor'] = disentanglement()
    run.event('end', reason='eval_only', checkpoint=resume_path, **metrics)
    run.print(f"eval_only {resume_path} | {summary(metrics)} {metrics.get('mig_per_factor', '')}")
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training loop: epochs of shuffled batches; val metrics, checkpoints and figures at the end of each epoch
# -----------------------------------------------------------------------------
stop = StopSignal()
steps_per_epoch = len(train_idx) // batch_size  # the ragged tail is dropped
t_start, signalled = time.time(), False
while epoch < max_epochs:
    t_epoch = time.time()
    perm = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()
    sums = {'loss': 0.0, 'recon': 0.0, 'kl': 0.0, 'tc': 0.0, 'steps': 0} | history  # a pre-empted epoch's carry on
    while step_in_epoch < steps_per_epoch:
        if stop.requested:  # pre-emption: save mid-epoch, exit 0, continue with --init_from=auto
            history, signalled = sums, True
            break
        x = batch_of(train_idx[perm[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]])
        with autocast:
            logits, mu, logvar = model(x)
        recon = reconstruction_loss(logits, x).mean()  # summed over pixels, mean over images
        kl = kl_per_dim(mu.float(), logvar.float()).sum(1).mean()  # summed over latents, mean over images
        tc, z = torch.zeros((), device=device), None  # TC estimate ('tc', 'factor'), codes for the discriminator
        if objective == 'tc':
            tc = total_correlation(mu.float(), logvar.float(), len(train_idx))
        elif objective == 'factor':  # the discriminator's mean logit on fresh samples z ~ q(z|x) estimates TC
            z = reparameterize(mu.float(), logvar.float())  # (B, D)
            tc = discriminator(z).mean()
        loss = vae_objective(recon, kl, objective, beta, kl_target(), capacity_gamma, tc, factor_gamma)
        if not math.isfinite(loss.item()):  # stop before a bad step reaches the weights or a checkpoint
            run.event('error', epoch=epoch, step=step_in_epoch, message=f"training loss is {loss.item()}")
            raise SystemExit(f"error: training loss is {loss.item()} at epoch {epoch}; last.pt kept as it was")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if discriminator is not None:  # then the discriminator learns from the same codes (its grads from loss dropped)
            disc_opt.zero_grad(set_to_none=True)
            discriminator_loss(discriminator, z).backward()
            disc_opt.step()
        step_in_epoch, iter_num = step_in_epoch + 1, iter_num + 1
        for key, value in (('loss', loss), ('recon', recon), ('kl', kl), ('tc', tc)):
            sums[key] += value.item()
        sums['steps'] += 1
    if signalled:
        checkpoint(['last.pt'], {})
        run.event('end', epoch=epoch, reason='signal', best_val_loss=best_val_loss)
        run.print(f"signal received: saved {out_dir}/last.pt in epoch {epoch}; continue with --init_from=auto")
        break

    # end of epoch: val metrics into scalars.csv, last.pt (+ best.pt on val/loss), pictures
    epoch, step_in_epoch, history = epoch + 1, 0, {}
    metrics = evaluate(val_idx)
    if factors is not None and mig_interval > 0:  # disentanglement as a learning curve (nan between measurements)
        metrics['mig'] = disentanglement()[0] if epoch % mig_interval == 0 else float('nan')
    steps = max(sums['steps'], 1)
    train = {f'train/{key}': sums[key] / steps for key in ('loss', 'recon', 'kl', 'tc')}  # tc: 0 unless 'tc'/'factor'
    epoch_s = time.time() - t_epoch
    run.scalars({'epoch': epoch, 'time_s': round(time.time() - t_start, 2), 'lr': learning_rate, **train, **metrics,
                 'capacity': kl_target()})
    run.event('eval', epoch=epoch, iter_num=iter_num, **train, **metrics)
    best = metrics['val/loss'] < best_val_loss
    best_val_loss = min(best_val_loss, metrics['val/loss'])
    checkpoint(['last.pt'] + (['best.pt'] if best else []), metrics)
    if epoch % log_interval == 0 or epoch == max_epochs:
        run.print(f"epoch {epoch} | loss {train['train/loss']:.2f} | val loss {metrics['val/loss']:.2f} | "
                  f"{summary(metrics)} | {1000 * epoch_s:.0f}ms | {steps * batch_size / epoch_s:.0f} img/s")
    save_figure(f'reconstructions_epoch_{epoch}.png', reconstruction_grid)
    if best:
        save_figure('reconstructions_best.png', reconstruction_grid)
        save_figure('traversals_best.png', traversal_grid)

# the end: MIG with best.pt's weights (selected on val/loss) when the data has factors
if not signalled:
    end = {'best_val_loss': best_val_loss, 'epochs': epoch, 'iters': iter_num,
           'wall_time_s': round(time.time() - t_start, 1)}
    if factors is not None and os.path.exists(os.path.join(out_dir, 'best.pt')):
        model.load_state_dict(load_checkpoint(os.path.join(out_dir, 'best.pt'))['model_state_dict'])
        end['mig'], end['mig_per_factor'] = disentanglement()
        run.print(f"mig (best.pt, {min(mig_samples, len(images)):,} images) | {end['mig']:.4f} | "
                  + ' | '.join(f"{k} {v:.4f}" for k, v in end['mig_per_factor'].items()))
    run.event('end', reason='done', **end)
