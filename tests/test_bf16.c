/* test_bf16.c: bf16 compute (dtype.compute, the bf16 dot instructions).
 * The plan's resolution per target; the generated bf16 kernels against the
 * f32 reference within MOE_BF16_COMPUTE_TOL with identical expert choices,
 * over odd sizes, biases, both apply_to, MLP and shared experts; the bf16
 * path really runs (it differs from f32 compute) and is batch and thread
 * invariant bit for bit; and the f32 fallback of a target without
 * avx512bf16 matches the reference within the f32 bound. */
#include "harness.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "moe_ref.h"

static int host_bf16(void)
{
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
}

/* auto: bf16 only for bf16 weights on a target with the dot; bf16: any
 * weights where the target has it; f32 always f32; geometry follows. */
static void test_plan_resolution(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_plan p;
	struct moe_diag dg = {0};
	static const struct {
		enum moe_compute c;
		enum moe_dtype w;
		int dot;
		enum moe_compute want;
	} cases[] = {
	    {MOE_COMPUTE_AUTO, MOE_DTYPE_BF16, 1, MOE_COMPUTE_BF16},
	    {MOE_COMPUTE_AUTO, MOE_DTYPE_BF16, 0, MOE_COMPUTE_F32},
	    {MOE_COMPUTE_AUTO, MOE_DTYPE_F32, 1, MOE_COMPUTE_F32},
	    {MOE_COMPUTE_AUTO, MOE_DTYPE_F16, 1, MOE_COMPUTE_F32},
	    {MOE_COMPUTE_BF16, MOE_DTYPE_F32, 1, MOE_COMPUTE_BF16},
	    {MOE_COMPUTE_BF16, MOE_DTYPE_F32, 0, MOE_COMPUTE_F32},
	    {MOE_COMPUTE_F32, MOE_DTYPE_BF16, 1, MOE_COMPUTE_F32},
	};
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		h_base_desc(&d, 37, 4, 2, 21);
		d.compute = cases[i].c;
		d.weight_dtype = cases[i].w;
		assert_int_equal(moe_plan_build(&d, MOE_TARGET_CPU, &p, &dg), 0);
		moe_plan_set_compute(&p, cases[i].dot, 1);
		assert_int_equal(p.compute, cases[i].want);
		int pairs = cases[i].want == MOE_COMPUTE_BF16;
		assert_int_equal(p.routed.pairs, pairs);
		/* K padded to even in pairs: hidden 37 -> 38, width 21 -> 22 */
		assert_int_equal(p.routed.up_elems,
				 (uint64_t)p.routed.up_panels * (pairs ? 38 : 37) * 16);
		assert_int_equal(p.routed.down_elems,
				 (uint64_t)p.routed.down_panels * (pairs ? 22 : 21) * 16);
		assert_int_equal(p.routed.elem_bytes, pairs || cases[i].w != MOE_DTYPE_F32 ? 2 : 4);
	}
	/* the pair layout: (k, j) -> k pair, column, k parity */
	assert_int_equal(moe_pair_index(0, 0), 0);
	assert_int_equal(moe_pair_index(1, 0), 1);
	assert_int_equal(moe_pair_index(0, 1), 2);
	assert_int_equal(moe_pair_index(2, 0), 32);
	assert_int_equal(moe_pair_index(5, 15), 2 * 32 + 30 + 1);
}

/* The dtype.compute key and its dump line. */
static void test_desc_dump(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 16, 4, 2, 8);
	d.compute = MOE_COMPUTE_BF16;
	char buf[8192];
	moe_desc_dump(&d, buf, sizeof buf);
	assert_non_null(strstr(buf, " compute bf16 "));
	char h1[65], h2[65];
	moe_desc_hash(&d, h1);
	d.compute = MOE_COMPUTE_F32;
	moe_desc_hash(&d, h2);
	assert_string_not_equal(h1, h2);
}

static void forward(const struct moe_desc *d, size_t T, uint32_t threads, uint64_t seed, float *y)
{
	assert_int_equal(h_forward(d, NULL, T, threads, seed, y), MOE_OK);
}

/* Shapes and features of the FFN tiles, each against the reference. */
static void test_vs_reference(void **state)
{
	(void)state;
	if (!host_bf16())
		skip();
	static const struct {
		uint32_t H, I;
		int mlp, bias, apply_in, shared;
	} cases[] = {
	    {64, 64, 0, 0, 0, 0},  {65, 37, 0, 0, 0, 0},  {33, 33, 1, 1, 0, 0},
	    {48, 40, 0, 1, 1, 0},  {100, 24, 0, 0, 0, 1}, {16, 8, 1, 0, 1, 1},
	    {256, 96, 0, 0, 0, 0},
	};
	static const size_t Ts[] = {1, 7, 64, 200};
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		struct moe_desc d;
		h_base_desc(&d, cases[i].H, 8, 2, cases[i].I);
		d.weight_dtype = MOE_DTYPE_BF16;
		if (cases[i].mlp) {
			d.kind = MOE_KIND_MLP;
			d.act = MOE_ACT_GELU_TANH;
		}
		d.expert_bias = (uint8_t)cases[i].bias;
		d.apply_to = cases[i].apply_in ? MOE_APPLY_INPUT : MOE_APPLY_OUTPUT;
		if (cases[i].shared) {
			d.shared_count = 1;
			d.shared_intermediate = 24;
		}
		assert_true(moe_desc_bf16_compute(&d));
		for (size_t j = 0; j < sizeof Ts / sizeof *Ts; j++)
			h_compare(&d, Ts[j], j % 2 ? 2 : 1, 50 + 10 * i + j, NULL, NULL);
	}
}

/* The bf16 path runs (its output differs from f32 compute on the same bf16
 * weights, within the bound) and is batch and thread invariant bit for bit. */
static void test_runs_and_invariant(void **state)
{
	(void)state;
	if (!host_bf16())
		skip();
	struct moe_desc d;
	h_base_desc(&d, 96, 8, 2, 72);
	d.weight_dtype = MOE_DTYPE_BF16;
	size_t T = 97, H = d.hidden;
	float *yb = malloc(T * H * 4), *yf = malloc(T * H * 4), *y1 = malloc(T * H * 4);
	assert_true(yb && yf && y1);
	forward(&d, T, 2, 3, yb);
	forward(&d, T, 1, 3, y1);
	assert_memory_equal(yb, y1, T * H * 4);
	forward(&d, 1, 1, 3, y1); /* token 0 alone */
	assert_memory_equal(yb, y1, H * 4);
	d.compute = MOE_COMPUTE_F32;
	forward(&d, T, 2, 3, yf);
	double emax = 0, rmax = 0;
	for (size_t i = 0; i < T * H; i++) {
		emax = fmax(emax, fabs((double)yb[i] - yf[i]));
		rmax = fmax(rmax, fabs((double)yf[i]));
	}
	assert_true(rmax > 0);
	assert_true(emax > 1e-5 * rmax);
	assert_true(emax <= MOE_BF16_COMPUTE_TOL * rmax);
	free(yb), free(yf), free(y1);
}

/* A target without avx512bf16 gets the generated f32 path: within the f32
 * bound of the reference, whatever dtype.compute asks. */
static void test_fallback(void **state)
{
	(void)state;
	h_features = "-avx512bf16";
	for (int c = MOE_COMPUTE_AUTO; c <= MOE_COMPUTE_BF16; c++) {
		struct moe_desc d;
		h_base_desc(&d, 65, 8, 2, 37);
		d.weight_dtype = MOE_DTYPE_BF16;
		d.compute = (enum moe_compute)c;
		size_t T = 40, H = d.hidden;
		float *y = malloc(T * H * 4), *yr = malloc(T * H * 4), *x = malloc(T * H * 4);
		assert_true(y && yr && x);
		forward(&d, T, 2, 9, y);
		struct moe_ref_weights w;
		char err[256];
		assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
		moe_ref_weights_random(&d, 7, d.moe_layers[0], &w);
		h_fill_input(x, T * H, 9);
		struct moe_fwd_opts fo = {.layer = d.moe_layers[0]};
		assert_int_equal(moe_ref_forward(&d, &w, x, yr, T, &fo, NULL, err, sizeof err),
				 MOE_OK);
		double emax = 0, rmax = 0;
		for (size_t i = 0; i < T * H; i++) {
			emax = fmax(emax, fabs((double)y[i] - yr[i]));
			rmax = fmax(rmax, fabs((double)yr[i]));
		}
		assert_true(rmax > 0);
		assert_true(emax <= H_TOL * rmax);
		moe_ref_weights_free(&w);
		free(y), free(yr), free(x);
	}
	h_features = NULL;
}

static int setup(void **state)
{
	(void)state;
	return h_setup("test_bf16");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_plan_resolution), cmocka_unit_test(test_desc_dump),
	    cmocka_unit_test(test_vs_reference),    cmocka_unit_test(test_runs_and_invariant),
	    cmocka_unit_test(test_fallback),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
