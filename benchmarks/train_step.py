"""Training speed of every tiny recipe on this machine, against the machine's own matmul peak, in fp32 and bf16.

    python benchmarks/train_step.py [--steps 30] [--threads 1] [--quality] [--out benchmarks/train_step.md]

For each recipe (configs/*_tiny.yaml and the zoo LM's) and each precision, the engine trains `--steps` steps (the
first 5 are warm-up: the frozen-feature cache fills, the allocator settles) and reports samples/s, supervised
targets/s, and the FLOP/s it achieved: the FLOPs of one training step (forward + backward of the trainable path,
counted by torch's FlopCounterMode on a real batch) times the steps per second, as a fraction of the machine's
peak, measured in the same run as the best of several large square matmuls at the same precision and thread count.
`--quality` also trains recipes for their full budgets in fp32 and in bf16 and compares their held-out figures and
wall times (`--quality-recipes`: by default vlm, flamingo and 600 steps of the zoo LM; also clip and blip2). Results
are printed and written as a markdown table (default: runs/train_step.md; the committed tables are
benchmarks/train_step.md and benchmarks/train_step_clip_blip2.md, each written with the command it records).
"""
import argparse
import contextlib
import io
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmbridge_ref.core import autocast  # noqa: E402
from mmbridge_ref.train.config import load_config  # noqa: E402
from mmbridge_ref.train.loop import build_task, fit, set_trainable  # noqa: E402

RECIPES = {  # name -> (config, overrides that keep one step representative and the run short)
    "vlm (mlp × prefix)": ("configs/vlm_tiny.yaml", ["data.eval_size=0"]),
    "vlm (resampler × xattn)": ("configs/vlm_tiny.yaml", ["data.eval_size=0", "model.bridge=resampler", "model.injection=xattn"]),
    "flamingo": ("configs/flamingo_tiny.yaml", ["data.eval_size=0"]),
    "blip2 stage 1": ("configs/blip2_tiny.yaml", ["data.eval_size=0", "stages.1.steps=0"]),
    "blip2 stage 2": ("configs/blip2_tiny.yaml", ["data.eval_size=0", "stages.0.steps=0"]),
    "clip": ("configs/clip_tiny.yaml", ["data.eval_size=16"]),
    "zoo LM pretraining": ("configs/zoo_lm.yaml", ["data.eval_batches=1"]),
}
PRECISIONS = ("fp32", "bf16")


def matmul_peak(dtype, threads, n=1024, reps=5):
    "Best FLOP/s of an n×n by n×n matmul: what this machine can do at this precision and thread count."
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2): a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0


def _cfg(config, extra, precision, steps, threads, run_dir):
    stage_steps = [f"stages.{i}.steps={steps}" for i in range(len(load_config(ROOT / config).stages))]
    sets = [*extra, f"train.precision={precision}", f"train.threads={threads}", "train.eval_every=0", "train.ckpt_every=0",
            "train.log_every=1000", f"train.run_dir={run_dir}/{{name}}"]
    cfg = load_config(ROOT / config, sets)
    live = [i for i, s in enumerate(cfg.stages) if s.steps]  # the stage this row measures (blip2 zeroes the other)
    return load_config(ROOT / config, sets + [f"stages.{live[0]}.steps={steps}"] + [f"stages.{i}.steps=0" for i in range(len(cfg.stages)) if i != live[0]]), live[0]


def step_flops(cfg, stage):
    "FLOPs of one training step: forward and backward of a real batch with the stage's parameters trainable."
    task = build_task(cfg)
    set_trainable(task.model, cfg.stages[stage].trainable)
    start = sum(s.steps for s in cfg.stages[:stage])
    batch = task.batch(start)
    with torch.no_grad(), autocast("cpu", cfg.train.precision): task.model(batch)  # fill the feature cache first
    with FlopCounterMode(display=False) as fc, autocast("cpu", cfg.train.precision):
        task.model(batch).float().backward()
    return fc.get_total_flops()


def speed(config, extra, precision, steps, threads):
    with tempfile.TemporaryDirectory() as d:
        cfg, stage = _cfg(config, extra, precision, steps, threads, d)
        with contextlib.redirect_stdout(io.StringIO()): res = fit(cfg, progress=False)
        rows = [r for r in res.history if r["loss"] is not None][5:]
        sps = statistics.median(r["samples_per_s"] for r in rows)
        tps = statistics.median(r["targets_per_s"] for r in rows)
        torch.set_num_threads(threads)
        flops = step_flops(cfg, stage)
    return {"samples_per_s": sps, "targets_per_s": tps, "step_flops": flops, "flop_per_s": flops * sps / cfg.train.batch_size}


def time_breakdown(config, extra, threads, steps=8):
    "Where one training step's time goes (fp32, torch.profiler): matmuls, attention, everything else, and the Python between ops."
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        cfg, stage = _cfg(config, extra, "fp32", steps + 3, threads, d)
        task = build_task(cfg)
        set_trainable(task.model, cfg.stages[stage].trainable)
        opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-4)
        start = sum(s.steps for s in cfg.stages[:stage])
        def step(i):
            b = task.batch(start + i)
            task.model(b).backward(); opt.step(); opt.zero_grad()
        for i in range(3): step(i)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(3, 3 + steps): step(i)
        wall = time.perf_counter() - t0
    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
              "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"), "optimizer": ("Optimizer.step",)}
    total = {k: 0.0 for k in (*groups, "other ops")}
    for e in prof.key_averages():
        if e.key.startswith(("ProfilerStep", "enumerate(DataLoader)")): continue
        k = next((g for g, names in groups.items() if e.key.startswith(names)), None)
        if k == "optimizer": total[k] += e.cpu_time_total / 1e6  # the whole step, its ops included
        elif k is not None: total[k] += e.self_cpu_time_total / 1e6
        elif not e.key.startswith("Optimizer"): total["other ops"] += e.self_cpu_time_total / 1e6
    ops = sum(v for k, v in total.items() if k != "optimizer")
    return {k: v / wall for k, v in total.items()} | {"python and data (not in any op)": max(0.0, 1 - ops / wall)}


QUALITY = {  # name -> (config, held-out figures to compare, overrides)
    "vlm (mlp × prefix)": ("configs/vlm_tiny.yaml", ("loss", "vqa_em", "vqa_mc", "caption_obj_precision"), []),
    "flamingo": ("configs/flamingo_tiny.yaml", ("fewshot_acc", "picture_acc", "clip_acc"), []),
    "zoo LM, 600 steps": ("configs/zoo_lm.yaml", ("loss", "acc"), ["stages.0.steps=600", "train.eval_every=0", "train.ckpt_every=0"]),
    "clip": ("configs/clip_tiny.yaml", ("i2t_r1", "t2i_r1", "colour_acc", "shape_acc"), []),
    "blip2 (stages 1 and 2)": ("configs/blip2_tiny.yaml", ("i2t_r1", "t2i_r1", "vqa_em", "caption_obj_precision"), []),
}
QUALITY_DEFAULT = ("vlm (mlp × prefix)", "flamingo", "zoo LM, 600 steps")


def quality(threads, names=QUALITY_DEFAULT):
    "Full-budget runs of each recipe in `names` in fp32 and bf16: their held-out figures and wall times side by side."
    if unknown := [n for n in names if n not in QUALITY]: raise ValueError(f"unknown recipes {unknown}: choose among {list(QUALITY)}")
    out = {}
    for name in names:
        config, keys, extra = QUALITY[name]
        for p in PRECISIONS:
            with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
                t0 = time.time()
                res = fit(load_config(ROOT / config, [*extra, f"train.precision={p}", f"train.threads={threads}", f"train.run_dir={d}/{{name}}"]), progress=False)
            out[(name, p)] = {k: res.metrics.get(k) for k in keys} | {"seconds": round(time.time() - t0)}
            print(f"{name:26} {p}: {out[(name, p)]}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="the tiny recipes run on one thread (train.threads: 1)")
    ap.add_argument("--quality", action="store_true", help="also compare held-out quality in fp32 and bf16 (full budgets, minutes)")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES), metavar="NAME", help="the recipes of the step-timing table (none: no table)")
    ap.add_argument("--quality-recipes", nargs="*", default=list(QUALITY_DEFAULT), choices=list(QUALITY), metavar="NAME",
                    help=f"the recipes --quality trains in full, among {list(QUALITY)}")
    ap.add_argument("--out", default=str(ROOT / "runs" / "train_step.md"))
    a = ap.parse_args(argv)
    peak = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16, a.threads) for p in PRECISIONS}
    results = {}
    for name in a.recipes:
        for p in PRECISIONS:
            results[(name, p)] = r = speed(*RECIPES[name], p, a.steps, a.threads)
            print(f"{name:26} {p}: {r['samples_per_s']:7.1f} samples/s {r['targets_per_s']:8.0f} targets/s "
                  f"{r['flop_per_s'] / 1e9:6.2f} GFLOP/s = {r['flop_per_s'] / peak[p]:.1%} of the {p} peak", flush=True)
    lines = [f"# Training speed of the tiny recipes, fp32 vs bf16 autocast, on the CPU", "",
             f"Command: `python benchmarks/train_step.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             f"Machine: {platform.machine()} CPU, torch {torch.__version__}, {a.threads} thread(s); {a.steps} steps per row, "
             f"the first 5 not counted; medians. The CPU may be shared: compare rows of one run.", "",
             f"Matmul peak measured in this run (best 1024² matmul): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
             f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s."]
    if a.recipes:
        lines += ["", "| recipe | precision | samples/s | targets/s | GFLOP per step | GFLOP/s | % of peak | bf16 / fp32 speed |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in a.recipes:
        for p in PRECISIONS:
            r = results[(name, p)]
            ratio = r["samples_per_s"] / results[(name, "fp32")]["samples_per_s"]
            lines.append(f"| {name} | {p} | {r['samples_per_s']:.1f} | {r['targets_per_s']:.0f} | {r['step_flops'] / 1e9:.2f} | "
                         f"{r['flop_per_s'] / 1e9:.2f} | {100 * r['flop_per_s'] / peak[p]:.1f} | {ratio:.2f} |")
    bd = time_breakdown(*RECIPES["vlm (mlp × prefix)"], a.threads)
    lines += ["", "Where the time of a `vlm (mlp × prefix)` step goes (fp32, torch.profiler over 8 steps, shares of wall time; the",
              "optimizer row includes its own ops):", "", "| part | share of the step |", "|---|---:|"]
    lines += [f"| {k} | {100 * v:.0f}% |" for k, v in bd.items()]
    if a.quality:
        q = quality(a.threads, a.quality_recipes)
        lines += ["", "Held-out quality after each recipe's full budget, fp32 vs bf16 autocast (same seed, batches and steps):", "",
                  "| recipe | precision | held-out figures | seconds | bf16 / fp32 speed |", "|---|---|---|---:|---:|"]
        for (name, p), v in q.items():
            figures = ", ".join(f"{k} {x:.3f}" if x is not None else f"{k} (not measured)" for k, x in v.items() if k != "seconds")
            lines.append(f"| {name} | {p} | {figures} | {v['seconds']} | {q[(name, 'fp32')]['seconds'] / v['seconds']:.2f} |")
        lines += ["", "The step medians of the small recipes move by tens of percent between runs on this CPU, bf16's most; the",
                  "recipes' `train.precision` defaults follow these whole runs (evaluation included) instead."]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
