"""mmbridge_ref.core: attention against the naive reference and torch's MultiheadAttention, masks, FFNs, precision."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from mmbridge_ref.core import (Attention, FeedForward, attention, autocast, autocast_dtype, naive_attention,
                               seed_everything)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 6), s=st.integers(1, 6), d=st.integers(1, 8),
       p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_attention_matches_naive_on_random_masks(b, h, t, s, d, p, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, requires_grad=True) for n in (t, s, s))
    mask = torch.rand(b, h, t, s, generator=g) < p  # p=0 gives all-empty rows, p=1 no masking
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    empty = ~mask.any(-1)  # [b, h, t]
    assert (out[empty] == 0).all()
    out.square().sum().backward()
    for x in (q, k, v): assert x.grad.isfinite().all()
    assert (q.grad[empty] == 0).all()


def test_empty_rows_do_not_rely_on_the_sdpa_backend(monkeypatch):
    "Older torch releases and some CUDA kernels return NaN for an all-False mask row; emulate one."
    import mmbridge_ref.core as core

    def nan_sdpa(q, k, v, attn_mask=None, dropout_p=0.0):
        return torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~attn_mask, float("-inf")), -1) @ v

    monkeypatch.setattr(core.F, "scaled_dot_product_attention", nan_sdpa)
    q, k, v = (torch.randn(1, 2, n, 4, requires_grad=True) for n in (3, 5, 5))
    mask = torch.rand(1, 2, 3, 5) < 0.5
    mask[0, 1, 0] = False
    out = attention(q, k, v, mask)
    assert (out[0, 1, 0] == 0).all() and out.isfinite().all()
    out.sum().backward()
    assert all(x.grad.isfinite().all() for x in (q, k, v))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_empty_rows_are_zero():
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", requires_grad=True) for n in (16, 32, 32))
    mask = torch.rand(2, 4, 16, 32, device="cuda") < 0.5
    mask[:, :, 3] = False
    with autocast("cuda"):
        out = attention(q, k, v, mask)
    assert out.dtype is torch.bfloat16 and (out[:, :, 3] == 0).all()
    out.float().sum().backward()
    assert all(x.grad.isfinite().all() for x in (q, k, v))


def test_module_matches_torch_multihead_attention_with_key_padding():
    torch.manual_seed(0)
    dim, heads, ctx_dim = 16, 4, 24
    ours = Attention(dim, heads=heads, dim_head=dim // heads, context_dim=ctx_dim)
    ref = nn.MultiheadAttention(dim, heads, bias=False, kdim=ctx_dim, vdim=ctx_dim, batch_first=True)
    wk, wv = ours.to_kv.weight.chunk(2, dim=0)
    with torch.no_grad():
        ref.q_proj_weight.copy_(ours.to_q.weight)
        ref.k_proj_weight.copy_(wk)
        ref.v_proj_weight.copy_(wv)
        ref.out_proj.weight.copy_(ours.to_out.weight)
    x, ctx = torch.randn(2, 5, dim), torch.randn(2, 7, ctx_dim)
    keep = torch.arange(7)[None] < torch.tensor([[7], [3]])
    expected, _ = ref(x, ctx, ctx, key_padding_mask=~keep, need_weights=False)  # torch: True = ignore
    torch.testing.assert_close(ours(x, ctx, mask=keep), expected, atol=1e-5, rtol=1e-5)


def test_masked_out_context_changes_nothing():
    torch.manual_seed(0)
    attn = Attention(8, heads=2, dim_head=4)
    x = torch.randn(2, 6, 8)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    ctx = torch.randn(2, 6, 8)
    ctx2 = ctx.masked_fill(~keep[..., None], 1e3)
    torch.testing.assert_close(attn(x, ctx, mask=keep), attn(x, ctx2, mask=keep))


def test_bad_input_names_the_value():
    attn = Attention(8, heads=2, dim_head=4)
    with pytest.raises(ValueError, match=r"dim=8"): attn(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"\(2, 4\)"): attn(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="act='tanh'"): FeedForward(8, act="tanh")
    with pytest.raises(ValueError, match="heads=0"): Attention(8, heads=0)


@pytest.mark.parametrize("act", ["gelu", "geglu", "swiglu"])
def test_feedforward_parameter_count_does_not_depend_on_the_activation(act):
    n = sum(p.numel() for p in FeedForward(96, mult=4, act=act).parameters())
    assert n == 2 * 96 * 4 * 96


def test_seed_everything_repeats_torch_draws():
    seed_everything(3); a = torch.randn(4)
    seed_everything(3); torch.testing.assert_close(torch.randn(4), a, rtol=0, atol=0)


def test_precision_choice():
    assert autocast_dtype("cuda") is torch.bfloat16 and autocast_dtype("cpu") is None
    with pytest.raises(ValueError, match=r"fp16.*cpu"): autocast_dtype("cpu", "fp16")
    with autocast("cpu", "bf16"): assert nn.Linear(4, 4)(torch.randn(1, 4)).dtype is torch.bfloat16
