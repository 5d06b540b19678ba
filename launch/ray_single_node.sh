#!/usr/bin/env bash
# ditfleet on one node with Ray: the driver starts a local Ray cluster for the run (dashboard off),
# places one GPU actor per rank in a STRICT_PACK placement group, forms the NCCL group, runs, and
# stops everything at the end (also on Ctrl-C). Start-up stages are timed in the run report.
#
#   launch/ray_single_node.sh CONFIG.json [NGPUS] [ditfleet generate options...]
#   launch/ray_single_node.sh configs/wan_t2v_1.3b.json 4 --set model_path=/ckpt/Wan2.1-T2V-1.3B-Diffusers --jobs prompts.jsonl   # model loaded once
#
# To reuse a cluster already running on the node (`ray start --head --include-dashboard=false`),
# export RAY_ADDRESS=auto (or pass --set ray.address=auto). Faults: a dead or hung worker is
# retried on a rebuilt group (ray.max_retries, ray.request_timeout_s), then exit status 1.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.json [NGPUS] [ditfleet generate options...]}
shift
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then NGPUS=$1; shift; else NGPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l); fi
if (( NGPUS < 1 )); then echo "no GPU visible (nvidia-smi); give NGPUS" >&2; exit 2; fi
CFG_P=${CFG_P:-1}
if (( NGPUS % CFG_P )); then echo "NGPUS=$NGPUS is not a multiple of CFG_P=$CFG_P" >&2; exit 2; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec python -m ditfleet generate -c "$CONFIG" --launcher ray \
  --set parallel.cfg_p_size="$CFG_P" --set parallel.seq_p_size=$((NGPUS / CFG_P)) "$@"
