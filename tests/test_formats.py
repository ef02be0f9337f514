"""Data formats (nbs/72_formats.ipynb): LLaVA JSON + PNG folder, HF `datasets` folders and parquet files round-trip
conversations and pixels; bad images are skipped and counted, malformed records are errors that name the entry."""
import io
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmbridge_ref.data.formats import (EXPORT_TASKS, ImageError, LlavaDataset, LlavaJsonDataset, export_llava,
                                       export_task, generate, hf_records, load_hf_dataset, read_image)
from mmbridge_ref.data.instruct import LlavaInstruct

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def samples():
    return LlavaInstruct(seed=5).__getitems__(range(8))


def quantised(image):
    """What an 8-bit PNG holds of a float image."""
    return (image.clamp(0, 1) * 255).round() / 255


def assert_same(back, samples):
    assert len(back) == len(samples)
    for a, b in zip(back, samples):
        assert (a["id"], a["conversations"], a["meta"]) == (b["id"], b["conversations"], b["meta"])
        assert torch.equal(a["image"], quantised(b["image"])), a["id"]


def png_bytes(image):
    buf = io.BytesIO()
    Image.fromarray((quantised(image) * 255).byte().permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- LLaVA JSON + PNG folder
def test_export_then_read_gives_the_same_conversations_and_pixels(tmp_path, samples):
    path = export_llava(samples, tmp_path / "out")
    assert path == tmp_path / "out" / "data.json"
    records = json.loads(path.read_text())
    assert [sorted(r) for r in records] == [["conversations", "id", "image", "meta"]] * len(samples)
    assert all(r["image"].startswith("images/") and (tmp_path / "out" / r["image"]).is_file() for r in records)
    ds = LlavaJsonDataset(path, tmp_path / "out")
    assert_same(list(ds), samples)
    assert_same([ds[i] for i in range(len(ds))], samples)
    assert ds.skipped == 0


def test_export_accepts_a_generator_and_text_only_samples(tmp_path, samples):
    text_only = {"id": "chat", "image": None, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = export_llava((s for s in [samples[0], text_only]), tmp_path)
    assert "image" not in json.loads(path.read_text())[1]
    back = list(LlavaJsonDataset(path, tmp_path))
    assert back[1]["image"] is None and back[1]["conversations"] == text_only["conversations"] and back[1]["meta"] == {}


def test_resize_to_the_encoders_size(tmp_path):
    big = LlavaInstruct(seed=1, image_size=64).__getitems__(range(6))
    path = export_llava(big, tmp_path)
    full = list(LlavaJsonDataset(path, tmp_path, image_size=None))
    small = list(LlavaJsonDataset(path, tmp_path, image_size=32))
    for f, s, b in zip(full, small, big):
        assert torch.equal(f["image"], quantised(b["image"]))      # None keeps the file's size
        assert s["image"].shape == (3, 32, 32)
        ref = F.interpolate(f["image"][None], size=32, mode="bicubic", antialias=True)[0].clamp(0, 1)
        assert (s["image"] - ref).abs().max() < 0.05 and (s["image"] - ref).abs().mean() < 0.003
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")   # not square: squashed to the encoder's square
    x = read_image("wide.png", tmp_path, 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x[0], torch.ones(32, 32)) and x[1:].abs().max() < 1e-6


def break_images(folder):
    files = sorted((folder / "images").iterdir())
    files[1].unlink()                                         # missing
    files[3].write_bytes(files[3].read_bytes()[:70])          # truncated PNG
    files[6].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)   # a PNG signature and garbage
    return files


def test_missing_and_corrupt_images_are_skipped_counted_and_logged(tmp_path, samples, caplog):
    path = export_llava(samples, tmp_path)
    files = break_images(tmp_path)
    ds = LlavaJsonDataset(path, tmp_path)
    with caplog.at_level(logging.WARNING, logger="mmbridge_ref.data.formats"):
        kept = [s["id"] for s in ds]
    assert kept == [samples[i]["id"] for i in (0, 2, 4, 5, 7)]
    assert ds.skipped == 3
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3
    for k, (msg, i) in enumerate(zip(msgs, (1, 3, 6))):
        assert str(files[i]) in msg and f"entry {i}" in msg and f"({k + 1} skipped so far)" in msg, msg
    assert "does not exist" in msgs[0] and "cannot decode" in msgs[1] and "cannot decode" in msgs[2]
    with pytest.raises(ImageError, match="does not exist"): ds[1]   # random access cannot skip: it raises
    with pytest.raises(ImageError, match="cannot decode"): ds[3]
    list(ds)
    assert ds.skipped == 6                                     # a running count over epochs


def test_dataloader_workers_split_the_records_and_skip(tmp_path, samples):
    path = export_llava(samples, tmp_path)
    break_images(tmp_path)
    dl = torch.utils.data.DataLoader(LlavaJsonDataset(path, tmp_path), batch_size=2, num_workers=2,
                                     collate_fn=LlavaInstruct.collate)
    ids = sorted(i for b in dl for i in b["id"])
    assert ids == sorted(samples[i]["id"] for i in (0, 2, 4, 5, 7))


def test_malformed_json_entries_are_errors_naming_the_entry(tmp_path):
    ok = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    cases = [([ok, {"id": "x7", "image": "a.png"}], r"entry 1 \(id='x7'\) has no 'conversations'"),
             ([ok, {"image": "a.png", "conversations": []}], "entry 1 has no 'conversations'"),
             ([{**ok, "conversations": [{"from": "bot", "value": "x"}]}], "entry 0 .*turn 0 .*'from': 'bot'"),
             ([{**ok, "image": "a.png"}], "0 <image> markers in its conversations but 1 images"),
             ([ok, "just text"], "entry 1: an entry must be a dict"),
             ({"id": "x"}, "expected a JSON list")]
    for records, match in cases:
        (tmp_path / "d.json").write_text(json.dumps(records))
        with pytest.raises(ValueError, match=match): LlavaJsonDataset(tmp_path / "d.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"): LlavaJsonDataset(tmp_path / "nope.json", tmp_path)


def test_jsonl_and_multi_image_entries(tmp_path, samples):
    for k in range(2): Image.fromarray((quantised(samples[k]["image"]) * 255).byte().permute(1, 2, 0).numpy()).save(tmp_path / f"{k}.png")
    conv = [{"from": "human", "value": "<image> and <image>\nsame?"}, {"from": "gpt", "value": "no"}]
    lines = [{"id": "two", "image": ["0.png", "1.png"], "conversations": conv}, {"id": "one", "image": "1.png", "conversations": samples[1]["conversations"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    two, one = LlavaJsonDataset(tmp_path / "d.jsonl", tmp_path)
    assert two["image"].shape == (2, 3, 32, 32) and torch.equal(two["image"][1], one["image"])


def test_export_errors_name_the_sample(tmp_path, samples):
    with pytest.raises(ValueError, match="both name the file"): export_llava([samples[0], samples[0]], tmp_path / "a")
    with pytest.raises(ValueError, match=r"\[3, H, W\]"): export_llava([{**samples[0], "image": samples[0]["image"][:1]}], tmp_path / "b")
    with pytest.raises(ValueError, match="has no 'conversations'"): export_llava([{"id": "q", "image": samples[0]["image"]}], tmp_path / "c")
    with pytest.raises(ValueError, match="cannot be written as JSON"): export_llava([{**samples[0], "meta": {"t": torch.ones(1)}}], tmp_path / "d")
    assert not (tmp_path / "d" / "images" / f"{samples[0]['id']}.png").exists()  # checked before anything is written


def test_read_image_accepts_every_holder(tmp_path, samples):
    data = png_bytes(samples[0]["image"])
    (tmp_path / "x.png").write_bytes(data)
    want = quantised(samples[0]["image"])
    for v in ("x.png", data, {"bytes": data, "path": None}, {"bytes": None, "path": "x.png"}, Image.open(tmp_path / "x.png")):
        assert torch.equal(read_image(v, tmp_path, 32), want)
    with pytest.raises(ImageError, match="cannot decode image bytes"): read_image(b"junk")
    with pytest.raises(ValueError, match="from a int"): read_image(3)


# ---------------------------------------------------------------- Hugging Face datasets folder and parquet
def test_hf_folder_and_parquet_round_trips(tmp_path, samples):
    table = datasets.Dataset.from_list(hf_records(samples))
    assert isinstance(table.features["image"], datasets.Image)
    table.save_to_disk(str(tmp_path / "hf"))
    table.to_parquet(str(tmp_path / "d.parquet"))
    for src in (tmp_path / "hf", tmp_path / "d.parquet"):
        ds = load_hf_dataset(src)
        assert isinstance(ds, LlavaDataset) and len(ds) == len(samples)
        assert_same(list(ds), samples)


def test_parquet_with_image_bytes_or_paths(tmp_path, samples):
    rows = [{"id": s["id"], "image": png_bytes(s["image"]), "conversations": s["conversations"], "meta": json.dumps(s["meta"])} for s in samples]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bytes.parquet"))
    assert_same(list(load_hf_dataset(tmp_path / "bytes.parquet")), samples)
    (tmp_path / "img").mkdir()
    for r in rows:
        (tmp_path / "img" / f"{r['id']}.png").write_bytes(r["image"]); r["image"] = f"{r['id']}.png"
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "paths.parquet"))
    assert_same(list(load_hf_dataset(tmp_path / "paths.parquet", image_folder=tmp_path / "img")), samples)
    (tmp_path / "img" / f"{rows[2]['id']}.png").unlink()
    ds = load_hf_dataset(tmp_path / "paths.parquet", image_folder=tmp_path / "img")
    assert len(list(ds)) == len(samples) - 1 and ds.skipped == 1


def test_corrupt_image_in_a_hf_folder_is_skipped(tmp_path, samples, caplog):
    rows = hf_records(samples[:4])
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(decode=False))
    table = table.map(lambda r, i: {"image": {"bytes": b"junk", "path": None} if i == 2 else r["image"]}, with_indices=True)
    table.save_to_disk(str(tmp_path / "hf"))
    ds = load_hf_dataset(tmp_path / "hf")
    with caplog.at_level(logging.WARNING, logger="mmbridge_ref.data.formats"):
        assert [s["id"] for s in ds] == [samples[i]["id"] for i in (0, 1, 3)]
    assert ds.skipped == 1 and "entry 2" in caplog.records[0].getMessage() and "(1 skipped so far)" in caplog.records[0].getMessage()


def test_hf_errors(tmp_path, samples):
    datasets.Dataset.from_list([{"id": "a", "text": "hi"}]).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match=r"no 'conversations' column \(its columns: \['id', 'text'\]\)"): load_hf_dataset(tmp_path / "t.parquet")
    table = datasets.Dataset.from_list(hf_records(samples[:2]))
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\]"): load_hf_dataset(tmp_path / "dd")
    assert_same(list(load_hf_dataset(tmp_path / "dd" / "train")), samples[:2])
    with pytest.raises(FileNotFoundError, match="neither a dataset folder nor a .parquet file"): load_hf_dataset(tmp_path / "nope")
    bad = datasets.Dataset.from_list([{"id": "b", "image": None, "conversations": [{"from": "robot", "value": "x"}]}])
    bad.to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match=r"b.parquet entry 0 \(id='b'\): turn 0"): load_hf_dataset(tmp_path / "b.parquet")[0]


# ---------------------------------------------------------------- generated sets
def test_export_task_is_deterministic_and_covers_the_shapesworld_tasks(tmp_path):
    a, b = export_task("llava_instruct", 6, tmp_path / "a", seed=2), export_task("llava_instruct", 6, tmp_path / "b", seed=2)
    assert a.read_text() == b.read_text()
    assert [p.read_bytes() for p in sorted((tmp_path / "a" / "images").iterdir())] == \
           [p.read_bytes() for p in sorted((tmp_path / "b" / "images").iterdir())]
    assert export_task("llava_instruct", 6, tmp_path / "c", seed=3).read_text() != a.read_text()
    for task in EXPORT_TASKS[1:]:
        ds = LlavaJsonDataset(export_task(task, 3, tmp_path / task), tmp_path / task)
        got = list(ds)
        assert len(got) == 3 and all(s["meta"]["task"] == task and s["image"].shape == (3, 32, 32) for s in got)


def test_generate_batches_do_not_change_the_samples():
    one = [s["conversations"] for s in generate("llava_instruct", 7, seed=1, batch=3)]
    assert one == [s["conversations"] for s in LlavaInstruct(seed=1).__getitems__(range(7))]
    with pytest.raises(ValueError, match="task='captions' is not valid; expected one of \\('llava_instruct'"): generate("captions", 3)
    with pytest.raises(ValueError, match="n=0"): generate("vqa", 0)
