/* ref_quant.c: the experts kept quantized (moe_desc.qfmt) on the reference's
 * side: their code, scale and offset buffers, what they stand for in f32, and
 * the deterministic random codes that moe_ref_weights_random draws for them. */
#include "ref_quant.h"

#include "dequant.h"
#include "moe_ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct moe_qfmt moe_ref_role_qfmt(const struct moe_desc *d, enum moe_role r)
{
	int m = moe_role_qmat(r);
	struct moe_qfmt none = {MOE_QFORMAT_NONE, 0, 0};
	return m < 0 ? none : d->qfmt[m];
}

void moe_qdequant(const struct moe_qfmt *f, const uint8_t *codes, const float *scale,
		  const float *offset, uint64_t rows, uint64_t K, float *out)
{
	uint64_t ng = K / f->group;
	for (uint64_t n = 0; n < rows; n++)
		for (uint64_t k = 0; k < K; k++) {
			uint64_t gi = n * ng + k / f->group;
			uint8_t c = codes[n * K + k];
			float v = f->kind == MOE_QFORMAT_INT8    ? (float)(int8_t)c
				  : f->kind == MOE_QFORMAT_FP8   ? moe_e4m3_to_f32(c)
				  : f->kind == MOE_QFORMAT_MXFP4 ? moe_e2m1_to_f32(c)
								 : (float)c;
			float o = offset ? offset[gi] : 0.0f;
			out[n * K + k] = v * scale[gi] + o;
		}
}

/* Rows, K and the matrix count of a quantized role; 0 when it is not one. */
static int qshape(const struct moe_desc *d, enum moe_role r, uint64_t *rows, uint64_t *K,
		  uint64_t *mats)
{
	int pe;
	if (moe_ref_role_qfmt(d, r).kind == MOE_QFORMAT_NONE ||
	    !moe_desc_role_shape(d, r, rows, K, &pe))
		return 0;
	*mats = pe ? d->n_experts : 1;
	return 1;
}

enum moe_status moe_ref_quant_alloc(const struct moe_desc *d, struct moe_ref_weights *w)
{
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		uint64_t rows, K, mats;
		if (!w->w[r] || !qshape(d, (enum moe_role)r, &rows, &K, &mats))
			continue;
		struct moe_qfmt f = moe_ref_role_qfmt(d, (enum moe_role)r);
		size_t n = (size_t)(mats * rows * K), ng = n / f.group;
		struct moe_ref_qtensor *q = &w->q[r];
		q->codes = calloc(n, 1);
		q->scale = calloc(ng, sizeof(float));
		if (f.kind == MOE_QFORMAT_INT4)
			q->offset = calloc(ng, sizeof(float));
		if (!q->codes || !q->scale || (f.kind == MOE_QFORMAT_INT4 && !q->offset))
			return MOE_ERR_NOMEM;
	}
	return MOE_OK;
}

void moe_ref_quant_free(struct moe_ref_weights *w)
{
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		free(w->q[r].codes), free(w->q[r].scale), free(w->q[r].offset), free(w->q[r].perm);
		memset(&w->q[r], 0, sizeof w->q[r]);
	}
}

/* Codes uniform over the format's range; per group a scale that is exactly
 * an f16 value (as GPTQ and GGUF store them) with a spread of 2x, chosen so
 * that the values keep the fan-in bound of the unquantized draw; int4 zero
 * points uniform in 0..15 (zero) or 8. The stream of a role is keyed apart
 * from the unquantized one (role + 0x100), and every value depends on its
 * index alone, so the matrices can be drawn in any order, on any thread. */
size_t moe_ref_quant_random_blocks(const struct moe_desc *d)
{
	size_t n = 0;
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		uint64_t rows, K, mats;
		if (qshape(d, (enum moe_role)r, &rows, &K, &mats))
			n += mats;
	}
	return n;
}

void moe_ref_quant_random_block(const struct moe_desc *d, uint64_t seed, uint32_t layer,
				struct moe_ref_weights *w, size_t block)
{
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		uint64_t rows, K, mats;
		if (!qshape(d, (enum moe_role)r, &rows, &K, &mats))
			continue;
		if (block >= mats) {
			block -= mats;
			continue;
		}
		struct moe_ref_qtensor *q = &w->q[r];
		if (!q->codes)
			return;
		struct moe_qfmt f = moe_ref_role_qfmt(d, (enum moe_role)r);
		int i4 = f.kind == MOE_QFORMAT_INT4, nib = i4 || f.kind == MOE_QFORMAT_MXFP4;
		uint64_t n = mats * rows * K, m = rows * K, key = (uint64_t)r + 0x100;
		uint64_t i0 = block * m, g0 = i0 / f.group, ng = m / f.group;
		/* the codes' largest magnitude: int4 7.5 around the zero point,
		 * int8 127, e4m3 448 (drawn codes average far less), e2m1 6 */
		double top = i4 ? 7.5 : f.kind == MOE_QFORMAT_INT8 ? 127.0 : nib ? 6.0 : 16.0;
		double a = 1.0 / sqrt((double)K) / top;
		for (uint64_t i = i0; i < i0 + m; i++) {
			uint64_t h = moe_rng_hash(seed, layer, key, i);
			uint8_t c = nib ? (uint8_t)(h >> 60) : (uint8_t)(h >> 56);
			if (f.kind == MOE_QFORMAT_FP8 && (c & 0x7f) == 0x7f)
				c ^= 1; /* not NaN: 0x7f and 0xff are */
			q->codes[i] = c;
		}
		for (uint64_t gi = g0; gi < g0 + ng; gi++) {
			uint64_t h = moe_rng_hash(seed, layer, key, n + gi);
			float s = moe_f16_round((float)(a * (0.5 + moe_rng_uniform(h))));
			if (f.kind == MOE_QFORMAT_MXFP4) /* E8M0: a power of two */
				s = ldexpf(1.0f, ilogbf(s));
			q->scale[gi] = s;
			if (i4) {
				unsigned z = f.zero ? (unsigned)(h & 15) : 8;
				q->offset[gi] = -(float)z * s; /* exact: z < 16, s has 11 bits */
			}
		}
		moe_qdequant(&f, q->codes + i0, q->scale + g0, q->offset ? q->offset + g0 : NULL,
			     rows, K, w->w[r] + i0);
		return;
	}
}

void moe_ref_quant_random(const struct moe_desc *d, uint64_t seed, uint32_t layer,
			  struct moe_ref_weights *w)
{
	size_t nb = moe_ref_quant_random_blocks(d);
	for (size_t b = 0; b < nb; b++)
		moe_ref_quant_random_block(d, seed, layer, w, b);
}
