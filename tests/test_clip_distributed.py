"""The distributed CLIP loss under `torchrun` (gloo, 2 CPU processes) against one process on the whole batch.

PITFALLS: gather-with-grad and the local loss (open_clip#616, #894). The worker records DDP-averaged parameter
gradients for our `clip_loss_distributed` and for open_clip's four (local_loss, gather_with_grad) settings.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from clip_ddp_worker import make_problem  # noqa: E402

from mmbridge_ref.align.clip import clip_loss  # noqa: E402

WORKER = Path(__file__).with_name("clip_ddp_worker.py")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "result.pt"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def single(run):
    "Loss and gradients of clip_loss in one process on all GLOBAL_BATCH pairs, from the worker's initial weights."
    model, images, texts = make_problem()
    model.load_state_dict(run["init_state"])
    assert torch.equal(images, run["images"]) and torch.equal(texts, run["texts"])
    loss = clip_loss(*model(images, texts))
    loss.backward()
    x, y, s = (t.detach() for t in model(images, texts))
    x.requires_grad_()
    clip_loss(x, y, s).backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}, "image_feature_grad": x.grad}


def _close(a, b): return torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def _flat(grads, names=None): return torch.cat([g.flatten() for n, g in sorted(grads.items()) if names is None or n in names])


ENCODERS = ("image.weight", "image.bias", "text.weight", "text.bias")


def test_mean_of_local_losses_is_the_whole_batch_loss(run, single):
    local = run["losses"]["ours"]
    assert local.shape == (2,) and not torch.allclose(local[0], local[1])  # two different shards ...
    torch.testing.assert_close(local.mean(), single["loss"], rtol=1e-12, atol=1e-12)  # ... whose mean is the whole loss


def test_ddp_gradients_equal_one_process_not_world_size_times(run, single):
    ours = run["grads"]["ours"]
    for name, g in single["grads"].items():
        torch.testing.assert_close(ours[name], g, rtol=1e-9, atol=1e-12, msg=f"{name}")
    ratio = _flat(ours).norm() / _flat(single["grads"]).norm()
    assert abs(ratio - 1) < 1e-9, f"gradient norm ratio {ratio} (2 would mean multiplied by the world size)"


def test_ours_equals_open_clip_local_loss_with_gather_with_grad(run):
    for name, g in run["grads"]["open_clip_local_gather_with_grad"].items():
        torch.testing.assert_close(run["grads"]["ours"][name], g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(run["losses"]["ours"], run["losses"]["open_clip_local_gather_with_grad"])


def test_feature_gradients_carry_the_factor_world_size_that_ddp_averages_away(run, single):
    w = run["world_size"]
    torch.testing.assert_close(run["image_feature_grads"], w * single["image_feature_grad"], rtol=1e-9, atol=1e-12)


def test_what_the_other_open_clip_settings_give(run, single):
    "Measured facts, kept as tests so that a change in torch or open_clip shows up."
    w, g = run["world_size"], single["grads"]
    # global loss + gather with grad: exact under DDP (the factor w at the features is averaged away)
    assert _close(_flat(run["grads"]["open_clip_global_gather_with_grad"]), _flat(g))
    # global loss + plain gather (open_clip's default): the encoders get 1/w of the gradient, the scale all of it
    plain = run["grads"]["open_clip_global_plain_gather"]
    assert _close(_flat(plain, ENCODERS), _flat(g, ENCODERS) / w)
    assert _close(plain["log_scale"], g["log_scale"])
    # local loss + plain gather: the other ranks' features get no gradient; not the whole-batch gradient, nor a multiple
    broken = _flat(run["grads"]["open_clip_local_plain_gather"], ENCODERS)
    cos = torch.nn.functional.cosine_similarity(broken, _flat(g, ENCODERS), dim=0)
    assert cos < 0.999, f"cos={cos}"


def test_unequal_shards_fail_naming_the_shapes(run):
    msg = run["unequal_shards_error"]
    assert msg is not None and "(4, 16)" in msg and "(3, 16)" in msg, msg

