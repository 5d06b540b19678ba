"""Step caching (``feature_caching``): skip a denoising step's transformer blocks and reuse their last residual.

A DiT forward is ``tokens -> blocks -> head``. When consecutive steps change the blocks' output little, a
step may add the residual ``blocks(tokens) - tokens`` cached at the last computed step to its own tokens
instead of running the blocks. Three rules decide when (names and defaults as LightX2V's):

* ``Tea`` (TeaCache): accumulate ``poly(rel_l1(m_t, m_prev))`` -- ``rel_l1(a, b) = mean|a - b| / mean|b|``
  of the timestep-modulated input ``m`` (what the model adapter gives: Wan's time embedding), rescaled by a
  fitted polynomial ``poly`` (``coefficients``, highest power first) -- and skip while the sum stays below
  ``teacache_thresh``; a computed step resets it. The first ``first_steps`` and the last ``last_steps``
  steps are always computed.
* ``Mag`` (MagCache): a calibrated per-step magnitude ratio ``gamma_t`` of the residual (``magcache_ratios``,
  one list per CFG branch); from step ``int(steps * retention_ratio)`` on, accumulate
  ``ratio *= gamma_t``, ``err += |1 - ratio|`` and skip while ``err < magcache_thresh`` and at most
  ``magcache_K`` steps in a row; a computed step resets the three.
* ``FirstBlock``: always run block 0; skip the other blocks (reuse their residual) while
  ``rel_l1(r0_t, r0_prev) < residual_diff_threshold`` for the first block's residual ``r0`` (every
  ``downsample_factor``-th channel).

A threshold of 0 never skips (every step computed: bit-for-bit the uncached forward). State is kept per
CFG branch (and per expert of a two-expert model): the conditional and unconditional passes each decide and
cache for themselves, also under cfg-parallel, where each cfg rank holds one branch.

Sequence parallelism: a statistic over tokens is formed from global sums -- each rank sums its valid
tokens (``float64``), the numerator and denominator are all-reduced over the SP group (:func:`sp_sum`),
and every rank divides the same two numbers -- so every rank of a branch takes the same decision, whatever
its own tokens say. The cached residual is the rank's own token chunk, on the tokens' device.

The model side is a :class:`StagedForward` (one forward split into ``run(blocks) / stream / finish``);
:func:`cached_forward` drives it. This module knows no model (:mod:`ditfleet.models.wan.cache_hooks`
adapts the Wan DiT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ConfigError

METHODS = ("none", "Tea", "Mag", "FirstBlock")
OFF = ("none", "NoCaching", "None")  # accepted spellings of "no caching" (LightX2V: NoCaching)
COND, UNCOND = 0, 1
BRANCH_NAMES = {COND: "cond", UNCOND: "uncond"}


@dataclass(frozen=True)
class StepCacheSettings:
    """The caching rule of a run (the ``feature_caching`` keys of the config, resolved).

    Attributes:
        method: ``"none"``, ``"Tea"``, ``"Mag"`` or ``"FirstBlock"``.
        teacache_thresh: Tea: skip while the accumulated rescaled relative L1 stays below it (0: never skip).
        use_ret_steps: Tea: Wan's "retention steps" variant (statistic on the projected time embedding ``e0``
            instead of ``e``, its own coefficients, 5 first steps always computed, no last one).
        coefficients: Tea: the rescaling polynomial, highest power first; ``None``: the model's published one.
        first_steps: Tea: steps always computed at the start; ``None``: 5 with ``use_ret_steps``, else 1.
        last_steps: Tea: steps always computed at the end; ``None``: 0 with ``use_ret_steps``, else 1.
        magcache_thresh: Mag: skip while the accumulated error stays below it (0: never skip).
        magcache_K: Mag: most steps skipped in a row.
        magcache_retention_ratio: Mag: the first ``int(steps * ratio)`` steps are always computed.
        magcache_ratios: Mag: ``(cond ratios, uncond ratios)`` per step (resampled to the run's steps by
            nearest index); ``None``: the model's published ones.
        residual_diff_threshold: FirstBlock: skip while the first block's residual changed by less (0: never).
        downsample_factor: FirstBlock: compare every n-th channel of that residual.
    """

    method: str = "none"
    teacache_thresh: float = 0.26
    use_ret_steps: bool = False
    coefficients: tuple[float, ...] | None = None
    first_steps: int | None = None
    last_steps: int | None = None
    magcache_thresh: float = 0.12
    magcache_K: int = 4
    magcache_retention_ratio: float = 0.2
    magcache_ratios: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    residual_diff_threshold: float = 0.02
    downsample_factor: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("feature_caching", f"{self.method!r} is not a caching method; valid: {', '.join(METHODS)} "
                                                 "(or NoCaching)")

    @property
    def active(self) -> bool:
        return self.method != "none"

    @classmethod
    def from_config(cls, cfg: Any) -> StepCacheSettings:
        """The settings of a :class:`~ditfleet.config.RunConfig` (its ``feature_caching`` keys)."""
        method = "none" if cfg.feature_caching in OFF else cfg.feature_caching
        coeffs = None
        if cfg.coefficients is not None:  # LightX2V's form: [retention-steps polynomial, plain polynomial]
            coeffs = tuple(float(c) for c in cfg.coefficients[0 if cfg.use_ret_steps else 1])
        ratios = None if cfg.magcache_ratios is None else tuple(tuple(float(r) for r in row) for row in cfg.magcache_ratios)
        return cls(method=method, teacache_thresh=cfg.teacache_thresh, use_ret_steps=cfg.use_ret_steps,
                   coefficients=coeffs, first_steps=cfg.teacache_first_steps, last_steps=cfg.teacache_last_steps,
                   magcache_thresh=cfg.magcache_thresh, magcache_K=cfg.magcache_K,
                   magcache_retention_ratio=cfg.magcache_retention_ratio, magcache_ratios=ratios,
                   residual_diff_threshold=cfg.residual_diff_threshold, downsample_factor=cfg.downsample_factor)

    def tea_first(self) -> int:
        return (5 if self.use_ret_steps else 1) if self.first_steps is None else self.first_steps

    def tea_last(self) -> int:
        return (0 if self.use_ret_steps else 1) if self.last_steps is None else self.last_steps

    def describe(self) -> dict:
        m = self.method
        if m == "Tea":
            return {"teacache_thresh": self.teacache_thresh, "use_ret_steps": self.use_ret_steps,
                    "first_steps": self.tea_first(), "last_steps": self.tea_last()}
        if m == "Mag":
            return {"magcache_thresh": self.magcache_thresh, "magcache_K": self.magcache_K,
                    "magcache_retention_ratio": self.magcache_retention_ratio}
        if m == "FirstBlock":
            return {"residual_diff_threshold": self.residual_diff_threshold, "downsample_factor": self.downsample_factor}
        return {}


def run_constants(settings: StepCacheSettings, config, family: str | None, published: tuple | None) -> tuple:
    """``(Tea polynomial, Mag ratios)`` of a run: the settings' own, else ``published`` (the model's published
    ``(polynomial, ratios)`` at the run's size, either ``None``; ``published`` itself ``None`` when the model
    publishes nothing).

    Raises:
        ConfigError: naming ``coefficients`` (Tea) or ``magcache_ratios`` (Mag) when the rule needs them and neither
            the settings nor the model have them (``config``: the DiT config, for the message).
    """
    from ..errors import ConfigError

    pub_coeffs, pub_ratios = published or (None, None)
    c = config

    def missing(key: str, what: str, shape: str) -> ConfigError:
        image = getattr(c, "has_image_branch", False) or getattr(c, "in_dim", 0) > getattr(c, "out_dim", 0)
        kind = "i2v" if image else getattr(c, "model_type", "")  # Wan2.2 A14B I2V's config reads as t2v
        return ConfigError(key, f"{settings.method} needs {what}: none is published for a {family or 'wan2.1'} {kind} "
                                f"DiT of dim {c.dim} x {c.num_layers} layers (published: Wan2.1 T2V 1.3B / 14B, I2V 14B "
                                f"480p / 720p); give {key} as {shape}")

    coeffs = ratios = None
    if settings.method == "Tea":
        coeffs = settings.coefficients or pub_coeffs
        if not coeffs:
            raise missing("coefficients", "the TeaCache polynomial of this model",
                          "[[retention-steps polynomial], [plain polynomial]], highest power first")
    if settings.method == "Mag":
        ratios = settings.magcache_ratios or pub_ratios
        if not ratios:
            raise missing("magcache_ratios", "calibrated magnitude ratios", "[[cond per step], [uncond per step]]")
    return coeffs, ratios


def nearest_resample(values: Sequence[float], n: int) -> list[float]:
    """``values`` at ``n`` evenly spread positions, nearest index (MagCache's interpolation of its ratios)."""
    values = list(values)
    if n == len(values):
        return values
    if n == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (n - 1)
    return [values[int(i)] for i in np.round(np.arange(n) * scale).astype(int)]


def sp_sum(mesh) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``f(t)``: the sum of ``t`` over the SP group of ``mesh`` (every rank gets the same tensor), or ``None``
    without sequence parallelism. Each wait on the peers is bounded by the mesh's ``timeout_s``."""
    if mesh is None or mesh.sp_size == 1:
        return None
    import torch.distributed as dist

    from ..parallel.transport import bounded, peer_wait

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        with peer_wait("step cache statistic", mesh.peers("sp"), mesh.timeout_s):
            bounded(dist.all_reduce(t, group=mesh.group("sp"), async_op=True), t, mesh.timeout_s)
        return t

    return reduce


class StagedForward(Protocol):
    """One model forward split where a step cache needs it (built by a model adapter per call).

    Attributes:
        tokens: float32 ``[B, S_local, C]`` residual stream entering the blocks (this rank's chunk under SP).
        rows: valid (non-padding) tokens of ``tokens`` when the sequence is split over an SP group, else
            ``None`` (every row, no reduction).
        num_blocks: blocks of the model.
    """

    tokens: torch.Tensor
    rows: int | None
    num_blocks: int

    def tea_input(self, use_ret_steps: bool) -> tuple[torch.Tensor, bool]:
        """TeaCache's timestep-modulated input and whether it is split over the SP group (per token)."""

    def run(self, start: int, stop: int, state: Any) -> Any:
        """Run blocks ``[start, stop)`` from ``state`` (``None``: from :attr:`tokens`); returns the new state."""

    def stream(self, state: Any) -> torch.Tensor:
        """The float32 ``[B, S_local, C]`` residual stream a state stands for."""

    def finish(self, state: Any) -> torch.Tensor:
        """The output from a block state (exactly what the uncached forward computes)."""

    def finish_stream(self, stream: torch.Tensor) -> torch.Tensor:
        """The output from a residual stream (a skipped step)."""


@dataclass
class BranchCache:
    """What one CFG branch (of one expert) carries from step to step."""

    residual: torch.Tensor | None = None  # float32 [B, S_local, C] added on a skipped step, tokens' device
    prev: torch.Tensor | None = None  # Tea: last modulated input; FirstBlock: last first-block residual
    acc: float = 0.0  # Tea: accumulated rescaled distance; Mag: accumulated error
    mag_ratio: float = 1.0
    mag_steps: int = 0


@dataclass
class StepCache:
    """The caching state of one denoising run: a :class:`BranchCache` per (expert, branch), and the record.

    Args:
        settings: the rule.
        steps: denoising steps of the run.
        coefficients: Tea's polynomial (highest power first).
        mag_ratios: Mag's ``(cond, uncond)`` ratios, ``steps`` each.
        reduce: sums a tensor over the SP group (:func:`sp_sum`); ``None`` without SP.
    """

    settings: StepCacheSettings
    steps: int
    coefficients: tuple[float, ...] | None = None
    mag_ratios: tuple[Sequence[float], Sequence[float]] | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    branches: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)  # branch -> {step: computed}
    statistics: dict = field(default_factory=dict)  # branch -> {step: the decision's statistic}

    def __post_init__(self) -> None:
        if self.mag_ratios is not None:
            self.mag_ratios = tuple(nearest_resample(r, self.steps) for r in self.mag_ratios)

    def branch(self, expert: int, branch: int) -> BranchCache:
        return self.branches.setdefault((expert, branch), BranchCache())

    def release(self, expert: int | None = None) -> None:
        """Drop the cached tensors (residuals, previous inputs: ``[B, S_local, C]`` float32 each, ~1.5 GB at 14B
        720p) of ``expert``'s branches, or of every branch (``None``): after the run, and once a two-expert run has
        switched to the next expert (experts run in timestep order, never back). The records (the report) stay."""
        for key in [k for k in self.branches if expert is None or k[0] == expert]:
            del self.branches[key]

    # ---- statistics ---------------------------------------------------------------------------
    def rel_l1(self, cur: torch.Tensor, prev: torch.Tensor, rows: int | None) -> float:
        """``sum|cur - prev| / sum|prev|`` (= the ratio of the means) over valid rows, reduced over the SP group
        when ``rows`` is given; float64 sums. ``inf`` when ``prev`` is all zeros (never skips on it)."""
        if rows is not None:
            cur, prev = cur[:, :rows], prev[:, :rows]
        sums = torch.stack(((cur.float() - prev.float()).abs().sum(dtype=torch.float64),
                            prev.abs().sum(dtype=torch.float64)))
        if rows is not None and self.reduce is not None:
            sums = self.reduce(sums)
        num, den = sums.tolist()
        return num / den if den > 0 else float("inf")

    # ---- the three rules: True = compute this step ----------------------------------------------
    def tea(self, br: BranchCache, step: int, inp: torch.Tensor, rows: int | None) -> tuple[bool, float | None]:
        s = self.settings
        stat = None
        if step < s.tea_first() or step >= self.steps - s.tea_last() or br.prev is None:
            compute = True
        else:
            stat = float(np.poly1d(self.coefficients)(self.rel_l1(inp, br.prev, rows)))
            br.acc += stat
            compute = not (s.teacache_thresh > 0 and br.acc < s.teacache_thresh and br.residual is not None)
        if compute:
            br.acc = 0.0
        br.prev = inp.clone()
        return compute, stat

    def mag(self, br: BranchCache, step: int, branch: int) -> tuple[bool, float | None]:
        s = self.settings
        if step < int(self.steps * s.magcache_retention_ratio):
            return True, None
        br.mag_ratio *= float(self.mag_ratios[branch][step])
        br.mag_steps += 1
        br.acc += abs(1.0 - br.mag_ratio)
        stat = br.acc
        if s.magcache_thresh > 0 and br.acc < s.magcache_thresh and br.mag_steps <= s.magcache_K and br.residual is not None:
            return False, stat
        br.acc, br.mag_steps, br.mag_ratio = 0.0, 0, 1.0
        return True, stat

    def first_block(self, br: BranchCache, residual: torch.Tensor, rows: int | None) -> tuple[bool, float | None]:
        s = self.settings
        r = residual[..., :: s.downsample_factor]
        stat = None
        if br.prev is None or br.residual is None:
            compute = True
        else:
            stat = self.rel_l1(r, br.prev, rows)
            compute = not (stat < s.residual_diff_threshold)
        br.prev = r.clone()
        return compute, stat

    def record(self, branch: int, step: int, computed: bool, stat: float | None) -> None:
        self.records.setdefault(branch, {})[step] = computed
        self.statistics.setdefault(branch, {})[step] = stat

    def decisions(self, branch: int) -> list[bool]:
        """``computed`` per step of ``branch`` (steps it did not run on this rank are absent)."""
        rec = self.records.get(branch, {})
        return [rec[i] for i in sorted(rec)]

    def report(self, records: dict[int, list[bool]] | None = None) -> dict:
        """Computed vs skipped steps per branch (``records``: per-branch decisions gathered from every cfg rank;
        default this rank's)."""
        if records is None:
            records = {b: self.decisions(b) for b in sorted(self.records)}
        per = {}
        for b, dec in records.items():
            per[BRANCH_NAMES[b]] = {"computed": sum(dec), "skipped": len(dec) - sum(dec),
                                    "skipped_steps": [i for i, c in enumerate(dec) if not c]}
        return {"feature_caching": self.settings.method, "settings": self.settings.describe(), "steps": self.steps,
                "branches": per, "forwards_computed": sum(v["computed"] for v in per.values()),
                "forwards_skipped": sum(v["skipped"] for v in per.values())}


def cached_forward(fwd: StagedForward, cache: StepCache, expert: int, branch: int, step: int) -> torch.Tensor:
    """One forward of ``branch`` at ``step`` under ``cache``'s rule: the blocks run, or the cached residual is added.

    Args:
        fwd: the staged forward (model adapter) of this call.
        cache: the run's cache.
        expert: index of the denoiser (two-expert models keep separate caches).
        branch: ``COND`` or ``UNCOND``.
        step: the denoising step index.

    Returns:
        The model output (float32, as the uncached forward's; identical to it when the step is computed).
    """
    s = cache.settings
    br = cache.branch(expert, branch)
    n = fwd.num_blocks
    if s.method == "FirstBlock":
        state = fwd.run(0, 1, None)
        first = fwd.stream(state)
        compute, stat = cache.first_block(br, first - fwd.tokens, fwd.rows)
        cache.record(branch, step, compute, stat)
        if not compute:
            return fwd.finish_stream(first + br.residual)
        state = fwd.run(1, n, state)
        br.residual = fwd.stream(state) - first
        return fwd.finish(state)
    if s.method == "Tea":
        inp, sharded = fwd.tea_input(s.use_ret_steps)
        compute, stat = cache.tea(br, step, inp, fwd.rows if sharded else None)
    elif s.method == "Mag":
        compute, stat = cache.mag(br, step, branch)
    else:
        raise ValueError(f"cached_forward needs a caching method, got {s.method!r}")
    cache.record(branch, step, compute, stat)
    if not compute:
        return fwd.finish_stream(fwd.tokens + br.residual)
    state = fwd.run(0, n, None)
    br.residual = fwd.stream(state) - fwd.tokens
    return fwd.finish(state)
