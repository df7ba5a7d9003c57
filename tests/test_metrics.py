"""MetricsLogger (JSONL + TensorBoard, resume truncation, torn lines, optional dashboards) and the plots."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from unipost.train.metrics import MetricsLogger, read_metrics
from unipost.train.plots import plot_comparison_bars, plot_learning_curves


def _tb_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, config={"recipe": "dagger", "api_key_env": "OPENAI_API_KEY"}) as logger:
        assert logger.backends == ["jsonl", "tensorboard"]
        for step in range(3):
            logger.log(step, {"loss": 1.0 / (step + 1), "tokens": np.int64(100 * step)}, prefix="train")
        logger.log(2, {"resolve_rate": torch.tensor(0.25), "submitted": True}, prefix="heldout")
        # Each record is on disk as soon as log() returns (a kill -9 here loses nothing).
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    records = read_metrics(tmp_path)
    assert _strip_time(records) == [
        {"step": 0, "train/loss": 1.0, "train/tokens": 0.0},
        {"step": 1, "train/loss": 0.5, "train/tokens": 100.0},
        {"step": 2, "train/loss": pytest.approx(1 / 3), "train/tokens": 200.0},
        {"step": 2, "heldout/resolve_rate": 0.25, "heldout/submitted": 1.0},
    ]
    assert all(isinstance(r["time"], float) for r in records)
    scalars = _tb_scalars(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == [0, 1, 2]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.0, 0.5, 1 / 3], rel=1e-6)
    assert scalars["heldout/resolve_rate"] == [(2, 0.25)]


def test_resume_drops_records_after_checkpoint_step(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(5):
            logger.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')  # killed mid-write during iteration 5
    # The last checkpoint was iteration 2: records 3, 4 and the torn one belong to the lost work.
    with MetricsLogger(tmp_path, resume_from_step=2) as logger:
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
        logger.log(3, {"loss": 30.0})
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    # TensorBoard purges the orphaned steps too, so the curve has the new value at step 3 and no step 4.
    assert _tb_scalars(tmp_path)["loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def test_torn_last_line_tolerated_and_middle_corruption_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_metrics(path)] == [0, 1]
    # A fresh logger on the same dir repairs the tail so appended records stay readable.
    with pytest.warns(UserWarning, match="torn last line"), MetricsLogger(tmp_path, tensorboard=False) as lg:
        lg.log(2, {"loss": 0.25})
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    # A complete last record that only lacks its newline is kept, not dropped.
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}')
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
    with MetricsLogger(tmp_path, tensorboard=False) as lg:
        lg.log(2, {"loss": 0.25})
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_bad_metrics_rejected_with_the_name(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="'acc' must be a number"):
            logger.log(0, {"acc": "high"})
        with pytest.raises(ValueError, match="'train/w' must be a scalar"):
            logger.log(0, {"w": torch.ones(3)}, prefix="train")
        with pytest.raises(ValueError, match="reserved"):
            logger.log(0, {"step": 1.0})
        with pytest.raises(ValueError, match="non-negative int"):
            logger.log(-1, {"loss": 1.0})
        record = logger.log(0, {"loss": float("nan")})  # a diverged loss is information, kept
        assert math.isnan(record["loss"])
    assert math.isnan(read_metrics(tmp_path)[0]["loss"])
    with pytest.raises(ValueError, match=r"config\['teacher'\]\['api_key'\]"):
        MetricsLogger(tmp_path, tensorboard=False, config={"teacher": {"api_key": "sk-live"}})
    with pytest.raises(ValueError, match="resume_from_step"):
        MetricsLogger(tmp_path, tensorboard=False, resume_from_step=-2)


def test_optional_dashboards_missing_warn_not_fail(tmp_path, monkeypatch):
    for name in ("wandb", "trackio"):
        monkeypatch.setitem(sys.modules, name, None)  # make sure neither is importable here
    monkeypatch.setattr("unipost.train.metrics.available", lambda name: False)
    with (
        pytest.warns(UserWarning, match=r"wandb=True but the 'wandb' package is not installed \(pip install"),
        pytest.warns(UserWarning, match="trackio=True but the 'trackio' package"),
    ):
        logger = MetricsLogger(tmp_path, tensorboard=False, wandb=True, trackio=True)
    assert logger.backends == ["jsonl"]
    logger.log(0, {"loss": 1.0})
    logger.close()
    assert len(read_metrics(tmp_path)) == 1


def test_wandb_forwarding_when_installed(tmp_path, monkeypatch):
    """wandb is not installed on the CPU test box; a minimal stand-in records what the logger sends."""
    calls: list[tuple] = []

    class _Run:
        id = "abc123"

        def log(self, data, step=None):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or _Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, config={"lr": 0.1}, run_name="r1") as logger:
        logger.log(4, {"loss": 0.5, "kl": float("inf")}, prefix="train")
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"lr": 0.1} and calls[0][1]["name"] == "r1"
    assert calls[1] == ("log", {"train/loss": 0.5}, 4)  # non-finite values stay in JSONL only
    assert calls[2] == ("finish",)
    assert (tmp_path / ".wandb_run_id").read_text() == "abc123"
    MetricsLogger(tmp_path, tensorboard=False, wandb=True, resume_from_step=4).close()
    assert calls[3][1]["id"] == "abc123" and calls[3][1]["resume"] == "allow"


# ------------------------------------------------------------------------------------------------ plots


def _curve_records(slope: float, n: int = 6):
    out = []
    for it in range(n):
        rate = min(1.0, 0.1 + slope * it)
        out.append({"step": it, "iteration": it, "train/loss": 2.0 / (1 + it)})
        out.append(
            {"step": it, "iteration": it, "heldout/resolve_rate": rate,
             "heldout/resolve_rate_lo": max(0.0, rate - 0.1), "heldout/resolve_rate_hi": min(1.0, rate + 0.1),
             "heldout/reverse_kl": 1.5 - slope * it}
        )  # fmt: skip
    return out


def _read_png(path):
    import matplotlib.image as mpimg

    assert path.suffix == ".png" and path.stat().st_size > 10_000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert float(img[..., :3].std()) > 0.05  # not a blank canvas
    return img


def test_learning_curves_png(tmp_path):
    with MetricsLogger(tmp_path / "sft", tensorboard=False) as logger:
        for record in _curve_records(0.05):
            it = record.pop("step")
            logger.log(it, record)
    runs = {"DAgger": _curve_records(0.12), "SFT": tmp_path / "sft"}  # records and a run dir both work
    keys = ["heldout/resolve_rate", "heldout/reverse_kl", "train/loss"]
    out = plot_learning_curves(runs, keys, tmp_path / "plots" / "curves.png")
    img = _read_png(out)
    # Three panels side by side at 4.6 x 4.0 inches and 120 dpi.
    assert img.shape[:2] == (round(4.0 * 120), round(3 * 4.6 * 120))
    two = _read_png(plot_learning_curves(runs, keys[:2], tmp_path / "two.png"))
    assert two.shape[1] == round(2 * 4.6 * 120)

    typo = r"no run has metric\(s\) \['heldout/resolve_rat'\]; available metrics: .*'heldout/resolve_rate'"
    with pytest.raises(ValueError, match=typo):
        plot_learning_curves(runs, ["heldout/resolve_rat"], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="'GRPO'"):
        plot_learning_curves({"GRPO": tmp_path / "nope"}, keys, tmp_path / "x.png")


def test_comparison_bars_png(tmp_path):
    R = "heldout/resolve_rate"
    results = {
        "DAgger": {R: 0.42, f"{R}_lo": 0.33, f"{R}_hi": 0.51, "heldout/reverse_kl": 0.61},
        "SFT": {R: 0.21, f"{R}_lo": 0.14, f"{R}_hi": 0.30, "heldout/reverse_kl": 1.12},
    }
    out = plot_comparison_bars(results, [R, "heldout/reverse_kl"], tmp_path / "bars.png")
    img = _read_png(out)
    assert img.shape[0] == round(4.0 * 120)
    bad = {"SFT": {R: 0.5, f"{R}_lo": 0.1, f"{R}_hi": 0.3}}
    with pytest.raises(ValueError, match="outside its interval"):
        plot_comparison_bars(bad, [R], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no run has metric 'kl'"):
        plot_comparison_bars(results, ["kl"], tmp_path / "bad.png")


def test_jsonl_is_plain_json_lines(tmp_path):
    """Other tools (jq, pandas.read_json(lines=True)) read the file: one object per line, nothing else."""
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"a": 1.0})
        logger.log(1, {"a": 2.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["a"] for line in lines] == [1.0, 2.0]
