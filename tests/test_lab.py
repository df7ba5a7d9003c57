"""The tiny lab: the shipped warm start (hash-checked, rebuildable by its script) and the lab config."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from unipost.train.warm_start import ASSETS, MANIFEST, load_manifest, load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_build(lab_assets) -> Path:
    """``scripts/build-warm-start.py --quick``: the same code path as the shipped build, seconds long.

    The session's ``lab_assets`` (tests/conftest.py) is that script's output; it is shared with the
    tests that train from it rather than built a second time here."""
    return Path(lab_assets)


needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


def heldout_demos(assets: Path, n: int = 4) -> list:
    """Scripted-expert trajectories on held-out tasks, as the lab's students see them (no tool schemas)."""
    return _heldout_demos(load_manifest(assets)["spec"]["max_observation_chars"], n)


@functools.cache
def _heldout_demos(chars: int, n: int) -> list:
    from unipost.train.setup import expert_trajectories

    return expert_trajectories(
        n, difficulty="easy", max_observation_chars=chars, split="heldout", prompt_tools=False
    )


def demo_nll(model, tokenizer, demos) -> float:
    """Mean -log p(expert action token | expert context), pooled over the demos' label tokens."""
    from unipost.batch import make_microbatches
    from unipost.kernels.model import packed_logprobs
    from unipost.objective import SFT
    from unipost.rendering.chat import ChatRenderer

    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in make_microbatches(
            demos, SFT(rejection_sampling=False), ChatRenderer(tokenizer, None), max_tokens=4096
        ):
            logp = packed_logprobs(model, batch.packed).logp_L
            total -= float(logp.double().sum())
            tokens += logp.numel()
    assert tokens > 0
    return total / tokens


def student_and_teacher(assets: Path) -> dict[str, tuple]:
    return {which: load_model(assets / which) for which in ("student", "teacher")}


@needs_bwrap
def test_quick_build_produces_a_working_student_and_teacher(quick_build):
    """Both snapshots load with their tokenizer, render the tool-call markup, and the teacher (the same
    network trained further) is closer to the expert than the student on held-out expert demos: that
    is what it is for (OPD's log-ratio, the reverse-KL diagnostic). The quick build is a few optimiser
    steps, too short to act well; the shipped build's greedy turns are checked below."""
    from unipost.rendering.chat import ChatRenderer
    from unipost.rollout.transformers_policy import TransformersPolicy

    manifest = load_manifest(quick_build)
    assert set(manifest["snapshots_at_step"]) == {"student", "teacher"}
    assert manifest["snapshots_at_step"]["student"] < manifest["snapshots_at_step"]["teacher"]
    assert manifest["validation"]["eval/n"] == manifest["spec"]["validation_tasks"] >= 1  # validation ran
    demos = heldout_demos(quick_build)
    expert_turn = next(m for m in demos[0].messages() if m.get("tool_calls"))
    name = expert_turn["tool_calls"][0]["function"]["name"]
    nll = {}
    for which, (model, tokenizer) in student_and_teacher(quick_build).items():
        assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
        # the tool template travels with the tokenizer: a rendered expert turn has the tool-call markup
        policy = TransformersPolicy(model, tokenizer, max_new_tokens=8)
        assert policy.style == "hermes", which
        text = ChatRenderer(tokenizer, None).render_text(demos[0].messages(), add_generation_prompt=False)
        assert "<tool_call>" in text and f'"name": "{name}"' in text, (which, text[-600:])
        nll[which] = demo_nll(model, tokenizer, demos)
    assert nll["teacher"] < nll["student"], nll


@needs_bwrap
def test_the_shipped_student_and_teacher_act_and_the_teacher_is_closer_to_the_expert():
    """The shipped warm start (what the lab and the main job train from): a greedy turn of each model on
    a held-out task parses to a call of a known tool, and the teacher's NLL of held-out expert demos is
    below the student's (measured: 0.090 vs 0.100 nats per token over 12 demos, lower on every one)."""
    from unipost.envs.embedded.tools import tool_schemas
    from unipost.envs.registry import embedded_env_factory
    from unipost.rollout.policy import AgentState
    from unipost.rollout.transformers_policy import TransformersPolicy
    from unipost.train.warm_start import MAX_NEW_TOKENS

    chars = load_manifest(ASSETS)["spec"]["max_observation_chars"]
    demos = heldout_demos(ASSETS)
    models = student_and_teacher(ASSETS)
    env = embedded_env_factory("easy", chars, prompt_tools=False)(("heldout", 0))
    try:
        prompt = env.reset()
        names = {t["function"]["name"] for t in tool_schemas()}  # the prompt carries none: prompt_tools=False
        for which, (model, tokenizer) in models.items():
            policy = TransformersPolicy(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS)
            assert policy.style == "hermes", which
            (out,) = policy.act([AgentState(list(prompt), list(env.tools))], greedy=True)
            calls = out.message.get("tool_calls") or []
            assert out.tool_error is None and len(calls) == 1, (which, out.raw)
            assert calls[0]["function"]["name"] in names, (which, out.raw)
    finally:
        env.close()
    nll = {which: demo_nll(model, tokenizer, demos) for which, (model, tokenizer) in models.items()}
    assert nll["teacher"] < nll["student"], nll


def test_a_changed_file_is_refused_with_the_rebuild_command(quick_build, tmp_path):
    import shutil

    copy = tmp_path / "ws"
    shutil.copytree(quick_build, copy)
    weights = copy / "student" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="build-warm-start"):
        load_manifest(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="build-warm-start"):
        load_manifest(copy)


def test_the_shipped_warm_start_matches_its_manifest():
    manifest = load_manifest(ASSETS)
    spec = manifest["spec"]
    config = json.loads((ASSETS / "student" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (spec["hidden_size"], spec["num_layers"])
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"shipped warm start is {size / 2**20:.1f} MB (limit 20 MB)"
    assert "build-warm-start.py" in manifest["command"]


def test_lab_config_round_trips_with_the_dagger_schedule(tmp_path):
    from unipost.train.config import TrainConfig
    from unipost.train.lab import LAB_BETA, tiny_config

    cfg = tiny_config(str(tmp_path), recipe="dagger")
    assert cfg.env.prompt_tools is False and cfg.model.kind == "pretrained"
    recipe = cfg.build_recipe()
    beta = recipe.rollout.beta
    assert [beta(i) for i in range(4)] == pytest.approx([0.6, 0.4, 0.2, 0.2])
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    again = TrainConfig.from_file(path)
    assert again == cfg and again.recipe_kwargs["beta"] == LAB_BETA
    assert tiny_config(str(tmp_path), recipe="sft").recipe_kwargs == {}


def test_schedule_dict_is_a_linear_decay_and_bad_keys_are_named():
    from unipost.objective.schedules import LinearDecay, as_schedule

    assert as_schedule({"start": 0.6, "step": 0.2, "floor": 0.2}) == LinearDecay(0.6, 0.2, 0.2)
    with pytest.raises(ValueError, match="LinearDecay"):
        as_schedule({"begin": 0.6})


def test_prompt_tools_off_leaves_schemas_out_but_still_validates_calls():
    from unipost.envs.embedded import EmbeddedEnv
    from unipost.envs.embedded.expert import tool_call_message

    env = EmbeddedEnv.from_split("train", 0, "easy", prompt_tools=False)
    try:
        env.reset()
        assert env.tools == []
        bad = tool_call_message("", "file_editor", {"command": "explode", "path": "/testbed"}, "c0")
        result = env.step(bad)
        assert result.tool_error and not result.done
    finally:
        env.close()


def test_learning_curve_steps_get_integer_ticks(tmp_path):
    """Issue 13 item 9: a run with evaluations at steps 0 and 4 showed ticks at 0.5, 1.5, ..."""
    from unipost.train.plots import plot_learning_curves

    runs = {
        "DAgger": [{"step": 0, "eval/resolve_rate": 0.2}, {"step": 4, "eval/resolve_rate": 0.3}],
        "SFT": [{"step": 0, "eval/resolve_rate": 0.2}, {"step": 4, "eval/resolve_rate": 0.25}],
    }
    fig_path = plot_learning_curves(runs, keys=["eval/resolve_rate"], out=tmp_path / "c.png", x="step")
    assert Path(fig_path).stat().st_size > 5_000
    from matplotlib.figure import Figure

    import unipost.train.plots as plots

    captured: list[Figure] = []
    original = plots._save
    plots._save = lambda fig, out, dpi: (captured.append(fig), original(fig, out, dpi))[1]
    try:
        plot_learning_curves(runs, keys=["eval/resolve_rate"], out=tmp_path / "d.png", x="step")
    finally:
        plots._save = original
    ticks = [t for t in captured[0].axes[0].get_xticks() if 0 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
