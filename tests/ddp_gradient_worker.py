"""Run under torchrun by tests/test_train.py: is one DDP step the full-batch step, exactly?

Each rank takes its shard of the first global batch from the real training loader, runs the real
sync-BN conversion and DistributedDataParallel in float64, and rank 0 compares the averaged gradient
with the full-batch gradient of a single-process model fed by the world-size-1 loader.
"""

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from shufflenetv2 import create_model
from shufflenetv2.config import from_dict
from shufflenetv2.data import build_dataset, build_loader
from shufflenetv2.distributed import convert_sync_batchnorm
from shufflenetv2.pipeline import build_batch_transform


def main(data_dir: str, out: str, layout: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = from_dict(
        dict(
            dataset="imagefolder",
            data_dir=data_dir,
            num_classes=3,
            image_resize=32,
            batch_size=4,
            num_parallel_workers=0,
            seed=5,
            hflip=0.5,
            color_jitter=0.3,
        )
    )
    dataset = build_dataset(cfg, "train", train=True)
    torch.manual_seed(0)
    reference = create_model("shufflenet_v2_x0_5", num_classes=3).double()
    model = copy.deepcopy(reference)
    if layout == "channels_last":  # the training default: NHWC activations, EvenOddSplit keeping the layout
        model = model.to(memory_format=torch.channels_last)

    shard = build_loader(cfg, dataset, train=True, rank=rank, world_size=world, seed=cfg.seed)
    shard.sampler.set_epoch(2)
    prepare = build_batch_transform(cfg, train=True)  # the fast pipeline's batch half (uint8 -> float)
    images, labels, _, params = next(iter(shard))
    images = prepare(images, params)
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    net = DistributedDataParallel(convert_sync_batchnorm(model, torch.device("cpu")))
    F.cross_entropy(net(images.double()), labels).backward()

    if rank == 0:
        whole = build_loader(dataclasses.replace(cfg, batch_size=4 * world), dataset, train=True, seed=cfg.seed)
        whole.sampler.set_epoch(2)
        all_images, all_labels, _, all_params = next(iter(whole))
        all_images = prepare(all_images, all_params)
        F.cross_entropy(reference(all_images.double()), all_labels).backward()
        scale = max(float(p.grad.abs().max()) for p in reference.parameters())
        pairs = zip(model.parameters(), reference.parameters(), strict=True)
        worst = max(float((p.grad - q.grad).abs().max()) for p, q in pairs)
        bn = [m for m in model.modules() if m.__class__.__name__ == "AllReduceBatchNorm2d"]
        Path(out).write_text(json.dumps({"relative_gradient_difference": worst / scale, "synced_bn_layers": len(bn)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "contiguous")
