"""LavidaPipeline with dummy components: every task, seeds, callbacks, interrupt, save/load."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lavida_agent.model.pipeline_lavida import (
    LavidaPipeline,
    PipelineInterrupted,
    apply_low_rank,
    expand_own_weights,
    low_rank_delta,
    with_own_weights,
)
from lavida_agent.model.tasks import box_cells, parse_boxes, parse_plan, plan_text, snap_plan


def test_generate_shapes_and_seed_replay(pipe):
    a = pipe.generate(["a red circle", "two blue squares"], seed=[1, 2], num_steps=4)
    b = pipe.generate(["a red circle", "two blue squares"], seed=[1, 2], num_steps=4)
    c = pipe.generate(["a red circle"], seed=1, num_steps=4)
    assert [im.shape for im in a.images] == [(64, 64, 3)] * 2
    assert a.images[0].dtype == np.uint8
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.codes[0], c.codes[0])  # a request's result does not depend on its batch
    assert a.seeds == [1, 2]


def test_rows_without_a_plan_draw_on_the_unplanned_shift(pipe):
    plan = [("small red circle", (8, 8, 20, 20))]
    mixed = pipe.generate(["a red circle"] * 2, plans=[plan, None], seed=[1, 2], num_steps=4)
    planned = pipe.generate(["a red circle"], plans=[plan], seed=[1], num_steps=4, shift=pipe.defaults["shift"])
    unplanned = pipe.generate(["a red circle"], seed=[2], num_steps=4, shift=pipe.defaults["unplanned_shift"])
    assert torch.equal(mixed.codes[0], planned.codes[0]) and torch.equal(mixed.codes[1], unplanned.codes[0])
    other = pipe.generate(["a red circle"], seed=[2], num_steps=4, shift=pipe.defaults["shift"])
    assert not torch.equal(other.codes[0], unplanned.codes[0])  # the setting reaches the sampler


def test_callback_fires_once_per_step_with_previews(pipe):
    events = []
    pipe.generate(["a red circle"], seed=0, num_steps=6, preview_every=3, callback=events.append)
    assert [e.step for e in events] == list(range(1, 7))
    assert all(e.total == 6 for e in events)
    with_preview = [e.step for e in events if e.previews is not None]
    assert with_preview == [3, 6]
    assert events[2].previews[0].shape == (64, 64, 3)


def test_interrupt_stops_the_loop(pipe):
    calls = []

    def stop_after_two():
        calls.append(1)
        return len(calls) > 2

    before = pipe.forward_count
    with pytest.raises(PipelineInterrupted, match="after 2 of 8 steps"):
        pipe.generate(["a red circle"], seed=0, num_steps=8, interrupt=stop_after_two)
    assert pipe.forward_count - before == 1 + 2  # condition pass + two steps


def test_grounding_forwards_do_not_grow_with_the_number_of_expressions(pipe, scene_image):
    for steps in (1, 2, 4):
        for exprs in (["the red circle"], ["the circle", "the blue square", "the large triangle"]):
            before = pipe.forward_count
            out = pipe.ground([scene_image, scene_image], [exprs, exprs[:1]], num_steps=steps, candidates=1)
            assert pipe.forward_count - before == steps
            assert len(out.boxes[0]) == len(exprs) and len(out.boxes[1]) == 1
    with pytest.raises(ValueError, match="num_steps"):
        pipe.ground([scene_image], [["the circle"]], num_steps=5)


def test_stepwise_grounding_keeps_each_box_uncrossed(pipe, scene_image):
    """A kept coordinate bounds its partner, so a box is only lost when its first kept
    coordinate sits on the canvas edge that leaves its partner no room."""
    exprs = [f"the {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")]
    for box in pipe.ground([scene_image], [exprs], num_steps=4).boxes[0]:
        assert box is not None
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_edit_plan_understand_critique_run(pipe, scene_image):
    e = pipe.edit([scene_image], ["remove the red circle"], seed=0, num_steps=3, image_guidance_scale=1.0)
    assert e.images[0].shape == (64, 64, 3)
    p = pipe.plan(["a red circle"], seed=0, num_steps=4)
    assert isinstance(p.plans[0], list) and isinstance(p.texts[0], str)
    u = pipe.understand([scene_image], ["how many circles are there?"], num_steps=4)
    assert isinstance(u.texts[0], str) and "[MASK]" not in u.texts[0]
    # answers are words: never a box marker or coordinate (an untrained model draws any token)
    texts = pipe.understand([scene_image] * 8, ["locate the circle"] * 8, seed=list(range(8)), temperature=1.0).texts
    assert not any(tok in t for t in texts for tok in ("<LOC_", "<box_p>", "</box_p>", "<LOC_BEGIN>", "<LOC_END>"))
    c = pipe.critique([scene_image], ["a red circle"], num_steps=4)
    assert isinstance(c.ok[0], bool)


@pytest.mark.parametrize("planner,first_step", [(False, False), (True, False), (True, True)])
def test_plan_edit_grounds_the_object_it_takes_away(pipe, scene_image, tokenizer, tiny_config, monkeypatch, planner,
                                                    first_step):  # fmt: skip
    from lavida_agent.model.pipeline_lavida import GroundingOutput
    from lavida_agent.model.tasks import build_edit

    base = pipe
    if planner:  # an edit planner writes the second step's boxes, and the first plan if asked
        side = set(pipe.model.text_only_parameter_names())
        moved = {k: v.detach() + 0.5 for k, v in pipe.model.named_parameters() if k in side}
        pipe = LavidaPipeline(pipe.model, pipe.vq, pipe.tokenizer, defaults={"edit_planner_first_step": first_step},
                              edit_planner=with_own_weights(pipe.model, moved, part="understanding"))
    codes = pipe._encode_images([scene_image])[0]

    def answer(plan):  # the answer ids of a training row holding `plan`
        row = build_edit(tokenizer, tiny_config, "x", scene_image, codes, plan=plan, plan_is_target=True,
                         with_image=False)  # fmt: skip
        return [t for t in row.text_targets if t != -100]

    first = [[("large blue circle", (4, 4, 20, 20)), ("removed", (30, 30, 50, 50))],
             [("small red square", (8, 8, 18, 18)), ("removed", (40, 40, 52, 52))]]  # fmt: skip
    real = pipe._decode_text_ids
    starts, models = [], []

    def decode(exs, n, **kw):  # the model's first plans are scripted; the second step is real
        models.append(kw.get("model"))
        if kw.get("start") is None:
            return torch.tensor([answer(p) for p in first])
        starts.append(kw["start"].clone())
        return real(exs, n, **kw)

    asked = []

    def ground(images, expressions, **kw):
        asked.extend(expressions)
        assert kw.get("sizes") is True  # the object is read in its sized forms too
        return GroundingOutput(boxes=[[(10, 12, 30, 34)]])

    monkeypatch.setattr(pipe, "_decode_text_ids", decode)
    monkeypatch.setattr(pipe, "ground", ground)
    ins = ["make the red circle blue", "add a red square at the top left"]
    out = pipe.plan_edit([scene_image] * 2, ins, seed=[1, 2])
    assert asked == [["the red circle"]]  # only the row that takes an object away, its object
    assert ("removed", (10, 12, 30, 34)) in out.plans[0]  # the grounded box
    # an add takes nothing away: the first plan (a valid "small" square) without its `removed` item
    assert out.plans[1] == first[1][:1] and "removed" in out.texts[1]
    # the second step starts from the first plan with every box masked but the grounded one
    (start,) = starts
    mask = tiny_config.mask_token_id
    assert int((start == mask).sum()) == 4 and start[0, :4].tolist() == answer(first[0])[:4]
    assert "large blue circle" in out.texts[0] and mask not in tokenizer(out.texts[0])["input_ids"]
    assert models == [pipe.edit_planner if first_step else None, pipe.edit_planner]
    assert (pipe.edit_planner is not None) == planner
    assert pipe.plan_edit([scene_image] * 2, ins, seed=[1, 2], ground=False, snap=False).plans == [
        first[0], first[1][:1]]
    # snapped (the default): the produced object's 16 px "large" box becomes an 18 px square
    assert pipe.plan_edit([scene_image] * 2, ins, seed=[1, 2], ground=False).plans == [
        [("large blue circle", (3, 3, 21, 21)), ("removed", (30, 30, 50, 50))], first[1][:1]]
    if planner:  # the planner's own weights wrote the second step, not the model's
        monkeypatch.setattr(base, "_decode_text_ids", decode)
        monkeypatch.setattr(base, "ground", ground)
        assert base.plan_edit([scene_image] * 2, ins, seed=[1, 2]).texts[0] != out.texts[0]
    # an object grounding does not find keeps the model's first plan: no second step
    monkeypatch.setattr(pipe, "ground", lambda images, expressions, **kw: GroundingOutput(boxes=[[None]]))
    models.clear()
    assert pipe.plan_edit([scene_image] * 2, ins, seed=[1, 2], snap=False).plans == [first[0], first[1][:1]]
    assert models == [pipe.edit_planner if first_step else None]


def test_plan_edit_decodes_the_slot_that_edit_plan_rows_train(pipe, scene_image, tokenizer, tiny_config):
    from lavida_agent.model.tasks import build_edit, snap_edit_plan

    out = pipe.plan_edit([scene_image] * 2, ["remove the red circle", "move the red circle to the top left"],
                         seed=[1, 2], num_steps=4)  # fmt: skip
    assert len(out.plans) == len(out.texts) == 2
    assert out.plans == [snap_edit_plan(parse_plan(t)) for t in out.texts]  # both take an object away
    assert pipe.plan_edit([scene_image], ["remove the red circle"], seed=1, num_steps=4).texts == out.texts[:1]
    # inference fills exactly the slot a training row holds the edit plan in
    codes = pipe._encode_images([scene_image])[0]
    train_row = build_edit(tokenizer, tiny_config, "remove the red circle", scene_image, codes,
                           plan=[("removed", (4, 4, 20, 20))], plan_is_target=True, with_image=False)  # fmt: skip
    infer_row = build_edit(tokenizer, tiny_config, "remove the red circle", scene_image, codes,
                           with_plan=True, with_image=False)  # fmt: skip
    assert train_row.segment_ids == infer_row.segment_ids
    slot = [i for i, t in enumerate(train_row.text_targets) if t != -100]
    assert slot and all(infer_row.input_ids[i] == tiny_config.mask_token_id for i in slot)
    assert [t for i, t in enumerate(train_row.input_ids) if i not in slot] == [
        t for i, t in enumerate(infer_row.input_ids) if i not in slot]  # fmt: skip


def test_critique_decides_the_verdict_first(pipe, scene_image):
    """Even an untrained model's critique starts with `yes` or `no`: the verdict is chosen
    before the reasons, among those two words only."""
    c = pipe.critique([scene_image] * 3, ["a red circle", "two blue squares", "a green triangle"], num_steps=4)
    # the first word is the verdict; what an untrained model writes after it may be glued
    # punctuation (`no,,,`)
    assert all(re.match(r"(yes|no)\b", t) for t in c.texts), c.texts
    assert [t.startswith("yes") for t in c.texts] == c.ok


def test_critique_keeps_the_reasons_that_parse_from_a_garbled_verdict(pipe, scene_image, monkeypatch):
    texts = ["no: missing red circle; extra blue square missing", "no: it looks off", "yes"]
    monkeypatch.setattr(pipe, "_decode_text", lambda *a, **k: list(texts))
    c = pipe.critique([scene_image] * 3, ["a red circle"] * 3, num_steps=2)
    assert c.ok == [False, False, True] and c.texts == texts
    assert c.reasons[0] == ["missing red circle"]  # the tail fragment is dropped
    assert c.reasons[1] == ["unparsable critique: 'no: it looks off'"] and c.reasons[2] == []


def test_regenerate_regions_keeps_codes_outside_the_boxes(pipe, scene_image):
    original = torch.from_numpy(pipe._encode_images([scene_image])[0])
    out = pipe.regenerate_regions([scene_image], ["a red circle"], [[(0, 0, 16, 16)]], seed=3, num_steps=4)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[:4, :4] = True
    assert torch.equal(out.codes[0][~inside], original[~inside])


def test_bad_image_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match="letterbox"):
        pipe.ground([np.zeros((32, 32, 3), np.uint8)], [["the circle"]])


def test_save_and_load_roundtrip_is_bit_identical(pipe, tmp_path, scene_image):
    pipe.save_pretrained(tmp_path, dtype=torch.float32)
    loaded = LavidaPipeline.from_pretrained(tmp_path)
    a = pipe.generate(["a red circle"], seed=4, num_steps=3)
    b = loaded.generate(["a red circle"], seed=4, num_steps=3)
    assert torch.equal(a.codes, b.codes)
    assert pipe.ground([scene_image], [["the circle"]]).boxes == loaded.ground([scene_image], [["the circle"]]).boxes


def _redrawn(model, delta: float = 0.5) -> dict[str, torch.Tensor]:
    """`model`'s drawing weights, each moved by `delta` (a stand-in for a drawing fine-tune)."""
    names = set(model.image_only_parameter_names())
    return {k: v.detach() + delta for k, v in model.named_parameters() if k in names}


def test_an_unplanned_drawer_draws_the_rows_without_a_plan_and_nothing_else(tiny_model, tiny_vq, tokenizer,
                                                                            scene_image):  # fmt: skip
    base = LavidaPipeline(tiny_model, tiny_vq, tokenizer)
    drawer = with_own_weights(tiny_model, _redrawn(tiny_model))
    alone = LavidaPipeline(drawer, tiny_vq, tokenizer)  # the drawer as a whole model
    both = LavidaPipeline(tiny_model, tiny_vq, tokenizer, unplanned_model=drawer)
    plan = [("small red circle", (8, 8, 20, 20))]
    kw = dict(seed=[1, 2], num_steps=4)
    mixed = both.generate(["a red circle"] * 2, plans=[plan, None], **kw)
    assert torch.equal(mixed.codes[0], base.generate(["a red circle"], plans=[plan], seed=1, num_steps=4).codes[0])
    assert torch.equal(mixed.codes[1], alone.generate(["a red circle"], seed=2, num_steps=4).codes[0])
    assert not torch.equal(mixed.codes[1], base.generate(["a red circle"], seed=2, num_steps=4).codes[0])
    # answers, boxes and region redraws stay the base model's
    assert both.ground([scene_image], [["the circle"]]).boxes == base.ground([scene_image], [["the circle"]]).boxes
    box = [[(0, 0, 32, 32)]]
    assert torch.equal(both.regenerate_regions([scene_image], ["a red circle"], box, seed=3, num_steps=2).codes,
                       base.regenerate_regions([scene_image], ["a red circle"], box, seed=3, num_steps=2).codes)


def test_a_drawer_shares_every_other_parameter_with_its_model(tiny_model):
    drawer = with_own_weights(tiny_model, _redrawn(tiny_model))
    names = set(tiny_model.image_only_parameter_names())
    mine, its = dict(tiny_model.named_parameters()), dict(drawer.named_parameters())
    assert all((its[k] is mine[k]) == (k not in names) for k in mine)
    assert all(torch.equal(its[k], mine[k] + 0.5) for k in names)
    # some of the drawing weights: only those are the drawer's own
    part = with_own_weights(tiny_model, {min(names): _redrawn(tiny_model)[min(names)]})
    its = dict(part.named_parameters())
    assert all((its[k] is mine[k]) == (k != min(names)) for k in mine)
    with pytest.raises(ValueError, match="got none"):
        with_own_weights(tiny_model, {})
    with pytest.raises(ValueError, match="not generation weights: lm_head"):
        with_own_weights(tiny_model, {**_redrawn(tiny_model), "lm_head.weight": mine["lm_head.weight"]})
    with pytest.raises(ValueError, match="another architecture"):
        with_own_weights(tiny_model, {**_redrawn(tiny_model), min(names): torch.zeros(3)})


def test_save_and_load_keep_the_unplanned_drawer(tiny_model, tiny_vq, tokenizer, tmp_path):
    both = LavidaPipeline(tiny_model, tiny_vq, tokenizer, unplanned_model=with_own_weights(tiny_model,
                                                                                               _redrawn(tiny_model)))  # fmt: skip
    both.save_pretrained(tmp_path, dtype=torch.float32)
    saved = set(load_file(tmp_path / "drawer_unplanned" / "model.safetensors"))
    assert saved == set(tiny_model.image_only_parameter_names())  # the drawing weights alone
    loaded = LavidaPipeline.from_pretrained(tmp_path)
    assert loaded.unplanned_model is not None
    a = both.generate(["a red circle"], seed=4, num_steps=3)
    assert torch.equal(a.codes, loaded.generate(["a red circle"], seed=4, num_steps=3).codes)
    LavidaPipeline(tiny_model, tiny_vq, tokenizer).save_pretrained(tmp_path / "plain")
    plain = LavidaPipeline.from_pretrained(tmp_path / "plain")
    assert plain.unplanned_model is None and plain.edit_model is None
    assert not (tmp_path / "plain" / "drawer_unplanned").exists()


def test_save_keeps_a_drawers_own_weights_alone(tiny_model, tiny_vq, tokenizer, tmp_path, scene_image):
    names = sorted(tiny_model.image_only_parameter_names())
    moved = {k: v for k, v in _redrawn(tiny_model).items() if k in names[:2]}
    # a whole-drawing copy in which only two tensors moved: those two are saved
    whole = {k: v.detach().clone() for k, v in tiny_model.named_parameters() if k in names} | moved
    pipe = LavidaPipeline(tiny_model, tiny_vq, tokenizer, edit_model=with_own_weights(tiny_model, whole))
    pipe.save_pretrained(tmp_path, dtype=torch.float32)
    assert set(load_file(tmp_path / "drawer_edit" / "model.safetensors")) == set(names[:2])
    loaded = LavidaPipeline.from_pretrained(tmp_path)
    assert loaded.unplanned_model is None
    kw = dict(seed=5, num_steps=3)
    assert torch.equal(loaded.edit([scene_image], ["remove the red circle"], **kw).codes,
                       pipe.edit([scene_image], ["remove the red circle"], **kw).codes)
    # a drawer with nothing of its own is not written
    LavidaPipeline(tiny_model, tiny_vq, tokenizer, edit_model=with_own_weights(
        tiny_model, {k: v.detach().clone() for k, v in tiny_model.named_parameters() if k in names})
    ).save_pretrained(tmp_path / "same")  # fmt: skip
    assert not (tmp_path / "same" / "drawer_edit").exists()


def _reread(model) -> dict[str, torch.Tensor]:
    """Answer-side weights moved far enough that answers change."""
    side = set(model.text_only_parameter_names())
    return {k: v.detach() + 0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
            for i, (k, v) in enumerate(sorted(model.named_parameters())) if k in side}  # fmt: skip


def test_a_reader_writes_understands_answers_and_nothing_else(tiny_model, tiny_vq, tokenizer, scene_image,
                                                              monkeypatch):  # fmt: skip
    plain = LavidaPipeline(tiny_model, tiny_vq, tokenizer)
    pipe = LavidaPipeline(tiny_model, tiny_vq, tokenizer,
                          reader=with_own_weights(tiny_model, _reread(tiny_model), part="understanding"))
    used = []
    real = pipe._forward
    monkeypatch.setattr(pipe, "_forward", lambda model=None, **kw: used.append(model) or real(model, **kw))
    questions = ["describe the image.", "what color is the circle?"]
    out = pipe.understand([scene_image] * 2, questions, seed=1)
    assert used and all(m is pipe.reader for m in used)  # every forward of `understand`
    assert out.texts != plain.understand([scene_image] * 2, questions, seed=1).texts
    used.clear()
    kw = dict(seed=2, num_steps=3)
    # plans, boxes and verdicts are the base model's
    assert pipe.plan(["a red circle"], **kw).plans == plain.plan(["a red circle"], **kw).plans
    assert pipe.ground([scene_image], [["the red circle"]]).boxes == plain.ground(
        [scene_image], [["the red circle"]]).boxes
    assert pipe.critique([scene_image], ["a red circle"], **kw).texts == plain.critique(
        [scene_image], ["a red circle"], **kw).texts
    assert used and all(m is None for m in used)


def test_low_rank_delta_is_the_best_change_of_its_rank():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 8, generator=g)
    two = torch.randn(12, 2, generator=g) @ torch.randn(2, 8, generator=g)
    up, down = low_rank_delta(base, base + two, 2, dtype=torch.float32)
    assert up.shape == (12, 2) and down.shape == (2, 8)
    assert torch.allclose(apply_low_rank(base, up, down), base + two, atol=1e-5)  # a rank-2 change, exactly
    change = torch.randn(12, 8, generator=g)
    up, down = low_rank_delta(base, base + change, 3, dtype=torch.float32)
    left = torch.linalg.svdvals(change)[3:]  # Eckart-Young: the error is what the rank leaves out
    assert math.isclose(float((base + change - apply_low_rank(base, up, down)).norm()),
                        float(left.norm()), rel_tol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="rank must be at least 1"):
        low_rank_delta(base, base, 0)
    with pytest.raises(ValueError, match="two matrices of one shape"):
        low_rank_delta(base[0], base[0], 1)


def test_low_rank_weights_save_and_load_as_their_factors(tiny_model, tiny_vq, tokenizer, tmp_path, scene_image):
    moved = _reread(tiny_model)
    own = dict(tiny_model.named_parameters())
    name = next(k for k, v in sorted(moved.items()) if v.ndim == 2 and min(v.shape) > 2)
    up, down = low_rank_delta(own[name], moved[name], 2)
    weights = dict(moved, **{name: apply_low_rank(own[name], up, down)})
    pipe = LavidaPipeline(tiny_model, tiny_vq, tokenizer,
                          reader=with_own_weights(tiny_model, weights, part="understanding"))
    pipe.low_rank = {"reader": {name: (up, down)}}
    pipe.save_pretrained(tmp_path, dtype=torch.float32)
    stored = load_file(tmp_path / "reader" / "model.safetensors")
    assert name not in stored and torch.equal(stored[name + ".delta_up"], up.float())
    assert set(stored) == (set(moved) - {name}) | {name + ".delta_up", name + ".delta_down"}
    loaded = LavidaPipeline.from_pretrained(tmp_path)
    assert set(loaded.low_rank["reader"]) == {name}
    assert all(torch.equal(v, pipe.reader.state_dict()[k]) for k, v in loaded.reader.state_dict().items())
    assert loaded.understand([scene_image], ["describe the image."], seed=3).texts == pipe.understand(
        [scene_image], ["describe the image."], seed=3).texts
    loaded.save_pretrained(tmp_path / "again", dtype=torch.float32)  # written back the same way
    assert set(load_file(tmp_path / "again" / "reader" / "model.safetensors")) == set(stored)
    # a weight changed since it was loaded is written whole
    with torch.no_grad():
        dict(loaded.reader.named_parameters())[name].add_(1.0)
    loaded.save_pretrained(tmp_path / "changed", dtype=torch.float32)
    assert name in load_file(tmp_path / "changed" / "reader" / "model.safetensors")
    with pytest.raises(ValueError, match="has no .delta_down beside it"):
        expand_own_weights(tiny_model, {name + ".delta_up": up})
    with pytest.raises(ValueError, match="which the model does not have"):
        expand_own_weights(tiny_model, {"nope.delta_up": up, "nope.delta_down": down})


def test_edit_drawers_draw_their_own_rows_and_nothing_else(tiny_model, tiny_vq, tokenizer, scene_image):
    base = LavidaPipeline(tiny_model, tiny_vq, tokenizer)
    single = with_own_weights(tiny_model, _redrawn(tiny_model))
    local = with_own_weights(tiny_model, _redrawn(tiny_model, delta=1.0))
    alone = {id(m): LavidaPipeline(m, tiny_vq, tokenizer) for m in (single, local)}
    both = LavidaPipeline(tiny_model, tiny_vq, tokenizer, edit_model=single, edit_region_model=local)
    ins = "make the red circle blue"
    region = [(0, 0, 32, 32)]
    plan = [("small blue circle", (8, 8, 20, 20))]
    events = []
    mixed = both.edit([scene_image] * 4, [ins] * 4, plans=[None, plan, None, plan],
                      regions=[None, None, region, region], seed=[1, 2, 3, 4], num_steps=3,
                      callback=events.append)  # fmt: skip
    # the single shot: the single-shot drawer's, not the base's
    assert torch.equal(mixed.codes[0], alone[id(single)].edit([scene_image], [ins], seed=1, num_steps=3).codes[0])
    assert not torch.equal(mixed.codes[0], base.edit([scene_image], [ins], seed=1, num_steps=3).codes[0])
    # a plan without regions: the base's
    assert torch.equal(mixed.codes[1], base.edit([scene_image], [ins], plans=[plan], seed=2, num_steps=3).codes[0])
    # rows with regions (with or without a plan): the region drawer's
    by_region = alone[id(local)].edit([scene_image] * 2, [ins] * 2, plans=[None, plan], regions=[region] * 2,
                                      seed=[3, 4], num_steps=3)  # fmt: skip
    assert torch.equal(mixed.codes[2:], by_region.codes)
    assert not torch.equal(mixed.codes[2:], base.edit([scene_image] * 2, [ins] * 2, plans=[None, plan],
                                                      regions=[region] * 2, seed=[3, 4], num_steps=3).codes)  # fmt: skip
    # one pass per drawer, the base's rows first, each step tagged with its rows
    steps = len(events) // 3
    assert [e.rows for e in events] == [[1]] * steps + [[0]] * steps + [[2, 3]] * steps


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline_index.json"):
        LavidaPipeline.from_pretrained(tmp_path)


def test_plan_text_roundtrip():
    items = [("small red circle", (4, 8, 16, 20)), ("large blue square", (30, 30, 52, 52))]
    assert parse_plan(plan_text(items)) == items
    assert parse_boxes(plan_text(items)) == [b for _, b in items]
    assert parse_plan("<box_p> red circle </box_p> <LOC_BEGIN> <LOC_3> <LOC_END> garbage") == []
    inverted = "<box_p> red circle </box_p> <LOC_BEGIN> <LOC_40> <LOC_2> <LOC_38> <LOC_9> <LOC_END>"
    assert parse_plan(inverted) == [] and parse_boxes(inverted) == [None]


def test_snap_plan_gives_square_boxes_of_the_labels_size_at_the_same_centre():
    items = [("large blue circle", (27, 17, 29, 37)), ("small red square", (0, 0, 40, 8)),
             ("large green triangle", (50, 50, 64, 70)), ("circle", (30, 50, 37, 55))]  # fmt: skip
    snapped = snap_plan(items)
    assert [label for label, _ in snapped] == [label for label, _ in items]
    for (label, (x0, y0, x1, y1)), (_, old) in zip(snapped, items):
        side = x1 - x0
        assert y1 - y0 == side and 2 <= x0 and 2 <= y0 and x1 <= 62 and y1 <= 62
        lo, hi = {"large": (18, 24), "small": (10, 14)}.get(label.split()[0], (1, 60))
        assert lo <= side <= hi
    assert snapped[0][1] == (19, 18, 37, 36)  # 2 x 20 "large": side 18 around centre (28, 27)
    assert snapped[1][1] == (13, 2, 27, 16)  # clamped into the canvas, 2 px margin
    assert snapped[2][1] == (44, 44, 62, 62)
    assert snapped[3][1] == (30, 50, 36, 56)  # no size word: the mean side (6)
    assert snap_plan(snapped) == snapped  # a valid layout stays as it is


def test_snap_edit_plan_squares_what_an_edit_produces_and_keeps_removed_boxes():
    from lavida_agent.model.tasks import snap_edit_plan

    recolour = [("large red triangle", (28, 2, 48, 24)), ("removed", (28, 5, 48, 25))]
    snapped = snap_edit_plan(recolour)
    assert snapped[1] == recolour[1]  # the removed box as written (no size word), not parted
    assert snapped[0] == snap_plan(recolour[:1])[0] == ("large red triangle", (28, 2, 49, 23))
    assert snap_edit_plan([]) == [] and snap_edit_plan(snapped) == snapped


def test_snap_plan_parts_overlapping_boxes_and_keeps_their_order():
    from lavida_agent.tools.shapes_world.scene import RELATIONS, Object, holds, valid_box

    items = [("large red square", (29, 29, 51, 51)), ("large red triangle", (10, 10, 34, 34)),
             ("small blue circle", (30, 12, 42, 24)), ("large green diamond", (8, 40, 29, 61))]  # fmt: skip
    snapped = snap_plan(items)
    boxes = [box for _, box in snapped]
    assert all(valid_box(b, boxes[:i] + boxes[i + 1 :]) for i, b in enumerate(boxes))
    as_object = lambda label, box: Object("circle", "red", "large", box)  # noqa: E731
    for i, j in itertools.permutations(range(len(items)), 2):
        for relation in RELATIONS:  # every relation the plan's centres held still holds
            if holds(relation, as_object(*items[i]), as_object(*items[j])):
                assert holds(relation, as_object(*snapped[i]), as_object(*snapped[j])), (i, j, relation)
    assert snap_plan(snapped) == snapped
    # a layout that cannot be separated still comes back whole and in the canvas
    crowded = snap_plan([(f"large {c} circle", (30, 30, 50, 50)) for c in ("red", "blue", "green", "orange")])
    assert len(crowded) == 4 and all(2 <= v <= 62 for _, box in crowded for v in box)


def test_local_edit_redraws_only_its_regions(pipe, scene_image):
    other = np.ascontiguousarray(scene_image[::-1])
    local = pipe.edit([scene_image, other], ["remove the red circle"] * 2, regions=[[(8, 8, 20, 20)], None],
                      seed=[3, 4], num_steps=4)  # fmt: skip
    outside = np.ones((64, 64), dtype=bool)
    outside[8:20, 8:20] = False
    assert np.array_equal(local.images[0][outside], scene_image[outside])
    src = pipe._encode_images([scene_image])[0]
    cells = np.ones((16, 16), dtype=bool)
    cells[2:5, 2:5] = False
    assert np.array_equal(local.codes[0].numpy()[cells], src[cells])  # the source's own codes
    # a row without regions is redrawn whole, exactly as without the option
    whole = pipe.edit([other], ["remove the red circle"], seed=[4], num_steps=4)
    assert np.array_equal(local.codes[1].numpy(), whole.codes[0].numpy())
    assert np.array_equal(local.images[1], whole.images[0])
    # and the region row is what it would be alone: its own schedule, not its batch's
    alone = pipe.edit([scene_image], ["remove the red circle"], regions=[[(8, 8, 20, 20)]], seed=[3], num_steps=4)
    assert np.array_equal(local.codes[0].numpy(), alone.codes[0].numpy())


def test_edit_keep_spares_the_cells_wholly_inside_its_boxes(pipe, scene_image):
    out = pipe.edit([scene_image], ["change the background to white"], regions=[[(0, 0, 64, 64)]],
                    keep=[[(7.5, 8, 24, 20)]], seed=[1], num_steps=4)  # fmt: skip
    src = pipe._encode_images([scene_image])[0]
    kept = np.zeros((16, 16), dtype=bool)
    kept[2:5, 2:6] = True  # cells wholly inside x 7.5..24, y 8..20 (4-px cells)
    codes = out.codes[0].numpy()
    assert np.array_equal(codes[kept], src[kept])
    assert np.array_equal(out.images[0][8:20, 8:24], scene_image[8:20, 8:24])  # the caller's pixels
    with pytest.raises(ValueError, match="keep"):
        pipe.edit([scene_image] * 2, ["x"] * 2, regions=[None, None], keep=[[]], num_steps=2)


def test_a_background_edit_draws_at_its_own_temperature_in_any_batch(pipe, scene_image):
    bg, other = "change the background to gray", "make the red circle blue"
    assert pipe._edit_temperatures([bg, other, "paint it all"]) == [
        pipe.defaults["background_edit_temperature"], pipe.defaults["temperature"], pipe.defaults["temperature"]]
    mixed = pipe.edit([scene_image] * 2, [bg, other], seed=[3, 4], num_steps=4)
    low = pipe.edit([scene_image], [bg], seed=[3], num_steps=4,
                    temperature=pipe.defaults["background_edit_temperature"])  # fmt: skip
    plain = pipe.edit([scene_image], [other], seed=[4], num_steps=4, temperature=pipe.defaults["temperature"])
    assert np.array_equal(mixed.codes[0].numpy(), low.codes[0].numpy())
    assert np.array_equal(mixed.codes[1].numpy(), plain.codes[0].numpy())
    # an explicit temperature overrides the default of every row
    hot = pipe.edit([scene_image], [bg], seed=[3], num_steps=4, temperature=1.0)
    assert not np.array_equal(hot.codes[0].numpy(), low.codes[0].numpy())


def test_regenerate_regions_returns_the_callers_pixels_outside_the_boxes(pipe, scene_image):
    out = pipe.regenerate_regions([scene_image], ["a red circle"], [[(8, 8, 20, 20)]], seed=3, num_steps=4)
    outside = np.ones((64, 64), dtype=bool)
    outside[8:20, 8:20] = False
    assert np.array_equal(out.images[0][outside], scene_image[outside])


def test_region_fit_scores_each_box_independently_of_its_batch(pipe, scene_image):
    plan = [("small red circle", (4, 4, 16, 16)), ("large blue square", (30, 30, 52, 52))]
    boxes = [box for _, box in plan]
    other = np.ascontiguousarray(scene_image[::-1])
    both = pipe.region_fit([scene_image, other], ["a red circle and a blue square", "a green circle"],
                           [boxes, boxes[:1]], plans=[plan, None])  # fmt: skip
    assert [len(s) for s in both] == [2, 1] and all(np.isfinite(v) for s in both for v in s)
    # a box's score does not depend on the other boxes, rows or the chunking of the batch
    alone = pipe.region_fit([scene_image], ["a red circle and a blue square"], [boxes[1:]], plans=[plan])
    chunked = pipe.region_fit([scene_image, other], ["a red circle and a blue square", "a green circle"],
                              [boxes, boxes[:1]], plans=[plan, None], batch_size=1)  # fmt: skip
    np.testing.assert_allclose(alone[0], both[0][1:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(chunked), np.concatenate(both), rtol=1e-4, atol=1e-4)
    assert pipe.region_fit([scene_image], ["x"], [[]]) == [[]]



def test_grounding_candidates_start_with_the_greedy_box(pipe, scene_image):
    exprs = [["the red circle", "the blue square"], ["the triangle"]]
    greedy = pipe.ground([scene_image, scene_image], exprs, num_steps=4, candidates=1)
    out = pipe.ground([scene_image, scene_image], exprs, num_steps=4, candidates=3)
    assert [[len(c) for c in row] for row in out.candidates] == [[3, 3], [3]]
    # branch 0 is the greedy decode, whatever else is in the batch
    assert [[c[0] for c in row] for row in out.candidates] == greedy.boxes
    assert all(b in c for row, brow in zip(out.candidates, out.boxes) for c, b in zip(row, brow))
    with pytest.raises(ValueError, match="num_steps must be 2 to 4"):
        pipe.ground([scene_image], [["the red circle"]], num_steps=1, candidates=2)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        pipe.ground([scene_image], [["the red circle"]], candidates=0)


def test_grounding_keeps_a_candidate_only_when_its_noun_fits_clearly_better(pipe, scene_image, monkeypatch):
    from lavida_agent.model import pipeline_lavida as pl

    greedy = pipe.ground([scene_image], [["the red circle", "the circle on the left", "a red thing"]],
                         num_steps=4, candidates=1).boxes[0]  # fmt: skip
    seen = []

    def fake_fit(images, nouns, boxes):  # the last distinct candidate fits best, by 25 or 10
        seen.extend(nouns)
        return [[0.0] * (len(b) - 1) + [25.0 if n[0] == "circle" and n[1] == "red" else 10.0]
                for n, b in zip(nouns, boxes)]  # fmt: skip

    monkeypatch.setattr(pipe, "noun_fit", fake_fit)
    out = pipe.ground([scene_image], [["the red circle", "the circle on the left", "a red thing"]],
                      num_steps=4, candidates=4)  # fmt: skip
    (red, left, thing), (c_red, _c_left, _) = out.boxes[0], out.candidates[0]
    distinct = list(dict.fromkeys(b for b in c_red if b is not None))
    assert red == (distinct[-1] if len(distinct) > 1 else greedy[0])  # 25 > 0 + margin
    assert left == greedy[1]  # 10 is within the margin: the greedy box stays
    assert thing == greedy[2]  # outside the grammar: never reranked
    assert ("circle", "red", None) in seen and all(n[0] != "thing" for n in seen)
    assert pl.RERANK_MARGIN == 20.0


def test_kth_peak_skips_the_neighbours_of_higher_peaks():
    from lavida_agent.model.pipeline_lavida import _kth_peak

    logp = torch.tensor([0.0, 5.0, 4.9, 1.0, 0.0, 0.0, 3.0, 0.0, 2.0, -math.inf])
    assert [_kth_peak(logp, k, spread=1) for k in range(3)] == [1, 6, 8]  # 2 is 1's neighbour
    assert _kth_peak(logp, 2, spread=2) == 1  # 8 is 6's neighbour: no third peak, the highest


def test_every_view_maps_an_objects_box_back_to_itself():
    from lavida_agent.model.pipeline_lavida import GROUND_VIEWS, _unview_box, _view_image, _view_text
    from lavida_agent.tools.shapes_world.render import render
    from lavida_agent.tools.shapes_world.scene import Object, Scene

    box = (10, 20, 22, 32)  # away from the edges, so no view moves it off the canvas
    image = render(Scene("white", (Object("triangle", "red", "small", box),)))
    for view in GROUND_VIEWS:
        shown = _view_image(image, view)
        ys, xs = np.nonzero((shown != shown[0, 0]).any(-1))
        found = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        assert _unview_box(found, view, 64) == box, view
        said = _view_text("the circle on the left, left of the right square", view)
        assert said == ("the circle on the right, right of the left square" if view[0] else
                        "the circle on the left, left of the right square")  # fmt: skip
    assert GROUND_VIEWS[0] == (False, 0, 0)  # the identity first: it wins ties
    assert _unview_box((60, 0, 64, 8), (False, -2, 0), 64) == (62, 0, 64, 8)  # clipped to the canvas
    assert _unview_box((0, 0, 2, 8), (False, 3, 0), 64) is None  # nothing left of it


def test_agreed_boxes_are_ordered_by_votes():
    from lavida_agent.model.pipeline_lavida import _agreed

    a, a2, b, c = (10, 10, 20, 20), (11, 10, 21, 20), (40, 40, 50, 50), (0, 30, 8, 38)
    assert _agreed([c, a, None, a2, b, b, b]) == ([b, a, c], [3, 2, 1])  # a2 counts for a
    assert _agreed([a2, a]) == ([a2], [2])  # a tie: the earliest view's box
    assert _agreed([None, None]) == ([], [])


def test_grounding_in_views_keeps_an_agreed_box(pipe, scene_image):
    exprs = [["the red circle", "the triangle on the left"], ["the blue square"]]
    out = pipe.ground([scene_image, scene_image], exprs, num_steps=4, views=5)
    assert any(b is not None for row in out.boxes for b in row)
    for row, crow, vrow in zip(out.boxes, out.candidates, out.votes):
        for box, cands, votes in zip(row, crow, vrow):
            assert (box in cands) if cands else box is None  # no view found it: no box
            assert len(cands) == len(votes) and sum(votes) <= 5
            assert votes == sorted(votes, reverse=True) and all(v >= 1 for v in votes)
    # a request's boxes do not depend on its batch
    alone = pipe.ground([scene_image], exprs[1:], num_steps=4, views=5)
    assert alone.boxes == out.boxes[1:] and alone.candidates == out.candidates[1:]
    # views=1 is the image as given, read greedily; no votes
    greedy = pipe.ground([scene_image], exprs[1:], num_steps=2, views=1)
    assert greedy.boxes == pipe.ground([scene_image], exprs[1:], num_steps=2, candidates=1).boxes
    assert greedy.votes == []
    with pytest.raises(ValueError, match="not both"):
        pipe.ground([scene_image], exprs[1:], candidates=2, views=3)
    with pytest.raises(ValueError, match="views must be 1 to"):
        pipe.ground([scene_image], exprs[1:], views=0)


def test_sized_forms_are_read_only_for_a_plain_unsized_noun():
    from lavida_agent.model.pipeline_lavida import _sized_forms

    assert _sized_forms("the red square") == ["the red square", "the small red square", "the large red square"]
    assert _sized_forms("the circle") == ["the circle", "the small circle", "the large circle"]
    for alone in ("the small red square", "the square on the left", "the red circle left of the blue square",
                  "a red thing"):  # fmt: skip
        assert _sized_forms(alone) == [alone]


def test_grounding_with_sizes_pools_the_sized_forms_candidates(pipe, scene_image, monkeypatch):
    exprs = [["the red circle", "the triangle on the left"]]
    forms = [["the red circle", "the small red circle", "the large red circle", "the triangle on the left"]]
    # with branches: each expression's candidates are its forms' candidates, in order
    pooled = pipe.ground([scene_image], exprs, num_steps=4, candidates=2, sizes=True)
    apart = pipe.ground([scene_image], forms, num_steps=4, candidates=2)
    assert pooled.candidates == [[sum(apart.candidates[0][:3], []), apart.candidates[0][3]]]
    assert pooled.boxes[0][1] == apart.boxes[0][3]  # a side is read as it is
    assert pooled.boxes[0][0] in pooled.candidates[0][0]
    # with views: every form is read in every view; its candidates follow the expression's own
    reads = []
    real = pipe._read_boxes
    monkeypatch.setattr(pipe, "_read_boxes",
                        lambda ims, ex, K, steps: reads.append(ex) or real(ims, ex, K, steps))  # fmt: skip
    out = pipe.ground([scene_image, scene_image], [exprs[0], ["the blue square"]], num_steps=4, views=3, sizes=True)
    assert [len(ex) for ex in reads[0]] == [4] * 3 + [3] * 3  # per image and view, every form
    assert out.boxes[1] == pipe.ground([scene_image], [["the blue square"]], num_steps=4, views=3, sizes=True).boxes[0]
    for box, cands, votes in zip(out.boxes[0], out.candidates[0], out.votes[0]):
        assert (box in cands) if cands else box is None
        assert len(cands) == len(votes)
    assert sum(out.votes[0][0]) <= 9 and sum(out.votes[0][1]) <= 3


def test_default_grounding_read_follows_the_pipeline_defaults(pipe, scene_image, monkeypatch):
    reads = []
    real = pipe._read_boxes
    monkeypatch.setattr(pipe, "_read_boxes",
                        lambda ims, ex, K, steps: reads.append((len(ims), K)) or real(ims, ex, K, steps))
    pipe.defaults = {**pipe.defaults, "ground_views": 3, "ground_candidates": 2}
    pipe.ground([scene_image], [["the red circle"]])  # the views read: 3 greedy rows
    pipe.ground([scene_image], [["the red circle"]], candidates=2)  # candidates alone: the image as given
    pipe.ground([scene_image], [["the red circle"]], num_steps=1)  # one forward: greedy, the image alone
    pipe.defaults = {**pipe.defaults, "ground_views": 1}
    pipe.ground([scene_image], [["the red circle"]])  # views off: the branches
    assert reads == [(3, 1), (1, 2), (1, 1), (1, 2)]
    # `ground_sizes`: an unsized noun is read in its sized forms too, unless told otherwise
    monkeypatch.setattr(pipe, "_read_boxes", lambda ims, ex, K, steps: reads.append(ex) or real(ims, ex, K, steps))
    pipe.defaults = {**pipe.defaults, "ground_sizes": True}
    pipe.ground([scene_image], [["the red circle"]])
    pipe.ground([scene_image], [["the red circle"]], sizes=False)
    assert reads[-2:] == [[["the red circle", "the small red circle", "the large red circle"]], [["the red circle"]]]


def test_stray_marks_look_only_away_from_the_plan(pipe, scene_image):
    """Marks are cell-aligned boxes at least one cell from every planned box, each scored by
    its lowest cell; the threshold picks them, a row without a plan has none, and a row's
    marks do not depend on its batch."""
    from lavida_agent.model.pipeline_lavida import _components, _dilate

    plan = [("small red circle", (4, 4, 16, 16)), ("large blue square", (30, 30, 52, 52))]
    prompt = "a red circle and a blue square"
    every = pipe.stray_marks([scene_image], [prompt], [plan], threshold=math.inf)[0]
    near = _dilate(box_cells([box for _, box in plan], pipe.config))
    cell = pipe.config.image_size // pipe.config.image_grid
    covered = np.zeros_like(near)
    for (x0, y0, x1, y1), score in every:
        assert all(v % cell == 0 for v in (x0, y0, x1, y1)) and math.isfinite(score)
        covered[y0 // cell : y1 // cell, x0 // cell : x1 // cell] = True
    assert covered[~near].all()  # with no threshold every cell away from the plan is a mark
    assert [len(m) for m in pipe.stray_marks([scene_image] * 2, [prompt] * 2, [plan, None])] == [
        len(pipe.stray_marks([scene_image], [prompt], [plan])[0]), 0]  # fmt: skip
    assert pipe.stray_marks([scene_image], [prompt], [plan], threshold=-math.inf) == [[]]
    (one,) = pipe.stray_marks([scene_image], [prompt], [plan], threshold=0.0)
    for marks in pipe.stray_marks([scene_image] * 2, [prompt] * 2, [plan, plan], threshold=0.0, batch_size=3):
        assert [box for box, _ in marks] == [box for box, _ in one]
        np.testing.assert_allclose([v for _, v in marks], [v for _, v in one], rtol=1e-4, atol=1e-4)
    # marks read off given scores need no model call
    calls = pipe.forward_count
    scores = np.zeros((1, pipe.config.image_grid, pipe.config.image_grid))
    scores[0, 0, 15] = -9.0
    assert pipe.stray_marks([scene_image], [prompt], [plan], scores=scores) == [[((60, 0, 64, 4), -9.0)]]
    assert pipe.forward_count == calls
    # the helpers: a 3 x 3 grow, and 8-connected parts in reading order
    dot = np.zeros((5, 5), dtype=bool)
    dot[2, 2] = True
    assert _dilate(dot).sum() == 9 and _dilate(dot)[1:4, 1:4].all()
    parts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=bool)
    assert [c.sum() for c in _components(parts)] == [2, 2]


def test_surprise_scores_every_token_the_same_in_any_batch(pipe, scene_image):
    plan = [("small red circle", (4, 4, 16, 16))]
    G = pipe.config.image_grid
    calls = pipe.forward_count
    one = pipe.surprise([scene_image], ["a red circle"], [plan])
    assert one.shape == (1, G, G) and np.isfinite(one).all()
    assert pipe.forward_count - calls == 2  # a condition pass and one image pass for both halves
    other = np.ascontiguousarray(scene_image[::-1])
    both = pipe.surprise([other, scene_image], ["a green square", "a red circle"], [None, plan], batch_size=3)
    np.testing.assert_allclose(both[1], one[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(both[0], one[0])
    assert pipe.surprise([], [], []).shape == (0, G, G)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_pipeline_in_half_precision_reads_images_too(tiny_model, tiny_vq, tokenizer, scene_image, dtype):
    # `Settings.dtype`: the image inputs (pixels, fp32) meet weights of the pipeline's dtype
    import copy

    half = LavidaPipeline(copy.deepcopy(tiny_model).to(dtype), copy.deepcopy(tiny_vq).to(dtype), tokenizer)
    assert isinstance(half.understand([scene_image], ["describe the image."], num_steps=2).texts[0], str)
    assert half.ground([scene_image], ["the red circle"], num_steps=1).boxes is not None
    assert half.edit([scene_image], ["make the red circle blue"], num_steps=2).images[0].shape == scene_image.shape


# -- the API's edges: seeds, list lengths, empty batches, bad values ---------------------------


def test_seed_none_draws_from_torchs_global_generator_without_reseeding_it(pipe):
    torch.manual_seed(0)
    a = pipe.generate(["a red circle"], seed=None, num_steps=2)
    after = torch.rand(1)
    torch.manual_seed(0)
    b = pipe.generate(["a red circle"], seed=None, num_steps=2)
    assert torch.initial_seed() == 0 and torch.equal(torch.rand(1), after)  # the stream went on, not re-seeded
    assert a.seeds == b.seeds and isinstance(a.seeds[0], int)  # the seed drawn is reported
    assert np.array_equal(a.images[0], b.images[0])
    again = pipe.generate(["a red circle"], seed=a.seeds[0], num_steps=2)
    assert np.array_equal(again.images[0], a.images[0])


@pytest.mark.parametrize("seed", [1.7, "1", -1, 2**64, True])
def test_a_seed_is_a_non_negative_integer(pipe, seed):
    with pytest.raises(ValueError, match="a seed is an integer"):
        pipe.generate(["a red circle"], seed=seed, num_steps=1)


def test_seeds_of_numpy_integers_and_generators_are_checked(pipe):
    assert pipe.generate(["a red circle"], seed=np.int64(3), num_steps=1).seeds == [3]
    assert pipe.generate(["a red circle"], seed=2**64 - 1, num_steps=1).seeds == [2**64 - 1]  # torch's own limit
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        pipe.generate(["a red circle"], generator=5, num_steps=1)
    two = (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    assert len(pipe.generate(["a", "b"], generator=two, num_steps=1).images) == 2  # a tuple is a list


def test_every_request_list_must_match_the_images(pipe, scene_image):
    img = scene_image
    calls = {  # a second text for one image was dropped, a missing one crashed inside
        "edit": lambda ims, texts: pipe.edit(ims, texts, num_steps=1),
        "plan_edit": lambda ims, texts: pipe.plan_edit(ims, texts, num_steps=1, ground=False),
        "regenerate_regions": lambda ims, texts: pipe.regenerate_regions(ims, texts, [[(0, 0, 8, 8)]] * len(ims),
                                                                         num_steps=1),
        "region_fit": lambda ims, texts: pipe.region_fit(ims, texts, [[(0, 0, 8, 8)]] * len(ims)),
        "surprise": lambda ims, texts: pipe.surprise(ims, texts),
        "critique": lambda ims, texts: pipe.critique(ims, texts, num_steps=1),
    }
    for call in calls.values():
        for ims, texts in (([img], ["a red circle", "a blue square"]), ([img, img], ["a red circle"])):
            with pytest.raises(ValueError, match="expected .* entries"):
                call(ims, texts)
    assert len(pipe.surprise([img, img], "a red circle")) == 2  # one text stands for every image


def test_empty_requests_give_empty_outputs(pipe):
    assert pipe.plan([]).plans == [] and pipe.generate([]).images == []
    assert pipe.edit([], []).images == [] and pipe.plan_edit([], []).plans == []
    assert pipe.regenerate_regions([], [], []).images == [] and pipe.generate([]).codes.shape[0] == 0
    assert pipe.ground([], []).boxes == [] and pipe.critique([], []).ok == [] and pipe.understand([], []).texts == []
    assert pipe.understand([], "what color is the circle?").texts == []  # one text for no image


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"num_steps": 0}, "num_steps must be an integer >= 1"), ({"num_steps": 2.5}, "num_steps must be an integer"),
    ({"shift": 0}, "shift must be > 0"), ({"shift": -1.0}, "shift must be > 0"),
    ({"preview_every": -1}, "preview_every must be >= 0"),
])  # fmt: skip
def test_bad_sampler_values_are_refused(pipe, kwargs, says):
    with pytest.raises(ValueError, match=says):
        pipe.generate(["a red circle"], **kwargs)


def test_more_bad_values_are_refused(pipe, scene_image):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        pipe.understand([scene_image], ["what color is the circle?"], temperature=-1)
    with pytest.raises(ValueError, match="keep spares cells of the regions"):
        pipe.edit([scene_image], ["make the red circle blue"], keep=[[(0, 0, 8, 8)]], num_steps=1)
    with pytest.raises(ValueError, match="one list of .* boxes per image"):
        pipe.edit([scene_image], ["make the red circle blue"], regions=[(0, 0, 8, 8)], num_steps=1)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        pipe.ground([scene_image], [["the red circle"]], num_steps=0)
    five = [(f"small red {s}", (4 + 12 * i, 4, 14 + 12 * i, 14)) for i, s in enumerate(["circle"] * 5)]
    with pytest.raises(ValueError, match="the model reads at most"):
        pipe.generate(["five red circles"], plans=[five], num_steps=1)


def test_edit_temperatures_may_be_an_array_of_one_per_image(pipe, scene_image):
    two = [scene_image, scene_image]
    out = pipe.edit(two, ["make the red circle blue"] * 2, temperature=np.array([0.0, 1.0]), num_steps=1)
    assert len(out.images) == 2
    assert len(pipe.edit(two, "make the red circle blue", temperature=np.float32(0.5), keep=[None, None],
                         num_steps=1).images) == 2  # a numpy scalar is one temperature; keep of None needs no regions
    with pytest.raises(ValueError, match="temperature"):
        pipe.edit(two, ["make the red circle blue"] * 2, temperature=np.array([0.0, 1.0, 0.5]), num_steps=1)


def test_plans_take_the_agents_item_form_and_one_image_takes_a_flat_list_of_expressions(pipe, scene_image):
    tuples = pipe.generate(["a red circle"], plans=[[("small red circle", (4, 4, 16, 16))]], num_steps=2, seed=1)
    dicts = pipe.generate(["a red circle"], plans=[[{"label": "small red circle", "box": [4, 4, 16, 16]}]],
                          num_steps=2, seed=1)  # fmt: skip
    assert np.array_equal(tuples.images[0], dicts.images[0])
    with pytest.raises(ValueError, match="a plan item is"):
        pipe.generate(["a red circle"], plans=[("small red circle", (4, 4, 16, 16))], num_steps=1)
    flat = pipe.ground(scene_image, ["the red circle", "the blue square"], num_steps=1)
    nested = pipe.ground([scene_image], [["the red circle", "the blue square"]], num_steps=1)
    assert flat.boxes == nested.boxes and len(flat.boxes[0]) == 2


def test_understand_tags_each_pass_with_its_rows(pipe, scene_image):
    seen = []
    pipe.understand([scene_image] * 2, ["describe the image.", "what color is the circle?"], num_steps=2,
                    callback=lambda info: seen.append(info.rows))  # fmt: skip
    assert sorted({tuple(r) for r in seen}) == [(0,), (1,)]


def test_to_takes_a_device_and_a_dtype_and_from_pretrained_a_torch_dtype(pipe, tmp_path):
    import copy

    moved = copy.deepcopy(pipe).to("cpu", torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and moved.vq.quantizer.embedding.dtype == torch.bfloat16
    assert copy.deepcopy(pipe).to(dtype=torch.float16).dtype == torch.float16
    pipe.save_pretrained(tmp_path / "p")
    assert LavidaPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="not both"):
        LavidaPipeline.from_pretrained(tmp_path / "p", dtype=torch.float16, torch_dtype=torch.float16)


def test_the_tokenizer_and_config_name_bad_inputs(tiny_vq):
    from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig

    with pytest.raises(ValueError, match="expected float pixels"):
        tiny_vq.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="integer codes"):
        tiny_vq.decode(torch.full((1, 16, 16), 3.7))
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        LavidaConfig(**{**PRESETS["tiny"], "num_heads": 0})


def test_the_last_preview_of_a_region_redraw_is_its_result(pipe, scene_image):
    for call in (lambda cb: pipe.edit([scene_image], ["make the red circle blue"], regions=[[(0, 0, 24, 24)]],
                                      num_steps=3, preview_every=1, callback=cb),
                 lambda cb: pipe.regenerate_regions([scene_image], ["a blue circle"], [[(0, 0, 24, 24)]],
                                                    num_steps=3, preview_every=1, callback=cb)):  # fmt: skip
        seen = []
        out = call(lambda info: seen.append(info.previews))
        assert np.array_equal(seen[-1][0], out.images[0])  # the caller's pixels outside, as the result
        assert np.array_equal(seen[0][0][40:, 40:], scene_image[40:, 40:])
