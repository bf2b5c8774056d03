/* test_dequant.c: the quantized-checkpoint decoders of runtime/dequant.h.
 * Expected values are built here from the formats' definitions (bit fields
 * and the published E2M1 table), not from the decoders; the block and
 * nibble layouts are checked on hand-packed tensors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"

/* e4m3fn from its definition: (-1)^s * 2^(e-7) * (1 + m/8), subnormals
 * 2^-6 * m/8, S.1111.111 NaN. */
static double e4m3_def(unsigned c)
{
	unsigned s = c >> 7, e = (c >> 3) & 15, m = c & 7;
	if (e == 15 && m == 7)
		return NAN;
	double v = e ? pow(2.0, (double)e - 7.0) * (1.0 + m / 8.0) : pow(2.0, -6.0) * (m / 8.0);
	return s ? -v : v;
}

static void test_e4m3(void **state)
{
	(void)state;
	for (unsigned c = 0; c < 256; c++) {
		float v = moe_e4m3_to_f32((uint8_t)c);
		double want = e4m3_def(c);
		if (isnan(want)) {
			assert_true(isnan(v));
			continue;
		}
		assert_true((double)v == want);
		assert_int_equal(!!signbit(v), c >> 7); /* -0 keeps its sign */
	}
	/* anchors of the format */
	assert_true(moe_e4m3_to_f32(0x38) == 1.0f);
	assert_true(moe_e4m3_to_f32(0x7e) == 448.0f); /* the largest */
	assert_true(moe_e4m3_to_f32(0xfe) == -448.0f);
	assert_true(moe_e4m3_to_f32(0x01) == 0x1p-9f); /* the smallest subnormal */
	assert_true(moe_e4m3_to_f32(0x08) == 0x1p-6f); /* the smallest normal */
	assert_true(moe_e4m3_to_f32(0x40) == 2.0f);
	assert_true(moe_e4m3_to_f32(0x3c) == 1.5f);
	assert_true(isnan(moe_e4m3_to_f32(0x7f)) && isnan(moe_e4m3_to_f32(0xff)));
	/* no infinities: the positive codes below NaN increase strictly */
	for (unsigned c = 1; c < 0x7f; c++)
		assert_true(moe_e4m3_to_f32((uint8_t)c) > moe_e4m3_to_f32((uint8_t)(c - 1)));
}

static void test_e2m1(void **state)
{
	(void)state;
	/* the table of the OCP MX spec (and docs/semantics.md, gpt-oss) */
	static const float lut[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
				      -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
	for (unsigned c = 0; c < 16; c++) {
		assert_true(moe_e2m1_to_f32((uint8_t)c) == lut[c]);
		assert_int_equal(!!signbit(moe_e2m1_to_f32((uint8_t)c)), c >> 3);
		/* only the low nibble counts */
		assert_true(moe_e2m1_to_f32((uint8_t)(c | 0xa0)) == lut[c]);
	}
}

static void test_e8m0(void **state)
{
	(void)state;
	for (unsigned c = 0; c < 255; c++) {
		float v = moe_e8m0_to_f32((uint8_t)c);
		assert_true((double)v == ldexp(1.0, (int)c - 127));
		assert_true(v > 0.0f);
	}
	assert_true(moe_e8m0_to_f32(127) == 1.0f);
	assert_true(moe_e8m0_to_f32(128) == 2.0f);
	assert_true(moe_e8m0_to_f32(0) == 0x1p-127f);
	assert_true(moe_e8m0_to_f32(254) == 0x1p127f);
	assert_true(isnan(moe_e8m0_to_f32(255)));
}

static uint64_t rng = 88172645463325252ull;

static unsigned next(unsigned n)
{
	rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
	return (unsigned)(rng % n);
}

static void test_fp8_block(void **state)
{
	(void)state;
	/* DeepSeek-V3 expert shapes (docs/semantics.md): gate [2048, 7168] has
	 * weight_scale_inv [16, 56], down [7168, 2048] has [56, 16] */
	uint64_t sr, sc;
	moe_fp8_block_scale_shape(2048, 7168, (uint32_t[]){128, 128}, &sr, &sc);
	assert_true(sr == 16 && sc == 56);
	moe_fp8_block_scale_shape(7168, 2048, (uint32_t[]){128, 128}, &sr, &sc);
	assert_true(sr == 56 && sc == 16);
	moe_fp8_block_scale_shape(129, 1, (uint32_t[]){128, 128}, &sr, &sc);
	assert_true(sr == 2 && sc == 1); /* partial tiles round up */

	/* 5 x 7 with 2 x 3 tiles: scale [3, 3], the last row and column of
	 * tiles partial */
	enum { R = 5, C = 7 };
	const uint32_t blk[2] = {2, 3};
	uint8_t q[R * C];
	float sc33[9], dst[R * C];
	for (int i = 0; i < R * C; i++) {
		q[i] = (uint8_t)next(256);
		if ((q[i] & 0x7f) == 0x7f)
			q[i] ^= 1; /* no NaN codes here */
	}
	for (int i = 0; i < 9; i++)
		sc33[i] = (float)(i + 1) * 0.25f;
	assert_int_equal(moe_dequant_fp8_block(q, sc33, R, C, blk, dst), 0);
	for (int i = 0; i < R; i++)
		for (int j = 0; j < C; j++) {
			double want = e4m3_def(q[i * C + j]) * sc33[(i / 2) * 3 + j / 3];
			assert_true((double)dst[i * C + j] == want);
		}
	/* one tile covers everything */
	float one = 3.0f;
	assert_int_equal(moe_dequant_fp8_block(q, &one, R, C, (uint32_t[]){128, 128}, dst), 0);
	for (int i = 0; i < R * C; i++)
		assert_true((double)dst[i] == 3.0 * e4m3_def(q[i]));
	/* NaN codes and a non-finite scale are counted */
	q[0] = 0x7f, q[C] = 0xff;
	sc33[8] = INFINITY; /* rows 4, cols 6: one value */
	assert_int_equal(moe_dequant_fp8_block(q, sc33, R, C, blk, dst), 3);
	assert_true(isnan(dst[0]) && isnan(dst[C]) && isinf(dst[4 * C + 6]));
	/* a zero block size writes nothing */
	memset(dst, 0x5a, sizeof dst);
	assert_int_equal(moe_dequant_fp8_block(q, sc33, R, C, (uint32_t[]){0, 128}, dst), -1);
	assert_int_equal(moe_dequant_fp8_block(q, sc33, R, C, (uint32_t[]){128, 0}, dst), -1);
	for (size_t i = 0; i < sizeof dst; i++)
		assert_int_equal(((uint8_t *)dst)[i], 0x5a);
}

static double e2m1_def(unsigned c)
{
	static const double lut[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
	return c & 8 ? -lut[c & 7] : lut[c & 7];
}

static void test_mxfp4(void **state)
{
	(void)state;
	/* the nibble order: byte 0x21 holds column 0 = code 1 (0.5) and
	 * column 1 = code 2 (1.0) */
	uint8_t blk[16] = {0x21}, s127 = 127;
	float out[32];
	assert_int_equal(moe_dequant_mxfp4(blk, &s127, 1, 32, out), 0);
	assert_true(out[0] == 0.5f && out[1] == 1.0f);
	for (int j = 2; j < 32; j++)
		assert_true(out[j] == 0.0f);

	/* gpt-oss layout, two stacked experts of [3, 64]: blocks [E, 3, 2, 16],
	 * scales [E, 3, 2], the codes of column j at byte j / 2 of its block */
	enum { E = 2, R = 3, C = 64, NB = C / 32 };
	uint8_t codes[E][R][C], blocks[E * R * NB * 16], scales[E * R * NB];
	for (int e = 0; e < E; e++)
		for (int i = 0; i < R; i++)
			for (int j = 0; j < C; j++)
				codes[e][i][j] = (uint8_t)next(16);
	for (int e = 0; e < E; e++)
		for (int i = 0; i < R; i++)
			for (int b = 0; b < NB; b++) {
				uint8_t *p = blocks + ((e * R + i) * NB + b) * 16;
				for (int k = 0; k < 16; k++)
					p[k] = (uint8_t)(codes[e][i][b * 32 + 2 * k] |
							 codes[e][i][b * 32 + 2 * k + 1] << 4);
				scales[(e * R + i) * NB + b] = (uint8_t)(120 + next(15));
			}
	float dst[E][R][C];
	for (int e = 0; e < E; e++)
		assert_int_equal(moe_dequant_mxfp4(blocks + e * R * C / 2, scales + e * R * C / 32,
						   R, C, &dst[e][0][0]),
				 0);
	for (int e = 0; e < E; e++)
		for (int i = 0; i < R; i++)
			for (int j = 0; j < C; j++) {
				int sc = scales[(e * R + i) * NB + j / 32];
				double want = e2m1_def(codes[e][i][j]) * ldexp(1.0, sc - 127);
				assert_true((double)dst[e][i][j] == want);
			}

	/* a NaN scale spoils its 32 values; 6 * 2^127 overflows f32 */
	uint8_t two[32] = {0}, sc2[2] = {255, 254};
	two[16] = 0x07; /* second block, column 0: code 7 = 6.0 */
	float o2[64];
	assert_int_equal(moe_dequant_mxfp4(two, sc2, 1, 64, o2), 33);
	assert_true(isnan(o2[0]) && isinf(o2[32]) && o2[33] == 0.0f);
	/* columns must come in whole blocks of 32 */
	memset(o2, 0x5a, sizeof o2);
	assert_int_equal(moe_dequant_mxfp4(two, sc2, 1, 48, o2), -1);
	for (size_t i = 0; i < sizeof o2; i++)
		assert_int_equal(((uint8_t *)o2)[i], 0x5a);
}

static void put32(uint8_t *p, uint32_t w)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(w >> (8 * i));
}

/* The int4 checkpoint layouts on hand-packed words: an 8 x 16 matrix (N = 8
 * outputs, K = 16 inputs, groups of 8) whose code at (n, k) is (n + k) % 16,
 * zero point (n + g) % 16 and scale (n + 1) / 4 (negated in group 1). */
static void test_int4(void **state)
{
	(void)state;
	enum { N = 8, K = 16, GS = 8, G = K / GS };
	static const unsigned awq_order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
	uint8_t code[N][K], zero[N][G];
	for (int n = 0; n < N; n++) {
		for (int k = 0; k < K; k++)
			code[n][k] = (uint8_t)((n + k) % 16);
		for (int g = 0; g < G; g++)
			zero[n][g] = (uint8_t)((n + g + 3) % 16);
	}
	float sc_gn[G * N], sc_ng[N * G];
	for (int n = 0; n < N; n++)
		for (int g = 0; g < G; g++)
			sc_gn[g * N + n] = sc_ng[n * G + g] =
			    (g ? -1.0f : 1.0f) * (float)(n + 1) / 4;
	/* GPTQ: qweight [K/8, N] (word (r, n): inputs 8r..8r+7 of output n),
	 * qzeros [G, N/8] (word (g, 0): outputs 0..7) */
	uint8_t gq[K / 8 * N * 4], gz[G * 4], aq[K * 4], az[G * 4], cq[N * K / 8 * 4], cz[G * 4];
	for (int r = 0; r < K / 8; r++)
		for (int n = 0; n < N; n++) {
			uint32_t w = 0;
			for (int i = 0; i < 8; i++)
				w |= (uint32_t)code[n][8 * r + i] << (4 * i);
			put32(gq + 4 * (r * N + n), w);
		}
	for (int g = 0; g < G; g++) {
		uint32_t w = 0, a = 0, c = 0;
		for (int i = 0; i < 8; i++) {
			w |= (uint32_t)((zero[i][g] + 15) % 16) << (4 * i); /* v1: z - 1 */
			a |= (uint32_t)zero[awq_order[i]][g] << (4 * i);
			c |= (uint32_t)zero[i][g] << (4 * i); /* packed along N */
		}
		put32(gz + 4 * g, w), put32(az + 4 * g, a), put32(cz + 4 * g, c);
	}
	/* AWQ: qweight [K, N/8], the word of input k holding outputs in the
	 * order 0 2 4 6 1 3 5 7 */
	for (int k = 0; k < K; k++) {
		uint32_t w = 0;
		for (int i = 0; i < 8; i++)
			w |= (uint32_t)code[awq_order[i]][k] << (4 * i);
		put32(aq + 4 * k, w);
	}
	/* compressed-tensors: weight_packed [N, K/8] */
	for (int n = 0; n < N; n++)
		for (int r = 0; r < K / 8; r++) {
			uint32_t w = 0;
			for (int i = 0; i < 8; i++)
				w |= (uint32_t)code[n][8 * r + i] << (4 * i);
			put32(cq + 4 * (n * (K / 8) + r), w);
		}
	int8_t z8[N * G];
	for (int n = 0; n < N; n++)
		for (int g = 0; g < G; g++)
			z8[n * G + g] = (int8_t)(zero[n][g] - 8);
	const struct moe_int4_src src[] = {
	    {MOE_QUANT_GPTQ, N, K, GS, gq, sc_gn, gz, NULL},
	    {MOE_QUANT_GPTQ_V2, N, K, GS, gq, sc_gn, az /* unused below */, NULL},
	    {MOE_QUANT_AWQ, N, K, GS, aq, sc_gn, az, NULL},
	    {MOE_QUANT_PACK_QUANTIZED, N, K, GS, cq, sc_ng, cz, NULL},
	    {MOE_QUANT_PACK_QUANTIZED, N, K, GS, cq, sc_ng, NULL, z8},
	    {MOE_QUANT_PACK_QUANTIZED, N, K, GS, cq, sc_ng, NULL, NULL},
	};
	/* gptq_v2 stores the zero point itself: packed like GPTQ's qzeros */
	uint8_t v2z[G * 4];
	for (int g = 0; g < G; g++) {
		uint32_t w = 0;
		for (int i = 0; i < 8; i++)
			w |= (uint32_t)zero[i][g] << (4 * i);
		put32(v2z + 4 * g, w);
	}
	for (size_t t = 0; t < sizeof src / sizeof *src; t++) {
		struct moe_int4_src s = src[t];
		if (s.kind == MOE_QUANT_GPTQ_V2)
			s.zeros = v2z;
		uint8_t codes[N * K];
		float scale[N * G], offset[N * G];
		assert_int_equal(moe_unpack_int4(&s, codes, scale, offset), -1);
		int sym = t == 5;
		for (int n = 0; n < N; n++) {
			for (int k = 0; k < K; k++)
				assert_int_equal(codes[n * K + k], code[n][k]);
			for (int g = 0; g < G; g++) {
				double sv = (g ? -1.0 : 1.0) * (n + 1) / 4.0;
				double z = sym ? 8 : zero[n][g];
				if (s.kind == MOE_QUANT_GPTQ && zero[n][g] == 0)
					z = 16; /* v1: stored 15 reads back as 16 */
				assert_true(scale[n * G + g] == (float)sv);
				assert_true(offset[n * G + g] == (float)(-z * sv));
			}
		}
	}
	/* a zero or NaN scale is reported by its group, n * G + g */
	float bad[G * N];
	memcpy(bad, sc_gn, sizeof bad);
	bad[1 * N + 5] = 0.0f;
	struct moe_int4_src s = {MOE_QUANT_AWQ, N, K, GS, aq, bad, az, NULL};
	uint8_t codes[N * K];
	float scale[N * G], offset[N * G];
	assert_int_equal(moe_unpack_int4(&s, codes, scale, offset), 5 * G + 1);
	bad[1 * N + 5] = NAN;
	assert_int_equal(moe_unpack_int4(&s, codes, scale, offset), 5 * G + 1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_e4m3),  cmocka_unit_test(test_e2m1),
	    cmocka_unit_test(test_e8m0),  cmocka_unit_test(test_fp8_block),
	    cmocka_unit_test(test_mxfp4), cmocka_unit_test(test_int4),
	};
	return cmocka_run_group_tests_name("dequant", tests, NULL, NULL);
}
