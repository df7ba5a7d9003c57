"""unipost.objective."""
