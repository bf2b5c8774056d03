/* moe_ref.h: the reference forward pass, plain C, clarity over speed. It is the
 * oracle of every numeric test. It works on canonical f32 weights (shapes in
 * moe_desc.h, MOE_ROLES) and implements docs/semantics.md exactly, which states
 * each rule it follows. */
#ifndef MOE_REF_H
#define MOE_REF_H

#include "moe_desc.h" /* includes moe.h */

/* A short name of a status code ("bad argument"; enum moe_status is in moe.h). */
const char *moe_status_name(enum moe_status s);

/* Canonical weights of one layer: one f32 array per role, NULL when unused.
 * Per-expert roles are E contiguous [rows, cols] blocks. */
struct moe_ref_weights {
	float *w[MOE_ROLE_COUNT];
};

/* Allocate (zeroed) every role the description uses / free them. */
enum moe_status moe_ref_weights_alloc(const struct moe_desc *d, struct moe_ref_weights *w);
void moe_ref_weights_free(struct moe_ref_weights *w);
/* Deterministic random weights for (seed, layer): uniform in +-1/sqrt(fan_in)
 * per role from a counter-based generator, so the value of element i of a role
 * depends only on (seed, layer, role, i). When the description's weight dtype
 * is bf16 or f16 the values are rounded to it, so every backend sees the same
 * numbers. */
void moe_ref_weights_random(const struct moe_desc *d, uint64_t seed, uint32_t layer,
			    struct moe_ref_weights *w);

/* PEER's query BatchNorm (eval mode, after the query projection) folded into
 * the projection: with s = gamma / sqrt(var + eps) per query channel i,
 * W'[i, :] = s_i W[i, :] and b'[i] = (b[i] - mean_i) s_i + beta_i (s in double,
 * rounded once). Writes W' [Q, H] and b' [Q] (caller-owned) from w's PK_QUERY,
 * PK_QUERY_BIAS and PK_BN_* roles. Returns -1, or the first channel whose
 * var + eps is not positive (or whose s is not finite): the weights are bad.
 * The reference and the CPU packing both fold with it. */
int64_t moe_pk_fold_bn(const struct moe_desc *d, const struct moe_ref_weights *w, float *W,
		       float *b);

/* struct moe_fwd_opts and struct moe_routing (the public ABI, moe.h) are the
 * reference's options and routing output too. */

/* y[n_tokens, H] = MoE(x[n_tokens, H]) for one layer. n_tokens may be 0.
 * Returns MOE_ERR_INPUT on non-finite x, MOE_ERR_ARG on NULL pointers or an
 * invalid description, MOE_ERR_NOMEM. `err` (optional, cap bytes) receives a
 * message on failure. */
enum moe_status moe_ref_forward(const struct moe_desc *d, const struct moe_ref_weights *w,
				const float *x, float *y, size_t n_tokens,
				const struct moe_fwd_opts *opts, struct moe_routing *routing,
				char *err, size_t err_cap);

/* Scalar helpers every backend must agree with (exposed for tests). */
float moe_ref_act(enum moe_act a, float alpha, float limit, float x);
float moe_bf16_round(float x); /* round to nearest even, keep NaN */
float moe_f16_round(float x);
uint16_t moe_f32_to_bf16(float x);
float moe_bf16_to_f32(uint16_t h);
uint16_t moe_f32_to_f16(float x);
float moe_f16_to_f32(uint16_t h);

/* Counter-based random numbers (SplitMix64 finalizer over a key). */
uint64_t moe_rng_hash(uint64_t seed, uint64_t a, uint64_t b, uint64_t c);
float moe_rng_uniform(uint64_t h); /* [0, 1) from 24 high bits */
float moe_rng_normal(uint64_t seed, uint64_t a, uint64_t b, uint64_t c); /* Box-Muller */

#endif
