#!/usr/bin/env bash
# The GPU check (bench.py --config=gpu) on one CUDA GPU with bf16, sized for an H200: the rows and their PASS/MISS
# targets in under 8 minutes. --time_limit bounds the rows (the slow-to-compile ones run last; one past the limit is
# killed or not started, and says so), warmup and iters bound each row. JSON: $OUT/bench_gpu.json, else out/.
set -euo pipefail
cd "$(dirname "$0")/.."
python bench.py --config=gpu --warmup=2 --iters=5 --time_limit=450 --json="${OUT:-out}/bench_gpu.json"
