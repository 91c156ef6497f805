#!/usr/bin/env bash
# The routed ONNX graph (fuse_for_onnx since this directory's commit) against the graph it replaced (the
# logical halves, commit 5352956), both in ONNX Runtime, in one bench run per width: `ours-onnxruntime` is
# the routed export, `onnx-file` the halves export, timed in turn with torchvision's export.
#   bash benchmarks/results/cpu_routed/run.sh     (from the repository root; about 4 minutes)
set -euo pipefail
out=benchmarks/results/cpu_routed
rm -rf /tmp/halves && git worktree prune && git worktree add --detach /tmp/halves 5352956 >/dev/null
python - <<'PY'
import importlib.util, sys
# that commit's package under another name (the installed one is this tree's, whatever the path says)
spec = importlib.util.spec_from_file_location(
    "halves", "/tmp/halves/shufflenetv2/__init__.py", submodule_search_locations=["/tmp/halves/shufflenetv2"]
)
halves = sys.modules["halves"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(halves)
for name in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0"):
    halves.export_onnx(halves.fuse_for_onnx(halves.build_network(name).eval()), f"/tmp/{name}_halves.onnx")
PY
git worktree remove --force /tmp/halves
for m in shufflenet_v2_x0_5 shufflenet_v2_x1_0; do
  python -m shufflenetv2 bench --suites inference --threads 2 --repeats 15 \
    --backends ours-onnxruntime torchvision-onnxruntime --onnx /tmp/${m}_halves.onnx \
    --models $m --batches 1 32 --json $out/$m.json
done
python - <<'PY'
import json, statistics
for name in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0"):
    rows = json.load(open(f"benchmarks/results/cpu_routed/{name}.json"))["rows"]
    for batch in (1, 32):
        rates = {r["backend"]: r["rounds"] for r in rows if r["batch"] == batch}
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(rates[a], rates[b]))
        print(f"{name} b{batch}: routed / halves {ratio('ours-onnxruntime', 'onnx-file'):.3f}, "
              f"routed / torchvision {ratio('ours-onnxruntime', 'torchvision-onnxruntime'):.3f}, "
              f"halves / torchvision {ratio('onnx-file', 'torchvision-onnxruntime'):.3f}")
PY
