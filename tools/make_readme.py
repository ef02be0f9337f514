"""Write README.md from nbs/index.ipynb (Quarto, which `nbdev-readme` needs, cannot be installed offline).

Markdown cells are copied as they are; visible code cells become ```python blocks followed by their text output.
`python tools/make_readme.py --check` exits 1 when README.md is stale.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py; edit the notebook, not this file. -->\n\n"


def _src(cell) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


def _text_output(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append("".join(o["text"]))
        elif "data" in o and "text/markdown" in o["data"]:
            out.append("".join(o["data"]["text/markdown"]))
        elif "data" in o and "text/plain" in o["data"]:
            out.append("".join(o["data"]["text/plain"]))
    return "".join(out).rstrip()


def render(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> str:
    nb = json.loads(nb_path.read_text())
    parts = []
    for cell in nb["cells"]:
        src = _src(cell).strip()
        if not src:
            continue
        if cell["cell_type"] == "markdown":
            parts.append(src)
            continue
        lines = src.splitlines()
        if any(l.strip() in ("#| hide", "#|hide") for l in lines):
            continue
        code = "\n".join(l for l in lines if not l.startswith("#|")).strip()
        if code:
            parts.append(f"```python\n{code}\n```")
        out = _text_output(cell)
        if out:
            parts.append(f"```\n{out}\n```")
    return HEADER + "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text, readme = render(), ROOT / "README.md"
    if "--check" in argv:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is stale: run `python tools/make_readme.py`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    print(f"wrote {readme} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
