"""``SamplingConfig``: how a local policy samples one turn, validated once.

``TransformersPolicy`` and ``VLLMPolicy`` used to check the same four arguments in two copies, and the
training config a third time with its own bounds. One frozen value object now carries them: the
policies are built from it (or from its fields, which build it) and ``RolloutConfig.sampling()`` returns
one, so a value the policies would refuse is refused in the same words wherever it is written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

LogprobKind = Literal["raw", "sampling"]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one rollout policy (``act(..., greedy=True)`` ignores all but the budget).

    Attributes:
        max_new_tokens: generation budget per turn (a turn that exhausts it usually fails to parse).
        temperature: > 0; greedy decoding is ``act(..., greedy=True)``, not temperature 0.
        top_p: nucleus sampling mass in (0, 1]; 1 turns it off.
        logprobs: which log-probs a sample records: ``"raw"`` (``log_softmax(logits / T)`` before top-p,
            the ``log pi_old`` of importance ratios) or ``"sampling"`` (of the distribution sampled from).
    """

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    logprobs: LogprobKind = "raw"

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (use act(..., greedy=True) for greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs not in ("raw", "sampling"):
            raise ValueError(f"logprobs must be 'raw' or 'sampling', got {self.logprobs!r}")

    @classmethod
    def resolve(
        cls,
        sampling: SamplingConfig | None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        logprobs: LogprobKind | None = None,
    ) -> SamplingConfig:
        """A policy's sampling from either ``sampling=`` or its separate keyword arguments (None = not
        given; the missing ones take the defaults above). Both at once is ambiguous and refused."""
        given = {
            k: v
            for k, v in dict(
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, logprobs=logprobs
            ).items()
            if v is not None
        }
        if sampling is None:
            return cls(**given)
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if given:
            raise ValueError(f"pass sampling=SamplingConfig(...) or {', '.join(sorted(given))}, not both")
        return sampling


class SamplingAttributes:
    """Mixin: ``policy.temperature`` (and the other three fields) read and write ``policy.sampling``.

    Writing one field builds a new, validated ``SamplingConfig`` (the KL diagnostic samples a copy of
    the student at another temperature this way), so a policy never holds an unchecked value.
    """

    sampling: SamplingConfig

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @max_new_tokens.setter
    def max_new_tokens(self, value: int) -> None:
        self.sampling = replace(self.sampling, max_new_tokens=value)

    @property
    def temperature(self) -> float:
        return self.sampling.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.sampling = replace(self.sampling, temperature=value)

    @property
    def top_p(self) -> float:
        return self.sampling.top_p

    @top_p.setter
    def top_p(self, value: float) -> None:
        self.sampling = replace(self.sampling, top_p=value)

    @property
    def logprobs(self) -> LogprobKind:
        return self.sampling.logprobs

    @logprobs.setter
    def logprobs(self, value: LogprobKind) -> None:
        self.sampling = replace(self.sampling, logprobs=value)
