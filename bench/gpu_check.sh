#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine (about 11 minutes on one H200). In the project's venv
# (`make TORCH_SPEC=torch setup`) or any environment with the package's requirements:
#     PY=.venv/bin/python bash bench/gpu_check.sh [OUT_DIR]        (default OUT_DIR: results/gpu_check)
# 1. tests:             the GPU-only tests (tests/test_gpu.py: lossless methods and the trained drafters exact in fp32,
#                       near-ties only in bf16, CUDA graphs against the eager core; tests/test_cuda_graphs.py; the
#                       CUDA case of tests/test_core.py);
# 2. speed_graphs:      CNN/DM, 10 articles, full prompts, 64 tokens, --dtype auto, --core lean-graphs (decode passes
#                       replayed from CUDA graphs): lossless methods, trained drafters and transformers' peer;
# 3. speed:             the same table on the eager lean core;
# 4. core_costs:        the cost curve of the cores in bf16 and fp32, with the bandwidth floor;
# 5. ties:              the bf16 near-tie drift on this GPU (does harness/exactness.py's tolerance hold here?);
# 6. measurement_check: order effect, A/A control, FREE's null speedup, in bf16.
# STEPS="tests speed" runs only those. Each step's output goes to OUT_DIR/STEP.log; a failed step is reported and
# the next one still runs.
set -uo pipefail
PY=${PY:-python3}
OUT=${1:-results/gpu_check}
mkdir -p "$OUT"
failed=()
step() {
    local name=$1; shift
    echo "### $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
}
STEPS=${STEPS:-tests speed_graphs speed core_costs ties measurement_check}
METHODS=autoregressive,prompt_lookup,hf_prompt_lookup,hybrid_speculative,self_speculative,eagle,kangaroo
METHODS=$METHODS,hybrid_speculative:drafter=eagle,self_speculative:drafter=kangaroo
speed() {  # speed OUT_NAME CORE
    $PY benchmark.py --device cuda --dtype auto --core "$2" --dataset cnn_dm_summarization --num_samples 10 \
        --max_steps 64 --fixed_length --seed 0 --exits auto --breakdown false --strategies "$METHODS" \
        --output_dir "$OUT/$1"
}
for name in $STEPS; do
    case $name in
    tests) step tests $PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_cuda_graphs.py \
        tests/test_core.py::test_dtype_auto_on_cuda_is_bf16_where_the_gpu_computes_it ;;
    speed_graphs) step speed_graphs speed speed_graphs lean-graphs ;;
    speed) step speed speed speed lean ;;
    core_costs) step core_costs $PY bench/core_costs.py --device cuda --dtypes bfloat16 float32 \
        --cores transformers lean lean-graphs --out "$OUT/core_costs.json" ;;
    ties) step ties $PY bench/ties.py --device cuda --dtype bfloat16 --out "$OUT/ties_bfloat16.json" ;;
    measurement_check) step measurement_check $PY bench/measurement_check.py --device cuda --dtype bfloat16 \
        --output_dir "$OUT/measurement_check" ;;
    *) echo "gpu check: unknown step $name"; failed+=("$name") ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then echo "gpu check: FAILED steps: ${failed[*]}"; exit 1; fi
echo "gpu check: every step passed; logs in $OUT"
