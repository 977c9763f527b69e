"""srtrain: a lean super-resolution trainer fed by srdata's loaders."""
__version__ = "0.1.0"
