"""The ComfyUI nodes (`lavida_agent.comfyui`) on a `FakeEngine`: ComfyUI's node contract,
images as `[B, H, W, C]` tensors, sessions, masks, progress and Cancel (ComfyUI's `comfy`
modules faked), and `lavida-agent comfyui install`."""

from __future__ import annotations

import inspect
import json
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lavida_agent.cli as cli_mod
from lavida_agent import comfyui
from lavida_agent.errors import GenerationCancelled
from lavida_agent.graphs.state import EditState
from lavida_agent.settings import SEED_LIMIT
from lavida_agent.traces import recent_runs
from tests.fakes import draw

PROMPT = "a red circle and a blue square"
RED = {"label": "red circle", "box": [8.0, 8.0, 24.0, 24.0]}
BLUE = {"label": "blue square", "box": [36.0, 36.0, 52.0, 52.0]}
COMFY_TYPES = {"IMAGE", "MASK", "STRING", "INT", "BOOLEAN"}


@pytest.fixture(autouse=True)
def nodes_use(agent):
    comfyui.use_agent(agent)
    yield
    comfyui.use_agent(None)


def _tensor(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)


def _scene() -> np.ndarray:
    return draw(np.zeros((64, 64, 3), np.uint8), [RED, BLUE])


@pytest.mark.parametrize("name", sorted(comfyui.NODE_CLASS_MAPPINGS))
def test_each_node_keeps_comfyuis_contract(name):
    """What ComfyUI reads off a node class: inputs as `(TYPE, options)`, outputs, a display
    name, and a FUNCTION that takes exactly the inputs (ComfyUI calls it with them as
    keywords)."""
    node = comfyui.NODE_CLASS_MAPPINGS[name]
    assert name in comfyui.NODE_DISPLAY_NAME_MAPPINGS and node.CATEGORY == "lavida-agent"
    spec = node.INPUT_TYPES()
    assert set(spec) <= {"required", "optional"} and spec["required"]
    for kind, inputs in spec.items():
        for key, (type_, options) in inputs.items():
            assert type_ in COMFY_TYPES and isinstance(options, dict), (key, type_)
            if type_ == "INT":
                assert options["min"] <= options["default"] <= options["max"], key
    assert len(node.RETURN_TYPES) == len(node.RETURN_NAMES) and set(node.RETURN_TYPES) <= COMFY_TYPES
    params = inspect.signature(getattr(node, node.FUNCTION)).parameters
    assert list(params)[1:] == [*spec["required"], *spec.get("optional", {})]
    assert all(params[k].default is not inspect.Parameter.empty for k in spec.get("optional", {}))


def test_generate_gives_an_image_tensor_and_its_run(agent):
    node = comfyui.LavidaGenerate()
    image, result = node.run(PROMPT, seed=5, rounds=2, steps=2, upscale=4, plan=True)
    assert image.shape == (1, 256, 256, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    data = json.loads(result)
    assert data["prompt"] == PROMPT and data["seed"] == 5 and data["max_rounds"] == 2
    assert recent_runs(agent.settings.runs_dir)[0] == {**recent_runs(agent.settings.runs_dir)[0],
                                                       "run_id": data["run_id"], "status": "ok"}  # fmt: skip
    again, _ = node.run(PROMPT, seed=5, rounds=2, steps=2, upscale=1, plan=True)
    assert torch.equal(again, image[:, ::4, ::4, :])  # the same seed draws the same image


def test_edit_runs_each_image_of_a_batch_and_continues_its_sessions(agent):
    node = comfyui.LavidaEdit()
    image, sessions, result = node.run(_tensor(_scene(), _scene()), "make the red circle green",
                                       seed=3, rounds=1, steps=2, upscale=2)  # fmt: skip
    lines = sessions.split("\n")
    ids = [line.split(":")[0] for line in lines]
    assert image.shape == (2, 128, 128, 3) and len(set(ids)) == 2
    results = json.loads(result)
    assert [f"{r['thread_id']}:{r['step']}:" for r in results] == [line[: -16] for line in lines]
    image, again, result = node.run(_tensor(_scene()), "remove the blue square", seed=4, rounds=1,
                                    steps=2, upscale=1, session=lines[0] + "\n")  # fmt: skip
    assert again.startswith(f"{ids[0]}:1:") and json.loads(result)["step"] == 1  # the next step
    assert [s.instruction for s in agent.session(ids[0]).history()] == \
        ["make the red circle green", "remove the blue square"]  # fmt: skip
    sha = agent.session(ids[0]).history()[1].result.sha256
    assert again == f"{ids[0]}:1:{sha[:16]}"


def _edit(session: str, instruction: str, seed: int) -> tuple[str, dict]:
    _, out, result = comfyui.LavidaEdit().run(_tensor(_scene()), instruction, seed=seed, rounds=1,
                                              steps=2, upscale=1, session=session)  # fmt: skip
    return out, json.loads(result)


def test_each_edit_fed_from_one_step_edits_that_step(agent):
    """ComfyUI reruns the second Edit of Load -> Edit -> Edit (a new seed) with the first's
    cached `session` output, and a graph may feed two Edits from one: each must edit the
    image it was given, and what follows each must edit that one's result."""
    _, first, _ = comfyui.LavidaEdit().run(_tensor(_scene()), "make the red circle green", seed=1,
                                           rounds=1, steps=2, upscale=1)  # fmt: skip
    a, a_result = _edit(first, "remove the blue square", 2)
    b, b_result = _edit(first, "make the blue square red", 3)  # fan-out: a branch from step 0
    assert a.split(":")[1] == b.split(":")[1] == "1" and a != b  # step 1 twice, two images
    a2, a2_result = _edit(a, "remove the green circle", 4)  # after branch b, still a's image
    b2, b2_result = _edit(b, "remove the green circle", 5)
    session = agent.session(first.split(":")[0])
    edges = set()  # (parent image, result image) of every step on every branch
    for snap in session._session.snapshots():
        for step in EditState.model_validate({"instruction": "", **snap.values}).steps:
            edges.add((step.parent.sha256[:16], step.result.sha256[:16]))
    sha = {name: out.split(":")[2] for name, out in
           (("first", first), ("a", a), ("b", b), ("a2", a2), ("b2", b2))}  # fmt: skip
    assert {(sha["first"], sha["a"]), (sha["first"], sha["b"]), (sha["a"], sha["a2"]),
            (sha["b"], sha["b2"])} <= edges  # fmt: skip
    assert (a_result["step"], b_result["step"], a2_result["step"], b2_result["step"]) == (1, 1, 2, 2)
    for bad, message in (("x:y:z", "is not <session id>:<step>:<image>"),
                         (first[:-16] + "0" * 16, "no step 0 with image '0000000000000000'")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            _edit(bad, "remove it", 6)


def test_a_typed_session_id_reruns_when_the_session_moves(agent):
    node = comfyui.LavidaEdit()
    _, first, _ = node.run(_tensor(_scene()), "make the red circle green", seed=1, rounds=1, steps=2, upscale=1)
    session_id = first.split(":")[0]
    assert comfyui.LavidaEdit.IS_CHANGED(session=first) == ""  # id:step:image pins the image
    before = comfyui.LavidaEdit.IS_CHANGED(session=session_id, seed=1)
    assert before == comfyui.LavidaEdit.IS_CHANGED(session=session_id, seed=1) != ""
    agent.session(session_id).undo()  # moved outside the graph (the CLI, HTTP, MCP)
    assert comfyui.LavidaEdit.IS_CHANGED(session=session_id, seed=1) != before
    agent.session(session_id).edit("make the blue square red", seed=7)  # the same step, anew
    assert agent.session(session_id).state().current_step == 0
    assert comfyui.LavidaEdit.IS_CHANGED(session=session_id, seed=1) != before  # another image
    assert comfyui.LavidaEdit.IS_CHANGED(session=None) == ""  # linked: ComfyUI passes None


def test_ground_gives_one_mask_per_expression_covering_its_box():
    masks, drawn, result = comfyui.LavidaGround().run(_tensor(_scene()), "red circle\n\n blue square \n")
    data = json.loads(result)
    assert data["expressions"] == ["red circle", "blue square"]
    assert data["boxes"] == [RED["box"], BLUE["box"]]
    assert masks.shape == (2, 64, 64) and drawn.shape == (1, 64, 64, 3)
    for mask, (x0, y0, x1, y1) in zip(masks, data["boxes"], strict=True):
        assert x1 > x0 and y1 > y0
        ys, xs = np.nonzero(mask.numpy())
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (int(x0), int(y0), int(x1), int(y1))
        assert float(mask.sum()) == (x1 - x0) * (y1 - y0)


def test_ground_leaves_the_mask_of_an_absent_referent_empty(engine):
    """Only a red circle; `the blue square` is boxed on the empty corner, where the model
    reads a look-alike: an empty mask, no box drawn, `present` false in the JSON."""
    only_red = draw(np.zeros((64, 64, 3), np.uint8), [RED])
    engine.enqueue_answer("a small red circle on a black background")
    engine.enqueue_ground([RED["box"]])
    engine.enqueue_ground([RED["box"], BLUE["box"]])
    engine.enqueue_fit([0.0, -1.0])  # the square's own box beats the circle's: it stays
    engine.enqueue_fit([-8.0])  # read there as a look-alike
    masks, drawn, result = comfyui.LavidaGround().run(_tensor(only_red), "the red circle\nthe blue square")
    assert json.loads(result)["present"] == [True, False]
    assert float(masks[0].sum()) == 16 * 16 and float(masks[1].sum()) == 0.0
    corner = (drawn[0].numpy() * 255).round().astype(np.uint8)[36:52, 36:52]
    assert (corner == only_red[36:52, 36:52]).all()  # nothing drawn where the square is not


def test_ask_and_critique_read_the_image(engine):
    engine.enqueue_answer("red")
    answer, result = comfyui.LavidaAsk().run(_tensor(_scene()), "what color is the circle?")
    assert answer == json.loads(result)["answer"]
    accepted, result = comfyui.LavidaCritique().run(_tensor(_scene()), PROMPT)
    assert accepted is (json.loads(result)["verdict"] == "accept")


def test_a_bad_image_is_refused_by_name():
    with pytest.raises(ValueError, match=r"image: expected a ComfyUI IMAGE \[B, H, W, C\], got shape \(64, 64, 3\)"):
        comfyui.LavidaAsk().run(torch.zeros(64, 64, 3), "what?")


@pytest.fixture(params=[Exception, BaseException], ids=["old-comfyui", "new-comfyui"])
def comfy(monkeypatch, request):
    """ComfyUI's `comfy.utils.ProgressBar` (whose hook raises the interruption, as ComfyUI's
    main.py installs it) and `comfy.model_management`'s interruption flag, faked, with the
    exception on either base class ComfyUI has used; `state["interrupt_at"]` presses Cancel
    at that many progress updates."""
    state: dict = {"updates": [], "interrupt_at": None, "flag": False}

    class InterruptProcessingException(request.param):
        pass

    def throw_exception_if_processing_interrupted():
        if state["flag"]:
            state["flag"] = False
            raise InterruptProcessingException()

    def interrupt_current_processing(value=True):
        state["flag"] = value

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state["updates"].append((value, total))
            if state["interrupt_at"] is not None and len(state["updates"]) >= state["interrupt_at"]:
                state["flag"] = True
            throw_exception_if_processing_interrupted()  # ComfyUI's progress hook does this

    pkg, utils, mm = (types.ModuleType(n) for n in ("comfy", "comfy.utils", "comfy.model_management"))
    utils.ProgressBar = ProgressBar
    mm.processing_interrupted = lambda: state["flag"]
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.interrupt_current_processing = interrupt_current_processing
    mm.InterruptProcessingException = InterruptProcessingException
    pkg.utils, pkg.model_management = utils, mm
    for name, module in (("comfy", pkg), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, module)
    return state


def test_progress_follows_the_sampler_and_cancel_stops_the_run(agent, engine, comfy):
    comfyui.LavidaGenerate().run(PROMPT, seed=1, rounds=1, steps=3, upscale=1, plan=True)
    assert comfy["updates"][:3] == [(1, 3), (2, 3), (3, 3)]
    comfy["updates"].clear()
    comfy["interrupt_at"] = 2
    drawn = engine.calls["generate"]
    with pytest.raises(sys.modules["comfy.model_management"].InterruptProcessingException):
        comfyui.LavidaGenerate().run(PROMPT, seed=2, rounds=3, steps=3, upscale=1, plan=True)
    assert engine.calls["generate"] == drawn + 1  # stopped inside its first drawing
    assert comfy["flag"] is False  # cleared, as ComfyUI's own raise clears it
    [row] = recent_runs(agent.settings.runs_dir, unfinished=True)
    assert row["status"] == "stopped" and row["prompt"] == PROMPT  # a stop, which resume finishes


def test_a_stop_not_from_comfyuis_cancel_stays_a_generation_cancelled(engine, comfy, monkeypatch):
    """Without ComfyUI's flag (the run was cancelled some other way) the node raises the
    agent's own error, not ComfyUI's interruption."""
    monkeypatch.setattr(comfyui._Run, "__call__", lambda self, ev: self.cancel.set())
    with pytest.raises(GenerationCancelled):
        comfyui.LavidaGenerate().run(PROMPT, seed=1, rounds=1, steps=2, upscale=1, plan=True)


def test_seeds_stay_in_the_agents_range(agent):
    seed = comfyui.LavidaGenerate.INPUT_TYPES()["required"]["seed"][1]
    assert seed["max"] == SEED_LIMIT - 1
    _, result = comfyui.LavidaGenerate().run(PROMPT, seed=2**64 - 1, rounds=1, steps=2, upscale=1, plan=True)
    assert json.loads(result)["seed"] == (2**64 - 1) % SEED_LIMIT  # a KSampler-range seed linked in


def test_install_writes_the_nodes_module_into_custom_nodes(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli_mod.cli, ["comfyui", "install", str(tmp_path)])
    assert res.exit_code == 1 and "has no custom_nodes folder" in res.output
    (tmp_path / "custom_nodes").mkdir()
    res = runner.invoke(cli_mod.cli, ["comfyui", "install", str(tmp_path)])
    assert res.exit_code == 0, res.output
    shim = tmp_path / "custom_nodes" / "lavida_agent_nodes.py"
    namespace: dict = {}
    exec(shim.read_text(), namespace)  # what ComfyUI does when it loads the module
    assert namespace["NODE_CLASS_MAPPINGS"] is comfyui.NODE_CLASS_MAPPINGS
    assert runner.invoke(cli_mod.cli, ["comfyui", "install", str(tmp_path)]).exit_code == 0  # ours: rewritten
    shim.write_text("# someone else's\n")
    res = runner.invoke(cli_mod.cli, ["comfyui", "install", str(tmp_path)])
    assert res.exit_code == 1 and "--force" in res.output and shim.read_text() == "# someone else's\n"
    assert runner.invoke(cli_mod.cli, ["comfyui", "install", str(tmp_path), "--force"]).exit_code == 0
    assert shim.read_text() == comfyui.SHIM
    res = runner.invoke(cli_mod.cli, ["comfyui", "install", str(tmp_path), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == {"installed": str(shim)}
    res = runner.invoke(cli_mod.cli, ["comfyui", "install", str(tmp_path / "none"), "--json"])
    assert res.exit_code == 2  # not a folder: click's usage error


def _readme_graph() -> dict:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("```json", text.index("### ComfyUI")) + len("```json")
    return json.loads(text[start:text.index("```", start)])


def test_the_readme_graph_runs_as_comfyui_would_run_it(agent):
    """The README's API-format graph, executed the way ComfyUI does: each node once its
    inputs are ready, links as `[node, output index]`, every output type matching the
    input it feeds (SaveImage, a core node, stands in as a check of what it gets)."""
    graph, outputs, saved = _readme_graph(), {}, []
    while len(outputs) < len(graph):
        done = len(outputs)
        for key, node in graph.items():
            if key in outputs or any(isinstance(v, list) and v[0] not in outputs
                                     for v in node["inputs"].values()):  # fmt: skip
                continue
            if node["class_type"] == "SaveImage":
                images = outputs[node["inputs"]["images"][0]][node["inputs"]["images"][1]]
                saved.append(images)
                outputs[key] = ()
                continue
            cls = comfyui.NODE_CLASS_MAPPINGS[node["class_type"]]
            spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
            kwargs = {}
            for name, value in node["inputs"].items():
                if isinstance(value, list):  # a link: the type it carries must be the input's
                    source = comfyui.NODE_CLASS_MAPPINGS[graph[value[0]]["class_type"]]
                    assert source.RETURN_TYPES[value[1]] == spec[name][0], (key, name)
                    value = outputs[value[0]][value[1]]
                kwargs[name] = value
            assert set(spec) - set(kwargs) <= set(cls.INPUT_TYPES().get("optional", {})), key
            outputs[key] = getattr(cls(), cls.FUNCTION)(**kwargs)
        assert len(outputs) > done, "a node waits for an input no node gives"
    [image] = saved
    assert image.shape == (1, 256, 256, 3)
    steps = agent.session(outputs["3"][1].split(":")[0]).history()
    assert [s.instruction for s in steps] == ["make the blue square green", "remove the red circle"]
