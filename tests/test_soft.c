/* test_soft.c: Soft MoE generated for the CPU against the reference on token
 * groups of several sizes (outputs within 1e-5, the same statistics), with the
 * scalar scale and the per-channel one (soft.scale channel), soft.group_size
 * (against the reference, and bit for bit one call per group), bit
 * identity across thread counts, a tiny case recomputed in double, and the
 * refused combinations. */
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

static void soft_desc(struct moe_desc *d, uint32_t H, uint32_t E, uint32_t P, uint32_t I)
{
	h_base_desc(d, H, E, 0, I);
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
			h_compare(&d, Ts[j], j % 2 ? 3 : 1, 100 + 10 * i + j, NULL, NULL);
	}
}

/* soft.scale channel: a [H] gamma of the normalized tokens in place of the
 * scalar scale; GLU and MLP experts, a shared expert, bf16 weights. */
static void test_soft_gamma_vs_ref(void **state)
{
	(void)state;
	static const size_t Ts[] = {1, 7, 33};
	for (uint32_t i = 0; i < 3; i++) {
		struct moe_desc d;
		soft_desc(&d, 24 + 16 * i, 3 + i, 2, 16);
		d.soft_gamma = 1;
		if (i == 1) {
			d.kind = MOE_KIND_MLP;
			d.act = MOE_ACT_GELU;
			d.shared_count = 1;
			d.shared_intermediate = 16;
		}
		if (i == 2)
			d.weight_dtype = MOE_DTYPE_BF16;
		for (size_t j = 0; j < sizeof Ts / sizeof *Ts; j++)
			h_compare(&d, Ts[j], j % 2 ? 3 : 1, 900 + 10 * i + j, NULL, NULL);
	}
}

/* soft.group_size G: the call's tokens in groups of G (the last one the
 * rest), each with its own slots. Against the reference (groups of 1, of
 * 7 with a remainder, and one group larger than the call), and the same
 * bits as one call per group without groups: what a batch of sequences
 * computes, with the slots of every group through one pass of the experts. */
static void test_soft_groups(void **state)
{
	(void)state;
	static const size_t Ts[] = {1, 19, 33};
	static const uint32_t Gs[] = {7, 1, 50};
	for (size_t i = 0; i < sizeof Gs / sizeof *Gs; i++) {
		struct moe_desc d;
		soft_desc(&d, 32, 4 + (uint32_t)i, 2, 24);
		d.soft_group = Gs[i];
		if (i == 1) {
			d.shared_count = 1;
			d.shared_intermediate = 16;
			d.output_bias = 1;
		}
		for (size_t j = 0; j < sizeof Ts / sizeof *Ts; j++)
			h_compare(&d, Ts[j], j % 2 ? 3 : 1, 500 + 10 * i + j, NULL, NULL);
	}
	struct moe_desc d, one;
	soft_desc(&d, 40, 5, 3, 24);
	d.kind = MOE_KIND_MLP;
	d.act = MOE_ACT_GELU;
	one = d;
	d.soft_group = 7;
	size_t T = 19, H = d.hidden;
	float *x = malloc(T * H * 4), *y = malloc(T * H * 4), *yg = malloc(T * H * 4);
	assert_true(x && y && yg);
	h_fill_input(x, T * H, 77);
	assert_int_equal(h_forward(&d, x, T, 2, 0, yg), MOE_OK);
	for (size_t g0 = 0; g0 < T; g0 += 7) {
		size_t n = T - g0 < 7 ? T - g0 : 7;
		assert_int_equal(h_forward(&one, x + g0 * H, n, 1, 0, y + g0 * H), MOE_OK);
	}
	assert_memory_equal(y, yg, T * H * 4);
	free(x), free(y), free(yg);
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
	h_compare(&d, T, 1, 7, NULL, y1);
	h_compare(&d, T, 3, 7, NULL, y3);
	assert_memory_equal(y1, y3, T * 40 * 4);
	free(y1), free(y3);
}

/* The GEMM tiles of the three products (logits, D^T x, C Y) at their edges:
 * S = 27 slots (one full panel of 16 and one of 11) and S = 16, H = 40 (two
 * full column panels and one of 8) and 48, T = 301 (row tiles of 16 or 6
 * and a remainder, several token tasks), with 1, 2 and 3 threads and with
 * the 8-lane tiles (AVX-512 off): each against the reference, and the same
 * bits whatever the thread count. */
static void test_soft_tiles(void **state)
{
	(void)state;
	static const uint32_t Hs[] = {40, 48}, Es[] = {9, 16}, Ps[] = {3, 1};
	const size_t T = 301;
	for (int narrow = 0; narrow < 2; narrow++) {
		h_features = narrow ? "-avx512f" : NULL;
		for (size_t i = 0; i < 2; i++) {
			struct moe_desc d;
			soft_desc(&d, Hs[i], Es[i], Ps[i], 16);
			d.output_bias = i == 0;
			size_t n = T * Hs[i];
			float *y[3];
			for (unsigned th = 1; th <= 3; th++) {
				y[th - 1] = malloc(n * sizeof(float));
				assert_non_null(y[th - 1]);
				h_compare(&d, T, th, 300 + i, NULL, y[th - 1]);
			}
			assert_memory_equal(y[0], y[1], n * sizeof(float));
			assert_memory_equal(y[0], y[2], n * sizeof(float));
			for (int k = 0; k < 3; k++)
				free(y[k]);
		}
	}
	h_features = NULL;
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
 * With T = 1 every dispatch weight is 1, so each slot sees the token itself.
 * With soft.scale channel, L = sum_h x^_h gamma_h phi^_h instead. */
static void test_soft_hand(void **state)
{
	(void)state;
	static const size_t Ts[] = {1, 3, 5};
	enum { H = 8, E = 2, P = 2, I = 4, S = E * P };
	for (size_t c = 0; c < 2 * sizeof Ts / sizeof *Ts; c++) {
		size_t T = Ts[c % 3];
		int channel = c >= 3;
		struct moe_desc d;
		soft_desc(&d, H, E, P, I);
		d.soft_gamma = (uint8_t)channel;
		struct h_model m;
		char err[2048];
		assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
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
		h_fill_input(x, T * H, 60 + c);
		struct moe_routing rt = {NULL, NULL, cnt, imp, 0, 0, 0, 0};
		assert_int_equal(m.forward(mm, layer, x, y, T, &rt, NULL), MOE_OK);
		/* one of the two: the scalar scale or the channel scale */
		assert_true((w.w[MOE_ROLE_SOFT_SCALE] == NULL) == channel);
		assert_true((w.w[MOE_ROLE_SOFT_GAMMA] != NULL) == channel);
		double sc = channel ? 1.0 : w.w[MOE_ROLE_SOFT_SCALE][0], L[5][S], D[5][S], C[5][S];
		const float *phi = w.w[MOE_ROLE_SOFT_SLOTS], *gam = w.w[MOE_ROLE_SOFT_GAMMA];
		for (size_t t = 0; t < T; t++)
			for (size_t j = 0; j < S; j++) {
				double xx = 0, pp = 0, xp = 0;
				for (size_t h = 0; h < H; h++) {
					xx += (double)x[t * H + h] * x[t * H + h];
					pp += (double)phi[j * H + h] * phi[j * H + h];
					xp += (double)x[t * H + h] * phi[j * H + h] *
					      (channel ? (double)gam[h] : 1.0);
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
		h_model_close(&m);
	}
}

/* soft.scale channel read from a checkpoint: soft_gamma as a role loads to
 * what moe_init_random gives, and the forward matches the reference. */
static void test_soft_gamma_load(void **state)
{
	(void)state;
	enum { H = 16, E = 3, P = 2, I = 8, T = 9 };
	struct moe_desc d;
	soft_desc(&d, H, E, P, I);
	d.kind = MOE_KIND_MLP;
	d.act = MOE_ACT_GELU;
	d.soft_gamma = 1;
	d.n_layers = 1;
	d.n_moe_layers = 1;
	static const enum moe_role roles[] = {MOE_ROLE_SOFT_SLOTS, MOE_ROLE_SOFT_GAMMA, MOE_ROLE_UP,
					      MOE_ROLE_DOWN};
	enum { NR = sizeof roles / sizeof *roles };
	for (int i = 0; i < NR; i++)
		snprintf(d.names[roles[i]], MOE_NAME_MAX, "s.{layer}.%s", moe_role_names[roles[i]]);
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 4, 0, &w);
	struct moe_st_tensor ts[NR];
	char names[NR][64];
	for (int i = 0; i < NR; i++) {
		uint64_t rows, cols;
		int pe = 0;
		assert_true(moe_desc_role_shape(&d, roles[i], &rows, &cols, &pe));
		snprintf(names[i], sizeof names[i], "s.0.%s", moe_role_names[roles[i]]);
		ts[i] = (struct moe_st_tensor){.name = names[i], .dtype = MOE_ST_F32};
		if (pe)
			ts[i].ndim = 3, ts[i].shape[0] = E, ts[i].shape[1] = rows,
			ts[i].shape[2] = cols;
		else if (rows == 1)
			ts[i].ndim = 1, ts[i].shape[0] = cols;
		else
			ts[i].ndim = 2, ts[i].shape[0] = rows, ts[i].shape[1] = cols;
		ts[i].data = w.w[roles[i]];
	}
	char path[300], err[1024];
	snprintf(path, sizeof path, "%s/soft.safetensors", h_tmpdir);
	assert_int_equal(moe_st_write(path, ts, NR, err, sizeof err), MOE_OK);
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
	float x[T * H], ya[T * H], yb[T * H], yr[T * H];
	h_fill_input(x, T * H, 12);
	assert_int_equal(m.forward(a, 0, x, ya, T, NULL, NULL), MOE_OK);
	assert_int_equal(m.forward(b, 0, x, yb, T, NULL, NULL), MOE_OK);
	assert_memory_equal(ya, yb, sizeof ya);
	assert_int_equal(moe_ref_forward(&d, &w, x, yr, T, NULL, NULL, err, sizeof err), MOE_OK);
	double md = 0, my = 0;
	for (int i = 0; i < T * H; i++)
		md = fmax(md, fabs((double)ya[i] - yr[i])), my = fmax(my, fabs((double)yr[i]));
	assert_true(my > 0 && md <= H_TOL * my);
	m.destroy(a), m.destroy(b);
	h_model_close(&m);
	unlink(path);
	moe_ref_weights_free(&w);
}

/* What is not generated is refused with a message naming it. */
static void test_refusals(void **state)
{
	(void)state;
	struct moe_desc d;
	char err[2048];
	struct h_model m;
	soft_desc(&d, 32, 4, 2, 16);
	d.capacity = MOE_CAPACITY_FACTOR;
	d.capacity_factor = 1.0f;
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "router.capacity with mode soft"));
	soft_desc(&d, 32, 4, 2, 16);
	d.noise = MOE_NOISE_JITTER;
	d.jitter_eps = 0.01f;
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "router.noise with mode soft"));
	soft_desc(&d, 32, 4, 2, 16);
	d.shared_count = 1;
	d.shared_intermediate = 16;
	d.shared_gate = MOE_SHARED_GATE_SIGMOID;
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "shared_experts.gate sigmoid with mode soft"));
	soft_desc(&d, 32, 4, 0, 16);
	err[0] = 0;
	assert_int_not_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_non_null(strstr(err, "slots_per_expert"));
}

static int setup(void **state)
{
	(void)state;
	return h_setup("test_soft");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_soft_vs_ref),  cmocka_unit_test(test_soft_gamma_vs_ref),
	    cmocka_unit_test(test_soft_threads), cmocka_unit_test(test_soft_tiles),
	    cmocka_unit_test(test_soft_hand),    cmocka_unit_test(test_soft_gamma_load),
	    cmocka_unit_test(test_refusals),     cmocka_unit_test(test_soft_groups),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
