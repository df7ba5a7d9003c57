"""unipost.kernels."""
