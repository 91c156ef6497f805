#!/usr/bin/env bash
# CPU training with torchrun: 2 processes x batch 16 (one thread each, torchrun's default) against one process
# x batch 32 with 2 threads, the same global batch, on the 224-px hymenoptera JPEGs, no loader workers:
#   bash benchmarks/cpu_ddp.sh [OUT_DIR]        (default benchmarks/results/cpu_ddp)
# Prints each run's logged img/s (global, data loading included) per epoch; the logs stay in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu_ddp}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || make .venv/.installed >/dev/null
DATA=runs/hymenoptera
if [ ! -d "$DATA/train" ]; then
  mkdir -p "$DATA"
  tar xzf ../shared/data/hymenoptera.tar.gz -C "$DATA" ||
    { echo "error: ../shared/data/hymenoptera.tar.gz is needed" >&2; exit 2; }
fi
mkdir -p "$OUT"
RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT
ARGS=(--config configs/shufflenetv2/shufflenet_v2_0.5_ascend.yaml --data_dir "$DATA" --num_classes 2 --amp_level O0
  --mode 1 --epoch_size 6 --num_parallel_workers 0 --val_while_train False --warmup_epochs 0 --lr 0.01)
"$PY" train.py "${ARGS[@]}" --batch_size 32 --ckpt_save_dir "$RUNS/one" >/dev/null 2>&1
"$(dirname "$PY")/torchrun" --nproc_per_node 2 --master_port 29611 train.py "${ARGS[@]}" --batch_size 16 \
  --ckpt_save_dir "$RUNS/two" >/dev/null 2>&1
cp "$RUNS/one/train_rank0.log" "$OUT/one_process.log"
cp "$RUNS/two/train_rank0.log" "$OUT/two_processes.log"
for run in one_process two_processes; do
  echo "== $run: $(head -1 "$OUT/$run.log" | grep -o 'batches/epoch of [^;]*; device [^;]*')"
  grep -o 'Epoch: \[[0-9/]*\].*img/s' "$OUT/$run.log" | sed 's/, loss.*lr: [0-9.]*,//'
done | tee "$OUT/summary.txt"
