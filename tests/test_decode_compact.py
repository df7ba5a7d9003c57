"""TransformersPolicy's own decode loop (decode="compact") against ``model.generate`` (decode="generate").

The compact loop drops rows that emitted the end-of-turn token from the batch; it must give the same
tokens, the same log-probs and the same cached keys/values as ``generate``, bitwise, for greedy and
seeded sampling (with top-p and both log-prob kinds), with and without KV reuse across turns. The model
is the shipped tiny-lab student, whose turns end at different lengths (so rows do leave the batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unipost
from unipost.rollout.policy import AgentState
from unipost.rollout.transformers_policy import TransformersPolicy, _intra_op_threads

STUDENT = Path(unipost.__file__).parent / "assets" / "tiny-lab" / "student"


@pytest.fixture(scope="module")
def lab():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipost.envs.embedded.env import EmbeddedEnv

    model = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(STUDENT)
    starts, tools = [], []
    for i in range(6):
        env = EmbeddedEnv.from_split("train", 900_100 + i)
        try:
            starts.append(list(env.reset()))
            tools = list(env.tools)
        finally:
            env.close()
    return model.eval(), tokenizer, starts, tools


def _episodes(policy: TransformersPolicy, starts, tools, turns: int, greedy: bool) -> list[list]:
    episodes, outputs = [list(s) for s in starts], []
    for turn in range(turns):
        outs = policy.act([AgentState(e, tools, None, turn) for e in episodes], greedy=greedy)
        outputs.append(outs)
        observation = {"role": "user", "content": f"ok {turn}\n" * (turn + 2)}
        episodes = [
            [*e, {"role": "assistant", "content": o.raw}, observation]
            for e, o in zip(episodes, outs, strict=True)
        ]
    return outputs


@pytest.mark.parametrize(
    ("greedy", "kwargs"),
    [
        (True, {}),
        (True, {"prefix_cache_mb": 0}),
        (False, {}),
        (False, {"top_p": 0.8, "temperature": 0.7, "logprobs": "sampling"}),
    ],
)
def test_compact_decode_equals_generate_bitwise(lab, greedy, kwargs):
    model, tokenizer, starts, tools = lab
    runs = {}
    for decode in ("generate", "compact"):
        policy = TransformersPolicy(model, tokenizer, max_new_tokens=40, seed=3, decode=decode, **kwargs)
        runs[decode] = (policy, _episodes(policy, starts, tools, turns=3, greedy=greedy))
    (ref_policy, ref), (policy, got) = runs["generate"], runs["compact"]
    lengths = [len(o.token_ids) for turn in ref for o in turn]
    assert min(lengths) < 40 and max(lengths) == 40  # rows did end at different steps
    for turn_ref, turn_got in zip(ref, got, strict=True):
        for a, b in zip(turn_ref, turn_got, strict=True):
            assert a.token_ids == b.token_ids
            assert a.logprobs == b.logprobs  # exactly
            assert a.message == b.message and a.truncated == b.truncated
    entries_ref = list(ref_policy.prefix_cache.entries.values())
    entries_got = list(policy.prefix_cache.entries.values())
    assert len(entries_ref) == len(entries_got) == (0 if kwargs.get("prefix_cache_mb") == 0 else len(starts))
    for a, b in zip(entries_ref, entries_got, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True):
            assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert policy.kv_stats == ref_policy.kv_stats


def test_small_batches_and_single_rows_equal_generate(lab):
    """Batches below min_decode_rows never shrink (fewer rows take other matmul kernels)."""
    model, tokenizer, starts, tools = lab
    for rows in (starts[:1], starts[:3], starts[:5]):
        outs = {}
        for decode in ("generate", "compact"):
            policy = TransformersPolicy(model, tokenizer, max_new_tokens=40, decode=decode)
            outs[decode] = policy.act([AgentState(s, tools) for s in rows], greedy=True)
        for a, b in zip(outs["generate"], outs["compact"], strict=True):
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_cpu_threads_are_set_while_generating_and_restored(lab):
    model, tokenizer, starts, tools = lab
    before = torch.get_num_threads()
    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        TransformersPolicy(model, tokenizer, max_new_tokens=4, cpu_threads=1).act(
            [AgentState(starts[0], tools)], greedy=True
        )
    finally:
        hook.remove()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    with _intra_op_threads(1), _intra_op_threads(1):  # nested (a teacher in another thread): one restore
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="cpu_threads"):
        TransformersPolicy(model, tokenizer, cpu_threads=0)
    with pytest.raises(ValueError, match="decode"):
        TransformersPolicy(model, tokenizer, decode="fast")  # type: ignore[arg-type]
