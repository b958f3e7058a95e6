#!/usr/bin/env bash
# Everything that needs a GPU, in stages, with logs under $OUT (default ./gpu-session).
# Run from the repository root on a machine with a CUDA GPU, no install needed:
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh build all-tests sanitizer check bench
# Stages: build cuda-tests triton-tests optimizer-tests all-tests sanitizer big graphs check
#         bench host quick
# Every check and timing goes through `python -m gradclip bench` (docs/bench.md).
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
bench=(python -m gradclip bench --no-progress)
# The kernels' edge cases (empty, tiny and chunk-edge sizes, several launches), checked
# against the float64 oracle: small enough for the sanitizers. No CUDA graph here, so the
# caching allocator can be off (memcheck then sees every allocation).
edge_check=("${bench[@]}" --check-only --workloads odd-sizes --dtypes fp32,bf16,fp16 --backends cuda --out "")

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"

for name in "$@"; do
    case $name in
        build) stage build 200 python -m gradclip build -v ;;
        cuda-tests) stage cuda-tests 240 "${pytest_gpu[@]}" tests/test_cuda_backend.py tests/test_backend_contract.py \
                       tests/test_no_host_sync.py tests/test_opcheck.py tests/test_functional.py -k "not triton" ;;
        triton-tests) stage triton-tests 300 "${pytest_gpu[@]}" tests/test_triton_backend.py tests/test_backend_contract.py \
                         tests/test_no_host_sync.py tests/test_opcheck.py tests/test_functional.py -k triton ;;
        optimizer-tests) stage optimizer-tests 300 "${pytest_gpu[@]}" tests/test_optimizer.py tests/test_amp.py ;;
        all-tests) stage all-tests 540 "${pytest_gpu[@]}" tests ;;
        sanitizer)
            # Every op once (the per-tensor and AGC kernels first: they never ran on a GPU),
            # then the norm and rescale kernels on the edge cases.
            for tool in memcheck racecheck synccheck; do
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage "$tool-ops" 150 "$sanitizer" --tool "$tool" \
                    python benchmarks/kernel_smoke.py cuda triton
            done
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage memcheck 120 "$sanitizer" --tool memcheck "${edge_check[@]}"
            stage racecheck 120 "$sanitizer" --tool racecheck "${edge_check[@]}" ;;
        # Inputs past 2**31 elements (bf16, 4+ GiB) for the norm, per-tensor and AGC kernels.
        big) stage big 300 "${pytest_gpu[@]}" tests -m gpu -k "two_to_the_31 or past_2_pow_31" ;;
        # CUDA-graph capture and replay: the clip, per-tensor clips, AGC, the rules, a
        # ClippedOptimizer step with ZClip and a guard, the 1-process NCCL mesh.
        graphs) stage graphs 300 "${pytest_gpu[@]}" tests -m gpu -k "graph or capture" ;;
        # Every gradclip backend against the oracle on the four workloads and the edge cases.
        check) TAIL=30 stage check 300 "${bench[@]}" --check-only --dtypes fp32,bf16,fp16 \
                   --workloads llama-1b,gpt2,resnet50,2000x4096,odd-sizes --out "$OUT/check" ;;
        # Everything, graph and eager, with the ceilings and torch's rows of the same run.
        bench) TAIL=80 stage bench 480 "${bench[@]}" --out "$OUT/bench" ;;
        # Host time per call (what CUDA graphs remove), where it matters most.
        host) TAIL=40 stage host 240 "${bench[@]}" --timing host --workloads resnet50,2000x4096 \
                  --modes norm,no-clip,clip,amp,amp-step --out "$OUT/bench-host" ;;
        quick) TAIL=40 stage quick 240 "${bench[@]}" --quick --check --out "$OUT/bench-quick" ;;
        *) echo "unknown stage $name" >&2; exit 2 ;;
    esac
done
