"""
Distil a trained CRNN teacher (train_audio.py's best.pt) into a TinyCNN or TinyCNN-CBAM student (seed 001,
Hinton et al. 2015): L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE_w(z_s, y).
This file is train_audio.py plus the teacher: `diff train_audio.py train_kd.py` is the whole method. The student is
built, seeded and trained exactly as train_audio.py trains it, so alpha = 0 reproduces the student baseline bit for
bit. The teacher's logits of every training clip are computed once (there is no augmentation, so they never
change) and kept beside the feature cache, keyed by the teacher file's sha256: a KD epoch costs a student epoch.
The gate (seed 001): refuse (exit 3) unless the teacher's best val macro-F1 beats the best student baseline's by
gate_min_gap; both figures are read from the finished runs' end events.

    python train_kd.py config/kd_tinycnn.py --teacher_ckpt=out/audio_crnn/best.pt --alpha=0.6 --temperature=4
    python train_kd.py config/kd_tinycnn_cbam.py --cbam_reduction=8 --cbam_kernel=3 --alpha=0.9 --temperature=3
    python train_kd.py config/kd_tinycnn.py --manifest=my_sounds/manifest.csv --teacher_ckpt=out/my_crnn/best.pt
    sbatch --requeue --signal=B:USR1@120 --gres=gpu:1 \
        --wrap "exec python train_kd.py config/kd_tinycnn.py --manifest=... --init_from=auto"
"""
import hashlib
import io
import json
import math
import os
import sys
import time

from common import (Clock, RunDir, SCHEMA_VERSION, UserError, autocast_context, compile_model, configure, epoch_line,
                    fields, finish, init_distributed, load_checkpoint, load_optimizer_state, progress, rank0_first,
                    read_events, restore_rng, rng_states_all_ranks, run_finished, seed_everything, set_kernels,
                    start_from, step_check, step_line, workers_import_only_modules,
                    write_atomic)  # first: its stop signals cover the slow imports below
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, StackDataset

from data import AUDIO_FEATURES, AUDIO_RECIPE, SpectrogramCache, WindowSampler, file_sha256, prepare_audio_cache, \
    read_cache_meta, write_cache_meta, write_sleep_sounds
from model import audio_model, confusion_matrix, kd_loss, macro_f1, per_class_scores

# -----------------------------------------------------------------------------
# default config: every knob, one per line (config files and --key=value override these); a comment that starts
# with quoted values 'a' | 'b' or ends with an interval [1, inf) declares what the key accepts: configure() checks
# -----------------------------------------------------------------------------
out_dir = 'out/kd'  # run directory; fixed, so a requeued job finds its own checkpoint
init_from = 'scratch'  # 'scratch' | 'resume' | 'auto' (resume if out_dir/last.pt exists) | a .pt path
overwrite = False  # start anew in an out_dir that holds a run: the old one is moved to <out_dir>.replaced-<time>
# data: exactly one of manifest / data, or neither for the built-in sounds
manifest = ''  # CSV with a path column and a label column ('label', 'event_label' or 'class'), optional 'split'
audio_root = ''  # folder the manifest's paths are relative to ('' = the manifest's folder)
data = ''  # .npz/.h5 of raw waveforms: 'waveforms' (N, L), 'labels' (N,), optional 'lengths', 'split', 'sample_rate'
builtin_clips = 3000  # clips of the built-in procedural sleep sounds (55/35/10 %, split 70/15/15 %), in [3, inf)
cache_dir = 'cache'  # the HDF5 feature caches live in cache_dir/audio/<source>/<split>.h5
label_map = AUDIO_RECIPE['label_map']  # label name (or DreamCatcher id) -> class; other DreamCatcher labels dropped
# features (seed 001, librosa's definition); a cache built with other values is rebuilt
sample_rate = AUDIO_FEATURES['sample_rate']  # Hz; WAVs at other rates are resampled (FFT method), in [1, inf)
clip_seconds = AUDIO_FEATURES['clip_seconds']  # every clip zero-padded / cropped (head kept) to this length, (0, inf)
n_fft = AUDIO_FEATURES['n_fft']  # FFT size (samples), in [1, inf)
win_length = AUDIO_FEATURES['win_length']  # periodic Hann window (samples), zero-padded to n_fft, in [1, inf)
hop_length = AUDIO_FEATURES['hop_length']  # samples between frames: 5.0 s -> 501 frames, in [1, inf)
n_mels = AUDIO_FEATURES['n_mels']  # mel bands (Slaney scale and area normalisation), in [1, inf)
fmin = AUDIO_FEATURES['fmin']  # lowest mel edge (Hz), in [0, inf)
fmax = AUDIO_FEATURES['fmax']  # highest mel edge (Hz), at most sample_rate / 2, in (0, inf)
top_db = AUDIO_FEATURES['top_db']  # dB floor below each clip's maximum, in (0, inf)
input_norm = AUDIO_RECIPE['input_norm']  # 'train_stats' (standardise by the train cache's mean/std) | 'none' (upstream)
num_workers = AUDIO_RECIPE['num_workers'] if (os.cpu_count() or 1) >= 8 else 0  # DataLoader workers (seed 001: 4;
#   on 2 cores 0 is fastest, docs/audio.md); any start method (fork, spawn, forkserver); [0, inf)
# model
arch = 'tinycnn'  # 'crnn' | 'tinycnn' | 'tinycnn_cbam'
cbam_reduction = 8  # CBAM channel-MLP reduction r (tinycnn_cbam), in [1, inf)
cbam_kernel = 7  # CBAM spatial-attention kernel k, odd (tinycnn_cbam), in [1, inf)
rnn_pool = 'last'  # 'last' | 'mean': the crnn's GRU output, its last step (upstream; in the padded tail) or the mean
# distillation (seed 001): the teacher's architecture, weights and input normalisation come from its checkpoint
teacher_ckpt = 'out/audio_crnn/best.pt'  # the teacher: a train_audio.py checkpoint trained on the same features
alpha = 0.6  # weight of the KD term; 1 - alpha on the class-weighted CE (0.0 = the student baseline exactly), [0, 1]
temperature = 4.0  # softmax temperature T of both logit sets in the KD term (its gradient scaled back by T^2), (0, inf)
gate = True  # refuse to run (exit 3) unless the teacher beats the best student baseline by gate_min_gap
gate_min_gap = 0.03  # seed 001: teacher best val macro-F1 - best baseline's best val macro-F1 must be >= this, [-1, 1]
gate_baselines = ['out/audio_tinycnn', 'out/audio_tinycnn_cbam']  # finished train_audio.py student run dirs
# optimization (seed 001's recipe)
batch_size = AUDIO_RECIPE['batch_size']  # clips per batch per process, in [1, inf)
learning_rate = AUDIO_RECIPE['learning_rate']  # Adam, constant, in [0, inf)
weight_decay = AUDIO_RECIPE['weight_decay']  # Adam's L2 weight decay, in [0, inf)
class_weights = AUDIO_RECIPE['class_weights']  # cross-entropy weight per class (quiet, breathe, snore), [0, inf)
max_epochs = AUDIO_RECIPE['max_epochs']  # upper bound on epochs, in [1, inf)
patience = AUDIO_RECIPE['patience']  # stop after this many epochs without a strictly better val macro-F1, [1, inf)
grad_clip = 0.0  # clip the global gradient norm to this; 0.0 = off; [0, inf)
log_interval = 10  # print a progress line every this many steps inside an epoch (and one line per epoch), [1, inf)
# system
seed = AUDIO_RECIPE['seed']  # seed 001's seed
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'auto'  # 'auto' (bf16 autocast on GPUs with native bf16, else fp32) | 'float32' | 'bfloat16'
compile = False  # torch.compile the model (falls back to eager where compilation fails)
deterministic = False  # True: deterministic CUDA kernels, TF32 off (GPU runs repeat bit for bit; slower); CPU always
config = configure(globals())
# -----------------------------------------------------------------------------

# setup: what to start from (on resume the run's saved config, changed only by the keys given now), every check
# that needs no data, then processes, device and seeds; nothing is written before the run directory below
ckpt, resume_path, changed = start_from(globals(), config, fixed=('manifest', 'audio_root', 'data', 'builtin_clips',
                                                                  'label_map', *AUDIO_FEATURES, 'input_norm', 'arch',
                                                                  'cbam_reduction', 'cbam_kernel', 'rnn_pool', 'seed',
                                                                  'teacher_ckpt'))
num_classes = len(set(label_map.values()))
if len(class_weights) != num_classes:
    raise UserError(f"class_weights={class_weights}: expected {num_classes} weights, one per class of label_map")
if win_length > n_fft or fmin >= fmax or fmax > sample_rate / 2:
    raise UserError(f"win_length={win_length}, n_fft={n_fft}, fmin={fmin}, fmax={fmax}, sample_rate={sample_rate}: "
                    f"expected win_length <= n_fft and fmin < fmax <= sample_rate / 2")
if cbam_kernel % 2 == 0:
    raise UserError(f"cbam_kernel={cbam_kernel}: expected an odd size (the attention map keeps the input's size)")
ddp, rank, world_size, device = init_distributed(device)
master = rank == 0
dtype, autocast = autocast_context(device, dtype)
set_kernels(deterministic)

# the teacher: same classes, same features; built before the seed is set, so it cannot move the student's stream
teacher = load_checkpoint(teacher_ckpt, required=('model_state_dict', 'model_args', 'args', 'input_stats'))
if teacher['model_args'].get('num_classes') != num_classes:
    raise UserError(f"teacher_ckpt {teacher_ckpt}: a {teacher['model_args'].get('num_classes')}-class model, but "
                    f"label_map {label_map} has {num_classes} classes")
differ = [f"{k}={config[k]!r} (teacher: {teacher['args'].get(k)!r})" for k in (*AUDIO_FEATURES, 'label_map')
          if teacher['args'].get(k) != config[k]]
if differ:
    raise UserError(f"teacher_ckpt {teacher_ckpt}: the teacher was trained on other features; this run has "
                    f"{', '.join(differ)}: set the teacher's values")
try:
    teacher_net = audio_model(**teacher['model_args'])
    teacher_net.load_state_dict(teacher['model_state_dict'])
except (TypeError, ValueError, RuntimeError) as e:
    raise UserError(f"teacher_ckpt {teacher_ckpt}: not an audio model of model.py ({str(e)[:200]})") from None
teacher_net = teacher_net.to(device, memory_format=torch.channels_last).eval()
teacher_sha = file_sha256(teacher_ckpt)  # names the teacher-logits cache


def best_val_f1(run_dir):
    """A finished run's best val macro-F1: 'best_val_macro_f1' of its end event (common.run_finished)."""
    if not os.path.isfile(os.path.join(run_dir, 'events.jsonl')):
        raise UserError(f"gate: {run_dir}/events.jsonl not found: {run_dir} is not a run directory (train it first, "
                        f"or --gate=False)")
    try:
        end = run_finished(read_events(run_dir))
    except UserError as e:
        raise UserError(f"gate: {e}") from None
    if not end or 'best_val_macro_f1' not in end:
        raise UserError(f"gate: {run_dir} has not finished (its last start/end event is not an end with reason "
                        f"'done'): finish it (--init_from=auto) or use --gate=False")
    return float(end['best_val_macro_f1'])


# the gate (seed 001): distil only a teacher clearly better than every student baseline, else exit 3 (sweep: gated)
if gate:
    if not gate_baselines:
        raise UserError("gate=True but gate_baselines is empty: list the student baseline run dirs, or --gate=False")
    teacher_f1 = best_val_f1(os.path.dirname(teacher_ckpt) or '.')  # the teacher's run dir holds teacher_ckpt
    baseline_f1 = {run_dir: best_val_f1(run_dir) for run_dir in gate_baselines}
    best_baseline = max(baseline_f1, key=baseline_f1.get)
    gap = teacher_f1 - baseline_f1[best_baseline]
    gate_figures = dict(passed=gap >= gate_min_gap, teacher_val_macro_f1=teacher_f1, baseline=best_baseline,
                        baseline_val_macro_f1=baseline_f1[best_baseline], gap=round(gap, 6), min_gap=gate_min_gap)
    if not gate_figures['passed']:  # the gate event is the only thing written
        if master:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, 'events.jsonl'), 'a') as f:
                f.write(json.dumps(dict(schema_version=SCHEMA_VERSION, event='gate', **gate_figures)) + '\n')
        print(f"gate: teacher best val/macro_f1 {teacher_f1:.4f} - best baseline's {baseline_f1[best_baseline]:.4f} "
              f"({best_baseline}) = {gate_figures['gap']:.4f} < gate_min_gap {gate_min_gap}: not distilling "
              f"(--gate=False overrides)", file=sys.stderr)
        sys.exit(3)
else:
    gate_figures = dict(passed=None, reason='gate=False')
seed_everything(seed + rank)

# data: WAVs + manifest (or waveform arrays) -> one HDF5 cache of log-mel spectrograms per split
features = {k: config[k] for k in AUDIO_FEATURES}
with rank0_first(ddp, master) as log:  # rank 0 writes the sounds and builds the caches; the others find them
    if not manifest and not data:
        manifest = write_sleep_sounds(os.path.join(cache_dir, 'sleep_sounds'), builtin_clips, seed=0, log=log)
    cache_paths, left_out = prepare_audio_cache(cache_dir, features, label_map, manifest, audio_root, data, log=log)
splits = {name: SpectrogramCache(path) for name, path in cache_paths.items()}
mean, std = (splits['train'].mean, splits['train'].std) if input_norm == 'train_stats' else (0.0, 1.0)
workers_import_only_modules()  # workers started by spawn/forkserver must not re-run this file
loader_args = dict(num_workers=num_workers, pin_memory=device.startswith('cuda'), persistent_workers=num_workers > 0)

# model (+ resume): the architecture keys are the checkpoint's (start_from)
model_args = dict(arch=arch, num_classes=num_classes, cbam_reduction=cbam_reduction, cbam_kernel=cbam_kernel,
                  rnn_pool=rnn_pool)
model = audio_model(**model_args).to(device, memory_format=torch.channels_last)  # NHWC convs: faster on CPU
optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
loss_weights = torch.tensor(class_weights, dtype=torch.float32, device=device)
sampler = WindowSampler(len(splits['train']), batch_size, seed, rank, world_size)
epoch, step_in_epoch, best_f1, since_best, sums = 0, 0, -1.0, 0, {}
if ckpt:
    model.load_state_dict(ckpt['model_state_dict'])
    load_optimizer_state(optimizer, ckpt['optimizer_state_dict'])  # moments from the file, hyperparameters from config
    restore_rng(ckpt['rng_state'], rank, world_size, device)
    epoch, step_in_epoch, best_f1, since_best, sums = (ckpt[k] for k in ('epoch', 'step_in_epoch', 'best_metric',
                                                                       'since_best', 'epoch_sums'))
raw_model = model  # the un-compiled, un-wrapped module: evaluated and saved
model = compile_model(model, compile)
if ddp:
    model = DDP(model, device_ids=[int(device.split(':')[1])] if device.startswith('cuda') else None)

# run directory: rank 0 writes the facts
run = RunDir(out_dir, config, ckpt, resume_path, changed, master=master, device=device, dtype=dtype,
             world_size=world_size, data={'manifest': manifest, 'data': data, 'caches': cache_paths},
             teacher={'ckpt': teacher_ckpt, 'sha256': teacher_sha, 'model_args': teacher['model_args']})
n_params = sum(p.numel() for p in raw_model.parameters())
teacher_params = sum(p.numel() for p in teacher_net.parameters())
run.write_text('model.txt', f"{raw_model}\nparameters: {n_params:,}\nteacher ({teacher['model_args']['arch']}, "
               f"{teacher_ckpt}): {teacher_params:,} parameters\n")
run.event('start', epoch=epoch, resumed_from=resume_path, config_hash=run.config_hash, parameters=n_params)
run.event('gate', **gate_figures)
for name, split in splits.items():
    counts = torch.bincount(torch.from_numpy(split.labels), minlength=num_classes).tolist()
    run.print(f"{name}: {len(split):,} clips | per class {counts} | {split.shape[0]}x{split.shape[1]} log-mel")
if sampler.batch_size < batch_size:
    run.print(f"train: {len(splits['train']):,} clips cannot fill batch_size={batch_size} on {world_size} rank(s): "
              f"batches of {sampler.batch_size}")
run.print(f"{left_out:,} clips of DreamCatcher classes outside label_map left out | input_norm {input_norm} "
          f"(mean {mean:.2f} dB, std {std:.2f} dB)")
run.print(f"model: {arch} | {n_params:,} parameters | device {device} | dtype {dtype} | world {world_size}")
if gate:
    run.print(f"gate passed | teacher best val/macro_f1 {teacher_f1:.4f} | best baseline's "
              f"{baseline_f1[best_baseline]:.4f} ({best_baseline}) | gap {gate_figures['gap']:.4f} >= {gate_min_gap}")


def teacher_logits(split):
    """(N, num_classes) float32 logits of the teacher for a split's clips, in cache order: read from
    <feature cache>.teacher_<key>.npy, key = sha256 of the teacher file's sha256 and the feature cache's identity,
    or computed once (eval mode, no_grad, the teacher's own input normalisation) and written atomically. The .json
    beside it records its sha256: a file that fails it is computed again (one log line says why), never trusted."""
    with h5py.File(cache_paths[split], 'r') as f:
        identity = {k: str(f.attrs[k]) for k in ('feature_hash', 'dataset_hash', 'label_map', 'n_samples', 'source')}
    identity.update(teacher=teacher_sha, device=device.split(':')[0], dtype=dtype)  # bf16 GPU logits differ from CPU's
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = f"{cache_paths[split].removesuffix('.h5')}.teacher_{key}.npy"
    meta, problem = read_cache_meta(f"{path.removesuffix('.npy')}.json")
    if meta:
        logits = np.load(path, allow_pickle=False)  # the bytes written below: its sha256 says so
        if logits.shape == (len(splits[split]), num_classes) and logits.dtype == np.float32 and \
                np.isfinite(logits).all():
            return logits, path, 'reused'
        problem = f"it holds {logits.dtype} {logits.shape}, not finite float32 ({len(splits[split])}, {num_classes})"
    if problem:
        run.print(f"teacher logits {path}: computed again: {problem}")
    t_mean, t_std, chunks = teacher['input_stats']['mean'], teacher['input_stats']['std'], []
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the loader draws a seed: keep train_audio.py's stream
        for x, _ in progress(DataLoader(splits[split], batch_size=batch_size, **loader_args), f"teacher logits {path}: "
                             f"clips", len(splits[split]), batch_size, log=run.print, last=False):
            with autocast:
                chunks.append(teacher_net((x.to(device) - t_mean) / t_std).float().cpu())
    logits, buffer = torch.cat(chunks).numpy(), io.BytesIO()  # (N, num_classes)
    np.save(buffer, logits)
    write_atomic(path, buffer.getvalue())
    write_cache_meta(f"{path.removesuffix('.npy')}.json", [path])  # last: marks the logits complete
    return logits, path, 'computed'


# the teacher's logits of every training clip, once: training never runs the teacher (rank 0 writes the cache)
t_logits = time.time()
with rank0_first(ddp, master):
    train_logits, logits_path, how = teacher_logits('train')
run.print(f"teacher logits {logits_path}: {how} ({len(train_logits):,} train clips, {time.time() - t_logits:.1f}s) | "
          f"teacher {teacher['model_args']['arch']}: {teacher_params:,} parameters | alpha {alpha} | T {temperature}")



class EpochBatches:
    """The DataLoader's batch sampler: the rest of epoch `epoch` from the resumable WindowSampler. The loader
    prefetches, so the sampler's own position runs ahead; (epoch, step_in_epoch) is the truth we checkpoint."""

    def __iter__(self):
        sampler.load_state_dict({'epoch': epoch, 'cursor': step_in_epoch * sampler.batch_size})
        return (sampler.next().tolist() for _ in range(steps_per_epoch - step_in_epoch))


@torch.no_grad()
def evaluate(split):
    """Loss, accuracy, macro-F1 and the confusion matrix of a whole split (eval mode, fixed order)."""
    raw_model.eval()
    loss, confusion = torch.zeros((), dtype=torch.float64, device=device), torch.zeros(num_classes, num_classes,
                                                                                       dtype=torch.int64, device=device)
    for x, y in eval_loaders[split]:  # on the device until the end: no host sync per batch
        x, y = (x.to(device, non_blocking=True) - mean) / std, y.to(device, non_blocking=True)
        with autocast:
            logits = raw_model(x).float()
        loss += F.cross_entropy(logits, y, weight=loss_weights, reduction='sum').double()
        confusion += confusion_matrix(logits.argmax(-1), y, num_classes)
    raw_model.train()
    confusion = confusion.cpu()
    weight_sum = (loss_weights.cpu() * confusion.sum(1)).sum().item()  # the weighted mean's denominator
    accuracy = confusion.diagonal().sum().item() / confusion.sum().item()
    return {f'{split}/loss': loss.item() / weight_sum, f'{split}/acc': accuracy,
            f'{split}/macro_f1': macro_f1(confusion)}, confusion


def checkpoint(names, metrics):
    rng = rng_states_all_ranks(ddp, device)
    if master:
        for name in names:
            run.save_checkpoint(name, epoch=epoch, step_in_epoch=step_in_epoch,
                                model_state_dict=raw_model.state_dict(), optimizer_state_dict=optimizer.state_dict(),
                                args=config, model_args=model_args, input_stats={'mean': mean, 'std': std},
                                rng_state=rng, metrics=metrics, best_metric=best_f1, since_best=since_best,
                                epoch_sums=sums)


# -----------------------------------------------------------------------------
# training loop: epochs of shuffled batches from the cache; val macro-F1 decides best.pt and early stopping
# -----------------------------------------------------------------------------
steps_per_epoch = len(splits['train']) // (sampler.batch_size * world_size)  # the ragged tail differs every epoch
train_loader = DataLoader(StackDataset(splits['train'], torch.from_numpy(train_logits)), batch_sampler=EpochBatches(),
                          **loader_args)  # items: ((features, label), teacher logits)
eval_loaders = {name: DataLoader(splits[name], batch_size=batch_size, **loader_args)  # built once: workers persist
                for name in splits if name != 'train'}
t_start, stopped, reason = time.time(), None, 'max_epochs'
clock = Clock(epoch * steps_per_epoch + step_in_epoch, max_epochs * steps_per_epoch)  # elapsed and ETA, in steps
while epoch < max_epochs and since_best < patience:
    t_epoch, step_times = time.time(), []
    sums = sums or {'loss': 0.0, 'kd': 0.0, 'ce': 0.0, 'seen': 0, 'data_s': 0.0, 'step_s': 0.0}  # kept over a stop
    batches = iter(train_loader)
    while step_in_epoch < steps_per_epoch:
        if stopped:  # Ctrl-C, SIGTERM (seen by the last step's check): save mid-epoch; resume continues exactly
            break
        t_step = time.time()
        (x, y), z_teacher = next(batches)  # z_teacher: (B, num_classes) cached teacher logits of these clips
        x, y = (x.to(device, non_blocking=True) - mean) / std, y.to(device, non_blocking=True)
        z_teacher = z_teacher.to(device, non_blocking=True)
        sums['data_s'] += time.time() - t_step
        with autocast:
            logits = model(x)
            loss, kd, ce = kd_loss(logits.float(), z_teacher, y, alpha, temperature, class_weights=loss_weights)
        loss.backward()
        (loss_value, kd_value, ce_value), stopped = step_check(ddp, loss, kd, ce)  # the step's one host sync
        if not math.isfinite(loss_value):  # stop before a bad step reaches the weights or a checkpoint
            run.event('error', epoch=epoch, step=step_in_epoch, message=f"training loss is {loss_value}")
            raise SystemExit(f"error: training loss is {loss_value} at epoch {epoch}; last.pt kept as it was")
        if grad_clip > 0.0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_in_epoch += 1
        sums['loss'] += loss_value * len(y)
        sums['kd'] += kd_value * len(y)
        sums['ce'] += ce_value * len(y)
        sums['seen'] += len(y)
        step_times.append(time.time() - t_step)
        sums['step_s'] += step_times[-1]
        if step_in_epoch % log_interval == 0 and step_in_epoch < steps_per_epoch:  # progress inside a long epoch
            where = f"epoch {epoch + 1}/{max_epochs} | step {step_in_epoch}/{steps_per_epoch}"
            run.print(step_line(where, loss_value, learning_rate, np.mean(step_times), None,  # mfu: no FLOP count yet
                                clock(epoch * steps_per_epoch + step_in_epoch)))
            step_times = []
    if stopped:
        checkpoint(['last.pt'], {})
        run.end(stopped, f"epoch {epoch + 1}/{max_epochs}, step {step_in_epoch}/{steps_per_epoch}", epoch=epoch,
                best_val_macro_f1=best_f1)
        break

    # end of epoch: validation, scalars, checkpoints, early stopping (strict improvement of val macro-F1)
    train_s, seen, data_s, step_s = time.time() - t_epoch, sums['seen'] * world_size, sums['data_s'], sums['step_s']
    epoch, step_in_epoch, metrics = epoch + 1, 0, {'train/loss': sums['loss'] / sums['seen'], 'val/loss': None,
                                                   'train/kd': sums['kd'] / sums['seen'],
                                                   'train/ce': sums['ce'] / sums['seen']}
    sums = {}
    if master:
        metrics.update(evaluate('val')[0])
    if ddp:  # every rank must agree on early stopping
        shared = torch.tensor([metrics.get('val/macro_f1', 0.0)], device=device)
        torch.distributed.broadcast(shared, 0)
        metrics['val/macro_f1'] = shared.item()
    improved = metrics['val/macro_f1'] > best_f1
    best_f1, since_best = (metrics['val/macro_f1'], 0) if improved else (best_f1, since_best + 1)
    run.scalars({'epoch': epoch, 'time_s': round(time.time() - t_start, 2), 'lr': learning_rate, **metrics,
                 'samples_per_s': round(seen / train_s, 1), 'data_share': round(data_s / train_s, 3)})
    run.event('eval', epoch=epoch, **metrics)
    checkpoint(['last.pt'] + (['best.pt'] if improved else []), metrics)
    run.print(epoch_line(f"epoch {epoch}/{max_epochs}", metrics, seen / train_s, step_s / steps_per_epoch,
                         data_s / train_s, clock(epoch * steps_per_epoch)))
    if since_best == patience:
        reason = 'early_stop'
        run.print(f"early stop: no better val/macro_f1 than {best_f1:.4f} for {patience} epochs")

# the test: best.pt's weights (selected on validation macro-F1, never on test)
if not stopped:
    end = {'best_val_macro_f1': best_f1, 'epochs': epoch, 'stopped': reason,
           'wall_time_s': round(time.time() - t_start, 1), 'parameters': n_params}
    if master and 'test' in splits:
        raw_model.load_state_dict(load_checkpoint(os.path.join(out_dir, 'best.pt'))['model_state_dict'])
        test_metrics, confusion = evaluate('test')
        precision, recall, f1 = per_class_scores(confusion)
        names = {v: k for k, v in sorted(label_map.items(), key=lambda kv: kv[1])}  # class id -> a label name
        rows = ['class,name,precision,recall,f1,support'] + [
            f"{c},{names[c]},{precision[c]:.4f},{recall[c]:.4f},{f1[c]:.4f},{confusion[c].sum().item()}"
            for c in range(num_classes)]
        write_atomic(os.path.join(out_dir, 'test_per_class.csv'), ('\n'.join(rows) + '\n').encode())
        lines = ['true\\pred,' + ','.join(names[c] for c in range(num_classes))]
        lines += [f"{names[c]}," + ','.join(map(str, confusion[c].tolist())) for c in range(num_classes)]
        write_atomic(os.path.join(out_dir, 'confusion_matrix.csv'), ('\n'.join(lines) + '\n').encode())
        end.update(test_metrics, per_class={names[c]: {'precision': round(precision[c].item(), 4), 'recall':
                                            round(recall[c].item(), 4), 'f1': round(f1[c].item(), 4)}
                                            for c in range(num_classes)}, confusion=confusion.tolist())
        run.print(f"test (best.pt) | {fields(test_metrics)} | per-class f1 {[round(v, 3) for v in f1.tolist()]}")
    run.end('done', f"epoch {epoch}/{max_epochs}" + (' (early stop)' if reason == 'early_stop' else ''),
            {'best val/macro_f1': best_f1, 'test/macro_f1': end.get('test/macro_f1')}, **end)
finish(ddp, stopped)
