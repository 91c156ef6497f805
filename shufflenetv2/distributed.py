"""torchrun / DDP set-up and the few collective operations the loop needs.

A process is distributed when torchrun launched it with ``WORLD_SIZE > 1`` (the analogue of MindCV's
``msrun``); NCCL on CUDA, gloo on CPU.  Everything here also works, as a no-op, in a plain process.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .batchnorm import BatchNorm2d, is_local_batchnorm
from .config import Config, ConfigError

_host_group: object | None = None  # gloo group for host-side votes (see any_rank)


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but no CUDA device is available; use --device cpu or auto")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def launched_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun).  Also readable after the process
    group is gone: a command's closing report is printed by rank 0 alone."""
    return int(os.environ.get("RANK", "0"))


def setup(cfg: Config, job: str = "train") -> Context:
    """Join the process group when torchrun started several processes; pick this process's device.
    ``job`` ("train" or "validate") words the note about a lone process and names the script to launch."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            _init_process_group("nccl" if device.type == "cuda" else "gloo")
        global _host_group  # created here, collectively, in the same order on every rank
        _host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    elif cfg.distribute and rank == 0:
        print(
            "note: distribute is True but this process was not launched by torchrun (WORLD_SIZE is unset or 1), "
            f"so it {job}s alone; launch with `torchrun --nproc_per_node N {job}.py ...` to use N devices",
            file=sys.stderr,
        )
    return Context(rank, world_size, local_rank, device)


def _init_process_group(backend: str) -> None:
    """torchrun's env:// set-up, with every restart of an elastic job (``--max-restarts``) in its own
    namespace of the store: restarted workers otherwise read their predecessors' gloo addresses from
    the reused store and fail to connect (seen with torch 2.14)."""
    timeout = datetime.timedelta(minutes=30)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    prefixed = dist.PrefixStore(f"shufflenetv2/attempt-{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size, timeout=timeout)


def cleanup() -> None:
    global _host_group
    _host_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (in place, and returned); a plain copy when not distributed."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_min(values: torch.Tensor) -> torch.Tensor:
    """Minimum over all ranks (in place, and returned)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one: a host-side vote that costs no device sync.

    Under NCCL the vote goes through a gloo side group on CPU tensors, so asking it every step never
    waits for queued GPU work.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    vote = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(vote.item())


def all_gather_object(value: object) -> list[object]:
    """``value`` from every rank, in rank order (a one-element list when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over all ranks, differentiable: each rank's output is the same sum, so the
    gradient of each rank's input is the sum of the output gradients of all ranks.  Ours, because torch's
    ``torch.distributed.nn.functional.all_reduce`` is deprecated and warns on every use (torch 2.14), and
    dynamo cannot trace it: a compiled training step (compile_on_cpu) ran eagerly.  This one it traces
    (``tests/ddp_gradient_worker.py``'s network under torch.compile gave the full-batch gradient to 2e-13 in
    float64; the compile takes over 4 minutes on 2 cores, too long for the test suite)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


class AllReduceBatchNorm2d(BatchNorm2d):
    """BatchNorm over the global batch for CPU/gloo, where ``nn.SyncBatchNorm`` refuses to run.

    The per-channel sum, then the sum of squared deviations, are all-reduced (with autograd, so gradients
    flow through the global statistics as in SyncBatchNorm); running statistics use the unbiased variance.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        total = _SumOverRanks.apply(torch.cat([x.sum((0, 2, 3)), count]))
        n = total[-1]
        mean = total[:channels] / n
        # a second pass for the variance: E[x^2] - E[x]^2 cancels catastrophically after ReLU in float32
        var = _SumOverRanks.apply((x - mean.view(1, channels, 1, 1)).square().sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), momentum)
        shape = (1, channels, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """MindCV's sync BN: ``nn.SyncBatchNorm`` on GPUs, the all-reduce version on CPU."""
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if is_local_batchnorm(child):
            replacement = AllReduceBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            # share, don't copy: the optimizer and EMA already hold these very tensors
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(replacement, key, getattr(child, key))
            setattr(module, name, replacement)
        else:
            convert_sync_batchnorm(child, device)
    return module
