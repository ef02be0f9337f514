"""Flamingo: the φ mask (properties + pitfalls), GatedXAttnDense, insertion into frozen transformers LMs, parity."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mmbridge_ref.inject.xattn import (GatedXAttnDense, XAttnDecoderLayer, add_gated_xattn, cross_attention_mask,
                                      load_flamingo_pytorch_xattn, media, media_attention_mask)


def loop_phi(locations, num_media, only_immediate=True):
    """Reference φ for one row, written from the paper's rule: position t may attend the last image at or before t
    (or, for "all previous", every image at or before t)."""
    phi = torch.zeros(len(locations), num_media, dtype=torch.bool)
    images_so_far = 0
    for t, is_image in enumerate(locations):
        images_so_far += int(is_image)
        if images_so_far == 0: continue
        if only_immediate: phi[t, images_so_far - 1] = True
        else: phi[t, :images_so_far] = True
    return phi


@st.composite
def placements(draw, max_b=3, max_t=16, max_m=4):
    """A batch of rows with the same number m of images at random positions (m may be 0)."""
    b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    m = draw(st.integers(0, min(max_m, t)))
    rows = [sorted(draw(st.permutations(range(t)))[:m]) for _ in range(b)]
    locations = torch.zeros(b, t, dtype=torch.bool)
    for i, pos in enumerate(rows): locations[i, pos] = True
    return locations, m


def _row(t, positions):
    loc = torch.zeros(1, t, dtype=torch.bool)
    loc[0, positions] = True
    return loc, len(positions)


# ---- φ ------------------------------------------------------------------------------------------------------------

EDGE_CASES = {
    "no images": _row(6, []),
    "image first": _row(6, [0, 3]),
    "back to back": _row(6, [2, 3, 4]),
    "image last": _row(6, [1, 5]),
    "only images": _row(3, [0, 1, 2]),
}


@pytest.mark.parametrize("only_immediate", [True, False])
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_phi_edge_cases_match_the_rule(case, only_immediate):
    loc, m = EDGE_CASES[case]
    phi = media_attention_mask(loc, m, only_immediate)
    assert phi.shape == (1, loc.shape[1], m) and phi.dtype == torch.bool
    assert torch.equal(phi[0], loop_phi(loc[0], m, only_immediate))


@settings(max_examples=200, deadline=None)
@given(placements(), st.booleans())
def test_phi_properties(placement, only_immediate):
    loc, m = placement
    phi = media_attention_mask(loc, m, only_immediate)
    for i in range(loc.shape[0]): assert torch.equal(phi[i], loop_phi(loc[i], m, only_immediate))
    before_first = loc.cumsum(-1) == 0
    assert not phi[before_first].any()  # positions before any image attend nothing
    b_idx, t_idx = loc.nonzero(as_tuple=True)
    own = loc.cumsum(-1)[b_idx, t_idx] - 1
    assert phi[b_idx, t_idx, own].all()  # each <image> position attends its own image
    if only_immediate:
        assert (phi.sum(-1) <= 1).all()  # at most one image: the most recent (flamingo-pytorch#6)
        assert torch.equal(phi.any(-1), ~before_first)
    else:
        assert torch.equal(phi, phi.flip(-1).cummax(-1).values.flip(-1))  # image j allowed => every earlier image too


def test_immediate_means_equal_not_greater_or_equal():
    """flamingo-pytorch#6: with `>=` a position after the second image would also see the first one."""
    loc, m = _row(6, [0, 3])
    phi = media_attention_mask(loc, m)
    assert phi[0, 4].tolist() == [False, True]
    assert media_attention_mask(loc, m, only_immediate=False)[0, 4].tolist() == [True, True]


@settings(max_examples=100, deadline=None)
@given(placements(max_m=3), st.integers(-2, 2).filter(lambda k: k != 0))
def test_count_mismatch_names_both_counts(placement, extra):
    loc, m = placement
    if m + extra < 0: return
    with pytest.raises(ValueError, match=rf"row 0 has {m} <image> tokens but {m + extra} images"):
        media_attention_mask(loc, m + extra)


def test_media_mask_allows_rows_with_fewer_images_and_checks_them():
    loc = torch.zeros(2, 8, dtype=torch.bool)
    loc[0, [1, 4, 6]] = True
    loc[1, [0, 5]] = True
    real = torch.tensor([[True, True, True], [True, True, False]])
    phi = media_attention_mask(loc, 3, media_mask=real)
    assert not phi[1, :, 2].any()
    assert torch.equal(phi[1, :, :2], loop_phi(loc[1], 2))
    with pytest.raises(ValueError, match="row 1 has 2 <image> tokens but 3 images"): media_attention_mask(loc, 3)
    with pytest.raises(ValueError, match="real images first"): media_attention_mask(loc, 3, media_mask=real.flip(1))
    with pytest.raises(ValueError, match=r"\(2, 3\)"): media_attention_mask(loc, 3, media_mask=real[:, :2])


def test_bad_phi_input_names_the_value():
    with pytest.raises(ValueError, match="dtype=torch.int64"): media_attention_mask(torch.zeros(1, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"shape \(4,\)"): media_attention_mask(torch.zeros(4, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="num_media=-1"): media_attention_mask(torch.zeros(1, 4, dtype=torch.bool), -1)


# ---- GatedXAttnDense ----------------------------------------------------------------------------------------------

def _open_block(seed=0, dim=16, dim_visual=12):
    torch.manual_seed(seed)
    block = GatedXAttnDense(dim, dim_visual=dim_visual, heads=2, dim_head=8)
    with torch.no_grad(): block.attn_gate.fill_(0.8); block.ff_gate.fill_(-0.5)
    return block


def test_block_is_exactly_the_identity_at_init():
    torch.manual_seed(0)
    block = GatedXAttnDense(16, dim_visual=12, heads=2, dim_head=8)
    loc, m = _row(7, [1, 4])
    x, vis = torch.randn(1, 7, 16), torch.randn(1, m, 3, 12)
    assert torch.equal(block(x, vis, media_attention_mask(loc, m)), x)
    assert torch.equal(block(x), x)


@settings(max_examples=40, deadline=None)
@given(placements(max_b=2, max_t=10, max_m=3), st.booleans())
def test_masked_out_images_change_nothing_and_empty_rows_are_zero(placement, only_immediate):
    loc, m = placement
    block = _open_block()
    b, t = loc.shape
    x, vis = torch.randn(b, t, 16, requires_grad=True), torch.randn(b, m, 3, 12)
    phi = media_attention_mask(loc, m, only_immediate)
    out = block.cross_attend(x, vis, phi)
    empty = ~phi.any(-1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))  # exactly zero, not NaN, before any image
    if m:  # with no images there is no attention, hence no graph to check
        out.sum().backward()
        assert x.grad.isfinite().all()
    with torch.no_grad():
        for j in range(m):  # replace image j by huge noise: only the positions φ lets see it may move
            noisy = vis.clone()
            noisy[:, j] = 1e3 * torch.randn_like(noisy[:, j])
            moved = (block.cross_attend(x, noisy, phi) - out).abs().amax(-1) > 1e-5
            assert torch.equal(moved, phi[:, :, j])


def test_a_no_op_mask_would_fail_the_perturbation_check():
    """The check above must have teeth: with an all-True mask (a mask that does nothing) the outputs of positions
    that should not see image 0 move (flamingo-pytorch#10)."""
    block = _open_block()
    loc, m = _row(8, [1, 5])
    x, vis = torch.randn(1, 8, 16), torch.randn(1, m, 3, 12)
    phi = media_attention_mask(loc, m)
    noisy = vis.clone()
    noisy[:, 0] = 1e3 * torch.randn_like(noisy[:, 0])
    with torch.no_grad():
        no_op = torch.ones_like(phi)
        moved = (block.cross_attend(x, noisy, no_op) - block.cross_attend(x, vis, no_op)).abs().amax(-1)[0] > 1e-5
    assert moved[~phi[0, :, 0]].any()


def test_block_rejects_phi_that_does_not_fit():
    block = _open_block()
    x, vis = torch.randn(1, 8, 16), torch.randn(1, 2, 3, 12)
    phi = media_attention_mask(_row(8, [1, 5])[0], 2)
    with pytest.raises(ValueError, match=r"\[b, t, m\]=\(1, 7, 2\)"): block(x[:, :7], vis, phi)  # e.g. a KV-cache step
    with pytest.raises(ValueError, match=r"\[b, t, m\]=\(1, 8, 2\)"): block(x, vis, None)
    with pytest.raises(ValueError, match=r"\[b, m, q, dv\]"): block(x, vis[:, 0], phi)


def test_matches_flamingo_pytorch_gated_block():
    from flamingo_pytorch import GatedCrossAttentionBlock
    torch.manual_seed(0)
    theirs = GatedCrossAttentionBlock(dim=16, dim_head=8, heads=2, only_attend_immediate_media=True)
    with torch.no_grad(): theirs.attn_gate.fill_(0.7); theirs.ff_gate.fill_(-0.4)
    ours = load_flamingo_pytorch_xattn(GatedXAttnDense(16, heads=2, dim_head=8), theirs)
    loc = torch.zeros(2, 9, dtype=torch.bool)
    loc[0, [2, 3, 7]] = True
    loc[1, [0, 4, 8]] = True
    x, vis = torch.randn(2, 9, 16), torch.randn(2, 3, 4, 16)
    torch.testing.assert_close(ours(x, vis, media_attention_mask(loc, 3)), theirs(x, vis, loc), atol=1e-5, rtol=1e-5)
    # all previous images: equal after the first image; before it flamingo-pytorch averages every image, ours is 0
    theirs.attn.only_attend_immediate_media = False
    ours_all, theirs_all = ours(x, vis, media_attention_mask(loc, 3, False)), theirs(x, vis, loc)
    torch.testing.assert_close(ours_all[0, 2:], theirs_all[0, 2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_all[1], theirs_all[1], atol=1e-5, rtol=1e-5)
    assert (ours_all[0, :2] - theirs_all[0, :2]).abs().max() > 1e-2


# ---- inside a frozen transformers LM --------------------------------------------------------------------------------

IMAGE = 3


def tiny_lm(family="llama", layers=4, seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    lm = LlamaForCausalLM(LlamaConfig(**kw)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))
    return lm.eval()


def batch():
    torch.manual_seed(5)
    ids = torch.randint(4, 40, (2, 10))
    ids[0, [2, 6]] = IMAGE
    ids[1, [0]] = IMAGE
    return ids, torch.tensor([[True, True], [True, False]]), torch.randn(2, 2, 4, 24)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_are_identical_at_init(family):
    lm = tiny_lm(family)
    ids, real, vis = batch()
    with torch.no_grad():
        before = lm(input_ids=ids).logits
        blocks = add_gated_xattn(lm, dim_visual=24, every=1, heads=2, dim_head=8)
        assert len(blocks) == 4
        assert torch.equal(lm(input_ids=ids).logits, before)
        with media(lm, vis, ids == IMAGE, media_mask=real): assert torch.equal(lm(input_ids=ids).logits, before)


@pytest.mark.parametrize("every, where", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3]), (9, [0])])
def test_blocks_go_before_every_nth_layer(every, where):
    lm = tiny_lm(layers=5)
    blocks = add_gated_xattn(lm, dim_visual=24, every=every, heads=2, dim_head=8)
    wrapped = [i for i, layer in enumerate(lm.model.layers) if isinstance(layer, XAttnDecoderLayer)]
    assert wrapped == where and len(blocks) == len(where)
    assert [lm.model.layers[i].xattn for i in where] == blocks


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_open_gates_images_reach_only_allowed_positions(family):
    lm = tiny_lm(family)
    ids, real, vis = batch()
    blocks = add_gated_xattn(lm, dim_visual=24, every=2, heads=2, dim_head=8)
    with torch.no_grad():
        for b in blocks: b.attn_gate.fill_(1.0)

        def logits(v):
            with media(lm, v, ids == IMAGE, media_mask=real): return lm(input_ids=ids).logits

        base = logits(vis)
        text_only = lm(input_ids=ids).logits
        assert torch.equal(((base - text_only).abs().amax(-1) > 1e-6)[0], torch.arange(10) >= 2)
        noisy = vis.clone()
        noisy[1, 1] = 1e3 * torch.randn(4, 24)  # row 1's padding image: nothing moves
        assert torch.equal(logits(noisy), base)
        noisy[0, 1] = 1e3 * torch.randn(4, 24)  # row 0's second image (token at 6): only positions >= 6 move
        moved = (logits(noisy) - base).abs().amax(-1) > 1e-6
        assert torch.equal(moved[0], torch.arange(10) >= 6) and not moved[1].any()


def test_context_is_cleared_after_the_block_even_on_error():
    lm = tiny_lm()
    ids, real, vis = batch()
    add_gated_xattn(lm, dim_visual=24, heads=2, dim_head=8)
    with pytest.raises(RuntimeError, match="boom"):
        with media(lm, vis, ids == IMAGE, media_mask=real): raise RuntimeError("boom")
    assert lm.media_context.media is None and lm.media_context.phi is None


def test_bad_use_names_the_problem():
    lm = tiny_lm()
    ids, real, vis = batch()
    with pytest.raises(ValueError, match="call add_gated_xattn first"):
        with media(lm, vis, ids == IMAGE): pass
    add_gated_xattn(lm, dim_visual=24, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="already has gated xattn"): add_gated_xattn(lm, dim_visual=24)
    with pytest.raises(ValueError, match="row 1 has 1 <image> tokens but 2 images"):
        with media(lm, vis, ids == IMAGE): pass
    with pytest.raises(ValueError, match="every=0"): add_gated_xattn(tiny_lm(), dim_visual=24, every=0)
    with pytest.raises(ValueError, match="no `layers` ModuleList"): add_gated_xattn(torch.nn.Linear(2, 2), dim_visual=2)


@pytest.mark.parametrize("mode", ["immediate", "previous", "none"])
def test_cross_attention_modes(mode):
    ids, real, vis = batch()
    m = cross_attention_mask(ids == IMAGE, 2, mode, media_mask=real)
    if mode != "none": assert torch.equal(m, media_attention_mask(ids == IMAGE, 2, mode == "immediate", media_mask=real))
    else: assert torch.equal(m, real[:, None, :].expand(2, 10, 2))  # every real image, at every position
    with pytest.raises(ValueError, match="mode='φ' is not one of"): cross_attention_mask(ids == IMAGE, 2, "φ", media_mask=real)


def test_the_context_mask_reaches_the_blocks():
    ids, real, vis = batch()
    outs = {}
    for mode in ("immediate", "none"):
        lm = tiny_lm()
        blocks = add_gated_xattn(lm, dim_visual=24, heads=2, dim_head=8, mask=mode)
        with torch.no_grad():
            for b in blocks: b.attn_gate.fill_(1.0)
            with media(lm, vis, ids == IMAGE, media_mask=real): outs[mode] = lm(input_ids=ids).logits
    # before row 0's first image (position 2) φ attends nothing; "none" lets those positions see both images
    assert torch.equal(outs["immediate"][0, :2], tiny_lm()(input_ids=ids).logits[0, :2].detach())
    assert (outs["none"][0, :2] - outs["immediate"][0, :2]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="mask='latest' is not one of"): add_gated_xattn(tiny_lm(), dim_visual=24, mask="latest")
