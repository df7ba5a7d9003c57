"""unipost.envs: the Environment protocol and its implementations.

``unipost.envs.embedded`` is the mini software-engineering world that runs anywhere; the heavy
OpenHands / SWE-Gym environment lives elsewhere and is imported only when used.
"""

from unipost.envs.base import Environment, StepResult

__all__ = ["Environment", "StepResult"]
