"""Shared cases of the vLLM tests: a tiny Qwen3 that vLLM's CPU backend accepts, states, a target action."""

from __future__ import annotations

import json

import torch

TINY_VLLM = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}

FINISH = {
    "type": "function",
    "function": {
        "name": "finish",
        "description": "Finish the task with a message.",
        "parameters": {
            "type": "object",
            "properties": {"message": {"type": "string"}},
            "required": ["message"],
        },
    },
}
TOOLS = [FINISH]
USERS = ["short", "a much longer issue text " * 6, "medium length issue here", "fix add(2, 3)"]
# what the trained model must say at every state: one valid call, so parsed actions can be compared
TARGET = {
    "role": "assistant",
    "content": "Done.",
    "tool_calls": [
        {
            "id": "call_t0_0",
            "type": "function",
            "function": {"name": "finish", "arguments": json.dumps({"message": "fixed"})},
        }
    ],
}


def make_states():
    from unipost.rollout.policy import AgentState

    return [
        AgentState(
            messages=[{"role": "system", "content": "Fix the bug."}, {"role": "user", "content": u}],
            tools=TOOLS,
        )
        for u in USERS
    ]


def train_to_emit(model, tokenizer, states, action, *, max_steps: int = 200, lr: float = 1e-2) -> int:
    """Full-batch supervised steps on (state, action) until greedy decoding reproduces ``action``: a
    weight change big enough that greedy outputs certainly differ from the random-init model's.

    Stops once every action token has been the argmax under teacher forcing (= what greedy decoding
    generates) for 5 steps in a row; returns the number of steps taken."""
    from unipost.rendering import render_action

    rows = []
    for state in states:
        prompt, text = render_action(tokenizer, state.messages, action, state.tools)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    ids_BL = torch.zeros(len(rows), width, dtype=torch.long)
    labels_BL = torch.full((len(rows), width), -100)
    mask_BL = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):  # right padding: positions are unchanged
        ids_BL[i, : len(ids)], labels_BL[i, : len(ids)], mask_BL[i, : len(ids)] = (
            torch.tensor(ids),
            torch.tensor(labels),
            1,
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    target_BL = labels_BL[:, 1:]
    streak = 0
    for step in range(max_steps):  # noqa: B007 - returned
        optimizer.zero_grad()
        out = model(input_ids=ids_BL, attention_mask=mask_BL, labels=labels_BL)
        argmax_ok = (out.logits[:, :-1].argmax(-1) == target_BL)[target_BL != -100].all()
        streak = streak + 1 if argmax_ok else 0
        if streak == 5:
            break
        out.loss.backward()
        optimizer.step()
    model.eval()
    return step
