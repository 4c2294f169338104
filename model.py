"""
Every model of the project and the loss it trains with, one banner per family.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# char transformer (train_slm.py): decoder-only, learned absolute positions, causal SDPA, KV-cache sampling
# -----------------------------------------------------------------------------


def dropout(x, p, training):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).
    On CPU the keep-mask comes from 15 random bits per element (four elements per int64 draw) instead of torch's
    float bernoulli_ per element: the mask is ~4x cheaper and dropout fwd+bwd ~2x faster (bench.py slm). p is
    rounded to a multiple of 1/32768 (0.1 -> 0.100006) and the scale uses that same p, so E[out] = x exactly."""
    if not training or p == 0.0:
        return x
    threshold = round(p * 32768)
    if x.device.type != 'cpu' or threshold >= 32768:  # CUDA's fused dropout is already fast; p ~ 1 drops all
        return F.dropout(x, p, True)
    keep = _keep_mask(x, threshold)
    return x * keep.to(x.dtype).mul_(32768 / (32768 - threshold))  # one multiply each way: half of x * keep * s


def _keep_mask(x, threshold):
    """dropout's CPU keep-mask, x's shape: 15 random bits per element (four elements per int64 draw), kept where
    >= threshold (the low 15 bits are uniform on [0, 32768): P(drop) = threshold / 32768)."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n].view(x.shape)
    return (bits & 0x7FFF) >= threshold


def relu_dropout(x, p, training):
    """dropout(relu(x), p, training) in one mask: (keep & x > 0) * scale. The backward is then one multiply by
    that mask, with no ReLU pass either way, and the random bits (so the dropped elements) are dropout's own: the
    same values but the sign of some zeros (x * 0 is -0.0 where x < 0)."""
    threshold = round(p * 32768)
    if not training or p == 0.0 or x.device.type != 'cpu' or threshold >= 32768:
        return dropout(F.relu(x), p, training)
    keep = _keep_mask(x, threshold) & (x > 0)
    return x * keep.to(x.dtype).mul_(32768 / (32768 - threshold))


@dataclass
class TransformerConfig:
    vocab_size: int = 99
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    d_ff: int = 1024
    dropout: float = 0.1  # on the output of each attention and MLP branch (GPT-2's resid_pdrop)
    attn_dropout: float = 0.0  # on attention probabilities; > 0 takes SDPA off its fused kernel (slow on CPU)
    embd_dropout: float = 0.0  # on the token + position embedding sum (GPT-2's embd_pdrop)


class KVCache:
    """Keys and values of the positions seen so far, per layer, preallocated to block_size."""

    def __init__(self, config, batch_size, device, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k, self.v = torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, layer, k, v):
        """Store k, v (B, nh, t, hs) at the next positions; return all keys and values so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end], self.v[layer, :, :, self.length:end] = k, v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.n_embd, self.layer = config.n_head, config.n_embd, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.attn_dropout = config.attn_dropout

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # a prefill (empty cache) is causal; one new token may see every cached position, so needs no mask
        causal = cache is None or cache.length == 0
        if cache is not None:
            assert causal or T == 1, "the KV cache takes a prefill or one token at a time"
            k, v = cache.append(self.layer, k, v)  # (B, nh, length + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh * hs)
        return self.c_proj(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)), dropout on each branch."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp_fc = nn.Linear(config.n_embd, config.d_ff, bias=False)
        self.mlp_proj = nn.Linear(config.d_ff, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cache=None):
        x = x + dropout(self.attn(self.ln_1(x), cache), self.dropout, self.training)
        x = x + dropout(self.mlp_proj(F.gelu(self.mlp_fc(self.ln_2(x)))), self.dropout, self.training)
        return x


class CharTransformer(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned absolute positions
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        # the output layer shares the token embedding matrix (weight tying)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith('c_proj.weight') or name.endswith('mlp_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding drops the position table (the token table counts: it is the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self):
        """Training FLOPs per token by nanoGPT's estimate (PaLM appendix B): 6N + 12 * L * H * hs * T."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab). With a cache, positions continue after the cached ones."""
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        assert start + T <= self.config.block_size, f"sequence of {start + T} exceeds block_size"
        pos = torch.arange(start, start + T, device=idx.device)
        x = dropout(self.wte(idx) + self.wpe(pos), self.config.embd_dropout, self.training)
        for block in self.blocks:
            x = block(x, cache)
        if cache is not None:
            cache.length += T
        return F.linear(self.ln_f(x), self.wte.weight)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T). The model sees at most block_size tokens: when the window is
        full it keeps its newest half and starts over from them (with learned absolute positions, cached keys
        cannot slide). use_cache=False recomputes the same window from scratch at every token: the reference."""
        block_size, keep = self.config.block_size, self.config.block_size // 2
        start = max(0, idx.size(1) - block_size)  # tokens before `start` are outside the window
        cache = KVCache(self.config, idx.size(0), idx.device, self.wte.weight.dtype) if use_cache else None
        logits = self(idx[:, start:], cache)
        for step in range(max_new_tokens):
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float('inf')
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
            if step == max_new_tokens - 1:
                break
            if idx.size(1) - start > block_size:  # window full: keep its newest half, re-read it
                start = idx.size(1) - keep
                cache = KVCache(self.config, idx.size(0), idx.device, self.wte.weight.dtype) if use_cache else None
                logits = self(idx[:, start:], cache)
            else:
                logits = self(next_id, cache) if use_cache else self(idx[:, start:])
        return idx


def lm_loss(logits, targets, ignore_index=0):
    """Next-token cross-entropy over all positions, mean over non-PAD targets:
    L = -1/N * sum_{b,t: y != PAD} log softmax(logits[b, t])[y[b, t]]."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)


# -----------------------------------------------------------------------------
# SPOTER (train_spoter.py): pose transformer for isolated sign recognition (Bohacek & Hruz, WACV-W 2022)
# -----------------------------------------------------------------------------


def attention(attn, query, memory, pad_mask, training, need_weights=False):
    """nn.MultiheadAttention's computation over its own parameters (so checkpoints and the original's weights load
    as they are), without its per-call checks and copies, and with model.dropout's cheap masks on the attention
    weights instead of torch's bernoulli_ (the same p; other random numbers, so a training run draws other masks).
    query (B, Tq, d), memory (B, T, d), pad_mask (B, T) True at padding -> (B, Tq, d), and the head-averaged
    weights (B, Tq, T) if need_weights (after dropout, as torch returns them)."""
    B, Tq, d = query.shape
    T, h = memory.size(1), attn.num_heads
    if query is memory:  # self-attention: q, k and v from one matmul
        q, k, v = F.linear(query, attn.in_proj_weight, attn.in_proj_bias).view(B, T, 3, h, d // h).unbind(2)
    else:
        w_q, w_kv = attn.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = attn.in_proj_bias.split([d, 2 * d])
        q = F.linear(query, w_q, b_q).view(B, Tq, h, d // h)
        k, v = F.linear(memory, w_kv, b_kv).view(B, T, 2, h, d // h).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, Tq or T, d / h)
    scores = (q * (d // h) ** -0.5) @ k.transpose(-2, -1)  # (B, h, Tq, T)
    if pad_mask is not None:
        scores = scores.masked_fill(pad_mask[:, None, None, :], float('-inf'))
    weights = dropout(scores.softmax(-1), attn.dropout, training)
    out = attn.out_proj((weights @ v).transpose(1, 2).reshape(B, Tq, d))  # (B, h, Tq, d/h) -> (B, Tq, d)
    return out, weights.mean(1) if need_weights else None


class SPOTEREncoderLayer(nn.Module):
    """Post-norm encoder layer (as nn.TransformerEncoderLayer): self-attention over frames, then ReLU MLP.
    Dropout on the residual branches and the MLP's hidden layer uses model.dropout, whose CPU masks cost a fraction
    of torch's bernoulli_ ones (the SLM's reason, docs/slm.md)."""

    def __init__(self, d_model, n_head, d_ff, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.p = dropout

    def forward(self, x, pad_mask):
        attended = attention(self.self_attn, x, x, pad_mask, self.training)[0]
        x = self.norm1(x + dropout(attended, self.p, self.training))
        hidden = relu_dropout(self.linear1(x), self.p, self.training)  # (B, T, d_ff)
        return self.norm2(x + dropout(self.linear2(hidden), self.p, self.training))


class SPOTERDecoderLayer(nn.Module):
    """SPOTER's decoder layer: no self-attention (the original replaces it by t = norm1(t + dropout(t)), kept
    for parity), cross-attention from the class query to the encoded frames, then ReLU MLP; post-norm."""

    def __init__(self, d_model, n_head, d_ff, dropout):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.p = dropout

    def forward(self, query, memory, pad_mask):
        query = self.norm1(query + dropout(query, self.p, self.training))
        attended, weights = attention(self.cross_attn, query, memory, pad_mask, self.training, True)  # (B, 1, T)
        query = self.norm2(query + dropout(attended, self.p, self.training))
        hidden = relu_dropout(self.linear1(query), self.p, self.training)  # (B, 1, d_ff)
        return self.norm3(query + dropout(self.linear2(hidden), self.p, self.training)), weights


class SPOTER(nn.Module):
    """Frames of 54 (x, y) landmarks are the tokens (d_model 108, no input projection). 6 encoder layers over
    the frames; 6 decoder layers in which one learned class query attends to them; a linear head on its output.

    pos_embedding: 'single' = the original's one learned vector added to every frame (no frame order; SPOTER
    issue #12); 'learned' = one vector per frame up to max_frames, initialised to the same vector, so the model
    starts as the original and can learn order. Batched clips are padded; pad_mask (B, T) is True at padding,
    and a padded batch gives the logits of each clip alone."""

    def __init__(self, num_classes, pos_embedding='single', max_frames=256, d_model=108, n_head=9, n_layer=6,
                 d_ff=2048, dropout=0.1):
        super().__init__()
        if pos_embedding not in ('single', 'learned'):
            raise ValueError(f"pos_embedding={pos_embedding!r}: expected 'single' or 'learned'")
        self.encoder = nn.ModuleList(SPOTEREncoderLayer(d_model, n_head, d_ff, dropout) for _ in range(n_layer))
        self.decoder = nn.ModuleList(SPOTERDecoderLayer(d_model, n_head, d_ff, dropout) for _ in range(n_layer))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:  # nn.Transformer's initialisation, which the original inherits
                nn.init.xavier_uniform_(p)
        frames = 1 if pos_embedding == 'single' else max_frames
        self.pos = nn.Parameter(torch.rand(1, 1, d_model).repeat(1, frames, 1))  # U[0,1) like the original
        self.class_query = nn.Parameter(torch.rand(1, 1, d_model))
        self.head = nn.Linear(d_model, num_classes)

    def features(self, poses, pad_mask=None):
        """poses (B, T, 54, 2) -> (the class query's final state (B, d_model), its last cross-attention (B, T))."""
        x = poses.flatten(2)  # (B, T, 108)
        if x.size(1) > self.pos.size(1) > 1:
            raise ValueError(f"clip of {x.size(1)} frames exceeds max_frames={self.pos.size(1)}")
        x = x + self.pos[:, :x.size(1)]
        for layer in self.encoder:
            x = layer(x, pad_mask)
        memory = self.encoder_norm(x)
        query = self.class_query.expand(x.size(0), -1, -1)  # (B, 1, d_model)
        for layer in self.decoder:
            query, weights = layer(query, memory, pad_mask)
        return self.decoder_norm(query)[:, 0], weights[:, 0]

    def forward(self, poses, pad_mask=None):
        """poses (B, T, 54, 2), pad_mask (B, T) bool or None -> logits (B, num_classes)."""
        return self.head(self.features(poses, pad_mask)[0])

    def train_flops(self, frames):
        """Matmul FLOPs of one training step (forward + backward) per clip padded to `frames`: 6 x the multiply-
        adds, as every matmul's input needs its gradient. Encoder layer per frame: q, k, v, out projections 4d^2 and
        the MLP 2 d ff, plus scores and mixing 2 T d; decoder layer: the query's projections 2d^2, the memory's keys
        and values 2 T d^2, the MLP 2 d ff, attention 2 T d; the head d x classes. 0.77 GFLOP at 40 frames."""
        enc, dec = self.encoder[0], self.decoder[0]
        d, ff, T = enc.linear1.in_features, enc.linear1.out_features, frames
        macs = len(self.encoder) * (T * (4 * d * d + 2 * d * ff) + 2 * T * T * d)
        macs += len(self.decoder) * (2 * d * d + 2 * T * d * d + 2 * d * dec.linear1.out_features + 2 * T * d)
        return 6 * (macs + d * self.head.out_features)


# -----------------------------------------------------------------------------
# audio (train_audio.py, train_kd.py): TinyCNN, CRNN and TinyCNN-CBAM on log-mel spectrograms (B, 1, n_mels, T),
# and the distillation loss
# -----------------------------------------------------------------------------

def conv_stack_flops(n_mels, frames):
    """Training FLOPs per clip of conv_stack's three 3x3 convs (pools floor the size, as MaxPool2d does)."""
    h, w = n_mels, frames
    macs = [9 * 1 * 16 * h * w, 9 * 16 * 32 * (h // 2) * (w // 2), 9 * 32 * 64 * (h // 4) * (w // 4)]
    return 4 * macs[0] + 6 * (macs[1] + macs[2])


def conv_stack(pool_last):
    """Three 3x3 conv + ReLU blocks, 1 -> 16 -> 32 -> 64 channels, max-pool 2 after the first two (and the third)."""
    layers = []
    for i, (c_in, c_out) in enumerate([(1, 16), (16, 32), (32, 64)]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]  # in place: one less pass
        if i < 2 or pool_last:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class TinyCNN(nn.Module):
    """Three conv blocks -> global average pool -> linear: 23,491 parameters at 3 classes."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.features = conv_stack(pool_last=False)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))  # (B, 64, F/4, T/4) -> (B, 64) -> (B, num_classes)

    def train_flops(self, n_mels, frames):
        """Matmul and convolution FLOPs of one training step per clip of (n_mels, frames): 6 x the multiply-adds,
        but 4 x for the first conv (its input needs no gradient). 45 MFLOP at 64 x 51, 461 MFLOP at 64 x 501 (5 s)."""
        return conv_stack_flops(n_mels, frames) + 6 * 64 * self.head.out_features


class CRNN(nn.Module):
    """The teacher: TinyCNN's convs -> mean over frequency -> a 2-layer GRU over time -> the last step (or the mean
    over steps, rnn_pool='mean': the last step sits in the zero-padded tail of most clips) -> linear.
    73,411 parameters at 3 classes."""

    def __init__(self, num_classes=3, hidden=64, rnn_layers=2, rnn_pool='last'):
        super().__init__()
        if rnn_pool not in ('last', 'mean'):
            raise ValueError(f"rnn_pool={rnn_pool!r}: expected 'last' or 'mean'")
        self.features, self.rnn_pool = conv_stack(pool_last=False), rnn_pool
        self.rnn = nn.GRU(64, hidden, num_layers=rnn_layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.features(x).mean(dim=2).transpose(1, 2)  # (B, 64, F/4, T/4) -> (B, T/4, 64)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run cuDNN's GRU in fp16, unscaled: fp32
            out, _ = self.rnn(x.float())  # (B, T/4, hidden)
        return self.head(out[:, -1] if self.rnn_pool == 'last' else out.mean(dim=1))

    def train_flops(self, n_mels, frames):
        """TinyCNN's convs, then the GRU: per step and layer 3 gates of (input + hidden) x hidden multiply-adds,
        6 x in training less the gradient of the zero initial state; the head. 49 MFLOP at 64 x 51."""
        h, steps, layers = self.rnn.hidden_size, frames // 4, self.rnn.num_layers
        per_step = 3 * h * (self.rnn.input_size + h + (layers - 1) * 2 * h)  # (B, T/4, 64) in, every layer
        gru = 6 * steps * per_step - 2 * layers * 3 * h * h  # no gradient for the initial state h0 = 0
        return conv_stack_flops(n_mels, frames) + gru + 6 * h * self.head.out_features


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): x * channel attention, then * spatial attention.
    Channel: sigmoid(MLP(avg-pool(x)) + MLP(max-pool(x))), MLP C -> max(1, C // reduction) -> C. Spatial:
    sigmoid(conv_k x k([mean over channels; max over channels])), no bias. 2C*h + h + C + 2k^2 parameters."""

    def __init__(self, channels, reduction=8, kernel_size=7):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def train_flops(self, height, width):
        """Training FLOPs per clip at a (height, width) map: the channel MLP twice (average and max), the 2 -> 1
        spatial conv."""
        mlp = 2 * sum(layer.in_features * layer.out_features for layer in self.mlp[::2])
        return 6 * (mlp + self.spatial.weight.numel() * height * width)

    def forward(self, x):
        gate = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))  # (B, C)
        x = x * gate[:, :, None, None]
        maps = torch.stack([x.mean(dim=1), x.amax(dim=1)], dim=1)  # (B, 2, H, W)
        return x * torch.sigmoid(self.spatial(maps))


class TinyCNN_CBAM(TinyCNN):
    """TinyCNN with CBAM(32) between block 2's pool and block 3: 23,801 parameters at r 8, k 3."""

    def __init__(self, num_classes=3, reduction=8, kernel_size=7):
        super().__init__(num_classes)
        self.features.insert(6, CBAM(32, reduction, kernel_size))  # after conv, relu, pool, conv, relu, pool

    def train_flops(self, n_mels, frames):
        return super().train_flops(n_mels, frames) + self.features[6].train_flops(n_mels // 4, frames // 4)


def audio_model(arch, num_classes=3, cbam_reduction=8, cbam_kernel=7, rnn_pool='last'):
    """The model named by train_audio.py's `arch` key; train_kd.py builds its students through this too."""
    if arch == 'tinycnn':
        return TinyCNN(num_classes)
    if arch == 'crnn':
        return CRNN(num_classes, rnn_pool=rnn_pool)
    if arch == 'tinycnn_cbam':
        return TinyCNN_CBAM(num_classes, cbam_reduction, cbam_kernel)
    raise ValueError(f"arch={arch!r}: expected 'crnn', 'tinycnn' or 'tinycnn_cbam'")


def kd_loss(student_logits, teacher_logits, targets, alpha, temperature, class_weights=None):
    """Hinton et al. 2015: alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE_w(z_s, y).
    The KL is summed over classes and averaged over the batch (reduction='batchmean'; 'mean' would also divide by
    the class count); T^2 keeps its gradients on the scale of the CE term's. Returns (loss, kd term, ce term)."""
    ce = F.cross_entropy(student_logits, targets, weight=class_weights)
    kd = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1), F.log_softmax(teacher_logits / temperature,
                  dim=-1), reduction='batchmean', log_target=True) * temperature ** 2
    return alpha * kd + (1 - alpha) * ce, kd, ce


# -----------------------------------------------------------------------------
# metrics
# -----------------------------------------------------------------------------

def confusion_matrix(predictions, targets, num_classes):
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted class."""
    counts = torch.bincount(torch.as_tensor(targets) * num_classes + torch.as_tensor(predictions),
                            minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)  # (true, predicted)


def per_class_scores(confusion):
    """Precision, recall and F1 per class from a confusion matrix; F1 = 2TP / (2TP + FP + FN), 0 when that
    denominator is 0 (a class never present nor predicted)."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    safe = lambda num, den: torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))  # noqa: E731
    return safe(tp, tp + fp), safe(tp, tp + fn), safe(2 * tp, 2 * tp + fp + fn)


def macro_f1(confusion):
    """Mean over classes of the per-class F1 (every class counts equally, however rare)."""
    return per_class_scores(confusion)[2].mean().item()


# -----------------------------------------------------------------------------
# beta-VAE (train_vae.py): categorical pixels, the standard dSprites conv net (Higgins et al. 2017,
# Burgess et al. 2018), reconstruction losses for class imbalance, and the MIG disentanglement metric
# -----------------------------------------------------------------------------
def _conv(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)  # halves H and W


def _deconv(c_in, c_out):
    return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)  # doubles H and W


class BetaVAE(nn.Module):
    """Encoder: one-hot (C, S, S) -> conv 32-32-64-64 (4x4, stride 2, ReLU) -> 256 -> (mu, logvar), latent_dim
    each. Decoder: z -> 256 -> 64 x S/16 x S/16 -> transposed convs 64-32-32-C -> C logits per pixel.
    S (image_size) must be a multiple of 16; other grid sizes are padded by data.pad_images.
    class_frequencies (C,): the output bias starts at their logs, so the first prediction is the class prior
    instead of uniform (no early all-background plateau to climb out of)."""

    def __init__(self, num_classes, image_size=64, latent_dim=10, hidden=256, class_frequencies=None):
        super().__init__()
        if image_size % 16 or image_size < 16:
            raise ValueError(f"image_size={image_size}: expected a multiple of 16 (four stride-2 convolutions)")
        self.num_classes, self.latent_dim, self.side = num_classes, latent_dim, image_size // 16
        flat = 64 * self.side * self.side
        self.encoder = nn.Sequential(_conv(num_classes, 32), nn.ReLU(), _conv(32, 32), nn.ReLU(), _conv(32, 64),
                                     nn.ReLU(), _conv(64, 64), nn.ReLU(), nn.Flatten(), nn.Linear(flat, hidden),
                                     nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder_fc = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, flat), nn.ReLU())
        self.decoder = nn.Sequential(_deconv(64, 64), nn.ReLU(), _deconv(64, 32), nn.ReLU(), _deconv(32, 32),
                                     nn.ReLU(), _deconv(32, num_classes))
        if class_frequencies is not None:
            freq = torch.as_tensor(class_frequencies, dtype=torch.float32).clamp_min(1e-6)
            with torch.no_grad():
                self.decoder[-1].bias.copy_((freq / freq.sum()).log())

    def encode(self, images):
        """images (B, S, S) class ids -> mu, logvar (B, latent_dim) each."""
        one_hot = torch.zeros(images.size(0), self.num_classes, *images.shape[1:], device=images.device)
        one_hot.scatter_(1, images.unsqueeze(1), 1.0)  # (B, C, S, S)
        return self.encoder(one_hot).chunk(2, dim=1)

    def decode(self, z):
        """z (B, latent_dim) -> logits (B, C, S, S)."""
        h = self.decoder_fc(z).view(z.size(0), 64, self.side, self.side)  # (B, 64, S/16, S/16)
        return self.decoder(h)

    def train_flops(self):
        """Training FLOPs per image: the convs (multiply-adds at each output pixel; a transposed conv's at each input
        pixel) and linears, 6 x, but 4 x for the first conv (the one-hot input needs no gradient). 102 MFLOP at
        64 x 64, 2 classes."""
        macs, side = [], self.side * 16
        for conv in self.encoder[:8:2]:
            side //= 2
            macs.append(conv.weight.numel() * side * side)
        for deconv in self.decoder[::2]:
            macs.append(deconv.weight.numel() * side * side)
            side *= 2
        linears = [m for m in (*self.encoder, *self.decoder_fc) if isinstance(m, nn.Linear)]
        return 4 * macs[0] + 6 * (sum(macs[1:]) + sum(m.weight.numel() for m in linears))

    def forward(self, images):
        """-> (logits (B, C, S, S), mu, logvar). Training: z ~ q(z|x) by reparameterisation; eval: z = mu."""
        mu, logvar = self.encode(images)
        return self.decode(reparameterize(mu, logvar) if self.training else mu), mu, logvar


def reparameterize(mu, logvar):
    """One sample z ~ N(mu, sigma^2) per row, differentiable in mu and logvar: z = mu + eps * exp(logvar / 2)."""
    return mu + torch.randn_like(mu) * (0.5 * logvar).exp()


def kl_per_dim(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per latent: KL_j = 0.5 (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1), (B, D)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def focal_loss(logits, targets, gamma=0.0, weight=None, mask=None):
    """Focal loss (Lin et al. 2017) summed over pixels, one value per image:
    FL_b = sum_pixels m * w_y * (1 - p_t)^gamma * (-log p_t), p_t = softmax(logits)[y].
    logits (B, C, H, W), targets (B, H, W) ids, weight (C,) or None, mask (B, H, W) 1 = real pixel or None.
    gamma = 0 is cross-entropy. Summing (not averaging) over pixels is what fixes beta's scale."""
    nll = F.cross_entropy(logits, targets, reduction='none')  # (B, H, W): -log p_t
    if gamma:
        nll = (1.0 - (-nll).exp()).pow(gamma) * nll  # the (1 - p_t)^gamma factor, from the same log p_t
    if weight is not None:
        nll = nll * weight[targets]  # per-pixel weight, summed (F.cross_entropy's 'mean' would divide by sum w)
    if mask is not None:
        nll = nll * mask
    return nll.flatten(1).sum(1)  # (B,)


def class_weights(counts, method):
    """Per-class loss weights from pixel counts n_c (N = sum n_c, C classes, f_c = n_c / N):
    'inverse'      w_c = N / (C n_c)          (sklearn's 'balanced'; 93% background -> ~123:1 for a 7% class)
    'sqrt_inverse' w_c = sqrt(N / (C n_c))     (seed 002's smoothing: 123:1 -> ~11:1)
    'balanced'     w_c = median_c(f_c) / f_c   (median-frequency balancing, Eigen & Fergus 2015)
    Then all are scaled so the mean per-pixel weight over the data, sum_c f_c w_c, is 1: beta keeps its meaning.
    A class with no pixels gets the largest weight of the others (it never occurs as a target in these data)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class_weights: every class count is zero")
    total, num_classes = counts.sum(), len(counts)
    freq = counts[present] / total
    if method == 'inverse':
        w = 1.0 / (num_classes * freq)
    elif method == 'sqrt_inverse':
        w = (1.0 / (num_classes * freq)).sqrt()
    elif method == 'balanced':
        w = freq.median() / freq
    else:
        raise ValueError(f"class_weight_method={method!r}: expected 'inverse', 'sqrt_inverse' or 'balanced'")
    w = w / (freq * w).sum()  # mean per-pixel weight 1
    weights = torch.full((num_classes,), float(w.max()), dtype=torch.float64)
    weights[present] = w
    return weights.float()


def capacity_at(iter_num, capacity_max, capacity_stop_iter):
    """Burgess et al. 2018: the KL target C rises linearly from 0 to capacity_max nats over capacity_stop_iter."""
    return capacity_max * min(1.0, iter_num / max(capacity_stop_iter, 1))


def total_correlation(mu, logvar, dataset_size):
    """Total correlation TC = KL(q(z) || prod_j q(z_j)) of the aggregate posterior q(z) = mean_n q(z|x_n) over the
    dataset_size images (Chen et al. 2018, minibatch stratified sampling), from one reparameterised sample
    z_i ~ q(z|x_i) per image of a batch of M: x_i's own posterior carries weight 1/N, the other M - 1 images stand
    in for the rest of the data, (N - 1) / (N (M - 1)) each; the same per latent for the marginals q(z_j).
    mu, logvar (M, D) -> scalar, ~0 when the latents are independent."""
    m, n = mu.size(0), max(dataset_size, mu.size(0))
    z = reparameterize(mu, logvar)  # (M, D)
    # log N(z_ij; mu_kj, sigma_kj^2) of every sample i under every image k's posterior: (M, M, D)
    log_q = -0.5 * (math.log(2 * math.pi) + logvar[None] + (z[:, None] - mu[None]) ** 2 / logvar.exp()[None])
    log_w = torch.full((m, m), math.log((n - 1) / (n * (m - 1))), device=mu.device)
    log_w.fill_diagonal_(-math.log(n))  # (M, M): log weight of image k in the estimate of q(z_i)
    log_qz = torch.logsumexp(log_w + log_q.sum(2), dim=1)  # (M,) joint
    log_qz_marginals = torch.logsumexp(log_w[:, :, None] + log_q, dim=1).sum(1)  # (M,) product of the marginals
    return (log_qz - log_qz_marginals).mean()


class TCDiscriminator(nn.Module):
    """FactorVAE's total-correlation estimate (Kim & Mnih 2018): an MLP (n_layers hidden layers, LeakyReLU 0.2)
    trained by logistic regression to tell codes z ~ q(z) (label 1) from codes whose latents were shuffled
    independently across the batch (permute_latents), i.e. samples of prod_j q(z_j) (label 0). At the optimum its
    logit is log q(z) - log prod_j q(z_j), so the mean logit over z ~ q(z) estimates TC = KL(q(z) || prod_j q(z_j))
    without a density, at any batch size. z (B, D) -> logits (B,)."""

    def __init__(self, latent_dim, hidden=1000, n_layers=6):
        super().__init__()
        layers, width = [], latent_dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def train_flops(self):
        """Training FLOPs per code of train_vae.py's step: the VAE's loss runs it on z (6 x the multiply-adds, z needs
        its gradient), discriminator_loss on the detached z and on the permuted codes (6 x, less the first layer's
        input gradient, each). 5.9 MFLOP at 256 wide, 10 latents."""
        macs = [m.weight.numel() for m in self.net if isinstance(m, nn.Linear)]
        return 6 * sum(macs) + 2 * (6 * sum(macs) - 2 * macs[0])

    def forward(self, z):
        return self.net(z).squeeze(1)


def permute_latents(z):
    """Shuffle each latent independently across the batch: the joint's dependencies are gone, each marginal
    q(z_j) is kept. z (B, D) -> (B, D)."""
    order = torch.argsort(torch.rand(z.shape, device=z.device), dim=0)  # (B, D): one permutation per latent
    return z.gather(0, order)


def discriminator_loss(discriminator, z):
    """Logistic loss of the discriminator on the batch's codes (label 1) and their latent-wise shuffle (label 0),
    z detached: this trains the discriminator, not the encoder."""
    z = z.detach()
    joint, shuffled = discriminator(z), discriminator(permute_latents(z))
    return 0.5 * (F.binary_cross_entropy_with_logits(joint, torch.ones_like(joint))
                  + F.binary_cross_entropy_with_logits(shuffled, torch.zeros_like(shuffled)))


def vae_objective(recon, kl, objective='beta', beta=4.0, capacity=0.0, capacity_gamma=1000.0, tc=0.0,
                  factor_gamma=35.0):
    """recon: reconstruction loss summed over pixels, mean over the batch; kl: KL summed over latents, mean over
    the batch. 'beta': recon + beta * KL (Higgins et al. 2017). 'capacity': recon + gamma * |KL - C|.
    'tc': recon + KL + (beta - 1) * TC (beta-TCVAE, Chen et al. 2018: of KL = index-code MI + TC + dimension-wise
    KL, only the TC is weighted by beta). 'factor': recon + beta * KL + factor_gamma * TC, TC from the
    discriminator (FactorVAE, Kim & Mnih 2018, is beta = 1; beta > 1 adds beta-VAE's pressure to compress)."""
    if objective == 'beta':
        return recon + beta * kl
    if objective == 'capacity':
        return recon + capacity_gamma * abs(kl - capacity)
    if objective == 'tc':
        return recon + kl + (beta - 1) * tc
    if objective == 'factor':
        return recon + beta * kl + factor_gamma * tc
    raise ValueError(f"objective={objective!r}: expected 'beta', 'capacity', 'tc' or 'factor'")


# -----------------------------------------------------------------------------
# metrics of disentanglement: MIG (Chen et al. 2018) as disentanglement_lib computes it
# -----------------------------------------------------------------------------

def _discretize(values, n_bins):
    """Equal-width bins over [min, max] of each column -> bin ids 1..n_bins (disentanglement_lib's recipe)."""
    return np.stack([np.digitize(v, np.histogram(v, n_bins)[1][:-1]) for v in values.T], 1)


def discrete_mutual_info(a, b):
    """I(a; b) in nats of two discrete variables (N,), from their joint histogram."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= len(a)
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())


def mig_per_factor(latent_means, factors, n_bins=20):
    """Mutual Information Gap per factor (Chen et al. 2018): latents discretised into n_bins equal-width bins,
    I(z_j; v_k) in nats, gap between the two most informative latents, divided by H(v_k). Factors with one value
    (dSprites' colour) have no entropy and are left out. latent_means (N, D), factors (N, K) -> {k: gap}."""
    latent_means, factors = np.asarray(latent_means, dtype=np.float64), np.asarray(factors)
    if latent_means.shape[0] != factors.shape[0] or latent_means.shape[1] < 2:
        raise ValueError(f"mig: latent_means {latent_means.shape}, factors {factors.shape}: need (N, D >= 2), (N, K)")
    codes = _discretize(latent_means, n_bins)
    gaps = {}
    for k in range(factors.shape[1]):
        entropy = discrete_mutual_info(factors[:, k], factors[:, k])
        if entropy <= 0:
            continue
        info = sorted((discrete_mutual_info(codes[:, j], factors[:, k]) for j in range(codes.shape[1])), reverse=True)
        gaps[k] = (info[0] - info[1]) / entropy
    return gaps


def mig(latent_means, factors, n_bins=20):
    """MIG: the mean over non-constant factors of mig_per_factor (1 = each factor in one latent alone)."""
    gaps = mig_per_factor(latent_means, factors, n_bins)
    return float(np.mean(list(gaps.values()))) if gaps else float('nan')
