"""SPOTER model: the original's parameter count, padded-batch equivalence, the frame-order property of
positional 'single' (SPOTER issue #12), and the encoder layer against torch's reference layer."""
import pytest
import torch
import torch.nn as nn

from model import SPOTER, SPOTERDecoderLayer, SPOTEREncoderLayer


def test_parameter_count_matches_the_original_without_its_unused_row_embed():
    assert sum(p.numel() for p in SPOTER(100).parameters()) == 5_922_772 - 5_400
    learned = SPOTER(100, pos_embedding='learned', max_frames=150)
    assert sum(p.numel() for p in learned.parameters()) == 5_917_372 + 149 * 108
    assert all(not hasattr(layer, 'self_attn') for layer in SPOTER(10).decoder)  # decoder: cross-attention only


@pytest.mark.parametrize('pos_embedding', ['single', 'learned'])
def test_padded_batch_gives_each_clip_its_own_logits(pos_embedding):
    torch.manual_seed(0)
    model = SPOTER(12, pos_embedding=pos_embedding, max_frames=64).eval()
    if pos_embedding == 'learned':  # make frame positions differ, so a wrong offset would show
        model.pos.data += 0.1 * torch.randn_like(model.pos)
    lengths = [20, 35, 60, 7]
    clips = [torch.rand(n, 54, 2) for n in lengths]
    batch = torch.rand(len(clips), max(lengths), 54, 2) * 5  # garbage in the padding: the mask must hide it
    pad_mask = torch.ones(len(clips), max(lengths), dtype=torch.bool)
    for i, clip in enumerate(clips):
        batch[i, :len(clip)], pad_mask[i, :len(clip)] = clip, False
    with torch.no_grad():
        batched = model(batch, pad_mask)
        alone = torch.cat([model(clip[None]) for clip in clips])
        _, attention = model.features(batch, pad_mask)
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(attention.sum(-1), torch.ones(len(clips)), atol=1e-5)
    assert attention.masked_select(pad_mask).abs().max() == 0  # no weight on padded frames


def test_single_positional_vector_ignores_frame_order_and_learned_does_not():
    torch.manual_seed(1)
    clip, order = torch.rand(1, 30, 54, 2), torch.randperm(30)
    single = SPOTER(5).eval()
    learned = SPOTER(5, pos_embedding='learned', max_frames=30).eval()
    learned.pos.data += 0.5 * torch.randn_like(learned.pos)
    with torch.no_grad():
        assert torch.allclose(single(clip), single(clip[:, order]), atol=1e-5)  # issue #12: no frame order
        assert not torch.allclose(learned(clip), learned(clip[:, order]), atol=1e-3)


def test_encoder_layer_equals_torch_reference_layer():
    """Our post-norm encoder layer computes what nn.TransformerEncoderLayer (the original's) computes."""
    torch.manual_seed(2)
    ours = SPOTEREncoderLayer(108, 9, 2048, 0.1).eval()
    reference = nn.TransformerEncoderLayer(108, 9, 2048, 0.1, batch_first=True).eval()
    reference.load_state_dict(ours.state_dict())  # same parameter names as torch's layer
    x, pad_mask = torch.randn(3, 25, 108), torch.zeros(3, 25, dtype=torch.bool)
    pad_mask[1, 20:] = True
    with torch.no_grad():
        expected = reference(x, src_key_padding_mask=pad_mask)
        got = ours(x, pad_mask)
    keep = ~pad_mask  # torch's fast path may zero padded rows; real frames must agree
    assert torch.allclose(got[keep], expected[keep], atol=1e-5)


def test_clip_longer_than_max_frames_is_refused():
    with pytest.raises(ValueError, match='max_frames=16'):
        SPOTER(3, pos_embedding='learned', max_frames=16)(torch.rand(1, 17, 54, 2))


@pytest.mark.parametrize('self_attention', [True, False])
def test_attention_computes_what_multihead_attention_computes(self_attention):
    """model.attention runs nn.MultiheadAttention's parameters: the same outputs and head-averaged weights (eval;
    padded keys included), so the original's weights give the original's logits."""
    from model import attention
    torch.manual_seed(3)
    attn = nn.MultiheadAttention(108, 9, dropout=0.1, batch_first=True).eval()
    memory = torch.randn(3, 25, 108)
    query = memory if self_attention else torch.randn(3, 1, 108)
    pad_mask = torch.zeros(3, 25, dtype=torch.bool)
    pad_mask[1, 20:] = True
    with torch.no_grad():
        expected, expected_weights = attn(query, memory, memory, key_padding_mask=pad_mask)
        got, weights = attention(attn, query, memory, pad_mask, training=False, need_weights=True)
    keep = ~pad_mask if self_attention else torch.ones(3, 1, dtype=torch.bool)
    assert torch.allclose(got[keep], expected[keep], atol=1e-5)
    assert torch.allclose(weights, expected_weights, atol=1e-6) and (weights[1, :, 20:] == 0).all()


def test_decoder_layer_equals_the_originals_formula():
    """The original's decoder layer: t = norm1(t + dropout(t)); cross-attention by nn.MultiheadAttention; MLP."""
    torch.manual_seed(4)
    layer = SPOTERDecoderLayer(108, 9, 2048, 0.1).eval()
    query, memory = torch.randn(3, 1, 108), torch.randn(3, 25, 108)
    pad_mask = torch.zeros(3, 25, dtype=torch.bool)
    pad_mask[2, 10:] = True
    with torch.no_grad():
        t = layer.norm1(query + query)  # dropout is the identity in eval
        t = layer.norm2(t + layer.cross_attn(t, memory, memory, key_padding_mask=pad_mask)[0])
        expected = layer.norm3(t + layer.linear2(torch.relu(layer.linear1(t))))
        got, _ = layer(query, memory, pad_mask)
    assert torch.allclose(got, expected, atol=1e-5)
