"""CLIP / SigLIP losses: parity with open_clip (values and gradients), properties, the learnable scale, bad input."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.loss import ClipLoss, SigLipLoss

from mmbridge_ref.align.clip import (LogitBias, LogitScale, clip_logits, clip_loss, clip_loss_distributed, clip_loss_floor,
                               clip_loss_local, clip_loss_multi_positive, siglip_loss)

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-11, atol=1e-13)}


def features(b, d, dtype=torch.float64, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    y = F.normalize(x + noise * torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return x, y


def _value_and_grads(fn, *args):
    args = [a.detach().clone().requires_grad_() for a in args]
    loss = fn(*args)
    return loss.detach(), torch.autograd.grad(loss, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,d", [(2, 3), (5, 32), (16, 8), (64, 128)])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_equals_open_clip(dtype, b, d, scale):
    x, y = features(b, d, dtype, seed=b * d)
    s = torch.tensor(scale, dtype=dtype)
    ours, ours_g = _value_and_grads(clip_loss, x, y, s)
    ref, ref_g = _value_and_grads(ClipLoss(), x, y, s)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    for name, a, r in zip(("image", "text", "scale"), ours_g, ref_g):
        torch.testing.assert_close(a, r, **TOL[dtype], msg=lambda m: f"grad wrt {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,d", [(1, 4), (2, 3), (5, 32), (16, 8), (64, 128)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1 / 0.07, 0.0), (100.0, 3.0)])
def test_siglip_loss_equals_open_clip(dtype, b, d, scale, bias):
    x, y = features(b, d, dtype, seed=b + d)
    s, beta = torch.tensor(scale, dtype=dtype), torch.tensor(bias, dtype=dtype)
    ours, ours_g = _value_and_grads(siglip_loss, x, y, s, beta)
    ref, ref_g = _value_and_grads(SigLipLoss(), x, y, s, beta)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    for name, a, r in zip(("image", "text", "scale", "bias"), ours_g, ref_g):
        torch.testing.assert_close(a, r, **TOL[dtype], msg=lambda m: f"grad wrt {name}: {m}")


def test_clip_loss_by_hand():
    "Two pairs, cosines [[1, 0], [0, 1]], s = 2: each row is -log(e^2 / (e^2 + e^0)) = log(1 + e^-2)."
    x = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(clip_loss(x, x, 2.0), torch.tensor(math.log1p(math.exp(-2)), dtype=torch.float64))
    torch.testing.assert_close(clip_logits(x, x, 2.0), 2 * x)


def test_siglip_by_hand():
    "Same pairs, s = 2, β = -1: positives log(1+e^-1), negatives log(1+e^-1), 4 terms / b=2."
    x = torch.eye(2, dtype=torch.float64)
    expected = (2 * math.log1p(math.exp(-1)) + 2 * math.log1p(math.exp(-1))) / 2
    torch.testing.assert_close(siglip_loss(x, x, 2.0, -1.0), torch.tensor(expected, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(b=st.integers(2, 12), d=st.integers(2, 16), seed=st.integers(0, 10_000), scale=st.floats(0.5, 100))
def test_properties_permutation_and_modality_swap(b, d, seed, scale):
    x, y = features(b, d, seed=seed)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    for fn, args in ((clip_loss, (scale,)), (siglip_loss, (scale, -2.0))):
        base = fn(x, y, *args)
        torch.testing.assert_close(fn(x[perm], y[perm], *args), base)  # reordering the pairs changes nothing
        torch.testing.assert_close(fn(y, x, *args), base)  # neither does swapping images and captions
    assert clip_loss(x, y, scale) >= 0  # a cross-entropy; exactly 0 once the margin times the scale passes float precision
    assert clip_loss(x, y, 0.5) > 0  # at a small scale no softmax saturates


def test_batch_size_one_warns_and_is_zero():
    x, y = features(1, 8)
    with pytest.warns(UserWarning, match="batch size 1"):
        loss = clip_loss(x.requires_grad_(), y, 14.0)
    assert loss.item() == 0.0 and torch.autograd.grad(loss, x)[0].abs().max() == 0
    assert siglip_loss(x, y, 10.0, -10.0) > 0  # SigLIP still learns from one pair


BAD = [
    (lambda x, y: clip_loss(x, y[:3], 10.0), "image_features has b=4, text_features has b=3"),
    (lambda x, y: clip_loss(x, y[:, :5], 10.0), "image_features has d=8, text_features has d=5"),
    (lambda x, y: clip_loss(x[:0], y[:0], 10.0), "empty batch"),
    (lambda x, y: clip_loss(x[None], y, 10.0), "(1, 4, 8)"),
    (lambda x, y: clip_loss(x, y, 0.0), "logit_scale=0.0"),
    (lambda x, y: clip_loss(x, y, torch.tensor(-2.5)), "logit_scale=-2.5"),
    (lambda x, y: clip_loss(x, y, float("inf")), "logit_scale=inf"),
    (lambda x, y: clip_loss(x, y, torch.ones(3)), "shape (3,)"),
    (lambda x, y: siglip_loss(x, y[:2], 10.0, -10.0), "b=4, text_features has b=2"),
    (lambda x, y: siglip_loss(x, y, -1.0, -10.0), "logit_scale=-1.0"),
    (lambda x, y: siglip_loss(x, y, 10.0, float("nan")), "logit_bias=nan"),
    (lambda x, y: clip_loss(x.long(), y, 10.0), "dtype=torch.int64"),
    (lambda x, y: clip_loss_multi_positive(x, y, 10.0, torch.arange(3)), "labels shape (3,) is not [b=4]"),
    (lambda x, y: clip_loss_multi_positive(x, y, 10.0, torch.zeros(4)), "dtype=torch.float32"),
    (lambda x, y: clip_loss_local(x[:2], y[:2], x, y, 10.0, offset=3), "offset=3"),
    (lambda x, y: clip_loss_distributed(x, y[:3], 10.0), "b=4, text_features has b=3"),
]


@pytest.mark.parametrize("fn,msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_names_the_values(fn, msg):
    x, y = features(4, 8, torch.float32)
    with pytest.raises(ValueError) as e:
        fn(x, y)
    assert msg in str(e.value)


def test_logit_scale_init_cap_and_clamp():
    ls = LogitScale()
    assert abs(ls().item() - 1 / 0.07) < 1e-4 and abs(ls.log_scale.item() - math.log(1 / 0.07)) < 1e-6
    with torch.no_grad(): ls.log_scale.fill_(8.0)  # e^8 ≈ 2981: above the cap
    assert abs(ls().item() - 100.0) < 1e-3
    ls().backward()
    assert ls.log_scale.grad.item() == 0.0  # above the cap the parameter gets no gradient ...
    ls.log_scale.grad = None
    ls.clamp_()
    assert abs(ls.log_scale.item() - math.log(100)) < 1e-6
    ls().backward()
    assert ls.log_scale.grad.item() > 0  # ... on it, it does again
    assert LogitScale(init=10.0)().item() == pytest.approx(10.0)
    assert LogitBias()().item() == -10.0
    with pytest.raises(ValueError, match="init=150.0"):
        LogitScale(init=150.0)


def test_logit_scale_under_training_never_exceeds_cap():
    "Separable features: the loss keeps falling as the scale grows, so an uncapped scale runs away."
    x = torch.eye(4, 8, dtype=torch.float64)
    y = F.normalize(x + 6 * torch.ones(8, dtype=torch.float64) / 8 ** 0.5, dim=-1)  # positives win by a small margin
    for cap, expect_above in ((100.0, False), (1e9, True)):
        ls = LogitScale(max_scale=cap).double()
        opt = torch.optim.Adam(ls.parameters(), lr=0.2)
        for _ in range(60):
            loss = clip_loss(x, y, ls())
            opt.zero_grad(); loss.backward(); opt.step(); ls.clamp_()
        assert (ls().item() > 101) == expect_above, ls().item()
        assert ls().item() <= cap * (1 + 1e-12)  # exp(log(100)) rounds to 100.00000000000004


def test_multi_positive_reduces_to_clip_loss_and_respects_the_floor():
    x, y = features(6, 16)
    torch.testing.assert_close(clip_loss_multi_positive(x, y, 20.0, torch.arange(6)), clip_loss(x, y, 20.0))
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    y_dup = y.clone(); y_dup[[1, 2]] = y[0]; y_dup[4] = y[3]  # identical captions share identical features
    torch.testing.assert_close(clip_loss_multi_positive(x, y_dup, 20.0, labels), clip_loss(x, y_dup, 20.0))
    floor = clip_loss_floor(labels)
    assert floor == pytest.approx((3 * math.log(3) + 2 * math.log(2)) / 6)
    # aligned embeddings with the same label on both sides reach the floor; nothing goes below it
    e = F.normalize(torch.eye(6, 16, dtype=torch.float64)[labels], dim=-1)
    assert clip_loss_multi_positive(e, e, 100.0, labels).item() == pytest.approx(floor, abs=1e-9)
    assert clip_loss(e, e, 100.0).item() == pytest.approx(floor, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=2, max_size=10), seed=st.integers(0, 10_000),
       scale=st.floats(1, 100))
def test_multi_positive_never_below_floor(labels, seed, scale):
    labels = torch.tensor(labels)
    x, y = features(len(labels), 8, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a draw where every label is equal warns: no negatives
        loss = clip_loss_multi_positive(x, y, scale, labels)
    assert loss.item() >= clip_loss_floor(labels) - 1e-9


def test_multi_positive_warns_without_negatives():
    x, y = features(3, 8)
    with pytest.warns(UserWarning, match="no negatives"):
        clip_loss_multi_positive(x, y, 10.0, torch.zeros(3, dtype=torch.long))


def test_local_losses_simulated_in_one_process():
    "Playing w ranks in one process: mean of local losses = whole loss; summed gradients = w x whole gradient."
    w, b = 3, 4
    x, y = features(w * b, 16, seed=7)
    x.requires_grad_(), y.requires_grad_()
    whole = clip_loss(x, y, 30.0)
    local = [clip_loss_local(x[r * b:(r + 1) * b], y[r * b:(r + 1) * b], x, y, 30.0, offset=r * b) for r in range(w)]
    torch.testing.assert_close(torch.stack(local).mean(), whole)
    g_whole = torch.autograd.grad(whole, (x, y))
    g_sum = torch.autograd.grad(sum(local), (x, y))
    for a, c in zip(g_sum, g_whole): torch.testing.assert_close(a, w * c)
    # one process and no process group: the distributed loss is the plain loss
    assert torch.equal(clip_loss_distributed(x, y, 30.0), whole)
