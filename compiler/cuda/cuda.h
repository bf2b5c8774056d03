/* cuda.h: the CUDA backend of the compiler: the fixed device code lives in
 * the .cuh files of kernels/ (embedded at build time); cuda_emit.c writes a
 * model's CUDA C
 * from the plan (its constants and kernels around those files) and the
 * images file that embeds the compiled kernels into model.so; nvrtc.c
 * compiles the CUDA C with NVRTC (opened with dlopen) into a cubin per arch
 * plus PTX. */
#ifndef MOE_CUDA_H
#define MOE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "cuda_rt.h"

/* What moe_cuda_generate produces. */
#define MOE_CUDA_EMITS(X) X(CU, "cu") X(PTX, "ptx") X(IMAGES, "images")
#define MOE_ENUM_X_MOE_CUDA_EMIT_(v, s) MOE_CUDA_EMIT_##v,
MOE_DEFINE_ENUM(moe_cuda_emit, MOE_CUDA_EMIT_, MOE_CUDA_EMITS);
extern const char *const moe_cuda_emit_names[MOE_CUDA_EMIT_COUNT];

/* The archs compiled when none are given. */
#define MOE_CUDA_DEFAULT_ARCHS "sm_80,sm_90"
#define MOE_CUDA_MAX_ARCHS 8

/* The fixed device code: the files of compiler/cuda/kernels, embedded by
 * CMakeLists.txt (moe_cuda_kernels.c in the build folder). The list ends
 * with a null name. */
struct moe_cuda_kernel_file {
	const char *name; /* "moe_router.cuh" */
	const char *text; /* the whole file, NUL-terminated */
};
extern const struct moe_cuda_kernel_file moe_cuda_kernel_files[];

/* cuda_emit.c ------------------------------------------------------------ */

/* The CUDA backend generates from the one plan, moe_plan_build(d,
 * MOE_TARGET_CUDA, ...): what it refuses is said by the mode table
 * (compiler/plan/modes.c); the plan's geometry fields hold the CPU panels and
 * are not used here. */

/* The generated source's name, e.g. "mixtral-8x7b.cu" (cap bytes). */
void moe_cuda_source_name(const struct moe_desc *d, char *buf, size_t cap);

/* The CUDA C of plan p, deterministic, NUL-terminated, malloc'ed into *out
 * (*len bytes without the NUL): the files of kernels/ it needs inlined in
 * order, with the model's constants, its FFN geometries and one kernel per
 * op of the plan around them; one self-contained file that NVRTC compiles
 * as it is. Returns 0, or -1 with a message in err. */
int moe_cuda_emit_source(const struct moe_plan *p, char **out, size_t *len, char *err, size_t cap);

/* Parse "sm_80,sm_90" (or NULL: the default) into archs (pointers into
 * storage, which must hold the string). Returns the count, or -1 with a
 * message in err on an unknown or malformed arch. */
int moe_cuda_parse_archs(const char *list, char *storage, size_t storage_cap, const char **archs,
			 int max, char *err, size_t cap);

/* Generate kind for plan p: CU (the source; archs unused), PTX (compiled for
 * the first arch) or IMAGES (a self-contained C file defining
 * moe_cuda_gen_model with a cubin per arch plus the PTX of the first arch,
 * for link.c to compile into model.so). Output malloc'ed into *out / *len.
 * Returns 0, or -1 with a message in err (NVRTC's log, with the source's
 * name, when compilation fails). */
int moe_cuda_generate(const struct moe_plan *p, const char *const *archs, int n_archs,
		      enum moe_cuda_emit kind, char **out, size_t *len, char *err, size_t cap);

/* The whole CUDA back half for d into the file `out` (written under a
 * temporary name and renamed): plan, generate kind. Returns 0, or
 * MOE_EXIT_BACKEND / MOE_EXIT_IO with a message in err. */
int moe_compile_cuda(const struct moe_desc *d, const char *const *archs, int n_archs,
		     enum moe_cuda_emit kind, const char *out, char *err, size_t cap);

/* nvrtc.c ---------------------------------------------------------------- */

/* Open NVRTC (CUDA_HOME/lib64, /usr/local/cuda/lib64, then the plain soname;
 * MOE_NVRTC overrides): 0, or -1 with a message naming where it looked. */
int moe_nvrtc_open(char *err, size_t cap);
/* "13.0" (cap bytes), or "" when NVRTC cannot be opened. */
void moe_nvrtc_version(char *buf, size_t cap);
/* Whether NVRTC can compile for arch ("sm_90"). */
int moe_nvrtc_supports(const char *arch);

struct moe_nvrtc_out {
	unsigned char *cubin; /* malloc'ed; NULL when not asked */
	size_t cubin_size;
	char *ptx; /* malloc'ed, NUL-terminated; NULL when not asked */
	size_t ptx_size;
	char *log; /* malloc'ed program log ("" when empty) */
};

/* Compile src (named name in messages) for arch, returning the cubin
 * and/or the PTX as asked. Returns 0, or -1 with "NAME: NVRTC ... failed"
 * plus the log in err. out's buffers are the caller's (moe_nvrtc_out_free). */
int moe_nvrtc_compile(const char *src, const char *name, const char *arch, int want_cubin,
		      int want_ptx, struct moe_nvrtc_out *out, char *err, size_t cap);
void moe_nvrtc_out_free(struct moe_nvrtc_out *o);

#endif
