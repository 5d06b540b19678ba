"""Checks that run before anything loads: the model folder, every file a run reads, the video size.

``ditfleet check-config`` and ``ditfleet generate`` call the same :func:`preflight`, so a config that
check-config calls valid does not fail later on something a check could have seen. The size check
(:func:`check_size`) also runs again on rank 0 for every request, with the loaded model.

Size limits: the latent grid must fit the DiT's RoPE table (``rope_max_seq_len`` positions per axis),
and a lower-bound estimate of the memory one rank needs must fit the device: DiT weights, the encoders
and VAE on rank 0, then the larger of the denoising activations and the VAE decode. The estimate is
deliberately low (it counts the main tensors only), so it refuses what cannot run, never what can.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RequestError

log = logging.getLogger(__name__)

GIB = float(1 << 30)
#: Activation elements per token of one DiT forward (hidden states, q/k/v/out, FFN) counted by the estimate:
#: ``8 * dim + 2 * ffn_dim``. For Wan-14B at 720p x 81 this gives 10.4 GB against 12.8 GiB measured above the
#: weights (``benchmarks/results/dit_h100.json``): a lower bound.
ACT_DIM, ACT_FFN = 8, 2


@dataclass(frozen=True)
class ModelGeometry:
    """What the size checks need to know of a model, read from its config files (no weights).

    Attributes:
        source: where it was read (a folder, or the embedded tiny model).
        scale_t, scale_s: VAE compression in time and space (4, 8 for Wan2.1).
        patch: DiT patch ``(t, h, w)``.
        rope_max: positions per RoPE axis.
        dim, ffn_dim, num_layers, num_heads: DiT shape.
        dit_params: DiT parameter count.
        other_bytes: bytes of the text / image encoders and the VAE on disk (rank 0 holds them).
        vae_base_dim: channels of the VAE decoder's full-resolution stage.
    """

    source: str
    scale_t: int
    scale_s: int
    patch: tuple[int, int, int]
    rope_max: int
    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    dit_params: int
    other_bytes: int
    vae_base_dim: int

    @property
    def spatial_multiple(self) -> int:
        return self.scale_s * max(self.patch[1], self.patch[2])

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The DiT's token grid ``(F', H', W')`` of a video."""
        lat_f = (frames - 1) // self.scale_t + 1
        return (-(-lat_f // self.patch[0]), height // self.scale_s // self.patch[1], width // self.scale_s // self.patch[2])


def _dit_params(dim: int, ffn: int, layers: int, in_dim: int, out_dim: int, text_dim: int, freq: int,
                patch: tuple[int, int, int], image_branch: bool) -> int:
    block = 8 * dim * dim + (2 * dim * dim if image_branch else 0) + 2 * dim * ffn + 6 * dim
    p = math.prod(patch)
    return layers * block + in_dim * p * dim + text_dim * dim + dim * dim + freq * dim + 7 * dim * dim + dim * out_dim * p


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0


def model_geometry(cfg) -> ModelGeometry:
    """The geometry of the model ``cfg`` names (its folder's config files, or the tiny model's spec).

    Raises:
        ModelFolderError / CheckpointError: the folder is missing, incomplete or not a Wan2.1 folder.
    """
    if cfg.model_path is None:
        from .tiny import TINY_SPEC

        d, v = TINY_SPEC["dit"], TINY_SPEC["vae"]
        dim = d["num_attention_heads"] * d["attention_head_dim"]
        patch = tuple(d["patch_size"])
        params = _dit_params(dim, d["ffn_dim"], d["num_layers"], 16 if cfg.task == "t2v" else 36, 16,
                             TINY_SPEC["text"]["d_model"], d["freq_dim"], patch, cfg.task == "i2v")
        return ModelGeometry("embedded tiny model", 2 ** sum(v["temperal_downsample"]), 2 ** (len(v["dim_mult"]) - 1),
                             patch, 1024, dim, d["ffn_dim"], d["num_layers"], d["num_attention_heads"], params,
                             0, v["base_dim"])
    from .pipeline import check_model

    _, root, configs = check_model(cfg, cfg.model_path)
    c = configs[0]
    try:
        vae = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        from .errors import ModelFolderError

        raise ModelFolderError(f"{root / 'vae' / 'config.json'}: cannot be read ({e})") from None
    scale_t = int(vae.get("scale_factor_temporal") or 2 ** sum(bool(x) for x in vae.get("temperal_downsample", [0, 1, 1])))
    scale_s = int(vae.get("scale_factor_spatial") or 2 ** (len(vae.get("dim_mult", [1, 2, 4, 4])) - 1))
    params = len(configs) * _dit_params(c.dim, c.ffn_dim, c.num_layers, c.in_dim, c.out_dim, c.text_dim, c.freq_dim,
                                        c.patch_size, c.has_image_branch)  # every rank holds every expert
    other = sum(_folder_bytes(root / sub) for sub in ("text_encoder", "image_encoder", "vae"))
    return ModelGeometry(str(root), scale_t, scale_s, c.patch_size, c.rope_max_seq_len, c.dim, c.ffn_dim,
                         c.num_layers, c.num_heads, params, other, int(vae.get("base_dim", 96)))


def driver_geometry(cfg) -> ModelGeometry | None:
    """:func:`model_geometry` where the driver can read the model; ``None`` for a Ray driver on a machine without
    ``model_path`` (a cluster's head node): the workers check the folder at load, and rank 0 each request's size."""
    if cfg.launcher == "ray" and cfg.model_path is not None and not Path(cfg.model_path).expanduser().exists():
        log.info("model_path %s is not on this machine: the workers check it at load, rank 0 each request's size",
                 cfg.model_path)
        return None
    return model_geometry(cfg)


def device_memory(device: torch.device, ranks_on_host: int = 1) -> tuple[int, str] | None:
    """``(bytes, what)`` one rank can use on ``device``; ``None`` when this process cannot see it."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        idx = device.index if device.index is not None else 0
        props = torch.cuda.get_device_properties(idx)
        return int(props.total_memory), f"this GPU ({props.name}) has"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    what = "this machine has" if ranks_on_host == 1 else f"this machine's share per rank ({ranks_on_host} ranks) is"
    return int(total // max(1, ranks_on_host)), what


def estimate_bytes(geom: ModelGeometry, frames: int, height: int, width: int, *, dtype_bytes: int, seq_p: int,
                   cfg_batch: int) -> dict[str, int]:
    """Lower-bound bytes rank 0 needs: ``dit``, ``others`` (encoders, VAE), ``activations``, ``decode``, ``total``."""
    tokens = math.prod(geom.grid(frames, height, width))
    local = -(-tokens // max(1, seq_p))
    act = cfg_batch * local * (ACT_DIM * geom.dim + ACT_FFN * geom.ffn_dim) * dtype_bytes
    decode = 2 * geom.vae_base_dim * geom.scale_t * height * width * 4  # float32 VAE, one latent frame's pixels
    dit = geom.dit_params * dtype_bytes
    return {"tokens": tokens, "tokens_per_rank": local, "dit": dit, "others": geom.other_bytes, "activations": act,
            "decode": decode, "total": dit + geom.other_bytes + max(act, decode)}


def check_size(geom: ModelGeometry, frames: int, height: int, width: int, *, cfg, device: torch.device | None,
               where: str = "", keys: tuple[str, str, str] = ("target_video_length", "target_height", "target_width"),
               ranks_on_host: int = 1) -> dict[str, int]:
    """Refuse a video the model cannot position (RoPE) or the device cannot hold; returns the estimate.

    Args:
        geom: the model's :class:`ModelGeometry`.
        frames, height, width: the request.
        cfg: the run config (dtype, parallel degrees, CFG).
        device: where rank 0 runs; ``None`` skips the memory check (a driver that cannot see the device).
        where: prefix of messages (a jobs line's label).
        keys: the names of frames / height / width in messages (config keys, or a jobs line's fields).
        ranks_on_host: CPU ranks that share this machine's memory.

    Raises:
        RequestError: naming the keys, the limit and what would fit.
    """
    grid = geom.grid(frames, height, width)
    axes = ((keys[0], frames, grid[0], (geom.rope_max * geom.patch[0] - 1) * geom.scale_t + 1),
            (keys[1], height, grid[1], geom.rope_max * geom.scale_s * geom.patch[1]),
            (keys[2], width, grid[2], geom.rope_max * geom.scale_s * geom.patch[2]))
    for key, value, n, top in axes:
        if n > geom.rope_max:
            raise RequestError(f"{where}{key}: {value} gives {n} latent positions on its axis, but the model has "
                               f"{geom.rope_max} RoPE positions per axis ({geom.source}); at most {top}")
    par = cfg.parallel
    est = estimate_bytes(geom, frames, height, width, dtype_bytes=torch.empty(0, dtype=cfg.torch_dtype).element_size(),
                         seq_p=par.seq_p_size, cfg_batch=1)  # the runner runs CFG branches one at a time
    cap = device_memory(device, ranks_on_host) if device is not None else None
    if cap is not None and est["total"] > cap[0]:
        raise RequestError(
            f"{where}{keys[2]} x {keys[1]} x {keys[0]} = {width}x{height}x{frames} ({est['tokens']} tokens, "
            f"{est['tokens_per_rank']} per rank): needs at least ~{est['total'] / GIB:.1f} GiB on rank 0 (DiT "
            f"{est['dit'] / GIB:.1f}, encoders and VAE {est['others'] / GIB:.1f}, then the larger of activations "
            f"{est['activations'] / GIB:.1f} and VAE decode {est['decode'] / GIB:.1f}), but {cap[1]} "
            f"{cap[0] / GIB:.1f} GiB; make the video smaller or split it over more GPUs (parallel.seq_p_size)")
    return est


def ranks_sharing_host(cfg, device: torch.device) -> int:
    """CPU ranks of this run on one machine (torchrun's LOCAL_WORLD_SIZE, else the whole world); 1 on GPUs."""
    if device.type == "cuda":
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE") or cfg.parallel.world_size)


def preflight(cfg, request=None, *, device: torch.device | None = None, require_model: bool = False,
              files: bool = True) -> dict:
    """Every check a run makes before it loads anything; raises the first :class:`~ditfleet.errors.UserError`.

    The quantised linears (``dit_quantized``: device, FP8 support, torchao, dtype), the model folder's layout and task, the sparge checkpoint (loaded and validated against the model),
    the I2V image (readable), the request's fields and size (RoPE range, memory estimate on ``device``),
    and the attention kernels of each site (``cfg.resolve_attention``).

    Args:
        cfg: a validated run config.
        request: the :class:`~.request.GenerateRequest` to check (fields, size, image); ``None`` checks only
            the model, the sparge file and the kernels (a jobs file checks each job with :func:`check_request`).
        device: where rank 0 runs (default: the config's device).
        require_model: check the model folder here even for a Ray driver that may not hold it (check-config).
        files: read the files only the driver reads (sparge checkpoint, I2V image); False on torchrun ranks > 0.

    Returns:
        ``{"geometry", "estimate", "attention", "sparge"}`` for the caller's report.
    """
    from .sparge_weights import load_for_run

    device = device or cfg.torch_device()
    check_quant(cfg, device)
    check_cache(cfg)
    geom = model_geometry(cfg) if require_model else driver_geometry(cfg)
    est = None
    if request is not None and geom is not None:
        est = check_request(request, geom, cfg, device=device, files=files)
    elif request is not None:  # a Ray driver without the model: the fields here, the size on rank 0
        request.validate(cfg.task)
    _, sparge = load_for_run(cfg) if files else (None, {})
    attention = cfg.resolve_attention(device)
    return {"geometry": geom, "estimate": est, "attention": attention, "sparge": sparge}


def check_cache(cfg, spec=None, configs=None) -> None:
    """``feature_caching`` Tea / Mag need their constants (TeaCache polynomial, MagCache ratios): given in the config
    or published for this model at the config's size -- checked before anything loads (one ConfigError naming
    ``coefficients`` / ``magcache_ratios``). ``spec`` / ``configs``: the model's family spec and DiT configs when the
    caller has read them (else the model folder is read here; a Ray driver without the model leaves it to the
    workers' load, which runs the same check)."""
    from ..models.step_cache import StepCacheSettings, run_constants

    s = StepCacheSettings.from_config(cfg)
    if s.method not in ("Tea", "Mag") or (s.coefficients if s.method == "Tea" else s.magcache_ratios):
        return
    if configs is None:
        if cfg.launcher == "ray" and cfg.model_path is not None and not Path(cfg.model_path).expanduser().exists():
            return
        from .pipeline import check_model, model_root

        spec, _, configs = check_model(cfg, model_root(cfg))
    for c in configs:
        lookup = getattr(c, "published_cache_constants", None)
        published = lookup(spec.family, cfg.target_height, cfg.target_width, s.use_ret_steps) if lookup else None
        run_constants(s, c, spec.family, published)


def check_quant(cfg, device: torch.device) -> None:
    """Refuse a ``dit_quantized`` run this machine cannot run quantised, before anything loads: no CUDA device,
    a GPU below sm89 (no FP8 tensor cores), torchao missing, a dtype other than bf16 (one ConfigError naming
    ``dit_quantized``: :func:`ditfleet.models.quant.check_quant_runtime`). A Ray driver that sees no GPU leaves
    it to the workers, whose load runs the same check. Pre-quantised files (``dit_quantized_ckpt``, Wan2.2's
    ``high_noise_quantized_ckpt`` / ``low_noise_quantized_ckpt``) are checked first, on any machine
    (:func:`check_quantized_ckpt`)."""
    if not getattr(cfg, "dit_quantized", False):
        return
    from ..config import QUANTIZED_CKPT_KEYS
    from ..models.quant import canonical_scheme, check_quant_runtime

    canonical_scheme(cfg.dit_quant_scheme)
    if any(getattr(cfg, k, None) is not None for k in QUANTIZED_CKPT_KEYS):
        check_quantized_ckpt(cfg)
    if cfg.launcher == "ray" and not torch.cuda.is_available():
        log.info("dit_quantized: this Ray driver sees no GPU; the workers check FP8 support when they load")
        return
    check_quant_runtime(device, cfg.torch_dtype)


def check_quantized_ckpt(cfg) -> None:
    """The pre-quantised files before anything loads: the family takes their keys (``dit_quantized_ckpt`` for one
    DiT, ``high_noise_quantized_ckpt`` / ``low_noise_quantized_ckpt`` for Wan2.2 A14B), each exists and holds
    safetensors, and its headers fit the denoiser its folder describes (fp8 weights, each with its scale, every
    tensor present, none unknown, shapes) -- no tensor data is read
    (:func:`ditfleet.models.wan.loader.check_quantized_ckpt`).

    Raises:
        ConfigError: naming the key (a family without it, a missing path).
        CheckpointError: naming the file and the tensors.
    """
    from ..models.wan.loader import check_quantized_ckpt as check_headers
    from .pipeline import check_model, model_root, quantized_ckpts

    if cfg.launcher == "ray" and cfg.model_path is not None and not Path(cfg.model_path).expanduser().exists():
        return  # a Ray driver without the model (driver_geometry): the workers' load runs the same checks
    spec, root, _ = check_model(cfg, model_root(cfg))
    folders, paths = spec.dit_folders(root), quantized_ckpts(cfg, spec)
    names = [n for n, _ in folders]
    spec.check_prequantized_loras(names, spec.denoiser_loras(cfg.lora_configs or (), names), paths)
    for (_, folder), path, key in zip(folders, paths, spec.quantized_ckpt_keys):
        if path is not None:
            check_headers(folder, path, model_cls=spec.dit_class, key=key)


def check_request(req, geom: ModelGeometry, cfg, *, device: torch.device | None, files: bool = True,
                  keys: tuple[str, str, str] = ("target_video_length", "target_height", "target_width")) -> dict:
    """One request against the model and the device: fields, frame multiple, size; with ``files`` its I2V image.

    Returns the memory estimate (:func:`estimate_bytes`). Raises :class:`RequestError` / ``ImageError``.
    """
    from .pipeline import load_image

    where = f"{req.label}: " if req.label != "request" else ""
    req.validate(cfg.task, spatial_multiple=geom.spatial_multiple)
    if (req.frames - 1) % geom.scale_t:
        raise RequestError(f"{where}{keys[0]}: must be {geom.scale_t}n+1 for this VAE, got {req.frames}")
    est = check_size(geom, req.frames, req.height, req.width, cfg=cfg, device=device, where=where, keys=keys,
                     ranks_on_host=ranks_sharing_host(cfg, device) if device is not None else 1)
    if files and cfg.task == "i2v":
        load_image(req.image)
    return est


__all__ = ["ModelGeometry", "check_quant", "check_quantized_ckpt", "check_request", "check_size", "device_memory", "estimate_bytes", "model_geometry", "preflight"]
