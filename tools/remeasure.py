"""Re-measure every committed results table that was trained into the zoo LM, after `mmbridge zoo build --only lm`.

    python tools/remeasure.py --list              # what would run
    python tools/remeasure.py [--lanes 2] [NAME ...]

Each table's command is the one its JSON (or markdown) records; the commands rewrite the committed files under
data_samples/results/ and benchmarks/, so this is an explicit call, never part of the tests. The tables run in
`--lanes` processes of one thread each (on a 2-core CPU two one-thread lanes finish sooner than one two-thread
lane). Each job's output goes to runs/remeasure/NAME.log. The tables that do not depend on the zoo LM (CLIP,
the Q-Former's stage-1-only long run) are not in the list.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = "from mmbridge_ref.recipes"
LONG = "{k: VARIANTS[k] for k in ('moe top-2 + balancing', 'dense')}"
# job -> (the commands it runs in order, paths cleared first so that nothing trained into the old LM is reused)
JOBS = {
    "prefix_probe": ([f"{PY}.zoo import probe_contrast; probe_contrast(out='data_samples/results/prefix_probe.json')"], []),
    "vlm_pairs": ([f"{PY}.vlm import pair_table; pair_table(out='data_samples/results/vlm_pairs.json')"], []),
    "flamingo": ([f"{PY}.flamingo import flamingo_ablation; flamingo_ablation(out='data_samples/results/flamingo.json')"], []),
    "qformer": ([f"{PY}.blip2 import qformer_measurements; qformer_measurements(out='data_samples/results/qformer.json')"], []),
    "llava": ([f"{PY}.llava import llava_measurements; llava_measurements(extra=['train.threads=1'], out='data_samples/results/llava.json')",
               f"{PY}.llava import *; llava_measurements(rows=YIVL_ROWS, extra=['train.threads=1'], out='data_samples/results/llava_yivl.json')"], []),
    "moe": ([f"{PY}.moe import moe_measurements; moe_measurements(extra=['train.threads=1'], out='data_samples/results/moe_llava.json')",
             f"{PY}.moe import moe_measurements, VARIANTS; moe_measurements(variants={LONG}, extra=['train.threads=1', 'stages.2.steps=300'], "
             "out='data_samples/results/moe_llava_long.json')"], ["runs/moe_llava"]),  # the long run resumes the stage-II checkpoints
    "high_res": (["-m mmbridge_ref.recipes.high_res --out data_samples/results/high_res.json",
                  "-m mmbridge_ref.recipes.high_res --out data_samples/results/high_res.json --set stages.0.steps=600 --methods anyres "
                  "'base resolution' 'interpolated positions' 'monkey, per-tile LoRA' 'monkey, shared LoRA' uhd"],
                 ["data_samples/results/high_res.json"]),  # high_res_table skips the runs its JSON already holds
    "seed_noise": (["benchmarks/seed_noise.py --seeds 1 2 --out benchmarks/seed_noise.md"], ["runs/noise"]),
}


def to_argv(cmd:str)->list[str]:
    "A recorded command as the argv that runs it."
    return [sys.executable, *shlex.split(cmd)] if cmd.startswith("-m ") or cmd.endswith(".md") else [sys.executable, "-c", cmd]


def run(name:str, logs:Path)->tuple[str, int]:
    "Run one job's commands in order on one thread; (name, exit code)."
    t0, log, (cmds, clear) = time.time(), logs / f"{name}.log", JOBS[name]
    for c in clear: subprocess.run(["rm", "-rf", str(ROOT / c)], check=True)
    env, rc = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, 0
    with open(log, "w") as f:
        for cmd in cmds:
            if rc == 0: rc = subprocess.run(to_argv(cmd), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"{name}: {'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return name, rc


def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help=f"jobs to run (default: all of {', '.join(JOBS)})")
    p.add_argument("--lanes", type=int, default=2, help="processes side by side, one thread each")
    p.add_argument("--list", action="store_true", help="print the tables and their commands, run nothing")
    a = p.parse_args(argv)
    if bad := [n for n in a.names if n not in JOBS]: p.error(f"unknown job(s) {bad}; known: {', '.join(JOBS)}")
    names = a.names or list(JOBS)
    if a.list:
        for n in names: print(f"{n}  (clears {', '.join(JOBS[n][1]) or 'nothing'})" + "".join(f"\n    python {shlex.join(to_argv(c)[1:])}" for c in JOBS[n][0]))
        return 0
    logs = ROOT / "runs" / "remeasure"; logs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(a.lanes) as pool: results = list(pool.map(lambda n: run(n, logs), names))
    return max(rc for _, rc in results)


if __name__ == "__main__": sys.exit(main())
