"""Lossy codecs for the arrays that travel (``[compression]``): fp16, bf16, and int8 with per-row scales.

A tensor encoded by a codec is one Flower :class:`~flwr.app.Array` whose ``stype`` names the codec
(``fedlora.fp16``, ``fedlora.bf16``, ``fedlora.int8``) and whose ``data`` is exactly what travels, with
no header. For a tensor of n values in R rows, ``len(data)`` (what ``uplink_bytes`` and
``downlink_bytes`` count) is:

* ``none``: NumPy's ``.npy`` bytes of the float32 values, Flower's own format: 4 n plus a header
  (128 bytes for adapter arrays);
* ``fp16``: IEEE half precision, little-endian: 2 n. Relative error at most 2^-11 in fp16's normal
  range (|x| >= 2^-14), absolute error at most 2^-25 below it; |x| > 65504 becomes infinite (and
  the server rejects such a reply as non-finite);
* ``bf16``: bfloat16 (float32's exponent, 8 significant bits), little-endian: 2 n. Relative error at
  most 2^-8, over float32's whole range;
* ``int8``: R float32 scales, then the n int8 values row by row: n + 4 R. Symmetric per row: the rows
  are the first dimension (a vector or a scalar is one row), a row's scale is max|x| / 127 and each
  value travels as round(x / scale) in [-127, 127], so it decodes to within half its row's scale. A
  row holding a NaN or an infinite value decodes to NaN throughout.

Decoding (:func:`decode_array`, which :func:`fedlora.core.model.arrays.from_arrays` applies to every
array it reads) restores float32 whatever the codec, before anything aggregates or trains on it; an
encoded array read as NumPy fails loudly, since its ``stype`` is not NumPy's.

Clients send updates, not values: :func:`deltas` (the reply minus what was received, key by key) and
its inverse :func:`add_deltas` (on the server); :func:`with_residual` and :func:`residual_of` are the
two steps of error feedback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array

from fedlora.core.transport import CODECS

Tensors = dict[str, torch.Tensor]

STYPE_PREFIX = "fedlora."
"""``Array.stype`` of an encoded array: this prefix and the codec's name."""
INT8_LEVELS = 127
"""int8 values run over [-127, 127] (symmetric: -128 is never used)."""
SCALE_BYTES = 4
"""Bytes of one int8 row scale (float32)."""


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows of an int8-encoded tensor: its first dimension, or 1 for a vector or a scalar."""
    return shape[0] if len(shape) >= 2 else 1


def encoded_bytes(shape: tuple[int, ...], codec: str) -> int:
    """``len(Array.data)`` of a float32 tensor of ``shape`` encoded by ``codec`` (fp16, bf16 or int8)."""
    n = math.prod(shape)
    if codec in ("fp16", "bf16"):
        return 2 * n
    if codec == "int8":
        return n + SCALE_BYTES * rows_of(shape)
    raise ValueError(f"codec {codec!r} has no fixed size; expected fp16, bf16 or int8")


def int8_scales(tensor: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 scales of ``tensor`` (float32, max|x| / 127 per row; 0 for a zero row)."""
    rows = tensor.detach().float().reshape(rows_of(tuple(tensor.shape)), -1)
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0])
    return rows.abs().amax(dim=1) / INT8_LEVELS


def encode_tensor(tensor: torch.Tensor, codec: str) -> Array:
    """``tensor`` as one Flower Array: NumPy's float32 format for ``none``, a codec's bytes otherwise."""
    value = tensor.detach().cpu().contiguous()
    if codec == "none":
        return Array(value.numpy())
    value = value.float()
    shape = tuple(int(d) for d in value.shape)
    if codec == "fp16":
        data, dtype = value.half().numpy().astype("<f2").tobytes(), "float16"
    elif codec == "bf16":
        bits = value.to(torch.bfloat16).view(torch.int16)
        data, dtype = bits.numpy().astype("<i2").tobytes(), "bfloat16"
    elif codec == "int8":
        scales = int8_scales(value)
        rows = value.reshape(rows_of(shape), -1)
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
        levels = torch.round(rows / divisor).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        data, dtype = scales.numpy().astype("<f4").tobytes() + levels.numpy().tobytes(), "int8"
    else:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    return Array(dtype=dtype, shape=shape, stype=STYPE_PREFIX + codec, data=data)


def decode_array(array: Array) -> torch.Tensor:
    """A Flower Array as a writable tensor: NumPy's format as stored (float32 for the adapter), an
    encoded one restored to float32. Raises ValueError on an unknown codec or a wrong length of data."""
    if not array.stype.startswith(STYPE_PREFIX):
        return torch.from_numpy(array.numpy().copy())
    codec = array.stype.removeprefix(STYPE_PREFIX)
    shape = tuple(int(d) for d in array.shape)
    if codec not in CODECS or codec == "none":
        raise ValueError(f"array of unknown codec {codec!r}")
    expected = encoded_bytes(shape, codec)
    if len(array.data) != expected:
        raise ValueError(f"{codec} array of shape {shape} has {len(array.data)} bytes, expected {expected}")
    if codec == "fp16":
        values = torch.from_numpy(np.frombuffer(array.data, dtype="<f2").astype(np.float32))
    elif codec == "bf16":
        bits = torch.from_numpy(np.frombuffer(array.data, dtype="<i2").astype(np.int16))
        values = bits.view(torch.bfloat16).float()
    else:
        rows = rows_of(shape)
        scales = torch.from_numpy(np.frombuffer(array.data, dtype="<f4", count=rows).astype(np.float32))
        levels = np.frombuffer(array.data, dtype=np.int8, offset=SCALE_BYTES * rows).astype(np.float32)
        values = torch.from_numpy(levels).reshape(rows, -1) * scales[:, None]
    return values.reshape(shape)


def _matches(key: str, value: torch.Tensor, other: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``other`` holds ``key`` at the shape of ``value``."""
    return key in other and tuple(other[key].shape) == tuple(value.shape)


def deltas(values: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Tensors:
    """``values`` minus ``base``, key by key, where ``base`` holds the key at the same shape; any other
    array as it is (one the client did not receive, e.g. FLoRA's fresh adapters, or one a faulty
    client reshaped, which the server then rejects)."""
    return {k: v - base[k] if _matches(k, v, base) else v for k, v in values.items()}


def add_deltas(updates: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Tensors:
    """The inverse of :func:`deltas`: ``updates`` plus ``base`` where the key and shape match."""
    return {k: v + base[k] if _matches(k, v, base) else v for k, v in updates.items()}


def with_residual(update: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor]) -> Tensors:
    """Error feedback, first step: ``update`` plus what the codec lost before, where key and shape
    match (a residual of another shape, e.g. after a rank change, is dropped)."""
    return add_deltas(update, residual)


def residual_of(sent: Mapping[str, torch.Tensor], decoded: Tensors, previous: Tensors) -> Tensors:
    """Error feedback, second step: what the codec lost of ``sent`` (``sent`` minus its ``decoded``
    form), over the ``previous`` residual of arrays not sent this time. A residual with a NaN or an
    infinite value is dropped (a diverged or faulty update must not poison the rounds after it)."""
    lost = {k: sent[k] - decoded[k] for k in sent if k in decoded}
    kept = {k: v for k, v in previous.items() if k not in sent}
    return {**kept, **{k: v for k, v in lost.items() if bool(torch.isfinite(v).all())}}
