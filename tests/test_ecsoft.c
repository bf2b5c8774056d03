/* test_ecsoft.c: expert-choice routing generated for the CPU against the
 * reference on token groups of several sizes (identical selections, outputs
 * within 1e-5, the same statistics), hand-derived tiny cases and the
 * statistics' closed forms; refusals by name. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

static void ec_desc(struct moe_desc *d, uint32_t H, uint32_t E, uint32_t I, float factor)
{
	h_base_desc(d, H, E, 0, I);
	d->mode = MOE_MODE_EXPERT_CHOICE;
	d->norm = MOE_NORM_NONE;
	d->ec_capacity_factor = factor;
}

/* Token groups of several sizes (C from 1 to clamped at T), both score
 * functions, router bias, scale, MLP and GLU experts, weights on the input,
 * shared experts, 1 and 3 threads. */
static void test_ec_vs_ref(void **state)
{
	(void)state;
	static const size_t Ts[] = {1, 2, 7, 16, 33, 100};
	static const uint32_t Es[] = {2, 5, 8, 16, 33};
	static const float fs[] = {0.5f, 1.0f, 2.0f, 1.3f, 50.0f};
	for (size_t i = 0; i < sizeof Es / sizeof *Es; i++) {
		struct moe_desc d;
		ec_desc(&d, 24 + 8 * (uint32_t)i, Es[i], 16 + 8 * (uint32_t)(i % 2), fs[i]);
		if (i == 1)
			d.score = MOE_SCORE_SIGMOID;
		if (i == 2) {
			d.router_bias = 1;
			d.scale = 1.75f;
			d.kind = MOE_KIND_MLP;
			d.act = MOE_ACT_GELU;
		}
		if (i == 3) {
			d.apply_to = MOE_APPLY_INPUT;
			d.shared_count = 1;
			d.shared_intermediate = 16;
		}
		for (size_t j = 0; j < sizeof Ts / sizeof *Ts; j++)
			h_compare(&d, Ts[j], j % 2 ? 3 : 1, 100 + 10 * i + j, NULL, NULL);
	}
}

/* The same group routed with 1 and 3 threads gives the same bits. */
static void test_ec_threads(void **state)
{
	(void)state;
	struct moe_desc d;
	ec_desc(&d, 40, 12, 24, 2.0f);
	size_t T = 57;
	float *y1 = malloc(T * 40 * 4), *y3 = malloc(T * 40 * 4);
	h_compare(&d, T, 1, 7, NULL, y1);
	h_compare(&d, T, 3, 7, NULL, y3);
	assert_memory_equal(y1, y3, T * 40 * 4);
	free(y1), free(y3);
}

struct scored {
	double v;
	size_t t;
};

static int cmp_scored(const void *pa, const void *pb)
{
	const struct scored *a = pa, *b = pb;
	if (a->v != b->v)
		return a->v > b->v ? -1 : 1;
	return a->t < b->t ? -1 : a->t > b->t;
}

/* Tiny groups checked by hand: the scores are recomputed in double from the
 * router weights, each expert's top-C found by sorting, C from its formula.
 * Every expert takes exactly C tokens; a token gets zero to E experts; the
 * weights are the scores times scale. The statistics follow in closed form:
 * sum of importance = T (softmax rows sum to 1) and, every expert holding
 * C of E * C assignments, lb_loss = E * sum_e (1/E) * imp_e / T = 1. With C
 * = T every token gets every expert with its softmax weight. */
static void test_ec_hand(void **state)
{
	(void)state;
	/* factor fn / fd; the last three land on an integer that the f32 factor
	 * (0.300000012, 1.10000002, 0.100000001) would round past */
	static const struct {
		size_t T;
		uint32_t E;
		uint32_t fn, fd;
	} cases[] = {{5, 3, 1, 1},   {6, 4, 1, 2},    {3, 2, 4, 1},  {9, 4, 2, 1},
		     {20, 2, 3, 10}, {30, 3, 11, 10}, {10, 1, 1, 10}};
	for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
		size_t T = cases[c].T, H = 16;
		uint32_t E = cases[c].E;
		struct moe_desc d;
		ec_desc(&d, (uint32_t)H, E, 8, (float)cases[c].fn / (float)cases[c].fd);
		d.scale = 2.0f;
		struct h_model m;
		char err[2048];
		assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
		moe_model *mm;
		struct moe_create_opts co = {.threads = 2};
		assert_int_equal(m.create(&mm, &co), MOE_OK);
		assert_int_equal(m.init_random(mm, 11 + c), MOE_OK);
		uint32_t layer = d.moe_layers[1];
		struct moe_ref_weights w;
		assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
		moe_ref_weights_random(&d, 11 + c, layer, &w);
		float x[30 * 16], y[30 * 16], wt[30 * 4], imp[4];
		int32_t ids[30 * 4];
		int64_t cnt[4];
		h_fill_input(x, T * H, 50 + c);
		struct moe_routing rt = {ids, wt, cnt, imp, 0, 0, 0, 0};
		assert_int_equal(m.forward(mm, layer, x, y, T, &rt, NULL), MOE_OK);
		/* C = ceil(T * fn / (fd * E)) in integers */
		size_t C =
		    (T * cases[c].fn + (size_t)cases[c].fd * E - 1) / ((size_t)cases[c].fd * E);
		if (C > T)
			C = T;
		double S[30][4];
		for (size_t t = 0; t < T; t++) {
			double l[4], mx = -INFINITY, sum = 0;
			for (uint32_t e = 0; e < E; e++) {
				l[e] = 0;
				for (size_t h = 0; h < H; h++)
					l[e] +=
					    (double)w.w[MOE_ROLE_ROUTER][e * H + h] * x[t * H + h];
				mx = fmax(mx, l[e]);
			}
			for (uint32_t e = 0; e < E; e++)
				sum += exp(l[e] - mx);
			for (uint32_t e = 0; e < E; e++)
				S[t][e] = exp(l[e] - mx) / sum;
		}
		double imp_sum = 0;
		for (uint32_t e = 0; e < E; e++) {
			struct scored col[30];
			for (size_t t = 0; t < T; t++)
				col[t] = (struct scored){S[t][e], t};
			qsort(col, T, sizeof *col, cmp_scored);
			int chosen[30] = {0};
			for (size_t i = 0; i < C; i++)
				chosen[col[i].t] = 1;
			for (size_t t = 0; t < T; t++) {
				assert_int_equal(ids[t * E + e], chosen[t] ? (int32_t)e : -1);
				double want = chosen[t] ? 2.0 * S[t][e] : 0.0;
				assert_true(fabs(wt[t * E + e] - want) <= 1e-5);
			}
			assert_int_equal(cnt[e], (int64_t)C);
			imp_sum += imp[e];
		}
		assert_true(fabs(imp_sum - (double)T) <= 1e-4 * (double)T);
		assert_true(fabs(rt.lb_loss - 1.0) <= 1e-5);
		assert_int_equal(rt.n_dropped, 0);
		assert_true(rt.z_loss >= 0.0f);
		if (C == T) { /* every slot taken: y = the weighted sum of all experts */
			for (size_t i = 0; i < T * E; i++)
				assert_int_equal(ids[i], (int32_t)(i % E));
		}
		moe_ref_weights_free(&w);
		m.destroy(mm);
		h_model_close(&m);
	}
}

/* A token no expert chose gets exactly zero output (no shared experts, no
 * output bias). With 1 expert and factor 1/T only the best token is taken. */
static void test_ec_unchosen_zero(void **state)
{
	(void)state;
	struct moe_desc d;
	size_t T = 8, H = 16;
	ec_desc(&d, (uint32_t)H, 2, 8, 0.25f); /* C = ceil(8 * 0.25 / 2) = 1 */
	struct h_model m;
	char err[2048];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 5), MOE_OK);
	float x[8 * 16], y[8 * 16], wt[16];
	int32_t ids[16];
	int64_t cnt[2];
	h_fill_input(x, T * H, 77);
	struct moe_routing rt = {ids, wt, cnt, NULL, 0, 0, 0, 0};
	assert_int_equal(m.forward(mm, d.moe_layers[0], x, y, T, &rt, NULL), MOE_OK);
	assert_int_equal(cnt[0], 1);
	assert_int_equal(cnt[1], 1);
	size_t zero_rows = 0;
	for (size_t t = 0; t < T; t++) {
		int any = ids[t * 2] >= 0 || ids[t * 2 + 1] >= 0;
		int nz = 0;
		for (size_t h = 0; h < H; h++)
			nz |= y[t * H + h] != 0.0f;
		assert_int_equal(nz, any);
		zero_rows += !any;
	}
	assert_true(zero_rows >= T - 2);
	m.destroy(mm);
	h_model_close(&m);
}

/* What is not generated is refused with a message naming it. */
static void test_refusals(void **state)
{
	(void)state;
	struct moe_desc d;
	char err[2048];
	struct h_model m;
	h_base_desc(&d, 32, 8, 2, 16);
	d.mode = MOE_MODE_SOFT;
	d.soft_slots_per_expert = 1;
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "router.capacity with mode soft is not generated"));
	ec_desc(&d, 32, 8, 16, 1.0f);
	d.noise = MOE_NOISE_LEARNED_GAUSSIAN;
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "learned_gaussian"));
	ec_desc(&d, 32, 8, 16, 1.0f);
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "capacity"));
	ec_desc(&d, 32, 8, 16, 0.0f);
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "capacity_factor"));
}

static int setup(void **state)
{
	(void)state;
	return h_setup("test_ecsoft");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_ec_vs_ref), cmocka_unit_test(test_ec_threads),
	    cmocka_unit_test(test_ec_hand),   cmocka_unit_test(test_ec_unchosen_zero),
	    cmocka_unit_test(test_refusals),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
