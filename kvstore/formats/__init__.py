"""The on-store format: everything kvstore persists is defined in this subpackage.

The format is specified in ``docs/FORMAT.md``; the version below is written into
the store's root record, every record and every chunk's header. Bump it for any change a reader
of the previous version could not understand.
"""

from __future__ import annotations

FORMAT_VERSION = 3
"""Version of the on-store format written by this library."""

__all__ = ["FORMAT_VERSION"]
