#!/usr/bin/env bash
# The GPU check of docs/performance.md: the merge maths and the main job on CUDA in bf16 (scripts/gpu_check.py),
# with the commit and the GPU it ran on. Extra arguments go to gpu_check.py (e.g. --quick, --steps 10, --out FILE).
# Refuses to run (exit 2) where torch sees no CUDA device, so a CPU-only machine never reports a GPU result.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device here; nothing was run. Run this on a machine with a GPU." >&2
    exit 2
fi
echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (plus uncommitted changes)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python scripts/gpu_check.py --device cuda --dtype bfloat16 "$@"
