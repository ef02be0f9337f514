"""What a reader sees on opening a committed notebook: Jupyter starts its kernel without asking which one, no output
shows a path of the machine that ran it, and no output is a warning or an error.

`python ../shared/tools/check_notebooks.py` checks figures, a narrower set of paths and that some kernelspec exists;
these tests are the pytest side, with the kernelspec Jupyter needs to open a notebook without asking (the kernel's
name and language; nbdev-clean sets display_name to the name, which Jupyter accepts), machine paths in error tracebacks too, and warnings. Cell numbers in the
messages count every cell from 0, as `nb["cells"][i]`."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
KERNELSPEC = {"language": "python", "name": "python3"}  # display_name: any (nbdev-clean writes "python3")
MACHINE_PATH = re.compile(r"/work/|/tmp/|/home/|/root/|site-packages")
WARNING = re.compile(r"\w*Warning\b")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _text(x) -> str:
    return "".join(x) if isinstance(x, list) else str(x)


def outputs(nb: dict):
    "(cell index, output) for every output of every code cell."
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            yield i, out


def shown_text(out: dict) -> str:
    "What an output shows as text: a stream, any text/* representation, or an error's name, value and traceback."
    if out["output_type"] == "stream": return _text(out.get("text", ""))
    if out["output_type"] == "error":
        return ANSI.sub("", "\n".join([f"{out.get('ename')}: {out.get('evalue')}", *out.get("traceback", [])]))
    return "\n".join(_text(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))


def _excerpt(text: str, m: re.Match, width: int = 70) -> str:
    return " ".join(text[max(0, m.start() - width): m.end() + width].split())


def machine_paths(nb: dict) -> list[str]:
    "One line per output that shows a machine path: cell, output type and the text around the path."
    found = []
    for i, out in outputs(nb):
        text = shown_text(out)
        if m := MACHINE_PATH.search(text):
            found.append(f"cell {i} ({out['output_type']}): ...{_excerpt(text, m)}...")
    return found


def warnings_and_errors(nb: dict) -> list[str]:
    "One line per output that is an error, or a stderr stream that carries a warning."
    found = []
    for i, out in outputs(nb):
        if out["output_type"] == "error":
            found.append(f"cell {i} (error): {out.get('ename')}: {' '.join(str(out.get('evalue', '')).split())[:140]}")
        elif out["output_type"] == "stream" and out.get("name") == "stderr":
            text = _text(out.get("text", ""))
            if m := WARNING.search(text):
                found.append(f"cell {i} (stderr): ...{_excerpt(text, m, 100)}...")
    return found


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_kernelspec_opens_without_asking(path):
    got = _load(path).get("metadata", {}).get("kernelspec") or {}
    assert {k: got.get(k) for k in KERNELSPEC} == KERNELSPEC and got.get("display_name"), f"{path.name}: kernelspec {got}: Jupyter would ask which kernel to use"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_output_shows_a_machine_path(path):
    found = machine_paths(_load(path))
    assert not found, f"{path.name}: print relative paths\n" + "\n".join(found)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_output_is_a_warning_or_an_error(path):
    found = warnings_and_errors(_load(path))
    assert not found, f"{path.name}:\n" + "\n".join(found)


def test_the_checks_catch_what_they_guard():
    def cell(*outs): return {"cell_type": "code", "source": "", "metadata": {}, "outputs": list(outs)}
    nb = {"cells": [
        {"cell_type": "markdown", "source": "/work/main in prose is not an output", "metadata": {}},
        cell({"output_type": "stream", "name": "stdout", "text": ["saved to runs/x\n"]}),
        cell({"output_type": "stream", "name": "stderr", "text": ["TqdmWarning: IProgress not found. Please update\n"]}),
        cell({"output_type": "error", "ename": "ValueError", "evalue": "bad",
              "traceback": ["\x1b[0;31mFile \x1b[0;32m/root/.venv/lib/python3.11/site-packages/x.py:3\x1b[0m"]}),
        cell({"output_type": "execute_result", "execution_count": None, "metadata": {},
              "data": {"text/plain": ["PosixPath('/tmp/tmpab12/run')"], "image/png": "iVBOR/tmp/"}}),
    ]}
    assert [l.split(" (")[0] for l in machine_paths(nb)] == ["cell 3", "cell 4"]
    assert "/root/.venv" in machine_paths(nb)[0]
    assert [l.split(" (")[0] for l in warnings_and_errors(nb)] == ["cell 2", "cell 3"]
    assert "TqdmWarning: IProgress not found" in warnings_and_errors(nb)[0]
    assert machine_paths({"cells": nb["cells"][:3]}) == [] and warnings_and_errors({"cells": nb["cells"][:2]}) == []


def test_ipywidgets_is_a_dev_dependency_and_imports():
    dev = re.search(r"^dev = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)  # tomllib is 3.11+
    assert dev and re.search(r"^\s*\"ipywidgets\b", dev.group(1), re.M), "tqdm's notebook bars need ipywidgets in dev"
    assert importlib.util.find_spec("ipywidgets") is not None, "pip install -e '.[dev]' (ipywidgets is missing)"
