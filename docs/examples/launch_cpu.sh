#!/usr/bin/env bash
# Two processes on this machine's CPU, gloo backend: GRU under DDP (or FSDP2) with torchrun.
#
#   docs/examples/launch_cpu.sh                              # DDP, 2 processes
#   docs/examples/launch_cpu.sh --fsdp2                      # FSDP2 (sharded weights and memory)
#   docs/examples/launch_cpu.sh --fsdp2 --checkpoint /tmp/gru_ckpt   # + DCP save / resume
#   NPROC=4 docs/examples/launch_cpu.sh                      # more processes
#
# Needs only torch (CPU build is fine) and this checkout; uses .venv/bin/python when the
# repository's virtual environment exists (`make test` creates it), python3 otherwise.
# torchrun --standalone picks a free port itself. Any extra argument goes to train_ddp.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # 2 processes x all cores oversubscribes the CPU
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" \
    "$here/train_ddp.py" "$@"
