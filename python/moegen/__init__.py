"""Python binding of moegen model libraries (model.so, the ABI of runtime/moe.h).

    import moegen
    m = moegen.load("model.so", weights=["model.safetensors"])
    y = m.forward(x)                        # x: [T, H] numpy array or torch tensor
    y, r = m.forward(x, routing=True)       # r.expert_ids, r.weights, r.counts, ...

Plain ctypes over the C ABI: no compiled extension, so any model.so built by
any moegen of the same ABI version loads. numpy is required; torch tensors are
accepted and returned when torch is installed. docs/python.md describes it.
"""

import ctypes
import os
import shutil
import subprocess
import threading

import numpy as np

from . import _abi
from ._abi import ABI_VERSION

__all__ = ["load", "Model", "ModelInfo", "Routing", "MoeError", "compile", "import_config",
           "save_safetensors", "ABI_VERSION"]
__version__ = "0.1.0"


class MoeError(RuntimeError):
    """A failed ABI call: `status` is the C status name (e.g. "ERR_WEIGHTS"),
    `code` its value, and the message is the library's moe_last_error()."""

    def __init__(self, status_code, message):
        self.code = int(status_code)
        if 0 <= self.code < len(_abi.STATUSES):
            self.status = _abi.STATUSES[self.code]
        else:
            self.status = "status %d" % self.code
        super().__init__("%s: %s" % (self.status, message))


def _name(table, value):
    return table[value] if 0 <= value < len(table) else "?%d" % value


class ModelInfo:
    """The static metadata of a model.so: struct moe_info, and the full
    description as text (moe_describe, the `moegen -d model` dump) with a few
    facts read from it (mode, score, weight_names)."""

    def __init__(self, raw, description):
        self.abi_version = raw.abi_version
        self.name = raw.name.decode()
        self.spec_hash = raw.spec_hash.decode() if raw.spec_hash else ""
        self.hidden = raw.hidden
        self.intermediate = raw.intermediate
        self.n_experts = raw.n_experts
        self.top_k = raw.top_k
        self.route_width = raw.route_width
        self.n_shared_experts = raw.n_shared_experts
        self.shared_intermediate = raw.shared_intermediate
        self.shared_width = raw.n_shared_experts * raw.shared_intermediate
        self.n_layers = raw.n_layers
        self.n_moe_layers = raw.n_moe_layers
        self.moe_layers = [raw.moe_layers[i] for i in range(raw.n_moe_layers)]
        self.weight_dtype = _name(_abi.DTYPES, raw.weight_dtype)
        self.act_dtype = _name(_abi.DTYPES, raw.act_dtype)
        self.targets = [d for i, d in enumerate(_abi.DEVICES) if raw.targets & (1 << i)]
        self.cpu = raw.cpu.decode() if raw.cpu else ""
        self.description = description
        self.mode = self.score = ""
        self.weight_names = {}
        for line in description.splitlines():
            w = line.split(" ")
            if w[0] == "router" and len(w) >= 4:  # router MODE score SCORE top_k K
                self.mode, self.score = w[1], w[3]
            elif w[0] == "weight" and len(w) >= 3:  # weight ROLE NAME orient ...
                self.weight_names[w[1]] = w[2]

    def __repr__(self):
        return ("ModelInfo(name=%r, hidden=%d, n_experts=%d, top_k=%d, mode=%s, "
                "moe_layers=%s, weights=%s, activations=%s)" %
                (self.name, self.hidden, self.n_experts, self.top_k, self.mode,
                 self.moe_layers, self.weight_dtype, self.act_dtype))


class Routing:
    """The routing output of one forward call (struct moe_routing).

    expert_ids [T, W] int32 and weights [T, W] float32 (W = info.route_width;
    unused or dropped slots hold id -1 and weight 0), counts [E] int64 (kept
    assignments per expert), importance [E] float32, and the scalars
    importance_cv2, lb_loss, z_loss, n_dropped."""

    __slots__ = ("expert_ids", "weights", "counts", "importance", "importance_cv2", "lb_loss",
                 "z_loss", "n_dropped")

    def __repr__(self):
        return "Routing(expert_ids=%r, weights=%r, counts=%r)" % (self.expert_ids, self.weights,
                                                                 self.counts)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _is_gguf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _is_torch(x):
    t = type(x)
    return t.__module__.startswith("torch") and t.__name__ in ("Tensor", "Parameter")


def _bf16_bits(a):
    """float32 -> bfloat16 bit patterns, round to nearest even, NaN kept NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def _bf16_to_f32(bits):
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(
        np.float32)


class Model:
    """One loaded model.so with one model instance (moe_create).

    Forward calls on distinct Model objects may run in parallel threads (the
    GIL is released during the C call). One Model serializes its own calls."""

    def __init__(self, path, weights=None, seed=None, threads=0, experts=None):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.exists(self.path):
            raise FileNotFoundError("model library not found: %s" % self.path)
        # RTLD_LOCAL: several model.so export the same symbol names.
        self._lib = _abi.bind(ctypes.CDLL(self.path, mode=os.RTLD_NOW | os.RTLD_LOCAL))
        raw = self._lib.moe_info().contents
        if raw.abi_version != ABI_VERSION or raw.size < ctypes.sizeof(_abi.Info):
            raise MoeError(_abi.STATUSES.index("ERR_INTERNAL"),
                           "%s has ABI version %d (%d-byte moe_info), this binding speaks "
                           "version %d" % (self.path, raw.abi_version, raw.size, ABI_VERSION))
        n = self._lib.moe_describe(None, 0)
        text = ctypes.create_string_buffer(n + 1)
        self._lib.moe_describe(text, n + 1)
        self.info = ModelInfo(raw, text.value.decode())
        self._lock = threading.Lock()
        self._h = ctypes.c_void_p()
        if threads < 0 or threads >= 1 << 32:
            raise ValueError("threads must be in [0, 2^32) (0: all cores), got %r" % threads)
        eb, ee = (0, 0) if experts is None else (int(experts[0]), int(experts[1]))
        if experts is not None and not 0 <= eb < ee <= self.info.n_experts:
            raise ValueError("experts must be a range (begin, end) within [0, %d], got %r" %
                             (self.info.n_experts, experts))
        self.experts = (eb, ee if ee else self.info.n_experts)
        opts = _abi.CreateOpts(threads=threads, device=0, stream=None, expert_begin=eb,
                               expert_end=ee)
        self._check(self._lib.moe_create(ctypes.byref(self._h), ctypes.byref(opts)))
        try:
            if weights is not None:
                self.load_weights(weights)
            elif seed is not None:
                self.init_random(seed)
        except BaseException:
            self.close()
            raise

    # lifetime
    def close(self):
        """Destroy the model instance (also done when the object is collected)."""
        h = getattr(self, "_h", None)
        if h is not None and h.value:
            self._lib.moe_destroy(h)
            self._h = ctypes.c_void_p()

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _handle(self):
        if not self._h.value:
            raise ValueError("the model is closed")
        return self._h

    def _check(self, status):
        if status != _abi.MOE_OK:
            raise MoeError(status, self._lib.moe_last_error().decode(errors="replace"))

    # weights
    def load_weights(self, files):
        """Load every MoE layer's weights from safetensors files (a path, or a
        list of paths; a model.safetensors.index.json loads its shards), or
        from one GGUF file (told apart by its magic bytes)."""
        if isinstance(files, (str, bytes, os.PathLike)):
            files = [files]
        paths = [os.fsencode(os.path.abspath(os.fspath(f))) for f in files]
        if not paths:
            raise ValueError("load_weights: no files given")
        if len(paths) == 1 and _is_gguf(paths[0]):
            with self._lock:
                self._check(self._lib.moe_load_gguf(self._handle(), paths[0]))
            return
        arr = (ctypes.c_char_p * len(paths))(*paths)
        with self._lock:
            self._check(self._lib.moe_load_safetensors(self._handle(), arr, len(paths)))

    def init_random(self, seed):
        """Deterministic random weights for every MoE layer (the reference's)."""
        if not 0 <= int(seed) < 1 << 64:
            raise ValueError("seed must be in [0, 2^64), got %r" % seed)
        with self._lock:
            self._check(self._lib.moe_init_random(self._handle(), int(seed)))

    # forward
    def forward(self, x, layer=None, routing=False, training=False, noise_seed=0):
        """y = MoE layer `layer` applied to x [T, H] (or [..., H]: leading axes
        are flattened into tokens and restored on y).

        layer: a model layer index that is an MoE layer (default: the first).
        x: a real array (numpy) or a CPU torch tensor of any float dtype
        (float32, bfloat16, float16, ...); for bf16-activation models also
        uint16 bf16 bit patterns. y has x's kind and dtype: numpy in, numpy
        out; torch in, torch out. A tensor on another device is refused (the
        model runs on the CPU; nothing is copied between devices behind the
        caller's back).
        routing=True returns (y, Routing)."""
        info = self.info
        if layer is None:
            if not info.moe_layers:
                raise ValueError("%s has no MoE layers" % info.name)
            layer = info.moe_layers[0]
        layer = int(layer)
        if not 0 <= layer < 1 << 32:
            raise ValueError("layer must be a non-negative layer index, got %d" % layer)

        torch = None
        torch_dtype = None
        if _is_torch(x):
            torch = _torch()
            torch_dtype = x.dtype
            if x.device.type != "cpu":
                raise ValueError(
                    "%s runs on the CPU and x is on %s: pass x.cpu() (the binding does not "
                    "move tensors between devices)" % (info.name, x.device))
            if not (x.dtype.is_floating_point or x.dtype in (torch.int8, torch.int16,
                                                             torch.int32, torch.int64,
                                                             torch.uint8)):
                raise TypeError("x must be a real tensor, got dtype %s" % x.dtype)
            t = x.detach().contiguous()
            if t.dtype == torch.bfloat16 and info.act_dtype == "bf16":
                xa = t.view(torch.int16).numpy().view(np.uint16)
            else:
                # bf16, f16 and the rest into an f32 model: widened exactly
                xa = t.to(torch.float32).numpy()
        else:
            xa = np.asarray(x)

        H = info.hidden
        if xa.ndim == 0 or xa.shape[-1] != H:
            raise ValueError("x must have shape [..., %d] (hidden), got %s" % (H, xa.shape))
        lead = xa.shape[:-1]
        T = int(np.prod(lead, dtype=np.int64))
        bits_in = xa.dtype == np.uint16
        if bits_in and info.act_dtype != "bf16":
            raise TypeError("uint16 input means bf16 bit patterns; %s takes %s activations" %
                            (info.name, info.act_dtype))
        if not bits_in and xa.dtype.kind not in "fiu":
            raise TypeError("x must be a float array, got dtype %s" % xa.dtype)

        if info.act_dtype == "bf16":
            xin = np.ascontiguousarray(xa.reshape(T, H)) if bits_in else _bf16_bits(
                xa.reshape(T, H))
            yout = np.empty((T, H), dtype=np.uint16)
        else:
            xin = np.ascontiguousarray(xa.reshape(T, H), dtype=np.float32)
            yout = np.empty((T, H), dtype=np.float32)

        rt = None
        rt_p = None
        if routing:
            W, E = info.route_width, info.n_experts
            r = Routing()
            r.expert_ids = np.empty((T, W), dtype=np.int32)
            r.weights = np.empty((T, W), dtype=np.float32)
            r.counts = np.empty(E, dtype=np.int64)
            r.importance = np.empty(E, dtype=np.float32)
            rt = _abi.Routing(
                expert_ids=r.expert_ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                weights=r.weights.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                counts=r.counts.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                importance=r.importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            rt_p = ctypes.byref(rt)
        opts = _abi.FwdOpts(training=1 if training else 0, seed=int(noise_seed), layer=layer)

        with self._lock:
            st = self._lib.moe_forward(self._handle(), layer, xin.ctypes.data_as(ctypes.c_void_p),
                                       yout.ctypes.data_as(ctypes.c_void_p), T, rt_p,
                                       ctypes.byref(opts))
            self._check(st)

        if info.act_dtype == "bf16" and not bits_in:
            y = _bf16_to_f32(yout)
        else:
            y = yout
        y = y.reshape(lead + (H,))
        if routing:
            r.importance_cv2 = rt.importance_cv2
            r.lb_loss = rt.lb_loss
            r.z_loss = rt.z_loss
            r.n_dropped = rt.n_dropped
            W = info.route_width
            r.expert_ids = r.expert_ids.reshape(lead + (W,))
            r.weights = r.weights.reshape(lead + (W,))
        if torch is not None:
            if torch_dtype == torch.bfloat16 and info.act_dtype == "bf16":
                y = torch.from_numpy(yout.view(np.int16).reshape(lead + (H,))).view(
                    torch.bfloat16)
            else:
                y = torch.from_numpy(np.ascontiguousarray(y)).to(torch_dtype)
            if routing:
                for f in ("expert_ids", "weights", "counts", "importance"):
                    setattr(r, f, torch.from_numpy(getattr(r, f)))
        return (y, r) if routing else y

    __call__ = forward

    def __repr__(self):
        return "moegen.Model(%r, %s)" % (self.path, self.info.name)


def load(path, weights=None, seed=None, threads=0, experts=None):
    """Open model.so and create a model instance. weights: safetensors file(s)
    to load; else seed: deterministic random weights; else no weights yet
    (call load_weights or init_random before forward). threads: 0 = all cores.
    experts: (begin, end), the routed experts this instance holds (expert
    parallelism: it then runs only the experts stage); None: all."""
    return Model(path, weights=weights, seed=seed, threads=threads, experts=experts)


# The moegen command -------------------------------------------------------


def _moegen_exe(exe):
    """moegen= argument, else $MOEGEN, else the compiler the package carries
    (pip install ./python builds it into moegen/_bin), else PATH."""
    if exe:
        return exe
    env = os.environ.get("MOEGEN")
    if env:
        return env
    bundled = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bin", "moegen")
    if os.access(bundled, os.X_OK):
        return bundled
    found = shutil.which("moegen")
    if found:
        return found
    raise FileNotFoundError("the moegen command was not found: pass moegen=PATH, set MOEGEN, "
                            "install the package with its compiler (pip install ./python), "
                            "or put moegen on PATH")


def _run(args):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError("%s failed (exit %d):\n%s" % (" ".join(args), p.returncode,
                                                        (p.stderr or p.stdout).strip()))
    return p


def compile(spec, out, sets=(), moegen=None, extra=()):
    """Run `moegen SPEC -o OUT [--set K=V]...`; returns OUT. sets: a list of
    "key=value" strings or a dict. Raises RuntimeError with moegen's
    diagnostics on failure."""
    if isinstance(sets, dict):
        sets = ["%s=%s" % kv for kv in sets.items()]
    args = [_moegen_exe(moegen), os.fspath(spec), "-o", os.fspath(out)]
    for s in sets:
        args += ["--set", s]
    _run(args + list(extra))
    return os.fspath(out)


def import_config(config, out, moegen=None, extra=()):
    """Run `moegen import CONFIG.json -o SPEC`; returns SPEC."""
    _run([_moegen_exe(moegen), "import", os.fspath(config), "-o", os.fspath(out)] + list(extra))
    return os.fspath(out)


from ._st import save_safetensors  # noqa: E402 (uses _bf16_bits above)
