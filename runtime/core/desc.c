/* desc.c: name tables, derived sizes and the text dump of struct moe_desc.
 * Linked into both moegen and every model.so. */
#include "moe_desc.h"
#include "moe_ops.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define NAME_(v, s) s,
const char *const moe_dtype_names[] = {MOE_DTYPES(NAME_)};
const char *const moe_mode_names[] = {
#define MOE_MODE(v, s, targets, family, pack) s,
#include "moe_modes.def"
#undef MOE_MODE
};
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
const char *const moe_fuse_names[] = {MOE_FUSES(NAME_)};
const char *const moe_orient_names[] = {MOE_ORIENTS(NAME_)};
const char *const moe_quant_names[] = {MOE_QUANTS(NAME_)};
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
		if (d->mode == MOE_MODE_SOFT)
			R = 1, C = 1;
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
			R = 2ull * d->pk_sub_keys, C = d->pk_query_dim / 2;
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
	put(&o, "\n");
	put(&o, "dtype weights %s activations %s router f32\n", moe_dtype_names[d->weight_dtype],
	    moe_dtype_names[d->act_dtype]);
	put(&o, "router %s score %s top_k %u\n", moe_mode_names[d->mode], moe_score_names[d->score],
	    d->top_k);
	put(&o, "normalize %s eps %g min %g p %g scale %g\n", moe_norm_names[d->norm],
	    (double)d->norm_eps, (double)d->norm_min, (double)d->norm_p, (double)d->scale);
	put(&o, "router_bias %u select_bias %u apply_to %s\n", d->router_bias, d->select_bias,
	    moe_apply_names[d->apply_to]);
	put(&o, "groups %u top %u score %s\n", d->n_groups, d->group_top,
	    moe_group_score_names[d->group_score]);
	put(&o, "capacity %s factor %g per_expert %u priority %s overflow %s\n",
	    moe_capacity_names[d->capacity], (double)d->capacity_factor, d->capacity_per_expert,
	    moe_priority_names[d->priority], moe_overflow_names[d->overflow]);
	if (d->capacity_token_fraction != 0 || d->capacity_min || d->capacity_floor ||
	    d->capacity_norm_after_drop)
		put(&o, "capacity token_fraction %g min %u rounding %s normalize_after_drop %u\n",
		    (double)d->capacity_token_fraction, d->capacity_min,
		    d->capacity_floor ? "floor" : "ceil", d->capacity_norm_after_drop);
	if (d->output_bias)
		put(&o, "output_bias 1\n");
	put(&o, "noise %s jitter_eps %g\n", moe_noise_names[d->noise], (double)d->jitter_eps);
	if (d->mode == MOE_MODE_HIERARCHICAL)
		for (uint32_t i = 0; i < d->n_levels; i++)
			put(&o, "level %u groups %u top_k %u\n", i, d->levels[i].groups,
			    d->levels[i].top_k);
	if (d->mode == MOE_MODE_EXPERT_CHOICE)
		put(&o, "expert_choice capacity_factor %g\n", (double)d->ec_capacity_factor);
	if (d->mode == MOE_MODE_SOFT)
		put(&o, "soft slots_per_expert %u\n", d->soft_slots_per_expert);
	if (d->mode == MOE_MODE_SPARSEMIXER)
		put(&o, "sparsemixer eps %g\n", (double)d->sparsemixer_eps);
	if (d->mode == MOE_MODE_TOP_P)
		put(&o, "top_p %.9g\n", (double)d->top_p);
	if (d->mode == MOE_MODE_PRODUCT_KEY)
		put(&o,
		    "product_key sub_keys %u heads %u top_k %u query_dim %u score %s query_bn %u\n",
		    d->pk_sub_keys, d->pk_heads, d->pk_top_k, d->pk_query_dim,
		    moe_score_names[d->pk_score], d->pk_query_bn);
	put(&o, "experts %s count %u intermediate %u activation %s", moe_kind_names[d->kind],
	    d->n_experts, d->intermediate, moe_act_names[d->act]);
	if (d->act == MOE_ACT_SWIGLU_OAI)
		put(&o, " alpha %g limit %g", (double)d->act_alpha, (double)d->act_limit);
	put(&o, " bias %u split %u\n", d->expert_bias, d->split);
	if (d->shared_count)
		put(&o, "shared %s count %u intermediate %u activation %s gate %s\n",
		    moe_kind_names[d->shared_kind], d->shared_count, d->shared_intermediate,
		    moe_act_names[d->shared_act], moe_shared_gate_names[d->shared_gate]);
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
