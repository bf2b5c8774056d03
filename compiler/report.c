/* report.c: what moegen says about a spec for tools: check and info as JSON
 * (cJSON). No LLVM here: the importer's card uses it too. */
#include "moegen.h"

#include <cjson/cJSON.h>

static cJSON *params(double total, double active)
{
	cJSON *o = cJSON_CreateObject();
	cJSON_AddNumberToObject(o, "total", total);
	cJSON_AddNumberToObject(o, "active", active);
	return o;
}

/* The model in a few fields, shared by check and info. */
static void add_model(cJSON *o, const struct moe_desc *d)
{
	char router[256];
	moe_info_router(d, router, sizeof router);
	cJSON_AddStringToObject(o, "name", d->name);
	cJSON_AddNumberToObject(o, "layers", d->n_layers);
	cJSON_AddNumberToObject(o, "moe_layers", d->n_moe_layers);
	cJSON_AddNumberToObject(o, "hidden", d->hidden);
	cJSON_AddStringToObject(o, "router_mode", moe_mode_names[d->mode]);
	cJSON_AddStringToObject(o, "router", router);
	cJSON_AddNumberToObject(o, "experts", d->n_experts);
	cJSON_AddNumberToObject(o, "route_width", moe_desc_route_width(d));
	cJSON_AddStringToObject(o, "expert_kind", moe_kind_names[d->kind]);
	cJSON_AddNumberToObject(o, "intermediate", d->intermediate);
	cJSON_AddNumberToObject(o, "shared_width", moe_desc_shared_width(d));
	cJSON_AddStringToObject(o, "weight_dtype", moe_dtype_names[d->weight_dtype]);
}

cJSON *moe_check_json(const char *spec, const struct moe_desc *d)
{
	cJSON *o = cJSON_CreateObject();
	cJSON_AddStringToObject(o, "spec", spec);
	cJSON_AddBoolToObject(o, "ok", 1);
	add_model(o, d);
	return o;
}

/* The routing and FFN semantics the description resolved to: every choice a
 * reader needs to reproduce the block, by its spec spelling. */
static void add_semantics(cJSON *o, const struct moe_desc *d)
{
	cJSON *s = cJSON_AddObjectToObject(o, "semantics");
	cJSON_AddStringToObject(s, "mode", moe_mode_names[d->mode]);
	cJSON_AddStringToObject(s, "score", moe_score_names[d->score]);
	cJSON_AddNumberToObject(s, "top_k", d->top_k);
	cJSON *n = cJSON_AddObjectToObject(s, "normalize");
	cJSON_AddStringToObject(n, "kind", moe_norm_names[d->norm]);
	if (d->norm != MOE_NORM_NONE) {
		cJSON_AddNumberToObject(n, "eps", d->norm_eps);
		cJSON_AddNumberToObject(n, "min", d->norm_min);
		if (d->norm == MOE_NORM_LP)
			cJSON_AddNumberToObject(n, "p", d->norm_p);
	}
	cJSON_AddNumberToObject(s, "scale", d->scale);
	cJSON_AddBoolToObject(s, "router_bias", d->router_bias);
	cJSON_AddBoolToObject(s, "select_bias", d->select_bias);
	if (d->n_groups > 1) {
		cJSON *g = cJSON_AddObjectToObject(s, "groups");
		cJSON_AddNumberToObject(g, "count", d->n_groups);
		cJSON_AddNumberToObject(g, "top", d->group_top);
		cJSON_AddStringToObject(g, "score", moe_group_score_names[d->group_score]);
	}
	cJSON_AddStringToObject(s, "capacity", moe_capacity_names[d->capacity]);
	cJSON_AddStringToObject(s, "apply_to", moe_apply_names[d->apply_to]);
	cJSON_AddStringToObject(s, "activation", moe_act_names[d->act]);
	cJSON_AddBoolToObject(s, "expert_bias", d->expert_bias);
	cJSON_AddBoolToObject(s, "output_bias", d->output_bias);
	if (d->shared_count) {
		cJSON *sh = cJSON_AddObjectToObject(s, "shared_experts");
		cJSON_AddNumberToObject(sh, "width", moe_desc_shared_width(d));
		cJSON_AddStringToObject(sh, "kind", moe_kind_names[d->shared_kind]);
		cJSON_AddStringToObject(sh, "activation", moe_act_names[d->shared_act]);
		cJSON_AddStringToObject(sh, "gate", moe_shared_gate_names[d->shared_gate]);
	}
	cJSON_AddStringToObject(s, "attention", moe_attn_names[d->attn]);
	if (d->linear_attn != MOE_LINEAR_ATTN_NONE) {
		cJSON_AddStringToObject(s, "linear_attention",
					moe_linear_attn_names[d->linear_attn]);
		cJSON_AddNumberToObject(s, "linear_attention_layers", d->n_linear_layers);
	}
}

/* Bytes per weight of the formats a checkpoint ships in: mxfp4 is 4 bits
 * plus one 8-bit scale per 32 (4.25 bits); fp8 block scales are one f32
 * per 128x128 tile (negligible, counted); and as moegen keeps experts
 * quantized (quant:), int8 and int4 in groups of 128 with their f32 scales
 * (int4: and offsets). */
static const struct {
	const char *name;
	double bytes;
} formats[] = {
    {"f32", 4.0},
    {"bf16", 2.0},
    {"f16", 2.0},
    {"fp8_block", 1.0 + 4.0 / (128.0 * 128.0)},
    {"mxfp4", 4.25 / 8.0},
    {"int8_g128", 1.0 + 4.0 / 128},
    {"int4_g128", 0.5 + 8.0 / 128},
};

cJSON *moe_info_json(const struct moe_desc *d)
{
	struct moe_counts c;
	moe_info_count(d, &c);
	cJSON *o = cJSON_CreateObject();
	add_model(o, d);
	cJSON *p = cJSON_AddObjectToObject(o, "parameters");
	cJSON_AddItemToObject(p, "routed_experts", params(c.routed_total, c.routed_active));
	cJSON_AddItemToObject(p, "shared_experts", params(c.shared, c.shared));
	cJSON_AddItemToObject(p, "router", params(c.router, c.router));
	cJSON_AddItemToObject(p, "dense_ffn", params(c.dense_ffn, c.dense_ffn));
	cJSON_AddItemToObject(p, "attention", params(c.attention, c.attention));
	cJSON_AddItemToObject(p, "embedding", params(c.embedding, c.embedding));
	cJSON_AddItemToObject(p, "norms", params(c.norms, c.norms));
	cJSON_AddItemToObject(p, "all", params(c.total, c.active));
	cJSON_AddNumberToObject(p, "active_without_input_embedding", c.active_no_embed_in);
	cJSON *t = cJSON_AddObjectToObject(o, "per_token");
	cJSON_AddNumberToObject(t, "routed_experts", c.experts_per_token);
	cJSON_AddNumberToObject(t, "moe_flops_layer", c.layer_flops);
	cJSON_AddNumberToObject(t, "moe_flops", c.flops_per_token);
	cJSON_AddNumberToObject(t, "model_flops", c.model_flops);
	cJSON_AddNumberToObject(t, "moe_weight_bytes_layer", c.layer_weight_bytes);
	cJSON_AddNumberToObject(t, "moe_weight_bytes", c.weight_bytes_per_token);
	/* the same MoE weights (T = 1, all MoE layers) stored in each format */
	cJSON *f = cJSON_AddObjectToObject(t, "moe_weight_bytes_by_format");
	double n_weights = c.weights_per_token;
	for (size_t i = 0; i < sizeof formats / sizeof *formats; i++)
		cJSON_AddNumberToObject(f, formats[i].name, n_weights * formats[i].bytes);
	add_semantics(o, d);
	return o;
}
