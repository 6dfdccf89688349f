"""`PipelineBackend`: the workflows on a real (tiny, random) `LavidaPipeline`, batched.

The tiny pipeline's outputs are noise; what is checked is the wiring: every node runs, state
fields, seeds and events are right, rows keep their own seeds in a batch, concurrent runs
share forwards. `plan_edit`'s logic is checked on a scripted, duck-typed pipeline.
"""

from __future__ import annotations

import math
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from lavida_agent.graphs import edit, t2i
from lavida_agent.graphs import engine as engine_mod
from lavida_agent.graphs.context import Context
from lavida_agent.graphs.engine import CritiqueResult, EditPlanResult
from lavida_agent.graphs.pipeline_backend import PipelineBackend, parse_caption
from lavida_agent.graphs.runtime import (
    BatchingEngine,
    CritiqueRequest,
    EditRequest,
    GenerateRequest,
    GroundRequest,
    NounFitRequest,
    PlanEditRequest,
)
from lavida_agent.graphs.state import EditOutput, T2IOutput
from lavida_agent.tools.shapes_world.scene import COLORS, SHAPES, boxes_apart, region_of
from tests.fakes import tiny_pipeline

PLAN = [{"label": "small red circle", "box": [4.0, 4.0, 16.0, 16.0]}]


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline()
    # Grand-mode grounding: the random model's four independent argmaxes cross, so it
    # grounds nothing, which these tests use to drive the graphs' "missing" paths.
    pipe.defaults["ground_steps"] = 1
    return pipe


@pytest.fixture
def backend(pipe):
    return PipelineBackend(pipe, plan_steps=2, text_steps=2)


@pytest.fixture
def engine(backend):
    with BatchingEngine(backend, max_wait_ms=50) as eng:
        yield eng


def _image(seed=0):
    from lavida_agent.tools.shapes_world.render import render
    from lavida_agent.tools.shapes_world.sampler import sample_scene

    return render(sample_scene(np.random.default_rng(seed), n_objects=3))


def _stream(graph, inp, ctx):
    """Run `graph`, returning (final values, custom events)."""
    events, values = [], None
    for mode, chunk in graph.stream(inp, context=ctx, stream_mode=["custom", "values"]):
        if mode == "custom":
            events.append(chunk)
        else:
            values = chunk
    return values, events


# -- the workflows end to end -----------------------------------------------------------


def test_t2i_graph_runs_on_the_pipeline_and_replays(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=2, seed=5,
                  preview_every=1, refine="auto", grounding_check="gate")  # fmt: skip
    plan = {"items": PLAN, "source": "input"}
    values, events = _stream(t2i.graph, {"prompt": "a red circle", "plan": plan}, ctx)
    out = T2IOutput.model_validate(values)
    # The random model rejects its image and grounds nothing: both rounds run.
    assert [a.seed for a in out.attempts] == [5, 6] and [a.round for a in out.attempts] == [0, 1]
    assert [a.mode for a in out.attempts] == ["generate", "regenerate_regions"]
    assert out.attempts[1].parent == out.attempts[0].image
    assert [r.as_list() for r in out.attempts[1].regions] == [PLAN[0]["box"]]
    assert len(out.critiques) == 2 and not out.accepted and out.best is not None
    check = out.critiques[0].grounding[0]
    assert check.role == "planned" and check.found.as_list() == [0.0, 0.0, 0.0, 0.0]
    assert out.critiques[0].model_text  # the model's raw critique text is kept
    for a in out.attempts:
        img = store.open(a.image)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # Sampler events of both drawing nodes, with a stored preview at every step.
    steps = [e for e in events if e["event"] == "sampler_step"]
    assert [(e["node"], e["step"], e["total"]) for e in steps] == [
        ("generate_image", 1, 2), ("generate_image", 2, 2),
        ("refine_image", 1, 2), ("refine_image", 2, 2),
    ]  # fmt: skip
    assert all(e["preview"] is not None for e in steps)
    # Replay: the recorded seed and plan redraw the same image.
    again = engine.generate("a red circle", plan=PLAN, seed=out.attempts[0].seed, num_steps=2)
    assert np.array_equal(again, store.open(out.attempts[0].image))
    other = engine.generate("a red circle", plan=PLAN, seed=99, num_steps=2)
    assert not np.array_equal(other, again)


def test_edit_graph_runs_on_the_pipeline(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=2, seed=7,
                  preview_every=2)  # fmt: skip
    src = store.put(_image())
    instruction = "make the red circle blue"
    values, events = _stream(edit.graph, {"instruction": instruction, "image": src}, ctx)
    out = EditOutput.model_validate(values)
    assert [s.seed for s in out.steps] == [7, 8] and [s.round for s in out.steps] == [0, 1]
    assert all(s.parent == src and s.instruction == instruction for s in out.steps)
    plan = out.steps[0].plan
    assert plan.targets == ["the red circle"] and len(plan.grounded) == 1
    # The random model grounds nothing, so the whole canvas is the region and nothing is kept.
    assert [r.as_list() for r in plan.regions] == [[0.0, 0.0, 64.0, 64.0]]
    assert plan.layout == [] and plan.keep == []
    assert out.heads and out.current == out.steps[out.heads[0]].result
    assert all(s.critique is not None and s.critique.verdict == "reject" for s in out.steps)
    steps = [e for e in events if e["event"] == "sampler_step"]
    assert [(e["node"], e["step"]) for e in steps] == [("edit_image", 1), ("edit_image", 2)] * 2
    assert [e["preview"] is not None for e in steps] == [False, True] * 2


# -- batching ---------------------------------------------------------------------------


def test_concurrent_t2i_runs_share_batched_forwards(pipe, store):
    def run(engine, i, outs):
        ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=1, seed=10 + i)
        outs[i] = T2IOutput.model_validate(
            t2i.graph.invoke({"prompt": f"a red circle {i}"}, context=ctx))

    backend = PipelineBackend(pipe, plan_steps=2, text_steps=2)
    with BatchingEngine(backend, max_wait_ms=0) as eng:
        start = pipe.forward_count
        run(eng, 0, {})
        single = pipe.forward_count - start
    # A full batch (4) goes at once; the wait only bounds a straggler.
    with BatchingEngine(backend, max_batch=4, max_wait_ms=1000) as eng:
        outs: dict[int, T2IOutput] = {}
        threads = [threading.Thread(target=run, args=(eng, i, outs)) for i in range(4)]
        start = pipe.forward_count
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent = pipe.forward_count - start
    assert sorted(outs) == [0, 1, 2, 3]
    for i, out in outs.items():  # the model planned each run, with the run's seed
        assert out.plan is not None and out.plan.source == "model" and out.plan.seed == 10 + i
        assert [a.seed for a in out.attempts] == [10 + i] and len(out.critiques) == 1
    assert concurrent < 4 * single, (concurrent, single)
    assert {m for m, n in eng.batches if n > 1} >= {"plan_layout", "generate", "critique"}


def test_a_row_in_a_mixed_batch_equals_its_own_call(backend):
    a = GenerateRequest(prompt="a red circle", plan=PLAN, seed=3, num_steps=2)
    b = GenerateRequest(prompt="a blue square and a red circle", plan=None, seed=5, num_steps=2)
    both = backend.generate([a, b])
    assert np.array_equal(both[0], backend.generate([a])[0])
    assert np.array_equal(both[1], backend.generate([b])[0])


def test_on_step_events_carry_previews_when_asked(pipe):
    def events(preview_every):
        got = []
        with BatchingEngine(PipelineBackend(pipe, preview_every=preview_every)) as eng:
            eng.generate("a red circle", plan=None, seed=1, num_steps=3, on_step=got.append)
        return got

    every = events(1)
    assert [(e.step, e.total) for e in every] == [(1, 3), (2, 3), (3, 3)]
    assert all(e.preview.shape == (64, 64, 3) and e.preview.dtype == np.uint8 for e in every)
    assert [e.preview is not None for e in events(2)] == [False, True, True]  # k-th and last
    assert all(e.preview is None for e in events(0))


def test_a_mixed_batch_on_an_unplanned_drawer_sends_each_row_its_own_steps(pipe):
    from lavida_agent.model.pipeline_lavida import LavidaPipeline, with_own_weights

    names = set(pipe.model.image_only_parameter_names())
    drawing = {k: v.detach() + 0.5 for k, v in pipe.model.named_parameters() if k in names}
    both = LavidaPipeline(pipe.model, pipe.vq, pipe.tokenizer,
                          unplanned_model=with_own_weights(pipe.model, drawing))  # fmt: skip
    backend = PipelineBackend(both, preview_every=1)
    got = {0: [], 1: [], 2: []}
    reqs = [GenerateRequest(prompt="a red circle", plan=None if i == 1 else PLAN, seed=3 + i, num_steps=2,
                            on_step=got[i].append) for i in range(3)]  # fmt: skip
    images = backend.generate(reqs)
    for i, image in enumerate(images):  # two passes (rows 0 and 2, then row 1), each row its own events
        assert [(e.step, e.total) for e in got[i]] == [(1, 2), (2, 2)]
        assert np.array_equal(got[i][-1].preview, image)  # the last preview is the row's image
    assert np.array_equal(images[1], PipelineBackend(both).generate([reqs[1]])[0])


def test_rows_fail_alone_and_outputs_are_converted(backend, pipe):
    good, bad = _image(), np.zeros((32, 32, 3), np.uint8)
    out = backend.ground([GroundRequest(image=good, expressions=["the red circle"]),
                          GroundRequest(image=bad, expressions=["the red circle"]),
                          GroundRequest(image=good, expressions=[])])  # fmt: skip
    assert out[0] == [[0.0, 0.0, 0.0, 0.0]] and out[2] == []  # None -> a degenerate box
    assert isinstance(out[1], ValueError) and "letterbox" in str(out[1])
    (verdict,) = backend.critique([CritiqueRequest(image=good, prompt="a red circle")])
    direct = pipe.critique([good], ["a red circle"])  # what the backend converts
    assert isinstance(verdict, CritiqueResult) and verdict.text == direct.texts[0]
    assert verdict.ok is direct.ok[0] and list(verdict.reasons) == list(direct.reasons[0])


def test_surprise_gives_each_row_its_worst_token_and_stray_marks(backend, pipe):
    from lavida_agent.graphs.engine import Surprise
    from lavida_agent.graphs.runtime import SurpriseRequest

    good, bad = _image(), np.zeros((32, 32, 3), np.uint8)
    plan = [{"label": "small red circle", "box": [4.0, 4.0, 16.0, 16.0]}]
    out = backend.surprise([SurpriseRequest(image=good, prompt="a red circle", plan=plan),
                            SurpriseRequest(image=bad, prompt="a red circle", plan=plan),
                            SurpriseRequest(image=good, prompt="a red circle", plan=[])])  # fmt: skip
    scores = pipe.surprise([good], ["a red circle"], [[("small red circle", (4, 4, 16, 16))]])[0]
    marks = pipe.stray_marks([good], ["a red circle"], [[("small red circle", (4, 4, 16, 16))]], scores=scores[None])[0]
    assert isinstance(out[0], Surprise) and out[0].worst == pytest.approx(float(scores.min()), abs=1e-4)
    assert [m["box"] for m in out[0].strays] == [[float(v) for v in box] for box, _ in marks]
    assert isinstance(out[1], ValueError) and out[2].strays == []  # no plan: no marks


def test_ground_reads_the_requested_number_of_candidates(backend, pipe, monkeypatch):
    seen = []
    real = pipe.ground

    def spy(*args, **kwargs):
        seen.append((kwargs.get("candidates", "not passed"), kwargs.get("views", "not passed")))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "ground", spy)
    backend.ground([GroundRequest(image=_image(), expressions=["the red circle"], candidates=1)])
    backend.ground([GroundRequest(image=_image(), expressions=["the red circle"], views=1)])
    backend.ground([GroundRequest(image=_image(), expressions=["the red circle"])])
    assert seen == [(1, None), (None, 1), (None, None)]  # None: the pipeline's default


# -- load_engine ------------------------------------------------------------------------


def test_load_engine_builds_a_batching_engine_over_the_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    engine_mod.load_engine.cache_clear()
    try:
        eng = engine_mod.load_engine(str(tmp_path / "pipe"))
        assert isinstance(eng, BatchingEngine) and isinstance(eng.backend, PipelineBackend)
        assert engine_mod.load_engine(str(tmp_path / "pipe")) is eng  # cached
        eng.close()
    finally:
        engine_mod.load_engine.cache_clear()


def test_load_engine_failures_say_what_to_do(tmp_path, monkeypatch):
    engine_mod.load_engine.cache_clear()
    with pytest.raises(engine_mod.EngineUnavailableError,
                       match=r"could not be loaded from .*empty.*pipeline_index\.json.*Context"):
        engine_mod.load_engine(str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "lavida_agent.model.pipeline_lavida", None)
    with pytest.raises(engine_mod.EngineUnavailableError, match=r"Context\(engine="):
        engine_mod.load_engine(str(tmp_path / "x"))
    engine_mod.load_engine.cache_clear()


# -- plan_edit on a scripted pipeline ---------------------------------------------------

RED = (4, 4, 16, 16)
BLUE = (40, 30, 61, 51)
GREEN = (20, 44, 32, 56)
CAPTION = "a small red circle, a large blue square and a small green triangle on a white background"


class ScriptedPipeline:
    """Duck-typed pipeline: a fixed caption and fixed boxes per expression."""

    config = SimpleNamespace(image_size=64)

    def __init__(self, caption=CAPTION, boxes=None):
        self.caption = caption
        self.boxes = boxes if boxes is not None else {
            "the red circle": RED, "the circle": RED, "the blue square": BLUE,
            "the green triangle": GREEN,
        }  # fmt: skip
        self.calls: list[tuple[str, object]] = []

    def understand(self, images, questions, **kw):
        self.calls.append(("understand", list(questions)))
        return SimpleNamespace(texts=[self.caption] * len(images))

    def ground(self, images, expressions, candidates=None, views=None, sizes=False):
        if not images:  # as the real pipeline: `pack([])` refuses an empty batch
            raise ValueError("pack needs at least one example (a caller passed an empty batch)")
        self.calls.append(("ground", [list(e) for e in expressions]))
        self.candidates, self.views, self.sizes = candidates, views, sizes
        return SimpleNamespace(boxes=[[self.boxes.get(e) for e in row] for row in expressions])

    def edit(self, images, instructions, *, plans, **kw):
        self.calls.append(("edit", plans))
        self.edit_regions, self.edit_keep = kw.get("regions"), kw.get("keep")
        return SimpleNamespace(images=list(images))


def _plan_edit(instructions, pipe=None):
    pipe = pipe or ScriptedPipeline()
    image = np.zeros((64, 64, 3), np.uint8)
    reqs = [PlanEditRequest(image=image, instruction=i) for i in instructions]
    return PipelineBackend(pipe).plan_edit(reqs), pipe


def _labels(items):
    return {i["label"]: i["box"] for i in items}


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_parse_caption():
    cap = parse_caption("A small red circle, a large blue square and an small green triangle "
                        "on a white background.")  # fmt: skip
    assert [o.text for o in cap.objects] == ["small red circle", "large blue square",
                                             "small green triangle"]  # fmt: skip
    assert cap.background == "white"
    assert parse_caption("nothing on a gray background") == parse_caption("nothing on a gray "
                                                                          "background")  # fmt: skip
    assert parse_caption("nothing on a gray background").objects == ()
    noisy = parse_caption("objects objects and a red circle and a purple blob ??")
    assert [o.text for o in noisy.objects] == ["red circle"] and noisy.background is None


def test_plan_edit_batches_one_caption_and_one_grounding_call():
    (recolor, move, add), pipe = _plan_edit(["make the red circle blue",
                                             "move the blue square to the top left",
                                             "add a yellow diamond left of the blue square"])
    assert [c[0] for c in pipe.calls] == ["understand", "ground"]
    assert pipe.calls[0][1] == ["describe the image."] * 3
    assert pipe.views == 1  # the agents ground in the image alone (`AGENT_VIEWS`)
    assert pipe.sizes  # each unsized expression in its sized forms too
    f = [float(v) for v in RED]
    assert recolor == EditPlanResult(
        targets=["the red circle"], target_boxes=[f],
        layout=[{"label": "the blue circle", "box": f}],
        keep=[{"label": "the blue square", "box": [float(v) for v in BLUE]},
              {"label": "the green triangle", "box": [float(v) for v in GREEN]}],
        caption=CAPTION,  # the caption planning read: the graph checks the targets against it
    )  # fmt: skip
    # A move redraws the source box and the destination box: the object's own size, its
    # centre in the named cell (the red circle there is in the way of any such box).
    assert move.targets == ["the blue square"]
    ((label, box),) = _labels(move.layout).items()
    assert label == "the blue square" and move.target_boxes == [[float(v) for v in BLUE], box]
    assert box[2] - box[0] == box[3] - box[1] == 21 and region_of(*_centre(box)) == "top left"
    assert set(_labels(move.keep)) == {"the red circle", "the green triangle"}
    # A relative add: a small box left of the anchor, clear of every known object (right
    # beside the anchor's centre row the green triangle is in the way).
    assert add.targets == ["the blue square"]
    ((label, box),) = _labels(add.layout).items()
    assert label == "the yellow diamond" and box[2] - box[0] == box[3] - box[1] == 12
    assert _centre(box)[0] + 4 < _centre(BLUE)[0] and add.target_boxes == [box]
    assert all(boxes_apart(box, other, 4) for other in (RED, BLUE, GREEN))
    assert set(_labels(add.keep)) == {"the red circle", "the blue square", "the green triangle"}


def test_plan_edit_places_new_objects_clear_of_the_objects_it_keeps():
    circle = (17, 46, 29, 58)  # in the bottom cell, left of its centre
    pipe = ScriptedPipeline("a small red circle on a white background", {"the red circle": circle})
    (bottom,), _ = _plan_edit(["add a yellow diamond at the bottom"], pipe)
    ((_, box),) = _labels(bottom.layout).items()
    assert region_of(*_centre(box)) == "bottom" and bottom.target_boxes == [box]
    assert boxes_apart(box, circle, 4) and box[0] == circle[2] + 4  # the nearest clear spot
    # No box centred in the top-left cell clears the red circle there: the clearest one.
    (top_left,), _ = _plan_edit(["add a yellow diamond at the top left"])
    ((_, box),) = _labels(top_left.layout).items()
    assert region_of(*_centre(box)) == "top left" and box[2] - box[0] == 12

    def overlap(a, b):
        return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))

    assert overlap(box, RED) < overlap((5, 5, 17, 17), RED) / 4  # the cell-centred box: 121 px


def test_plan_edit_other_categories_and_limits():
    (bg, remove, resize, bad), pipe = _plan_edit(["change the background to black",
                                                  "remove the circle",
                                                  "make the red circle larger",
                                                  "paint everything pink"])  # fmt: skip
    assert bg.targets == [] and bg.target_boxes == [[0.0, 0.0, 64.0, 64.0]] and bg.layout == []
    assert len(bg.keep) == 3
    assert remove.targets == ["the circle"] and remove.layout == []
    assert set(_labels(remove.keep)) == {"the blue square", "the green triangle"}
    ((label, box),) = _labels(resize.layout).items()
    # grown from the canvas corner: 21 px at the old centre would leave the margin, and
    # shifted inside it, move the centre 3.5 px; 18 px (still large) moves it 1.4 px
    assert label == "the red circle" and box == [2.0, 2.0, 20.0, 20.0] and len(resize.target_boxes) == 2
    assert bad == EditPlanResult()  # outside the grammar: no plan
    # Not grounded: the whole canvas is the region, nothing is claimed about the result.
    (lost,), _ = _plan_edit(["make the red circle blue"], ScriptedPipeline(boxes={}))
    assert lost.target_boxes == [[0.0, 0.0, 64.0, 64.0]] and lost.layout == [] == lost.keep
    # A kept object whose expression would also name the edited object afterwards is dropped.
    two = "a small red circle and a small blue circle on a white background"
    (amb,), _ = _plan_edit(["make the blue circle red"], ScriptedPipeline(
        two, {"the red circle": RED, "the blue circle": (40, 40, 52, 52)}))
    assert _labels(amb.layout) == {"the red circle": [40.0, 40.0, 52.0, 52.0]} and amb.keep == []


def test_plan_edit_does_not_keep_a_second_name_for_the_edited_object():
    """The caption named the red circle twice (`a red circle`, `a blue square`) and both were
    grounded on it: keeping the `blue square` would spare the cells the removal redraws."""
    caption = "a small red circle, a large blue square and a small green triangle on a white background"
    boxes = {"the red circle": RED, "the blue square": (4, 4, 16, 17), "the green triangle": GREEN}
    (remove, add), _ = _plan_edit(["remove the red circle", "add a yellow diamond below the red circle"],
                                  ScriptedPipeline(caption, boxes))  # fmt: skip
    assert _labels(remove.keep) == {"the green triangle": [float(v) for v in GREEN]}
    # an add changes no object: its anchor's look-alike is kept (and avoided)
    assert set(_labels(add.keep)) == {"the red circle", "the blue square", "the green triangle"}


def test_plan_edit_redraws_a_square_around_a_box_grounded_short():
    """World objects have square boxes: a grounded 12 x 8 box missed part of the circle."""
    (plan,), _ = _plan_edit(["make the red circle blue"], ScriptedPipeline(boxes={"the red circle": (4, 4, 16, 12)}))
    assert plan.target_boxes == [[4.0, 2.0, 16.0, 14.0]] == [plan.layout[0]["box"]]



def test_plan_edit_draws_whole_pixel_squares_of_a_side_the_world_has():
    """A grounded box off by fractions of a pixel (rounding each edge alone made 20 x 21
    boxes) or with a side between the size classes (17 px: no object is 15-17 px wide, and
    its plan label would have no size word) is drawn as a whole-pixel square of the nearer
    class; the region redrawn still covers the grounded box."""
    (frac, between), _ = _plan_edit(["make the red circle blue", "make the blue square red"], ScriptedPipeline(
        boxes={"the red circle": (4.3, 4.6, 24.9, 25.4), "the blue square": (30, 30, 47, 47)}))  # fmt: skip
    box = frac.layout[0]["box"]
    assert box[2] - box[0] == box[3] - box[1] == 21 and all(v == int(v) for v in box)
    box = between.layout[0]["box"]
    assert box[2] - box[0] == box[3] - box[1] == 18
    (region,) = between.target_boxes
    assert region[0] <= 30 and region[1] <= 30 and region[2] >= 47 and region[3] >= 47

def test_plan_edit_grows_an_object_clear_of_its_neighbours_and_near_its_centre():
    """`larger` from small takes the large class; the side (21 preferred) and the centre
    (within 2 px, half the world's tolerance) are chosen to keep twice the world's gap from
    the objects kept. Here 21 px at the old centre would touch the green triangle."""
    circle, triangle = (20, 20, 32, 32), (20, 38, 32, 50)
    caption = "a small red circle and a small green triangle on a white background"
    (plan,), _ = _plan_edit(["make the red circle larger"], ScriptedPipeline(
        caption, {"the red circle": circle, "the green triangle": triangle}))  # fmt: skip
    box = plan.layout[0]["box"]
    side = box[2] - box[0]
    assert box[3] - box[1] == side == 20  # 21 and 22 come within 3 px of the triangle
    assert math.dist(_centre(box), _centre(circle)) <= 2 and boxes_apart(box, triangle, 4)
    # at the top edge no large box keeps the centre within 2 px: the one that moves it least
    (edge,), _ = _plan_edit(["make the red circle larger"], ScriptedPipeline(boxes={"the red circle": (8, 2, 21, 15)}))
    box = edge.layout[0]["box"]
    assert box[2] - box[0] == box[3] - box[1] == 18 and math.dist(_centre(box), (14.5, 8.5)) < 3
    (smaller,), _ = _plan_edit(["make the blue square smaller"])
    box = smaller.layout[0]["box"]
    assert box[2] - box[0] == box[3] - box[1] == 12 and math.dist(_centre(box), _centre(BLUE)) <= 2


def test_plan_edit_with_nothing_to_ground_makes_no_grounding_call():
    """A background edit on an image whose caption lists no object has nothing to ground:
    the plan is the whole canvas, and no empty grounding batch reaches the model (this was
    a flaky failure when such a row happened to be batched alone)."""
    (bg,), pipe = _plan_edit(["change the background to black"],
                             ScriptedPipeline("nothing on a white background"))  # fmt: skip
    assert [c[0] for c in pipe.calls] == ["understand"]
    assert bg.target_boxes == [[0.0, 0.0, 64.0, 64.0]] and bg.layout == [] == bg.keep


def test_edit_conditions_the_model_on_the_plan_in_its_training_format():
    pipe = ScriptedPipeline()
    backend = PipelineBackend(pipe)
    image = np.zeros((64, 64, 3), np.uint8)
    recolor = "make the red circle blue"
    (plan,) = backend.plan_edit([PlanEditRequest(image=image, instruction=recolor)])
    reqs = [EditRequest(image=image, instruction=recolor, plan=plan, seed=1,
                        num_steps=2),
            EditRequest(image=image, instruction="change the background to gray",
                        plan=EditPlanResult(target_boxes=[[0, 0, 64, 64]]), seed=2, num_steps=2),
            EditRequest(image=image, instruction="anything", plan=None, seed=3, num_steps=2)]
    backend.edit(reqs)
    assert pipe.calls[-1] == ("edit", [[("small blue circle", RED), ("removed", RED)], None, None])
    # local edits: each row redraws its plan's target boxes; a row without a plan, all of it
    assert pipe.edit_regions == [[RED], [(0, 0, 64, 64)], None]
    # the background edit keeps the core of each object its plan keeps
    from dataclasses import replace

    from lavida_agent.tools.shapes_world.render import core_box

    keep = [{"label": "the blue square", "box": [40.0, 40.0, 52.0, 52.0]},
            {"label": "the red circle", "box": [4.0, 4.0, 28.0, 28.0]}, {"label": "the blob", "box": [0, 0, 8, 8]}]
    reqs[1] = replace(reqs[1], plan=EditPlanResult(target_boxes=[[0, 0, 64, 64]], keep=keep))
    backend.edit(reqs)
    assert pipe.edit_keep[1] == [core_box("square", keep[0]["box"]), core_box("circle", keep[1]["box"])]
    assert pipe.edit_keep[2] is None  # no region, nothing to spare
    PipelineBackend(pipe, local_edits=False).edit(reqs)
    assert pipe.edit_regions is None
    assert PipelineBackend(pipe, use_edit_plans=False).edit(reqs[:1]) and pipe.calls[-1] == (
        "edit", [None])



def test_noun_fit_scores_grammar_labels_and_zeroes_the_rest():
    pipe = tiny_pipeline()
    image = np.zeros((64, 64, 3), np.uint8)
    items = [{"label": "the red circle", "box": [4.0, 4.0, 16.0, 16.0]},
             {"label": "a red thing", "box": [30.0, 30.0, 50.0, 50.0]}]  # fmt: skip
    bad = np.zeros((8, 8, 3), np.uint8)
    out = PipelineBackend(pipe).noun_fit([NounFitRequest(image=image, items=items),
                                          NounFitRequest(image=image, items=[]),
                                          NounFitRequest(image=bad, items=items)])  # fmt: skip
    (red, thing), empty, err = out
    assert np.isfinite(red) and red != 0.0 and thing == 0.0 and empty == []
    assert isinstance(err, ValueError)
    direct = pipe.noun_fit([image], [("circle", "red", None)], [[(4, 4, 16, 16)]])[0][0]
    assert red == pytest.approx(direct, abs=1e-4)


def test_noun_contrast_is_the_fit_less_the_best_noun_one_word_away():
    pipe = tiny_pipeline()
    image = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    box = (10.0, 12.0, 30.0, 32.0)
    (contrast,), (open_contrast,) = pipe.noun_fit([image] * 2, [("circle", "red", None), ("circle", None, None)],
                                                  [[box], [box]], contrast=True)  # fmt: skip

    def fit(shape, color):
        return pipe.noun_fit([image], [(shape, color, None)], [[box]])[0][0]

    rivals = [fit(s, "red") for s in SHAPES if s != "circle"] + [fit("circle", c) for c in COLORS if c != "red"]
    assert contrast == pytest.approx(fit("circle", "red") - max(rivals), abs=1e-4)
    # without a colour: the best colour of the shape against every other shape in any colour
    other = max(fit(s, None) for s in SHAPES if s != "circle")
    assert open_contrast == pytest.approx(fit("circle", None) - other, abs=1e-4)
    backend = PipelineBackend(pipe).noun_fit([NounFitRequest(image=image, contrast=True, items=[
        {"label": "the red circle", "box": list(box)}])])  # fmt: skip
    assert backend == [[pytest.approx(contrast, abs=1e-4)]]


def test_plan_boxes_round_halves_up_as_every_other_box_does():
    from lavida_agent.graphs.pipeline_backend import _int_box
    from lavida_agent.tools.boxes import Box

    for box in ([10.5, 2.5, 21.5, 13.5], [11.5, 0.5, 20.5, 9.5]):
        assert _int_box(box, 64) == Box(*box).as_int()  # widths keep their parity: 11 and 9
    assert _int_box([-3, 0.4, 70, 64.6], 64) == (0, 0, 64, 64)


def test_a_layouts_referring_expressions_reach_the_model_in_its_plan_labels():
    from lavida_agent.graphs.pipeline_backend import _to_model_plan

    layout = [{"label": f"the small {c} circle", "box": [4.0 + 14 * i, 4.0, 14.0 + 14 * i, 14.0]}
              for i, c in enumerate(["red", "green", "blue", "purple"])]  # fmt: skip
    plan = _to_model_plan(layout, 64)
    assert [label for label, _ in plan] == ["small red circle", "small green circle", "small blue circle",
                                            "small purple circle"]  # fmt: skip
    assert _to_model_plan([{"label": "red circle", "box": [4, 4, 14, 14]}], 64) == [("red circle", (4, 4, 14, 14))]
