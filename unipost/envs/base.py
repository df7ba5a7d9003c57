"""The Environment protocol every environment (embedded, OpenHands, SWE-Gym Docker) implements.

The rollout engine only talks to this protocol, so the same engine drives the embedded mini-SWE world
on a laptop and the paper's OpenHands scaffold on a cluster. It is defined in :mod:`unipost.data`
(beside the Policy protocol, which carries an environment handle); this is its import path in envs.
"""

from unipost.data import Environment, StepResult

__all__ = ["Environment", "StepResult"]
