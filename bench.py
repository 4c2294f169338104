"""
Throughput benchmarks of every model, printed as tables. Machines are shared and noisy, so every comparison is
run interleaved in one process (round-robin over the variants) and reported as medians and ratios.

    python bench.py slm                 # matmul peak, training ms/iter + MFU per variant, KV-cache sampling
    python bench.py slm --rounds=10     # more rounds for a quieter median
    python bench.py spoter              # clips/s at batch 1 vs the default batch, data-work share
    python bench.py audio               # log-mel + cache clips/s, DataLoader reads, samples/s per model
    python bench.py kd                  # a KD epoch with cached teacher logits vs a live teacher vs the student alone
    OMP_NUM_THREADS=1 python bench.py vae   # train_vae.py's step vs a plain Bernoulli beta-VAE, batch 64 of 64x64
    python bench.py subnormal           # every model's step with a fresh Adam state vs one a long run leaves
    python bench.py subnormal --vae_ckpt=out/vae/last.pt   # ... and train_vae.py's step from a long run's checkpoint

MFU counts each model's training FLOPs (the train_flops methods of model.py, equal to torch's FlopCounterMode
on a step: tests/test_model.py) against a fp32 matmul timed in the same rounds (CPU) or the datasheet (GPU).
"""
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import model as model_lib
from common import configure, matmul_peak_flops, pick_device
from model import CharTransformer, TransformerConfig, lm_loss

rounds = 5  # round-robin rounds over the variants; each variant's figure is the median over all rounds
steps_per_round = 3  # timed training steps per variant per round
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'mps'
vae_ckpt = ''  # subnormal: also time train_vae.py's step from this checkpoint's weights and Adam state
config = configure(globals(), [a for a in sys.argv[1:] if a.startswith('--')],
                   usage='bench.py [slm] [spoter] [audio] [kd] [vae] [subnormal] [--key=value ...]')
sections = [a for a in sys.argv[1:] if not a.startswith('--')] or ['slm']  # python bench.py spoter kd ...
device = pick_device(device)
torch.manual_seed(0)


def sync():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def interleaved(variants, steps, warmup=2):
    """variants: {name: step function}. Run them round-robin; return {name: median seconds per step}."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(steps):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def with_peak(variants, shape=(4096, 256, 1024)):
    """interleaved(variants) with a fp32 (m,k)@(k,n) matmul of `shape` in the same rounds: -> (times, peak FLOP/s),
    the peak being that matmul's median rate (CPU: this machine's now) or the datasheet's (GPU), None if unknown."""
    step, flops = matmul(*shape)
    times = interleaved({**variants, 'matmul': step}, steps_per_round)
    peak = flops / times.pop('matmul') if device == 'cpu' else matmul_peak_flops(device)
    print(f"\npeak: {peak / 1e9:.1f} GFLOP/s (" + (f"median of fp32 {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]} "
          f"matmuls in the same rounds)" if device == 'cpu' else "datasheet)") if peak else "\npeak: unknown")
    return times, peak


def mfu(flops, seconds, peak):
    return f"{100 * flops / seconds / peak:.1f}%" if peak else 'n/a'


# -----------------------------------------------------------------------------
# slm: the P1 config (train_slm.py's defaults), fp32
# -----------------------------------------------------------------------------

def slm_train_step(cfg, batch_size=16):
    """One train_slm.py step: forward, loss, backward, clip, AdamW with its parameter groups."""
    m = CharTransformer(cfg).to(device)
    params = list(m.parameters())
    opt = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': 0.1},
                             {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), fused=device.startswith('cuda'))
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)

    def step():
        lm_loss(m(x), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return m, step


def with_torch_dropout(step):
    """Run a step with torch's F.dropout in place of model.dropout (the bernoulli_ mask)."""
    def run():
        fast, model_lib.dropout = model_lib.dropout, lambda x, p, training: F.dropout(x, p, training)
        try:
            step()
        finally:
            model_lib.dropout = fast
    return run


def matmul(m, k, n, reps=10):
    """A step of `reps` fp32 (m,k)@(k,n) matmuls and its FLOPs: this machine's peak, timed beside the models."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)

    def run():
        for _ in range(reps):
            a @ b
    return run, 2 * m * k * n * reps


def bench_slm():
    cfg = TransformerConfig()
    batch_size = 16
    m, ours = slm_train_step(cfg)
    _, gpt = slm_train_step(TransformerConfig(attn_dropout=0.1, embd_dropout=0.1))
    _, no_attn = slm_train_step(TransformerConfig(embd_dropout=0.1))
    _, no_drop = slm_train_step(TransformerConfig(dropout=0.0))
    variants = {'nanoGPT placement: embd + attn-prob + residual dropout, torch masks': with_torch_dropout(gpt),
                'embd + residual dropout (fused SDPA kernel), torch masks': with_torch_dropout(no_attn),
                'embd + residual dropout, 15-bit masks': no_attn,
                'ours: residual dropout, 15-bit masks': ours,
                'no dropout at all (upper bound)': no_drop}
    flops = m.flops_per_token() * batch_size * cfg.block_size
    print(f"\n## slm: P1 config, fp32, batch {batch_size} x {cfg.block_size}, {flops / 1e9:.1f} GFLOP/iter, "
          f"device {device}, {torch.get_num_threads()} threads, {rounds} rounds x {steps_per_round} steps", end='')
    times, peak = with_peak(variants, (batch_size * cfg.block_size, cfg.n_embd, cfg.d_ff))
    print("| variant | ms/iter | tokens/s | MFU | vs nanoGPT placement |\n|---|---|---|---|---|")
    base = times['nanoGPT placement: embd + attn-prob + residual dropout, torch masks']
    for name, dt in times.items():
        print(f"| {name} | {1000 * dt:.0f} | {batch_size * cfg.block_size / dt:,.0f} | {mfu(flops, dt, peak)} | "
              f"{base / dt:.2f}x |")

    # sampling: 500 new tokens after a 4-token prompt, block 256, with the KV cache vs recomputing the window
    m.eval()
    prompt = torch.zeros(1, 4, dtype=torch.long, device=device)
    tokens = {}

    def sample(use_cache):
        def run():
            g = torch.Generator(device=device).manual_seed(0)
            tokens[use_cache] = m.generate(prompt, 500, generator=g, use_cache=use_cache)
        return run
    times = interleaved({'kv': sample(True), 'recompute': sample(False)}, steps=1, warmup=1)
    print(f"\nsampling 500 tokens (block {cfg.block_size}, batch 1): KV cache {500 / times['kv']:,.0f} tok/s, "
          f"full recompute {500 / times['recompute']:,.0f} tok/s, speedup {times['recompute'] / times['kv']:.1f}x, "
          f"same tokens: {torch.equal(tokens[True], tokens[False])}")


# -----------------------------------------------------------------------------
# spoter: training clips/s at batch 1 (the original's recipe) vs the default batch, and the data share
# -----------------------------------------------------------------------------

def bench_spoter(n_clips=256, batch_size=32):
    from data import WindowSampler, augment_poses, make_sign_clips, normalize_poses, pad_clips
    from model import SPOTER
    clips, labels = make_sign_clips(16, n_clips // 16, seed=0)  # 20-60 frames, like the reference measurement
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(0)

    def batch_of(indices):
        poses, pad_mask = pad_clips(clips, indices)
        return poses.to(device), pad_mask.to(device), labels[list(indices)].to(device)

    now = model_lib.relu_dropout, model_lib.attention
    before = (lambda x, p, training: model_lib.dropout(F.relu(x), p, training),  # ReLU, then dropout: two passes
              lambda attn, q, kv, pad_mask, training, need_weights=False:  # torch's module, its bernoulli_ dropout
              attn(q, kv, kv, key_padding_mask=pad_mask, need_weights=need_weights))

    def trainer(size, optimizer, bucketed=False, ops=now):
        model = SPOTER(16).to(device)
        opt = optimizer(model.parameters())
        sampler = WindowSampler(n_clips, size, 0, lengths=[len(c) for c in clips] if bucketed else None)
        flops = []  # each step's training FLOPs over its clips' own frames: padding is work that counts for nothing

        def data_work():
            indices = sampler.next()
            flops.append(sum(model.train_flops(len(clips[i])) for i in indices))
            poses, pad_mask, y = batch_of(indices)
            return normalize_poses(augment_poses(poses, pad_mask, generator), pad_mask), pad_mask, y

        def step():
            model_lib.relu_dropout, model_lib.attention = ops  # the layers' ops: now's, or those before them
            poses, pad_mask, y = data_work()
            F.cross_entropy(model(poses, pad_mask), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, data_work, flops
    adamw = lambda p: torch.optim.AdamW(p, lr=3e-4)  # noqa: E731
    variants = {'batch 1 (SGD, the original\'s recipe and ops)': trainer(1, lambda p: torch.optim.SGD(p, lr=1e-3),
                                                                           ops=before),
                f'batch {batch_size} (AdamW), padded batches': trainer(batch_size, adamw),
                f'batch {batch_size} (AdamW), length-bucketed, MultiheadAttention, ReLU then dropout (before)':
                    trainer(batch_size, adamw, bucketed=True, ops=before),
                f'batch {batch_size} (AdamW), length-bucketed (default)': trainer(batch_size, adamw, bucketed=True)}
    data_only = variants[f'batch {batch_size} (AdamW), padded batches'][1]
    print(f"\n## spoter: 16 classes, clips of 20-60 frames, {SPOTER(16).train_flops(40) / 1e9:.2f} GFLOP per "
          f"40-frame clip, device {device}, {torch.get_num_threads()} threads", end='')
    times, peak = with_peak({**{name: v[0] for name, v in variants.items()}, 'data work only': data_only},
                            (batch_size * 40, 108, 2048))  # the MLP's matmul, the step's largest
    base = times['batch 1 (SGD, the original\'s recipe and ops)']
    print("| variant | clips/s | vs batch 1 | MFU |\n|---|---|---|---|")
    for name, (_, _, flops) in variants.items():
        size = 1 if name.startswith('batch 1 ') else batch_size
        print(f"| {name} | {size / times[name]:.1f} | {base * size / times[name]:.1f}x | "
              f"{mfu(statistics.mean(flops), times[name], peak)} |")
    print(f"data work (augment + normalize) at batch {batch_size}: "
          f"{100 * times['data work only'] / times[f'batch {batch_size} (AdamW), padded batches']:.1f}% of a padded "
          f"training step")
    from torch.profiler import profile  # where a bucketed step's time goes, with the ops before and now
    for label, name in (('before', 'MultiheadAttention'), ('now', 'default')):
        step = next(v[0] for n, v in variants.items() if name in n)
        with profile() as prof:
            for _ in range(steps_per_round):
                step()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        shares = [f"{e.key.removeprefix('aten::')} {100 * e.self_cpu_time_total / total:.1f}%" for e in ops[:8]]
        print(f"profile, {label}: " + ', '.join(shares))
    model_lib.relu_dropout, model_lib.attention = now  # the model's own ops again for any later section

# -----------------------------------------------------------------------------
# audio: feature extraction + cache write (clips/s, one thread), shuffled cache reads through the DataLoader,
# training samples/s per model, and the data-loading share of a TinyCNN step with the default workers
# -----------------------------------------------------------------------------

def bench_audio(n_clips=512, batch_size=64):
    import os
    import tempfile

    from torch.utils.data import DataLoader

    from data import AUDIO_FEATURES, AUDIO_RECIPE, SpectrogramCache, WindowSampler, build_audio_cache, sleep_sound
    from model import audio_model
    rng = np.random.default_rng(0)
    length = int(AUDIO_FEATURES['sample_rate'] * AUDIO_FEATURES['clip_seconds'])
    kinds = rng.choice(3, n_clips, p=[0.55, 0.35, 0.10])  # the built-in sounds, each tiled to a full 5 s clip
    waves = [np.resize(sleep_sound(('quiet', 'breathe', 'snore')[k], rng), length) for k in kinds]
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, 'train.h5')
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    build_audio_cache(path, list(zip(waves, kinds.tolist())), AUDIO_FEATURES, {}, AUDIO_FEATURES['sample_rate'],
                      log=lambda *a: None)
    extract_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    print(f"\n## audio: {n_clips} clips of {AUDIO_FEATURES['clip_seconds']} s, device {device}, {threads} threads")
    print(f"feature extraction + HDF5 cache write, one thread: {n_clips / extract_s:.0f} clips/s "
          f"({1000 * extract_s / n_clips:.2f} ms per clip)")

    dataset = SpectrogramCache(path)
    workers = AUDIO_RECIPE['num_workers']
    sampler = WindowSampler(n_clips, batch_size, seed=0)

    class Batches:  # endless shuffled batches, as train_audio.py draws them
        def __iter__(self):
            while True:
                yield sampler.next().tolist()
    worker_counts = sorted({0, 1, workers})
    loaders = {w: iter(DataLoader(dataset, batch_sampler=Batches(), num_workers=w, persistent_workers=w > 0))
               for w in worker_counts}
    read = interleaved({w: (lambda it=it: next(it)) for w, it in loaders.items()}, steps_per_round)
    for w, seconds in read.items():
        print(f"shuffled cache reads through the DataLoader, {w} workers: {batch_size / seconds:.0f} samples/s")

    x_cpu, y_cpu = next(loaders[0])
    steps, tiny, flops = {}, None, {}
    for name in ('tinycnn', 'tinycnn_cbam', 'crnn'):
        for layout in ('channels_last', 'contiguous')[:1 if name == 'crnn' else 2]:
            fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
            net = audio_model(name, cbam_kernel=3).to(device, memory_format=fmt)
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
            weights = torch.tensor(AUDIO_RECIPE['class_weights'], device=device)

            def step(x, y, net=net, opt=opt, weights=weights):
                F.cross_entropy(net(x.to(device)), y.to(device), weight=weights).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            steps[f'{name} ({layout})'] = lambda step=step: step(x_cpu, y_cpu)
            flops[f'{name} ({layout})'] = net.train_flops(*x_cpu.shape[2:]) * batch_size
            tiny = tiny or step
    for w, it in loaders.items():  # a train_audio.py step: the next batch from the loader, then the step
        steps[f'tinycnn + DataLoader, {w} workers'] = lambda it=it: tiny(*next(it))
    train, peak = with_peak(steps)
    for name, seconds in train.items():
        print(f"training {name}: {batch_size / seconds:.0f} samples/s ({1000 * seconds:.0f} ms per step of "
              f"{batch_size})" + (f", MFU {mfu(flops[name], seconds, peak)}" if name in flops else ''))
    print("(the contiguous layout: oneDNN reorders each conv's input and output to channels-last and back)")
    for name in ('tinycnn', 'tinycnn_cbam'):
        print(f"{name}: channels-last is {train[f'{name} (contiguous)'] / train[f'{name} (channels_last)']:.2f}x "
              f"as fast as the default layout")
    alone = train['tinycnn (channels_last)']
    for w in loaders:  # waiting for batches plus the CPU the workers take from the step, as a share of the step
        share = max(0.0, 1 - alone / train[f'tinycnn + DataLoader, {w} workers'])
        print(f"data-loading share of a TinyCNN step, {w} workers: {100 * share:.1f}%")


# -----------------------------------------------------------------------------
# kd: train_kd.py's step with the teacher-logits cache vs a live teacher forward vs train_audio.py's student step
# -----------------------------------------------------------------------------

def bench_kd(n_clips=512):
    from data import AUDIO_FEATURES, AUDIO_RECIPE, WindowSampler
    from model import audio_model, kd_loss
    batch_size, n_mels = AUDIO_RECIPE['batch_size'], AUDIO_FEATURES['n_mels']
    frames = 1 + round(AUDIO_FEATURES['clip_seconds'] * AUDIO_FEATURES['sample_rate']) // AUDIO_FEATURES['hop_length']
    clips = torch.randn(n_clips, 1, n_mels, frames)  # standardised log-mels of 5 s clips, (N, 1, 64, 501)
    labels = torch.randint(0, 3, (n_clips,))
    weights = torch.tensor(AUDIO_RECIPE['class_weights'], device=device)
    teacher = audio_model('crnn').to(device, memory_format=torch.channels_last).eval()

    def teacher_logits(x):
        with torch.no_grad():
            return teacher(x)

    t0 = time.perf_counter()  # the cache: one teacher pass over the split, paid once per (teacher, feature cache)
    cached = torch.cat([teacher_logits(clips[i:i + batch_size].to(device)).cpu()
                        for i in range(0, n_clips, batch_size)])  # (N, 3)
    cache_s = time.perf_counter() - t0

    def trainer(teacher_from):
        """One training step on the next shuffled batch: CE only (None), or KD with 'cache' / 'live' teacher logits."""
        student = audio_model('tinycnn').to(device, memory_format=torch.channels_last)
        opt = torch.optim.Adam(student.parameters(), lr=AUDIO_RECIPE['learning_rate'])
        sampler = WindowSampler(n_clips, batch_size, 0)

        def step():
            idx = torch.from_numpy(sampler.next())
            x, y = clips[idx].to(device), labels[idx].to(device)
            logits = student(x)
            if teacher_from is None:
                loss = F.cross_entropy(logits, y, weight=weights)
            else:
                z_t = cached[idx].to(device) if teacher_from == 'cache' else teacher_logits(x)
                loss = kd_loss(logits, z_t, y, 0.6, 4.0, class_weights=weights)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    print(f"\n## kd: CRNN teacher -> TinyCNN student, batch {batch_size} x 1 x {n_mels} x {frames}, fp32, device "
          f"{device}, {torch.get_num_threads()} threads, {rounds} rounds x {steps_per_round} steps", end='')
    times, peak = with_peak({'student alone (train_audio.py)': trainer(None), 'KD, cached teacher logits (train_kd.py)':
                             trainer('cache'), 'KD, live teacher forward (upstream)': trainer('live')})
    base = times['student alone (train_audio.py)']
    student = audio_model('tinycnn').train_flops(n_mels, frames) * batch_size  # the useful work of every variant
    print("| variant | ms/step | epoch time vs student alone | MFU (the student's FLOPs) |\n|---|---|---|---|")
    for name, dt in times.items():
        print(f"| {name} | {1000 * dt:.0f} | {dt / base:.2f}x | {mfu(student, dt, peak)} |")
    print(f"teacher-logits cache of {n_clips} clips: {cache_s:.2f}s once = {cache_s / base:.1f} student steps "
          f"(data loading, the same in every variant, is left out: with it every ratio is closer to 1)")


# -----------------------------------------------------------------------------
# vae: train_vae.py's step (categorical head, CE or focal + class weights) vs a plain Bernoulli beta-VAE
# -----------------------------------------------------------------------------

class PlainBetaVAE(torch.nn.Module):
    """The reference: the same dSprites conv net on 1 input channel, 1 logit per pixel, BCE; nothing else."""

    def __init__(self, latent_dim=10):
        super().__init__()
        nn = torch.nn
        conv = lambda i, o: nn.Conv2d(i, o, 4, 2, 1)  # noqa: E731
        deconv = lambda i, o: nn.ConvTranspose2d(i, o, 4, 2, 1)  # noqa: E731
        self.encoder = nn.Sequential(conv(1, 32), nn.ReLU(), conv(32, 32), nn.ReLU(), conv(32, 64), nn.ReLU(),
                                     conv(64, 64), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 256), nn.ReLU(),
                                     nn.Linear(256, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 1024), nn.ReLU(),
                                     nn.Unflatten(1, (64, 4, 4)), deconv(64, 64), nn.ReLU(), deconv(64, 32), nn.ReLU(),
                                     deconv(32, 32), nn.ReLU(), deconv(32, 1))

    def loss(self, x, beta=4.0):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction='sum') / x.size(0)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum() / x.size(0)
        return recon + beta * kl


def bench_vae(batch_size=64):
    from data import make_sprites
    from model import (BetaVAE, TCDiscriminator, class_weights, discriminator_loss, focal_loss, kl_per_dim,
                       reparameterize, vae_objective)
    images = torch.from_numpy(make_sprites(batch_size, seed=0)[0]).long().to(device)  # (B, 64, 64) ids 0/1
    counts = torch.bincount(images.reshape(-1), minlength=2)

    def trainer(model, loss_fn):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            loss_fn(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def ours(gamma, weight):
        def loss_fn(model):
            logits, mu, logvar = model(images)
            recon = focal_loss(logits, images, gamma, weight).mean()
            return vae_objective(recon, kl_per_dim(mu, logvar).sum(1).mean(), 'beta', 4.0)
        return trainer(BetaVAE(2, class_frequencies=counts / counts.sum()).to(device), loss_fn)
    def factor_vae(hidden):  # objective='factor': the VAE's step, then the discriminator's on the same codes
        model = BetaVAE(2, class_frequencies=counts / counts.sum()).to(device)
        discriminator = TCDiscriminator(model.latent_dim, hidden).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        disc_opt = torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))

        def step():
            logits, mu, logvar = model(images)
            z = reparameterize(mu, logvar)
            kl = kl_per_dim(mu, logvar).sum(1).mean()
            vae_objective(focal_loss(logits, images).mean(), kl, 'factor', 4.0, tc=discriminator(z).mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            disc_opt.zero_grad(set_to_none=True)
            discriminator_loss(discriminator, z).backward()
            disc_opt.step()
        return step
    plain = PlainBetaVAE().to(device)
    binary = images[:, None].float()  # (B, 1, 64, 64)
    variants = {'plain Bernoulli beta-VAE (BCE)': trainer(plain, lambda m: m.loss(binary)),
                'BetaVAE, C=2, cross-entropy (objective=beta)': ours(0.0, None),
                'BetaVAE, C=2, focal gamma 2 + class weights': ours(2.0, class_weights(counts, 'sqrt_inverse')
                                                                    .to(device)),
                'BetaVAE + FactorVAE discriminator, 256 wide (default)': factor_vae(256),
                'BetaVAE + FactorVAE discriminator, 1000 wide (Kim & Mnih)': factor_vae(1000)}
    print(f"\n## vae: fwd + bwd + Adam, batch {batch_size} of 64x64, device {device}, "
          f"{torch.get_num_threads()} threads, {rounds} rounds x {steps_per_round} steps", end='')
    times, peak = with_peak(variants)

    def flops_of(name):  # per image
        if name.startswith('plain'):
            return BetaVAE(1).train_flops()  # the same net on 1 channel in, 1 logit out
        width = 1000 if '1000 wide' in name else 256 if '256 wide' in name else 0
        return BetaVAE(2).train_flops() + (TCDiscriminator(10, width).train_flops() if width else 0)
    print("| variant | ms/step | images/s | vs plain | MFU |\n|---|---|---|---|---|")
    base = times['plain Bernoulli beta-VAE (BCE)']
    for name, dt in times.items():
        print(f"| {name} | {1000 * dt:.1f} | {batch_size / dt:,.0f} | {dt / base:.2f}x | "
              f"{mfu(flops_of(name) * batch_size, dt, peak)} |")


# -----------------------------------------------------------------------------
# subnormal: every model's step with a fresh Adam state vs a long run's (a share of its moments subnormal), with
# flush-to-zero off and on (common.set_kernels turns it on in every script)
# -----------------------------------------------------------------------------

def bench_subnormal(share=0.21):
    from data import make_sprites
    from model import SPOTER, BetaVAE, audio_model, focal_loss
    g = torch.Generator().manual_seed(0)
    sprites = torch.from_numpy(make_sprites(64, seed=0)[0]).long()  # (64, 64, 64) class ids 0/1
    cases = {  # model, its batch, its loss
        'slm (P1, batch 4)': (CharTransformer(TransformerConfig()), torch.randint(0, 98, (4, 257)),
                              lambda m, b: lm_loss(m(b[:, :-1]), b[:, 1:])),
        'spoter (batch 8 x 40 frames)': (SPOTER(100), torch.rand(8, 40, 54, 2),
                                         lambda m, b: F.cross_entropy(m(b), torch.zeros(8, dtype=torch.long))),
        'tinycnn (batch 16, 5 s)': (audio_model('tinycnn'), torch.randn(16, 1, 64, 501),
                                    lambda m, b: F.cross_entropy(m(b), torch.zeros(16, dtype=torch.long))),
        'crnn (batch 16, 5 s)': (audio_model('crnn'), torch.randn(16, 1, 64, 501),
                                 lambda m, b: F.cross_entropy(m(b), torch.zeros(16, dtype=torch.long))),
        'vae (batch 64, 64x64)': (BetaVAE(2), sprites, lambda m, b: focal_loss(m(b)[0], b).mean())}
    if vae_ckpt:  # the real thing: a long train_vae.py run's weights and Adam state
        ckpt = torch.load(vae_ckpt, map_location='cpu', weights_only=True)
        cases[f'vae from {vae_ckpt} (epoch {ckpt["epoch"]})'] = (BetaVAE(**ckpt['model_args']), sprites,
                                                                  lambda m, b: focal_loss(m(b)[0], b).mean(), ckpt)
    variants, shares = {}, {}
    for name, (model, batch, loss_fn, *ckpt) in cases.items():
        model, batch = model.to(device), batch.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss_fn(model, batch).backward()
        opt.step()  # the moments exist now
        fresh = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
        if ckpt:  # its weights and moments (the fresh state: those of a first step)
            model.load_state_dict(ckpt[0]['model_state_dict'])
            opt.load_state_dict(ckpt[0]['optimizer_state_dict'])
        aged = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
        for moments in aged.values() if not ckpt else ():
            for key in ('exp_avg', 'exp_avg_sq'):  # moments of weights whose gradients vanished decay into these
                moments[key][torch.rand(moments[key].shape, generator=g) < share] = 1e-39
        values = [v for m in aged.values() for k, v in m.items() if k != 'step']
        shares[name] = sum(((v != 0) & (v.abs() < torch.finfo(v.dtype).tiny)).sum().item() for v in values) / \
            sum(v.numel() for v in values)

        def step(state, flush, model=model, opt=opt, batch=batch, loss_fn=loss_fn):
            torch.set_flush_denormal(flush)
            for p in model.parameters():  # every step starts from the same state (a copy: the same cost each time)
                for key, value in state[id(p)].items():
                    opt.state[p][key].copy_(value)
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        variants[name, 'fresh'] = lambda step=step, fresh=fresh: step(fresh, False)
        variants[name, 'aged'] = lambda step=step, aged=aged: step(aged, False)
        variants[name, 'aged, ftz'] = lambda step=step, aged=aged: step(aged, True)
    times = interleaved(variants, steps_per_round)
    torch.set_flush_denormal(False)
    print(f"\n## subnormal: a training step (fwd + bwd + Adam) with a fresh Adam state vs one with {share:.0%} of "
          f"its moments subnormal, as train_vae.py's default run leaves them by epoch 30; device {device}, "
          f"{torch.get_num_threads()} threads, {rounds} rounds x {steps_per_round} steps")
    print("| model | subnormal moments | fresh: ms/step | aged: ms/step | aged, flush-to-zero: ms/step |\n"
          "|---|---|---|---|---|")
    for name in cases:
        print(f"| {name} | {shares[name]:.1%} | {1000 * times[name, 'fresh']:.1f} | {1000 * times[name, 'aged']:.1f} "
              f"({times[name, 'aged'] / times[name, 'fresh']:.2f}x) | {1000 * times[name, 'aged, ftz']:.1f} "
              f"({times[name, 'aged, ftz'] / times[name, 'fresh']:.2f}x) |")


for section in sections:
    {'slm': bench_slm, 'spoter': bench_spoter, 'audio': bench_audio, 'kd': bench_kd, 'vae': bench_vae,
     'subnormal': bench_subnormal}[section]()
