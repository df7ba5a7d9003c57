"""What every local chat policy shares: template rendering, token encoding, parsing, scoring pairs.

``TransformersPolicy`` and ``VLLMPolicy`` must see identical prompts and parse identical text, or their
actions (and the log-probs a trainer compares) would differ for reasons other than the engine. Keeping
that logic in one base class makes "same rendering" a fact of the code rather than of two copies.

A subclass provides ``tokenizer``, ``style``, ``end_of_turn`` / ``eot_id`` (the end-of-turn token),
``max_calls``, ``require_call`` and ``sampling`` (a :class:`~unipost.rollout.sampling.SamplingConfig`,
whose fields read as ``policy.temperature`` etc.).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unipost.data import Message
from unipost.rendering.encoding import chat_ids, encode_rendered, render_action_ids
from unipost.rendering.toolcalls import parse_assistant
from unipost.rollout.policy import AgentState, PolicyOutput
from unipost.rollout.sampling import SamplingAttributes

# PolicyOutput.tool_error of a policy that refused an overlong prompt (the engine ends the episode)
CONTEXT_OVERFLOW = "context_overflow"


class ChatPolicyBase(SamplingAttributes):
    """Rendering, encoding, parsing and scoring pairs shared by the local chat policies (see module)."""

    tokenizer: Any
    style: Any
    end_of_turn: str
    eot_id: int
    max_calls: int | None
    require_call: bool
    context_budget: int | None

    def _init_chat(
        self,
        tokenizer: Any,
        *,
        style: Any,
        name: str,
        context_budget: int | None,
        seed: int | None,
        generator: Any,
        max_calls: int | None,
        require_call: bool,
        end_of_turn: str,
    ) -> None:
        """The settings both engines take the same way (one copy, so their checks cannot drift): the
        tokenizer's own chat template (required), tool-call style, budget, seeding, call limits and
        the end-of-turn token generation stops at."""
        import torch

        from unipost.rendering.toolcalls import detect_style

        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str):
            raise ValueError(
                "the tokenizer has no chat template; set tokenizer.chat_template (its native format)"
            )
        self.tokenizer = tokenizer
        self.style = style or detect_style(template)
        self.name = name
        self.context_budget = context_budget
        self.generator = generator if seed is None else torch.Generator().manual_seed(seed)
        self.max_calls = max_calls
        self.require_call = require_call
        self.end_of_turn = end_of_turn
        self.eot_id = self.token_id(end_of_turn)

    def token_id(self, token: str) -> int:
        """The id of a special token (e.g. the end-of-turn marker generation stops at), or a clear error."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"end-of-turn token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        """``text`` with every added token in it parsed: only for text that holds no message content."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, state: AgentState) -> list[int]:
        """The tokens the model is given at state s_t: the chat-templated context + generation prompt.

        Encoded by ``unipost.rendering.encoding`` like the trainer's contexts (the same ids, and message
        content stays text: an observation cannot forge the template's control tokens)."""
        return chat_ids(
            self.tokenizer, state.messages, state.tools, add_generation_prompt=True, style=self.style
        )

    def prompts_within_budget(
        self, states: Sequence[AgentState]
    ) -> tuple[list[PolicyOutput | None], list[tuple[int, list[int]]]]:
        """Encode every state's prompt; one over ``context_budget`` gets a CONTEXT_OVERFLOW output now
        (never generated from), the others come back as ``(index, prompt ids)`` to generate from."""
        outputs: list[PolicyOutput | None] = [None] * len(states)
        batch: list[tuple[int, list[int]]] = []
        for i, state in enumerate(states):
            ids = self.prompt_ids(state)
            if self.context_budget is not None and len(ids) > self.context_budget:
                outputs[i] = PolicyOutput(
                    message={"role": "assistant", "content": ""},
                    tool_error=CONTEXT_OVERFLOW,
                    raw=f"prompt of {len(ids)} tokens exceeds the context budget of {self.context_budget}",
                )
            else:
                batch.append((i, ids))
        return outputs, batch

    def _to_output(self, state: AgentState, token_ids: list[int], logprobs: list[float]) -> PolicyOutput:
        """Generated tokens -> a parsed assistant message (a malformed call becomes ``parse_error``)."""
        body = token_ids[:-1] if token_ids and token_ids[-1] == self.eot_id else token_ids
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        parsed = parse_assistant(
            text,
            self.style,
            tools=state.tools or None,
            max_calls=self.max_calls,
            require_call=self.require_call,
            id_prefix=f"call_t{state.turn}",
        )
        # no end-of-turn token and the whole budget used: generation was cut at max_new_tokens (a backend
        # that drops the stop token from its output still ends below the budget when it stopped there)
        truncated = len(body) == len(token_ids) >= self.max_new_tokens
        return PolicyOutput(
            parsed.message, token_ids, logprobs, parsed.error, text, parsed.kind, truncated=truncated
        )

    def scoring_pairs(
        self,
        states: Sequence[AgentState],
        actions: Sequence[Message],
        action_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, action ids) per state for ``score``: the action as the template renders it after
        the generation prompt, up to and including the end-of-turn token, or the exact sampled tokens."""
        if len(states) != len(actions):
            raise ValueError(f"score got {len(states)} states but {len(actions)} actions")
        if action_token_ids is not None and len(action_token_ids) != len(states):
            raise ValueError(f"score got {len(states)} states but {len(action_token_ids)} action_token_ids")
        pairs = []
        for i, (state, action) in enumerate(zip(states, actions, strict=True)):
            if action_token_ids is not None:
                prompt, action_ids = self.prompt_ids(state), list(action_token_ids[i])
            else:
                context, action_ids = render_action_ids(
                    self.tokenizer,
                    state.messages,
                    action,
                    state.tools,
                    end_of_turn_id=self.eot_id,
                    style=self.style,
                )
                prompt = encode_rendered(self.tokenizer, context)
            if not action_ids:
                raise ValueError(f"action {i} renders to no tokens")
            pairs.append((prompt, action_ids))
        return pairs
