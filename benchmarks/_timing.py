"""Timing helpers shared by the benchmark scripts: interleaved repetitions, and a markdown verdict against references."""
import platform
import statistics
import time

import torch


def bench(cases, reps, warmup=2):
    "cases: name -> zero-argument callable; returns name -> list of seconds."
    for fn in cases.values():
        for _ in range(warmup): fn()
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t0)
    return times


def machine_line(threads):
    import transformers
    return (f"Machine: {platform.machine()} CPU, torch {torch.__version__} with {threads} thread(s), transformers "
            f"{transformers.__version__}. The CPU was shared with other jobs: compare rows of one run, not runs.")


def result_rows(times, refs, ours):
    """The markdown table, and a verdict per row of ours against the fastest reference. The verdict uses the best
    (minimum) time: on a shared CPU the other jobs only ever add time, so the minimum is the least disturbed."""
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    fastest = min(refs, key=best.get)
    rows = ["| implementation | best ms | median ms | best / fastest reference |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {1e3 * best[k]:.1f} | {1e3 * med[k]:.1f} | {best[k] / best[fastest]:.2f} |" for k in times]
    rows.append("")
    for o in ours:
        r = best[o] / best[fastest]
        verdict = "level with (within 5%)" if abs(r - 1) < 0.05 else "faster than" if r < 1 else "SLOWER than"
        rows.append(f"- {o}: {verdict} the fastest reference ({fastest}): best {r:.2f}x, "
                    f"median {med[o] / min(med[x] for x in refs):.2f}x of the reference's.")
    return rows
