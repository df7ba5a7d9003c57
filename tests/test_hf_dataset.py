"""Trajectory store <-> Hugging Face ``datasets`` (OpenAI-style messages + tools), both directions.

The exact round trip keeps everything a trajectory holds; the chat-format path (data from elsewhere)
trains through the same batch path: its SFT batch has the same label tokens as the original's.
"""

from __future__ import annotations

import pytest
import torch
from factories import TOOLS, make_trajectory

from unipost.batch import build_batch
from unipost.data import Turn
from unipost.objective import SFT, OfflineData
from unipost.rendering.chat import ChatRenderer
from unipost.rollout.hf_dataset import LOSSLESS_COLUMN, from_hf_dataset, to_hf_dataset
from unipost.rollout.store import TrajectoryStore


def _trajectories():
    mixed = make_trajectory("tsts", task_id="a", meta={"iteration": 3, "beta": 0.5})
    mixed.turns[1].action_token_ids = [5, 6, 7]
    mixed.turns[1].action_logprobs = [-0.5, -1.25, -0.125]
    teacher_only = make_trajectory("ttt", task_id="b", seed=4, resolved=False, submitted=True, reward=0.25)
    return [mixed, teacher_only]


def test_exact_round_trip_keeps_executors_labels_logprobs_and_meta():
    trajectories = _trajectories()
    ds = to_hf_dataset(trajectories, tools=TOOLS)
    assert {"messages", "tools", "task_id", "resolved", "submitted", "reward", LOSSLESS_COLUMN} <= set(
        ds.column_names
    )
    assert from_hf_dataset(ds) == trajectories


def test_chat_columns_are_the_openai_format():
    (t,) = _trajectories()[:1]
    row = to_hf_dataset([t], tools=TOOLS)[0]
    assert [m["role"] for m in row["messages"]] == [m["role"] for m in t.messages()]
    call = row["messages"][2]["tool_calls"][0]
    assert call["type"] == "function" and isinstance(call["function"]["arguments"], str)
    assert row["tools"][0]["function"]["name"] == TOOLS[0]["function"]["name"]


def test_chat_rows_from_elsewhere_train_through_the_same_batch_path(tokenizer, tmp_path):
    original = make_trajectory("ttt", task_id="b", seed=4)
    ds = to_hf_dataset([original], tools=TOOLS).remove_columns([LOSSLESS_COLUMN])
    (imported,) = from_hf_dataset(ds)
    assert [turn.executor for turn in imported.turns] == ["teacher"] * 3
    assert imported.meta["tools"] == TOOLS  # Arrow's None-filled struct keys are dropped again
    assert imported.outcome == original.outcome and imported.task_id == "b"

    store = TrajectoryStore(tmp_path / "sft.jsonl")
    store.append(imported)
    store.close()
    (offline,) = OfflineData(tmp_path / "sft.jsonl").trajectories()

    renderer = ChatRenderer(tokenizer, TOOLS)
    recipe = SFT(rejection_sampling=False)
    want = build_batch([original], recipe, renderer).packed
    got = build_batch([offline], recipe, renderer).packed
    assert torch.equal(got.input_ids_T, want.input_ids_T)
    assert torch.equal(got.label_target_L, want.label_target_L)


def test_foreign_rows_without_verdict_or_assistant_turns_and_bad_input():
    from datasets import Dataset

    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    (t,) = from_hf_dataset(Dataset.from_list(rows))
    assert t.turns == [] and t.prompt == rows[0]["messages"] and not t.outcome.resolved
    with pytest.raises(ValueError, match="no 'messages' column"):
        from_hf_dataset(Dataset.from_list([{"text": "hello"}]))
    with pytest.raises(ValueError, match="message role"):
        from_hf_dataset(Dataset.from_list([{"messages": [{"role": "robot", "content": "x"}]}]))
    with pytest.raises(ValueError, match="at least one trajectory"):
        to_hf_dataset([])
    with pytest.raises(TypeError, match="Trajectory"):
        to_hf_dataset([Turn(index=0, executor="teacher", action={"role": "assistant"})])
