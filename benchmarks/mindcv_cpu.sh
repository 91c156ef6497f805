#!/usr/bin/env bash
# MindCV's ShuffleNetV2 on CPU in its own venv, torchvision's as the baseline, one merged JSON.
#   bash benchmarks/mindcv_cpu.sh [OUT.json]      (default benchmarks/results/mindcv_cpu.json)
# MindSpore 2.10 needs numpy<2, so it gets a venv of its own (runs/mindcv-venv, created once and
# reused); torchvision runs from the project's .venv. See benchmarks/mindcv_cpu.py for the method.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-benchmarks/results/mindcv_cpu.json}
MSVENV=runs/mindcv-venv
PACKAGES=(mindspore==2.10.0 mindcv==0.3.0 "numpy<2")
export OMP_NUM_THREADS=2

if [[ ! -f $MSVENV/.installed ]]; then
    echo "creating $MSVENV with ${PACKAGES[*]} (first run only)..."
    rm -rf "$MSVENV"
    mkdir -p runs
    python3 -m venv "$MSVENV"
    if ! "$MSVENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}" >runs/mindcv-install.log 2>&1; then
        echo "error: pip could not install ${PACKAGES[*]} into $MSVENV; its output (runs/mindcv-install.log):" >&2
        grep -v "^WARNING: Location" runs/mindcv-install.log | tail -20 >&2
        exit 1
    fi
    if ! "$MSVENV/bin/python" -c "import mindspore, mindcv" >>runs/mindcv-install.log 2>&1; then
        echo "error: mindspore/mindcv installed but do not import; see runs/mindcv-install.log" >&2
        tail -20 runs/mindcv-install.log >&2
        exit 1
    fi
    touch "$MSVENV/.installed"
fi
[[ -f .venv/.installed ]] || make .venv/.installed

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "== MindCV (MindSpore, $MSVENV)"
"$MSVENV/bin/python" benchmarks/mindcv_cpu.py --peer mindcv --json "$TMP/mindcv.json"
echo "== torchvision baseline (.venv)"
.venv/bin/python benchmarks/mindcv_cpu.py --peer torchvision --json "$TMP/torchvision.json"

mkdir -p "$(dirname "$OUT")"
python3 - "$TMP/mindcv.json" "$TMP/torchvision.json" "$OUT" <<'EOF'
import json, sys
parts = [json.load(open(p)) for p in sys.argv[1:3]]
merged = {"machine": dict(parts[0]["machine"]), "settings": {}, "rows": []}
merged["machine"]["peers"] = {}
for part in parts:
    merged["machine"]["peers"].update(part["machine"]["peers"])
    merged["settings"].update(part["settings"])
    merged["rows"] += part["rows"]
with open(sys.argv[3], "w") as f:
    json.dump(merged, f, indent=1)
EOF
echo "wrote $OUT"
