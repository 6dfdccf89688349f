"""`lavida-agent world ...` through click's CliRunner: sampling, detection, scoring, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lavida_agent.cli import cli
from lavida_agent.tools.images import load_image, save_image
from lavida_agent.tools.shapes_world.language import parse_edit, parse_prompt
from lavida_agent.tools.shapes_world.render import render
from lavida_agent.tools.shapes_world.scene import Object, Scene

SCENE = Scene(
    "white",
    (Object("circle", "red", "small", (4, 10, 16, 22)), Object("square", "blue", "large", (40, 6, 60, 26))),
)


def run(*args: str):
    return CliRunner().invoke(cli, ["world", *args])


@pytest.fixture
def image(tmp_path):
    return str(save_image(render(SCENE), tmp_path / "scene.png"))


@pytest.mark.parametrize(
    "task, keys",
    [
        ("t2i", {"prompt", "spec", "image", "scene"}),
        ("edit", {"instruction", "spec", "source", "target", "source_scene", "target_scene"}),
        ("ground", {"expression", "spec", "index", "box", "image"}),
        ("question", {"question", "spec", "answer", "image"}),
        ("caption", {"caption", "image"}),
        ("critique", {"prompt", "verdict", "image"}),
        ("plan", {"prompt", "plan", "image"}),
    ],
)
def test_sample_writes_jsonl_and_pngs(tmp_path, task, keys):
    out = tmp_path / task
    result = run("sample", task, "--n", "3", "--seed", "5", "--out", str(out))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(records) == 3 and [r["id"] for r in records] == [0, 1, 2]
    for rec in records:
        assert keys <= set(rec)
        for k in ("image", "source", "target"):
            if k in rec:
                assert load_image(out / rec[k]).shape == (64, 64, 3)
        if task in ("t2i", "plan", "critique"):
            parse_prompt(rec["prompt"])
        if task == "edit":
            parse_edit(rec["instruction"])
    again = tmp_path / "again"
    run("sample", task, "--n", "3", "--seed", "5", "--out", str(again))
    assert (again / "data.jsonl").read_text() == (out / "data.jsonl").read_text()


def test_detect(image):
    result = run("detect", image, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["background"] == "white"
    assert sorted(tuple(o["box"]) for o in data["objects"]) == [(4, 10, 16, 22), (40, 6, 60, 26)]
    assert {(o["shape"], o["color"], o["size"]) for o in data["objects"]} == {
        ("circle", "red", "small"), ("square", "blue", "large")}  # fmt: skip
    human = run("detect", image)
    assert "background: white" in human.output and "small red circle at [4, 10, 16, 22]" in human.output


def test_score_prompt(image):
    ok = run("score-prompt", "a red circle left of a blue square", image, "--json")
    assert ok.exit_code == 0 and json.loads(ok.output) == {"correct": True, "reasons": []}
    bad = run("score-prompt", "A red circle and a green square.", image, "--json")
    assert json.loads(bad.output) == {"correct": False, "reasons": ["square is blue, expected green"]}
    human = run("score-prompt", "a red circle", image)
    assert human.output.strip() == "incorrect: extra blue square"
    swapped = run("score-prompt", image, "a red circle")  # `critique` takes IMAGE first
    assert swapped.exit_code == 2 and "score-prompt takes PROMPT then IMAGE" in swapped.output


def test_score_edit(tmp_path, image):
    edited = Scene("white", (SCENE.objects[0], Object("square", "green", "large", (40, 6, 60, 26))))
    result_path = str(save_image(render(edited), tmp_path / "edited.png"))
    ok = run("score-edit", image, "make the blue square green", result_path, "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output) == {"correct": True, "reasons": [], "psnr_outside": None}
    bad = run("score-edit", image, "remove the blue square", result_path, "--json")
    data = json.loads(bad.output)
    assert data["correct"] is False and data["reasons"] == ["extra green square"]
    assert data["psnr_outside"] is None  # every change is inside the touched square's box
    moved = Scene("white", (Object("circle", "red", "small", (4, 40, 16, 52)), SCENE.objects[1]))
    moved_path = str(save_image(render(moved), tmp_path / "moved.png"))
    data = json.loads(run("score-edit", image, "make the blue square green", moved_path, "--json").output)
    assert data["reasons"] == ["square is blue, expected green", "red circle moved"]
    assert isinstance(data["psnr_outside"], float) and data["psnr_outside"] < 30
    human = run("score-edit", image, "make the blue square green", result_path)
    assert human.output.startswith("correct (PSNR outside: inf dB)")
    wide = str(save_image(np.zeros((64, 128, 3), np.uint8), tmp_path / "wide.png"))
    other = run("score-edit", image, "make the blue square green", wide)
    assert other.exit_code == 1 and "SOURCE is 64x64 and RESULT 128x64" in other.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("score-prompt", "a hexagon", "IMAGE"), "unknown word 'hexagon'"),
        (("score-edit", "IMAGE", "paint it red", "IMAGE"), "unknown word 'paint'"),
        (("detect", "/no/such/file.png"), "cannot read image"),
        (("score-prompt", "a red circle", "NOTPNG"), "cannot read image"),
    ],
)
def test_errors_are_one_line(tmp_path, image, args, message):
    junk = tmp_path / "junk.png"
    junk.write_text("not a png")
    args = tuple(image if a == "IMAGE" else str(junk) if a == "NOTPNG" else a for a in args)
    result = run(*args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()  # click 8.2+ keeps stderr apart; output mixes both
    err_lines = [line for line in lines if line.startswith("Error: ")]
    assert len(err_lines) == 1 and message in err_lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_quiet_and_debug_are_accepted_after_the_command(image):
    for flag in ("--debug", "--quiet"):
        result = run("detect", image, flag)
        assert result.exit_code == 0, result.output  # was "No such option" (exit 2)


def test_sample_names_a_negative_seed(tmp_path):
    res = run("sample", "t2i", "--seed", "-1", "--out", str(tmp_path / "d"))
    assert res.exit_code == 2 and "'--seed'" in res.output and not (tmp_path / "d").exists()
