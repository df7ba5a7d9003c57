"""The documented formatting differences between OpenHands' tool messages and the embedded env's.

``OpenHandsEnv`` returns OpenHands' text verbatim (the student sees the paper's observations); the
embedded env imitates that wording. Where they differ, :func:`comparable_pair` maps both onto one form
so a test can assert that the same tool calls on the same task give the same observations. Every rule
below is listed in docs/openhands.md; nothing else is normalised.

1. terminal (OpenHands): the metadata lines ``[Current working directory: DIR]``,
   ``[Python interpreter: PATH]`` and ``[Command finished with exit code N]`` that OpenHands appends
   after the ``[The command completed with exit code N.]`` line both produce are removed.
2. ``cat -n`` listings (embedded): a file that ends with a newline is shown by the embedded env with
   one extra, empty numbered line at the end; OpenHands does not number the empty field after the
   final newline. That trailing empty numbered line is removed from embedded listings.
3. edit snippets (``str_replace`` / ``insert`` results): the embedded env starts the snippet window
   one line earlier than OpenHands (it subtracts the context from a 0-based line index, OpenHands from
   a 1-based line number). Snippets are compared on the line numbers both show, and the windows may
   differ only by that one leading line.
4. errors: both envs flag the same calls as errors (``tool_error``), but the wording differs
   (embedded ``ERROR:\\n<reason>``; OpenHands ``[An error occurred during execution.]\\n<reason>`` for
   tool errors and ``Error validating tool ...`` / ``Tool '...' not found`` from its agent for
   malformed calls). Error observations are compared on the error flag only.
"""

from __future__ import annotations

import re

_OH_METADATA = re.compile(
    r"^\[(Current working directory: .*|Python interpreter: .*|Command finished with exit code -?\d+)\]$"
)
_NUMBERED = re.compile(r"^ *(\d+)\t(.*)$")
_EDITED = "has been edited. Here's the result of running `cat -n` on a snippet"


def normalize_openhands(text: str) -> str:
    """Rule 1: drop OpenHands' terminal metadata lines."""
    lines = text.split("\n")
    while lines and _OH_METADATA.match(lines[-1]):
        lines.pop()
    return "\n".join(lines)


def normalize_embedded(text: str) -> str:
    """Rule 2: drop the empty numbered line the embedded ``cat -n`` adds after a final newline."""
    lines = text.split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        m = _NUMBERED.match(line)
        if m and m.group(2) == "" and out and _NUMBERED.match(out[-1]):
            following = lines[i + 1] if i + 1 < len(lines) else ""
            if not _NUMBERED.match(following):  # the last numbered line of a listing
                continue
        out.append(line)
    return "\n".join(out)


def _split_snippet(text: str) -> tuple[list[str], dict[int, str], list[str]]:
    head: list[str] = []
    numbered: dict[int, str] = {}
    tail: list[str] = []
    for line in text.split("\n"):
        m = _NUMBERED.match(line)
        if m and not tail:
            numbered[int(m.group(1))] = m.group(2)
        elif numbered:
            tail.append(line)
        else:
            head.append(line)
    return head, numbered, tail


def _align_snippets(embedded: str, openhands: str) -> tuple[str, str]:
    """Rule 3: compare edit snippets on their common line numbers (windows differ by <= 1 line)."""
    eh, en, et = _split_snippet(embedded)
    oh, on, ot = _split_snippet(openhands)
    if not en or not on or min(on) - min(en) not in (0, 1) or max(on) != max(en):
        return embedded, openhands  # not the documented difference: leave them unequal
    common = sorted(set(en) & set(on))

    def render(head: list[str], nums: dict[int, str], tail: list[str]) -> str:
        return "\n".join([*head, *(f"{n:6}\t{nums[n]}" for n in common), *tail])

    return render(eh, en, et), render(oh, on, ot)


def comparable_pair(
    embedded: str, openhands: str, *, embedded_error: bool, openhands_error: bool
) -> tuple[str, str]:
    """Both observations after the documented normalisation; equal iff they agree up to formatting."""
    if embedded_error or openhands_error:  # rule 4
        return f"<error={embedded_error}>", f"<error={openhands_error}>"
    e, o = normalize_embedded(embedded), normalize_openhands(openhands)
    if _EDITED in e and _EDITED in o:
        e, o = _align_snippets(e, o)
    return e, o
