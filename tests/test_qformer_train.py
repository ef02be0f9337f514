"""BLIP-2 / InstructBLIP training (nbs/31_qformer_train): losses fall, stage-2 labels, likelihood ranking,
square-root mixing in the task's batches, the recipes through the engine, the one-GPU recipe built offline."""
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmbridge_ref.data import shapesworld as sw
from mmbridge_ref.backbones.towers import count_targets, load_zoo_lm, lm_loss_sum, tiny_lm
from mmbridge_ref.align.clip_train import load_zoo_vision
from mmbridge_ref.data.mixing import mixture_weights
from mmbridge_ref.bridges.qformer import QFormer
from mmbridge_ref.recipes.blip2 import (
    ANSWER_CANDIDATES, TINY_CONFIG, Blip2, QFormerVocab, caption_scores, candidate_logprobs, cached_features,
    encoder_fingerprint, greedy_generate, left_pad, lm_example, pad_rows, parse_objective, qformer_text,
    itm_metrics, itm_probs, itm_rerank, rank_candidates, stage2_segments)
import mmbridge_ref.recipes.blip2 as qft
from mmbridge_ref.train.config import ConfigError, load_config
from mmbridge_ref.train.loop import fit, get_task, load_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "blip2_small.yaml"


@pytest.fixture(scope="module")
def zoo():
    torch.set_num_threads(1)
    return load_zoo_vision(), load_zoo_lm("lm")


def _model(zoo, instruction=False, q=4, seed=0):
    enc, lm = zoo
    torch.manual_seed(seed)
    qf = QFormer(32, vision_dim=128, depth=2, num_queries=q, heads=4, ff_mult=2, vocab_size=len(lm.tokenizer) + 2)
    return Blip2(enc, lm, qf, embed_dim=16, instruction=instruction)


def _stage1_batch(model, n=8, seed=0):
    ds = sw.ShapesWorld("caption", seed=seed, max_objects=2)
    texts = [ds.plan(i)["text"] for i in range(n)]
    ids, mask = qformer_text(model.tokenizer, model.vocab, texts, 64)
    return {"images": ds.batch(range(n))["images"][:, 0], "qf_ids": ids, "qf_mask": mask, "text": texts}


def _stage2_batch(model, n=8, task="vqa", seed=0, variant="decoder"):
    tok = model.tokenizer
    ds = sw.ShapesWorld(task, seed=seed, max_objects=2)
    segs = [stage2_segments(ds.plan(i), variant, random.Random(i)) for i in range(n)]
    rows = [lm_example(tok, s) for s in segs]
    qi, qm = qformer_text(tok, model.vocab, [s[0][0] for s in segs], 64)
    return {"images": ds.batch(range(n))["images"][:, 0], "input_ids": pad_rows([r[0] for r in rows], tok.pad_token_id),
            "labels": pad_rows([r[1] for r in rows], -100), "attention_mask": pad_rows([[1] * len(r[0]) for r in rows], 0).bool(),
            "instr_ids": qi, "instr_mask": qm, "objective": "lm"}, segs


# ---------------------------------------------------------------- losses fall on a fixed tiny batch
@pytest.mark.parametrize("objective,steps,ratio", [("itc", 25, 0.7), ("itg", 25, 0.7), ("itm", 120, 0.85)])
def test_each_stage1_loss_falls_on_a_fixed_batch(zoo, objective, steps, ratio):
    """ITM starts at the class-prior entropy H(1/3) = 0.637 (one positive, two negatives per caption) and sits on
    that plateau for ~80 steps before the queries learn to compare image and text; hence its longer budget."""
    model = _model(zoo).train()
    batch = {**_stage1_batch(model), "objective": objective}
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n.startswith(("qformer.", "stage1."))], lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = model(batch) / 8
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    tail = sum(losses[-5:]) / 5
    assert tail < ratio * losses[0], (objective, losses[0], tail)


@pytest.mark.parametrize("instruction", [False, True])
def test_stage2_loss_falls_on_a_fixed_batch(zoo, instruction):
    model = _model(zoo, instruction=instruction).train()
    batch, _ = _stage2_batch(model)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n.startswith(("qformer.", "proj."))], lr=3e-3)
    n = count_targets(batch["labels"])
    losses = []
    for _ in range(25):
        loss = model(batch) / n
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
    assert all(p.grad is None for p in model.lm.parameters()) and all(p.grad is None for p in model.vision.parameters())


# ---------------------------------------------------------------- stage-2 labels
def test_lm_example_masks_prompts_and_supervises_the_first_answer_token(zoo):
    tok = zoo[1].tokenizer
    segs = [("question : what colour is the circle ? answer :", False), ("red", True)]
    ids, labels = lm_example(tok, segs)
    prompt = tok(segs[0][0], add_special_tokens=False).input_ids
    answer = tok("red", add_special_tokens=False).input_ids
    assert ids == [tok.bos_token_id, *prompt, *answer, tok.eos_token_id]
    assert labels == [-100] * (1 + len(prompt)) + answer + [tok.eos_token_id]
    with pytest.raises(ValueError, match="no supervised segment"): lm_example(tok, [("caption :", False)])


def test_dialogue_supervises_every_reply_and_no_prompt(zoo):
    tok = zoo[1].tokenizer
    plan = next(p for p in (sw.ShapesWorld("dialogue", seed=0).plan(i) for i in range(50)) if len(p["conversations"]) >= 4)
    segs = stage2_segments(plan)
    assert [s for _, s in segs] == [False, True] * (len(plan["conversations"]) // 2)
    ids, labels = lm_example(tok, segs)
    supervised = tok.decode([t for t in labels if t != -100], skip_special_tokens=True)
    assert supervised.split() == " ".join(g["value"] for g in plan["conversations"][1::2]).split()
    assert "user" not in supervised and "assistant" not in supervised


def test_prefix_variant_moves_the_first_words_into_the_context():
    plan = sw.ShapesWorld("caption", seed=0).plan(0)
    words = plan["meta"]["answer"].split()
    seen_k = set()
    for i in range(40):
        segs = stage2_segments(plan, "prefix", random.Random(i))
        target = [t for t, s in segs if s]
        context = [t for t, s in segs if not s][1:]
        assert len(target) == 1 and " ".join(context + target).split() == words
        seen_k.add(len(" ".join(context).split()))
    assert 0 in seen_k and len(seen_k) > 3  # k = 0 (the decoder case) is one of the splits
    with pytest.raises(ValueError, match="variant='t5'"): stage2_segments(plan, "t5")


def test_queries_are_inserted_after_bos_and_never_supervised(zoo):
    model = _model(zoo, q=4)
    batch, segs = _stage2_batch(model, n=3)
    embeds, attn, labels = model.lm_inputs(model.features(batch), batch)
    tok = model.tokenizer
    for i, s in enumerate(segs):
        first = int((labels[i] != -100).nonzero()[0])
        assert first == 1 + 4 + len(tok(s[0][0], add_special_tokens=False).input_ids)
    assert labels[:, 1:5].eq(-100).all() and attn[:, 1:5].all()
    torch.testing.assert_close(embeds[:, 0], model.lm.embed(batch["input_ids"][:, :1])[:, 0])
    # the loss equals the sum over answer tokens of -log p(token | everything before it)
    logits = model.lm(inputs_embeds=embeds, attention_mask=attn)
    logp = logits.float().log_softmax(-1)
    by_hand = -sum(logp[i, j - 1, labels[i, j]] for i in range(3) for j in range(1, labels.shape[1]) if labels[i, j] != -100)
    torch.testing.assert_close(lm_loss_sum(logits, labels), by_hand)
    assert model(batch).ndim == 0


def test_instruction_changes_the_visual_tokens_plain_queries_do_not(zoo):
    for instruction in (False, True):
        model = _model(zoo, instruction=instruction).eval()
        batch, _ = _stage2_batch(model, n=2)
        feats = model.features(batch)
        a = model.queries(feats, batch["instr_ids"], batch["instr_mask"])
        other = qformer_text(model.tokenizer, model.vocab, ["caption :", "caption :"], 64)
        b = model.queries(feats, *other)
        assert a.shape == (2, 4, model.lm.dim)
        assert (not torch.allclose(a, b)) == instruction


def test_instruction_aware_model_needs_the_instruction(zoo):
    model = _model(zoo, instruction=True)
    with pytest.raises(ValueError, match="instruction=True"): model.queries(torch.randn(1, 64, 128))


# ---------------------------------------------------------------- generation and multiple choice
class _BigramLM:
    "p(next | current) = T[current, next]; one-hot embeddings, so every likelihood can be written down."
    def __init__(self, T, tokenizer): self.logT, self.tokenizer = T.log(), tokenizer
    def embed(self, ids): return F.one_hot(ids, self.logT.shape[0]).float()
    def __call__(self, inputs_embeds, attention_mask=None): return inputs_embeds @ self.logT


class _CharTok:
    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2
    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [3 + "abc".index(ch) for ch in text.strip()]})()


def _bigram():
    T = torch.full((6, 6), 0.02)
    T[2, 3], T[2, 4], T[3, 1], T[4, 5], T[5, 1], T[3, 5] = 0.5, 0.3, 0.6, 0.5, 0.8, 0.3
    return T / T.sum(-1, keepdim=True)


def test_candidate_logprobs_match_a_hand_computed_case():
    T = _bigram()
    lm = _BigramLM(T, _CharTok())
    prefix = lm.embed(torch.tensor([2]))
    lp = candidate_logprobs(lm, prefix, ["a", "bc", "ac"])
    want = torch.stack([T[2, 3].log() + T[3, 1].log(), T[2, 4].log() + T[4, 5].log() + T[5, 1].log(),
                        T[2, 3].log() + T[3, 5].log() + T[5, 1].log()])
    torch.testing.assert_close(lp, want)
    assert rank_candidates(lm, prefix, ["bc", "ac", "a"]) == 2  # 0.30 > 0.12 (ac) and 0.12 (bc)
    # without EOS the prefix "a" of "ac" is no longer penalised for continuing: "a" = 0.5 alone
    torch.testing.assert_close(candidate_logprobs(lm, prefix, ["a"], end=False), T[2, 3].log()[None])


def test_rank_candidates_picks_the_most_likely_with_a_longer_prompt():
    T = _bigram()
    lm = _BigramLM(T, _CharTok())
    prefix = lm.embed(torch.tensor([2, 4]))  # BOS b: next is c with p 0.5
    assert rank_candidates(lm, prefix, ["a", "c", "b"]) == 1


def test_rank_candidates_rejects_an_empty_list():
    lm = _BigramLM(_bigram(), _CharTok())
    with pytest.raises(ValueError, match="candidates is empty"): rank_candidates(lm, lm.embed(torch.tensor([2])), [])


def test_candidates_cover_every_vqa_answer():
    ds = sw.ShapesWorld("vqa", seed=3)
    for i in range(300):
        m = ds.plan(i)["meta"]
        assert m["answer"] in ANSWER_CANDIDATES[m["kind"]], m


def test_left_padded_generation_equals_one_prompt_at_a_time(zoo):
    lm = zoo[1]
    tok = lm.tokenizer
    texts = ["note : a large cyan cross , top left . question : where is the cross ? answer :", "caption :", "question : how many shapes are there ? answer :"]
    rows = [lm.embed(torch.tensor([tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids)) for t in texts]
    together = greedy_generate(lm, *left_pad(rows), 10)
    alone = [greedy_generate(lm, r[None], torch.ones(1, len(r), dtype=torch.bool), 10)[0] for r in rows]
    assert together == alone and all(isinstance(s, str) for s in together)


# ---------------------------------------------------------------- evaluation pieces
# ---------------------------------------------------------------- ITM at test time: accuracy and re-ranking
def test_itm_rerank_orders_the_shortlist_by_the_score_and_keeps_the_rest_below():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.2, 0.3, 0.6, 0.5]])
    score = lambda pairs: torch.tensor([[0.1, 0.2, 0.9, 0.4][j] for _, j in pairs.tolist()])
    out = itm_rerank(sim, score, k=2)
    # row 0 shortlists columns 0, 1 (ITC) and orders them by score: 1 before 0; columns 3, 2 follow in ITC order
    assert out[0].argsort(descending=True).tolist() == [1, 0, 3, 2]
    assert out[1].argsort(descending=True).tolist() == [2, 3, 1, 0]  # shortlist {2, 3}: score 0.9 > 0.4
    assert (out[:, [2, 3]][0] < 0).all() and out[0, 1] == 0.2


def test_itm_metrics_with_an_oracle_head(monkeypatch):
    "An ITM head that knows the truth: accuracy 1 and, with the positive in ITC's top k, R@1 = 1 after re-ranking."
    texts = ["a", "b", "c", "a", "d"]  # images 0 and 3 share a caption: neither is the other's negative
    truth = lambda pairs: torch.tensor([float(texts[i] == texts[j]) for i, j in pairs.tolist()])
    monkeypatch.setattr(qft, "itm_probs", lambda model, feats, ids, mask, pairs: truth(pairs))
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(5, 5, generator=g) + 0.1  # ITC that is wrong about most rows ...
    sim[torch.arange(5), (torch.arange(5) + 1) % 5] += 2  # ... ranks a wrong caption first everywhere ...
    sim[torch.arange(5), torch.arange(5)] += 1  # ... and the right one second
    assert qft.recall_at_k(sim, texts, ks=(1,))["i2t_r1"] == 0.0  # ITC alone gets every image wrong
    out = itm_metrics(None, None, None, None, sim, texts, k=3)
    assert out["itm_acc"] == 1.0 and out["i2t_r1_itm"] == 1.0 and out["t2i_r1_itm"] == 1.0
    sim[torch.arange(5), torch.arange(5)] -= 10  # positives outside the shortlist: re-ranking cannot find them
    out = itm_metrics(None, None, None, None, sim, texts, k=2)
    assert out["i2t_r1_itm"] < 1.0


def test_itm_helpers_reject_bad_input_naming_it(zoo):
    with pytest.raises(ValueError, match=r"k=0"): itm_rerank(torch.rand(3, 3), lambda p: torch.ones(len(p)), k=0)
    with pytest.raises(ValueError, match=r"\(3,\)"): itm_rerank(torch.rand(3), lambda p: torch.ones(len(p)))
    with pytest.raises(ValueError, match=r"n=2"): itm_metrics(None, None, None, None, torch.rand(3, 3), ["a", "b"])
    model = _model(zoo).eval()
    b = _stage1_batch(model, n=2)
    with pytest.raises(ValueError, match=r"\(2, 3\)"): itm_probs(model, model.features(b), b["qf_ids"], b["qf_mask"], torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="without ITX"): qft.qformer_long_stage1(rows=("without ITX",), out=None)
    with pytest.raises(ValueError, match="steps=0"): qft.qformer_long_stage1(steps=0, out=None)


def test_itm_probs_are_probabilities_per_pair_in_any_batching(zoo):
    model = _model(zoo).eval()
    b = _stage1_batch(model, n=4)
    feats = model.features(b)
    pairs = torch.tensor([[0, 0], [0, 1], [3, 2], [2, 2], [1, 3]])
    p = itm_probs(model, feats, b["qf_ids"], b["qf_mask"], pairs)
    assert p.shape == (5,) and ((0 < p) & (p < 1)).all()
    torch.testing.assert_close(itm_probs(model, feats, b["qf_ids"], b["qf_mask"], pairs, batch_size=2), p)


def test_caption_scores():
    scene = sw.Scene([sw.Obj("circle", "red", "small", 0, 0), sw.Obj("square", "blue", "large", 2, 2)])
    assert caption_scores(scene, "a small red circle is above a large blue square .")["true"] == 1.0
    s = caption_scores(scene, "a small red circle at the top left and a large green square at the bottom right .")
    assert (s["true"], s["obj_precision"], s["obj_recall"], s["colour"], s["shape"]) == (0.0, 0.5, 0.5, 0.5, 1.0)
    assert caption_scores(scene, "nothing here")["obj_recall"] == 0.0


def test_parse_objective():
    assert parse_objective("itc+itm+itg") == ("itc", "itm", "itg") and parse_objective("lm") == ("lm",)
    for bad in ("", "itc+", "itc+itc", "mlm", "lm+itc"):
        with pytest.raises(ValueError, match="objective="): parse_objective(bad)


def test_feature_cache_returns_the_encoder_output(zoo):
    enc = zoo[0]
    ds = sw.ShapesWorld("caption", seed=77, size=10)
    got = cached_features(enc, ds, [3, 1, 3])
    with torch.no_grad(): want = enc(ds.batch([3, 1, 3])["images"][:, 0])
    torch.testing.assert_close(got, want)
    assert encoder_fingerprint(enc) != encoder_fingerprint(torch.nn.Linear(2, 2))


def test_qformer_text_layout_and_errors(zoo):
    tok = zoo[1].tokenizer
    v = QFormerVocab(len(tok), tok.pad_token_id, tok.eos_token_id)
    ids, mask = qformer_text(tok, v, ["a red circle .", "a small blue square at the top left ."], 64)
    assert (ids[:, 0] == v.cls_id).all() and v.dec_id == v.cls_id + 1 == len(tok) + 1
    assert mask[0].sum() < mask[1].sum() and (ids[~mask] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="max_text_len=8"): qformer_text(tok, v, ["a small blue square at the top left ."], 8)


# ---------------------------------------------------------------- the task: mixing, config, engine
def test_task_batches_follow_the_sqrt_weights():
    sizes = {"caption": 400, "vqa": 3600, "dialogue": 100}
    cfg = load_config(TINY_CONFIG, ["data.eval_size=0", f"data.sources={json.dumps(sizes)}", "train.batch_size=16",
                                    "data.cache_features=false"])
    task = get_task("blip2")(cfg)
    start = cfg.stages[0].steps
    srcs = [s for k in range(100) for s in task.batch(start + k)["source"]]
    got = {n: srcs.count(n) / len(srcs) for n in sizes}
    want = mixture_weights(sizes, "sqrt")  # 20 : 60 : 10 of 90
    for n in sizes: assert abs(got[n] - want[n]) < 0.035, (got, want)
    size_rule = mixture_weights(sizes, "size")
    assert abs(got["dialogue"] - size_rule["dialogue"]) > 0.05  # a size-proportional pipeline would fail this
    # the same step gives the same batch (resumes are exact), and indices stay inside each source
    b1, b2 = task.batch(start + 5), task.batch(start + 5)
    assert b1["source"] == b2["source"] and torch.equal(b1["input_ids"], b2["input_ids"])


def test_task_uses_each_stage_objective():
    cfg = load_config(TINY_CONFIG, ["data.eval_size=0", "data.objectives.stage1=itc+itg", "stages.0.steps=3"])
    task = get_task("blip2")(cfg)
    assert [task.batch(k)["objective"] for k in range(5)] == ["itc+itg"] * 3 + ["lm"] * 2
    b = task.batch(0)
    assert b["features"].shape == (cfg.train.batch_size, 64, 128) and b["qf_ids"][:, 0].eq(task.model.vocab.cls_id).all()


@pytest.mark.parametrize("override,needle", [
    ("data.objectives.stage1=itc+mlm", "data.objectives.stage1"),
    ("stages.1.name=finetune", "'finetune' has no objective"),
    ("data.sources={vqa: 10}", "add a caption source"),
    ("data.sources={ocr: 10}", "data.sources.ocr"),
    ("data.eval=[bleu]", "'bleu'"),
    ("model.vision=timm:vit", "model.vision"),
    ("data.mixing=log", "data.mixing"),
])
def test_bad_config_names_the_key(override, needle):
    with pytest.raises((ConfigError, ValueError), match=needle): get_task("blip2")(load_config(TINY_CONFIG, [override, "data.eval_size=0"]))


def test_tiny_recipe_trains_through_the_engine_and_reloads(tmp_path):
    cfg = load_config(TINY_CONFIG, ["stages.0.steps=4", "stages.1.steps=4", "train.batch_size=8", "data.eval_size=8",
                                    "optim.warmup_steps=1", f"train.run_dir={tmp_path}/{{name}}"])
    res = fit(cfg, progress=False)
    assert res.step == 8 and all(math.isfinite(r["loss"]) for r in res.history)
    assert [r["stage"] for r in res.history] == ["stage1"] * 4 + ["stage2"] * 4
    for k in ("i2t_r1", "t2i_r1", "itm_acc", "i2t_r1_itm", "t2i_r1_itm", "caption_true", "vqa_em", "vqa_mc", "train_itc", "train_itm", "train_itg", "train_lm"):
        assert k in res.metrics and math.isfinite(res.metrics[k]), k
    # stage 2 from the trained run: model.init_from loads its parameters
    task = load_run(res.run_dir)
    again = get_task("blip2")(load_config(TINY_CONFIG, [f"model.init_from={res.run_dir}", "data.eval_size=0"]))
    torch.testing.assert_close(again.model.qformer.queries, task.model.qformer.queries)
    torch.testing.assert_close(again.model.proj.weight, task.model.proj.weight)


def test_stage2_without_stage1_skips_zero_step_stage(tmp_path):
    cfg = load_config(TINY_CONFIG, ["stages.0.steps=0", "stages.1.steps=3", "train.batch_size=8", "data.eval_size=8",
                                    "data.eval=[vqa]", "model.instruction=true", "model.num_queries=1",
                                    "optim.warmup_steps=1", f"train.run_dir={tmp_path}/{{name}}"])
    res = fit(cfg, progress=False)
    assert res.step == 3 and {r["stage"] for r in res.history} == {"stage2"} and "vqa_em" in res.metrics


def _tiny_lm_checkpoint(path, zoo_tok):
    lm = tiny_lm(zoo_tok, dim=32, depth=1, heads=2, max_len=256)
    lm.save_pretrained(path)
    return path


def test_small_recipe_builds_and_trains_offline(tmp_path, zoo):
    "configs/blip2_small.yaml's code path (open_clip tower by name, HF LM from a folder) on tiny checkpoints."
    open_clip = pytest.importorskip("open_clip")
    arch = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8),
                text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1))
    (tmp_path / "mmb-blip2-tiny.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "mmb-blip2-tiny.json")
    lm_dir = _tiny_lm_checkpoint(tmp_path / "lm", zoo[1].tokenizer)
    base = load_config(SMALL)
    assert base.model["vision"].startswith("open_clip:") and not base.model["lm"].startswith("zoo:")
    assert base.data["cache_features"] is False and base.model["num_queries"] == 32
    cfg = load_config(SMALL, ["model.vision=open_clip:mmb-blip2-tiny", f"model.lm={lm_dir}", "model.dim=32", "model.depth=2",
                              "model.heads=2", "model.num_queries=4", "model.embed_dim=16", "data.image_size=32",
                              "data.eval_size=4", "train.batch_size=4", "train.device=cpu", "stages.0.steps=2", "stages.1.steps=2",
                              "optim.warmup_steps=1", "train.ckpt_every=0", "train.eval_every=0", f"train.run_dir={tmp_path}/{{name}}"])
    task = get_task("blip2")(cfg)
    assert task.model.qformer.vision_dim == 64 and task.model.lm.dim == 32
    assert "images" in task.batch(0) and task.batch(0)["images"].shape == (4, 3, 32, 32)
    res = fit(cfg, progress=False)
    assert res.step == 4 and all(math.isfinite(r["loss"]) for r in res.history)
