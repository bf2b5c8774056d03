/* test_peer.c: PEER product-key retrieval generated for the CPU against the
 * reference (identical selections, f32 outputs within 1e-5) and against an
 * exhaustive top-k over all N = R^2 keys computed here; f32 and bf16 tables,
 * softmax and sigmoid scores, refusals. */
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

static char tmpdir[] = "/tmp/test_peer.XXXXXX";
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

/* A PEER description: R^2 single-neuron experts of width H. */
static void peer_desc(struct moe_desc *d, uint32_t H, uint32_t R, uint32_t heads, uint32_t k,
		      uint32_t dq)
{
	base_desc(d, H, R * R, heads * k, 1);
	d->mode = MOE_MODE_PRODUCT_KEY;
	d->kind = MOE_KIND_SINGLE_NEURON;
	d->act = MOE_ACT_RELU;
	d->norm = MOE_NORM_NONE;
	d->pk_sub_keys = R;
	d->pk_heads = heads;
	d->pk_top_k = k;
	d->pk_query_dim = dq;
	d->pk_score = MOE_SCORE_SOFTMAX;
	d->pk_query_bn = 1;
}

static void test_peer_vs_ref(void **state)
{
	(void)state;
	struct {
		uint32_t H, R, heads, k, dq;
		enum moe_score sc;
		enum moe_act act;
		enum moe_dtype wt;
		float scale;
	} cs[] = {
	    {64, 8, 2, 4, 16, MOE_SCORE_SOFTMAX, MOE_ACT_RELU, MOE_DTYPE_F32, 1.0f},
	    {61, 13, 3, 13, 10, MOE_SCORE_SIGMOID, MOE_ACT_GELU, MOE_DTYPE_F32, 1.0f},
	    {48, 32, 4, 16, 32, MOE_SCORE_SOFTMAX, MOE_ACT_SILU, MOE_DTYPE_BF16, 0.5f},
	    {40, 17, 1, 1, 6, MOE_SCORE_SOFTMAX, MOE_ACT_GELU_TANH, MOE_DTYPE_F32, 1.0f},
	    {72, 24, 8, 7, 2, MOE_SCORE_SIGMOID, MOE_ACT_RELU, MOE_DTYPE_BF16, 2.0f},
	};
	for (size_t i = 0; i < sizeof cs / sizeof *cs; i++) {
		struct moe_desc d;
		peer_desc(&d, cs[i].H, cs[i].R, cs[i].heads, cs[i].k, cs[i].dq);
		d.pk_score = cs[i].sc;
		d.act = cs[i].act;
		d.weight_dtype = cs[i].wt;
		d.scale = cs[i].scale;
		compare(&d, 37, 1 + i % 3, 300 + i, NULL, NULL);
	}
}

static float dot_asc(const float *a, const float *b, uint32_t n)
{
	float s = 0.0f;
	for (uint32_t i = 0; i < n; i++)
		s += a[i] * b[i];
	return s;
}

/* Product keys are exact: the generated selection equals the top-k of all
 * N = R^2 key scores q1.c_i + q2.c'_j, found here by exhaustive search (ties
 * to the lower index), and the weights are the softmax of those k scores. */
static void test_peer_exhaustive(void **state)
{
	(void)state;
	enum { H = 32, R = 16, HEADS = 3, K = 5, DQ = 12, T = 23, N = R * R };
	struct moe_desc d;
	peer_desc(&d, H, R, HEADS, K, DQ);
	struct model m;
	char err[1024];
	assert_int_equal(model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 9), MOE_OK);
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 9, 1, &w);
	static float x[T * H], y[T * H], wt[T * HEADS * K];
	static int32_t ids[T * HEADS * K];
	fill_input(x, T * H, 41);
	struct moe_routing rt = {.expert_ids = ids, .weights = wt};
	assert_int_equal(m.forward(mm, 1, x, y, T, &rt, NULL), MOE_OK);
	const float *Q = w.w[MOE_ROLE_PK_QUERY], *qb = w.w[MOE_ROLE_PK_QUERY_BIAS];
	const float *K1 = w.w[MOE_ROLE_PK_KEYS], *K2 = K1 + R * DQ / 2;
	size_t checked = 0;
	for (int t = 0; t < T; t++)
		for (int hd = 0; hd < HEADS; hd++) {
			float q[DQ], s[N];
			for (int i = 0; i < DQ; i++)
				q[i] = dot_asc(Q + (size_t)(hd * DQ + i) * H, x + t * H, H) +
				       qb[hd * DQ + i];
			for (int e = 0; e < N; e++)
				s[e] = dot_asc(q, K1 + (e / R) * DQ / 2, DQ / 2) +
				       dot_asc(q + DQ / 2, K2 + (e % R) * DQ / 2, DQ / 2);
			int best[K];
			for (int j = 0; j < K; j++) {
				int b = -1;
				for (int e = 0; e < N; e++) {
					int used = 0;
					for (int u = 0; u < j; u++)
						used |= best[u] == e;
					if (!used && (b < 0 || s[e] > s[b]))
						b = e;
				}
				best[j] = b;
			}
			double mx = s[best[0]], sum = 0.0;
			for (int j = 0; j < K; j++)
				sum += exp((double)s[best[j]] - mx);
			for (int j = 0; j < K; j++) {
				size_t slot = (size_t)t * HEADS * K + (size_t)hd * K + (size_t)j;
				assert_int_equal(ids[slot], best[j]);
				double want = exp((double)s[best[j]] - mx) / sum;
				assert_true(fabs(wt[slot] - want) <= 1e-6);
				checked++;
			}
		}
	assert_int_equal(checked, T * HEADS * K);
	moe_ref_weights_free(&w);
	m.destroy(mm);
	model_close(&m);
}

/* What is not generated is refused with a message naming it. */
static void test_peer_refusals(void **state)
{
	(void)state;
	struct moe_desc d;
	struct model m;
	char err[2048];
	peer_desc(&d, 16, 80, 1, 65, 4);
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "top_k > 64"));
	peer_desc(&d, 16, 8, 1, 2, 4);
	d.weight_dtype = MOE_DTYPE_F16;
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "f16 weights"));
	peer_desc(&d, 16, 8, 1, 2, 4);
	d.shared_count = 1;
	d.shared_intermediate = 8;
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "shared experts"));
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
	    cmocka_unit_test(test_peer_vs_ref),
	    cmocka_unit_test(test_peer_exhaustive),
	    cmocka_unit_test(test_peer_refusals),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
