"""The composer: every pair trains, the composer equals the models it replaced (Flamingo, BLIP-2's stage 2) on the same
weights, the splice keeps counts and labels right, the cache never mixes encoders, generation and scoring are right."""
import contextlib
import io

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from mmbridge_ref.backbones.towers import (ZOO_DIR, LanguageModel, TinyViT, build_lm, freeze, lm_loss_sum,
                                           load_tokenizer)
from mmbridge_ref.bridges.projectors import MLPProjector
from mmbridge_ref.bridges.qformer import QFormer, QFormerBridge
from mmbridge_ref.bridges.resampler import PerceiverResampler
from mmbridge_ref.data import shapesworld as sw
from mmbridge_ref.inject.prefix import PrefixInjection, splice_visual_tokens
from mmbridge_ref.inject.xattn import XAttnInjection, media
from mmbridge_ref.recipes.vlm import TINY_CONFIG
from mmbridge_ref.train.config import ConfigError, load_config
from mmbridge_ref.train.loop import fit
from mmbridge_ref.vlm import (BRIDGES, INJECTIONS, VLM, FeatureCache, build_vlm, choose, collate_vlm, encode_segments,
                              encoder_fingerprint, generate, prompt_tokens, score, sequence_logprobs)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ZOO_DIR / "lm")  # the zoo's tokenizer: it knows <image>


def tiny_lm(tok, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LanguageModel(LlamaForCausalLM(cfg), tok)


def tiny_vision(seed=0):
    torch.manual_seed(seed)
    return TinyViT(image_size=16, patch_size=4, dim=24, depth=1, heads=2, embed_dim=8)


def rows(tok, n=3, seed=0, media_per_row=(1, 2, 1), answer=True):
    """Rows with 1 or 2 single-frame images each (16 px), their <image> placeholders in the text."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        m = media_per_row[i % len(media_per_row)]
        segs = [(" ".join(["<image> a red circle ."] * m) + " question : what colour ? answer :", False)]
        ids, labels = encode_segments(tok, segs + [("red", True)] * answer, num_media=m, eos=answer)
        out.append(dict(input_ids=ids, labels=labels, media=torch.rand(m, 1, 3, 16, 16, generator=g), keys=[f"r{seed}-{i}-{k}" for k in range(m)]))
    return out


# --- every pair trains ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bridge", sorted(BRIDGES))
@pytest.mark.parametrize("injection", sorted(INJECTIONS))
def test_every_pair_trains_three_steps_through_the_recipe(tmp_path, bridge, injection):
    cfg = load_config(TINY_CONFIG, [f"model.bridge={bridge}", f"model.injection={injection}", "stages.0.steps=3",
                                    "train.batch_size=4", "data.eval_size=0", f"train.run_dir={tmp_path}/{{name}}"])
    with contextlib.redirect_stdout(io.StringIO()): res = fit(cfg, progress=False)
    assert res.step == 3 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in res.history)
    saved = load_config(res.run_dir / "config.yaml")  # the run records its pair
    assert (saved.model["bridge"], saved.model["injection"]) == (bridge, injection)


def test_only_the_bridge_and_injection_change(tok):
    v = VLM(tiny_vision(), PerceiverResampler(24, depth=1, num_latents=4, heads=2, dim_head=8, max_frames=4),
            XAttnInjection(every=1, heads=2, dim_head=8), tiny_lm(tok))
    b = collate_vlm(rows(tok), tok.pad_token_id)
    frozen = {n: p.detach().clone() for n, p in v.named_parameters() if not p.requires_grad}
    to_q = v.injection.blocks[0].attn.to_q.weight.detach().clone()
    trainable = [n for n, p in v.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("bridge.", "injection.")) for n in trainable)
    opt = torch.optim.AdamW([p for p in v.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        v(b).backward()
        if step == 0:  # behind the closed gates only the gates get a gradient
            blk = v.injection.blocks[0]
            assert blk.attn_gate.grad.abs() > 0 and blk.attn.to_q.weight.grad.abs().sum() == 0
            assert v.bridge.latents.grad.abs().sum() == 0
        opt.step(); opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in v.named_parameters() if n in frozen)
    assert not torch.equal(v.injection.blocks[0].attn.to_q.weight, to_q)  # behind the opened gate it moved at step 2
    assert all(abs(g) > 0 for g, _ in v.injection.gates())


# --- the composer equals the models it replaced ----------------------------------------------------------------------

def test_composer_equals_the_old_flamingo_forward(tok):
    """The removed `Flamingo.forward`: resampler over each row's media, then the LM inside `media(...)` with φ."""
    torch.manual_seed(0)
    v = VLM(tiny_vision(), PerceiverResampler(24, depth=1, num_latents=4, heads=2, dim_head=8, max_frames=4),
            XAttnInjection(every=1, heads=2, dim_head=8), tiny_lm(tok), cache=None)
    with torch.no_grad():
        for blk in v.injection.blocks: blk.attn_gate.fill_(0.7); blk.ff_gate.fill_(-0.3)  # open, so images matter
        b = collate_vlm(rows(tok), tok.pad_token_id)
        # the old path, written out: features [b, m, n, dv] -> resampler -> [b, m, q, dv] -> media(lm) -> logits
        feats = torch.stack([torch.stack([v.vision(b["pixels"][i, j, :1])[0] if b["frames"][i, j] else torch.zeros(16, 24)
                                          for j in range(b["frames"].shape[1])]) for i in range(len(b["frames"]))])
        tokens = v.bridge(feats.flatten(0, 1)).view(*feats.shape[:2], 4, 24) * (b["frames"] > 0)[..., None, None]
        with media(v.lm.model, tokens, b["input_ids"] == v.lm.image_token_id, media_mask=b["frames"] > 0):
            old = v.lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits
        new = v.injection(v.lm, b, v.visual_tokens(b), b["frames"] > 0).logits
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v(b), lm_loss_sum(old, b["labels"]), atol=1e-4, rtol=1e-5)


def test_composer_equals_the_old_blip2_stage2(tok):
    """The removed `Blip2.lm_inputs`: [BOS; projected queries; the text after BOS], labels -100 on the queries."""
    torch.manual_seed(0)
    lm = tiny_lm(tok)
    qf = QFormer(32, vision_dim=24, depth=2, num_queries=3, heads=4, vocab_size=len(tok) + 2)
    v = VLM(tiny_vision(), QFormerBridge(qf, lm.dim), PrefixInjection(), lm, cache=None)
    segs = [("caption :", False), ("a red circle .", True)]
    old_rows = [encode_segments(tok, segs, num_media=0) for _ in range(2)]  # what the old recipe fed: no <image>
    new = collate_vlm([dict(zip(("input_ids", "labels"), encode_segments(tok, [("<image> caption :", False), segs[1]], num_media=1)),
                            media=torch.rand(1, 1, 3, 16, 16, generator=torch.Generator().manual_seed(i))) for i in range(2)], tok.pad_token_id)
    with torch.no_grad():
        feats = v.vision(new["pixels"][:, 0, 0])
        prefix = v.bridge.proj(qf(feats).queries)  # [b, q, d]
        ids, labels = torch.tensor([r[0] for r in old_rows]), torch.tensor([r[1] for r in old_rows])
        emb = lm.embed(ids)
        embeds = torch.cat([emb[:, :1], prefix, emb[:, 1:]], 1)
        labels = torch.cat([labels[:, :1], torch.full((2, 3), -100), labels[:, 1:]], 1)
        old = lm(inputs_embeds=embeds)
        out = v.injection(v.lm, new, v.visual_tokens(new), new["frames"] > 0)
        torch.testing.assert_close(out.logits, old, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.labels, labels)
        torch.testing.assert_close(v(new), lm_loss_sum(old, labels))


# --- the splice -----------------------------------------------------------------------------------------------------

def naive_splice(embeds, ids, visual, image_id, mask, labels, media_mask):
    out = []
    for r in range(len(ids)):
        e, l, a, k = [], [], [], 0
        for j, t in enumerate(ids[r].tolist()):
            if t == image_id:
                e += list(visual[r, k]); l += [-100] * visual.shape[2]; a += [True] * visual.shape[2]; k += 1
            else: e.append(embeds[r, j]); l.append(int(labels[r, j])); a.append(bool(mask[r, j]))
        out.append((e, l, a))
    t = max(len(e) for e, _, _ in out)
    d = embeds.shape[-1]
    return (torch.stack([torch.stack(e + [torch.zeros(d)] * (t - len(e))) for e, _, _ in out]),
            torch.tensor([l + [-100] * (t - len(l)) for _, l, _ in out]), torch.tensor([a + [False] * (t - len(a)) for _, _, a in out]))


@st.composite
def splice_cases(draw):
    b, m, q = draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 4))
    counts = [draw(st.integers(0, m)) for _ in range(b)]
    texts = [draw(st.integers(1, 6)) for _ in range(b)]
    t = max(c + n for c, n in zip(counts, texts))
    ids = torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, (c, n) in enumerate(zip(counts, texts)):
        row = [9] * c + list(range(10, 10 + n))
        perm = draw(st.permutations(row))
        ids[i, :len(perm)] = torch.tensor(perm); mask[i, :len(perm)] = True
    media_mask = torch.arange(m)[None] < torch.tensor(counts)[:, None]
    return ids, mask, media_mask, q


@settings(max_examples=60, deadline=None)
@given(splice_cases())
def test_splice_equals_the_loop_and_keeps_every_count(case):
    ids, mask, media_mask, q = case
    b, t = ids.shape
    m = media_mask.shape[1]
    embeds, visual, labels = torch.randn(b, t, 5), torch.randn(b, m, q, 5), torch.where(mask, ids, -100)
    s = splice_visual_tokens(embeds, ids, visual, 9, attention_mask=mask, labels=labels, media_mask=media_mask)
    e, l, a = naive_splice(embeds, ids, visual, 9, mask, labels, media_mask)
    assert torch.equal(s.embeds, e) and torch.equal(s.labels, l) and torch.equal(s.attention_mask, a)
    assert torch.equal(s.visual.sum(1), media_mask.sum(1) * q)  # q slots per real image, none for padding images
    assert torch.equal(s.attention_mask.sum(1), mask.sum(1) + media_mask.sum(1) * (q - 1))
    assert not (s.labels[s.visual] != -100).any()  # a visual slot is never a target


def test_splice_count_mismatch_raises_with_both_counts():
    ids = torch.tensor([[1, 9, 5, 9, 2], [1, 9, 5, 6, 2]])
    with pytest.raises(ValueError, match=r"row 1 has 1 <image> placeholders \(id 9\) but 2 images"):
        splice_visual_tokens(torch.randn(2, 5, 4), ids, torch.randn(2, 2, 3, 4), 9)
    with pytest.raises(ValueError, match=r"row 0 has 2 <image> placeholders \(id 9\) but 1 images"):
        splice_visual_tokens(torch.randn(2, 5, 4), ids, torch.randn(2, 2, 3, 4), 9, media_mask=torch.tensor([[True, False], [True, False]]))
    with pytest.raises(ValueError, match="is not \\[b=2, m, q, d=4\\]"):
        splice_visual_tokens(torch.randn(2, 5, 4), ids, torch.randn(2, 2, 3, 5), 9)


def test_a_vlm_batch_with_a_dropped_image_is_refused(tok):
    v = VLM(tiny_vision(), MLPProjector(24, 32), PrefixInjection(), tiny_lm(tok))
    b = collate_vlm(rows(tok), tok.pad_token_id)
    b["frames"][1, 1] = 0  # row 1 keeps two placeholders but loses its second image
    with pytest.raises(ValueError, match="row 1 has 2 <image> placeholders"): v(b)


# --- the cache --------------------------------------------------------------------------------------------------------

def test_the_cache_never_serves_one_encoders_features_to_another(tok):
    cache = FeatureCache(max_items=100)
    e1, e2 = freeze(tiny_vision(0)), freeze(tiny_vision(1))
    assert encoder_fingerprint(e1) != encoder_fingerprint(e2)
    px = [torch.rand(1, 3, 16, 16) for _ in range(3)]
    keys = ["a", "b", "c"]
    f1 = cache.features(e1, encoder_fingerprint(e1), px, keys)
    f2 = cache.features(e2, encoder_fingerprint(e2), px, keys)  # same keys, other encoder
    for x, y, p in zip(f1, f2, px):
        torch.testing.assert_close(y, e2(p)); assert (x - y).abs().max() > 1e-3
    with torch.no_grad(): e1.blocks[0].ff.proj_in.weight.add_(0.5)  # the same encoder object, new weights (a rebuilt zoo)
    f3 = cache.features(e1, encoder_fingerprint(e1), px, keys)
    torch.testing.assert_close(f3[0], e1(px[0]))
    assert cache.misses == 9 and cache.hits == 0


def test_the_cache_is_bounded_and_serves_hits(tok):
    cache, enc = FeatureCache(max_items=2), freeze(tiny_vision())
    px = [torch.rand(1, 3, 16, 16) for _ in range(3)]
    cache.features(enc, "e", px[:2], ["a", "b"])
    cache.features(enc, "e", px[:1], ["a"])
    assert (cache.hits, cache.misses) == (1, 2)
    cache.features(enc, "e", px[2:], ["c"])  # evicts the least recently used: "b"
    assert len(cache) == 2 and ("e", "b") not in cache.store and ("e", "a") in cache.store
    with pytest.raises(ValueError, match="2 media but 1 keys"): cache.features(enc, "e", px[:2], ["a"])


def test_cached_and_uncached_models_agree(tok):
    b = collate_vlm(rows(tok), tok.pad_token_id)
    losses = [VLM(tiny_vision(), MLPProjector(24, 32), PrefixInjection(), tiny_lm(tok), cache=c)(b).item() for c in (None, FeatureCache())]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_a_model_whose_tower_changes_gets_fresh_features(tok):
    "A trained or reloaded tower (Yi-VL trains it) must not be served the features cached for its old weights."
    b = collate_vlm(rows(tok), tok.pad_token_id)
    v = VLM(tiny_vision(), MLPProjector(24, 32), PrefixInjection(), tiny_lm(tok), cache=FeatureCache())
    with torch.no_grad(): before = v(b).item()
    with torch.no_grad():
        for p in v.vision.parameters(): p.mul_(1.5)  # as an optimizer step or a load_state_dict would, in place
    fresh = VLM(v.vision, v.bridge, v.injection, v.lm, cache=None)
    with torch.no_grad(): after, want = v(b).item(), fresh(b).item()
    assert after == pytest.approx(want, rel=1e-6) and abs(after - before) > 1e-4


def test_a_trainable_tower_gets_gradients_and_skips_the_cache(tok):
    b = collate_vlm(rows(tok), tok.pad_token_id)
    cache = FeatureCache()
    v = VLM(tiny_vision(), MLPProjector(24, 32), PrefixInjection(), tiny_lm(tok), cache=cache)
    for p in v.vision.parameters(): p.requires_grad_(True)
    v(b).backward()
    grads = [p.grad for p in v.vision.parameters() if p.grad is not None]
    assert len(grads) > 0 and sum(g.abs().sum() for g in grads) > 0 and len(cache) == 0


# --- build_vlm ---------------------------------------------------------------------------------------------------------

def test_build_vlm_names_a_bad_key_or_value():
    with pytest.raises(ConfigError, match="model.injection: 'cross' is not one of"): build_vlm({"injection": "cross"})
    with pytest.raises(ConfigError, match="did you mean 'qformer'"): build_vlm({"qfromer": {}})
    with pytest.raises(ConfigError, match="model.xattn.mask"): build_vlm({"xattn": {"mask": "latest"}})
    with pytest.raises(ConfigError, match="model.vision: vision spec 'clipper'"): build_vlm({"vision": "clipper"})
    with pytest.raises(ConfigError, match="model.lm: LM spec 'lm'"): build_vlm({"lm": "lm"})


def test_the_bridge_width_follows_the_injection():
    prefix, xattn = build_vlm({"bridge": "resampler"}), build_vlm({"bridge": "resampler", "injection": "xattn"})
    assert prefix.bridge.dim_out == prefix.lm.dim and xattn.bridge.dim_out == xattn.vision.dim
    assert isinstance(xattn.bridge.proj, torch.nn.Identity)  # Flamingo's resampler keeps the vision width


# --- generation and scoring ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("injection", [PrefixInjection, lambda: XAttnInjection(every=1, heads=2, dim_head=8)])
def test_a_row_generates_the_same_alone_or_in_a_padded_batch(tok, injection):
    torch.manual_seed(0)
    v = VLM(tiny_vision(), PerceiverResampler(24, depth=1, num_latents=3, heads=2, dim_head=8, dim_out=32 if injection is PrefixInjection else None),
            injection(), tiny_lm(tok)).eval()
    if injection is not PrefixInjection:
        with torch.no_grad():
            for blk in v.injection.blocks: blk.attn_gate.fill_(1.0)
    r = rows(tok, n=3, answer=False)
    together = generate(v, collate_vlm(r, tok.pad_token_id), 6)
    alone = [generate(v, collate_vlm([x], tok.pad_token_id), 6)[0] for x in r]
    assert together == alone
    sampled = [generate(v, collate_vlm(r, tok.pad_token_id), 6, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1]  # the seed fixes a sample
    with pytest.raises(ValueError, match="temperature=-1"): generate(v, collate_vlm(r, tok.pad_token_id), 6, temperature=-1)


def test_greedy_generation_equals_transformers_without_media(tok):
    lm = build_lm("zoo:lm")
    v = VLM(tiny_vision(), MLPProjector(24, lm.dim), PrefixInjection(), lm).eval()
    prompts = ["note : small red circle , top left . question : what colour is the circle ? answer :", "caption :"]
    r = [dict(zip(("input_ids", "labels"), encode_segments(tok, [(p, False)], num_media=0, eos=False)), media=torch.zeros(0, 1, 3, 16, 16)) for p in prompts]
    ours = generate(v, collate_vlm(r, tok.pad_token_id), 12)
    theirs = [tok.decode(lm.model.generate(torch.tensor([x["input_ids"]]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                           eos_token_id=tok.eos_token_id)[0, len(x["input_ids"]):], skip_special_tokens=True).strip() for x in r]
    assert ours == theirs


def test_sequence_logprobs_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]]))  # position t predicts t + 1
    labels = torch.tensor([[-100, 1, 2]])
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.log(torch.tensor([0.3 * 0.3])))
    torch.testing.assert_close(sequence_logprobs(logits, torch.full((1, 3), -100)), torch.zeros(1))


def test_choose_picks_the_most_likely_candidate(tok):
    v = VLM(tiny_vision(), MLPProjector(24, 32), PrefixInjection(), tiny_lm(tok)).eval()
    cands = ["red", "blue", "a small green cross"]
    r = [dict(zip(("input_ids", "labels"), encode_segments(tok, [("<image> question : what colour ? answer :", False), (c, True)], num_media=1)),
              media=torch.rand(1, 1, 3, 16, 16, generator=torch.Generator().manual_seed(s))) for s in range(2) for c in cands]
    scores = score(v, collate_vlm(r, tok.pad_token_id)).view(2, 3)
    assert torch.equal(choose(v, r, 3, tok.pad_token_id, chunk=2), scores.argmax(-1))  # chunking changes nothing
    with pytest.raises(ValueError, match="not a whole number of samples of 4"): choose(v, r, 4, tok.pad_token_id)


def test_instruction_aware_queries_read_the_prompt(tok):
    b = collate_vlm(rows(tok, n=2, media_per_row=(1,)), tok.pad_token_id)
    ids, mask = prompt_tokens(b, skip=[tok.bos_token_id, tok.convert_tokens_to_ids("<image>")])
    assert tok.decode(ids[0][mask[0]]).strip() == "a red circle . question : what colour ? answer :"
    torch.manual_seed(0)
    qf = QFormer(32, vision_dim=24, depth=2, num_queries=2, heads=4, vocab_size=len(tok) + 2)
    v = VLM(tiny_vision(), QFormerBridge(qf, 32, instruction=True, cls_id=len(tok)), PrefixInjection(), tiny_lm(tok))
    other = dict(b, input_ids=b["input_ids"].clone())
    other["input_ids"][0, 3] = tok.convert_tokens_to_ids("Ġblue") if "Ġblue" in tok.get_vocab() else 20
    with torch.no_grad(): assert (v.visual_tokens(b)[0] - v.visual_tokens(other)[0]).abs().max() > 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    b = collate_vlm(rows(tok), tok.pad_token_id)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        v = VLM(tiny_vision(), PerceiverResampler(24, depth=1, num_latents=4, heads=2, dim_head=8, max_frames=4),
                XAttnInjection(every=1, heads=2, dim_head=8), tiny_lm(tok))
        with torch.no_grad():
            for blk in v.injection.blocks: blk.attn_gate.fill_(0.5); blk.ff_gate.fill_(0.5)
        v.lm.model.train()  # checkpointing acts in training mode only
        if ckpt: (getattr(v.lm.model, "activation_checkpointing_enable", None) or v.lm.model.gradient_checkpointing_enable)()
        calls = []
        v.lm.model.model.layers[0].layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
        v(b).backward()
        assert len(calls) == (2 if ckpt else 1)  # checkpointing recomputes the wrapped layer in the backward pass
        grads.append(v.bridge.latents.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_encode_segments_and_collate(tok):
    with pytest.raises(ValueError, match="has 1 <image> but the sample has 2 media"):
        encode_segments(tok, [("<image> caption :", False), ("x", True)], num_media=2)
    with pytest.raises(ValueError, match="max_len=4"): encode_segments(tok, [("<image> caption :", False), ("a red circle .", True)], num_media=1, max_len=4)
    with pytest.raises(ValueError, match="holds <image>"): encode_segments(tok, [("caption :", False), ("<image>", True)], num_media=1)
    b = collate_vlm(rows(tok), tok.pad_token_id)
    assert b["pixels"].shape == (3, 2, 1, 3, 16, 16) and b["frames"].tolist() == [[1, 0], [1, 1], [1, 0]]
    assert b["media_keys"][1] == ["r0-1-0", "r0-1-1"]
    with pytest.raises(ValueError, match="empty batch"): collate_vlm([], 0)
