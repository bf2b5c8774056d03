/* test_soft.c: Soft MoE generated for the CPU against the reference on token
 * groups of several sizes (outputs within 1e-5, the same statistics), bit
 * identity across thread counts, a tiny case recomputed in double, and the
 * refused combinations. */
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
static char tmpdir[] = "/tmp/test_soft.XXXXXX";
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

static void soft_desc(struct moe_desc *d, uint32_t H, uint32_t E, uint32_t P, uint32_t I)
{
	base_desc(d, H, E, 0, I);
	d->mode = MOE_MODE_SOFT;
	d->norm = MOE_NORM_NONE;
	d->soft_slots_per_expert = P;
}

/* Token groups of several sizes, GLU and MLP experts, expert and output
 * biases, a shared expert, bf16 weights, 1 and 3 threads. */
static void test_soft_vs_ref(void **state)
{
	(void)state;
	static const size_t Ts[] = {1, 2, 7, 33, 100};
	static const uint32_t Es[] = {2, 5, 8, 3, 16};
	static const uint32_t Ps[] = {1, 3, 2, 4, 1};
	for (size_t i = 0; i < sizeof Es / sizeof *Es; i++) {
		struct moe_desc d;
		soft_desc(&d, 24 + 8 * (uint32_t)i, Es[i], Ps[i], 16 + 8 * (uint32_t)(i % 2));
		if (i == 1) {
			d.kind = MOE_KIND_MLP;
			d.act = MOE_ACT_GELU;
			d.expert_bias = 1;
		}
		if (i == 2) {
			d.shared_count = 1;
			d.shared_intermediate = 16;
			d.output_bias = 1;
		}
		if (i == 3)
			d.output_bias = 1;
		if (i == 4)
			d.weight_dtype = MOE_DTYPE_BF16;
		for (size_t j = 0; j < sizeof Ts / sizeof *Ts; j++)
			compare(&d, Ts[j], j % 2 ? 3 : 1, 100 + 10 * i + j, NULL, NULL);
	}
}

/* The same group with 1 and 3 threads gives the same bits. */
static void test_soft_threads(void **state)
{
	(void)state;
	struct moe_desc d;
	soft_desc(&d, 40, 6, 3, 24);
	d.shared_count = 1;
	d.shared_intermediate = 16;
	size_t T = 57;
	float *y1 = malloc(T * 40 * 4), *y3 = malloc(T * 40 * 4);
	compare(&d, T, 1, 7, NULL, y1);
	compare(&d, T, 3, 7, NULL, y3);
	assert_memory_equal(y1, y3, T * 40 * 4);
	free(y1), free(y3);
}

/* GLU SiLU expert e on xin, in double from the canonical weights. */
static void expert_dbl(const struct moe_ref_weights *w, size_t e, const double *xin, size_t H,
		       size_t I, double *out)
{
	double a[8];
	for (size_t i = 0; i < I; i++) {
		double g = 0, u = 0;
		for (size_t h = 0; h < H; h++) {
			g += (double)w->w[MOE_ROLE_GATE][(e * I + i) * H + h] * xin[h];
			u += (double)w->w[MOE_ROLE_UP][(e * I + i) * H + h] * xin[h];
		}
		a[i] = g / (1.0 + exp(-g)) * u;
	}
	for (size_t h = 0; h < H; h++) {
		out[h] = 0;
		for (size_t i = 0; i < I; i++)
			out[h] += (double)w->w[MOE_ROLE_DOWN][(e * H + h) * I + i] * a[i];
	}
}

/* A tiny group recomputed in double from the formulas of Soft MoE: unit
 * tokens and slots, L = s * cosine, D softmax over tokens, C over slots,
 * slot inputs D^T x, y = C f(x~). The statistics in closed form: counts = P,
 * importance sums to T (combine rows sum to 1), lb_loss = sum imp / T = 1.
 * With T = 1 every dispatch weight is 1, so each slot sees the token itself. */
static void test_soft_hand(void **state)
{
	(void)state;
	static const size_t Ts[] = {1, 3, 5};
	enum { H = 8, E = 2, P = 2, I = 4, S = E * P };
	for (size_t c = 0; c < sizeof Ts / sizeof *Ts; c++) {
		size_t T = Ts[c];
		struct moe_desc d;
		soft_desc(&d, H, E, P, I);
		struct model m;
		char err[2048];
		assert_int_equal(model_open(&d, &m, err, sizeof err), 0);
		moe_model *mm;
		struct moe_create_opts co = {.threads = 2};
		assert_int_equal(m.create(&mm, &co), MOE_OK);
		assert_int_equal(m.init_random(mm, 21 + c), MOE_OK);
		uint32_t layer = d.moe_layers[1];
		struct moe_ref_weights w;
		assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
		moe_ref_weights_random(&d, 21 + c, layer, &w);
		float x[5 * H], y[5 * H], imp[E];
		int64_t cnt[E];
		fill_input(x, T * H, 60 + c);
		struct moe_routing rt = {NULL, NULL, cnt, imp, 0, 0, 0, 0};
		assert_int_equal(m.forward(mm, layer, x, y, T, &rt, NULL), MOE_OK);
		double sc = w.w[MOE_ROLE_SOFT_SCALE][0], L[5][S], D[5][S], C[5][S];
		const float *phi = w.w[MOE_ROLE_SOFT_SLOTS];
		for (size_t t = 0; t < T; t++)
			for (size_t j = 0; j < S; j++) {
				double xx = 0, pp = 0, xp = 0;
				for (size_t h = 0; h < H; h++) {
					xx += (double)x[t * H + h] * x[t * H + h];
					pp += (double)phi[j * H + h] * phi[j * H + h];
					xp += (double)x[t * H + h] * phi[j * H + h];
				}
				L[t][j] = sc * xp / sqrt(xx + 1e-6) / sqrt(pp + 1e-6);
			}
		for (size_t j = 0; j < S; j++) {
			double sum = 0;
			for (size_t t = 0; t < T; t++)
				sum += exp(L[t][j]);
			for (size_t t = 0; t < T; t++)
				D[t][j] = exp(L[t][j]) / sum;
		}
		for (size_t t = 0; t < T; t++) {
			double sum = 0;
			for (size_t j = 0; j < S; j++)
				sum += exp(L[t][j]);
			for (size_t j = 0; j < S; j++)
				C[t][j] = exp(L[t][j]) / sum;
		}
		double Y[S][H], xs[H];
		for (size_t j = 0; j < S; j++) {
			for (size_t h = 0; h < H; h++) {
				xs[h] = 0;
				for (size_t t = 0; t < T; t++)
					xs[h] += D[t][j] * x[t * H + h];
				if (T == 1)
					assert_true(xs[h] == (double)x[h]);
			}
			expert_dbl(&w, j / P, xs, H, I, Y[j]);
		}
		double ymax = 0, emax = 0, imp_sum = 0;
		for (size_t t = 0; t < T; t++)
			for (size_t h = 0; h < H; h++) {
				double v = 0;
				for (size_t j = 0; j < S; j++)
					v += C[t][j] * Y[j][h];
				ymax = fmax(ymax, fabs(v));
				emax = fmax(emax, fabs(v - y[t * H + h]));
			}
		assert_true(ymax > 0);
		assert_true(emax <= 1e-5 * ymax);
		for (size_t e = 0; e < E; e++) {
			double want = 0;
			for (size_t t = 0; t < T; t++)
				for (size_t j = 0; j < P; j++)
					want += C[t][e * P + j];
			assert_int_equal(cnt[e], P);
			assert_true(fabs(imp[e] - want) <= 1e-5 * (double)T);
			imp_sum += imp[e];
		}
		assert_true(fabs(imp_sum - (double)T) <= 1e-5 * (double)T);
		assert_true(fabs(rt.lb_loss - 1.0) <= 1e-5);
		assert_int_equal(rt.n_dropped, 0);
		double z = 0;
		for (size_t t = 0; t < T; t++) {
			double s = 0;
			for (size_t j = 0; j < S; j++)
				s += exp(L[t][j]);
			z += log(s) * log(s);
		}
		assert_true(fabs(rt.z_loss - z / (double)T) <= 1e-5 * fmax(1.0, z / (double)T));
		moe_ref_weights_free(&w);
		m.destroy(mm);
		model_close(&m);
	}
}

/* What is not generated is refused with a message naming it. */
static void test_refusals(void **state)
{
	(void)state;
	struct moe_desc d;
	char err[2048];
	struct model m;
	soft_desc(&d, 32, 4, 2, 16);
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "router.capacity with mode soft"));
	soft_desc(&d, 32, 4, 2, 16);
	d.noise = MOE_NOISE_JITTER;
	d.jitter_eps = 0.01f;
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "router.noise with mode soft"));
	soft_desc(&d, 32, 4, 2, 16);
	d.shared_count = 1;
	d.shared_intermediate = 16;
	d.shared_gate = MOE_SHARED_GATE_SIGMOID;
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "shared_experts.gate sigmoid with mode soft"));
	soft_desc(&d, 32, 4, 0, 16);
	err[0] = 0;
	assert_int_not_equal(model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "slots_per_expert"));
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
	    cmocka_unit_test(test_soft_vs_ref),
	    cmocka_unit_test(test_soft_threads),
	    cmocka_unit_test(test_soft_hand),
	    cmocka_unit_test(test_refusals),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
