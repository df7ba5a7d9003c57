"""Trajectories rendered through real chat templates: tree packing is exact, prefix breaks are caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import TOOLS, make_trajectory

from unipost.data import Trajectory
from unipost.kernels.loss import weighted_nll
from unipost.kernels.model import packed_logprobs
from unipost.kernels.packing import pack
from unipost.models import build_tokenizer
from unipost.rendering.chat import (
    ChatRenderer,
    LabelSpec,
    RenderStats,
    TemplatePrefixError,
    trajectory_sequences,
)

IMPL = "fused"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"  # copies of ../shared/fixtures


def dagger_trajectory(n_turns: int = 6, reasoning: bool = False) -> Trajectory:
    """Alternating teacher/student turns; the teacher's label is recorded at every state."""
    return make_trajectory(("ts" * n_turns)[:n_turns], reasoning=reasoning)


def teacher_labels(traj: Trajectory) -> list[LabelSpec]:
    return [LabelSpec(turn.index, turn.label) for turn in traj.turns]


def test_tree_equals_per_transition_on_dagger_trajectory(tokenizer, tiny_model):
    traj = dagger_trajectory(8)
    renderer = ChatRenderer(tokenizer, TOOLS)
    stats = RenderStats()
    tree = trajectory_sequences(traj, teacher_labels(traj), renderer, mode="tree", stats=stats)
    flat = trajectory_sequences(traj, teacher_labels(traj), renderer, mode="per_transition")
    assert len(tree) == 1 and stats.prefix_breaks == 0 and stats.labels == 8
    tree_batch, flat_batch = pack(tree), pack(flat)
    assert tree_batch.num_branches == 4  # the four student turns carry their teacher label as a branch
    assert tree_batch.num_tokens * 3 < flat_batch.num_tokens
    torch.testing.assert_close(tree_batch.label_target_L, flat_batch.label_target_L, rtol=0, atol=0)

    tiny_model.zero_grad()
    loss, _ = weighted_nll(packed_logprobs(tiny_model, tree_batch, impl=IMPL).logp_L)
    loss.backward()
    tree_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    flat_logp = packed_logprobs(tiny_model, flat_batch, impl=IMPL).logp_L
    loss_flat, _ = weighted_nll(flat_logp)
    loss_flat.backward()
    torch.testing.assert_close(loss, loss_flat, atol=1e-5, rtol=0)
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(tree_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_sft_loss_equals_hf_loss(tokenizer, tiny_model):
    """Teacher-only trajectory, teacher labels: our token-mean loss == model(input_ids, labels).loss."""
    traj = dagger_trajectory(5)
    for turn in traj.turns:
        turn.executor, turn.action = "teacher", turn.label
    renderer = ChatRenderer(tokenizer, TOOLS)
    (doc,) = trajectory_sequences(traj, teacher_labels(traj), renderer)
    batch = pack([doc])
    assert batch.num_branches == 0
    ours, _ = weighted_nll(packed_logprobs(tiny_model, batch, impl=IMPL).logp_L)
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    labels = torch.full((len(doc.root),), -100)
    for label in doc.labels:
        c, n = label.context_len, len(label.token_ids)
        labels[c : c + n] = torch.tensor(label.token_ids)
    tiny_model.zero_grad()
    hf = tiny_model(input_ids=torch.tensor([doc.root]), labels=labels[None]).loss
    hf.backward()
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(our_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    # the end-of-turn token is part of every label: the student must learn to stop
    assert all(label.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") for label in doc.labels)


def test_qwen3_template_prefix_break_is_detected(tiny_model):
    """qwen3.jinja drops reasoning of turns before the last user query: caught, rendered separately."""
    tok = build_tokenizer(template=str(FIXTURES / "qwen3.jinja"))
    traj = dagger_trajectory(4, reasoning=True)
    # a follow-up user message after turn 1 makes turns 0-1 precede the last user query
    traj.turns[1].observation.append({"role": "user", "content": "Please also check the tests."})
    renderer = ChatRenderer(tok, TOOLS)
    stats = RenderStats()
    tree = trajectory_sequences(traj, teacher_labels(traj), renderer, stats=stats)
    assert stats.prefix_breaks >= 1 and len(tree) >= 2
    flat = trajectory_sequences(traj, teacher_labels(traj), renderer, mode="per_transition")
    for doc in tree:  # every context is exactly what the model sees at inference
        for label in doc.labels:
            turn = label.meta["turn"]
            assert doc.root[: label.context_len] == renderer.context_ids(traj.context(turn))
    with torch.no_grad():
        a = packed_logprobs(tiny_model, pack(tree), impl=IMPL).logp_L
        b = packed_logprobs(tiny_model, pack(flat), impl=IMPL).logp_L
    order = [label.meta["turn"] for doc in tree for label in doc.labels]
    assert order == sorted(order)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("template", ["qwen3.jinja", "qwen3-coder.jinja"])
def test_real_templates_tree_pack(template):
    tok = build_tokenizer(template=str(FIXTURES / template))
    traj = dagger_trajectory(5)
    renderer = ChatRenderer(tok, TOOLS)
    tree = trajectory_sequences(traj, teacher_labels(traj), renderer)
    flat = trajectory_sequences(traj, teacher_labels(traj), renderer, mode="per_transition")
    tree_batch, flat_batch = pack(tree), pack(flat)
    torch.testing.assert_close(tree_batch.label_target_L, flat_batch.label_target_L, rtol=0, atol=0)
    assert tree_batch.num_tokens < flat_batch.num_tokens


def test_template_without_prefix_property_raises():
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT>{% endif %}"
    )
    traj = dagger_trajectory(2)
    with pytest.raises(TemplatePrefixError, match="renders the context differently"):
        trajectory_sequences(traj, teacher_labels(traj), ChatRenderer(tok))


def test_label_turn_out_of_range(tokenizer):
    traj = dagger_trajectory(2)
    with pytest.raises(ValueError, match="outside"):
        trajectory_sequences(traj, [LabelSpec(5, traj.turns[0].label)], ChatRenderer(tokenizer))


def test_count_tokens_is_the_length_of_the_prompt_the_model_is_given(tokenizer):
    """The one token counter (Trainer rollouts, held-out evaluation and KL share it) counts the rendered
    context with the generation prompt and the renderer's tools: what the context budget is about."""
    traj = dagger_trajectory(4)
    with_tools, without = ChatRenderer(tokenizer, TOOLS), ChatRenderer(tokenizer)
    for t in range(len(traj.turns) + 1):
        context = traj.context(t)
        assert with_tools.count_tokens(context, TOOLS) == len(with_tools.context_ids(context))
    assert with_tools.count_tokens(traj.prompt) > without.count_tokens(traj.prompt)  # tools are rendered
