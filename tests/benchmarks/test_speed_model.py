"""`benchmarks/speed_model.py`: the quick run writes well-formed results (no timing thresholds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lavida_agent.benchmarks import speed_model

HEADLINE = ("elastic_speedup", "cache_speedup", "symmetric_mot_ratio", "grounding_speedup", "gflops_ratio")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    threads = torch.get_num_threads()
    # one thread: the quick run stays fast even when another process holds the cores
    result = speed_model.run(quick=True, preset="tiny", out_dir=out, threads=1)
    assert torch.get_num_threads() == threads  # restored
    return out, result


def _finite_numbers(obj, path="") -> list[str]:
    """Paths of every non-finite float inside a JSON document."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad += _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path)
    return bad


def test_headline_keys_types_and_values(quick):
    out, result = quick
    on_disk = json.loads((out / "speed.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for key in HEADLINE:
        assert isinstance(on_disk[key], float), key
        assert math.isfinite(on_disk[key]) and on_disk[key] > 0, key
    assert on_disk["grounding_forwards"] == 1
    assert isinstance(on_disk["grounding_forwards"], int)
    assert not _finite_numbers(on_disk)


def test_details_and_machine_info(quick):
    _, r = quick
    d = r["details"]
    forwards = d["grounding"]["forwards"]
    # reranking adds two forwards (condition + image) per chunk of candidate boxes, if any
    assert forwards.pop("reranked") in (4, 6, 8)
    views = forwards.pop("views")  # 12 views in one batch: 4 forwards, then the rerank's
    assert views >= 4 and views % 2 == 0
    assert forwards == {"one_forward": 1, "stepwise": 4, "sequential": 12, "sequential_cached_prefix": 13}
    assert d["generate"]["batch1"]["forwards"] == d["generate"]["batch8"]["forwards"] == 17  # prefill + 16
    assert set(d["step"]["timings"]) >= {
        "uncached_all_layers", "uncached_elastic", "cached_elastic", "symmetric_cached_elastic",
    }  # fmt: skip
    assert r["matmul_gflops"] > 0 and r["achieved_gflops"] > 0
    # the symmetric model has a gen branch as wide as und, so more gen parameters
    assert r["model"]["symmetric_params"]["gen"] > r["model"]["params"]["gen"]
    assert d["step"]["symmetric_flop_ratio_cached"] > 1
    m = r["machine"]
    assert m["torch"] == torch.__version__ and m["threads"] == 1
    assert r["settings"]["quick"] is True and r["settings"]["preset"] == "tiny"


def test_markdown_table(quick):
    out, _ = quick
    md = (out / "speed.md").read_text()
    assert md.startswith("# Model speed")
    for key in HEADLINE + ("grounding_forwards",):
        assert f"| {key} |" in md


def test_step_flops_match_parameter_count():
    """The analytic gen-layer FLOPs are 2 x (gen layer weights + shared o_proj rows) x tokens."""
    from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion

    cfg = LavidaConfig(**PRESETS["shapes"])
    with torch.device("meta"):
        net = LavidaForMaskedDiffusion(cfg)
    gen_weights = sum(p.numel() for n, p in net.named_parameters()
                      if n.startswith("layers.") and "_gen" in n and "norm" not in n)  # fmt: skip
    o_rows = cfg.num_layers * cfg.gen_hidden_size * cfg.hidden_size
    P = cfg.positions_per_image
    f = speed_model.generation_step_flops(cfg, rows=2, seq_len=P, key_len=P + 20, gen_per_row=P,
                                          elastic=True, text_head=False, cached=True)  # fmt: skip
    assert f["gen_layers"] == 2 * 2 * P * (gen_weights + o_rows)
    assert f["und_layers"] == 0 and f["text_head"] == 0
    assert f["attention"] == 4 * 2 * P * (P + 20) * cfg.hidden_size * cfg.num_layers
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    full = speed_model.generation_step_flops(cfg, rows=2, seq_len=P + 20, key_len=P + 20, gen_per_row=P,
                                             elastic=False, text_head=True, cached=False)  # fmt: skip
    elastic = speed_model.generation_step_flops(cfg, rows=2, seq_len=P + 20, key_len=P + 20, gen_per_row=P,
                                                elastic=True, text_head=False, cached=False)  # fmt: skip
    assert full["und_layers"] * cfg.joint_layers == elastic["und_layers"] * cfg.num_layers


@pytest.mark.parametrize("preset", ["nope", "lavida-o"])
def test_bad_preset_is_a_clear_error(preset, tmp_path):
    with pytest.raises(ValueError, match="preset"):
        speed_model.run(quick=True, preset=preset, out_dir=tmp_path)
    assert not (tmp_path / "speed.json").exists()
