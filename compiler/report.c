/* report.c: what moegen says about itself and about a spec for tools:
 * `moegen --version`, and check and info as JSON (cJSON). */
#include "moegen.h"

#include <cjson/cJSON.h>
#include <llvm-c/Core.h>
#include <llvm-c/TargetMachine.h>

#include "backend.h"
#include "cuda.h"

#ifndef MOE_VERSION
#define MOE_VERSION "unknown"
#endif
#ifndef MOE_GIT_REV
#define MOE_GIT_REV "unknown"
#endif

void moe_version_print(FILE *out)
{
	unsigned major, minor, patch;
	LLVMGetVersion(&major, &minor, &patch);
	char *triple = LLVMGetDefaultTargetTriple(), *cpu = LLVMGetHostCPUName();
	char nvrtc[32];
	moe_nvrtc_version(nvrtc, sizeof nvrtc);
	fprintf(out, "moegen %s (git %s)\n", MOE_VERSION, MOE_GIT_REV);
	fprintf(out, "LLVM %u.%u.%u\n", major, minor, patch);
	fprintf(out, "target cpu: LLVM IR for any LLVM triple; host %s, cpu %s\n", triple, cpu);
	if (nvrtc[0])
		fprintf(out, "target cuda: NVRTC %s; default archs %s\n", nvrtc,
			MOE_CUDA_DEFAULT_ARCHS);
	else
		fprintf(out, "target cuda: NVRTC not found (set MOE_NVRTC or CUDA_HOME)\n");
	fprintf(out, "ABI %d\n", MOE_ABI_VERSION);
	LLVMDisposeMessage(triple);
	LLVMDisposeMessage(cpu);
}

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
	return o;
}
