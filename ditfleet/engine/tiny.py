"""The embedded tiny Wan2.1: every component randomly initialised (seeded), written in the Diffusers layout.

With no ``model_path`` the pipeline loads this folder through exactly the code path real weights
take. It shows the machinery (encoders, DiT, sampler, VAE, writers) on any machine in seconds;
its weights are random, so its videos are coloured noise. Nothing is downloaded: the tokenizer
is a small T5-style Unigram vocabulary built here with ``tokenizers``, and every model is built
from a config by Diffusers / transformers.

Layout (what ``WanPipeline`` / ``WanImageToVideoPipeline.save_pretrained`` write)::

    model_index.json  scheduler/  tokenizer/  text_encoder/  transformer/  vae/
    image_encoder/  image_processor/          (I2V only)

The folder is built once per task and builder settings into the cache
(``$DITFLEET_CACHE``, else ``$XDG_CACHE_HOME/ditfleet``, else ``~/.cache/ditfleet``) as
``tiny-<task>-<hash>``: written under a temporary name, marked complete, then renamed, so
concurrent first runs and interrupted builds never leave a half-written model behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import string
from pathlib import Path

import torch

from ..errors import UserError
from ._libs import quiet_libraries
from .encoders import DEFAULT_NEGATIVE_PROMPT

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
MARKER = "ditfleet_tiny.json"
TASKS = ("t2v", "i2v")
FAMILIES = ("wan2.1", "wan2.2_moe", "wan2.2")
#: Diffusers' Wan2.2 A14B boundary ratios (model_index.json), by task.
MOE_BOUNDARY = {"t2v": 0.875, "i2v": 0.9}
TI2V_Z_DIM = 48  # latent channels of the Wan2.2 VAE (TI2V-5B)


#: Builder settings; their hash names the cache folder. Text features (``text.d_model``) feed the
#: DiT's ``text_dim``; CLIP features (``clip.hidden_size``) its ``image_dim``.
TINY_SPEC: dict = {
    "seed": 0,
    "text": {"d_model": 32, "d_kv": 16, "num_heads": 2, "d_ff": 64, "num_layers": 2,
             "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128},
    "dit": {"num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 2, "freq_dim": 256,
            "patch_size": [1, 2, 2], "eps": 1e-6, "cross_attn_norm": True},
    # temperal_downsample [F, T, T] + three down stages keep Wan's 4x time / 8x space compression:
    # 4n+1 frames <-> n+1 latent frames, H/8 x W/8.
    "vae": {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True]},
    "clip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 224, "patch_size": 14},  # 16 x 16 patches + class token = 257 tokens, as ViT-H/14
    "scheduler": {"flow_shift": 5.0},
}


# ---- tokenizer ----------------------------------------------------------------------------------
def tokenizer_vocab() -> list[tuple[str, float]]:
    """A T5-style Unigram vocabulary: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then pieces.

    Pieces: printable ASCII characters, each also with the word-start marker ``▁``, and the
    characters of the default negative prompt (so it is not all ``<unk>``).
    """
    chars = list(dict.fromkeys(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation))
    cjk = list(dict.fromkeys(c for c in DEFAULT_NEGATIVE_PROMPT if not c.isascii()))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -3.0) for c in chars] + [(c, -3.0) for c in cjk]
    return vocab


def build_tokenizer(model_max_length: int = 512):
    """The tiny tokenizer as a transformers fast tokenizer (T5 conventions: appends ``</s>``, pads with id 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram(tokenizer_vocab(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=model_max_length
    )


# ---- components ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_components(task: str = "t2v", spec: dict | None = None, family: str = "wan2.1") -> dict:
    """Build every component of a tiny Wan pipeline in memory (float32, CPU, eval mode, seeded).

    Args:
        task: ``"t2v"`` or ``"i2v"``.
        spec: builder settings (default :data:`TINY_SPEC`).
        family: ``"wan2.1"`` (one DiT; I2V with the CLIP image branch), ``"wan2.2_moe"`` (two experts of one
            architecture, ``boundary_ratio`` by task; I2V without CLIP: the image enters as the condition latent only)
            or ``"wan2.2"`` (TI2V-5B: the Wan2.2 VAE -- 48 latent channels, 4x16x16 with a 2x2 patch, residual --
            and a 48-channel DiT; ``expand_timesteps``; I2V without CLIP: the image's latent is the first latent frame).

    Returns:
        Keyword arguments of ``WanPipeline`` (T2V) or ``WanImageToVideoPipeline`` (I2V):
        ``tokenizer, text_encoder, transformer, vae, scheduler`` (+ ``image_encoder, image_processor``;
        Wan2.2 A14B: + ``transformer_2, boundary_ratio``; TI2V-5B: + ``expand_timesteps``; Wan2.2 I2V with
        ``image_encoder`` / ``image_processor`` None).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    moe = family == "wan2.2_moe"
    ti2v = family == "wan2.2"
    spec = spec or TINY_SPEC
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    seed = int(spec["seed"])
    tokenizer = build_tokenizer()
    t = spec["text"]
    with _seeded(seed + 1):
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=t["d_model"], d_kv=t["d_kv"], d_ff=t["d_ff"], num_layers=t["num_layers"],
            num_heads=t["num_heads"], relative_attention_num_buckets=t["relative_attention_num_buckets"],
            relative_attention_max_distance=t["relative_attention_max_distance"], feed_forward_proj="gated-gelu",
            dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, use_cache=False,
        )).eval()
    d = spec["dit"]
    image = task == "i2v"
    clip = image and family == "wan2.1"  # Wan2.2 I2V (A14B and TI2V-5B) has no CLIP branch
    c = spec["clip"]
    dim = d["num_attention_heads"] * d["attention_head_dim"]

    def dit(offset: int):
        with _seeded(seed + offset):
            return WanTransformer3DModel(
                patch_size=tuple(d["patch_size"]), num_attention_heads=d["num_attention_heads"],
                attention_head_dim=d["attention_head_dim"], in_channels=z if ti2v else (36 if image else 16),
                out_channels=z if ti2v else 16,
                text_dim=t["d_model"], freq_dim=d["freq_dim"], ffn_dim=d["ffn_dim"], num_layers=d["num_layers"],
                cross_attn_norm=d["cross_attn_norm"], qk_norm="rms_norm_across_heads", eps=d["eps"],
                image_dim=c["hidden_size"] if clip else None, added_kv_proj_dim=dim if clip else None,
            ).eval()

    z = TI2V_Z_DIM
    transformer = dit(2)
    v = spec["vae"]
    with _seeded(seed + 3):
        if ti2v:  # the Wan2.2 VAE's structure (residual, 2x2 patch: 16x spatial), tiny widths
            g = torch.Generator().manual_seed(seed + 6)
            vae = AutoencoderKLWan(
                base_dim=v["base_dim"], decoder_base_dim=v["base_dim"], z_dim=z, dim_mult=list(v["dim_mult"]),
                num_res_blocks=v["num_res_blocks"], temperal_downsample=list(v["temperal_downsample"]), is_residual=True,
                in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                latents_mean=(torch.randn(z, generator=g) * 0.5).tolist(),
                latents_std=(torch.rand(z, generator=g) + 0.5).tolist(),
            ).eval()
        else:
            vae = AutoencoderKLWan(
                base_dim=v["base_dim"], z_dim=v["z_dim"], dim_mult=list(v["dim_mult"]), num_res_blocks=v["num_res_blocks"],
                temperal_downsample=list(v["temperal_downsample"]),
            ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec["scheduler"]["flow_shift"],
        num_train_timesteps=1000,
    )
    out = dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler)
    if ti2v:
        out["expand_timesteps"] = True
    if moe:
        out.update(transformer_2=dit(5), boundary_ratio=MOE_BOUNDARY[task])
    if image and not clip:
        out.update(image_encoder=None, image_processor=None)
    if clip:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        with _seeded(seed + 4):
            out["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                image_size=c["image_size"], patch_size=c["patch_size"], projection_dim=c["hidden_size"],
            )).eval()
        out["image_processor"] = build_image_processor(c["image_size"])
    return out


def build_image_processor(size: int = 224):
    """A CLIP image processor (OpenAI mean / std, shortest edge ``size``, centre crop), PIL backend when available."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(
        do_resize=True, size={"shortest_edge": size}, do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def save_components(components: dict, folder: str | Path, task: str) -> Path:
    """Write ``components`` as a Diffusers pipeline folder (``model_index.json`` + one folder per component)."""
    with quiet_libraries():
        from diffusers import WanImageToVideoPipeline, WanPipeline

        cls = WanImageToVideoPipeline if task == "i2v" else WanPipeline
        cls(**components).save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


# ---- the cache ----------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$DITFLEET_CACHE``, else ``$XDG_CACHE_HOME/ditfleet``, else ``~/.cache/ditfleet``."""
    if os.environ.get("DITFLEET_CACHE"):
        return Path(os.environ["DITFLEET_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ditfleet"


def spec_hash(task: str, spec: dict | None = None) -> str:
    """Hash of everything that determines the tiny folder's bytes (settings, task, library versions)."""
    import diffusers
    import transformers

    key = {
        "builder": BUILDER_VERSION,
        "task": task,
        "spec": spec or TINY_SPEC,
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def tiny_model_path(task: str = "t2v", *, cache_dir: str | Path | None = None, spec: dict | None = None) -> Path:
    """The tiny model folder for ``task``, built into the cache on first use (atomic; a few seconds).

    Returns:
        The folder (a Diffusers pipeline layout), ready for ``Pipeline`` / ``load_dit``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"tiny-{task}-{spec_hash(task, spec)}"
    if (final / MARKER).is_file():
        return final
    if final.exists():  # not built by a complete run of this function: rebuild
        log.warning("tiny model folder %s is incomplete; rebuilding it", final)
        shutil.rmtree(final, ignore_errors=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the tiny-model cache {str(root)!r} ({e.strerror}); set DITFLEET_CACHE to a "
                        "writable folder") from None
    tmp = root / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        log.info("building the embedded tiny %s model (random weights) in %s", task.upper(), final)
        save_components(build_components(task, spec), tmp, task)
        (tmp / MARKER).write_text(json.dumps({"task": task, "spec": spec or TINY_SPEC, "builder": BUILDER_VERSION,
                                              "note": "random weights: demonstrates the machinery only"}, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
