"""The `lavida-agent` CLI end to end with CliRunner on the FakeEngine (`ENGINE_FACTORY`)."""

from __future__ import annotations

import json
import threading
import types

import numpy as np
import pytest
from click.testing import CliRunner
from lavida_agent.graphs.engine import EditPlanResult
from lavida_agent.tools.images import load_image, save_image

import lavida_agent.cli as cli_mod
from lavida_agent.cli import cli
from lavida_agent.errors import InvalidInputError
from tests.fakes import FakeEngine, draw

# -- JSON schemas: required key -> type(s); list items checked by a nested schema ---------------

ATTEMPT = {"seed": int, "verdict": (str, type(None)), "reasons": list, "image": str}
PLAN_ITEM = {"label": str, "box": list}
RUN = {"run_id": str, "thread_id": str, "trace": str}
SCHEMAS = {
    "generate": {"prompt": str, "out": str, "seed": int, "rounds": int,
                 "plan": [PLAN_ITEM], "attempts": [ATTEMPT], **RUN},  # fmt: skip
    "edit": {"image": str, "instruction": str, "out": str, "seed": int, "rounds": int,
             "plan": [PLAN_ITEM], "keep": [PLAN_ITEM], "caption": (str, type(None)), "attempts": [ATTEMPT],
             **RUN},  # fmt: skip
    "ground": {"image": str, "expressions": [str], "boxes": [list], "found_by": [str], "present": list},
    "ask": {"image": str, "question": str, "answer": str},
    "critique": {"image": str, "prompt": str, "verdict": str, "reasons": [str], "judged_by": str,
                 "objects": [PLAN_ITEM], **RUN},  # fmt: skip
}


def validate(data, schema, where="$"):
    """Assert that `data` has every key of `schema` with the right type (extra keys allowed)."""
    if isinstance(schema, dict):
        assert isinstance(data, dict), f"{where}: expected an object, got {data!r}"
        for key, sub in schema.items():
            assert key in data, f"{where}: missing key {key!r}"
            validate(data[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(data, list), f"{where}: expected a list"
        for i, item in enumerate(data):
            validate(item, schema[0], f"{where}[{i}]")
    else:
        assert isinstance(data, schema) and not (schema is int and isinstance(data, bool)), (
            f"{where}: {data!r} is not {schema}")  # fmt: skip


@pytest.fixture
def engine(monkeypatch):
    eng = FakeEngine()
    seen = []

    def factory(settings):
        seen.append(settings)
        return eng

    monkeypatch.setattr(cli_mod, "ENGINE_FACTORY", factory)
    eng.settings_seen = seen
    return eng


@pytest.fixture
def run(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAVIDA_SELECTION", "accept")  # these tests follow the stop-on-accept loop
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(cli, [str(a) for a in args], input=input)

    return invoke


@pytest.fixture
def scene(tmp_path):
    """A 128 x 64 PNG with the red circle at [20, 20, 60, 40]."""
    path = tmp_path / "scene.png"
    save_image(draw(np.zeros((64, 128, 3), np.uint8),
                    [{"label": "red circle", "box": [20, 20, 60, 40]}]), path)  # fmt: skip
    return path


# -- one command each -------------------------------------------------------------------------


def test_generate_json(run, tmp_path):
    res = run("generate", "red circle and blue square", "--out", "o.png", "--seed", 3,
              "--rounds", 2, "--steps", 2, "--preview-scale", 4, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    validate(data, SCHEMAS["generate"])
    assert data["seed"] == 3 and data["out"] == "o.png" and data["rounds"] == 1
    assert [p["label"] for p in data["plan"]] == ["red circle", "blue square"]
    assert load_image(tmp_path / "o.png").shape == (256, 256, 3)
    assert (tmp_path / "lavida_home" / "runs" / f"{data['run_id']}.json").is_file()


def test_generate_writes_the_trace_page(run, tmp_path):
    res = run("generate", "red circle", "--out", "o.png", "--seed", 1, "--steps", 2, "--json",
              "--trace-html", "reports/new/trace.html")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["out"] == "o.png"
    page = (tmp_path / "reports" / "new" / "trace.html").read_text()  # folders created
    assert page.count("<img") >= 3 and "red circle" in page


def test_generate_human_output_and_no_plan(run, engine):
    res = run("generate", "red circle", "--out", "sub/o.png", "--no-plan", "--seed", 1)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("sub/o.png: accepted after 1 round(s), seed 1, run ")
    assert engine.calls["plan_layout"] == 0


def test_generate_says_which_objects_grounding_did_not_find_in_an_accepted_image(run, engine):
    engine.drop_labels = {"blue square"}  # drawn without it; the model's verdict still accepts
    res = run("generate", "red circle and blue square", "--out", "o.png", "--seed", 1, "--json")
    data = json.loads(res.stdout)
    assert data["accepted"] and [a["grounding_failed"] for a in data["attempts"]] == [["blue square"]]
    res = run("generate", "red circle and blue square", "--out", "o.png", "--seed", 1)
    assert res.exit_code == 0 and res.stdout.splitlines()[1] == "  grounding did not find: blue square"
    ok = run("generate", "red circle", "--out", "o.png", "--seed", 1)
    assert len(ok.stdout.splitlines()) == 1  # nothing to say when every check passed


def test_generate_says_why_the_kept_attempt_was_rejected(run, engine):
    engine.enqueue_answer("a large red circle on a white background")  # the perceived scene
    engine.enqueue_ground([[4.0, 4.0, 26.0, 26.0]])
    res = run("generate", "a red circle and a blue square", "--out", "o.png", "--seed", 1, "--rounds", 1)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("o.png: best of rejected attempts after 1 round(s)")
    assert "  critique: missing blue square" in lines[1:]


def test_generate_json_lists_each_attempts_stray_marks(run, engine):
    engine.enqueue_surprise(-5.6, [{"box": [48.0, 0.0, 60.0, 8.0], "score": -5.6}])
    res = run("generate", "a red circle and a blue square", "--out", "o.png", "--seed", 1, "--rounds", 1, "--json")
    (attempt,) = json.loads(res.stdout)["attempts"]
    assert attempt["strays"] == [{"box": [48.0, 0.0, 60.0, 8.0], "score": -5.6}]
    assert attempt["reasons"] == ["something the layout does not plan is drawn at [48, 0, 60, 8] (stray fit -5.6)."]


def test_generate_shows_critique_reasons_dropped_as_not_about_the_prompt(run, engine):
    engine.enqueue_critique(False, ["missing purple circle"])  # the prompt has no purple circle
    res = run("generate", "a red circle and a blue square", "--out", "o.png", "--seed", 1)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("o.png: accepted after 1 round(s)")  # grounding found both objects
    assert lines[-1] == "  critique reasons dropped (not about the prompt): missing purple circle"
    # the fake planner's labels (`a red circle`) are not plan labels: all three plans fail
    # the check, two are turned down and the first is drawn anyway; the CLI says so
    problem = "a plan item is not `{size} {color} {shape}` with a box"
    assert lines[1:-1] == [f"  plan rejected and redrawn: {problem}"] * 2 + [f"  plan drawn with problems: {problem}"]
    engine.enqueue_critique(False, ["missing purple circle"])
    res = run("generate", "a red circle and a blue square", "--out", "o.png", "--seed", 1, "--json")
    assert [a["dropped_reasons"] for a in json.loads(res.stdout)["attempts"]] == [["missing purple circle"]]


def test_generate_review_plan_reads_a_layout_from_stdin(run, engine):
    layout = '[{"label": "green triangle", "box": [4, 4, 24, 24]}]'
    res = run("generate", "red circle and blue square", "--out", "o.png", "--seed", 1,
              "--review-plan", "--json", input=layout + "\n")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "red circle: [" in res.stderr  # the model's layout is shown first
    data = json.loads(res.stdout)
    assert [p["label"] for p in data["plan"]] == ["green triangle"]
    kept = run("generate", "red circle", "--out", "k.png", "--seed", 1, "--review-plan", "--json", input="\n")
    assert kept.exit_code == 0 and [p["label"] for p in json.loads(kept.stdout)["plan"]] == ["red circle"]


@pytest.mark.parametrize("extra, message", [(["--no-plan"], "drop --no-plan"), (["--batch", "-"], "--batch")])
def test_generate_review_plan_refuses_what_it_cannot_ask(run, extra, message):
    res = run("generate", "red circle", "--out", "o.png", "--review-plan", *extra, input="")
    assert res.exit_code == 2 and message in res.output


def test_generate_review_plan_asks_again_after_a_bad_layout(run, engine):
    layout = '[{"label": "green triangle", "box": [4, 4, 24, 24]}]'
    bad = ['{"label": "x"}', "[1, 2]", '[{"label": "red circle", "box": [30, 30, 10, 10]}]',
           '[{"label": "red circle", "box": [4, 4, 24]}]', '[{"label": " ", "box": [4, 4, 24, 24]}]']
    res = run("generate", "red circle", "--out", "o.png", "--review-plan", "--json",
              input="\n".join(["{oops", *bad, layout]) + "\n")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "not a JSON layout" in res.stderr and "a layout is a list" in res.stderr
    assert res.stderr.count("try again") == 1 + len(bad)
    assert "x1 (10.0) must be >= x0 (30.0)" in res.stderr and "the label is empty" in res.stderr
    assert [p["label"] for p in json.loads(res.stdout)["plan"]] == ["green triangle"]
    assert engine.calls["plan_layout"] == 1  # the plan was not redone
    res = run("generate", "red circle", "--out", "o.png", "--review-plan", input="{oops\n")
    assert res.exit_code != 0 and "not a JSON layout" in res.output  # input ended: stop


def test_edit_json(run, scene, engine):
    triangle = {"label": "green triangle", "box": [40.0, 40.0, 52.0, 52.0]}
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[[8, 8, 24, 24]], keep=[triangle],
                                            layout=[{"label": "blue circle", "box": [8, 8, 24, 24]}]))  # fmt: skip
    res = run("edit", scene, "make it blue", "--out", "e.png", "--seed", 2, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    validate(data, SCHEMAS["edit"])
    assert data["image"] == str(scene) and data["seed"] == 2 and data["step"] == 0
    assert data["keep"] == [triangle]  # what every attempt was checked to leave alone
    assert data["absent"] == []  # no caption read: nothing said absent
    assert load_image("e.png").shape == (32, 64, 3)  # the 128 x 64 input's shape: no letterbox bars
    res = run("edit", scene, "make it blue", "--out", "f.png", "--seed", 2)  # the line names the run
    assert res.exit_code == 0 and f", run {data['run_id']}, session " not in res.stdout  # (a new one)
    run_id = res.stdout.split(", run ")[1].split(",")[0]
    assert run("trace", run_id, "--json").exit_code == 0


def test_an_edit_that_is_not_verified_says_why(run, scene, engine):
    """The line under an unverified edit gives the kept attempt's reasons and, for an object
    the image was read not to hold, the caption that reading came from."""
    caption = "a small red circle on a black background"
    engine.enqueue_edit_plan(EditPlanResult(targets=["the blue circle"], target_boxes=[[20, 20, 60, 40]],
                                            caption=caption))  # fmt: skip
    engine.enqueue_ground([[20.0, 20.0, 60.0, 40.0]])  # grounding puts it on the red circle
    engine.enqueue_fit([-7.0])  # where the model reads a look-alike
    res = run("edit", scene, "remove the blue circle", "--out", "e.png", "--rounds", 1)
    assert res.exit_code == 0, res.output
    first, why, read = res.stdout.splitlines()
    assert "not verified (best attempt kept)" in first
    assert why.startswith("  why: ")
    assert "The source image holds no blue circle: the edit could only act on a look-alike." in why
    assert read == f"  the model read the image as: {caption}"


def test_session_show_marks_the_current_step_when_two_branches_made_its_image(run, scene, engine):
    """Two branches whose step 0 drew the same image from the same input (two instructions):
    both steps are listed, and the one that made the current image is marked."""
    sid = run("session", "start", scene).stdout.strip()
    blue = {"label": "blue square", "box": [8.0, 8.0, 24.0, 24.0]}
    for k, instruction in enumerate(("add a blue square", "put a blue square at the top left")):
        if k:
            assert run("session", "undo", sid).exit_code == 0
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[blue["box"]], layout=[blue]))
        assert run("session", "edit", sid, instruction, "--out", f"{k}.png", "--rounds", 1).exit_code == 0
    assert np.array_equal(load_image("0.png"), load_image("1.png"))  # the same image twice
    shown = run("session", "show", sid).stdout.splitlines()[1:]
    assert len(shown) == 2 and [line[0] for line in shown].count("*") == 1
    assert next(line for line in shown if line.startswith("*")).endswith("put a blue square at the top left")


def test_a_session_without_an_image_is_shown_and_not_undone(run, scene, engine):
    """A one-shot edit stopped before it committed leaves a session with no image yet."""
    from lavida_agent.api import LavidaAgent
    from lavida_agent.traces import load_trace
    from tests.fakes import intercept

    with LavidaAgent(engine=engine, num_steps=2) as agent:
        cancel = threading.Event()
        intercept(engine, "edit", 1, cancel.set)
        with pytest.raises(Exception) as stopped:
            agent.edit(load_image(scene), "add a blue square", seed=1, cancel=cancel)
        sid = load_trace(stopped.value.run_id, agent.settings.runs_dir).thread_id
        assert agent.session(sid).current is None
    res = run("session", "show", sid)
    assert res.exit_code == 0 and "current none (no image yet)" in res.stdout
    res = run("session", "undo", sid)
    assert res.exit_code == 1 and "nothing to undo: the session has no image yet" in res.stderr


def test_session_history_of_a_session_without_edits_says_so(run, scene):
    sid = run("session", "start", scene).stdout.strip()
    res = run("session", "history", sid)
    assert res.exit_code == 0 and res.stdout == ""  # one line per step: none
    assert "no edit made the current image: it is the session's input" in res.stderr


def test_ground_ask_and_critique_write_their_trace_pages_too(run, scene, tmp_path):
    for args in (("ground", scene, "red circle"), ("ask", scene, "what color is the circle?"),
                 ("critique", scene, "a red circle")):  # fmt: skip
        page = tmp_path / f"{args[0]}.html"
        res = run(*args, "--trace-html", page, "--json")
        assert res.exit_code == 0, res.output
        run_id = json.loads(res.stdout)["run_id"]
        assert run_id in page.read_text() and "<img" in page.read_text(), args[0]
    res = run("ask", scene, "what?", "--trace-html", scene)
    assert res.exit_code == 1 and "--trace-html" in res.output  # never over the input


def test_an_upscale_that_would_fill_the_memory_is_a_usage_error(run, engine):
    for args in (("generate", "a red circle", "--out", "o.png", "--preview-scale", 1000),
                 ("trace", "some-run", "--scale", 129)):  # fmt: skip
        res = run(*args)
        assert res.exit_code == 2 and "range 1<=x<=128" in res.output, res.output
    assert not engine.log  # refused before anything ran


def test_ground_json_in_input_pixels(run, scene):
    res = run("ground", scene, "red circle", "green triangle", "--json", "--out", "boxes.png")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    validate(data, SCHEMAS["ground"])
    assert data["boxes"][0] == [20.0, 20.0, 60.0, 40.0] and data["boxes"][1] == [0, 0, 0, 0]
    assert load_image("boxes.png").shape == (64, 128, 3)
    human = run("ground", scene, "red circle", "green triangle")
    assert human.stdout.splitlines() == ["red circle\t20 20 60 40", "green triangle\tnot found"]


def test_ground_says_which_boxes_came_from_the_perceived_scene(run, scene, engine):
    engine.enqueue_answer("a small red circle and a small blue circle on a white background")
    engine.enqueue_ground([[10.0, 26.0, 30.0, 36.0], [40.0, 26.0, 52.0, 38.0]])
    engine.enqueue_ground([[40.0, 26.0, 52.0, 38.0]])  # the model's own box: the wrong circle
    res = run("ground", scene, "the circle on the left")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        "the circle on the left\t20 20 60 40\t(the object it picks out of the perceived scene)"
    ]


def test_ground_says_which_referents_are_not_in_the_image(run, scene, engine):
    """The caption has one red circle; `the blue square`, boxed elsewhere, is read there as
    a look-alike: said absent, its box given as the nearest look-alike and not drawn."""
    for _ in range(2):
        engine.enqueue_answer("a small red circle on a white background")
        engine.enqueue_ground([[10.0, 26.0, 30.0, 36.0]])
        engine.enqueue_ground([[10.0, 26.0, 30.0, 36.0], [40.0, 20.0, 52.0, 32.0]])
        engine.enqueue_fit([0.0, -1.0])  # the square's own box against the circle's: it stays
        engine.enqueue_fit([-8.0])  # the square's noun at its box: a look-alike wins
    res = run("ground", scene, "the red circle", "the blue square")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["the red circle\t20 20 60 40",
                                       "the blue square\tnot in the image\t(nearest look-alike: 80 8 104 32)"]  # fmt: skip
    res = run("ground", scene, "the red circle", "the blue square", "--json", "--out", "b.png")
    data = json.loads(res.stdout)
    assert data["present"] == [True, False] and data["boxes"][1] == [80.0, 8.0, 104.0, 32.0]
    drawn, plain = load_image("b.png"), load_image(scene)
    assert (drawn[20:40, 20:60] != plain[20:40, 20:60]).any()  # the circle's box is drawn
    assert (drawn[8:32, 80:104] == plain[8:32, 80:104]).all()  # the absent square's is not


def test_ask_json(run, scene, engine):
    engine.enqueue_answer("one")
    res = run("ask", scene, "how many shapes?", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    validate(data, SCHEMAS["ask"])
    assert data["answer"] == "one"
    engine.enqueue_answer("one")
    assert run("ask", scene, "how many?").stdout == "one\n"


def test_critique_reads_the_prompt_off_the_perceived_scene(run, scene, engine):
    engine.enqueue_answer("a large red circle on a white background")
    engine.enqueue_ground([[20.0, 20.0, 40.0, 40.0]])
    res = run("critique", scene, "a red circle and a blue square", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    validate(data, SCHEMAS["critique"])
    assert (data["verdict"], data["reasons"], data["judged_by"]) == ("reject", ["missing blue square"], "scene")
    assert data["caption"] == "a large red circle on a white background"
    engine.enqueue_answer("a large red circle on a white background")
    engine.enqueue_ground([[20.0, 20.0, 40.0, 40.0]])
    res = run("critique", scene, "a red circle and a blue square")
    assert res.stdout == "reject\t(read off the scene the model perceived)\n  - missing blue square\n"
    engine.enqueue_critique(True)  # outside the grammar: the model's critique answers
    assert run("critique", scene, "a cat").stdout == "accept\t(the model's critique)\n"


def test_critique_batch_with_a_bad_line(run, scene, engine):
    lines = [{"image": str(scene), "prompt": "a cat"}, {"image": "nope.png", "prompt": "a cat"},
             {"image": str(scene)}]  # fmt: skip
    res = run("critique", "--batch", "-", input="\n".join(json.dumps(x) for x in lines))
    assert res.exit_code == 1
    out = [json.loads(x) for x in res.stdout.splitlines()]
    validate(out[0], SCHEMAS["critique"])
    assert "no such image" in out[1]["error"] and out[2] == {"error": "missing key(s): prompt", "line": 3}


# -- batch -----------------------------------------------------------------------------------


def test_generate_batch_with_a_bad_line(run, tmp_path):
    lines = [
        {"prompt": "red circle", "out": "a.png", "seed": 1},
        "this is not json",
        {"prompt": "blue square"},  # missing out
        {"prompt": "x", "out": "x.png", "colour": "red"},  # unknown key
        {"prompt": "green triangle", "out": "c.png", "plan": False},
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n"
    (tmp_path / "jobs.jsonl").write_text(text)
    res = run("generate", "--batch", "jobs.jsonl", "--steps", 2)
    assert res.exit_code == 1
    out = [json.loads(x) for x in res.stdout.splitlines()]
    assert len(out) == 5
    validate(out[0], SCHEMAS["generate"])
    validate(out[4], SCHEMAS["generate"])
    assert out[0]["seed"] == 1 and out[4]["plan"] == []
    assert out[1] == {"error": "invalid JSON at column 1: Expecting value", "line": 2}
    assert out[2] == {"error": "missing key(s): out", "line": 3}
    assert "unknown key(s): colour" in out[3]["error"]
    assert (tmp_path / "a.png").is_file() and (tmp_path / "c.png").is_file()
    assert "Error: 3 of 5 line(s) failed" in res.stderr


def test_a_batch_whose_model_cannot_load_says_so_on_every_line(tmp_path, monkeypatch):
    """The model loads with the first line that needs it: a load error is each line's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_mod, "ENGINE_FACTORY", None)
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a red circle", "out": "a.png"}\nnot json\n')
    res = CliRunner().invoke(cli, ["--model", str(tmp_path / "none"), "generate", "--batch", "jobs.jsonl"])
    assert res.exit_code == 1
    assert [json.loads(x) for x in res.stdout.splitlines()] == [
        {"error": f"no checkpoint at '{tmp_path / 'none'}'", "line": 1},
        {"error": "invalid JSON at column 1: Expecting value", "line": 2}]


@pytest.mark.parametrize("line, message", [
    ({"rounds": "2"}, "rounds must be an integer >= 1, got '2'"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"seed": True}, "seed must be an integer >= 0, got True"),
    ({"seed": 2**64 - 1}, "seed must be an integer in [0, 2**63)"),
    ({"plan": "yes"}, "plan must be true, false or a list"),
    ({"plan": [{"label": "red circle", "box": [9, 9, 1, 1]}]}, "layout item 0"),
    ({"prompt": 7}, "prompt must be a string, got 7"),
])  # fmt: skip
def test_a_batch_line_with_a_bad_value_names_it(run, tmp_path, engine, line, message):
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "red circle", "out": "a.png", **line}) + "\n")
    res = run("generate", "--batch", "jobs.jsonl")
    (out,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert res.exit_code == 1 and message in out["error"] and out["line"] == 1
    assert sum(engine.calls.values()) == 0 and not (tmp_path / "a.png").exists()


def test_a_seed_beyond_64_bits_is_a_usage_error(run, engine):
    res = run("generate", "red circle", "--out", "a.png", "--seed", 2**64 - 1)
    assert res.exit_code == 2 and "--seed" in res.output and sum(engine.calls.values()) == 0


def test_ground_ask_edit_batches_from_stdin(run, scene, engine):
    text = json.dumps({"image": str(scene), "expressions": ["red circle"]}) + "\n"
    res = run("ground", "--batch", "-", input=text + text)
    assert res.exit_code == 0, res.output
    out = [json.loads(x) for x in res.stdout.splitlines()]
    assert [o["boxes"] for o in out] == [[[20.0, 20.0, 60.0, 40.0]]] * 2
    res = run("ask", "--batch", "-", input=json.dumps({"image": "nope.png", "question": "q"}))
    assert res.exit_code == 1 and "no such image" in json.loads(res.stdout)["error"]
    job = {"image": str(scene), "instruction": "noop", "out": "e.png", "seed": 1}
    res = run("edit", "--batch", "-", "--workers", 2, input=json.dumps(job))
    assert res.exit_code == 0, res.output
    validate(json.loads(res.stdout), SCHEMAS["edit"])


@pytest.mark.parametrize("args, named", [
    (["generate", "red circle", "--out", "o.png"], "drop PROMPT, --out"),
    (["generate", "--trace-html", "t.html"], "drop --trace-html"),
    (["edit", "in.png", "make it red"], "drop IMAGE, INSTRUCTION"),
    (["ground", "in.png", "the circle"], "drop IMAGE, EXPRESSION"),
    (["ask", "in.png"], "drop IMAGE"),
    (["critique", "in.png", "a red circle"], "drop IMAGE, PROMPT"),
])  # fmt: skip
def test_batch_refuses_single_run_inputs_it_would_ignore(run, engine, args, named):
    res = run(*args, "--batch", "-", input="")
    assert res.exit_code == 2 and named in res.output
    assert sum(engine.calls.values()) == 0


# -- errors ----------------------------------------------------------------------------------


def test_errors_are_one_line_with_non_zero_exit(run):
    res = run("ask", "missing.png", "q")
    assert res.exit_code == 1
    assert res.stderr == "Error: no such image file: 'missing.png'\n" and res.stdout == ""
    res = run("generate", "red circle")  # no --out
    assert res.exit_code == 2 and "generate needs PROMPT and --out" in res.stderr
    res = run("generate", "x", "--out", "o.png", "--rounds", 0)
    assert res.exit_code == 2


def test_debug_shows_the_exception(run):
    res = run("--debug", "ask", "missing.png", "q")
    assert res.exit_code == 1 and isinstance(res.exception, InvalidInputError)
    res = run("ask", "missing.png", "q", "--debug")
    assert isinstance(res.exception, InvalidInputError)


def test_unexpected_errors_are_one_line_too(run, engine, monkeypatch):
    monkeypatch.setattr(engine, "answer", lambda *a, **k: 1 / 0)
    save_image(np.zeros((8, 8, 3), np.uint8), "x.png")
    res = run("ask", "x.png", "q")
    assert res.exit_code == 1
    (line,) = res.stderr.splitlines()
    assert line.startswith("Error: understand failed in node 'answer_question'")
    assert "lavida-agent trace" in line and "Traceback" not in res.output
    res = run("ask", "x.png", "q", "--json")  # and as JSON on stdout, with the run to look at
    err = json.loads(res.stdout)
    assert res.exit_code == 1 and err["error"].startswith("understand failed in node 'answer_question'")
    assert f"lavida-agent trace {err['run_id']}" in res.stderr and "lavida-agent trace" not in err["error"]


def test_json_errors_reach_stdout_on_every_command_with_json(run):
    for args in (["ask", "missing.png", "q"], ["ground", "missing.png", "the circle"],
                 ["critique", "missing.png", "a red circle"], ["session", "show", "no-such-session"],
                 ["world", "detect", "missing.png"], ["model", "info", "no-such-folder"]):
        res = run(*args, "--json")
        assert res.exit_code == 1 and "error" in json.loads(res.stdout), args
        assert res.stderr.startswith("Error: ")  # people still read the one line


def test_a_usage_error_with_json_is_json_on_stdout_too(run):
    """click refuses `--seed -1` before it reads `--json`: the error still reaches stdout."""
    res = run("generate", "red circle", "--out", "o.png", "--seed", -1, "--json")
    assert res.exit_code == 2 and "'--seed'" in json.loads(res.stdout)["error"]
    res = run("generate", "red circle", "--out", "o.png", "--seed", -1)
    assert res.exit_code == 2 and res.stdout == ""  # without --json, stdout stays empty


def test_a_json_result_already_printed_is_not_followed_by_an_error_document(run, monkeypatch):
    import lavida_agent.traces

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(lavida_agent.traces, "render_html", disk_full)  # the page fails after the run
    res = run("generate", "red circle", "--out", "o.png", "--json", "--trace-html", "t.html")
    assert res.exit_code == 1 and res.stderr.startswith("Error: ") and "No space left" in res.stderr
    assert "error" not in json.loads(res.stdout)  # stdout stays one JSON document: the result


# -- sessions and traces -----------------------------------------------------------------------


def test_batch_lines_naming_one_out_file_and_a_leading_byte_order_mark(run, tmp_path):
    lines = ['\ufeff{"prompt": "red circle", "out": "b/one.png", "seed": 1}',
             '{"prompt": "blue square", "out": "b/two.png"}', '{"prompt": "green circle", "out": "b/one.png"}']
    (tmp_path / "gen.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = run("generate", "--batch", "gen.jsonl", "--steps", 2, "--workers", 2)
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert res.exit_code == 1 and [("error" in o) for o in out] == [False, False, True]
    assert "is also line 1's" in out[2]["error"] and out[0]["prompt"] == "red circle"


def test_nothing_is_written_over_the_input_or_left_behind_by_a_failed_command(run, scene, tmp_path):
    before = scene.read_bytes()
    res = run("edit", scene, "make it blue", "--out", "o.png", "--trace-html", scene)
    assert res.exit_code == 1 and "names the input image" in res.output
    res = run("ground", scene, "the red circle", "--out", scene)
    assert res.exit_code == 1 and "names the input image" in res.output and scene.read_bytes() == before
    res = run("edit", "nofile.png", "make it red", "--out", "newdir/sub/e.png")
    assert res.exit_code == 1 and not (tmp_path / "newdir").exists()


def test_session_commands(run, scene, tmp_path):
    res = run("session", "start", scene)
    assert res.exit_code == 0, res.output
    sid = res.stdout.strip()
    for i, instruction in enumerate(["make it blue", "make it green"]):
        res = run("session", "edit", sid, instruction, "--out", f"s{i}.png", "--seed", i,
                  "--json")  # fmt: skip
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        assert data["session"] == sid and data["step"] == i
    hist = json.loads(run("session", "history", sid, "--json").stdout)
    assert [s["instruction"] for s in hist["steps"]] == ["make it blue", "make it green"]
    said = run("session", "edit", sid, "make it red", "--out", "s2.png", "--seed", 2).stdout
    last = json.loads(run("session", "history", sid, "--json").stdout)["steps"][-1]
    assert said.startswith(f"s2.png: turn {last['turn']} ") and last["turn"] == 2  # as history numbers it
    assert f"(undo: lavida-agent session undo {sid})" in said
    assert run("session", "undo", sid).exit_code == 0
    undo = json.loads(run("session", "undo", sid, "--json", "--out", "u.png").stdout)
    assert undo["step"] == 0 and load_image(tmp_path / "u.png").shape == (32, 64, 3)  # the input's shape, as edit
    redo = run("session", "redo", sid)
    assert redo.exit_code == 0 and redo.stdout.strip() == "current step: 1"
    assert run("session", "undo", sid).stdout.strip() == "current step: 0"
    assert run("session", "undo", sid).stdout.strip() == "current step: none (the input image)"
    assert run("session", "redo", sid).stdout.strip() == "current step: 0"
    assert run("session", "redo", sid).stdout.strip() == "current step: 1"  # redo walks on
    assert run("session", "undo", sid).stdout.strip() == "current step: 0"
    branch = run("session", "branch", sid, 0)  # steps of the current branch only
    assert branch.exit_code == 0 and branch.stdout.strip() == "current step: 0"
    show = json.loads(run("session", "show", sid, "--json").stdout)
    assert show["step"] == 0 and show["steps"] == 1 and show["lineage"]["edges"]
    res = run("session", "edit", "no-such-session", "x", "--out", "o.png")
    assert res.exit_code == 1 and "no session 'no-such-session'" in res.stderr
    res = run("session", "branch", sid, 9)
    assert res.exit_code == 1 and res.stderr.startswith("Error: no step 9")
    # step 1 ("make it green") is on the branch left behind: --image finds it there
    green = next(e["target"] for e in show["lineage"]["edges"] if e["instruction"] == "make it green")
    assert "session branch" in run("session", "show", sid).stderr  # says how
    res = run("session", "branch", sid, 1)  # step 1 is on the other branch only
    assert res.exit_code == 1 and "no step 1 on the current branch" in res.stderr and "--image" in res.stderr
    moved = json.loads(run("session", "branch", sid, 1, "--image", green[:10], "--json").stdout)
    assert moved["step"] == 1 and green in moved["current"]
    shown = run("session", "show", sid).stdout.splitlines()[1:]
    assert [line[0] for line in shown].count("*") == 1  # the current image's step, marked
    starred = next(line for line in shown if line.startswith("*"))
    assert f"-> {green[:10]}  #1 " in starred and starred.endswith("make it green")
    res = run("session", "branch", sid, 1, "--image", "0" * 10)
    assert res.exit_code == 1 and f"no step 1 with image '{'0' * 10}'" in res.stderr
    for bad in ("", "ab", "xyz!"):
        res = run("session", "branch", sid, 1, "--image", bad)
        assert res.exit_code == 1 and "a prefix of one (4 or more hex digits)" in res.stderr
    assert json.loads(run("session", "branch", sid, 1, "--image", green[:10].upper(), "--json").stdout)["step"] == 1
    assert run("session", "undo", sid).stdout.strip() == "current step: 0"
    for command in (["edit", sid, "make it red"], ["undo", sid], ["redo", sid], ["branch", sid, 0]):
        res = run("session", *command, "--out", "bad.xyz")  # refused before the state changes
        assert res.exit_code == 1 and "unknown file extension '.xyz'" in res.stderr
    assert json.loads(run("session", "show", sid, "--json").stdout)["steps"] == 1


def test_an_output_pillow_cannot_write_is_refused_before_the_run(run, scene, engine, tmp_path):
    for args in (["generate", "red circle"], ["edit", scene, "make it blue"], ["ground", scene, "red circle"]):
        res = run(*args, "--out", "result.xyz", "--json")
        assert res.exit_code == 1 and "cannot save an image to 'result.xyz'" in res.stderr, res.output
    assert sum(engine.calls.values()) == 0 and not list(tmp_path.glob("result*"))


def test_a_path_no_file_can_be_written_at_is_refused_before_the_run(run, scene, engine, tmp_path):
    """A folder, or a place where no file can be created (under a file), is said before the
    run (and before a session commits a turn), not found when the image is written."""
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "afile").write_text("")
    for out, said in (("adir.png", "adir.png"), ("afile/o.png", "--out: cannot write a file at 'afile/o.png'")):
        for args in (["generate", "red circle"], ["edit", scene, "make it blue"], ["ground", scene, "red circle"]):
            res = run(*args, "--out", out, "--json")
            assert res.exit_code in (1, 2) and said in res.stderr, res.output
    res = run("generate", "red circle", "--out", "o.png", "--trace-html", "afile/t.html")
    assert res.exit_code == 1 and "--trace-html: cannot write a file at" in res.stderr
    res = run("generate", "red circle", "--out", "o.png", "--trace-html", "./o.png")
    assert res.exit_code == 1 and "--trace-html and --out name the same file" in res.stderr
    assert sum(engine.calls.values()) == 0 and not (tmp_path / "o.png").exists()
    sid = json.loads(run("session", "start", scene, "--json").stdout)["session"]
    res = run("session", "edit", sid, "make it blue", "--out", "afile/o.png")
    assert res.exit_code == 1 and "cannot write a file at" in res.stderr
    assert json.loads(run("session", "show", sid, "--json").stdout)["steps"] == 0  # nothing committed
    res = run("trace", "deadbeef", "--out", "afile/t.html")
    assert res.exit_code == 1 and "cannot write a file at" in res.stderr


def test_trace_command_renders_html(run, scene, tmp_path):
    run_id = json.loads(run("ask", scene, "q", "--json").stdout)["run_id"]
    res = run("trace", run_id, "--out", "page.html")
    assert res.exit_code == 0, res.output
    page = (tmp_path / "page.html").read_text()
    assert page.count("<img") == 1 and "http://" not in page and "https://" not in page
    assert json.loads(run("trace", run_id, "--json").stdout)["run_id"] == run_id
    assert run("trace", run_id, "--json", "--out", "t.json").exit_code == 0
    assert json.loads((tmp_path / "t.json").read_text())["run_id"] == run_id
    res = run("trace", "deadbeef")
    assert res.exit_code == 1 and "no trace for run 'deadbeef'" in res.stderr
    thread = json.loads(run("trace", run_id, "--json").stdout)["thread_id"]
    res = run("trace", thread)  # a session's (thread's) id: its runs are named
    assert res.exit_code == 1 and f"'{thread}' is a session (thread), not a run" in res.stderr
    assert f"are {run_id}; trace one of them" in res.stderr


# -- model, bench, train, serve ----------------------------------------------------------------


def test_global_model_option_reaches_the_settings(run, engine, tmp_path):
    res = run("--model", tmp_path / "ckpt", "--home", tmp_path / "h", "generate", "x",
              "--out", "o.png", "--seed", 0)  # fmt: skip
    assert res.exit_code == 0, res.output
    (settings,) = engine.settings_seen
    assert settings.model_path == str(tmp_path / "ckpt") and settings.home == tmp_path / "h"


def test_bench_and_train_call_the_modules(run, monkeypatch):
    calls = []

    def fake_import(module, what):
        def run_(**kwargs):
            calls.append((module, kwargs))
            return {"ok": True}

        def main(argv, prog, **kwargs):
            calls.append((module, argv, prog, *kwargs.values()))
            return 0

        return types.SimpleNamespace(run=run_, main=main)

    monkeypatch.setattr(cli_mod, "_import", fake_import)
    assert json.loads(run("bench", "speed", "--quick", "--out", "b").stdout) == {"ok": True}
    assert run("bench", "quality", "--quick").exit_code == 0
    assert run("train", "vq", "--steps", "5", "--help").exit_code == 0
    assert run("train", "model", "--config", "c.json").exit_code == 0
    assert run("--quiet", "train", "model", "--out", "r").exit_code == 0  # no bars there either
    assert calls[0] == ("lavida_agent.benchmarks.speed_model", {"out_dir": "b", "quick": True})
    module, argv, prog, default_out = calls[1]
    assert module == "lavida_agent.benchmarks.quality" and prog == "lavida-agent bench quality"
    assert argv == ["--quick"] and default_out.endswith("bench/quality")  # HOME/bench/quality
    assert calls[2] == ("lavida_agent.model.training_vq", ["--steps", "5", "--help"], "lavida-agent train vq")
    assert calls[3] == ("lavida_agent.model.training", ["--config", "c.json"], "lavida-agent train model")
    assert calls[4] == ("lavida_agent.model.training", ["--out", "r", "--quiet"], "lavida-agent train model")
    # the benchmark's own options pass through; --out, the model and the device are given once
    assert run("--model", "m", "--device", "cpu", "-q", "bench", "quality", "--suites", "session", "-o", "x").exit_code == 0
    assert calls[5][1] == ["--model-path", "m", "--device", "cpu", "--suites", "session", "-o", "x", "--quiet"]


def test_bench_quality_takes_debug_and_says_errors_as_json(run):
    """`--debug` after the command is the CLI's own (not the benchmark's); with `--json` a bad
    option is a JSON error on stdout, before any model loads."""
    res = run("bench", "quality", "--n", "0", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["error"].startswith("ValueError: n, batch_size")
    res = run("bench", "quality", "--n", "0", "--debug")
    assert isinstance(res.exception, ValueError)  # the traceback is not turned into a message


def test_serve_binds_loopback_and_applies_the_key(run, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: served.update(app=app, host=host, port=port))
    res = run("serve", "--port", 9123, "--api-key", "sekret")
    assert res.exit_code == 0, res.output
    assert (served["host"], served["port"]) == ("127.0.0.1", 9123)
    client = TestClient(served["app"])
    assert client.get("/healthz").status_code == 200
    denied = client.post("/v1/generate", json={"prompt": "a red circle"})
    assert denied.status_code == 401 and denied.json()["error"]["code"]


def test_help_lists_every_command(run):
    res = run("--help")
    for name in ("generate", "edit", "ground", "ask", "critique", "session", "trace", "bench",
                 "train", "serve", "mcp", "resume", "world"):  # fmt: skip
        assert name in res.stdout


def test_mcp_serves_stdio_on_the_cli_agent(run, engine, monkeypatch):
    pytest.importorskip("mcp")
    from mcp.server import MCPServer

    served = {}
    monkeypatch.setattr(MCPServer, "run", lambda self, transport: served.update(server=self,
                                                                                transport=transport))
    res = run("mcp")
    assert res.exit_code == 0, res.output
    assert served["transport"] == "stdio" and served["server"].name == "lavida-agent"


def test_serve_and_mcp_without_the_mcp_sdk(run, monkeypatch):
    """Without the optional SDK, `mcp` says how to install it and `serve` runs without /mcp."""
    import sys

    import uvicorn
    from fastapi.testclient import TestClient

    for name in ("mcp", "mcp_types"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails
    monkeypatch.delitem(sys.modules, "lavida_agent.mcp_server", raising=False)
    res = run("mcp")
    assert res.exit_code == 1 and "pip install 'lavida-agent[mcp]'" in res.output
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: served.update(app=app))
    assert run("serve").exit_code == 0
    assert TestClient(served["app"]).post("/mcp", json={}).status_code == 404


def test_train_blend_reports_bad_input_as_a_one_line_error(run, tmp_path, monkeypatch):
    import types

    import lavida_agent.cli as cli_mod

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run("train", "blend", "a", "b", "--weight", "2", "--out", "c").exit_code == 2  # usage: out of range

    assert run("train", "blend", "a", "b", "--part", "vision", "--out", "c").exit_code == 2  # usage: no such part

    def refuse(base, other, weight, dest, part):
        raise ValueError("b differs from a outside the understanding parameters")

    monkeypatch.setattr(cli_mod, "_import", lambda module, what: types.SimpleNamespace(blend_part=refuse))
    result = run("train", "blend", "a", "b", "--out", "c")
    assert result.exit_code != 0 and "outside the understanding parameters" in result.output
    monkeypatch.setattr(cli_mod, "_import", lambda module, what: types.SimpleNamespace(
        blend_part=lambda base, other, weight, dest, part: tmp_path / dest))  # fmt: skip
    out = json.loads(run("train", "blend", "a", "b", "--weight", "0.25", "--part", "generation", "--out", "c").stdout)
    assert (out["weight"], out["part"]) == (0.25, "generation")


def test_train_drawer_and_planner_report_bad_input_as_a_one_line_error(run, tmp_path, monkeypatch):
    import types

    import lavida_agent.cli as cli_mod

    (tmp_path / "a").mkdir()
    assert run("train", "drawer", "a", "missing", "--for", "edit", "--out", "c").exit_code == 2  # no such folder
    (tmp_path / "b").mkdir()
    assert run("train", "drawer", "a", "b", "--for", "ground", "--out", "c").exit_code == 2  # no such kind

    def refuse(base, drawer, dest, kind, defaults=None, rank=None):
        raise ValueError("b differs from a outside the generation parameters")

    monkeypatch.setattr(cli_mod, "_import", lambda module, what: types.SimpleNamespace(attach_weights=refuse))
    result = run("train", "drawer", "a", "b", "--for", "unplanned", "--out", "c")
    assert result.exit_code == 1 and "outside the generation parameters" in result.output
    calls = []
    monkeypatch.setattr(cli_mod, "_import", lambda module, what: types.SimpleNamespace(
        attach_weights=lambda base, drawer, dest, kind, **kw: calls.append(kind) or tmp_path / dest))  # fmt: skip
    out = json.loads(run("train", "drawer", "a", "b", "--for", "edit", "--out", "c").stdout)
    assert out["edit_drawer"] == "b" and out["out"].endswith("c") and calls == ["edit"]
    out = json.loads(run("train", "planner", "a", "b", "--for", "edit", "--out", "d").stdout)
    assert out["edit_planner"] == "b" and out["out"].endswith("d") and calls == ["edit", "edit_plan"]
    out = json.loads(run("train", "drawer", "a", "b", "--for", "edit-regions", "--out", "e").stdout)
    assert out["edit_regions_drawer"] == "b" and calls[-1] == "edit_regions"
    assert run("train", "planner", "a", "b", "--for", "unplanned", "--out", "d").exit_code == 2  # no such kind
    given = []
    monkeypatch.setattr(cli_mod, "_import", lambda module, what: types.SimpleNamespace(
        attach_weights=lambda base, drawer, dest, kind, **kw: given.append(kw) or tmp_path / dest))  # fmt: skip
    assert run("train", "planner", "a", "b", "--for", "edit", "--first-step", "--out", "d").exit_code == 0
    assert run("train", "planner", "a", "b", "--for", "edit", "--out", "d").exit_code == 0
    assert given == [{"defaults": {"edit_planner_first_step": True}, "rank": None}, {"defaults": None, "rank": None}]
    given.clear()
    out = json.loads(run("train", "reader", "a", "b", "--out", "f", "--rank", "16").stdout)
    assert out["reader"] == "b" and out["out"].endswith("f") and given == [{"defaults": None, "rank": 16}]
    assert run("train", "reader", "a", "b", "--out", "f", "--rank", "0").exit_code == 2  # a rank is >= 1
    assert run("train", "drawer", "a", "b", "--for", "edit", "--out", "c", "--rank", "8").exit_code == 0
    assert given[-1] == {"defaults": None, "rank": 8}


def test_train_export_writes_a_runs_checkpoint_or_says_why_not(run, tmp_path, monkeypatch):
    import types

    import lavida_agent.cli as cli_mod

    assert run("train", "export", "missing", "--out", "c").exit_code == 2  # no such folder
    (tmp_path / "r").mkdir()

    def refuse(run_dir, dest):
        raise ValueError("r is not a training run folder with a checkpoint (no state.pt)")

    monkeypatch.setattr(cli_mod, "_import", lambda module, what: types.SimpleNamespace(export_checkpoint=refuse))
    result = run("train", "export", "r", "--out", "c")
    assert result.exit_code == 1 and "no state.pt" in result.output
    monkeypatch.setattr(cli_mod, "_import", lambda module, what: types.SimpleNamespace(
        export_checkpoint=lambda run_dir, dest: {"step": 250, "export": str(tmp_path / dest)}))  # fmt: skip
    out = json.loads(run("train", "export", "r", "--out", "c").stdout)
    assert out["run"] == "r" and out["step"] == 250 and out["export"].endswith("c")


def test_a_closed_pipe_ends_quietly():
    group = cli_mod._LavidaGroup("g")

    @group.command("show")
    def show():
        raise BrokenPipeError(32, "Broken pipe")  # the reader went away: `... | head -1`

    @group.command("fail")
    def fail():
        raise RuntimeError("boom")

    res = CliRunner().invoke(group, ["show"])
    assert res.exit_code == 1 and "Error" not in res.output
    res = CliRunner().invoke(group, ["fail"])  # any other error is still one line
    assert res.exit_code == 1 and "Error: RuntimeError: boom" in res.output


def test_review_plan_at_the_end_of_input_says_so(run, engine):
    res = run("generate", "red circle", "--out", "o.png", "--review-plan", input="")
    assert res.exit_code == 1 and "--review-plan: no answer (the input ended" in res.stderr
    assert engine.calls["generate"] == 0


def test_a_batch_line_cut_short_names_its_own_line_and_column(run, tmp_path):
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "red circle", "out": "a.png"}\n\n{"out": "b.png", "prompt": 42\n')
    res = run("generate", "--batch", "jobs.jsonl", "--steps", 2)
    out = [json.loads(x) for x in res.stdout.splitlines()]
    assert out[1] == {"error": "invalid JSON at column 30: Expecting ',' delimiter", "line": 3}


@pytest.mark.parametrize("args, where", [(["serve", "--home", "x"], "serve"),
                                         (["session", "undo", "s1", "--model", "m"], "session undo")])
def test_a_global_option_after_the_command_says_where_it_goes(args, where):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2
    option = args[-2]
    assert f"{option} is an option of lavida-agent itself: put it before the command " \
           f"(lavida-agent {option} ... {where} ...)" in res.output  # fmt: skip


def test_workers_needs_a_batch_and_home_must_be_a_folder(run, scene, tmp_path):
    res = run("ask", scene, "is there a circle?", "--workers", 4)
    assert res.exit_code == 2 and "--workers runs the lines of a --batch file" in res.output
    res = run("--home", scene, "runs")
    assert res.exit_code != 0 and "is a file; it must be a folder" in res.output
