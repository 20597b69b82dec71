#!/usr/bin/env bash
# The GPU check: one call of at most 8 minutes on one H100/H200, installs included, most useful first.
#
#   step           limit  what it shows
#   install+import   90 s  the carried wheels; one line per package that does not import, then stop
#   gpu-tests       200 s  tests/test_gpu.py: the default model.dtype auto (fp32 weights, bf16 autocast, varlen)
#                          with host syncs counted per step (sync debug mode, goal 0); LoRA r=8 peak memory
#                          against its bf16 base, ZeRO-3 + LoRA on one GPU; an injected NaN step (no checkpoint
#                          written); packed = alone on the GPU kernels; the fast path's figures
#   throughput      210 s  1.5B Llama, 16 steps: distsft (default dtype, steps 12-13 profiled: syncs per step)
#                          vs the bare loop vs TRL packing: ms/step, MFU, peak memory
#   loss-memory      40 s  fused / chunked / plain loss at a 128k vocabulary: peak memory and time
# Expected: about 6 minutes (the 1.5B model's random init and save take ~40 s of the throughput step).
#
# Here, once (kept out of git by .git/info/exclude):
#   bash ../shared/gpu/fetch_wheels.sh .whl transformers==5.25.0 huggingface_hub==2.4.0 httpx2 httpcore2 \
#     truststore peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 click \
#     anyio idna regex fsspec==2026.9.0 typing_extensions
# There (the device tool, carry [".whl"]): bash benchmarks/gpu_check.sh   -> logs and figures in $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/distsft-gpu}
mkdir -p "$OUT"
# TORCH_CUDA_ARCH_LIST stays the image's: 9.0 made inductor's flex_attention templates fail (NoValidChoicesError);
# distsft compiles no DeepSpeed op by default (9.0a breaks its op builder: set 9.0 only for that).
# USE_HUB_KERNELS=0 for TRL's own from_pretrained (distsft passes use_kernels=False itself)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 USE_HUB_KERNELS=0
export DISTSFT_GPU_REPORT=$OUT/figures.jsonl
: > "$DISTSFT_GPU_REPORT"
T0=$SECONDS

if [ -d .whl ]; then
  timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$OUT/pip.log" 2>&1 || { echo "install failed:"; tail -5 "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
timeout 60 python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt" || exit 1
import importlib, os, sys
need = ["torch", "transformers", "deepspeed", "datasets", "trl", "peft", "accelerate", "safetensors", "tokenizers",
        "pyarrow", "yaml", "pytest", "hypothesis", "pydantic", "hjson", "dill", "multiprocess", "huggingface_hub",
        "distsft.training.loop", "distsft.launcher.run"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as e:  # one line each, then stop: a collection error would abort every test
        missing.append(f"missing: {name} ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
if missing:
    print("\n".join(missing))
    sys.exit(1)
import deepspeed, torch, transformers, trl, peft
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| deepspeed", deepspeed.__version__, "| trl", trl.__version__, "| peft", peft.__version__)
EOF
echo "== install+import: $((SECONDS - T0)) s"

step() {  # step NAME SECONDS COMMAND...: the log in $OUT/NAME.log, its tail here
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
  grep -vE "^\[|^ *(warnings|Warning)|UserWarning|FutureWarning|DeprecationWarning|^  " "$OUT/$name.log" \
    | grep -v "GPU-FIGURES" | tail -n "${TAIL:-10}"
}

TAIL=14 step gpu-tests 200 python3 -m pytest -q -s -m gpu -p no:cacheprovider -W ignore::FutureWarning \
  -W ignore::UserWarning -W ignore::DeprecationWarning tests/test_gpu.py
TAIL=12 step throughput 210 python3 benchmarks/throughput.py --preset gpu-1.5b --max-steps 16 --workdir /tmp/bench \
  --runs distsft-local bare trl-packing --distsft-set model.dtype=auto --distsft-set train.log_every=10 \
  --distsft-set 'logging.profile_steps=[12,13]'
cp /tmp/bench/distsft-local/profile/summary.txt "$OUT/profile.txt" 2>/dev/null && head -9 "$OUT/profile.txt"
grep -h "^engine:" /tmp/bench/distsft-local/logs/driver.log 2>/dev/null | head -1
step loss-memory 40 python3 benchmarks/loss_memory.py
echo "== figures"
cat "$DISTSFT_GPU_REPORT"
echo "done in $((SECONDS - T0)) s"
