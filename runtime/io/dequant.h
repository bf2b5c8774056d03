/* dequant.h: quantized checkpoint tensors (struct moe_layout.quant) to f32,
 * for the weight loader. fp8_block: e4m3 values times one f32 scale per tile
 * (DeepSeek-V3 weight_scale_inv); mxfp4: E2M1 codes, two per byte, times one
 * E8M0 scale per 32 values of a row (gpt-oss *_blocks / *_scales). */
#ifndef MOE_DEQUANT_H
#define MOE_DEQUANT_H

#include <stdint.h>

/* One code to f32, exactly (every value is representable).
 * e4m3: OCP FP8 E4M3 "fn" (torch.float8_e4m3fn): sign, 4 exponent bits (bias
 *   7), 3 mantissa bits; no infinities; 0x7f and 0xff are NaN; max 448.
 * e2m1: the low 4 bits (the high ones are ignored): sign, 2 exponent bits
 *   (bias 1), 1 mantissa bit; 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
 * e8m0: 2^(code - 127); 0xff is NaN (OCP MX). */
float moe_e4m3_to_f32(uint8_t code);
float moe_e2m1_to_f32(uint8_t code);
float moe_e8m0_to_f32(uint8_t code);

/* The scale tensor of a [rows, cols] fp8_block matrix with tiles of
 * block[0] x block[1]: [ceil(rows / block[0]), ceil(cols / block[1])]. Both
 * block sizes must be positive. */
void moe_fp8_block_scale_shape(uint64_t rows, uint64_t cols, const uint32_t block[2],
			       uint64_t *scale_rows, uint64_t *scale_cols);

/* dst[i, j] = e4m3(q[i, j]) * scale[i / block[0], j / block[1]] over a
 * row-major [rows, cols] matrix as stored; scale is row-major with the shape
 * above. The caller owns every buffer; dst does not alias the inputs.
 * Returns the number of non-finite values written (NaN codes, non-finite
 * scales), or -1 when a block size is 0 (nothing is written). */
int64_t moe_dequant_fp8_block(const uint8_t *q, const float *scale, uint64_t rows, uint64_t cols,
			      const uint32_t block[2], float *dst);

/* A [rows, cols] mxfp4 matrix: blocks is [rows, cols / 32, 16] bytes, byte b
 * of a block holding columns 2b (low nibble) and 2b + 1 (high nibble) of its
 * 32; scales is [rows, cols / 32] E8M0 bytes. dst[i, j] = e2m1(code) *
 * e8m0(scale). Stacked experts are consecutive matrices: call once per
 * expert with the pointers advanced by rows * cols / 2 and rows * cols / 32.
 * Returns the number of non-finite values written (NaN scales, 6 * 2^127
 * overflowing), or -1 when cols is not a multiple of 32 (nothing is
 * written). */
int64_t moe_dequant_mxfp4(const uint8_t *blocks, const uint8_t *scales, uint64_t rows,
			  uint64_t cols, float *dst);

#endif
