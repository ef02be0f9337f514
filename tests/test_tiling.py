"""The tiling arithmetic equals transformers' on thousands of sizes: LLaVA-NeXT's best resolution, grid shape, unpadding
and image-token count; MiniCPM-V's copy of LLaVA-UHD's slice grid; Fuyu's patch order and newline positions. Sizes are
(height, width) everywhere, and non-square cases check that no H/W swap slips in (transformers#31327)."""
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.fuyu.image_processing_fuyu import FuyuImageProcessor
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.minicpm_ocr.image_processing_minicpm_ocr import MiniCPMOcrImageProcessor

from mmbridge_ref.bridges.tiling import (anyres_grid_shape, anyres_num_tokens, fuyu_row_newlines, patchify,
                                        select_best_resolution, uhd_grid, uhd_num_tokens, uhd_schema, unpad_features)

torch.set_num_threads(1)

LLAVA_NEXT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
sides = st.integers(1, 4000)
sizes = st.tuples(sides, sides)


@st.composite
def anyres_setups(draw):
    "A tile made of patches, and a non-empty list of pinpoints that are whole grids of tiles."
    patch = draw(st.sampled_from([1, 2, 7, 14, 16]))
    tile = patch * draw(st.integers(1, 30))
    grids = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=8))
    return tile, patch, [(r * tile, c * tile) for r, c in grids]


def hf_num_features(size, pinpoints, tile, patch, extra):
    "LlavaNextProcessor._get_number_of_features with only the attributes it reads set (no tokenizer needed)."
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=[list(p) for p in pinpoints])
    proc.patch_size, proc.num_additional_image_tokens = patch, extra
    return proc._get_number_of_features(size[0], size[1], tile, tile)


# --- AnyRes -----------------------------------------------------------------------------------------------------------

@settings(max_examples=2000, deadline=None)
@given(sizes, anyres_setups())
def test_select_best_resolution_and_grid_equal_llava_next(size, setup):
    tile, _, pinpoints = setup
    assert select_best_resolution(size, pinpoints) == tuple(hf_select_best_resolution(size, [list(p) for p in pinpoints]))
    assert anyres_grid_shape(size, pinpoints, tile) == tuple(get_anyres_image_grid_shape(list(size), [list(p) for p in pinpoints], tile))


@settings(max_examples=1000, deadline=None)
@given(sizes, st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=1, max_size=8))
def test_select_best_resolution_any_candidates(size, resolutions):
    "Candidates that are not grids of tiles: ties, upscaling and float products included."
    assert select_best_resolution(size, resolutions) == tuple(hf_select_best_resolution(size, resolutions))


@settings(max_examples=2000, deadline=None)
@given(st.integers(1, 120), st.integers(1, 120), sizes)
def test_unpad_features_equals_unpad_image(h, w, original):
    features = torch.arange(h * w).view(1, h, w).expand(2, h, w)
    ours, theirs = unpad_features(features, original), unpad_image(features, original)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)


@settings(max_examples=2000, deadline=None)
@given(sizes, anyres_setups(), st.integers(-1, 2))
def test_anyres_num_tokens_equals_llava_next_processor(size, setup, extra):
    tile, patch, pinpoints = setup
    assert anyres_num_tokens(size, pinpoints, tile, patch, extra_tokens=extra) == hf_num_features(size, pinpoints, tile, patch, extra)


@settings(max_examples=300, deadline=None)
@given(sizes, anyres_setups())
def test_anyres_num_tokens_counts_the_features_it_describes(size, setup):
    "Base patches + the unpadded stitched map with one newline column: the count matches the tensor the model builds."
    tile, patch, pinpoints = setup
    rows, cols = anyres_grid_shape(size, pinpoints, tile)
    side = tile // patch
    kept = unpad_features(torch.zeros(1, rows * side, cols * side), size)
    assert anyres_num_tokens(size, pinpoints, tile, patch) == side * side + kept.shape[1] * (kept.shape[2] + 1)


def test_height_width_not_swapped():
    "A wide image and the same image turned differ, each as transformers says (transformers#31327)."
    wide, tall = (300, 1000), (1000, 300)
    assert anyres_grid_shape(wide, LLAVA_NEXT_PINPOINTS, 336) == (1, 3)
    assert anyres_grid_shape(tall, LLAVA_NEXT_PINPOINTS, 336) == (3, 1)
    assert anyres_num_tokens(wide, LLAVA_NEXT_PINPOINTS, 336, 14) == 576 + 22 * 72 + 22
    assert anyres_num_tokens(tall, LLAVA_NEXT_PINPOINTS, 336, 14) == 576 + 72 * 22 + 72
    for size in (wide, tall):
        assert anyres_num_tokens(size, LLAVA_NEXT_PINPOINTS, 336, 14) == hf_num_features(size, LLAVA_NEXT_PINPOINTS, 336, 14, 0)
    f = torch.randn(3, 48, 72)
    assert unpad_features(f, wide).shape == (3, 22, 72) and unpad_features(f, tall).shape == (3, 48, 14)  # 72*300//1000 = 21 (+1), 48*300//1000 = 14
    assert torch.equal(unpad_features(f, tall), unpad_image(f, tall))
    assert uhd_grid((448, 1344), 9, 448) == (1, 3) and uhd_grid((1344, 448), 9, 448) == (3, 1)
    assert patchify(torch.zeros(3, 60, 90), 30, 30).shape == (6, 2700)


def test_anyres_bad_input_names_the_value():
    with pytest.raises(ValueError, match=r"image_size=\(0, 10\)"): select_best_resolution((0, 10), LLAVA_NEXT_PINPOINTS)
    with pytest.raises(ValueError, match=r"resolutions=\[\] is empty"): select_best_resolution((10, 10), [])
    with pytest.raises(ValueError, match=r"\(300, 1000\) is not a multiple of tile_size=336"): anyres_grid_shape((5, 5), [(300, 1000)], 336)
    with pytest.raises(ValueError, match="patch_size=15"): anyres_num_tokens((5, 5), LLAVA_NEXT_PINPOINTS, 336, 15)
    with pytest.raises(ValueError, match=r"features shape \(6, 6\)"): unpad_features(torch.zeros(6, 6), (3, 4))


# --- UHD --------------------------------------------------------------------------------------------------------------

@settings(max_examples=3000, deadline=None)
@given(sizes, st.integers(1, 16), st.sampled_from([14, 112, 224, 336, 448]))
def test_uhd_grid_equals_minicpm(size, max_slices, tile):
    theirs = MiniCPMOcrImageProcessor.get_sliced_grid(None, size, max_slices, tile)  # uses no attribute of self
    ours = uhd_grid(size, max_slices, tile)
    assert (ours if ours is None else list(ours)) == theirs


@settings(max_examples=500, deadline=None)
@given(sizes, st.integers(2, 16), st.sampled_from([112, 336, 448]))
def test_uhd_grid_follows_the_rule(size, max_slices, tile):
    "Checked from the rule itself: slice count within one of N, never 1 nor above N_max, best log aspect ratio."
    h, w = size
    n = min(math.ceil(h * w / tile**2), max_slices)
    grid = uhd_grid(size, max_slices, tile)
    if n <= 1:
        assert grid is None
        return
    r, c = grid
    assert 1 < r * c <= max_slices and abs(r * c - n) <= 1
    err = abs(math.log(w / h) - math.log(c / r))
    for k in (n - 1, n, n + 1):
        if 1 < k <= max_slices:
            assert all(err <= abs(math.log(w / h) - math.log((k // q) / q)) for q in range(1, k + 1) if k % q == 0)


def test_uhd_ties_go_to_more_rows():
    # a square image and 2 slices: 1x2 and 2x1 are equally far from square; 3 slices are not considered (cap 2)
    assert uhd_grid((500, 500), 2, 400) == (2, 1)


def test_uhd_schema_and_count():
    assert uhd_schema(2, 3, "S") == "S,S,S\nS,S,S\n"
    assert uhd_schema(1, 1) == "<slice>\n"
    assert uhd_num_tokens((448, 1344), 9, 448) == 64 * 4 + 3
    assert uhd_num_tokens((300, 300), 9, 448) == 64
    with pytest.raises(ValueError, match="rows=0"): uhd_schema(0, 3)
    with pytest.raises(ValueError, match="max_slices=0"): uhd_grid((900, 900), 0, 448)
    with pytest.raises(ValueError, match="tile_size=0"): uhd_grid((900, 900), 4, 0)


# --- Fuyu -------------------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.integers(1, 6))
def test_patchify_equals_fuyu(c, rows, cols, ph, pw):
    image = torch.randn(c, rows * ph, cols * pw)
    theirs = FuyuImageProcessor().patchify_image(image[None], patch_size=SimpleNamespace(height=ph, width=pw))[0]
    assert torch.equal(patchify(image, ph, pw), theirs)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5))
def test_fuyu_newlines_where_fuyu_puts_them(rows, cols):
    proc, ph, pw = FuyuImageProcessor(), 4, 3
    h, w = rows * ph, cols * pw
    out = proc.preprocess_with_tokenizer_info(
        image_input=torch.zeros(1, 1, 3, h, w), image_present=torch.ones(1, 1, 1),
        image_unpadded_h=torch.tensor([[h]]), image_unpadded_w=torch.tensor([[w]]),
        image_placeholder_id=7, image_newline_id=9, variable_sized=True, patch_size={"height": ph, "width": pw})
    ids = out["image_input_ids"][0][0]
    assert torch.equal(torch.nonzero(ids == 9).flatten(), fuyu_row_newlines(rows, cols))
    assert len(ids) == rows * (cols + 1)


def test_fuyu_bad_input_names_the_value():
    with pytest.raises(ValueError, match=r"\(h, w\)=\(4, 6\) is not divisible"): patchify(torch.zeros(2, 4, 6), 3, 3)
    with pytest.raises(ValueError, match=r"image shape \(4, 6\)"): patchify(torch.zeros(4, 6), 2, 2)
    with pytest.raises(ValueError, match="cols=0"): fuyu_row_newlines(2, 0)
