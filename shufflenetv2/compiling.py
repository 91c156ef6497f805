"""torch.compile for the training loop and validate.py, made so that compiling can never cost a run.

MindCV's recipes say ``mode: 0``, so on a GPU (and on a CPU with ``compile_on_cpu``) ``train.py`` compiles
training and evaluation by default, and the first compiled evaluation comes after a whole epoch of
training.  Three failures met there (on a CPU, when mode 0 still compiled evaluation by default):

- **No C++ compiler** (a slim container): inductor raises ``InvalidCxxCompiler`` at that first call.
- **Ctrl-C while it compiles** (it takes about a minute on a CPU, right after epoch 1): the terminal's
  SIGINT reaches every process of its group, so the ``g++`` and ``ld`` that torch runs die with it,
  the compile fails, and the run crashed without saving the epoch.
- **What that Ctrl-C leaves behind:** ld had already created the library, so torch's cache holds a
  truncated ``.so``.  Torch treats a file that exists as built, so every later run failed at its first
  compiled call (``ImportError: ... .so: file too short``) until the user found and emptied the cache.

So compiled calls run with SIGINT and SIGTERM blocked in the calling thread: the compilers torch starts
inherit that mask, finish their files and exit; the signal itself is still taken by this process's other
threads, so the training loop records the stop request within a fraction of a second and honours it
after the step, as always.  A library in torch's cache that fails to load is removed and the call
compiled again.  Any other compile failure is reported once and the module runs eager from then on: the
same results, slower.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

COMPILE_FAILURE = torch._dynamo.exc.BackendCompilerFailed  # inductor's InductorError is one too
_LIBRARY = re.compile(r"(/[^\s:'\"]+\.so)\b")
_MAX_REPAIRS = 16  # each repair removes one more broken library; a run leaves one or two


class _DropProfilerLabelNote(logging.Filter):
    """DistributedDataParallel's forward opens a profiler ``record_function`` label, which dynamo does not
    trace, and dynamo logs "Profiler record function <class ...> will be ignored" about it: a warning in
    every compiled DDP run, printed by each of torchrun's processes.  It says only that profiler traces of
    the compiled step lack DDP's label; nothing about the run is wrong, so it is dropped (only for DDP)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Profiler ") and message.endswith(" will be ignored"))


_DDP_LABEL_NOTE = _DropProfilerLabelNote()


class CompiledOrEager(nn.Module):
    """``torch.compile(module)``, or ``module`` itself once compiling has failed.

    The module is registered as ``_orig_mod``, the name torch.compile's own wrapper gives it, so code
    that sees through one (``unwrap_model``, state-dict prefixes) sees through both.  ``what`` names the
    calls in the warning ("validation", "training").
    """

    def __init__(self, module: nn.Module, what: str, warn: Callable[[str], None]) -> None:
        super().__init__()
        if isinstance(module, nn.parallel.DistributedDataParallel):
            for where in ("ctx_manager", "torch"):  # the record_function context; a profiler call
                logging.getLogger(f"torch._dynamo.variables.{where}").addFilter(_DDP_LABEL_NOTE)
        self._orig_mod = module
        self.__dict__["_compiled"] = torch.compile(module)  # not registered: the same module a second time
        self.what = what
        self.warn = warn
        self.failure: str | None = None  # why it runs eager, once compiling has failed

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        repairs = 0
        while self.failure is None:
            try:
                with compilers_finish_on_signals():
                    return self._compiled(*args, **kwargs)
            except COMPILE_FAILURE as exc:
                removed = remove_broken_libraries(exc)
                if removed and repairs < _MAX_REPAIRS:
                    repairs += 1
                    why = _first_line(_load_error(exc)).replace(f"{removed[0]}: ", "")
                    self.warn(
                        f"torch.compile: removed {removed[0]} from torch's compile cache: it cannot be loaded "
                        f"({why}), as an interrupted compile leaves it; compiling again"
                    )
                    continue
                self.failure = _first_line(_reason(exc))
                self.warn(
                    f"torch.compile failed for {self.what} ({self.failure}); {self.what} runs eager "
                    f"from here on, with the same results, slower. To compile, fix the cause ({compile_advice()}); "
                    "mode 1 does not try."
                )
        return self._orig_mod(*args, **kwargs)


@contextlib.contextmanager
def compilers_finish_on_signals() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread, so the processes it starts (torch's g++ and ld) inherit the
    block and run to completion.  This process's other threads still take the signals, and the main
    thread runs the Python handler when it next takes the GIL: a SIGINT in the middle of compiling the
    first validation printed the loop's stop message 0.2-0.3 s later."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, and no process groups to fear
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def compile_advice() -> str:
    """What to fix after a failed compile.  Inductor hands g++ one command line that is split at spaces
    (torch 2.14), so a space in any path on it (its cache, torch's headers, Python's) fails every CPU
    compile with "g++: fatal error: input file '/tmp/my' is the same as output file"."""
    import sysconfig

    compiler_advice = "on a CPU torch.compile needs a C++ compiler: install g++, or point CXX at one"
    if cxx_compiler_missing() is not None:
        return compiler_advice
    places = (
        (_cache_dir(), "torch's compile cache", "set TORCHINDUCTOR_CACHE_DIR to a folder whose path has none"),
        (Path(torch.__file__).parent, "torch's installation", "install it (its environment) where the path has none"),
        (Path(sysconfig.get_paths()["include"]), "Python's headers", "use a Python installed where the path has none"),
    )  # fmt: skip
    for path, what, remedy in places:
        if path is not None and any(c.isspace() for c in str(path)):
            return f"the path of {what}, {str(path)!r}, has a space, which inductor's g++ command cannot take: {remedy}"
    return compiler_advice


def cxx_compiler_missing() -> str | None:
    """Why inductor would find no C++ compiler here (torch.compile needs one for CPU code), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: let the compile itself tell
        return None
    try:
        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, by whatever module path this torch gives it
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def remove_broken_libraries(exc: BaseException) -> list[Path]:
    """Delete the libraries in torch's compile cache that ``exc`` failed to load; return their paths.

    Only files inside the cache directory, named by the load error itself, are touched: torch rebuilds
    a missing one at the next call, where a present one counts as built however short it is."""
    cache = _cache_dir()
    error = _load_error(exc)
    if cache is None or error is None:
        return []
    removed = []
    for name in _LIBRARY.findall(str(error)):
        path = Path(name)
        if path.is_file() and path.resolve().is_relative_to(cache):
            path.unlink()
            removed.append(path)
    return removed


def _load_error(exc: BaseException) -> BaseException | None:
    """The ImportError or OSError of loading a compiled library, among ``exc``'s causes."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (ImportError, OSError)) and _LIBRARY.search(str(current)):
            return current
        stack += [getattr(current, "inner_exception", None), current.__cause__, current.__context__]
    return None


def _cache_dir() -> Path | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # torch before 2.6 kept it elsewhere; without it nothing is removed
        return None
    return Path(cache_dir()).resolve()


def _reason(exc: BaseException) -> str:
    """What went wrong inside the backend: the wrapper's own first line is only "backend='inductor' raised:"."""
    inner = getattr(exc, "inner_exception", None)
    return f"{type(inner).__name__}: {inner}" if isinstance(inner, BaseException) else str(exc)


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else "no message"
    return line if len(line) <= 300 else line[:297] + "..."
