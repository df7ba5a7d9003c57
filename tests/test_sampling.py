"""One SamplingConfig: the policies and the training config validate sampling in one place."""

from __future__ import annotations

import copy

import pytest

from unipost.rollout.sampling import SamplingConfig
from unipost.rollout.transformers_policy import TransformersPolicy
from unipost.rollout.vllm_policy import VLLMPolicy

BAD = [
    (dict(temperature=0), ValueError, "temperature must be > 0"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(logprobs="both"), ValueError, "logprobs must be 'raw' or 'sampling'"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD)
def test_sampling_config_refuses_what_no_policy_can_sample_with(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingConfig(**kwargs)


def test_sampling_config_is_frozen_and_has_the_policies_defaults():
    s = SamplingConfig()
    assert (s.max_new_tokens, s.temperature, s.top_p, s.logprobs) == (512, 1.0, 1.0, "raw")
    with pytest.raises(AttributeError):
        s.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD[:4])
def test_both_policies_refuse_bad_sampling_in_the_same_words(tiny_model, tokenizer, kwargs, error, message):
    """The check runs before vLLM is needed, so it is the same check on a machine without vLLM."""
    with pytest.raises(error, match=message):
        TransformersPolicy(tiny_model, tokenizer, **kwargs)
    with pytest.raises(error, match=message):
        VLLMPolicy(tiny_model, tokenizer, **kwargs)


def test_a_policy_takes_a_sampling_config_or_its_fields_not_both(tiny_model, tokenizer):
    sampling = SamplingConfig(max_new_tokens=7, temperature=0.5, top_p=0.9, logprobs="sampling")
    policy = TransformersPolicy(tiny_model, tokenizer, sampling=sampling)
    assert policy.sampling is sampling
    assert (policy.max_new_tokens, policy.temperature, policy.top_p, policy.logprobs) == (
        7,
        0.5,
        0.9,
        "sampling",
    )
    same = TransformersPolicy(
        tiny_model, tokenizer, max_new_tokens=7, temperature=0.5, top_p=0.9, logprobs="sampling"
    )
    assert same.sampling == sampling
    with pytest.raises(ValueError, match="not both"):
        TransformersPolicy(tiny_model, tokenizer, sampling=sampling, temperature=0.7)
    with pytest.raises(TypeError, match="SamplingConfig"):
        TransformersPolicy(tiny_model, tokenizer, sampling={"temperature": 0.7})  # type: ignore[arg-type]


def test_setting_a_sampling_field_on_a_policy_is_validated_and_leaves_copies_alone(tiny_model, tokenizer):
    policy = TransformersPolicy(tiny_model, tokenizer, temperature=1.0)
    warmer = copy.copy(policy)  # what the KL diagnostic does to sample at another temperature
    warmer.temperature = 0.7
    assert warmer.sampling.temperature == 0.7 and policy.temperature == 1.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        warmer.temperature = 0


def test_rollout_config_hands_the_policies_one_sampling_config_and_refuses_in_their_words():
    from pydantic import ValidationError

    from unipost.train.config import RolloutConfig

    sampling = RolloutConfig(temperature=0.7, top_p=0.9, max_new_tokens=64).sampling()
    assert sampling == SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9)
    with pytest.raises(ValidationError, match="temperature must be > 0"):
        RolloutConfig(temperature=0)
    with pytest.raises(ValidationError, match=r"top_p must be in \(0, 1\]"):
        RolloutConfig(top_p=1.5)
