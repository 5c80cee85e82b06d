"""The optional compiled loops (setup.py builds them where a C compiler is): found here, or None.

``PURPOSE_PROXY_NO_EXTENSIONS=1`` makes every caller use its Python loop instead (tests
compare the two).
"""

from __future__ import annotations

import importlib
import os


def compiled(module: str, name: str):
    """``module.name`` if the extension was built and extensions are not switched off, else None."""
    if os.environ.get("PURPOSE_PROXY_NO_EXTENSIONS"):
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None
