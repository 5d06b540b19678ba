"""Run-config loading and validation: every user error names its key and what would be valid."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ditfleet.config import RunConfig, field_docs, load_config
from ditfleet.defaults import TINY_DEFAULT
from ditfleet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# The reference doc's sparge example, verbatim, with its missing comma after "flash_attn3".
REFERENCE_SPARGE = """{
    "infer_steps": 50,
    "target_video_length": 81,
    "text_len": 512,
    "target_height": 480,
    "target_width": 832,
    "self_attn_1_type": "flash_attn3",
    "cross_attn_1_type": "flash_attn3",
    "cross_attn_2_type": "flash_attn3"
    "seed": 42,
    "sample_guide_scale": 6,
    "sample_shift": 8,
    "enable_cfg": true,
    "cpu_offload": false,
    "sparge": true,
    "sparge_ckpt": "/path/to/sparge_wan2.1_t2v_1.3B.pt"
}
"""


def cfg(**overrides) -> dict:
    return {**TINY_DEFAULT, **overrides}


def error_of(data: dict, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(data=data, **kw)
    return str(e.value)


def test_defaults_and_embedded_default_are_valid():
    c = load_config(data=TINY_DEFAULT)
    assert c.target_video_length == 5 and c.self_attn_1_type == "torch_sdpa"
    assert RunConfig().parallel.world_size == 1
    assert json.loads((ROOT / "configs" / "tiny.json").read_text()) == TINY_DEFAULT


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    c = load_config(path, check_files=False)
    assert c.target_video_length % 4 == 1


def test_invalid_json_reports_line_and_column(tmp_path):
    p = tmp_path / "sparge.json"
    p.write_text(REFERENCE_SPARGE)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "line 10, column 5" in msg and "Expecting ',' delimiter" in msg
    assert '"seed": 42' in msg  # the offending line is shown


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_unknown_attention_type_lists_valid_ones():
    msg = error_of(cfg(self_attn_1_type="flash_attn5"))
    assert msg.startswith("self_attn_1_type:") and "flash_attn5" in msg
    for name in ("torch_sdpa", "flash_attn2", "flash_attn3", "flash_attn4", "sage_attn2", "radial_attn", "sparge"):
        assert name in msg


@pytest.mark.parametrize("site", ["cross_attn_1_type", "cross_attn_2_type"])
def test_radial_on_cross_attention_site(site):
    msg = error_of(cfg(**{site: "radial_attn"}))
    assert msg.startswith(site + ":") and "self-attention only" in msg
    assert "radial_attn" not in msg.split("valid here:")[1]


def test_sparge_without_checkpoint():
    msg = error_of(cfg(sparge=True))
    assert msg.startswith("sparge_ckpt:") and ".safetensors" in msg and "topk" in msg


def test_sparge_checkpoint_missing_file(tmp_path):
    missing = tmp_path / "sparge.pt"
    msg = error_of(cfg(sparge=True, sparge_ckpt=str(missing)))
    assert msg.startswith("sparge_ckpt:") and str(missing) in msg and "does not exist" in msg


def test_sparge_checkpoint_wrong_suffix(tmp_path):
    p = tmp_path / "sparge.bin"
    p.write_bytes(b"x")
    assert error_of(cfg(sparge=True, sparge_ckpt=str(p))).startswith("sparge_ckpt:")


def test_parallel_product_must_equal_world_size():
    data = cfg(launcher="torchrun", parallel={"seq_p_size": 4, "seq_p_attn_type": "ulysses", "cfg_p_size": 2})
    msg = error_of(data, world_size=4)
    assert msg.startswith("parallel:") and "seq_p_size=4" in msg and "cfg_p_size=2" in msg and "= 8" in msg and "4" in msg
    msg = error_of({**data, "world_size": 6})
    assert "world_size is 6" in msg
    assert load_config(data=data, world_size=8).parallel.world_size == 8


def test_local_launcher_is_one_process():
    msg = error_of(cfg(parallel={"seq_p_size": 2}))
    assert msg.startswith("launcher:") and "torchrun" in msg


def test_usp_needs_a_dividing_ulysses_size():
    msg = error_of(cfg(launcher="torchrun", parallel={"seq_p_size": 4, "seq_p_attn_type": "usp", "ulysses_size": 3}))
    assert msg.startswith("parallel.ulysses_size:") and "[1, 2, 4]" in msg
    c = load_config(data=cfg(launcher="torchrun", parallel={"seq_p_size": 4, "seq_p_attn_type": "usp", "ulysses_size": 2}))
    assert (c.parallel.ring_degree, c.parallel.ulysses_degree) == (2, 2)


def test_seq_p_attn_type_choices():
    msg = error_of(cfg(parallel={"seq_p_attn_type": "zigzag"}))
    assert msg.startswith("parallel.seq_p_attn_type:") and "ulysses, ring, usp" in msg


def test_cfg_parallel_needs_cfg():
    msg = error_of(cfg(launcher="torchrun", enable_cfg=False, parallel={"cfg_p_size": 2}))
    assert msg.startswith("parallel.cfg_p_size:") and "enable_cfg" in msg
    assert error_of(cfg(parallel={"cfg_p_size": 3})).startswith("parallel.cfg_p_size:")


@pytest.mark.parametrize("frames", [0, 80, 82, 3])
def test_frames_must_be_4n_plus_1(frames):
    msg = error_of(cfg(target_video_length=frames))
    assert msg.startswith("target_video_length:") and "4n+1" in msg


@pytest.mark.parametrize("key,value", [("target_height", 100), ("target_width", 830), ("target_width", 0)])
def test_size_must_be_multiple_of_16(key, value):
    msg = error_of(cfg(**{key: value}))
    assert msg.startswith(key + ":") and "multiple of 16" in msg


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("infer_steps", "50", "expected integer"),
        ("infer_steps", 4.5, "expected integer"),
        ("infer_steps", True, "expected integer"),
        ("enable_cfg", 1, "expected true/false"),
        ("sample_shift", "3", "expected number"),
        ("self_attn_1_type", 3, "expected string"),
        ("parallel", [1, 2], "expected an object"),
        ("model_path", 5, "expected string or null"),
    ],
)
def test_wrong_value_types(key, value, expect):
    msg = error_of(cfg(**{key: value}))
    assert msg.startswith(key + ":") and expect in msg


def test_nested_wrong_type_names_dotted_key():
    msg = error_of(cfg(parallel={"seq_p_size": "2"}))
    assert msg.startswith("parallel.seq_p_size:") and "expected integer" in msg


def test_integer_accepted_for_float():
    assert load_config(data=cfg(sample_guide_scale=6)).sample_guide_scale == 6.0


@pytest.mark.parametrize("data,match", [
    ({"infer_step": 10}, "^infer_step: unknown key; did you mean 'infer_steps'"),
    ({"parallel": {"seq_p_sise": 1}}, "^parallel.seq_p_sise: unknown key; did you mean 'parallel.seq_p_size'"),
    ({"sample_steps": 10}, "^sample_steps: unknown key; ditfleet's name for it is 'infer_steps'"),
    ({"num_inference_steps": 10}, "'infer_steps'"),
    ({"seq_p_size": 2}, "did you mean 'parallel.seq_p_size'"),
    ({"radial_attn_setting": {"decay": 1}}, "valid keys in 'radial_attn_setting': block_size, decay_factor"),
    ({"high_noise_quantized_ckpt": "/w/q"}, "^high_noise_quantized_ckpt: a pre-quantised checkpoint needs dit_quantized"),
    ({"dit_quantized_ckpt": "/w/q.safetensors"}, "^dit_quantized_ckpt: a pre-quantised checkpoint needs dit_quantized"),
    ({"dit_quant_scheme": "int8-vllm"}, "^dit_quant_scheme: \"int8-vllm\" is not valid; valid: fp8, fp8-vllm"),
    ({"dit_quantized": True, "dit_quant_scheme": "Default"}, "^dit_quant_scheme: `Default` .*means no quantisation"),
    ({"magcache_calibration": True}, "^magcache_calibration: .*would change the video"),
    ({"feature_caching": "Taylor"}, "^feature_caching: \"Taylor\" is not valid; valid: none, NoCaching, Tea, Mag"),
    ({"teacache_thresh": -0.1}, "^teacache_thresh: must be >= 0"),
    ({"coefficients": [[1.0, 2.0]]}, "^coefficients: expected \\[\\[retention-steps polynomial\\]"),
    ({"coefficients": [[1.0], []]}, "^coefficients: .*second one is used and must not be empty"),
    ({"magcache_ratios": [[1.0, 0.9], [1.0]]}, "^magcache_ratios: expected \\[\\[cond ratio per step\\]"),
    ({"magcache_K": 0}, "^magcache_K: must be >= 1"),
    ({"magcache_retention_ratio": 1.5}, "^magcache_retention_ratio: must lie in \\[0, 1\\]"),
    ({"downsample_factor": 0}, "^downsample_factor: must be >= 1"),
    ({"teacache_first_steps": -1}, "^teacache_first_steps: must be >= 0 or null"),
    ({"parallel": {"tensor_p_size": 2}}, "^parallel.tensor_p_size: .*would change"),
])
def test_unknown_keys_are_errors_with_a_correct_suggestion(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(data=cfg(**data))


def test_lightx2v_keys_without_effect_warn_once(caplog):
    data = cfg(t5_cpu_offload=True, offload_granularity="block", use_tiling_vae=True, t5_quantized=False,
               feature_caching="NoCaching", parallel={"seq_p_size": 1, "seq_p_tensor_fusion": True})
    with caplog.at_level(logging.WARNING):
        c = load_config(data=data)
    assert c.infer_steps == TINY_DEFAULT["infer_steps"]
    lines = [r.getMessage() for r in caplog.records if "LightX2V" in r.getMessage()]
    assert len(lines) == 1, lines
    for key in ("t5_cpu_offload", "offload_granularity", "use_tiling_vae", "t5_quantized",
                "parallel.seq_p_tensor_fusion"):
        assert key in lines[0]
    assert c.feature_caching == "NoCaching"  # a real key now: LightX2V's off value, no warning


def test_lightx2v_caching_configs_load_as_runconfig_fields():
    """LightX2V's shipped Wan caching configs (their caching keys) load into real fields, no warning needed."""
    from ditfleet.models.step_cache import StepCacheSettings

    tea = load_config(data=cfg(feature_caching="Tea", use_ret_steps=True, teacache_thresh=0.26, coefficients=[
        [-52186.2437, 9230.41404, -528.275948, 13.6987616, -0.0499875664],
        [2396.76752, -1311.10545, 201.331979, -8.29855975, 0.137887774]]))
    s = StepCacheSettings.from_config(tea)
    assert s.method == "Tea" and s.use_ret_steps and s.coefficients[0] == -52186.2437 and s.tea_first() == 5
    assert s.tea_last() == 0
    mag = load_config(data=cfg(feature_caching="Mag", magcache_calibration=False, magcache_K=4, magcache_thresh=0.12,
                               magcache_retention_ratio=0.2, magcache_ratios=[[1.0, 0.99], [1.0, 0.98]]))
    s = StepCacheSettings.from_config(mag)
    assert s.method == "Mag" and s.magcache_ratios == ((1.0, 0.99), (1.0, 0.98)) and s.magcache_K == 4
    fb = StepCacheSettings.from_config(load_config(data=cfg(feature_caching="FirstBlock", residual_diff_threshold=0.02,
                                                            downsample_factor=2)))
    assert fb.method == "FirstBlock" and fb.downsample_factor == 2
    off = StepCacheSettings.from_config(load_config(data=cfg(feature_caching="NoCaching")))
    assert not off.active and off.method == "none"


@pytest.mark.parametrize("data, want", [
    ({"dit_quant_scheme": None}, {"dit_quant_scheme": "Default"}),
    ({"dit_quant_scheme": "bf16"}, {"dit_quant_scheme": "Default"}),
    ({"dit_quant_scheme": "default"}, {"dit_quant_scheme": "Default"}),
    ({"feature_caching": None}, {"feature_caching": "none"}),
    ({"feature_caching": "None"}, {"feature_caching": "none"}),
    ({"teacache_thresh": None, "use_ret_steps": None, "magcache_K": None, "magcache_thresh": None},
     {"teacache_thresh": 0.26, "use_ret_steps": False, "magcache_K": 4, "magcache_thresh": 0.12}),
])
def test_lightx2v_off_spellings_of_implemented_keys_load(data, want):
    """LightX2V configs write "off" as null / "default" / "bf16" / "None" for keys ditfleet now implements."""
    c = load_config(data=cfg(**data))
    assert {k: getattr(c, k) for k in want} == want


def test_null_scheme_with_quantisation_on_is_refused():
    with pytest.raises(ConfigError, match=r"^dit_quant_scheme: `Default` \(LightX2V's null / default / bf16 too\)"):
        load_config(data=cfg(dit_quantized=True, dit_quant_scheme=None))


def test_cli_overrides_beat_json_beat_defaults(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg(infer_steps=7, seed=3)))
    c = load_config(p, ["infer_steps=9", "parallel.seq_p_attn_type=ring", "model_path=/w/Wan", "launcher=torchrun"])
    assert c.infer_steps == 9 and c.seed == 3 and c.parallel.seq_p_attn_type == "ring" and c.model_path == "/w/Wan"
    assert c.sample_guide_scale == 5.0 and c.parallel.cfg_p_size == 1


def test_override_errors():
    with pytest.raises(ConfigError, match="infer_stepz.*did you mean 'infer_steps'"):
        load_config(data=TINY_DEFAULT, overrides=["infer_stepz=3"])
    with pytest.raises(ConfigError, match="parallel.sp_size.*'sp_size'"):
        load_config(data=TINY_DEFAULT, overrides=["parallel.sp_size=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(data=TINY_DEFAULT, overrides=["infer_steps"])
    with pytest.raises(ConfigError, match="^infer_steps: expected integer"):
        load_config(data=TINY_DEFAULT, overrides=["infer_steps=many"])


@pytest.mark.parametrize(
    "data,key",
    [
        ({"infer_steps": 0}, "infer_steps"),
        ({"sample_shift": 0}, "sample_shift"),
        ({"sample_guide_scale": -1}, "sample_guide_scale"),
        ({"seed": -1}, "seed"),
        ({"cpu_offload": True}, "cpu_offload"),
        ({"task": "v2v"}, "task"),
        ({"dtype": "int8"}, "dtype"),
        ({"radial_attn_setting": {"block_size": 100}}, "radial_attn_setting.block_size"),
        ({"radial_attn_setting": {"decay_factor": 0}}, "radial_attn_setting.decay_factor"),
        ({"sparge_attn_setting": {"topk": 1.5}}, "sparge_attn_setting.topk"),
        ({"sparge": True, "self_attn_1_type": "radial_attn", "sparge_attn_setting": {"topk": 0.5}}, "sparge"),
    ],
)
def test_other_invalid_values_name_their_key(data, key):
    assert error_of(cfg(**data)).startswith(key + ":")


def test_sparge_topk_mode_needs_no_checkpoint():
    c = load_config(data=cfg(sparge=True, sparge_attn_setting={"topk": 0.5}))
    assert c.site_types()["self_attn_1_type"] == "sparge"


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, _, _ in field_docs() if f"`{key}`" not in readme]
    assert not missing, f"README lacks config keys: {missing}"
