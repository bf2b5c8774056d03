#!/usr/bin/env python3
"""Seed inputs for the safetensors, index and gguf fuzz targets, written to
OUT/safetensors, OUT/index and OUT/gguf: small valid checkpoints of every
element type, index files naming the shards that fuzz_index.c creates (plain,
"./", through links, escaping, absolute), and GGUF files with every metadata
type and the decoded block types. Small and generated, so nothing binary is
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


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(kvs, tensors, align=32, version=3):
    """A GGUF file: kvs is [(key, type, packed value)], tensors is
    [(name, ggml type, ne (fastest first), bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vt, raw in kvs:
        out += gguf_str(key) + struct.pack("<I", vt) + raw
    off, data = 0, b""
    for name, ty, ne, raw in tensors:
        out += gguf_str(name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne)
        out += struct.pack("<IQ", ty, off)
        data += raw + b"\0" * (-len(raw) % align)
        off = len(data)
    out += b"\0" * (-len(out) % align)
    return out + data


def gguf_seeds(gd):
    kvs = [("general.architecture", 8, gguf_str("qwen3moe")),
           ("general.alignment", 4, struct.pack("<I", 64)),
           ("a.u8", 0, b"\x07"), ("a.i8", 1, b"\xfe"), ("a.u16", 2, b"\1\2"),
           ("a.i16", 3, b"\xff\xff"), ("a.u32", 4, struct.pack("<I", 9)),
           ("a.i32", 5, struct.pack("<i", -9)), ("a.f32", 6, struct.pack("<f", 0.5)),
           ("a.bool", 7, b"\1"), ("a.u64", 10, struct.pack("<Q", 1 << 40)),
           ("a.i64", 11, struct.pack("<q", -1)), ("a.f64", 12, struct.pack("<d", 2.5)),
           ("a.strs", 9, struct.pack("<IQ", 8, 2) + gguf_str("ab") + gguf_str("c")),
           ("a.nest", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 2) + b"\1\2")]
    q8 = b"\x00\x38" + bytes(range(32))
    q4 = b"\x00\x40" + bytes(range(16))
    qk = b"\x00\x3c\x00\x38" + bytes(range(12)) + bytes(range(128))
    q6 = bytes(range(128)) + bytes(range(64)) + bytes([0xFD] * 16) + b"\x00\x34"
    q5 = b"\x00\x3c" + b"\x01\x00\x02\x00" + bytes(range(16))
    q41 = b"\x00\x38\x00\xc0" + bytes(range(16))
    seeds = {
        # the types kept since Q4_K, then a NaN d (Q6_K), a zero d (Q5_0)
        # and a NaN minimum (Q4_1)
        "blocks2": gguf([], [("q6", 14, [256], q6), ("q5", 6, [32], q5),
                             ("q41", 3, [32], q41)]),
        "badscales": gguf([], [("q6", 14, [256], q6[:208] + b"\x00\x7e"),
                               ("q5", 6, [32], b"\x00\x00" + q5[2:]),
                               ("q41", 3, [32], q41[:2] + b"\x00\x7e" + q41[4:])]),
        "meta": gguf(kvs, [("w.f32", 0, [2], struct.pack("<2f", 1, -2))], align=64),
        "blocks": gguf([("general.architecture", 8, gguf_str("qwen3moe"))],
                       [("q8", 8, [32, 2], q8 * 2), ("q4", 2, [32, 1], q4),
                        ("qk", 12, [256], qk), ("f16", 1, [2, 2], b"\x00\x3c" * 4),
                        ("bf16", 30, [3], b"\x80\x3f" * 3)]),
        "v2": gguf([], [("w", 0, [1, 1, 1, 1], struct.pack("<f", 3))], version=2),
    }
    for name, raw in seeds.items():
        with open(os.path.join(gd, name + ".gguf"), "wb") as f:
            f.write(raw)


def main(out):
    sd, idx = os.path.join(out, "safetensors"), os.path.join(out, "index")
    os.makedirs(sd, exist_ok=True)
    os.makedirs(idx, exist_ok=True)
    gd = os.path.join(out, "gguf")
    os.makedirs(gd, exist_ok=True)
    gguf_seeds(gd)
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
