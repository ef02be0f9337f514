"""MoE-Tuning through the engine (nbs/50b_moe_train): routing off until the moe stage, routers in the optimizer,
the balancing coefficient from the config, and a resumed stage III equal to an uninterrupted one."""
from pathlib import Path

import pytest
import torch

from mmbridge_ref.train.config import ConfigError, load_config
from mmbridge_ref.train.loop import build_task, fit, load_checkpoint, param_groups, set_trainable

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "moe_llava_tiny.yaml"
QUICK = ["stages.0.steps=2", "stages.1.steps=2", "stages.2.steps=3", "data.eval_size=4", "train.batch_size=4",
         "train.eval_every=0", "train.eval_at_start=false", "train.threads=1", "data.pool_size=16", "optim.warmup_steps=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(tmp_path, name, *sets):
    return load_config(CONFIG, [*QUICK, f"train.run_dir={tmp_path / name}", *sets])


def test_routers_are_in_the_optimizer_of_the_moe_stage_and_routing_follows_the_stages(tmp_path):
    c = cfg(tmp_path, "x")
    task = build_task(c)
    model = task.model
    assert model.injection.moe[0].dense is False  # built as a finished run routes (load_run)
    task.on_stage(0, True)
    assert all(m.dense for m in model.injection.moe)
    task.on_stage(2, True)
    assert not any(m.dense for m in model.injection.moe)
    set_trainable(model, c.stages[2].trainable)
    in_opt = {id(p) for g in param_groups(model, c.stages[2], c.optim) for p in g["params"]}
    routers = [m.router.weight for m in model.injection.moe]
    assert routers and all(id(w) in in_opt for w in routers)  # MoE-LLaVA#9, #17: routers that never train
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("lm.", "bridge.")))


def test_the_balancing_coefficient_comes_from_the_config(tmp_path):
    losses = {}
    for coef in (0.0, 10.0):
        task = build_task(cfg(tmp_path, f"c{coef}", f"model.moe.aux_coef={coef}"))
        task.on_stage(2, True)
        b = task.batch(4)
        with torch.no_grad(): losses[coef] = task.model(b).item()
    assert losses[10.0] > losses[0.0] + 1  # 10 x (k=2 when balanced) per target


def test_moe_tuning_resumed_inside_stage_three_equals_the_whole_run(tmp_path):
    whole = fit(cfg(tmp_path, "whole"), progress=False)
    part = fit(cfg(tmp_path, "part", "train.stop_at=5"), progress=False)  # one step into stage III
    rest = fit(resume=part.run_dir, progress=False)  # re-enters stage III midway: its experts are kept, not re-copied
    keys = ["step", "stage", "loss", "lr", "grad_norm"]
    assert [[r.get(k) for k in keys] for r in rest.history] == [[r.get(k) for k in keys] for r in whole.history]
    a, b = load_checkpoint(whole.run_dir)["params"], load_checkpoint(rest.run_dir)["params"]
    assert all(torch.equal(a[n], b[n]) for n in a) and any("injection.moe.0.router" in n for n in a)
    experts = a["injection.moe.0.gate_proj"]
    assert not torch.equal(experts[0], experts[1])  # stage III trained the copies apart


def test_moe_stages_must_name_stages(tmp_path):
    with pytest.raises(ConfigError, match=r"data.moe_stages.*\['align', 'instruct', 'moe'\]"):
        build_task(cfg(tmp_path, "bad", "data.moe_stages=[stage3]"))
    with pytest.raises(ConfigError, match="model.injection.*use injection: moe"):
        build_task(cfg(tmp_path, "bad2", "model.injection=prefix", "model.moe=null"))
