"""Our VLM (mlp × prefix) against transformers' LLaVA holding the same weights: equal logits and loss, and the time of one
forward + backward of each, side by side.

transformers' `LlavaForConditionalGeneration` (CLIP vision tower + `multi_modal_projector` + Llama LM) is built from small
configs with random weights and saved with `save_pretrained`. Its vision tower and its LM are also saved on their own, and
our `build_vlm` loads them from those folders (`model.vision` and `model.lm` are the folders, `model.bridge: mlp`,
`model.injection: prefix`); the projector's four tensors are copied across. LLaVA's defaults are kept on both sides:
features from the penultimate layer (`vision_feature_layer=-2`, our tower's `layer=-2`), CLS dropped (`"default"`).
Both read the same images and the same text: ours with one `<image>` per image (the splice makes room for its tokens),
HF with one `<image>` per visual token (what its processor writes), so the LMs see the same sequence.

    python benchmarks/llava.py                  # every size; writes benchmarks/llava.md
    python benchmarks/llava.py --quick          # the smallest size, a few repetitions, printed only
"""
import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing may come from a hub

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                          logging)

sys.path.insert(0, str(Path(__file__).parent))
from _timing import bench, machine_line  # noqa: E402

from mmbridge_ref.backbones.towers import (CLIP_MEAN, CLIP_STD, ZOO_DIR, count_targets, lm_loss_sum,  # noqa: E402
                                           load_tokenizer, save_tokenizer)
from mmbridge_ref.inject.prefix import splice_visual_tokens  # noqa: E402
from mmbridge_ref.vlm import VLM, build_vlm, collate_vlm, encode_segments  # noqa: E402


@dataclass
class Size:
    "One comparison: the vision tower, the LM and the batch."
    image_size:int
    patch_size:int
    vision_dim:int
    vision_layers:int
    lm_dim:int
    lm_layers:int
    heads:int
    batch:int

    @property
    def visual_tokens(self)->int: return (self.image_size // self.patch_size) ** 2  # per image, CLS dropped

    def __str__(self):
        return (f"{self.image_size}px/{self.patch_size} ({self.visual_tokens} tokens), CLIP {self.vision_dim}×{self.vision_layers}, "
                f"Llama {self.lm_dim}×{self.lm_layers}, batch {self.batch}")


SIZES = {  # the test uses "test"; the benchmark runs the others
    "test": Size(image_size=16, patch_size=4, vision_dim=32, vision_layers=2, lm_dim=32, lm_layers=2, heads=2, batch=3),
    "tiny": Size(image_size=32, patch_size=4, vision_dim=64, vision_layers=2, lm_dim=128, lm_layers=2, heads=4, batch=4),
    "small": Size(image_size=64, patch_size=4, vision_dim=128, vision_layers=4, lm_dim=256, lm_layers=4, heads=4, batch=4),
    "base": Size(image_size=112, patch_size=8, vision_dim=256, vision_layers=4, lm_dim=512, lm_layers=4, heads=8, batch=4),
}
QUESTIONS = ["what colour is the circle ?", "how many shapes ?", "where is the small blue square in this picture ?",
             "is there a triangle ?"]
ANSWERS = ["red .", "two .", "at the top left .", "no ."]
TOL = 1e-5  # fp32: the same ops on the same numbers; a wrong layer, projector or layout moves logits by > 1e-3


def tokenizer():
    "The zoo's tokenizer: it knows `<image>` and has a pad token."
    return load_tokenizer(ZOO_DIR / "tokenizer")


def llava_config(size:Size, tok, *, layer:int=-2, select:str="default")->LlavaConfig:
    "A small LLaVA-1.5: CLIP tower, two-layer GELU projector, Llama LM; the feature selection (LLaVA's by default)."
    vision = CLIPVisionConfig(hidden_size=size.vision_dim, intermediate_size=4 * size.vision_dim,
                              num_hidden_layers=size.vision_layers, num_attention_heads=size.heads,
                              image_size=size.image_size, patch_size=size.patch_size, projection_dim=size.vision_dim)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=size.lm_dim, intermediate_size=int(8 * size.lm_dim / 3) // 8 * 8,
                       num_hidden_layers=size.lm_layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
                       max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                       projector_hidden_act="gelu", vision_feature_layer=layer, vision_feature_select_strategy=select,
                       tie_word_embeddings=False)


def save_llava(size:Size, root:Path, tok, *, seed:int=0, layer:int=-2, select:str="default")->dict[str, Path]:
    "Random LLaVA weights written three ways: the whole model, its vision tower alone, its LM (with the tokenizer) alone."
    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(llava_config(size, tok, layer=layer, select=select))
    dirs = {k: root / k for k in ("llava", "vision", "lm")}
    hf.save_pretrained(dirs["llava"])
    hf.model.vision_tower.save_pretrained(dirs["vision"])
    lm = LlamaForCausalLM(hf.config.text_config)  # the same Llama as a causal LM: decoder + lm_head
    lm.model.load_state_dict(hf.model.language_model.state_dict())
    lm.lm_head.load_state_dict(hf.lm_head.state_dict())
    lm.save_pretrained(dirs["lm"])
    save_tokenizer(tok, dirs["lm"])
    return dirs


def load_pair(dirs:dict[str, Path], *, layer:int|None=None, select:str|None=None)->tuple[LlavaForConditionalGeneration, VLM]:
    "HF's LLaVA from its folder, and our VLM built by name from the tower's and the LM's folders, projector copied."
    hf = LlavaForConditionalGeneration.from_pretrained(dirs["llava"]).eval()
    layer = hf.config.vision_feature_layer if layer is None else layer  # None: the same selection as HF's (a test sets another)
    select = hf.config.vision_feature_select_strategy if select is None else select
    ours = build_vlm({"vision": str(dirs["vision"]), "lm": str(dirs["lm"]), "bridge": "mlp", "injection": "prefix",
                      "vision_layer": layer, "vision_select": select}, cache=None).eval()
    p = hf.model.multi_modal_projector
    ours.bridge.proj.load_state_dict({"0.weight": p.linear_1.weight, "0.bias": p.linear_1.bias,
                                      "2.weight": p.linear_2.weight, "2.bias": p.linear_2.bias})
    for q in hf.parameters(): q.requires_grad_(False)  # both train the projector only, as LLaVA's stage 1
    for q in p.parameters(): q.requires_grad_(True)
    return hf, ours


def expand_image_tokens(input_ids:torch.Tensor,  # [b, t], one image_id per image
                        attention_mask:torch.Tensor,  # [b, t]
                        labels:torch.Tensor,  # [b, t]
                        image_id:int, n:int, pad_id:int)->dict:
    "HF LLaVA's layout: every `<image>` repeated n times (label -100); rows keep their padding and are padded to the longest."
    rows = []
    for ids, mask, lab in zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist()):
        rows.append([(i, m, -100 if i == image_id else l) for i, m, l in zip(ids, mask, lab) for _ in range(n if i == image_id else 1)])
    t = max(len(r) for r in rows)
    rows = [r + [(pad_id, 0, -100)] * (t - len(r)) for r in rows]
    ids, mask, lab = torch.tensor(rows).unbind(-1)  # [b, t'] each
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def batches(tok, size:Size, *, select:str="default", images_per_row=(1,), seed:int=0)->tuple[dict, dict]:
    "The same images and prompts twice: our batch (pixels in [0, 1], one `<image>` each) and HF's (normalised, expanded)."
    g, rows = torch.Generator().manual_seed(seed), []
    for r in range(size.batch):
        m, q = images_per_row[r % len(images_per_row)], r % len(QUESTIONS)
        text = " ".join(["<image>"] * m) + f" question : {QUESTIONS[q]} answer :"
        ids, labels = encode_segments(tok, [(text, False), (ANSWERS[q], True)], num_media=m)
        rows.append(dict(input_ids=ids, labels=labels, media=torch.rand(m, 1, 3, size.image_size, size.image_size, generator=g),
                         keys=[f"{seed}-{r}-{k}" for k in range(m)]))
    ours = collate_vlm(rows, tok.pad_token_id)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = torch.cat([r["media"][:, 0] for r in rows])  # every image, row by row: the order of HF's <image> runs
    hf = expand_image_tokens(ours["input_ids"], ours["attention_mask"], ours["labels"], tok.convert_tokens_to_ids("<image>"),
                             size.visual_tokens + (select == "full"), tok.pad_token_id)  # "full" keeps CLS
    return ours, hf | {"pixel_values": (pixels - mean) / std}


@torch.no_grad()
def compare(hf:LlavaForConditionalGeneration, ours:VLM, batch:dict, hf_batch:dict)->dict:
    "Both models on one batch: the largest logit difference over real positions, both losses, and whether the layouts agree."
    out = ours.injection(ours.lm, batch, ours.visual_tokens(batch), batch["frames"] > 0)
    ref = hf(**hf_batch)
    same_layout = out.logits.shape == ref.logits.shape and torch.equal(out.labels, hf_batch["labels"]) \
        and torch.equal(out.attention_mask, hf_batch["attention_mask"].bool())
    real = hf_batch["attention_mask"].bool()
    diff = (out.logits - ref.logits)[real].abs().max().item() if same_layout else float("inf")
    return {"same_layout": same_layout, "max_logit_diff": diff, "logit_scale": ref.logits[real].abs().max().item(),
            "loss_ours": (lm_loss_sum(out.logits, out.labels) / count_targets(out.labels)).item(), "loss_hf": ref.loss.item()}


def equal(check:dict)->bool:
    "The same sequence, logits and loss within TOL."
    return check["same_layout"] and check["max_logit_diff"] <= TOL and abs(check["loss_ours"] - check["loss_hf"]) <= TOL


def other_selection(tok, name:str)->tuple[str, dict]:
    "The check again at one size, reading the last layer with CLS kept (`\"full\"`)."
    size = SIZES[name]
    with tempfile.TemporaryDirectory() as d:
        hf, ours = load_pair(save_llava(size, Path(d), tok, layer=-1, select="full"))
    return name, compare(hf, ours, *batches(tok, size, select="full", images_per_row=(1, 2, 1, 1)))


def _step(loss_fn, params):
    for p in params: p.grad = None
    loss_fn().backward()


def time_pair(hf, ours, batch, hf_batch, reps:int)->dict[str, list[float]]:
    "Forward + backward of the mean loss, interleaved: HF, ours, and ours reading cached frozen features (as our recipes train)."
    hf.train(); ours.train()
    n = count_targets(hf_batch["labels"])
    cached = VLM(ours.vision, ours.bridge, ours.injection, ours.lm)  # the same modules, with the default feature cache
    cases = {"HF": lambda: _step(lambda: hf(**hf_batch).loss, hf.model.multi_modal_projector.parameters()),
             "ours": lambda: _step(lambda: ours(batch) / n, ours.bridge.parameters()),
             "ours, cached features": lambda: _step(lambda: cached(batch) / n, ours.bridge.parameters())}
    return bench(cases, reps, warmup=3)


PARTS = {  # forward_parts' keys -> their rows in the table
    "hf features": "HF: image features (tower, selection, projector)", "ours features": "ours: `visual_tokens(batch)`",
    "ours direct": "ours: `bridge(vision(pixels))`, called directly",
    "hf merge": "HF: embed + `masked_scatter` at the expanded `<image>` runs",
    "ours merge": "ours: embed + `splice_visual_tokens` (which also moves labels and mask)",
    "hf loss": "HF: loss", "ours loss": "ours: loss (`lm_loss_sum`)", "hf forward": "HF: whole forward",
    "ours forward": "ours: whole forward"}


@torch.no_grad()
def forward_parts(hf, ours, batch, hf_batch, reps:int)->dict[str, list[float]]:
    "Forward only, piece by piece (the LMs are one class on the same sequence, so they are left out): where a gap comes from."
    hf.eval(); ours.eval()
    lm, ids, media_mask = ours.lm, batch["input_ids"], batch["frames"] > 0
    visual = ours.visual_tokens(batch)  # [b, 1, q, d]
    features = visual.flatten(0, 2)  # HF's image features, image after image
    out = ours.injection(lm, batch, visual, media_mask)
    def hf_merge():
        embeds = hf.model.get_input_embeddings()(hf_batch["input_ids"])
        return embeds.masked_scatter(hf.model.get_placeholder_mask(hf_batch["input_ids"], embeds, features), features)
    cases = {"hf features": lambda: hf.model.get_image_features(hf_batch["pixel_values"], vision_feature_layer=-2,
                                                                vision_feature_select_strategy="default"),
             "ours features": lambda: ours.visual_tokens(batch),
             "ours direct": lambda: ours.bridge(ours.vision(batch["pixels"][:, 0, 0])),
             "hf merge": hf_merge,
             "ours merge": lambda: splice_visual_tokens(lm.embed(ids), ids, visual, lm.image_token_id, media_mask=media_mask,
                                                        attention_mask=batch["attention_mask"], labels=batch["labels"]),
             "hf loss": lambda: hf.loss_function(logits=out.logits, labels=hf_batch["labels"], vocab_size=out.logits.shape[-1]),
             "ours loss": lambda: lm_loss_sum(out.logits, out.labels),
             "hf forward": lambda: hf(**hf_batch),
             "ours forward": lambda: ours(batch)}
    return bench(cases, reps, warmup=5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=["tiny", "small", "base"], choices=list(SIZES))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="1: steadier numbers on a shared CPU")
    ap.add_argument("--quick", action="store_true", help="the smallest size, 5 repetitions, printed only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "llava.md"))
    a = ap.parse_args(argv)
    if a.quick: a.sizes, a.reps = ["tiny"], 5
    torch.set_num_threads(a.threads)
    logging.disable_progress_bar()  # a "Loading weights" bar per tiny model is noise
    tok, results = tokenizer(), {}
    for name in a.sizes:
        size = SIZES[name]
        with tempfile.TemporaryDirectory() as d:
            hf, ours = load_pair(save_llava(size, Path(d), tok))
        batch, hf_batch = batches(tok, size, images_per_row=(1, 2, 1, 1))
        check = compare(hf, ours, batch, hf_batch)  # two images in one row: HF's runs and our placeholders must line up
        if name == a.sizes[0]: other = other_selection(tok, name)
        batch, hf_batch = batches(tok, size)
        times = time_pair(hf, ours, batch, hf_batch, a.reps)
        results[name] = check, times, hf_batch["input_ids"].shape
        if name == a.sizes[0]: parts = name, forward_parts(hf, ours, batch, hf_batch, 4 * a.reps)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"{name}: {size}; max |Δlogits| {check['max_logit_diff']:.1e}, loss {check['loss_ours']:.6f} vs "
              f"{check['loss_hf']:.6f}; median ms HF {med['HF']:.1f}, ours {med['ours']:.1f} ({med['ours'] / med['HF']:.2f}x), "
              f"ours cached {med['ours, cached features']:.1f}", flush=True)
    text = table(a, argv, hf, ours, results, other, parts)
    if not a.quick: Path(a.out).write_text(text)
    print(text)
    if not all(equal(c) for c, _, _ in results.values()) or not equal(other[1]): sys.exit("our VLM and HF's LLaVA disagree: see the table")


def table(a, argv, hf, ours, results, other, parts)->str:
    cmd = " ".join(["python benchmarks/llava.py", *(argv if argv is not None else sys.argv[1:])])
    attn = f"{hf.config.vision_config._attn_implementation} / {hf.config.text_config._attn_implementation}"
    lines = ["# Our VLM (mlp × prefix) against transformers' LLaVA, same weights", "",
             f"Command: `OMP_NUM_THREADS={a.threads} {cmd}`",
             machine_line(a.threads),
             f"Attention (vision / LM): HF {attn}; ours loads the same classes through `from_pretrained` "
             f"({ours.lm.model.config._attn_implementation} in the LM).",
             "",
             "LLaVA's feature selection on both sides: `vision_feature_layer=-2`, `vision_feature_select_strategy=\"default\"` "
             "(CLS dropped) in HF; `vision_layer: -2`, `vision_select: default` in ours. Ours reads one `<image>` "
             "per image; HF reads one per visual token, so both LMs see the same sequence (checked: same length, labels "
             "and attention mask). Equality is checked on a batch where one row holds two images; the timing batch has one "
             "image per row. Loss: the mean next-token cross-entropy over the answer tokens and EOS.",
             "",
             "| size | LM tokens (b × t) | max abs Δlogits (largest abs logit) | loss ours | loss HF | HF median ms | ours median ms "
             "| ours / HF (median) | ours / HF (best) | ours, cached features, median ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (check, times, shape) in results.items():
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        lines.append(f"| {name}: {SIZES[name]} | {shape[0]} × {shape[1]} | {check['max_logit_diff']:.1e} "
                     f"({check['logit_scale']:.2f}) | {check['loss_ours']:.6f} | {check['loss_hf']:.6f} | {med['HF']:.1f} | "
                     f"{med['ours']:.1f} | {med['ours'] / med['HF']:.2f} | {best['ours'] / best['HF']:.2f} | "
                     f"{med['ours, cached features']:.1f} |")
    ok = all(equal(c) for c, _, _ in results.values())
    name, check = other
    lines += ["", f"Equality (same sequence, max abs Δlogits ≤ {TOL:g} and |Δloss| ≤ {TOL:g}, fp32): "
              f"{'holds at every size' if ok else 'FAILS at some size'}. With the other selection, `vision_feature_layer=-1` "
              f"and `\"full\"` (CLS kept, {SIZES[name].visual_tokens + 1} tokens per image) on both sides, at the `{name}` "
              f"size: max abs Δlogits {check['max_logit_diff']:.1e}, loss {check['loss_ours']:.6f} vs {check['loss_hf']:.6f} "
              f"({'equal' if equal(check) else 'NOT EQUAL'}).",
              "", "Timing: one forward + backward of the mean loss, only the projector trainable on both sides (vision tower "
              f"and LM frozen), train mode, {a.reps} interleaved repetitions after 3 warm-up calls, same thread count. "
              "\"ours\" encodes every image (no feature cache), as HF does; \"ours, cached features\" is the same model "
              "reading the frozen tower's features from `FeatureCache`, as our recipes train (not a like-for-like row)."]
    return "\n".join(lines + notes(*parts)) + "\n"


def notes(name:str, times:dict[str, list[float]])->list[str]:
    "The forward pieces at one size, and what makes ours and HF differ (from the best times: other jobs only add time)."
    best, med = ({k: 1e3 * f(v) for k, v in times.items()} for f in (min, statistics.median))
    gap = lambda part: best[f"ours {part}"] - best[f"hf {part}"]
    lines = ["", f"Where the forward time goes at the `{name}` size (no grad, {len(times['hf forward'])} interleaved "
             "repetitions):", "", "| piece | best ms | median ms |", "|---|---:|---:|"]
    lines += [f"| {PARTS[k]} | {best[k]:.3f} | {med[k]:.3f} |" for k in times]
    return lines + [
        "", f"Notes. Ours minus HF at this size, forward, best times: image features {gap('features'):+.2f} ms (of which "
        f"{best['ours features'] - best['ours direct']:+.2f} ms is `visual_tokens`' per-medium bookkeeping: a list of media, "
        "`cat`, `split`, `stack` and the scatter into [b, m, q, d] that let one batch mix rows of 0, 1 or several images "
        f"and clips), merge {gap('merge'):+.2f} ms, loss {gap('loss'):+.2f} ms, whole forward {gap('forward'):+.2f} ms. "
        "The splice does inside the model what HF's processor does before it, outside this timing: it makes room for "
        "the visual tokens and moves labels and attention mask along (about ten small indexing ops against HF's one "
        "`masked_scatter`). Our tower also normalises the pixels inside the model (HF's processor does it before). "
        "These are fixed costs of a fraction of a millisecond per batch: they show at the smallest size and are lost "
        "in the noise once the LM dominates the step. The CPU is shared and other jobs come in bursts of seconds: "
        "medians of a few milliseconds can double while the best times stay put, so read the smallest size's ratio "
        "from the best column too."]


if __name__ == "__main__":
    main()
