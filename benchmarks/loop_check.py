"""Does the training loop's own img/s agree with the bench?  Usage: loop_check.py BENCH.json train_rank0.log

With no loader workers the loop loads each batch, then trains on it, so its rate should be
1 / (1 / step rate + 1 / data rate) of the bench's ``ours-mindcv-channels-last`` train row (the network
train.py trains) and its ``ours-fast`` data row.
"""

import json
import re
import sys
from pathlib import Path

bench = json.loads(Path(sys.argv[1]).read_text())
step = next(r for r in bench["train_rows"] if r["backend"] == "ours-mindcv-channels-last")
data = next(r for r in bench["data_rows"] if r["split"] == "train" and r["backend"] == "ours-fast")
expected = 1 / (1 / step["images_per_second"] + 1 / data["images_per_second"])
rates = [float(rate) for rate in re.findall(r"([0-9.]+) img/s", Path(sys.argv[2]).read_text())]
print(
    f"loop, last epoch: {rates[-1]:.1f} img/s; bench: step {step['images_per_second']:.1f} img/s, data "
    f"{data['images_per_second']:.1f} img/s per core, one after the other {expected:.1f} img/s "
    f"(loop / bench {rates[-1] / expected:.2f})"
)
