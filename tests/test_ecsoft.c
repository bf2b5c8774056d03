/* test_ecsoft.c: expert-choice routing generated for the CPU against the
 * reference on token groups of several sizes (identical selections, outputs
 * within 1e-5, the same statistics), hand-derived tiny cases and the
 * statistics' closed forms; refusals by name. */
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
static char tmpdir[] = "/tmp/test_ecsoft.XXXXXX";
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

static void ec_desc(struct moe_desc *d, uint32_t H, uint32_t E, uint32_t I, float factor)
{
	base_desc(d, H, E, 0, I);
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
			compare(&d, Ts[j], j % 2 ? 3 : 1, 100 + 10 * i + j, NULL, NULL);
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
	compare(&d, T, 1, 7, NULL, y1);
	compare(&d, T, 3, 7, NULL, y3);
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
	static const struct {
		size_t T;
		uint32_t E;
		float f;
	} cases[] = {{5, 3, 1.0f}, {6, 4, 0.5f}, {3, 2, 4.0f}, {9, 4, 2.0f}};
	for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
		size_t T = cases[c].T, H = 16;
		uint32_t E = cases[c].E;
		struct moe_desc d;
		ec_desc(&d, (uint32_t)H, E, 8, cases[c].f);
		d.scale = 2.0f;
		struct model m;
		char err[2048];
		assert_int_equal(model_open(&d, &m, err, sizeof err), 0);
		moe_model *mm;
		struct moe_create_opts co = {.threads = 2};
		assert_int_equal(m.create(&mm, &co), MOE_OK);
		assert_int_equal(m.init_random(mm, 11 + c), MOE_OK);
		uint32_t layer = d.moe_layers[1];
		struct moe_ref_weights w;
		assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
		moe_ref_weights_random(&d, 11 + c, layer, &w);
		float x[9 * 16], y[9 * 16], wt[9 * 4], imp[4];
		int32_t ids[9 * 4];
		int64_t cnt[4];
		fill_input(x, T * H, 50 + c);
		struct moe_routing rt = {ids, wt, cnt, imp, 0, 0, 0, 0};
		assert_int_equal(m.forward(mm, layer, x, y, T, &rt, NULL), MOE_OK);
		size_t C = (size_t)ceil((double)T * cases[c].f / E);
		if (C > T)
			C = T;
		double S[9][4];
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
			struct scored col[9];
			for (size_t t = 0; t < T; t++)
				col[t] = (struct scored){S[t][e], t};
			qsort(col, T, sizeof *col, cmp_scored);
			int chosen[9] = {0};
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
		model_close(&m);
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
	struct model m;
	char err[2048];
	assert_int_equal(model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 5), MOE_OK);
	float x[8 * 16], y[8 * 16], wt[16];
	int32_t ids[16];
	int64_t cnt[2];
	fill_input(x, T * H, 77);
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
	model_close(&m);
}

/* What is not generated is refused with a message naming it. */
static void test_refusals(void **state)
{
	(void)state;
	struct moe_desc d;
	char err[2048];
	struct model m;
	base_desc(&d, 32, 8, 2, 16);
	d.mode = MOE_MODE_SOFT;
	d.soft_slots_per_expert = 1;
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "router.capacity with mode soft is not generated"));
	ec_desc(&d, 32, 8, 16, 1.0f);
	d.noise = MOE_NOISE_LEARNED_GAUSSIAN;
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "learned_gaussian"));
	ec_desc(&d, 32, 8, 16, 1.0f);
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "capacity"));
	ec_desc(&d, 32, 8, 16, 0.0f);
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "capacity_factor"));
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
	    cmocka_unit_test(test_ec_vs_ref), cmocka_unit_test(test_ec_threads),
	    cmocka_unit_test(test_ec_hand),   cmocka_unit_test(test_ec_unchosen_zero),
	    cmocka_unit_test(test_refusals),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
