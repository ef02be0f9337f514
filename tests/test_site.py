"""tools/build_site.py renders executed notebooks to pages that open offline: title, embedded figures, maths kept as
TeX for a local MathJax, no machine paths, links between notebooks pointing to pages, and an index listing them.

Two notebooks, copied to a tmp folder (one gains a cell with a link and maths), are rendered once; the build takes a
few seconds and is held to well under 30 s."""
import html
import importlib.util
import json
import re
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_site", ROOT / "tools" / "build_site.py")
build_site = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_site)

NBS = ["03_projectors", "10_clip"]
EXTRA = ("## Where next\n\nThe contrastive loss that made the frozen encoder is in [CLIP](10_clip.ipynb#See-it):\n\n"
         "$$\\mathcal{L} = -\\frac{1}{b}\\sum_i \\log p_{ii}, \\qquad x_i < y_j$$")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("nbs"), tmp_path_factory.mktemp("site")
    for name in NBS: shutil.copy(ROOT / "nbs" / f"{name}.ipynb", src)
    nb = json.loads((src / "03_projectors.ipynb").read_text())
    nb["cells"].append({"cell_type": "markdown", "id": "deadbeef", "metadata": {}, "source": EXTRA})
    (src / "03_projectors.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False))
    lines, t0 = [], time.time()
    written = build_site.build_site(out, nbs_dir=src, log=lines.append)
    pages = {p.stem: p.read_text(encoding="utf-8") for p in written}
    return dict(out=out, src=src, pages=pages, lines=lines, secs=time.time() - t0)


def test_build_is_quick_and_reports_each_notebook(site):
    assert site["secs"] < 30, f"the site of two notebooks took {site['secs']:.1f} s"
    assert sorted(site["pages"]) == ["03_projectors", "10_clip", "index"]
    assert [l.split("]")[0] for l in site["lines"][:2]] == ["[ 1/2", "[ 2/2"]
    assert "03_projectors.ipynb -> 03_projectors.html" in site["lines"][0]


def test_page_has_title_and_embedded_figure(site):
    page = site["pages"]["10_clip"]
    assert "<title>CLIP and SigLIP: contrastive alignment</title>" in page
    assert re.search(r"<h1[^>]*>CLIP and SigLIP: contrastive alignment", page)
    for name in NBS:
        assert re.search(r'<img [^>]*src="data:image/png;base64,', site["pages"][name]), name


def test_maths_stays_tex_for_a_local_mathjax(site):
    page = site["pages"]["03_projectors"]
    assert r"H_v = W_2\,\mathrm{GELU}(W_1 Z_v)" in page  # from the notebook itself
    assert html.escape(r"$$\mathcal{L} = -\frac{1}{b}\sum_i \log p_{ii}, \qquad x_i < y_j$$", quote=False) in page
    if importlib.util.find_spec("jupyter_server_mathjax") is None:
        pytest.skip("jupyter-server-mathjax not installed: the pages use the CDN")
    assert '<script src="mathjax/MathJax.js?config=' in page
    assert (site["out"] / "mathjax" / "MathJax.js").exists()
    for name, text in site["pages"].items():
        assert not re.search(r"<script[^>]+src=[\"']https?:", text), f"{name}.html loads a script from the network"


def test_no_machine_paths_and_no_directives(site):
    for name, text in site["pages"].items():
        for leak in ("/work/", "/tmp/", "site-packages", str(site["src"]), str(site["out"])):
            assert leak not in text, f"{name}.html shows {leak}"
    for name in NBS:
        assert "#| export" not in site["pages"][name] and "#| hide" not in site["pages"][name], name
    assert "from fastcore.test import" not in site["pages"]["10_clip"]  # a `#| hide` cell


def test_links_between_notebooks_point_to_pages(site):
    page = site["pages"]["03_projectors"]
    assert 'href="10_clip.html#See-it"' in page
    assert not re.search(r"href=\"[^\"]*\.ipynb", page)
    assert 'href="index.html"' in page and 'href="10_clip.html"' in page  # the navigation line


def test_index_lists_the_notebooks_with_title_and_summary(site):
    index = site["pages"]["index"]
    at = [index.index('href="03_projectors.html"'), index.index('href="10_clip.html"')]
    assert at == sorted(at)  # filename order, the order of the notebook map
    assert "Projectors: the simplest bridges" in index and "CLIP and SigLIP: contrastive alignment" in index
    assert "Pull each image towards its own caption" in index


def test_unknown_notebook_is_named(tmp_path):
    with pytest.raises(ValueError, match="99_nothing"):
        build_site.build_site(tmp_path, only=["99_nothing"], log=lambda s: None)
