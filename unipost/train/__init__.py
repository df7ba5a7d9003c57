"""unipost.train."""
