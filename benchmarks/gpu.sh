#!/usr/bin/env bash
# Every GPU measurement of issue 4 in one run, torchvision's baseline beside ours, within about 8 minutes:
#   bash benchmarks/gpu.sh [OUT_DIR]        (default benchmarks/results/gpu-<date>)
# 1. inference: ours (eager, fused, fused+compiled, frozen) vs torchvision (eager, compiled, frozen), bf16 autocast,
#    batch 1 and 256
# 2. training step on synthetic data, batch 256, bf16: ours channels_last (eager, compiled) vs torchvision
#    (eager, compiled), with the loss-trajectory check of equal work
# 3. end to end from JPEG files: train.py on ImageNet-sized JPEGs (hymenoptera from ../shared, repeated
#    to 20,000 files) with the workers decoding, then with decode_on_device (nvJPEG); the loop's img/s
# 4. the data pipeline per CPU core of this machine
# Each section has its own time limit, so a slow one cannot take the others' time; SMOKE=1 DEVICE=cpu runs
# the whole script at toy sizes on a CPU (how it is tested without a GPU: tests/test_gpu_script.py), with
# torch.compile switched off (TORCH_COMPILE_DISABLE): the compiled rows' code is tested by tests/test_deploy.py,
# tests/test_train.py and (training under bf16 autocast, on two blocks) tests/test_model.py, and compiling the
# same network five more times on 2 cores took 4 of 6.5 minutes.
# RUNS (default runs/) is where section 3 puts its JPEG links and training runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d)}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
mkdir -p "$OUT" "$RUNS"
[ -x "$PY" ] || make .venv/.installed >/dev/null
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu.log"; }

if [ "$SMOKE" = 1 ]; then
  SIZE=32; BATCH=8; BIG=16; REPEATS=2; ITER=(--iterations 1); FILES=2; LIMIT=600; WORKERS=1; EPOCHS=1; MODE=1
  export TORCH_COMPILE_DISABLE=1
else
  SIZE=224; BATCH=256; BIG=256; REPEATS=5; ITER=(); FILES=80; LIMIT=150; WORKERS=$(( $(nproc) - 2 )); EPOCHS=2; MODE=0
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  echo "cpus $(nproc)"; } | tee "$OUT/machine.txt"

log "1. inference (bf16 autocast)"
timeout "$LIMIT" "$PY" -m shufflenetv2 bench --suites inference --device "$DEVICE" --amp bfloat16 \
  --models shufflenet_v2_x0_5 shufflenet_v2_x1_0 --batches 1 "$BIG" --input-size "$SIZE" --repeats "$REPEATS" "${ITER[@]}" \
  --backends ours-eager ours-fused torchvision-eager --json "$OUT/inference.json" 2>&1 | tee -a "$OUT/gpu.log"
timeout "$LIMIT" "$PY" -m shufflenetv2 bench --suites inference --device "$DEVICE" --amp bfloat16 \
  --models shufflenet_v2_x0_5 --batches "$BIG" --input-size "$SIZE" --repeats "$REPEATS" "${ITER[@]}" \
  --backends ours-fused-compiled torchvision-compiled --json "$OUT/inference_compiled.json" 2>&1 | tee -a "$OUT/gpu.log"
# inductor's freezing for both models (weights as graph constants, cast to bf16 once); a run of its own, so
# that a slow or failing compile here cannot cost the rows above
timeout "$LIMIT" "$PY" -m shufflenetv2 bench --suites inference --device "$DEVICE" --amp bfloat16 \
  --models shufflenet_v2_x0_5 --batches "$BIG" --input-size "$SIZE" --repeats "$REPEATS" "${ITER[@]}" \
  --backends ours-fused-frozen torchvision-frozen --json "$OUT/inference_frozen.json" 2>&1 | tee -a "$OUT/gpu.log"

log "2. training step, synthetic, batch $BATCH (bf16 autocast)"
timeout $(( 2 * LIMIT )) "$PY" -m shufflenetv2 bench --suites train --device "$DEVICE" --amp bfloat16 \
  --train-batches "$BATCH" --input-size "$SIZE" --repeats "$REPEATS" "${ITER[@]}" \
  --json "$OUT/train.json" 2>&1 | tee -a "$OUT/gpu.log"

log "3. end to end from JPEG files"
DATA=$RUNS/gpu_jpegs
if [ ! -f "$DATA/.complete" ]; then
  "$PY" - "$DATA" "$FILES" <<'EOF'
import os, sys, tarfile
from pathlib import Path
root, copies = Path(sys.argv[1]), int(sys.argv[2])
src = root / "source"
shared = Path("../shared/data/hymenoptera.tar.gz")
if not shared.exists():
    sys.exit(f"{shared} is missing: section 3 needs the team's hymenoptera JPEGs")
with tarfile.open(shared) as tar:
    tar.extractall(src, filter="data")
train = next(p for p in src.rglob("train") if p.is_dir())
for cls in sorted(p for p in train.iterdir() if p.is_dir()):
    for split in ("train", "val"):
        (root / split / cls.name).mkdir(parents=True, exist_ok=True)
    files = sorted(f for f in cls.iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))
    for k in range(copies):  # links: the page cache holds one copy, as a warm ImageNet epoch would
        for f in files:
            os.symlink(f.resolve(), root / "train" / cls.name / f"{k}_{f.name}")
    for f in files[:8]:
        os.symlink(f.resolve(), root / "val" / cls.name / f.name)
(root / ".complete").write_text("ok")
EOF
fi
for ON_DEVICE in False True; do
  RUN=$RUNS/gpu_e2e_$ON_DEVICE
  rm -rf "$RUN"
  timeout "$LIMIT" "$PY" train.py --config configs/shufflenetv2/shufflenet_v2_0.5_ascend.yaml --data_dir "$DATA" \
    --num_classes 2 --device "$DEVICE" --distribute False --batch_size "$BATCH" --image_resize "$SIZE" \
    --epoch_size "$EPOCHS" --warmup_epochs 0 --decay_epochs "$EPOCHS" --val_while_train False --log_interval 10 \
    --num_parallel_workers "$WORKERS" --decode_on_device "$ON_DEVICE" --ckpt_save_dir "$RUN" --amp_level O2 --mode "$MODE" \
    2>&1 | tail -n 25 | tee -a "$OUT/gpu.log"
  grep "img/s" "$RUN/train_rank0.log" > "$OUT/e2e_decode_on_device_$ON_DEVICE.log" 2>/dev/null || true
done

log "4. data pipeline per CPU core"
timeout "$LIMIT" "$PY" -m shufflenetv2 bench --suites data --data "$DATA" --repeats "$REPEATS" \
  --json "$OUT/data.json" 2>&1 | tee -a "$OUT/gpu.log"
log "done: $OUT"
