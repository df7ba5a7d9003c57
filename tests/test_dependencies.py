"""Every core dependency is used by the package (or named here with the reason it is needed).

A core dependency nobody imports costs every user an install (einops, trl and an unused datasets did);
one only some users need belongs in an extra.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = {"pyyaml": "yaml"}  # distribution name -> import name, where they differ
INDIRECT = {
    "jinja2": "transformers renders chat templates with it (apply_chat_template) but does not require it",
    "tensorboard": "torch.utils.tensorboard.SummaryWriter (unipost.train.metrics) needs the package",
}


def _imported_top_level_modules() -> set[str]:
    found = set()
    for path in (ROOT / "unipost").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_every_core_dependency_is_imported_or_explained():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in deps]
    imported = _imported_top_level_modules()
    unused = [n for n in names if MODULE.get(n, n.replace("-", "_")) not in imported and n not in INDIRECT]
    assert not unused, (
        f"core dependencies unipost never imports (drop them or move them to an extra): {unused}"
    )
    assert not set(INDIRECT) - set(names), "INDIRECT names a package that is no longer a core dependency"
