"""The training engine (nbs/80_train.ipynb): config validation, token-weighted accumulation, exact resume,
checkpoints of the trainable parts, failure modes, and DDP under torchrun equal to one process."""
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmbridge_ref.train.loop import CKPT_NAME, NonFiniteLossError, Task, plot_history, build_task, default_count, fit, get_task, load_checkpoint, load_run, load_trainable, param_groups, read_csv, register_task, save_checkpoint, set_trainable, slice_batch, split_bounds, stage_table, warmup_cosine
from mmbridge_ref.train.config import ConfigError, OptimConfig, StageConfig, load_config
from mmbridge_ref.recipes.toy import ToyLM, toy_lm

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy.yaml"
# Short runs: 4 head-only steps, then 6 steps of everything; small batches and sequences.
SHORT = ["stages.0.steps=4", "stages.1.steps=6", "optim.warmup_steps=2", "train.batch_size=8", "data.seq_len=12",
         "train.eval_every=0", "train.ckpt_every=0", "train.log_every=100", "data.eval_batches=1"]
ROW_KEYS = ["step", "stage", "loss", "lr", "grad_norm", "targets", "skipped"]


pytestmark = pytest.mark.usefixtures("one_thread")


def toy(tmp_path, name, *sets):
    return load_config(TOY, [*SHORT, f"train.run_dir={tmp_path / name}", *sets])


def rows(history, keys=ROW_KEYS):
    return [[r[k] for k in keys] for r in history]


def close_rows(a, b, rel=1e-5):
    """Same steps, stages, target counts; losses and grad norms equal up to float summation order."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert (ra["step"], ra["stage"], ra["targets"], ra["skipped"]) == (rb["step"], rb["stage"], rb["targets"], rb["skipped"])
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=rel), (ra, rb)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4), (ra, rb)


def params_of(run_dir):
    return load_checkpoint(run_dir)["params"]


RESUME_SETS = ["train.ckpt_every=3", "model.dropout=0.2"]  # dropout: an exact resume must restore the RNG too


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run that the resume tests compare with."""
    return fit(toy(tmp_path_factory.mktemp("full"), "full", *RESUME_SETS), progress=False)


# ---------------------------------------------------------------- config

def test_bad_config_key_names_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(TOY, ["optim.lrr=1e-3"])
    assert "optim.lrr: unknown key" in str(e.value) and "allowed keys: lr, weight_decay" in str(e.value)
    with pytest.raises(ConfigError, match=r"stages\.1\.trainabel: unknown key \(did you mean 'trainable'\?\)"):
        load_config(TOY, ["stages.1.trainabel=['*']"])
    with pytest.raises(ConfigError, match=r"train\.grad_accum: 'two' is not int"):
        load_config(TOY, ["train.grad_accum=two"])
    with pytest.raises(ConfigError, match=r"train\.grad_accum: 0 is not allowed: an integer >= 1"):
        load_config(TOY, ["train.grad_accum=0"])
    with pytest.raises(ConfigError, match=r"train\.precision: 'fp16' is not one of \['auto', 'fp32', 'bf16'\]"):
        load_config(TOY, ["train.precision=fp16"])  # fp16 would need loss scaling
    with pytest.raises(ConfigError, match=r"train\.run_dir: 'runs/\{date\}' is not allowed: a path whose only placeholder is \{name\}"):
        load_config(TOY, ["train.run_dir=runs/{date}"])
    with pytest.raises(ConfigError, match=r"train\.seed: True is not int"):
        load_config(TOY, ["train.seed=true"])
    with pytest.raises(ConfigError, match="is not of the form key.path=value"):
        load_config(TOY, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"train\.threads: -1 is not allowed"):
        load_config(TOY, ["train.threads=-1"])


def test_threads_apply_during_the_run_and_are_restored(tmp_path, monkeypatch):
    import mmbridge_ref.train.loop as tr
    seen, before = [], torch.get_num_threads()
    real = tr._Run.run
    monkeypatch.setattr(tr._Run, "run", lambda self: seen.append(torch.get_num_threads()) or real(self))
    fit(load_config(TOY, ["train.threads=1", "stages.0.steps=1", "stages.1.steps=1", f"train.run_dir={tmp_path}/{{name}}"]), progress=False)
    assert seen == [1] and torch.get_num_threads() == before


def test_bad_task_sections_are_checked_by_the_task(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.dimm: unknown key \(did you mean 'dim'\?\)"):
        fit(toy(tmp_path, "r", "model.dimm=8"), progress=False)
    with pytest.raises(ConfigError, match="unknown task 'nope'; known tasks: .*toy_lm"):
        get_task("nope")


def test_overrides_parse_as_yaml_and_float_accepts_exponent_without_dot():
    cfg = load_config(TOY, ["optim.lr=3e-4", "train.stop_at=7", "stages.0.trainable=[head.*]", "optim.betas=[0.9, 0.99]"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.stop_at == 7 and cfg.stages[0].trainable == ["head.*"] and cfg.optim.betas == (0.9, 0.99)
    assert load_config(TOY, ["train.stop_at=null"]).train.stop_at is None


def test_old_config_missing_newer_keys_loads_with_defaults():
    cfg = load_config({"name": "old", "task": "toy_lm", "train": {"batch_size": 8}})
    assert cfg.optim == OptimConfig() and cfg.stages == [StageConfig()]
    assert cfg.train.batch_size == 8 and cfg.train.stop_at is None and cfg.train.grad_accum == 1
    with pytest.raises(ConfigError, match="task: missing"):
        load_config({"name": "no task"})


def test_config_is_saved_next_to_the_run_and_loads_back(tmp_path):
    cfg = toy(tmp_path, "r", "stages.1.steps=0")
    res = fit(cfg)  # with the progress bar
    assert load_config(res.run_dir / "config.yaml") == cfg


# ---------------------------------------------------------------- pieces

def test_split_bounds_and_slices_cover_the_batch():
    assert split_bounds(8, 2) == [(0, 4), (4, 8)] and split_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError, match="n=2 rows into parts=4"):
        split_bounds(2, 4)
    b = toy_lm(load_config(TOY)).batch(0)
    parts = [slice_batch(b, a, z) for a, z in split_bounds(16, 3)]
    assert torch.equal(torch.cat([p["labels"] for p in parts]), b["labels"])
    assert sum(default_count(p) for p in parts) == default_count(b)


def test_warmup_cosine_shape():
    f = lambda s: warmup_cosine(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(19) == pytest.approx(0.1) and f(25) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 19))


def test_param_groups_no_decay_on_1d_and_lr_multipliers():
    model, optim = ToyLM(), OptimConfig(lr=1e-2, weight_decay=0.1)
    set_trainable(model, ["*"])
    groups = param_groups(model, StageConfig(lr_mult={"embed.*": 0.5}), optim)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["embed.weight"]["lr"] == 5e-3 and by_name["embed.weight"]["weight_decay"] == 0.1
    assert by_name["head.weight"]["lr"] == 1e-2 and by_name["head.weight"]["weight_decay"] == 0.1
    assert by_name["norm.weight"]["weight_decay"] == 0.0 and by_name["head.bias"]["weight_decay"] == 0.0
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="pattern 'rnn.*' matches no trainable parameter"):
        set_trainable(model, ["head.*"])
        param_groups(model, StageConfig(lr_mult={"rnn.*": 2.0}), optim)


def test_stage_table_counts_trainable_and_frozen():
    model = ToyLM()
    total = sum(p.numel() for p in model.parameters())
    rows_ = stage_table(model, [StageConfig("a", 1, ["head.*"]), StageConfig("b", 1, ["*"])])
    assert rows_[0]["trainable"] == sum(p.numel() for p in model.head.parameters())
    assert rows_[0]["trainable"] + rows_[0]["frozen"] == total and rows_[1]["frozen"] == 0
    assert rows_[0]["trains"] == "head"


def test_pattern_that_matches_nothing_fails_before_training(tmp_path):
    cfg = toy(tmp_path, "r", "stages.1.trainable=[rnn.*, decoder.*]")
    with pytest.raises(ConfigError, match=r"stages\.1\.trainable: pattern 'decoder\.\*' matches no parameter; the parameters are embed\.weight"):
        fit(cfg, progress=False)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- the loop

def test_accumulation_equals_large_batch(tmp_path):
    """grad_accum=4 (micro-batches with different numbers of targets) takes the same steps as one batch of 8."""
    b = toy_lm(toy(tmp_path, "x")).batch(0)
    counts = [default_count(slice_batch(b, a, z)) for a, z in split_bounds(8, 4)]
    assert len(set(counts)) > 1, counts  # so a mean of per-micro-batch means would differ
    sets = ["model.dropout=0"]
    big = fit(toy(tmp_path, "big", *sets, "train.grad_accum=1"), progress=False)
    acc = fit(toy(tmp_path, "acc", *sets, "train.grad_accum=4"), progress=False)
    close_rows(acc.history, big.history)
    for n, p in params_of(big.run_dir).items():
        torch.testing.assert_close(params_of(acc.run_dir)[n], p, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stop_at", [2, 4, 7])  # inside stage 0, at the stage boundary, inside stage 1
def test_resume_equals_uninterrupted(tmp_path, full, stop_at, caplog):
    sets = RESUME_SETS
    part = fit(toy(tmp_path, "part", *sets, f"train.stop_at={stop_at}"), progress=False)
    assert (part.step, part.stopped, len(part.history)) == (stop_at, True, stop_at)
    assert load_checkpoint(part.run_dir)["step"] == stop_at
    with caplog.at_level(logging.WARNING, logger="mmbridge_ref.train.loop"):
        rest = fit(toy(tmp_path, "part", *sets), resume=part.run_dir, progress=False)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # same config: nothing to warn about
    assert rows(rest.history) == rows(full.history)  # exactly, not approximately
    assert rest.metrics == full.metrics and rest.step == full.step and not rest.stopped
    assert rows(read_csv(rest.run_dir / "metrics.csv")) == rows(full.history)
    for n, p in params_of(full.run_dir).items():
        assert torch.equal(params_of(rest.run_dir)[n], p), n


def test_resume_with_a_changed_config_is_refused_naming_the_key_unless_allowed(tmp_path, caplog):
    part = fit(toy(tmp_path, "r", "train.stop_at=1"), progress=False)
    changed = toy(tmp_path, "elsewhere", "train.stop_at=2", "optim.lr=0.5")
    with pytest.raises(ConfigError, match=r"optim.lr: 0.01 -> 0.5.*--allow-changes"):
        fit(changed, resume=part.run_dir, progress=False)
    assert load_checkpoint(part.run_dir)["step"] == 1  # refused before anything ran
    with caplog.at_level(logging.WARNING, logger="mmbridge_ref.train.loop"):
        fit(changed, resume=part.run_dir, progress=False, allow_changes=True)
    assert any("optim.lr: 0.01 -> 0.5" in r.getMessage() for r in caplog.records)
    saved = load_config(part.run_dir / "config.yaml")
    assert saved.train.run_dir == str(part.run_dir) and saved.optim.lr == 0.5  # the config in force, where the run really is
    history = sorted((part.run_dir / "config_history").glob("*.yaml"))
    assert [h.name for h in history] == ["000_start_at_step_0.yaml", "001_resume_at_step_1.yaml"]
    assert load_config(history[0]).optim.lr == 0.01  # the original record survives


def test_resume_alone_continues_with_the_runs_own_config_and_overrides(tmp_path):
    sets = [*RESUME_SETS, "optim.lr=0.02", "model.dropout=0.1"]  # overrides given on the original command line
    whole = fit(toy(tmp_path, "whole", *sets), progress=False)
    part = fit(toy(tmp_path, "part", *sets, "train.stop_at=5"), progress=False)
    rest = fit(resume=part.run_dir, progress=False)  # no config: the run's own, stop_at cleared
    assert rows(rest.history) == rows(whole.history)
    assert load_config(rest.run_dir / "config.yaml").optim.lr == 0.02


def test_resume_checks_the_checkpoint_before_any_weights_load(tmp_path, monkeypatch):
    import mmbridge_ref.train.loop as loop
    def no_build(cfg): raise AssertionError("the task was built before the checkpoint was checked")
    monkeypatch.setattr(loop, "build_task", no_build)
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        fit(resume=tmp_path / "doesnotexist", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"holds no {CKPT_NAME}"):
        fit(resume=tmp_path / "empty", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CKPT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        fit(resume=tmp_path / "bad", progress=False)
    torch.save({"step": 3}, tmp_path / "bad" / CKPT_NAME)
    with pytest.raises(ValueError, match="lacks format, stage, params, rng"):
        fit(resume=tmp_path / "bad", progress=False)


def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path, full):
    """A hard kill (SIGKILL: no handler runs, nothing is saved at the end) between checkpoints; resume from the last one."""
    sets = [*SHORT, *RESUME_SETS, "train.ckpt_every=2", "stages.1.steps=400", "train.log_every=1"]
    cmd = [str(Path(sys.executable).with_name("mmbridge")), "train", str(TOY), "--no-progress", "--set", *sets, f"train.run_dir={tmp_path / 'k'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # a line per step: kill once step 9 is done (after the checkpoint of step 8)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 9:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(tmp_path / "k")["step"]
    assert 8 <= saved < 404 and saved % 2 == 0, saved
    rest = fit(resume=tmp_path / "k", progress=False)
    whole = fit(load_config(TOY, [*sets, f"train.run_dir={tmp_path / 'whole'}"]), progress=False)
    assert rows(rest.history) == rows(whole.history)  # loss, lr, grad norm at every step, exactly


@register_task("test_sigint_lm")
def _sigint_task(cfg):
    """The toy task, with a Ctrl-C (SIGINT) arriving while batch index 4 (step 5) is prepared."""
    base = toy_lm(cfg)
    def batch(step):
        if step == 4: os.kill(os.getpid(), signal.SIGINT)
        return base.batch(step)
    return Task(model=base.model, batch=batch, evaluate=base.evaluate)


@register_task("test_interrupt_lm")
def _interrupt_task(cfg):
    """The toy task, with a KeyboardInterrupt raised inside step 6 (a second Ctrl-C would do this)."""
    base = toy_lm(cfg)
    def batch(step):
        if step == 5: raise KeyboardInterrupt
        return base.batch(step)
    return Task(model=base.model, batch=batch, evaluate=base.evaluate)


@pytest.mark.parametrize("task, saved_step", [("test_sigint_lm", 5), ("test_interrupt_lm", 5)])
def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(tmp_path, full, task, saved_step):
    sets, handler = RESUME_SETS, signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit(toy(tmp_path, "int", *sets, f"task={task}"), progress=False)
    assert signal.getsignal(signal.SIGINT) is handler  # fit put the Ctrl-C handler back
    assert load_checkpoint(tmp_path / "int")["step"] == saved_step
    with pytest.raises(ConfigError, match="task: 'test_.*_lm' -> 'toy_lm'"):  # another task: refused unless confirmed
        fit(toy(tmp_path, "int", *sets), resume=tmp_path / "int", progress=False)
    rest = fit(toy(tmp_path, "int", *sets), resume=tmp_path / "int", progress=False, allow_changes=True)
    assert rows(rest.history) == rows(full.history)


def test_no_supervision_batch_is_skipped_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mmbridge_ref.train.loop"):
        res = fit(toy(tmp_path, "r", "data.unsupervised_batches=[1, 5]"), progress=False)
    warned = [r.getMessage() for r in caplog.records if "no supervised targets" in r.getMessage()]
    assert len(warned) == 2 and "step 2 (stage 'head')" in warned[0] and "step 6 (stage 'all')" in warned[1]
    assert [r["skipped"] for r in res.history] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert [r["targets"] == 0 for r in res.history] == [r["loss"] is None for r in res.history]
    assert all(math.isfinite(r["loss"]) for r in res.history if r["loss"] is not None)
    assert read_csv(res.run_dir / "metrics.csv")[-1]["skipped"] == 2
    assert all(torch.isfinite(p).all() for p in params_of(res.run_dir).values())


@register_task("test_half_masked_lm")
def _half_masked_task(cfg):
    """The toy task with every label of the first half of each batch masked: one micro-batch has nothing to learn."""
    base = toy_lm(cfg)
    def batch(step):
        b = base.batch(step)
        b["labels"][: len(b["labels"]) // 2] = -100
        return b
    return Task(model=base.model, batch=batch)


def test_a_micro_batch_without_targets_is_harmless(tmp_path):
    sets = ["task=test_half_masked_lm", "model.dropout=0"]
    one = fit(toy(tmp_path, "one", *sets, "train.grad_accum=1"), progress=False)
    two = fit(toy(tmp_path, "two", *sets, "train.grad_accum=2"), progress=False)
    assert all(math.isfinite(r["loss"]) for r in two.history) and two.history[-1]["skipped"] == 0
    close_rows(two.history, one.history)


class _BadLossLM(ToyLM):
    bad = float("nan")

    def forward(self, batch):
        loss = super().forward(batch)
        return loss * self.bad if batch["step"] >= 4 else loss


def _bad_loss_task(value):
    def build(cfg):
        """The toy task whose loss turns NaN (or inf) from batch index 4 (step 5) on."""
        base = toy_lm(cfg)
        model = _BadLossLM(**cfg.model)
        model.load_state_dict(base.model.state_dict())  # the toy task's own initial weights
        model.bad = value
        return Task(model=model, batch=lambda s: base.batch(s) | {"step": s})
    return build


register_task("test_nan_lm")(_bad_loss_task(float("nan")))
register_task("test_inf_lm")(_bad_loss_task(float("inf")))


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    sets = ["train.ckpt_every=2", "model.dropout=0"]
    good = fit(toy(tmp_path, "good", *sets, "train.stop_at=4"), progress=False)
    with pytest.raises(NonFiniteLossError, match=rf"the loss is {bad} at step 5 \(stage 1 'all'\).*last good checkpoint .* \(step 4\)"):
        fit(toy(tmp_path, "bad", *sets, f"task=test_{bad}_lm"), progress=False)
    ckpt = load_checkpoint(tmp_path / "bad")
    assert ckpt["step"] == 4
    for n, p in params_of(good.run_dir).items():
        assert torch.equal(ckpt["params"][n], p), n
    assert [r["step"] for r in read_csv(tmp_path / "bad" / "metrics.csv")] == [1, 2, 3, 4]
    assert not list((tmp_path / "bad").glob("*.tmp"))


def test_checkpoint_holds_only_trained_parts_and_loads_into_a_fresh_model(tmp_path):
    cfg = toy(tmp_path, "r", "stages.0.trainable=[head.*]", "stages.1.trainable=[embed.*]", "stages.1.steps=3")
    res = fit(cfg, progress=False)
    ckpt = load_checkpoint(res.run_dir)
    assert sorted(ckpt["params"]) == ["embed.weight", "head.bias", "head.weight"]  # both stages' parts, nothing frozen
    fresh = build_task(cfg)  # seeded as fit seeds it: the frozen parts start where the run's did
    before = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    assert load_trainable(fresh.model, res.run_dir / CKPT_NAME) == list(ckpt["params"])
    assert fresh.evaluate(fresh.model.eval()) == pytest.approx(res.metrics, rel=1e-6)
    assert not torch.equal(before["head.weight"], fresh.model.head.weight.detach())
    assert torch.equal(before["rnn.weight_ih_l0"], fresh.model.rnn.weight_ih_l0.detach())
    again = load_run(res.run_dir)
    assert again.evaluate(again.model) == pytest.approx(res.metrics, rel=1e-6)
    with pytest.raises(ValueError, match=r"head\.weight: \(16, 32\) vs \(16, 8\)"):
        load_trainable(ToyLM(dim=8), ckpt)
    with pytest.raises(KeyError, match="parameters the model lacks: embed.weight"):
        load_trainable(torch.nn.Linear(2, 2), ckpt)


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    model, path = ToyLM(), tmp_path / CKPT_NAME
    save_checkpoint(path, model=model, names=["head.weight"], step=3)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, names=["head.weight"], step=4)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 3


def test_metrics_csv_and_loss_plot(tmp_path):
    res = fit(toy(tmp_path, "r", "train.eval_every=5"), progress=False)
    csv_rows = read_csv(res.run_dir / "metrics.csv")
    assert rows(csv_rows) == rows(res.history)
    assert {"samples_per_s", "targets_per_s", "eval_loss", "eval_acc"} <= set(csv_rows[0])
    assert [r["step"] for r in csv_rows if r["eval_loss"] is not None] == [5, 10]
    assert (res.run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.metrics["loss"] == csv_rows[-1]["eval_loss"]
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_ddp_two_cpu_processes_equal_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, 4 rows each) == 1 process with grad_accum 2 on the same global batch of 8."""
    torchrun = Path(sys.executable).with_name("torchrun")
    sets = ["model.dropout=0", "train.device=cpu", "stages.0.steps=3", "stages.1.steps=3"]
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "ddp_worker.py"),
           "train", str(TOY), "--no-progress", "--set", *SHORT, *sets, f"train.run_dir={tmp_path / 'ddp'}", "train.grad_accum=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "rank 0 of 2" in r.stdout and "rank 1 of 2" in r.stdout
    ckpt = load_checkpoint(tmp_path / "ddp")
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    one = fit(toy(tmp_path, "one", *sets, "train.grad_accum=2"), progress=False)
    close_rows(read_csv(tmp_path / "ddp" / "metrics.csv"), one.history)
    for n, p in params_of(one.run_dir).items():
        torch.testing.assert_close(ckpt["params"][n], p, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- what a run reports

def test_end_table_has_chance_first_and_last_value_and_the_plot_draws_every_metric(tmp_path):
    res = fit(toy(tmp_path, "sum", "train.eval_at_start=true", "train.eval_every=5"), progress=False)
    assert res.history[0]["step"] == 0 and res.history[0].get("loss") is None and "eval_acc" in res.history[0]
    assert len(res.history) == 11  # the row of step 0 holds the first evaluation only
    table = {r["metric"]: r for r in res.summary}
    assert table["acc"]["chance"] == 0.0625  # 1 / vocab_size
    assert table["acc"]["first (step 0)"] == round(res.history[0]["eval_acc"], 4)
    assert table["acc"]["last (step 10)"] == round(res.metrics["acc"], 4) and table["loss"]["chance"] == "-"
    assert table["acc"]["last - chance"] == f"{res.metrics['acc'] - 0.0625:+.4f}"
    fig = plot_history(res.history, chance={"acc": 0.0625})
    panels = fig.axes
    assert len(panels) == 3 and [l.get_label() for l in panels[2].get_lines() if not l.get_label().startswith("_")] == ["acc"]
    assert any(list(l.get_ydata()) == [0.0625, 0.0625] for l in panels[2].get_lines())  # the chance line
    # resumed: the step-0 row comes back from metrics.csv and evaluation at start does not run again
    part = fit(toy(tmp_path, "sum2", "train.eval_at_start=true", "train.stop_at=3"), progress=False)
    rest = fit(resume=part.run_dir, progress=False)
    assert [r["step"] for r in rest.history] == list(range(11)) and rest.summary[0]["first (step 0)"] == table["loss"]["first (step 0)"]


def test_tensorboard_events_are_written_and_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    res = fit(toy(tmp_path, "tb", "train.loggers=[csv, tensorboard]", "train.eval_every=5"), progress=False)
    acc = EventAccumulator(str(res.run_dir / "tensorboard"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in res.history]
    assert [e.step for e in acc.Scalars("eval/acc")] == [5, 10]
    assert acc.Scalars("eval/acc")[-1].value == pytest.approx(res.metrics["acc"], rel=1e-6)
    assert (res.run_dir / "metrics.csv").exists()  # the CSV stays


def test_unknown_logger_and_missing_wandb_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.loggers: 'mlflow'.*csv, tensorboard, wandb"):
        toy(tmp_path, "x", "train.loggers=[csv, mlflow]")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="wandb is not installed"):
        fit(toy(tmp_path, "w", "train.loggers=[csv, wandb]"), progress=False)


CALLS = []


@register_task("test_on_stage_lm")
def _on_stage_task(cfg):
    base = toy_lm(cfg)
    return Task(model=base.model, batch=base.batch, evaluate=base.evaluate, on_stage=lambda i, fresh: CALLS.append((i, fresh)))


def test_on_stage_runs_before_each_stage_and_knows_a_resumed_one(tmp_path):
    CALLS.clear()
    part = fit(toy(tmp_path, "s", "task=test_on_stage_lm", "train.stop_at=6"), progress=False)  # stage 1 starts at step 4
    assert CALLS == [(0, True), (1, True)]
    fit(resume=part.run_dir, progress=False)
    assert CALLS[2:] == [(1, False)]  # re-entered midway: not a fresh stage
    CALLS.clear()
    fit(resume=fit(toy(tmp_path, "b", "task=test_on_stage_lm", "train.stop_at=4"), progress=False).run_dir, progress=False)
    assert CALLS == [(0, True), (1, True)]  # stopped exactly at the boundary: stage 1 starts fresh on resume


def test_wandb_offline_run_when_installed(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (train.loggers: [csv, wandb]); not installed here")
    monkeypatch.setenv("WANDB_SILENT", "true"); monkeypatch.setenv("WANDB_MODE", "offline")
    part = fit(toy(tmp_path, "wb", "train.loggers=[csv, wandb]", "train.stop_at=3"), progress=False)
    run_id = (part.run_dir / "wandb_id.txt").read_text()
    assert [p.name.endswith(run_id) for p in (part.run_dir / "wandb").glob("offline-run-*")] == [True]
    fit(resume=part.run_dir, progress=False)
    assert (part.run_dir / "wandb_id.txt").read_text() == run_id  # the resumed run continues the same wandb run
    assert all(p.name.endswith(run_id) for p in (part.run_dir / "wandb").glob("offline-run-*"))


def test_chance_levels_of_the_recipes():
    """Retrieval by a random ranking: R@k = 1 - C(N-m, k) / C(N, k) per row (m identical captions); VQA: one answer in so many."""
    from mmbridge_ref.align.clip_train import recall_chance
    from mmbridge_ref.recipes.vlm import vlm_chance
    from mmbridge_ref.data import shapesworld as sw
    ch = recall_chance(["a", "b", "c", "d"], ks=(1, 2))
    assert ch == {"i2t_r1": 0.25, "t2i_r1": 0.25, "i2t_r2": 0.5, "t2i_r2": 0.5}
    assert recall_chance(["a", "a", "b", "c"], ks=(1,))["i2t_r1"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    g = torch.Generator().manual_seed(0)  # and a simulation of random rankings agrees
    texts = ["a", "a", "b", "c", "c", "c"]
    same = torch.tensor([[x == y for y in texts] for x in texts])
    hits = [same[i, torch.randperm(6, generator=g)[:2]].any().item() for _ in range(4000) for i in range(6)]
    assert sum(hits) / len(hits) == pytest.approx(recall_chance(texts, ks=(2,))["i2t_r2"], abs=0.02)
    plans = [{"meta": {"kind": k}} for k in ("colour", "yesno", "yesno")]
    v = vlm_chance({"vqa": {"plans": plans}})
    assert v["vqa_em_yesno"] == 0.5 and v["vqa_em"] == pytest.approx((1 / len(sw.ANSWERS["colour"]) + 1) / 3)
    assert vlm_chance(None) == {} and vlm_chance({"caption": {}}) == {}


def test_recall_chance_refuses_no_captions_and_bad_k():
    from mmbridge_ref.align.clip_train import recall_chance
    with pytest.raises(ValueError, match="got 0 captions"): recall_chance([])
    with pytest.raises(ValueError, match=r"ks=\(0,\)"): recall_chance(["a"], ks=(0,))
