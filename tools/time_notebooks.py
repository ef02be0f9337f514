"""Time "Run All" of every notebook as the tests run them (nbdev's executor, `slow` cells skipped, one process each).

    python tools/time_notebooks.py                 # all notebooks -> docs/notebook_times.json
    python tools/time_notebooks.py 40_llava 80_train   # only these (the others keep their recorded times)

The README's table (nbs/index.ipynb) reads docs/notebook_times.json. Times depend on the machine: record them on an
idle one, and say which (the file keeps `machine`).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "notebook_times.json"
RUN = """import sys
from pathlib import Path
from nbdev.config import get_config
from nbdev.test import test_nb
flags = get_config().tst_flags
skip = flags.split() if isinstance(flags, str) else list(flags)
ok, secs = test_nb(Path(sys.argv[1]), skip_flags=skip, basepath=Path(sys.argv[2]), showerr=True)
sys.exit(0 if ok else 1)
"""


def notebooks(names=()):
    nbs = sorted((ROOT / "nbs").glob("[0-9]*.ipynb")) + [ROOT / "nbs" / "index.ipynb"]
    return [p for p in nbs if not names or p.stem in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="notebook names without .ipynb (default: all)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    times = record.get("seconds", {})
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    for nb in notebooks(args.names):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", RUN, str(nb), str(ROOT)], cwd=ROOT, env=env, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if r.returncode != 0:
            print(f"{nb.stem}: FAILED\n{r.stderr[-3000:]}", file=sys.stderr)
            return 1
        times[nb.stem] = round(secs, 1)
        print(f"{nb.stem:<24} {secs:6.1f} s", flush=True)
        record = {"machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU",
                  "what": "seconds for Run All, in a fresh process (imports included), slow cells skipped", "seconds": times}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
