"""The components of one model on one rank (:class:`Pipeline`: encoders, denoiser(s), VAE) and the request.

A request runs through :class:`~ditfleet.engine.Engine` (one generate path for every launcher; a local run
uses the in-process executor): rank 0's worker calls :meth:`Pipeline.check`, :meth:`Pipeline.encode`, the
runner's denoising loop, :meth:`Pipeline.decode_stream` and :meth:`Pipeline.report`::

    from ditfleet.engine import Engine
    with Engine.start(cfg, launcher="local") as engine:   # loads every component once
        result = engine.generate(prompt="a cat", output="cat.mp4")
        engine.pipeline.runner                             # the components (a local engine)

Components come from ``model_path`` in the Diffusers layout (``tokenizer/``, ``text_encoder/``,
``transformer/``, ``vae/``; ``image_encoder/``, ``image_processor/`` for I2V). The DiT is loaded
by :func:`ditfleet.models.wan.load_dit` (which also reads official release folders); with
``model_path`` null, the embedded tiny random model (:mod:`.tiny`) is built into the cache and
loaded the same way. Where this module is silent, it does what Diffusers' ``WanPipeline`` /
``WanImageToVideoPipeline`` do; sampling follows the official Wan2.1 script (:mod:`.sampler`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError
from ..models.step_cache import StepCacheSettings
from .encoders import DEFAULT_NEGATIVE_PROMPT, ImageEncoder, TextEncoder
from .errors import ImageError, ModelFolderError, RequestError
from .request import EncodedRequest, GenerateRequest
from .runner import ModelRunner
from .sparge_weights import bind_sparge
from .tiny import tiny_model_path
from .vae import WanVAE
from .video import check_output, file_stamp

log = logging.getLogger(__name__)

#: The official Wan2.1 T2V example prompt, used when neither the config nor the command line gives one.
DEFAULT_PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."
DEFAULT_OUTPUT_DIR = "outputs"

LAYOUT_HELP = (
    "a Diffusers Wan2.1 folder (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) holds model_index.json, "
    "tokenizer/ (tokenizer.json or spiece.model), text_encoder/ (config.json, model*.safetensors), "
    "transformer/ (config.json, diffusion_pytorch_model*.safetensors), vae/ (config.json, "
    "diffusion_pytorch_model.safetensors), and for I2V image_encoder/ (config.json, model*.safetensors) "
    "and image_processor/ (preprocessor_config.json)"
)
OFFICIAL_MARKERS = ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth")


# ---- config -> request ----------------------------------------------------------------------------
def default_output(task: str, seed: int) -> str:
    """``outputs/ditfleet-<task>-<time>-seed<seed>.mp4``, with ``-2``, ``-3``, ... when that name is taken."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(DEFAULT_OUTPUT_DIR, f"ditfleet-{task}-{stamp}-seed{seed}")
    n = 1
    while any(os.path.exists(f"{base}{'' if n == 1 else f'-{n}'}{ext}") for ext in (".mp4", ".json")):
        n += 1
    return f"{base}{'' if n == 1 else f'-{n}'}.mp4"


def request_from_config(cfg, **overrides) -> GenerateRequest:
    """The request a config describes; ``overrides`` (non-None values) replace its fields.

    Reads ``prompt``, ``negative_prompt``, ``image_path``, ``output``, ``fps`` and ``sample_solver``
    when the config has them (defaults otherwise), and the sampling keys (``seed``,
    ``target_video_length``, ``target_height``, ``target_width``, ``infer_steps``, ``sample_shift``,
    ``sample_guide_scale``, ``enable_cfg``).
    """
    fields = dict(
        prompt=getattr(cfg, "prompt", None) or DEFAULT_PROMPT,
        negative_prompt=getattr(cfg, "negative_prompt", None),
        image=getattr(cfg, "image_path", None),
        seed=cfg.seed,
        frames=cfg.target_video_length,
        height=cfg.target_height,
        width=cfg.target_width,
        steps=cfg.infer_steps,
        shift=cfg.sample_shift,
        guide_scale=tuple(cfg.sample_guide_scale) if isinstance(cfg.sample_guide_scale, list) else cfg.sample_guide_scale,
        enable_cfg=cfg.enable_cfg,
        solver=getattr(cfg, "sample_solver", None) or "unipc",
        step_list=tuple(cfg.denoising_step_list) if getattr(cfg, "denoising_step_list", None) else None,
        fps=getattr(cfg, "fps", None) or 16,
        output=getattr(cfg, "output", None),
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if not fields["output"]:
        fields["output"] = default_output(cfg.task, fields["seed"])
    return GenerateRequest(**fields)


# ---- the model folder --------------------------------------------------------------------------
def _weights_present(folder: Path, single: str, index: str, problems: list[str], root: Path) -> None:
    rel = folder.relative_to(root)
    if (folder / index).is_file():
        try:
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{rel / index} is not a valid index (no weight_map)")
            return
        problems.extend(f"{rel / s} (listed in {index})" for s in shards if not (folder / s).is_file())
    elif not (folder / single).is_file():
        if not list(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
            hint = f" (found {', '.join(pickles)}: ditfleet reads safetensors only)" if pickles else ""
            problems.append(f"{rel / single}{hint}")


def model_spec(cfg, root: Path):
    """The :class:`~ditfleet.models.spec.ModelSpec` of the run: ``model_cls``, or the folder's family (checked
    against the task)."""
    from ..models.registry import resolve_family

    spec = resolve_family(cfg.model_cls, root)
    spec.check_task(cfg.task)
    return spec


def check_model(cfg, path: str | Path):
    """Everything checked of the model folder before a weight is read -- its family (against the task), its layout
    (:func:`check_model_folder`), and each denoiser's ``config.json`` against the task -- shared by
    :meth:`Pipeline.from_config`, :func:`load_runner` and preflight. Returns ``(spec, folder, denoiser configs)``."""
    folder = Path(path).expanduser()
    spec = model_spec(cfg, folder) if folder.is_dir() else None  # a missing folder: check_model_folder names it
    weights = dit_weights(cfg, spec) if spec is not None else None
    root = check_model_folder(path, cfg.task, spec, dit_weights=weights)
    spec = spec or model_spec(cfg, root)
    configs = dit_configs(root, spec, weights)
    for c in configs:
        _check_task(root, cfg.task, c, first_frame=spec.first_frame_i2v)
    return spec, root, configs


def quantized_ckpts(cfg, spec) -> list[Path | None]:
    """Each denoiser's pre-quantised file, in ``spec.dit_folders`` order (``None``: read from its folder): the
    config's ``spec.quantized_ckpt_keys`` when ``dit_quantized``.

    Raises:
        ConfigError: a pre-quantised-file key the family does not take (``dit_quantized_ckpt`` for Wan2.2 A14B, say).
    """
    from ..config import QUANTIZED_CKPT_KEYS, check_quantized_keys

    given = {k: getattr(cfg, k, None) for k in QUANTIZED_CKPT_KEYS}
    given = {k: v for k, v in given.items() if v is not None}
    if not getattr(cfg, "dit_quantized", False) or not given:
        return [None] * spec.experts
    check_quantized_keys(spec, given)
    return [Path(given[k]).expanduser() if k in given else None for k in spec.quantized_ckpt_keys]


def dit_weights(cfg, spec) -> list[list[Path] | None]:
    """Per denoiser (``spec.dit_folders`` order) the files its tensors come from when not its folder's: its
    pre-quantised file's (:func:`quantized_ckpts`; that DiT folder then needs only its ``config.json``); ``None``:
    the folder's own."""
    from ..models.wan.loader import quantized_files

    paths = quantized_ckpts(cfg, spec)
    if not any(paths):
        return paths
    return [None if p is None else quantized_files(p, key) for p, key in zip(paths, spec.quantized_ckpt_keys)]


def dit_configs(root: Path, spec, weights: list | None = None) -> list:
    """Each denoiser's ``WanDiTConfig`` (read from its ``config.json``; no weights). ``weights``: as
    :func:`dit_weights`."""
    from ..models.wan import find_checkpoint

    weights = weights or [None] * len(spec.dit_folders(root))
    return [find_checkpoint(folder, weights=w).config for (_, folder), w in zip(spec.dit_folders(root), weights)]


def _uses_clip(root: Path, spec, weights: list | None = None) -> bool:
    """The first denoiser has the CLIP image branch (Wan2.1 I2V; not Wan2.2 A14B I2V nor TI2V-5B): by its checkpoint
    (config and tensor names: an official Wan2.2 I2V config says ``i2v`` as Wan2.1's does), else its config.json.
    ``weights``: as :func:`dit_weights`."""
    from ..models.wan import find_checkpoint

    (_, folder), *_ = spec.dit_folders(root)
    try:
        return find_checkpoint(folder, weights=(weights or [None])[0]).config.has_image_branch
    except UserError:
        pass  # no weights or no readable config: the checks below name the files
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return True  # the checks below name the file
    return bool(data.get("image_dim") or data.get("added_kv_proj_dim") or data.get("model_type") in ("i2v", "flf2v"))


def check_model_folder(path: str | Path, task: str, spec=None, *, dit_weights: list | None = None) -> Path:
    """Check that ``path`` is a complete Diffusers Wan folder for ``task`` before loading anything.

    ``spec``: the model family (its denoiser folders: ``transformer/``, and ``transformer_2/`` for Wan2.2 A14B);
    ``None``: the folder's own. ``dit_weights``: per denoiser, the files its tensors come from instead of its
    folder (a pre-quantised file: :func:`dit_weights`); such a denoiser's folder needs only ``config.json``.

    Raises:
        ModelFolderError: naming every missing file and what a valid layout holds.
        CheckpointError: a two-expert folder with an expert missing.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelFolderError(f"model_path {str(path)!r} does not exist; point it at {LAYOUT_HELP}")
    if not root.is_dir():
        raise ModelFolderError(f"model_path {str(path)!r} is a file; point it at the folder: {LAYOUT_HELP}")
    if any((root / m).exists() for m in OFFICIAL_MARKERS) and not (root / "text_encoder").is_dir():
        raise ModelFolderError(
            f"model_path {str(root)!r} is an official Wan2.1 release folder (.pth text encoder and VAE); the pipeline "
            f"reads the Diffusers layout (the Wan-AI/Wan2.1-*-Diffusers repositories): {LAYOUT_HELP}"
        )
    if spec is None:
        from ..models.registry import resolve_family

        spec = resolve_family(None, root)
    problems: list[str] = []
    tok = root / "tokenizer"
    if not any((tok / f).is_file() for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
        problems.append("tokenizer/tokenizer.json (or spiece.model)")
    dits = [name for name, folder in spec.dit_folders(root) if folder != root] or ["transformer"]
    comps = [("text_encoder", "model.safetensors", "model.safetensors.index.json"),
             ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")]
    comps += [(folder.name, "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
              for name, folder in spec.dit_folders(root) if name in dits]
    if task == "i2v" and _uses_clip(root, spec, dit_weights):
        comps.append(("image_encoder", "model.safetensors", "model.safetensors.index.json"))
        if not (root / "image_processor" / "preprocessor_config.json").is_file():
            problems.append("image_processor/preprocessor_config.json")
    elsewhere = {folder.name for (_, folder), w in zip(spec.dit_folders(root), dit_weights or []) if w is not None}
    for name, single, index in comps:
        folder = root / name
        if not (folder / "config.json").is_file():
            problems.append(f"{name}/config.json")
        if name in elsewhere:
            continue  # this denoiser's weights are its pre-quantised file's
        if folder.is_dir():
            _weights_present(folder, single, index, problems, root)
        else:
            problems.append(f"{name}/{single}")
    if problems:
        raise ModelFolderError(f"model folder {str(root)!r} is incomplete for task {task}: missing "
                               f"{', '.join(problems)}; {LAYOUT_HELP}")
    return root


def _load(component: str, root: Path, fn):
    from safetensors import SafetensorError

    try:
        return fn()
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFolderError(f"{root / component}: cannot be loaded ({type(e).__name__}: {msg})") from e


def model_root(cfg) -> Path:
    """The model folder a config names: ``model_path``, or the embedded tiny model (built into the cache on first use)."""
    return tiny_model_path(cfg.task) if cfg.model_path is None else Path(cfg.model_path).expanduser()


def quant_scheme(cfg) -> str | None:
    """The DiT linears' quantisation of a config: its ``dit_quant_scheme`` when ``dit_quantized``, else ``None``."""
    return cfg.dit_quant_scheme if getattr(cfg, "dit_quantized", False) else None


def load_runner(cfg, *, device: torch.device, mesh=None, sparge_state: dict | None = None,
                read_sparge_file: bool = True) -> ModelRunner:
    """Only the denoiser(s) (a :class:`ModelRunner`), for ranks that neither encode nor decode; same checks and
    arguments as :meth:`Pipeline.from_config`."""
    spec, root, configs = check_model(cfg, model_root(cfg))
    _check_experts(cfg, spec)
    _check_before_load(cfg, device, spec, configs)
    return _load_denoisers(cfg, root, spec, cfg.resolve_attention(device), device=device, mesh=mesh,
                           sparge_state=sparge_state, read_sparge_file=read_sparge_file)


def _load_denoisers(cfg, root: Path, spec, attention, *, device: torch.device, mesh, sparge_state: dict | None,
                    read_sparge_file: bool) -> ModelRunner:
    """The :class:`ModelRunner` of the run (every denoiser as the config asks: LoRAs, quantisation, pre-quantised
    files, step cache) with Sparge bound -- the one load of :func:`load_runner` and :meth:`Pipeline.from_config`."""
    runner = ModelRunner.load(root, device=device, dtype=cfg.torch_dtype, attention=attention, mesh=mesh,
                              radial=cfg.radial_attn_setting, spec=spec, boundary=cfg.boundary,
                              loras=cfg.lora_configs, quant=quant_scheme(cfg), quantized=quantized_ckpts(cfg, spec),
                              step_cache=StepCacheSettings.from_config(cfg))
    for dit in runner.denoisers:
        bind_sparge(dit, cfg, sparge_state, read_file=read_sparge_file)
    return runner


def _check_before_load(cfg, device: torch.device, spec, configs) -> None:
    """The preflight checks that need no weights, before any component loads: a ``dit_quantized`` run this device
    cannot run, a ``feature_caching`` rule without its constants for this model."""
    from .preflight import check_cache, check_quant

    check_quant(cfg, device)
    check_cache(cfg, spec, configs)


def _check_experts(cfg, spec) -> None:
    """Settings that only fit a number of experts: per-expert scales, a boundary, one-DiT Sparge thresholds."""
    from ..errors import ConfigError

    two = isinstance(cfg.sample_guide_scale, list) and len(cfg.sample_guide_scale) == 2
    if spec.experts == 1 and two:
        raise ConfigError("sample_guide_scale", f"[high_noise, low_noise] scales need a two-expert model (wan2.2_moe); "
                                                f"{spec.family} has one DiT: give one number")
    if spec.experts == 1 and cfg.boundary is not None:
        spec.check_boundary(cfg.boundary, "boundary")
    if spec.experts == 2 and cfg.sparge and cfg.sparge_ckpt is not None:
        raise ConfigError("sparge_ckpt", f"{cfg.sparge_ckpt}: tuned thresholds describe one DiT, and {spec.family} has "
                                         "two experts; use sparge_attn_setting.topk (both experts), or drop sparge")


# ---- images --------------------------------------------------------------------------------------
def load_image(path: str | Path):
    """Open an image file as RGB (EXIF orientation applied). Raises :class:`ImageError`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.exists():
        raise ImageError(f"image {str(path)!r} does not exist")
    if p.is_dir():
        raise ImageError(f"image {str(path)!r} is a folder, expected an image file (png, jpg, webp, ...)")
    try:
        with Image.open(p) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"image {str(path)!r} cannot be read as an image ({e})") from None


# ---- results ---------------------------------------------------------------------------------------
@dataclass
class GenerateResult:
    """What :meth:`~ditfleet.engine.Engine.generate` produced.

    Attributes:
        output: the written video (``None`` with ``decode=False``).
        report_path: its JSON report (``None`` with ``decode=False``).
        report: the report's content.
        latents: float32 ``[1, z, F', h, w]`` the final latents, on the CPU: what the VAE decodes (Wan2.2 TI2V-5B
            image-to-video: the sampler's with the image's first latent frame in place, :meth:`Pipeline.final_latents`).
        frames: frames written.
    """

    output: Path | None
    report_path: Path | None
    report: dict
    latents: torch.Tensor
    frames: int = 0
    timings: dict = field(default_factory=dict)


def _peak_memory(device: torch.device) -> dict:
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)}
    if device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


class _Progress:
    """tqdm over the denoising steps or decoded latent frames (off when stderr is not a terminal, or quiet)."""

    def __init__(self, total: int, label: str, quiet: bool, unit: str = "step"):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=unit, leave=False, dynamic_ncols=True)

    def __call__(self, i: int, n: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the pipeline ------------------------------------------------------------------------------------
class Pipeline:
    """Every component of one model, loaded once (the component bundle a worker runs a request with:
    :meth:`check`, :meth:`encode`, the runner, :meth:`decode_stream`, :meth:`report`; requests run through
    :class:`~ditfleet.engine.Engine`).

    Build it with :meth:`from_config`. Attributes: ``cfg``, ``model_path``, ``tiny`` (embedded
    random model), ``device``, ``text_encoder``, ``image_encoder`` (I2V), ``vae``, ``runner``
    (:class:`ModelRunner`), ``attention`` (resolved kernel per site), ``load_timings``.
    """

    def __init__(self, cfg, *, model_path: Path, tiny: bool, device: torch.device, text_encoder: TextEncoder,
                 image_encoder: ImageEncoder | None, vae: WanVAE, runner: ModelRunner, attention: dict,
                 load_timings: dict):
        self.cfg, self.model_path, self.tiny, self.device = cfg, model_path, tiny, device
        self.text_encoder, self.image_encoder, self.vae, self.runner = text_encoder, image_encoder, vae, runner
        self.attention, self.load_timings = attention, load_timings
        self.geometry = None  # the size checks' view of the model (read on the first request)
        self._condition = None  # the last encode's first-frame condition (TI2V-5B image-to-video), for decoding

    @classmethod
    def from_config(cls, cfg, *, mesh=None, device: torch.device | None = None, sparge_state: dict | None = None,
                    read_sparge_file: bool = True) -> Pipeline:
        """Check the model folder, resolve the attention kernels, load every component once.

        Args:
            cfg: the run config.
            mesh: the parallel mesh of this rank (``None``: a world of one).
            device: where to load (default: the config's device).
            sparge_state: Sparge thresholds already loaded (an engine's broadcast); ``None``: read
                ``cfg.sparge_ckpt`` here if ``read_sparge_file``, or use ``sparge_attn_setting.topk``.
            read_sparge_file: False for engine workers, which never open the checkpoint themselves.

        Raises:
            ModelFolderError / CheckpointError: the folder is missing, incomplete or inconsistent.
            ConfigError: a kernel the config asks for cannot run here (``strict_backends``).
        """
        t0 = time.perf_counter()
        device = device or cfg.torch_device()
        tiny = cfg.model_path is None
        root = model_root(cfg)
        t_build = time.perf_counter() - t0
        spec, root, configs = check_model(cfg, root)  # before any weight is read
        _check_experts(cfg, spec)
        _check_before_load(cfg, device, spec, configs)
        attention = cfg.resolve_attention(device)
        dtype = cfg.torch_dtype
        # UMT5 overflows in fp16: encode text in bf16 then (the official T5 dtype), else the run dtype.
        text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
        t1 = time.perf_counter()
        text = _load("text_encoder", root, lambda: TextEncoder.load(root, device=device, dtype=text_dtype, text_len=cfg.text_len))
        image = None
        if cfg.task == "i2v" and configs[0].has_image_branch:  # what check_model's _uses_clip read
            image = _load("image_encoder", root, lambda: ImageEncoder.load(root, device=device, dtype=dtype))
        vae = _load("vae", root, lambda: WanVAE.load(root, device=device))
        t2 = time.perf_counter()
        runner = _load_denoisers(cfg, root, spec, attention, device=device, mesh=mesh, sparge_state=sparge_state,
                                 read_sparge_file=read_sparge_file)
        t3 = time.perf_counter()
        for dit in runner.denoisers:
            _check_compatible(root, cfg, dit.config, text, image, vae, first_frame=spec.first_frame_i2v)
        timings = {"build_tiny_s": t_build, "encoders_vae_s": t2 - t1, "dit_s": t3 - t2, "total_s": t3 - t0}
        from ..attention.registry import log_resolutions

        log_resolutions([r for r in attention.values() if r is not None], log)
        if tiny:
            log.info("model: the embedded tiny Wan2.1 (random weights: the video is noise; set model_path to real "
                     "Wan2.1 Diffusers weights for real videos)")
        return cls(cfg, model_path=root, tiny=tiny, device=device, text_encoder=text, image_encoder=image, vae=vae,
                   runner=runner, attention=attention, load_timings=timings)

    # ---- one request ------------------------------------------------------------------------------
    def check(self, req: GenerateRequest, *, files: bool = True) -> None:
        """Validate a request (fields; with ``files``, also the output path and the image) before any work."""
        from .preflight import check_request, model_geometry

        if self.geometry is None:
            self.geometry = model_geometry(self.cfg)
        check_request(req, self.geometry, self.cfg, device=self.device, files=files)
        if isinstance(req.guide_scale, (tuple, list)) and len(self.runner.denoisers) == 1:
            raise RequestError(f"{'' if req.label == 'request' else req.label + ': '}guide_scale: "
                               f"{list(req.guide_scale)} gives one scale per expert, but this model has one DiT "
                               f"({self.runner.family or 'wan2.1'}); give one number")
        if files:
            check_output(req.output, overwrite=req.overwrite)

    def encode(self, req: GenerateRequest, timings: dict | None = None, *, image=None) -> EncodedRequest:
        """Text (and image) encoding, once per request: the tensors every rank receives.

        ``image``: the I2V reference as a PIL image already read (e.g. by a driver on another
        machine); ``None`` reads ``req.image``.
        """
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        context = self.text_encoder.encode(req.prompt)
        neg = req.negative_prompt if req.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
        context_null = self.text_encoder.encode(neg) if req.enable_cfg else None
        timings["encode_text_s"] = time.perf_counter() - t0
        clip_fea = y = None
        if self.cfg.task == "i2v":
            t1 = time.perf_counter()
            from diffusers.video_processor import VideoProcessor

            img = image if image is not None else load_image(req.image)
            if abs((img.width * req.height) / (img.height * req.width) - 1) > 0.01:
                log.warning("%simage %s is %dx%d (aspect %.3f) and is stretched to the video's %dx%d (aspect %.3f); "
                            "crop it to the video's aspect, or set target_width / target_height to keep its shape",
                            "" if req.label == "request" else req.label + ": ", req.image, img.width, img.height, img.width / img.height, req.width,
                            req.height, req.width / req.height)
            clip_fea = self.image_encoder.encode(img) if self.image_encoder is not None else None  # Wan2.2: no CLIP
            pixels = VideoProcessor(vae_scale_factor=self.vae.scale_s).preprocess(img, height=req.height, width=req.width)
            pixels = pixels.to(self.vae.device, torch.float32)
            first_frame = getattr(self.runner.dit, "image_condition", None)
            if first_frame is not None:  # TI2V-5B: the image's latent is the first latent frame
                y = first_frame(self.vae.encode_image(pixels), self.vae.latent_shape(req.frames, req.height, req.width))
            else:  # mask + latent of [image, 0, 0, ...] as extra DiT input channels
                y = self.vae.encode_condition(pixels, req.frames)
            timings["encode_image_s"] = time.perf_counter() - t1
        self._condition = y if getattr(self.runner.dit, "final_latents", None) is not None else None
        return EncodedRequest(
            context=context, context_null=context_null, clip_fea=clip_fea, y=y,
            latent_shape=self.vae.latent_shape(req.frames, req.height, req.width), seed=req.seed, steps=req.steps,
            shift=req.shift, guide_scale=req.guide_scale, enable_cfg=req.enable_cfg, solver=req.solver,
            step_list=req.step_list,
        )

    def final_latents(self, latents: torch.Tensor, enc: EncodedRequest | None = None) -> torch.Tensor:
        """The latents the VAE decodes: the sampler's ``[1, z, F', h, w]``, with the first latent frame replaced by the
        image's for Wan2.2 TI2V-5B image-to-video (``enc.y``; ``enc`` None: the last :meth:`encode`'s); else as they are."""
        final = getattr(self.runner.dit, "final_latents", None)
        if final is None:
            return latents
        return final(latents, enc.y if enc is not None else self._condition)

    def decode_stream(self, latents: torch.Tensor, enc: EncodedRequest | None = None):
        """Decode the sampler's ``latents`` ``[1, z, F', h, w]`` (any device; :meth:`final_latents` of ``enc``, the
        request they were denoised for, first; ``None``: the last encode's) frame chunk by frame chunk: uint8
        ``[n, H, W, 3]`` each."""
        yield from self.vae.decode_stream(self.final_latents(latents.to(self.vae.device), enc))

    def report(self, req: GenerateRequest, enc: EncodedRequest, timings: dict, output: Path | None, frames: int) -> dict:
        cfg, par = self.cfg, self.cfg.parallel
        sampler = self.runner.sampler(enc)
        return {
            "ditfleet_version": __version__,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "output": str(output) if output is not None else None,
            "output_file": file_stamp(output) if output is not None and output.is_file() else None,
            "frames": frames,
            "request": {k: v for k, v in req.__dict__.items()},
            "negative_prompt_used": req.negative_prompt if req.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
            "seed": req.seed,
            "noise": f"torch.randn(1, {', '.join(map(str, enc.latent_shape))}) float32 from "
                     "torch.Generator('cpu').manual_seed(seed)",
            "model": {"path": str(self.model_path), "embedded_tiny_random": self.tiny, "task": cfg.task,
                      "family": self.runner.family,
                      "dit": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.runner.dit.config.__dict__.items()},
                      "denoisers": self.runner.denoisers.describe()},
            "device": str(self.device),
            "dtype": cfg.dtype,
            "attention": {site: (r.as_dict() if r is not None else None) for site, r in self.attention.items()},
            "parallel": {"launcher": cfg.launcher, "world_size": par.world_size, "cfg_p_size": par.cfg_p_size,
                         "seq_p_size": par.seq_p_size, "seq_p_attn_type": par.seq_p_attn_type,
                         "ring_degree": par.ring_degree, "ulysses_degree": par.ulysses_degree,
                         "cfg_mode": ("split over cfg ranks" if par.cfg_p_size == 2 else
                                      "batch of 2" if self.runner.cfg_batch and not self.runner.cache_settings.active
                                      else "one branch after the other")  # a step cache runs the branches apart
                         if enc.enable_cfg else "off"},
            "sampler": {**sampler.describe(), "shift": enc.shift, "schedule": self.runner.schedule,
                        "guide_scale": enc.guide_scale, "enable_cfg": enc.enable_cfg},
            "timings_s": timings,
            "load_timings_s": self.load_timings,
            "peak_memory": _peak_memory(self.device),
            "config": cfg.to_dict(),
        }


def _check_task(root: Path, task: str, dit_cfg, first_frame: bool = False) -> None:
    """An I2V DiT takes the image condition ``y`` (in_dim > out_dim: Wan2.1 I2V with CLIP, Wan2.2 A14B I2V without);
    ``first_frame``: the family runs image-to-video by replacing the first latent frame (TI2V-5B: either task)."""
    tcfg = root / "transformer" / "config.json"
    conditioned = dit_cfg.has_image_branch or dit_cfg.in_dim > dit_cfg.out_dim
    if task == "i2v" and not conditioned and not first_frame:
        raise ModelFolderError(f"task i2v needs an I2V model, but {tcfg} describes a {dit_cfg.model_type} DiT (no image "
                               "input); set task to t2v or point model_path at Wan2.1 / Wan2.2 I2V weights")
    if task == "t2v" and conditioned:
        raise ModelFolderError(f"task t2v, but {tcfg} describes an image-conditioned DiT (in_dim {dit_cfg.in_dim}); "
                               "set task to i2v (and give an image)")


def _check_compatible(root: Path, cfg, dit_cfg, text: TextEncoder, image: ImageEncoder | None, vae: WanVAE,
                      first_frame: bool = False) -> None:
    """The components must fit together and the task: name both files when they do not."""
    tcfg = root / "transformer" / "config.json"
    _check_task(root, cfg.task, dit_cfg, first_frame)
    if text.dim != dit_cfg.text_dim:
        raise ModelFolderError(f"{root / 'text_encoder' / 'config.json'}: d_model {text.dim} != text_dim {dit_cfg.text_dim} of {tcfg}")
    if cfg.text_len > dit_cfg.text_len:
        raise ModelFolderError(f"text_len {cfg.text_len} exceeds the DiT's text_len {dit_cfg.text_len} ({tcfg})")
    if image is not None and image.dim != dit_cfg.image_dim:
        raise ModelFolderError(f"{root / 'image_encoder' / 'config.json'}: hidden_size {image.dim} != image_dim "
                               f"{dit_cfg.image_dim} of {tcfg}")
    want_in = vae.z_dim * 2 + vae.scale_t if cfg.task == "i2v" and not first_frame else vae.z_dim
    if dit_cfg.in_dim != want_in or dit_cfg.out_dim != vae.z_dim:
        raise ModelFolderError(f"{root / 'vae' / 'config.json'}: z_dim {vae.z_dim} does not fit {tcfg} (in_dim "
                               f"{dit_cfg.in_dim}, out_dim {dit_cfg.out_dim}; expected {want_in} and {vae.z_dim})")
