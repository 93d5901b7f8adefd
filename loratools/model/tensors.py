"""Tensors known by shape and dtype, read only when asked for; safetensors dtype names and their torch dtypes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..errors import ShapeError

if TYPE_CHECKING:
    import torch

#: bytes per element of each safetensors dtype name
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


class TensorRef:
    """A tensor known by shape and dtype, whose data is read only when asked for."""

    def __init__(
        self,
        shape: Iterable[int],
        dtype: str,
        loader: Callable[[], torch.Tensor],
        item: Callable[[], float] | None = None,
    ) -> None:
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._loader = loader
        self._item = item

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorRef:
        """Wrap an in-memory tensor."""
        t = tensor.detach()
        return cls(t.shape, dtype_name(t.dtype), lambda: t)

    def load(self) -> torch.Tensor:
        return self._loader()

    def item(self) -> float:
        """The value of a one-element tensor (an alpha), read without torch where the source allows."""
        if self.numel != 1:
            raise ShapeError(f"expected a single number, found a tensor of shape {list(self.shape)}")
        if self._item is not None:
            return self._item()
        return float(self.load().float().reshape(()).item())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES.get(self.dtype, 4)

    def __repr__(self) -> str:
        return f"TensorRef({list(self.shape)}, {self.dtype})"


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors dtype name."""
    import torch

    names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
        torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }  # fmt: skip
    try:
        return names[dtype]
    except KeyError:
        raise ShapeError(f"unsupported tensor dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """safetensors dtype name -> torch dtype."""
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    }  # fmt: skip
    return table[name]
