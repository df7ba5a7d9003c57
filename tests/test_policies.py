"""TransformersPolicy on the tiny Qwen3 and tokenizer, checked against plain transformers calls;
ScriptedPolicy and RandomToolPolicy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unipost.rendering import call_arguments, make_tool_call, render_action, render_prompt
from unipost.rollout.policy import AgentState, Policy, PolicyOutput
from unipost.rollout.scripted import RandomToolPolicy, ScriptedPolicy
from unipost.rollout.transformers_policy import TransformersPolicy

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = FIXTURES / "openhands" / "tool_schemas-openhands-tools-1.58.0.json"
OPENHANDS_TOOLS = list(json.loads(FIXTURE.read_text()).values())
# the policy tests use the two short schemas: the full OpenHands system prompt is ~4k tokens, and the
# tiny model's speed, not prompt length, is what these tests exercise
TOOLS = [t for t in OPENHANDS_TOOLS if t["function"]["name"] in ("finish", "think")]
ATOL = 1e-4  # fp32 log-probs: generate's incremental KV-cache path vs one full forward pass


def _state(user: str, turn: int = 0) -> AgentState:
    messages = [{"role": "system", "content": "Fix the bug."}, {"role": "user", "content": user}]
    return AgentState(messages=messages, tools=TOOLS, turn=turn)


STATES = [_state("short"), _state("a much longer issue text " * 6), _state("medium length issue here")]


@pytest.fixture()
def model(tiny_model):
    return tiny_model.eval()


def _prompt_ids(tokenizer, state):
    return tokenizer(render_prompt(tokenizer, state.messages, state.tools), add_special_tokens=False)[
        "input_ids"
    ]


def _forward_logprobs(model, prompt, action, temperature=1.0):
    """Reference: one unpadded forward pass over prompt + action, log-softmax at the action's tokens."""
    ids = torch.tensor([prompt + action])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(action)[:, None])[:, 0]


def test_is_a_white_box_policy(model, tokenizer):
    policy = TransformersPolicy(model, tokenizer, max_new_tokens=4)
    assert isinstance(policy, Policy) and policy.white_box
    assert policy.style == "hermes"
    assert "TransformersPolicy(name='student'" in repr(policy)


def test_greedy_act_is_deterministic_and_equals_manual_generate(model, tokenizer):
    policy = TransformersPolicy(model, tokenizer, max_new_tokens=10)
    first = policy.act(STATES[:1], greedy=True)[0]
    again = policy.act(STATES[:1], greedy=True)[0]
    assert first.token_ids == again.token_ids and first.message == again.message
    prompt = _prompt_ids(tokenizer, STATES[0])
    manual = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=policy.eot_id, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert first.token_ids == manual
    assert first.raw == tokenizer.decode(manual, skip_special_tokens=False)
    assert first.message["role"] == "assistant"


def test_batched_greedy_equals_batch_of_one(model, tokenizer):
    """Left padding is right: different-length prompts in one batch generate what they do alone."""
    policy = TransformersPolicy(model, tokenizer, max_new_tokens=10)
    batched = policy.act(STATES, greedy=True)
    for state, out in zip(STATES, batched, strict=True):
        alone = policy.act([state], greedy=True)[0]
        assert out.token_ids == alone.token_ids
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(alone.logprobs), atol=ATOL)


def test_sampled_logprobs_equal_a_separate_forward_pass(model, tokenizer):
    """'raw' log-probs == log_softmax(logits / T) of a plain forward pass at the sampled tokens, even when
    the model's generation_config carries Qwen3's own sampling defaults (they must not sneak in)."""
    model.generation_config.temperature, model.generation_config.top_k = 0.6, 20
    policy = TransformersPolicy(model, tokenizer, max_new_tokens=12, temperature=0.7, top_p=0.9, seed=0)
    outs = policy.act(STATES)
    for state, out in zip(STATES, outs, strict=True):
        assert len(out.logprobs) == len(out.token_ids) > 0
        ref = _forward_logprobs(model, _prompt_ids(tokenizer, state), out.token_ids, temperature=0.7)
        assert torch.allclose(torch.tensor(out.logprobs), ref, atol=ATOL), (out.logprobs, ref)


def _top_p_logprobs(logits_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Reference nucleus distribution (HF convention: drop the ascending-sorted tokens whose cumulative
    probability is <= 1 - top_p)."""
    scaled = logits_V / temperature
    sorted_logits, order = torch.sort(scaled, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[-1] = False
    remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
    return torch.log_softmax(scaled.masked_fill(remove, float("-inf")), -1)


def test_sampling_logprobs_are_the_truncated_distribution(model, tokenizer):
    policy = TransformersPolicy(
        model, tokenizer, max_new_tokens=8, temperature=0.8, top_p=0.5, seed=1, logprobs="sampling"
    )
    out = policy.act(STATES[:1])[0]
    prompt = _prompt_ids(tokenizer, STATES[0])
    logits = model(input_ids=torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1].float()
    ref = torch.stack([_top_p_logprobs(logits[j], 0.8, 0.5)[t] for j, t in enumerate(out.token_ids)])
    assert torch.isfinite(ref).all()  # every sampled token survived top-p
    assert torch.allclose(torch.tensor(out.logprobs), ref, atol=ATOL)
    raw = _forward_logprobs(model, prompt, out.token_ids, temperature=0.8)
    assert (ref >= raw - ATOL).all()  # renormalising over the nucleus can only raise a token's log-prob


def test_seeded_sampling_is_reproducible(model, tokenizer):
    def sample(**kw):
        policy = TransformersPolicy(model, tokenizer, max_new_tokens=6, temperature=1.0, **kw)
        return [o.token_ids for o in policy.act(STATES[:2])] + [o.token_ids for o in policy.act(STATES[:2])]

    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    assert sample(seed=5) == sample(seed=5)
    assert sample(generator=torch.Generator().manual_seed(9)) == sample(
        generator=torch.Generator().manual_seed(9)
    )
    assert sample(seed=5) != sample(seed=6)
    assert torch.equal(torch.get_rng_state(), global_state)  # sampling leaves the global RNG alone


def test_generation_stops_at_end_of_turn(model, tokenizer):
    """Make <|im_end|> the greedy choice once the model is on its usual path: the row stops there,
    its tokens end with it, and later rows of the batch keep going."""
    policy = TransformersPolicy(model, tokenizer, max_new_tokens=10)
    free = policy.act(STATES[:1], greedy=True)[0].token_ids
    with torch.no_grad():
        model.lm_head.weight[policy.eot_id] = 3.0 * model.lm_head.weight[free[2]]
    out = policy.act(STATES[:1], greedy=True)[0]
    assert out.token_ids[-1] == policy.eot_id and policy.eot_id not in out.token_ids[:-1]
    assert len(out.token_ids) <= 3 and len(out.logprobs) == len(out.token_ids)
    assert "<|im_end|>" not in out.raw


def test_context_budget_gives_overflow_result_not_exception(model, tokenizer):
    lengths = [len(_prompt_ids(tokenizer, s)) for s in STATES]
    budget = sorted(lengths)[1]  # the longest prompt overflows, the others fit
    policy = TransformersPolicy(model, tokenizer, max_new_tokens=4, context_budget=budget)
    outs = policy.act(STATES, greedy=True)
    for n, out in zip(lengths, outs, strict=True):
        if n > budget:
            assert out.tool_error == "context_overflow" and out.token_ids is None
            assert f"{n} tokens exceeds the context budget of {budget}" in out.raw
        else:
            assert out.tool_error != "context_overflow" and len(out.token_ids) == 4


def test_score_matches_manual_forward(model, tokenizer):
    """score() on canonical tool-call actions (padded batch) == one unpadded forward per pair."""
    actions = [
        {
            "role": "assistant",
            "content": "Look.",
            "tool_calls": [make_tool_call("terminal", {"command": "ls"}, "a")],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [make_tool_call("finish", {"message": "done ✓"}, "b")],
        },
        {"role": "assistant", "content": "plain text answer"},
    ]
    policy = TransformersPolicy(model, tokenizer, max_new_tokens=4, score_batch_size=2)
    scores = policy.score(STATES, actions)
    for state, action, got in zip(STATES, actions, scores, strict=True):
        prompt_text, action_text = render_action(tokenizer, state.messages, action, state.tools)
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        action_ids = tokenizer(action_text, add_special_tokens=False)["input_ids"]
        assert action_ids[-1] == policy.eot_id
        ref = _forward_logprobs(model, prompt, action_ids)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=ATOL)
    with pytest.raises(ValueError, match="3 states but 2 actions"):
        policy.score(STATES, actions[:2])


def test_score_of_sampled_tokens_equals_act_logprobs(model, tokenizer):
    """Scoring the exact sampled tokens at the sampling temperature reproduces act's raw log-probs."""
    policy = TransformersPolicy(model, tokenizer, max_new_tokens=8, temperature=0.9, seed=2)
    outs = policy.act(STATES)
    scores = policy.score(
        STATES, [o.message for o in outs], action_token_ids=[o.token_ids for o in outs], temperature=0.9
    )
    for out, got in zip(outs, scores, strict=True):
        assert torch.allclose(got, torch.tensor(out.logprobs), atol=ATOL)


def test_style_comes_from_the_chat_template(model, tokenizer):
    import copy

    from unipost.models import load_template

    coder = copy.deepcopy(tokenizer)
    coder.chat_template = load_template(str(FIXTURES / "chat_templates" / "qwen3-coder.jinja"))
    policy = TransformersPolicy(model, coder, max_new_tokens=3)
    assert policy.style == "qwen3_coder"
    assert "<function=example_function_name>" in tokenizer.decode(policy.prompt_ids(STATES[0]))
    coder.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        TransformersPolicy(model, coder)


def test_constructor_validates(model, tokenizer):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TransformersPolicy(model, tokenizer, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        TransformersPolicy(model, tokenizer, top_p=1.5)
    with pytest.raises(ValueError, match="end-of-turn token"):
        TransformersPolicy(model, tokenizer, end_of_turn="<|eot_id|>")


# -- scripted policies ------------------------------------------------------------------------------


def test_scripted_policy_wraps_a_function():
    def expert(state: AgentState):
        if state.turn == 0:
            return {
                "role": "assistant",
                "content": "",
                "tool_calls": [make_tool_call("think", {"thought": "x"}, "c")],
            }
        return PolicyOutput({"role": "assistant", "content": "bye"})

    policy = ScriptedPolicy(expert, name="expert")
    assert isinstance(policy, Policy) and not policy.white_box
    outs = policy.act([_state("a", turn=0), _state("b", turn=1)])
    assert outs[0].message["tool_calls"][0]["function"]["name"] == "think"
    assert outs[1].message == {"role": "assistant", "content": "bye"}
    with pytest.raises(TypeError, match="must return a message dict or a PolicyOutput"):
        ScriptedPolicy(lambda s: "oops").act([_state("a")])


def test_random_tool_policy_is_seeded_and_sometimes_malformed():
    states = [_state(f"task {i}", turn=i) for i in range(200)]
    tools = OPENHANDS_TOOLS
    first = RandomToolPolicy(tools, seed=0, malformed_rate=0.3).act(states)
    again = RandomToolPolicy(tools, seed=0, malformed_rate=0.3).act(states)
    assert [o.raw for o in first] == [o.raw for o in again]
    assert [o.raw for o in RandomToolPolicy(tools, seed=1).act(states)] != [o.raw for o in first]
    errors = [o for o in first if o.tool_error]
    assert 30 <= len(errors) <= 90  # ~60 expected at rate 0.3
    fragments = ["invalid JSON", "unclosed", "unknown tool", "missing required", "no tool call", "at most 1"]
    seen = {f for f in fragments for o in errors if f in o.tool_error}
    assert seen == set(fragments), {o.tool_error for o in errors}  # every kind of breakage occurs
    schemas = {t["function"]["name"]: t["function"] for t in tools}
    for out in first:
        if out.tool_error is None:
            (call,) = out.message["tool_calls"]
            schema = schemas[call["function"]["name"]]
            assert set(schema["parameters"]["required"]) <= set(call_arguments(call))
        else:
            assert "tool_calls" not in out.message and out.message["content"] == out.raw
