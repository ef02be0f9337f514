"""Write README.md from nbs/index.ipynb (Quarto, which `nbdev-readme` needs, cannot be installed offline).

Markdown cells are copied as they are; visible code cells become ```python blocks followed by their text output,
and each PNG a cell shows is written to docs/images/readme_N.png and linked in place of its `<Figure ...>` text.
`python tools/make_readme.py --check` exits 1 when README.md or one of those images is stale.
"""
import base64
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
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
        elif "data" in o and "text/plain" in o["data"] and "image/png" not in o["data"]:
            out.append("".join(o["data"]["text/plain"]))
    return "".join(out).rstrip()


def _markdown_output(cell) -> bool:
    return any("text/markdown" in o.get("data", {}) for o in cell.get("outputs", []))


def _images(cell) -> list[bytes]:
    return [base64.b64decode("".join(o["data"]["image/png"])) for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


def render(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> tuple[str, dict[str, bytes]]:
    "The README's text, and the images it links (path relative to the repository -> PNG bytes)."
    nb = json.loads(nb_path.read_text())
    parts, images = [], {}
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
        if code and not any(l.replace(" ", "") == "#|echo:false" for l in lines):  # echo: false shows the output only
            parts.append(f"```python\n{code}\n```")
        out = _text_output(cell)
        if out:
            parts.append(out if _markdown_output(cell) else f"```\n{out}\n```")
        for png in _images(cell):
            path = f"docs/images/readme_{len(images)}.png"
            images[path] = png
            parts.append(f"![output of the cell above]({path})")
    return HEADER + "\n\n".join(parts) + "\n", images


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    (text, images), readme = render(), ROOT / "README.md"
    if "--check" in argv:
        stale = [str(p) for p, png in images.items() if not (ROOT / p).is_file() or (ROOT / p).read_bytes() != png]
        if not readme.exists() or readme.read_text() != text or stale:
            print(f"README.md is stale{' (images: ' + ', '.join(stale) + ')' if stale else ''}: run `python tools/make_readme.py`", file=sys.stderr)
            return 1
        return 0
    IMAGES.mkdir(parents=True, exist_ok=True)
    for old in IMAGES.glob("readme_*.png"):
        if f"docs/images/{old.name}" not in images: old.unlink()
    for p, png in images.items(): (ROOT / p).write_bytes(png)
    readme.write_text(text)
    print(f"wrote {readme} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
