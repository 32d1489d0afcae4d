"""SPP-SCL heads (Eq. 1-3): shapes, batch (in)dependence of the fusion modes, padding invariance,
one-sample batches, input checks, and that the full model can fit a small training set."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sppscl.config import TrainConfig
from sppscl.stage2.heads import CrossModalFusion, HierarchicalAttention, SPPSCLModel
from sppscl.stage2.losses import one_step_loss

C, HW, H, L, K = 8, 2, 16, 4, 3


def make_batch(b: int, n: int = 7, c: int = C, layers: int = L, hidden: int = H, seed: int = 0):
    """Random cache-like batch; lengths (incl. [CLS]) between 1 and n, zero padded after them."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, c, HW, HW, generator=g)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n  # at least one full-length row so n is the real width
    mask = torch.arange(n)[None, :] < lengths[:, None]
    tokens = torch.randn(b, n, layers, hidden, generator=g) * mask[:, :, None, None]
    return image, tokens, mask


def make_model(fusion: str = "sample", modalities: str = "both", ha_layers: int = L, dim: int = 8, **kw) -> SPPSCLModel:
    torch.manual_seed(0)
    cfg = TrainConfig(dim=dim, fusion=fusion, modalities=modalities, ha_layers=ha_layers, **kw)
    return SPPSCLModel(image_channels=C, text_hidden=H, cached_layers=L, num_classes=K, cfg=cfg)


def _warm_batchnorm(model: nn.Module, b: int = 16) -> None:
    """Move running statistics away from their (0, 1) init so eval mode is not a trivial identity."""
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(*make_batch(b, seed=100 + seed))
    model.eval()


@pytest.mark.parametrize(
    ("c", "hidden", "layers", "ha_layers", "modalities", "fusion", "fused_dim"),
    [
        (8, 16, 4, 4, "both", "batch", 4 * 8),
        (8, 16, 4, 2, "both", "sample", 4 * 8),
        (5, 12, 6, 1, "both", "concat", 2 * 8),
        (8, 16, 4, 3, "text", "batch", 8),
        (3, 16, 4, 4, "image", "sample", 8),
    ],
)
def test_output_shapes(c, hidden, layers, ha_layers, modalities, fusion, fused_dim) -> None:
    cfg = TrainConfig(dim=8, fusion=fusion, modalities=modalities, ha_layers=ha_layers)
    model = SPPSCLModel(image_channels=c, text_hidden=hidden, cached_layers=layers, num_classes=5, cfg=cfg)
    image, tokens, mask = make_batch(6, c=c, layers=layers, hidden=hidden)
    for mode in (True, False):
        model.train(mode)
        out = model(image if modalities != "text" else None, tokens if modalities != "image" else None, mask)
        assert out.logits.shape == (6, 5) and out.fused.shape == (6, fused_dim) == (6, model.fused_dim)
        assert (out.image_emb is None) == (modalities == "text")
        assert (out.text_emb is None) == (modalities == "image")
        for emb in (out.image_emb, out.text_emb):
            assert emb is None or emb.shape == (6, 8)
        assert torch.isfinite(out.logits).all()


def test_fused_feature_is_mp_in_the_official_order() -> None:
    model = make_model("batch")
    _warm_batchnorm(model)
    out = model(*make_batch(5))
    d = 8
    assert torch.equal(out.fused[:, 2 * d : 3 * d], out.image_emb)
    assert torch.equal(out.fused[:, 3 * d :], out.text_emb)
    fusion = model.fusion
    i_p, t_p = out.image_emb, out.text_emb
    # Eq. 3 written out for the image side (T_m mirrors it)
    a_i = torch.softmax((t_p * fusion.q_i(i_p)) @ (t_p * fusion.k_i(i_p)).T / math.sqrt(d), dim=-1)
    torch.testing.assert_close(out.fused[:, d : 2 * d], a_i @ fusion.v_i(i_p))
    a_t = torch.softmax((i_p * fusion.q_t(t_p)) @ (i_p * fusion.k_t(t_p)).T / math.sqrt(d), dim=-1)
    torch.testing.assert_close(out.fused[:, :d], a_t @ fusion.v_t(t_p))


def test_sample_fusion_attends_over_the_two_modality_tokens() -> None:
    torch.manual_seed(0)
    fusion = CrossModalFusion(dim=4, dropout=0.0, num_classes=3, mode="sample").eval()
    i_p, t_p = torch.randn(3, 4), torch.randn(3, 4)
    _, fused = fusion(i_p, t_p)
    for n in range(3):
        i, t = i_p[n], t_p[n]
        q = t * fusion.q_i(i)
        scores = torch.stack([q @ (t * fusion.k_i(z)) for z in (i, t)]) / 2.0
        a = torch.softmax(scores, dim=0)
        torch.testing.assert_close(fused[n, 4:8], a[0] * fusion.v_i(i) + a[1] * fusion.v_i(t))


@pytest.mark.parametrize("modalities", ["both", "text", "image"])
def test_sample_fusion_predictions_do_not_depend_on_the_batch(modalities: str) -> None:
    model = make_model("sample", modalities)
    _warm_batchnorm(model)
    image, tokens, mask = make_batch(6, seed=1)
    with torch.no_grad():
        batch = model(image, tokens, mask).logits
        for n in range(6):
            alone = model(image[n : n + 1], tokens[n : n + 1, : int(mask[n].sum())], mask[n : n + 1, : int(mask[n].sum())])
            torch.testing.assert_close(alone.logits[0], batch[n], atol=1e-6, rtol=0)
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
        permuted = model(image[perm], tokens[perm], mask[perm]).logits
    torch.testing.assert_close(permuted, batch[perm], atol=1e-6, rtol=0)


def test_batch_fusion_depends_on_the_batch() -> None:
    model = make_model("batch")
    _warm_batchnorm(model)
    image, tokens, mask = make_batch(6, seed=1)
    with torch.no_grad():
        full = model(image, tokens, mask)
        first_half = model(image[:3], tokens[:3], mask[:3])
    # the embeddings are per sample; only the fused prediction sees the rest of the batch
    torch.testing.assert_close(first_half.image_emb, full.image_emb[:3], atol=1e-6, rtol=0)
    assert (first_half.logits - full.logits[:3]).abs().max() > 1e-4


def test_text_head_ignores_padding() -> None:
    model = make_model("sample")
    _warm_batchnorm(model)
    image, tokens, mask = make_batch(5, seed=2)
    with torch.no_grad():
        ref = model(image, tokens, mask)
        extra = 4
        padded_tokens = torch.cat([tokens, torch.zeros(5, extra, L, H)], dim=1)
        padded_mask = torch.cat([mask, torch.zeros(5, extra, dtype=torch.bool)], dim=1)
        padded = model(image, padded_tokens, padded_mask)
        # whatever sits at masked positions is not read either
        garbage = padded_tokens + 1e3 * (~padded_mask)[:, :, None, None]
        dirty = model(image, garbage, padded_mask)
    torch.testing.assert_close(padded.text_emb, ref.text_emb, atol=1e-6, rtol=0)
    torch.testing.assert_close(dirty.text_emb, ref.text_emb, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded.logits, ref.logits, atol=1e-6, rtol=0)


def test_ha_layer_weights_are_unnormalised_sigmoids() -> None:
    torch.manual_seed(0)
    ha = HierarchicalAttention(num_layers=3, hidden=H, dim=8, dropout=0.0)
    _, tokens, _ = make_batch(32, seed=4)
    tokens[:, 0] = torch.randn(32, L, H) * 5 + torch.arange(L)[None, :, None].float()  # varied [CLS] states
    w = ha.layer_weights(tokens)
    assert w.shape == (32, 3)
    assert ((w > 0) & (w < 1)).all()
    assert not torch.allclose(w.sum(dim=1), torch.ones(32), atol=1e-3)
    # only the last 3 of the 4 cached layers are read
    tokens_changed = tokens.clone()
    tokens_changed[:, :, 0] = 123.0
    torch.testing.assert_close(ha.layer_weights(tokens_changed), w)


def test_ha_matches_eq2_written_out() -> None:
    torch.manual_seed(0)
    ha = HierarchicalAttention(num_layers=2, hidden=H, dim=8, dropout=0.0).eval()
    _, tokens, mask = make_batch(6, seed=11)
    assert mask.sum(dim=1).min() == 1 and mask.sum(dim=1).max() == 7  # covers the empty and the full row
    tokens[:, 0] = torch.randn(6, L, H) * 3  # [CLS] states that give clearly different layer weights
    got = ha(tokens, mask)
    for n in range(6):
        length = int(mask[n].sum())
        c = tokens[n, 0, -2:].mean(dim=-1)  # (2,)
        w = torch.sigmoid(ha.layer_fc[2](torch.relu(ha.layer_fc[0](c))))
        x = w[0] * tokens[n, 1:length, -2] + w[1] * tokens[n, 1:length, -1]  # (len-1, H)
        if length == 1:
            x = torch.zeros(1, H)  # nothing after [CLS]: one zero vector
        out, _ = ha.lstm(x[None])  # the sample alone, no padding
        t_p = ha.align(ha.encode(out[0].mean(dim=0, keepdim=True)))
        torch.testing.assert_close(got[n], t_p[0], atol=1e-5, rtol=1e-5)


def test_text_with_nothing_after_cls_is_finite() -> None:
    model = make_model("sample").eval()
    image, tokens, mask = make_batch(3)
    mask[1, 1:] = False
    tokens[1, 1:] = 0.0
    with torch.no_grad():
        out = model(image, tokens, mask)
        only_cls = model(image, tokens[:, :1], mask[:, :1])
    assert torch.isfinite(out.logits).all() and torch.isfinite(only_cls.logits).all()
    torch.testing.assert_close(only_cls.text_emb[1], out.text_emb[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fusion", ["batch", "sample", "concat"])
def test_one_sample_batch_in_train_mode(fusion: str) -> None:
    model = make_model(fusion)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = [m.running_mean.clone() for m in bns]
    image, tokens, mask = make_batch(1)
    out = model(image, tokens, mask)
    loss = out.logits.sum() + out.image_emb.sum() + out.text_emb.sum()
    loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    # BatchNorm used its running statistics for that call, did not update them, and is back in train mode
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert all(m.training for m in bns)
    model(*make_batch(4))
    assert any(not torch.equal(b, m.running_mean) for b, m in zip(before, bns))


def test_bad_inputs_are_rejected() -> None:
    model = make_model("batch")
    image, tokens, mask = make_batch(3)
    gap = mask.clone()
    gap[0, 2] = False
    with pytest.raises(ValueError, match=r"prefix.*\[0\]"):
        model(image, tokens, gap)
    no_cls = mask.clone()
    no_cls[2, 0] = False
    with pytest.raises(ValueError, match=r"\[CLS\].*\[2\]"):
        model(image, tokens, no_cls)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(image[:2], tokens, mask)
    with pytest.raises(ValueError, match=r"image must be \[B, 8"):
        model(torch.randn(3, 5, 2, 2), tokens, mask)
    with pytest.raises(ValueError, match=r"tokens must be \[B, N, 4"):
        model(image, tokens[:, :, :3], mask)
    with pytest.raises(ValueError, match="needs the image"):
        model(None, tokens, mask)
    with pytest.raises(ValueError, match="ha_layers=5"):
        make_model(ha_layers=5)
    with pytest.raises(ValueError, match="fusion mode"):
        CrossModalFusion(8, 0.0, 3, mode="sum")


@pytest.mark.parametrize("fusion", ["sample", "batch"])
def test_full_model_overfits_a_small_training_set(fusion: str) -> None:
    torch.manual_seed(0)
    image, tokens, mask = make_batch(32, seed=5)
    labels = torch.randint(0, K, (32,), generator=torch.Generator().manual_seed(6))
    model = make_model(fusion, dim=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        out = model(image, tokens, mask)
        loss = one_step_loss(out.logits, labels, out.image_emb, out.text_emb, lambda_ce=5.0, tau=0.07).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = model(image, tokens, mask).logits.argmax(dim=1)
    assert (predictions == labels).float().mean().item() == 1.0
