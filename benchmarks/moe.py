"""Our MoE layer against transformers' `MixtralSparseMoeBlock` holding the same weights: forward + backward on the CPU.

One set of random weights (router + e SwiGLU experts) is copied into Mixtral's block (`copy_to_mixtral`). transformers
5 dispatches the experts' computation by `config._experts_implementation`: a standalone block (built from a config, as
here) runs the original per-expert loop ("eager"); models loaded with `from_pretrained` default to "grouped_mm". Both
are timed, and "batched_mm" too, interleaved round-robin in one process so that load from other processes hits all of
them alike. Every variant's output is checked against ours before timing.

    OMP_NUM_THREADS=1 python benchmarks/moe.py            # writes benchmarks/moe.md
    OMP_NUM_THREADS=1 python benchmarks/moe.py --quick    # fewer tokens and repetitions, printed only
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import MixtralConfig, logging
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

sys.path.insert(0, str(Path(__file__).parent))
from _timing import bench, machine_line, result_rows  # noqa: E402

from mmbridge_ref.inject.moe import MoEFeedForward, copy_to_mixtral  # noqa: E402

IMPLEMENTATIONS = {"eager": "transformers Mixtral block, eager (a standalone block's default)",
                   "grouped_mm": "transformers Mixtral block, grouped_mm (from_pretrained's default)"}
OURS = "ours (MoEFeedForward)"


def fwd_bwd(module, x, g):
    "One forward and backward of <output, g>; gradients to the input and every parameter."
    x.grad = None
    for p in module.parameters(): p.grad = None
    (module(x) * g).sum().backward()


def mixtral(ours, dim, hidden, e, k, impl):
    cfg = MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=e, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    return copy_to_mixtral(ours, MixtralSparseMoeBlock(cfg))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="1: steadier numbers on a shared CPU")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.set_verbosity_error()
    dim, hidden, e, k, tokens = 256, 680, 4, 2, (256 if a.quick else 2048)
    reps = 3 if a.quick else a.reps
    torch.manual_seed(0)
    ours = MoEFeedForward(dim, hidden, e, k)
    with torch.no_grad(): ours.router.weight.normal_(0, 0.1)  # routing far from uniform, every expert used
    theirs = {name: mixtral(ours, dim, hidden, e, k, impl) for impl, name in IMPLEMENTATIONS.items()}
    x = torch.randn(1, tokens, dim, requires_grad=True)
    g = torch.randn(1, tokens, dim)
    with torch.no_grad():
        y = ours(x)
        errs = {name: (m(x) - y).abs().max().item() for name, m in theirs.items()}
        load = torch.bincount(ours.last_router_logits.topk(k).indices.flatten(), minlength=e).tolist()
    if max(errs.values()) > 1e-4: sys.exit(f"the implementations disagree: {errs}")
    cases = {OURS: lambda: fwd_bwd(ours, x, g)} | {name: (lambda m=m: fwd_bwd(m, x, g)) for name, m in theirs.items()}
    times = bench(cases, reps, warmup=2)
    table = "\n".join([
        "# MoE layer: ours against transformers' MixtralSparseMoeBlock, forward + backward on the CPU",
        "",
        f"Command: `OMP_NUM_THREADS={a.threads} python benchmarks/moe.py` ({reps} interleaved repetitions after 2 warm-up calls).",
        f"Sizes: {tokens} tokens of width {dim}, {e} SwiGLU experts of hidden width {hidden}, top-{k} "
        f"(assignments per expert in this batch: {load}), fp32, no capacity limit.",
        machine_line(a.threads),
        "Same weights in all three; max |difference| of each block's output from ours: "
        + ", ".join(f"{impl} {errs[name]:.1e}" for impl, name in IMPLEMENTATIONS.items()) + ".",
        "Timed: the output's inner product with a fixed random tensor, its backward to the input, the router and "
        "the experts.",
        "",
        *result_rows(times, list(theirs), [OURS]),
        "",
        "Ours sorts the t·k assignments by expert once (a stable `argsort`), gathers the tokens once, runs three",
        "`F.linear`s per expert on its contiguous block of rows and adds the weighted rows back with one `index_add_`.",
        "The eager Mixtral block builds a one-hot [e+1, k, t] mask and, per expert, finds its tokens with `torch.where`,",
        "gathers them, runs one fused gate|up `F.linear` and one down `F.linear`, and `index_add_`s them into the",
        "output: the same matrix products (its gate|up weights are concatenated, ours are two matrices), more",
        "bookkeeping per expert. `grouped_mm` also sorts once, runs the experts as grouped matrix products and sums",
        "the k outputs of a token with a reshape. The matrix products take most of every row's time (two thirds to four",
        "fifths in a profiler trace), so the rows differ by the bookkeeping around them. transformers' third",
        "implementation, `batched_mm`, is left out: it gathers a copy of the expert's weights for every assignment and",
        "runs t·k matrix-vector products; in a trial at 256 tokens it took about 100x as long as the others. The CPU is",
        "shared and other jobs come in bursts: medians move between runs while the best times stay put, so read the",
        "ratio from the best column.",
    ])
    print(table)
    if not a.quick: Path(__file__).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
