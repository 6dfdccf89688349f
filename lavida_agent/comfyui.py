"""ComfyUI nodes: the agent's generate, edit, ground, ask and critique as nodes of a graph.

ComfyUI loads a node pack from `ComfyUI/custom_nodes/`; `lavida-agent comfyui install
COMFYUI_DIR` writes a one-line module there that imports `NODE_CLASS_MAPPINGS` and
`NODE_DISPLAY_NAME_MAPPINGS` from here (install lavida-agent into ComfyUI's Python first).
Every node runs the same workflow as the CLI (plan, draw, critique, redraw; edit, verify,
re-edit), records its trace, and returns the run's JSON as a STRING beside its outputs:

    Lavida Generate  prompt, seed, rounds, steps, plan, upscale  -> IMAGE, STRING (JSON)
    Lavida Edit      IMAGE, instruction, seed, rounds, steps, upscale, session?
                                        -> IMAGE, STRING (`id:step:image` a line), STRING (JSON)
    Lavida Ground    IMAGE, expressions (one a line) -> MASK (one a line), IMAGE (boxes), STRING
    Lavida Ask       IMAGE, question                 -> STRING (answer), STRING (JSON)
    Lavida Critique  IMAGE, prompt                   -> BOOLEAN (accepted), STRING (JSON)

Images follow ComfyUI's convention: `[B, H, W, 3]` float tensors in `[0, 1]`; every image
of a batch is processed (an edit starts one session per image, one `id:step:image` a line). A
sampler loop drives ComfyUI's progress bar, and its Cancel stops the run at the next step
(the run can be finished later: `lavida-agent resume RUN_ID`). The embedded model draws on
a 64 px canvas; `upscale` enlarges the result nearest-neighbour for the canvas preview.

One agent serves every node of the process, built from `Settings()` (the `LAVIDA_*`
environment) on first use; `use_agent(agent)` sets another (a model path, a device).
"""

from __future__ import annotations

import json
import math
import threading
from typing import TYPE_CHECKING, Any

from lavida_agent.settings import SEED_LIMIT

if TYPE_CHECKING:
    from lavida_agent.api import LavidaAgent

__all__ = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "use_agent")

CATEGORY = "lavida-agent"
_agent_lock = threading.Lock()
_AGENT: LavidaAgent | None = None


def use_agent(agent: LavidaAgent | None) -> None:
    """Make `agent` the one every node runs on (None: build one from `Settings()` again on
    next use). The previous agent is not closed: its owner closes it."""
    global _AGENT
    with _agent_lock:
        _AGENT = agent


def _agent() -> LavidaAgent:
    global _AGENT
    with _agent_lock:
        if _AGENT is None:
            from lavida_agent.api import LavidaAgent

            _AGENT = LavidaAgent()
        return _AGENT


# ----------------------------------------------------------------------------------------
# ComfyUI's side: images, progress, Cancel (`comfy` exists only inside ComfyUI)
# ----------------------------------------------------------------------------------------


def _to_arrays(image: Any) -> list[Any]:
    """A ComfyUI IMAGE (`[B, H, W, C]` float in [0, 1]) as B uint8 `(H, W, 3)` arrays."""
    import numpy as np

    if getattr(image, "ndim", None) != 4 or image.shape[0] < 1 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image: expected a ComfyUI IMAGE [B, H, W, C], got shape "
                         f"{tuple(getattr(image, 'shape', ()))}")  # fmt: skip
    pixels = image.detach().float().clamp(0, 1).cpu().numpy()[..., :3]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return [np.round(p * 255).astype(np.uint8) for p in pixels]


def _to_image(arrays: list[Any], upscale: int = 1) -> Any:
    """uint8 `(H, W, 3)` arrays (one size) as a ComfyUI IMAGE, each upscaled `upscale`x."""
    import numpy as np
    import torch

    from lavida_agent.tools.images import resize_nearest

    scaled = [resize_nearest(a, upscale) if upscale != 1 else a for a in arrays]
    return torch.from_numpy(np.stack(scaled).astype(np.float32) / 255.0)


class _Run:
    """What a node passes as `on_event` and `cancel`: ComfyUI's progress bar follows each
    sampler loop, and its Cancel button sets `cancel` (the run stops at its next step)."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.bar: Any = None
        self.interrupted = False  # ComfyUI's Cancel stopped the run
        try:
            import comfy.model_management as mm
            import comfy.utils
        except ImportError:  # outside ComfyUI (a script, the tests): no bar, no Cancel
            self._mm, self._progress = None, None
        else:
            self._mm, self._progress = mm, comfy.utils.ProgressBar

    def __call__(self, event: dict[str, Any]) -> None:
        if self._mm is None:
            return
        if self._mm.processing_interrupted():
            self._stop()
        if event.get("event") == "sampler_step":
            if self.bar is None or event["step"] == 1:
                self.bar = self._progress(event["total"])
            try:  # ComfyUI's progress hook raises its interruption itself: stop our way
                self.bar.update_absolute(event["step"], event["total"])
            except self._mm.InterruptProcessingException:
                self._stop()

    def _stop(self) -> None:
        self.interrupted = True
        self.cancel.set()

    def stopped(self) -> None:
        """After a `GenerationCancelled`: raise ComfyUI's own interruption (a stop, not an
        error box) when its Cancel stopped the run."""
        if self._mm is None:
            return
        if self.interrupted:
            self._mm.interrupt_current_processing(False)  # ours to clear, as its own raise does
            raise self._mm.InterruptProcessingException()
        self._mm.throw_exception_if_processing_interrupted()


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, on_event=..., cancel=..., **kwargs)` with ComfyUI's progress and Cancel."""
    from lavida_agent.errors import GenerationCancelled

    run = _Run()
    try:
        return fn(*args, on_event=run, cancel=run.cancel, **kwargs)
    except GenerationCancelled:
        run.stopped()
        raise


def _json(data: Any) -> str:
    return json.dumps(data, default=str)


def _seed_input() -> tuple[str, dict[str, Any]]:
    return ("INT", {"default": 0, "min": 0, "max": SEED_LIMIT - 1, "control_after_generate": True,
                    "tooltip": "Base seed: round r draws with seed + r; the same seed redraws "
                               "the same images (a larger one linked in is taken modulo 2^63)."})  # fmt: skip


def _rounds_steps_upscale() -> dict[str, Any]:
    return {
        "rounds": ("INT", {"default": 3, "min": 1, "max": 8,
                           "tooltip": "Most attempts; the agent critiques each and keeps the best."}),
        "steps": ("INT", {"default": 16, "min": 1, "max": 64, "tooltip": "Denoising steps per image."}),
        "upscale": ("INT", {"default": 4, "min": 1, "max": 16,
                            "tooltip": "Enlarge the result this many times (nearest neighbour)."}),
    }  # fmt: skip


def _image_input() -> tuple[str, dict[str, Any]]:
    return ("IMAGE", {"tooltip": "Each image of a batch is processed."})


# ----------------------------------------------------------------------------------------
# The nodes
# ----------------------------------------------------------------------------------------


class LavidaGenerate:
    """Plan a layout, draw up to `rounds` attempts, critique each and keep the best."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "result")
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {"required": {
            "prompt": ("STRING", {"multiline": True, "default": "a red circle left of a blue square"}),
            "seed": _seed_input(),
            **_rounds_steps_upscale(),
            "plan": ("BOOLEAN", {"default": True, "tooltip": "Plan a layout before drawing."}),
        }}  # fmt: skip

    def run(self, prompt: str, seed: int, rounds: int, steps: int, upscale: int,
            plan: bool) -> tuple[Any, str]:  # fmt: skip
        result = _call(_agent().generate, prompt, seed=seed % SEED_LIMIT, rounds=rounds, num_steps=steps,
                       plan=plan)  # fmt: skip
        return _to_image([result.image], upscale), _json(result.to_dict())


class LavidaEdit:
    """Edit by an instruction: plan what changes where, edit, verify, re-edit. `session`
    names the step each result is (`<session id>:<step>:<image>`); feed it to another Lavida
    Edit to edit that image next, in the same session."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("image", "session", "result")
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {
            "required": {
                "image": _image_input(),
                "instruction": ("STRING", {"multiline": True, "default": "make the red circle blue"}),
                "seed": _seed_input(),
                **_rounds_steps_upscale(),
            },
            "optional": {
                "session": ("STRING", {"default": "", "tooltip": "Edit these session steps "
                                       "instead of `image`: one `<session id>:<step>:<image>` a "
                                       "line, as a Lavida Edit's `session` output gives them (a "
                                       "bare session id edits its current image)."}),
            },
        }  # fmt: skip

    @classmethod
    def IS_CHANGED(cls, session: str | None = None, **_: Any) -> str:  # noqa: N802
        """ComfyUI reruns a node whose inputs are unchanged only when this changes: a bare
        session id typed in edits whatever image is current, so its current image counts.
        (`id:step:image` pins the image; ComfyUI passes linked inputs here as None.)"""
        if not session:
            return ""
        agent = _agent()
        heads = []
        for line in (s.strip() for s in session.splitlines()):
            if line and ":" not in line and agent.session(line).exists:
                state = agent.session(line).state()
                heads.append(f"{line}:{state.current_step}:{state.current.sha256 if state.current else ''}")
        return "\n".join(heads)

    def run(self, image: Any, instruction: str, seed: int, rounds: int, steps: int,
            upscale: int, session: str = "") -> tuple[Any, str, str]:  # fmt: skip
        agent = _agent()
        kw = {"seed": seed % SEED_LIMIT, "rounds": rounds, "num_steps": steps}
        lines = [s.strip() for s in session.splitlines() if s.strip()]
        if lines:
            results = [_call(_at_step(agent, line).edit, instruction, **kw) for line in lines]
        else:
            results = [_call(agent.edit, a, instruction, **kw) for a in _to_arrays(image)]
        return (_to_image([r.content() for r in results], upscale),
                "\n".join(f"{r.thread_id}:{r.step}:{r.image_ref.sha256[:16]}" for r in results),
                _json([r.to_dict() for r in results] if len(results) > 1 else results[0].to_dict()))  # fmt: skip


def _at_step(agent: LavidaAgent, line: str) -> Any:
    """The session a `session` line names, on the step it names (`id:step:image`: a new
    branch when that is not the current image, so a graph queued again, or two Edits fed
    from one, each edit that image)."""
    thread_id, *rest = line.split(":")
    session = agent.session(thread_id)
    if rest:
        if len(rest) != 2 or not rest[0].isdigit() or not rest[1]:
            raise ValueError(f"session: {line!r} is not <session id>:<step>:<image>")
        step, image = int(rest[0]), rest[1]
        state = session.state() if session.exists else None
        current = state.steps[state.current_step] if state and state.current_step is not None else None
        if not (state and state.current_step == step and current.result.sha256.startswith(image)):
            session.branch(step, image=image)
    return session


class LavidaGround:
    """Find each expression (one a line) in the image: one mask per expression (its box),
    the image with the boxes drawn, and the boxes as JSON. An expression the image does not
    hold (`present` false in the JSON) gets an empty mask and no box drawn; `found_by` says
    how each box was chosen."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MASK", "IMAGE", "STRING")
    RETURN_NAMES = ("masks", "boxes_drawn", "result")
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The first image of a batch is grounded."}),
            "expressions": ("STRING", {"multiline": True, "default": "the red circle"}),
        }}  # fmt: skip

    def run(self, image: Any, expressions: str) -> tuple[Any, Any, str]:
        import torch

        from lavida_agent.tools.draw import draw_boxes

        exprs = [e.strip() for e in expressions.splitlines() if e.strip()]
        pixels = _to_arrays(image)[0]
        result = _call(_agent().ground, pixels, exprs)
        h, w = pixels.shape[:2]
        masks = torch.zeros((len(exprs), h, w), dtype=torch.float32)
        for mask, item, here in zip(masks, result.boxes, result.present, strict=True):
            if here is False:
                continue  # not in the image: an empty mask
            x0, y0, x1, y1 = item.box.as_list()  # pixel edges: cover every pixel the box touches
            mask[max(0, math.floor(y0)):min(h, math.ceil(y1)), max(0, math.floor(x0)):min(w, math.ceil(x1))] = 1.0
        shown = result.located
        drawn = draw_boxes(pixels, [b.box.as_list() for b in shown], labels=[b.label for b in shown])
        return masks, _to_image([drawn]), _json(result.to_dict())


class LavidaAsk:
    """Answer a question about the image (the first of a batch)."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("answer", "result")
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The first image of a batch is read."}),
            "question": ("STRING", {"multiline": True, "default": "what color is the circle?"}),
        }}  # fmt: skip

    def run(self, image: Any, question: str) -> tuple[str, str]:
        result = _call(_agent().ask, _to_arrays(image)[0], question)
        return result.answer, _json(result.to_dict())


class LavidaCritique:
    """Does the image (the first of a batch) show what the prompt asks for? `accepted`, and
    the verdict with its reasons as JSON."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("BOOLEAN", "STRING")
    RETURN_NAMES = ("accepted", "result")
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The first image of a batch is judged."}),
            "prompt": ("STRING", {"multiline": True, "default": "a red circle left of a blue square"}),
        }}  # fmt: skip

    def run(self, image: Any, prompt: str) -> tuple[bool, str]:
        result = _call(_agent().critique, _to_arrays(image)[0], prompt)
        return result.ok, _json(result.to_dict())


NODE_CLASS_MAPPINGS = {
    "LavidaGenerate": LavidaGenerate,
    "LavidaEdit": LavidaEdit,
    "LavidaGround": LavidaGround,
    "LavidaAsk": LavidaAsk,
    "LavidaCritique": LavidaCritique,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LavidaGenerate": "Lavida Generate",
    "LavidaEdit": "Lavida Edit",
    "LavidaGround": "Lavida Ground",
    "LavidaAsk": "Lavida Ask",
    "LavidaCritique": "Lavida Critique",
}

SHIM = '''"""lavida-agent's ComfyUI nodes (written by `lavida-agent comfyui install`)."""
from lavida_agent.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''
"""The module `lavida-agent comfyui install` writes into `custom_nodes/`."""
