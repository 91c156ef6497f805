#!/usr/bin/env bash
# Every CPU measurement of the performance table in one run (2 threads, float32 unless a step says otherwise):
#   bash benchmarks/cpu.sh [OUT_DIR]        (default benchmarks/results/cpu)
# 1. inference and training step, ours against torchvision (eager, compiled, frozen, compiled ahead of time, ONNX Runtime, OpenVINO), interleaved
# 2. the input pipelines per core on ImageNet-sized JPEGs (../shared/data/hymenoptera.tar.gz)
# 2b. the training step under bfloat16 autocast
# 3. the training loop itself on those JPEGs (train.py, mode 1, one loader worker): its own img/s,
#    data loading included, next to the bench's step figure
# MindCV's own figures come from benchmarks/mindcv_cpu.sh (MindSpore in its own virtual environment).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || make .venv/.installed >/dev/null
mkdir -p "$OUT" runs
DATA=runs/hymenoptera
if [ ! -d "$DATA/train" ]; then
  mkdir -p "$DATA"
  tar xzf ../shared/data/hymenoptera.tar.gz -C "$DATA" ||
    { echo "error: ../shared/data/hymenoptera.tar.gz is needed for the data rows" >&2; exit 2; }
  [ -d "$DATA/train" ] || { echo "error: $DATA/train missing after extracting the archive" >&2; exit 2; }
fi
# every inference backend, OpenVINO's included (bench leaves it out unless named)
"$PY" -m shufflenetv2 bench --suites inference train data --data "$DATA" --threads 2 --repeats 11 \
  --backends ours-eager ours-fused ours-fused-compiled ours-fused-frozen ours-aot ours-onnxruntime ours-openvino \
  torchvision-eager torchvision-compiled torchvision-frozen torchvision-aot torchvision-onnxruntime torchvision-openvino \
  --models shufflenet_v2_x0_5 shufflenet_v2_x1_0 --batches 1 32 --json "$OUT/bench.json" 2>&1 |
  grep --line-buffered -v "Warning\|warn(" | tee "$OUT/bench.log"

# the training step under bfloat16 autocast (what amp_level O1-O3 give on a CPU), against the float32 rows above
"$PY" -m shufflenetv2 bench --suites train --train-backends ours-channels-last ours-mindcv-channels-last \
  torchvision-eager --amp bfloat16 --threads 2 --repeats 11 --json "$OUT/bench_bf16.json" 2>&1 |
  grep --line-buffered " train " | tee "$OUT/bench_bf16.log"

RUN=runs/cpu_loop
rm -rf "$RUN"
# no loader workers: data loading then runs in the loop's own process, one batch after another, so the
# loop's img/s must match 1 / (1 / step rate + 1 / data rate) from the bench rows above
"$PY" train.py --config configs/shufflenetv2/shufflenet_v2_0.5_ascend.yaml --data_dir "$DATA" --num_classes 2 \
  --distribute False --device cpu --mode 1 --amp_level O0 --batch_size 32 --epoch_size 3 --warmup_epochs 0 \
  --decay_epochs 3 --val_while_train False --log_interval 7 --num_parallel_workers 0 --ckpt_save_dir "$RUN" \
  > "$OUT/loop.log" 2>&1
grep "img/s" "$RUN/train_rank0.log" | tee -a "$OUT/loop.log"
# the same step again right away: the machine's speed drifts within minutes, so this is the like-for-like figure
"$PY" -m shufflenetv2 bench --suites train --train-backends ours-mindcv-channels-last --threads 2 --repeats 5 \
  --json "$OUT/loop_bench.json" 2>&1 | grep --line-buffered " train " | tee -a "$OUT/loop.log"
"$PY" benchmarks/loop_check.py "$OUT/bench.json" "$RUN/train_rank0.log" "$OUT/loop_bench.json" | tee -a "$OUT/loop.log"
echo "wrote $OUT/bench.json, $OUT/bench.log, $OUT/bench_bf16.json, $OUT/bench_bf16.log, $OUT/loop.log, $OUT/loop_bench.json"
