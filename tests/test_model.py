"""model.py: the char transformer (parameter count, FLOPs, tying, causality, loss, KV-cache generation, init)
and the custom CPU dropout, each checked against a closed form or a torch builtin."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.nn.functional as F

from model import CharTransformer, KVCache, TransformerConfig, dropout, lm_loss

P1_NON_EMBEDDING = 3_173_376  # the spec's N


def tiny_config(**overrides):
    args = dict(vocab_size=99, block_size=16, n_layer=2, n_head=2, n_embd=32, d_ff=64)
    args.update(overrides)
    return TransformerConfig(**args)


def tiny_model(seed=0, eval_mode=True, **overrides):
    torch.manual_seed(seed)
    model = CharTransformer(tiny_config(**overrides))
    return model.eval() if eval_mode else model.train()


@pytest.fixture(scope='module')
def p1_model():
    torch.manual_seed(0)
    return CharTransformer(TransformerConfig())


# -----------------------------------------------------------------------------
# size, FLOPs, weight tying
# -----------------------------------------------------------------------------


def test_p1_config_defaults():
    c = TransformerConfig()
    assert (c.n_layer, c.n_embd, c.n_head, c.d_ff, c.vocab_size, c.block_size) == (4, 256, 4, 1024, 99, 256)
    assert c.dropout == 0.1


def test_p1_parameter_count(p1_model):
    # per block: c_attn 256*768 + c_proj 256*256 + mlp 2*256*1024 + two LayerNorm gains; + wte 99*256 + ln_f
    per_block = 256 * 768 + 256 * 256 + 2 * 256 * 1024 + 2 * 256
    assert 4 * per_block + 99 * 256 + 256 == P1_NON_EMBEDDING
    assert p1_model.num_params() == P1_NON_EMBEDDING
    assert p1_model.num_params(False) == P1_NON_EMBEDDING + 256 * 256
    assert sum(p.numel() for p in p1_model.parameters()) == P1_NON_EMBEDDING + 256 * 256


def test_p1_flops_per_token(p1_model):
    assert p1_model.flops_per_token() == 6 * P1_NON_EMBEDDING + 12 * 4 * 256 * 256 == 22_185_984
    assert round(p1_model.flops_per_token() / 1e6, 2) == 22.19  # the spec's 22.19 MFLOP/token


def test_lm_head_is_tied_to_token_embedding():
    model = tiny_model()
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.shape == model.wte.weight.shape
                   for m in model.modules()), "a separate (untied) output layer exists"
    captured = {}
    handle = model.ln_f.register_forward_hook(lambda m, i, o: captured.__setitem__('h', o))
    idx = torch.randint(0, 99, (2, 10))
    with torch.no_grad():
        logits = model(idx)
    handle.remove()
    torch.testing.assert_close(logits, captured['h'] @ model.wte.weight.T, rtol=1e-5, atol=1e-5)

    # perturbing the embedding row of a token absent from the input changes only that token's logit column
    absent = next(t for t in range(99) if t not in idx)
    with torch.no_grad():
        model.wte.weight[absent] += torch.randn(32)  # not a constant: LayerNorm output is orthogonal to ones
        perturbed = model(idx)
    changed = (perturbed - logits).abs().amax(dim=(0, 1)) > 1e-4
    assert changed.nonzero().flatten().tolist() == [absent]


# -----------------------------------------------------------------------------
# forward: shapes, block_size, causality, loss
# -----------------------------------------------------------------------------


@pytest.mark.parametrize('B, T', [(1, 1), (3, 7), (2, 16)])
def test_forward_shape(B, T):
    model = tiny_model()
    with torch.no_grad():
        out = model(torch.randint(0, 99, (B, T)))
    assert out.shape == (B, T, 99)
    assert out.dtype == torch.float32


def test_forward_longer_than_block_size_asserts():
    model = tiny_model()
    with pytest.raises(AssertionError, match='block_size'):
        model(torch.randint(0, 99, (1, 17)))


def test_causality():
    model = tiny_model()
    torch.manual_seed(1)
    idx = torch.randint(0, 99, (2, 16))
    with torch.no_grad():
        base = model(idx)
        for t in (0, 3, 8, 14):
            changed = idx.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.randint(0, 97, changed[:, t + 1:].shape)) % 99
            assert (changed[:, t + 1:] != idx[:, t + 1:]).all()
            out = model(changed)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)
            # a change at position t itself does change the logits at t
            at_t = idx.clone()
            at_t[:, t] = (at_t[:, t] + 5) % 99
            assert (model(at_t)[:, t] - base[:, t]).abs().amax() > 1e-3


def test_initial_loss_is_ln_vocab():
    model = tiny_model(seed=3)
    torch.manual_seed(4)
    idx = torch.randint(1, 99, (8, 16))
    targets = torch.randint(1, 99, (8, 16))
    with torch.no_grad():
        loss = lm_loss(model(idx), targets).item()
    assert abs(loss - math.log(99)) < 0.05


def test_lm_loss_matches_reference_and_ignores_pad():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 99)
    targets = torch.randint(1, 99, (3, 5))
    targets[0, 1] = targets[1, 4] = targets[2, 0] = targets[2, 3] = 0  # PAD
    logp = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = targets != 0
    reference = -(logp * mask).sum() / mask.sum()
    loss = lm_loss(logits, targets)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    # including the PAD positions would give a different number: the mask matters
    assert not torch.isclose(loss, -logp.mean(), atol=1e-4)

    scrambled = logits.clone()
    scrambled[~mask] = 100 * torch.randn(int((~mask).sum()), 99)
    assert lm_loss(scrambled, targets).item() == loss.item()
    scrambled[0, 0, 3] += 10.0  # a non-PAD position does move it
    assert lm_loss(scrambled, targets).item() != loss.item()


def test_lm_loss_gradient_matches_reference():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 11, requires_grad=True)
    targets = torch.tensor([[3, 0, 5, 7], [0, 0, 10, 1]])
    lm_loss(logits, targets).backward()
    mask = (targets != 0).float().unsqueeze(-1)
    expected = (F.softmax(logits.detach(), -1) - F.one_hot(targets, 11).float()) * mask / mask.sum()
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# KV cache and generation
# -----------------------------------------------------------------------------


@pytest.mark.parametrize('prefill', [1, 5])
def test_kv_cache_token_by_token_matches_full_forward(prefill):
    model = tiny_model()
    torch.manual_seed(2)
    idx = torch.randint(0, 99, (3, 16))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 3, 'cpu')
        parts = [model(idx[:, :prefill], cache)]
        for i in range(prefill, 16):
            parts.append(model(idx[:, i:i + 1], cache))
        assert cache.length == 16
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_rejects_multi_token_append_and_overflow():
    model = tiny_model()
    idx = torch.randint(0, 99, (1, 16))
    with torch.no_grad():
        cache = KVCache(model.config, 1, 'cpu')
        model(idx[:, :4], cache)
        with pytest.raises(AssertionError):
            model(idx[:, 4:6], cache)  # two tokens after a prefill: no mask for them
        cache = KVCache(model.config, 1, 'cpu')
        model(idx, cache)
        with pytest.raises(AssertionError, match='block_size'):
            model(idx[:, :1], cache)  # position 16 does not exist


GEN_CASES = [
    # (prompt length, max_new_tokens, sampling kwargs): within block_size, then past it several times
    (3, 10, {}),
    (3, 50, {}),
    (3, 50, {'top_k': 5, 'temperature': 0.7}),
    (20, 30, {}),  # a prompt longer than block_size
]


@pytest.mark.parametrize('prompt_len, new, kwargs', GEN_CASES)
def test_generate_cache_equals_recompute(prompt_len, new, kwargs):
    model = tiny_model(seed=5)
    torch.manual_seed(6)
    prompt = torch.randint(0, 99, (3, prompt_len))
    outs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(123)
        outs.append(model.generate(prompt, new, generator=generator, use_cache=use_cache, **kwargs))
    assert outs[0].shape == (3, prompt_len + new)
    assert torch.equal(outs[0][:, :prompt_len], prompt)
    assert torch.equal(outs[0], outs[1])


def test_generate_top_k_5_stays_in_top_5():
    model = tiny_model(seed=5)
    prompt = torch.randint(0, 99, (3, 4))
    out = model.generate(prompt, 8, top_k=5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in range(4, 12):  # within block_size the window is the whole prefix
            top5 = model(out[:, :t])[:, -1].topk(5).indices
            assert (top5 == out[:, t:t + 1]).any(dim=1).all()


def greedy_reference(model, idx, max_new_tokens):
    """Full recompute, argmax, with generate's windowing rule: a full window restarts from its newest half."""
    block_size, keep = model.config.block_size, model.config.block_size // 2
    start = max(0, idx.size(1) - block_size)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(idx[:, start:])[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, next_id), dim=1)
            if idx.size(1) - start > block_size:
                start = idx.size(1) - keep
    return idx


@pytest.mark.parametrize('new', [10, 40])
@pytest.mark.parametrize('use_cache', [True, False])
def test_generate_top_k_1_is_greedy(new, use_cache):
    model = tiny_model(seed=7)
    torch.manual_seed(8)
    prompt = torch.randint(0, 99, (2, 3))
    out = model.generate(prompt, new, top_k=1, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    again = model.generate(prompt, new, top_k=1, generator=torch.Generator().manual_seed(99), use_cache=use_cache)
    assert torch.equal(out, again)  # no randomness left
    assert torch.equal(out, greedy_reference(model, prompt, new))


def test_generate_within_block_size_greedy_sees_whole_prefix():
    # independent of the windowing rule: inside block_size, each token is the argmax given every previous token
    model = tiny_model(seed=9)
    prompt = torch.randint(0, 99, (2, 2))
    out = model.generate(prompt, 14, top_k=1)
    with torch.no_grad():
        for t in range(2, 16):
            assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))


@pytest.mark.parametrize('new', [5, 50])
def test_generate_leaves_global_rng_untouched(new):
    model = tiny_model(seed=10)  # eval mode: no dropout draws
    prompt = torch.randint(0, 99, (3, 3))
    torch.manual_seed(11)
    before = torch.get_rng_state()
    model.generate(prompt, new, generator=torch.Generator().manual_seed(1))
    model.generate(prompt, new, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_generate_same_generator_seed_same_tokens():
    model = tiny_model(seed=10)
    prompt = torch.randint(0, 99, (3, 3))
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))
    c = model.generate(prompt, 20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -----------------------------------------------------------------------------
# dropout
# -----------------------------------------------------------------------------


def p_eff(p):
    return round(p * 32768) / 32768


def test_dropout_identity_when_off():
    x = torch.randn(1001)
    assert dropout(x, 0.5, False) is x
    assert dropout(x, 0.0, True) is x
    torch.manual_seed(0)
    before = torch.get_rng_state()
    dropout(x, 0.5, False)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.fixture(scope='module')
def ones_2m():
    return torch.ones(2_000_000)


@pytest.mark.parametrize('p', [0.1, 0.5])
def test_dropout_rate_and_scale(p, ones_2m):
    torch.manual_seed(0)
    out = dropout(ones_2m, p, True)
    n, pe = ones_2m.numel(), p_eff(p)
    zero_frac = (out == 0).double().mean().item()
    assert abs(zero_frac - pe) < 5 * math.sqrt(pe * (1 - pe) / n)
    kept = out[out != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / (1 - pe)))
    # torch's own dropout drops at the same rate (both within 5 sd of each other)
    torch.manual_seed(0)
    ref_frac = (F.dropout(ones_2m, p, True) == 0).double().mean().item()
    assert abs(zero_frac - ref_frac) < 5 * math.sqrt(2 * p * (1 - p) / n)


@pytest.mark.parametrize('p', [0.1, 0.5])
def test_dropout_is_unbiased(p):
    torch.manual_seed(1)
    x = torch.randn(1_000_000) + 1.0
    out = dropout(x, p, True)
    pe = p_eff(p)
    # Var(out_i - x_i) = x_i^2 * pe / (1 - pe)
    sd = math.sqrt((x.double() ** 2).sum().item() * pe / (1 - pe)) / x.numel()
    assert abs(out.double().mean().item() - x.double().mean().item()) < 5 * sd


def test_dropout_p_rounding_matches_docstring():
    assert p_eff(0.1) == 3277 / 32768
    assert abs(p_eff(0.1) - 0.100006) < 1e-6


@pytest.mark.parametrize('p', [0.1, 0.5])
def test_dropout_gradient(p):
    torch.manual_seed(2)
    x = torch.ones(10_001, requires_grad=True)
    out = dropout(x, p, True)
    out.sum().backward()
    expected = (out.detach() != 0).float() * (1 / (1 - p_eff(p)))
    assert torch.equal(x.grad, expected)
    assert 0 < (out == 0).sum() < x.numel()


def test_dropout_gradient_matches_autograd_of_mask():
    torch.manual_seed(3)
    x = torch.randn(4, 257, requires_grad=True)
    g = torch.randn(4, 257)
    out = dropout(x, 0.3, True)
    out.backward(g)
    mask = (out.detach() != 0).float()
    torch.testing.assert_close(x.grad, g * mask / (1 - p_eff(0.3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.detach(), x.detach() * mask / (1 - p_eff(0.3)), rtol=1e-6, atol=0)


def test_dropout_deterministic_under_manual_seed():
    x = torch.ones(3, 1000)
    torch.manual_seed(42)
    a = dropout(x, 0.1, True)
    torch.manual_seed(42)
    b = dropout(x, 0.1, True)
    torch.manual_seed(43)
    c = dropout(x, 0.1, True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize('make', [
    lambda: torch.ones(7),  # numel 7: not a multiple of 4
    lambda: torch.ones(3, 5, 9),  # 135
    lambda: torch.ones(13, 7).t(),  # non-contiguous transpose, numel 91
    lambda: torch.ones(6, 20)[:, ::3],  # strided slice, numel 42
    lambda: torch.ones(2, 3, 8).permute(2, 0, 1)[1:],  # non-contiguous 3-d, numel 42
])
def test_dropout_odd_and_noncontiguous_shapes(make):
    x = make()
    torch.manual_seed(5)
    out = dropout(x, 0.5, True)
    assert out.shape == x.shape
    assert ((out == 0) | (out == 2.0)).all()
    # many draws: every element is dropped sometimes and kept sometimes (no stuck positions)
    outs = torch.stack([dropout(x, 0.5, True) for _ in range(64)])
    assert (outs == 0).any(dim=0).all() and (outs == 2).any(dim=0).all()


def test_dropout_noncontiguous_matches_contiguous_with_same_seed():
    x = torch.randn(13, 7).t()
    torch.manual_seed(6)
    a = dropout(x, 0.2, True)
    torch.manual_seed(6)
    b = dropout(x.contiguous(), 0.2, True)
    assert torch.equal(a, b)


def test_dropout_p_close_to_one():
    out = dropout(torch.ones(100), 0.99999, True)
    assert torch.equal(out, torch.zeros(100))


# -----------------------------------------------------------------------------
# dropout in the model, weight init
# -----------------------------------------------------------------------------


def test_attn_dropout_is_stochastic_in_train_mode():
    model = tiny_model(eval_mode=False, dropout=0.0, attn_dropout=0.5)
    idx = torch.randint(0, 99, (2, 16))
    with torch.no_grad():
        a, b = model(idx), model(idx)
        assert not torch.allclose(a, b, atol=1e-4)
        model.eval()
        assert torch.equal(model(idx), model(idx))


def test_train_mode_without_dropout_is_deterministic():
    model = tiny_model(eval_mode=False, dropout=0.0, attn_dropout=0.0)
    idx = torch.randint(0, 99, (2, 16))
    with torch.no_grad():
        a, b = model(idx), model(idx)
        assert torch.equal(a, b)
        torch.testing.assert_close(model.eval()(idx), a, rtol=0, atol=1e-6)


def test_residual_dropout_is_stochastic_in_train_mode_only():
    model = tiny_model(eval_mode=False, dropout=0.1)
    idx = torch.randint(0, 99, (2, 16))
    with torch.no_grad():
        assert not torch.allclose(model(idx), model(idx), atol=1e-4)
        model.eval()
        assert torch.equal(model(idx), model(idx))


def test_weight_init(p1_model):
    residual_std = 0.02 / math.sqrt(2 * 4)
    seen = set()
    for name, p in p1_model.named_parameters():
        if name.endswith('c_proj.weight') or name.endswith('mlp_proj.weight'):
            expected = residual_std
        elif p.dim() == 2:  # c_attn, mlp_fc, wte, wpe
            expected = 0.02
        else:  # LayerNorm gains
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        seen.add(name.split('.')[-2] if '.' in name else name)
        assert abs(p.std().item() - expected) < 0.1 * expected, name
        assert abs(p.mean().item()) < 0.1 * expected, name
    assert {'c_attn', 'c_proj', 'mlp_fc', 'mlp_proj', 'wte', 'wpe'} <= seen


def test_embd_dropout_acts_on_the_embedding_sum_only():
    """With only embd_dropout on, train-mode outputs vary between calls and equal a forward whose embedding sum
    went through model.dropout with the same RNG state; eval mode ignores it."""
    model = tiny_model(eval_mode=False, dropout=0.0, attn_dropout=0.0, embd_dropout=0.5)
    idx = torch.randint(0, 99, (2, 16))
    with torch.no_grad():
        torch.manual_seed(3)
        a = model(idx)
        torch.manual_seed(3)
        x = dropout(model.wte(idx) + model.wpe(torch.arange(16)), 0.5, True)
        for block in model.blocks:
            x = block(x)
        reference = torch.nn.functional.linear(model.ln_f(x), model.wte.weight)
        b = model(idx)
        model.eval()
        assert torch.equal(model(idx), model(idx))
    assert torch.allclose(a, reference, atol=1e-6)
    assert not torch.allclose(a, b)


# -----------------------------------------------------------------------------
# FLOP formulas (bench.py's MFU) against torch's FlopCounterMode on one training step
# -----------------------------------------------------------------------------

def counted_flops(step):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@pytest.mark.parametrize('frames', [20, 41])
def test_spoter_train_flops_is_what_torch_counts(frames):
    from model import SPOTER
    torch.manual_seed(0)
    model = SPOTER(12, pos_embedding='learned', max_frames=64)
    poses, pad_mask = torch.rand(3, frames, 54, 2), torch.zeros(3, frames, dtype=torch.bool)
    pad_mask[1, frames // 2:] = True  # padding costs what a frame costs
    counted = counted_flops(lambda: F.cross_entropy(model(poses, pad_mask), torch.tensor([0, 1, 2])).backward())
    assert counted == 3 * model.train_flops(frames)


@pytest.mark.parametrize('arch', ['tinycnn', 'tinycnn_cbam', 'crnn'])
@pytest.mark.parametrize('frames', [51, 101])
def test_audio_train_flops_is_what_torch_counts(arch, frames):
    from model import audio_model
    torch.manual_seed(0)
    model = audio_model(arch, 3, cbam_reduction=4, cbam_kernel=3)
    x = torch.randn(2, 1, 64, frames)
    counted = counted_flops(lambda: F.cross_entropy(model(x), torch.tensor([0, 2])).backward())
    assert counted == 2 * model.train_flops(64, frames)


def test_vae_and_discriminator_train_flops_are_what_torch_counts():
    from model import BetaVAE, TCDiscriminator, discriminator_loss, reparameterize
    torch.manual_seed(0)
    vae, disc = BetaVAE(3, image_size=32, latent_dim=6), TCDiscriminator(6, hidden=64, n_layers=3)
    images = torch.randint(0, 3, (4, 32, 32))

    def step():  # train_vae.py's objective='factor' step: the VAE's loss with the TC term, then the discriminator's
        logits, mu, logvar = vae(images)
        z = reparameterize(mu, logvar)
        (F.cross_entropy(logits, images) + disc(z).mean()).backward()
        discriminator_loss(disc, z).backward()
    assert counted_flops(step) == 4 * (vae.train_flops() + disc.train_flops())


def test_relu_dropout_is_dropout_of_relu_with_the_same_bits():
    """SPOTER's MLP: one mask for ReLU and dropout. Same random bits, so the same output and gradient as
    dropout(relu(x)) (torch.equal: -0.0 == 0.0, the only difference), and plain ReLU in eval."""
    from model import relu_dropout
    x = torch.randn(3, 7, 50, requires_grad=True)
    for training in (True, False):
        torch.manual_seed(5)
        ours = relu_dropout(x, 0.1, training)
        ours_grad, = torch.autograd.grad(ours, x, torch.arange(ours.numel()).view_as(ours).float())
        torch.manual_seed(5)
        ref = dropout(F.relu(x), 0.1, training)
        ref_grad, = torch.autograd.grad(ref, x, torch.arange(ref.numel()).view_as(ref).float())
        assert torch.equal(ours, ref) and torch.equal(ours_grad, ref_grad)
    assert (relu_dropout(x, 0.1, True) == 0).float().mean() > 0.5  # ReLU's half and dropout's tenth of the rest
