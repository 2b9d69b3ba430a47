#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call: correctness first, then timings.
#
#   COMMIT=$(git rev-parse HEAD) OUT=/tmp/out bash bench/gpu_session.sh check   # every kernel test and a training step, < 4 min
#   COMMIT=... OUT=... bash bench/gpu_session.sh quick     # moe_layer --quick: every model at 16K rows, ~2-3 min
#   COMMIT=... OUT=... bash bench/gpu_session.sh full      # moe_ffn's kernel tests, moe_layer on every shape (each
#                                                          case checked first), then `moe calibrate` of every full
#                                                          config: < 8 min (start here)
#   COMMIT=... OUT=... bash bench/gpu_session.sh options   # ours-triton at the quick shapes (the Liger anchor's, then
#                                                          16K rows of every model) with TMA, PERSISTENT and
#                                                          both forced on (~3-4 min; right after full: same machine)
#   COMMIT=... OUT=... bash bench/gpu_session.sh gemm      # grouped_gemm on every shape (~7 min)
#   COMMIT=... OUT=... bash bench/gpu_session.sh calibrate # bench/run_all.py: mirrors and `moe calibrate` of every full config
#   COMMIT=... OUT=... bash bench/gpu_session.sh infer     # decode against the bandwidth floor; ours vs transformers
#   TUNE_KINDS="--tune-kind dw" ... bash bench/gpu_session.sh tune  # sweep tile configs, then --quick with them;
#                                                                     the table comes back as session/gemm_configs.json
#
# The machine has no network and no .git: the project runs from PYTHONPATH, the commit comes
# from $COMMIT. Each step has its own time limit so that one hung step cannot eat the call;
# logs and results go under $WORK/session/ and are packed into $OUT/session.tar.gz after every step:
# the device tool returns at most 8 files from $OUT, none deeper than 2 folders, and a call cut
# short by the device's time still returns what its finished steps wrote.
#
# SonicMoE (quick, full) is not on the machine: where the call carries `.whl` (the wheels of
# sonic-moe, quack-kernels, nvidia-cutlass-dsl, apache-tvm-ffi, torch-c-dlpack-ext, and the
# CUTLASS DSL's 190 MB of libraries as a .tar.xz, too big for the 64 MiB carry as a wheel),
# they are unpacked into /tmp/site first. Without it, bench/moe_layer.py records SonicMoE as
# unavailable and compares the others.
set -u
what=${1:-check}
OUT=${OUT:-/tmp/gpu-session}
COMMIT=${COMMIT:-unknown}
WORK=${WORK:-/tmp/gpu-session-$what}  # one per mode: a second call on a warm machine packs only its own
dir=$WORK/session
mkdir -p "$dir/results" "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=python3

pack() {  # everything so far into $OUT/session.tar.gz (built beside, then copied in whole)
  tar -C "$WORK" -czf "$WORK/session.tar.gz" session && cp "$WORK/session.tar.gz" "$OUT/session.tar.gz"
}

step() {  # step NAME SECONDS CMD...: run, log to $dir/NAME.log, print its tail, pack
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout "$limit" "$@" >"$dir/$name.log" 2>&1
  rc=$?
  echo "-- $name: exit $rc after $(( $(date +%s) - start ))s"
  tail -n "${TAIL:-12}" "$dir/$name.log"
  pack
}

install_wheels() {  # the carried wheels and archives into /tmp/site, which then goes on PYTHONPATH
  local site=/tmp/site
  mkdir -p "$site"
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || return
  for archive in .whl/*.tar.xz; do
    [ -e "$archive" ] || continue
    $py -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$archive" "$site" || return
  done
  # PYTHONPATH entries get no .pth processing: add the folder nvidia_cutlass_dsl.pth would have added
  export PYTHONPATH=$PWD:$site:$site/nvidia_cutlass_dsl/python_packages
  $py -c "import sonicmoe, quack, cutlass; print('sonicmoe', sonicmoe.__version__, 'cutlass', cutlass.__version__)"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$dir/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$dir/gpu.txt"

case $what in
quick|full)
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "== install_wheels"
    start=$(date +%s)
    install_wheels >"$dir/install_wheels.log" 2>&1
    echo "-- install_wheels: exit $? after $(( $(date +%s) - start ))s"
    tail -n 3 "$dir/install_wheels.log"
  fi
  ;;
esac
case $what in
check)
  step kernel_tests 200 $py -m pytest -q -p no:cacheprovider tests/kernels tests/test_experts.py tests/test_dispatch.py
  step model_on_gpu 35 $py -m moe bench train --config configs/tiny.yaml --backend triton --repeats 3 --json
  ;;
quick)  # budget: the bench skips (and records) cases that would end past it
  step moe_layer "${LAYER_LIMIT:-230}" $py bench/moe_layer.py --quick --budget-s "${LAYER_BUDGET:-200}" --commit "$COMMIT" --results-dir "$dir/results"
  ;;
full)  # the new kernels' tests on the GPU first (bf16 included), then every case, each checked before it is
  # timed, then the projections; worst case 30 (wheels) + 50 + 270 + 130 s = 480 s. Each calibration
  # saves its own JSON, so a cut-short step still leaves the configs it reached.
  step kernel_tests_moe_ffn 50 $py -m pytest -q -x -p no:cacheprovider tests/kernels/test_moe_ffn.py \
    tests/kernels/test_ffn_tma.py tests/kernels/test_rows_tma.py tests/kernels/test_dw_split.py
  step moe_layer "${LAYER_LIMIT:-270}" $py bench/moe_layer.py --budget-s "${LAYER_BUDGET:-235}" --commit "$COMMIT" --results-dir "$dir/results"
  step calibrate "${CALIBRATE_LIMIT:-130}" $py bench/run_all.py --only calibrate --results-dir "$dir/results"
  ;;
options)  # the opt-in Hopper options at real shapes, before a tuning run decides; full's 16K rows are the
  # baseline. Each case is checked against the fp32 reference before it is timed (test_persistent.py runs in check)
  for opts in '{"TMA": true}' '{"PERSISTENT": 1}' '{"TMA": true, "PERSISTENT": 1}'; do
    tag=$(echo "$opts" | tr -cd 'A-Za-z')
    step "options_$tag" "${OPTIONS_LIMIT:-90}" $py bench/moe_layer.py --quick --impl ours-triton --kernel-options "$opts" \
      --commit "$COMMIT" --results-dir "$dir/results"
  done
  ;;
gemm)
  step grouped_gemm "${GEMM_LIMIT:-420}" $py bench/grouped_gemm.py --commit "$COMMIT" --out "$dir/results"
  ;;
calibrate)  # every job of run_all: the mirrors' train/infer/layers, `moe calibrate` of each configs/full/*.yaml, vs-hf
  step run_all "${RUN_ALL_LIMIT:-420}" $py bench/run_all.py --results-dir "$dir/results"
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
*)
  echo "unknown mode '$what': check, quick, full, options, gemm, calibrate, infer or tune" >&2
  ;;
esac
pack && echo "packed $(du -h "$OUT/session.tar.gz" | cut -f1) into session.tar.gz"
