/* dequant.c: the decoders of dequant.h. Scalar code on purpose: it runs once
 * per weight at load, and every value it produces is exact, so there is
 * nothing to tune and nothing to round. */
#include "dequant.h"

#include <math.h>

float moe_e4m3_to_f32(uint8_t code)
{
	unsigned e = (code >> 3) & 0xfu, m = code & 0x7u;
	float v;
	if (e == 0xf && m == 0x7)
		return code & 0x80u ? -NAN : NAN;
	if (e == 0) /* subnormal: m/8 * 2^(1-7) */
		v = ldexpf((float)m, -9);
	else
		v = ldexpf((float)(8u + m), (int)e - 10);
	return code & 0x80u ? -v : v;
}

float moe_e2m1_to_f32(uint8_t code)
{
	unsigned e = (code >> 1) & 0x3u, m = code & 0x1u;
	/* subnormal 0 and 0.5; otherwise (1 + m/2) * 2^(e-1) */
	float v = e == 0 ? 0.5f * (float)m : ldexpf((float)(2u + m), (int)e - 2);
	return code & 0x8u ? -v : v;
}

float moe_e8m0_to_f32(uint8_t code)
{
	if (code == 0xff)
		return NAN;
	/* 2^-127 is an f32 subnormal, still exact */
	return ldexpf(1.0f, (int)code - 127);
}

void moe_fp8_block_scale_shape(uint64_t rows, uint64_t cols, const uint32_t block[2],
			       uint64_t *scale_rows, uint64_t *scale_cols)
{
	*scale_rows = block[0] ? (rows + block[0] - 1) / block[0] : 0;
	*scale_cols = block[1] ? (cols + block[1] - 1) / block[1] : 0;
}

int64_t moe_dequant_fp8_block(const uint8_t *q, const float *scale, uint64_t rows, uint64_t cols,
			      const uint32_t block[2], float *dst)
{
	if (!block[0] || !block[1])
		return -1;
	uint64_t sr, sc;
	moe_fp8_block_scale_shape(rows, cols, block, &sr, &sc);
	(void)sr;
	float lut[256];
	for (int c = 0; c < 256; c++)
		lut[c] = moe_e4m3_to_f32((uint8_t)c);
	int64_t bad = 0;
	for (uint64_t i = 0; i < rows; i++) {
		const float *srow = scale + (i / block[0]) * sc;
		for (uint64_t j = 0; j < cols; j++) {
			float v = lut[q[i * cols + j]] * srow[j / block[1]];
			bad += !isfinite(v);
			dst[i * cols + j] = v;
		}
	}
	return bad;
}

int64_t moe_dequant_mxfp4(const uint8_t *blocks, const uint8_t *scales, uint64_t rows,
			  uint64_t cols, float *dst)
{
	if (cols % 32)
		return -1;
	uint64_t nb = cols / 32;
	int64_t bad = 0;
	for (uint64_t i = 0; i < rows; i++)
		for (uint64_t b = 0; b < nb; b++) {
			float s = moe_e8m0_to_f32(scales[i * nb + b]);
			const uint8_t *blk = blocks + (i * nb + b) * 16;
			float *out = dst + i * cols + b * 32;
			for (int k = 0; k < 16; k++) {
				out[2 * k] = moe_e2m1_to_f32(blk[k] & 0xfu) * s;
				out[2 * k + 1] = moe_e2m1_to_f32(blk[k] >> 4) * s;
			}
			for (int k = 0; k < 32; k++) /* NaN scales; 6 * 2^127 overflows */
				bad += !isfinite(out[k]);
		}
	return bad;
}

static uint32_t le32(const uint8_t *p, uint64_t i)
{
	p += 4 * i;
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static unsigned nibble(uint32_t w, unsigned i)
{
	return (w >> (4 * i)) & 15u;
}

int64_t moe_unpack_int4(const struct moe_int4_src *s, uint8_t *codes, float *scale, float *offset)
{
	/* AWQ: the nibble holding output 8c + j (the inverse of its order) */
	static const unsigned awq_nib[8] = {0, 4, 1, 5, 2, 6, 3, 7};
	uint64_t N = s->N, K = s->K, G = K / s->group;
	int ct = s->kind == MOE_QUANT_PACK_QUANTIZED, awq = s->kind == MOE_QUANT_AWQ;
	for (uint64_t n = 0; n < N; n++) {
		for (uint64_t g = 0; g < G; g++) {
			uint64_t gi = n * G + g;
			float sc = s->scale[ct ? gi : g * N + n];
			if (!isfinite(sc) || sc == 0.0f)
				return (int64_t)gi;
			unsigned z;
			if (ct)
				z = s->zero8   ? (unsigned)(s->zero8[gi] + 8) & 15u
				    : s->zeros ? nibble(le32(s->zeros, n / 8 * G + g), n % 8)
					       : 8u;
			else
				z = nibble(le32(s->zeros, g * (N / 8) + n / 8),
					   awq ? awq_nib[n % 8] : (unsigned)(n % 8)) +
				    (s->kind == MOE_QUANT_GPTQ);
			scale[gi] = sc;
			offset[gi] = -(float)z * sc;
		}
		for (uint64_t k = 0; k < K; k++) {
			unsigned c = ct    ? nibble(le32(s->q, n * (K / 8) + k / 8), k % 8)
				     : awq ? nibble(le32(s->q, k * (N / 8) + n / 8), awq_nib[n % 8])
					   : nibble(le32(s->q, k / 8 * N + n), k % 8);
			codes[n * K + k] = (uint8_t)c;
		}
	}
	return -1;
}
