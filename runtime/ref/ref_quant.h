/* ref_quant.h: the quantized roles' buffers of struct moe_ref_weights (for
 * ref_util.c, which allocates, frees and fills the weights). */
#ifndef MOE_REF_QUANT_H
#define MOE_REF_QUANT_H

#include "moe_ref.h"

/* Allocate the code, scale and offset buffers of every quantized role whose
 * f32 buffer exists; MOE_ERR_NOMEM leaves the caller to free. */
enum moe_status moe_ref_quant_alloc(const struct moe_desc *d, struct moe_ref_weights *w);
void moe_ref_quant_free(struct moe_ref_weights *w);
/* Random codes for every quantized role, and the values they stand for in
 * the role's f32 buffer (the f32 draw skips these roles). Drawn whole, or one
 * matrix (block) at a time: moe_ref_quant_random_blocks of them. */
void moe_ref_quant_random(const struct moe_desc *d, uint64_t seed, uint32_t layer,
			  struct moe_ref_weights *w);
size_t moe_ref_quant_random_blocks(const struct moe_desc *d);
void moe_ref_quant_random_block(const struct moe_desc *d, uint64_t seed, uint32_t layer,
				struct moe_ref_weights *w, size_t block);

#endif
