#!/usr/bin/env bash
# ditfleet as a job on an existing Ray cluster (`ray job submit`): the job's driver runs on the
# head node, joins the cluster (RAY_ADDRESS is set for it), places one GPU actor per rank (PACK
# across nodes when one node cannot hold them all) and writes the video where the driver runs.
#
#   launch/ray_job_submit.sh CONFIG.json NGPUS [ditfleet generate options...]
#   launch/ray_job_submit.sh configs/wan_t2v_14b.json 16 --set model_path=/shared/Wan2.1-T2V-14B-Diffusers -o /shared/out/video.mp4
#
# Needs: the cluster's nodes have torch, diffusers and transformers installed (same versions); the
# repository is shipped as the job's working_dir (launch/ray_runtime_env.json), so actors on every
# node import this checkout of ditfleet. model_path must exist on every GPU node (shared storage
# or the same path); the sparge checkpoint (sparge_ckpt) only where the driver runs -- the workers
# receive it through the object store. Write outputs to shared storage to see them off the head.
#
# Job submission goes through the head's dashboard port. ditfleet's own clusters keep the
# dashboard on 127.0.0.1: submit on the head, or tunnel first:  ssh -N -L 8265:127.0.0.1:8265 HEAD
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.json NGPUS [ditfleet generate options...]}
NGPUS=${2:?usage: $0 CONFIG.json NGPUS [ditfleet generate options...]}
shift 2
CFG_P=${CFG_P:-1}
ADDRESS=${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}
cd "$(dirname "$0")/.."
exec ray job submit --address "$ADDRESS" --runtime-env-json "$(cat launch/ray_runtime_env.json)" -- \
  python -m ditfleet generate -c "$CONFIG" --launcher ray \
  --set parallel.cfg_p_size="$CFG_P" --set parallel.seq_p_size=$((NGPUS / CFG_P)) "$@"
