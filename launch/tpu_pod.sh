#!/usr/bin/env bash
# Train oasst_jax on a Cloud TPU VM pod slice with the gcloud `--worker=all` pattern:
# copy this checkout to every worker, install, pretokenize once (worker 0), then start the
# trainer on every worker at once (one process per TPU VM host; the processes find each other
# through the TPU metadata: --config.distributed.mode=cluster).
#
# Edit the block below, then run from the repository root:
#   bash launch/tpu_pod.sh            # copy + install + data + train
#   bash launch/tpu_pod.sh train      # one phase: copy | install | data | train
set -euo pipefail

# ---- edit me (or set in the environment) -----------------------------------------------
# made with: gcloud compute tpus tpu-vm create NAME --accelerator-type=v5p-64 ...
TPU_NAME=${TPU_NAME:-oasst-v5p-64}
ZONE=${ZONE:-us-east5-a}
PROJECT=${PROJECT:-my-gcp-project}
STAGE=${STAGE:-pre10}  # pre10 = stage 1 (oasst_pre10_min25), sft10 = stage 2 (oasst_top1)
# mounted on every worker (Filestore NFS, gcsfuse): data, runs, tokenizer
SHARED=${SHARED:-/mnt/shared}
TOKENIZER=${TOKENIZER:-$SHARED/llama2/tokenizer.model}
RAW=${RAW:-$SHARED/raw}  # the upstream dataset files (README: Pipeline)
# `convert hf-to-orbax --add-chatml-tokens --megatron-new-tokens` (the card's 32007-token layout)
BASE_MODEL=${BASE_MODEL:-$SHARED/checkpoints/llama2-70b-chatml}
EXTRA_TRAIN_ARGS=${EXTRA_TRAIN_ARGS:-""}  # more --config.* overrides, e.g. "--config.mesh.fsdp=2"
JAX_VERSION=${JAX_VERSION:-0.10.2}
# ---------------------------------------------------------------------------------------------

REMOTE_DIR=oasst_jax
case "$STAGE" in
  pre10)
    DATA_CONFIG=configs/data/oasst_pre10_min25.py
    DATA_DIR=$SHARED/data/oasst_pre10_min25
    # (the remote shell strips one level of quotes: the orca-chat key keeps its own)
    DATA_ARGS="--config.datasets.megacode2.path=$RAW/DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json \
\"--config.datasets['orca-chat'].path=$RAW/orca-chat-gpt4.json\" \
--config.datasets.dolly15k_multilingual.path=$RAW/databricks-dolly-15k-curated-multilingual \
--config.datasets.oa_leet10k.path=$RAW/oa_leet10k.parquet"
    LOAD=$BASE_MODEL
    ;;
  sft10)
    DATA_CONFIG=configs/data/oasst_top1.py
    DATA_DIR=$SHARED/data/oasst_top1_2023-07-23
    DATA_ARGS="--config.datasets.oasst_export.input_file_path=$RAW/2023-07-23_oasst_ready.tar.gz"
    LOAD=$SHARED/runs/pre10/checkpoints
    ;;
  *)
    echo "STAGE must be pre10 or sft10, got '$STAGE'" >&2
    exit 2
    ;;
esac

# Run a command on the given worker(s) ("all" or an index), inside the copied checkout.
on_workers() {
  local workers=$1 command=$2
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker="$workers" --command="cd $REMOTE_DIR && $command"
}

copy() {
  gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --project="$PROJECT" --worker=all \
    oasst_jax configs launch setup.cfg pyproject.toml README.md "$TPU_NAME:$REMOTE_DIR"
}

install() {
  on_workers all "python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==$JAX_VERSION'"
}

data() {
  # Once, on worker 0: the shards land on the shared mount, every worker reads them.
  on_workers 0 ".venv/bin/python -m oasst_jax.pretokenize --config=$DATA_CONFIG \
--config.output_dir=$DATA_DIR --config.tokenizer_path=$TOKENIZER $DATA_ARGS"
}

train() {
  # All workers at once; stop with Ctrl-C here, or resume later by running this phase again.
  on_workers all ".venv/bin/python -m oasst_jax.train --config=configs/$STAGE.py \
--config.distributed.mode=cluster --config.workdir=$SHARED/runs/$STAGE \
--config.data_path=$DATA_DIR --config.tokenizer_path=$TOKENIZER --config.load=$LOAD \
$EXTRA_TRAIN_ARGS"
}

phase=${1:-all}
case "$phase" in
  copy | install | data | train) "$phase" ;;
  all) copy && install && data && train ;;
  *)
    echo "usage: $0 [copy|install|data|train|all]" >&2
    exit 2
    ;;
esac
