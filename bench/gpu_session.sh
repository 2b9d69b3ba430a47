#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call: correctness first, then timings.
#
#   COMMIT=$(git rev-parse HEAD) OUT=/tmp/out bash bench/gpu_session.sh check   # kernel tests and a training step on the GPU, ~2 min
#   COMMIT=... OUT=... bash bench/gpu_session.sh quick     # kernel tests, grouped_gemm and moe_layer --quick
#   COMMIT=... OUT=... bash bench/gpu_session.sh calibrate # moe_layer --quick and bench/run_all.py
#   COMMIT=... OUT=... bash bench/gpu_session.sh full      # grouped_gemm and moe_layer on every shape
#   COMMIT=... OUT=... bash bench/gpu_session.sh infer     # decode against the bandwidth floor; ours vs transformers
#   TUNE_KINDS="--tune-kind dw" ... bash bench/gpu_session.sh tune  # sweep tile configs, then --quick with them;
#                                                                     the table comes back as session/gemm_configs.json
#
# The machine has no network and no .git: the project runs from PYTHONPATH, the commit comes
# from $COMMIT. Each step has its own time limit so that one hung step cannot eat the call;
# logs and results go under $OUT/session/ and are packed into $OUT/session.tar.gz at the end
# (the device tool returns only a few files).
set -u
what=${1:-check}
OUT=${OUT:-/tmp/gpu-session}
COMMIT=${COMMIT:-unknown}
dir=$OUT/session
mkdir -p "$dir/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=python3

step() {  # step NAME SECONDS CMD...: run, log to $dir/NAME.log, print its tail
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout "$limit" "$@" >"$dir/$name.log" 2>&1
  rc=$?
  echo "-- $name: exit $rc after $(( $(date +%s) - start ))s"
  tail -n "${TAIL:-12}" "$dir/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$dir/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$dir/gpu.txt"

case $what in
check|quick)
  step kernel_tests 240 $py -m pytest -q -p no:cacheprovider tests/kernels tests/test_experts.py tests/test_dispatch.py
  ;;
esac
case $what in
check)
  step model_on_gpu 120 $py -m moe bench train --config configs/tiny.yaml --backend triton --repeats 3 --json
  ;;
quick)
  step grouped_gemm 200 $py bench/grouped_gemm.py --quick --commit "$COMMIT" --out "$dir/results"
  step moe_layer 130 $py bench/moe_layer.py --quick --results-dir "$dir/results"
  ;;
calibrate)  # the whole-layer bench on the quick shapes, then every calibration job of run_all
  step moe_layer 120 $py bench/moe_layer.py --quick --results-dir "$dir/results"
  step run_all "${RUN_ALL_LIMIT:-400}" $py bench/run_all.py --results-dir "$dir/results"
  ;;
full)
  step grouped_gemm "${GEMM_LIMIT:-420}" $py bench/grouped_gemm.py --commit "$COMMIT" --out "$dir/results"
  step moe_layer "${LAYER_LIMIT:-170}" $py bench/moe_layer.py --results-dir "$dir/results"
  ;;
infer)  # prefill and decode at batch 1, 8, 64 against the bandwidth floor; then ours vs transformers' generate
  step infer_qwen 150 $py -m moe bench infer --config qwen3-moe-mini --batch-sizes 1,8,64 --save --results-dir "$dir/results"
  step infer_dsv3 150 $py -m moe bench infer --config deepseek-v3-mini --batch-sizes 1,8,64 --save --results-dir "$dir/results"
  step infer_vs_hf 240 $py bench/infer_vs_transformers.py --preset gpu --dtype bf16 --save --results-dir "$dir/results"
  ;;
tune)  # tune KINDS (default: every kind) in place, keep the table, then time the quick shapes with it
  step tune "${TUNE_LIMIT:-330}" $py bench/grouped_gemm.py --tune ${TUNE_KINDS:-} --commit "$COMMIT"
  cp moe_kernels/gemm_configs.json "$dir/gemm_configs.json"
  step grouped_gemm 130 $py bench/grouped_gemm.py --quick --commit "$COMMIT" --out "$dir/results"
  ;;
esac
tar -C "$OUT" -czf "$OUT/session.tar.gz" session && echo "packed $(du -h "$OUT/session.tar.gz" | cut -f1) into session.tar.gz"
