"""
Train a beta-VAE (Higgins et al. 2017; capacity annealing: Burgess et al. 2018; beta-TCVAE: Chen et al. 2018;
FactorVAE's discriminator: Kim & Mnih 2018) on categorical images: every pixel is one of C classes (class 0 =
background), the decoder predicts C logits per pixel, the reconstruction loss is cross-entropy or focal loss
(optionally class-weighted) summed over pixels. Without data it trains on built-in procedural dSprites-like sprites
with known factors, written as a dSprites npz and read back by the same loader. Writes reconstruction grids at
every checkpoint, latent traversals at the best one, KL per latent, foreground IoU and, where the data has factors,
MIG (Chen et al. 2018).

    python train_vae.py                                                   # built-in sprites, ~1 h, 1 CPU thread
    python train_vae.py config/vae_dsprites.py --data=dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz
    python train_vae.py config/vae_option_b.py --quick_test=True          # seed 002's options A/B/C on colour grids
    python train_vae.py config/vae_grids.py --data=my_grids.npz           # any (N, H, W) integer grids
    python train_vae.py --eval_only=True --init_from=best.pt              # figures + metrics of a trained model
    sbatch --requeue --signal=B:USR1@120 --gres=gpu:1 \
        --wrap "exec python train_vae.py config/vae_dsprites.py --data=... --init_from=auto"
"""
import base64
import html
import math
import os
import time

from common import (Clock, RunDir, UserError, autocast_context, compile_model, configure, epoch_line, fields, finish,
                    init_distributed, load_checkpoint, load_optimizer_state, rng_state, seed_everything,
                    set_kernels, set_rng_state, start_from, step_check, step_line,
                    write_atomic)  # first: its stop signals cover the slow imports below
import numpy as np
import torch

from data import WindowSampler, builtin_vae_data, load_vae_data, pad_images, palette, png_bytes, tile_images
from model import (BetaVAE, TCDiscriminator, capacity_at, class_weights, discriminator_loss, focal_loss, kl_per_dim,
                   mig, mig_per_factor, reparameterize, total_correlation, vae_objective)

# -----------------------------------------------------------------------------
# default config: every knob, one per line (config files and --key=value override these); a comment that starts
# with quoted values 'a' | 'b' or ends with an interval [1, inf) declares what the key accepts: configure() checks
# -----------------------------------------------------------------------------
out_dir = 'out/vae'  # run directory; fixed, so a requeued job finds its own checkpoint
init_from = 'scratch'  # 'scratch' | 'resume' | 'auto' | a checkpoint (e.g. 'best.pt', for eval_only)
overwrite = False  # start anew in an out_dir that holds a run: the old one is moved to <out_dir>.replaced-<time>
eval_only = False  # write the figures and metrics of the init_from checkpoint (val split, MIG), do not train
# data
data = ''  # .npz (dSprites 'imgs' or 'grids') or .h5 of (N, H, W) class ids; '' = built-in data of dataset_kind
dataset_kind = 'sprites'  # 'sprites' (64x64, 2 classes, 5 known factors) | 'grids' (30x30, 10 colours): built-in data
num_images = 50_000  # built-in: images made (sprites 0 = all 737,280, grids 0 = 10,000); a file: subset (0 = all)
#   [0, inf)
num_classes = 0  # C; 0 = one more than the largest class id in the data, in [0, inf)
val_fraction = 0.05  # share of the images held out for val/loss, the metrics and best.pt, in (0, 1)
cache_dir = 'cache'  # the built-in data is written here once, keyed by its generator settings
# model
latent_dim = 10  # latents; KL_j > 0.05 nats counts as active; [1, inf)
# objective: recon (summed over pixels, mean over the batch) + beta * KL (summed over latents)
objective = 'factor'  # 'beta' | 'capacity' | 'tc' | 'factor'. beta: recon + beta KL; capacity: recon +
#                       capacity_gamma |KL - C|, C annealed; tc: recon + KL + (beta - 1) TC, beta-TCVAE, TC estimated
#                       from each batch's posteriors; factor: recon + beta KL + factor_gamma TC, TC from a
#                       discriminator (Kim & Mnih: beta 1). val/loss leaves their TC out (it needs sampling)
beta = 4.0  # KL weight against the pixel-summed reconstruction term (not a per-pixel mean), in [0, inf)
capacity_max = 25.0  # 'capacity': final KL target C in nats, in [0, inf)
capacity_stop_iter = 100_000  # 'capacity': C rises linearly from 0 to capacity_max over these iterations, [1, inf)
capacity_gamma = 1000.0  # 'capacity': weight of |KL - C|, in [0, inf)
factor_gamma = 35.0  # 'factor': weight of the TC (Kim & Mnih: 10-100 on dSprites), in [0, inf)
disc_hidden = 256  # 'factor': width of its 6 hidden layers (Kim & Mnih: 1000, a far slower step: bench.py vae)
#   [1, inf)
disc_learning_rate = 5e-4  # 'factor': its Adam, betas (0.5, 0.9); Kim & Mnih give it the VAE's rate (both 1e-4)
#   [0, inf)
recon_loss = 'ce'  # 'ce' (cross-entropy) | 'focal' (Lin et al. 2017)
focal_gamma = 2.0  # focal loss exponent; 0 = cross-entropy; [0, inf)
use_class_weights = False  # weight each pixel's loss by its class's weight (mean pixel weight 1 over the data)
class_weight_method = 'sqrt_inverse'  # 'inverse' | 'sqrt_inverse' | 'balanced': N/(C n_c), its root, median-frequency
# optimization
max_epochs = 30  # training epochs; on the built-in sprites FactorVAE opens its 4th latent at epoch 22, [1, inf)
quick_test = False  # seed 002's quick test: 5 epochs, whatever max_epochs says
batch_size = 64  # images per step, in [1, inf)
learning_rate = 5e-4  # Adam, constant; the literature's 1e-4 is for ~300k-step runs (config/vae_dsprites.py)
#   [0, inf)
mig_samples = 10_000  # images encoded for MIG (data with factors only), in [1, inf)
mig_interval = 1  # also measure MIG into scalars.csv every this many epochs (0 = only at the end, with best.pt)
#   [0, inf)
log_interval = 100  # print a progress line every this many steps inside an epoch (and one line per epoch), [1, inf)
# system
seed = 1337  # model init, data split, batch order, sampling noise
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'float32'  # 'float32' | 'bfloat16' (CUDA autocast) | 'auto'
compile = False  # torch.compile the model (falls back to eager where compilation fails)
deterministic = False  # True: deterministic CUDA kernels, TF32 off (GPU runs repeat bit for bit; slower); CPU always
config = configure(globals())
# -----------------------------------------------------------------------------

# setup: what to start from (on resume the run's saved config, changed only by the keys given now), every check
# that needs no data, then device and seeds; nothing is written before the run directory below
ckpt, resume_path, changed = start_from(globals(), config, fixed=('data', 'dataset_kind', 'num_images', 'num_classes',
                                                                  'val_fraction', 'latent_dim', 'disc_hidden', 'seed'))
if objective == 'tc' and batch_size < 2:  # the TC estimate needs other images of the batch to stand in for q(z)
    raise UserError(f"objective='tc' needs batch_size >= 2 (got {batch_size}): the total correlation is estimated "
                    f"from the other images of each batch")
if eval_only and not ckpt:
    raise UserError("eval_only=True needs a checkpoint: --init_from=best.pt (or last.pt, or a path)")
ddp, _, _, device = init_distributed(device)
if ddp:
    raise UserError("train_vae.py runs in one process: launch it with python, not torchrun")
dtype, autocast = autocast_context(device, dtype)
set_kernels(deterministic)
max_epochs = 5 if quick_test else max_epochs
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
sampler = WindowSampler(len(train_idx), batch_size, seed)  # shuffled every epoch; batch_size capped by the data
model_args = dict(num_classes=found_classes, image_size=images.shape[1], latent_dim=latent_dim)
if ckpt:  # the architecture comes from the checkpoint (start_from); the data must fit it
    if model_args['image_size'] != ckpt['model_args']['image_size']:
        raise UserError(f"{resume_path}: image_size={ckpt['model_args']['image_size']} in the checkpoint, "
                        f"{model_args['image_size']} for this data ({data_path}); use the data it was trained with")
    if found_classes > ckpt['model_args']['num_classes']:
        raise UserError(f"data {data_path} has {found_classes} classes; {resume_path} was trained on "
                        f"{ckpt['model_args']['num_classes']}")
    model_args = ckpt['model_args']
num_classes = model_args['num_classes']
counts = sum(np.bincount(images[train_idx[s:s + 4096]][:, mask > 0].reshape(-1), minlength=num_classes)
             for s in range(0, len(train_idx), 4096))  # (num_classes,) real pixels of each class
weights = class_weights(counts, class_weight_method).to(device) if use_class_weights else None

# model (+ resume), optimizer
model = BetaVAE(**model_args, class_frequencies=counts / counts.sum()).to(device)
if ckpt:
    model.load_state_dict(ckpt['model_state_dict'])
optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
discriminator = TCDiscriminator(model_args['latent_dim'], disc_hidden).to(device) if objective == 'factor' else None
if discriminator is not None:
    disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=disc_learning_rate, betas=(0.5, 0.9))
    if ckpt and ckpt.get('discriminator_state_dict') and not eval_only:  # absent: a run switching objectives
        discriminator.load_state_dict(ckpt['discriminator_state_dict'])
        load_optimizer_state(disc_optimizer, ckpt['disc_optimizer_state_dict'])
epoch, step_in_epoch, iter_num, best_val_loss, history = 0, 0, 0, math.inf, {}
if ckpt and not eval_only:
    load_optimizer_state(optimizer, ckpt['optimizer_state_dict'])  # moments from the file, hyperparameters from config
    set_rng_state(ckpt['rng_state'], device)
    epoch, step_in_epoch, iter_num = ckpt['epoch'], ckpt['step_in_epoch'], ckpt['iter_num']
    best_val_loss, history = ckpt['best_metric'], ckpt['epoch_sums']
raw_model = model  # the un-compiled module: evaluated, drawn and saved
model = compile_model(model, compile)
mask_t = None if mask.all() else torch.from_numpy(mask).to(device)  # padding is left out of the loss and metrics
figure_idx = np.sort(np.random.default_rng(seed + 1).choice(train_idx, min(10, len(train_idx)), replace=False))
colours = palette(num_classes)

# run directory (eval_only appends to the run it evaluates)
run = RunDir(out_dir, config, ckpt, resume_path, changed, device=device, dtype=dtype, world_size=1,
             data={'path': os.path.abspath(data_path), 'builtin': not data})
n_params = sum(p.numel() for p in raw_model.parameters())
run.write_text('model.txt', f"{raw_model}\nparameters: {n_params:,}\n")
run.event('start', epoch=epoch, resumed_from=resume_path, config_hash=run.config_hash, eval_only=eval_only)
run.print(f"data {data_path} | {len(images):,} images {height}x{width} | {num_classes} classes | train "
          f"{len(train_idx):,} | val {len(val_idx):,} | factors "
          f"{factor_names or (factors.shape[1] if factors is not None else 'none')}")
if sampler.batch_size < batch_size:
    run.print(f"train: {len(train_idx):,} images cannot fill batch_size={batch_size}: batches of {sampler.batch_size}")
if not mask.all():
    run.print(f"data {height}x{width} padded to {images.shape[1]}x{images.shape[2]} with class 0; "
              f"the padding is masked out of the loss and metrics")
run.print(f"class pixel shares {np.round(counts / counts.sum(), 4).tolist()} | class weights "
          f"{[round(float(w), 3) for w in weights] if weights is not None else 'off'}")
run.print(f"model: {n_params:,} parameters | objective {objective} | device {device} | dtype {dtype}")


# the whole data set on the GPU when it takes under a quarter of its free memory: batches are gathered there
on_gpu = device.startswith('cuda') and images.nbytes < torch.cuda.mem_get_info(device)[0] // 4
images_t = torch.from_numpy(images).to(device if on_gpu else 'cpu')  # (N, S, S) class ids, the file's dtype


def batch_of(indices):
    rows = torch.from_numpy(np.asarray(indices)).to(images_t.device, non_blocking=True)
    return images_t[rows].to(device, non_blocking=True).long()  # (B, S, S) class ids


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
    raw_model.eval()
    recon_sum = torch.zeros((), dtype=torch.float64, device=device)  # sums stay on the device: no sync per chunk
    kl_sum = torch.zeros(raw_model.latent_dim, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    valid = torch.from_numpy(mask > 0).to(device)
    for start in range(0, len(indices), chunk):
        x = batch_of(indices[start:start + chunk])
        with autocast:
            logits, mu, logvar = raw_model(x)
        recon_sum += reconstruction_loss(logits, x).sum().double()
        kl_sum += kl_per_dim(mu.float(), logvar.float()).sum(0)
        pairs = (x * num_classes + logits.argmax(1))[:, valid]  # true * num_classes + predicted, real pixels only
        confusion += torch.bincount(pairs.reshape(-1), minlength=num_classes * num_classes)
    raw_model.train()
    confusion = confusion.cpu().view(num_classes, num_classes).double()  # rows: true class, columns: predicted
    kl_dims = kl_sum.cpu() / len(indices)
    recon, kl = recon_sum.item() / len(indices), kl_dims.sum().item()
    fg_both, fg_true, fg_pred = confusion[1:, 1:].sum(), confusion[1:].sum(), confusion[:, 1:].sum()
    metrics = {'val/loss': vae_objective(recon, kl, objective, beta, kl_target(), capacity_gamma),
               'val/recon': recon, 'val/kl': kl, 'val/active_dims': int((kl_dims > 0.05).sum()),
               'val/pixel_acc': (confusion.trace() / confusion.sum()).item(),
               'val/fg_iou': (fg_both / max(fg_true + fg_pred - fg_both, 1)).item(),
               **{f'val/kl_dim_{j}': v for j, v in enumerate(kl_dims.tolist())}}
    recall = confusion.diagonal() / confusion.sum(1).clamp_min(1)
    return metrics | {f'val/recall_{c}': r for c, r in enumerate(recall.tolist())}


def save_figure(name, figure_fn):
    """name.png (seed 002's pictures, pixels only) and name.svg: the same pixels with a title, row and column labels.
    A picture must never stop training: any failure becomes an error event and a log line."""
    path = os.path.join(out_dir, 'figures', name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rgb, title, row_labels, col_labels, (tile_h, tile_w, scale) = figure_fn()
        png = png_bytes(rgb)
        write_atomic(path, png)
        write_atomic(path[:-4] + '.svg', labeled_svg(png, rgb.shape, title, row_labels, col_labels, tile_h, tile_w,
                                                     scale).encode())
        run.print(f"[VISUALIZATION] Saved: {path} (labeled: {name[:-4]}.svg)")
    except Exception as e:
        run.event('error', fatal=False, figure=name, message=f"{type(e).__name__}: {e}")
        run.print(f"[VISUALIZATION] Failed: {path} ({type(e).__name__}: {e}); training continues")


def labeled_svg(png, shape, title, row_labels, col_labels, tile_h, tile_w, scale, gap=2, left=150, top=44):
    """An SVG that shows the PNG's pixels (base64, drawn 1:1) with the title above, a label left of each row of tiles
    and one above each column: what a reader needs and a PNG writer from the standard library cannot draw."""
    height, width = shape[0], shape[1]
    row_y = [top + (gap + i * (tile_h + gap) + tile_h / 2) * scale for i in range(len(row_labels))]
    col_x = [left + (gap + j * (tile_w + gap) + tile_w / 2) * scale for j in range(len(col_labels))]
    text = [f'<text x="{left}" y="16" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    text += [f'<text x="{left - 6}" y="{y:.1f}" text-anchor="end" dominant-baseline="middle">{html.escape(t)}</text>'
             for y, t in zip(row_y, row_labels)]
    text += [f'<text x="{x:.1f}" y="{top - 6}" text-anchor="middle">{html.escape(t)}</text>'
             for x, t in zip(col_x, col_labels)]
    image = base64.b64encode(png).decode()
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 10}" height="{top + height + 10}" '
            f'font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>'
            f'<image x="{left}" y="{top}" width="{width}" height="{height}" style="image-rendering:pixelated" '
            f'href="data:image/png;base64,{image}"/>{"".join(text)}</svg>\n')


@torch.no_grad()
def decoded(z):
    return raw_model.decode(z).argmax(1)[:, :height, :width].cpu().numpy()  # (B, H, W) class ids, padding cropped


def reconstruction_grid(when):
    """Top row: 10 fixed training images; bottom row: their reconstructions (eval mode, z = mu)."""
    raw_model.eval()
    x = batch_of(figure_idx)
    recon = decoded(raw_model.encode(x)[0])
    raw_model.train()
    scale = max(1, 128 // width)
    rgb = tile_images([list(x[:, :height, :width].cpu().numpy()), list(recon)], colours, scale=scale)
    return (rgb, f"reconstructions, {when} (z = mu)", ['training image', 'reconstruction'],
            [f"#{i}" for i in figure_idx], (height, width, scale))


def traversal_grid(when, metrics, steps=9):
    """Row j: latent j of the first figure image swept over -3..3 (prior sigmas), the other latents at their
    means; rows ordered by latent index, each labeled with that latent's val KL."""
    raw_model.eval()
    mu = raw_model.encode(batch_of(figure_idx[:1]))[0][0]
    z = mu.repeat(raw_model.latent_dim * steps, 1)  # (D * steps, D)
    values = torch.linspace(-3, 3, steps)
    for j in range(raw_model.latent_dim):
        z[j * steps:(j + 1) * steps, j] = values.to(device)
    frames = decoded(z)
    raw_model.train()
    scale = max(1, 64 // width)
    rgb = tile_images([list(frames[j * steps:(j + 1) * steps]) for j in range(raw_model.latent_dim)], colours,
                      scale=scale)
    rows = [f"z{j} KL {metrics[f'val/kl_dim_{j}']:.2f}" for j in range(raw_model.latent_dim)]
    return (rgb, f"latent traversals of image #{figure_idx[0]}, {when}: z_j from -3 to 3 (KL in nats)", rows,
            [f"{v:+.1f}" for v in values.tolist()], (height, width, scale))


@torch.no_grad()
def disentanglement():
    """MIG of the encoder means of up to mig_samples images (all splits) against the data's factors."""
    raw_model.eval()
    chosen = np.sort(np.random.default_rng(seed + 2).choice(len(images), min(mig_samples, len(images)), replace=False))
    means = torch.cat([raw_model.encode(batch_of(chosen[s:s + 256]))[0].float().cpu()
                       for s in range(0, len(chosen), 256)])  # (N, latent_dim)
    raw_model.train()
    gaps = mig_per_factor(means.numpy(), factors[chosen])
    names = factor_names or [str(k) for k in range(factors.shape[1])]
    return mig(means.numpy(), factors[chosen]), {names[k]: round(g, 4) for k, g in gaps.items()}


def shown(metrics):
    """The validation figures an epoch line shows (scalars.csv has every latent's KL and every class's recall)."""
    keys = ('val/loss', 'val/recon', 'val/kl', 'val/active_dims', 'val/pixel_acc', 'val/fg_iou', 'mig')
    return {k: metrics[k] for k in keys if k in metrics}


def checkpoint(names, metrics):
    for name in names:
        run.save_checkpoint(name, epoch=epoch, step_in_epoch=step_in_epoch, iter_num=iter_num,
                            model_state_dict=raw_model.state_dict(), optimizer_state_dict=optimizer.state_dict(),
                            args=config, model_args=model_args, rng_state=rng_state(device), metrics=metrics,
                            best_metric=best_val_loss, epoch_sums=history,
                            discriminator_state_dict=discriminator and discriminator.state_dict(),
                            disc_optimizer_state_dict=discriminator and disc_optimizer.state_dict())


# -----------------------------------------------------------------------------
# eval_only: the figures and metrics of a trained model, no training
# -----------------------------------------------------------------------------
if eval_only:
    metrics = evaluate(val_idx)
    when = f"{os.path.basename(resume_path)} (epoch {ckpt['epoch']})"
    save_figure('reconstructions_eval.png', lambda: reconstruction_grid(when))
    save_figure('traversals_eval.png', lambda: traversal_grid(when, metrics))
    if factors is not None:
        metrics['mig'], metrics['mig_per_factor'] = disentanglement()
        run.print(f"mig per factor | {fields(metrics['mig_per_factor'])}")
    run.end('eval_only', resume_path, {k: v for k, v in metrics.items() if k in ('val/loss', 'val/fg_iou', 'mig')},
            checkpoint=resume_path, **metrics)
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training loop: epochs of shuffled batches; val metrics, checkpoints and figures at the end of each epoch
# -----------------------------------------------------------------------------
steps_per_epoch = len(train_idx) // sampler.batch_size  # the ragged tail is dropped
sampler.load_state_dict({'epoch': epoch, 'cursor': step_in_epoch * sampler.batch_size})
t_start, stopped = time.time(), None
clock = Clock(epoch * steps_per_epoch + step_in_epoch, max_epochs * steps_per_epoch)  # elapsed and ETA, in steps
while epoch < max_epochs:
    t_epoch, step_times = time.time(), []
    sums = {'loss': 0.0, 'recon': 0.0, 'kl': 0.0, 'tc': 0.0, 'steps': 0, 'data_s': 0.0, 'step_s': 0.0} | history
    while step_in_epoch < steps_per_epoch:
        if stopped:  # Ctrl-C, SIGTERM (seen by the last step's check): save mid-epoch; resume continues exactly
            break
        t_step = time.time()
        x = batch_of(train_idx[sampler.next()])
        sums['data_s'] += time.time() - t_step
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
        loss.backward()
        values, stopped = step_check(False, loss, recon, kl, tc)  # the step's one host sync
        if not math.isfinite(values[0]):  # stop before a bad step reaches the weights or a checkpoint
            run.event('error', epoch=epoch, step=step_in_epoch, message=f"training loss is {values[0]}")
            raise SystemExit(f"error: training loss is {values[0]} at epoch {epoch}; last.pt kept as it was")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if discriminator is not None:  # then the discriminator learns from the same codes (its grads from loss dropped)
            disc_optimizer.zero_grad(set_to_none=True)
            discriminator_loss(discriminator, z).backward()
            disc_optimizer.step()
        step_in_epoch, iter_num = step_in_epoch + 1, iter_num + 1
        for key, value in zip(('loss', 'recon', 'kl', 'tc'), values):
            sums[key] += value
        sums['steps'] += 1
        step_times.append(time.time() - t_step)
        sums['step_s'] += step_times[-1]
        if step_in_epoch % log_interval == 0 and step_in_epoch < steps_per_epoch:  # progress inside a long epoch
            where = f"epoch {epoch + 1}/{max_epochs} | step {step_in_epoch}/{steps_per_epoch}"
            run.print(step_line(where, values[0], learning_rate, np.mean(step_times), None,  # mfu: no FLOP count yet
                                clock(epoch * steps_per_epoch + step_in_epoch)))
            step_times = []
    if stopped:
        history = sums  # a stopped epoch's sums carry on
        checkpoint(['last.pt'], {})
        run.end(stopped, f"epoch {epoch + 1}/{max_epochs}, step {step_in_epoch}/{steps_per_epoch}", epoch=epoch,
                best_val_loss=best_val_loss)
        break

    # end of epoch: val metrics into scalars.csv, last.pt (+ best.pt on val/loss), pictures
    train_s, steps = time.time() - t_epoch, max(sums['steps'], 1)
    epoch, step_in_epoch, history = epoch + 1, 0, {}
    metrics = evaluate(val_idx)
    if factors is not None and mig_interval > 0:  # disentanglement as a learning curve (empty between measurements)
        metrics['mig'] = disentanglement()[0] if epoch % mig_interval == 0 else None
    train = {f'train/{key}': sums[key] / steps for key in ('loss', 'recon', 'kl', 'tc')}  # tc: 0 unless 'tc'/'factor'
    run.scalars({'epoch': epoch, 'time_s': round(time.time() - t_start, 2), 'lr': learning_rate,
                 'train/loss': train['train/loss'], **metrics, **train, 'capacity': kl_target(),
                 'samples_per_s': round(steps * sampler.batch_size / train_s, 1),
                 'data_share': round(sums['data_s'] / train_s, 3)})
    run.event('eval', epoch=epoch, iter_num=iter_num, **train, **metrics)
    best = metrics['val/loss'] < best_val_loss
    best_val_loss = min(best_val_loss, metrics['val/loss'])
    checkpoint(['last.pt'] + (['best.pt'] if best else []), metrics)
    run.print(epoch_line(f"epoch {epoch}/{max_epochs}", {'train/loss': train['train/loss'], **shown(metrics)},
                         steps * sampler.batch_size / train_s, sums['step_s'] / steps, sums['data_s'] / train_s,
                         clock(epoch * steps_per_epoch)))
    save_figure(f'reconstructions_epoch_{epoch}.png', lambda: reconstruction_grid(f"epoch {epoch}"))
    if best:
        save_figure('reconstructions_best.png', lambda: reconstruction_grid(f"epoch {epoch}, best.pt"))
        save_figure('traversals_best.png', lambda: traversal_grid(f"epoch {epoch}, best.pt", metrics))

# the end: MIG with best.pt's weights (selected on val/loss) when the data has factors
if not stopped:
    end = {'best_val_loss': best_val_loss, 'epochs': epoch, 'iters': iter_num,
           'wall_time_s': round(time.time() - t_start, 1)}
    if factors is not None and os.path.exists(os.path.join(out_dir, 'best.pt')):
        raw_model.load_state_dict(load_checkpoint(os.path.join(out_dir, 'best.pt'))['model_state_dict'])
        end['mig'], end['mig_per_factor'] = disentanglement()
        run.print(f"mig (best.pt, {min(mig_samples, len(images)):,} images) | {end['mig']:.4f} | "
                  f"{fields(end['mig_per_factor'])}")
    run.end('done', f"epoch {epoch}/{max_epochs}", {'best val/loss': best_val_loss, 'mig': end.get('mig')}, **end)
finish(False, stopped)
