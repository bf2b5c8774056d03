/* ref_util.c: the scalar pieces every backend must agree with: status names,
 * canonical weight buffers and their deterministic random fill, the
 * counter-based generator, bf16/f16 rounding and the expert activations.
 * The forward pass that uses them is ref.c. */
#include "moe_mem.h"
#include "moe_ref.h"
#include "ref_quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const status_names[MOE_STATUS_COUNT] = {
    [MOE_OK] = "ok",
    [MOE_ERR_ARG] = "bad argument",
    [MOE_ERR_INPUT] = "bad input",
    [MOE_ERR_NOMEM] = "out of memory",
    [MOE_ERR_WEIGHTS] = "bad weights",
    [MOE_ERR_IO] = "I/O error",
    [MOE_ERR_UNSUPPORTED] = "unsupported",
    [MOE_ERR_DEVICE] = "device error",
    [MOE_ERR_BUSY] = "busy",
    [MOE_ERR_INTERNAL] = "internal error",
};

const char *moe_status_name(enum moe_status s)
{
	if ((unsigned)s >= MOE_STATUS_COUNT)
		return "unknown status";
	return status_names[s];
}

/* Elements of a role's canonical tensor, 0 when unused or when the count does
 * not fit in size_t. */
static size_t role_elems(const struct moe_desc *d, enum moe_role r)
{
	uint64_t rows, cols;
	int pe;
	if (!moe_desc_role_shape(d, r, &rows, &cols, &pe))
		return 0;
	uint64_t n = rows;
	if (cols && n > UINT64_MAX / cols)
		return 0;
	n *= cols;
	if (pe) {
		if (d->n_experts && n > UINT64_MAX / d->n_experts)
			return 0;
		n *= d->n_experts;
	}
	if (n == 0 || n > SIZE_MAX / sizeof(float))
		return 0;
	return (size_t)n;
}

enum moe_status moe_ref_weights_alloc(const struct moe_desc *d, struct moe_ref_weights *w)
{
	if (!d || !w)
		return MOE_ERR_ARG;
	memset(w, 0, sizeof *w);
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		uint64_t rows, cols;
		if (!moe_desc_role_shape(d, (enum moe_role)r, &rows, &cols, NULL))
			continue;
		size_t n = role_elems(d, (enum moe_role)r);
		if (!n) {
			moe_ref_weights_free(w);
			return MOE_ERR_ARG; /* used role of zero or unrepresentable size */
		}
		w->w[r] = n > SIZE_MAX / sizeof(float) ? NULL : moe_big_alloc(n * sizeof(float), 1);
		if (!w->w[r]) {
			moe_ref_weights_free(w);
			return MOE_ERR_NOMEM;
		}
	}
	if (moe_ref_quant_alloc(d, w) != MOE_OK) {
		moe_ref_weights_free(w);
		return MOE_ERR_NOMEM;
	}
	return MOE_OK;
}

void moe_ref_weights_free(struct moe_ref_weights *w)
{
	if (!w)
		return;
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		free(w->w[r]);
		w->w[r] = NULL;
	}
	moe_ref_quant_free(w);
}

static int is_bias_role(enum moe_role r)
{
	switch (r) {
	case MOE_ROLE_ROUTER_BIAS:
	case MOE_ROLE_SELECT_BIAS:
	case MOE_ROLE_GATE_BIAS:
	case MOE_ROLE_UP_BIAS:
	case MOE_ROLE_DOWN_BIAS:
	case MOE_ROLE_PK_QUERY_BIAS:
	case MOE_ROLE_OUTPUT_BIAS:
	case MOE_ROLE_PK_BN_BIAS:
	case MOE_ROLE_PK_BN_MEAN:
		return 1;
	default:
		return 0;
	}
}

static float round_to_dtype(enum moe_dtype t, float v)
{
	if (t == MOE_DTYPE_BF16)
		return moe_bf16_round(v);
	if (t == MOE_DTYPE_F16)
		return moe_f16_round(v);
	return v;
}

/* Elements per block of moe_ref_weights_random_block. */
#define RANDOM_BLOCK ((size_t)1 << 16)

size_t moe_ref_weights_random_blocks(const struct moe_desc *d)
{
	size_t n = 0;
	for (int r = 0; d && r < MOE_ROLE_COUNT; r++)
		n += (role_elems(d, (enum moe_role)r) + RANDOM_BLOCK - 1) / RANDOM_BLOCK;
	return n;
}

void moe_ref_weights_random_block(const struct moe_desc *d, uint64_t seed, uint32_t layer,
				  struct moe_ref_weights *w, size_t block)
{
	if (!d || !w)
		return;
	int r = 0;
	size_t n = 0;
	for (; r < MOE_ROLE_COUNT; r++) { /* the role holding the block */
		n = role_elems(d, (enum moe_role)r);
		size_t nb = (n + RANDOM_BLOCK - 1) / RANDOM_BLOCK;
		if (block < nb)
			break;
		block -= nb;
	}
	if (r == MOE_ROLE_COUNT || !w->w[r] || w->q[r].codes)
		return; /* quantized roles: moe_ref_quant_random draws them */
	uint64_t rows, cols;
	if (!moe_desc_role_shape(d, (enum moe_role)r, &rows, &cols, NULL))
		return;
	float *p = w->w[r];
	size_t i0 = block * RANDOM_BLOCK, i1 = n - i0 < RANDOM_BLOCK ? n : i0 + RANDOM_BLOCK;
	if (r == MOE_ROLE_SOFT_SCALE) {
		for (size_t i = i0; i < i1; i++)
			p[i] = 1.0f;
		return;
	}
	/* fan-in bound for matrices keeps every layer's output O(|x|); a
	 * BatchNorm's gamma and variance, Soft MoE's channel scale in [0.5, 1.5) */
	int around_one =
	    r == MOE_ROLE_PK_BN_WEIGHT || r == MOE_ROLE_PK_BN_VAR || r == MOE_ROLE_SOFT_GAMMA;
	double a = is_bias_role((enum moe_role)r) ? 0.1
		   : around_one                   ? 0.5
						  : 1.0 / sqrt((double)cols);
	for (size_t i = i0; i < i1; i++) {
		float u = moe_rng_uniform(moe_rng_hash(seed, layer, (uint64_t)r, i));
		float v = (float)((2.0 * u - 1.0) * a + around_one);
		p[i] = round_to_dtype(d->weight_dtype, v);
	}
}

void moe_ref_weights_random(const struct moe_desc *d, uint64_t seed, uint32_t layer,
			    struct moe_ref_weights *w)
{
	size_t nb = moe_ref_weights_random_blocks(d);
	for (size_t b = 0; b < nb; b++)
		moe_ref_weights_random_block(d, seed, layer, w, b);
	moe_ref_quant_random(d, seed, layer, w);
}

int64_t moe_pk_fold_bn(const struct moe_desc *d, const struct moe_ref_weights *w, float *W,
		       float *b)
{
	uint64_t Q = (uint64_t)d->pk_heads * d->pk_query_dim, H = d->hidden;
	const float *W0 = w->w[MOE_ROLE_PK_QUERY], *b0 = w->w[MOE_ROLE_PK_QUERY_BIAS];
	const float *g = w->w[MOE_ROLE_PK_BN_WEIGHT], *be = w->w[MOE_ROLE_PK_BN_BIAS];
	const float *mu = w->w[MOE_ROLE_PK_BN_MEAN], *var = w->w[MOE_ROLE_PK_BN_VAR];
	for (uint64_t i = 0; i < Q; i++) {
		double v = (double)var[i] + (double)d->pk_bn_eps;
		double s = v > 0.0 ? (double)g[i] / sqrt(v) : NAN;
		if (!isfinite(s))
			return (int64_t)i;
		for (uint64_t h = 0; h < H; h++)
			W[i * H + h] = (float)(s * (double)W0[i * H + h]);
		b[i] = (float)(((double)b0[i] - (double)mu[i]) * s + (double)be[i]);
	}
	return -1;
}

/* SplitMix64 finalizer; each key word is folded in and re-mixed so that
 * (seed, a, b, c) tuples differing in any word give unrelated outputs. */
static uint64_t mix64(uint64_t z)
{
	z += 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

uint64_t moe_rng_hash(uint64_t seed, uint64_t a, uint64_t b, uint64_t c)
{
	uint64_t h = mix64(seed);
	h = mix64(h ^ a);
	h = mix64(h ^ b);
	return mix64(h ^ c);
}

float moe_rng_uniform(uint64_t h)
{
	return (float)(h >> 40) * 0x1p-24f;
}

float moe_rng_normal(uint64_t seed, uint64_t a, uint64_t b, uint64_t c)
{
	double u1 = moe_rng_uniform(moe_rng_hash(seed, a, b, c));
	double u2 = moe_rng_uniform(moe_rng_hash(seed, a, b, c ^ (1ull << 63)));
	/* 1 - u1 lies in (0, 1], so the logarithm is finite */
	double r = sqrt(-2.0 * log(1.0 - u1));
	return (float)(r * cos(2.0 * M_PI * u2));
}

static uint32_t f32_bits(float x)
{
	uint32_t u;
	memcpy(&u, &x, sizeof u);
	return u;
}

static float bits_f32(uint32_t u)
{
	float x;
	memcpy(&x, &u, sizeof x);
	return x;
}

uint16_t moe_f32_to_bf16(float x)
{
	uint32_t u = f32_bits(x);
	if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep sign and top payload, force quiet */
		return (uint16_t)((u >> 16) | 0x0040u);
	u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even; overflows to inf */
	return (uint16_t)(u >> 16);
}

float moe_bf16_to_f32(uint16_t h)
{
	return bits_f32((uint32_t)h << 16);
}

float moe_bf16_round(float x)
{
	return moe_bf16_to_f32(moe_f32_to_bf16(x));
}

/* Shift m right by s >= 1 bits, rounding to nearest with ties to even. */
static uint32_t shift_rne(uint32_t m, unsigned s)
{
	if (s >= 32)
		return 0;
	uint32_t q = m >> s, rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
	if (rem > half || (rem == half && (q & 1u)))
		q++;
	return q;
}

uint16_t moe_f32_to_f16(float x)
{
	uint32_t u = f32_bits(x);
	uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
	uint32_t exp = (u >> 23) & 0xffu, man = u & 0x7fffffu;
	if (exp == 0xff) {
		if (man) /* NaN: quiet, keep the top payload bits */
			return (uint16_t)(sign | 0x7e00u | (man >> 13));
		return (uint16_t)(sign | 0x7c00u);
	}
	int e = (int)exp - 127;
	if (e > 15)
		return (uint16_t)(sign | 0x7c00u);
	if (e >= -14) {
		/* normal: a carry out of the mantissa bumps the exponent, up to inf */
		uint32_t v = ((uint32_t)(e + 15) << 23 | man);
		return (uint16_t)(sign | shift_rne(v, 13));
	}
	if (exp == 0)
		return sign; /* f32 subnormals are far below the f16 range */
	/* subnormal: value = (man | 1 << 23) * 2^(e - 23), f16 unit 2^-24 */
	uint32_t q = shift_rne(man | 0x800000u, (unsigned)(-e - 1));
	return (uint16_t)(sign | q); /* q == 0x400 is the smallest normal, encoded alike */
}

float moe_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
	if (exp == 0x1f)
		return bits_f32(sign | 0x7f800000u | (man << 13));
	if (exp == 0) {
		float v = ldexpf((float)man, -24);
		return sign ? -v : v;
	}
	return bits_f32(sign | ((exp - 15 + 127) << 23) | (man << 13));
}

float moe_f16_round(float x)
{
	return moe_f16_to_f32(moe_f32_to_f16(x));
}

/* Activations are evaluated in double and rounded once to f32. swiglu_oai
 * here is the gate half only, min(x, limit) * sigmoid(alpha * min(x, limit));
 * the expert multiplies it by clamp(up, -limit, limit) + 1. */
float moe_ref_act(enum moe_act a, float alpha, float limit, float x)
{
	double v = x;
	switch (a) {
	case MOE_ACT_SILU:
		return (float)(v / (1.0 + exp(-v)));
	case MOE_ACT_GELU:
		return (float)(0.5 * v * (1.0 + erf(v / sqrt(2.0))));
	case MOE_ACT_GELU_TANH: {
		double c = sqrt(2.0 / M_PI);
		return (float)(0.5 * v * (1.0 + tanh(c * (v + 0.044715 * v * v * v))));
	}
	case MOE_ACT_RELU:
		return x > 0.0f ? x : 0.0f;
	case MOE_ACT_SWIGLU_OAI: {
		double g = v < (double)limit ? v : (double)limit;
		return (float)(g / (1.0 + exp(-(double)alpha * g)));
	}
	default:
		return x;
	}
}

double moe_ref_out_err(const float *y, const float *yr, const float *mag, size_t n, int bf16_out)
{
	double scale = 0.0, emax = 0.0;
	for (size_t i = 0; i < n; i++) {
		double r = bf16_out ? moe_bf16_round(yr[i]) : yr[i];
		double s = mag && mag[i] > fabs(r) ? mag[i] : fabs(r), e = fabs(y[i] - r);
		scale = s > scale ? s : scale;
		emax = e > emax || e != e ? e : emax; /* a NaN output stays NaN */
	}
	return scale > 0.0 ? emax / scale : emax;
}
