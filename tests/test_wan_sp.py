"""Sequence-parallel Wan DiT forward under gloo (2 and 4 CPU ranks) vs the single-process forward.

Every rank builds the same tiny random I2V model (same seed), runs the plain forward as the
reference, then the same forward with the mesh set (Ulysses, ring, USP), for a token count that
divides the SP degree and one that does not (padding at the end, padded keys excluded). fp32 rel
L2 <= 1e-5, and every rank must hold the same gathered output. One spawn per world size.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from ditfleet.bench.common import rel_l2

TOL = 1e-5
# (F, H, W) latent -> (F, H/2, W/2) tokens: 2*2*4 = 16 divides 2 and 4; 3*3*5 = 45 divides neither.
SHAPES = {"divides": (2, 4, 8), "pads": (3, 6, 10)}
LAYOUTS = {2: {"ulysses": (2, 1), "ring": (1, 2)}, 4: {"ulysses": (4, 1), "ring": (1, 4), "usp": (2, 2)}}


def tiny_config(model_type: str = "i2v"):
    from ditfleet.models.wan import WanDiTConfig

    # 3 heads: Ulysses over 2 or 4 ranks pads the head dim of the all-to-all too.
    return WanDiTConfig(model_type=model_type, in_dim=36 if model_type == "i2v" else 16, dim=48, ffn_dim=64,
                        num_heads=3, num_layers=2, text_dim=32, text_len=16, freq_dim=32, image_dim=24)


def inputs(cfg, shape, seed: int = 1, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = shape
    inp = {
        "x": torch.randn(batch, 16, f, h, w, generator=g),
        "t": torch.tensor([999.0, 321.5][:batch]),
        "context": torch.randn(batch, 11, cfg.text_dim, generator=g),  # 11 < text_len: zero-padded inside
    }
    if cfg.has_image_branch:
        inp["clip_fea"] = torch.randn(batch, 257, cfg.image_dim, generator=g)
        inp["y"] = torch.randn(batch, cfg.in_dim - 16, f, h, w, generator=g)
    return inp


def _sp_world(rank: int, world: int) -> list[tuple[str, str, str, float, float]]:
    from ditfleet.models.wan import build_dit
    from ditfleet.parallel import init_parallel

    meshes = {name: init_parallel(ulysses_size=u, ring_size=r) for name, (u, r) in LAYOUTS[world].items()}
    results = []
    for model_type in ("i2v", "t2v"):
        cfg = tiny_config(model_type)
        model = build_dit(cfg, device="cpu", dtype=torch.float32, seed=0, std=0.1)
        for shape_name, shape in SHAPES.items():
            inp = inputs(cfg, shape)
            with torch.no_grad():
                model.set_parallel(None)
                ref = model(**inp)
                for name, mesh in meshes.items():
                    model.set_parallel(mesh)
                    out = model(**inp)
                    assert out.shape == ref.shape and out.dtype == torch.float32
                    results.append((model_type, shape_name, name, rel_l2(out, ref), float(out.double().sum())))
    return results


def _check(per_rank: list[list[tuple]], world: int) -> None:
    first = per_rank[0]
    assert len(first) == 2 * len(SHAPES) * len(LAYOUTS[world])
    for model_type, shape_name, layout, err, _ in first:
        assert err <= TOL, f"{world} ranks {layout} {model_type} {shape_name}: rel L2 {err:.2e} > {TOL}"
    for rank, res in enumerate(per_rank[1:], start=1):
        for a, b in zip(first, res):
            assert a[:3] == b[:3] and a[4] == b[4], f"rank {rank} gathered a different output for {a[:3]}"
    print(f"\n{world} ranks: " + ", ".join(f"{m}/{s}/{l} {e:.1e}" for m, s, l, e, _ in first))


@pytest.mark.parametrize("world", [2, 4])
def test_wan_sequence_parallel_matches_single_process(world):
    _check(run_distributed(_sp_world, world, timeout=300), world)


def test_wan_split_plan_declared():
    from ditfleet.models.sp import SeqParallel
    from ditfleet.models.wan import WanDiT

    plan = WanDiT.sp_plan
    assert plan.split == {"tokens": 1, "rope_cos": 0, "rope_sin": 0} and plan.gather == {"out": 1}
    sp = SeqParallel(plan)  # no mesh: identity
    t = torch.randn(1, 5, 4)
    local, shard = sp.split(tokens=t, rope_cos=t[0], rope_sin=t[0])
    assert shard is None and local["tokens"] is t
    with pytest.raises(ValueError, match="plan declares"):
        sp.split(tokens=t)


def test_wan_ring_needs_lse_kernel():
    """A self-attention kernel without LSE is refused at set-up for a ring mesh (not mid-forward)."""
    from ditfleet.attention import Capabilities
    from ditfleet.attention.sdpa import SdpaCpuFlash
    from ditfleet.errors import ConfigError
    from ditfleet.models.wan import SELF_SITE, TEXT_SITE, build_dit
    from ditfleet.parallel import ParallelMesh

    class NoLse(SdpaCpuFlash):
        key = "no_lse_wan_test"
        caps = Capabilities(lse=False, devices=frozenset({"cpu"}), dtypes=SdpaCpuFlash.caps.dtypes)

    model = build_dit(tiny_config("t2v"), device="cpu", dtype=torch.float32)
    model.set_parallel(ParallelMesh(ring_size=2, world_size=2))  # sizes only: enough for the check
    backend = NoLse(device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="LSE"):
        model.set_attention({SELF_SITE: backend, TEXT_SITE: backend})
