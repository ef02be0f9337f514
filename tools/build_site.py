"""Render the executed notebooks in nbs/ to a static site that opens offline: `python tools/build_site.py`.

nbconvert's HTML exporter (its JupyterLab template) renders each notebook as committed: nothing is re-executed, the
figures are the PNGs already embedded in the outputs, and the maths stays TeX for MathJax, copied into the site from
the `jupyter-server-mathjax` package (without that package the pages load MathJax from a CDN and need a network for
maths only). nbdev directives are honoured: `#| hide` cells are left out, `#| echo: false` hides a cell's input,
`#| output: false` its outputs, and directive lines are not shown. Links to `X.ipynb` point to `X.html`.

index.html is nbs/index.ipynb with a list of every notebook (title and one-line summary, in filename order, which is
the order of the notebook map) after its title; `--only` re-renders the pages named and the index, which still lists
every notebook. The nbdev / Quarto docs (`nbdev-docs`) stay the way to publish the docs online.

    python tools/build_site.py                         # every notebook -> _site/
    python tools/build_site.py --out /tmp/site --only 10_clip 05_vlm
"""
import argparse
import copy
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
from jinja2 import DictLoader
from nbconvert import HTMLExporter
from nbconvert.preprocessors import TagRemovePreprocessor

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
MATHJAX_CDN = "https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.7/latest.js?config=TeX-AMS_CHTML-full,Safe"
MATHJAX_LOCAL = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# The lab template, less what only works online: require.js (no output here needs it) and the widget manager from
# unpkg (a widget's text/plain fallback is shown instead). jupyter-server-mathjax ships STIX-Web fonts only, so MathJax
# is told to use them rather than its default TeX web fonts. Code blocks in markdown keep their lines (the ASCII
# diagrams) and get the background code cells have.
TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_css -%}
<style>
main { max-width: 1200px; margin: 0 auto; }
.jp-RenderedMarkdown pre { background: var(--jp-cell-editor-background); padding: 0.5em; overflow-x: auto; }
.jp-RenderedMarkdown pre, .jp-RenderedMarkdown pre code { white-space: pre; }
.jp-RenderedMarkdown pre code { background: none; }
</style>
{%- endblock html_head_css -%}
{%- block html_head_js_mathjax -%}
{%- if resources.mathjax_fonts %}
<script type="text/x-mathjax-config">
MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], imageFont: null, preferredFont: null, webFont: "STIX-Web"}});
</script>
{%- endif %}
{{ super() }}
{%- endblock html_head_js_mathjax -%}
"""

DIRECTIVE = re.compile(r"^\s*#\s?\|\s*(?P<name>[\w-]+)\s*:?\s*(?P<value>.*?)\s*$")
TAGS = {("hide", ""): "remove_cell", ("echo", "false"): "remove_input", ("output", "false"): "remove_output"}
IPYNB_LINK = re.compile(r"""(href=["'])(?![a-z][\w+.-]*:|/)([^"'#?]+?)\.ipynb(?=[#"'?])""")


def title_and_summary(nb) -> tuple[str, str]:
    "The first `# ` heading of a notebook and its `> ` summary, joined into one line (either may be empty)."
    for cell in nb.cells:
        if cell.cell_type != "markdown": continue
        title = re.search(r"^#\s+(.+?)\s*$", cell.source, re.M)
        if title:
            quote = re.search(r"^>.*(?:\n(?!\s*$).*)*", cell.source, re.M)  # the quote runs to the next blank line
            summary = " ".join(l.lstrip(">").strip() for l in quote.group(0).splitlines()) if quote else ""
            return title.group(1), summary
    return "", ""


def notebooks(nbs_dir: Path = NBS) -> list[Path]:
    "Every notebook of the site but the landing page, in the order of the notebook map (filename order)."
    return sorted(p for p in Path(nbs_dir).glob("*.ipynb") if p.stem != "index")


def _prepare(nb, nav: str):
    "A copy of `nb` as the site shows it: nbdev directives turned into nbconvert's tags, widgets as plain text."
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        lines = cell.source.splitlines()
        dirs = [m for m in map(DIRECTIVE.match, lines) if m]
        tags = {TAGS[k] for m in dirs if (k := (m["name"], m["value"].lower())) in TAGS}
        code = [l for l in lines if not DIRECTIVE.match(l)]
        if not "".join(code).strip(): tags.add("remove_cell")  # nothing but directives (`#| default_exp`)
        cell.source = "\n".join(code).strip("\n")
        cell.metadata["tags"] = sorted(set(cell.metadata.get("tags", [])) | tags)
        for out in cell.get("outputs", []):
            out.get("data", {}).pop(WIDGET_VIEW, None)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(nav))
    nb.metadata.pop("widgets", None)
    title = title_and_summary(nb)[0]
    if title: nb.metadata["title"] = title
    return nb


def _exporter(mathjax_url: str) -> HTMLExporter:
    exp = HTMLExporter(extra_loaders=[DictLoader({"site.html.j2": TEMPLATE})], template_file="site.html.j2",
                       mathjax_url=mathjax_url, exclude_anchor_links=True,
                       exclude_input_prompt=True, exclude_output_prompt=True)  # committed without execution counts
    exp.register_preprocessor(TagRemovePreprocessor(remove_cell_tags={"remove_cell"}, remove_input_tags={"remove_input"},
                                                    remove_all_outputs_tags={"remove_output"}), enabled=True)
    return exp


def render(nb, exporter: HTMLExporter, nav: str = "", name: str = "notebook") -> str:
    "The HTML page of one executed notebook (not re-executed), its links to notebooks pointing to their pages."
    html, _ = exporter.from_notebook_node(_prepare(nb, nav), resources={
        "metadata": {"name": name}, "mathjax_fonts": exporter.mathjax_url == MATHJAX_LOCAL})
    return IPYNB_LINK.sub(r"\1\2.html", html)


def _copy_mathjax(out: Path, log=print) -> str:
    "Put MathJax beside the pages and return the URL the pages load it from (the CDN when it is not installed)."
    try:
        import jupyter_server_mathjax
    except ImportError:
        log("jupyter-server-mathjax is not installed: maths will load MathJax from a CDN (pip install -e '.[dev]')")
        return MATHJAX_CDN
    src = Path(jupyter_server_mathjax.__file__).parent / "static"
    shutil.copytree(src, out / "mathjax", dirs_exist_ok=True)
    return MATHJAX_LOCAL


def _md(text: str) -> str:
    "Markdown on one line, as a list item needs it."
    return " ".join(text.split())


def _contents(pages: list[tuple[str, str, str]]) -> str:
    "The markdown list of the notebooks: a link per page, with its one-line summary."
    items = [f"- [{_md(title) or stem}]({stem}.html) · `{stem}`" + (f"  \n  {_md(summary)}" if summary else "")
             for stem, title, summary in pages]
    return "## The notebooks\n\n" + "\n".join(items)


def _nav(pages: list[tuple[str, str, str]], i: int) -> str:
    prev = f"[← {pages[i - 1][0]}]({pages[i - 1][0]}.html) · " if i > 0 else ""
    nxt = f" · [{pages[i + 1][0]} →]({pages[i + 1][0]}.html)" if i + 1 < len(pages) else ""
    return f"{prev}[contents](index.html){nxt}"


def _landing(nbs_dir: Path, pages: list[tuple[str, str, str]]):
    "nbs/index.ipynb with the list of notebooks after its title cell (a title cell alone when there is no index)."
    path = Path(nbs_dir) / "index.ipynb"
    nb = nbformat.read(path, as_version=4) if path.exists() else nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# mmbridge_ref\n> The notebooks, rendered.")])
    at = next((i + 1 for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and re.search(r"^#\s", c.source, re.M)), 0)
    nb.cells.insert(at, nbformat.v4.new_markdown_cell(_contents(pages)))
    return nb


def build_site(out: Path = ROOT / "_site", only=None, nbs_dir: Path = NBS, log=print) -> list[Path]:
    "Write one HTML page per executed notebook of `nbs_dir` (or the `only` ones) and index.html under `out`."
    nbs_dir, out = Path(nbs_dir), Path(out)
    paths = notebooks(nbs_dir)
    stems = [p.stem for p in paths]
    wanted = [Path(n).stem for n in only] if only else stems
    unknown = [n for n in wanted if n not in stems and n != "index"]
    if unknown: raise ValueError(f"only={unknown} names no notebook in {nbs_dir.name}/ (known: {', '.join(stems)})")
    out.mkdir(parents=True, exist_ok=True)
    exporter = _exporter(_copy_mathjax(out, log))
    loaded = {p.stem: nbformat.read(p, as_version=4) for p in paths}
    pages = [(stem, *title_and_summary(nb)) for stem, nb in loaded.items()]
    todo = [i for i, stem in enumerate(stems) if stem in wanted]
    written = []
    for k, i in enumerate(todo, 1):
        t0, stem = time.time(), stems[i]
        target = out / f"{stem}.html"
        target.write_text(render(loaded[stem], exporter, nav=_nav(pages, i), name=stem), encoding="utf-8")
        written.append(target)
        log(f"[{k:>2}/{len(todo)}] {stem}.ipynb -> {target.name} ({target.stat().st_size // 1024} KB, {time.time() - t0:.1f} s)")
    index = out / "index.html"
    index.write_text(render(_landing(nbs_dir, pages), exporter, name="index"), encoding="utf-8")
    log(f"index.html lists {len(pages)} notebooks; open {index.name} in {out.name}/ with any browser")
    return written + [index]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "_site", help="folder to write the site to (default: _site/)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="render only these notebooks (e.g. 10_clip 05_vlm.ipynb)")
    args = ap.parse_args(argv)
    try:
        build_site(args.out, args.only)
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
