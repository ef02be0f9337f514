"""Forward + backward time of our CLIP / SigLIP losses against open_clip's, in the same run.

    python benchmarks/clip_loss.py                      # print the table
    python benchmarks/clip_loss.py --out benchmarks/clip_loss.md

Implementations are timed in alternation, round after round, so that a change in machine load hits all of them
alike; the table reports the median over rounds. Values are checked equal before timing.
"""
import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mmbridge_ref.align.clip import clip_loss, siglip_loss


def make_inputs(b, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1).to(device).requires_grad_()
    y = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1).to(device).requires_grad_()
    s = torch.tensor(1 / 0.07, dtype=dtype, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=dtype, device=device, requires_grad=True)
    return x, y, s, bias


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def step_time(fn, args, device):
    "Seconds for one forward + backward."
    for a in args: a.grad = None
    sync(device)
    t0 = time.perf_counter()
    fn(*args).backward()
    sync(device)
    return time.perf_counter() - t0


def bench(b, d, device, dtype, rounds, warmup=3):
    x, y, s, bias = make_inputs(b, d, device, dtype)
    impls = {
        ("clip", "mmbridge_ref"): (clip_loss, (x, y, s)),
        ("clip", "open_clip"): (ClipLoss(), (x, y, s)),
        ("siglip", "mmbridge_ref"): (siglip_loss, (x, y, s, bias)),
        ("siglip", "open_clip"): (SigLipLoss(), (x, y, s, bias)),
    }
    for loss in ("clip", "siglip"):
        ours, ref = impls[(loss, "mmbridge_ref")], impls[(loss, "open_clip")]
        torch.testing.assert_close(ours[0](*ours[1]), ref[0](*ref[1]), rtol=1e-5, atol=1e-5)
    times = {k: [] for k in impls}
    for r in range(warmup + rounds):
        for k, (fn, args) in impls.items():
            t = step_time(fn, args, device)
            if r >= warmup: times[k].append(t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def table(rows):
    lines = ["| loss | batch | width | mmbridge_ref (ms) | open_clip (ms) | ours / open_clip |",
             "|---|---:|---:|---:|---:|---:|"]
    for (loss, b, d), (ours, ref) in rows.items():
        lines.append(f"| {loss} | {b} | {d} | {ours:.2f} | {ref:.2f} | {ours / ref:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the table and the machine description to this markdown file")
    args = p.parse_args()
    device, dtype = torch.device(args.device), torch.float32
    rows = {}
    for b in args.batches:
        ms = bench(b, args.width, device, dtype, args.rounds)
        for loss in ("clip", "siglip"):
            rows[(loss, b, args.width)] = (ms[(loss, "mmbridge_ref")], ms[(loss, "open_clip")])
    tab = table(rows)
    print(tab)
    if args.out:
        load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
        desc = (f"device {device.type}"
                + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
                + f", float32, torch {torch.__version__}, load average {load[0]:.1f} at start of write")
        with open(args.out, "w") as f:
            f.write("# CLIP / SigLIP loss: forward + backward\n\n"
                    f"`python benchmarks/clip_loss.py --out benchmarks/clip_loss.md` on {datetime.now(timezone.utc):%Y-%m-%d}; "
                    f"{desc}. Median of {args.rounds} alternating rounds after 3 warm-up rounds; features L2-normalised, "
                    "gradients with respect to both feature matrices, the scale and (SigLIP) the bias.\n\n"
                    f"{tab}\n\n"
                    "What differs: in one process open_clip's `ClipLoss` computes the similarity matrix twice "
                    "(image·textᵀ and text·imageᵀ) where `clip_loss` computes it once and transposes it; both SigLIP losses "
                    "compute it once. Our functions also validate their inputs (one `.item()` on the scale and the bias). "
                    "On a shared CPU (see the load average) differences of ~10% are within the noise.\n")


if __name__ == "__main__":
    main()
