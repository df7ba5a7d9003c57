"""The README's snippets and commands are the ones that work (STYLE habit 9)."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_recipe_snippet_runs():
    block = next(b for b in python_blocks() if "mixture_opd" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["mixture_opd"].describe().startswith("mixture-OPD")
    assert namespace["dagger"].filter_unsubmitted


def test_first_screen_has_exactly_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["bash scripts/run-main-job.sh", "bash scripts/run-tests.sh"]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "scripts/run-tests.sh" in ci
    main_job = (Path(__file__).resolve().parents[1] / "scripts" / "run-main-job.sh").read_text()
    assert "unipost main" in main_job
