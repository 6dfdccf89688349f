"""`Settings`: every knob of the public surface, and the only place environment variables are read.

Precedence is explicit: **arguments > environment (`LAVIDA_<FIELD>`) > defaults**.

    Settings()                          # defaults only, no environment
    Settings.from_env()                 # environment over defaults
    Settings.from_env(num_steps=8)      # an argument over both (None means "not given")

Paths derived from `home` (`artifacts_dir`, `db_path`, `runs_dir`) follow it unless set
themselves, so `LAVIDA_HOME=/tmp/x` moves everything. Environment values are strings parsed
by the field's type (`LAVIDA_PLAN=false`, `LAVIDA_PORT=9000`); an empty value or `none`
means `None` for optional fields. A bad value raises `InvalidInputError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lavida_agent.errors import InvalidInputError

__all__ = ("ENV_PREFIX", "SEED_LIMIT", "Settings")

ENV_PREFIX = "LAVIDA_"
SEED_LIMIT = 2**63
"""Seeds are integers `0 <= seed < SEED_LIMIT`: with the small offsets rounds and images add
(`seed + r`), every draw's seed stays inside torch's 64-bit generator seeds."""
MEMORY = ":memory:"


class Settings(BaseModel):
    """Settings of a `LavidaAgent`, the CLI and the HTTP server (immutable; use `replace`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # -- where things live ----------------------------------------------------------------
    home: Path = Field(
        default=Path("~/.lavida-agent"), description="Root folder of everything written."
    )
    artifacts_dir: Path | None = Field(default=None, description="Image store; home/artifacts.")
    db_path: str | None = Field(
        default=None,
        description="SQLite checkpoint database (sessions, runs); home/lavida.db. "
        "':memory:' keeps checkpoints in memory.",
    )
    runs_dir: Path | None = Field(default=None, description="JSON traces; home/runs.")

    # -- the model --------------------------------------------------------------------------
    model_path: str | None = Field(
        default=None, description="Pipeline folder; None: the embedded checkpoint."
    )
    device: str | None = Field(default=None, description="torch device; None: the default.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="Weights dtype (float32 unless asked otherwise)."
    )
    canvas: int = Field(default=64, ge=8, description="Model image side; inputs letterboxed.")
    ground_views: int | None = Field(
        default=None, ge=1, le=24,  # le: len(model.pipeline_lavida.GROUND_VIEWS) (no torch here)
        description="Views (mirrored, moved) grounding reads an image in; the box kept is the "
        "one the noun fits best of all they found (1: the image alone); None: the checkpoint's "
        "default.",
    )
    ground_candidates: int | None = Field(
        default=None, ge=1,
        description="Boxes decoded per grounding expression on the image alone, the best kept "
        "by the noun's fit (1: the greedy read); setting it turns the views off unless "
        "ground_views is set too. None: the checkpoint's default.",
    )

    # -- workflow defaults ----------------------------------------------------------------
    num_steps: int = Field(default=16, ge=1, description="Denoising steps per image.")
    max_rounds: int = Field(default=3, ge=1, description="Most images per t2i run/edit turn.")
    plan: bool = Field(default=True, description="Plan a layout before drawing (t2i).")
    seed: int | None = Field(
        default=None, ge=0, lt=SEED_LIMIT,
        description="Base seed when a call gives none; None: random (recorded).",
    )
    preview_every: int = Field(default=0, ge=0, description="Stream a preview every k steps.")
    iou_threshold: float = Field(default=0.5, gt=0, le=1, description="Grounding check IoU.")
    plan_retries: int = Field(
        default=2, ge=0, description="t2i: re-plans after a plan fails its check (0: none)."
    )
    selection: Literal["accept", "best"] = Field(
        default="best",
        description="t2i: stop at the first accepted image (accept) or draw every round and "
        "keep the best (best).",
    )
    rank_by: Literal["fit", "surprise", "score"] = Field(
        default="surprise",
        description="t2i: rank attempts by plan fit, by the worst image token (surprise), or by "
        "the critique score.",
    )
    grounding_check: Literal["rank", "gate", "off"] = Field(
        default="rank",
        description="t2i: grounding of the planned objects ranks attempts and blames boxes "
        "(rank), also rejects images (gate), or is skipped (off).",
    )
    stray_check: Literal["gate", "off"] = Field(
        default="gate",
        description="t2i: reject an image with a mark away from every planned box that the "
        "prompt and plan argue against (gate), or skip the check (off).",
    )
    critique_by: Literal["scene", "model"] = Field(
        default="scene",
        description="critique and the t2i critique: check a ShapesWorld prompt against the "
        "scene the model perceives (its caption, each object grounded) by the world's rules "
        "(scene), or take the model's critique answer alone (model: one call, less accurate).",
    )
    answer_by: Literal["scene", "direct"] = Field(
        default="scene",
        description="ask: read object questions off the scene the model perceives (its caption, "
        "each object grounded) by the world's rules (scene), or ask the model the question "
        "alone (direct: one call, less accurate).",
    )
    ground_by: Literal["scene", "direct"] = Field(
        default="scene",
        description="ground: check each box against the scene the model perceives (scene), or "
        "return the model's own boxes (direct: one call, less accurate).",
    )

    # -- the HTTP server ----------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Bind address (loopback by default).")
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = Field(default=None, description="Required bearer token, if set.")
    max_upload_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=4096 * 4096, ge=1, description="Largest input image.")
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_n: int = Field(default=4, ge=1, description="Most images per request.")
    max_steps: int = Field(default=64, ge=1, description="Most denoising steps per request.")
    max_rounds_limit: int = Field(default=8, ge=1, description="Most rounds per request.")
    keep_days: float | None = Field(
        default=None, gt=0,
        description="serve: prune the runs and sessions idle for longer (`LavidaAgent.prune`) "
        "when it starts and every hour; None: keep everything.")  # fmt: skip

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        home = self.home.expanduser().absolute()
        if home.exists() and not home.is_dir():
            raise ValueError(f"home {str(home)!r} is a file; it must be a folder (made if missing)")
        object.__setattr__(self, "home", home)
        if self.artifacts_dir is None:
            object.__setattr__(self, "artifacts_dir", home / "artifacts")
        if self.runs_dir is None:
            object.__setattr__(self, "runs_dir", home / "runs")
        if self.db_path is None:
            object.__setattr__(self, "db_path", str(home / "lavida.db"))
        return self

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, /, **overrides: Any
    ) -> Settings:
        """Settings from `overrides` > `LAVIDA_*` environment variables > defaults.

        Args:
            environ: the environment to read (default: `os.environ`).
            **overrides: field values; a `None` value counts as "not given".

        Raises:
            InvalidInputError: an unknown field, or a value that does not validate (the
                message names the argument or the environment variable).
        """
        env = os.environ if environ is None else environ
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:
            raise InvalidInputError(f"unknown setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for name in cls.model_fields:
            var = ENV_PREFIX + name.upper()
            if var in env:
                values[name] = _env_value(cls, name, env[var])
                origin[name] = var
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
                origin[name] = name
        return cls._validate(values, origin)

    def replace(self, **overrides: Any) -> Settings:
        """A copy with some fields changed (validated; `None` values are ignored)."""
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise InvalidInputError(f"unknown setting(s): {', '.join(unknown)}")
        values = self.model_dump(exclude_unset=True)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return self._validate(values, {k: k for k in overrides})

    @classmethod
    def _validate(cls, values: dict[str, Any], origin: dict[str, str]) -> Settings:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err.get("loc") else "settings"
            raise InvalidInputError(
                f"invalid setting {origin.get(field, field)}={values.get(field)!r}: {err['msg']}"
            ) from None

    # -- helpers --------------------------------------------------------------------------------

    @property
    def db_in_memory(self) -> bool:
        """True when checkpoints are kept in memory only."""
        return self.db_path == MEMORY

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON, with the API key masked (for traces and `--json` output)."""
        data = self.model_dump(mode="json")
        if data.get("api_key"):
            data["api_key"] = "***"
        return data


def _env_value(cls: type[Settings], name: str, raw: str) -> Any:
    """An environment string for field `name` (empty or `none` -> None for optional fields)."""
    field = cls.model_fields[name]
    optional = not field.is_required() and field.default is None
    if optional and raw.strip().lower() in ("", "none", "null"):
        return None
    return raw
