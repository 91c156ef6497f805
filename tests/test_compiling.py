"""torch.compile in the loop cannot cost a run: no C++ compiler, a Ctrl-C while g++ runs, and the broken
library such a Ctrl-C used to leave in torch's cache (``shufflenetv2/compiling.py``).

The compiles run in child processes with their own cache directory, as a user's runs would: a library
that torch has loaded once stays loaded in its process, so only a fresh process reads the cache."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from shufflenetv2 import create_model, save_weights
from shufflenetv2.compiling import CompiledOrEager, compilers_finish_on_signals, cxx_compiler_missing
from shufflenetv2.engine import validate

from .conftest import built_once
from .test_train import tiny_config, tiny_data  # noqa: F401 - tiny_data is a fixture

REPO = Path(__file__).resolve().parents[1]
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs g++")

# Compiles a small module in a fresh process and prints what happened as JSON. argv[1]: "ours" wraps it
# in CompiledOrEager, "plain" calls torch.compile's module directly. A SIGINT is recorded, not fatal,
# as the training loop's StopRequest does.
CHILD = """
import json, signal, sys, torch
from torch import nn
from shufflenetv2.compiling import CompiledOrEager

class Small(nn.Module):
    def forward(self, x):
        return (x * 2 + 1).relu().sum(dim=1)

signals = []
signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signal.Signals(signum).name))
warnings = []
module = Small()
net = CompiledOrEager(module, "the test", warnings.append) if sys.argv[1] == "ours" else torch.compile(module)
x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
try:
    outputs = [net(x), net(x)]
    error = None
except Exception as exc:
    outputs, error = [], f"{type(exc).__name__}: {exc}"[:2000]
print(json.dumps({
    "match": bool(outputs) and all(torch.allclose(out, module(x), rtol=1e-5, atol=1e-5) for out in outputs),
    "error": error, "warnings": warnings, "signals": signals,
    "failure": getattr(net, "failure", None),
}))
"""


def run_child(kind: str, cache: Path, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, kind], cwd=REPO, env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def child_result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def libraries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.so"))


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compile cache holding the small module's libraries, as a first run leaves it."""
    if shutil.which("g++") is None:
        pytest.skip("torch.compile on a CPU needs g++")

    def build(cache: Path) -> None:
        result = child_result(run_child("ours", cache))
        assert result["match"] and result["warnings"] == [] and result["failure"] is None
        assert libraries(cache), "the compile wrote no library"

    return built_once(tmp_path_factory, "filled_inductor_cache", build)  # once per session, tests copy it


@pytest.mark.slow
def test_a_library_that_cannot_be_loaded_is_removed_and_compiled_again(filled_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(filled_cache, cache)
    for library in libraries(cache):
        library.write_bytes(b"")  # what a compiler killed mid-link leaves: torch counts it as built
    plain = child_result(run_child("plain", cache))
    assert plain["error"] is not None and "file too short" in plain["error"]  # torch alone fails on it
    result = child_result(run_child("ours", cache))
    assert result["match"] and result["failure"] is None and result["error"] is None
    assert result["warnings"], "nothing was repaired"
    for warning in result["warnings"]:
        assert "file too short" in warning and "compiling again" in warning
        removed = Path(warning.split("removed ", 1)[1].split(" from torch's compile cache", 1)[0])
        assert removed.parent.parent == cache and removed.stat().st_size > 0  # rebuilt in its place
    again = child_result(run_child("plain", cache))
    assert again["match"] and again["error"] is None  # repaired for good, not just for that run


@pytest.mark.slow
def test_a_ctrl_c_while_g_plus_plus_runs_neither_kills_it_nor_fails_the_compile(
    filled_cache: Path, tmp_path: Path
) -> None:
    """The terminal sends Ctrl-C's SIGINT to the whole process group. A compiler that waits a second
    before it builds the module's library (a real g++ behind a Python script, which SIGINT stops as it
    stops g++) lets the test send it while that compile runs. Earlier compiles are torch's probes of the
    CPU's vector instructions, whose failures torch takes as "not supported" and hides. The filled cache
    has those, and the module's library is keyed by the compiler's command, so it is built anew."""
    shutil.copytree(filled_cache, tmp_path / "cache")
    marker = tmp_path / "compiling"
    slow_gxx = tmp_path / "slow-g++"
    slow_gxx.write_text(f"""#!{sys.executable}
import os, sys, time
if any(arg.endswith(".main.cpp") for arg in sys.argv):
    open({str(marker)!r}, "w").close()
    time.sleep(1)
os.execvp("g++", ["g++", *sys.argv[1:]])
""")
    slow_gxx.chmod(0o755)

    def interrupted_run(kind: str) -> dict:
        marker.unlink(missing_ok=True)
        process = run_child(kind, tmp_path / "cache", {"CXX": str(slow_gxx)}, start_new_session=True)
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the compiler never ran"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # the child, the script and whatever it runs, as Ctrl-C does
        return child_result(process)

    plain = interrupted_run("plain")
    assert plain["error"] is not None and "CppCompileError" in plain["error"]  # torch alone: the compiler dies
    result = interrupted_run("ours")  # in the same cache: only the module's library is still to build
    assert result["signals"] == ["SIGINT"]  # the process saw the request (the loop would stop after the step)
    assert result["match"] and result["error"] is None and result["failure"] is None and result["warnings"] == []
    assert all(library.stat().st_size > 0 for library in libraries(tmp_path / "cache"))


def test_processes_started_under_the_block_outlive_a_sigint_to_their_group(tmp_path: Path) -> None:
    """The mechanism alone, with plain processes: a child inherits the starting thread's signal mask."""
    script = """
import contextlib, signal, subprocess, sys
from shufflenetv2.compiling import compilers_finish_on_signals
signal.signal(signal.SIGINT, lambda *args: None)  # the parent records, as the training loop does
kind, done = sys.argv[1:]
child = f"import time; open({done!r} + '.started', 'w'); time.sleep(1); open({done!r}, 'w')"
with compilers_finish_on_signals() if kind == "blocked" else contextlib.nullcontext():
    print(subprocess.run([sys.executable, "-c", child]).returncode)
"""
    processes = {}
    for kind in ("blocked", "unblocked"):
        command = [sys.executable, "-c", script, kind, str(tmp_path / kind)]
        processes[kind] = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    for kind, process in processes.items():
        while not (tmp_path / f"{kind}.started").exists():
            assert process.poll() is None
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)  # to the parent and its child, as Ctrl-C does
    for kind, process in processes.items():
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        survives = kind == "blocked"  # unblocked, the child dies of KeyboardInterrupt
        assert (tmp_path / kind).exists() == survives and (int(out) == 0) == survives, kind


# A one-process gloo group, a DistributedDataParallel module compiled by CompiledOrEager ("ours") or by
# torch.compile itself ("plain"), one training step; prints whether the compiled call ran.
DDP_CHILD = """
import sys, torch, torch.distributed as dist
from torch import nn
from shufflenetv2.compiling import CompiledOrEager

dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
net = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(16, 8), nn.ReLU()))
compiled = CompiledOrEager(net, "training", print) if sys.argv[1] == "ours" else torch.compile(net)
compiled(torch.randn(4, 16)).sum().backward()
dist.destroy_process_group()
print("compiled" if getattr(compiled, "failure", None) is None else "eager")
"""


@needs_gxx
def test_a_compiled_ddp_step_logs_no_profiler_label_note(tmp_path: Path) -> None:
    """torch.compile of DDP logs "Profiler record function ... will be ignored" (DDP's forward opens a
    profiler label) once per process: a warning in every compiled torchrun run.  CompiledOrEager drops it;
    torch.compile alone still prints it, so the test would notice if torch stopped (or changed the text)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    runs = {}
    for kind in ("plain", "ours"):
        command = [sys.executable, "-c", DDP_CHILD, kind, str(tmp_path / f"store-{kind}")]
        runs[kind] = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert all(run.returncode == 0 for run in runs.values()), {k: r.stderr[-2000:] for k, r in runs.items()}
    assert "Profiler record function" in runs["plain"].stderr
    assert runs["ours"].stdout.split() == ["compiled"], runs["ours"].stdout
    assert "Profiler" not in runs["ours"].stderr, runs["ours"].stderr


def test_an_error_of_the_module_itself_is_raised_not_hidden() -> None:
    class Rejects(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] != 3:
                raise ValueError(f"expected 3 channels, got {x.shape[1]}")
            return x.relu()

    warnings: list[str] = []
    net = CompiledOrEager(Rejects(), "the test", warnings.append)
    with pytest.raises(ValueError, match="expected 3 channels, got 4"):
        net(torch.zeros(1, 4, 2, 2))
    assert net.failure is None and warnings == []


def test_the_block_is_lifted_afterwards() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with compilers_finish_on_signals():
        inside = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    assert {signal.SIGINT, signal.SIGTERM} <= inside
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


@pytest.mark.slow
def test_validate_without_a_cxx_compiler_warns_once_and_gives_eager_metrics(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """mode 0 (every MindCV recipe) compiling on a CPU as on a GPU (compile_on_cpu), on a machine without g++:
    one warning, then the metrics of mode 1."""
    weights = tmp_path / "weights.safetensors"
    save_weights(weights, create_model("shufflenet_v2_x0_5", num_classes=3))
    cfg = tiny_config(tiny_data, tmp_path / "run", ckpt_path=str(weights))
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(values))
    command = [
        sys.executable,
        str(REPO / "validate.py"),
        "-c",
        str(config_file),
        "--mode",
        "0",
        "--compile_on_cpu",
        "True",
    ]
    no_compiler = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c")}
    compiled = subprocess.run(command, env=no_compiler, capture_output=True, text=True, cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert compiled.stderr.count("warning: torch.compile failed for validation (InvalidCxxCompiler") == 1  # 3 batches
    assert "install g++" in compiled.stderr and "Traceback" not in compiled.stderr
    reported = json.loads(compiled.stdout.splitlines()[-1])
    eager = validate(dataclasses.replace(cfg, mode=1))
    assert reported["images"] == eager.count == 18
    assert reported["Top_1_Accuracy"] == eager.top1 and reported["loss"] == pytest.approx(eager.loss, rel=1e-6)


def test_bench_refuses_compiled_rows_without_a_cxx_compiler_before_any_row_runs(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "shufflenetv2", "bench", "--suites", "inference", "train", "--models",
               "shufflenet_v2_x0_5", "--batches", "1", "--json", str(tmp_path / "out.json")]  # fmt: skip
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip()
    assert message.startswith("error: the rows ours-fused-compiled, ours-fused-frozen, ours-aot, torchvision-compiled")
    assert "ours-compiled (train)" in message and "InvalidCxxCompiler" in message and "apt install g++" in message
    assert result.stdout == "" and not (tmp_path / "out.json").exists()  # refused before any row ran


@needs_gxx
def test_a_space_in_the_cache_path_is_named_as_the_cause(tmp_path: Path) -> None:
    """Inductor splits g++'s command line at spaces: with the cache in "my cache" every CPU compile fails,
    and "install g++" (the general advice) would send the user the wrong way."""
    result = child_result(run_child("ours", tmp_path / "my cache"))
    assert result["match"] and result["failure"].startswith("CppCompileError"), result
    (warning,) = result["warnings"]
    assert f"'{tmp_path / 'my cache'}', has a space" in warning and "set TORCHINDUCTOR_CACHE_DIR" in warning
    assert "install g++" not in warning


@needs_gxx
def test_a_working_cxx_compiler_is_found() -> None:
    assert cxx_compiler_missing() is None


@pytest.mark.slow
def test_train_without_a_cxx_compiler_finishes_and_saves(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """mode 0 compiling on a CPU (compile_on_cpu, as on a GPU) without g++: the training step falls back to eager
    at once, and the validation after epoch 1, which crashed the run unsaved before, does the same."""
    cfg = tiny_config(tiny_data, tmp_path / "run", epoch_size=1, warmup_epochs=0)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(values))
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c")}
    command = [sys.executable, str(REPO / "train.py"), "-c", str(config_file), "--mode", "0", "--device", "cpu",
               "--compile_on_cpu", "True"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    log = (tmp_path / "run" / "train_rank0.log").read_text()
    assert "no C++ compiler found, so what it compiles will run eager: install g++)" in log.splitlines()[0]
    assert log.count("warning: torch.compile failed for training (InvalidCxxCompiler") == 1
    assert log.count("warning: torch.compile failed for validation (InvalidCxxCompiler") == 1
    assert "first validation took" in log and "a failed compile included (it ran eager; see the warning)" in log
    assert "Epoch 1/1 validation: top-1" in log and (tmp_path / "run" / "shufflenet_v2_x0_5-1_6.safetensors").exists()
