"""The KV dtypes kvstore persists, and how each is laid out on the store.

numpy (and therefore zarr's core data types) has no bfloat16 or float8, so such
tensors are stored as raw little-endian bits in an unsigned integer array of the
same width; the real dtype is recorded by name in the records and zarr attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.errors import FormatVersionError, InvalidInputError

__all__ = ["DTypeInfo", "dtype_info", "dtype_info_by_name", "supported_dtype_names"]


@dataclass(frozen=True, slots=True)
class DTypeInfo:
    """One supported KV dtype: its torch type, stable name and zarr storage type."""

    name: str
    torch_dtype: torch.dtype
    zarr_data_type: str
    itemsize: int


_DTYPES: tuple[DTypeInfo, ...] = (
    DTypeInfo("float32", torch.float32, "float32", 4),
    DTypeInfo("float16", torch.float16, "float16", 2),
    DTypeInfo("bfloat16", torch.bfloat16, "uint16", 2),
    DTypeInfo("float8_e4m3fn", torch.float8_e4m3fn, "uint8", 1),
    DTypeInfo("float8_e5m2", torch.float8_e5m2, "uint8", 1),
)
_BY_TORCH = {d.torch_dtype: d for d in _DTYPES}
_BY_NAME = {d.name: d for d in _DTYPES}


def supported_dtype_names() -> tuple[str, ...]:
    """Names of the dtypes kvstore can store, in a stable order."""
    return tuple(d.name for d in _DTYPES)


def dtype_info(dtype: torch.dtype) -> DTypeInfo:
    """Look up a torch dtype; raise InvalidInputError for unsupported ones."""
    try:
        return _BY_TORCH[dtype]
    except (KeyError, TypeError):
        raise InvalidInputError(
            f"unsupported KV dtype {dtype!r}; supported: {', '.join(supported_dtype_names())}"
        ) from None


def dtype_info_by_name(name: str) -> DTypeInfo:
    """Look up a dtype by its on-store name; unknown names mean a newer format."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise FormatVersionError(f"unknown stored dtype name {name!r}") from None
