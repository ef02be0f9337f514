"""Worker for tests/test_clip_distributed.py, run as `torchrun --nproc_per_node 2 clip_ddp_worker.py OUT.pt` (gloo, CPU).

Every rank builds the same tiny two-tower model and the same global batch, wraps the model in DDP and feeds it its
own shard. For several ways of computing the distributed CLIP loss it records the DDP-averaged parameter gradients;
rank 0 saves them with the initial weights and the data, so that the test can compare them with one process.
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

GLOBAL_BATCH, WIDTH = 8, 16


class TwoTowers(nn.Module):
    "A linear image tower, a linear text tower and a log-scale: the smallest CLIP with parameters on both sides."
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(12, WIDTH)
        self.text = nn.Linear(10, WIDTH)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images, texts):
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1), self.log_scale.exp()


def make_problem():
    "The model and the global batch, identical in every process (float64 so that comparisons are exact)."
    torch.manual_seed(0)
    model = TwoTowers().double()
    images, texts = torch.randn(GLOBAL_BATCH, 12).double(), torch.randn(GLOBAL_BATCH, 10).double()
    return model, images, texts


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def open_clip_loss_module():
    "open_clip/loss.py loaded as a file: the package __init__ takes ~10 s per process to import, the file needs only torch."
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def main(out_path):
    from mmbridge_ref.align.clip import clip_loss_distributed

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    oc = open_clip_loss_module()
    model, images, texts = make_problem()
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    ddp = nn.parallel.DistributedDataParallel(model)
    my_images, my_texts = images.chunk(world)[rank], texts.chunk(world)[rank]

    variants = {
        "ours": lambda i, t, s: clip_loss_distributed(i, t, s),
        "open_clip_local_gather_with_grad": oc.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world),
        "open_clip_global_gather_with_grad": oc.ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world),
        "open_clip_global_plain_gather": oc.ClipLoss(local_loss=False, gather_with_grad=False, rank=rank, world_size=world),
        "open_clip_local_plain_gather": oc.ClipLoss(local_loss=True, gather_with_grad=False, rank=rank, world_size=world),
    }
    result = {"world_size": world, "init_state": init_state, "images": images, "texts": texts, "grads": {}, "losses": {}}
    for name, loss_fn in variants.items():
        ddp.zero_grad(set_to_none=True)
        loss = loss_fn(*ddp(my_images, my_texts))
        loss.backward()  # DDP averages the parameter gradients over the ranks here
        losses = [torch.zeros((), dtype=loss.dtype) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        result["grads"][name], result["losses"][name] = grads(model), torch.stack(losses)

    # the same loss on leaf features, no DDP: what gather-with-grad hands each rank before any averaging
    with torch.no_grad(): x, y, s = model(my_images, my_texts)
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    clip_loss_distributed(x, y, s).backward()
    feature_grads = [torch.zeros_like(x.grad) for _ in range(world)]
    dist.all_gather(feature_grads, x.grad)
    result["image_feature_grads"] = torch.cat(feature_grads)

    # unequal shards must fail on every rank with the shapes in the message
    try:
        clip_loss_distributed(x[: 4 - rank].detach(), y[: 4 - rank].detach(), s)
        result["unequal_shards_error"] = None
    except ValueError as e:
        result["unequal_shards_error"] = str(e)

    if rank == 0: torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
    # torch 2.14: after open_clip's loss has used torch.distributed.nn.all_gather, about one run in five aborts at
    # interpreter exit ("terminate called without an active exception", SIGABRT) although every rank has finished
    # and rank 0 has saved. Without the open_clip variants 24 runs in 24 exit cleanly. Leave before C++ teardown.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
