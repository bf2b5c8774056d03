"""A minimal safetensors writer (the format: u64 little-endian header size, a
JSON header of {name: {dtype, shape, data_offsets}}, then the raw bytes), so
checkpoints can be written without the safetensors package."""

import json
import struct

import numpy as np

_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
}


def save_safetensors(path, tensors, bf16=(), metadata=None):
    """Write tensors {name: array} to path. Names listed in bf16 are rounded
    from float32 to bfloat16 (nearest even) and stored as BF16."""
    from . import _bf16_bits

    header = {}
    blobs = []
    off = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if name in bf16:
            raw = _bf16_bits(a.astype(np.float32)).astype("<u2")
            dt = "BF16"
        else:
            if a.dtype not in _DTYPES:
                raise TypeError("%s: dtype %s is not supported" % (name, a.dtype))
            dt = _DTYPES[a.dtype]
            raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        b = raw.tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
