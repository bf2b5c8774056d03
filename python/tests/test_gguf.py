"""GGUF files into experts kept quantized: a tiny qwen3moe GGUF written with the
gguf package (experts Q8_0, Q4_0 and Q4_K in turn) is imported, compiled and
loaded with moe_load_gguf; the values moegen decodes equal gguf's dequantize,
and the layer equals the same model in f32 built from those dequantized
weights."""

import re
import subprocess

import numpy as np
import pytest

import moegen

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

H, E, I, K_TOP, LAYERS = 256, 4, 256, 2, 2  # Q4_K blocks are 256 wide: H = I = 256
EXPERTS = ("gate", "up", "down")


def f16_scales(rng, n, lo, hi):
    return rng.uniform(lo, hi, n).astype(np.float16)


def random_blocks(rng, qtype, rows, K):
    """Random ggml blocks of a [rows, K] matrix: every code drawn, scales f16
    of a size that keeps the layer's values moderate."""
    nb = rows * K // 32 if qtype != Q.Q4_K else rows * K // 256
    if qtype == Q.Q8_0:
        d = f16_scales(rng, nb, 0.5, 1.0) / np.float16(127 * 16)
        qs = rng.integers(0, 256, (nb, 32), dtype=np.uint8)
        blk = np.concatenate([d.view(np.uint8).reshape(nb, 2), qs], axis=1)
    elif qtype == Q.Q4_0:
        d = f16_scales(rng, nb, 0.5, 1.0) / np.float16(8 * 16)
        qs = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
        blk = np.concatenate([d.view(np.uint8).reshape(nb, 2), qs], axis=1)
    else:  # Q4_K: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        d = f16_scales(rng, nb, 0.5, 1.0) / np.float16(63 * 8 * 16)
        dmin = f16_scales(rng, nb, 0.5, 1.0) / np.float16(63 * 8 * 16)
        sc = rng.integers(0, 256, (nb, 12), dtype=np.uint8)
        qs = rng.integers(0, 256, (nb, 128), dtype=np.uint8)
        blk = np.concatenate([d.view(np.uint8).reshape(nb, 2),
                              dmin.view(np.uint8).reshape(nb, 2), sc, qs], axis=1)
    return blk.reshape(rows, -1)


def write_gguf(path, qtype, seed):
    """A qwen3moe GGUF with LAYERS MoE blocks; returns {tensor name: the f32
    values gguf's dequantize gives}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_name("tiny-qwen3moe")
    w.add_block_count(LAYERS)
    w.add_embedding_length(H)
    w.add_feed_forward_length(2 * H)
    w.add_expert_count(E)
    w.add_expert_used_count(K_TOP)
    w.add_expert_feed_forward_length(I)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(64)
    ref = {}
    for L in range(LAYERS):
        router = (rng.standard_normal((E, H)) / 16).astype(np.float32)
        w.add_tensor("blk.%d.ffn_gate_inp.weight" % L, router)
        ref["blk.%d.ffn_gate_inp.weight" % L] = router
        for role in EXPERTS:
            rows, K = (I, H) if role != "down" else (H, I)
            name = "blk.%d.ffn_%s_exps.weight" % (L, role)
            blk = random_blocks(rng, qtype, E * rows, K).reshape(E, rows, -1)
            w.add_tensor(name, blk, raw_dtype=qtype)
            ref[name] = gguf.quants.dequantize(blk, qtype).reshape(E, rows, K)
            assert ref[name].dtype == np.float32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


FORMATS = {Q.Q8_0: "{kind: int8, group: 32}",
           Q.Q4_0: "{kind: int4, group: 32, zero: false}",
           Q.Q4_K: "{kind: int4, group: 32, zero: true}"}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_K], ids=lambda q: q.name)
def test_gguf_experts_kept_quantized(tmp_path, moegen_cmd, qtype):
    path = tmp_path / "tiny.gguf"
    ref = write_gguf(path, qtype, seed=int(qtype))

    # (a) the values moegen decodes, bit for bit (+0 and -0 are one value)
    for name in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        out = tmp_path / "v.f32"
        subprocess.run([moegen_cmd, "gguf", str(path), "--tensor", name, "-o", str(out)],
                       check=True)
        got = np.fromfile(out, dtype=np.float32).reshape(ref[name].shape)
        np.testing.assert_array_equal(got, ref[name])
        assert np.array_equal(got.view(np.uint32) & 0x7FFFFFFF,
                              ref[name].view(np.uint32) & 0x7FFFFFFF)

    # the import: qwen3moe metadata and quant: from the expert types
    spec = tmp_path / "tiny.yaml"
    moegen.import_config(path, spec, moegen=moegen_cmd)
    text = spec.read_text()
    assert "format: gguf" in text
    for role in EXPERTS:
        assert "  %s: %s" % (role, FORMATS[qtype]) in text
        assert "blk.{layer}.ffn_%s_exps.weight" % role in text
    assert "hidden: 256" in text and "normalize: {kind: sum" in text

    so = moegen.compile(spec, tmp_path / "q.so", moegen=moegen_cmd)
    # (b) the same model in f32 from gguf's dequantized weights
    f32_spec = tmp_path / "f32.yaml"
    f32_text = re.sub(r"\nquant:\n(  .*\n)+", "\n", text).replace("format: gguf",
                                                                    "format: safetensors")
    assert "quant:" not in f32_text
    f32_spec.write_text(f32_text)
    so32 = moegen.compile(f32_spec, tmp_path / "f.so", moegen=moegen_cmd)
    st = tmp_path / "deq.safetensors"
    moegen.save_safetensors(st, ref)

    x = np.random.default_rng(7).uniform(-1, 1, (24, H)).astype(np.float32)
    with moegen.load(so, weights=path, threads=2) as mq, \
            moegen.load(so32, weights=st, threads=2) as mf:
        for L in range(LAYERS):
            yq, rq = mq.forward(x, layer=L, routing=True)
            yf, rf = mf.forward(x, layer=L, routing=True)
            np.testing.assert_array_equal(rq.expert_ids, rf.expert_ids)
            scale = float(np.abs(yf).max())
            assert scale > 1e-3
            np.testing.assert_allclose(yq, yf, rtol=0, atol=1e-5 * max(scale, 1.0))


def test_gguf_type_mismatch_is_refused(tmp_path, moegen_cmd):
    """A spec that keeps the experts as int8 refuses a Q4_0 file, naming the
    tensor, its type and the spec's format; nothing is loaded."""
    q8 = tmp_path / "q8.gguf"
    write_gguf(q8, Q.Q8_0, seed=1)
    spec = tmp_path / "q8.yaml"
    moegen.import_config(q8, spec, moegen=moegen_cmd)
    so = moegen.compile(spec, tmp_path / "q8.so", moegen=moegen_cmd)
    q4 = tmp_path / "q4.gguf"
    write_gguf(q4, Q.Q4_0, seed=2)
    with moegen.load(so, threads=1) as m:
        with pytest.raises(moegen.MoeError) as e:
            m.load_weights(q4)
        msg = str(e.value)
        assert "ffn_gate_exps" in msg and "Q4_0" in msg and "int8" in msg
        with pytest.raises(moegen.MoeError):
            m.forward(np.zeros((1, H), np.float32), layer=0)
