"""Ahead-of-time compiled inference packages (AOTInductor): the fused, frozen graph compiled once into a
shared library inside a ``.pt2`` archive, then loaded and run without dynamo, guards or Python glue.

Why a package when ``fuse(model, freeze=True)`` runs the same kernels: at batch 1 the compiled modules
pay for Python around their kernels (dynamo's guard check alone was 0.5 ms of 7.8 at x1.0, torch's
profiler), and a package calls the kernels from C++: 1.26x the unrolled compile and 1.36x frozen at x1.0
batch 1, level with frozen at batch 32 (``benchmarks/results/cpu_aot``).  What it costs: one input shape per
package (a dynamic batch ran 0.74-0.83x the static one at batch 1: the kernels lose their fixed loop
bounds), weights fixed at compile time, and native code for the kind of CPU that compiled it.

AOTInductor runs what it is given without checking it: a batch-2 tensor fed to a batch-1 package comes
back as one row of logits, an NCHW tensor fed to an NHWC package as wrong numbers.  ``CompiledPackage``
checks the shape, dtype and device and hands the package the memory layout it was compiled for.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .deploy import CLASSES_KEY, _example, check_export, frozen_graph
from .errors import ShuffleNetV2Error
from .fileio import storage_error
from .model import ShuffleNetV2
from .weights import EVALUATION_KEY

PACKAGE_FORMAT = "shufflenetv2-aot/1"  # our metadata entry; a package without it was not written here


def _aoti() -> object:
    import torch._inductor as inductor

    if not hasattr(inductor, "aoti_compile_and_package"):
        raise ShuffleNetV2Error(
            f"compiled packages need torch >= 2.6 (AOTInductor packaging); this is {torch.__version__}"
        )
    return inductor


def package_graph(model: nn.Module) -> nn.Module:
    """What a package compiles: our network fused as ``fuse(model, freeze=True)`` compiles it (BatchNorm
    and shuffle folded, oneDNN convolutions, channels_last); any other module (torchvision's, which the
    bench packages the same way) as an eval-mode channels_last copy."""
    if isinstance(model, ShuffleNetV2):
        return frozen_graph(model)
    return copy.deepcopy(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)


def compile_package(
    model: nn.Module,
    path: str | Path,
    batch: int = 1,
    input_size: int = 224,
    classes: Sequence[str] | None = None,
    evaluation: dict[str, object] | None = None,
) -> Path:
    """Compile ``model`` for float32 CPU inputs of shape (batch, C, input_size, input_size) into ``path``
    (``.pt2``), with its weights frozen in.  Takes tens of seconds (inductor compiles and links C++); the
    file is written whole or not at all, and only once its logits match ``model``'s (``check_export``).
    Load it with ``load_package``.  ``classes`` (the logits' names) and ``evaluation`` (the weights'
    evaluation transform, ``config.evaluation_of``) go into its metadata as JSON, as ``export`` keeps
    them in an ``.onnx`` file, so whoever runs the package knows what its outputs mean and how to
    prepare its inputs."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ShuffleNetV2Error(f"cannot write a compiled package to {path.name}: name it .pt2")
    if batch < 1 or input_size < 32:
        raise ShuffleNetV2Error(
            f"a package needs batch >= 1 and input_size >= 32; got batch {batch}, size {input_size}"
        )
    inductor = _aoti()
    graph = package_graph(model).cpu()
    example = _example(model, input_size, batch).contiguous(memory_format=torch.channels_last)
    shape = tuple(example.shape)
    metadata = {"format": PACKAGE_FORMAT, "input_shape": ",".join(map(str, shape)), "dtype": "float32"}
    if classes is not None:
        metadata[CLASSES_KEY] = json.dumps(list(classes), ensure_ascii=False)
    if evaluation is not None:
        metadata[EVALUATION_KEY] = json.dumps(evaluation)
    # autograd off for the compile too: inductor packs the frozen weights for oneDNN (convolutions with
    # their ReLU fused) only then, and otherwise emits plain convolutions, 0.7x as fast at x1.0 batch 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
            program = torch.export.export(graph, (example,))
            partial = Path(scratch) / path.name  # AOTInductor insists on the .pt2 suffix
            inductor.aoti_compile_and_package(
                program, package_path=str(partial),
                inductor_configs={"freezing": True, "aot_inductor.metadata": metadata},
            )  # fmt: skip
            # checked before it replaces path, against the model itself (the folding included)
            runner = inductor.aoti_load_package(str(partial))
            check_export(model, lambda x: runner(x.contiguous(memory_format=torch.channels_last)),
                         "in the compiled package", input_size, batch)  # fmt: skip
            os.replace(partial, path)
    except OSError as exc:
        raise storage_error(exc, path, "the compiled package") from None
    except Exception as exc:  # inductor wraps its own errors; this one is the user's machine, not a bug
        if "InvalidCxxCompiler" not in f"{type(exc).__name__}: {exc}":
            raise
        raise ShuffleNetV2Error(
            "compiling a package needs a C++ compiler (g++ or clang++), and inductor found none: install one "
            "(apt install g++), or deploy with fuse(model) or ONNX, which need none"
        ) from None
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The package's metadata, read from the archive without loading its library."""
    path = Path(path)
    if not path.is_file():
        raise ShuffleNetV2Error(f"{path}: no such file; write one with `shufflenetv2 export WEIGHTS {path.name} --aot`")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("wrapper_metadata.json")]
            metadata = json.loads(archive.read(names[0])) if len(names) == 1 else {}
            archive.testzip()  # a truncated or damaged member fails here, before torch loads the library
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ShuffleNetV2Error(
            f"{path}: not a readable package ({exc}); it may be truncated: compile it again with "
            "`shufflenetv2 export WEIGHTS FILE.pt2 --aot`"
        ) from None
    if metadata.get("format") != PACKAGE_FORMAT:
        raise ShuffleNetV2Error(
            f"{path}: not a compiled package written by shufflenetv2 (a torch.export program from `export` "
            "without --aot loads with torch.export.load); compile one with `shufflenetv2 export WEIGHTS FILE.pt2 --aot`"
        )
    return metadata


def _runs_here(isa: str) -> bool:
    """Whether this CPU has the vector ISA the package's kernels were compiled for ("AVX512 AVX512_VNNI")."""
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    except ImportError:  # no way to ask: let torch try
        return True
    return not isa or isa.upper() in {str(found).upper() for found in valid_vec_isa_list()}


def _json(metadata: dict[str, str], key: str, path: str | Path) -> Any:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except ValueError:
        raise ShuffleNetV2Error(
            f"{path}: its {key!r} metadata is not JSON ({metadata[key][:80]!r}); compile it again with "
            "`shufflenetv2 export WEIGHTS FILE.pt2 --aot`"
        ) from None


class CompiledPackage(nn.Module):
    """A loaded package, called like the model it was compiled from on inputs of its one shape."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        metadata = read_metadata(path)
        isa = metadata.get("AOTI_CPU_ISA", "")
        if not _runs_here(isa):
            raise ShuffleNetV2Error(
                f"{path}: compiled for CPUs with {isa}, which this CPU lacks; compile it again on this machine"
            )
        self.input_shape = tuple(int(side) for side in metadata["input_shape"].split(","))
        self.metadata = metadata
        # what its logits mean and how its inputs were prepared in training, when the weights recorded them
        self.classes: list[str] | None = _json(metadata, CLASSES_KEY, path)
        self.evaluation: dict[str, object] | None = _json(metadata, EVALUATION_KEY, path)
        self._runner = _aoti().aoti_load_package(str(path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.input_shape or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(
                f"this package was compiled for float32 CPU inputs of shape {self.input_shape}; got "
                f"{x.dtype} {x.device.type} {tuple(x.shape)}: compile one for that shape "
                "(`shufflenetv2 export WEIGHTS FILE.pt2 --aot --batch N --input-size S`)"
            )
        return self._runner(x.contiguous(memory_format=torch.channels_last))

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, cpu_isa={self.metadata.get('AOTI_CPU_ISA', '?')!r}"


def load_package(path: str | Path) -> CompiledPackage:
    """A package from ``compile_package``.  It is native code: load only packages you compiled yourself."""
    return CompiledPackage(path)
