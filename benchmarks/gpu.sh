#!/usr/bin/env bash
# The GPU benchmark run, ready for a bare H200 machine without network (see shared/device/README.md).
# At most 8 minutes; every stage has its own timeout and writes JSON lines under $OUT:
#   0. $OUT/env.txt                   GPU, driver, python and package versions, jax devices
#   1. $OUT/attention_ab.jsonl        attention A/B at SD1.5 512 px batch 8 shapes, XLA vs cuDNN, bf16,
#                                     forward and forward+backward (benchmarks/attention_ab.py)
#   2. $OUT/train_step_sd15_512_b8.jsonl   the side-by-side TI step, SD1.5 512 px batch 8 bf16:
#                                     ours, torch, torch_cached, then both ratios (benchmarks/train_step.py)
#   3. $OUT/train_step_fallback.jsonl a smaller step (SD1.5 256 px batch 8) if time remains
# Stage logs (stderr) go to $OUT/<stage>.log.
#
# Before going to the machine (it has no pip index): bring diffusers and ml_collections as wheels,
# kept out of git (.whl/ is in .git/info/exclude):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 ml_collections==1.1.0
#
# and carry .whl with the run (run tool: carry=[".whl"]). On the machine this script installs them
# into /tmp/site (never `pip install -e .`: setup.py's lower bounds are above the machine's
# transformers/huggingface_hub/tokenizers; never the CPU torch wheel) and runs from source:
#
#   OUT=/some/dir bash benchmarks/gpu.sh            # on the H200
#   bash benchmarks/gpu.sh --cpu-smoke              # anywhere: tiny shapes, same stages, ~5 min on 2 cores
set -u
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
OUT="${OUT:-/tmp/gpu_bench_out}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${BUDGET_S:-470}  # 8 minutes, less a margin for the copy back
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
PY=python3
if [ "$SMOKE" = 0 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>"$OUT/pip.log" || echo "pip install of .whl failed (see pip.log)" >&2
  else
    echo "no .whl/ wheels: diffusers and ml_collections must already be importable" >&2
  fi
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export JAX_PLATFORMS=cpu
fi
MODEL_DIR="${MODEL_DIR:-/tmp/gpu_bench_models}"

# 0. environment
{
  date -u; uname -a; nproc; free -g 2>/dev/null | head -2
  nvidia-smi 2>&1 | head -20
  $PY --version
  timeout 60 $PY - <<'EOF'
import importlib, jax
for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "ml_collections", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
print("devices", jax.devices())
d = jax.devices()[0]
print("device_kind", d.device_kind, "compute_capability", getattr(d, "compute_capability", None))
from jax_inversion.platform import current_platform, resolve_dtype, select_attention_backend
p = current_platform()
print("platform", p, "dtype auto ->", resolve_dtype("auto").name,
      "attention auto (dtype auto) ->", select_attention_backend("auto", p, resolve_dtype("auto")))
try:
    import torch
    print("torch cuda", torch.cuda.is_available(), torch.version.cuda, torch.backends.cudnn.version())
except Exception as e:
    print("torch", e)
EOF
} >"$OUT/env.txt" 2>&1
echo "env done ($(left) s left)" >&2

# 1. attention A/B
if [ "$SMOKE" = 0 ]; then
  AB_ARGS="--backends xla,cudnn,chunked --dtype bfloat16 --steps 20"
else
  AB_ARGS="--smoke --backends xla,chunked,cudnn --dtype bfloat16 --steps 3"
fi
timeout 90 $PY -m benchmarks.attention_ab $AB_ARGS >"$OUT/attention_ab.jsonl" 2>"$OUT/attention_ab.log"
echo "attention A/B exit $? ($(left) s left)" >&2

# 2. the side-by-side step
if [ "$SMOKE" = 0 ]; then
  CONFIG=sd15_512_b8; FALLBACK=sd15_256_b8; DTYPE=bfloat16; STEPS="--steps 10 --warmup 2"
else
  CONFIG=small_32_b2; FALLBACK=small_32_b1; DTYPE=float32; STEPS="--steps 2 --warmup 1"
fi
STAGE=$(( $(left) - 60 ))  # keep a minute for the fallback
[ "$STAGE" -gt 330 ] && STAGE=330
timeout "$STAGE" $PY -m benchmarks.train_step --configs "$CONFIG" --dtype "$DTYPE" --attention_backend auto $STEPS \
  --model_dir "$MODEL_DIR/${CONFIG%%_*}" --timeout "$STAGE" >"$OUT/train_step_$CONFIG.jsonl" 2>"$OUT/train_step_$CONFIG.log"
echo "train step $CONFIG exit $? ($(left) s left)" >&2

# 3. a smaller fallback, if time remains (same written weights)
REST=$(( $(left) - 10 ))
if [ "$REST" -gt 45 ]; then
  timeout "$REST" $PY -m benchmarks.train_step --configs "$FALLBACK" --dtype "$DTYPE" --attention_backend auto $STEPS \
    --model_dir "$MODEL_DIR/${FALLBACK%%_*}" --timeout "$REST" >"$OUT/train_step_fallback.jsonl" 2>"$OUT/train_step_fallback.log"
  echo "fallback $FALLBACK exit $? ($(left) s left)" >&2
else
  echo "no time left for the fallback" >&2
fi
ls -la "$OUT" >&2
