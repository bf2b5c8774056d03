/* spec_check.c: the `model` stage. Walks the spec document against the schema
 * of docs/spec.md (a table per mapping), reports every error with its
 * location (and a note at the other fact of a cross-field rule), then
 * resolves the spec into struct moe_desc: defaults, split, layer list. */
#include "moegen.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

/* Sanity bounds: far above any real model, low enough that every derived
 * size below fits its type. */
#define MAX_HIDDEN (1u << 20)
#define MAX_WIDTH (1u << 20)   /* expert, shared and dense intermediate */
#define MAX_EXPERTS (1u << 24) /* after split */
#define MAX_SPLIT (1u << 10)
#define MAX_SHARED (1u << 10)
#define MAX_VOCAB (1u << 24)
#define MAX_DIM (1u << 16)      /* attention sizes, heads, query dim, slots */
#define MAX_SUB_KEYS (1u << 12) /* sub_keys^2 <= MAX_EXPERTS */
#define MAX_CAPACITY (1u << 30)
#define MAX_FACTOR 1e6
#define MAX_EXPERT_PARAMS 281474976710656.0 /* 2^48 routed weights per layer */

/* Every key of the schema, with its dotted path (the name in messages). */
#define SLOTS(X)                                                                                   \
	X(MOEGEN, "moegen")                                                                        \
	X(NAME, "name")                                                                            \
	X(MODEL, "model")                                                                          \
	X(HIDDEN, "model.hidden")                                                                  \
	X(LAYERS, "model.layers")                                                                  \
	X(MOE_LAYERS, "model.moe_layers")                                                          \
	X(ML_FIRST, "model.moe_layers.first")                                                      \
	X(ML_EVERY, "model.moe_layers.every")                                                      \
	X(DENSE, "model.dense_ffn")                                                                \
	X(DENSE_I, "model.dense_ffn.intermediate")                                                 \
	X(DENSE_ACT, "model.dense_ffn.activation")                                                 \
	X(DENSE_KIND, "model.dense_ffn.kind")                                                      \
	X(VOCAB, "model.vocab")                                                                    \
	X(TIED, "model.tied_embeddings")                                                           \
	X(ATTN, "model.attention")                                                                 \
	X(ATTN_KIND, "model.attention.kind")                                                       \
	X(ATTN_HEADS, "model.attention.heads")                                                     \
	X(ATTN_KV, "model.attention.kv_heads")                                                     \
	X(ATTN_HD, "model.attention.head_dim")                                                     \
	X(MLA_Q, "model.attention.q_lora_rank")                                                    \
	X(MLA_KV, "model.attention.kv_lora_rank")                                                  \
	X(MLA_NOPE, "model.attention.qk_nope_head_dim")                                            \
	X(MLA_ROPE, "model.attention.qk_rope_head_dim")                                            \
	X(MLA_V, "model.attention.v_head_dim")                                                     \
	X(ATTN_QKV_BIAS, "model.attention.qkv_bias")                                               \
	X(ATTN_OUT_BIAS, "model.attention.out_bias")                                               \
	X(ATTN_SINKS, "model.attention.sinks")                                                     \
	X(ATTN_GATE, "model.attention.output_gate")                                                \
	X(ATTN_QKN, "model.attention.qk_norm")                                                     \
	X(LIN, "model.attention.linear")                                                           \
	X(LIN_KIND, "model.attention.linear.kind")                                                 \
	X(LIN_LAYERS, "model.attention.linear.layers")                                             \
	X(LIN_HEADS, "model.attention.linear.heads")                                               \
	X(LIN_HD, "model.attention.linear.head_dim")                                               \
	X(LIN_KH, "model.attention.linear.key_heads")                                              \
	X(LIN_KD, "model.attention.linear.key_head_dim")                                           \
	X(LIN_CONV, "model.attention.linear.conv_kernel")                                          \
	X(MNORM, "model.norm")                                                                     \
	X(DTYPE, "dtype")                                                                          \
	X(DT_W, "dtype.weights")                                                                   \
	X(DT_A, "dtype.activations")                                                               \
	X(DT_R, "dtype.router")                                                                    \
	X(DT_C, "dtype.compute")                                                                   \
	X(ROUTER, "router")                                                                        \
	X(MODE, "router.mode")                                                                     \
	X(SCORE, "router.score")                                                                   \
	X(TOPK, "router.top_k")                                                                    \
	X(TOP_P, "router.top_p")                                                                   \
	X(NORM, "router.normalize")                                                                \
	X(NORM_KIND, "router.normalize.kind")                                                      \
	X(NORM_EPS, "router.normalize.eps")                                                        \
	X(NORM_MIN, "router.normalize.min")                                                        \
	X(NORM_P, "router.normalize.p")                                                            \
	X(SCALE, "router.scale")                                                                   \
	X(RBIAS, "router.bias")                                                                    \
	X(SBIAS, "router.select_bias")                                                             \
	X(GROUPS, "router.groups")                                                                 \
	X(G_COUNT, "router.groups.count")                                                          \
	X(G_TOP, "router.groups.top")                                                              \
	X(G_SCORE, "router.groups.score")                                                          \
	X(CAP, "router.capacity")                                                                  \
	X(CAP_FACTOR, "router.capacity.factor")                                                    \
	X(CAP_PER, "router.capacity.per_expert")                                                   \
	X(CAP_PRIO, "router.capacity.priority")                                                    \
	X(CAP_OVER, "router.capacity.overflow")                                                    \
	X(CAP_FRAC, "router.capacity.token_fraction")                                              \
	X(CAP_MIN, "router.capacity.min")                                                          \
	X(CAP_ROUND, "router.capacity.rounding")                                                   \
	X(CAP_NAD, "router.capacity.normalize_after_drop")                                         \
	X(NOISE, "router.noise")                                                                   \
	X(NOISE_KIND, "router.noise.kind")                                                         \
	X(NOISE_EPS, "router.noise.eps")                                                           \
	X(NOISE_NEPS, "router.noise.noise_epsilon")                                                \
	X(IMPORTANCE, "router.importance")                                                         \
	X(APPLY, "router.apply_to")                                                                \
	X(EXPERTS, "experts")                                                                      \
	X(E_KIND, "experts.kind")                                                                  \
	X(E_COUNT, "experts.count")                                                                \
	X(E_I, "experts.intermediate")                                                             \
	X(E_ACT, "experts.activation")                                                             \
	X(OAI_ALPHA, "experts.activation.swiglu_oai.alpha")                                        \
	X(OAI_LIMIT, "experts.activation.swiglu_oai.limit")                                        \
	X(E_BIAS, "experts.bias")                                                                  \
	X(E_SPLIT, "experts.split")                                                                \
	X(E_OBIAS, "experts.output_bias")                                                          \
	X(SHARED, "shared_experts")                                                                \
	X(SH_COUNT, "shared_experts.count")                                                        \
	X(SH_I, "shared_experts.intermediate")                                                     \
	X(SH_ACT, "shared_experts.activation")                                                     \
	X(SH_KIND, "shared_experts.kind")                                                          \
	X(SH_GATE, "shared_experts.gate")                                                          \
	X(HIER, "hierarchical")                                                                    \
	X(H_LEVELS, "hierarchical.levels")                                                         \
	X(L0_GROUPS, "hierarchical.levels[0].groups")                                              \
	X(L0_TOPK, "hierarchical.levels[0].top_k")                                                 \
	X(L1_TOPK, "hierarchical.levels[1].top_k")                                                 \
	X(EC, "expert_choice")                                                                     \
	X(EC_CF, "expert_choice.capacity_factor")                                                  \
	X(SOFT, "soft")                                                                            \
	X(SOFT_P, "soft.slots_per_expert")                                                         \
	X(SOFT_GROUP, "soft.group_size")                                                           \
	X(SOFT_SCALE, "soft.scale")                                                                \
	X(PK, "product_key")                                                                       \
	X(PK_R, "product_key.sub_keys")                                                            \
	X(PK_HEADS, "product_key.heads")                                                           \
	X(PK_TOPK, "product_key.top_k")                                                            \
	X(PK_D, "product_key.query_dim")                                                           \
	X(PK_SCORE, "product_key.score")                                                           \
	X(PK_BN, "product_key.query_bn")                                                           \
	X(PK_BN_EPS, "product_key.query_bn_eps")                                                   \
	X(PK_KPH, "product_key.keys_per_head")                                                     \
	X(PK_SUBK, "product_key.sub_top_k")                                                        \
	X(SM, "sparsemixer")                                                                       \
	X(SM_EPS, "sparsemixer.eps")                                                               \
	X(WEIGHTS, "weights")                                                                      \
	X(W_FORMAT, "weights.format")                                                              \
	X(W_NAMES, "weights.names")                                                                \
	X(W_LAYOUT, "weights.layout")                                                              \
	X(QUANT, "quant")

#define SLOT_ENUM_(s, p) S_##s,
enum slot { SLOTS(SLOT_ENUM_) S_COUNT };
#define SLOT_PATH_(s, p) p,
static const char *const slot_path[S_COUNT] = {SLOTS(SLOT_PATH_)};

/* The last component of a slot's path: its key. */
static const char *slot_key(int slot)
{
	const char *p = slot_path[slot], *dot = strrchr(p, '.');
	return dot ? dot + 1 : p;
}

enum ftype {
	F_UINT,
	F_FLOAT,
	F_BOOL,
	F_STR,
	F_ENUM,
	F_MAP,     /* a mapping with its own table */
	F_KINDMAP, /* a mapping, or a scalar that is shorthand for its first key */
	F_ANY      /* checked by custom code */
};

enum { REQ = 1, OPEN_LO = 2 }; /* required; float bound lo is exclusive */

struct field {
	int slot;
	enum ftype type;
	unsigned flags;
	double lo, hi;
	const char *const *names; /* F_ENUM */
	int n_names;
	const struct field *sub; /* F_MAP, F_KINDMAP */
	int n_sub;
};

#define N_(a) ((int)(sizeof(a) / sizeof *(a)))
#define UINT_(s, lo, hi, fl)                                                                       \
	{                                                                                          \
		S_##s, F_UINT, fl, lo, hi, NULL, 0, NULL, 0                                        \
	}
#define FLOAT_(s, lo, hi, fl)                                                                      \
	{                                                                                          \
		S_##s, F_FLOAT, fl, lo, hi, NULL, 0, NULL, 0                                       \
	}
#define BOOL_(s)                                                                                   \
	{                                                                                          \
		S_##s, F_BOOL, 0, 0, 0, NULL, 0, NULL, 0                                           \
	}
#define STR_(s, fl)                                                                                \
	{                                                                                          \
		S_##s, F_STR, fl, 0, 0, NULL, 0, NULL, 0                                           \
	}
#define ENUM_(s, names, fl)                                                                        \
	{                                                                                          \
		S_##s, F_ENUM, fl, 0, 0, names, N_(names), NULL, 0                                 \
	}
#define MAP_(s, sub, fl)                                                                           \
	{                                                                                          \
		S_##s, F_MAP, fl, 0, 0, NULL, 0, sub, N_(sub)                                      \
	}
#define KINDMAP_(s, sub)                                                                           \
	{                                                                                          \
		S_##s, F_KINDMAP, 0, 0, 0, NULL, 0, sub, N_(sub)                                   \
	}
#define ANY_(s, fl)                                                                                \
	{                                                                                          \
		S_##s, F_ANY, fl, 0, 0, NULL, 0, NULL, 0                                           \
	}

/* Value spellings accepted where a desc enum allows more than the spec. */
static const char *const kind2_names[] = {"glu", "mlp"};
static const char *const attn_kind_names[] = {"mha", "mla"};
static const char *const lin_kind_names[] = {"gated_deltanet", "lightning"};
static const char *const model_norm_names[] = {"rms", "layer"};
static const char *const act_dtype_names[] = {"f32", "bf16"};
static const char *const router_dtype_names[] = {"f32"};
static const char *const pk_score_names[] = {"softmax", "sigmoid", "relu"};
static const char *const format_names[] = {"safetensors", "gguf"};
static const char *const fuse_names[] = {"concat", "interleave"};
static const char *const rounding_names[] = {"ceil", "floor"};
static const char *const importance_names[] = {"dense", "sparse"};
static const char *const soft_scale_names[] = {"scalar", "channel"};
/* Activation spellings; glu-only ones first. */
static const char *const act_names[] = {"swiglu",    "geglu", "swiglu_oai", "gelu",
					"gelu_tanh", "relu",  "silu"};

static const struct field ml_fields[] = {
    UINT_(ML_FIRST, 0, MOE_MAX_LAYERS - 1, 0),
    UINT_(ML_EVERY, 1, MOE_MAX_LAYERS, 0),
};
static const struct field dense_fields[] = {
    UINT_(DENSE_I, 1, MAX_WIDTH, REQ),
    ANY_(DENSE_ACT, 0),
    ENUM_(DENSE_KIND, kind2_names, 0),
};
static const struct field lin_fields[] = {
    ENUM_(LIN_KIND, lin_kind_names, REQ), ANY_(LIN_LAYERS, REQ),
    UINT_(LIN_HEADS, 1, MAX_DIM, 0),      UINT_(LIN_HD, 1, MAX_DIM, 0),
    UINT_(LIN_KH, 1, MAX_DIM, 0),         UINT_(LIN_KD, 1, MAX_DIM, 0),
    UINT_(LIN_CONV, 1, MAX_DIM, 0),
};
static const struct field attn_fields[] = {
    ENUM_(ATTN_KIND, attn_kind_names, 0),
    UINT_(ATTN_HEADS, 1, MAX_DIM, REQ),
    UINT_(ATTN_KV, 1, MAX_DIM, 0),
    UINT_(ATTN_HD, 1, MAX_DIM, 0),
    UINT_(MLA_Q, 0, MAX_DIM, 0),
    UINT_(MLA_KV, 1, MAX_DIM, 0),
    UINT_(MLA_NOPE, 1, MAX_DIM, 0),
    UINT_(MLA_ROPE, 1, MAX_DIM, 0),
    UINT_(MLA_V, 1, MAX_DIM, 0),
    BOOL_(ATTN_QKV_BIAS),
    BOOL_(ATTN_OUT_BIAS),
    BOOL_(ATTN_SINKS),
    BOOL_(ATTN_GATE),
    ENUM_(ATTN_QKN, moe_qk_norm_names, 0),
    MAP_(LIN, lin_fields, 0),
};
static const struct field model_fields[] = {
    UINT_(HIDDEN, 1, MAX_HIDDEN, REQ), UINT_(LAYERS, 1, MOE_MAX_LAYERS, REQ), ANY_(MOE_LAYERS, 0),
    MAP_(DENSE, dense_fields, 0),      UINT_(VOCAB, 0, MAX_VOCAB, 0),         BOOL_(TIED),
    MAP_(ATTN, attn_fields, 0),        ENUM_(MNORM, model_norm_names, 0),
};
static const struct field dtype_fields[] = {
    ENUM_(DT_W, moe_dtype_names, 0),
    ENUM_(DT_A, act_dtype_names, 0),
    ENUM_(DT_R, router_dtype_names, 0),
    ENUM_(DT_C, moe_compute_names, 0),
};
static const struct field norm_fields[] = {
    ENUM_(NORM_KIND, moe_norm_names, REQ),
    FLOAT_(NORM_EPS, 0, 1, 0),
    FLOAT_(NORM_MIN, 0, 1, 0),
    FLOAT_(NORM_P, 0, 1e3, OPEN_LO),
};
static const struct field group_fields[] = {
    UINT_(G_COUNT, 1, MAX_EXPERTS, REQ),
    UINT_(G_TOP, 1, MAX_EXPERTS, REQ),
    ENUM_(G_SCORE, moe_group_score_names, 0),
};
static const struct field cap_fields[] = {
    FLOAT_(CAP_FACTOR, 0, MAX_FACTOR, OPEN_LO), UINT_(CAP_PER, 1, MAX_CAPACITY, 0),
    ENUM_(CAP_PRIO, moe_priority_names, 0),     ENUM_(CAP_OVER, moe_overflow_names, 0),
    FLOAT_(CAP_FRAC, 0, MAX_FACTOR, OPEN_LO),   UINT_(CAP_MIN, 1, MAX_CAPACITY, 0),
    ENUM_(CAP_ROUND, rounding_names, 0),        BOOL_(CAP_NAD),
};
static const struct field noise_fields[] = {
    ENUM_(NOISE_KIND, moe_noise_names, REQ),
    FLOAT_(NOISE_EPS, 0, 1, OPEN_LO),
    FLOAT_(NOISE_NEPS, 0, 1e3, 0),
};
static const struct field router_fields[] = {
    ENUM_(MODE, moe_mode_names, 0),
    ENUM_(SCORE, moe_score_names, 0),
    UINT_(TOPK, 1, MAX_EXPERTS, 0),
    FLOAT_(TOP_P, 0, 1, OPEN_LO),
    KINDMAP_(NORM, norm_fields),
    FLOAT_(SCALE, 0, 1e6, OPEN_LO),
    BOOL_(RBIAS),
    BOOL_(SBIAS),
    MAP_(GROUPS, group_fields, 0),
    MAP_(CAP, cap_fields, 0),
    KINDMAP_(NOISE, noise_fields),
    ENUM_(APPLY, moe_apply_names, 0),
    ENUM_(IMPORTANCE, importance_names, 0),
};
static const struct field oai_fields[] = {
    FLOAT_(OAI_ALPHA, 0, 1e6, OPEN_LO),
    FLOAT_(OAI_LIMIT, 0, 1e6, OPEN_LO),
};
static const struct field expert_fields[] = {
    ENUM_(E_KIND, moe_kind_names, 0),
    UINT_(E_COUNT, 1, MAX_EXPERTS, REQ),
    UINT_(E_I, 1, MAX_WIDTH, 0),
    ANY_(E_ACT, 0),
    BOOL_(E_BIAS),
    UINT_(E_SPLIT, 1, MAX_SPLIT, 0),
    BOOL_(E_OBIAS),
};
static const struct field shared_fields[] = {
    UINT_(SH_COUNT, 0, MAX_SHARED, 0), UINT_(SH_I, 1, MAX_WIDTH, REQ),           ANY_(SH_ACT, 0),
    ENUM_(SH_KIND, kind2_names, 0),    ENUM_(SH_GATE, moe_shared_gate_names, 0),
};
static const struct field level0_fields[] = {
    UINT_(L0_GROUPS, 1, MAX_EXPERTS, REQ),
    UINT_(L0_TOPK, 1, MAX_EXPERTS, REQ),
};
static const struct field level1_fields[] = {
    UINT_(L1_TOPK, 1, MAX_EXPERTS, REQ),
};
static const struct field hier_fields[] = {ANY_(H_LEVELS, REQ)};
static const struct field ec_fields[] = {FLOAT_(EC_CF, 0, MAX_FACTOR, OPEN_LO | REQ)};
static const struct field soft_fields[] = {
    UINT_(SOFT_P, 1, MAX_DIM, 0),
    ENUM_(SOFT_SCALE, soft_scale_names, 0),
    UINT_(SOFT_GROUP, 1, UINT32_MAX, 0),
};
static const struct field pk_fields[] = {
    UINT_(PK_R, 1, MAX_SUB_KEYS, REQ),    UINT_(PK_HEADS, 1, 1024, 0),
    UINT_(PK_TOPK, 1, MAX_SUB_KEYS, REQ), UINT_(PK_D, 2, MAX_DIM, REQ),
    ENUM_(PK_SCORE, pk_score_names, 0),   BOOL_(PK_BN),
    FLOAT_(PK_BN_EPS, 0, 1, 0),           BOOL_(PK_KPH),
    UINT_(PK_SUBK, 1, MAX_SUB_KEYS, 0),
};
static const struct field sm_fields[] = {FLOAT_(SM_EPS, 0, 1, 0)};
static const struct field weight_fields[] = {
    ENUM_(W_FORMAT, format_names, 0),
    ANY_(W_NAMES, 0),
    ANY_(W_LAYOUT, 0),
};
static const struct field root_fields[] = {
    UINT_(MOEGEN, 0, UINT32_MAX, 0),  STR_(NAME, REQ),
    MAP_(MODEL, model_fields, REQ),   MAP_(DTYPE, dtype_fields, 0),
    MAP_(ROUTER, router_fields, REQ), MAP_(EXPERTS, expert_fields, REQ),
    MAP_(SHARED, shared_fields, 0),   MAP_(HIER, hier_fields, 0),
    MAP_(EC, ec_fields, 0),           MAP_(SOFT, soft_fields, 0),
    MAP_(PK, pk_fields, 0),           MAP_(SM, sm_fields, 0),
    MAP_(WEIGHTS, weight_fields, 0),  ANY_(QUANT, 0),
};

/* An activation: a name, or (experts only) {swiglu_oai: {alpha, limit}}. */
struct act {
	int ok;
	enum moe_act act;
	int glu_only; /* swiglu, geglu, swiglu_oai name a gated expert */
};

struct ctx {
	const struct moe_spec *s;
	struct moe_diag *d;
	int n_err;
	const yaml_node_t *n[S_COUNT]; /* value node; NULL when absent */
	const yaml_node_t *k[S_COUNT]; /* key node */
	uint8_t ok[S_COUNT];           /* present and well typed */
	uint64_t u[S_COUNT];           /* F_UINT, F_BOOL */
	double f[S_COUNT];             /* F_FLOAT */
	const char *str[S_COUNT];      /* F_ENUM (the table's spelling), F_STR */
	struct act expert_act;         /* experts.activation, resolved */
	/* weights.names / weights.layout per role */
	const yaml_node_t *wname[MOE_ROLE_COUNT], *wname_key[MOE_ROLE_COUNT];
	struct moe_layout layout[MOE_ROLE_COUNT];
	const yaml_node_t *quant_key[MOE_ROLE_COUNT]; /* weights.layout.ROLE.quant, when valid */
	const char *scales[MOE_ROLE_COUNT];           /* its scale tensor's template */
};

/* Diagnostics ------------------------------------------------------------- */

__attribute__((format(printf, 3, 4))) static void err(struct ctx *c, const yaml_node_t *n,
						      const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	moe_diag_error_at(c->d, moe_spec_loc(c->s, n), "%s", msg);
	c->n_err++;
}

__attribute__((format(printf, 3, 4))) static void note(struct ctx *c, const yaml_node_t *n,
						       const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	moe_diag_note_at(c->d, moe_spec_loc(c->s, n), "%s", msg);
}

/* "X declared here" at the key of a slot, when the spec gives it. */
static void note_at(struct ctx *c, int slot)
{
	if (c->k[slot])
		note(c, c->k[slot], "%s declared here", slot_path[slot]);
}

/* Where to report something about a slot: its key, else the key of the
 * nearest enclosing mapping that is present, else the root. */
static const yaml_node_t *key_or_parent(struct ctx *c, int slot)
{
	if (c->k[slot])
		return c->k[slot];
	char path[128];
	snprintf(path, sizeof path, "%s", slot_path[slot]);
	for (char *dot; (dot = strrchr(path, '.'));) {
		*dot = 0;
		for (int i = 0; i < S_COUNT; i++)
			if (!strcmp(slot_path[i], path) && c->k[i])
				return c->k[i];
	}
	return moe_spec_root(c->s);
}

/* A scalar shown in a message: quoted, cut after about 50 bytes (at a
 * character boundary), control bytes as '?'. Two rotating buffers so one
 * message can show two values. */
static const char *show(const yaml_node_t *n)
{
	static _Thread_local char buf[2][64];
	static _Thread_local int which;
	char *b = buf[which ^= 1];
	if (n->type == YAML_MAPPING_NODE)
		return "a mapping";
	if (n->type == YAML_SEQUENCE_NODE)
		return "a sequence";
	const unsigned char *v = n->data.scalar.value;
	size_t len = n->data.scalar.length, o = 0;
	if (len == 0 && n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE)
		return "nothing";
	b[o++] = '\'';
	for (size_t i = 0; i < len && o < 52; i++)
		b[o++] = v[i] < 0x20 || v[i] == 0x7f ? '?' : (char)v[i];
	if (len > 51) {
		while (o > 1 && ((unsigned char)b[o - 1] & 0xc0) == 0x80)
			o--;
		if (o > 1 && (unsigned char)b[o - 1] >= 0xc0)
			o--;
		memcpy(b + o, "...", 3), o += 3;
	}
	b[o++] = '\'';
	b[o] = 0;
	return b;
}

static const char *scalar(const yaml_node_t *n)
{
	return n && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

static int is_plain(const yaml_node_t *n)
{
	return n->type == YAML_SCALAR_NODE && n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
}

/* Empty plain scalar: `key:` with nothing after it (YAML null). */
static int is_null(const yaml_node_t *n)
{
	return is_plain(n) && n->data.scalar.length == 0;
}

static void join_names(char *buf, size_t cap, const char *const *names, int n)
{
	size_t o = 0;
	buf[0] = 0;
	for (int i = 0; i < n && o < cap; i++) {
		int w = snprintf(buf + o, cap - o, "%s%s", i ? ", " : "", names[i]);
		if (w < 0)
			break;
		o += (size_t)w;
	}
}

/* Typed scalars -------------------------------------------------------------- */

static int get_uint(struct ctx *c, const yaml_node_t *n, const char *path, uint64_t lo, uint64_t hi,
		    uint64_t *out)
{
	const char *what = lo ? "a positive integer" : "a non-negative integer";
	const char *v = scalar(n);
	if (!v || !is_plain(n) || !*v) {
		err(c, n, "%s must be %s, got %s%s", path, what, show(n),
		    v && *v ? " (a quoted string)" : "");
		return -1;
	}
	const char *p = v;
	int neg = *p == '-';
	if (*p == '-' || *p == '+')
		p++;
	uint64_t x = 0;
	int big = 0;
	if (!*p) {
		err(c, n, "%s must be %s, got %s", path, what, show(n));
		return -1;
	}
	for (; *p; p++) {
		if (*p < '0' || *p > '9') {
			err(c, n, "%s must be %s, got %s", path, what, show(n));
			return -1;
		}
		if (x > (UINT64_MAX - 9) / 10)
			big = 1;
		else
			x = x * 10 + (uint64_t)(*p - '0');
	}
	if (neg && (x || big)) {
		err(c, n, "%s must be %s, got %s", path, what, show(n));
		return -1;
	}
	if (big || x > hi) {
		v += v[0] == '+';
		err(c, n, "%s (%.40s%s) is too large: at most %llu", path, v,
		    strlen(v) > 40 ? "..." : "", (unsigned long long)hi);
		return -1;
	}
	if (x < lo) {
		if (lo == 1)
			err(c, n, "%s must be %s, got %s", path, what, show(n));
		else
			err(c, n, "%s (%llu) is too small: at least %llu", path,
			    (unsigned long long)x, (unsigned long long)lo);
		return -1;
	}
	*out = x;
	return 0;
}

static int get_float(struct ctx *c, const yaml_node_t *n, const char *path, double lo, double hi,
		     unsigned flags, double *out)
{
	const char *v = scalar(n);
	if (!v || !is_plain(n) || !*v) {
		err(c, n, "%s must be a number, got %s", path, show(n));
		return -1;
	}
	/* YAML's .inf/.nan and C's inf/nan spellings, all rejected. */
	const char *p = v + (*v == '-' || *v == '+');
	if (*p == '.')
		p++;
	if (!strncasecmp(p, "inf", 3) || !strncasecmp(p, "nan", 3)) {
		err(c, n, "%s must be a finite number, got %s", path, show(n));
		return -1;
	}
	/* Decimal only: strtod alone would also take hex floats. */
	for (p = v; *p; p++)
		if (!strchr("0123456789+-.eE", *p)) {
			err(c, n, "%s must be a number, got %s", path, show(n));
			return -1;
		}
	char *end;
	double x = strtod(v, &end);
	if (*end || end == v) {
		err(c, n, "%s must be a number, got %s", path, show(n));
		return -1;
	}
	if (!isfinite(x) || fabs(x) > FLT_MAX) {
		err(c, n, "%s must be a finite number, got %s", path, show(n));
		return -1;
	}
	if ((flags & OPEN_LO) ? !(x > lo) : !(x >= lo)) {
		err(c, n, "%s must be %s %g, got %s", path, (flags & OPEN_LO) ? ">" : ">=", lo,
		    show(n));
		return -1;
	}
	if (x > hi) {
		err(c, n, "%s (%.40s%s) is too large: at most %g", path, v,
		    strlen(v) > 40 ? "..." : "", hi);
		return -1;
	}
	*out = x;
	return 0;
}

static int get_bool(struct ctx *c, const yaml_node_t *n, const char *path, uint64_t *out)
{
	const char *v = scalar(n);
	static const char *const t[] = {"true", "True", "TRUE"}, *const f[] = {"false", "False",
									       "FALSE"};
	if (v && is_plain(n))
		for (int i = 0; i < 3; i++) {
			if (!strcmp(v, t[i]))
				return *out = 1, 0;
			if (!strcmp(v, f[i]))
				return *out = 0, 0;
		}
	err(c, n, "%s must be true or false, got %s", path, show(n));
	return -1;
}

static int get_enum(struct ctx *c, const yaml_node_t *n, const char *path, const char *const *names,
		    int n_names, const char **out)
{
	const char *v = scalar(n);
	if (v) {
		for (int i = 0; i < n_names; i++)
			if (!strcmp(v, names[i]))
				return *out = names[i], 0;
	}
	char list[512];
	join_names(list, sizeof list, names, n_names);
	const char *dym = v ? moe_closest(v, names, n_names) : NULL;
	if (dym)
		err(c, n, "%s must be one of %s, got %s (did you mean '%s'?)", path, list, show(n),
		    dym);
	else
		err(c, n, "%s must be one of %s, got %s", path, list, show(n));
	return -1;
}

static int get_str(struct ctx *c, const yaml_node_t *n, const char *path, const char **out)
{
	const char *v = scalar(n);
	if (!v || is_null(n)) {
		err(c, n, "%s must be a string, got %s", path, show(n));
		return -1;
	}
	if (strlen(v) != n->data.scalar.length) {
		err(c, n, "%s must not contain a NUL character", path);
		return -1;
	}
	*out = v;
	return 0;
}

/* The schema walk -------------------------------------------------------------- */

static void walk_map(struct ctx *c, const yaml_node_t *map, const yaml_node_t *at,
		     const char *where, const struct field *t, int nt);

static void check_field(struct ctx *c, const struct field *f, const yaml_node_t *v)
{
	const char *path = slot_path[f->slot];
	int rc = 0;
	switch (f->type) {
	case F_UINT:
		rc = get_uint(c, v, path, (uint64_t)f->lo, (uint64_t)f->hi, &c->u[f->slot]);
		break;
	case F_FLOAT:
		rc = get_float(c, v, path, f->lo, f->hi, f->flags, &c->f[f->slot]);
		break;
	case F_BOOL:
		rc = get_bool(c, v, path, &c->u[f->slot]);
		break;
	case F_ENUM:
		rc = get_enum(c, v, path, f->names, f->n_names, &c->str[f->slot]);
		break;
	case F_STR:
		rc = get_str(c, v, path, &c->str[f->slot]);
		break;
	case F_KINDMAP:
		if (v->type == YAML_SCALAR_NODE) {
			/* `normalize: sum` is `normalize: {kind: sum}` */
			const struct field *kf = &f->sub[0];
			c->n[kf->slot] = v;
			c->k[kf->slot] = c->k[f->slot];
			check_field(c, kf, v);
			break;
		}
		/* fall through */
	case F_MAP:
		if (v->type == YAML_MAPPING_NODE || is_null(v))
			walk_map(c, v, c->k[f->slot], path, f->sub, f->n_sub);
		else {
			err(c, v, "%s must be a mapping, got %s", path, show(v));
			rc = -1;
		}
		break;
	case F_ANY:
		break;
	}
	c->ok[f->slot] = rc == 0;
}

/* Check the keys of `map` against table t: unknown keys (with a
 * did-you-mean), each value's type, required keys (reported at `at`, the key
 * of the mapping). `where` names the mapping in messages. */
static void walk_map(struct ctx *c, const yaml_node_t *map, const yaml_node_t *at,
		     const char *where, const struct field *t, int nt)
{
	const char *names[32];
	MOE_ASSERT(nt <= 32);
	for (int i = 0; i < nt; i++)
		names[i] = slot_key(t[i].slot);
	if (map->type == YAML_MAPPING_NODE)
		for (yaml_node_pair_t *p = map->data.mapping.pairs.start;
		     p < map->data.mapping.pairs.top; p++) {
			const yaml_node_t *k = moe_spec_node(c->s, p->key);
			const yaml_node_t *v = moe_spec_node(c->s, p->value);
			const char *key = scalar(k);
			int i = 0;
			while (i < nt && strcmp(names[i], key))
				i++;
			if (i == nt) {
				const char *dym = moe_closest(key, names, nt);
				char in[160];
				if (where)
					snprintf(in, sizeof in, "in %s", where);
				else
					snprintf(in, sizeof in, "at the top level");
				if (dym)
					err(c, k, "unknown key %s %s (did you mean '%s'?)", show(k),
					    in, dym);
				else
					err(c, k, "unknown key %s %s", show(k), in);
				continue;
			}
			c->k[t[i].slot] = k;
			c->n[t[i].slot] = v;
			check_field(c, &t[i], v);
		}
	for (int i = 0; i < nt; i++)
		if ((t[i].flags & REQ) && !c->n[t[i].slot])
			err(c, at ? at : map, "%s is required", slot_path[t[i].slot]);
}

/* Custom values -------------------------------------------------------------- */

static struct act parse_act(struct ctx *c, int slot, int params)
{
	struct act a = {0, MOE_ACT_SILU, 1};
	const yaml_node_t *n = c->n[slot];
	const char *name = NULL;
	const char *path = slot_path[slot];
	if (n->type == YAML_MAPPING_NODE && params) {
		yaml_node_pair_t *p = n->data.mapping.pairs.start;
		if (n->data.mapping.pairs.top - p != 1) {
			err(c, n, "%s must be a name or {swiglu_oai: {alpha: A, limit: L}}", path);
			return a;
		}
		const yaml_node_t *k = moe_spec_node(c->s, p->key);
		const yaml_node_t *v = moe_spec_node(c->s, p->value);
		if (strcmp(scalar(k), "swiglu_oai")) {
			static const char *const oai[] = {"swiglu_oai"};
			const char *dym = moe_closest(scalar(k), oai, 1);
			err(c, k, "%s: only swiglu_oai takes parameters, got %s%s", path, show(k),
			    dym ? " (did you mean 'swiglu_oai'?)" : "");
			return a;
		}
		if (v->type != YAML_MAPPING_NODE && !is_null(v)) {
			err(c, v, "%s.swiglu_oai must be a mapping {alpha: A, limit: L}, got %s",
			    path, show(v));
			return a;
		}
		int before = c->n_err;
		walk_map(c, v, k, "experts.activation.swiglu_oai", oai_fields, N_(oai_fields));
		name = "swiglu_oai";
		if (c->n_err != before)
			return a;
	} else if (n->type != YAML_SCALAR_NODE) {
		err(c, n, "%s must be an activation name, got %s", path, show(n));
		return a;
	} else if (get_enum(c, n, path, act_names, N_(act_names), &name) != 0) {
		return a;
	}
	static const enum moe_act acts[] = {MOE_ACT_SILU, MOE_ACT_GELU,      MOE_ACT_SWIGLU_OAI,
					    MOE_ACT_GELU, MOE_ACT_GELU_TANH, MOE_ACT_RELU,
					    MOE_ACT_SILU};
	int i = moe_enum_lookup(act_names, N_(act_names), name);
	a.ok = 1;
	a.act = acts[i];
	a.glu_only = i < 3;
	return a;
}

/* The expert kind from `kind` (when given) and the activation: a gated
 * activation needs glu; otherwise the default is mlp. */
static enum moe_kind resolve_kind(struct ctx *c, int kind_slot, int act_slot, struct act a)
{
	if (c->ok[kind_slot]) {
		enum moe_kind k = (enum moe_kind)moe_enum_lookup(moe_kind_names, MOE_KIND_COUNT,
								 c->str[kind_slot]);
		if (a.ok && a.glu_only && k != MOE_KIND_GLU && c->n[act_slot]) {
			err(c, c->n[act_slot], "%s %s needs glu experts, but %s is %s",
			    slot_path[act_slot], show(c->n[act_slot]), slot_path[kind_slot],
			    c->str[kind_slot]);
			note_at(c, kind_slot);
		}
		return k;
	}
	return a.glu_only ? MOE_KIND_GLU : MOE_KIND_MLP;
}

static void parse_moe_layers(struct ctx *c, struct moe_desc *o)
{
	const yaml_node_t *n = c->n[S_MOE_LAYERS];
	uint32_t L = o->n_layers; /* 0 when model.layers is invalid: skip range checks */
	c->ok[S_MOE_LAYERS] = 0;
	if (!n || (n->type == YAML_SCALAR_NODE && !strcmp(scalar(n), "all"))) {
		for (uint32_t i = 0; i < L; i++)
			o->moe_layers[i] = i;
		o->n_moe_layers = L;
		c->ok[S_MOE_LAYERS] = 1;
		return;
	}
	if (n->type == YAML_SCALAR_NODE) {
		static const char *const all[] = {"all"};
		const char *dym = moe_closest(scalar(n), all, 1);
		err(c, n,
		    "model.moe_layers must be all, a list of layer indices or {first: F, every: "
		    "S}, got %s%s",
		    show(n), dym ? " (did you mean 'all'?)" : "");
		return;
	}
	if (n->type == YAML_MAPPING_NODE) {
		int before = c->n_err;
		walk_map(c, n, c->k[S_MOE_LAYERS], "model.moe_layers", ml_fields, N_(ml_fields));
		uint64_t first = c->ok[S_ML_FIRST] ? c->u[S_ML_FIRST] : 0;
		uint64_t every = c->ok[S_ML_EVERY] ? c->u[S_ML_EVERY] : 1;
		if (L && first >= L) {
			err(c, c->n[S_ML_FIRST],
			    "model.moe_layers.first (%llu) is not a layer: the model has %u layers "
			    "(0..%u)",
			    (unsigned long long)first, L, L - 1);
			note_at(c, S_LAYERS);
		}
		if (c->n_err != before || !L)
			return;
		for (uint64_t i = first; i < L; i += every)
			o->moe_layers[o->n_moe_layers++] = (uint32_t)i;
		c->ok[S_MOE_LAYERS] = 1;
		return;
	}
	/* A list: each entry a layer index, strictly ascending. */
	int bad = 0, i = 0;
	uint64_t prev = 0;
	const yaml_node_t *prev_n = NULL;
	if (n->data.sequence.items.start == n->data.sequence.items.top) {
		err(c, n, "model.moe_layers is empty: list at least one layer, or write all");
		return;
	}
	for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top;
	     it++, i++) {
		const yaml_node_t *v = moe_spec_node(c->s, *it);
		char path[64];
		uint64_t x;
		snprintf(path, sizeof path, "model.moe_layers[%d]", i);
		if (get_uint(c, v, path, 0, UINT32_MAX, &x) != 0) {
			bad = 1;
			continue;
		}
		if (L && x >= L) {
			err(c, v, "%s (%llu) is not a layer: the model has %u layers (0..%u)", path,
			    (unsigned long long)x, L, L - 1);
			note_at(c, S_LAYERS);
			bad = 1;
			continue;
		}
		if (prev_n && x == prev) {
			err(c, v, "%s (%llu) is listed twice", path, (unsigned long long)x);
			note(c, prev_n, "layer %llu first listed here", (unsigned long long)x);
			bad = 1;
		} else if (prev_n && x < prev) {
			err(c, v,
			    "%s (%llu) is out of order: layers must be ascending (after %llu)",
			    path, (unsigned long long)x, (unsigned long long)prev);
			bad = 1;
		} else if (!bad && L) {
			o->moe_layers[o->n_moe_layers++] = (uint32_t)x;
		}
		prev = x, prev_n = v;
	}
	c->ok[S_MOE_LAYERS] = !bad;
}

/* model.attention.linear.layers: a non-empty ascending list of layer indices;
 * returns how many. */
static uint32_t parse_linear_layers(struct ctx *c, uint32_t L)
{
	const yaml_node_t *n = c->n[S_LIN_LAYERS];
	if (n->type != YAML_SEQUENCE_NODE ||
	    n->data.sequence.items.start == n->data.sequence.items.top) {
		err(c, n,
		    "model.attention.linear.layers must be a non-empty list of layer indices, "
		    "got %s",
		    show(n));
		return 0;
	}
	uint32_t count = 0;
	int bad = 0, i = 0;
	uint64_t prev = 0;
	for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top;
	     it++, i++) {
		const yaml_node_t *v = moe_spec_node(c->s, *it);
		char path[64];
		uint64_t x;
		snprintf(path, sizeof path, "model.attention.linear.layers[%d]", i);
		if (get_uint(c, v, path, 0, UINT32_MAX, &x) != 0) {
			bad = 1;
			continue;
		}
		if (L && x >= L) {
			err(c, v, "%s (%llu) is not a layer: the model has %u layers (0..%u)", path,
			    (unsigned long long)x, L, L - 1);
			note_at(c, S_LAYERS);
			bad = 1;
		} else if (i && x <= prev) {
			err(c, v, "%s (%llu) must be above the entry before it (%llu)", path,
			    (unsigned long long)x, (unsigned long long)prev);
			bad = 1;
		}
		prev = x;
		count++;
	}
	return bad ? 0 : count;
}

/* The attention variants beside the projections: biases, q/k norms, sinks,
 * the output gate and the linear-attention layers of a hybrid model. */
static void resolve_attention_extras(struct ctx *c, struct moe_desc *o, int mla)
{
	o->attn_qkv_bias = c->ok[S_ATTN_QKV_BIAS] ? (uint8_t)c->u[S_ATTN_QKV_BIAS] : 0;
	o->attn_out_bias = c->ok[S_ATTN_OUT_BIAS] ? (uint8_t)c->u[S_ATTN_OUT_BIAS] : 0;
	o->attn_sinks = c->ok[S_ATTN_SINKS] ? (uint8_t)c->u[S_ATTN_SINKS] : 0;
	o->attn_output_gate = c->ok[S_ATTN_GATE] ? (uint8_t)c->u[S_ATTN_GATE] : 0;
	o->attn_qk_norm = c->ok[S_ATTN_QKN] ? (enum moe_qk_norm)moe_enum_lookup(moe_qk_norm_names,
										MOE_QK_NORM_COUNT,
										c->str[S_ATTN_QKN])
					    : MOE_QK_NORM_NONE;
	static const int mha_keys[] = {S_ATTN_QKV_BIAS, S_ATTN_GATE, S_ATTN_QKN, S_ATTN_SINKS};
	for (int i = 0; mla && i < N_(mha_keys); i++)
		if (c->n[mha_keys[i]]) {
			err(c, c->k[mha_keys[i]], "%s does not apply to attention kind mla",
			    slot_path[mha_keys[i]]);
			note_at(c, S_ATTN_KIND);
		}
	if (!c->n[S_LIN] || !c->ok[S_LIN_KIND])
		return;
	int deltanet = !strcmp(c->str[S_LIN_KIND], "gated_deltanet");
	o->linear_attn = deltanet ? MOE_LINEAR_ATTN_GATED_DELTANET : MOE_LINEAR_ATTN_LIGHTNING;
	if (c->n[S_LIN_LAYERS])
		o->n_linear_layers = parse_linear_layers(c, o->n_layers);
	/* lightning: heads and head_dim default to the attention's */
	o->lin_value_heads =
	    c->ok[S_LIN_HEADS] ? (uint32_t)c->u[S_LIN_HEADS] : (deltanet ? 0 : o->attn_heads);
	o->lin_value_dim =
	    c->ok[S_LIN_HD] ? (uint32_t)c->u[S_LIN_HD] : (deltanet ? 0 : o->attn_head_dim);
	static const int dn_only[] = {S_LIN_KH, S_LIN_KD, S_LIN_CONV};
	static const int dn_req[] = {S_LIN_HEADS, S_LIN_HD, S_LIN_KH, S_LIN_KD, S_LIN_CONV};
	if (deltanet) {
		for (int i = 0; i < N_(dn_req); i++)
			if (!c->n[dn_req[i]])
				err(c, c->k[S_LIN_KIND],
				    "%s is required for linear attention kind "
				    "gated_deltanet",
				    slot_path[dn_req[i]]);
	} else {
		for (int i = 0; i < N_(dn_only); i++)
			if (c->n[dn_only[i]]) {
				err(c, c->k[dn_only[i]],
				    "%s does not apply to linear attention kind lightning",
				    slot_path[dn_only[i]]);
				note_at(c, S_LIN_KIND);
			}
	}
	o->lin_key_heads = c->ok[S_LIN_KH] ? (uint32_t)c->u[S_LIN_KH] : 0;
	o->lin_key_dim = c->ok[S_LIN_KD] ? (uint32_t)c->u[S_LIN_KD] : 0;
	o->lin_conv = c->ok[S_LIN_CONV] ? (uint32_t)c->u[S_LIN_CONV] : 0;
	if (deltanet && o->lin_key_heads && o->lin_value_heads &&
	    o->lin_value_heads % o->lin_key_heads) {
		err(c, c->n[S_LIN_KH],
		    "model.attention.linear.key_heads (%u) must divide "
		    "model.attention.linear.heads (%u)",
		    o->lin_key_heads, o->lin_value_heads);
		note_at(c, S_LIN_HEADS);
	}
}

/* Weight names and layouts ---------------------------------------------------- */

static int role_per_expert(int r)
{
	switch (r) {
	case MOE_ROLE_GATE:
	case MOE_ROLE_UP:
	case MOE_ROLE_GATE_UP:
	case MOE_ROLE_DOWN:
	case MOE_ROLE_GATE_BIAS:
	case MOE_ROLE_UP_BIAS:
	case MOE_ROLE_GATE_UP_BIAS:
	case MOE_ROLE_DOWN_BIAS:
		return 1;
	default:
		return 0;
	}
}

static int role_fused(int r)
{
	return r == MOE_ROLE_GATE_UP || r == MOE_ROLE_GATE_UP_BIAS || r == MOE_ROLE_SHARED_GATE_UP;
}

/* Role named by key k of a weights.* mapping, or -1 (reported). */
static int role_of(struct ctx *c, const yaml_node_t *k, const char *where)
{
	int r = moe_enum_lookup(moe_role_names, MOE_ROLE_COUNT, scalar(k));
	if (r >= 0)
		return r;
	const char *dym = moe_closest(scalar(k), moe_role_names, MOE_ROLE_COUNT);
	if (dym)
		err(c, k, "unknown weight role %s in %s (did you mean '%s'?)", show(k), where, dym);
	else
		err(c, k, "unknown weight role %s in %s", show(k), where);
	return -1;
}

static void check_template(struct ctx *c, int r, const yaml_node_t *n, const char *t,
			   const char *path)
{
	static const char *const ph[] = {"layer", "expert"};
	if (!*t) {
		err(c, n, "%s must not be empty", path);
		return;
	}
	if (strlen(t) >= MOE_NAME_MAX) {
		err(c, n, "%s is too long (%zu bytes): at most %d", path, strlen(t),
		    MOE_NAME_MAX - 1);
		return;
	}
	for (const char *p = t; *p; p++) {
		if (*p == '}') {
			err(c, n, "%s has an unmatched '}'", path);
			return;
		}
		if (*p != '{')
			continue;
		const char *e = strchr(p + 1, '}');
		if (!e) {
			err(c, n, "%s has an unmatched '{'", path);
			return;
		}
		char name[64];
		snprintf(name, sizeof name, "%.*s", (int)(e - p - 1), p + 1);
		if (!strcmp(name, "expert") && !role_per_expert(r)) {
			err(c, n, "%s: {expert} is not allowed: %s is not a per-expert tensor",
			    path, moe_role_names[r]);
		} else if (strcmp(name, "layer") && strcmp(name, "expert")) {
			const char *dym = moe_closest(name, ph, 2);
			err(c, n,
			    "%s: unknown placeholder '{%s}' (placeholders: {layer}, "
			    "{expert})%s%s%s",
			    path, name, dym ? " (did you mean '{" : "", dym ? dym : "",
			    dym ? "}'?)" : "");
		}
		p = e;
	}
}

static void parse_names(struct ctx *c)
{
	const yaml_node_t *n = c->n[S_W_NAMES];
	if (!n || is_null(n))
		return;
	if (n->type != YAML_MAPPING_NODE) {
		err(c, n, "weights.names must be a mapping of role to tensor name, got %s",
		    show(n));
		return;
	}
	for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top;
	     p++) {
		const yaml_node_t *k = moe_spec_node(c->s, p->key);
		const yaml_node_t *v = moe_spec_node(c->s, p->value);
		int r = role_of(c, k, "weights.names");
		if (r < 0)
			continue;
		char path[96];
		const char *t;
		snprintf(path, sizeof path, "weights.names.%s", moe_role_names[r]);
		c->wname_key[r] = k;
		if (get_str(c, v, path, &t) != 0)
			continue;
		int before = c->n_err;
		check_template(c, r, v, t, path);
		if (c->n_err == before)
			c->wname[r] = v;
	}
	/* A fused tensor replaces its parts. */
	static const int fused[][3] = {
	    {MOE_ROLE_GATE_UP, MOE_ROLE_GATE, MOE_ROLE_UP},
	    {MOE_ROLE_GATE_UP_BIAS, MOE_ROLE_GATE_BIAS, MOE_ROLE_UP_BIAS},
	    {MOE_ROLE_SHARED_GATE_UP, MOE_ROLE_SHARED_GATE, MOE_ROLE_SHARED_UP},
	};
	for (int i = 0; i < 3; i++)
		for (int j = 1; j < 3; j++) {
			int f = fused[i][0], part = fused[i][j];
			if (!c->wname_key[f] || !c->wname_key[part])
				continue;
			err(c, c->wname_key[part],
			    "weights.names.%s and weights.names.%s both given: %s holds %s and %s",
			    moe_role_names[part], moe_role_names[f], moe_role_names[f],
			    moe_role_names[fused[i][1]], moe_role_names[fused[i][2]]);
			note(c, c->wname_key[f], "weights.names.%s declared here",
			     moe_role_names[f]);
		}
}

/* Roles whose on-disk data may be quantized: the expert and shared-expert
 * matrices (a router or a bias is small and kept in the weight dtype). */
static int role_quantizable(int r)
{
	switch (r) {
	case MOE_ROLE_GATE:
	case MOE_ROLE_UP:
	case MOE_ROLE_GATE_UP:
	case MOE_ROLE_DOWN:
	case MOE_ROLE_SHARED_GATE:
	case MOE_ROLE_SHARED_UP:
	case MOE_ROLE_SHARED_GATE_UP:
	case MOE_ROLE_SHARED_DOWN:
		return 1;
	default:
		return 0;
	}
}

/* The placeholders a template uses, as bits: 1 {layer}, 2 {expert}. */
static unsigned placeholders(const char *t)
{
	return (strstr(t, "{layer}") ? 1u : 0u) | (strstr(t, "{expert}") ? 2u : 0u);
}

/* weights.layout.ROLE.quant: `none`, a kind name (shorthand for {kind: K}) or
 * {kind, block, scales}. On success the role's layout holds the quantization
 * and c->scales[r] the scale template. */
static void parse_quant(struct ctx *c, int r, const yaml_node_t *k, const yaml_node_t *v,
			const char *where)
{
	static const char *const keys[] = {"kind", "block", "scales", "group"};
	char path[160], sub[192];
	snprintf(path, sizeof path, "%s.quant", where);
	if (!role_quantizable(r)) {
		err(c, k,
		    "%s: only expert and shared-expert matrices (gate, up, gate_up, down, "
		    "shared_gate, shared_up, shared_gate_up, shared_down) can be quantized",
		    path);
		return;
	}
	const yaml_node_t *n[4] = {NULL, NULL, NULL, NULL}, *nk[4] = {NULL, NULL, NULL, NULL};
	if (v->type == YAML_SCALAR_NODE && !is_null(v)) {
		n[0] = v, nk[0] = k;
	} else if (v->type == YAML_MAPPING_NODE) {
		for (yaml_node_pair_t *p = v->data.mapping.pairs.start;
		     p < v->data.mapping.pairs.top; p++) {
			const yaml_node_t *kk = moe_spec_node(c->s, p->key);
			const char *key = scalar(kk) ? scalar(kk) : "";
			int i = 0;
			while (i < 4 && strcmp(key, keys[i]))
				i++;
			if (i < 4) {
				n[i] = moe_spec_node(c->s, p->value), nk[i] = kk;
				continue;
			}
			const char *dym = moe_closest(key, keys, 4);
			if (dym)
				err(c, kk, "unknown key %s in %s (did you mean '%s'?)", show(kk),
				    path, dym);
			else
				err(c, kk, "unknown key %s in %s", show(kk), path);
		}
	} else {
		err(c, v, "%s must be none or a mapping {kind, block, scales, group}, got %s", path,
		    show(v));
		return;
	}
	if (!n[0]) {
		err(c, k,
		    "%s.kind is required (fp8_block, mxfp4, gptq, gptq_v2, awq or pack_quantized)",
		    path);
		return;
	}
	const char *kn;
	snprintf(sub, sizeof sub, "%s.kind", path);
	if (get_enum(c, n[0], sub, moe_quant_names, MOE_QUANT_COUNT, &kn) != 0)
		return;
	enum moe_quant q = (enum moe_quant)moe_enum_lookup(moe_quant_names, MOE_QUANT_COUNT, kn);
	int before = c->n_err;
	if (q == MOE_QUANT_NONE) {
		for (int i = 1; i < 4; i++)
			if (nk[i])
				err(c, nk[i], "%s.%s does not apply to quant kind none", path,
				    keys[i]);
		return;
	}
	uint64_t blk[2] = {1, 32}; /* mxfp4: one E8M0 scale per 32 inputs of a row */
	if (q == MOE_QUANT_FP8_BLOCK && !n[1]) {
		err(c, n[0],
		    "%s: fp8_block needs block: [ROWS, COLS], the tile one scale covers (e.g. "
		    "[128, 128])",
		    path);
	} else if (q == MOE_QUANT_FP8_BLOCK) {
		snprintf(sub, sizeof sub, "%s.block", path);
		const yaml_node_t *b = n[1];
		if (b->type != YAML_SEQUENCE_NODE ||
		    b->data.sequence.items.top - b->data.sequence.items.start != 2) {
			err(c, b, "%s must be a list of two integers [ROWS, COLS], got %s", sub,
			    show(b));
		} else {
			for (int i = 0; i < 2; i++) {
				char ip[208];
				snprintf(ip, sizeof ip, "%s[%d]", sub, i);
				get_uint(c, moe_spec_node(c->s, b->data.sequence.items.start[i]),
					 ip, 1, MAX_DIM, &blk[i]);
			}
		}
	} else if (nk[1]) {
		err(c, nk[1], "%s.block does not apply to %s: %s", path, kn,
		    q == MOE_QUANT_MXFP4 ? "one scale covers 32 inputs of a row"
					 : "give group: the inputs one scale covers");
	}
	if (moe_quant_int4(q)) {
		snprintf(sub, sizeof sub, "%s.group", path);
		if (!n[3])
			err(c, n[0],
			    "%s: %s needs group: the inputs one scale covers (0: one group per "
			    "output channel, GPTQ's group_size -1)",
			    path, kn);
		else if (get_uint(c, n[3], sub, 0, MAX_DIM, &blk[1]) == 0 && blk[1] % 8)
			err(c, n[3],
			    "%s must be a multiple of 8 (eight int4 codes per int32), got %llu",
			    sub, (unsigned long long)blk[1]);
		blk[0] = 1;
		const char *nm = scalar(c->wname[r]);
		const char *suf = q == MOE_QUANT_PACK_QUANTIZED ? ".weight_packed" : ".qweight";
		size_t ln = nm ? strlen(nm) : 0, ls = strlen(suf);
		if (role_fused(r))
			err(c, k,
			    "%s: %s tensors are per nn.Linear: gate and up are named apart, not "
			    "fused",
			    path, kn);
		else if (nm && (ln <= ls || strcmp(nm + ln - ls, suf) != 0))
			err(c, k,
			    "%s: a %s tensor's name ends in '%s' (its zero points and scales are "
			    "named beside it), but weights.names.%s is '%s'",
			    path, kn, suf, moe_role_names[r], nm);
		else if (nm && role_per_expert(r) && !strstr(nm, "{expert}"))
			err(c, k,
			    "%s: %s tensors are one per expert: weights.names.%s needs {expert}",
			    path, kn, moe_role_names[r]);
	} else if (nk[3]) {
		err(c, nk[3], "%s.group applies to the int4 kinds only", path);
	}
	const char *t = NULL;
	snprintf(sub, sizeof sub, "%s.scales", path);
	if (!n[2]) {
		err(c, k, "%s is required: the name template of the scale tensor", sub);
	} else if (get_str(c, n[2], sub, &t) == 0) {
		int pre = c->n_err;
		check_template(c, r, n[2], t, sub);
		const char *nm = scalar(c->wname[r]);
		if (c->n_err == pre && nm && placeholders(nm) != placeholders(t)) {
			err(c, n[2],
			    "%s must use the same placeholders as weights.names.%s: one scale "
			    "tensor goes with each weight tensor",
			    sub, moe_role_names[r]);
			note(c, c->wname_key[r], "weights.names.%s declared here",
			     moe_role_names[r]);
		}
	}
	if (c->n_err != before)
		return;
	c->layout[r].quant = q;
	c->layout[r].quant_block[0] = (uint32_t)blk[0];
	c->layout[r].quant_block[1] = (uint32_t)blk[1];
	c->scales[r] = t;
	c->quant_key[r] = k;
}

static void parse_layouts(struct ctx *c)
{
	const yaml_node_t *n = c->n[S_W_LAYOUT];
	static const char *const keys[] = {"orient", "fuse", "row_blocked", "quant"};
	if (!n || is_null(n))
		return;
	if (n->type != YAML_MAPPING_NODE) {
		err(c, n, "weights.layout must be a mapping of role to layout, got %s", show(n));
		return;
	}
	for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top;
	     p++) {
		const yaml_node_t *k = moe_spec_node(c->s, p->key);
		const yaml_node_t *v = moe_spec_node(c->s, p->value);
		int r = role_of(c, k, "weights.layout");
		if (r < 0)
			continue;
		const char *role = moe_role_names[r];
		char where[96], path[128];
		snprintf(where, sizeof where, "weights.layout.%s", role);
		struct moe_layout *l = &c->layout[r];
		l->explicit_ = 1;
		if (role_fused(r))
			l->fuse = MOE_FUSE_CONCAT;
		if (!c->wname[r] && !c->wname_key[r]) {
			err(c, k, "%s is given but weights.names.%s is not", where, role);
			continue;
		}
		if (v->type != YAML_MAPPING_NODE) {
			err(c, v, "%s must be a mapping {orient, fuse, row_blocked, quant}, got %s",
			    where, show(v));
			continue;
		}
		const yaml_node_t *orient_k = NULL, *rb_k = NULL;
		for (yaml_node_pair_t *q = v->data.mapping.pairs.start;
		     q < v->data.mapping.pairs.top; q++) {
			const yaml_node_t *kk = moe_spec_node(c->s, q->key);
			const yaml_node_t *vv = moe_spec_node(c->s, q->value);
			const char *key = scalar(kk) ? scalar(kk) : "", *e;
			uint64_t b;
			snprintf(path, sizeof path, "%s.%s", where, key);
			if (!strcmp(key, "orient")) {
				orient_k = kk;
				if (!get_enum(c, vv, path, moe_orient_names, MOE_ORIENT_COUNT, &e))
					l->orient = (enum moe_orient)moe_enum_lookup(
					    moe_orient_names, MOE_ORIENT_COUNT, e);
			} else if (!strcmp(key, "fuse")) {
				if (!role_fused(r))
					err(c, kk,
					    "%s: only gate_up, gate_up_bias and shared_gate_up are "
					    "fused",
					    path);
				else if (!get_enum(c, vv, path, fuse_names, N_(fuse_names), &e))
					l->fuse = (enum moe_fuse)moe_enum_lookup(moe_fuse_names,
										 MOE_FUSE_COUNT, e);
			} else if (!strcmp(key, "row_blocked")) {
				if (get_bool(c, vv, path, &b) || !b)
					continue;
				if (!role_per_expert(r)) {
					err(c, kk, "%s: %s is not a per-expert tensor", path, role);
				} else if (c->wname[r] && strstr(scalar(c->wname[r]), "{expert}")) {
					err(c, kk,
					    "%s: the name has {expert}, so each expert is its own "
					    "tensor",
					    path);
					note(c, c->wname_key[r], "weights.names.%s declared here",
					     role);
				} else {
					l->row_blocked = 1;
					rb_k = kk;
				}
			} else if (!strcmp(key, "quant")) {
				parse_quant(c, r, kk, vv, where);
			} else {
				const char *dym = moe_closest(key, keys, N_(keys));
				if (dym)
					err(c, kk, "unknown key %s in %s (did you mean '%s'?)",
					    show(kk), where, dym);
				else
					err(c, kk, "unknown key %s in %s", show(kk), where);
			}
		}
		/* Rules between the keys of one layout, whatever their order. */
		if (c->quant_key[r] && l->quant == MOE_QUANT_MXFP4 &&
		    l->orient == MOE_ORIENT_IN_OUT) {
			err(c, c->quant_key[r],
			    "%s.quant: mxfp4 blocks are stored out-major (32 inputs of one output "
			    "row per block): orient must be out_in",
			    where);
			note(c, orient_k, "%s.orient declared here", where);
		}
		if (c->quant_key[r] && moe_quant_int4(l->quant) && l->orient == MOE_ORIENT_IN_OUT) {
			err(c, c->quant_key[r],
			    "%s.quant: %s fixes its own layout (docs/import.md): orient must be "
			    "out_in (the default)",
			    where, moe_quant_names[l->quant]);
			note(c, orient_k, "%s.orient declared here", where);
		}
		if (c->quant_key[r] && rb_k) {
			err(c, c->quant_key[r],
			    "%s.quant cannot be combined with row_blocked: quantized tensors are "
			    "per expert or stacked along the first axis",
			    where);
			note(c, rb_k, "%s.row_blocked declared here", where);
		}
	}
}

/* Cross-field rules -------------------------------------------------------------- */

#define M_(m) (1u << MOE_MODE_##m)

/* Report `slot` (given in the spec) as not applying to the router mode. */
static void not_for_mode(struct ctx *c, int slot, enum moe_mode mode, const char *why)
{
	err(c, c->k[slot], "%s does not apply to router.mode %s%s%s", slot_path[slot],
	    moe_mode_names[mode], why ? ": " : "", why ? why : "");
	note_at(c, S_MODE);
}

/* router.capacity: one form of C, and the keys that go with it. nk is the
 * router.normalize kind (NULL: none or invalid). */
static void check_capacity(struct ctx *c, const char *nk)
{
	static const int forms[] = {S_CAP_FACTOR, S_CAP_PER, S_CAP_FRAC};
	const char *need = "router.capacity needs one of factor, per_expert and token_fraction";
	if (is_null(c->n[S_CAP])) {
		err(c, c->k[S_CAP], "%s", need);
		return;
	}
	if (c->n[S_CAP]->type != YAML_MAPPING_NODE)
		return; /* reported by the schema walk */
	/* The first form in the mapping stands; each other one is the error. */
	int first = -1;
	const yaml_node_t *cap = c->n[S_CAP];
	for (yaml_node_pair_t *p = cap->data.mapping.pairs.start;
	     p < cap->data.mapping.pairs.top && first < 0; p++)
		for (int i = 0; i < N_(forms); i++)
			if (moe_spec_node(c->s, p->key) == c->k[forms[i]])
				first = forms[i];
	for (int i = 0; i < N_(forms); i++) {
		if (!c->n[forms[i]] || forms[i] == first)
			continue;
		err(c, c->k[forms[i]],
		    "router.capacity takes one of factor, per_expert and token_fraction, not both "
		    "%s and %s",
		    slot_key(first), slot_key(forms[i]));
		note_at(c, first);
	}
	if (first < 0) {
		err(c, c->k[S_CAP], "%s", need);
		return;
	}
	/* min bounds a computed C; rounding chooses how the factor formula
	 * rounds (token_fraction always rounds up, like NLLB) */
	if (first == S_CAP_PER && c->ok[S_CAP_MIN]) {
		err(c, c->k[S_CAP_MIN],
		    "router.capacity.min applies to factor and token_fraction, not to a fixed "
		    "per_expert capacity");
		note_at(c, S_CAP_PER);
	}
	if (first != S_CAP_FACTOR && c->ok[S_CAP_ROUND]) {
		err(c, c->k[S_CAP_ROUND],
		    "router.capacity.rounding applies only to factor (C = k * T * factor / E), "
		    "not to %s",
		    slot_key(first));
		note_at(c, first);
	}
	if (c->ok[S_CAP_NAD] && c->u[S_CAP_NAD]) {
		if (!nk || !strcmp(nk, "none")) {
			err(c, c->k[S_CAP_NAD],
			    "router.capacity.normalize_after_drop needs router.normalize sum or "
			    "lp: "
			    "there is no normalization to move after the drop");
			note_at(c, S_NORM);
		}
		if (c->ok[S_CAP_OVER] && !strcmp(c->str[S_CAP_OVER], "passthrough")) {
			err(c, c->k[S_CAP_NAD],
			    "router.capacity.normalize_after_drop cannot be combined with overflow "
			    "passthrough: a dropped slot's weight would be undefined");
			note_at(c, S_CAP_OVER);
		}
	}
}

static void check_router(struct ctx *c, struct moe_desc *o, uint64_t E)
{
	enum moe_mode mode = o->mode;
	unsigned m = 1u << mode;

	/* top_k */
	if ((mode == MOE_MODE_TOKEN_CHOICE || mode == MOE_MODE_TOP_P) && !c->n[S_TOPK] &&
	    c->n[S_ROUTER]) {
		err(c, key_or_parent(c, S_TOPK), "router.top_k is required for router.mode %s",
		    moe_mode_names[mode]);
	} else if (c->n[S_TOPK] && !(m & (M_(TOKEN_CHOICE) | M_(SPARSEMIXER) | M_(TOP_P)))) {
		static const char *const why[MOE_MODE_COUNT] = {
		    [MOE_MODE_DENSE] = "every expert is used",
		    [MOE_MODE_EXPERT_CHOICE] = "experts choose tokens",
		    [MOE_MODE_SOFT] = "every expert sees every token through its slots",
		    [MOE_MODE_HIERARCHICAL] = "use hierarchical.levels[].top_k",
		    [MOE_MODE_PRODUCT_KEY] = "use product_key.top_k",
		};
		not_for_mode(c, S_TOPK, mode, why[mode]);
	} else if (c->ok[S_TOPK] && mode == MOE_MODE_SPARSEMIXER && c->u[S_TOPK] != 2) {
		err(c, c->n[S_TOPK], "router.top_k must be 2 for router.mode sparsemixer, got %llu",
		    (unsigned long long)c->u[S_TOPK]);
		note_at(c, S_MODE);
	} else if (c->ok[S_TOPK] && E && c->u[S_TOPK] > E) {
		err(c, c->n[S_TOPK], "router.top_k (%llu) exceeds experts.count (%llu)",
		    (unsigned long long)c->u[S_TOPK], (unsigned long long)E);
		note_at(c, S_E_COUNT);
	}
	/* top_p: the threshold of the cumulative probability; top_k caps the count */
	if (mode == MOE_MODE_TOP_P && !c->n[S_TOP_P] && c->n[S_ROUTER])
		err(c, key_or_parent(c, S_TOP_P), "router.top_p is required for router.mode top_p");
	else if (c->n[S_TOP_P] && mode != MOE_MODE_TOP_P)
		not_for_mode(c, S_TOP_P, mode, "it is the threshold of router.mode top_p");
	if (mode == MOE_MODE_SPARSEMIXER && E && E < 2) {
		err(c, c->n[S_E_COUNT],
		    "router.mode sparsemixer needs at least 2 experts, got %llu",
		    (unsigned long long)E);
		note_at(c, S_MODE);
	}

	/* score */
	if (c->ok[S_SCORE]) {
		if (mode == MOE_MODE_PRODUCT_KEY)
			not_for_mode(c, S_SCORE, mode, "use product_key.score");
		else if ((m & (M_(SOFT) | M_(SPARSEMIXER))) && strcmp(c->str[S_SCORE], "softmax"))
			not_for_mode(c, S_SCORE, mode, "it always uses softmax");
		else if (mode == MOE_MODE_TOP_P && strcmp(c->str[S_SCORE], "softmax"))
			not_for_mode(c, S_SCORE, mode, "it sums router probabilities (softmax)");
	}

	/* normalize */
	const char *nk = c->ok[S_NORM_KIND] ? c->str[S_NORM_KIND] : NULL;
	if (c->n[S_NORM] && nk && strcmp(nk, "none") &&
	    (m & (M_(EXPERT_CHOICE) | M_(SOFT) | M_(PRODUCT_KEY))))
		not_for_mode(c, S_NORM, mode, NULL);
	if (nk && !strcmp(nk, "lp") && !c->n[S_NORM_P])
		err(c, c->n[S_NORM_KIND], "router.normalize lp needs p (the norm's exponent)");
	if (nk && strcmp(nk, "lp") && c->n[S_NORM_P]) {
		err(c, c->k[S_NORM_P], "router.normalize.p applies only to kind lp, not %s", nk);
		note_at(c, S_NORM_KIND);
	}
	if (nk && !strcmp(nk, "none"))
		for (int s = S_NORM_EPS; s <= S_NORM_MIN; s++)
			if (c->n[s]) {
				err(c, c->k[s], "%s does not apply to router.normalize none",
				    slot_path[s]);
				note_at(c, S_NORM_KIND);
			}

	/* linear bias, selection bias */
	if (c->ok[S_RBIAS] && c->u[S_RBIAS] && (m & (M_(SOFT) | M_(PRODUCT_KEY))))
		not_for_mode(c, S_RBIAS, mode, "there is no router linear layer");
	if (c->ok[S_SBIAS] && c->u[S_SBIAS] && mode != MOE_MODE_TOKEN_CHOICE)
		not_for_mode(c, S_SBIAS, mode, "it biases a top-k selection");

	/* groups */
	if (c->n[S_GROUPS] && mode != MOE_MODE_TOKEN_CHOICE) {
		not_for_mode(c, S_GROUPS, mode, NULL);
	} else if (c->ok[S_G_COUNT]) {
		uint64_t G = c->u[S_G_COUNT];
		if (E && E % G) {
			err(c, c->n[S_G_COUNT],
			    "router.groups.count (%llu) does not divide "
			    "experts.count (%llu)",
			    (unsigned long long)G, (unsigned long long)E);
			note_at(c, S_E_COUNT);
		} else if (c->ok[S_G_TOP] && c->u[S_G_TOP] > G) {
			err(c, c->n[S_G_TOP],
			    "router.groups.top (%llu) exceeds router.groups.count "
			    "(%llu)",
			    (unsigned long long)c->u[S_G_TOP], (unsigned long long)G);
			note_at(c, S_G_COUNT);
		} else if (c->ok[S_G_TOP] && E && c->ok[S_TOPK] &&
			   c->u[S_TOPK] > c->u[S_G_TOP] * (E / G)) {
			err(c, c->n[S_TOPK],
			    "router.top_k (%llu) exceeds the experts in the kept groups "
			    "(groups.top * experts.count / groups.count = %llu)",
			    (unsigned long long)c->u[S_TOPK],
			    (unsigned long long)(c->u[S_G_TOP] * (E / G)));
			note_at(c, S_G_TOP);
		}
		if (E && E % G == 0 && c->ok[S_G_SCORE] && !strcmp(c->str[S_G_SCORE], "sum_top2") &&
		    E / G * o->split < 2) {
			err(c, c->n[S_G_SCORE],
			    "router.groups.score sum_top2 needs at least 2 experts per group, got "
			    "%llu",
			    (unsigned long long)(E / G * o->split));
			note_at(c, S_G_COUNT);
		}
	}

	/* capacity */
	if (c->n[S_CAP] && mode != MOE_MODE_TOKEN_CHOICE)
		not_for_mode(c, S_CAP, mode, NULL);
	else if (c->n[S_CAP])
		check_capacity(c, nk);

	/* noise */
	const char *nz = c->ok[S_NOISE_KIND] ? c->str[S_NOISE_KIND] : NULL;
	if (nz && !strcmp(nz, "learned_gaussian") && !(m & (M_(TOKEN_CHOICE) | M_(HIERARCHICAL))))
		not_for_mode(c, S_NOISE, mode, "noisy top-k needs a top-k router");
	else if (nz && !strcmp(nz, "jitter") && (m & (M_(SOFT) | M_(PRODUCT_KEY))))
		not_for_mode(c, S_NOISE, mode, NULL);
	if (nz && !strcmp(nz, "jitter") && !c->n[S_NOISE_EPS])
		err(c, c->n[S_NOISE_KIND], "router.noise jitter needs eps (x *= U(1-eps, 1+eps))");
	if (nz && strcmp(nz, "jitter") && c->n[S_NOISE_EPS]) {
		err(c, c->k[S_NOISE_EPS], "router.noise.eps applies only to kind jitter, not %s",
		    nz);
		note_at(c, S_NOISE_KIND);
	}
	if (c->n[S_NOISE_NEPS] && !(nz && !strcmp(nz, "learned_gaussian"))) {
		err(c, c->k[S_NOISE_NEPS],
		    "router.noise.noise_epsilon applies only to kind learned_gaussian, not %s",
		    nz ? nz : "none");
		note_at(c, S_NOISE_KIND);
	}

	/* the sparse importance sums the routing weights: a router with top-k slots */
	if (c->ok[S_IMPORTANCE] && !strcmp(c->str[S_IMPORTANCE], "sparse") &&
	    (m & (M_(SOFT) | M_(PRODUCT_KEY))))
		not_for_mode(c, S_IMPORTANCE, mode, "it sums the routing weights of top-k slots");

	if (c->ok[S_APPLY] && !strcmp(c->str[S_APPLY], "input") &&
	    (m & (M_(SOFT) | M_(PRODUCT_KEY))))
		not_for_mode(c, S_APPLY, mode, NULL);
}

/* The mode block of `mode` must be given exactly when the router uses it. */
static void check_mode_blocks(struct ctx *c, enum moe_mode mode)
{
	static const struct {
		int slot;
		enum moe_mode mode;
		int required;
	} blocks[] = {
	    {S_HIER, MOE_MODE_HIERARCHICAL, 1}, {S_EC, MOE_MODE_EXPERT_CHOICE, 1},
	    {S_SOFT, MOE_MODE_SOFT, 0},         {S_PK, MOE_MODE_PRODUCT_KEY, 1},
	    {S_SM, MOE_MODE_SPARSEMIXER, 0},
	};
	for (int i = 0; i < N_(blocks); i++) {
		int s = blocks[i].slot;
		if (c->n[s] && mode != blocks[i].mode) {
			err(c, c->k[s], "%s block given, but router.mode is %s", slot_path[s],
			    moe_mode_names[mode]);
			note_at(c, S_MODE);
		} else if (!c->n[s] && mode == blocks[i].mode && blocks[i].required) {
			err(c, c->n[S_MODE], "router.mode %s needs a %s block",
			    moe_mode_names[mode], slot_path[s]);
		}
	}
}

static void parse_levels(struct ctx *c)
{
	const yaml_node_t *n = c->n[S_H_LEVELS];
	if (!n)
		return;
	if (n->type != YAML_SEQUENCE_NODE) {
		err(c, n, "hierarchical.levels must be a list of two levels, got %s", show(n));
		return;
	}
	long cnt = n->data.sequence.items.top - n->data.sequence.items.start;
	if (cnt != 2) {
		err(c, n,
		    "hierarchical.levels must have exactly two levels ({groups, top_k} then "
		    "{top_k}), got %ld",
		    cnt);
		return;
	}
	for (int i = 0; i < 2; i++) {
		const yaml_node_t *v = moe_spec_node(c->s, n->data.sequence.items.start[i]);
		const char *where = i ? "hierarchical.levels[1]" : "hierarchical.levels[0]";
		if (v->type != YAML_MAPPING_NODE) {
			err(c, v, "%s must be a mapping, got %s", where, show(v));
			continue;
		}
		if (i == 0)
			walk_map(c, v, v, where, level0_fields, N_(level0_fields));
		else
			walk_map(c, v, v, where, level1_fields, N_(level1_fields));
	}
}

static int name_ok(const char *s)
{
	for (; *s; s++)
		if (!(('a' <= *s && *s <= 'z') || ('A' <= *s && *s <= 'Z') ||
		      ('0' <= *s && *s <= '9') || *s == '.' || *s == '_' || *s == '-'))
			return 0;
	return 1;
}

static enum moe_dtype dtype_of(struct ctx *c, int slot)
{
	if (!c->ok[slot])
		return MOE_DTYPE_F32;
	return (enum moe_dtype)moe_enum_lookup(moe_dtype_names, MOE_DTYPE_COUNT, c->str[slot]);
}

/* A fused role stands for its gate part (same shape per half). */
static int role_part(int r)
{
	if (r == MOE_ROLE_GATE_UP)
		return MOE_ROLE_GATE;
	if (r == MOE_ROLE_GATE_UP_BIAS)
		return MOE_ROLE_GATE_BIAS;
	if (r == MOE_ROLE_SHARED_GATE_UP)
		return MOE_ROLE_SHARED_GATE;
	return r;
}

/* Is role r used by the resolved description? */
static int role_used(const struct moe_desc *o, int r)
{
	return moe_desc_role_shape(o, (enum moe_role)role_part(r), NULL, NULL, NULL);
}

/* A misspelt mode was reported; rules that depend on the mode would only add
 * noise. */
static int mode_known(const struct ctx *c)
{
	return !c->n[S_MODE] || c->ok[S_MODE];
}

/* experts.count as declared (before split); 0 when absent or invalid. */
static uint64_t declared_experts(const struct ctx *c)
{
	return c->ok[S_E_COUNT] ? c->u[S_E_COUNT] : 0;
}

static void resolve_model(struct ctx *c, struct moe_desc *o)
{
	/* version and name */
	if (!c->n[S_MOEGEN])
		err(c, moe_spec_root(c->s), "missing 'moegen: 1' (the spec format version)");
	else if (c->ok[S_MOEGEN] && c->u[S_MOEGEN] != 1)
		err(c, c->n[S_MOEGEN], "unsupported spec version %llu: this moegen reads version 1",
		    (unsigned long long)c->u[S_MOEGEN]);
	if (c->ok[S_NAME]) {
		const char *nm = c->str[S_NAME];
		if (!*nm)
			err(c, c->n[S_NAME], "name must not be empty");
		else if (strlen(nm) >= MOE_NAME_MAX)
			err(c, c->n[S_NAME], "name is too long (%zu bytes): at most %d", strlen(nm),
			    MOE_NAME_MAX - 1);
		else if (!name_ok(nm))
			err(c, c->n[S_NAME],
			    "name %s may only contain letters, digits, '.', '_' and '-'",
			    show(c->n[S_NAME]));
		else
			memcpy(o->name, nm, strlen(nm));
	}

	/* model */
	o->hidden = c->ok[S_HIDDEN] ? (uint32_t)c->u[S_HIDDEN] : 0;
	o->n_layers = c->ok[S_LAYERS] ? (uint32_t)c->u[S_LAYERS] : 0;
	parse_moe_layers(c, o);
	if (c->ok[S_MOE_LAYERS] && c->ok[S_LAYERS] && o->n_moe_layers < o->n_layers &&
	    !c->n[S_DENSE]) {
		err(c, c->n[S_MOE_LAYERS] ? c->n[S_MOE_LAYERS] : key_or_parent(c, S_MOE_LAYERS),
		    "%u of the %u layers are not MoE layers, but model.dense_ffn is not given",
		    o->n_layers - o->n_moe_layers, o->n_layers);
	}
	if (c->ok[S_MOE_LAYERS] && c->ok[S_LAYERS] && o->n_moe_layers == o->n_layers &&
	    c->n[S_DENSE])
		moe_diag_warning_at(c->d, moe_spec_loc(c->s, c->k[S_DENSE]),
				    "model.dense_ffn is unused: every layer is an MoE layer");
	if (c->ok[S_DENSE]) {
		struct act a = {1, MOE_ACT_SILU, 1};
		if (c->n[S_DENSE_ACT])
			a = parse_act(c, S_DENSE_ACT, 0);
		if (a.ok && a.act == MOE_ACT_SWIGLU_OAI) {
			err(c, c->n[S_DENSE_ACT],
			    "model.dense_ffn.activation swiglu_oai is only supported for experts");
			a.ok = 0;
		}
		o->dense_intermediate = c->ok[S_DENSE_I] ? (uint32_t)c->u[S_DENSE_I] : 0;
		o->dense_kind = resolve_kind(c, S_DENSE_KIND, S_DENSE_ACT, a);
		o->dense_act = a.act;
	}
	o->vocab = c->ok[S_VOCAB] ? (uint32_t)c->u[S_VOCAB] : 0;
	o->tied_embeddings = c->ok[S_TIED] ? (uint8_t)c->u[S_TIED] : 0;
	if (c->ok[S_ATTN]) {
		int mla = c->ok[S_ATTN_KIND] && !strcmp(c->str[S_ATTN_KIND], "mla");
		static const int mha_only[] = {S_ATTN_KV, S_ATTN_HD};
		static const int mla_only[] = {S_MLA_Q, S_MLA_KV, S_MLA_NOPE, S_MLA_ROPE, S_MLA_V};
		const int *bad = mla ? mha_only : mla_only;
		int n_bad = mla ? N_(mha_only) : N_(mla_only);
		for (int i = 0; i < n_bad; i++)
			if (c->n[bad[i]]) {
				err(c, c->k[bad[i]], "%s does not apply to attention kind %s",
				    slot_path[bad[i]], mla ? "mla" : "mha");
				note_at(c, S_ATTN_KIND);
			}
		if (mla)
			for (int i = 1; i < N_(mla_only); i++)
				if (!c->n[mla_only[i]])
					err(c, key_or_parent(c, S_ATTN_KIND),
					    "%s is required for attention kind mla",
					    slot_path[mla_only[i]]);
		uint32_t h = c->ok[S_ATTN_HEADS] ? (uint32_t)c->u[S_ATTN_HEADS] : 0;
		o->attn = mla ? MOE_ATTN_MLA : MOE_ATTN_MHA;
		o->attn_heads = h;
		if (mla) {
			o->mla_q_lora_rank = (uint32_t)c->u[S_MLA_Q];
			o->mla_kv_lora_rank = (uint32_t)c->u[S_MLA_KV];
			o->mla_qk_nope_dim = (uint32_t)c->u[S_MLA_NOPE];
			o->mla_qk_rope_dim = (uint32_t)c->u[S_MLA_ROPE];
			o->mla_v_dim = (uint32_t)c->u[S_MLA_V];
		} else if (h) {
			o->attn_kv_heads = c->ok[S_ATTN_KV] ? (uint32_t)c->u[S_ATTN_KV] : h;
			if (c->ok[S_ATTN_KV] && (o->attn_kv_heads > h || h % o->attn_kv_heads)) {
				err(c, c->n[S_ATTN_KV],
				    "model.attention.kv_heads (%u) must divide "
				    "model.attention.heads (%u)",
				    o->attn_kv_heads, h);
				note_at(c, S_ATTN_HEADS);
			}
			if (c->ok[S_ATTN_HD]) {
				o->attn_head_dim = (uint32_t)c->u[S_ATTN_HD];
			} else if (c->ok[S_HIDDEN] && !c->n[S_ATTN_HD]) {
				if (o->hidden % h)
					err(c, key_or_parent(c, S_ATTN_HD),
					    "model.attention.head_dim is required: heads (%u) does "
					    "not divide model.hidden (%u)",
					    h, o->hidden);
				else
					o->attn_head_dim = o->hidden / h;
			}
		}
		resolve_attention_extras(c, o, mla);
	}
	o->norm_bias = c->ok[S_MNORM] && !strcmp(c->str[S_MNORM], "layer");

	/* dtype */
	o->weight_dtype = dtype_of(c, S_DT_W);
	o->act_dtype = dtype_of(c, S_DT_A);
	o->compute = c->ok[S_DT_C] ? (enum moe_compute)moe_enum_lookup(
					 moe_compute_names, MOE_COMPUTE_COUNT, c->str[S_DT_C])
				   : MOE_COMPUTE_AUTO;
}

static void resolve_experts(struct ctx *c, struct moe_desc *o)
{
	/* router mode and score */
	o->mode = c->ok[S_MODE] ? (enum moe_mode)moe_enum_lookup(moe_mode_names, MOE_MODE_COUNT,
								 c->str[S_MODE])
				: MOE_MODE_TOKEN_CHOICE;
	enum moe_mode mode = o->mode;
	o->score =
	    c->ok[S_SCORE]
		? (enum moe_score)moe_enum_lookup(moe_score_names, MOE_SCORE_COUNT, c->str[S_SCORE])
		: MOE_SCORE_SOFTMAX;
	if (mode_known(c))
		check_mode_blocks(c, mode);
	parse_levels(c);

	/* experts */
	uint64_t E = declared_experts(c);
	uint64_t m = c->ok[S_E_SPLIT] ? c->u[S_E_SPLIT] : 1;
	int neuron = c->ok[S_E_KIND] && !strcmp(c->str[S_E_KIND], "single_neuron");
	struct act ea = {1, neuron ? MOE_ACT_RELU : MOE_ACT_SILU, !neuron};
	if (c->n[S_E_ACT])
		ea = parse_act(c, S_E_ACT, 1);
	c->expert_act = ea;
	o->kind = resolve_kind(c, S_E_KIND, S_E_ACT, ea);
	o->act = ea.act;
	if (ea.ok && ea.act == MOE_ACT_SWIGLU_OAI) {
		o->act_alpha = c->ok[S_OAI_ALPHA] ? (float)c->f[S_OAI_ALPHA] : 1.702f;
		o->act_limit = c->ok[S_OAI_LIMIT] ? (float)c->f[S_OAI_LIMIT] : 7.0f;
	}
	o->expert_bias = c->ok[S_E_BIAS] ? (uint8_t)c->u[S_E_BIAS] : 0;
	o->output_bias = c->ok[S_E_OBIAS] ? (uint8_t)c->u[S_E_OBIAS] : 0;
	if (neuron && mode_known(c) && mode != MOE_MODE_PRODUCT_KEY) {
		err(c, c->n[S_E_KIND],
		    "experts.kind single_neuron needs router.mode product_key, got %s",
		    moe_mode_names[mode]);
		note_at(c, S_MODE);
	}
	if (mode == MOE_MODE_PRODUCT_KEY && !neuron && c->n[S_EXPERTS]) {
		err(c, c->n[S_E_KIND] ? c->n[S_E_KIND] : key_or_parent(c, S_E_KIND),
		    "router.mode product_key needs experts.kind single_neuron");
		note_at(c, S_MODE);
	}
	if (neuron) {
		if (c->n[S_E_I])
			err(c, c->k[S_E_I],
			    "experts.intermediate does not apply to single_neuron "
			    "experts: each expert is one neuron");
		if (c->ok[S_E_BIAS] && c->u[S_E_BIAS])
			err(c, c->k[S_E_BIAS],
			    "experts.bias is not supported for single_neuron "
			    "experts");
	} else if (!c->n[S_E_I] && c->n[S_EXPERTS]) {
		err(c, key_or_parent(c, S_E_I), "experts.intermediate is required");
	}
	uint64_t I = neuron ? 1 : (c->ok[S_E_I] ? c->u[S_E_I] : 0);
	if (m > 1) {
		if (!((1u << mode) & (M_(TOKEN_CHOICE) | M_(DENSE) | M_(HIERARCHICAL)))) {
			not_for_mode(c, S_E_SPLIT, mode, NULL);
			m = 1;
		} else if (I && I % m) {
			err(c, c->n[S_E_SPLIT],
			    "experts.split (%llu) does not divide experts.intermediate (%llu)",
			    (unsigned long long)m, (unsigned long long)I);
			note_at(c, S_E_I);
			m = 1;
		} else if (E * m > MAX_EXPERTS) {
			err(c, c->n[S_E_SPLIT],
			    "experts.split (%llu) makes %llu experts: at most %u",
			    (unsigned long long)m, (unsigned long long)(E * m), MAX_EXPERTS);
			m = 1;
		}
	}
	o->split = (uint32_t)m;
	o->n_experts = (uint32_t)(E * m);
	o->intermediate = (uint32_t)(I / m);
	if (E && I && o->hidden && (double)E * (double)I * (double)o->hidden > MAX_EXPERT_PARAMS)
		err(c, c->n[S_E_COUNT],
		    "the routed experts are too large: experts.count * experts.intermediate * "
		    "model.hidden exceeds 2^48");
}

static void resolve_router(struct ctx *c, struct moe_desc *o)
{
	enum moe_mode mode = o->mode;
	uint64_t E = declared_experts(c), m = o->split;
	if (mode_known(c))
		check_router(c, o, E);
	uint64_t k = c->ok[S_TOPK] ? c->u[S_TOPK] : 0;
	switch (mode) {
	case MOE_MODE_TOKEN_CHOICE:
		o->top_k = (uint32_t)(k * m);
		break;
	case MOE_MODE_DENSE:
		o->top_k = o->n_experts;
		break;
	case MOE_MODE_SPARSEMIXER:
		o->top_k = 2;
		break;
	case MOE_MODE_TOP_P:
		o->top_k = (uint32_t)(k * m);
		o->top_p = c->ok[S_TOP_P] ? (float)c->f[S_TOP_P] : 1.0f;
		break;
	default:
		o->top_k = 0; /* set below for hierarchical and product_key */
		break;
	}
	o->norm = c->ok[S_NORM_KIND] ? (enum moe_norm)moe_enum_lookup(
					   moe_norm_names, MOE_NORM_COUNT, c->str[S_NORM_KIND])
				     : MOE_NORM_NONE;
	o->norm_eps = c->ok[S_NORM_EPS] ? (float)c->f[S_NORM_EPS] : 0.0f;
	o->norm_min = c->ok[S_NORM_MIN] ? (float)c->f[S_NORM_MIN] : 0.0f;
	o->norm_p = o->norm == MOE_NORM_LP && c->ok[S_NORM_P] ? (float)c->f[S_NORM_P] : 1.0f;
	o->scale = c->ok[S_SCALE] ? (float)c->f[S_SCALE] : 1.0f;
	o->router_bias = c->ok[S_RBIAS] ? (uint8_t)c->u[S_RBIAS] : 0;
	o->select_bias = c->ok[S_SBIAS] ? (uint8_t)c->u[S_SBIAS] : 0;
	o->n_groups = 1;
	o->group_top = 1;
	o->group_score = MOE_GROUP_SCORE_MAX;
	if (c->ok[S_GROUPS] && c->ok[S_G_COUNT] && c->ok[S_G_TOP]) {
		o->n_groups = (uint32_t)c->u[S_G_COUNT];
		o->group_top = (uint32_t)c->u[S_G_TOP];
		/* Like DeepSeek's official gate: max without a selection bias,
		 * the sum of the top two biased scores with one. */
		o->group_score = c->ok[S_G_SCORE]
				     ? (enum moe_group_score)moe_enum_lookup(moe_group_score_names,
									     MOE_GROUP_SCORE_COUNT,
									     c->str[S_G_SCORE])
				 : o->select_bias ? MOE_GROUP_SCORE_SUM_TOP2
						  : MOE_GROUP_SCORE_MAX;
		if (!c->ok[S_G_SCORE] && o->group_score == MOE_GROUP_SCORE_SUM_TOP2 && E &&
		    E % o->n_groups == 0 && E / o->n_groups * m < 2)
			o->group_score = MOE_GROUP_SCORE_MAX;
	}
	if (c->ok[S_CAP_FACTOR] || c->ok[S_CAP_PER] || c->ok[S_CAP_FRAC]) {
		o->capacity = c->ok[S_CAP_FACTOR] ? MOE_CAPACITY_FACTOR
			      : c->ok[S_CAP_PER]  ? MOE_CAPACITY_PER_EXPERT
						  : MOE_CAPACITY_TOKEN_FRACTION;
		o->capacity_factor = c->ok[S_CAP_FACTOR] ? (float)c->f[S_CAP_FACTOR] : 0.0f;
		o->capacity_per_expert = c->ok[S_CAP_PER] ? (uint32_t)c->u[S_CAP_PER] : 0;
		o->capacity_token_fraction = c->ok[S_CAP_FRAC] ? (float)c->f[S_CAP_FRAC] : 0.0f;
		o->capacity_min = c->ok[S_CAP_MIN] ? (uint32_t)c->u[S_CAP_MIN] : 0;
		o->capacity_floor = c->ok[S_CAP_ROUND] && !strcmp(c->str[S_CAP_ROUND], "floor");
		o->capacity_norm_after_drop = c->ok[S_CAP_NAD] ? (uint8_t)c->u[S_CAP_NAD] : 0;
		if (c->ok[S_CAP_PRIO])
			o->priority = (enum moe_priority)moe_enum_lookup(
			    moe_priority_names, MOE_PRIORITY_COUNT, c->str[S_CAP_PRIO]);
		if (c->ok[S_CAP_OVER])
			o->overflow = (enum moe_overflow)moe_enum_lookup(
			    moe_overflow_names, MOE_OVERFLOW_COUNT, c->str[S_CAP_OVER]);
	}
	if (c->ok[S_NOISE_KIND])
		o->noise = (enum moe_noise)moe_enum_lookup(moe_noise_names, MOE_NOISE_COUNT,
							   c->str[S_NOISE_KIND]);
	if (o->noise == MOE_NOISE_JITTER && c->ok[S_NOISE_EPS])
		o->jitter_eps = (float)c->f[S_NOISE_EPS];
	/* tensor2tensor's noisy_top_k_gating: std = softplus(x . W_noise) + 1e-2 */
	if (o->noise == MOE_NOISE_LEARNED_GAUSSIAN)
		o->noise_eps = c->ok[S_NOISE_NEPS] ? (float)c->f[S_NOISE_NEPS] : 1e-2f;
	o->importance_sparse = c->ok[S_IMPORTANCE] && !strcmp(c->str[S_IMPORTANCE], "sparse");
	o->apply_to =
	    c->ok[S_APPLY]
		? (enum moe_apply)moe_enum_lookup(moe_apply_names, MOE_APPLY_COUNT, c->str[S_APPLY])
		: MOE_APPLY_OUTPUT;

	/* mode blocks */
	if (mode == MOE_MODE_HIERARCHICAL && c->ok[S_L0_GROUPS] && c->ok[S_L0_TOPK] &&
	    c->ok[S_L1_TOPK]) {
		uint64_t G = c->u[S_L0_GROUPS], k1 = c->u[S_L0_TOPK], k2 = c->u[S_L1_TOPK];
		if (E && E % G) {
			err(c, c->n[S_L0_GROUPS],
			    "hierarchical.levels[0].groups (%llu) does not divide experts.count "
			    "(%llu)",
			    (unsigned long long)G, (unsigned long long)E);
			note_at(c, S_E_COUNT);
		} else {
			if (k1 > G) {
				err(c, c->n[S_L0_TOPK],
				    "hierarchical.levels[0].top_k (%llu) exceeds "
				    "hierarchical.levels[0].groups (%llu)",
				    (unsigned long long)k1, (unsigned long long)G);
				note_at(c, S_L0_GROUPS);
			}
			if (E && k2 > E / G) {
				err(c, c->n[S_L1_TOPK],
				    "hierarchical.levels[1].top_k (%llu) exceeds the experts per "
				    "group (experts.count / groups = %llu)",
				    (unsigned long long)k2, (unsigned long long)(E / G));
				note_at(c, S_L0_GROUPS);
			}
		}
		o->n_levels = 2;
		o->levels[0].groups = (uint32_t)G;
		o->levels[0].top_k = (uint32_t)k1;
		o->levels[1].top_k = (uint32_t)(k2 * m);
		o->top_k = (uint32_t)(k1 * k2 * m);
	}
	if (mode == MOE_MODE_EXPERT_CHOICE && c->ok[S_EC_CF])
		o->ec_capacity_factor = (float)c->f[S_EC_CF];
	if (mode == MOE_MODE_SOFT) {
		o->soft_slots_per_expert = c->ok[S_SOFT_P] ? (uint32_t)c->u[S_SOFT_P] : 1;
		o->soft_gamma = c->ok[S_SOFT_SCALE] && !strcmp(c->str[S_SOFT_SCALE], "channel");
		o->soft_group = c->ok[S_SOFT_GROUP] ? (uint32_t)c->u[S_SOFT_GROUP] : 0;
	}
	if (mode == MOE_MODE_SPARSEMIXER)
		o->sparsemixer_eps = c->ok[S_SM_EPS] ? (float)c->f[S_SM_EPS] : 0.01f;
	if (mode == MOE_MODE_PRODUCT_KEY && c->ok[S_PK_R]) {
		uint64_t R = c->u[S_PK_R];
		if (E && R * R != E) {
			err(c, c->n[S_PK_R],
			    "product_key.sub_keys (%llu) squared is %llu, but experts.count is "
			    "%llu",
			    (unsigned long long)R, (unsigned long long)(R * R),
			    (unsigned long long)E);
			note_at(c, S_E_COUNT);
		}
		uint64_t sk = c->ok[S_PK_SUBK] ? c->u[S_PK_SUBK] : 0;
		if (sk && sk > R) {
			err(c, c->n[S_PK_SUBK],
			    "product_key.sub_top_k (%llu) exceeds product_key.sub_keys (%llu)",
			    (unsigned long long)sk, (unsigned long long)R);
			note_at(c, S_PK_R);
		} else if (sk && c->ok[S_PK_TOPK] && c->u[S_PK_TOPK] > sk * sk) {
			err(c, c->n[S_PK_TOPK],
			    "product_key.top_k (%llu) exceeds the %llu candidates of sub_top_k "
			    "(%llu) squared",
			    (unsigned long long)c->u[S_PK_TOPK], (unsigned long long)(sk * sk),
			    (unsigned long long)sk);
			note_at(c, S_PK_SUBK);
		} else if (!sk && c->ok[S_PK_TOPK] && c->u[S_PK_TOPK] > R) {
			err(c, c->n[S_PK_TOPK],
			    "product_key.top_k (%llu) exceeds product_key.sub_keys (%llu)",
			    (unsigned long long)c->u[S_PK_TOPK], (unsigned long long)R);
			note_at(c, S_PK_R);
		}
		if (c->ok[S_PK_D] && c->u[S_PK_D] % 2)
			err(c, c->n[S_PK_D],
			    "product_key.query_dim (%llu) must be even: the query is split in two "
			    "halves",
			    (unsigned long long)c->u[S_PK_D]);
		o->pk_sub_keys = (uint32_t)R;
		o->pk_heads = c->ok[S_PK_HEADS] ? (uint32_t)c->u[S_PK_HEADS] : 1;
		o->pk_top_k = c->ok[S_PK_TOPK] ? (uint32_t)c->u[S_PK_TOPK] : 0;
		o->pk_query_dim = c->ok[S_PK_D] ? (uint32_t)c->u[S_PK_D] : 0;
		o->pk_score = c->ok[S_PK_SCORE] && !strcmp(c->str[S_PK_SCORE], "sigmoid")
				  ? MOE_SCORE_SIGMOID
				  : MOE_SCORE_SOFTMAX;
		o->pk_query_bn = c->ok[S_PK_BN] ? (uint8_t)c->u[S_PK_BN] : 0;
		o->pk_score_relu = c->ok[S_PK_SCORE] && !strcmp(c->str[S_PK_SCORE], "relu");
		o->pk_keys_per_head = c->ok[S_PK_KPH] ? (uint8_t)c->u[S_PK_KPH] : 0;
		o->pk_sub_top_k = (uint32_t)sk;
		if (c->n[S_PK_BN_EPS] && !o->pk_query_bn)
			err(c, c->k[S_PK_BN_EPS],
			    "product_key.query_bn_eps needs product_key.query_bn: true");
		/* PyTorch's BatchNorm1d default */
		o->pk_bn_eps = !o->pk_query_bn      ? 0.0f
			       : c->ok[S_PK_BN_EPS] ? (float)c->f[S_PK_BN_EPS]
						    : 1e-5f;
		o->top_k = o->pk_heads * o->pk_top_k;
	}
}

static void resolve_shared(struct ctx *c, struct moe_desc *o)
{
	int neuron = o->kind == MOE_KIND_SINGLE_NEURON;
	struct act ea = c->expert_act;
	if (c->ok[S_SHARED]) {
		uint32_t cnt = c->ok[S_SH_COUNT] ? (uint32_t)c->u[S_SH_COUNT] : 1;
		struct act sa = neuron ? (struct act){1, MOE_ACT_SILU, 1} : ea;
		if (c->n[S_SH_ACT]) {
			sa = parse_act(c, S_SH_ACT, 0);
			if (sa.ok && sa.act == MOE_ACT_SWIGLU_OAI && o->act != MOE_ACT_SWIGLU_OAI) {
				err(c, c->n[S_SH_ACT],
				    "shared_experts.activation swiglu_oai needs "
				    "experts.activation swiglu_oai (whose alpha and limit it "
				    "shares)");
				note_at(c, S_E_ACT);
			}
		}
		enum moe_kind sk = resolve_kind(c, S_SH_KIND, S_SH_ACT, sa);
		if (!c->n[S_SH_KIND] && !c->n[S_SH_ACT] && !neuron)
			sk = o->kind; /* the experts' kind, as documented */
		if (cnt && c->ok[S_SH_I]) {
			o->shared_count = cnt;
			o->shared_intermediate = (uint32_t)c->u[S_SH_I];
			o->shared_kind = sk;
			o->shared_act = sa.act;
			o->shared_gate = c->ok[S_SH_GATE] && !strcmp(c->str[S_SH_GATE], "sigmoid")
					     ? MOE_SHARED_GATE_SIGMOID
					     : MOE_SHARED_GATE_NONE;
		}
	}
}

static void resolve_weights(struct ctx *c, struct moe_desc *o)
{
	parse_names(c);
	parse_layouts(c);
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		if (!c->wname[r])
			continue;
		memcpy(o->names[r], scalar(c->wname[r]), strlen(scalar(c->wname[r])));
		o->layouts[r] = c->layout[r];
		if (role_fused(r) && !c->layout[r].explicit_)
			o->layouts[r].fuse = MOE_FUSE_CONCAT;
		if (c->scales[r])
			memcpy(o->scale_names[r], c->scales[r], strlen(c->scales[r]));
	}
	/* Only on an otherwise valid description: role shapes depend on all of it. */
	if (c->n_err)
		return;
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		if (c->wname[r] && !role_used(o, r)) {
			err(c, c->wname_key[r], "weights.names.%s: this spec has no %s tensor",
			    moe_role_names[r], moe_role_names[r]);
			continue;
		}
		uint64_t cols = 0;
		const struct moe_layout *ql = &o->layouts[r];
		if (c->wname[r] && moe_quant_int4(ql->quant) &&
		    moe_desc_role_shape(o, (enum moe_role)role_part(r), NULL, &cols, NULL)) {
			uint32_t g = ql->quant_block[1];
			if (cols % 8 || (g && cols % g))
				err(c, c->quant_key[r],
				    "weights.layout.%s.quant: the input width of %s is %llu: it "
				    "must "
				    "be a multiple of 8 and of the group (%u)",
				    moe_role_names[r], moe_role_names[r], (unsigned long long)cols,
				    g);
			continue;
		}
		if (!c->wname[r] || ql->quant != MOE_QUANT_MXFP4 ||
		    !moe_desc_role_shape(o, (enum moe_role)role_part(r), NULL, &cols, NULL))
			continue;
		if (cols % 32)
			err(c, c->quant_key[r],
			    "weights.layout.%s.quant: mxfp4 packs 32 inputs per scale, but the "
			    "input width of %s is %llu, not a multiple of 32",
			    moe_role_names[r], moe_role_names[r], (unsigned long long)cols);
	}
}

/* In this order: each part reads what the previous ones resolved. */
/* quant: how the FFN matrices are kept in the kernels' panels. A mapping
 * from a matrix role (gate, up, down, shared_gate, shared_up, shared_down, or
 * experts / shared for all of that FFN's) to none, a kind name (int8: per
 * output channel; int4: groups of 128, symmetric) or {kind, group, zero}. The
 * gate and up matrices are read together and must agree. */
static const char *const quant_keys[] = {"gate",      "up",          "down",    "shared_gate",
					 "shared_up", "shared_down", "experts", "shared"};
#define N_QUANT_KEYS (sizeof quant_keys / sizeof *quant_keys)

static int parse_qfmt(struct ctx *c, const yaml_node_t *k, const yaml_node_t *v, const char *path,
		      struct moe_qfmt *f)
{
	static const char *const keys[] = {"kind", "group", "zero"};
	const yaml_node_t *n[3] = {NULL, NULL, NULL}, *nk[3] = {NULL, NULL, NULL};
	char sub[192];
	int before = c->n_err;
	memset(f, 0, sizeof *f);
	if (v->type == YAML_SCALAR_NODE && !is_null(v)) {
		n[0] = v, nk[0] = k;
	} else if (v->type == YAML_MAPPING_NODE) {
		for (yaml_node_pair_t *p = v->data.mapping.pairs.start;
		     p < v->data.mapping.pairs.top; p++) {
			const yaml_node_t *kk = moe_spec_node(c->s, p->key);
			const char *key = scalar(kk) ? scalar(kk) : "";
			int i = 0;
			while (i < 3 && strcmp(key, keys[i]))
				i++;
			if (i < 3) {
				n[i] = moe_spec_node(c->s, p->value), nk[i] = kk;
				continue;
			}
			const char *dym = moe_closest(key, keys, 3);
			err(c, kk, "unknown key %s in %s%s%s%s", show(kk), path,
			    dym ? " (did you mean '" : "", dym ? dym : "", dym ? "'?)" : "");
		}
		if (!n[0])
			err(c, k, "%s.kind is required (none, int8, int4, fp8 or mxfp4)", path);
	} else {
		err(c, v,
		    "%s must be none, int8, int4, fp8, mxfp4 or a mapping {kind, group, zero}, "
		    "got %s",
		    path, show(v));
	}
	if (c->n_err != before)
		return -1;
	const char *kn;
	snprintf(sub, sizeof sub, "%s.kind", path);
	if (get_enum(c, n[0], sub, moe_qformat_names, MOE_QFORMAT_COUNT, &kn) != 0)
		return -1;
	f->kind = (enum moe_qformat)moe_enum_lookup(moe_qformat_names, MOE_QFORMAT_COUNT, kn);
	uint64_t g = f->kind == MOE_QFORMAT_INT4 || f->kind == MOE_QFORMAT_FP8 ? 128
		     : f->kind == MOE_QFORMAT_MXFP4                            ? 32
									       : 0,
		 z = 0;
	if (f->kind == MOE_QFORMAT_NONE) {
		for (int i = 1; i < 3; i++)
			if (nk[i])
				err(c, nk[i], "%s.%s does not apply to kind none", path, keys[i]);
		return c->n_err != before ? -1 : 0;
	}
	if (n[1]) {
		snprintf(sub, sizeof sub, "%s.group", path);
		get_uint(c, n[1], sub, 0, MAX_DIM, &g);
		if (c->n_err == before && g && g % 2)
			err(c, n[1], "%s must be even (0: one group per output channel), got %llu",
			    sub, (unsigned long long)g);
		else if (c->n_err == before && f->kind == MOE_QFORMAT_MXFP4 && g != 32)
			err(c, n[1], "%s: mxfp4 has one E8M0 scale per 32 inputs, got %llu", sub,
			    (unsigned long long)g);
	}
	if (n[2]) {
		snprintf(sub, sizeof sub, "%s.zero", path);
		get_bool(c, n[2], sub, &z);
		if (c->n_err == before && z && f->kind != MOE_QFORMAT_INT4)
			err(c, n[2],
			    "%s: %s codes are signed (no zero point); use int4 for zero points",
			    sub, moe_qformat_names[f->kind]);
	}
	f->group = (uint32_t)g;
	f->zero = (uint8_t)z;
	return c->n_err != before ? -1 : 0;
}

static void check_int8_compute(struct ctx *c, const struct moe_desc *o);

static void resolve_quant(struct ctx *c, struct moe_desc *o)
{
	const yaml_node_t *q = c->n[S_QUANT];
	if (!q || is_null(q)) {
		if (o->compute == MOE_COMPUTE_INT8)
			check_int8_compute(c, o);
		return;
	}
	if (q->type != YAML_MAPPING_NODE) {
		err(c, q, "quant must be a mapping from a matrix role to its format, got %s",
		    show(q));
		return;
	}
	struct moe_qfmt set[N_QUANT_KEYS];
	const yaml_node_t *at[N_QUANT_KEYS] = {0};
	for (yaml_node_pair_t *p = q->data.mapping.pairs.start; p < q->data.mapping.pairs.top;
	     p++) {
		const yaml_node_t *kk = moe_spec_node(c->s, p->key);
		const char *key = scalar(kk) ? scalar(kk) : "";
		size_t i = 0;
		while (i < N_QUANT_KEYS && strcmp(key, quant_keys[i]))
			i++;
		if (i == N_QUANT_KEYS) {
			const char *dym = moe_closest(key, quant_keys, N_QUANT_KEYS);
			err(c, kk,
			    "unknown key %s in quant: the expert matrices are gate, up, down, "
			    "shared_gate, shared_up, shared_down, experts, shared%s%s%s",
			    show(kk), dym ? " (did you mean '" : "", dym ? dym : "",
			    dym ? "'?)" : "");
			continue;
		}
		char path[64];
		snprintf(path, sizeof path, "quant.%s", key);
		if (parse_qfmt(c, kk, moe_spec_node(c->s, p->value), path, &set[i]) == 0)
			at[i] = kk;
	}
	/* roles -> the up and down panels of each FFN; experts/shared first,
	 * the single roles override them */
	static const struct {
		int key, mat;
	} map[] = {{6, MOE_QMAT_UP},          {6, MOE_QMAT_DOWN},      {7, MOE_QMAT_SHARED_UP},
		   {7, MOE_QMAT_SHARED_DOWN}, {0, MOE_QMAT_UP},        {1, MOE_QMAT_UP},
		   {2, MOE_QMAT_DOWN},        {3, MOE_QMAT_SHARED_UP}, {4, MOE_QMAT_SHARED_UP},
		   {5, MOE_QMAT_SHARED_DOWN}};
	const yaml_node_t *by[MOE_QMAT_COUNT] = {0};
	for (size_t i = 0; i < sizeof map / sizeof *map; i++) {
		int k = map[i].key, m = map[i].mat;
		if (!at[k])
			continue;
		if (by[m] && k < 6 && by[m] != at[6] && by[m] != at[7] &&
		    memcmp(&o->qfmt[m], &set[k], sizeof set[k]) != 0) {
			err(c, at[k],
			    "quant.%s differs from the format of the matrix read with it: gate "
			    "and up are one panel and must share kind, group and zero",
			    quant_keys[k]);
			note(c, by[m], "the other one is here");
			continue;
		}
		o->qfmt[m] = set[k];
		by[m] = at[k];
	}
	int shared = o->shared_count != 0 && o->kind != MOE_KIND_SINGLE_NEURON;
	for (int m = 0; m < MOE_QMAT_COUNT; m++) {
		struct moe_qfmt *f = &o->qfmt[m];
		if (f->kind == MOE_QFORMAT_NONE)
			continue;
		int sh = m == MOE_QMAT_SHARED_UP || m == MOE_QMAT_SHARED_DOWN;
		if (sh && !shared) {
			if (m != MOE_QMAT_SHARED_DOWN || by[m] != by[MOE_QMAT_SHARED_UP])
				err(c, by[m], "quant: the model has no shared experts to quantize");
			continue;
		}
		if (o->kind == MOE_KIND_SINGLE_NEURON) {
			err(c, by[m],
			    "quant: single-neuron experts (product_key) keep their tables in "
			    "dtype.weights; only FFN experts can be kept quantized");
			continue;
		}
		int up = m == MOE_QMAT_UP || m == MOE_QMAT_SHARED_UP;
		uint32_t K = up ? o->hidden : sh ? moe_desc_shared_width(o) : o->intermediate;
		const char *kname = up   ? "model.hidden"
				    : sh ? "the shared width"
					 : "the expert width";
		if (!K)
			continue; /* the size itself is missing or bad: reported where it is */
		if (!f->group)
			f->group = K;
		if (K % f->group) {
			err(c, by[m],
			    "quant: %s's group of %u inputs does not divide %s (%u): every "
			    "scale must cover a whole group",
			    moe_qmat_names[m], f->group, kname, K);
			continue;
		}
		if ((f->kind == MOE_QFORMAT_INT4 || f->kind == MOE_QFORMAT_MXFP4) && f->group % 2) {
			err(c, by[m],
			    "quant: int4 packs two inputs per byte, so %s's group (%u) must be "
			    "even",
			    moe_qmat_names[m], f->group);
			continue;
		}
	}
	if (moe_desc_quantized(o) && o->compute == MOE_COMPUTE_BF16)
		err(c, c->k[S_DT_C],
		    "dtype.compute bf16 with quantized experts is not generated yet: quantized "
		    "experts compute in f32 (leave dtype.compute auto or f32)");
	if (o->compute == MOE_COMPUTE_INT8)
		check_int8_compute(c, o);
}

/* dtype.compute int8 multiplies int8 activations by the kept int8 or int4
 * codes: every expert matrix must be kept in one of those, with groups of a
 * multiple of 16 inputs (the activation sums per group are taken 16 at a
 * time) and at most 65536 (the int32 sums of a group cannot overflow). */
static void check_int8_compute(struct ctx *c, const struct moe_desc *o)
{
	int shared = moe_desc_shared_width(o) != 0;
	for (int m = 0; m < MOE_QMAT_COUNT; m++) {
		if (!shared && (m == MOE_QMAT_SHARED_UP || m == MOE_QMAT_SHARED_DOWN))
			continue;
		const struct moe_qfmt *f = &o->qfmt[m];
		if (f->kind != MOE_QFORMAT_INT8 && f->kind != MOE_QFORMAT_INT4) {
			err(c, c->k[S_DT_C],
			    "dtype.compute int8 needs every expert matrix kept int8 or int4 "
			    "(quant:), but %s is %s",
			    moe_qmat_names[m],
			    f->kind == MOE_QFORMAT_NONE ? "not quantized"
							: moe_qformat_names[f->kind]);
			return; /* one message names the first */
		}
		if (f->group % 16 || f->group > 65536) {
			err(c, c->k[S_DT_C],
			    "dtype.compute int8 needs quantization groups of a multiple of 16 "
			    "inputs, at most 65536; %s's group is %u",
			    moe_qmat_names[m], f->group);
			return;
		}
	}
}

static void resolve(struct ctx *c, struct moe_desc *o)
{
	resolve_model(c, o);
	resolve_experts(c, o);
	resolve_router(c, o);
	resolve_shared(c, o);
	resolve_weights(c, o);
	resolve_quant(c, o);
}

int moe_spec_check(const struct moe_spec *s, struct moe_desc *out, struct moe_diag *d)
{
	memset(out, 0, sizeof *out);
	struct ctx *c = calloc(1, sizeof *c);
	if (!c) {
		moe_diag_error(d, "out of memory checking the spec");
		return -1;
	}
	c->s = s;
	c->d = d;
	const yaml_node_t *root = moe_spec_root(s);
	walk_map(c, root, root, NULL, root_fields, N_(root_fields));
	out->version = MOE_DESC_VERSION;
	resolve(c, out);
	int bad = c->n_err;
	free(c);
	if (bad) {
		memset(out, 0, sizeof *out);
		return -1;
	}
	return 0;
}
