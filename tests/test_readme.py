"""README.md is generated from nbs/index.ipynb and must not drift from it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_matches_index_notebook():
    r = subprocess.run([sys.executable, "tools/make_readme.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_readme_has_the_two_quickstart_lines():
    text = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[dev]" && mmbridge train configs/' in text
    assert 'pip install -e ".[dev]" && pytest' in text
