"""Config keys ditfleet does not have: LightX2V's that it does not use, and other tools' names for its own.

A LightX2V Wan config loads unchanged (:mod:`ditfleet.config`), but some of its keys name things ditfleet
does not do. They fall in two groups:

- :data:`LIGHTX2V_NO_EFFECT`: knobs for memory, offloading, compilation or the model's own shape (read from
  the checkpoint here). Ignoring them cannot change the video, so they are accepted with **one** warning
  that lists them all.
- :data:`LIGHTX2V_CHANGES_OUTPUT`: features that would change the video (quantised text / image
  encoders, the two experts' pre-quantised checkpoints, MagCache calibration, changing resolution, ...). Running without them would silently produce something else, so a value
  other than their "off" value is an error naming the key. Their off value (``false``, ``[]``, ``null``,
  ``"NoCaching"``) is accepted with the warning above. (``feature_caching`` itself and the keys of the methods
  ditfleet implements -- Tea, Mag, FirstBlock -- are real config fields; MagCache's calibration run is not.)

:data:`ALIASES` holds what Wan's official ``generate.py`` and diffusers' ``WanPipeline`` call ditfleet's
keys (``sample_steps``, ``num_inference_steps``, ``guidance_scale`` ...): a config that uses them gets an
error that names the ditfleet key. Any other unknown key is an error suggesting the nearest whole key path
by edit distance (:func:`suggest`).
"""

from __future__ import annotations

from collections.abc import Iterable

#: LightX2V keys (read from its public Wan configs) that cannot change the video.
LIGHTX2V_NO_EFFECT = frozenset({
    "offload_granularity", "offload_ratio", "t5_cpu_offload", "vae_cpu_offload", "clip_cpu_offload",
    "text_encoder_cpu_offload", "audio_encoder_cpu_offload", "audio_adapter_cpu_offload", "lazy_load",
    "num_disk_workers", "unload_modules", "clean_cuda_cache", "use_compile", "vae_use_compile", "rotary_chunk",
    "use_tiling_vae", "vae_offload_cache", "rms_norm_type", "layer_norm_type", "modulate_type", "rope_type",
    "tp_mm_type", "tp_rms_norm_type", "convert_model_dtype", "vae_dtype", "enable_pbar", "comment",
    "comment_parallel", "attn_type", "model_type", "dim", "ffn_dim", "freq_dim", "num_heads",
    "num_layers", "in_dim", "out_dim", "eps", "text_dim", "patch_size", "vae_stride", "num_channels_latents",
    "num_train_timesteps", "window_size", "qk_norm", "cross_attn_norm", "clip_embed_dim", "use_31_block",
    "use_image_encoder", "target_fps", "t5_original_ckpt", "t5_tokenizer_path", "clip_original_ckpt",
    "dit_original_ckpt", "vae_path", "parallel.seq_p_tensor_fusion", "parallel.seq_p_head_parallel",
    "parallel.seq_p_a2a_backend", "parallel.seq_p_prepost_backend", "parallel.vae_parallel", "parallel.tp_load_mode",
})

#: LightX2V keys that would change the video, each with the value(s) that mean "off".
LIGHTX2V_CHANGES_OUTPUT: dict[str, tuple] = {
    "t5_quantized": (False,),
    "t5_quant_scheme": (None,),
    "t5_quantized_ckpt": (None,),
    "clip_quantized": (False,),
    "clip_quant_scheme": (None,),
    "clip_quantized_ckpt": (None,),
    "magcache_calibration": (False, None),  # feature_caching and its Tea / Mag / FirstBlock keys: config.RunConfig
    "boundary_step_index": (None,),
    "high_noise_original_ckpt": (None,),
    "low_noise_original_ckpt": (None,),
    "changing_resolution": (False, None),
    "enable_dynamic_cfg": (False, None),
    "use_tae": (False, None),
    "video_frame_interpolation": (None,),
    "sparse_type": (None,),
    "nbhd_attn_setting": (None,),
    "general_sparse_attn_setting": (None,),
    "dynamic_sparse_attn_setting": (None,),
    "parallel.tensor_p_size": (1, None),
    "parallel.seq_p_fp8_comm": (False, None),
    "parallel.seq_p_quant_scheme": (None,),
}

#: Other tools' names for ditfleet keys: Wan's generate.py and diffusers' WanPipeline arguments.
ALIASES = {
    "sample_steps": "infer_steps",
    "num_inference_steps": "infer_steps",
    "steps": "infer_steps",
    "frame_num": "target_video_length",
    "num_frames": "target_video_length",
    "height": "target_height",
    "width": "target_width",
    "size": "target_width and target_height",
    "guidance_scale": "sample_guide_scale",
    "cfg_scale": "sample_guide_scale",
    "flow_shift": "sample_shift",
    "shift": "sample_shift",
    "base_seed": "seed",
    "ckpt_dir": "model_path",
    "image": "image_path",
    "offload_model": "cpu_offload",
    "ulysses_size": "parallel.ulysses_size",
    "ring_size": "parallel.seq_p_size with parallel.seq_p_attn_type ring",
    "sp_size": "parallel.seq_p_size",
    "attention_type": "self_attn_1_type",
}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def suggest(path: str, valid: Iterable[str]) -> str | None:
    """The valid dotted key path nearest to ``path`` by edit distance, if it is close enough to be a typo.

    Close enough: at most a third of the longer name's characters differ (at least 1, at most 4). The last
    component is also compared alone, so ``parallel.seq_p_sise`` finds ``parallel.seq_p_size`` and a nested
    key given at the top level (``seq_p_size``) finds its full path.
    """
    alias = ALIASES.get(path.rsplit(".", 1)[-1])
    if alias is not None:
        return alias
    def close(a: str, b: str) -> int | None:
        d = edit_distance(a, b)
        return d if d <= max(1, min(4, max(len(a), len(b)) // 3)) else None

    best, best_d = None, None
    leaf = path.rsplit(".", 1)[-1]
    for cand in valid:
        ds = [close(path, cand), close(leaf, cand.rsplit(".", 1)[-1])]
        ds = [d for d in ds if d is not None]
        if not ds:
            continue
        d = min(ds)
        if best_d is None or d < best_d or (d == best_d and len(cand) < len(best)):
            best, best_d = cand, d
    return best


def classify(key: str, value) -> str:
    """What an unknown dotted key ``key`` is: ``"no_effect"``, ``"off"`` (an output-changing key at its off value), ``"changes_output"`` or ``"unknown"``."""
    if key in LIGHTX2V_NO_EFFECT:
        return "no_effect"
    if key in LIGHTX2V_CHANGES_OUTPUT:
        offs = LIGHTX2V_CHANGES_OUTPUT[key]
        return "off" if any(value == o and type(value) is type(o) for o in offs) else "changes_output"
    return "unknown"
