"""ViTamin blocks (the encoder half of the CLIP notebooks): parity with timm by copying weights, token arithmetic, bad input."""
import pytest
import timm.layers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vitamin import GeGluMlp, MbConvLNBlock, VitCfg, VitConvCfg, _create_vitamin

from mmbridge_ref.backbones.vitamin import MBConvLN, TFBGeGLU, TinyViTamin, from_timm_vitamin, stage_shapes, vitamin_grid


@pytest.mark.parametrize("cin,cout,stride", [(8, 8, 1), (8, 16, 1), (16, 8, 1), (8, 8, 2), (8, 24, 2)])
@pytest.mark.parametrize("size", [7, 8])
def test_mbconv_ln_equals_timm(cin, cout, stride, size):
    torch.manual_seed(cin * cout + stride)
    ref = MbConvLNBlock(cin, cout, stride=stride).double().eval()
    ours = MBConvLN(cin, cout, stride=stride).double().eval()
    ours.load_state_dict(from_timm_vitamin(ref.state_dict()))  # strict: every weight has a counterpart
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim,heads,ratio", [(32, 4, 2.0), (48, 3, 2.0), (64, 8, 4.0)])
def test_tfb_geglu_equals_timm_block(dim, heads, ratio):
    torch.manual_seed(dim)
    ref = TimmBlock(dim, num_heads=heads, mlp_ratio=ratio, qkv_bias=True, mlp_layer=GeGluMlp,
                    norm_layer=timm.layers.LayerNorm).double().eval()
    ours = TFBGeGLU(dim, heads=heads, mlp_ratio=ratio).double().eval()
    ours.load_state_dict(from_timm_vitamin(ref.state_dict()))
    x = torch.randn(3, 11, dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)


def test_whole_tiny_vitamin_equals_timm():
    torch.manual_seed(0)
    cfg = VitCfg(embed_dim=(16, 24, 48), depths=(2, 1, 1), stem_width=8,
                 conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
    ref = _create_vitamin("vitamin_small_224", pretrained=False, embed_cfg=cfg, img_size=48, embed_dim=48, depth=2,
                          num_heads=4, mlp_layer=GeGluMlp, mlp_ratio=2.0, class_token=False, global_pool="avg",
                          num_classes=0).double().eval()
    ours = TinyViTamin(image_size=48, stem_width=8, widths=(16, 24), depths=(2, 1), dim=48, depth=2, heads=4,
                       strides=(2, 2, 2, 2)).double().eval()
    missing, unexpected = ours.load_state_dict(from_timm_vitamin(ref.state_dict()), strict=False)
    assert missing == ["proj.weight"] and unexpected == []
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        feats = ref.forward_features(x)
        torch.testing.assert_close(ours(x), feats, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.pool(ours(x)), ref(x), rtol=1e-9, atol=1e-9)  # num_classes=0: pooled + fc_norm
    assert ours(x).shape == (2, 3 * 3, 48)  # 48 -> 24 -> 12 -> 6 -> 3


def test_224px_gives_14x14_tokens():
    assert vitamin_grid(224) == 14
    m = TinyViTamin(image_size=224, stem_width=8, widths=(8, 16), depths=(1, 1), dim=32, depth=1, strides=(2, 2, 2, 2))
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 196, 32)


@settings(max_examples=20, deadline=None)
@given(size=st.integers(5, 40), strides=st.tuples(*[st.sampled_from([1, 2])] * 4))
def test_grid_arithmetic_matches_the_model(size, strides):
    m = TinyViTamin(image_size=size, stem_width=8, widths=(8, 8), depths=(1, 1), dim=16, depth=1, heads=2,
                    strides=strides, embed_dim=8)
    rows = dict(stage_shapes(m, torch.randn(1, 3, size, size)))
    g = vitamin_grid(size, strides)
    assert rows["to_tokens (LN + conv)"][-2:] == (g, g)
    assert rows["block0 (TFB-GeGLU)"] == (1, g * g, 16) and m.num_tokens == g * g


def test_encoder_interface():
    m = TinyViTamin()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 64, 128) and m.embed(x).shape == (2, 128)
    assert m.dim == 128 and m.image_size == 32 and len(m.hidden(x)) == 2
    m.embed(x).sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters()), "some parameter gets no gradient from embed"


@pytest.mark.parametrize("make,msg", [
    (lambda: TinyViTamin()(torch.randn(1, 3, 28, 28)), "(1, 3, 28, 28)"),
    (lambda: TinyViTamin()(torch.randn(1, 1, 32, 32)), "(1, 1, 32, 32)"),
    (lambda: TinyViTamin(strides=(2, 2, 2)), "strides=(2, 2, 2)"),
    (lambda: TinyViTamin(dim=30, heads=4), "dim=30 is not divisible by heads=4"),
    (lambda: TinyViTamin(depths=(1, 0)), "depths=(1, 0)"),
    (lambda: MBConvLN(8, 8, stride=4), "stride=4"),
    (lambda: vitamin_grid(0), "image_size=0"),
])
def test_bad_input_names_the_values(make, msg):
    with pytest.raises(ValueError) as e:
        make()
    assert msg in str(e.value)
