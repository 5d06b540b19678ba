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
from collections.abc import Iterator, Mapping
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
        files: the safetensors files, in shard order.
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


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map' (name -> shard file)")
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard file(s) that do not exist: {', '.join(missing[:SHOW])}")
        return files
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


def find_checkpoint(path: str | Path) -> Checkpoint:
    """Locate the DiT weights under ``path`` and read their config.

    ``path`` is an official Wan2.1 folder, a Diffusers ``transformer/`` folder, or a Diffusers
    pipeline folder containing ``transformer/``.

    Raises:
        CheckpointError: the path does not exist, is not a folder, has no ``config.json``, an
            unknown config, or no safetensors weights. The message names the path or file.
    """
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
            layout, config = "diffusers", WanDiTConfig.from_diffusers(data)
        elif "dim" in data and "num_heads" in data:
            layout, config = "official", WanDiTConfig.from_official(data)
        else:
            cls = data.get("_class_name")
            raise CheckpointError(f"{cfg_path}: not a Wan2.1 DiT config (class {cls!r}); expected an official WanModel "
                                  "config (dim, num_heads, ...) or a Diffusers WanTransformer3DModel config")
    except WanConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    files = _weight_files(folder)
    if layout == "official" and config.model_type == "i2v" and not _has_image_branch(folder, files):
        # Wan2.2 A14B I2V: the official config says "i2v" as Wan2.1 I2V does, but the model has no CLIP image branch
        # (no img_emb / k_img / v_img tensors): the image enters as the condition y only (Diffusers' reading)
        log.debug("%s: model_type i2v without image-embedding tensors: Wan2.2 I2V (no CLIP branch)", cfg_path)
        config = config.replace(model_type="t2v")
    return Checkpoint(folder, layout, config, files)


def _has_image_branch(folder: Path, files: list[Path]) -> bool:
    """Whether the checkpoint holds the CLIP image embedding (Wan2.1 I2V), by tensor names only (the index's
    weight map, else the safetensors headers)."""
    index = folder / INDEX_NAME
    if index.is_file():
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

