"""`model info` through a local click runner on the `model` group (meta-device counts)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lavida_agent.cli_model import model
from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig
from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion, count_parameters


def run(*args: str):
    return CliRunner().invoke(model, list(args))


def info_json(*args: str) -> dict:
    res = run("info", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LavidaForMaskedDiffusion(LavidaConfig(**PRESETS["tiny"]))


def test_tiny_preset_matches_a_real_model(tiny_model):
    out = info_json("--preset", "tiny")
    assert out["source"] == "preset tiny"
    expected = count_parameters(tiny_model)
    assert {k: out["params"][k] for k in expected} == expected
    assert out["params"]["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert out["config"]["hidden_size"] == 64 and out["config"]["gen_hidden_size"] == 32
    assert out["config"]["token_ids"]["loc_token_offset"] == PRESETS["tiny"]["loc_token_offset"]


def test_lavida_o_preset_reports_the_released_sizes():
    out = info_json("--preset", "lavida-o")
    p = out["params"]
    assert abs(p["und"] / 1e9 - 8.02) < 0.01  # FACTS §2.6
    assert abs(p["gen"] / 1e9 - 2.42) < 0.01
    assert p["total"] == p["und"] + p["gen"] + p["gen_heads"] + p["vision"]
    assert p["shared"] < p["und"]
    assert p["gen"] < p["active_generation"] < p["total"]
    assert out["config"]["num_layers"] == 32 and out["config"]["joint_layers"] == 17


def test_human_output():
    res = run("info", "--preset", "lavida-o")
    assert res.exit_code == 0, res.output
    assert "und" in res.output and "8.02B" in res.output and "2.42B" in res.output


def test_checkpoint_folders(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "transformer")
    (tmp_path / "pipeline_index.json").write_text(json.dumps({"transformer": "transformer"}))
    expected = count_parameters(tiny_model)
    for path in (tmp_path, tmp_path / "transformer"):
        out = info_json(str(path))
        assert {k: out["params"][k] for k in expected} == expected
        assert out["source"] == str(tmp_path / "transformer")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["{tmp}"], "is not a checkpoint"),
        (["{tmp}/missing"], "is not a folder"),
        (["{tmp}", "--preset", "tiny"], "not both"),
        (["{vq}"], "not a 'lavida_mdm' transformer"),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    vq = tmp_path / "vq"
    vq.mkdir()
    (vq / "config.json").write_text(json.dumps({"model_type": "lavida_vq"}))
    (tmp_path / "empty").mkdir()
    res = run("info", *[a.format(tmp=tmp_path / "empty", vq=vq) for a in args])
    assert res.exit_code == 1
    assert message in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert res.output.startswith("Error: ")


def test_the_global_model_option_is_the_default_path(tmp_path):
    """`lavida-agent --model PATH model info` reads PATH, not the embedded weights."""
    from lavida_agent.cli import cli

    res = CliRunner().invoke(cli, ["--model", str(tmp_path / "nowhere"), "model", "info"])
    assert res.exit_code == 1 and "nowhere" in res.output
    res = CliRunner().invoke(cli, ["--model", str(tmp_path / "nowhere"), "model", "info", "--preset", "tiny"])
    assert res.exit_code == 0 and "preset tiny" in res.output  # an explicit choice wins
