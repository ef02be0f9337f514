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
