"""The package is generated from the notebooks: exporting again must change nothing (nbdev#1190, #1324)."""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _export_into(tmp: Path) -> Path:
    for name in ("nbs", "mmbridge_ref"):
        shutil.copytree(ROOT / name, tmp / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    exe = Path(sys.executable).with_name("nbdev-export")
    subprocess.run([str(exe)], cwd=tmp, check=True, capture_output=True, text=True)
    return tmp / "mmbridge_ref"


def _py_files(d: Path):
    return sorted(p.relative_to(d) for p in d.rglob("*.py") if "__pycache__" not in p.parts)


def test_export_changes_nothing(tmp_path):
    fresh = _export_into(tmp_path)
    committed = ROOT / "mmbridge_ref"
    assert _py_files(fresh) == _py_files(committed), "modules differ: run nbdev-export and commit"
    stale = [str(p) for p in _py_files(fresh) if not filecmp.cmp(fresh / p, committed / p, shallow=False)]
    assert not stale, f"out of sync with the notebooks (run nbdev-export): {stale}"
