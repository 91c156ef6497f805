"""The training loop and evaluation: one explicit loop, MindCV's semantics, honest measurements.

``train(cfg)`` is what ``train.py`` runs, alone or under torchrun; ``evaluate`` is shared with
``validate.py``.  Per step the loop does only device work; numbers reach the host at log points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from . import data as data_mod
from . import distributed as dist
from . import optim
from .config import Config, ConfigError, to_yaml
from .errors import ShuffleNetV2Error
from .factory import create_model
from .fileio import atomic_path
from .runlog import RunRecord, plot_curves, setup_logger
from .weights import load_weights, read_weights, save_weights


class TrainingError(ShuffleNetV2Error, RuntimeError):
    """Training cannot go on (a NaN loss, a bad resume); earlier checkpoints are untouched."""


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int

    def as_mindcv(self) -> dict[str, float]:
        return {"Top_1_Accuracy": self.top1, "Top_5_Accuracy": self.top5, "loss": self.loss}


@dataclass
class RunResult:
    run_dir: Path
    epochs: int
    last: EvalResult | None
    best_top1: float | None
    best_path: Path | None
    last_checkpoint: Path | None


# --- precision -------------------------------------------------------------------------------------


@dataclass
class Precision:
    """MindCV's amp_level on autocast: O0 is float32; O1-O3 run convolutions and matmuls in a 16-bit type.

    autocast keeps BatchNorm and reductions in float32 for every level (MindCV's O2 behaviour); O3's
    all-float16 BatchNorm is deliberately not reproduced.  float16 uses loss scaling: ``fixed`` scales
    by ``loss_scale`` (and, as MindSpore, still applies an overflowed update unless
    ``drop_overflow_update``), ``dynamic``/``auto`` use GradScaler, which skips overflowed steps.
    """

    dtype: torch.dtype | None
    scale_mode: str  # "none", "fixed", "dynamic"
    loss_scale: float
    drop_overflow_update: bool

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device) -> Precision:
        if cfg.amp_level == "O0":
            return cls(None, "none", 1.0, cfg.drop_overflow_update)
        want = cfg.amp_dtype
        if want == "auto":
            bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
            want = "bfloat16" if bf16_ok else "float16"
        if want == "float16" and device.type == "cpu":
            raise ConfigError(
                f"amp_level {cfg.amp_level} with float16 needs a GPU: float16 autocast on a CPU is slow and "
                "unsupported for training here; use amp_dtype bfloat16 (or auto), or amp_level O0"
            )
        dtype = torch.bfloat16 if want == "bfloat16" else torch.float16
        mode = "none" if dtype == torch.bfloat16 else ("fixed" if cfg.loss_scale_type == "fixed" else "dynamic")
        return cls(dtype, mode, cfg.loss_scale, cfg.drop_overflow_update)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def describe(self) -> str:
        if self.dtype is None:
            return "float32"
        scale = "" if self.scale_mode == "none" else f", {self.scale_mode} loss scale {self.loss_scale:g}"
        return f"autocast {str(self.dtype).replace('torch.', '')}{scale}"


# --- helpers ----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of top-1 and top-5 hits (top-k capped at the class count), as device tensors."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(target[:, None])
    return hits[:, 0].sum(), hits.any(dim=1).sum()


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, precision: Precision | None = None
) -> EvalResult:
    """Top-1, top-5 and mean cross-entropy over every sample of ``loader`` summed over all ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count
    autocast = precision.autocast(device) if precision else contextlib.nullcontext()
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy_counts(logits, target)
        totals += torch.stack(
            [top1.double(), top5.double(), F.cross_entropy(logits, target, reduction="sum").double(),
             torch.tensor(float(target.numel()), dtype=torch.float64, device=device)]
        )  # fmt: skip
    dist.all_reduce_sum(totals)
    top1, top5, loss_sum, count = totals.tolist()
    if count == 0:
        raise ShuffleNetV2Error("the validation split holds no images")
    return EvalResult(top1 / count, top5 / count, loss_sum / count, int(count))


def eval_loader(cfg: Config, dataset: torch.utils.data.Dataset, ctx: dist.Context) -> torch.utils.data.DataLoader:
    """This rank's unpadded shard of ``dataset``, so every image is counted exactly once."""
    return data_mod.build_loader(cfg, dataset, train=False, rank=ctx.rank, world_size=ctx.world_size)


# --- the run ----------------------------------------------------------------------------------------


class Trainer:
    """Everything one training run holds; ``run()`` is the loop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ctx = dist.setup(cfg)
        self.run_dir = Path(cfg.output_dir or cfg.ckpt_save_dir)
        self.log = setup_logger(self.run_dir, self.ctx.rank)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.seed + self.ctx.rank)
        self.precision = Precision.from_config(cfg, self.ctx.device)

        self.train_set = data_mod.build_dataset(cfg, cfg.train_split, train=True)
        self.val_set = data_mod.build_dataset(cfg, cfg.val_split, train=False) if cfg.val_while_train else None
        classes = len(self.train_set.classes)
        if classes != cfg.num_classes:
            raise ConfigError(
                f"num_classes is {cfg.num_classes} but {cfg.train_split!r} holds {classes} classes; "
                f"set num_classes {classes}"
            )
        self.train_loader = data_mod.build_loader(
            cfg, self.train_set, train=True, rank=self.ctx.rank, world_size=self.ctx.world_size, seed=cfg.seed
        )
        self.val_loader = eval_loader(cfg, self.val_set, self.ctx) if self.val_set is not None else None
        self.batches_per_epoch = len(self.train_loader)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"the training split has {len(self.train_set)} images, fewer than one batch of {cfg.batch_size} "
                f"per device x {self.ctx.world_size} devices with drop_remainder True; lower batch_size"
            )
        self.accum = cfg.gradient_accumulation_steps
        self.steps_per_epoch = max(1, self.batches_per_epoch // self.accum)  # optimizer steps
        self.mixup = data_mod.build_mixup(cfg, cfg.num_classes)

        model = create_model(
            cfg.model,
            num_classes=cfg.num_classes,
            in_channels=cfg.in_channels,
            pretrained=cfg.pretrained,
            checkpoint_path=None,
        )
        self.model = model.to(self.ctx.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = optim.build_optimizer(cfg, self.model)
        self.schedule = optim.lr_schedule(cfg, self.steps_per_epoch)
        self.loss_fn = optim.build_loss(cfg, cfg.num_classes)
        self.ema = optim.ModelEMA(self.model, cfg.ema_decay) if cfg.ema else None
        self.scaler = (
            torch.amp.GradScaler(self.ctx.device.type, init_scale=cfg.loss_scale)
            if self.precision.scale_mode == "dynamic"
            else None
        )
        self.keeper = (
            ckpt.CheckpointKeeper(Path(cfg.ckpt_save_dir), cfg.model, cfg.ckpt_save_policy, cfg.keep_checkpoint_max)
            if self.ctx.is_main
            else None
        )
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimizer steps taken
        self.best_top1: float | None = None
        self.best_path: Path | None = None
        self.last_checkpoint: Path | None = None
        self.resumed = self._maybe_resume()
        self.compile_reported = False

        net: nn.Module = self.model
        if self.ctx.distributed:
            if cfg.sync_bn:
                net = dist.convert_sync_batchnorm(net, self.ctx.device)
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            net = DistributedDataParallel(net, device_ids=ids)
        self.net = torch.compile(net) if cfg.mode == 0 else net
        self.eval_net = self.ema.module if self.ema is not None else self.model
        if cfg.mode == 0:
            self.eval_net = torch.compile(self.eval_net)

    # -- resume --------------------------------------------------------------------------------------

    def _maybe_resume(self) -> bool:
        cfg = self.cfg
        ref = None
        if cfg.auto_resume:
            found = ckpt.list_checkpoints(Path(cfg.ckpt_save_dir), cfg.model)
            ref = found[-1] if found else None
            if ref is None:
                self.log.info(f"auto_resume: no checkpoint in {cfg.ckpt_save_dir} yet, starting from scratch")
        if ref is None and cfg.ckpt_path:
            beside = ckpt.resolve_resume(cfg.ckpt_path)  # the run checkpoint that path belongs to, if any
            source = beside.weights if cfg.ckpt_path.endswith(ckpt.STATE_SUFFIX) else Path(cfg.ckpt_path)
            load_weights(self.model, read_weights(source), drop_classifier=False)
            self._reseed_ema()
            self.log.info(f"loaded weights from {source}")
            if not cfg.resume_opt:
                return False
            ref = beside
        elif ref is not None:
            load_weights(self.model, read_weights(ref.weights))
            self._reseed_ema()
        if ref is None:
            return False
        state = ckpt.load_state(ref.state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.best_top1 = state.get("best_top1")
        ckpt.set_rng_state(state["rng"][min(self.ctx.rank, len(state["rng"]) - 1)])
        self.log.info(f"resumed from {ref.weights} at epoch {self.epoch}, optimizer step {self.global_step}")
        return True

    def _reseed_ema(self) -> None:
        """The average starts from the loaded weights, not from the random initialisation."""
        if self.ema is not None:
            self.ema = optim.ModelEMA(self.model, self.cfg.ema_decay)

    def _state(self) -> dict[str, Any]:
        rng = dist.all_gather_object(ckpt.rng_state())  # one entry per rank
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best_top1": self.best_top1,
            "rng": rng,
            "config": dataclasses.asdict(self.cfg),
        }

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg, ctx, log = self.cfg, self.ctx, self.log
        if ctx.is_main:
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(to_yaml(cfg))
        record = RunRecord(self.run_dir, resume=self.resumed) if ctx.is_main else None
        global_batch = cfg.batch_size * ctx.world_size
        log.info(
            f"{cfg.model}: {data_mod.describe_dataset(self.train_set)}; {self.batches_per_epoch} batches/epoch of "
            f"{cfg.batch_size} per device x {ctx.world_size} = {global_batch}; device {ctx.device}; "
            f"{self.precision.describe()}; mode {cfg.mode} ({'torch.compile' if cfg.mode == 0 else 'eager'})"
        )
        last_eval = None
        run_start = time.perf_counter()
        self.first_epoch = self.epoch
        for epoch in range(self.epoch, cfg.epoch_size):
            train_start = time.perf_counter()
            train_loss, lr = self._train_epoch(epoch)
            train_time = time.perf_counter() - train_start
            self.epoch = epoch + 1
            row: dict[str, Any] = {"epoch": self.epoch, "train_loss": train_loss, "lr": lr, "train_time": train_time}
            eval_time, epoch_eval = 0.0, None
            if self.val_loader is not None and (self.epoch % cfg.val_interval == 0 or self.epoch == cfg.epoch_size):
                eval_start = time.perf_counter()
                last_eval = epoch_eval = evaluate(self.eval_net, self.val_loader, ctx.device, self.precision)
                eval_time = time.perf_counter() - eval_start
                if cfg.mode == 0 and epoch == self.first_epoch:
                    log.info(f"torch.compile (mode 0): first validation took {eval_time:.1f} s, compilation included")
                row.update(top1=last_eval.top1, top5=last_eval.top5, val_loss=last_eval.loss)
                log.info(
                    f"Epoch {self.epoch}/{cfg.epoch_size} validation: top-1 {100 * last_eval.top1:.2f}%  "
                    f"top-5 {100 * last_eval.top5:.2f}%  loss {last_eval.loss:.4f}  "
                    f"({last_eval.count} images, {eval_time:.1f} s)"
                )
            row.update(eval_time=eval_time, total_time=time.perf_counter() - train_start)
            self._save(epoch_eval)
            if record is not None:
                record.add(row)
                plot_curves(record.metrics, self.run_dir / "curves.png")
        total = time.perf_counter() - run_start
        log.info(f"training finished: {cfg.epoch_size} epochs in {total:.1f} s; run directory {self.run_dir}")
        dist.barrier()
        return RunResult(self.run_dir, self.epoch, last_eval, self.best_top1, self.best_path, self.last_checkpoint)

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        cfg, ctx = self.cfg, self.ctx
        device = ctx.device
        self.net.train()
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        use_mixup = self.mixup is not None and (cfg.mixup_off_epoch <= 0 or epoch < cfg.mixup_off_epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        global_batch = cfg.batch_size * ctx.world_size
        interval_start = time.perf_counter()
        data_wait = 0.0
        interval_steps = 0
        interactive = ctx.is_main and sys.stdout.isatty()
        lr = self.schedule[min(self.global_step, len(self.schedule) - 1)]
        batches = self.batches_per_epoch
        self.optimizer.zero_grad(set_to_none=True)
        it = iter(self.train_loader)
        for batch_index in range(batches):
            wait_start = time.perf_counter()
            try:
                images, target = next(it)
            except StopIteration:
                break
            data_wait += time.perf_counter() - wait_start
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if use_mixup:
                images, target = self.mixup(images, target)
            boundary = (batch_index + 1) % self.accum == 0
            if boundary or batch_index == 0:
                lr = self.schedule[min(self.global_step, len(self.schedule) - 1)]
                optim.set_lr(self.optimizer, lr)
            sync = contextlib.nullcontext()
            if ctx.distributed and not boundary and hasattr(self.net, "no_sync"):
                sync = self.net.no_sync()
            with sync:
                with self.precision.autocast(device):
                    logits = self.net(images)
                loss = self.loss_fn(logits.float(), target)
                scaled = loss / self.accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                elif self.precision.scale_mode == "fixed":
                    (scaled * self.precision.loss_scale).backward()
                else:
                    scaled.backward()
            step_number = epoch * batches + batch_index + 1
            bad = ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), torch.tensor(step_number, device=device), first_bad)
            loss_sum += loss.detach().double()
            if boundary:
                self._optimizer_step()
            if not self.compile_reported and cfg.mode == 0:
                self._report_compile(loss, time.perf_counter() - wait_start)
            interval_steps += 1
            at_log_point = (batch_index + 1) % cfg.log_interval == 0 or batch_index + 1 == batches
            if interactive and not at_log_point:
                print(f"\r  epoch {epoch + 1} batch {batch_index + 1}/{batches}", end="", flush=True)
            if at_log_point:
                # the one host sync per log interval; every rank stops together, naming the earliest step
                never = torch.iinfo(torch.int64).max
                bad_step = int(dist.all_reduce_min(torch.where(first_bad < 0, never, first_bad)))
                if bad_step != never:
                    raise TrainingError(
                        f"the loss became NaN or infinite at step {bad_step} (epoch {epoch + 1}, batch "
                        f"{(bad_step - 1) % batches + 1}); training stopped without saving, so the last good "
                        f"checkpoint in {self.run_dir} is intact. Lower lr, enable clip_grad, or use amp_level O0"
                    )
                elapsed = time.perf_counter() - interval_start
                self._log_step(epoch, batch_index + 1, loss, lr, elapsed, data_wait, interval_steps, global_batch)
                interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0
        mean_loss = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(batches), device=device).double()]))
        return float(mean_loss[0] / mean_loss[1]), lr

    def _report_compile(self, loss: torch.Tensor, seconds_so_far: float) -> None:
        """The first compiled step includes torch.compile's tracing and code generation: say how long."""
        float(loss.detach())  # wait for the device so the time is the step's own
        self.compile_reported = True
        self.log.info(f"torch.compile (mode 0): first training step took {seconds_so_far:.1f} s, compilation included")

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            optim.clip_gradients(params, cfg)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.precision.scale_mode == "fixed":
                inv = 1.0 / self.precision.loss_scale
                torch._foreach_mul_([p.grad for p in params], inv)
                if self.precision.drop_overflow_update:
                    finite = torch.stack([torch.isfinite(p.grad).all() for p in params]).all()
                    if not bool(finite):
                        self.optimizer.zero_grad(set_to_none=True)
                        self.global_step += 1
                        return
            optim.clip_gradients(params, cfg)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.global_step += 1

    def _log_step(
        self, epoch: int, batch: int, loss: torch.Tensor, lr: float, elapsed: float, wait: float, steps: int, gb: int
    ) -> None:
        cfg = self.cfg
        loss_now = dist.all_reduce_sum(loss.detach().double().clone()) / self.ctx.world_size
        ms = 1000 * elapsed / max(steps, 1)
        rate = gb * steps / max(elapsed, 1e-9)
        remaining = (cfg.epoch_size - epoch - 1) * self.batches_per_epoch + (self.batches_per_epoch - batch)
        prefix = "\r" if self.ctx.is_main and sys.stdout.isatty() else ""
        self.log.info(
            f"{prefix}Epoch: [{epoch + 1}/{cfg.epoch_size}], batch: [{batch}/{self.batches_per_epoch}], "
            f"loss: {float(loss_now):.6f}, lr: {lr:.6f}, {ms:.1f} ms/step, {rate:.1f} img/s, "
            f"data wait {100 * wait / max(elapsed, 1e-9):.0f}%, ETA {_format_eta(remaining * ms / 1000)}"
        )

    # -- checkpoints -------------------------------------------------------------------------------

    def _save(self, result: EvalResult | None) -> None:
        cfg, ctx = self.cfg, self.ctx
        model_name = cfg.model
        improved = result is not None and (self.best_top1 is None or result.top1 > self.best_top1)
        if improved:
            self.best_top1 = result.top1
        due = self.epoch % cfg.ckpt_save_interval == 0 or self.epoch == cfg.epoch_size
        state = self._state() if due else None  # collective under DDP: every rank takes part
        if not ctx.is_main:
            return
        directory = Path(cfg.ckpt_save_dir)
        weights_model = self.ema.module if self.ema is not None else self.model
        if improved:
            self.best_path = directory / f"{model_name}_best.safetensors"
            save_weights(self.best_path, weights_model, fmt="safetensors", source=f"epoch {self.epoch} best")
        if state is None:
            return
        ref = ckpt.checkpoint_ref(directory, model_name, self.epoch, self.batches_per_epoch)
        if self.ema is not None:  # before the network weights, which mark the checkpoint complete
            save_weights(ref.ema, self.ema.module, fmt="safetensors", source=f"epoch {self.epoch} EMA")
        ckpt.save_checkpoint(ref, self.model, state, source=f"epoch {self.epoch}")
        self.keeper.add(ref, result.top1 if result is not None else None)
        self.last_checkpoint = ref.weights


def train(cfg: Config) -> RunResult:
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        dist.cleanup()


def validate(cfg: Config) -> EvalResult:
    """validate.py: top-1/top-5/loss of ``cfg.ckpt_path`` (or the pretrained release) on ``val_split``."""
    if not cfg.ckpt_path and not cfg.pretrained:
        raise ConfigError(
            "validate needs weights: pass --ckpt_path FILE (.safetensors, MindCV .ckpt or .pth), or "
            "--pretrained True for MindCV's release; it never evaluates random weights"
        )
    if cfg.ckpt_path and not os.path.exists(cfg.ckpt_path):
        raise ConfigError(f"--ckpt_path {cfg.ckpt_path} does not exist")
    ctx = dist.setup(cfg)
    try:
        dataset = data_mod.build_dataset(cfg, cfg.val_split, train=False)
        model = create_model(
            cfg.model,
            num_classes=cfg.num_classes,
            in_channels=cfg.in_channels,
            pretrained=cfg.pretrained and not cfg.ckpt_path,
            checkpoint_path=cfg.ckpt_path or None,
        ).to(ctx.device)
        net = torch.compile(model) if cfg.mode == 0 else model
        precision = Precision.from_config(cfg, ctx.device)
        return evaluate(net, eval_loader(cfg, dataset, ctx), ctx.device, precision)
    finally:
        dist.cleanup()
