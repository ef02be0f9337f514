"""The package's layout keeps its promises (ARCHITECTURE.md): no import cycles, function-level imports included;
`core` imports nothing of the package; bridges/ and inject/ import only core and each other; backbones/ imports no
recipe and no engine; vlm.py imports parts, never the engine; nothing but recipes/ and the CLI imports a recipe."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mmbridge_ref"


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        if p.name == "_modidx.py": continue
        parts = ("mmbridge_ref", *p.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODS = _modules()


def imports(name: str) -> set[str]:
    "Every package module `name` imports, at any depth of its code (function bodies included)."
    p, pkg = MODS[name], name if MODS[name].name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in MODS else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in MODS and m != name and m != "mmbridge_ref"}


GRAPH = {m: imports(m) for m in MODS}


def _area(m: str) -> str:
    parts = m.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_walk_sees_function_level_imports():
    assert "mmbridge_ref.train.loop" in GRAPH["mmbridge_ref.recipes.vlm"]
    assert "mmbridge_ref.bridges.projectors" in GRAPH["mmbridge_ref.bridges.resampler"]


def test_no_import_cycles():
    seen, stack, cycles = {}, [], []
    def visit(m):
        seen[m] = "open"; stack.append(m)
        for n in sorted(GRAPH[m]):
            if seen.get(n) == "open": cycles.append(stack[stack.index(n):] + [n])
            elif n not in seen: visit(n)
        stack.pop(); seen[m] = "done"
    for m in sorted(GRAPH):
        if m not in seen: visit(m)
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_the_layering_rule():
    bad = []
    for m, targets in GRAPH.items():
        a = _area(m)
        for t in targets:
            b = _area(t)
            if a == "core": bad.append((m, t))
            if a in ("bridges", "inject") and b not in ("core", "bridges", "inject"): bad.append((m, t))
            if a == "backbones" and b in ("train", "recipes", "cli", "vlm"): bad.append((m, t))
            if a == "vlm" and (b in ("recipes", "cli") or t == "mmbridge_ref.train.loop"): bad.append((m, t))
            if b == "recipes" and a not in ("recipes", "cli"): bad.append((m, t))
    assert not bad, f"imports against ARCHITECTURE.md's rule: {bad}"


def test_the_axes_are_subpackages():
    for d in ("data", "backbones", "align", "bridges", "inject", "train", "recipes"):
        assert (ROOT / d / "__init__.py").exists(), d
    for f in ("core.py", "vlm.py", "cli.py"): assert (ROOT / f).exists(), f
