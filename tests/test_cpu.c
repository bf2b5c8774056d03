/* test_cpu.c: the CPU backend end to end: descriptions built in C are
 * compiled to model.so, opened through the public ABI and compared with the
 * reference forward pass (max relative error, identical expert choices), plus
 * batch and thread-count invariance bit for bit, every runtime error path,
 * refusals, deterministic output and a randomized sweep (MOE_TEST_SEED). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "safetensors.h"

/* Same expert set per token (order free). */
static int same_sets(const int32_t *a, const int32_t *b, size_t T, size_t W, size_t *bad_tok)
{
	for (size_t t = 0; t < T; t++)
		for (size_t j = 0; j < W; j++) {
			int found = 0;
			for (size_t i = 0; i < W; i++)
				found |= a[t * W + j] == b[t * W + i];
			if (!found) {
				*bad_tok = t;
				return 0;
			}
		}
	return 1;
}

struct cmp_result {
	double rel, nmse;
	int routing_ok;
};

/* Forward T tokens of layer `layer` through the model and the reference on
 * the same random weights; fail the test on a mismatch. */
static struct cmp_result compare(const struct moe_desc *d, size_t T, uint32_t threads,
				 uint64_t seed, double tol)
{
	struct h_model m;
	char err[2048];
	int rc = h_model_open(d, &m, err, sizeof err);
	if (rc)
		fprintf(stderr, "compile: %s\n", err);
	assert_int_equal(rc, 0);
	moe_model *mm;
	struct moe_create_opts co = {.threads = threads};
	assert_int_equal(m.create(&mm, &co), MOE_OK);
	assert_int_equal(m.init_random(mm, seed), MOE_OK);
	size_t H = d->hidden, W = moe_desc_route_width(d), E = d->n_experts;
	uint32_t layer = d->moe_layers[d->n_moe_layers - 1];
	float *x = malloc((T + 1) * H * 4), *y = malloc((T + 1) * H * 4);
	float *yr = malloc((T + 1) * H * 4), *mag = malloc((T + 1) * H * 4);
	int32_t *ids = malloc((T + 1) * W * 4), *idr = malloc((T + 1) * W * 4);
	float *wg = malloc((T + 1) * W * 4), *wr = malloc((T + 1) * W * 4);
	int64_t *cnt = malloc(E * 8), *cntr = malloc(E * 8);
	float *imp = malloc(E * 4), *impr = malloc(E * 4);
	uint16_t *xb = malloc((T + 1) * H * 2), *yb = malloc((T + 1) * H * 2);
	h_fill_input(x, T * H, seed + 1);
	int bf16 = d->act_dtype == MOE_DTYPE_BF16;
	for (size_t i = 0; bf16 && i < T * H; i++) {
		xb[i] = moe_f32_to_bf16(x[i]);
		x[i] = moe_bf16_to_f32(xb[i]);
	}
	struct moe_routing rt = {ids, wg, cnt, imp, 0, 0, 0, 0};
	struct moe_routing rr = {idr, wr, cntr, impr, 0, 0, 0, 0};
	enum moe_status st = m.forward(mm, layer, bf16 ? (void *)xb : (void *)x,
				       bf16 ? (void *)yb : (void *)y, T, &rt, NULL);
	if (st)
		fprintf(stderr, "forward: %s\n", m.last_error());
	assert_int_equal(st, MOE_OK);
	for (size_t i = 0; bf16 && i < T * H; i++)
		y[i] = moe_bf16_to_f32(yb[i]);

	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(d, &w), MOE_OK);
	moe_ref_weights_random(d, seed, layer, &w);
	struct moe_fwd_opts fo = {.layer = layer};
	st = moe_ref_forward_mag(d, &w, x, yr, mag, T, &fo, &rr, err, sizeof err);
	if (st)
		fprintf(stderr, "reference: %s\n", err);
	assert_int_equal(st, MOE_OK);

	struct cmp_result res = {0, 0, 1};
	double se = 0, sr = 0;
	for (size_t i = 0; i < T * H; i++) {
		double r = bf16 ? moe_bf16_round(yr[i]) : yr[i];
		se += (y[i] - r) * (y[i] - r);
		sr += r * r;
	}
	res.rel = moe_ref_out_err(y, yr, moe_desc_compute_tol(d, 0) > 0 ? mag : NULL, T * H, bf16);
	tol = moe_desc_compute_tol(d, tol); /* bf16 or int8 compute where the CPU has it */
	res.nmse = sr > 0 ? se / sr : se;
	size_t bad = 0;
	res.routing_ok = same_sets(ids, idr, T, W, &bad);
	if (!res.routing_ok || !(res.rel <= tol)) {
		char dump[8192];
		moe_desc_dump(d, dump, sizeof dump);
		fprintf(stderr, "mismatch: rel %g (tol %g) routing_ok %d (token %zu) T %zu\n%s",
			res.rel, tol, res.routing_ok, bad, T, dump);
	}
	assert_true(res.routing_ok);
	assert_true(res.rel <= tol);
	/* routing output and statistics as the reference documents them */
	for (size_t i = 0; i < E; i++)
		assert_int_equal(cnt[i], cntr[i]);
	assert_int_equal(rt.n_dropped, rr.n_dropped);
	for (size_t i = 0; i < T * W; i++) {
		/* same set; same order too since the router ranks like the reference */
		assert_int_equal(ids[i], idr[i]);
		assert_true(fabs(wg[i] - wr[i]) <= 1e-6 * fmax(1.0, fabs(wr[i])));
	}
	assert_true(fabs(rt.lb_loss - rr.lb_loss) <= 1e-5 * fmax(1.0, fabs(rr.lb_loss)));
	assert_true(fabs(rt.z_loss - rr.z_loss) <= 1e-5 * fmax(1.0, fabs(rr.z_loss)));
	assert_true(fabs(rt.importance_cv2 - rr.importance_cv2) <=
		    1e-4 * fmax(1.0, fabs(rr.importance_cv2)));
	for (size_t i = 0; i < E; i++)
		assert_true(fabs(imp[i] - impr[i]) <= 1e-5 * fmax(1.0, fabs(impr[i])));

	moe_ref_weights_free(&w);
	free(x), free(y), free(yr), free(mag), free(ids), free(idr), free(wg), free(wr);
	free(cnt), free(cntr), free(imp), free(impr), free(xb), free(yb);
	m.destroy(mm);
	h_model_close(&m);
	return res;
}

/* bf16/f16 weights: the reference runs on the same rounded weights, so the
 * f32 bound holds up to accumulation order. */
#define TOL 1e-5

static void test_expert_counts(void **state)
{
	(void)state;
	static const uint32_t Es[] = {1, 3, 60, 160, 384};
	static const uint32_t ks[] = {1, 2, 4, 6, 8};
	for (size_t i = 0; i < sizeof Es / sizeof *Es; i++) {
		struct moe_desc d;
		h_base_desc(&d, 40, Es[i], ks[i], 24);
		compare(&d, 29, 2, 11 + i, TOL);
	}
}

/* One feature at a time, each against the reference. */
static void test_features(void **state)
{
	(void)state;
	struct moe_desc d;
	for (int sc = 0; sc < MOE_SCORE_COUNT; sc++)
		for (int nm = 0; nm < MOE_NORM_COUNT; nm++) {
			h_base_desc(&d, 48, 12, 3, 40);
			d.score = sc;
			d.norm = nm;
			d.norm_p = 2.0f;
			d.norm_eps = nm ? 1e-6f : 0.0f;
			d.norm_min = nm == MOE_NORM_SUM ? 0.05f : 0.0f;
			d.scale = 2.5f;
			compare(&d, 21, 2, 100 + (uint64_t)sc * 3 + nm, TOL);
		}
	h_base_desc(&d, 48, 12, 3, 40);
	d.norm = MOE_NORM_LP;
	d.norm_p = 1.0f;
	compare(&d, 21, 2, 5, TOL);
	/* the router logits on a 256-bit target's tiles (4 rows by 16 lanes),
	 * 61 experts: full and partial tiles and blocks */
	h_base_desc(&d, 48, 61, 5, 40);
	h_features = "-avx512f";
	compare(&d, 23, 2, 4, TOL);
	h_features = NULL;
	h_base_desc(&d, 48, 12, 3, 40);
	d.router_bias = 1;
	d.score = MOE_SCORE_SIGMOID;
	compare(&d, 21, 2, 6, TOL);
	h_base_desc(&d, 48, 16, 4, 40);
	d.select_bias = 1;
	d.score = MOE_SCORE_SIGMOID;
	d.n_groups = 4;
	d.group_top = 2;
	d.group_score = MOE_GROUP_SCORE_SUM_TOP2;
	compare(&d, 33, 2, 7, TOL);
	d.group_score = MOE_GROUP_SCORE_MAX;
	d.select_bias = 0;
	d.score = MOE_SCORE_SOFTMAX;
	compare(&d, 33, 2, 8, TOL);
	/* capacity: drop and passthrough, both priorities */
	for (int ov = 0; ov < MOE_OVERFLOW_COUNT; ov++)
		for (int pr = 0; pr < MOE_PRIORITY_COUNT; pr++) {
			h_base_desc(&d, 32, 6, 2, 24);
			d.capacity = pr ? MOE_CAPACITY_PER_EXPERT : MOE_CAPACITY_FACTOR;
			d.capacity_factor = 0.75f;
			d.capacity_per_expert = 5;
			d.priority = pr;
			d.overflow = ov;
			d.select_bias = 1;
			struct cmp_result r = compare(&d, 40, 2, 9 + (uint64_t)ov * 2 + pr, TOL);
			(void)r;
		}
	h_base_desc(&d, 48, 8, 2, 40);
	d.apply_to = MOE_APPLY_INPUT;
	d.score = MOE_SCORE_SIGMOID;
	d.norm = MOE_NORM_NONE;
	compare(&d, 21, 2, 13, TOL);
	for (int a = 0; a < MOE_ACT_COUNT; a++) {
		h_base_desc(&d, 40, 8, 2, 36);
		d.act = a;
		compare(&d, 17, 2, 14 + (uint64_t)a, TOL);
		if (a == MOE_ACT_SWIGLU_OAI)
			continue;
		d.kind = MOE_KIND_MLP;
		compare(&d, 17, 2, 20 + (uint64_t)a, TOL);
	}
	h_base_desc(&d, 40, 8, 2, 36);
	d.act = MOE_ACT_SWIGLU_OAI;
	d.act_limit = 0.05f; /* small so the clamps bite */
	d.expert_bias = 1;
	d.router_bias = 1;
	compare(&d, 17, 2, 26, TOL);
	d.kind = MOE_KIND_MLP;
	d.act = MOE_ACT_RELU;
	d.apply_to = MOE_APPLY_INPUT;
	compare(&d, 17, 2, 27, TOL);
	/* shared experts, gated and not, glu and mlp */
	for (int gate = 0; gate < 2; gate++) {
		h_base_desc(&d, 40, 8, 2, 36);
		d.shared_count = 2;
		d.shared_intermediate = 20;
		d.shared_gate = gate ? MOE_SHARED_GATE_SIGMOID : MOE_SHARED_GATE_NONE;
		compare(&d, 23, 2, 28 + (uint64_t)gate, TOL);
		d.shared_kind = MOE_KIND_MLP;
		d.shared_act = MOE_ACT_GELU_TANH;
		compare(&d, 23, 2, 30 + (uint64_t)gate, TOL);
	}
	/* dense */
	h_base_desc(&d, 40, 5, 5, 36);
	d.mode = MOE_MODE_DENSE;
	d.norm = MOE_NORM_NONE;
	compare(&d, 19, 2, 32, TOL);
	/* weight and activation dtypes */
	/* f32 compute: widened 16-bit weights, the f32 bound */
	for (int dt = 0; dt < MOE_DTYPE_COUNT; dt++) {
		h_base_desc(&d, 56, 10, 3, 44);
		d.weight_dtype = dt;
		d.compute = MOE_COMPUTE_F32;
		d.shared_count = 1;
		d.shared_intermediate = 24;
		compare(&d, 25, 2, 33 + (uint64_t)dt, TOL);
	}
	h_base_desc(&d, 56, 10, 3, 44);
	d.act_dtype = MOE_DTYPE_BF16;
	d.weight_dtype = MOE_DTYPE_BF16;
	d.compute = MOE_COMPUTE_F32;
	compare(&d, 25, 2, 36, 1.0 / 128);
}

/* Output row i depends only on input row i, bit for bit, whatever the batch,
 * tile and thread count. */
static void test_invariance(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 53, 9, 3, 27); /* no multiples of 8 or 16 anywhere */
	d.shared_count = 1;
	d.shared_intermediate = 19;
	d.shared_gate = MOE_SHARED_GATE_SIGMOID;
	d.expert_bias = 1;
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	size_t T = 45, H = d.hidden;
	float *x = malloc(T * H * 4), *y1 = malloc(T * H * 4), *yb = malloc(T * H * 4);
	float *y2 = malloc(T * H * 4);
	h_fill_input(x, T * H, 5);
	moe_model *a, *b;
	struct moe_create_opts one = {.threads = 1}, three = {.threads = 3};
	assert_int_equal(m.create(&a, &one), MOE_OK);
	assert_int_equal(m.create(&b, &three), MOE_OK);
	assert_int_equal(m.init_random(a, 3), MOE_OK);
	assert_int_equal(m.init_random(b, 3), MOE_OK);
	assert_int_equal(m.forward(a, 1, x, y1, T, NULL, NULL), MOE_OK);
	for (size_t t = 0; t < T; t++)
		assert_int_equal(m.forward(a, 1, x + t * H, yb + t * H, 1, NULL, NULL), MOE_OK);
	assert_memory_equal(y1, yb, T * H * 4);
	/* odd chunks so rows land in different tiles */
	for (size_t t = 0; t < T;) {
		size_t n = t % 7 + 1 < T - t ? t % 7 + 1 : T - t;
		assert_int_equal(m.forward(b, 1, x + t * H, yb + t * H, n, NULL, NULL), MOE_OK);
		t += n;
	}
	assert_memory_equal(y1, yb, T * H * 4);
	assert_int_equal(m.forward(b, 1, x, y2, T, NULL, NULL), MOE_OK);
	assert_memory_equal(y1, y2, T * H * 4);
	/* and the result is real: it matches the reference */
	m.destroy(a), m.destroy(b);
	h_model_close(&m);
	compare(&d, T, 3, 3, TOL);
	free(x), free(y1), free(yb), free(y2);
}

/* The K blocks of the f32 tiles on 256-bit targets (K over 256 and more
 * than one row block in a call): 160 tokens, about 107 rows per expert (two
 * chunks of at most 96), 97 up panels (groups of 16, the last one short),
 * K in blocks of 130 (H 520), 194 (I 776) and 98 (shared I 392), the last
 * down panel masked (520 = 32 x 16 + 8), a shared expert whose down adds
 * to y; f32 and bf16 weights. Each token alone (one row block: the
 * unblocked loops) gives the batch's row bit for bit, and the batch is
 * within the reference's bound. */
static void k_blocks(enum moe_dtype wt)
{
	struct moe_desc d;
	h_base_desc(&d, 520, 3, 2, 776);
	d.shared_count = 1;
	d.shared_intermediate = 392;
	d.expert_bias = 1;
	d.weight_dtype = wt;
	h_features = "-avx512f";
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	size_t T = 160, H = d.hidden;
	float *x = malloc(T * H * 4), *y = malloc(T * H * 4), *y1 = malloc(T * H * 4);
	assert_true(x && y && y1);
	h_fill_input(x, T * H, 11);
	moe_model *a;
	struct moe_create_opts two = {.threads = 2};
	assert_int_equal(m.create(&a, &two), MOE_OK);
	assert_int_equal(m.init_random(a, 12), MOE_OK);
	assert_int_equal(m.forward(a, 1, x, y, T, NULL, NULL), MOE_OK);
	for (size_t t = 0; t < T; t++)
		assert_int_equal(m.forward(a, 1, x + t * H, y1 + t * H, 1, NULL, NULL), MOE_OK);
	assert_memory_equal(y, y1, T * H * 4);
	m.destroy(a);
	h_model_close(&m);
	compare(&d, T, 2, 13, TOL);
	h_features = NULL;
	free(x), free(y), free(y1);
}

static void test_k_blocks(void **state)
{
	(void)state;
	k_blocks(MOE_DTYPE_F32);
	k_blocks(MOE_DTYPE_BF16); /* bf16 panels, f32 compute (no avx512_bf16) */
}

static void test_errors(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 16, 4, 2, 8);
	d.noise = MOE_NOISE_LEARNED_GAUSSIAN;
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	const struct moe_info *in = m.info();
	assert_int_equal(in->abi_version, MOE_ABI_VERSION);
	assert_int_equal(in->hidden, 16);
	assert_int_equal(in->n_experts, 4);
	assert_int_equal(in->top_k, 2);
	assert_int_equal(in->n_moe_layers, 2);
	/* the full description is the model dump, and the spec hash is its hash */
	char text[8192], dump[8192];
	assert_int_equal(m.describe(text, sizeof text), moe_desc_dump(&d, dump, sizeof dump));
	assert_string_equal(text, dump);
	char hash[33];
	moe_desc_hash(&d, hash);
	assert_string_equal(in->spec_hash, hash);

	float x[2 * 16], y[2 * 16];
	h_fill_input(x, 32, 1);
	assert_int_equal(m.create(NULL, NULL), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "NULL"));
	moe_model *mm;
	struct moe_create_opts cuda = {.device = MOE_DEVICE_CUDA};
	assert_int_equal(m.create(&mm, &cuda), MOE_ERR_DEVICE);
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.forward(NULL, 0, x, y, 2, NULL, NULL), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "NULL"));
	assert_int_equal(m.init_random(NULL, 1), MOE_ERR_ARG);
	/* forward before weights */
	assert_int_equal(m.forward(mm, 0, x, y, 2, NULL, NULL), MOE_ERR_WEIGHTS);
	assert_non_null(strstr(m.last_error(), "no weights loaded"));
	assert_int_equal(m.init_random(mm, 1), MOE_OK);
	assert_int_equal(m.forward(mm, 7, x, y, 2, NULL, NULL), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "layer 7 is not an MoE layer"));
	assert_int_equal(m.forward(mm, 0, NULL, y, 2, NULL, NULL), MOE_ERR_ARG);
	assert_int_equal(m.forward(mm, 0, x, NULL, 2, NULL, NULL), MOE_ERR_ARG);
	/* zero tokens is fine, with NULL tensors, and zeroes the statistics */
	int64_t cnt[4] = {9, 9, 9, 9};
	struct moe_routing rt = {.counts = cnt, .lb_loss = 3, .n_dropped = 4};
	assert_int_equal(m.forward(mm, 0, NULL, NULL, 0, &rt, NULL), MOE_OK);
	assert_int_equal(cnt[0] + cnt[1] + cnt[2] + cnt[3], 0);
	assert_true(rt.lb_loss == 0.0f);
	assert_int_equal(rt.n_dropped, 0);
	/* non-finite input */
	x[16 + 5] = NAN;
	assert_int_equal(m.forward(mm, 1, x, y, 2, NULL, NULL), MOE_ERR_INPUT);
	assert_non_null(strstr(m.last_error(), "non-finite input at token 1, column 5"));
	x[16 + 5] = INFINITY;
	assert_int_equal(m.forward(mm, 1, x, y, 2, NULL, NULL), MOE_ERR_INPUT);
	x[16 + 5] = 0.5f;
	/* training-mode noise is generated: it runs, reproducibly */
	struct moe_fwd_opts tr = {.training = 1, .seed = 1};
	assert_int_equal(m.forward(mm, 1, x, y, 2, NULL, &tr), MOE_OK);
	assert_int_equal(m.forward(mm, 1, x, y, 2, NULL, NULL), MOE_OK);
	/* safetensors errors */
	const char *none[] = {"/nonexistent/x.safetensors"};
	assert_int_not_equal(m.load(mm, none, 1), MOE_OK);
	assert_non_null(strstr(m.last_error(), "x.safetensors"));
	assert_int_equal(m.load(mm, NULL, 0), MOE_ERR_ARG);
	/* a failed load leaves no weights behind */
	assert_int_equal(m.forward(mm, 0, x, y, 2, NULL, NULL), MOE_ERR_WEIGHTS);
	m.destroy(mm);
	m.destroy(NULL);
	h_model_close(&m);
}

static void test_refusals(void **state)
{
	(void)state;
	/* every mode is generated; soft mode with noise is not */
	static const enum moe_mode modes[] = {MOE_MODE_SOFT};
	for (size_t i = 0; i < sizeof modes / sizeof *modes; i++) {
		struct moe_desc d;
		h_base_desc(&d, 16, 4, 2, 8);
		d.mode = modes[i];
		d.soft_slots_per_expert = 1;
		d.noise = MOE_NOISE_JITTER;
		char err[1024], want[256], path[300];
		snprintf(path, sizeof path, "%s/refused.so", h_tmpdir);
		struct moe_cpu_target t = {.opt_level = 1};
		assert_int_equal(moe_compile_cpu(&d, &t, MOE_EMIT_SO, path, err, sizeof err),
				 MOE_EXIT_BACKEND);
		snprintf(want, sizeof want,
			 "router.noise with mode %s is not generated for target cpu yet",
			 moe_mode_names[modes[i]]);
		assert_string_equal(err, want);
		assert_int_not_equal(access(path, F_OK), 0);
	}
}

static int read_file(const char *path, char **buf, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return -1;
	fseek(f, 0, SEEK_END);
	*len = (size_t)ftell(f);
	fseek(f, 0, SEEK_SET);
	*buf = malloc(*len + 1);
	size_t n = fread(*buf, 1, *len, f);
	(*buf)[n] = 0;
	fclose(f);
	return n == *len ? 0 : -1;
}

static void test_deterministic(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 24, 6, 2, 16);
	d.shared_count = 1;
	d.shared_intermediate = 8;
	static const enum moe_emit kinds[] = {MOE_EMIT_SO, MOE_EMIT_LL, MOE_EMIT_OBJ,
					      MOE_EMIT_HEADER};
	struct moe_cpu_target t = {
	    .cpu = "x86-64-v3", .triple = "x86_64-pc-linux-gnu", .opt_level = 3};
	/* one file name in two directories: model.so's SONAME is its file name */
	char d1[300], d2[300];
	snprintf(d1, sizeof d1, "%s/det1", h_tmpdir);
	snprintf(d2, sizeof d2, "%s/det2", h_tmpdir);
	assert_true(mkdir(d1, 0700) == 0 || errno == EEXIST);
	assert_true(mkdir(d2, 0700) == 0 || errno == EEXIST);
	for (size_t i = 0; i < sizeof kinds / sizeof *kinds; i++) {
		char p1[400], p2[400], err[1024];
		snprintf(p1, sizeof p1, "%s/det.%s", d1, moe_emit_names[kinds[i]]);
		snprintf(p2, sizeof p2, "%s/det.%s", d2, moe_emit_names[kinds[i]]);
		assert_int_equal(moe_compile_cpu(&d, &t, kinds[i], p1, err, sizeof err), 0);
		assert_int_equal(moe_compile_cpu(&d, &t, kinds[i], p2, err, sizeof err), 0);
		char *a, *b;
		size_t la, lb;
		assert_int_equal(read_file(p1, &a, &la), 0);
		assert_int_equal(read_file(p2, &b, &lb), 0);
		assert_true(la > 0);
		assert_int_equal(la, lb);
		assert_memory_equal(a, b, la);
		if (kinds[i] == MOE_EMIT_LL) {
			assert_non_null(strstr(a, "define hidden void @moe_router("));
			assert_non_null(strstr(a, "define hidden void @moe_up("));
			assert_non_null(strstr(a, "define hidden void @moe_shared_down("));
			assert_non_null(strstr(a, "@llvm.fma.v8f32"));
		}
		if (kinds[i] == MOE_EMIT_HEADER) {
			assert_non_null(strstr(a, "#define MOE_MODEL_HIDDEN 24\n"));
			assert_non_null(strstr(a, "#define MOE_MODEL_EXPERTS 6\n"));
			assert_non_null(strstr(a, "moe_forward("));
		}
		free(a), free(b);
		unlink(p1), unlink(p2);
	}
}

/* Weights written to a safetensors checkpoint (per-expert names, a stacked
 * in_out down tensor, a fused interleaved gate_up) load to exactly what
 * moe_init_random gives. */
static void test_safetensors(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 24, 4, 2, 12);
	d.n_layers = 1;
	d.n_moe_layers = 1;
	d.weight_dtype = MOE_DTYPE_BF16;
	snprintf(d.names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "l.{layer}.gate.weight");
	snprintf(d.names[MOE_ROLE_GATE_UP], MOE_NAME_MAX, "l.{layer}.e.{expert}.gate_up");
	d.layouts[MOE_ROLE_GATE_UP].fuse = MOE_FUSE_INTERLEAVE;
	snprintf(d.names[MOE_ROLE_DOWN], MOE_NAME_MAX, "l.{layer}.down");
	d.layouts[MOE_ROLE_DOWN].orient = MOE_ORIENT_IN_OUT;
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 4, 0, &w);
	size_t H = 24, I = 12, E = 4;
	float *gu = malloc(E * 2 * I * H * 4), *dn = malloc(E * I * H * 4);
	for (size_t e = 0; e < E; e++)
		for (size_t i = 0; i < I; i++)
			for (size_t h = 0; h < H; h++) {
				gu[((e * 2 * I) + 2 * i) * H + h] =
				    w.w[MOE_ROLE_GATE][(e * I + i) * H + h];
				gu[((e * 2 * I) + 2 * i + 1) * H + h] =
				    w.w[MOE_ROLE_UP][(e * I + i) * H + h];
			}
	for (size_t e = 0; e < E; e++) /* canonical [H, I] -> stored [I, H] */
		for (size_t h = 0; h < H; h++)
			for (size_t i = 0; i < I; i++)
				dn[(e * I + i) * H + h] = w.w[MOE_ROLE_DOWN][(e * H + h) * I + i];
	struct moe_st_tensor ts[6];
	char names[6][64];
	size_t n = 0;
	ts[n] = (struct moe_st_tensor){.name = "l.0.gate.weight",
				       .dtype = MOE_ST_F32,
				       .ndim = 2,
				       .shape = {E, H},
				       .data = w.w[MOE_ROLE_ROUTER]};
	n++;
	ts[n] = (struct moe_st_tensor){
	    .name = "l.0.down", .dtype = MOE_ST_F32, .ndim = 3, .shape = {E, I, H}, .data = dn};
	n++;
	for (size_t e = 0; e < E; e++, n++) {
		snprintf(names[e], sizeof names[e], "l.0.e.%zu.gate_up", e);
		ts[n] = (struct moe_st_tensor){.name = names[e],
					       .dtype = MOE_ST_F32,
					       .ndim = 2,
					       .shape = {2 * I, H},
					       .data = gu + e * 2 * I * H};
	}
	char path[300], err[1024];
	snprintf(path, sizeof path, "%s/w.safetensors", h_tmpdir);
	assert_int_equal(moe_st_write(path, ts, n, err, sizeof err), MOE_OK);

	struct h_model m;
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *a, *b;
	assert_int_equal(m.create(&a, NULL), MOE_OK);
	assert_int_equal(m.create(&b, NULL), MOE_OK);
	assert_int_equal(m.init_random(a, 4), MOE_OK);
	const char *files[] = {path};
	enum moe_status st = m.load(b, files, 1);
	if (st)
		fprintf(stderr, "load: %s\n", m.last_error());
	assert_int_equal(st, MOE_OK);
	size_t T = 9;
	float x[9 * 24], ya[9 * 24], yb[9 * 24];
	h_fill_input(x, T * H, 2);
	assert_int_equal(m.forward(a, 0, x, ya, T, NULL, NULL), MOE_OK);
	assert_int_equal(m.forward(b, 0, x, yb, T, NULL, NULL), MOE_OK);
	assert_memory_equal(ya, yb, sizeof ya);
	/* a missing tensor is named */
	snprintf(d.names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "l.{layer}.gate.weight");
	ts[0].name = "l.0.other";
	assert_int_equal(moe_st_write(path, ts, n, err, sizeof err), MOE_OK);
	assert_int_equal(m.load(b, files, 1), MOE_ERR_WEIGHTS);
	assert_non_null(strstr(m.last_error(), "l.0.gate.weight"));
	m.destroy(a), m.destroy(b);
	h_model_close(&m);
	unlink(path);
	moe_ref_weights_free(&w);
	free(gu), free(dn);
}

/* The generated GELU (erf form) against 0.5 x (1 + erf(x / sqrt 2)) in double
 * over a sweep of x in [-8, 8): two MLP experts that are both the identity,
 * equal (zero) router logits, top-2, so y = 0.5 gelu(x) + 0.5 gelu(x) = gelu(x)
 * with every other operation exact. Within 3e-7 |x|, the f32 rounding of
 * x / sqrt 2, 1 + erf and the products included (9.7e-8 measured). */
static void test_gelu_sweep(void **state)
{
	(void)state;
	enum { H = 16, E = 2, T = 1024 };
	struct moe_desc d;
	h_base_desc(&d, H, E, 2, H);
	d.n_layers = 1;
	d.n_moe_layers = 1;
	d.kind = MOE_KIND_MLP;
	d.act = MOE_ACT_GELU;
	snprintf(d.names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "l.{layer}.gate.weight");
	snprintf(d.names[MOE_ROLE_UP], MOE_NAME_MAX, "l.{layer}.e.{expert}.up");
	snprintf(d.names[MOE_ROLE_DOWN], MOE_NAME_MAX, "l.{layer}.e.{expert}.down");
	static float router[E * H], eye[H * H];
	for (int i = 0; i < H; i++)
		eye[i * H + i] = 1.0f;
	struct moe_st_tensor ts[1 + 2 * E];
	char names[2 * E][64];
	size_t n = 0;
	ts[n++] = (struct moe_st_tensor){.name = "l.0.gate.weight",
					 .dtype = MOE_ST_F32,
					 .ndim = 2,
					 .shape = {E, H},
					 .data = router};
	for (int e = 0; e < E; e++)
		for (int r = 0; r < 2; r++, n++) {
			snprintf(names[2 * e + r], sizeof names[0], "l.0.e.%d.%s", e,
				 r ? "down" : "up");
			ts[n] = (struct moe_st_tensor){.name = names[2 * e + r],
						       .dtype = MOE_ST_F32,
						       .ndim = 2,
						       .shape = {H, H},
						       .data = eye};
		}
	char path[300], err[1024];
	snprintf(path, sizeof path, "%s/gelu.safetensors", h_tmpdir);
	assert_int_equal(moe_st_write(path, ts, n, err, sizeof err), MOE_OK);
	struct h_model m;
	moe_model *mm = h_model_open_loaded(&d, &m, path);
	static float x[T * H], y[T * H];
	for (int i = 0; i < T * H; i++)
		x[i] = -8.0f + 16.0f * (float)i / (T * H);
	assert_int_equal(m.forward(mm, 0, x, y, T, NULL, NULL), MOE_OK);
	double worst = 0;
	for (int i = 0; i < T * H; i++) {
		double g = 0.5 * x[i] * (1.0 + erf(x[i] / sqrt(2.0)));
		double rel = fabs(y[i] - g) / fmax(fabs((double)x[i]), 1e-30);
		worst = fmax(worst, rel);
	}
	if (!(worst <= 3e-7))
		fprintf(stderr, "gelu: worst |y - gelu(x)| / |x| = %g\n", worst);
	assert_true(worst <= 3e-7);
	m.destroy(mm);
	h_model_close(&m);
	unlink(path);
}

/* Run one forward of T tokens (seeded weights and input) and return y and,
 * optionally, the routing ids. */
static void run_once(const struct moe_desc *d, size_t T, float *y, int32_t *ids, int64_t *n_dropped)
{
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 21), MOE_OK);
	float *x = malloc(T * d->hidden * 4);
	h_fill_input(x, T * d->hidden, 22);
	struct moe_routing rt = {.expert_ids = ids};
	assert_int_equal(m.forward(mm, d->moe_layers[0], x, y, T, &rt, NULL), MOE_OK);
	if (n_dropped)
		*n_dropped = rt.n_dropped;
	free(x);
	m.destroy(mm);
	h_model_close(&m);
}

/* Capacity variants checked against a simulation of the fill order on the
 * dropless routing, and the output bias against y + b. */
static void test_capacity_and_bias(void **state)
{
	(void)state;
	enum { T = 37, K = 2, E = 5, H = 24 };
	struct moe_desc d;
	h_base_desc(&d, H, E, K, 20);
	float *y0 = malloc(T * H * 4), *y1 = malloc(T * H * 4);
	int32_t ids0[T * K], ids1[T * K];
	int64_t nd;
	run_once(&d, T, y0, ids0, NULL);

	/* a capacity nobody reaches is the dropless model, bit for bit */
	struct moe_desc c = d;
	c.capacity = MOE_CAPACITY_TOKEN_FRACTION;
	c.capacity_token_fraction = 1.0f;
	run_once(&c, T, y1, ids1, &nd);
	assert_int_equal(nd, 0);
	assert_memory_equal(y0, y1, T * H * 4);

	for (int v = 0; v < 2; v++) {
		c = d;
		uint64_t C;
		if (v == 0) {
			c.capacity = MOE_CAPACITY_FACTOR;
			c.capacity_factor = 1.0f;
			c.capacity_floor = 1;
			C = (uint64_t)floor((double)K * T / E); /* 14 */
		} else {
			c.capacity = MOE_CAPACITY_TOKEN_FRACTION;
			c.capacity_token_fraction = 0.05f;
			c.capacity_min = 3;
			C = 3; /* ceil(37 * 0.05) = 2 < min */
		}
		run_once(&c, T, y1, ids1, &nd);
		uint64_t fill[E] = {0};
		int64_t want = 0;
		for (int r = 0; r < K; r++)
			for (int t = 0; t < T; t++) {
				int32_t e = ids0[t * K + r];
				int keep = fill[e] < C;
				fill[e] += (uint64_t)keep;
				want += !keep;
				assert_int_equal(ids1[t * K + r], keep ? e : -1);
			}
		assert_true(want > 0);
		assert_int_equal(nd, want);
	}

	/* output bias: added once, last */
	c = d;
	c.output_bias = 1;
	run_once(&c, T, y1, NULL, NULL);
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&c, &w), MOE_OK);
	moe_ref_weights_random(&c, 21, 0, &w);
	const float *ob = w.w[MOE_ROLE_OUTPUT_BIAS];
	assert_non_null(ob);
	for (int t = 0; t < T; t++)
		for (int h = 0; h < H; h++)
			assert_true(y1[t * H + h] == y0[t * H + h] + ob[h]);
	moe_ref_weights_free(&w);
	free(y0), free(y1);
}

static uint32_t rnd(uint64_t seed, uint64_t i, uint64_t what, uint32_t n)
{
	return (uint32_t)(moe_rng_hash(seed, 0x5eed, i, what) % n);
}

/* Random valid descriptions, small sizes, generated vs reference. */
static void test_random(void **state)
{
	(void)state;
	uint64_t seed = (uint64_t)time(NULL);
	const char *env = getenv("MOE_TEST_SEED");
	if (env)
		seed = strtoull(env, NULL, 0);
	int n = 200;
	const char *nenv = getenv("MOE_TEST_RANDOM_N");
	if (nenv)
		n = atoi(nenv);
	printf("test_random: MOE_TEST_SEED=%llu (%d descriptions)\n", (unsigned long long)seed, n);
	fflush(stdout);
	for (int i = 0; i < n; i++) {
		h_opt_level = i % 4 == 0 ? 2 : 0;
		struct moe_desc d;
		uint64_t s = seed;
		uint32_t G = 1 + rnd(s, i, 1, 4);
		uint32_t E = G * (1 + rnd(s, i, 2, 12));
		uint32_t H = 1 + rnd(s, i, 3, 70), I = 1 + rnd(s, i, 4, 50);
		uint32_t k = 1 + rnd(s, i, 5, E < 8 ? E : 8);
		h_base_desc(&d, H, E, k, I);
		d.mode = rnd(s, i, 6, 8) == 0 ? MOE_MODE_DENSE : MOE_MODE_TOKEN_CHOICE;
		if (d.mode == MOE_MODE_DENSE)
			d.top_k = E;
		d.score = rnd(s, i, 7, MOE_SCORE_COUNT);
		d.norm = rnd(s, i, 8, MOE_NORM_COUNT);
		d.norm_p = 0.5f + (float)rnd(s, i, 9, 4);
		d.norm_eps = rnd(s, i, 10, 2) ? 1e-20f : 0.0f;
		d.norm_min = rnd(s, i, 11, 3) == 0 ? 0.1f : 0.0f;
		d.scale = rnd(s, i, 12, 2) ? 1.0f : 2.5f;
		d.router_bias = rnd(s, i, 13, 3) == 0;
		d.select_bias = rnd(s, i, 14, 3) == 0;
		if (d.mode == MOE_MODE_TOKEN_CHOICE && G > 1 && rnd(s, i, 15, 2)) {
			d.n_groups = G;
			d.group_top = 1 + rnd(s, i, 16, G);
			d.group_score = rnd(s, i, 17, MOE_GROUP_SCORE_COUNT);
			uint32_t maxk = d.group_top * (E / G);
			if (d.top_k > maxk)
				d.top_k = maxk;
		}
		if (d.mode == MOE_MODE_TOKEN_CHOICE && rnd(s, i, 18, 4) == 0) {
			d.capacity = 1 + rnd(s, i, 19, 2);
			d.capacity_factor = 0.5f + 0.25f * (float)rnd(s, i, 20, 4);
			d.capacity_per_expert = 1 + rnd(s, i, 21, 6);
			d.priority = rnd(s, i, 22, MOE_PRIORITY_COUNT);
			d.overflow = rnd(s, i, 23, MOE_OVERFLOW_COUNT);
		}
		d.apply_to = rnd(s, i, 24, 4) == 0 ? MOE_APPLY_INPUT : MOE_APPLY_OUTPUT;
		d.kind = rnd(s, i, 25, 3) == 0 ? MOE_KIND_MLP : MOE_KIND_GLU;
		d.act = rnd(s, i, 26, MOE_ACT_COUNT);
		if (d.act == MOE_ACT_SWIGLU_OAI && d.kind != MOE_KIND_GLU)
			d.act = MOE_ACT_SILU;
		d.act_limit = rnd(s, i, 27, 2) ? 7.0f : 0.1f;
		d.expert_bias = rnd(s, i, 28, 3) == 0;
		if (rnd(s, i, 29, 3) == 0) {
			d.shared_count = 1 + rnd(s, i, 30, 2);
			d.shared_intermediate = 1 + rnd(s, i, 31, 30);
			d.shared_kind = rnd(s, i, 32, 3) == 0 ? MOE_KIND_MLP : MOE_KIND_GLU;
			d.shared_act = rnd(s, i, 33, MOE_ACT_COUNT);
			if (d.shared_act == MOE_ACT_SWIGLU_OAI && d.shared_kind != MOE_KIND_GLU)
				d.shared_act = MOE_ACT_RELU;
			d.shared_gate = rnd(s, i, 34, 2);
		}
		d.weight_dtype = rnd(s, i, 35, MOE_DTYPE_COUNT);
		size_t T = rnd(s, i, 36, 40);
		compare(&d, T, 1 + rnd(s, i, 37, 3), seed + (uint64_t)i, TOL);
	}
	h_opt_level = 2;
}

/* The randomized sweep compiles most descriptions at -O0 (same IR and the
 * same arithmetic, much faster to build) and every fourth at -O2; the other
 * tests compile at -O2. */
static int setup(void **state)
{
	(void)state;
	h_opt_level = 2;
	return h_setup("test_cpu");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_expert_counts), cmocka_unit_test(test_features),
	    cmocka_unit_test(test_invariance),    cmocka_unit_test(test_k_blocks),
	    cmocka_unit_test(test_errors),        cmocka_unit_test(test_refusals),
	    cmocka_unit_test(test_deterministic), cmocka_unit_test(test_safetensors),
	    cmocka_unit_test(test_gelu_sweep),    cmocka_unit_test(test_capacity_and_bias),
	    cmocka_unit_test(test_random),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
