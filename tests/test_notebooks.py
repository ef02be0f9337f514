"""Every notebook runs top to bottom through nbdev's own executor, honouring `tst_flags` (cells flagged `slow` are skipped).

Each notebook runs in a process of its own, as `nbdev-test` runs them: a notebook's `#| export` cells redefine the
package's classes and re-register its tasks, which must not leak into the other tests of this session."""
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nbdev.config import get_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("[0-9]*.ipynb")) + [ROOT / "nbs" / "index.ipynb"]
RUN = """import sys
from pathlib import Path
from nbdev.test import test_nb
ok, secs = test_nb(Path(sys.argv[1]), skip_flags=sys.argv[2].split(), basepath=Path(sys.argv[3]), showerr=True)
print(f"{Path(sys.argv[1]).name}: {secs:.1f} s")
sys.exit(0 if ok else 1)
"""


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb):
    flags = get_config(ROOT).tst_flags
    skip = flags.split() if isinstance(flags, str) else list(flags)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN, str(nb), " ".join(skip), str(ROOT)], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200, env={**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"})
    print(r.stdout[-2000:])
    assert r.returncode == 0, f"{nb.name} failed:\n{r.stderr[-10000:]}"
    if out := os.environ.get("MMBRIDGE_NOTEBOOK_TIMES"):  # record "Run All" times as tools/time_notebooks.py does
        _record_time(Path(out), nb.stem, time.perf_counter() - t0)


def _record_time(path, name, secs):
    record = json.loads(path.read_text()) if path.exists() else {}
    record.setdefault("seconds", {})[name] = round(secs, 1)
    record |= {"machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU",
               "what": "seconds for Run All, in a fresh process (imports included), slow cells skipped"}
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
