/* test_ref.c: the reference forward pass against hand-derived closed forms
 * (one tiny case per router mode and family), metamorphic relations between
 * modes, bad input, and the scalar helpers (RNG, bf16/f16, activations).
 * Expected values are computed here in double, independently of ref.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_ref.h"

#define MAXD 256 /* largest H or expert width in these tests */

/* ---- test-side helpers, independent of ref.c ---- */

static uint64_t lcg = 1;

static void lcg_seed(uint64_t s)
{
	lcg = s * 2654435761u + 12345;
}

/* uniform in [-1, 1) */
static float frand(void)
{
	lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
	return (float)((double)(lcg >> 11) * 0x1p-53 * 2.0 - 1.0);
}

static void fill_rand(float *p, size_t n, float amp)
{
	for (size_t i = 0; i < n; i++)
		p[i] = amp * frand();
}

static void base_desc(struct moe_desc *d, uint32_t H, uint32_t E, uint32_t I, uint32_t k)
{
	memset(d, 0, sizeof *d);
	d->version = MOE_DESC_VERSION;
	strcpy(d->name, "test");
	d->hidden = H;
	d->n_layers = 1;
	d->n_moe_layers = 1;
	d->weight_dtype = MOE_DTYPE_F32;
	d->act_dtype = MOE_DTYPE_F32;
	d->mode = MOE_MODE_TOKEN_CHOICE;
	d->score = MOE_SCORE_SOFTMAX;
	d->top_k = k;
	d->norm = MOE_NORM_NONE;
	d->scale = 1.0f;
	d->n_groups = 1;
	d->group_top = 1;
	d->kind = MOE_KIND_GLU;
	d->n_experts = E;
	d->intermediate = I;
	d->act = MOE_ACT_SILU;
	d->act_alpha = 1.702f;
	d->act_limit = 7.0f;
	d->split = 1;
	d->shared_kind = MOE_KIND_GLU;
	d->shared_act = MOE_ACT_SILU;
}

static void weights_make(const struct moe_desc *d, struct moe_ref_weights *w, uint64_t seed)
{
	assert_int_equal(moe_ref_weights_alloc(d, w), MOE_OK);
	moe_ref_weights_random(d, seed, 0, w);
}

/* Router [E, H] with H == E as the identity: the logits are x itself. */
static void router_identity(const struct moe_desc *d, struct moe_ref_weights *w)
{
	assert_int_equal(d->hidden, d->n_experts);
	float *r = w->w[MOE_ROLE_ROUTER];
	for (uint32_t e = 0; e < d->n_experts; e++)
		for (uint32_t h = 0; h < d->hidden; h++)
			r[e * d->hidden + h] = e == h ? 1.0f : 0.0f;
}

static double sigm(double v)
{
	return 1.0 / (1.0 + exp(-v));
}

static double t_act(enum moe_act a, double v, double alpha, double limit)
{
	switch (a) {
	case MOE_ACT_SILU:
		return v / (1.0 + exp(-v));
	case MOE_ACT_GELU:
		return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
	case MOE_ACT_GELU_TANH:
		return 0.5 * v * (1.0 + tanh(sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
	case MOE_ACT_RELU:
		return v > 0.0 ? v : 0.0;
	default: {
		double g = fmin(v, limit);
		return g * sigm(alpha * g);
	}
	}
}

/* Expert e (e < 0: the shared expert) on x[H], in double. Returns the largest
 * gate pre-activation seen (to show clamps are exercised). */
static double t_expert(const struct moe_desc *d, const struct moe_ref_weights *w, long e,
		       const double *x, double *out)
{
	uint32_t H = d->hidden;
	double gmax = -INFINITY;
	if (e >= 0 && d->kind == MOE_KIND_SINGLE_NEURON) {
		const float *u = w->w[MOE_ROLE_NEURON_U] + (size_t)e * H;
		const float *v = w->w[MOE_ROLE_NEURON_V] + (size_t)e * H;
		double s = 0.0;
		for (uint32_t h = 0; h < H; h++)
			s += (double)u[h] * x[h];
		double a = t_act(d->act, s, d->act_alpha, d->act_limit);
		for (uint32_t h = 0; h < H; h++)
			out[h] = a * v[h];
		return gmax;
	}
	int sh = e < 0;
	uint32_t I = sh ? d->shared_count * d->shared_intermediate : d->intermediate;
	enum moe_kind kind = sh ? d->shared_kind : d->kind;
	enum moe_act act = sh ? d->shared_act : d->act;
	size_t eo = sh ? 0 : (size_t)e;
	const float *G = w->w[sh ? MOE_ROLE_SHARED_GATE : MOE_ROLE_GATE];
	const float *U = w->w[sh ? MOE_ROLE_SHARED_UP : MOE_ROLE_UP];
	const float *D = w->w[sh ? MOE_ROLE_SHARED_DOWN : MOE_ROLE_DOWN];
	int bias = !sh && d->expert_bias;
	double a[MAXD];
	assert_true(I <= MAXD && H <= MAXD);
	for (uint32_t i = 0; i < I; i++) {
		double u = 0.0, g = 0.0;
		for (uint32_t h = 0; h < H; h++)
			u += (double)U[(eo * I + i) * H + h] * x[h];
		if (bias)
			u += w->w[MOE_ROLE_UP_BIAS][eo * I + i];
		if (kind != MOE_KIND_GLU) {
			a[i] = t_act(act, u, d->act_alpha, d->act_limit);
			continue;
		}
		for (uint32_t h = 0; h < H; h++)
			g += (double)G[(eo * I + i) * H + h] * x[h];
		if (bias)
			g += w->w[MOE_ROLE_GATE_BIAS][eo * I + i];
		gmax = fmax(gmax, g);
		if (act == MOE_ACT_SWIGLU_OAI) {
			double lim = d->act_limit;
			double gg = fmin(g, lim), uc = fmax(-lim, fmin(u, lim));
			a[i] = gg * sigm(d->act_alpha * gg) * (uc + 1.0);
		} else {
			a[i] = t_act(act, g, 0, 0) * u;
		}
	}
	for (uint32_t h = 0; h < H; h++) {
		double s = 0.0;
		for (uint32_t i = 0; i < I; i++)
			s += (double)D[(eo * H + h) * I + i] * a[i];
		if (bias)
			s += w->w[MOE_ROLE_DOWN_BIAS][eo * H + h];
		out[h] = s;
	}
	return gmax;
}

/* Output of one token given its chosen experts and weights (ids < 0 skipped),
 * plus the shared expert. */
static void t_token(const struct moe_desc *d, const struct moe_ref_weights *w, const float *xf,
		    int n, const int *ids, const double *wts, double *y)
{
	uint32_t H = d->hidden;
	double x[MAXD] = {0}, xin[MAXD] = {0}, out[MAXD] = {0};
	for (uint32_t h = 0; h < H; h++)
		x[h] = xf[h], y[h] = 0.0;
	for (int j = 0; j < n; j++) {
		if (ids[j] < 0)
			continue;
		if (d->apply_to == MOE_APPLY_INPUT) {
			for (uint32_t h = 0; h < H; h++)
				xin[h] = wts[j] * x[h];
			t_expert(d, w, ids[j], xin, out);
			for (uint32_t h = 0; h < H; h++)
				y[h] += out[h];
		} else {
			t_expert(d, w, ids[j], x, out);
			for (uint32_t h = 0; h < H; h++)
				y[h] += wts[j] * out[h];
		}
	}
	if (d->shared_count) {
		double g = 1.0;
		t_expert(d, w, -1, x, out);
		if (d->shared_gate == MOE_SHARED_GATE_SIGMOID) {
			double s = 0.0;
			for (uint32_t h = 0; h < H; h++)
				s += (double)w->w[MOE_ROLE_SHARED_EXPERT_GATE][h] * x[h];
			g = sigm(s);
		}
		for (uint32_t h = 0; h < H; h++)
			y[h] += g * out[h];
	}
}

static void t_logits(const struct moe_desc *d, const struct moe_ref_weights *w, const float *x,
		     double *l)
{
	for (uint32_t e = 0; e < d->n_experts; e++) {
		double s = 0.0;
		for (uint32_t h = 0; h < d->hidden; h++)
			s += (double)w->w[MOE_ROLE_ROUTER][e * d->hidden + h] * x[h];
		if (d->router_bias)
			s += w->w[MOE_ROLE_ROUTER_BIAS][e];
		l[e] = s;
	}
}

static void t_softmax(const double *l, double *p, int n)
{
	double m = -INFINITY, s = 0.0;
	for (int i = 0; i < n; i++)
		m = fmax(m, l[i]);
	for (int i = 0; i < n; i++)
		s += exp(l[i] - m);
	for (int i = 0; i < n; i++)
		p[i] = exp(l[i] - m) / s;
}

/* Indices of v sorted by value descending, ties to the lower index. */
static void t_argsort(const double *v, int n, int *idx)
{
	for (int i = 0; i < n; i++)
		idx[i] = i;
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && v[idx[j]] > v[idx[j - 1]]; j--) {
			int t = idx[j];
			idx[j] = idx[j - 1];
			idx[j - 1] = t;
		}
}

/* max |y - e| <= tol * max(max |e|, 1e-3) */
static void check_close(const float *y, const double *e, size_t n, double tol)
{
	double scale = 1e-3, worst = 0.0;
	size_t wi = 0;
	for (size_t i = 0; i < n; i++)
		scale = fmax(scale, fabs(e[i]));
	for (size_t i = 0; i < n; i++) {
		double err = fabs((double)y[i] - e[i]);
		if (!(err <= worst))
			worst = err, wi = i;
	}
	if (!(worst <= tol * scale))
		fail_msg("element %zu: got %.9g expected %.9g (err %.3g, scale %.3g)", wi,
			 (double)y[wi], e[wi], worst, scale);
}

static void check_close_f(const float *y, const float *e, size_t n, double tol)
{
	double *ed = malloc(n * sizeof *ed);
	for (size_t i = 0; i < n; i++)
		ed[i] = e[i];
	check_close(y, ed, n, tol);
	free(ed);
}

static enum moe_status fwd(const struct moe_desc *d, const struct moe_ref_weights *w,
			   const float *x, float *y, size_t T, struct moe_routing *r)
{
	char err[256];
	enum moe_status st = moe_ref_forward(d, w, x, y, T, NULL, r, err, sizeof err);
	if (st != MOE_OK)
		fail_msg("forward failed: %s: %s", moe_status_name(st), err);
	return st;
}

/* ---- scalar helpers ---- */

static void test_act_closed_forms(void **state)
{
	(void)state;
	const float xs[] = {-9.0f, -3.0f, -0.5f, 0.0f, 0.7f, 2.5f, 6.9f, 8.0f, 30.0f};
	for (size_t i = 0; i < sizeof xs / sizeof *xs; i++) {
		double v = xs[i];
		double ex[5] = {
		    v / (1.0 + exp(-v)),
		    0.5 * v * (1.0 + erf(v / sqrt(2.0))),
		    0.5 * v * (1.0 + tanh(sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v))),
		    v > 0 ? v : 0,
		    fmin(v, 7.0) / (1.0 + exp(-1.702 * fmin(v, 7.0))),
		};
		enum moe_act acts[5] = {MOE_ACT_SILU, MOE_ACT_GELU, MOE_ACT_GELU_TANH, MOE_ACT_RELU,
					MOE_ACT_SWIGLU_OAI};
		for (int a = 0; a < 5; a++) {
			float got = moe_ref_act(acts[a], 1.702f, 7.0f, xs[i]);
			if (!(fabs(got - ex[a]) <= 1e-6 * fabs(ex[a]) + 1e-30))
				fail_msg("act %s(%g) = %.9g, expected %.9g", moe_act_names[acts[a]],
					 v, (double)got, ex[a]);
		}
	}
}

static void test_status_names(void **state)
{
	(void)state;
	for (int s = 0; s < MOE_STATUS_COUNT; s++) {
		const char *n = moe_status_name((enum moe_status)s);
		assert_non_null(n);
		assert_true(strlen(n) > 0);
		for (int t = 0; t < s; t++)
			assert_string_not_equal(n, moe_status_name((enum moe_status)t));
	}
	assert_string_equal(moe_status_name((enum moe_status)999), "unknown status");
}

static void test_rng(void **state)
{
	(void)state;
	assert_true(moe_rng_hash(1, 2, 3, 4) == moe_rng_hash(1, 2, 3, 4));
	assert_true(moe_rng_hash(1, 2, 3, 4) != moe_rng_hash(2, 2, 3, 4));
	assert_true(moe_rng_hash(1, 2, 3, 4) != moe_rng_hash(1, 3, 3, 4));
	assert_true(moe_rng_hash(1, 2, 3, 4) != moe_rng_hash(1, 2, 4, 4));
	assert_true(moe_rng_hash(1, 2, 3, 4) != moe_rng_hash(1, 2, 3, 5));
	/* swapping key words must change the output too */
	assert_true(moe_rng_hash(1, 2, 3, 4) != moe_rng_hash(1, 3, 2, 4));
	/* uniform: exact 24-bit grid in [0, 1) */
	assert_true(moe_rng_uniform(0) == 0.0f);
	assert_true(moe_rng_uniform(UINT64_MAX) == (float)(0xffffff) / 16777216.0f);
	assert_true(moe_rng_uniform(1ull << 40) == 0x1p-24f);
	double sum = 0, sum2 = 0, nsum = 0, nsum2 = 0;
	int n = 20000, inrange = 1;
	for (int i = 0; i < n; i++) {
		float u = moe_rng_uniform(moe_rng_hash(7, 0, 0, (uint64_t)i));
		inrange &= u >= 0.0f && u < 1.0f;
		sum += u, sum2 += (double)u * u;
		float z = moe_rng_normal(7, 1, 2, (uint64_t)i);
		assert_true(isfinite(z));
		nsum += z, nsum2 += (double)z * z;
	}
	assert_true(inrange);
	assert_true(fabs(sum / n - 0.5) < 0.01);
	assert_true(fabs(sum2 / n - 1.0 / 3.0) < 0.01);
	assert_true(fabs(nsum / n) < 0.03);
	assert_true(fabs(nsum2 / n - 1.0) < 0.05);
	assert_true(moe_rng_normal(3, 1, 2, 3) == moe_rng_normal(3, 1, 2, 3));
}

static uint32_t fbits(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	return u;
}

static float bitsf(uint32_t u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}

static void test_bf16(void **state)
{
	(void)state;
	/* exact values keep their top 16 bits */
	assert_int_equal(moe_f32_to_bf16(1.0f), 0x3f80);
	assert_int_equal(moe_f32_to_bf16(-2.0f), 0xc000);
	assert_int_equal(moe_f32_to_bf16(-0.0f), 0x8000);
	/* below half, above half, ties to even (even low bit stays, odd rounds up) */
	assert_int_equal(moe_f32_to_bf16(bitsf(0x3f807fffu)), 0x3f80);
	assert_int_equal(moe_f32_to_bf16(bitsf(0x3f808001u)), 0x3f81);
	assert_int_equal(moe_f32_to_bf16(bitsf(0x3f808000u)), 0x3f80);
	assert_int_equal(moe_f32_to_bf16(bitsf(0x3f818000u)), 0x3f82);
	/* carry into the exponent; overflow to infinity */
	assert_int_equal(moe_f32_to_bf16(bitsf(0x3fffffffu)), 0x4000);
	assert_int_equal(moe_f32_to_bf16(bitsf(0x7f7fffffu)), 0x7f80);
	assert_int_equal(moe_f32_to_bf16(INFINITY), 0x7f80);
	assert_int_equal(moe_f32_to_bf16(-INFINITY), 0xff80);
	/* subnormals round like anything else */
	assert_int_equal(moe_f32_to_bf16(bitsf(0x00008000u)), 0x0000);
	assert_int_equal(moe_f32_to_bf16(bitsf(0x00018000u)), 0x0002);
	/* NaN stays NaN, also a signalling NaN whose payload is in the low bits */
	uint16_t n1 = moe_f32_to_bf16(bitsf(0x7f800001u));
	assert_true((n1 & 0x7f80) == 0x7f80 && (n1 & 0x7f) != 0);
	uint16_t n2 = moe_f32_to_bf16(bitsf(0xffc00000u));
	assert_true((n2 & 0xff80) == 0xff80 && (n2 & 0x7f) != 0);
	assert_true(isnan(moe_bf16_round(NAN)));
	/* widening is a shift; every non-NaN bf16 round-trips */
	for (uint32_t h = 0; h < 65536; h++) {
		float f = moe_bf16_to_f32((uint16_t)h);
		assert_true(fbits(f) == h << 16);
		if (!isnan(f))
			assert_int_equal(moe_f32_to_bf16(f), h);
	}
	assert_true(moe_bf16_round(1.00390625f) == 1.0f);      /* 1 + 2^-8: tie, even */
	assert_true(moe_bf16_round(1.01171875f) == 1.015625f); /* 1 + 3*2^-8: tie, up */
}

/* Nearest f16 value of x by arithmetic (ties to even via rint), as a double. */
static double f16_nearest(double x)
{
	double a = fabs(x);
	if (a >= 65520.0)
		return copysign(INFINITY, x);
	int e;
	frexp(a, &e); /* a = m * 2^e, m in [0.5, 1) */
	int ex = e - 1;
	if (ex < -14)
		ex = -14; /* subnormal spacing 2^-24 */
	double ulp = ldexp(1.0, ex - 10);
	return copysign(rint(a / ulp) * ulp, x);
}

static void test_f16(void **state)
{
	(void)state;
	assert_int_equal(moe_f32_to_f16(1.0f), 0x3c00);
	assert_int_equal(moe_f32_to_f16(-2.0f), 0xc000);
	assert_int_equal(moe_f32_to_f16(-0.0f), 0x8000);
	assert_int_equal(moe_f32_to_f16(65504.0f), 0x7bff);
	assert_int_equal(moe_f32_to_f16(65519.0f), 0x7bff);
	assert_int_equal(moe_f32_to_f16(65520.0f), 0x7c00); /* tie with an odd mantissa: up */
	assert_int_equal(moe_f32_to_f16(1e10f), 0x7c00);
	assert_int_equal(moe_f32_to_f16(-INFINITY), 0xfc00);
	assert_int_equal(moe_f32_to_f16(0x1p-24f), 0x0001);
	assert_int_equal(moe_f32_to_f16(0x1p-25f), 0x0000);           /* tie: even */
	assert_int_equal(moe_f32_to_f16(0x1.8p-25f), 0x0001);         /* above the tie */
	assert_int_equal(moe_f32_to_f16(0x3p-24f * 0.5f), 0x0002);    /* 1.5 ulp: tie, up */
	assert_int_equal(moe_f32_to_f16(1023.5f * 0x1p-24f), 0x0400); /* into the normals */
	assert_int_equal(moe_f32_to_f16(0x1p-14f), 0x0400);
	assert_int_equal(moe_f32_to_f16(bitsf(0x00000001u)), 0x0000); /* f32 subnormal */
	assert_int_equal(moe_f32_to_f16(-0x1p-30f), 0x8000);
	assert_int_equal(moe_f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie: even */
	assert_int_equal(moe_f32_to_f16(1.0f + 0x3p-11f), 0x3c02); /* tie: up to even */
	uint16_t n = moe_f32_to_f16(bitsf(0x7f800001u));
	assert_true((n & 0x7c00) == 0x7c00 && (n & 0x3ff) != 0);
	/* widening by bits: sign, exponent rebias, mantissa shift, subnormal scale */
	assert_true(fbits(moe_f16_to_f32(0x0001)) == (103u << 23));
	assert_true(fbits(moe_f16_to_f32(0x8000)) == 0x80000000u);
	assert_true(fbits(moe_f16_to_f32(0x3c00)) == 0x3f800000u);
	assert_true(fbits(moe_f16_to_f32(0x7bff)) == ((142u << 23) | (0x3ffu << 13)));
	assert_true(fbits(moe_f16_to_f32(0x03ff)) == ((112u << 23) | (0x3feu << 13)));
	assert_true(fbits(moe_f16_to_f32(0x7c00)) == 0x7f800000u);
	assert_true(isnan(moe_f16_to_f32(0x7e00)));
	/* every non-NaN f16 round-trips */
	for (uint32_t h = 0; h < 65536; h++) {
		float f = moe_f16_to_f32((uint16_t)h);
		if (isnan(f))
			assert_true((h & 0x7c00) == 0x7c00 && (h & 0x3ff));
		else
			assert_int_equal(moe_f32_to_f16(f), h);
	}
	/* random floats over the whole f16 range against rint-based rounding */
	lcg_seed(99);
	for (int i = 0; i < 200000; i++) {
		double mag = ldexp(1.0 + 0.5 * (frand() + 1.0), (int)(frand() * 22.0) - 6);
		float x = (float)(frand() < 0 ? -mag : mag);
		if (i % 3 == 0)
			x = (float)ldexp(frand(), -14 - (i % 12)); /* subnormal range */
		double want = f16_nearest(x);
		float got = moe_f16_round(x);
		if ((double)got != want)
			fail_msg("f16 round of %a: got %a want %a", (double)x, (double)got, want);
	}
}

static void test_weights_random(void **state)
{
	(void)state;
	struct moe_desc d;
	base_desc(&d, 6, 4, 5, 2);
	d.router_bias = 1;
	d.select_bias = 1;
	d.expert_bias = 1;
	d.shared_count = 1;
	d.shared_intermediate = 3;
	struct moe_ref_weights w, w2, w3;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	assert_int_equal(moe_ref_weights_alloc(&d, &w2), MOE_OK);
	assert_int_equal(moe_ref_weights_alloc(&d, &w3), MOE_OK);
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		uint64_t rows, cols;
		int used = moe_desc_role_shape(&d, (enum moe_role)r, &rows, &cols, NULL);
		assert_int_equal(used, w.w[r] != NULL);
	}
	assert_null(w.w[MOE_ROLE_NOISE]);
	assert_null(w.w[MOE_ROLE_SOFT_SLOTS]);
	/* alloc zeroes */
	assert_true(w.w[MOE_ROLE_DOWN][4 * 6 * 5 - 1] == 0.0f);
	moe_ref_weights_random(&d, 42, 3, &w);
	moe_ref_weights_random(&d, 42, 3, &w2);
	moe_ref_weights_random(&d, 42, 4, &w3);
	/* down [E, H, I]: fan-in I = 5; element i from hash(seed, layer, role, i) */
	const float *down = w.w[MOE_ROLE_DOWN];
	for (size_t i = 0; i < 4 * 6 * 5; i++) {
		float u = moe_rng_uniform(moe_rng_hash(42, 3, MOE_ROLE_DOWN, i));
		float want = (float)((2.0 * u - 1.0) / sqrt(5.0));
		assert_true(down[i] == want);
		assert_true(fabsf(down[i]) <= 1.0f / sqrtf(5.0f) + 1e-7f);
	}
	for (size_t i = 0; i < 4 * 5; i++) {
		assert_true(fabsf(w.w[MOE_ROLE_UP_BIAS][i]) <= 0.1f);
		assert_true(fabsf(w.w[MOE_ROLE_GATE][i]) <= 1.0f / sqrtf(6.0f) + 1e-7f);
	}
	for (size_t i = 0; i < 4; i++)
		assert_true(fabsf(w.w[MOE_ROLE_SELECT_BIAS][i]) <= 0.1f);
	assert_memory_equal(w.w[MOE_ROLE_UP], w2.w[MOE_ROLE_UP], 4 * 5 * 6 * sizeof(float));
	assert_memory_not_equal(w.w[MOE_ROLE_UP], w3.w[MOE_ROLE_UP], 4 * 5 * 6 * sizeof(float));
	moe_ref_weights_free(&w2);
	moe_ref_weights_free(&w3);
	/* bf16 / f16 weights are rounded; soft_scale is exactly 1 */
	d.weight_dtype = MOE_DTYPE_BF16;
	moe_ref_weights_random(&d, 42, 3, &w);
	for (size_t i = 0; i < 4 * 6 * 5; i++)
		assert_true((fbits(w.w[MOE_ROLE_DOWN][i]) & 0xffffu) == 0);
	d.weight_dtype = MOE_DTYPE_F16;
	moe_ref_weights_random(&d, 42, 3, &w);
	for (size_t i = 0; i < 4 * 6 * 5; i++)
		assert_true(w.w[MOE_ROLE_DOWN][i] == moe_f16_to_f32(moe_f32_to_f16(down[i])));
	moe_ref_weights_free(&w);
	moe_ref_weights_free(&w); /* idempotent */
	struct moe_desc s;
	base_desc(&s, 4, 2, 3, 0);
	s.mode = MOE_MODE_SOFT;
	s.soft_slots_per_expert = 2;
	assert_int_equal(moe_ref_weights_alloc(&s, &w), MOE_OK);
	assert_null(w.w[MOE_ROLE_ROUTER]);
	moe_ref_weights_random(&s, 1, 0, &w);
	assert_true(w.w[MOE_ROLE_SOFT_SCALE][0] == 1.0f);
	moe_ref_weights_free(&w);
	assert_int_equal(moe_ref_weights_alloc(NULL, &w), MOE_ERR_ARG);
}

/* ---- hand cases, one per family ---- */

/* Mixtral: softmax over E, top-2, renormalize. Identity router: logits = x. */
static void test_mixtral(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 3, 2);
	d.norm = MOE_NORM_SUM;
	weights_make(&d, &w, 11);
	router_identity(&d, &w);
	const float x[8] = {0.3f, -0.2f, 0.8f, 0.1f, 1.0f, 0.9f, -0.5f, 0.0f};
	float y[8];
	int32_t ids[4];
	float wt[4];
	struct moe_routing r = {.expert_ids = ids, .weights = wt};
	fwd(&d, &w, x, y, 2, &r);
	/* token 0: logits .3 -.2 .8 .1 -> experts 2, 0; token 1: 1 .9 -.5 0 -> 0, 1 */
	int want[4] = {2, 0, 0, 1};
	double ww[4];
	ww[0] = exp(0.8) / (exp(0.8) + exp(0.3)), ww[1] = 1.0 - ww[0];
	ww[2] = exp(1.0) / (exp(1.0) + exp(0.9)), ww[3] = 1.0 - ww[2];
	for (int i = 0; i < 4; i++) {
		assert_int_equal(ids[i], want[i]);
		assert_true(fabs(wt[i] - ww[i]) < 1e-6);
	}
	double ey[8];
	t_token(&d, &w, x, 2, want, ww, ey);
	t_token(&d, &w, x + 4, 2, want + 2, ww + 2, ey + 4);
	check_close(y, ey, 8, 1e-5);
	moe_ref_weights_free(&w);
}

/* OLMoE / Qwen1.5: no renormalization, weights are full-softmax probabilities. */
static void test_olmoe_no_norm(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 3, 2);
	weights_make(&d, &w, 12);
	router_identity(&d, &w);
	const float x[4] = {0.3f, -0.2f, 0.8f, 0.1f};
	float y[4], wt[2];
	int32_t ids[2];
	struct moe_routing r = {.expert_ids = ids, .weights = wt};
	fwd(&d, &w, x, y, 1, &r);
	double Z = exp(0.3) + exp(-0.2) + exp(0.8) + exp(0.1);
	int want[2] = {2, 0};
	double ww[2] = {exp(0.8) / Z, exp(0.3) / Z};
	assert_int_equal(ids[0], 2);
	assert_int_equal(ids[1], 0);
	assert_true(fabs(wt[0] - ww[0]) < 1e-6 && fabs(wt[1] - ww[1]) < 1e-6);
	assert_true(wt[0] + wt[1] < 0.9f);
	double ey[4];
	t_token(&d, &w, x, 2, want, ww, ey);
	check_close(y, ey, 4, 1e-5);
	moe_ref_weights_free(&w);
}

/* DeepSeek-V3: sigmoid, selection bias, groups by sum of top-2, renorm, scale,
 * shared expert. */
static void test_deepseek_v3(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 8, 8, 3, 2);
	d.score = MOE_SCORE_SIGMOID;
	d.norm = MOE_NORM_SUM;
	d.norm_eps = 1e-20f;
	d.scale = 2.5f;
	d.n_groups = 4;
	d.group_top = 2;
	d.group_score = MOE_GROUP_SCORE_SUM_TOP2;
	d.select_bias = 1;
	d.shared_count = 1;
	d.shared_intermediate = 4;
	weights_make(&d, &w, 13);
	router_identity(&d, &w);
	memset(w.w[MOE_ROLE_SELECT_BIAS], 0, 8 * sizeof(float));
	const float x[8] = {2.0f, 1.9f, 0.0f, 0.1f, 2.1f, -3.0f, 0.2f, 0.3f};
	float y[8], wt[2];
	int32_t ids[2];
	struct moe_routing r = {.expert_ids = ids, .weights = wt};
	/* scores s = sigmoid(x); group sums of pairs: g0 = s0+s1 = 1.751, g1 = 1.025,
	 * g2 = s4+s5 = 0.938, g3 = 1.124: keep g0, g3; top-2 of {0,1,6,7} = 0, 1
	 * (plain top-2 would take 4, 0) */
	fwd(&d, &w, x, y, 1, &r);
	double s[8];
	for (int e = 0; e < 8; e++)
		s[e] = sigm(x[e]);
	int want[2] = {0, 1};
	double ww[2] = {2.5 * s[0] / (s[0] + s[1]), 2.5 * s[1] / (s[0] + s[1])};
	assert_int_equal(ids[0], 0);
	assert_int_equal(ids[1], 1);
	assert_true(fabs(wt[0] - ww[0]) < 1e-5 && fabs(wt[1] - ww[1]) < 1e-5);
	double ey[8];
	t_token(&d, &w, x, 2, want, ww, ey);
	check_close(y, ey, 8, 1e-5);

	/* bias +0.5 on expert 7: c7 = 1.074, g3 = 1.624 still kept; top-2 of c
	 * over {0,1,6,7} = 7, 0; weights from the unbiased scores */
	w.w[MOE_ROLE_SELECT_BIAS][7] = 0.5f;
	fwd(&d, &w, x, y, 1, &r);
	int want2[2] = {7, 0};
	double ww2[2] = {2.5 * s[7] / (s[0] + s[7]), 2.5 * s[0] / (s[0] + s[7])};
	assert_int_equal(ids[0], 7);
	assert_int_equal(ids[1], 0);
	assert_true(fabs(wt[0] - ww2[0]) < 1e-5 && fabs(wt[1] - ww2[1]) < 1e-5);
	t_token(&d, &w, x, 2, want2, ww2, ey);
	check_close(y, ey, 8, 1e-5);

	/* DeepSeek-V2 style group score max: g0 = s0, g1 = s3, g2 = s4, g3 = s7:
	 * keep g2, g0; top-2 = 4, 0 */
	w.w[MOE_ROLE_SELECT_BIAS][7] = 0.0f;
	d.group_score = MOE_GROUP_SCORE_MAX;
	fwd(&d, &w, x, y, 1, &r);
	assert_int_equal(ids[0], 4);
	assert_int_equal(ids[1], 0);
	moe_ref_weights_free(&w);
}

/* DBRX: lp normalization (p = 1 and p = 2), then scale. */
static void test_lp_norm(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 3, 2);
	d.norm = MOE_NORM_LP;
	weights_make(&d, &w, 14);
	router_identity(&d, &w);
	const float x[4] = {0.3f, -0.2f, 0.8f, 0.1f};
	double Z = exp(0.3) + exp(-0.2) + exp(0.8) + exp(0.1), p0 = exp(0.8) / Z, p1 = exp(0.3) / Z;
	const float ps[2] = {1.0f, 2.0f};
	for (int i = 0; i < 2; i++) {
		d.norm_p = ps[i];
		d.scale = 1.5f;
		float y[4], wt[2];
		int32_t ids[2];
		struct moe_routing r = {.expert_ids = ids, .weights = wt};
		fwd(&d, &w, x, y, 1, &r);
		double nrm = pow(pow(p0, ps[i]) + pow(p1, ps[i]), 1.0 / ps[i]);
		double ww[2] = {1.5 * p0 / nrm, 1.5 * p1 / nrm};
		int want[2] = {2, 0};
		assert_true(fabs(wt[0] - ww[0]) < 1e-5 && fabs(wt[1] - ww[1]) < 1e-5);
		double ey[4];
		t_token(&d, &w, x, 2, want, ww, ey);
		check_close(y, ey, 4, 1e-5);
	}
	/* norm_min clamps the denominator (ERNIE): w = p / max(sum, min) */
	d.norm = MOE_NORM_SUM;
	d.scale = 1.0f;
	d.norm_min = 2.0f;
	float y[4], wt[2];
	struct moe_routing r = {.weights = wt};
	fwd(&d, &w, x, y, 1, &r);
	assert_true(fabs(wt[0] - p0 / 2.0) < 1e-6 && fabs(wt[1] - p1 / 2.0) < 1e-6);
	moe_ref_weights_free(&w);
}

/* Qwen2-MoE: no renorm, shared expert gated by sigmoid(x . w). */
static void test_qwen2_shared_gate(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 3, 2);
	d.shared_count = 2;
	d.shared_intermediate = 3;
	d.shared_gate = MOE_SHARED_GATE_SIGMOID;
	weights_make(&d, &w, 15);
	router_identity(&d, &w);
	const float x[4] = {0.3f, -0.2f, 0.8f, 0.1f};
	float y[4];
	fwd(&d, &w, x, y, 1, NULL);
	double Z = exp(0.3) + exp(-0.2) + exp(0.8) + exp(0.1);
	int want[2] = {2, 0};
	double ww[2] = {exp(0.8) / Z, exp(0.3) / Z}, ey[4];
	t_token(&d, &w, x, 2, want, ww, ey);
	check_close(y, ey, 4, 1e-5);
	/* the gate matters: a plain shared expert gives something else */
	d.shared_gate = MOE_SHARED_GATE_NONE;
	float y2[4];
	fwd(&d, &w, x, y2, 1, NULL);
	assert_memory_not_equal(y, y2, sizeof y);
	moe_ref_weights_free(&w);
}

/* gpt-oss: router bias, softmax over the k selected, swiglu_oai with biases and
 * clamps exercised. */
static void test_gpt_oss(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 6, 2);
	d.norm = MOE_NORM_SUM;
	d.router_bias = 1;
	d.expert_bias = 1;
	d.act = MOE_ACT_SWIGLU_OAI;
	weights_make(&d, &w, 16);
	router_identity(&d, &w);
	float rb[4] = {0.0f, 0.5f, 0.0f, -0.25f};
	memcpy(w.w[MOE_ROLE_ROUTER_BIAS], rb, sizeof rb);
	for (size_t i = 0; i < 4 * 6 * 4; i++)
		w.w[MOE_ROLE_GATE][i] *= 6.0f, w.w[MOE_ROLE_UP][i] *= 6.0f;
	const float x[8] = {3.0f, 2.8f, -3.0f, 2.9f, -3.0f, 3.0f, 3.0f, -2.0f};
	float y[8];
	int32_t ids[4];
	fwd(&d, &w, x, y, 2, &(struct moe_routing){.expert_ids = ids});
	/* token 0: logits 3, 3.3, -3, 2.65 -> 1, 0; token 1: -3, 3.5, 3, -2.25 -> 1, 2 */
	int want[4] = {1, 0, 1, 2};
	double ww[4];
	ww[0] = 1.0 / (1.0 + exp(3.0 - 3.3)), ww[1] = 1.0 - ww[0];
	ww[2] = 1.0 / (1.0 + exp(3.0 - 3.5)), ww[3] = 1.0 - ww[2];
	assert_memory_equal(ids, ((int32_t[]){1, 0, 1, 2}), sizeof ids);
	double ey[8], gmax = -INFINITY, xd[4], out[4];
	t_token(&d, &w, x, 2, want, ww, ey);
	t_token(&d, &w, x + 4, 2, want + 2, ww + 2, ey + 4);
	check_close(y, ey, 8, 1e-5);
	for (int t = 0; t < 2; t++)
		for (int j = 0; j < 2; j++) {
			for (int h = 0; h < 4; h++)
				xd[h] = x[t * 4 + h];
			gmax = fmax(gmax, t_expert(&d, &w, want[t * 2 + j], xd, out));
		}
	assert_true(gmax > 7.0); /* the gate clamp is active in this case */
	moe_ref_weights_free(&w);
}

/* Llama-4: sigmoid of the top-1 logit scales the expert input; shared expert. */
static void test_llama4_apply_input(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 5, 1);
	d.score = MOE_SCORE_SIGMOID;
	d.apply_to = MOE_APPLY_INPUT;
	d.shared_count = 1;
	d.shared_intermediate = 5;
	weights_make(&d, &w, 17);
	router_identity(&d, &w);
	const float x[4] = {0.4f, 1.5f, -0.5f, 0.2f};
	float y[4], y2[4];
	fwd(&d, &w, x, y, 1, NULL);
	int want[1] = {1};
	double ww[1] = {sigm(1.5)}, ey[4];
	t_token(&d, &w, x, 1, want, ww, ey);
	check_close(y, ey, 4, 1e-5);
	d.apply_to = MOE_APPLY_OUTPUT;
	fwd(&d, &w, x, y2, 1, NULL);
	double ey2[4];
	t_token(&d, &w, x, 1, want, ww, ey2);
	check_close(y2, ey2, 4, 1e-5);
	assert_true(fabs(ey[0] - ey2[0]) + fabs(ey[1] - ey2[1]) > 1e-4);
	moe_ref_weights_free(&w);
}

/* sqrtsoftplus scores (l > 20 takes softplus(l) = l), renormalized. */
static void test_sqrtsoftplus(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 3, 2);
	d.score = MOE_SCORE_SQRTSOFTPLUS;
	d.norm = MOE_NORM_SUM;
	weights_make(&d, &w, 18);
	router_identity(&d, &w);
	const float x[4] = {25.0f, 0.3f, -1.0f, 0.2f};
	float y[4], wt[2];
	int32_t ids[2];
	fwd(&d, &w, x, y, 1, &(struct moe_routing){.expert_ids = ids, .weights = wt});
	double s0 = 5.0, s1 = sqrt(log1p(exp(0.3)));
	int want[2] = {0, 1};
	double ww[2] = {s0 / (s0 + s1), s1 / (s0 + s1)}, ey[4];
	assert_int_equal(ids[0], 0);
	assert_int_equal(ids[1], 1);
	assert_true(fabs(wt[0] - ww[0]) < 1e-6 && fabs(wt[1] - ww[1]) < 1e-6);
	t_token(&d, &w, x, 2, want, ww, ey);
	check_close(y, ey, 4, 1e-5);
	moe_ref_weights_free(&w);
}

/* Every expert kind and activation on random weights, through dense routing. */
static void test_expert_kinds(void **state)
{
	(void)state;
	const enum moe_act acts[] = {MOE_ACT_SILU, MOE_ACT_GELU, MOE_ACT_GELU_TANH, MOE_ACT_RELU};
	for (int kind = 0; kind < 2; kind++)
		for (size_t a = 0; a < sizeof acts / sizeof *acts; a++) {
			struct moe_desc d;
			struct moe_ref_weights w;
			base_desc(&d, 5, 3, 7, 3);
			d.mode = MOE_MODE_DENSE;
			d.kind = kind ? MOE_KIND_MLP : MOE_KIND_GLU;
			d.act = acts[a];
			d.expert_bias = 1;
			d.shared_count = 1;
			d.shared_intermediate = 4;
			d.shared_kind = d.kind;
			d.shared_act = acts[a];
			weights_make(&d, &w, 100 + a);
			float x[15], y[15];
			lcg_seed(a + 7);
			fill_rand(x, 15, 2.0f);
			fwd(&d, &w, x, y, 3, NULL);
			double ey[15];
			for (int t = 0; t < 3; t++) {
				double l[3], p[3];
				int ids[3] = {0, 1, 2};
				t_logits(&d, &w, x + t * 5, l);
				t_softmax(l, p, 3);
				t_token(&d, &w, x + t * 5, 3, ids, p, ey + t * 5);
			}
			check_close(y, ey, 15, 1e-5);
			moe_ref_weights_free(&w);
		}
}

/* Switch: top-1, router bias, relu MLP experts, capacity with both priorities
 * and both overflow policies. Identity router on E = H = 2. */
static void test_capacity(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 2, 2, 3, 1);
	d.kind = MOE_KIND_MLP;
	d.act = MOE_ACT_RELU;
	d.capacity = MOE_CAPACITY_PER_EXPERT;
	d.capacity_per_expert = 2;
	weights_make(&d, &w, 19);
	router_identity(&d, &w);
	/* every token prefers expert 0 (x0 > x1); priority by score: 3, 1, 0, 2 */
	const float x[8] = {1.0f, 0.0f, 2.0f, 0.0f, 0.5f, 0.0f, 3.0f, 0.0f};
	float y[8], wt[4];
	int32_t ids[4];
	int64_t counts[2];
	struct moe_routing r = {.expert_ids = ids, .weights = wt, .counts = counts};
	double ey[8], ww[4];
	for (int t = 0; t < 4; t++)
		ww[t] = sigm(x[2 * t]); /* softmax of (x0, 0) at expert 0 */

	fwd(&d, &w, x, y, 4, &r);
	assert_memory_equal(ids, ((int32_t[]){0, 0, -1, -1}), sizeof ids);
	assert_true(wt[2] == 0.0f && wt[3] == 0.0f);
	assert_int_equal(r.n_dropped, 2);
	assert_int_equal(counts[0], 2);
	assert_int_equal(counts[1], 0);
	for (int t = 0; t < 4; t++)
		t_token(&d, &w, x + 2 * t, 1, (int[]){t < 2 ? 0 : -1}, ww + t, ey + 2 * t);
	check_close(y, ey, 8, 1e-5);
	assert_true(y[4] == 0.0f && y[7] == 0.0f); /* dropped tokens contribute 0 */

	d.priority = MOE_PRIORITY_SCORE;
	fwd(&d, &w, x, y, 4, &r);
	assert_memory_equal(ids, ((int32_t[]){-1, 0, -1, 0}), sizeof ids);

	/* passthrough: a dropped token yields w * x */
	d.priority = MOE_PRIORITY_POSITION;
	d.overflow = MOE_OVERFLOW_PASSTHROUGH;
	fwd(&d, &w, x, y, 4, &r);
	for (int t = 2; t < 4; t++)
		for (int h = 0; h < 2; h++)
			ey[2 * t + h] = ww[t] * x[2 * t + h];
	check_close(y, ey, 8, 1e-5);
	assert_true(wt[2] == 0.0f && ids[2] == -1);

	/* factor: C = ceil(k T f / E) */
	d.overflow = MOE_OVERFLOW_DROP;
	d.capacity = MOE_CAPACITY_FACTOR;
	const float fs[] = {0.5f, 0.75f, 1.0f, 1.6f, 2.0f};
	for (size_t i = 0; i < sizeof fs / sizeof *fs; i++) {
		d.capacity_factor = fs[i];
		long C = (long)ceil(1.0 * 4 * fs[i] / 2.0);
		long kept = C < 4 ? C : 4;
		fwd(&d, &w, x, y, 4, &r);
		assert_int_equal(r.n_dropped, 4 - kept);
		assert_int_equal(counts[0], kept);
		for (int t = 0; t < 4; t++)
			assert_int_equal(ids[t], t < kept ? 0 : -1);
	}
	moe_ref_weights_free(&w);
}

/* moe_desc_scaled_count against exact rational arithmetic: factors written as
 * decimals fn / 10^fe, counts ceil (and floor) of num * fn / (den * 10^fe) in
 * integers, over a grid where the f32 value of the factor rounds the ceiling
 * up or the floor down (T = 20, E = 2, f = 0.3: 3, where the f32 gives 4). */
static void test_capacity_exact(void **state)
{
	(void)state;
	static const struct {
		const char *s;
		uint64_t fn, fd;
	} fs[] = {{"0.1", 1, 10},        {"0.3", 3, 10},
		  {"1.1", 11, 10},       {"0.7", 7, 10},
		  {"1.3", 13, 10},       {"2.2", 22, 10},
		  {"0.15", 15, 100},     {"1.25", 125, 100},
		  {"0.001", 1, 1000},    {"3", 3, 1},
		  {"12.5", 125, 10},     {"1e-7", 1, 10000000},
		  {"250000", 250000, 1}, {"0.333333", 333333, 1000000}};
	int up = 0, down = 0;
	for (size_t i = 0; i < sizeof fs / sizeof *fs; i++) {
		float f = strtof(fs[i].s, NULL);
		for (uint64_t num = 1; num <= 300; num++)
			for (uint64_t den = 1; den <= 64; den++) {
				uint64_t q = den * fs[i].fd, n = num * fs[i].fn;
				uint64_t c = (n + q - 1) / q, fl = n / q;
				assert_true(moe_desc_scaled_count(f, num, den, 0) == c);
				assert_true(moe_desc_scaled_count(f, num, den, 1) == fl);
				double v = (double)num * (double)f / (double)den;
				up += ceil(v) != (double)c;
				down += floor(v) != (double)fl;
			}
	}
	/* the grid holds cases that the f32 arithmetic gets wrong */
	assert_true(up > 0 && down > 0);
	assert_true(moe_desc_scaled_count(strtof("0.3", NULL), 20, 2, 0) == 3);
	/* past 2^64, non-positive and tiny factors */
	assert_true(moe_desc_scaled_count(1e6f, UINT64_MAX, 1, 0) == UINT64_MAX);
	assert_true(moe_desc_scaled_count(3e38f, 2, 1, 1) == UINT64_MAX);
	assert_true(moe_desc_scaled_count(0.0f, 5, 1, 0) == 0);
	assert_true(moe_desc_scaled_count(-1.0f, 5, 1, 0) == 0);
	assert_true(moe_desc_scaled_count(1e-30f, UINT64_MAX, 1, 0) == 1);
	assert_true(moe_desc_scaled_count(1e-30f, UINT64_MAX, 1, 1) == 0);
	assert_true(moe_desc_scaled_count(1e-9f, 3000000000u, 1, 1) == 3);
}

/* k = 2: rank 0 of every token is placed before rank 1 of any token. */
static void test_capacity_rank_order(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 2, 2, 3, 2);
	d.capacity = MOE_CAPACITY_PER_EXPERT;
	d.capacity_per_expert = 2;
	weights_make(&d, &w, 20);
	router_identity(&d, &w);
	/* t0: 0 then 1; t1: 1 then 0; t2: 0 then 1. Rank 0: e0 <- t0, t2; e1 <- t1.
	 * Rank 1: e1 <- t0 (2nd), e0 <- t1 is the 3rd of e0: dropped; e1 <- t2 3rd:
	 * dropped. Token-major filling would instead drop both slots of t2. */
	const float x[6] = {1.0f, 0.0f, 0.0f, 1.0f, 0.5f, 0.0f};
	float y[6];
	int32_t ids[6];
	struct moe_routing r = {.expert_ids = ids};
	fwd(&d, &w, x, y, 3, &r);
	assert_memory_equal(ids, ((int32_t[]){0, 1, 1, -1, 0, -1}), sizeof ids);
	assert_int_equal(r.n_dropped, 2);
	moe_ref_weights_free(&w);
}

/* Expert choice: S = softmax over experts, each expert takes top-C tokens. */
static void test_expert_choice(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 2, 2, 3, 0);
	d.mode = MOE_MODE_EXPERT_CHOICE;
	d.ec_capacity_factor = 1.0f;
	weights_make(&d, &w, 21);
	router_identity(&d, &w);
	const float x[8] = {1.0f, 0.0f, 0.0f, 1.0f, 2.0f, 0.0f, 0.5f, 0.4f};
	float y[8], wt[8];
	int32_t ids[8];
	int64_t counts[2];
	struct moe_routing r = {.expert_ids = ids, .weights = wt, .counts = counts};
	/* S0 = sigmoid(x0 - x1): .731 .269 .881 .525 -> expert 0 takes t2, t0;
	 * S1 = 1 - S0 -> expert 1 takes t1, t3 (C = ceil(4 * 1 / 2) = 2) */
	fwd(&d, &w, x, y, 4, &r);
	assert_memory_equal(ids, ((int32_t[]){0, -1, -1, 1, 0, -1, -1, 1}), sizeof ids);
	assert_int_equal(counts[0], 2);
	assert_int_equal(counts[1], 2);
	double ey[8];
	for (int t = 0; t < 4; t++) {
		double s0 = sigm((double)x[2 * t] - x[2 * t + 1]);
		double ww[2] = {s0, 1.0 - s0};
		int sel[2] = {ids[2 * t], ids[2 * t + 1]};
		t_token(&d, &w, x + 2 * t, 2, sel, ww, ey + 2 * t);
		for (int e = 0; e < 2; e++)
			if (sel[e] >= 0)
				assert_true(fabs(wt[2 * t + e] - ww[e]) < 1e-6);
	}
	check_close(y, ey, 8, 1e-5);
	/* C = ceil(4 * 3 / 2) = 6, clamped to T: every expert takes every token */
	d.ec_capacity_factor = 3.0f;
	fwd(&d, &w, x, y, 4, &r);
	for (int i = 0; i < 8; i++)
		assert_int_equal(ids[i], i % 2);
	for (int t = 0; t < 4; t++) {
		double s0 = sigm((double)x[2 * t] - x[2 * t + 1]);
		t_token(&d, &w, x + 2 * t, 2, (int[]){0, 1}, (double[]){s0, 1.0 - s0}, ey + 2 * t);
	}
	check_close(y, ey, 8, 1e-5);
	moe_ref_weights_free(&w);
}

/* Soft MoE, computed here from the vmoe formulas. */
static void test_soft(void **state)
{
	(void)state;
	enum { T = 3, H = 3, E = 2, P = 2, S = E * P };
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 4, 0);
	d.mode = MOE_MODE_SOFT;
	d.soft_slots_per_expert = P;
	d.shared_count = 1;
	d.shared_intermediate = 2;
	weights_make(&d, &w, 22);
	w.w[MOE_ROLE_SOFT_SCALE][0] = 1.5f;
	const float x[T * H] = {0.5f, -1.0f, 2.0f, 0.1f, 0.2f, 0.3f, -1.5f, 0.7f, 0.0f};
	float y[T * H];
	int64_t counts[E];
	float imp[E];
	struct moe_routing r = {.counts = counts, .importance = imp};
	fwd(&d, &w, x, y, T, &r);
	const float *phi = w.w[MOE_ROLE_SOFT_SLOTS];
	double xn[T][H], pn[S][H], L[T][S], D[T][S], C[T][S], ey[T * H];
	for (int t = 0; t < T; t++) {
		double n = 0;
		for (int h = 0; h < H; h++)
			n += (double)x[t * H + h] * x[t * H + h];
		for (int h = 0; h < H; h++)
			xn[t][h] = x[t * H + h] / sqrt(n + 1e-6);
	}
	for (int s = 0; s < S; s++) {
		double n = 0;
		for (int h = 0; h < H; h++)
			n += (double)phi[s * H + h] * phi[s * H + h];
		for (int h = 0; h < H; h++)
			pn[s][h] = phi[s * H + h] / sqrt(n + 1e-6);
	}
	for (int t = 0; t < T; t++)
		for (int s = 0; s < S; s++) {
			double v = 0;
			for (int h = 0; h < H; h++)
				v += xn[t][h] * pn[s][h];
			L[t][s] = 1.5 * v;
		}
	for (int s = 0; s < S; s++) {
		double col[T], p[T];
		for (int t = 0; t < T; t++)
			col[t] = L[t][s];
		t_softmax(col, p, T);
		for (int t = 0; t < T; t++)
			D[t][s] = p[t];
	}
	for (int t = 0; t < T; t++)
		t_softmax(L[t], C[t], S);
	double Ys[S][H];
	for (int s = 0; s < S; s++) {
		double xs[H];
		for (int h = 0; h < H; h++) {
			xs[h] = 0;
			for (int t = 0; t < T; t++)
				xs[h] += D[t][s] * x[t * H + h];
		}
		t_expert(&d, &w, s / P, xs, Ys[s]);
	}
	for (int t = 0; t < T; t++) {
		double xt[H], sh[H];
		for (int h = 0; h < H; h++)
			xt[h] = x[t * H + h];
		t_expert(&d, &w, -1, xt, sh);
		for (int h = 0; h < H; h++) {
			ey[t * H + h] = sh[h];
			for (int s = 0; s < S; s++)
				ey[t * H + h] += C[t][s] * Ys[s][h];
		}
	}
	check_close(y, ey, T * H, 1e-5);
	assert_int_equal(counts[0], P);
	assert_int_equal(counts[1], P);
	/* importance: combine weights summed per expert over tokens; total = T */
	double i0 = 0;
	for (int t = 0; t < T; t++)
		i0 += C[t][0] + C[t][1];
	assert_true(fabs(imp[0] - i0) < 1e-5);
	assert_true(fabs(imp[0] + imp[1] - T) < 1e-5);
	moe_ref_weights_free(&w);
}

/* Hierarchical (Shazeer 2017): gate over groups x gate within the group. */
static void test_hierarchical(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 6, 6, 3, 4);
	d.mode = MOE_MODE_HIERARCHICAL;
	d.norm = MOE_NORM_SUM;
	d.n_levels = 2;
	d.levels[0] = (struct moe_level){2, 2};
	d.levels[1] = (struct moe_level){0, 2};
	weights_make(&d, &w, 23);
	router_identity(&d, &w);
	float *gr = w.w[MOE_ROLE_GROUP_ROUTER];
	for (int g = 0; g < 2; g++)
		for (int h = 0; h < 6; h++)
			gr[g * 6 + h] = h / 3 == g ? 1.0f : 0.0f;
	const float x[6] = {0.5f, 0.1f, 0.2f, 0.3f, 0.4f, -0.1f};
	float y[6], wt[4];
	int32_t ids[4];
	struct moe_routing r = {.expert_ids = ids, .weights = wt};
	fwd(&d, &w, x, y, 1, &r);
	/* group logits 0.8, 0.6 -> g0 then g1; g0 experts .5 .1 .2 -> 0, 2;
	 * g1 experts .3 .4 -.1 -> 4, 3 */
	int want[4] = {0, 2, 4, 3};
	double g0 = exp(0.8) / (exp(0.8) + exp(0.6)), g1 = 1.0 - g0;
	double a0 = exp(0.5) / (exp(0.5) + exp(0.2)), b0 = exp(0.4) / (exp(0.4) + exp(0.3));
	double ww[4] = {g0 * a0, g0 * (1 - a0), g1 * b0, g1 * (1 - b0)}, ey[6];
	for (int i = 0; i < 4; i++) {
		assert_int_equal(ids[i], want[i]);
		assert_true(fabs(wt[i] - ww[i]) < 1e-6);
	}
	t_token(&d, &w, x, 4, want, ww, ey);
	check_close(y, ey, 6, 1e-5);
	/* no renormalization: full softmax at each level; scale on the product */
	d.norm = MOE_NORM_NONE;
	d.scale = 2.0f;
	fwd(&d, &w, x, y, 1, &r);
	double z0 = exp(0.5) + exp(0.1) + exp(0.2), z1 = exp(0.3) + exp(0.4) + exp(-0.1);
	double ww2[4] = {2 * g0 * exp(0.5) / z0, 2 * g0 * exp(0.2) / z0, 2 * g1 * exp(0.4) / z1,
			 2 * g1 * exp(0.3) / z1};
	for (int i = 0; i < 4; i++)
		assert_true(fabs(wt[i] - ww2[i]) < 1e-6);
	t_token(&d, &w, x, 4, want, ww2, ey);
	check_close(y, ey, 6, 1e-5);
	moe_ref_weights_free(&w);
}

/* Phi-3.5 sparsemixer, inference path. */
static void test_sparsemixer(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 3, 2);
	d.mode = MOE_MODE_SPARSEMIXER;
	d.sparsemixer_eps = 0.01f;
	weights_make(&d, &w, 24);
	router_identity(&d, &w);
	const float x[8] = {1.0f, 0.99f, 0.5f, 0.985f, -0.2f, -0.1f, -0.3f, -0.1f};
	float y[8], wt[4];
	int32_t ids[4];
	fwd(&d, &w, x, y, 2, &(struct moe_routing){.expert_ids = ids, .weights = wt});
	double ey[8];
	for (int t = 0; t < 2; t++) {
		const float *l = x + 4 * t;
		double eps2 = 2.0 * (double)0.01f;
		int e1 = 0;
		for (int e = 1; e < 4; e++)
			if (l[e] > l[e1])
				e1 = e;
		double m1 = l[e1], num = 0, den = 0;
		for (int e = 0; e < 4; e++)
			if ((m1 - l[e]) / fmax(fabs(l[e]), m1) <= eps2)
				den += exp(l[e] - m1);
		num = 1.0;
		double w1 = num / den;
		int e2 = -1;
		for (int e = 0; e < 4; e++)
			if (e != e1 && (e2 < 0 || l[e] > l[e2]))
				e2 = e;
		double m2 = l[e2];
		den = 0;
		for (int e = 0; e < 4; e++)
			if (e != e1 && (m2 - l[e]) / fmax(fabs(l[e]), m2) <= eps2)
				den += exp(l[e] - m2);
		double w2 = 1.0 / den;
		assert_int_equal(ids[2 * t], e1);
		assert_int_equal(ids[2 * t + 1], e2);
		assert_true(fabs(wt[2 * t] - w1) < 1e-6 && fabs(wt[2 * t + 1] - w2) < 1e-6);
		t_token(&d, &w, x + 4 * t, 2, (int[]){e1, e2}, (double[]){w1, w2}, ey + 4 * t);
	}
	/* token 0 by hand: expert 2 is masked in both steps, 3 kept in both */
	assert_int_equal(ids[0], 0);
	assert_int_equal(ids[1], 1);
	double w1 = exp(1.0) / (exp(1.0) + exp((double)0.99f) + exp((double)0.985f));
	assert_true(fabs(wt[0] - w1) < 1e-6);
	/* token 1: m1 = -0.1 (expert 1); expert 3 ties it and is kept; the ratio
	 * uses |l_i|: (-0.1 + 0.2) / 0.2 = 0.5 masks expert 0 */
	assert_int_equal(ids[2], 1);
	assert_int_equal(ids[3], 3);
	check_close(y, ey, 8, 1e-5);
	moe_ref_weights_free(&w);
}

/* ---- PEER ---- */

static void peer_desc(struct moe_desc *d, enum moe_score sc)
{
	base_desc(d, 5, 64, 0, 0);
	d->mode = MOE_MODE_PRODUCT_KEY;
	d->kind = MOE_KIND_SINGLE_NEURON;
	d->act = MOE_ACT_GELU;
	d->pk_sub_keys = 8;
	d->pk_heads = 2;
	d->pk_top_k = 3;
	d->pk_query_dim = 4;
	d->pk_score = sc;
}

/* Product-key top-k equals the exhaustive top-k over all N = R^2 keys. */
static void test_peer_exhaustive(void **state)
{
	(void)state;
	for (int v = 0; v < 2; v++) {
		struct moe_desc d;
		struct moe_ref_weights w;
		peer_desc(&d, v ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX);
		weights_make(&d, &w, 25 + v);
		enum { T = 8, H = 5, R = 8, K = 3, DQ = 4 };
		float x[T * H], y[T * H], wt[T * 2 * K];
		int32_t ids[T * 2 * K];
		lcg_seed(5 + v);
		fill_rand(x, T * H, 1.5f);
		fwd(&d, &w, x, y, T, &(struct moe_routing){.expert_ids = ids, .weights = wt});
		const float *Q = w.w[MOE_ROLE_PK_QUERY], *qb = w.w[MOE_ROLE_PK_QUERY_BIAS];
		const float *K1 = w.w[MOE_ROLE_PK_KEYS], *K2 = K1 + R * DQ / 2;
		double ey[T * H];
		for (int t = 0; t < T; t++) {
			double xd[H], out[H];
			for (int h = 0; h < H; h++)
				xd[h] = x[t * H + h], ey[t * H + h] = 0;
			for (int hd = 0; hd < 2; hd++) {
				double q[DQ], sc[R * R], g[K];
				int idx[R * R];
				for (int i = 0; i < DQ; i++) {
					q[i] = qb[hd * DQ + i];
					for (int h = 0; h < H; h++)
						q[i] += (double)Q[(hd * DQ + i) * H + h] * xd[h];
				}
				for (int i = 0; i < R; i++)
					for (int j = 0; j < R; j++) {
						double a = 0, b = 0;
						for (int c = 0; c < DQ / 2; c++) {
							a += q[c] * K1[i * DQ / 2 + c];
							b += q[DQ / 2 + c] * K2[j * DQ / 2 + c];
						}
						sc[i * R + j] = a + b;
					}
				t_argsort(sc, R * R, idx);
				double top[K];
				for (int j = 0; j < K; j++)
					top[j] = sc[idx[j]];
				if (v)
					for (int j = 0; j < K; j++)
						g[j] = sigm(top[j]);
				else
					t_softmax(top, g, K);
				for (int j = 0; j < K; j++) {
					int slot = t * 2 * K + hd * K + j;
					assert_int_equal(ids[slot], idx[j]);
					assert_true(fabs(wt[slot] - g[j]) < 1e-5);
					t_expert(&d, &w, idx[j], xd, out);
					for (int h = 0; h < H; h++)
						ey[t * H + h] += g[j] * out[h];
				}
			}
		}
		check_close(y, ey, T * H, 1e-5);
		moe_ref_weights_free(&w);
	}
}

/* ---- metamorphic relations ---- */

/* (1) Fine-grained split m with replicated router rows equals the unsplit
 * model. Each replica gets probability p/m, so the split model uses scale m. */
static void test_split_equivalence(void **state)
{
	(void)state;
	enum { H = 6, E = 4, I = 8, K = 2, M = 2, T = 10 };
	for (int sc = 0; sc < 2; sc++) {
		struct moe_desc d, ds;
		struct moe_ref_weights w, ws;
		base_desc(&d, H, E, I, K);
		d.norm = MOE_NORM_SUM;
		d.score = sc ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
		weights_make(&d, &w, 30);
		ds = d;
		ds.n_experts = E * M;
		ds.intermediate = I / M;
		ds.top_k = K * M;
		ds.split = M;
		ds.scale = (float)M;
		assert_int_equal(moe_ref_weights_alloc(&ds, &ws), MOE_OK);
		for (int e = 0; e < E * M; e++) {
			int o = e / M, s = e % M;
			memcpy(ws.w[MOE_ROLE_ROUTER] + e * H, w.w[MOE_ROLE_ROUTER] + o * H,
			       H * sizeof(float));
			for (int i = 0; i < I / M; i++)
				for (int h = 0; h < H; h++) {
					size_t src = ((size_t)o * I + s * (I / M) + i) * H + h;
					size_t dst = ((size_t)e * (I / M) + i) * H + h;
					ws.w[MOE_ROLE_GATE][dst] = w.w[MOE_ROLE_GATE][src];
					ws.w[MOE_ROLE_UP][dst] = w.w[MOE_ROLE_UP][src];
				}
			for (int h = 0; h < H; h++)
				for (int i = 0; i < I / M; i++)
					ws.w[MOE_ROLE_DOWN][((size_t)e * H + h) * (I / M) + i] =
					    w.w[MOE_ROLE_DOWN]
					       [((size_t)o * H + h) * I + s * (I / M) + i];
		}
		float x[T * H], y[T * H], ys[T * H];
		int32_t ids[T * K], idss[T * K * M];
		lcg_seed(31);
		fill_rand(x, T * H, 2.0f);
		fwd(&d, &w, x, y, T, &(struct moe_routing){.expert_ids = ids});
		fwd(&ds, &ws, x, ys, T, &(struct moe_routing){.expert_ids = idss});
		for (int t = 0; t < T; t++)
			for (int j = 0; j < K; j++)
				for (int s = 0; s < M; s++)
					assert_int_equal(idss[t * K * M + j * M + s],
							 ids[t * K + j] * M + s);
		check_close_f(ys, y, T * H, 1e-5);
		moe_ref_weights_free(&w);
		moe_ref_weights_free(&ws);
	}
}

/* (2) softmax -> top-k -> renormalize equals top-k on logits -> softmax. */
static void test_softmax_topk_equivalence(void **state)
{
	(void)state;
	enum { H = 7, E = 8, K = 3, T = 16 };
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 4, K);
	d.norm = MOE_NORM_SUM;
	weights_make(&d, &w, 32);
	float x[T * H], y[T * H], wt[T * K];
	int32_t ids[T * K];
	lcg_seed(33);
	fill_rand(x, T * H, 3.0f);
	fwd(&d, &w, x, y, T, &(struct moe_routing){.expert_ids = ids, .weights = wt});
	for (int t = 0; t < T; t++) {
		double l[E], top[K], p[K];
		int idx[E];
		t_logits(&d, &w, x + t * H, l);
		t_argsort(l, E, idx);
		for (int j = 0; j < K; j++)
			top[j] = l[idx[j]];
		t_softmax(top, p, K);
		for (int j = 0; j < K; j++) {
			assert_int_equal(ids[t * K + j], idx[j]);
			assert_true(fabs(wt[t * K + j] - p[j]) < 1e-6);
		}
	}
	moe_ref_weights_free(&w);
}

/* (3) dense with k = E is the softmax-weighted sum of every expert; top-k with
 * k = E and no renormalization is the same sum in another order. */
static void test_dense_equivalence(void **state)
{
	(void)state;
	enum { H = 5, E = 4, T = 6 };
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 6, E);
	d.mode = MOE_MODE_DENSE;
	weights_make(&d, &w, 34);
	float x[T * H], y[T * H], y2[T * H];
	int32_t ids[T * E];
	int64_t counts[E];
	lcg_seed(35);
	fill_rand(x, T * H, 2.0f);
	fwd(&d, &w, x, y, T, &(struct moe_routing){.expert_ids = ids, .counts = counts});
	double ey[T * H];
	for (int t = 0; t < T; t++) {
		double l[E], p[E];
		t_logits(&d, &w, x + t * H, l);
		t_softmax(l, p, E);
		t_token(&d, &w, x + t * H, E, (int[]){0, 1, 2, 3}, p, ey + t * H);
		for (int e = 0; e < E; e++)
			assert_int_equal(ids[t * E + e], e);
	}
	for (int e = 0; e < E; e++)
		assert_int_equal(counts[e], T);
	check_close(y, ey, T * H, 1e-5);
	d.mode = MOE_MODE_TOKEN_CHOICE;
	fwd(&d, &w, x, y2, T, NULL);
	check_close_f(y2, y, T * H, 1e-6);
	moe_ref_weights_free(&w);
}

/* (4) A capacity nobody reaches drops nothing and is bit-identical. */
static void test_capacity_large_is_dropless(void **state)
{
	(void)state;
	enum { H = 6, E = 4, K = 2, T = 12 };
	struct moe_desc d, dc;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 5, K);
	d.norm = MOE_NORM_SUM;
	weights_make(&d, &w, 36);
	float x[T * H], y[T * H], yc[T * H];
	int32_t ids[T * K], idc[T * K];
	lcg_seed(37);
	fill_rand(x, T * H, 2.0f);
	fwd(&d, &w, x, y, T, &(struct moe_routing){.expert_ids = ids});
	for (int v = 0; v < 2; v++) {
		dc = d;
		if (v) {
			dc.capacity = MOE_CAPACITY_FACTOR;
			dc.capacity_factor = (float)E / K; /* C = T */
		} else {
			dc.capacity = MOE_CAPACITY_PER_EXPERT;
			dc.capacity_per_expert = T;
		}
		dc.priority = v ? MOE_PRIORITY_SCORE : MOE_PRIORITY_POSITION;
		struct moe_routing r = {.expert_ids = idc};
		fwd(&dc, &w, x, yc, T, &r);
		assert_int_equal(r.n_dropped, 0);
		assert_memory_equal(ids, idc, sizeof ids);
		assert_memory_equal(y, yc, sizeof y);
	}
	moe_ref_weights_free(&w);
}

/* (5) Routers that do not mix tokens: row i of a batch equals the 1-token call,
 * bit for bit. */
static void test_batch_invariance(void **state)
{
	(void)state;
	enum { T = 17, MAXH = 8 };
	struct moe_desc ds[5];
	base_desc(&ds[0], 8, 8, 4, 3);
	ds[0].score = MOE_SCORE_SIGMOID;
	ds[0].select_bias = 1;
	ds[0].n_groups = 4;
	ds[0].group_top = 2;
	ds[0].group_score = MOE_GROUP_SCORE_SUM_TOP2;
	ds[0].norm = MOE_NORM_SUM;
	ds[0].scale = 2.5f;
	ds[0].shared_count = 1;
	ds[0].shared_intermediate = 3;
	base_desc(&ds[1], 6, 4, 5, 4);
	ds[1].mode = MOE_MODE_DENSE;
	peer_desc(&ds[2], MOE_SCORE_SOFTMAX);
	base_desc(&ds[3], 6, 6, 3, 2);
	ds[3].mode = MOE_MODE_HIERARCHICAL;
	ds[3].n_levels = 2;
	ds[3].levels[0] = (struct moe_level){3, 2};
	ds[3].levels[1] = (struct moe_level){0, 1};
	base_desc(&ds[4], 5, 4, 3, 2);
	ds[4].mode = MOE_MODE_SPARSEMIXER;
	ds[4].sparsemixer_eps = 0.01f;
	for (int i = 0; i < 5; i++) {
		struct moe_ref_weights w;
		uint32_t H = ds[i].hidden;
		weights_make(&ds[i], &w, 40 + i);
		float x[T * MAXH], y[T * MAXH], y1[MAXH];
		lcg_seed(41 + i);
		fill_rand(x, T * H, 2.0f);
		fwd(&ds[i], &w, x, y, T, NULL);
		for (int t = 0; t < T; t++) {
			fwd(&ds[i], &w, x + t * H, y1, 1, NULL);
			if (memcmp(y1, y + t * H, H * sizeof(float)))
				fail_msg("%s: row %d differs from its 1-token call",
					 moe_mode_names[ds[i].mode], t);
		}
		moe_ref_weights_free(&w);
	}
}

/* (6) Selection bias changes the choice, not the weights. */
static void test_select_bias_choice_only(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 3, 1);
	d.score = MOE_SCORE_SIGMOID;
	d.select_bias = 1;
	weights_make(&d, &w, 42);
	router_identity(&d, &w);
	memset(w.w[MOE_ROLE_SELECT_BIAS], 0, 4 * sizeof(float));
	const float x[4] = {1.0f, 0.5f, 0.0f, 0.0f};
	float y[4], wt[1];
	int32_t ids[1];
	struct moe_routing r = {.expert_ids = ids, .weights = wt};
	fwd(&d, &w, x, y, 1, &r);
	assert_int_equal(ids[0], 0);
	assert_true(fabs(wt[0] - sigm(1.0)) < 1e-6);
	/* sigmoid(.5) + .3 = .922 > sigmoid(1) = .731: expert 1 wins, weight
	 * stays sigmoid(.5) */
	w.w[MOE_ROLE_SELECT_BIAS][1] = 0.3f;
	fwd(&d, &w, x, y, 1, &r);
	assert_int_equal(ids[0], 1);
	assert_true(fabs(wt[0] - sigm(0.5)) < 1e-6);
	double ey[4];
	t_token(&d, &w, x, 1, (int[]){1}, (double[]){sigm(0.5)}, ey);
	check_close(y, ey, 4, 1e-5);
	moe_ref_weights_free(&w);
}

/* (8) Noise: ignored for inference, reproducible per seed in training, and
 * exactly the documented formula. */
static void test_noise(void **state)
{
	(void)state;
	enum { H = 4, E = 4, T = 9 };
	struct moe_desc d, dn;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 3, E); /* k = E: the weights show every noisy logit */
	d.noise = MOE_NOISE_LEARNED_GAUSSIAN;
	weights_make(&d, &w, 43);
	dn = d;
	dn.noise = MOE_NOISE_NONE;
	float x[T * H], y0[T * H], y1[T * H], y2[T * H], y3[T * H], wt[T * E];
	int32_t ids[T * E];
	lcg_seed(44);
	fill_rand(x, T * H, 2.0f);
	struct moe_fwd_opts inf = {0, 5, 3}, tr = {1, 5, 3}, tr2 = {1, 6, 3};
	char err[128];
	assert_int_equal(moe_ref_forward(&dn, &w, x, y0, T, NULL, NULL, err, sizeof err), MOE_OK);
	assert_int_equal(moe_ref_forward(&d, &w, x, y1, T, &inf, NULL, err, sizeof err), MOE_OK);
	assert_memory_equal(y0, y1, sizeof y0);
	struct moe_routing r = {.expert_ids = ids, .weights = wt};
	assert_int_equal(moe_ref_forward(&d, &w, x, y1, T, &tr, &r, err, sizeof err), MOE_OK);
	assert_int_equal(moe_ref_forward(&d, &w, x, y2, T, &tr, NULL, err, sizeof err), MOE_OK);
	assert_memory_equal(y1, y2, sizeof y1);
	assert_int_equal(moe_ref_forward(&d, &w, x, y3, T, &tr2, NULL, err, sizeof err), MOE_OK);
	assert_memory_not_equal(y1, y3, sizeof y1);
	assert_memory_not_equal(y0, y1, sizeof y0);
	/* l_e + N(0,1) * softplus(x . Wnoise_e), normal from (seed, layer, t, e) */
	for (int t = 0; t < T; t++) {
		double l[E], p[E];
		t_logits(&d, &w, x + t * H, l);
		for (int e = 0; e < E; e++) {
			double n = 0;
			for (int h = 0; h < H; h++)
				n += (double)w.w[MOE_ROLE_NOISE][e * H + h] * x[t * H + h];
			l[e] += moe_rng_normal(5, 3, (uint64_t)t, (uint64_t)e) * log1p(exp(n));
		}
		t_softmax(l, p, E);
		for (int j = 0; j < E; j++) {
			int e = ids[t * E + j];
			assert_true(e >= 0 && e < E);
			assert_true(fabs(wt[t * E + j] - p[e]) < 1e-5);
		}
	}
	/* the noise projection is needed only when noise is drawn */
	free(w.w[MOE_ROLE_NOISE]);
	w.w[MOE_ROLE_NOISE] = NULL;
	assert_int_equal(moe_ref_forward(&d, &w, x, y1, T, &inf, NULL, err, sizeof err), MOE_OK);
	assert_int_equal(moe_ref_forward(&d, &w, x, y1, T, &tr, NULL, err, sizeof err),
			 MOE_ERR_WEIGHTS);
	assert_non_null(strstr(err, "noise"));

	/* jitter: x *= 1 - eps + 2 eps u(seed, layer, t, h), seen by router and
	 * experts alike (dense: no choice to flip) */
	d.noise = MOE_NOISE_JITTER;
	d.jitter_eps = 0.1f;
	d.mode = MOE_MODE_DENSE;
	dn.mode = MOE_MODE_DENSE;
	assert_int_equal(moe_ref_forward(&dn, &w, x, y0, T, NULL, NULL, err, sizeof err), MOE_OK);
	assert_int_equal(moe_ref_forward(&d, &w, x, y1, T, &inf, NULL, err, sizeof err), MOE_OK);
	assert_memory_equal(y0, y1, sizeof y0);
	assert_int_equal(moe_ref_forward(&d, &w, x, y1, T, &tr, NULL, err, sizeof err), MOE_OK);
	assert_int_equal(moe_ref_forward(&d, &w, x, y2, T, &tr, NULL, err, sizeof err), MOE_OK);
	assert_memory_equal(y1, y2, sizeof y1);
	assert_int_equal(moe_ref_forward(&d, &w, x, y3, T, &tr2, NULL, err, sizeof err), MOE_OK);
	assert_memory_not_equal(y1, y3, sizeof y1);
	double ey[T * H];
	for (int t = 0; t < T; t++) {
		float xj[H];
		double l[E], p[E];
		for (int h = 0; h < H; h++) {
			double u = moe_rng_uniform(moe_rng_hash(5, 3, (uint64_t)t, (uint64_t)h));
			xj[h] = (float)(x[t * H + h] * (1.0 - 0.1 + 0.2 * u));
		}
		t_logits(&d, &w, xj, l);
		t_softmax(l, p, E);
		t_token(&d, &w, xj, E, (int[]){0, 1, 2, 3}, p, ey + t * H);
	}
	check_close(y1, ey, T * H, 1e-5);
	moe_ref_weights_free(&w);
}

/* Auxiliary statistics from test-side probabilities and the routing counts. */
static void test_stats(void **state)
{
	(void)state;
	enum { H = 5, E = 4, K = 2, T = 7 };
	for (int sc = 0; sc < 2; sc++) {
		struct moe_desc d;
		struct moe_ref_weights w;
		base_desc(&d, H, E, 3, K);
		d.norm = MOE_NORM_SUM;
		d.score = sc ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
		weights_make(&d, &w, 45);
		float x[T * H], y[T * H], imp[E];
		int32_t ids[T * K];
		int64_t counts[E];
		lcg_seed(46);
		fill_rand(x, T * H, 3.0f);
		struct moe_routing r = {.expert_ids = ids, .counts = counts, .importance = imp};
		fwd(&d, &w, x, y, T, &r);
		double I[E] = {0}, z = 0;
		long c[E] = {0};
		for (int t = 0; t < T; t++) {
			double l[E], p[E], s = 0;
			t_logits(&d, &w, x + t * H, l);
			if (sc) {
				for (int e = 0; e < E; e++)
					s += p[e] = sigm(l[e]);
				for (int e = 0; e < E; e++)
					p[e] /= s;
			} else {
				t_softmax(l, p, E);
			}
			double m = l[0], se = 0;
			for (int e = 1; e < E; e++)
				m = fmax(m, l[e]);
			for (int e = 0; e < E; e++)
				se += exp(l[e] - m);
			z += (m + log(se)) * (m + log(se));
			for (int e = 0; e < E; e++)
				I[e] += p[e];
			for (int j = 0; j < K; j++)
				c[ids[t * K + j]]++;
		}
		double mean = 0, var = 0, lb = 0;
		for (int e = 0; e < E; e++)
			mean += I[e] / E;
		for (int e = 0; e < E; e++)
			var += (I[e] - mean) * (I[e] - mean) / E;
		for (int e = 0; e < E; e++) {
			assert_int_equal(counts[e], c[e]);
			assert_true(fabs(imp[e] - I[e]) < 1e-5);
			lb += (double)c[e] / (T * K) * I[e] / T;
		}
		assert_true(fabs(r.importance_cv2 - var / (mean * mean)) < 1e-5);
		assert_true(fabs(r.lb_loss - E * lb) < 1e-5);
		assert_true(fabs(r.z_loss - z / T) < 1e-5 * fmax(1.0, z / T));
		assert_int_equal(r.n_dropped, 0);
		moe_ref_weights_free(&w);
	}
}

/* Importance of the other token-level routers: expert choice with sigmoid
 * scores (normalized to sum 1), sparsemixer (softmax of the logits) and
 * hierarchical (group probability x probability within the group). */
static void test_stats_modes(void **state)
{
	(void)state;
	enum { H = 6, E = 6, T = 5 };
	for (int m = 0; m < 3; m++) {
		struct moe_desc d;
		struct moe_ref_weights w;
		base_desc(&d, H, E, 3, 2);
		if (m == 0) {
			d.mode = MOE_MODE_EXPERT_CHOICE;
			d.top_k = 0;
			d.score = MOE_SCORE_SIGMOID;
			d.ec_capacity_factor = 1.0f;
		} else if (m == 1) {
			d.mode = MOE_MODE_SPARSEMIXER;
			d.sparsemixer_eps = 0.01f;
		} else {
			d.mode = MOE_MODE_HIERARCHICAL;
			d.n_levels = 2;
			d.levels[0] = (struct moe_level){2, 1};
			d.levels[1] = (struct moe_level){0, 2};
		}
		weights_make(&d, &w, 52 + m);
		float x[T * H], y[T * H], imp[E];
		lcg_seed(53 + m);
		fill_rand(x, T * H, 2.0f);
		struct moe_routing r = {.importance = imp};
		fwd(&d, &w, x, y, T, &r);
		double I[E] = {0};
		for (int t = 0; t < T; t++) {
			double l[E], p[E], s = 0;
			t_logits(&d, &w, x + t * H, l);
			if (m == 0) {
				for (int e = 0; e < E; e++)
					s += p[e] = sigm(l[e]);
				for (int e = 0; e < E; e++)
					p[e] /= s;
			} else if (m == 1) {
				t_softmax(l, p, E);
			} else {
				double gl[2], gp[2];
				for (int g = 0; g < 2; g++) {
					gl[g] = 0;
					for (int h = 0; h < H; h++)
						gl[g] +=
						    (double)w.w[MOE_ROLE_GROUP_ROUTER][g * H + h] *
						    x[t * H + h];
				}
				t_softmax(gl, gp, 2);
				t_softmax(l, p, 3);
				t_softmax(l + 3, p + 3, 3);
				for (int e = 0; e < E; e++)
					p[e] *= gp[e / 3];
			}
			for (int e = 0; e < E; e++)
				I[e] += p[e];
		}
		for (int e = 0; e < E; e++)
			if (!(fabs(imp[e] - I[e]) < 1e-5))
				fail_msg("%s: importance[%d] = %g, expected %g",
					 moe_mode_names[d.mode], e, (double)imp[e], I[e]);
		moe_ref_weights_free(&w);
	}
}

/* ---- bad input ---- */

static void test_bad_input(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 3, 2);
	weights_make(&d, &w, 47);
	float x[8] = {0}, y[8];
	char err[128];
	x[6] = NAN;
	assert_int_equal(moe_ref_forward(&d, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_INPUT);
	assert_string_equal(err, "non-finite input at token 1, column 2");
	x[6] = 0.0f;
	x[1] = -INFINITY;
	assert_int_equal(moe_ref_forward(&d, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_INPUT);
	assert_string_equal(err, "non-finite input at token 0, column 1");
	/* a tiny buffer truncates, never overflows; NULL is allowed */
	char tiny[8];
	assert_int_equal(moe_ref_forward(&d, &w, x, y, 2, NULL, NULL, tiny, sizeof tiny),
			 MOE_ERR_INPUT);
	assert_int_equal(strlen(tiny), 7);
	assert_int_equal(moe_ref_forward(&d, &w, x, y, 2, NULL, NULL, NULL, 0), MOE_ERR_INPUT);
	x[1] = 0.0f;
	assert_int_equal(moe_ref_forward(&d, &w, NULL, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "x is NULL"));
	assert_int_equal(moe_ref_forward(&d, &w, x, NULL, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "y is NULL"));
	assert_int_equal(moe_ref_forward(&d, NULL, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "weights"));
	assert_int_equal(moe_ref_forward(NULL, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "description"));
	/* missing weights name the role */
	float *down = w.w[MOE_ROLE_DOWN];
	w.w[MOE_ROLE_DOWN] = NULL;
	assert_int_equal(moe_ref_forward(&d, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_WEIGHTS);
	assert_string_equal(err, "missing weights for role 'down'");
	w.w[MOE_ROLE_DOWN] = down;
	/* inconsistent descriptions are refused, not run */
	struct moe_desc b = d;
	b.top_k = 5;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "invalid description: top_k (5)"));
	b = d;
	b.top_k = 0;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	b = d;
	b.n_groups = 3;
	b.group_top = 1;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "groups (3) must divide"));
	b = d;
	b.mode = MOE_MODE_SPARSEMIXER;
	b.top_k = 3;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	b = d;
	b.mode = (enum moe_mode)77;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	b = d;
	b.capacity = MOE_CAPACITY_TOKEN_FRACTION;
	b.capacity_token_fraction = -0.5f;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "token_fraction must be positive"));
	b.capacity_token_fraction = NAN;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	b.capacity_token_fraction = 0.5f;
	b.capacity_norm_after_drop = 1;
	b.overflow = MOE_OVERFLOW_PASSTHROUGH;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "passthrough"));
	b = d;
	b.kind = MOE_KIND_SINGLE_NEURON;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	b = d;
	b.mode = MOE_MODE_HIERARCHICAL;
	b.n_levels = 2;
	b.levels[0] = (struct moe_level){2, 1};
	b.levels[1] = (struct moe_level){0, 1};
	b.top_k = 2;
	assert_int_equal(moe_ref_forward(&b, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "hierarchical top_k"));
	struct moe_desc p;
	peer_desc(&p, MOE_SCORE_SOFTMAX);
	p.pk_sub_keys = 7;
	assert_int_equal(moe_ref_forward(&p, &w, x, y, 2, NULL, NULL, err, sizeof err),
			 MOE_ERR_ARG);
	assert_non_null(strstr(err, "sub_keys^2 (49)"));
	moe_ref_weights_free(&w);
}

static void test_zero_tokens(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 4, 3, 2);
	weights_make(&d, &w, 48);
	int64_t counts[4] = {5, 5, 5, 5};
	float imp[4] = {1, 1, 1, 1};
	struct moe_routing r = {.counts = counts, .importance = imp};
	r.lb_loss = r.z_loss = r.importance_cv2 = 3.0f;
	r.n_dropped = 9;
	assert_int_equal(moe_ref_forward(&d, &w, NULL, NULL, 0, NULL, &r, NULL, 0), MOE_OK);
	for (int e = 0; e < 4; e++)
		assert_true(counts[e] == 0 && imp[e] == 0.0f);
	assert_true(r.lb_loss == 0.0f && r.z_loss == 0.0f && r.importance_cv2 == 0.0f);
	assert_int_equal(r.n_dropped, 0);
	moe_ref_weights_free(&w);
}

/* Garbage weights give garbage numbers, never a crash or an out-of-range id. */
static void test_nonfinite_weights(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, 4, 8, 3, 3);
	d.n_groups = 4;
	d.group_top = 2;
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	d.priority = MOE_PRIORITY_SCORE;
	weights_make(&d, &w, 49);
	for (int i = 0; i < 8 * 4; i += 3)
		w.w[MOE_ROLE_ROUTER][i] = i % 2 ? NAN : INFINITY;
	float x[12] = {1, 2, 3, 4, -1, -2, -3, -4, 0.5f, 0, 0, 1}, y[12];
	int32_t ids[9];
	assert_int_equal(moe_ref_forward(&d, &w, x, y, 3, NULL,
					 &(struct moe_routing){.expert_ids = ids}, NULL, 0),
			 MOE_OK);
	for (int i = 0; i < 9; i++)
		assert_true(ids[i] >= -1 && ids[i] < 8);
	moe_ref_weights_free(&w);
}

/* Token-choice routing by the test's own math: per token the k best
 * softmax scores (ties to the lower index) and those raw scores. */
static void t_route(const struct moe_desc *d, const struct moe_ref_weights *w, const float *x,
		    int T, int *ids, double *p)
{
	int E = (int)d->n_experts, k = (int)d->top_k, H = (int)d->hidden;
	for (int t = 0; t < T; t++) {
		double l[MAXD], s[MAXD];
		int idx[MAXD];
		t_logits(d, w, x + t * H, l);
		t_softmax(l, s, E);
		t_argsort(s, E, idx);
		for (int j = 0; j < k; j++)
			ids[t * k + j] = idx[j], p[t * k + j] = s[idx[j]];
	}
}

/* Drops by capacity C: rank outer, tokens in index order; ids[] of dropped
 * slots become -1. Returns the number dropped. */
static int t_fill(int *ids, int T, int k, int E, long C)
{
	long fill[MAXD] = {0};
	int dropped = 0;
	assert_true(E <= MAXD);
	for (int j = 0; j < k; j++)
		for (int t = 0; t < T; t++) {
			int e = ids[t * k + j];
			if (fill[e] < C)
				fill[e]++;
			else
				ids[t * k + j] = -1, dropped++;
		}
	return dropped;
}

/* Tokens whose first feature is large all prefer expert 0 (identity router):
 * a skewed batch where capacity drops. */
static void skewed_tokens(float *x, int T, int H, uint64_t seed)
{
	lcg_seed(seed);
	fill_rand(x, (size_t)T * H, 1.0f);
	for (int t = 0; t < T; t++)
		x[t * H] += 3.0f;
}

/* Hunyuan (top-k > 1): C = max(k, k * T // E), i.e. factor 1 rounded down with
 * a minimum of k; weights p / max(sum of the top-k p, eps) from before the
 * drop, not renormalized after it. */
static void test_capacity_floor_min(void **state)
{
	(void)state;
	enum { H = 4, E = 4, K = 2, TMAX = 9 };
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 3, K);
	d.norm = MOE_NORM_SUM;
	d.norm_min = 1.1920929e-07f;
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	d.capacity_floor = 1;
	d.capacity_min = K;
	d.shared_count = 1;
	d.shared_intermediate = 2;
	weights_make(&d, &w, 60);
	router_identity(&d, &w);
	float x[TMAX * H], y[TMAX * H], wt[TMAX * K];
	int32_t rid[TMAX * K];
	struct moe_routing r = {.expert_ids = rid, .weights = wt};
	skewed_tokens(x, TMAX, H, 61);
	const int Ts[] = {3, 5, 9};
	for (int i = 0; i < 3; i++) {
		int T = Ts[i];
		long C = (long)K * T / E; /* integer division, as the HF code */
		if (C < K)
			C = K;
		int ids[TMAX * K];
		double p[TMAX * K], ey[TMAX * H];
		t_route(&d, &w, x, T, ids, p);
		int nd = t_fill(ids, T, K, E, C);
		assert_true(nd > 0);
		fwd(&d, &w, x, y, (size_t)T, &r);
		assert_int_equal(r.n_dropped, nd);
		for (int t = 0; t < T; t++) {
			double s = p[t * K] + p[t * K + 1], wts[K];
			for (int j = 0; j < K; j++) {
				wts[j] = p[t * K + j] / s;
				assert_int_equal(rid[t * K + j], ids[t * K + j]);
				assert_true(
				    fabs(wt[t * K + j] - (ids[t * K + j] < 0 ? 0 : wts[j])) < 1e-6);
			}
			t_token(&d, &w, x + t * H, K, ids + t * K, wts, ey + t * H);
		}
		check_close(y, ey, (size_t)T * H, 1e-5);
	}
	/* rounding up instead keeps one more at T = 5 (ceil(2.5) = 3) */
	d.capacity_floor = 0;
	int ids[TMAX * K];
	double p[TMAX * K];
	t_route(&d, &w, x, 5, ids, p);
	int nd = t_fill(ids, 5, K, E, 3);
	fwd(&d, &w, x, y, 5, &r);
	assert_int_equal(r.n_dropped, nd);
	for (int s = 0; s < 5 * K; s++)
		assert_int_equal(rid[s], ids[s]);
	moe_ref_weights_free(&w);
}

/* token_fraction: C = ceil(T * fraction), the fraction read as the decimal
 * written (0.3 * 10 is 3 in double, not 4 as the f32 0.300000012 would give);
 * min raises C. */
static void test_capacity_token_fraction(void **state)
{
	(void)state;
	enum { H = 4, E = 4, K = 2, T = 10 };
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 3, K);
	d.capacity = MOE_CAPACITY_TOKEN_FRACTION;
	weights_make(&d, &w, 62);
	router_identity(&d, &w);
	float x[T * H], y[T * H];
	int32_t rid[T * K];
	int64_t counts[E];
	struct moe_routing r = {.expert_ids = rid, .counts = counts};
	skewed_tokens(x, T, H, 63);
	const struct {
		float frac;
		double dec; /* the same fraction as a double literal */
		uint32_t min;
	} cs[] = {
	    {0.3f, 0.3, 0}, {0.05f, 0.05, 3}, {0.25f, 0.25, 0}, {0.7f, 0.7, 0}, {1.0f, 1.0, 0}};
	for (size_t i = 0; i < sizeof cs / sizeof *cs; i++) {
		d.capacity_token_fraction = cs[i].frac;
		d.capacity_min = cs[i].min;
		long C = (long)ceil(T * cs[i].dec);
		if (C < (long)cs[i].min)
			C = cs[i].min;
		int ids[T * K];
		double p[T * K], ey[T * H];
		t_route(&d, &w, x, T, ids, p);
		int nd = t_fill(ids, T, K, E, C);
		fwd(&d, &w, x, y, T, &r);
		assert_int_equal(r.n_dropped, nd);
		for (int s = 0; s < T * K; s++)
			assert_int_equal(rid[s], ids[s]);
		/* expert 0 is every token's first choice: it keeps exactly C */
		assert_int_equal(counts[0], C < T ? C : T);
		for (int t = 0; t < T; t++)
			t_token(&d, &w, x + t * H, K, ids + t * K, p + t * K, ey + t * H);
		check_close(y, ey, T * H, 1e-5);
	}
	/* fraction 1 (NLLB's default) never drops: the dropless model */
	d.capacity_token_fraction = 1.0f;
	d.capacity_min = 0;
	float y0[T * H];
	fwd(&d, &w, x, y, T, &r);
	assert_int_equal(r.n_dropped, 0);
	d.capacity = MOE_CAPACITY_NONE;
	fwd(&d, &w, x, y0, T, NULL);
	assert_memory_equal(y, y0, sizeof y);
	moe_ref_weights_free(&w);
}

/* NLLB: top-2 weights p_j / max(sum of the kept p, eps) computed after the
 * drop (a token that lost its second expert weighs its first by 1), times
 * 1 - moe_token_dropout; MLP experts with biases. */
static void test_capacity_normalize_after_drop(void **state)
{
	(void)state;
	enum { H = 4, E = 4, K = 2, T = 8 };
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 5, K);
	d.kind = MOE_KIND_MLP;
	d.act = MOE_ACT_RELU;
	d.expert_bias = 1;
	d.norm = MOE_NORM_SUM;
	d.norm_min = 1.1920929e-07f;
	d.scale = 0.8f;
	d.capacity = MOE_CAPACITY_TOKEN_FRACTION;
	d.capacity_token_fraction = 0.25f; /* C = 2 */
	d.capacity_norm_after_drop = 1;
	weights_make(&d, &w, 64);
	router_identity(&d, &w);
	float x[T * H], y[T * H], wt[T * K];
	int32_t rid[T * K];
	struct moe_routing r = {.expert_ids = rid, .weights = wt};
	skewed_tokens(x, T, H, 65);
	/* spread the second choices so that some tokens keep both experts */
	for (int t = 0; t < T; t++)
		x[t * H + 1 + t % 3] += 1.0f;
	int ids[T * K];
	double p[T * K], ey[T * H];
	t_route(&d, &w, x, T, ids, p);
	int nd = t_fill(ids, T, K, E, 2);
	fwd(&d, &w, x, y, T, &r);
	assert_int_equal(r.n_dropped, nd);
	int both = 0, one = 0;
	for (int t = 0; t < T; t++) {
		double kept = 0, wts[K];
		for (int j = 0; j < K; j++)
			kept += ids[t * K + j] < 0 ? 0 : p[t * K + j];
		for (int j = 0; j < K; j++) {
			wts[j] =
			    ids[t * K + j] < 0 ? 0 : 0.8 * p[t * K + j] / fmax(kept, 1.1920929e-07);
			assert_int_equal(rid[t * K + j], ids[t * K + j]);
			assert_true(fabs(wt[t * K + j] - wts[j]) < 1e-6);
		}
		int n = (ids[t * K] >= 0) + (ids[t * K + 1] >= 0);
		both += n == 2;
		one += n == 1;
		if (n == 1) /* the survivor carries the whole routed weight */
			assert_true(fabs(wts[0] + wts[1] - 0.8) < 1e-12);
		t_token(&d, &w, x + t * H, K, ids + t * K, wts, ey + t * H);
	}
	assert_true(both > 0 && one > 0);
	check_close(y, ey, T * H, 1e-5);
	/* normalized before the drop instead: the survivor keeps its share */
	d.capacity_norm_after_drop = 0;
	fwd(&d, &w, x, y, T, &r);
	for (int s = 0; s < T * K; s++)
		if (rid[s] >= 0)
			assert_true(fabs(wt[s] - 0.8 * p[s] / (p[s - s % K] + p[s - s % K + 1])) <
				    1e-6);
	moe_ref_weights_free(&w);
}

/* JetMoE's output bias: added once per token after the routed and shared
 * experts, in every mode. */
static void test_output_bias(void **state)
{
	(void)state;
	enum { H = 4, E = 4, K = 2, T = 3 };
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 3, K);
	d.norm = MOE_NORM_SUM;
	d.shared_count = 1;
	d.shared_intermediate = 2;
	d.output_bias = 1;
	weights_make(&d, &w, 66);
	const float *b = w.w[MOE_ROLE_OUTPUT_BIAS];
	assert_non_null(b);
	/* random bias roles are in +-0.1 */
	for (int h = 0; h < H; h++)
		assert_true(fabsf(b[h]) <= 0.1f && b[h] != 0.0f);
	float x[T * H], y[T * H];
	lcg_seed(67);
	fill_rand(x, T * H, 1.0f);
	fwd(&d, &w, x, y, T, NULL);
	int ids[T * K];
	double p[T * K], ey[T * H];
	t_route(&d, &w, x, T, ids, p);
	for (int t = 0; t < T; t++) {
		double wts[K] = {p[t * K] / (p[t * K] + p[t * K + 1]),
				 p[t * K + 1] / (p[t * K] + p[t * K + 1])};
		t_token(&d, &w, x + t * H, K, ids + t * K, wts, ey + t * H);
		for (int h = 0; h < H; h++)
			ey[t * H + h] += b[h];
	}
	check_close(y, ey, T * H, 1e-5);
	/* the same weights without the bias differ by exactly b (up to rounding) */
	float y0[T * H];
	d.output_bias = 0;
	fwd(&d, &w, x, y0, T, NULL);
	for (int i = 0; i < T * H; i++)
		assert_true(fabsf(y[i] - y0[i] - b[i % H]) <= 1e-6f);
	/* the bias is a required weight when the description has it */
	d.output_bias = 1;
	float *keep = w.w[MOE_ROLE_OUTPUT_BIAS];
	w.w[MOE_ROLE_OUTPUT_BIAS] = NULL;
	char err[128];
	assert_int_equal(moe_ref_forward(&d, &w, x, y, T, NULL, NULL, err, sizeof err),
			 MOE_ERR_WEIGHTS);
	assert_non_null(strstr(err, "output_bias"));
	w.w[MOE_ROLE_OUTPUT_BIAS] = keep;
	moe_ref_weights_free(&w);

	/* Soft MoE and expert choice add it too */
	const enum moe_mode modes[] = {MOE_MODE_SOFT, MOE_MODE_EXPERT_CHOICE, MOE_MODE_DENSE};
	for (int i = 0; i < 3; i++) {
		base_desc(&d, H, E, 3, 0);
		d.mode = modes[i];
		d.soft_slots_per_expert = 1;
		d.ec_capacity_factor = 1.0f;
		d.top_k = modes[i] == MOE_MODE_DENSE ? E : 0;
		d.output_bias = 1;
		weights_make(&d, &w, 68);
		fwd(&d, &w, x, y, T, NULL);
		d.output_bias = 0;
		fwd(&d, &w, x, y0, T, NULL);
		for (int j = 0; j < T * H; j++)
			assert_true(fabsf(y[j] - y0[j] - w.w[MOE_ROLE_OUTPUT_BIAS][j % H]) <=
				    1e-6f);
		moe_ref_weights_free(&w);
	}
}

/* A larger call runs through the sorting paths (k > 32 in expert choice). */
static void test_larger_expert_choice(void **state)
{
	(void)state;
	enum { H = 6, E = 5, T = 200 };
	struct moe_desc d;
	struct moe_ref_weights w;
	base_desc(&d, H, E, 4, 0);
	d.mode = MOE_MODE_EXPERT_CHOICE;
	d.ec_capacity_factor = 2.0f;
	weights_make(&d, &w, 50);
	float *x = malloc(T * H * sizeof *x), *y = malloc(T * H * sizeof *y);
	int32_t *ids = malloc(T * E * sizeof *ids);
	lcg_seed(51);
	fill_rand(x, T * H, 2.0f);
	int64_t counts[E];
	fwd(&d, &w, x, y, T, &(struct moe_routing){.expert_ids = ids, .counts = counts});
	/* C = ceil(200 * 2 / 5) = 80; expert e takes the 80 best S[:, e] */
	for (int e = 0; e < E; e++) {
		double S[T];
		int idx[T];
		for (int t = 0; t < T; t++) {
			double l[E], p[E];
			t_logits(&d, &w, x + t * H, l);
			t_softmax(l, p, E);
			S[t] = p[e];
		}
		t_argsort(S, T, idx);
		assert_int_equal(counts[e], 80);
		for (int i = 0; i < T; i++)
			assert_int_equal(ids[idx[i] * E + e], i < 80 ? e : -1);
	}
	free(x), free(y), free(ids);
	moe_ref_weights_free(&w);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_act_closed_forms),
	    cmocka_unit_test(test_status_names),
	    cmocka_unit_test(test_rng),
	    cmocka_unit_test(test_bf16),
	    cmocka_unit_test(test_f16),
	    cmocka_unit_test(test_weights_random),
	    cmocka_unit_test(test_mixtral),
	    cmocka_unit_test(test_olmoe_no_norm),
	    cmocka_unit_test(test_deepseek_v3),
	    cmocka_unit_test(test_lp_norm),
	    cmocka_unit_test(test_qwen2_shared_gate),
	    cmocka_unit_test(test_gpt_oss),
	    cmocka_unit_test(test_llama4_apply_input),
	    cmocka_unit_test(test_sqrtsoftplus),
	    cmocka_unit_test(test_expert_kinds),
	    cmocka_unit_test(test_capacity),
	    cmocka_unit_test(test_capacity_exact),
	    cmocka_unit_test(test_capacity_rank_order),
	    cmocka_unit_test(test_expert_choice),
	    cmocka_unit_test(test_soft),
	    cmocka_unit_test(test_hierarchical),
	    cmocka_unit_test(test_sparsemixer),
	    cmocka_unit_test(test_peer_exhaustive),
	    cmocka_unit_test(test_split_equivalence),
	    cmocka_unit_test(test_softmax_topk_equivalence),
	    cmocka_unit_test(test_dense_equivalence),
	    cmocka_unit_test(test_capacity_large_is_dropless),
	    cmocka_unit_test(test_batch_invariance),
	    cmocka_unit_test(test_select_bias_choice_only),
	    cmocka_unit_test(test_noise),
	    cmocka_unit_test(test_stats),
	    cmocka_unit_test(test_stats_modes),
	    cmocka_unit_test(test_bad_input),
	    cmocka_unit_test(test_zero_tokens),
	    cmocka_unit_test(test_nonfinite_weights),
	    cmocka_unit_test(test_larger_expert_choice),
	    cmocka_unit_test(test_capacity_floor_min),
	    cmocka_unit_test(test_capacity_token_fraction),
	    cmocka_unit_test(test_capacity_normalize_after_drop),
	    cmocka_unit_test(test_output_bias),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
