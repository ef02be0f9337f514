"""BLIP-2 / InstructBLIP training (nbs/31_qformer_train) on the composer: losses fall, stage-2 segments and the spliced
soft prompt, instruction-aware queries, ITM at test time, square-root mixing in the task's batches, the recipes
through the engine, the one-GPU recipe built offline."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

from mmbridge_ref.backbones.towers import NormalizedVision, OpenClipVision, count_targets, lm_loss_sum, tiny_lm
from mmbridge_ref.bridges.qformer import QFormerBridge
from mmbridge_ref.data import shapesworld as sw
from mmbridge_ref.data.mixing import MixtureSampler, mixture_weights
from mmbridge_ref.recipes.blip2 import (TINY_CONFIG, Blip2, Blip2Stream, QFormerVocab, itm_metrics, itm_probs, itm_rerank,
                                       parse_objective, qformer_text, stage2_segments)
import mmbridge_ref.recipes.blip2 as qft
from mmbridge_ref.train.config import ConfigError, load_config
from mmbridge_ref.train.loop import build_task, fit, load_run
from mmbridge_ref.vlm import FeatureCache, build_lm, build_vlm, collate_vlm, encode_segments, prompt_tokens

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "blip2_small.yaml"


@pytest.fixture(scope="module")
def tok():
    return build_lm("zoo:lm").tokenizer


def _model(instruction=False, q=4, seed=0):
    "The zoo encoder and zoo LM joined by a small Q-Former (qformer × prefix, as configs/blip2_tiny.yaml names them)."
    torch.manual_seed(seed)
    vlm = build_vlm({"vision": "zoo", "lm": "zoo:lm", "bridge": "qformer", "injection": "prefix",
                     "qformer": {"dim": 32, "depth": 2, "num_queries": q, "heads": 4, "ff_mult": 2,
                                 "instruction": instruction, "text_init": "random"}}, cache=None)
    return Blip2(vlm, embed_dim=16)


def _stream(model, task, n, seed=0):
    "A Blip2Stream over one ShapesWorld source of n samples."
    ds = {task: sw.ShapesWorld(task, seed=seed, size=n, max_objects=2)}
    return Blip2Stream(model.vlm.lm.tokenizer, model.vocab, ds, MixtureSampler({task: 1.0}, seed), 64)


def _stage1_batch(model, n=8, objective="itc+itm+itg", seed=0):
    return _stream(model, "caption", n, seed).stage1(0, n, objective)


def _stage2_batch(model, n=8, task="vqa", seed=0, variant="decoder"):
    return _stream(model, task, n, seed).stage2(0, n, variant)


# ---------------------------------------------------------------- losses fall on a fixed tiny batch
@pytest.mark.parametrize("objective,steps,ratio", [("itc", 25, 0.7), ("itg", 25, 0.7), ("itm", 120, 0.85)])
def test_each_stage1_loss_falls_on_a_fixed_batch(objective, steps, ratio):
    """ITM starts at the class-prior entropy H(1/3) = 0.637 (one positive, two negatives per caption) and sits on
    that plateau for ~80 steps before the queries learn to compare image and text; hence its longer budget."""
    model = _model().train()
    batch = _stage1_batch(model, objective=objective)
    assert batch["objective"] == objective and batch["qf_ids"].shape[0] == 8
    params = [p for n, p in model.named_parameters() if n.startswith(("vlm.bridge.qformer.", "stage1."))]
    opt = torch.optim.AdamW(params, lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = model(batch) / 8
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    tail = sum(losses[-5:]) / 5
    assert tail < ratio * losses[0], (objective, losses[0], tail)
    assert set(model.pop_log()) == {f"train_{objective}"} and model.steps == [steps, 0]


@pytest.mark.parametrize("instruction", [False, True])
def test_stage2_loss_falls_on_a_fixed_batch(instruction):
    model = _model(instruction=instruction).train()
    batch = _stage2_batch(model)
    assert model.vlm.bridge.reads_text == instruction
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n.startswith("vlm.bridge.")], lr=3e-3)
    n = count_targets(batch["labels"])
    losses = []
    for _ in range(25):
        loss = model(batch) / n
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
    assert all(p.grad is None for p in model.vlm.lm.parameters()) and all(p.grad is None for p in model.vlm.vision.parameters())
    assert model.qformer.queries.grad is not None and model.vlm.bridge.proj.weight.grad is not None


# ---------------------------------------------------------------- stage-2 segments
@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_stage2_segments_put_the_image_first_mask_prompts_and_supervise_the_first_answer_token(tok, task):
    image_id = tok.convert_tokens_to_ids("<image>")
    ds = sw.ShapesWorld(task, seed=0)
    for i in range(10):
        plan = ds.plan(i)
        segs = stage2_segments(plan)
        assert [s for _, s in segs] == [False, True] and segs[0][0].startswith("<image> ") and segs[1][0] == plan["meta"]["answer"]
        ids, labels = encode_segments(tok, segs, num_media=1)
        prompt = tok(segs[0][0], add_special_tokens=False).input_ids
        answer = tok(segs[1][0], add_special_tokens=False).input_ids
        assert prompt[0] == image_id and ids == [tok.bos_token_id, *prompt, *answer, tok.eos_token_id]
        assert labels == [-100] * (1 + len(prompt)) + answer + [tok.eos_token_id]
        lab = torch.tensor([labels])  # through the loss's shift, the last prompt position predicts the first answer token
        assert lab[0, 1:][len(prompt)] == answer[0] and count_targets(lab) == len(answer) + 1
    with pytest.raises(ValueError, match="no supervised text"): encode_segments(tok, [("<image> caption :", False)], num_media=1)
    with pytest.raises(ValueError, match="task='interleaved'"): stage2_segments(sw.ShapesWorld("interleaved", seed=0).plan(0))


def test_dialogue_supervises_every_reply_and_no_prompt(tok):
    plan = next(p for p in (sw.ShapesWorld("dialogue", seed=0).plan(i) for i in range(50)) if len(p["conversations"]) >= 4)
    segs = stage2_segments(plan)
    assert [s for _, s in segs] == [False, True] * (len(plan["conversations"]) // 2)
    assert segs[0][0].startswith("<image> ") and all("<image>" not in t for t, _ in segs[1:])  # one image, first
    ids, labels = encode_segments(tok, segs, num_media=1)
    supervised = tok.decode([t for t in labels if t != -100], skip_special_tokens=True)
    assert supervised.split() == " ".join(g["value"] for g in plan["conversations"][1::2]).split()
    assert "user" not in supervised and "assistant" not in supervised


def test_prefix_variant_moves_the_first_words_into_the_context():
    plan = sw.ShapesWorld("caption", seed=0).plan(0)
    words = plan["meta"]["answer"].split()
    seen_k = set()
    for i in range(40):
        segs = stage2_segments(plan, "prefix", random.Random(i))
        assert segs[0] == ("<image> caption :", False)
        target = [t for t, s in segs if s]
        context = [t for t, s in segs if not s][1:]
        assert len(target) == 1 and " ".join(context + target).split() == words
        seen_k.add(len(" ".join(context).split()))
    assert 0 in seen_k and len(seen_k) > 3  # k = 0 (the decoder case) is one of the splits
    with pytest.raises(ValueError, match="variant='t5'"): stage2_segments(plan, "t5")


# ---------------------------------------------------------------- the soft prompt
def test_queries_are_spliced_after_bos_and_never_supervised():
    model = _model(q=4).eval()
    batch = _stage2_batch(model, n=3)
    lm, image_id = model.vlm.lm, model.vlm.lm.image_token_id
    assert (batch["input_ids"][:, 1] == image_id).all() and (batch["input_ids"] == image_id).sum() == 3  # <image> right after BOS
    visual = model.vlm.visual_tokens(batch)
    assert visual.shape == (3, 1, 4, lm.dim)
    with torch.no_grad(): out = model.vlm.injection(lm, batch, visual, batch["frames"] > 0)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - 1 + 4  # the placeholder became 4 query tokens
    assert out.labels[:, 1:5].eq(-100).all() and out.attention_mask[:, 1:5].all()
    for i in range(3):
        first = int((batch["labels"][i] != -100).nonzero()[0])
        assert int((out.labels[i] != -100).nonzero()[0]) == first - 1 + 4
    assert out.labels[out.labels != -100].tolist() == batch["labels"][batch["labels"] != -100].tolist()
    # the loss equals the sum over answer tokens of -log p(token | BOS, the queries, the prompt, the answer so far)
    logp = out.logits.float().log_softmax(-1)
    lab = out.labels
    by_hand = -sum(logp[i, j - 1, lab[i, j]] for i in range(3) for j in range(1, lab.shape[1]) if lab[i, j] != -100)
    torch.testing.assert_close(lm_loss_sum(out.logits, lab), by_hand)
    with torch.no_grad(): torch.testing.assert_close(model(batch), by_hand)
    # BOS comes before the queries: its logits are the text-only LM's
    with torch.no_grad(): torch.testing.assert_close(out.logits[:, 0], lm(input_ids=batch["input_ids"][:, :1])[:, 0])


@pytest.mark.parametrize("instruction", [False, True])
def test_instruction_changes_the_visual_tokens_plain_queries_do_not(tok, instruction):
    model = _model(instruction=instruction).eval()
    ds = sw.ShapesWorld("vqa", seed=0, size=2, max_objects=2)
    media = [ds[i]["images"][:, None] for i in range(2)]

    def batch(prompts, answers):
        rows = [dict(zip(("input_ids", "labels"), encode_segments(tok, [(p, False), (a, True)], num_media=1)), media=m)
                for p, a, m in zip(prompts, answers, media)]
        return collate_vlm(rows, tok.pad_token_id)

    question = "<image> question : what colour is the circle ? answer :"
    base = batch([question] * 2, ["red", "blue"])
    other_prompt = batch(["<image> caption :"] * 2, ["red", "blue"])
    other_answer = batch([question] * 2, ["a large green square at the top left .", "yes"])
    with torch.no_grad(): a, b, c = (model.vlm.visual_tokens(x) for x in (base, other_prompt, other_answer))
    assert a.shape == (2, 1, 4, model.vlm.lm.dim)
    assert (not torch.allclose(a, b)) == instruction
    torch.testing.assert_close(a, c)  # the answers (the targets) never reach the queries
    # what instruction-aware queries read: the prompt's own tokens, without BOS and <image>
    ids, mask = prompt_tokens(base, skip=[tok.bos_token_id, model.vlm.lm.image_token_id])
    assert [tok.decode(r[m]).strip() for r, m in zip(ids, mask)] == ["question : what colour is the circle ? answer :"] * 2


def test_instruction_aware_bridge_needs_the_instruction():
    model = _model(instruction=True)
    assert isinstance(model.vlm.bridge, QFormerBridge)
    with pytest.raises(ValueError, match="instruction=True"): model.vlm.bridge(torch.randn(1, 64, 128))
    assert _model(instruction=False).vlm.bridge(torch.randn(1, 64, 128)).shape == (1, 4, model.vlm.lm.dim)


def test_features_are_the_frozen_encoders_output():
    model = _model()
    b = _stage1_batch(model, n=3)
    with torch.no_grad(): want = model.vlm.vision(b["pixels"][:, 0, 0])
    torch.testing.assert_close(model.features(b), want)
    model.vlm.cache = FeatureCache()  # through the cache (stage 1 and stage 2 read the same features of a scene)
    torch.testing.assert_close(model.features(b), want)
    torch.testing.assert_close(model.features(b), want)
    assert model.vlm.cache.hits == 3 and model.vlm.cache.misses == 3


# ---------------------------------------------------------------- ITM at test time: accuracy and re-ranking
def test_itm_rerank_orders_the_shortlist_by_the_score_and_keeps_the_rest_below():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.2, 0.3, 0.6, 0.5]])
    score = lambda pairs: torch.tensor([[0.1, 0.2, 0.9, 0.4][j] for _, j in pairs.tolist()])
    out = itm_rerank(sim, score, k=2)
    # row 0 shortlists columns 0, 1 (ITC) and orders them by score: 1 before 0; columns 3, 2 follow in ITC order
    assert out[0].argsort(descending=True).tolist() == [1, 0, 3, 2]
    assert out[1].argsort(descending=True).tolist() == [2, 3, 1, 0]  # shortlist {2, 3}: score 0.9 > 0.4
    assert (out[:, [2, 3]][0] < 0).all() and out[0, 1] == pytest.approx(0.2)


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


def test_itm_helpers_reject_bad_input_naming_it():
    with pytest.raises(ValueError, match=r"k=0"): itm_rerank(torch.rand(3, 3), lambda p: torch.ones(len(p)), k=0)
    with pytest.raises(ValueError, match=r"\(3,\)"): itm_rerank(torch.rand(3), lambda p: torch.ones(len(p)))
    with pytest.raises(ValueError, match=r"n=2"): itm_metrics(None, None, None, None, torch.rand(3, 3), ["a", "b"])
    model = _model().eval()
    b = _stage1_batch(model, n=2)
    with pytest.raises(ValueError, match=r"\(2, 3\)"): itm_probs(model, model.features(b), b["qf_ids"], b["qf_mask"], torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(0, 2\)"): itm_probs(model, model.features(b), b["qf_ids"], b["qf_mask"], torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="without ITX"): qft.qformer_long_stage1(rows=("without ITX",), out=None)
    with pytest.raises(ValueError, match="steps=0"): qft.qformer_long_stage1(steps=0, out=None)


def test_itm_probs_are_probabilities_per_pair_in_any_batching():
    model = _model().eval()
    b = _stage1_batch(model, n=4)
    feats = model.features(b)
    pairs = torch.tensor([[0, 0], [0, 1], [3, 2], [2, 2], [1, 3]])
    p = itm_probs(model, feats, b["qf_ids"], b["qf_mask"], pairs)
    assert p.shape == (5,) and ((0 < p) & (p < 1)).all()
    torch.testing.assert_close(itm_probs(model, feats, b["qf_ids"], b["qf_mask"], pairs, batch_size=2), p)
    assert not torch.allclose(p[0], p[1])  # the text matters


# ---------------------------------------------------------------- evaluation pieces
def test_caption_scores():
    scene = sw.Scene([sw.Obj("circle", "red", "small", 0, 0), sw.Obj("square", "blue", "large", 2, 2)])
    assert sw.caption_scores(scene, "a small red circle is above a large blue square .")["true"] == 1.0
    s = sw.caption_scores(scene, "a small red circle at the top left and a large green square at the bottom right .")
    assert (s["true"], s["obj_precision"], s["obj_recall"], s["colour"], s["shape"]) == (0.0, 0.5, 0.5, 0.5, 1.0)
    assert sw.caption_scores(scene, "nothing here")["obj_recall"] == 0.0


def test_vqa_candidates_cover_every_answer():
    "vqa_mc picks among sw.ANSWERS[kind]: every held-out answer must be one of them."
    ds = sw.ShapesWorld("vqa", seed=3)
    for i in range(300):
        m = ds.plan(i)["meta"]
        assert m["answer"] in sw.ANSWERS[m["kind"]], m


def test_parse_objective():
    assert parse_objective("itc+itm+itg") == ("itc", "itm", "itg") and parse_objective("lm") == ("lm",)
    assert parse_objective("itg+itc") == ("itg", "itc")
    for bad in ("", "itc+", "itc+itc", "mlm", "lm+itc"):
        with pytest.raises(ValueError, match="objective="): parse_objective(bad)


def test_qformer_text_layout_and_errors(tok):
    v = QFormerVocab(len(tok), tok.pad_token_id, tok.eos_token_id)
    ids, mask = qformer_text(tok, v, ["a red circle .", "a small blue square at the top left ."], 64)
    assert (ids[:, 0] == v.cls_id).all() and v.dec_id == v.cls_id + 1 == len(tok) + 1 and v.vocab_size == len(tok) + 2
    assert mask[0].sum() < mask[1].sum() and (ids[~mask] == tok.pad_token_id).all()
    assert ids[0, int(mask[0].sum()) - 1] == tok.eos_token_id and ids[1, -1] == tok.eos_token_id
    assert ids[0, 1:int(mask[0].sum()) - 1].tolist() == tok("a red circle .", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="max_text_len=8"): qformer_text(tok, v, ["a small blue square at the top left ."], 8)


# ---------------------------------------------------------------- the task: mixing, config, engine
def test_task_batches_follow_the_sqrt_weights():
    sizes = {"caption": 400, "vqa": 3600, "dialogue": 100}
    cfg = load_config(TINY_CONFIG, ["data.eval_size=0", f"data.sources={json.dumps(sizes)}", "train.batch_size=16",
                                    "data.cache_features=false"])
    task = build_task(cfg)
    start = cfg.stages[0].steps
    srcs = [s for k in range(100) for s in task.batch(start + k)["source"]]
    got = {n: srcs.count(n) / len(srcs) for n in sizes}
    want = mixture_weights(sizes, "sqrt")  # 20 : 60 : 10 of 90
    for n in sizes: assert abs(got[n] - want[n]) < 0.035, (got, want)
    size_rule = mixture_weights(sizes, "size")
    assert abs(got["dialogue"] - size_rule["dialogue"]) > 0.05  # a size-proportional pipeline would fail this
    # the same step gives the same batch (resumes are exact)
    b1, b2 = task.batch(start + 5), task.batch(start + 5)
    assert b1["source"] == b2["source"] and torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["pixels"], b2["pixels"])


def test_task_uses_each_stage_objective():
    cfg = load_config(TINY_CONFIG, ["data.eval_size=0", "data.objectives.stage1=itc+itg", "stages.0.steps=3",
                                    "train.batch_size=4", "data.sources={caption: 64, vqa: 64}"])
    task = build_task(cfg)
    assert [task.batch(k)["objective"] for k in range(5)] == ["itc+itg"] * 3 + ["lm"] * 2
    model, b1, b2 = task.model.train(), task.batch(0), task.batch(3)
    assert b1["pixels"].shape == (4, 1, 1, 3, 32, 32) and b1["qf_ids"][:, 0].eq(model.vocab.cls_id).all()
    assert len(b1["text"]) == 4 and task.count(b1) == 4  # stage 1 counts captions
    assert b2["labels"].shape == b2["input_ids"].shape and task.count(b2) == count_targets(b2["labels"]) > 0
    model(b1)
    assert set(model.pop_log()) == {"train_itc", "train_itg"}  # no ITM: it was not asked for
    model(b2)
    assert set(model.pop_log()) == {"train_lm"} and model.steps == [1, 1]


@pytest.mark.parametrize("override,needle", [
    ("data.objectives.stage1=itc+mlm", "data.objectives.stage1"),
    ("stages.1.name=finetune", "'finetune' has no objective"),
    ("data.sources={vqa: 10}", "add a caption source"),
    ("data.sources={ocr: 10}", "data.sources.ocr"),
    ("data.eval=[bleu]", "'bleu'"),
    ("data.mixing=log", "data.mixing"),
    ("model.vision=timm:vit", "vision spec 'timm:vit'"),
    ("model.bridge=mlp", "BLIP-2 needs bridge: qformer"),
    ("model.qformer.depht=2", "model.qformer.depht"),
    ("model.qformr={dim: 32}", "did you mean 'qformer'"),
    ("model.qformer.text_init=bert", "model.qformer.text_init"),
    ("model.qformer.text_init=lm;model.qformer.dim=512", "at least the Q-Former.s"),  # wider than the LM
    ("model.stage1.embed=16", "model.stage1.embed"),
])
def test_bad_config_names_the_key(override, needle):
    with pytest.raises((ConfigError, ValueError), match=needle): build_task(load_config(TINY_CONFIG, [*override.split(";"), "data.eval_size=0"]))


def test_tiny_recipe_trains_through_the_engine_and_reloads(tmp_path):
    cfg = load_config(TINY_CONFIG, ["stages.0.steps=4", "stages.1.steps=4", "train.batch_size=8", "data.eval_size=8",
                                    "optim.warmup_steps=1", f"train.run_dir={tmp_path}/{{name}}"])
    res = fit(cfg, progress=False)
    assert res.step == 8 and all(math.isfinite(r["loss"]) for r in res.history)
    assert [r["stage"] for r in res.history] == ["stage1"] * 4 + ["stage2"] * 4
    for k in ("i2t_r1", "t2i_r1", "itm_acc", "i2t_r1_itm", "t2i_r1_itm", "caption_true", "vqa_em", "vqa_mc",
              "train_itc", "train_itm", "train_itg", "train_lm"):
        assert k in res.metrics and math.isfinite(res.metrics[k]), k
    # the saved run reloads, and stage 2 of another run starts from it through model.init_from
    task = load_run(res.run_dir)
    fresh = build_task(load_config(TINY_CONFIG, ["data.eval_size=0"]))
    assert not torch.allclose(fresh.model.qformer.queries, task.model.qformer.queries)  # training moved them
    again = build_task(load_config(TINY_CONFIG, [f"model.init_from={res.run_dir}", "data.eval_size=0"]))
    torch.testing.assert_close(again.model.qformer.queries, task.model.qformer.queries)
    torch.testing.assert_close(again.model.vlm.bridge.proj.weight, task.model.vlm.bridge.proj.weight)
    torch.testing.assert_close(again.model.stage1.itm_head.weight, task.model.stage1.itm_head.weight)
    # a reloaded run evaluates everything its config asks for, generation included (it is not in the middle of stage 1)
    assert {"i2t_r1", "vqa_em", "caption_true"} <= set(task.evaluate(task.model))


def test_an_image_size_the_encoder_cannot_take_is_a_config_error():
    with pytest.raises(ConfigError, match="data.image_size: 64, but the encoder takes 32x32"):
        build_task(load_config(TINY_CONFIG, ["data.image_size=64", "data.eval_size=0"]))


def test_stage2_without_stage1_skips_zero_step_stage(tmp_path):
    cfg = load_config(TINY_CONFIG, ["stages.0.steps=0", "stages.1.steps=3", "train.batch_size=8", "data.eval_size=8",
                                    "data.eval=[vqa]", "model.qformer.instruction=true", "model.qformer.num_queries=1",
                                    "optim.warmup_steps=1", f"train.run_dir={tmp_path}/{{name}}"])
    res = fit(cfg, progress=False)
    assert res.step == 3 and {r["stage"] for r in res.history} == {"stage2"} and "vqa_em" in res.metrics
    assert "i2t_r1" not in res.metrics and set(k for k in res.metrics if k.startswith("train_")) == {"train_lm"}


def test_small_recipe_builds_and_trains_offline(tmp_path, tok):
    "configs/blip2_small.yaml's code path (open_clip tower by name, HF LM from a folder) on tiny checkpoints."
    open_clip = pytest.importorskip("open_clip")
    arch = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8),
                text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1))
    (tmp_path / "mmb-blip2-tiny.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "mmb-blip2-tiny.json")
    torch.manual_seed(0)
    tiny_lm(tok, dim=32, depth=1, heads=2, max_len=256).save_pretrained(tmp_path / "lm")
    base = load_config(SMALL)
    assert base.model["vision"].startswith("open_clip:") and base.model["lm"].startswith("hf:")
    assert base.model["bridge"] == "qformer" and base.model["injection"] == "prefix"
    assert base.data["cache_features"] is False and base.model["qformer"]["num_queries"] == 32
    cfg = load_config(SMALL, ["model.vision=open_clip:mmb-blip2-tiny", f"model.lm={tmp_path / 'lm'}", "model.qformer.dim=32",
                              "model.qformer.depth=2", "model.qformer.heads=2", "model.qformer.num_queries=4",
                              "model.stage1.embed_dim=16", "data.image_size=32", "data.eval_size=4", "train.batch_size=4",
                              "train.device=cpu", "stages.0.steps=2", "stages.1.steps=2", "optim.warmup_steps=1",
                              "train.ckpt_every=0", "train.eval_every=0", f"train.run_dir={tmp_path}/{{name}}"])
    task = build_task(cfg)
    assert isinstance(task.model.vlm.vision, NormalizedVision) and isinstance(task.model.vlm.vision.tower, OpenClipVision)
    assert task.model.qformer.vision_dim == 64 and task.model.vlm.lm.dim == 32 and task.model.vlm.cache is None
    assert task.batch(0)["pixels"].shape == (4, 1, 1, 3, 32, 32) and task.batch(2)["objective"] == "lm"
    res = fit(cfg, progress=False)
    assert res.step == 4 and all(math.isfinite(r["loss"]) for r in res.history)
    assert [r["stage"] for r in res.history] == ["stage1"] * 2 + ["stage2"] * 2
