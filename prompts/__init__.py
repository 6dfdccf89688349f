"""Prompt and task templates as text files, with a tiny loader.

Templates use `string.Template` `$name` placeholders (literal braces in box examples stay
literal). Logic about which variables to pass lives in the caller, never in a template.
"""

from __future__ import annotations

import string
from importlib import resources


class MissingPromptVariable(KeyError):
    """A template was rendered without one of its `$name` variables."""


def names() -> list[str]:
    """Names of every template shipped in this package (file names without `.md`)."""
    root = resources.files(__name__)
    return sorted(p.name[:-3] for p in root.iterdir() if p.name.endswith(".md"))


def load(name: str) -> str:
    """The raw text of template `name` (trailing newline stripped)."""
    path = resources.files(__name__) / f"{name}.md"
    if not path.is_file():
        raise KeyError(f"no prompt template named {name!r}; available: {names()}")
    return path.read_text(encoding="utf-8").rstrip("\n")


def variables(name: str) -> list[str]:
    """The `$name` variables template `name` uses."""
    return string.Template(load(name)).get_identifiers()


def render(name: str, **values: object) -> str:
    """Render template `name`; raises `MissingPromptVariable` naming the missing variable."""
    template = string.Template(load(name))
    try:
        return template.substitute(**values)
    except KeyError as e:
        raise MissingPromptVariable(f"prompt {name!r} needs variable {e.args[0]!r}") from None
