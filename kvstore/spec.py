"""ModelSpec: the identity and KV layout of a model, which keys and records depend on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvstore.errors import InvalidInputError
from kvstore.formats.dtypes import dtype_info

__all__ = ["MAX_DIM", "MAX_LAYERS", "ModelSpec"]

_MAX_NAME_BYTES = 1024
MAX_LAYERS = 1 << 16
"""Most layers a spec may have (records and zarr paths are sized for it)."""
MAX_DIM = (1 << 31) - 1
"""Largest head count or head dimension (a signed 32-bit int, as zarr shapes are read)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What determines the bytes of a model's KV cache.

    ``version`` is the identity of the weights: use a new one for any change of
    weights, tokenizer or attention implementation that changes K/V values.
    """

    name: str
    version: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for field in ("name", "version"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise InvalidInputError(f"ModelSpec.{field} must be a non-empty string, got {value!r}")
            if len(value.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
                raise InvalidInputError(f"ModelSpec.{field} is longer than {_MAX_NAME_BYTES} bytes")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInputError(f"ModelSpec.{field} is not valid unicode: {value!r}") from None
        for field, limit in (("num_layers", MAX_LAYERS), ("num_kv_heads", MAX_DIM), ("head_dim", MAX_DIM)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise InvalidInputError(f"ModelSpec.{field} must be an int in [1, {limit}], got {value!r}")
        dtype_info(self.dtype)

    @classmethod
    def from_pretrained_config(
        cls, config: Any, *, name: str, version: str, dtype: torch.dtype | None = None
    ) -> ModelSpec:
        """The spec of a transformers model from its config (no transformers import needed).

        Reads the layer count, KV heads (``num_key_value_heads`` for GQA, else
        ``num_attention_heads``), ``head_dim`` (else ``hidden_size // num_attention_heads``)
        and the dtype (``dtype`` given, else the config's ``dtype`` / ``torch_dtype``).
        Multimodal configs are read through their text config.
        """
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

        def attr(*names: str) -> Any:
            for n in names:
                value = getattr(text, n, None)
                if value is not None:
                    return value
            return None

        num_layers = attr("num_hidden_layers", "n_layer", "num_layers")
        num_heads = attr("num_attention_heads", "n_head")
        num_kv_heads = attr("num_key_value_heads", "num_kv_heads") or num_heads
        head_dim = attr("head_dim")
        if head_dim is None and num_heads:
            hidden = attr("hidden_size", "n_embd")
            head_dim = hidden // num_heads if isinstance(hidden, int) else None
        if dtype is None:
            # transformers 5.x names it ``dtype`` (reading ``torch_dtype`` there warns); 4.x ``torch_dtype``.
            found = getattr(text, "dtype", None) if hasattr(text, "dtype") else getattr(text, "torch_dtype", None)
            dtype = getattr(torch, found) if isinstance(found, str) else found
        if not isinstance(dtype, torch.dtype):
            raise InvalidInputError("the config names no torch dtype: pass dtype=")
        return cls(
            name=name, version=version, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype
        )

    @property
    def dtype_name(self) -> str:
        """The stable on-store name of ``dtype`` (e.g. ``"bfloat16"``)."""
        return dtype_info(self.dtype).name

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer: the stride of the token axis."""
        return self.num_kv_heads * self.head_dim * dtype_info(self.dtype).itemsize

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token occupies across all layers (K and V)."""
        return 2 * self.num_layers * self.row_bytes

    @property
    def label(self) -> str:
        """``name@version``, the form the CLI and logs use."""
        return f"{self.name}@{self.version}"
