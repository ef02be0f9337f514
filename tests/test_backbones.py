"""The real-model code paths, exercised offline on tiny checkpoints written here with `save_pretrained`."""
import json

import pytest
import torch
from transformers import (AutoTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from mmbridge_ref.backbones import towers as bb


@pytest.fixture(scope="module")
def tok():
    return bb.train_tokenizer(["a small red circle at the top left .", "two shapes : a blue square ."] * 50, vocab_size=300)


def test_tokenizer_roundtrip_keeps_class_and_ids(tok, tmp_path):
    bb.save_tokenizer(tok, tmp_path)
    back = bb.load_tokenizer(tmp_path)
    text = "<image> a red circle . <|endofchunk|>"
    assert back(text).input_ids == tok(text).input_ids
    assert back.convert_tokens_to_ids("<image>") != back.unk_token_id


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_language_model_from_pretrained_offline(tok, tmp_path, family):
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = bb.LanguageModel(model_cls(cfg), tok)
    ref.save_pretrained(tmp_path)
    lm = bb.LanguageModel.from_pretrained(tmp_path)
    ids = tok("a red circle", return_tensors="pt").input_ids
    torch.testing.assert_close(lm(input_ids=ids), ref(input_ids=ids))
    torch.testing.assert_close(lm(inputs_embeds=lm.embed(ids)), ref(input_ids=ids))
    assert "<image>" not in lm.tokenizer.get_vocab() or lm.image_token_id == lm.tokenizer.convert_tokens_to_ids("<image>")


def test_foreign_tokenizer_goes_through_autotokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)  # saved without our marker: a tokenizer that is not ours
    assert bb.load_tokenizer(tmp_path)("a red circle").input_ids == AutoTokenizer.from_pretrained(tmp_path)("a red circle").input_ids


def test_hf_vision_tower_penultimate_layer_without_cls(tmp_path):
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path)
    enc = bb.HFVisionTower(tmp_path, layer=-2)
    x = torch.randn(2, 3, 32, 32)
    feats = enc(x)
    assert feats.shape == (2, 16, 32)  # (32/8)^2 patches, CLS dropped
    hs = enc.model(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats, hs[-2][:, 1:])
    assert enc.embed(x).shape == (2, 16)


def test_open_clip_vision_by_name_offline(tmp_path):
    import open_clip
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8),
               text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1))
    (tmp_path / "mmb-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "mmb-tiny-vit.json")
    enc = bb.OpenClipVision("mmb-tiny-vit")
    x = torch.randn(2, 3, 32, 32)
    assert enc(x).shape == (2, 16, 64)
    assert enc.embed(x).shape == (2, 16)
    assert (enc.image_size, enc.dim) == (32, 64)


def test_freeze_and_param_table():
    m = torch.nn.ModuleDict(dict(a=torch.nn.Linear(4, 4), b=bb.freeze(torch.nn.Linear(4, 2))))
    rows = dict((n, (t, f)) for n, t, f in bb.param_table(m))
    assert rows["a"] == (20, 0) and rows["b"] == (0, 10) and rows["total"] == (20, 10)
    assert not m["b"].training


def test_lm_loss_with_no_targets_is_zero_not_nan():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = bb.lm_loss_sum(logits, torch.full((2, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_lm_pretrain_data_rejects_bad_values():
    from mmbridge_ref.recipes.zoo import LMPretrainData
    with pytest.raises(ValueError, match="fmt: 'caps' is not allowed"): LMPretrainData(fmt="caps")
    with pytest.raises(ValueError, match="mix"): LMPretrainData(mix={"captions": 1.0})
    with pytest.raises(ValueError, match="qa_turns"): LMPretrainData(qa_turns=0)


def test_lm_pretrain_config_names_unknown_keys():
    from mmbridge_ref.train.config import ConfigError, load_config
    from mmbridge_ref.train.loop import build_task
    from mmbridge_ref.backbones.towers import ROOT
    with pytest.raises(ConfigError, match="model.hiden"):
        build_task(load_config(ROOT / "configs" / "zoo_lm.yaml", ["model.hiden=8"]))
    with pytest.raises(ConfigError, match="data.qa_turn"):
        build_task(load_config(ROOT / "configs" / "zoo_lm.yaml", ["data.qa_turn=2"]))


def test_note_ceiling_names_a_bad_object_range():
    from mmbridge_ref.recipes.zoo import note_ceiling
    with pytest.raises(ValueError, match="min_objects=3, max_objects=2"):
        note_ceiling(min_objects=3, max_objects=2, n_captions=2, n_questions=2)


# --- which of the encoder's tokens the bridge reads: LLaVA's layer and CLS choices ---------------------------------

def _normalized(px):
    return (px - torch.tensor(bb.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(bb.CLIP_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def clip_vision_dir(tmp_path_factory):
    """A tiny `CLIPVisionModel` (LLaVA saves its tower this way: no projection), 8x8 patches of 4 px."""
    from transformers import CLIPVisionModel
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=4)
    path = tmp_path_factory.mktemp("clip_vision")
    CLIPVisionModel(cfg).eval().save_pretrained(path)
    return path


def test_vision_layer_and_select_equal_hf_hidden_states(clip_vision_dir):
    from transformers import CLIPVisionModel
    from mmbridge_ref.vlm import build_vlm
    ref = CLIPVisionModel.from_pretrained(clip_vision_dir).eval()
    px = torch.rand(2, 3, 32, 32)
    hs = ref(pixel_values=_normalized(px), output_hidden_states=True).hidden_states  # 1 + 3 of [2, 1+64, 32]
    cases = [({"vision_layer": -2, "vision_select": "default"}, hs[-2][:, 1:]), ({}, hs[-2][:, 1:]),  # LLaVA's choice is the default
             ({"vision_layer": -2, "vision_select": "full"}, hs[-2]), ({"vision_layer": -1}, hs[-1][:, 1:]),
             ({"vision_layer": 0, "vision_select": "full"}, hs[0]), ({"vision_args": {"layer": -3}}, hs[-3][:, 1:])]  # an older config
    for extra, want in cases:
        v = build_vlm({"vision": str(clip_vision_dir), **extra}, cache=None)
        torch.testing.assert_close(v.vision(px), want, msg=lambda m: f"{extra}: {m}")
    with pytest.raises(ValueError, match="embed needs the CLIP projection"): v.vision.tower.embed(_normalized(px))


def test_vision_options_name_bad_values(clip_vision_dir):
    from mmbridge_ref.train.config import ConfigError
    from mmbridge_ref.vlm import build_vlm
    with pytest.raises(ConfigError, match=r"model.vision: layer=-5 is not a layer of .* \(3 blocks\): it takes -4..3"):
        build_vlm({"vision": str(clip_vision_dir), "vision_layer": -5})
    with pytest.raises(ConfigError, match="model.vision_select: 'cls' is not one of"):
        build_vlm({"vision_select": "cls"})
    with pytest.raises(ConfigError, match="model.vision_args.layer: and model.vision_layer both set it"):
        build_vlm({"vision_layer": -1, "vision_args": {"layer": -2}})
    with pytest.raises(ValueError, match="select='cls'"): bb.select_tokens(torch.zeros(1, 2, 1), "cls")
    with pytest.raises(ValueError, match="select='patch'"): bb.HFVisionTower(clip_vision_dir, select="patch")


def test_pixel_shuffle_needs_the_cls_dropped(clip_vision_dir):
    from mmbridge_ref.vlm import build_vlm
    px = torch.rand(2, 1, 1, 3, 32, 32)
    batch = {"pixels": px, "frames": torch.ones(2, 1, dtype=torch.long)}
    v = build_vlm({"vision": str(clip_vision_dir), "bridge": "pixel_shuffle"}, cache=None)
    assert v.visual_tokens(batch).shape == (2, 1, 16, v.lm.dim)
    full = build_vlm({"vision": str(clip_vision_dir), "vision_select": "full", "bridge": "pixel_shuffle"}, cache=None)
    with pytest.raises(ValueError, match="n=65 tokens are not a square grid"): full.visual_tokens(batch)


def test_zoo_features_are_unchanged_by_default_and_the_cache_keeps_layers_apart():
    from mmbridge_ref.vlm import build_vlm, encoder_fingerprint
    zoo, px = bb.load_zoo_vision(), torch.rand(2, 3, 32, 32)
    default, full, first = build_vlm({}), build_vlm({"vision_select": "full"}), build_vlm({"vision_layer": -2})
    assert torch.equal(default.vision(px), zoo(px))  # every committed run read exactly these
    assert torch.equal(full.vision(px), zoo(px))  # no CLS token: nothing to keep or drop
    torch.testing.assert_close(first.vision(px), zoo.hidden(px)[-2])
    assert (first.vision(px) - zoo(px)).abs().max() > 1e-3
    assert default.vision_id == encoder_fingerprint(zoo) == full.vision_id != first.vision_id


def test_no_cls_tower_keeps_every_patch():
    x = torch.arange(6.).view(1, 6, 1)
    assert torch.equal(bb.select_tokens(x, "default", has_cls=False), x)  # SigLIP's bug was to drop a real patch here
    assert torch.equal(bb.select_tokens(x, "default"), x[:, 1:]) and torch.equal(bb.select_tokens(x, "full"), x)
    vit = bb.build_vision("tiny_vit", layer=-2, depth=3, dim=32)
    px = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(vit(px), vit.hidden(px)[1])
    with pytest.raises(ValueError, match=r"layer=3 is not a layer of TinyViT \(3 blocks\): it takes -3..2"):
        bb.build_vision("tiny_vit", layer=3, depth=3, dim=32)


def test_open_clip_layer_and_select(tmp_path):
    import open_clip
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=3, width=64, patch_size=8),
               text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1))
    (tmp_path / "mmb-tiny-vit3.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "mmb-tiny-vit3.json")
    torch.manual_seed(0)
    base = bb.OpenClipVision("mmb-tiny-vit3").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the residual stream by hand: embeddings, then the blocks one by one
        h, stream = base.visual._embeds(x), []
        tr = base.visual.transformer
        for blk in tr.resblocks:
            h = blk(h) if tr.batch_first else blk(h.transpose(0, 1)).transpose(0, 1)
            stream.append(h)
    for layer, select, want in [(-2, "default", stream[-2][:, 1:]), (-2, "full", stream[-2]), (0, "default", stream[0][:, 1:]),
                                (None, "full", base.visual.ln_post(stream[-1]))]:
        enc = bb.OpenClipVision("mmb-tiny-vit3", layer=layer, select=select).eval()
        enc.load_state_dict(base.state_dict())
        torch.testing.assert_close(enc(x), want, msg=lambda m: f"layer={layer} select={select}: {m}")
    torch.testing.assert_close(base(x), base.visual.ln_post(stream[-1])[:, 1:])  # the default: the tower's own tokens
    with pytest.raises(ValueError, match="layer=3 is not a layer of open_clip"): bb.OpenClipVision("mmb-tiny-vit3", layer=3)
