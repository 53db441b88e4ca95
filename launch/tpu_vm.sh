#!/usr/bin/env bash
# Textual inversion on a Cloud TPU VM (one host) or TPU pod slice (several hosts), from your machine.
#
#   TPU_NAME=ti-v4 ZONE=us-central2-b ACCELERATOR=v4-8 BUCKET=gs://my-bucket bash launch/tpu_vm.sh create
#   ... bash launch/tpu_vm.sh install     # clone this repository and pip install it on every worker
#   ... bash launch/tpu_vm.sh train       # start training on every worker (detached), follow worker 0's log
#   ... bash launch/tpu_vm.sh logs        # follow worker 0's log again
#   ... bash launch/tpu_vm.sh fetch       # copy the run from the bucket to ./runs/$RUN_NAME
#   ... bash launch/tpu_vm.sh delete
#
# Every worker runs the same `jax-inversion train`; `jax.distributed` finds the other workers
# through the TPU metadata server (runtime.initialize_distributed: JAX_DISTRIBUTED=auto), and each
# feeds its slice of the global batch. See launch/README.md for where the workdir lives and why.
set -euo pipefail

# ----------------------------------------------------------------------------- parameters
TPU_NAME=${TPU_NAME:-jax-inversion}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}                                  # "" = gcloud's default project
ACCELERATOR=${ACCELERATOR:-v4-8}                      # v4-8 / v5litepod-8 / v6e-8: one host; v4-16, v4-32 ...: several
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}       # runtime image (v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
SPOT=${SPOT:-0}                                       # 1: a Spot VM (preemptible; SIGTERM saves a checkpoint)
REPO_URL=${REPO_URL:-}                                # git URL of this repository (default: this checkout's origin)
REPO_REF=${REPO_REF:-}                                # branch / tag / commit to check out ("" = default branch)
PYTHON_VERSION=${PYTHON_VERSION:-3.11}                # the package needs >= 3.11 (the TPU images ship 3.10): uv installs it
BUCKET=${BUCKET:-}                                    # gs://bucket: runs go to $BUCKET/runs/$RUN_NAME
RUN_NAME=${RUN_NAME:-ti}
CONFIG=${CONFIG:-configs/ti.py}
MODEL=${MODEL:-}                                      # hub id, path on the workers, or gs://... (copied to every worker)
CONCEPT_DIR=${CONCEPT_DIR:-}                          # gs://... or a path on the workers ("" + MODEL "" = built-in demo)
NUM_STEPS=${NUM_STEPS:-3000}
BATCH_SIZE=${BATCH_SIZE:-32}                          # global batch: a multiple of the TPU chips (devices) in the slice
TRAIN_FLAGS=${TRAIN_FLAGS:-}                          # more flags, space separated, e.g. "--config.data.placeholder_token=<cat> --config.dtype=bfloat16"
WORKDIR_MODE=${WORKDIR_MODE:-bucket}                  # bucket (the workdir is $BUCKET/runs/$RUN_NAME itself) | sync | gcsfuse (older workarounds)
SYNC_SECONDS=${SYNC_SECONDS:-600}                     # sync mode only: copy the workdir to the bucket this often
FETCH_TO=${FETCH_TO:-runs/$RUN_NAME}                  # fetch: local destination
# ----------------------------------------------------------------------------- end of parameters

REMOTE_REPO=jax_inversion   # on the workers, under the ssh user's home
GCLOUD=(gcloud)
if [[ -n "$PROJECT" ]]; then GCLOUD+=(--project "$PROJECT"); fi

die() { echo "tpu_vm.sh: $*" >&2; exit 1; }

need_bucket() {
  [[ "$BUCKET" == gs://* ]] || die "set BUCKET=gs://your-bucket (runs are kept there)"
}

on_workers() {  # on_workers WORKER COMMAND: run COMMAND (one string) on worker WORKER (a number or all)
  "${GCLOUD[@]}" compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$1" --command "$2"
}

num_workers() {
  "${GCLOUD[@]}" compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" \
    --flatten='networkEndpoints[]' --format='value(networkEndpoints.ipAddress)' | wc -l
}

cmd_create() {
  local extra=()
  if [[ "$SPOT" == 1 ]]; then extra+=(--spot); fi
  "${GCLOUD[@]}" compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --version "$TPU_VERSION" "${extra[@]}"
  echo "created $TPU_NAME ($ACCELERATOR, $(num_workers) worker(s)); next: bash launch/tpu_vm.sh install"
}

cmd_install() {
  local url=$REPO_URL
  if [[ -z "$url" ]]; then
    url=$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null) || die "set REPO_URL=<git URL of this repository>"
  fi
  local checkout=""
  if [[ -n "$REPO_REF" ]]; then checkout="git -C $REMOTE_REPO checkout -q $(printf '%q' "$REPO_REF") && "; fi
  # uv brings a Python >= 3.11 (the images have 3.10) into a venv; gcsfuse is for multi-host workdirs.
  on_workers all "set -e
    cd ~
    if [ ! -d $REMOTE_REPO ]; then git clone -q $(printf '%q' "$url") $REMOTE_REPO; else git -C $REMOTE_REPO fetch -q; fi
    ${checkout}cd $REMOTE_REPO
    command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
    export PATH=\$HOME/.local/bin:\$PATH
    [ -d ~/venv ] || uv venv -q --python $PYTHON_VERSION ~/venv
    . ~/venv/bin/activate
    uv pip install -q -e '.[gcs]' 'jax[tpu]'
    if ! command -v gcsfuse >/dev/null; then
      echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -cs)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse
    fi
    jax-inversion --help >/dev/null && echo \"worker \$(hostname): installed\""
}

# The script every worker runs (detached), with this machine's parameters baked in.
worker_script() {
  local mode=$1 flags=()
  read -r -a flags <<< "$TRAIN_FLAGS"
  declare -p RUN_NAME BUCKET CONFIG MODEL CONCEPT_DIR NUM_STEPS BATCH_SIZE SYNC_SECONDS REMOTE_REPO flags
  echo "mode=$mode"
  cat <<'EOF'
set -euo pipefail
cd "$HOME/$REMOTE_REPO"
# shellcheck source=/dev/null
. ~/venv/bin/activate
run_url="$BUCKET/runs/$RUN_NAME"
worker=$(curl -s -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)

# Inputs on gs:// are copied to every worker (each reads its own local copy).
args=()
if [[ "$MODEL" == gs://* ]]; then
  mkdir -p ~/data/model && gsutil -m -q rsync -r "$MODEL" ~/data/model && args+=("--config.model=$HOME/data/model")
elif [[ -n "$MODEL" ]]; then args+=("--config.model=$MODEL"); fi
if [[ "$CONCEPT_DIR" == gs://* ]]; then
  mkdir -p ~/data/concept && gsutil -m -q rsync -r "$CONCEPT_DIR" ~/data/concept && args+=("--config.data.concept_dir=$HOME/data/concept")
elif [[ -n "$CONCEPT_DIR" ]]; then args+=("--config.data.concept_dir=$CONCEPT_DIR"); fi

sync_up() {  # workdir -> bucket (finished checkpoints only; Orbax's *.orbax-checkpoint-tmp* are in flight)
  gsutil -m -q rsync -r -d -x '.*orbax-checkpoint-tmp.*|.*\.write_test_.*' "$workdir" "$run_url" || echo "sync to $run_url failed (will retry)"
}

if [[ "$mode" == bucket ]]; then
  # The job writes to the bucket itself: Orbax/TensorStore natively, everything else through etils.epath
  # (gcsfs). Every host sees the same checkpoint directory; nothing to copy, no half-copied checkpoints.
  workdir="$run_url"
elif [[ "$mode" == gcsfuse ]]; then
  # Several hosts: Orbax needs every process to see one checkpoint directory, so the
  # workdir is the bucket itself, mounted at the same path on every worker.
  mount_point="$HOME/gcs"
  bucket_name=${BUCKET#gs://}; bucket_name=${bucket_name%%/*}
  prefix=${BUCKET#gs://"$bucket_name"}; prefix=${prefix#/}
  mkdir -p "$mount_point"
  mountpoint -q "$mount_point" || gcsfuse --implicit-dirs --rename-dir-limit=200000 "$bucket_name" "$mount_point"
  workdir="$mount_point/${prefix:+$prefix/}runs/$RUN_NAME"
  mkdir -p "$workdir"
else
  # One host: a local workdir (our metrics/config writers need a POSIX path), mirrored to the bucket.
  workdir="$HOME/runs/$RUN_NAME"
  mkdir -p "$workdir"
  if gsutil -q ls "$run_url/" >/dev/null 2>&1; then
    gsutil -m -q rsync -r "$run_url" "$workdir"   # a restarted VM resumes from the bucket's checkpoints
  fi
fi

export JAX_DISTRIBUTED=auto   # runtime.initialize_distributed: jax.distributed finds the workers itself
echo $$ > ~/train_"$RUN_NAME".pid
jax-inversion train --config "$CONFIG" --workdir "$workdir" \
  --config.train.num_steps="$NUM_STEPS" --config.train.batch_size="$BATCH_SIZE" \
  "${args[@]}" "${flags[@]}" &
train_pid=$!
trap 'kill -TERM "$train_pid" 2>/dev/null || true' TERM INT   # preemption: the run saves a checkpoint
if [[ "$mode" == sync && "$worker" == 0 ]]; then
  while kill -0 "$train_pid" 2>/dev/null; do
    for ((i = 0; i < SYNC_SECONDS; i++)); do kill -0 "$train_pid" 2>/dev/null || break; sleep 1; done
    sync_up
  done
fi
while true; do   # wait returns early when a signal is trapped: wait again until training has exited
  wait "$train_pid" && status=0 || status=$?
  kill -0 "$train_pid" 2>/dev/null || break
done
if [[ "$mode" == sync && "$worker" == 0 ]]; then sync_up; fi
echo "train exited with status $status; run in $run_url"
exit "$status"
EOF
}

cmd_train() {
  need_bucket
  local mode=$WORKDIR_MODE workers
  workers=$(num_workers)
  if [[ "$mode" == auto ]]; then mode=bucket; fi
  [[ "$mode" == bucket || "$mode" == sync || "$mode" == gcsfuse ]] || die "WORKDIR_MODE must be bucket, sync or gcsfuse"
  if [[ "$mode" == sync && "$workers" -gt 1 ]]; then
    die "WORKDIR_MODE=sync needs a one-host TPU ($TPU_NAME has $workers workers): Orbax waits forever when the hosts do not share the checkpoint directory; use WORKDIR_MODE=gcsfuse"
  fi
  local script
  script=$(mktemp)
  worker_script "$mode" > "$script"
  "${GCLOUD[@]}" compute tpus tpu-vm scp "$script" "$TPU_NAME:jax_inversion_train.sh" --zone "$ZONE" --worker=all
  rm -f "$script"
  # setsid + nohup: training goes on when this terminal or the ssh connection goes away.
  on_workers all "setsid nohup bash ~/jax_inversion_train.sh > ~/train_$RUN_NAME.log 2>&1 < /dev/null & echo worker \$(hostname): started"
  echo "training on $workers worker(s), workdir mode $mode, run $BUCKET/runs/$RUN_NAME; following worker 0's log (Ctrl-C stops following only)"
  cmd_logs
}

cmd_logs() {
  on_workers 0 "tail -n 50 -F ~/train_$RUN_NAME.log"
}

cmd_stop() {  # SIGTERM on every worker: each saves a checkpoint and exits
  on_workers all "kill -TERM \$(cat ~/train_$RUN_NAME.pid) && echo worker \$(hostname): stopping"
}

cmd_fetch() {
  need_bucket
  mkdir -p "$FETCH_TO"
  gsutil -m rsync -r -x 'xla_cache/.*|latents/.*|.*orbax-checkpoint-tmp.*' "$BUCKET/runs/$RUN_NAME" "$FETCH_TO"
  echo "fetched to $FETCH_TO: jax-inversion export --workdir $FETCH_TO --out $FETCH_TO/embeddings.safetensors"
}

cmd_delete() {
  "${GCLOUD[@]}" compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
}

case "${1:-}" in
  create) cmd_create ;;
  install) cmd_install ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  fetch) cmd_fetch ;;
  delete) cmd_delete ;;
  script) worker_script "${2:-bucket}" ;;   # print what the workers would run (for review)
  *) die "usage: [VAR=value ...] bash launch/tpu_vm.sh create|install|train|logs|stop|fetch|delete|script [sync|gcsfuse]" ;;
esac
