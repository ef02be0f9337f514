"""Is bf16 autocast's effect on the vlm recipe's held-out figures within the seed noise? The recipe (configs/vlm_tiny.yaml,
mlp x prefix) at full budget for each seed, in fp32 and in bf16; per-precision mean and spread, and the difference.

    python benchmarks/seed_noise.py [--seeds 1 2] [--root runs/noise] [--out benchmarks/seed_noise.md]

Each run is `mmbridge train configs/vlm_tiny.yaml --set train.seed=S --set train.precision=P` into ROOT/noise_P_sS. A run
directory that already holds that finished run (same seed and precision in its config.yaml) is read, not trained again."""
import argparse
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmbridge_ref.train.config import load_config  # noqa: E402
from mmbridge_ref.train.loop import fit, read_csv  # noqa: E402

METRICS = ("vqa_em", "vqa_mc", "caption_obj_precision", "caption_obj_recall", "loss")


def finished(run_dir: Path, seed: int, precision: str) -> dict | None:
    "The final held-out figures of a finished run with this seed and precision, or None."
    cfg_path, csv_path = run_dir / "config.yaml", run_dir / "metrics.csv"
    if not (cfg_path.exists() and csv_path.exists() and (run_dir / "checkpoint.pt").exists()): return None
    cfg = yaml.safe_load(cfg_path.read_text())
    if cfg["train"]["seed"] != seed or cfg["train"]["precision"] != precision: return None
    rows = read_csv(csv_path)
    if not rows or rows[-1]["step"] != sum(s["steps"] for s in cfg["stages"]) or rows[-1].get("eval_vqa_em") is None: return None
    return {m: rows[-1][f"eval_{m}"] for m in METRICS}


def run(seed: int, precision: str, root: Path) -> tuple[dict, bool]:
    d = root / f"noise_{precision}_s{seed}"
    if (got := finished(d, seed, precision)) is not None: return got, False
    res = fit(load_config(ROOT / "configs" / "vlm_tiny.yaml", [f"train.seed={seed}", f"train.precision={precision}", "train.threads=1",
                                                             f"name=noise_{precision}_s{seed}", f"train.run_dir={root}/{{name}}"]), progress=False)
    return {m: res.metrics[m] for m in METRICS}, True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--root", default="runs/noise")
    ap.add_argument("--out", default=None, help="write the markdown table here (default: print only)")
    a = ap.parse_args(argv)
    root, rows, lines = Path(a.root), {}, []
    for p in ("fp32", "bf16"):
        for s in a.seeds:
            rows[p, s], trained = run(s, p, root)
            print(f"{p} seed {s}: " + ", ".join(f"{m} {rows[p, s][m]:.3f}" for m in METRICS) + (" (trained)" if trained else " (read from its run)"))
    cmd = "python benchmarks/seed_noise.py --seeds " + " ".join(map(str, a.seeds)) + (f" --out {a.out}" if a.out else "")
    lines += ["# Seed noise of the vlm recipe vs the bf16 effect", "", f"Command: `{cmd}` (configs/vlm_tiny.yaml, mlp x prefix, "
              "300 steps, 128 held-out questions and captions, one thread).", "",
              "| precision | seed | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    lines += [f"| {p} | {s} | " + " | ".join(f"{rows[p, s][m]:.3f}" for m in METRICS) + " |" for (p, s) in rows]
    lines += ["", "| | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    stats = {}
    for p in ("fp32", "bf16"):
        vals = {m: [rows[p, s][m] for s in a.seeds] for m in METRICS}
        stats[p] = {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else float("nan")) for m, v in vals.items()}
        lines.append(f"| {p}: mean ± sd over seeds | " + " | ".join(f"{mu:.3f} ± {sd:.3f}" for mu, sd in stats[p].values()) + " |")
    lines.append("| bf16 − fp32 (means) | " + " | ".join(f"{stats['bf16'][m][0] - stats['fp32'][m][0]:+.3f}" for m in METRICS) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out: Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
