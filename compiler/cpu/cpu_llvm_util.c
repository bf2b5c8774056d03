/* cpu_llvm_util.c: the CPU backend's IR builder (see cpu_llvm_util.h).
 * Alignments, block order and attributes are part of the generated IR that
 * generated/ pins, so keep them stable. */
#include "cpu_llvm_util.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

void moe_ll_init(struct moe_ll *g, LLVMContextRef ctx, LLVMModuleRef mod, LLVMBuilderRef b,
		 const struct moe_plan *p, int wide)
{
	memset(g, 0, sizeof *g);
	g->ctx = ctx;
	g->mod = mod;
	g->b = b;
	g->p = p;
	g->d = p->desc;
	g->wide = wide;
	g->t_void = LLVMVoidTypeInContext(ctx);
	g->t_i1 = LLVMInt1TypeInContext(ctx);
	g->t_i8 = LLVMInt8TypeInContext(ctx);
	g->t_i16 = LLVMInt16TypeInContext(ctx);
	g->t_i32 = LLVMInt32TypeInContext(ctx);
	g->t_i64 = LLVMInt64TypeInContext(ctx);
	g->t_f32 = LLVMFloatTypeInContext(ctx);
	g->t_f64 = LLVMDoubleTypeInContext(ctx);
	g->t_half = LLVMHalfTypeInContext(ctx);
	g->t_ptr = LLVMPointerTypeInContext(ctx, 0);
	g->t_v8f = LLVMVectorType(g->t_f32, MOE_VW);
	g->t_v8d = LLVMVectorType(g->t_f64, MOE_VW);
	g->t_v8i16 = LLVMVectorType(g->t_i16, MOE_VW);
	g->t_v8i32 = LLVMVectorType(g->t_i32, MOE_VW);
	g->t_v8h = LLVMVectorType(g->t_half, MOE_VW);
	g->t_v16f = LLVMVectorType(g->t_f32, 2 * MOE_VW);
}

/* Constants -------------------------------------------------------------- */

LLVMValueRef moe_ll_i64c(struct moe_ll *g, int64_t v)
{
	return LLVMConstInt(g->t_i64, (unsigned long long)v, 1);
}

LLVMValueRef moe_ll_i32c(struct moe_ll *g, int32_t v)
{
	return LLVMConstInt(g->t_i32, (unsigned long long)(int64_t)v, 1);
}

LLVMValueRef moe_ll_f32c(struct moe_ll *g, double v)
{
	return LLVMConstReal(g->t_f32, v);
}

LLVMValueRef moe_ll_f64c(struct moe_ll *g, double v)
{
	return LLVMConstReal(g->t_f64, v);
}

LLVMValueRef moe_ll_vf32c(struct moe_ll *g, double v)
{
	LLVMValueRef e[MOE_VW];
	for (int i = 0; i < MOE_VW; i++)
		e[i] = moe_ll_f32c(g, v);
	return LLVMConstVector(e, MOE_VW);
}

LLVMValueRef moe_ll_vi32c(struct moe_ll *g, int32_t v)
{
	LLVMValueRef e[MOE_VW];
	for (int i = 0; i < MOE_VW; i++)
		e[i] = moe_ll_i32c(g, v);
	return LLVMConstVector(e, MOE_VW);
}

/* Memory ----------------------------------------------------------------- */

LLVMValueRef moe_ll_at(struct moe_ll *g, LLVMTypeRef t, LLVMValueRef base, LLVMValueRef i)
{
	return LLVMBuildInBoundsGEP2(g->b, t, base, &i, 1, "");
}

/* the natural alignment of t's scalar (a vector's element) */
static unsigned align_of(struct moe_ll *g, LLVMTypeRef t)
{
	if (LLVMGetTypeKind(t) == LLVMVectorTypeKind)
		t = LLVMGetElementType(t);
	return t == g->t_i8                                      ? 1
	       : t == g->t_i16 || t == g->t_half                 ? 2
	       : t == g->t_i64 || t == g->t_f64 || t == g->t_ptr ? 8
								 : 4;
}

LLVMValueRef moe_ll_ld(struct moe_ll *g, LLVMTypeRef t, LLVMValueRef p)
{
	LLVMValueRef v = LLVMBuildLoad2(g->b, t, p, "");
	LLVMSetAlignment(v, align_of(g, t));
	return v;
}

void moe_ll_st(struct moe_ll *g, LLVMValueRef v, LLVMValueRef p)
{
	LLVMSetAlignment(LLVMBuildStore(g->b, v, p), align_of(g, LLVMTypeOf(v)));
}

/* f32 element i of array p */
LLVMValueRef moe_ll_ldf(struct moe_ll *g, LLVMValueRef p, LLVMValueRef i)
{
	return moe_ll_ld(g, g->t_f32, moe_ll_at(g, g->t_f32, p, i));
}

void moe_ll_stf(struct moe_ll *g, LLVMValueRef v, LLVMValueRef p, LLVMValueRef i)
{
	moe_ll_st(g, v, moe_ll_at(g, g->t_f32, p, i));
}

LLVMValueRef moe_ll_ldi(struct moe_ll *g, LLVMValueRef p, LLVMValueRef i)
{
	return moe_ll_ld(g, g->t_i64, moe_ll_at(g, g->t_i64, p, i));
}

/* n elements of t (a scalar slot when n == 1) in the entry block, so the
 * allocas stay static whatever loop builds them (mem2reg promotes them). */
LLVMValueRef moe_ll_alloca(struct moe_ll *g, LLVMTypeRef t, uint64_t n, const char *name)
{
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMPositionBuilderAtEnd(g->b, g->entry);
	LLVMValueRef a = n == 1 ? LLVMBuildAlloca(g->b, t, name)
				: LLVMBuildAlloca(g->b, LLVMArrayType2(t, n), name);
	LLVMSetAlignment(a, 32);
	LLVMPositionBuilderAtEnd(g->b, cur);
	return a;
}

/* Control flow and functions ----------------------------------------------- */

LLVMBasicBlockRef moe_ll_bb(struct moe_ll *g, const char *name)
{
	return LLVMAppendBasicBlockInContext(g->ctx, g->fn, name);
}

static LLVMBasicBlockRef bb2(struct moe_ll *g, const char *name, const char *suffix)
{
	char nm[64];
	snprintf(nm, sizeof nm, "%s.%s", name, suffix);
	return moe_ll_bb(g, nm);
}

void moe_ll_loop_open(struct moe_ll *g, struct moe_ll_loop *l, LLVMValueRef from, LLVMValueRef to,
		      int64_t step, const char *name)
{
	LLVMBasicBlockRef pre = LLVMGetInsertBlock(g->b);
	l->head = bb2(g, name, "head");
	l->body = bb2(g, name, "body");
	l->exit = bb2(g, name, "end");
	l->step = step;
	LLVMBuildBr(g->b, l->head);
	LLVMPositionBuilderAtEnd(g->b, l->head);
	l->iv = LLVMBuildPhi(g->b, g->t_i64, name);
	LLVMAddIncoming(l->iv, &from, &pre, 1);
	LLVMBuildCondBr(g->b, LLVMBuildICmp(g->b, LLVMIntSLT, l->iv, to, ""), l->body, l->exit);
	LLVMPositionBuilderAtEnd(g->b, l->body);
}

/* The exit block moves after the latch so blocks print in source order. */
void moe_ll_loop_close(struct moe_ll *g, struct moe_ll_loop *l)
{
	LLVMBasicBlockRef latch = LLVMGetInsertBlock(g->b);
	LLVMValueRef next = LLVMBuildNSWAdd(g->b, l->iv, moe_ll_i64c(g, l->step), "");
	LLVMBuildBr(g->b, l->head);
	LLVMAddIncoming(l->iv, &next, &latch, 1);
	LLVMMoveBasicBlockAfter(l->exit, latch);
	LLVMPositionBuilderAtEnd(g->b, l->exit);
}

LLVMBasicBlockRef moe_ll_when(struct moe_ll *g, LLVMValueRef c, const char *name)
{
	LLVMBasicBlockRef then = bb2(g, name, "then"), end = bb2(g, name, "end");
	LLVMBuildCondBr(g->b, c, then, end);
	LLVMPositionBuilderAtEnd(g->b, then);
	return end;
}

void moe_ll_when_end(struct moe_ll *g, LLVMBasicBlockRef end)
{
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMBuildBr(g->b, end);
	LLVMMoveBasicBlockAfter(end, cur);
	LLVMPositionBuilderAtEnd(g->b, end);
}

static void attr(struct moe_ll *g, LLVMValueRef f, unsigned idx, const char *name)
{
	unsigned k = LLVMGetEnumAttributeKindForName(name, strlen(name));
	LLVMAddAttributeAtIndex(f, idx, LLVMCreateEnumAttribute(g->ctx, k, 0));
}

/* A hidden nounwind void function (with the SVE length when known); the
 * builder is left in its first block after "entry", which moe_ll_fn_end
 * links to. */
void moe_ll_fn_begin(struct moe_ll *g, const char *name, LLVMTypeRef *params,
		     const char *const *pnames, unsigned n)
{
	LLVMTypeRef ft = LLVMFunctionType(g->t_void, params, n, 0);
	g->fn = LLVMAddFunction(g->mod, name, ft);
	LLVMSetVisibility(g->fn, LLVMHiddenVisibility);
	attr(g, g->fn, LLVMAttributeFunctionIndex, "nounwind");
	if (g->vscale) {
		/* the attribute's value packs (min << 32) | max */
		unsigned k = LLVMGetEnumAttributeKindForName("vscale_range", 12);
		uint64_t v = (uint64_t)g->vscale << 32 | g->vscale;
		LLVMAddAttributeAtIndex(g->fn, LLVMAttributeFunctionIndex,
					LLVMCreateEnumAttribute(g->ctx, k, v));
	}
	for (unsigned i = 0; i < n; i++)
		LLVMSetValueName2(LLVMGetParam(g->fn, i), pnames[i], strlen(pnames[i]));
	g->entry = moe_ll_bb(g, "entry");
	LLVMPositionBuilderAtEnd(g->b, moe_ll_bb(g, "start"));
}

void moe_ll_fn_end(struct moe_ll *g)
{
	LLVMBuildRetVoid(g->b);
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMPositionBuilderAtEnd(g->b, g->entry);
	LLVMBuildBr(g->b, LLVMGetNextBasicBlock(g->entry));
	LLVMPositionBuilderAtEnd(g->b, cur);
}

LLVMValueRef moe_ll_prm(struct moe_ll *g, unsigned i)
{
	return LLVMGetParam(g->fn, i);
}

void moe_ll_noalias(struct moe_ll *g, unsigned i)
{
	attr(g, g->fn, i + 1, "noalias");
}

/* Arithmetic --------------------------------------------------------------- */

LLVMValueRef moe_ll_intr(struct moe_ll *g, const char *name, LLVMTypeRef *tys, size_t n_tys,
			 LLVMValueRef *args, unsigned n_args)
{
	unsigned id = LLVMLookupIntrinsicID(name, strlen(name));
	MOE_ASSERT(id != 0);
	LLVMValueRef f = LLVMGetIntrinsicDeclaration(g->mod, id, tys, n_tys);
	LLVMTypeRef ft = LLVMIntrinsicGetType(g->ctx, id, tys, n_tys);
	return LLVMBuildCall2(g->b, ft, f, args, n_args, "");
}

/* a one-operand intrinsic overloaded on a's type (llvm.fabs, llvm.sqrt, ...) */
LLVMValueRef moe_ll_intr1(struct moe_ll *g, const char *name, LLVMValueRef a)
{
	LLVMTypeRef t = LLVMTypeOf(a);
	return moe_ll_intr(g, name, &t, 1, &a, 1);
}

void moe_ll_prefetch(struct moe_ll *g, LLVMValueRef p, int locality)
{
	LLVMValueRef args[4] = {p, moe_ll_i32c(g, 0), moe_ll_i32c(g, locality), moe_ll_i32c(g, 1)};
	moe_ll_intr(g, "llvm.prefetch", &g->t_ptr, 1, args, 4);
}

LLVMValueRef moe_ll_fma(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b, LLVMValueRef c)
{
	LLVMTypeRef t = LLVMTypeOf(a);
	LLVMValueRef args[3] = {a, b, c};
	return moe_ll_intr(g, "llvm.fma", &t, 1, args, 3);
}

/* A C library function of n arguments of type t returning t, declared
 * nounwind on first use: the reference's formulas call the same. */
static LLVMValueRef libcall(struct moe_ll *g, const char *fname, LLVMTypeRef t, LLVMValueRef *args,
			    unsigned n)
{
	LLVMTypeRef ps[2] = {t, t};
	LLVMTypeRef ft = LLVMFunctionType(t, ps, n, 0);
	LLVMValueRef f = LLVMGetNamedFunction(g->mod, fname);
	if (!f) {
		f = LLVMAddFunction(g->mod, fname, ft);
		attr(g, f, LLVMAttributeFunctionIndex, "nounwind");
	}
	return LLVMBuildCall2(g->b, ft, f, args, n, "");
}

/* double f(double); an f32 argument is widened first. */
LLVMValueRef moe_ll_libm(struct moe_ll *g, const char *fname, LLVMValueRef a)
{
	if (LLVMTypeOf(a) != g->t_f64)
		a = moe_ll_to_f64(g, a);
	return libcall(g, fname, g->t_f64, &a, 1);
}

/* float f(float) */
LLVMValueRef moe_ll_libmf(struct moe_ll *g, const char *fname, LLVMValueRef a)
{
	return libcall(g, fname, g->t_f32, &a, 1);
}

/* pow(a, e) of the C library in double, as the reference's normalize calls it
 * (not llvm.pow, which the optimizer may turn into sqrt). */
LLVMValueRef moe_ll_pow(struct moe_ll *g, LLVMValueRef a, double e)
{
	LLVMValueRef args[2] = {a, moe_ll_f64c(g, e)};
	return libcall(g, "pow", g->t_f64, args, 2);
}

/* a > b ? x : y, false when either is NaN */
LLVMValueRef moe_ll_sel_gt(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b, LLVMValueRef x,
			   LLVMValueRef y)
{
	return LLVMBuildSelect(g->b, LLVMBuildFCmp(g->b, LLVMRealOGT, a, b, ""), x, y, "");
}

/* a > b ? a : b (a NaN b: b) */
LLVMValueRef moe_ll_fmax(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b)
{
	return moe_ll_sel_gt(g, a, b, a, b);
}

/* a < b ? a : b (a NaN b: b) */
LLVMValueRef moe_ll_fmin(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b)
{
	return LLVMBuildSelect(g->b, LLVMBuildFCmp(g->b, LLVMRealOLT, a, b, ""), a, b, "");
}

LLVMValueRef moe_ll_to_f32(struct moe_ll *g, LLVMValueRef v)
{
	return LLVMBuildFPTrunc(g->b, v, g->t_f32, "");
}

LLVMValueRef moe_ll_to_f64(struct moe_ll *g, LLVMValueRef v)
{
	return LLVMBuildFPExt(g->b, v, g->t_f64, "");
}

/* scalar s in every lane of vector type vt */
LLVMValueRef moe_ll_splat(struct moe_ll *g, LLVMValueRef s, LLVMTypeRef vt)
{
	unsigned n = LLVMGetVectorSize(vt);
	LLVMValueRef v = LLVMBuildInsertElement(g->b, LLVMGetPoison(vt), s, moe_ll_i32c(g, 0), "");
	return LLVMBuildShuffleVector(g->b, v, LLVMGetPoison(vt),
				      LLVMConstNull(LLVMVectorType(g->t_i32, n)), "");
}

/* Router pieces ------------------------------------------------------------ */

/* A row tile's prefetches: when on, the line at (k * bytes per k) >> sh
 * past base for each k. */
struct rows_pf {
	LLVMValueRef on, base, sh;
};

/* acc[t * nv + v] = sum over h ascending of x_t[h] * w[h] (fused: one
 * rounding per term; else the product rounded, then the sum) for the nr rows x[] and
 * nb blocks of 8 from block qb of the packed [blocks][K][8] matrix w: the
 * blocks as nb / 2 vectors of 16 lanes (two blocks' rows joined), or one of 8
 * when nb is 1; with pf's prefetches. */
static void rows_tile(struct moe_ll *g, const LLVMValueRef *x, int nr, LLVMValueRef w,
		      LLVMValueRef qb, int nb, int64_t K, int fused, LLVMValueRef *acc,
		      struct rows_pf pf)
{
	LLVMBuilderRef b = g->b;
	int nv = nb > 1 ? nb / 2 : 1;
	LLVMTypeRef vt = nb > 1 ? g->t_v16f : g->t_v8f;
	LLVMValueRef cell[MOE_LL_ROWS * MOE_LL_BLOCKS], wv[MOE_LL_BLOCKS], m[2 * MOE_VW];
	for (int i = 0; i < 2 * MOE_VW; i++)
		m[i] = LLVMConstInt(g->t_i32, (unsigned)i, 0);
	for (int i = 0; i < nr * nv; i++) {
		cell[i] = moe_ll_alloca(g, vt, 1, "qacc");
		moe_ll_st(g, LLVMConstNull(vt), cell[i]);
	}
	struct moe_ll_loop h;
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, K), 1, "qh");
	LLVMBasicBlockRef pf_end = moe_ll_when(g, pf.on, "pf");
	LLVMValueRef at = LLVMBuildLShr(
	    b, LLVMBuildNSWMul(b, h.iv, moe_ll_i64c(g, nb * MOE_RB * 4), ""), pf.sh, "");
	moe_ll_prefetch(g, moe_ll_at(g, g->t_i8, pf.base, at), 2);
	moe_ll_when_end(g, pf_end);
	for (int v = 0; v < nv; v++) {
		LLVMValueRef half[2];
		for (int e = 0; e < (nb > 1 ? 2 : 1); e++) {
			LLVMValueRef blk = LLVMBuildNSWAdd(b, qb, moe_ll_i64c(g, 2 * v + e), "");
			LLVMValueRef off = LLVMBuildNSWAdd(
			    b, LLVMBuildNSWMul(b, blk, moe_ll_i64c(g, K * MOE_RB), ""),
			    LLVMBuildNSWMul(b, h.iv, moe_ll_i64c(g, MOE_RB), ""), "");
			half[e] = moe_ll_ld(g, g->t_v8f, moe_ll_at(g, g->t_f32, w, off));
		}
		wv[v] = nb > 1 ? LLVMBuildShuffleVector(b, half[0], half[1],
							LLVMConstVector(m, 2 * MOE_VW), "w16")
			       : half[0];
	}
	for (int r = 0; r < nr; r++) {
		LLVMValueRef a = moe_ll_splat(g, moe_ll_ldf(g, x[r], h.iv), vt);
		for (int v = 0; v < nv; v++) {
			LLVMValueRef c = cell[r * nv + v];
			LLVMValueRef cur = moe_ll_ld(g, vt, c);
			moe_ll_st(g,
				  fused ? moe_ll_fma(g, a, wv[v], cur)
					: LLVMBuildFAdd(b, cur, LLVMBuildFMul(b, a, wv[v], ""), ""),
				  c);
		}
	}
	moe_ll_loop_close(g, &h);
	for (int i = 0; i < nr * nv; i++)
		acc[i] = moe_ll_ld(g, vt, cell[i]);
}

/* The rows [r0, r1) of moe_ll_rows_panels in tiles of nr rows (r1 - r0 a
 * multiple of nr): NB blocks per pass, then the rest one by one. */
static void panels_sweep(struct moe_ll *g, LLVMValueRef x0, int64_t xs, LLVMValueRef r0,
			 LLVMValueRef r1, int nr, LLVMValueRef w, LLVMValueRef b0, LLVMValueRef b1,
			 int NB, int64_t K, LLVMValueRef bias, LLVMValueRef out, int64_t os,
			 int fused)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef acc[MOE_LL_ROWS * MOE_LL_BLOCKS];
	struct moe_ll_loop qb, tb;
	LLVMValueRef nbk = LLVMBuildNSWSub(b, b1, b0, "");
	LLVMValueRef bw = LLVMBuildNSWAdd(
	    b, b0,
	    LLVMBuildMul(b, LLVMBuildSDiv(b, nbk, moe_ll_i64c(g, NB), ""), moe_ll_i64c(g, NB), ""),
	    "bw");
	for (int bpass = 0; bpass < 2; bpass++) {
		/* bpass 0: NB blocks per pass; 1: the rest one by one */
		int nb = bpass ? 1 : NB, nv = nb > 1 ? nb / 2 : 1;
		moe_ll_loop_open(g, &qb, bpass ? bw : b0, bpass ? b1 : bw, nb,
				 bpass ? "qb1" : "qb");
		LLVMValueRef q8 = LLVMBuildNSWMul(b, qb.iv, moe_ll_i64c(g, 8), "");
		LLVMTypeRef vt = nb > 1 ? g->t_v16f : g->t_v8f;
		LLVMValueRef bv[MOE_LL_BLOCKS];
		for (int v = 0; bias && v < nv; v++)
			bv[v] = moe_ll_ld(
			    g, vt,
			    moe_ll_at(g, g->t_f32, bias,
				      LLVMBuildNSWAdd(b, q8, moe_ll_i64c(g, 16 * v), "")));
		/* the row tiles: the first S of them (S the largest power of two
		 * up to 8 and their count) each prefetch a 1/S slice of the next
		 * pass's blocks (contiguous after these) toward L2, so that pass
		 * finds them there */
		LLVMValueRef ntile =
		    LLVMBuildSDiv(b, LLVMBuildNSWSub(b, r1, r0, ""), moe_ll_i64c(g, nr), "ntile");
		LLVMValueRef sh = moe_ll_i64c(g, 0);
		for (int k = 1; k <= 3; k++)
			sh = LLVMBuildSelect(
			    b, LLVMBuildICmp(b, LLVMIntSGE, ntile, moe_ll_i64c(g, 1 << k), ""),
			    moe_ll_i64c(g, k), sh, "");
		LLVMValueRef nq = LLVMBuildNSWAdd(b, qb.iv, moe_ll_i64c(g, nb), "");
		LLVMValueRef more = LLVMBuildICmp(b, LLVMIntSLT, nq, b1, "more");
		int64_t pass = (int64_t)nb * K * MOE_RB * 4; /* bytes of a pass's blocks */
		LLVMValueRef nxt = moe_ll_at(
		    g, g->t_i8, w, LLVMBuildNSWMul(b, nq, moe_ll_i64c(g, K * MOE_RB * 4), ""));
		moe_ll_loop_open(g, &tb, r0, r1, nr, nr > 1 ? "rb" : "r1");
		LLVMValueRef j =
		    LLVMBuildSDiv(b, LLVMBuildNSWSub(b, tb.iv, r0, ""), moe_ll_i64c(g, nr), "j");
		LLVMValueRef on = LLVMBuildAnd(
		    b,
		    LLVMBuildAnd(b, more,
				 LLVMBuildICmp(b, LLVMIntSGT, ntile, moe_ll_i64c(g, 1), ""), ""),
		    LLVMBuildICmp(b, LLVMIntSLT, j, LLVMBuildShl(b, moe_ll_i64c(g, 1), sh, ""), ""),
		    "pf.on");
		LLVMValueRef slice = moe_ll_at(
		    g, g->t_i8, nxt,
		    LLVMBuildLShr(b, LLVMBuildNSWMul(b, j, moe_ll_i64c(g, pass), ""), sh, ""));
		LLVMValueRef xr[MOE_LL_ROWS], qo[MOE_LL_ROWS];
		for (int t = 0; t < nr; t++) {
			LLVMValueRef tt = LLVMBuildNSWAdd(b, tb.iv, moe_ll_i64c(g, t), "");
			xr[t] = moe_ll_at(g, g->t_f32, x0,
					  LLVMBuildNSWMul(b, tt, moe_ll_i64c(g, xs), ""));
			qo[t] = moe_ll_at(
			    g, g->t_f32, out,
			    LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, tt, moe_ll_i64c(g, os), ""), q8,
					    ""));
		}
		struct rows_pf pf = {on, slice, sh};
		rows_tile(g, xr, nr, w, qb.iv, nb, K, fused, acc, pf);
		for (int t = 0; t < nr; t++)
			for (int v = 0; v < nv; v++) {
				LLVMValueRef o = acc[t * nv + v];
				if (bias)
					o = LLVMBuildFAdd(b, o, bv[v], "");
				moe_ll_st(g, o,
					  moe_ll_at(g, g->t_f32, qo[t], moe_ll_i64c(g, 16 * v)));
			}
		moe_ll_loop_close(g, &tb);
		moe_ll_loop_close(g, &qb);
	}
}

/* moe_ll_rows_panels: see cpu_llvm_util.h. */
void moe_ll_rows_panels(struct moe_ll *g, LLVMValueRef x0, int64_t xs, LLVMValueRef n,
			LLVMValueRef w, LLVMValueRef b0, LLVMValueRef b1, int64_t K,
			LLVMValueRef bias, LLVMValueRef out, int64_t os, int fused)
{
	/* the tiles: 8 rows x 4 blocks keep 16 accumulators in 32 zmm; on 16 ymm
	 * registers 4 rows x 2 blocks keep 8 (8 x 4 would spill 16 of 32). A
	 * single row keeps 4 blocks, 4 chains to hide the FMA latency. */
	int64_t R = g->wide ? MOE_LL_ROWS : MOE_LL_ROWS / 2;
	int NB = g->wide ? MOE_LL_BLOCKS : MOE_LL_BLOCKS / 2;
	LLVMValueRef full = LLVMBuildMul(g->b, LLVMBuildSDiv(g->b, n, moe_ll_i64c(g, R), ""),
					 moe_ll_i64c(g, R), "full");
	panels_sweep(g, x0, xs, moe_ll_i64c(g, 0), full, (int)R, w, b0, b1, NB, K, bias, out, os,
		     fused);
	panels_sweep(g, x0, xs, full, n, 1, w, b0, b1, MOE_LL_BLOCKS, K, bias, out, os, fused);
}

int64_t moe_ll_tgroup_size(int64_t row_floats)
{
	int64_t r = row_floats > 0 ? (64 << 10) / (row_floats * 4) : MOE_LL_ROWS;
	return r < 1 ? 1 : r > MOE_LL_ROWS ? MOE_LL_ROWS : r;
}

void moe_ll_tgroup_open(struct moe_ll *g, struct moe_ll_tgroup *tg, LLVMValueRef t0,
			LLVMValueRef t1, int64_t rows)
{
	LLVMBuilderRef b = g->b;
	tg->rows = rows;
	moe_ll_loop_open(g, &tg->grp, t0, t1, rows, "tg");
	LLVMValueRef left = LLVMBuildNSWSub(b, t1, tg->grp.iv, "");
	tg->n = LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, left, moe_ll_i64c(g, rows), ""),
				left, moe_ll_i64c(g, rows), "gn");
}

void moe_ll_tgroup_logits(struct moe_ll *g, const struct moe_ll_tgroup *tg, LLVMValueRef x,
			  LLVMValueRef w, uint32_t n, LLVMValueRef buf)
{
	int64_t H = g->d->hidden, nb = moe_router_blocks(n);
	LLVMValueRef x0 =
	    moe_ll_at(g, g->t_f32, x, LLVMBuildNSWMul(g->b, tg->grp.iv, moe_ll_i64c(g, H), ""));
	moe_ll_rows_panels(g, x0, H, tg->n, w, moe_ll_i64c(g, 0), moe_ll_i64c(g, nb), H, NULL, buf,
			   nb * MOE_RB, 0);
}

void moe_ll_tgroup_rows(struct moe_ll *g, struct moe_ll_tgroup *tg)
{
	moe_ll_loop_open(g, &tg->row, moe_ll_i64c(g, 0), tg->n, 1, "t");
	tg->t = LLVMBuildNSWAdd(g->b, tg->grp.iv, tg->row.iv, "tok");
}

LLVMValueRef moe_ll_tgroup_row(struct moe_ll *g, const struct moe_ll_tgroup *tg, LLVMValueRef buf,
			       uint32_t n)
{
	int64_t ld = (int64_t)moe_router_blocks(n) * MOE_RB;
	return moe_ll_at(g, g->t_f32, buf,
			 LLVMBuildNSWMul(g->b, tg->row.iv, moe_ll_i64c(g, ld), ""));
}

void moe_ll_tgroup_close(struct moe_ll *g, struct moe_ll_tgroup *tg)
{
	moe_ll_loop_close(g, &tg->row);
	moe_ll_loop_close(g, &tg->grp);
}

/* base + i * stride */
static LLVMValueRef idx(struct moe_ll *g, LLVMValueRef base, LLVMValueRef i, int64_t stride)
{
	if (stride != 1)
		i = LLVMBuildNSWMul(g->b, i, moe_ll_i64c(g, stride), "");
	return base ? LLVMBuildNSWAdd(g->b, base, i, "") : i;
}

void moe_ll_softmax(struct moe_ll *g, LLVMValueRef l, LLVMValueRef loff, int64_t lstride,
		    LLVMValueRef s, LLVMValueRef soff, int64_t sstride, LLVMValueRef n)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef m = moe_ll_alloca(g, g->t_f32, 1, "smax"),
		     sum = moe_ll_alloca(g, g->t_f32, 1, "ssum");
	struct moe_ll_loop e;
	moe_ll_st(g, moe_ll_f32c(g, -INFINITY), m);
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), n, 1, "smax");
	LLVMValueRef v = moe_ll_ldf(g, l, idx(g, loff, e.iv, lstride));
	moe_ll_st(g, moe_ll_fmax(g, v, moe_ll_ld(g, g->t_f32, m)), m);
	moe_ll_loop_close(g, &e);
	LLVMValueRef mx = moe_ll_ld(g, g->t_f32, m);
	moe_ll_st(g, moe_ll_f32c(g, 0.0), sum);
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), n, 1, "sexp");
	v = moe_ll_ldf(g, l, idx(g, loff, e.iv, lstride));
	LLVMValueRef ex = moe_ll_to_f32(g, moe_ll_libm(g, "exp", LLVMBuildFSub(b, v, mx, "")));
	moe_ll_stf(g, ex, s, idx(g, soff, e.iv, sstride));
	moe_ll_st(g, LLVMBuildFAdd(b, moe_ll_ld(g, g->t_f32, sum), ex, ""), sum);
	moe_ll_loop_close(g, &e);
	LLVMValueRef tot = moe_ll_ld(g, g->t_f32, sum);
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), n, 1, "sdiv");
	LLVMValueRef i = idx(g, soff, e.iv, sstride);
	moe_ll_stf(g, LLVMBuildFDiv(b, moe_ll_ldf(g, s, i), tot, ""), s, i);
	moe_ll_loop_close(g, &e);
}

void moe_ll_scores(struct moe_ll *g, enum moe_score sc, LLVMValueRef l, LLVMValueRef s,
		   LLVMValueRef off, uint32_t n)
{
	LLVMBuilderRef b = g->b;
	if (sc == MOE_SCORE_SOFTMAX) {
		moe_ll_softmax(g, l, off, 1, s, off, 1, moe_ll_i64c(g, n));
		return;
	}
	struct moe_ll_loop e;
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), 1, "score");
	LLVMValueRef i = idx(g, off, e.iv, 1);
	LLVMValueRef vd = moe_ll_to_f64(g, moe_ll_ldf(g, l, i));
	LLVMValueRef o;
	if (sc == MOE_SCORE_SIGMOID) {
		LLVMValueRef ex = moe_ll_libm(g, "exp", LLVMBuildFNeg(b, vd, ""));
		o = moe_ll_to_f32(g,
				  LLVMBuildFDiv(b, moe_ll_f64c(g, 1.0),
						LLVMBuildFAdd(b, moe_ll_f64c(g, 1.0), ex, ""), ""));
	} else {
		/* sqrt(softplus(l)), softplus(l) = l above 20 */
		LLVMValueRef sp = moe_ll_libm(g, "log1p", moe_ll_libm(g, "exp", vd));
		sp = moe_ll_to_f32(g, moe_ll_sel_gt(g, vd, moe_ll_f64c(g, 20.0), vd, sp));
		o = moe_ll_to_f32(g, moe_ll_intr1(g, "llvm.sqrt", moe_ll_to_f64(g, sp)));
	}
	moe_ll_stf(g, o, s, i);
	moe_ll_loop_close(g, &e);
}

void moe_ll_probs(struct moe_ll *g, enum moe_score sc, LLVMValueRef s, LLVMValueRef p,
		  LLVMValueRef off, uint32_t n, LLVMValueRef mul)
{
	LLVMBuilderRef b = g->b;
	struct moe_ll_loop e;
	LLVMValueRef sum = NULL;
	if (sc != MOE_SCORE_SOFTMAX) {
		LLVMValueRef acc = moe_ll_alloca(g, g->t_f32, 1, "psum");
		moe_ll_st(g, moe_ll_f32c(g, 0.0), acc);
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), 1, "psum");
		moe_ll_st(g,
			  LLVMBuildFAdd(b, moe_ll_ld(g, g->t_f32, acc),
					moe_ll_ldf(g, s, idx(g, off, e.iv, 1)), ""),
			  acc);
		moe_ll_loop_close(g, &e);
		sum = moe_ll_ld(g, g->t_f32, acc);
	}
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), 1, "pset");
	LLVMValueRef i = idx(g, off, e.iv, 1);
	LLVMValueRef v = moe_ll_ldf(g, s, i);
	if (sum)
		v = moe_ll_sel_gt(g, sum, moe_ll_f32c(g, 0.0), LLVMBuildFDiv(b, v, sum, ""),
				  moe_ll_f32c(g, 0.0));
	if (mul)
		v = LLVMBuildFMul(b, v, mul, "");
	moe_ll_stf(g, v, p, i);
	moe_ll_loop_close(g, &e);
}

/* a (value va, key ka) ranks before b: the reference's ranks_before. With no
 * keys a is the later position, so the key never decides: a is not NaN and
 * (b is NaN or a > b). */
static LLVMValueRef ranks_before(struct moe_ll *g, LLVMValueRef va, LLVMValueRef ka,
				 LLVMValueRef vb, LLVMValueRef kb)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef na = LLVMBuildFCmp(b, LLVMRealUNO, va, va, "");
	if (!ka)
		return LLVMBuildAnd(b, LLVMBuildNot(b, na, ""),
				    LLVMBuildFCmp(b, LLVMRealUGT, va, vb, ""), "");
	LLVMValueRef nb = LLVMBuildFCmp(b, LLVMRealUNO, vb, vb, "");
	LLVMValueRef ne =
	    LLVMBuildAnd(b, LLVMBuildNot(b, na, ""), LLVMBuildFCmp(b, LLVMRealONE, va, vb, ""), "");
	LLVMValueRef r = LLVMBuildSelect(b, ne, LLVMBuildFCmp(b, LLVMRealOGT, va, vb, ""),
					 LLVMBuildICmp(b, LLVMIntULT, ka, kb, ""), "");
	return LLVMBuildSelect(b, LLVMBuildXor(b, na, nb, ""), nb, r, "");
}

/* for each i: p = m; while (p > 0 && v[i] ranks before v[out[p - 1]]) shift
 * out[p - 1] up (when it stays within k), p--; out[p] = i when p < k;
 * m = min(m + 1, k). */
LLVMValueRef moe_ll_topk(struct moe_ll *g, LLVMValueRef v, LLVMValueRef off, int64_t stride,
			 LLVMValueRef keys, LLVMValueRef n, LLVMValueRef k, LLVMValueRef out)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef mcell = moe_ll_alloca(g, g->t_i64, 1, "tk.m");
	moe_ll_st(g, moe_ll_i64c(g, 0), mcell);
	struct moe_ll_loop i;
	moe_ll_loop_open(g, &i, moe_ll_i64c(g, 0), n, 1, "tk");
	LLVMValueRef vi = moe_ll_ldf(g, v, idx(g, off, i.iv, stride));
	LLVMValueRef ki = keys ? moe_ll_ldi(g, keys, i.iv) : NULL;
	LLVMValueRef m = moe_ll_ld(g, g->t_i64, mcell);
	LLVMBasicBlockRef pre = LLVMGetInsertBlock(b), head = moe_ll_bb(g, "tk.ins.head"),
			  chk = moe_ll_bb(g, "tk.ins.chk"), body = moe_ll_bb(g, "tk.ins.body"),
			  done = moe_ll_bb(g, "tk.ins.end");
	LLVMBuildBr(b, head);
	LLVMPositionBuilderAtEnd(b, head);
	LLVMValueRef p = LLVMBuildPhi(b, g->t_i64, "p");
	LLVMAddIncoming(p, &m, &pre, 1);
	LLVMBuildCondBr(b, LLVMBuildICmp(b, LLVMIntSGT, p, moe_ll_i64c(g, 0), ""), chk, done);
	LLVMPositionBuilderAtEnd(b, chk);
	LLVMValueRef pm1 = LLVMBuildNSWSub(b, p, moe_ll_i64c(g, 1), "");
	LLVMValueRef q = moe_ll_ldi(g, out, pm1);
	LLVMValueRef vq = moe_ll_ldf(g, v, idx(g, off, q, stride));
	LLVMBuildCondBr(b, ranks_before(g, vi, ki, vq, keys ? moe_ll_ldi(g, keys, q) : NULL), body,
			done);
	LLVMPositionBuilderAtEnd(b, body);
	LLVMBasicBlockRef end = moe_ll_when(g, LLVMBuildICmp(b, LLVMIntSLT, p, k, ""), "tk.shift");
	moe_ll_st(g, q, moe_ll_at(g, g->t_i64, out, p));
	moe_ll_when_end(g, end);
	LLVMBasicBlockRef latch = LLVMGetInsertBlock(b);
	LLVMBuildBr(b, head);
	LLVMAddIncoming(p, &pm1, &latch, 1);
	LLVMMoveBasicBlockAfter(done, latch);
	LLVMPositionBuilderAtEnd(b, done);
	LLVMValueRef pf = LLVMBuildPhi(b, g->t_i64, "pf");
	LLVMBasicBlockRef from[2] = {head, chk};
	LLVMValueRef vals[2] = {p, p};
	LLVMAddIncoming(pf, vals, from, 2);
	end = moe_ll_when(g, LLVMBuildICmp(b, LLVMIntSLT, pf, k, ""), "tk.put");
	moe_ll_st(g, i.iv, moe_ll_at(g, g->t_i64, out, pf));
	moe_ll_when_end(g, end);
	LLVMValueRef m1 = LLVMBuildNSWAdd(b, m, moe_ll_i64c(g, 1), "");
	moe_ll_st(g, LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, m1, k, ""), m1, k, ""), mcell);
	moe_ll_loop_close(g, &i);
	return moe_ll_ld(g, g->t_i64, mcell);
}

/* The vector top-k's state: the top so far, sorted, in vectors of k rounded
 * up to 16 lanes (values, positions, keys), m of its lanes filled. */
struct topk_vec {
	LLVMTypeRef vf, vi, bits;
	unsigned kw;
	int64_t k;
	LLVMValueRef lanes, shift, cell[3], mcell;
	LLVMValueRef v, keys;
};

/* Value i into the top when it ranks before the k-th (or the top is not
 * full): it takes the first lane it ranks before, found by one compare over
 * all lanes, and the lanes after it shift up by one. */
static void topk_vec_put(struct moe_ll *g, const struct topk_vec *s, LLVMValueRef i)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef vv = moe_ll_ldf(g, s->v, i);
	LLVMValueRef kv =
	    s->keys ? LLVMBuildTrunc(b, moe_ll_ldi(g, s->keys, i), g->t_i32, "") : NULL;
	LLVMValueRef m = moe_ll_ld(g, g->t_i32, s->mcell);
	LLVMValueRef tv = moe_ll_ld(g, s->vf, s->cell[0]), tk = moe_ll_ld(g, s->vi, s->cell[2]);
	LLVMValueRef kc = moe_ll_i32c(g, (int)s->k), kl = moe_ll_i32c(g, (int)s->k - 1);
	LLVMValueRef last = ranks_before(g, vv, kv, LLVMBuildExtractElement(b, tv, kl, ""),
					 kv ? LLVMBuildExtractElement(b, tk, kl, "") : NULL);
	LLVMBasicBlockRef end = moe_ll_when(
	    g, LLVMBuildOr(b, LLVMBuildICmp(b, LLVMIntSLT, m, kc, ""), last, ""), "tkv.in");
	LLVMValueRef sv = moe_ll_splat(g, vv, s->vf), sk = kv ? moe_ll_splat(g, kv, s->vi) : NULL;
	LLVMValueRef bef =
	    LLVMBuildOr(b, ranks_before(g, sv, sk, tv, kv ? tk : NULL),
			LLVMBuildICmp(b, LLVMIntUGE, s->lanes, moe_ll_splat(g, m, s->vi), ""), "");
	LLVMValueRef cz[2] = {LLVMBuildBitCast(b, bef, s->bits, ""), LLVMConstInt(g->t_i1, 0, 0)};
	LLVMTypeRef bt = s->bits;
	LLVMValueRef p = moe_ll_intr(g, "llvm.cttz", &bt, 1, cz, 2);
	p = LLVMBuildTrunc(b, LLVMBuildZExtOrBitCast(b, p, g->t_i64, ""), g->t_i32, "");
	p = moe_ll_splat(g, p, s->vi);
	LLVMValueRef at = LLVMBuildICmp(b, LLVMIntEQ, s->lanes, p, "");
	LLVMValueRef after = LLVMBuildICmp(b, LLVMIntUGT, s->lanes, p, "");
	LLVMValueRef put[3] = {sv, moe_ll_splat(g, LLVMBuildTrunc(b, i, g->t_i32, ""), s->vi),
			       sk ? sk : LLVMConstNull(s->vi)};
	for (int c = 0; c < 3; c++) {
		LLVMTypeRef t = c ? s->vi : s->vf;
		LLVMValueRef cur = c == 0 ? tv : c == 2 ? tk : moe_ll_ld(g, s->vi, s->cell[1]);
		LLVMValueRef up = LLVMBuildShuffleVector(b, cur, LLVMGetPoison(t), s->shift, "");
		moe_ll_st(
		    g, LLVMBuildSelect(b, at, put[c], LLVMBuildSelect(b, after, up, cur, ""), ""),
		    s->cell[c]);
	}
	LLVMValueRef m1 = LLVMBuildNSWAdd(b, m, moe_ll_i32c(g, 1), "");
	moe_ll_st(g, LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, m1, kc, ""), m1, kc, ""),
		  s->mcell);
	moe_ll_when_end(g, end);
}

/* moe_ll_topk with a constant k of at most 64, stride 1 and no offset, with
 * the same ranks (ranks_before lane by lane), so the same selection and
 * order. The values come 16 at a time: those that do not rank before the
 * k-th of the top as it was before them cannot rank before the k-th later
 * (it only moves up), so only the others are put, one by one. */
LLVMValueRef moe_ll_topk_vec(struct moe_ll *g, LLVMValueRef v, LLVMValueRef keys, LLVMValueRef n,
			     int64_t k, LLVMValueRef out)
{
	LLVMBuilderRef b = g->b;
	MOE_ASSERT(k >= 1 && k <= 64);
	struct topk_vec s = {.k = k, .v = v, .keys = keys};
	s.kw = (unsigned)(k + 15) / 16 * 16;
	s.vf = LLVMVectorType(g->t_f32, s.kw), s.vi = LLVMVectorType(g->t_i32, s.kw);
	s.bits = LLVMIntTypeInContext(g->ctx, s.kw);
	LLVMValueRef lane[64], sh[64];
	for (unsigned l = 0; l < s.kw; l++)
		lane[l] = moe_ll_i32c(g, (int)l), sh[l] = moe_ll_i32c(g, l ? (int)l - 1 : 0);
	s.lanes = LLVMConstVector(lane, s.kw), s.shift = LLVMConstVector(sh, s.kw);
	s.cell[0] = moe_ll_alloca(g, s.vf, 1, "tkv.v");
	s.cell[1] = moe_ll_alloca(g, s.vi, 1, "tkv.i");
	s.cell[2] = moe_ll_alloca(g, s.vi, 1, "tkv.k");
	s.mcell = moe_ll_alloca(g, g->t_i32, 1, "tkv.m");
	moe_ll_st(g, LLVMConstNull(s.vf), s.cell[0]);
	moe_ll_st(g, LLVMConstNull(s.vi), s.cell[1]);
	moe_ll_st(g, LLVMConstNull(s.vi), s.cell[2]);
	moe_ll_st(g, moe_ll_i32c(g, 0), s.mcell);
	LLVMValueRef bcell = moe_ll_alloca(g, g->t_i16, 1, "tkv.bits");
	LLVMTypeRef v16f = LLVMVectorType(g->t_f32, 16), v16i = LLVMVectorType(g->t_i64, 16);
	LLVMValueRef n16 = LLVMBuildAnd(b, n, moe_ll_i64c(g, ~(int64_t)15), "");
	struct moe_ll_loop c, i;
	moe_ll_loop_open(g, &c, moe_ll_i64c(g, 0), n16, 16, "tkv.c");
	/* the 16 values that rank before the k-th (all while not full) */
	LLVMValueRef tv = moe_ll_ld(g, s.vf, s.cell[0]), tk = moe_ll_ld(g, s.vi, s.cell[2]);
	LLVMValueRef kl = moe_ll_i32c(g, (int)k - 1);
	LLVMValueRef vals = LLVMBuildLoad2(b, v16f, moe_ll_at(g, g->t_f32, v, c.iv), "");
	LLVMSetAlignment(vals, 4);
	LLVMValueRef kv = NULL;
	if (keys) {
		kv = LLVMBuildLoad2(b, v16i, moe_ll_at(g, g->t_i64, keys, c.iv), "");
		LLVMSetAlignment(kv, 8);
		kv = LLVMBuildTrunc(b, kv, LLVMVectorType(g->t_i32, 16), "");
	}
	LLVMValueRef thv = moe_ll_splat(g, LLVMBuildExtractElement(b, tv, kl, ""), v16f);
	LLVMValueRef thk = keys ? moe_ll_splat(g, LLVMBuildExtractElement(b, tk, kl, ""),
					       LLVMVectorType(g->t_i32, 16))
				: NULL;
	LLVMValueRef cand = LLVMBuildBitCast(b, ranks_before(g, vals, kv, thv, thk), g->t_i16, "");
	LLVMValueRef full = LLVMBuildICmp(b, LLVMIntEQ, moe_ll_ld(g, g->t_i32, s.mcell),
					  moe_ll_i32c(g, (int)k), "");
	moe_ll_st(g, LLVMBuildSelect(b, full, cand, LLVMConstAllOnes(g->t_i16), ""), bcell);
	/* while bits: put the lowest, clear it */
	LLVMBasicBlockRef head = moe_ll_bb(g, "tkv.w.head"), body = moe_ll_bb(g, "tkv.w.body"),
			  done = moe_ll_bb(g, "tkv.w.end");
	LLVMBuildBr(b, head);
	LLVMPositionBuilderAtEnd(b, head);
	LLVMValueRef bits = moe_ll_ld(g, g->t_i16, bcell);
	LLVMBuildCondBr(b, LLVMBuildICmp(b, LLVMIntNE, bits, LLVMConstInt(g->t_i16, 0, 0), ""),
			body, done);
	LLVMPositionBuilderAtEnd(b, body);
	LLVMTypeRef i16 = g->t_i16;
	LLVMValueRef cz[2] = {bits, LLVMConstInt(g->t_i1, 1, 0)};
	LLVMValueRef j =
	    LLVMBuildZExt(b, moe_ll_intr(g, "llvm.cttz", &i16, 1, cz, 2), g->t_i64, "");
	moe_ll_st(g, LLVMBuildAnd(b, bits, LLVMBuildSub(b, bits, LLVMConstInt(i16, 1, 0), ""), ""),
		  bcell);
	topk_vec_put(g, &s, LLVMBuildNSWAdd(b, c.iv, j, ""));
	LLVMBuildBr(b, head);
	LLVMMoveBasicBlockAfter(done, LLVMGetInsertBlock(b));
	LLVMPositionBuilderAtEnd(b, done);
	moe_ll_loop_close(g, &c);
	moe_ll_loop_open(g, &i, n16, n, 1, "tkv.tail");
	topk_vec_put(g, &s, i.iv);
	moe_ll_loop_close(g, &i);
	LLVMValueRef cnt = LLVMBuildZExt(b, moe_ll_ld(g, g->t_i32, s.mcell), g->t_i64, "");
	LLVMValueRef pos = moe_ll_ld(g, s.vi, s.cell[1]);
	for (int64_t l = 0; l < k; l++) {
		LLVMBasicBlockRef e = moe_ll_when(
		    g, LLVMBuildICmp(b, LLVMIntSLT, moe_ll_i64c(g, l), cnt, ""), "tkv.out");
		moe_ll_st(g,
			  LLVMBuildZExt(b,
					LLVMBuildExtractElement(b, pos, moe_ll_i32c(g, (int)l), ""),
					g->t_i64, ""),
			  moe_ll_at(g, g->t_i64, out, moe_ll_i64c(g, l)));
		moe_ll_when_end(g, e);
	}
	return cnt;
}

void moe_ll_normalize(struct moe_ll *g, LLVMValueRef w, uint32_t n)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	if (d->norm == MOE_NORM_NONE)
		return;
	int lp = d->norm == MOE_NORM_LP;
	LLVMTypeRef t = lp ? g->t_f64 : g->t_f32;
	LLVMValueRef acc = moe_ll_alloca(g, t, 1, "wsum");
	moe_ll_st(g, LLVMConstReal(t, 0.0), acc);
	struct moe_ll_loop j;
	moe_ll_loop_open(g, &j, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), 1, "nsum");
	LLVMValueRef v = moe_ll_ldf(g, w, j.iv);
	if (lp)
		v = moe_ll_pow(g, moe_ll_intr1(g, "llvm.fabs", moe_ll_to_f64(g, v)),
			       (double)d->norm_p);
	moe_ll_st(g, LLVMBuildFAdd(b, moe_ll_ld(g, t, acc), v, ""), acc);
	moe_ll_loop_close(g, &j);
	LLVMValueRef den = moe_ll_ld(g, t, acc);
	if (lp)
		den = moe_ll_to_f32(g, moe_ll_pow(g, den, 1.0 / (double)d->norm_p));
	den = LLVMBuildFAdd(b, den, moe_ll_f32c(g, d->norm_eps), "");
	/* if (den < min) den = min: a NaN stays NaN, then counts as not positive */
	LLVMValueRef mn = moe_ll_f32c(g, d->norm_min);
	den = LLVMBuildSelect(b, LLVMBuildFCmp(b, LLVMRealOLT, den, mn, ""), mn, den, "");
	/* w / 1 == w: dividing by one leaves the weights as they are */
	den = moe_ll_sel_gt(g, den, moe_ll_f32c(g, 0.0), den, moe_ll_f32c(g, 1.0));
	moe_ll_loop_open(g, &j, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), 1, "ndiv");
	moe_ll_stf(g, LLVMBuildFDiv(b, moe_ll_ldf(g, w, j.iv), den, ""), w, j.iv);
	moe_ll_loop_close(g, &j);
}
