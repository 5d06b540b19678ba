"""Pre-quantised FP8 DiT checkpoints (``dit_quantized_ckpt``, LightX2V's converter format) on CPU.

A tiny random DiT is quantised at load (the existing path), written in LightX2V's format by :func:`write_lightx2v`
(official names, ``<linear>.weight`` float8_e4m3fn + ``<linear>.weight_scale`` float32 ``[N, 1]``, everything else
float32 -- the converter's ``--non_linear_dtype`` default), and loaded back through ``dit_quantized_ckpt``: codes,
scales and every other tensor must equal the quantise-at-load model's bit for bit. The FP8 GEMM needs a GPU, so the
models are compared by their buffers, not by a forward (``check_device=False`` as tests/test_quant.py does).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ditfleet.errors import ConfigError

pytest.importorskip("torchao")

from ditfleet.models import quant  # noqa: E402
from ditfleet.models.quant import Fp8Linear, GeluQuant, quantize_model_  # noqa: E402
from ditfleet.models.wan import WanDiTConfig, build_dit, load_dit  # noqa: E402
from ditfleet.models.wan.loader import CheckpointError, load_quantized_dit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(model_type: str = "i2v") -> WanDiTConfig:
    return WanDiTConfig(model_type=model_type, in_dim=36 if model_type == "i2v" else 16, dim=64, ffn_dim=128,
                        num_heads=4, num_layers=2, text_dim=32, text_len=16, freq_dim=32, image_dim=32)


def write_official(folder: Path, model_type: str = "i2v") -> Path:
    """A float32 official-layout DiT folder (config.json + diffusion_pytorch_model.safetensors)."""
    model = build_dit(tiny_config(model_type), dtype=torch.float32, seed=0, std=0.05)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config.to_official()))
    return folder


def lightx2v_tensors(model, non_linear_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A quantised model's tensors as LightX2V's converter writes them (a test-side writer, independent of the loader)."""
    out = {}
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    for key, t in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod in fp8 and leaf == "weight_fp8":
            out[f"{mod}.weight"] = t.contiguous()
        elif mod in fp8 and leaf == "weight_scale":
            out[f"{mod}.weight_scale"] = t.reshape(-1, 1).to(torch.float32).contiguous()  # LightX2V: [N, 1]
        else:
            out[key] = t.to(non_linear_dtype).contiguous()
    return out


def write_lightx2v(tensors: dict[str, torch.Tensor], path: Path, *, by_block: bool = False) -> Path:
    """One .safetensors file, or (``by_block``) converter --save_by_block's folder: block_N + non_block + index."""
    if not by_block:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict] = {}
    for k, t in tensors.items():
        name = f"block_{k.split('.')[1]}.safetensors" if k.startswith("blocks.") else "non_block.safetensors"
        groups.setdefault(name, {})[k] = t
    weight_map = {}
    for name, group in groups.items():
        save_file(group, str(path / name))
        weight_map.update({k: name for k in group})
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(official folder, quantised-at-load model, its LightX2V tensors, the single-file checkpoint)."""
    tmp = tmp_path_factory.mktemp("qckpt")
    folder = write_official(tmp / "dit")
    ref = load_dit(folder, dtype=torch.bfloat16)
    quantize_model_(ref, "fp8", check_device=False)
    tensors = lightx2v_tensors(ref)
    return folder, ref, tensors, write_lightx2v(tensors, tmp / "wan_fp8.safetensors")


def assert_same_model(a, b) -> None:
    """The same modules (types) and the same tensors, bit for bit (fp8 codes compared as bytes)."""
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)) if sa[k].dtype == torch.float8_e4m3fn \
            else torch.equal(sa[k], sb[k]), k
        assert sb[k].device.type == "cpu", k


def test_lightx2v_file_loads_bit_for_bit(made, monkeypatch):
    folder, ref, _, file = made

    def no_bf16(*a, **kw):
        raise AssertionError("a quantised linear was built from bf16 weights")

    monkeypatch.setattr(Fp8Linear, "from_linear", no_bf16)  # the codes come from the file, not a re-quantisation
    model = load_quantized_dit(folder, file, dtype=torch.bfloat16, check_device=False)
    assert_same_model(ref, model)
    lins = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(lins) == 24 and not any(hasattr(m, "weight") for m in lins)
    assert sum(isinstance(m, GeluQuant) for m in model.modules()) == 2
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    rep = model.quant_report
    assert {k: v for k, v in rep.items() if k not in ("weights", "checkpoint")} == \
        {k: v for k, v in ref.quant_report.items() if k != "weights"}
    assert "pre-quantised" in rep["weights"] and "quantised once at load" in ref.quant_report["weights"]
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    assert rep["checkpoint"] == {"key": "dit_quantized_ckpt", "path": str(file),
                                 "files": [{"file": file.name, "sha256": sha}]}
    assert "read from dit_quantized_ckpt" in rep["weights"]


def test_block_folder_and_bf16_non_linears(made, tmp_path):
    """converter --save_by_block (block_N + non_block + index) loads the same; bf16 non-linears cast like load_dit."""
    folder, ref, tensors, _ = made
    model = load_quantized_dit(folder, write_lightx2v(tensors, tmp_path / "blocks", by_block=True),
                               dtype=torch.bfloat16, check_device=False)
    assert_same_model(ref, model)
    assert len(model.quant_report["checkpoint"]["files"]) == 3  # block_0, block_1, non_block
    half = lightx2v_tensors(ref, non_linear_dtype=torch.bfloat16)
    model = load_quantized_dit(folder, write_lightx2v(half, tmp_path / "bf16.safetensors"), dtype=torch.bfloat16,
                               check_device=False)
    sa, sb = ref.state_dict(), model.state_dict()
    for k in sa:
        assert sb[k].dtype == sa[k].dtype, k
        exact = sa[k].dtype == torch.float8_e4m3fn or k.endswith(".weight_scale")  # written as they are
        want = sa[k] if exact else sa[k].to(torch.bfloat16).to(sa[k].dtype)
        assert torch.equal(sb[k].view(torch.uint8), want.view(torch.uint8)) if want.dtype == torch.float8_e4m3fn \
            else torch.equal(sb[k], want), k


def _mutate(tensors: dict, kind: str) -> dict:
    t = dict(tensors)
    if kind == "int8":
        for k in [k for k in t if t[k].dtype == torch.float8_e4m3fn]:
            t[k] = t[k].float().round().clamp(-127, 127).to(torch.int8)
    elif kind == "no_scale":
        del t["blocks.1.cross_attn.v.weight_scale"]
    elif kind == "missing_linear":
        del t["blocks.1.ffn.2.weight"], t["blocks.1.ffn.2.weight_scale"]
    elif kind == "missing_other":
        del t["head.modulation"]
    elif kind == "unknown":
        t["blocks.0.self_attn.extra.weight"] = torch.zeros(4)
        t["lora_unet_x.alpha"] = torch.zeros(1)
    elif kind == "misshaped_weight":
        t["blocks.0.self_attn.q.weight"] = torch.zeros(64, 48).to(torch.float8_e4m3fn)
    elif kind == "misshaped_scale":
        t["blocks.0.ffn.0.weight_scale"] = torch.ones(64, 1)
    elif kind == "bf16_linear":
        t["blocks.0.ffn.0.weight"] = torch.zeros(128, 64, dtype=torch.bfloat16)
    elif kind == "fp8_outside":
        t["head.head.weight"] = t["head.head.weight"].to(torch.float8_e4m3fn)
    elif kind == "bad_scale_values":
        t["blocks.0.self_attn.k.weight_scale"] = torch.zeros_like(t["blocks.0.self_attn.k.weight_scale"])
    elif kind == "diffusers_names":
        t = {k.replace(".self_attn.q.", ".attn1.to_q."): v for k, v in t.items()}
    return t


@pytest.mark.parametrize("kind, match", [
    ("int8", r"24 int8 linear weight\(s\): blocks\.0\.cross_attn\.k\.weight, .*; this build runs fp8 only"),
    ("no_scale", r"1 quantised weight\(s\) without their scale: blocks\.1\.cross_attn\.v\.weight;"),
    ("missing_linear", r"1 missing: blocks\.1\.ffn\.2\.weight"),
    ("missing_other", r"1 missing: head\.modulation"),
    ("unknown", r"2 unknown: blocks\.0\.self_attn\.extra\.weight, lora_unet_x\.alpha"),
    ("misshaped_weight", r"misshaped: blocks\.0\.self_attn\.q\.weight \(checkpoint \[64, 48\], model \[64, 64\]\)"),
    ("misshaped_scale", r"misshaped: blocks\.0\.ffn\.0\.weight_scale \(checkpoint \[64, 1\], model \[128, 1\]\)"),
    ("bf16_linear", r"bfloat16 \(not quantised\) linear weight\(s\): blocks\.0\.ffn\.0\.weight; .*drop dit_quantized_ckpt"),
    ("fp8_outside", r"float8_e4m3fn tensor\(s\) outside the quantised linears: head\.head\.weight"),
    ("bad_scale_values", r"blocks\.0\.self_attn\.k\.weight_scale \(bad\.safetensors\) holds scales that are not finite"),
    ("diffusers_names", r"4 missing: blocks\.0\.self_attn\.q\.weight, blocks\.0\.self_attn\.q\.bias, .*unknown: "
                        r"blocks\.0\.attn1\.to_q\."),
])
def test_checkpoint_errors_name_the_file_and_tensors(made, tmp_path, kind, match):
    folder, _, tensors, _ = made
    file = write_lightx2v(_mutate(tensors, kind), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"^dit_quantized_ckpt .*bad\.safetensors: .*" + match):
        load_quantized_dit(folder, file, dtype=torch.bfloat16, check_device=False)


def test_path_errors(made, tmp_path):
    folder = made[0]
    with pytest.raises(ConfigError, match=r"^dit_quantized_ckpt: '.*nope\.safetensors' does not exist"):
        load_quantized_dit(folder, tmp_path / "nope.safetensors", check_device=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^dit_quantized_ckpt: '.*empty' is a folder without \.safetensors files"):
        load_quantized_dit(folder, tmp_path / "empty", check_device=False)
    (tmp_path / "w.pth").write_bytes(b"\x80")
    with pytest.raises(ConfigError, match=r"^dit_quantized_ckpt: '.*w\.pth' is not a \.safetensors file"):
        load_quantized_dit(folder, tmp_path / "w.pth", check_device=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_quantized_dit(folder, tmp_path / "junk.safetensors", check_device=False)


def test_load_path_refuses_cpu_before_reading(made):
    """With the runtime check on (the engine's load), CPU is refused as dit_quantized is, after the header checks."""
    folder, _, _, file = made
    with pytest.raises(ConfigError, match=r"^dit_quantized: FP8 linears need a CUDA GPU .* device is cpu"):
        load_quantized_dit(folder, file, dtype=torch.bfloat16)


# ---- the config and the engine -----------------------------------------------------------------------------
def test_config_round_trip_and_refusals(tmp_path):
    from ditfleet.config import load_config

    file = tmp_path / "q.safetensors"
    file.write_bytes(b"")
    data = {"dit_quantized": True, "dit_quantized_ckpt": str(file)}
    cfg = load_config(data=data)
    assert cfg.dit_quantized_ckpt == str(file)
    again = load_config(data=json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.dit_quantized_ckpt == str(file)
    assert load_config(data={"dit_quantized_ckpt": None}).dit_quantized_ckpt is None
    cases = [
        ({"dit_quantized_ckpt": str(file)}, r"^dit_quantized_ckpt: a pre-quantised checkpoint needs dit_quantized: true"),
        ({**data, "lora_configs": [{"path": "/l.safetensors"}]}, r"^lora_configs: LoRAs merge into the bf16 weights"),
        ({**data, "dit_quantized_ckpt": str(tmp_path / "no.safetensors")}, r"^dit_quantized_ckpt: '.*' does not exist"),
        ({**data, "dit_quantized_ckpt": str(tmp_path / "w.pth")}, r"^dit_quantized_ckpt: '.*w\.pth' is not a \.safetensors"),
        ({**data, "model_cls": "wan2.2_moe"},
         r"^dit_quantized_ckpt: wan2.2_moe .* takes high_noise_quantized_ckpt / low_noise_quantized_ckpt; set "
         r"dit_quantized_ckpt to null"),
        ({**data, "dit_quantized_ckpt": ""}, r"^dit_quantized_ckpt: empty path"),
        ({"high_noise_quantized_ckpt": str(file)}, r"^high_noise_quantized_ckpt: a pre-quantised checkpoint needs "
                                                   r"dit_quantized: true"),
        ({**data, "low_noise_quantized_ckpt": "/l.safetensors"}, r"^low_noise_quantized_ckpt: '/l.safetensors' does "
                                                                r"not exist"),
        ({**data, "model_cls": "wan2.1", "low_noise_quantized_ckpt": str(file)},
         r"^low_noise_quantized_ckpt: wan2.1 .* takes dit_quantized_ckpt; set low_noise_quantized_ckpt to null"),
        # valid: a LoRA for the expert without a pre-quantised file
        ({"dit_quantized": True, "model_cls": "wan2.2_moe", "high_noise_quantized_ckpt": str(file),
          "lora_configs": [{"path": "/l.safetensors", "name": "low_noise_model"}]}, None),
    ]
    (tmp_path / "w.pth").write_bytes(b"")
    for d, match in cases:
        if match is None:
            assert load_config(data=d).high_noise_quantized_ckpt == str(file)
            continue
        with pytest.raises(ConfigError, match=match):
            load_config(data=d)


@pytest.fixture
def gpu_like(monkeypatch):
    """As on an sm90 GPU with torchao: the runtime refusal off (the FP8 GEMM itself is never called here)."""
    monkeypatch.setattr(quant, "check_quant_runtime", lambda device, dtype, **kw: None)


def test_engine_loads_the_file_and_reports_it(tmp_path, gpu_like):
    """load_runner (what every rank runs) on the embedded tiny model: quantise at load, write, load pre-quantised."""
    from ditfleet.config import load_config
    from ditfleet.engine.pipeline import load_runner
    from ditfleet.engine.preflight import check_quant

    cpu = torch.device("cpu")
    at_load = load_runner(load_config(data={"dit_quantized": True, "device": "cpu"}), device=cpu)
    file = write_lightx2v(lightx2v_tensors(at_load.dit), tmp_path / "tiny_fp8.safetensors")
    cfg = load_config(data={"dit_quantized": True, "dit_quant_scheme": "fp8-sgl", "device": "cpu",
                            "dit_quantized_ckpt": str(file)})
    check_quant(cfg, cpu)  # the start-up check passes
    runner = load_runner(cfg, device=cpu)
    assert_same_model(at_load.dit, runner.dit)
    rep = runner.denoisers.describe()["quant"]
    assert rep["requested"] == "fp8-sgl" and rep["experts"] == [runner.denoisers.names[0]]
    assert rep["checkpoint"]["path"] == str(file) and "pre-quantised" in rep["weights"]
    assert rep["checkpoint"]["files"][0]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


def test_model_folder_needs_no_dit_weights_with_the_file(tmp_path, gpu_like):
    """With dit_quantized_ckpt the DiT folder needs only its config.json (the file holds every tensor); without the
    file the same folder is incomplete."""
    import shutil

    from ditfleet.config import load_config
    from ditfleet.engine.errors import ModelFolderError
    from ditfleet.engine.pipeline import load_runner, model_root
    from ditfleet.engine.preflight import check_quant

    cpu = torch.device("cpu")
    at_load = load_runner(load_config(data={"dit_quantized": True, "device": "cpu"}), device=cpu)
    file = write_lightx2v(lightx2v_tensors(at_load.dit), tmp_path / "tiny_fp8.safetensors")
    root = shutil.copytree(model_root(load_config(data={})), tmp_path / "model")
    removed = list((root / "transformer").glob("diffusion_pytorch_model*"))
    assert removed
    for p in removed:
        p.unlink()
    data = {"dit_quantized": True, "device": "cpu", "model_path": str(root)}
    with pytest.raises(ModelFolderError, match=r"missing transformer/diffusion_pytorch_model\.safetensors"):
        load_runner(load_config(data=data), device=cpu)
    cfg = load_config(data={**data, "dit_quantized_ckpt": str(file)})
    check_quant(cfg, cpu)
    assert_same_model(at_load.dit, load_runner(cfg, device=cpu).dit)


def test_engine_refusals(tmp_path, gpu_like):
    from ditfleet.config import LoraEntry, load_config
    from ditfleet.engine.pipeline import model_root
    from ditfleet.engine.preflight import check_quant
    from ditfleet.engine.runner import ModelRunner
    from ditfleet.models.registry import spec_for

    cpu = torch.device("cpu")
    root = model_root(load_config(data={}))
    bad = write_lightx2v({"blocks.0.self_attn.q.weight": torch.zeros(32, 32).to(torch.float8_e4m3fn)},
                         tmp_path / "partial.safetensors")
    cfg = load_config(data={"dit_quantized": True, "device": "cpu", "dit_quantized_ckpt": str(bad)})
    with pytest.raises(CheckpointError, match=r"^dit_quantized_ckpt .*partial\.safetensors: 1 quantised weight\(s\) "
                                              r"without their scale"):
        check_quant(cfg, cpu)  # before anything loads
    kw = dict(device=cpu, dtype=torch.bfloat16, attention={}, quant="fp8", quantized=[bad])
    with pytest.raises(ConfigError, match=r"^dit_quantized_ckpt: wan2\.2_moe .*takes high_noise_quantized_ckpt / "
                                          r"low_noise_quantized_ckpt; got 1 file"):
        ModelRunner.load(root, spec=spec_for("wan2.2_moe"), **kw)
    with pytest.raises(ConfigError, match=r"^dit_quantized_ckpt: a pre-quantised checkpoint needs dit_quantized"):
        ModelRunner.load(root, **{**kw, "quant": None})
    with pytest.raises(ConfigError, match=r"^lora_configs: 1 LoRA\(s\) for transformer, whose dit_quantized_ckpt "
                                          r"'.*partial\.safetensors' is pre-quantised"):
        ModelRunner.load(root, loras=[LoraEntry(path="/l.safetensors")], **kw)


def test_generate_exits_2_with_one_message(tmp_path, made):
    """``ditfleet generate`` with an int8 checkpoint: exit 2, one line naming the key and the file, no traceback."""
    tensors = _mutate(made[2], "int8")
    file = write_lightx2v(tensors, tmp_path / "wan_int8.safetensors")
    p = subprocess.run([sys.executable, "-m", "ditfleet", "generate", "--set", "dit_quantized=true", "--set",
                        "device=cpu", "--set", f"dit_quantized_ckpt={file}", "-o", str(tmp_path / "v.npy")],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr
    assert "ditfleet: error: dit_quantized_ckpt " in p.stderr and "wan_int8.safetensors" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "v.npy").exists()


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """A tiny Diffusers-layout Wan2.2 A14B folder (experts made distinct) and its two experts quantised at load."""
    from ditfleet.engine.tiny import build_components, save_components

    comps = build_components("t2v", family="wan2.2_moe")
    for name, seed in (("transformer", 7), ("transformer_2", 8)):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in comps[name].parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = save_components(comps, tmp_path_factory.mktemp("a14b") / "model", "t2v")
    return folder


def test_wan22_experts_load_from_their_files(a14b, tmp_path, gpu_like):
    """high_noise_quantized_ckpt / low_noise_quantized_ckpt (LightX2V's keys): each expert from its own file, bit for bit
    the quantise-at-load expert; an expert without a file is quantised at load; the report counts both and says which
    came from a file; the expert's folder then needs no weights; the other family's key is refused."""
    import shutil

    from ditfleet.config import load_config
    from ditfleet.engine.errors import ModelFolderError
    from ditfleet.engine.pipeline import load_runner
    from ditfleet.engine.preflight import check_quant

    cpu = torch.device("cpu")
    base = {"dit_quantized": True, "device": "cpu", "model_path": str(a14b)}
    at_load = load_runner(load_config(data=base), device=cpu)
    assert at_load.denoisers.names == ["transformer", "transformer_2"]
    high = write_lightx2v(lightx2v_tensors(at_load.denoisers.experts[0]), tmp_path / "high.safetensors")
    low = write_lightx2v(lightx2v_tensors(at_load.denoisers.experts[1]), tmp_path / "low", by_block=True)

    cfg = load_config(data={**base, "high_noise_quantized_ckpt": str(high)})
    check_quant(cfg, cpu)
    one = load_runner(cfg, device=cpu)
    for ours, ref in zip(one.denoisers.experts, at_load.denoisers.experts):
        assert_same_model(ref, ours)
    rep = one.denoisers.describe()["quant"]
    assert rep["linears"] == 2 * at_load.denoisers.describe()["quant"]["per_expert"]["transformer"]["linears"]
    assert "pre-quantised: read from high_noise_quantized_ckpt" in rep["per_expert"]["transformer"]["weights"]
    assert "weights" not in rep  # given per expert
    assert "pre-quantised" not in rep["per_expert"]["transformer_2"]["weights"]
    assert rep["per_expert"]["transformer"]["checkpoint"]["path"] == str(high) and "checkpoint" not in rep
    assert "checkpoint" not in rep["per_expert"]["transformer_2"]

    # both experts from files; the model folder without either expert's weights
    root = shutil.copytree(a14b, tmp_path / "model")
    for sub in ("transformer", "transformer_2"):
        for p in (root / sub).glob("diffusion_pytorch_model*"):
            p.unlink()
    both = {**base, "model_path": str(root), "high_noise_quantized_ckpt": str(high), "low_noise_quantized_ckpt": str(low)}
    with pytest.raises(ModelFolderError, match=r"missing transformer_2/diffusion_pytorch_model\.safetensors"):
        load_runner(load_config(data={**both, "low_noise_quantized_ckpt": None}), device=cpu)
    two = load_runner(load_config(data=both), device=cpu)
    for ours, ref in zip(two.denoisers.experts, at_load.denoisers.experts):
        assert_same_model(ref, ours)
    assert all("pre-quantised" in e["weights"] for e in two.denoisers.describe()["quant"]["per_expert"].values())

    # the official layout (high_noise_model/ + low_noise_model/, no boundary file: the boundary from the high expert's
    # config.json alone), the high expert's folder without weights
    off = shutil.copytree(a14b, tmp_path / "official")
    (off / "transformer").rename(off / "high_noise_model")
    (off / "transformer_2").rename(off / "low_noise_model")
    (off / "model_index.json").write_text((off / "model_index.json").read_text().replace(
        '"boundary_ratio": 0.875', '"boundary_ratio": null'))
    for p in (off / "high_noise_model").glob("diffusion_pytorch_model*"):
        p.unlink()
    official = load_runner(load_config(data={**base, "model_path": str(off), "high_noise_quantized_ckpt": str(high)}),
                           device=cpu)
    assert official.denoisers.names == ["high_noise_model", "low_noise_model"] and official.denoisers.boundary == 0.875
    for ours, ref in zip(official.denoisers.experts, at_load.denoisers.experts):
        assert_same_model(ref, ours)

    # refusals: the one-DiT key on two experts; an expert's file does not fit it (the experts' files swapped is fine:
    # same shapes), a LoRA for an expert with a file
    with pytest.raises(ConfigError, match=r"^dit_quantized_ckpt: wan2\.2_moe .* takes high_noise_quantized_ckpt / "
                                          r"low_noise_quantized_ckpt; set dit_quantized_ckpt to null"):
        check_quant(load_config(data={**base, "dit_quantized_ckpt": str(high)}), cpu)
    partial = write_lightx2v({"blocks.0.self_attn.q.weight": torch.zeros(32, 32).to(torch.float8_e4m3fn)},
                             tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"^low_noise_quantized_ckpt .*partial\.safetensors: 1 quantised weight"):
        check_quant(load_config(data={**base, "low_noise_quantized_ckpt": str(partial)}), cpu)
    lora = {"path": str(tmp_path / "l.safetensors"), "name": "low_noise_model"}
    with_lora = load_config(data={**base, "low_noise_quantized_ckpt": str(low), "lora_configs": [lora]})
    for call in (lambda: check_quant(with_lora, cpu), lambda: load_runner(with_lora, device=cpu)):
        with pytest.raises(ConfigError, match=r"^lora_configs: 1 LoRA\(s\) for transformer_2, whose "
                                              r"low_noise_quantized_ckpt '.*low' is pre-quantised"):
            call()  # start-up check, and the load itself before either expert is read


def test_ti2v_loads_from_its_file(tmp_path, gpu_like):
    """Wan2.2 TI2V-5B (its Ti2vDiT) from dit_quantized_ckpt, its DiT folder without weights: bit for bit the
    quantise-at-load model."""
    from ditfleet.config import load_config
    from ditfleet.engine.pipeline import load_runner
    from ditfleet.engine.tiny import build_components, save_components
    from ditfleet.models.wan22.ti2v import Ti2vDiT

    from ditfleet.engine.preflight import check_quant

    folder = save_components(build_components("i2v", family="wan2.2"), tmp_path / "ti2v", "i2v")
    cpu = torch.device("cpu")
    base = {"task": "i2v", "dit_quantized": True, "device": "cpu", "model_path": str(folder)}
    at_load = load_runner(load_config(data=base), device=cpu)
    file = write_lightx2v(lightx2v_tensors(at_load.dit), tmp_path / "ti2v_fp8.safetensors")
    for p in (folder / "transformer").glob("diffusion_pytorch_model*"):
        p.unlink()  # the DiT folder keeps only its config.json
    cfg = load_config(data={**base, "dit_quantized_ckpt": str(file)})
    check_quant(cfg, cpu)  # builds Ti2vDiT on meta against the file's headers
    runner = load_runner(cfg, device=cpu)
    assert type(runner.dit) is Ti2vDiT and runner.family == "wan2.2"
    assert_same_model(at_load.dit, runner.dit)
