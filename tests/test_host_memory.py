"""host_memory: after keep_freed_memory(), a freed 40 MB tensor's pages are reused, not faulted in again.

Each case runs in its own interpreter, since malloc's settings are process-wide.  Minor page faults
(``ru_minflt``) count what the kernel did: a fresh 40 MB block is 10,240 4-KiB faults.  With the setting,
a probe still maps one fresh block now and then (0 or 10,240 faults over eight probes; probably torch's
64-byte alignment, which a freed block of exactly the same size cannot give until it merges with a
neighbour), so the test allows two fresh blocks in twelve, against twelve in twelve without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BLOCK_FAULTS = 10 * 2**20 * 4 // 4096  # one fresh 40 MB block, page by page

PROBE = """
import resource, sys, torch
from shufflenetv2.host_memory import keep_freed_memory
configured = keep_freed_memory()
for _ in range(2):  # 40 MB, allocated and freed: malloc's steady state comes after a few blocks
    torch.zeros(10 * 2**20).add_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    torch.zeros(10 * 2**20).add_(1)
print(configured, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env: dict[str, str]) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    configured, faults = out.stdout.split()
    return configured == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    configured, faults = _probe({})
    if not configured:
        pytest.skip("this C library has no glibc mallopt")
    assert faults < 2.5 * BLOCK_FAULTS  # twelve 40 MB allocations, nearly all from memory the process holds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_opting_out_leaves_malloc_alone_and_every_block_faults_in_again() -> None:
    configured, faults = _probe({"SHUFFLENETV2_KEEP_FREED_MEMORY": "0"})
    assert not configured
    assert faults > 10 * BLOCK_FAULTS  # the baseline the first test improves on: each block mapped afresh
