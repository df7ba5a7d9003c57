"""KV reuse across an episode's turns in TransformersPolicy: same greedy turns, fewer tokens encoded.

Each check runs the same multi-turn episodes through two policies on one tiny Qwen3, one reusing the
cached keys/values of earlier turns (the default) and one with ``prefix_cache_mb=0`` (every prompt
encoded in full, the behaviour before KV reuse). Greedy tokens must be identical; log-probs agree to
1e-4 (fp32: the reused keys/values were computed in another batch shape, as with any KV cache).
"""

from __future__ import annotations

import pytest
import torch

from unipost.rendering import make_tool_call
from unipost.rollout.policy import AgentState
from unipost.rollout.transformers_policy import PrefixKVCache, TransformersPolicy
from unipost.rollout.transformers_policy import _covers as covers

ATOL = 1e-4
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a shell command.",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
            },
        },
    }
]


@pytest.fixture()
def model(tiny_model):
    return tiny_model.eval()


def _episodes() -> list[list[dict]]:
    issues = ["short issue", "a much longer issue text " * 8, "medium length issue about parsing"]
    return [
        [{"role": "system", "content": "Fix the bug."}, {"role": "user", "content": issue}]
        for issue in issues
    ]


def _advance(messages: list[dict], out, turn: int) -> list[dict]:
    """The next state: the executed action (a well-formed call, as the engine records) + an observation."""
    call = make_tool_call("bash", {"command": f"ls /testbed/{turn}"}, f"call_{turn}")
    action = {"role": "assistant", "content": out.message.get("content") or "", "tool_calls": [call]}
    observation = {
        "role": "tool",
        "tool_call_id": f"call_{turn}",
        "content": f"file_{turn}.py\n" * (3 + turn),
    }
    return [*messages, action, observation]


def _run(policy: TransformersPolicy, turns: int) -> list[list]:
    episodes, outputs = _episodes(), []
    for turn in range(turns):
        states = [AgentState(messages=m, tools=TOOLS, turn=turn) for m in episodes]
        outs = policy.act(states, greedy=True)
        outputs.append(outs)
        episodes = [_advance(m, out, turn) for m, out in zip(episodes, outs, strict=True)]
    return outputs


def _assert_same_turns(a: list[list], b: list[list]) -> None:
    for turn_a, turn_b in zip(a, b, strict=True):
        for x, y in zip(turn_a, turn_b, strict=True):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=ATOL, rtol=0)


def test_greedy_turns_equal_full_encoding_and_reuse_happens(model, tokenizer):
    reuse = TransformersPolicy(model, tokenizer, max_new_tokens=12)
    fresh = TransformersPolicy(model, tokenizer, max_new_tokens=12, prefix_cache_mb=0)
    with_reuse = _run(reuse, turns=4)
    _assert_same_turns(with_reuse, _run(fresh, turns=4))
    assert fresh.kv_stats["reused_tokens"] == 0 and len(fresh.prefix_cache) == 0
    # turns 1-3 of every episode extend the previous prompt: most of each prompt came from the cache
    assert reuse.kv_stats["reused_tokens"] > 0.5 * reuse.kv_stats["prompt_tokens"]
    assert len(reuse.prefix_cache) == 3  # one entry per episode: each turn's entry replaced the last


def test_weight_change_drops_the_cache(model, tokenizer):
    """A training step between rollouts makes cached keys/values stale: they are never read."""
    reuse = TransformersPolicy(model, tokenizer, max_new_tokens=12)
    _run(reuse, turns=2)
    assert len(reuse.prefix_cache) == 3
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # in place, as an optimizer step
    before = reuse.kv_stats["reused_tokens"]
    after_step = _run(reuse, turns=2)  # the same episodes again: their prompts match the stale entries
    assert reuse.kv_stats["reused_tokens"] > before  # turn 1 reused turn 0 of the *new* weights ...
    fresh = TransformersPolicy(model, tokenizer, max_new_tokens=12, prefix_cache_mb=0)
    _assert_same_turns(after_step, _run(fresh, turns=2))  # ... and nothing computed before the step


def test_an_edited_history_reuses_only_the_common_prefix(model, tokenizer):
    reuse = TransformersPolicy(model, tokenizer, max_new_tokens=8)
    fresh = TransformersPolicy(model, tokenizer, max_new_tokens=8, prefix_cache_mb=0)
    messages = _episodes()[1]
    state = AgentState(messages=messages, tools=TOOLS)
    reuse.act([state], greedy=True)
    edited = [messages[0], {"role": "user", "content": messages[1]["content"].replace("longer", "shorter")}]
    edited_state = AgentState(messages=edited, tools=TOOLS)
    prompt = reuse.prompt_ids(edited_state)
    entry, usable = reuse._match(prompt)
    assert entry is not None and usable < len(prompt) - 1  # the prefix stops at the edit
    assert entry.tokens[usable] != prompt[usable]
    got = reuse.act([edited_state], greedy=True)[0]
    assert got.token_ids == fresh.act([edited_state], greedy=True)[0].token_ids


def test_mixed_batch_of_cached_and_new_episodes(model, tokenizer):
    """A batch where some rows continue cached episodes and one starts fresh: two groups, same tokens."""
    reuse = TransformersPolicy(model, tokenizer, max_new_tokens=10)
    fresh = TransformersPolicy(model, tokenizer, max_new_tokens=10, prefix_cache_mb=0)
    episodes = _episodes()
    first = reuse.act([AgentState(messages=m, tools=TOOLS) for m in episodes[:2]], greedy=True)
    states = [
        AgentState(messages=_advance(m, o, 0), tools=TOOLS, turn=1)
        for m, o in zip(episodes[:2], first, strict=True)
    ]
    # a new episode sharing no prefix with the cached ones (a different system prompt and no tools; one
    # sharing the system prompt and tool schemas would reuse those from another episode's entry)
    other = [{"role": "system", "content": "Write a poem."}, episodes[2][1]]
    states.append(AgentState(messages=other, tools=[]))
    assert reuse._match(reuse.prompt_ids(states[-1])) == (None, 0)
    calls = reuse.kv_stats["generate_calls"]
    got = reuse.act(states, greedy=True)
    assert reuse.kv_stats["generate_calls"] == calls + 2
    for x, y in zip(got, fresh.act(states, greedy=True), strict=True):
        assert x.token_ids == y.token_ids


def test_prefix_cache_matching_and_bounds():
    t = torch.tensor
    kv = [(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))]  # 4 tokens: 2 * 2*4*8 floats = 512 bytes
    cache = PrefixKVCache(max_bytes=1024)
    cache.add(t([1, 2, 3, 4]), kv)
    cache.add(t([9, 9, 9, 9]), kv)
    assert cache.match(t([1, 2, 3, 7, 7])) == (0, 3)
    assert cache.match(t([5])) == (None, 0)
    cache.add(t([1, 2, 3, 4, 5, 6]), kv)  # covers the first entry, which goes
    assert [e.tokens.tolist() for e in cache.entries.values()] == [[9, 9, 9, 9], [1, 2, 3, 4, 5, 6]]
    cache.add(t([8, 8, 8, 8]), kv)  # over 1024 bytes: the least recently used entry goes
    assert [e.tokens.tolist() for e in cache.entries.values()] == [[1, 2, 3, 4, 5, 6], [8, 8, 8, 8]]
    assert covers(t([1, 2, 3]), t([1, 2])) and not covers(t([1, 2]), t([1, 2, 3]))
