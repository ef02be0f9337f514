"""The per-token and per-block projectors: LLaVA-1.5's MLP is exactly Linear -> GELU -> Linear, pixel shuffle equals
Idefics3's on every grid and scale, its bridge equals Idefics3's connector on the same weights, and it trains in the
composer on the zoo's 8x8 grid."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from transformers import CLIPVisionConfig, Idefics3Config, LlamaConfig, LlavaConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mmbridge_ref.bridges.projectors import MLPProjector, PixelShuffleProjector, pixel_shuffle
from mmbridge_ref.train.config import ConfigError
from mmbridge_ref.vlm import build_vlm, collate_vlm, encode_segments

torch.set_num_threads(1)


def idefics3_connector(dim:int, dim_out:int, scale:int)->Idefics3Connector:
    cfg = Idefics3Config(vision_config={"hidden_size": dim, "num_attention_heads": 1}, scale_factor=scale,
                         text_config={"hidden_size": dim_out, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32})
    return Idefics3Connector(cfg).eval()


# --- LLaVA-1.5's MLP --------------------------------------------------------------------------------------------------

def test_mlp_projector_is_llava_mlp2x_gelu():
    ours = MLPProjector(24, 16)
    assert [type(m) for m in ours.proj] == [nn.Linear, nn.GELU, nn.Linear]
    assert ours.proj[1].approximate == "none"  # LLaVA's builder uses nn.GELU(): the exact erf form
    assert (ours.proj[0].in_features, ours.proj[0].out_features, ours.proj[2].in_features, ours.proj[2].out_features) == (24, 16, 16, 16)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=24, num_attention_heads=2),
                      text_config=LlamaConfig(hidden_size=16, num_attention_heads=2), projector_hidden_act="gelu")
    theirs = LlavaMultiModalProjector(cfg).eval()
    theirs.load_state_dict({"linear_1.weight": ours.proj[0].weight, "linear_1.bias": ours.proj[0].bias,
                            "linear_2.weight": ours.proj[2].weight, "linear_2.bias": ours.proj[2].bias})
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(ours(x), theirs(x))


# --- pixel shuffle ----------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), blocks=st.integers(1, 4), scale=st.integers(1, 4), d=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pixel_shuffle_equals_idefics3(b, blocks, scale, d, seed):
    side = blocks * scale
    x = torch.randn(b, side * side, d, generator=torch.Generator().manual_seed(seed))
    ref = Idefics3Connector.pixel_shuffle(None, x, scale)  # it reads nothing from self
    ours = pixel_shuffle(x, scale)
    assert ours.shape == (b, blocks * blocks, d * scale * scale)
    assert torch.equal(ours, ref)


def test_pixel_shuffle_puts_each_block_in_one_token_row_by_row():
    side, s = 6, 3
    x = torch.arange(side * side, dtype=torch.float).view(1, side * side, 1)  # patch k holds the number k
    out = pixel_shuffle(x, s)[0].long()  # [4, 9]
    for y in range(side // s):
        for xb in range(side // s):
            want = [(y * s + i) * side + xb * s + j for i in range(s) for j in range(s)]
            assert out[y * (side // s) + xb].tolist() == want


def test_pixel_shuffle_names_bad_sizes():
    with pytest.raises(ValueError, match="n=15 tokens are not a square grid"): pixel_shuffle(torch.randn(1, 15, 2))
    with pytest.raises(ValueError, match="n=65 tokens are not a square grid"): pixel_shuffle(torch.randn(1, 65, 2))  # CLS kept
    with pytest.raises(ValueError, match=r"side 6 \(n=36\) is not divisible by scale=4"): pixel_shuffle(torch.randn(1, 36, 2), 4)
    with pytest.raises(ValueError, match="scale=0"): pixel_shuffle(torch.randn(1, 16, 2), 0)
    with pytest.raises(ValueError, match=r"\(16, 2\) is not \[b, n, d\]"): pixel_shuffle(torch.randn(16, 2))
    with pytest.raises(ValueError, match="scale=0"): PixelShuffleProjector(8, 16, 0)


@pytest.mark.parametrize("scale,side", [(2, 8), (3, 6), (4, 8)])
def test_pixel_shuffle_projector_equals_idefics3_connector(scale, side):
    ours = PixelShuffleProjector(8, 16, scale)
    theirs = idefics3_connector(8, 16, scale)
    theirs.modality_projection.proj.load_state_dict({"weight": ours.proj.weight})
    assert ours.proj.bias is None and sum(p.numel() for p in ours.parameters()) == 8 * scale**2 * 16
    x = torch.randn(3, side * side, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_pixel_shuffle_projector_on_a_clip_is_its_frames_end_to_end():
    ours = PixelShuffleProjector(8, 16, 2, max_frames=3)
    x = torch.randn(2, 3, 16, 8)
    with torch.no_grad(): ours.time_emb.zero_()
    frames = torch.cat([ours(x[:, f]) for f in range(3)], 1)
    torch.testing.assert_close(ours(x), frames)
    with torch.no_grad(): ours.time_emb[1] += 1.0  # the time embedding marks the second frame's tokens only
    moved = (ours(x) - frames).abs().amax(-1)[0]
    assert moved[4:8].min() > 0 and moved[:4].max() == 0 and moved[8:].max() == 0


def test_pixel_shuffle_projector_refuses_padding():
    with pytest.raises(ValueError, match="keeps every token"):
        PixelShuffleProjector(8, 16)(torch.randn(2, 16, 8), torch.zeros(2, 16, dtype=torch.bool))


# --- in the composer --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_batch():
    v = build_vlm({"bridge": "pixel_shuffle"}, cache=None)
    tok = v.lm.tokenizer
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(2):
        ids, labels = encode_segments(tok, [("<image> question : what colour ? answer :", False), ("red", True)], num_media=1)
        rows.append(dict(input_ids=ids, labels=labels, media=torch.rand(1, 1, 3, 32, 32, generator=g)))
    return v, collate_vlm(rows, tok.pad_token_id)


def test_pixel_shuffle_bridge_gives_a_quarter_of_the_zoo_tokens(zoo_batch):
    v, b = zoo_batch
    assert isinstance(v.bridge, PixelShuffleProjector) and v.bridge.scale == 2
    assert v.visual_tokens(b).shape == (2, 1, 16, v.lm.dim)  # 8x8 patches -> 4x4 tokens of the LM's width
    loss = v(b)
    loss.backward()
    assert loss.isfinite() and v.bridge.proj.weight.grad.abs().sum() > 0
    x = build_vlm({"bridge": "pixel_shuffle", "injection": "xattn", "pixel_shuffle": {"scale": 4}}, cache=None)
    assert x.visual_tokens(b).shape == (2, 1, 4, x.vision.dim)  # cross-attention keeps the encoder's width


def test_pixel_shuffle_settings_are_checked(zoo_batch):
    _, b = zoo_batch
    with pytest.raises(ConfigError, match="model.pixel_shuffle.scale: 0 is not allowed"):
        build_vlm({"bridge": "pixel_shuffle", "pixel_shuffle": {"scale": 0}})
    with pytest.raises(ConfigError, match="model.pixel_shuffle.scal"):
        build_vlm({"bridge": "pixel_shuffle", "pixel_shuffle": {"scal": 2}})
    v = build_vlm({"bridge": "pixel_shuffle", "pixel_shuffle": {"scale": 3}}, cache=None)
    with pytest.raises(ValueError, match=r"side 8 \(n=64\) is not divisible by scale=3"): v(b)
