/* cpu_llvm_util.h: the CPU backend's one IR builder. struct moe_ll carries the
 * module, the builder, the common types, the plan and the function being
 * built; every file of compiler/cpu emits through these helpers, so the same
 * construct always becomes the same IR. The router pieces at the end (panel
 * dot products, scores, top-k, normalization) are the reference's arithmetic
 * (runtime/ref/ref.c) and are shared by every router mode. */
#ifndef MOE_CPU_LLVM_UTIL_H
#define MOE_CPU_LLVM_UTIL_H

#include <llvm-c/Core.h>

#include "backend.h"

#include <stdint.h>

struct moe_ll {
	LLVMContextRef ctx;
	LLVMModuleRef mod;
	LLVMBuilderRef b;
	LLVMTypeRef t_void, t_i1, t_i8, t_i16, t_i32, t_i64, t_f32, t_f64, t_half, t_ptr;
	LLVMTypeRef t_v8f, t_v8d, t_v8i16, t_v8i32, t_v8h, t_v16f; /* 8 = MOE_VW lanes */
	LLVMValueRef fn;                                           /* function being built */
	LLVMBasicBlockRef entry; /* its allocas; branches to the first real block */
	const struct moe_plan *p;
	const struct moe_desc *d;
	int wide; /* AVX-512: expert tiles keep one 16-lane accumulator per row */
	/* int8 compute's dot product: 1 vpdpbusd (VNNI), 2 AVX2's vpmaddubsw
	 * and vpmaddwd (exact for the codes the kernels give it) */
	int dot8;
	/* AArch64 SVE of a known length: vscale = bits / 128, given to every
	 * function as vscale_range(vscale, vscale); 0: none */
	unsigned vscale;
};

/* for (iv = from; iv < to; iv += step): blocks NAME.head, NAME.body, NAME.end
 * in that order */
struct moe_ll_loop {
	LLVMBasicBlockRef head, body, exit;
	LLVMValueRef iv;
	int64_t step;
};

void moe_ll_init(struct moe_ll *g, LLVMContextRef ctx, LLVMModuleRef mod, LLVMBuilderRef b,
		 const struct moe_plan *p, int wide);

/* Constants; the v forms are <8 x T> splats. */
LLVMValueRef moe_ll_i64c(struct moe_ll *g, int64_t v);
LLVMValueRef moe_ll_i32c(struct moe_ll *g, int32_t v);
LLVMValueRef moe_ll_f32c(struct moe_ll *g, double v);
LLVMValueRef moe_ll_f64c(struct moe_ll *g, double v);
LLVMValueRef moe_ll_vf32c(struct moe_ll *g, double v);
LLVMValueRef moe_ll_vi32c(struct moe_ll *g, int32_t v);

/* Memory: &base[i] of element type t; loads and stores at the scalar
 * element's natural alignment; allocas in the entry block. */
LLVMValueRef moe_ll_at(struct moe_ll *g, LLVMTypeRef t, LLVMValueRef base, LLVMValueRef i);
LLVMValueRef moe_ll_ld(struct moe_ll *g, LLVMTypeRef t, LLVMValueRef p);
void moe_ll_st(struct moe_ll *g, LLVMValueRef v, LLVMValueRef p);
LLVMValueRef moe_ll_ldf(struct moe_ll *g, LLVMValueRef p, LLVMValueRef i);
void moe_ll_stf(struct moe_ll *g, LLVMValueRef v, LLVMValueRef p, LLVMValueRef i);
LLVMValueRef moe_ll_ldi(struct moe_ll *g, LLVMValueRef p, LLVMValueRef i); /* i64 */
LLVMValueRef moe_ll_alloca(struct moe_ll *g, LLVMTypeRef t, uint64_t n, const char *name);

/* Control flow and functions. */
LLVMBasicBlockRef moe_ll_bb(struct moe_ll *g, const char *name);
void moe_ll_loop_open(struct moe_ll *g, struct moe_ll_loop *l, LLVMValueRef from, LLVMValueRef to,
		      int64_t step, const char *name);
void moe_ll_loop_close(struct moe_ll *g, struct moe_ll_loop *l);
/* if (c) { ... }: blocks NAME.then, NAME.end; returns the join block */
LLVMBasicBlockRef moe_ll_when(struct moe_ll *g, LLVMValueRef c, const char *name);
void moe_ll_when_end(struct moe_ll *g, LLVMBasicBlockRef end);
void moe_ll_fn_begin(struct moe_ll *g, const char *name, LLVMTypeRef *params,
		     const char *const *pnames, unsigned n);
void moe_ll_fn_end(struct moe_ll *g);
LLVMValueRef moe_ll_prm(struct moe_ll *g, unsigned i);
void moe_ll_noalias(struct moe_ll *g, unsigned i); /* on parameter i */

/* Arithmetic. */
LLVMValueRef moe_ll_intr(struct moe_ll *g, const char *name, LLVMTypeRef *tys, size_t n_tys,
			 LLVMValueRef *args, unsigned n_args);
LLVMValueRef moe_ll_intr1(struct moe_ll *g, const char *name, LLVMValueRef a);
LLVMValueRef moe_ll_fma(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b, LLVMValueRef c);
/* A read prefetch of the line at p: locality 2 toward L2, 3 toward L1. */
void moe_ll_prefetch(struct moe_ll *g, LLVMValueRef p, int locality);
/* Rows per tile and 8-lane blocks per pass of moe_ll_rows_panels. */
#define MOE_LL_ROWS 8
#define MOE_LL_BLOCKS 4
/* out[r][8 blk + lane] = sum over h ascending of x_r[h] * w[blk][h][lane]
 * (fused: an FMA per term, the reference's fmaf chain; else each product
 * rounded, then added, the router's order), plus bias[8 blk + lane] when
 * bias is not NULL, for the n rows x_r = x0 + r xs (out rows out + r os) and
 * the blocks [b0, b1) of the packed [blocks][K][8] matrix w: MOE_LL_BLOCKS
 * blocks per pass as 16-lane vectors (then one at a time), the rows in tiles
 * of MOE_LL_ROWS (then one at a time, MOE_LL_BLOCKS blocks per pass); the
 * tiles have half of each on 256-bit targets, whose 16 registers hold 8
 * accumulators of 8 lanes. So each pass's panel vectors are loaded once for
 * all the rows of a tile. Whatever tile computes a value, its arithmetic is
 * the same. */
void moe_ll_rows_panels(struct moe_ll *g, LLVMValueRef x0, int64_t xs, LLVMValueRef n,
			LLVMValueRef w, LLVMValueRef b0, LLVMValueRef b1, int64_t K,
			LLVMValueRef bias, LLVMValueRef out, int64_t os, int fused);

/* The routers' token loop in groups: the logits of a group's tokens come
 * from one moe_ll_rows_panels pass (each router panel vector loaded once per
 * group), then each token of the group routes on its own row:
 *   moe_ll_tgroup_open(g, &tg, t0, t1, rows);
 *   moe_ll_tgroup_logits(g, &tg, x, router, E, buf);   (any number of matrices)
 *   moe_ll_tgroup_rows(g, &tg);   ... tg.t, moe_ll_tgroup_row(g, &tg, buf, E) ...
 *   moe_ll_tgroup_close(g, &tg);
 * Buffers hold rows x moe_router_blocks(n) * MOE_RB floats. */
struct moe_ll_tgroup {
	struct moe_ll_loop grp, row;
	LLVMValueRef n; /* tokens in the group */
	LLVMValueRef t; /* the token, inside the rows loop */
	int64_t rows;
};
/* Tokens per group for logit rows of row_floats floats in all (at most
 * MOE_LL_ROWS, and 64 KiB of rows). */
int64_t moe_ll_tgroup_size(int64_t row_floats);
void moe_ll_tgroup_open(struct moe_ll *g, struct moe_ll_tgroup *tg, LLVMValueRef t0,
			LLVMValueRef t1, int64_t rows);
/* buf[r][j] = w_j . x_(group start + r), j < n (router order: unfused, ascending h). */
void moe_ll_tgroup_logits(struct moe_ll *g, const struct moe_ll_tgroup *tg, LLVMValueRef x,
			  LLVMValueRef w, uint32_t n, LLVMValueRef buf);
void moe_ll_tgroup_rows(struct moe_ll *g, struct moe_ll_tgroup *tg);
LLVMValueRef moe_ll_tgroup_row(struct moe_ll *g, const struct moe_ll_tgroup *tg, LLVMValueRef buf,
			       uint32_t n);
void moe_ll_tgroup_close(struct moe_ll *g, struct moe_ll_tgroup *tg);
LLVMValueRef moe_ll_libm(struct moe_ll *g, const char *fname, LLVMValueRef a);  /* double */
LLVMValueRef moe_ll_libmf(struct moe_ll *g, const char *fname, LLVMValueRef a); /* float */
LLVMValueRef moe_ll_pow(struct moe_ll *g, LLVMValueRef a, double e);
LLVMValueRef moe_ll_sel_gt(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b, LLVMValueRef x,
			   LLVMValueRef y);
LLVMValueRef moe_ll_fmax(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b);
LLVMValueRef moe_ll_fmin(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b);
LLVMValueRef moe_ll_to_f32(struct moe_ll *g, LLVMValueRef v);
LLVMValueRef moe_ll_to_f64(struct moe_ll *g, LLVMValueRef v);
LLVMValueRef moe_ll_splat(struct moe_ll *g, LLVMValueRef s, LLVMTypeRef vt);

/* Router pieces ------------------------------------------------------------ */

/* score_vec's softmax of the n values l[loff + i * lstride] into
 * s[soff + i * sstride]: the maximum, exp in double of the f32 difference
 * rounded to f32, the f32 sum in index order, the division. */
void moe_ll_softmax(struct moe_ll *g, LLVMValueRef l, LLVMValueRef loff, int64_t lstride,
		    LLVMValueRef s, LLVMValueRef soff, int64_t sstride, LLVMValueRef n);
/* s[off + i] = score sc of l[off + i] for i in [0, n) (score_vec). */
void moe_ll_scores(struct moe_ll *g, enum moe_score sc, LLVMValueRef l, LLVMValueRef s,
		   LLVMValueRef off, uint32_t n);
/* p[off..off+n) = the statistics' router probability of scores s (prob_vec):
 * the softmax itself, or the scores normalized to sum 1; times mul (NULL: 1). */
void moe_ll_probs(struct moe_ll *g, enum moe_score sc, LLVMValueRef s, LLVMValueRef p,
		  LLVMValueRef off, uint32_t n, LLVMValueRef mul);
/* The reference's topk: out[0..m) (i64) = the positions i of the k best of the
 * n values v[off + i * stride] in rank order, m = min(k, n) returned. Ranks:
 * NaN last, then the larger value, then the smaller key (keys[i], i64; NULL:
 * key = position); insertion into the sorted prefix. */
LLVMValueRef moe_ll_topk(struct moe_ll *g, LLVMValueRef v, LLVMValueRef off, int64_t stride,
			 LLVMValueRef keys, LLVMValueRef n, LLVMValueRef k, LLVMValueRef out);
/* moe_ll_topk for stride 1, no offset and a constant k <= 64, branch-free
 * but for one test per value: the top kept sorted in vectors. */
LLVMValueRef moe_ll_topk_vec(struct moe_ll *g, LLVMValueRef v, LLVMValueRef keys, LLVMValueRef n,
			     int64_t k, LLVMValueRef out);
/* The reference's normalize of w[0..n): w /= max(S + eps, min) with S the sum
 * (f32) or the p-norm (double, the C library's pow); the weights stay as they
 * are when that is not positive. No scale. */
void moe_ll_normalize(struct moe_ll *g, LLVMValueRef w, uint32_t n);

/* The router emitters beside cpu_llvm.c, each emitting into g's module and
 * filling the kernels it generates (k[MOE_KERNEL_*]):
 * cpu_llvm_research.c: moe_route_x of sparsemixer, hierarchical and learned
 * noise, and the input jitter moe_jitter;
 * cpu_llvm_ecsoft.c: expert choice's score router and moe_ec_select;
 * cpu_llvm_peer.c: PEER's moe_pk_route and moe_pk_experts;
 * cpu_llvm_soft.c: Soft MoE's six kernels. */
void moe_cpu_research_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT]);
void moe_cpu_jitter_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT]);
void moe_cpu_ecsoft_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT]);
void moe_cpu_peer_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT]);
void moe_cpu_soft_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT]);

#endif
