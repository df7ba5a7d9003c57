"""unipost.envs."""
