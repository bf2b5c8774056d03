/* cpu_backend.c: the CPU backend's row of the backend table: the LLVM
 * module of the plan (cpu_llvm.c), compiled to an object for the link. */
#include "backend.h"

static int cpu_supports(const struct moe_desc *d, struct moe_diag *diag)
{
	return moe_mode_supported(d, MOE_TARGET_CPU, diag);
}

static int cpu_generate(const struct moe_plan *p, const struct moe_backend_opts *o, char **out,
			size_t *len, char *err, size_t cap)
{
	return moe_cpu_generate(p, o->cpu, MOE_EMIT_OBJ, out, len, err, cap);
}

const struct moe_backend moe_backend_cpu = {
    .target = MOE_TARGET_CPU,
    .name = "cpu",
    .supports = cpu_supports,
    .generate = cpu_generate,
    .link_name = "model.o",
};
