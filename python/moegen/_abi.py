"""ctypes mirror of runtime/moe.h, moe_ref.h and moe_desc.h (ABI version 1).

Every structure and enumeration here must match the C headers byte for byte;
python/tests/test_abi.py compiles a probe against the headers and compares
sizes, offsets and enumeration values. Change both sides together.
"""

import ctypes as C

ABI_VERSION = 1
DESC_VERSION = 2
MAX_LAYERS = 512
MAX_LEVELS = 2
NAME_MAX = 256

# Enumerations, in the order of the X-macro lists of moe_desc.h (value = index).
DTYPES = ("f32", "bf16", "f16")
MODES = ("token_choice", "dense", "expert_choice", "soft", "hierarchical",
         "product_key", "sparsemixer")
SCORES = ("softmax", "sigmoid", "sqrtsoftplus")
NORMS = ("none", "sum", "lp")
GROUP_SCORES = ("max", "sum_top2")
CAPACITIES = ("none", "factor", "per_expert", "token_fraction")
PRIORITIES = ("position", "score")
OVERFLOWS = ("drop", "passthrough")
NOISES = ("none", "learned_gaussian", "jitter")
APPLIES = ("output", "input")
KINDS = ("glu", "mlp", "single_neuron")
ACTS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
SHARED_GATES = ("none", "sigmoid")
ATTNS = ("none", "mha", "mla")
FUSES = ("none", "concat", "interleave")
ORIENTS = ("out_in", "in_out")
QUANTS = ("none", "fp8_block", "mxfp4")
ROLES = ("router", "router_bias", "select_bias", "noise", "group_router", "gate", "up",
         "gate_up", "down", "gate_bias", "up_bias", "gate_up_bias", "down_bias",
         "shared_gate", "shared_up", "shared_gate_up", "shared_down",
         "shared_expert_gate", "soft_slots", "soft_scale", "pk_query", "pk_query_bias",
         "pk_keys", "neuron_u", "neuron_v", "output_bias")

# enum moe_status (moe_ref.h), names as the C enumerators without MOE_.
STATUSES = ("OK", "ERR_ARG", "ERR_INPUT", "ERR_NOMEM", "ERR_WEIGHTS", "ERR_IO",
            "ERR_UNSUPPORTED", "ERR_DEVICE", "ERR_BUSY", "ERR_INTERNAL")
MOE_OK = 0

# enum moe_device (moe.h)
DEVICES = ("cpu", "cuda")

# Every enum is an int-sized C enum (all values are small and non-negative).
c_enum = C.c_int


class Layout(C.Structure):
    _fields_ = [
        ("orient", c_enum),
        ("fuse", c_enum),
        ("row_blocked", C.c_uint8),
        ("explicit_", C.c_uint8),
        ("quant", c_enum),
        ("quant_block", C.c_uint32 * 2),
    ]


class Level(C.Structure):
    _fields_ = [("groups", C.c_uint32), ("top_k", C.c_uint32)]


class Desc(C.Structure):
    """struct moe_desc: the resolved description embedded in every model.so."""
    _fields_ = [
        ("version", C.c_uint32),
        ("name", C.c_char * NAME_MAX),
        # model
        ("hidden", C.c_uint32),
        ("n_layers", C.c_uint32),
        ("n_moe_layers", C.c_uint32),
        ("moe_layers", C.c_uint32 * MAX_LAYERS),
        ("dense_intermediate", C.c_uint32),
        ("dense_kind", c_enum),
        ("dense_act", c_enum),
        ("vocab", C.c_uint32),
        ("tied_embeddings", C.c_uint8),
        ("attn", c_enum),
        ("attn_heads", C.c_uint32),
        ("attn_kv_heads", C.c_uint32),
        ("attn_head_dim", C.c_uint32),
        ("mla_q_lora_rank", C.c_uint32),
        ("mla_kv_lora_rank", C.c_uint32),
        ("mla_qk_nope_dim", C.c_uint32),
        ("mla_qk_rope_dim", C.c_uint32),
        ("mla_v_dim", C.c_uint32),
        # dtypes
        ("weight_dtype", c_enum),
        ("act_dtype", c_enum),
        # router
        ("mode", c_enum),
        ("score", c_enum),
        ("top_k", C.c_uint32),
        ("norm", c_enum),
        ("norm_eps", C.c_float),
        ("norm_min", C.c_float),
        ("norm_p", C.c_float),
        ("scale", C.c_float),
        ("router_bias", C.c_uint8),
        ("select_bias", C.c_uint8),
        ("n_groups", C.c_uint32),
        ("group_top", C.c_uint32),
        ("group_score", c_enum),
        ("capacity", c_enum),
        ("capacity_factor", C.c_float),
        ("capacity_per_expert", C.c_uint32),
        ("capacity_token_fraction", C.c_float),
        ("capacity_min", C.c_uint32),
        ("capacity_floor", C.c_uint8),
        ("priority", c_enum),
        ("overflow", c_enum),
        ("noise", c_enum),
        ("jitter_eps", C.c_float),
        ("apply_to", c_enum),
        ("output_bias", C.c_uint8),
        # mode blocks
        ("n_levels", C.c_uint32),
        ("levels", Level * MAX_LEVELS),
        ("ec_capacity_factor", C.c_float),
        ("soft_slots_per_expert", C.c_uint32),
        ("sparsemixer_eps", C.c_float),
        ("pk_sub_keys", C.c_uint32),
        ("pk_heads", C.c_uint32),
        ("pk_top_k", C.c_uint32),
        ("pk_query_dim", C.c_uint32),
        ("pk_score", c_enum),
        # experts
        ("kind", c_enum),
        ("n_experts", C.c_uint32),
        ("intermediate", C.c_uint32),
        ("act", c_enum),
        ("act_alpha", C.c_float),
        ("act_limit", C.c_float),
        ("expert_bias", C.c_uint8),
        ("split", C.c_uint32),
        # shared experts
        ("shared_count", C.c_uint32),
        ("shared_intermediate", C.c_uint32),
        ("shared_kind", c_enum),
        ("shared_act", c_enum),
        ("shared_gate", c_enum),
        # weights on disk
        ("names", (C.c_char * NAME_MAX) * len(ROLES)),
        ("layouts", Layout * len(ROLES)),
        ("scale_names", (C.c_char * NAME_MAX) * len(ROLES)),
        # appended fields
        ("pk_query_bn", C.c_uint8),
        ("capacity_norm_after_drop", C.c_uint8),
    ]


class Info(C.Structure):
    """struct moe_info (moe.h)."""
    _fields_ = [
        ("abi_version", C.c_uint32),
        ("name", C.c_char_p),
        ("desc", C.POINTER(Desc)),
        ("hidden", C.c_uint32),
        ("n_experts", C.c_uint32),
        ("top_k", C.c_uint32),
        ("route_width", C.c_uint32),
        ("n_layers", C.c_uint32),
        ("n_moe_layers", C.c_uint32),
        ("weight_dtype", c_enum),
        ("act_dtype", c_enum),
        ("targets", C.c_uint32),
        ("spec_hash", C.c_char_p),
        ("cpu", C.c_char_p),
    ]


class CreateOpts(C.Structure):
    """struct moe_create_opts (moe.h)."""
    _fields_ = [
        ("threads", C.c_uint32),
        ("device", c_enum),
        ("stream", C.c_void_p),
    ]


class FwdOpts(C.Structure):
    """struct moe_fwd_opts (moe_ref.h)."""
    _fields_ = [
        ("training", C.c_int),
        ("seed", C.c_uint64),
        ("layer", C.c_uint32),
    ]


class Routing(C.Structure):
    """struct moe_routing (moe_ref.h); every pointer optional."""
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


# The structures test_abi.py checks: Python class -> C struct tag.
STRUCTS = {
    Layout: "moe_layout",
    Level: "moe_level",
    Desc: "moe_desc",
    Info: "moe_info",
    CreateOpts: "moe_create_opts",
    FwdOpts: "moe_fwd_opts",
    Routing: "moe_routing",
}

# The enumerations test_abi.py checks: (C X-macro list, C value prefix, Python names).
ENUMS = (
    ("MOE_DTYPES", "MOE_DTYPE_", DTYPES),
    ("MOE_MODES", "MOE_MODE_", MODES),
    ("MOE_SCORES", "MOE_SCORE_", SCORES),
    ("MOE_NORMS", "MOE_NORM_", NORMS),
    ("MOE_GROUP_SCORES", "MOE_GROUP_SCORE_", GROUP_SCORES),
    ("MOE_CAPACITIES", "MOE_CAPACITY_", CAPACITIES),
    ("MOE_PRIORITIES", "MOE_PRIORITY_", PRIORITIES),
    ("MOE_OVERFLOWS", "MOE_OVERFLOW_", OVERFLOWS),
    ("MOE_NOISES", "MOE_NOISE_", NOISES),
    ("MOE_APPLIES", "MOE_APPLY_", APPLIES),
    ("MOE_KINDS", "MOE_KIND_", KINDS),
    ("MOE_ACTS", "MOE_ACT_", ACTS),
    ("MOE_SHARED_GATES", "MOE_SHARED_GATE_", SHARED_GATES),
    ("MOE_ATTNS", "MOE_ATTN_", ATTNS),
    ("MOE_FUSES", "MOE_FUSE_", FUSES),
    ("MOE_ORIENTS", "MOE_ORIENT_", ORIENTS),
    ("MOE_QUANTS", "MOE_QUANT_", QUANTS),
    ("MOE_ROLES", "MOE_ROLE_", ROLES),
)


def bind(lib):
    """Declare the argument and result types of the ABI functions of lib."""
    P = C.c_void_p
    lib.moe_info.restype = C.POINTER(Info)
    lib.moe_info.argtypes = []
    lib.moe_create.restype = c_enum
    lib.moe_create.argtypes = [C.POINTER(P), C.POINTER(CreateOpts)]
    lib.moe_destroy.restype = None
    lib.moe_destroy.argtypes = [P]
    lib.moe_load_safetensors.restype = c_enum
    lib.moe_load_safetensors.argtypes = [P, C.POINTER(C.c_char_p), C.c_size_t]
    lib.moe_init_random.restype = c_enum
    lib.moe_init_random.argtypes = [P, C.c_uint64]
    lib.moe_forward.restype = c_enum
    lib.moe_forward.argtypes = [P, C.c_uint32, P, P, C.c_size_t, C.POINTER(Routing),
                                C.POINTER(FwdOpts)]
    lib.moe_last_error.restype = C.c_char_p
    lib.moe_last_error.argtypes = []
    return lib
