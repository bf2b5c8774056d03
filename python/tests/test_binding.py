"""The binding end to end: tiny specs compiled with moegen, weights written as
safetensors by the test, outputs and routing compared with a numpy forward
written here from the formulas (docs/semantics.md, Mixtral / Qwen2-MoE)."""

import os
import subprocess
import threading

import numpy as np
import pytest

import moegen

SPEC = """moegen: 1
name: {name}
model: {{hidden: {H}, layers: 3, moe_layers: [0, 2], dense_ffn: {{intermediate: 8, activation: swiglu}}}}
dtype: {{weights: f32, activations: {act}}}
router: {{mode: token_choice, score: softmax, top_k: {k}, normalize: {norm}}}
experts: {{count: {E}, intermediate: {I}, activation: swiglu}}
{shared}weights:
  format: safetensors
  names:
    router: l.{{layer}}.gate.weight
    gate: l.{{layer}}.e.{{expert}}.w1.weight
    up: l.{{layer}}.e.{{expert}}.w3.weight
    down: l.{{layer}}.e.{{expert}}.w2.weight
{shared_names}"""

SHARED = "shared_experts: {count: 1, intermediate: %d, gate: sigmoid}\n"
SHARED_NAMES = """    shared_gate: l.{layer}.s.gate_proj.weight
    shared_up: l.{layer}.s.up_proj.weight
    shared_down: l.{layer}.s.down_proj.weight
    shared_expert_gate: l.{layer}.sg.weight
"""


def build(tmp_path, moegen_cmd, name="pyt-tiny", H=16, E=4, I=8, k=2, norm="sum", act="f32",
          shared=0):
    spec = tmp_path / (name + ".yaml")
    spec.write_text(SPEC.format(name=name, H=H, E=E, I=I, k=k, norm=norm, act=act,
                                shared=SHARED % shared if shared else "",
                                shared_names=SHARED_NAMES if shared else ""))
    return moegen.compile(spec, tmp_path / (name + ".so"), moegen=moegen_cmd)


def random_weights(rng, layers, H, E, I, shared=0):
    t = {}
    for L in layers:
        t["l.%d.gate.weight" % L] = rng.standard_normal((E, H)).astype(np.float32)
        for e in range(E):
            t["l.%d.e.%d.w1.weight" % (L, e)] = (rng.standard_normal((I, H)) / 4).astype(
                np.float32)
            t["l.%d.e.%d.w3.weight" % (L, e)] = (rng.standard_normal((I, H)) / 4).astype(
                np.float32)
            t["l.%d.e.%d.w2.weight" % (L, e)] = (rng.standard_normal((H, I)) / 3).astype(
                np.float32)
        if shared:
            t["l.%d.s.gate_proj.weight" % L] = (rng.standard_normal((shared, H)) / 4).astype(
                np.float32)
            t["l.%d.s.up_proj.weight" % L] = (rng.standard_normal((shared, H)) / 4).astype(
                np.float32)
            t["l.%d.s.down_proj.weight" % L] = (rng.standard_normal((H, shared)) / 3).astype(
                np.float32)
            t["l.%d.sg.weight" % L] = rng.standard_normal((1, H)).astype(np.float32)
    return t


def silu(v):
    return v / (1.0 + np.exp(-v))


def glu(x, g, u, d):
    return (silu(x @ g.T) * (x @ u.T)) @ d.T


def np_forward(t, L, x, E, k, norm, shared=0):
    """Mixtral (norm sum) / Qwen2-MoE (norm none, sigmoid-gated shared) in float64."""
    x = x.astype(np.float64)
    g = lambda n: t[n % L].astype(np.float64)  # noqa: E731
    logits = x @ g("l.%d.gate.weight").T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, axis=1)
    if norm == "sum":
        w = w / w.sum(axis=1, keepdims=True)
    y = np.zeros_like(x)
    for tok in range(x.shape[0]):
        for j in range(k):
            e = idx[tok, j]
            pre = "l.%d.e.%d." % (L, e)
            y[tok] += w[tok, j] * glu(x[tok], t[pre + "w1.weight"], t[pre + "w3.weight"],
                                      t[pre + "w2.weight"])
    if shared:
        s = glu(x, g("l.%d.s.gate_proj.weight"), g("l.%d.s.up_proj.weight"),
                g("l.%d.s.down_proj.weight"))
        gate = 1.0 / (1.0 + np.exp(-(x @ g("l.%d.sg.weight").T)))
        y += gate * s
    return y, idx, w


def rel_err(a, ref):
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, moegen_cmd):
    d = tmp_path_factory.mktemp("tiny")
    so = build(d, moegen_cmd)
    rng = np.random.default_rng(7)
    t = random_weights(rng, [0, 2], 16, 4, 8)
    st = d / "w.safetensors"
    moegen.save_safetensors(st, t)
    return so, st, t


def test_info(tiny):
    so, _, _ = tiny
    m = moegen.load(so)
    i = m.info
    assert (i.name, i.hidden, i.n_experts, i.top_k, i.route_width) == ("pyt-tiny", 16, 4, 2, 2)
    assert i.n_layers == 3 and i.moe_layers == [0, 2] and i.n_moe_layers == 2
    assert i.mode == "token_choice" and i.score == "softmax"
    assert i.weight_dtype == "f32" and i.act_dtype == "f32"
    assert "cpu" in i.targets
    assert len(i.spec_hash) == 32 and int(i.spec_hash, 16) >= 0
    assert i.weight_names["router"] == "l.{layer}.gate.weight"
    assert i.weight_names["down"] == "l.{layer}.e.{expert}.w2.weight"
    assert i.intermediate == 8 and i.n_shared_experts == 0 and i.shared_width == 0


def test_description_is_the_model_dump(tiny, moegen_cmd):
    # moe_describe's text is what `moegen -d model` prints for the same spec
    so, _, _ = tiny
    m = moegen.load(so)
    spec = os.path.join(os.path.dirname(so), "pyt-tiny.yaml")
    dump = subprocess.run([moegen_cmd, "-d", "model", spec], check=True,
                          stdout=subprocess.PIPE, text=True).stdout
    assert m.info.description == dump
    assert m.info.description.startswith("name pyt-tiny\n")


@pytest.mark.parametrize("layer", [0, 2])
def test_forward_matches_numpy(tiny, layer):
    so, st, t = tiny
    m = moegen.load(so, weights=[st])
    x = np.random.default_rng(layer).standard_normal((13, 16)).astype(np.float32)
    y, r = m.forward(x, layer=layer, routing=True)
    ref, idx, w = np_forward(t, layer, x, 4, 2, "sum")
    assert y.dtype == np.float32 and y.shape == (13, 16)
    assert rel_err(y, ref) <= 1e-5
    assert r.expert_ids.shape == (13, 2) and r.expert_ids.dtype == np.int32
    assert np.array_equal(np.sort(r.expert_ids, axis=1), np.sort(idx, axis=1))
    # the weight of each chosen expert, whatever the slot order
    for tok in range(13):
        for j in range(2):
            s = list(r.expert_ids[tok]).index(idx[tok, j])
            assert abs(r.weights[tok, s] - w[tok, j]) <= 1e-6
    assert r.counts.tolist() == [int((idx == e).sum()) for e in range(4)]
    assert r.n_dropped == 0


def test_default_layer_and_leading_axes(tiny):
    so, st, _ = tiny
    m = moegen.load(so, weights=str(st))
    x = np.random.default_rng(3).standard_normal((2, 3, 16)).astype(np.float32)
    y = m(x)  # first MoE layer (0)
    assert y.shape == (2, 3, 16)
    flat = m.forward(x.reshape(6, 16), layer=0)
    assert np.array_equal(y.reshape(6, 16), flat)
    y2, r = m.forward(x, routing=True)
    assert r.expert_ids.shape == (2, 3, 2) and r.weights.shape == (2, 3, 2)
    # float64 input is converted, not refused
    y64 = m.forward(x.astype(np.float64))
    assert np.array_equal(y64, y)


def test_zero_tokens(tiny):
    so, st, _ = tiny
    m = moegen.load(so, weights=[st])
    y, r = m.forward(np.zeros((0, 16), np.float32), routing=True)
    assert y.shape == (0, 16) and r.counts.tolist() == [0, 0, 0, 0]


def test_random_weights_deterministic(tiny):
    so, _, _ = tiny
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
    a = moegen.load(so, seed=11).forward(x)
    b = moegen.load(so, seed=11).forward(x)
    c = moegen.load(so, seed=12).forward(x)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_errors(tiny, tmp_path):
    so, st, _ = tiny
    m = moegen.load(so)
    x = np.ones((2, 16), np.float32)
    with pytest.raises(moegen.MoeError) as e:
        m.forward(x)
    assert e.value.status == "ERR_WEIGHTS" and "no weights loaded" in str(e.value)
    m.load_weights(st)
    with pytest.raises(moegen.MoeError) as e:
        m.forward(x, layer=1)  # a dense layer
    assert e.value.status == "ERR_ARG" and "not an MoE layer" in str(e.value)
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(moegen.MoeError) as e:
        m.forward(bad)
    assert e.value.status == "ERR_INPUT" and "token 1, column 3" in str(e.value)
    with pytest.raises(ValueError):
        m.forward(np.ones((2, 15), np.float32))
    with pytest.raises(TypeError):
        m.forward(np.ones((2, 16), np.uint16))  # bf16 bits into an f32 model
    with pytest.raises(moegen.MoeError) as e:
        m.load_weights(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(e.value)
    # a checkpoint lacking one expert tensor names it
    t = dict(tiny[2])
    del t["l.2.e.3.w3.weight"]
    part = tmp_path / "part.safetensors"
    moegen.save_safetensors(part, t)
    with pytest.raises(moegen.MoeError) as e:
        m.load_weights(part)
    assert e.value.status == "ERR_WEIGHTS" and "l.2.e.3.w3.weight" in str(e.value)
    with pytest.raises(FileNotFoundError):
        moegen.load(tmp_path / "nope.so")
    m.close()
    with pytest.raises(ValueError):
        m.forward(x)


def test_compile_error_is_reported(tmp_path, moegen_cmd):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.format(name="bad", H=16, E=2, I=8, k=4, norm="sum", act="f32",
                                shared="", shared_names=""))
    with pytest.raises(RuntimeError) as e:
        moegen.compile(spec, tmp_path / "bad.so", moegen=moegen_cmd)
    assert "top_k" in str(e.value)
    assert not (tmp_path / "bad.so").exists()


def test_two_models_side_by_side(tmp_path, moegen_cmd):
    # Two libraries exporting the same symbols, loaded at once, each keeps its
    # own model; forward calls on them run in parallel threads.
    so_a = build(tmp_path, moegen_cmd, name="pyt-a", H=16, E=4, I=8, k=2, norm="sum")
    so_b = build(tmp_path, moegen_cmd, name="pyt-b", H=24, E=6, I=12, k=3, norm="none",
                 shared=10)
    rng = np.random.default_rng(1)
    ta = random_weights(rng, [0, 2], 16, 4, 8)
    tb = random_weights(rng, [0, 2], 24, 6, 12, shared=10)
    moegen.save_safetensors(tmp_path / "a.safetensors", ta)
    moegen.save_safetensors(tmp_path / "b.safetensors", tb)
    a = moegen.load(so_a, weights=tmp_path / "a.safetensors")
    b = moegen.load(so_b, weights=tmp_path / "b.safetensors", threads=1)
    assert (a.info.name, b.info.name) == ("pyt-a", "pyt-b")
    assert (a.info.n_shared_experts, b.info.n_shared_experts) == (0, 1)
    assert (b.info.shared_intermediate, b.info.shared_width) == (10, 10)
    assert a.info.spec_hash != b.info.spec_hash
    xa = rng.standard_normal((40, 16)).astype(np.float32)
    xb = rng.standard_normal((40, 24)).astype(np.float32)
    out = {}

    def run(key, m, x):
        out[key] = [m.forward(x, layer=2) for _ in range(5)]

    ths = [threading.Thread(target=run, args=("a", a, xa)),
           threading.Thread(target=run, args=("b", b, xb))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    ref_a, _, _ = np_forward(ta, 2, xa, 4, 2, "sum")
    ref_b, _, _ = np_forward(tb, 2, xb, 6, 3, "none", shared=10)
    for y in out["a"]:
        assert rel_err(y, ref_a) <= 1e-5
    for y in out["b"]:
        assert rel_err(y, ref_b) <= 1e-5


def bf16_round(a):
    return moegen._bf16_to_f32(moegen._bf16_bits(a))


def test_bf16_conversion_helpers():
    # round to nearest even on the 16 dropped bits; expectations by hand
    v = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, np.inf, -np.inf,
                  np.finfo(np.float32).max], np.float32)
    exp = [1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -2.5, np.inf, -np.inf, np.inf]
    assert bf16_round(v).astype(np.float64).tolist() == exp
    assert np.isnan(bf16_round(np.array([np.nan], np.float32)))[0]


def test_bf16_activations(tmp_path, moegen_cmd):
    so = build(tmp_path, moegen_cmd, name="pyt-bf16", act="bf16")
    rng = np.random.default_rng(9)
    t = random_weights(rng, [0, 2], 16, 4, 8)
    moegen.save_safetensors(tmp_path / "w.safetensors", t)
    m = moegen.load(so, weights=tmp_path / "w.safetensors")
    assert m.info.act_dtype == "bf16"
    x = bf16_round(rng.standard_normal((6, 16)).astype(np.float32))
    y = m.forward(x)
    assert y.dtype == np.float32
    assert np.array_equal(y, bf16_round(y))  # the model's output is bf16
    bits = m.forward(moegen._bf16_bits(x))
    assert bits.dtype == np.uint16 and np.array_equal(moegen._bf16_to_f32(bits), y)
    ref, _, _ = np_forward(t, 0, x, 4, 2, "sum")
    assert rel_err(y, ref) <= 2**-7  # one bf16 rounding of the output (and inside)


def test_torch_tensors(tiny):
    torch = pytest.importorskip("torch")
    so, st, t = tiny
    m = moegen.load(so, weights=[st])
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    y, r = m.forward(x, routing=True)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (5, 16)
    assert isinstance(r.expert_ids, torch.Tensor) and r.expert_ids.dtype == torch.int32
    assert torch.equal(y, torch.from_numpy(m.forward(x.numpy())))
    ref, _, _ = np_forward(t, 0, x.numpy(), 4, 2, "sum")
    assert rel_err(y.numpy(), ref) <= 1e-5
    # a tensor that needs grad is detached, not refused
    y2 = m.forward(x.clone().requires_grad_(True))
    assert torch.equal(y2, y)


def test_torch_half_dtypes_into_f32_model(tiny):
    """A Hugging Face model's bf16/f16 hidden states go in as they are: widened
    exactly to f32, y in the input's dtype."""
    torch = pytest.importorskip("torch")
    so, st, t = tiny
    m = moegen.load(so, weights=[st])
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    for dt in (torch.bfloat16, torch.float16):
        xd = x.to(dt)
        y = m.forward(xd)
        assert isinstance(y, torch.Tensor) and y.dtype == dt and y.shape == (5, 16)
        want = m.forward(xd.to(torch.float32).numpy())
        assert torch.equal(y, torch.from_numpy(want).to(dt))


def test_torch_other_device_refused(tiny):
    torch = pytest.importorskip("torch")
    so, st, _ = tiny
    m = moegen.load(so, weights=[st])
    x = torch.empty(5, 16, device="meta")
    with pytest.raises(ValueError, match="runs on the CPU and x is on meta"):
        m.forward(x)
