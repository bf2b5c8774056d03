"""ctypes mirror of runtime/moe.h, the public ABI (ABI version 6), and nothing else.

Every structure and enumeration here must match moe.h byte for byte;
python/tests/test_abi.py compiles a probe against a copy of moe.h alone and
compares sizes, offsets and enumeration values. Change both sides together.
The full model description is text (moe_describe), not a mirrored struct.
"""

import ctypes as C

ABI_VERSION = 6

# enum moe_dtype, names as the spec spells them (value = index).
DTYPES = ("f32", "bf16", "f16")

# enum moe_status, names as the C enumerators without MOE_.
STATUSES = ("OK", "ERR_ARG", "ERR_INPUT", "ERR_NOMEM", "ERR_WEIGHTS", "ERR_IO",
            "ERR_UNSUPPORTED", "ERR_DEVICE", "ERR_BUSY", "ERR_INTERNAL")
MOE_OK = 0

# enum moe_device
DEVICES = ("cpu", "cuda")

# Every enum is an int-sized C enum (all values are small and non-negative).
c_enum = C.c_int


class Info(C.Structure):
    """struct moe_info (moe.h); `size` is the library's sizeof(struct moe_info)."""
    _fields_ = [
        ("abi_version", C.c_uint32),
        ("size", C.c_uint32),
        ("name", C.c_char_p),
        ("spec_hash", C.c_char_p),
        ("hidden", C.c_uint32),
        ("intermediate", C.c_uint32),
        ("n_experts", C.c_uint32),
        ("top_k", C.c_uint32),
        ("route_width", C.c_uint32),
        ("n_shared_experts", C.c_uint32),
        ("shared_intermediate", C.c_uint32),
        ("n_layers", C.c_uint32),
        ("n_moe_layers", C.c_uint32),
        ("weight_dtype", c_enum),
        ("act_dtype", c_enum),
        ("targets", C.c_uint32),
        ("moe_layers", C.POINTER(C.c_uint32)),
        ("cpu", C.c_char_p),
    ]


class CreateOpts(C.Structure):
    """struct moe_create_opts (moe.h)."""
    _fields_ = [
        ("threads", C.c_uint32),
        ("device", c_enum),
        ("stream", C.c_void_p),
        ("expert_begin", C.c_uint32),
        ("expert_end", C.c_uint32),
        ("layer_begin", C.c_uint32),
        ("layer_end", C.c_uint32),
    ]


class FwdOpts(C.Structure):
    """struct moe_fwd_opts (moe.h)."""
    _fields_ = [
        ("training", C.c_int),
        ("seed", C.c_uint64),
        ("layer", C.c_uint32),
    ]


class Routing(C.Structure):
    """struct moe_routing (moe.h); every pointer optional."""
    _fields_ = [
        ("expert_ids", C.POINTER(C.c_int32)),
        ("weights", C.POINTER(C.c_float)),
        ("counts", C.POINTER(C.c_int64)),
        ("importance", C.POINTER(C.c_float)),
        ("importance_cv2", C.c_float),
        ("lb_loss", C.c_float),
        ("z_loss", C.c_float),
        ("n_dropped", C.c_int64),
    ]


class RouteSums(C.Structure):
    """struct moe_route_sums (moe.h): the sums moe_route_stats adds into."""
    _fields_ = [
        ("importance", C.POINTER(C.c_double)),
        ("load", C.POINTER(C.c_double)),
        ("z_sum", C.c_double),
        ("n_tokens", C.c_uint64),
    ]


# The structures test_abi.py checks: Python class -> C struct tag.
STRUCTS = {
    Info: "moe_info",
    CreateOpts: "moe_create_opts",
    FwdOpts: "moe_fwd_opts",
    Routing: "moe_routing",
    RouteSums: "moe_route_sums",
}

# The enumerations test_abi.py checks: (C value prefix, Python names in value
# order, the C count enumerator or None). A value's C name is prefix + NAME.
ENUMS = (
    ("MOE_DTYPE_", DTYPES, "MOE_DTYPE_COUNT"),
    ("MOE_DEVICE_", DEVICES, None),
    ("MOE_", STATUSES, "MOE_STATUS_COUNT"),
)


def bind(lib):
    """Declare the argument and result types of the ABI functions of lib."""
    P = C.c_void_p
    lib.moe_info.restype = C.POINTER(Info)
    lib.moe_info.argtypes = []
    lib.moe_describe.restype = C.c_size_t
    lib.moe_describe.argtypes = [C.c_char_p, C.c_size_t]
    lib.moe_create.restype = c_enum
    lib.moe_create.argtypes = [C.POINTER(P), C.POINTER(CreateOpts)]
    lib.moe_destroy.restype = None
    lib.moe_destroy.argtypes = [P]
    lib.moe_load_safetensors.restype = c_enum
    lib.moe_load_safetensors.argtypes = [P, C.POINTER(C.c_char_p), C.c_size_t]
    lib.moe_load_gguf.restype = c_enum
    lib.moe_load_gguf.argtypes = [P, C.c_char_p]
    lib.moe_init_random.restype = c_enum
    lib.moe_init_random.argtypes = [P, C.c_uint64]
    lib.moe_forward.restype = c_enum
    lib.moe_forward.argtypes = [P, C.c_uint32, P, P, C.c_size_t, C.POINTER(Routing),
                                C.POINTER(FwdOpts)]
    lib.moe_route.restype = c_enum
    lib.moe_route.argtypes = [P, C.c_uint32, P, C.c_size_t, C.POINTER(C.c_int32),
                              C.POINTER(C.c_float), C.POINTER(FwdOpts)]
    lib.moe_route_stats.restype = c_enum
    lib.moe_route_stats.argtypes = [P, C.c_uint32, P, C.c_size_t, C.POINTER(C.c_int32),
                                    C.POINTER(C.c_float), C.POINTER(FwdOpts),
                                    C.POINTER(RouteSums)]
    lib.moe_routing_from_sums.restype = c_enum
    lib.moe_routing_from_sums.argtypes = [P, C.c_uint32, C.POINTER(RouteSums),
                                          C.POINTER(Routing)]
    lib.moe_experts.restype = c_enum
    lib.moe_experts.argtypes = [P, C.c_uint32, C.POINTER(C.c_float), C.c_size_t,
                                C.POINTER(C.c_int64), C.POINTER(C.c_float),
                                C.POINTER(C.c_float)]
    lib.moe_combine.restype = c_enum
    lib.moe_combine.argtypes = [P, C.c_uint32, P, C.c_size_t, C.POINTER(C.c_int32),
                                C.POINTER(C.c_float), C.POINTER(C.c_float),
                                C.POINTER(C.c_int64), P]
    lib.moe_last_error.restype = C.c_char_p
    lib.moe_last_error.argtypes = []
    return lib
