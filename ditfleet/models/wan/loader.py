"""Loading Wan2.1 DiT weights from the official release layout or the Diffusers layout.

Official (Wan repo, LightX2V): ``config.json`` (``dim``, ``num_heads`` ...) and
``diffusion_pytorch_model.safetensors`` or shards ``diffusion_pytorch_model-0000k-of-0000n.safetensors``
with ``diffusion_pytorch_model.safetensors.index.json``; tensors usually float32, keys optionally
prefixed ``model.diffusion_model.``. Diffusers: the same file names in a ``transformer/`` folder
whose ``config.json`` is a ``WanTransformer3DModel`` config (or the pipeline folder above it).

Loading streams: the model is built on ``meta``, every tensor's name and shape is checked from
the safetensors headers before any data is read, then tensors are read one at a time, cast to
the target dtype and device, and assigned (``load_state_dict(assign=True)``): peak host memory
is one tensor, never a second copy of the model. Only safetensors are read (no pickle).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import UserError
from .config import WanConfigError, WanDiTConfig
from .dit import WanDiT, default_attention

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
OFFICIAL_PREFIX = "model.diffusion_model."
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
SHOW = 5  # keys named per category in an error


class CheckpointError(UserError):
    """A model folder that cannot be loaded: missing, wrong layout, not safetensors, or keys that do not match."""


# ---- key mapping (official <-> Diffusers) -----------------------------------------------------
# Prefix pairs, official first. Top-level names, then names inside ``blocks.N.``.
_TOP = (
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("patch_embedding.", "patch_embedding."),
)
_BLOCK = (
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("norm3.", "norm2."),  # official norm3 (before cross-attention) is Diffusers' norm2
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
)
# Diffusers keys that carry no official weight (skipped, as Diffusers itself does on load).
_DIFFUSERS_IGNORED = re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.")
_BLOCK_RE = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _map(key: str, src: int) -> str | None:
    m = _BLOCK_RE.match(key)
    head, rest, table = (m.group(1), m.group(2), _BLOCK) if m else ("", key, _TOP)
    for pair in table:
        if rest.startswith(pair[src]):
            return head + pair[1 - src] + rest[len(pair[src]):]
    return None


def official_to_diffusers(key: str) -> str:
    """Diffusers name of an official parameter name (unknown names are returned unchanged)."""
    return _map(key.removeprefix(OFFICIAL_PREFIX), 0) or key


def diffusers_to_official(key: str) -> str | None:
    """Official name of a Diffusers parameter name; ``None`` for keys without an official weight.

    Unknown names are returned unchanged (and then reported as unexpected by the loader).
    """
    if _DIFFUSERS_IGNORED.match(key):
        return None
    return _map(key, 1) or key


# ---- finding the checkpoint ----------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A located checkpoint folder.

    Attributes:
        folder: the folder holding ``config.json`` and the weights.
        layout: ``"official"`` or ``"diffusers"``.
        config: the model hyperparameters.
        files: the safetensors files, in shard order; with ``find_checkpoint(weights=...)`` those files (a
            pre-quantised checkpoint, official names whatever ``layout`` the folder's config has).
    """

    folder: Path
    layout: str
    config: WanDiTConfig
    files: list[Path] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _indexed_files(index: Path, what: str = "") -> list[Path]:
    """The safetensors files a ``*.index.json`` names (its ``weight_map`` values, beside it), each checked to exist;
    ``what`` prefixes the messages (e.g. the config key)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{what}{index}: has no 'weight_map' (name -> shard file)")
    files = sorted({index.parent / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{what}{index} lists shard file(s) that do not exist: {', '.join(missing[:SHOW])}")
    return files


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        return _indexed_files(index)
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        hint = f"found {', '.join(others[:SHOW])}, expected {WEIGHTS_NAME} or its shards"
    elif pickles:
        hint = (f"found {', '.join(pickles[:SHOW])}: not a safetensors checkpoint; ditfleet reads only safetensors "
                "(no pickle) -- convert it, e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), ...)")
    else:
        hint = f"expected {WEIGHTS_NAME} or shards diffusion_pytorch_model-*.safetensors with {INDEX_NAME}"
    raise CheckpointError(f"{folder}: no DiT weights; {hint}")


def _config_of(path: str | Path) -> tuple[Path, str, WanDiTConfig]:
    """``(folder, layout, config)`` of the DiT ``config.json`` under ``path`` (see :func:`find_checkpoint`)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"model path {str(path)!r} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"model path {str(path)!r} is a file; pass the folder holding config.json and the "
                              f"{WEIGHTS_NAME} weights")
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected an official Wan2.1 folder, a Diffusers "
                              "transformer/ folder, or a Diffusers pipeline folder containing transformer/)")
    data = _read_json(cfg_path)
    try:
        if data.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in data:
            return folder, "diffusers", WanDiTConfig.from_diffusers(data)
        if "dim" in data and "num_heads" in data:
            return folder, "official", WanDiTConfig.from_official(data)
        cls = data.get("_class_name")
        raise CheckpointError(f"{cfg_path}: not a Wan2.1 DiT config (class {cls!r}); expected an official WanModel "
                              "config (dim, num_heads, ...) or a Diffusers WanTransformer3DModel config")
    except WanConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def read_config(path: str | Path) -> WanDiTConfig:
    """The DiT's config as its ``config.json`` states it, no weights needed (an official ``model_type: i2v`` stays
    ``i2v``; :func:`find_checkpoint` also reads the tensor names). ``path`` as for :func:`find_checkpoint`."""
    return _config_of(path)[2]


def find_checkpoint(path: str | Path, *, weights: Sequence[Path] | None = None) -> Checkpoint:
    """Locate the DiT weights under ``path`` and read their config.

    ``path`` is an official Wan2.1 folder, a Diffusers ``transformer/`` folder, or a Diffusers
    pipeline folder containing ``transformer/``. ``weights``: the safetensors files that hold the DiT's tensors
    instead of the folder's own (``dit_quantized_ckpt``'s: :func:`quantized_files`); the folder then needs only its
    ``config.json``, and those files' tensor names answer what the folder's would (the CLIP image branch).

    Raises:
        CheckpointError: the path does not exist, is not a folder, has no ``config.json``, an
            unknown config, or no safetensors weights. The message names the path or file.
    """
    folder, layout, config = _config_of(path)
    files = _weight_files(folder) if weights is None else list(weights)
    if layout == "official" and config.model_type == "i2v" and not _has_image_branch(
            folder if weights is None else None, files):
        # Wan2.2 A14B I2V: the official config says "i2v" as Wan2.1 I2V does, but the model has no CLIP image branch
        # (no img_emb / k_img / v_img tensors): the image enters as the condition y only (Diffusers' reading)
        log.debug("%s: model_type i2v without image-embedding tensors: Wan2.2 I2V (no CLIP branch)", folder / "config.json")
        config = config.replace(model_type="t2v")
    return Checkpoint(folder, layout, config, files)


def _has_image_branch(folder: Path | None, files: list[Path]) -> bool:
    """Whether the checkpoint holds the CLIP image embedding (Wan2.1 I2V), by tensor names only (``folder``'s
    index's weight map, else the safetensors headers of ``files``)."""
    index = folder / INDEX_NAME if folder is not None else None
    if index is not None and index.is_file():
        names = list(_read_json(index).get("weight_map") or {})
    else:
        names = []
        for path in files:
            with _open(path) as f:
                names.extend(f.keys())
    return any(n.removeprefix(OFFICIAL_PREFIX).startswith(("img_emb.", "condition_embedder.image_embedder."))
               for n in names)


# ---- reading ------------------------------------------------------------------------------------------
def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _diffusers_named(names: list[str]) -> bool:
    """Whether tensor names follow Diffusers (``condition_embedder.``, ``attn1.`` ...) rather than the release."""
    return any(n.startswith("condition_embedder.") or ".attn1." in n or n.startswith("proj_out.") for n in names)


def scan(ckpt: Checkpoint) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Official name -> (file, stored name, shape) of every tensor, from the headers only (no data read).

    Tensor names are mapped by what they are (Diffusers or official names, ``model.diffusion_model.``
    prefix stripped), whichever config format sits beside them.

    Raises:
        CheckpointError: a file is not safetensors, or two files hold the same tensor.
    """
    stored: list[tuple[Path, str, tuple[int, ...]]] = []
    for path in ckpt.files:
        with _open(path) as f:
            stored.extend((path, name, tuple(f.get_slice(name).get_shape())) for name in f.keys())
    diffusers_names = _diffusers_named([name for _, name, _ in stored])
    entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path, name, shape in stored:
        official = diffusers_to_official(name) if diffusers_names else name.removeprefix(OFFICIAL_PREFIX)
        if official is None:
            continue
        if official in entries:
            raise CheckpointError(f"tensor {name!r} appears twice: in {entries[official][0].name} and {path.name}")
        entries[official] = (path, name, shape)
    return entries


def check_keys(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[Path, str, tuple[int, ...]]], where: str
) -> None:
    """Raise one :class:`CheckpointError` naming the first few missing, unexpected and misshaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [found[k][1] for k in found if k not in expected]
    misshaped = [
        f"{found[k][1]} (checkpoint {list(found[k][2])}, model {list(shape)})"
        for k, shape in expected.items() if k in found and tuple(found[k][2]) != tuple(shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
        if items:
            more = f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:SHOW])}{more}")
    if problems:
        raise CheckpointError(f"{where}: the weights do not match the model its config.json describes; " + "; ".join(problems))


def iter_tensors(ckpt: Checkpoint, names: Mapping[str, tuple[Path, str, tuple[int, ...]]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(official name, tensor)`` one at a time, file by file (each tensor read once, on CPU)."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for official, (path, stored, _) in names.items():
        by_file.setdefault(path, []).append((official, stored))
    for path in ckpt.files:
        if path not in by_file:
            continue
        with _open(path) as f:
            for official, stored in by_file[path]:
                yield official, f.get_tensor(stored)


def load_dit(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attention: Mapping[str, object] | None = None,
    model_cls: type[WanDiT] = WanDiT,
) -> WanDiT:
    """Build a :class:`WanDiT` from an official or Diffusers Wan checkpoint, streaming the weights.

    Args:
        path: official folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``), Diffusers
            ``transformer/`` folder, or a Diffusers pipeline folder containing ``transformer/``.
        device: where the weights go (read one tensor at a time, cast, moved).
        dtype: compute dtype (float32 parts stay float32, see :meth:`WanDiT.cast_`).
        attention: ``site -> AttentionBackend`` (or registry ``Resolution``); ``None`` resolves
            ``torch_sdpa`` for every site the model uses.
        model_cls: the class built (a :class:`WanDiT` subclass with the same parameters, e.g. a family's own
            conditioning: :class:`~ditfleet.models.wan22.ti2v.Ti2vDiT`).

    Returns:
        The model in eval mode, ``requires_grad`` off.

    Raises:
        CheckpointError: the folder, config or weights are unusable; a key mismatch names the first
            few missing, unexpected and misshaped keys.
    """
    ckpt = find_checkpoint(path)
    device = torch.device(device)
    with torch.device("meta"):
        model = model_cls(ckpt.config)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    found = scan(ckpt)
    check_keys(expected, found, f"{ckpt.folder} ({ckpt.layout} layout)")
    keep = model.fp32_param_names()
    state = {}
    for name, tensor in iter_tensors(ckpt, found):
        if not tensor.is_floating_point():
            raise CheckpointError(f"{ckpt.folder}: tensor {found[name][1]!r} has dtype {tensor.dtype}, expected floating point")
        value = tensor.to(device=device, dtype=model.param_dtype(name, dtype, keep))
        if value.data_ptr() == tensor.data_ptr():
            # no cast, no move: copy into the allocator's own (aligned) memory, so that CPU kernels -- whose results
            # can depend on the data's alignment -- compute the same whatever the tensor's offset in its file
            value = value.clone()
        state[name] = value
        del tensor, value
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.requires_grad_(False).eval()
    model.set_attention(attention if attention is not None else default_attention(ckpt.config, device, dtype))
    log.info("loaded Wan2.1 %s DiT (%s layout, %d tensors) from %s to %s/%s", ckpt.config.model_type, ckpt.layout,
             len(found), ckpt.folder, device, str(dtype).removeprefix("torch."))
    return model


# ---- pre-quantised checkpoints (dit_quantized_ckpt) ------------------------------------------------------
# LightX2V's format, read from ModelTC/lightx2v: tools/convert/converter.py (``--quantized --linear_dtype
# torch.float8_e4m3fn``: quantize_model / quantize_tensor), lightx2v/models/networks/wan/model.py
# (_load_quant_ckpt) and lightx2v/common/ops/mm/mm_weight.py (MMWeightQuantTemplate.load_quantized):
# * official Wan names; every 2-D tensor of ``blocks.N.{self_attn,cross_attn,ffn}.*`` -- q k v o, k_img v_img,
#   ffn.0 ffn.2, i.e. WanDiT.quant_linears -- is stored as ``<name>.weight`` float8_e4m3fn [N, K] plus
#   ``<name>.weight_scale`` [N, 1] (the source weight's dtype, float32 for the float32 Wan releases), symmetric
#   per output channel: scale = max(amax(|row|), 1e-5) / 448, ``W[n] ~= weight[n] * weight_scale[n]``;
# * every other tensor (biases, norms, embeddings, modulation, head) sits in the same file(s), unquantised,
#   cast to the converter's --non_linear_dtype (float32 by default, or bf16 / fp16);
# * a single .safetensors file, or a folder: ``<name>_partK.safetensors`` chunks or ``block_N.safetensors`` +
#   ``non_block.safetensors`` (--save_by_block), with a diffusion_pytorch_model.safetensors.index.json;
#   LightX2V reads every *.safetensors of the folder, as done here (or the index's files when there is one).
# int8 files (--linear_dtype torch.int8) have the same layout; this build runs fp8 only.
QUANT_KEY = "dit_quantized_ckpt"
SCALE_SUFFIX = "_scale"  # LightX2V: "<linear>.weight" + "_scale"
_FP8_HEADER = "F8_E4M3"
_HEADER_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8",
                  "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_FLOAT_HEADERS = ("BF16", "F16", "F32", "F64")


def quantized_files(path: str | Path, key: str = QUANT_KEY) -> list[Path]:
    """The safetensors file(s) of a pre-quantised checkpoint (config key ``key``: ``dit_quantized_ckpt``,
    ``high_noise_quantized_ckpt``, ``low_noise_quantized_ckpt``): the file itself, or the folder's (its index's files
    when it has a ``*.index.json``, else every ``*.safetensors``), sorted.

    Raises:
        ConfigError: (naming ``key``) the path does not exist, is not a ``.safetensors`` file, or a folder
            holds none.
        CheckpointError: an index that lists missing files.
    """
    from ...errors import ConfigError

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(key, f"{str(path)!r} does not exist; give LightX2V's pre-quantised DiT (a .safetensors "
                               f"file or a folder of them)")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ConfigError(key, f"{str(path)!r} is not a .safetensors file; ditfleet reads only safetensors "
                                   f"(no pickle)")
        return [p]
    indexes = sorted(p.glob("*.index.json"))
    if indexes:
        return _indexed_files(indexes[0], f"{key} ")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ConfigError(key, f"{str(path)!r} is a folder without .safetensors files")
    return files


def _scan_quantized(files: list[Path], key: str = QUANT_KEY) -> dict[str, tuple[Path, str, tuple[int, ...], str]]:
    """Official name -> (file, stored name, shape, header dtype) of every tensor, from the headers only."""
    entries: dict[str, tuple[Path, str, tuple[int, ...], str]] = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                sl = f.get_slice(name)
                official = name.removeprefix(OFFICIAL_PREFIX)
                if official in entries:
                    raise CheckpointError(f"{key}: tensor {name!r} appears twice: in {entries[official][0].name} "
                                          f"and {path.name}")
                entries[official] = (path, name, tuple(sl.get_shape()), sl.get_dtype())
    return entries


def _listing(label: str, items: list[str]) -> str:
    more = f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else ""
    return f"{len(items)} {label}: {', '.join(items[:SHOW])}{more}"


def _check_quantized(model: WanDiT, qnames: list[str], found: Mapping[str, tuple], where: str,
                     key: str = QUANT_KEY) -> None:
    """Every check of a pre-quantised checkpoint's headers against ``model`` (one CheckpointError each)."""
    qweights = {f"{n}.weight" for n in qnames}
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    hdt = {k: v[3] for k, v in found.items()}
    other_q = sorted(k for k, d in hdt.items() if k in qweights and d not in (_FP8_HEADER, *_FLOAT_HEADERS))
    if other_q:
        d = _HEADER_DTYPES.get(hdt[other_q[0]], hdt[other_q[0]])
        raise CheckpointError(f"{where}: {_listing(f'{d} linear weight(s)', other_q)}; this build runs fp8 only "
                              f"(float8_e4m3fn weights with per-channel scales: LightX2V's converter --linear_dtype "
                              f"torch.float8_e4m3fn), or drop {key} to quantise the bf16 weights at load")
    unquantised = sorted(k for k in qweights if k in found and hdt[k] in _FLOAT_HEADERS)
    if unquantised:
        d = _HEADER_DTYPES[hdt[unquantised[0]]]
        raise CheckpointError(f"{where}: {_listing(f'{d} (not quantised) linear weight(s)', unquantised)}; a "
                              f"pre-quantised checkpoint holds these in float8_e4m3fn with a .weight_scale each; for a "
                              f"bf16 / fp32 checkpoint drop {key} (dit_quantized quantises at load)")
    odd = sorted(k for k, d in hdt.items() if k not in qweights and not k.endswith(SCALE_SUFFIX) and k in expected
                 and d not in _FLOAT_HEADERS)
    if odd:
        d = _HEADER_DTYPES.get(hdt[odd[0]], hdt[odd[0]])
        raise CheckpointError(f"{where}: {_listing(f'{d} tensor(s) outside the quantised linears', odd)}; only the "
                              f"blocks' linears ({', '.join(model.quant_linears[:3])}, ...) run quantised, every other "
                              f"tensor must be floating point (bf16, fp16, fp32)")
    no_scale = sorted(k for k in qweights if k in found and k + SCALE_SUFFIX not in found)
    if no_scale:
        raise CheckpointError(f"{where}: {_listing('quantised weight(s) without their scale', no_scale)}; LightX2V "
                              f"stores each as <name>.weight (float8_e4m3fn) and <name>.weight_scale (float32 [N, 1])")
    missing = [k for k in expected if k not in found]
    scales = {k + SCALE_SUFFIX: expected[k][0] for k in qweights}
    unknown = [found[k][1] for k in found if k not in expected and k not in scales]
    misshaped = [f"{found[k][1]} (checkpoint {list(found[k][2])}, model {list(shape)})"
                 for k, shape in expected.items() if k in found and tuple(found[k][2]) != tuple(shape)]
    misshaped += [f"{found[k][1]} (checkpoint {list(found[k][2])}, model [{n}, 1])" for k, n in scales.items()
                  if k in found and tuple(found[k][2]) not in ((n, 1), (n,), (1, n))]
    bad_scale = sorted(k for k in scales if k in found and hdt[k] not in _FLOAT_HEADERS)
    problems = [_listing(label, items) for label, items in (("missing", missing), ("unknown", unknown),
                                                             ("misshaped", misshaped)) if items]
    if bad_scale:
        problems.append(_listing("scale(s) not floating point", [f"{k} ({_HEADER_DTYPES.get(hdt[k], hdt[k])})"
                                                                 for k in bad_scale]))
    if problems:
        raise CheckpointError(f"{where}: the tensors do not match the model model_path's config.json describes "
                              f"(official Wan names expected, e.g. blocks.0.self_attn.q.weight and its .weight_scale); "
                              + "; ".join(problems))


def check_quantized_ckpt(path: str | Path, quantized_ckpt: str | Path, *, model_cls: type[WanDiT] = WanDiT,
                         key: str = QUANT_KEY):
    """Check a pre-quantised checkpoint (config key ``key``, named by the messages) against the model ``path``'s
    config describes, from the headers only (the start-up check of :func:`ditfleet.engine.preflight.check_quant`, and
    the first step of :func:`load_quantized_dit`).

    Returns:
        ``(checkpoint, model on meta, quantised linear names, files, tensors by official name)``.

    Raises:
        ConfigError / CheckpointError: as :func:`load_quantized_dit`, before any tensor data is read.
    """
    from ..quant import quantizable_linears

    files = quantized_files(quantized_ckpt, key)
    ckpt = find_checkpoint(path, weights=files)
    with torch.device("meta"):
        model = model_cls(ckpt.config)
    qnames = quantizable_linears(model)
    found = _scan_quantized(files, key)
    _check_quantized(model, qnames, found, f"{key} {quantized_ckpt}", key)
    return ckpt, model, qnames, files, found


def load_quantized_dit(
    path: str | Path,
    quantized_ckpt: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attention: Mapping[str, object] | None = None,
    model_cls: type[WanDiT] = WanDiT,
    scheme: str = "fp8",
    check_device: bool = True,
    gemm=None,
    key: str = QUANT_KEY,
) -> WanDiT:
    """Build a quantised :class:`WanDiT` from LightX2V's pre-quantised FP8 checkpoint (``dit_quantized_ckpt``; a
    Wan2.2 A14B expert's ``high_noise_quantized_ckpt`` / ``low_noise_quantized_ckpt``: ``key``, named by the messages).

    The architecture comes from ``path``'s ``config.json`` (as :func:`load_dit`); every tensor comes from
    ``quantized_ckpt`` (a ``.safetensors`` file or a folder of them: :func:`quantized_files`). The model is built
    on ``meta``, the headers are checked against it before any data is read, the quantised linears become
    :class:`~ditfleet.models.quant.Fp8Linear` straight from the file's e4m3 weights and scales (no bf16 copy of
    them exists at any time), and the other tensors are read one at a time, cast as :func:`load_dit` casts them.

    Args:
        path: the model's DiT folder (its ``config.json``), as for :func:`load_dit`.
        quantized_ckpt: the pre-quantised file or folder.
        device, dtype, attention, model_cls: as :func:`load_dit` (``dtype`` is the quantised model's compute dtype).
        scheme: the ``dit_quant_scheme`` (an fp8 one).
        check_device: refuse a device / dtype the engine does not run quantised, before reading a tensor;
            False on CPU (tests), as :func:`~ditfleet.models.quant.quantize_model_`.
        gemm: the scaled GEMM (default torchao's).

    Returns:
        The model in eval mode; ``model.quant_report`` records the checkpoint (path, each file's sha256).

    Raises:
        ConfigError: (``key``) a missing path; (``dit_quantized`` / ``dit_quant_scheme``) a device or
            scheme that cannot run it.
        CheckpointError: naming the file: int8 or other non-fp8 weights, a weight without its scale, missing,
            unknown or misshaped tensors.
    """
    from .. import quant
    from .lora import _sha256

    quant.canonical_scheme(scheme)
    ckpt, model, qnames, files, found = check_quantized_ckpt(path, quantized_ckpt, model_cls=model_cls, key=key)
    where = f"{key} {quantized_ckpt}"
    device = torch.device(device)
    if check_device:
        quant.check_quant_runtime(device, dtype)
    keep = model.fp32_param_names()
    by_module = {n: {} for n in qnames}
    owner = {f"{n}.{leaf}": (n, leaf) for n in qnames for leaf in ("weight", "weight" + SCALE_SUFFIX, "bias")}
    state = {}
    for path_i in files:
        with _open(path_i) as f:
            for official, (fpath, stored, _, _) in found.items():
                if fpath != path_i:
                    continue
                tensor = f.get_tensor(stored)
                if official in owner:  # a quantised linear's weight (e4m3 as stored), scale (float32) or bias
                    mod, leaf = owner[official]
                    if leaf == "weight" + SCALE_SUFFIX:
                        if not bool(torch.isfinite(tensor).all()) or bool((tensor <= 0).any()):
                            raise CheckpointError(f"{where}: {stored} ({path_i.name}) holds scales that are not finite "
                                                  f"and positive")
                        target = torch.float32
                    else:
                        target = tensor.dtype if leaf == "weight" else dtype
                else:
                    target = model.param_dtype(official, dtype, keep)
                value = tensor.to(device=device, dtype=target)
                # no cast, no move: the allocator's own (aligned) memory, as load_dit does; one tensor on the host
                value = value.clone() if value.data_ptr() == tensor.data_ptr() else value
                if official in owner:
                    by_module[owner[official][0]][owner[official][1]] = value
                else:
                    state[official] = value
                del tensor, value
    linears = {n: (d["weight"], d["weight" + SCALE_SUFFIX], d.get("bias")) for n, d in by_module.items()}
    source = {"key": key, "path": str(quantized_ckpt),
              "files": [{"file": p.name, "sha256": _sha256(p)} for p in files]}
    quant.build_prequantized_(model, scheme, linears, device=device, dtype=dtype, source=source, check_device=False,
                              gemm=gemm)
    del linears, by_module
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or any(t.is_meta for t in model.state_dict().values()):
        raise RuntimeError(f"load_quantized_dit: {ckpt.folder}: tensors left unloaded "
                           f"({[k for k, t in model.state_dict().items() if t.is_meta][:SHOW]}) or unexpected "
                           f"({result.unexpected_keys[:SHOW]})")
    del state
    model.requires_grad_(False).eval()
    model.set_attention(attention if attention is not None else default_attention(ckpt.config, device, dtype))
    log.info("loaded %s (%s) pre-quantised (%s, %d linears fp8) from %s %s, config from %s, to %s/%s",
             type(model).__name__, ckpt.config.model_type, scheme, len(qnames), key, quantized_ckpt, ckpt.folder,
             device, str(dtype).removeprefix("torch."))
    return model


# ---- conversion -------------------------------------------------------------------------------------
def _write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> list[str]:
    """Write ``(name, tensor)`` pairs as safetensors shards of at most ``max_shard_bytes`` (plus index when > 1)."""
    from safetensors.torch import save_file

    tmp_names: list[Path] = []
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0
    total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            path = out / f".shard-{len(tmp_names):05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            tmp_names.append(path)
            for k in shard:
                weight_map[k] = path.name
        shard, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    n = len(tmp_names)
    if n == 1:
        tmp_names[0].rename(out / WEIGHTS_NAME)
        return [WEIGHTS_NAME]
    final = {p.name: f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i, p in enumerate(tmp_names)}
    for p in tmp_names:
        p.rename(out / final[p.name])
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return sorted(final.values())


def _convert(src: str | Path, out_dir: str | Path, layout: str, max_shard_bytes: int) -> Path:
    ckpt = find_checkpoint(src)
    with torch.device("meta"):
        model = WanDiT(ckpt.config)
    found = scan(ckpt)
    check_keys({n: tuple(p.shape) for n, p in model.named_parameters()}, found, f"{ckpt.folder} ({ckpt.layout} layout)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("diffusion_pytorch_model*.safetensors")):
        raise CheckpointError(f"{out}: already holds DiT weights; convert into an empty folder")
    if layout == "official":
        config, rename = ckpt.config.to_official(), (lambda k: k)
    else:
        config, rename = ckpt.config.to_diffusers(), official_to_diffusers
    _write_sharded(((rename(k), t) for k, t in iter_tensors(ckpt, found)), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def convert_to_official(src: str | Path, out_dir: str | Path, *, max_shard_bytes: int = 5 << 30) -> Path:
    """Write the checkpoint at ``src`` (either layout) in the official Wan2.1 layout, tensor dtypes unchanged.

    Writes ``config.json`` (official keys) and ``diffusion_pytorch_model.safetensors``, or shards
    ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` plus the index when the weights exceed
    ``max_shard_bytes``. At most one shard is held in memory.

    Returns:
        ``out_dir`` as a Path.
    """
    return _convert(src, out_dir, "official", max_shard_bytes)


def convert_to_diffusers(src: str | Path, out_dir: str | Path, *, max_shard_bytes: int = 5 << 30) -> Path:
    """Write the checkpoint at ``src`` (either layout) as a Diffusers ``transformer/`` folder (``WanTransformer3DModel``)."""
    try:
        return _convert(src, out_dir, "diffusers", max_shard_bytes)
    except WanConfigError as e:
        raise CheckpointError(f"{src}: {e}") from None

