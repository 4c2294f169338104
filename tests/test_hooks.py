"""hooks.py: resolving the hook list, read-only forward hooks (checked against hand-computed statistics and a
closed form), and the update hooks (identity = no hook bitwise, gradient clipping, seeded gradient noise)."""
import io
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.nn.functional as F

import hooks
from common import UserError
from hooks import ClipGradNorm, GradNoise, Hooks, resolve
from model import CharTransformer, TransformerConfig, lm_loss

CFG = dict(vocab_size=99, block_size=16, n_layer=2, n_head=2, n_embd=32, d_ff=64)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return CharTransformer(TransformerConfig(**{**CFG, **overrides}))


# -----------------------------------------------------------------------------
# resolve
# -----------------------------------------------------------------------------


@pytest.mark.parametrize('specs, expected', [
    ([], []),
    (['act_stats'], ['act_stats']),
    (['act_stats', 'attn_entropy'], ['act_stats', 'attn_entropy']),
    (['identity'], ['identity']),
    (['grad_noise:std=0.1'], ['grad_noise:std=0.1,gamma=0.0,seed=0']),
    (['grad_noise:seed=3,gamma=0.55'], ['grad_noise:std=0.01,gamma=0.55,seed=3']),
    (['grad_noise'], ['grad_noise:std=0.01,gamma=0.0,seed=0']),
    (['clip_grad_norm'], ['clip_grad_norm:max_norm=1.0']),
    (['clip_grad_norm:max_norm=2', 'act_stats'], ['clip_grad_norm:max_norm=2.0', 'act_stats']),
])
def test_resolve(specs, expected):
    assert resolve(specs) == expected
    assert resolve(resolve(specs)) == expected  # idempotent: the resolved list resolves to itself


def test_resolve_converts_int_to_float():
    (spec,) = resolve(['grad_noise:std=1,gamma=1'])
    assert spec == 'grad_noise:std=1.0,gamma=1.0,seed=0'
    (hook,) = Hooks([spec]).update
    assert type(hook.std) is float and type(hook.gamma) is float and type(hook.seed) is int
    assert (hook.std, hook.gamma, hook.seed) == (1.0, 1.0, 0)


def test_hooks_built_from_resolved_list():
    h = Hooks(resolve(['act_stats', 'grad_noise:std=0.2,gamma=0.55,seed=4', 'clip_grad_norm:max_norm=0.5']))
    assert h.forward == [hooks.act_stats]
    assert [type(u) for u in h.update] == [GradNoise, ClipGradNorm]
    assert (h.update[0].std, h.update[0].gamma, h.update[0].seed) == (0.2, 0.55, 4)
    assert h.update[1].max_norm == 0.5


def test_resolve_unknown_hook_lists_known_ones():
    with pytest.raises(UserError) as err:
        resolve(['act_stats', 'grad_nosie:std=0.1'])
    message = str(err.value)
    assert 'grad_nosie' in message
    for name in ('act_stats', 'attn_entropy', 'identity', 'clip_grad_norm', 'grad_noise'):
        assert name in message


def test_resolve_unknown_parameter_lists_the_hooks_parameters():
    with pytest.raises(UserError) as err:
        resolve(['grad_noise:sigma=0.1'])
    message = str(err.value)
    assert 'sigma' in message
    for name in ('std', 'gamma', 'seed'):
        assert name in message
    with pytest.raises(UserError, match='none'):
        resolve(['identity:x=1'])


@pytest.mark.parametrize('spec', ['act_stats:every=2', 'attn_entropy:x=1'])
def test_resolve_forward_hook_with_parameters_raises(spec):
    with pytest.raises(UserError, match=spec.split(':')[0]):
        resolve([spec])


@pytest.mark.parametrize('spec', ['grad_noise:std=abc', 'grad_noise:std', 'grad_noise:std=[1]'])
def test_resolve_malformed_value_is_user_error(spec):
    with pytest.raises(UserError):
        resolve([spec])


def test_resolve_lossy_conversion_is_user_error():
    with pytest.raises(UserError):
        resolve(['grad_noise:seed=1.5'])


# -----------------------------------------------------------------------------
# update hooks: identity is no hook, bitwise
# -----------------------------------------------------------------------------


def train_three_steps(hookset):
    model = tiny_model(seed=1, dropout=0.1).train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 99, (4, 17), generator=gen) for _ in range(3)]
    torch.manual_seed(3)  # dropout draws
    for step, batch in enumerate(batches):
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        if hookset is not None:
            hookset.apply_update(params, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def test_identity_update_hook_is_bitwise_no_hook():
    none = train_three_steps(None)
    empty = train_three_steps(Hooks(resolve([])))
    identity = train_three_steps(Hooks(resolve(['identity'])))
    initial = tiny_model(seed=1)
    moved = False
    for (name, p), q, r, p0 in zip(none.named_parameters(), empty.parameters(), identity.parameters(),
                                   initial.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), name
        moved = moved or not torch.equal(p, p0)
    assert moved  # training did something
    # a real update hook does change the result (the comparison can fail)
    noisy = train_three_steps(Hooks(resolve(['grad_noise:std=0.1'])))
    assert not all(torch.equal(p, q) for p, q in zip(none.parameters(), noisy.parameters()))


# -----------------------------------------------------------------------------
# forward hooks: read-only, statistics equal a hand computation
# -----------------------------------------------------------------------------


def block_outputs(model, idx):
    """Each block's output, computed by running the model's pieces by hand (eval mode: no dropout)."""
    pos = torch.arange(idx.size(1))
    x = model.wte(idx) + model.wpe(pos)
    outs = []
    for block in model.blocks:
        x = block(x)
        outs.append(x)
    return outs


def assert_no_hooks(model):
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name


def test_forward_hooks_change_no_output_and_record_stats():
    model = tiny_model(seed=4).eval()
    idx = torch.randint(0, 99, (3, 16))
    hookset = Hooks(resolve(['act_stats', 'attn_entropy']))
    with torch.no_grad():
        plain = model(idx)
        logits, stats = hookset.record(model, lambda: model(idx))
        assert_no_hooks(model)
        after = model(idx)
        expected = block_outputs(model, idx)
    assert torch.equal(logits, plain) and torch.equal(after, plain)
    assert set(stats) == {f'act/block{i}/{s}' for i in range(2) for s in ('mean', 'std', 'absmax')} | \
        {f'attn_entropy/layer{i}' for i in range(2)}
    assert all(type(v) is float for v in stats.values())
    for i, out in enumerate(expected):
        assert stats[f'act/block{i}/mean'] == pytest.approx(out.mean().item(), rel=1e-5, abs=1e-7)
        assert stats[f'act/block{i}/std'] == pytest.approx(out.std().item(), rel=1e-5)
        assert stats[f'act/block{i}/absmax'] == pytest.approx(out.abs().max().item(), rel=1e-6)
    # the blocks differ, so a mixed-up key would show
    assert stats['act/block0/std'] != stats['act/block1/std']


def test_forward_hooks_removed_even_if_forward_raises():
    model = tiny_model().eval()
    hookset = Hooks(resolve(['act_stats', 'attn_entropy']))

    def bad():
        model(torch.randint(0, 99, (1, 8)))
        raise RuntimeError('boom')
    with pytest.raises(RuntimeError, match='boom'):
        hookset.record(model, bad)
    assert_no_hooks(model)


def test_record_without_forward_hooks_returns_output_and_no_stats():
    model = tiny_model().eval()
    idx = torch.randint(0, 99, (1, 8))
    with torch.no_grad():
        out, stats = Hooks(resolve(['grad_noise'])).record(model, lambda: model(idx))
        assert torch.equal(out, model(idx))
    assert stats == {}


def test_attn_entropy_uniform_attention_closed_form():
    model = tiny_model(seed=5).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_attn.weight.zero_()  # q = k = 0: uniform attention over the causal prefix
        T = 12
        _, stats = Hooks(['attn_entropy']).record(model, lambda: model(torch.randint(0, 99, (2, T))))
    expected = sum(math.log(t + 1) for t in range(T)) / T
    for i in range(2):
        assert stats[f'attn_entropy/layer{i}'] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_attn_entropy_is_the_entropy_of_the_attention_the_model_uses():
    """Random weights: rebuild layer 0's attention probabilities P by hand, check that P @ v reproduces the
    module's output (so P is the distribution the model uses), and that the hook reports P's mean entropy."""
    model = tiny_model(seed=6).eval()
    with torch.no_grad():
        model.blocks[0].attn.c_attn.weight.mul_(20.0)  # sharpen attention away from uniform
        idx = torch.randint(0, 99, (2, 16))
        _, stats = Hooks(['attn_entropy']).record(model, lambda: model(idx))
        attn = model.blocks[0].attn
        x = model.blocks[0].ln_1(model.wte(idx) + model.wpe(torch.arange(16)))
        B, T, C = x.shape
        q, k, v = (t.view(B, T, 2, C // 2).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // 2)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -float('inf'))
        P = F.softmax(scores, dim=-1)
        y = attn.c_proj((P @ v).transpose(1, 2).reshape(B, T, C))
        torch.testing.assert_close(y, attn(x), rtol=1e-4, atol=1e-5)
        entropy = -(P * torch.log(P.clamp_min(1e-30))).sum(-1).mean().item()
    uniform = sum(math.log(t + 1) for t in range(T)) / T
    assert stats['attn_entropy/layer0'] == pytest.approx(entropy, rel=1e-4, abs=1e-5)
    assert 0.0 < stats['attn_entropy/layer0'] < uniform - 0.1  # really not uniform


# -----------------------------------------------------------------------------
# ClipGradNorm
# -----------------------------------------------------------------------------


def params_with_grads(seed, scale):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3, 4), (7,), (2, 2, 5)]]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=g)
    params.append(torch.nn.Parameter(torch.zeros(3)))  # one without a gradient
    return params


def global_norm(params):
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)).item()


def test_clip_grad_norm_clips_to_max_norm():
    params = params_with_grads(0, 10.0)
    before = [p.grad.clone() for p in params[:-1]]
    norm = global_norm(params)
    assert norm > 2.0
    ClipGradNorm(max_norm=2.0)(params, step=0)
    assert global_norm(params) == pytest.approx(2.0, rel=1e-5)
    for p, g in zip(params, before):  # one common factor, max_norm / norm
        torch.testing.assert_close(p.grad, g * (2.0 / norm), rtol=1e-5, atol=1e-7)
    assert params[-1].grad is None


def test_clip_grad_norm_leaves_small_gradients_unchanged():
    params = params_with_grads(1, 0.01)
    before = [p.grad.clone() for p in params[:-1]]
    assert global_norm(params) < 1.0
    Hooks(resolve(['clip_grad_norm'])).apply_update(params, 0)  # max_norm=1.0
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=0)


# -----------------------------------------------------------------------------
# GradNoise
# -----------------------------------------------------------------------------


def expected_noise(params, seed, sigma, skip_draws=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(skip_draws):
        for p in params:
            if p.grad is not None:
                torch.randn(p.shape, generator=g)
    return [sigma * torch.randn(p.shape, generator=g) for p in params if p.grad is not None]


@pytest.mark.parametrize('step', [0, 3])
def test_grad_noise_closed_form(step):
    std, gamma, seed = 0.1, 0.55, 7
    params = params_with_grads(2, 1.0)
    before = [p.grad.clone() for p in params[:-1]]
    GradNoise(std=std, gamma=gamma, seed=seed)(params, step)
    sigma = std / (1 + step) ** gamma
    assert (sigma == std) if step == 0 else sigma == pytest.approx(0.1 / 4 ** 0.55)
    for p, b, n in zip(params, before, expected_noise(params, seed, sigma)):
        torch.testing.assert_close(p.grad - b, n, rtol=1e-5, atol=1e-6)
    assert params[-1].grad is None


def test_grad_noise_is_fresh_each_call_and_annealed():
    params = params_with_grads(3, 0.0)
    hook = GradNoise(std=1.0, gamma=0.55, seed=0)
    hook(params, 0)
    first = [p.grad.clone() for p in params[:-1]]
    for p in params[:-1]:
        p.grad.zero_()
    hook(params, 1)
    second = [p.grad.clone() for p in params[:-1]]
    for a, b in zip(second, expected_noise(params, 0, 1.0 / 2 ** 0.55, skip_draws=1)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(first[0] / 1.0, second[0] * 2 ** 0.55)  # new draws, not the old ones rescaled


def run_noise(hook, params, steps):
    out = []
    for step in steps:
        for p in params[:-1]:
            p.grad.zero_()
        hook(params, step)
        out.append([p.grad.clone() for p in params[:-1]])
    return out


def test_grad_noise_state_dict_round_trip():
    params = params_with_grads(4, 0.0)
    reference = run_noise(GradNoise(std=0.1, gamma=0.55, seed=5), params, range(4))

    first = GradNoise(std=0.1, gamma=0.55, seed=5)
    run_noise(first, params, range(2))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a checkpoint stores it
    run_noise(first, params, range(2, 3))  # the saved state is a snapshot, not a live view
    second = GradNoise(std=0.1, gamma=0.55, seed=999)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    resumed = run_noise(second, params, range(2, 4))
    for got, want in zip(resumed, reference[2:]):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_hooks_object_state_dict_round_trip():
    spec = resolve(['clip_grad_norm:max_norm=100.0', 'grad_noise:std=0.1,gamma=0.55,seed=6'])
    params = params_with_grads(5, 0.0)

    def apply(hookset, steps):
        out = []
        for step in steps:
            for p in params[:-1]:
                p.grad.zero_()
            hookset.apply_update(params, step)
            out.append([p.grad.clone() for p in params[:-1]])
        return out

    reference = apply(Hooks(spec), range(4))
    first = Hooks(spec)
    apply(first, range(2))
    state = first.state_dict()
    assert len(state) == 2 and state[0] == {}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    second = Hooks(spec)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    resumed = apply(second, range(2, 4))
    for got, want in zip(resumed, reference[2:]):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    # without the state a fresh Hooks repeats the noise of step 0's draws instead
    fresh = apply(Hooks(spec), range(2, 3))
    assert not torch.equal(fresh[0][0], reference[2][0])
