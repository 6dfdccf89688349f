"""`Settings`: defaults, derived paths, and the argument > environment > default precedence."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from lavida_agent.errors import InvalidInputError
from lavida_agent.settings import Settings


def test_defaults_without_environment():
    s = Settings()
    assert s.home == Path("~/.lavida-agent").expanduser().absolute()
    assert s.artifacts_dir == s.home / "artifacts"
    assert s.runs_dir == s.home / "runs"
    assert s.db_path == str(s.home / "lavida.db")
    assert (s.model_path, s.device, s.dtype) == (None, None, "float32")
    assert (s.num_steps, s.max_rounds, s.plan, s.seed) == (16, 3, True, None)
    assert (s.host, s.port, s.api_key) == ("127.0.0.1", 8000, None)
    assert s.max_upload_bytes > 0 and s.max_pixels > 0 and s.max_prompt_chars > 0
    assert s.max_n >= 1 and s.max_steps >= 1 and s.max_rounds_limit >= 1


def test_home_comes_from_the_environment_and_paths_follow_it(tmp_path):
    s = Settings.from_env()  # conftest sets LAVIDA_HOME to a temporary folder
    assert s.home == tmp_path / "lavida_home"
    assert s.artifacts_dir == s.home / "artifacts" and s.runs_dir == s.home / "runs"
    assert s.db_path == str(s.home / "lavida.db")


def test_argument_beats_environment_beats_default(monkeypatch):
    assert Settings.from_env().num_steps == 16
    monkeypatch.setenv("LAVIDA_NUM_STEPS", "8")
    assert Settings.from_env().num_steps == 8
    assert Settings.from_env(num_steps=4).num_steps == 4
    assert Settings.from_env(num_steps=None).num_steps == 8  # None means "not given"


def test_an_explicit_path_beats_the_home_derived_one(monkeypatch, tmp_path):
    monkeypatch.setenv("LAVIDA_ARTIFACTS_DIR", str(tmp_path / "elsewhere"))
    s = Settings.from_env()
    assert s.artifacts_dir == tmp_path / "elsewhere"
    assert s.runs_dir == s.home / "runs"


@pytest.mark.parametrize(
    "var, raw, field, value",
    [
        ("LAVIDA_PLAN", "false", "plan", False),
        ("LAVIDA_PLAN", "1", "plan", True),
        ("LAVIDA_SEED", "", "seed", None),
        ("LAVIDA_ANSWER_BY", "direct", "answer_by", "direct"),
        ("LAVIDA_CRITIQUE_BY", "model", "critique_by", "model"),
        ("LAVIDA_GROUND_BY", "direct", "ground_by", "direct"),
        ("LAVIDA_SEED", "42", "seed", 42),
        ("LAVIDA_MODEL_PATH", "none", "model_path", None),
        ("LAVIDA_MODEL_PATH", "/ckpt", "model_path", "/ckpt"),
        ("LAVIDA_PORT", "9000", "port", 9000),
        ("LAVIDA_DB_PATH", ":memory:", "db_path", ":memory:"),
    ],
)
def test_environment_strings_are_parsed_by_field_type(monkeypatch, var, raw, field, value):
    monkeypatch.setenv(var, raw)
    assert getattr(Settings.from_env(), field) == value


def test_an_explicit_environment_mapping_is_read_instead_of_the_process_one():
    s = Settings.from_env({"LAVIDA_HOME": "/tmp/x", "LAVIDA_MAX_ROUNDS": "5"})
    assert s.home == Path("/tmp/x") and s.max_rounds == 5


def test_bad_values_name_their_source(monkeypatch):
    monkeypatch.setenv("LAVIDA_PORT", "not-a-port")
    with pytest.raises(InvalidInputError, match="LAVIDA_PORT"):
        Settings.from_env()
    monkeypatch.delenv("LAVIDA_PORT")
    with pytest.raises(InvalidInputError, match="num_steps"):
        Settings.from_env(num_steps=0)
    with pytest.raises(InvalidInputError, match="unknown setting"):
        Settings.from_env(bogus=1)
    with pytest.raises(InvalidInputError, match="dtype"):
        Settings.from_env(dtype="int4")
    monkeypatch.setenv("LAVIDA_SEED", "-3")  # refused like an explicit seed=-3
    with pytest.raises(InvalidInputError, match="LAVIDA_SEED"):
        Settings.from_env()


def test_settings_are_frozen_and_replace_revalidates(tmp_path):
    s = Settings.from_env()
    with pytest.raises(pydantic.ValidationError):
        s.num_steps = 3  # type: ignore[misc]
    t = s.replace(home=tmp_path / "other", num_steps=2, port=None)
    assert t.num_steps == 2 and t.port == s.port
    assert t.artifacts_dir == tmp_path / "other" / "artifacts"  # derived paths follow home
    with pytest.raises(InvalidInputError):
        s.replace(max_rounds=0)


def test_public_dict_masks_the_api_key():
    data = Settings(api_key="secret").public_dict()
    assert data["api_key"] == "***" and "secret" not in str(data)
    assert Settings().db_in_memory is False and Settings(db_path=":memory:").db_in_memory
