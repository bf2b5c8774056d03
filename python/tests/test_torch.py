"""moegen.torch: the torch.library ops on tiny compiled specs. Outputs are
compared with the numpy forward of test_binding.py (written from the
formulas) and with Model.forward; the staged ops composed in torch must give
the whole layer's bits; opcheck checks the schemas and fake implementations;
a recording wrapper around the C calls checks that f32 (and bf16 into a bf16
model) tensors reach the library by their own data pointer."""

import ctypes

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moegen  # noqa: E402
import moegen.torch as mt  # noqa: E402
from test_binding import build, np_forward, random_weights, rel_err  # noqa: E402

H, E, I, K = 16, 4, 8, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, moegen_cmd):
    d = tmp_path_factory.mktemp("torch")
    so = build(d, moegen_cmd, name="pyt-torch")
    t = random_weights(np.random.default_rng(11), [0, 2], H, E, I)
    st = d / "w.safetensors"
    moegen.save_safetensors(st, t)
    m = moegen.load(so, weights=[st])
    h = mt.register(m)
    yield m, h, t, so, st
    mt.unregister(h)
    m.close()


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory, moegen_cmd):
    d = tmp_path_factory.mktemp("torch16")
    so = build(d, moegen_cmd, name="pyt-torch16", act="bf16")
    m = moegen.load(so, seed=5)
    h = mt.register(m)
    yield m, h
    mt.unregister(h)
    m.close()


def x_of(T, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((T, H), generator=g).to(dtype)


def test_moe_op_matches_the_formulas(tiny):
    m, h, t = tiny[:3]
    for L in (0, 2):
        x = x_of(24, seed=L)
        y = torch.ops.moegen.moe(x, h, L)
        assert y.dtype == torch.float32 and y.shape == x.shape
        ref, _, _ = np_forward(t, L, x.numpy(), E, K, "sum")
        assert rel_err(y.numpy(), ref) <= 1e-5
        assert torch.equal(y, m.forward(x, layer=L))


def test_moe_op_keeps_leading_axes_and_dtype(tiny):
    m, h, _ = tiny[:3]
    x = x_of(12, seed=3).reshape(3, 4, H)
    y = torch.ops.moegen.moe(x, h, 0)
    assert y.shape == (3, 4, H)
    assert torch.equal(y.reshape(12, H), torch.ops.moegen.moe(x.reshape(12, H), h, 0))
    xb = x.to(torch.bfloat16)
    yb = torch.ops.moegen.moe(xb, h, 0)
    # bf16 in an f32 model: widened exactly, y cast back to bf16
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, torch.ops.moegen.moe(xb.to(torch.float32), h, 0).to(torch.bfloat16))
    assert torch.ops.moegen.moe(x[:0], h, 0).shape == (0, 4, H)


class Recorder:
    """Wraps a model's ctypes function, recording the pointer arguments."""

    def __init__(self, m, fn):
        self.m, self.fn, self.orig, self.calls = m, fn, getattr(m._lib, fn), []

    def __enter__(self):
        def rec(*a):
            self.calls.append(a)
            return self.orig(*a)
        setattr(self.m._lib, self.fn, rec)
        return self

    def __exit__(self, *exc):
        setattr(self.m._lib, self.fn, self.orig)


def test_f32_tensors_are_not_copied(tiny):
    m, h, _ = tiny[:3]
    x = x_of(8)
    with Recorder(m, "moe_forward") as r:
        y = torch.ops.moegen.moe(x, h, 0)
    (args,) = r.calls
    assert args[2].value == x.data_ptr() and args[3].value == y.data_ptr()
    # a strided view is made contiguous first: a copy, and the pointer differs
    xs = x_of(16)[::2]
    with Recorder(m, "moe_forward") as r:
        torch.ops.moegen.moe(xs, h, 0)
    assert r.calls[0][2].value != xs.data_ptr()
    rows = x_of(6)
    counts = torch.tensor([2, 0, 3, 1], dtype=torch.int64)
    with Recorder(m, "moe_experts") as r:
        ry = torch.ops.moegen.experts(rows, counts, h, 0, None)
    (args,) = r.calls
    addr = lambda p: ctypes.cast(p, ctypes.c_void_p).value  # noqa: E731
    assert addr(args[2]) == rows.data_ptr() and addr(args[6]) == ry.data_ptr()
    assert addr(args[4]) == counts.data_ptr()


def test_bf16_model_takes_bf16_tensors_in_place(tiny_bf16):
    m, h = tiny_bf16
    x = x_of(8, dtype=torch.bfloat16)
    with Recorder(m, "moe_forward") as r:
        y = torch.ops.moegen.moe(x, h, 0)
    assert r.calls[0][2].value == x.data_ptr() and r.calls[0][3].value == y.data_ptr()
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, m.forward(x, layer=0))
    # f32 into the bf16 model: rounded to bf16 (nearest even) as the binding does
    xf = x_of(8, seed=9)
    yf = torch.ops.moegen.moe(xf, h, 0)
    assert yf.dtype == torch.float32
    assert np.array_equal(yf.numpy(), m.forward(xf.numpy(), layer=0))


def test_stages_compose_to_the_layer(tiny):
    m, h, _ = tiny[:3]
    for L in (0, 2):
        x = x_of(20, seed=10 + L)
        ids, w = torch.ops.moegen.route(x, h, L)
        assert ids.shape == (20, K) and ids.dtype == torch.int32
        _, rt = m.forward(x, layer=L, routing=True)
        assert torch.equal(ids, rt.expert_ids) and torch.equal(w, rt.weights)
        rows_x, counts, slot_rows = mt.group_rows(x, ids, h)
        assert int(counts.sum()) == rows_x.shape[0] == 20 * K
        rows_y = torch.ops.moegen.experts(rows_x, counts, h, L, None)
        y = torch.ops.moegen.combine(x, ids, w, rows_y, slot_rows, h, L)
        assert torch.equal(y, torch.ops.moegen.moe(x, h, L))
        # rows in slot order need no slot_rows
        assert bool((slot_rows >= 0).all())
        flat = rows_y[slot_rows.reshape(-1)]
        y2 = torch.ops.moegen.combine(x, ids, w, flat, None, h, L)
        assert torch.equal(y2, y)


def test_experts_stage_is_each_expert(tiny):
    # one row through each expert is that expert's GLU (test_binding's formula)
    m, h, t = tiny[:3]
    rows = x_of(E, seed=4)
    ry = torch.ops.moegen.experts(rows, torch.ones(E, dtype=torch.int64), h, 2, None)
    for e in range(E):
        pre = "l.2.e.%d." % e
        x64 = rows[e].double().numpy()
        g, u, d = (t[pre + n].astype(np.float64) for n in ("w1.weight", "w3.weight",
                                                             "w2.weight"))
        a = x64 @ g.T
        ref = ((a / (1 + np.exp(-a))) * (x64 @ u.T)) @ d.T
        assert rel_err(ry[e].numpy(), ref) <= 1e-5


def test_errors(tiny):
    m, h, _ = tiny[:3]
    with pytest.raises(ValueError, match="not an MoE layer"):
        torch.ops.moegen.moe(x_of(2), h, 1)
    with pytest.raises(ValueError, match="hidden"):
        torch.ops.moegen.moe(torch.zeros(2, H + 1), h, 0)
    with pytest.raises(ValueError, match="no model is registered"):
        torch.ops.moegen.moe(x_of(2), 10 ** 9, 0)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.moegen.experts(x_of(2).double(), torch.tensor([2, 0, 0, 0]), h, 0, None)
    with pytest.raises(moegen.MoeError):
        # the counts add up to more rows than given: the library refuses
        torch.ops.moegen.experts(x_of(2), torch.tensor([2, 1, 0, 0]), h, 0, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(tiny, dtype):
    m, h, _ = tiny[:3]
    x = x_of(6, seed=2, dtype=dtype)
    torch.library.opcheck(torch.ops.moegen.moe.default, (x, h, 0))
    torch.library.opcheck(torch.ops.moegen.moe.default, (x.reshape(2, 3, H), h, 2))
    torch.library.opcheck(torch.ops.moegen.route.default, (x, h, 0))
    ids, w = torch.ops.moegen.route(x, h, 0)
    rows_x, counts, slot_rows = mt.group_rows(x, ids, h)
    torch.library.opcheck(torch.ops.moegen.experts.default, (rows_x, counts, h, 0, None))
    rows_y = torch.ops.moegen.experts(rows_x, counts, h, 0, None)
    torch.library.opcheck(torch.ops.moegen.combine.default, (x, ids, w, rows_y, slot_rows, h, 0))


def test_compiles(tiny):
    # torch.compile traces the ops through their fake implementations
    m, h, _ = tiny[:3]
    x = x_of(10, seed=6)
    f = torch.compile(lambda v: torch.ops.moegen.moe(v * 2, h, 0) + 1, backend="eager",
                      fullgraph=True)
    assert torch.equal(f(x), torch.ops.moegen.moe(x * 2, h, 0) + 1)


def test_experts_split_over_two_ranges(tiny):
    # expert parallelism in one process: two instances holding experts [0, 2)
    # and [2, 4) compute their rows; together they give the full model's bits
    m, h, _, so, st = tiny
    parts = [moegen.load(so, weights=[st], experts=r) for r in ((0, 2), (2, 4))]
    hs = [mt.register(p) for p in parts]
    try:
        x = x_of(16, seed=21)
        ids, w = torch.ops.moegen.route(x, h, 2)
        rows_x, counts, slot_rows = mt.group_rows(x, ids, h)
        n0 = int(counts[:2].sum())
        y0 = torch.ops.moegen.experts(rows_x[:n0], counts[:2], hs[0], 2, None)
        y1 = torch.ops.moegen.experts(rows_x[n0:], counts[2:], hs[1], 2, None)
        rows_y = torch.cat([y0, y1])
        assert torch.equal(rows_y, torch.ops.moegen.experts(rows_x, counts, h, 2, None))
        y = torch.ops.moegen.combine(x, ids, w, rows_y, slot_rows, h, 2)
        assert torch.equal(y, torch.ops.moegen.moe(x, h, 2))
        with pytest.raises(ValueError, match="one entry per expert"):
            torch.ops.moegen.experts(rows_x, counts, hs[0], 2, None)
        with pytest.raises(moegen.MoeError, match="ERR_ARG"):
            torch.ops.moegen.moe(x, hs[0], 2)  # a part of the experts: the stages only
    finally:
        for p, hp in zip(parts, hs):
            mt.unregister(hp)
            p.close()


class _TupleBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = torch.nn.Linear(H, H)

    def forward(self, x):
        return self.experts(x), torch.zeros(x.shape[:-1] + (E,))


class _TupleModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": H})()
        self.layers = torch.nn.ModuleList([_TupleBlock()])


def test_swap_refuses_blocks_that_return_a_tuple():
    # the decoder layer would unpack the swapped block's tensor: refused
    # before anything is imported or compiled
    model = _TupleModel()
    with pytest.raises(NotImplementedError, match="_TupleBlock .*returns tuple"):
        mt.swap_moe(model, moegen="/nonexistent/moegen")
    assert isinstance(model.layers[0], _TupleBlock)
    with pytest.raises(ValueError, match="no MoE block"):
        mt.swap_moe(torch.nn.Linear(2, 2))


def test_opcheck_bf16_model(tiny_bf16):
    m, h = tiny_bf16
    for dtype in (torch.bfloat16, torch.float32):
        x = x_of(5, seed=8, dtype=dtype)
        torch.library.opcheck(torch.ops.moegen.moe.default, (x, h, 2))
        ids, w = torch.ops.moegen.route(x, h, 2)
        rows_x, counts, slot_rows = mt.group_rows(x, ids, h)
        rows_y = torch.ops.moegen.experts(rows_x, counts, h, 2, None)
        torch.library.opcheck(torch.ops.moegen.combine.default,
                              (x, ids, w, rows_y, slot_rows, h, 2))
        y = torch.ops.moegen.combine(x, ids, w, rows_y, slot_rows, h, 2)
        assert y.dtype == dtype and torch.equal(y, torch.ops.moegen.moe(x, h, 2))
