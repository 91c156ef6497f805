"""Side-by-side inference measurements: our model (eager, fused, compiled, frozen, compiled ahead of time,
ONNX Runtime) against torchvision's ``shufflenet_v2`` (the same, bar fused), same torch, threads and inputs.

Each row is timed in ``repeats`` rounds of ``iterations`` calls after ``warmup`` calls, the rows of one
(model, batch) taking turns within each round; the figures are the median round and the spread
(min..max) over rounds.  Compilation happens in the warm-up and
its time is reported on its own.  Nothing here is a pass/fail test: ratios are only meaningful
between rows measured in the same run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .deploy import FrozenCompiled, export_onnx, fuse
from .errors import CheckpointError
from .model import build_network
from .onnx_graph import fuse_for_onnx
from .package import compile_package, load_package
from .summary import summarize

BACKENDS = (
    "ours-eager", "ours-fused", "ours-fused-compiled", "ours-fused-frozen", "ours-aot", "ours-onnxruntime",
    "torchvision-eager", "torchvision-compiled", "torchvision-frozen", "torchvision-aot", "torchvision-onnxruntime",
)  # fmt: skip
# Another runtime a user could pick: the same ONNX files in OpenVINO, named explicitly (the openvino extra)
OPENVINO_BACKENDS = ("ours-openvino", "torchvision-openvino")
# A peer at another precision, named explicitly: torchvision's quantized ShuffleNetV2 (int8, torch's x86 engine)
INT8_BACKENDS = ("torchvision-int8",)
ALL_BACKENDS = BACKENDS + OPENVINO_BACKENDS + INT8_BACKENDS
CPU_ONLY_KINDS = ("onnxruntime", "openvino", "aot", "int8")  # rows that bench runs on the CPU only
ONNX_FILE = "onnx-file"  # the row of a user's own ONNX file (``bench --onnx FILE``), run like ours-onnxruntime


def expand_backends(names: list[str]) -> list[str]:
    """Backend names as given on the command line, where a name without its ``ours-`` or ``torchvision-``
    prefix (its last word: ``onnxruntime``, ``eager``, ``compiled``, ``frozen``, ``aot``, ``fused``) stands for
    every backend of that kind, so ``--backend onnxruntime`` runs both ONNX Runtime rows and ``--backend
    compiled`` both compiled ones.  Order of first mention, no repeats."""
    chosen: list[str] = []
    for name in names:
        matches = [name] if name in ALL_BACKENDS else [b for b in ALL_BACKENDS if b.rsplit("-", 1)[1] == name]
        if not matches:
            kinds = ", ".join(sorted({b.rsplit("-", 1)[1] for b in ALL_BACKENDS}))
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(ALL_BACKENDS)}, or a kind: {kinds}")
        chosen += [b for b in matches if b not in chosen]
    return chosen


@dataclasses.dataclass
class Row:
    model: str
    batch: int
    backend: str
    images_per_second: float  # median round
    spread: tuple[float, float]  # slowest and fastest round, images/s
    latency_ms: float  # median time per call
    setup_seconds: float  # export or compilation, excluded from the figures
    # images/s of every round in order: rows of one (model, batch) share rounds, so ratios can be paired
    rounds: list[float] = dataclasses.field(default_factory=list)


def _calibrate(run: Callable[[], object], warmup: int, iterations: int) -> int:
    """Warm ``run`` up; the calls per round (``iterations``, or rounds of about a third of a second)."""
    for _ in range(warmup):
        run()
    if iterations > 0:
        return iterations
    start = time.perf_counter()
    run()
    return max(1, round(0.33 / (time.perf_counter() - start)))


def interleaved_rounds(
    runs: list[tuple[Callable[[], object], int]], batch: int, repeats: int, threads: int
) -> list[list[float]]:
    """Images/s per round for each runner, the runners taking turns within every round, so that a slow
    spell of a shared machine falls on all of them rather than on whichever row was being timed.

    torch's thread count must stay ``threads``, the count asked for, through the runners' set-up and
    every round: rows at unequal thread counts compare nothing (numba starting its threads once reset it
    to every core; ``batchnorm.numba_threads``)."""
    rates: list[list[float]] = [[] for _ in runs]
    check_threads(threads, "while the rows were set up")
    for _ in range(repeats):
        for index, (run, iterations) in enumerate(runs):
            start = time.perf_counter()
            if isinstance(run, OpenVINOProcess):
                run.calls(iterations)  # the whole round in the child
            else:
                for _ in range(iterations):
                    run()
            rates[index].append(batch * iterations / (time.perf_counter() - start))
            check_threads(threads, f"in a round of runner {index}")
    return rates


def check_threads(threads: int, when: str) -> None:
    """Raise unless torch's thread count is ``threads``: a bench row measured at another count compares nothing."""
    if torch.get_num_threads() != threads:
        raise RuntimeError(
            f"torch's thread count changed from {threads} to {torch.get_num_threads()} {when}: the rows would "
            "not be measured at the thread count asked for"
        )


def autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a timed call includes its kernels (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_runner(module: nn.Module, x: torch.Tensor, amp: torch.dtype | None = None) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode(), autocast(x.device, amp):
            out = module(x)
        synchronize(x.device)
        return out

    return run


def _exported(module: nn.Module, x: torch.Tensor, scratch: Path) -> Path:
    """``module`` exported to an ONNX file in ``scratch`` for inputs shaped like ``x``."""
    path = scratch / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        export_onnx(module, path, input_size=x.shape[-1])
    return path


def _packaged(module: nn.Module, x: torch.Tensor, scratch: Path) -> nn.Module:
    """``module`` compiled ahead of time (``compile_package``) into ``scratch`` for inputs shaped like ``x``,
    loaded."""
    path = scratch / "model.pt2"
    return load_package(compile_package(module, path, batch=x.shape[0], input_size=x.shape[-1]))


def _onnx_runner(module: nn.Module, x: torch.Tensor, threads: int, scratch: Path) -> Callable[[], object]:
    return onnx_file_runner(_exported(module, x, scratch), x, threads)


def _openvino_runner(module: nn.Module, x: torch.Tensor, threads: int, scratch: Path) -> OpenVINOProcess:
    return OpenVINOProcess(_exported(module, x, scratch), x, threads)


def _serve_openvino(path: str, feed_path: str, threads: int, conn: Connection) -> None:
    """The child's side of ``OpenVINOProcess``: compile, say so (or why not), then run what is asked."""
    try:
        feed = np.load(feed_path)
        import openvino

        core = openvino.Core()
        settings = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        request = core.compile_model(core.read_model(path), "CPU", settings).create_infer_request()
    except Exception as exc:  # an import, read or compile failure, told to the parent in words
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while (message := _receive_or_none(conn)) is not None:
        calls, want_logits = message
        for _ in range(calls):
            logits = request.infer({0: feed})[0]
        conn.send(("ok", np.array(logits) if want_logits else None))


def _receive_or_none(conn: Connection) -> object:
    try:
        return conn.recv()
    except EOFError:  # the parent is gone
        return None


class OpenVINOProcess:
    """An ONNX file compiled by OpenVINO for the CPU, run in a child process: ``threads`` inference threads,
    float32 (OpenVINO would otherwise compute in bf16 on CPUs that have it), one stream, as a latency-bound
    user runs it.  Calling it runs one inference and returns the logits; ``calls(n)`` runs n back to back
    for one message each way, so a timed round pays one pipe round trip, not one per call.

    A child of its own, because OpenVINO's libraries and an inductor-compiled model in one process ended in
    a segmentation fault (the test suite, OpenVINO 2026.4, torch 2.14), and the parent waits while the child
    runs, so the rounds still take turns on the same cores."""

    def __init__(self, path: str | Path, x: torch.Tensor, threads: int) -> None:
        import multiprocessing
        import weakref

        context = multiprocessing.get_context("spawn")  # not fork: torch's thread pools do not survive it
        self._conn, child_end = context.Pipe()
        # the input goes in a file beside the model, not with the arguments: those are written to the child
        # before it starts, and a child that dies while starting then left a larger input blocked in the pipe
        feed_path = Path(path).with_name(Path(path).stem + "-input.npy")
        np.save(feed_path, x.contiguous().numpy())
        args = (str(path), str(feed_path), threads, child_end)
        process = context.Process(target=_serve_openvino, args=args, daemon=True)
        process.start()
        child_end.close()
        weakref.finalize(self, _stop_child, self._conn, process)
        self._process = process
        self._answer()  # compiled, or the child's reason why not

    def __call__(self) -> np.ndarray:
        self._conn.send((1, True))
        return self._answer()

    def calls(self, count: int) -> None:
        self._conn.send((count, False))
        self._answer()

    def _answer(self) -> object:
        while not self._conn.poll(0.5):  # a child that died without a word is an error, not a wait
            if not self._process.is_alive() and not self._conn.poll():
                raise self._ended()
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise self._ended() from None
        if status == "error":
            raise RuntimeError(f"OpenVINO could not run the model: {value}")
        return value

    def _ended(self) -> RuntimeError:
        self._process.join(5)
        return RuntimeError(
            f"the OpenVINO process ended without answering (exit code {self._process.exitcode}); if it ran from "
            "a script of yours, guard the script's top level with `if __name__ == '__main__':`, which the spawned "
            "child otherwise runs again"
        )


def _stop_child(conn: Connection, process: object) -> None:
    with contextlib.suppress(OSError):
        conn.close()  # the child's recv ends, and so does the child
    process.join(5)


def onnx_session(path: str | Path, threads: int, **settings: object) -> object:
    """An ONNX Runtime CPU session as every ONNX row runs it: ``threads`` intra-op threads, one inter-op;
    ``settings`` sets further ``SessionOptions`` fields (``enable_profiling=True``, say)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for name, value in settings.items():
        setattr(options, name, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def open_onnx_classifier(path: str | Path, threads: int) -> Any:
    """An ONNX Runtime session for the file at ``path``, which must take one (batch, 3, H, W) image tensor
    (``shufflenetv2 export`` fixes H and W: read them from ``session.get_inputs()[0].shape``); a
    ``CheckpointError`` that says what is wrong for a missing, unloadable or other file."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file; write one with `shufflenetv2 export WEIGHTS {path}`")
    try:
        session: Any = onnx_session(path, threads)
    except Exception as exc:  # onnxruntime's own exception types differ between versions
        raise CheckpointError(
            f"{path}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0]}); export it again "
            "with `shufflenetv2 export`"
        ) from None
    inputs = session.get_inputs()
    shape = inputs[0].shape if inputs else []
    if len(inputs) != 1 or len(shape) != 4 or shape[1] not in (3, "3"):
        raise CheckpointError(
            f"{path}: the model should take one (batch, 3, H, W) image tensor, but its inputs are "
            f"{[(i.name, i.shape) for i in inputs]}"
        )
    return session


def onnx_file_runner(path: str | Path, x: torch.Tensor, threads: int) -> Callable[[], object]:
    """Runs the ONNX file at ``path`` on ``x``, fed to its first input whatever its name."""
    session = onnx_session(path, threads)
    feed = {session.get_inputs()[0].name: x.contiguous().numpy()}
    return lambda: session.run(None, feed)


def torchvision_model(name: str, num_classes: int = 1000) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes).eval()  # our names


def torchvision_int8_model(float_model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """torchvision's quantizable ShuffleNetV2 holding ``float_model``'s weights (a torchvision
    ``ShuffleNetV2``), its convolutions, BatchNorms and ReLUs fused, then quantized to int8 (weights per
    channel, activations per tensor) with ranges observed on ``calibration``: what a user who wants
    torchvision's fastest CPU model would run.  Its eager-mode quantization API is deprecated in favour of
    torchao (torch 2.14); the notices are muted here."""
    from torchvision.models.quantization.shufflenetv2 import QuantizableShuffleNetV2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = QuantizableShuffleNetV2(
            [4, 8, 4], float_model._stage_out_channels, num_classes=float_model.fc.out_features
        )
        model.load_state_dict(float_model.state_dict())
        model.eval().fuse_model(is_qat=False)
        model.qconfig = torch.ao.quantization.get_default_qconfig(torch.backends.quantized.engine)
        torch.ao.quantization.prepare(model, inplace=True)
        with torch.no_grad():
            model(calibration)
        return torch.ao.quantization.convert(model, inplace=True)


def benchmark(
    names: list[str],
    batches: list[int],
    backends: list[str],
    threads: int = 2,
    warmup: int = 5,
    repeats: int = 7,
    iterations: int = 0,
    image_size: int = 224,
    device: str = "cpu",
    amp: torch.dtype | None = None,
    onnx_file: str | Path | None = None,
) -> dict[str, object]:
    """Every (model, batch, backend) row; backends are those of ``ALL_BACKENDS``.  ``amp`` runs the torch
    rows under autocast (bfloat16 on a GPU, say); ONNX Runtime, OpenVINO and the ahead-of-time compiled
    packages (``aot``, float32) are CPU-only.
    ``onnx_file`` adds a row (``ONNX_FILE``) for that file in ONNX Runtime, timed in turn with the others."""
    torch.set_num_threads(threads)
    target = torch.device(device)
    if target.type != "cpu" and any(b.endswith(CPU_ONLY_KINDS) for b in backends):
        raise ValueError("the onnxruntime, openvino, aot and int8 rows run on the CPU only; leave them out on a GPU")
    if amp is not None and any(b.endswith(("-aot", "-int8")) for b in backends):
        raise ValueError(
            "the aot rows are compiled for float32 and the int8 row is int8; leave them out under autocast"
        )
    rows: list[Row] = []
    info: dict[str, object] = {}
    row_backends = [*backends, ONNX_FILE] if onnx_file is not None else list(backends)
    for name in names:
        ours = build_network(name).eval()
        theirs = torchvision_model(name)
        summary = summarize(ours, (image_size, image_size))
        info[name] = {"params": summary.trainable_params, "macs": summary.macs}
        ours, theirs = ours.to(target), theirs.to(target)
        for batch in batches:
            x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(target)
            runs, setups = [], []
            # every compiled row of a model compiles the same forward; without a reset, the fourth (model,
            # batch) of the frozen and compiled rows reached dynamo's recompile limit and ran eager
            torch._dynamo.reset()
            for backend in row_backends:
                start = time.perf_counter()
                # ONNX Runtime, OpenVINO's child and a loaded package have read their file once set up
                with tempfile.TemporaryDirectory(prefix="shufflenetv2-bench-") as scratch:
                    run = _runner(backend, ours, theirs, x, threads, Path(scratch), amp, onnx_file)
                run()  # the first call (compilation, session warm-up) is setup
                setups.append(time.perf_counter() - start)
                runs.append((run, _calibrate(run, warmup, iterations)))
            measured = interleaved_rounds(runs, batch, repeats, threads)
            for backend, setup, rates in zip(row_backends, setups, measured, strict=True):
                median = statistics.median(rates)
                spread = (min(rates), max(rates))
                rows.append(Row(name, batch, backend, median, spread, 1000 * batch / median, setup, rates))
                print(_format_row(rows[-1]), flush=True)
    return {
        "rows": [dataclasses.asdict(r) for r in rows],
        "models": info,
        "settings": {
            "threads": threads,
            "warmup": warmup,
            "repeats": repeats,
            "iterations": iterations,
            "image_size": image_size,
            "dtype": "float32" if amp is None else f"autocast {str(amp).replace('torch.', '')}",
            "device": device,
            "onnx_file": None if onnx_file is None else str(onnx_file),
        },
        "machine": machine_record(),
    }


def cpu_identity() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model numbers (a VM may name only the vendor's
    line, "AMD EPYC", where family 25 model 1 and model 17 are two generations), and the vector ISA torch's
    kernels dispatch to.  Ratios to torchvision move with the CPU: the same training step measured 1.43-1.48x
    torchvision's on the VM of the earlier committed runs and 1.68-1.73x on a family 25 model 17 (AVX-512) one."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, torch kernels {torch.backends.cpu.get_cpu_capability()}"


def machine_record() -> dict[str, object]:
    """What a result file says of the machine that produced it."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_identity(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "logical_cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _runner(
    backend: str,
    ours: nn.Module,
    theirs: nn.Module,
    x: torch.Tensor,
    threads: int,
    scratch: Path,
    amp: torch.dtype | None = None,
    onnx_file: str | Path | None = None,
) -> Callable[[], object]:
    """How ``backend`` runs ``x``; its exported or compiled files go to ``scratch``."""
    nhwc = x.contiguous(memory_format=torch.channels_last)
    if backend == "ours-eager":
        return _torch_runner(ours, x, amp)
    if backend == "ours-fused":
        return _torch_runner(fuse(ours), nhwc, amp)
    if backend == "ours-fused-compiled":
        return _torch_runner(fuse(ours, compile=True), nhwc, amp)
    if backend == "ours-fused-frozen":
        return _torch_runner(fuse(ours, freeze=True), nhwc, amp)
    if backend == "ours-aot":
        return _torch_runner(_packaged(ours, x, scratch), nhwc)
    if backend == "ours-onnxruntime":
        return _onnx_runner(fuse_for_onnx(ours), x, threads, scratch)
    if backend == "torchvision-eager":
        return _torch_runner(theirs, x, amp)
    if backend == "torchvision-compiled":
        return _torch_runner(torch.compile(theirs), x, amp)
    if backend == "torchvision-frozen":  # the same freezing offered to the peer, channels_last as ours (a copy:
        # ``to(memory_format=...)`` converts in place, and the other torchvision rows must keep NCHW weights)
        return _torch_runner(FrozenCompiled(copy.deepcopy(theirs).to(memory_format=torch.channels_last)), nhwc, amp)
    if backend == "torchvision-aot":  # the same package offered to the peer: frozen, channels_last
        return _torch_runner(_packaged(theirs, x, scratch), nhwc)
    if backend == "torchvision-onnxruntime":
        return _onnx_runner(theirs, x, threads, scratch)
    if backend == "torchvision-int8":  # calibrated on the timed batch: the ranges do not change its speed
        return _torch_runner(torchvision_int8_model(theirs, x), x)
    if backend == "ours-openvino":  # no channel padding: OpenVINO picks its own blocked layouts
        return _openvino_runner(fuse_for_onnx(ours, pad=False), x, threads, scratch)
    if backend == "torchvision-openvino":
        return _openvino_runner(theirs, x, threads, scratch)
    if backend == ONNX_FILE and onnx_file is not None:
        return onnx_file_runner(onnx_file, x, threads)
    raise ValueError(f"unknown backend {backend!r}")


def _format_row(row: Row) -> str:
    low, high = row.spread
    return (
        f"{row.model:20s} b{row.batch:<4d} {row.backend:26s} {row.images_per_second:9.1f} img/s "
        f"({low:.1f}..{high:.1f})  {row.latency_ms:8.2f} ms/call  setup {row.setup_seconds:.1f} s"
    )


def write_results(results: dict[str, object], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path
