#!/usr/bin/env bash
# Everything that needs a GPU, in stages, with logs under $OUT (default ./gpu-session).
# Run from the repository root on a machine with a CUDA GPU, no install needed:
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh build cuda-tests sanitizer cuda-quick
# Stages: build cuda-tests triton-tests optimizer-tests all-tests sanitizer
#         cuda-quick triton-quick amp-quick host-overhead bench pytest-bench
# Each stage has a time cap so a session fits the device's 10-minute calls.
set -uo pipefail
OUT=${OUT:-gpu-session}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)

stage() {  # stage NAME SECONDS COMMAND...: run with a cap, log to $OUT/NAME.log, print its tail
    local name=$1 seconds=$2; shift 2
    echo "=== $name ($(date +%T))"
    { time timeout "$seconds" "$@"; } > "$OUT/$name.log" 2>&1
    echo "=== $name: exit $? ($(date +%T))"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
}

pytest_gpu=(python -m pytest -q -rfE --tb=short -p no:cacheprovider --durations=8)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"

for name in "$@"; do
    case $name in
        build) stage build 200 python -m gradclip build -v ;;
        cuda-tests) stage cuda-tests 240 "${pytest_gpu[@]}" tests/test_cuda_backend.py tests/test_backend_contract.py tests/test_functional.py -k "not triton" ;;
        triton-tests) stage triton-tests 300 "${pytest_gpu[@]}" tests/test_triton_backend.py tests/test_backend_contract.py tests/test_functional.py -k triton ;;
        optimizer-tests) stage optimizer-tests 300 "${pytest_gpu[@]}" tests/test_optimizer.py tests/test_amp.py ;;
        all-tests) stage all-tests 540 "${pytest_gpu[@]}" tests ;;
        sanitizer)
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage memcheck 60 "$sanitizer" --tool memcheck python benchmarks/cuda_quick.py --sanitize
            stage racecheck 60 "$sanitizer" --tool racecheck python benchmarks/cuda_quick.py --sanitize ;;
        cuda-quick) TAIL=45 stage cuda-quick 200 python benchmarks/cuda_quick.py --json "$OUT/cuda_quick.json" ;;
        triton-quick) TAIL=45 stage triton-quick 200 python benchmarks/triton_quick.py --json "$OUT/triton_quick.json" ;;
        amp-quick) TAIL=30 stage amp-quick 200 python benchmarks/amp_quick.py --json "$OUT/amp_quick.json" ;;
        host-overhead) TAIL=40 stage host-overhead 120 python benchmarks/host_overhead.py ;;
        bench) TAIL=60 stage bench 420 python -m gradclip bench --no-progress --out "$OUT/bench" ;;
        pytest-bench) stage pytest-bench 300 python -m pytest benchmarks/test_bench.py --benchmark-only -q --benchmark-json="$OUT/pytest-bench.json" ;;
        *) echo "unknown stage $name" >&2; exit 2 ;;
    esac
done
