"""EnvConfig / make_env_factory for embedded, openhands and swe; OpenHands' schemas through chat templates.

None of this needs the OpenHands venv, Docker or a network: the factories are built and their
environments constructed; where an environment would start its runtime, the error names what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import make_trajectory

from unipost.envs.embedded import EmbeddedEnv
from unipost.envs.embedded.expert import tool_call_message
from unipost.envs.openhands import OpenHandsEnv, OpenHandsUnavailableError, comparable_pair
from unipost.envs.openhands.env import advertised_schemas
from unipost.envs.registry import make_env_factory
from unipost.envs.swe import DockerSWEEnv
from unipost.models import build_tokenizer
from unipost.rendering.chat import ChatRenderer
from unipost.train.config import EnvConfig

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMAS = json.loads((FIXTURES / "openhands" / "tool_schemas-openhands-tools-1.58.0.json").read_text())


def test_env_config_names_and_validation():
    assert EnvConfig().name == "embedded"
    with pytest.raises(ValueError, match=r"needs env\.tasks_path"):
        EnvConfig(name="swe")
    with pytest.raises(ValueError):
        EnvConfig(name="docker")  # type: ignore[arg-type]
    cfg = EnvConfig(name="swe", tasks_path=str(FIXTURES / "swe" / "instances.jsonl"), heldout_fraction=0.5)
    assert cfg.image_scheme == "swebench"
    for name in ("name", "tasks_path", "split_file", "heldout_fraction", "image_scheme", "openhands_venv"):
        assert EnvConfig.model_fields[name].description, name  # every new field is documented


def test_factories_build_each_environment_for_the_same_task_keys(tmp_path):
    embedded = make_env_factory(EnvConfig(difficulty="medium"))(("heldout", 3))
    assert isinstance(embedded, EmbeddedEnv) and embedded.task.task_id == "heldout-f3-x2-d1-3"
    cfg = EnvConfig(name="openhands", difficulty="medium", openhands_venv=str(tmp_path / "no-venv"))
    env = make_env_factory(cfg)(("heldout", 3))
    assert isinstance(env, OpenHandsEnv) and env.task == embedded.task  # same task, other runtime
    assert [t["function"]["name"] for t in env.tools] == ["terminal", "file_editor", "think", "finish"]
    with pytest.raises(OpenHandsUnavailableError, match=r"setup-openhands-venv\.sh"):
        env.reset()
    env.close()
    swe_cfg = EnvConfig(
        name="swe", tasks_path=str(FIXTURES / "swe" / "instances.jsonl"), heldout_fraction=0.0
    )
    swe = make_env_factory(swe_cfg)(("train", 2))
    assert isinstance(swe, DockerSWEEnv) and swe.instance.instance_id == "unipost-fixtures__strkit-7"
    with pytest.raises(IndexError, match=r"lower env\.heldout_tasks"):
        make_env_factory(swe_cfg)(("heldout", 0))
    with pytest.raises(TypeError, match=r"\(split, index\)"):
        make_env_factory(swe_cfg)("train-0")


def test_openhands_env_advertises_the_sdk_schemas_for_testbed():
    full = {t["function"]["name"]: t for t in advertised_schemas(full=True)}
    assert set(full) == set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        text = json.dumps(schema).replace(
            "working directory is: /workspace", "working directory is: /testbed"
        )
        assert full[name] == json.loads(text), name
    params = full["terminal"]["function"]["parameters"]["properties"]
    assert {"command", "is_input", "timeout", "reset", "security_risk", "summary"} <= set(params)


@pytest.mark.parametrize("template", [None, "qwen3.jinja", "qwen3-coder.jinja"])
def test_chat_templates_render_the_openhands_action_space(template):
    """The full OpenHands schemas go through the project's and Qwen3's templates, and a call in that
    schema (with OpenHands' security_risk / summary fields) renders as a trainable label."""
    path = str(FIXTURES / "chat_templates" / template) if template else "chatml_tools"
    tok = build_tokenizer(template=path)
    renderer = ChatRenderer(tok, advertised_schemas(full=True))
    call = tool_call_message(
        "Run the tests.",
        "terminal",
        {"command": "cd /testbed && python -m pytest -q", "security_risk": "LOW", "summary": "run tests"},
        "call_0",
    )
    context = make_trajectory("t").prompt
    text = renderer.render_text([*context, call], add_generation_prompt=False)
    for name in SCHEMAS:
        assert f'"{name}"' in text or f"<name>{name}</name>" in text or f"<function={name}>" in text, name
    assert "security_risk" in text and "python -m pytest -q" in text
    assert len(renderer.label_ids(context, call)) > 5


def test_normalisation_rules_are_exact():
    """The documented differences (docs/openhands.md) and nothing else."""
    emb = "out\n[The command completed with exit code 0.]"
    oh = emb + "\n[Current working directory: /testbed]\n[Command finished with exit code 0]"
    assert comparable_pair(emb, oh, embedded_error=False, openhands_error=False) == (emb, emb)
    view = "Here's the result of running `cat -n` on /testbed/a.py:\n     1\tx = 1\n"
    emb_view = "Here's the result of running `cat -n` on /testbed/a.py:\n     1\tx = 1\n     2\t\n"
    left, right = comparable_pair(emb_view, view, embedded_error=False, openhands_error=False)
    assert left == right
    left, right = comparable_pair(emb_view, view + "x", embedded_error=False, openhands_error=False)
    assert left != right  # any other difference stays visible
    assert (
        comparable_pair("ERROR:\nbad", "Tool 'x' not found", embedded_error=True, openhands_error=True)[0]
        == comparable_pair("a", "b", embedded_error=True, openhands_error=True)[1]
    )
