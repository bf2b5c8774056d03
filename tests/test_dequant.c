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

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_e4m3),  cmocka_unit_test(test_e2m1),
	    cmocka_unit_test(test_e8m0),  cmocka_unit_test(test_fp8_block),
	    cmocka_unit_test(test_mxfp4),
	};
	return cmocka_run_group_tests_name("dequant", tests, NULL, NULL);
}
