from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from shufflenetv2.engine import usable_cores

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHUFFLENETV2_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "mindcv"


def _share_the_cores() -> None:
    """Under pytest-xdist every worker is a torch process that would start one OpenMP thread per core.
    On the 2-core VM, 2 workers with 2 threads each took 24 minutes (44 of CPU time), against 18 (32 of CPU)
    with one each.  So each worker, and the processes its tests start (through OMP_NUM_THREADS, unless it
    is set), gets its share of the cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // workers)))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_the_cores()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow first (a stable sort).  `make test` hands each pytest-xdist worker one test at a
    time in this order (``--maxschedchunk 1``), so the 1-3 minute tests start early and the many short
    ones fill the gaps, rather than one worker running a long test at the end while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build`` fills once per test session, which the tests must only read.

    pytest-xdist builds a module fixture once in every worker that runs one of its tests, and its
    grouping, which would keep such tests on one worker, is ignored under pytest 9.2 (pytest-xdist
    #1386): in a fresh-clone run the AOT package of test_package.py was compiled three times (60 + 32 +
    31 s) and the torchrun reference of test_distributed_fault.py twice (46 + 45 s).  Here the first
    worker that needs the folder builds it under a file lock in the session's temporary folder, above
    each worker's own, and the others wait for it.  A build that fails leaves no folder behind, so the
    next test to need it tries again and fails with its own message."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/, above each worker's popen-gwK/
    folder = base / name
    with FileLock(f"{folder}.lock"):
        if not (base / f"{name}.built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            (base / f"{name}.built").touch()
    return folder


def shared_file(relative: str) -> Path:
    """A file under ../shared, or a skip saying why (users cloning the repo do not have it)."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not present: ../shared (team data) is only beside CI and developer checkouts")
    return path


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine terms, so a wrong channel order cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def calibrated(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with non-trivial BN statistics and logits of order 10 that depend on the image, so
    errors cannot hide.

    With made-up running statistics alone (``randomize_bn``) the signal of the image dies out within a few
    blocks and the logits are nearly the same for every input (1e-6 apart): a parity test at 1e-5 would then
    not see an error in the stem or the early blocks.  So the statistics are measured on a random batch,
    shifted a little (not exactly the batch's), and the head is scaled so that the logits reach about 10.
    Works on any network with BatchNorm2d layers and a final ``nn.Linear`` (ours in either layout,
    torchvision's)."""
    torch.manual_seed(seed)
    randomize_bn(model, seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the calibration batch
    batch = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.train()(batch)
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
            bn.running_mean.add_(torch.randn_like(bn.running_mean) * 0.1)
        head.weight.normal_(0, 0.5)
        head.weight.mul_(10 / model.eval()(batch).abs().max())
    return model.eval()


def assert_depends_on_the_image(model: torch.nn.Module, size: int = 64) -> None:
    """The guard for ``calibrated``: two noise images' logits differ by more than 3 % of their size, four
    orders of magnitude above the parity tolerance (``assert_same_logits``).  At 224 px global pooling
    averages the noise over 49 positions, so the part that depends on the image is smaller there (5-10 %)
    than at 64 px (15-80 %); made-up statistics alone give 1e-7."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y = model.eval()(x)
    assert (y[0] - y[1]).abs().max() > 0.03 * y.abs().max() > 0.03


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-6) -> None:
    """Equal up to float32 rounding: ``rtol`` of the largest logit (at least 1), a few ulps of sums that
    are reordered by a conversion."""
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= rtol * scale, (got - expected).abs().max().item()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    """Each test compiles as a fresh process would.  dynamo keeps what it learned per code object (our
    forward methods) across tests: after one test had compiled a model at two batch sizes, the next test's
    compile of that model took 4x as long (bf16 frozen: 45 s alone, 191 s after the float32 frozen test),
    and what it built was not what a user's fresh process would build."""
    torch._dynamo.reset()
