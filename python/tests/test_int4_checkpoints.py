"""int4 checkpoints as Hugging Face stores them (GPTQ with and without act-order,
AWQ gemm, compressed-tensors pack-quantized): a tiny qwen3_moe checkpoint is packed
here by packers written from each library's documented layout (not moegen's
code), imported with its quantization_config, compiled and loaded. The
experts dequantized at load equal the formula bit for bit (the same layer in
f32 from those values gives the identical output), and the experts kept as
int4 codes give the f32 reference within 1e-5 with the same expert choices.
Corrupt tensors are refused with errors naming the file and the tensor."""

import json
import re

import numpy as np
import pytest

import moegen

st_numpy = pytest.importorskip("safetensors.numpy")

H, E, I, K_TOP, LAYERS = 64, 4, 96, 2, 2
PROJ = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}  # [N, K]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i holds output 8c + AWQ_ORDER[i]


def pack8(a, axis):
    """Eight 4-bit values along `axis` to one int32, value i in bits 4i..4i+3."""
    a = np.moveaxis(a.astype(np.uint32), axis, -1)
    a = a.reshape(a.shape[:-1] + (a.shape[-1] // 8, 8))
    w = np.zeros(a.shape[:-1], np.uint32)
    for i in range(8):
        w |= a[..., i] << np.uint32(4 * i)
    return np.ascontiguousarray(np.moveaxis(w, -1, axis)).view(np.int32)


def awq_pack(a):
    """AutoAWQ gemm: [R, N] -> [R, N/8], outputs interleaved 0 2 4 6 1 3 5 7."""
    R, N = a.shape
    b = a.reshape(R, N // 8, 8)[:, :, AWQ_ORDER].reshape(R, N)
    return pack8(b, 1)


def make(fmt, group, rng):
    """One [N, K] matrix per projection: (tensors beside PREFIX, W in f32).
    q are the codes 0..15, z the zero points the formula subtracts. gptq_act
    (desc_act): input k is in group g_idx[k], its rank in a random order over
    K // g (one order for gate and up, which see the same input, one for
    down), as GPTQ's act-order writes it."""
    out = {}
    orders = {K: rng.permutation(K) for K in (H, I)}
    for proj, (N, K) in PROJ.items():
        g = group or K
        G = K // g
        gi = np.arange(K) // g
        if fmt == "gptq_act":
            gi = np.empty(K, np.int64)
            gi[orders[K]] = np.arange(K) // g
        q = rng.integers(0, 16, (N, K))
        s = (rng.uniform(0.5, 1.0, (N, G)) / 64).astype(np.float16)
        s[rng.random((N, G)) < 0.3] *= -1
        if fmt == "ct_sym":
            z = np.full((N, G), 8)
        elif fmt in ("gptq", "gptq_act"):  # v1 stores z - 1: z is stored + 1 (1..16)
            stored = rng.integers(0, 16, (N, G))
            z = stored + 1
        else:
            z = rng.integers(0, 16, (N, G))
        W = s.astype(np.float64)[:, gi] * (q - z[:, gi])
        W32 = W.astype(np.float32)
        assert np.array_equal(W32.astype(np.float64), W)  # exact in f32
        t = {}
        if fmt in ("gptq", "gptq_v2", "gptq_act"):
            t["qweight"] = pack8(q.T, 0)  # [K/8, N]
            t["qzeros"] = pack8((z if fmt == "gptq_v2" else stored).T, 1)  # [G, N/8]
            t["scales"] = np.ascontiguousarray(s.T)  # [G, N]
            t["g_idx"] = gi.astype(np.int32)
        elif fmt == "awq":
            t["qweight"] = awq_pack(q.T)  # [K, N/8]
            t["qzeros"] = awq_pack(z.T)  # [G, N/8]
            t["scales"] = np.ascontiguousarray(s.T)
        else:  # compressed-tensors: signed value + 8 is the stored nibble
            t["weight_packed"] = pack8(q, 1)  # [N, K/8]
            t["weight_scale"] = s  # [N, G]
            t["weight_shape"] = np.array([N, K], np.int64)
            if fmt == "ct_asym":
                t["weight_zero_point"] = pack8(z, 0)  # [N/8, G], packed along N
        out[proj] = (t, W32)
    return out


def qconfig(fmt, group):
    if fmt in ("gptq", "gptq_v2", "gptq_act"):
        return {"quant_method": "gptq", "bits": 4, "group_size": group or -1,
                "desc_act": fmt == "gptq_act", "sym": False,
                "checkpoint_format": "gptq_v2" if fmt == "gptq_v2" else "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
                "zero_point": True}
    w = {"num_bits": 4, "type": "int", "symmetric": fmt == "ct_sym",
         "strategy": "group" if group else "channel", "group_size": group or None,
         "dynamic": False, "actorder": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w,
                                          "input_activations": None}},
            "ignore": ["lm_head", "re:.*mlp.gate$"]}


def config(qc):
    c = {"model_type": "qwen3_moe", "hidden_size": H, "num_hidden_layers": LAYERS,
         "num_experts": E, "num_experts_per_tok": K_TOP, "moe_intermediate_size": I,
         "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "norm_topk_prob": True, "vocab_size": 100, "torch_dtype": "float32"}
    if qc:
        c["quantization_config"] = qc
    return c


def write_model(tmp_path, fmt, group, seed):
    """The quantized checkpoint and the f32 one holding the formula's values."""
    rng = np.random.default_rng(seed)
    qt, ft = {}, {}
    for L in range(LAYERS):
        r = rng.uniform(-1, 1, (E, H)).astype(np.float32)
        qt["model.layers.%d.mlp.gate.weight" % L] = ft["model.layers.%d.mlp.gate.weight" % L] = r
        for e in range(E):
            for proj, (t, W) in make(fmt, group, rng).items():
                pre = "model.layers.%d.mlp.experts.%d.%s" % (L, e, proj)
                for k, v in t.items():
                    qt[pre + "." + k] = v
                ft[pre + ".weight"] = W
    qp, fp = tmp_path / ("%s.safetensors" % fmt), tmp_path / "f32.safetensors"
    st_numpy.save_file(qt, str(qp))
    st_numpy.save_file(ft, str(fp))
    return qp, fp, qt


def build(tmp_path, moegen_cmd, name, cfg, drop_quant=False):
    cp = tmp_path / (name + ".json")
    cp.write_text(json.dumps(cfg))
    spec = tmp_path / (name + ".yaml")
    moegen.import_config(cp, spec, moegen=moegen_cmd)
    text = spec.read_text()
    if drop_quant:
        text = re.sub(r"\nquant:.*\n(  .*\n)+", "\n", text)
        assert "\nquant:" not in text
        spec.write_text(text)
    return moegen.compile(spec, tmp_path / (name + ".so"), moegen=moegen_cmd), text


CASES = [("gptq", 32), ("gptq_v2", 32), ("gptq", 0), ("gptq_act", 32), ("awq", 32),
         ("ct_sym", 32), ("ct_asym", 32), ("ct_sym", 0)]


@pytest.mark.parametrize("fmt,group", CASES)
def test_int4_checkpoint(tmp_path, moegen_cmd, fmt, group):
    qp, fp, _ = write_model(tmp_path, fmt, group, seed=len(fmt) * 100 + group)
    kept, text = build(tmp_path, moegen_cmd, "kept", config(qconfig(fmt, group)))
    zero = "false" if fmt == "ct_sym" else "true"
    assert "experts: {kind: int4, group: %d, zero: %s}" % (group, zero) in text
    kind = {"ct_sym": "pack_quantized", "ct_asym": "pack_quantized",
            "gptq_act": "gptq"}.get(fmt, fmt)
    assert "kind: %s" % kind in text
    deq, _ = build(tmp_path, moegen_cmd, "deq", config(qconfig(fmt, group)), drop_quant=True)
    f32, _ = build(tmp_path, moegen_cmd, "f32", config(None))
    x = np.random.default_rng(3).uniform(-1, 1, (40, H)).astype(np.float32)
    with moegen.load(kept, weights=qp, threads=2) as mk, \
            moegen.load(deq, weights=qp, threads=2) as md, \
            moegen.load(f32, weights=fp, threads=2) as mf:
        for L in range(LAYERS):
            yf, rf = mf.forward(x, layer=L, routing=True)
            # dequantized at load: the very values of the formula, so the
            # same f32 kernels give the same bits
            yd, rd = md.forward(x, layer=L, routing=True)
            np.testing.assert_array_equal(yd, yf)
            yk, rk = mk.forward(x, layer=L, routing=True)
            np.testing.assert_array_equal(rk.expert_ids, rf.expert_ids)
            scale = float(np.abs(yf).max())
            assert scale > 1e-3
            np.testing.assert_allclose(yk, yf, rtol=0, atol=1e-5 * max(scale, 1.0))


def corrupt_load(tmp_path, moegen_cmd, tensors, fmt="gptq", group=32):
    # one library per format: a path dlopen has seen stays that library
    kept, _ = build(tmp_path, moegen_cmd, "kept_" + fmt, config(qconfig(fmt, group)))
    bad = tmp_path / "bad.safetensors"
    st_numpy.save_file(tensors, str(bad))
    with moegen.load(kept, threads=1) as m:
        with pytest.raises(moegen.MoeError) as e:
            m.load_weights([bad])
        # nothing half-loaded: the model still refuses to run
        with pytest.raises(moegen.MoeError):
            m.forward(np.zeros((1, H), np.float32), layer=0)
    return str(e.value)


def test_int4_bad_tensors(tmp_path, moegen_cmd):
    _, _, qt = write_model(tmp_path, "gptq", 32, seed=5)
    name = "model.layers.1.mlp.experts.2.down_proj"
    cases = {
        "scales": (lambda t: t[:-1], "expected shape"),
        "qzeros": (lambda t: t[:, :-1], "expected shape"),
        "g_idx": (lambda t: np.where(np.arange(t.size) == 0, 1, t).astype(np.int32),
                  "g_idx gives group 0 31 inputs, not the group size 32"),
    }
    for key, (f, want) in cases.items():
        t = dict(qt)
        t[name + "." + key] = f(t[name + "." + key])
        msg = corrupt_load(tmp_path, moegen_cmd, t)
        assert want in msg and name + "." + key in msg and "bad.safetensors" in msg, msg
    for v, word in ((np.nan, "NaN"), (0.0, "zero")):
        t = dict(qt)
        s = t[name + ".scales"].copy()
        s[1, 3] = v
        t[name + ".scales"] = s
        msg = corrupt_load(tmp_path, moegen_cmd, t)
        assert word in msg and name + ".scales" in msg and "output 3, group 1" in msg, msg
    t = dict(qt)
    t[name + ".g_idx"] = np.full(I, 3, np.int32)  # I = 96: groups 0..2
    msg = corrupt_load(tmp_path, moegen_cmd, t)
    assert "g_idx[0] is 3, not a group (0..2)" in msg and name + ".g_idx" in msg, msg
    # act-order: gate and up read one input, so one order
    _, _, qa = write_model(tmp_path, "gptq_act", 32, seed=7)
    t = dict(qa)
    up = "model.layers.1.mlp.experts.2.up_proj.g_idx"
    t[up] = np.roll(t[up], 1)
    msg = corrupt_load(tmp_path, moegen_cmd, t, fmt="gptq_act")
    assert "layer 1, expert 2: the act-order g_idx of gate and up differ" in msg, msg
    t = dict(qt)
    del t[name + ".qzeros"]
    msg = corrupt_load(tmp_path, moegen_cmd, t)
    assert "zero-point tensor '%s.qzeros'" % name in msg, msg
    # compressed-tensors: weight_shape disagreeing with the spec
    _, _, ct = write_model(tmp_path, "ct_asym", 32, seed=6)
    t = dict(ct)
    t[name + ".weight_shape"] = np.array([H, I + 8], np.int64)
    msg = corrupt_load(tmp_path, moegen_cmd, t, fmt="ct_asym")
    assert "weight_shape" in msg and name in msg, msg


def test_int4_truncated_file(tmp_path, moegen_cmd):
    qp, _, _ = write_model(tmp_path, "awq", 32, seed=8)
    kept, _ = build(tmp_path, moegen_cmd, "kept", config(qconfig("awq", 32)))
    data = qp.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with moegen.load(kept, threads=1) as m:
        with pytest.raises(moegen.MoeError) as e:
            m.load_weights([cut])
        assert "cut.safetensors" in str(e.value)


@pytest.mark.parametrize("qc,key", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "bits 8"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "bits 3"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"},
     "checkpoint_format 'marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "exllama"},
     "version 'exllama'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 40}, "group (40)"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "format"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"targets": ["Linear"],
                              "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                          "group_size": 32}}},
      "ignore": ["lm_head"]}, "mlp.gate"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"targets": ["Linear"],
                              "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}},
      "ignore": ["re:.*mlp.gate$"]}, "num_bits 8"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"targets": ["Linear"],
                              "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                          "group_size": 32}}},
      "ignore": ["re:.*mlp.gate$", "re:.*experts.*down_proj"]}, "down_proj"),
])
def test_int4_config_refused(tmp_path, moegen_cmd, qc, key):
    cp = tmp_path / "c.json"
    cp.write_text(json.dumps(config(qc)))
    with pytest.raises(Exception) as e:
        moegen.import_config(cp, tmp_path / "c.yaml", moegen=moegen_cmd)
    assert key in str(e.value), str(e.value)
    assert not (tmp_path / "c.yaml").exists()
