"""GGUF files into experts kept quantized: a tiny qwen3moe GGUF written with the
gguf package (experts Q8_0, Q6_K, Q5_0, Q4_0, Q4_1 and Q4_K in turn, and gate/up
and down in different types) is imported, compiled and loaded with
moe_load_gguf; the values moegen decodes equal gguf's dequantize, and the layer
equals the same model in f32 built from those dequantized weights. Then the
other MoE architectures llama.cpp writes (qwen2moe, olmoe, deepseek2 in both
gatings, llama with experts) the same way."""

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


BLOCK = {Q.Q8_0: 32, Q.Q6_K: 256, Q.Q5_0: 32, Q.Q4_0: 32, Q.Q4_1: 32, Q.Q4_K: 256}


def f16_bytes(x, nb):
    return x.view(np.uint8).reshape(nb, 2)


def random_blocks(rng, qtype, rows, K):
    """Random ggml blocks of a [rows, K] matrix: every code drawn, scales f16
    of a size that keeps the layer's values moderate."""
    nb = rows * K // BLOCK[qtype]
    if qtype == Q.Q8_0:
        d = f16_scales(rng, nb, 0.5, 1.0) / np.float16(127 * 16)
        qs = rng.integers(0, 256, (nb, 32), dtype=np.uint8)
        blk = np.concatenate([f16_bytes(d, nb), qs], axis=1)
    elif qtype == Q.Q5_0:  # d, u32 of fifth bits, 16 bytes of nibbles
        d = f16_scales(rng, nb, 0.5, 1.0) / np.float16(16 * 16)
        qh = rng.integers(0, 256, (nb, 4), dtype=np.uint8)
        qs = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
        blk = np.concatenate([f16_bytes(d, nb), qh, qs], axis=1)
    elif qtype == Q.Q4_0:
        d = f16_scales(rng, nb, 0.5, 1.0) / np.float16(8 * 16)
        qs = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
        blk = np.concatenate([f16_bytes(d, nb), qs], axis=1)
    elif qtype == Q.Q4_1:  # d, m, 16 bytes of nibbles
        d = f16_scales(rng, nb, 0.5, 1.0) / np.float16(16 * 16)
        m = -f16_scales(rng, nb, 0.5, 1.0) / np.float16(2 * 16)
        qs = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
        blk = np.concatenate([f16_bytes(d, nb), f16_bytes(m, nb), qs], axis=1)
    elif qtype == Q.Q6_K:  # ql[128], qh[64], int8 scales[16], d
        d = f16_scales(rng, nb, 0.5, 1.0) / np.float16(32 * 127 * 16)
        ql = rng.integers(0, 256, (nb, 128), dtype=np.uint8)
        qh = rng.integers(0, 256, (nb, 64), dtype=np.uint8)
        sc = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
        blk = np.concatenate([ql, qh, sc, f16_bytes(d, nb)], axis=1)
    else:  # Q4_K: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        d = f16_scales(rng, nb, 0.5, 1.0) / np.float16(63 * 8 * 16)
        dmin = f16_scales(rng, nb, 0.5, 1.0) / np.float16(63 * 8 * 16)
        sc = rng.integers(0, 256, (nb, 12), dtype=np.uint8)
        qs = rng.integers(0, 256, (nb, 128), dtype=np.uint8)
        blk = np.concatenate([f16_bytes(d, nb), f16_bytes(dmin, nb), sc, qs], axis=1)
    return blk.reshape(rows, -1)


def write_gguf(path, qtype, seed, down_qtype=None):
    """A qwen3moe GGUF with LAYERS MoE blocks (down in down_qtype when
    given); returns {tensor name: the f32 values gguf's dequantize gives}."""
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
            qt = qtype
            if role == "down" and down_qtype is not None:
                qt = down_qtype[L] if isinstance(down_qtype, tuple) else down_qtype
            add_quant(w, ref, rng, "blk.%d.ffn_%s_exps.weight" % (L, role), qt, E, rows, K)
    finish(w)
    return ref


def add_quant(w, ref, rng, name, qtype, n, rows, K):
    """A stacked [n, rows, K] tensor (n 0: a plain [rows, K]) of random blocks
    of qtype; its dequantized values into ref."""
    m = max(n, 1)
    blk = random_blocks(rng, qtype, m * rows, K).reshape(m, rows, -1)
    if not n:
        blk = blk[0]
    w.add_tensor(name, blk, raw_dtype=qtype)
    ref[name] = gguf.quants.dequantize(blk, qtype).reshape(blk.shape[:-1] + (K,))
    assert ref[name].dtype == np.float32


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


FORMATS = {Q.Q8_0: "{kind: int8, group: 32}",
           Q.Q6_K: "{kind: int8, group: 16}",
           Q.Q5_0: "{kind: int8, group: 32}",
           Q.Q4_0: "{kind: int4, group: 32, zero: false}",
           Q.Q4_1: "{kind: int4, group: 32, zero: true}",
           Q.Q4_K: "{kind: int4, group: 32, zero: true}"}


def f32_twin(tmp_path, moegen_cmd, text, ref):
    """The same spec in f32 over a safetensors file of gguf's dequantized
    weights: (compiled .so, weights path)."""
    f32_spec = tmp_path / "f32.yaml"
    f32_text = re.sub(r"\nquant:\n(  .*\n)+", "\n", text).replace("format: gguf",
                                                                    "format: safetensors")
    assert "quant:" not in f32_text
    f32_spec.write_text(f32_text)
    so32 = moegen.compile(f32_spec, tmp_path / "f.so", moegen=moegen_cmd)
    st = tmp_path / "deq.safetensors"
    moegen.save_safetensors(st, ref)
    return so32, st


def compare_layers(so, path, so32, st, layers, atol=1e-5):
    x = np.random.default_rng(7).uniform(-1, 1, (24, H)).astype(np.float32)
    with moegen.load(so, weights=path, threads=2) as mq, \
            moegen.load(so32, weights=st, threads=2) as mf:
        for L in layers:
            yq, rq = mq.forward(x, layer=L, routing=True)
            yf, rf = mf.forward(x, layer=L, routing=True)
            np.testing.assert_array_equal(rq.expert_ids, rf.expert_ids)
            scale = float(np.abs(yf).max())
            assert scale > 1e-3
            np.testing.assert_allclose(yq, yf, rtol=0, atol=atol * max(scale, 1.0))


@pytest.mark.parametrize("qtype,down", [(Q.Q8_0, None), (Q.Q6_K, None), (Q.Q5_0, None),
                                        (Q.Q4_0, None), (Q.Q4_1, None), (Q.Q4_K, None),
                                        (Q.Q4_K, Q.Q6_K)],
                         ids=lambda q: q.name if q is not None else "same")
def test_gguf_experts_kept_quantized(tmp_path, moegen_cmd, qtype, down):
    path = tmp_path / "tiny.gguf"
    ref = write_gguf(path, qtype, seed=int(qtype), down_qtype=down)

    # (a) the values moegen decodes, bit for bit (+0 and -0 are one value)
    for name in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        out = tmp_path / "v.f32"
        subprocess.run([moegen_cmd, "gguf", str(path), "--tensor", name, "-o", str(out)],
                       check=True)
        got = np.fromfile(out, dtype=np.float32).reshape(ref[name].shape)
        np.testing.assert_array_equal(got, ref[name])
        assert np.array_equal(got.view(np.uint32) & 0x7FFFFFFF,
                              ref[name].view(np.uint32) & 0x7FFFFFFF)

    # the import: qwen3moe metadata and quant: from the expert types (a
    # Q4_K_M-style file: gate/up Q4_K, down Q6_K, each role its own format)
    spec = tmp_path / "tiny.yaml"
    moegen.import_config(path, spec, moegen=moegen_cmd)
    text = spec.read_text()
    assert "format: gguf" in text
    for role in EXPERTS:
        qt = down if role == "down" and down is not None else qtype
        assert "  %s: %s" % (role, FORMATS[qt]) in text
        assert "blk.{layer}.ffn_%s_exps.weight" % role in text
    assert "hidden: 256" in text and "normalize: {kind: sum" in text

    so = moegen.compile(spec, tmp_path / "q.so", moegen=moegen_cmd)
    # (b) the same model in f32 from gguf's dequantized weights
    so32, st = f32_twin(tmp_path, moegen_cmd, text, ref)
    compare_layers(so, path, so32, st, range(LAYERS))


def test_gguf_type_per_layer_dequantized(tmp_path, moegen_cmd):
    """A Q4_K_M-style file whose down experts are Q4_K in layer 0 and Q6_K in
    layer 1 has no one kept format for down: the import says so (a warning
    and a comment), keeps gate/up quantized and leaves down unquantized; the
    loader dequantizes it exactly, so the layer equals the f32 model."""
    path = tmp_path / "mixed.gguf"
    ref = write_gguf(path, Q.Q4_K, seed=5, down_qtype=(Q.Q4_K, Q.Q6_K))
    spec = tmp_path / "mixed.yaml"
    r = subprocess.run([moegen_cmd, "import", str(path), "-o", str(spec)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "blk.1.ffn_down_exps.weight' is Q6_K" in r.stderr and "warning" in r.stderr
    text = spec.read_text()
    assert "  up: {kind: int4, group: 32, zero: true}" in text
    assert "  down: {kind" not in text
    assert "dequantized to dtype.weights at load" in " ".join(text.replace("#", " ").split())
    so = moegen.compile(spec, tmp_path / "q.so", moegen=moegen_cmd)
    so32, st = f32_twin(tmp_path, moegen_cmd, text, ref)
    compare_layers(so, path, so32, st, range(LAYERS))


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


# The MoE architectures llama.cpp writes ------------------------------------

ARCHS = {
    # arch: (metadata beyond the common keys, shared experts, select bias, layers, first MoE)
    "qwen2moe": ({"expert_feed_forward_length": I, "expert_shared_feed_forward_length": I},
                 "gated", False, 2, 0),
    "olmoe": ({}, None, False, 2, 0),
    "llama": ({}, None, False, 2, 0),
    "deepseek2-v2": ({"expert_feed_forward_length": I, "leading_dense_block_count": 1,
                      "expert_shared_count": 1, "expert_weights_scale": 1.5,
                      "expert_weights_norm": True, "expert_gating_func": 1,
                      "expert_group_count": 2, "expert_group_used_count": 1},
                     "plain", False, 3, 1),
    "deepseek2-v3": ({"expert_feed_forward_length": I, "leading_dense_block_count": 1,
                      "expert_shared_count": 1, "expert_weights_scale": 2.5,
                      "expert_weights_norm": True, "expert_gating_func": 2,
                      "expert_group_count": 2, "expert_group_used_count": 1},
                     "plain", True, 3, 1),
}


def write_arch(path, key, seed):
    """A GGUF of architecture key with experts Q4_K (gate, up) and Q6_K
    (down), shared experts Q8_0; returns the dequantized values by name."""
    meta, shared, bias, layers, first = ARCHS[key]
    arch = key.split("-")[0]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-" + key)
    w.add_block_count(layers)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I if arch in ("olmoe", "llama") else 2 * H)
    w.add_expert_count(E)
    w.add_expert_used_count(K_TOP)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    for k, v in meta.items():
        if isinstance(v, bool):
            w.add_bool("%s.%s" % (arch, k), v)
        elif isinstance(v, float):
            w.add_float32("%s.%s" % (arch, k), v)
        else:
            w.add_uint32("%s.%s" % (arch, k), v)
    ref = {}
    for L in range(first, layers):
        router = (rng.standard_normal((E, H)) / 16).astype(np.float32)
        w.add_tensor("blk.%d.ffn_gate_inp.weight" % L, router)
        ref["blk.%d.ffn_gate_inp.weight" % L] = router
        for role in EXPERTS:
            rows, K = (I, H) if role != "down" else (H, I)
            add_quant(w, ref, rng, "blk.%d.ffn_%s_exps.weight" % (L, role),
                      Q.Q6_K if role == "down" else Q.Q4_K, E, rows, K)
            if shared:
                add_quant(w, ref, rng, "blk.%d.ffn_%s_shexp.weight" % (L, role), Q.Q8_0, 0,
                          rows, K)
        if shared == "gated":
            g = (rng.standard_normal(H) / 16).astype(np.float32)
            w.add_tensor("blk.%d.ffn_gate_inp_shexp.weight" % L, g)  # 1-D, as llama.cpp
            ref["blk.%d.ffn_gate_inp_shexp.weight" % L] = g.reshape(1, H)
        if bias:
            b = rng.uniform(-0.05, 0.05, E).astype(np.float32)
            w.add_tensor("blk.%d.exp_probs_b.bias" % L, b)
            ref["blk.%d.exp_probs_b.bias" % L] = b
    finish(w)
    return ref, range(first, layers)


# what the spec must say for each: llama.cpp's graph, not transformers' defaults
ARCH_SPEC = {
    "qwen2moe": ["sigmoid", "blk.{layer}.ffn_gate_inp_shexp.weight",
                 "shared_up: {kind: int8, group: 32}"],
    "olmoe": ["moe_layers: [0, 1]"],
    "llama": ["normalize: {kind: sum"],
    "deepseek2-v2": ["moe_layers: [1, 2]", "normalize: {kind: sum", "sum_top2",
                     "scale: 1.5", "score: softmax"],
    "deepseek2-v3": ["moe_layers: [1, 2]", "normalize: {kind: sum", "sum_top2",
                     "scale: 2.5", "score: sigmoid", "blk.{layer}.exp_probs_b.bias"],
}
ARCH_NOT = {"qwen2moe": ["normalize: {"], "olmoe": ["normalize: {"]}


@pytest.mark.parametrize("key", sorted(ARCHS))
def test_gguf_architectures(tmp_path, moegen_cmd, key):
    path = tmp_path / ("%s.gguf" % key)
    ref, moe_layers = write_arch(path, key, seed=len(key))
    spec = tmp_path / "a.yaml"
    moegen.import_config(path, spec, moegen=moegen_cmd)
    text = spec.read_text()
    assert "format: gguf" in text
    assert "  up: {kind: int4, group: 32, zero: true}" in text
    assert "  down: {kind: int8, group: 16}" in text
    for want in ARCH_SPEC[key]:
        assert want in text, (want, text)
    for absent in ARCH_NOT.get(key, []):
        assert absent not in text, (absent, text)
    so = moegen.compile(spec, tmp_path / "q.so", moegen=moegen_cmd)
    so32, st = f32_twin(tmp_path, moegen_cmd, text, ref)
    compare_layers(so, path, so32, st, moe_layers)
