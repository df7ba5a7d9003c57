"""unipost.rollout."""
