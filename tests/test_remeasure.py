"tools/remeasure.py: every job names functions that exist and files that are committed; --list runs nothing."
import importlib, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import remeasure  # noqa: E402


def test_every_command_names_what_exists():
    for name, (cmds, clear) in remeasure.JOBS.items():
        assert cmds, name
        for cmd in cmds:
            for mod, names in re.findall(r"from (\S+) import ([\w, *]+)", cmd):
                m = importlib.import_module(mod)
                for n in [n.strip() for n in names.split(",") if n.strip() != "*"]: assert hasattr(m, n), (name, mod, n)
            if cmd.startswith("-m "): importlib.import_module(cmd.split()[1])
            for out in re.findall(r"(?:data_samples/results|benchmarks)/[\w.]+\.(?:json|md|py)", cmd):
                assert (ROOT / out).exists(), (name, out)
        for c in clear: assert not Path(c).is_absolute() and ".." not in c, (name, c)


def test_list_runs_nothing_and_unknown_job_is_refused():
    r = subprocess.run([sys.executable, "tools/remeasure.py", "--list"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and all(n in r.stdout for n in remeasure.JOBS)
    r = subprocess.run([sys.executable, "tools/remeasure.py", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown job(s) ['nope']" in r.stderr
