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
import os
import shutil
from pathlib import Path

import torch

from .tiny import TINY_SPEC, build_components, save_components


#: The VAE of the Wan2.1 release (``AutoencoderKLWan``'s own defaults): ``real_vae=True`` gives the folder it with
#: random weights, so that a request's decode costs what it costs with real weights.
WAN21_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
             "temperal_downsample": [False, True, True]}


def build_random_model(folder: str | Path, dit=None, *, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0, family: str = "wan2.1",
                       real_vae: bool = False, share_experts: bool = False) -> Path:
    """Write a Diffusers Wan folder with random DiT(s) of shape ``dit`` (default: T2V 1.3B).

    Args:
        folder: where to write (must not hold a model yet; created).
        dit: a :class:`~ditfleet.models.wan.WanDiTConfig` (``model_type`` t2v or i2v).
        device: where the DiT is initialised (``"cuda"`` is much faster for large shapes).
        dtype: dtype of the saved DiT weights.
        seed: seed of the DiT's random weights (the small components use the tiny model's seeds).
        family: ``"wan2.1"`` (``transformer/``) or ``"wan2.2_moe"`` (``transformer/`` + ``transformer_2/`` and the
            task's ``boundary_ratio``: a Wan2.2 A14B folder; the low-noise expert is seeded ``seed + 1``).
        real_vae: the Wan2.1 release's VAE architecture (:data:`WAN21_VAE`, random weights) instead of the tiny
            one: encode / decode then cost what they cost at full size.
        share_experts: ``wan2.2_moe``: the second expert's weight file is a hard link to the first's (half the disk;
            both experts are still loaded, as two models, so the memory and the switch are the real ones; the
            weights are equal).

    Returns:
        ``folder`` as a Path.

    Each DiT is written in the official layout (``config.json`` of ``WanModel`` + official tensor names) inside its
    Diffusers component folder; the loader reads either layout.
    """
    from safetensors.torch import save_file

    from ..models.wan import WanDiTConfig, build_dit
    from .tiny import MOE_BOUNDARY

    dit = dit or WanDiTConfig.t2v_1_3b()
    if dit.model_type not in ("t2v", "i2v"):
        raise ValueError(f"model_type must be t2v or i2v, got {dit.model_type!r}")
    if family not in ("wan2.1", "wan2.2_moe"):
        raise ValueError(f"family must be wan2.1 or wan2.2_moe, got {family!r}")
    moe = family == "wan2.2_moe"
    if share_experts and not moe:
        raise ValueError("share_experts needs family wan2.2_moe")
    out = Path(folder)
    if (out / "model_index.json").exists():
        raise FileExistsError(f"{out} already holds a model")
    spec = copy.deepcopy(TINY_SPEC)
    spec["text"].update(d_model=dit.text_dim, num_layers=1, num_heads=4, d_kv=32, d_ff=256)
    if real_vae:
        spec["vae"].update(WAN21_VAE)
    if dit.model_type == "i2v" and not moe:
        spec["clip"].update(hidden_size=dit.image_dim, num_hidden_layers=1, num_attention_heads=8, intermediate_size=256)
    save_components(build_components(dit.model_type, spec, family=family), out, dit.model_type)
    experts = ["transformer", "transformer_2"] if moe else ["transformer"]
    for i, name in enumerate(experts):
        target = out / name
        shutil.rmtree(target)  # the tiny stand-in the pipeline writer needed
        target.mkdir()
        weights = target / "diffusion_pytorch_model.safetensors"
        if share_experts and i:
            os.link(out / experts[0] / weights.name, weights)
        else:
            model = build_dit(dit, device=device, dtype=dtype, seed=seed + i)
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(weights))
            del model
        (target / "config.json").write_text(json.dumps(dit.to_official(), indent=2) + "\n")
    if moe:
        index = json.loads((out / "model_index.json").read_text())
        if index.get("boundary_ratio") != MOE_BOUNDARY[dit.model_type]:
            raise RuntimeError(f"{out}: model_index.json lacks the boundary_ratio {MOE_BOUNDARY[dit.model_type]}")
    return out
