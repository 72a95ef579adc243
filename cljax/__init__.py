"""cljax: continual learning and model merging for JAX."""

__version__ = '0.1.0'
