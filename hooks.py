"""
Hooks for learning-dynamics experiments, toggled by the `hooks` config key: a list of 'name' or
'name:param=value,param=value' strings, e.g. hooks = ['act_stats', 'grad_noise:std=0.01,gamma=0.55'].

- forward hooks are read-only: at eval time they record statistics into the facts (the eval event) and
  never change an output value;
- update hooks transform the gradients between backward() and optimizer.step(), in the listed order;
  with none (or 'identity') training is bitwise what it is without this module.
The resolved list (every parameter spelled out) goes to config.json and into config_hash.
"""
import ast
import inspect
import math

import torch
import torch.nn.functional as F

from common import UserError

# -----------------------------------------------------------------------------
# forward hooks: (model, stats) -> list of torch hook handles; each writes floats into the stats dict
# -----------------------------------------------------------------------------


def act_stats(model, stats):
    """Mean, std and abs-max of each transformer block's output (the residual stream)."""
    def record(name):
        def hook(module, inputs, output):
            x = output.detach().float()
            stats[f'{name}/mean'], stats[f'{name}/std'], stats[f'{name}/absmax'] = \
                x.mean().item(), x.std().item(), x.abs().max().item()
        return hook
    return [block.register_forward_hook(record(f'act/block{i}')) for i, block in enumerate(model.blocks)]


def attn_entropy(model, stats):
    """Mean entropy (nats) of each layer's causal attention distribution, recomputed from the q, k it makes;
    ln(position + 1) would be uniform attention, 0 attention to one token."""
    def record(name, attn):
        def hook(module, inputs, qkv):
            B, T, _ = qkv.shape
            q, k, _ = qkv.detach().float().split(attn.n_embd, dim=2)
            q, k = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in (q, k))  # (B, nh, T, hs)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
            mask = torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1)
            logp = F.log_softmax(scores.masked_fill(mask, -float('inf')), dim=-1)
            stats[name] = -(logp.exp() * logp.masked_fill(mask, 0.0)).sum(-1).mean().item()
        return hook
    return [block.attn.c_attn.register_forward_hook(record(f'attn_entropy/layer{i}', block.attn))
            for i, block in enumerate(model.blocks)]


# -----------------------------------------------------------------------------
# update hooks: objects with __call__(params, step) acting on p.grad in place, and state_dict for resume
# -----------------------------------------------------------------------------


class Identity:
    """Leaves every gradient as it is: the control of an update-rule experiment."""

    def __call__(self, params, step):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class ClipGradNorm(Identity):
    """Rescales all gradients together so their global L2 norm is at most max_norm."""

    def __init__(self, max_norm=1.0):
        self.max_norm = max_norm

    def __call__(self, params, step):
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


class GradNoise(Identity):
    """Adds N(0, sigma_t^2) to every gradient, sigma_t = std / (1 + step)^gamma (Neelakantan et al. 2015 anneal
    sigma^2 = eta / (1 + t)^0.55); its own seeded generator, saved in checkpoints, so runs are reproducible."""

    def __init__(self, std=0.01, gamma=0.0, seed=0):
        self.std, self.gamma, self.seed = std, gamma, seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, params, step):
        sigma = self.std / (1 + step) ** self.gamma
        for p in params:
            if p.grad is not None:  # noise drawn on the CPU generator so every device gives the same numbers
                p.grad.add_(torch.randn(p.grad.shape, generator=self.generator).to(p.grad.device), alpha=sigma)

    def state_dict(self):
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])


FORWARD_HOOKS = {'act_stats': act_stats, 'attn_entropy': attn_entropy}
UPDATE_HOOKS = {'identity': Identity, 'clip_grad_norm': ClipGradNorm, 'grad_noise': GradNoise}


def resolve(specs):
    """['grad_noise:std=0.1'] -> ['grad_noise:std=0.1,gamma=0.0,seed=0']: every parameter spelled out, so two
    runs with the same resolved list ran the same hooks. Unknown names and parameters are errors."""
    resolved = []
    for spec in specs:
        name, _, args = spec.partition(':')
        if name in FORWARD_HOOKS:
            if args:
                raise UserError(f"hook '{name}' takes no parameters, got '{args}'")
            resolved.append(name)
            continue
        if name not in UPDATE_HOOKS:
            raise UserError(f"unknown hook '{name}'; known hooks: {', '.join([*FORWARD_HOOKS, *UPDATE_HOOKS])}")
        defaults = {p.name: p.default for p in inspect.signature(UPDATE_HOOKS[name]).parameters.values()}
        params = dict(defaults)
        for item in filter(None, args.split(',')):
            key, _, value = item.partition('=')
            if key not in defaults:
                raise UserError(f"hook '{name}' has no parameter '{key}'; it takes: {', '.join(defaults) or 'none'}")
            kind = type(defaults[key])
            try:
                parsed = ast.literal_eval(value)
                if isinstance(parsed, (bool, str)) or kind(parsed) != parsed:  # std=1 is fine, seed=1.5 is not
                    raise ValueError
            except (ValueError, TypeError, SyntaxError):
                raise UserError(f"hook '{name}': parameter '{key}' takes a {kind.__name__}, got '{value}'") from None
            params[key] = kind(parsed)
        resolved.append(name + (':' + ','.join(f'{k}={v!r}' for k, v in params.items()) if params else ''))
    return resolved


class Hooks:
    """The hooks of one run, built from the resolved list."""

    def __init__(self, resolved):
        self.forward = [FORWARD_HOOKS[s] for s in resolved if s in FORWARD_HOOKS]
        self.update = []
        for spec in resolved:
            name, _, args = spec.partition(':')
            if name in UPDATE_HOOKS:
                params = {k: ast.literal_eval(v) for k, v in (a.split('=', 1) for a in filter(None, args.split(',')))}
                self.update.append(UPDATE_HOOKS[name](**params))

    def record(self, model, forward):
        """Run forward() with the forward hooks attached; return (its result, the statistics they recorded)."""
        stats = {}
        handles = [h for install in self.forward for h in install(model, stats)]
        try:
            out = forward()
        finally:
            for h in handles:
                h.remove()
        return out, stats

    def apply_update(self, params, step):
        for hook in self.update:
            hook(params, step)

    def state_dict(self):
        return [h.state_dict() for h in self.update]

    def load_state_dict(self, states):
        for hook, state in zip(self.update, states):
            hook.load_state_dict(state)
