"""Tool errors by kind (issue 11, item 2): each kind is recorded where it is detected and reported by eval.

Through real components: the embedded environment and the rollout engine, driven by a scripted policy
that writes one kind of bad action per turn (parsed exactly as a student's text is), and a tiny
random-init TransformersPolicy whose 2-token budget cuts every turn short.
"""

from __future__ import annotations

import json

import pytest

from unipost.data import TOOL_ERROR_KINDS, PolicyOutput, Trajectory, Turn
from unipost.envs.embedded import EmbeddedEnv
from unipost.eval import EvalResult, evaluate_policy
from unipost.rendering.toolcalls import parse_assistant
from unipost.rollout.policy import AgentState

TASK = ("heldout", 0, "easy")  # files: stockpile/{service,ops,__init__}.py


def _call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


# one action per turn, the kind the turn must be recorded with (None: no tool error), and whether the
# policy's parser (which sees the tool schemas only when the prompt advertises them) or the env detects it
SCRIPT: list[tuple[str, str | None]] = [
    ('<tool_call>\n{"name": "terminal", "arguments": {"command": "ls"\n</tool_call>', "unparseable"),
    ("<tool_call>\n" + '{"name": "terminal", "arguments": {"command": "ls"}}', "unparseable"),  # unclosed
    ("I think the bug is in service.py, let me look.", "unparseable"),  # no call at all
    (_call("grep_files", pattern="vote"), "unknown_tool"),
    (_call("file_editor", command="view"), "invalid_arguments"),  # required `path` missing
    (_call("terminal", command="ls", verbose=True), "invalid_arguments"),  # not in the schema
    (_call("file_editor", command="str_replace", path="/testbed/stockpile/ops.py"), "invalid_arguments"),
    (_call("file_editor", command="view", path="stockpile/ops.py"), "invalid_arguments"),  # relative
    (_call("file_editor", command="view", path="/testbed/stockpile/nope.py"), "tool_failure"),
    (
        _call(
            "file_editor",
            command="str_replace",
            path="/testbed/stockpile/ops.py",
            old_str="this text is not in the file",
            new_str="x",
        ),
        "tool_failure",
    ),
    (_call("terminal", command="exit 3"), None),  # a non-zero exit is an answer, not a tool error
    (_call("file_editor", command="view", path="/testbed/stockpile/ops.py"), None),
    (_call("finish", message="done"), None),
]


class ScriptedTextPolicy:
    """Writes SCRIPT's texts in order (turn t -> SCRIPT[t]) and parses them like a local student."""

    name = "scripted-text"
    white_box = False

    def act(self, states: list[AgentState], *, greedy: bool = False) -> list[PolicyOutput]:
        outs = []
        for state in states:
            text = SCRIPT[state.turn][0]
            parsed = parse_assistant(text, "hermes", tools=state.tools or None, max_calls=1)
            outs.append(
                PolicyOutput(parsed.message, tool_error=parsed.error, raw=text, tool_error_kind=parsed.kind)
            )
        return outs


def _run(prompt_tools: bool) -> EvalResult:
    return evaluate_policy(
        lambda task: EmbeddedEnv.from_split(*task, prompt_tools=prompt_tools),
        ScriptedTextPolicy(),
        [TASK],
        max_turns=len(SCRIPT) + 2,
        concurrency=1,
    )


@pytest.mark.parametrize("prompt_tools", [True, False], ids=["parser-sees-schemas", "env-validates-calls"])
def test_each_bad_action_is_recorded_with_its_kind(prompt_tools):
    """With the schemas in the prompt the policy's parser catches unknown tools and missing arguments;
    without them (tiny students) the environment does. Either way the turn gets the same kind."""
    result = _run(prompt_tools)
    (traj,) = result.trajectories
    assert len(traj.turns) == len(SCRIPT)
    got = [turn.tool_error_kind for turn in traj.turns]
    assert got == [kind for _, kind in SCRIPT]
    assert [turn.tool_error for turn in traj.turns] == [kind is not None for _, kind in SCRIPT]
    assert traj.outcome.submitted
    # who detected the unknown tool: the parser (the engine's note; the env never saw a call) or the env
    unknown = traj.turns[3].observation[0]["content"]
    parser_note = "did not contain a valid tool call: unknown tool 'grep_files'"
    assert (parser_note in unknown) == prompt_tools
    assert ("Tool 'grep_files' does not exist" in unknown) == (not prompt_tools)


def test_eval_reports_fractions_of_turns_by_kind():
    result = _run(prompt_tools=False)
    n = len(SCRIPT)
    expected = {kind: sum(k == kind for _, k in SCRIPT) / n for kind in TOOL_ERROR_KINDS}
    assert result.tool_errors == pytest.approx(expected)
    assert sum(result.tool_errors.values()) == pytest.approx(result.tool_error_rate)
    metrics = result.to_dict()
    for kind in TOOL_ERROR_KINDS:
        assert metrics[f"eval/tool_errors/{kind}"] == pytest.approx(expected[kind])
    line = result.summary("scripted")
    # the top kinds by share, most frequent first: invalid_arguments 4/13, unparseable 3/13, tool_failure 2/13
    assert "(invalid_arguments 30.8%, unparseable 23.1%, tool_failure 15.4%)" in line
    assert [k for k, _ in result.top_tool_errors(k=4)] == [
        "invalid_arguments",
        "unparseable",
        "tool_failure",
        "unknown_tool",
    ]


def test_truncated_generation_is_its_own_kind(tokenizer, tiny_model):
    """A random-init student with max_new_tokens=2 never reaches the end-of-turn token: every tool error
    it makes is "truncated", not "unparseable"; a turn that stops at the end-of-turn token is not."""
    from unipost.rollout import TransformersPolicy

    student = TransformersPolicy(tiny_model, tokenizer, max_new_tokens=2)
    result = evaluate_policy(
        lambda task: EmbeddedEnv.from_split(*task, prompt_tools=False), student, [TASK], max_turns=2
    )
    (traj,) = result.trajectories
    assert traj.turns
    for turn in traj.turns:
        assert turn.action_token_ids is not None and len(turn.action_token_ids) == 2
        assert student.eot_id not in turn.action_token_ids  # cut at the budget, so every turn is truncated
        assert turn.tool_error and turn.tool_error_kind == "truncated"
    assert result.tool_errors["truncated"] == pytest.approx(1.0)
    assert "(truncated 100.0%)" in result.summary()

    # the flag itself: the budget used up without the end-of-turn token, and only then
    state = AgentState([{"role": "user", "content": "hi"}], [], None, 0)
    word = tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    assert student._to_output(state, [word, word], [0.0, 0.0]).truncated
    assert not student._to_output(state, [word, student.eot_id], [0.0, 0.0]).truncated
    assert not student._to_output(state, [word], [0.0]).truncated  # a backend that drops the stop token


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ('<tool_call>\n{"name": "terminal", "arguments": {"command": "ls"}\n</tool_call>', "unparseable"),
        ("</tool_call>", "unparseable"),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', "unparseable"),
        (_call("terminal", command="ls") + _call("terminal", command="pwd"), "unparseable"),
        (_call("nope"), "unknown_tool"),
        (_call("terminal"), "invalid_arguments"),
        ('<tool_call>\n{"name": "terminal", "arguments": [1, 2]}\n</tool_call>', "invalid_arguments"),
        (_call("terminal", command="ls"), None),
    ],
)
def test_parser_names_the_kind_it_detects(text, kind):
    tools = EmbeddedEnv.from_split(*TASK).tools
    parsed = parse_assistant(text, "hermes", tools=tools, max_calls=1)
    assert parsed.kind == kind
    assert (parsed.error is None) == (kind is None)


def test_trajectories_stored_before_kinds_still_load_and_count_as_other():
    old = {
        "index": 0,
        "executor": "student",
        "action": {"role": "assistant", "content": "x"},
        "tool_error": True,
    }
    turn = Turn.model_validate(old)
    assert turn.tool_error_kind is None
    traj = Trajectory(task_id="t", prompt=[], turns=[turn, Turn(index=1, executor="student", action={})])
    result = EvalResult.from_trajectories([traj])
    assert result.tool_errors["other"] == pytest.approx(0.5)
    assert result.tool_error_rate == pytest.approx(0.5)
