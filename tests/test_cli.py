"""The `mmbridge` console script (nbs/81_cli.ipynb): train, resume, exit codes, and the lazily imported zoo / data commands."""
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from mmbridge_ref.cli import main
from mmbridge_ref.train.loop import Task, load_checkpoint, read_csv, register_task
from mmbridge_ref.recipes.toy import ToyLM, toy_lm

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy.yaml")
SHORT = ["stages.0.steps=3", "stages.1.steps=3", "train.batch_size=8", "data.seq_len=12", "train.eval_every=0",
         "train.ckpt_every=0", "data.eval_batches=1", "optim.warmup_steps=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train(run_dir, *extra):
    return main(["train", TOY, "--no-progress", "--set", *SHORT, f"train.run_dir={run_dir}", *extra])


def test_train_writes_the_run_directory(tmp_path, capsys):
    assert train(tmp_path / "r") == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["checkpoint.pt", "config.yaml", "config_history", "loss.png", "metrics.csv"]
    out = capsys.readouterr().out
    assert "r: finished after 6 steps" in out
    header, *rows = out[out.index("metric  chance"):].splitlines()[:3]
    assert header.split() == ["metric", "chance", "first", "(step", "6)", "last", "(step", "6)", "last", "-", "chance"]
    assert rows[1].split()[:2] == ["acc", "0.0625"]  # the end table: each metric against its chance level
    assert [r["step"] for r in read_csv(tmp_path / "r" / "metrics.csv")] == [1, 2, 3, 4, 5, 6]


def test_resume_from_the_command_line_matches_the_uninterrupted_run(tmp_path, capsys):
    assert train(tmp_path / "full") == 0
    assert train(tmp_path / "part", "train.stop_at=4") == 0
    assert "stopped at step 4" in capsys.readouterr().out
    assert main(["train", "--no-progress", "--resume", str(tmp_path / "part")]) == 0  # the run's own config, its --sets included
    keys = ["step", "loss", "lr", "grad_norm"]
    full, resumed = (read_csv(tmp_path / d / "metrics.csv") for d in ("full", "part"))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def test_bad_config_key_exits_2_with_one_line_and_no_traceback(tmp_path, capsys):
    assert train(tmp_path / "r", "optim.learning_rate=1e-3") == 2
    err = capsys.readouterr().err
    assert err.startswith("mmbridge: config error: optim.learning_rate: unknown key; allowed keys: lr,")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_usage_errors_and_missing_files(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err
    assert main(["train"]) == 2  # neither CONFIG nor --resume
    assert "give a CONFIG" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0 and "examples:\n  mmbridge train configs/llava_tiny.yaml" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "no_run")]) == 1
    assert "no such run directory" in capsys.readouterr().err


def test_resume_with_other_settings_lists_them_and_needs_allow_changes(tmp_path, capsys):
    assert train(tmp_path / "part", "train.stop_at=2") == 0
    capsys.readouterr()
    assert main(["train", TOY, "--no-progress", "--resume", str(tmp_path / "part"), "--set", *SHORT, "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.01 -> 0.5" in err and "--allow-changes" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--resume", str(tmp_path / "part"), "--set", "optim.lr=0.5"]) == 2  # --set needs the CONFIG
    assert main(["train", TOY, "--no-progress", "--resume", str(tmp_path / "part"), "--set", *SHORT, "optim.lr=0.5", "--allow-changes"]) == 0
    assert len(list((tmp_path / "part" / "config_history").glob("*.yaml"))) == 2


def test_data_preview_names_the_valid_tasks(tmp_path, capsys):
    assert main(["data", "preview", "--task", "vqq", "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "mmbridge: data preview: --task 'vqq' is not one of caption, vqa, dialogue, interleaved, clip, hires"
    assert not (tmp_path / "p.png").exists()
    assert main(["data", "preview", "--task", "vqa", "-n", "2", "--out", str(tmp_path / "p.png")]) == 0 and (tmp_path / "p.png").exists()


def test_zoo_list_is_a_short_table_with_paths_and_figures(capsys):
    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["entry", "path", "steps", "seconds", "held-out"] and len(lines) == 5
    lm = next(l for l in lines if l.startswith("lm "))
    from mmbridge_ref.backbones.towers import ZOO_DIR
    import json
    zoo = json.loads((ZOO_DIR / "zoo.json").read_text())  # the figures the table shows are the recorded ones
    assert "data_samples/zoo/lm" in lm and f"heldout_acc {zoo['lm']['heldout_acc']:.3f}" in lm and f"{zoo['lm']['steps']:,}" in lm
    assert main(["zoo", "list", "--full"]) == 0 and "ceiling:" in capsys.readouterr().out


def test_transformers_progress_bars_are_hidden_unless_verbose(capsys):
    import transformers
    assert main(["zoo", "list"]) == 0
    assert not transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.enable_progress_bar()
    assert main(["--verbose", "zoo", "list"]) == 0
    assert transformers.utils.logging.is_progress_bar_enabled()


class _NaNLM(ToyLM):
    def forward(self, batch):
        return super().forward(batch) * float("nan")


@register_task("cli_test_nan")
def _nan_task(cfg):
    base = toy_lm(cfg)
    return Task(model=_NaNLM(**cfg.model), batch=base.batch)


@register_task("cli_test_sigint")
def _sigint_task(cfg):
    base = toy_lm(cfg)
    def batch(step):
        if step == 1: os.kill(os.getpid(), signal.SIGINT)
        return base.batch(step)
    return Task(model=base.model, batch=batch)


def test_nan_loss_exits_1_and_ctrl_c_exits_130_after_saving(tmp_path, capsys):
    assert train(tmp_path / "nan", "task=cli_test_nan") == 1
    assert "the loss is nan at step 1" in capsys.readouterr().err
    assert train(tmp_path / "int", "task=cli_test_sigint") == 130
    assert "interrupted after step 2" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "int")["step"] == 2


def test_zoo_and_data_commands_call_their_modules(tmp_path, monkeypatch, capsys):
    calls = []
    fake_zoo = types.SimpleNamespace(build_zoo=lambda only, quick=False, sets=(): calls.append((tuple(only), quick, *sets)) or {"lm": {"steps": 3}})
    fake_backbones = types.SimpleNamespace(list_zoo=lambda: {"lm": {"heldout_acc": 0.9}}, ZOO_DIR=tmp_path / "zoo")
    fake_clip = types.SimpleNamespace(build_vision_zoo=lambda quick=False: calls.append(("vision", quick)) or {"steps": 5})
    monkeypatch.setitem(sys.modules, "mmbridge_ref.recipes.zoo", fake_zoo)
    monkeypatch.setitem(sys.modules, "mmbridge_ref.backbones.towers", fake_backbones)
    monkeypatch.setitem(sys.modules, "mmbridge_ref.align.clip_train", fake_clip)
    assert main(["zoo", "build", "--quick"]) == 0 and calls == [(("lm", "lm_bare"), True), ("vision", True)]
    assert main(["zoo", "build", "--only", "lm"]) == 0 and calls[2:] == [(("lm",), False)]
    assert main(["zoo", "build", "--only", "lm_bare", "--set", "train.threads=1"]) == 0 and calls[3:] == [(("lm_bare",), False, "train.threads=1")]
    assert main(["zoo", "build", "--only", "vision"]) == 0 and calls[4:] == [("vision", False)]
    assert "vision:\n  steps: 5" in capsys.readouterr().out
    assert main(["zoo", "build", "--only", "tokenizer"]) == 2  # not a choice: argparse's usage error
    assert main(["zoo", "list", "--full"]) == 0 and "heldout_acc: 0.9" in capsys.readouterr().out
    assert main(["zoo", "list"]) == 0 and "heldout_acc 0.9" in capsys.readouterr().out
    calls.clear()

    def preview(task="caption", n=8):
        from matplotlib.figure import Figure
        fig = Figure()
        fig.subplots().set_title(f"{task} x{n}")
        calls.append((task, n))
        return fig
    monkeypatch.setitem(sys.modules, "mmbridge_ref.data.shapesworld", types.SimpleNamespace(preview=preview, TASKS=("caption", "vqa")))
    out = tmp_path / "sub" / "p.png"
    assert main(["data", "preview", "--task", "vqa", "-n", "4", "--out", str(out)]) == 0
    assert calls[-1] == ("vqa", 4) and out.read_bytes()[:4] == b"\x89PNG"


def test_a_missing_module_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mmbridge_ref.backbones.towers", None)  # makes the import fail
    assert main(["zoo", "list"]) == 1
    assert "`mmbridge zoo list` needs mmbridge_ref.backbones.towers" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("mmbridge")
    assert exe.exists(), f"{exe} missing: run `pip install -e .`"
    r = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--resume RUN_DIR" in r.stdout and "--set KEY=VALUE" in r.stdout


def test_data_export_writes_a_llava_set_and_a_wrong_task_is_one_line(tmp_path, capsys):
    import json
    from mmbridge_ref.data.formats import LlavaJsonDataset
    out = tmp_path / "set"
    assert main(["data", "export", "--task", "llava_instruct", "--n", "5", "--out", str(out), "--seed", "7"]) == 0
    assert "wrote 5 llava_instruct samples" in capsys.readouterr().out
    records = json.loads((out / "data.json").read_text())
    assert [r["id"] for r in records] == [f"llava_instruct-7-train-{i}" for i in range(5)]
    assert len(list((out / "images").iterdir())) == 5 and len(list(LlavaJsonDataset(out / "data.json", out))) == 5
    assert main(["data", "export", "-n", "5", "--out", str(tmp_path / "again"), "--seed", "7"]) == 0  # llava_instruct is the default
    assert (tmp_path / "again" / "data.json").read_text() == (out / "data.json").read_text()
    assert main(["data", "export", "--task", "vqa", "-n", "2", "--out", str(tmp_path / "vqa"), "--split", "test"]) == 0
    assert json.loads((tmp_path / "vqa" / "data.json").read_text())[0]["id"] == "vqa-0-test-0"
    capsys.readouterr()
    assert main(["data", "export", "--task", "captions", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err == "mmbridge: data export: --task 'captions' is not one of llava_instruct, caption, vqa, dialogue, hires\n"
    assert main(["data", "export", "--n", "0", "--out", str(tmp_path / "never")]) == 2
    assert "-n 0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert main(["data", "export", "--task", "vqa"]) == 2  # argparse: --out is required
