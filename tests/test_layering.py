"""The package imports only downward, function-level and TYPE_CHECKING imports included.

Layers, bottom up (docs/architecture.md): a module may import its own layer or lower ones.

    0 data, _optional, _secrets, machine, kernels,    the core: importable without envs, rollout or train
      objective
    1 rendering, models
    2 envs
    3 rollout, batch
    4 eval
    5 train, lab
    6 cli, the package face (unipost/__init__.py)

A function-level import hides a cycle at run time, not from a reader (or from the next refactor), so
every ``import`` statement in the file counts. A new top-level module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

UNIPOST = Path(__file__).resolve().parent.parent / "unipost"
LAYERS: dict[str, int] = {
    **dict.fromkeys(["data", "_optional", "_secrets", "machine", "kernels", "objective"], 0),
    **dict.fromkeys(["rendering", "models"], 1),
    "envs": 2,
    **dict.fromkeys(["rollout", "batch"], 3),
    "eval": 4,
    **dict.fromkeys(["train", "lab"], 5),
    **dict.fromkeys(["cli", "__init__", "__main__"], 6),
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str, root: Path) -> list[tuple[int, str]]:
    """Every ``(line, absolute module)`` the file imports, wherever the statement sits."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "unipost":  # ``from unipost import envs`` is the subpackage; anything else the face
                found += [(node.lineno, _face_or_submodule(root, a.name)) for a in node.names]
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def _face_or_submodule(root: Path, name: str) -> str:
    if (root / f"{name}.py").exists() or (root / name / "__init__.py").exists():
        return f"unipost.{name}"
    return "unipost"  # a name the package face (unipost/__init__.py) defines


def _top(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "unipost":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def layering_problems(root: Path = UNIPOST, layers: dict[str, int] = LAYERS) -> list[str]:
    """Upward imports, modules without a layer, and cycles between top-level modules."""
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        mine = _top(module) or "__init__"
        if mine not in layers:
            problems.append(f"{path.relative_to(root.parent)}: top-level module {mine!r} has no layer")
            continue
        for line, target in _imports(path, module, root):
            theirs = _top(target)
            if theirs is None or theirs == mine:
                continue
            if theirs not in layers:
                continue  # reported once, from its own files
            edges.setdefault(mine, set()).add(theirs)
            if layers[theirs] > layers[mine]:
                problems.append(
                    f"{path.relative_to(root.parent)}:{line} ({mine}, layer {layers[mine]}) imports "
                    f"{target} (layer {layers[theirs]})"
                )

    # cycles among top-level modules of the same layer (across layers they are upward imports above)
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for top in sorted(edges):
        if top in reach(top):
            problems.append(f"cycle: {top} imports itself through {sorted(edges[top])}")
    return problems


def test_the_package_imports_only_downward_and_has_no_cycle():
    problems = layering_problems()
    assert not problems, "layering violations:\n" + "\n".join(problems)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "unipost" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "unipost"


def test_the_check_finds_a_function_level_upward_import_and_a_cycle(tmp_path):
    """The check can fail: a lazy ``envs -> train`` import, a TYPE_CHECKING one, and a same-layer cycle."""
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "envs/__init__.py": "",
            "envs/registry.py": "def f():\n    from unipost.train.setup import env_factory\n",
            "envs/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..eval import x\n",
            "train/__init__.py": "",
            "train/setup.py": "from unipost.envs import registry\n",
            "eval/__init__.py": "",
            "data.py": "def g():\n    import unipost.kernels\n",
            "kernels/__init__.py": "from unipost import data\n",
            "mystery.py": "",
        },
    )
    problems = layering_problems(root)
    text = "\n".join(problems)
    assert "envs/registry.py:2 (envs, layer 2) imports unipost.train.setup (layer 5)" in text
    assert "envs/base.py:3 (envs, layer 2) imports unipost.eval (layer 4)" in text
    assert "cycle: data" in text and "cycle: kernels" in text
    assert "'mystery' has no layer" in text
    assert not any("train/setup.py" in p for p in problems)  # downward is fine
