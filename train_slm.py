"""
Train a character-level decoder-only transformer (seed 003, Phase 1): ASCII tokens, learned absolute positions,
AdamW at a constant learning rate. Reads any UTF-8 text file (default: the running Python's standard-library
sources); writes the run directory out_dir/ (config.json, log.txt, events.jsonl, scalars.csv, samples.txt,
model.txt, last.pt, best.pt).

    python train_slm.py config/slm_p1.py                                     # the P1 run
    python train_slm.py config/slm_p1.py --batch_size=8 --dataset=any.txt    # your own text
    python train_slm.py --max_iters=20 --eval_interval=10 --n_layer=1 --block_size=64 --out_dir=out/tiny
    torchrun --standalone --nproc_per_node=2 train_slm.py config/slm_p1.py   # DDP (gloo on CPU, nccl on CUDA)
    sbatch --requeue --signal=B:USR1@120 --gres=gpu:1 \
        --wrap "exec python train_slm.py config/slm_p1.py --init_from=auto"
"""
import contextlib
import math
import os
import time

from common import (Clock, MFU, RunDir, UserError, autocast_context, compile_model, configure, fields, finish,
                    init_distributed, load_optimizer_state, rank0_first, restore_rng, rng_states_all_ranks,
                    seed_everything, set_kernels, start_from, step_check,
                    step_line)  # first: its stop signals cover the slow imports below
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import hooks as hooklib
from data import CharTokenizer, WindowSampler, get_batch, prepare_text, window_starts
from model import CharTransformer, TransformerConfig, lm_loss

# -----------------------------------------------------------------------------
# default config: every knob, one per line (config files and --key=value override these); a comment that starts
# with quoted values 'a' | 'b' or ends with an interval [1, inf) declares what the key accepts: configure() checks
# -----------------------------------------------------------------------------
out_dir = 'out/slm'  # run directory; fixed, so a requeued job finds its own checkpoint
init_from = 'scratch'  # 'scratch' | 'resume' (out_dir/last.pt) | 'auto' (resume if last.pt exists) | a .pt path
overwrite = False  # start anew in an out_dir that holds a run: the old one is moved to <out_dir>.replaced-<time>
# data
dataset = ''  # path to a UTF-8 text file; '' = the running Python's standard-library .py sources (~8 MB)
cache_dir = 'cache'  # tokenized data is cached here, keyed by the source's sha256
block_size = 256  # context length in characters, in [1, inf)
stride = 0  # distance between training window starts; 0 = block_size (no overlap), < block_size overlaps; [0, inf)
batch_size = 16  # windows per micro-batch per process, in [1, inf)
gradient_accumulation_steps = 1  # micro-batches per optimizer step (tokens/step: this x batch x block x ranks) [1, inf)
# model
n_layer = 4  # transformer blocks, in [1, inf)
n_head = 4  # attention heads per block (n_embd must be a multiple of it), in [1, inf)
n_embd = 256  # residual stream width, in [1, inf)
d_ff = 1024  # MLP hidden width (its own key, not forced to 4 * n_embd), in [1, inf)
dropout = 0.1  # on the output of each attention and MLP branch (the residual dropout), in [0, 1)
attn_dropout = 0.0  # on attention probabilities (nanoGPT: = dropout); > 0 makes a CPU step ~1.4x slower; [0, 1)
embd_dropout = 0.0  # on the token + position embeddings (nanoGPT: = dropout); 0.1 costs ~0.04 nats at iter 1000; [0, 1)
# optimizer: AdamW, constant learning rate after an optional linear warmup
learning_rate = 3e-4  # peak learning rate, in [0, inf)
weight_decay = 0.1  # decoupled weight decay, on weight matrices and embeddings only, in [0, inf)
beta1 = 0.9  # Adam first-moment decay, in [0, 1)
beta2 = 0.95  # Adam second-moment decay, in [0, 1)
warmup_iters = 0  # linear warmup from 0 over this many iterations; 0 = constant from the start; [0, inf)
grad_clip = 1.0  # clip the global gradient norm to this; 0.0 = off; [0, inf)
max_iters = 2000  # optimizer steps in total, in [0, inf)
# evaluation, logging, sampling
eval_interval = 200  # evaluate, sample and checkpoint every this many iterations (and at the last one), in [1, inf)
eval_iters = 50  # batches of the fixed, evenly spaced validation windows scored at each eval, in [1, inf)
log_interval = 10  # print a training line every this many iterations, in [1, inf)
sample_prompt = 'def '  # the fixed prompt sampled at each eval
sample_tokens = 200  # characters sampled at each eval (temperature 1.0, no top-k, fixed seed), in [0, inf)
hooks = []  # learning-dynamics hooks, e.g. ['act_stats', 'attn_entropy', 'grad_noise:std=0.01'] (see hooks.py)
# system
seed = 1337  # seeds init, dropout and batch order; rank r of a DDP run uses seed + r for dropout
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'auto'  # 'auto' (bf16 autocast on GPUs with native bf16, else fp32) | 'float32' | 'bfloat16'
compile = False  # torch.compile the model (falls back to eager where compilation fails)
deterministic = False  # True: deterministic CUDA kernels, TF32 off (GPU runs repeat bit for bit; slower); CPU always
config = configure(globals())
# -----------------------------------------------------------------------------

# setup: what to start from (on resume the run's saved config, changed only by the keys given now), every check
# that needs no data, then processes, device and seeds; nothing is written before the run directory below
ckpt, resume_path, changed = start_from(globals(), config, fixed=('dataset', 'block_size', 'stride', 'n_layer',
                                                                  'n_head', 'n_embd', 'd_ff', 'seed'))
if n_embd % n_head:
    raise UserError(f"n_embd={n_embd} is not a multiple of n_head={n_head}: each head takes n_embd / n_head dims")
config['hooks'] = hooks = hooklib.resolve(hooks)  # the resolved list enters config.json and config_hash
hookset = hooklib.Hooks(hooks)
ddp, rank, world_size, device = init_distributed(device)
master = rank == 0
dtype, autocast = autocast_context(device, dtype)
set_kernels(deterministic)
seed_everything(seed + rank)

# data: tokenize once into cache/, then index fixed-length windows of the memory-mapped token files
stride = stride or block_size
tokenizer = CharTokenizer()
with rank0_first(ddp, master) as log:  # rank 0 tokenizes; the other ranks find the token files
    data_dir, meta = prepare_text(dataset, cache_dir, log=log)
train_bin, val_bin = os.path.join(data_dir, 'train.bin'), os.path.join(data_dir, 'val.bin')
train_starts = window_starts(meta['train_tokens'], block_size, stride)
val_starts = window_starts(meta['val_tokens'], block_size, block_size)
if len(val_starts) == 0:
    raise UserError(f"dataset {dataset or 'stdlib'}: its 5% validation split has {meta['val_tokens']} characters, "
                    f"fewer than one window of block_size+1 = {block_size + 1}; "
                    f"use a longer text or smaller block_size")
sampler = WindowSampler(len(train_starts), batch_size, seed, rank, world_size)  # batch_size capped by the data
# every eval scores the same validation windows, evenly spaced over the split: curves are comparable
eval_windows = val_starts[np.unique(np.linspace(0, len(val_starts) - 1, eval_iters * batch_size).astype(int))]

# model (+ resume): the architecture keys are the checkpoint's (start_from); its tokenizer must be ours too
model_args = dict(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                  n_embd=n_embd, d_ff=d_ff, dropout=dropout, attn_dropout=attn_dropout, embd_dropout=embd_dropout)
if ckpt and ckpt['tokenizer'] != tokenizer.to_dict():
    raise UserError(f"{resume_path}: its tokenizer differs from this script's CharTokenizer")
model = CharTransformer(TransformerConfig(**model_args)).to(device)
if ckpt:
    model.load_state_dict(ckpt['model_state_dict'])

# optimizer: AdamW, weight decay on matrices and embeddings (dim >= 2), none on LayerNorm gains
params = [p for p in model.parameters() if p.requires_grad]
groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
          {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device.startswith('cuda'))
iter_num, best_val_loss = 0, float('inf')
if ckpt:
    load_optimizer_state(optimizer, ckpt['optimizer_state_dict'])  # moments from the file, hyperparameters from config
    sampler.load_state_dict(ckpt['sampler'])
    hookset.load_state_dict(ckpt['hooks_state'])
    restore_rng(ckpt['rng_state'], rank, world_size, device)
    iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_metric']
start_iter = iter_num
raw_model = model  # the un-compiled, un-wrapped module: evaluated, sampled and saved
model = compile_model(model, compile)
if ddp:
    model = DDP(model, device_ids=[int(device.split(':')[1])] if device.startswith('cuda') else None)

# run directory: rank 0 writes the facts
run = RunDir(out_dir, config, ckpt, resume_path, changed, master=master, hooks=hooks, device=device,
             dtype=dtype, world_size=world_size, data={k: meta[k] for k in ('source', 'sha256', 'chars', 'unk_count')})
run.write_text('model.txt', f"{raw_model}\nparameters: {raw_model.num_params(False):,} "
                            f"({raw_model.num_params():,} without position embeddings)\n")
run.event('start', iter=iter_num, resumed_from=resume_path, config_hash=run.config_hash)
if not ckpt:
    run.write_text('samples.txt', '')  # a fresh run (also --overwrite=True) starts its own samples file
if ckpt and ckpt['data_sha256'] != meta['sha256']:
    run.print(f"warning: the data changed since {resume_path} was saved; the batch order continues over the new text")
run.print(f"data: {meta['source']} | {meta['chars']:,} chars | {meta['unk_count']:,} mapped to <UNK> | "
          f"{len(train_starts):,} train windows | sha256 {meta['sha256'][:12]}")
if meta['unk_count'] > 0.5 * meta['chars']:  # not ASCII text (another script, binary, UTF-16): say it loudly
    run.print(f"warning: {meta['unk_count'] / meta['chars']:.0%} of {meta['source']} maps to <UNK> (the tokenizer "
              f"keeps printable ASCII, tab and newline; most common here: "
              f"{', '.join(f'{c!r} {n:,}' for c, n in meta['unk_top'])}): the model will learn little else; "
              f"is it the right file?")
if sampler.batch_size < batch_size:
    run.print(f"data: {len(train_starts):,} train windows cannot fill batch_size={batch_size} on {world_size} "
              f"rank(s): batches of {sampler.batch_size}")
run.print(f"model: {raw_model.num_params(False):,} parameters ({raw_model.num_params():,} without the position table, "
          f"as MFU counts) | device {device} | dtype {dtype} | world {world_size}")
tokens_per_iter = gradient_accumulation_steps * world_size * sampler.batch_size * block_size
flops_per_iter = raw_model.flops_per_token() * tokens_per_iter / world_size  # per device
mfu = MFU(device, flops_per_iter, (sampler.batch_size * block_size, n_embd, d_ff), log=run.print) if master else None


def get_lr(it):
    """Linear warmup over warmup_iters, then constant (seed 003: no decay schedule in Phase 1)."""
    return learning_rate * min(1.0, (it + 1) / warmup_iters) if warmup_iters > 0 else learning_rate


@torch.no_grad()
def evaluate():
    """Mean val loss over the fixed eval windows, the forward hooks' statistics, and one fixed-seed sample."""
    raw_model.eval()
    total, count, stats = torch.zeros((), dtype=torch.float64, device=device), 0, {}  # on the device: no sync a batch
    for i in range(0, len(eval_windows), batch_size):
        x, y = (t.to(device) for t in get_batch(val_bin, eval_windows[i:i + batch_size], block_size))
        with autocast:
            logits, batch_stats = hookset.record(raw_model, lambda: raw_model(x)) if i == 0 else (raw_model(x), {})
            total += lm_loss(logits, y).double() * len(x)
        count, stats = count + len(x), stats or batch_stats
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = torch.tensor([tokenizer.encode(sample_prompt)], device=device)
    text = tokenizer.decode(raw_model.generate(prompt, sample_tokens, generator=generator)[0].tolist())
    raw_model.train()
    return total.item() / count, stats, text


def checkpoint(names, metrics):
    """Save the whole state (every rank's RNG included, so this is a collective under DDP) to out_dir/<name>."""
    rng = rng_states_all_ranks(ddp, device)
    if master:
        for name in names:
            run.save_checkpoint(name, iter_num=iter_num, epoch=sampler.epoch,
                                model_state_dict=raw_model.state_dict(), optimizer_state_dict=optimizer.state_dict(),
                                args=config, model_args=model_args, tokenizer=tokenizer.to_dict(),
                                sampler=sampler.state_dict(), hooks_state=hookset.state_dict(), rng_state=rng,
                                metrics=metrics, best_metric=best_val_loss,
                                data_sha256=meta['sha256'])


# -----------------------------------------------------------------------------
# training loop
# -----------------------------------------------------------------------------
train_losses, step_times = [], []  # since the last eval / the last log line
metrics = ckpt['metrics'] if ckpt else {}
t_start, clock, stopped = time.time(), Clock(iter_num, max_iters), None
while True:

    # once in a while (and always at the end): evaluate, sample, checkpoint; not again on the iteration resumed at
    at_end = iter_num >= max_iters
    if (iter_num % eval_interval == 0 or at_end) and (iter_num > start_iter or not ckpt):
        val_loss, stats, sample = evaluate() if master else (0.0, {}, '')
        if not math.isfinite(val_loss):
            run.event('error', iter=iter_num, message=f"val loss is {val_loss}")
            raise SystemExit(f"error: val loss is {val_loss} at iter {iter_num}; stopped, last.pt kept as it was")
        metrics = {'train/loss': float(np.mean(train_losses)) if train_losses else None, 'val/loss': val_loss}
        run.scalars({'iter': iter_num, 'time_s': round(time.time() - t_start, 2), 'lr': get_lr(iter_num), **metrics})
        run.event('eval', iter=iter_num, **metrics, hooks=stats)
        run.event('sample', iter=iter_num, prompt=sample_prompt, text=sample)
        run.write_text('samples.txt', f"--- iter {iter_num} | val/loss {val_loss:.4f} ---\n{sample}\n\n", mode='a')
        run.print(f"eval {iter_num}/{max_iters} | {fields(metrics)}\n{sample}\n---")
        best = val_loss < best_val_loss
        best_val_loss = min(val_loss, best_val_loss)
        checkpoint(['last.pt', 'best.pt'] if best else ['last.pt'], metrics)
        train_losses = []
    if at_end:
        break
    if stopped:  # Ctrl-C, SIGTERM (seen by the last step's check): save where we are; resume continues exactly
        checkpoint(['last.pt'], {})
        run.end(stopped, f"iter {iter_num}/{max_iters}", iter=iter_num, best_val_loss=best_val_loss)
        break

    # one optimizer step over gradient_accumulation_steps micro-batches
    t0 = time.time()
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    step_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per micro-step
    for micro_step in range(gradient_accumulation_steps):
        x, y = (t.to(device, non_blocking=True) for t in get_batch(train_bin, train_starts[sampler.next()], block_size))
        last_micro = micro_step == gradient_accumulation_steps - 1
        with (model.no_sync() if ddp and not last_micro else contextlib.nullcontext()), autocast:
            loss = lm_loss(model(x), y) / gradient_accumulation_steps  # the mean over all micro-batches
        loss.backward()
        step_loss += loss.detach().double()
    (step_loss,), stopped = step_check(ddp, step_loss)  # the step's one host sync (under DDP: all ranks' mean)
    if not math.isfinite(step_loss):  # stop before a bad step reaches the weights or a checkpoint
        run.event('error', iter=iter_num, message=f"training loss is {step_loss}")
        raise SystemExit(f"error: training loss is {step_loss} at iter {iter_num}; stopped, last.pt kept as it was")
    hookset.apply_update(params, iter_num)  # the update-hook slot: gradient transforms for experiments
    if grad_clip > 0.0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    # logging: the mean step time since the last line, and MFU against this machine's measured matmul peak
    train_losses.append(step_loss)
    step_times.append(time.time() - t0)
    if iter_num % log_interval == 0 and master:
        dt = float(np.mean(step_times))
        run.print(step_line(f"iter {iter_num}/{max_iters}", step_loss, lr, dt, mfu(dt), clock(iter_num)))
        step_times = []

if at_end:
    run.end('done', f"iter {iter_num}/{max_iters}", {'best val/loss': best_val_loss}, iter=iter_num,
            best_val_loss=best_val_loss, **metrics, wall_time_s=round(time.time() - t_start, 1))
finish(ddp, stopped)
