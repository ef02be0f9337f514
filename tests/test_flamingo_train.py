"""Training Flamingo on ShapesWorld through the composer: labels, weighted sources, masks, bridges, bad input, the
engine task, configs/flamingo_small.yaml offline."""
import json
import math

import pytest
import torch
import yaml

from mmbridge_ref.backbones.towers import NormalizedVision, OpenClipVision, count_targets
from mmbridge_ref.bridges.projectors import MeanPool, MLPProjector
from mmbridge_ref.bridges.resampler import PerceiverResampler
from mmbridge_ref.data import shapesworld as sw
from mmbridge_ref.data.mixing import FLAMINGO_WEIGHTS
from mmbridge_ref.inject.xattn import XAttnInjection, cross_attention_mask, media_attention_mask
from mmbridge_ref.recipes.flamingo import (BRIDGE_ROWS, CLIPS_ONLY, MASK_ROWS, SMALL_CONFIG, SOURCES, TINY_CONFIG,
                                           FlamingoStream, _candidates, eval_set, flamingo_evaluate, flamingo_row,
                                           flamingo_task, flamingo_text, sample_media)
from mmbridge_ref.train.config import ConfigError, load_config
from mmbridge_ref.train.loop import TASKS, build_task, fit, load_checkpoint, register_task
from mmbridge_ref.vlm import build_lm, build_vlm, collate_vlm, encode_segments, parse_vlm_config, score

torch.set_num_threads(1)

_PARTS = {"resampler": {"num_latents": 8, "depth": 1, "heads": 4, "dim_head": 32, "max_frames": 8},
          "mlp": {"max_frames": 8}, "mean": {"max_frames": 8},
          "xattn": {"every": 1, "heads": 4, "dim_head": 32, "ff_mult": 2}}


def _model(mask="immediate", bridge="resampler", seed=0):
    "The zoo encoder and zoo LM joined by a small bridge and gated xattn, as `build_vlm` makes them from a model section."
    torch.manual_seed(seed)
    cfg = {"vision": "zoo", "lm": "zoo:lm", "bridge": bridge, "injection": "xattn", **_PARTS,
           "xattn": {**_PARTS["xattn"], "mask": mask}}
    return build_vlm(cfg, cache=None)  # no feature cache: some tests change the pixels behind a key


@pytest.fixture(scope="module")
def tok():
    return build_lm("zoo:lm").tokenizer


def _logits(model, batch):
    "The LM's logits over the text with the visual tokens injected (what the loss reads)."
    return model.injection(model.lm, batch, model.visual_tokens(batch), batch["frames"] > 0).logits


def _quick(tmp_path, *more):
    return ["stages.0.steps=4", "train.batch_size=4", "data.eval_size=4", "data.pool_size=16", "train.eval_every=0",
            "train.ckpt_every=0", "optim.warmup_steps=1", "train.device=cpu", f"train.run_dir={tmp_path}/{{name}}", *more]


# --- labels -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", list(SOURCES))
def test_labels_mask_the_prompt_and_supervise_the_first_answer_token(tok, source):
    task, kw = SOURCES[source]
    ds = sw.ShapesWorld(task, seed=3, size=20, **kw)
    image_id = tok.convert_tokens_to_ids("<image>")
    for i in range(20):
        s = ds[i]
        prompt, answer = flamingo_text(s)
        row = flamingo_row(tok, s, "t", 96)
        ids, labels = row["input_ids"], row["labels"]
        assert row["media"].shape[0] == ids.count(image_id) == sample_media(s).shape[0] and len(row["keys"]) == row["media"].shape[0]
        a = tok(answer, add_special_tokens=False).input_ids
        start = len(ids) - len(a) - 1  # first answer position
        assert ids[0] == tok.bos_token_id and ids[start:-1] == a and ids[-1] == tok.eos_token_id
        assert labels[:start] == [-100] * start  # bos, prompt, every <image>
        assert labels[start:] == ids[start:]  # the answer from its FIRST token, and eos
        assert all(l == -100 for t, l in zip(ids, labels) if t == image_id)
        # through the shift of the loss: the last prompt position predicts the first answer token
        lab = torch.tensor([labels])
        assert lab[0, 1:][start - 1] == a[0] and count_targets(lab) == len(a) + 1


def test_collate_pads_text_with_minus_100_and_media_with_frames_0(tok):
    stream = FlamingoStream(tok, {"M3W": 1.0, "VTP": 1.0}, seed=1, pool_size=32)
    step = next(k for k in range(50) if {n for n, _ in stream.sampler.draw(k, 6)} == {"M3W", "VTP"})
    b = stream.batch(step, 6)
    rows = [flamingo_row(tok, stream.sets[n][i % 32], "x", 96) for n, i in stream.sampler.draw(step, 6)]
    assert b["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows) and b["frames"].shape == (6, 3)
    for i, (r, src) in enumerate(zip(rows, b["source"])):
        n = len(r["input_ids"])
        assert b["input_ids"][i, :n].tolist() == r["input_ids"] and b["labels"][i, :n].tolist() == r["labels"]
        assert b["attention_mask"][i].tolist() == [True] * n + [False] * (b["input_ids"].shape[1] - n)
        assert (b["labels"][i, n:] == -100).all() and (b["input_ids"][i, n:] == tok.pad_token_id).all()
        if src == "VTP":  # one clip of 4 frames, then two padded media slots
            assert b["frames"][i].tolist() == [4, 0, 0] and b["pixels"][i, 1:].abs().sum() == 0
            torch.testing.assert_close(b["pixels"][i, 0], r["media"][0])
        else:  # three one-frame images: the frame axis is padded
            assert b["frames"][i].tolist() == [1, 1, 1] and b["pixels"][i, :, 1:].abs().sum() == 0
            torch.testing.assert_close(b["pixels"][i, :, :1], r["media"])


def test_loss_falls_on_a_fixed_tiny_batch(tok):
    model = _model().train()
    batch = FlamingoStream(tok, FLAMINGO_WEIGHTS, seed=2, pool_size=16).batch(0, 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"bridge", "injection"}
    losses = []
    for _ in range(15):
        loss = model(batch) / count_targets(batch["labels"])
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(abs(a) > 0 for a, _ in model.injection.gates())  # the gates left 0
    assert all(p.grad is None for p in model.lm.model.parameters() if not p.requires_grad)


def test_no_supervised_tokens_is_an_error_for_a_sample_and_zero_for_a_batch(tok):
    s = sw.ShapesWorld("clip", seed=0, size=4)[0]
    with pytest.raises(ValueError, match="no supervised text"):
        flamingo_row(tok, s, "t", 96, answer="")
    model = _model()
    b = FlamingoStream(tok, FLAMINGO_WEIGHTS, seed=0, pool_size=16).batch(0, 3)
    b["labels"].fill_(-100)
    loss = model(b)
    assert loss.item() == 0.0 and math.isfinite(loss.item()) and count_targets(b["labels"]) == 0


def test_the_engine_skips_a_batch_without_targets(tmp_path):
    @register_task("flamingo_test_unsupervised_step0")
    def _task(cfg):
        task = flamingo_task(cfg)
        inner = task.batch
        def batch(step):
            out = inner(step)
            if step == 0: out["labels"].fill_(-100)
            return out
        task.batch = batch
        return task
    try:
        cfg = load_config(TINY_CONFIG, _quick(tmp_path, "task=flamingo_test_unsupervised_step0", "stages.0.steps=2", "data.eval_size=0"))
        res = fit(cfg, progress=False)
    finally: TASKS.pop("flamingo_test_unsupervised_step0")
    assert res.history[0]["loss"] is None and res.history[0]["targets"] == 0 and res.history[0]["skipped"] == 1
    assert math.isfinite(res.history[1]["loss"]) and res.history[1]["targets"] > 0


# --- weighted sources ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [dict(FLAMINGO_WEIGHTS), {"M3W": 0.25, "VTP": 0.75}])
def test_the_tasks_batches_follow_the_configured_weights(tmp_path, weights):
    cfg = load_config(TINY_CONFIG, _quick(tmp_path, f"data.weights={json.dumps(weights)}", "train.batch_size=16",
                                          "data.eval_size=0", "data.pool_size=64"))
    task = build_task(cfg)
    steps = 120
    drawn = [s for step in range(steps) for s in task.batch(step)["source"]]
    total = sum(weights.values())
    for name, w in weights.items():
        p = w / total
        se = math.sqrt(p * (1 - p) / len(drawn))
        assert abs(drawn.count(name) / len(drawn) - p) <= 5 * se + 1e-9, (name, drawn.count(name) / len(drawn), p)
    assert set(drawn) == set(weights)
    # each row's media really come from its source: clips (VTP) have 4 frames, documents (M3W) 3 one-frame images
    b = task.batch(0)
    for src, fr in zip(b["source"], b["frames"].tolist()):
        assert fr[:{"M3W": 3, "ALIGN": 1, "LTIP": 1, "VTP": 1}[src]] == [4 if src == "VTP" else 1] * (3 if src == "M3W" else 1)


def test_batches_are_a_pure_function_of_the_step(tmp_path):
    task = build_task(load_config(TINY_CONFIG, _quick(tmp_path, "data.eval_size=0")))
    a, b = task.batch(7), task.batch(7)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixels"], b["pixels"])
    assert a["source"] == b["source"] and a["media_keys"] == b["media_keys"]
    other = build_task(load_config(TINY_CONFIG, _quick(tmp_path, "data.eval_size=0"))).batch(7)  # another task, same config
    assert torch.equal(a["input_ids"], other["input_ids"]) and torch.equal(a["pixels"], other["pixels"])
    c = task.batch(8)
    assert c["source"] != a["source"] or not torch.equal(c["input_ids"], a["input_ids"])


# --- masks, bridges, evaluation ------------------------------------------------------------------------------------

def test_the_three_cross_attention_masks():
    loc = torch.tensor([[0, 1, 0, 0, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    mm = torch.tensor([[True, True, True], [True, False, False]])
    imm = cross_attention_mask(loc, 3, "immediate", media_mask=mm)
    assert torch.equal(imm, media_attention_mask(loc, 3, True, media_mask=mm))
    assert imm[0, 0].tolist() == [False] * 3 and imm[0, 5].tolist() == [False, True, False]
    prev = cross_attention_mask(loc, 3, "previous", media_mask=mm)
    assert torch.equal(prev, media_attention_mask(loc, 3, False, media_mask=mm)) and prev[0, 7].tolist() == [True] * 3
    none = cross_attention_mask(loc, 3, "none", media_mask=mm)
    assert none[0].all() and none[1, :, 0].all() and not none[1, :, 1:].any()
    with pytest.raises(ValueError, match="row 1 has 1 <image> tokens but 3 images"):
        cross_attention_mask(loc, 3, "none", media_mask=torch.ones(2, 3, dtype=torch.bool))  # "none" still checks the counts
    with pytest.raises(ValueError, match="mode='all'"):
        cross_attention_mask(loc, 3, "all", media_mask=mm)


@pytest.mark.parametrize("mask", ["immediate", "previous", "none"])
def test_the_mask_reaches_the_model(tok, mask):
    "Replace the third picture of a document by noise: positions before its <image> move only without a mask."
    model = _model(mask).eval()
    with torch.no_grad():
        for blk in model.injection.blocks: blk.attn_gate.fill_(1.0)
    b = FlamingoStream(tok, {"M3W": 1.0}, seed=0, pool_size=8).batch(0, 2)
    third = int((b["input_ids"][0] == model.lm.image_token_id).nonzero()[2])
    noisy = {**b, "pixels": b["pixels"].clone()}
    noisy["pixels"][0, 2] = torch.rand_like(noisy["pixels"][0, 2])
    with torch.no_grad():
        moved = (_logits(model, b) - _logits(model, noisy)).abs().amax(-1)[0] > 1e-5
    assert moved[third:b["attention_mask"][0].sum()].all()
    assert moved[:third].any() == (mask == "none")


@pytest.mark.parametrize("mask", ["previous", "none"])
def test_the_configured_mask_reaches_the_task_model(tmp_path, mask):
    task = build_task(load_config(TINY_CONFIG, _quick(tmp_path, f"model.xattn.mask={mask}", "data.eval_size=0")))
    assert isinstance(task.model.injection, XAttnInjection) and task.model.injection.kw["mask"] == mask
    assert task.model.lm.model.media_context.mask == mask  # what the gated layers read in every forward
    assert load_config(TINY_CONFIG).model["xattn"]["mask"] == "immediate"  # φ by default


def test_bridges_and_mixed_media(tok):
    x = torch.randn(3, 4, 64, 128)
    mlp, mean = MLPProjector(128, 128, max_frames=8), MeanPool(128, 128, max_frames=8)
    assert mlp(x).shape == (3, 256, 128) and mean(x).shape == (3, 4, 128)
    assert mlp(x[:, 0]).shape == (3, 64, 128) and mean(x[:, 0]).shape == (3, 1, 128)
    with pytest.raises(ValueError, match="max_frames=8"):
        mean(torch.randn(1, 9, 64, 128))
    stream = FlamingoStream(tok, {"M3W": 1.0, "VTP": 1.0}, seed=0, pool_size=8)
    step = next(k for k in range(50) if {n for n, _ in stream.sampler.draw(k, 2)} == {"M3W", "VTP"})
    mixed = stream.batch(step, 2)
    # the resampler gives every image and every clip the same number of tokens: one batch may mix them
    model = _model(bridge="resampler")
    v = model.visual_tokens(mixed)
    assert v.shape == (2, 3, 8, 128) and math.isfinite(model(mixed).item())
    vtp = mixed["source"].index("VTP")
    assert v[vtp, 1:].abs().sum() == 0 and v[1 - vtp].abs().sum(-1).gt(0).all()  # padded media slots stay zero
    clips = FlamingoStream(tok, {"VTP": 1.0}, seed=0, pool_size=8).batch(0, 2)
    for bridge, q in (("mlp", 4 * 64), ("mean", 4)):  # tokens per medium grow with its frames: clips only
        model = _model(bridge=bridge)
        with pytest.raises(ValueError, match="cannot mix them"):
            model(mixed)
        assert model.visual_tokens(clips).shape == (2, 1, q, 128) and math.isfinite(model(clips).item())


def test_the_bridge_rows_build_on_clips_only(tmp_path):
    for row in BRIDGE_ROWS.values():
        task = build_task(load_config(TINY_CONFIG, _quick(tmp_path, *CLIPS_ONLY, *row, "data.eval_size=0")))
        b = task.batch(0)
        assert set(b["source"]) == {"VTP"} and math.isfinite(task.model(b).item())


def test_eval_candidates_and_scores(tok):
    ds = sw.ShapesWorld("interleaved", seed=5, size=50)
    kinds = set()
    for i in range(50):
        plan = ds.plan(i)
        for kind in ("picture", "fewshot"):
            c = _candidates(kind, plan)
            if c is None: continue
            kinds.add(kind)
            assert c[0][c[1]] == plan["meta"]["answer"] and len(c[0]) == 3 and len(set(c[0])) == 3
            if kind == "fewshot": assert all(cap in plan["meta"]["prompt"] for cap in c[0][:2])
    assert kinds == {"picture", "fewshot"}
    s = eval_set("clip", tok, 3, seed=9)
    assert s["choices"] == 4 and len(s["rows"]) == 12 and [r["keys"] for r in s["rows"][:4]] == [s["rows"][0]["keys"]] * 4
    assert [r["keys"] for r in s["rows"][4:8]] == [s["rows"][4]["keys"]] * 4 and s["rows"][4]["keys"] != s["rows"][0]["keys"]
    model = _model().eval()
    # the recipe's accuracy is the share of samples whose right candidate has the highest log-likelihood
    lp = score(model, collate_vlm(s["rows"], tok.pad_token_id)).view(3, 4)
    assert (lp < 0).all()
    ev = flamingo_evaluate(model, {"clip": s})
    assert ev["clip_acc"] == pytest.approx((lp.argmax(1) == s["truth"]).float().mean().item())
    assert ev["clip_axis_acc"] == pytest.approx((lp.argmax(1) // 2 == s["truth"] // 2).float().mean().item())
    assert ev["clip_axis_acc"] >= ev["clip_acc"] and ev["gate_xattn_0"] == 0.0 and ev["gate_ff_3"] == 0.0
    with pytest.raises(ValueError, match="'captions' is not one of"):
        eval_set("captions", tok, 3, seed=0)


# --- bad input ----------------------------------------------------------------------------------------------------

def test_image_count_mismatch_names_both_counts(tok):
    prompt, answer = flamingo_text(sw.ShapesWorld("interleaved", seed=0, size=4).plan(0))
    for n in (2, 4):
        with pytest.raises(ValueError, match=f"the text has 3 <image> but the sample has {n} media"):
            encode_segments(tok, [(prompt, False), (answer, True)], num_media=n, max_len=96)
    model = _model()
    b = FlamingoStream(tok, {"M3W": 1.0}, seed=0, pool_size=8).batch(0, 2)
    b["frames"][1, 2] = 0  # row 1 keeps its three <image> tokens but loses its third image
    with pytest.raises(ValueError, match="row 1 has 3 <image> tokens but 2 images"):
        model(b)


def test_clip_longer_than_max_frames(tmp_path, tok):
    with pytest.raises(ConfigError, match="data.frames: clips of 9 frames are longer than the bridge's max_frames=8"):
        build_task(load_config(TINY_CONFIG, _quick(tmp_path, "data.frames=9")))
    model = _model()
    b = FlamingoStream(tok, {"VTP": 1.0}, seed=0, pool_size=8, frames=9).batch(0, 2)
    with pytest.raises(ValueError, match="f=9 frames but max_frames=8"):
        model(b)


@pytest.mark.parametrize("override, match", [
    ("data.weights={M3W: 1.0, WebLI: 0.5}", "unknown sources \\['WebLI'\\]"),
    ("data.weights={M3W: -1.0}", "-1.0"),
    ("data.eval_sets=[picture, captions]", "data.eval_sets"),
    ("data.image_size=64", "takes 32x32"),
    ("data.frames=1", "data.frames"),
    ("data.max_len=12", "max_len=12"),
    ("model.xattn.mask=causal", "model.xattn.mask"),
    ("model.xattn.gate=tanh", "model.xattn.gate"),
    ("model.xatn={every: 2}", "did you mean 'xattn'"),
    ("model.bridge=perceiver", "model.bridge: 'perceiver' is not one of"),
    ("model.injection=prefix", "model.injection: 'prefix': the flamingo task measures gated cross-attention"),
    ("model.vision=timm:vit", "vision spec 'timm:vit'"),
    ("model.resampler.num_latents=0", "num_latents=0"),
    ("model.resampler.latents=8", "model.resampler.latents"),
])
def test_bad_config_names_the_key_or_value(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        task = build_task(load_config(TINY_CONFIG, _quick(tmp_path, override, "data.eval_size=0")))
        task.batch(0)


# --- the engine task ----------------------------------------------------------------------------------------------

def test_the_task_trains_and_resumes_exactly(tmp_path):
    full = fit(load_config(TINY_CONFIG, _quick(tmp_path / "a")), progress=False)
    assert full.step == 4 and all(math.isfinite(r["loss"]) for r in full.history)
    assert set(full.metrics) >= {"picture_acc", "fewshot_acc", "clip_acc", "clip_axis_acc", "gate_xattn_0", "gate_ff_3"}
    assert all(0 < abs(full.metrics[f"gate_xattn_{i}"]) < 1 for i in range(4))
    half = fit(load_config(TINY_CONFIG, _quick(tmp_path / "b", "train.stop_at=2")), progress=False)
    assert half.step == 2 and half.stopped
    resumed = fit(load_config(TINY_CONFIG, _quick(tmp_path / "b")), resume=half.run_dir, progress=False)
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history], rel=1e-5)
    a, b = load_checkpoint(full.run_dir)["params"], load_checkpoint(resumed.run_dir)["params"]
    assert a.keys() == b.keys() and any(k.startswith("injection.blocks.") for k in a) and any(k.startswith("bridge.") for k in a)
    assert all(k.startswith(("bridge.", "injection.")) for k in a)  # frozen encoder and LM are not saved
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_tiny_config_is_the_documented_recipe():
    cfg = load_config(TINY_CONFIG)
    m = parse_vlm_config(cfg.model)
    assert cfg.task == "flamingo" and m.lm == "zoo:lm" and m.vision == "zoo"
    assert m.bridge == "resampler" and m.injection == "xattn" and m.parts["xattn"].mask == "immediate"
    assert m.parts["resampler"].num_latents == 16 and m.parts["xattn"].every == 1
    assert cfg.data["weights"] == FLAMINGO_WEIGHTS
    assert cfg.stages[0].trainable == ["bridge.*", "injection.*"]
    # every row of the notebook's ablation is a valid override of this recipe
    for row in [*MASK_ROWS.values(), *BRIDGE_ROWS.values()]:
        parse_vlm_config(load_config(TINY_CONFIG, [*CLIPS_ONLY, *row]).model)
    assert [load_config(TINY_CONFIG, r).model["xattn"]["mask"] for r in MASK_ROWS.values()] == ["immediate", "previous", "none"]


# --- configs/flamingo_small.yaml offline ------------------------------------------------------------------------------

def _foreign_lm(tmp_path):
    "A tiny Qwen2 checkpoint whose tokenizer (not ours) has no <image> token, written with save_pretrained."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    texts = [sw.ShapesWorld(t, seed=0, size=200).plan(i)["text"] for t in ("caption", "interleaved", "clip") for i in range(200)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")
    assert "<image>" not in tok.get_vocab()
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    lm.save_pretrained(tmp_path / "lm"); tok.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


def test_small_config_names_resolve_to_the_right_classes():
    open_clip = pytest.importorskip("open_clip")
    raw = yaml.safe_load(SMALL_CONFIG.read_text())
    m = parse_vlm_config(raw["model"])
    arch = m.vision.split(":", 1)[1]
    assert m.vision.startswith("open_clip:") and arch in open_clip.list_models()
    assert m.vision_args["pretrained"] in open_clip.list_pretrained_tags_by_model(arch)
    assert m.lm.startswith("hf:") and "/" in m.lm  # a Hugging Face hub id, loaded by LanguageModel.from_pretrained
    assert m.bridge == "resampler" and m.injection == "xattn" and m.parts["resampler"].num_latents == 64
    assert raw["data"]["image_size"] == open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    cfg = load_config(SMALL_CONFIG)  # the whole file validates
    assert cfg.task == "flamingo" and cfg.stages[0].trainable == ["bridge.*", "injection.*"]


def test_small_config_path_trains_offline(tmp_path):
    "configs/flamingo_small.yaml as it is, with tiny stand-ins: an open_clip architecture by name, a save_pretrained HF LM."
    open_clip = pytest.importorskip("open_clip")
    arch = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=48, patch_size=8, head_width=16),
                text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mmb-flamingo-tiny.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "cfg")
    lm_dir = _foreign_lm(tmp_path)
    over = [f"model.lm={lm_dir}", "model.vision=open_clip:mmb-flamingo-tiny", "model.vision_args.pretrained=null",
            "data.image_size=32", "data.eval_size=4", "data.pool_size=16", "data.max_len=160", "train.batch_size=4",
            "train.device=cpu", "train.precision=fp32", "stages.0.steps=2", "optim.warmup_steps=1", "train.eval_every=0",
            "train.ckpt_every=0", f"train.run_dir={tmp_path}/{{name}}", "model.resampler.num_latents=4", "model.resampler.depth=1"]
    cfg = load_config(SMALL_CONFIG, over)
    task = build_task(cfg)
    assert isinstance(task.model.vision, NormalizedVision) and isinstance(task.model.vision.tower, OpenClipVision)
    assert type(task.model.lm.model).__name__ == "Qwen2ForCausalLM"
    assert isinstance(task.model.bridge, PerceiverResampler) and task.model.bridge.num_latents == 4
    assert len(task.model.injection.blocks) == 1  # every: 4 over 4 layers
    assert task.model.lm.image_token_id == task.model.lm.model.get_input_embeddings().num_embeddings - 1  # <image> was added
    res = fit(cfg, progress=False)
    assert res.step == 2 and all(math.isfinite(r["loss"]) for r in res.history)
    assert {"picture_acc", "fewshot_acc", "clip_acc", "gate_xattn_0"} <= set(res.metrics)
    assert not any(p.requires_grad for p in task.model.vision.parameters())
