"""The connector's settings, read from vLLM's ``kv_connector_extra_config`` (no vLLM import here).

Keys: ``url`` (required); the options of ``kvstore.open`` under their own names
(``storage_options``, ``namespace``, ``chunk_tokens``, ``codec``, ...); and the
connector's own: ``model_name`` / ``model_version`` (override the identity derived
from the model), ``min_cached_tokens``, ``load_timeout_s``, ``save_budget_bytes``
and ``save`` / ``load`` (turn either direction off). Unknown keys are an error, so
a typo never silently disables the cache.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import InvalidInputError
from kvstore.opening import OpenOptions

__all__ = ["ConnectorConfig"]

_OPEN_KEYS = frozenset(OpenOptions.__annotations__) - {"retry"}  # a RetryPolicy does not come from JSON
_OWN_TYPES: dict[str, type | tuple[type, ...]] = {
    "model_name": str,
    "model_version": str,
    "min_cached_tokens": int,
    "load_timeout_s": (int, float),
    "save_budget_bytes": int,
    "save": bool,
    "load": bool,
}
_OWN_KEYS = frozenset({"url", *_OWN_TYPES})


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """Where the store is and how the connector uses it."""

    url: str
    open_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``kvstore.open`` (``storage_options``, ``namespace``, ...)."""
    model_name: str | None = None
    """The ``ModelSpec.name``; default: the served model name, else the model path's last component."""
    model_version: str | None = None
    """The ``ModelSpec.version``; default: derived from the weights (see ``identity.weights_version``)."""
    min_cached_tokens: int = 64
    """Hits shorter than this are not loaded: recomputing them is as fast (kvstore.hf.MIN_CACHED_TOKENS)."""
    load_timeout_s: float = 10.0
    """Longest a forward waits for the store before it recomputes what has not arrived."""
    save_budget_bytes: int = 1 << 30
    """Bytes of KV copied out of vLLM's cache and not yet uploaded; saves beyond it are dropped (counted)."""
    save: bool = True
    load: bool = True

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        """Parse and check ``kv_connector_extra_config``; raise InvalidInputError naming the bad key."""
        extra = dict(extra or {})
        unknown = set(extra) - _OPEN_KEYS - _OWN_KEYS
        if unknown:
            known = ", ".join(sorted(_OPEN_KEYS | _OWN_KEYS))
            raise InvalidInputError(f"unknown kv_connector_extra_config keys {sorted(unknown)}; known: {known}")
        url = extra.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidInputError('kv_connector_extra_config needs "url": the store, e.g. "s3://bucket/kv"')
        own: dict[str, Any] = {k: extra[k] for k in _OWN_KEYS - {"url"} if k in extra}
        for key, value in own.items():
            kind = _OWN_TYPES[key]
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not ok or (kind is not bool and kind is not str and value < 0):
                raise InvalidInputError(f"kv_connector_extra_config[{key!r}] is invalid: {value!r}")
        for key, value in extra.items():
            if key in _OPEN_KEYS:
                _check_open_option(key, value)
        return cls(url=url, open_options={k: v for k, v in extra.items() if k in _OPEN_KEYS}, **own)


def _check_open_option(key: str, value: Any) -> None:
    """A light type check of a ``kvstore.open`` option (open itself validates the values)."""
    hint = typing.get_type_hints(OpenOptions)[key]
    options = typing.get_args(hint) or (hint,)
    allowed = tuple(t for a in options if isinstance(t := typing.get_origin(a) or a, type))
    if float in allowed:  # JSON writes 30.0 as 30
        allowed += (int,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed and int in allowed):
        raise InvalidInputError(f"kv_connector_extra_config[{key!r}] is invalid: {value!r}")
