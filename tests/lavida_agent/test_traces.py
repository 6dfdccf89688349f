"""Traces: the JSON record of a run is complete, and its HTML page is self-contained."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from lavida_agent.graphs.engine import EditPlanResult
from lavida_agent.tools.artifacts import ArtifactStore
from lavida_agent.tools.images import decode_png

from lavida_agent.api import LavidaAgent
from lavida_agent.errors import InvalidInputError, NotFoundError
from lavida_agent.traces import Trace, load_trace, render_html
from tests.fakes import FakeEngine

BLUE = {"label": "blue square", "box": [36.0, 36.0, 52.0, 52.0]}


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def agent(engine):
    with LavidaAgent(engine=engine, num_steps=3, selection="accept") as a:
        yield a


@pytest.fixture
def refined(agent, engine):
    """A t2i run with one rejection (the blue square is missing) and a regions redraw."""
    engine.drop_labels = {"blue square"}
    engine.enqueue_critique(False, ["the blue square is missing"], text="no square")
    r = agent.generate("red circle and blue square", seed=7, rounds=2)
    engine.drop_labels = set()
    return r


def test_json_trace_records_every_node_in_order(agent, refined):
    trace = load_trace(refined.run_id, agent.settings.runs_dir)
    assert trace == refined.trace
    names = [n.node for n in trace.nodes]
    assert names == ["plan_layout", "review_plan", "generate_image", "critique_image",
                     "refine_image", "critique_image"]  # fmt: skip
    assert [n.index for n in trace.nodes] == list(range(len(names)))
    assert all(n.elapsed_s is not None and n.elapsed_s >= 0 for n in trace.nodes)
    starts = [n.start_s for n in trace.nodes]
    assert starts == sorted(starts)
    assert trace.inputs["prompt"] == "red circle and blue square" and trace.inputs["seed"] == 7
    assert trace.settings["num_steps"] == 3 and trace.settings["engine"] == "FakeEngine"
    # Inputs and outputs: the plan, the seeds, the critique and its blamed boxes.
    plan_node, _, gen, crit, refine, _ = trace.nodes
    assert [i["label"] for i in plan_node.output["plan"]["items"]] == ["red circle", "blue square"]
    assert gen.output["attempts"][0]["seed"] == 7 and refine.output["attempts"][0]["seed"] == 8
    assert gen.sampler_steps == 3 and refine.sampler_steps == 3
    assert crit.output["critiques"][0]["reasons"][0] == "the blue square is missing"
    assert crit.output["critiques"][0]["blamed"][0]["label"] == "blue square"
    assert refine.input["critiques"]["count"] == 1  # growing lists: count + last item
    assert refine.output["attempts"][0]["mode"] == "regenerate_regions"
    assert any(e["event"] == "critique" for e in crit.events)
    # Views: planned boxes on the plan, grounded boxes (one failed) on the critique.
    assert [b.kind for b in plan_node.view.boxes] == ["planned", "planned"]
    assert plan_node.view.image is None
    assert {(b.label, b.ok) for b in crit.view.boxes} == {("red circle", True),
                                                          ("blue square", False)}  # fmt: skip
    assert any(b.kind == "region" for b in refine.view.boxes)
    # Every image the trace names is in the store.
    for n in trace.nodes:
        if n.view.image is not None:
            assert agent.store.exists(n.view.image["path"])
    assert trace.result["accepted"] is True and trace.error is None
    assert len(refined.trace_path.read_bytes()) < 100_000  # refs, never pixels


def _imgs(page: str) -> list[str]:
    return re.findall(r"<img [^>]*src='([^']*)'", page)


def test_html_is_self_contained_with_one_image_per_step(agent, refined):
    page = render_html(refined.trace, agent.store, scale=4)
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", page), "no external URLs"
    assert "<link" not in page and "<script" not in page and "url(" not in page.replace(
        "url(#arrow)", "")  # fmt: skip
    srcs = _imgs(page)
    assert len(srcs) == page.count("<img") == len(refined.trace.nodes)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        png = decode_png(base64.b64decode(src.split(",", 1)[1]))
        assert png.shape == (256, 256, 3)  # 64 px upscaled 4x, nearest neighbour
    assert "the blue square is missing" in page and "no square" in page  # critique text
    assert "generate_image" in page and "sampler steps" in page  # timings table


def test_html_status_tells_ok_failed_and_unfinished(agent, refined):
    assert "<th>status</th><td>ok</td>" in render_html(refined.trace, agent.store)
    failed = refined.trace.model_copy(update={"error": "the run was cancelled", "result": {},
                                              "error_code": "cancelled"})  # fmt: skip
    assert "<span class=err>stopped: the run was cancelled</span>" in render_html(failed, agent.store)  # as `runs` says
    started = refined.trace.model_copy(update={"result": {}, "nodes": []})  # as written at start
    page = render_html(started, agent.store)
    assert "unfinished" in page and f"lavida-agent resume {refined.run_id}" in page


def test_html_draws_the_boxes_on_the_images(agent, refined):
    srcs = _imgs(render_html(refined.trace, agent.store, scale=2))
    critique_png = decode_png(base64.b64decode(srcs[3].split(",", 1)[1]))
    raw = np.repeat(np.repeat(agent.store.open(refined.attempts[0].image), 2, 0), 2, 1)
    assert not np.array_equal(critique_png, raw)  # boxes drawn over the image
    plan_png = decode_png(base64.b64decode(srcs[0].split(",", 1)[1]))
    assert (plan_png != 255).any()  # the plan is drawn on a blank canvas


def test_edit_trace_has_the_lineage_as_svg(agent, engine):
    s = agent.session()
    s.start(np.full((64, 64, 3), 10, np.uint8))
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
    s.edit("add a blue square", seed=1)
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[[0.0, 0.0, 8.0, 8.0]], layout=[], keep=[BLUE]))
    r = s.edit("recolour the corner", seed=2)
    assert [n.node for n in r.trace.nodes] == ["plan_edit", "edit_image", "verify_edit",
                                               "commit_edit"]  # fmt: skip
    assert len(r.trace.lineage["edges"]) == 2
    page = render_html(r.trace, agent.store)
    assert "<svg" in page and "add a blue square" in page
    assert len(_imgs(page)) == len(r.trace.nodes)
    assert not re.search(r"https?://", page)


def test_missing_images_render_as_placeholders(agent, refined, tmp_path):
    empty = ArtifactStore(tmp_path / "empty")
    page = render_html(refined.trace.model_dump(mode="json"), empty)
    assert len(_imgs(page)) == len(refined.trace.nodes) and "image unavailable" in page


def test_load_trace_errors(agent, tmp_path):
    with pytest.raises(NotFoundError):
        load_trace("0123abcd", agent.settings.runs_dir)
    with pytest.raises(InvalidInputError):
        load_trace("../etc/passwd", agent.settings.runs_dir)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(InvalidInputError):
        load_trace(bad)


def test_trace_round_trips_through_json(refined):
    assert Trace.model_validate_json(refined.trace.to_json()) == refined.trace


def test_trace_shows_the_critique_reasons_dropped_as_not_about_the_prompt(agent, engine):
    engine.enqueue_critique(False, ["missing purple circle"], text="no: missing purple circle")
    r = agent.generate("a red circle and a blue square", seed=1, rounds=1)
    crit = next(n for n in r.trace.nodes if n.node == "critique_image")
    assert crit.output["critiques"][0]["dropped_reasons"] == ["missing purple circle"]
    assert crit.view.caption == "accept: ok (dropped, not about the prompt: missing purple circle)"
    assert "dropped (not about the prompt): missing purple circle" in render_html(r.trace, agent.store)


def test_trace_draws_a_stray_mark_and_says_why_the_image_was_rejected(agent, engine):
    engine.enqueue_surprise(-5.6, [{"box": [48.0, 0.0, 60.0, 8.0], "score": -5.6}])
    r = agent.generate("a red circle and a blue square", seed=1, rounds=1)
    crit = next(n for n in r.trace.nodes if n.node == "critique_image")
    assert [(b.kind, b.box) for b in crit.view.boxes if b.label == "stray"] == [("stray", [48.0, 0.0, 60.0, 8.0])]
    page = render_html(r.trace, agent.store)
    assert "something the layout does not plan is drawn at [48, 0, 60, 8]" in page and ">stray<" in page
    assert r.trace.settings["stray_check"] == "gate" and not r.accepted


def test_ground_trace_shows_the_perception_and_how_each_box_was_chosen(agent, engine):
    engine.enqueue_answer("a small red circle and a small blue circle on a white background")
    engine.enqueue_ground([[4.0, 4.0, 16.0, 16.0], [40.0, 4.0, 52.0, 16.0]])
    engine.enqueue_ground([[40.0, 4.0, 52.0, 16.0]])  # the model's own box: the wrong circle
    r = agent.ground(np.zeros((64, 64, 3), np.uint8), ["the circle on the left"])
    seen, found = r.trace.nodes
    assert seen.view.caption.startswith("caption: a small red circle")
    assert [b.label for b in seen.view.boxes] == ["small red circle", "small blue circle"]
    assert found.view.caption == "1 expression(s); the circle on the left: scene"
    assert found.view.boxes[0].box == [4.0, 4.0, 16.0, 16.0]
    assert "the circle on the left: scene" in render_html(r.trace, agent.store)


def test_ground_trace_marks_a_referent_not_in_the_image(agent, engine):
    engine.enqueue_answer("a small red circle on a white background")
    engine.enqueue_ground([[4.0, 4.0, 16.0, 16.0]])
    engine.enqueue_ground([[40.0, 4.0, 52.0, 16.0]])
    engine.enqueue_fit([0.0, -1.0])  # its own box stays
    engine.enqueue_fit([-6.0])  # read there as a look-alike
    r = agent.ground(np.zeros((64, 64, 3), np.uint8), ["the blue square"])
    found = r.trace.nodes[-1]
    assert found.view.caption == "1 expression(s); not in the image: the blue square"
    assert found.view.boxes[0].ok is False  # drawn as a failed box
    assert "not in the image: the blue square" in render_html(r.trace, agent.store)


def test_critique_traces_say_the_verdict_was_read_off_the_perceived_scene(agent, engine):
    caption = "a large red circle on a white background"
    engine.enqueue_answer(caption)
    engine.enqueue_ground([[4.0, 4.0, 26.0, 26.0]])
    r = agent.critique(np.zeros((64, 64, 3), np.uint8), "a red circle and a blue square")
    seen, judged = r.trace.nodes
    assert seen.view.caption == f"caption: {caption}"
    assert judged.view.caption == "reject: missing blue square (judged by the perceived scene)"
    assert "missing blue square (judged by the perceived scene)" in render_html(r.trace, agent.store)
    # the t2i critique: the caption the verdict was read from is shown as what was seen
    engine.enqueue_answer("a large red circle and a large blue square on a white background")
    engine.enqueue_ground([[4.0, 4.0, 26.0, 26.0], [36.0, 36.0, 58.0, 58.0]])
    g = agent.generate("a red circle and a blue square", seed=1, rounds=1)
    crit = next(n for n in g.trace.nodes if n.node == "critique_image")
    assert crit.view.caption == "accept: ok (judged by the perceived scene)"
    assert "seen: <i>a large red circle and a large blue square" in render_html(g.trace, agent.store)


def test_a_json_file_that_is_not_a_trace_is_named_in_one_line(tmp_path):
    path = tmp_path / "result.json"
    path.write_text('{"seed": 1, "out": "a.png"}')  # e.g. `generate --json` output
    with pytest.raises(InvalidInputError) as e:
        load_trace(path)
    assert str(e.value).endswith("is not a lavida-agent trace (run_id: Field required)")
