/* info.c: parameter, FLOP and weight-byte accounting of a resolved description
 * (`moegen info`). Pure arithmetic on struct moe_desc; the conventions behind
 * each figure (what "active" means per router mode) are in docs/models.md. */
#include "moegen.h"

#include <math.h>
#include <string.h>

static double dtype_bytes(enum moe_dtype t)
{
	return t == MOE_DTYPE_F32 ? 4.0 : 2.0;
}

/* Bytes per weight of a kept-quantized format as the panels hold it (an f32
 * scale per group, and for int4 an f32 offset), or the dtype's. */
static double qfmt_bytes(const struct moe_qfmt *f, enum moe_dtype t)
{
	switch (f->kind) {
	case MOE_QFORMAT_INT8:
		return 1.0 + 4.0 / f->group;
	case MOE_QFORMAT_INT4:
		return 0.5 + 8.0 / f->group;
	default:
		return dtype_bytes(t);
	}
}

/* Bytes of one FFN's matrices (gate and up in the up format, down in the
 * down format) less what dtype_bytes would count for them: the correction a
 * kept-quantized FFN makes to a byte count. */
static double ffn_bytes_delta(const struct moe_desc *d, enum moe_kind k, double width,
			      const struct moe_qfmt *up, const struct moe_qfmt *down)
{
	double H = d->hidden, b = dtype_bytes(d->weight_dtype);
	double nup = (k == MOE_KIND_GLU ? 2.0 : 1.0) * width * H, ndown = width * H;
	return nup * (qfmt_bytes(up, d->weight_dtype) - b) +
	       ndown * (qfmt_bytes(down, d->weight_dtype) - b);
}

/* Parameters of one role's canonical tensor over all experts, 0 when unused. */
static double role_params(const struct moe_desc *d, enum moe_role r)
{
	uint64_t rows, cols;
	int per_expert;
	if (!moe_desc_role_shape(d, r, &rows, &cols, &per_expert))
		return 0;
	double n = (double)rows * (double)cols;
	return per_expert ? n * d->n_experts : n;
}

static const enum moe_role expert_roles[] = {
    MOE_ROLE_GATE,    MOE_ROLE_UP,        MOE_ROLE_DOWN,     MOE_ROLE_GATE_BIAS,
    MOE_ROLE_UP_BIAS, MOE_ROLE_DOWN_BIAS, MOE_ROLE_NEURON_U, MOE_ROLE_NEURON_V,
};
static const enum moe_role router_roles[] = {
    MOE_ROLE_ROUTER,        MOE_ROLE_ROUTER_BIAS, MOE_ROLE_SELECT_BIAS, MOE_ROLE_NOISE,
    MOE_ROLE_GROUP_ROUTER,  MOE_ROLE_SOFT_SLOTS,  MOE_ROLE_SOFT_SCALE,  MOE_ROLE_PK_QUERY,
    MOE_ROLE_PK_QUERY_BIAS, MOE_ROLE_PK_KEYS,     MOE_ROLE_OUTPUT_BIAS, MOE_ROLE_SOFT_GAMMA,
};
static const enum moe_role shared_roles[] = {
    MOE_ROLE_SHARED_GATE,
    MOE_ROLE_SHARED_UP,
    MOE_ROLE_SHARED_DOWN,
    MOE_ROLE_SHARED_EXPERT_GATE,
};

static double sum_roles(const struct moe_desc *d, const enum moe_role *r, size_t n)
{
	double s = 0;
	for (size_t i = 0; i < n; i++)
		s += role_params(d, r[i]);
	return s;
}

#define SUM_ROLES(d, list) sum_roles(d, list, sizeof list / sizeof *list)

/* Hierarchical gating: G groups of b experts, k1 groups then k2 per group. */
static void levels(const struct moe_desc *d, double *G, double *b, double *k1, double *k2)
{
	*G = d->levels[0].groups ? d->levels[0].groups : 1;
	*b = d->n_experts / *G;
	*k1 = d->levels[0].top_k;
	*k2 = d->levels[1].top_k;
}

/* Top-p takes between 1 and top_k experts, as the router's confidence goes.
 * The expected count quoted is that of a router with no preference (every
 * probability 1/E): the fewest experts whose probabilities reach p. */
static double top_p_expected(const struct moe_desc *d)
{
	double m = ceil((double)d->top_p * d->n_experts - 1e-9);
	if (m < 1)
		m = 1;
	return m < d->top_k ? m : d->top_k;
}

/* Expert applications per token that define compute and active parameters:
 * the large-batch average for routers whose choice depends on the batch. */
static double experts_per_token(const struct moe_desc *d)
{
	double E = d->n_experts, G, b, k1, k2, k;
	switch (d->mode) {
	case MOE_MODE_DENSE:
		return E;
	case MOE_MODE_HIERARCHICAL:
		levels(d, &G, &b, &k1, &k2);
		return k1 * k2;
	case MOE_MODE_EXPERT_CHOICE:
		/* E experts take ceil(T f / E) tokens each: f per token. */
		k = d->ec_capacity_factor;
		return k < E ? k : E;
	case MOE_MODE_SOFT:
		/* E P slots are each one expert application; per token that is
		 * E P / T, quoted at T = E P tokens per group. */
		return 1;
	case MOE_MODE_PRODUCT_KEY:
		return (double)d->pk_heads * d->pk_top_k;
	case MOE_MODE_TOP_P:
		return top_p_expected(d);
	default:
		return d->top_k;
	}
}

/* Experts whose weights one token reads when it is alone (T = 1). Expert
 * choice and Soft MoE hand the only token to every expert. */
static double experts_read_alone(const struct moe_desc *d)
{
	double E = d->n_experts, k;
	switch (d->mode) {
	case MOE_MODE_EXPERT_CHOICE:
	case MOE_MODE_SOFT:
		return E;
	default:
		k = experts_per_token(d);
		return k < E ? k : E;
	}
}

/* Multiply-adds of the router for one token at inference (noise is off). */
static double router_macs(const struct moe_desc *d)
{
	double H = d->hidden, E = d->n_experts, G, b, k1, k2;
	double S = (double)d->n_experts * d->soft_slots_per_expert;
	switch (d->mode) {
	case MOE_MODE_HIERARCHICAL:
		levels(d, &G, &b, &k1, &k2);
		return G * H + k1 * b * H;
	case MOE_MODE_SOFT:
		/* slot logits, dispatch (slot inputs) and combine, each S H per
		 * token. */
		return 3 * S * H;
	case MOE_MODE_PRODUCT_KEY:
		/* query projection, then each head scores both halves of d/2
		 * against R sub-keys; the k x k candidate sums are additions. */
		return (double)d->pk_heads * d->pk_query_dim * H +
		       (double)d->pk_heads * d->pk_sub_keys * d->pk_query_dim;
	default:
		return E * H;
	}
}

/* Router parameters one token reads: noise is training-only, and a
 * hierarchical token reads the gates of its k1 groups only. */
static double router_read(const struct moe_desc *d, double router)
{
	double r = router - role_params(d, MOE_ROLE_NOISE), G, b, k1, k2;
	if (d->mode == MOE_MODE_HIERARCHICAL) {
		levels(d, &G, &b, &k1, &k2);
		r -= (G - k1) * b * d->hidden;
	}
	return r;
}

static double ffn_macs(enum moe_kind kind, double I, double H)
{
	return (kind == MOE_KIND_GLU ? 3 : 2) * I * H;
}

/* One full-attention layer, as the Hugging Face modules build it; *norms is
 * the part that is norm weights (no multiply-adds). */
static double attention_params(const struct moe_desc *d, double *norms)
{
	double H = d->hidden, h = d->attn_heads;
	*norms = 0;
	if (d->attn == MOE_ATTN_MHA) {
		double kv = d->attn_kv_heads ? d->attn_kv_heads : h, hd = d->attn_head_dim;
		double q = h * hd * (d->attn_output_gate ? 2 : 1);
		double p = H * q + 2 * H * kv * hd + h * hd * H;
		if (d->attn_qkv_bias)
			p += q + 2 * kv * hd;
		if (d->attn_out_bias)
			p += H;
		if (d->attn_sinks)
			p += h;
		if (d->attn_qk_norm == MOE_QK_NORM_HEAD)
			*norms = 2 * hd;
		else if (d->attn_qk_norm == MOE_QK_NORM_FULL)
			*norms = h * hd + kv * hd;
		return p + *norms;
	}
	if (d->attn != MOE_ATTN_MLA)
		return 0;
	double qr = d->mla_q_lora_rank, kvr = d->mla_kv_lora_rank;
	double nope = d->mla_qk_nope_dim, rope = d->mla_qk_rope_dim, v = d->mla_v_dim;
	double p;
	/* q: compressed to q_lora_rank and normed, or projected directly
	 * (q_lora_rank 0, as DeepSeek-V2-Lite). */
	if (qr > 0)
		p = H * qr + qr * h * (nope + rope);
	else
		p = H * h * (nope + rope);
	/* kv: joint compression plus the shared rope key, normed, expanded. */
	p += H * (kvr + rope) + kvr * h * (nope + v);
	p += h * v * H;
	if (d->attn_out_bias)
		p += H;
	*norms = qr + kvr;
	return p + *norms;
}

/* One linear-attention layer. Gated DeltaNet (Qwen3-Next): q, k, v, z and
 * the b, a gates from one input projection each, a depthwise causal conv over
 * q, k and v, per-value-head dt bias and A, a gated norm over the value head
 * dim, the output projection. Lightning attention (MiniMax-01): q, k, v in one
 * projection, an output gate, a norm over all heads, the output projection. */
static double linear_params(const struct moe_desc *d, double *norms)
{
	double H = d->hidden, vh = d->lin_value_heads, vd = d->lin_value_dim;
	double V = vh * vd;
	*norms = 0;
	if (d->linear_attn == MOE_LINEAR_ATTN_GATED_DELTANET) {
		double K = (double)d->lin_key_heads * d->lin_key_dim;
		*norms = vd;
		return H * (2 * K + 2 * V) + H * 2 * vh + (2 * K + V) * d->lin_conv + 2 * vh +
		       *norms + V * H;
	}
	if (d->linear_attn == MOE_LINEAR_ATTN_LIGHTNING) {
		*norms = V;
		return 3 * H * V + H * V + V * H + *norms;
	}
	return 0;
}

void moe_info_count(const struct moe_desc *d, struct moe_counts *c)
{
	memset(c, 0, sizeof *c);
	double H = d->hidden, E = d->n_experts;
	double n_moe = d->n_moe_layers;
	double n_dense = d->n_layers > d->n_moe_layers ? d->n_layers - d->n_moe_layers : 0;

	/* One MoE layer. */
	double routed = SUM_ROLES(d, expert_roles);
	double router = SUM_ROLES(d, router_roles);
	double shared = SUM_ROLES(d, shared_roles);
	double per_expert = E > 0 ? routed / E : 0;
	double ept = experts_per_token(d);
	double routed_active = d->mode == MOE_MODE_SOFT ? routed : ept * per_expert;

	double expert_macs =
	    d->kind == MOE_KIND_SINGLE_NEURON ? 2 * H : ffn_macs(d->kind, d->intermediate, H);
	double Is = moe_desc_shared_width(d);
	double shared_macs = Is ? ffn_macs(d->shared_kind, Is, H) : 0;
	if (Is && d->shared_gate == MOE_SHARED_GATE_SIGMOID)
		shared_macs += H;
	double layer_macs = router_macs(d) + ept * expert_macs + shared_macs;
	double layer_read = router_read(d, router) + experts_read_alone(d) * per_expert + shared;

	c->routed_total = n_moe * routed;
	c->routed_active = n_moe * routed_active;
	c->shared = n_moe * shared;
	c->router = n_moe * router;
	c->experts_per_token = ept;
	c->layer_flops = 2 * layer_macs;
	c->flops_per_token = n_moe * c->layer_flops;
	c->layer_weight_bytes = layer_read * dtype_bytes(d->weight_dtype);
	if (d->kind != MOE_KIND_SINGLE_NEURON)
		c->layer_weight_bytes +=
		    experts_read_alone(d) * ffn_bytes_delta(d, d->kind, d->intermediate,
							    &d->qfmt[MOE_QMAT_UP],
							    &d->qfmt[MOE_QMAT_DOWN]);
	if (Is)
		c->layer_weight_bytes +=
		    ffn_bytes_delta(d, d->shared_kind, Is, &d->qfmt[MOE_QMAT_SHARED_UP],
				    &d->qfmt[MOE_QMAT_SHARED_DOWN]);
	c->weight_bytes_per_token = n_moe * c->layer_weight_bytes;
	c->weights_per_token = n_moe * layer_read;

	/* The rest of the model, as far as the spec describes it. */
	double dense_layer =
	    d->dense_intermediate ? ffn_macs(d->dense_kind, d->dense_intermediate, H) : 0;
	c->dense_ffn = n_dense * dense_layer;
	double attn_norms, lin_norms;
	double attn_layer = attention_params(d, &attn_norms);
	double lin_layer = linear_params(d, &lin_norms);
	double n_lin = d->linear_attn != MOE_LINEAR_ATTN_NONE ? d->n_linear_layers : 0;
	double n_full = d->n_layers - n_lin;
	c->attention = n_full * attn_layer + n_lin * lin_layer;
	double table = (double)d->vocab * H;
	c->embedding = d->tied_embeddings ? table : 2 * table;
	if (d->attn != MOE_ATTN_NONE)
		c->norms = (2.0 * d->n_layers + 1) * H * (d->norm_bias ? 2 : 1);

	c->total = c->routed_total + c->shared + c->router + c->dense_ffn + c->attention +
		   c->embedding + c->norms;
	c->active = c->total - c->routed_total + c->routed_active;
	/* A token reads one row of the input table; a tied table is still read
	 * whole by the output head. */
	c->active_no_embed_in = c->active - (d->tied_embeddings ? 0 : table);

	if (d->attn != MOE_ATTN_NONE) {
		double macs = c->flops_per_token / 2 + n_dense * dense_layer +
			      n_full * (attn_layer - attn_norms) + n_lin * (lin_layer - lin_norms) +
			      table;
		c->model_flops = 2 * macs;
	}
}

/* 1234567 -> "1.23M", 46702792704 -> "46.7B". */
static const char *human(char *buf, size_t cap, double v, const char *const sfx[5])
{
	int i = 0;
	double x = v;
	while (i < 4 && x >= 999.5) {
		x /= 1000;
		i++;
	}
	/* three significant digits; the exact count is printed beside it */
	int decimals = i == 0 || x >= 99.95 ? 0 : x >= 9.995 ? 1 : 2;
	snprintf(buf, cap, "%.*f%s", decimals, x, sfx[i]);
	return buf;
}

static const char *const param_sfx[5] = {"", "K", "M", "B", "T"};
static const char *const flop_sfx[5] = {" FLOP", " kFLOP", " MFLOP", " GFLOP", " TFLOP"};
static const char *const byte_sfx[5] = {" B", " kB", " MB", " GB", " TB"};

static void row(FILE *out, const char *label, double total, double active)
{
	char a[32], b[32];
	fprintf(out, "  %-27s %10s %15.0f  %10s %15.0f\n", label,
		human(a, sizeof a, total, param_sfx), total, human(b, sizeof b, active, param_sfx),
		active);
}

static void quantity(FILE *out, const char *label, double v, const char *const sfx[5])
{
	char a[32];
	fprintf(out, "  %-34s %14s  (%.0f)\n", label, human(a, sizeof a, v, sfx), v);
}

void moe_info_router(const struct moe_desc *d, char *buf, size_t cap)
{
	buf[0] = 0;
	switch (d->mode) {
	case MOE_MODE_TOKEN_CHOICE:
	case MOE_MODE_SPARSEMIXER: {
		int n = snprintf(buf, cap, "%s top-%u", moe_score_names[d->score], d->top_k);
		if (d->n_groups > 1 && n >= 0 && (size_t)n < cap)
			snprintf(buf + n, cap - (size_t)n, " in %u of %u groups", d->group_top,
				 d->n_groups);
		break;
	}
	case MOE_MODE_DENSE:
		snprintf(buf, cap, "%s over all %u experts", moe_score_names[d->score],
			 d->n_experts);
		break;
	case MOE_MODE_TOP_P:
		snprintf(buf, cap,
			 "%s top-p %g: 1 to %u experts per token, %g with a uniform router",
			 moe_score_names[d->score], (double)d->top_p, d->top_k, top_p_expected(d));
		break;
	case MOE_MODE_HIERARCHICAL:
		snprintf(buf, cap, "top-%u of %u groups, top-%u in each", d->levels[0].top_k,
			 d->levels[0].groups, d->levels[1].top_k);
		break;
	case MOE_MODE_EXPERT_CHOICE:
		snprintf(buf, cap, "capacity factor %g", (double)d->ec_capacity_factor);
		break;
	case MOE_MODE_SOFT:
		snprintf(buf, cap, "slots per expert %u", d->soft_slots_per_expert);
		break;
	case MOE_MODE_PRODUCT_KEY:
		snprintf(buf, cap, "%u heads top-%u, %u x %u keys of dim %u", d->pk_heads,
			 d->pk_top_k, d->pk_sub_keys, d->pk_sub_keys, d->pk_query_dim);
		break;
	default:
		break;
	}
}

void moe_info_print(const struct moe_desc *d, FILE *out)
{
	struct moe_counts c;
	moe_info_count(d, &c);

	fprintf(out, "%s\n", d->name);
	fprintf(out, "  layers %u (%u MoE), hidden %u", d->n_layers, d->n_moe_layers, d->hidden);
	if (d->vocab)
		fprintf(out, ", vocab %u%s", d->vocab, d->tied_embeddings ? " (tied)" : "");
	fprintf(out, ", attention %s", moe_attn_names[d->attn]);
	if (d->linear_attn != MOE_LINEAR_ATTN_NONE)
		fprintf(out, " (%s in %u layers)", moe_linear_attn_names[d->linear_attn],
			d->n_linear_layers);
	fprintf(out, "\n");
	char router[256];
	moe_info_router(d, router, sizeof router);
	fprintf(out, "  router %s %s", moe_mode_names[d->mode], router);
	fprintf(out, ", %u %s experts", d->n_experts, moe_kind_names[d->kind]);
	if (d->kind != MOE_KIND_SINGLE_NEURON)
		fprintf(out, " of width %u", d->intermediate);
	if (d->shared_count)
		fprintf(out, ", shared width %u", moe_desc_shared_width(d));
	fprintf(out, ", weights %s", moe_dtype_names[d->weight_dtype]);
	for (int m = 0; m < MOE_QMAT_COUNT; m++)
		if (d->qfmt[m].kind != MOE_QFORMAT_NONE)
			fprintf(out, ", %s kept %s g%u%s", moe_qmat_names[m],
				moe_qformat_names[d->qfmt[m].kind], d->qfmt[m].group,
				d->qfmt[m].zero ? " with zero points" : "");
	fprintf(out, "\n\n");

	fprintf(out, "  %-27s %26s  %26s\n", "parameters", "total", "active");
	row(out, "routed experts", c.routed_total, c.routed_active);
	row(out, "shared experts", c.shared, c.shared);
	row(out, "router", c.router, c.router);
	row(out, "dense ffn", c.dense_ffn, c.dense_ffn);
	row(out, "attention", c.attention, c.attention);
	row(out, "embedding", c.embedding, c.embedding);
	row(out, "norms", c.norms, c.norms);
	row(out, "total", c.total, c.active);
	if (c.active_no_embed_in != c.active) {
		char a[32];
		fprintf(out, "  %-27s %26s  %10s %15.0f\n", "active w/o input embedding", "",
			human(a, sizeof a, c.active_no_embed_in, param_sfx), c.active_no_embed_in);
	}

	fprintf(out, "\n  per token\n");
	char k[32];
	snprintf(k, sizeof k, "%g", c.experts_per_token);
	fprintf(out, "  %-34s %14s\n", "routed experts applied", k);
	quantity(out, "MoE FLOPs, one layer", c.layer_flops, flop_sfx);
	quantity(out, "MoE FLOPs, all MoE layers", c.flops_per_token, flop_sfx);
	if (c.model_flops > 0)
		quantity(out, "model FLOPs (no attention scores)", c.model_flops, flop_sfx);
	quantity(out, "MoE weight bytes (T=1), one layer", c.layer_weight_bytes, byte_sfx);
	quantity(out, "MoE weight bytes (T=1), all", c.weight_bytes_per_token, byte_sfx);
}
