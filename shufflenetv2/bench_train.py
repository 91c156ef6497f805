"""Training-step speed and numerics: our network against torchvision's ``shufflenet_v2``, same weights.

torchvision's randomly initialised model is converted exactly into our layout (``layout.convert_layout``,
keeping its symmetric stem pool and classifier bias), so both compute the same function.  Each backend
then takes the same SGD steps (momentum 0.9, cross-entropy) on the same batches, each in the layout its
input pipeline writes (``as_delivered``): the loss trajectories must agree, which is what makes the speed
comparison one of equal work.  A step is forward, backward and the optimizer update, timed in rounds
that alternate between backends (see ``bench``).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .bench import autocast, interleaved_rounds, synchronize, torchvision_model
from .layout import convert_layout
from .model import WIDTHS, build_network

TRAIN_BACKENDS = (
    "ours-eager", "ours-channels-last", "ours-compiled", "ours-mindcv-channels-last",
    "torchvision-eager", "torchvision-compiled",
)  # fmt: skip
# MindCV's own network (its SAME stem pool, init, no classifier bias), what train.py trains: the same
# work per step, but another function, so its losses are not compared with torchvision's
NOT_TORCHVISIONS_FUNCTION = ("ours-mindcv-channels-last",)


@dataclasses.dataclass
class TrainRow:
    model: str
    batch: int
    backend: str
    images_per_second: float  # median round
    spread: tuple[float, float]
    step_ms: float  # median time per step
    setup_seconds: float  # the first step (compilation for the compiled rows), excluded
    max_relative_loss_difference: float | None  # over the check's steps, against torchvision eager
    # the same measure for torchvision eager (float32, or the autocast in use) against itself in float64:
    # rounding alone moves this network's loss trajectory this much, so a difference of that order is "identical"
    float32_noise_floor: float
    rounds: list[float] = dataclasses.field(default_factory=list)  # images/s per round, shared by the batch's rows


def twin_networks(name: str, num_classes: int = 1000, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """torchvision's model and ours holding the same weights (our layout, torchvision's pool and bias)."""
    torch.manual_seed(seed)
    theirs = torchvision_model(name, num_classes).train()
    ours = build_network(name, num_classes, layout="mindcv", stem_pool="symmetric", classifier_bias=True)
    ours.load_state_dict(convert_layout(theirs.state_dict(), name, "torchvision", "mindcv"))
    return ours.train(), theirs


def prepare(backend: str, ours: nn.Module, theirs: nn.Module) -> tuple[nn.Module, bool]:
    """A fresh copy of the backend's network (so every backend starts from the same weights) and
    whether it takes channels_last input."""
    if backend.startswith("torchvision"):
        net = copy.deepcopy(theirs)
        return (torch.compile(net) if backend.endswith("compiled") else net), False
    if backend == "ours-mindcv-channels-last":
        name = next(n for n, w in WIDTHS.items() if w == ours.widths)
        mindcv = build_network(name).to(next(ours.parameters()).device).train()
        return mindcv.to(memory_format=torch.channels_last), True
    net = copy.deepcopy(ours)
    if backend == "ours-eager":
        return net, False
    net = net.to(memory_format=torch.channels_last)
    return (torch.compile(net) if backend == "ours-compiled" else net), True


Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def step_function(net: nn.Module, channels_last: bool, lr: float = 0.01, amp: torch.dtype | None = None) -> Step:
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(images.device, amp):
            logits = net(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def batches(count: int, batch: int, size: int, num_classes: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        images = torch.randn(batch, 3, size, size, generator=generator)
        data.append((images, torch.randint(0, num_classes, (batch,), generator=generator)))
    return data


def as_delivered(data: list[tuple[torch.Tensor, ...]], channels_last: bool) -> list[tuple[torch.Tensor, ...]]:
    """The batches in the layout the backend's input pipeline hands its training step.

    Ours writes channels_last batches itself (the fast pipeline's batch step, timed by the data rows),
    so its channels_last backends get them that way rather than converting NCHW ones inside the timed
    step, a 4 ms copy per x0.5 batch of 32 that our training loop never makes; torchvision's pipeline
    delivers NCHW.  The values are the same either way."""
    if not channels_last:
        return data
    return [(images.contiguous(memory_format=torch.channels_last), *rest) for images, *rest in data]


def loss_trajectory(step: Step, data: list[tuple[torch.Tensor, ...]]) -> list[float]:
    return [float(step(images, labels)) for images, labels in data]


def benchmark_training(
    names: list[str],
    batches_: list[int],
    backends: list[str],
    threads: int = 2,
    warmup: int = 3,
    repeats: int = 7,
    steps: int = 0,
    image_size: int = 224,
    check_steps: int = 6,
    device: str = "cpu",
    amp: torch.dtype | None = None,
) -> list[TrainRow]:
    """Every (model, batch, backend) training row; ``steps`` per round (0: rounds of about a second).

    ``amp`` runs every backend under autocast (the numerics check then compares like with like)."""
    torch.set_num_threads(threads)
    target = torch.device(device)
    rows: list[TrainRow] = []
    for name in names:
        ours, theirs = (net.to(target) for net in twin_networks(name))
        for batch in batches_:
            check = [(x.to(target), y.to(target)) for x, y in batches(check_steps, batch, image_size, 1000, seed=1)]
            runs, setups, trajectories = [], [], []
            for backend in backends:
                start = time.perf_counter()
                net, channels_last = prepare(backend, ours, theirs)
                step = step_function(net, channels_last, amp=amp)
                inputs = as_delivered(check, channels_last)
                losses = loss_trajectory(step, inputs[:1])  # the first step: compilation, warm-up
                setups.append(time.perf_counter() - start)
                trajectories.append(losses + loss_trajectory(step, inputs[1:]))
                images, labels = inputs[0]
                for _ in range(warmup):
                    step(images, labels)
                per_round = steps or max(1, round(1.0 / max(_time_one(step, images, labels), 1e-6)))
                runs.append((lambda step=step, images=images, labels=labels: _timed(step, images, labels), per_round))
            comparable = [b for b in backends if b not in NOT_TORCHVISIONS_FUNCTION]
            reference = "torchvision-eager" if "torchvision-eager" in backends else (comparable or backends)[0]
            baseline = trajectories[backends.index(reference)]
            floor = noise_floor(theirs, check, amp)
            measured = interleaved_rounds(runs, batch, repeats, threads)
            for backend, setup, losses, rates in zip(backends, setups, trajectories, measured, strict=True):
                median = statistics.median(rates)
                worst = None if backend in NOT_TORCHVISIONS_FUNCTION else relative_difference(losses, baseline)
                spread = (min(rates), max(rates))
                step_ms = 1000 * batch / median
                rows.append(TrainRow(name, batch, backend, median, spread, step_ms, setup, worst, floor, rates))
                print(format_train_row(rows[-1]), flush=True)
    return rows


def relative_difference(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def noise_floor(theirs: nn.Module, check: list[tuple[torch.Tensor, ...]], amp: torch.dtype | None = None) -> float:
    """How far rounding alone (float32, or ``amp``'s autocast) takes torchvision's own trajectory from its
    float64 one."""
    single = loss_trajectory(step_function(copy.deepcopy(theirs), False, amp=amp), check)
    double = loss_trajectory(step_function(copy.deepcopy(theirs).double(), False), [(x.double(), y) for x, y in check])
    return relative_difference(single, double)


def _timed(step: Step, images: torch.Tensor, labels: torch.Tensor) -> None:
    step(images, labels)
    synchronize(images.device)


def _time_one(step: Step, images: torch.Tensor, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    _timed(step, images, labels)
    return time.perf_counter() - start


def format_train_row(row: TrainRow) -> str:
    low, high = row.spread
    return (
        f"{row.model:20s} b{row.batch:<4d} train {row.backend:22s} {row.images_per_second:8.1f} img/s "
        f"({low:.1f}..{high:.1f})  {row.step_ms:8.1f} ms/step  setup {row.setup_seconds:.1f} s  "
        + (
            f"loss vs torchvision {row.max_relative_loss_difference:.1e} (float32 noise {row.float32_noise_floor:.1e})"
            if row.max_relative_loss_difference is not None
            else "(MindCV's network: not torchvision's function)"
        )
    )
