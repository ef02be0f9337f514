"""Our Q-Former vs transformers' `Blip2QFormerModel` at equal sizes: forward + backward on the CPU, same run.

Both models hold the same weights (copied with `load_hf_qformer`), so the script first checks that they compute the
same thing, then times them interleaved (ours, theirs, theirs, ours, ...) and reports medians of the process CPU
time per forward + backward, with one intra-op thread: on a shared machine CPU time is far steadier than wall-clock
time (other processes stretch the wall clock but not our CPU seconds).

    .venv/bin/python benchmarks/qformer.py                 # prints the table and writes benchmarks/qformer.md
    .venv/bin/python benchmarks/qformer.py --reps 5 --no-write --sizes small
"""
import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mmbridge_ref.bridges.qformer import QFormer, load_hf_qformer

# name: (dim, depth, heads, num_queries, vision_dim, image tokens, text tokens, batch)
SIZES = {
    "small": (256, 4, 8, 32, 384, 257, 32, 8),  # the toy scale the notebooks train at, with a ViT-B/14-like image grid
    "blip2": (768, 12, 12, 32, 1408, 257, 32, 2),  # BLIP-2's Q-Former (BERT-base) over EVA-ViT-g features
}


def build(size):
    dim, depth, heads, q, dv, n, t, b = SIZES[size]
    cfg = Blip2QFormerConfig(vocab_size=1024, hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                             intermediate_size=4 * dim, cross_attention_frequency=2, encoder_hidden_size=dv,
                             max_position_embeddings=64, use_qformer_text_input=True,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    theirs = Blip2QFormerModel(cfg).train()  # dropout 0: train mode only enables autograd-relevant paths
    query_tokens = torch.randn(1, q, dim) * 0.02
    ours = QFormer(dim, vision_dim=dv, depth=depth, num_queries=q, heads=heads, vocab_size=1024, max_text_len=64).train()
    load_hf_qformer(ours, theirs, query_tokens=query_tokens)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(b, n, dv, generator=g)
    text = torch.randn(b, t, dim, generator=g)  # already-embedded text: both models get the same tensor
    text_mask = torch.ones(b, t, dtype=torch.bool)
    text_mask[::2, t // 2:] = False  # half the captions are half padding
    return ours, theirs, query_tokens, image, text, text_mask


def ours_step(model, query_tokens, image, text, text_mask, mode):
    out = model(image) if mode == "queries" else model(image, text, text_mask, objective="itm")
    return out.queries if mode == "queries" else torch.cat([out.queries, out.text], 1)


def theirs_step(model, query_tokens, image, text, text_mask, mode):
    q = query_tokens.expand(image.shape[0], -1, -1)
    if mode == "queries":
        return model(query_embeds=q, encoder_hidden_states=image).last_hidden_state
    mask = torch.cat([torch.ones(q.shape[:2], dtype=torch.long), text_mask.long()], 1)
    return model(query_embeds=torch.cat([q, text], 1), query_length=q.shape[1], attention_mask=mask,
                 encoder_hidden_states=image).last_hidden_state


def fwd_bwd(step, model, *args):
    model.zero_grad(set_to_none=True)
    out = step(model, *args)
    out.square().mean().backward()
    return out


def timed(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def run(size, mode, reps):
    ours, theirs, *inputs = build(size)
    with torch.no_grad():
        a, b = ours_step(ours, *inputs, mode), theirs_step(theirs, *inputs, mode)
    valid = torch.cat([torch.ones(a.shape[0], inputs[0].shape[1], dtype=torch.bool), inputs[3]], 1) if mode == "itm" else None
    diff = float((a - b).abs()[valid].max() if valid is not None else (a - b).abs().max())
    for _ in range(1):  # warm-up
        fwd_bwd(ours_step, ours, *inputs, mode); fwd_bwd(theirs_step, theirs, *inputs, mode)
    t_ours, t_theirs = [], []
    for r in range(reps):
        pair = [(t_ours, ours_step, ours), (t_theirs, theirs_step, theirs)]
        for times, step, model in (pair if r % 2 == 0 else pair[::-1]):
            times.append(timed(lambda: fwd_bwd(step, model, *inputs, mode)))
    dim, depth, heads, q, dv, n, t, bsz = SIZES[size]
    params = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in theirs.parameters())
    return dict(size=size, mode=mode, shape=f"d={dim} L={depth} h={heads} q={q} n={n}x{dv} t={t if mode == 'itm' else 0} b={bsz}",
                ours=statistics.median(t_ours) * 1e3, theirs=statistics.median(t_theirs) * 1e3, diff=diff, params=params)


def table(rows):
    lines = ["| size | pass | shape | ours (CPU ms) | transformers (CPU ms) | ours / theirs | max abs diff |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['mode']} | {r['shape']} | {r['ours']:.1f} | {r['theirs']:.1f} | "
                     f"{r['ours'] / r['theirs']:.2f} | {r['diff']:.1e} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable timings on a shared CPU)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not rewrite benchmarks/qformer.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(size, mode, args.reps) for size in args.sizes for mode in ("queries", "itm")]
    env = (f"torch {torch.__version__}, transformers {transformers.__version__} (sdpa attention), "
           f"{platform.processor() or platform.machine()}, {args.threads} thread(s), fp32, median CPU time of {args.reps} reps; "
           f"{datetime.date.today()}")
    text = table(rows)
    print(text + "\n\n" + env)
    if not args.no_write:
        out = Path(__file__).with_suffix(".md")
        head, _, _ = out.read_text().partition("<!-- results -->") if out.exists() else ("", "", "")
        out.write_text((head or "# Q-Former speed\n\n") + "<!-- results -->\n" + text + "\n\n" + env + "\n")


if __name__ == "__main__":
    main()
