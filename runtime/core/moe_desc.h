/* moe_desc.h: the resolved description of one MoE layer kind, shared by the
 * compiler (it is the `model` stage) and the runtime (generated code embeds it
 * as static data, the reference forward interprets it). Plain data, no
 * pointers, so it can be emitted as a constant and compared with memcmp. */
#ifndef MOE_DESC_H
#define MOE_DESC_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h" /* enum moe_dtype, enum moe_status: the public ABI */

#define MOE_DESC_VERSION 4
#define MOE_MAX_LAYERS 512
#define MOE_MAX_LEVELS 2
#define MOE_NAME_MAX 256

/* Each enum is an X-macro list: value, spec spelling. enum moe_dtype itself is
 * public (moe.h); desc.c checks that this list matches it. */
#define MOE_DTYPES(X) X(F32, "f32") X(BF16, "bf16") X(F16, "f16")
/* The FFNs' arithmetic: auto (bf16 where the weights are bf16 and the target
 * has the bf16 dot instructions, else f32), f32, bf16 (the target's bf16 dot
 * when it has one, else f32). The backend resolves it per target. */
#define MOE_COMPUTES(X) X(AUTO, "auto") X(F32, "f32") X(BF16, "bf16") X(INT8, "int8")
#define MOE_SCORES(X) X(SOFTMAX, "softmax") X(SIGMOID, "sigmoid") X(SQRTSOFTPLUS, "sqrtsoftplus")
#define MOE_NORMS(X) X(NONE, "none") X(SUM, "sum") X(LP, "lp")
#define MOE_GROUP_SCORES(X) X(MAX, "max") X(SUM_TOP2, "sum_top2")
#define MOE_CAPACITIES(X)                                                                          \
	X(NONE, "none")                                                                            \
	X(FACTOR, "factor") X(PER_EXPERT, "per_expert") X(TOKEN_FRACTION, "token_fraction")
#define MOE_PRIORITIES(X) X(POSITION, "position") X(SCORE, "score")
#define MOE_OVERFLOWS(X) X(DROP, "drop") X(PASSTHROUGH, "passthrough")
#define MOE_NOISES(X) X(NONE, "none") X(LEARNED_GAUSSIAN, "learned_gaussian") X(JITTER, "jitter")
#define MOE_APPLIES(X) X(OUTPUT, "output") X(INPUT, "input")
#define MOE_KINDS(X) X(GLU, "glu") X(MLP, "mlp") X(SINGLE_NEURON, "single_neuron")
/* The elementwise function; GLU experts apply it to the gate half. */
#define MOE_ACTS(X)                                                                                \
	X(SILU, "silu")                                                                            \
	X(GELU, "gelu") X(GELU_TANH, "gelu_tanh") X(RELU, "relu") X(SWIGLU_OAI, "swiglu_oai")
#define MOE_SHARED_GATES(X) X(NONE, "none") X(SIGMOID, "sigmoid")
#define MOE_ATTNS(X) X(NONE, "none") X(MHA, "mha") X(MLA, "mla")
/* Per-head (head_dim) or whole-projection RMS norms of q and k. */
#define MOE_QK_NORMS(X) X(NONE, "none") X(HEAD, "head") X(FULL, "full")
/* Linear-attention layers of a hybrid model (accounting only). */
#define MOE_LINEAR_ATTNS(X)                                                                        \
	X(NONE, "none") X(GATED_DELTANET, "gated_deltanet") X(LIGHTNING, "lightning")
#define MOE_FUSES(X) X(NONE, "none") X(CONCAT, "concat") X(INTERLEAVE, "interleave")
#define MOE_ORIENTS(X) X(OUT_IN, "out_in") X(IN_OUT, "in_out")
/* On-disk quantization of a weight role (dequantized at load, or kept as
 * codes when quant: says so). gptq (auto-gptq's v1 zero points, stored minus
 * one), gptq_v2, awq (gemm) and pack_quantized (compressed-tensors) are int4
 * codes packed eight to an int32 with f16/bf16 scales per group of inputs. */
#define MOE_QUANTS(X)                                                                              \
	X(NONE, "none")                                                                            \
	X(FP8_BLOCK, "fp8_block")                                                                  \
	X(MXFP4, "mxfp4")                                                                          \
	X(GPTQ, "gptq") X(GPTQ_V2, "gptq_v2") X(AWQ, "awq") X(PACK_QUANTIZED, "pack_quantized")
/* How the FFN matrices are kept in the packed panels and read by the kernels
 * (struct moe_qfmt): f32/bf16/f16 per dtype.weights, or integer codes with
 * one scale (and an offset) per group of inputs of one output. */
#define MOE_QFORMATS(X)                                                                            \
	X(NONE, "none") X(INT8, "int8") X(INT4, "int4") X(FP8, "fp8") X(MXFP4, "mxfp4")
/* The FFN matrix sets a storage format applies to: one up panel (gate and up
 * read together) and one down panel per FFN. */
#define MOE_QMATS(X)                                                                               \
	X(UP, "up") X(DOWN, "down") X(SHARED_UP, "shared_up") X(SHARED_DOWN, "shared_down")

#define MOE_ENUM_VALUE_(prefix, v, s) prefix##v,
#define MOE_DEFINE_ENUM(tag, prefix, list) enum tag { list(MOE_ENUM_X_##prefix) prefix##COUNT }

#define MOE_ENUM_X_MOE_COMPUTE_(v, s) MOE_COMPUTE_##v,
#define MOE_ENUM_X_MOE_SCORE_(v, s) MOE_SCORE_##v,
#define MOE_ENUM_X_MOE_NORM_(v, s) MOE_NORM_##v,
#define MOE_ENUM_X_MOE_GROUP_SCORE_(v, s) MOE_GROUP_SCORE_##v,
#define MOE_ENUM_X_MOE_CAPACITY_(v, s) MOE_CAPACITY_##v,
#define MOE_ENUM_X_MOE_PRIORITY_(v, s) MOE_PRIORITY_##v,
#define MOE_ENUM_X_MOE_OVERFLOW_(v, s) MOE_OVERFLOW_##v,
#define MOE_ENUM_X_MOE_NOISE_(v, s) MOE_NOISE_##v,
#define MOE_ENUM_X_MOE_APPLY_(v, s) MOE_APPLY_##v,
#define MOE_ENUM_X_MOE_KIND_(v, s) MOE_KIND_##v,
#define MOE_ENUM_X_MOE_ACT_(v, s) MOE_ACT_##v,
#define MOE_ENUM_X_MOE_SHARED_GATE_(v, s) MOE_SHARED_GATE_##v,
#define MOE_ENUM_X_MOE_ATTN_(v, s) MOE_ATTN_##v,
#define MOE_ENUM_X_MOE_QK_NORM_(v, s) MOE_QK_NORM_##v,
#define MOE_ENUM_X_MOE_LINEAR_ATTN_(v, s) MOE_LINEAR_ATTN_##v,
#define MOE_ENUM_X_MOE_FUSE_(v, s) MOE_FUSE_##v,
#define MOE_ENUM_X_MOE_ORIENT_(v, s) MOE_ORIENT_##v,
#define MOE_ENUM_X_MOE_QUANT_(v, s) MOE_QUANT_##v,
#define MOE_ENUM_X_MOE_QFORMAT_(v, s) MOE_QFORMAT_##v,
#define MOE_ENUM_X_MOE_QMAT_(v, s) MOE_QMAT_##v,

/* The router modes are the rows of moe_modes.def. */
enum moe_mode {
#define MOE_MODE(v, s, targets, family, pack) MOE_MODE_##v,
#include "moe_modes.def"
#undef MOE_MODE
	MOE_MODE_COUNT
};
MOE_DEFINE_ENUM(moe_compute, MOE_COMPUTE_, MOE_COMPUTES);
MOE_DEFINE_ENUM(moe_score, MOE_SCORE_, MOE_SCORES);
MOE_DEFINE_ENUM(moe_norm, MOE_NORM_, MOE_NORMS);
MOE_DEFINE_ENUM(moe_group_score, MOE_GROUP_SCORE_, MOE_GROUP_SCORES);
MOE_DEFINE_ENUM(moe_capacity, MOE_CAPACITY_, MOE_CAPACITIES);
MOE_DEFINE_ENUM(moe_priority, MOE_PRIORITY_, MOE_PRIORITIES);
MOE_DEFINE_ENUM(moe_overflow, MOE_OVERFLOW_, MOE_OVERFLOWS);
MOE_DEFINE_ENUM(moe_noise, MOE_NOISE_, MOE_NOISES);
MOE_DEFINE_ENUM(moe_apply, MOE_APPLY_, MOE_APPLIES);
MOE_DEFINE_ENUM(moe_kind, MOE_KIND_, MOE_KINDS);
MOE_DEFINE_ENUM(moe_act, MOE_ACT_, MOE_ACTS);
MOE_DEFINE_ENUM(moe_shared_gate, MOE_SHARED_GATE_, MOE_SHARED_GATES);
MOE_DEFINE_ENUM(moe_attn, MOE_ATTN_, MOE_ATTNS);
MOE_DEFINE_ENUM(moe_qk_norm, MOE_QK_NORM_, MOE_QK_NORMS);
MOE_DEFINE_ENUM(moe_linear_attn, MOE_LINEAR_ATTN_, MOE_LINEAR_ATTNS);
MOE_DEFINE_ENUM(moe_fuse, MOE_FUSE_, MOE_FUSES);
MOE_DEFINE_ENUM(moe_orient, MOE_ORIENT_, MOE_ORIENTS);
MOE_DEFINE_ENUM(moe_quant, MOE_QUANT_, MOE_QUANTS);
MOE_DEFINE_ENUM(moe_qformat, MOE_QFORMAT_, MOE_QFORMATS);
MOE_DEFINE_ENUM(moe_qmat, MOE_QMAT_, MOE_QMATS);

/* A kept-quantized storage format. Over a [rows, K] matrix, input k of
 * output row n is code[n, k] and group g = k / group has scale s[n, g] and
 * offset o[n, g]: W[n, k] = fl(code * s) + o, computed in f32 (every product
 * of a code and an f16-precision scale is exact).
 *   int8: signed codes -128..127, o = 0 (symmetric; per channel when
 *         group == K);
 *   int4: unsigned codes 0..15, o = -z * s with a zero point z per group
 *         (zero = 1) or z = 8 (zero = 0, symmetric);
 *   fp8: e4m3 codes (OCP "fn", as DeepSeek-V3 stores them), W = e4m3 * s;
 *   mxfp4: E2M1 codes (two per byte, as gpt-oss stores them) in groups of 32,
 *         W = e2m1 * s with s the group's power of two (E8M0). */
struct moe_qfmt {
	enum moe_qformat kind;
	uint32_t group; /* inputs per scale; resolved: divides K, never 0 */
	uint8_t zero;   /* int4: a zero point per group */
};

/* Weight roles. Canonical (reference) shapes, f32, row-major, nn.Linear
 * [out, in] orientation; E = routed experts after split, I = expert width after
 * split, Is = shared width (count * intermediate), G = hierarchical groups,
 * S = slots (E * slots_per_expert), N = product-key experts, R = sub_keys,
 * Q = heads * query_dim. The loader converts from the on-disk layout. */
#define MOE_ROLES(X)                                                                               \
	X(ROUTER, "router")                 /* [E, H] (hierarchical: level-2 rows) */              \
	X(ROUTER_BIAS, "router_bias")       /* [E] */                                              \
	X(SELECT_BIAS, "select_bias")       /* [E] selection only */                               \
	X(NOISE, "noise")                   /* [E, H] learned gaussian noise projection */         \
	X(GROUP_ROUTER, "group_router")     /* [G, H] hierarchical level 1 */                      \
	X(GATE, "gate")                     /* [E, I, H] */                                        \
	X(UP, "up")                         /* [E, I, H] (mlp: the first layer) */                 \
	X(GATE_UP, "gate_up")               /* fused on disk only; canonical is GATE + UP */       \
	X(DOWN, "down")                     /* [E, H, I] */                                        \
	X(GATE_BIAS, "gate_bias")           /* [E, I] */                                           \
	X(UP_BIAS, "up_bias")               /* [E, I] */                                           \
	X(GATE_UP_BIAS, "gate_up_bias")     /* fused on disk only */                               \
	X(DOWN_BIAS, "down_bias")           /* [E, H] */                                           \
	X(SHARED_GATE, "shared_gate")       /* [Is, H] */                                          \
	X(SHARED_UP, "shared_up")           /* [Is, H] */                                          \
	X(SHARED_GATE_UP, "shared_gate_up") /* fused on disk only */                               \
	X(SHARED_DOWN, "shared_down")       /* [H, Is] */                                          \
	X(SHARED_EXPERT_GATE, "shared_expert_gate") /* [1, H] */                                   \
	X(SOFT_SLOTS, "soft_slots")                 /* [S, H] slot parameters, one row per slot */ \
	X(SOFT_SCALE, "soft_scale")                 /* [1] learned scale */                        \
	X(PK_QUERY, "pk_query")                     /* [Q, H] the query projection */              \
	X(PK_QUERY_BIAS, "pk_query_bias")           /* [Q] */                                      \
	X(PK_KEYS, "pk_keys")                       /* [2, R, query_dim/2] the two sub-key sets */ \
	X(NEURON_U, "neuron_u")                     /* [N, H] single-neuron input vectors */       \
	X(NEURON_V, "neuron_v")                     /* [N, H] single-neuron output vectors */      \
	X(OUTPUT_BIAS, "output_bias")               /* [H] added once after combining (JetMoE) */  \
	X(PK_BN_WEIGHT, "pk_bn_weight")             /* [Q] query BatchNorm (eval): gamma */        \
	X(PK_BN_BIAS, "pk_bn_bias")                 /* [Q] beta */                                 \
	X(PK_BN_MEAN, "pk_bn_mean")                 /* [Q] running mean */                         \
	X(PK_BN_VAR, "pk_bn_var")                   /* [Q] running variance */                     \
	X(SOFT_GAMMA, "soft_gamma")                 /* [H] soft: per-channel scale of x-hat */

#define MOE_ENUM_X_MOE_ROLE_(v, s) MOE_ROLE_##v,
MOE_DEFINE_ENUM(moe_role, MOE_ROLE_, MOE_ROLES);

/* How one role is stored on disk. A name without {expert} holds all experts
 * stacked along the first axis (or, with row_blocked, as E blocks of rows). */
struct moe_layout {
	enum moe_orient orient; /* out_in = nn.Linear [out, in]; in_out = transposed */
	enum moe_fuse fuse;     /* gate_up only: concat (gate first) or interleave */
	uint8_t row_blocked;    /* stacked as [E * rows, cols] (DBRX) */
	uint8_t explicit_;      /* set in the spec, not defaulted */
	/* fp8_block: e4m3 data with an f32 scale tensor of [ceil(rows/b0),
	 * ceil(cols/b1)] multiplied in (DeepSeek-V3 weight_scale_inv); mxfp4:
	 * u8 blocks [.., rows, cols/32, 16] (low nibble first) with u8 E8M0 scales
	 * [.., rows, cols/32] (gpt-oss). The scale tensor's name is in
	 * moe_desc.scale_names. The int4 kinds (moe_quant_int4) hold [1, group]
	 * in quant_block, group 0 meaning one group per output channel; their
	 * zero-point (and g_idx) tensors are named beside the codes. */
	enum moe_quant quant;
	uint32_t quant_block[2];
};

struct moe_level {
	uint32_t groups; /* level 1: number of groups (gates over groups) */
	uint32_t top_k;
};

struct moe_desc {
	uint32_t version; /* MOE_DESC_VERSION */
	char name[MOE_NAME_MAX];

	/* model */
	uint32_t hidden; /* H */
	uint32_t n_layers;
	uint32_t n_moe_layers;
	uint32_t moe_layers[MOE_MAX_LAYERS]; /* ascending layer indices */
	uint32_t dense_intermediate;         /* 0: no dense layers described */
	enum moe_kind dense_kind;            /* glu | mlp */
	enum moe_act dense_act;
	/* accounting only */
	uint32_t vocab;
	uint8_t tied_embeddings;
	enum moe_attn attn;
	uint32_t attn_heads, attn_kv_heads, attn_head_dim;
	uint32_t mla_q_lora_rank, mla_kv_lora_rank, mla_qk_nope_dim, mla_qk_rope_dim, mla_v_dim;
	uint8_t attn_qkv_bias, attn_out_bias; /* q, k, v / output projection biases */
	uint8_t attn_sinks;                   /* one learned sink logit per head */
	uint8_t attn_output_gate;             /* q projection also yields a gate per channel */
	enum moe_qk_norm attn_qk_norm;
	uint8_t norm_bias; /* the model's norms are LayerNorms (weight and bias) */
	/* linear attention in n_linear_layers of the layers (the rest use the
	 * attention above); gated_deltanet: key/value heads and head dims and the
	 * depthwise conv kernel; lightning: heads and head_dim in the value fields */
	enum moe_linear_attn linear_attn;
	uint32_t n_linear_layers;
	uint32_t lin_key_heads, lin_key_dim, lin_value_heads, lin_value_dim, lin_conv;

	/* dtypes */
	enum moe_dtype weight_dtype;
	enum moe_dtype act_dtype; /* f32 | bf16 */
	enum moe_compute compute; /* the FFNs' arithmetic as asked (resolved per target) */

	/* router */
	enum moe_mode mode;
	enum moe_score score;
	uint32_t top_k; /* after split; dense: E; expert_choice: 0 */
	enum moe_norm norm;
	float norm_eps; /* w /= max(sum + eps, norm_min) */
	float norm_min;
	float norm_p; /* lp */
	float scale;  /* routed scaling factor, applied after normalization */
	uint8_t router_bias;
	uint8_t select_bias;
	uint32_t n_groups; /* 1: no group limit */
	uint32_t group_top;
	enum moe_group_score group_score;
	enum moe_capacity capacity;
	float capacity_factor; /* C = ceil(top_k * T * factor / E) (floor if capacity_floor) */
	uint32_t capacity_per_expert;
	float capacity_token_fraction; /* C = ceil(T * fraction) (NLLB eval) */
	uint32_t capacity_min;         /* C = max(C, capacity_min) (Hunyuan: top_k) */
	uint8_t capacity_floor;        /* round the factor formula down (Hunyuan) */
	enum moe_priority priority;
	enum moe_overflow overflow;
	enum moe_noise noise;
	float jitter_eps; /* noise jitter: x *= U(1 - eps, 1 + eps) */
	enum moe_apply apply_to;
	uint8_t output_bias; /* one [H] bias added to the layer output (JetMoE) */

	/* mode blocks */
	uint32_t n_levels; /* hierarchical: 2 */
	struct moe_level levels[MOE_MAX_LEVELS];
	float ec_capacity_factor;       /* expert_choice: C = ceil(T * f / E) */
	uint32_t soft_slots_per_expert; /* soft */
	/* soft: tokens per group, each group with its own S slots (the
	 * dispatch softmax over its tokens, the combine over its slot
	 * outputs); 0: one group of all the tokens of the call */
	uint32_t soft_group;
	float sparsemixer_eps; /* sparsemixer (router_jitter_noise) */
	float top_p;           /* top_p: the cumulative probability the chosen experts reach */
	uint32_t pk_sub_keys;  /* R = sqrt(N) */
	uint32_t pk_heads;
	uint32_t pk_top_k;
	uint32_t pk_query_dim;   /* d, split in two halves of d/2 */
	enum moe_score pk_score; /* softmax | sigmoid */

	/* experts (after split: n_experts = split * declared count, width / split,
	 * top_k * split) */
	enum moe_kind kind;
	uint32_t n_experts;    /* E */
	uint32_t intermediate; /* I */
	enum moe_act act;
	float act_alpha; /* swiglu_oai */
	float act_limit; /* swiglu_oai */
	uint8_t expert_bias;
	uint32_t split; /* m, already applied to the fields above */

	/* shared experts, fused into one FFN of width shared_count * shared_intermediate */
	uint32_t shared_count;
	uint32_t shared_intermediate;
	enum moe_kind shared_kind;
	enum moe_act shared_act;
	enum moe_shared_gate shared_gate;

	/* weights on disk */
	char names[MOE_ROLE_COUNT][MOE_NAME_MAX]; /* "" when absent */
	struct moe_layout layouts[MOE_ROLE_COUNT];
	char scale_names[MOE_ROLE_COUNT][MOE_NAME_MAX]; /* quantized roles' scale tensors */

	/* appended fields */
	/* product_key: an eval-mode BatchNorm on the query (roles PK_BN_*), folded
	 * into the query projection at load (moe_pk_fold_bn) */
	uint8_t pk_query_bn;
	/* capacity: the normalization (norm, eps, min) and the scale apply to the
	 * weights that survive the capacity, after dropping (NLLB) */
	uint8_t capacity_norm_after_drop;
	float pk_bn_eps; /* product_key query BatchNorm: (q - mean) / sqrt(var + eps) */
	/* product_key as PEER-pytorch: a sub-key set per head (PK_KEYS [heads,
	 * R, 2, d/2]), ReLU scores of the k retrieved sums (non-competing, in
	 * place of pk_score), and the top-k of each sub-key half (0: pk_top_k) */
	uint8_t pk_keys_per_head;
	uint8_t pk_score_relu;
	uint32_t pk_sub_top_k;
	/* the FFN matrices kept quantized (kind none: dtype.weights) */
	struct moe_qfmt qfmt[MOE_QMAT_COUNT];
	/* learned gaussian noise: the standard deviation is softplus(x . NOISE_e)
	 * + noise_eps (tensor2tensor's noise_epsilon) */
	float noise_eps;
	/* statistics: importance[e] sums the routing weights of e's kept slots
	 * (Shazeer 2017's sparse gates) instead of the router probability */
	uint8_t importance_sparse;
	/* soft: a per-channel scale SOFT_GAMMA [H] of the normalized tokens in
	 * place of the scalar SOFT_SCALE */
	uint8_t soft_gamma;
};

/* 1 for the int4 checkpoint layouts (gptq, gptq_v2, awq, pack_quantized). */
static inline int moe_quant_int4(enum moe_quant q)
{
	return q == MOE_QUANT_GPTQ || q == MOE_QUANT_GPTQ_V2 || q == MOE_QUANT_AWQ ||
	       q == MOE_QUANT_PACK_QUANTIZED;
}

/* Name tables, indexed by enum value; defined in desc.c. */
extern const char *const moe_dtype_names[MOE_DTYPE_COUNT];
extern const char *const moe_mode_names[MOE_MODE_COUNT];
extern const char *const moe_compute_names[MOE_COMPUTE_COUNT];
extern const char *const moe_score_names[MOE_SCORE_COUNT];
extern const char *const moe_norm_names[MOE_NORM_COUNT];
extern const char *const moe_group_score_names[MOE_GROUP_SCORE_COUNT];
extern const char *const moe_capacity_names[MOE_CAPACITY_COUNT];
extern const char *const moe_priority_names[MOE_PRIORITY_COUNT];
extern const char *const moe_overflow_names[MOE_OVERFLOW_COUNT];
extern const char *const moe_noise_names[MOE_NOISE_COUNT];
extern const char *const moe_apply_names[MOE_APPLY_COUNT];
extern const char *const moe_kind_names[MOE_KIND_COUNT];
extern const char *const moe_act_names[MOE_ACT_COUNT];
extern const char *const moe_shared_gate_names[MOE_SHARED_GATE_COUNT];
extern const char *const moe_attn_names[MOE_ATTN_COUNT];
extern const char *const moe_qk_norm_names[MOE_QK_NORM_COUNT];
extern const char *const moe_linear_attn_names[MOE_LINEAR_ATTN_COUNT];
extern const char *const moe_fuse_names[MOE_FUSE_COUNT];
extern const char *const moe_orient_names[MOE_ORIENT_COUNT];
extern const char *const moe_quant_names[MOE_QUANT_COUNT];
extern const char *const moe_qformat_names[MOE_QFORMAT_COUNT];
extern const char *const moe_qmat_names[MOE_QMAT_COUNT];
extern const char *const moe_role_names[MOE_ROLE_COUNT];

/* Index of `s` in a name table of n entries, or -1. */
int moe_enum_lookup(const char *const *names, int n, const char *s);

/* Derived sizes. */
uint32_t moe_desc_route_width(const struct moe_desc *d); /* (id, weight) slots per token */
/* 1 when the FFNs compute in bf16 on a target with the bf16 dot instructions
 * (dtype.compute bf16, or auto with bf16 weights). */
int moe_desc_bf16_compute(const struct moe_desc *d);
/* The bound on max |y - y_ref| / (the output's scale: the largest |y_ref| or
 * magnitude of a term it sums, moe_ref_out_err) of bf16 compute against the
 * f32 reference (x and h rounded to bf16, 2^-9 relative each, before exact
 * products summed in f32). */
#define MOE_BF16_COMPUTE_TOL (1.0 / 64.0)
/* 1 when the FFNs compute in int8 on a target with the int8 dot instructions
 * (dtype.compute int8: activations quantized per row, symmetric, to int8;
 * the kept int8/int4 codes multiplied and summed exactly in int32 per group). */
int moe_desc_int8_compute(const struct moe_desc *d);
/* The bound on max |y - y_ref| / (the output's scale, as above) of int8
 * compute against the f32 reference on the dequantized weights: x and h each rounded to 1/254 of
 * their row's largest magnitude, the products then exact. */
#define MOE_INT8_COMPUTE_TOL (1.0 / 16.0)
/* The output bound of d's FFN arithmetic where the target has its dot
 * instructions: the int8 or bf16 bound, or f32_tol (compute f32). */
double moe_desc_compute_tol(const struct moe_desc *d, double f32_tol);
uint32_t moe_desc_shared_width(const struct moe_desc *d);
/* ceil(num * v / den), or the floor with round_down, where v is the decimal a
 * description float was written as (a capacity factor 0.3 is 3/10, not the
 * f32 0.300000012): exact rational arithmetic, so a product that lands on an
 * integer is that integer. 0 unless v, num and den are positive; UINT64_MAX
 * past 2^64. Every capacity (token choice's factor and fraction, expert
 * choice) is computed with it, in the reference and the runtimes alike. */
uint64_t moe_desc_scaled_count(float v, uint64_t num, uint64_t den, int round_down);
/* 1 when any FFN matrix is kept quantized (d->qfmt). */
int moe_desc_quantized(const struct moe_desc *d);
/* The matrix set a role belongs to (gate, up, down, shared_*), or -1. */
int moe_role_qmat(enum moe_role r);
uint64_t moe_desc_pk_experts(const struct moe_desc *d); /* R * R */
/* product_key: the top-k taken of each sub-key half (pk_sub_top_k, or pk_top_k) */
uint32_t moe_desc_pk_sub_top_k(const struct moe_desc *d);
/* Number of rows and columns of a role's canonical tensor, per expert where the
 * role is per expert (*per_expert set), else for the whole tensor. Returns 0
 * when the role is not used by this description. */
int moe_desc_role_shape(const struct moe_desc *d, enum moe_role r, uint64_t *rows, uint64_t *cols,
			int *per_expert);
/* A one-line-per-field text dump (`moegen -d model`, moe_describe()). Returns
 * the length of the whole text (like snprintf). Floats are printed with the
 * fewest digits that read back to the same value. */
size_t moe_desc_dump(const struct moe_desc *d, char *buf, size_t cap);
/* The inverse of moe_desc_dump: parse its text into *d (zeroed first; fields
 * the text leaves out stay zero, as the dump leaves out only unused ones).
 * Returns 0, or -1 with a message naming the line in err. */
int moe_desc_parse(const char *text, struct moe_desc *d, char *err, size_t cap);

#endif
