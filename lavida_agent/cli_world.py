"""`lavida-agent world`: sample, detect and score ShapesWorld data.

- `world sample TASK --n N --seed S --out DIR`: training/evaluation data for one task
  (`t2i`, `edit`, `ground`, `question`, `caption`, `critique`, `plan`) as `DIR/data.jsonl`
  plus PNGs next to it (paths in the records are relative to `DIR`).
- `world detect IMAGE`: the classical detector's reading of an image.
- `world score-prompt PROMPT IMAGE`: is the image correct for the prompt?
- `world score-edit SOURCE INSTRUCTION RESULT`: is the edit correct, and the PSNR outside it.

Every command but `sample` takes `--json`. Errors (text outside the grammar, an unreadable
image) print one `Error: ...` line on stderr and exit with status 1. In JSON an infinite
PSNR (nothing changed outside the edit) is written as `null`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import click
import numpy as np

TASKS = ("t2i", "edit", "ground", "question", "caption", "critique", "plan")


def _domain_errors() -> tuple[type[Exception], ...]:
    """The exceptions that are the user's input, not a bug: shown as one `Error:` line."""
    from lavida_agent.tools.images import ImageError

    return (ImageError, ValueError, OSError)


def _json_spec(spec: Any) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _sample_record(task: str, rng: np.random.Generator, i: int, out: Path) -> dict[str, Any]:
    """One data record for `task`; writes its PNGs under `out`."""
    from lavida_agent.tools.images import save_image
    from lavida_agent.tools.shapes_world import language as lang
    from lavida_agent.tools.shapes_world.render import render
    from lavida_agent.tools.shapes_world.sampler import sample_scene

    def save(scene: Any, suffix: str = "") -> str:
        name = f"{i:06d}{suffix}.png"
        save_image(render(scene), out / name)
        return name

    rec: dict[str, Any] = {"id": i, "task": task}
    if task in ("t2i", "plan"):
        text, spec = lang.sample_prompt(rng)
        scene = lang.scene_for_prompt(rng, spec)
        rec.update(prompt=text, spec=_json_spec(spec))
        if task == "plan":
            items = lang.plan_items(scene)
            rec["plan"] = [{"label": label, "box": list(box)} for label, box in items]
    elif task == "critique":
        text, scene, verdict = lang.sample_critique(rng)
        rec.update(prompt=text, verdict=verdict)
    elif task == "edit":
        scene = sample_scene(rng)
        text, spec, target = lang.sample_edit(rng, scene)
        rec.update(instruction=text, spec=_json_spec(spec), source=save(scene, "_source"),
                   target=save(target, "_target"), source_scene=scene.to_dict(),
                   target_scene=target.to_dict())  # fmt: skip
        return rec
    else:
        scene = sample_scene(rng)
        while task == "ground" and not lang.referable(scene):  # rare; see `referable`
            scene = sample_scene(rng)
        if task == "ground":
            text, spec, k = lang.sample_refexp(rng, scene)
            rec.update(expression=text, spec=_json_spec(spec), index=k,
                       box=list(scene.objects[k].box))  # fmt: skip
        elif task == "question":
            text, spec, ans = lang.sample_question(rng, scene)
            rec.update(question=text, spec=_json_spec(spec), answer=ans)
        else:  # caption
            rec["caption"] = lang.caption(scene)
    rec.update(image=save(scene), scene=scene.to_dict())
    return rec


@click.group()
def world() -> None:
    """ShapesWorld: sample data, detect objects, score prompts and edits."""


@world.command()
@click.argument("task", type=click.Choice(TASKS))
@click.option("--n", "n", type=click.IntRange(min=0), default=16, show_default=True,
              help="Number of records.")  # fmt: skip
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (created); gets data.jsonl and the PNGs.")  # fmt: skip
def sample(task: str, n: int, seed: int, out: Path) -> None:
    """Write N samples of TASK to OUT/data.jsonl plus PNG images."""
    rng = np.random.default_rng(seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "data.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps(_sample_record(task, rng, i, out)) + "\n")
    except OSError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {n} {task} samples to {out / 'data.jsonl'}")


def _observe(path: str) -> Any:
    from lavida_agent.tools.shapes_world.checkers import observe

    try:
        return observe(path)
    except _domain_errors() as err:
        raise click.ClickException(f"cannot read image {path!r}: {err}") from err


def _size(path: str) -> tuple[int, int] | None:
    """`(width, height)` of an image file, or None when it cannot be read (`_observe` says why)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError):
        return None


@world.command()
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def detect(image: str, as_json: bool) -> None:
    """Detect the background and objects in IMAGE, letterboxed into the 64x64 canvas as the
    model sees it: boxes are canvas pixels (`ground` maps its boxes back to IMAGE's)."""
    obs = _observe(image)
    data = {
        "background": obs.background,
        "objects": [o.to_dict() for o in obs.objects],
        "unknown": [list(b) for b in obs.unknown],
    }
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"background: {obs.background or 'unknown'}")
    for o in obs.objects:
        click.echo(f"{o.size} {o.color} {o.shape} at {list(o.box)}")
    for b in obs.unknown:
        click.echo(f"unknown object at {list(b)}")


@world.command("score-prompt")
@click.argument("prompt")
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def score_prompt(prompt: str, image: str, as_json: bool) -> None:
    """Check IMAGE against the text-to-image PROMPT."""
    from lavida_agent.tools.shapes_world.checkers import check_prompt
    from lavida_agent.tools.shapes_world.language import parse_prompt

    try:
        spec = parse_prompt(prompt)
    except ValueError as err:
        if Path(prompt).is_file() and not Path(image).is_file():  # `critique` takes IMAGE first
            raise click.UsageError(f"score-prompt takes PROMPT then IMAGE: try "
                                   f"`world score-prompt {image!r} {prompt}`") from err  # fmt: skip
        raise click.ClickException(str(err)) from err
    result = check_prompt(spec, _observe(image))
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo("correct" if result.correct else "incorrect: " + "; ".join(result.reasons))


@world.command("score-edit")
@click.argument("source")
@click.argument("instruction")
@click.argument("result")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def score_edit(source: str, instruction: str, result: str, as_json: bool) -> None:
    """Check that RESULT is SOURCE edited as INSTRUCTION says."""
    from lavida_agent.tools.shapes_world.checkers import check_edit
    from lavida_agent.tools.shapes_world.language import parse_edit

    try:
        spec = parse_edit(instruction)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    sizes = [_size(path) for path in (source, result)]
    if sizes[0] and sizes[1] and sizes[0] != sizes[1]:
        raise click.ClickException(f"SOURCE is {sizes[0][0]}x{sizes[0][1]} and RESULT {sizes[1][0]}x{sizes[1][1]}: "
                                   "an edit keeps the image's size")  # fmt: skip
    try:
        checked = check_edit(_observe(source), spec, _observe(result))
    except ValueError as err:  # e.g. images of different sizes
        raise click.ClickException(str(err)) from err
    value = checked.psnr_outside
    if as_json:
        data = checked.to_dict()
        data["psnr_outside"] = None if math.isinf(value) else value
        click.echo(json.dumps(data))
        return
    verdict = "correct" if checked.correct else "incorrect: " + "; ".join(checked.reasons)
    click.echo(f"{verdict} (PSNR outside: {value:.2f} dB)")
