/* test_stages.c: the staged calls of moe.h (moe_route, moe_experts,
 * moe_combine). Composed by hand, with the experts split over two models that
 * each hold a part of the range and the rows of each expert in reverse order,
 * they give moe_forward's output bit for bit; the modes that are not staged
 * and bad arguments are refused with a message. moe_route_stats over a batch
 * cut in two calls, then moe_routing_from_sums, give moe_forward's routing
 * statistics of the whole batch. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>
#include <dlfcn.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

typedef enum moe_status route_fn(moe_model *, uint32_t, const void *, size_t, int32_t *, float *,
				 const struct moe_fwd_opts *);
typedef enum moe_status experts_fn(moe_model *, uint32_t, const float *, size_t, const int64_t *,
				   const float *, float *);
typedef enum moe_status route_stats_fn(moe_model *, uint32_t, const void *, size_t, int32_t *,
				       float *, const struct moe_fwd_opts *,
				       struct moe_route_sums *);
typedef enum moe_status from_sums_fn(moe_model *, uint32_t, const struct moe_route_sums *,
				     struct moe_routing *);
typedef enum moe_status combine_fn(moe_model *, uint32_t, const void *, size_t, const int32_t *,
				   const float *, const float *, const int64_t *, void *);

struct staged {
	route_fn *route;
	experts_fn *experts;
	combine_fn *combine;
	route_stats_fn *route_stats;
	from_sums_fn *from_sums;
};

static void bind(struct h_model *m, struct staged *s)
{
	*(void **)&s->route = dlsym(m->dl, "moe_route");
	*(void **)&s->experts = dlsym(m->dl, "moe_experts");
	*(void **)&s->combine = dlsym(m->dl, "moe_combine");
	*(void **)&s->route_stats = dlsym(m->dl, "moe_route_stats");
	*(void **)&s->from_sums = dlsym(m->dl, "moe_routing_from_sums");
	assert_non_null(s->route_stats);
	assert_non_null(s->from_sums);
	assert_non_null(s->route);
	assert_non_null(s->experts);
	assert_non_null(s->combine);
}

static int setup(void **state)
{
	(void)state;
	return h_setup("moe_test_stages");
}

/* x in the activation dtype (bf16 bits or float), from a seed. */
static void *make_input(const struct moe_desc *d, size_t T, uint64_t seed)
{
	size_t n = T * d->hidden;
	float *xf = malloc(n * sizeof *xf);
	assert_non_null(xf);
	h_fill_input(xf, n, seed);
	if (d->act_dtype != MOE_DTYPE_BF16)
		return xf;
	uint16_t *xb = malloc(n * sizeof *xb);
	assert_non_null(xb);
	for (size_t i = 0; i < n; i++)
		xb[i] = moe_f32_to_bf16(xf[i]);
	free(xf);
	return xb;
}

/* The forward, then the stages: route; the rows of experts [0, split) on
 * model a and [split, E) on model b, each expert's rows in reverse token
 * order; combine on a. */
static void staged_vs_forward(const struct moe_desc *d, size_t T, uint64_t seed)
{
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(d, &m, err, sizeof err), 0);
	struct staged s;
	bind(&m, &s);
	uint32_t E = d->n_experts, H = d->hidden, W = moe_desc_route_width(d), split = E / 2;
	size_t es = d->act_dtype == MOE_DTYPE_BF16 ? 2 : 4;
	moe_model *full, *a, *b;
	struct moe_create_opts oa = {.threads = 2, .expert_end = split};
	struct moe_create_opts ob = {.threads = 3, .expert_begin = split, .expert_end = E};
	assert_int_equal(m.create(&full, &(struct moe_create_opts){.threads = 2}), MOE_OK);
	assert_int_equal(m.create(&a, &oa), MOE_OK);
	assert_int_equal(m.create(&b, &ob), MOE_OK);
	assert_int_equal(m.init_random(full, 7), MOE_OK);
	assert_int_equal(m.init_random(a, 7), MOE_OK);
	assert_int_equal(m.init_random(b, 7), MOE_OK);
	uint32_t layer = d->moe_layers[1];
	void *x = make_input(d, T, seed);
	void *y_fwd = malloc(T * H * es), *y_st = malloc(T * H * es);
	int32_t *ids = malloc(T * W * sizeof *ids), *ids_f = malloc(T * W * sizeof *ids_f);
	float *w = malloc(T * W * sizeof *w);
	float *xf = malloc(T * H * sizeof *xf);
	float *rows_x = malloc(T * W * H * sizeof *rows_x),
	      *rows_w = malloc(T * W * sizeof *rows_w);
	float *rows_y = malloc(T * W * H * sizeof *rows_y);
	int64_t *slot_row = malloc(T * W * sizeof *slot_row), *counts = calloc(E, sizeof *counts);
	assert_true(y_fwd && y_st && ids && ids_f && w && xf && rows_x && rows_w && rows_y &&
		    slot_row && counts);
	struct moe_routing rt = {.expert_ids = ids_f};
	assert_int_equal(m.forward(full, layer, x, y_fwd, T, &rt, NULL), MOE_OK);

	assert_int_equal(s.route(a, layer, x, T, ids, w, NULL), MOE_OK);
	assert_memory_equal(ids, ids_f, T * W * sizeof *ids);
	for (size_t i = 0; i < T * H; i++)
		xf[i] = es == 2 ? moe_bf16_to_f32(((uint16_t *)x)[i]) : ((float *)x)[i];
	/* group: expert-major, tokens in reverse order within an expert */
	size_t n = 0;
	for (uint32_t e = 0; e < E; e++)
		for (size_t t = T; t-- > 0;)
			for (uint32_t k = 0; k < W; k++) {
				size_t sl = t * W + k;
				if (ids[sl] != (int32_t)e)
					continue;
				memcpy(rows_x + n * H, xf + t * H, H * sizeof *rows_x);
				rows_w[n] = w[sl];
				slot_row[sl] = (int64_t)n++;
				counts[e]++;
			}
	size_t n_a = 0;
	for (uint32_t e = 0; e < split; e++)
		n_a += (size_t)counts[e];
	/* a model's experts refuse the other range's counts */
	memset(rows_y, 0xff, n * H * sizeof *rows_y); /* written, not accumulated */
	assert_int_equal(s.experts(a, layer, rows_x, n_a, counts, rows_w, rows_y), MOE_OK);
	assert_int_equal(s.experts(b, layer, rows_x + n_a * H, n - n_a, counts + split,
				   rows_w + n_a, rows_y + n_a * H),
			 MOE_OK);
	assert_int_equal(s.combine(a, layer, x, T, ids, w, rows_y, slot_row, y_st), MOE_OK);
	assert_memory_equal(y_st, y_fwd, T * H * es);
	/* the same rows in slot order, slot_rows NULL */
	float *slot_y = malloc(T * W * H * sizeof *slot_y);
	assert_non_null(slot_y);
	for (size_t sl = 0; sl < T * W; sl++)
		if (ids[sl] >= 0)
			memcpy(slot_y + sl * H, rows_y + (size_t)slot_row[sl] * H,
			       H * sizeof *slot_y);
	memset(y_st, 0, T * H * es);
	assert_int_equal(s.combine(b, layer, x, T, ids, w, slot_y, NULL, y_st), MOE_OK);
	assert_memory_equal(y_st, y_fwd, T * H * es);
	/* a model holding a part does not run the whole layer */
	assert_int_equal(m.forward(a, layer, x, y_st, T, NULL, NULL), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "staged calls"));
	free(slot_y);
	free(x), free(y_fwd), free(y_st), free(ids), free(ids_f), free(w), free(xf);
	free(rows_x), free(rows_w), free(rows_y), free(slot_row), free(counts);
	m.destroy(full), m.destroy(a), m.destroy(b);
	h_model_close(&m);
}

/* DeepSeek-like routing: sigmoid scores with a selection bias, 4 groups of
 * 4 experts, the best 2 groups by the sum of their top two. */
static void deepseek_like(struct moe_desc *d)
{
	h_base_desc(d, 48, 16, 4, 24);
	d->score = MOE_SCORE_SIGMOID;
	d->select_bias = 1;
	d->n_groups = 4;
	d->group_top = 2;
	d->group_score = MOE_GROUP_SCORE_SUM_TOP2;
}

static void test_staged_equals_forward(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 53, 8, 2, 27); /* no multiples of 8 or 16 */
	staged_vs_forward(&d, 37, 1);
	/* DeepSeek-like: sigmoid scores, shared expert, groups */
	deepseek_like(&d);
	d.shared_count = 1;
	d.shared_intermediate = 24;
	d.scale = 2.5f;
	staged_vs_forward(&d, 29, 2);
	/* a gated shared expert, expert and output biases */
	h_base_desc(&d, 40, 6, 2, 20);
	d.shared_count = 1;
	d.shared_intermediate = 18;
	d.shared_gate = MOE_SHARED_GATE_SIGMOID;
	d.expert_bias = 1;
	d.output_bias = 1;
	staged_vs_forward(&d, 21, 3);
	/* the weight scales the input */
	h_base_desc(&d, 48, 8, 2, 40);
	d.apply_to = MOE_APPLY_INPUT;
	d.score = MOE_SCORE_SIGMOID;
	d.norm = MOE_NORM_NONE;
	d.expert_bias = 1;
	staged_vs_forward(&d, 19, 4);
	/* dense; bf16 weights; bf16 weights and activations */
	h_base_desc(&d, 40, 5, 5, 36);
	d.mode = MOE_MODE_DENSE;
	d.norm = MOE_NORM_NONE;
	staged_vs_forward(&d, 11, 5);
	h_base_desc(&d, 56, 10, 3, 44);
	d.weight_dtype = MOE_DTYPE_BF16;
	staged_vs_forward(&d, 25, 6);
	d.act_dtype = MOE_DTYPE_BF16;
	staged_vs_forward(&d, 25, 7);
}

/* a and b agree within rel relative to the larger */
static void assert_close(double a, double b, double rel)
{
	double m = fabs(a) > fabs(b) ? fabs(a) : fabs(b);
	if (!(fabs(a - b) <= rel * m)) {
		print_error("%.9g and %.9g differ by more than %g relative\n", a, b, rel);
		fail();
	}
}

/* moe_route_stats over tokens [0, cut) then [cut, T) (the sums of the
 * second call added to the first's, as ranks or chunks add theirs), then
 * moe_routing_from_sums: the counts of moe_forward on the whole batch
 * exactly, importance and the losses within 1e-6 relative; the ids and
 * weights those of moe_route. */
static void stats_vs_forward(const struct moe_desc *d, size_t T, size_t cut, uint64_t seed)
{
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(d, &m, err, sizeof err), 0);
	struct staged s;
	bind(&m, &s);
	uint32_t E = d->n_experts, H = d->hidden, W = moe_desc_route_width(d);
	size_t es = d->act_dtype == MOE_DTYPE_BF16 ? 2 : 4;
	moe_model *full, *part;
	assert_int_equal(m.create(&full, &(struct moe_create_opts){.threads = 2}), MOE_OK);
	/* the statistics need no expert: a model holding a part routes */
	assert_int_equal(m.create(&part, &(struct moe_create_opts){.threads = 3, .expert_end = 1}),
			 MOE_OK);
	assert_int_equal(m.init_random(full, 7), MOE_OK);
	assert_int_equal(m.init_random(part, 7), MOE_OK);
	uint32_t layer = d->moe_layers[1];
	void *x = make_input(d, T, seed), *y = malloc(T * H * es);
	int32_t *ids_f = malloc(T * W * sizeof *ids_f), *ids = malloc(T * W * sizeof *ids);
	float *w_f = malloc(T * W * sizeof *w_f), *w = malloc(T * W * sizeof *w);
	int64_t *cnt_f = malloc(E * sizeof *cnt_f), *cnt = malloc(E * sizeof *cnt);
	float *imp_f = malloc(E * sizeof *imp_f), *imp = malloc(E * sizeof *imp);
	double *s_imp = calloc(E, sizeof *s_imp), *s_load = calloc(E, sizeof *s_load);
	assert_true(x && y && ids_f && ids && w_f && w && cnt_f && cnt && imp_f && imp && s_imp &&
		    s_load);
	struct moe_routing rf = {
	    .expert_ids = ids_f, .weights = w_f, .counts = cnt_f, .importance = imp_f};
	assert_int_equal(m.forward(full, layer, x, y, T, &rf, NULL), MOE_OK);

	struct moe_route_sums acc = {.importance = s_imp, .load = s_load};
	assert_int_equal(s.route_stats(part, layer, x, cut, ids, w, NULL, &acc), MOE_OK);
	assert_int_equal(acc.n_tokens, cut);
	assert_int_equal(s.route_stats(part, layer, (const char *)x + cut * H * es, T - cut,
				       ids + cut * W, w + cut * W, NULL, &acc),
			 MOE_OK);
	assert_int_equal(acc.n_tokens, T);
	assert_memory_equal(ids, ids_f, T * W * sizeof *ids);
	assert_memory_equal(w, w_f, T * W * sizeof *w);
	struct moe_routing rs = {.counts = cnt, .importance = imp, .n_dropped = 5};
	assert_int_equal(s.from_sums(part, layer, &acc, &rs), MOE_OK);
	assert_memory_equal(cnt, cnt_f, E * sizeof *cnt);
	double total = 0.0;
	for (uint32_t e = 0; e < E; e++) {
		assert_close(imp[e], imp_f[e], 1e-6);
		total += (double)cnt[e];
	}
	assert_true(total > 0.0);
	assert_true(rf.lb_loss > 0.0f && rf.z_loss > 0.0f);
	assert_close(rs.lb_loss, rf.lb_loss, 1e-6);
	assert_close(rs.z_loss, rf.z_loss, 1e-6);
	assert_close(rs.importance_cv2, rf.importance_cv2, 1e-6);
	assert_int_equal(rs.n_dropped, 0);

	/* no tokens: all zero, as moe_forward of none */
	struct moe_route_sums none = {.importance = s_imp, .load = s_load};
	rs.lb_loss = 1.0f;
	assert_int_equal(s.route_stats(part, layer, NULL, 0, NULL, NULL, NULL, &none), MOE_OK);
	assert_int_equal(s.from_sums(part, layer, &none, &rs), MOE_OK);
	assert_true(rs.lb_loss == 0.0f && rs.z_loss == 0.0f && cnt[0] == 0 && imp[0] == 0.0f);
	/* the sums are required */
	none.load = NULL;
	assert_int_equal(s.route_stats(part, layer, x, 1, ids, w, NULL, &none), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "moe_route_stats"));
	assert_int_equal(s.route_stats(part, layer, x, 1, ids, w, NULL, NULL), MOE_ERR_ARG);
	assert_int_equal(s.from_sums(part, layer, &none, &rs), MOE_ERR_ARG);
	none.load = s_load;
	assert_int_equal(s.from_sums(part, layer + 1000, &none, &rs), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "not an MoE layer"));
	free(x), free(y), free(ids_f), free(ids), free(w_f), free(w), free(cnt_f), free(cnt);
	free(imp_f), free(imp), free(s_imp), free(s_load);
	m.destroy(full), m.destroy(part);
	h_model_close(&m);
}

static void test_stats_equal_forward(void **state)
{
	(void)state;
	struct moe_desc d;
	/* softmax */
	h_base_desc(&d, 48, 8, 2, 24);
	stats_vs_forward(&d, 53, 20, 11);
	/* sigmoid scores with groups and a selection bias; bf16 activations */
	deepseek_like(&d);
	stats_vs_forward(&d, 41, 17, 12);
	d.act_dtype = MOE_DTYPE_BF16;
	stats_vs_forward(&d, 41, 1, 13);
	/* sqrtsoftplus scores; the importance of the sparse gates */
	h_base_desc(&d, 40, 12, 3, 20);
	d.score = MOE_SCORE_SQRTSOFTPLUS;
	stats_vs_forward(&d, 37, 30, 14);
	d.importance_sparse = 1;
	stats_vs_forward(&d, 37, 12, 15);
	/* top-p: slots cut by the threshold have no expert and no load */
	h_base_desc(&d, 40, 10, 4, 24);
	d.mode = MOE_MODE_TOP_P;
	d.norm = MOE_NORM_NONE;
	d.top_p = 0.5f;
	stats_vs_forward(&d, 33, 16, 16);
}

static void test_refusals(void **state)
{
	(void)state;
	struct moe_desc d;
	char err[1024];
	struct h_model m;
	struct staged s;
	h_base_desc(&d, 32, 6, 2, 24);
	d.capacity = MOE_CAPACITY_PER_EXPERT;
	d.capacity_per_expert = 5;
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	bind(&m, &s);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 1), MOE_OK);
	float x[32 * 3] = {0}, w[6];
	int32_t ids[6];
	assert_int_equal(s.route(mm, 0, x, 3, ids, w, NULL), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "with capacity"));
	m.destroy(mm);
	/* a range outside the experts */
	assert_int_equal(
	    m.create(&mm, &(struct moe_create_opts){.expert_begin = 4, .expert_end = 9}),
	    MOE_ERR_ARG);
	assert_null(mm);
	assert_int_equal(m.create(&mm, &(struct moe_create_opts){.expert_begin = 6}), MOE_ERR_ARG);
	h_model_close(&m);

	h_base_desc(&d, 32, 6, 2, 24);
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	bind(&m, &s);
	assert_int_equal(m.create(&mm, &(struct moe_create_opts){.expert_end = 3}), MOE_OK);
	float rows[32 * 4] = {0}, out[32 * 4];
	int64_t counts[3] = {1, 1, 1};
	/* no weights yet */
	assert_int_equal(s.experts(mm, 0, rows, 3, counts, NULL, out), MOE_ERR_WEIGHTS);
	assert_int_equal(m.init_random(mm, 1), MOE_OK);
	/* counts that do not sum to the rows */
	assert_int_equal(s.experts(mm, 0, rows, 4, counts, NULL, out), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "sum to 3"));
	counts[1] = -1;
	assert_int_equal(s.experts(mm, 0, rows, 1, counts, NULL, out), MOE_ERR_ARG);
	assert_int_equal(s.experts(mm, 5, rows, 0, counts, NULL, out), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "layer 5"));
	m.destroy(mm);
	h_model_close(&m);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_staged_equals_forward),
	    cmocka_unit_test(test_stats_equal_forward),
	    cmocka_unit_test(test_refusals),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
