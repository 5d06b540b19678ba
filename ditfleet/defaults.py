"""The embedded tiny default config: what ``ditfleet`` runs when no config file is given.

It describes a few-second job on any machine (CPU included): 5 frames of 64x64, 4 steps,
torch SDPA at every site. ``configs/tiny.json`` is the same config as a file.
"""

TINY_DEFAULT: dict = {
    "task": "t2v",
    "model_path": None,
    "launcher": "local",
    "device": "auto",
    "dtype": "fp32",
    "seed": 42,
    "infer_steps": 4,
    "target_video_length": 5,
    "target_height": 64,
    "target_width": 64,
    "text_len": 512,
    "sample_guide_scale": 5.0,
    "sample_shift": 5.0,
    "enable_cfg": True,
    "self_attn_1_type": "torch_sdpa",
    "cross_attn_1_type": "torch_sdpa",
    "cross_attn_2_type": "torch_sdpa",
    "parallel": {"seq_p_size": 1, "seq_p_attn_type": "ulysses", "cfg_p_size": 1},
}
