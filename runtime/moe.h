/* moe.h: the ABI of every model.so that moegen builds. Self-contained (only
 * the C library's headers): opaque handles, status codes, no globals; the last
 * error message is kept per thread. Tensors are caller-owned, row-major.
 * See docs/abi.md. */
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 2: moe_info became a small versioned struct; moe_describe() added.
 * 3: the staged calls moe_route, moe_experts, moe_combine (moe_forward is
 *    their composition); moe_create_opts gained an expert range.
 * 4: moe_create_opts gained a layer range.
 * 5: moe_load_gguf.
 * 6: moe_route_stats and moe_routing_from_sums (struct moe_route_sums): the
 *    routing statistics of tokens routed in several calls (ranks, chunks). */
#define MOE_ABI_VERSION 6

/* Every call returns one of these; the message is in moe_last_error(). */
enum moe_status {
	MOE_OK = 0,
	MOE_ERR_ARG,   /* bad argument: NULL, wrong size, unknown layer */
	MOE_ERR_INPUT, /* non-finite input */
	MOE_ERR_NOMEM,
	MOE_ERR_WEIGHTS,     /* missing, mis-shaped or malformed weights */
	MOE_ERR_IO,          /* file I/O */
	MOE_ERR_UNSUPPORTED, /* feature not generated for this target */
	MOE_ERR_DEVICE,      /* accelerator failure or absence */
	MOE_ERR_BUSY,        /* concurrent forward on one model */
	MOE_ERR_INTERNAL,
	MOE_STATUS_COUNT
};

/* Element types of weights and activations. */
enum moe_dtype { MOE_DTYPE_F32 = 0, MOE_DTYPE_BF16 = 1, MOE_DTYPE_F16 = 2, MOE_DTYPE_COUNT };

enum moe_device { MOE_DEVICE_CPU = 0, MOE_DEVICE_CUDA = 1 };

/* Static metadata of a model.so: what a caller needs to size tensors and pick
 * layers. The full description is text, from moe_describe(). Fields are only
 * ever appended: read a field only when its offset is below `size`. */
struct moe_info {
	uint32_t abi_version;  /* MOE_ABI_VERSION of the library: first in every version */
	uint32_t size;         /* sizeof(struct moe_info) of the library */
	const char *name;      /* the spec's name */
	const char *spec_hash; /* 32 hex digits: XXH3-128 of the moe_describe() text */
	uint32_t hidden;       /* H: columns of x and y */
	uint32_t intermediate; /* width of one routed expert (after the fine-grained split) */
	uint32_t n_experts;    /* E: routed experts (after the split) */
	uint32_t top_k;        /* experts per token (after the split); dense: E; expert choice: 0 */
	uint32_t route_width;  /* W: slots per token in moe_routing.expert_ids/weights */
	uint32_t n_shared_experts;
	uint32_t shared_intermediate; /* width of one shared expert (0: none) */
	uint32_t n_layers;            /* layers of the whole model */
	uint32_t n_moe_layers;
	enum moe_dtype weight_dtype;
	enum moe_dtype act_dtype; /* of x and y: float, or bf16 bits in uint16_t */
	uint32_t targets;         /* bit (1 << enum moe_device) per compiled target */
	const uint32_t
	    *moe_layers; /* [n_moe_layers] ascending: the `layer` values of moe_forward */
	const char *cpu; /* CPU the kernels were compiled for ("" without cpu) */
};

struct moe_create_opts {
	uint32_t threads; /* 0: all cores */
	enum moe_device device;
	void *stream; /* CUDA stream for device forward (CUstream) */
	/* The routed experts this model holds, [expert_begin, expert_end) (expert
	 * parallelism: each rank holds a range); expert_end 0: all of them. A
	 * model that holds a part computes only moe_experts for its range;
	 * moe_forward needs every expert. */
	uint32_t expert_begin, expert_end;
	/* The model layers this model holds, [layer_begin, layer_end) (pipeline
	 * parallelism: each stage holds its layers); layer_end 0: all of them.
	 * The range must hold at least one MoE layer. moe_load_safetensors and
	 * moe_init_random fill only the MoE layers in the range (a checkpoint
	 * needs no other layer's tensors); the forward and the staged calls on
	 * an MoE layer outside it are MOE_ERR_ARG. */
	uint32_t layer_begin, layer_end;
};

/* Forward options. */
struct moe_fwd_opts {
	int training;  /* noise and jitter apply only when set */
	uint64_t seed; /* noise seed; the draw for (token, expert) depends only on
			  (seed, layer, token index in this call, expert) */
	uint32_t layer;
};

/* Routing output, every pointer optional (NULL: not wanted), caller-owned.
 * ids/weights are [n_tokens, route_width]. Unused or dropped slots have id -1
 * and weight 0. Per router mode:
 *   token_choice, hierarchical, sparsemixer: the k chosen experts per token;
 *   dense: W = E, all experts in order;
 *   expert_choice: W = E, slot e holds e if expert e chose the token, else -1;
 *   product_key: W = heads * top_k, expert index i * sub_keys + j;
 *   soft: W = 0 (no discrete routing).
 * counts: [E] assignments kept per expert (soft: slots per expert).
 * importance: [E] sum over tokens of the normalized router probability.
 * Scalars: see docs/semantics.md, "Auxiliary statistics". */
struct moe_routing {
	int32_t *expert_ids;
	float *weights;
	int64_t *counts;
	float *importance;
	float importance_cv2; /* squared coefficient of variation of importance */
	float lb_loss;        /* Switch load-balancing loss E * sum_e f_e * P_e */
	float z_loss;         /* mean over tokens of logsumexp(logits)^2 */
	int64_t n_dropped;    /* assignments dropped by capacity */
};

typedef struct moe_model moe_model;

/* Static metadata; never NULL, points at constant data owned by the library. */
const struct moe_info *moe_info(void);

/* The resolved model description as text, one fact per line ("key value ...",
 * the same text as `moegen -d model`; spec_hash is its XXH3-128). Writes at
 * most cap bytes including the terminating NUL into buf (buf may be NULL when
 * cap is 0) and returns the length of the whole text, like snprintf: call
 * with cap 0 to size the buffer. */
size_t moe_describe(char *buf, size_t cap);

/* Create a model with no weights loaded. opts may be NULL (defaults). */
enum moe_status moe_create(moe_model **m, const struct moe_create_opts *opts);
void moe_destroy(moe_model *m); /* NULL is a no-op */

/* Load every MoE layer's weights (those of the layer range, when the model was
 * created with one) from safetensors files (mmapped), by the spec's name
 * templates; a model.safetensors.index.json path loads its shards. Weights are
 * converted and packed once. */
enum moe_status moe_load_safetensors(moe_model *m, const char *const *files, size_t n_files);
/* Load every MoE layer's weights (of the layer range) from one GGUF file
 * (llama.cpp's format, versions 2 and 3) by the spec's name templates
 * (weights.format: gguf; experts stacked, e.g. blk.{layer}.ffn_up_exps.weight).
 * A role the spec keeps quantized (quant:) must be stored in the ggml type
 * that holds its format exactly: Q8_0 as {int8, group 32}, Q4_0 as {int4,
 * group 32, zero: false}, Q4_K as {int4, group 32, zero: true}; its codes and
 * scales are kept as they are. Every other role is F32, F16 or BF16. */
enum moe_status moe_load_gguf(moe_model *m, const char *path);
/* Deterministic random weights (the reference's) for every MoE layer (of the
 * layer range); the values do not depend on the thread count. */
enum moe_status moe_init_random(moe_model *m, uint64_t seed);

/* y[n_tokens, H] = MoE layer `layer` (a model layer index that is an MoE layer)
 * applied to x[n_tokens, H], in the activation dtype (float or bf16 bits).
 * routing and opts may be NULL. n_tokens may be 0. */
enum moe_status moe_forward(moe_model *m, uint32_t layer, const void *x, void *y, size_t n_tokens,
			    struct moe_routing *routing, const struct moe_fwd_opts *opts);

/* The stages of moe_forward, for an engine that moves rows between them (expert
 * parallelism). moe_forward is exactly route -> group -> experts -> combine, so
 * the staged calls give the same bits. Rows are f32 (the compute type) whatever
 * the activation dtype; x and y are in the activation dtype. Token choice,
 * dense, top-p, hierarchical and sparsemixer routers without capacity only
 * (others: MOE_ERR_ARG); a model whose routing weight scales the expert input
 * (apply_to input) needs rows_w in moe_experts and sums unweighted in
 * moe_combine.
 *
 * moe_route: ids and weights [n_tokens, route_width] of x [n_tokens, H] (ranked;
 * dense: all experts in order). */
enum moe_status moe_route(moe_model *m, uint32_t layer, const void *x, size_t n_tokens,
			  int32_t *ids, float *weights, const struct moe_fwd_opts *opts);

/* The raw sums behind the routing statistics, which add up over calls: the
 * sums of several moe_route_stats calls (chunks of a batch, the ranks of
 * expert parallelism, added in any order) give the statistics of the whole
 * batch. Caller-owned; zero it before the first call. */
struct moe_route_sums {
	double *importance; /* [E] sum over tokens of the router probability
			       (importance sparse: of the chosen slots' weights) */
	double *load;       /* [E] assignments per expert */
	double z_sum;       /* sum over tokens of logsumexp(logits)^2 */
	uint64_t n_tokens;
};

/* moe_route_stats: moe_route (the same ids and weights), and ADDS the sums of
 * these tokens into acc (acc->importance and acc->load [E] are required; a
 * failed call adds nothing). */
enum moe_status moe_route_stats(moe_model *m, uint32_t layer, const void *x, size_t n_tokens,
				int32_t *ids, float *weights, const struct moe_fwd_opts *opts,
				struct moe_route_sums *acc);

/* moe_routing_from_sums: counts, importance, importance_cv2, lb_loss and
 * z_loss of routing (each pointer optional; n_dropped 0; expert_ids and
 * weights are not written) from the sums, by the formulas of moe_forward:
 * counts exactly moe_forward's on the same tokens, the rest within rounding
 * (the sums' order differs). acc->n_tokens 0: all zero. */
enum moe_status moe_routing_from_sums(moe_model *m, uint32_t layer,
				      const struct moe_route_sums *acc,
				      struct moe_routing *routing);

/* moe_experts: rows_y[r] = expert(rows_x[r]) for n_rows f32 rows [n_rows, H]
 * grouped by expert: counts[j] rows of expert expert_begin + j, for j over the
 * model's range, in order. Each row's output is written, not accumulated, and
 * depends only on the row and its expert. rows_w: the routing weight of each
 * row when the model applies it to the input (else NULL; ignored). */
enum moe_status moe_experts(moe_model *m, uint32_t layer, const float *rows_x, size_t n_rows,
			    const int64_t *counts, const float *rows_w, float *rows_y);

/* moe_combine: y[t] = sum over slots k = 0..W-1, in that order, of
 * weights[t, k] * rows_y[slot_rows[t * W + k]] (slots with id < 0 or row < 0
 * add nothing; slot_rows NULL: rows_y is [n_tokens * W, H] in slot order),
 * then the shared experts of x[t] and the output bias. x may be NULL when the
 * model has no shared experts. */
enum moe_status moe_combine(moe_model *m, uint32_t layer, const void *x, size_t n_tokens,
			    const int32_t *ids, const float *weights, const float *rows_y,
			    const int64_t *slot_rows, void *y);

/* The message of this thread's last failure ("" when none). */
const char *moe_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
