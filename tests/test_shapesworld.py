"""ShapesWorld: determinism across processes, committed samples, real-data loading, properties, bad input."""
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmbridge_ref.data.shapesworld import (COLOURS, HELD_OUT, IMAGE_TOKEN, NUMBERS, POSITIONS, SHAPES, SIZES, TASKS, VQA_KINDS,
                                      Obj, Scene, ShapesWorld, caption, caption_is_true, check_sample, dialogue,
                                      load_llava_json, preview, render, sample_scene, scene_note, vqa)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, PHOTOS = ROOT / "data_samples" / "shapesworld", ROOT / "data_samples" / "photos"


def _fingerprint(task, seed, idx):
    ds = ShapesWorld(task, seed=seed)
    s = ds.batch(idx, collate=False)
    return [(x["text"], round(float(x["images"].double().sum()), 4)) for x in s]


# --- determinism -----------------------------------------------------------------------------------------------

def test_samples_are_identical_in_another_process_with_another_hash_seed():
    code = ("import json; from tests.test_shapesworld import _fingerprint; "
            "print(json.dumps({t: _fingerprint(t, 7, [0, 3, 11]) for t in %r}))" % (TASKS,))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    there = json.loads(out.stdout)
    here = {t: [list(x) for x in _fingerprint(t, 7, [0, 3, 11])] for t in TASKS}
    assert there == here


def test_index_order_and_batch_membership_do_not_change_a_sample():
    ds = ShapesWorld("vqa", seed=1)
    a, b = ds.batch([9, 2, 5], collate=False), ds.batch([5, 9], collate=False)
    assert a[0]["text"] == b[1]["text"] and a[2]["text"] == b[0]["text"]
    assert torch.equal(a[0]["images"], b[1]["images"])


def test_split_and_task_change_the_sample():
    assert ShapesWorld("caption", split="train")[0]["text"] != ShapesWorld("caption", split="all")[0]["text"]
    assert ShapesWorld("caption")[0]["text"] != ShapesWorld("vqa")[0]["text"]


# --- committed samples are what the generator makes (regression) ----------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_committed_samples_match_the_generator(task):
    back = load_llava_json(SAMPLES / f"{task}.json", SAMPLES)
    ref = ShapesWorld(task, size=len(back)).batch(range(len(back)), collate=False)
    assert len(back) == 8
    for a, b in zip(back, ref):
        assert a["text"] == b["text"] and a["task"] == task and a["conversations"] == b["conversations"]
        assert a["meta"]["answer"] == b["meta"]["answer"]
        assert (a["images"] - b["images"]).abs().max() <= 0.5 / 255 + 1e-6   # PNG keeps 8 bits
        check_sample(a)


def test_data_samples_stay_small():
    total = sum(p.stat().st_size for p in (ROOT / "data_samples").rglob("*") if p.is_file()
                if p.parts[len(ROOT.parts) + 1] in ("shapesworld", "photos"))
    assert total < 3 * 2**20, f"{total / 2**20:.1f} MB"


# --- real data ------------------------------------------------------------------------------------------------

def test_photos_load_with_their_captions_and_licence():
    photos = load_llava_json(PHOTOS / "llava.json", PHOTOS, image_size=32)
    assert len(photos) >= 5 and (PHOTOS / "LICENSE").is_file() and "public domain" in (PHOTOS / "README.md").read_text()
    for s in photos:
        assert s["images"].shape == (1, 3, 32, 32) and 0 <= float(s["images"].min()) and float(s["images"].max()) <= 1
        assert s["conversations"][0]["value"].startswith(IMAGE_TOKEN) and s["text"] == s["text"].lower()
        assert s["images"].std() > 0.05   # a real picture, not a blank


def _write(tmp_path, records, images=("a.png",)):
    from PIL import Image
    for name in images:
        Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / name)
    p = tmp_path / "data.json"
    p.write_text(json.dumps(records))
    return p


def test_load_llava_json_reads_a_file_the_test_wrote(tmp_path):
    p = _write(tmp_path, [
        {"id": "x1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour ?"},
                                                          {"from": "gpt", "value": "red ."}]},
        {"id": "x2", "image": ["a.png", "b.png"], "text": "<image> one <image> two"},
        {"id": "x3", "conversations": [{"from": "human", "value": "hello ?"}, {"from": "gpt", "value": "hi ."}]},
    ], images=("a.png", "b.png"))
    a, b, c = load_llava_json(p, tmp_path)
    assert a["images"].shape == (1, 3, 10, 20) and torch.allclose(a["images"][0, :, 0, 0], torch.tensor([1., 0, 0]))
    assert a["text"] == "<image>\nwhat colour ?\nred ." and a["meta"]["answer"] == "red ." and a["task"] == "llava"
    assert b["images"].shape == (2, 3, 10, 20) and b["conversations"] is None
    assert c["images"].shape[0] == 0                                       # text-only record
    assert load_llava_json(p, tmp_path, image_size=8)[0]["images"].shape == (1, 3, 8, 8)


@pytest.mark.parametrize("record, error, message", [
    ({"id": 1, "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}, FileNotFoundError, "missing.png"),
    ({"id": 2, "image": "bad.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}, ValueError, "cannot decode image"),
    ({"id": 3, "image": "a.png", "conversations": [{"from": "human", "value": "q"}]}, ValueError, "0 <image> markers but the sample has 1 images"),
    ({"id": 4, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nq"}]}, ValueError, "id=4"),
    ({"id": 5, "image": "a.png", "conversations": [{"from": "user", "value": "<image>\nq"}]}, ValueError, "'human', 'gpt'"),
    ({"id": 6, "image": "a.png"}, ValueError, "neither 'conversations' nor 'text'"),
])
def test_load_llava_json_bad_records_fail_clearly(tmp_path, record, error, message):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    p = _write(tmp_path, [record])
    with pytest.raises(error, match=message.replace("(", r"\(")):
        load_llava_json(p, tmp_path)


# --- properties -----------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), task=st.sampled_from(TASKS), split=st.sampled_from(("train", "test", "all")),
       idx=st.integers(0, 9999))
def test_every_sample_keeps_the_schema(seed, task, split, idx):
    s = check_sample(ShapesWorld(task, seed=seed, split=split, num_images=2 + idx % 3)[idx])
    m, H = s["images"].shape[0], s["images"].shape[-1]
    assert s["images"].dtype == torch.float32 and 0 <= float(s["images"].min()) and float(s["images"].max()) <= 1
    assert H == (128 if task == "hires" else 32)
    assert m == {"interleaved": 2 + idx % 3, "clip": 4}.get(task, 1)
    assert s["text"] == s["text"].lower() and "  " not in s["text"]
    assert s["text"].endswith(s["meta"]["answer"]) and s["text"].startswith(s["meta"]["prompt"])
    pairs = {o.pair for sc in s["meta"]["scenes"] for o in sc.objects}
    if split == "train": assert not pairs & HELD_OUT
    if split == "test": assert pairs & HELD_OUT


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**9))
def test_captions_and_notes_state_only_true_facts(seed):
    rng = random.Random(seed)
    sc = sample_scene(rng, split="all")
    assert caption_is_true(sc, caption(sc, rng))
    note = scene_note(sc, rng)
    for o in sc.objects:
        assert o.colour in note and o.shape in note and o.position in note


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**9))
def test_a_caption_about_another_scene_is_caught(seed):
    rng = random.Random(seed)
    a, b = sample_scene(rng), sample_scene(rng)
    if {(o.size, o.colour, o.shape) for o in a.objects} != {(o.size, o.colour, o.shape) for o in b.objects}:
        assert not caption_is_true(a, caption(b, rng))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**9), turns=st.integers(1, 4))
def test_dialogue_is_llava_shaped(seed, turns):
    rng = random.Random(seed)
    conv = dialogue(sample_scene(rng), rng, turns=turns)
    assert [t["from"] for t in conv] == ["human", "gpt"] * turns
    assert conv[0]["value"].startswith(IMAGE_TOKEN + "\n") and sum(t["value"].count(IMAGE_TOKEN) for t in conv) == 1


def test_render_draws_the_named_colour_at_the_named_cell():
    for r, c in [(0, 0), (1, 2), (2, 1)]:
        for colour in COLOURS:
            img = render([Scene([Obj("square", colour, "large", r, c)])], 33)[0]        # 11 px cells
            centre = img[:, r * 11 + 5, c * 11 + 5]
            assert torch.allclose(centre, torch.tensor(
                {"red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
                 "yellow": (0.95, 0.90, 0.10), "purple": (0.60, 0.20, 0.80), "orange": (1.00, 0.55, 0.05),
                 "cyan": (0.10, 0.85, 0.90), "white": (0.95, 0.95, 0.95)}[colour]), atol=1e-6)
            assert float(img.sum()) == pytest.approx(float(img[:, r * 11:(r + 1) * 11, c * 11:(c + 1) * 11].sum()))


def test_render_edge_cases():
    assert render([], 32).shape == (0, 3, 32, 32)
    assert float(render([Scene([])], 16).abs().sum()) == 0
    with pytest.raises(ValueError, match="size=2"):
        render([Scene([])], 2)


def test_large_shapes_cover_more_than_small_and_scale_shrinks_them():
    for shape in SHAPES:
        small, large = render([Scene([Obj(shape, "white", z, 1, 1)]) for z in SIZES], 64)[:, 0].sum((1, 2))
        assert large > 2 * small
        big, tiny = render([Scene([Obj(shape, "white", "large", 1, 1)])] * 2, 128, scale=1.0)[0, 0].sum(), \
            render([Scene([Obj(shape, "white", "large", 1, 1)])], 128, scale=0.25)[0, 0].sum()
        assert tiny < big / 10


def test_yes_no_answers_are_balanced_in_the_dataset():
    ds = ShapesWorld("vqa", size=3000, vqa_kinds=["yesno"])
    c = Counter(ds.plan(i)["meta"]["answer"] for i in range(3000))
    assert set(c) == {"yes", "no"} and abs(c["yes"] - c["no"]) < 150


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: ShapesWorld("video"), "'caption', 'vqa', 'dialogue', 'interleaved', 'clip', 'hires'"),
    (lambda: ShapesWorld("vqa", split="validation"), "split='validation'"),
    (lambda: ShapesWorld("vqa", vqa_kinds=["size"]), "'colour', 'count', 'position', 'yesno', 'shape'"),
    (lambda: ShapesWorld("interleaved", num_images=1), "num_images=1"),
    (lambda: ShapesWorld("clip", frames=1), "frames=1"),
    (lambda: ShapesWorld("caption", max_objects=10), "max_objects=10"),
    (lambda: vqa(Scene([Obj("circle", "red", "small", 0, 0)]), random.Random(0), "size"), "kind='size'"),
    (lambda: sample_scene(random.Random(0), split="val"), "'train', 'test', 'all'"),
])
def test_bad_values_name_the_valid_ones(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make()


def test_out_of_range_index_is_an_index_error():
    with pytest.raises(IndexError, match="index 5"):
        ShapesWorld("caption", size=5)[5]


def test_preview_returns_a_figure_and_saves_it(tmp_path):
    fig = preview("interleaved", n=2, path=tmp_path / "p.png")
    assert fig.axes and (tmp_path / "p.png").stat().st_size > 1000


def test_dataloader_uses_the_vectorised_path_and_collates():
    ds = ShapesWorld("interleaved", size=64)
    b = next(iter(torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=ShapesWorld.collate)))
    assert b["images"].shape == (16, 3, 3, 32, 32) and b["task"] == "interleaved"
    assert b["text"] == ds.batch(range(16))["text"]
    with pytest.raises(ValueError, match="empty batch"):
        ds.batch([])


def test_an_integer_tensor_index_gives_the_same_sample_and_a_float_is_refused():
    ds = ShapesWorld("caption", size=10)
    assert ds[torch.tensor(3)]["text"] == ds[3]["text"]
    with pytest.raises(TypeError):
        ds[3.0]
