"""The shufflenetv2 command: train, validate, predict, summary, info, convert, recalibrate, export, bench, recipes
and demo.

Errors meant for users (``ShuffleNetV2Error``) are printed as one paragraph with exit code 2; a training
run stopped by SIGTERM/SIGINT after saving exits with 75 (``EXIT_INTERRUPTED``); anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

from . import config, recipes
from .distributed import launched_rank
from .errors import DataError, ShuffleNetV2Error
from .factory import create_model, model_from_weights
from .fileio import atomic_path, storage_error
from .interrupt import EXIT_INTERRUPTED, TrainingInterrupted
from .model import LAYOUTS, WIDTHS, build_network
from .summary import format_summary, summarize
from .weights import EVALUATION_KEY, Weights, output_format, read_weights, save_weights

EXIT_USER_ERROR = 2


def _cmd_summary(args: argparse.Namespace) -> None:
    model = build_network(args.model, args.num_classes, args.in_channels, args.layout)
    summary = summarize(model, (args.input_size, args.input_size))
    print(format_summary(summary, f"{args.model} ({args.layout} layout, {args.num_classes} classes)", args.layers))


def _cmd_info(args: argparse.Namespace) -> None:
    weights = read_weights(args.file, ema=args.ema)
    info = {
        "file": weights.source,
        "format": weights.format,
        "layout": weights.layout,
        **{k: v for k, v in weights.arch.items() if k != "layout"},
        "tensors": len(weights.tensors),
        "parameters": int(sum(t.numel() for t in weights.tensors.values())),
        "training_state_skipped": len(weights.skipped),
        "classes": weights.classes,  # the names a training run of ours recorded, in label order
        "evaluation": weights.evaluation,  # and the settings of its evaluation transform
        "metadata": {k: v for k, v in weights.metadata.items() if k not in ("classes", EVALUATION_KEY)},
    }
    print(json.dumps(info, indent=2))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _cmd_convert(args: argparse.Namespace) -> None:
    source = read_weights(args.src, ema=args.ema)
    name = args.model or source.arch["model"]
    if name is None:
        raise ShuffleNetV2Error(
            f"{args.src}: its tensors fit no ShuffleNetV2 width; pass --model to see the mismatches"
        )
    layout = args.layout or source.layout
    num_classes, in_channels = source.arch["num_classes"], source.arch["in_channels"]
    model = model_from_weights(source, str(name), num_classes, in_channels, layout=layout)
    fmt = output_format(args.dst, args.format)
    try:
        # written beside dst and checked before it replaces dst: a conversion that fails the check leaves
        # an earlier file at dst as it was
        with atomic_path(args.dst) as written:
            note = f"converted from {Path(args.src).name}"
            save_weights(written, model, fmt=fmt, source=note, classes=source.classes, evaluation=source.evaluation)
            diff, scale = _conversion_error(source, str(name), layout, written)
            if diff > 1e-9 * max(1.0, scale):
                raise ShuffleNetV2Error(
                    f"converting {args.src} changed its logits by {diff:.2e} in float64 (logits up to {scale:.2e}): "
                    f"a bug in the conversion, so {args.dst} was not written; please report it with the file"
                )
    except OSError as exc:
        raise storage_error(exc, args.dst, "the converted weights") from None
    print(
        f"wrote {args.dst} ({fmt}, {layout} layout, {name}, {num_classes} classes); max |logit difference| "
        f"vs {args.src} in float64: {diff:.2e} (logits up to {scale:.2e})"
    )


def _conversion_error(source: Weights, name: str, layout: str, written: Path) -> tuple[float, float]:
    """The largest logit difference between the source weights and the file written, with the largest logit.

    In float64, where a conversion (names, channel permutations, the MindSpore encoding) is exact up to
    rounding that is many orders of magnitude below a bug's: float32 rounding alone moved the logits of a
    trained x0.5 by 0.06 on a noise input (logits of 6e5), which an absolute float32 threshold took for one.
    """
    num_classes, in_channels = source.arch["num_classes"], source.arch["in_channels"]
    original = model_from_weights(source, name, num_classes, in_channels, layout=source.layout)
    reloaded = create_model(
        name, num_classes=num_classes, in_channels=in_channels, checkpoint_path=written, layout=layout
    )
    x = torch.randn(2, in_channels, 97, 131, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, got = _logits(original.double(), x), _logits(reloaded.double(), x)
    return float((expected - got).abs().max()), float(expected.abs().max())


def _cmd_train(args: argparse.Namespace) -> None:
    from .engine import train

    result = train(config.from_args(args))
    if launched_rank() != 0:  # under torchrun every rank returns the run's result: rank 0 reports it
        return
    if result.last is not None:
        print(
            f"final validation: top-1 {100 * result.last.top1:.2f}%, top-5 {100 * result.last.top5:.2f}%, "
            f"loss {result.last.loss:.4f}"
        )
    print(f"run directory: {result.run_dir}  (last checkpoint: {result.last_checkpoint}, best: {result.best_path})")


def _cmd_validate(args: argparse.Namespace) -> None:
    from .engine import validate

    cfg = config.from_args(args)
    result = validate(cfg)
    for reason in result.unreadable_here:  # this rank's own files
        print(f"warning: left out an unreadable file: {reason}", file=sys.stderr)
    if launched_rank() != 0:  # the metrics cover every rank's share: rank 0 reports them
        return
    if result.unreadable:
        print(
            f"warning: {result.unreadable} file(s) of the validation split could not be read and are not in "
            f"these metrics, which cover the {result.count} images that could",
            file=sys.stderr,
        )
    print(result.as_mindcv())
    summary = {**result.as_mindcv(), "images": result.count, "unreadable": result.unreadable}
    print(json.dumps({**summary, "ckpt_path": cfg.ckpt_path}))


def _cmd_export(args: argparse.Namespace) -> None:
    from .deploy import check_export, fuse, onnx_bytes, onnx_runner, program_bytes, program_runner, write_export
    from .onnx_graph import fuse_for_onnx

    weights = read_weights(args.src)
    name = args.model or weights.arch["model"]
    if name is None:
        raise ShuffleNetV2Error(f"{args.src}: its tensors fit no ShuffleNetV2 width; pass --model")
    model = model_from_weights(
        weights, str(name), weights.arch["num_classes"], weights.arch["in_channels"], layout=weights.layout
    )
    dst = Path(args.dst)
    evaluation = weights.evaluation
    if args.input_size is None:  # the size it was trained at: an export fixes H and W
        recorded = config.with_evaluation(config.Config(), evaluation or {}, f"the settings recorded in {args.src}")
        args.input_size = recorded.image_resize
    classes = weights.classes
    if evaluation is not None and evaluation.get("image_resize") != args.input_size:
        evaluation = None  # settings for another size would mislead whoever reads them (predict, validate.py)
    if args.aot:
        from .package import compile_package

        compile_package(model, dst, args.batch, args.input_size, classes, evaluation)
        shape = f"{args.batch}x{weights.arch['in_channels']}x{args.input_size}x{args.input_size}"
        recorded = [f"the names of its {len(classes)} classes"] if classes is not None else []
        recorded += ["its evaluation settings"] if evaluation is not None else []
        kept = f"; {' and '.join(recorded)} in its metadata" if recorded else ""
        print(
            f"wrote {dst}: {name} compiled ahead of time for float32 CPU inputs of {shape} on this kind of CPU"
            f"{kept}; its logits were checked against the weights' before it was written"
        )
        return
    if args.batch != 1:
        raise ShuffleNetV2Error("--batch applies to --aot packages only: .onnx and .pt2 exports take any batch")
    if args.runtime != "onnxruntime" and dst.suffix != ".onnx":
        raise ShuffleNetV2Error(f"--runtime applies to .onnx exports only, not to {dst.name}")
    if dst.suffix == ".onnx":  # the zero-channel padding is for ONNX Runtime's blocked layout only
        if (classes is not None or evaluation is not None) and importlib.util.find_spec("onnx") is None:
            print(
                f"note: {args.src} records its class names or evaluation settings, but writing them into an .onnx "
                "file needs the onnx package"
            )
            classes = evaluation = None
        fused = fuse_for_onnx(model, pad=args.runtime == "onnxruntime")
        data = onnx_bytes(fused, args.input_size, args.opset, classes, evaluation)
        run, where, what = onnx_runner(data), "in ONNX Runtime, batch 3", "the ONNX export"
    elif dst.suffix == ".pt2":
        data = program_bytes(fuse(model, channels_last=False), args.input_size, classes, evaluation)
        run, where, what = program_runner(data), "in torch.export.load(...).module(), batch 3", "the exported program"
    else:
        raise ShuffleNetV2Error(f"cannot export to {dst.name}: name it .onnx (ONNX) or .pt2 (torch.export program)")
    # checked before it is written: an export that fails the check leaves an earlier file at dst as it was
    checked = f"checked: {check_export(model, run, where, args.input_size)}" if run else "not checked: no onnxruntime"
    write_export(dst, data, what)
    named = f", the names of its {len(classes)} classes in its metadata" if classes is not None else ""
    print(
        f"wrote {dst}: {name} with BatchNorm and the channel shuffle folded in, {args.input_size} x {args.input_size} "
        f"images, dynamic batch{named}; {checked}"
    )


def _cmd_bench(args: argparse.Namespace) -> None:
    from .bench import CPU_ONLY_KINDS, benchmark, expand_backends, machine_record, write_results
    from .host_memory import keep_freed_memory

    if "data" in args.suites and not args.data:  # before any suite runs, not after minutes of them
        raise ShuffleNetV2Error("bench --suites data needs --data DIR: a folder with train/ and val/ class folders")
    try:
        backends = expand_backends(args.backends)
    except ValueError as exc:
        raise ShuffleNetV2Error(str(exc)) from None
    on_cpu_only = args.onnx or any(b.endswith(CPU_ONLY_KINDS) for b in backends)
    if "inference" in args.suites and args.device != "cpu" and on_cpu_only:
        raise ShuffleNetV2Error(
            "the onnxruntime, openvino, aot and int8 backends and --onnx run on the CPU only; on a GPU name the others "
            "with --backends"
        )
    if "inference" in args.suites and args.amp != "none" and any(b.endswith(("-aot", "-int8")) for b in backends):
        raise ShuffleNetV2Error(
            "the aot backends are float32 packages and the int8 one is int8: under --amp name the others (--backends)"
        )
    if "inference" in args.suites and any(b.endswith("openvino") for b in backends) and not _importable("openvino"):
        raise ShuffleNetV2Error("the openvino backends need OpenVINO: pip install 'shufflenetv2[openvino]'")
    if args.onnx:
        _check_onnx_file(args.onnx, args.models, args.input_size)
    _check_compiler_for(args, backends)
    results: dict[str, object] = {}
    # every row of the process (ours and torchvision's) under the allocator the training loop uses
    reuse = keep_freed_memory()
    amp = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp]
    if "inference" in args.suites:
        results = benchmark(
            args.models, args.batches, backends, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
            iterations=args.iterations, image_size=args.input_size, device=args.device, amp=amp, onnx_file=args.onnx,
        )  # fmt: skip
    if "train" in args.suites:
        from .bench_train import benchmark_training

        rows = benchmark_training(
            args.train_models, args.train_batches, args.train_backends, threads=args.threads,
            repeats=args.repeats, steps=args.iterations, image_size=args.input_size, device=args.device, amp=amp,
        )  # fmt: skip
        results["train_rows"] = [dataclasses.asdict(r) for r in rows]
        from .batchnorm import compiled_kernels

        # ours' channels_last CPU steps train BatchNorm in numba's kernels where numba is installed
        results["batchnorm"] = "numba" if compiled_kernels() else "torch ops (numba not installed)"
    if "data" in args.suites:
        from .bench_data import benchmark_pipelines
        from .jpeg_region import library_path
        from .pipeline import compiled_batch_step

        root = Path(args.data)
        rows = benchmark_pipelines(root / "train", root / "val", args.data_backends, repeats=args.repeats)
        results["data_rows"] = [dataclasses.asdict(r) for r in rows]
        results["jpeg_region_library"] = library_path()  # None: workers decoded whole JPEGs
        results["batch_step"] = "numba" if compiled_batch_step() else "torch ops (numba not installed)"
    results["host_memory"] = "glibc malloc keeps freed memory (host_memory)" if reuse else "malloc as configured"
    results.setdefault("machine", machine_record())  # every suite's file says where it ran
    if args.json:
        print(f"wrote {write_results(results, args.json)}")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _check_onnx_file(path: str, models: list[str], input_size: int) -> None:
    """Before any row runs: ``bench --onnx`` needs one width to compare with, and a file ONNX Runtime loads
    whose input takes (batch, 3, input_size, input_size) images."""
    from .bench import open_onnx_classifier

    if len(models) != 1:
        raise ShuffleNetV2Error(
            f"bench --onnx compares the file with torchvision's model of the same width: name that width alone "
            f"with --models (got {' '.join(models)})"
        )
    shape = open_onnx_classifier(path, 1).get_inputs()[0].shape
    fixed = [side for side in shape[2:] if isinstance(side, int)]  # `export` fixes H and W to its --input-size
    if any(side != input_size for side in fixed):
        raise ShuffleNetV2Error(
            f"{path} takes {shape[2]} x {shape[3]} images and bench would feed {input_size} x {input_size}: "
            f"pass --input-size {fixed[0]}, or export it again with --input-size {input_size}"
        )


def _cmd_predict(args: argparse.Namespace) -> None:
    from .predict import config_for, image_files, predict, settings_warning

    if args.top < 1:
        raise ShuffleNetV2Error(f"--top must be at least 1, got {args.top}")
    if args.config:
        cfg = config.from_dict(config.load_yaml(args.config), where=args.config)
        warning = settings_warning(args.weights, cfg, "leave -c out to use those, or pass that run's config.yaml")
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    else:
        cfg = config_for(args.weights)
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    images = image_files(args.images)
    if not images:
        raise ShuffleNetV2Error(f"no image files in {' '.join(args.images)}")
    failed = []
    for result in predict(args.weights, images, cfg, top=args.top):
        if isinstance(result, DataError):
            failed.append(str(result))
            print(f"error: {result}", file=sys.stderr)
        elif args.json:
            print(json.dumps(dataclasses.asdict(result), ensure_ascii=False))
        else:
            best = ", ".join(f"{n} {p:.3f}" for n, p in zip(result.classes, result.probabilities, strict=True))
            print(f"{result.path}: {best}")
    if failed:
        raise ShuffleNetV2Error(f"{len(failed)} of {len(images)} images could not be read (named above)")


def _cmd_recalibrate(args: argparse.Namespace) -> None:
    from .distributed import pick_device
    from .precise_bn import recalibrate, running_batchnorms
    from .predict import config_for

    if args.images < 1:
        raise ShuffleNetV2Error(f"--images must be at least 1, got {args.images}")
    if not (args.data_dir or args.config):
        raise ShuffleNetV2Error(
            "name the training images: --data_dir DIR (its train folder), or -c CONFIG with data_dir"
        )
    # without -c: the transform the weights were trained with, at the size they recorded
    loaded = config.from_dict(config.load_yaml(args.config), where=args.config) if args.config else None
    cfg = loaded or config_for(args.src)
    overrides = {"data_dir": args.data_dir, "batch_size": args.batch_size, "device": args.device}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    config.validate(cfg)
    source = read_weights(args.src, ema=args.ema)
    name = source.arch["model"]
    if name is None:
        raise ShuffleNetV2Error(f"{args.src}: its tensors fit no ShuffleNetV2 width")
    arch = source.arch
    model = model_from_weights(source, str(name), arch["num_classes"], arch["in_channels"], layout=source.layout)
    device = pick_device(cfg.device)
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    before = [bn.running_var.clone() for bn in running_batchnorms(model)]
    fed, described = recalibrate(model, cfg, args.images, device)
    layers = zip(running_batchnorms(model), before, strict=True)
    moved = torch.cat([(bn.running_var / old.clamp_min(1e-12) - 1).abs() for bn, old in layers])
    evaluation = config.evaluation_of(cfg)  # the statistics now fit this transform's images
    note = f"{Path(args.src).name} with BatchNorm statistics from {fed} images of {cfg.data_dir}"
    fmt = output_format(args.dst, None)
    try:
        save_weights(args.dst, model, fmt=fmt, source=note, classes=source.classes, evaluation=evaluation)
    except OSError as exc:
        raise storage_error(exc, args.dst, "the recalibrated weights") from None
    print(
        f"wrote {args.dst}: {name} from {args.src} with the statistics of its {len(before)} BatchNorm layers "
        f"recomputed from {fed} images of {described}, under the training transform at {cfg.image_resize} px; "
        f"the running variances moved by {100 * float(moved.median()):.1f} % in the median, "
        f"{100 * float(moved.max()):.0f} % at most"
    )


def _cmd_recipes(args: argparse.Namespace) -> None:
    if args.name:
        sys.stdout.write(recipes.text(args.name))
        return
    for name, path in recipes.shipped().items():
        print(name)
        print(textwrap.fill(recipes.summary(path), width=100, initial_indent="    ", subsequent_indent="    "))
    print("\ntrain with one: shufflenetv2 train -c NAME --data_dir DIR")
    print("to edit one: shufflenetv2 recipes NAME > mine.yaml, then -c mine.yaml")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out))


READ_ONLY_COMMANDS = ("validate", "predict", "summary", "info", "recipes")  # they write no file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shufflenetv2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with a MindCV config (YAML via -c/--config, any key as --key VALUE)")
    config.add_config_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("validate", help="top-1/top-5/loss of a checkpoint on the validation split")
    config.add_config_arguments(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("predict", help="classify image files: the top classes and their probabilities")
    p.add_argument("weights", help="a weight file (.safetensors, MindCV .ckpt, .pth) or an exported .onnx file")
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    p.add_argument(
        "-c", "--config",
        help="the training config (a file or a shipped recipe's name) whose evaluation transform, batch_size and "
        "num_parallel_workers to use (default: the evaluation settings our weight files and exports record, "
        "else MindCV's: 224 px, crop 0.875; batches of 32)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=5, help="how many classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of a line of text")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="where the network runs (default: the config's, auto)"
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("summary", help="parameters, MACs and a layer table of a model")
    p.add_argument("model", choices=list(WIDTHS), help="the width")
    p.add_argument("--layout", choices=LAYOUTS, default="mindcv", help="whose network (default mindcv)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    p.add_argument("--in-channels", type=int, default=3, help="image channels (default 3)")
    p.add_argument("--input-size", type=int, default=224, help="square input side in pixels (default 224)")
    p.add_argument("--no-layers", dest="layers", action="store_false", help="totals only")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("info", help="what a weight file holds (format, layout, width, classes)")
    p.add_argument("file", help="weights: .safetensors, MindCV .ckpt, .pth or .pt")
    p.add_argument("--ema", action="store_true", help="look at the EMA copy of a training checkpoint")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert weights between .ckpt, .safetensors and .pth, and between layouts")
    p.add_argument("src", help="weights: .safetensors, MindCV .ckpt, .pth or .pt")
    p.add_argument("dst", help="output file; its extension picks the format unless --format is given")
    p.add_argument(
        "--format", choices=["ckpt", "safetensors", "pth"], help="the output format (default: dst's extension)"
    )
    p.add_argument("--layout", choices=LAYOUTS, help="target layout (default: the source's)")
    p.add_argument("--model", choices=list(WIDTHS), help="model name (default: inferred from the tensors)")
    p.add_argument("--ema", action="store_true", help="convert the EMA copy of a training checkpoint")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "recalibrate",
        help="recompute a weight file's BatchNorm statistics from training images (precise BN), for weights "
        "whose running averages lag them or that move to another image size",
    )
    p.add_argument("src", help="weights: .safetensors, MindCV .ckpt, .pth or .pt")
    p.add_argument("dst", help="output file; its extension picks the format")
    p.add_argument("--data_dir", "--data-dir", help="the dataset: its train_split folder gives the images")
    p.add_argument(
        "-c", "--config",
        help="the training config (a file or a shipped recipe's name) whose training split, transform, image_resize "
        "and batch_size to use (default: the evaluation settings the weights record, else MindCV's: 224 px)",
    )  # fmt: skip
    p.add_argument("--images", type=int, default=1024, help="how many training images (default 1024)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the config's)")
    p.add_argument("--ema", action="store_true", help="recalibrate the EMA copy of a training checkpoint")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default: the config's, auto)")
    p.set_defaults(func=_cmd_recalibrate)

    p = sub.add_parser(
        "export", help="a fused inference model as ONNX (.onnx), a torch.export program (.pt2), or --aot compiled"
    )
    p.add_argument("src", help="weights: .safetensors, MindCV .ckpt or .pth")
    p.add_argument("dst", help="output file, .onnx or .pt2")
    p.add_argument("--model", choices=list(WIDTHS), help="model name (default: inferred from the tensors)")
    p.add_argument(
        "--input-size", type=int,
        help="image side the export takes (default: the size the weights were trained at, as our files record "
        "it, else 224)",
    )  # fmt: skip
    p.add_argument(
        "--aot", action="store_true",
        help="write a .pt2 package compiled ahead of time (AOTInductor) for this kind of CPU and one input "
        "shape (--batch, --input-size); load it with shufflenetv2.load_package",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=1, help="with --aot: the one batch size the package takes (default 1)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer; default 17)")
    p.add_argument(
        "--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
        help="the runtime the .onnx file is shaped for: onnxruntime pads channels for its blocked layout, "
        "openvino runs the unpadded graph faster (default onnxruntime)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_export)

    from .bench import ALL_BACKENDS, BACKENDS
    from .bench_data import DATA_BACKENDS
    from .bench_train import TRAIN_BACKENDS

    p = sub.add_parser("bench", help="inference, training-step and data-pipeline speed, ours beside torchvision")
    p.add_argument(
        "--suites", nargs="+", default=["inference"], choices=["inference", "train", "data"],
        help="what to time: inference, the training step, the input pipeline on --data (default: inference)",
    )  # fmt: skip
    p.add_argument(
        "--models", nargs="+", default=["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"], choices=list(WIDTHS),
        metavar="MODEL", help=f"widths for the inference suite, any of {', '.join(WIDTHS)} (default: the first two)",
    )  # fmt: skip
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="inference batch sizes (default: 1 32)")
    p.add_argument(
        "--backends", "--backend", nargs="+", default=list(BACKENDS), metavar="BACKEND",
        help=f"any of {', '.join(ALL_BACKENDS)} (default: all but openvino and torchvision's int8 model); or a "
        "kind without its prefix (onnxruntime: both ONNX Runtime rows)",
    )  # fmt: skip
    p.add_argument("--onnx", metavar="FILE", help="also time this ONNX file (from `export`) in ONNX Runtime")
    p.add_argument(
        "--train-models", nargs="+", default=["shufflenet_v2_x0_5"], choices=list(WIDTHS), metavar="MODEL",
        help=f"widths for the train suite, any of {', '.join(WIDTHS)} (default: shufflenet_v2_x0_5)",
    )  # fmt: skip
    p.add_argument("--train-batches", nargs="+", type=int, default=[32], help="training batch sizes (default: 32)")
    p.add_argument(
        "--train-backends", nargs="+", default=list(TRAIN_BACKENDS), choices=list(TRAIN_BACKENDS), metavar="BACKEND",
        help=f"any of {', '.join(TRAIN_BACKENDS)} (default: all)",
    )  # fmt: skip
    p.add_argument("--data", help="for --suites data: a folder with train/ and val/ class folders of images")
    p.add_argument(
        "--data-backends", nargs="+", default=list(DATA_BACKENDS), choices=list(DATA_BACKENDS), metavar="BACKEND",
        help=f"any of {', '.join(DATA_BACKENDS)} (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads (default 2; the data suite uses one: per core)"
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed calls after the first (setup) call (default 5)")
    p.add_argument(
        "--repeats", type=int, default=7, help="timed rounds; the median and spread are reported (default 7)"
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=0,
        help="calls per round (default 0: rounds of about 1/3 s, 1 s in the train suite)",
    )
    p.add_argument("--input-size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the inference and train suites (default cpu)")
    p.add_argument(
        "--amp", default="none", choices=["none", "bfloat16", "float16"], help="autocast dtype (default none: float32)"
    )
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("recipes", help="the training recipes -c accepts by name; with a name, that recipe's YAML")
    p.add_argument("name", nargs="?", help="print this recipe's YAML (to copy and edit: > mine.yaml)")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("demo", help="a self-contained tour: build, save as MindCV .ckpt, convert, reload, compare")
    p.add_argument("--out", default="runs/demo", help="folder for the files it writes (default runs/demo)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _check_compiler_for(args: argparse.Namespace, backends: list[str]) -> None:
    """Rows that torch.compile builds for the CPU need a C++ compiler: say so before any row runs."""
    from .compiling import cxx_compiler_missing

    if args.device != "cpu":
        return
    compiling = [b for b in backends if b.endswith(("compiled", "frozen", "aot"))] if "inference" in args.suites else []
    if "train" in args.suites:
        compiling += [f"{b} (train)" for b in args.train_backends if b.endswith("compiled")]
    why = cxx_compiler_missing() if compiling else None
    if why:
        raise ShuffleNetV2Error(
            f"the rows {', '.join(compiling)} compile with torch.compile, which needs a C++ compiler on a CPU, and "
            f"inductor found none ({why}): install one (apt install g++), or leave those rows out (--backends, "
            "--train-backends)"
        )


def _user_message(exc: ShuffleNetV2Error) -> str:
    """The error's own words: a DataLoader worker re-raises ours with the worker's traceback prepended."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(f"{type(exc).__name__}: ", 1)[-1]
    return text


def hide_cuda_home_warning() -> None:
    """Drop torch's "No CUDA runtime is found, using CUDA_HOME=..." from a machine without a GPU.

    A CUDA build of torch logs it when inductor first imports ``torch.utils.cpp_extension`` (the first
    compiled validation of a CPU run), though nothing of ours uses CUDA there: on a CPU-only machine it
    reads as a fault.  Only that message of that logger is filtered, and only while CUDA is absent."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeFilter) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeFilter())


class _NoCudaRuntimeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("No CUDA runtime is found") and not torch.cuda.is_available())


def _unknown_options(unknown: list[str]) -> str:
    """One line per unknown ``--flag``, with the config key it was probably meant to be."""
    flags = [u for u in unknown if u.startswith("--")] or unknown
    return "; ".join(f"unknown option {u!r}{config.suggest_key(u.lstrip('-').split('=')[0])}" for u in flags)


def main(argv: Sequence[str] | None = None) -> int:
    hide_cuda_home_warning()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command not in ("train", "validate"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        print(f"error: {_unknown_options(unknown)}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        args.func(args)
    except TrainingInterrupted as exc:
        print(f"{exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ShuffleNetV2Error as exc:
        print(f"error: {_user_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C in training (the user chose not to wait), or one elsewhere
        saves = args.command not in READ_ONLY_COMMANDS  # the others write through temporary files, if at all
        print("\ninterrupted" + ("; nothing more was saved" if saves else ""), file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`): stop too, without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the flush at exit fails no more
        return 128 + signal.SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
