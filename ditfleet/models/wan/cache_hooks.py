"""How a Wan DiT takes part in step caching (:mod:`ditfleet.models.step_cache`), and the published constants.

:class:`WanStagedForward` splits one :class:`~ditfleet.models.wan.dit.WanDiT` forward with its public pieces
(``prepare`` / ``blocks`` / ``finish``): the blocks run in the order and with the arguments of
``WanDiT.forward``, and a computed step ends in ``finish(h, step, carry)`` exactly as the forward does, so a
step that is not skipped is bit-for-bit the uncached forward. Block outputs keep their deferred FFN residual
(``carry``); :meth:`WanStagedForward.stream` materialises ``x + ffn * gate`` in float32 when a cache needs it.

TeaCache's statistic for Wan is the time embedding, as TeaCache4Wan2.1 and LightX2V compute it:
``e`` (``[B, C]``), or ``e0`` (``[B, 6, C]``, block modulation) with ``use_ret_steps``. It is the same on every
SP rank, so it needs no reduction; with per-token timesteps (``e`` ``[B, S_local, C]``) it is this rank's tokens
and is reduced over the SP group, as FirstBlock's per-token statistic always is.

Constants (published, Wan2.1 only -- other families must give their own):

* TeaCache rescaling polynomials, from TeaCache4Wan2.1 (``teacache_generate.py``; LightX2V ships the same in
  ``configs/caching/teacache``): T2V 1.3B and 14B, I2V 14B 480P and 720P, each plain and retention-steps.
* MagCache magnitude ratios, from MagCache4Wan2.1 (``magcache_generate.py``; LightX2V's
  ``configs/caching/magcache`` hold the 1.3B and I2V 480P ones): T2V 1.3B and 14B at 50 steps, I2V 14B 480P and
  720P at 40 steps, one list per CFG branch (resampled to the run's steps by nearest index).
"""

from __future__ import annotations

import torch

from ..step_cache import StagedForward
from .dit import TokenRows

# (model size, task[, resolution]) -> (retention-steps polynomial, plain polynomial), highest power first.
TEACACHE_COEFFICIENTS = {
    ("1.3B", "t2v"): ((-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
                      (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01)),
    ("14B", "t2v"): ((-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
                     (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)),
    ("14B", "i2v", "480p"): ((2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
                             (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01)),
    ("14B", "i2v", "720p"): ((8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
                             (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683)),
}

# MagCache4Wan2.1's ratios, interleaved per step as published ([1.0] * 2 + [cond_1, uncond_1, cond_2, ...]).
_MAG_T2V_1_3B = [1.0] * 2 + [
    1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634, 0.99685, 0.99567, 0.99586,
    0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506, 0.99535, 0.99531, 0.99552, 0.99549,
    0.99541, 0.99539, 0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481, 0.99479,
    0.99415, 0.99413, 0.99419, 0.99416, 0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304,
    0.9927, 0.9927, 0.99228, 0.99226, 0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003,
    0.98944, 0.98942, 0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836, 0.98359,
    0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741, 0.97411, 0.97003, 0.97002, 0.96538, 0.96541,
    0.9593, 0.95933, 0.95086, 0.95089, 0.94013, 0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868,
    0.81838, 0.81939]
_MAG_T2V_14B = [1.0] * 2 + [
    1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966, 0.99658, 0.99482, 0.99476,
    0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545, 0.99468, 0.99465, 0.99438, 0.99434,
    0.99516, 0.99517, 0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428, 0.99426,
    0.99347, 0.99343, 0.99418, 0.99416, 0.99271, 0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218, 0.99215,
    0.99216, 0.99217, 0.99163, 0.99161, 0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866,
    0.98772, 0.9877, 0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177, 0.98173,
    0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184, 0.97183, 0.96711, 0.96708, 0.96349, 0.96345,
    0.95629, 0.95625, 0.94926, 0.94929, 0.93964, 0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945,
    0.86111, 0.86189]
_MAG_I2V_480P = [1.0] * 2 + [
    0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878, 0.98762, 0.98759,
    0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886, 0.99065, 0.99068, 0.98845, 0.98847,
    0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823, 0.98756, 0.98759, 0.98808, 0.98814,
    0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157, 0.98165, 0.98411, 0.98413, 0.97952, 0.97953,
    0.98149, 0.9815, 0.9774, 0.97742, 0.97825, 0.97826, 0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055,
    0.96588, 0.96587, 0.96113, 0.96124, 0.9567, 0.95681, 0.94961, 0.94969, 0.93973, 0.93988, 0.93217, 0.93224,
    0.91878, 0.91896, 0.90955, 0.90954, 0.92617, 0.92616]
_MAG_I2V_720P = [1.0] * 2 + [
    0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917, 0.98646, 0.98652,
    0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103, 0.99215, 0.99212, 0.99515, 0.99515,
    0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097, 0.99166, 0.99169, 0.99041, 0.99042, 0.99201, 0.99198,
    0.99101, 0.99101, 0.98599, 0.98603, 0.98845, 0.98844, 0.98848, 0.98851, 0.98862, 0.98857, 0.98718, 0.98719,
    0.98497, 0.98497, 0.98264, 0.98263, 0.98389, 0.98393, 0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499,
    0.973, 0.97301, 0.96827, 0.96828, 0.96261, 0.96263, 0.95335, 0.9534, 0.94649, 0.94655, 0.93397, 0.93414,
    0.91636, 0.9165, 0.89088, 0.89109, 0.8679, 0.86768]


def _split(interleaved: list[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(interleaved[0::2]), tuple(interleaved[1::2])


MAGCACHE_RATIOS = {
    ("1.3B", "t2v"): _split(_MAG_T2V_1_3B),
    ("14B", "t2v"): _split(_MAG_T2V_14B),
    ("14B", "i2v", "480p"): _split(_MAG_I2V_480P),
    ("14B", "i2v", "720p"): _split(_MAG_I2V_720P),
}


def published_key(config, family: str | None, height: int, width: int) -> tuple | None:
    """The key of the published constants for a Wan2.1 DiT of ``config`` at ``height x width`` pixels, or
    ``None`` (another family, size or model type: the user gives ``coefficients`` / ``magcache_ratios``).

    Sizes by shape: 1.3B = dim 1536 x 30 layers, 14B = dim 5120 x 40 layers. I2V: 720p when the shorter side is
    at least 720 pixels, else 480p (LightX2V picks by ``target_height`` / ``target_width`` too).
    """
    if family not in (None, "wan2.1"):
        return None
    size = {(1536, 30): "1.3B", (5120, 40): "14B"}.get((config.dim, config.num_layers))
    if size is None or config.model_type not in ("t2v", "i2v"):
        return None
    if config.model_type == "t2v":
        return (size, "t2v")
    return (size, "i2v", "720p" if min(height, width) >= 720 else "480p")


def published_coefficients(config, family: str | None, height: int, width: int, use_ret_steps: bool):
    """TeaCache's published polynomial (highest power first) for this model and resolution, or ``None``."""
    pair = TEACACHE_COEFFICIENTS.get(published_key(config, family, height, width))
    return None if pair is None else pair[0 if use_ret_steps else 1]


def published_mag_ratios(config, family: str | None, height: int, width: int):
    """MagCache's published ``(cond, uncond)`` ratios for this model and resolution, or ``None``."""
    return MAGCACHE_RATIOS.get(published_key(config, family, height, width))


class WanStagedForward(StagedForward):
    """One :class:`~ditfleet.models.wan.dit.WanDiT` forward as a :class:`~ditfleet.models.step_cache.StagedForward`.

    Args:
        dit: the model.
        x, t, context, clip_fea, y: as :meth:`WanDiT.forward` (``t`` ``[B]``).

    ``prepare`` runs at construction (embeddings, RoPE, the sequence split, each block's attention plan).
    """

    def __init__(self, dit, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea=None, y=None):
        self.dit = dit
        self.step = dit.prepare(x, t, context, clip_fea, y)
        self.tokens = self.step.tokens
        shard = self.step.shard
        self.rows = None if shard is None else shard.local_valid
        self.num_blocks = len(dit.blocks)

    def tea_input(self, use_ret_steps: bool) -> tuple[torch.Tensor, bool]:
        inp = self.step.e0 if use_ret_steps else self.step.e
        # one timestep per sample: e [B, C], e0 [B, 6, C], the same on every rank; per-token timesteps (TokenRows)
        # give each token its row (e [B, S_local, C], e0 [B, S_local, 6, C]): this rank's tokens, reduced over the group
        if isinstance(inp, TokenRows):
            return inp.take(), True
        return inp, False

    def run(self, start: int, stop: int, state):
        h, carry = (self.tokens, None) if state is None else state
        for i in range(start, stop):
            h, carry = self.dit.blocks[i](h, carry, *self.step.args_for(i))
        return h, carry

    def stream(self, state) -> torch.Tensor:
        h, carry = state
        return h if carry is None else torch.addcmul(h, carry[0].float(), carry[1])

    def finish(self, state) -> torch.Tensor:
        h, carry = state
        return self.dit.finish(h, self.step, carry)

    def finish_stream(self, stream: torch.Tensor) -> torch.Tensor:
        return self.dit.finish(stream, self.step, None)
