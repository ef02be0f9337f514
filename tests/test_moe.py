"""Mixture of experts: routing and dispatch against per-token loops, parity with transformers' Mixtral block, the
balancing losses (Switch/Mixtral against transformers, DeepSpeed's analytically), upcycling, capacity drops, errors,
and the injection in a VLM (unchanged at init, gradients to the routers, routing statistics)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.utils import logging as hf_logging

from mmbridge_ref.backbones.towers import ZOO_DIR, LanguageModel, TinyViT, count_targets, lm_loss_sum, load_tokenizer
from mmbridge_ref.bridges.projectors import MLPProjector
from mmbridge_ref.inject.moe import (MoEFeedForward, MoEInjection, MoESettings, copy_to_mixtral, deepspeed_l_aux, dispatch,
                                     expert_capacity, ffn_cost, load_balancing_loss, moe_injection, route, router_z_loss,
                                     routing_stats, upcycle_lm)
from mmbridge_ref.inject.prefix import PrefixInjection
from mmbridge_ref.vlm import VLM, collate_vlm, encode_segments

torch.set_num_threads(1)
hf_logging.set_verbosity_error()  # a standalone Mixtral block warns that no experts implementation is set (eager is meant)


# --- references written from the definitions -------------------------------------------------------------------------

def loop_route(logits, k):
    "Per token: softmax, the k most likely experts, their probabilities rescaled to sum to 1."
    weights, experts = [], []
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        best = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        weights.append([p[i] / sum(p[j] for j in best) for i in best]); experts.append(best)
    return torch.tensor(weights), torch.tensor(experts)


def loop_moe(moe, x):
    "The layer's definition for one token at a time (no capacity)."
    out = torch.zeros_like(x)
    weights, experts = loop_route(moe.router(x).detach(), moe.top_k)
    for j in range(len(x)):
        for w, i in zip(weights[j], experts[j]):
            out[j] += w * (moe.down_proj[i] @ (F.silu(moe.gate_proj[i] @ x[j]) * (moe.up_proj[i] @ x[j])))
    return out


def loop_switch(logits, k, mask=None):
    "e * sum_i f_i P_i over the real tokens."
    t, e = logits.shape
    keep = [j for j in range(t) if mask is None or mask[j]]
    f, P = [0.0] * e, [0.0] * e
    for j in keep:
        p = logits[j].double().softmax(-1)
        for i in p.topk(k).indices.tolist(): f[i] += 1 / len(keep)
        for i in range(e): P[i] += p[i].item() / len(keep)
    return e * sum(a * b for a, b in zip(f, P))


def top2gating_l_aux(logits):
    "DeepSpeed's top2gating l_aux lines (deepspeed/moe/sharded_moe.py), transcribed."
    gates = logits.float().softmax(1)
    e = gates.shape[1]
    mask1 = F.one_hot(gates.argmax(1), num_classes=e)
    return (gates.mean(0) * mask1.float().mean(0)).mean() * e * e


def cyclic_logits(t, e, k, scale=6.0):
    "A perfectly balanced router: token j prefers experts j .. j+k-1 (mod e), equally; t a multiple of e."
    logits = torch.zeros(t, e)
    for j in range(t): logits[j, [(j + r) % e for r in range(k)]] = scale
    return logits


def mixtral_pair(dim=16, hidden=24, e=4, k=2, seed=0):
    torch.manual_seed(seed)
    ours = MoEFeedForward(dim, hidden, e, k)
    cfg = MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=e, num_experts_per_tok=k)
    return ours, copy_to_mixtral(ours, MixtralSparseMoeBlock(cfg))


# --- routing, dispatch, the layer -------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 12), e=st.integers(1, 6), data=st.data())
def test_route_equals_the_per_token_definition(t, e, data):
    k = data.draw(st.integers(1, e))
    torch.manual_seed(t * 7 + e)
    logits = torch.randn(t, e) * 3
    w, ex = route(logits, k)
    lw, lex = loop_route(logits, k)
    assert w.dtype == torch.float32 and ex.shape == (t, k)
    torch.testing.assert_close(w, lw, atol=1e-6, rtol=1e-5)
    assert torch.equal(ex, lex)
    torch.testing.assert_close(w.sum(-1), torch.ones(t))


def test_route_softmax_runs_in_fp32():
    logits = torch.tensor([[3.0, 3.01, -2.0]], dtype=torch.bfloat16)
    w, _ = route(logits, 2)
    assert w.dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 6), e=st.integers(1, 5), data=st.data())
def test_layer_equals_the_per_token_definition(b, t, e, data):
    k = data.draw(st.integers(1, e))
    torch.manual_seed(b * 100 + t * 10 + e)
    moe = MoEFeedForward(8, 12, e, k)
    x = torch.randn(b, t, 8)
    y = moe(x)
    assert y.shape == x.shape and moe.last_router_logits.shape == (b * t, e) and moe.last_dropped == 0
    torch.testing.assert_close(y.reshape(-1, 8), loop_moe(moe, x.reshape(-1, 8)), atol=1e-5, rtol=1e-4)


def test_capacity_drops_by_priority_and_counts():
    ex = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1], [0, 1], [0, 1]])  # 6 tokens, top-2 of 3
    cap = expert_capacity(6, 3, 2, 1.0)
    assert cap == 4
    order, counts, dropped = dispatch(ex, 3, cap)
    assert counts.tolist() == [4, 4, 1] and dropped == 3
    kept = {(j % 6, j // 6) for j in order.tolist()}
    assert (4, 0) not in kept and (5, 0) not in kept and (5, 1) not in kept  # the latest first choices and second choice
    assert {(0, 0), (3, 0), (4, 1), (2, 1)} <= kept
    assert dispatch(ex, 3)[2] == 0 and dispatch(ex, 3)[1].tolist() == [6, 5, 1]


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 20), e=st.integers(1, 5), cf=st.floats(0.1, 3.0), data=st.data())
def test_dropped_count_is_the_overflow_of_each_expert(t, e, cf, data):
    k = data.draw(st.integers(1, e))
    ex = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(j))[:k] for j in range(t)])
    cap = expert_capacity(t, e, k, cf)
    assert cap == math.ceil(cf * t * k / e)
    order, counts, dropped = dispatch(ex, e, cap)
    full = torch.bincount(ex.flatten(), minlength=e)
    assert dropped == int((full - cap).clamp(min=0).sum()) and len(order) == t * k - dropped
    assert torch.equal(counts, full.clamp(max=cap))
    # every expert's group holds only its own assignments, in priority order (first choices, then token order)
    flat = ex.T.reshape(-1)
    groups = flat[order].split(counts.tolist())
    assert all((g == i).all() for i, g in enumerate(groups))
    assert all((o.diff() > 0).all() for o in order.split(counts.tolist()))


def test_layer_drops_assignments_over_capacity():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 12, 4, 2, capacity_factor=0.5)
    free = MoEFeedForward(8, 12, 4, 2)
    free.load_state_dict(moe.state_dict())
    x = torch.randn(2, 5, 8)
    y, y_free = moe(x), free(x)
    assert moe.last_dropped == 20 - 4 * math.ceil(0.5 * 10 * 2 / 4)
    assert not torch.allclose(y, y_free)
    roomy = MoEFeedForward(8, 12, 4, 2, capacity_factor=2.0)  # capacity = all tokens: nothing is dropped
    roomy.load_state_dict(moe.state_dict())
    torch.testing.assert_close(roomy(x), y_free)
    assert roomy.last_dropped == 0
    # a token whose every assignment was dropped gets exactly zero (the decoder's residual carries it)
    tiny = MoEFeedForward(8, 12, 1, 1, capacity_factor=0.2)
    y = tiny(torch.randn(1, 10, 8))
    assert tiny.last_dropped == 8 and (y[0, 2:] == 0).all() and (y[0, :2] != 0).any()


def test_layer_runs_under_bf16_autocast():
    "The training engine uses bf16 autocast on GPUs: experts compute in bf16, the output keeps the input's dtype."
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 24, 4, 2, capacity_factor=1.0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, moe(x), atol=0.02, rtol=0.05)
    y.sum().backward()
    assert moe.router.weight.grad is not None and moe.gate_proj.grad.dtype == torch.float32


# --- parity with transformers' Mixtral block --------------------------------------------------------------------------

@pytest.mark.parametrize("e,k", [(1, 1), (4, 1), (4, 2), (8, 2), (3, 3)])
def test_layer_equals_mixtral_sparse_moe_block(e, k):
    ours, theirs = mixtral_pair(e=e, k=k)
    caught = []
    theirs.gate.register_forward_hook(lambda m, i, out: caught.append(out[0]))
    x = torch.randn(3, 9, 16, requires_grad=True)
    y, ref = ours(x), theirs(x)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.last_router_logits, caught[0], atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    mine = torch.autograd.grad((y * g).sum(), [x, ours.router.weight, ours.gate_proj, ours.up_proj, ours.down_proj])
    ref_g = torch.autograd.grad((ref * g).sum(), [x, theirs.gate.weight, theirs.experts.gate_up_proj, theirs.experts.down_proj])
    torch.testing.assert_close(mine[0], ref_g[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mine[1], ref_g[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([mine[2], mine[3]], 1), ref_g[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mine[4], ref_g[3], atol=1e-5, rtol=1e-4)


def test_copy_to_mixtral_refuses_other_sizes():
    ours, _ = mixtral_pair(hidden=24)
    other = MixtralSparseMoeBlock(MixtralConfig(hidden_size=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2))
    with pytest.raises(ValueError, match=r"gate_up_proj is \(4, 64, 16\), ours needs \(4, 48, 16\)"):
        copy_to_mixtral(ours, other)


# --- balancing losses -------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 3), b=st.integers(1, 3), s=st.integers(1, 6), e=st.integers(1, 6), masked=st.booleans(),
       data=st.data())
def test_switch_loss_equals_transformers(layers, b, s, e, masked, data):
    k = data.draw(st.integers(1, e))
    g = torch.Generator().manual_seed(layers * 1000 + b * 100 + s * 10 + e)
    logits = tuple(torch.randn(b * s, e, generator=g) * 2 for _ in range(layers))
    mask = None
    if masked:
        mask = (torch.rand(b, s, generator=g) > 0.3).long()
        mask[0, 0] = 1  # at least one real token
    ours = load_balancing_loss(logits, k, mask)
    theirs = load_balancing_loss_func(logits, num_experts=e, top_k=k, attention_mask=mask)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    if layers == 1:  # and the per-token definition
        m = None if mask is None else mask.flatten().bool()
        assert abs(ours.item() - loop_switch(logits[0], k, m)) < 1e-5


@pytest.mark.parametrize("e,k", [(2, 1), (4, 1), (4, 2), (8, 2), (8, 4)])
def test_switch_loss_is_k_balanced_and_e_collapsed(e, k):
    torch.testing.assert_close(load_balancing_loss(cyclic_logits(4 * e, e, k), k), torch.tensor(float(k)))
    collapsed = torch.full((10, e), -30.0)
    collapsed[:, 0] = 30.0
    assert abs(load_balancing_loss(collapsed, k).item() - e) < 1e-4


@pytest.mark.parametrize("e,k", [(2, 2), (4, 2), (8, 2), (4, 1)])
def test_deepspeed_l_aux_is_one_balanced_and_e_collapsed(e, k):
    balanced = cyclic_logits(4 * e, e, k)  # top-1 choices spread evenly too
    torch.testing.assert_close(deepspeed_l_aux(balanced), torch.tensor(1.0))
    torch.testing.assert_close(deepspeed_l_aux(balanced), top2gating_l_aux(balanced))
    collapsed = torch.full((10, e), -30.0)
    collapsed[:, 0] = 30.0
    assert abs(deepspeed_l_aux(collapsed).item() - e) < 1e-4
    # summed over layers as MoE-LLaVA does: about the number of MoE layers when balanced
    torch.testing.assert_close(deepspeed_l_aux((balanced, balanced, balanced)), torch.tensor(3.0))
    torch.testing.assert_close(deepspeed_l_aux((balanced, collapsed), reduce="mean"), (1 + deepspeed_l_aux(collapsed)) / 2)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 16), e=st.integers(1, 6))
def test_deepspeed_l_aux_equals_the_transcription(t, e):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t * 10 + e)) * 2
    torch.testing.assert_close(deepspeed_l_aux(logits), top2gating_l_aux(logits), atol=1e-6, rtol=1e-5)


def test_the_two_normalisations_differ_by_k_when_balanced():
    balanced = cyclic_logits(16, 4, 2)
    assert load_balancing_loss(balanced, 2).item() == pytest.approx(2.0)
    assert deepspeed_l_aux(balanced).item() == pytest.approx(1.0)


def test_pooled_loss_hides_a_layer_that_uses_half_its_experts():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([5.0, 5.0, -5.0, -5.0]).repeat(16, 1) + 0.1 * torch.randn(16, 4, generator=g)
    b = a[:, [2, 3, 0, 1]]
    assert load_balancing_loss((a, b), 2).item() == pytest.approx(2.0, abs=1e-3)  # looks balanced
    assert load_balancing_loss((a, b), 2, per_layer=True).item() == pytest.approx(4.0, abs=1e-3)  # it is not
    per = [load_balancing_loss(x, 2) for x in (a, b)]
    torch.testing.assert_close(load_balancing_loss((a, b), 2, per_layer=True), torch.stack(per).mean())


def test_balancing_gradient_lowers_the_busiest_expert():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]]).repeat(8, 1).requires_grad_(True)
    load_balancing_loss(logits, 1).backward()
    assert logits.grad[:, 0].sum() > 0 and (logits.grad[:, 2:].sum(0) < 0).all()  # descent lowers expert 0, raises the idle ones


def test_router_z_loss():
    torch.testing.assert_close(router_z_loss(torch.zeros(3, 4)), torch.tensor(math.log(4) ** 2))
    g = torch.Generator().manual_seed(0)
    two = (torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    want = torch.cat([x[mask.flatten().bool()] for x in two]).logsumexp(-1).pow(2).mean()
    torch.testing.assert_close(router_z_loss(two, mask), want)
    assert router_z_loss(tuple(10 * x for x in two)) > router_z_loss(two)


# --- upcycling --------------------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(e=st.integers(1, 6), scale=st.floats(0.0, 1000.0), seed=st.integers(0, 100), data=st.data())
def test_upcycled_layer_equals_the_dense_ffn_whatever_the_router(e, scale, seed, data):
    k = data.draw(st.integers(1, e))
    torch.manual_seed(seed)
    dense = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2))
    moe = MoEFeedForward.from_dense(dense, e, k)
    with torch.no_grad(): moe.router.weight.normal_(0, 1).mul_(scale)
    x = torch.randn(2, 7, 16)
    with torch.no_grad(): torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)


def test_from_dense_copies_and_refuses_biases():
    dense = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2))
    moe = MoEFeedForward.from_dense(dense, 3, 2, capacity_factor=1.5)
    assert moe.capacity_factor == 1.5 and moe.act == "silu" and moe.gate_proj.shape == (3, 40, 16)
    assert all(torch.equal(moe.down_proj[i], dense.down_proj.weight) for i in range(3))
    assert moe.router.weight.std() < 0.05  # small random router
    biased = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, mlp_bias=True))
    with pytest.raises(ValueError, match="has biases"): MoEFeedForward.from_dense(biased, 3, 2)


def test_ffn_cost_counts_active_experts():
    dense = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2))
    per_expert = 3 * 16 * 40
    assert ffn_cost(dense).active_params == per_expert and ffn_cost(dense).flops_per_token == 2 * per_expert
    c = ffn_cost(MoEFeedForward.from_dense(dense, 8, 2))
    assert c.total_params == 8 * per_expert + 8 * 16 and c.active_params == 2 * per_expert + 8 * 16
    assert c.flops_per_token == 2 * c.active_params


# --- bad input --------------------------------------------------------------------------------------------------------

def test_bad_input_names_the_values():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"): MoEFeedForward(8, 12, 4, 5)
    with pytest.raises(ValueError, match="num_experts=0 must be >= 1"): MoEFeedForward(8, 12, 0, 1)
    with pytest.raises(ValueError, match="capacity_factor=0 must be > 0"): MoEFeedForward(8, 12, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match=r"capacity_factor=-0.5 must be > 0"): MoEInjection(capacity_factor=-0.5)
    with pytest.raises(ValueError, match="act='relu'"): MoEFeedForward(8, 12, 4, 2, act="relu")
    with pytest.raises(ValueError, match="top_k=3 must be between 1 and num_experts=2"): route(torch.randn(4, 2), 3)
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"): load_balancing_loss(torch.randn(4, 4), 5)
    with pytest.raises(ValueError, match=r"got shapes \[\(6, 4\), \(6, 3\)\]"):
        load_balancing_loss((torch.randn(6, 4), torch.randn(6, 3)), 2)
    with pytest.raises(ValueError, match=r"got shapes \[\(6, 4\), \(6, 3\)\]"): deepspeed_l_aux((torch.randn(6, 4), torch.randn(6, 3)))
    with pytest.raises(ValueError, match=r"got shapes"): router_z_loss((torch.randn(6, 4), torch.randn(6, 5)))
    with pytest.raises(ValueError, match="attention_mask has 4 positions but a layer's router logits have 6 tokens"):
        load_balancing_loss(torch.randn(6, 4), 2, torch.ones(2, 2))
    with pytest.raises(ValueError, match="aux='l2' is not one of"): MoEInjection(aux="l2")
    with pytest.raises(ValueError, match="aux_coef=-1"): MoESettings(aux_coef=-1)
    with pytest.raises(ValueError, match="top_k=6 must be between 1 and num_experts=4"): MoESettings(top_k=6)
    with pytest.raises(ValueError, match="reduce='max'"): deepspeed_l_aux(torch.randn(4, 4), reduce="max")


# --- the injection in a VLM -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ZOO_DIR / "lm")


def tiny_lm(tok, layers=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LanguageModel(LlamaForCausalLM(cfg), tok)


def tiny_vlm(tok, injection):
    torch.manual_seed(1)
    vision = TinyViT(image_size=16, patch_size=4, dim=24, depth=1, heads=2, embed_dim=8)
    lm = tiny_lm(tok)
    torch.manual_seed(2)
    return VLM(vision, MLPProjector(vision.dim, lm.dim), injection, lm, cache=None)


def batch(tok, images=(1, 2, 1)):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, m in enumerate(images):
        segs = [(" ".join(["<image> a red circle ."] * m) + " question : what colour ?" + " answer :" * (i + 1), False), ("red", True)]
        ids, labels = encode_segments(tok, segs, num_media=m)
        rows.append(dict(input_ids=ids, labels=labels, media=torch.rand(m, 1, 3, 16, 16, generator=g)))
    return collate_vlm(rows, tok.pad_token_id)


def test_upcycle_lm_replaces_every_other_ffn(tok):
    lm = tiny_lm(tok)
    moes = upcycle_lm(lm, 4, 2, every=2)
    assert [m.layer_index for m in moes] == [0, 2]
    assert [type(layer.mlp).__name__ for layer in lm.model.model.layers] == ["MoEFeedForward", "LlamaMLP"] * 2
    assert [m.layer_index for m in upcycle_lm(tiny_lm(tok), 4, 2, every=1, first=1)] == [1, 2, 3]
    with pytest.raises(ValueError, match="layer 0 is a mixture of experts already"): upcycle_lm(lm, 4, 2, every=2)
    with pytest.raises(ValueError, match=r"first=4 a layer of the 4 \(0 to 3\)"): upcycle_lm(tiny_lm(tok), 4, 2, first=4)
    with pytest.raises(ValueError, match="every=0 must be >= 1"): upcycle_lm(tiny_lm(tok), 4, 2, every=0)


def test_moe_vlm_equals_the_prefix_vlm_at_initialisation(tok):
    b = batch(tok)
    prefix, moe = tiny_vlm(tok, PrefixInjection()), tiny_vlm(tok, MoEInjection(4, 2, 2, aux="none"))
    switch = tiny_vlm(tok, MoEInjection(4, 2, 2, aux="switch", aux_coef=0.01))
    with torch.no_grad():
        lp, lm_, ls = prefix(b), moe(b), switch(b)
        out = switch.injection(switch.lm, b, switch.visual_tokens(b), b["frames"] > 0)
    assert abs(lp.item() - lm_.item()) < 1e-4 * max(1.0, abs(lp.item()))
    assert out.aux_loss is not None and out.aux_loss.item() == pytest.approx(0.01 * 2, rel=0.2)
    assert ls.item() == pytest.approx(lp.item() + out.aux_loss.item() * count_targets(out.labels), rel=1e-5)
    torch.testing.assert_close(lm_loss_sum(out.logits, out.labels), lp, atol=1e-4, rtol=1e-5)


def test_aux_loss_gives_the_routers_a_gradient_through_the_vlm(tok):
    vlm = tiny_vlm(tok, MoEInjection(4, 2, 2, aux="deepspeed", z_coef=1e-3))
    routers = [m.router.weight for m in vlm.injection.moe]
    assert all(r.requires_grad for r in routers)
    names = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert any(n.startswith("injection.moe.0.router") for n in names)
    assert all(n.startswith(("bridge.", "injection.moe.")) for n in names)  # the rest of the LM stays frozen
    vlm.train()
    vlm(batch(tok)).backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)
    # the aux loss alone also reaches every router: it is part of what VLM.forward returns
    vlm.zero_grad()
    vlm(batch(tok))
    vlm.injection.aux_loss(tuple(m.last_router_logits for m in vlm.injection.moe)).backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)


def test_at_initialisation_only_the_balancing_loss_moves_the_routers(tok):
    "Identical experts and weights that sum to 1: the LM loss cannot see the router, so the aux loss must reach the total."
    b = batch(tok)
    norms = {}
    for aux in ("none", "switch"):
        vlm = tiny_vlm(tok, MoEInjection(4, 2, 2, aux=aux)).train()
        vlm(b).backward()
        norms[aux] = [m.router.weight.grad.norm().item() for m in vlm.injection.moe]
        assert all(m.gate_proj.grad.norm() > 0 for m in vlm.injection.moe)  # the experts learn either way
    assert max(norms["none"]) < 1e-4 * min(norms["switch"]), norms


def test_aux_loss_reads_only_real_tokens(tok):
    vlm = tiny_vlm(tok, MoEInjection(4, 2, 2, aux="switch", aux_coef=1.0, z_coef=0.5))
    b = batch(tok)
    with torch.no_grad():
        out = vlm.injection(vlm.lm, b, vlm.visual_tokens(b), b["frames"] > 0)
        real = out.attention_mask.flatten()
        logits = tuple(m.last_router_logits for m in vlm.injection.moe)
        want = load_balancing_loss(logits, 2, out.attention_mask) + 0.5 * router_z_loss(logits, out.attention_mask)
        unmasked = load_balancing_loss(logits, 2) + 0.5 * router_z_loss(logits)
    assert (~real).any()  # the batch has padding
    torch.testing.assert_close(out.aux_loss, want)
    assert abs(out.aux_loss - unmasked) > 1e-6


def test_routing_stats_count_image_and_text_tokens(tok):
    vlm = tiny_vlm(tok, MoEInjection(4, 2, 2))
    b = batch(tok)
    with torch.no_grad():
        visual = vlm.visual_tokens(b)
        out = vlm.injection(vlm.lm, b, visual, b["frames"] > 0)
    s = vlm.injection.last_stats
    n_image = int((b["frames"] > 0).sum()) * visual.shape[2]
    n_real = int(out.attention_mask.sum())
    assert s.layers == [0, 2] and s.image.shape == (2, 4) and s.dropped == [0, 0]
    assert (s.image.sum(-1) == 2 * n_image).all() and (s.text.sum(-1) == 2 * (n_real - n_image)).all()
    torch.testing.assert_close(s.load().sum(-1), torch.ones(2))
    frac = s.image_fraction()
    assert ((frac >= 0) & (frac <= 1)).all()
    direct = routing_stats((torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0]]),), torch.tensor([True, False, True]), 1)
    assert direct.image.tolist() == [[2, 0, 0]] and direct.text.tolist() == [[0, 1, 0]]


def test_settings_build_the_injection():
    inj = moe_injection(MoESettings(num_experts=8, top_k=2, every=1, first=1, aux="deepspeed", aux_coef=0.02, capacity_factor=1.25))
    assert isinstance(inj, MoEInjection) and inj.visual_width == "lm"
    assert inj.kw == dict(num_experts=8, top_k=2, every=1, first=1, capacity_factor=1.25)
    assert (inj.aux, inj.aux_coef, inj.z_coef) == ("deepspeed", 0.02, 0.0)
    s = MoESettings()
    assert (s.num_experts, s.top_k, s.every, s.first, s.aux, s.aux_coef, s.z_coef, s.capacity_factor) == \
        (4, 2, 2, 0, "switch", 0.01, 0.0, None)


def test_injection_refuses_a_second_attach_and_a_forward_before_attach(tok):
    inj = MoEInjection()
    with pytest.raises(ValueError, match="call attach"): inj(tiny_lm(tok), batch(tok), torch.zeros(3, 2, 4, 32), torch.ones(3, 2, dtype=torch.bool))
    vlm = tiny_vlm(tok, inj)
    with pytest.raises(ValueError, match="attached to an LM already"): inj.attach(vlm.lm, 32)


def test_routing_off_is_the_dense_lm_and_fresh_on_recopies_expert_zero(tok):
    """MoE-Tuning: stages I and II run expert 0 (the dense FFN) with no router and no aux loss; stage III re-upcycles."""
    b = batch(tok)
    moe, prefix = tiny_vlm(tok, MoEInjection(4, 2, aux="switch", aux_coef=0.5)), tiny_vlm(tok, PrefixInjection())
    moe.injection.set_routing(False)
    with torch.no_grad():
        for m in moe.injection.moe: m.gate_proj[1:].normal_(); m.router.weight.normal_()  # unused while routing is off
        assert torch.allclose(moe(b), prefix(b), atol=1e-4)  # no aux loss added, the FFN is expert 0
        out = moe.injection(moe.lm, b, moe.visual_tokens(b), b["frames"] > 0)
    assert out.aux_loss is None and moe.injection.moe[0].last_router_logits is None
    moe.zero_grad(); moe(b).backward()
    m0 = moe.injection.moe[0]
    assert m0.gate_proj.grad[0].abs().sum() > 0 and m0.gate_proj.grad[1:].abs().sum() == 0 and m0.router.weight.grad is None
    with torch.no_grad(): m0.gate_proj[0].add_(0.1)  # stage II trained the FFN
    trained = m0.gate_proj[0].clone()
    moe.injection.set_routing(True, fresh=False)  # a resumed stage III keeps its experts
    assert not torch.equal(m0.gate_proj[1], trained)
    moe.injection.set_routing(True, fresh=True)  # a fresh stage III copies the trained FFN into every expert
    assert all(torch.equal(m0.gate_proj[e], trained) for e in range(4))
    with torch.no_grad(): assert moe.injection(moe.lm, b, moe.visual_tokens(b), b["frames"] > 0).aux_loss is not None
