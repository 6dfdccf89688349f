"""ShapesWorld text: typed specs, generators and parsers for every grammar of SHAPES_WORLD.md.

One module owns the words of the world, so the data generator, the model's task formats,
the checkers and the command line all read and write the same sentences:

- **T2I prompts** (7 GenEval-style categories): `PromptSpec`, `sample_prompt`, `prompt_text`,
  `parse_prompt`, `scene_for_prompt`.
- **Edit instructions** (7 ImgEdit-style categories): `EditSpec`, `sample_edit`, `edit_text`,
  `parse_edit`, `apply_edit`.
- **Referring expressions** (5 RefCOCO-style forms): `RefSpec`, `sample_refexp`,
  `refexp_text`, `parse_refexp`, `resolve_refexp`.
- **Questions** (count, color, shape, exist, relation, background, caption): `QuestionSpec`,
  `sample_question`, `question_text`, `parse_question`, `answer`, `caption`.
- **Plans**: `plan_items`.
- **Critique**: the fixed reason vocabulary (`REASON_TEMPLATES`, `reason`), `prompt_reasons`
  (what is wrong with a scene for a prompt, shared with `checkers.check_prompt`),
  `sample_critique` and `parse_verdict`.

Generators write canonical text: lower case, `an` before a vowel, English plurals, no final
punctuation except `?` on questions and `.` on `describe the image.`. Parsers accept anything
in the grammar written by anyone: any case, extra spaces, a trailing `.`/`?`/`!`, `a` and
`an` either way, singular or plural nouns, `grey`/`centre`/`colour` spellings and digits
`1`-`4` for counts. Anything else raises `GrammarError` naming the word and what was
expected there. For every spec `s` a generator can produce, `parse_x(x_text(s)) == s`.

Choices where SHAPES_WORLD.md is silent (a careful user's reading, tested):

- Prompt categories are inferred from the words: a relation makes `position`, a number word
  `counting`, a size `size`, two differently coloured objects `color_attr`, other pairs
  `two_object`, one object `colors` or `single_object`. A prompt may list up to 4 objects.
- Edits keep the size class on recolor, replace and move; `larger`/`smaller` keep the
  centre within 4 px. Added objects get a random size unless one is named.
- Question answers for an absent referent are `nothing`; a relation question with several
  answers lists them left to right (`a red circle and a blue square`).
- Plan labels are `{size} {color} {shape}`, the caption's words without the article.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from lavida_agent.tools.boxes import round_half_up
from lavida_agent.tools.shapes_world.graph import SIDES as _GRAPH_SIDES
from lavida_agent.tools.shapes_world.graph import extreme, related
from lavida_agent.tools.shapes_world.sampler import place_object
from lavida_agent.tools.shapes_world.scene import (
    BACKGROUNDS,
    COLORS,
    MAX_OBJECTS,
    NUMBERS,
    REGIONS,
    RELATION_SLACK,
    RELATIONS,
    SHAPES,
    SIZES,
    Box,
    Object,
    Scene,
    boxes_apart,
    holds,
    region_of,
    size_class,
    valid_box,
    valid_scene,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PROMPT_CATEGORIES", "EDIT_CATEGORIES", "REF_FORMS", "QUESTION_KINDS", "SIDES",
    "REASON_TEMPLATES", "GrammarError", "Noun", "ObjectReq", "PromptSpec", "EditSpec", "RefSpec",
    "QuestionSpec", "question_kind_weights", "prompt_category_weights", "edit_category_weights", "sample_edit_on_new_scene", "sample_prompt", "prompt_text", "parse_prompt", "scene_for_prompt", "canonical_scene_for_prompt",
    "sample_edit", "edit_text", "parse_edit", "apply_edit", "referable", "sample_refexp",
    "refexp_text", "parse_refexp", "resolve_refexp", "sample_question", "question_text",
    "parse_question", "answer", "presupposition_holds", "caption", "DESCRIBE", "Caption", "parse_caption", "plan_items", "plan_objects", "plan_reasons", "reason", "prompt_reasons", "reason_fits_prompt", "sample_critique",
    "verdict_text", "parse_verdict", "article",
]  # fmt: skip

PROMPT_CATEGORIES: tuple[str, ...] = (
    "single_object", "colors", "two_object", "counting", "position", "color_attr", "size",
)  # fmt: skip
EDIT_CATEGORIES: tuple[str, ...] = (
    "recolor", "remove", "add", "move", "resize", "replace", "background",
)  # fmt: skip
REF_FORMS: tuple[str, ...] = ("color", "shape", "size", "extreme", "relation")
QUESTION_KINDS: tuple[str, ...] = (
    "count", "color", "shape", "exist", "relation", "background", "caption",
)  # fmt: skip
SIDES: tuple[str, ...] = tuple(_GRAPH_SIDES)  # `the {shape} on the {side}`
DIRECTIONS: tuple[str, ...] = ("larger", "smaller")
RECOLOR_TEMPLATES: tuple[str, ...] = ("make", "change")

# Spellings people write that mean a grammar word; nothing beyond these is rewritten.
_ALIASES = {"an": "a", "grey": "gray", "centre": "center", "colour": "color", "middle": "center"}
_DIGITS = {"1": "one", "2": "two", "3": "three", "4": "four"}
_KNOWN_WORDS = frozenset(
    w
    for phrase in (
        *SHAPES, *COLORS, *BACKGROUNDS, *SIZES, *RELATIONS, *REGIONS, *NUMBERS, *SIDES,
        *DIRECTIONS, "a the and on at to of into is are there what how many which object",
        "objects make change remove add move turn background describe image color shape",
    )  # fmt: skip
    for w in phrase.split()
) | {s + "s" for s in SHAPES}

_SHAPE_LIST = ", ".join(SHAPES)
_COLOR_LIST = ", ".join(COLORS)
_BG_LIST = ", ".join(BACKGROUNDS)
_SIZE_LIST = ", ".join(SIZES)
_REL_LIST = ", ".join(RELATIONS)
_REGION_LIST = ", ".join(REGIONS)


class GrammarError(ValueError):
    """Text outside a ShapesWorld grammar; the message names the word and what was expected."""


# =========================================================================== English helpers


def article(word: str) -> str:
    """`"an"` before a vowel sound (`an orange circle`), else `"a"`."""
    return "an" if word[:1] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def _plural(shape: str) -> str:
    return shape + "s"  # every ShapesWorld shape takes a plain -s


def _join(items: Sequence[str]) -> str:
    """`x`, `x and y`, `x, y and z`."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    """One element of `seq`, drawn with `rng` (keeps Python types, unlike `rng.choice`)."""
    return seq[int(rng.integers(len(seq)))]


# =========================================================================== the tokenizer


class _Reader:
    """Words of one sentence with a cursor; every parse error goes through `error`."""

    def __init__(self, text: str, what: str) -> None:
        if not isinstance(text, str):
            raise GrammarError(f"{what} must be a string, got {type(text).__name__}")
        self.text = text
        self.what = what
        cleaned = text.strip().lower().rstrip(" .?!").replace(",", " , ")
        words = [_ALIASES.get(w, w) for w in cleaned.split()]
        self.words = words
        self.i = 0

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.words[j] if j < len(self.words) else None

    def at_end(self) -> bool:
        return self.i >= len(self.words)

    def at(self, phrase: str) -> bool:
        parts = phrase.split()
        return self.words[self.i : self.i + len(parts)] == parts

    def accept(self, phrase: str) -> bool:
        if self.at(phrase):
            self.i += len(phrase.split())
            return True
        return False

    def expect(self, phrase: str, desc: str | None = None) -> None:
        if not self.accept(phrase):
            raise self.error(desc or f"'{phrase}'")

    def option(self, phrases: Iterable[str]) -> str | None:
        """The longest of `phrases` at the cursor (consumed), or None."""
        for phrase in sorted(phrases, key=lambda p: -len(p.split())):
            if self.accept(phrase):
                return phrase
        return None

    def choice(self, phrases: Iterable[str], desc: str) -> str:
        found = self.option(phrases)
        if found is None:
            raise self.error(desc)
        return found

    def end(self, desc: str = "the end of the sentence") -> None:
        if not self.at_end():
            raise self.error(desc)

    def error(self, desc: str) -> GrammarError:
        word = self.peek()
        if word is None:
            return GrammarError(f"{self.what} {self.text!r} ends early; expected {desc}")
        kind = "unexpected word" if word in _KNOWN_WORDS else "unknown word"
        return GrammarError(f"{kind} {word!r} in {self.what} {self.text!r}; expected {desc}")

    def shape(self) -> tuple[str, bool]:
        """A shape word, singular or plural; returns `(shape, plural)`."""
        word = self.peek()
        if word in SHAPES:
            self.i += 1
            return word, False
        if word is not None and word.endswith("s") and word[:-1] in SHAPES:
            self.i += 1
            return word[:-1], True
        raise self.error(f"a shape: {_SHAPE_LIST}")

    def noun(self, *, sizes: bool = True) -> tuple[Noun, bool]:
        """`{size?} {color?} {shape}`; returns the noun and whether the shape was plural."""
        size = self.option(SIZES) if sizes else None
        color = self.option(COLORS)
        shape, plural = self.shape()
        return Noun(shape, color, size), plural


# =========================================================================== shared specs


@dataclass(frozen=True)
class Noun:
    """An object description: a shape and optionally a colour and a size class.

    Attributes:
        shape: One of `SHAPES`.
        color: One of `COLORS`, or None for any colour.
        size: `"small"`, `"large"`, or None for either.
    """

    shape: str
    color: str | None = None
    size: str | None = None

    def __post_init__(self) -> None:
        _check_word(self.shape, SHAPES, "shape")
        _check_word(self.color, COLORS, "color", optional=True)
        _check_word(self.size, SIZES, "size", optional=True)

    @property
    def text(self) -> str:
        """`"small red circle"`: the named words, without an article."""
        return " ".join(w for w in (self.size, self.color, self.shape) if w)

    @property
    def plural_text(self) -> str:
        return " ".join(w for w in (self.size, self.color, _plural(self.shape)) if w)

    def matches(self, obj: Object) -> bool:
        """Whether `obj` fits every named attribute."""
        return (
            obj.shape == self.shape
            and (self.color is None or obj.color == self.color)
            and (self.size is None or obj.size == self.size)
        )

    @classmethod
    def of(cls, obj: Object) -> Noun:
        """The colour-and-shape noun edits and answers use for `obj`."""
        return cls(obj.shape, obj.color)


def _check_word(
    value: str | None, allowed: Iterable[str], what: str, optional: bool = False
) -> None:
    allowed = tuple(allowed)
    if value is None and optional:
        return
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


def _matching(objects: Sequence[Object], noun: Noun) -> list[int]:
    return [i for i, o in enumerate(objects) if noun.matches(o)]


def _unique(objects: Sequence[Object], noun: Noun) -> int | None:
    hits = _matching(objects, noun)
    return hits[0] if len(hits) == 1 else None


def _left_to_right(objects: Sequence[Object], indices: Iterable[int]) -> list[int]:
    return sorted(indices, key=lambda i: (objects[i].center[0], objects[i].center[1]))


# =========================================================================== T2I prompts


@dataclass(frozen=True)
class ObjectReq:
    """One requirement of a prompt: `count` objects fitting the noun.

    Attributes:
        shape: One of `SHAPES`.
        color: A colour, or None for any.
        size: A size class, or None for either.
        count: How many such objects the prompt asks for (1..4).
    """

    shape: str
    color: str | None = None
    size: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_OBJECTS:
            raise ValueError(f"count must be 1..{MAX_OBJECTS}, got {self.count}")
        Noun(self.shape, self.color, self.size)  # validates the words

    @property
    def noun(self) -> Noun:
        return Noun(self.shape, self.color, self.size)

    def matches(self, obj: Object) -> bool:
        return self.noun.matches(obj)


@dataclass(frozen=True)
class PromptSpec:
    """A parsed text-to-image prompt.

    Attributes:
        category: One of `PROMPT_CATEGORIES`.
        objects: The requirements, in the order the prompt names them.
        relation: `(a, relation, b)` with indices into `objects` (position prompts), or None.
        background: The named background, or None when the prompt allows any.
    """

    category: str
    objects: tuple[ObjectReq, ...]
    relation: tuple[int, str, int] | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        _check_word(self.category, PROMPT_CATEGORIES, "prompt category")
        _check_word(self.background, BACKGROUNDS, "background", optional=True)
        object.__setattr__(self, "objects", tuple(self.objects))
        if not self.objects:
            raise ValueError("a prompt needs at least one object")
        if sum(r.count for r in self.objects) > MAX_OBJECTS:
            raise ValueError(f"a prompt asks for at most {MAX_OBJECTS} objects")
        if self.relation is not None:
            a, rel, b = self.relation
            object.__setattr__(self, "relation", (int(a), rel, int(b)))
            _check_word(rel, RELATIONS, "relation")

    @property
    def total(self) -> int:
        """How many objects a correct image holds."""
        return sum(r.count for r in self.objects)


def _req_text(req: ObjectReq, counting: bool) -> str:
    noun = req.noun
    if counting:
        words = noun.text if req.count == 1 else noun.plural_text
        return f"{NUMBERS[req.count]} {words}"
    return _with_article(noun.text)


def prompt_text(spec: PromptSpec) -> str:
    """The canonical prompt for `spec` (`a red circle left of a blue square`)."""
    counting = spec.category == "counting"
    parts = [_req_text(r, counting) for r in spec.objects]
    if spec.relation is not None:
        a, rel, b = spec.relation
        text = f"{parts[a]} {rel} {parts[b]}"
    else:
        text = _join(parts)
    if spec.background is not None:
        text += f" on a {spec.background} background"
    return text


def _prompt_category(reqs: Sequence[ObjectReq], numerals: bool, relation: bool) -> str:
    if relation:
        return "position"
    if numerals:
        return "counting"
    if any(r.size is not None for r in reqs):
        return "size"
    if len(reqs) == 1:
        return "colors" if reqs[0].color is not None else "single_object"
    colors = [r.color for r in reqs]
    if len(reqs) == 2 and None not in colors and colors[0] != colors[1]:
        return "color_attr"
    return "two_object"


def _background_suffix(r: _Reader) -> str | None:
    """` on a {bg} background` at the cursor, or None when the sentence ends."""
    if r.at_end():
        return None
    r.expect("on", "'and', a relation or ' on a {bg} background'")
    r.expect("a", "'a' (as in 'on a white background')")
    bg = r.choice(BACKGROUNDS, f"a background: {_BG_LIST}")
    r.expect("background", "'background'")
    return bg


def parse_prompt(text: str) -> PromptSpec:
    """Parse a T2I prompt into a `PromptSpec`.

    Args:
        text: A prompt in the grammar of SHAPES_WORLD.md, e.g. `"Two red circles."`.

    Returns:
        The spec; its category is inferred from the words (see the module docstring).

    Raises:
        GrammarError: Naming the first word that does not fit, or a prompt asking for more
            than 4 objects.
    """
    r = _Reader(text, "prompt")
    reqs: list[ObjectReq] = []
    numerals = False
    relation: tuple[int, str, int] | None = None
    while True:
        det = r.option(("a", *NUMBERS[1:], *_DIGITS))
        if det is None:
            raise r.error(f"'a' or a number ({', '.join(NUMBERS[1:])})")
        numerals |= det != "a"
        count = 1 if det == "a" else NUMBERS.index(_DIGITS.get(det, det))
        noun, _ = r.noun()
        reqs.append(ObjectReq(noun.shape, noun.color, noun.size, count))
        if r.accept(",") or r.accept("and"):
            continue
        rel = r.option(RELATIONS)
        if rel is not None:
            if len(reqs) != 1 or relation is not None:
                raise GrammarError(
                    f"relation {rel!r} in prompt {text!r} must join exactly two objects "
                    "('a red circle left of a blue square')"
                )
            relation = (0, rel, 1)
            continue
        break
    if relation is not None and (len(reqs) != 2 or any(q.count != 1 for q in reqs)):
        raise GrammarError(f"prompt {text!r}: a relation joins exactly one object to one object")
    background = _background_suffix(r)
    r.end("the end of the prompt")
    total = sum(q.count for q in reqs)
    if total > MAX_OBJECTS:
        raise GrammarError(
            f"prompt {text!r} asks for {total} objects; a scene holds at most {MAX_OBJECTS}"
        )
    category = _prompt_category(reqs, numerals, relation is not None)
    return PromptSpec(category, tuple(reqs), relation, background)


def _maybe(rng: np.random.Generator, p: float, value: Any) -> Any:
    return value if rng.random() < p else None


def _sample_prompt_spec(rng: np.random.Generator, category: str) -> PromptSpec:
    colors, shapes, sizes = list(COLORS), list(SHAPES), list(SIZES)
    relation = None
    if category == "single_object":
        reqs = [ObjectReq(_pick(rng, shapes))]
    elif category == "colors":
        reqs = [ObjectReq(_pick(rng, shapes), _pick(rng, colors))]
    elif category == "two_object":
        # Two different shapes; colours optional but never two different ones (that
        # sentence is a color_attr prompt).
        s1, s2 = (str(s) for s in rng.permutation(shapes)[:2])
        mode = int(rng.integers(4))
        c = _pick(rng, colors)
        c1, c2 = [(None, None), (c, None), (None, c), (c, c)][mode]
        reqs = [ObjectReq(s1, c1), ObjectReq(s2, c2)]
    elif category == "counting":
        reqs = [ObjectReq(_pick(rng, shapes), _maybe(rng, 0.5, _pick(rng, colors)),
                          count=int(rng.integers(1, MAX_OBJECTS + 1)))]  # fmt: skip
    elif category in ("position", "color_attr"):
        while True:
            a = ObjectReq(_pick(rng, shapes), _pick(rng, colors))
            b = ObjectReq(_pick(rng, shapes), _pick(rng, colors))
            if (a.color != b.color) if category == "color_attr" else (a != b):
                break
        reqs = [a, b]
        if category == "position":
            relation = (0, _pick(rng, RELATIONS), 1)
    elif category == "size":
        while True:
            a, b = (ObjectReq(_pick(rng, shapes), _maybe(rng, 0.5, _pick(rng, colors)),
                              _pick(rng, sizes)) for _ in range(2))  # fmt: skip
            if a != b:
                break
        reqs = [a, b]
    else:
        raise ValueError(
            f"unknown prompt category {category!r}; expected one of {PROMPT_CATEGORIES}"
        )
    background = _maybe(rng, 0.3, _pick(rng, list(BACKGROUNDS)))
    return PromptSpec(category, tuple(reqs), relation, background)


def sample_prompt(
    rng: np.random.Generator, category: str | None = None, weights: Mapping[str, float] | None = None
) -> tuple[str, PromptSpec]:
    """Draw a prompt of `category` (uniform over the 7 categories when None).

    Args:
        rng: The random generator; the only source of randomness.
        category: One of `PROMPT_CATEGORIES`, or None.
        weights: with no `category`, the relative weight of each of `PROMPT_CATEGORIES`
            (missing ones: 0) instead of uniform.

    Returns:
        `(text, spec)` with `parse_prompt(text) == spec`.
    """
    if category is None and weights is not None:
        w = prompt_category_weights(weights)
        category = PROMPT_CATEGORIES[int(rng.choice(len(w), p=w / w.sum()))]
    category = category or _pick(rng, PROMPT_CATEGORIES)
    spec = _sample_prompt_spec(rng, category)
    return prompt_text(spec), spec


def scene_for_prompt(rng: np.random.Generator, spec: PromptSpec, max_tries: int = 100) -> Scene:
    """A random scene that is correct for `spec` (training data for text-to-image).

    Unnamed colours, sizes and the background are drawn at random; the scene holds exactly
    the objects the prompt asks for, placed by the sampler's `place_object`.

    Raises:
        RuntimeError: If no layout was found in `max_tries` attempts (never seen in practice).
    """
    for _ in range(max_tries):
        background = spec.background or _pick(rng, list(BACKGROUNDS))
        objects: list[Object] = []
        for req in spec.objects:
            for _ in range(req.count):
                color = req.color or _pick(rng, list(COLORS))
                size = req.size or _pick(rng, list(SIZES))
                obj = place_object(rng, req.shape, color, size, [o.box for o in objects])
                if obj is None:
                    break
                objects.append(obj)
        if len(objects) != spec.total:
            continue
        scene = Scene(background, tuple(objects))
        if not prompt_reasons(spec, scene):
            return scene
    raise RuntimeError(f"no scene found for prompt {prompt_text(spec)!r} in {max_tries} tries")


_SLOTS: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((32, 32),),
    2: ((17, 32), (47, 32)),
    3: ((17, 17), (47, 17), (32, 47)),
    4: ((17, 17), (47, 17), (17, 47), (47, 47)),
}
"""Canonical object centres by object count: one in the middle, two side by side, three
and four on a grid; objects fill them in the order the prompt names them."""

_RELATION_SLOTS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "left of": ((17, 32), (47, 32)), "right of": ((47, 32), (17, 32)),
    "above": ((32, 17), (32, 47)), "below": ((32, 47), (32, 17)),
}  # fmt: skip


def canonical_scene_for_prompt(
    rng: np.random.Generator, spec: PromptSpec, jitter: int = 3, max_tries: int = 100
) -> Scene:
    """A scene correct for `spec` with its objects at canonical places (training data for
    text-to-image without a plan).

    `scene_for_prompt` places objects uniformly, so the first codes an unplanned image
    reveals must pick one layout of very many, each code on its own; a canonical layout
    (`_SLOTS`: the objects in the order the prompt names them; a relation's two objects
    side by side or one above the other) leaves only the attributes to draw. Each centre
    moves by up to `jitter` pixels; sides, unnamed colours and sizes and the background
    are drawn as in `scene_for_prompt`, which is the fallback when no canonical layout fits.
    """
    if spec.relation is not None:
        a, rel, b = spec.relation
        slots = {a: _RELATION_SLOTS[rel][0], b: _RELATION_SLOTS[rel][1]}
        centres = [slots[i] for i in range(len(spec.objects))]
    else:
        centres = list(_SLOTS[spec.total])
    reqs = [r for r in spec.objects for _ in range(r.count)]
    for _ in range(max_tries):
        background = spec.background or _pick(rng, list(BACKGROUNDS))
        objects: list[Object] = []
        for req, (cx, cy) in zip(reqs, centres, strict=True):
            size = req.size or _pick(rng, list(SIZES))
            side = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
            dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
            x0, y0 = cx + dx - side // 2, cy + dy - side // 2
            color = req.color or _pick(rng, list(COLORS))
            objects.append(Object(req.shape, color, size, (x0, y0, x0 + side, y0 + side)))
        scene = Scene(background, tuple(objects))
        if valid_scene(scene) and not prompt_reasons(spec, scene):
            return scene
    return scene_for_prompt(rng, spec)


# =========================================================================== edit instructions


@dataclass(frozen=True)
class EditSpec:
    """A parsed edit instruction.

    Attributes:
        category: One of `EDIT_CATEGORIES`.
        target: The object the edit touches (`the {color} {shape}`); None for add/background.
        color: recolor: the new colour.
        shape: replace: the new shape.
        new: add: the object to add (`a {color} {shape}`).
        region: add/move: the named 3 x 3 cell.
        relation: add: the relation of the new object to `anchor`.
        anchor: add: the object the new one is placed relative to.
        direction: resize: `"larger"` or `"smaller"`.
        background: background: the new background.
        template: recolor: `"make"` (`make the X Y`) or `"change"` (`change the X to Y`).
    """

    category: str
    target: Noun | None = None
    color: str | None = None
    shape: str | None = None
    new: Noun | None = None
    region: str | None = None
    relation: str | None = None
    anchor: Noun | None = None
    direction: str | None = None
    background: str | None = None
    template: str | None = None

    def __post_init__(self) -> None:
        _check_word(self.category, EDIT_CATEGORIES, "edit category")
        _check_word(self.color, COLORS, "color", optional=True)
        _check_word(self.shape, SHAPES, "shape", optional=True)
        _check_word(self.region, REGIONS, "region", optional=True)
        _check_word(self.relation, RELATIONS, "relation", optional=True)
        _check_word(self.direction, DIRECTIONS, "direction", optional=True)
        _check_word(self.background, BACKGROUNDS, "background", optional=True)
        _check_word(self.template, RECOLOR_TEMPLATES, "recolor template", optional=True)
        needs = {
            "recolor": ("target", "color", "template"), "remove": ("target",),
            "add": ("new",), "move": ("target", "region"), "resize": ("target", "direction"),
            "replace": ("target", "shape"), "background": ("background",),
        }[self.category]  # fmt: skip
        missing = [f for f in needs if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{self.category} edit needs {', '.join(missing)}")
        if self.category == "add" and (self.region is None) == (self.anchor is None):
            raise ValueError("add edit needs exactly one of region or relation + anchor")
        if (self.relation is None) != (self.anchor is None):
            raise ValueError("relation and anchor come together")


def edit_text(spec: EditSpec) -> str:
    """The canonical instruction for `spec` (`move the red circle to the top left`)."""
    the = f"the {spec.target.text}" if spec.target is not None else ""
    if spec.category == "recolor":
        if spec.template == "change":
            return f"change {the} to {spec.color}"
        return f"make {the} {spec.color}"
    if spec.category == "remove":
        return f"remove {the}"
    if spec.category == "add":
        assert spec.new is not None  # checked in __post_init__
        new = _with_article(spec.new.text)
        if spec.region is not None:
            return f"add {new} at the {spec.region}"
        assert spec.anchor is not None
        return f"add {new} {spec.relation} the {spec.anchor.text}"
    if spec.category == "move":
        return f"move {the} to the {spec.region}"
    if spec.category == "resize":
        return f"make {the} {spec.direction}"
    if spec.category == "replace":
        return f"turn {the} into {_with_article(spec.shape or '')}"
    return f"change the background to {spec.background}"


def parse_edit(text: str) -> EditSpec:
    """Parse an edit instruction into an `EditSpec`.

    Raises:
        GrammarError: Naming the first word that does not fit.
    """
    r = _Reader(text, "edit instruction")
    verbs = "make, change, remove, add, move or turn"
    verb = r.choice(("make", "change", "remove", "add", "move", "turn"), f"a verb: {verbs}")
    region_desc = f"a region: {_REGION_LIST}"
    if verb == "change" and r.accept("the background"):
        r.expect("to", "'to'")
        bg = r.choice(BACKGROUNDS, f"a background: {_BG_LIST}")
        spec = EditSpec("background", background=bg)
    elif verb == "add":
        r.expect("a", "'a' (as in 'add a red circle')")
        new, _ = r.noun()
        if r.accept("at the") or r.accept("to the") or r.accept("in the"):
            spec = EditSpec("add", new=new, region=r.choice(REGIONS, region_desc))
        else:
            rel = r.choice(RELATIONS, f"'at the {{region}}' or a relation: {_REL_LIST}")
            r.expect("the", "'the'")
            anchor, _ = r.noun()
            spec = EditSpec("add", new=new, relation=rel, anchor=anchor)
    else:
        r.expect("the", "'the'")
        target, _ = r.noun()
        if verb == "make":
            word = r.choice((*COLORS, *DIRECTIONS), f"a color ({_COLOR_LIST}) or larger/smaller")
            if word in DIRECTIONS:
                spec = EditSpec("resize", target=target, direction=word)
            else:
                spec = EditSpec("recolor", target=target, color=word, template="make")
        elif verb == "change":
            r.expect("to", "'to'")
            color = r.choice(COLORS, f"a color: {_COLOR_LIST}")
            spec = EditSpec("recolor", target=target, color=color, template="change")
        elif verb == "remove":
            spec = EditSpec("remove", target=target)
        elif verb == "move":
            r.expect("to the", "'to the'")
            spec = EditSpec("move", target=target, region=r.choice(REGIONS, region_desc))
        else:  # turn
            r.expect("into", "'into'")
            r.expect("a", "'a' (as in 'into a square')")
            shape, _ = r.shape()
            spec = EditSpec("replace", target=target, shape=shape)
    r.end("the end of the instruction")
    return spec


def _square_box(cx: float, cy: float, side: int) -> Box:
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    return (x0, y0, x0 + side, y0 + side)


def _near(a: Object, b: Object, tol: float) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    return float(np.hypot(ax - bx, ay - by)) <= tol


def _resized(
    rng: np.random.Generator, obj: Object, direction: str, others: list[Box]
) -> Object | None:
    """`obj` made larger/smaller around its centre (within 4 px), or None if it cannot fit."""
    lo, hi = SIZES["large"] if direction == "larger" else SIZES["small"]
    if direction == "larger":
        sides = range(max(lo, obj.side + 1), hi + 1)
    else:
        sides = range(lo, min(hi, obj.side - 1) + 1)
    sides = [int(s) for s in rng.permutation(list(sides))]
    shifts = sorted(((dx, dy) for dx in range(-4, 5) for dy in range(-4, 5)),
                    key=lambda d: d[0] ** 2 + d[1] ** 2)  # fmt: skip
    cx, cy = obj.center
    for side in sides:
        new_size = "large" if side >= SIZES["large"][0] else "small"
        for dx, dy in shifts:
            box = _square_box(cx + dx, cy + dy, side)
            cand = Object(obj.shape, obj.color, new_size, box)
            if valid_box(box, others) and _near(cand, obj, 4.0):
                return cand
    return None


def _place_where(rng: np.random.Generator, noun_shape: str, color: str, size: str | None,
                 others: list[Box], ok: Any, region: str | None = None,
                 side: int | None = None, tries: int = 40) -> Object | None:  # fmt: skip
    """Place an object with `place_object` until `ok(obj)` holds."""
    for _ in range(tries):
        sz = size or _pick(rng, list(SIZES))
        obj = place_object(rng, noun_shape, color, sz, others, region=region, side=side)
        if obj is None and size is not None:
            return None  # place_object returns None only when no position exists at all
        if obj is not None and ok(obj):
            return obj
    return None


def apply_edit(rng: np.random.Generator, scene: Scene, spec: EditSpec) -> Scene | None:
    """The scene after `spec`, following the clarifications of SHAPES_WORLD.md.

    Untouched objects stay identical; a recoloured or replaced object keeps its box; a
    resized one keeps its centre within 4 px; an added or moved object's centre lands in
    the named cell or satisfies the relation to its (unmoved) anchor.

    Returns:
        The edited scene, or None when the edit does not apply: the target or anchor is
        absent or ambiguous, the scene is full (add), or nothing fits.
    """
    objs = list(scene.objects)
    if spec.category == "background":
        return replace(scene, background=spec.background)
    if spec.category == "add":
        if len(objs) >= MAX_OBJECTS:
            return None
        assert spec.new is not None
        color = spec.new.color or _pick(rng, list(COLORS))
        boxes = [o.box for o in objs]
        if spec.region is not None:
            region = spec.region
            new = _place_where(rng, spec.new.shape, color, spec.new.size, boxes,
                               lambda o: region_of(*o.center) == region, region=region)  # fmt: skip
        else:
            assert spec.anchor is not None and spec.relation is not None
            k = _unique(objs, spec.anchor)
            if k is None:
                return None
            anchor, rel = objs[k], spec.relation
            new = _place_where(rng, spec.new.shape, color, spec.new.size, boxes,
                               lambda o: holds(rel, o, anchor), tries=80)  # fmt: skip
        return None if new is None else Scene(scene.background, (*objs, new))
    assert spec.target is not None
    k = _unique(objs, spec.target)
    if k is None:
        return None
    old = objs[k]
    others = [o.box for i, o in enumerate(objs) if i != k]
    new_obj: Object | None
    if spec.category == "recolor":
        new_obj = replace(old, color=spec.color)
    elif spec.category == "replace":
        new_obj = replace(old, shape=spec.shape)
    elif spec.category == "remove":
        return Scene(scene.background, tuple(o for i, o in enumerate(objs) if i != k))
    elif spec.category == "resize":
        assert spec.direction is not None
        new_obj = _resized(rng, old, spec.direction, others)
    else:  # move
        region = spec.region
        new_obj = _place_where(rng, old.shape, old.color, old.size, others,
                               lambda o: region_of(*o.center) == region,
                               region=region, side=old.side)  # fmt: skip
    if new_obj is None:
        return None
    objs[k] = new_obj
    return Scene(scene.background, tuple(objs))


def _sample_edit_spec(rng: np.random.Generator, scene: Scene, category: str) -> EditSpec | None:
    objs = scene.objects
    unique = [i for i, o in enumerate(objs) if _unique(objs, Noun.of(o)) is not None]
    if category == "background":
        others = [b for b in BACKGROUNDS if b != scene.background]
        return EditSpec("background", background=_pick(rng, others))
    if category == "add":
        new = Noun(_pick(rng, SHAPES), _pick(rng, list(COLORS)))
        if unique and rng.random() < 0.5:
            anchor = Noun.of(objs[_pick(rng, unique)])
            return EditSpec("add", new=new, relation=_pick(rng, RELATIONS), anchor=anchor)
        return EditSpec("add", new=new, region=_pick(rng, REGIONS))
    if not unique:
        return None
    obj = objs[_pick(rng, unique)]
    target = Noun.of(obj)
    if category == "recolor":
        color = _pick(rng, [c for c in COLORS if c != obj.color])
        return EditSpec("recolor", target=target, color=color,
                        template=_pick(rng, RECOLOR_TEMPLATES))  # fmt: skip
    if category == "remove":
        return EditSpec("remove", target=target)
    if category == "move":
        here = region_of(*obj.center)
        return EditSpec("move", target=target, region=_pick(rng, [g for g in REGIONS if g != here]))
    if category == "resize":
        return EditSpec("resize", target=target,
                        direction="larger" if obj.size == "small" else "smaller")  # fmt: skip
    if category == "replace":
        shape = _pick(rng, [s for s in SHAPES if s != obj.shape])
        return EditSpec("replace", target=target, shape=shape)
    raise ValueError(f"unknown edit category {category!r}; expected one of {EDIT_CATEGORIES}")


def sample_edit(
    rng: np.random.Generator, scene: Scene, category: str | None = None, max_tries: int = 20
) -> tuple[str, EditSpec, Scene]:
    """Draw an edit that applies to `scene` and its target scene.

    The edited object is always named unambiguously (its colour and shape are unique in the
    source). `larger` is drawn for small objects and `smaller` for large ones, so the size
    class changes; moves go to a cell other than the object's own.

    Args:
        rng: The random generator.
        scene: The source scene.
        category: One of `EDIT_CATEGORIES`, or None for uniform over those that apply.
        max_tries: Attempts before falling back to a background edit (which always applies).

    Returns:
        `(instruction, spec, target_scene)`.
    """
    for _ in range(max_tries):
        cat = category or _pick(rng, EDIT_CATEGORIES)
        spec = _sample_edit_spec(rng, scene, cat)
        if spec is None:
            continue
        target = apply_edit(rng, scene, spec)
        if target is not None:
            return edit_text(spec), spec, target
    if category not in (None, "background"):
        raise ValueError(f"no {category} edit applies to this scene")
    spec = _sample_edit_spec(rng, scene, "background")
    assert spec is not None
    return edit_text(spec), spec, replace(scene, background=spec.background)


# =========================================================================== referring expressions


@dataclass(frozen=True)
class RefSpec:
    """A parsed referring expression: `the {size?} {color?} {shape} [on the {side} | {rel} the X]`.

    Attributes:
        shape: The referred object's shape.
        color: Its colour, when named.
        size: Its size class, when named.
        side: `left`/`right`/`top`/`bottom`: the extreme one by centre among the matches.
        relation: The relation of the referred object to `anchor`.
        anchor: The object the relation refers to.
    """

    shape: str
    color: str | None = None
    size: str | None = None
    side: str | None = None
    relation: str | None = None
    anchor: Noun | None = None

    def __post_init__(self) -> None:
        Noun(self.shape, self.color, self.size)
        _check_word(self.side, SIDES, "side", optional=True)
        _check_word(self.relation, RELATIONS, "relation", optional=True)
        if (self.relation is None) != (self.anchor is None):
            raise ValueError("relation and anchor come together")
        if self.side is not None and self.relation is not None:
            raise ValueError("a referring expression has a side or a relation, not both")

    @property
    def noun(self) -> Noun:
        return Noun(self.shape, self.color, self.size)

    @property
    def form(self) -> str:
        """Which of `REF_FORMS` the expression is (`color`, `shape`, `size`, ...)."""
        if self.relation is not None:
            return "relation"
        if self.side is not None:
            return "extreme"
        if self.size is not None:
            return "size"
        return "color" if self.color is not None else "shape"


def refexp_text(spec: RefSpec) -> str:
    """The canonical expression (`the red circle left of the blue square`)."""
    text = f"the {spec.noun.text}"
    if spec.side is not None:
        text += f" on the {spec.side}"
    if spec.relation is not None:
        assert spec.anchor is not None
        text += f" {spec.relation} the {spec.anchor.text}"
    return text


def parse_refexp(text: str) -> RefSpec:
    """Parse a referring expression into a `RefSpec`.

    Raises:
        GrammarError: Naming the first word that does not fit.
    """
    r = _Reader(text, "referring expression")
    r.expect("the", "'the'")
    noun, _ = r.noun()
    side = relation = anchor = None
    if r.accept("on the"):
        side = r.choice(SIDES, f"a side: {', '.join(SIDES)}")
    else:
        relation = r.option(RELATIONS)
        if relation is not None:
            r.expect("the", "'the'")
            anchor, _ = r.noun()
    r.end(f"'on the {{side}}', a relation ({_REL_LIST}) or the end of the expression")
    return RefSpec(noun.shape, noun.color, noun.size, side, relation, anchor)


def _resolve(scene: Scene, spec: RefSpec) -> list[int]:
    """Every object `spec` could refer to."""
    hits = _matching(scene.objects, spec.noun)
    if spec.side is not None:
        best = extreme(scene, hits, spec.side)
        return [] if best is None else [best]
    if spec.relation is not None:
        assert spec.anchor is not None
        k = _unique(scene.objects, spec.anchor)
        if k is None:
            return []
        return [i for i in related(scene, k, spec.relation) if i in hits]
    return hits


def resolve_refexp(scene: Scene, spec: RefSpec) -> int | None:
    """The index of the one object `spec` refers to, or None if there is not exactly one.

    A relation needs a unique anchor; `on the {side}` takes the extreme match by centre.
    """
    hits = _resolve(scene, spec)
    return hits[0] if len(hits) == 1 else None


def _ref_candidates(scene: Scene, i: int) -> list[RefSpec]:
    """Every unambiguous, natural expression for object `i` (at most one per form)."""
    objs = scene.objects
    o = objs[i]
    same_shape = _matching(objs, Noun(o.shape))
    out = [RefSpec(o.shape, o.color)]
    if len(same_shape) == 1:
        out.append(RefSpec(o.shape))
    else:
        out.append(RefSpec(o.shape, size=o.size))
        for side in SIDES:
            # Only clearly extreme objects: ahead of the runner-up by the relation slack.
            if extreme(scene, same_shape, side, margin=RELATION_SLACK) == i:
                out.append(RefSpec(o.shape, side=side))
    for k, anchor in enumerate(objs):
        if k != i and _unique(objs, Noun.of(anchor)) is not None:
            for rel in RELATIONS:
                if holds(rel, o, anchor):
                    out.append(RefSpec(o.shape, o.color, relation=rel, anchor=Noun.of(anchor)))
    return [s for s in out if resolve_refexp(scene, s) == i]


def referable(scene: Scene) -> bool:
    """Whether some object of `scene` has an unambiguous referring expression.

    Almost every scene has one; the exceptions are look-alike crowds (several objects of one
    colour, shape and size with no clear extreme and no unique anchor) and empty scenes.
    """
    return any(_ref_candidates(scene, i) for i in range(len(scene.objects)))


def sample_refexp(rng: np.random.Generator, scene: Scene) -> tuple[str, RefSpec, int]:
    """Draw an unambiguous referring expression for a random object of `scene`.

    The form is drawn uniformly among the forms that single the object out.

    Returns:
        `(text, spec, object_index)` with `resolve_refexp(scene, spec) == object_index`.

    Raises:
        ValueError: If no object of `scene` can be referred to unambiguously (e.g. empty);
            `referable(scene)` tells beforehand.
    """
    order = [int(i) for i in rng.permutation(len(scene.objects))]
    for i in order:
        cands = _ref_candidates(scene, i)
        if cands:
            forms = sorted({c.form for c in cands})
            form = _pick(rng, forms)
            spec = _pick(rng, [c for c in cands if c.form == form])
            return refexp_text(spec), spec, i
    raise ValueError("no object of the scene can be referred to unambiguously")


# =========================================================================== questions


@dataclass(frozen=True)
class QuestionSpec:
    """A parsed question.

    Attributes:
        kind: One of `QUESTION_KINDS`.
        shape: count/color/exist/relation: the shape asked about (relation: the anchor's).
        color: count/shape/exist/relation: the colour asked about (relation: the anchor's).
        relation: relation: `left of`, `right of`, `above` or `below`.
    """

    kind: str
    shape: str | None = None
    color: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        _check_word(self.kind, QUESTION_KINDS, "question kind")
        _check_word(self.shape, SHAPES, "shape", optional=True)
        _check_word(self.color, COLORS, "color", optional=True)
        _check_word(self.relation, RELATIONS, "relation", optional=True)
        needs = {
            "count": (), "color": ("shape",), "shape": ("color",), "exist": ("shape",),
            "relation": ("shape", "relation"), "background": (), "caption": (),
        }[self.kind]  # fmt: skip
        if any(getattr(self, f) is None for f in needs) or (
            self.kind == "count" and self.shape is None and self.color is None
        ):
            raise ValueError(f"{self.kind} question is missing a word: {self!r}")


def question_text(spec: QuestionSpec) -> str:
    """The canonical question (`how many circles are there?`)."""
    k = spec.kind
    if k == "count":
        if spec.shape is None:
            return f"how many {spec.color} objects are there?"
        return f"how many {Noun(spec.shape, spec.color).plural_text} are there?"
    if k == "color":
        return f"what color is the {spec.shape}?"
    if k == "shape":
        return f"what shape is the {spec.color} object?"
    if k == "exist":
        return f"is there {_with_article(Noun(spec.shape or '', spec.color).text)}?"
    if k == "relation":
        return f"what is {spec.relation} the {Noun(spec.shape or '', spec.color).text}?"
    if k == "background":
        return "what color is the background?"
    return "describe the image."


def parse_question(text: str) -> QuestionSpec:
    """Parse a question into a `QuestionSpec`.

    Raises:
        GrammarError: Naming the first word that does not fit.
    """
    r = _Reader(text, "question")
    starts = "'how many', 'what color', 'what shape', 'what is', 'is there' or 'describe'"
    if r.accept("how many"):
        color = r.option(COLORS)
        if color is not None and r.option(("objects", "object")):
            spec = QuestionSpec("count", color=color)
        else:
            shape, _ = r.shape()
            spec = QuestionSpec("count", shape=shape, color=color)
        r.expect("are there", "'are there'")
    elif r.accept("what color is the"):
        if r.accept("background"):
            spec = QuestionSpec("background")
        else:
            shape, _ = r.shape()
            spec = QuestionSpec("color", shape=shape)
    elif r.accept("what shape is the"):
        color = r.choice(COLORS, f"a color: {_COLOR_LIST}")
        r.expect("object", "'object'")
        spec = QuestionSpec("shape", color=color)
    elif r.accept("what is"):
        rel = r.choice(RELATIONS, f"a relation: {_REL_LIST}")
        r.expect("the", "'the'")
        noun, _ = r.noun(sizes=False)
        spec = QuestionSpec("relation", noun.shape, noun.color, rel)
    elif r.accept("is there a"):
        noun, _ = r.noun(sizes=False)
        spec = QuestionSpec("exist", noun.shape, noun.color)
    elif r.accept("describe the image"):
        spec = QuestionSpec("caption")
    else:
        raise r.error(starts)
    r.end("the end of the question")
    return spec


DESCRIBE = "describe the image."
"""The caption question: its answer (`caption`) names every object of the image."""


def caption(scene: Scene) -> str:
    """The canonical caption: objects left to right, then the background.

    `a small red circle and a large blue square on a white background`;
    an empty scene reads `nothing on a white background`.
    """
    objs = scene.sorted_left_to_right()
    words = _join([_with_article(f"{o.size} {o.color} {o.shape}") for o in objs]) or "nothing"
    return f"{words} on a {scene.background} background"


@dataclass(frozen=True)
class Caption:
    """A parsed canonical caption.

    Attributes:
        objects: the captioned objects, in caption order (left to right); items that do not
            fit the grammar are left out.
        background: the background word, or None when the caption does not name a known one.
        skipped: the object phrases left out, as written.
    """

    objects: tuple[Noun, ...]
    background: str | None
    skipped: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Every phrase parsed, with its size and colour, and the background is known: the
        caption then states a whole scene but for where each object is."""
        return (
            self.background is not None
            and not self.skipped
            and all(n.color is not None and n.size is not None for n in self.objects)
        )


_CAPTION_RE = re.compile(r"^(?P<body>.*?)\s*\bon an? (?P<bg>\w+) background$")


def parse_caption(text: str) -> Caption:
    """Parse `a small red circle, a large blue square and ... on a white background`.

    Tolerant by design (the text comes from a model): case, spacing, a final `.` and the
    order of size and colour words are forgiven; an object phrase that is not
    `a|an {size?} {color?} {shape}` is skipped, not an error. `nothing on a ... background`
    (an empty scene) gives no objects.
    """
    t = " ".join(text.lower().replace(",", " , ").split())
    t = re.sub(r"[\s.!?]+$", "", t)
    m = _CAPTION_RE.match(t)
    body, bg = (m["body"], m["bg"]) if m else (t, None)
    objects: list[Noun] = []
    skipped: list[str] = []
    if body and body != "nothing":
        for part in re.split(r"\s*,\s*|\s+and\s+", body):
            noun = _caption_noun(part)
            if noun is None:
                logger.debug("caption: skipping %r (not `a {size} {color} {shape}`)", part)
                skipped.append(part)
            else:
                objects.append(noun)
    return Caption(tuple(objects), bg if bg in BACKGROUNDS else None, tuple(skipped))


def _caption_noun(part: str) -> Noun | None:
    words = part.split()
    if words and words[0] in ("a", "an"):
        words = words[1:]
    if not words or words[-1] not in SHAPES:
        return None
    size = color = None
    for w in words[:-1]:
        if w in SIZES and size is None:
            size = w
        elif w in COLORS and color is None:
            color = w
        else:
            return None
    return Noun(words[-1], color, size)


def answer(scene: Scene, spec: QuestionSpec) -> str:
    """The correct answer to `spec` about `scene`.

    Absent referents answer `nothing`; several colours or shapes for one referent, or
    several objects in a relation, are listed left to right joined with `and`.
    """
    objs = scene.objects
    k = spec.kind
    if k == "count":
        n = sum(1 for o in objs if spec.shape in (None, o.shape) and spec.color in (None, o.color))
        return NUMBERS[n]
    if k == "background":
        return scene.background
    if k == "caption":
        return caption(scene)
    if k == "exist":
        return "yes" if _matching(objs, Noun(spec.shape or "", spec.color)) else "no"
    if k == "color":
        hits = _left_to_right(objs, _matching(objs, Noun(spec.shape or "")))
        return _join([objs[i].color for i in hits]) or "nothing"
    if k == "shape":
        hits = _left_to_right(objs, [i for i, o in enumerate(objs) if o.color == spec.color])
        return _join([objs[i].shape for i in hits]) or "nothing"
    anchor = _unique(objs, Noun(spec.shape or "", spec.color))
    if anchor is None:
        return "nothing"
    hits = related(scene, anchor, spec.relation or "")
    named = [_with_article(Noun.of(objs[i]).text) for i in _left_to_right(objs, hits)]
    return _join(named) or "nothing"


def presupposition_holds(scene: Scene, spec: QuestionSpec) -> bool:
    """Whether `scene` holds the object `spec` takes for granted.

    `what color is the {shape}?` needs a {shape}, `what shape is the {color} object?` a
    {color} object, `what is {relation} the {noun}?` exactly one {noun} (the anchor); the
    other kinds presuppose nothing. Where it fails, `answer` says `nothing`.
    """
    objs = scene.objects
    if spec.kind == "color":
        return bool(_matching(objs, Noun(spec.shape or "")))
    if spec.kind == "shape":
        return any(o.color == spec.color for o in objs)
    if spec.kind == "relation":
        return _unique(objs, Noun(spec.shape or "", spec.color)) is not None
    return True


def _sample_question_spec(rng: np.random.Generator, scene: Scene, kind: str) -> QuestionSpec | None:
    objs = scene.objects
    if kind == "count":
        if rng.random() < 0.5:
            return QuestionSpec("count", shape=_pick(rng, SHAPES))
        return QuestionSpec("count", color=_pick(rng, list(COLORS)))
    if kind == "color":
        shapes = [s for s in SHAPES if len(_matching(objs, Noun(s))) == 1]
        return QuestionSpec("color", shape=_pick(rng, shapes)) if shapes else None
    if kind == "shape":
        colors = [c for c in COLORS if sum(o.color == c for o in objs) == 1]
        return QuestionSpec("shape", color=_pick(rng, colors)) if colors else None
    if kind == "exist":
        if objs and rng.random() < 0.5:
            o = _pick(rng, objs)
            return QuestionSpec("exist", o.shape, o.color)
        return QuestionSpec("exist", _pick(rng, SHAPES), _pick(rng, list(COLORS)))
    if kind == "relation":
        anchors = [o for o in objs if _unique(objs, Noun.of(o)) is not None]
        if not anchors:
            return None
        a = _pick(rng, anchors)
        spec = QuestionSpec("relation", a.shape, a.color, _pick(rng, RELATIONS))
        # Keep questions with one answer (or none): the grammar's answer names one object.
        return spec if " and " not in answer(scene, spec) else None
    return QuestionSpec(kind)


def _kind_weights(weights: Mapping[str, float], kinds: Sequence[str], what: str) -> np.ndarray:
    """`weights` (kind -> relative weight) as an array over `kinds`, validated."""
    unknown = set(weights) - set(kinds)
    if unknown:
        raise ValueError(f"unknown {what}(s) {sorted(unknown)}; expected some of {list(kinds)}")
    w = np.array([float(weights.get(k, 0.0)) for k in kinds])
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{what} weights must be finite, >= 0 and not all 0, got {dict(weights)}")
    return w


def question_kind_weights(weights: Mapping[str, float]) -> np.ndarray:
    """`weights` (kind -> relative weight) as an array over `QUESTION_KINDS`, validated."""
    return _kind_weights(weights, QUESTION_KINDS, "question kind")


def prompt_category_weights(weights: Mapping[str, float]) -> np.ndarray:
    """`weights` (category -> relative weight) as an array over `PROMPT_CATEGORIES`, validated."""
    return _kind_weights(weights, PROMPT_CATEGORIES, "prompt category")


def sample_edit_on_new_scene(rng: np.random.Generator, category: str, tries: int = 100) -> tuple:
    """A random scene and a `category` edit of it, drawing a new scene until one allows
    that edit: `(source scene, instruction, spec, target scene)`.

    Raises:
        RuntimeError: no scene of `tries` allowed it.
    """
    from lavida_agent.tools.shapes_world.sampler import sample_scene

    for _ in range(tries):
        scene = sample_scene(rng)
        try:
            text, spec, target = sample_edit(rng, scene, category)
        except ValueError:  # this category does not apply to this scene
            continue
        return scene, text, spec, target
    raise RuntimeError(f"no {category} edit applies to {tries} random scenes")  # pragma: no cover


def edit_category_weights(weights: Mapping[str, float]) -> np.ndarray:
    """`weights` (category -> relative weight) as an array over `EDIT_CATEGORIES`, validated."""
    return _kind_weights(weights, EDIT_CATEGORIES, "edit category")


def sample_question(
    rng: np.random.Generator, scene: Scene, weights: Mapping[str, float] | None = None
) -> tuple[str, QuestionSpec, str]:
    """Draw a question about `scene` with a single, well-defined answer.

    Args:
        weights: relative weight of each kind of `QUESTION_KINDS` (missing kinds: 0);
            `None` draws the kinds uniformly. A kind the scene cannot ask (no unique
            shape for `color`, ...) is redrawn, so realised shares lean to the others.

    Returns:
        `(question, spec, answer)`.
    """
    if weights is None:
        while True:
            spec = _sample_question_spec(rng, scene, _pick(rng, QUESTION_KINDS))
            if spec is not None:
                return question_text(spec), spec, answer(scene, spec)
    w = question_kind_weights(weights)
    misses = np.zeros(len(w), dtype=int)
    while w.sum() > 0:
        k = int(rng.choice(len(w), p=w / w.sum()))
        spec = _sample_question_spec(rng, scene, QUESTION_KINDS[k])
        if spec is not None:
            return question_text(spec), spec, answer(scene, spec)
        misses[k] += 1
        if misses[k] >= _KIND_TRIES:  # this scene cannot ask it (a relation question may
            w[k] = 0.0  # fail on one draw of anchor and relation, so a kind gets a few tries)
    raise ValueError(f"the scene admits none of the weighted question kinds {dict(weights)}")


_KIND_TRIES = 8


# =========================================================================== plans


def plan_items(scene: Scene, order: str = "left_to_right") -> list[tuple[str, Box]]:
    """The layout plan for `scene`: `(label, box)` per object.

    Labels are `{size} {color} {shape}` (`small red circle`): the caption's words, so a plan
    states everything a checker verifies; boxes are integer pixel xyxy in 0..64.

    Args:
        order: `"left_to_right"` (the caption's order), or `"scene"`: the scene's own
            object order, which for a `scene_for_prompt` scene is the order the prompt
            names the objects. Plans the model writes for a prompt use `"scene"`: item k
            is then the prompt's k-th object, a copy in order, where left to right would
            make which object comes first depend on where the boxes happen to fall.
    """
    if order not in ("left_to_right", "scene"):
        raise ValueError(f"order must be 'left_to_right' or 'scene', got {order!r}")
    objects = scene.sorted_left_to_right() if order == "left_to_right" else scene.objects
    return [(f"{o.size} {o.color} {o.shape}", tuple(int(v) for v in o.box))  # type: ignore[misc]
            for o in objects]  # fmt: skip


# =========================================================================== critique vocabulary

# The one fixed vocabulary of what can be wrong. The model's self-critique is trained on
# these strings and the checkers report them, so both speak the same words.
REASON_TEMPLATES: dict[str, str] = {
    "missing": "missing {noun}",  # a required object is absent
    "extra": "extra {noun}",  # an object nobody asked for (`unknown object` for unnamed blobs)
    "count": "{found} {noun}, expected {expected}",  # counting prompts: `2 triangles, expected 3`
    "color": "{shape} is {found}, expected {expected}",  # `circle is green, expected red`
    "size": "{shape} is {found}, expected {expected}",  # `square is small, expected large`
    "relation": "{noun} should be {relation} {anchor}",  # `red circle should be left of blue ...`
    "background": "background is {found}, expected {expected}",
    # Edits only:
    "region": "{noun} should be at the {region}",  # added or moved object in the wrong cell
    "moved": "{noun} moved",  # an untouched object's centre shifted more than 2 px
    "resize": "{noun} should be {direction}",
    "replace": "{noun} should be {new}",  # `red circle should be a square`
    "not_removed": "{noun} not removed",
    "no_referent": "no {noun} in the source",  # the instruction names nothing in the source
    "ambiguous": "several {noun} in the source",
}

UNKNOWN_OBJECT = "unknown object"


def reason(kind: str, **fields: Any) -> str:
    """One reason string of the vocabulary, e.g. `reason("missing", noun="blue square")`."""
    return REASON_TEMPLATES[kind].format(**fields)


def _alt(words: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_NOUN_RE = (
    f"(?:{_alt(SIZES)} )?(?:{_alt(COLORS)} )?{_alt(SHAPES)}s?|{re.escape(UNKNOWN_OBJECT)}"
)
_FIELD_RE = {
    "noun": f"(?:{_NOUN_RE})", "anchor": f"(?:{_NOUN_RE})", "shape": _alt(SHAPES),
    "found": "(?:[0-9]+|[a-z]+)", "expected": "(?:[0-9]+|[a-z]+)", "relation": _alt(RELATIONS),
    "region": _alt(REGIONS), "direction": _alt(DIRECTIONS), "new": f"a {_alt(SHAPES)}",
}  # fmt: skip
# one pattern per template, its fields as named groups
_REASON_PARSE = {
    kind: re.compile("^" + re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>{_FIELD_RE[m.group(1)]})",
                                 re.escape(t)) + "$")
    for kind, t in REASON_TEMPLATES.items()
}  # fmt: skip
_REASON_RES = list(_REASON_PARSE.values())


class _SceneLike(Protocol):
    background: str | None
    objects: Sequence[Object]


def _noun_words(req: ObjectReq, n: int) -> str:
    return req.noun.text if n == 1 else req.noun.plural_text


def _max_matching(slots: Sequence[ObjectReq], objs: Sequence[Object]) -> dict[int, int]:
    """A maximum matching slot -> object where the object fits the slot (Kuhn's algorithm)."""
    owner: dict[int, int] = {}  # object -> slot

    def augment(s: int, seen: set[int]) -> bool:
        for o, obj in enumerate(objs):
            if o in seen or not slots[s].matches(obj):
                continue
            seen.add(o)
            if o not in owner or augment(owner[o], seen):
                owner[o] = s
                return True
        return False

    for s in range(len(slots)):
        augment(s, set())
    return {s: o for o, s in owner.items()}


def prompt_reasons(spec: PromptSpec, scene: _SceneLike) -> list[str]:
    """What is wrong with `scene` for the prompt `spec`, in the critique vocabulary.

    `scene` is a `Scene` or a detection (anything with `background`, `objects` and
    optionally `unknown`, the boxes of blobs the detector could not name). The steps:

    1. assign objects to the prompt's slots (maximum matching on every named attribute);
    2. a left-over slot and a left-over object of the same shape differ in colour or size:
       `circle is green, expected red` / `square is small, expected large`;
    3. counting prompts report counts (`2 triangles, expected 3`), others `missing X`;
    4. every other object, and every unnamed blob, is `extra X`;
    5. position prompts: `red circle should be left of blue square` when no pair of
       matching objects satisfies the relation;
    6. a named background: `background is black, expected white`.

    Returns:
        The reasons, empty when the scene is correct for the prompt.
    """
    objs = sorted(scene.objects, key=lambda o: (o.center[0], o.center[1]))
    slots = [req for req in spec.objects for _ in range(req.count)]
    slot_req = [i for i, req in enumerate(spec.objects) for _ in range(req.count)]
    matched = _max_matching(slots, objs)
    free_slots = [s for s in range(len(slots)) if s not in matched]
    free_objs = [o for o in range(len(objs)) if o not in matched.values()]
    reasons: list[str] = []

    # Step 2: pair a missing slot with a left-over object of the same shape.
    for s in list(free_slots):
        req = slots[s]
        twin = next((o for o in free_objs if objs[o].shape == req.shape), None)
        if twin is None:
            continue
        free_slots.remove(s)
        free_objs.remove(twin)
        if req.color is not None and objs[twin].color != req.color:
            found = objs[twin].color
            reasons.append(reason("color", shape=req.shape, found=found, expected=req.color))
        if req.size is not None and objs[twin].size != req.size:
            found = objs[twin].size
            reasons.append(reason("size", shape=req.shape, found=found, expected=req.size))

    # Step 3: counts for counting prompts (too few, or too many fitting objects left over).
    counted: set[int] = set()
    if spec.category == "counting":
        for r, req in enumerate(spec.objects):
            lacking = sum(1 for s in free_slots if slot_req[s] == r)
            surplus = [o for o in free_objs if req.matches(objs[o])]
            if lacking or surplus:
                found = req.count - lacking + len(surplus)
                reasons.append(reason("count", found=found, noun=_noun_words(req, found),
                                      expected=req.count))  # fmt: skip
                counted.add(r)
                free_objs = [o for o in free_objs if o not in surplus]
    for s in free_slots:
        if slot_req[s] not in counted:
            reasons.append(reason("missing", noun=slots[s].noun.text))

    # Step 4: anything else in the image was not asked for.
    reasons += [reason("extra", noun=Noun.of(objs[o]).text) for o in free_objs]
    reasons += [reason("extra", noun=UNKNOWN_OBJECT) for _ in getattr(scene, "unknown", ())]

    # Step 5: the relation, once both objects are there.
    if spec.relation is not None:
        a, rel, b = spec.relation
        ra, rb = spec.objects[a], spec.objects[b]
        xs = [o for o in objs if ra.matches(o)]
        ys = [o for o in objs if rb.matches(o)]
        if xs and ys and not any(x is not y and holds(rel, x, y) for x in xs for y in ys):
            reasons.append(reason("relation", noun=ra.noun.text, relation=rel, anchor=rb.noun.text))

    # Step 6: the background, when the prompt names one.
    if spec.background is not None and scene.background != spec.background:
        found = scene.background or "unknown"
        reasons.append(reason("background", found=found, expected=spec.background))
    return reasons


def plan_objects(plan: Sequence[tuple[str, Sequence[float]]]) -> list[Object] | None:
    """Plan items read as objects (boxes rounded to pixels); None when any label is not
    `{size} {color} {shape}` or any box is empty."""
    objects = []
    for label, box in plan:
        words = str(label).split()
        if len(words) != 3 or words[0] not in SIZES or words[1] not in COLORS or words[2] not in SHAPES:
            return None
        x0, y0, x1, y1 = (round_half_up(float(v)) for v in box)  # as the drawer reads it
        if x1 <= x0 or y1 <= y0:
            return None
        objects.append(Object(shape=words[2], color=words[1], size=words[0], box=(x0, y0, x1, y1)))
    return objects


def _layout_reasons(objects: Sequence[Object]) -> list[str]:
    """Why objects are not a scene the world can hold (`valid_scene` said no)."""
    name = [f"{o.size} {o.color} {o.shape}" for o in objects]
    reasons = [f"{len(objects)} objects planned, at most {MAX_OBJECTS} fit"] if len(objects) > MAX_OBJECTS else []
    for i, o in enumerate(objects):
        x0, y0, x1, y1 = o.box
        if x1 - x0 != y1 - y0 or size_class(x1 - x0) != o.size:
            reasons.append(f"{name[i]} box is not a {o.size} square")
        if not valid_box(o.box):
            reasons.append(f"{name[i]} box leaves the canvas")
        reasons += [f"{name[j]} and {name[i]} boxes are too close" for j in range(i)
                    if not boxes_apart(objects[j].box, o.box)]  # fmt: skip
    return reasons or ["the layout is not one the world can hold"]


def plan_reasons(prompt: str | PromptSpec, plan: Sequence[tuple[str, Sequence[float]]] | None) -> list[str]:
    """What is wrong with a layout plan for a prompt, read as if it were a drawn scene.

    Each item must read `{size} {color} {shape}` with a non-empty box, and the layout must
    be one the world can hold (`valid_scene`: square boxes of the label's size, inside the
    canvas, apart from each other; two boxes on top of each other cannot be drawn as two
    objects). The objects are then judged by `prompt_reasons` exactly as detected objects
    are (counts, colours, sizes, relations by box centres). Plans carry no background, so
    the prompt's background, if any, is not required. The t2i workflow checks its own plans
    with this before drawing; the quality benchmark scores plans with it.

    Returns:
        The reasons, empty when the plan is right; an empty, unreadable or impossible plan
        gets reasons saying which.

    Raises:
        GrammarError: For prompt text outside the grammar.
    """
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if not plan:
        return ["the plan is empty"]
    objects = plan_objects(plan)
    if objects is None:
        return ["a plan item is not `{size} {color} {shape}` with a box"]
    scene = Scene("white", tuple(objects))
    if not valid_scene(scene):
        return _layout_reasons(objects)
    return prompt_reasons(replace(spec, background=None), scene)


def reason_fits_prompt(spec: PromptSpec, text: str) -> bool:
    """Whether `prompt_reasons` could ever say `text` about an image for `spec`.

    `extra ...` fits any prompt; the others must name what the prompt asked for:
    `missing blue circle` fits only a prompt with a blue circle, `circle is green, expected
    red` only one with a red circle, `2 triangles, expected 3` only one counting three
    triangles, a relation only the prompt's own, `background is X, expected Y` only a prompt
    naming background Y. Edit-only reasons never fit. A critique that rejects an image for
    reasons that cannot fit its prompt has misread the prompt, not the image.
    """
    text = re.sub(r"\ban\b", "a", " ".join(text.strip().lower().split()))
    kind, m = next(((k, m) for k, rx in _REASON_PARSE.items() if (m := rx.match(text))), (None, None))
    if m is None:
        return False
    f = m.groupdict()
    reqs = spec.objects
    if kind == "extra":
        return True
    if kind == "missing":
        return any(f["noun"] == r.noun.text for r in reqs)
    if kind == "count":
        return (spec.category == "counting" and f["found"].isdigit()
                and any(f["noun"] == _noun_words(r, int(f["found"])) and f["expected"] == str(r.count)
                        for r in reqs))  # fmt: skip
    if kind in ("color", "size"):  # the two templates read alike: the expected word decides
        return any(f["shape"] == r.shape and f["expected"] in (r.color, r.size) and f["found"] != f["expected"]
                   for r in reqs)  # fmt: skip
    if kind == "relation":
        if spec.relation is None:
            return False
        a, rel, b = spec.relation
        return (f["noun"], f["relation"], f["anchor"]) == (reqs[a].noun.text, rel, reqs[b].noun.text)
    if kind == "background":
        return spec.background is not None and f["expected"] == spec.background != f["found"]
    return False  # edit-only reasons


def verdict_text(reasons: Sequence[str]) -> str:
    """`yes`, or `no: reason; reason`."""
    return "yes" if not reasons else "no: " + "; ".join(reasons)


def parse_verdict(text: str, *, lenient: bool = False) -> tuple[bool, list[str]]:
    """Parse a critique verdict (`yes` / `no: missing blue square; extra red circle`).

    With `lenient`, a reason outside the vocabulary is dropped instead of raising (a
    fixed-length decoder can leave a trailing fragment: `...; extra blue square missing`).

    Returns:
        `(ok, reasons)`; reasons are normalised (lower case, single spaces, `an` -> `a`).

    Raises:
        GrammarError: For a verdict that is neither yes nor no, or (unless `lenient`) a
            reason outside the vocabulary (`REASON_TEMPLATES`).
    """
    norm = " ".join(text.strip().lower().rstrip(" .!").split())
    if norm == "yes":
        return True, []
    if norm != "no" and not norm.startswith(("no:", "no ")):
        raise GrammarError(f"verdict {text!r} must start with 'yes' or 'no'")
    reasons = []
    for part in norm[2:].lstrip(" :").split(";"):
        part = re.sub(r"\ban\b", "a", part.strip().rstrip("."))
        if not part:
            continue
        if not any(rx.match(part) for rx in _REASON_RES):
            if lenient:
                continue
            raise GrammarError(
                f"unknown reason {part!r} in verdict {text!r}; expected one of the forms: "
                + "; ".join(REASON_TEMPLATES.values())
            )
        reasons.append(part)
    return False, reasons


def _corrupt(rng: np.random.Generator, spec: PromptSpec, scene: Scene) -> Scene | None:
    """`scene` with one random corruption (drop, add, recolour, move, resize, background)."""
    objs = list(scene.objects)
    kinds = ["drop", "add", "recolor", "move", "resize"]
    if spec.background is not None:
        kinds.append("background")
    kind = _pick(rng, kinds)
    if kind == "background":
        others = [b for b in BACKGROUNDS if b != scene.background]
        return replace(scene, background=_pick(rng, others))
    if kind == "drop" and objs:
        del objs[int(rng.integers(len(objs)))]
        return Scene(scene.background, tuple(objs))
    if kind == "add" and len(objs) < MAX_OBJECTS:
        new = place_object(rng, _pick(rng, SHAPES), _pick(rng, list(COLORS)),
                           _pick(rng, list(SIZES)), [o.box for o in objs])  # fmt: skip
        return None if new is None else Scene(scene.background, (*objs, new))
    if not objs:
        return None
    k = int(rng.integers(len(objs)))
    old = objs[k]
    others = [o.box for i, o in enumerate(objs) if i != k]
    new_obj: Object | None = None
    if kind == "recolor":
        new_obj = replace(old, color=_pick(rng, [c for c in COLORS if c != old.color]))
    elif kind == "move":
        new_obj = place_object(rng, old.shape, old.color, old.size, others, side=old.side)
    elif kind == "resize":
        new_obj = _resized(rng, old, "larger" if old.size == "small" else "smaller", others)
    if new_obj is None:
        return None
    objs[k] = new_obj
    return Scene(scene.background, tuple(objs))


def sample_critique(rng: np.random.Generator, max_tries: int = 50) -> tuple[str, Scene, str]:
    """Self-critique training data: a prompt, a scene, and the verdict on the scene.

    Half the samples are correct scenes (`yes`); the other half are corrupted by dropping,
    adding, recolouring, moving or resizing an object or changing a named background, kept
    only when the prompt becomes false, and labelled by `prompt_reasons` (the checkers'
    own logic), so the labels are exactly what the judge would say.

    Returns:
        `(prompt_text, scene, verdict_text)`; render the scene to get the image.
    """
    text, spec = sample_prompt(rng)
    scene = scene_for_prompt(rng, spec)
    if rng.random() < 0.5:
        return text, scene, "yes"
    for _ in range(max_tries):
        bad = _corrupt(rng, spec, scene)
        if bad is None:
            continue
        reasons = prompt_reasons(spec, bad)
        if reasons:
            return text, bad, verdict_text(reasons)
    logger.debug("no corruption falsified %r; returning the correct scene", text)
    return text, scene, "yes"

