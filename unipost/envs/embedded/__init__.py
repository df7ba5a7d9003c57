"""The embedded mini software-engineering world: procedurally generated buggy packages, OpenHands-style
tools executed under bubblewrap, hidden-test verification and a scripted expert that acts from any state."""

from unipost.envs.embedded.env import SYSTEM_PROMPT, EmbeddedEnv
from unipost.envs.embedded.episode import play_expert, play_split
from unipost.envs.embedded.expert import ScriptedExpert, tool_call_message
from unipost.envs.embedded.perturb import PERTURBATION_KINDS, random_perturbation
from unipost.envs.embedded.sandbox import (
    WORKSPACE,
    CommandResult,
    Limits,
    Sandbox,
    SandboxUnavailableError,
    bwrap_available,
)
from unipost.envs.embedded.tasks import DIFFICULTIES, MUTATION_FAMILIES, Bug, Difficulty, Task, generate_task
from unipost.envs.embedded.tools import FileEditor, Terminal, ToolError, parse_tool_call, tool_schemas
from unipost.envs.embedded.verifier import classify, run_hidden_tests, workspace_files

__all__ = [
    "DIFFICULTIES",
    "MUTATION_FAMILIES",
    "PERTURBATION_KINDS",
    "SYSTEM_PROMPT",
    "WORKSPACE",
    "Bug",
    "CommandResult",
    "Difficulty",
    "EmbeddedEnv",
    "FileEditor",
    "Limits",
    "Sandbox",
    "SandboxUnavailableError",
    "ScriptedExpert",
    "Task",
    "Terminal",
    "ToolError",
    "bwrap_available",
    "classify",
    "generate_task",
    "parse_tool_call",
    "play_expert",
    "play_split",
    "random_perturbation",
    "run_hidden_tests",
    "tool_call_message",
    "tool_schemas",
    "workspace_files",
]
