"""Sequence parallelism over a cfg x ring x ulysses mesh, for any attention backend.

Public API::

    from ditfleet.parallel import init_parallel, shard_sequence, gather_sequence, sequence_parallel_attention
    mesh = init_parallel(ulysses_size=4, ring_size=2)          # under torchrun, 8 processes; transport="auto"
    check_backend_for_mesh(backend, mesh)                      # at start-up: ConfigError if ring needs LSE
    q_l, shard = shard_sequence(q, mesh)                       # [B, S, H, D] -> local chunk + SeqShard
    out_l, _ = sequence_parallel_attention(q_l, k_l, v_l, backend=backend, mesh=mesh, shard=shard)
    out = gather_sequence(out_l, mesh, shard)
    # block-sparse (radial) attention: one mask over the global unpadded sequence, on every rank
    out_l, _ = sequence_parallel_attention(q_l, k_l, v_l, backend=radial, mesh=mesh, shard=shard, block_mask=mask)

This package imports no model code; it calls kernels only through ``ditfleet.attention``'s contract.
"""

from .attention import SEQ_P_ATTN_KEY, check_backend_for_mesh, cross_attention, sequence_parallel_attention
from .cfg import cfg_branch, cfg_combine, cfg_exchange, cfg_predict, cfg_select
from .merge import merge_attention, merge_attention_
from .mesh import MESH_AXES, DistEnv, ParallelMesh, init_distributed, init_parallel
from .ring import ring_attention
from .ring_schedule import RingSchedule, sp_schedule
from .shard import SeqShard, gather_sequence, shard_sequence
from .transport import TRANSPORTS, PeerError
from .ulysses import padded_heads, ulysses_attention

__all__ = [
    "MESH_AXES",
    "SEQ_P_ATTN_KEY",
    "DistEnv",
    "ParallelMesh",
    "PeerError",
    "RingSchedule",
    "SeqShard",
    "TRANSPORTS",
    "cfg_branch",
    "cfg_combine",
    "cfg_exchange",
    "cfg_predict",
    "cfg_select",
    "check_backend_for_mesh",
    "cross_attention",
    "gather_sequence",
    "init_distributed",
    "init_parallel",
    "merge_attention",
    "merge_attention_",
    "padded_heads",
    "ring_attention",
    "sequence_parallel_attention",
    "shard_sequence",
    "sp_schedule",
    "ulysses_attention",
]
