/* test_int8.c: int8 compute (dtype.compute int8): activations quantized per
 * row to int8 and multiplied by the kept int8/int4 codes in int32. The plan
 * resolves it per target (the int8 dot instructions or AVX2's multiply-adds,
 * else f32) and lays the codes out in runs of 4 inputs; the generated layer
 * (per channel and grouped, with and without zero points, mixed formats,
 * MLP, biases, apply_to input, shared experts, an input width that is not a
 * multiple of 64) against the f32 reference on the dequantized weights
 * within MOE_INT8_COMPUTE_TOL with identical expert choices, and really
 * quantized (an error no f32 sum would make); batch and thread invariance
 * bit for bit; a target without them computes in f32 within the f32 bound;
 * the 256-bit forms (AVX-VNNI, run here as AVX-512 VNNI with -evex512, and
 * AVX2's multiply-adds) give the 512-bit form's bits, AVX-VNNI targets get
 * the VEX instruction and AVX2 ones vpmaddubsw. */
#include "harness.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "moe_kernels.h"
#include "moegen.h"

/* Whether this machine runs the 512-bit int8 dot (test_narrow compares its
 * bits with the 256-bit forms'). */
static int host_vnni(void)
{
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
	       __builtin_cpu_supports("avx512vl");
}

/* Whether the host's kernels compute in int8: vpdpbusd, or AVX2's
 * multiply-adds (an x86-64 CPU without AVX2 gets the f32 kernels, and the
 * tests that need int8 kernels skip there). */
static int host_int8(void)
{
	__builtin_cpu_init();
	return host_vnni() || __builtin_cpu_supports("avx2");
}

/* Features that leave a target no int8 dot product: no VNNI, no AVX2 (and
 * so no AVX-512). */
static const char *const no_int8 = "-avx512vnni,-avxvnni,-avx2,-avx512f,-evex512";

static void set_q(struct moe_desc *d, int m, enum moe_qformat k, uint32_t group, int zero)
{
	d->qfmt[m] = (struct moe_qfmt){k, group, (uint8_t)zero};
}

struct icase {
	uint32_t H, I;
	int mlp, bias, apply_in, shared;
	enum moe_qformat up, down;
	uint32_t gu, gd; /* 0: per output channel */
	int zero;
};

static const struct icase cases[] = {
    {64, 64, 0, 0, 0, 0, MOE_QFORMAT_INT8, MOE_QFORMAT_INT8, 0, 0, 0},
    {64, 48, 0, 0, 0, 0, MOE_QFORMAT_INT4, MOE_QFORMAT_INT4, 32, 16, 1},
    {96, 48, 1, 1, 1, 0, MOE_QFORMAT_INT4, MOE_QFORMAT_INT8, 32, 16, 0},
    {80, 32, 0, 1, 0, 1, MOE_QFORMAT_INT8, MOE_QFORMAT_INT4, 16, 32, 1}, /* H % 64 != 0 */
    {256, 96, 0, 0, 0, 1, MOE_QFORMAT_INT4, MOE_QFORMAT_INT4, 128, 0, 0},
};

static void idesc(struct moe_desc *d, const struct icase *c)
{
	h_base_desc(d, c->H, 8, 2, c->I);
	d->compute = MOE_COMPUTE_INT8;
	if (c->mlp) {
		d->kind = MOE_KIND_MLP;
		d->act = MOE_ACT_GELU_TANH;
	}
	d->expert_bias = (uint8_t)c->bias;
	d->apply_to = c->apply_in ? MOE_APPLY_INPUT : MOE_APPLY_OUTPUT;
	set_q(d, MOE_QMAT_UP, c->up, c->gu ? c->gu : c->H, c->zero);
	set_q(d, MOE_QMAT_DOWN, c->down, c->gd ? c->gd : c->I, c->zero);
	if (c->shared) {
		d->shared_count = 1;
		d->shared_intermediate = 48;
		set_q(d, MOE_QMAT_SHARED_UP, MOE_QFORMAT_INT4, 16, 1);
		set_q(d, MOE_QMAT_SHARED_DOWN, MOE_QFORMAT_INT8, 48, 0);
	}
}

/* d from case c and its CPU plan, built without error. */
static void plan_case(struct moe_desc *d, const struct icase *c, struct moe_plan *p)
{
	idesc(d, c);
	struct moe_diag dg = {0};
	assert_int_equal(moe_plan_build(d, MOE_TARGET_CPU, p, &dg), 0);
}

/* The plan takes int8 only where the target has the dot instructions, and
 * lays the codes out for them then alone. */
static void test_resolved(void **state)
{
	(void)state;
	struct moe_desc d;
	static struct moe_plan p;
	plan_case(&d, &cases[1], &p);
	assert_int_equal(p.compute, MOE_COMPUTE_AUTO);
	moe_plan_set_compute(&p, 1, 1);
	assert_int_equal(p.compute, MOE_COMPUTE_INT8);
	assert_int_equal(p.routed.dot4, 1);
	/* the same bytes as the f32-compute panels, in another order */
	uint64_t ub = p.routed.up_bytes, db = p.routed.down_bytes;
	moe_plan_set_compute(&p, 1, 0);
	assert_int_equal(p.compute, MOE_COMPUTE_F32);
	assert_int_equal(p.routed.dot4, 0);
	assert_int_equal(p.routed.up_bytes, ub);
	assert_int_equal(p.routed.down_bytes, db);
	d.compute = MOE_COMPUTE_AUTO; /* auto never picks int8 */
	struct moe_diag dg = {0};
	assert_int_equal(moe_plan_build(&d, MOE_TARGET_CPU, &p, &dg), 0);
	moe_plan_set_compute(&p, 1, 1);
	assert_int_equal(p.compute, MOE_COMPUTE_F32);
}

/* Against the reference on the dequantized weights: within the int8 bound,
 * identical expert choices (h_compare), and further than any f32 sum
 * order would be (the activations were quantized). */
static void test_vs_reference(void **state)
{
	(void)state;
	if (!host_int8())
		skip();
	static const size_t Ts[] = {1, 77};
	double worst = 0.0;
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		struct moe_desc d;
		idesc(&d, &cases[i]);
		for (size_t j = 0; j < sizeof Ts / sizeof *Ts; j++) {
			h_compare(&d, Ts[j], j % 2 ? 2 : 1, 170 + 10 * i + j, NULL, NULL);
			assert_true(h_last_rel > H_TOL);
			worst = fmax(worst, h_last_rel);
		}
	}
	print_message("int8 compute: max rel err %.3g (bound %.3g)\n", worst, MOE_INT8_COMPUTE_TOL);
}

/* Inputs of one magnitude (each x is -1 or 1) quantize to codes of
 * magnitude 127, exactly, so the up projection's int32 sums meet int8 codes
 * at the largest activations: two products of one int16 pair reach
 * 2 * 255 * 127 > 32767, where a single vpmaddubsw on the stored codes
 * (plus 128) would saturate. Its output must stay within the int8 bound
 * (only h's rounding remains) on whatever int8 kernels the host gets. */
static void test_extreme_codes(void **state)
{
	(void)state;
	if (!host_int8())
		skip();
	h_sign_inputs = 1;
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		struct moe_desc d;
		idesc(&d, &cases[i]);
		h_compare(&d, 41, 2, 70 + i, NULL, NULL);
	}
	h_sign_inputs = 0;
}

/* Without an int8 dot product the same spec computes in f32 on the kept
 * codes. */
static void test_fallback(void **state)
{
	(void)state;
	h_features = no_int8;
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i += 2) {
		struct moe_desc d;
		idesc(&d, &cases[i]);
		h_compare(&d, 33, 2, 5 + i, NULL, NULL);
		assert_true(h_last_rel <= H_TOL);
	}
	h_features = NULL;
}

static void forward(const struct moe_desc *d, size_t T, uint32_t threads, float *y)
{
	assert_int_equal(h_forward(d, NULL, T, threads, 4, y), MOE_OK);
}

/* A row's output depends on that row alone: the same bits for 1 and 2
 * threads, and for the first token alone. More rows than one chunk of
 * quantized rows. */
static void test_invariant(void **state)
{
	(void)state;
	for (size_t c = 1; c < sizeof cases / sizeof *cases; c += 2) {
		struct moe_desc d;
		idesc(&d, &cases[c]);
		h_assert_invariant(&d, 211);
	}
}

/* Rows whose activations overflow f32 give a non-finite output, which the
 * runtime reports, as it does for f32 compute: never finite garbage. */
static void test_overflow(void **state)
{
	(void)state;
	struct moe_desc d;
	idesc(&d, &cases[0]);
	size_t T = 5, H = d.hidden;
	float *x = malloc(T * H * sizeof *x), *y = malloc(T * H * sizeof *y);
	assert_true(x && y);
	h_fill_input(x, T * H, 4);
	for (size_t i = 0; i < H; i++)
		x[2 * H + i] *= 1e30f; /* token 2 overflows in h */
	assert_int_equal(h_forward(&d, x, T, 2, 0, y), MOE_ERR_INPUT);
	free(x), free(y);
}

/* The 256-bit kernels (AVX-VNNI targets; here AVX-512 VNNI limited to
 * 256-bit vectors by -evex512, the same instruction in EVEX form), and those
 * of AVX2 targets without VNNI, give the bits of the 512-bit ones: the int32
 * sums are exact, and every f32 lane computes the same operations in the
 * same order. And they are int8 compute, not the f32 fallback: quantized
 * against the reference. */
static void test_narrow(void **state)
{
	(void)state;
	if (!host_vnni())
		skip();
	for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
		struct moe_desc d;
		idesc(&d, &cases[c]);
		size_t T = 77, H = d.hidden;
		float *ya = malloc(T * H * 4), *yb = malloc(T * H * 4);
		assert_true(ya && yb);
		forward(&d, T, 2, ya);
		h_features = "-evex512";
		forward(&d, T, 2, yb);
		h_compare(&d, 9, 1, 40 + c, NULL, NULL);
		assert_memory_equal(ya, yb, T * H * 4);
		assert_true(h_last_rel > H_TOL);
		/* AVX2's multiply-adds in place of vpdpbusd: the same exact sums */
		h_features = "-avx512vnni,-avxvnni,-evex512";
		forward(&d, T, 2, yb);
		h_compare(&d, 9, 1, 50 + c, NULL, NULL);
		h_features = NULL;
		assert_memory_equal(ya, yb, T * H * 4);
		assert_true(h_last_rel > H_TOL);
		free(ya), free(yb);
	}
}

/* An AVX-VNNI target without AVX-512 (alderlake) gets int8 compute in the
 * VEX form of vpdpbusd and no 512-bit register; an AVX2 one without
 * avxvnni AVX2's multiply-adds, no vpdpbusd; x86-64 without AVX2 the f32
 * kernels. */
static void test_avxvnni_asm(void **state)
{
	(void)state;
	struct moe_desc d;
	static struct moe_plan p;
	plan_case(&d, &cases[1], &p);
	static const struct {
		const char *cpu, *features;
		int vnni, madd;
	} ts[] = {{"alderlake", NULL, 1, 0},
		  {"x86-64-v3", "+avxvnni", 1, 0},
		  {"x86-64-v3", NULL, 0, 1},
		  {"znver3", NULL, 0, 1},
		  {"x86-64-v2", NULL, 0, 0}};
	for (size_t i = 0; i < sizeof ts / sizeof *ts; i++) {
		struct moe_cpu_target t = {.triple = "x86_64-unknown-linux-gnu",
					   .cpu = ts[i].cpu,
					   .features = ts[i].features,
					   .opt_level = 2};
		char *out = NULL, err[512];
		size_t len = 0;
		int rc = moe_cpu_generate(&p, &t, MOE_EMIT_ASM, &out, &len, err, sizeof err);
		if (rc)
			fprintf(stderr, "%s\n", err);
		assert_int_equal(rc, 0);
		assert_non_null(out);
		assert_true((strstr(out, "{vex}\tvpdpbusd") != NULL) == ts[i].vnni);
		assert_true((strstr(out, "vpdpbusd") != NULL) == ts[i].vnni);
		assert_true((strstr(out, "vpmaddubsw") != NULL) == ts[i].madd);
		assert_null(strstr(out, "%zmm"));
		free(out);
	}
}

static int setup(void **state)
{
	(void)state;
	return h_setup("test_int8");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_resolved),      cmocka_unit_test(test_vs_reference),
	    cmocka_unit_test(test_extreme_codes), cmocka_unit_test(test_fallback),
	    cmocka_unit_test(test_invariant),     cmocka_unit_test(test_overflow),
	    cmocka_unit_test(test_narrow),        cmocka_unit_test(test_avxvnni_asm),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
