"""Fast tests of `train_vq` (loss goes down, checkpoints, exact resume), `evaluate_vq`
and the CLI, on a tiny config and stand-in images.

Run: `pytest tests/model/test_training_vq.py`
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lavida_agent.model.configuration_vq import VQConfig
from lavida_agent.model.modeling_vq import VQImageTokenizer
from lavida_agent.model.training_vq import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    crowded_scene,
    edit_locality,
    evaluate_vq,
    main,
    sample_shapes_world_batch,
    train_vq,
    warmup_cosine,
)

from .test_modeling_vq import stand_in_images, tiny_config


class Interrupted(Exception):
    """Raised by the stand-in data source to simulate a crash mid-run."""


def crashing_sampler(after_calls: int):
    calls = {"n": 0}

    def sample(rng: np.random.Generator, batch_size: int) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Interrupted
        return stand_in_images(rng, batch_size)

    return sample


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / METRICS_NAME).read_text().splitlines()]


def run(out_dir, *, steps: int, sample_batch=stand_in_images, **kwargs):
    options = dict(batch_size=4, lr=3e-3, seed=0, log_every=2, save_every=4, progress=False)
    options.update(kwargs)
    return train_vq(tiny_config(), steps=steps, out_dir=out_dir, sample_batch=sample_batch,
                    **options)  # fmt: skip


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, warmup_steps=10, total_steps=100) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup_steps=10, total_steps=100) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup_steps=10, total_steps=100) == pytest.approx(1.0)
    assert warmup_cosine(100, warmup_steps=10, total_steps=100) == pytest.approx(0.05)
    values = [warmup_cosine(s, warmup_steps=10, total_steps=100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_a_few_steps_reduce_the_loss(tmp_path):
    result = run(tmp_path, steps=24, lr=1e-2, warmup_steps=2, log_every=4, save_every=100)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    assert records[-1]["recon_loss"] < 0.6 * records[0]["recon_loss"]  # ~1.08 -> ~0.41
    assert result["step"] == 24 and result["seconds_per_step"] > 0
    assert {"loss", "recon_loss", "commitment_loss", "perplexity", "codebook_usage"} <= set(result)
    # The final model is saved (fp32) and loads.
    loaded = VQImageTokenizer.from_pretrained(tmp_path / "final")
    assert loaded.config == tiny_config()


def test_checkpoint_holds_the_full_training_state(tmp_path):
    run(tmp_path, steps=4)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 4 and state["steps"] == 4
    assert state["config"] == tiny_config().to_dict()
    assert {"model", "optimizer", "scheduler", "data_rng", "restart_generator"} <= set(state)
    assert "quantizer.cluster_size" in state["model"]  # EMA codebook statistics travel too


def test_resume_continues_identically(tmp_path):
    full_dir, crash_dir = tmp_path / "full", tmp_path / "crash"
    run(full_dir, steps=10)
    # The same run dies while drawing the batch of step 7; its last checkpoint is step 4,
    # and it had already logged step 6.
    with pytest.raises(Interrupted):
        run(crash_dir, steps=10, sample_batch=crashing_sampler(after_calls=6))
    assert [r["step"] for r in read_metrics(crash_dir)] == [2, 4, 6]
    run(crash_dir, steps=10)  # resume=True by default

    full = VQImageTokenizer.from_pretrained(full_dir / "final")
    resumed = VQImageTokenizer.from_pretrained(crash_dir / "final")
    for (name, a), (_, b) in zip(
        full.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

    def drop_timing(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]

    assert drop_timing(read_metrics(crash_dir)) == drop_timing(read_metrics(full_dir))
    elapsed = [r["elapsed_s"] for r in read_metrics(crash_dir)]
    assert elapsed == sorted(elapsed)  # the run's clock goes on across the resume


def test_resume_rejects_a_different_config(tmp_path):
    run(tmp_path, steps=2)
    with pytest.raises(ValueError, match="different config"):
        train_vq(tiny_config(num_vq_embeddings=16), steps=4, out_dir=tmp_path,
                 sample_batch=stand_in_images, progress=False)  # fmt: skip


def test_no_resume_starts_over(tmp_path):
    run(tmp_path, steps=4)
    (tmp_path / "eval.json").write_text("{}")  # the evaluation of the run before
    run(tmp_path, steps=2, resume=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [2]
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize(("change", "named"), [
    ({"lr": 1e-2}, "--lr 0.003 -> 0.01"), ({"seed": 7}, "--seed 0 -> 7"), ({"batch_size": 3}, "--batch-size"),
    ({"edge_loss_weight": 2.0}, "--edge-loss-weight"), ({"crowded": 0.5}, "--crowded"),
])  # fmt: skip
def test_a_resume_with_other_arguments_is_refused_and_names_them(tmp_path, change, named):
    run(tmp_path, steps=2)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(ValueError, match="holds a run started with other arguments") as e:
        run(tmp_path, steps=4, **change)
    assert named in str(e.value)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before  # nothing trained on
    assert [r["step"] for r in read_metrics(tmp_path)] == [2]


def test_a_resume_needs_steps_up_to_the_checkpoint_and_a_finished_run_reports_its_last_record(tmp_path):
    first = run(tmp_path, steps=4)
    with pytest.raises(ValueError, match="at step 4, past --steps 2"):
        run(tmp_path, steps=2)
    again = run(tmp_path, steps=4)  # nothing left to train
    assert again["seconds_per_step"] is None
    assert {k: v for k, v in again.items() if k != "seconds_per_step"} == {
        **{k: v for k, v in first.items() if k != "seconds_per_step"}, "elapsed_s": first["elapsed_s"]}


def test_a_half_written_log_line_does_not_stop_a_resume(tmp_path):
    with pytest.raises(Interrupted):
        run(tmp_path, steps=8, sample_batch=crashing_sampler(after_calls=6))
    with (tmp_path / METRICS_NAME).open("a") as f:
        f.write('{"step": 7, "loss": 0.1')  # killed mid-write
    run(tmp_path, steps=8)
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6, 8]


def test_a_damaged_checkpoint_is_named(tmp_path):
    run(tmp_path, steps=2)
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=f"cannot read the checkpoint {path}"):
        run(tmp_path, steps=4)


@pytest.mark.parametrize("bad", [["--steps", "-5"], ["--steps", "0"], ["--log-every", "0"], ["--save-every", "0"],
                                 ["--batch-size", "0"], ["--lr", "0"]])  # fmt: skip
def test_cli_refuses_counts_below_one_before_writing(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "run"), *bad], prog="lavida-agent train vq")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: lavida-agent train vq") and bad[0] in err
    assert not (tmp_path / "run").exists()


def test_evaluate_vq_reports_fractions():
    pytest.importorskip("lavida_agent.tools.shapes_world.detect")
    metrics = evaluate_vq(VQImageTokenizer(tiny_config()), n_scenes=6, seed=0, batch_size=4)
    assert metrics["n_scenes"] == 6
    for key in ("detector_exact", "detector_on_originals", "pixel_exact", "pixel_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["detector_on_originals"] == 1.0  # the detector is exact on renders
    assert metrics["psnr"] > 0 and metrics["codes_used"] >= 1


class _CellTokenizer:
    """Each 4x4 cell's code is its mean colour, optionally offset by the image's mean
    brightness (a stand-in for an encoder that normalises over the whole image)."""

    def __init__(self, global_stats: bool):
        self.global_stats = global_stats

    def eval(self):
        return self

    def encode(self, pixels):
        from types import SimpleNamespace

        cells = torch.nn.functional.avg_pool2d(pixels, 4)  # (B, 3, 16, 16)
        if self.global_stats:
            cells = cells + pixels.mean(dim=(1, 2, 3), keepdim=True)
        return SimpleNamespace(codes=(cells * 64).round().long())


def test_edit_locality_tells_local_codes_from_global_ones():
    local = edit_locality(_CellTokenizer(global_stats=False), n_edits=12, seed=3, batch_size=5)
    assert local == {"codes_changed_outside_edit": 0.0, "edits": 12}  # no pixel changes there
    spread = edit_locality(_CellTokenizer(global_stats=True), n_edits=12, seed=3, batch_size=5)
    assert spread["codes_changed_outside_edit"] > 0.5  # the mean moves every code


def test_cli_trains_and_exports(tmp_path, monkeypatch):
    pytest.importorskip("lavida_agent.tools.shapes_world.sampler")
    out, export = tmp_path / "run", tmp_path / "export"
    result = main([
        "--out", str(out), "--steps", "2", "--batch-size", "2", "--log-every", "1",
        "--hidden-channels", "16", "--latent-channels", "8", "--codebook-size", "16",
        "--no-progress", "--export", str(export), "--eval-scenes", "2",
    ])  # fmt: skip
    assert result["step"] == 2 and "eval" in result
    assert (out / CHECKPOINT_NAME).exists() and (out / "eval.json").exists()
    assert VQConfig.from_pretrained(export).num_vq_embeddings == 16


def test_resume_with_more_steps_retargets_the_schedule(tmp_path):
    run(tmp_path, steps=4)
    run(tmp_path, steps=6)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6]
    # Each record's lr is the rate its step took: the cosine now ends at step 6, not 4.
    assert records[-1]["lr"] == pytest.approx(3e-3 * warmup_cosine(5, warmup_steps=1, total_steps=6))
    assert records[1]["lr"] == pytest.approx(3e-3 * warmup_cosine(3, warmup_steps=1, total_steps=4))


def test_decoder_only_keeps_the_codes_and_deepens_the_decoder(tmp_path):
    """A decoder fine-tune on a frozen encoder/codebook: every image keeps its codes, added
    blocks start as identities (same reconstruction at step 0), and only the decoder moves."""
    run(tmp_path / "base", steps=6)
    base = VQImageTokenizer.from_pretrained(tmp_path / "base" / "final")
    pixels = torch.from_numpy(stand_in_images(np.random.default_rng(3), 4)).permute(0, 3, 1, 2).float() / 255

    deeper = VQImageTokenizer(tiny_config(decoder_res_blocks=tiny_config().num_res_blocks + 2))
    from lavida_agent.model.training_vq import _load_initial_weights

    _load_initial_weights(deeper, tmp_path / "base" / "final")
    deeper.eval()
    codes = base.encode(pixels).codes
    torch.testing.assert_close(deeper.decode(codes), base.decode(codes))

    train_vq(tiny_config(decoder_res_blocks=tiny_config().num_res_blocks + 2), steps=6,
             out_dir=tmp_path / "ft", sample_batch=stand_in_images, batch_size=4, lr=1e-2,
             progress=False, init_from=tmp_path / "base" / "final", decoder_only=True)  # fmt: skip
    tuned = VQImageTokenizer.from_pretrained(tmp_path / "ft" / "final")
    assert torch.equal(tuned.encode(pixels).codes, codes)
    for name in ("encoder", "quantizer"):
        for (k, a), b in zip(getattr(base, name).state_dict().items(), getattr(tuned, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k} changed"
    assert not torch.equal(tuned.decoder.conv_in.weight, base.decoder.conv_in.weight)


def test_decoder_only_needs_matching_weights(tmp_path):
    with pytest.raises(ValueError, match="needs init_from"):
        run(tmp_path / "a", steps=1, decoder_only=True)
    run(tmp_path / "base", steps=2)
    with pytest.raises(ValueError, match="different architecture"):
        train_vq(tiny_config(num_vq_embeddings=16), steps=1, out_dir=tmp_path / "b",
                 sample_batch=stand_in_images, progress=False, init_from=tmp_path / "base" / "final")  # fmt: skip


def test_crowded_scenes_put_objects_closer_and_only_draw_when_asked():
    def closest_gap(scene):
        gaps = [max(b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])
                for i, a in enumerate(scene.objects) for b in scene.objects[i + 1:]]  # fmt: skip
        return min(gaps)

    from lavida_agent.tools.shapes_world.sampler import sample_scene

    rng = np.random.default_rng(0)
    crowded = [crowded_scene(rng) for _ in range(100)]
    plain = [sample_scene(rng) for _ in range(100)]
    assert all(len(s.objects) >= 3 and [o.size for o in s.objects[:2]] == ["large"] * 2 for s in crowded)
    near = lambda scenes: np.mean([len(s.objects) > 1 and closest_gap(s) <= 3 for s in scenes])  # noqa: E731
    assert near(crowded) > near(plain) + 0.2
    # off, the batch is what it always was (same draws from the same generator)
    a = sample_shapes_world_batch(np.random.default_rng(5), 3)
    b = sample_shapes_world_batch(np.random.default_rng(5), 3, crowded=0.0)
    c = sample_shapes_world_batch(np.random.default_rng(5), 3, crowded=1.0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cli_rejects_a_crowded_share_outside_0_1(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--steps", "1", "--crowded", "1.5"])
    assert "--crowded must be a share" in capsys.readouterr().err
