"""The llava recipe: samples with the right labels or dropped (never cut), the stream switches data with the stage, the
two stages train what they say, LoRA adapters and the projector reload together in a fresh process, `mmbridge generate`."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmbridge_ref.backbones.towers import ZOO_DIR, load_tokenizer
from mmbridge_ref.cli import main
from mmbridge_ref.data import shapesworld as sw
from mmbridge_ref.data.formats import export_llava
from mmbridge_ref.data.instruct import LlavaInstruct, conversations_to_messages
from mmbridge_ref.recipes.llava import (TINY_CONFIG, Dropped, LlavaDataConfig, LlavaStream, answer, caption_messages,
                                        chance_levels, conversation_row, llava_eval_sets, llava_evaluate)
from mmbridge_ref.train.config import ConfigError, load_config, parse_dataclass
from mmbridge_ref.train.loop import build_task, fit, load_run

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["stages.0.steps=2", "stages.1.steps=2", "train.batch_size=4", "data.eval_size=4", "data.pool_size=16",
         "train.threads=1", "train.log_every=1", "train.ckpt_every=0"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ZOO_DIR / "lm")


@pytest.fixture(scope="module")
def conv():
    return conversations_to_messages(LlavaInstruct(size=4, max_objects=2).plan(1)["conversations"])


def test_row_labels_are_the_replies(tok, conv):
    img = torch.rand(3, 32, 32)
    row = conversation_row(tok, conv, img, "k", template="zoo", visual_tokens=64, max_len=256, name="s")
    learnt = tok.decode([t for t in row["labels"] if t != -100])
    replies = [m["content"] for m in conv if m["role"] == "assistant"]
    assert learnt.replace("</s>", "").split() == " ".join(replies).split()
    assert learnt.count("</s>") == len(replies)
    assert row["media"].shape == (1, 1, 3, 32, 32) and torch.equal(row["media"][0, 0], img) and row["keys"] == ["k"]
    plain = conversation_row(tok, caption_messages("a red circle at the top left ."), img, "k", template="plain",
                             visual_tokens=64, max_len=256, name="c")
    assert tok.decode([t for t in plain["labels"] if t != -100]).replace("</s>", " </s>").split() == "a red circle at the top left . </s>".split()


def test_too_long_is_dropped_and_counted_never_cut(tok, conv, caplog):
    img, n_text = torch.rand(3, 32, 32), len(conversation_row(tok, conv, torch.rand(3, 32, 32), "k", template="zoo",
                                                              visual_tokens=1, max_len=10_000, name="s")["input_ids"])
    fits = conversation_row(tok, conv, img, "k", template="zoo", visual_tokens=10, max_len=n_text + 9, name="s")
    assert fits is not None and len(fits["input_ids"]) == n_text  # exactly at the limit: whole
    dropped = Dropped()
    with caplog.at_level(logging.WARNING, logger="mmbridge_ref.llava"):
        assert conversation_row(tok, conv, img, "k", template="zoo", visual_tokens=11, max_len=n_text + 9, name="s-7", dropped=dropped) is None
    assert dropped["too long"] == 1 and "s-7" in caplog.text and "1 dropped" in caplog.text
    with pytest.raises(ValueError, match="s-7"):
        conversation_row(tok, conv, img, "k", template="zoo", visual_tokens=11, max_len=n_text + 9, name="s-7")


def test_two_images_in_the_text_is_an_error(tok):
    msgs = [{"role": "user", "content": "<image> <image> what ?"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(ValueError, match="2 <image>"):
        conversation_row(tok, msgs, torch.rand(3, 32, 32), "k", template="zoo", visual_tokens=4, max_len=256, name="x")


def test_stream_follows_the_stages_and_is_deterministic(tok):
    d = parse_dataclass(LlavaDataConfig, {"pool_size": 32, "template": "zoo"}, "data")
    stages = [{"name": "align", "steps": 3}, {"name": "instruct", "steps": 3}]
    s = LlavaStream(tok, d, stages, seed=0, visual_tokens=64)
    user = tok(" user :", add_special_tokens=False).input_ids[0]
    a, b = s.batch(2, 4), s.batch(3, 4)
    assert not (a["input_ids"] == user).any() and (b["input_ids"] == user).any()  # plain captions, then conversations
    again = LlavaStream(tok, d, stages, seed=0, visual_tokens=64).batch(3, 4)
    assert torch.equal(b["input_ids"], again["input_ids"]) and torch.equal(b["pixels"], again["pixels"])


def test_a_bad_image_in_a_llava_json_is_skipped_and_the_run_goes_on(tok, tmp_path, caplog):
    samples = LlavaInstruct(size=6, max_objects=2).__getitems__(range(6))
    path = export_llava(samples, tmp_path / "set")
    images = sorted((tmp_path / "set" / "images").glob("*.png"))
    images[1].write_bytes(b"not a png")
    images[3].unlink()
    d = parse_dataclass(LlavaDataConfig, {"json": str(path), "image_folder": str(tmp_path / "set"), "template": "zoo"}, "data")
    s = LlavaStream(tok, d, [{"name": "instruct", "steps": 5}], seed=0, visual_tokens=64)
    with caplog.at_level(logging.WARNING, logger="mmbridge_ref.llava"):
        batch = s.batch(0, 6)
    assert batch["input_ids"].shape[0] == 6 and s.dropped["bad image"] == 2
    assert images[1].name in caplog.text and images[3].name in caplog.text


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.template.*llava_v1"):
        build_task(load_config(TINY_CONFIG, [*QUICK, "data.template=vicuna"]))
    with pytest.raises(ConfigError, match="caption_stages"):
        build_task(load_config(TINY_CONFIG, [*QUICK, "data.caption_stages=[pretrain]"]))
    with pytest.raises(ConfigError, match="instruct.essay"):
        parse_dataclass(LlavaDataConfig, {"instruct": {"essay": 1.0}}, "data")


def test_stage_one_trains_only_the_projector_and_stage_two_the_lm(tmp_path, one_thread):
    cfg = load_config(TINY_CONFIG, [*QUICK, "stages.1.steps=0", f"train.run_dir={tmp_path}/{{name}}"])
    before = {k: v.clone() for k, v in build_task(cfg).model.state_dict().items()}
    after = load_run(fit(cfg, progress=False).run_dir).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("bridge.") for k in changed)
    cfg2 = load_config(TINY_CONFIG, [*QUICK, f"train.run_dir={tmp_path}/two/{{name}}"])
    after2 = load_run(fit(cfg2, progress=False).run_dir).model.state_dict()
    assert any(k.startswith("lm.") and not torch.equal(before[k], after2[k]) for k in before)


RELOAD = """
import sys, torch
from mmbridge_ref.train.loop import load_run
torch.manual_seed(0)
model = load_run(sys.argv[1]).model
batch = torch.load(sys.argv[2], weights_only=False)
torch.save({"loss": model(batch).detach(), "blank": model({**batch, "pixels": torch.zeros_like(batch["pixels"])}).detach(),
            "state": {k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith("bridge.")}}, sys.argv[3])
"""


def test_lora_and_projector_reload_together_in_a_fresh_process(tmp_path, one_thread):
    sets = ["model.lm_lora={r: 4, alpha: 8}", "stages.1.trainable=[bridge.*, '*lora_*']", "stages.1.lr_mult={}",
            "data.cache_features=false"]
    cfg = load_config(TINY_CONFIG, [*QUICK, *sets, "stages.1.steps=4", f"train.run_dir={tmp_path}/{{name}}"])
    res = fit(cfg, progress=False)
    task = load_run(res.run_dir)
    lora = {k: v for k, v in task.model.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # lora_B starts at 0: it trained
    batch = task.batch(5)
    torch.save(batch, tmp_path / "batch.pt")
    r = subprocess.run([sys.executable, "-c", RELOAD, str(res.run_dir), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    mine = {k: v for k, v in task.model.state_dict().items() if "lora_" in k or k.startswith("bridge.")}
    assert mine.keys() == out["state"].keys() and all(torch.equal(mine[k], out["state"][k]) for k in mine)
    with torch.no_grad(): loss = task.model(batch)
    assert torch.allclose(loss, out["loss"], rtol=1e-4)
    assert not torch.allclose(out["loss"], out["blank"], rtol=1e-4)  # the reloaded model reads the images


def test_eval_sets_and_chance(one_thread):
    d = parse_dataclass(LlavaDataConfig, {"eval_size": 10, "template": "zoo"}, "data")
    sets = llava_eval_sets(d, 0)
    assert {len(v) for v in sets.values()} == {10}
    assert all(r["prompt"].endswith("Answer the question using a single word or phrase.") for r in sets["vqa"])
    assert all(r["options"] == 4 for r in sets["mc"])
    ch = chance_levels(sets)
    assert ch["mc_acc"] == pytest.approx(0.25) and 0.05 < ch["vqa_em"] < 0.5
    test = llava_eval_sets(parse_dataclass(LlavaDataConfig, {"eval_size": 30, "eval_split": "test"}, "data"), 0)
    assert any((o.colour, o.shape) in sw.HELD_OUT for r in test["vqa"] for o in r["scene"].objects)


def test_generate_cli_on_a_run_and_a_real_photo(tmp_path, capsys, one_thread):
    cfg = load_config(TINY_CONFIG, [*QUICK, f"train.run_dir={tmp_path}/{{name}}"])
    res = fit(cfg, progress=False)
    run = res.run_dir
    assert (run / "samples.png").stat().st_size > 1000 and "samples.png" in res.report and "report.md" in res.report
    assert (run / "report.md").read_text().startswith("| held-out metric | value | chance |")
    photo = ROOT / "data_samples" / "photos" / "astronaut.jpg"
    capsys.readouterr()
    assert main(["generate", str(run), "--image", str(photo), "--prompt", "what colour is the circle ?", "--max-new-tokens", "4"]) == 0
    said = capsys.readouterr().out.strip()
    assert isinstance(said, str) and "\n" not in said
    model = load_run(run).model
    from mmbridge_ref.data.formats import read_image
    assert said == answer(model, read_image(photo, image_size=32), "what colour is the circle ?", template="zoo", max_new_tokens=4)
    assert main(["generate", str(tmp_path / "nowhere"), "--image", str(photo), "--prompt", "hi"]) == 1
    assert "not a run directory" in capsys.readouterr().err
    assert main(["generate", str(run), "--image", str(tmp_path / "missing.png"), "--prompt", "hi"]) == 1
    assert "missing.png" in capsys.readouterr().err


def test_small_recipe_builds_and_trains_offline(tmp_path, tok, one_thread):
    "configs/llava_small.yaml's code path (an HF CLIP tower and an HF Llama by path, LoRA, llava_v1) on tiny checkpoints."
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from mmbridge_ref.backbones.towers import HFVisionTower, tiny_lm
    base = load_config(ROOT / "configs" / "llava_small.yaml")
    assert base.model["vision"].startswith("hf:") and base.model["lm"].startswith("hf:") and base.model["vision_layer"] == -2
    assert base.data["template"] == "llava_v1" and base.data["cache_features"] is False and base.model["lm_lora"]["r"] == 128
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path / "clip")
    tiny_lm(tok, dim=32, depth=2, heads=2, max_len=512).save_pretrained(tmp_path / "lm")
    cfg = load_config(ROOT / "configs" / "llava_small.yaml", [
        f"model.vision={tmp_path / 'clip'}", f"model.lm={tmp_path / 'lm'}", "model.lm_lora={r: 4, alpha: 8}",
        "data.image_size=32", "data.pool_size=16", "data.eval_size=4", "data.max_len=512", "train.batch_size=4",
        "train.grad_accum=1", "train.device=cpu", "stages.0.steps=2", "stages.1.steps=2", "optim.warmup_steps=1",
        "train.ckpt_every=0", "train.eval_every=0", f"train.run_dir={tmp_path}/{{name}}"])
    task = build_task(cfg)
    assert isinstance(task.model.vision.tower, HFVisionTower) and task.model.cache is None
    assert task.batch(0)["pixels"].shape == (4, 1, 1, 3, 32, 32)
    res = fit(cfg, progress=False)
    assert res.step == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    assert res.params[1]["trainable"] > res.params[0]["trainable"]  # stage 2 adds the adapters
    trained = load_run(res.run_dir).model.state_dict()
    assert any("lora_B" in k and trained[k].abs().sum() > 0 for k in trained)


def test_yi_vl_stages_train_the_tower_and_cap_the_sources(tmp_path, tok, one_thread):
    from mmbridge_ref.recipes.llava import YIVL_ROWS
    cfg = load_config(TINY_CONFIG, [*QUICK, *YIVL_ROWS["Yi-VL stages, tower lr x0.1"], f"train.run_dir={tmp_path}/{{name}}"])
    before = {k: v.clone() for k, v in build_task(cfg).model.state_dict().items() if k.startswith("vision.")}
    after = load_run(fit(cfg, progress=False).run_dir).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the tower learnt
    d = parse_dataclass(LlavaDataConfig, {"source_cap": 50}, "data")
    s = LlavaStream(tok, d, [{"name": "instruct", "steps": 1}], seed=0, visual_tokens=64)
    assert max(s.instruct.weights.values()) == pytest.approx(50 / (50 + 23 + 50 + 50 + 50))
    with pytest.raises(ConfigError, match="source_cap"): parse_dataclass(LlavaDataConfig, {"source_cap": 0}, "data")


RELOAD_EVAL = """
import sys, json, torch
torch.set_num_threads(1)
from mmbridge_ref.train.loop import load_run
from mmbridge_ref.train.config import parse_dataclass
from mmbridge_ref.recipes.llava import LlavaDataConfig, llava_eval_sets, llava_evaluate, chance_levels
model = load_run(sys.argv[1]).model
sets = llava_eval_sets(parse_dataclass(LlavaDataConfig, {"eval_size": 60, "template": "zoo"}, "data"), 0)
seen, blank = llava_evaluate(model, sets, "zoo"), llava_evaluate(model, sets, "zoo", blank=True)
print(json.dumps({"seen": seen["vqa_em"], "blank": blank["vqa_em"], "chance": chance_levels(sets)["vqa_em"]}))
"""


def test_after_a_reload_answers_need_the_image(tmp_path, one_thread):
    "LLaVA#784/#808: under LoRA the projector got lost on reload and answers ignored the image. Here they must not."
    sets = ["model.lm_lora={r: 8, alpha: 16}", "stages.1.trainable=[bridge.*, '*lora_*']", "stages.1.lr_mult={}"]
    cfg = load_config(TINY_CONFIG, [*sets, "stages.0.steps=80", "stages.1.steps=150", "data.instruct={short_answer: 1}",
                                    "data.eval_size=0", "train.threads=1", "train.ckpt_every=0", f"train.run_dir={tmp_path}/{{name}}"])
    run = fit(cfg, progress=False).run_dir
    r = subprocess.run([sys.executable, "-c", RELOAD_EVAL, str(run)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["seen"] >= got["chance"] + 0.1, got  # the reloaded projector and adapters read the image
    assert got["blank"] <= got["chance"] + 0.1 and got["seen"] >= got["blank"] + 0.15, got  # a blank image: back to about chance
    # (+0.1: with no image the LM still knows the answers' priors, e.g. "no" to "is there a ...?")


def test_the_stream_reads_a_parquet_file_with_llava_fields(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    from mmbridge_ref.data.formats import hf_records
    samples = LlavaInstruct(size=4, max_objects=2).__getitems__(range(4))
    datasets.Dataset.from_list(hf_records(samples)).to_parquet(str(tmp_path / "set.parquet"))
    d = parse_dataclass(LlavaDataConfig, {"hf": str(tmp_path / "set.parquet"), "template": "zoo"}, "data")
    s = LlavaStream(tok, d, [{"name": "instruct", "steps": 2}], seed=0, visual_tokens=64)
    b = s.batch(0, 4)
    want = [conversation_row(tok, conversations_to_messages(x["conversations"]), x["image"], "k", template="zoo",
                             visual_tokens=64, max_len=256, name=x["id"])["input_ids"] for x in samples]
    for i, ids in enumerate(want):
        assert b["input_ids"][i, :len(ids)].tolist() == ids
    assert (b["pixels"][:, 0, 0] - torch.stack([x["image"] for x in samples])).abs().max() <= 1 / 255 + 1e-6


def test_bad_lora_settings_and_prompts_name_the_value(tok):
    from mmbridge_ref.vlm import build_vlm
    with pytest.raises(ConfigError, match="model.lm_lora.r: 0"): build_vlm({"lm_lora": {"r": 0}}, cache=None)
    with pytest.raises(ConfigError, match=r"model.lm_lora.targets: \['nope'\]"): build_vlm({"lm_lora": {"targets": ["nope"]}}, cache=None)
    model = build_vlm({}, cache=None)
    with pytest.raises(ValueError, match="2 <image> for one image"):
        answer(model, torch.rand(3, 32, 32), "<image> <image> what colour ?", template="zoo")
    from mmbridge_ref.recipes.llava import prompt_row
    row = prompt_row(tok, "<image> caption :", torch.rand(3, 32, 32), None, None)  # template None: the prompt is the whole text
    assert "keys" not in row and tok.decode(row["input_ids"]).replace(" ", "") == "<s><image>caption:"  # no key: never cached
