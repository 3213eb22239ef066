"""jaxinfer's cache directory: converted default model, XLA compilation cache."""

import os


def jaxinfer_home() -> str:
    """``$JAXINFER_HOME``, default ``~/.cache/jaxinfer``."""
    return os.environ.get("JAXINFER_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer")
