"""What a new user meets first: a mistake is one or two lines naming the problem and the fix (the
traceback only with --debug), and `unipost doctor` says what this machine can run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from unipost.train.config import TrainConfig


def _cli(*args: str, capsys: pytest.CaptureFixture | None = None) -> subprocess.CompletedProcess:
    """The command line as a user runs it: in a subprocess, or (with ``capsys``, much cheaper) in this
    process through the same ``app(...)`` call the console script makes."""
    if capsys is None:
        return subprocess.run([sys.executable, "-m", "unipost.cli", *args], capture_output=True, text=True)
    from unipost.cli import app

    try:
        app(list(args), prog_name="unipost")
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _short(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) <= 2, lines
    return lines


def test_eval_of_a_folder_that_is_not_a_run_says_so_in_two_lines(tmp_path, capsys):
    first = _short(_cli("eval", str(tmp_path)))[0]  # the real console path, in its own process
    assert f"{tmp_path} is not a unipost run (no config.json)" in first and "runs/<name>" in first
    from unipost.cli import UserError

    with pytest.raises(UserError, match="not a unipost run"):  # --debug: the exception, traceback and all
        _cli("--debug", "eval", str(tmp_path), capsys=capsys)


def test_a_misspelt_config_field_names_the_one_meant(tmp_path, capsys):
    top, nested = tmp_path / "top.json", tmp_path / "nested.json"
    top.write_text(json.dumps({"iteratons": 3}))
    nested.write_text(json.dumps({"rollout": {"temprature": 0.5}}))
    wanted = "TrainConfig has no field 'iteratons'; did you mean 'iterations'?"
    assert wanted in _short(_cli("train", str(top), capsys=capsys))[0]
    line = _short(_cli("train", str(nested), capsys=capsys))[0]
    assert "in rollout:" in line and "did you mean 'temperature'?" in line
    with pytest.raises(ValidationError, match="did you mean 'iterations'"):  # in Python, too
        TrainConfig(iteratons=3)
    with pytest.raises(ValidationError, match="its fields are: "):  # nothing close: the list
        TrainConfig(zzz=1)


def test_train_with_a_missing_experiment_file_names_what_to_give(tmp_path, capsys):
    line = _short(_cli("train", str(tmp_path / "nope.py"), capsys=capsys))[0]
    assert "is not a file" in line and "experiments/cpu_dagger.py" in line


def test_doctor_reports_cuda_and_what_each_backend_needs(capsys):
    import torch

    from unipost._optional import available

    out = _cli("doctor", capsys=capsys)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "CUDA" in lines["torch/CUDA"]
    if not torch.cuda.is_available():
        assert "no CUDA" in lines["torch/CUDA"] or "no CUDA GPU" in lines["torch/CUDA"]
        if available("triton"):  # installed, but a CPU-only torch cannot use it: not a plain "yes"
            assert "idle" in lines["triton"] and "needs a CUDA GPU" in lines["triton"]
    for name in ("vllm", "flash_attn", "docker", "ray"):
        if not available(name):
            assert "pip install" in lines[name] or "bash scripts/" in lines[name]
    assert lines["bwrap"].split()[1] in ("yes:", "no:")
