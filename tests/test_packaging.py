"""The package-dir mapping ships every subpackage and data file (a nested package missing
from `packages` is silently absent from the wheel while the editable install still works)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"lavida_agent": "lavida_agent", "model": "lavida_agent.model",
          "benchmarks": "lavida_agent.benchmarks",
          "graphs": "lavida_agent.graphs", "tools": "lavida_agent.tools",
          "prompts": "lavida_agent.prompts"}  # fmt: skip


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _source_packages() -> set[str]:
    found = set()
    for folder, dotted in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((dotted, *rel)))
    return found


def test_every_folder_with_init_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = _source_packages() - listed
    assert not missing, f"add to [tool.setuptools] packages: {sorted(missing)}"


def test_built_wheel_contains_every_subpackage_and_prompt(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in _source_packages():
        assert pkg.replace(".", "/") + "/__init__.py" in names, pkg
    for prompt in (ROOT / "prompts").glob("*.md"):
        assert f"lavida_agent/prompts/{prompt.name}" in names, prompt.name
    for weight in (ROOT / "model" / "weights").rglob("*"):
        if weight.suffix in {".json", ".safetensors"}:
            rel = weight.relative_to(ROOT / "model").as_posix()
            assert f"lavida_agent/model/{rel}" in names, rel
