#!/usr/bin/env bash
# The GPU check: correctness of the CUDA path (the fused Triton kernels), host syncs per
# step counted, CUDA-event timings at ~100M and ~1B parameters against the byte bound and
# fused AdamW, peak memory. Writes docs/results/gpu_check.{json,md}. Prepared to finish
# within 8 minutes on an H200 (needs torch with CUDA and triton there).
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine
#   bash benchmarks/gpu_check.sh --device cpu --quick --out /tmp/gpu_check   # anywhere
set -euo pipefail
cd "$(dirname "$0")/.."

# First interpreter that has torch with CUDA; else the first that has torch at all.
pick=""
for py in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || [ -x "$py" ] || continue
    if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        pick="$py"; break
    fi
    if [ -z "$pick" ] && "$py" -c "import torch" 2>/dev/null; then
        pick="$py"
    fi
done
if [ -z "$pick" ]; then
    echo "gpu_check.sh: no Python with torch found" >&2
    exit 2
fi
"$pick" -c "import numpy" 2>/dev/null || { echo "gpu_check.sh: $pick lacks numpy" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
exec timeout 470 env TRITON_INTERPRET= "$pick" benchmarks/gpu_check.py "$@"
