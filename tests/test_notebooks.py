"""Every notebook runs top to bottom through nbdev's own executor, honouring `tst_flags` (cells flagged `slow` are skipped)."""
import os
from pathlib import Path

import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_nb  # renamed so pytest does not collect it

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("[0-9]*.ipynb")) + [ROOT / "nbs" / "index.ipynb"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    flags = get_config(ROOT).tst_flags
    skip = flags.split() if isinstance(flags, str) else list(flags)
    ok, secs = run_nb(nb, skip_flags=skip, basepath=ROOT, showerr=True)
    print(f"{nb.name}: {secs:.1f} s")
    assert ok, f"{nb.name} failed (traceback above)"
