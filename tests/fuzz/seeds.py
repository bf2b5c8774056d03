#!/usr/bin/env python3
"""Seed inputs for the safetensors and index fuzz targets, written to
OUT/safetensors and OUT/index: small valid checkpoints of every element type,
and index files naming the shards that fuzz_index.c creates (plain, "./",
through links, escaping, absolute). Small and generated, so nothing binary is
committed."""
import json
import os
import struct
import sys


def st(tensors, pad=True, meta=True):
    """A safetensors file: tensors is [(name, dtype, shape, bytes)]."""
    header, data = {}, b""
    if meta:
        header["__metadata__"] = {"format": "pt"}
    for name, dtype, shape, raw in tensors:
        if pad:
            data += b"\0" * (-len(data) % 8)
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main(out):
    sd, idx = os.path.join(out, "safetensors"), os.path.join(out, "index")
    os.makedirs(sd, exist_ok=True)
    os.makedirs(idx, exist_ok=True)
    f32 = struct.pack("<6f", 1, -2, 0.5, 3e38, float("nan"), 0)
    seeds = {
        "f32": st([("w", "F32", [2, 3], f32)]),
        "types": st([("a", "F16", [2], b"\x00\x3c\x00\xc0"), ("b", "BF16", [2], b"\x80\x3f\x00\x40"),
                     ("c", "F8_E4M3", [4], b"\x38\x7f\xff\x00"), ("d", "F8_E5M2", [1], b"\x3c"),
                     ("e", "F64", [1], struct.pack("<d", 1.5)), ("g", "I32", [1], b"\1\0\0\0"),
                     ("h", "U8", [3], b"\1\2\3"), ("i", "BOOL", [1], b"\1")]),
        "scalar-empty": st([("s", "F32", [], struct.pack("<f", 2.5)), ("z", "F32", [0, 4], b"")]),
        "unpadded": st([("v", "F32", [3], struct.pack("<3f", 1, 2, 3)),
                        ("h", "F16", [1], b"\x00\xc0")], pad=False, meta=False),
        "stacked": st([("l.0.down", "F32", [2, 2, 3], struct.pack("<12f", *range(12))),
                       ("l.0.router", "BF16", [2, 3], b"\x80\x3f" * 6)]),
    }
    for name, raw in seeds.items():
        with open(os.path.join(sd, name + ".safetensors"), "wb") as f:
            f.write(raw)
    maps = {
        "plain": {"m.a": "a.safetensors", "m.b": "a.safetensors", "m.c": "b.safetensors"},
        "dot": {"m.a": "./a.safetensors", "m.b": "a.safetensors", "m.c": "sub/../b.safetensors"},
        "link": {"m.a": "link.safetensors", "m.b": "a.safetensors"},
        "escape": {"m.a": "../a.safetensors", "m.c": "out.safetensors"},
        "absolute": {"m.a": "/etc/hostname"},
        "missing": {"m.z": "a.safetensors", "m.q": "gone.safetensors"},
    }
    for name, wm in maps.items():
        with open(os.path.join(idx, name + ".json"), "w") as f:
            json.dump({"metadata": {"total_size": 36}, "weight_map": wm}, f)


if __name__ == "__main__":
    main(sys.argv[1])
