"""Audio models: the spec's parameter counts, CBAM against a literal loop implementation, the CRNN's pooling, the
metrics against hand-computed cases, and the distillation loss against its formula."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from model import CBAM, CRNN, TinyCNN, TinyCNN_CBAM, audio_model, confusion_matrix, kd_loss, macro_f1, \
    per_class_scores


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_spec():
    assert n_params(TinyCNN(3)) == 23_491
    assert n_params(CRNN(3)) == 73_411
    assert n_params(TinyCNN_CBAM(3, reduction=8, kernel_size=3)) == 23_801
    extra = {4: 552, 8: 292, 16: 162}, {3: 18, 7: 98, 11: 242}  # the spec's CBAM table: 2C*h + h + C, 2k^2
    for r, k in itertools.product([4, 8, 16], [3, 7, 11]):
        assert n_params(CBAM(32, r, k)) == extra[0][r] + extra[1][k]
        assert n_params(audio_model('tinycnn_cbam', 3, r, k)) == 23_491 + extra[0][r] + extra[1][k]


def literal_cbam(cbam, x):
    """CBAM computed element by element from its definition, with the module's weights."""
    B, C, H, W = x.shape
    w1, b1, w2, b2 = cbam.mlp[0].weight, cbam.mlp[0].bias, cbam.mlp[2].weight, cbam.mlp[2].bias
    kernel = cbam.spatial.weight[0]  # (2, k, k)
    k = kernel.shape[-1]
    out = torch.zeros_like(x)
    for b in range(B):
        pooled = [torch.tensor([x[b, c].mean() for c in range(C)]), torch.tensor([x[b, c].max() for c in range(C)])]
        mlp = [w2 @ torch.relu(w1 @ v + b1) + b2 for v in pooled]
        channel = x[b] * torch.sigmoid(mlp[0] + mlp[1])[:, None, None]
        maps = torch.stack([channel.mean(0), channel.max(0).values])  # (2, H, W)
        for i, j in itertools.product(range(H), range(W)):
            acc = 0.0
            for m, di, dj in itertools.product(range(2), range(k), range(k)):
                ii, jj = i + di - k // 2, j + dj - k // 2
                if 0 <= ii < H and 0 <= jj < W:  # zero padding
                    acc += kernel[m, di, dj] * maps[m, ii, jj]
            out[b, :, i, j] = channel[:, i, j] * torch.sigmoid(acc)
    return out


@pytest.mark.parametrize('reduction,kernel', [(8, 3), (4, 7)])
def test_cbam_matches_a_literal_implementation(reduction, kernel):
    torch.manual_seed(0)
    cbam, x = CBAM(8, reduction, kernel), torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        assert torch.allclose(cbam(x), literal_cbam(cbam, x), atol=1e-5)


def test_cbam_sits_after_block_two_and_shapes_flow():
    model = TinyCNN_CBAM(3, 8, 3)
    assert isinstance(model.features[6], CBAM) and isinstance(model.features[5], torch.nn.MaxPool2d)
    assert model(torch.randn(2, 1, 64, 501)).shape == (2, 3)


def test_crnn_pools_the_last_step_or_the_mean():
    torch.manual_seed(0)
    last, mean = CRNN(3, rnn_pool='last'), CRNN(3, rnn_pool='mean')
    mean.load_state_dict(last.state_dict())
    x = torch.randn(2, 1, 64, 101)
    steps, _ = last.rnn(last.features(x).mean(dim=2).transpose(1, 2))  # (B, T/4, 64)
    assert steps.shape == (2, 25, 64)
    assert torch.allclose(last(x), last.head(steps[:, -1])) and torch.allclose(mean(x), last.head(steps.mean(1)))
    with pytest.raises(ValueError, match="rnn_pool='max'"):
        CRNN(3, rnn_pool='max')


def test_confusion_and_macro_f1_by_hand():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 2])
    confusion = confusion_matrix(predictions, targets, 3)
    assert confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # F1: class 0 = 2*2/(4+0+1) = 0.8; class 1 = 2/(2+1+1) = 0.5; class 2 = 2/(2+1+0) = 2/3
    precision, recall, f1 = per_class_scores(confusion)
    assert torch.allclose(f1, torch.tensor([0.8, 0.5, 2 / 3], dtype=torch.float64))
    assert torch.allclose(precision, torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64))
    assert abs(macro_f1(confusion) - (0.8 + 0.5 + 2 / 3) / 3) < 1e-12
    # always predicting the majority class: F1 0 for the others (a collapsed model scores ~0.23-0.33, not its acc)
    collapsed = confusion_matrix(torch.zeros(6, dtype=torch.long), targets, 3)
    assert abs(macro_f1(collapsed) - (2 * 3 / (6 + 3)) / 3) < 1e-12
    # a class never present nor predicted: F1 0 by definition (denominator 0), no NaN
    assert per_class_scores(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3))[2].tolist() == [1, 1, 0]


def test_kd_loss_against_its_formula():
    torch.manual_seed(0)
    student, teacher, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    w = torch.tensor([1.0, 1.5, 5.5])
    loss, kd, ce = kd_loss(student, teacher, y, alpha=0.0, temperature=4.0, class_weights=w)
    assert torch.equal(loss, F.cross_entropy(student, y, weight=w))  # alpha 0: the weighted CE exactly
    assert kd_loss(teacher, teacher, y, 0.5, 3.0)[1].abs().item() < 1e-6  # student == teacher: no KD term
    for T in (1.0, 3.0, 5.0):  # batchmean: summed over classes, averaged over the batch, times T^2
        p_t, log_p_s = F.softmax(teacher / T, -1), F.log_softmax(student / T, -1)
        by_hand = (p_t * (p_t.log() - log_p_s)).sum() / 5 * T ** 2
        loss, kd, ce = kd_loss(student, teacher, y, alpha=0.3, temperature=T)
        assert torch.allclose(kd, by_hand, atol=1e-6)
        assert torch.allclose(loss, 0.3 * by_hand + 0.7 * F.cross_entropy(student, y), atol=1e-6)


def test_the_crnn_runs_its_gru_in_float32_under_autocast():
    """Autocast would hand the GRU the convs' half-precision output (on CUDA: cuDNN's GRU in fp16, no loss scaling);
    the CRNN turns autocast off around it and gives it float32."""
    torch.manual_seed(0)
    net, seen = CRNN().eval(), []
    net.rnn.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output[0].dtype)))
    x = torch.randn(2, 1, 64, 40)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        net(x)
        features = net.features(x)
    assert features.dtype == torch.bfloat16  # autocast is on for the convs
    assert seen == [(torch.float32, torch.float32)]
