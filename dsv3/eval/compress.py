"""Bits per byte of general-purpose compressors, the baseline printed beside a model's bits per byte
(`dsv3 eval`, bench/bpb.py). Pure standard library; each figure is 8 x compressed size / input size."""

from __future__ import annotations

import gzip
import lzma


def gzip_size(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def xz_size(data: bytes) -> int:
    return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def compressor_bits_per_byte(data: bytes, primer: bytes | None = None) -> dict[str, float]:
    """{"gzip -9": bpb, "xz -9e": bpb} of `data` compressed as one stream; with `primer`, also
    "xz -9e primed": the extra bits xz spends on `data` after having seen `primer` (e.g. the training
    bytes, as the model has; gzip's 32 KiB window would only see its end, xz -9e has a 64 MiB dictionary)."""
    if not data:
        raise ValueError("no bytes to compress")
    n = len(data)
    out = {"gzip -9": 8 * gzip_size(data) / n, "xz -9e": 8 * xz_size(data) / n}
    if primer is not None:
        out["xz -9e primed"] = 8 * (xz_size(primer + b"\n" + data) - xz_size(primer)) / n
    return out
