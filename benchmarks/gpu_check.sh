#!/usr/bin/env bash
# The GPU measurements no CPU can give, in one call of about 8 minutes on one NVIDIA GPU
# (BENCHMARKS.md, "base, bfloat16"): our base() step in bfloat16 against the PyTorch twin,
# eager and compiled, with cuDNN attention on ("auto") and off ("xla"), MFU from the
# matmul count; then the peak GPU memory of our step with remat on (the run configs'
# default) at 8, 16, 32 and 64 frames.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT, else ./gpu_check
#
# Uses the Python environment it finds (JAX with CUDA, torch with CUDA, flax, optax,
# transformers); logs and JSON results go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false  # processes share the card

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt"
python -c "import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__)" \
    >> "$out/gpu.txt" 2>&1

# 1. Timing: four contenders interleaved, one at a time on the card (~5 min; ours compiles
#    first, alone, then the other three side by side).
timeout 480 python benchmarks/train_step.py --presets base --dtype bfloat16 \
    --contenders jax,torch_eager,torch_compile --attention default,xla \
    --rounds 3 --steps 5 --out "$out/base.json" > "$out/base.log" 2>&1
echo "timing: exit $?" >> "$out/gpu.txt"

# 2. Peak memory: one process per clip length, side by side (each counts its own
#    allocations; their times are not a measurement).
for frames in 8 16 32 64; do
    timeout 160 python benchmarks/train_step.py --presets base --dtype bfloat16 \
        --contenders jax --remat --frames "$frames" --rounds 1 --steps 2 \
        --out "$out/memory_$frames.json" > "$out/memory_$frames.log" 2>&1 &
done
wait
tail -n 12 "$out"/*.log
