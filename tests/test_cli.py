"""The CLI: exit codes, one-line user errors without traceback, per-site kernel report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ditfleet.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ditfleet", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_check_config_default_reports_each_site():
    p = run("check-config")
    assert p.returncode == 0, p.stderr
    assert "embedded tiny default -- valid" in p.stdout
    assert "self_attn_1_type" in p.stdout and "cross_attn_1_type" in p.stdout
    assert "torch_sdpa -> torch SDPA flash kernel (CPU) [sdpa_cpu_flash]" in p.stdout
    assert "cross_attn_2_type: not used by task t2v" in p.stdout


def test_check_config_shows_fallback_and_reason(tiny_folders):
    p = run("check-config", "configs/wan_t2v_1.3b.json", "--device", "cpu", "--set", f"model_path={tiny_folders['t2v']}")
    assert p.returncode == 0, p.stderr
    assert "flash_attn3 -> " in p.stdout and "(FALLBACK)" in p.stdout and "not fa3:" in p.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["check-config", "--set", "self_attn_1_type=flash_attn9"], "self_attn_1_type: unknown attention type"),
        (["check-config", "--set", "cross_attn_1_type=radial_attn"], "cross_attn_1_type:"),
        (["check-config", "does/not/exist.json"], "does not exist"),
        (["check-config", "configs/wan_t2v_14b.json", "--world-size", "4"], "model_path: ${WAN21_T2V_14B_DIFFUSERS} is a placeholder"),
        (["check-config", "configs/wan_t2v_14b.json", "--world-size", "4", "--set", "model_path=."], "parallel:"),
        (["check-config", "--set", "strict_backends=true", "--set", "self_attn_1_type=flash_attn3"], "strict_backends"),
        (["check-config", "--set", "sparge=true"], "sparge_ckpt"),
        (["check-config", "--bogus"], "unrecognized arguments"),
        (["bench", "attention", "--kernels", "nope", "--device", "cpu"], "nope"),
    ],
)
def test_user_errors_exit_2_without_traceback(args, needle):
    p = run(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and needle in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("ditfleet: error:")


def test_invalid_json_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"seed": 1,\n "infer_steps": }')
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 2, column" in err


def test_world_size_from_torchrun_env(monkeypatch, tmp_path, capsys):
    cfgf = tmp_path / "c.json"
    cfgf.write_text(json.dumps({"launcher": "torchrun", "parallel": {"seq_p_size": 2}}))
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["check-config", str(cfgf)]) == 2
    assert "world size is 3" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["check-config", str(cfgf)]) == 0


def test_check_config_reports_radial_density(tiny_folders, tmp_path):
    from PIL import Image

    Image.new("RGB", (832, 480), (10, 20, 30)).save(tmp_path / "ref.png")
    p = run("check-config", "configs/wan_i2v.json", "--device", "cpu", "--set", f"model_path={tiny_folders['i2v']}",
            "--set", f"image_path={tmp_path / 'ref.png'}")
    assert p.returncode == 0, p.stderr
    assert "radial_attn -> " in p.stdout and "32760 tokens, density 0.3" in p.stdout


def test_doctor_self_check_passes_on_cpu():
    p = run("doctor", "--device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "sdpa_cpu_flash" in p.stdout and "self-check passed" in p.stdout
