"""Our VLM (mlp × prefix) equals transformers' LlavaForConditionalGeneration holding the same weights: logits, loss and the
sequence the LM reads, with LLaVA's feature selection (penultimate layer, CLS dropped). The builders are
benchmarks/llava.py's, so the benchmark's table and this test check one comparison."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # llava.py imports its neighbour _timing
_spec = importlib.util.spec_from_file_location("bench_llava", BENCH / "llava.py")
bl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bl)


@pytest.fixture(scope="module")
def tok():
    return bl.tokenizer()


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    return bl.save_llava(bl.SIZES["test"], tmp_path_factory.mktemp("llava"), tok)


@pytest.fixture(scope="module")
def pair(saved, one_thread):
    return bl.load_pair(saved)


@pytest.mark.parametrize("images_per_row", [(1,), (1, 2, 1), (2, 0, 1)])
def test_same_weights_give_the_same_logits_and_loss(tok, pair, images_per_row):
    hf, ours = pair
    assert (hf.config.vision_feature_layer, hf.config.vision_feature_select_strategy) == (-2, "default")  # LLaVA's
    batch, hf_batch = bl.batches(tok, bl.SIZES["test"], images_per_row=images_per_row)
    with torch.no_grad():
        out = ours.injection(ours.lm, batch, ours.visual_tokens(batch), batch["frames"] > 0)
        ref = hf(**hf_batch)
    real = hf_batch["attention_mask"].bool()
    assert torch.equal(out.labels, hf_batch["labels"]) and torch.equal(out.attention_mask, real)  # one sequence
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    assert ref.logits[real].abs().max() > 0.1  # logits worth comparing, not all zero
    loss = bl.lm_loss_sum(out.logits, out.labels) / bl.count_targets(out.labels)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert bl.equal(bl.compare(hf, ours, batch, hf_batch))  # the benchmark's own check agrees


def test_the_images_reach_the_logits(tok, pair):
    "Other pixels change both models' logits alike: the comparison is not blind to the visual path."
    hf, ours = pair
    (_, h1), (b2, h2) = (bl.batches(tok, bl.SIZES["test"], seed=s) for s in (0, 1))
    with torch.no_grad():
        moved = (hf(**h1).logits - hf(**h2).logits).abs().max()
        assert moved > 1e-3
        assert bl.equal(bl.compare(hf, ours, b2, h2))


@pytest.mark.parametrize("layer", [-1, -3])
def test_the_other_selection_is_equal_too(tok, tmp_path, one_thread, layer):
    "CLS kept (`full`, one more token per image) and another layer, set alike on both sides."
    hf, ours = bl.load_pair(bl.save_llava(bl.SIZES["test"], tmp_path, tok, layer=layer, select="full"))
    batch, hf_batch = bl.batches(tok, bl.SIZES["test"], select="full", images_per_row=(1, 2, 1))
    assert (hf_batch["input_ids"] == hf.config.image_token_id).sum() == 4 * (bl.SIZES["test"].visual_tokens + 1)
    assert bl.equal(bl.compare(hf, ours, batch, hf_batch))


def test_a_different_feature_layer_is_caught(tok, saved, one_thread):
    "Ours reading the last layer while LLaVA reads the penultimate one must fail the check."
    hf, ours = bl.load_pair(saved, layer=-1)
    batch, hf_batch = bl.batches(tok, bl.SIZES["test"])
    check = bl.compare(hf, ours, batch, hf_batch)
    assert check["max_logit_diff"] > 1e-3 and not bl.equal(check)


def test_keeping_cls_on_one_side_only_is_caught(tok, saved, one_thread):
    "Ours keeping CLS where LLaVA drops it: one token more per image, so the sequences differ."
    hf, ours = bl.load_pair(saved, select="full")
    batch, hf_batch = bl.batches(tok, bl.SIZES["test"])
    assert not bl.compare(hf, ours, batch, hf_batch)["same_layout"]


def test_a_different_projector_is_caught(tok, saved, one_thread):
    hf, ours = bl.load_pair(saved)
    with torch.no_grad(): ours.bridge.proj[2].bias.add_(0.1)
    batch, hf_batch = bl.batches(tok, bl.SIZES["test"])
    assert bl.compare(hf, ours, batch, hf_batch)["max_logit_diff"] > 1e-3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from([5, 6, 7, 9]), min_size=1, max_size=6), min_size=1, max_size=4),
       st.integers(1, 5))
def test_expand_image_tokens_makes_one_slot_per_visual_token(rows, n):
    "HF's layout: each placeholder becomes n of them (label -100), the rest keeps its order, length and padding line up."
    image, pad = 9, 0
    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    out = bl.expand_image_tokens(ids, mask, ids.masked_fill(mask == 0, -100), image, n, pad)
    lengths = [t + (n - 1) * r.count(image) for r in rows]
    assert out["input_ids"].shape == (len(rows), max(lengths))
    for k, r in enumerate(rows):
        want = [x for x in r for _ in range(n if x == image else 1)]
        assert out["input_ids"][k, :len(want)].tolist() == want
        assert out["attention_mask"][k].sum() == len(want) and out["attention_mask"][k, :len(want)].all()
        assert out["labels"][k, :len(want)].tolist() == [-100 if x == image else x for x in want]
