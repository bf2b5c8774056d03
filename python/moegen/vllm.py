"""moegen's routed experts as the experts stage of a vLLM fused-MoE modular kernel.

    from moegen.vllm import MoegenExperts
    experts = MoegenExperts(moe_config, quant_config)        # a FusedMoEExpertsModular
    kernel = mk.FusedMoEKernel(prepare_finalize, experts)    # any Standard-format backend

vLLM routes and moves tokens (its prepare/finalize: no EP, or an all-to-all
backend that hands over rows in the Standard activation format); moegen runs
the experts. `apply` groups the rows by local expert (stable: slot order within
an expert), calls `moe_experts` on them, then `moe_combine` sums each token's
slots in slot order k = 0..K-1 into `output` (so the weights are applied and
reduced here: the finalize step is a no-op). The weights vLLM loaded into the
layer (`w13_weight` [E_local, 2I, H], gate rows first, and `w2_weight`
[E_local, H, I]) are packed into moegen's layout once, in
`process_weights_after_loading`.

Imported only on demand: it needs vllm (and torch) installed; `import moegen`
never imports it. docs/python.md, "vLLM", describes it.
"""

import ctypes
import hashlib
import os
import shutil
import tempfile

import numpy as np

try:
    import torch
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceNoOP)
    from vllm.platforms import current_platform
except ImportError as e:
    raise ImportError("moegen.vllm needs vllm (and torch) installed; docs/python.md, 'vLLM', "
                      "says how: %s" % e) from e

import moegen
from moegen import _abi

__all__ = ["MoegenExperts", "experts_spec", "expert_range"]

# vLLM activation -> moegen expert activation (both gated: act(gate) * up).
_ACTIVATIONS = {MoEActivation.SILU: "swiglu", MoEActivation.GELU: "geglu"}

_NAMES = {
    "router": "l.{layer}.gate.weight",
    "gate": "l.{layer}.e.{expert}.gate.weight",
    "up": "l.{layer}.e.{expert}.up.weight",
    "down": "l.{layer}.e.{expert}.down.weight",
}


def experts_spec(moe_config, weight_dtype="f32"):
    """The moegen spec (YAML text) of one MoE layer shaped like moe_config:
    E routed experts of width I (the per-partition intermediate size) over
    hidden H, top-k slots per token, the layer's gated activation, f32
    activations (the experts stage computes in f32 whatever vLLM's dtype).
    Its router is never used (vLLM routes): its tensor is loaded as zeros."""
    act = _ACTIVATIONS.get(moe_config.activation)
    if act is None:
        raise ValueError("moegen.vllm: activation %s is not supported (supported: %s)" %
                         (moe_config.activation, ", ".join(a.name for a in _ACTIVATIONS)))
    H = moe_config.hidden_dim
    E = moe_config.num_experts
    I = moe_config.intermediate_size_per_partition
    k = moe_config.experts_per_token
    name = "vllm-e%d-h%d-i%d-k%d-%s-%s" % (E, H, I, k, act, weight_dtype)
    names = "".join("    %s: %s\n" % kv for kv in _NAMES.items())
    return ("moegen: 1\n"
            "name: %s\n"
            "model: {hidden: %d, layers: 1, moe_layers: all}\n"
            "dtype: {weights: %s, activations: f32}\n"
            "router: {mode: token_choice, score: softmax, top_k: %d, normalize: none}\n"
            "experts: {count: %d, intermediate: %d, activation: %s}\n"
            "weights:\n  format: safetensors\n  names:\n%s" %
            (name, H, weight_dtype, k, E, I, act, names))


def expert_range(moe_config):
    """[begin, end) of the global experts this rank holds: vLLM's linear
    placement (the first E % P ranks hold one expert more), or all of them
    without expert parallelism."""
    E = moe_config.num_experts
    pc = moe_config.moe_parallel_config
    if not pc.use_ep or pc.ep_size <= 1:
        return 0, E
    base, rem = divmod(E, pc.ep_size)
    r = pc.ep_rank
    begin = r * base + min(r, rem)
    return begin, begin + base + (1 if r < rem else 0)


def _compile(spec_text, cache_dir=None, moegen_cmd=None):
    """model.so of spec_text, compiled once into a cache keyed by the text and
    the moegen command (its path, size and modification time)."""
    cache_dir = cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moegen", "vllm")
    os.makedirs(cache_dir, exist_ok=True)
    exe = moegen._moegen_exe(moegen_cmd)
    path = shutil.which(exe) or exe
    st = os.stat(path)
    ident = "%s\n%s\n%d %d\n%d\n" % (spec_text, os.path.realpath(path), st.st_size,
                                      st.st_mtime_ns, _abi.ABI_VERSION)
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
    so = os.path.join(cache_dir, key + ".so")
    if not os.path.exists(so):
        fd, tmp = tempfile.mkstemp(suffix=".yaml", dir=cache_dir)
        with os.fdopen(fd, "w") as f:
            f.write(spec_text)
        tmp_so = tmp[:-5] + ".so"
        try:
            moegen.compile(tmp, tmp_so, moegen=exe)
            os.replace(tmp_so, so)  # atomic: concurrent ranks never see half a file
        finally:
            for p in (tmp, tmp_so):
                if os.path.exists(p):
                    os.unlink(p)
    return so


def _open_range(path, begin, end, threads):
    """A moegen.Model holding experts [begin, end) of the library at path."""
    m = moegen.Model(path, threads=threads)
    if (begin, end) != (0, m.info.n_experts):
        # re-create the instance (no weights yet) with the expert range
        m.close()
        opts = _abi.CreateOpts(threads=threads, device=0, stream=None, expert_begin=begin,
                               expert_end=end)
        m._check(m._lib.moe_create(ctypes.byref(m._h), ctypes.byref(opts)))
    return m


def _ptr(t, ctype):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))


class MoegenExperts(mk.FusedMoEExpertsModular):
    """A FusedMoEExpertsModular whose experts are a moegen model.so.

    moe_config, quant_config: as every vLLM experts class (unquantized only).
    library: a model.so built from experts_spec(moe_config) (or any spec of
    the same shape and names); None: compiled once per shape into cache_dir
    (default ~/.cache/moegen/vllm; needs the moegen command: moegen_cmd,
    $MOEGEN, the package's, or PATH). experts: (begin, end), the global
    experts of this rank; None: vLLM's linear placement from moe_config.
    threads: moegen's worker threads (0: all cores)."""

    def __init__(self, moe_config, quant_config, library=None, experts=None, threads=0,
                 moegen_cmd=None, cache_dir=None):
        super().__init__(moe_config, quant_config)
        self.library = library
        self.experts = tuple(experts) if experts is not None else expert_range(moe_config)
        self.threads = threads
        self.moegen_cmd = moegen_cmd
        self.cache_dir = cache_dir
        self.model = None

    # capabilities, read by vLLM's kernel selection
    @staticmethod
    def activation_format():
        return mk.FusedMoEActivationFormat.Standard

    @property
    def expects_unquantized_inputs(self):
        return True

    @staticmethod
    def _supports_current_device():
        return current_platform.is_cpu()

    @staticmethod
    def _supports_no_act_and_mul():
        return False

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key):
        return (weight_key, activation_key) == (None, None)

    @staticmethod
    def _supports_activation(activation):
        return activation in _ACTIVATIONS

    @staticmethod
    def _supports_parallel_config(moe_parallel_config):
        return moe_parallel_config.tp_size == 1  # whole experts: EP or none

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts,
                         expert_tokens_meta, activation):
        return (0,), (0,), (M, K)

    def finalize_weight_and_reduce_impl(self):
        return TopKWeightAndReduceNoOP()  # apply() weights and sums the slots

    # weights
    def process_weights_after_loading(self, layer):
        """Pack layer.w13_weight / w2_weight into a moegen model: written once
        as safetensors under the spec's names (f32, or bf16 when vLLM holds
        bf16), loaded (converted and packed by moegen), the file removed."""
        w13, w2 = layer.w13_weight.detach(), layer.w2_weight.detach()
        if getattr(layer, "w13_bias", None) is not None or getattr(layer, "w2_bias",
                                                                   None) is not None:
            raise ValueError("moegen.vllm: expert biases are not supported")
        cfg = self.moe_config
        b, e = self.experts
        E, H = cfg.num_experts, cfg.hidden_dim
        I = cfg.intermediate_size_per_partition
        if not 0 <= b < e <= E or w13.shape != (e - b, 2 * I, H) or w2.shape != (e - b, H, I):
            raise ValueError("moegen.vllm: experts [%d, %d) of %d need w13 [%d, %d, %d] and w2 "
                             "[%d, %d, %d], got %s and %s" %
                             (b, e, E, e - b, 2 * I, H, e - b, H, I, tuple(w13.shape),
                              tuple(w2.shape)))
        bf16 = w13.dtype == torch.bfloat16 and w2.dtype == torch.bfloat16
        wdt = "bf16" if bf16 else "f32"
        library = self.library or _compile(experts_spec(cfg, wdt), self.cache_dir,
                                            self.moegen_cmd)
        model = _open_range(library, b, e, self.threads)
        try:
            info = model.info
            if (info.hidden, info.n_experts, info.intermediate, info.top_k) != (
                    H, E, I, cfg.experts_per_token) or info.n_shared_experts:
                raise ValueError(
                    "moegen.vllm: %s has hidden %d, %d experts of width %d, top-k %d, %d shared;"
                    " the layer needs %d, %d, %d, %d, 0" %
                    (library, info.hidden, info.n_experts, info.intermediate, info.top_k,
                     info.n_shared_experts, H, E, I, cfg.experts_per_token))
            want = "silu" if cfg.activation == MoEActivation.SILU else "gelu"
            got = [w for w in (ln.split() for ln in info.description.splitlines())
                   if w[:2] == ["experts", "glu"] and "activation" in w]
            if not got or got[0][got[0].index("activation") + 1] != want:
                raise ValueError("moegen.vllm: %s does not have gated %s experts (the layer's %s)"
                                 % (library, want, cfg.activation.name))
            names = info.weight_names
            L = info.moe_layers[0]

            def arr(t):  # f32 (exact from bf16 and f16); bf16 tensors are written back as bf16
                return t.to("cpu", torch.float32).contiguous().numpy()

            tensors = {names["router"].format(layer=L): np.zeros((E, H), dtype=np.float32)}
            for j in range(e - b):
                g = b + j
                tensors[names["gate"].format(layer=L, expert=g)] = arr(w13[j, :I])
                tensors[names["up"].format(layer=L, expert=g)] = arr(w13[j, I:])
                tensors[names["down"].format(layer=L, expert=g)] = arr(w2[j])
            fd, path = tempfile.mkstemp(suffix=".safetensors")
            os.close(fd)
            try:
                moegen.save_safetensors(path, tensors, bf16=list(tensors) if bf16 else ())
                model.load_weights(path)
            finally:
                os.unlink(path)
        except BaseException:
            model.close()
            raise
        if self.model is not None:
            self.model.close()
        self.model, self.moe_layer = model, L

    # the experts stage
    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
              global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
              expert_tokens_meta, apply_router_weight_on_input):
        m = self.model
        if m is None:
            raise RuntimeError("moegen.vllm: apply before process_weights_after_loading")
        if activation != self.moe_config.activation:
            raise ValueError("moegen.vllm: the model was built for %s, not %s" %
                             (self.moe_config.activation, activation))
        b, e = self.experts
        M, K = topk_ids.shape
        H = hidden_states.shape[-1]
        if hidden_states.device.type != "cpu":
            raise ValueError("moegen.vllm: hidden states on %s; moegen runs on the CPU" %
                             hidden_states.device)
        if M == 0:
            return None
        ids = topk_ids.to(torch.int64)
        if expert_map is not None:
            # vLLM's global -> local map must be this model's range
            em = expert_map.to("cpu", torch.int64)
            want = torch.full_like(em, -1)
            want[b:e] = torch.arange(e - b)
            if not torch.equal(em, want):
                raise ValueError("moegen.vllm: the expert map is not the contiguous range "
                                 "[%d, %d) this model holds (linear placement only)" % (b, e))
        local = (ids >= b) & (ids < e)
        flat = torch.where(local, ids - b, torch.full_like(ids, -1)).reshape(-1)
        # slots grouped by local expert, stable: within an expert in slot order
        slots = torch.nonzero(flat >= 0).reshape(-1)
        order = torch.sort(flat[slots], stable=True).indices
        slots = slots[order]
        counts = torch.bincount(flat[slots], minlength=e - b).to(torch.int64).contiguous()
        n = slots.numel()
        x = hidden_states.reshape(M, H).to(torch.float32)
        rows_x = x[slots // K].contiguous()
        rows_y = torch.empty((n, H), dtype=torch.float32)
        slot_rows = torch.full((M * K,), -1, dtype=torch.int64)
        slot_rows[slots] = torch.arange(n, dtype=torch.int64)
        cids = torch.where(local, ids, torch.full_like(ids, -1)).to(torch.int32).contiguous()
        if apply_router_weight_on_input:  # prepare() already scaled the input
            w = torch.ones((M, K), dtype=torch.float32)
        else:
            w = topk_weights.to(torch.float32).contiguous()
        y = output if (output.dtype == torch.float32 and output.is_contiguous()
                       and output.shape == (M, H)) else torch.empty((M, H), dtype=torch.float32)
        f = ctypes.c_float
        with m._lock:
            m._check(m._lib.moe_experts(m._handle(), self.moe_layer, _ptr(rows_x, f), n,
                                        _ptr(counts, ctypes.c_int64), None, _ptr(rows_y, f)))
            m._check(m._lib.moe_combine(m._handle(), self.moe_layer, None, M,
                                        _ptr(cids, ctypes.c_int32), _ptr(w, f), _ptr(rows_y, f),
                                        _ptr(slot_rows, ctypes.c_int64), y.data_ptr()))
        if y is not output:
            output.copy_(y.view(output.shape))
        return None
