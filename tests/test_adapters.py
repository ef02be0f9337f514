"""LaVIN's mixture-of-modality adapters: the router, the adapter, insertion into a frozen transformers LM, the injection."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mmbridge_ref.backbones.towers import ZOO_DIR, LanguageModel, TinyViT, load_tokenizer
from mmbridge_ref.bridges.projectors import MLPProjector
from mmbridge_ref.inject.adapters import (MODALITIES, AdaptedNorm, LaVINInjection, LaVINSettings, MoMAdapter,
                                         add_mm_adapters, lavin_injection, router_weights, use_modality)
from mmbridge_ref.inject.prefix import PrefixInjection
from mmbridge_ref.vlm import VLM, collate_vlm, encode_segments, generate

torch.set_num_threads(1)
LLAMA = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ZOO_DIR / "lm")  # the zoo's tokenizer knows <image>


def tiny_lm(tok, seed=0, layers=2):
    """A random Llama with the real layer structure (RoPE, RMSNorm, grouped KV heads) at width 32."""
    torch.manual_seed(seed)
    return LanguageModel(LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers, **LLAMA)), tok)


def tiny_vlm(tok, injection, seed=0):
    """The same frozen tower, bridge weights and LM (by seed) around any injection; no feature cache."""
    torch.manual_seed(seed)
    vision = TinyViT(image_size=16, patch_size=4, dim=24, depth=1, heads=2, embed_dim=8)
    lm = tiny_lm(tok, seed)
    torch.manual_seed(seed)
    return VLM(vision, MLPProjector(24, 32), injection, lm, cache=None)


def mixed_rows(tok, with_image=(True, False, True, False), answer=True, seed=0):
    """Image instructions (one <image>, one 16 px image) and text-only ones (no <image>, no media), in the given order."""
    g, out = torch.Generator().manual_seed(seed), []
    for i, image in enumerate(with_image):
        prompt = ("<image> " if image else "note : a red circle . ") + f"question {i} : what colour ? answer :"
        ids, labels = encode_segments(tok, [(prompt, False)] + [("red", True)] * answer, num_media=int(image), eos=answer)
        media = torch.rand(1, 1, 3, 16, 16, generator=g) if image else torch.zeros(0, 1, 3, 16, 16)
        out.append(dict(input_ids=ids, labels=labels, media=media))
    return out


def open_paths(injection, std=0.2, seed=1):
    """Give every up-projection a non-zero weight (as training would), so that routing changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in injection.adapters:
            for up in a.up: up.weight.copy_(torch.randn(up.weight.shape, generator=g) * std)


# --- the router ------------------------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=1, max_size=6), st.floats(0.1, 100))
def test_router_weights_are_a_softmax_of_logits_over_t(logits, t):
    x = torch.tensor(logits)
    w = router_weights(x, t)
    assert torch.allclose(w.sum(), torch.tensor(1.0), atol=1e-6) and (w >= 0).all()
    assert torch.allclose(w, torch.softmax(x / t, -1), atol=1e-6)


def test_a_large_temperature_gives_uniform_weights_and_a_small_one_picks_the_largest():
    logits = torch.tensor([[3.0, -2.0, 0.5], [10.0, 0.0, -10.0]])
    assert torch.allclose(router_weights(logits, 1e6), torch.full((2, 3), 1 / 3), atol=1e-5)
    assert torch.equal(router_weights(logits, 1e-3).argmax(-1), logits.argmax(-1))
    assert router_weights(logits, 1e-3)[0, 0] > 0.999
    w1, w10 = router_weights(logits, 1.0), router_weights(logits, 10.0)
    assert (w10.max(-1).values < w1.max(-1).values).all()  # a higher temperature is always flatter


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_a_temperature_that_is_not_positive_is_refused(t):
    with pytest.raises(ValueError, match=f"temperature={t} must be > 0"): router_weights(torch.zeros(2), t)
    with pytest.raises(ValueError, match=f"temperature={t} must be > 0"): MoMAdapter(8, temperature=t)
    with pytest.raises(ValueError, match=f"temperature={t} must be > 0"): LaVINSettings(temperature=t)
    with pytest.raises(ValueError, match=f"temperature={t} must be > 0"): LaVINInjection(temperature=t)


# --- the adapter -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, -3])
def test_a_rank_below_one_is_refused_naming_it(rank):
    with pytest.raises(ValueError, match=f"rank={rank} must be an integer >= 1"): MoMAdapter(8, rank=rank)
    with pytest.raises(ValueError, match=f"rank={rank} must be an integer >= 1"): LaVINSettings(rank=rank)
    with pytest.raises(ValueError, match=f"rank={rank} must be an integer >= 1"): LaVINInjection(rank=rank)
    with pytest.raises(ValueError, match=f"rank={rank} must be an integer >= 1"): add_mm_adapters(LlamaForCausalLM(LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)), rank=rank)


def test_other_bad_settings_are_refused_naming_them():
    with pytest.raises(ValueError, match="num_paths=0"): MoMAdapter(8, num_paths=0)
    with pytest.raises(ValueError, match="where='mlp' is not one of"): LaVINSettings(where="mlp")
    with pytest.raises(ValueError, match="where='mlp' is not one of"): LaVINInjection(where="mlp")
    a = MoMAdapter(8, rank=2)
    with pytest.raises(ValueError, match=r"modality shape \(3, 8\) is not \[b, d\]=\(2, 8\)"): a(torch.randn(2, 5, 8), torch.randn(3, 8))


def test_the_adapter_starts_as_the_identity_and_matches_lavins_conv_form():
    """LaVIN's RepAdapter_Router written as 1x1 convolutions (groups=1, scale 1, no dropout) over x [b, d, t]."""
    torch.manual_seed(0)
    a = MoMAdapter(12, rank=3, temperature=10.0)
    x, m = torch.randn(2, 5, 12), torch.randn(2, 12)
    assert torch.equal(a(x, m), x)  # zero up-projections: exactly x
    for up in a.up: nn.init.normal_(up.weight); nn.init.normal_(up.bias)
    conv_a, conv_b, conv_d = nn.Conv1d(12, 3, 1), nn.Conv1d(3, 12, 1), nn.Conv1d(3, 12, 1)
    with torch.no_grad():
        for conv, lin in ((conv_a, a.down), (conv_b, a.up[0]), (conv_d, a.up[1])):
            conv.weight.copy_(lin.weight[..., None]); conv.bias.copy_(lin.bias)
    w = torch.softmax((m @ a.router.weight.T + a.router.bias) / 10.0, -1)
    xt = x.transpose(1, 2)
    h = conv_a(xt)
    theirs = (conv_b(h) * w[:, 0, None, None] + conv_d(h) * w[:, 1, None, None] + xt).transpose(1, 2)
    assert torch.allclose(a(x, m), theirs, atol=1e-5)


# --- insertion into a frozen LM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("where,per_layer", [("attn", 1), ("block", 2)])
def test_insertion_keeps_the_lm_unchanged_at_init(tok, where, per_layer):
    lm = tiny_lm(tok, layers=3).model.eval()
    ids = torch.randint(0, len(tok), (2, 9))
    with torch.no_grad(): before = lm(input_ids=ids).logits
    adapters = add_mm_adapters(lm, rank=4, where=where)
    assert len(adapters) == 3 * per_layer
    norms = [n for layer in lm.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert sum(isinstance(n, AdaptedNorm) for n in norms) == 3 * per_layer
    with torch.no_grad(), use_modality(lm, torch.randn(2, 32)) as ctx: after = lm(input_ids=ids).logits
    assert torch.equal(after, before)
    assert ctx.embedding is None  # the context is emptied after the block


def test_the_lm_refuses_to_run_without_a_modality_and_a_second_insertion(tok):
    lm = tiny_lm(tok).model
    with pytest.raises(ValueError, match="call add_mm_adapters first"): use_modality(lm, torch.zeros(1, 32)).__enter__()
    add_mm_adapters(lm)
    with pytest.raises(ValueError, match="use_modality"): lm(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="has modality adapters already"): add_mm_adapters(lm)
    with pytest.raises(RuntimeError), use_modality(lm, torch.zeros(1, 32)) as ctx: raise RuntimeError("boom")
    assert ctx.embedding is None  # emptied even when the block fails


# --- the injection in the composer -----------------------------------------------------------------------------------

def test_zero_init_gives_the_prefix_injections_logits_and_loss(tok):
    lavin, prefix = tiny_vlm(tok, LaVINInjection(rank=4)), tiny_vlm(tok, PrefixInjection())
    b = collate_vlm(mixed_rows(tok), tok.pad_token_id)
    with torch.no_grad():
        ours = lavin.injection(lavin.lm, b, lavin.visual_tokens(b), b["frames"] > 0)
        theirs = prefix.injection(prefix.lm, b, prefix.visual_tokens(b), b["frames"] > 0)
        assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.labels, theirs.labels)
        assert torch.equal(lavin(b), prefix(b))
        open_paths(lavin.injection)  # and the check can fail: opened paths change the logits
        assert not torch.allclose(lavin.injection(lavin.lm, b, lavin.visual_tokens(b), b["frames"] > 0).logits, theirs.logits)


def test_only_the_bridge_adapters_routers_and_modality_train(tok):
    v = tiny_vlm(tok, LaVINInjection(rank=4))
    trainable = {n for n, p in v.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bridge.", "injection.")) for n in trainable)
    injected = {n.removeprefix("injection.").split(".")[0] for n in trainable if n.startswith("injection.")}
    assert injected == {"adapters", "modality"}
    in_lm = [n for n, p in v.lm.named_parameters(remove_duplicate=False) if p.requires_grad]
    assert in_lm and all(".adapter." in n for n in in_lm)  # the adapters sit inside the LM, nothing else there trains
    n_adapters = sum(p.numel() for a in v.injection.adapters for p in a.parameters())
    assert n_adapters == 2 * (32 * 4 + 4 + 2 * (4 * 32 + 32) + 32 * 2 + 2)  # down, two ups, router, per layer
    frozen = {n: p.detach().clone() for n, p in v.named_parameters() if not p.requires_grad}
    b = collate_vlm(mixed_rows(tok), tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in v.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2): v(b).backward(); opt.step(); opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in v.named_parameters() if n in frozen)


def test_gradient_reaches_the_router_once_the_paths_are_open(tok):
    v = tiny_vlm(tok, LaVINInjection(rank=4))
    b = collate_vlm(mixed_rows(tok), tok.pad_token_id)
    a0, modality = v.injection.adapters[0], v.injection.modality
    v(b).backward()  # step 0: behind zero up-projections only the ups (and the bridge) get a gradient
    assert a0.up[0].weight.grad.abs().sum() > 0 and v.bridge.proj[0].weight.grad.abs().sum() > 0
    assert a0.router.weight.grad.abs().sum() == 0 and modality.weight.grad.abs().sum() == 0
    opt = torch.optim.AdamW([p for p in v.parameters() if p.requires_grad], lr=1e-2)
    opt.step(); opt.zero_grad()
    v(b).backward()  # step 1: the paths differ, so their mixture matters
    assert a0.router.weight.grad.abs().sum() > 0 and a0.down.weight.grad.abs().sum() > 0
    assert modality.weight.grad[0].abs().sum() > 0 and modality.weight.grad[1].abs().sum() > 0  # both rows are used


def test_text_only_rows_read_the_text_embedding_and_image_rows_the_image_one(tok):
    v = tiny_vlm(tok, LaVINInjection(rank=4))
    seen = []
    norm = v.lm.model.model.layers[1].input_layernorm
    norm.register_forward_pre_hook(lambda mod, args: seen.append(mod.context.embedding.detach().clone()))
    order = (True, False, False, True, False)
    b = collate_vlm(mixed_rows(tok, order), tok.pad_token_id)
    with torch.no_grad(): v(b)
    emb = v.injection.modality.weight.detach()
    expect = torch.stack([emb[MODALITIES.index("image" if image else "text")] for image in order])
    assert torch.equal(seen[0], expect)
    w = v.injection.last_router_weights
    assert w.shape == (2, len(order), 2)
    for k, a in enumerate(v.injection.adapters):
        assert torch.allclose(w[k], a.route(expect).detach())


def test_a_batch_without_any_image_runs_and_generates(tok):
    v = tiny_vlm(tok, LaVINInjection(rank=4)).eval()
    open_paths(v.injection)
    b = collate_vlm(mixed_rows(tok, (False, False)), tok.pad_token_id)
    assert b["frames"].shape[1] == 0  # no media axis at all
    loss = v(b)
    assert torch.isfinite(loss) and loss > 0
    assert torch.allclose(v.injection.last_router_weights[:, 0], v.injection.last_router_weights[:, 1])  # one modality, one mixture
    assert len(generate(v, collate_vlm(mixed_rows(tok, (False, False), answer=False), tok.pad_token_id), 4)) == 2


def test_a_row_gets_the_same_logits_alone_or_in_a_mixed_batch(tok):
    """Routing is per row: a text-only row's mixture must not depend on the image rows beside it."""
    v = tiny_vlm(tok, LaVINInjection(rank=4)).eval()
    open_paths(v.injection)
    with torch.no_grad(): nn.init.normal_(v.injection.modality.weight, std=3.0)  # two clearly different mixtures
    rows = mixed_rows(tok, (True, False, True), answer=False)
    together = generate(v, collate_vlm(rows, tok.pad_token_id), 5)
    alone = [generate(v, collate_vlm([r], tok.pad_token_id), 5)[0] for r in rows]
    assert together == alone
    b, one = collate_vlm(rows, tok.pad_token_id), collate_vlm([rows[1]], tok.pad_token_id)
    with torch.no_grad():
        mixed = v.injection(v.lm, b, v.visual_tokens(b), b["frames"] > 0).logits
        single = v.injection(v.lm, one, v.visual_tokens(one), one["frames"] > 0).logits
    assert torch.allclose(mixed[1, :single.shape[1]], single[0], atol=1e-5)


def test_the_modality_changes_the_output_only_once_the_paths_are_open(tok):
    """The same text under the text and the image embedding: equal at init, different once the paths are open."""
    v = tiny_vlm(tok, LaVINInjection(rank=4)).eval()
    with torch.no_grad(): nn.init.normal_(v.injection.modality.weight, std=3.0)
    b = collate_vlm(mixed_rows(tok, (False,)), tok.pad_token_id)
    m = v.injection.modality.weight

    @torch.no_grad()
    def logits(kind):
        with use_modality(v.lm.model, m[MODALITIES.index(kind)][None]): return v.lm(input_ids=b["input_ids"])

    assert torch.equal(logits("text"), logits("image"))
    open_paths(v.injection)
    assert not torch.allclose(logits("text"), logits("image"))
    with torch.no_grad(): through_injection = v.injection(v.lm, b, v.visual_tokens(b), b["frames"] > 0).logits
    assert torch.allclose(through_injection, logits("text"))  # a row without images is read as text


def test_the_settings_build_the_injection_and_a_second_attach_is_refused(tok):
    inj = lavin_injection(LaVINSettings(rank=2, temperature=5.0, where="block", num_paths=3))
    assert inj.kw == dict(rank=2, temperature=5.0, where="block", num_paths=3)
    v = tiny_vlm(tok, inj)
    assert len(inj.adapters) == 4 and all(len(a.up) == 3 and a.temperature == 5.0 for a in inj.adapters)
    with pytest.raises(ValueError, match="attached to an LM already"): inj.attach(tiny_lm(tok), 32)
    with pytest.raises(ValueError, match="must have the LM's width 32"): LaVINInjection().attach(tiny_lm(tok), 24)
    b = collate_vlm(mixed_rows(tok), tok.pad_token_id)
    with torch.no_grad(): v(b)
    assert inj.last_router_weights.shape == (4, 4, 3)
    assert torch.allclose(inj.last_router_weights.sum(-1), torch.ones(4, 4))


def test_a_deep_copy_keeps_its_own_context(tok):
    """A copied model (e.g. an EMA or a reference copy) must route by its own modality, not the original's."""
    v = tiny_vlm(tok, LaVINInjection(rank=4)).eval()
    w = copy.deepcopy(v)
    assert w.lm.model.modality_context is not v.lm.model.modality_context
    assert w.lm.model.model.layers[0].input_layernorm.context is w.lm.model.modality_context
    b = collate_vlm(mixed_rows(tok), tok.pad_token_id)
    with torch.no_grad(): assert torch.equal(v(b), w(b))
