/* test_top_p.c: top-p dynamic routing. The generated CPU model against the
 * reference (identical choices, outputs within 1e-5, the same statistics) over
 * thresholds, caps and normalizations; the routing itself checked by hand
 * (each token keeps the fewest ranked experts whose probabilities reach p);
 * the spec's rules and the refusal of the targets that do not generate it. */
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

static void top_p_desc(struct moe_desc *d, uint32_t H, uint32_t E, uint32_t k, float p)
{
	h_base_desc(d, H, E, k, 24);
	d->mode = MOE_MODE_TOP_P;
	d->score = MOE_SCORE_SOFTMAX;
	d->norm = MOE_NORM_NONE;
	d->top_p = p;
}

static void test_matches_reference(void **state)
{
	(void)state;
	static const struct {
		uint32_t E, k;
		float p;
		enum moe_norm norm;
		float scale;
	} cases[] = {
	    {8, 4, 0.3f, MOE_NORM_NONE, 1.0f},   {16, 8, 0.5f, MOE_NORM_SUM, 1.0f},
	    {5, 5, 1.0f, MOE_NORM_NONE, 1.0f},   {12, 3, 0.01f, MOE_NORM_SUM, 2.5f},
	    {33, 6, 0.25f, MOE_NORM_NONE, 1.0f}, {8, 8, 0.9f, MOE_NORM_LP, 1.0f},
	};
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		struct moe_desc d;
		top_p_desc(&d, 40, cases[i].E, cases[i].k, cases[i].p);
		d.norm = cases[i].norm;
		d.norm_p = 2.0f;
		d.scale = cases[i].scale;
		h_compare(&d, 37, 2, 300 + i, NULL, NULL);
		h_compare(&d, 1, 1, 310 + i, NULL, NULL);
	}
}

/* With no normalization the weights are the softmax probabilities: each
 * token keeps a ranked prefix that reaches p (or is k long), and no shorter
 * prefix reaches it; the counts differ between tokens. */
static void test_routing_by_hand(void **state)
{
	(void)state;
	enum { H = 32, E = 8, K = 6, T = 96 };
	const float p = 0.35f;
	struct moe_desc d;
	top_p_desc(&d, H, E, K, p);
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 9), MOE_OK);
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 9, 1, &w);
	/* a sharper router, so that some tokens are sure and some are not */
	float *x = malloc(sizeof(float) * T * H), *y = malloc(sizeof(float) * T * H);
	float wt[T * K];
	int32_t ids[T * K];
	int64_t counts[E];
	h_fill_input(x, (size_t)T * H, 21);
	for (size_t i = 0; i < (size_t)T * H; i++)
		x[i] *= 6.0f;
	struct moe_routing rt = {.expert_ids = ids, .weights = wt, .counts = counts};
	assert_int_equal(m.forward(mm, 1, x, y, T, &rt, NULL), MOE_OK);
	int seen[K + 1] = {0};
	int64_t total = 0;
	for (int t = 0; t < T; t++) {
		double l[E], mx = -INFINITY, z = 0.0, prob[E];
		for (int e = 0; e < E; e++) {
			l[e] = 0;
			for (int h = 0; h < H; h++)
				l[e] += (double)w.w[MOE_ROLE_ROUTER][e * H + h] * x[t * H + h];
			mx = fmax(mx, l[e]);
		}
		for (int e = 0; e < E; e++)
			z += exp(l[e] - mx);
		for (int e = 0; e < E; e++)
			prob[e] = exp(l[e] - mx) / z;
		int n = 0;
		double cum = 0.0, before = 0.0;
		while (n < K && ids[t * K + n] >= 0) {
			int e = ids[t * K + n];
			assert_true(fabs(wt[t * K + n] - prob[e]) <= 1e-5);
			/* ranked: no unchosen expert is more probable */
			for (int o = 0; o < E; o++) {
				int chosen = 0;
				for (int j = 0; j <= n; j++)
					chosen |= ids[t * K + j] == o;
				assert_true(chosen || prob[o] <= prob[e] + 1e-6);
			}
			before = cum;
			cum += prob[e];
			n++;
		}
		for (int j = n; j < K; j++) {
			assert_int_equal(ids[t * K + j], -1);
			assert_true(wt[t * K + j] == 0.0f);
		}
		assert_true(n >= 1);
		assert_true(n == K || cum >= p - 1e-5);
		assert_true(before < p + 1e-5);
		seen[n]++;
		total += n;
	}
	int64_t sum = 0;
	for (int e = 0; e < E; e++)
		sum += counts[e];
	assert_int_equal(sum, total);
	int kinds = 0;
	for (int n = 1; n <= K; n++)
		kinds += seen[n] > 0;
	assert_true(kinds >= 2);
	free(x), free(y);
	moe_ref_weights_free(&w);
	m.destroy(mm);
	h_model_close(&m);
}

struct capture {
	char text[4096];
	struct moe_diag sink;
};

static void capture_line(void *ctx, const char *line)
{
	struct capture *c = ctx;
	size_t n = strlen(c->text);
	snprintf(c->text + n, sizeof c->text - n, "%s\n", line);
}

static int check_spec(const char *text, struct capture *c, struct moe_desc *d)
{
	memset(c, 0, sizeof *c);
	c->sink.sink = capture_line;
	c->sink.ctx = c;
	struct moe_spec *s = moe_spec_load_string("t.yaml", text, strlen(text), &c->sink);
	assert_non_null(s);
	int rc = moe_spec_check(s, d, &c->sink);
	moe_spec_free(s);
	return rc;
}

#define SPEC_HEAD                                                                                  \
	"moegen: 1\nname: tp\nmodel: {hidden: 64, layers: 1, moe_layers: all}\n"                   \
	"experts: {count: 8, intermediate: 32, activation: silu}\n"

static void test_spec_rules(void **state)
{
	(void)state;
	struct capture c;
	struct moe_desc d;
	assert_int_equal(
	    check_spec(SPEC_HEAD "router: {mode: top_p, top_p: 0.6, top_k: 3}\n", &c, &d), 0);
	assert_int_equal(d.mode, MOE_MODE_TOP_P);
	assert_true(d.top_p == 0.6f);
	assert_int_equal(d.top_k, 3);
	assert_int_equal(moe_desc_route_width(&d), 3);

	assert_int_not_equal(check_spec(SPEC_HEAD "router: {mode: top_p, top_k: 3}\n", &c, &d), 0);
	assert_non_null(strstr(c.text, "t.yaml:5:"));
	assert_non_null(strstr(c.text, "router.top_p is required for router.mode top_p"));

	assert_int_not_equal(check_spec(SPEC_HEAD "router: {mode: top_p, top_p: 0.5}\n", &c, &d),
			     0);
	assert_non_null(strstr(c.text, "router.top_k is required"));

	assert_int_not_equal(
	    check_spec(SPEC_HEAD "router: {mode: token_choice, top_k: 2, top_p: 0.5}\n", &c, &d),
	    0);
	assert_non_null(strstr(c.text, "router.top_p does not apply to router.mode token_choice"));

	assert_int_not_equal(
	    check_spec(SPEC_HEAD "router: {mode: top_p, top_p: 1.5, top_k: 2}\n", &c, &d), 0);
	assert_non_null(strstr(c.text, "router.top_p"));

	assert_int_not_equal(check_spec(SPEC_HEAD "router: {mode: top_p, score: sigmoid, top_p: "
						  "0.5, top_k: 2}\n",
					&c, &d),
			     0);
	assert_non_null(strstr(c.text, "router.score does not apply to router.mode top_p"));
}

/* Both targets plan top-p with the same ops (tests/test_cuda_emu.c runs the
 * CUDA kernels against the reference). */
static void test_planned_for_cuda(void **state)
{
	(void)state;
	struct moe_desc d;
	top_p_desc(&d, 32, 8, 4, 0.5f);
	struct capture c;
	memset(&c, 0, sizeof c);
	c.sink.sink = capture_line;
	c.sink.ctx = &c;
	struct moe_plan p;
	assert_int_equal(moe_plan_build(&d, MOE_TARGET_CPU, &p, &c.sink), 0);
	assert_true(moe_plan_has(&p, MOE_OP_ROUTE) && moe_plan_has(&p, MOE_OP_GROUP));
	struct moe_plan pc;
	assert_int_equal(moe_plan_build(&d, MOE_TARGET_CUDA, &pc, &c.sink), 0);
	/* the same ops, but for the CPU's separate slot-order combine (the CUDA
	 * expert kernels combine in place) */
	uint32_t j = 0;
	for (uint32_t i = 0; i < p.n_ops; i++) {
		if (p.ops[i].op == MOE_OP_COMBINE)
			continue;
		assert_true(j < pc.n_ops);
		assert_int_equal(pc.ops[j++].op, p.ops[i].op);
	}
	assert_int_equal(j, pc.n_ops);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_matches_reference),
	    cmocka_unit_test(test_routing_by_hand),
	    cmocka_unit_test(test_spec_rules),
	    cmocka_unit_test(test_planned_for_cuda),
	};
	if (h_setup("moegen-top-p") != 0)
		return 1;
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	h_teardown(NULL);
	return rc;
}
