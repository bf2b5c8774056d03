/* moe_ref.h: the reference forward pass, plain C, clarity over speed. It is the
 * oracle of every numeric test. It works on canonical f32 weights (shapes in
 * moe_desc.h, MOE_ROLES) and implements docs/semantics.md exactly, which states
 * each rule it follows. */
#ifndef MOE_REF_H
#define MOE_REF_H

#include "moe_desc.h" /* includes moe.h */

/* A short name of a status code ("bad argument"; enum moe_status is in moe.h). */
const char *moe_status_name(enum moe_status s);

/* A role kept quantized (moe_desc.qfmt of its matrix set) over its canonical
 * [rows, K] matrices, per-expert roles stacked: codes [rows * K] (int8: the
 * byte is a signed code; int4: 0..15, one per byte), scale and offset
 * [rows * K / group] (offset NULL for int8). */
struct moe_ref_qtensor {
	uint8_t *codes;
	float *scale, *offset;
	/* act-order (a GPTQ g_idx that is not k / group): [matrices, K], input
	 * perm[j] of a matrix is its column j of codes, so that its groups are
	 * contiguous (j / group); NULL when every matrix is in input order */
	int32_t *perm;
};

/* Canonical weights of one layer: one f32 array per role, NULL when unused.
 * Per-expert roles are E contiguous [rows, cols] blocks. A role kept
 * quantized also has q[role]; w[role] then holds the values it stands for
 * (moe_qdequant), which the reference uses. */
struct moe_ref_weights {
	float *w[MOE_ROLE_COUNT];
	struct moe_ref_qtensor q[MOE_ROLE_COUNT];
};

/* The format a role is kept in (kind none when it is not). */
struct moe_qfmt moe_ref_role_qfmt(const struct moe_desc *d, enum moe_role r);
/* out[n, k] = fl(code[n, k] * s[n, k / group]) + o[n, k / group] over rows
 * [rows, K], codes as in struct moe_ref_qtensor (offset NULL: 0). */
void moe_qdequant(const struct moe_qfmt *f, const uint8_t *codes, const float *scale,
		  const float *offset, uint64_t rows, uint64_t K, float *out);

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
/* The same fill in independent blocks (of at most 65536 elements of one role),
 * for threads: filling blocks 0 .. moe_ref_weights_random_blocks(d) - 1 in any
 * order, on any threads, gives exactly moe_ref_weights_random's values. */
size_t moe_ref_weights_random_blocks(const struct moe_desc *d);
void moe_ref_weights_random_block(const struct moe_desc *d, uint64_t seed, uint32_t layer,
				  struct moe_ref_weights *w, size_t block);

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
/* moe_ref_forward plus mag[n_tokens, H] (mag may be NULL): the sum of the
 * magnitudes of the terms each output element adds up (weighted slots, shared
 * expert, output bias; |y| for Soft MoE). An arithmetic that rounds each term
 * to relative u errs by about u * mag, however much the terms cancel in y. */
enum moe_status moe_ref_forward_mag(const struct moe_desc *d, const struct moe_ref_weights *w,
				    const float *x, float *y, float *mag, size_t n_tokens,
				    const struct moe_fwd_opts *opts, struct moe_routing *routing,
				    char *err, size_t err_cap);

/* max |y - y_ref| over the output's scale, max |y_ref|, or with mag (from
 * moe_ref_forward_mag) the larger of that and max mag: the measure of an
 * arithmetic that rounds each term (bf16 or int8 compute), whose error
 * follows the terms' magnitudes however much they cancel. bf16_out compares
 * with y_ref rounded to bf16 (bf16 activations). */
double moe_ref_out_err(const float *y, const float *yr, const float *mag, size_t n, int bf16_out);

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
