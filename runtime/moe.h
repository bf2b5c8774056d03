/* moe.h: the ABI of every model.so that moegen builds. Opaque handles, status
 * codes, no globals; the last error message is kept per thread. Tensors are
 * caller-owned, row-major. See docs/abi.md. */
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#include "moe_ref.h" /* enum moe_status, struct moe_routing, struct moe_fwd_opts */

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_ABI_VERSION 1

enum moe_device { MOE_DEVICE_CPU = 0, MOE_DEVICE_CUDA = 1 };

/* Static metadata of a model.so; never NULL, points at constant data. */
struct moe_info {
	uint32_t abi_version; /* MOE_ABI_VERSION */
	const char *name;
	const struct moe_desc *desc; /* the resolved spec */
	uint32_t hidden, n_experts, top_k, route_width, n_layers, n_moe_layers;
	enum moe_dtype weight_dtype, act_dtype;
	uint32_t targets;      /* bit (1 << enum moe_device) per compiled target */
	const char *spec_hash; /* hex SHA-256 of the canonical model dump */
	const char *cpu;       /* CPU the kernels were compiled for */
};

struct moe_create_opts {
	uint32_t threads; /* 0: all cores */
	enum moe_device device;
	void *stream; /* CUDA stream for device forward (CUstream) */
};

typedef struct moe_model moe_model;

const struct moe_info *moe_info(void);

/* Create a model with no weights loaded. opts may be NULL (defaults). */
enum moe_status moe_create(moe_model **m, const struct moe_create_opts *opts);
void moe_destroy(moe_model *m); /* NULL is a no-op */

/* Load every MoE layer's weights from safetensors files (mmapped), by the
 * spec's name templates; a model.safetensors.index.json path loads its shards.
 * Weights are converted and packed once. */
enum moe_status moe_load_safetensors(moe_model *m, const char *const *files, size_t n_files);
/* Deterministic random weights (moe_ref_weights_random) for every MoE layer. */
enum moe_status moe_init_random(moe_model *m, uint64_t seed);

/* y[n_tokens, H] = MoE layer `layer` (a model layer index that is an MoE layer)
 * applied to x[n_tokens, H], in the activation dtype (float or bf16 bits).
 * routing and opts may be NULL. n_tokens may be 0. */
enum moe_status moe_forward(moe_model *m, uint32_t layer, const void *x, void *y, size_t n_tokens,
			    struct moe_routing *routing, const struct moe_fwd_opts *opts);

/* The message of this thread's last failure ("" when none). */
const char *moe_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
