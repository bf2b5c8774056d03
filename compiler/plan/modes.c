/* modes.c: the mode table. Each row of moe_modes.def names the targets that
 * generate the mode, its checker and its op list; this is the one place that
 * answers "does target X generate this spec", and every refusal message of
 * the back half comes from here. The front end (spec_check.c) has already
 * validated the description against the spec's rules: what is checked here
 * is what a backend generates, not whether the spec is well formed. */
#include "backend.h"

#include <math.h>
#include <string.h>

#define MOE_TARGETS_CPU (1u << MOE_TARGET_CPU)
#define MOE_TARGETS_CPU_CUDA ((1u << MOE_TARGET_CPU) | (1u << MOE_TARGET_CUDA))

/* A feature the target does not generate. */
#define REFUSE(...)                                                                                \
	do {                                                                                       \
		moe_diag_error(diag, __VA_ARGS__);                                                 \
		bad = 1;                                                                           \
	} while (0)

static int has_shared(const struct moe_desc *d)
{
	return moe_desc_shared_width(d) != 0;
}

/* What every mode shares: expert kinds, activations, sizes. */
static int check_common(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	int bad = 0;
	const char *tn = moe_target_names[t];
	if (d->kind == MOE_KIND_SINGLE_NEURON && d->mode != MOE_MODE_PRODUCT_KEY)
		REFUSE("experts.kind single_neuron is not generated for target %s yet", tn);
	if (has_shared(d) && d->shared_kind == MOE_KIND_SINGLE_NEURON)
		REFUSE("shared_experts.kind single_neuron is not generated for target %s yet", tn);
	if (d->act == MOE_ACT_SWIGLU_OAI && d->kind != MOE_KIND_GLU)
		REFUSE("experts.activation swiglu_oai needs glu experts");
	if (has_shared(d) && d->shared_act == MOE_ACT_SWIGLU_OAI && d->shared_kind != MOE_KIND_GLU)
		REFUSE("shared_experts.activation swiglu_oai needs glu experts");
	if (d->hidden == 0 || d->n_experts == 0 || d->intermediate == 0)
		REFUSE("invalid model description (hidden %u, experts %u, intermediate %u)",
		       d->hidden, d->n_experts, d->intermediate);
	for (int m = 0; m < MOE_QMAT_COUNT; m++)
		if (t == MOE_TARGET_CUDA && d->qfmt[m].kind != MOE_QFORMAT_NONE)
			REFUSE("quant.%s %s (experts kept quantized) is not generated for target "
			       "cuda yet; the cpu target generates it",
			       moe_qmat_names[m], moe_qformat_names[d->qfmt[m].kind]);
	if (d->noise == MOE_NOISE_LEARNED_GAUSSIAN &&
	    !(isfinite(d->noise_eps) && d->noise_eps >= 0.0f))
		REFUSE("invalid learned_gaussian noise_epsilon %g", (double)d->noise_eps);
	if (t == MOE_TARGET_CUDA) {
		if (d->act_dtype != MOE_DTYPE_F32 && d->act_dtype != MOE_DTYPE_BF16)
			REFUSE("dtype.activations %s is not generated for target cuda (f32, bf16)",
			       moe_dtype_names[d->act_dtype]);
		if (d->n_experts > INT32_MAX / 2 || d->hidden > INT32_MAX / 2 ||
		    d->intermediate > INT32_MAX / 4 || moe_desc_shared_width(d) > INT32_MAX / 4)
			REFUSE("sizes over 2^30 are not generated for target cuda (hidden %u, "
			       "experts %u, intermediate %u)",
			       d->hidden, d->n_experts, d->intermediate);
	}
	return bad;
}

/* Token choice and dense: the plain router, or the research router when the
 * description draws noise. */
static int check_topk(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	int bad = 0;
	const char *tn = moe_target_names[t];
	int tc = d->mode == MOE_MODE_TOKEN_CHOICE;
	if (tc && (d->top_k == 0 || d->top_k > d->n_experts))
		REFUSE("invalid top_k %u for %u experts", d->top_k, d->n_experts);
	if (tc && d->n_groups > 1 &&
	    (d->n_experts % d->n_groups || d->group_top == 0 || d->group_top > d->n_groups ||
	     (uint64_t)d->group_top * (d->n_experts / d->n_groups) < d->top_k))
		REFUSE("invalid router.groups (%u groups, top %u) for %u experts, top_k %u",
		       d->n_groups, d->group_top, d->n_experts, d->top_k);
	if (d->mode == MOE_MODE_DENSE && d->capacity != MOE_CAPACITY_NONE)
		REFUSE("router.capacity with mode dense is not generated for target %s yet", tn);
	if (t == MOE_TARGET_CPU && d->capacity != MOE_CAPACITY_NONE && d->capacity_norm_after_drop)
		REFUSE("router.capacity.normalize_after_drop is not generated for target cpu yet");
	if (t == MOE_TARGET_CPU && d->noise == MOE_NOISE_LEARNED_GAUSSIAN && tc) {
		if (d->n_groups > 1)
			REFUSE("router.groups with learned_gaussian noise is not generated for "
			       "target %s yet",
			       tn);
		if (d->capacity != MOE_CAPACITY_NONE && d->capacity_norm_after_drop)
			REFUSE("capacity normalize_after_drop with learned_gaussian noise is not "
			       "generated for target %s yet",
			       tn);
	}
	if (d->noise == MOE_NOISE_JITTER && !(isfinite(d->jitter_eps) && d->jitter_eps >= 0.0f))
		REFUSE("invalid jitter eps %g", (double)d->jitter_eps);
	return bad;
}

/* Capacity and noise belong to token choice; the other routers refuse them. */
static int check_no_capacity(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	int bad = 0;
	if (d->capacity != MOE_CAPACITY_NONE)
		REFUSE("router.capacity with mode %s is not generated for target %s",
		       moe_mode_names[d->mode], moe_target_names[t]);
	return bad;
}

static int check_top_p(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	int bad = check_no_capacity(d, t, diag);
	if (d->top_k == 0 || d->top_k > d->n_experts || !(d->top_p > 0.0f && d->top_p <= 1.0f) ||
	    d->score != MOE_SCORE_SOFTMAX)
		REFUSE("invalid top_p routing (top_p %g, top_k %u, %u experts, score %s)",
		       (double)d->top_p, d->top_k, d->n_experts, moe_score_names[d->score]);
	if (d->noise == MOE_NOISE_LEARNED_GAUSSIAN || d->n_groups > 1 || d->select_bias)
		REFUSE("top_p routing with learned noise, groups or a selection bias is not "
		       "generated for target %s",
		       moe_target_names[t]);
	return bad;
}

static int check_sparsemixer(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	int bad = check_no_capacity(d, t, diag) | check_topk(d, t, diag);
	if (d->top_k != 2 || d->n_experts < 2 || !(d->sparsemixer_eps >= 0.0f) ||
	    !isfinite(d->sparsemixer_eps))
		REFUSE("invalid sparsemixer (top_k %u, %u experts, eps %g)", d->top_k, d->n_experts,
		       (double)d->sparsemixer_eps);
	return bad;
}

static int check_hierarchical(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	int bad = check_no_capacity(d, t, diag) | check_topk(d, t, diag);
	uint32_t E = d->n_experts, G = d->levels[0].groups, k1 = d->levels[0].top_k;
	uint32_t k2 = d->levels[1].top_k;
	if (d->n_levels != 2 || G == 0 || E % G || k1 == 0 || k1 > G || k2 == 0 || k2 > E / G ||
	    d->top_k != k1 * k2)
		REFUSE("invalid hierarchical levels (%u groups, top_k %u and %u) for %u experts", G,
		       k1, k2, E);
	return bad;
}

static int check_expert_choice(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	int bad = check_no_capacity(d, t, diag);
	if (!(d->ec_capacity_factor > 0.0f) || !isfinite(d->ec_capacity_factor))
		REFUSE("invalid expert_choice capacity_factor %g", (double)d->ec_capacity_factor);
	if (d->n_experts > INT32_MAX)
		REFUSE("expert_choice with %u experts is too large", d->n_experts);
	if (d->noise == MOE_NOISE_LEARNED_GAUSSIAN)
		REFUSE("learned_gaussian noise with mode expert_choice is not generated for target "
		       "%s yet",
		       moe_target_names[t]);
	if (d->noise == MOE_NOISE_JITTER && !(isfinite(d->jitter_eps) && d->jitter_eps >= 0.0f))
		REFUSE("invalid jitter eps %g", (double)d->jitter_eps);
	return bad;
}

static int check_soft(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	int bad = check_no_capacity(d, t, diag);
	const char *tn = moe_target_names[t];
	uint64_t S = (uint64_t)d->n_experts * d->soft_slots_per_expert;
	if (d->soft_slots_per_expert == 0 || S > (1u << 20))
		REFUSE("invalid soft slots_per_expert %u for %u experts", d->soft_slots_per_expert,
		       d->n_experts);
	if (d->hidden > (1u << 20))
		REFUSE("soft with hidden %u is not generated for target %s", d->hidden, tn);
	if (d->noise != MOE_NOISE_NONE)
		REFUSE("router.noise with mode soft is not generated for target %s yet", tn);
	if (has_shared(d) && d->shared_gate == MOE_SHARED_GATE_SIGMOID)
		REFUSE("shared_experts.gate sigmoid with mode soft is not generated for target %s "
		       "yet",
		       tn);
	return bad;
}

static int check_product_key(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	int bad = 0;
	const char *tn = moe_target_names[t];
	uint32_t R = d->pk_sub_keys, k = d->pk_top_k, dq = d->pk_query_dim;
	uint32_t ks = moe_desc_pk_sub_top_k(d);
	uint64_t Q = (uint64_t)d->pk_heads * dq;
	if (d->kind != MOE_KIND_SINGLE_NEURON || R == 0 || d->pk_heads == 0 || dq < 2 || dq % 2 ||
	    k == 0 || ks > R || (uint64_t)k > (uint64_t)ks * ks ||
	    (uint64_t)R * R != d->n_experts ||
	    (d->pk_score != MOE_SCORE_SOFTMAX && d->pk_score != MOE_SCORE_SIGMOID)) {
		REFUSE("invalid product_key (kind %s, sub_keys %u, heads %u, top_k %u, query_dim "
		       "%u, %u experts)",
		       moe_kind_names[d->kind], R, d->pk_heads, k, dq, d->n_experts);
		return bad;
	}
	if (k > MOE_PK_MAX_TOP_K || ks > MOE_PK_MAX_TOP_K || R > MOE_PK_MAX_SUB_KEYS ||
	    Q > MOE_PK_MAX_QUERY || d->hidden > MOE_PK_MAX_HIDDEN)
		REFUSE("product_key with top_k or sub_top_k > %d, sub_keys > %d, heads * query_dim "
		       "> %d or "
		       "hidden > %d is not generated for target %s yet",
		       MOE_PK_MAX_TOP_K, MOE_PK_MAX_SUB_KEYS, MOE_PK_MAX_QUERY, MOE_PK_MAX_HIDDEN,
		       tn);
	if (d->weight_dtype != MOE_DTYPE_F32 && d->weight_dtype != MOE_DTYPE_BF16)
		REFUSE("product_key with %s weights is not generated for target %s yet",
		       moe_dtype_names[d->weight_dtype], tn);
	if (d->act != MOE_ACT_RELU && d->act != MOE_ACT_SILU && d->act != MOE_ACT_GELU &&
	    d->act != MOE_ACT_GELU_TANH)
		REFUSE("product_key with activation %s is not generated for target %s",
		       moe_act_names[d->act], tn);
	if (has_shared(d) || d->output_bias || d->capacity != MOE_CAPACITY_NONE ||
	    d->noise != MOE_NOISE_NONE)
		REFUSE("product_key with shared experts, an output bias, capacity or noise is not "
		       "generated for target %s yet",
		       tn);
	return bad;
}

/* Op lists ------------------------------------------------------------------------ */

static void add(struct moe_plan *p, enum moe_op op, uint32_t in, uint32_t out)
{
	MOE_ASSERT(p->n_ops < MOE_MAX_OPS);
	p->ops[p->n_ops++] = (struct moe_plan_op){op, in, out};
}

#define IO MOE_BUF_COUNT

/* The grouped FFN after a router (one output row per grouped row), the
 * combine (each token's rows summed in slot order, so a result never depends
 * on where a row was computed), the shared FFN, then the additions to the
 * output in a fixed order. */
static void ops_ffn(const struct moe_desc *d, struct moe_plan *p)
{
	add(p, MOE_OP_EXPERT_UP, MOE_BUF_ROWS, MOE_BUF_H);
	if (has_shared(d))
		add(p, MOE_OP_SHARED_UP, IO, MOE_BUF_H_SHARED);
	if (p->target == MOE_TARGET_CUDA) { /* its combine kernel follows the op list */
		add(p, MOE_OP_EXPERT_DOWN, MOE_BUF_H, IO);
	} else {
		add(p, MOE_OP_EXPERT_DOWN, MOE_BUF_H, MOE_BUF_ROWS_Y);
		add(p, MOE_OP_COMBINE, MOE_BUF_ROWS_Y, IO);
	}
	if (has_shared(d))
		add(p, MOE_OP_SHARED_DOWN, MOE_BUF_H_SHARED, IO);
}

static void ops_routed(const struct moe_desc *d, struct moe_plan *p, enum moe_op route)
{
	if (d->noise == MOE_NOISE_JITTER)
		add(p, MOE_OP_JITTER, IO, MOE_BUF_XJ);
	add(p, route, IO, MOE_BUF_WEIGHTS);
	if (d->mode == MOE_MODE_EXPERT_CHOICE)
		add(p, MOE_OP_EC_SELECT, MOE_BUF_WEIGHTS, MOE_BUF_WEIGHTS);
	if (d->capacity != MOE_CAPACITY_NONE)
		add(p, MOE_OP_CAPACITY, MOE_BUF_WEIGHTS, MOE_BUF_KEPT);
	add(p, MOE_OP_GROUP, MOE_BUF_WEIGHTS, MOE_BUF_ROWS);
	ops_ffn(d, p);
	if (d->capacity != MOE_CAPACITY_NONE && d->overflow == MOE_OVERFLOW_PASSTHROUGH)
		add(p, MOE_OP_PASSTHROUGH, MOE_BUF_KEPT, IO);
	if (d->output_bias)
		add(p, MOE_OP_OUTPUT_BIAS, IO, IO);
	add(p, MOE_OP_STATS, MOE_BUF_WEIGHTS, IO);
}

/* The research router (probabilities, noise) where the description has one. */
static void ops_topk(const struct moe_desc *d, struct moe_plan *p)
{
	int x = d->mode == MOE_MODE_TOKEN_CHOICE && d->noise == MOE_NOISE_LEARNED_GAUSSIAN;
	ops_routed(d, p, x ? MOE_OP_ROUTE_X : MOE_OP_ROUTE);
}

static void ops_research(const struct moe_desc *d, struct moe_plan *p)
{
	ops_routed(d, p, MOE_OP_ROUTE_X);
}
#define ops_top_p ops_topk
#define ops_sparsemixer ops_research
#define ops_hierarchical ops_research
#define ops_expert_choice ops_research

static void ops_product_key(const struct moe_desc *d, struct moe_plan *p)
{
	(void)d;
	add(p, MOE_OP_PK_QUERY, IO, MOE_BUF_LOGITS);
	add(p, MOE_OP_PK_ROUTE, MOE_BUF_LOGITS, MOE_BUF_WEIGHTS);
	add(p, MOE_OP_PK_EXPERTS, MOE_BUF_WEIGHTS, IO);
	add(p, MOE_OP_PK_STATS, MOE_BUF_WEIGHTS, IO);
}

static void ops_soft(const struct moe_desc *d, struct moe_plan *p)
{
	add(p, MOE_OP_SOFT_LOGITS, IO, MOE_BUF_LOGITS);
	add(p, MOE_OP_SOFT_COMBINE, MOE_BUF_LOGITS, MOE_BUF_SOFT_C);
	add(p, MOE_OP_SOFT_DISPATCH, MOE_BUF_LOGITS, MOE_BUF_SOFT_D);
	add(p, MOE_OP_SOFT_SLOT_IN, MOE_BUF_SOFT_D, MOE_BUF_SOFT_XS);
	add(p, MOE_OP_SOFT_SLOTS, MOE_BUF_SOFT_XS, MOE_BUF_ROWS);
	add(p, MOE_OP_EXPERT_UP, MOE_BUF_ROWS, MOE_BUF_H);
	if (has_shared(d))
		add(p, MOE_OP_SHARED_UP, IO, MOE_BUF_H_SHARED);
	add(p, MOE_OP_EXPERT_DOWN, MOE_BUF_H, MOE_BUF_SOFT_Y);
	add(p, MOE_OP_SOFT_OUT, MOE_BUF_SOFT_Y, IO);
	if (has_shared(d))
		add(p, MOE_OP_SHARED_DOWN, MOE_BUF_H_SHARED, IO);
	add(p, MOE_OP_SOFT_STATS, MOE_BUF_SOFT_C, IO);
}

/* The table ---------------------------------------------------------------------- */

struct mode_row {
	unsigned targets;
	int (*check)(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag);
	void (*ops)(const struct moe_desc *d, struct moe_plan *p);
};

#define check_dense check_topk
static const struct mode_row rows[MOE_MODE_COUNT] = {
#define MOE_MODE(v, s, targets, family, pack)                                                      \
	[MOE_MODE_##v] = {targets, check_##family, ops_##family},
#include "moe_modes.def"
#undef MOE_MODE
};

int moe_mode_supported(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag)
{
	MOE_ASSERT(d->mode < MOE_MODE_COUNT && t < MOE_TARGET_COUNT);
	/* every reason is reported: the mode, then what every mode shares, then
	 * the mode's own limits when the mode itself is generated */
	int mode_ok = (rows[d->mode].targets & (1u << t)) != 0;
	if (!mode_ok)
		moe_diag_error(diag, "router.mode %s is not generated for target %s yet",
			       moe_mode_names[d->mode], moe_target_names[t]);
	int bad = check_common(d, t, diag);
	if (mode_ok && !bad)
		bad = rows[d->mode].check(d, t, diag);
	return mode_ok && !bad;
}

void moe_mode_ops(const struct moe_desc *d, struct moe_plan *p)
{
	rows[d->mode].ops(d, p);
}
