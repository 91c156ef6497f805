"""BatchNorm statistics recomputed from training batches under the weights as they are now ("precise BN").

Evaluation normalises each channel with running averages (momentum 0.1) of batch statistics taken while
the weights were moving.  Over an ImageNet epoch of thousands of steps they lag the weights by a few
dozen steps, which does not matter.  Where a few steps move the weights a lot (fine-tuning on a small
dataset, or at another resolution than the weights were trained at, or early epochs at a high learning
rate) they describe a network that no longer exists: fine-tuning MindCV's CIFAR-10 weights on the 224-px
hymenoptera images, 15 steps an epoch, gave a validation loss of 20.6 million after epoch 1, and 0.91
with the statistics recomputed from 240 of the training images (README, "Precise BatchNorm statistics").

The remedy (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021) is to freeze the weights and
estimate each BatchNorm's population statistics from some training batches: the mean of the batch means,
and the variance as the mean batch variance plus the variance of the batch means, i.e. E[x^2] - E[x]^2
over all the images (the within-batch part is unbiased, as BatchNorm's own running variance is).  Under
data parallelism every rank feeds its own batches and the sums are added over ranks, so all ranks end
with the same statistics.  Only the running statistics change; weights, training-mode outputs and the
training that follows do not.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from . import data
from . import distributed as dist
from .config import Config
from .device_input import DeviceInput

_BatchNorm = nn.modules.batchnorm._BatchNorm


def running_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` whose running statistics evaluation uses."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm_statistics(
    models: Sequence[nn.Module],
    batches: Iterable[torch.Tensor | None],
    autocast: contextlib.AbstractContextManager | None = None,
) -> int:
    """Replace the running mean and variance of every BatchNorm in ``models`` with the population
    statistics of ``batches`` (input batches, fed to each model in training mode without gradients);
    returns the number of batches summed over all ranks.

    Each model keeps its modes, BatchNorm momenta and ``num_batches_tracked``; a ``None`` batch (nothing
    readable in it) is skipped.  When no rank fed a batch the statistics are left as they were.
    """
    groups = [running_batchnorms(model) for model in models]
    layers = [bn for group in groups for bn in group]
    if not layers:
        return 0
    kept = [
        (bn.momentum, bn.num_batches_tracked.clone(), bn.running_mean.clone(), bn.running_var.clone()) for bn in layers
    ]
    modes = [(module, module.training) for model in models for module in model.modules()]
    device = layers[0].running_mean.device
    # per layer, the sums over batches of the batch mean and of the batch variance plus the squared mean
    sums = {bn: torch.zeros(2, bn.num_features, dtype=torch.float64, device=device) for bn in layers}
    fed, replaced = 0, False
    try:
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = 1.0  # the running statistics become the last batch's own
        for model in models:
            model.train()
        for images in batches:
            if images is None:
                continue
            fed += 1
            for model, group in zip(models, groups, strict=True):
                with autocast if autocast is not None else contextlib.nullcontext():
                    model(images)
                for bn in group:
                    mean = bn.running_mean.double()
                    sums[bn] += torch.stack([mean, bn.running_var.double() + mean * mean])
        totals = torch.cat(
            [*(sums[bn].flatten() for bn in layers), torch.tensor([float(fed)], dtype=torch.float64, device=device)]
        )
        dist.all_reduce_sum(totals)
        count = int(totals[-1])
        if count:
            chunks = totals[:-1].split([2 * bn.num_features for bn in layers])
            for bn, chunk in zip(layers, chunks, strict=True):
                mean, square = chunk.view(2, -1) / count
                bn.running_mean.copy_(mean)
                bn.running_var.copy_((square - mean * mean).clamp_min(0.0))
            replaced = True
        return count
    finally:
        for bn, (momentum, tracked, mean, var) in zip(layers, kept, strict=True):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)
            if not replaced:  # nothing fed, or interrupted: the statistics as they were
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
        for module, training in modes:
            module.training = training


def recompute_from_loader(
    models: Sequence[nn.Module],
    loader: torch.utils.data.DataLoader,
    inputs: DeviceInput,
    images: int,
    global_batch: int,
    epoch: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> int:
    """``recompute_batchnorm_statistics`` over the first batches of ``loader``'s epoch ``epoch`` that hold
    at least ``images`` images over all ranks (``global_batch`` a step), at most one epoch's, as
    ``inputs`` (``DeviceInput``) makes them; returns the batches fed over all ranks."""
    batches = min(len(loader), math.ceil(images / global_batch))
    loader.sampler.set_epoch(epoch)
    fed = (inputs(loaded)[0] for loaded in itertools.islice(loader, batches))
    return recompute_batchnorm_statistics(models, fed, autocast)


def recalibrate(model: nn.Module, cfg: Config, images: int, device: torch.device) -> tuple[int, str]:
    """``model``'s BatchNorm statistics recomputed from about ``images`` images of ``cfg``'s training split
    under its training transform (``shufflenetv2 recalibrate``): what ``precise_bn`` does at the end of an
    epoch, for weights trained without it, or moved to another resolution (``image_resize``).  Returns the
    number of images fed and the split's description."""
    dataset = data.build_dataset(cfg, cfg.train_split, train=True)
    loader = data.build_loader(cfg, dataset, train=True, seed=cfg.seed)
    inputs = DeviceInput(cfg, train=True, device=device)
    fed = recompute_from_loader([model], loader, inputs, images, cfg.batch_size)
    return fed * cfg.batch_size, data.describe_dataset(dataset)
