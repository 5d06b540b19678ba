"""The run config: typed dataclasses loaded from JSON, overridden from the CLI, validated up front.

Key names follow LightX2V's (``self_attn_1_type``, ``infer_steps``, ``parallel.seq_p_size`` ...) so
its configs load unchanged; ditfleet's own keys sit beside them. Precedence: ``--set`` on the
command line > the JSON file > the defaults below. Every problem a user can cause raises
:class:`~ditfleet.errors.ConfigError` naming the key and what would be valid. Unknown keys are
errors with the nearest valid key path; LightX2V keys that cannot change the video are accepted with
one warning that lists them (:mod:`ditfleet.config_compat`). A path value written ``${NAME}`` is a
placeholder of a shipped config: it must be replaced (``--set model_path=...``) before a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .attention.registry import ATTN_TYPES, SELF_ATTENTION_ONLY, Resolution, resolve, valid_types
from .config_compat import ALIASES, classify, suggest
from .errors import ConfigError
from .models.quant import SCHEMES as QUANT_SCHEMES
from .models.step_cache import METHODS as CACHE_METHODS
from .models.wan.sites import SITES

log = logging.getLogger(__name__)

SP_ATTN_TYPES = ("ulysses", "ring", "usp")
TASKS = ("t2v", "i2v")
LAUNCHERS = ("local", "torchrun", "ray")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("auto", "cpu", "cuda")
SPARGE_CKPT_SUFFIXES = (".pt", ".pth", ".safetensors")
PLACEMENT_STRATEGIES = ("auto", "STRICT_PACK", "PACK", "SPREAD")
PLACEHOLDER = re.compile(r"^\$\{[A-Za-z0-9_]+\}$")
#: Keys naming a denoiser's pre-quantised FP8 file (LightX2V's); a family takes its own (``ModelSpec.quantized_ckpt_keys``).
QUANTIZED_CKPT_KEYS = ("dit_quantized_ckpt", "high_noise_quantized_ckpt", "low_noise_quantized_ckpt")
PATH_KEYS = ("model_path", "sparge_ckpt", "image_path", "output", *QUANTIZED_CKPT_KEYS)


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with its documentation (shown by the README table and ``--help``)."""
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class ParallelConfig:
    """How the GPUs of one run split the work (LightX2V's ``parallel`` block, plus ``ulysses_size``)."""

    seq_p_size: int = _f(1, "Sequence-parallel degree: GPUs that share one video's tokens (ulysses x ring).")
    seq_p_attn_type: str = _f(
        "ulysses",
        "How self-attention is split: `ulysses` (all-to-all over heads), `ring` (K/V chunks travel around the "
        "ring while the kernel runs; LSE merge) or `usp` (Ulysses inside ring groups).",
        choices=SP_ATTN_TYPES,
    )
    cfg_p_size: int = _f(1, "Classifier-free-guidance degree: 2 runs the conditional and unconditional passes on different GPUs.")
    ulysses_size: int | None = _f(
        None, "With `usp`: the Ulysses degree inside each ring group (ring degree = seq_p_size / ulysses_size)."
    )
    transport: str = _f(
        "auto", "How sequence-parallel data moves: `nccl` (torch.distributed: NCCL on GPUs, gloo on CPU), "
        "`copy_engine` (CUDA symmetric memory and copy-engine pulls; every rank of each group on one host with "
        "peer access, checked when the mesh is built) or `auto` (= nccl: no whole-step bench has shown the copy "
        "engine faster). Recorded in the run report.", choices=("auto", "nccl", "copy_engine"),
    )
    timeout_s: float = _f(
        300.0, "Seconds any wait on a peer rank inside a denoising step may take (all-to-alls, ring transfers, "
        "gathers of the parallel mesh); a rank that stops or dies becomes an error on the others after this."
    )

    @property
    def ulysses_degree(self) -> int:
        if self.seq_p_attn_type == "ulysses":
            return self.seq_p_size
        if self.seq_p_attn_type == "ring":
            return 1
        return self.ulysses_size or 1

    @property
    def ring_degree(self) -> int:
        return self.seq_p_size // self.ulysses_degree

    @property
    def world_size(self) -> int:
        return self.seq_p_size * self.cfg_p_size


@dataclass
class RadialAttnSetting:
    """Radial attention's static mask (used when a site is `radial_attn`)."""

    decay_factor: float = _f(0.2, "How fast the diagonal band narrows with temporal distance (reference: 0.2).")
    block_size: int = _f(128, "Block size of the block-sparse mask, in tokens (multiple of 16).")
    dense_timesteps: int = _f(0, "Run the first N denoising steps with dense attention.")
    dense_layers: int = _f(0, "Run the first N DiT blocks with dense attention.")


@dataclass
class SpargeAttnSetting:
    """Sparge attention options."""

    topk: float | None = _f(
        None, "Checkpoint-free mode: keep this fraction (0, 1] of key blocks per query block instead of tuned thresholds."
    )


@dataclass
class LoraEntry:
    """One LoRA merged into the DiT's weights at load (LightX2V's ``lora_configs`` entry)."""

    path: str = _f("", "The LoRA file (.safetensors): PEFT lora_A/lora_B, kohya lora_down/lora_up + alpha, diff / diff_b.")
    strength: float = _f(1.0, "Multiplier of the LoRA's delta (0: no change).")
    alpha: float | None = _f(None, "Scale alpha / rank for a file without .alpha entries (null: the file's, else 1).")
    name: str | None = _f(None, "wan2.2_moe: the expert it applies to (high_noise_model / low_noise_model, or "
                                "transformer / transformer_2); null for one-DiT models.")


@dataclass
class RayConfig:
    """The Ray launcher (``launcher: ray``): where the cluster is, how workers are placed, how failures are handled."""

    address: str | None = _f(
        None, "Ray cluster to join (`auto`, `HOST:6379`, `ray://HOST:10001`); null: the RAY_ADDRESS environment "
        "variable, else a local cluster started for the run and stopped after it."
    )
    max_retries: int = _f(1, "Times a request is retried on a rebuilt worker group after a worker died or hung; then it fails.")
    init_timeout_s: float = _f(
        300.0, "Seconds allowed to place the workers and to form the process group (also the collective timeout)."
    )
    request_timeout_s: float = _f(
        600.0, "Seconds a request may go without progress (a denoising step, a decoded chunk) before its workers are "
        "declared hung, torn down and the request retried."
    )
    dashboard: bool = _f(False, "Start the Ray dashboard with a local cluster (on 127.0.0.1 unless `dashboard_host` is set).")
    dashboard_host: str | None = _f(None, "Interface of the dashboard when `dashboard` is true (null: 127.0.0.1 only).")
    placement_strategy: str = _f(
        "auto", "Placement group strategy: `auto` (STRICT_PACK when one node holds every worker, else PACK), "
        "`STRICT_PACK`, `PACK` or `SPREAD`.", choices=PLACEMENT_STRATEGIES,
    )
    num_cpus_per_worker: int = _f(1, "CPUs reserved for each worker (one per rank) in its placement-group bundle.")


@dataclass
class RunConfig:
    """One run of ditfleet. Field names are the JSON keys."""

    task: str = _f("t2v", "`t2v` (text to video) or `i2v` (image + text to video).", choices=TASKS)
    model_cls: str | None = _f(
        None, "Model family (LightX2V's name): `wan2.1` (one DiT), `wan2.2_moe` (Wan2.2 A14B: high- and low-noise "
        "experts) or `wan2.2` (TI2V-5B, 48-channel VAE; t2v); null: from the model folder (`transformer_2/`, "
        "`high_noise_model/` or a `boundary_ratio` mean wan2.2_moe; `expand_timesteps` or a 48-channel VAE wan2.2).",
    )
    boundary: float | None = _f(
        None, "wan2.2_moe: the timestep fraction (of 1000) at and above which the high-noise expert runs, in (0, 1); "
        "null: the folder's `boundary_ratio` (official layout: T2V 0.875, I2V 0.9).",
    )
    model_path: str | None = _f(
        None, "Wan2.1 weights: a Diffusers folder (`Wan-AI/Wan2.1-*-Diffusers`) for `generate`; the DiT alone also "
        "loads from an official release folder. Null: the embedded tiny random model."
    )
    launcher: str = _f("local", "`local` (one process), `torchrun` (one process per GPU) or `ray` (actors in a placement group).", choices=LAUNCHERS)
    device: str = _f("auto", "`auto` (CUDA when available), `cuda` or `cpu`.", choices=DEVICES)
    dtype: str = _f("bf16", "DiT compute dtype: `bf16`, `fp16` or `fp32`.", choices=tuple(DTYPES))
    world_size: int | None = _f(
        None, "Processes in the run; null = the product of the parallel degrees. Under torchrun, its WORLD_SIZE must match."
    )
    prompt: str | None = _f(None, "Text prompt (null: the official Wan2.1 example prompt).")
    negative_prompt: str | None = _f(None, "Classifier-free-guidance negative prompt (null: the official Wan2.1 one).")
    image_path: str | None = _f(None, "I2V reference image (PNG/JPEG/...); resized to target_height x target_width.")
    output: str | None = _f(
        None, "`.mp4`, `.npy` (uint8 [F, H, W, 3]) or a folder (PNG frames), plus `<name>.json`; "
        "null: `outputs/ditfleet-<task>-<time>-seed<seed>.mp4`."
    )
    fps: int = _f(16, "Frame rate of mp4 outputs.")
    sample_solver: str = _f("unipc", "Flow-matching sampler: `unipc` (multistep, official) or `euler`.", choices=("unipc", "euler"))
    seed: int = _f(42, "Seed of the initial noise (identical on every rank).")
    infer_steps: int = _f(50, "Denoising steps.")
    target_video_length: int = _f(81, "Frames to generate; must be 4n+1 (the VAE compresses time by 4).")
    target_height: int = _f(480, "Video height in pixels; multiple of 16.")
    target_width: int = _f(832, "Video width in pixels; multiple of 16.")
    text_len: int = _f(512, "Text tokens the DiT attends to (UMT5 output padded to this length).")
    sample_guide_scale: float | list[float] = _f(
        5.0, "Classifier-free guidance scale; for wan2.2_moe also `[high_noise, low_noise]` (LightX2V's form, e.g. "
        "[4.0, 3.0]: one scale per expert).",
    )
    sample_shift: float = _f(5.0, "Flow-matching timestep shift.")
    denoising_step_list: list[int] | None = _f(
        None, "Step-distilled models (LightX2V's key): the timesteps to denoise at, strictly decreasing in [1, 1000], "
        "e.g. [1000, 750, 500, 250]; run as LightX2V's step-distill sampler (Euler over those shifted sigmas; "
        "`sample_solver` does not apply); `infer_steps` must equal its length. null: the solver's schedule.",
    )
    enable_cfg: bool = _f(True, "Run classifier-free guidance (two passes per step); false runs one.")
    self_attn_1_type: str = _f("torch_sdpa", "Kernel of video self-attention (any attention type).")
    cross_attn_1_type: str = _f("torch_sdpa", "Kernel of video -> text cross-attention (any type but `radial_attn`).")
    cross_attn_2_type: str = _f("torch_sdpa", "Kernel of video -> reference-image cross-attention, I2V (any type but `radial_attn`).")
    strict_backends: bool = _f(False, "Fail at start-up instead of running a fallback kernel when a kernel's package is missing.")
    sparge: bool = _f(False, "Run self-attention with Sparge attention (needs `sparge_ckpt` or `sparge_attn_setting.topk`).")
    sparge_ckpt: str | None = _f(None, "Sparge per-layer thresholds: a `.pt` (loaded with weights_only=True) or `.safetensors` file.")
    radial_attn_setting: RadialAttnSetting = _f(RadialAttnSetting, "Radial attention options.")
    sparge_attn_setting: SpargeAttnSetting = _f(SpargeAttnSetting, "Sparge attention options.")
    lora_configs: list[LoraEntry] | None = _f(
        None, "LoRAs merged into the DiT weights at load, in order: `[{\"path\": ..., \"strength\": 1.0}]` (LightX2V's "
        "key; Wan2.2 A14B: one per expert with `name`). Keys that match no module are an error.",
    )
    dit_quantized: bool = _f(
        False, "Run the DiT's block linears (attention q/k/v/o, cross-attention, FFN) quantised (LightX2V's key); "
        "norms, embeddings, modulation and the head stay in the compute dtype. Needs a GPU with FP8 tensor cores "
        "(sm89+) and torchao; refused at start-up elsewhere.",
    )
    dit_quant_scheme: str = _f(
        "fp8", "Scheme of `dit_quantized`: `fp8` = FP8 e4m3 weights with one scale per output channel, activations "
        "quantised per token at run time (torchao's float8 rowwise, `torch._scaled_mm`); LightX2V's `fp8-vllm`, "
        "`fp8-sgl`, `fp8-q8f` and `fp8-torchao` name the same scheme and are accepted; LightX2V's `Default` (no "
        "quantisation) only with `dit_quantized` false.",
        choices=(*QUANT_SCHEMES, "Default"),
    )
    dit_quantized_ckpt: str | None = _f(
        None, "LightX2V's pre-quantised FP8 DiT (its converter's `--quantized --linear_dtype torch.float8_e4m3fn` "
        "output): a `.safetensors` file or a folder of them; the quantised linears are built from its e4m3 weights "
        "and `.weight_scale`s, every other DiT tensor is read from it too; the architecture still comes from "
        "`model_path`, whose DiT folder then needs only its `config.json`. Needs `dit_quantized` true; no "
        "`lora_configs`; one-DiT models (wan2.1, wan2.2 TI2V-5B). Null: quantise the bf16 weights at load.",
    )
    high_noise_quantized_ckpt: str | None = _f(
        None, "Wan2.2 A14B (`wan2.2_moe`): the high-noise expert's pre-quantised FP8 file or folder, as "
        "`dit_quantized_ckpt` is for one DiT (LightX2V's key); needs `dit_quantized` true; no LoRA for that expert. "
        "Null: that expert is read from its folder and quantised at load.",
    )
    low_noise_quantized_ckpt: str | None = _f(
        None, "Wan2.2 A14B: the low-noise expert's pre-quantised FP8 file or folder (LightX2V's key); as "
        "`high_noise_quantized_ckpt`.",
    )
    feature_caching: str = _f(
        "none", "Step caching (LightX2V's key): `none` (LightX2V's `NoCaching` too), `Tea` (TeaCache: skip a step's "
        "blocks while the accumulated rescaled relative L1 change of the time embedding stays below "
        "`teacache_thresh`), `Mag` (MagCache: calibrated magnitude ratios, `magcache_*`) or `FirstBlock` (skip the "
        "blocks after the first while the first block's residual changes less than `residual_diff_threshold`). "
        "A skipped step adds the blocks' residual of the branch's last computed step; the conditional and "
        "unconditional passes keep separate caches; every SP rank skips the same steps. See Step caching.",
        choices=("none", "NoCaching", *(m for m in CACHE_METHODS if m != "none")),
    )
    teacache_thresh: float = _f(
        0.26, "Tea: skip while the accumulated rescaled distance is below this (LightX2V's default; TeaCache4Wan2.1 "
        "suggests 0.05-0.08 for T2V 1.3B, 0.14-0.2 for 14B); 0 never skips.",
    )
    use_ret_steps: bool = _f(
        False, "Tea: TeaCache's retention-steps variant (statistic on the projected time embedding e0, its own "
        "polynomial, first 5 steps always computed, no final one).",
    )
    coefficients: list[list[float]] | None = _f(
        None, "Tea: the rescaling polynomials `[[retention-steps], [plain]]`, highest power first (LightX2V's form); "
        "null: TeaCache4Wan2.1's published ones for Wan2.1 T2V 1.3B / 14B and I2V 14B 480p / 720p (required for "
        "other models).",
    )
    teacache_first_steps: int | None = _f(
        None, "Tea: steps always computed at the start; null: 5 with use_ret_steps, else 1 (TeaCache4Wan2.1's).",
    )
    teacache_last_steps: int | None = _f(
        None, "Tea: steps always computed at the end; null: 0 with use_ret_steps, else 1 (TeaCache4Wan2.1's).",
    )
    magcache_thresh: float = _f(0.12, "Mag: skip while the accumulated magnitude error is below this; 0 never skips.")
    magcache_K: int = _f(4, "Mag: most steps skipped in a row.")
    magcache_retention_ratio: float = _f(0.2, "Mag: the first int(infer_steps x ratio) steps are always computed.")
    magcache_ratios: list[list[float]] | None = _f(
        None, "Mag: calibrated residual magnitude ratio per step, `[[cond], [uncond]]` (resampled to infer_steps by "
        "nearest index); null: MagCache4Wan2.1's published ones for Wan2.1 T2V 1.3B / 14B and I2V 14B 480p / 720p "
        "(required for other models).",
    )
    residual_diff_threshold: float = _f(
        0.02, "FirstBlock: skip the remaining blocks while the first block's residual changed (relative L1) by less; "
        "0 never skips.",
    )
    downsample_factor: int = _f(1, "FirstBlock: compare every n-th channel of the first block's residual.")
    parallel: ParallelConfig = _f(ParallelConfig, "Parallel layout.")
    ray: RayConfig = _f(RayConfig, "Ray launcher options.")
    cpu_offload: bool = _f(False, "LightX2V key, accepted for compatibility; ditfleet does not offload, so only false is valid.")

    # --- derived -----------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def site_types(self) -> dict[str, str | None]:
        """Attention type per site; ``None`` for a site this task does not use (image cross-attention in T2V)."""
        self_type = "sparge" if self.sparge else self.self_attn_1_type
        return {
            "self_attn_1_type": self_type,
            "cross_attn_1_type": self.cross_attn_1_type,
            "cross_attn_2_type": self.cross_attn_2_type if self.task == "i2v" else None,
        }

    def resolve_attention(self, device: torch.device | None = None) -> dict[str, Resolution | None]:
        """Resolve every used site's kernel once (start-up). Raises ConfigError if one cannot run."""
        device = device or self.torch_device()
        out: dict[str, Resolution | None] = {}
        for site, attn_type in self.site_types().items():
            if attn_type is None:
                out[site] = None
                continue
            need_lse = site == "self_attn_1_type" and self.parallel.ring_degree > 1
            out[site] = resolve(
                attn_type, site=site, device=device, dtype=self.torch_dtype, strict=self.strict_backends, need_lse=need_lse
            )
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building from JSON-like data, with type checks and did-you-mean for unknown keys
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "object"
    return {bool: "true/false", int: "integer", float: "number", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(key, f"expected {_type_name(tp)}, got {json.dumps(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected an object with keys {', '.join(f.name for f in dataclasses.fields(tp))}, got {json.dumps(value)}")
        return _build(tp, value, prefix=key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list of {_type_name(item)}s, got {json.dumps(value)}")
        return [_coerce(v, item, key) for v in value]
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp](value)
    if not ok:
        raise ConfigError(key, f"expected {_type_name(tp)}, got {json.dumps(value)}")
    return float(value) if tp is float else value


def key_paths(cls: type = None) -> list[str]:
    """Every valid config key as a dotted path (``infer_steps``, ``parallel.seq_p_size``, ...)."""
    return [key for key, _, _ in field_docs(cls or RunConfig)]


def _unknown_key(path: str, value: Any, foreign: list[str]) -> None:
    """A key no field has: LightX2V's no-effect keys (and output-changing ones at their off value) are noted in
    ``foreign`` for one warning; an output-changing LightX2V key that is on, or any other key, raises."""
    kind = classify(path, value)
    if kind in ("no_effect", "off"):
        foreign.append(path)
        return
    if kind == "changes_output":
        raise ConfigError(path, f"LightX2V's {path!r} = {json.dumps(value)} would change the video, and ditfleet does not "
                                "implement it; remove the key (or set it to its off value) to run without it")
    alias = ALIASES.get(path.rsplit(".", 1)[-1])
    if alias is not None:
        raise ConfigError(path, f"unknown key; ditfleet's name for it is {alias!r}")
    close = suggest(path, key_paths())
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    near = sorted({k[len(parent):].split(".")[0] for k in key_paths() if k.startswith(parent)})
    hint = f"did you mean {close!r}?" if close else f"valid keys{' in ' + repr(parent[:-1]) if parent else ''}: {', '.join(near)}"
    raise ConfigError(path, f"unknown key; {hint}")


#: How LightX2V's configs write "off" / "unused" for keys ditfleet implements (its configs load unchanged):
#: a spelling here is read as the value beside it, null as the field's default where listed in LIGHTX2V_NULL.
LIGHTX2V_SPELLINGS = {
    "dit_quant_scheme": {None: "Default", "default": "Default", "bf16": "Default"},
    "feature_caching": {None: "none", "None": "none"},
}
LIGHTX2V_NULL = ("teacache_thresh", "use_ret_steps", "magcache_thresh", "magcache_K", "magcache_retention_ratio",
                 "residual_diff_threshold", "downsample_factor")


def _build(cls: type, data: dict, prefix: str = "", foreign: list[str] | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    foreign = [] if foreign is None else foreign
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            _unknown_key(prefix + key, value, foreign)
            continue
        if cls is RunConfig:
            if value is None and key in LIGHTX2V_NULL:
                continue  # LightX2V's "unset": the default
            spelled = LIGHTX2V_SPELLINGS.get(key, {})
            if (value is None or isinstance(value, str)) and value in spelled:
                value = spelled[value]
        f = fields[key]
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = _build(hints[key], value, prefix + key + ".", foreign)
        else:
            value = _coerce(value, hints[key], prefix + key)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(prefix + key, f"{json.dumps(value)} is not valid; valid: {', '.join(choices)}")
        kwargs[key] = value
    return cls(**kwargs)


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(path), f"{part!r} is not an object, cannot set a key inside it")
    node[path[-1]] = value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set key=value`` (``key`` dotted for nested keys; ``value`` JSON, else a string)."""
    if "=" not in text:
        raise ConfigError(None, f"--set {text!r}: expected key=value, e.g. --set parallel.seq_p_size=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    path = key.split(".")
    cls: Any = RunConfig
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(cls):
            parent = ".".join(path[:i])
            raise ConfigError(key, f"{parent!r} is {_article(_type_name(cls))}, not an object: it has no key {part!r}; "
                                   f"use --set {parent}=VALUE")
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(path[:i])
            close = suggest(key, key_paths())
            hint = f"did you mean {close!r}?" if close else (
                f"valid keys in {where}: {', '.join(sorted(names))}" if where else
                f"valid keys: {', '.join(sorted(names))}")
            raise ConfigError(key, f"unknown key {part!r}{' in ' + repr(where) if where else ''}; {hint}")
        cls = typing.get_type_hints(cls)[part]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def read_json(path: str | Path) -> dict:
    """Read a JSON config file; syntax errors become a ConfigError with file, line, column and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(None, f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(None, f"config file {str(path)!r} is a folder; expected a .json file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(None, f"config file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                                "save it as UTF-8 JSON") from None
    except OSError as e:
        raise ConfigError(None, f"config file {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        line = text.splitlines()[e.lineno - 1] if text.splitlines() else ""
        raise ConfigError(
            None, f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}\n    {line}\n    {' ' * (e.colno - 1)}^"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(None, f"{path}: the config must be a JSON object {{...}}, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    data: dict | None = None,
    world_size: int | None = None,
    check_files: bool = True,
) -> RunConfig:
    """Build and validate a RunConfig: defaults < JSON (``path`` or ``data``) < ``overrides``.

    Args:
        path: JSON config file; ``None`` uses only ``data`` / defaults.
        overrides: ``key=value`` strings from ``--set``.
        data: an already-parsed config dict (instead of ``path``).
        world_size: processes actually launched (torchrun's WORLD_SIZE, Ray's worker count); checked
            against the parallel degrees.
        check_files: verify that referenced files exist (``sparge_ckpt``).
    """
    raw: dict = dict(read_json(path)) if path is not None else dict(data or {})
    raw = json.loads(json.dumps(raw))  # deep copy
    for text in overrides:
        keys, value = parse_override(text)
        _merge(raw, keys, value)
    foreign: list[str] = []
    cfg = _build(RunConfig, raw, foreign=foreign)
    validate(cfg, world_size=world_size, check_files=check_files)
    if foreign:
        log.warning("LightX2V key(s) ditfleet does not use, ignored (they do not change the video): %s",
                    ", ".join(sorted(foreign)))
    return cfg


def load_config_or_default(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, world_size: int | None = None
) -> tuple[RunConfig, str]:
    """What the CLI loads: ``path`` (or the embedded tiny default when ``None``) with ``overrides``.

    Returns:
        ``(config, source)``; ``source`` names the file or ``"embedded tiny default"``.
    """
    if path is None:
        from .defaults import TINY_DEFAULT

        return load_config(None, overrides, data=TINY_DEFAULT, world_size=world_size), "embedded tiny default"
    return load_config(path, overrides, world_size=world_size), str(path)


def validate(cfg: RunConfig, *, world_size: int | None = None, check_files: bool = True) -> None:
    """Raise ConfigError for the first invalid setting, naming its key and what would be valid."""

    def positive(key: str, value: int | float) -> None:
        if value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")

    for key in PATH_KEYS:
        value = getattr(cfg, key)
        if check_files and isinstance(value, str) and PLACEHOLDER.match(value.strip()):
            raise ConfigError(key, f"{value} is a placeholder of a shipped config; give the real path with "
                                   f"--set {key}=/path/to/... (or edit the file)")
        if isinstance(value, str) and not value.strip():
            raise ConfigError(key, "empty path; give a path or null")

    # attention sites
    for site in SITES:
        t = getattr(cfg, site)
        if t not in ATTN_TYPES:
            close = difflib.get_close_matches(t, list(ATTN_TYPES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(site, f"unknown attention type {t!r}{hint}; valid: {', '.join(valid_types(site))}")
        if site != "self_attn_1_type" and t in SELF_ATTENTION_ONLY:
            raise ConfigError(
                site, f"{t!r} works for self-attention only (set it on self_attn_1_type); valid here: {', '.join(valid_types(site))}"
            )
    uses_sparge = cfg.sparge or "sparge" in (cfg.self_attn_1_type, cfg.cross_attn_1_type, cfg.cross_attn_2_type)
    if cfg.sparge and cfg.self_attn_1_type == "radial_attn":
        raise ConfigError("sparge", "sparge: true replaces self-attention, which is set to radial_attn; choose one")
    if uses_sparge:
        topk = cfg.sparge_attn_setting.topk
        if cfg.sparge_ckpt is None and topk is None:
            raise ConfigError(
                "sparge_ckpt", "Sparge attention needs tuned thresholds: set sparge_ckpt to a .pt/.safetensors file "
                "(or sparge_attn_setting.topk for the checkpoint-free mode)"
            )
    if cfg.sparge_ckpt is not None:
        p = Path(cfg.sparge_ckpt)
        if p.suffix not in SPARGE_CKPT_SUFFIXES:
            raise ConfigError("sparge_ckpt", f"{cfg.sparge_ckpt!r}: expected a {' or '.join(SPARGE_CKPT_SUFFIXES)} file")
        if check_files and not p.is_file():
            raise ConfigError("sparge_ckpt", f"file {cfg.sparge_ckpt!r} does not exist")
    if cfg.sparge_attn_setting.topk is not None and not 0 < cfg.sparge_attn_setting.topk <= 1:
        raise ConfigError("sparge_attn_setting.topk", f"must lie in (0, 1], got {cfg.sparge_attn_setting.topk}")

    # video shape and sampling
    n = cfg.target_video_length
    if n < 1 or (n - 1) % 4:
        lo = max(1, (n - 1) // 4 * 4 + 1)
        raise ConfigError("target_video_length", f"must be 4n+1 (1, 5, 9, ..., 81), got {n}; nearest valid: {lo} or {lo + 4}")
    for key in ("target_height", "target_width"):
        v = getattr(cfg, key)
        if v <= 0 or v % 16:
            raise ConfigError(key, f"must be a positive multiple of 16, got {v}; nearest valid: {max(16, round(v / 16) * 16)}")
    positive("infer_steps", cfg.infer_steps)
    positive("fps", cfg.fps)
    positive("text_len", cfg.text_len)
    positive("sample_shift", cfg.sample_shift)
    for i, lora in enumerate(cfg.lora_configs or []):
        if not lora.path:
            raise ConfigError(f"lora_configs[{i}].path", "give the LoRA file (.safetensors)")
        if lora.alpha is not None and lora.alpha <= 0:
            raise ConfigError(f"lora_configs[{i}].alpha", f"must be > 0 or null, got {lora.alpha}")
    if cfg.dit_quantized and cfg.dit_quant_scheme == "Default":
        raise ConfigError("dit_quant_scheme", "`Default` (LightX2V's null / default / bf16 too) means no "
                                              "quantisation, but dit_quantized is true; valid "
                                              "schemes: fp8 (or LightX2V's fp8-vllm, fp8-sgl, fp8-q8f, fp8-torchao)")
    _validate_quantized_ckpt(cfg, check_files)
    steps = cfg.denoising_step_list
    if steps is not None:
        if not steps or any(not 1 <= x <= 1000 for x in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
            raise ConfigError("denoising_step_list", f"must be strictly decreasing integers in [1, 1000] (e.g. "
                                                     f"[1000, 750, 500, 250]), got {json.dumps(steps)}")
        if cfg.infer_steps != len(steps):
            raise ConfigError("infer_steps", f"{cfg.infer_steps}, but denoising_step_list {json.dumps(steps)} has "
                                             f"{len(steps)} steps; set infer_steps to {len(steps)}")
    _validate_caching(cfg)
    scales = cfg.sample_guide_scale if isinstance(cfg.sample_guide_scale, list) else [cfg.sample_guide_scale]
    if (isinstance(cfg.sample_guide_scale, list) and len(scales) != 2) or min(scales) < 0:
        raise ConfigError("sample_guide_scale", f"must be a number >= 0 or [high_noise, low_noise] (two numbers >= 0), "
                                                f"got {json.dumps(cfg.sample_guide_scale)}")
    if cfg.boundary is not None and not 0.0 < cfg.boundary < 1.0:
        raise ConfigError("boundary", f"must lie in (0, 1) (a fraction of the 1000 timesteps; Wan2.2 A14B: T2V 0.875, "
                                      f"I2V 0.9), got {cfg.boundary}")
    if cfg.model_cls is not None:
        from .models.registry import spec_for

        spec = spec_for(cfg.model_cls)  # unknown -> ConfigError naming the families
        if spec.experts == 1 and (cfg.boundary is not None or len(scales) == 2):
            raise ConfigError("boundary" if cfg.boundary is not None else "sample_guide_scale",
                              f"model_cls {cfg.model_cls} has one denoiser: a boundary and per-expert scales need "
                              "wan2.2_moe")
    if not 0 <= cfg.seed < 2**63:
        raise ConfigError("seed", f"must lie in [0, 2**63), got {cfg.seed}")
    if cfg.cpu_offload:
        raise ConfigError("cpu_offload", "ditfleet does not offload to CPU; only false is valid (shard with parallel.seq_p_size instead)")

    # radial settings
    rs = cfg.radial_attn_setting
    positive("radial_attn_setting.decay_factor", rs.decay_factor)
    if rs.block_size <= 0 or rs.block_size % 16:
        raise ConfigError("radial_attn_setting.block_size", f"must be a positive multiple of 16, got {rs.block_size}")
    for key in ("dense_timesteps", "dense_layers"):
        if getattr(rs, key) < 0:
            raise ConfigError(f"radial_attn_setting.{key}", f"must be >= 0, got {getattr(rs, key)}")

    # parallel layout
    par = cfg.parallel
    positive("parallel.seq_p_size", par.seq_p_size)
    positive("parallel.timeout_s", par.timeout_s)
    if par.cfg_p_size not in (1, 2):
        raise ConfigError("parallel.cfg_p_size", f"must be 1 or 2 (conditional and unconditional passes), got {par.cfg_p_size}")
    if par.cfg_p_size == 2 and not cfg.enable_cfg:
        raise ConfigError("parallel.cfg_p_size", "cfg_p_size 2 splits classifier-free guidance, but enable_cfg is false; set it to 1")
    if par.seq_p_attn_type == "usp":
        u = par.ulysses_size
        if u is None or u < 1 or par.seq_p_size % u:
            divs = [d for d in range(1, par.seq_p_size + 1) if par.seq_p_size % d == 0]
            raise ConfigError(
                "parallel.ulysses_size", f"usp needs a Ulysses degree dividing seq_p_size={par.seq_p_size}; valid: {divs}, got {u}"
            )
    elif par.ulysses_size not in (None, par.ulysses_degree):
        raise ConfigError(
            "parallel.ulysses_size", f"only used with seq_p_attn_type 'usp' ({par.seq_p_attn_type} implies {par.ulysses_degree})"
        )
    expected = par.world_size
    for key, ws in (("world_size", cfg.world_size), ("world size", world_size)):
        if ws is not None and ws != expected:
            raise ConfigError(
                "parallel",
                f"seq_p_size={par.seq_p_size} x cfg_p_size={par.cfg_p_size} = {expected} processes, "
                f"but the {key} is {ws}; make the product of the parallel degrees equal the number of processes "
                f"(e.g. --set parallel.seq_p_size={ws})",
            )
    # ray launcher
    rc = cfg.ray
    if rc.max_retries < 0:
        raise ConfigError("ray.max_retries", f"must be >= 0, got {rc.max_retries}")
    positive("ray.init_timeout_s", rc.init_timeout_s)
    positive("ray.request_timeout_s", rc.request_timeout_s)
    positive("ray.num_cpus_per_worker", rc.num_cpus_per_worker)
    if rc.dashboard_host is not None and not rc.dashboard:
        raise ConfigError("ray.dashboard_host", "is only used with ray.dashboard: true; set both or neither")
    if cfg.launcher == "local" and expected > 1:
        raise ConfigError(
            "launcher", f"'local' runs one process, but the parallel degrees need {expected}; use torchrun or ray"
        )


def _validate_quantized_ckpt(cfg: RunConfig, check_files: bool) -> None:
    """The :data:`QUANTIZED_CKPT_KEYS`: each needs ``dit_quantized``, a .safetensors file or a folder that exists, and
    a family that takes it (with ``model_cls`` set; else checked against the folder's family at start-up);
    ``dit_quantized_ckpt`` takes no LoRA (a per-expert file refuses its expert's LoRAs at load)."""
    given = {k: getattr(cfg, k) for k in QUANTIZED_CKPT_KEYS if getattr(cfg, k) is not None}
    for key, path in given.items():
        if not cfg.dit_quantized:
            raise ConfigError(key, "a pre-quantised checkpoint needs dit_quantized: true (and an fp8 "
                                   f"dit_quant_scheme); set it, or set {key} to null")
        p = Path(path).expanduser()
        if check_files and not p.exists():
            raise ConfigError(key, f"{path!r} does not exist; give LightX2V's pre-quantised DiT (a .safetensors file "
                                   "or a folder of them)")
        if (p.is_file() and p.suffix != ".safetensors") or (not p.exists() and p.suffix not in ("", ".safetensors")):
            raise ConfigError(key, f"{path!r} is not a .safetensors file (or a folder of them); ditfleet reads only "
                                   "safetensors (no pickle)")
    if cfg.lora_configs and "dit_quantized_ckpt" in given:
        raise ConfigError("lora_configs", "LoRAs merge into the bf16 weights before they are quantised, and "
                                          f"dit_quantized_ckpt {given['dit_quantized_ckpt']!r} is already quantised; "
                                          "drop lora_configs, or drop dit_quantized_ckpt to quantise the LoRA-merged "
                                          "weights at load")
    if cfg.model_cls is not None and given:
        from .models.registry import spec_for

        check_quantized_keys(spec_for(cfg.model_cls), given)


def check_quantized_keys(spec, given: dict) -> None:
    """Refuse a :data:`QUANTIZED_CKPT_KEYS` key (``given``: key -> path) that the family ``spec`` does not take."""
    for key in given:
        if key in spec.quantized_ckpt_keys:
            continue
        takes = (f"takes {' / '.join(spec.quantized_ckpt_keys)}" if spec.quantized_ckpt_keys
                 else "does not load pre-quantised checkpoints")
        raise ConfigError(key, f"{spec.family} ({spec.description}) {takes}; set {key} to null"
                               + ("" if spec.quantized_ckpt_keys else " to quantise at load"))


def _validate_caching(cfg: RunConfig) -> None:
    """The ``feature_caching`` keys (checked whatever the method, so a config is valid or not on its own)."""
    for key in ("teacache_thresh", "magcache_thresh", "residual_diff_threshold"):
        if getattr(cfg, key) < 0:
            raise ConfigError(key, f"must be >= 0 (0: never skip), got {getattr(cfg, key)}")
    for key in ("teacache_first_steps", "teacache_last_steps"):
        v = getattr(cfg, key)
        if v is not None and v < 0:
            raise ConfigError(key, f"must be >= 0 or null, got {v}")
    if cfg.magcache_K < 1:
        raise ConfigError("magcache_K", f"must be >= 1 (most steps skipped in a row), got {cfg.magcache_K}")
    if not 0.0 <= cfg.magcache_retention_ratio <= 1.0:
        raise ConfigError("magcache_retention_ratio", f"must lie in [0, 1], got {cfg.magcache_retention_ratio}")
    if cfg.downsample_factor < 1:
        raise ConfigError("downsample_factor", f"must be >= 1, got {cfg.downsample_factor}")
    c = cfg.coefficients
    if c is not None:
        used = 0 if cfg.use_ret_steps else 1
        if len(c) != 2 or not c[used]:
            raise ConfigError("coefficients", f"expected [[retention-steps polynomial], [plain polynomial]] (LightX2V's "
                                              f"form; with use_ret_steps {json.dumps(cfg.use_ret_steps)} the "
                                              f"{('first', 'second')[used]} one is used and must not be empty), got "
                                              f"{json.dumps(c)}")
    r = cfg.magcache_ratios
    if r is not None:
        if len(r) != 2 or not r[0] or len(r[0]) != len(r[1]) or min(min(r[0]), min(r[1])) <= 0:
            raise ConfigError("magcache_ratios", "expected [[cond ratio per step], [uncond ratio per step]]: two "
                                                 f"non-empty lists of equal length, ratios > 0; got {json.dumps(r)}")


def field_docs(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, doc)`` for every config key, nested keys dotted (the README table)."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append((prefix + f.name, json.dumps(default), f.metadata.get("doc", "")))
    return rows
