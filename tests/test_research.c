/* test_research.c: the research routers generated for the CPU (sparsemixer,
 * hierarchical gating, noisy top-k with learned noise and jitter, capacity)
 * against the reference: identical choices, outputs within 1e-5, the same
 * statistics; hand-derived cases; noise reproducible bit for bit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dlfcn.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../compiler/backend.h"
#include "../runtime/moe.h"
#include "../runtime/safetensors.h"

static char tmpdir[] = "/tmp/test_research.XXXXXX";
static int n_models;
static int opt_level = 1;

struct model {
	void *dl;
	const struct moe_info *(*info)(void);
	enum moe_status (*create)(moe_model **, const struct moe_create_opts *);
	void (*destroy)(moe_model *);
	enum moe_status (*load)(moe_model *, const char *const *, size_t);
	enum moe_status (*init_random)(moe_model *, uint64_t);
	enum moe_status (*forward)(moe_model *, uint32_t, const void *, void *, size_t,
				   struct moe_routing *, const struct moe_fwd_opts *);
	const char *(*last_error)(void);
	char path[256];
};

/* A small valid token-choice description: callers change fields. */
static void base_desc(struct moe_desc *d, uint32_t H, uint32_t E, uint32_t k, uint32_t I)
{
	memset(d, 0, sizeof *d);
	d->version = MOE_DESC_VERSION;
	snprintf(d->name, sizeof d->name, "cpu-test");
	d->hidden = H;
	d->n_layers = 2;
	d->n_moe_layers = 2;
	d->moe_layers[0] = 0;
	d->moe_layers[1] = 1;
	d->weight_dtype = MOE_DTYPE_F32;
	d->act_dtype = MOE_DTYPE_F32;
	d->mode = MOE_MODE_TOKEN_CHOICE;
	d->score = MOE_SCORE_SOFTMAX;
	d->top_k = k;
	d->norm = MOE_NORM_SUM;
	d->scale = 1.0f;
	d->n_groups = 1;
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

/* Compile d into a fresh model.so and open it. Returns 0 or the compile
 * exit code (err holds the message). */
static int model_open(const struct moe_desc *d, struct model *m, char *err, size_t cap)
{
	memset(m, 0, sizeof *m);
	snprintf(m->path, sizeof m->path, "%s/m%d.so", tmpdir, n_models++);
	struct moe_cpu_target t = {.cpu = "native", .opt_level = opt_level};
	int rc = moe_compile_cpu(d, &t, MOE_EMIT_SO, m->path, err, cap);
	if (rc)
		return rc;
	m->dl = dlopen(m->path, RTLD_NOW | RTLD_LOCAL);
	if (!m->dl)
		fprintf(stderr, "dlopen: %s\n", dlerror());
	assert_non_null(m->dl);
	*(void **)&m->info = dlsym(m->dl, "moe_info");
	*(void **)&m->create = dlsym(m->dl, "moe_create");
	*(void **)&m->destroy = dlsym(m->dl, "moe_destroy");
	*(void **)&m->load = dlsym(m->dl, "moe_load_safetensors");
	*(void **)&m->init_random = dlsym(m->dl, "moe_init_random");
	*(void **)&m->forward = dlsym(m->dl, "moe_forward");
	*(void **)&m->last_error = dlsym(m->dl, "moe_last_error");
	assert_non_null(m->info);
	assert_non_null(m->create);
	assert_non_null(m->destroy);
	assert_non_null(m->load);
	assert_non_null(m->init_random);
	assert_non_null(m->forward);
	assert_non_null(m->last_error);
	/* only the ABI is exported */
	assert_null(dlsym(m->dl, "moe_ref_forward"));
	assert_null(dlsym(m->dl, "moe_gen_model"));
	return 0;
}

static void model_close(struct model *m)
{
	dlclose(m->dl);
	unlink(m->path);
}

static void fill_input(float *x, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++)
		x[i] = 2.0f * moe_rng_uniform(moe_rng_hash(seed, 99, i, 0)) - 1.0f;
}

#define TOL 1e-5

/* Forward T tokens through the generated model and the reference (same
 * weights, same options): identical expert ids in rank order, weights and
 * statistics within f32 rounding, outputs within TOL. y_out (optional)
 * receives the model's output. */
static void compare(const struct moe_desc *d, size_t T, uint32_t threads, uint64_t seed,
		    const struct moe_fwd_opts *opts, float *y_out)
{
	struct model m;
	char err[2048];
	int rc = model_open(d, &m, err, sizeof err);
	if (rc)
		fprintf(stderr, "compile: %s\n", err);
	assert_int_equal(rc, 0);
	moe_model *mm;
	struct moe_create_opts co = {.threads = threads};
	assert_int_equal(m.create(&mm, &co), MOE_OK);
	assert_int_equal(m.init_random(mm, seed), MOE_OK);
	size_t H = d->hidden, W = moe_desc_route_width(d), E = d->n_experts;
	uint32_t layer = d->moe_layers[d->n_moe_layers - 1];
	float *x = malloc(T * H * 4), *y = malloc(T * H * 4), *yr = malloc(T * H * 4);
	int32_t *ids = malloc(T * W * 4), *idr = malloc(T * W * 4);
	float *wg = malloc(T * W * 4), *wr = malloc(T * W * 4);
	int64_t *cnt = malloc(E * 8), *cntr = malloc(E * 8);
	float *imp = malloc(E * 4), *impr = malloc(E * 4);
	fill_input(x, T * H, seed + 1);
	struct moe_fwd_opts fo = opts ? *opts : (struct moe_fwd_opts){0};
	fo.layer = layer;
	struct moe_routing rt = {ids, wg, cnt, imp, 0, 0, 0, 0};
	struct moe_routing rr = {idr, wr, cntr, impr, 0, 0, 0, 0};
	enum moe_status st = m.forward(mm, layer, x, y, T, &rt, &fo);
	if (st)
		fprintf(stderr, "forward: %s\n", m.last_error());
	assert_int_equal(st, MOE_OK);

	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(d, &w), MOE_OK);
	moe_ref_weights_random(d, seed, layer, &w);
	st = moe_ref_forward(d, &w, x, yr, T, &fo, &rr, err, sizeof err);
	if (st)
		fprintf(stderr, "reference: %s\n", err);
	assert_int_equal(st, MOE_OK);
	double rmax = 0, emax = 0;
	for (size_t i = 0; i < T * H; i++) {
		rmax = fmax(rmax, fabs(yr[i]));
		emax = fmax(emax, fabs(y[i] - yr[i]));
	}
	double rel = rmax > 0 ? emax / rmax : emax;
	size_t bad_ids = 0;
	for (size_t i = 0; i < T * W; i++)
		bad_ids += ids[i] != idr[i];
	if (bad_ids || !(rel <= TOL)) {
		char dump[8192];
		moe_desc_dump(d, dump, sizeof dump);
		fprintf(stderr, "mismatch: rel %g, %zu ids differ, T %zu\n%s", rel, bad_ids, T,
			dump);
	}
	assert_int_equal(bad_ids, 0);
	assert_true(rel <= TOL);
	for (size_t i = 0; i < T * W; i++)
		assert_true(fabs(wg[i] - wr[i]) <= 1e-6 * fmax(1.0, fabs(wr[i])));
	for (size_t i = 0; i < E; i++) {
		assert_int_equal(cnt[i], cntr[i]);
		assert_true(fabs(imp[i] - impr[i]) <= 1e-5 * fmax(1.0, fabs(impr[i])));
	}
	assert_int_equal(rt.n_dropped, rr.n_dropped);
	assert_true(fabs(rt.lb_loss - rr.lb_loss) <= 1e-5 * fmax(1.0, fabs(rr.lb_loss)));
	assert_true(fabs(rt.z_loss - rr.z_loss) <= 1e-5 * fmax(1.0, fabs(rr.z_loss)));
	assert_true(fabs(rt.importance_cv2 - rr.importance_cv2) <=
		    1e-4 * fmax(1.0, fabs(rr.importance_cv2)));
	if (y_out)
		memcpy(y_out, y, T * H * 4);
	moe_ref_weights_free(&w);
	free(x), free(y), free(yr), free(ids), free(idr), free(wg), free(wr);
	free(cnt), free(cntr), free(imp), free(impr);
	m.destroy(mm);
	model_close(&m);
}

static void sparsemixer_desc(struct moe_desc *d, uint32_t H, uint32_t E, float eps)
{
	base_desc(d, H, E, 2, 24);
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
		compare(&d, 37, 2, 100 + i, NULL, NULL);
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
	struct model m;
	char err[1024];
	assert_int_equal(model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 5), MOE_OK);
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 5, 1, &w);
	enum { T = 9 };
	float x[T * 24], y[T * 24], wt[T * 2];
	int32_t ids[T * 2];
	fill_input(x, T * 24, 77);
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
	model_close(&m);
}

static void hier_desc(struct moe_desc *d, uint32_t E, uint32_t G, uint32_t k1, uint32_t k2)
{
	base_desc(d, 32, E, k1 * k2, 20);
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
		compare(&d, 23 + i * 7, 1 + i % 3, 200 + i, NULL, NULL);
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
	struct model m;
	char err[1024];
	assert_int_equal(model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 8), MOE_OK);
	enum { T = 7 };
	float x[T * 32], y[T * 32], wt[T * 12];
	int32_t ids[T * 12];
	fill_input(x, T * 32, 3);
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
	model_close(&m);
}

static void noisy_desc(struct moe_desc *d, uint32_t E, uint32_t k)
{
	base_desc(d, 32, E, k, 24);
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
	compare(&d, 41, 2, 300, &tr, NULL);
	compare(&d, 41, 2, 300, NULL, NULL);
	for (int pr = 0; pr < MOE_PRIORITY_COUNT; pr++) {
		noisy_desc(&d, 8, 2);
		d.capacity = MOE_CAPACITY_FACTOR;
		d.capacity_factor = 1.0f;
		d.priority = (enum moe_priority)pr;
		d.overflow = pr ? MOE_OVERFLOW_PASSTHROUGH : MOE_OVERFLOW_DROP;
		compare(&d, 50, 3, 310 + pr, &tr, NULL);
	}
	noisy_desc(&d, 12, 3);
	d.score = MOE_SCORE_SIGMOID;
	d.router_bias = 1;
	d.select_bias = 1;
	compare(&d, 19, 1, 320, &tr, NULL);
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
	compare(&d, T, 1, 400, &tr, y1);
	compare(&d, T, 3, 400, &tr, y2);
	assert_memory_equal(y1, y2, sizeof y1);
	tr.seed = 43;
	compare(&d, T, 2, 400, &tr, y3);
	compare(&d, T, 2, 400, NULL, y4);
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
	compare(&d, 29, 2, 500, &tr, y1);
	compare(&d, 29, 2, 500, NULL, y2);
	assert_memory_not_equal(y1, y2, sizeof y1);
	base_desc(&d, 40, 8, 2, 24);
	d.noise = MOE_NOISE_JITTER;
	d.jitter_eps = 0.2f;
	compare(&d, 29, 1, 501, &tr, NULL);
	hier_desc(&d, 16, 4, 2, 2);
	d.noise = MOE_NOISE_LEARNED_GAUSSIAN;
	d.norm = MOE_NORM_SUM;
	compare(&d, 31, 2, 502, &tr, NULL);
}

/* What is not generated is refused with a message naming it. */
static void test_refusals(void **state)
{
	(void)state;
	struct moe_desc d;
	char err[2048];
	struct model m;
	static const enum moe_mode modes[] = {MOE_MODE_SOFT, MOE_MODE_PRODUCT_KEY};
	for (size_t i = 0; i < 2; i++) {
		base_desc(&d, 32, 8, 2, 16);
		d.mode = modes[i];
		d.ec_capacity_factor = 1.0f;
		d.soft_slots_per_expert = 1;
		if (modes[i] == MOE_MODE_SOFT) /* soft is generated, not with noise */
			d.noise = MOE_NOISE_JITTER, d.jitter_eps = 0.01f;
		err[0] = 0;
		assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
		assert_non_null(strstr(err, moe_mode_names[modes[i]]));
	}
	hier_desc(&d, 8, 2, 1, 2);
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "capacity"));
	hier_desc(&d, 8, 3, 1, 2); /* 3 groups do not divide 8 experts */
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "hierarchical"));
}

static int setup(void **state)
{
	(void)state;
	return mkdtemp(tmpdir) ? 0 : -1;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb, (void)flag, (void)ftw;
	return remove(path);
}

static int teardown(void **state)
{
	(void)state;
	return nftw(tmpdir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
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
	    cmocka_unit_test(test_refusals),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
