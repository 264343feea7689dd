"""llamarouter: one port, many llama-server children."""

__version__ = "0.1.0"
