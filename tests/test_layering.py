"""Layer rules of DESIGN.md, checked mechanically.

- `tools` and `prompts` import nothing from the project (and never torch);
- `model` never imports `graphs` or the public surface;
- `graphs` never imports torch at import time;
- only `lavida_agent/settings.py` reads environment variables.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> list[tuple[Path, str]]:
    out = []
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(path, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((path, node.module))
    return out


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("tools", ("torch", "lavida_agent.model", "lavida_agent.graphs", "lavida_agent.prompts")),
        ("prompts", ("torch", "lavida_agent.model", "lavida_agent.graphs", "lavida_agent.tools")),
        ("model", ("lavida_agent.graphs", "lavida_agent.api", "lavida_agent.cli", "lavida_agent.server")),
    ],
)
def test_import_direction(folder, forbidden):
    bad = [(p.relative_to(ROOT), m) for p, m in _imports(folder)
           if any(m == f or m.startswith(f + ".") for f in forbidden)]  # fmt: skip
    assert not bad, bad


@pytest.mark.parametrize("package", ["lavida_agent.tools", "lavida_agent.graphs", "lavida_agent.prompts"])
def test_import_does_not_load_torch(package):
    code = f"import sys, {package}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"importing {package} imported torch"


def test_only_settings_reads_environment():
    offenders = []
    for folder in ("lavida_agent", "model", "graphs", "tools", "prompts"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "lavida_agent" / "settings.py":
                continue
            text = path.read_text()
            if "os.environ" in text or "os.getenv" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"environment read outside lavida_agent/settings.py: {offenders}"
