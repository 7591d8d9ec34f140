"""Store maintenance: mark-and-sweep garbage collection, usage scans and verification.

Import it as ``kvstore.gc`` (it is not re-exported by ``kvstore``: a top-level
``gc`` would shadow Python's built-in module)::

    from kvstore import gc as kvgc
    report = await kvgc.run_gc("s3://bucket/kv", grace=3600, dry_run=True)

Every tool here talks to the store through the storage boundary only (list,
head, get, delete) plus bulk listing/deletion with aioboto3 on ``s3://``.
"""

from __future__ import annotations

from kvstore.gc.evict_phase import check_eviction
from kvstore.gc.marksweep import DEFAULT_GRACE, MIN_GRACE, check_grace, mark_and_sweep, run_gc
from kvstore.gc.report import REASONS, GCProgress, GCReport, ModelUsage
from kvstore.gc.usage import ModelStats, NamespaceStats, UsageReport, scan_usage
from kvstore.gc.verify import VerifyReport, verify_store

__all__ = [
    "DEFAULT_GRACE",
    "MIN_GRACE",
    "REASONS",
    "GCProgress",
    "GCReport",
    "ModelStats",
    "ModelUsage",
    "NamespaceStats",
    "UsageReport",
    "VerifyReport",
    "check_eviction",
    "check_grace",
    "mark_and_sweep",
    "run_gc",
    "scan_usage",
    "verify_store",
]
