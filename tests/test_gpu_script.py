"""benchmarks/gpu.sh, run whole at toy sizes on the CPU: a GPU machine is lent for minutes at a time, so the
script must work the first time it meets one.  What only a GPU can show (nvJPEG, CUDA timings) is not tested,
and the smoke run switches torch.compile off (its compiled rows run eager): compiling is tested in
test_deploy.py, test_train.py and, for training under bf16 autocast, test_model.py (on two blocks), and five
more compiles here took 4 of the test's 6.5 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shufflenetv2.bench_train import TRAIN_BACKENDS

from .conftest import REPO, shared_file


@pytest.mark.slow
def test_gpu_script_writes_every_section_at_toy_sizes_on_the_cpu(tmp_path: Path) -> None:
    shared_file("data/hymenoptera.tar.gz")  # section 3 trains on these JPEGs
    out = tmp_path / "results"
    env = {**os.environ, "SMOKE": "1", "DEVICE": "cpu", "PY": sys.executable, "RUNS": str(tmp_path / "runs")}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    log = (out / "gpu.log").read_text()
    assert log.rstrip().endswith(f"done: {out}"), done.stdout[-3000:] + done.stderr[-3000:]

    inference = json.loads((out / "inference.json").read_text())
    assert inference["settings"]["dtype"] == "autocast bfloat16"
    rows = {(r["model"], r["batch"], r["backend"]) for r in inference["rows"]}
    assert rows == {
        (m, b, k)
        for m in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0")
        for b in (1, 16)
        for k in ("ours-eager", "ours-fused", "torchvision-eager")
    }
    for name, backends in (("compiled", ["ours-fused-compiled", "torchvision-compiled"]),
                           ("frozen", ["ours-fused-frozen", "torchvision-frozen"])):  # fmt: skip
        result = json.loads((out / f"inference_{name}.json").read_text())
        assert [r["backend"] for r in result["rows"]] == backends
        assert all(r["images_per_second"] > 0 for r in result["rows"])

    train = json.loads((out / "train.json").read_text())["train_rows"]
    assert [r["backend"] for r in train] == list(TRAIN_BACKENDS)
    for on_device in ("False", "True"):  # worker decoding, then the batch's JPEGs decoded where the model runs
        steps = (out / f"e2e_decode_on_device_{on_device}.log").read_text().splitlines()
        assert steps and all("img/s" in line for line in steps)
    assert log.count("training finished: 1 epoch in") == 2
    assert "JPEGs decoded on the device" in log

    data = json.loads((out / "data.json").read_text())
    assert {r["split"] for r in data["data_rows"]} == {"train", "eval"}
    assert "torch" in (out / "machine.txt").read_text()
