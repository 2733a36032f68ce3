"""spiced for Python: a Spice.ai-compatible runtime with one hot-reloadable TLS configuration."""

__version__ = "0.1.0"
