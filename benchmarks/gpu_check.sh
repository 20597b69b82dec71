#!/usr/bin/env bash
# The GPU check, in one call of a lent GPU machine (about 8 minutes on one H100): the GPU-marked tests,
# attention over 8,192-token packed rows, and the throughput benchmark (gpu-1.5b: distsft, the bare
# forward+backward+fused-AdamW line, TRL packing and padding; then 8 rows per step).
#
# Here, once: bash ../shared/gpu/fetch_wheels.sh .whl transformers==5.24.0 huggingface_hub==2.4.0 \
#   httpx2 httpcore2 truststore peft==0.21.2 bitsandbytes==0.50.0   (kept out of git in .git/info/exclude)
# There: bash benchmarks/gpu_check.sh   (the device tool carries .whl; logs land in $OUT)
#        bash benchmarks/gpu_check.sh long   (another call: the longest 1.5B row with and without tiled MLP)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/distsft-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
python3 - > "$OUT/env.txt" 2>&1 <<'EOF'
import os, torch, transformers, deepspeed, peft
print(torch.__version__, torch.cuda.get_device_name(), "transformers", transformers.__version__,
      "deepspeed", deepspeed.__version__, "peft", peft.__version__,
      "TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST"))
EOF
cat "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: the log in $OUT/NAME.log, its tail here
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
  grep -vE "^\[|^ *(warnings|Warning)|UserWarning|FutureWarning" "$OUT/$name.log" | tail -n "${TAIL:-14}"
}

if [ "${1:-}" = "long" ]; then  # the long-context check, a call of its own (about 8 minutes)
  TAIL=30 step longest 540 python3 benchmarks/long_context.py --longest --preset gpu-1.5b
  echo "done in $SECONDS s"
  exit 0
fi

step tests 170 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::FutureWarning -W ignore::UserWarning \
  tests/test_gpu.py tests/test_packing.py
step attention 100 python3 benchmarks/attention.py --row 8192 --rows 2 --repeats 8
TAIL=12 step throughput 300 python3 benchmarks/throughput.py --preset gpu-1.5b --max-steps 24 --workdir /tmp/bench \
  --runs distsft-local bare trl-packing trl-padding --distsft-set 'logging.profile_steps=[19,20]'
cp /tmp/bench/distsft-local/profile/summary.txt "$OUT/profile.txt" 2>/dev/null && head -12 "$OUT/profile.txt"
TAIL=6 step throughput8 140 python3 benchmarks/throughput.py --preset gpu-1.5b --max-steps 12 --workdir /tmp/bench \
  --batch-examples 64 --runs distsft-local bare --tag=-8rows
echo "done in $SECONDS s"
