"""``ume serve``: UME-R1 embeddings and retrieval as an HTTP service on Ray Serve.

Needs the ``serve`` extra (``ray[serve]``). ``config`` and ``wire`` import without Ray;
``app``, ``deployments`` and ``runner`` need it. See docs/serving.md.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
