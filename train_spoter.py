"""
Train SPOTER (Bohacek & Hruz, WACV-W 2022), the pose-based transformer for isolated sign recognition, on SPOTER
CSVs (one row per clip, per-landmark columns of per-frame coordinates). Without CSVs it trains on built-in
procedural signs written as SPOTER CSVs and read back through the same loader. Batched with key-padding masks;
checkpoints at the milestone epochs (epoch_{N}.pt), best.pt on val top-1 (used for the test) and last.pt.

    python train_spoter.py                                                   # built-in signs, minutes on a CPU
    python train_spoter.py config/spoter_wlasl100.py --train_csv=WLASL100_train_25fps.csv \\
        --val_csv=WLASL100_val_25fps.csv --test_csv=WLASL100_test_25fps.csv
    python train_spoter.py config/spoter_parity.py ...                       # the original recipe (batch 1, SGD)
    python train_spoter.py --eval_only=True --init_from=best.pt --test_csv=cache/spoter_signs/test.csv \
        --dump_features=True                                   # score out/spoter's best.pt on the built-in test set
    sbatch --requeue --signal=B:USR1@120 --gres=gpu:1 --wrap "exec python train_spoter.py \
        config/spoter_wlasl100.py --train_csv=... --val_csv=... --test_csv=... --init_from=auto"
"""
import math
import os
import time

from common import (Clock, RunDir, UserError, autocast_context, compile_model, configure, epoch_line, finish,
                    init_distributed, load_checkpoint, load_optimizer_state, rank0_first, restore_rng,
                    rng_states_all_ranks, seed_everything, set_kernels, start_from, step_check, step_line,
                    write_atomic)  # first: its stop signals cover the slow imports below
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (WindowSampler, augment_poses, gather_clips, load_pose_cache, normalize_poses, pose_cache,
                  resolve_label_offset, write_sign_csvs)
from model import SPOTER

# -----------------------------------------------------------------------------
# default config: every knob, one per line (config files and --key=value override these); a comment that starts
# with quoted values 'a' | 'b' or ends with an interval [1, inf) declares what the key accepts: configure() checks
# -----------------------------------------------------------------------------
out_dir = 'out/spoter'  # run directory; fixed, so a requeued job finds its own checkpoint
init_from = 'scratch'  # 'scratch' | 'resume' | 'auto' | a checkpoint (e.g. 'best.pt', for eval_only)
overwrite = False  # start anew in an out_dir that holds a run: the old one is moved to <out_dir>.replaced-<time>
eval_only = False  # evaluate the init_from checkpoint on test_csv, write predictions.csv, do not train
dump_features = False  # with eval_only: also write each clip's 108-d decoder output and attention to HDF5
# data
train_csv = ''  # SPOTER CSV of the training clips; '' = the built-in procedural signs
val_csv = ''  # SPOTER CSV for model selection (best.pt)
test_csv = ''  # SPOTER CSV scored once, with best.pt, at the end
cache_dir = 'cache'  # CSVs are converted once into HDF5 here, keyed by their sha256
label_offset = 'auto'  # 'auto' (min label 1 -> subtract 1, 0 -> keep) or an int subtracted from every label
num_classes = 0  # 0 = one more than the largest training label, in [0, inf)
builtin_classes = 10  # classes of the built-in procedural signs, in [2, inf)
# model
pos_embedding = 'learned'  # 'learned' (one vector per frame) | 'single' (the original: no frame order)
max_frames = 256  # longest clip the 'learned' positions cover, in [1, inf)
# optimization
max_epochs = 350  # training epochs, in [1, inf)
checkpoint_epochs = [10, 50, 100, 200, 350]  # epoch_{N}.pt is kept at these epochs (those <= max_epochs), [1, inf)
batch_size = 32  # clips per batch per process, padded to the longest clip, in [1, inf)
bucket_by_length = True  # batch clips of similar length: less padding, faster (python bench.py spoter)
opt = 'adamw'  # 'adamw' | 'sgd' (the original: SGD, no momentum)
learning_rate = 3e-4  # constant learning rate, in [0, inf)
weight_decay = 0.0  # decoupled weight decay (AdamW) or L2 (SGD), in [0, inf)
momentum = 0.0  # SGD momentum (the original: 0), in [0, 1)
grad_clip = 0.0  # clip the global gradient norm to this; 0.0 = off; [0, inf)
augment = True  # with p 0.5 one of: rotate, perspective, squeeze, arm-rotate (the original's four)
noise_std = 0.001  # Gaussian noise added to normalized training poses (the original: 0.001), in [0, inf)
log_interval = 50  # print a progress line every this many steps inside an epoch (and one line per epoch), [1, inf)
# system
seed = 379  # the original's seed
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'auto'  # 'auto' (bf16 autocast on GPUs with native bf16, else fp32) | 'float32' | 'bfloat16'
compile = False  # torch.compile the model (falls back to eager where compilation fails)
deterministic = False  # True: deterministic CUDA kernels, TF32 off (GPU runs repeat bit for bit; slower); CPU always
config = configure(globals())
# -----------------------------------------------------------------------------

# setup: what to start from (on resume the run's saved config, changed only by the keys given now), every check
# that needs no data, then processes, device and seeds; nothing is written before the run directory below
ckpt, resume_path, changed = start_from(globals(), config, fixed=('train_csv', 'val_csv', 'label_offset', 'num_classes',
                                                                  'builtin_classes', 'pos_embedding', 'max_frames',
                                                                  'opt', 'seed'))
if label_offset != 'auto':
    try:
        label_offset = int(label_offset)
    except ValueError:
        raise UserError(f"label_offset={label_offset!r}: expected 'auto' or an integer") from None
if eval_only and not ckpt:
    raise UserError("eval_only=True needs a checkpoint: --init_from=best.pt (or last.pt, or a path)")
if eval_only and not test_csv:
    raise UserError("eval_only=True needs --test_csv=path/to/clips.csv")
ddp, rank, world_size, device = init_distributed(device)
master = rank == 0
dtype, autocast = autocast_context(device, dtype)
set_kernels(deterministic)
seed_everything(seed + rank)

# data: SPOTER CSVs -> HDF5 cache -> clips of (T, 54, 2) raw coordinates; labels shifted to 0-based
if not train_csv and not eval_only and num_classes not in (0, builtin_classes) and not ckpt:  # real data's config
    raise UserError(f"num_classes={num_classes} but no train_csv was given, and the built-in signs have "
                    f"builtin_classes={builtin_classes}: give --train_csv, --val_csv and --test_csv (the "
                    f"config's first comment names the files), or --num_classes=0 for the built-in signs")
with rank0_first(ddp, master) as log:  # rank 0 writes the built-in CSVs and the pose caches; the others find them
    if not train_csv and not eval_only:
        train_csv, val_csv, test_csv = write_sign_csvs(os.path.join(cache_dir, 'spoter_signs'), builtin_classes,
                                                       seed=0, log=log)
    caches = {path: pose_cache(path, cache_dir, log=log) for path in ((test_csv,) if eval_only else
                                                                      (train_csv, val_csv, test_csv)) if path}


def load_split(csv_path, offset, n_classes):
    """-> (list of (T, 54, 2) float32 clips, 0-based int64 labels, offset used, clips skipped as all-missing,
    (frames (F, 54, 2) on the device, offsets (n + 1,)) for gather_clips)."""
    frames, offsets, labels, skipped = load_pose_cache(caches[csv_path])
    labels, offset = resolve_label_offset(labels, offset, n_classes, csv_path)
    clips = [frames[offsets[i]:offsets[i + 1]] for i in range(len(labels))]
    return clips, labels, offset, skipped, (torch.from_numpy(frames).to(device), offsets)


splits = {}
if not eval_only:
    splits['train'] = load_split(train_csv, label_offset, None)
    label_offset = splits['train'][2]  # val/test use the training file's base
    num_classes = num_classes or int(splits['train'][1].max()) + 1
    if ckpt:
        num_classes = ckpt['model_args']['num_classes']
    if val_csv:
        splits['val'] = load_split(val_csv, label_offset, None)  # range-checked below against the training classes
        unseen = sorted(set(splits['val'][1].tolist()) - set(splits['train'][1].tolist()))
        if unseen:
            raise UserError(f"{val_csv}: classes {unseen[:10]} never occur in {train_csv}")
else:
    num_classes = ckpt['model_args']['num_classes']
    label_offset = ckpt['label_offset'] if label_offset == 'auto' else label_offset  # the base it trained with
if test_csv:
    splits['test'] = load_split(test_csv, label_offset, num_classes)
longest = max(len(c) for clips, *_ in splits.values() for c in clips)
if pos_embedding == 'learned' and longest > max_frames:
    raise UserError(f"the longest clip has {longest} frames, more than max_frames={max_frames}; raise max_frames")

# model (+ resume): the architecture keys are the checkpoint's (start_from), its class count too
model_args = ckpt['model_args'] if ckpt else dict(num_classes=num_classes, pos_embedding=pos_embedding,
                                                  max_frames=max_frames)
model = SPOTER(**model_args).to(device)
if ckpt:
    model.load_state_dict(ckpt['model_state_dict'])
params = list(model.parameters())
if opt == 'adamw':
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
else:
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
augment_generator = torch.Generator().manual_seed(seed + rank)  # each rank's state is checkpointed: resume is exact
n_train = len(splits['train'][0]) if 'train' in splits else 0
lengths = [len(c) for c in splits['train'][0]] if n_train and bucket_by_length else None
sampler = WindowSampler(n_train, batch_size, seed, rank, world_size, lengths) if n_train else None
epoch, step_in_epoch, best_val_acc, history = 0, 0, -1.0, {}
if ckpt and not eval_only:
    load_optimizer_state(optimizer, ckpt['optimizer_state_dict'])  # moments from the file, hyperparameters from config
    sampler.load_state_dict(ckpt['sampler'])
    if 'augment_generator' in ckpt:  # older checkpoints: rank 0's generator, outside the RNG states
        augment_generator.set_state(ckpt['augment_generator'])
    restore_rng(ckpt['rng_state'], rank, world_size, device, augment=augment_generator)
    epoch, step_in_epoch, best_val_acc, history = ckpt['epoch'], ckpt['step_in_epoch'], ckpt['best_metric'], \
        ckpt['epoch_sums']
raw_model = model  # the un-compiled, un-wrapped module: evaluated and saved
model = compile_model(model, compile)
if ddp:
    model = DDP(model, device_ids=[int(device.split(':')[1])] if device.startswith('cuda') else None)

# run directory: rank 0 writes the facts (eval_only appends to the run it evaluates)
run = RunDir(out_dir, config, ckpt, resume_path, changed, master=master, device=device, dtype=dtype,
             world_size=world_size, data={k: v for k, v in (('train', train_csv), ('val', val_csv),
                                                           ('test', test_csv)) if v})
run.write_text('model.txt', f"{raw_model}\nparameters: {sum(p.numel() for p in params):,}\n")
run.event('start', epoch=epoch, resumed_from=resume_path, config_hash=run.config_hash, eval_only=eval_only)
for name, (clips, labels, offset, skipped, _) in splits.items():
    run.print(f"{name}: {len(clips):,} clips | {num_classes} classes | label offset {offset} | "
              f"{skipped} all-missing clips skipped")
if sampler and sampler.batch_size < batch_size:
    run.print(f"train: {n_train:,} clips cannot fill batch_size={batch_size} on {world_size} rank(s): batches of "
              f"{sampler.batch_size}")
run.print(f"model: {sum(p.numel() for p in params):,} parameters | device {device} | dtype {dtype} | "
          f"world {world_size}")


def collate(split, indices):
    """The clips `indices` of a split, padded to the longest, on the device: poses (B, T, 54, 2), pad_mask (B, T)."""
    return gather_clips(*splits[split][4], indices)


@torch.no_grad()
def evaluate(split, batch=64):
    """Loss, top-1, top-5 and class probabilities of every clip of a split (normalized, no augmentation)."""
    raw_model.eval()
    clips, labels, *_ = splits[split]
    probs = []
    for start in range(0, len(clips), batch):
        poses, pad_mask = collate(split, range(start, min(start + batch, len(clips))))
        with autocast:
            probs.append(F.softmax(raw_model(normalize_poses(poses, pad_mask), pad_mask).float(), dim=-1).cpu())
    raw_model.train()
    probs, labels = torch.cat(probs), torch.from_numpy(labels)
    top5 = probs.topk(min(5, num_classes), dim=-1).indices
    return {f'{split}/loss': F.nll_loss(probs.clamp_min(1e-12).log(), labels).item(),
            f'{split}/acc': (top5[:, 0] == labels).float().mean().item(),
            f'{split}/top5': (top5 == labels[:, None]).any(-1).float().mean().item()}, probs


def write_test_report(probs, name):
    """predictions.csv (top-5 labels and probabilities per clip) and confusion_matrix.csv of a split."""
    labels = splits['test'][1]
    top = probs.topk(min(5, num_classes), dim=-1)
    header = 'row,true_label,' + ','.join(f'pred_{k + 1},prob_{k + 1}' for k in range(top.indices.size(1)))
    rows = [f"{i},{labels[i] + label_offset}," + ','.join(f"{int(c) + label_offset},{p:.6f}"
                                                          for c, p in zip(top.indices[i], top.values[i]))
            for i in range(len(labels))]
    write_atomic(os.path.join(out_dir, name), ('\n'.join([header, *rows]) + '\n').encode())
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, top.indices[:, 0].numpy()), 1)
    lines = ['true\\pred,' + ','.join(map(str, range(num_classes)))]
    lines += [f"{c}," + ','.join(map(str, confusion[c])) for c in range(num_classes)]
    write_atomic(os.path.join(out_dir, 'confusion_matrix.csv'), ('\n'.join(lines) + '\n').encode())
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {str(c): round(float(a), 4) for c, a in enumerate(per_class) if confusion[c].sum()}


def checkpoint(names, metrics):
    rng = rng_states_all_ranks(ddp, device, augment=augment_generator)
    if master:
        for name in names:
            run.save_checkpoint(name, epoch=epoch, step_in_epoch=step_in_epoch,
                                model_state_dict=raw_model.state_dict(), optimizer_state_dict=optimizer.state_dict(),
                                args=config, model_args=model_args, sampler=sampler.state_dict(),
                                rng_state=rng, metrics=metrics,
                                best_metric=best_val_acc, epoch_sums=history,
                                label_offset=label_offset)


# -----------------------------------------------------------------------------
# eval_only: score a checkpoint on test_csv (the inference path SPOTER users ask for)
# -----------------------------------------------------------------------------
if eval_only:
    metrics, probs = evaluate('test')
    write_test_report(probs, 'predictions.csv')
    if dump_features:  # the 108-d decoder output and the class query's attention over frames, per clip
        clips, labels, *_ = splits['test']
        feats, attention = [], np.zeros((len(clips), max(len(c) for c in clips)), dtype=np.float32)
        with torch.no_grad():
            raw_model.eval()
            for i, clip in enumerate(clips):
                poses, pad_mask = collate('test', [i])
                f, a = raw_model.features(normalize_poses(poses, pad_mask), pad_mask)
                feats.append(f[0].float().cpu().numpy())
                attention[i, :len(clip)] = a[0].float().cpu().numpy()
        path = os.path.join(out_dir, f"features_{os.path.basename(resume_path).removesuffix('.pt')}.h5")
        with h5py.File(path + '.tmp', 'w') as f:
            f['features'], f['attention'], f['labels'] = np.stack(feats), attention, labels
            f['lengths'] = np.array([len(c) for c in clips])
        os.replace(path + '.tmp', path)
        run.print(f"features: {path}")
    run.end('eval_only', resume_path, metrics, checkpoint=resume_path, **metrics)
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training loop: epochs of shuffled, padded batches; eval + checkpoints at the end of each epoch
# -----------------------------------------------------------------------------
steps_per_epoch = n_train // (sampler.batch_size * world_size)  # every rank takes the same number of steps
train_labels = torch.from_numpy(splits['train'][1]).to(device)  # (N,) on the device, indexed per batch
t_start, stopped = time.time(), None
clock = Clock(epoch * steps_per_epoch + step_in_epoch, max_epochs * steps_per_epoch)  # elapsed and ETA, in steps
while epoch < max_epochs:
    t_epoch, step_times = time.time(), []
    sums = history or {'loss': 0.0, 'correct': 0, 'seen': 0, 'data_s': 0.0, 'step_s': 0.0}  # kept over a stop
    while step_in_epoch < steps_per_epoch:
        if stopped:  # Ctrl-C, SIGTERM (seen by the last step's check): save mid-epoch; resume continues exactly
            break
        t_step = time.time()
        indices = sampler.next()
        poses, pad_mask = collate('train', indices)
        if augment:  # on the raw [0,1] coordinates, as the original does
            poses = augment_poses(poses, pad_mask, augment_generator)
        poses = normalize_poses(poses, pad_mask)
        poses = poses + noise_std * torch.randn_like(poses)
        targets = train_labels[torch.from_numpy(indices).to(device, non_blocking=True)]
        sums['data_s'] += time.time() - t_step
        with autocast:
            logits = model(poses, pad_mask)
            loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        correct = (logits.argmax(-1) == targets).sum()
        (loss_value, correct), stopped = step_check(ddp, loss, correct)  # the step's one host sync
        if not math.isfinite(loss_value):  # stop before a bad step reaches the weights or a checkpoint
            run.event('error', epoch=epoch, step=step_in_epoch, message=f"training loss is {loss_value}")
            raise SystemExit(f"error: training loss is {loss_value} at epoch {epoch}; last.pt kept as it was")
        if grad_clip > 0.0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_in_epoch += 1
        sums['loss'] += loss_value * len(indices)
        sums['correct'] += correct  # under DDP the mean over ranks: train/acc is that of every rank's clips
        sums['seen'] += len(indices)
        step_times.append(time.time() - t_step)
        sums['step_s'] += step_times[-1]
        if step_in_epoch % log_interval == 0 and step_in_epoch < steps_per_epoch:  # progress inside a long epoch
            where = f"epoch {epoch + 1}/{max_epochs} | step {step_in_epoch}/{steps_per_epoch}"
            run.print(step_line(where, loss_value, learning_rate, np.mean(step_times), None,  # mfu: no FLOP count yet
                                clock(epoch * steps_per_epoch + step_in_epoch)))
            step_times = []
    if stopped:
        history = sums  # a stopped epoch's sums carry on
        checkpoint(['last.pt'], {})
        run.end(stopped, f"epoch {epoch + 1}/{max_epochs}, step {step_in_epoch}/{steps_per_epoch}", epoch=epoch,
                best_val_acc=best_val_acc)
        break

    # end of epoch: val metrics, scalars, checkpoints (best on val top-1; milestones kept forever)
    epoch, step_in_epoch, history = epoch + 1, 0, {}
    train_s, seen = time.time() - t_epoch, sums['seen'] * world_size  # samples/s: summed over ranks
    metrics = {'train/loss': sums['loss'] / max(sums['seen'], 1), 'val/loss': None,
               'train/acc': sums['correct'] / max(sums['seen'], 1)}
    if master and 'val' in splits:
        metrics.update(evaluate('val')[0])
    run.scalars({'epoch': epoch, 'time_s': round(time.time() - t_start, 2), 'lr': learning_rate, **metrics,
                 'samples_per_s': round(seen / train_s, 1), 'data_share': round(sums['data_s'] / train_s, 3)})
    run.event('eval', epoch=epoch, **metrics)
    val_acc = metrics.get('val/acc', metrics['train/acc'])
    best = val_acc > best_val_acc
    best_val_acc = max(best_val_acc, val_acc)
    checkpoint(['last.pt'] + (['best.pt'] if best else []) +
               ([f'epoch_{epoch}.pt'] if epoch in checkpoint_epochs else []), metrics)
    run.print(epoch_line(f"epoch {epoch}/{max_epochs}", metrics, seen / train_s, sums['step_s'] / steps_per_epoch,
                         sums['data_s'] / train_s, clock(epoch * steps_per_epoch)))

# the test: best.pt's weights (selected on validation, never on test)
if not stopped:
    end = {'best_val_acc': best_val_acc, 'epochs': epoch, 'wall_time_s': round(time.time() - t_start, 1)}
    if master and 'test' in splits and os.path.exists(os.path.join(out_dir, 'best.pt')):
        raw_model.load_state_dict(load_checkpoint(os.path.join(out_dir, 'best.pt'))['model_state_dict'])
        test_metrics, probs = evaluate('test')
        per_class = write_test_report(probs, 'predictions.csv')
        end.update(test_metrics, per_class_acc=per_class)
    run.end('done', f"epoch {epoch}/{max_epochs}", {'best val/acc': best_val_acc, 'test/acc': end.get('test/acc'),
                                                    'test/top5': end.get('test/top5')}, **end)
finish(ddp, stopped)
