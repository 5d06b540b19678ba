"""What the engine asks of a model family: a :class:`ModelSpec` (vLLM's model registry, reduced).

A family (``wan2.1``, ``wan2.2_moe``, ...) says which model folders are its own, where its denoiser(s) live
in a folder, how to load them, and when each one runs. The engine never names a family: it asks
:func:`ditfleet.models.registry.spec_for` for the spec and the spec for :class:`Denoisers`, whose
:meth:`Denoisers.index_for` the runner calls at every step (Wan2.2 A14B switches experts there).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: Training timesteps of the flow-matching schedule (Wan's ``num_train_timesteps``); a boundary ratio is a fraction of it.
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class Denoisers:
    """The DiT(s) of one rank and when each runs.

    Attributes:
        experts: the models, in timestep order: ``[dit]``, or ``[high_noise, low_noise]`` (Wan2.2 A14B).
        names: one name per expert (for logs and reports: ``"transformer"``, ``"transformer_2"``).
        boundary: with two experts, the fraction of :data:`NUM_TRAIN_TIMESTEPS` at and above which the first
            (high-noise) expert runs -- Diffusers' ``boundary_ratio`` (``t >= boundary * 1000``); ``None`` with one.
        sources: the folder each expert was loaded from.
        loras: the LoRAs merged into the experts (file, sha256, strength, matched modules).
        quant: the quantised linears (``dit_quantized``: scheme, formats, GEMM, which modules;
            :func:`ditfleet.models.quant.quantize_denoisers_`), ``None`` when every linear runs in the compute dtype.
    """

    experts: list
    names: list[str]
    boundary: float | None = None
    sources: list[str] = field(default_factory=list)
    loras: list[dict] = field(default_factory=list)
    quant: dict | None = None

    def __post_init__(self) -> None:
        if not self.experts or len(self.experts) != len(self.names):
            raise ValueError(f"Denoisers: {len(self.experts)} experts for {len(self.names)} names")
        if len(self.experts) > 2:
            raise ValueError(f"Denoisers: at most two experts (high / low noise), got {len(self.experts)}")
        if (len(self.experts) == 2) != (self.boundary is not None):
            raise ValueError("Denoisers: a boundary goes with exactly two experts")

    def __iter__(self) -> Iterator:
        return iter(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def primary(self):
        """The first expert (the only one of a single-DiT family)."""
        return self.experts[0]

    def index_for(self, t: float | torch.Tensor) -> int:
        """Which expert denoises at timestep ``t`` (0..1000): 0 at and above the boundary, 1 below it."""
        if self.boundary is None:
            return 0
        return 0 if float(t) >= self.boundary * NUM_TRAIN_TIMESTEPS else 1

    def describe(self) -> dict:
        return {"experts": list(self.names), "boundary": self.boundary, "sources": list(self.sources),
                "loras": list(self.loras), "quant": self.quant}


class ModelSpec:
    """One model family. Subclasses set the class attributes and implement the methods.

    Attributes:
        family: the registry name (also the config's ``model_cls``).
        description: one line for logs and errors.
        experts: denoisers per folder (1, or 2 for a high / low-noise pair).
        first_frame_i2v: image-to-video replaces the first latent frame by the image's (Wan2.2 TI2V-5B) instead of
            feeding the condition as extra DiT input channels (Wan2.1 / Wan2.2 A14B I2V).
        dit_class: the denoiser's module class (built on ``meta`` by start-up checks of a pre-quantised file).
        quantized_ckpt_keys: the config keys naming each denoiser's pre-quantised FP8 file (LightX2V's), in
            :meth:`dit_folders` order (``dit_quantized_ckpt``; Wan2.2 A14B ``high_noise_quantized_ckpt`` /
            ``low_noise_quantized_ckpt``); empty: the family loads none, and the keys are refused.
    """

    family: str = ""
    description: str = ""
    experts: int = 1
    first_frame_i2v: bool = False
    dit_class: type | None = None
    quantized_ckpt_keys: tuple[str, ...] = ()

    def claims(self, root: Path) -> bool:
        """True when ``root`` (a model folder) is one of this family's (used to pick the family from a folder)."""
        raise NotImplementedError

    def dit_folders(self, root: Path) -> list[tuple[str, Path]]:
        """``(name, folder)`` of each denoiser under ``root``, in timestep order (high noise first)."""
        raise NotImplementedError

    def default_boundary(self, root: Path) -> float | None:
        """The expert boundary the folder states (``None``: one expert)."""
        return None

    def check_task(self, task: str) -> None:
        """Refuse a task this family cannot run (ConfigError naming ``task``); every task by default."""

    def load(self, root: Path, *, device: torch.device, dtype: torch.dtype, attention: Mapping[str, object],
             boundary: float | None = None, loras: Sequence = ()) -> Denoisers:
        """Load the denoiser(s) of ``root``; ``boundary`` overrides :meth:`default_boundary`; ``loras`` (config
        ``lora_configs`` entries: ``path``, ``strength``, ``alpha``, ``name``) are merged into their expert's weights.

        A family with :attr:`quantized_ckpt_keys` also takes ``quantized`` (one path or ``None`` per denoiser, in
        :meth:`dit_folders` order) and ``quant`` (the ``dit_quant_scheme``): a denoiser with a path is built
        pre-quantised from that file (its ``quant_report`` set; it takes no LoRA), the others load from their
        folders (and are quantised at load by the runner)."""
        raise NotImplementedError

    def loras_for(self, loras: Sequence, names: Sequence[str], aliases: Mapping[str, str] | None = None) -> list[list]:
        """``loras`` split per expert (in ``names`` order). One expert: every LoRA (``name`` null, the family, or the
        expert's name); several: each LoRA must name its expert (``aliases``: other accepted names)."""
        from ..errors import ConfigError

        aliases = dict(aliases or {})
        out: list[list] = [[] for _ in names]
        for i, lora in enumerate(loras or ()):
            name = getattr(lora, "name", None)
            target = aliases.get(name, name)
            if len(names) == 1 and name in (None, self.family, "dit", "transformer", names[0]):
                out[0].append(lora)
            elif target in names:
                out[names.index(target)].append(lora)
            else:
                valid = sorted({*names, *aliases}) if len(names) > 1 else ["null", self.family, names[0]]
                raise ConfigError(f"lora_configs[{i}].name", f"{name!r}: {self.family} has the denoiser(s) "
                                                             f"{', '.join(names)}; valid: {', '.join(map(str, valid))}")
        return out

    def denoiser_loras(self, loras: Sequence, names: Sequence[str]) -> list[list]:
        """``loras`` split per denoiser (``names``: :meth:`dit_folders`' names): :meth:`loras_for` with the names the
        family also accepts (Wan2.2 A14B: LightX2V's expert names)."""
        return self.loras_for(loras, names)

    def check_prequantized_loras(self, names: Sequence[str], per_denoiser: Sequence[Sequence],
                                 quantized: Sequence) -> None:
        """Refuse a LoRA for a denoiser built from a pre-quantised file (``quantized``: a path or ``None`` per
        denoiser) -- a LoRA merges into bf16 weights before they are quantised -- before anything loads."""
        from ..errors import ConfigError

        for name, mine, path, key in zip(names, per_denoiser, quantized, self.quantized_ckpt_keys):
            if path is not None and mine:
                raise ConfigError("lora_configs", f"{len(mine)} LoRA(s) for {name}, whose {key} {str(path)!r} is "
                                                  "pre-quantised: a LoRA merges into bf16 weights before they are "
                                                  f"quantised; drop those LoRAs, or drop {key} to quantise the "
                                                  "LoRA-merged weights at load")

    def check_boundary(self, boundary: float | None, where: str) -> None:
        """A two-expert family needs a boundary in (0, 1); a one-expert family none."""
        from ..errors import ConfigError

        if self.experts == 1 and boundary is not None:
            raise ConfigError("boundary", f"{self.family} has one denoiser; a boundary needs a two-expert model "
                                          f"(wan2.2_moe); set it to null")
        if self.experts == 2 and (boundary is None or not 0.0 < boundary < 1.0):
            raise ConfigError("boundary", f"{where}: {boundary!r} is not a fraction of the timesteps in (0, 1) "
                                          f"(Wan2.2 A14B: T2V 0.875, I2V 0.9)")
