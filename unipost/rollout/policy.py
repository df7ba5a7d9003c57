"""The Policy protocol: batched ``act`` for everyone, ``score`` for white-box models.

The protocol and its state/output types are defined in :mod:`unipost.data` (the bottom layer), so an
environment's scripted expert can implement it without importing the rollout layer; this module is
their historical import path.
"""

from unipost.data import AgentState, Policy, PolicyOutput

__all__ = ["AgentState", "Policy", "PolicyOutput"]
