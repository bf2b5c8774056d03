/* dequant.h: quantized checkpoint tensors (struct moe_layout.quant) to f32,
 * for the weight loader. fp8_block: e4m3 values times one f32 scale per tile
 * (DeepSeek-V3 weight_scale_inv); mxfp4: E2M1 codes, two per byte, times one
 * E8M0 scale per 32 values of a row (gpt-oss *_blocks / *_scales). */
#ifndef MOE_DEQUANT_H
#define MOE_DEQUANT_H

#include <stdint.h>

#include "moe_desc.h" /* enum moe_quant */

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

/* An int4 checkpoint matrix of N outputs by K inputs, packed eight codes to
 * a little-endian int32 (bit 4i..4i+3 holding code i), with one scale per
 * group of `group` inputs of an output (group divides K; K and, with packed
 * zero points, N multiples of 8). scale is f32 (converted from the stored
 * f16/bf16, exact). The layouts, all from the libraries' own packers:
 *   gptq, gptq_v2 (auto-gptq, optimum): qweight [K/8, N], code i of word
 *     (r, n) is input 8r + i; qzeros [G, N/8], nibble i of word (g, c) the
 *     zero of output 8c + i; scales [G, N]. W = s * (q - z'), z' = z + 1 for
 *     gptq (auto-gptq's "v1" format stores the zero point minus one), z for
 *     gptq_v2.
 *   awq (AutoAWQ gemm): qweight [K, N/8], qzeros [G, N/8], scales [G, N];
 *     nibble i of a word holds output 8c + {0, 2, 4, 6, 1, 3, 5, 7}[i].
 *     W = s * (q - z).
 *   pack_quantized (compressed-tensors): weight_packed [N, K/8], code i of
 *     word (n, r) is input 8r + i, stored as the signed value + 8; scale
 *     [N, G]; the zero point packed along outputs [N/8, G] (nibble i of word
 *     (r, g) is output 8r + i, also + 8), or one signed int8 per group [N, G]
 *     (zero8), or none (symmetric, z = 8). W = s * (q - z).
 * Writes, per output n, codes[n * K + k] (0..15), and per group scale[n * G
 * + g] = s and offset[n * G + g] = -z' * s (W = code * s + offset, exact in
 * f32). zeros is NULL for a symmetric pack_quantized matrix. Returns -1, or
 * the first group (n * G + g) whose scale is not finite or is zero (nothing
 * more is written). */
struct moe_int4_src {
	enum moe_quant kind;
	uint64_t N, K, group;
	const uint8_t *q;     /* the packed codes */
	const float *scale;   /* as stored, converted to f32 */
	const uint8_t *zeros; /* packed zero points, or NULL */
	const int8_t *zero8;  /* pack_quantized's unpacked zero points [N, G], or NULL */
};
int64_t moe_unpack_int4(const struct moe_int4_src *src, uint8_t *codes, float *scale,
			float *offset);

#endif
