/* cuda_backend.c: the CUDA backend's row of the backend table: a cubin per
 * arch plus PTX (cuda_emit.c, nvrtc.c), embedded in C the link compiles. */
#include "cuda.h"

static int cuda_supports(const struct moe_desc *d, struct moe_diag *diag)
{
	return moe_mode_supported(d, MOE_TARGET_CUDA, diag);
}

static int cuda_generate(const struct moe_plan *p, const struct moe_backend_opts *o, char **out,
			 size_t *len, char *err, size_t cap)
{
	return moe_cuda_generate(p, o->archs, o->n_archs, MOE_CUDA_EMIT_IMAGES, out, len, err, cap);
}

const struct moe_backend moe_backend_cuda = {
    .target = MOE_TARGET_CUDA,
    .name = "cuda",
    .supports = cuda_supports,
    .generate = cuda_generate,
    .link_name = "cuda_images.c",
};
