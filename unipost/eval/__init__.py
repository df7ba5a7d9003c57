"""unipost.eval."""
