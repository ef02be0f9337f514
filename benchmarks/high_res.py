"""How the cost of each high-resolution method grows with the input: visual tokens per image, peak memory and the time of
one training step, for square inputs of 32 to 256 px, every method built by `build_vlm` from the zoo's frozen tower and LM.

A step is forward + backward of the summed loss on a batch of 4 one-image questions, the tower run every step (no
feature cache), the bridge (and Monkey's LoRA) trainable. Each (method, size) runs in a fresh process, so that its peak
memory is its own: memory is the growth of the process's peak resident set during the first step (`getrusage`
ru_maxrss after the step minus the resident set before it), not tracemalloc (which does not see torch's allocations).

    python benchmarks/high_res.py            # writes benchmarks/high_res.md
    python benchmarks/high_res.py --quick    # 32 and 64 px, printed only
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import machine_line  # noqa: E402

METHODS = {  # the model sections of configs/high_res_tiny.yaml's rows, with the tiling at the input's size
    "base": {"bridge": "mlp", "tiling": {"mode": "base"}},
    "interp": {"bridge": "mlp", "tiling": {"mode": "interp"}},
    "anyres": {"bridge": "anyres"},
    "uhd": {"bridge": "uhd", "uhd": {"num_latents": 16}},
    "monkey (per-tile LoRA)": {"bridge": "monkey", "monkey": {"num_latents": 16}, "tiling": {"lora": "per_tile"}},
    "monkey (shared LoRA)": {"bridge": "monkey", "monkey": {"num_latents": 16}, "tiling": {"lora": "shared"}},
    "tiles, no LoRA": {"bridge": "monkey", "monkey": {"num_latents": 16}, "tiling": {"lora": "none"}},
    "fuyu (patch 8)": {"bridge": "fuyu", "tiling": {"patch": 8}},
}


NOTES = """How to read it. Base resolution costs the same at every input size (the scene is downsampled first) and sees none
of the extra pixels. Interpolated positions read every pixel, but the tokens grow with the area, (side / 4)^2: at 256 px
the LM reads 4,096 tokens per scene and the step's time and memory are the LM's attention over them. The tilings cap
the cost by construction: AnyRes at its largest pinpoint (2 x 2 tiles, 336 tokens), UHD and Monkey at a fixed number of
resampled tokens per view (84 and 80), whatever the input; past the cap each tile is downsampled, so a bigger input adds
pixels the tower never sees (raise the pinpoints, max_slices or grid to see them, at a price). Fuyu has no cap: its tokens
grow with the area like interpolation's, but a linear map per patch is much cheaper than a tower run at that size.
Monkey's LoRA adds a little to a step (compare the rows of the same tiles with no LoRA), and the per-tile and shared
variants cost the same: they differ only in which adapter each crop uses. The CPU may have been shared with other jobs:
rows of one method that should cost the same and differ by much differ by the other jobs' load."""


def rss_bytes():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_case(method, side, reps, batch):
    "Run in a child process: build the model, one measured step, then timed steps; print a JSON line."
    import torch
    from mmbridge_ref.train.loop import match_params
    from mmbridge_ref.vlm import build_vlm, collate_vlm, encode_segments, visual_token_count
    torch.set_num_threads(1); torch.manual_seed(0)
    cfg = METHODS[method]
    vlm = build_vlm({**cfg, "tiling": {**cfg.get("tiling", {}), "image_size": side}}, cache=None)
    for n in match_params(vlm, ["bridge.*", "?vision.*lora_*"]): vlm.get_parameter(n).requires_grad_(True)
    tok = vlm.lm.tokenizer
    ids, labels = encode_segments(tok, [("<image> question : what shape is the small object ? answer :", False), ("circle", True)], num_media=1)
    b = collate_vlm([dict(input_ids=ids, labels=labels, media=torch.rand(1, 1, 3, side, side)) for _ in range(batch)], tok.pad_token_id)
    params = [p for p in vlm.parameters() if p.requires_grad]

    def step():
        for p in params: p.grad = None
        vlm(b).backward()

    before = rss_bytes()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(reps):
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
    print(json.dumps({"method": method, "side": side, "tokens": visual_token_count(vlm), "trainable": sum(p.numel() for p in params),
                      "peak_mb": max(peak, 0) / 2**20, "best_s": min(times), "median_s": statistics.median(times)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # METHOD SIDE: run one case (in the child process)
    args = ap.parse_args()
    if args.case: return one_case(args.case[0], int(args.case[1]), args.reps, args.batch)
    sides = [32, 64] if args.quick else [32, 64, 128, 256]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    for method in METHODS:
        for side in sides:
            out = subprocess.run([sys.executable, __file__, "--case", method, str(side), "--reps", str(args.reps), "--batch", str(args.batch)],
                                 capture_output=True, text=True, env=env)
            if out.returncode: raise RuntimeError(f"{method} at {side} px failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = ["| method | input px | visual tokens / image | peak memory of a step (MB) | step ms / image (best) | step ms / image (median) | trainable |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['side']} | {r['tokens']} | {r['peak_mb']:.0f} | {1e3 * r['best_s'] / args.batch:.1f} | "
                     f"{1e3 * r['median_s'] / args.batch:.1f} | {r['trainable']:,} |")
    table = "\n".join(lines)
    if args.quick: print(table); return
    head = [
        "# High resolution: how the cost grows with the input",
        "",
        "Command: `python benchmarks/high_res.py` (each method and size in a fresh process; one measured step, then "
        f"{args.reps} timed steps; batch {args.batch}).",
        "Every method is built by `build_vlm` on the zoo's frozen tower (32-px tiles, 8 x 8 tokens of width 128) and frozen LM, with "
        "`model.tiling.image_size` = the input side and the tiling settings of `configs/high_res_tiny.yaml` otherwise "
        "(AnyRes pinpoints up to 2 x 2 tiles, UHD up to 4 slices, Monkey a 2 x 2 window, 16 latents per view, Fuyu 8-px patches). "
        "`interp` runs the tower at the input's own size here (the recipe caps it with `interp_size`).",
        "A step: forward + backward of the loss on one-image questions, the tower run every step (no feature cache), the "
        "bridge and Monkey's LoRA trainable. Peak memory: the growth of the process's peak resident set (getrusage "
        "ru_maxrss) during the first step, in a fresh process per row; tracemalloc does not see torch's allocations.",
        machine_line(1),
        "",
        table,
        "",
        NOTES,
    ]
    Path(__file__).with_suffix(".md").write_text("\n".join(head) + "\n")
    print(table)


if __name__ == "__main__":
    main()
