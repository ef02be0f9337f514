"""High resolution through the composer: `model.tiling` + the anyres, uhd, monkey and fuyu bridges. Token counts equal the
pure functions' over random sizes and aspect ratios through the whole VLM (§5); bad input fails naming the value or has
one documented behaviour (§6); Monkey's adapters go one per tile position and none to the global view."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from mmbridge_ref.backbones.towers import TinyViT
from mmbridge_ref.bridges.lora import LoRALinear, use_adapter
from mmbridge_ref.bridges.tiling import (CropLayout, TiledVision, TilingSettings, anyres_num_tokens, cut_tiles,
                                         fuyu_row_newlines, interpolate_pos, uhd_grid, uhd_num_tokens, vit_tokens)
from mmbridge_ref.train.config import ConfigError
from mmbridge_ref.train.loop import match_params
from mmbridge_ref.vlm import build_vlm, collate_vlm, encode_segments, encoder_fingerprint, visual_token_count

torch.set_num_threads(1)

TOWER = {"vision": "tiny_vit", "vision_args": {"image_size": 16, "patch_size": 4, "dim": 24, "depth": 1, "heads": 2, "embed_dim": 8}}
LATENTS = 4
METHODS = {  # name -> model section (the tiny tower: 16-px tiles of 4 x 4 tokens)
    "base": {"bridge": "mlp", "tiling": {"mode": "base"}},
    "interp": {"bridge": "mlp", "tiling": {"mode": "interp"}},
    "anyres": {"bridge": "anyres"},
    "uhd": {"bridge": "uhd", "uhd": {"num_latents": LATENTS, "depth": 1}},
    "monkey": {"bridge": "monkey", "monkey": {"num_latents": LATENTS, "depth": 1}},
    "fuyu": {"bridge": "fuyu", "tiling": {"patch": 8}},
}
PIN = [(16, 32), (32, 16), (32, 32)]  # the default pinpoints [[1, 2], [2, 1], [2, 2]] in pixels of 16-px tiles


def expected_tokens(method, hw):
    "The pure functions' count for an image of size hw (sizes are (height, width))."
    h, w = hw
    if method == "base": return 16
    if method == "interp": return max(1, h // 4) * max(1, w // 4)
    if method == "anyres": return anyres_num_tokens(hw, PIN, 16, 4)
    if method == "uhd": return uhd_num_tokens(hw, 4, 16, LATENTS)
    if method == "monkey": return LATENTS * (1 + 4)
    rows, cols = math.ceil(h / 8), math.ceil(w / 8)
    return rows * cols + len(fuyu_row_newlines(rows, cols))


@pytest.fixture(scope="module")
def vlms():
    torch.manual_seed(0)
    return {m: build_vlm({**TOWER, **cfg}, cache=None) for m, cfg in METHODS.items()}


def one_row(vlm, hw, seed=0):
    tok = vlm.lm.tokenizer
    ids, labels = encode_segments(tok, [("<image> question : what shape ? answer :", False), ("circle", True)], num_media=1)
    g = torch.Generator().manual_seed(seed)
    return ids, collate_vlm([dict(input_ids=ids, labels=labels, media=torch.rand(1, 1, 3, *hw, generator=g))], tok.pad_token_id)


# --- §5: placeholders == visual tokens through every path ------------------------------------------------------------

aspect_sizes = st.one_of(st.tuples(st.integers(1, 160), st.integers(1, 160)),
                         st.integers(1, 12).map(lambda s: (s, 20 * s)), st.integers(1, 12).map(lambda s: (20 * s, s)))


@settings(max_examples=25, deadline=None)
@given(hw=aspect_sizes, method=st.sampled_from(sorted(METHODS)))
def test_every_path_places_as_many_tokens_as_the_pure_count(vlms, hw, method):
    vlm = vlms[method]
    ids, batch = one_row(vlm, hw)
    with torch.no_grad():
        feats = vlm.vision(batch["pixels"][0, 0])
        visual = vlm.visual_tokens(batch)
        out = vlm.injection(vlm.lm, batch, visual, batch["frames"] > 0)
    lay = vlm.vision.layout(hw)
    assert feats.shape[1] == lay.num_features                      # the tower's crops as the layout says
    assert visual.shape[2] == expected_tokens(method, hw)           # the bridge's tokens as the pure functions say
    assert out.logits.shape[1] == len(ids) - 1 + visual.shape[2]    # one <image> became exactly that many LM positions
    assert int(out.attention_mask.sum()) == out.logits.shape[1]


def test_visual_token_count_reads_the_tiling_size():
    torch.manual_seed(0)
    for method, cfg in METHODS.items():
        t = {**cfg.get("tiling", {}), "image_size": 64}
        vlm = build_vlm({**TOWER, **cfg, "tiling": t}, cache=None)
        assert visual_token_count(vlm) == expected_tokens(method, (64, 64)), method


# --- §6: bad input ---------------------------------------------------------------------------------------------------

def test_image_smaller_than_one_tile_is_documented_behaviour(vlms):
    "Upscaled (base, anyres, monkey), not sliced (uhd: the global view alone), padded to one patch (fuyu)."
    for method, vlm in vlms.items():
        _, batch = one_row(vlm, (5, 7))
        with torch.no_grad(): q = vlm.visual_tokens(batch).shape[2]
        assert q == expected_tokens(method, (5, 7)), method
    assert uhd_grid((5, 7), 4, 16) is None and expected_tokens("uhd", (5, 7)) == LATENTS
    assert expected_tokens("fuyu", (5, 7)) == 2


@pytest.mark.parametrize("hw", [(8, 160), (160, 8)])
def test_aspect_ratios_1_to_20_and_20_to_1(vlms, hw):
    layouts = {m: vlms[m].vision.layout(hw) for m in vlms}
    wide = hw[1] > hw[0]
    assert layouts["uhd"].grid == ((1, 4) if wide else (4, 1))       # sliced along the long side
    assert layouts["anyres"].grid == ((1, 2) if wide else (2, 1))
    # unpadding keeps 0 cells: a wide image keeps 0 rows (no newline), a tall one 8 rows of 0 cells, each with its newline,
    # as LLaVA-NeXT counts them
    assert anyres_num_tokens(hw, PIN, 16, 4) == (16 if wide else 16 + 8)
    for method, vlm in vlms.items():
        _, batch = one_row(vlm, hw)
        with torch.no_grad(): assert vlm.visual_tokens(batch).shape[2] == expected_tokens(method, hw), method


def test_max_slices_below_one_is_refused():
    with pytest.raises(ValueError, match="max_slices=0 must be an integer >= 1"): TilingSettings(max_slices=0)
    with pytest.raises(ValueError, match="max_slices=-2"): uhd_grid((64, 64), -2, 16)
    with pytest.raises(ConfigError, match=r"model.tiling: max_slices=0"): build_vlm({**TOWER, "bridge": "uhd", "tiling": {"max_slices": 0}})


def test_tile_not_divisible_by_patch_is_refused():
    with pytest.raises(ValueError, match="tile_size=30 is not divisible by patch_size=4"): TilingSettings(mode="anyres").layout((64, 64), 30, 4)
    fake = nn.Module(); fake.image_size, fake.patch_size, fake.dim = 30, 4, 8
    with pytest.raises(ValueError, match="tile_size=30 is not divisible by patch_size=4"): TiledVision(fake, TilingSettings(mode="base"))
    with pytest.raises(ConfigError, match="interp_size=30 is not divisible by patch_size=4"):
        build_vlm({**TOWER, "tiling": {"mode": "interp", "interp_size": 30}})
    with pytest.raises(ValueError, match=r"\(h, w\)=\(30, 32\) are not whole patches of patch_size=4"):
        vit_tokens(TinyViT(image_size=16, patch_size=4, dim=8, depth=1, heads=2), torch.rand(1, 3, 30, 32))


def test_adapter_index_out_of_range_is_refused():
    torch.manual_seed(0)
    tv = TiledVision(TinyViT(image_size=16, patch_size=4, dim=8, depth=1, heads=2), TilingSettings(mode="monkey", grid=[1, 3], lora_targets=["to_q"]))
    with pytest.raises(ValueError, match="adapter=3 is out of range for num_adapters=3"):
        with use_adapter(tv.tower, 3): tv.tower(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"the tower has 3 LoRA adapters but grid=\[2, 2\] needs 4"):
        TiledVision(tv.tower, TilingSettings(mode="monkey", grid=[2, 2]))


def test_mode_and_bridge_must_agree():
    with pytest.raises(ConfigError, match=r"model.bridge: 'mlp' cannot read 'anyres' crops: use bridge \['anyres'\]"):
        build_vlm({**TOWER, "bridge": "mlp", "tiling": {"mode": "anyres"}})
    with pytest.raises(ConfigError, match="model.tiling.mode: 'uhd', but bridge 'anyres' reads 'anyres' crops"):
        build_vlm({**TOWER, "bridge": "anyres", "tiling": {"mode": "uhd"}})
    with pytest.raises(ConfigError, match="model.tiling.mode: 'tiles' is not one of"): build_vlm({**TOWER, "tiling": {"mode": "tiles"}})


# --- the composer path -----------------------------------------------------------------------------------------------

def test_no_tiling_builds_the_same_model():
    "`tiling: {mode: none}` and no tiling section give the same tower, weights and features as before."
    torch.manual_seed(0); a = build_vlm({**TOWER, "bridge": "mlp"}, cache=None)
    torch.manual_seed(0); b = build_vlm({**TOWER, "bridge": "mlp", "tiling": {"mode": "none"}}, cache=None)
    assert type(a.vision) is type(b.vision) is TinyViT
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert encoder_fingerprint(a.vision) == encoder_fingerprint(b.vision)


def test_two_tilings_of_one_tower_never_share_cached_features(vlms):
    prints = {m: encoder_fingerprint(v.vision) for m, v in vlms.items()}
    assert len(set(prints.values())) == len(prints)


def test_crop_order_global_first_then_row_major_tiles():
    torch.manual_seed(0)
    tower = TinyViT(image_size=16, patch_size=4, dim=8, depth=1, heads=2)
    tv = TiledVision(tower, TilingSettings(mode="monkey", lora="none"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        f = tv(x)
        assert torch.allclose(f[:, :16], tower(nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True)), atol=1e-6)
        tiles = tower(cut_tiles(x, 2, 2)).view(2, 4, 16, 8)
        for i in range(4): assert torch.allclose(f[:, 16 * (i + 1):16 * (i + 2)], tiles[:, i], atol=1e-6)
        assert torch.allclose(tiles[1, 1], tower(x[1:2, :, :16, 16:])[0], atol=1e-6)  # tile 1 is the top-right one


@pytest.mark.parametrize("lora", ["per_tile", "shared"])
def test_monkey_adapter_per_tile_position_and_none_on_the_global_view(lora):
    torch.manual_seed(0)
    tv = TiledVision(TinyViT(image_size=16, patch_size=4, dim=8, depth=1, heads=2), TilingSettings(mode="monkey", grid=[2, 3], lora=lora))
    layers = [m for m in tv.tower.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.num_adapters == (6 if lora == "per_tile" else 1) for m in layers)  # from grid, one config value
    for m in layers: nn.init.normal_(m.lora_B, std=0.1)
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        f = tv(x)
        with use_adapter(tv.tower, None): glob = tv.tower(nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True))
        assert torch.allclose(f[:, :16], glob, atol=1e-6)
        tiles = cut_tiles(x, 2, 3).view(2, 6, 3, 16, 16)
        for i in range(6):
            with use_adapter(tv.tower, i if lora == "per_tile" else 0): want = tv.tower(tiles[:, i])
            assert torch.allclose(f[:, 16 * (i + 1):16 * (i + 2)], want, atol=1e-5), i
        with use_adapter(tv.tower, None): assert not torch.allclose(f[:, 16:32], tv.tower(tiles[:, 0]), atol=1e-4)  # the LoRA acts


def test_trainable_parameters_per_method():
    torch.manual_seed(0)
    base = {**TOWER, "bridge": "monkey", "monkey": {"num_latents": LATENTS, "depth": 1}}
    counts = {}
    for lora in ["per_tile", "shared", "none"]:
        vlm = build_vlm({**base, "tiling": {"lora": lora}}, cache=None)
        names = match_params(vlm, ["?vision.*lora_*"])
        counts[lora] = sum(vlm.get_parameter(n).numel() for n in names)
    assert counts["none"] == 0 and counts["shared"] > 0 and counts["per_tile"] == 4 * counts["shared"]
    fuyu = build_vlm({**TOWER, "bridge": "fuyu", "tiling": {"patch": 8}}, cache=None)
    assert fuyu.bridge.proj.in_features == 3 * 8 * 8 and not match_params(fuyu, ["?vision.*lora_*"])


def test_a_lora_tower_gets_gradients_and_skips_the_cache():
    torch.manual_seed(0)
    vlm = build_vlm({**TOWER, "bridge": "monkey", "monkey": {"num_latents": LATENTS, "depth": 1}})
    for n in match_params(vlm, ["vision.*lora_*"]): vlm.get_parameter(n).requires_grad_(True)
    _, batch = one_row(vlm, (32, 32))
    batch["media_keys"] = [["img0"]]
    vlm(batch).backward()
    grads = [p.grad for n, p in vlm.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_uhd_and_anyres_separators_sit_where_the_schema_says():
    torch.manual_seed(0)
    uhd = build_vlm({**TOWER, **METHODS["uhd"]}, cache=None)
    _, batch = one_row(uhd, (32, 48))  # 6 * 16^2 area: N = 4 slices -> 2 x 2
    rows, cols = uhd.vision.layout((32, 48)).grid
    with torch.no_grad(): y = uhd.visual_tokens(batch)[0, 0]
    q, seps = LATENTS, []
    for v in range(rows * cols): seps.append(y[q + v * (q + 1) + q])
    for v, s in enumerate(seps): assert torch.equal(s, uhd.bridge.newline if v % cols == cols - 1 else uhd.bridge.comma)
    anyres = build_vlm({**TOWER, "bridge": "anyres"}, cache=None)
    _, batch = one_row(anyres, (32, 32))
    with torch.no_grad(): y = anyres.visual_tokens(batch)[0, 0]
    grid = y[16:].view(8, 9, -1)  # 2 x 2 tiles of 4 x 4 = 8 x 8 cells, a newline closing each row
    assert all(torch.equal(grid[r, -1], anyres.bridge.newline) for r in range(8))


def test_interpolated_positions():
    pos = torch.randn(1, 16, 5)
    assert torch.equal(interpolate_pos(pos, (4, 4)), pos)
    assert interpolate_pos(pos, (3, 7)).shape == (1, 21, 5)
    with pytest.raises(ValueError, match="15 position embeddings are not a square grid"): interpolate_pos(pos[:, :15], (2, 2))
    tower = TinyViT(image_size=16, patch_size=4, dim=8, depth=1, heads=2)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad(): assert torch.allclose(vit_tokens(tower, x), tower(x), atol=1e-6)


def test_crop_layout_counts():
    lay = TilingSettings(mode="uhd").layout((64, 64), 16, 4)
    assert isinstance(lay, CropLayout) and lay.grid == (2, 2) and lay.views[0] == (4, 4) and lay.num_tiles == 4
    assert lay.num_features == sum(h * w for h, w in lay.views)


# --- the recipe ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["base resolution", "interpolated positions", "anyres", "uhd", "fuyu patches",
                                    "monkey, per-tile LoRA", "monkey, shared LoRA", "tiles, no LoRA"])
def test_every_method_trains_through_the_recipe(tmp_path, method):
    import contextlib, io
    from mmbridge_ref.recipes.high_res import METHODS, TINY_CONFIG
    from mmbridge_ref.train.config import load_config
    from mmbridge_ref.train.loop import fit
    cfg = load_config(TINY_CONFIG, [*METHODS[method], "stages.0.steps=2", "train.batch_size=2", "data.eval_size=2",
                                    "data.pool_size=8", f"train.run_dir={tmp_path}/{{name}}"])
    with contextlib.redirect_stdout(io.StringIO()): res = fit(cfg, progress=False)
    assert res.step == 2 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in res.history if r.get("loss"))
    assert 0 <= res.metrics["vqa_em"] <= 1 and "vqa_mc" in res.metrics


def test_a_tower_without_a_position_grid_cannot_be_interpolated():
    fake = nn.Module(); fake.image_size, fake.patch_size, fake.dim = 16, 4, 8
    for mode in ["interp", "uhd"]:
        with pytest.raises(ValueError, match=f"mode='{mode}' runs the tower at other sizes, but Module has no learned position grid"):
            TiledVision(fake, TilingSettings(mode=mode))
    TiledVision(fake, TilingSettings(mode="monkey", lora="none"))  # tiles at the tower's own size need no positions
