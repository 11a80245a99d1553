#!/usr/bin/env bash
# Everything a GPU lease is for, in as few device calls as possible (README, "GPU sessions").
# Run from the repository root on the device machine, e.g. with the device tool, one call after the other:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)             # env, build, CUDA tests, quick ops bench
#   run(command="STAGES='build ops' bash benchmarks/gpu_session.sh")          # SmolLM2 and Llama-3-8B shapes, 1k-16k
#   run(command="STAGES='build sanitize ops-qwen e2e' bash benchmarks/gpu_session.sh")  # memcheck/racecheck; Qwen; TTFT
# A machine stays warm (and keeps the in-place build) only 30 s after a call: make the next call at once. If it
# went back anyway, carry the extension the first call copied to $OUT (carry=["semshare_ops/_C.abi3.so"]): the
# build stage checks that the library there loads with CUDA kernels and skips the build. Every stage runs under
# its own time limit and writes $OUT/<stage>.log; benchmark JSON (device, versions, date and command inside) goes
# to $OUT/*.json, one file per invocation so a stage cut short keeps what finished; a summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/semshare-gpu}
STAGES=${STAGES:-"env build test smoke"}
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

stage() {  # stage NAME SECONDS: run NAME_stage under a limit, log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2 start rc
  start=$(date +%s)
  timeout "$limit" bash -c "${name}_stage" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - start )) s ($OUT/$name.log)" | tee -a "$SUMMARY"
  return $rc
}

has_cuda_kernels() {
  $PY - <<'EOF' 2>/dev/null
import torch, semshare_ops  # noqa: F401
assert torch.cuda.is_available()
assert torch._C._dispatch_has_kernel_for_dispatch_key("semshare::partial_attn", "CUDA")
EOF
}

env_stage() {
  nvidia-smi
  $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); \
p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, 'SMs', p.total_memory >> 20, 'MiB')"
  nvcc --version | tail -2
  $PY -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|triton|numpy|pytest|ninja) "
}

build_stage() {
  if has_cuda_kernels; then echo "semshare_ops/_C.abi3.so (carried) loads with CUDA kernels: no build"; return 0; fi
  rm -rf build/gpu-temp
  $PY setup.py build_ext --inplace --build-temp build/gpu-temp || return 1
  has_cuda_kernels || { echo "built, but semshare::partial_attn has no CUDA kernel"; return 1; }
  cp semshare_ops/_C.abi3.so "$OUT/"
}

# Every op test that has a CUDA parametrization (device=cuda), opcheck on CUDA included.
test_stage() {
  # --continue-on-collection-errors: a test module that fails to import there (another transformers) must not stop
  # the others.
  $PY -m pytest tests -q -rs -k "cuda and not cuda_emulated" -p no:cacheprovider --maxfail=50 --continue-on-collection-errors \
    --junitxml="$OUT/tests_cuda.xml"
}

# compute-sanitizer on a subset of the op tests: out-of-bounds accesses (memcheck, with torch's caching allocator
# off so that every tensor is its own allocation) and shared-memory races (racecheck) of our kernels.
sanitize_stage() {
  local attn="test_heads_and_dims or test_ragged_batch or test_key_counts_off_tiles or test_strided_views"
  local rope="test_rotation_oracle or test_strided_hf_cache_views or test_layer_and_head_slices_as_views"
  local lsh="test_hamming_topk_random or test_hamming_topk_ties or test_simhash_matches_numpy"
  local rc=0
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
    $PY -m pytest tests/ops/test_partial_attn.py tests/ops/test_rope_reuse.py tests/ops/test_lsh.py -q \
    -p no:cacheprovider --continue-on-collection-errors -k "cuda and not cuda_emulated and ($attn or $rope or $lsh)" || rc=1
  compute-sanitizer --tool racecheck --error-exitcode 99 $PY -m pytest tests/ops/test_partial_attn.py \
    tests/ops/test_lsh.py -q -p no:cacheprovider -k "cuda and not cuda_emulated and (test_heads_and_dims or test_key_counts_off_tiles \
    or test_hamming_topk_random)" || rc=1
  return $rc
}

# Quick ops benchmark: bf16, the three model shapes, two lengths, so a first call already says where we stand.
smoke_stage() {
  $PY -m semshare_ops.cli bench ops --device cuda --dtype bfloat16 --models smollm2-135m llama3-8b \
    --lengths 4096 --ratios 0.2 1.0 --out "$OUT/ops_cuda_smoke.json"
}

ops_model() {  # one model shape: bf16, 1k-16k tokens, recompute ratios 5%, 20%, 50% and full causal prefill
  $PY -m semshare_ops.cli bench ops --device cuda --dtype bfloat16 --models "$1" --lengths 1024 4096 16384 \
    --ratios 0.05 0.2 0.5 1.0 --out "$OUT/ops_cuda_$1.json"
}

ops_stage() {
  ops_model smollm2-135m
  ops_model llama3-8b
}

ops-qwen_stage() {
  ops_model qwen2.5-7b
}

e2e_stage() {
  $PY -m semshare_ops.cli bench e2e --device cuda --shape llama3-8b --lengths 1024 4096 \
    --out "$OUT/e2e_llama3-8b_cuda.json"
}

export PY OUT
export -f has_cuda_kernels env_stage build_stage test_stage sanitize_stage smoke_stage ops_model ops_stage ops-qwen_stage e2e_stage
for s in $STAGES; do
  case $s in
    env) stage env 60 ;;
    build) stage build 420 || break ;;
    test) stage test 300 ;;
    smoke) stage smoke 180 ;;
    sanitize) stage sanitize 300 ;;
    ops) stage ops 540 ;;
    ops-qwen) stage ops-qwen 300 ;;
    e2e) stage e2e 300 ;;
    *) echo "unknown stage $s (expected env build test sanitize smoke ops ops-qwen e2e)" | tee -a "$SUMMARY" ;;
  esac
done

echo "---- tails"
for s in $STAGES; do
  [ -f "$OUT/$s.log" ] && { echo "== $s"; tail -n 25 "$OUT/$s.log"; }
done
echo "---- summary"
cat "$SUMMARY"
