"""moegen inside PyTorch: torch.library custom ops over a loaded model.so, and
swap_moe(), which replaces every MoE block of a transformers model by moegen's.

    import moegen.torch as mt
    h = mt.register(moegen.load("model.so", weights=[...]))   # an int handle
    y = torch.ops.moegen.moe(x, h, layer)                      # the whole layer
    ids, w = torch.ops.moegen.route(x, h, layer)               # the stages
    rows_y = torch.ops.moegen.experts(rows_x, counts, h, layer, None)
    y = torch.ops.moegen.combine(x, ids, w, rows_y, None, h, layer)

    model = mt.swap_moe(model)    # transformers model: MoE blocks run in moegen

The ops take CPU tensors. Contiguous tensors in the dtype the library takes
(f32; or bf16 for a bf16-activation model) are passed by their data pointer,
and outputs are allocated by torch and written in place: no copies. Other
float dtypes are converted (as moegen.Model.forward does) and the output is
cast back to the input's dtype. Every op has a fake (meta) implementation, so
torch.compile and torch.library.opcheck trace them. Inference only: the ops
have no autograd formula. docs/python.md describes them.
"""

import ctypes
import itertools
import math
import os
import tempfile
import threading
import weakref
from typing import Optional, Tuple

import torch

from . import Model
from . import compile as _compile
from . import import_config as _import_config
from . import save_safetensors as _save_safetensors

__all__ = ["register", "unregister", "model_of", "group_rows", "MoegenBlock", "swap_moe",
           "find_moe_blocks"]

# Handles: the custom ops take a model as an int (the op schema has no place
# for a Python object); register() hands one out.
_models = {}
_ids = itertools.count(1)
_reg_lock = threading.Lock()


def register(model):
    """Make a moegen.Model usable by the ops; returns its int handle."""
    if not isinstance(model, Model):
        raise TypeError("register: expected a moegen.Model, got %s" % type(model).__name__)
    with _reg_lock:
        h = next(_ids)
        _models[h] = model
    return h


def unregister(handle):
    """Forget a handle (the model itself is closed by its owner)."""
    with _reg_lock:
        _models.pop(int(handle), None)


def model_of(handle):
    try:
        return _models[int(handle)]
    except KeyError:
        raise ValueError("moegen: no model is registered under handle %r" % handle) from None


def _ptr(t, ctype=None):
    if t is None or t.numel() == 0:
        return None
    p = ctypes.c_void_p(t.data_ptr())
    return ctypes.cast(p, ctypes.POINTER(ctype)) if ctype is not None else p


def _cpu(t, what, name):
    if t.device.type != "cpu":
        raise ValueError("moegen::%s: %s is on %s; the model runs on the CPU (pass %s.cpu())" %
                         (what, name, t.device, name))


def _act_dtype(m):
    return torch.bfloat16 if m.info.act_dtype == "bf16" else torch.float32


def _activations_in(m, x, what):
    """x [..., H] as a contiguous [T, H] tensor of the model's activation dtype
    (x itself when it already is one: no copy)."""
    _cpu(x, what, "x")
    if not x.dtype.is_floating_point:
        raise TypeError("moegen::%s: x must be a float tensor, got %s" % (what, x.dtype))
    H = m.info.hidden
    if x.dim() == 0 or x.shape[-1] != H:
        raise ValueError("moegen::%s: x must have shape [..., %d] (hidden), got %s" %
                         (what, H, tuple(x.shape)))
    # bf16 rounding in torch is round to nearest even, as the binding's
    return x.detach().reshape(-1, H).to(_act_dtype(m)).contiguous()


def _layer(m, layer, what):
    if int(layer) not in m.info.moe_layers:
        raise ValueError("moegen::%s: layer %d is not an MoE layer of %s (MoE layers: %s)" %
                         (what, layer, m.info.name, m.info.moe_layers))
    return int(layer)


def _check(m, status):
    m._check(status)


# The whole layer ------------------------------------------------------------


@torch.library.custom_op("moegen::moe", mutates_args=())
def moe(x: torch.Tensor, model: int, layer: int) -> torch.Tensor:
    """y = MoE layer `layer` of the registered model applied to x [..., H];
    y has x's shape and dtype."""
    m = model_of(model)
    layer = _layer(m, layer, "moe")
    xin = _activations_in(m, x, "moe")
    T = xin.shape[0]
    y = torch.empty_like(xin)
    if T:
        with m._lock:
            _check(m, m._lib.moe_forward(m._handle(), layer, _ptr(xin), _ptr(y), T, None, None))
    return y.reshape(x.shape).to(x.dtype)


@moe.register_fake
def _moe_fake(x, model, layer):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# The stages -----------------------------------------------------------------


@torch.library.custom_op("moegen::route", mutates_args=())
def route(x: torch.Tensor, model: int, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The router of layer `layer`: ids int32 and weights float32, both
    [T, W] for x [T, H] (W = info.route_width; unused slots: id -1, weight 0)."""
    m = model_of(model)
    layer = _layer(m, layer, "route")
    xin = _activations_in(m, x, "route")
    T, W = xin.shape[0], m.info.route_width
    ids = torch.empty((T, W), dtype=torch.int32)
    w = torch.empty((T, W), dtype=torch.float32)
    if T:
        with m._lock:
            _check(m, m._lib.moe_route(m._handle(), layer, _ptr(xin), T,
                                       _ptr(ids, ctypes.c_int32), _ptr(w, ctypes.c_float),
                                       None))
    return ids, w


@route.register_fake
def _route_fake(x, model, layer):
    W = model_of(model).info.route_width
    T = math.prod(x.shape[:-1])
    return x.new_empty((T, W), dtype=torch.int32), x.new_empty((T, W), dtype=torch.float32)


def _rows(t, what, name):
    _cpu(t, what, name)
    if t.dtype != torch.float32:
        raise TypeError("moegen::%s: %s must be float32 (rows are in the compute type), got %s"
                        % (what, name, t.dtype))
    return t.detach().contiguous()


@torch.library.custom_op("moegen::experts", mutates_args=())
def experts(rows_x: torch.Tensor, counts: torch.Tensor, model: int, layer: int,
            rows_w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rows_y [R, H] float32: each row of rows_x [R, H] float32 through its
    expert; rows are grouped by expert, counts [E] int64 rows per expert (the
    model's expert range, in order). rows_w [R] float32: each row's routing
    weight, for models that apply it to the expert input (else None)."""
    m = model_of(model)
    layer = _layer(m, layer, "experts")
    H = m.info.hidden
    xr = _rows(rows_x, "experts", "rows_x")
    if xr.dim() != 2 or xr.shape[1] != H:
        raise ValueError("moegen::experts: rows_x must be [R, %d], got %s" % (H, tuple(xr.shape)))
    _cpu(counts, "experts", "counts")
    if counts.dtype != torch.int64 or counts.dim() != 1:
        raise TypeError("moegen::experts: counts must be a 1-D int64 tensor, got %s %s" %
                        (counts.dtype, tuple(counts.shape)))
    eb, ee = m.experts
    if counts.numel() != ee - eb:
        raise ValueError("moegen::experts: counts must have one entry per expert of the model's "
                         "range [%d, %d), got %d" % (eb, ee, counts.numel()))
    c = counts.detach().contiguous()
    wr = None
    if rows_w is not None:
        wr = _rows(rows_w, "experts", "rows_w")
        if wr.shape != (xr.shape[0],):
            raise ValueError("moegen::experts: rows_w must be [%d], got %s" %
                             (xr.shape[0], tuple(wr.shape)))
    y = torch.empty_like(xr)
    R = xr.shape[0]
    if R or c.numel():
        with m._lock:
            _check(m, m._lib.moe_experts(m._handle(), layer, _ptr(xr, ctypes.c_float), R,
                                         _ptr(c, ctypes.c_int64), _ptr(wr, ctypes.c_float),
                                         _ptr(y, ctypes.c_float)))
    return y


@experts.register_fake
def _experts_fake(rows_x, counts, model, layer, rows_w=None):
    return torch.empty_like(rows_x, memory_format=torch.contiguous_format)


@torch.library.custom_op("moegen::combine", mutates_args=())
def combine(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rows_y: torch.Tensor,
            slot_rows: Optional[torch.Tensor], model: int, layer: int) -> torch.Tensor:
    """y [..., H] in x's dtype: for each token, the slots k = 0..W-1 in order,
    weights[t, k] * rows_y[slot_rows[t, k]] (slot_rows None: rows_y is
    [T * W, H] in slot order), then the shared experts of x and the output
    bias. ids int32 / weights float32 [T, W] as route gives them."""
    m = model_of(model)
    layer = _layer(m, layer, "combine")
    xin = _activations_in(m, x, "combine")
    T, W = xin.shape[0], m.info.route_width
    _cpu(ids, "combine", "ids")
    if ids.dtype != torch.int32 or tuple(ids.shape) != (T, W):
        raise TypeError("moegen::combine: ids must be int32 [%d, %d], got %s %s" %
                        (T, W, ids.dtype, tuple(ids.shape)))
    wt = _rows(weights, "combine", "weights")
    if tuple(wt.shape) != (T, W):
        raise ValueError("moegen::combine: weights must be [%d, %d], got %s" %
                         (T, W, tuple(wt.shape)))
    ry = _rows(rows_y, "combine", "rows_y")
    if ry.dim() != 2 or ry.shape[1] != m.info.hidden:
        raise ValueError("moegen::combine: rows_y must be [R, %d], got %s" %
                         (m.info.hidden, tuple(ry.shape)))
    sr = None
    if slot_rows is None:
        if ry.shape[0] != T * W:
            raise ValueError("moegen::combine: without slot_rows, rows_y must be [%d, H] (T*W),"
                             " got %d rows" % (T * W, ry.shape[0]))
    else:
        _cpu(slot_rows, "combine", "slot_rows")
        if slot_rows.dtype != torch.int64 or tuple(slot_rows.shape) != (T, W):
            raise TypeError("moegen::combine: slot_rows must be int64 [%d, %d], got %s %s" %
                            (T, W, slot_rows.dtype, tuple(slot_rows.shape)))
        sr = slot_rows.detach().contiguous()
        if T and (int(sr.max()) >= ry.shape[0]):
            raise ValueError("moegen::combine: slot_rows holds a row >= %d" % ry.shape[0])
    ids_c = ids.detach().contiguous()
    y = torch.empty_like(xin)
    if T:
        with m._lock:
            _check(m, m._lib.moe_combine(m._handle(), layer, _ptr(xin), T,
                                         _ptr(ids_c, ctypes.c_int32), _ptr(wt, ctypes.c_float),
                                         _ptr(ry, ctypes.c_float),
                                         _ptr(sr, ctypes.c_int64), _ptr(y)))
    return y.reshape(x.shape).to(x.dtype)


@combine.register_fake
def _combine_fake(x, ids, weights, rows_y, slot_rows, model, layer):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def group_rows(x, ids, model):
    """The layout moe_experts takes, from route's ids: (rows_x [R, H] f32 grouped
    by expert, counts [E] int64 over all E routed experts, slot_rows [T, W]
    int64: the row of each slot, -1 for unused slots). model: the handle (or
    the moegen.Model) x is routed by; rows are x as that model reads it (a
    bf16-activation model rounds x to bf16). Rows of one expert keep token
    order (a stable sort of the slots by expert), so route -> group_rows ->
    experts -> combine is the same computation as moe."""
    m = model if isinstance(model, Model) else model_of(model)
    H = m.info.hidden
    n_experts = m.info.n_experts
    xf = x.detach().reshape(-1, H).to(_act_dtype(m)).to(torch.float32)
    T, W = ids.shape
    flat = ids.reshape(-1).to(torch.int64)
    used = torch.nonzero(flat >= 0).flatten()
    order = used[torch.sort(flat[used], stable=True).indices]
    counts = torch.bincount(flat[order], minlength=n_experts).to(torch.int64)
    slot_rows = torch.full((T * W,), -1, dtype=torch.int64)
    slot_rows[order] = torch.arange(order.numel(), dtype=torch.int64)
    rows_x = xf[order // W].contiguous() if W else xf[:0]
    return rows_x, counts, slot_rows.reshape(T, W)


# transformers -----------------------------------------------------------------


class MoegenBlock(torch.nn.Module):
    """Stands in for one MoE block of a model: forward(hidden_states) is
    torch.ops.moegen.moe on the block's layer. Holds the moegen.Model (and
    the handle the op takes); the block's weights live in the model.so."""

    def __init__(self, model, layer, hidden, original=""):
        super().__init__()
        self.moegen_model = model
        self.layer = int(layer)
        self.hidden = int(hidden)
        self.original = original
        self.handle = register(model)
        weakref.finalize(self, unregister, self.handle)

    def __deepcopy__(self, memo):
        # a copy shares the loaded library and its (read-only) weights
        new = MoegenBlock(self.moegen_model, self.layer, self.hidden, self.original)
        new.train(self.training)
        return new

    def forward(self, hidden_states, *args, **kwargs):
        return torch.ops.moegen.moe(hidden_states, self.handle, self.layer)

    def extra_repr(self):
        return "layer=%d, model=%s, replaces=%s" % (self.layer, self.moegen_model.info.name,
                                                   self.original)


def _layer_index(name):
    """The decoder layer index of a module path: the first integer component
    ("model.layers.3.mlp" -> 3)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def find_moe_blocks(model):
    """[(layer index, module path, module)] of the MoE blocks of a transformers
    model: the outermost modules that own an `experts` submodule."""
    found = []
    for name, mod in model.named_modules():
        if not isinstance(getattr(mod, "experts", None), torch.nn.Module):
            continue
        if any(name.startswith(n + ".") for _, n, _ in found):
            continue
        found.append((_layer_index(name), name, mod))
    return found


def _checkpoint_names(model, state):
    """Model parameter names -> the checkpoint names save_pretrained writes
    (transformers 5 fuses the experts in memory and splits them on save)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return revert_weight_conversion(model, state)


def _set_module(model, path, new):
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _check_returns_tensor(model, blocks):
    """A MoegenBlock returns the hidden states alone: refuse a block that
    returns more (a tuple with router logits), which its decoder layer would
    unpack. One call of each block class on two random tokens tells."""
    cfg = getattr(model, "config", None)
    H = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    if not H:
        raise ValueError("swap_moe: the model's config has no hidden_size")
    dtype = next(itertools.chain(model.parameters(), [torch.empty(0)])).dtype
    seen = set()
    for L, name, mod in blocks:
        if type(mod) in seen:
            continue
        seen.add(type(mod))
        x = torch.randn((1, 2, H), generator=torch.Generator().manual_seed(0)).to(dtype)
        with torch.no_grad():
            out = mod(x)
        if not torch.is_tensor(out):
            raise NotImplementedError(
                "swap_moe: %s (%s) returns %s, not the hidden states alone; only blocks that "
                "return a tensor are swapped" % (type(mod).__name__, name, type(out).__name__))


def swap_moe(model, workdir=None, sets=(), moegen=None, threads=0):
    """Replace every MoE block of a transformers model by a MoegenBlock, in
    place; returns the model.

    The model's config is imported (`moegen import` on its config.json) and
    compiled (sets: extra `--set K=V` for the compiler), the MoE blocks'
    tensors of the model's own state dict are written under their
    checkpoint names to one safetensors file, and the model.so loads them.
    workdir: where config.json, spec.yaml, model.so and moe.safetensors go
    (default: a temporary directory removed with the blocks' moegen.Model). The MoE layers
    the spec declares must be the ones the model has; each block must return
    the hidden states alone (not a tuple). CPU models only."""
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError("swap_moe: %s has no MoE block (no module with `experts`)" %
                         type(model).__name__)
    for p in itertools.chain(model.parameters(), model.buffers()):
        if p.device.type != "cpu":
            raise ValueError("swap_moe: the model is on %s; moegen runs MoE layers on the CPU"
                             % p.device)
    _check_returns_tensor(model, blocks)
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="moegen-")
        workdir = tmp.name
    else:
        tmp = None
        os.makedirs(workdir, exist_ok=True)
    cfg = os.path.join(workdir, "config.json")
    model.config.to_json_file(cfg)
    spec = _import_config(cfg, os.path.join(workdir, "spec.yaml"), moegen=moegen)
    so = _compile(spec, os.path.join(workdir, "model.so"), sets=sets, moegen=moegen)

    prefixes = tuple(name + "." for _, name, _ in blocks)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    state = _checkpoint_names(model, state)
    arrays = {}
    bf16 = []
    for k, v in state.items():
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            bf16.append(k)
            v = v.to(torch.float32)  # exact; written back as BF16
        arrays[k] = v.contiguous().numpy()
    st = os.path.join(workdir, "moe.safetensors")
    _save_safetensors(st, arrays, bf16=bf16)

    m = Model(so, weights=[st], threads=threads)
    have = sorted(L for L, _, _ in blocks)
    if have != sorted(m.info.moe_layers) or None in have:
        m.close()
        raise ValueError("swap_moe: the model's MoE blocks are in layers %s, the imported spec "
                         "declares %s" % (have, m.info.moe_layers))
    for L, name, mod in blocks:
        _set_module(model, name, MoegenBlock(m, L, m.info.hidden, type(mod).__name__))
    # the temporary directory (if any) lives as long as the moegen.Model
    m._workdir = tmp
    return model
