"""The `lavida-agent` command line.

    lavida-agent generate PROMPT --out FILE [--seed S] [--rounds N] [--plan/--no-plan]
                          [--steps N] [--preview-scale K] [--json] [--batch FILE.jsonl]
    lavida-agent edit IMAGE INSTRUCTION --out FILE [...same options, no --plan]
    lavida-agent ground IMAGE EXPRESSION... [--out FILE] [--json] [--batch FILE.jsonl]
    lavida-agent ask IMAGE QUESTION [--json] [--batch FILE.jsonl]
    lavida-agent critique IMAGE PROMPT [--json] [--batch FILE.jsonl]
    lavida-agent session start|edit|history|undo|redo|branch|show ...
    lavida-agent resume RUN_ID --out FILE          (finish a generate/edit run that stopped)
    lavida-agent trace RUN_ID --out page.html
    lavida-agent runs [--unfinished] [--json]     (the newest runs and their status)
    lavida-agent bench quality|speed [--quick] [--out DIR]
    lavida-agent train vq|model [ARGS...]          (arguments go to the training script)
    lavida-agent train blend BASE OTHER --out DIR  (blend a one-sided fine-tune into its start)
    lavida-agent train drawer BASE DRAWER --for unplanned|edit|edit-regions --out DIR  (a drawer for one kind of row)
    lavida-agent train planner BASE PLANNER --for edit --out DIR  (a planner for edit plans)
    lavida-agent train reader BASE READER --out DIR [--rank R]  (answer-side weights for captions and answers)
    lavida-agent train export RUN --out DIR        (a run's latest checkpoint as a pipeline folder)
    lavida-agent serve [--host H] [--port P]        (the HTTP API, and the MCP tools at /mcp)
    lavida-agent mcp                               (the MCP tools over stdio, for an MCP host)
    lavida-agent comfyui install COMFYUI_DIR       (the ComfyUI nodes, into custom_nodes/)
    lavida-agent world ... / model ...

Global options: `--model PATH` (a checkpoint folder; default: the embedded one), `--home DIR`,
`--device`, `--quiet` (no progress bars), `--debug` (tracebacks). `--quiet`/`--debug` are
also accepted after the command (except `train vq|model`, which pass every argument on). Settings not given as options come from `LAVIDA_*`
environment variables (read by `settings.py` only).

`--batch FILE.jsonl` (`-` for stdin) runs one JSON object per line, keys named like the
command's own arguments (`generate`: prompt, out, seed?, plan?, rounds?, steps?; `edit`:
image, instruction, out, seed?, rounds?, steps?; `ground`: image, expressions; `ask`: image,
question; `critique`: image, prompt), in one process, and prints one JSON result per line
in input order. A bad line prints `{"error": ..., "line": n}` and the rest still run; the
exit status is 1 when any line failed. Blank lines are skipped.

Errors print one `Error: ...` line on stderr and exit with status 1 (usage errors: 2);
`--debug` shows the traceback instead. Ctrl-C during a run stops it at its next step (status
130, with the `resume` command that finishes it); a second Ctrl-C quits at once. Progress bars (tqdm) go to stderr and only when it
is a terminal. Heavy imports (torch, the model, LangGraph) happen inside the commands, so
`--help` stays fast. Tests inject an engine through `ENGINE_FACTORY`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import click

from lavida_agent import __version__
from lavida_agent.settings import SEED_LIMIT

if TYPE_CHECKING:
    from lavida_agent.api import LavidaAgent
    from lavida_agent.settings import Settings

__all__ = ["ENGINE_FACTORY", "cli", "main"]

# The largest --scale / --preview-scale: a 64 px canvas to 8192 px (`tools.images.MAX_UPSCALED_SIDE`).
MAX_SCALE = 128

ENGINE_FACTORY: Callable[[Settings], Any] | None = None
"""When set, `ENGINE_FACTORY(settings)` provides the engine instead of the real model (tests)."""

SEED_TYPE = click.IntRange(min=0, max=SEED_LIMIT - 1)

BATCH_KEYS: dict[str, tuple[set[str], set[str]]] = {
    # command: (required keys, optional keys)
    "generate": ({"prompt", "out"}, {"seed", "plan", "rounds", "steps"}),
    "edit": ({"image", "instruction", "out"}, {"seed", "rounds", "steps"}),
    "ground": ({"image", "expressions"}, set()),
    "ask": ({"image", "question"}, set()),
    "critique": ({"image", "prompt"}, set()),
}

BATCH_INTS = {"seed": 0, "rounds": 1, "steps": 1}  # batch keys holding integers: their minimum
BATCH_STRINGS = {"prompt", "out", "image", "instruction", "question"}


# ----------------------------------------------------------------------------------------
# Plumbing: errors, flags, the agent, progress
# ----------------------------------------------------------------------------------------


def _one_line(exc: BaseException, *, trace: bool = True) -> str:
    from lavida_agent.errors import GenerationCancelled, LavidaError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, LavidaError):
        text = f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
    run_id = getattr(exc, "run_id", None)
    if run_id and isinstance(exc, GenerationCancelled) and getattr(exc, "resumable", False):
        text += f"; to finish it: lavida-agent resume {run_id} --out FILE"
    elif run_id and trace:
        text += f" [trace: lavida-agent trace {run_id}]"
    return text


@contextlib.contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises `KeyboardInterrupt` again (Python's default) inside the block: for a
    prompt, which `_ctrl_c_stops_the_run`'s handler would otherwise leave waiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _ctrl_c_stops_the_run() -> Iterator[threading.Event]:
    """A `cancel` event that Ctrl-C sets: the run stops at its next step with
    `GenerationCancelled`, reported with the command that finishes it. A second Ctrl-C quits
    at once (exit 130; the run can still be resumed from its checkpoints).

    Ctrl-C is not left to raise `KeyboardInterrupt`: raised while the main thread waits in
    LangGraph's executor, it can leave a lock held and hang the process."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if cancel.is_set():
            click.echo("\nQuitting.", err=True)
            with contextlib.suppress(Exception):  # keep the results printed so far (a pipe)
                sys.stdout.flush()
            os._exit(130)
        cancel.set()
        click.echo("\nStopping at the next step (Ctrl-C again to quit now)...", err=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


_GLOBAL_ONLY = ("--model", "--home", "--device")  # the group's options no command repeats


class _LavidaGroup(click.Group):
    """A click group that turns any exception into one `Error: ...` line (unless --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        # what the command line asks for, before click parses (and may refuse) it
        wants_json = "--json" in (*getattr(ctx, "_protected_args", ()), *ctx.args)
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as exc:
            if exc.option_name in _GLOBAL_ONLY:  # `lavida-agent serve --home DIR`
                path = exc.ctx.command_path.split(" ", 1)[-1] if exc.ctx else "COMMAND"
                raise click.UsageError(f"{exc.option_name} is an option of lavida-agent itself: "
                                       f"put it before the command (lavida-agent "
                                       f"{exc.option_name} ... {path} ...)", exc.ctx) from None  # fmt: skip
            raise
        except click.UsageError as exc:
            if wants_json:  # refused before `--json` itself was read: say it as JSON too
                ctx.ensure_object(dict)["json"] = True
                _json_error(ctx, exc.format_message())
            raise
        except click.ClickException as exc:
            _json_error(ctx, exc.format_message())
            raise
        except (click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise  # click says these itself (a closed pipe, `... | head`, quietly)
        except KeyboardInterrupt as exc:
            run_id = getattr(exc, "run_id", None)  # set by the run it stopped
            if run_id and getattr(exc, "resumable", False):
                click.echo(f"Interrupted; to finish the run: lavida-agent resume {run_id} "
                           "--out FILE", err=True)  # fmt: skip
            _json_error(ctx, "interrupted (Ctrl-C)", run_id)
            click.echo("Aborted!", err=True)
            raise click.exceptions.Exit(130) from None  # as a stopped run: a stop, not a failure
        except Exception as exc:
            from lavida_agent.errors import GenerationCancelled

            if (ctx.obj or {}).get("debug"):
                raise
            _json_error(ctx, _one_line(exc, trace=False), getattr(exc, "run_id", None))
            error = click.ClickException(_one_line(exc))
            if isinstance(exc, GenerationCancelled):
                error.exit_code = 130  # as for Ctrl-C: a script can tell a stop from a failure
            raise error from exc


def _json_error(ctx: click.Context, message: str, run_id: str | None = None) -> None:
    """With `--json`, the error as `{"error", "run_id"?}` on stdout too (for a script reading
    it), unless the command already printed its JSON there (one document, or JSONL lines)."""
    obj = ctx.obj or {}
    if obj.get("json") and not obj.get("printed_json"):
        _echo_json({"error": message, **({"run_id": run_id} if run_id else {})})


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """`--json`'s callback: an error of the run is then also printed as `{"error"}` JSON."""
    if value:
        ctx.ensure_object(dict)["json"] = True
    return value


def _json_errors(command: click.Command) -> None:
    """Give every `--json` option of `command` (and its subcommands) `_remember_json`."""
    for param in command.params:
        if param.name == "as_json" and param.callback is None:
            param.callback = _remember_json
    for sub in getattr(command, "commands", {}).values():
        _json_errors(sub)


def _flag(name: str) -> Callable[[click.Context, click.Parameter, bool], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            ctx.ensure_object(dict)[name] = True

    return callback


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--quiet` and `--debug`, accepted after the command too."""
    f = click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_flag("quiet"),
                     help="No progress bars.")(f)  # fmt: skip
    f = click.option("--debug", is_flag=True, expose_value=False, callback=_flag("debug"),
                     help="Show tracebacks.")(f)  # fmt: skip
    return f


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    from lavida_agent.settings import Settings

    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        obj["settings"] = Settings.from_env(model_path=obj.get("model"), home=obj.get("home"),
                                            device=obj.get("device"))  # fmt: skip
    settings: Settings = obj["settings"]
    return settings.replace(**overrides) if overrides else settings


def _agent(ctx: click.Context) -> LavidaAgent:
    from lavida_agent.api import LavidaAgent

    obj = ctx.ensure_object(dict)
    if "agent" not in obj:
        settings = _settings(ctx)
        engine = ENGINE_FACTORY(settings) if ENGINE_FACTORY is not None else None
        agent = LavidaAgent(engine=engine, settings=settings)
        ctx.find_root().call_on_close(agent.close)
        obj["agent"] = agent
    result: LavidaAgent = obj["agent"]
    return result


def _progress_enabled(ctx: click.Context) -> bool:
    return not ctx.ensure_object(dict).get("quiet") and sys.stderr.isatty()


class _Progress:
    """An `on_event` callback drawing one tqdm bar per sampler loop (stderr)."""

    def __init__(self, enabled: bool, label: str = "") -> None:
        self.enabled = enabled
        self.label = label
        self.bar: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled or event.get("event") != "sampler_step":
            return
        if self.bar is None or event["step"] == 1:
            self.close()
            from tqdm import tqdm

            desc = f"{self.label} {event.get('node', '')}".strip()
            self.bar = tqdm(total=event["total"], desc=desc, file=sys.stderr, leave=False,
                            unit="step")  # fmt: skip
        self.bar.update(1)
        if event["step"] >= event["total"]:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, default=str))
    ctx = click.get_current_context(silent=True)
    if ctx is not None and isinstance(ctx.obj, dict):
        ctx.obj["printed_json"] = True


def _check_out(out: str | Path) -> None:
    """Refuse an `--out` Pillow cannot write, or no file can be written at, before the run
    (and before a session commits its turn), not after it."""
    from lavida_agent.errors import map_exceptions
    from lavida_agent.tools.images import check_image_path

    with map_exceptions():
        check_image_path(out)
    _check_writable(out)


def _check_writable(path: str | Path, what: str = "--out") -> None:
    """Refuse a path no file can be written at (a folder; a place where creating a file
    fails): a file is created and removed in its nearest existing folder. Nothing is left
    behind (the folders it needs are made when the file is written)."""
    import tempfile

    from lavida_agent.errors import InvalidInputError

    target = Path(path)
    if target.is_dir():
        raise InvalidInputError(f"{what}: {str(target)!r} is a folder; give a file name")
    existing = target.absolute().parent
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{str(existing)!r} is a file, not a folder")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".lavida-write-check-"):
            pass
    except OSError as exc:
        raise InvalidInputError(f"{what}: cannot write a file at {str(target)!r} "
                                f"({exc.strerror or exc})") from None  # fmt: skip


def _not_the_input(path: str | Path, image: Any, what: str) -> None:
    """Refuse to write `path` over the command's input image file."""
    from lavida_agent.errors import InvalidInputError

    if isinstance(image, (str, Path)) and Path(image).exists() and Path(path).resolve() == Path(image).resolve():
        raise InvalidInputError(f"{what} names the input image {str(image)!r}: it would be overwritten")


def _write_image(result: Any, out: str | Path, scale: int) -> str:
    """The result's image at `out`; an edit's without the letterbox bars of a non-square
    input (the edited image has the input's shape)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    crop = {"crop": True} if hasattr(result, "content") else {}  # an EditResult (api loads lazily)
    result.save(path, scale=scale, **crop)
    return str(path)


# ----------------------------------------------------------------------------------------
# One run per command (shared by the single and the batch form)
# ----------------------------------------------------------------------------------------


def _run_generate(agent: LavidaAgent, args: dict[str, Any], *, scale: int,
                  on_event: Any) -> dict[str, Any]:  # fmt: skip
    _check_out(args["out"])
    result = agent.generate(args["prompt"], seed=args.get("seed"), rounds=args.get("rounds"),
                            plan=args.get("plan"), num_steps=args.get("steps"),
                            on_event=on_event, review_plan=args.get("review_plan"),
                            cancel=args.get("cancel"))  # fmt: skip
    out = _write_image(result, args["out"], scale)
    data = result.to_dict()
    return {"prompt": data.pop("prompt"), "out": out, **data}


def _review_plan_on_terminal(layout: list[dict[str, Any]]) -> Literal[True] | list[dict[str, Any]]:
    """Show the model's layout on stderr; read a line: empty or `y` keeps it, a JSON list
    of `{"label", "box": [x0, y0, x1, y1]}` replaces it. A reply that is not a layout is
    explained and asked again (the plan is kept meanwhile); end of input stops the run."""
    from lavida_agent.graphs.state import given_layout

    click.echo("planned layout (canvas pixels):", err=True)
    for item in layout:
        click.echo(f"  {item['label']}: {[round(v) for v in item['box']]}", err=True)
    while True:
        try:
            with _ctrl_c_raises():  # at the prompt, Ctrl-C ends the prompt (and the run)
                reply = click.prompt("Enter to draw it, or a JSON layout to draw instead",
                                     default="", show_default=False, err=True).strip()  # fmt: skip
        except click.Abort:  # end of input, or Ctrl-C
            from lavida_agent.errors import InvalidInputError

            raise InvalidInputError("--review-plan: no answer (the input ended or was "
                                    "interrupted); nothing was drawn") from None
        if reply.lower() in ("", "y", "yes"):
            return True
        try:
            items = json.loads(reply)
        except json.JSONDecodeError as exc:
            click.echo(f"--review-plan: not a JSON layout ({exc}); try again", err=True)
            continue
        try:
            canvas = _settings(click.get_current_context()).canvas
            return [i.to_engine() for i in given_layout(items, canvas=canvas)]
        except ValueError as exc:
            click.echo(f"--review-plan: {exc}; try again", err=True)


def _run_edit(agent: LavidaAgent, args: dict[str, Any], *, scale: int,
              on_event: Any) -> dict[str, Any]:  # fmt: skip
    _check_out(args["out"])
    result = agent.edit(args["image"], args["instruction"], seed=args.get("seed"),
                        rounds=args.get("rounds"), num_steps=args.get("steps"),
                        on_event=on_event, cancel=args.get("cancel"))  # fmt: skip
    out = _write_image(result, args["out"], scale)
    data = result.to_dict()
    return {"image": str(args["image"]), "instruction": data.pop("instruction"), "out": out,
            **data}  # fmt: skip


def _run_ground(agent: LavidaAgent, args: dict[str, Any], **_: Any) -> dict[str, Any]:
    exprs = args["expressions"]
    if isinstance(exprs, str):
        exprs = [exprs]
    if args.get("out"):
        _check_out(args["out"])
        _not_the_input(args["out"], args["image"], "--out")
    result = agent.ground(args["image"], exprs, cancel=args.get("cancel"))
    if args.get("out"):
        from lavida_agent.tools.draw import draw_boxes
        from lavida_agent.tools.images import load_image, save_image

        found = result.located  # an expression the image does not hold gets no box drawn
        image = load_image(args["image"], max_pixels=agent.settings.max_pixels)
        drawn = draw_boxes(image, [b.box.as_list() for b in found],
                           labels=[b.label for b in found])  # fmt: skip
        Path(args["out"]).parent.mkdir(parents=True, exist_ok=True)
        save_image(drawn, args["out"])
    return {"image": str(args["image"]), **result.to_dict()}


def _run_ask(agent: LavidaAgent, args: dict[str, Any], **_: Any) -> dict[str, Any]:
    result = agent.ask(args["image"], args["question"], cancel=args.get("cancel"))
    return {"image": str(args["image"]), **result.to_dict()}


def _run_critique(agent: LavidaAgent, args: dict[str, Any], **_: Any) -> dict[str, Any]:
    result = agent.critique(args["image"], args["prompt"], cancel=args.get("cancel"))
    return {"image": str(args["image"]), **result.to_dict()}


_RUNNERS = {"generate": _run_generate, "edit": _run_edit, "ground": _run_ground, "ask": _run_ask,
            "critique": _run_critique}  # fmt: skip


def _check_batch_args(command: str, args: Any) -> dict[str, Any]:
    from lavida_agent.errors import InvalidInputError

    if not isinstance(args, dict):
        raise InvalidInputError(f"each {command} line must be a JSON object, got {type(args).__name__}")
    required, optional = BATCH_KEYS[command]
    missing = sorted(required - set(args))
    unknown = sorted(set(args) - required - optional)
    if missing:
        raise InvalidInputError(f"missing key(s): {', '.join(missing)}")
    if unknown:
        raise InvalidInputError(f"unknown key(s): {', '.join(unknown)}")
    for key, value in args.items():
        if key in BATCH_INTS and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < BATCH_INTS[key]):  # fmt: skip
            raise InvalidInputError(f"{key} must be an integer >= {BATCH_INTS[key]}, got {value!r}")
        if key in BATCH_STRINGS and not isinstance(value, str):
            raise InvalidInputError(f"{key} must be a string, got {value!r}")
        if key == "plan" and not isinstance(value, bool | list):
            raise InvalidInputError(f'plan must be true, false or a list of {{"label", "box"}}, got {value!r}')
        if key == "expressions" and not (isinstance(value, str) or isinstance(value, list) and value
                                         and all(isinstance(e, str) for e in value)):  # fmt: skip
            raise InvalidInputError(f"expressions must be a string or a list of strings, got {value!r}")
    return args


def _first_line_per_out(lines: Sequence[tuple[int, str]]) -> dict[Path, int]:
    """The first line naming each `out` file (a later line naming it again is refused rather
    than overwriting that line's result)."""
    first: dict[Path, int] = {}
    for n, line in lines:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            out = json.loads(line).get("out")
            if isinstance(out, str) and out:
                first.setdefault(Path(out).resolve(), n)
    return first


def _batch_lines(fh: IO[str]) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(fh, start=1):
        if n == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        if line.strip():
            yield n, line.rstrip("\r\n")  # a JSON error's column is then on this line


def _reject_with_batch(batch: IO[str] | None, given: dict[str, Any], workers: int = 1) -> None:
    """`--batch` takes every input from its file: refuse single-run inputs given beside it
    (they would be ignored without a word), and `--workers` without it. `given` maps the
    names users type to values."""
    if batch is None:
        if workers != 1:
            raise click.UsageError("--workers runs the lines of a --batch file side by side; give --batch too")
        return
    named = [name for name, value in given.items() if value not in (None, ())]
    if named:
        raise click.UsageError(f"--batch reads its inputs from the file; drop {', '.join(named)} "
                               "(a batch line carries its own fields)")  # fmt: skip


def _run_batch(ctx: click.Context, command: str, fh: IO[str], defaults: dict[str, Any],
               *, scale: int, workers: int) -> None:  # fmt: skip
    """Run every line of a JSONL file; print one JSON result per line, in order.

    Ctrl-C stops the lines running at their next step and starts no more: each of those
    gets an error result (a stopped generate or edit names its `run_id`, which `resume`
    finishes), so the output still has one line per input line; the exit status is 130."""
    from lavida_agent.errors import InvalidInputError

    lines = list(_batch_lines(fh))
    first_with = _first_line_per_out(lines)
    debug = ctx.ensure_object(dict).get("debug")
    show = _progress_enabled(ctx)
    with _ctrl_c_stops_the_run() as cancel:
        agent = _agent(ctx)  # the model loads with the first line that needs it

        def one(item: tuple[int, str]) -> dict[str, Any]:
            n, line = item
            try:
                args = _check_batch_args(command, json.loads(line))
                first = first_with.get(Path(args["out"]).resolve(), n) if args.get("out") else n
                if first != n:
                    raise InvalidInputError(f"out {args['out']!r} is also line {first}'s: each line needs its own file")
                if cancel.is_set():
                    return {"error": "not run: the batch was stopped (Ctrl-C)", "line": n}
                merged = {**{k: v for k, v in defaults.items() if v is not None}, **args,
                          "cancel": cancel}  # fmt: skip
                progress = _Progress(show and workers == 1, label=f"line {n}")
                try:
                    return _RUNNERS[command](agent, merged, scale=scale, on_event=progress)
                finally:
                    progress.close()
            except Exception as exc:
                if debug:
                    traceback.print_exc(file=sys.stderr)
                message = (f"invalid JSON at column {exc.colno}: {exc.msg}"  # the line is `line`
                           if isinstance(exc, json.JSONDecodeError) else None)  # fmt: skip
                run_id = getattr(exc, "run_id", None)
                return {"error": message or _one_line(exc), "line": n,
                        **({"run_id": run_id} if run_id else {})}  # fmt: skip

        failed = 0
        from tqdm import tqdm

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(lines), desc=command, file=sys.stderr, disable=not show, unit="line"
        ) as bar:  # fmt: skip
            for result in pool.map(one, lines):
                failed += "error" in result
                _echo_json(result)
                bar.update(1)
    if cancel.is_set():
        error = click.ClickException(f"stopped (Ctrl-C): {len(lines) - failed} of {len(lines)} "
                                     "line(s) done; the others have error lines")  # fmt: skip
        error.exit_code = 130
        raise error
    if failed:
        raise click.ClickException(f"{failed} of {len(lines)} line(s) failed")


def _batch_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--batch` (its help names the keys of a `command` line) and `--workers`."""
    required, optional = BATCH_KEYS[command]
    keys = ", ".join(sorted(required)) + (f" (optional: {', '.join(sorted(optional))})" if optional else "")

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                         help="With --batch: lines run concurrently (batched on the model).")(f)  # fmt: skip
        f = click.option("--batch", type=click.File("r"), default=None,
                         help=f"Run a JSONL file of requests ('-': stdin), one JSON object a line with "
                              f"the keys {keys}; one JSON result per line, in order.")(f)  # fmt: skip
        return f

    return decorate


_TRACE_HTML = click.option("--trace-html", type=click.Path(dir_okay=False),
                           help="Also write the run's trace as a self-contained HTML page.")


def _image_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed([
        click.option("--out", "-o", type=click.Path(dir_okay=False), help="Image file to write."),
        click.option("--seed", type=SEED_TYPE, help="Base seed (default: random, reported)."),
        click.option("--rounds", type=click.IntRange(min=1), help="Most attempts (default: settings)."),
        click.option("--steps", type=click.IntRange(min=1), help="Denoising steps per image."),
        click.option("--preview-scale", type=click.IntRange(1, MAX_SCALE), default=1, show_default=True,
                     help="Upscale the written image K times (nearest neighbour)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        _TRACE_HTML,
    ]):  # fmt: skip
        f = decorator(f)
    return f


def _run_image_command(ctx: click.Context, run: Callable[..., dict[str, Any]],
                       request: dict[str, Any], *, scale: int, trace_html: str | None,
                       as_json: bool) -> dict[str, Any]:  # fmt: skip
    """Run one request (generate, edit, ground, ask, critique) with a progress bar, Ctrl-C
    stopping it; write its trace page and, with `--json`, print the result. Returns the
    result for the caller's human summary."""
    if trace_html:
        from lavida_agent.errors import InvalidInputError

        _check_writable(trace_html, "--trace-html")
        if request.get("out") and Path(trace_html).resolve() == Path(request["out"]).resolve():
            raise InvalidInputError("--trace-html and --out name the same file")
        _not_the_input(trace_html, request.get("image"), "--trace-html")
    progress = _Progress(_progress_enabled(ctx))
    try:
        with _ctrl_c_stops_the_run() as cancel:
            agent = _loaded_agent(ctx, cancel)
            data = run(agent, {**request, "cancel": cancel}, scale=scale, on_event=progress)
    except BaseException as exc:  # a run that failed or stopped has its page too
        if getattr(exc, "run_id", None):
            with contextlib.suppress(Exception):  # the run's own error is the one to say
                _write_trace_html(ctx, exc.run_id, trace_html)  # type: ignore[attr-defined]
        raise
    finally:
        progress.close()
    if as_json:  # before the trace page: a page that cannot be written loses no result
        _echo_json(data)
    _write_trace_html(ctx, data["run_id"], trace_html)
    return data


def _loaded_agent(ctx: click.Context, cancel: threading.Event) -> LavidaAgent:
    """The agent with its model loaded; Ctrl-C during the load ends the command there, before
    any run (and its trace) exists."""
    agent = _agent(ctx)
    _ = agent.engine
    if cancel.is_set():
        raise KeyboardInterrupt  # reported as any Ctrl-C: status 130
    return agent


def _write_trace_html(ctx: click.Context, run_id: str, path: str | None) -> None:
    """Render the trace of `run_id` to `path` (no-op without a path)."""
    if not path:
        return
    from lavida_agent.tools.artifacts import ArtifactStore
    from lavida_agent.traces import load_trace, render_html

    settings = _agent(ctx).settings
    trace = load_trace(run_id, settings.runs_dir)
    page = render_html(trace, ArtifactStore(settings.artifacts_dir), runs_dir=settings.runs_dir)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(page, encoding="utf-8")


# ----------------------------------------------------------------------------------------
# The group
# ----------------------------------------------------------------------------------------


@click.group(cls=_LavidaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lavida-agent")
@click.option("--model", "model_path", metavar="PATH", help="Checkpoint folder (default: embedded).")
@click.option("--home", metavar="DIR", help="Home folder (default: ~/.lavida-agent).")
@click.option("--device", help="torch device, e.g. cpu or cuda.")
@_common
@click.pass_context
def cli(ctx: click.Context, model_path: str | None, home: str | None, device: str | None) -> None:
    """Run the Lavida-O style unified masked-diffusion model as an agent."""
    obj = ctx.ensure_object(dict)
    obj.update(model=model_path, home=home, device=device)


# ----------------------------------------------------------------------------------------
# generate / edit / ground / ask
# ----------------------------------------------------------------------------------------


@cli.command()
@click.argument("prompt", required=False)
@_image_options
@click.option("--plan/--no-plan", default=None,
              help="Plan a layout first (default: settings); without one, the model's unplanned "
                   "drawer draws (when it has one).")
@click.option("--review-plan", is_flag=True,
              help="Show the planned layout and let me keep or replace it before drawing.")
@_batch_options("generate")
@_common
@click.pass_context
def generate(ctx: click.Context, prompt: str | None, out: str | None, seed: int | None,
             rounds: int | None, steps: int | None, preview_scale: int, as_json: bool,
             trace_html: str | None, plan: bool | None, review_plan: bool, batch: IO[str] | None,
             workers: int) -> None:  # fmt: skip
    """Draw PROMPT: plan a layout, generate, critique, refine; write the best image to --out."""
    defaults = {"rounds": rounds, "steps": steps, "plan": plan, "seed": seed}
    _reject_with_batch(batch, {"PROMPT": prompt, "--out": out, "--trace-html": trace_html}, workers)
    if review_plan and batch is not None:
        raise click.UsageError("--review-plan asks about one layout; it cannot run with --batch")
    if review_plan and plan is False:
        raise click.UsageError("--review-plan needs a planned layout; drop --no-plan")
    if batch is not None:
        _run_batch(ctx, "generate", batch, defaults, scale=preview_scale, workers=workers)
        return
    if prompt is None or out is None:
        raise click.UsageError("generate needs PROMPT and --out (or --batch FILE)")
    request = {"prompt": prompt, "out": out, **defaults}
    if review_plan:
        request["plan"], request["review_plan"] = True, _review_plan_on_terminal
    data = _run_image_command(ctx, _run_generate, request, scale=preview_scale,
                              trace_html=trace_html, as_json=as_json)  # fmt: skip
    if not as_json:
        _echo_generate_summary(data)


def _echo_generate_summary(data: dict[str, Any]) -> None:
    """The human summary of a generate run: verdict, rounds, seed, run, and why not."""
    verdict = "accepted" if data["accepted"] else "best of rejected attempts"
    click.echo(f"{data['out']}: {verdict} after {data['rounds']} round(s){_kept(data)}, seed "
               f"{data['seed']}, run {data['run_id']}")  # fmt: skip
    for rejected in data["rejected_plans"]:
        click.echo(f"  plan rejected and redrawn: {'; '.join(rejected['problems'])}")
    if data["plan_problems"]:  # every re-plan failed too: the least wrong plan was drawn
        click.echo(f"  plan drawn with problems: {'; '.join(data['plan_problems'])}")
    kept = [a for a in data["attempts"] if a["image"] == data["result"]]
    if kept and not data["accepted"] and kept[0]["reasons"]:  # why even the best was rejected
        click.echo(f"  critique: {'; '.join(kept[0]['reasons'])}")
    if kept and kept[0]["grounding_failed"]:  # possible under grounding_check=rank
        click.echo(f"  grounding did not find: {', '.join(kept[0]['grounding_failed'])}")
    if kept and kept[0]["dropped_reasons"]:
        click.echo(f"  critique reasons dropped (not about the prompt): {'; '.join(kept[0]['dropped_reasons'])}")


@cli.command()
@click.argument("image", required=False)
@click.argument("instruction", required=False)
@_image_options
@_batch_options("edit")
@_common
@click.pass_context
def edit(ctx: click.Context, image: str | None, instruction: str | None, out: str | None,
         seed: int | None, rounds: int | None, steps: int | None, preview_scale: int,
         as_json: bool, trace_html: str | None, batch: IO[str] | None,
         workers: int) -> None:  # fmt: skip
    """Edit IMAGE by INSTRUCTION (ground, edit, verify, re-edit); write the result to --out.

    The result's thread_id is a session: continue it with `session edit THREAD_ID ...`.
    """
    defaults = {"rounds": rounds, "steps": steps, "seed": seed}
    _reject_with_batch(batch, {"IMAGE": image, "INSTRUCTION": instruction, "--out": out,
                               "--trace-html": trace_html}, workers)  # fmt: skip
    if batch is not None:
        _run_batch(ctx, "edit", batch, defaults, scale=preview_scale, workers=workers)
        return
    if image is None or instruction is None or out is None:
        raise click.UsageError("edit needs IMAGE, INSTRUCTION and --out (or --batch FILE)")
    request = {"image": image, "instruction": instruction, "out": out, **defaults}
    data = _run_image_command(ctx, _run_edit, request, scale=preview_scale,
                              trace_html=trace_html, as_json=as_json)  # fmt: skip
    if not as_json:
        _echo_edit_summary(data)


def _echo_edit_summary(data: dict[str, Any]) -> None:
    click.echo(f"{data['out']}: {_edit_verdict(data)} after {data['rounds']} round(s){_kept(data)}, seed "
               f"{data['seed']}, run {data['run_id']}, session {data['thread_id']}")  # fmt: skip
    _echo_edit_why(data)


def _edit_verdict(data: dict[str, Any]) -> str:
    return "verified" if data["accepted"] else "not verified (best attempt kept)"


def _echo_edit_why(data: dict[str, Any]) -> None:
    """Under a turn that was not verified: why its kept attempt was rejected, and (when the
    edit names an object the image was read not to hold) the caption it was read from."""
    if data["accepted"]:
        return
    attempts, kept = data.get("attempts") or [], data.get("kept")
    reasons = attempts[kept]["reasons"] if kept is not None and kept < len(attempts) else []
    if reasons:
        click.echo("  why: " + "; ".join(reasons))
    if data.get("absent") and data.get("caption"):
        click.echo(f"  the model read the image as: {data['caption']}")


def _kept(data: dict[str, Any]) -> str:
    """`, kept round R` when more than one round was drawn (rounds count from 0, as traces)."""
    return f", kept round {data['kept']}" if data.get("kept") is not None and data["rounds"] > 1 else ""


@cli.command()
@click.argument("run_id")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True,
              help="Image file to write.")
@click.option("--preview-scale", type=click.IntRange(1, MAX_SCALE), default=1, show_default=True,
              help="Upscale the written image K times (nearest neighbour).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_TRACE_HTML
@_common
@click.pass_context
def resume(ctx: click.Context, run_id: str, out: str, preview_scale: int, as_json: bool,
           trace_html: str | None) -> None:  # fmt: skip
    """Finish the generate or edit run RUN_ID that stopped part-way (Ctrl-C, an error, a
    killed process) from its last checkpoint, and write its image to --out. The rounds it
    finished are not drawn again; the result is what the whole run would have given."""

    def run(agent: LavidaAgent, request: dict[str, Any], *, scale: int,
            on_event: Any) -> dict[str, Any]:  # fmt: skip
        _check_out(request["out"])
        result = agent.resume(request["run_id"], on_event=on_event, cancel=request["cancel"])
        written = _write_image(result, request["out"], scale)
        return {"resumed_from": request["run_id"], "out": written, **result.to_dict()}

    _agent(ctx).check_resume(run_id)  # what cannot be resumed is said before the model loads
    data = _run_image_command(ctx, run, {"run_id": run_id, "out": out}, scale=preview_scale,
                              trace_html=trace_html, as_json=as_json)  # fmt: skip
    if not as_json:
        (_echo_generate_summary if "prompt" in data else _echo_edit_summary)(data)


@cli.command()
@click.argument("image", required=False)
@click.argument("expressions", nargs=-1)
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Draw the boxes to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_TRACE_HTML
@_batch_options("ground")
@_common
@click.pass_context
def ground(ctx: click.Context, image: str | None, expressions: tuple[str, ...], out: str | None,
           as_json: bool, trace_html: str | None, batch: IO[str] | None, workers: int) -> None:  # fmt: skip
    """Find each EXPRESSION in IMAGE; boxes are in IMAGE's pixels (x0 y0 x1 y1)."""
    _reject_with_batch(batch, {"IMAGE": image, "EXPRESSION": expressions, "--out": out,
                               "--trace-html": trace_html}, workers)  # fmt: skip
    if batch is not None:
        _run_batch(ctx, "ground", batch, {}, scale=1, workers=workers)
        return
    if image is None or not expressions:
        raise click.UsageError("ground needs IMAGE and at least one EXPRESSION (or --batch FILE)")
    data = _run_image_command(ctx, _run_ground, {"image": image, "expressions": list(expressions), "out": out},
                              scale=1, trace_html=trace_html, as_json=as_json)  # fmt: skip
    if as_json:
        return
    notes = {"scene": "\t(the object it picks out of the perceived scene)",
             "fit": "\t(a perceived object its noun fits better than the model's box)"}  # fmt: skip
    for expr, box, by, here in zip(data["expressions"], data["boxes"], data["found_by"], data["present"],
                                   strict=True):  # fmt: skip
        found = box[2] > box[0] and box[3] > box[1]
        where = " ".join(f"{v:g}" for v in box) if found else "not found"
        if here is False:
            click.echo(f"{expr}\tnot in the image" + (f"\t(nearest look-alike: {where})" if found else ""))
        else:
            click.echo(f"{expr}\t{where}{notes.get(by, '')}")


@cli.command()
@click.argument("image", required=False)
@click.argument("question", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_TRACE_HTML
@_batch_options("ask")
@_common
@click.pass_context
def ask(ctx: click.Context, image: str | None, question: str | None, as_json: bool,
        trace_html: str | None, batch: IO[str] | None, workers: int) -> None:  # fmt: skip
    """Answer QUESTION about IMAGE."""
    _reject_with_batch(batch, {"IMAGE": image, "QUESTION": question, "--trace-html": trace_html}, workers)
    if batch is not None:
        _run_batch(ctx, "ask", batch, {}, scale=1, workers=workers)
        return
    if image is None or question is None:
        raise click.UsageError("ask needs IMAGE and QUESTION (or --batch FILE)")
    data = _run_image_command(ctx, _run_ask, {"image": image, "question": question}, scale=1,
                              trace_html=trace_html, as_json=as_json)  # fmt: skip
    if not as_json:
        click.echo(data["answer"])


@cli.command()
@click.argument("image", required=False)
@click.argument("prompt", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_TRACE_HTML
@_batch_options("critique")
@_common
@click.pass_context
def critique(ctx: click.Context, image: str | None, prompt: str | None, as_json: bool,
             trace_html: str | None, batch: IO[str] | None, workers: int) -> None:  # fmt: skip
    """Judge whether IMAGE shows what PROMPT asks for; prints accept or reject and why."""
    _reject_with_batch(batch, {"IMAGE": image, "PROMPT": prompt, "--trace-html": trace_html}, workers)
    if batch is not None:
        _run_batch(ctx, "critique", batch, {}, scale=1, workers=workers)
        return
    if image is None or prompt is None:
        raise click.UsageError("critique needs IMAGE and PROMPT (or --batch FILE)")
    data = _run_image_command(ctx, _run_critique, {"image": image, "prompt": prompt}, scale=1,
                              trace_html=trace_html, as_json=as_json)  # fmt: skip
    if as_json:
        return
    how = {"scene": "read off the scene the model perceived", "model": "the model's critique"}
    click.echo(f"{data['verdict']}\t({how.get(data['judged_by'], data['judged_by'])})")
    for reason in data["reasons"]:
        click.echo(f"  - {reason}")


# ----------------------------------------------------------------------------------------
# session
# ----------------------------------------------------------------------------------------


@cli.group(cls=_LavidaGroup)
def session() -> None:
    """Multi-step edit sessions: start, edit, history, undo, redo, branch, show (resume by id)."""


def _session(ctx: click.Context, session_id: str) -> Any:
    from lavida_agent.errors import NotFoundError

    s = _agent(ctx).session(session_id)
    if not s.exists:
        raise NotFoundError(f"no session {session_id!r} (start one with `session start IMAGE`)")
    return s


def _session_state(s: Any, out: str | None, scale: int) -> dict[str, Any]:
    """The session's current image (written to `out` if given) and its step, as JSON."""
    st = s.state()
    data = {"session": s.thread_id, "current": str(s.agent.store.path(st.current)) if st.current else None,
            "step": st.current_step, "steps": len(st.steps)}  # fmt: skip
    if out:
        from lavida_agent.tools.images import resize_nearest, save_image

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_image(resize_nearest(s.current_image(crop=True), scale), out)  # in the input's shape, as `edit`
        data["out"] = out
    return data


@session.command("start")
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
@click.pass_context
def session_start(ctx: click.Context, image: str, as_json: bool) -> None:
    """Start a session from IMAGE; prints the session id."""
    s = _agent(ctx).session()
    s.start(image)
    data = _session_state(s, None, 1)
    _echo_json(data) if as_json else click.echo(s.thread_id)


@session.command("delete")
@click.argument("session_id")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
@click.pass_context
def session_delete(ctx: click.Context, session_id: str, dry_run: bool, as_json: bool) -> None:
    """Delete the session: every branch, the traces of its turns and the images nothing
    else refers to (as `lavida-agent delete SESSION_ID`)."""
    _say_cleanup(f"session {session_id}", _agent(ctx).delete_session(session_id, dry_run=dry_run), as_json,
                 {"ids": [session_id]})  # fmt: skip


@session.command("edit")
@click.argument("session_id")
@click.argument("instruction")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True,
              help="Image file to write.")  # fmt: skip
@click.option("--seed", type=SEED_TYPE, help="Base seed (default: random, reported).")
@click.option("--rounds", type=click.IntRange(min=1), help="Most attempts (default: settings).")
@click.option("--steps", type=click.IntRange(min=1), help="Denoising steps per image.")
@click.option("--preview-scale", type=click.IntRange(1, MAX_SCALE), default=1, show_default=True,
              help="Upscale the written image K times (nearest neighbour).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
@click.pass_context
def session_edit(ctx: click.Context, session_id: str, instruction: str, out: str,
                 seed: int | None, rounds: int | None, steps: int | None, preview_scale: int,
                 as_json: bool) -> None:  # fmt: skip
    """Apply INSTRUCTION to the session's current image (one turn)."""
    _check_out(out)
    s = _session(ctx, session_id)
    progress = _Progress(_progress_enabled(ctx))
    try:
        with _ctrl_c_stops_the_run() as cancel:
            _loaded_agent(ctx, cancel)
            result = s.edit(instruction, seed=seed, rounds=rounds, num_steps=steps,
                            on_event=progress, cancel=cancel)  # fmt: skip
    finally:
        progress.close()
    data = {"session": s.thread_id, "out": _write_image(result, out, preview_scale),
            **result.to_dict()}  # fmt: skip
    if as_json:
        _echo_json(data)
    else:
        history = s.history()  # committed turns on the current branch, this one last
        turn = history[-1].turn if history else 0  # numbered as `session history` shows it
        click.echo(f"{data['out']}: turn {turn} {_edit_verdict(data)} after {data['rounds']} round(s)"
                   f"{_kept(data)}, lineage step {data['step']}, run {data['run_id']} (undo: lavida-agent "
                   f"session undo {s.thread_id})")  # fmt: skip
        _echo_edit_why(data)


@session.command("history")
@click.argument("session_id")
@click.option("--all", "all_steps", is_flag=True,
              help="Every attempt of the current branch's lineage, not only the kept turns.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
@click.pass_context
def session_history(ctx: click.Context, session_id: str, all_steps: bool, as_json: bool) -> None:
    """The turns that made the session's current image, oldest first (a restart from a new
    image begins a new history; `--all` lists every attempt of the branch, the earlier ones
    too)."""
    s = _session(ctx, session_id)
    steps = s.steps() if all_steps else s.history()
    rows = [{"step": st.index, "turn": st.turn, "round": st.round,
             "instruction": st.instruction, "seed": st.seed,
             "verdict": st.critique.verdict if st.critique else None,
             "image": str(s.agent.store.path(st.result))} for st in steps]  # fmt: skip
    if as_json:
        _echo_json({"session": s.thread_id, "steps": rows})
        return
    for r in rows:
        click.echo(f"{r['step']}\tturn {r['turn']}\t{r['verdict']}\tseed {r['seed']}\t"
                   f"{r['instruction']}")  # fmt: skip
    if not rows:  # (on stderr: stdout stays one line per step for scripts)
        more = ("" if all_steps or not s.steps()
                else f"; earlier steps: lavida-agent session history {s.thread_id} --all")
        click.echo(f"(no edit made the current image: it is the session's input{more})", err=True)


def _step_name(step: int | None) -> str:
    """A lineage step for people: its number, or what the session holds before any edit."""
    return "none (the input image)" if step is None else str(step)


def _move_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--out`, `--json` and the common flags of `session undo/redo/branch`."""
    for decorator in reversed([
        click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write the current image."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        _common,
        click.pass_context,
    ]):  # fmt: skip
        f = decorator(f)
    return f


def _session_move(ctx: click.Context, session_id: str, out: str | None, as_json: bool,
                  move: Callable[[Any], Any]) -> None:  # fmt: skip
    """Undo, redo or branch: `move(session)`, then say (and with `out` write) where it is."""
    if out:
        _check_out(out)
    s = _session(ctx, session_id)
    move(s)
    data = _session_state(s, out, 1)
    _echo_json(data) if as_json else click.echo(f"current step: {_step_name(data['step'])}")


@session.command("undo")
@click.argument("session_id")
@_move_options
def session_undo(ctx: click.Context, session_id: str, out: str | None, as_json: bool) -> None:
    """Go back one turn (the undone branch stays in the history; `session redo` returns)."""
    _session_move(ctx, session_id, out, as_json, lambda s: s.undo())


@session.command("redo")
@click.argument("session_id")
@_move_options
def session_redo(ctx: click.Context, session_id: str, out: str | None, as_json: bool) -> None:
    """Return to where the last undo or branch left from."""
    _session_move(ctx, session_id, out, as_json, lambda s: s.redo())


@session.command("branch")
@click.argument("session_id")
@click.argument("step", type=int)
@click.option("--image", metavar="SHA", help="The step STEP whose result is this image (a "
              "sha256 prefix, as `session show` lists them), on whichever branch holds it.")
@_move_options
def session_branch(ctx: click.Context, session_id: str, step: int, image: str | None,
                   out: str | None, as_json: bool) -> None:  # fmt: skip
    """Make lineage STEP's image the current one (a new branch). Step numbers are per branch
    (after an undo, a new turn takes the next number again); --image picks among them."""
    _session_move(ctx, session_id, out, as_json, lambda s: s.branch(step, image=image))


@session.command("show")
@click.argument("session_id")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write the current image.")
@click.option("--preview-scale", type=click.IntRange(1, MAX_SCALE), default=1, show_default=True,
              help="Upscale the written image K times (nearest neighbour).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
@click.pass_context
def session_show(ctx: click.Context, session_id: str, out: str | None, preview_scale: int,
                 as_json: bool) -> None:  # fmt: skip
    """The session's current image and its lineage (every branch)."""
    from lavida_agent.graphs.session import step_key

    if out:
        _check_out(out)
    s = _session(ctx, session_id)
    data = _session_state(s, out, preview_scale)
    data["lineage"] = s.lineage(all_branches=True)
    if as_json:
        _echo_json(data)
        return
    click.echo(f"session {s.thread_id}: step {_step_name(data['step'])} of {data['steps']}, "
               f"current {data['current'] or 'none (no image yet)'}")  # fmt: skip
    current = s.state().steps[data["step"]] if data["step"] is not None else None
    for e in data["lineage"].get("edges", []):
        here = current is not None and e["key"] == step_key(current) and e["source"] == current.parent.sha256
        click.echo(f"{'*' if here else ' '} {e['source'][:10]} -> {e['target'][:10]}  #{e['index']} "
                   f"{e['verdict']}  {e['instruction']}")  # fmt: skip
    if data["lineage"].get("edges"):
        click.echo(f"(* marks the current image; to make another one current: lavida-agent session "
                   f"branch {s.thread_id} STEP --image TARGET, STEP the number after # above)", err=True)  # fmt: skip


# ----------------------------------------------------------------------------------------
# trace
# ----------------------------------------------------------------------------------------


@cli.command("trace")
@click.argument("run_id")
@click.option("--out", "-o", default="-", show_default=True,
              help="File to write ('-': stdout).")  # fmt: skip
@click.option("--scale", type=click.IntRange(1, MAX_SCALE), default=4, show_default=True,
              help="Image upscale factor.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The trace JSON instead of the HTML page.")
@_common
@click.pass_context
def trace_cmd(ctx: click.Context, run_id: str, out: str, scale: int, as_json: bool) -> None:
    """Render the trace of RUN_ID (or a trace .json file) as a self-contained HTML page."""
    from lavida_agent.tools.artifacts import ArtifactStore
    from lavida_agent.traces import load_trace, render_html

    settings = _settings(ctx)
    if out != "-":
        _check_writable(out)
    trace = load_trace(run_id, settings.runs_dir)
    if as_json:
        page = trace.to_json(indent=1)
    else:
        page = render_html(trace, ArtifactStore(settings.artifacts_dir), scale=scale,  # type: ignore[arg-type]
                           runs_dir=settings.runs_dir)  # fmt: skip
    if out == "-":
        click.echo(page)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(page, encoding="utf-8")
        click.echo(out, err=True)


@cli.command("runs")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many, newest first.")  # fmt: skip
@click.option("--unfinished", is_flag=True,
              help="Only generate and edit runs that did not finish (what `resume` takes).")
@click.option("--json", "as_json", is_flag=True, help="Print them as JSON lines.")
@_common
@click.pass_context
def runs_cmd(ctx: click.Context, limit: int, unfinished: bool, as_json: bool) -> None:
    """List the newest runs: id, workflow, status (ok, running, stopped, failed, unfinished,
    resumed), whether a generate or edit kept an accepted image, start, what was asked.
    `lavida-agent trace RUN_ID` shows one; `lavida-agent resume RUN_ID` finishes one."""
    from lavida_agent.traces import recent_runs

    runs = recent_runs(_settings(ctx).runs_dir, limit=limit, unfinished=unfinished)
    if not runs and not as_json:  # said on stderr: stdout stays the (empty) list
        click.echo("no unfinished runs" if unfinished else "no runs yet", err=True)
    for run in runs:
        if as_json:
            _echo_json(run)
            continue
        asked = run.get("prompt") or run.get("instruction") or run.get("question") or \
            ", ".join(run.get("expressions") or [])  # fmt: skip
        verdict = {True: "accepted", False: "rejected"}.get(run.get("accepted"), "")  # type: ignore[arg-type]
        click.echo(f"{run['run_id']}  {run['workflow']:<10} {run['status']:<10} {verdict:<8}  "
                   f"{run['started_at'][:19]}  {asked}")  # fmt: skip


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` or `0` as seconds."""
    text = value.strip().lower()
    try:
        seconds = float(text[:-1]) * _DURATION_UNITS[text[-1]] if text != "0" else 0.0
    except (KeyError, ValueError, IndexError):
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise click.BadParameter(f"{value!r} is not a duration: a number and a unit (s, m, h, d or w), "
                                 "e.g. 30d, or 0 for everything")  # fmt: skip
    return seconds


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _say_cleanup(what: str, done: Any, as_json: bool, asked: dict[str, Any]) -> None:
    """One line for what a delete or prune removed; with `--json`, `asked` (what the
    command was given) and the `Cleanup`."""
    if as_json:
        _echo_json({**asked, **done.to_dict()})
        return
    verb = "would delete" if done.dry_run else "deleted"
    runs = f"{len(done.runs)} run{'s' * (len(done.runs) != 1)}"
    busy = (f"; kept {len(done.busy)} with a run on it now ({', '.join(done.busy_runs) or 'an undo or a delete'})"
            if done.busy else "")  # fmt: skip
    waiting = (f"; {done.images_waiting} image{'s' * (done.images_waiting != 1)} nothing refers to stored within "
               "the hour stay (a run may not have recorded them yet; a prune after that takes them)"
               if done.images_waiting else "")  # fmt: skip
    click.echo(f"{verb} {what}: {runs}, {done.images} image{'s' * (done.images != 1)}, "
               f"{_mb(done.bytes_freed)}{busy}{waiting}")  # fmt: skip


@cli.command("delete")
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
@click.pass_context
def delete_cmd(ctx: click.Context, ids: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Delete runs and sessions by id, with their traces, checkpoints and the images nothing
    else refers to. A run goes with the runs that resumed it, a session with all its turns
    (a turn of a longer session cannot go alone). Every id is checked before anything is
    deleted; a run in progress is refused."""
    ids = tuple(dict.fromkeys(ids))
    _say_cleanup(", ".join(ids), _agent(ctx).delete(ids, dry_run=dry_run), as_json, {"ids": list(ids)})


@cli.command("prune")
@click.option("--older-than", "older_than", metavar="AGE", required=True, callback=_duration,
              help="Delete what was last active longer ago than AGE: 30d, 12h, 90m, 2w; 0: all.")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted (not what compacting the "
              "database gives back); delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
@click.pass_context
def prune_cmd(ctx: click.Context, older_than: float, dry_run: bool, as_json: bool) -> None:
    """Delete every run and session idle for longer than AGE (traces, checkpoints), then the
    images nothing refers to any more, and compact the database. What runs now is kept, and
    so are images stored in the last hour while anything runs."""
    done = _agent(ctx).prune(older_than, dry_run=dry_run)
    threads = len(done.threads)
    _say_cleanup(f"{threads} thread{'s' * (threads != 1)} (sessions and runs)", done, as_json,
                 {"older_than_s": older_than})  # fmt: skip


# ----------------------------------------------------------------------------------------
# bench / train / serve
# ----------------------------------------------------------------------------------------


def _import(module: str, what: str) -> Any:
    from lavida_agent.errors import InvalidInputError

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            raise InvalidInputError(f"{what} is not available in this installation "
                                    f"({module} is missing)") from exc  # fmt: skip
        raise


_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True,
                 "help_option_names": []}  # fmt: skip


@cli.group(cls=_LavidaGroup)
def bench() -> None:
    """Quality and speed benchmarks (JSON + Markdown reports)."""


@bench.command("quality", context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench_quality(ctx: click.Context, args: tuple[str, ...]) -> None:
    """ShapesWorld quality suites: t2i, edit, grounding, VQA, critique, the agents and
    multi-turn sessions, judged by the detector (`lavida-agent bench quality --help` for
    its options: --suites, --n, --seed, ...). The report goes to HOME/bench/quality unless
    --out says otherwise; the model and device are the ones --model / LAVIDA_MODEL_PATH and
    --device / LAVIDA_DEVICE name."""
    settings, obj = _settings(ctx), ctx.ensure_object(dict)
    obj["debug"] = obj.get("debug") or "--debug" in args  # this command's, as after any other
    obj["json"] = obj.get("json") or "--json" in args  # an error is then JSON on stdout too
    args = tuple(a for a in args if a != "--debug")
    given = {a.split("=", 1)[0] for a in args}
    defaults = []
    for option, value in (("--model-path", settings.model_path), ("--device", settings.device)):
        if value is not None and option not in given:
            defaults += [option, str(value)]
    quiet = ["--quiet"] if obj.get("quiet") and "--quiet" not in given else []
    main = _import("lavida_agent.benchmarks.quality", "the quality benchmark").main
    _exit_with(main([*defaults, *args, *quiet], prog="lavida-agent bench quality",
                    default_out=str(settings.home / "bench" / "quality")))  # fmt: skip


@bench.command("speed")
@click.option("--out", "-o", "out_dir", default=None, help="Report folder (default: HOME/bench/speed).")
@click.option("--quick", is_flag=True, help="A small, fast run.")
@_common
@click.pass_context
def bench_speed(ctx: click.Context, out_dir: str | None, quick: bool) -> None:
    """Speed suites (latency, per-step cost, elastic/caching speedups, batching)."""
    settings = _settings(ctx)
    run = _import("lavida_agent.benchmarks.speed_model", "the speed benchmark").run
    kwargs: dict[str, Any] = {"out_dir": out_dir or settings.home / "bench" / "speed",
                              "quick": quick}  # fmt: skip
    if settings.model_path is not None:
        kwargs["model_path"] = settings.model_path
    _echo_json(run(**kwargs))


@cli.group(cls=_LavidaGroup)
def train() -> None:
    """Train the VQ tokenizer or the model (arguments go to the training script)."""


def _exit_with(ret: Any) -> None:
    if isinstance(ret, int) and not isinstance(ret, bool) and ret != 0:
        raise click.exceptions.Exit(ret)
    if isinstance(ret, dict):
        _echo_json(ret)


def _run_trainer(ctx: click.Context, module: str, what: str, args: tuple[str, ...]) -> None:
    """`train vq|model`: the trainer's own command line, under this command's name; the
    global `--quiet` turns its progress bars off too."""
    quiet = ["--quiet"] if ctx.ensure_object(dict).get("quiet") else []
    _exit_with(_import(module, what).main([*args, *quiet], prog=f"lavida-agent train {ctx.info_name}"))


@train.command("vq", context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def train_vq(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Train the VQ image tokenizer (`lavida-agent train vq --help` for its options)."""
    _run_trainer(ctx, "lavida_agent.model.training_vq", "VQ training", args)


@train.command("model", context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def train_model(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Train the Elastic-MoT model (`lavida-agent train model --help` for its options)."""
    _run_trainer(ctx, "lavida_agent.model.training", "model training", args)


@train.command("blend")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("other", type=click.Path(exists=True, file_okay=False))
@click.option("--weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="How far PART's parameters move from BASE's to OTHER's.")
@click.option("--part", type=click.Choice(["understanding", "generation"]), default="understanding",
              show_default=True, help="The side OTHER was fine-tuned on (its `--trainable`).")
@click.option("--out", "dest", type=click.Path(file_okay=False), required=True, help="Pipeline folder to write.")
def train_blend(base: str, other: str, weight: float, part: str, dest: str) -> None:
    """Blend a one-sided fine-tune (OTHER) into its start (BASE): with the default part,
    images stay BASE's; with `--part generation`, answers, boxes and plans do."""
    from lavida_agent.errors import InvalidInputError

    training = _import("lavida_agent.model.training", "model training")
    try:
        out = training.blend_part(base, other, weight, dest, part=part)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    _echo_json({"out": str(out), "weight": weight, "part": part})


@train.command("export")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "dest", type=click.Path(file_okay=False), required=True, help="Pipeline folder to write.")
def train_export(run: str, dest: str) -> None:
    """Export RUN's latest checkpoint (`state.pt`, written every `--save-every` steps, also
    while it trains) as a pipeline folder, e.g. to benchmark a long run part-way."""
    from lavida_agent.errors import InvalidInputError

    training = _import("lavida_agent.model.training", "model training")
    try:
        out = training.export_checkpoint(run, dest)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    _echo_json({"run": run, **out})


def _attach(base: str, tuned: str, dest: str, kind: str, key: str, defaults: dict | None = None,
            rank: int | None = None) -> None:  # fmt: skip
    """`train drawer` / `planner` / `reader`: write BASE with TUNED's own weights for `kind`
    (and `defaults` in its pipeline_index.json; matrices as rank-`rank` changes if given)."""
    from lavida_agent.errors import InvalidInputError

    training = _import("lavida_agent.model.training", "model training")
    try:
        out = training.attach_weights(base, tuned, dest, kind=kind, defaults=defaults, rank=rank)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    _echo_json({"out": str(out), key: str(tuned)})


@train.command("drawer")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("drawer", type=click.Path(exists=True, file_okay=False))
@click.option("--for", "kind", type=click.Choice(["unplanned", "edit", "edit-regions"]), required=True,
              help="The rows it draws: `generate` without a plan; `edit` with neither a plan nor regions; "
                   "`edit` with regions (the local redraws of planned and agent edits).")
@click.option("--out", "dest", type=click.Path(file_okay=False), required=True, help="Pipeline folder to write.")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Store each weight matrix as its best rank-R change to BASE's (smaller; the written "
                   "pipeline uses that approximation). Default: whole weights.")
def train_drawer(base: str, drawer: str, kind: str, dest: str, rank: int | None) -> None:
    """Give BASE a second drawer for one kind of row: the drawing weights of DRAWER (BASE
    fine-tuned with `--trainable generation` on those rows). Everything else stays BASE's."""
    kind = kind.replace("-", "_")
    _attach(base, drawer, dest, kind, f"{kind}_drawer", rank=rank)


@train.command("planner")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("planner", type=click.Path(exists=True, file_okay=False))
@click.option("--for", "kind", type=click.Choice(["edit"]), required=True,
              help="The plans it writes: `plan_edit`'s boxes around the object an edit takes away.")
@click.option("--first-step", is_flag=True,
              help="It writes `plan_edit`'s first plan too, not only the boxes around the grounded object "
                   "(trained on whole edit plans: --edit-plan-given-removed below 1).")
@click.option("--out", "dest", type=click.Path(file_okay=False), required=True, help="Pipeline folder to write.")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Store each weight matrix as its best rank-R change to BASE's (smaller; the written "
                   "pipeline uses that approximation). Default: whole weights.")
def train_planner(base: str, planner: str, kind: str, first_step: bool, dest: str, rank: int | None) -> None:
    """Give BASE a planner for one kind of plan: the answer-side weights of PLANNER (BASE
    fine-tuned with `--trainable understanding` on those plans). Everything else stays BASE's."""
    _attach(base, planner, dest, f"{kind}_plan", f"{kind}_planner",
            defaults={"edit_planner_first_step": True} if first_step else None, rank=rank)


@train.command("reader")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("reader", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "dest", type=click.Path(file_okay=False), required=True, help="Pipeline folder to write.")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Store each weight matrix as its best rank-R change to BASE's (smaller; the written "
                   "pipeline uses that approximation). Default: whole weights.")
def train_reader(base: str, reader: str, dest: str, rank: int | None) -> None:
    """Give BASE a reader: the answer-side weights of READER (BASE fine-tuned with
    `--trainable understanding` on caption and question rows) write `understand`'s captions
    and answers (`ask`, and the perceptions of the agents' checks). Plans, boxes and verdicts
    stay BASE's."""
    _attach(base, reader, dest, "reader", "reader", rank=rank)


@cli.command()
@click.option("--host", help="Bind address (default: settings, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: settings, 8000).")
@click.option("--api-key", help="Require this bearer token.")
@_common
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, api_key: str | None) -> None:
    """Serve the HTTP API (native + OpenAI-compatible /v1/images/*), and the MCP tools at
    /mcp (streamable HTTP) when the MCP SDK is installed."""
    settings = _settings(ctx, host=host, port=port, api_key=api_key)
    server = _import("lavida_agent.server", "the HTTP server")
    app = server.create_app(settings)
    import uvicorn

    uvicorn.run(app, host=settings.host, port=settings.port)


@cli.command()
@_common
@click.pass_context
def mcp(ctx: click.Context) -> None:
    """Serve the agent's tools to an MCP host over stdio (generate, edit, ground, ask,
    critique, undo, redo, branch, history, resume, runs; images as lavida://images/
    resources).

    A host launches it; for Claude Desktop, in claude_desktop_config.json:
    {"mcpServers": {"lavida-agent": {"command": "/path/to/.venv/bin/lavida-agent",
    "args": ["mcp"]}}}. `lavida-agent serve` offers the same tools over HTTP at /mcp."""
    server = _import("lavida_agent.server", "the MCP server")
    create_mcp = server.mcp_factory(required=True)
    if sys.stdin.isatty():  # a person, not a host: say what this is waiting for
        click.echo("lavida-agent mcp: serving MCP on stdin/stdout; an MCP host launches this "
                   "command (see the README). Ctrl-C stops it.", err=True)  # fmt: skip
    create_mcp(_agent(ctx)).run("stdio")


@cli.group(cls=_LavidaGroup)
def comfyui() -> None:
    """ComfyUI nodes: Lavida Generate, Edit, Ground, Ask and Critique."""


@comfyui.command("install")
@click.argument("comfyui_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--force", is_flag=True, help="Replace a lavida_agent_nodes.py already there.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
def comfyui_install(comfyui_dir: str, force: bool, as_json: bool) -> None:
    """Add the nodes to the ComfyUI at COMFYUI_DIR: writes custom_nodes/lavida_agent_nodes.py,
    one import of `lavida_agent.comfyui`. Install lavida-agent into the Python that runs
    ComfyUI too (its `pip install`), then restart ComfyUI; the nodes are under
    'lavida-agent'."""
    from lavida_agent.comfyui import SHIM

    nodes = Path(comfyui_dir) / "custom_nodes"
    if not nodes.is_dir():
        raise click.ClickException(f"{comfyui_dir} has no custom_nodes folder: is it a ComfyUI "
                                   "checkout (the folder with main.py)?")  # fmt: skip
    target = nodes / "lavida_agent_nodes.py"
    if target.exists() and not force and target.read_text(encoding="utf-8") != SHIM:
        raise click.ClickException(f"{target} exists and is not ours to replace (--force "
                                   "replaces it)")  # fmt: skip
    target.write_text(SHIM, encoding="utf-8")
    _echo_json({"installed": str(target)}) if as_json else click.echo(target)


# ----------------------------------------------------------------------------------------
# Sub-command groups from other modules, and the entry point
# ----------------------------------------------------------------------------------------


def _add_group(group: click.Group) -> None:
    """Register a group from another module; its commands accept --quiet/--debug too."""
    for command in group.commands.values():
        if not any(p.name == "debug" for p in command.params):
            _common(command)  # click's option decorators also take a built Command
    cli.add_command(group)


def _register_subcommands() -> None:
    from lavida_agent.cli_world import world

    _add_group(world)
    try:
        from lavida_agent.cli_model import model
    except ImportError:  # the model CLI is optional (not every install ships it)
        return
    _add_group(model)


_register_subcommands()
_json_errors(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="lavida-agent")
