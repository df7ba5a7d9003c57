"""The flat public API resolves, is documented, and imports without optional GPU packages."""

from __future__ import annotations

import subprocess
import sys

import pytest

import unipost
from unipost._optional import OptionalDependencyError, available, require


@pytest.mark.parametrize("name", unipost.__all__)
def test_public_symbol_is_documented(name):
    obj = getattr(unipost, name)
    assert (getattr(obj, "__doc__", None) or "").strip(), f"unipost.{name} has no docstring"


def test_import_is_cheap_and_needs_no_optional_package():
    heavy = "('torch', 'triton', 'vllm', 'flash_attn')"
    code = f"import sys, unipost; print(any(m in sys.modules for m in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_optional_dependency_says_how_to_install():
    if available("vllm"):
        pytest.skip("vllm is installed here")
    with pytest.raises(OptionalDependencyError, match=r"pip install"):
        require("vllm")


def test_cli_doctor_runs():
    out = subprocess.run([sys.executable, "-m", "unipost.cli", "doctor"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "triton" in out.stdout and "bwrap" in out.stdout
