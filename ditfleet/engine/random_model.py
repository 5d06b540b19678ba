"""A random-weight Wan2.1 model folder at a real DiT shape (e.g. 1.3B), for scaling tests without downloads.

The DiT has the real hyperparameters (``WanDiTConfig.t2v_1_3b()`` by default: 30 blocks, dim 1536,
12 heads); the text encoder is a one-layer UMT5 whose ``d_model`` equals the DiT's ``text_dim``
(4096), and the VAE is the tiny one (``z_dim`` 16, Wan's 4x time / 8x space compression), so the
folder is a complete Diffusers Wan2.1 pipeline that :class:`~ditfleet.engine.pipeline.Pipeline`
loads through the same code path as real weights, with the DiT's cost at full size::

    from ditfleet.engine.random_model import build_random_model
    build_random_model("/tmp/wan-1.3b-random")        # ~2.6 GB of bf16 DiT weights
    # then: ditfleet generate --set model_path=/tmp/wan-1.3b-random --set target_height=480 ...
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from .tiny import TINY_SPEC, build_components, save_components


def build_random_model(folder: str | Path, dit=None, *, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a Diffusers Wan2.1 folder with a random DiT of shape ``dit`` (default: T2V 1.3B).

    Args:
        folder: where to write (must not hold a model yet; created).
        dit: a :class:`~ditfleet.models.wan.WanDiTConfig` (``model_type`` t2v or i2v).
        device: where the DiT is initialised (``"cuda"`` is much faster for large shapes).
        dtype: dtype of the saved DiT weights.
        seed: seed of the DiT's random weights (the small components use the tiny model's seeds).

    Returns:
        ``folder`` as a Path.
    """
    from safetensors.torch import save_file

    from ..models.wan import WanDiTConfig, build_dit, convert_to_diffusers

    dit = dit or WanDiTConfig.t2v_1_3b()
    if dit.model_type not in ("t2v", "i2v"):
        raise ValueError(f"model_type must be t2v or i2v, got {dit.model_type!r}")
    out = Path(folder)
    if (out / "model_index.json").exists():
        raise FileExistsError(f"{out} already holds a model")
    spec = copy.deepcopy(TINY_SPEC)
    spec["text"].update(d_model=dit.text_dim, num_layers=1, num_heads=4, d_kv=32, d_ff=256)
    if dit.model_type == "i2v":
        spec["clip"].update(hidden_size=dit.image_dim, num_hidden_layers=1, num_attention_heads=8, intermediate_size=256)
    save_components(build_components(dit.model_type, spec), out, dit.model_type)
    shutil.rmtree(out / "transformer")  # the tiny stand-in the pipeline writer needed
    model = build_dit(dit, device=device, dtype=dtype, seed=seed)
    official = out / ".dit-official"
    official.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(official / "diffusion_pytorch_model.safetensors"))
    del model
    (official / "config.json").write_text(json.dumps(dit.to_official(), indent=2) + "\n")
    convert_to_diffusers(official, out / "transformer")
    shutil.rmtree(official)
    return out
