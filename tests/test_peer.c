/* test_peer.c: PEER product-key retrieval generated for the CPU against the
 * reference (identical selections, f32 outputs within 1e-5) and against an
 * exhaustive top-k over all N = R^2 keys computed here; f32 and bf16 tables,
 * softmax and sigmoid scores, refusals. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "safetensors.h"

/* A PEER description: R^2 single-neuron experts of width H. */
static void peer_desc(struct moe_desc *d, uint32_t H, uint32_t R, uint32_t heads, uint32_t k,
		      uint32_t dq)
{
	h_base_desc(d, H, R * R, heads * k, 1);
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
	d->pk_bn_eps = 1e-5f;
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
		h_compare(&d, 37, 1 + i % 3, 300 + i, NULL, NULL);
		/* the query and sub-key tiles of a 256-bit target (4 rows by 16
		 * lanes on its 16 registers; 8 by 32 on AVX-512) */
		h_features = "-avx512f";
		h_compare(&d, 37, 2, 340 + i, NULL, NULL);
		h_features = NULL;
		/* PEER-pytorch's variants: keys per head, ReLU scores, a
		 * product-key top-k above and below the final one */
		d.pk_keys_per_head = 1;
		h_compare(&d, 37, 1 + i % 3, 310 + i, NULL, NULL);
		d.pk_score_relu = 1;
		d.pk_sub_top_k = cs[i].k + 3 < cs[i].R ? cs[i].k + 3 : cs[i].R;
		h_compare(&d, 29, 2, 320 + i, NULL, NULL);
		d.pk_keys_per_head = 0;
		d.pk_sub_top_k = cs[i].k > 4 ? cs[i].k - 2 : cs[i].k;
		h_compare(&d, 29, 1, 330 + i, NULL, NULL);
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
static void peer_exhaustive(int variant)
{
	enum { H = 32, R = 16, HEADS = 3, K = 5, DQ = 12, T = 23, N = R * R };
	struct moe_desc d;
	peer_desc(&d, H, R, HEADS, K, DQ);
	/* PEER-pytorch's layout and scores: keys [heads, R, 2, d/2], relu of
	 * the sums; sub_top_k R keeps every candidate, so still exhaustive */
	d.pk_keys_per_head = d.pk_score_relu = (uint8_t)variant;
	d.pk_sub_top_k = variant ? R : 0;
	struct h_model m;
	char err[1024];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.init_random(mm, 9), MOE_OK);
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 9, 1, &w);
	static float x[T * H], y[T * H], wt[T * HEADS * K];
	static int32_t ids[T * HEADS * K];
	h_fill_input(x, T * H, 41);
	struct moe_routing rt = {.expert_ids = ids, .weights = wt};
	assert_int_equal(m.forward(mm, 1, x, y, T, &rt, NULL), MOE_OK);
	const float *Q = w.w[MOE_ROLE_PK_QUERY], *qb = w.w[MOE_ROLE_PK_QUERY_BIAS];
	const float *keys = w.w[MOE_ROLE_PK_KEYS];
	const float *bw = w.w[MOE_ROLE_PK_BN_WEIGHT], *bb = w.w[MOE_ROLE_PK_BN_BIAS];
	const float *bm = w.w[MOE_ROLE_PK_BN_MEAN], *bv = w.w[MOE_ROLE_PK_BN_VAR];
	size_t checked = 0;
	for (int t = 0; t < T; t++)
		for (int hd = 0; hd < HEADS; hd++) {
			float q[DQ], s[N];
			/* the query, then its BatchNorm applied as written (not folded) */
			for (int i = 0; i < DQ; i++) {
				int c = hd * DQ + i;
				double v = (double)dot_asc(Q + (size_t)c * H, x + t * H, H) + qb[c];
				v = (v - bm[c]) / sqrt((double)bv[c] + (double)d.pk_bn_eps) *
					bw[c] +
				    bb[c];
				q[i] = (float)v;
			}
			const float *k1, *k2;
			for (int e = 0; e < N; e++) {
				if (variant) {
					k1 = keys + ((size_t)(hd * R + e / R) * 2) * DQ / 2;
					k2 = keys + ((size_t)(hd * R + e % R) * 2 + 1) * DQ / 2;
				} else {
					k1 = keys + (size_t)(e / R) * DQ / 2;
					k2 = keys + (size_t)(R + e % R) * DQ / 2;
				}
				s[e] = dot_asc(q, k1, DQ / 2) + dot_asc(q + DQ / 2, k2, DQ / 2);
			}
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
				double want = variant ? fmax((double)s[best[j]], 0.0)
						      : exp((double)s[best[j]] - mx) / sum;
				assert_true(fabs(wt[slot] - want) <= 1e-6);
				checked++;
			}
		}
	assert_int_equal(checked, T * HEADS * K);
	moe_ref_weights_free(&w);
	m.destroy(mm);
	h_model_close(&m);
}

static void test_peer_exhaustive(void **state)
{
	(void)state;
	peer_exhaustive(0);
	peer_exhaustive(1);
}

/* Write d's PEER tensors of w as p.0.<role> into path (f32), the names d's
 * checkpoint key reads. */
static void peer_write(struct moe_desc *d, const struct moe_ref_weights *w, const char *path)
{
	static const enum moe_role roles[] = {
	    MOE_ROLE_PK_QUERY,   MOE_ROLE_PK_QUERY_BIAS, MOE_ROLE_PK_KEYS,
	    MOE_ROLE_NEURON_U,   MOE_ROLE_NEURON_V,      MOE_ROLE_PK_BN_WEIGHT,
	    MOE_ROLE_PK_BN_BIAS, MOE_ROLE_PK_BN_MEAN,    MOE_ROLE_PK_BN_VAR,
	};
	int nr = d->pk_query_bn ? (int)(sizeof roles / sizeof *roles) : 5;
	struct moe_st_tensor ts[sizeof roles / sizeof *roles];
	char names[sizeof roles / sizeof *roles][64], err[1024];
	for (int i = 0; i < nr; i++) {
		snprintf(d->names[roles[i]], MOE_NAME_MAX, "p.{layer}.%s",
			 moe_role_names[roles[i]]);
		uint64_t rows, cols;
		assert_true(moe_desc_role_shape(d, roles[i], &rows, &cols, NULL));
		snprintf(names[i], sizeof names[i], "p.0.%s", moe_role_names[roles[i]]);
		int vec = rows == 1 && roles[i] != MOE_ROLE_PK_KEYS;
		ts[i] = (struct moe_st_tensor){.name = names[i],
					       .dtype = MOE_ST_F32,
					       .ndim = vec ? 1 : 2,
					       .shape = {vec ? cols : rows, cols},
					       .data = w->w[roles[i]]};
	}
	assert_int_equal(moe_st_write(path, ts, (size_t)nr, err, sizeof err), MOE_OK);
}

/* The query BatchNorm read from a checkpoint as four roles loads to what
 * moe_init_random gives; a variance with var + eps <= 0 is refused at load
 * by name, by the generated model and by the reference alike. */
static void test_peer_bn_load(void **state)
{
	(void)state;
	enum { H = 24, R = 6, HEADS = 2, K = 3, DQ = 8, Q = HEADS * DQ, T = 11 };
	struct moe_desc d;
	peer_desc(&d, H, R, HEADS, K, DQ);
	d.n_layers = 1;
	d.n_moe_layers = 1;
	d.pk_bn_eps = 1e-3f;
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 5, 0, &w);
	char path[300], err[1024];
	snprintf(path, sizeof path, "%s/peer.safetensors", h_tmpdir);
	peer_write(&d, &w, path);
	struct h_model m;
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *a, *b;
	assert_int_equal(m.create(&a, NULL), MOE_OK);
	assert_int_equal(m.create(&b, NULL), MOE_OK);
	assert_int_equal(m.init_random(a, 5), MOE_OK);
	const char *files[] = {path};
	enum moe_status st = m.load(b, files, 1);
	if (st)
		fprintf(stderr, "load: %s\n", m.last_error());
	assert_int_equal(st, MOE_OK);
	float x[T * H], ya[T * H], yb[T * H], yr[T * H];
	h_fill_input(x, T * H, 8);
	assert_int_equal(m.forward(a, 0, x, ya, T, NULL, NULL), MOE_OK);
	assert_int_equal(m.forward(b, 0, x, yb, T, NULL, NULL), MOE_OK);
	assert_memory_equal(ya, yb, sizeof ya);
	assert_int_equal(moe_ref_forward(&d, &w, x, yr, T, NULL, NULL, err, sizeof err), MOE_OK);
	double md = 0, my = 0;
	for (int i = 0; i < T * H; i++)
		md = fmax(md, fabs((double)ya[i] - yr[i])), my = fmax(my, fabs((double)yr[i]));
	assert_true(my > 0 && md <= H_TOL * my);
	/* a variance of -eps: no BatchNorm can divide by sqrt(0) */
	w.w[MOE_ROLE_PK_BN_VAR][Q - 3] = -1e-3f;
	peer_write(&d, &w, path);
	assert_int_not_equal(m.load(b, files, 1), MOE_OK);
	assert_non_null(strstr(m.last_error(), "pk_bn_var[13]"));
	err[0] = 0;
	assert_int_not_equal(moe_ref_forward(&d, &w, x, yr, T, NULL, NULL, err, sizeof err),
			     MOE_OK);
	assert_non_null(strstr(err, "pk_bn_var[13]"));
	m.destroy(a), m.destroy(b);
	h_model_close(&m);
	unlink(path);
	moe_ref_weights_free(&w);
}

/* Ties in both top-ks: every odd sub-key a copy of the even one before it,
 * so each sub-key score ties with its neighbour's and each sum with up to
 * three others. The selections must still be the reference's: ties to the
 * lower sub-key within a half, to the lower expert index among the sums.
 * R = 40 runs the top-ks' blocks of 16 values and their tail; k = 5 and a
 * sub_top_k of 7 cut through tied groups. */
static void test_peer_ties(void **state)
{
	(void)state;
	enum { H = 32, R = 40, HEADS = 3, K = 5, DQ = 8, T = 31, W = HEADS * K };
	for (int variant = 0; variant < 3; variant++) {
		struct moe_desc d;
		peer_desc(&d, H, R, HEADS, K, DQ);
		d.n_layers = 1;
		d.n_moe_layers = 1;
		d.pk_query_bn = 0;
		d.pk_keys_per_head = variant == 1;
		d.pk_score_relu = variant == 1;
		d.pk_sub_top_k = variant == 2 ? 7 : 0;
		struct moe_ref_weights w;
		assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
		moe_ref_weights_random(&d, 17 + (uint64_t)variant, 0, &w);
		/* canonical keys: [2, R, d/2], or [heads, R, 2, d/2] per head */
		float *keys = w.w[MOE_ROLE_PK_KEYS];
		size_t row = DQ / 2, sets = variant == 1 ? HEADS : 1;
		for (size_t hs = 0; hs < sets; hs++)
			for (size_t r = 1; r < R; r += 2)
				for (size_t half = 0; half < 2; half++) {
					size_t at = variant == 1 ? ((hs * R + r) * 2 + half) * row
								 : (half * R + r) * row;
					size_t prev = variant == 1
							  ? ((hs * R + r - 1) * 2 + half) * row
							  : (half * R + r - 1) * row;
					memcpy(keys + at, keys + prev, row * sizeof *keys);
				}
		char path[300], err[1024];
		snprintf(path, sizeof path, "%s/peer_ties.safetensors", h_tmpdir);
		peer_write(&d, &w, path);
		struct h_model m;
		moe_model *mm = h_model_open_loaded(&d, &m, path);
		static float x[T * H], y[T * H], yr[T * H], wg[T * W], wr[T * W];
		static int32_t ids[T * W], idr[T * W];
		h_fill_input(x, T * H, 23);
		struct moe_routing rt = {.expert_ids = ids, .weights = wg};
		struct moe_routing rr = {.expert_ids = idr, .weights = wr};
		assert_int_equal(m.forward(mm, 0, x, y, T, &rt, NULL), MOE_OK);
		assert_int_equal(moe_ref_forward(&d, &w, x, yr, T, NULL, &rr, err, sizeof err),
				 MOE_OK);
		size_t tied = 0;
		for (size_t i = 0; i < T * W; i++) {
			assert_int_equal(ids[i], idr[i]);
			assert_true(fabs(wg[i] - wr[i]) <= 1e-6 * fmax(1.0, fabs(wr[i])));
			/* the test means something: tied sums were selected (a
			 * positive weight: ReLU scores of 0 tie without a tie) */
			tied += i % K && wr[i] > 0 && wr[i] == wr[i - 1];
		}
		assert_true(tied > T);
		m.destroy(mm);
		h_model_close(&m);
		unlink(path);
		moe_ref_weights_free(&w);
	}
}

/* What is not generated is refused with a message naming it. */
static void test_peer_refusals(void **state)
{
	(void)state;
	struct moe_desc d;
	struct h_model m;
	char err[2048];
	peer_desc(&d, 16, 80, 1, 65, 4);
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "sub_top_k > 64"));
	peer_desc(&d, 16, 8, 1, 2, 4);
	d.weight_dtype = MOE_DTYPE_F16;
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "f16 weights"));
	peer_desc(&d, 16, 8, 1, 2, 4);
	d.shared_count = 1;
	d.shared_intermediate = 8;
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "shared experts"));
}

static int setup(void **state)
{
	(void)state;
	return h_setup("test_peer");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_peer_vs_ref),   cmocka_unit_test(test_peer_exhaustive),
	    cmocka_unit_test(test_peer_bn_load),  cmocka_unit_test(test_peer_ties),
	    cmocka_unit_test(test_peer_refusals),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
