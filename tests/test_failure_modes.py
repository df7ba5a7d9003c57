"""Failure modes (paper Table 4): the SWE environment assigns the same categories as the embedded one,
an empty patch is not a submission, and the optional LLM judge (paper §4.5) assigns one primary mode
per unresolved episode over an OpenAI-compatible endpoint (a local HTTP server here), cached."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from factories import make_trajectory
from test_swe_grading import _act, _env, repo_instance  # noqa: F401 - the fixture is used by name

from unipost.eval.evaluate import NO_SUBMISSION_MODES, SUBMITTED_UNRESOLVED_MODES, EvalResult
from unipost.eval.judge import FailureJudge, JudgeError


def test_swe_env_assigns_tool_use_error_and_repetitive_loop(repo_instance, tmp_path):  # noqa: F811
    repo, instance = repo_instance
    env, _ = _env(repo, instance, tmp_path)
    for _ in range(3):
        _act(env, "terminal", {"command": "ls"})
    assert env.verify(ended_by="turn_budget").failure_mode == "repetitive_loop"
    (tmp_path / "second").mkdir()
    env2, _ = _env(repo, instance, tmp_path / "second")
    for i in range(3):
        env2.step({"role": "assistant", "content": f"no tool call {i}"})  # a malformed turn each time
    assert env2.verify(ended_by="turn_budget").failure_mode == "tool_use_error"


class _Judge:
    """A fake OpenAI-compatible judge: answers with ``self.answer`` and records what it was asked."""

    def __init__(self) -> None:
        self.answer = '{"failure_mode": "wrong_file", "reason": "edited the wrong module"}'
        self.requests: list[dict] = []

    def handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": judge.answer}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@pytest.fixture()
def judge_server():
    fake = _Judge()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


def test_llm_judge_assigns_one_primary_mode_per_unresolved_episode(judge_server, tmp_path):
    trajs = [
        make_trajectory("ss", seed=0, resolved=False, submitted=True),
        make_trajectory("ss", seed=1, resolved=True, submitted=True),
        make_trajectory("sss", seed=2, resolved=False, submitted=False),
    ]
    trajs[0].outcome.failure_mode = "wrong_solution"
    judge = FailureJudge(judge_server.url, "judge-model", cache_path=tmp_path / "judge.jsonl")
    judge_server.answer = '{"failure_mode": "wrong_file", "reason": "edited the wrong module"}'
    first = judge.classify(trajs[0])
    assert first == "wrong_file"
    assert judge.classify(trajs[1]) is None  # resolved: nothing to judge, no request
    assert len(judge_server.requests) == 1
    request = judge_server.requests[0]
    assert request["model"] == "judge-model" and request["temperature"] == 0.0
    prompt = json.dumps(request["messages"])
    assert all(m in prompt for m in SUBMITTED_UNRESOLVED_MODES)  # the submitted block's categories
    assert not any(m in prompt for m in NO_SUBMISSION_MODES)  # only the episode's own block
    # the right block for an unsubmitted episode; an answer from the wrong block is refused
    judge_server.answer = "Primary failure mode: repetitive_loop"
    assert judge.classify(trajs[2]) == "repetitive_loop"
    judge_server.answer = '{"failure_mode": "wrong_file"}'
    with pytest.raises(JudgeError, match="wrong_file"):
        FailureJudge(judge_server.url, "judge-model").classify(trajs[2])
    # cached per trajectory: a second judge on the same cache asks nothing
    n = len(judge_server.requests)
    again = FailureJudge(judge_server.url, "judge-model", cache_path=tmp_path / "judge.jsonl")
    relabelled = again.relabel(trajs)
    assert len(judge_server.requests) == n
    assert [t.outcome.failure_mode for t in relabelled] == ["wrong_file", None, "repetitive_loop"]
    assert relabelled[0].meta["rule_failure_mode"] == "wrong_solution"
    assert trajs[0].outcome.failure_mode == "wrong_solution"  # the inputs are not modified
    result = EvalResult.from_trajectories(relabelled)
    assert result.submitted_unresolved_modes["wrong_file"] == 1.0
    assert result.no_submission_modes["repetitive_loop"] == 1.0


def test_the_judge_is_opt_in_through_the_eval_config(tmp_path):
    from unipost.train.build import failure_judge
    from unipost.train.config import EvalConfig, TrainConfig

    assert failure_judge(TrainConfig(output_dir=str(tmp_path))) is None  # the rules stay the default
    cfg = TrainConfig(
        output_dir=str(tmp_path), eval=EvalConfig(judge_base_url="http://127.0.0.1:9", judge_model="opus")
    )
    judge = failure_judge(cfg)
    assert isinstance(judge, FailureJudge) and judge.cache_path == cfg.run_dir / "judge.jsonl"
    with pytest.raises(ValueError, match="together"):
        EvalConfig(judge_model="opus")
