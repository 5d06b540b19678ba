#!/usr/bin/env bash
# ditfleet on one node with torchrun: one process per GPU (NCCL), device cuda:LOCAL_RANK, rank 0
# reads the inputs (sparge checkpoint, I2V image) and writes the video + its JSON report.
#
#   launch/torchrun_single_node.sh CONFIG.json [NGPUS] [ditfleet generate options...]
#   launch/torchrun_single_node.sh configs/wan_t2v_1.3b.json 4 --set model_path=/ckpt/Wan2.1-T2V-1.3B-Diffusers --prompt "a red fox in snow" -o out/fox.mp4
#   CFG_P=2 launch/torchrun_single_node.sh configs/wan_t2v_14b.json 8 --set model_path=/ckpt/Wan2.1-T2V-14B-Diffusers  # 2 (cfg) x 4 (sequence)
#
# NGPUS defaults to every GPU of the node. The sequence-parallel degree is NGPUS / CFG_P (CFG_P=1
# or 2, default 1); the attention split comes from the config (parallel.seq_p_attn_type).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.json [NGPUS] [ditfleet generate options...]}
shift
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then NGPUS=$1; shift; else NGPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l); fi
if (( NGPUS < 1 )); then echo "no GPU visible (nvidia-smi); give NGPUS" >&2; exit 2; fi
CFG_P=${CFG_P:-1}
if (( NGPUS % CFG_P )); then echo "NGPUS=$NGPUS is not a multiple of CFG_P=$CFG_P" >&2; exit 2; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# --standalone: a rendezvous on a free local port (no clash with another run on the node).
exec torchrun --standalone --nproc-per-node "$NGPUS" -m ditfleet generate -c "$CONFIG" \
  --set parallel.cfg_p_size="$CFG_P" --set parallel.seq_p_size=$((NGPUS / CFG_P)) "$@"
