"""The training loop and evaluation: one explicit loop, MindCV's semantics, honest measurements.

``train(cfg)`` is what ``train.py`` runs, alone or under torchrun; ``evaluate`` is shared with
``validate.py``.  Per step the loop does only device work; numbers reach the host at log points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import batchnorm, optim, pipeline
from . import checkpoint as ckpt
from . import data as data_mod
from . import distributed as dist
from .compiling import CompiledOrEager, cxx_compiler_missing
from .config import Config, ConfigError, changes_since, evaluation_of, to_yaml
from .deploy import fuse
from .device_input import DeviceInput
from .errors import DataError, ShuffleNetV2Error, StorageError
from .factory import create_model, model_from_weights
from .fileio import RunLock, atomic_path, check_writable, lock_run_directory, storage_error
from .host_memory import keep_freed_memory
from .interrupt import StopRequest, TrainingInterrupted
from .precise_bn import recompute_from_loader
from .predict import Network, onnx_network, settings_warning
from .runlog import RunRecord, plot_curves, setup_logger
from .weights import load_weights, read_weights, save_weights


class TrainingError(ShuffleNetV2Error, RuntimeError):
    """Training cannot go on (a NaN loss, a bad resume); earlier checkpoints are untouched."""


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int  # images evaluated, over all ranks
    unreadable: int = 0  # files that could not be read (over all ranks), left out of the metrics
    unreadable_here: tuple[str, ...] = ()  # this rank's reasons, each naming its file

    def as_mindcv(self) -> dict[str, float]:
        return {"Top_1_Accuracy": self.top1, "Top_5_Accuracy": self.top5, "loss": self.loss}

    def describe_unreadable(self) -> str:
        return f"; {self.unreadable} unreadable file(s) left out" if self.unreadable else ""


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


def bfloat16_kernels_on_cpu() -> bool | None:
    """Whether oneDNN has its bfloat16 kernels on this CPU (they need AVX-512: BW, VL and DQ); without them
    torch's bfloat16 convolutions and matrix products fall back to slow generic code.  None when this torch
    does not say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def cpu_autocast_advice(cfg: Config, precision: Precision, device: torch.device) -> tuple[bool, str] | None:
    """What to tell a run that autocasts on a CPU, and whether it is a warning (no bfloat16 kernels here:
    x0.5 at batch 32 trained 15x slower than in float32 and evaluated 6x slower on an AVX2 CPU,
    benchmarks/results/cpu_bf16_avx2) or a note (with them: 0.72-0.75x in training, Intel AVX-512 VM)."""
    if device.type != "cpu" or precision.dtype is None:
        return None
    what = f"amp_level {cfg.amp_level} runs under {precision.describe()}"
    if bfloat16_kernels_on_cpu() is False:
        return True, (
            f"{what}, but this CPU lacks the AVX-512 that oneDNN's bfloat16 kernels need, so torch falls back to "
            "slow code: on such a CPU x0.5 trained 15x and evaluated 6x slower than in float32 (README, training "
            "step). Pass --amp_level O0"
        )
    return False, f"{what}, which on a CPU trains this network slower than float32 (README, training step): try O0"


# --- helpers ----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _compiling(net: nn.Module) -> str:
    """What the first compiled call's time includes: the compilation, or a compile that failed (then eager)."""
    failed = isinstance(net, CompiledOrEager) and net.failure is not None
    return "a failed compile included (it ran eager; see the warning)" if failed else "compilation included"


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
    model: nn.Module, loader: torch.utils.data.DataLoader, inputs: DeviceInput, precision: Precision | None = None
) -> EvalResult:
    """Top-1, top-5 and mean cross-entropy over every sample of ``loader`` summed over all ranks.

    ``inputs`` turns a loader batch into the model's input on its device (see ``device_input``).
    """
    model.eval()
    device = inputs.device
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # top1, top5, loss sum, count, unreadable
    autocast = precision.autocast(device) if precision else contextlib.nullcontext()
    unreadable: list[str] = []
    for batch in loader:
        images, target, bad = inputs(batch)
        unreadable += bad
        if images is None:
            continue
        with autocast:
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy_counts(logits, target)
        totals += torch.stack(
            [top1.double(), top5.double(), F.cross_entropy(logits, target, reduction="sum").double(),
             totals.new_full((), float(target.numel())), totals.new_zeros(())]  # filled on the device: no copy, no sync
        )  # fmt: skip
    totals[4] += len(unreadable)
    dist.all_reduce_sum(totals)
    top1, top5, loss_sum, count, bad = totals.tolist()
    if count == 0:
        why = f": none of its {int(bad)} files could be read, e.g. {unreadable[0]}" if unreadable else ""
        raise DataError(f"the validation split holds no readable images{why}")
    return EvalResult(top1 / count, top5 / count, loss_sum / count, int(count), int(bad), tuple(unreadable))


def statistics_lag(val_loss: float, train_loss: float, cfg: Config) -> bool:
    """Whether a validation loss suggests BatchNorm running statistics that lag the weights: more than ten
    times both the training loss and a uniform guess's.  Confidently wrong on validation images while
    fitting the training ones is what normalising with an earlier network's statistics gives (a
    fine-tuning on hymenoptera: 20,612,987 and 71.5 after epochs 1 and 2, training loss 1.2 and 0.9;
    ``precise_bn``)."""
    return val_loss > 10 * max(train_loss, math.log(max(cfg.num_classes, 2)))


def compiles(cfg: Config, device: torch.device) -> bool:
    """Whether mode 0 compiles the training step and evaluation here: everywhere but on a CPU, where
    torch.compile trains this network at 0.67-0.88x the speed of eager channels_last (every ``bench`` run in
    benchmarks/results, two kinds of CPU) after about a minute of compiling, and evaluation has a faster
    way (``evaluates_fused``); ``compile_on_cpu`` asks for it anyway."""
    return cfg.mode == 0 and (device.type != "cpu" or cfg.compile_on_cpu)


def evaluates_fused(cfg: Config, device: torch.device) -> bool:
    """Whether mode 0 evaluates ``deploy.fuse(model)`` (BatchNorm and the channel shuffle folded into the
    convolutions, eager) instead of compiling the model: on a CPU in float32, unless ``compile_on_cpu``.
    There the fused model evaluates as fast as the compiled one (x0.5 at batch 64: 363 img/s against 359
    compiled and 242 eager, benchmarks/results/eval_paths; at batch 32 in every ``bench`` run in
    benchmarks/results, ``ours-fused`` against ``torchvision-compiled``: 0.89-1.21x) without the half minute
    of compiling first.  Its logits differ from the model's by float32 rounding, as compiled logits do.
    Under bfloat16 autocast it is the slower one (29 against 51 img/s eager, x0.5 batch 32 on an AVX2 CPU,
    benchmarks/results/cpu_bf16_avx2), and compiling gained little there, so mode 0 evaluates eager then."""
    return cfg.mode == 0 and device.type == "cpu" and not cfg.compile_on_cpu and cfg.amp_level == "O0"


def describe_mode(cfg: Config, device: torch.device) -> str:
    if cfg.mode == 1:
        return "eager"
    if compiles(cfg, device):  # only then is a missing C++ compiler worth probing for (it imports inductor)
        missing = cxx_compiler_missing() if device.type == "cpu" else None
        unable = "; no C++ compiler found, so what it compiles will run eager: install g++" if missing else ""
        return f"torch.compile{unable}"
    if evaluates_fused(cfg, device):
        return (
            "training eager and evaluation on the fused inference model (BatchNorm and shuffle folded): on a CPU the "
            "first is faster than compiled, the second as fast without compiling; compile_on_cpu True compiles both"
        )
    return "eager, which on a CPU trains faster than compiled; compile_on_cpu True compiles"


def trains_batchnorm_in_kernels(net: nn.Module, cfg: Config, device: torch.device, autocast: bool) -> bool:
    """Whether BatchNorm trains in ``bn_kernel``'s numba kernels, for the log: the test every training
    forward makes (``batchnorm.kernel_path_applies``: our BatchNorm2d rather than sync BN, a CPU, the
    dtype, numba installed), asked of ``net``'s first BatchNorm with a small channels_last tensor like its
    activations, and what that test reads from the run's context, which is not in force yet: autocast,
    compilation, and channels_last input."""
    if autocast or compiles(cfg, device) or not cfg.channels_last:
        return False
    bn = next((m for m in net.modules() if isinstance(m, nn.BatchNorm2d)), None)
    if bn is None:
        return False
    probe = torch.empty((2, bn.num_features, 2, 2), dtype=bn.weight.dtype, device=device)
    training = bn.training
    try:
        return batchnorm.kernel_path_applies(bn.train(), probe.contiguous(memory_format=torch.channels_last))
    finally:
        bn.train(training)


def describe_device(device: torch.device) -> str:
    """The device, and on a CPU torch's thread count: torchrun gives each process one thread unless
    OMP_NUM_THREADS says otherwise, which a user comparing speeds needs to see."""
    if device.type != "cpu":
        return str(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''} per process)"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which taskset and containers narrow), not all
    the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores_note(threads: int, processes_here: int, cores: int) -> str | None:
    """torchrun sets OMP_NUM_THREADS=1 in every process it starts unless the variable is set, so N training
    processes on a CPU machine compute on N of its cores and leave the rest idle; None when they use them."""
    if processes_here < 2 or threads * processes_here >= cores:
        return None
    share = cores // processes_here
    return (
        f"note: the {processes_here} processes on this machine compute with {threads} thread"
        f"{'s' if threads > 1 else ''} each, {threads * processes_here} of its {cores} cores (torchrun sets "
        f"OMP_NUM_THREADS=1 unless it is set): `OMP_NUM_THREADS={share} torchrun ...` gives each process its "
        "share of them (leave some to the loader workers)"
    )


def describe_batchnorm(device: torch.device, in_kernels: bool) -> str:
    """The log's word on how BatchNorm trains on a CPU (empty on other devices)."""
    if device.type != "cpu":
        return ""
    if in_kernels:
        return "; BatchNorm compiled (numba)"
    if batchnorm.compiled_kernels() is None:
        return "; BatchNorm in torch ops (compiled with the fast-cpu extra)"
    return (
        "; BatchNorm in torch ops (numba's kernels serve eager channels_last training in float32 or float64, "
        "without autocast or sync_bn)"
    )


def eval_loader(cfg: Config, dataset: torch.utils.data.Dataset, ctx: dist.Context) -> torch.utils.data.DataLoader:
    """This rank's unpadded shard of ``dataset``, so every image is counted exactly once."""
    return data_mod.build_loader(cfg, dataset, train=False, rank=ctx.rank, world_size=ctx.world_size)


# --- the run ----------------------------------------------------------------------------------------


class Trainer:
    """Everything one training run holds; ``run()`` is the loop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ctx = dist.setup(cfg)
        self.precision = Precision.from_config(cfg, self.ctx.device)  # a config error: before any file exists
        self.run_dir = Path(cfg.output_dir or cfg.ckpt_save_dir)
        self.locks: list[RunLock] = []
        if self.ctx.is_main:
            check_writable(self.run_dir, "the run directory (output_dir)")
            check_writable(cfg.ckpt_save_dir, "checkpoints to ckpt_save_dir")
            for folder in dict.fromkeys(p.resolve() for p in (self.run_dir, Path(cfg.ckpt_save_dir))):
                lock = lock_run_directory(folder)
                self.locks += [lock] if lock is not None else []
        try:
            self._set_up()
        except BaseException:  # a trainer that failed to start holds no folder (a caller may retry at once)
            self.release_directories()
            raise

    def _set_up(self) -> None:
        cfg = self.cfg
        try:
            self.log = setup_logger(self.run_dir, self.ctx.rank)
        except OSError as exc:
            raise storage_error(exc, self.run_dir, "the training log to") from None
        if cfg.deterministic:
            # CUDA's cuBLAS is deterministic only with this workspace setting; without it torch refuses the
            # first matrix product in deterministic mode (a user's own setting is kept)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.seed + self.ctx.rank)

        # validation first: it is smaller, so a missing split is reported before ImageNet's 1.28 M files are listed
        self.val_set = data_mod.build_dataset(cfg, cfg.val_split, train=False) if cfg.val_while_train else None
        self.train_set = data_mod.build_dataset(cfg, cfg.train_split, train=True)
        if self.val_set is not None and list(self.val_set.classes) != list(self.train_set.classes):
            raise DataError(
                f"the {cfg.val_split!r} split's classes differ from the {cfg.train_split!r} split's "
                f"({data_mod.describe_class_difference(self.train_set.classes, self.val_set.classes)}), so "
                "labels would not mean the same class; give both splits the same class folders"
            )
        self.classes = list(self.train_set.classes)
        self.evaluation = evaluation_of(cfg)  # recorded with the weights, for predict and validate.py
        classes = len(self.classes)
        if classes != cfg.num_classes:
            raise ConfigError(
                f"num_classes is {cfg.num_classes} but {cfg.train_split!r} holds {classes} classes; "
                f"set num_classes {classes}"
            )
        self.train_loader = data_mod.build_loader(
            cfg, self.train_set, train=True, rank=self.ctx.rank, world_size=self.ctx.world_size, seed=cfg.seed
        )
        self.val_loader = eval_loader(cfg, self.val_set, self.ctx) if self.val_set is not None else None
        self.train_inputs = DeviceInput(cfg, train=True, device=self.ctx.device)
        self.eval_inputs = DeviceInput(cfg, train=False, device=self.ctx.device)
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
        self.start_batch = 0  # batches of epoch ``self.epoch`` already trained on (an interim checkpoint)
        self.carried_loss = 0.0  # that part's summed loss (float64) and unreadable-image count
        self.carried_unreadable = 0
        self.warned: dict[str, None] = {}  # unreadable files already named in the log, in order
        self.stop = StopRequest()
        if self.ctx.is_main:
            for path in ckpt.remove_partial_files(Path(cfg.ckpt_save_dir), cfg.model):
                self.log.info(f"removed {path.name}, left by a save that was interrupted")
        self.best_top1: float | None = None
        self.best_path: Path | None = None
        self.last_checkpoint: Path | None = None
        self.resumed = self._maybe_resume()
        self.compile_reported = False  # the first step's time, when it includes compiling (or loading) code
        self.lagging_loss: float | None = None  # the last validation loss, when it suggested lagging statistics
        self.lag_warned = False  # the advice to use precise_bn, given once a run

        net: nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if self.ctx.distributed:
            if cfg.sync_bn:
                net = dist.convert_sync_batchnorm(net, self.ctx.device)
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            net = self.ddp = DistributedDataParallel(net, device_ids=ids)
        self.compiled_training = compiles(cfg, self.ctx.device)
        self.kernel_training = trains_batchnorm_in_kernels(net, cfg, self.ctx.device, self.precision.dtype is not None)
        self.net = CompiledOrEager(net, "training", self._warn) if self.compiled_training else net
        self.eval_model = self.ema.module if self.ema is not None else self.model
        self.fused_evaluation = evaluates_fused(cfg, self.ctx.device)  # fused again at each validation
        self.eval_net = self.eval_model
        if self.compiled_training:
            self.eval_net = CompiledOrEager(self.eval_model, "validation", self._warn)

    def release_directories(self) -> None:
        """Let another run use the run and checkpoint folders (the locks also go when the process ends)."""
        for lock in self.locks:
            lock.release()
        self.locks = []

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
            weights = read_weights(source)
            load_weights(self.model, weights, drop_classifier=cfg.drop_classifier)
            self._reseed_ema()
            dropped = cfg.drop_classifier and weights.arch["num_classes"] != cfg.num_classes
            fresh = f" ({weights.arch['num_classes']} classes), with a new {cfg.num_classes}-class classifier"
            self.log.info(f"loaded weights from {source}{fresh if dropped else ''}")
            trained = weights.classes
            if not cfg.resume_opt and not dropped and trained is not None and trained != self.classes:
                difference = data_mod.describe_class_difference(trained, self.classes, ("the weights'", "the data's"))
                self.log.info(
                    f"note: {source} was trained on other classes ({difference}); this run starts each of its "
                    "classes from the classifier row of the same position"
                )
            if not cfg.resume_opt:
                return False
            ref = beside
        elif ref is not None:
            load_weights(self.model, read_weights(ref.weights))
            self._reseed_ema()
        if ref is None:
            return False
        state = ckpt.load_state(ref.state)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            saved = state.get("config", {})
            was = ", ".join(f"{k} {saved.get(k)!r}" for k in ("model", "opt", "weight_decay_filter") if k in saved)
            raise TrainingError(
                f"the optimizer state in {ref.state} does not fit this run's optimizer ({exc}); it was saved with "
                f"{was or 'another configuration'}. Resume with the same model, opt and weight_decay_filter, or "
                "start the optimizer afresh from those weights with --ckpt_path X --resume_opt False"
            ) from None
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        rank = min(self.ctx.rank, len(state["rng"]) - 1)  # resuming on more ranks than saved: reuse the last
        self.start_batch = int(state.get("batch", 0))
        self._check_same_data(state, ref.state)
        if self.start_batch and len(state["rng"]) != self.ctx.world_size:
            raise TrainingError(
                f"{ref.weights} was saved inside an epoch by {len(state['rng'])} process(es); the rest of that "
                f"epoch's data order only exists for that many, not {self.ctx.world_size}. Resume it with the "
                "same number of processes, or from an epoch-end checkpoint"
            )
        if self.start_batch:
            self.carried_loss = float(state["epoch_loss_sum"][rank])
            self.carried_unreadable = int(state["epoch_unreadable"][rank])
        self.best_top1 = state.get("best_top1")
        if self.ctx.is_main:  # what the run has saved so far, for its closing line and error messages
            self.last_checkpoint = ref.weights
            best = ckpt.best_weights_path(cfg.ckpt_save_dir, cfg.model)
            self.best_path = best if self.best_top1 is not None and best.exists() else None
        ckpt.set_rng_state(state["rng"][rank])
        where = f"epoch {self.epoch + 1}, batch {self.start_batch}" if self.start_batch else f"epoch {self.epoch}"
        self.log.info(f"resumed from {ref.weights} after {where}, optimizer step {self.global_step}")
        changed = changes_since(state.get("config"), self.cfg)
        if changed:
            self.log.info(f"note: changed since that checkpoint was saved: {', '.join(changed)}")
        return True

    def _check_same_data(self, state: dict[str, Any], source: Path) -> None:
        """A resumed run must train on the classes it started with: labels are positions in the sorted
        class names, so a class folder added, removed or renamed since would silently give other classes'
        images the labels the network has learnt.  Checkpoints from before the names were recorded pass."""
        saved = state.get("classes")
        if saved is not None and list(saved) != self.classes:
            difference = data_mod.describe_class_difference(saved, self.classes, ("the checkpoint's", "the data's"))
            raise TrainingError(
                f"{source} was saved by a run whose training classes differ from this one's ({difference}). Labels are "
                "numbered by sorted class name, so resuming would train the network on other classes' labels. "
                "Restore the class folders as they were, or start a new run from these weights with --ckpt_path "
                "X --resume_opt False (and --num_classes N --drop_classifier True if the count changed)"
            )
        saved_images = state.get("train_images")
        if self.start_batch and saved_images is not None and saved_images != len(self.train_set):
            self._warn(
                f"the training set has {len(self.train_set):,} images, and had {saved_images:,} when {source} was "
                f"saved inside epoch {self.epoch + 1}: the rest of that epoch follows another order, so some of its "
                "images are seen twice and others not at all. The epochs after it are unaffected"
            )

    def _reseed_ema(self) -> None:
        """The average starts from the loaded weights, not from the random initialisation."""
        if self.ema is not None:
            self.ema = optim.ModelEMA(self.model, self.cfg.ema_decay)

    def _state(self, batch: int = 0, loss_sum: float = 0.0, unreadable: int = 0) -> dict[str, Any]:
        """Everything a resumed run needs; ``batch`` > 0 marks a checkpoint taken inside epoch ``epoch + 1``."""
        per_rank = dist.all_gather_object((ckpt.rng_state(), loss_sum, unreadable))
        return {
            "epoch": self.epoch,
            "batch": batch,
            "epoch_loss_sum": [entry[1] for entry in per_rank],
            "epoch_unreadable": [entry[2] for entry in per_rank],
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best_top1": self.best_top1,
            "rng": [entry[0] for entry in per_rank],
            "config": dataclasses.asdict(self.cfg),
            "classes": self.classes,  # what the labels mean; a resumed run must agree
            "train_images": len(self.train_set),
        }

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """The loop; the run's folders are released when it ends, however it ends."""
        try:
            return self._run()
        finally:
            self.release_directories()

    def _run(self) -> RunResult:
        cfg, ctx, log = self.cfg, self.ctx, self.log
        if ctx.is_main:
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(to_yaml(cfg))
        record = RunRecord(self.run_dir, resume_after=self.epoch if self.resumed else None) if ctx.is_main else None
        global_batch = cfg.batch_size * ctx.world_size
        accumulated = f", {self.accum} batches per optimizer step" if self.accum > 1 else ""
        log.info(
            f"{cfg.model}: {data_mod.describe_dataset(self.train_set)}; {self.batches_per_epoch} batches/epoch of "
            f"{cfg.batch_size} per device x {ctx.world_size} = {global_batch}{accumulated}; "
            f"device {describe_device(ctx.device)}; "
            f"{self.precision.describe()}; mode {cfg.mode} ({describe_mode(cfg, ctx.device)}); "
            f"input: {pipeline.describe_input(cfg, self.train_set, ctx.device)}"
            f"{describe_batchnorm(ctx.device, self.kernel_training)}"
        )
        advice = cpu_autocast_advice(cfg, self.precision, ctx.device)
        if advice is not None:
            warning, message = advice
            if warning:
                self._warn(message)
            else:
                log.info(f"note: {message}")
        if ctx.device.type == "cpu":
            cores = usable_cores()
            processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            threads_note = idle_cores_note(torch.get_num_threads(), processes_here, cores)
            if threads_note:
                log.info(threads_note)
        for lr_note in (
            optim.lr_batch_note(cfg, ctx.world_size, self.batches_per_epoch),
            optim.lr_span_note(cfg, self.schedule),
        ):
            if lr_note:
                log.info(lr_note)
        last_eval = None
        run_start = time.perf_counter()
        self.first_epoch, first_batch = self.epoch, self.start_batch
        with self.stop:
            for epoch in range(self.epoch, cfg.epoch_size):
                last_eval = self._run_epoch(epoch, record) or last_eval
        total = time.perf_counter() - run_start
        ran = cfg.epoch_size - self.first_epoch
        if ran <= 0:  # a finished run started again (a requeued job, say)
            log.info(
                f"nothing to train: the run is at epoch {self.epoch} and epoch_size is {cfg.epoch_size}; a larger "
                f"--epoch_size trains on from {self.last_checkpoint or 'its last checkpoint'}"
            )
        else:
            epochs = f"{ran} epoch{'s' if ran != 1 else ''}"
            if self.resumed:
                where = f"inside epoch {self.first_epoch + 1}" if first_batch else f"after epoch {self.first_epoch}"
                span = f"epoch {cfg.epoch_size}" if ran == 1 else f"epochs {self.first_epoch + 1}-{cfg.epoch_size}"
                epochs += f" ({span} of {cfg.epoch_size}, resumed {where})"
            log.info(f"training finished: {epochs} in {total:.1f} s; run directory {self.run_dir}")
        dist.barrier()
        return RunResult(self.run_dir, self.epoch, last_eval, self.best_top1, self.best_path, self.last_checkpoint)

    def _run_epoch(self, epoch: int, record: RunRecord | None) -> EvalResult | None:
        """Train one epoch, validate when due, record it and save; returns this epoch's evaluation."""
        cfg, log = self.cfg, self.log
        train_start = time.perf_counter()
        train_loss, lr, unreadable = self._train_epoch(epoch)
        train_time = time.perf_counter() - train_start
        self.epoch = epoch + 1
        if unreadable:
            log.info(
                f"Epoch {self.epoch}/{cfg.epoch_size}: {unreadable} unreadable image(s) were skipped, each replaced "
                "in its batch by a copy of a readable one (the files are named above)"
            )
        row: dict[str, Any] = {
            "epoch": self.epoch, "train_loss": train_loss, "lr": lr, "train_time": train_time, "unreadable": unreadable
        }  # fmt: skip
        if cfg.precise_bn:
            row["precise_bn_time"] = self._recompute_batchnorm_statistics(epoch)
        evaluation, eval_time = None, 0.0
        if self.val_loader is not None and (self.epoch % cfg.val_interval == 0 or self.epoch == cfg.epoch_size):
            eval_start = time.perf_counter()
            net = fuse(self.eval_model, cfg.channels_last) if self.fused_evaluation else self.eval_net
            evaluation = evaluate(net, self.val_loader, self.eval_inputs, self.precision)
            eval_time = time.perf_counter() - eval_start
            if isinstance(net, CompiledOrEager) and epoch == self.first_epoch:
                included = _compiling(self.eval_net)
                log.info(f"torch.compile (mode 0): first validation took {eval_time:.1f} s, {included}")
            self._warn_unreadable(evaluation.unreadable_here)
            row.update(top1=evaluation.top1, top5=evaluation.top5, val_loss=evaluation.loss)
            log.info(
                f"Epoch {self.epoch}/{cfg.epoch_size} validation: top-1 {100 * evaluation.top1:.2f}%  "
                f"top-5 {100 * evaluation.top5:.2f}%  loss {evaluation.loss:.4f}  "
                f"({evaluation.count} images{evaluation.describe_unreadable()}, {eval_time:.1f} s)"
            )
            # a first epoch from scratch often evaluates so (the demo: 111.7, then 0.93): only a second
            # validation in a row says the statistics do not catch up by themselves
            lagging = not cfg.precise_bn and statistics_lag(evaluation.loss, train_loss, cfg)
            if lagging and self.lagging_loss is not None and not self.lag_warned:
                self.lag_warned = True
                self._warn(
                    f"the validation loss, {evaluation.loss:,.1f} (and {self.lagging_loss:,.1f} at the validation "
                    f"before), is more than 10 times both the training loss ({train_loss:.3f}) and a uniform "
                    f"guess's ({math.log(cfg.num_classes):.3f}): BatchNorm's "
                    f"running statistics probably lag the weights ({self.steps_per_epoch} optimizer steps an "
                    "epoch, and fine-tuning or a high lr moves the weights fast). --precise_bn 1024 recomputes "
                    "them from training images before each validation; `shufflenetv2 recalibrate` does it for "
                    "weights already saved"
                )
            self.lagging_loss = evaluation.loss if lagging else None
        row.update(eval_time=eval_time, total_time=time.perf_counter() - train_start)
        if record is not None:  # before the checkpoint: a crash in between repeats the row, never loses it
            try:
                record.add(row)
            except OSError as exc:
                raise storage_error(exc, self.run_dir, "the run record (result.log, metrics.jsonl) to") from None
        stopping = dist.any_rank(self.stop.signal_name is not None)
        self._save(evaluation, force=stopping)
        if record is not None:  # the slow, cosmetic part last
            try:
                plot_curves(record.metrics, self.run_dir / "curves.png")
            except OSError as exc:
                log.warning(f"warning: {storage_error(exc, self.run_dir, 'curves.png to')}")
        if stopping:
            self._interrupted(f"after epoch {self.epoch}")
        return evaluation

    def _recompute_batchnorm_statistics(self, epoch: int) -> float:
        """precise_bn: the BatchNorm statistics that evaluation and the saved weights use, from this epoch's
        first training batches under the weights as they are now (``precise_bn``), for the network and its
        EMA; returns the seconds it took.  Training goes on exactly as it would have without it: every
        augmentation is drawn from its sample's own seed (``data.SeededSampler``), so going over these
        batches again draws nothing from the loop's random state (``test_precise_bn_changes_only...``)."""
        cfg, ctx = self.cfg, self.ctx
        start = time.perf_counter()
        models = [self.model] + ([self.ema.module] if self.ema is not None else [])
        global_batch = cfg.batch_size * ctx.world_size
        autocast = self.precision.autocast(ctx.device)
        fed = recompute_from_loader(
            models, self.train_loader, self.train_inputs, cfg.precise_bn, global_batch, epoch, autocast
        )
        seconds = time.perf_counter() - start
        if epoch == self.first_epoch:
            which = "the network's and its EMA's" if self.ema is not None else "the network's"
            self.log.info(
                f"precise_bn: {which} BatchNorm statistics recomputed from {fed * cfg.batch_size} training images "
                f"under epoch {epoch + 1}'s weights in {seconds:.1f} s; again at the end of every epoch"
            )
        return seconds

    def _interrupted(self, where: str) -> None:
        saved = f"saved {self.last_checkpoint}" if self.last_checkpoint else "the checkpoint was saved on rank 0"
        raise TrainingInterrupted(
            f"stopped by {self.stop.signal_name or 'a signal on another rank'} {where} (optimizer step "
            f"{self.global_step}); {saved}. Run the same command with --auto_resume True to continue from there"
        )

    def _example_unreadable(self) -> str:
        return f" (e.g. {next(iter(self.warned))})" if self.warned else ""

    def _warn(self, message: str) -> None:
        self.log.warning(f"warning: {message}")

    def _warn_unreadable(self, reasons: Sequence[str]) -> None:
        """Name each unreadable file once per run, on every rank (other ranks' loggers do not print)."""
        for reason in reasons:
            if reason in self.warned:
                continue
            self.warned[reason] = None
            self._warn(f"skipped an unreadable file: {reason}")
            if not self.ctx.is_main:
                print(f"[rank {self.ctx.rank}] warning: skipped an unreadable file: {reason}", file=sys.stderr)

    def _train_epoch(self, epoch: int) -> tuple[float, float, int]:
        """One epoch (or its rest, after an interim checkpoint): mean loss, last lr, unreadable images."""
        cfg, ctx = self.cfg, self.ctx
        device = ctx.device
        self.net.train()
        start, self.start_batch = self.start_batch, 0
        self.train_loader.sampler.set_epoch(epoch, skip=start * cfg.batch_size)
        use_mixup = self.mixup is not None and (cfg.mixup_off_epoch <= 0 or epoch < cfg.mixup_off_epoch)
        loss_sum = torch.full((), self.carried_loss if start else 0.0, dtype=torch.float64, device=device)
        unreadable = self.carried_unreadable if start else 0
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
        for batch_index in range(start, batches):
            wait_start = time.perf_counter()
            try:
                loaded = next(it)
            except StopIteration:
                break
            data_wait += time.perf_counter() - wait_start
            images, target, bad_files = self.train_inputs(loaded)
            if bad_files:
                unreadable += len(bad_files)
                self._warn_unreadable(bad_files)
            if use_mixup:
                images, target = self.mixup(images, target)
            boundary = (batch_index + 1) % self.accum == 0
            if boundary or batch_index == start:
                lr = self.schedule[min(self.global_step, len(self.schedule) - 1)]
                optim.set_lr(self.optimizer, lr)
            sync = contextlib.nullcontext()
            if self.ddp is not None and not boundary:
                sync = self.ddp.no_sync()
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
            nonfinite = ~torch.isfinite(loss.detach())
            first_bad = first_bad.masked_fill(nonfinite & (first_bad < 0), step_number)  # a host scalar: no sync
            loss_sum += loss.detach().double()
            done = batch_index + 1
            if boundary:
                self._optimizer_step()
                stopping = dist.any_rank(self.stop.signal_name is not None)
                interim_due = cfg.ckpt_save_steps > 0 and self.global_step % cfg.ckpt_save_steps == 0
                if stopping or (interim_due and done < batches):
                    self._check_health(first_bad, unreadable, epoch, batches)  # never save a NaN or a bad epoch
                    self._save_interim(done, loss_sum, unreadable)
                    if stopping:
                        self._interrupted(f"in epoch {epoch + 1} after batch {done}/{batches}")
            if not self.compile_reported and (self.compiled_training or self.kernel_training):
                self._report_compile(loss, time.perf_counter() - wait_start)
            interval_steps += 1
            at_log_point = done % cfg.log_interval == 0 or done == batches
            if interactive and not at_log_point:
                print(f"\r  epoch {epoch + 1} batch {done}/{batches}", end="", flush=True)
            if at_log_point:
                self._check_health(first_bad, unreadable, epoch, batches)
                elapsed = time.perf_counter() - interval_start
                self._log_step(epoch, done, loss, lr, elapsed, data_wait, interval_steps, global_batch)
                interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0
        totals = torch.stack(
            [loss_sum, torch.tensor(float(batches), device=device).double(), loss_sum.new_tensor(float(unreadable))]
        )
        dist.all_reduce_sum(totals)
        return float(totals[0] / totals[1]), lr, int(totals[2])

    def _check_health(self, first_bad: torch.Tensor, unreadable: int, epoch: int, batches: int) -> None:
        """The loop's host sync: every rank stops together on a NaN loss or too many unreadable images."""
        never = torch.iinfo(torch.int64).max
        bad_step = int(dist.all_reduce_min(torch.where(first_bad < 0, never, first_bad)))
        if bad_step != never:
            raise TrainingError(
                f"the loss became NaN or infinite at step {bad_step} (epoch {epoch + 1}, batch "
                f"{(bad_step - 1) % batches + 1}); training stopped without saving, so the last good "
                f"checkpoint in {self.cfg.ckpt_save_dir} is intact. Lower lr, enable clip_grad, or use amp_level O0"
            )
        total = int(dist.all_reduce_sum(torch.tensor(float(unreadable), dtype=torch.float64, device=first_bad.device)))
        images = batches * self.cfg.batch_size * self.ctx.world_size
        if total > self.cfg.max_bad_fraction * images:
            raise DataError(
                f"{total} image file(s) could not be read so far in epoch {epoch + 1}, more than max_bad_fraction "
                f"{self.cfg.max_bad_fraction:g} of its {images} images allows{self._example_unreadable()}; the "
                f"files are named in the warnings above and in {self.run_dir}/train_rank*.log. Remove or replace "
                "them, or raise max_bad_fraction. "
                f"Training stopped; the checkpoints in {self.cfg.ckpt_save_dir} are intact"
            )

    def _report_compile(self, loss: torch.Tensor, seconds_so_far: float) -> None:
        """The first compiled step includes torch.compile's tracing and code generation, and the first step
        with numba's BatchNorm kernels their compilation (about 15 s on a machine's first run) or their
        loading from numba's cache: say how long."""
        float(loss.detach())  # wait for the device so the time is the step's own
        self.compile_reported = True
        seconds = f"first training step took {seconds_so_far:.1f} s"
        if self.compiled_training:
            self.log.info(f"torch.compile (mode 0): {seconds}, {_compiling(self.net)}")
        else:
            self.log.info(
                f"numba: {seconds}, compiling or loading the BatchNorm kernels included (compiled once per machine, "
                "then loaded from numba's cache)"
            )

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

    def _save(self, result: EvalResult | None, force: bool = False) -> None:
        """Epoch end: the best weights when validation improved, a checkpoint when due (or ``force``)."""
        cfg = self.cfg
        improved = result is not None and (self.best_top1 is None or result.top1 > self.best_top1)
        if improved:
            self.best_top1 = result.top1
        due = force or self.epoch % cfg.ckpt_save_interval == 0 or self.epoch == cfg.epoch_size
        state = self._state() if due else None  # collective under DDP: every rank takes part
        if not self.ctx.is_main:
            return
        with self._writing_checkpoints():
            if improved:
                path = ckpt.best_weights_path(cfg.ckpt_save_dir, cfg.model)
                weights_model = self.ema.module if self.ema is not None else self.model
                save_weights(
                    path, weights_model, fmt="safetensors", source=f"epoch {self.epoch} best", classes=self.classes,
                    evaluation=self.evaluation,
                )  # fmt: skip
                self.best_path = path
            if state is not None:
                ref = ckpt.checkpoint_ref(Path(cfg.ckpt_save_dir), cfg.model, self.epoch, self.batches_per_epoch)
                self._write_checkpoint(ref, state, f"epoch {self.epoch}")
                self.keeper.add(ref, result.top1 if result is not None else None)

    def _save_interim(self, batch: int, loss_sum: torch.Tensor, unreadable: int) -> None:
        """A checkpoint inside epoch ``self.epoch + 1``, after ``batch`` batches (ckpt_save_steps, or a stop)."""
        state = self._state(batch, float(loss_sum), unreadable)
        if not self.ctx.is_main:
            return
        ref = ckpt.checkpoint_ref(Path(self.cfg.ckpt_save_dir), self.cfg.model, self.epoch + 1, batch)
        with self._writing_checkpoints():
            self._write_checkpoint(ref, state, f"epoch {self.epoch + 1}, batch {batch}")
            self.keeper.add(ref, None, interim=True)

    def _write_checkpoint(self, ref: ckpt.CheckpointRef, state: dict[str, Any], source: str) -> None:
        if self.ema is not None:  # before the network weights, which mark the checkpoint complete
            save_weights(
                ref.ema, self.ema.module, fmt="safetensors", source=f"{source} EMA", classes=self.classes,
                evaluation=self.evaluation,
            )  # fmt: skip
        ckpt.save_checkpoint(ref, self.model, state, source=source, classes=self.classes, evaluation=self.evaluation)
        self.last_checkpoint = ref.weights

    @contextlib.contextmanager
    def _writing_checkpoints(self) -> Iterator[None]:
        """A failed write (full disk, read-only folder) stops training with the system's reason."""
        try:
            yield
        except OSError as exc:
            error = storage_error(exc, self.cfg.ckpt_save_dir, "a checkpoint to")
            kept = f"the last complete one, {self.last_checkpoint}," if self.last_checkpoint else "earlier checkpoints"
            raise StorageError(f"{error}. Training stopped; {kept} and the files before it are intact") from None


def train(cfg: Config) -> RunResult:
    keep_freed_memory()  # before the loader workers fork, so they inherit it
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        data_mod.stop_workers(trainer.train_loader)
        data_mod.stop_workers(trainer.val_loader)
        dist.cleanup()


def _warn_on(ctx: dist.Context) -> Callable[[str], None]:
    """validate.py's warnings: printed once, by rank 0 (it has no run log)."""

    def warn(message: str) -> None:
        if ctx.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    return warn


def _check_class_count(in_file: object, cfg: Config) -> None:
    """validate.py scores the classifier it is given: the only remedy for another class count is num_classes
    (the loader's generic advice also offers a new classifier, which would only measure chance)."""
    if in_file is not None and in_file != cfg.num_classes:
        raise ConfigError(
            f"--ckpt_path {cfg.ckpt_path} holds a classifier for {in_file} classes and num_classes is "
            f"{cfg.num_classes}: pass --num_classes {in_file} to validate it"
        )


def _network_to_validate(cfg: Config, ctx: dist.Context) -> tuple[nn.Module, list[str] | None, Precision]:
    """The network validate.py runs for weights (or the pretrained release), the classes they were trained
    on when recorded, and its precision."""
    weights = read_weights(cfg.ckpt_path) if cfg.ckpt_path else None
    if weights is not None and weights.arch["model"] in (None, cfg.model):
        _check_class_count(weights.arch["num_classes"], cfg)
    if weights is None:
        model = create_model(cfg.model, cfg.num_classes, cfg.in_channels, pretrained=cfg.pretrained)
    else:
        model = model_from_weights(weights, cfg.model, cfg.num_classes, cfg.in_channels)
    model = model.to(ctx.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if evaluates_fused(cfg, ctx.device):
        net = fuse(model, cfg.channels_last)
    elif compiles(cfg, ctx.device):
        net = CompiledOrEager(model, "validation", _warn_on(ctx))
    precision = Precision.from_config(cfg, ctx.device)
    advice = cpu_autocast_advice(cfg, precision, ctx.device)
    if advice is not None and advice[0]:  # a warning: evaluation here is many times slower than in float32
        _warn_on(ctx)(advice[1])
    return net, weights.classes if weights is not None else None, precision


class _ExportedNetwork(nn.Module):
    """An exported ``.onnx`` file as the module ``evaluate`` calls: ONNX Runtime on the CPU, in float32
    (``mode``, ``amp_level`` and ``channels_last`` do not apply), logits back on the input's device."""

    def __init__(self, network: Network) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.run(images.float().cpu()).to(images.device)


def _exported_network(cfg: Config) -> tuple[nn.Module, list[str] | None, None]:
    """validate.py on what ``shufflenetv2 export`` wrote, the accuracy of the file one deploys: the same
    triple as ``_network_to_validate``, in float32."""
    network = onnx_network(Path(cfg.ckpt_path), cfg)
    _check_class_count(len(network.names), cfg)
    return _ExportedNetwork(network), network.trained_classes, None


def validate(cfg: Config) -> EvalResult:
    """validate.py: top-1/top-5/loss of ``cfg.ckpt_path`` (or the pretrained release) on ``val_split``."""
    if not cfg.ckpt_path and not cfg.pretrained:
        raise ConfigError(
            "validate needs weights: pass --ckpt_path FILE (.safetensors, MindCV .ckpt, .pth, or an exported "
            ".onnx), or --pretrained True for MindCV's release; it never evaluates random weights"
        )
    if cfg.ckpt_path and not os.path.exists(cfg.ckpt_path):
        raise ConfigError(f"--ckpt_path {cfg.ckpt_path} does not exist")
    keep_freed_memory()
    ctx = dist.setup(cfg, job="validate")
    try:
        dataset = data_mod.build_dataset(cfg, cfg.val_split, train=False)
        exported = Path(cfg.ckpt_path).suffix.lower() == ".onnx"
        net, trained, precision = _exported_network(cfg) if exported else _network_to_validate(cfg, ctx)
        if trained is not None and trained != list(dataset.classes):
            difference = data_mod.describe_class_difference(trained, dataset.classes, ("training", cfg.val_split))
            _warn_on(ctx)(
                f"{cfg.ckpt_path} was trained on classes that differ from those of split {cfg.val_split!r} "
                f"({difference}). Labels "
                "are positions in the sorted class names, so these metrics score the network against other classes "
                "unless the folders were renamed in the same order"
            )
        mismatch = settings_warning(
            cfg.ckpt_path, cfg, "pass that run's config (config.yaml in its run folder) or those values as flags"
        ) if cfg.ckpt_path else None  # fmt: skip
        if mismatch:
            _warn_on(ctx)(mismatch)
        inputs = DeviceInput(cfg, train=False, device=ctx.device)
        loader = eval_loader(cfg, dataset, ctx)
        try:
            return evaluate(net, loader, inputs, precision)
        finally:
            data_mod.stop_workers(loader)
    finally:
        dist.cleanup()
