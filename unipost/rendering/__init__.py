"""unipost.rendering."""
