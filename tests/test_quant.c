/* test_quant.c: experts kept quantized (the quant: key, moe_desc.qfmt).
 * The dequantized values against the formats' definitions computed here;
 * the description's dump and hash; the panel bytes; the generated kernels
 * (int8 and int4, per channel and grouped, with and without zero points,
 * mixed formats, MLP, biases, apply_to input, shared experts) against the
 * f32 reference on the dequantized weights, at T = 1 and 77, 1 or 2
 * threads, on AVX-512 and on an AVX2-only target; batch and thread
 * invariance bit for bit; the CUDA target refuses. */
#include "harness.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "moe_kernels.h"
#include "moe_ref.h"
#include "moegen.h"
#include "safetensors.h"

static void set_q(struct moe_desc *d, int m, enum moe_qformat k, uint32_t group, int zero)
{
	d->qfmt[m] = (struct moe_qfmt){k, group, (uint8_t)zero};
}

/* The definitions: int8 W = q * s; int4 W = (q - z) * s with o = -z * s,
 * evaluated in double (exact here), must equal the f32 values. */
static void test_dequant_definition(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 64, 4, 2, 32);
	for (int zero = 0; zero < 2; zero++)
		for (int kind = MOE_QFORMAT_INT8; kind <= MOE_QFORMAT_INT4; kind++) {
			if (kind == MOE_QFORMAT_INT8 && zero)
				continue;
			uint32_t grp = kind == MOE_QFORMAT_INT4 ? 16 : 64;
			set_q(&d, MOE_QMAT_UP, (enum moe_qformat)kind, grp, zero);
			struct moe_ref_weights w;
			assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
			moe_ref_weights_random(&d, 3, d.moe_layers[0], &w);
			const struct moe_ref_qtensor *q = &w.q[MOE_ROLE_UP];
			assert_non_null(q->codes);
			assert_null(w.q[MOE_ROLE_DOWN].codes);
			size_t n = (size_t)d.n_experts * d.intermediate * d.hidden;
			int zeros_seen = 0, distinct = 0;
			unsigned char seen[256] = {0};
			for (size_t i = 0; i < n; i++) {
				size_t gi = i / grp;
				double s = q->scale[gi], want;
				assert_true(s > 0 && (float)s == moe_f16_round((float)s));
				if (kind == MOE_QFORMAT_INT8) {
					want = (int8_t)q->codes[i] * s;
				} else {
					double z = -(double)q->offset[gi] / s;
					assert_true(q->codes[i] < 16);
					assert_true(z == floor(z) && z >= 0 && z < 16);
					assert_true(zero || z == 8);
					zeros_seen |= z != 8;
					want = (q->codes[i] - z) * s;
				}
				assert_true((double)w.w[MOE_ROLE_UP][i] == want);
				distinct += !seen[q->codes[i]];
				seen[q->codes[i]] = 1;
			}
			assert_int_equal(distinct, kind == MOE_QFORMAT_INT4 ? 16 : 256);
			assert_int_equal(zeros_seen, zero);
			moe_ref_weights_free(&w);
		}
}

/* e4m3 and E2M1 from their definitions: (-1)^s 2^(e - bias) (1 + m / 2^mb),
 * subnormals 2^(1 - bias) m / 2^mb. */
static double minifloat(unsigned c, int eb, int mb, int bias)
{
	unsigned s = c >> (eb + mb) & 1, e = c >> mb & ((1u << eb) - 1), m = c & ((1u << mb) - 1);
	double v = e ? ldexp(1.0 + m / (double)(1u << mb), (int)e - bias)
		     : ldexp(m / (double)(1u << mb), 1 - bias);
	return s ? -v : v;
}

/* fp8 and mxfp4: W = value(code) * s, s a power of two for mxfp4; no NaN
 * codes drawn. */
static void test_float_codes(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 128, 4, 2, 64);
	set_q(&d, MOE_QMAT_UP, MOE_QFORMAT_FP8, 128, 0);
	set_q(&d, MOE_QMAT_DOWN, MOE_QFORMAT_MXFP4, 32, 0);
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 5, d.moe_layers[0], &w);
	const struct moe_ref_qtensor *u = &w.q[MOE_ROLE_UP], *dn = &w.q[MOE_ROLE_DOWN];
	size_t n = (size_t)d.n_experts * d.intermediate * d.hidden;
	for (size_t i = 0; i < n; i++) {
		assert_true((u->codes[i] & 0x7f) != 0x7f);
		double want = minifloat(u->codes[i], 4, 3, 7) * u->scale[i / 128];
		assert_true((double)w.w[MOE_ROLE_UP][i] == want);
		double s = dn->scale[i / 32];
		assert_true(s == ldexp(1.0, ilogb(s)));
		assert_true(dn->codes[i] < 16);
		assert_true((double)w.w[MOE_ROLE_DOWN][i] == minifloat(dn->codes[i], 2, 1, 1) * s);
	}
	assert_null(u->offset);
	moe_ref_weights_free(&w);
}

/* The dump reads back; the hash sees the format; bytes per expert. */
static void test_desc_and_bytes(void **state)
{
	(void)state;
	struct moe_desc d, back;
	h_base_desc(&d, 256, 8, 2, 128);
	char h0[64], h1[64], text[8192], err[256];
	moe_desc_hash(&d, h0);
	set_q(&d, MOE_QMAT_UP, MOE_QFORMAT_INT4, 128, 1);
	set_q(&d, MOE_QMAT_DOWN, MOE_QFORMAT_INT8, 128, 0);
	moe_desc_hash(&d, h1);
	assert_string_not_equal(h0, h1);
	assert_true(moe_desc_dump(&d, text, sizeof text) < sizeof text);
	assert_int_equal(moe_desc_parse(text, &back, err, sizeof err), 0);
	assert_memory_equal(&back.qfmt, &d.qfmt, sizeof d.qfmt);
	assert_false(moe_desc_bf16_compute(&d));
	struct moe_geom r, s, rf, sf;
	moe_geoms_init(&d, 0, &r, &s);
	struct moe_desc plain = d;
	memset(plain.qfmt, 0, sizeof plain.qfmt);
	moe_geoms_init(&plain, 0, &rf, &sf);
	/* int4 g128: 0.5 byte per value + 8 bytes of scale and offset per 128 */
	double per_up = (double)r.up_bytes / ((double)r.up_panels * MOE_NR * d.hidden);
	assert_true(fabs(per_up - (0.5 + 8.0 / 128)) < 1e-12);
	double per_down = (double)r.down_bytes / ((double)r.down_panels * MOE_NR * d.intermediate);
	assert_true(fabs(per_down - (1.0 + 4.0 / 128)) < 1e-12);
	assert_true(rf.up_bytes == 4 * (uint64_t)rf.up_panels * MOE_NR * d.hidden);
	/* moegen info counts the same bytes per weight for the experts a token
	 * reads: the f32 layer less its expert matrices, plus them quantized */
	struct moe_counts cq, cf;
	moe_info_count(&d, &cq);
	moe_info_count(&plain, &cf);
	double H = d.hidden, I = d.intermediate, k = d.top_k;
	double want = cf.layer_weight_bytes - k * 3 * H * I * 4 +
		      k * (2 * H * I * (0.5 + 8.0 / 128) + H * I * (1.0 + 4.0 / 128));
	assert_true(fabs(cq.layer_weight_bytes - want) <= 1e-9 * want);
	assert_true(cq.weights_per_token == cf.weights_per_token);
}

static char diag_text[2048];

static void capture_line(void *ctx, const char *line)
{
	(void)ctx;
	size_t n = strlen(diag_text);
	snprintf(diag_text + n, sizeof diag_text - n, "%s\n", line);
}

/* The CUDA target refuses kept-quantized experts, naming the key. */
static void test_cuda_refuses(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 64, 4, 2, 32);
	set_q(&d, MOE_QMAT_DOWN, MOE_QFORMAT_INT8, 32, 0);
	static struct moe_plan p;
	struct moe_diag dg = {.sink = capture_line};
	diag_text[0] = 0;
	assert_int_not_equal(moe_plan_build(&d, MOE_TARGET_CUDA, &p, &dg), 0);
	assert_non_null(strstr(diag_text, "quant.down int8"));
	diag_text[0] = 0;
	assert_int_equal(moe_plan_build(&d, MOE_TARGET_CPU, &p, &dg), 0);
	assert_string_equal(diag_text, "");
}

struct qcase {
	uint32_t H, I;
	int mlp, bias, apply_in, shared;
	enum moe_qformat up, down;
	uint32_t gu, gd;
	int zero;
};

static const struct qcase cases[] = {
    {128, 64, 0, 0, 0, 0, MOE_QFORMAT_FP8, MOE_QFORMAT_FP8, 128, 64, 0},
    {96, 64, 0, 1, 1, 0, MOE_QFORMAT_MXFP4, MOE_QFORMAT_FP8, 32, 32, 0},
    {64, 96, 1, 0, 0, 1, MOE_QFORMAT_FP8, MOE_QFORMAT_MXFP4, 32, 32, 0},
    {64, 64, 0, 0, 0, 0, MOE_QFORMAT_INT8, MOE_QFORMAT_INT8, 0, 0, 0},
    {65, 37, 0, 0, 0, 0, MOE_QFORMAT_INT8, MOE_QFORMAT_INT8, 0, 0, 0}, /* odd K */
    {64, 48, 0, 0, 0, 0, MOE_QFORMAT_INT4, MOE_QFORMAT_INT4, 32, 16, 1},
    {96, 40, 1, 1, 0, 0, MOE_QFORMAT_INT4, MOE_QFORMAT_INT8, 32, 8, 0},
    {48, 40, 0, 1, 1, 0, MOE_QFORMAT_INT8, MOE_QFORMAT_INT4, 16, 20, 1},
    {100, 24, 0, 0, 0, 1, MOE_QFORMAT_INT4, MOE_QFORMAT_INT4, 50, 24, 1},
    {256, 96, 0, 0, 0, 0, MOE_QFORMAT_NONE, MOE_QFORMAT_INT4, 0, 32, 0},
};

static void qdesc(struct moe_desc *d, const struct qcase *c)
{
	h_base_desc(d, c->H, 8, 2, c->I);
	if (c->mlp) {
		d->kind = MOE_KIND_MLP;
		d->act = MOE_ACT_GELU_TANH;
	}
	d->expert_bias = (uint8_t)c->bias;
	d->apply_to = c->apply_in ? MOE_APPLY_INPUT : MOE_APPLY_OUTPUT;
	set_q(d, MOE_QMAT_UP, c->up, c->gu ? c->gu : c->H, c->zero);
	set_q(d, MOE_QMAT_DOWN, c->down, c->gd ? c->gd : c->I, c->zero);
	if (c->up == MOE_QFORMAT_NONE)
		d->qfmt[MOE_QMAT_UP] = (struct moe_qfmt){0};
	if (c->shared) {
		d->shared_count = 1;
		d->shared_intermediate = c->up == MOE_QFORMAT_FP8 ? 32 : 24;
		set_q(d, MOE_QMAT_SHARED_UP,
		      c->up == MOE_QFORMAT_FP8 ? MOE_QFORMAT_MXFP4 : MOE_QFORMAT_INT4,
		      c->up == MOE_QFORMAT_FP8 ? 32 : 20, c->up != MOE_QFORMAT_FP8);
		set_q(d, MOE_QMAT_SHARED_DOWN, MOE_QFORMAT_INT8, 0, 0);
		d->qfmt[MOE_QMAT_SHARED_DOWN].group = d->shared_intermediate;
	}
}

static void test_vs_reference(void **state)
{
	(void)state;
	static const size_t Ts[] = {1, 77};
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		struct moe_desc d;
		qdesc(&d, &cases[i]);
		for (size_t j = 0; j < sizeof Ts / sizeof *Ts; j++)
			h_compare(&d, Ts[j], j % 2 ? 2 : 1, 70 + 10 * i + j, NULL, NULL);
	}
}

/* An AVX2-only target gets the same kernels as 8-lane vectors. */
static void test_avx2_target(void **state)
{
	(void)state;
	h_features = "-avx512f";
	for (size_t i = 0; i < 7; i += 1) {
		if (i != 1 && i != 5 && i != 6)
			continue; /* mxfp4 + fp8, int4, int4 + int8 */
		struct moe_desc d;
		qdesc(&d, &cases[i]);
		h_compare(&d, 33, 2, 5 + i, NULL, NULL);
	}
	h_features = NULL;
}

/* A row's output depends on that row alone: the same bits for 1 and 2
 * threads and for the first token alone (a 1-row tile), on this host's
 * kernels and on an AVX2-only target's, whose tiles of 2 rows or more
 * unpack each group once for their rows. Formats: mxfp4 + fp8, int8 per
 * channel with an odd K (one chain), int4 with zero points, int4 groups of
 * 50 (two chains). */
static void test_invariant(void **state)
{
	(void)state;
	static const char *const feats[] = {NULL, "-avx512f"};
	static const size_t cs[] = {1, 4, 5, 8};
	for (size_t f = 0; f < 2; f++)
		for (size_t i = 0; i < sizeof cs / sizeof *cs; i++) {
			struct moe_desc d;
			qdesc(&d, &cases[cs[i]]);
			h_features = feats[f];
			h_assert_invariant(&d, 97);
			h_features = NULL;
		}
}

/* Loading an unquantized checkpoint into kept-quantized experts is refused
 * up front (not quantized, not filled with zero codes). */
static void test_load_refused(void **state)
{
	(void)state;
	struct moe_desc d;
	qdesc(&d, &cases[3]);
	snprintf(d.names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "r.{layer}");
	snprintf(d.names[MOE_ROLE_GATE], MOE_NAME_MAX, "g.{layer}.{expert}");
	snprintf(d.names[MOE_ROLE_UP], MOE_NAME_MAX, "u.{layer}.{expert}");
	snprintf(d.names[MOE_ROLE_DOWN], MOE_NAME_MAX, "d.{layer}.{expert}");
	struct h_model m;
	char err[512];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	const char *files[] = {"/nonexistent.safetensors"};
	assert_int_equal(m.load(mm, files, 1), MOE_ERR_UNSUPPORTED);
	assert_non_null(strstr(m.last_error(), "gate is kept int8"));
	assert_non_null(strstr(m.last_error(), "stores it unquantized"));
	m.destroy(mm);
	h_model_close(&m);
}

/* A checkpoint of fp8 block-scaled experts (DeepSeek-V3's layout: one
 * tensor per expert, a [rows/b0, cols/b1] f32 scale tensor) or of mxfp4 ones
 * (gpt-oss's: gate_up stacked and interleaved, [E, rows, cols/32, 16] blocks
 * and [E, rows, cols/32] E8M0 scales) loads into experts kept in that format:
 * the same output as the model that dequantizes at load (within f32 sum
 * order) and the same expert choices. */
static const char *tmp_file(const char *name)
{
	static char p[256];
	snprintf(p, sizeof p, "%s/%s", h_tmpdir, name);
	return p;
}

static void kept_vs_dequant(struct moe_desc *d, const char *file, double tol)
{
	size_t T = 29, H = d->hidden;
	float *x = malloc(T * H * 4), *y[2] = {malloc(T * H * 4), malloc(T * H * 4)};
	int32_t *ids[2] = {malloc(T * d->top_k * 4), malloc(T * d->top_k * 4)};
	assert_true(x && y[0] && y[1] && ids[0] && ids[1]);
	h_fill_input(x, T * H, 12);
	struct moe_qfmt kept[MOE_QMAT_COUNT];
	memcpy(kept, d->qfmt, sizeof kept);
	enum moe_compute compute = d->compute;
	for (int v = 0; v < 2; v++) {
		if (v) { /* dequantized at load, f32 arithmetic */
			memset(d->qfmt, 0, sizeof d->qfmt);
			d->compute = MOE_COMPUTE_AUTO;
		}
		struct h_model m;
		char err[512];
		assert_int_equal(h_model_open(d, &m, err, sizeof err), 0);
		moe_model *mm;
		assert_int_equal(m.create(&mm, NULL), MOE_OK);
		if (m.load(mm, &file, 1) != MOE_OK)
			fail_msg("%s", m.last_error());
		struct moe_routing rt = {.expert_ids = ids[v]};
		assert_int_equal(m.forward(mm, d->moe_layers[1], x, y[v], T, &rt, NULL), MOE_OK);
		m.destroy(mm);
		h_model_close(&m);
	}
	memcpy(d->qfmt, kept, sizeof kept);
	d->compute = compute;
	assert_memory_equal(ids[0], ids[1], T * d->top_k * 4);
	double emax = 0, rmax = 0;
	for (size_t i = 0; i < T * H; i++) {
		emax = fmax(emax, fabs((double)y[0][i] - y[1][i]));
		rmax = fmax(rmax, fabs((double)y[1][i]));
	}
	assert_true(rmax > 0);
	assert_true(emax <= tol * rmax);
	free(x), free(y[0]), free(y[1]), free(ids[0]), free(ids[1]);
}

static uint8_t code_byte(uint64_t i, int fp8)
{
	uint8_t c = (uint8_t)(moe_rng_hash(77, i, 1, 2) >> 56);
	return fp8 && (c & 0x7f) == 0x7f ? c ^ 1 : c;
}

static void test_load_fp8_kept(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 128, 4, 2, 64);
	uint32_t H = d.hidden, I = d.intermediate, E = d.n_experts;
	snprintf(d.names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "r.{layer}");
	static const enum moe_role roles[3] = {MOE_ROLE_GATE, MOE_ROLE_UP, MOE_ROLE_DOWN};
	static const char *const nm[3] = {"g", "u", "d"};
	for (int i = 0; i < 3; i++) {
		enum moe_role r = roles[i];
		snprintf(d.names[r], MOE_NAME_MAX, "%s.{layer}.{expert}", nm[i]);
		snprintf(d.scale_names[r], MOE_NAME_MAX, "%s.{layer}.{expert}.s", nm[i]);
		d.layouts[r].quant = MOE_QUANT_FP8_BLOCK;
		d.layouts[r].quant_block[0] = i < 2 ? 32 : 16;
		d.layouts[r].quant_block[1] = i < 2 ? 64 : 32;
	}
	set_q(&d, MOE_QMAT_UP, MOE_QFORMAT_FP8, 64, 0);
	set_q(&d, MOE_QMAT_DOWN, MOE_QFORMAT_FP8, 32, 0);
	/* two layers: the router, and per expert three matrices and their scales */
	enum { NT = 2 * (1 + 4 * 3 * 2) };
	struct moe_st_tensor t[NT];
	char names[NT][48];
	void *bufs[NT];
	size_t n = 0;
	for (uint32_t L = 0; L < 2; L++) {
		float *r = malloc((size_t)E * H * 4);
		assert_non_null(r);
		h_fill_input(r, (size_t)E * H, 40 + L);
		snprintf(names[n], 48, "r.%u", L);
		bufs[n] = r;
		t[n] = (struct moe_st_tensor){
		    .name = names[n], .dtype = MOE_ST_F32, .ndim = 2, .shape = {E, H}, .data = r};
		n++;
		for (uint32_t e = 0; e < E; e++)
			for (int i = 0; i < 3; i++) {
				uint64_t R = i < 2 ? I : H, C = i < 2 ? H : I;
				uint64_t b0 = d.layouts[roles[i]].quant_block[0],
					 b1 = d.layouts[roles[i]].quant_block[1];
				uint8_t *q = malloc(R * C);
				float *sc = malloc(R / b0 * (C / b1) * 4);
				assert_true(q && sc);
				for (uint64_t j = 0; j < R * C; j++)
					q[j] = code_byte(
					    ((L * 8 + e) * 4 + (uint64_t)i) * 100000 + j, 1);
				for (uint64_t j = 0; j < R / b0 * (C / b1); j++)
					sc[j] =
					    (float)(0.002 * (1 + (double)((j * 7 + e + L) % 5)));
				snprintf(names[n], 48, "%s.%u.%u", nm[i], L, e);
				bufs[n] = q;
				t[n] = (struct moe_st_tensor){.name = names[n],
							      .dtype = MOE_ST_F8_E4M3,
							      .ndim = 2,
							      .shape = {R, C},
							      .data = q};
				n++;
				snprintf(names[n], 48, "%s.%u.%u.s", nm[i], L, e);
				bufs[n] = sc;
				t[n] = (struct moe_st_tensor){.name = names[n],
							      .dtype = MOE_ST_F32,
							      .ndim = 2,
							      .shape = {R / b0, C / b1},
							      .data = sc};
				n++;
			}
	}
	assert_int_equal(n, NT);
	const char *file = tmp_file("fp8.safetensors");
	char err[256];
	assert_int_equal(moe_st_write(file, t, n, err, sizeof err), MOE_OK);
	for (size_t i = 0; i < n; i++)
		free(bufs[i]);
	kept_vs_dequant(&d, file, H_TOL);
	/* a tile narrower than the group cannot be kept as it is */
	d.qfmt[MOE_QMAT_UP].group = 128;
	struct h_model m;
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	assert_int_equal(m.load(mm, &file, 1), MOE_ERR_UNSUPPORTED);
	assert_non_null(strstr(m.last_error(), "tile 32x64"));
	m.destroy(mm);
	h_model_close(&m);
}

static void test_load_mxfp4_kept(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 96, 4, 2, 64);
	uint32_t H = d.hidden, I = d.intermediate, E = d.n_experts;
	snprintf(d.names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "r.{layer}");
	snprintf(d.names[MOE_ROLE_GATE_UP], MOE_NAME_MAX, "gu.{layer}");
	snprintf(d.scale_names[MOE_ROLE_GATE_UP], MOE_NAME_MAX, "gu.{layer}.s");
	snprintf(d.names[MOE_ROLE_DOWN], MOE_NAME_MAX, "dn.{layer}");
	snprintf(d.scale_names[MOE_ROLE_DOWN], MOE_NAME_MAX, "dn.{layer}.s");
	d.layouts[MOE_ROLE_GATE_UP].fuse = MOE_FUSE_INTERLEAVE;
	static const enum moe_role qr[2] = {MOE_ROLE_GATE_UP, MOE_ROLE_DOWN};
	for (int i = 0; i < 2; i++) {
		d.layouts[qr[i]].quant = MOE_QUANT_MXFP4;
		d.layouts[qr[i]].quant_block[0] = 1;
		d.layouts[qr[i]].quant_block[1] = 32;
	}
	set_q(&d, MOE_QMAT_UP, MOE_QFORMAT_MXFP4, 32, 0);
	set_q(&d, MOE_QMAT_DOWN, MOE_QFORMAT_MXFP4, 32, 0);
	struct moe_st_tensor t[2 * 5];
	char names[2 * 5][48];
	void *bufs[2 * 5];
	size_t n = 0;
	for (uint32_t L = 0; L < 2; L++) {
		float *r = malloc((size_t)E * H * 4);
		assert_non_null(r);
		h_fill_input(r, (size_t)E * H, 50 + L);
		snprintf(names[n], 48, "r.%u", L);
		bufs[n] = r;
		t[n] = (struct moe_st_tensor){
		    .name = names[n], .dtype = MOE_ST_F32, .ndim = 2, .shape = {E, H}, .data = r};
		n++;
		for (int i = 0; i < 2; i++) {
			uint64_t R = i ? H : 2 * I, C = i ? I : H, nb = (uint64_t)E * R * (C / 32);
			uint8_t *q = malloc(nb * 16), *sc = malloc(nb);
			assert_true(q && sc);
			for (uint64_t j = 0; j < nb * 16; j++)
				q[j] = code_byte((L * 2 + (uint64_t)i) * 1000000 + j, 0);
			for (uint64_t j = 0; j < nb; j++)
				sc[j] = (uint8_t)(118 + (j * 5 + L) % 6);
			snprintf(names[n], 48, "%s.%u", i ? "dn" : "gu", L);
			bufs[n] = q;
			t[n] = (struct moe_st_tensor){.name = names[n],
						      .dtype = MOE_ST_U8,
						      .ndim = 4,
						      .shape = {E, R, C / 32, 16},
						      .data = q};
			n++;
			snprintf(names[n], 48, "%s.%u.s", i ? "dn" : "gu", L);
			bufs[n] = sc;
			t[n] = (struct moe_st_tensor){.name = names[n],
						      .dtype = MOE_ST_U8,
						      .ndim = 3,
						      .shape = {E, R, C / 32},
						      .data = sc};
			n++;
		}
	}
	const char *file = tmp_file("mxfp4.safetensors");
	char err[256];
	assert_int_equal(moe_st_write(file, t, n, err, sizeof err), MOE_OK);
	for (size_t i = 0; i < n; i++)
		free(bufs[i]);
	kept_vs_dequant(&d, file, H_TOL);
}

/* A GPTQ (v1) checkpoint: per expert X.qweight [K/8, N] int32, X.qzeros
 * [G, N/8], X.scales [G, N] f16 and X.g_idx, packed here from random codes
 * by the layout's definition. Kept int4 and dequantized at load agree; then
 * the file cut at many lengths and scales made NaN or zero are refused with
 * the file and tensor named, and the model holds no layer afterwards. */
static void pack_le32(uint8_t *p, uint32_t w)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(w >> (8 * i));
}

enum { GPTQ_NT = 2 * (1 + 4 * 3 * (4 + 1)) };

/* The input of rank j of a permutation drawn from key over K inputs
 * (Fisher-Yates on the hash): act-order's input order. */
static void act_order_perm(uint64_t key, uint32_t K, uint32_t *p)
{
	for (uint32_t k = 0; k < K; k++)
		p[k] = k;
	for (uint32_t k = K - 1; k > 0; k--) {
		uint32_t j = (uint32_t)(moe_rng_hash(81, key + k, 1, 2) % (k + 1)), v = p[k];
		p[k] = p[j], p[j] = v;
	}
}

/* The GPTQ tensors of two layers, 4 experts and a shared expert, into t
 * (names and buffers beside it) and written to file; act: g_idx from an act order (input p[j] in
 * group j / GS), one order per expert for gate and up (they share the input)
 * and one for down. */
static size_t gptq_tensors(struct moe_desc *p, int act, const char *file, struct moe_st_tensor *t,
			   char (*names)[48], void **bufs)
{
	struct moe_desc d;
	h_base_desc(&d, 64, 4, 2, 32);
	uint32_t H = d.hidden, I = d.intermediate, E = d.n_experts, GS = 16;
	snprintf(d.names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "r.{layer}");
	d.shared_count = 1;
	d.shared_intermediate = I;
	static const enum moe_role roles[6] = {MOE_ROLE_GATE,      MOE_ROLE_UP,
					       MOE_ROLE_DOWN,      MOE_ROLE_SHARED_GATE,
					       MOE_ROLE_SHARED_UP, MOE_ROLE_SHARED_DOWN};
	static const char *const nm[6] = {"g", "u", "d", "sg", "su", "sd"};
	for (int i = 0; i < 6; i++) {
		enum moe_role r = roles[i];
		const char *ex = i < 3 ? ".{expert}" : "";
		snprintf(d.names[r], MOE_NAME_MAX, "%s.{layer}%s.qweight", nm[i], ex);
		snprintf(d.scale_names[r], MOE_NAME_MAX, "%s.{layer}%s.scales", nm[i], ex);
		d.layouts[r].quant = MOE_QUANT_GPTQ;
		d.layouts[r].quant_block[0] = 1;
		d.layouts[r].quant_block[1] = GS;
	}
	set_q(&d, MOE_QMAT_UP, MOE_QFORMAT_INT4, GS, 1);
	set_q(&d, MOE_QMAT_DOWN, MOE_QFORMAT_INT4, GS, 1);
	set_q(&d, MOE_QMAT_SHARED_UP, MOE_QFORMAT_INT4, GS, 1);
	set_q(&d, MOE_QMAT_SHARED_DOWN, MOE_QFORMAT_INT4, GS, 1);
	*p = d;
	size_t n = 0;
	uint32_t order[64];
	for (uint32_t L = 0; L < 2; L++) {
		float *r = malloc((size_t)E * H * 4);
		assert_non_null(r);
		h_fill_input(r, (size_t)E * H, 60 + L);
		snprintf(names[n], 48, "r.%u", L);
		bufs[n] = r;
		t[n] = (struct moe_st_tensor){
		    .name = names[n], .dtype = MOE_ST_F32, .ndim = 2, .shape = {E, H}, .data = r};
		n++;
		for (uint32_t e = 0; e <= E; e++) /* e = E: the shared expert */
			for (int i = 0; i < 3; i++) {
				uint64_t N = i < 2 ? I : H, K = i < 2 ? H : I, G = K / GS;
				uint8_t *qw = malloc(K / 8 * N * 4), *qz = malloc(G * N / 8 * 4);
				uint16_t *sc = malloc(G * N * 2);
				int32_t *gi = malloc(K * 4);
				assert_true(qw && qz && sc && gi);
				uint64_t key = ((L * 8 + e) * 4 + (uint64_t)i) * 100000;
				for (uint64_t w = 0; w < K / 8 * N; w++)
					pack_le32(
					    qw + 4 * w,
					    (uint32_t)(moe_rng_hash(78, key + w, 1, 2) >> 32));
				for (uint64_t w = 0; w < G * N / 8; w++)
					pack_le32(
					    qz + 4 * w,
					    (uint32_t)(moe_rng_hash(79, key + w, 1, 2) >> 32));
				/* f16 scales 2^-6 * (1 + j/1024), some negative */
				for (uint64_t j = 0; j < G * N; j++)
					sc[j] = (uint16_t)((j % 3 ? 0 : 0x8000) | (9u << 10) |
							   (uint16_t)((j * 37 + e) % 1024));
				if (act && i != 1) /* up shares gate's order */
					act_order_perm(((L * 8 + e) * 4 + (uint64_t)i) << 20,
						       (uint32_t)K, order);
				for (uint64_t j = 0; j < K; j++)
					gi[act ? order[j] : j] = (int32_t)(j / GS);
				const char *sfx[4] = {"qweight", "qzeros", "scales", "g_idx"};
				void *data[4] = {qw, qz, sc, gi};
				enum moe_st_dtype dt[4] = {MOE_ST_I32, MOE_ST_I32, MOE_ST_F16,
							   MOE_ST_I32};
				uint64_t shp[4][2] = {{K / 8, N}, {G, N / 8}, {G, N}, {K, 0}};
				for (int k = 0; k < 4; k++) {
					if (e < E)
						snprintf(names[n], 48, "%s.%u.%u.%s", nm[i], L, e,
							 sfx[k]);
					else
						snprintf(names[n], 48, "%s.%u.%s", nm[3 + i], L,
							 sfx[k]);
					bufs[n] = data[k];
					t[n] =
					    (struct moe_st_tensor){.name = names[n],
								   .dtype = dt[k],
								   .ndim = k == 3 ? 1 : 2,
								   .shape = {shp[k][0], shp[k][1]},
								   .data = data[k]};
					n++;
				}
			}
	}
	assert_int_equal(n, GPTQ_NT);
	char err[256];
	assert_int_equal(moe_st_write(file, t, n, err, sizeof err), MOE_OK);
	return n;
}

static void test_load_gptq_kept(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_st_tensor t[GPTQ_NT];
	char names[GPTQ_NT][48];
	void *bufs[GPTQ_NT];
	const char *file = tmp_file("gptq.safetensors");
	size_t n = gptq_tensors(&d, 0, file, t, names, bufs);
	uint32_t H = d.hidden;
	char err[256];
	kept_vs_dequant(&d, file, H_TOL);

	struct h_model m;
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	float x[64], y[64];
	h_fill_input(x, H, 3);
	/* bad scales, located by file, tensor, output and group */
	uint16_t *s = NULL;
	for (size_t i = 0; i < n; i++)
		if (!strcmp(names[i], "d.1.2.scales"))
			s = bufs[i];
	assert_non_null(s);
	const uint16_t badv[2] = {0x7e00 /* NaN */, 0x0000};
	const char *word[2] = {"NaN scale for output 5, group 1", "zero scale for output 5"};
	const char *bad = tmp_file("gptq-bad.safetensors");
	for (int v = 0; v < 2; v++) {
		uint16_t keep = s[1 * H + 5];
		s[1 * H + 5] = badv[v];
		assert_int_equal(moe_st_write(bad, t, n, err, sizeof err), MOE_OK);
		s[1 * H + 5] = keep;
		assert_int_equal(m.load(mm, &bad, 1), MOE_ERR_WEIGHTS);
		assert_non_null(strstr(m.last_error(), word[v]));
		assert_non_null(strstr(m.last_error(), "'d.1.2.scales'"));
		assert_non_null(strstr(m.last_error(), "gptq-bad.safetensors"));
		assert_int_not_equal(m.forward(mm, 0, x, y, 1, NULL, NULL), MOE_OK);
	}
	/* cut anywhere: an error, never a crash, and nothing loaded */
	FILE *fp = fopen(file, "rb");
	assert_non_null(fp);
	fseek(fp, 0, SEEK_END);
	long size = ftell(fp);
	fseek(fp, 0, SEEK_SET);
	uint8_t *whole = malloc((size_t)size);
	assert_non_null(whole);
	assert_int_equal(fread(whole, 1, (size_t)size, fp), (size_t)size);
	fclose(fp);
	for (long len = 0; len < size; len += 1 + len / 7) {
		fp = fopen(bad, "wb");
		assert_non_null(fp);
		assert_int_equal(fwrite(whole, 1, (size_t)len, fp), (size_t)len);
		fclose(fp);
		assert_int_not_equal(m.load(mm, &bad, 1), MOE_OK);
		assert_non_null(strstr(m.last_error(), "gptq-bad.safetensors"));
		assert_int_not_equal(m.forward(mm, 0, x, y, 1, NULL, NULL), MOE_OK);
	}
	free(whole);
	for (size_t i = 0; i < n; i++)
		free(bufs[i]);
	m.destroy(mm);
	h_model_close(&m);
}

/* Act-order GPTQ (desc_act: a g_idx that is not k / group): the kept codes,
 * read in group order with each expert's inputs gathered in that order (f32
 * and int8 compute), against the same file dequantized at load. */
static void test_load_gptq_act_order(void **state)
{
	(void)state;
	struct moe_desc d;
	struct moe_st_tensor t[GPTQ_NT];
	char names[GPTQ_NT][48];
	void *bufs[GPTQ_NT];
	const char *file = tmp_file("gptq-act.safetensors");
	size_t n = gptq_tensors(&d, 1, file, t, names, bufs);
	kept_vs_dequant(&d, file, H_TOL);
	d.compute = MOE_COMPUTE_INT8;
	kept_vs_dequant(&d, file, MOE_INT8_COMPUTE_TOL);
	for (size_t i = 0; i < n; i++)
		free(bufs[i]);
}

static int setup(void **state)
{
	(void)state;
	return h_setup("test_quant");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_dequant_definition), cmocka_unit_test(test_float_codes),
	    cmocka_unit_test(test_desc_and_bytes),     cmocka_unit_test(test_cuda_refuses),
	    cmocka_unit_test(test_vs_reference),       cmocka_unit_test(test_avx2_target),
	    cmocka_unit_test(test_invariant),          cmocka_unit_test(test_load_refused),
	    cmocka_unit_test(test_load_fp8_kept),      cmocka_unit_test(test_load_mxfp4_kept),
	    cmocka_unit_test(test_load_gptq_kept),     cmocka_unit_test(test_load_gptq_act_order),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
