"""bnwatch's HTTP service (``bnwatch serve``): ingest from remote monitors, reads, /metrics.

:func:`create_app` builds the FastAPI app around an injected or configured engine.  Imports
without torch (the service runs where only the store and the wire format are installed).
"""

from __future__ import annotations

from bnwatch.service.app import create_app
from bnwatch.service.settings import Settings

__all__ = ["Settings", "create_app"]
