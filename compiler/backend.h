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

#define MOE_OPS(X)                                                                                 \
	X(ROUTE, "route")             /* logits, score, bias, groups, top-k, normalize */          \
	X(GROUP, "group")             /* counts, offsets, row map, capacity (runtime) */           \
	X(EXPERT_UP, "expert_up")     /* gathered rows x packed [gate|up], activation */           \
	X(EXPERT_DOWN, "expert_down") /* x down, accumulated into the output */                    \
	X(SHARED_UP, "shared_up")                                                                  \
	X(SHARED_DOWN, "shared_down")                                                              \
	X(PASSTHROUGH, "passthrough") /* capacity overflow: y += w * x */

#define MOE_ENUM_X_MOE_OP_(v, s) MOE_OP_##v,
MOE_DEFINE_ENUM(moe_op, MOE_OP_, MOE_OPS);
extern const char *const moe_op_names[MOE_OP_COUNT];

#define MOE_TARGETS(X) X(CPU, "cpu") X(CUDA, "cuda")
#define MOE_ENUM_X_MOE_TARGET_(v, s) MOE_TARGET_##v,
MOE_DEFINE_ENUM(moe_target, MOE_TARGET_, MOE_TARGETS);
extern const char *const moe_target_names[MOE_TARGET_COUNT];

/* Workspace buffers, sized per forward call from T (tokens). */
#define MOE_BUFS(X)                                                                                \
	X(LOGITS, "logits")     /* [T, E] f32 */                                                   \
	X(IDS, "ids")           /* [T, W] i32 */                                                   \
	X(WEIGHTS, "weights")   /* [T, W] f32 */                                                   \
	X(SGATE, "sgate")       /* [T] f32 shared-expert gate */                                   \
	X(ROWS, "rows")         /* [T * W] i32 token of each grouped row */                        \
	X(ROW_W, "row_w")       /* [T * W] f32 routing weight of each grouped row */               \
	X(H, "h")               /* [T * W, ld_h] f32 expert activations */                         \
	X(H_SHARED, "h_shared") /* [T, ld_h shared] f32 */

#define MOE_ENUM_X_MOE_BUF_(v, s) MOE_BUF_##v,
MOE_DEFINE_ENUM(moe_buf, MOE_BUF_, MOE_BUFS);

struct moe_plan_op {
	enum moe_op op;
	uint32_t in, out; /* buffer ids (MOE_BUF_COUNT: the layer input/output) */
};

/* The kernel plan: ops in order, buffers per token, the FFN geometries. */
struct moe_plan {
	const struct moe_desc *desc; /* borrowed */
	enum moe_target target;
	uint32_t n_ops;
	struct moe_plan_op ops[8];
	uint32_t route_width;
	struct moe_geom routed, shared;        /* shared.width == 0: none */
	uint64_t buf_per_token[MOE_BUF_COUNT]; /* bytes per token of each workspace buffer */
};

/* Build the plan of d for target t. Modes and features the target does not
 * generate are refused with an error in diag (never run through the
 * reference). Returns 0 or -1. */
int moe_plan_build(const struct moe_desc *d, enum moe_target t, struct moe_plan *p,
		   struct moe_diag *diag);
void moe_plan_dump(const struct moe_plan *p, FILE *out);

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
};

/* Generate the CPU module of plan p and write it as LL (pre-optimization
 * IR), ASM or OBJ into a malloc'ed buffer (*out, *len; caller frees).
 * Returns 0, or -1 with a message in err. */
int moe_cpu_generate(const struct moe_plan *p, const struct moe_cpu_target *t, enum moe_emit kind,
		     char **out, size_t *len, char *err, size_t cap);

/* cpu_llvm_research.c: the research routers, emitted into the module
 * cpu_llvm.c builds. fns[0]: moe_route_x (NULL when the description uses the
 * plain router), fns[1]: moe_jitter (NULL without jitter noise); they fill
 * the route_x and jitter entries of the moe_gen table. */
#define MOE_RESEARCH_FNS 2
struct LLVMOpaqueContext;
struct LLVMOpaqueModule;
struct LLVMOpaqueBuilder;
struct LLVMOpaqueValue;
int moe_cpu_research_route(const struct moe_desc *d);
/* plan.c's check of the research routers for the CPU: 1 when d uses one and
 * it is generated, 0 when d uses none, -1 (errors in diag) when refused. */
int moe_plan_research(const struct moe_desc *d, struct moe_diag *diag);
void moe_cpu_research_build(struct LLVMOpaqueContext *ctx, struct LLVMOpaqueModule *mod,
			    struct LLVMOpaqueBuilder *b, const struct moe_plan *p,
			    struct LLVMOpaqueValue *fns[MOE_RESEARCH_FNS]);

/* cpu_llvm_ecsoft.c: expert choice. *route_x: its score router (moe_route_x,
 * the route_x entry); fns[0]: moe_ec_select (the ec_select entry). NULL when
 * the description does not use it. moe_plan_ecsoft: plan.c's check, as
 * moe_plan_research. */
#define MOE_ECSOFT_FNS 1
int moe_cpu_ecsoft_route(const struct moe_desc *d);
int moe_plan_ecsoft(const struct moe_desc *d, struct moe_diag *diag);
void moe_cpu_ecsoft_build(struct LLVMOpaqueContext *ctx, struct LLVMOpaqueModule *mod,
			  struct LLVMOpaqueBuilder *b, const struct moe_plan *p,
			  struct LLVMOpaqueValue **route_x,
			  struct LLVMOpaqueValue *fns[MOE_ECSOFT_FNS]);

/* cpu_llvm_peer.c: PEER. fns[0]: moe_pk_route, fns[1]: moe_pk_experts (the
 * pk_route and pk_experts entries; NULL unless mode product_key).
 * moe_plan_peer: plan.c's check, as moe_plan_research. */
#define MOE_PEER_FNS 2
int moe_plan_peer(const struct moe_desc *d, struct moe_diag *diag);
void moe_cpu_peer_build(struct LLVMOpaqueContext *ctx, struct LLVMOpaqueModule *mod,
			struct LLVMOpaqueBuilder *b, const struct moe_plan *p,
			struct LLVMOpaqueValue *fns[MOE_PEER_FNS]);

/* cpu_llvm_soft.c: Soft MoE. fns: moe_soft_norm, _logits, _combine,
 * _dispatch, _slot_in, _out (the soft_* entries; NULL unless mode soft).
 * moe_plan_soft: plan.c's check, as moe_plan_research. */
#define MOE_SOFT_FNS 6
int moe_plan_soft(const struct moe_desc *d, struct moe_diag *diag);
void moe_cpu_soft_build(struct LLVMOpaqueContext *ctx, struct LLVMOpaqueModule *mod,
			struct LLVMOpaqueBuilder *b, const struct moe_plan *p,
			struct LLVMOpaqueValue *fns[MOE_SOFT_FNS]);

/* link.c ---------------------------------------------------------------- */

/* The spec hash: hex XXH3-128 of the model dump of d (33 bytes with the NUL). */
void moe_desc_hash(const struct moe_desc *d, char hex[33]);
/* The runtime archive model.so links against, found next to the running
 * moegen or in the build dir; NULL when missing. */
const char *moe_runtime_archive(void);
/* Compile d for the CPU into `out` as kind (so, obj, ll, asm, header). The
 * file is written under a temporary name and renamed, so a failure never
 * leaves a broken output. Returns 0, or MOE_EXIT_IO / MOE_EXIT_BACKEND with a
 * message in err (no "moegen: error:" prefix). */
int moe_compile_cpu(const struct moe_desc *d, const struct moe_cpu_target *t, enum moe_emit kind,
		    const char *out, char *err, size_t cap);
/* model.so (kind so) or the CPU outputs of moe_compile_cpu, with the CPU
 * kernels when cpu is set and the CUDA images for archs[0, n_archs) (cuda.h)
 * when n_archs > 0: the device is chosen at moe_create. */
int moe_compile_model(const struct moe_desc *d, const struct moe_cpu_target *t, int cpu,
		      const char *const *archs, int n_archs, enum moe_emit kind, const char *out,
		      char *err, size_t cap);
/* Write the C header for AOT users of d. */
int moe_write_header(const struct moe_desc *d, FILE *f);

/* cmd_compile.c, cmd_run.c ----------------------------------------------- */

/* moegen SPEC [-o OUT] [--set K=V]... [--target cpu] [--cpu C] [--triple T]
 * [--emit so|obj|ll|asm|header]. argv[0] is "compile". */
int moe_cmd_compile(int argc, char **argv);
/* moegen run MODEL.so [--weights FILE... | --random SEED] [--tokens N]
 * [--threads N] [--layer L] [--seed S] [--check]. argv[0] is "run". */
int moe_cmd_run(int argc, char **argv);

#endif
