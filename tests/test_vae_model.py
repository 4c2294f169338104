"""The beta-VAE family: shapes and size, the output-bias prior, the losses against torch references and closed
forms, class weights, the capacity, beta-TCVAE and FactorVAE objectives, and MIG on codes whose answer is known."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from model import (BetaVAE, TCDiscriminator, capacity_at, class_weights, discriminator_loss, focal_loss, kl_per_dim,
                   mig, mig_per_factor, permute_latents, total_correlation, vae_objective)


def test_shapes_parameter_count_and_prior_bias():
    model = BetaVAE(2)
    # conv 2-32-32-64-64, 1024->256->20 | 10->256->1024, deconv 64-64-32-32-2 (the dSprites net, one-hot input)
    convs = (2 * 32 + 32 * 32 + 32 * 64 + 64 * 64) * 16 + 32 + 32 + 64 + 64
    deconvs = (64 * 64 + 64 * 32 + 32 * 32 + 32 * 2) * 16 + 64 + 32 + 32 + 2
    linears = 1024 * 256 + 256 + 256 * 20 + 20 + 10 * 256 + 256 + 256 * 1024 + 1024
    assert sum(p.numel() for p in model.parameters()) == convs + deconvs + linears == 765_270
    model = BetaVAE(10, image_size=32, latent_dim=6, class_frequencies=[0.9] + [0.1 / 9] * 9).eval()
    logits, mu, logvar = model(torch.randint(0, 10, (3, 32, 32)))
    assert logits.shape == (3, 10, 32, 32) and mu.shape == logvar.shape == (3, 6)
    bias = model.decoder[-1].bias
    assert torch.allclose(F.softmax(bias, 0), torch.tensor([0.9] + [0.1 / 9] * 9), atol=1e-6)
    with pytest.raises(ValueError, match='multiple of 16'):
        BetaVAE(2, image_size=30)


def test_eval_mode_decodes_the_mean_and_training_samples():
    torch.manual_seed(0)
    model = BetaVAE(3, image_size=16, latent_dim=4)
    x = torch.randint(0, 3, (2, 16, 16))
    model.eval()
    logits, mu, _ = model(x)
    assert torch.equal(logits, model.decode(mu))
    model.train()
    assert not torch.equal(model(x)[0], logits)


def test_kl_per_dim_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    reference = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros(7), torch.ones(7)))
    assert torch.allclose(kl_per_dim(mu, logvar), reference, atol=1e-6)


def test_focal_loss_gamma_zero_is_summed_cross_entropy_and_the_formula_otherwise():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 5, 6, 6), torch.randint(0, 5, (4, 6, 6))
    ce = F.cross_entropy(logits, y, reduction='none').sum((1, 2))
    assert torch.allclose(focal_loss(logits, y, gamma=0.0), ce, atol=1e-5)
    w, mask = torch.rand(5) + 0.5, (torch.rand(4, 6, 6) > 0.3).float()
    p_t = F.softmax(logits, 1).gather(1, y[:, None])[:, 0]
    by_hand = (w[y] * (1 - p_t) ** 2 * -p_t.log() * mask).sum((1, 2))
    assert torch.allclose(focal_loss(logits, y, gamma=2.0, weight=w, mask=mask), by_hand, atol=1e-5)
    # weights are summed per pixel, not renormalised by the batch's weight sum (F.cross_entropy's 'mean')
    weighted = F.cross_entropy(logits, y, weight=w, reduction='none').sum((1, 2))
    assert torch.allclose(focal_loss(logits, y, weight=w), weighted, atol=1e-5)


def test_class_weights_each_method_and_mean_one():
    counts = torch.tensor([930.0, 40.0, 20.0, 10.0])  # N = 1000, C = 4
    freq = counts / 1000
    inverse = class_weights(counts, 'inverse')
    assert torch.allclose(inverse, 1000 / (4 * counts), rtol=1e-6)  # already mean 1 by construction
    raw_sqrt = (1000 / (4 * counts)).sqrt()
    assert torch.allclose(class_weights(counts, 'sqrt_inverse'), raw_sqrt / (freq * raw_sqrt).sum(), rtol=1e-6)
    raw_median = freq.median() / freq  # torch's median of an even count is the lower middle value: 0.02
    assert torch.allclose(class_weights(counts, 'balanced'), raw_median / (freq * raw_median).sum(), rtol=1e-6)
    for method in ('inverse', 'sqrt_inverse', 'balanced'):
        assert math.isclose(float((freq * class_weights(counts, method)).sum()), 1.0, rel_tol=1e-6)
    # seed 002's numbers: 93% background, 7% objects -> inverse 13.3:1 per class pair here, sqrt its root
    two = class_weights([93, 7], 'inverse')
    assert math.isclose(float(two[1] / two[0]), 93 / 7, rel_tol=1e-5)
    assert math.isclose(float((lambda s: s[1] / s[0])(class_weights([93, 7], 'sqrt_inverse'))), math.sqrt(93 / 7),
                        rel_tol=1e-5)
    absent = class_weights([90, 10, 0], 'inverse')
    assert absent[2] == absent.max() and math.isclose(float(0.9 * absent[0] + 0.1 * absent[1]), 1.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="class_weight_method='median'"):
        class_weights(counts, 'median')


def test_capacity_objective():
    recon, kl = torch.tensor(100.0), torch.tensor(7.0)
    assert torch.equal(vae_objective(recon, kl, 'capacity', capacity=0.0, capacity_gamma=30.0), recon + 30.0 * kl)
    assert torch.equal(vae_objective(recon, kl, 'capacity', capacity=9.0, capacity_gamma=30.0), recon + 60.0)
    assert torch.equal(vae_objective(recon, kl, 'beta', beta=4.0), recon + 28.0)
    assert capacity_at(0, 25.0, 1000) == 0.0 and capacity_at(500, 25.0, 1000) == 12.5
    assert capacity_at(5000, 25.0, 1000) == 25.0
    with pytest.raises(ValueError, match="objective='elbo'"):
        vae_objective(recon, kl, 'elbo')


def test_total_correlation_against_closed_forms():
    # posteriors of sigma 0.1 around 3,000 codes: the estimate is a kernel density estimate of the codes' TC.
    # Gaussian codes: the smoothed distribution N(0, S + sigma^2 I) has TC = -log(1 - rho'^2) / 2 exactly
    torch.manual_seed(0)
    n, sigma = 3000, 0.1
    posterior_logvar = torch.full((n, 2), math.log(sigma ** 2))
    independent = torch.randn(n, 2)
    correlated = independent @ torch.tensor([[1.0, 0.9], [0.0, math.sqrt(1 - 0.81)]])  # unit variances, rho 0.9
    rho = 0.9 / (1 + sigma ** 2)
    assert abs(total_correlation(independent, posterior_logvar, 10 ** 6).item()) < 0.1
    assert total_correlation(correlated, posterior_logvar, 10 ** 6).item() == pytest.approx(
        -0.5 * math.log(1 - rho ** 2), abs=0.06)
    # the sprites' case: independent x, y uniform on a square. Turned by 45 degrees each latent's marginal is
    # triangular: TC = 2 h(triangle) - h(square) = 2 (1/2 + log sqrt 6) - log 12 = 0.31 nats (the estimate reads
    # ~0.2: the square's edges blur under the kernel). beta-VAE's KL is the same for both codes (the prior is
    # isotropic); only the TC term tells the aligned code from the turned one.
    square = (torch.rand(n, 2) * 2 - 1) * math.sqrt(3)  # unit variances
    turned = square @ torch.tensor([[1.0, 1.0], [-1.0, 1.0]]) / math.sqrt(2)
    assert abs(total_correlation(square, posterior_logvar, 10 ** 6).item()) < 0.05
    assert 0.15 < total_correlation(turned, posterior_logvar, 10 ** 6).item() < 1 + math.log(6) - math.log(12)
    assert torch.allclose(kl_per_dim(square, posterior_logvar).sum(1).mean(),
                          kl_per_dim(turned, posterior_logvar).sum(1).mean(), rtol=0.05)
    # x_i's own posterior has weight 1/N: a batch that is the whole data set is the exact mixture
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    torch.manual_seed(1)
    estimate = total_correlation(mu, logvar, 5)
    torch.manual_seed(1)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    posteriors = Normal(mu[None], (0.5 * logvar[None]).exp())
    log_joint = torch.logsumexp(posteriors.log_prob(z[:, None]).sum(2), 1) - math.log(5)
    log_marginals = (torch.logsumexp(posteriors.log_prob(z[:, None]), 1) - math.log(5)).sum(1)
    assert torch.allclose(estimate, (log_joint - log_marginals).mean(), atol=1e-5)
    recon, kl, tc = torch.tensor(100.0), torch.tensor(7.0), torch.tensor(2.0)
    assert torch.equal(vae_objective(recon, kl, 'tc', beta=6.0, tc=tc), recon + kl + 5.0 * tc)


def test_factor_discriminator_learns_the_total_correlation():
    # permute_latents shuffles each latent on its own: every column keeps its values, the rows are new
    torch.manual_seed(0)
    z = torch.randn(500, 3)
    shuffled = permute_latents(z)
    assert torch.equal(shuffled.sort(0).values, z.sort(0).values) and (shuffled != z).all(1).float().mean() > 0.9
    # trained on the square turned by 45 degrees (TC 0.31 nats, see above) the discriminator's mean logit on the
    # joint reads the TC; on the aligned square (independent latents) ~0
    def trained_estimate(rotation):
        torch.manual_seed(1)
        discriminator = TCDiscriminator(2, hidden=64, n_layers=3)
        opt = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
        draw = lambda n: (torch.rand(n, 2) * 2 - 1) * math.sqrt(3) @ rotation  # noqa: E731
        for _ in range(600):
            opt.zero_grad()
            discriminator_loss(discriminator, draw(512)).backward()
            opt.step()
        with torch.no_grad():
            return discriminator(draw(20_000)).mean().item()
    assert abs(trained_estimate(torch.eye(2))) < 0.05
    assert 0.15 < trained_estimate(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]) / math.sqrt(2)) < 0.5
    # the encoder's gradient flows through the discriminator; discriminator_loss trains the discriminator only
    z = torch.randn(8, 2, requires_grad=True)
    discriminator_loss(TCDiscriminator(2, hidden=16), z).backward()
    assert z.grad is None
    recon, kl, tc = torch.tensor(100.0), torch.tensor(7.0), torch.tensor(0.5)
    assert torch.equal(vae_objective(recon, kl, 'factor', beta=1.0, tc=tc, factor_gamma=30.0), recon + kl + 15.0)
    assert torch.equal(vae_objective(recon, kl, 'factor', beta=4.0, tc=tc, factor_gamma=30.0), recon + 4 * kl + 15.0)


def factor_grid(sizes):
    """Every combination of the factor values (N, K): independent factors, no sampling noise between them."""
    return np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing='ij'), -1).reshape(-1, len(sizes))


def test_mig_perfect_random_permuted_and_constant_factor():
    factors = factor_grid((1, 3, 6, 20, 8))
    codes = factors[:, 1:].astype(float) * np.array([1.0, 0.3, -2.0, 5.0])  # one latent per factor, rescaled
    assert math.isclose(mig(codes, factors), 1.0, rel_tol=1e-12)  # the constant factor (colour) is left out
    codes = np.concatenate([codes, np.random.default_rng(0).normal(size=(len(codes), 2)) * 1e-3], 1)  # + 2 noise
    assert mig(codes, factors) > 0.97  # noise latents carry a little chance information (finite sample)
    assert sorted(mig_per_factor(codes, factors)) == [1, 2, 3, 4]
    permuted = codes[:, np.random.default_rng(1).permutation(codes.shape[1])]
    assert math.isclose(mig(permuted, factors), mig(codes, factors), rel_tol=1e-12)
    random = np.random.default_rng(2).normal(size=(len(factors), 6))
    assert abs(mig(random, factors)) < 0.03
    # a factor shared equally by two latents has no gap
    doubled = np.concatenate([codes[:, :1], codes[:, :1]], 1)
    assert mig(doubled, factors[:, 1:2]) == 0.0


def test_mig_with_40_values_and_20_bins_is_below_one():
    factors = factor_grid((40, 6))  # 40 orientations cannot fit 20 bins: two values share each bin
    score = mig_per_factor(factors.astype(float), factors)[0]
    assert math.isclose(score, math.log(20) / math.log(40), rel_tol=1e-9)


def test_mig_of_a_rotated_position_code_falls_to_zero():
    # what the README reports for the sprites: a rotated (x, y) code loses MIG although it holds all the information
    factors = factor_grid((32, 32))
    scores = []
    for degrees in (0, 15, 30, 45):
        a = math.radians(degrees)
        rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        scores.append(mig(factors.astype(float) @ rotation, factors))
    assert scores[0] > 0.8 and scores == sorted(scores, reverse=True) and scores[-1] < 0.01
