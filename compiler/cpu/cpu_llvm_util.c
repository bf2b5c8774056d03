/* cpu_llvm_util.c: the small IR builders the CPU backend's router and layer
 * files share (see cpu_llvm_util.h). Alignments, block order and attributes
 * are part of the generated IR that generated/ pins, so keep them stable. */
#include "cpu_llvm_util.h"

#include "backend.h"

#include <math.h>
#include <string.h>

void moe_ll_init(struct moe_ll *g, LLVMContextRef ctx, LLVMModuleRef mod, LLVMBuilderRef b,
		 const struct moe_desc *d)
{
	memset(g, 0, sizeof *g);
	g->ctx = ctx;
	g->mod = mod;
	g->b = b;
	g->d = d;
	g->t_void = LLVMVoidTypeInContext(ctx);
	g->t_i1 = LLVMInt1TypeInContext(ctx);
	g->t_i8 = LLVMInt8TypeInContext(ctx);
	g->t_i16 = LLVMInt16TypeInContext(ctx);
	g->t_i32 = LLVMInt32TypeInContext(ctx);
	g->t_i64 = LLVMInt64TypeInContext(ctx);
	g->t_f32 = LLVMFloatTypeInContext(ctx);
	g->t_f64 = LLVMDoubleTypeInContext(ctx);
	g->t_ptr = LLVMPointerTypeInContext(ctx, 0);
	g->t_v8f = LLVMVectorType(g->t_f32, 8);
	g->t_v8d = LLVMVectorType(g->t_f64, 8);
}

LLVMValueRef moe_ll_i64c(struct moe_ll *g, int64_t v)
{
	return LLVMConstInt(g->t_i64, (unsigned long long)v, 1);
}

LLVMValueRef moe_ll_f32c(struct moe_ll *g, double v)
{
	return LLVMConstReal(g->t_f32, v);
}

LLVMValueRef moe_ll_f64c(struct moe_ll *g, double v)
{
	return LLVMConstReal(g->t_f64, v);
}

LLVMValueRef moe_ll_at(struct moe_ll *g, LLVMTypeRef t, LLVMValueRef base, LLVMValueRef i)
{
	return LLVMBuildInBoundsGEP2(g->b, t, base, &i, 1, "");
}

/* Loads take the scalar's natural alignment (vectors of f32: 4, the arrays
 * they come from); stores of i16 stay at 4, as they always were. */
LLVMValueRef moe_ll_ld(struct moe_ll *g, LLVMTypeRef t, LLVMValueRef p)
{
	LLVMValueRef v = LLVMBuildLoad2(g->b, t, p, "");
	LLVMSetAlignment(v, t == g->t_i8                     ? 1
			    : t == g->t_i16                  ? 2
			    : t == g->t_i64 || t == g->t_f64 ? 8
							     : 4);
	return v;
}

void moe_ll_st(struct moe_ll *g, LLVMValueRef v, LLVMValueRef p)
{
	LLVMTypeRef t = LLVMTypeOf(v);
	LLVMSetAlignment(LLVMBuildStore(g->b, v, p), t == g->t_i8                     ? 1
						     : t == g->t_i64 || t == g->t_f64 ? 8
										      : 4);
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

/* n elements of t (a scalar slot when n == 1) in the entry block, so the
 * allocas stay static whatever loop builds them. */
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

LLVMBasicBlockRef moe_ll_bb(struct moe_ll *g, const char *name)
{
	return LLVMAppendBasicBlockInContext(g->ctx, g->fn, name);
}

void moe_ll_loop_open(struct moe_ll *g, struct moe_ll_loop *l, LLVMValueRef from, LLVMValueRef to,
		      const char *name)
{
	LLVMBasicBlockRef pre = LLVMGetInsertBlock(g->b);
	l->head = moe_ll_bb(g, name);
	l->body = moe_ll_bb(g, name);
	l->exit = moe_ll_bb(g, name);
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
	LLVMValueRef next = LLVMBuildNSWAdd(g->b, l->iv, moe_ll_i64c(g, 1), "");
	LLVMBuildBr(g->b, l->head);
	LLVMAddIncoming(l->iv, &next, &latch, 1);
	LLVMMoveBasicBlockAfter(l->exit, latch);
	LLVMPositionBuilderAtEnd(g->b, l->exit);
}

/* if (c) { ... }: returns the join block for moe_ll_when_end */
LLVMBasicBlockRef moe_ll_when(struct moe_ll *g, LLVMValueRef c)
{
	LLVMBasicBlockRef then = moe_ll_bb(g, "then"), end = moe_ll_bb(g, "endif");
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

/* A hidden nounwind void function; the builder is left in its first block
 * after "entry", which moe_ll_fn_end links to. */
void moe_ll_fn_begin(struct moe_ll *g, const char *name, LLVMTypeRef *params,
		     const char *const *pnames, unsigned n)
{
	LLVMTypeRef ft = LLVMFunctionType(g->t_void, params, n, 0);
	g->fn = LLVMAddFunction(g->mod, name, ft);
	LLVMSetVisibility(g->fn, LLVMHiddenVisibility);
	unsigned k = LLVMGetEnumAttributeKindForName("nounwind", 8);
	LLVMAddAttributeAtIndex(g->fn, LLVMAttributeFunctionIndex,
				LLVMCreateEnumAttribute(g->ctx, k, 0));
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

/* double f(double) from the C library, declared nounwind: the reference's
 * formulas. An f32 argument is widened first. */
LLVMValueRef moe_ll_libm(struct moe_ll *g, const char *fname, LLVMValueRef a)
{
	LLVMTypeRef ft = LLVMFunctionType(g->t_f64, &g->t_f64, 1, 0);
	LLVMValueRef f = LLVMGetNamedFunction(g->mod, fname);
	if (!f) {
		f = LLVMAddFunction(g->mod, fname, ft);
		unsigned k = LLVMGetEnumAttributeKindForName("nounwind", 8);
		LLVMAddAttributeAtIndex(f, LLVMAttributeFunctionIndex,
					LLVMCreateEnumAttribute(g->ctx, k, 0));
	}
	if (LLVMTypeOf(a) != g->t_f64)
		a = LLVMBuildFPExt(g->b, a, g->t_f64, "");
	return LLVMBuildCall2(g->b, ft, f, &a, 1, "");
}

/* a one-operand intrinsic overloaded on a's type (llvm.fabs, llvm.sqrt, ...) */
LLVMValueRef moe_ll_intr1(struct moe_ll *g, const char *name, LLVMValueRef a)
{
	LLVMTypeRef t = LLVMTypeOf(a);
	unsigned id = LLVMLookupIntrinsicID(name, strlen(name));
	MOE_ASSERT(id != 0);
	LLVMValueRef f = LLVMGetIntrinsicDeclaration(g->mod, id, &t, 1);
	return LLVMBuildCall2(g->b, LLVMIntrinsicGetType(g->ctx, id, &t, 1), f, &a, 1, "");
}

/* a > b ? x : y, false when either is NaN */
LLVMValueRef moe_ll_sel_gt(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b, LLVMValueRef x,
			   LLVMValueRef y)
{
	return LLVMBuildSelect(g->b, LLVMBuildFCmp(g->b, LLVMRealOGT, a, b, ""), x, y, "");
}

LLVMValueRef moe_ll_to_f32(struct moe_ll *g, LLVMValueRef v)
{
	return LLVMBuildFPTrunc(g->b, v, g->t_f32, "");
}

/* out[0..n) = rows of panel weights . xrow: [ceil(n/8)][H][8] f32 panels,
 * each lane an f32 sum in ascending h (multiply then add), like dot_f32. */
void moe_ll_panel_dots(struct moe_ll *g, LLVMValueRef xrow, LLVMValueRef w, uint32_t n,
		       LLVMValueRef out)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, nb = moe_router_blocks(n);
	LLVMValueRef acc = moe_ll_alloca(g, g->t_v8f, 1, "acc");
	struct moe_ll_loop p, h;
	moe_ll_loop_open(g, &p, moe_ll_i64c(g, 0), moe_ll_i64c(g, nb), "pd.b");
	moe_ll_st(g, LLVMConstNull(g->t_v8f), acc);
	LLVMValueRef wb =
	    moe_ll_at(g, g->t_f32, w, LLVMBuildNSWMul(b, p.iv, moe_ll_i64c(g, (int64_t)H * 8), ""));
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), "pd.h");
	LLVMValueRef xv = moe_ll_ldf(g, xrow, h.iv);
	LLVMValueRef v = LLVMBuildInsertElement(b, LLVMGetPoison(g->t_v8f), xv,
						LLVMConstInt(g->t_i32, 0, 0), "");
	v = LLVMBuildShuffleVector(b, v, LLVMGetPoison(g->t_v8f),
				   LLVMConstNull(LLVMVectorType(g->t_i32, 8)), "");
	LLVMValueRef wv =
	    moe_ll_ld(g, g->t_v8f,
		      moe_ll_at(g, g->t_f32, wb, LLVMBuildNSWMul(b, h.iv, moe_ll_i64c(g, 8), "")));
	moe_ll_st(g, LLVMBuildFAdd(b, moe_ll_ld(g, g->t_v8f, acc), LLVMBuildFMul(b, v, wv, ""), ""),
		  acc);
	moe_ll_loop_close(g, &h);
	/* store the lanes that exist */
	LLVMValueRef a = moe_ll_ld(g, g->t_v8f, acc);
	for (int j = 0; j < 8; j++) {
		LLVMValueRef e = LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, p.iv, moe_ll_i64c(g, 8), ""),
						 moe_ll_i64c(g, j), "");
		LLVMBasicBlockRef end =
		    moe_ll_when(g, LLVMBuildICmp(b, LLVMIntSLT, e, moe_ll_i64c(g, n), ""));
		moe_ll_stf(
		    g, LLVMBuildExtractElement(b, a, LLVMConstInt(g->t_i32, (unsigned)j, 0), ""),
		    out, e);
		moe_ll_when_end(g, end);
	}
	moe_ll_loop_close(g, &p);
}

/* Scores s[off + i] = f(l[off + i]) for i in [0, n), as score_vec. */
void moe_ll_scores(struct moe_ll *g, enum moe_score sc, LLVMValueRef l, LLVMValueRef s,
		   LLVMValueRef off, uint32_t n)
{
	LLVMBuilderRef b = g->b;
	struct moe_ll_loop e;
	if (sc == MOE_SCORE_SOFTMAX) {
		LLVMValueRef m = moe_ll_alloca(g, g->t_f32, 1, "smax"),
			     sum = moe_ll_alloca(g, g->t_f32, 1, "ssum");
		moe_ll_st(g, moe_ll_f32c(g, -INFINITY), m);
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), "sm.max");
		LLVMValueRef v = moe_ll_ldf(g, l, LLVMBuildNSWAdd(b, off, e.iv, ""));
		LLVMValueRef mv = moe_ll_ld(g, g->t_f32, m);
		moe_ll_st(g, moe_ll_sel_gt(g, v, mv, v, mv), m);
		moe_ll_loop_close(g, &e);
		LLVMValueRef mx = moe_ll_ld(g, g->t_f32, m);
		moe_ll_st(g, moe_ll_f32c(g, 0.0), sum);
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), "sm.exp");
		LLVMValueRef i = LLVMBuildNSWAdd(b, off, e.iv, "");
		LLVMValueRef ex = moe_ll_to_f32(
		    g, moe_ll_libm(g, "exp", LLVMBuildFSub(b, moe_ll_ldf(g, l, i), mx, "")));
		moe_ll_stf(g, ex, s, i);
		moe_ll_st(g, LLVMBuildFAdd(b, moe_ll_ld(g, g->t_f32, sum), ex, ""), sum);
		moe_ll_loop_close(g, &e);
		LLVMValueRef tot = moe_ll_ld(g, g->t_f32, sum);
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), "sm.div");
		i = LLVMBuildNSWAdd(b, off, e.iv, "");
		moe_ll_stf(g, LLVMBuildFDiv(b, moe_ll_ldf(g, s, i), tot, ""), s, i);
		moe_ll_loop_close(g, &e);
		return;
	}
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), "sc");
	LLVMValueRef i = LLVMBuildNSWAdd(b, off, e.iv, "");
	LLVMValueRef vd = LLVMBuildFPExt(b, moe_ll_ldf(g, l, i), g->t_f64, "");
	LLVMValueRef o;
	if (sc == MOE_SCORE_SIGMOID) {
		LLVMValueRef ex = moe_ll_libm(g, "exp", LLVMBuildFNeg(b, vd, ""));
		o = moe_ll_to_f32(g,
				  LLVMBuildFDiv(b, moe_ll_f64c(g, 1.0),
						LLVMBuildFAdd(b, moe_ll_f64c(g, 1.0), ex, ""), ""));
	} else {
		LLVMValueRef sp = moe_ll_libm(g, "log1p", moe_ll_libm(g, "exp", vd));
		sp = moe_ll_to_f32(g, moe_ll_sel_gt(g, vd, moe_ll_f64c(g, 20.0), vd, sp));
		o = moe_ll_to_f32(
		    g, moe_ll_intr1(g, "llvm.sqrt", LLVMBuildFPExt(b, sp, g->t_f64, "")));
	}
	moe_ll_stf(g, o, s, i);
	moe_ll_loop_close(g, &e);
}

/* p[off..off+n) = the statistics' router probability of scores s (prob_vec):
 * the softmax itself, or the scores normalized to sum 1; times mul (NULL: 1). */
void moe_ll_probs(struct moe_ll *g, enum moe_score sc, LLVMValueRef s, LLVMValueRef p,
		  LLVMValueRef off, uint32_t n, LLVMValueRef mul)
{
	LLVMBuilderRef b = g->b;
	struct moe_ll_loop e;
	LLVMValueRef sum = NULL;
	if (sc != MOE_SCORE_SOFTMAX) {
		LLVMValueRef acc = moe_ll_alloca(g, g->t_f32, 1, "psum");
		moe_ll_st(g, moe_ll_f32c(g, 0.0), acc);
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), "p.sum");
		moe_ll_st(g,
			  LLVMBuildFAdd(b, moe_ll_ld(g, g->t_f32, acc),
					moe_ll_ldf(g, s, LLVMBuildNSWAdd(b, off, e.iv, "")), ""),
			  acc);
		moe_ll_loop_close(g, &e);
		sum = moe_ll_ld(g, g->t_f32, acc);
	}
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), "p.set");
	LLVMValueRef i = LLVMBuildNSWAdd(b, off, e.iv, "");
	LLVMValueRef v = moe_ll_ldf(g, s, i);
	if (sum)
		v = moe_ll_sel_gt(g, sum, moe_ll_f32c(g, 0.0), LLVMBuildFDiv(b, v, sum, ""),
				  moe_ll_f32c(g, 0.0));
	if (mul)
		v = LLVMBuildFMul(b, v, mul, "");
	moe_ll_stf(g, v, p, i);
	moe_ll_loop_close(g, &e);
}
