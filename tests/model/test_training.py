"""Training: a tiny config trains, checkpoints, and resumes exactly where it stopped."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig
from lavida_agent.model.tasks import build_t2i, parse_plan
from lavida_agent.model.training import (
    TASK_WEIGHTS,
    export_checkpoint,
    TaskSampler,
    TrainConfig,
    add_noise,
    build_tokenizer,
    corpus_for_tokenizer,
    look_alike_scene,
    lr_at,
    token_ids,
    main,
    touched_plan,
    train,
)
from lavida_agent.tools.shapes_world import valid_scene
from lavida_agent.tools.shapes_world.language import parse_prompt

TINY = dict(preset="tiny", tokens_per_batch=300, max_rows=3, warmup=2, tokenizer_corpus=20,
            log_every=1, eval_every=1000, eval_rows=2, lr=3e-3, vision_pretrain_steps=2,
            vision_pretrain_batch=2)  # fmt: skip


@pytest.fixture()
def vq_dir(tmp_path, tiny_vq):
    tiny_vq.save_pretrained(tmp_path / "vq", dtype=torch.float32)
    return str(tmp_path / "vq")


def _weights(out):
    state = torch.load(out / "state.pt", weights_only=False)
    return state["model"], state["step"]


def test_resume_continues_identically(tmp_path, vq_dir):
    straight = tmp_path / "straight"
    train(TrainConfig(out=str(straight), vq=vq_dir, steps=4, save_every=2, **TINY), progress=False)
    resumed = tmp_path / "resumed"
    train(TrainConfig(out=str(resumed), vq=vq_dir, steps=2, save_every=2, **TINY), progress=False)
    train(TrainConfig(out=str(resumed), vq=vq_dir, steps=4, save_every=2, **TINY), progress=False)
    a, step_a = _weights(straight)
    b, step_b = _weights(resumed)
    assert step_a == step_b == 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert "vision_step" in records[0]  # stage 0 ran first, once: the resumed run did not redo it
    losses = [r for r in records if "step" in r]
    assert any(k.startswith("loss/") for k in losses[0])
    resumed_records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert sum("vision_step" in r for r in resumed_records) == 1
    assert (straight / "export" / "pipeline_index.json").exists()


def test_noise_masks_only_targets_and_keeps_tensors_in_step(tokenizer, tiny_config):
    codes = np.random.default_rng(0).integers(0, 32, (16, 16))
    ex = build_t2i(tokenizer, tiny_config, "a red circle", codes=codes,
                   plan=[("small red circle", (4, 4, 16, 16))], plan_is_target=True)  # fmt: skip
    for seed in range(30):
        noisy, image_labels = add_noise(ex, np.random.default_rng(seed), tiny_config)
        P = tiny_config.positions_per_image
        n_gen = sum(t in (tiny_config.img_gen_token_id, tiny_config.img_src_token_id) for t in noisy.input_ids)
        assert n_gen == P * len(noisy.gen_codes)
        (labels,) = image_labels
        masked = noisy.gen_codes[-1] == tiny_config.image_mask_code
        assert masked.any() and np.array_equal(labels != -100, masked)
        assert np.array_equal(labels[masked], codes[masked])
        for pos, lab in enumerate(noisy.text_targets):
            if lab != -100:  # a text label sits only on a masked target position
                assert noisy.input_ids[pos] == tiny_config.mask_token_id
                assert ex.text_targets[pos] == lab


def test_plans_to_learn_list_the_objects_in_the_prompts_order():
    tok = build_tokenizer(corpus_for_tokenizer(50))
    cfg = LavidaConfig(**{**PRESETS["tiny"], **token_ids(tok), "codebook_size": 32})
    examples = TaskSampler(tok, cfg, vq=None).examples("plan", np.random.default_rng(0), 24)
    for ex in examples:
        prompt, answer = tok.decode(ex.input_ids).split("<assistant>")
        prompt = prompt.split("generate an image of :")[1].split("objects :")[0].strip()
        named = [req.shape for req in parse_prompt(prompt).objects for _ in range(req.count)]
        assert [label.split()[-1] for label, _ in parse_plan(answer)] == named, (prompt, answer)


def test_lr_schedule_warms_up_then_decays():
    tc = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, tc) for s in range(100)]
    assert lrs[0] < lrs[9] == 1.0
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_touched_plan_lists_changed_regions():
    from lavida_agent.tools.shapes_world.scene import Object, Scene

    a = Object("circle", "red", "small", (4, 4, 16, 16))
    b = Object("square", "blue", "large", (30, 30, 50, 50))
    src = Scene("white", (a, b))
    recolored = Scene("white", (Object("circle", "green", "small", (4, 4, 16, 16)), b))
    assert touched_plan(src, recolored) == [("small green circle", (4, 4, 16, 16)), ("removed", (4, 4, 16, 16))]
    assert touched_plan(src, Scene("black", (a, b))) == []


def test_a_later_stage_starts_from_earlier_weights(tmp_path, vq_dir):
    first = tmp_path / "stage1"
    train(TrainConfig(out=str(first), vq=vq_dir, steps=2, save_every=2, **TINY), progress=False)
    second = tmp_path / "stage2"
    tc = TrainConfig(out=str(second), vq=vq_dir, steps=0, save_every=2, init_from=str(first), **TINY)
    tc.task_weights = {"ground": 1.0}
    train(tc, progress=False)
    a, _ = _weights(first)
    exported = (second / "export" / "pipeline_index.json").exists()
    assert exported and (second / "tokenizer" / "tokenizer.json").exists()
    from lavida_agent.model.pipeline_lavida import LavidaPipeline

    loaded = LavidaPipeline.from_pretrained(second / "export").model.state_dict()
    assert all(torch.equal(a[k].half().float(), loaded[k]) for k in a)


def test_a_run_can_start_from_a_pipeline_folder(tmp_path, vq_dir):
    first = tmp_path / "stage1"
    train(TrainConfig(out=str(first), vq=vq_dir, steps=2, save_every=2, **TINY), progress=False)
    second = tmp_path / "from_pipeline"
    train(TrainConfig(out=str(second), vq=vq_dir, steps=0, init_from=str(first / "export"), **TINY),
          progress=False)  # fmt: skip
    from lavida_agent.model.pipeline_lavida import LavidaPipeline

    a = LavidaPipeline.from_pretrained(first / "export").model.state_dict()
    b = LavidaPipeline.from_pretrained(second / "export").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_with_the_linear_vision_stem_keep_it(tmp_path, vq_dir):
    """A run from (or resuming) weights made before the modulated stem keeps their stem."""
    first = tmp_path / "linear"
    train(TrainConfig(out=str(first), vq=vq_dir, steps=1, model_overrides={"vision_stem": "linear"}, **TINY),
          progress=False)  # fmt: skip
    second = tmp_path / "later"
    train(TrainConfig(out=str(second), vq=vq_dir, steps=1, init_from=str(first / "export"), **TINY),
          progress=False)  # fmt: skip
    from lavida_agent.model.pipeline_lavida import LavidaPipeline

    assert LavidaPipeline.from_pretrained(second / "export").model.config.vision_stem == "linear"
    from lavida_agent.model.training import export_checkpoint

    assert export_checkpoint(first, tmp_path / "exported")["step"] == 1  # a running linear run exports as linear
    assert LavidaPipeline.from_pretrained(tmp_path / "exported").model.config.vision_stem == "linear"
    fresh = tmp_path / "fresh"
    train(TrainConfig(out=str(fresh), vq=vq_dir, steps=1, **TINY), progress=False)
    assert LavidaPipeline.from_pretrained(fresh / "export").model.config.vision_stem == "modulated"


@pytest.mark.parametrize("stem", ["linear", "modulated", "conv"])
def test_vision_stem_of_reads_the_stem_from_weights(tiny_config, stem):
    from lavida_agent.model.configuration_lavida import LavidaConfig
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
    from lavida_agent.model.training import vision_stem_of

    model = LavidaForMaskedDiffusion(LavidaConfig(**{**tiny_config.to_dict(), "vision_stem": stem}))
    weights = model.state_dict()
    assert vision_stem_of(weights) == stem
    assert vision_stem_of({k: v for k, v in weights.items() if not k.startswith("vision.")}) is None


def test_reset_vision_swaps_in_a_fresh_pretrained_encoder_and_keeps_the_rest(tmp_path, vq_dir):
    first = tmp_path / "linear"
    train(TrainConfig(out=str(first), vq=vq_dir, steps=1, model_overrides={"vision_stem": "linear"}, **TINY),
          progress=False)  # fmt: skip
    second = tmp_path / "reset"
    train(TrainConfig(out=str(second), vq=vq_dir, steps=0, init_from=str(first / "export"), reset_vision=True,
                      **TINY), progress=False)  # fmt: skip
    from lavida_agent.model.pipeline_lavida import LavidaPipeline

    a = LavidaPipeline.from_pretrained(first / "export").model.state_dict()
    model = LavidaPipeline.from_pretrained(second / "export").model
    b = model.state_dict()
    assert model.config.vision_stem == "modulated"
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("vision."))
    records = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert any("vision_step" in r for r in records)  # stage 0 trained the new encoder


def test_init_from_weights_of_another_shape_is_refused(tmp_path, vq_dir):
    first = tmp_path / "small"
    train(TrainConfig(out=str(first), vq=vq_dir, steps=0, **TINY), progress=False)
    second = tmp_path / "wider"
    tc = TrainConfig(out=str(second), vq=vq_dir, steps=0, init_from=str(first / "export"),
                     model_overrides={"vision_layers": 2}, **TINY)  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        train(tc, progress=False)


def test_weights_without_the_location_code_export_as_they_are_and_grow_it_in_a_new_stage(tmp_path, vq_dir):
    from lavida_agent.model.pipeline_lavida import LavidaPipeline
    from lavida_agent.model.training import export_checkpoint

    first = tmp_path / "old"
    train(TrainConfig(out=str(first), vq=vq_dir, steps=1, model_overrides={"loc_code_dim": 0}, **TINY),
          progress=False)  # fmt: skip
    export_checkpoint(first, tmp_path / "exported")
    old = LavidaPipeline.from_pretrained(tmp_path / "exported").model
    assert old.config.loc_code_dim == 0
    second = tmp_path / "grown"
    train(TrainConfig(out=str(second), vq=vq_dir, steps=0, init_from=str(first), **TINY), progress=False)
    grown = LavidaPipeline.from_pretrained(second / "export").model
    assert grown.config.loc_code_dim == 8
    ids = torch.tensor([[grown.config.loc_token_offset + i for i in range(0, 60, 6)]])
    # zero-initialised: the grown model computes what the old one did
    assert torch.allclose(old(ids).text_logits, grown(ids).text_logits, atol=1e-5)


def test_several_tasks_share_a_step(tmp_path, vq_dir):
    """`tasks_per_step` draws several tasks into one update; a resumed run still continues
    exactly as an uninterrupted one."""
    kw = dict(TINY, tasks_per_step=3, save_every=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(TrainConfig(out=str(straight), vq=vq_dir, steps=2, **kw), progress=False)
    train(TrainConfig(out=str(resumed), vq=vq_dir, steps=1, **kw), progress=False)
    train(TrainConfig(out=str(resumed), vq=vq_dir, steps=2, **kw), progress=False)
    a, _ = _weights(straight)
    b, _ = _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("step") == 1)
    assert len([k for k in first if k.startswith("loss/")]) >= 2  # more than one task in step 1


def test_patch_words_label_object_patches_with_their_colour_or_shape(tokenizer, tiny_config, tiny_vq):
    from lavida_agent.model.tasks import build_understand
    from lavida_agent.model.training_vision import patch_targets
    from lavida_agent.tools.shapes_world.render import render
    from lavida_agent.tools.shapes_world.sampler import sample_scene
    from lavida_agent.tools.shapes_world.scene import COLORS, SHAPES

    cfg, enc_id = tiny_config, tiny_config.img_enc_token_id
    sampler = TaskSampler(tokenizer, cfg, tiny_vq, patch_words=4)
    words = {tokenizer.convert_tokens_to_ids(w): w for w in [*COLORS, *SHAPES]}
    rng = np.random.default_rng(0)
    for _ in range(5):
        scene = sample_scene(rng)
        ex = build_understand(tokenizer, cfg, render(scene), "what color is the background?", "gray")
        labelled = sampler.label_patches(ex, scene, rng)
        assert labelled.input_ids == ex.input_ids  # the image stays the input
        enc = [i for i, t in enumerate(ex.input_ids) if t == enc_id]
        patches = {enc.index(i): t for i, t in enumerate(labelled.text_targets) if i in enc and t != -100}
        truth = patch_targets(scene, cfg.vision_patch_size)
        assert len(patches) == min(4, int((truth["color"] >= 0).sum()))
        for patch, word in patches.items():  # the word of the object under that patch
            assert words[word] in (list(COLORS)[truth["color"][patch]], SHAPES[truth["shape"][patch]])
        noisy, _ = add_noise(labelled, rng, cfg)  # always labelled, never masked
        assert all(noisy.text_targets[enc[p]] == w and noisy.input_ids[enc[p]] == enc_id for p, w in patches.items())
    for task in ("ground", "understand", "critique"):
        for plain, with_words in zip(TaskSampler(tokenizer, cfg, tiny_vq).examples(task, np.random.default_rng(1), 4),
                                     sampler.examples(task, np.random.default_rng(1), 4)):  # fmt: skip
            on_image = lambda e: [t for i, t in zip(e.input_ids, e.text_targets) if i == enc_id and t != -100]  # noqa: E731
            assert on_image(plain) == [] and 1 <= len(on_image(with_words)) <= 4


def test_item_mask_hides_one_plan_items_coordinates_and_nothing_else(tokenizer, tiny_config):
    cfg = tiny_config
    plan = [("small red circle", (4, 4, 16, 16)), ("large blue square", (30, 30, 54, 54))]
    ex = build_t2i(tokenizer, cfg, "a red circle left of a blue square", plan=plan, plan_is_target=True,
                   with_image=False)  # fmt: skip
    begins = [i for i, t in enumerate(ex.input_ids) if t == cfg.loc_begin_token_id]
    seen = set()
    for seed in range(20):
        noisy, _ = add_noise(ex, np.random.default_rng(seed), cfg, item_mask=1.0)
        masked = [i for i, t in enumerate(noisy.input_ids) if t == cfg.mask_token_id]
        assert masked in ([b + k for k in range(1, 5)] for b in begins)
        assert [noisy.text_targets[i] for i in masked] == [ex.input_ids[i] for i in masked]
        assert all(t == -100 for i, t in enumerate(noisy.text_targets) if i not in masked)
        seen.add(masked[0])
    assert len(seen) == 2  # either item
    one = build_t2i(tokenizer, cfg, "a red circle", plan=plan[:1], plan_is_target=True, with_image=False)
    counts = {len([t for t in add_noise(one, np.random.default_rng(s), cfg, item_mask=1.0)[0].input_ids
                   if t == cfg.mask_token_id]) for s in range(20)}  # fmt: skip
    assert len(counts) > 1  # a one-item plan keeps the random share


def test_vision_aux_loss_trains_beside_the_mixture_and_resumes_identically(tmp_path, vq_dir):
    kw = dict(TINY, vision_aux=0.5, vision_aux_batch=2, vision_aux_warmup=2, save_every=2)
    straight = tmp_path / "straight"
    train(TrainConfig(out=str(straight), vq=vq_dir, steps=4, **kw), progress=False)
    resumed = tmp_path / "resumed"
    train(TrainConfig(out=str(resumed), vq=vq_dir, steps=2, **kw), progress=False)
    train(TrainConfig(out=str(resumed), vq=vq_dir, steps=4, **kw), progress=False)
    a = torch.load(straight / "state.pt", weights_only=False)
    b = torch.load(resumed / "state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["vision_aux_head"][k], b["vision_aux_head"][k]) for k in a["vision_aux_head"])
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/vision_aux"] > 0 for r in records if "step" in r and "lr" in r)
    # after its warm-up the aux loss reaches the encoder: without it the encoder ends elsewhere
    plain = tmp_path / "plain"
    train(TrainConfig(out=str(plain), vq=vq_dir, steps=4, **{**kw, "vision_aux": 0.0}), progress=False)
    c = torch.load(plain / "state.pt", weights_only=False)
    assert "vision_aux_head" not in c
    assert not torch.equal(a["model"]["vision.projector.0.weight"], c["model"]["vision.projector.0.weight"])


def test_vision_aux_warmup_trains_only_its_head(tiny_config, tiny_vq):
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
    from lavida_agent.model.training import vision_aux_loss
    from lavida_agent.model.training_vision import VisionProbeHead

    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(tiny_config).train()
    head = VisionProbeHead(tiny_config.hidden_size, tiny_config.loc_code_dim, tiny_config.num_loc_tokens)
    for head_only in (True, False):
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        vision_aux_loss(model, head, tiny_vq, np.random.default_rng(0), 2, head_only=head_only).backward()
        assert all(p.grad is not None for p in head.parameters())
        reached = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.vision.parameters()]
        assert (not any(reached)) if head_only else all(reached)


def test_question_weights_steer_the_understand_rows(tokenizer, tiny_config, tiny_vq):
    sampler = TaskSampler(tokenizer, tiny_config, tiny_vq, question_weights={"background": 1})
    texts = [tokenizer.decode(ex.input_ids, skip_special_tokens=True)
             for ex in sampler.examples("understand", np.random.default_rng(3), 24)]  # fmt: skip
    asked = [t for t in texts if "?" in t]  # the rest are captions ("describe the image.")
    assert asked and all("background" in t for t in asked)
    with pytest.raises(ValueError, match="unknown question kind"):
        TaskSampler(tokenizer, tiny_config, tiny_vq, question_weights={"colour": 1})


def test_cli_rejects_bad_question_weights(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "x"), "--questions", '{"colour": 1}', "--steps", "1"])
    assert e.value.code == 2 and "unknown question kind" in capsys.readouterr().err


def _spy(monkeypatch, owner, name: str) -> list:
    """Wrap `owner.name`; returns the list each call appends `(args, kwargs, result)` to."""
    calls, real = [], getattr(owner, name)

    def spy(*args, **kw):
        out = real(*args, **kw)
        calls.append((args, kw, out))
        return out

    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.mark.parametrize(
    "knob, draw, tasks, pick, bad",
    [("t2i_categories", "sample_prompt", ("t2i", "t2i_plan", "plan"), "position", "pose"),
     ("edit_categories", "sample_edit", ("edit", "edit_plan"), "move", "rotate")],
)  # fmt: skip
def test_category_weights_pick_what_every_row_of_their_tasks_draws(knob, draw, tasks, pick, bad, tokenizer,
                                                                   tiny_config, tiny_vq, monkeypatch,
                                                                   tmp_path):  # fmt: skip
    import lavida_agent.model.training as training

    calls = _spy(monkeypatch, training.lang, draw)
    sampler = TaskSampler(tokenizer, tiny_config, tiny_vq, **{knob: {pick: 1}})
    for task in tasks:
        sampler.examples(task, np.random.default_rng(2), 3)
    assert [out[1].category for _, _, out in calls] == [pick] * (3 * len(tasks))
    calls.clear()
    TaskSampler(tokenizer, tiny_config, tiny_vq).examples(tasks[0], np.random.default_rng(2), 2)
    # without weights the world draws as before: no category asked for (earlier runs replay)
    assert calls and all(kw.get("weights") is None and len(args) <= 2 for args, kw, _ in calls)
    with pytest.raises(ValueError, match="unknown (prompt|edit) category"):
        TaskSampler(tokenizer, tiny_config, tiny_vq, **{knob: {bad: 1}})
    flag = "--" + knob.replace("_", "-")
    for weights in ({bad: 1}, {pick: 0}):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "x"), flag, json.dumps(weights), "--steps", "1"])
        assert e.value.code == 2
    seen = []
    monkeypatch.setattr(training, "train", lambda tc, progress: seen.append(tc) or {})
    main(["--out", str(tmp_path / "x"), flag, json.dumps({pick: 2}), "--questions", '{"count": 1}', "--quiet"])
    assert getattr(seen[0], knob) == {pick: 2} and seen[0].question_weights == {"count": 1}


def test_background_edits_drawn_with_the_plan_can_go_without_a_plan_segment(tokenizer, tiny_config, tiny_vq):
    from lavida_agent.model.tasks import PLAN_LEN

    def lengths(**kw):
        sampler = TaskSampler(tokenizer, tiny_config, tiny_vq, edit_with_plan=1.0, **kw)
        return [len(ex.input_ids) for ex in sampler.examples("edit", np.random.default_rng(4), 3)]

    background, moves = {"edit_categories": {"background": 1}}, {"edit_categories": {"move": 1}}
    # the same rows either way, one plan segment shorter: the state the pipeline sends
    assert [n - PLAN_LEN for n in lengths(**background)] == lengths(**background, background_edit_without_plan=True)
    assert lengths(**moves) == lengths(**moves, background_edit_without_plan=True)  # a plan that touches boxes stays


def test_ground_full_mask_masks_every_coordinate_and_only_grounding_rows(tokenizer, tiny_config):
    from lavida_agent.model.tasks import build_ground

    cfg = tiny_config
    image = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
    ex = build_ground(tokenizer, cfg, image, ["the red circle", "the blue square"], [(4, 4, 16, 16), (30, 30, 54, 54)])
    coords = ex.target_positions()
    assert len(coords) == 8
    for seed in range(10):
        noisy, _ = add_noise(ex, np.random.default_rng(seed), cfg, ground_full_mask=1.0)
        assert [i for i, t in enumerate(noisy.input_ids) if t == cfg.mask_token_id] == coords
        assert [noisy.text_targets[p] for p in coords] == [ex.input_ids[p] for p in coords]
    # a plan row ignores it, and draws nothing more from the rng
    plan = build_t2i(tokenizer, cfg, "a red circle", plan=[("small red circle", (4, 4, 16, 16))],
                     plan_is_target=True, with_image=False)  # fmt: skip
    ra, rb = np.random.default_rng(0), np.random.default_rng(0)
    a, _ = add_noise(plan, ra, cfg)
    b, _ = add_noise(plan, rb, cfg, ground_full_mask=1.0)
    assert a.input_ids == b.input_ids and ra.random() == rb.random()


def test_single_kind_question_weights_fall_back_to_captions_where_a_scene_cannot_ask(tokenizer, tiny_config, tiny_vq):
    sampler = TaskSampler(tokenizer, tiny_config, tiny_vq, question_weights={"color": 1})
    texts = [tokenizer.decode(ex.input_ids, skip_special_tokens=True)
             for ex in sampler.examples("understand", np.random.default_rng(5), 64)]  # fmt: skip
    assert all("what color is the" in t or "describe the image" in t for t in texts)
    assert sum("what color is the" in t for t in texts) > 32


def test_critique_verdict_speaks_only_the_critique_vocabulary():
    from lavida_agent.model.training import critique_verdict
    from lavida_agent.tools.shapes_world.language import parse_verdict

    tok = build_tokenizer(corpus_for_tokenizer(200))
    assert critique_verdict(tok, []) == "yes"
    # a blob the detector cannot name is not a word the critique has: the verdict stays "no"
    assert critique_verdict(tok, ["extra unknown object"]) == "no"
    many = ["missing red circle", "extra unknown object", "2 triangles, expected 3",
            "blue square should be left of red circle", "background is white, expected gray"]  # fmt: skip
    text = critique_verdict(tok, many, max_tokens=15)
    ok, reasons = parse_verdict(text)
    assert not ok and reasons == ["missing red circle", "2 triangles, expected 3"]  # whole reasons only
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 15


def test_own_critique_rows_show_the_models_own_drawings_and_a_run_resumes_with_the_same_pool(tmp_path, vq_dir):
    from lavida_agent.tools.shapes_world.checkers import check_prompt

    kw = dict(TINY, own_critique=1.0, own_pool=4, save_every=2, task_weights={"critique": 1.0})
    straight = tmp_path / "straight"
    train(TrainConfig(out=str(straight), vq=vq_dir, steps=4, **kw), progress=False)
    resumed = tmp_path / "resumed"
    train(TrainConfig(out=str(resumed), vq=vq_dir, steps=2, **kw), progress=False)
    train(TrainConfig(out=str(resumed), vq=vq_dir, steps=4, **kw), progress=False)
    a, b = _weights(straight)[0], _weights(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    pool = np.load(straight / "own_pool.npz")
    assert pool["images"].shape == (4, 64, 64, 3) and pool["images"].dtype == np.uint8
    for prompt, image, verdict in zip(pool["prompts"], pool["images"], pool["verdicts"]):
        assert (verdict == "yes") == check_prompt(str(prompt), image).correct  # the detector's verdict


def test_own_critique_share_picks_pool_images(tokenizer, tiny_config, tiny_vq):
    images = np.stack([np.full((64, 64, 3), v, np.uint8) for v in (10, 20)])
    pool = {"images": images, "prompts": ["a red circle", "a blue square"], "verdicts": ["yes", "no"]}
    rows = TaskSampler(tokenizer, tiny_config, tiny_vq, own_pool=pool, own_critique=1.0).examples(
        "critique", np.random.default_rng(0), 6)  # fmt: skip
    assert all(any(np.array_equal(ex.images[0], im) for im in images) for ex in rows)
    plain = TaskSampler(tokenizer, tiny_config, tiny_vq).examples("critique", np.random.default_rng(0), 6)
    assert not any(np.array_equal(ex.images[0], im) for ex in plain for im in images)
    with pytest.raises(ValueError, match="own_pool"):
        TaskSampler(tokenizer, tiny_config, tiny_vq, own_critique=0.5)


def test_edit_region_mask_redraws_only_the_touched_cells_over_the_source(tokenizer, tiny_config, tiny_vq):
    from dataclasses import replace

    from lavida_agent.model.tasks import box_cells

    cfg = tiny_config
    sampler = TaskSampler(tokenizer, cfg, tiny_vq)
    edits = sampler.examples("edit", np.random.default_rng(3), 12)
    with_region = [ex for ex in edits if ex.edit_region is not None]
    assert with_region and all(ex.edit_region.shape == (cfg.image_grid,) * 2 for ex in with_region)
    ex = with_region[0]
    # a region that differs from the whole grid, and a source that differs from the target
    region = box_cells([(8, 8, 24, 20)], cfg)
    assert 0 < region.sum() < region.size
    tgt = ex.gen_codes[1]
    ex = replace(ex, edit_region=region, gen_codes=[(tgt + 1) % cfg.codebook_size, tgt])
    src = ex.gen_codes[0]
    for seed in range(10):
        noisy, (labels,) = add_noise(ex, np.random.default_rng(seed), cfg, edit_region_mask=1.0)
        shown = noisy.gen_codes[-1]
        masked = shown == cfg.image_mask_code
        assert masked.any() and not (masked & ~region).any()  # only the region is redrawn
        assert (labels != -100).tolist() == masked.tolist()  # the loss is on the redrawn cells
        assert (labels[masked] == tgt[masked]).all()
        assert (shown[~region] == src[~region]).all()  # the source's codes outside it
        unmasked = region & ~masked
        assert (shown[unmasked] == tgt[unmasked]).all()
    # off: the full-image noise, and no extra draw
    ra, rb = np.random.default_rng(0), np.random.default_rng(0)
    a, _ = add_noise(ex, ra, cfg)
    b, _ = add_noise(replace(ex, edit_region=None), rb, cfg, edit_region_mask=1.0)
    assert all((x == y).all() for x, y in zip(a.gen_codes, b.gen_codes)) and ra.random() == rb.random()


def test_edit_area_weight_puts_more_of_an_edit_rows_loss_on_its_change(tokenizer, tiny_config, tiny_vq):
    from lavida_agent.model.training import edit_area_weights, make_batch

    region = np.zeros((4, 4), dtype=bool)
    region[:2, :2] = True
    labels = np.where(np.arange(16).reshape(4, 4) % 3 == 0, 7, -100)  # 6 labelled codes, 2 in the region
    w = edit_area_weights(region, labels, 5.0)
    shown = labels != -100
    assert np.isclose(w[shown].mean(), 1.0)  # the row keeps its share of the loss
    assert np.isclose(w[region & shown][0] / w[~region & shown][0], 5.0)
    assert (edit_area_weights(None, labels, 5.0) == 1).all() and (edit_area_weights(region, labels, 1.0) == 1).all()
    # the batch carries the weights only when they are on, and the same draw either way
    on = TaskSampler(tokenizer, tiny_config, tiny_vq, edit_area_weight=5.0)
    off = TaskSampler(tokenizer, tiny_config, tiny_vq)
    (b_on, l_on), (b_off, l_off) = (make_batch(s, "edit", np.random.default_rng(2), 6, tiny_config) for s in (on, off))
    assert b_off.image_weights is None and torch.equal(l_on, l_off)
    assert b_on.image_weights.shape == l_on.shape and (b_on.image_weights > 1).any()


def test_image_weights_weigh_the_image_loss(tokenizer, tiny_config, tiny_vq):
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
    from lavida_agent.model.training import make_batch

    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(tiny_config).eval()
    batch, labels = make_batch(TaskSampler(tokenizer, tiny_config, tiny_vq), "edit", np.random.default_rng(4), 3,
                               tiny_config)  # fmt: skip
    loss = lambda w: float(model(**batch.model_inputs(), image_labels=labels, image_weights=w).image_loss)  # noqa: E731
    ones = torch.ones(labels.shape)
    assert loss(ones) == pytest.approx(loss(None), rel=1e-5)
    assert loss(2 * ones) == pytest.approx(2 * loss(None), rel=1e-5)
    first = torch.zeros(labels.shape)
    first[0] = 1.0  # the first row's codes alone, over every labelled code of the batch
    n0, n = int((labels[0] != -100).sum()), int((labels != -100).sum())
    alone = float(model(**batch.model_inputs(), image_labels=torch.where(first.bool(), labels, -100)).image_loss)
    assert loss(first) == pytest.approx(alone * n0 / n, rel=1e-5)


def test_box_cells_covers_every_cell_a_box_touches(tiny_config):
    from lavida_agent.model.tasks import box_cells

    cfg = tiny_config
    cell = cfg.image_size // cfg.image_grid
    cells = box_cells([(cell, 0, 2 * cell + 1, cell)], cfg)  # one cell row, columns 1..2
    assert np.argwhere(cells).tolist() == [[0, 1], [0, 2]]
    assert not box_cells([], cfg).any()
    assert box_cells([(0, 0, cfg.image_size, cfg.image_size)], cfg).all()


def test_inner_cells_are_the_cells_wholly_inside(tiny_config):
    from lavida_agent.model.tasks import box_cells, inner_cells

    cfg = tiny_config
    cell = cfg.image_size // cfg.image_grid
    box = (cell - 1, cell, 3 * cell + 2, 3 * cell)  # columns 1..3 touched, 1..2 wholly inside
    assert np.argwhere(inner_cells([box], cfg)).tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert not (inner_cells([box], cfg) & ~box_cells([box], cfg)).any()
    assert not inner_cells([(0, 0, cell - 1, cell - 1)], cfg).any()


def test_a_background_edit_row_redraws_all_but_its_objects_cores(tokenizer, tiny_config, tiny_vq, monkeypatch):
    from dataclasses import replace

    from lavida_agent.model.tasks import inner_cells
    from lavida_agent.tools.shapes_world.render import core_box
    from lavida_agent.tools.shapes_world.scene import Object, Scene

    cfg = tiny_config
    source = Scene("gray", (Object("circle", "red", "large", (4, 4, 28, 28)), Object("square", "blue", "small", (40, 40, 52, 52))))
    target = replace(source, background="white")
    monkeypatch.setattr(TaskSampler, "_edit_draft", staticmethod(lambda rng: (source, "change the background to white", target)))
    sampler = TaskSampler(tokenizer, cfg, tiny_vq, edit_region_background=True)
    (row,) = sampler.examples("edit", np.random.default_rng(0), 1)
    kept = inner_cells([core_box(o.shape, o.box) for o in source.objects], cfg)
    assert kept.sum() >= 2 and np.array_equal(row.edit_region, ~kept)  # the cores stay
    (off,) = TaskSampler(tokenizer, cfg, tiny_vq).examples("edit", np.random.default_rng(0), 1)
    assert off.edit_region is None  # the full-image state, as stage 16 trained


def test_look_alike_scenes_need_both_words_to_name_an_object():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(60):
        scene = look_alike_scene(rng)
        objs = scene.objects
        assert 2 <= len(objs) <= 4 and valid_scene(scene)
        pairs = [(a, b) for i, a in enumerate(objs) for b in objs[i + 1:]]
        same_shape = any(a.shape == b.shape and a.color != b.color for a, b in pairs)
        same_color = any(a.color == b.color and a.shape != b.shape for a, b in pairs)
        assert same_shape or same_color
        kinds |= {k for k, hit in (("shape", same_shape), ("color", same_color)) if hit}
    assert kinds == {"shape", "color"}


def test_hard_scenes_feed_grounding_and_question_rows_only(tokenizer, tiny_config, tiny_vq, monkeypatch):
    import lavida_agent.model.training as training

    drawn = []
    monkeypatch.setattr(training, "look_alike_scene", lambda rng: drawn.append(1) or look_alike_scene(rng))
    hard = TaskSampler(tokenizer, tiny_config, tiny_vq, hard_scenes=1.0)
    for task in ("ground", "understand"):
        drawn.clear()
        hard.examples(task, np.random.default_rng(1), 5)
        assert len(drawn) == 5, task
    drawn.clear()
    hard.examples("critique", np.random.default_rng(1), 3)
    TaskSampler(tokenizer, tiny_config, tiny_vq).examples("ground", np.random.default_rng(1), 5)
    assert drawn == []


def test_canonical_t2i_lays_out_unplanned_rows_only(tokenizer, tiny_config, tiny_vq, monkeypatch):
    import lavida_agent.model.training as training

    drawn = []
    canonical = training.lang.canonical_scene_for_prompt
    monkeypatch.setattr(training.lang, "canonical_scene_for_prompt",
                        lambda rng, spec: drawn.append(1) or canonical(rng, spec))  # fmt: skip
    sampler = TaskSampler(tokenizer, tiny_config, tiny_vq, canonical_t2i=1.0)
    sampler.examples("t2i", np.random.default_rng(1), 4)
    assert len(drawn) == 4
    drawn.clear()
    for task in ("t2i_plan", "plan"):  # a plan carries the layout: uniform layouts there
        sampler.examples(task, np.random.default_rng(1), 4)
    assert drawn == []
    # off: not even a draw, so earlier runs replay as before
    off = TaskSampler(tokenizer, tiny_config, tiny_vq).examples("t2i", np.random.default_rng(1), 3)
    on0 = TaskSampler(tokenizer, tiny_config, tiny_vq, canonical_t2i=0.0).examples("t2i", np.random.default_rng(1), 3)
    assert drawn == [] and [e.input_ids for e in off] == [e.input_ids for e in on0]


def test_ground_rows_redraw_a_scene_nothing_can_name(tokenizer, tiny_config, tiny_vq, monkeypatch):
    # Stage 17 died at step 2519 on such a scene (sample_refexp raised mid-run).
    from lavida_agent.tools.shapes_world import Object, Scene
    from lavida_agent.tools.shapes_world.sampler import sample_scene

    crowd = Scene("white", tuple(Object("circle", "red", "small", (x, y, x + 12, y + 12))
                                 for y in (8, 40) for x in (8, 40)))  # fmt: skip
    sampler = TaskSampler(tokenizer, tiny_config, tiny_vq)
    scenes = iter([crowd, crowd])
    draw = lambda rng, n_objects=None: next(scenes, None) or sample_scene(rng)  # noqa: E731
    monkeypatch.setattr(sampler, "_scene", draw)
    rows = sampler.examples("ground", np.random.default_rng(0), 2)
    assert len(rows) == 2 and next(scenes, None) is None  # both crowds drawn, and passed over


def test_edit_plan_loc_mask_hides_every_box_coordinate_and_only_them(tokenizer, tiny_config, tiny_vq):
    from lavida_agent.model.tasks import build_edit

    cfg = tiny_config
    image = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
    codes = np.zeros((cfg.image_grid,) * 2, np.int64)
    plan = [("small blue circle", (4, 4, 16, 16)), ("removed", (4, 4, 16, 16))]
    ex = build_edit(tokenizer, cfg, "make the red circle blue", image, codes, plan=plan,
                    plan_is_target=True, with_plan=True, with_image=False)  # fmt: skip
    begins = [p for p in ex.target_positions() if ex.input_ids[p] == cfg.loc_begin_token_id]
    coords = [b + k for b in begins for k in range(1, 5)]
    assert len(coords) == 8
    for seed in range(5):
        noisy, _ = add_noise(ex, np.random.default_rng(seed), cfg, edit_plan_loc_mask=1.0)
        assert [i for i, t in enumerate(noisy.input_ids) if t == cfg.mask_token_id] == coords
        assert [noisy.text_targets[p] for p in coords] == [ex.input_ids[p] for p in coords]
    # a t2i plan row ignores it and draws nothing more from the rng
    t2i = build_t2i(tokenizer, cfg, "a red circle", plan=plan[:1], plan_is_target=True, with_image=False)
    ra, rb = np.random.default_rng(0), np.random.default_rng(0)
    a, _ = add_noise(t2i, ra, cfg)
    b, _ = add_noise(t2i, rb, cfg, edit_plan_loc_mask=1.0)
    assert a.input_ids == b.input_ids and ra.random() == rb.random()


def test_edit_plan_given_removed_shows_the_removed_box_and_hides_the_others(tokenizer, tiny_config, tiny_vq):
    from lavida_agent.model.tasks import build_edit

    cfg = tiny_config
    image = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
    codes = np.zeros((cfg.image_grid,) * 2, np.int64)

    def row(plan):
        return build_edit(tokenizer, cfg, "make the red circle blue", image, codes, plan=plan,
                          plan_is_target=True, with_plan=True, with_image=False)  # fmt: skip

    rid = tokenizer.convert_tokens_to_ids("removed")
    ex = row([("small blue circle", (4, 4, 16, 16)), ("removed", (4, 4, 16, 16))])
    first, removed = [p for p in ex.target_positions() if ex.input_ids[p] == cfg.loc_begin_token_id]
    for seed in range(5):
        noisy, _ = add_noise(ex, np.random.default_rng(seed), cfg, edit_plan_given_removed=1.0, removed_id=rid)
        assert [i for i, t in enumerate(noisy.input_ids) if t == cfg.mask_token_id] == [first + k for k in range(1, 5)]
        assert noisy.input_ids[removed + 1 : removed + 5] == ex.input_ids[removed + 1 : removed + 5]
    # a plan that takes nothing away, or only takes one object away (nothing left to hide),
    # takes the random share as without it and draws nothing more from the rng
    for plan in ([("small blue circle", (4, 4, 16, 16))], [("removed", (4, 4, 16, 16))]):
        ra, rb = np.random.default_rng(0), np.random.default_rng(0)
        a, _ = add_noise(row(plan), ra, cfg)
        b, _ = add_noise(row(plan), rb, cfg, edit_plan_given_removed=1.0, removed_id=rid)
        assert a.input_ids == b.input_ids and ra.random() == rb.random()
    with pytest.raises(ValueError, match="removed_id"):
        add_noise(ex, np.random.default_rng(0), cfg, edit_plan_given_removed=1.0)


def test_data_workers_train_on_the_same_batches_as_the_training_process(tmp_path, vq_dir, monkeypatch):
    from lavida_agent.model import training

    served = []

    class Counting(training._Prefetcher):
        def get(self, step):
            served.append(step)
            return super().get(step)

    monkeypatch.setattr(training, "_Prefetcher", Counting)
    # vision aux, own-drawing critique rows and a resume in the middle: every input a step
    # draws comes from the workers, and the weights end bit-identical to an in-process run
    kw = dict(TINY, vision_aux=0.5, vision_aux_batch=2, vision_aux_warmup=1, own_critique=0.5, own_pool=2,
              save_every=2, task_weights={"t2i": 1.0, "edit": 1.0, "ground": 1.0, "critique": 1.0})  # fmt: skip
    inline = tmp_path / "inline"
    train(TrainConfig(out=str(inline), vq=vq_dir, steps=4, **kw), progress=False)
    workers = tmp_path / "workers"
    train(TrainConfig(out=str(workers), vq=vq_dir, steps=2, data_workers=2, **kw), progress=False)
    train(TrainConfig(out=str(workers), vq=vq_dir, steps=4, data_workers=2, **kw), progress=False)
    a = torch.load(inline / "state.pt", weights_only=False)
    b = torch.load(workers / "state.pt", weights_only=False)
    assert served == [0, 1, 2, 3]  # every step's data came from the workers
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["vision_aux_head"][k], b["vision_aux_head"][k]) for k in a["vision_aux_head"])
    tasks = lambda out: [sorted(k for k in r if k.startswith("loss/"))  # noqa: E731
                         for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert tasks(inline) == tasks(workers)


@pytest.mark.parametrize(("bad", "match"), [
    ({"precision": "fp8"}, "precision"), ({"data_workers": -1}, "data_workers"),
    ({"data_workers": 1, "data_device": "gpu0"}, "data_device"),
    ({"data_workers": 1, "data_device": "meta"}, "no meta device"),
    ({"steps": -3}, "steps must be >= 0"), ({"log_every": 0}, "log_every must be at least 1"),
    ({"save_every": 0}, "save_every"), ({"eval_every": 0}, "eval_every"), ({"tasks_per_step": 0}, "tasks_per_step"),
    ({"lr": 0.0}, "lr must be > 0"), ({"preset": "nope"}, "unknown preset 'nope'"),
    ({"model_overrides": {"hidden_sizee": 3}}, r"unknown model setting\(s\) \['hidden_sizee'\]"),
    ({"task_weights": {}}, "JSON object of task weights"), ({"task_weights": {"t2i": 0}}, "must not all be 0"),
    ({"task_weights": {"t2i": -1, "ground": 2}}, "numbers >= 0"), ({"task_weights": {"t2i": "x"}}, "numbers >= 0"),
    ({"task_weights": {"draw": 1}}, r"unknown task\(s\) \['draw'\]"),
    ({"init_from": "nowhere"}, "neither a training run folder"), ({"vq": "nowhere"}, "not a VQ tokenizer folder"),
])  # fmt: skip
def test_bad_run_knobs_are_refused_before_anything_is_written(tmp_path, vq_dir, bad, match):
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(**{"out": str(tmp_path / "x"), "vq": vq_dir, "steps": 1, **TINY, **bad}), progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--tasks", "5"], "expected a JSON object"), (["--tasks", "{bad json"], "--tasks: not JSON"),
    (["--tasks", "{}"], "JSON object of task weights"), (["--model", "[1, 2]"], "expected a JSON object"),
    (["--preset", "nope"], "unknown preset"),
])  # fmt: skip
def test_the_command_line_refuses_bad_json_knobs_before_writing(tmp_path, vq_dir, capsys, args, says):
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(out), "--vq", vq_dir, *args], prog="lavida-agent train model")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and err.startswith("usage: lavida-agent train model")
    assert not out.exists()


def test_help_describes_the_knobs_and_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out OUT the run folder" in text and "(default: 6000)" in text.split("--steps STEPS")[-1][:120]
    assert "The share of grounding rows whose noise masks every coordinate" in text  # from the field's comment


def test_a_resume_must_be_the_same_run(tmp_path, vq_dir):
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), vq=vq_dir, steps=2, save_every=2, **TINY), progress=False)
    state = (run / "state.pt").read_bytes()
    for change, named in (({"lr": 0.5}, "--lr 0.003 -> 0.5"), ({"seed": 9}, "--seed 0 -> 9"),
                          ({"init_from": str(run)}, "--init-from"), ({"preset": "shapes"}, "--preset")):  # fmt: skip
        with pytest.raises(ValueError, match="holds a run started with other arguments") as e:
            train(TrainConfig(out=str(run), vq=vq_dir, steps=4, save_every=2, **{**TINY, **change}), progress=False)
        assert named in str(e.value)
    other_vq = tmp_path / "other_vq"
    shutil.copytree(vq_dir, other_vq)
    (other_vq / "config.json").write_text((other_vq / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match="is not the VQ tokenizer"):
        train(TrainConfig(out=str(run), vq=str(other_vq), steps=4, **TINY), progress=False)
    with pytest.raises(ValueError, match="at step 2, past --steps 1"):
        train(TrainConfig(out=str(run), vq=vq_dir, steps=1, **TINY), progress=False)
    assert (run / "state.pt").read_bytes() == state
    assert json.loads((run / "train_config.json").read_text())["lr"] == TINY["lr"]  # the run's record kept


def test_a_run_folder_holds_its_tokenizer_and_a_damaged_checkpoint_is_named(tmp_path, vq_dir, monkeypatch):
    vq_copy = tmp_path / "vq_elsewhere"
    shutil.copytree(vq_dir, vq_copy)
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), vq=str(vq_copy), steps=2, **TINY), progress=False)
    shutil.rmtree(vq_copy)  # the run exports from its own copy, from any folder
    monkeypatch.chdir(tmp_path.parent)
    assert export_checkpoint(run, tmp_path / "exported")["step"] == 2
    with pytest.raises(ValueError, match="another folder than the run's own"):
        export_checkpoint(run, run)
    path = run / "state.pt"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"cannot read the checkpoint {path}"):
        train(TrainConfig(out=str(run), vq=vq_dir, steps=4, **TINY), progress=False)
    with pytest.raises(ValueError, match=f"cannot read the checkpoint {path}"):
        export_checkpoint(run, tmp_path / "again")


def test_the_log_holds_one_record_per_step_after_a_crash_and_restarts_with_a_fresh_run(tmp_path, vq_dir,
                                                                                      monkeypatch):  # fmt: skip
    import lavida_agent.model.training as training

    run = tmp_path / "run"
    real, calls = training.step_data, []

    def dies_at_step_3(*args, **kw):
        calls.append(args[-2])  # the step
        if args[-2] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(training, "step_data", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):  # logged steps 1-3, saved at step 2
        train(TrainConfig(out=str(run), vq=vq_dir, steps=4, save_every=2, **TINY), progress=False)
    monkeypatch.setattr(training, "step_data", real)
    train(TrainConfig(out=str(run), vq=vq_dir, steps=4, save_every=2, **TINY), progress=False)
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert steps == [1, 2, 3, 4]
    (run / "state.pt").unlink()  # a fresh run in the folder, on another tokenizer
    other_vq = tmp_path / "other_vq"
    shutil.copytree(vq_dir, other_vq)
    (other_vq / "config.json").write_text((other_vq / "config.json").read_text() + " ")
    train(TrainConfig(out=str(run), vq=str(other_vq), steps=1, **TINY), progress=False)
    assert (run / "vq" / "config.json").read_text() == (other_vq / "config.json").read_text()  # its own copy
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert steps == [1]


def test_the_command_line_refuses_a_bad_run_knob_with_a_message(tmp_path, vq_dir, capsys):
    from lavida_agent.model.training import main

    out = tmp_path / "x"
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(out), "--vq", vq_dir, "--steps", "1", "--data-workers", "1", "--data-device", "gpu0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "data_device must be a torch device" in err and "Traceback" not in err
    assert not out.exists()


def test_every_task_trains_under_bf16_autocast(tmp_path, vq_dir):
    # the CUDA path's precision, run on the CPU: mixed-dtype writes inside the model fail here as there
    kw = dict(TINY, precision="bf16", vision_aux=0.5, vision_aux_batch=2, vision_aux_warmup=0, tasks_per_step=8,
              task_weights={t: 1.0 for t in TASK_WEIGHTS if t != "critique"})  # fmt: skip
    train(TrainConfig(out=str(tmp_path / "bf16"), vq=vq_dir, steps=2, **kw), progress=False)
    records = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    losses = {k: v for r in records if "lr" in r for k, v in r.items() if k.startswith("loss/")}
    assert len(losses) >= 5 and all(np.isfinite(v) and v > 0 for v in losses.values())


def test_torchrun_data_parallel_takes_the_steps_of_one_process(tmp_path, vq_dir):
    # two Gloo ranks on the CPU, each training on every other batch of a step, end where
    # one process training on all of them ends (up to the order gradients are summed in)
    import subprocess
    import sys

    kw = dict(TINY, vision_aux=0.5, vision_aux_batch=2, vision_aux_warmup=1, save_every=2)
    single = tmp_path / "single"
    train(TrainConfig(out=str(single), vq=vq_dir, steps=3, **kw), progress=False)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lavida_agent.model.training", f"--out={ddp}", f"--vq={vq_dir}", "--steps=3", "--quiet", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(line) for line in done.stdout.splitlines()] == [{"step": 3, "export": str(ddp / "export")}]
    a, b = (torch.load(d / "state.pt", weights_only=False) for d in (single, ddp))
    assert a["step"] == b["step"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    logged = lambda d: [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "lr" in r]  # noqa: E731
    (one, two) = logged(single), logged(ddp)
    assert [sorted(r) for r in one] == [sorted(r) for r in two]  # rank 0 logs every rank's tasks
    for r, s in zip(one, two):
        for k in r:  # the losses, and the gradient's norm: the ranks' sum is the whole step's
            if k.startswith("loss/") or k == "grad_norm":
                assert abs(r[k] - s[k]) < 1e-3 * max(1.0, abs(r[k])), k
    assert (ddp / "export" / "pipeline_index.json").exists()


def test_text_only_parameters_move_no_image_logit(tokenizer, tiny_config):
    """The architectural claim `trainable="understanding"` rests on: perturbing every
    text-only parameter changes the text logits and leaves every image logit of a t2i row
    with a plan and of an edit row (whose source enters both branches) bit-identical."""
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
    from lavida_agent.model.tasks import build_edit, pack

    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(tiny_config).eval()
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 32, (16, 16))
    image = rng.integers(0, 256, (tiny_config.image_size, tiny_config.image_size, 3), dtype=np.uint8)
    rows = [build_t2i(tokenizer, tiny_config, "a red circle", plan=[("small red circle", (4, 4, 16, 16))]),
            build_edit(tokenizer, tiny_config, "make the red circle blue", image, codes)]  # fmt: skip
    batch = pack(rows, tiny_config)
    with torch.no_grad():
        before = model(**batch.model_inputs())
        names = set(model.text_only_parameter_names())
        assert names and not any(n.startswith(("vision.", "image_", "embed_tokens")) or "_gen" in n for n in names)
        for name, p in model.named_parameters():
            if name in names:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        after = model(**batch.model_inputs())
    assert before.image_logits is not None and torch.equal(before.image_logits, after.image_logits)
    assert not torch.equal(before.text_logits, after.text_logits)


def test_image_only_parameters_move_no_text_logit_without_a_source(tokenizer, tiny_config):
    """The claim `trainable="generation"` rests on: perturbing every image-only parameter
    changes the image logits and leaves the text logits of rows with no image position
    before their answer (a t2i plan, grounding, a question, a critique) bit-identical."""
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
    from lavida_agent.model.tasks import build_critique, build_ground, build_understand, pack

    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(tiny_config).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (tiny_config.image_size, tiny_config.image_size, 3), dtype=np.uint8)
    text_rows = [build_t2i(tokenizer, tiny_config, "a red circle", with_plan=True, with_image=False),
                 build_ground(tokenizer, tiny_config, image, ["the red circle"]),
                 build_understand(tokenizer, tiny_config, image, "what color is the background?"),
                 build_critique(tokenizer, tiny_config, image, "a red circle")]  # fmt: skip
    text, drawn = pack(text_rows, tiny_config), pack([build_t2i(tokenizer, tiny_config, "a red circle")], tiny_config)
    names = set(model.image_only_parameter_names())
    assert names and not names & set(model.text_only_parameter_names())
    assert not any(n.startswith(("vision.", "embed_tokens", "lm_head")) for n in names)
    with torch.no_grad():
        before, image_before = model(**text.model_inputs()), model(**drawn.model_inputs())
        for name, p in model.named_parameters():
            if name in names:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        after, image_after = model(**text.model_inputs()), model(**drawn.model_inputs())
    assert torch.equal(before.text_logits, after.text_logits)
    assert not torch.equal(image_before.image_logits, image_after.image_logits)


@pytest.mark.parametrize(("trainable", "tasks", "names", "train_only"), [
    ("understanding", ("ground", "understand", "critique", "plan", "edit_plan"), "text_only_parameter_names", ""),
    ("generation", ("t2i", "t2i_plan", "edit", "edit_plan"), "image_only_parameter_names", ""),
    ("understanding", ("edit_plan",), "text_only_parameter_names", "lm_head, layers.1.q_proj"),
])  # fmt: skip
def test_trainable_moves_only_its_parameters(tmp_path, vq_dir, trainable, tasks, names, train_only):
    first = tmp_path / "stage1"
    train(TrainConfig(out=str(first), vq=vq_dir, steps=1, **TINY), progress=False)
    second = tmp_path / "stage2"
    tc = TrainConfig(out=str(second), vq=vq_dir, steps=3, init_from=str(first), trainable=trainable,
                     train_only=train_only, **TINY)  # fmt: skip
    tc.task_weights = dict.fromkeys(tasks, 1.0)
    train(tc, progress=False)
    a, _ = _weights(first)
    b, step = _weights(second)
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion

    model = LavidaForMaskedDiffusion(LavidaConfig(**json.loads((second / "export" / "transformer" /
                                                                "config.json").read_text())))  # fmt: skip
    assert step == 3
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and moved <= set(getattr(model, names)())
    if train_only:  # only the named ones of that side, both of them
        assert {k.split(".weight")[0] for k in moved} == {"lm_head", "layers.1.q_proj"}


@pytest.mark.parametrize(("change", "message"), [
    ({"trainable": "gen"}, "trainable must be one of"),
    ({"trainable": "understanding"}, "t2i, edit rows would carry no gradient"),
    ({"trainable": "understanding", "task_weights": {"ground": 1.0}, "vision_aux": 0.5}, "vision_aux must be 0"),
    ({"trainable": "generation", "task_weights": {"t2i": 1.0, "critique": 0.1}}, "critique rows would carry no gradient"),
    ({"trainable": "generation", "task_weights": {"t2i": 1.0}, "vision_aux": 0.5}, "vision_aux must be 0"),
    ({"edit_area_weight": 0.0}, "edit_area_weight must be > 0"),
    ({"edit_with_plan": 1.5}, "edit_with_plan is a share"),
    ({"train_only": " , "}, "train_only names parameter-name prefixes"),
    ({"train_only": "no_such.,neither"}, "matches none of the 'all' parameters"),
    ({"trainable": "understanding", "task_weights": {"ground": 1.0}, "train_only": "image_head"},
     "matches none of the 'understanding' parameters"),
])  # fmt: skip
def test_trainable_refuses_what_cannot_train(tmp_path, vq_dir, change, message):
    from lavida_agent.model.training import check_run_knobs

    with pytest.raises(ValueError, match=message):
        check_run_knobs(TrainConfig(out=str(tmp_path), **change))
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message):  # and `train` refuses before writing anything
        train(TrainConfig(**{**TINY, "out": str(run), "vq": vq_dir, "steps": 1, **change}), progress=False)
    assert not run.exists()


@pytest.mark.parametrize("part", ["understanding", "generation"])
def test_blend_part_moves_only_that_sides_parameters_and_refuses_others(tmp_path, tiny_config, tiny_vq, tokenizer,
                                                                        part):  # fmt: skip
    import copy

    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
    from lavida_agent.model.pipeline_lavida import LavidaPipeline
    from lavida_agent.model.training import blend_part

    torch.manual_seed(0)
    base = LavidaPipeline(LavidaForMaskedDiffusion(tiny_config).eval(), tiny_vq, tokenizer)
    base.save_pretrained(tmp_path / "base")
    tuned = copy.deepcopy(base)
    model = tuned.model
    names = set(model.text_only_parameter_names() if part == "understanding" else model.image_only_parameter_names())
    with torch.no_grad():
        for name, p in tuned.model.named_parameters():
            if name in names:
                p.add_(1.0)
    tuned.save_pretrained(tmp_path / "tuned")
    a = LavidaPipeline.from_pretrained(tmp_path / "base").model.state_dict()
    b = LavidaPipeline.from_pretrained(tmp_path / "tuned").model.state_dict()
    for weight in (0.0, 0.5):
        mid = LavidaPipeline.from_pretrained(blend_part(tmp_path / "base", tmp_path / "tuned", weight,
                                                        tmp_path / f"blend{weight}", part=part)).model.state_dict()  # fmt: skip
        for k in a:
            want = (a[k] + weight * (b[k] - a[k])).half().float() if k in names else a[k]
            assert torch.allclose(mid[k], want, atol=1e-3), k
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        blend_part(tmp_path / "base", tmp_path / "tuned", 1.5, tmp_path / "x", part=part)
    with pytest.raises(ValueError, match="part must be one of"):
        blend_part(tmp_path / "base", tmp_path / "tuned", 0.5, tmp_path / "x", part="vision")
    other_side = "lm_head" if part == "generation" else "image_head"
    with torch.no_grad():
        next(p for n, p in tuned.model.named_parameters() if n.startswith(other_side) and n not in names).add_(1.0)
    tuned.save_pretrained(tmp_path / "redrawn")
    kept = "images" if part == "understanding" else "answers"
    with pytest.raises(ValueError, match=f"outside the {part} parameters.*change its {kept}"):
        blend_part(tmp_path / "base", tmp_path / "redrawn", 0.5, tmp_path / "y", part=part)
    assert not (tmp_path / "y").exists()


def test_attach_weights_adds_a_drawer_or_planner_and_refuses_other_changes(tmp_path, tiny_config, tiny_vq,
                                                                          tokenizer):  # fmt: skip
    import copy

    from safetensors.torch import load_file

    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
    from lavida_agent.model.pipeline_lavida import LavidaPipeline
    from lavida_agent.model.training import attach_weights

    torch.manual_seed(0)
    base = LavidaPipeline(LavidaForMaskedDiffusion(tiny_config).eval(), tiny_vq, tokenizer)
    base.save_pretrained(tmp_path / "base")
    tuned = copy.deepcopy(base)
    names = set(tuned.model.image_only_parameter_names())
    with torch.no_grad():
        for name, p in tuned.model.named_parameters():
            if name in names:
                p.add_(1.0)
    tuned.save_pretrained(tmp_path / "tuned")
    both = LavidaPipeline.from_pretrained(attach_weights(tmp_path / "base", tmp_path / "tuned", tmp_path / "both"))
    a = LavidaPipeline.from_pretrained(tmp_path / "base").model.state_dict()
    b = LavidaPipeline.from_pretrained(tmp_path / "tuned").model.state_dict()
    assert all(torch.equal(v, a[k]) for k, v in both.model.state_dict().items())  # the base, unchanged
    assert all(torch.equal(v, b[k]) for k, v in both.unplanned_model.state_dict().items())  # the tuned drawer
    # a drawer of the other kind joins it; the first stays
    three = LavidaPipeline.from_pretrained(attach_weights(tmp_path / "both", tmp_path / "tuned", tmp_path / "three",
                                                         kind="edit"))  # fmt: skip
    assert three.unplanned_model is not None
    assert all(torch.equal(v, b[k]) for k, v in three.edit_model.state_dict().items())
    # and a region drawer beside both, loaded back as `edit_region_model`
    five = LavidaPipeline.from_pretrained(attach_weights(tmp_path / "three", tmp_path / "tuned", tmp_path / "five",
                                                        kind="edit_regions"))  # fmt: skip
    assert five.unplanned_model is not None and five.edit_model is not None
    assert all(torch.equal(v, b[k]) for k, v in five.edit_region_model.state_dict().items())
    assert json.loads((tmp_path / "five" / "pipeline_index.json").read_text())["edit_regions_drawer"] == "drawer_edit_regions"
    with pytest.raises(ValueError, match="kind must be one of unplanned, edit, edit_regions, edit_plan"):
        attach_weights(tmp_path / "base", tmp_path / "tuned", tmp_path / "z", kind="ground")
    with torch.no_grad():
        tuned.model.lm_head.weight.add_(1.0)
    tuned.save_pretrained(tmp_path / "answers")
    with pytest.raises(ValueError, match="outside the generation parameters"):
        attach_weights(tmp_path / "base", tmp_path / "answers", tmp_path / "y", kind="edit")
    assert not (tmp_path / "y").exists()
    # a planner: answer-side weights alone (here one tensor moved), refused with drawing changes
    planned = copy.deepcopy(base)
    with torch.no_grad():
        planned.model.lm_head.weight.add_(1.0)
    planned.save_pretrained(tmp_path / "planned")
    four = LavidaPipeline.from_pretrained(attach_weights(tmp_path / "base", tmp_path / "planned", tmp_path / "four",
                                                         kind="edit_plan"))  # fmt: skip
    p = LavidaPipeline.from_pretrained(tmp_path / "planned").model.state_dict()
    assert all(torch.equal(v, p[k]) for k, v in four.edit_planner.state_dict().items())
    assert all(torch.equal(v, a[k]) for k, v in four.model.state_dict().items())
    assert four.edit_model is None and four.unplanned_model is None
    with pytest.raises(ValueError, match="outside the understanding parameters"):
        attach_weights(tmp_path / "base", tmp_path / "tuned", tmp_path / "x", kind="edit_plan")
    # a planner for whole edit plans says so in the folder's defaults; others keep theirs
    first = LavidaPipeline.from_pretrained(attach_weights(tmp_path / "base", tmp_path / "planned", tmp_path / "six",
                                                          kind="edit_plan",
                                                          defaults={"edit_planner_first_step": True}))  # fmt: skip
    assert first.defaults["edit_planner_first_step"] and not four.defaults["edit_planner_first_step"]
    with pytest.raises(ValueError, match="unknown pipeline default"):
        attach_weights(tmp_path / "base", tmp_path / "planned", tmp_path / "w", kind="edit_plan",
                       defaults={"planner_first": True})  # fmt: skip
    assert not (tmp_path / "w").exists()
    # a reader, its matrices kept as rank-2 changes: the written pipeline is that approximation
    read = copy.deepcopy(base)
    side = set(read.model.text_only_parameter_names())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in read.model.named_parameters():
            if name in side:
                p.add_(torch.randn(p.shape, generator=g))
    read.save_pretrained(tmp_path / "read")
    seven = LavidaPipeline.from_pretrained(attach_weights(tmp_path / "base", tmp_path / "read", tmp_path / "seven",
                                                          kind="reader", rank=2))  # fmt: skip
    r = LavidaPipeline.from_pretrained(tmp_path / "read").model.state_dict()
    mine, theirs = seven.reader.state_dict(), seven.model.state_dict()
    factored = set(seven.low_rank["reader"])
    assert factored and all(mine[k].ndim == 2 and 2 * sum(mine[k].shape) < mine[k].numel() for k in factored)
    for k in side:
        if k in factored:  # a rank-2 change to the base, not the tuned weight
            assert int(torch.linalg.matrix_rank((mine[k] - a[k]).double(), rtol=1e-3)) == 2
            assert (mine[k] - r[k]).norm() < (a[k] - r[k]).norm()
        else:  # small or thin tensors stay whole
            assert torch.equal(mine[k], r[k])
    assert all(torch.equal(v, a[k]) for k, v in theirs.items())  # the base, unchanged
    stored = load_file(tmp_path / "seven" / "reader" / "model.safetensors")
    assert {k for k in stored if k.endswith(".delta_up")} == {k + ".delta_up" for k in factored}
    assert sum(v.numel() for v in stored.values()) < sum(r[k].numel() for k in side)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        attach_weights(tmp_path / "base", tmp_path / "read", tmp_path / "v", kind="reader", rank=0)


def test_attach_weights_grows_the_base_for_a_drawer_with_the_image_copy_path(tmp_path, tiny_config, tiny_vq,
                                                                             tokenizer):  # fmt: skip
    """A single-shot drawer trained with `image_copy` attaches to a base without it: the base
    grows the path closed (its outputs unchanged) and keeps the drawers it had."""
    from lavida_agent.model.configuration_lavida import LavidaConfig
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
    from lavida_agent.model.pipeline_lavida import LavidaPipeline, with_own_weights
    from lavida_agent.model.training import attach_weights

    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(tiny_config).eval()
    drawer = with_own_weights(model, {"image_head.proj.weight": model.image_head.proj.weight.detach() + 1})
    LavidaPipeline(model, tiny_vq, tokenizer, unplanned_model=drawer).save_pretrained(tmp_path / "base")
    grown = LavidaForMaskedDiffusion(LavidaConfig(**{**tiny_config.to_dict(), "image_copy": True})).eval()
    grown.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        grown.image_head.copy_gate.bias.fill_(2.0)
        grown.image_head.classifier.weight.add_(1.0)
    LavidaPipeline(grown, tiny_vq, tokenizer).save_pretrained(tmp_path / "tuned")
    both = LavidaPipeline.from_pretrained(attach_weights(tmp_path / "base", tmp_path / "tuned", tmp_path / "both",
                                                         kind="edit"))  # fmt: skip
    assert both.model.config.image_copy and torch.all(both.model.image_head.copy_gate.bias == 0)
    before = LavidaPipeline.from_pretrained(tmp_path / "base")
    for k, v in before.model.state_dict().items():
        assert torch.equal(both.model.state_dict()[k], v), k
        assert torch.equal(both.unplanned_model.state_dict()[k], before.unplanned_model.state_dict()[k]), k
    tuned = LavidaPipeline.from_pretrained(tmp_path / "tuned").model.state_dict()
    assert all(torch.equal(v, tuned[k]) for k, v in both.edit_model.state_dict().items())


def test_export_checkpoint_writes_the_runs_weights_or_names_what_is_missing(tmp_path, vq_dir):
    from lavida_agent.model.pipeline_lavida import LavidaPipeline
    from lavida_agent.model.training import export_checkpoint

    run = tmp_path / "run"
    out = train(TrainConfig(out=str(run), vq=vq_dir, steps=2, **TINY), progress=False)
    got = export_checkpoint(run, tmp_path / "exported")
    assert got == {"step": 2, "export": str(tmp_path / "exported")}
    a = LavidaPipeline.from_pretrained(out["export"]).model.state_dict()
    b = LavidaPipeline.from_pretrained(got["export"]).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (run / "state.pt").unlink()
    with pytest.raises(ValueError, match="no state.pt"):
        export_checkpoint(run, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_edit_local_targets_keep_the_sources_codes_outside_the_touched_cells(tokenizer, tiny_config, tiny_vq):
    def rows(categories, **kw):
        sampler = TaskSampler(tokenizer, tiny_config, tiny_vq, edit_categories=categories, edit_with_plan=0.0, **kw)
        return sampler.examples("edit", np.random.default_rng(5), 4)

    def split(ex):
        source = next(c for c, t in zip(ex.gen_codes, ex.gen_is_target) if not t)
        return source, next(c for c, t in zip(ex.gen_codes, ex.gen_is_target) if t)

    moves = {"move": 1, "recolor": 1, "add": 1}
    changed_outside = 0
    for whole, local in zip(rows(moves), rows(moves, edit_local_targets=True), strict=True):
        (src, goal), (src2, mixed) = split(whole), split(local)
        region = local.edit_region
        assert region is not None and region.any() and not region.all()
        assert (src == src2).all() and whole.input_ids == local.input_ids  # the same draw
        assert (mixed[region] == goal[region]).all()  # the change, as the target encodes it
        assert (mixed[~region] == src[~region]).all()  # the rest, as the source encodes it
        changed_outside += int((goal[~region] != src[~region]).sum())
    assert changed_outside  # (the whole target differs there: the encoder sees the whole image)
    # a background edit touches no box: its target stays whole
    for whole, local in zip(rows({"background": 1}), rows({"background": 1}, edit_local_targets=True), strict=True):
        assert (split(whole)[1] == split(local)[1]).all()
