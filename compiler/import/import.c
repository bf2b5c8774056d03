/* import.c: `moegen import`. A Hugging Face config.json (parsed with cJSON) is
 * read field by field by one function per model family into struct imp, the
 * spec to be; one writer prints it as explicit YAML (layers listed, names and
 * layouts filled in, every router choice spelled out). docs/import.md. */
#include "import.h"
#include "gguf.h"
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <regex.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#define IMP_MAX_NOTES 24
#define IMP_NOTE_MAX 512
/* Config files are small; a bigger one is not a config. */
#define IMP_MAX_BYTES (64u << 20)
/* Sizes above this are certainly mistakes and would overflow products. */
#define IMP_INT_MAX (1L << 30)

struct imp_layout {
	enum moe_orient orient;
	enum moe_fuse fuse;
	int row_blocked;
	enum moe_quant quant;
	long block[2]; /* fp8_block tile; int4 kinds: [1, group], 0 per channel */
};

/* The spec being built. Fields mirror docs/spec.md; defaults are the language's. */
struct imp {
	const char *path;
	const char *family; /* model_type, in the families[] spelling */
	struct moe_diag *d;
	int n_err;
	enum moe_import_stack stack;
	/* integer keys that were missing or invalid (their value is a
	 * placeholder): cross-key checks skip what depends on them */
	int n_bad;
	char bad[16][64];

	char name[MOE_NAME_MAX];
	long hidden, layers;
	unsigned char moe[MOE_MAX_LAYERS];
	long dense_inter; /* 0: every layer is MoE */
	enum moe_kind dense_kind;
	enum moe_act dense_act;
	long vocab;
	int tied; /* -1: not stated */
	enum moe_attn attn;
	long heads, kv_heads, head_dim;
	long q_lora, kv_lora, qk_nope, qk_rope, v_dim;
	int qkv_bias, out_bias, sinks, out_gate;
	enum moe_qk_norm qk_norm;
	int layer_norm; /* the model's norms are LayerNorms with bias */
	enum moe_linear_attn linear;
	unsigned char lin[MOE_MAX_LAYERS]; /* layers with linear attention */
	long lin_heads, lin_hd, lin_kh, lin_kd, lin_conv;
	enum moe_dtype wdtype;

	enum moe_mode mode;
	enum moe_score score;
	long top_k;
	enum moe_norm norm;
	double norm_eps, norm_min, norm_p;
	double scale;
	int router_bias, select_bias;
	long n_groups, group_top; /* n_groups 0: no group limit */
	enum moe_group_score group_score;
	enum moe_capacity capacity;
	long cap_per_expert;
	double cap_factor, cap_fraction;
	long cap_min;       /* 0: none */
	int cap_floor;      /* factor rounds down */
	int cap_after_drop; /* normalize the weights that survive the capacity */
	enum moe_priority priority;
	enum moe_overflow overflow;
	enum moe_noise noise;
	double jitter_eps;
	enum moe_apply apply_to;
	double sparsemixer_eps;

	enum moe_kind kind;
	long n_experts, inter;
	enum moe_act act;
	double act_alpha, act_limit;
	int expert_bias;

	long shared_count, shared_inter; /* shared_count 0: none */
	enum moe_kind shared_kind;
	enum moe_act shared_act;
	enum moe_shared_gate shared_gate;

	char names[MOE_ROLE_COUNT][MOE_NAME_MAX];
	char scales[MOE_ROLE_COUNT][MOE_NAME_MAX]; /* quantized roles' scale tensors */
	struct imp_layout layout[MOE_ROLE_COUNT];
	int output_bias;
	int gguf;                             /* weights.format gguf */
	struct moe_qfmt qfmt[MOE_QMAT_COUNT]; /* quant: (experts kept quantized) */
	int int4_zero; /* an int4 checkpoint stores zero points (kept zero: true) */

	int n_notes;
	char notes[IMP_MAX_NOTES][IMP_NOTE_MAX];
};

/* Diagnostics ---------------------------------------------------------- */

__attribute__((format(printf, 2, 3))) static void err(struct imp *m, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	moe_diag_error(m->d, "%s: %s", m->path, msg);
	m->n_err++;
}

__attribute__((format(printf, 2, 3))) static void warn(struct imp *m, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	moe_diag_warning_at(m->d, (struct moe_loc){0}, "%s: %s", m->path, msg);
}

/* A comment line of the written spec (word-wrapped by the writer). */
__attribute__((format(printf, 2, 3))) static void note(struct imp *m, const char *fmt, ...)
{
	MOE_ASSERT(m->n_notes < IMP_MAX_NOTES);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(m->notes[m->n_notes++], IMP_NOTE_MAX, fmt, ap);
	va_end(ap);
}

/* Field access ---------------------------------------------------------- */

/* JSON null is how transformers writes None: treated as absent. */
static const cJSON *field(const cJSON *o, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	return v && !cJSON_IsNull(v) ? v : NULL;
}

static const char *json_type(const cJSON *v)
{
	if (cJSON_IsBool(v))
		return "a boolean";
	if (cJSON_IsNumber(v))
		return "a number";
	if (cJSON_IsString(v))
		return "a string";
	if (cJSON_IsArray(v))
		return "an array";
	if (cJSON_IsObject(v))
		return "an object";
	return "null";
}

static void mark_bad(struct imp *m, const char *key)
{
	if (m->n_bad < (int)(sizeof m->bad / sizeof *m->bad))
		snprintf(m->bad[m->n_bad++], sizeof *m->bad, "%s", key);
}

/* Whether one of the keys (the last component of a dotted name) was bad. */
static int any_bad(const struct imp *m, const char *const *keys)
{
	for (int i = 0; i < m->n_bad; i++)
		for (const char *const *k = keys; *k; k++)
			if (!strcmp(m->bad[i], *k))
				return 1;
	return 0;
}

/* The spellings of the routed expert count and of top-k across families. */
static const char *const expert_keys[] = {"num_local_experts", "num_experts", "n_routed_experts",
					  "moe_num_experts", NULL};
static const char *const top_k_keys[] = {"num_experts_per_tok", "experts_per_token", "moe_k",
					 "moe_top_k",           "moe_topk",          NULL};

/* The dotted name of the first of keys the config has, at its top level or
 * in one of its objects (dbrx's ffn_config, llama4's text_config). */
static const char *key_in(const cJSON *root, const char *const *keys, char *buf, size_t cap)
{
	for (const char *const *k = keys; *k; k++)
		if (cJSON_GetObjectItemCaseSensitive(root, *k))
			return *k;
	const cJSON *o;
	cJSON_ArrayForEach(o, root)
	{
		if (!cJSON_IsObject(o))
			continue;
		for (const char *const *k = keys; *k; k++)
			if (cJSON_GetObjectItemCaseSensitive(o, *k)) {
				snprintf(buf, cap, "%s.%s", o->string, *k);
				return buf;
			}
	}
	return keys[0];
}

static void missing(struct imp *m, const char *pre, const char *key)
{
	err(m, "%s needs '%s%s'", m->family, pre, key);
	mark_bad(m, key);
}

static int as_int(struct imp *m, const cJSON *v, const char *pre, const char *key, long min,
		  long *out)
{
	if (!cJSON_IsNumber(v)) {
		err(m, "'%s%s' must be an integer, not %s", pre, key, json_type(v));
		mark_bad(m, key);
		return 0;
	}
	double x = v->valuedouble;
	if (!(x == floor(x)) || x < (double)min || x > (double)IMP_INT_MAX) {
		err(m, "'%s%s' must be an integer >= %ld (got %.17g)", pre, key, min, x);
		mark_bad(m, key);
		return 0;
	}
	*out = (long)x;
	return 1;
}

/* On error these return a harmless value (min or def): the error is counted
 * and the import fails, but the family function can run on to report more. */
static long req_int(struct imp *m, const cJSON *o, const char *pre, const char *key, long min)
{
	const cJSON *v = field(o, key);
	long x = min;
	if (!v)
		missing(m, pre, key);
	else if (!as_int(m, v, pre, key, min, &x))
		x = min;
	return x;
}

static long opt_int(struct imp *m, const cJSON *o, const char *pre, const char *key, long def,
		    long min)
{
	const cJSON *v = field(o, key);
	long x = def;
	if (v && !as_int(m, v, pre, key, min, &x))
		x = def;
	return x;
}

/* A number in [lo, hi]. */
static double opt_num(struct imp *m, const cJSON *o, const char *pre, const char *key, double def,
		      double lo, double hi)
{
	const cJSON *v = field(o, key);
	if (!v)
		return def;
	if (!cJSON_IsNumber(v)) {
		err(m, "'%s%s' must be a number, not %s", pre, key, json_type(v));
		return def;
	}
	double x = v->valuedouble;
	if (!isfinite(x) || x < lo || x > hi) {
		err(m, "'%s%s' must be a number in [%g, %g] (got %.17g)", pre, key, lo, hi, x);
		return def;
	}
	return x;
}

/* true/false, or 0/1 as some configs write it. */
static int opt_bool(struct imp *m, const cJSON *o, const char *pre, const char *key, int def)
{
	const cJSON *v = field(o, key);
	if (!v)
		return def;
	if (cJSON_IsBool(v))
		return cJSON_IsTrue(v);
	if (cJSON_IsNumber(v) && (v->valuedouble == 0 || v->valuedouble == 1))
		return v->valuedouble == 1;
	err(m, "'%s%s' must be a boolean, not %s", pre, key, json_type(v));
	return def;
}

static const char *opt_str(struct imp *m, const cJSON *o, const char *pre, const char *key,
			   const char *def)
{
	const cJSON *v = field(o, key);
	if (!v)
		return def;
	if (!cJSON_IsString(v)) {
		err(m, "'%s%s' must be a string, not %s", pre, key, json_type(v));
		return def;
	}
	return v->valuestring;
}

static const cJSON *opt_obj(struct imp *m, const cJSON *o, const char *pre, const char *key)
{
	const cJSON *v = field(o, key);
	if (v && !cJSON_IsObject(v)) {
		err(m, "'%s%s' must be an object, not %s", pre, key, json_type(v));
		return NULL;
	}
	return v;
}

/* A per-model value that transformers also accepts as a per-layer list: one
 * spec describes one MoE layer kind, so a list must hold one value. */
static long req_int_or_uniform_list(struct imp *m, const cJSON *o, const char *pre, const char *key,
				    long min)
{
	const cJSON *v = field(o, key);
	if (!v || !cJSON_IsArray(v))
		return req_int(m, o, pre, key, min);
	long first = min;
	int i = 0;
	const cJSON *e;
	cJSON_ArrayForEach(e, v)
	{
		long x;
		if (!as_int(m, e, pre, key, min, &x))
			return min;
		if (i++ == 0)
			first = x;
		else if (x != first) {
			err(m,
			    "'%s%s' differs between layers (%ld, %ld): one spec describes one MoE "
			    "layer kind",
			    pre, key, first, x);
			return min;
		}
	}
	if (i == 0) {
		err(m, "'%s%s' is an empty list", pre, key);
		return min;
	}
	return first;
}

/* Layer indices; each must name a layer. Returns 0 on error. */
static int layer_list(struct imp *m, const cJSON *v, const char *pre, const char *key,
		      unsigned char *mark)
{
	if (!cJSON_IsArray(v)) {
		err(m, "'%s%s' must be a list of layer indices, not %s", pre, key, json_type(v));
		return 0;
	}
	const cJSON *e;
	cJSON_ArrayForEach(e, v)
	{
		long x;
		if (!as_int(m, e, pre, key, 0, &x))
			return 0;
		if (x >= m->layers) {
			err(m, "'%s%s' names layer %ld, but the model has %ld layers", pre, key, x,
			    m->layers);
			return 0;
		}
		mark[x] = 1;
	}
	return 1;
}

/* Value spellings ------------------------------------------------------- */

static const char act_supported[] = "silu, swish, gelu, gelu_new, gelu_pytorch_tanh, relu";

static int parse_act(struct imp *m, const char *pre, const char *key, const char *s,
		     enum moe_act *out)
{
	static const struct {
		const char *hf;
		enum moe_act act;
	} map[] = {
	    {"silu", MOE_ACT_SILU},
	    {"swish", MOE_ACT_SILU},
	    {"gelu", MOE_ACT_GELU},
	    {"gelu_new", MOE_ACT_GELU_TANH},
	    {"gelu_pytorch_tanh", MOE_ACT_GELU_TANH},
	    {"relu", MOE_ACT_RELU},
	};
	for (size_t i = 0; i < sizeof map / sizeof *map; i++)
		if (strcmp(s, map[i].hf) == 0) {
			*out = map[i].act;
			return 1;
		}
	err(m, "unsupported %s%s '%s' (supported: %s)", pre, key, s, act_supported);
	return 0;
}

/* The activation of a GLU family's experts, shared expert and dense layers. */
static void glu_act(struct imp *m, const cJSON *o, const char *pre, const char *key)
{
	enum moe_act a = MOE_ACT_SILU;
	parse_act(m, pre, key, opt_str(m, o, pre, key, "silu"), &a);
	m->kind = m->shared_kind = m->dense_kind = MOE_KIND_GLU;
	m->act = m->shared_act = m->dense_act = a;
}

static void weight_dtype(struct imp *m, const cJSON *o, const char *pre)
{
	const char *key = field(o, "torch_dtype") ? "torch_dtype" : "dtype";
	const char *s = opt_str(m, o, pre, key, NULL);
	if (!s) {
		m->wdtype = MOE_DTYPE_F32;
		note(m, "The config states no torch_dtype: weights are taken as f32.");
		return;
	}
	static const struct {
		const char *hf;
		enum moe_dtype dt;
	} map[] = {
	    {"float32", MOE_DTYPE_F32},
	    {"bfloat16", MOE_DTYPE_BF16},
	    {"float16", MOE_DTYPE_F16},
	};
	for (size_t i = 0; i < sizeof map / sizeof *map; i++)
		if (strcmp(s, map[i].hf) == 0) {
			m->wdtype = map[i].dt;
			return;
		}
	err(m, "unsupported %s%s '%s' (supported: float32, bfloat16, float16)", pre, key, s);
}

/* Names and layouts ----------------------------------------------------- */

__attribute__((format(printf, 3, 4))) static void name(struct imp *m, enum moe_role r,
						       const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(m->names[r], MOE_NAME_MAX, fmt, ap);
	va_end(ap);
	MOE_ASSERT(n > 0 && n < MOE_NAME_MAX);
}

static void layout(struct imp *m, enum moe_role r, enum moe_orient o, enum moe_fuse f,
		   int row_blocked)
{
	m->layout[r] = (struct imp_layout){o, f, row_blocked, MOE_QUANT_NONE, {0, 0}};
}

/* The common per-expert GLU naming: PREFIX.experts.{expert}.G/U/D.weight. */
static void glu_names(struct imp *m, const char *prefix, const char *experts, const char *g,
		      const char *u, const char *dn)
{
	name(m, MOE_ROLE_GATE, "%s.%s.{expert}.%s.weight", prefix, experts, g);
	name(m, MOE_ROLE_UP, "%s.%s.{expert}.%s.weight", prefix, experts, u);
	name(m, MOE_ROLE_DOWN, "%s.%s.{expert}.%s.weight", prefix, experts, dn);
}

static void shared_names(struct imp *m, const char *prefix)
{
	name(m, MOE_ROLE_SHARED_GATE, "%s.gate_proj.weight", prefix);
	name(m, MOE_ROLE_SHARED_UP, "%s.up_proj.weight", prefix);
	name(m, MOE_ROLE_SHARED_DOWN, "%s.down_proj.weight", prefix);
}

/* Quantized checkpoints (quantization_config), after the family has named
 * its tensors: the quantized roles get a `quant` layout and the name of their
 * scale tensor. */
static int quantizable(enum moe_role r)
{
	return r == MOE_ROLE_GATE || r == MOE_ROLE_UP || r == MOE_ROLE_GATE_UP ||
	       r == MOE_ROLE_DOWN || r == MOE_ROLE_SHARED_GATE || r == MOE_ROLE_SHARED_UP ||
	       r == MOE_ROLE_SHARED_GATE_UP || r == MOE_ROLE_SHARED_DOWN;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), k = strlen(suffix);
	return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* The scale tensor of role r: BASE followed by SUFFIX. */
static void scale_name(struct imp *m, enum moe_role r, const char *base, const char *suffix)
{
	char t[MOE_NAME_MAX];
	int n = snprintf(t, sizeof t, "%s%s", base, suffix);
	MOE_ASSERT(n > 0 && n < MOE_NAME_MAX);
	memcpy(m->scales[r], t, (size_t)n + 1);
}

/* transformers' fine-grained fp8 (DeepSeek-V3): every quantized nn.Linear
 * X.weight is e4m3 with X.weight_scale_inv beside it, one f32 per tile. */
static void quant_fp8(struct imp *m, const cJSON *q, const char *qpre)
{
	const char *fmt = opt_str(m, q, qpre, "fmt", "e4m3");
	if (strcmp(fmt, "e4m3") != 0) {
		err(m, "unsupported %sfmt '%s' (supported: e4m3)", qpre, fmt);
		return;
	}
	/* FineGrainedFP8Config's default tile */
	long blk[2] = {128, 128};
	const cJSON *b = field(q, "weight_block_size");
	if (b) {
		if (!cJSON_IsArray(b) || cJSON_GetArraySize(b) != 2) {
			err(m, "'%sweight_block_size' must be a list of two integers", qpre);
			return;
		}
		for (int i = 0; i < 2; i++)
			if (!as_int(m, cJSON_GetArrayItem(b, i), qpre, "weight_block_size", 1,
				    &blk[i]))
				return;
		if (blk[0] > 65536 || blk[1] > 65536) {
			err(m, "'%sweight_block_size' [%ld, %ld] exceeds 65536", qpre, blk[0],
			    blk[1]);
			return;
		}
	}
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		if (!m->names[r][0] || !quantizable((enum moe_role)r))
			continue;
		if (m->layout[r].fuse != MOE_FUSE_NONE || m->layout[r].row_blocked ||
		    !ends_with(m->names[r], ".weight")) {
			err(m,
			    "unsupported %squant_method fp8 for %s: its %s tensor '%s' is not an "
			    "nn.Linear weight with a weight_scale_inv beside it",
			    qpre, m->family, moe_role_names[r], m->names[r]);
			return;
		}
		scale_name(m, (enum moe_role)r, m->names[r], "_scale_inv");
		m->layout[r].quant = MOE_QUANT_FP8_BLOCK;
		m->layout[r].block[0] = blk[0];
		m->layout[r].block[1] = blk[1];
	}
	const char *acts = opt_str(m, q, qpre, "activation_scheme", "dynamic");
	note(m,
	     "Checkpoint quantization: the expert and shared-expert matrices are fp8 e4m3 with "
	     "one f32 scale per [%ld, %ld] tile (*.weight_scale_inv, multiplied: W = q * s); the "
	     "router and the other tensors are %s. Kept in fp8 by the kernels (quant:) when the "
	     "tile's width divides the inputs, else dequantized at load; activations stay f32 "
	     "(activation_scheme %s quantizes them per 1x128 block in fp8 inference).",
	     blk[0], blk[1], moe_dtype_names[m->wdtype], acts);
}

/* gpt-oss MXFP4: the expert matrices are PREFIX_blocks [E, out, in/32, 16]
 * (out-major, unlike the in-major bf16 export) with PREFIX_scales. */
static void quant_mxfp4(struct imp *m, const char *qpre)
{
	if (strcmp(m->family, "gpt_oss") != 0) {
		err(m, "unsupported %squant_method mxfp4 for %s (supported for gpt_oss)", qpre,
		    m->family);
		return;
	}
	static const enum moe_role roles[] = {MOE_ROLE_GATE_UP, MOE_ROLE_DOWN};
	for (int i = 0; i < 2; i++) {
		enum moe_role r = roles[i];
		MOE_ASSERT(m->names[r][0]);
		char base[MOE_NAME_MAX];
		snprintf(base, sizeof base, "%s", m->names[r]);
		name(m, r, "%s_blocks", base);
		scale_name(m, r, base, "_scales");
		m->layout[r].orient = MOE_ORIENT_OUT_IN;
		m->layout[r].quant = MOE_QUANT_MXFP4;
	}
	note(m,
	     "Checkpoint quantization: mxfp4 expert matrices, *_blocks [E, out, in/32, 16] u8 "
	     "(two E2M1 codes per byte, low nibble first) with *_scales [E, out, in/32] E8M0: "
	     "out-major, unlike the in-major bf16 export. Kept in mxfp4 by the kernels (quant:).");
}

/* The int4 checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized): every
 * routed and shared expert matrix X.weight is stored as X.CODES with its
 * scales X.SCALES (zero points and the rest beside it, docs/import.md). */
static void int4_names(struct imp *m, enum moe_quant kind, long group, int zero, const char *qpre,
		       const char *method)
{
	const char *codes = kind == MOE_QUANT_PACK_QUANTIZED ? ".weight_packed" : ".qweight";
	const char *scales = kind == MOE_QUANT_PACK_QUANTIZED ? ".weight_scale" : ".scales";
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		if (!m->names[r][0] || !quantizable((enum moe_role)r))
			continue;
		if (m->layout[r].fuse != MOE_FUSE_NONE || m->layout[r].row_blocked ||
		    m->layout[r].orient != MOE_ORIENT_OUT_IN ||
		    !ends_with(m->names[r], ".weight") ||
		    (moe_role_qmat((enum moe_role)r) <= MOE_QMAT_DOWN &&
		     !strstr(m->names[r], "{expert}"))) {
			err(m,
			    "unsupported %squant_method %s for %s: its %s tensor '%s' is not one "
			    "nn.Linear weight per expert",
			    qpre, method, m->family, moe_role_names[r], m->names[r]);
			return;
		}
		char base[MOE_NAME_MAX];
		size_t n = strlen(m->names[r]) - strlen(".weight");
		snprintf(base, sizeof base, "%.*s", (int)n, m->names[r]);
		name(m, (enum moe_role)r, "%s%s", base, codes);
		scale_name(m, (enum moe_role)r, base, scales);
		m->layout[r].quant = kind;
		m->layout[r].block[0] = 1;
		m->layout[r].block[1] = group;
	}
	m->int4_zero = zero;
}

/* bits (or AutoAWQ's w_bit) must be 4; group_size (q_group_size) is -1 (one
 * group per output channel, written 0) or a positive multiple of 8. */
static int int4_bits_group(struct imp *m, const cJSON *q, const char *qpre, const char *method,
			   long *group)
{
	const char *bk = field(q, "bits") || !field(q, "w_bit") ? "bits" : "w_bit";
	const char *gk =
	    field(q, "group_size") || !field(q, "q_group_size") ? "group_size" : "q_group_size";
	long bits = opt_int(m, q, qpre, bk, 4, 0);
	long g = opt_int(m, q, qpre, gk, 128, -1);
	if (bits != 4) {
		err(m, "unsupported %s%s %ld for quant_method %s (supported: 4)", qpre, bk, bits,
		    method);
		return 0;
	}
	if (g == 0 || (g > 0 && g % 8)) {
		err(m, "unsupported %s%s %ld (supported: -1 or a multiple of 8)", qpre, gk, g);
		return 0;
	}
	*group = g < 0 ? 0 : g;
	return 1;
}

/* The module of role r in layer L: its name without ".weight" / the codes'
 * suffix, {layer} replaced (routers are named per layer only). */
static void module_name(const struct imp *m, enum moe_role r, long L, char *out, size_t cap)
{
	char t[MOE_NAME_MAX];
	snprintf(t, sizeof t, "%s", m->names[r]);
	char *dot = strrchr(t, '.');
	if (dot)
		*dot = 0;
	char *p = strstr(t, "{layer}");
	if (p)
		snprintf(out, cap, "%.*s%ld%s", (int)(p - t), t, L, p + strlen("{layer}"));
	else
		snprintf(out, cap, "%s", t);
	p = strstr(out, "{expert}");
	if (p)
		memmove(p + 1, p + strlen("{expert}"), strlen(p + strlen("{expert}")) + 1),
		    *p = '0';
}

/* compressed-tensors' ignore entry e covers module mod: equal, or "re:P"
 * with P matching from the start (Python's re.match; POSIX ERE here). -1:
 * the pattern does not compile. */
static int ignore_match(const char *e, const char *mod)
{
	if (strncmp(e, "re:", 3) != 0)
		return strcmp(e, mod) == 0;
	char pat[600];
	snprintf(pat, sizeof pat, "^(%s)", e + 3);
	regex_t re;
	if (regcomp(&re, pat, REG_EXTENDED | REG_NOSUB) != 0)
		return -1;
	int hit = regexec(&re, mod, 0, NULL, 0) == 0;
	regfree(&re);
	return hit;
}

/* GPTQ (auto-gptq / optimum / GPTQModel): qweight, qzeros, scales, g_idx. */
static void quant_gptq(struct imp *m, const cJSON *q, const char *qpre)
{
	long g;
	if (!int4_bits_group(m, q, qpre, "gptq", &g))
		return;
	int act = opt_bool(m, q, qpre, "desc_act", 0);
	if (opt_bool(m, q, qpre, "is_marlin_format", 0)) {
		err(m, "unsupported %sis_marlin_format true (supported: the gptq layout)", qpre);
		return;
	}
	const char *fmt = opt_str(m, q, qpre, "checkpoint_format", "gptq");
	if (strcmp(fmt, "gptq") != 0 && strcmp(fmt, "gptq_v2") != 0) {
		err(m, "unsupported %scheckpoint_format '%s' (supported: gptq, gptq_v2)", qpre,
		    fmt);
		return;
	}
	const cJSON *dyn = field(q, "dynamic");
	if (dyn && !(cJSON_IsObject(dyn) && !dyn->child)) {
		err(m,
		    "unsupported %sdynamic: per-module overrides of the quantization are not read",
		    qpre);
		return;
	}
	int v2 = strcmp(fmt, "gptq_v2") == 0;
	int sym = opt_bool(m, q, qpre, "sym", 1);
	int4_names(m, v2 ? MOE_QUANT_GPTQ_V2 : MOE_QUANT_GPTQ, g, 1, qpre, "gptq");
	char gs[32] = "output channel";
	if (g)
		snprintf(gs, sizeof gs, "%ld inputs", g);
	note(m,
	     "Checkpoint quantization: GPTQ int4 (checkpoint_format %s, sym %s) expert matrices "
	     "X.qweight [K/8, N] int32 (8 codes along K, low nibble first), X.qzeros [G, N/8], "
	     "X.scales [G, N] f16, X.g_idx (%s); one group per %s. "
	     "%s. The router is read unquantized. Kept in int4 by the kernels (quant:).",
	     fmt, sym ? "true" : "false",
	     act ? "desc_act true: the group of each input, any order; the kernels read the "
		   "codes in group order and gather each expert's inputs in that order"
		 : "k / group, or act-order",
	     gs,
	     v2 ? "W = s * (q - z), z the stored zero point"
		: "W = s * (q - (z + 1)), z the stored zero point (the v1 format stores the zero "
		  "point minus one)");
}

/* AutoAWQ gemm: qweight [K, N/8], qzeros [G, N/8], scales [G, N]. */
static void quant_awq(struct imp *m, const cJSON *q, const char *qpre)
{
	long g;
	if (!int4_bits_group(m, q, qpre, "awq", &g))
		return;
	const char *ver = opt_str(m, q, qpre, "version", "gemm");
	if (strcasecmp(ver, "gemm") != 0) {
		err(m, "unsupported %sversion '%s' (supported: gemm)", qpre, ver);
		return;
	}
	if (!opt_bool(m, q, qpre, "zero_point", 1)) {
		err(m, "unsupported %szero_point false (supported: true, AWQ gemm's layout)", qpre);
		return;
	}
	if (!g) {
		err(m, "unsupported %sgroup_size -1 for awq (supported: a multiple of 8)", qpre);
		return;
	}
	int4_names(m, MOE_QUANT_AWQ, g, 1, qpre, "awq");
	note(m,
	     "Checkpoint quantization: AWQ gemm int4 expert matrices X.qweight [K, N/8] int32 "
	     "(8 outputs per int32 in the order 0 2 4 6 1 3 5 7, low nibble first), X.qzeros "
	     "[G, N/8] (the same order), X.scales [G, N] f16; groups of %ld inputs. W = s * (q - "
	     "z). The router is read unquantized. Kept in int4 by the kernels (quant:).",
	     g);
}

/* compressed-tensors pack-quantized: X.weight_packed [N, K/8], X.weight_scale
 * [N, G], X.weight_zero_point [N/8, G] (asymmetric), X.weight_shape. */
static void quant_ct(struct imp *m, const cJSON *q, const char *qpre)
{
	const char *fmt = opt_str(m, q, qpre, "format", NULL);
	if (!fmt || strcmp(fmt, "pack-quantized") != 0) {
		err(m, "unsupported %sformat '%s' (supported: pack-quantized)", qpre,
		    fmt ? fmt : "(none)");
		return;
	}
	const cJSON *sp = field(q, "sparsity_config");
	if (sp && !(cJSON_IsObject(sp) && !sp->child)) {
		err(m, "unsupported %ssparsity_config: sparse checkpoints are not read", qpre);
		return;
	}
	const cJSON *groups = opt_obj(m, q, qpre, "config_groups");
	if (!groups || !groups->child || groups->child->next) {
		err(m, "unsupported %sconfig_groups: exactly one group is read", qpre);
		return;
	}
	const cJSON *cg = groups->child;
	char gp[256], wp[300];
	snprintf(gp, sizeof gp, "%sconfig_groups.%s.", qpre, cg->string ? cg->string : "?");
	snprintf(wp, sizeof wp, "%sweights.", gp);
	const char *gfmt = opt_str(m, cg, gp, "format", NULL);
	if (gfmt && strcmp(gfmt, "pack-quantized") != 0) {
		err(m, "unsupported %sformat '%s' (supported: pack-quantized)", gp, gfmt);
		return;
	}
	if (field(cg, "input_activations") || field(cg, "output_activations")) {
		err(m, "unsupported %s%s: quantized activations are not read", gp,
		    field(cg, "input_activations") ? "input_activations" : "output_activations");
		return;
	}
	const cJSON *tg = field(cg, "targets");
	if (!cJSON_IsArray(tg) || cJSON_GetArraySize(tg) != 1 ||
	    !cJSON_IsString(cJSON_GetArrayItem(tg, 0)) ||
	    strcmp(cJSON_GetArrayItem(tg, 0)->valuestring, "Linear") != 0) {
		err(m, "unsupported %stargets (supported: [\"Linear\"] with an ignore list)", gp);
		return;
	}
	const cJSON *w = opt_obj(m, cg, gp, "weights");
	if (!w) {
		err(m, "unsupported %s: no 'weights' quantization", gp);
		return;
	}
	long bits = opt_int(m, w, wp, "num_bits", 0, 0);
	const char *type = opt_str(m, w, wp, "type", "int");
	const char *strat = opt_str(m, w, wp, "strategy", "(none)");
	int sym = opt_bool(m, w, wp, "symmetric", 1);
	long g = opt_int(m, w, wp, "group_size", 0, 0);
	const cJSON *ao = field(w, "actorder");
	if (bits != 4) {
		err(m, "unsupported %snum_bits %ld (supported: 4)", wp, bits);
		return;
	}
	if (strcmp(type, "int") != 0) {
		err(m, "unsupported %stype '%s' (supported: int)", wp, type);
		return;
	}
	if (strcmp(strat, "group") != 0 && strcmp(strat, "channel") != 0) {
		err(m, "unsupported %sstrategy '%s' (supported: group, channel)", wp, strat);
		return;
	}
	if (opt_bool(m, w, wp, "dynamic", 0)) {
		err(m, "unsupported %sdynamic true (supported: static weights)", wp);
		return;
	}
	if (ao && !(cJSON_IsBool(ao) && !cJSON_IsTrue(ao))) {
		err(m, "unsupported %sactorder: act-order checkpoints are not read", wp);
		return;
	}
	if (!strcmp(strat, "group") && (g <= 0 || g % 8)) {
		err(m, "unsupported %sgroup_size %ld (supported: a positive multiple of 8)", wp, g);
		return;
	}
	if (!strcmp(strat, "channel"))
		g = 0;
	/* only the expert matrices may be quantized: every other Linear module
	 * moegen reads must be in ignore; an expert matrix must not be */
	const cJSON *ig = field(q, "ignore");
	if (ig && !cJSON_IsArray(ig)) {
		err(m, "'%signore' must be a list, not %s", qpre, json_type(ig));
		return;
	}
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		int rq = quantizable((enum moe_role)r);
		if (!m->names[r][0] ||
		    !(rq || r == MOE_ROLE_ROUTER || r == MOE_ROLE_SHARED_EXPERT_GATE ||
		      r == MOE_ROLE_GROUP_ROUTER || r == MOE_ROLE_NOISE))
			continue;
		for (long L = 0; L < m->layers; L++) {
			if (!m->moe[L])
				continue;
			char mod[MOE_NAME_MAX + 32];
			module_name(m, (enum moe_role)r, L, mod, sizeof mod);
			int hit = 0;
			const cJSON *e;
			cJSON_ArrayForEach(e, ig)
			{
				int h = cJSON_IsString(e) ? ignore_match(e->valuestring, mod) : 0;
				if (h < 0) {
					err(m, "%signore entry '%s' is not a pattern moegen reads",
					    qpre, e->valuestring);
					return;
				}
				hit |= h;
			}
			if (rq && hit) {
				err(m,
				    "unsupported %signore: it lists the expert matrix '%s' (%s); "
				    "the "
				    "expert matrices are read all quantized",
				    qpre, mod, moe_role_names[r]);
				return;
			}
			if (!rq && !hit) {
				err(m,
				    "unsupported %signore: '%s' (%s) is not listed, so it is "
				    "quantized; moegen reads only the expert matrices quantized",
				    qpre, mod, moe_role_names[r]);
				return;
			}
			if (rq)
				break; /* one layer is enough for the expert names */
		}
	}
	int4_names(m, MOE_QUANT_PACK_QUANTIZED, g, !sym, qpre, "compressed-tensors");
	note(m,
	     "Checkpoint quantization: compressed-tensors pack-quantized int4 expert matrices "
	     "X.weight_packed [N, K/8] int32 (8 codes along K, low nibble first, each the signed "
	     "value + 8), X.weight_scale [N, G]%s, X.weight_shape; %s. W = s * (q - z). Layers "
	     "in ignore (the routers) are read unquantized. Kept in int4 by the kernels (quant:).",
	     sym ? " (symmetric: z = 8)"
		 : ", X.weight_zero_point [N/8, G] int32 (packed along N, + 8)",
	     g ? "one scale per group of inputs" : "one scale per output channel");
}

static void quantization(struct imp *m, const cJSON *o, const char *pre)
{
	const cJSON *q = opt_obj(m, o, pre, "quantization_config");
	if (!q)
		return;
	char qpre[128];
	snprintf(qpre, sizeof qpre, "%squantization_config.", pre);
	const char *method = opt_str(m, q, qpre, "quant_method", NULL);
	if (!method)
		missing(m, qpre, "quant_method");
	else if (strcmp(method, "fp8") == 0)
		quant_fp8(m, q, qpre);
	else if (strcmp(method, "mxfp4") == 0)
		quant_mxfp4(m, qpre);
	else if (strcmp(method, "gptq") == 0)
		quant_gptq(m, q, qpre);
	else if (strcmp(method, "awq") == 0)
		quant_awq(m, q, qpre);
	else if (strcmp(method, "compressed-tensors") == 0)
		quant_ct(m, q, qpre);
	else
		err(m,
		    "unsupported %squant_method '%s' (supported: fp8, mxfp4, gptq, awq, "
		    "compressed-tensors)",
		    qpre, method);
}

/* Common parts ---------------------------------------------------------- */

static int set_layers(struct imp *m, long n)
{
	m->layers = n;
	if (n > MOE_MAX_LAYERS) {
		err(m, "%ld layers exceed the spec language's limit of %d", n, MOE_MAX_LAYERS);
		m->layers = 1;
		return 0;
	}
	return 1;
}

/* hidden, layers, vocab and tied embeddings of a decoder-only config. */
static void dims(struct imp *m, const cJSON *o, const char *pre)
{
	m->hidden = req_int(m, o, pre, "hidden_size", 1);
	set_layers(m, req_int(m, o, pre, "num_hidden_layers", 1));
	m->vocab = opt_int(m, o, pre, "vocab_size", 0, 0);
	m->tied =
	    field(o, "tie_word_embeddings") ? opt_bool(m, o, pre, "tie_word_embeddings", 0) : -1;
}

static void base(struct imp *m, const cJSON *o, const char *pre)
{
	dims(m, o, pre);
	weight_dtype(m, o, pre);
}

/* Grouped-query attention, for accounting (moegen info). */
static void attention_mha(struct imp *m, const cJSON *o, const char *pre)
{
	if (!field(o, "num_attention_heads"))
		return;
	long h = opt_int(m, o, pre, "num_attention_heads", 1, 1);
	long kv = opt_int(m, o, pre, "num_key_value_heads", h, 1);
	long hd = field(o, "head_dim") ? opt_int(m, o, pre, "head_dim", 1, 1)
				       : (m->hidden % h == 0 ? m->hidden / h : 0);
	if (!hd)
		return;
	m->attn = MOE_ATTN_MHA;
	m->heads = h, m->kv_heads = kv, m->head_dim = hd;
}

static void all_layers(struct imp *m)
{
	for (long i = 0; i < m->layers; i++)
		m->moe[i] = 1;
}

/* The FFN of the non-MoE layers, read only when the model has some. */
static void dense_ffn(struct imp *m, const cJSON *o, const char *pre, const char *key)
{
	for (long i = 0; i < m->layers; i++)
		if (!m->moe[i]) {
			m->dense_inter = req_int(m, o, pre, key, 1);
			return;
		}
}

static void norm_sum(struct imp *m, double eps, double min)
{
	m->norm = MOE_NORM_SUM;
	m->norm_eps = eps;
	m->norm_min = min;
}

static void jitter(struct imp *m, double eps)
{
	if (eps > 0) {
		m->noise = MOE_NOISE_JITTER;
		m->jitter_eps = eps;
	}
}

/* Families -------------------------------------------------------------- */

static void fam_mixtral(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "num_local_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	norm_sum(m, 0, 0);
	jitter(m, opt_num(m, c, "", "router_jitter_noise", 0, 0, 1));
	all_layers(m);
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.block_sparse_moe.gate.weight");
	glu_names(m, "model.layers.{layer}.block_sparse_moe", "experts", "w1", "w3", "w2");
	note(m, "mixtral: p = softmax(x W_g^T) over all experts (f32); the top-k p are "
		"renormalized to sum 1 (no eps). Jitter noise, if any, is training-only.");
	quantization(m, c, "");
}

static void fam_phimoe(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "num_local_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	if (m->top_k != 2)
		err(m,
		    "phimoe routes with sparsemixer, which selects exactly 2 experts; "
		    "'num_experts_per_tok' is %ld",
		    m->top_k);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	m->mode = MOE_MODE_SPARSEMIXER;
	m->sparsemixer_eps = opt_num(m, c, "", "router_jitter_noise", 0.01, 0, 1);
	jitter(m, opt_num(m, c, "", "input_jitter_noise", 0, 0, 1));
	all_layers(m);
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.block_sparse_moe.gate.weight");
	glu_names(m, "model.layers.{layer}.block_sparse_moe", "experts", "w1", "w3", "w2");
	note(m, "phimoe: sparsemixer top-2 at inference with eps = router_jitter_noise: each of "
		"the two weights is a softmax over logits masked by relative distance to that "
		"round's maximum; the two are not renormalized. input_jitter_noise is "
		"training-only.");
	if (opt_bool(m, c, "", "lm_head_bias", 0))
		note(m,
		     "lm_head_bias: the output head's bias (vocab_size parameters) is not counted "
		     "by moegen info.");
}

/* qwen2_moe, qwen3_moe and qwen3_next share the router (and HF code); the
 * first and the last have the sigmoid-gated shared expert. */
static void fam_qwen(struct imp *m, const cJSON *c, int shared, int renorm_default)
{
	base(m, c, "");
	attention_mha(m, c, "");
	/* transformers 5 writes num_local_experts for qwen3_moe (num_experts is
	 * its alias); either spelling is the expert count. */
	m->n_experts = field(c, "num_experts") || !field(c, "num_local_experts")
			   ? req_int(m, c, "", "num_experts", 1)
			   : req_int(m, c, "", "num_local_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "moe_intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	int renorm = opt_bool(m, c, "", "norm_topk_prob", renorm_default);
	if (renorm)
		norm_sum(m, 0, 0);
	long step = opt_int(m, c, "", "decoder_sparse_step", 1, 1);
	unsigned char mlp_only[MOE_MAX_LAYERS] = {0};
	const cJSON *v = field(c, "mlp_only_layers");
	if (v)
		layer_list(m, v, "", "mlp_only_layers", mlp_only);
	for (long i = 0; i < m->layers; i++)
		m->moe[i] = !mlp_only[i] && (i + 1) % step == 0;
	dense_ffn(m, c, "", "intermediate_size");
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.mlp.gate.weight");
	glu_names(m, "model.layers.{layer}.mlp", "experts", "gate_proj", "up_proj", "down_proj");
	if (shared) {
		long si = req_int(m, c, "", "shared_expert_intermediate_size", 0);
		if (si > 0) {
			m->shared_count = 1;
			m->shared_inter = si;
			m->shared_gate = MOE_SHARED_GATE_SIGMOID;
			shared_names(m, "model.layers.{layer}.mlp.shared_expert");
			name(m, MOE_ROLE_SHARED_EXPERT_GATE,
			     "model.layers.{layer}.mlp.shared_expert_gate.weight");
		}
	}
	note(m, "%s: p = softmax(x W_g^T) over all experts (f32), top-k; %s", m->family,
	     renorm ? "renormalized to sum 1 (norm_topk_prob true, no eps)."
		    : "not renormalized (norm_topk_prob false): the weights sum to less than 1.");
	if (m->shared_count)
		note(m, "The shared expert is scaled per token by sigmoid(x . shared_expert_gate) "
			"and added.");
	note(m, "MoE layers: (layer + 1) %% decoder_sparse_step == 0 and not in "
		"mlp_only_layers; the others are dense (intermediate_size).");
	quantization(m, c, "");
}

static void fam_olmoe(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "num_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	int renorm = opt_bool(m, c, "", "norm_topk_prob", 0);
	if (renorm)
		norm_sum(m, 0, 0);
	all_layers(m);
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.mlp.gate.weight");
	glu_names(m, "model.layers.{layer}.mlp", "experts", "gate_proj", "up_proj", "down_proj");
	note(m, "%s: p = softmax(x W_g^T) over all experts (f32), top-k; %s", m->family,
	     renorm ? "renormalized to sum 1 (norm_topk_prob true, no eps)."
		    : "not renormalized (norm_topk_prob false).");
}

static void attention_mla(struct imp *m, const cJSON *c)
{
	if (!field(c, "num_attention_heads") || !field(c, "kv_lora_rank"))
		return;
	m->attn = MOE_ATTN_MLA;
	m->heads = opt_int(m, c, "", "num_attention_heads", 1, 1);
	m->kv_heads = m->heads;
	/* absent (V2-Lite): q is projected directly, q_lora 0 */
	m->q_lora = opt_int(m, c, "", "q_lora_rank", 0, 1);
	m->kv_lora = opt_int(m, c, "", "kv_lora_rank", 1, 1);
	m->qk_nope = req_int(m, c, "", "qk_nope_head_dim", 1);
	m->qk_rope = req_int(m, c, "", "qk_rope_head_dim", 1);
	m->v_dim = req_int(m, c, "", "v_head_dim", 1);
}

/* Group-limited routing; n_group 1 is no limit. */
static void groups(struct imp *m, long n_group, long topk_group, enum moe_group_score gs)
{
	if (n_group <= 1 || any_bad(m, expert_keys)) /* E would be a placeholder */
		return;
	if (m->n_experts % n_group != 0) {
		err(m, "'n_group' (%ld) must divide the number of experts (%ld)", n_group,
		    m->n_experts);
		return;
	}
	if (topk_group > n_group) {
		err(m, "'topk_group' (%ld) exceeds 'n_group' (%ld)", topk_group, n_group);
		return;
	}
	m->n_groups = n_group;
	m->group_top = topk_group;
	m->group_score = gs;
}

static void mtp_note(struct imp *m, const cJSON *c)
{
	long n = opt_int(m, c, "", "num_nextn_predict_layers", 0, 0);
	if (n == 1)
		note(m,
		     "Layer %ld (num_nextn_predict_layers) is the multi-token prediction module: "
		     "not part of plain inference, not imported.",
		     m->layers);
	else if (n > 1)
		note(m,
		     "Layers %ld..%ld (num_nextn_predict_layers) are the multi-token prediction "
		     "module: not part of plain inference, not imported.",
		     m->layers, m->layers + n - 1);
}

static void fam_deepseek(struct imp *m, const cJSON *c, int v3)
{
	base(m, c, "");
	attention_mla(m, c);
	m->n_experts = req_int(m, c, "", "n_routed_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "moe_intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	long first = opt_int(m, c, "", "first_k_dense_replace", v3 ? 3 : 0, 0);
	long freq = opt_int(m, c, "", "moe_layer_freq", 1, 1);
	for (long i = 0; i < m->layers; i++)
		m->moe[i] = i >= first && i % freq == 0;
	dense_ffn(m, c, "", "intermediate_size");
	long n_shared = opt_int(m, c, "", "n_shared_experts", v3 ? 1 : 0, 0);
	if (n_shared > 0) {
		m->shared_count = n_shared;
		m->shared_inter = m->inter;
		shared_names(m, "model.layers.{layer}.mlp.shared_experts");
	}
	m->scale = opt_num(m, c, "", "routed_scaling_factor", v3 ? 2.5 : 1.0, 1e-30, 1e30);
	int renorm = opt_bool(m, c, "", "norm_topk_prob", v3);
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.mlp.gate.weight");
	glu_names(m, "model.layers.{layer}.mlp", "experts", "gate_proj", "up_proj", "down_proj");

	const char *method = opt_str(m, c, "", "topk_method", v3 ? "noaux_tc" : "greedy");
	const char *scoring = opt_str(m, c, "", "scoring_func", v3 ? "sigmoid" : "softmax");
	if (!v3) {
		if (strcmp(scoring, "softmax") != 0)
			err(m, "unsupported scoring_func '%s' for deepseek_v2 (supported: softmax)",
			    scoring);
		if (strcmp(method, "group_limited_greedy") == 0) {
			long ng = req_int(m, c, "", "n_group", 1);
			long tg = req_int(m, c, "", "topk_group", 1);
			groups(m, ng, tg, MOE_GROUP_SCORE_MAX);
		} else if (strcmp(method, "greedy") != 0) {
			err(m,
			    "unsupported topk_method '%s' for deepseek_v2 (supported: greedy, "
			    "group_limited_greedy)",
			    method);
		}
		if (renorm)
			warn(m,
			     "norm_topk_prob true is ignored: deepseek_v2 softmax routing is never "
			     "renormalized (transformers, official inference)");
		note(m,
		     "deepseek_v2: s = softmax(x W_g^T) over all experts (f32); %s; the "
		     "weights are the top-k s, not renormalized, times routed_scaling_factor.",
		     m->n_groups ? "top-k within the topk_group groups of highest max score "
				   "(other experts masked)"
				 : "top-k (greedy)");
	} else {
		if (strcmp(method, "noaux_tc") != 0)
			err(m, "unsupported topk_method '%s' for deepseek_v3 (supported: noaux_tc)",
			    method);
		if (strcmp(scoring, "sigmoid") != 0)
			err(m, "unsupported scoring_func '%s' for deepseek_v3 (supported: sigmoid)",
			    scoring);
		long ng = opt_int(m, c, "", "n_group", 8, 1);
		long tg = opt_int(m, c, "", "topk_group", 4, 1);
		groups(m, ng, tg, MOE_GROUP_SCORE_SUM_TOP2);
		m->score = MOE_SCORE_SIGMOID;
		m->select_bias = 1;
		if (renorm)
			norm_sum(m, 1e-20, 0);
		name(m, MOE_ROLE_SELECT_BIAS,
		     "model.layers.{layer}.mlp.gate.e_score_correction_bias");
		note(m,
		     "deepseek_v3: s = sigmoid(x W_g^T) (f32); experts are chosen by s + "
		     "e_score_correction_bias%s; the weights are the unbiased s, %s, times "
		     "routed_scaling_factor.",
		     m->n_groups ? " within the topk_group groups of highest group score (sum of "
				   "the two best biased scores; other experts -inf)"
				 : "",
		     renorm ? "renormalized (sum + 1e-20)" : "not renormalized");
		mtp_note(m, c);
	}
	if (n_shared > 0)
		note(m,
		     "Shared experts (n_shared_experts %ld): one GLU of width n_shared_experts * "
		     "moe_intermediate_size, added unweighted.",
		     n_shared);
	note(m, "MoE layers: layer >= first_k_dense_replace and layer %% moe_layer_freq == 0; "
		"the others are dense (intermediate_size).");
	quantization(m, c, "");
}

static void fam_glm4_moe(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "n_routed_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "moe_intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	long first = opt_int(m, c, "", "first_k_dense_replace", 1, 0);
	for (long i = 0; i < m->layers; i++)
		m->moe[i] = i >= first;
	dense_ffn(m, c, "", "intermediate_size");
	long n_shared = opt_int(m, c, "", "n_shared_experts", 1, 0);
	if (n_shared > 0) {
		m->shared_count = n_shared;
		m->shared_inter = m->inter;
		shared_names(m, "model.layers.{layer}.mlp.shared_experts");
	}
	m->scale = opt_num(m, c, "", "routed_scaling_factor", 1.0, 1e-30, 1e30);
	int renorm = opt_bool(m, c, "", "norm_topk_prob", 1);
	long ng = opt_int(m, c, "", "n_group", 1, 1);
	long tg = opt_int(m, c, "", "topk_group", 1, 1);
	groups(m, ng, tg, MOE_GROUP_SCORE_SUM_TOP2);
	m->score = MOE_SCORE_SIGMOID;
	m->select_bias = 1;
	if (renorm)
		norm_sum(m, 1e-20, 0);
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.mlp.gate.weight");
	name(m, MOE_ROLE_SELECT_BIAS, "model.layers.{layer}.mlp.gate.e_score_correction_bias");
	glu_names(m, "model.layers.{layer}.mlp", "experts", "gate_proj", "up_proj", "down_proj");
	note(m,
	     "glm4_moe: the DeepSeek-V3 router. s = sigmoid(x W_g^T) (f32); experts chosen by s + "
	     "e_score_correction_bias%s; weights are the unbiased s, %s, times "
	     "routed_scaling_factor.",
	     m->n_groups ? " within the best topk_group groups (sum of top-2 biased scores)" : "",
	     renorm ? "renormalized (sum + 1e-20)" : "not renormalized");
	if (n_shared > 0)
		note(m,
		     "Shared experts: one GLU of width n_shared_experts * moe_intermediate_size, "
		     "added unweighted. Layers before first_k_dense_replace are dense.");
	mtp_note(m, c);
	quantization(m, c, "");
}

static void fam_dbrx(struct imp *m, const cJSON *c)
{
	m->hidden = req_int(m, c, "", "d_model", 1);
	set_layers(m, req_int(m, c, "", "n_layers", 1));
	m->vocab = opt_int(m, c, "", "vocab_size", 0, 0);
	m->tied =
	    field(c, "tie_word_embeddings") ? opt_bool(m, c, "", "tie_word_embeddings", 0) : -1;
	weight_dtype(m, c, "");
	const cJSON *f = opt_obj(m, c, "", "ffn_config");
	if (!f) {
		if (!field(c, "ffn_config"))
			missing(m, "", "ffn_config");
		return;
	}
	const char *fp = "ffn_config.";
	if (field(c, "n_heads")) {
		long h = opt_int(m, c, "", "n_heads", 1, 1);
		const cJSON *a = opt_obj(m, c, "", "attn_config");
		long kv = a ? opt_int(m, a, "attn_config.", "kv_n_heads", h, 1) : h;
		if (m->hidden % h == 0) {
			m->attn = MOE_ATTN_MHA;
			m->heads = h, m->kv_heads = kv, m->head_dim = m->hidden / h;
		}
	}
	m->n_experts = req_int(m, f, fp, "moe_num_experts", 1);
	m->top_k = req_int(m, f, fp, "moe_top_k", 1);
	m->inter = req_int(m, f, fp, "ffn_hidden_size", 1);
	const cJSON *act = opt_obj(m, f, fp, "ffn_act_fn");
	enum moe_act a = MOE_ACT_SILU;
	if (act)
		parse_act(m, "ffn_config.ffn_act_fn.", "name",
			  opt_str(m, act, "ffn_config.ffn_act_fn.", "name", "silu"), &a);
	m->kind = MOE_KIND_GLU;
	m->act = a;
	/* An explicit null disables normalization; an absent key is the default 1. */
	const cJSON *nv = cJSON_GetObjectItemCaseSensitive(f, "moe_normalize_expert_weights");
	if (!(nv && cJSON_IsNull(nv))) {
		m->norm = MOE_NORM_LP;
		m->norm_p = opt_num(m, f, fp, "moe_normalize_expert_weights", 1.0, 1e-30, 1e30);
	}
	jitter(m, opt_num(m, f, fp, "moe_jitter_eps", 0, 0, 1));
	if (opt_bool(m, f, fp, "uniform_expert_assignment", 0))
		err(m, "unsupported ffn_config.uniform_expert_assignment true (a load-testing "
		       "mode that ignores the router)");
	all_layers(m);
	const char *p = "transformer.blocks.{layer}.ffn";
	name(m, MOE_ROLE_ROUTER, "%s.router.layer.weight", p);
	name(m, MOE_ROLE_GATE, "%s.experts.mlp.w1", p);
	name(m, MOE_ROLE_UP, "%s.experts.mlp.v1", p);
	name(m, MOE_ROLE_DOWN, "%s.experts.mlp.w2", p);
	layout(m, MOE_ROLE_GATE, MOE_ORIENT_OUT_IN, MOE_FUSE_NONE, 1);
	layout(m, MOE_ROLE_UP, MOE_ORIENT_OUT_IN, MOE_FUSE_NONE, 1);
	layout(m, MOE_ROLE_DOWN, MOE_ORIENT_IN_OUT, MOE_FUSE_NONE, 1);
	if (m->norm == MOE_NORM_LP)
		note(m, "dbrx: p = softmax(x W_r^T) over all experts, top-k, w /= ||w||_p with p = "
			"moe_normalize_expert_weights (no eps).");
	else
		note(m, "dbrx: p = softmax(x W_r^T) over all experts, top-k, not renormalized "
			"(moe_normalize_expert_weights null).");
	note(m, "Experts are stacked row-blocked: w1, v1 and w2 are [E * I, H], expert e owns rows "
		"e*I..(e+1)*I-1; w2's block is [I, H] (in-major), used without transpose.");
}

static void fam_switch(struct imp *m, const cJSON *c)
{
	int dec = m->stack == MOE_IMPORT_DECODER;
	m->hidden = req_int(m, c, "", "d_model", 1);
	long enc_layers = req_int(m, c, "", "num_layers", 1);
	set_layers(m, dec ? opt_int(m, c, "", "num_decoder_layers", enc_layers, 1) : enc_layers);
	const char *skey = dec ? "num_sparse_decoder_layers" : "num_sparse_encoder_layers";
	long n_sparse = opt_int(m, c, "", skey, 3, 0);
	m->vocab = opt_int(m, c, "", "vocab_size", 0, 0);
	m->tied =
	    field(c, "tie_word_embeddings") ? opt_bool(m, c, "", "tie_word_embeddings", 1) : -1;
	weight_dtype(m, c, "");
	m->n_experts = req_int(m, c, "", "num_experts", 1);
	m->top_k = 1;
	m->inter = req_int(m, c, "", "d_ff", 1);
	const char *proj = opt_str(m, c, "", "feed_forward_proj", "relu");
	enum moe_act a = MOE_ACT_RELU;
	if (strncmp(proj, "gated-", 6) == 0)
		err(m,
		    "unsupported feed_forward_proj '%s' for switch_transformers (its experts are "
		    "not gated; supported: relu, gelu, gelu_new, silu)",
		    proj);
	else
		parse_act(m, "", "feed_forward_proj", proj, &a);
	m->kind = m->dense_kind = MOE_KIND_MLP;
	m->act = m->dense_act = a;
	m->router_bias = opt_bool(m, c, "", "router_bias", 0);
	jitter(m, opt_num(m, c, "", "router_jitter_noise", 0.01, 0, 1));
	m->capacity = MOE_CAPACITY_PER_EXPERT;
	m->cap_per_expert = opt_int(m, c, "", "expert_capacity", 64, 1);
	m->priority = MOE_PRIORITY_POSITION;
	m->overflow = MOE_OVERFLOW_DROP;
	if (n_sparse == 0) {
		err(m, "'%s' is 0: that stack has no MoE layer", skey);
	} else {
		long step = m->layers / n_sparse;
		if (step < 1)
			step = 1;
		for (long i = 0; i < m->layers; i++)
			m->moe[i] = step == 1 || i % step == 1;
	}
	dense_ffn(m, c, "", "d_ff");
	const char *p =
	    dec ? "decoder.block.{layer}.layer.2.mlp" : "encoder.block.{layer}.layer.1.mlp";
	name(m, MOE_ROLE_ROUTER, "%s.router.classifier.weight", p);
	if (m->router_bias)
		name(m, MOE_ROLE_ROUTER_BIAS, "%s.router.classifier.bias", p);
	name(m, MOE_ROLE_UP, "%s.experts.expert_{expert}.wi.weight", p);
	name(m, MOE_ROLE_DOWN, "%s.experts.expert_{expert}.wo.weight", p);
	note(m,
	     "switch_transformers (%s stack): p = softmax(x W_c^T) in f32, top-1, weight = max "
	     "p (no renormalization). Jitter noise is training-only.",
	     dec ? "decoder" : "encoder");
	note(m, "Capacity: expert_capacity tokens per expert, by position; a token over capacity "
		"gets 0 from the MoE block (transformers >= 5). The original transformers 4 code "
		"passed a dropped token through as w * x instead (overflow: passthrough). "
		"transformers counts positions per sequence: forward one sequence per call to "
		"match.");
	note(m,
	     "MoE layers: layer %% (layers / %s) == 1 (every layer when that step is 1). The "
	     "%s stack is imported with --%s.",
	     skey, dec ? "encoder" : "decoder", dec ? "encoder" : "decoder");
	const char *rdt = opt_str(m, c, "", "router_dtype", "float32");
	if (strcmp(rdt, "float32") != 0)
		note(m, "router_dtype is %s; the router is computed in f32 here.", rdt);
}

static void fam_nllb(struct imp *m, const cJSON *c)
{
	int dec = m->stack == MOE_IMPORT_DECODER;
	const char *stk = dec ? "decoder" : "encoder";
	char key[64];
	m->hidden = req_int(m, c, "", "d_model", 1);
	snprintf(key, sizeof key, "%s_layers", stk);
	set_layers(m, req_int(m, c, "", key, 1));
	m->vocab = opt_int(m, c, "", "vocab_size", 0, 0);
	m->tied =
	    field(c, "tie_word_embeddings") ? opt_bool(m, c, "", "tie_word_embeddings", 1) : -1;
	weight_dtype(m, c, "");
	snprintf(key, sizeof key, "%s_ffn_dim", stk);
	m->inter = req_int(m, c, "", key, 1);
	m->n_experts = req_int(m, c, "", "num_experts", 2);
	m->top_k = 2;
	enum moe_act a = MOE_ACT_RELU;
	parse_act(m, "", "activation_function", opt_str(m, c, "", "activation_function", "relu"),
		  &a);
	m->kind = m->dense_kind = MOE_KIND_MLP;
	m->act = m->dense_act = a;
	m->expert_bias = 1;
	m->router_bias = opt_bool(m, c, "", "router_bias", 0);
	/* The clamp of the two weights' sum is torch.finfo(float32).eps. */
	norm_sum(m, 0, FLT_EPSILON);
	const char *policy = opt_str(m, c, "", "second_expert_policy", "all");
	if (strcmp(policy, "all") != 0)
		err(m,
		    "unsupported second_expert_policy '%s' (supported: all; 'sampling' and "
		    "'random' make the second expert random)",
		    policy);
	double frac = opt_num(m, c, "", "moe_eval_capacity_token_fraction", 1.0, -1e30, 1e30);
	if (frac < 1.0) {
		/* at eval C = ceil(frac * T); a fraction <= 0 falls back to
		 * expert_capacity. Top-1 assignments fill first. */
		if (frac > 0) {
			m->capacity = MOE_CAPACITY_TOKEN_FRACTION;
			m->cap_fraction = frac;
		} else if (field(c, "expert_capacity") ||
			   !cJSON_GetObjectItemCaseSensitive(c, "expert_capacity")) {
			m->capacity = MOE_CAPACITY_PER_EXPERT;
			m->cap_per_expert = opt_int(m, c, "", "expert_capacity", 64, 1);
		} else {
			err(m,
			    "unsupported moe_eval_capacity_token_fraction %g with expert_capacity "
			    "null: C = 2 * ceil(T / E) is not a capacity form of the spec language",
			    frac);
		}
		m->priority = opt_bool(m, c, "", "batch_prioritized_routing", 0)
				  ? MOE_PRIORITY_SCORE
				  : MOE_PRIORITY_POSITION;
		m->overflow = MOE_OVERFLOW_DROP;
		m->cap_after_drop = !opt_bool(m, c, "", "normalize_router_prob_before_dropping", 0);
	}
	double drop = opt_num(m, c, "", "moe_token_dropout", 0.2, 0, 0.999999);
	m->scale = 1.0 - drop;
	snprintf(key, sizeof key, "%s_sparse_step", stk);
	long step = opt_int(m, c, "", key, 4, 0);
	if (step == 0)
		err(m, "'%s' is 0: that stack has no MoE layer", key);
	else
		for (long i = 0; i < m->layers; i++)
			m->moe[i] = (i + 1) % step == 0;
	snprintf(key, sizeof key, "%s_ffn_dim", stk);
	dense_ffn(m, c, "", key);
	char p[64];
	snprintf(p, sizeof p, "model.%s.layers.{layer}.ffn", stk);
	name(m, MOE_ROLE_ROUTER, "%s.router.classifier.weight", p);
	if (m->router_bias)
		name(m, MOE_ROLE_ROUTER_BIAS, "%s.router.classifier.bias", p);
	name(m, MOE_ROLE_UP, "%s.experts.expert_{expert}.fc1.weight", p);
	name(m, MOE_ROLE_UP_BIAS, "%s.experts.expert_{expert}.fc1.bias", p);
	name(m, MOE_ROLE_DOWN, "%s.experts.expert_{expert}.fc2.weight", p);
	name(m, MOE_ROLE_DOWN_BIAS, "%s.experts.expert_{expert}.fc2.bias", p);
	note(m,
	     "nllb_moe (%s stack): p = softmax(x W_c^T) (f32); top-1 = argmax p, top-2 = argmax of "
	     "the logits without top-1 (the second-highest p); weights p1/(p1+p2), p2/(p1+p2) with "
	     "the sum clamped to f32 eps.",
	     stk);
	if (m->capacity == MOE_CAPACITY_NONE)
		note(m,
		     "scale = 1 - moe_token_dropout: at inference every expert output is "
		     "multiplied by it. moe_eval_capacity_token_fraction >= 1 lets no token drop.");
	else
		note(
		    m,
		    "scale = 1 - moe_token_dropout: at inference every expert output is multiplied "
		    "by it. Capacity at inference: %s per expert over the tokens of one call, "
		    "every "
		    "token's first choice before any second (%s); assignments over C are dropped "
		    "and the weights are %s.",
		    m->capacity == MOE_CAPACITY_TOKEN_FRACTION
			? "C = ceil(moe_eval_capacity_token_fraction * T)"
			: "C = expert_capacity",
		    m->priority == MOE_PRIORITY_SCORE
			? "batch_prioritized_routing: tokens by their top-1 probability"
			: "tokens in order",
		    m->cap_after_drop ? "p1/(p1+p2) over the experts kept, after the drop"
				      : "normalized before the drop "
					"(normalize_router_prob_before_dropping)");
	note(m,
	     "MoE layers: (layer + 1) %% %s_sparse_step == 0. The %s stack is imported with "
	     "--%s.",
	     stk, dec ? "encoder" : "decoder", dec ? "encoder" : "decoder");
}

static void fam_gpt_oss(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "num_local_experts", 1);
	if (field(c, "num_experts_per_tok") || !field(c, "experts_per_token"))
		m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	else
		m->top_k = req_int(m, c, "", "experts_per_token", 1);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	m->kind = MOE_KIND_GLU;
	m->act = MOE_ACT_SWIGLU_OAI;
	m->act_alpha = 1.702;
	m->act_limit = opt_num(m, c, "", "swiglu_limit", 7.0, 1e-30, 1e30);
	m->expert_bias = 1;
	m->router_bias = 1;
	norm_sum(m, 0, 0);
	all_layers(m);
	const char *p = "model.layers.{layer}.mlp";
	name(m, MOE_ROLE_ROUTER, "%s.router.weight", p);
	name(m, MOE_ROLE_ROUTER_BIAS, "%s.router.bias", p);
	name(m, MOE_ROLE_GATE_UP, "%s.experts.gate_up_proj", p);
	name(m, MOE_ROLE_GATE_UP_BIAS, "%s.experts.gate_up_proj_bias", p);
	name(m, MOE_ROLE_DOWN, "%s.experts.down_proj", p);
	name(m, MOE_ROLE_DOWN_BIAS, "%s.experts.down_proj_bias", p);
	layout(m, MOE_ROLE_GATE_UP, MOE_ORIENT_IN_OUT, MOE_FUSE_INTERLEAVE, 0);
	layout(m, MOE_ROLE_GATE_UP_BIAS, MOE_ORIENT_OUT_IN, MOE_FUSE_INTERLEAVE, 0);
	layout(m, MOE_ROLE_DOWN, MOE_ORIENT_IN_OUT, MOE_FUSE_NONE, 0);
	note(m, "gpt_oss: logits = x W_r^T + b_r; top-k on the logits, softmax over the k chosen "
		"(written as softmax over all, top-k, renormalized: the same weights).");
	note(m, "Experts: h = x W_gu + b_gu, gate = h[0::2], up = h[1::2] (interleaved); "
		"out = (min(gate, limit) * sigmoid(alpha * min(gate, limit))) * (clamp(up, -limit, "
		"limit) + 1), then W_d and b_d. gate_up_proj is [E, H, 2I], down_proj [E, I, H].");
	quantization(m, c, "");
}

static void fam_llama4(struct imp *m, const cJSON *c)
{
	const cJSON *t = c;
	const char *pre = "";
	const char *prefix = "model.layers.{layer}";
	if (strcmp(m->family, "llama4") == 0) {
		t = opt_obj(m, c, "", "text_config");
		if (!t) {
			if (!field(c, "text_config"))
				missing(m, "", "text_config");
			return;
		}
		pre = "text_config.";
		prefix = "language_model.model.layers.{layer}";
	}
	dims(m, t, pre);
	/* The multimodal config may state the dtype at the top level only. */
	if (field(t, "torch_dtype") || field(t, "dtype"))
		weight_dtype(m, t, pre);
	else
		weight_dtype(m, c, "");
	attention_mha(m, t, pre);
	m->n_experts = req_int(m, t, pre, "num_local_experts", 1);
	m->top_k = req_int(m, t, pre, "num_experts_per_tok", 1);
	m->inter = req_int(m, t, pre, "intermediate_size", 1);
	glu_act(m, t, pre, "hidden_act");
	m->score = MOE_SCORE_SIGMOID;
	m->apply_to = MOE_APPLY_INPUT;
	const cJSON *ml = field(t, "moe_layers");
	if (ml) {
		layer_list(m, ml, pre, "moe_layers", m->moe);
	} else {
		long step = opt_int(m, t, pre, "interleave_moe_layer_step", 1, 1);
		for (long i = step - 1; i < m->layers; i += step)
			m->moe[i] = 1;
	}
	dense_ffn(m, t, pre, "intermediate_size_mlp");
	m->shared_count = 1;
	m->shared_inter = m->inter;
	char p[128];
	snprintf(p, sizeof p, "%s.feed_forward", prefix);
	name(m, MOE_ROLE_ROUTER, "%s.router.weight", p);
	name(m, MOE_ROLE_GATE_UP, "%s.experts.gate_up_proj", p);
	name(m, MOE_ROLE_DOWN, "%s.experts.down_proj", p);
	layout(m, MOE_ROLE_GATE_UP, MOE_ORIENT_IN_OUT, MOE_FUSE_CONCAT, 0);
	layout(m, MOE_ROLE_DOWN, MOE_ORIENT_IN_OUT, MOE_FUSE_NONE, 0);
	snprintf(p, sizeof p, "%s.feed_forward.shared_expert", prefix);
	shared_names(m, p);
	note(m, "llama4: top-k on the logits x W_r^T, score = sigmoid(logit) (f32), no "
		"renormalization; the score multiplies the expert's input, not its output. The "
		"shared expert (width intermediate_size) is added unweighted.");
	note(m, "gate_up_proj is [E, H, 2I] (in-major, gate half first), down_proj [E, I, H]. "
		"MoE layers: moe_layers, else every interleave_moe_layer_step-th layer; the others "
		"are dense (intermediate_size_mlp).");
}

static void fam_granitemoe(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "num_local_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	norm_sum(m, 0, 0);
	all_layers(m);
	const char *p = "model.layers.{layer}.block_sparse_moe";
	name(m, MOE_ROLE_ROUTER, "%s.router.layer.weight", p);
	name(m, MOE_ROLE_GATE_UP, "%s.input_linear.weight", p);
	name(m, MOE_ROLE_DOWN, "%s.output_linear.weight", p);
	layout(m, MOE_ROLE_GATE_UP, MOE_ORIENT_OUT_IN, MOE_FUSE_CONCAT, 0);
	note(m,
	     "%s: top-k on the logits x W^T (f32), softmax over the k chosen (written as softmax "
	     "over all, top-k, renormalized: the same weights). input_linear is [E, 2I, H] (gate "
	     "half first), output_linear [E, H, I].",
	     m->family);
	double rm = opt_num(m, c, "", "residual_multiplier", 1.0, -1e30, 1e30);
	if (rm != 1.0) {
		note(m,
		     "residual_multiplier %g scales this block's output (and attention's) in the "
		     "decoder layer, before the residual add: it is outside the MoE block and not "
		     "in "
		     "this spec.",
		     rm);
		warn(
		    m,
		    "residual_multiplier %g is applied by the decoder layer outside the MoE block; "
		    "the spec language has no key for it",
		    rm);
	}
}

static void fam_jetmoe(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	m->n_experts = req_int(m, c, "", "num_local_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	glu_act(m, c, "", "activation_function");
	norm_sum(m, 0, 0);
	m->output_bias = 1;
	all_layers(m);
	const char *p = "model.layers.{layer}.mlp";
	name(m, MOE_ROLE_ROUTER, "%s.router.layer.weight", p);
	name(m, MOE_ROLE_GATE_UP, "%s.input_linear.weight", p);
	name(m, MOE_ROLE_DOWN, "%s.output_linear.weight", p);
	name(m, MOE_ROLE_OUTPUT_BIAS, "%s.bias", p);
	layout(m, MOE_ROLE_GATE_UP, MOE_ORIENT_OUT_IN, MOE_FUSE_CONCAT, 0);
	note(m,
	     "jetmoe: top-k on the logits x W^T (f32), softmax over the k chosen (written as "
	     "softmax over all, top-k, renormalized: the same weights). input_linear is [E, 2I, "
	     "H] (gate half first), output_linear [E, H, I]; the bias mlp.bias [H] is added once "
	     "after combining the experts.");
	note(m, "Attention is a mixture of attention heads (MoA): not described.");
}

static void fam_jamba(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	m->n_experts = req_int(m, c, "", "num_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	long period = opt_int(m, c, "", "expert_layer_period", 2, 1);
	long offset = opt_int(m, c, "", "expert_layer_offset", 1, 0);
	for (long i = 0; i < m->layers; i++)
		m->moe[i] = i % period == offset;
	dense_ffn(m, c, "", "intermediate_size");
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.feed_forward.router.weight");
	glu_names(m, "model.layers.{layer}.feed_forward", "experts", "gate_proj", "up_proj",
		  "down_proj");
	note(m, "jamba: p = softmax(x W_r^T) over all experts (f32), top-k, not renormalized. "
		"MoE layers: layer %% expert_layer_period == expert_layer_offset. Attention and "
		"Mamba mixers are not described.");
}

static void fam_ernie(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "moe_num_experts", 1);
	m->top_k = req_int(m, c, "", "moe_k", 1);
	m->inter = req_int(m, c, "", "moe_intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	if (opt_bool(m, c, "", "use_bias", 0))
		err(m, "unsupported use_bias true: the shared experts and dense layers would have "
		       "biases, which the spec language cannot express");
	long n_shared = opt_int(m, c, "", "moe_num_shared_experts", 2, 0);
	if (n_shared > 0) {
		m->shared_count = n_shared;
		m->shared_inter = m->inter;
		shared_names(m, "model.layers.{layer}.mlp.shared_experts");
	}
	norm_sum(m, 0, opt_num(m, c, "", "moe_norm_min", 1e-12, 0, 1e30));
	m->select_bias = 1;
	long start = opt_int(m, c, "", "moe_layer_start_index", 1, 0);
	long end = opt_int(m, c, "", "moe_layer_end_index", -1, -1);
	long interval = opt_int(m, c, "", "moe_layer_interval", 1, 1);
	if (end == -1)
		end = m->layers - 1;
	for (long i = 0; i < m->layers; i++)
		m->moe[i] = (i + 1) % interval == 0 && i >= start && i <= end;
	dense_ffn(m, c, "", "intermediate_size");
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.mlp.gate.weight");
	name(m, MOE_ROLE_SELECT_BIAS,
	     "model.layers.{layer}.mlp.moe_statics.e_score_correction_bias");
	glu_names(m, "model.layers.{layer}.mlp", "experts", "gate_proj", "up_proj", "down_proj");
	note(m, "ernie4_5_moe: p = softmax(x W_g^T) entirely in f32; experts chosen by p + "
		"e_score_correction_bias (stored [1, E]); weights are the unbiased p, divided by "
		"max(sum, moe_norm_min).");
	note(m, "Shared experts: one GLU of width moe_num_shared_experts * moe_intermediate_size, "
		"added unweighted. MoE layers: (layer + 1) %% moe_layer_interval == 0 within "
		"[moe_layer_start_index, moe_layer_end_index].");
}

static void fam_hunyuan(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int_or_uniform_list(m, c, "", "num_experts", 1);
	m->top_k = req_int_or_uniform_list(m, c, "", "moe_topk", 1);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	/* transformers 5 (HunYuanMoEV1Gate): the top-k p divided by their sum,
	 * no eps or clamp, at every k (top-1 weighs 1); no capacity at
	 * inference. The shared MLP runs in every MoE block whatever
	 * use_mixed_mlp_moe says, with intermediate_size as its width. */
	norm_sum(m, 0, 0);
	m->shared_count = 1;
	m->shared_inter = m->inter;
	shared_names(m, "model.layers.{layer}.mlp.shared_mlp");
	all_layers(m);
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.mlp.gate.wg.weight");
	glu_names(m, "model.layers.{layer}.mlp", "experts", "gate_proj", "up_proj", "down_proj");
	note(m,
	     "hunyuan_v1_moe (top-%ld): p = softmax(x W_g^T) with the gate in f32, top-k, w = p / "
	     "sum of the top-k p (no eps; at top-1 the weight is 1). No capacity: transformers 5 "
	     "drops no token at inference.",
	     m->top_k);
	note(m, "The shared MLP model.layers.{layer}.mlp.shared_mlp (width intermediate_size) is "
		"always on and added unweighted.");
}

/* A string option that has one value transformers implements (a scoring
 * function, a top-k method): any other spelling is an error naming the key. */
static void only_value(struct imp *m, const cJSON *c, const char *key, const char *value)
{
	const char *s = opt_str(m, c, "", key, value);
	if (strcmp(s, value) != 0)
		err(m, "unsupported %s '%s' for %s (supported: %s)", key, s, m->family, value);
}

/* MiniMax-Text-01: the Mixtral block. The decoder layer weighs the residual
 * and the block's output (mlp_alpha_factor, mlp_beta_factor) outside it. */
static void fam_minimax(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "num_local_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	norm_sum(m, 0, 0);
	jitter(m, opt_num(m, c, "", "router_jitter_noise", 0, 0, 1));
	all_layers(m);
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.block_sparse_moe.gate.weight");
	glu_names(m, "model.layers.{layer}.block_sparse_moe", "experts", "w1", "w3", "w2");
	note(m, "minimax: p = softmax(x W_g^T) over all experts (f32); the top-k p are "
		"renormalized to sum 1 (no eps). Jitter noise, if any, is training-only.");
	double alpha = opt_num(m, c, "", "mlp_alpha_factor", 1.0, -1e30, 1e30);
	double beta = opt_num(m, c, "", "mlp_beta_factor", 1.0, -1e30, 1e30);
	if (alpha != 1.0 || beta != 1.0) {
		note(m,
		     "The decoder layer computes residual * mlp_alpha_factor (%g) + block * "
		     "mlp_beta_factor (%g): outside the MoE block and not in this spec.",
		     alpha, beta);
		if (beta != 1.0)
			warn(m,
			     "mlp_beta_factor %g scales the block's output in the decoder layer, "
			     "outside the MoE block; the spec language has no key for it",
			     beta);
	}
}

/* MiniMax-M2: sigmoid scores, chosen with e_score_correction_bias,
 * renormalized without eps, no scale. */
static void fam_minimax_m2(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "num_local_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	only_value(m, c, "scoring_func", "sigmoid");
	m->score = MOE_SCORE_SIGMOID;
	m->select_bias = opt_bool(m, c, "", "use_routing_bias", 1);
	norm_sum(m, 0, 0);
	jitter(m, opt_num(m, c, "", "router_jitter_noise", 0, 0, 1));
	all_layers(m);
	const char *p = "model.layers.{layer}.block_sparse_moe";
	name(m, MOE_ROLE_ROUTER, "%s.gate.weight", p);
	if (m->select_bias)
		name(m, MOE_ROLE_SELECT_BIAS, "%s.e_score_correction_bias", p);
	glu_names(m, p, "experts", "w1", "w3", "w2");
	note(m,
	     "minimax_m2: s = sigmoid(x W_g^T) (f32); experts are chosen by s%s; the weights "
	     "are the unbiased s of the chosen, divided by their sum (no eps), unscaled.",
	     m->select_bias ? " + e_score_correction_bias (a buffer of the block, beside gate)"
			    : " (use_routing_bias false: no correction bias)");
}

/* dots.llm1: the DeepSeek-V3 router (sigmoid, correction bias, group limit
 * by the sum of the top-2, 1e-20 renormalization, scale) with transformers'
 * defaults: no group limit, not renormalized, scale 1. */
static void fam_dots1(struct imp *m, const cJSON *c)
{
	base(m, c, "");
	attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", "n_routed_experts", 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "moe_intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	/* Dots1Config has no scoring_func or topk_method: the router is always
	 * this one, whatever a config states for them. */
	long first = opt_int(m, c, "", "first_k_dense_replace", 0, 0);
	for (long i = 0; i < m->layers; i++)
		m->moe[i] = i >= first;
	dense_ffn(m, c, "", "intermediate_size");
	long n_shared = req_int(m, c, "", "n_shared_experts", 0);
	if (n_shared > 0) {
		m->shared_count = n_shared;
		m->shared_inter = m->inter;
		shared_names(m, "model.layers.{layer}.mlp.shared_experts");
	}
	m->scale = opt_num(m, c, "", "routed_scaling_factor", 1.0, 1e-30, 1e30);
	int renorm = opt_bool(m, c, "", "norm_topk_prob", 0);
	long ng = opt_int(m, c, "", "n_group", 1, 1);
	long tg = opt_int(m, c, "", "topk_group", 1, 1);
	groups(m, ng, tg, MOE_GROUP_SCORE_SUM_TOP2);
	m->score = MOE_SCORE_SIGMOID;
	m->select_bias = 1;
	if (renorm)
		norm_sum(m, 1e-20, 0);
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.mlp.gate.weight");
	name(m, MOE_ROLE_SELECT_BIAS, "model.layers.{layer}.mlp.gate.e_score_correction_bias");
	glu_names(m, "model.layers.{layer}.mlp", "experts", "gate_proj", "up_proj", "down_proj");
	note(m,
	     "dots1: s = sigmoid(x W_g^T) (f32); experts chosen by s + e_score_correction_bias%s; "
	     "weights are the unbiased s, %s, times routed_scaling_factor.",
	     m->n_groups ? " within the best topk_group groups (sum of top-2 biased scores)" : "",
	     renorm ? "renormalized (sum + 1e-20)" : "not renormalized");
	if (n_shared > 0)
		note(m,
		     "Shared experts: one GLU of width n_shared_experts * moe_intermediate_size, "
		     "added unweighted.");
	note(m, "MoE layers: layer >= first_k_dense_replace; the others are dense "
		"(intermediate_size).");
}

/* Model types whose MoE block is DeepSeek-V3's (the same router code in
 * transformers: sigmoid scores, selection by score + e_score_correction_bias
 * within the best groups, the unbiased scores renormalized with 1e-20 and
 * scaled, shared experts of n_shared * moe_intermediate_size added), with
 * their own key spellings and defaults (transformers' config defaults). */
struct v3like {
	const char *type;
	const char *experts_key, *shared_key;
	long first_dense; /* first_k_dense_replace default; -1: every layer is MoE */
	long n_group, topk_group;
	double scale;
	const char *select_bias; /* the checkpoint name of e_score_correction_bias */
};

static const struct v3like v3likes[] = {
    {"deepseek_v32", "n_routed_experts", "n_shared_experts", 3, 8, 4, 2.5,
     "model.layers.{layer}.mlp.gate.e_score_correction_bias"},
    {"exaone_moe", "num_experts", "num_shared_experts", 1, 1, 1, 2.5,
     "model.layers.{layer}.mlp.e_score_correction_bias"},
    {"glm4_moe_lite", "n_routed_experts", "n_shared_experts", 1, 1, 1, 1.8,
     "model.layers.{layer}.mlp.gate.e_score_correction_bias"},
    {"solar_open", "n_routed_experts", "n_shared_experts", -1, 1, 1, 1.0,
     "model.layers.{layer}.mlp.gate.e_score_correction_bias"},
};

static void fam_v3like(struct imp *m, const cJSON *c)
{
	const struct v3like *f = NULL;
	for (size_t i = 0; i < sizeof v3likes / sizeof *v3likes; i++)
		if (!strcmp(v3likes[i].type, m->family))
			f = &v3likes[i];
	MOE_ASSERT(f);
	base(m, c, "");
	if (field(c, "kv_lora_rank"))
		attention_mla(m, c);
	else
		attention_mha(m, c, "");
	m->n_experts = req_int(m, c, "", f->experts_key, 1);
	m->top_k = req_int(m, c, "", "num_experts_per_tok", 1);
	m->inter = req_int(m, c, "", "moe_intermediate_size", 1);
	glu_act(m, c, "", "hidden_act");
	/* mlp_layer_types ("dense"/"sparse") wins over first_k_dense_replace */
	const cJSON *types = field(c, "mlp_layer_types");
	if (types && !cJSON_IsNull(types)) {
		const cJSON *e;
		long i = 0;
		if (!cJSON_IsArray(types) || cJSON_GetArraySize(types) != m->layers)
			err(m, "'mlp_layer_types' must be a list of %ld entries, one per layer",
			    m->layers);
		else
			cJSON_ArrayForEach(e, types)
			{
				if (!cJSON_IsString(e) || (strcmp(e->valuestring, "sparse") != 0 &&
							   strcmp(e->valuestring, "dense") != 0)) {
					err(m,
					    "'mlp_layer_types[%ld]' must be \"dense\" or "
					    "\"sparse\"",
					    i);
					break;
				}
				m->moe[i++] = !strcmp(e->valuestring, "sparse");
			}
	} else {
		long first = f->first_dense < 0
				 ? 0
				 : opt_int(m, c, "", "first_k_dense_replace", f->first_dense, 0);
		for (long i = 0; i < m->layers; i++)
			m->moe[i] = i >= first;
	}
	dense_ffn(m, c, "", "intermediate_size");
	long n_shared = opt_int(m, c, "", f->shared_key, 1, 0);
	if (n_shared > 0) {
		m->shared_count = n_shared;
		m->shared_inter = m->inter;
		shared_names(m, "model.layers.{layer}.mlp.shared_experts");
	}
	m->scale = opt_num(m, c, "", "routed_scaling_factor", f->scale, 1e-30, 1e30);
	int renorm = opt_bool(m, c, "", "norm_topk_prob", 1);
	long ng = opt_int(m, c, "", "n_group", f->n_group, 1);
	long tg = opt_int(m, c, "", "topk_group", f->topk_group, 1);
	groups(m, ng, tg, MOE_GROUP_SCORE_SUM_TOP2);
	m->score = MOE_SCORE_SIGMOID;
	m->select_bias = 1;
	if (renorm)
		norm_sum(m, 1e-20, 0);
	name(m, MOE_ROLE_ROUTER, "model.layers.{layer}.mlp.gate.weight");
	name(m, MOE_ROLE_SELECT_BIAS, "%s", f->select_bias);
	glu_names(m, "model.layers.{layer}.mlp", "experts", "gate_proj", "up_proj", "down_proj");
	note(m,
	     "%s: the deepseek_v3 router. s = sigmoid(x W_g^T) (f32); experts chosen by s + "
	     "e_score_correction_bias%s; weights are the unbiased s, %s, times "
	     "routed_scaling_factor.",
	     m->family,
	     m->n_groups ? " within the best topk_group groups (sum of top-2 biased scores)" : "",
	     renorm ? "renormalized (sum + 1e-20)" : "not renormalized");
	if (n_shared > 0)
		note(m,
		     "Shared experts: one GLU of width %s * moe_intermediate_size, added "
		     "unweighted.",
		     f->shared_key);
	if (!strcmp(m->family, "deepseek_v32")) {
		note(m, "The lightning indexer of DeepSeek sparse attention (index_n_heads, "
			"index_head_dim) is not counted by moegen info.");
		mtp_note(m, c);
	}
}

/* Granite MoE with a shared MLP: the granitemoe block, plus the decoder
 * layer's shared_mlp added to the block's output (same input, no gate). */
static void fam_granitemoeshared(struct imp *m, const cJSON *c)
{
	fam_granitemoe(m, c);
	long si = opt_int(m, c, "", "shared_intermediate_size", 0, 0);
	if (si == 0) {
		note(m, "shared_intermediate_size is 0: no shared MLP.");
		return;
	}
	m->shared_count = 1;
	m->shared_inter = si;
	name(m, MOE_ROLE_SHARED_GATE_UP, "model.layers.{layer}.shared_mlp.input_linear.weight");
	name(m, MOE_ROLE_SHARED_DOWN, "model.layers.{layer}.shared_mlp.output_linear.weight");
	layout(m, MOE_ROLE_SHARED_GATE_UP, MOE_ORIENT_OUT_IN, MOE_FUSE_CONCAT, 0);
	note(m, "Shared MLP (shared_intermediate_size): model.layers.{layer}.shared_mlp, "
		"input_linear [2 * Is, H] (gate half first) and output_linear [H, Is], applied to "
		"the block's input and added unweighted (in the decoder layer, before "
		"residual_multiplier).");
}

static int is_family(const struct imp *m, const char *const *list)
{
	for (; *list; list++)
		if (!strcmp(m->family, *list))
			return 1;
	return 0;
}

/* Which layers use linear attention: layer_types ("linear_attention"), or
 * MiniMax's attn_type_list (0 linear, 1 softmax), or the family's default
 * pattern: linear unless (i + 1) % interval == 0 (Qwen3-Next, interval
 * full_attention_interval, 4) or unless i is even (MiniMax). */
static void linear_layers(struct imp *m, const cJSON *c, long interval, int even_full)
{
	const cJSON *lt = field(c, "layer_types"), *al = field(c, "attn_type_list");
	const cJSON *e;
	long i = 0;
	if (lt || al) {
		const char *key = lt ? "layer_types" : "attn_type_list";
		const cJSON *v = lt ? lt : al;
		if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != m->layers) {
			err(m, "'%s' must be a list of %ld entries, one per layer", key, m->layers);
			return;
		}
		cJSON_ArrayForEach(e, v)
		{
			if (lt && cJSON_IsString(e) && !strcmp(e->valuestring, "linear_attention"))
				m->lin[i] = 1;
			else if (lt && cJSON_IsString(e) &&
				 !strcmp(e->valuestring, "full_attention"))
				m->lin[i] = 0;
			else if (al && cJSON_IsNumber(e) &&
				 (e->valuedouble == 0 || e->valuedouble == 1))
				m->lin[i] = e->valuedouble == 0;
			else {
				err(m, "'%s[%ld]' must be %s", key, i,
				    lt ? "\"linear_attention\" or \"full_attention\"" : "0 or 1");
				return;
			}
			i++;
		}
		return;
	}
	for (i = 0; i < m->layers; i++)
		m->lin[i] = even_full ? i % 2 == 1 : (i + 1) % interval != 0;
}

/* The attention details beside the projection sizes, per family as the
 * installed transformers builds the modules: biases, q/k norms, sinks, the
 * output gate, LayerNorm, the linear-attention layers. Accounting only. */
static void attention_extras(struct imp *m, const cJSON *c)
{
	static const char *const bias_all[] = {
	    "qwen3_moe",      "olmoe",      "flex_olmo",  "gpt_oss", "llama4",
	    "llama4_text",    "phimoe",     "granitemoe", "dots1",   "granitemoeshared",
	    "hunyuan_v1_moe", "qwen3_next", NULL};
	static const char *const qk_head[] = {"qwen3_moe",  "hunyuan_v1_moe", "dots1",
					      "qwen3_next", "exaone_moe",     NULL};
	static const char *const qk_full[] = {"olmoe", "flex_olmo", "minimax_m2", NULL};
	static const char *const layer_keys[] = {"num_hidden_layers", NULL};
	if (m->attn == MOE_ATTN_NONE || any_bad(m, layer_keys))
		return;
	if (m->attn == MOE_ATTN_MLA) {
		if (opt_bool(m, c, "", "attention_bias", 0))
			note(m, "attention_bias: the q_a and kv_a projection biases and the output "
				"bias are not counted.");
		return;
	}
	int fam_gpt = !strcmp(m->family, "gpt_oss");
	if (is_family(m, bias_all))
		m->qkv_bias = m->out_bias = opt_bool(m, c, "", "attention_bias", fam_gpt);
	else if (!strcmp(m->family, "ernie4_5_moe"))
		m->qkv_bias = m->out_bias = opt_bool(m, c, "", "use_bias", 0);
	else if (!strcmp(m->family, "qwen2_moe"))
		m->qkv_bias = opt_bool(m, c, "", "qkv_bias", 1);
	else if (!strcmp(m->family, "glm4_moe"))
		m->qkv_bias = opt_bool(m, c, "", "attention_bias", 0);
	if (is_family(m, qk_head) ||
	    (!strcmp(m->family, "glm4_moe") && opt_bool(m, c, "", "use_qk_norm", 0)))
		m->qk_norm = MOE_QK_NORM_HEAD;
	else if (is_family(m, qk_full))
		m->qk_norm = MOE_QK_NORM_FULL;
	m->sinks = fam_gpt;
	m->layer_norm = !strcmp(m->family, "phimoe");
	if (!strcmp(m->family, "qwen3_next")) {
		m->out_gate = 1;
		m->linear = MOE_LINEAR_ATTN_GATED_DELTANET;
		linear_layers(m, c, opt_int(m, c, "", "full_attention_interval", 4, 1), 0);
		/* transformers' defaults are the 80B release's */
		m->lin_heads = opt_int(m, c, "", "linear_num_value_heads", 32, 1);
		m->lin_hd = opt_int(m, c, "", "linear_value_head_dim", 128, 1);
		m->lin_kh = opt_int(m, c, "", "linear_num_key_heads", 16, 1);
		m->lin_kd = opt_int(m, c, "", "linear_key_head_dim", 128, 1);
		m->lin_conv = opt_int(m, c, "", "linear_conv_kernel_dim", 4, 1);
	} else if (!strcmp(m->family, "minimax")) {
		m->linear = MOE_LINEAR_ATTN_LIGHTNING;
		linear_layers(m, c, 2, 1);
		m->lin_heads = m->heads;
		m->lin_hd = m->head_dim;
	}
	if (m->linear != MOE_LINEAR_ATTN_NONE) {
		long n = 0;
		for (long i = 0; i < m->layers; i++)
			n += m->lin[i];
		if (!n)
			m->linear = MOE_LINEAR_ATTN_NONE;
	}
}

struct family {
	const char *model_type;
	void (*fn)(struct imp *m, const cJSON *c);
};

static void fam_deepseek_v2(struct imp *m, const cJSON *c)
{
	fam_deepseek(m, c, 0);
}
static void fam_deepseek_v3(struct imp *m, const cJSON *c)
{
	fam_deepseek(m, c, 1);
}
static void fam_qwen2_moe(struct imp *m, const cJSON *c)
{
	fam_qwen(m, c, 1, 0);
}
static void fam_qwen3_moe(struct imp *m, const cJSON *c)
{
	fam_qwen(m, c, 0, 0);
}
/* Qwen3-Next: the qwen2_moe block (norm_topk_prob defaults to true); its
 * hybrid attention is accounted by attention_qwen3_next. */
static void fam_qwen3_next(struct imp *m, const cJSON *c)
{
	fam_qwen(m, c, 1, 1);
}

/* Sorted by name: the order of the "supported:" list. */
static const struct family families[] = {
    {"dbrx", fam_dbrx},
    {"deepseek_v2", fam_deepseek_v2},
    {"deepseek_v3", fam_deepseek_v3},
    {"deepseek_v32", fam_v3like},
    {"dots1", fam_dots1},
    {"ernie4_5_moe", fam_ernie},
    {"exaone_moe", fam_v3like},
    {"flex_olmo", fam_olmoe},
    {"glm4_moe", fam_glm4_moe},
    {"glm4_moe_lite", fam_v3like},
    {"gpt_oss", fam_gpt_oss},
    {"granitemoe", fam_granitemoe},
    {"granitemoeshared", fam_granitemoeshared},
    {"hunyuan_v1_moe", fam_hunyuan},
    {"jamba", fam_jamba},
    {"jetmoe", fam_jetmoe},
    {"llama4", fam_llama4},
    {"llama4_text", fam_llama4},
    {"minimax", fam_minimax},
    {"minimax_m2", fam_minimax_m2},
    {"mixtral", fam_mixtral},
    {"nllb_moe", fam_nllb},
    {"olmoe", fam_olmoe},
    {"phimoe", fam_phimoe},
    {"qwen2_moe", fam_qwen2_moe},
    {"qwen3_moe", fam_qwen3_moe},
    {"qwen3_next", fam_qwen3_next},
    {"solar_open", fam_v3like},
    {"switch_transformers", fam_switch},
};
#define N_FAMILIES ((int)(sizeof families / sizeof *families))

/* Other spellings of a model_type: NllbMoeConfig saves "nllb-moe". */
static const struct {
	const char *spelling, *model_type;
} family_aliases[] = {
    {"nllb-moe", "nllb_moe"},
};

/* MoE model types of transformers 5.25 that moegen import does not import,
 * each with what is missing (docs/import.md). "Not mapped" means the block
 * reads like one the spec describes but its config keys, weight names and
 * semantics have not been checked against transformers' code. */
static const struct {
	const char *type, *why;
} refused[] = {
    {"afmoe", "not mapped yet (sigmoid router with a selection bias, route_scale and shared "
	      "experts, like deepseek_v3 without groups)"},
    {"aria", "not mapped yet (softmax over the top-k logits plus shared experts)"},
    {"aria_text", "not mapped yet (softmax over the top-k logits plus shared experts)"},
    {"axk1", "not mapped yet (the deepseek_v3 router)"},
    {"axk2", "not mapped yet (sigmoid router with a selection bias, no groups)"},
    {"bailing_hybrid", "not mapped yet (the deepseek_v3 router; its linear-attention layers "
		       "are not described)"},
    {"beam", "not mapped yet (the deepseek_v3 router without the scaling factor)"},
    {"cohere2_moe", "not mapped yet; shared_expert_combination_strategy 'average' (the mean of "
		    "the routed and shared outputs) is not described"},
    {"deepseek_ocr2", "a vision-language model: not mapped yet (the deepseek_v2 block)"},
    {"deepseek_ocr2_text", "not mapped yet (the deepseek_v2 block)"},
    {"deepseek_v4", "hash routing (experts chosen from the token id) is not described"},
    {"diffusion_gemma", "the router's learned input scale and the per-expert output scale are "
			"not described"},
    {"diffusion_gemma_text", "the router's learned input scale and the per-expert output scale "
			     "are not described"},
    {"doge", "cross-domain MoE (product-key retrieval added to a dense MLP) is not mapped"},
    {"dots3_note", "a multimodal model: not mapped yet (the deepseek_v3 router)"},
    {"dots3_note_text", "not mapped yet (the deepseek_v3 router)"},
    {"ergo", "not mapped yet (sigmoid router with a selection bias); its residual gate is "
	     "outside the block"},
    {"ernie4_5_vl_moe", "separate text and vision experts chosen by token type are not "
			"described"},
    {"ernie4_5_vl_moe_text", "separate text and vision experts chosen by token type are not "
			     "described"},
    {"flint", "not mapped yet (sigmoid top-k plus a shared expert)"},
    {"gemma4", "the router's learned input scale and the per-expert output scale are not "
	       "described"},
    {"gemma4_text", "the router's learned input scale and the per-expert output scale are not "
		    "described"},
    {"glm4v_moe", "a vision-language model: not mapped yet (the deepseek_v3 router)"},
    {"glm4v_moe_text", "not mapped yet (the deepseek_v3 router)"},
    {"glm5_next", "a multimodal model: not mapped yet (the deepseek_v3 router)"},
    {"glm5_next_text", "not mapped yet (the deepseek_v3 router)"},
    {"glm_moe_dsa", "not mapped yet (the deepseek_v3 router; DSA indexer attention)"},
    {"granitemoe_swa", "not mapped yet (the granitemoe router)"},
    {"granitemoehybrid", "not mapped yet (the granitemoe router; Mamba layers are not "
			 "described)"},
    {"hy_v3", "not mapped yet (sigmoid router with a selection bias, shared experts)"},
    {"hy_v4", "not mapped yet (the deepseek_v3 router)"},
    {"hy_v4_vl", "a vision-language model: not mapped yet (the deepseek_v3 router)"},
    {"hy_v4_vl_text", "not mapped yet (the deepseek_v3 router)"},
    {"inkling_text", "shared experts weighted by the router (their own sigmoid logits), "
		     "log-sigmoid weights and a global scale are not described"},
    {"inkling_mm_model", "shared experts weighted by the router, log-sigmoid weights and a "
			 "global scale are not described"},
    {"inkling2", "not mapped yet"},
    {"inkling2_text", "not mapped yet"},
    {"inkling2_loop", "not mapped yet; the looped message gate is outside the spec"},
    {"inkling2_loop_text", "not mapped yet; the looped message gate is outside the spec"},
    {"kimi_linear", "not mapped yet (the deepseek_v3 router; Kimi delta attention layers are "
		    "not described)"},
    {"kolibri1", "not mapped yet (selection by logits + bias)"},
    {"kolibri1_1", "not mapped yet (selection by logits + bias)"},
    {"laguna", "not mapped yet (sigmoid router with a selection bias, shared experts)"},
    {"lara_mini", "not mapped yet (the qwen2_moe router; Gated DeltaNet layers)"},
    {"lfm2_moe", "not mapped yet (sigmoid router with an optional selection bias); its "
		 "short-convolution layers are not described"},
    {"longcat_flash", "zero-computation (identity) experts are not described"},
    {"mellum", "not mapped yet (the qwen2_moe router)"},
    {"mimo_v2_flash", "not mapped yet (the deepseek_v3 router)"},
    {"minicpm5_moe", "not mapped yet (the deepseek_v3 router)"},
    {"minimax_m3_vl", "a vision-language model: not mapped yet (sigmoid router with a "
		      "selection bias, shared experts)"},
    {"minimax_m3_vl_text", "not mapped yet (sigmoid router with a selection bias, shared "
			   "experts)"},
    {"mistral4", "not mapped yet (softmax scores with group-limited selection, shared "
		 "experts)"},
    {"mistral_large4", "a multimodal model: not mapped yet (softmax scores with "
		       "group-limited selection)"},
    {"mistral_large4_text", "not mapped yet (softmax scores with group-limited selection)"},
    {"muse_spark", "a multimodal model: the norm inside the MoE block is not described"},
    {"muse_spark_text", "the norm inside the MoE block (pre_expert_norm) is not described"},
    {"nemotron_h", "not mapped yet (the deepseek_v3 router; Mamba layers are not described)"},
    {"openai_privacy_filter", "not mapped yet (the gpt_oss router)"},
    {"param2moe", "not mapped yet (transformers runs the glm4_moe model; the release's weight "
		  "names are renamed by transformers' conversion mapping)"},
    {"qwen3_5_moe", "a vision-language model: not mapped yet (the qwen3_next block)"},
    {"qwen3_5_moe_text", "not mapped yet (the qwen3_next block)"},
    {"qwen3_omni_moe", "an omni-modal model: not mapped yet (the qwen3_moe block)"},
    {"qwen3_omni_moe_thinker", "not mapped yet (the qwen3_moe block)"},
    {"qwen3_omni_moe_text", "not mapped yet (the qwen3_moe block)"},
    {"qwen3_vl_moe", "a vision-language model: not mapped yet (the qwen3_moe block)"},
    {"qwen3_vl_moe_text", "not mapped yet (the qwen3_moe block)"},
    {"qwen4_exp", "a multimodal model: not mapped yet (the qwen3_next block)"},
    {"qwen4_exp_text", "not mapped yet (the qwen3_next block)"},
    {"sarvam_mla", "not mapped yet (transformers runs the deepseek_v3 model with its own config "
		   "keys and defaults)"},
    {"sarvam_moe", "not mapped yet (transformers runs the glm4_moe model; the release's weight "
		   "names are renamed by transformers' conversion mapping)"},
    {"step3p5", "not mapped yet (sigmoid router with a selection bias, shared experts)"},
    {"step3p7", "not mapped yet (sigmoid router with a selection bias, shared experts)"},
    {"unlimited_ocr", "a vision-language model: not mapped yet (the deepseek_v2 block)"},
    {"unlimited_ocr_text", "not mapped yet (the deepseek_v2 block)"},
    {"vitpose_backbone", "not token routing: a dataset index picks one expert for part of the "
			 "features"},
    {"zaya", "the router (an MLP over the hidden state and the previous layer's router state, "
	     "balancing biases on the probabilities) is not described"},
};

static const char *refused_why(const char *model_type)
{
	for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
		if (!strcmp(refused[i].type, model_type))
			return refused[i].why;
	return NULL;
}

static const struct family *find_family(const char *model_type)
{
	for (size_t i = 0; i < sizeof family_aliases / sizeof *family_aliases; i++)
		if (strcmp(family_aliases[i].spelling, model_type) == 0)
			model_type = family_aliases[i].model_type;
	for (int i = 0; i < N_FAMILIES; i++)
		if (strcmp(families[i].model_type, model_type) == 0)
			return &families[i];
	return NULL;
}

/* The writer ------------------------------------------------------------ */

/* Shortest round-trip spelling of an f32-meant value, always with a '.' so
 * every YAML schema reads it as a float. */
static void fmt_num(double x, char buf[48])
{
	char t[40];
	snprintf(t, sizeof t, "%.9g", x);
	/* prefer the shorter spelling when it reads back the same float */
	for (int prec = 1; prec < 9; prec++) {
		char s[40];
		snprintf(s, sizeof s, "%.*g", prec, x);
		if ((float)strtod(s, NULL) == (float)x) {
			memcpy(t, s, sizeof s);
			break;
		}
	}
	char *e = strchr(t, 'e');
	if (strchr(t, '.') || strchr(t, 'n') || strchr(t, 'i'))
		snprintf(buf, 48, "%s", t);
	else if (e)
		snprintf(buf, 48, "%.*s.0%s", (int)(e - t), t, e);
	else
		snprintf(buf, 48, "%s.0", t);
}

static const char *act_spelling(enum moe_kind k, enum moe_act a)
{
	if (k == MOE_KIND_GLU && a == MOE_ACT_SILU)
		return "swiglu";
	if (k == MOE_KIND_GLU && a == MOE_ACT_GELU)
		return "geglu";
	return moe_act_names[a];
}

/* The length of the well-formed UTF-8 sequence at s (at most n bytes), or 0. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
	size_t k = s[0] < 0x80                    ? 1
		   : s[0] >= 0xc2 && s[0] <= 0xdf ? 2
		   : s[0] >= 0xe0 && s[0] <= 0xef ? 3
		   : s[0] >= 0xf0 && s[0] <= 0xf4 ? 4
						  : 0;
	if (!k || k > n)
		return 0;
	for (size_t i = 1; i < k; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	/* overlong 3- and 4-byte forms, surrogates, beyond U+10FFFF */
	if ((k == 3 && s[0] == 0xe0 && s[1] < 0xa0) || (k == 3 && s[0] == 0xed && s[1] >= 0xa0) ||
	    (k == 4 && s[0] == 0xf0 && s[1] < 0x90) || (k == 4 && s[0] == 0xf4 && s[1] >= 0x90))
		return 0;
	return k;
}

/* n bytes of s into a comment: control characters and bytes that are not
 * well-formed UTF-8 become '?' (a config's strings may hold anything). */
static void put_comment_text(FILE *f, const char *s, size_t n)
{
	const unsigned char *u = (const unsigned char *)s;
	for (size_t i = 0; i < n;) {
		size_t k = utf8_len(u + i, n - i);
		if (!k || (k == 1 && (u[i] < 0x20 || u[i] == 0x7f))) {
			fputc('?', f);
			i++;
			continue;
		}
		fwrite(u + i, 1, k, f);
		i += k;
	}
}

/* s as a YAML double-quoted scalar: every string the importer writes is
 * quoted, so no name can read back as a list item, a number, a boolean or
 * null. Non-printable ASCII and bytes that are not UTF-8 are escaped. */
static void put_quoted(FILE *f, const char *s)
{
	const unsigned char *u = (const unsigned char *)s;
	size_t n = strlen(s);
	fputc('"', f);
	for (size_t i = 0; i < n;) {
		size_t k = utf8_len(u + i, n - i);
		if (k == 1 && (u[i] == '"' || u[i] == '\\'))
			fprintf(f, "\\%c", u[i]);
		else if (!k || (k == 1 && (u[i] < 0x20 || u[i] == 0x7f)))
			fprintf(f, "\\x%02x", u[i]);
		else
			fwrite(u + i, 1, k, f);
		i += k ? k : 1;
	}
	fputc('"', f);
}

/* "# " comment lines, word-wrapped at 100 columns. */
static void write_comment(FILE *f, const char *text)
{
	const char *s = text;
	int first = 1;
	while (*s) {
		const char *lead = first ? "# " : "#   ";
		size_t room = 100 - strlen(lead);
		size_t n = strlen(s);
		if (n > room) {
			n = room;
			while (n > 0 && s[n] != ' ')
				n--;
			if (n == 0)
				n = room;
		}
		fputs(lead, f);
		put_comment_text(f, s, n); /* a path may hold anything */
		fputc('\n', f);
		s += n;
		while (*s == ' ')
			s++;
		first = 0;
	}
}

static int is_matrix_role(enum moe_role r)
{
	switch (r) {
	case MOE_ROLE_ROUTER:
	case MOE_ROLE_NOISE:
	case MOE_ROLE_GROUP_ROUTER:
	case MOE_ROLE_GATE:
	case MOE_ROLE_UP:
	case MOE_ROLE_GATE_UP:
	case MOE_ROLE_DOWN:
	case MOE_ROLE_SHARED_GATE:
	case MOE_ROLE_SHARED_UP:
	case MOE_ROLE_SHARED_GATE_UP:
	case MOE_ROLE_SHARED_DOWN:
	case MOE_ROLE_SHARED_EXPERT_GATE:
		return 1;
	default:
		return 0;
	}
}

/* "prefix[i, j, ...]" for the flagged layers, wrapped at 96 columns. */
static void write_layers(FILE *f, const char *prefix, int indent, const unsigned char *on, long n)
{
	fputs(prefix, f);
	int col = (int)strlen(prefix), first = 1;
	for (long i = 0; i < n; i++) {
		if (!on[i])
			continue;
		char num[24];
		int w = snprintf(num, sizeof num, "%ld", i);
		if (!first && col + w + 2 > 96) {
			fprintf(f, ",\n%*s", indent, "");
			col = indent;
		} else if (!first) {
			fprintf(f, ", ");
			col += 2;
		}
		fputs(num, f);
		col += w;
		first = 0;
	}
	fprintf(f, "]\n");
}

static void write_attention(const struct imp *m, FILE *f)
{
	if (m->attn == MOE_ATTN_MHA)
		fprintf(f,
			"  attention:\n    kind: mha\n    heads: %ld\n    kv_heads: %ld\n"
			"    head_dim: %ld\n",
			m->heads, m->kv_heads, m->head_dim);
	else if (m->attn == MOE_ATTN_MLA) {
		fprintf(f, "  attention:\n    kind: mla\n    heads: %ld\n", m->heads);
		if (m->q_lora)
			fprintf(f, "    q_lora_rank: %ld\n", m->q_lora);
		fprintf(
		    f,
		    "    kv_lora_rank: %ld\n    qk_nope_head_dim: %ld\n    qk_rope_head_dim: %ld\n"
		    "    v_head_dim: %ld\n",
		    m->kv_lora, m->qk_nope, m->qk_rope, m->v_dim);
	} else
		return;
	if (m->qkv_bias)
		fprintf(f, "    qkv_bias: true\n");
	if (m->out_bias)
		fprintf(f, "    out_bias: true\n");
	if (m->qk_norm != MOE_QK_NORM_NONE)
		fprintf(f, "    qk_norm: %s\n", moe_qk_norm_names[m->qk_norm]);
	if (m->sinks)
		fprintf(f, "    sinks: true\n");
	if (m->out_gate)
		fprintf(f, "    output_gate: true\n");
	if (m->linear == MOE_LINEAR_ATTN_NONE)
		return;
	fprintf(f, "    linear:\n      kind: %s\n", moe_linear_attn_names[m->linear]);
	write_layers(f, "      layers: [", 8, m->lin, m->layers);
	fprintf(f, "      heads: %ld\n      head_dim: %ld\n", m->lin_heads, m->lin_hd);
	if (m->linear == MOE_LINEAR_ATTN_GATED_DELTANET)
		fprintf(f,
			"      key_heads: %ld\n      key_head_dim: %ld\n      conv_kernel: %ld\n",
			m->lin_kh, m->lin_kd, m->lin_conv);
}

/* A quantized checkpoint's experts stay quantized in the kernels (quant:):
 * fp8 tiles as wide as a group that divides the inputs, mxfp4 as it is. The
 * spec says how to dequantize at load instead (delete the key). */
static void put_kept(const struct imp *m, FILE *f)
{
	const struct imp_layout *dn = &m->layout[MOE_ROLE_DOWN];
	if (dn->quant == MOE_QUANT_NONE || !m->names[MOE_ROLE_DOWN][0])
		return;
	long g = dn->block[1];
	int fp8 = dn->quant == MOE_QUANT_FP8_BLOCK;
	if (moe_quant_int4(dn->quant)) {
		/* the group must divide the inputs: moegen check says so otherwise */
		fprintf(f, "quant:  # kept in the kernels as the checkpoint stores them; delete "
			   "this key to dequantize at load\n");
		fprintf(f, "  experts: {kind: int4, group: %ld, zero: %s}\n", g,
			m->int4_zero ? "true" : "false");
		if (m->shared_count && m->names[MOE_ROLE_SHARED_DOWN][0])
			fprintf(f, "  shared: {kind: int4, group: %ld, zero: %s}\n", g,
				m->int4_zero ? "true" : "false");
		return;
	}
	if (fp8 && (g <= 0 || m->hidden % g || m->inter % g ||
		    (m->shared_count && (m->shared_count * m->shared_inter) % g)))
		return; /* a tile that does not divide the inputs: dequantized at load */
	fprintf(f, "quant:  # kept in the kernels as the checkpoint stores them; delete this "
		   "key to dequantize at load\n");
	if (fp8)
		fprintf(f, "  experts: {kind: fp8, group: %ld}\n", g);
	else
		fprintf(f, "  experts: mxfp4\n");
	if (fp8 && m->shared_count && m->names[MOE_ROLE_SHARED_DOWN][0])
		fprintf(f, "  shared: {kind: fp8, group: %ld}\n", g);
}
static void write_spec(const struct imp *m, FILE *f)
{
	char a[48], b[48], c[48];
	char line[256];
	snprintf(line, sizeof line, "Imported by moegen import from %s (model_type %s).", m->path,
		 m->family);
	write_comment(f, line);
	for (int i = 0; i < m->n_notes; i++)
		write_comment(f, m->notes[i]);
	fprintf(f, "moegen: 1\nname: ");
	put_quoted(f, m->name);
	fputc('\n', f);

	fprintf(f, "model:\n  hidden: %ld\n  layers: %ld\n", m->hidden, m->layers);
	write_layers(f, "  moe_layers: [", 4, m->moe, m->layers);
	if (m->dense_inter)
		fprintf(f, "  dense_ffn: {intermediate: %ld, activation: %s, kind: %s}\n",
			m->dense_inter, act_spelling(m->dense_kind, m->dense_act),
			moe_kind_names[m->dense_kind]);
	if (m->vocab)
		fprintf(f, "  vocab: %ld\n", m->vocab);
	if (m->tied >= 0)
		fprintf(f, "  tied_embeddings: %s\n", m->tied ? "true" : "false");
	write_attention(m, f);
	if (m->layer_norm)
		fprintf(f, "  norm: layer\n");
	fprintf(f, "dtype: {weights: %s, activations: f32, router: f32}\n",
		moe_dtype_names[m->wdtype]);

	fprintf(f, "router:\n  mode: %s\n  score: %s\n", moe_mode_names[m->mode],
		moe_score_names[m->score]);
	fprintf(f, "  top_k: %ld\n", m->top_k);
	fmt_num(m->norm_eps, a);
	fmt_num(m->norm_min, b);
	fmt_num(m->norm_p, c);
	if (m->norm == MOE_NORM_NONE)
		fprintf(f, "  normalize: none\n");
	else if (m->norm == MOE_NORM_SUM)
		fprintf(f, "  normalize: {kind: sum, eps: %s, min: %s}\n", a, b);
	else
		fprintf(f, "  normalize: {kind: lp, p: %s, eps: %s, min: %s}\n", c, a, b);
	fmt_num(m->scale, a);
	fprintf(f, "  scale: %s\n", a);
	fprintf(f, "  bias: %s\n", m->router_bias ? "true" : "false");
	fprintf(f, "  select_bias: %s\n", m->select_bias ? "true" : "false");
	if (m->n_groups)
		fprintf(f, "  groups: {count: %ld, top: %ld, score: %s}\n", m->n_groups,
			m->group_top, moe_group_score_names[m->group_score]);
	if (m->capacity != MOE_CAPACITY_NONE) {
		fprintf(f, "  capacity: {");
		if (m->capacity == MOE_CAPACITY_PER_EXPERT) {
			fprintf(f, "per_expert: %ld", m->cap_per_expert);
		} else if (m->capacity == MOE_CAPACITY_FACTOR) {
			fmt_num(m->cap_factor, a);
			fprintf(f, "factor: %s, rounding: %s", a, m->cap_floor ? "floor" : "ceil");
		} else {
			fmt_num(m->cap_fraction, a);
			fprintf(f, "token_fraction: %s", a);
		}
		if (m->cap_min)
			fprintf(f, ", min: %ld", m->cap_min);
		fprintf(f, ", priority: %s, overflow: %s", moe_priority_names[m->priority],
			moe_overflow_names[m->overflow]);
		if (m->cap_after_drop)
			fprintf(f, ", normalize_after_drop: true");
		fprintf(f, "}\n");
	}
	if (m->noise == MOE_NOISE_JITTER) {
		fmt_num(m->jitter_eps, a);
		fprintf(f, "  noise: {kind: jitter, eps: %s}\n", a);
	} else {
		fprintf(f, "  noise: none\n");
	}
	fprintf(f, "  apply_to: %s\n", moe_apply_names[m->apply_to]);
	if (m->mode == MOE_MODE_SPARSEMIXER) {
		fmt_num(m->sparsemixer_eps, a);
		fprintf(f, "sparsemixer: {eps: %s}\n", a);
	}

	fprintf(f, "experts:\n  kind: %s\n  count: %ld\n  intermediate: %ld\n",
		moe_kind_names[m->kind], m->n_experts, m->inter);
	if (m->act == MOE_ACT_SWIGLU_OAI) {
		fmt_num(m->act_alpha, a);
		fmt_num(m->act_limit, b);
		fprintf(f, "  activation: {swiglu_oai: {alpha: %s, limit: %s}}\n", a, b);
	} else {
		fprintf(f, "  activation: %s\n", act_spelling(m->kind, m->act));
	}
	fprintf(f, "  bias: %s\n  split: 1\n", m->expert_bias ? "true" : "false");
	if (m->output_bias)
		fprintf(f, "  output_bias: true\n");
	if (m->shared_count)
		fprintf(f,
			"shared_experts:\n  count: %ld\n  intermediate: %ld\n  activation: %s\n  "
			"kind: %s\n  gate: %s\n",
			m->shared_count, m->shared_inter,
			act_spelling(m->shared_kind, m->shared_act), moe_kind_names[m->shared_kind],
			moe_shared_gate_names[m->shared_gate]);

	fprintf(f, "weights:\n  format: %s\n  names:\n", m->gguf ? "gguf" : "safetensors");
	for (int r = 0; r < MOE_ROLE_COUNT; r++)
		if (m->names[r][0]) {
			fprintf(f, "    %s: ", moe_role_names[r]);
			put_quoted(f, m->names[r]);
			fputc('\n', f);
		}
	fprintf(f, "  layout:\n");
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		const struct imp_layout *l = &m->layout[r];
		if (!m->names[r][0] || (!is_matrix_role(r) && l->fuse == MOE_FUSE_NONE))
			continue;
		if (l->quant != MOE_QUANT_NONE) {
			/* block style: the scale template has braces */
			fprintf(f, "    %s:\n", moe_role_names[r]);
			if (l->fuse != MOE_FUSE_NONE)
				fprintf(f, "      fuse: %s\n", moe_fuse_names[l->fuse]);
			fprintf(f, "      orient: %s\n      quant:\n        kind: %s\n",
				moe_orient_names[l->orient], moe_quant_names[l->quant]);
			if (l->quant == MOE_QUANT_FP8_BLOCK)
				fprintf(f, "        block: [%ld, %ld]\n", l->block[0], l->block[1]);
			if (moe_quant_int4(l->quant))
				fprintf(f, "        group: %ld\n", l->block[1]);
			fprintf(f, "        scales: ");
			put_quoted(f, m->scales[r]);
			fputc('\n', f);
			continue;
		}
		fprintf(f, "    %s: {", moe_role_names[r]);
		if (l->fuse != MOE_FUSE_NONE)
			fprintf(f, "fuse: %s%s", moe_fuse_names[l->fuse],
				is_matrix_role(r) ? ", " : "");
		if (is_matrix_role(r))
			fprintf(f, "orient: %s", moe_orient_names[l->orient]);
		if (l->row_blocked)
			fprintf(f, ", row_blocked: true");
		fprintf(f, "}\n");
	}
	int any_q = 0;
	for (int q = 0; q < MOE_QMAT_COUNT; q++)
		any_q |= m->qfmt[q].kind != MOE_QFORMAT_NONE;
	if (!any_q) {
		put_kept(m, f);
		return;
	}
	/* one key per role: gate and up are one panel (quant key "up") */
	static const struct {
		const char *key;
		enum moe_qmat q;
	} qkeys[] = {{"gate", MOE_QMAT_UP},
		     {"up", MOE_QMAT_UP},
		     {"down", MOE_QMAT_DOWN},
		     {"shared_gate", MOE_QMAT_SHARED_UP},
		     {"shared_up", MOE_QMAT_SHARED_UP},
		     {"shared_down", MOE_QMAT_SHARED_DOWN}};
	fprintf(f, "quant:\n");
	for (size_t i = 0; i < sizeof qkeys / sizeof *qkeys; i++) {
		const struct moe_qfmt *q = &m->qfmt[qkeys[i].q];
		if (q->kind != MOE_QFORMAT_NONE)
			fprintf(f, "  %s: {kind: %s, group: %u%s}\n", qkeys[i].key,
				moe_qformat_names[q->kind], q->group,
				q->kind == MOE_QFORMAT_INT4
				    ? (q->zero ? ", zero: true" : ", zero: false")
				    : "");
	}
}

/* Import ---------------------------------------------------------------- */

/* The spec name: the last path component of _name_or_path, else the
 * model_type, with characters outside [A-Za-z0-9._-] replaced by '-'. */
static void spec_name(struct imp *m, const cJSON *c)
{
	const cJSON *v = field(c, "_name_or_path");
	const char *s = cJSON_IsString(v) ? v->valuestring : "";
	const char *slash = strrchr(s, '/');
	if (slash)
		s = slash + 1;
	if (!*s)
		s = m->family;
	size_t n = 0;
	for (; *s && n < MOE_NAME_MAX - 1; s++) {
		char ch = *s;
		int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
			 (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
		m->name[n++] = ok ? ch : '-';
	}
	m->name[n] = 0;
}

/* Line and column (1-based) of byte offset off in text. */
static void line_col(const char *text, size_t off, uint32_t *line, uint32_t *col)
{
	*line = 1, *col = 1;
	for (size_t i = 0; i < off; i++) {
		if (text[i] == '\n')
			(*line)++, *col = 1;
		else
			(*col)++;
	}
}

static char *read_file(const char *path, size_t *len, struct moe_diag *d)
{
	/* non-blocking, regular files only: a FIFO must not hang the import */
	int fd = moe_input_open(path, d);
	FILE *f = fd < 0 ? NULL : fdopen(fd, "rb");
	if (!f) {
		if (fd >= 0) {
			moe_diag_error(d, "cannot read '%s': %s", path, strerror(errno));
			close(fd);
		}
		return NULL;
	}
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap);
	MOE_ASSERT(buf);
	for (;;) {
		if (n == cap) {
			if (cap >= IMP_MAX_BYTES) {
				moe_diag_error(d, "%s: larger than %u MiB: not a config.json", path,
					       IMP_MAX_BYTES >> 20);
				free(buf);
				fclose(f);
				return NULL;
			}
			cap *= 2;
			buf = realloc(buf, cap);
			MOE_ASSERT(buf);
		}
		size_t got = fread(buf + n, 1, cap - n, f);
		n += got;
		if (got == 0)
			break;
	}
	if (n == cap) {
		buf = realloc(buf, cap + 1);
		MOE_ASSERT(buf);
	}
	buf[n] = 0;
	int bad = ferror(f) ? errno : 0;
	fclose(f);
	if (bad) {
		moe_diag_error(d, "cannot read '%s': %s", path, strerror(bad));
		free(buf);
		return NULL;
	}
	*len = n;
	return buf;
}

/* Self-check ------------------------------------------------------------- */

/* Where a spec key of the written spec comes from: config.json keys in the
 * spellings of the families, searched in this order (anywhere in the
 * config, e.g. ffn_config.moe_top_k). A spec path matches an entry equal to
 * it or below it; the longest entry wins. */
static const struct {
	const char *spec;
	const char *keys[8];
} spec_keys[] = {
    {"name", {"_name_or_path", "model_type"}},
    {"model.hidden", {"hidden_size", "d_model", "n_embd"}},
    {"model.layers",
     {"num_hidden_layers", "num_layers", "n_layers", "num_decoder_layers", "decoder_layers",
      "encoder_layers"}},
    {"model.moe_layers",
     {"decoder_sparse_step", "moe_layer_freq", "first_k_dense_replace", "interleave_moe_layer_step",
      "num_sparse_decoder_layers", "num_sparse_encoder_layers", "expert_interval",
      "mlp_only_layers"}},
    {"model.dense_ffn", {"intermediate_size", "ffn_dim", "d_ff", "intermediate_size_mlp"}},
    {"model.vocab", {"vocab_size"}},
    {"model.attention", {"num_attention_heads", "n_heads", "num_heads"}},
    {"model.attention.heads",
     {"num_attention_heads", "n_heads", "num_heads", "decoder_attention_heads",
      "encoder_attention_heads"}},
    {"model.attention.kv_heads",
     {"num_key_value_heads", "kv_n_heads", "num_kv_heads", "num_key_value_groups"}},
    {"model.attention.head_dim", {"head_dim", "d_kv", "kv_channels"}},
    {"model.attention.q_lora_rank", {"q_lora_rank"}},
    {"model.attention.kv_lora_rank", {"kv_lora_rank"}},
    {"model.attention.qk_nope_head_dim", {"qk_nope_head_dim"}},
    {"model.attention.qk_rope_head_dim", {"qk_rope_head_dim"}},
    {"model.attention.v_head_dim", {"v_head_dim"}},
    {"dtype", {"torch_dtype", "dtype"}},
    {"router.top_k",
     {"num_experts_per_tok", "moe_top_k", "experts_per_token", "moe_k", "top_k", "moe_topk"}},
    {"router.normalize", {"moe_norm_min", "norm_topk_prob", "normalize_expert_weights"}},
    {"router.scale", {"routed_scaling_factor", "router_scaling_factor"}},
    {"router.groups", {"n_group", "topk_group"}},
    {"router.groups.count", {"n_group"}},
    {"router.groups.top", {"topk_group"}},
    {"router.capacity", {"expert_capacity", "capacity_factor", "moe_eval_capacity_token_fraction"}},
    {"router.noise", {"router_jitter_noise", "input_jitter_noise", "moe_jitter_eps"}},
    {"sparsemixer", {"router_jitter_noise"}},
    {"experts.count", {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"}},
    {"experts.intermediate",
     {"moe_intermediate_size", "intermediate_size", "ffn_hidden_size", "d_ff", "ffn_dim",
      "expert_intermediate_size"}},
    {"experts.activation", {"hidden_act", "activation_function", "swiglu_limit"}},
    {"experts", {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"}},
    {"shared_experts",
     {"shared_expert_intermediate_size", "n_shared_experts", "moe_num_shared_experts",
      "moe_shared_expert_intermediate_size", "num_shared_expert", "shared_intermediate_size"}},
    {"weights", {"quantization_config"}},
};

/* The dotted path of key in the config (depth-first, objects only), or 0. */
static int config_key(const cJSON *o, const char *key, char *path, size_t cap, int depth)
{
	const cJSON *e;
	cJSON_ArrayForEach(e, o)
	{
		if (e->string && strcmp(e->string, key) == 0) {
			snprintf(path, cap, "%s", key);
			return 1;
		}
	}
	if (depth >= 3)
		return 0;
	cJSON_ArrayForEach(e, o)
	{
		char sub[256];
		if (cJSON_IsObject(e) && e->string &&
		    config_key(e, key, sub, sizeof sub, depth + 1)) {
			snprintf(path, cap, "%.100s.%.140s", e->string, sub);
			return 1;
		}
	}
	return 0;
}

/* The spec path of the node at loc ("router.top_k", "model.attention"), by
 * walking the written document. */
static int spec_path_at(const struct moe_spec *s, const yaml_node_t *n, struct moe_loc loc,
			char *path, size_t cap)
{
	if (n->type == YAML_SEQUENCE_NODE) {
		int i = 0;
		for (yaml_node_item_t *it = n->data.sequence.items.start;
		     it < n->data.sequence.items.top; it++, i++) {
			const yaml_node_t *v = moe_spec_node(s, *it);
			char sub[256];
			struct moe_loc l = moe_spec_loc(s, v);
			if (l.line == loc.line && l.col == loc.col) {
				snprintf(path, cap, "[%d]", i);
				return 1;
			}
			if (spec_path_at(s, v, loc, sub, sizeof sub)) {
				snprintf(path, cap, "[%d]%s%.200s", i, sub[0] == '[' ? "" : ".",
					 sub);
				return 1;
			}
		}
		return 0;
	}
	if (n->type != YAML_MAPPING_NODE)
		return 0;
	for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top;
	     p++) {
		const yaml_node_t *k = moe_spec_node(s, p->key), *v = moe_spec_node(s, p->value);
		if (k->type != YAML_SCALAR_NODE)
			continue;
		const char *ks = (const char *)k->data.scalar.value;
		struct moe_loc kl = moe_spec_loc(s, k), vl = moe_spec_loc(s, v);
		if ((kl.line == loc.line && kl.col == loc.col) ||
		    (vl.line == loc.line && vl.col == loc.col)) {
			snprintf(path, cap, "%s", ks);
			return 1;
		}
		char sub[256];
		if (spec_path_at(s, v, loc, sub, sizeof sub)) {
			snprintf(path, cap, "%.100s%s%.140s", ks, sub[0] == '[' ? "" : ".", sub);
			return 1;
		}
	}
	return 0;
}

struct captured {
	char *lines;
	size_t len;
	FILE *f;
};

static void capture_line(void *ctx, const char *line)
{
	struct captured *c = ctx;
	fprintf(c->f, "%s\n", line);
}

#define SELF_NAME "imported-spec"

/* Run the written spec through the spec loader and checker, as `moegen
 * check` would. Every error is reported again against the config key the
 * value came from ("config.json: num_experts_per_tok: ..."). 0 when it
 * checks. */
static int self_check(struct imp *m, const cJSON *root, const char *text, size_t len)
{
	struct captured cap = {0};
	cap.f = open_memstream(&cap.lines, &cap.len);
	MOE_ASSERT(cap.f);
	struct moe_diag cd = {.sink = capture_line, .ctx = &cap};
	struct moe_spec *s = moe_spec_load_string(SELF_NAME, text, len, &cd);
	struct moe_desc *desc = calloc(1, sizeof *desc);
	MOE_ASSERT(desc);
	if (s)
		moe_spec_check(s, desc, &cd);
	free(desc);
	fclose(cap.f);
	int bad = !s || cd.n_errors;
	for (char *line = cap.lines, *nl; bad && line && *line; line = nl ? nl + 1 : NULL) {
		nl = strchr(line, '\n');
		if (nl)
			*nl = 0;
		unsigned ln = 0, col = 0;
		int off = 0;
		if (strncmp(line, SELF_NAME ":", sizeof SELF_NAME) != 0 ||
		    sscanf(line + sizeof SELF_NAME, "%u:%u: error: %n", &ln, &col, &off) < 2 ||
		    !off)
			continue; /* notes point at the spec, which is not written */
		const char *msg = line + sizeof SELF_NAME + off;
		char spath[256] = "", ckey[256] = "";
		if (s)
			spec_path_at(s, moe_spec_root(s), (struct moe_loc){NULL, ln, col}, spath,
				     sizeof spath);
		size_t best = 0;
		int which = -1;
		for (size_t i = 0; i < sizeof spec_keys / sizeof *spec_keys; i++) {
			size_t n = strlen(spec_keys[i].spec);
			if (strncmp(spath, spec_keys[i].spec, n) == 0 &&
			    (spath[n] == 0 || spath[n] == '.' || spath[n] == '[') && n > best)
				best = n, which = (int)i;
		}
		for (int k = 0; which >= 0 && k < 8 && spec_keys[which].keys[k] && !ckey[0]; k++)
			config_key(root, spec_keys[which].keys[k], ckey, sizeof ckey, 0);
		if (ckey[0])
			moe_diag_error(m->d, "%s: %s: %s", m->path, ckey, msg);
		else
			moe_diag_error(m->d, "%s: %s (the spec's %s)", m->path, msg,
				       spath[0] ? spath : "text");
	}
	if (bad)
		moe_diag_note_at(m->d, (struct moe_loc){0},
				 "the spec imported from %s does not pass `moegen check`; nothing "
				 "was written",
				 m->path);
	moe_spec_free(s);
	free(cap.lines);
	return bad ? -1 : 0;
}

static int import_root(const char *json_path, cJSON *root, const struct moe_import_opts *o,
		       FILE *out, struct moe_diag *d, const struct moe_gguf_file *gg);
static void gguf_fill(struct imp *m, const struct moe_gguf_file *gg);
static int import_gguf(const char *path, const struct moe_import_opts *o, FILE *out,
		       struct moe_diag *d);

int moe_import_with(const char *json_path, const struct moe_import_opts *o, FILE *out,
		    struct moe_diag *d)
{
	if (moe_gguf_is_gguf(json_path) == 1)
		return import_gguf(json_path, o, out, d);
	size_t len = 0;
	char *text = read_file(json_path, &len, d);
	if (!text)
		return MOE_EXIT_IO;
	if (memchr(text, 0, len)) {
		moe_diag_error(d, "%s: not a JSON text (contains a NUL byte)", json_path);
		free(text);
		return MOE_EXIT_SPEC;
	}
	/* Parse through the terminating NUL so trailing garbage is an error. */
	const char *end = NULL;
	cJSON *root = cJSON_ParseWithLengthOpts(text, len + 1, &end, 1);
	if (!root) {
		size_t off = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
		struct moe_loc loc = {json_path, 1, 1};
		line_col(text, off, &loc.line, &loc.col);
		moe_diag_error_at(d, loc, "malformed JSON");
		free(text);
		return MOE_EXIT_SPEC;
	}
	free(text);
	return import_root(json_path, root, o, out, d, NULL);
}

static int import_root(const char *json_path, cJSON *root, const struct moe_import_opts *o,
		       FILE *out, struct moe_diag *d, const struct moe_gguf_file *gg)
{
	struct imp *m = calloc(1, sizeof *m);
	MOE_ASSERT(m);
	m->path = json_path;
	m->d = d;
	m->stack = o ? o->stack : MOE_IMPORT_ENCODER;
	m->tied = -1;
	m->wdtype = MOE_DTYPE_BF16;
	m->mode = MOE_MODE_TOKEN_CHOICE;
	m->score = MOE_SCORE_SOFTMAX;
	m->norm = MOE_NORM_NONE;
	m->scale = 1.0;
	m->capacity = MOE_CAPACITY_NONE;
	m->noise = MOE_NOISE_NONE;
	m->apply_to = MOE_APPLY_OUTPUT;
	m->kind = m->shared_kind = m->dense_kind = MOE_KIND_GLU;
	m->act = m->shared_act = m->dense_act = MOE_ACT_SILU;
	m->shared_gate = MOE_SHARED_GATE_NONE;
	for (int r = 0; r < MOE_ROLE_COUNT; r++)
		m->layout[r] = (struct imp_layout){
		    MOE_ORIENT_OUT_IN, MOE_FUSE_NONE, 0, MOE_QUANT_NONE, {0, 0}};

	int rc = MOE_EXIT_SPEC;
	const cJSON *mt = cJSON_IsObject(root) ? field(root, "model_type") : NULL;
	if (!cJSON_IsObject(root)) {
		moe_diag_error(d, "%s: the top level must be a JSON object, not %s", json_path,
			       json_type(root));
	} else if (!mt) {
		moe_diag_error(d, "%s: needs 'model_type'", json_path);
	} else if (!cJSON_IsString(mt)) {
		moe_diag_error(d, "%s: 'model_type' must be a string, not %s", json_path,
			       json_type(mt));
	} else {
		const struct family *fam = find_family(mt->valuestring);
		const char *why = fam ? NULL : refused_why(mt->valuestring);
		if (why) {
			moe_diag_error(d, "%s: model_type '%s' is not imported: %s: %s", json_path,
				       mt->valuestring, mt->valuestring, why);
		} else if (!fam) {
			char list[1024] = "";
			const char *cands[N_FAMILIES];
			for (int i = 0; i < N_FAMILIES; i++) {
				cands[i] = families[i].model_type;
				strcat(list, i ? ", " : "");
				strcat(list, families[i].model_type);
			}
			const char *near = moe_closest(mt->valuestring, cands, N_FAMILIES);
			char hint[96] = "";
			if (near)
				snprintf(hint, sizeof hint, "; did you mean '%s'?", near);
			moe_diag_error(d, "%s: unsupported model_type '%.64s'%s (supported: %s)",
				       json_path, mt->valuestring, hint, list);
		} else {
			m->family = fam->model_type;
			spec_name(m, root);
			fam->fn(m, root);
			attention_extras(m, root);
			if (gg && !m->n_err)
				gguf_fill(m, gg);
			int any = 0;
			for (long i = 0; i < m->layers; i++)
				any |= m->moe[i];
			if (!m->n_err && !any)
				err(m, "%s: the configuration has no MoE layer", m->family);
			if (!any_bad(m, expert_keys) && !any_bad(m, top_k_keys) &&
			    m->top_k > m->n_experts) {
				char kk[96], ke[96];
				err(m,
				    "top-k (%ld) exceeds the number of experts (%ld): '%s' against "
				    "'%s'",
				    m->top_k, m->n_experts, key_in(root, top_k_keys, kk, sizeof kk),
				    key_in(root, expert_keys, ke, sizeof ke));
			}
			char *spec = NULL;
			size_t slen = 0;
			FILE *mem = m->n_err ? NULL : open_memstream(&spec, &slen);
			if (mem) {
				write_spec(m, mem);
				MOE_ASSERT(fclose(mem) == 0);
			}
			/* nothing is written that `moegen check` would refuse */
			if (mem && self_check(m, root, spec, slen) == 0) {
				rc = fwrite(spec, 1, slen, out) == slen && fflush(out) == 0 &&
					     !ferror(out)
					 ? MOE_EXIT_OK
					 : MOE_EXIT_IO;
				if (rc != MOE_EXIT_OK)
					moe_diag_error(d, "cannot write the spec: %s",
						       strerror(errno));
			}
			free(spec);
		}
	}
	free(m);
	cJSON_Delete(root);
	return rc;
}

/* GGUF ------------------------------------------------------------------- */

/* llama.cpp's MoE architectures whose metadata imports, as the config.json
 * of the family it maps to (deepseek2: deepseek_v2 or, with sigmoid gating,
 * deepseek_v3; llama: mixtral when it has experts). */
static const struct {
	const char *arch, *model_type;
} gguf_archs[] = {{"qwen3moe", "qwen3_moe"},
		  {"qwen2moe", "qwen2_moe"},
		  {"olmoe", "olmoe"},
		  {"deepseek2", "deepseek_v2"},
		  {"llama", "mixtral"}};
#define GGUF_ARCH_LIST "qwen3moe, qwen2moe, olmoe, deepseek2, llama (with experts)"

/* llama.cpp's other MoE architectures, refused by name: those whose
 * transformers checkpoint imports (from its config.json) and those with no
 * family at all. */
#define GGUF_VIA_CONFIG "its GGUF metadata is not mapped yet; import its config.json"
static const struct {
	const char *arch, *why;
} gguf_refused[] = {
    {"qwen3next", GGUF_VIA_CONFIG},
    {"llama4", GGUF_VIA_CONFIG},
    {"dbrx", GGUF_VIA_CONFIG},
    {"phimoe", GGUF_VIA_CONFIG},
    {"gpt-oss", GGUF_VIA_CONFIG},
    {"granitemoe", GGUF_VIA_CONFIG},
    {"glm4moe", GGUF_VIA_CONFIG},
    {"ernie4_5-moe", GGUF_VIA_CONFIG},
    {"hunyuan-moe", GGUF_VIA_CONFIG},
    {"dots1", GGUF_VIA_CONFIG},
    {"minimax-m2", GGUF_VIA_CONFIG},
    {"jamba", GGUF_VIA_CONFIG},
    {"deepseek", "DeepSeek-MoE (V1) has no family in moegen"},
    {"grok", "Grok-1 has no family in moegen"},
    {"arctic", "Snowflake Arctic (a dense MLP beside the experts) has no family in moegen"},
    {"bailingmoe", "Ling (bailingmoe) has no family in moegen"},
    {"bailingmoe2", "Ling 2 (bailingmoe2) has no family in moegen"},
};

/* One expert tensor's kept format (kind NONE for F32/F16/BF16), or -1 with
 * an error naming the tensor and why its type is not kept. */
static int gguf_role_fmt(struct imp *m, const char *nm, const struct moe_gguf_tensor *t,
			 struct moe_qfmt *f)
{
	const char *tn = moe_gguf_type_name(t->type);
	*f = (struct moe_qfmt){MOE_QFORMAT_NONE, 0, 0};
	if (t->type == MOE_GGML_F32 || t->type == MOE_GGML_F16 || t->type == MOE_GGML_BF16 ||
	    moe_gguf_qfmt(t->type, f) == 0)
		return 0;
	const char *why = moe_gguf_not_kept(t->type);
	err(m,
	    "tensor '%s' is %s: experts are read as F32, F16, BF16, Q8_0, Q6_K, Q5_0, Q4_0, Q4_1 "
	    "or Q4_K%s%s",
	    nm, tn ? tn : "?", why ? "; " : "", why ? why : "");
	return -1;
}

/* The expert tensors' ggml types fill quant: (one format per matrix set,
 * the same in every MoE layer; F32/F16/BF16 experts are not quantized), and
 * the names are llama.cpp's. */
static void gguf_fill(struct imp *m, const struct moe_gguf_file *gg)
{
	m->gguf = 1;
	/* the family's note on config.json's layer keys does not apply */
	for (int i = 0; i < m->n_notes; i++)
		if (strstr(m->notes[i], "decoder_sparse_step"))
			snprintf(m->notes[i], IMP_NOTE_MAX,
				 "GGUF: every one of the block_count layers is an MoE layer.");
	for (int r = 0; r < MOE_ROLE_COUNT; r++)
		m->names[r][0] = 0;
	name(m, MOE_ROLE_ROUTER, "blk.{layer}.ffn_gate_inp.weight");
	name(m, MOE_ROLE_GATE, "blk.{layer}.ffn_gate_exps.weight");
	name(m, MOE_ROLE_UP, "blk.{layer}.ffn_up_exps.weight");
	name(m, MOE_ROLE_DOWN, "blk.{layer}.ffn_down_exps.weight");
	if (m->shared_count) {
		name(m, MOE_ROLE_SHARED_GATE, "blk.{layer}.ffn_gate_shexp.weight");
		name(m, MOE_ROLE_SHARED_UP, "blk.{layer}.ffn_up_shexp.weight");
		name(m, MOE_ROLE_SHARED_DOWN, "blk.{layer}.ffn_down_shexp.weight");
		if (m->shared_gate != MOE_SHARED_GATE_NONE)
			name(m, MOE_ROLE_SHARED_EXPERT_GATE,
			     "blk.{layer}.ffn_gate_inp_shexp.weight");
	}
	if (m->select_bias)
		name(m, MOE_ROLE_SELECT_BIAS, "blk.{layer}.exp_probs_b.bias");
	const char *arch = moe_gguf_kv_str(gg, "general.architecture");
	if (arch && !strcmp(arch, "deepseek2")) {
		/* llama.cpp: renormalized when expert_weights_norm (softmax
		 * too), group scores the sum of the two best (softmax too) */
		const struct moe_gguf_kv *nw =
		    moe_gguf_kv_find(gg, "deepseek2.expert_weights_norm");
		int renorm = nw && nw->type == MOE_GGUF_BOOL && nw->u;
		m->norm = renorm ? MOE_NORM_SUM : MOE_NORM_NONE;
		if (m->n_groups)
			m->group_score = MOE_GROUP_SCORE_SUM_TOP2;
		for (int i = 0; i < m->n_notes; i++)
			if (!strncmp(m->notes[i], "deepseek_v", 10))
				snprintf(m->notes[i], IMP_NOTE_MAX,
					 "deepseek2 (llama.cpp's graph): s = %s(x W_g^T) (f32)%s; "
					 "top-k%s; the weights are the unbiased s, %s, times "
					 "expert_weights_scale.",
					 m->score == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax",
					 m->select_bias ? ", chosen by s + exp_probs_b" : "",
					 m->n_groups ? " within the expert_group_used_count groups "
						       "whose two best scores sum highest"
						     : "",
					 renorm ? "divided by max(sum, 2^-14)"
						: "not renormalized (expert_weights_norm false)");
	}
	/* llama.cpp divides by the sum clamped below at 2^-14 (ggml_clamp) */
	if (m->norm == MOE_NORM_SUM)
		m->norm_eps = 0, m->norm_min = 6.103515625e-5;
	static const struct {
		enum moe_role r;
		enum moe_qmat q;
	} roles[] = {{MOE_ROLE_GATE, MOE_QMAT_UP},
		     {MOE_ROLE_UP, MOE_QMAT_UP},
		     {MOE_ROLE_DOWN, MOE_QMAT_DOWN},
		     {MOE_ROLE_SHARED_GATE, MOE_QMAT_SHARED_UP},
		     {MOE_ROLE_SHARED_UP, MOE_QMAT_SHARED_UP},
		     {MOE_ROLE_SHARED_DOWN, MOE_QMAT_SHARED_DOWN}};
	int seen[MOE_QMAT_COUNT] = {0}, mixed[MOE_QMAT_COUNT] = {0};
	uint32_t type_of[MOE_QMAT_COUNT] = {0};
	char first_nm[MOE_QMAT_COUNT][MOE_NAME_MAX * 2];
	for (size_t i = 0; i < sizeof roles / sizeof *roles; i++)
		for (long l = 0; l < m->layers; l++) {
			if (!m->moe[l] || !m->names[roles[i].r][0])
				continue;
			char nm[MOE_NAME_MAX * 2], e[256];
			if (moe_st_expand(m->names[roles[i].r], l, -1, nm, sizeof nm, e,
					  sizeof e) != MOE_OK) {
				err(m, "%s", e);
				return;
			}
			const struct moe_gguf_tensor *t = moe_gguf_find(gg, nm);
			if (!t) {
				err(m, "tensor '%s' (%s, layer %ld) not found", nm,
				    moe_role_names[roles[i].r], l);
				return;
			}
			enum moe_qmat q = roles[i].q;
			const char *tn = moe_gguf_type_name(t->type);
			struct moe_qfmt f;
			if (gguf_role_fmt(m, nm, t, &f) != 0)
				return;
			if (!seen[q]) {
				seen[q] = 1, type_of[q] = t->type, m->qfmt[q] = f;
				snprintf(first_nm[q], sizeof first_nm[q], "%s", nm);
			} else if ((f.kind != m->qfmt[q].kind || f.group != m->qfmt[q].group ||
				    f.zero != m->qfmt[q].zero) &&
				   !mixed[q]) {
				/* one format per matrix set in every layer (Q8_0 and
				 * Q5_0 share one): a set whose format changes
				 * (llama.cpp's Q4_K_M gives ffn_down Q6_K in some
				 * layers) is dequantized at load */
				const char *pn = moe_gguf_type_name(type_of[q]);
				mixed[q] = 1;
				warn(m,
				     "tensor '%s' is %s but '%s' is %s: the spec keeps one format "
				     "per matrix set (gate and up are read together), so the %s "
				     "experts are not kept quantized; they are dequantized to "
				     "dtype.weights at load",
				     nm, tn ? tn : "?", first_nm[q], pn ? pn : "?",
				     moe_qmat_names[q]);
				note(m,
				     "GGUF: the %s experts change type between tensors (%s, %s): "
				     "dequantized to dtype.weights at load, not kept quantized.",
				     moe_qmat_names[q], pn ? pn : "?", tn ? tn : "?");
			}
		}
	for (int q = 0; q < MOE_QMAT_COUNT; q++)
		if (mixed[q])
			m->qfmt[q] = (struct moe_qfmt){MOE_QFORMAT_NONE, 0, 0};
	for (int q = 0; q < MOE_QMAT_COUNT; q++) {
		if (m->qfmt[q].kind == MOE_QFORMAT_NONE)
			continue;
		uint32_t ty = type_of[q];
		note(m,
		     "GGUF: the %s experts are %s, kept quantized as %s groups of %u%s; f32 "
		     "scales (%s).",
		     moe_qmat_names[q], moe_gguf_type_name(ty), moe_qformat_names[m->qfmt[q].kind],
		     m->qfmt[q].group,
		     m->qfmt[q].kind == MOE_QFORMAT_INT4
			 ? (m->qfmt[q].zero ? " with an offset" : ", symmetric")
			 : "",
		     ty == MOE_GGML_Q4_K   ? "s = d sc, o = -dmin m per sub-block"
		     : ty == MOE_GGML_Q4_0 ? "s = d, o = -8 d"
		     : ty == MOE_GGML_Q4_1 ? "s = d, o = m"
		     : ty == MOE_GGML_Q6_K ? "codes q - 32, s = d sc per 16"
		     : ty == MOE_GGML_Q5_0 ? "codes q - 16, s = d"
					   : "s = d");
	}
}

/* Copy a numeric key into the config, when the file has it. */
static void gguf_num(cJSON *c, const struct moe_gguf_file *gg, const char *arch, const char *key,
		     const char *hf)
{
	char k[160];
	snprintf(k, sizeof k, "%s.%s", arch, key);
	double v;
	if (moe_gguf_kv_num(gg, k, &v) == 0)
		cJSON_AddNumberToObject(c, hf, v);
}

/* A numeric key of the architecture, or dflt when absent. */
static double gguf_get(const struct moe_gguf_file *gg, const char *arch, const char *key,
		       double dflt)
{
	char k[160];
	snprintf(k, sizeof k, "%s.%s", arch, key);
	double v;
	return moe_gguf_kv_num(gg, k, &v) == 0 ? v : dflt;
}

/* The family a GGUF file's general.architecture maps to, or NULL with *why
 * (a refusal's reason) when refused. */
static const char *gguf_model_type(const struct moe_gguf_file *gg, const char *arch,
				   const char **why)
{
	*why = NULL;
	if (!arch)
		return NULL;
	for (size_t i = 0; i < sizeof gguf_refused / sizeof *gguf_refused; i++)
		if (!strcmp(arch, gguf_refused[i].arch))
			*why = gguf_refused[i].why;
	if (!strcmp(arch, "llama") && gguf_get(gg, arch, "expert_count", 0) < 1) {
		*why = "a llama file without expert_count is a dense model";
		return NULL;
	}
	if (!strcmp(arch, "deepseek2"))
		return gguf_get(gg, arch, "expert_gating_func", 1) == 2 ? "deepseek_v3"
									: "deepseek_v2";
	for (size_t i = 0; i < sizeof gguf_archs / sizeof *gguf_archs; i++)
		if (!strcmp(arch, gguf_archs[i].arch))
			return gguf_archs[i].model_type;
	return NULL;
}

/* The deepseek2 keys: the routing as llama.cpp's graph computes it. */
static void gguf_deepseek2(cJSON *c, const struct moe_gguf_file *gg, const char *arch, int v3)
{
	gguf_num(c, gg, arch, "expert_count", "n_routed_experts");
	cJSON_AddNumberToObject(c, "first_k_dense_replace",
				gguf_get(gg, arch, "leading_dense_block_count", 0));
	cJSON_AddNumberToObject(c, "moe_layer_freq", 1);
	cJSON_AddNumberToObject(c, "n_shared_experts",
				gguf_get(gg, arch, "expert_shared_count", 0));
	cJSON_AddNumberToObject(c, "routed_scaling_factor",
				gguf_get(gg, arch, "expert_weights_scale", 1));
	double ng = gguf_get(gg, arch, "expert_group_count", 1);
	double tg = gguf_get(gg, arch, "expert_group_used_count", ng);
	cJSON_AddNumberToObject(c, "n_group", ng < 1 ? 1 : ng);
	cJSON_AddNumberToObject(c, "topk_group", ng < 1 ? 1 : tg);
	/* the renormalization is set from expert_weights_norm in gguf_fill */
	cJSON_AddBoolToObject(c, "norm_topk_prob", 0);
	cJSON_AddStringToObject(c, "scoring_func", v3 ? "sigmoid" : "softmax");
	cJSON_AddStringToObject(c, "topk_method",
				v3       ? "noaux_tc"
				: ng > 1 ? "group_limited_greedy"
					 : "greedy");
	double kv_lora = gguf_get(gg, arch, "attention.kv_lora_rank", 0);
	if (kv_lora > 0) {
		double rope = gguf_get(gg, arch, "rope.dimension_count", 0);
		double kl = gguf_get(gg, arch, "attention.key_length_mla",
				     gguf_get(gg, arch, "attention.key_length", 0));
		double vl = gguf_get(gg, arch, "attention.value_length_mla",
				     gguf_get(gg, arch, "attention.value_length", 0));
		cJSON_AddNumberToObject(c, "kv_lora_rank", kv_lora);
		double ql = gguf_get(gg, arch, "attention.q_lora_rank", 0);
		if (ql > 0)
			cJSON_AddNumberToObject(c, "q_lora_rank", ql);
		cJSON_AddNumberToObject(c, "qk_rope_head_dim", rope);
		cJSON_AddNumberToObject(c, "qk_nope_head_dim", kl - rope);
		cJSON_AddNumberToObject(c, "v_head_dim", vl);
	}
}

/* A GGUF file: its metadata as the config.json of the family it maps to. */
static int import_gguf(const char *path, const struct moe_import_opts *o, FILE *out,
		       struct moe_diag *d)
{
	char e[1024];
	struct moe_gguf_file *gg;
	enum moe_status st = moe_gguf_open(path, &gg, e, sizeof e);
	if (st != MOE_OK) {
		moe_diag_error(d, "%s", e);
		return st == MOE_ERR_IO ? MOE_EXIT_IO : MOE_EXIT_SPEC;
	}
	const char *arch = moe_gguf_kv_str(gg, "general.architecture"), *why;
	const char *mt = gguf_model_type(gg, arch, &why);
	if (!mt) {
		if (why)
			moe_diag_error(d, "%s: general.architecture '%.64s' is not imported: %s",
				       path, arch, why);
		else
			moe_diag_error(d, "%s: %s general.architecture%s%.64s%s (supported: %s)",
				       path, arch ? "unsupported" : "no", arch ? " '" : "",
				       arch ? arch : "", arch ? "'" : "", GGUF_ARCH_LIST);
		moe_gguf_close(gg);
		return MOE_EXIT_SPEC;
	}
	cJSON *c = cJSON_CreateObject();
	MOE_ASSERT(c);
	cJSON_AddStringToObject(c, "model_type", mt);
	const char *gn = moe_gguf_kv_str(gg, "general.name");
	if (gn)
		cJSON_AddStringToObject(c, "_name_or_path", gn);
	int ds = !strncmp(mt, "deepseek", 8);
	gguf_num(c, gg, arch, "embedding_length", "hidden_size");
	gguf_num(c, gg, arch, "block_count", "num_hidden_layers");
	gguf_num(c, gg, arch, "expert_count",
		 !strcmp(mt, "mixtral") ? "num_local_experts" : "num_experts");
	gguf_num(c, gg, arch, "expert_used_count", "num_experts_per_tok");
	gguf_num(c, gg, arch, "feed_forward_length", "intermediate_size");
	/* the experts' width: expert_feed_forward_length, or (llama, olmoe
	 * files without it) feed_forward_length */
	double fe = gguf_get(gg, arch, "expert_feed_forward_length",
			     gguf_get(gg, arch, "feed_forward_length", -1));
	int plain = !strcmp(mt, "mixtral") || !strcmp(mt, "olmoe"); /* no dense FFN */
	if (plain)
		cJSON_DeleteItemFromObject(c, "intermediate_size");
	if (fe >= 0)
		cJSON_AddNumberToObject(c, plain ? "intermediate_size" : "moe_intermediate_size",
					fe);
	gguf_num(c, gg, arch, "attention.head_count", "num_attention_heads");
	gguf_num(c, gg, arch, "attention.head_count_kv", "num_key_value_heads");
	if (!ds)
		gguf_num(c, gg, arch, "attention.key_length", "head_dim");
	gguf_num(c, gg, arch, "vocab_size", "vocab_size");
	const struct moe_gguf_kv *tok = moe_gguf_kv_find(gg, "tokenizer.ggml.tokens");
	if (!cJSON_GetObjectItem(c, "vocab_size") && tok && tok->type == MOE_GGUF_ARRAY)
		cJSON_AddNumberToObject(c, "vocab_size", (double)tok->arr_n);
	cJSON_AddStringToObject(c, "hidden_act", "silu");
	if (!strcmp(mt, "qwen2_moe"))
		gguf_num(c, gg, arch, "expert_shared_feed_forward_length",
			 "shared_expert_intermediate_size");
	if (ds)
		gguf_deepseek2(c, gg, arch, !strcmp(mt, "deepseek_v3"));
	/* llama.cpp renormalizes the top-k weights for qwen3moe and llama
	 * (mixtral), not for qwen2moe and olmoe; deepseek2 per
	 * expert_weights_norm (set in gguf_fill) */
	if (!ds)
		cJSON_AddBoolToObject(c, "norm_topk_prob",
				      !strcmp(mt, "qwen3_moe") || !strcmp(mt, "mixtral"));
	/* the router's type is the spec's weight dtype (F32 in llama.cpp's files) */
	const struct moe_gguf_tensor *rt = NULL;
	for (long l = 0; !rt && l < (long)gguf_get(gg, arch, "block_count", 0) && l < 4096; l++) {
		char nm[64];
		snprintf(nm, sizeof nm, "blk.%ld.ffn_gate_inp.weight", l);
		rt = moe_gguf_find(gg, nm);
	}
	cJSON_AddStringToObject(c, "torch_dtype",
				rt && rt->type == MOE_GGML_BF16  ? "bfloat16"
				: rt && rt->type == MOE_GGML_F16 ? "float16"
								 : "float32");
	int rc = import_root(path, c, o, out, d, gg);
	moe_gguf_close(gg);
	return rc;
}

int moe_import(const char *json_path, FILE *out, struct moe_diag *d)
{
	return moe_import_with(json_path, NULL, out, d);
}

/* The card --------------------------------------------------------------- */

/* The model_type the config names, in the families[] spelling, or NULL. */
static const char *config_family(const char *json_path, struct moe_diag *d)
{
	if (moe_gguf_is_gguf(json_path) == 1) {
		struct moe_gguf_file *gg;
		const char *fam = NULL;
		char e[512];
		if (moe_gguf_open(json_path, &gg, e, sizeof e) != MOE_OK)
			return NULL;
		const char *why,
		    *mt = gguf_model_type(gg, moe_gguf_kv_str(gg, "general.architecture"), &why);
		if (mt)
			fam = find_family(mt)->model_type;
		moe_gguf_close(gg);
		return fam;
	}
	size_t len = 0;
	char *text = read_file(json_path, &len, d);
	if (!text)
		return NULL;
	cJSON *root = cJSON_ParseWithLength(text, len);
	free(text);
	const cJSON *mt = cJSON_IsObject(root) ? field(root, "model_type") : NULL;
	const struct family *fam = cJSON_IsString(mt) ? find_family(mt->valuestring) : NULL;
	cJSON_Delete(root);
	return fam ? fam->model_type : NULL;
}

/* The spec's leading comments, one string per note (continuation lines
 * "#   " joined), without the first ("Imported by ..."). */
static cJSON *spec_notes(const char *spec)
{
	cJSON *a = cJSON_CreateArray();
	char note_buf[4 * IMP_NOTE_MAX] = "";
	size_t n = 0;
	int index = -1;
	for (const char *p = spec; p[0] == '#'; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : "") {
		const char *eol = strchr(p, '\n');
		size_t k = eol ? (size_t)(eol - p) : strlen(p);
		int cont = k >= 4 && strncmp(p, "#   ", 4) == 0;
		const char *t = p + (cont ? 4 : 2);
		size_t tl = k >= (size_t)(t - p) ? k - (size_t)(t - p) : 0;
		if (!cont) {
			if (index >= 1)
				cJSON_AddItemToArray(a, cJSON_CreateString(note_buf));
			index++;
			n = 0;
			note_buf[0] = 0;
		} else if (n + 1 < sizeof note_buf) {
			note_buf[n++] = ' ';
			note_buf[n] = 0;
		}
		if (n + tl < sizeof note_buf) {
			memcpy(note_buf + n, t, tl);
			n += tl;
			note_buf[n] = 0;
		}
	}
	if (index >= 1)
		cJSON_AddItemToArray(a, cJSON_CreateString(note_buf));
	return a;
}

int moe_import_card(const char *json_path, const struct moe_import_opts *o, FILE *out,
		    struct moe_diag *d)
{
	char *spec = NULL;
	size_t len = 0;
	FILE *mem = open_memstream(&spec, &len);
	MOE_ASSERT(mem);
	int rc = moe_import_with(json_path, o, mem, d);
	MOE_ASSERT(fclose(mem) == 0);
	if (rc != MOE_EXIT_OK) {
		free(spec);
		return rc;
	}
	/* the import checked this spec already: it loads and checks */
	struct moe_spec *s = moe_spec_load_string(json_path, spec, len, d);
	struct moe_desc *desc = calloc(1, sizeof *desc);
	MOE_ASSERT(s && desc);
	MOE_ASSERT(moe_spec_check(s, desc, d) == 0);
	cJSON *card = cJSON_CreateObject();
	cJSON_AddStringToObject(card, "config", json_path);
	const char *family = config_family(json_path, d);
	cJSON_AddStringToObject(card, "family", family ? family : "");
	/* the stack matters only for the encoder-decoder families */
	if (family &&
	    (strcmp(family, "switch_transformers") == 0 || strcmp(family, "nllb_moe") == 0))
		cJSON_AddStringToObject(
		    card, "stack", o && o->stack == MOE_IMPORT_DECODER ? "decoder" : "encoder");
	cJSON_AddItemToObject(card, "notes", spec_notes(spec));
	cJSON *info = moe_info_json(desc);
	cJSON *it;
	while ((it = info->child)) {
		cJSON_DetachItemViaPointer(info, it);
		cJSON_AddItemToObject(card, it->string, it);
	}
	cJSON_Delete(info);
	char *text = cJSON_Print(card);
	MOE_ASSERT(text);
	rc = fprintf(out, "%s\n", text) > 0 && fflush(out) == 0 ? MOE_EXIT_OK : MOE_EXIT_IO;
	if (rc != MOE_EXIT_OK)
		moe_diag_error(d, "cannot write the card: %s", strerror(errno));
	cJSON_free(text);
	cJSON_Delete(card);
	free(desc);
	moe_spec_free(s);
	free(spec);
	return rc;
}

/* The command ----------------------------------------------------------- */

static const char import_usage[] =
    "usage: moegen import CONFIG.json|FILE.gguf [-o FILE] [--encoder | --decoder] [--card]\n"
    "  Write an explicit moegen spec for a Hugging Face config.json (stdout without -o),\n"
    "  or for a GGUF file's metadata (experts kept quantized in the file's format).\n"
    "  --decoder imports the decoder stack of an encoder-decoder model (default: encoder).\n"
    "  --card writes the model card instead: JSON with the family, the semantics chosen,\n"
    "  parameters by part, FLOPs and weight bytes per token (as `moegen info --json`).\n";

int moe_cmd_import(int argc, char **argv)
{
	const char *in = NULL, *outp = NULL;
	int card = 0;
	struct moe_import_opts o = {MOE_IMPORT_ENCODER};
	struct moe_diag d = {0};
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
			fputs(import_usage, stdout);
			return MOE_EXIT_OK;
		} else if (strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0) {
			if (i + 1 >= argc || outp) {
				moe_diag_error(&d, "import: %s",
					       outp ? "-o given twice" : "-o needs a file name");
				fputs(import_usage, stderr);
				return MOE_EXIT_USAGE;
			}
			outp = argv[++i];
		} else if (strcmp(a, "--decoder") == 0) {
			o.stack = MOE_IMPORT_DECODER;
		} else if (strcmp(a, "--encoder") == 0) {
			o.stack = MOE_IMPORT_ENCODER;
		} else if (strcmp(a, "--card") == 0) {
			card = 1;
		} else if (a[0] == '-' && a[1]) {
			moe_diag_error(&d, "import: unknown option '%s'", a);
			fputs(import_usage, stderr);
			return MOE_EXIT_USAGE;
		} else if (in) {
			moe_diag_error(&d, "import: one config file expected, got '%s' and '%s'",
				       in, a);
			fputs(import_usage, stderr);
			return MOE_EXIT_USAGE;
		} else {
			in = a;
		}
	}
	if (!in) {
		moe_diag_error(&d, "import: no config file");
		fputs(import_usage, stderr);
		return MOE_EXIT_USAGE;
	}
	int (*run)(const char *, const struct moe_import_opts *, FILE *, struct moe_diag *) =
	    card ? moe_import_card : moe_import_with;
	if (!outp || strcmp(outp, "-") == 0)
		return run(in, &o, stdout, &d);

	/* Import into memory first: a config error leaves no file behind at all. */
	char *buf = NULL;
	size_t len = 0;
	FILE *mem = open_memstream(&buf, &len);
	MOE_ASSERT(mem);
	int rc = run(in, &o, mem, &d);
	fclose(mem);
	if (rc != MOE_EXIT_OK) {
		free(buf);
		return rc;
	}
	/* Never over the config it reads, a device or a directory; through a
	 * symlink; atomically (moe_output_*). */
	char err[PATH_MAX + 256];
	const char *inputs[1] = {in};
	struct moe_output out;
	if (moe_output_open(&out, outp, inputs, 1, 0666, err, sizeof err) != 0 ||
	    moe_output_write(&out, buf, len, err, sizeof err) != 0 ||
	    moe_output_commit(&out, err, sizeof err) != 0) {
		moe_diag_error(&d, "%s", err);
		rc = MOE_EXIT_IO;
	}
	moe_output_abort(&out);
	free(buf);
	return rc;
}
