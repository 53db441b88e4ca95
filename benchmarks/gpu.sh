#!/usr/bin/env bash
# The GPU benchmark run, ready for a bare H200 machine without network (see shared/device/README.md).
# About 8 minutes in all (BUDGET_S, default 470 s); every stage has its own timeout and writes under
# $OUT, the most important first, at most 7 files, no folders (what the run tool brings back from $OUT:
# at most 8 files of 16 MiB, no deeper than 2 folders):
#   0. $OUT/env.txt         GPU, driver, python and package versions, jax's cuDNN, jax devices and default
#                           backend (the run stops here if jax is not on the GPU), the wheels' pip log
#   1. $OUT/train_step_sd15_512_b8.jsonl   the side-by-side TI step, SD1.5 512 px batch 8 bf16, one line
#                           each in this order: ours, torch_cached (the like-for-like row), torch (VAE every
#                           step), torch_compile (torch_cached under torch.compile), then the ratios
#                           ours_vs_torch_cached / ours_vs_torch / ours_vs_torch_compile (benchmarks/train_step.py)
#      $OUT/autotune.textproto  XLA's autotuning results for ours: a later run can start from them with
#                           XLA_FLAGS=--xla_gpu_load_autotune_results_from=autotune.textproto
#      $OUT/profile.tar.gz  3 steps of ours under jax.profiler.trace (plugins/profile/RUN/*.xplane.pb: unpack into a
#                           folder and open it with XProf or TensorBoard's profile plugin)
#   2. $OUT/attention_ab.jsonl   attention A/B at SD1.5 512 px batch 8 shapes, XLA vs cuDNN vs chunked, bf16,
#                           forward and forward+backward, each timed as a loop of calls inside one jit
#                           (benchmarks/attention_ab.py)
#   3. $OUT/train_step_fallback.jsonl  a smaller step (SD1.5 256 px batch 8, ours and torch_cached) if time remains
# Every stage's stderr goes to $OUT/stages.log, under a header line per stage.
#
# Before going to the machine (it has no pip index): bring diffusers, ml_collections and tensorboardX
# as wheels, kept out of git (.whl/ is in .gitignore and .git/info/exclude):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 ml_collections==1.1.0 tensorboardX==2.6.5
#
# and carry .whl with the run (run tool: carry=[".whl"]). On the machine this script installs them
# into /tmp/site (never `pip install -e .`: setup.py's lower bounds are above the machine's
# transformers/huggingface_hub/tokenizers; never the CPU torch wheel) and runs from source:
#
#   OUT=/some/dir bash benchmarks/gpu.sh            # on the H200
#   bash benchmarks/gpu.sh --cpu-smoke              # anywhere: tiny shapes, same stages, a few minutes on 2 cores
set -u
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
START=$(date +%s)
BUDGET=${BUDGET_S:-470}  # 8 minutes, less a margin for the copy back
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
OUT="${OUT:-/tmp/gpu_bench_out}"
mkdir -p "$OUT"
LOG="$OUT/stages.log"
: >"$LOG"
stage() { echo "== $1 ($(left) s left)" >>"$LOG"; }  # a header in stages.log before each stage's stderr
PROFILE_DIR="${PROFILE_DIR:-/tmp/gpu_bench_profile}"  # jax writes it 4 folders deep: packed into $OUT at the end
rm -rf "$PROFILE_DIR" /tmp/gpu_bench_pip.log
PY=python3
if [ "$SMOKE" = 0 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/tmp/gpu_bench_pip.log 2>&1 \
      || echo "pip install of .whl failed (see env.txt)" >&2
  else
    echo "no .whl/ wheels: diffusers, ml_collections and tensorboardX must already be importable" >&2
  fi
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
  # cuda must start (a platform listed here fails loudly, where a wheel shadowing the CUDA plugin would
  # otherwise leave jax silently on the CPU) and is the default; cpu is listed after it only so that
  # train_step can count FLOPs with XLA's CPU cost model (the CUDA plugin has none for lowered programs).
  export JAX_PLATFORMS=cuda,cpu
  CONFIG=sd15_512_b8; FALLBACK=sd15_256_b8; DTYPE=bfloat16; STEPS="--steps 10 --warmup 3"
  AB_ARGS="--backends xla,cudnn,chunked --dtype bfloat16 --steps 20"
  PER_IMPL=240  # seconds at most for one implementation of the train step
  TORCH_COMPILE=""
  AB_RESERVE=90  # seconds kept for the attention A/B after the train step
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export JAX_PLATFORMS=cpu
  CONFIG=small_32_b2; FALLBACK=small_32_b1; DTYPE=float32; STEPS="--steps 2 --warmup 3"
  AB_ARGS="--smoke --backends xla,chunked,cudnn --dtype bfloat16 --steps 3"
  PER_IMPL=150
  TORCH_COMPILE="--torch_compile_backend aot_eager"  # inductor's C++ code generation takes minutes on 2 cores
  AB_RESERVE=60
fi
MODEL_DIR="${MODEL_DIR:-/tmp/gpu_bench_models}"

# 0. environment
{
  date -u; uname -a; nproc; free -g 2>/dev/null | head -2
  nvidia-smi 2>&1 | head -20
  $PY --version
  echo "JAX_PLATFORMS=${JAX_PLATFORMS:-} XLA_FLAGS=${XLA_FLAGS:-}"
  [ -f /tmp/gpu_bench_pip.log ] && { echo "pip install of .whl:"; cat /tmp/gpu_bench_pip.log; }
  timeout 60 $PY - <<'EOF'
import importlib, jax
for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "ml_collections", "tensorboardX", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
print("devices", jax.devices())
print("default_backend", jax.default_backend())
d = jax.devices()[0]
print("device_kind", d.device_kind, "compute_capability", getattr(d, "compute_capability", None))
try:  # the CUDA plugin's version module (jax_cuda13_plugin._versions); None without one
    from jax._src.lib import cuda_versions
except ImportError:
    cuda_versions = None
def version(name):
    try:
        return getattr(cuda_versions, name)() if cuda_versions is not None else None
    except Exception as e:  # no GPU, or a name this jaxlib does not have
        return f"unavailable ({type(e).__name__})"
print("jax cudnn", version("cudnn_get_version"), "built with", version("cudnn_build_version"),
      "cuda runtime", version("cuda_runtime_get_version"))
from jax_inversion.core.platform import current_platform, resolve_dtype, select_attention_backend
p = current_platform()
print("platform", p, "dtype auto ->", resolve_dtype("auto").name,
      "attention auto (dtype auto) ->", select_attention_backend("auto", p, resolve_dtype("auto")))
try:
    import torch
    print("torch cuda", torch.cuda.is_available(), torch.version.cuda, "cudnn", torch.backends.cudnn.version())
except Exception as e:
    print("torch", e)
EOF
} >"$OUT/env.txt" 2>&1
echo "env done ($(left) s left)" >&2
if [ "$SMOKE" = 0 ] && ! grep -q "^default_backend gpu$" "$OUT/env.txt"; then
  echo "jax's default backend is not the GPU (see $OUT/env.txt): stopping" >&2
  exit 1
fi

# XLA's autotuning results of the train step, kept for the next run (an XLA that does not know the
# flag aborts at start-up, so it is tried on a trivial program first)
AUTOTUNE="--xla_gpu_dump_autotune_results_to=$OUT/autotune.textproto"
stage "XLA_FLAGS check: $AUTOTUNE"
if ! XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$AUTOTUNE" timeout 60 $PY -c "import jax.numpy as jnp; jnp.ones(2).block_until_ready()" \
    >>"$LOG" 2>&1; then
  echo "this XLA rejects $AUTOTUNE (see stages.log): no autotune dump" >&2
  AUTOTUNE=""
fi

# 1. the side-by-side step, the most important rows first
STAGE=$(( $(left) - AB_RESERVE ))
stage "train step $CONFIG"
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$AUTOTUNE" timeout $(( STAGE + 15 )) $PY -m benchmarks.train_step --configs "$CONFIG" \
  --impls ours,torch_cached,torch,torch_compile --dtype "$DTYPE" --attention_backend auto $STEPS \
  --model_dir "$MODEL_DIR/${CONFIG%%_*}" --timeout "$PER_IMPL" --budget "$STAGE" --profile_dir "$PROFILE_DIR" $TORCH_COMPILE \
  >"$OUT/train_step_$CONFIG.jsonl" 2>>"$LOG"
echo "train step $CONFIG exit $? ($(left) s left)" >&2

# 2. attention A/B
AB=$(( $(left) - 10 ))
[ "$AB" -gt 120 ] && AB=120
if [ "$AB" -gt 20 ]; then
  stage "attention A/B"
  timeout "$AB" $PY -m benchmarks.attention_ab $AB_ARGS >"$OUT/attention_ab.jsonl" 2>>"$LOG"
  echo "attention A/B exit $? ($(left) s left)" >&2
else
  echo "no time left for the attention A/B" >&2
fi

# 3. a smaller fallback, if time remains (same written weights)
REST=$(( $(left) - 10 ))
if [ "$REST" -gt 60 ]; then
  stage "fallback $FALLBACK"
  timeout $(( REST + 5 )) $PY -m benchmarks.train_step --configs "$FALLBACK" --impls ours,torch_cached --dtype "$DTYPE" \
    --attention_backend auto $STEPS --model_dir "$MODEL_DIR/${FALLBACK%%_*}" --budget "$REST" \
    >"$OUT/train_step_fallback.jsonl" 2>>"$LOG"
  echo "fallback $FALLBACK exit $? ($(left) s left)" >&2
else
  echo "no time left for the fallback" >&2
fi

# the profile as one file at the top of $OUT; without the trace.json.gz copy if too large, else dropped
if [ -d "$PROFILE_DIR" ]; then
  tar czf "$OUT/profile.tar.gz" -C "$PROFILE_DIR" .
  if [ "$(stat -c %s "$OUT/profile.tar.gz")" -gt 15000000 ]; then
    tar czf "$OUT/profile.tar.gz" -C "$PROFILE_DIR" --exclude='*.trace.json.gz' .
  fi
  if [ "$(stat -c %s "$OUT/profile.tar.gz")" -gt 15000000 ]; then
    echo "profile over 15 MB even without trace.json.gz: not kept" | tee -a "$LOG" >&2
    rm -f "$OUT/profile.tar.gz"
  fi
fi
ls -la "$OUT" >&2
