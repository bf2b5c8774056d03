/* desc.c: name tables, derived sizes and the text dump of struct moe_desc.
 * Linked into both moegen and every model.so. */
#include "moe_desc.h"
#include "moe_ops.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME_(v, s) s,
const char *const moe_dtype_names[] = {MOE_DTYPES(NAME_)};
const char *const moe_mode_names[] = {
#define MOE_MODE(v, s, targets, family, pack) s,
#include "moe_modes.def"
#undef MOE_MODE
};
const char *const moe_compute_names[] = {MOE_COMPUTES(NAME_)};
const char *const moe_score_names[] = {MOE_SCORES(NAME_)};
const char *const moe_norm_names[] = {MOE_NORMS(NAME_)};
const char *const moe_group_score_names[] = {MOE_GROUP_SCORES(NAME_)};
const char *const moe_capacity_names[] = {MOE_CAPACITIES(NAME_)};
const char *const moe_priority_names[] = {MOE_PRIORITIES(NAME_)};
const char *const moe_overflow_names[] = {MOE_OVERFLOWS(NAME_)};
const char *const moe_noise_names[] = {MOE_NOISES(NAME_)};
const char *const moe_apply_names[] = {MOE_APPLIES(NAME_)};
const char *const moe_kind_names[] = {MOE_KINDS(NAME_)};
const char *const moe_act_names[] = {MOE_ACTS(NAME_)};
const char *const moe_shared_gate_names[] = {MOE_SHARED_GATES(NAME_)};
const char *const moe_attn_names[] = {MOE_ATTNS(NAME_)};
const char *const moe_qk_norm_names[] = {MOE_QK_NORMS(NAME_)};
const char *const moe_linear_attn_names[] = {MOE_LINEAR_ATTNS(NAME_)};
const char *const moe_fuse_names[] = {MOE_FUSES(NAME_)};
const char *const moe_orient_names[] = {MOE_ORIENTS(NAME_)};
const char *const moe_quant_names[] = {MOE_QUANTS(NAME_)};
const char *const moe_qformat_names[] = {MOE_QFORMATS(NAME_)};
const char *const moe_qmat_names[] = {MOE_QMATS(NAME_)};
const char *const moe_role_names[] = {MOE_ROLES(NAME_)};
/* moe_ops.h */
#define OP_NAME_(v, s, shape) s,
#define OP_SHAPE_(v, s, shape) MOE_SHAPE_##shape,
const char *const moe_op_names[] = {MOE_OPS(OP_NAME_)};
const enum moe_shape moe_op_shapes[] = {MOE_OPS(OP_SHAPE_)};
const char *const moe_shape_names[] = {MOE_SHAPES(NAME_)};
_Static_assert(sizeof moe_op_names / sizeof *moe_op_names == MOE_OP_COUNT, "op table");
_Static_assert(sizeof moe_shape_names / sizeof *moe_shape_names == MOE_SHAPE_COUNT, "shapes");
#undef NAME_
#undef OP_NAME_
#undef OP_SHAPE_

/* enum moe_dtype is public (moe.h): the X-macro list must match it. */
#define DTYPE_ORDER_(v, s) MOE_DTYPE_ORDER_##v,
enum { MOE_DTYPES(DTYPE_ORDER_) MOE_DTYPE_ORDER_COUNT };
#undef DTYPE_ORDER_
#define DTYPE_CHECK_(v, s)                                                                         \
	_Static_assert((int)MOE_DTYPE_ORDER_##v == (int)MOE_DTYPE_##v, "dtype " s);
MOE_DTYPES(DTYPE_CHECK_)
#undef DTYPE_CHECK_
_Static_assert((int)MOE_DTYPE_ORDER_COUNT == (int)MOE_DTYPE_COUNT, "dtype list");

_Static_assert(sizeof moe_mode_names / sizeof *moe_mode_names == MOE_MODE_COUNT, "mode table");
_Static_assert(sizeof moe_role_names / sizeof *moe_role_names == MOE_ROLE_COUNT, "role table");
_Static_assert(sizeof moe_act_names / sizeof *moe_act_names == MOE_ACT_COUNT, "act table");

int moe_enum_lookup(const char *const *names, int n, const char *s)
{
	for (int i = 0; i < n; i++)
		if (strcmp(names[i], s) == 0)
			return i;
	return -1;
}

int moe_desc_quantized(const struct moe_desc *d)
{
	for (int i = 0; i < MOE_QMAT_COUNT; i++)
		if (d->qfmt[i].kind != MOE_QFORMAT_NONE)
			return 1;
	return 0;
}

int moe_role_qmat(enum moe_role r)
{
	switch (r) {
	case MOE_ROLE_GATE:
	case MOE_ROLE_UP:
	case MOE_ROLE_GATE_UP:
		return MOE_QMAT_UP;
	case MOE_ROLE_DOWN:
		return MOE_QMAT_DOWN;
	case MOE_ROLE_SHARED_GATE:
	case MOE_ROLE_SHARED_UP:
	case MOE_ROLE_SHARED_GATE_UP:
		return MOE_QMAT_SHARED_UP;
	case MOE_ROLE_SHARED_DOWN:
		return MOE_QMAT_SHARED_DOWN;
	default:
		return -1;
	}
}

/* Quantized experts compute in f32 (the bf16 dot kernels read bf16 panels). */
int moe_desc_int8_compute(const struct moe_desc *d)
{
	return d->compute == MOE_COMPUTE_INT8;
}

double moe_desc_compute_tol(const struct moe_desc *d, double f32_tol)
{
	double t = moe_desc_int8_compute(d)   ? MOE_INT8_COMPUTE_TOL
		   : moe_desc_bf16_compute(d) ? MOE_BF16_COMPUTE_TOL
					      : 0.0;
	return t > f32_tol ? t : f32_tol;
}

int moe_desc_bf16_compute(const struct moe_desc *d)
{
	if (moe_desc_quantized(d))
		return 0;
	return d->compute == MOE_COMPUTE_BF16 ||
	       (d->compute == MOE_COMPUTE_AUTO && d->weight_dtype == MOE_DTYPE_BF16);
}

uint32_t moe_desc_route_width(const struct moe_desc *d)
{
	switch (d->mode) {
	case MOE_MODE_DENSE:
	case MOE_MODE_EXPERT_CHOICE:
		return d->n_experts;
	case MOE_MODE_SOFT:
		return 0;
	case MOE_MODE_PRODUCT_KEY:
		return d->pk_heads * d->pk_top_k;
	default:
		return d->top_k;
	}
}

uint32_t moe_desc_shared_width(const struct moe_desc *d)
{
	return d->shared_count * d->shared_intermediate;
}

uint64_t moe_desc_pk_experts(const struct moe_desc *d)
{
	return (uint64_t)d->pk_sub_keys * d->pk_sub_keys;
}

uint32_t moe_desc_pk_sub_top_k(const struct moe_desc *d)
{
	return d->pk_sub_top_k ? d->pk_sub_top_k : d->pk_top_k;
}

static int is_gated(enum moe_kind k)
{
	return k == MOE_KIND_GLU;
}

int moe_desc_role_shape(const struct moe_desc *d, enum moe_role r, uint64_t *rows, uint64_t *cols,
			int *per_expert)
{
	uint64_t H = d->hidden, E = d->n_experts, I = d->intermediate;
	uint64_t Is = moe_desc_shared_width(d);
	int neuron = d->kind == MOE_KIND_SINGLE_NEURON;
	uint64_t R = 0, C = 0;
	int pe = 0;

	switch (r) {
	case MOE_ROLE_ROUTER:
		if (d->mode != MOE_MODE_PRODUCT_KEY && d->mode != MOE_MODE_SOFT)
			R = E, C = H;
		break;
	case MOE_ROLE_ROUTER_BIAS:
		if (d->router_bias)
			R = 1, C = E;
		break;
	case MOE_ROLE_SELECT_BIAS:
		if (d->select_bias)
			R = 1, C = E;
		break;
	case MOE_ROLE_NOISE:
		if (d->noise == MOE_NOISE_LEARNED_GAUSSIAN)
			R = E, C = H;
		break;
	case MOE_ROLE_GROUP_ROUTER:
		if (d->mode == MOE_MODE_HIERARCHICAL)
			R = d->levels[0].groups, C = H;
		break;
	case MOE_ROLE_GATE:
		if (!neuron && is_gated(d->kind))
			R = I, C = H, pe = 1;
		break;
	case MOE_ROLE_UP:
		if (!neuron)
			R = I, C = H, pe = 1;
		break;
	case MOE_ROLE_DOWN:
		if (!neuron)
			R = H, C = I, pe = 1;
		break;
	case MOE_ROLE_GATE_BIAS:
		if (!neuron && d->expert_bias && is_gated(d->kind))
			R = 1, C = I, pe = 1;
		break;
	case MOE_ROLE_UP_BIAS:
		if (!neuron && d->expert_bias)
			R = 1, C = I, pe = 1;
		break;
	case MOE_ROLE_DOWN_BIAS:
		if (!neuron && d->expert_bias)
			R = 1, C = H, pe = 1;
		break;
	case MOE_ROLE_SHARED_GATE:
		if (Is && is_gated(d->shared_kind))
			R = Is, C = H;
		break;
	case MOE_ROLE_SHARED_UP:
		if (Is)
			R = Is, C = H;
		break;
	case MOE_ROLE_SHARED_DOWN:
		if (Is)
			R = H, C = Is;
		break;
	case MOE_ROLE_SHARED_EXPERT_GATE:
		if (Is && d->shared_gate == MOE_SHARED_GATE_SIGMOID)
			R = 1, C = H;
		break;
	case MOE_ROLE_SOFT_SLOTS:
		if (d->mode == MOE_MODE_SOFT)
			R = E * d->soft_slots_per_expert, C = H;
		break;
	case MOE_ROLE_SOFT_SCALE:
		if (d->mode == MOE_MODE_SOFT && !d->soft_gamma)
			R = 1, C = 1;
		break;
	case MOE_ROLE_SOFT_GAMMA:
		if (d->mode == MOE_MODE_SOFT && d->soft_gamma)
			R = 1, C = H;
		break;
	case MOE_ROLE_PK_QUERY:
		if (d->mode == MOE_MODE_PRODUCT_KEY)
			R = (uint64_t)d->pk_heads * d->pk_query_dim, C = H;
		break;
	case MOE_ROLE_PK_QUERY_BIAS:
		if (d->mode == MOE_MODE_PRODUCT_KEY)
			R = 1, C = (uint64_t)d->pk_heads * d->pk_query_dim;
		break;
	case MOE_ROLE_PK_KEYS:
		if (d->mode == MOE_MODE_PRODUCT_KEY)
			R = 2ull * d->pk_sub_keys * (d->pk_keys_per_head ? d->pk_heads : 1),
			C = d->pk_query_dim / 2;
		break;
	case MOE_ROLE_NEURON_U:
	case MOE_ROLE_NEURON_V:
		if (neuron)
			R = E, C = H;
		break;
	case MOE_ROLE_OUTPUT_BIAS:
		if (d->output_bias)
			R = 1, C = H;
		break;
	case MOE_ROLE_PK_BN_WEIGHT:
	case MOE_ROLE_PK_BN_BIAS:
	case MOE_ROLE_PK_BN_MEAN:
	case MOE_ROLE_PK_BN_VAR:
		if (d->mode == MOE_MODE_PRODUCT_KEY && d->pk_query_bn)
			R = 1, C = (uint64_t)d->pk_heads * d->pk_query_dim;
		break;
	default: /* fused on-disk roles have no canonical tensor */
		break;
	}
	if (rows)
		*rows = R;
	if (cols)
		*cols = C;
	if (per_expert)
		*per_expert = pe;
	return R != 0;
}

struct out {
	char *buf;
	size_t cap, len;
};

__attribute__((format(printf, 2, 3))) static void put(struct out *o, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	size_t room = o->len < o->cap ? o->cap - o->len : 0;
	int n = vsnprintf(room ? o->buf + o->len : NULL, room, fmt, ap);
	va_end(ap);
	if (n > 0)
		o->len += (size_t)n;
}

/* The fewest significant digits that read back (strtof) as the same float,
 * so the dump is exact and still reads "1.25", not "1.25000000". */
struct fstr {
	char s[32];
};

static struct fstr fl(float v)
{
	struct fstr f;
	snprintf(f.s, sizeof f.s, "%g", (double)v);
	for (int p = 1; p <= 9 && isfinite(v); p++) {
		snprintf(f.s, sizeof f.s, "%.*g", p, (double)v);
		if (strtof(f.s, NULL) == v)
			break;
	}
	return f;
}

/* The decimal a description float was written as, m * 10^e with m an integer
 * (0.3f -> 3 * 10^-1): the shortest digits of fl() read back exactly. */
static void decimal_parts(float v, uint64_t *m, int *e)
{
	char buf[48], *dot, *exp;
	snprintf(buf, sizeof buf, "%.8e", (double)v);
	for (int p = 0; p <= 8; p++) {
		snprintf(buf, sizeof buf, "%.*e", p, (double)v);
		if (strtof(buf, NULL) == v)
			break;
	}
	/* buf is "d[.ddd]e[+-]xx" */
	exp = strchr(buf, 'e');
	*e = (int)strtol(exp + 1, NULL, 10);
	*exp = 0;
	uint64_t r = (uint64_t)(buf[0] - '0');
	dot = strchr(buf, '.');
	for (char *c = dot ? dot + 1 : exp; dot && *c; c++, (*e)--)
		r = r * 10 + (uint64_t)(*c - '0');
	while (r && r % 10 == 0)
		r /= 10, (*e)++;
	*m = r;
}

__extension__ typedef unsigned __int128 moe_u128;

uint64_t moe_desc_scaled_count(float v, uint64_t num, uint64_t den, int round_down)
{
	if (!(v > 0.0f) || !isfinite(v) || !num || !den)
		return 0;
	uint64_t m;
	int e;
	decimal_parts(v, &m, &e);
	/* num * m / den * 10^e kept as a quotient a and a remainder r over q; m < 10^9 */
	moe_u128 n = (moe_u128)num * m, q = den, a = n / q, r = n % q;
	for (; e > 0; e--) { /* times 10 */
		a = a * 10 + r * 10 / q, r = r * 10 % q;
		if (a > UINT64_MAX)
			return UINT64_MAX;
	}
	for (; e < 0; e++) { /* over 10 */
		if (!a)
			return round_down ? 0 : 1; /* 0 < value < 1, and it only shrinks */
		r = a % 10 * q + r, a /= 10, q *= 10;
	}
	a += !round_down && r != 0;
	return a > UINT64_MAX ? UINT64_MAX : (uint64_t)a;
}

size_t moe_desc_dump(const struct moe_desc *d, char *buf, size_t cap)
{
	struct out o = {buf, cap, 0};
	if (cap)
		buf[0] = 0;
	put(&o, "name %s\n", d->name);
	put(&o, "hidden %u\nlayers %u\nmoe_layers", d->hidden, d->n_layers);
	for (uint32_t i = 0; i < d->n_moe_layers; i++)
		put(&o, " %u", d->moe_layers[i]);
	put(&o, "\n");
	if (d->dense_intermediate)
		put(&o, "dense_ffn %s %s %u\n", moe_kind_names[d->dense_kind],
		    moe_act_names[d->dense_act], d->dense_intermediate);
	put(&o, "vocab %u tied %u\n", d->vocab, d->tied_embeddings);
	put(&o, "attention %s heads %u kv_heads %u head_dim %u", moe_attn_names[d->attn],
	    d->attn_heads, d->attn_kv_heads, d->attn_head_dim);
	if (d->attn == MOE_ATTN_MLA)
		put(&o, " q_lora %u kv_lora %u nope %u rope %u v %u", d->mla_q_lora_rank,
		    d->mla_kv_lora_rank, d->mla_qk_nope_dim, d->mla_qk_rope_dim, d->mla_v_dim);
	put(&o, " qkv_bias %u out_bias %u sinks %u output_gate %u qk_norm %s norm_bias %u\n",
	    d->attn_qkv_bias, d->attn_out_bias, d->attn_sinks, d->attn_output_gate,
	    moe_qk_norm_names[d->attn_qk_norm], d->norm_bias);
	if (d->linear_attn != MOE_LINEAR_ATTN_NONE)
		put(&o,
		    "linear_attention %s layers %u key_heads %u key_dim %u value_heads %u "
		    "value_dim %u conv %u\n",
		    moe_linear_attn_names[d->linear_attn], d->n_linear_layers, d->lin_key_heads,
		    d->lin_key_dim, d->lin_value_heads, d->lin_value_dim, d->lin_conv);
	put(&o, "dtype weights %s activations %s compute %s router f32\n",
	    moe_dtype_names[d->weight_dtype], moe_dtype_names[d->act_dtype],
	    moe_compute_names[d->compute]);
	put(&o, "router %s score %s top_k %u\n", moe_mode_names[d->mode], moe_score_names[d->score],
	    d->top_k);
	put(&o, "normalize %s eps %s min %s p %s scale %s\n", moe_norm_names[d->norm],
	    fl(d->norm_eps).s, fl(d->norm_min).s, fl(d->norm_p).s, fl(d->scale).s);
	put(&o, "router_bias %u select_bias %u apply_to %s\n", d->router_bias, d->select_bias,
	    moe_apply_names[d->apply_to]);
	put(&o, "groups %u top %u score %s\n", d->n_groups, d->group_top,
	    moe_group_score_names[d->group_score]);
	put(&o, "capacity %s factor %s per_expert %u priority %s overflow %s\n",
	    moe_capacity_names[d->capacity], fl(d->capacity_factor).s, d->capacity_per_expert,
	    moe_priority_names[d->priority], moe_overflow_names[d->overflow]);
	if (d->capacity_token_fraction != 0 || d->capacity_min || d->capacity_floor ||
	    d->capacity_norm_after_drop)
		put(&o, "capacity token_fraction %s min %u rounding %s normalize_after_drop %u\n",
		    fl(d->capacity_token_fraction).s, d->capacity_min,
		    d->capacity_floor ? "floor" : "ceil", d->capacity_norm_after_drop);
	if (d->output_bias)
		put(&o, "output_bias 1\n");
	put(&o, "noise %s jitter_eps %s\n", moe_noise_names[d->noise], fl(d->jitter_eps).s);
	if (d->noise == MOE_NOISE_LEARNED_GAUSSIAN)
		put(&o, "noise_std eps %s\n", fl(d->noise_eps).s);
	if (d->importance_sparse)
		put(&o, "importance sparse\n");
	if (d->mode == MOE_MODE_HIERARCHICAL)
		for (uint32_t i = 0; i < d->n_levels; i++)
			put(&o, "level %u groups %u top_k %u\n", i, d->levels[i].groups,
			    d->levels[i].top_k);
	if (d->mode == MOE_MODE_EXPERT_CHOICE)
		put(&o, "expert_choice capacity_factor %s\n", fl(d->ec_capacity_factor).s);
	if (d->mode == MOE_MODE_SOFT)
		put(&o, "soft slots_per_expert %u\n", d->soft_slots_per_expert);
	if (d->mode == MOE_MODE_SOFT && d->soft_group)
		put(&o, "soft_group %u\n", d->soft_group);
	if (d->mode == MOE_MODE_SOFT && d->soft_gamma)
		put(&o, "soft_scale channel\n");
	if (d->mode == MOE_MODE_SPARSEMIXER)
		put(&o, "sparsemixer eps %s\n", fl(d->sparsemixer_eps).s);
	if (d->mode == MOE_MODE_TOP_P)
		put(&o, "top_p %s\n", fl(d->top_p).s);
	if (d->mode == MOE_MODE_PRODUCT_KEY)
		put(&o,
		    "product_key sub_keys %u heads %u top_k %u query_dim %u score %s query_bn %u\n",
		    d->pk_sub_keys, d->pk_heads, d->pk_top_k, d->pk_query_dim,
		    moe_score_names[d->pk_score], d->pk_query_bn);
	if (d->mode == MOE_MODE_PRODUCT_KEY && d->pk_query_bn)
		put(&o, "product_key_bn eps %s\n", fl(d->pk_bn_eps).s);
	if (d->mode == MOE_MODE_PRODUCT_KEY &&
	    (d->pk_keys_per_head || d->pk_score_relu || d->pk_sub_top_k))
		put(&o, "product_key_variant keys_per_head %u relu %u sub_top_k %u\n",
		    d->pk_keys_per_head, d->pk_score_relu, d->pk_sub_top_k);
	put(&o, "experts %s count %u intermediate %u activation %s", moe_kind_names[d->kind],
	    d->n_experts, d->intermediate, moe_act_names[d->act]);
	if (d->act == MOE_ACT_SWIGLU_OAI)
		put(&o, " alpha %s limit %s", fl(d->act_alpha).s, fl(d->act_limit).s);
	put(&o, " bias %u split %u\n", d->expert_bias, d->split);
	if (d->shared_count)
		put(&o, "shared %s count %u intermediate %u activation %s gate %s\n",
		    moe_kind_names[d->shared_kind], d->shared_count, d->shared_intermediate,
		    moe_act_names[d->shared_act], moe_shared_gate_names[d->shared_gate]);
	for (int i = 0; i < MOE_QMAT_COUNT; i++)
		if (d->qfmt[i].kind != MOE_QFORMAT_NONE)
			put(&o, "quant %s kind %s group %u zero %u\n", moe_qmat_names[i],
			    moe_qformat_names[d->qfmt[i].kind], d->qfmt[i].group, d->qfmt[i].zero);
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		if (!d->names[r][0])
			continue;
		const struct moe_layout *l = &d->layouts[r];
		put(&o, "weight %s %s orient %s", moe_role_names[r], d->names[r],
		    moe_orient_names[l->orient]);
		if (l->fuse != MOE_FUSE_NONE)
			put(&o, " fuse %s", moe_fuse_names[l->fuse]);
		if (l->row_blocked)
			put(&o, " row_blocked");
		if (l->quant != MOE_QUANT_NONE)
			put(&o, " quant %s block %ux%u scales %s", moe_quant_names[l->quant],
			    l->quant_block[0], l->quant_block[1], d->scale_names[r]);
		put(&o, "\n");
	}
	return o.len;
}

/* moe_desc_parse: one line of the dump is "head [value] (key value)*", except
 * name (the rest of the line), moe_layers (a list), dense_ffn (three values)
 * and weight (role, name, then keys and the flag row_blocked). Every token
 * must be consumed: an unknown key is an error, not skipped. */
#define LINE_TOKENS 64

struct line {
	char *tok[LINE_TOKENS];
	int n, first_pair; /* pairs start at tok[first_pair] */
	uint8_t used[LINE_TOKENS];
	int lineno, bad;
	char *err;
	size_t cap;
};

__attribute__((format(printf, 2, 3))) static void line_error(struct line *l, const char *fmt, ...)
{
	if (l->bad++)
		return;
	int n = l->err && l->cap ? snprintf(l->err, l->cap, "line %d: ", l->lineno) : 0;
	va_list ap;
	va_start(ap, fmt);
	if (n >= 0 && (size_t)n < l->cap)
		vsnprintf(l->err + n, l->cap - (size_t)n, fmt, ap);
	va_end(ap);
}

/* The value of `key` in the line's pairs, or the head value when key is NULL;
 * NULL (and an error unless optional) when absent. */
static const char *field(struct line *l, const char *key, int optional)
{
	if (!key) {
		if (l->first_pair == 2) {
			l->used[1] = 1;
			return l->tok[1];
		}
	} else {
		for (int i = l->first_pair; i + 1 < l->n; i += 2)
			if (!l->used[i] && strcmp(l->tok[i], key) == 0) {
				l->used[i] = l->used[i + 1] = 1;
				return l->tok[i + 1];
			}
	}
	if (!optional)
		line_error(l, "'%s' lacks %s", l->tok[0], key ? key : "its value");
	return NULL;
}

/* Whether the line has an unread `key` (an optional field). */
static int has(const struct line *l, const char *key)
{
	for (int i = l->first_pair; i + 1 < l->n; i += 2)
		if (!l->used[i] && strcmp(l->tok[i], key) == 0)
			return 1;
	return 0;
}

static void to_u32(struct line *l, const char *s, uint32_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (*s < '0' || *s > '9' || *end || errno || v > UINT32_MAX)
		line_error(l, "'%s' is not a 32-bit unsigned number", s);
	else
		*out = (uint32_t)v;
}

static void take_u32(struct line *l, const char *key, int optional, uint32_t *out)
{
	const char *s = field(l, key, optional);
	if (s)
		to_u32(l, s, out);
}

static void take_u8(struct line *l, const char *key, uint8_t *out)
{
	uint32_t v = 0;
	take_u32(l, key, 0, &v);
	if (v > UINT8_MAX)
		line_error(l, "%s %u is out of range", key ? key : l->tok[0], v);
	*out = (uint8_t)v;
}

static void take_f32(struct line *l, const char *key, float *out)
{
	const char *s = field(l, key, 0);
	if (!s)
		return;
	char *end;
	float v = strtof(s, &end);
	if (end == s || *end)
		line_error(l, "'%s' is not a number", s);
	else
		*out = v;
}

static int take_enum(struct line *l, const char *key, const char *const *names, int n)
{
	const char *s = field(l, key, 0);
	if (!s)
		return 0;
	int v = moe_enum_lookup(names, n, s);
	if (v < 0) {
		line_error(l, "unknown %s '%s'", key ? key : l->tok[0], s);
		return 0;
	}
	return v;
}

#define ENUM_(key, table, count) take_enum(l, key, table, count)

static void parse_weight(struct line *l, struct moe_desc *d)
{
	if (l->n < 3) {
		line_error(l, "'weight' needs a role and a name");
		return;
	}
	int r = moe_enum_lookup(moe_role_names, MOE_ROLE_COUNT, l->tok[1]);
	if (r < 0) {
		line_error(l, "unknown weight role '%s'", l->tok[1]);
		return;
	}
	if (strlen(l->tok[2]) >= MOE_NAME_MAX) {
		line_error(l, "the %s name is too long", l->tok[1]);
		return;
	}
	l->used[1] = l->used[2] = 1;
	strcpy(d->names[r], l->tok[2]);
	/* the flag shifts the pairs after it: take it out first */
	int w = 3;
	for (int i = 3; i < l->n; i++)
		if (strcmp(l->tok[i], "row_blocked") == 0)
			d->layouts[r].row_blocked = 1;
		else
			l->tok[w++] = l->tok[i];
	l->n = w;
	l->first_pair = 3;
	struct moe_layout *lo = &d->layouts[r];
	lo->orient = (enum moe_orient)ENUM_("orient", moe_orient_names, MOE_ORIENT_COUNT);
	if (has(l, "fuse"))
		lo->fuse = (enum moe_fuse)ENUM_("fuse", moe_fuse_names, MOE_FUSE_COUNT);
	if (has(l, "quant")) {
		lo->quant = (enum moe_quant)ENUM_("quant", moe_quant_names, MOE_QUANT_COUNT);
		const char *b = field(l, "block", 0);
		unsigned b0, b1;
		char tail;
		if (b && sscanf(b, "%ux%u%c", &b0, &b1, &tail) != 2)
			line_error(l, "block '%s' is not RxC", b);
		else if (b) {
			lo->quant_block[0] = b0;
			lo->quant_block[1] = b1;
		}
		const char *sc = field(l, "scales", 0);
		if (sc && strlen(sc) >= MOE_NAME_MAX)
			line_error(l, "the %s scales name is too long", l->tok[1]);
		else if (sc)
			strcpy(d->scale_names[r], sc);
	}
}

static void parse_line(struct line *l, struct moe_desc *d)
{
	const char *h = l->tok[0];
	if (!strcmp(h, "moe_layers")) {
		for (int i = 1; i < l->n; i++) {
			if (d->n_moe_layers == MOE_MAX_LAYERS) {
				line_error(l, "more than %d MoE layers", MOE_MAX_LAYERS);
				return;
			}
			to_u32(l, l->tok[i], &d->moe_layers[d->n_moe_layers++]);
			l->used[i] = 1;
		}
	} else if (!strcmp(h, "dense_ffn")) {
		if (l->n != 4) {
			line_error(l, "'dense_ffn' needs a kind, an activation and a width");
			return;
		}
		int k = moe_enum_lookup(moe_kind_names, MOE_KIND_COUNT, l->tok[1]);
		int a = moe_enum_lookup(moe_act_names, MOE_ACT_COUNT, l->tok[2]);
		if (k < 0 || a < 0)
			line_error(l, "unknown dense kind '%s' or activation '%s'", l->tok[1],
				   l->tok[2]);
		d->dense_kind = (enum moe_kind)(k < 0 ? 0 : k);
		d->dense_act = (enum moe_act)(a < 0 ? 0 : a);
		to_u32(l, l->tok[3], &d->dense_intermediate);
		l->used[1] = l->used[2] = l->used[3] = 1;
	} else if (!strcmp(h, "weight")) {
		parse_weight(l, d);
	} else if (!strcmp(h, "hidden")) {
		take_u32(l, NULL, 0, &d->hidden);
	} else if (!strcmp(h, "layers")) {
		take_u32(l, NULL, 0, &d->n_layers);
	} else if (!strcmp(h, "vocab")) {
		take_u32(l, NULL, 0, &d->vocab);
		take_u8(l, "tied", &d->tied_embeddings);
	} else if (!strcmp(h, "attention")) {
		d->attn = (enum moe_attn)ENUM_(NULL, moe_attn_names, MOE_ATTN_COUNT);
		take_u32(l, "heads", 0, &d->attn_heads);
		take_u32(l, "kv_heads", 0, &d->attn_kv_heads);
		take_u32(l, "head_dim", 0, &d->attn_head_dim);
		int mla = d->attn == MOE_ATTN_MLA;
		take_u32(l, "q_lora", !mla, &d->mla_q_lora_rank);
		take_u32(l, "kv_lora", !mla, &d->mla_kv_lora_rank);
		take_u32(l, "nope", !mla, &d->mla_qk_nope_dim);
		take_u32(l, "rope", !mla, &d->mla_qk_rope_dim);
		take_u32(l, "v", !mla, &d->mla_v_dim);
		take_u8(l, "qkv_bias", &d->attn_qkv_bias);
		take_u8(l, "out_bias", &d->attn_out_bias);
		take_u8(l, "sinks", &d->attn_sinks);
		take_u8(l, "output_gate", &d->attn_output_gate);
		d->attn_qk_norm =
		    (enum moe_qk_norm)ENUM_("qk_norm", moe_qk_norm_names, MOE_QK_NORM_COUNT);
		take_u8(l, "norm_bias", &d->norm_bias);
	} else if (!strcmp(h, "linear_attention")) {
		d->linear_attn =
		    (enum moe_linear_attn)ENUM_(NULL, moe_linear_attn_names, MOE_LINEAR_ATTN_COUNT);
		take_u32(l, "layers", 0, &d->n_linear_layers);
		take_u32(l, "key_heads", 0, &d->lin_key_heads);
		take_u32(l, "key_dim", 0, &d->lin_key_dim);
		take_u32(l, "value_heads", 0, &d->lin_value_heads);
		take_u32(l, "value_dim", 0, &d->lin_value_dim);
		take_u32(l, "conv", 0, &d->lin_conv);
	} else if (!strcmp(h, "dtype")) {
		d->weight_dtype =
		    (enum moe_dtype)ENUM_("weights", moe_dtype_names, MOE_DTYPE_COUNT);
		d->act_dtype =
		    (enum moe_dtype)ENUM_("activations", moe_dtype_names, MOE_DTYPE_COUNT);
		d->compute =
		    (enum moe_compute)ENUM_("compute", moe_compute_names, MOE_COMPUTE_COUNT);
		const char *r = field(l, "router", 0);
		if (r && strcmp(r, "f32") != 0)
			line_error(l, "router dtype '%s' is not f32", r);
	} else if (!strcmp(h, "router")) {
		d->mode = (enum moe_mode)ENUM_(NULL, moe_mode_names, MOE_MODE_COUNT);
		d->score = (enum moe_score)ENUM_("score", moe_score_names, MOE_SCORE_COUNT);
		take_u32(l, "top_k", 0, &d->top_k);
	} else if (!strcmp(h, "normalize")) {
		d->norm = (enum moe_norm)ENUM_(NULL, moe_norm_names, MOE_NORM_COUNT);
		take_f32(l, "eps", &d->norm_eps);
		take_f32(l, "min", &d->norm_min);
		take_f32(l, "p", &d->norm_p);
		take_f32(l, "scale", &d->scale);
	} else if (!strcmp(h, "router_bias")) {
		take_u8(l, NULL, &d->router_bias);
		take_u8(l, "select_bias", &d->select_bias);
		d->apply_to = (enum moe_apply)ENUM_("apply_to", moe_apply_names, MOE_APPLY_COUNT);
	} else if (!strcmp(h, "groups")) {
		take_u32(l, NULL, 0, &d->n_groups);
		take_u32(l, "top", 0, &d->group_top);
		d->group_score = (enum moe_group_score)ENUM_("score", moe_group_score_names,
							     MOE_GROUP_SCORE_COUNT);
	} else if (!strcmp(h, "capacity") && l->first_pair == 2) {
		d->capacity =
		    (enum moe_capacity)ENUM_(NULL, moe_capacity_names, MOE_CAPACITY_COUNT);
		take_f32(l, "factor", &d->capacity_factor);
		take_u32(l, "per_expert", 0, &d->capacity_per_expert);
		d->priority =
		    (enum moe_priority)ENUM_("priority", moe_priority_names, MOE_PRIORITY_COUNT);
		d->overflow =
		    (enum moe_overflow)ENUM_("overflow", moe_overflow_names, MOE_OVERFLOW_COUNT);
	} else if (!strcmp(h, "capacity")) {
		take_f32(l, "token_fraction", &d->capacity_token_fraction);
		take_u32(l, "min", 0, &d->capacity_min);
		static const char *const rounding[] = {"ceil", "floor"};
		d->capacity_floor = (uint8_t)ENUM_("rounding", rounding, 2);
		take_u8(l, "normalize_after_drop", &d->capacity_norm_after_drop);
	} else if (!strcmp(h, "output_bias")) {
		take_u8(l, NULL, &d->output_bias);
	} else if (!strcmp(h, "noise")) {
		d->noise = (enum moe_noise)ENUM_(NULL, moe_noise_names, MOE_NOISE_COUNT);
		take_f32(l, "jitter_eps", &d->jitter_eps);
	} else if (!strcmp(h, "noise_std")) {
		take_f32(l, "eps", &d->noise_eps);
	} else if (!strcmp(h, "importance")) {
		static const char *const imp[] = {"dense", "sparse"};
		d->importance_sparse = (uint8_t)ENUM_(NULL, imp, 2);
	} else if (!strcmp(h, "soft_scale")) {
		static const char *const sc[] = {"scalar", "channel"};
		d->soft_gamma = (uint8_t)ENUM_(NULL, sc, 2);
	} else if (!strcmp(h, "level")) {
		uint32_t i = MOE_MAX_LEVELS;
		take_u32(l, NULL, 0, &i);
		if (i != d->n_levels || i >= MOE_MAX_LEVELS) {
			line_error(l, "level %u out of order or beyond %d", i, MOE_MAX_LEVELS);
			return;
		}
		take_u32(l, "groups", 0, &d->levels[i].groups);
		take_u32(l, "top_k", 0, &d->levels[i].top_k);
		d->n_levels++;
	} else if (!strcmp(h, "expert_choice")) {
		take_f32(l, "capacity_factor", &d->ec_capacity_factor);
	} else if (!strcmp(h, "soft")) {
		take_u32(l, "slots_per_expert", 0, &d->soft_slots_per_expert);
	} else if (!strcmp(h, "soft_group")) {
		take_u32(l, NULL, 0, &d->soft_group);
	} else if (!strcmp(h, "sparsemixer")) {
		take_f32(l, "eps", &d->sparsemixer_eps);
	} else if (!strcmp(h, "top_p")) {
		take_f32(l, NULL, &d->top_p);
	} else if (!strcmp(h, "product_key")) {
		take_u32(l, "sub_keys", 0, &d->pk_sub_keys);
		take_u32(l, "heads", 0, &d->pk_heads);
		take_u32(l, "top_k", 0, &d->pk_top_k);
		take_u32(l, "query_dim", 0, &d->pk_query_dim);
		d->pk_score = (enum moe_score)ENUM_("score", moe_score_names, MOE_SCORE_COUNT);
		take_u8(l, "query_bn", &d->pk_query_bn);
	} else if (!strcmp(h, "product_key_variant")) {
		take_u8(l, "keys_per_head", &d->pk_keys_per_head);
		take_u8(l, "relu", &d->pk_score_relu);
		take_u32(l, "sub_top_k", 0, &d->pk_sub_top_k);
	} else if (!strcmp(h, "product_key_bn")) {
		take_f32(l, "eps", &d->pk_bn_eps);
	} else if (!strcmp(h, "experts")) {
		d->kind = (enum moe_kind)ENUM_(NULL, moe_kind_names, MOE_KIND_COUNT);
		take_u32(l, "count", 0, &d->n_experts);
		take_u32(l, "intermediate", 0, &d->intermediate);
		d->act = (enum moe_act)ENUM_("activation", moe_act_names, MOE_ACT_COUNT);
		if (d->act == MOE_ACT_SWIGLU_OAI) {
			take_f32(l, "alpha", &d->act_alpha);
			take_f32(l, "limit", &d->act_limit);
		}
		take_u8(l, "bias", &d->expert_bias);
		take_u32(l, "split", 0, &d->split);
	} else if (!strcmp(h, "shared")) {
		d->shared_kind = (enum moe_kind)ENUM_(NULL, moe_kind_names, MOE_KIND_COUNT);
		take_u32(l, "count", 0, &d->shared_count);
		take_u32(l, "intermediate", 0, &d->shared_intermediate);
		d->shared_act = (enum moe_act)ENUM_("activation", moe_act_names, MOE_ACT_COUNT);
		d->shared_gate = (enum moe_shared_gate)ENUM_("gate", moe_shared_gate_names,
							     MOE_SHARED_GATE_COUNT);
	} else if (!strcmp(h, "quant")) {
		int q = ENUM_(NULL, moe_qmat_names, MOE_QMAT_COUNT);
		struct moe_qfmt *f = &d->qfmt[q < 0 ? 0 : q];
		f->kind = (enum moe_qformat)ENUM_("kind", moe_qformat_names, MOE_QFORMAT_COUNT);
		take_u32(l, "group", 0, &f->group);
		take_u8(l, "zero", &f->zero);
	} else {
		line_error(l, "unknown line '%s'", h);
		return;
	}
	for (int i = 1; i < l->n; i++)
		if (!l->used[i]) {
			line_error(l, "unexpected '%s' in '%s'", l->tok[i], h);
			return;
		}
}

int moe_desc_parse(const char *text, struct moe_desc *d, char *err, size_t cap)
{
	memset(d, 0, sizeof *d);
	d->version = MOE_DESC_VERSION;
	if (err && cap)
		err[0] = 0;
	char *copy = strdup(text ? text : "");
	if (!copy) {
		if (err && cap)
			snprintf(err, cap, "out of memory");
		return -1;
	}
	int bad = 0, lineno = 0, have_name = 0;
	for (char *s = copy, *next; s && *s && !bad; s = next) {
		next = strchr(s, '\n');
		if (next)
			*next++ = 0;
		lineno++;
		if (!*s)
			continue;
		struct line l = {.lineno = lineno, .err = err, .cap = cap};
		if (strncmp(s, "name ", 5) == 0) {
			if (strlen(s + 5) >= MOE_NAME_MAX) {
				line_error(&l, "the name is too long");
			} else {
				strcpy(d->name, s + 5);
				have_name = 1;
			}
			bad = l.bad;
			continue;
		}
		char *save = NULL;
		for (char *t = strtok_r(s, " ", &save); t; t = strtok_r(NULL, " ", &save)) {
			if (l.n == LINE_TOKENS) {
				line_error(&l, "too many fields");
				break;
			}
			l.tok[l.n++] = t;
		}
		l.first_pair = l.n % 2 == 0 ? 2 : 1; /* head value, then pairs */
		if (!l.bad && l.n)
			parse_line(&l, d);
		bad = l.bad;
	}
	free(copy);
	if (!bad && !have_name) {
		if (err && cap)
			snprintf(err, cap, "no 'name' line: not a model description");
		bad = 1;
	}
	return bad ? -1 : 0;
}
