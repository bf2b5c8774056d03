/* backend.h: the back half of the compiler: plan.c (the backend-neutral kernel
 * plan), cpu_llvm.c (LLVM IR for the CPU), link.c (object + runtime ->
 * model.so) and the compile and run subcommands. */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "moe_kernels.h"
#include "moegen.h"

/* plan.c ---------------------------------------------------------------- */

#define MOE_TARGETS(X) X(CPU, "cpu") X(CUDA, "cuda")
#define MOE_ENUM_X_MOE_TARGET_(v, s) MOE_TARGET_##v,
MOE_DEFINE_ENUM(moe_target, MOE_TARGET_, MOE_TARGETS);
extern const char *const moe_target_names[MOE_TARGET_COUNT];

struct moe_plan_op {
	enum moe_op op;   /* moe_ops.h */
	uint32_t in, out; /* buffer ids (MOE_BUF_COUNT: the layer input/output) */
};

/* The kernel plan, built once per target from the mode table: ops in
 * order with the buffers they read and write, the workspace, the FFN
 * geometries. Every backend emits from it
 * and the CPU runtime walks its op list. */
struct moe_plan {
	const struct moe_desc *desc; /* borrowed */
	enum moe_target target;
	uint32_t n_ops;
	struct moe_plan_op ops[MOE_MAX_OPS];
	uint32_t route_width;
	/* The FFNs' arithmetic: F32, BF16 or INT8 once the backend resolved the
	 * spec's dtype.compute for its target machine (moe_plan_set_compute),
	 * AUTO before. The geometries follow it (bf16: K in pairs; int8: the
	 * codes in runs of 4 inputs). */
	enum moe_compute compute;
	struct moe_geom routed, shared;          /* shared.width == 0: none */
	struct moe_buf_size bufs[MOE_BUF_COUNT]; /* the workspace (moe_workspace) */
};

/* Build the plan of d for target t. Modes and features the target does not
 * generate are refused with an error in diag (never run through the
 * reference). Returns 0 or -1. */
int moe_plan_build(const struct moe_desc *d, enum moe_target t, struct moe_plan *p,
		   struct moe_diag *diag);
void moe_plan_dump(const struct moe_plan *p, FILE *out);
/* Resolve the compute format for a target that has (1) or lacks (0) the
 * bf16 and the int8 dot-product instructions: int8 when the spec asks for it
 * and the target has them; bf16 when the spec asks for it, or leaves it to
 * auto with bf16 weights, and the target has them; else f32 (kept
 * quantized weights expanded to f32 in registers). */
void moe_plan_set_compute(struct moe_plan *p, int bf16_dot, int int8_dot);
/* 1 when the plan has op. */
int moe_plan_has(const struct moe_plan *p, enum moe_op op);

/* modes.c: the mode table (rows of moe_modes.def). Whether target t generates
 * d (1), else 0 with every reason in diag; and the op list of d's mode. */
int moe_mode_supported(const struct moe_desc *d, enum moe_target t, struct moe_diag *diag);
void moe_mode_ops(const struct moe_desc *d, struct moe_plan *p);

/* Limits of the CPU's PEER kernels (their per-token scratch is sized by them). */
#define MOE_PK_MAX_TOP_K 64
#define MOE_PK_MAX_SUB_KEYS 8192
#define MOE_PK_MAX_QUERY 4096
#define MOE_PK_MAX_HIDDEN 16384

/* cpu_llvm.c ------------------------------------------------------------ */

#define MOE_EMITS(X) X(SO, "so") X(OBJ, "obj") X(LL, "ll") X(ASM, "asm") X(HEADER, "header")
#define MOE_ENUM_X_MOE_EMIT_(v, s) MOE_EMIT_##v,
MOE_DEFINE_ENUM(moe_emit, MOE_EMIT_, MOE_EMITS);
extern const char *const moe_emit_names[MOE_EMIT_COUNT];

struct moe_cpu_target {
	const char *triple;   /* NULL: the host triple */
	const char *cpu;      /* NULL or "native": the host CPU; else an LLVM CPU name */
	const char *features; /* NULL: the CPU's defaults (host features for native) */
	int opt_level;        /* 0..3; the pipeline is default<O3> unless lower */
	/* AArch64 SVE vector length in bits that the code is generated for:
	 * 0: the CPU's known length (sve_bits in cpu_llvm.c), none if it has no SVE or
	 * the length is unknown; -1: none (NEON only); else 128..2048, a
	 * power of two, for a target with SVE */
	int sve_bits;
};

/* Generate the CPU module of plan p and write it as LL (pre-optimization
 * IR), ASM or OBJ into a malloc'ed buffer (*out, *len; caller frees).
 * Returns 0, or -1 with a message in err. */
int moe_cpu_generate(const struct moe_plan *p, const struct moe_cpu_target *t, enum moe_emit kind,
		     char **out, size_t *len, char *err, size_t cap);

/* Backends -------------------------------------------------------------- */

/* What a backend needs beyond the plan: the CPU's target machine, the CUDA
 * archs. */
struct moe_backend_opts {
	const struct moe_cpu_target *cpu;
	const char *const *archs; /* CUDA: sm_XX, the first also as PTX */
	int n_archs;
};

/* A backend, one per target: the plan in, its part of model.so out. The
 * link stage walks the requested targets through this table and knows
 * nothing else of them. Inside generate, each backend emits per op of the
 * plan (its emitter table keyed by enum moe_op). */
struct moe_backend {
	enum moe_target target;
	const char *name;
	/* Whether the backend generates d (1), else 0 with each reason in diag:
	 * the mode table's answer for this target (compiler/plan/modes.c). */
	int (*supports)(const struct moe_desc *d, struct moe_diag *diag);
	/* The link input of plan p (an object file, or C the linker compiles),
	 * malloc'ed into *out / *len. 0, or -1 with a message in err. */
	int (*generate)(const struct moe_plan *p, const struct moe_backend_opts *o, char **out,
			size_t *len, char *err, size_t cap);
	/* The link input's file name in the work directory ("model.o"). */
	const char *link_name;
};

extern const struct moe_backend moe_backend_cpu;  /* compiler/cpu/cpu_backend.c */
extern const struct moe_backend moe_backend_cuda; /* compiler/cuda/cuda_backend.c */
extern const struct moe_backend *const moe_backends[MOE_TARGET_COUNT];

/* link.c ---------------------------------------------------------------- */

/* The spec hash: hex XXH3-128 of the model dump of d (33 bytes with the NUL). */
void moe_desc_hash(const struct moe_desc *d, char hex[33]);
/* The runtime archive model.so links against, found next to the running
 * moegen or in the build dir; NULL when missing. */
const char *moe_runtime_archive(void);
/* The runtime a normalized LLVM triple links with ("x86_64-linux-gnu",
 * "aarch64-linux-gnu"), or NULL when moegen has none for it (not Linux, soft
 * float, another libc). */
const char *moe_runtime_triple(const char *triple);
/* The runtime archive of runtime rt (NULL: the host's): next to moegen, in
 * the install (LIBDIR/moegen[/rt]) or the build directory ([rt/]); NULL when
 * missing. */
const char *moe_runtime_archive_for(const char *rt);
/* A file moegen ships beside itself: REL next to the moegen executable, in
 * the installed LIBDIR/moegen/, or in the build tree. 0 with its path in out,
 * or -1. */
int moe_find_beside(const char *rel, char *out, size_t cap);
/* Compile d for the CPU into `out` as kind (so, obj, ll, asm, header). The
 * file is written under a temporary name and renamed, so a failure never
 * leaves a broken output. Returns 0, or MOE_EXIT_IO / MOE_EXIT_BACKEND with a
 * message in err (no "moegen: error:" prefix). */
int moe_compile_cpu(const struct moe_desc *d, const struct moe_cpu_target *t, enum moe_emit kind,
		    const char *out, char *err, size_t cap);
/* What a compile asks for beyond the spec. */
#define MOE_PREFIX_MAX 32
struct moe_compile_opts {
	const struct moe_cpu_target *cpu;
	int want_cpu;             /* the CPU kernels */
	const char *const *archs; /* CUDA images for archs[0, n_archs) when n_archs > 0 */
	int n_archs;
	const char *prefix; /* NULL, or the exported functions' prefix (a C identifier) */
};
/* 1 when p can prefix the exported names: [A-Za-z_][A-Za-z0-9_]*, at most
 * MOE_PREFIX_MAX bytes. */
int moe_prefix_valid(const char *p);
/* model.so (kind so) or the CPU outputs of moe_compile_cpu, with the targets
 * o asks for: the device is chosen at moe_create. model.so gets the output's
 * file name as its SONAME and exports moe.h's functions (with o->prefix
 * prepended) in the version node MOEGEN_ABI_<MOE_ABI_VERSION>. */
int moe_compile_model(const struct moe_desc *d, const struct moe_compile_opts *o,
		      enum moe_emit kind, const char *out, char *err, size_t cap);
/* Write the C header for AOT users of d; with a prefix, the functions are
 * declared prefixed and the constants are named PREFIX (upper case) +
 * MOE_MODEL_..., so several models' headers go into one program. */
int moe_write_header(const struct moe_desc *d, const char *prefix, FILE *f);

/* cmd_compile.c, cmd_run.c ----------------------------------------------- */

/* moegen SPEC [-o OUT] [--set K=V]... [--target cpu] [--cpu C] [--triple T]
 * [--emit so|obj|ll|asm|header]. argv[0] is "compile". */
int moe_cmd_compile(int argc, char **argv);
/* moegen run MODEL.so [--weights FILE... | --random SEED] [--tokens N]
 * [--threads N] [--layer L] [--seed S] [--check]. argv[0] is "run". */
int moe_cmd_run(int argc, char **argv);

#endif
