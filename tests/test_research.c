/* test_research.c: the research routers generated for the CPU (sparsemixer,
 * hierarchical gating, noisy top-k with learned noise, its noise_epsilon and
 * the sparse importance, jitter, capacity)
 * against the reference: identical choices, outputs within 1e-5, the same
 * statistics; hand-derived cases; noise reproducible bit for bit. */
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
#include "safetensors.h"

static void sparsemixer_desc(struct moe_desc *d, uint32_t H, uint32_t E, float eps)
{
	h_base_desc(d, H, E, 2, 24);
	d->mode = MOE_MODE_SPARSEMIXER;
	d->norm = MOE_NORM_NONE;
	d->sparsemixer_eps = eps;
}

static void test_sparsemixer(void **state)
{
	(void)state;
	static const uint32_t Es[] = {2, 5, 16, 33};
	static const float eps[] = {0.0f, 0.01f, 0.3f, 2.0f};
	for (size_t i = 0; i < 4; i++) {
		struct moe_desc d;
		sparsemixer_desc(&d, 40, Es[i], eps[i]);
		d.scale = i == 2 ? 1.5f : 1.0f;
		h_compare(&d, 37, 2, 100 + i, NULL, NULL);
	}
}

/* eps = 0 masks every logit below the maximum: both softmaxes see one
 * logit, so both weights are exactly the scale, and the choices are the
 * two largest logits, computed here from the router weights directly. */
static void test_sparsemixer_hand(void **state)
{
	(void)state;
	struct moe_desc d;
	sparsemixer_desc(&d, 24, 6, 0.0f);
	d.scale = 0.75f;
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 5), MOE_OK);
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 5, 1, &w);
	enum { T = 9 };
	float x[T * 24], y[T * 24], wt[T * 2];
	int32_t ids[T * 2];
	h_fill_input(x, T * 24, 77);
	struct moe_routing rt = {.expert_ids = ids, .weights = wt};
	assert_int_equal(m.forward(mm, 1, x, y, T, &rt, NULL), MOE_OK);
	for (int t = 0; t < T; t++) {
		double l[6];
		int a = 0, b = -1;
		for (int e = 0; e < 6; e++) {
			l[e] = 0;
			for (int h = 0; h < 24; h++)
				l[e] += (double)w.w[MOE_ROLE_ROUTER][e * 24 + h] * x[t * 24 + h];
			if (l[e] > l[a])
				a = e;
		}
		for (int e = 0; e < 6; e++)
			if (e != a && (b < 0 || l[e] > l[b]))
				b = e;
		assert_int_equal(ids[t * 2], a);
		assert_int_equal(ids[t * 2 + 1], b);
		assert_true(wt[t * 2] == 0.75f && wt[t * 2 + 1] == 0.75f);
	}
	moe_ref_weights_free(&w);
	m.destroy(mm);
	h_model_close(&m);
}

static void hier_desc(struct moe_desc *d, uint32_t E, uint32_t G, uint32_t k1, uint32_t k2)
{
	h_base_desc(d, 32, E, k1 * k2, 20);
	d->mode = MOE_MODE_HIERARCHICAL;
	d->n_levels = 2;
	d->levels[0].groups = G;
	d->levels[0].top_k = k1;
	d->levels[1].top_k = k2;
	d->kind = MOE_KIND_MLP;
	d->act = MOE_ACT_RELU;
}

static void test_hierarchical(void **state)
{
	(void)state;
	static const uint32_t cfg[][4] = {
	    {8, 4, 2, 1}, {6, 1, 1, 2}, {24, 6, 3, 2}, {16, 16, 2, 1}, {12, 3, 3, 4}};
	for (size_t i = 0; i < sizeof cfg / sizeof *cfg; i++) {
		struct moe_desc d;
		hier_desc(&d, cfg[i][0], cfg[i][1], cfg[i][2], cfg[i][3]);
		d.score = (enum moe_score)(i % MOE_SCORE_COUNT);
		d.norm = i % 2 ? MOE_NORM_SUM : MOE_NORM_NONE;
		d.select_bias = i == 2;
		d.router_bias = i == 4;
		d.scale = i == 3 ? 2.0f : 1.0f;
		h_compare(&d, 23 + i * 7, 1 + i % 3, 200 + i, NULL, NULL);
	}
}

/* Every group and every expert chosen, softmax gates, no normalization:
 * each token's weights are p(g) * p(e | g) over all pairs, summing to 1. */
static void test_hierarchical_hand(void **state)
{
	(void)state;
	struct moe_desc d;
	hier_desc(&d, 12, 3, 3, 4);
	d.norm = MOE_NORM_NONE;
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 8), MOE_OK);
	enum { T = 7 };
	float x[T * 32], y[T * 32], wt[T * 12];
	int32_t ids[T * 12];
	h_fill_input(x, T * 32, 3);
	struct moe_routing rt = {.expert_ids = ids, .weights = wt};
	assert_int_equal(m.forward(mm, 1, x, y, T, &rt, NULL), MOE_OK);
	for (int t = 0; t < T; t++) {
		double sum = 0;
		int seen[12] = {0};
		for (int j = 0; j < 12; j++) {
			assert_true(ids[t * 12 + j] >= 0 && ids[t * 12 + j] < 12);
			seen[ids[t * 12 + j]]++;
			/* slots of rank j belong to the group chosen j / 4-th */
			assert_int_equal(ids[t * 12 + j] / 4, ids[t * 12 + j / 4 * 4] / 4);
			sum += wt[t * 12 + j];
		}
		for (int e = 0; e < 12; e++)
			assert_int_equal(seen[e], 1);
		assert_true(fabs(sum - 1.0) < 1e-5);
	}
	m.destroy(mm);
	h_model_close(&m);
}

static void noisy_desc(struct moe_desc *d, uint32_t E, uint32_t k)
{
	h_base_desc(d, 32, E, k, 24);
	d->noise = MOE_NOISE_LEARNED_GAUSSIAN;
	d->kind = MOE_KIND_MLP;
	d->act = MOE_ACT_RELU;
}

/* Training draws the noise from (seed, layer, token, expert) exactly like
 * the reference; inference ignores it; capacity keeps both priorities. */
static void test_noisy(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_fwd_opts tr = {.training = 1, .seed = 1234};
	noisy_desc(&d, 16, 4);
	h_compare(&d, 41, 2, 300, &tr, NULL);
	h_compare(&d, 41, 2, 300, NULL, NULL);
	for (int pr = 0; pr < MOE_PRIORITY_COUNT; pr++) {
		noisy_desc(&d, 8, 2);
		d.capacity = MOE_CAPACITY_FACTOR;
		d.capacity_factor = 1.0f;
		d.priority = (enum moe_priority)pr;
		d.overflow = pr ? MOE_OVERFLOW_PASSTHROUGH : MOE_OVERFLOW_DROP;
		h_compare(&d, 50, 3, 310 + pr, &tr, NULL);
	}
	noisy_desc(&d, 12, 3);
	d.score = MOE_SCORE_SIGMOID;
	d.router_bias = 1;
	d.select_bias = 1;
	h_compare(&d, 19, 1, 320, &tr, NULL);
}

/* The same seed gives the same bits whatever the thread count; another
 * seed, or inference, gives other outputs. */
static void test_noise_reproducible(void **state)
{
	(void)state;
	struct moe_desc d;
	noisy_desc(&d, 16, 2);
	enum { T = 33, H = 32 };
	static float y1[T * H], y2[T * H], y3[T * H], y4[T * H];
	struct moe_fwd_opts tr = {.training = 1, .seed = 42};
	h_compare(&d, T, 1, 400, &tr, y1);
	h_compare(&d, T, 3, 400, &tr, y2);
	assert_memory_equal(y1, y2, sizeof y1);
	tr.seed = 43;
	h_compare(&d, T, 2, 400, &tr, y3);
	h_compare(&d, T, 2, 400, NULL, y4);
	assert_memory_not_equal(y1, y3, sizeof y1);
	assert_memory_not_equal(y1, y4, sizeof y1);
}

/* Jitter scales the input the router and experts see (sparsemixer with
 * jitter is Phi-3.5's training setup), hierarchical with learned noise. */
static void test_jitter_and_hier_noise(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_fwd_opts tr = {.training = 1, .seed = 9};
	static float y1[29 * 40], y2[29 * 40];
	sparsemixer_desc(&d, 40, 8, 0.05f);
	d.noise = MOE_NOISE_JITTER;
	d.jitter_eps = 0.1f;
	h_compare(&d, 29, 2, 500, &tr, y1);
	h_compare(&d, 29, 2, 500, NULL, y2);
	assert_memory_not_equal(y1, y2, sizeof y1);
	h_base_desc(&d, 40, 8, 2, 24);
	d.noise = MOE_NOISE_JITTER;
	d.jitter_eps = 0.2f;
	h_compare(&d, 29, 1, 501, &tr, NULL);
	hier_desc(&d, 16, 4, 2, 2);
	d.noise = MOE_NOISE_LEARNED_GAUSSIAN;
	d.norm = MOE_NORM_SUM;
	h_compare(&d, 31, 2, 502, &tr, NULL);
}

/* What is not generated is refused with a message naming it. */
static void test_refusals(void **state)
{
	(void)state;
	struct moe_desc d;
	char err[2048];
	struct h_model m;
	static const enum moe_mode modes[] = {MOE_MODE_SOFT, MOE_MODE_PRODUCT_KEY};
	for (size_t i = 0; i < 2; i++) {
		h_base_desc(&d, 32, 8, 2, 16);
		d.mode = modes[i];
		d.ec_capacity_factor = 1.0f;
		d.soft_slots_per_expert = 1;
		if (modes[i] == MOE_MODE_SOFT) /* soft is generated, not with noise */
			d.noise = MOE_NOISE_JITTER, d.jitter_eps = 0.01f;
		err[0] = 0;
		assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
		assert_non_null(strstr(err, moe_mode_names[modes[i]]));
	}
	hier_desc(&d, 8, 2, 1, 2);
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "capacity"));
	hier_desc(&d, 8, 3, 1, 2); /* 3 groups do not divide 8 experts */
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "hierarchical"));
}

/* The noise standard deviation softplus(x . noise) + noise_epsilon
 * (tensor2tensor's noisy_top_k_gating): the generated router against the
 * reference with a small and a large floor, with capacity, and on the
 * hierarchical router's level 2. */
static void test_noise_epsilon(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_fwd_opts tr = {.training = 1, .seed = 77};
	noisy_desc(&d, 16, 4);
	d.noise_eps = 0.01f;
	h_compare(&d, 37, 2, 600, &tr, NULL);
	d.noise_eps = 2.5f;
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	h_compare(&d, 37, 3, 601, &tr, NULL);
	hier_desc(&d, 16, 4, 2, 2);
	d.noise = MOE_NOISE_LEARNED_GAUSSIAN;
	d.noise_eps = 0.3f;
	h_compare(&d, 23, 2, 602, &tr, NULL);
}

static void top2(const double *l, int n, int *a, int *b)
{
	*a = 0, *b = -1;
	for (int e = 1; e < n; e++)
		if (l[e] > l[*a])
			*a = e;
	for (int e = 0; e < n; e++)
		if (e != *a && (*b < 0 || l[e] > l[*b]))
			*b = e;
}

/* Noisy top-2 by hand from the weights, in double: logit c_e + z_e ·
 * (softplus(n_e) + eps) with z_e = moe_rng_normal(seed, layer, t, e). The
 * generated choices and their softmax weights match it, and the floor
 * changes the choices of some tokens against eps = 0. */
static void test_noise_epsilon_hand(void **state)
{
	(void)state;
	enum { T = 24, H = 32, E = 8 };
	const double eps = 2.0;
	struct moe_desc d;
	noisy_desc(&d, E, 2);
	d.norm = MOE_NORM_NONE;
	d.noise_eps = (float)eps;
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 5), MOE_OK);
	uint32_t layer = d.moe_layers[1];
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 5, layer, &w);
	float x[T * H], y[T * H], wt[T * 2];
	int32_t ids[T * 2];
	h_fill_input(x, T * H, 78);
	struct moe_routing rt = {.expert_ids = ids, .weights = wt};
	struct moe_fwd_opts tr = {.training = 1, .seed = 31, .layer = layer};
	assert_int_equal(m.forward(mm, layer, x, y, T, &rt, &tr), MOE_OK);
	int changed = 0;
	for (int t = 0; t < T; t++) {
		double l[E], l0[E];
		for (int e = 0; e < E; e++) {
			double c = 0, n = 0;
			for (int h = 0; h < H; h++) {
				c += (double)w.w[MOE_ROLE_ROUTER][e * H + h] * x[t * H + h];
				n += (double)w.w[MOE_ROLE_NOISE][e * H + h] * x[t * H + h];
			}
			double sp = n > 20 ? n : log1p(exp(n));
			double z = moe_rng_normal(31, layer, (uint64_t)t, (uint64_t)e);
			l[e] = c + z * (sp + eps);
			l0[e] = c + z * sp;
		}
		int a, b, a0, b0;
		top2(l, E, &a, &b);
		top2(l0, E, &a0, &b0);
		assert_int_equal(ids[t * 2], a);
		assert_int_equal(ids[t * 2 + 1], b);
		double sum = 0;
		for (int e = 0; e < E; e++)
			sum += exp(l[e] - l[a]);
		assert_true(fabs(wt[t * 2] - 1.0 / sum) <= 1e-5);
		assert_true(fabs(wt[t * 2 + 1] - exp(l[b] - l[a]) / sum) <= 1e-5);
		changed += a != a0 || b != b0;
	}
	assert_true(changed > 0);
	moe_ref_weights_free(&w);
	m.destroy(mm);
	h_model_close(&m);
}

/* importance: sparse against the reference on every router with top-k
 * slots: noisy top-k with capacity (drop and passthrough), token choice,
 * dense, hierarchical, sparsemixer, expert choice, top-p. */
static void test_importance_sparse(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_fwd_opts tr = {.training = 1, .seed = 5};
	noisy_desc(&d, 16, 4);
	d.importance_sparse = 1;
	d.noise_eps = 0.01f;
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	h_compare(&d, 40, 2, 700, &tr, NULL);
	d.overflow = MOE_OVERFLOW_PASSTHROUGH;
	d.priority = MOE_PRIORITY_SCORE;
	h_compare(&d, 40, 3, 701, &tr, NULL);
	h_base_desc(&d, 32, 8, 2, 24);
	d.importance_sparse = 1;
	h_compare(&d, 33, 3, 702, NULL, NULL);
	d.mode = MOE_MODE_DENSE;
	d.top_k = 8;
	h_compare(&d, 9, 1, 703, NULL, NULL);
	hier_desc(&d, 16, 4, 2, 2);
	d.importance_sparse = 1;
	h_compare(&d, 21, 2, 704, NULL, NULL);
	sparsemixer_desc(&d, 32, 8, 0.05f);
	d.importance_sparse = 1;
	h_compare(&d, 21, 2, 705, NULL, NULL);
	h_base_desc(&d, 32, 8, 0, 24);
	d.mode = MOE_MODE_EXPERT_CHOICE;
	d.norm = MOE_NORM_NONE;
	d.ec_capacity_factor = 1.5f;
	d.importance_sparse = 1;
	h_compare(&d, 30, 2, 706, NULL, NULL);
	h_base_desc(&d, 32, 8, 4, 24);
	d.mode = MOE_MODE_TOP_P;
	d.norm = MOE_NORM_NONE;
	d.top_p = 0.5f;
	d.importance_sparse = 1;
	h_compare(&d, 30, 2, 707, NULL, NULL);
}

/* The sparse importance by hand from the routing output: per expert, the
 * sum of its kept weights (a dropped slot counts 0); cv2 and lb_loss follow
 * from it. Without capacity, sum normalization makes each token's gates sum
 * to 1, so the importances sum to T; with a tight capacity they sum to
 * less. Either way they differ from the dense importance of the same
 * forward (the reference with importance: dense). */
static void test_importance_sparse_hand(void **state)
{
	(void)state;
	enum { T = 40, H = 32, E = 8, K = 2 };
	for (int cap = 0; cap < 2; cap++) {
		struct moe_desc d;
		noisy_desc(&d, E, K);
		d.noise_eps = 0.01f;
		d.importance_sparse = 1;
		if (cap) {
			d.capacity = MOE_CAPACITY_FACTOR;
			d.capacity_factor = 0.5f;
		}
		struct h_model m;
		char err[1024];
		assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
		moe_model *mm;
		struct moe_create_opts co = {.threads = 2};
		assert_int_equal(m.create(&mm, &co), MOE_OK);
		assert_int_equal(m.init_random(mm, 9), MOE_OK);
		uint32_t layer = d.moe_layers[1];
		static float x[T * H], y[T * H], yr[T * H];
		float wt[T * K], imp[E], impd[E];
		int32_t ids[T * K];
		int64_t cnt[E];
		h_fill_input(x, T * H, 90 + (uint64_t)cap);
		struct moe_routing rt = {ids, wt, cnt, imp, 0, 0, 0, 0};
		struct moe_fwd_opts tr = {.training = 1, .seed = 3, .layer = layer};
		assert_int_equal(m.forward(mm, layer, x, y, T, &rt, &tr), MOE_OK);
		double want[E] = {0}, sum = 0, mean = 0, var = 0, total = 0, lb = 0;
		for (int s = 0; s < T * K; s++)
			if (ids[s] >= 0)
				want[ids[s]] += wt[s];
		for (int e = 0; e < E; e++) {
			assert_true(fabs(imp[e] - want[e]) <= 1e-5 * fmax(1.0, want[e]));
			sum += want[e];
			total += (double)cnt[e];
		}
		mean = sum / E;
		for (int e = 0; e < E; e++) {
			var += (want[e] - mean) * (want[e] - mean) / E;
			lb += (double)cnt[e] / total * want[e] / T;
		}
		assert_true(fabs(rt.importance_cv2 - var / (mean * mean)) <=
			    1e-4 * fmax(1.0, var / (mean * mean)));
		assert_true(fabs(rt.lb_loss - E * lb) <= 1e-5 * fmax(1.0, E * lb));
		if (cap) {
			assert_true(rt.n_dropped > 0);
			assert_true(sum < T - 0.5);
		} else {
			assert_int_equal(rt.n_dropped, 0);
			assert_true(fabs(sum - T) <= 1e-4 * T);
		}
		struct moe_desc dd = d;
		dd.importance_sparse = 0;
		struct moe_ref_weights w;
		assert_int_equal(moe_ref_weights_alloc(&dd, &w), MOE_OK);
		moe_ref_weights_random(&dd, 9, layer, &w);
		struct moe_routing rd = {NULL, NULL, NULL, impd, 0, 0, 0, 0};
		assert_int_equal(moe_ref_forward(&dd, &w, x, yr, T, &tr, &rd, err, sizeof err),
				 MOE_OK);
		double diff = 0;
		for (int e = 0; e < E; e++)
			diff = fmax(diff, fabs(impd[e] - imp[e]));
		assert_true(diff > 1e-2);
		moe_ref_weights_free(&w);
		m.destroy(mm);
		h_model_close(&m);
	}
}

static int setup(void **state)
{
	(void)state;
	return h_setup("test_research");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_sparsemixer),
	    cmocka_unit_test(test_sparsemixer_hand),
	    cmocka_unit_test(test_hierarchical),
	    cmocka_unit_test(test_hierarchical_hand),
	    cmocka_unit_test(test_noisy),
	    cmocka_unit_test(test_noise_reproducible),
	    cmocka_unit_test(test_jitter_and_hier_noise),
	    cmocka_unit_test(test_noise_epsilon),
	    cmocka_unit_test(test_noise_epsilon_hand),
	    cmocka_unit_test(test_importance_sparse),
	    cmocka_unit_test(test_importance_sparse_hand),
	    cmocka_unit_test(test_refusals),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
