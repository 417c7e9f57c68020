"""productd: the live state of a product catalogue, sharded over processes."""

__version__ = "0.1.0"
