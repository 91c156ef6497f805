"""Learning-rate schedule, optimizer, loss, EMA and gradient clipping, with MindCV's semantics.

MindCV builds all of these from the same config keys (``mindcv/scheduler``, ``mindcv/optim``,
``mindcv/loss``, ``mindcv/utils/train_step.py``); each builder here reads a ``Config`` and says
where it had to choose between MindSpore's and PyTorch's behaviour.

The LR schedule is a plain per-step list, as in MindCV: the trainer calls
``set_lr(optimizer, schedule[global_step])`` before every optimizer step, so a resumed run picks up
the exact value by indexing and no ``LRScheduler`` state has to be saved.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ConfigError

__all__ = [
    "MindSporeRMSProp",
    "ModelEMA",
    "build_loss",
    "build_optimizer",
    "clip_gradients",
    "lr_schedule",
    "param_groups",
    "set_lr",
    "unwrap_model",
]

ADAM_EPS = 1e-8  # MindSpore's Adam and MindCV's AdamW default; MindCV forwards cfg.eps to RMSProp only

# ---------------------------------------------------------------- learning-rate schedule


def _warmup(cfg: Config, epoch: float) -> float:
    """MindCV's ``linear_lr``/``linear_refined_lr`` from ``lr * warmup_factor`` up to ``lr``."""
    fraction = min(epoch, cfg.warmup_epochs) / cfg.warmup_epochs
    start = cfg.lr * cfg.warmup_factor
    return start + fraction * (cfg.lr - start)


def _cosine(cfg: Config, step: int, steps_per_epoch: int, stair: bool) -> float:
    """MindCV's ``cosine_decay_(refined_)lr``: ``num_cycles`` restarts, then ``min_lr`` to the end.

    ``step`` counts from the end of warmup.  Within a cycle the cosine never quite reaches
    ``min_lr`` (its last step is ``1/steps_per_epoch`` epoch short of ``decay_epochs``); the steps after
    the last cycle are ``min_lr`` exactly.
    """
    cycle_steps = cfg.decay_epochs * steps_per_epoch
    cycle, within = divmod(step, cycle_steps)
    if cycle >= cfg.num_cycles:
        return cfg.min_lr
    t = within // steps_per_epoch if stair else within / steps_per_epoch
    peak = cfg.lr * cfg.cycle_decay**cycle
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * t / cfg.decay_epochs))


def _linear(cfg: Config, step: int, main_steps: int, steps_per_epoch: int, stair: bool) -> float:
    """Megvii's official recipe: straight from ``lr`` down to ``min_lr`` at the last step."""
    if stair:
        position, end = step // steps_per_epoch, (main_steps - 1) // steps_per_epoch
    else:
        position, end = step / steps_per_epoch, (main_steps - 1) / steps_per_epoch
    if end <= 0:
        return cfg.min_lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * position / end


def _check_schedule(cfg: Config, steps_per_epoch: int) -> None:
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    if cfg.scheduler in ("cosine_decay", "warmup_cosine_decay", "step_decay") and cfg.decay_epochs < 1:
        raise ConfigError(f"scheduler {cfg.scheduler} needs decay_epochs of at least 1, got {cfg.decay_epochs}")
    if cfg.num_cycles < 1:
        raise ConfigError(f"num_cycles must be at least 1, got {cfg.num_cycles}")


def lr_schedule(cfg: Config, steps_per_epoch: int) -> list[float]:
    """One learning rate per optimizer step, ``cfg.epoch_size * steps_per_epoch`` of them.

    As in MindCV's ``create_scheduler``: ``warmup_epochs`` of linear warmup from
    ``lr * warmup_factor``, then the named decay, whose epochs count from the end of warmup.  The
    position is the fractional epoch ``step / steps_per_epoch``, or the whole epoch when
    ``lr_epoch_stair`` (MindCV's non-"refined" variants).

    - ``cosine_decay`` / ``warmup_cosine_decay`` (the same in MindCV): ``min_lr + (peak - min_lr)
      (1 + cos(pi t / decay_epochs)) / 2``, restarting every ``decay_epochs`` for ``num_cycles``
      cycles with ``peak = lr * cycle_decay ** cycle``, then ``min_lr`` to the end.
    - ``constant``: ``lr``.
    - ``step_decay``: ``lr * decay_rate ** (epochs_after_warmup // decay_epochs)``.
    - ``multi_step_decay``: ``lr * decay_rate ** (milestones passed)``.  MindCV counts the milestones
      from the end of warmup (its ``multi_step_lr`` runs over the post-warmup epochs only): with
      warmup 3 and milestones (30, 60) the drops come at absolute epochs 33 and 63.  So do we.
    - ``linear_decay`` (not in MindCV; Megvii's official recipe): from ``lr`` to ``min_lr`` at the
      last step, over the whole post-warmup run (``decay_epochs`` is not used).

    Step and multi-step decay are per whole epoch in MindCV whatever ``lr_epoch_stair`` says, which
    is the same as flooring the fractional epoch because their epoch counts are integers.  A warmup
    longer than the run is cut at the run's end.
    """
    _check_schedule(cfg, steps_per_epoch)
    stair = cfg.lr_epoch_stair
    total = cfg.epoch_size * steps_per_epoch
    warmup_steps = min(cfg.warmup_epochs * steps_per_epoch, total)
    main_steps = total - warmup_steps
    milestones = sorted(cfg.multi_step_decay_milestones)
    lrs: list[float] = []
    for step in range(total):
        if step < warmup_steps:
            lrs.append(_warmup(cfg, step // steps_per_epoch if stair else step / steps_per_epoch))
            continue
        j = step - warmup_steps  # steps since the end of warmup
        epoch = j // steps_per_epoch  # whole post-warmup epochs
        if cfg.scheduler in ("cosine_decay", "warmup_cosine_decay"):
            lrs.append(_cosine(cfg, j, steps_per_epoch, stair))
        elif cfg.scheduler == "constant":
            lrs.append(cfg.lr)
        elif cfg.scheduler == "step_decay":
            lrs.append(cfg.lr * cfg.decay_rate ** (epoch // cfg.decay_epochs))
        elif cfg.scheduler == "multi_step_decay":
            lrs.append(cfg.lr * cfg.decay_rate ** sum(epoch >= m for m in milestones))
        elif cfg.scheduler == "linear_decay":
            lrs.append(_linear(cfg, j, main_steps, steps_per_epoch, stair))
        else:
            raise ConfigError(f"unknown scheduler {cfg.scheduler!r}")
    return lrs


def lr_batch_note(cfg: Config, world_size: int, batches_per_epoch: int) -> str | None:
    """How to match the images per optimizer step that lr was tuned for (``lr_global_batch``), when this
    run takes another number; None when it matches or the config does not say.

    Only a note: lr is never rescaled, as in MindCV, so the value in a recipe is the value used.  A
    MindCV ImageNet recipe run on one GPU would otherwise take 64 images per step at the learning rate
    tuned for 512, without a word.
    """
    tuned, accum = cfg.lr_global_batch, cfg.gradient_accumulation_steps
    per_batch = cfg.batch_size * world_size
    per_step = per_batch * accum
    if tuned is None or per_step == tuned:
        return None
    ratio = per_step / tuned
    ways = []
    if tuned % per_batch == 0 and tuned // per_batch <= batches_per_epoch:  # an epoch must hold one step
        ways.append(f"--gradient_accumulation_steps {tuned // per_batch} (its {tuned} images per step)")
    scaled = f"--lr {cfg.lr * ratio:.6g}" + (f" --min_lr {cfg.min_lr * ratio:.6g}" if cfg.min_lr else "")
    ways.append(f"the learning rates scaled linearly, {scaled}")
    accumulated = f" x {accum} accumulated" if accum > 1 else ""
    return (
        f"note: lr {cfg.lr:g} was tuned for {tuned} images per optimizer step (lr_global_batch), and this run "
        f"takes {per_step} ({cfg.batch_size} per device x {world_size} device{'s' if world_size > 1 else ''}"
        f"{accumulated}). To follow the "
        f"recipe: {', or '.join(ways)}"
    )


def lr_span_note(cfg: Config, schedule: Sequence[float]) -> str | None:
    """What happens when a cosine schedule and the run do not end together; None when they do.

    MindCV pads the schedule with ``min_lr`` past ``warmup_epochs + decay_epochs * num_cycles`` and cuts it at
    the run's end, and so do we, without a word in either case.  Both are easy to reach by changing one
    number of a recipe: ``--epoch_size 20`` on the 60-epoch CIFAR-10 recipe stops at 0.78 x lr, never
    annealed, and a longer ``epoch_size`` alone adds epochs at ``min_lr``, which is 0 in every recipe:
    those train nothing.
    """
    if cfg.scheduler not in ("cosine_decay", "warmup_cosine_decay") or not schedule:
        return None
    end = cfg.warmup_epochs + cfg.decay_epochs * cfg.num_cycles
    if end == cfg.epoch_size:
        return None
    cycles = f" x num_cycles {cfg.num_cycles}" if cfg.num_cycles > 1 else ""
    span = f"warmup_epochs {cfg.warmup_epochs} + decay_epochs {cfg.decay_epochs}{cycles} = {end}"
    advice = _span_that_fits(cfg)
    advice = f"; {advice} ends the schedule with the run" if advice else ""
    if end < cfg.epoch_size:
        idle = cfg.epoch_size - end
        if idle == 1:
            last, they = f"last epoch of this {cfg.epoch_size}-epoch run trains", "it changes"
        else:
            last = f"last {idle} epochs of this {cfg.epoch_size}-epoch run ({end + 1}-{cfg.epoch_size}) train"
            they = "they change"
        nothing = f" (with lr 0 {they} no weight, only BatchNorm's running statistics)" if cfg.min_lr == 0 else ""
        return (
            f"note: the learning-rate schedule ends after epoch {end} ({span}), so the {last} at min_lr "
            f"{cfg.min_lr:g}{nothing}{advice}"
        )
    share = f" ({schedule[-1] / cfg.lr:.0%} of lr)" if cfg.lr > 0 else ""
    return (
        f"note: this run ends after epoch {cfg.epoch_size}, before its learning-rate schedule does ({span}): "
        f"its last lr is {schedule[-1]:.4g}{share}, not min_lr {cfg.min_lr:g}{advice}"
    )


def _span_that_fits(cfg: Config) -> str:
    """The flags that end the cosine with the run: ``--decay_epochs`` alone while the warmup fits in it;
    for a run no longer than its warmup (a quick trial of a 4 + 246 epoch recipe), both, with the warmup's
    share of the recipe kept.  Empty when the epochs do not split into ``num_cycles`` cycles."""
    warmup = cfg.warmup_epochs
    if warmup >= cfg.epoch_size:
        warmup = min(round(warmup * cfg.epoch_size / (warmup + cfg.decay_epochs * cfg.num_cycles)), cfg.epoch_size - 1)
    decay, rest = divmod(cfg.epoch_size - warmup, cfg.num_cycles)
    if decay < 1 or rest:
        return ""
    return (
        f"--decay_epochs {decay}" if warmup == cfg.warmup_epochs else f"--warmup_epochs {warmup} --decay_epochs {decay}"
    )


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set every param group's lr to ``value`` times the group's ``lr_scale`` (default 1).

    Used instead of a ``LambdaLR`` so that the schedule stays one list indexed by global step.
    """
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)


# ---------------------------------------------------------------- parameter groups and optimizers

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)


def param_groups(model: nn.Module, weight_decay: float, weight_decay_filter: str) -> list[dict[str, Any]]:
    """The model's trainable parameters split by whether weight decay applies, as MindCV does.

    - ``disable``: every parameter is decayed.
    - ``auto``: MindCV passes no filter and lets ``mindspore.nn.Optimizer`` apply its default one,
      which skips parameters whose names contain ``gamma`` or ``beta``, i.e. the affine terms of norm
      layers, and nothing else.  So the weight and bias of every norm layer are not decayed, while
      other biases (here only the optional classifier bias: the convolutions have none) ARE decayed.
      Norm layers are recognised by type, since PyTorch calls gamma/beta ``weight``/``bias``.
    - ``norm_and_bias``: norm-layer parameters and every bias are not decayed (MindCV matches the
      names ``gamma``, ``beta`` and ``bias``).

    Each group carries ``weight_decay`` and a ``name``; empty groups are left out.
    """
    if weight_decay_filter not in ("disable", "auto", "norm_and_bias"):
        raise ConfigError(
            f"weight_decay_filter must be one of disable, auto, norm_and_bias, got {weight_decay_filter!r}"
        )
    exempt: set[int] = set()
    if weight_decay_filter != "disable":
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                is_norm = isinstance(module, _NORM_TYPES)
                if is_norm or (weight_decay_filter == "norm_and_bias" and name == "bias"):
                    exempt.add(id(param))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():  # de-duplicated, in definition order
        if param.requires_grad:
            (no_decay if id(param) in exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [group for group in groups if group["params"]]


class MindSporeRMSProp(torch.optim.Optimizer):
    """``mindspore.nn.RMSProp`` (non-centred), which ``torch.optim.RMSprop`` does not reproduce.

    MindSpore (TensorFlow's formulation) differs from PyTorch in three ways that change the
    trajectory: the mean square starts at ONE (PyTorch: zero, which makes early steps ~3x larger
    with decay 0.9), ``eps`` is added inside the square root (with MindCV's eps 1e-10 PyTorch would
    need 1e-5 outside it), and the learning rate enters the momentum buffer:

        s = decay * s + (1 - decay) * g**2
        m = momentum * m + lr * g / sqrt(s + eps)
        w = w - m

    Weight decay is added to the gradient first (``g + wd * w``), as every MindSpore optimizer does.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        decay: float = 0.9,
        momentum: float = 0.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
    ) -> None:
        if not 0.0 <= decay < 1.0 or momentum < 0.0 or eps <= 0.0 or lr < 0.0:
            raise ValueError(f"invalid RMSProp settings: lr {lr}, decay {decay}, momentum {momentum}, eps {eps}")
        defaults = {"lr": lr, "decay": decay, "momentum": momentum, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                if not state:
                    state["mean_square"] = torch.ones_like(param)
                    state["moment"] = torch.zeros_like(param)
                mean_square, moment = state["mean_square"], state["moment"]
                mean_square.mul_(group["decay"]).addcmul_(grad, grad, value=1.0 - group["decay"])
                update = grad / (mean_square + group["eps"]).sqrt()
                moment.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                param.sub_(moment)
        return loss


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """MindCV's ``create_optimizer`` for ``cfg.opt``, with weight decay by ``param_groups``.

    The constructor lr is ``cfg.lr``; it is only a placeholder, because the trainer calls
    ``set_lr(optimizer, schedule[step])`` before every step, step 0 included (whose scheduled lr is
    0 with MindCV's default ``warmup_factor`` 0).

    - ``momentum`` (``mindspore.nn.Momentum``): ``torch.optim.SGD(momentum, nesterov=use_nesterov)``
      with dampening 0.  The two are the same update: MindSpore adds weight decay to the gradient
      before the momentum (``g = grad + wd * w``), then ``v = momentum * v + g`` and ``w -= lr * v``
      (Nesterov: ``w -= lr * (g + momentum * v)``), with the lr outside the buffer; PyTorch's SGD
      does exactly this (its first step sets ``v = g``, MindSpore's ``v = 0 * momentum + g``).
    - ``sgd`` (``mindspore.nn.SGD``, which MindCV also gives ``momentum`` and ``nesterov``): the same
      torch SGD; ``momentum`` 0 makes it plain SGD.
    - ``nesterov``: SGD with Nesterov momentum.  (MindCV maps the name to ``nn.Momentum`` and still
      takes Nesterov from ``use_nesterov``, so its "nesterov" is plain momentum unless that is also
      set; we read the name as asking for Nesterov.)
    - ``adam``: ``torch.optim.Adam`` (L2 weight decay added to the gradient, like MindSpore's Adam).
      MindSpore's Nesterov variant of Adam is not implemented: ``use_nesterov`` with ``adam`` is an
      error rather than silently different.
    - ``adamw``: ``torch.optim.AdamW`` (decoupled ``w -= lr * wd * w``), the same update as
      MindCV's own AdamW.
    - ``rmsprop``: ``MindSporeRMSProp`` with MindSpore's decay 0.9, ``momentum`` and ``eps`` from the
      config (MindCV passes exactly these).

    ``eps``: MindCV forwards ``cfg.eps`` (default 1e-10) to RMSProp only; Adam and AdamW keep
    MindSpore's/MindCV's 1e-8, and so do ours.  Betas are the usual (0.9, 0.999).
    """
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_filter)
    opt = cfg.opt
    if opt in ("momentum", "sgd", "nesterov"):
        nesterov = opt == "nesterov" or cfg.use_nesterov
        if nesterov and cfg.momentum <= 0:
            raise ConfigError(f"Nesterov momentum needs momentum > 0, got momentum {cfg.momentum}")
        if cfg.momentum < 0:
            raise ConfigError(f"momentum must not be negative, got {cfg.momentum}")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=0.0, nesterov=nesterov)
    if opt == "adam":
        if cfg.use_nesterov:
            raise ConfigError("use_nesterov is not supported with opt adam; set use_nesterov False")
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=ADAM_EPS)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=ADAM_EPS)
    if opt == "rmsprop":
        return MindSporeRMSProp(groups, lr=cfg.lr, decay=0.9, momentum=cfg.momentum, eps=cfg.eps)
    raise ConfigError(f"unknown optimizer {opt!r}; choose one of momentum, sgd, nesterov, adam, adamw, rmsprop")


# ---------------------------------------------------------------- loss


def _soft_targets(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Class indices become one-hot rows; probability rows (mixup/cutmix) are kept; then smoothing."""
    if target.ndim == 1 and not target.is_floating_point():
        target = F.one_hot(target.long(), num_classes)
    target = target.float()
    return target * (1.0 - smoothing) + smoothing / num_classes if smoothing else target


def build_loss(cfg: Config, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(logits, target)`` for ``cfg.loss`` with ``cfg.label_smoothing``, computed in float32.

    Targets are class indices ``[N]`` or probability rows ``[N, C]`` (mixup/cutmix); smoothing is
    ``t * (1 - s) + s / C`` for both, so index targets and their one-hot rows give the same loss.

    - ``CE``: MindCV's ``CrossEntropySmooth``, i.e. ``(1 - s) * nll + s * mean_c(-log p_c)``
      averaged over the batch (PyTorch's ``label_smoothing`` is the same formula).
    - ``BCE``: MindCV's ``BinaryCrossEntropySmooth``: sigmoid cross-entropy of every logit against
      the (smoothed) one-hot targets, mean-reduced over all ``N * C`` elements as MindSpore's
      ``binary_cross_entropy_with_logits(reduction="mean")`` does (not summed over classes).

    Autocast is switched off inside so that low-precision logits are upcast, not the reverse.
    """
    smoothing = cfg.label_smoothing
    if cfg.loss not in ("CE", "BCE"):
        raise ConfigError(f"loss must be CE or BCE, got {cfg.loss!r}")

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            logits = logits.float()
            if cfg.loss == "BCE":
                return F.binary_cross_entropy_with_logits(logits, _soft_targets(target, num_classes, smoothing))
            if target.ndim == 1 and not target.is_floating_point():
                return F.cross_entropy(logits, target, label_smoothing=smoothing)
            soft = _soft_targets(target, num_classes, smoothing)
            return -(soft * F.log_softmax(logits, dim=-1)).sum(-1).mean()

    return loss


# ---------------------------------------------------------------- EMA


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain network inside DistributedDataParallel/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class ModelEMA:
    """MindCV's EMA of the weights (``ema``, ``ema_decay``), kept in a separate model for evaluation.

    After each optimizer step ``update(model)`` does, with ``updates`` counting the calls,

        d = ema_decay * (1 - exp(-updates / 2000))
        ema = ema * d + w * (1 - d)

    so early on the average follows the model closely (MindCV's ``TrainStep.ema_update``).

    What is averaged: MindCV averages ``network.get_parameters()``, which in MindSpore includes the
    BatchNorm moving mean and variance (they are Parameters there, buffers here).  So by default
    floating-point buffers are averaged with the same ``d`` too, and integer ones
    (``num_batches_tracked``) are copied.  ``average_buffers=False`` copies all buffers from the model
    instead (the EMA weights then get the live model's BN statistics).

    ``.module`` is the averaged network (eval mode, no gradients).  ``state_dict()`` carries
    ``updates`` so a resumed run continues the same decay warm-up.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, updates: int = 0, average_buffers: bool = True) -> None:
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.decay = decay
        self.updates = updates
        self.average_buffers = average_buffers

    def decay_at(self, updates: int) -> float:
        """MindCV's warmed-up decay after ``updates`` updates."""
        return self.decay * (1.0 - math.exp(-updates / 2000.0))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (call after each optimizer step)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        source = unwrap_model(model)
        averaged, current = list(self.module.parameters()), [p.detach() for p in source.parameters()]
        copied: list[tuple[torch.Tensor, torch.Tensor]] = []
        for mine, theirs in zip(self.module.buffers(), source.buffers(), strict=True):
            if self.average_buffers and mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs)
            else:
                copied.append((mine, theirs))
        if averaged:
            torch._foreach_mul_(averaged, d)
            torch._foreach_add_(averaged, current, alpha=1.0 - d)
        for mine, theirs in copied:
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averaged weights and the update count (the decay stays the configured one)."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


# ---------------------------------------------------------------- gradient clipping


def clip_gradients(parameters: Iterable[torch.Tensor], cfg: Config) -> torch.Tensor | None:
    """When ``cfg.clip_grad``, clip by global norm to ``cfg.clip_value`` and return the norm before clipping.

    MindCV uses ``ops.clip_by_global_norm(grads, clip_value)`` on the unscaled gradients; with AMP
    the trainer must unscale them first (``GradScaler.unscale_``).  Returns None when clipping is off.
    """
    if not cfg.clip_grad:
        return None
    return torch.nn.utils.clip_grad_norm_(parameters, cfg.clip_value)
