/* cpu_llvm.c: the CPU backend. Builds one LLVM module per plan with the LLVM C
 * API: the fused router, the expert up (gate|up + activation) and down tiles
 * for the routed and shared FFNs, the model's constants and the moe_gen table
 * the runtime calls (runtime/moe_kernels.h); verifies, optimizes and emits. */
#include "backend.h"

#include <llvm-c/Analysis.h>
#include <llvm-c/Core.h>
#include <llvm-c/Target.h>
#include <llvm-c/TargetMachine.h>
#include <llvm-c/Transforms/PassBuilder.h>

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

struct cg {
	LLVMContextRef ctx;
	LLVMModuleRef mod;
	LLVMBuilderRef b;
	LLVMTypeRef t_void, t_i1, t_i8, t_i16, t_i32, t_i64, t_f32, t_half, t_ptr;
	LLVMTypeRef t_v8f, t_v8i16, t_v8i32, t_v8h, t_v8i1;
	LLVMValueRef fn;         /* function being built */
	LLVMBasicBlockRef entry; /* its allocas */
	const struct moe_plan *p;
	const struct moe_desc *d;
	const char *cpu_name;
	const char *triple;
	int wide; /* AVX-512: expert tiles keep one 16-lane accumulator per row */
};

/* Constants and small builders -------------------------------------------- */

static LLVMValueRef ci64(struct cg *g, int64_t v)
{
	return LLVMConstInt(g->t_i64, (unsigned long long)v, 1);
}

static LLVMValueRef ci32(struct cg *g, int32_t v)
{
	return LLVMConstInt(g->t_i32, (unsigned long long)(int64_t)v, 1);
}

static LLVMValueRef cf32(struct cg *g, double v)
{
	return LLVMConstReal(g->t_f32, v);
}

static LLVMValueRef vconst(struct cg *g, double v)
{
	LLVMValueRef e[MOE_VW];
	for (int i = 0; i < MOE_VW; i++)
		e[i] = cf32(g, v);
	return LLVMConstVector(e, MOE_VW);
}

static LLVMValueRef vconst_i32(struct cg *g, int32_t v)
{
	LLVMValueRef e[MOE_VW];
	for (int i = 0; i < MOE_VW; i++)
		e[i] = ci32(g, v);
	return LLVMConstVector(e, MOE_VW);
}

static LLVMValueRef splat(struct cg *g, LLVMValueRef s, const char *name)
{
	LLVMValueRef v = LLVMBuildInsertElement(g->b, LLVMGetPoison(g->t_v8f), s, ci32(g, 0), "");
	return LLVMBuildShuffleVector(g->b, v, LLVMGetPoison(g->t_v8f), LLVMConstNull(g->t_v8i32),
				      name);
}

static LLVMValueRef gep(struct cg *g, LLVMTypeRef elem, LLVMValueRef base, LLVMValueRef idx,
			const char *name)
{
	return LLVMBuildInBoundsGEP2(g->b, elem, base, &idx, 1, name);
}

static LLVMValueRef load(struct cg *g, LLVMTypeRef t, LLVMValueRef ptr, const char *name)
{
	LLVMValueRef v = LLVMBuildLoad2(g->b, t, ptr, name);
	LLVMSetAlignment(v, t == g->t_i16 || t == g->t_v8i16 ? 2 : t == g->t_i8 ? 1 : 4);
	return v;
}

static void store(struct cg *g, LLVMValueRef v, LLVMValueRef ptr)
{
	LLVMValueRef s = LLVMBuildStore(g->b, v, ptr);
	LLVMTypeRef t = LLVMTypeOf(v);
	LLVMSetAlignment(s, t == g->t_i8 ? 1 : 4);
}

/* A stack variable, allocated in the entry block (promoted to a register by
 * the optimizer). */
static LLVMValueRef var(struct cg *g, LLVMTypeRef t, uint64_t n, const char *name)
{
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMPositionBuilderAtEnd(g->b, g->entry);
	LLVMValueRef a = n == 1 ? LLVMBuildAlloca(g->b, t, name)
				: LLVMBuildAlloca(g->b, LLVMArrayType2(t, n), name);
	LLVMSetAlignment(a, 32);
	LLVMPositionBuilderAtEnd(g->b, cur);
	return a;
}

static LLVMValueRef call_intr(struct cg *g, const char *name, LLVMTypeRef *tys, size_t n_tys,
			      LLVMValueRef *args, unsigned n_args, const char *vname)
{
	unsigned id = LLVMLookupIntrinsicID(name, strlen(name));
	MOE_ASSERT(id != 0);
	LLVMValueRef f = LLVMGetIntrinsicDeclaration(g->mod, id, tys, n_tys);
	LLVMTypeRef ft = LLVMIntrinsicGetType(g->ctx, id, tys, n_tys);
	return LLVMBuildCall2(g->b, ft, f, args, n_args, vname);
}

static LLVMValueRef fma3(struct cg *g, LLVMValueRef a, LLVMValueRef b, LLVMValueRef c,
			 const char *name)
{
	LLVMTypeRef t = LLVMTypeOf(a);
	LLVMValueRef args[3] = {a, b, c};
	return call_intr(g, "llvm.fma", &t, 1, args, 3, name);
}

static LLVMValueRef unary_intr(struct cg *g, const char *intr, LLVMValueRef a, const char *name)
{
	LLVMTypeRef t = LLVMTypeOf(a);
	return call_intr(g, intr, &t, 1, &a, 1, name);
}

/* A call to a C library function float f(float). */
static LLVMValueRef libm(struct cg *g, const char *fname, LLVMValueRef a, const char *name)
{
	LLVMTypeRef ft = LLVMFunctionType(g->t_f32, &g->t_f32, 1, 0);
	LLVMValueRef f = LLVMGetNamedFunction(g->mod, fname);
	if (!f) {
		f = LLVMAddFunction(g->mod, fname, ft);
		LLVMAddAttributeAtIndex(
		    f, LLVMAttributeFunctionIndex,
		    LLVMCreateEnumAttribute(g->ctx, LLVMGetEnumAttributeKindForName("nounwind", 8),
					    0));
	}
	return LLVMBuildCall2(g->b, ft, f, &a, 1, name);
}

/* A call to a C library function double f(double), on a float widened to
 * double and rounded back: the router's scores use the reference's double
 * formulas so the chosen experts agree bit for bit. */
static LLVMValueRef libm_d(struct cg *g, const char *fname, LLVMValueRef a, const char *name)
{
	LLVMTypeRef dt = LLVMDoubleTypeInContext(g->ctx);
	LLVMTypeRef ft = LLVMFunctionType(dt, &dt, 1, 0);
	LLVMValueRef f = LLVMGetNamedFunction(g->mod, fname);
	if (!f) {
		f = LLVMAddFunction(g->mod, fname, ft);
		LLVMAddAttributeAtIndex(
		    f, LLVMAttributeFunctionIndex,
		    LLVMCreateEnumAttribute(g->ctx, LLVMGetEnumAttributeKindForName("nounwind", 8),
					    0));
	}
	if (LLVMTypeOf(a) != dt)
		a = LLVMBuildFPExt(g->b, a, dt, "");
	return LLVMBuildCall2(g->b, ft, f, &a, 1, name);
}

static LLVMValueRef fsel_gt(struct cg *g, LLVMValueRef a, LLVMValueRef b, LLVMValueRef x,
			    LLVMValueRef y, const char *name)
{
	LLVMValueRef c = LLVMBuildFCmp(g->b, LLVMRealOGT, a, b, "");
	return LLVMBuildSelect(g->b, c, x, y, name);
}

static LLVMValueRef fmax2(struct cg *g, LLVMValueRef a, LLVMValueRef b, const char *name)
{
	return fsel_gt(g, a, b, a, b, name);
}

static LLVMValueRef fmin2(struct cg *g, LLVMValueRef a, LLVMValueRef b, const char *name)
{
	LLVMValueRef c = LLVMBuildFCmp(g->b, LLVMRealOLT, a, b, "");
	return LLVMBuildSelect(g->b, c, a, b, name);
}

static LLVMBasicBlockRef block(struct cg *g, const char *name)
{
	return LLVMAppendBasicBlockInContext(g->ctx, g->fn, name);
}

/* Counted loops: for (iv = from; iv < to; iv += step). Blocks are laid out
 * in source order (the exit moves after the body when the loop closes). */
struct loop {
	LLVMBasicBlockRef head, body, exit;
	LLVMValueRef iv;
	int64_t step;
};

static void loop_open(struct cg *g, struct loop *l, LLVMValueRef from, LLVMValueRef to,
		      int64_t step, const char *name)
{
	char nm[64];
	LLVMBasicBlockRef pre = LLVMGetInsertBlock(g->b);
	snprintf(nm, sizeof nm, "%s.head", name);
	l->head = block(g, nm);
	snprintf(nm, sizeof nm, "%s.body", name);
	l->body = block(g, nm);
	snprintf(nm, sizeof nm, "%s.end", name);
	l->exit = block(g, nm);
	l->step = step;
	LLVMBuildBr(g->b, l->head);
	LLVMPositionBuilderAtEnd(g->b, l->head);
	l->iv = LLVMBuildPhi(g->b, g->t_i64, name);
	LLVMAddIncoming(l->iv, &from, &pre, 1);
	LLVMValueRef c = LLVMBuildICmp(g->b, LLVMIntSLT, l->iv, to, "");
	LLVMBuildCondBr(g->b, c, l->body, l->exit);
	LLVMPositionBuilderAtEnd(g->b, l->body);
}

static void loop_close(struct cg *g, struct loop *l)
{
	LLVMBasicBlockRef latch = LLVMGetInsertBlock(g->b);
	LLVMValueRef next = LLVMBuildNSWAdd(g->b, l->iv, ci64(g, l->step), "");
	LLVMBuildBr(g->b, l->head);
	LLVMAddIncoming(l->iv, &next, &latch, 1);
	LLVMMoveBasicBlockAfter(l->exit, latch);
	LLVMPositionBuilderAtEnd(g->b, l->exit);
}

/* if (c) { ... } */
static LLVMBasicBlockRef if_open(struct cg *g, LLVMValueRef c, const char *name)
{
	char nm[64];
	snprintf(nm, sizeof nm, "%s.then", name);
	LLVMBasicBlockRef then = block(g, nm);
	snprintf(nm, sizeof nm, "%s.end", name);
	LLVMBasicBlockRef end = block(g, nm);
	LLVMBuildCondBr(g->b, c, then, end);
	LLVMPositionBuilderAtEnd(g->b, then);
	return end;
}

static void if_close(struct cg *g, LLVMBasicBlockRef end)
{
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMBuildBr(g->b, end);
	LLVMMoveBasicBlockAfter(end, cur);
	LLVMPositionBuilderAtEnd(g->b, end);
}

static void attr(struct cg *g, LLVMValueRef f, unsigned idx, const char *name)
{
	unsigned k = LLVMGetEnumAttributeKindForName(name, strlen(name));
	LLVMAddAttributeAtIndex(f, idx, LLVMCreateEnumAttribute(g->ctx, k, 0));
}

/* Start a function: hidden, nounwind, with named parameters. */
static LLVMValueRef fn_open(struct cg *g, const char *name, LLVMTypeRef *params,
			    const char *const *pnames, unsigned n)
{
	LLVMTypeRef ft = LLVMFunctionType(g->t_void, params, n, 0);
	LLVMValueRef f = LLVMAddFunction(g->mod, name, ft);
	LLVMSetVisibility(f, LLVMHiddenVisibility);
	attr(g, f, LLVMAttributeFunctionIndex, "nounwind");
	for (unsigned i = 0; i < n; i++)
		LLVMSetValueName2(LLVMGetParam(f, i), pnames[i], strlen(pnames[i]));
	g->fn = f;
	g->entry = block(g, "entry");
	LLVMBasicBlockRef start = block(g, "start");
	LLVMPositionBuilderAtEnd(g->b, start);
	return f;
}

static void fn_close(struct cg *g)
{
	LLVMBuildRetVoid(g->b);
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMPositionBuilderAtEnd(g->b, g->entry);
	LLVMBuildBr(g->b, LLVMGetNextBasicBlock(g->entry));
	LLVMPositionBuilderAtEnd(g->b, cur);
}

static LLVMValueRef arg(struct cg *g, unsigned i)
{
	return LLVMGetParam(g->fn, i);
}

/* Vector math ---------------------------------------------------------------- */

/* exp on <8 x float>: Cody-Waite range reduction and a degree-5 polynomial
 * (about 1 ulp), clamped so 2^n stays a normal float. */
static LLVMValueRef vexp(struct cg *g, LLVMValueRef x)
{
	LLVMBuilderRef b = g->b;
	x = fmin2(g, x, vconst(g, 88.0), "");
	x = fmax2(g, x, vconst(g, -87.0), "");
	LLVMValueRef fx = fma3(g, x, vconst(g, 1.44269504088896341), vconst(g, 0.5), "");
	fx = unary_intr(g, "llvm.floor", fx, "exp.n");
	LLVMValueRef r = fma3(g, fx, vconst(g, -0.693359375), x, "");
	r = fma3(g, fx, vconst(g, 2.12194440e-4), r, "exp.r");
	static const double c[] = {1.9875691500E-4, 1.3981999507E-3, 8.3334519073E-3,
				   4.1665795894E-2, 1.6666665459E-1, 5.0000001201E-1};
	LLVMValueRef y = vconst(g, c[0]);
	for (int i = 1; i < 6; i++)
		y = fma3(g, y, r, vconst(g, c[i]), "");
	LLVMValueRef z = LLVMBuildFMul(b, r, r, "");
	y = fma3(g, y, z, r, "");
	y = LLVMBuildFAdd(b, y, vconst(g, 1.0), "");
	LLVMValueRef n = LLVMBuildFPToSI(b, fx, g->t_v8i32, "");
	n = LLVMBuildAdd(b, n, vconst_i32(g, 127), "");
	n = LLVMBuildShl(b, n, vconst_i32(g, 23), "");
	LLVMValueRef p2 = LLVMBuildBitCast(b, n, g->t_v8f, "exp.2n");
	return LLVMBuildFMul(b, y, p2, "exp");
}

static LLVMValueRef vsigmoid(struct cg *g, LLVMValueRef x)
{
	LLVMValueRef e = vexp(g, LLVMBuildFNeg(g->b, x, ""));
	return LLVMBuildFDiv(g->b, vconst(g, 1.0), LLVMBuildFAdd(g->b, e, vconst(g, 1.0), ""),
			     "sigmoid");
}

/* Apply a scalar libm function lane by lane (only for rare activations). */
static LLVMValueRef vlibm(struct cg *g, const char *fname, LLVMValueRef x)
{
	LLVMValueRef v = LLVMGetPoison(g->t_v8f);
	for (int i = 0; i < MOE_VW; i++) {
		LLVMValueRef e = LLVMBuildExtractElement(g->b, x, ci32(g, i), "");
		e = libm(g, fname, e, "");
		v = LLVMBuildInsertElement(g->b, v, e, ci32(g, i), "");
	}
	return v;
}

/* The elementwise activation (not swiglu_oai, which needs both halves). */
static LLVMValueRef vact(struct cg *g, enum moe_act a, LLVMValueRef x)
{
	LLVMBuilderRef b = g->b;
	switch (a) {
	case MOE_ACT_SILU:
		return LLVMBuildFMul(b, x, vsigmoid(g, x), "silu");
	case MOE_ACT_RELU:
		return fsel_gt(g, x, vconst(g, 0.0), x, vconst(g, 0.0), "relu");
	case MOE_ACT_GELU: {
		LLVMValueRef e = vlibm(g, "erff", LLVMBuildFMul(b, x, vconst(g, M_SQRT1_2), ""));
		e = LLVMBuildFAdd(b, e, vconst(g, 1.0), "");
		return LLVMBuildFMul(b, LLVMBuildFMul(b, x, vconst(g, 0.5), ""), e, "gelu");
	}
	case MOE_ACT_GELU_TANH: {
		/* tanh(z) = 1 - 2 / (exp(2z) + 1) */
		LLVMValueRef x3 = LLVMBuildFMul(b, LLVMBuildFMul(b, x, x, ""), x, "");
		LLVMValueRef z = fma3(g, x3, vconst(g, 0.044715), x, "");
		z = LLVMBuildFMul(b, z, vconst(g, 2.0 * 0.7978845608028654), "");
		LLVMValueRef e = LLVMBuildFAdd(b, vexp(g, z), vconst(g, 1.0), "");
		LLVMValueRef t = LLVMBuildFSub(b, vconst(g, 1.0),
					       LLVMBuildFDiv(b, vconst(g, 2.0), e, ""), "tanh");
		t = LLVMBuildFAdd(b, t, vconst(g, 1.0), "");
		return LLVMBuildFMul(b, LLVMBuildFMul(b, x, vconst(g, 0.5), ""), t, "gelu_tanh");
	}
	default:
		MOE_ASSERT(0);
	}
	return NULL;
}

/* act(gate) * up for GLU experts; swiglu_oai clamps both halves first. */
static LLVMValueRef vglu(struct cg *g, enum moe_act a, float alpha, float limit, LLVMValueRef gt,
			 LLVMValueRef up)
{
	LLVMBuilderRef b = g->b;
	if (a != MOE_ACT_SWIGLU_OAI)
		return LLVMBuildFMul(b, vact(g, a, gt), up, "glu");
	LLVMValueRef gg = fmin2(g, gt, vconst(g, limit), "g");
	LLVMValueRef u = fmin2(g, up, vconst(g, limit), "");
	u = fmax2(g, u, vconst(g, -limit), "u");
	LLVMValueRef s = vsigmoid(g, LLVMBuildFMul(b, gg, vconst(g, alpha), ""));
	LLVMValueRef t = LLVMBuildFMul(b, gg, s, "");
	return LLVMBuildFMul(b, t, LLVMBuildFAdd(b, u, vconst(g, 1.0), ""), "oai");
}

/* Load 8 weights at element index idx of a panel and widen them to f32. */
static LLVMValueRef load_w8(struct cg *g, LLVMValueRef base, LLVMValueRef idx, const char *name)
{
	LLVMBuilderRef b = g->b;
	switch (g->d->weight_dtype) {
	case MOE_DTYPE_F32:
		return load(g, g->t_v8f, gep(g, g->t_f32, base, idx, ""), name);
	case MOE_DTYPE_BF16: {
		LLVMValueRef v = load(g, g->t_v8i16, gep(g, g->t_i16, base, idx, ""), "");
		v = LLVMBuildZExt(b, v, g->t_v8i32, "");
		v = LLVMBuildShl(b, v, vconst_i32(g, 16), "");
		return LLVMBuildBitCast(b, v, g->t_v8f, name);
	}
	case MOE_DTYPE_F16: {
		LLVMValueRef v = load(g, g->t_v8i16, gep(g, g->t_i16, base, idx, ""), "");
		v = LLVMBuildBitCast(b, v, g->t_v8h, "");
		return LLVMBuildFPExt(b, v, g->t_v8f, name);
	}
	default:
		MOE_ASSERT(0);
	}
	return NULL;
}

/* Load one panel row (16 values at element index idx) as two f32 vectors;
 * want[1] == 0 skips the second. bf16 rows are 8 words of (lane of vector 0,
 * lane of vector 1): a shift and a mask widen them. */
static void load_row16(struct cg *g, LLVMValueRef base, LLVMValueRef idx, LLVMValueRef out[2],
		       int nv)
{
	LLVMBuilderRef b = g->b;
	if (g->d->weight_dtype == MOE_DTYPE_BF16) {
		LLVMValueRef w = load(g, g->t_v8i32, gep(g, g->t_i16, base, idx, ""), "bw");
		out[0] =
		    LLVMBuildBitCast(b, LLVMBuildShl(b, w, vconst_i32(g, 16), ""), g->t_v8f, "b0");
		if (nv > 1)
			out[1] = LLVMBuildBitCast(
			    b, LLVMBuildAnd(b, w, vconst_i32(g, (int32_t)0xffff0000u), ""),
			    g->t_v8f, "b1");
		return;
	}
	out[0] = load_w8(g, base, idx, "b0");
	if (nv > 1)
		out[1] = load_w8(g, base, LLVMBuildNSWAdd(b, idx, ci64(g, MOE_VW), ""), "b1");
}

/* The same panel row as one <16 x float> (AVX-512 targets). */
static LLVMValueRef load_row16w(struct cg *g, LLVMValueRef base, LLVMValueRef idx)
{
	LLVMBuilderRef b = g->b;
	LLVMTypeRef t16 = LLVMVectorType(g->t_f32, 2 * MOE_VW);
	switch (g->d->weight_dtype) {
	case MOE_DTYPE_F32:
		return load(g, t16, gep(g, g->t_f32, base, idx, ""), "w16");
	case MOE_DTYPE_F16: {
		LLVMTypeRef ti = LLVMVectorType(g->t_i16, 2 * MOE_VW);
		LLVMValueRef v = load(g, ti, gep(g, g->t_i16, base, idx, ""), "");
		LLVMSetAlignment(v, 2);
		v = LLVMBuildBitCast(b, v, LLVMVectorType(g->t_half, 2 * MOE_VW), "");
		return LLVMBuildFPExt(b, v, t16, "w16");
	}
	default: {
		LLVMValueRef h[2], m[2 * MOE_VW];
		load_row16(g, base, idx, h, 2);
		for (int i = 0; i < 2 * MOE_VW; i++)
			m[i] = ci32(g, i);
		return LLVMBuildShuffleVector(b, h[0], h[1], LLVMConstVector(m, 2 * MOE_VW), "w16");
	}
	}
}

static LLVMValueRef splat16(struct cg *g, LLVMValueRef s)
{
	LLVMTypeRef t16 = LLVMVectorType(g->t_f32, 2 * MOE_VW);
	LLVMValueRef v = LLVMBuildInsertElement(g->b, LLVMGetPoison(t16), s, ci32(g, 0), "");
	return LLVMBuildShuffleVector(g->b, v, LLVMGetPoison(t16),
				      LLVMConstNull(LLVMVectorType(g->t_i32, 2 * MOE_VW)), "");
}

/* Half h (0: lanes 0..7, 1: lanes 8..15) of a <16 x float>. */
static LLVMValueRef half16(struct cg *g, LLVMValueRef v, int h)
{
	LLVMValueRef m[MOE_VW];
	for (int i = 0; i < MOE_VW; i++)
		m[i] = ci32(g, h * MOE_VW + i);
	return LLVMBuildShuffleVector(g->b, v, LLVMGetPoison(LLVMTypeOf(v)),
				      LLVMConstVector(m, MOE_VW), "");
}

/* The micro-kernels ------------------------------------------------------- */

/* What differs between the routed and the shared FFN. */
struct ffn {
	const struct moe_geom *geom;
	enum moe_act act;
	float alpha, limit;
	int bias;        /* gate/up/down biases present */
	int scale_in;    /* rw scales the input (apply_to input) */
	int scale_out;   /* rw scales the output */
	int down_bias_w; /* the down bias is scaled by rw */
};

/* One up tile of mr rows at row r0 and panel p, K = hidden: the 12 (at
 * mr = 6) accumulators stay in registers across the K loop. */
static void up_tile(struct cg *g, const struct ffn *f, int mr, LLVMValueRef r0, LLVMValueRef p)
{
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	LLVMValueRef x = arg(g, 0), rows = arg(g, 1), rw = arg(g, 2), panels = arg(g, 4);
	LLVMValueRef bg = arg(g, 5), bu = arg(g, 6), h = arg(g, 7);
	LLVMValueRef a_row[MOE_MR], acc[MOE_MR][2];
	LLVMTypeRef t16 = LLVMVectorType(g->t_f32, 2 * MOE_VW);
	/* one row: two 8-lane chains hide the FMA latency better than one */
	int wide = g->wide && mr > 1;
	char nm[32];

	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, ci64(g, r), "");
		LLVMValueRef tok = load(g, g->t_i32, gep(g, g->t_i32, rows, ri, ""), "");
		tok = LLVMBuildSExt(b, tok, g->t_i64, "");
		snprintf(nm, sizeof nm, "a%d", r);
		a_row[r] =
		    gep(g, g->t_f32, x, LLVMBuildNSWMul(b, tok, ci64(g, ge->hidden), ""), nm);
		for (int v = 0; v < 2 - wide; v++) {
			snprintf(nm, sizeof nm, "acc%d%d", r, v);
			acc[r][v] = var(g, wide ? t16 : g->t_v8f, 1, nm);
			store(g, LLVMConstNull(wide ? t16 : g->t_v8f), acc[r][v]);
		}
	}
	LLVMValueRef pbase =
	    LLVMBuildNSWMul(b, p, ci64(g, (int64_t)ge->hidden * MOE_NR), "panel.off");
	struct loop k;
	loop_open(g, &k, ci64(g, 0), ci64(g, ge->hidden), 1, "k");
	LLVMValueRef off =
	    LLVMBuildNSWAdd(b, pbase, LLVMBuildNSWMul(b, k.iv, ci64(g, MOE_NR), ""), "");
	if (wide) {
		LLVMValueRef w = load_row16w(g, panels, off);
		for (int r = 0; r < mr; r++) {
			LLVMValueRef a =
			    load(g, g->t_f32, gep(g, g->t_f32, a_row[r], k.iv, ""), "");
			a = splat16(g, a);
			store(g, fma3(g, a, w, load(g, t16, acc[r][0], ""), ""), acc[r][0]);
		}
	} else {
		LLVMValueRef wv[2];
		load_row16(g, panels, off, wv, 2);
		LLVMValueRef w0 = wv[0], w1 = wv[1];
		for (int r = 0; r < mr; r++) {
			LLVMValueRef a =
			    load(g, g->t_f32, gep(g, g->t_f32, a_row[r], k.iv, ""), "");
			a = splat(g, a, "");
			store(g, fma3(g, a, w0, load(g, g->t_v8f, acc[r][0], ""), ""), acc[r][0]);
			store(g, fma3(g, a, w1, load(g, g->t_v8f, acc[r][1], ""), ""), acc[r][1]);
		}
	}
	loop_close(g, &k);

	/* Epilogue: scale, bias, activation, store to h. */
	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, ci64(g, r), "");
		LLVMValueRef w = NULL;
		if (f->scale_in || f->scale_out)
			w = splat(g, load(g, g->t_f32, gep(g, g->t_f32, rw, ri, ""), "w"), "");
		LLVMValueRef hrow =
		    gep(g, g->t_f32, h, LLVMBuildNSWMul(b, ri, ci64(g, ge->ld_h), ""), "");
		LLVMValueRef c0 = LLVMBuildNSWMul(b, p, ci64(g, ge->up_cols), "col");
		LLVMValueRef v[2];
		for (int j = 0; j < 2; j++) {
			v[j] = wide ? half16(g, load(g, t16, acc[r][0], ""), j)
				    : load(g, g->t_v8f, acc[r][j], "");
			if (f->scale_in)
				v[j] = LLVMBuildFMul(b, v[j], w, "");
		}
		if (ge->glu) {
			if (f->bias) {
				v[0] = LLVMBuildFAdd(
				    b, v[0], load(g, g->t_v8f, gep(g, g->t_f32, bg, c0, ""), ""),
				    "");
				v[1] = LLVMBuildFAdd(
				    b, v[1], load(g, g->t_v8f, gep(g, g->t_f32, bu, c0, ""), ""),
				    "");
			}
			LLVMValueRef o = vglu(g, f->act, f->alpha, f->limit, v[0], v[1]);
			if (f->scale_out)
				o = LLVMBuildFMul(b, o, w, "");
			store(g, o, gep(g, g->t_f32, hrow, c0, ""));
		} else {
			for (int j = 0; j < 2; j++) {
				LLVMValueRef c = LLVMBuildNSWAdd(b, c0, ci64(g, j * MOE_VW), "");
				if (f->bias)
					v[j] = LLVMBuildFAdd(
					    b, v[j],
					    load(g, g->t_v8f, gep(g, g->t_f32, bu, c, ""), ""), "");
				LLVMValueRef o = vact(g, f->act, v[j]);
				if (f->scale_out)
					o = LLVMBuildFMul(b, o, w, "");
				store(g, o, gep(g, g->t_f32, hrow, c, ""));
			}
		}
	}
}

/* Constant <8 x i1> mask of lanes [0, n). */
static LLVMValueRef lane_mask(struct cg *g, int n)
{
	LLVMValueRef e[MOE_VW];
	for (int i = 0; i < MOE_VW; i++)
		e[i] = LLVMConstInt(g->t_i1, i < n, 0);
	return LLVMConstVector(e, MOE_VW);
}

static LLVMValueRef vload_cols(struct cg *g, LLVMValueRef ptr, int n, const char *name)
{
	if (n == MOE_VW)
		return load(g, g->t_v8f, ptr, name);
	LLVMTypeRef tys[2] = {g->t_v8f, g->t_ptr};
	LLVMValueRef args[4] = {ptr, ci32(g, 4), lane_mask(g, n), vconst(g, 0.0)};
	return call_intr(g, "llvm.masked.load", tys, 2, args, 4, name);
}

static void vstore_cols(struct cg *g, LLVMValueRef v, LLVMValueRef ptr, int n)
{
	if (n == MOE_VW) {
		store(g, v, ptr);
		return;
	}
	LLVMTypeRef tys[2] = {g->t_v8f, g->t_ptr};
	LLVMValueRef args[4] = {v, ptr, ci32(g, 4), lane_mask(g, n)};
	call_intr(g, "llvm.masked.store", tys, 2, args, 4, "");
}

/* One down tile of mr rows at row r0 and panel p, K = width, accumulating
 * into y; ncols < 16 for the last panel of a hidden size that is not a
 * multiple of 16. */
static void down_tile(struct cg *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
		      LLVMValueRef p)
{
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	LLVMValueRef hbuf = arg(g, 0), rows = arg(g, 1), rw = arg(g, 2), panels = arg(g, 4);
	LLVMValueRef bd = arg(g, 5), y = arg(g, 6);
	int nv = ncols > MOE_VW ? 2 : 1;
	int lanes[2] = {ncols > MOE_VW ? MOE_VW : ncols, ncols - MOE_VW};
	int wide = g->wide && ncols == MOE_NR && mr > 1;
	LLVMTypeRef t16 = LLVMVectorType(g->t_f32, 2 * MOE_VW);
	LLVMValueRef a_row[MOE_MR], y_ptr[MOE_MR][2], acc[MOE_MR][2];
	char nm[32];
	LLVMValueRef c0 = LLVMBuildNSWMul(b, p, ci64(g, MOE_NR), "col");

	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, ci64(g, r), "");
		snprintf(nm, sizeof nm, "h%d", r);
		a_row[r] =
		    gep(g, g->t_f32, hbuf, LLVMBuildNSWMul(b, ri, ci64(g, ge->ld_h), ""), nm);
		LLVMValueRef tok = load(g, g->t_i32, gep(g, g->t_i32, rows, ri, ""), "");
		tok = LLVMBuildSExt(b, tok, g->t_i64, "");
		LLVMValueRef yrow =
		    gep(g, g->t_f32, y, LLVMBuildNSWMul(b, tok, ci64(g, ge->hidden), ""), "");
		for (int v = 0; v < nv; v++) {
			snprintf(nm, sizeof nm, "y%d%d", r, v);
			y_ptr[r][v] = gep(g, g->t_f32, yrow,
					  LLVMBuildNSWAdd(b, c0, ci64(g, v * MOE_VW), ""), nm);
			if (wide && v)
				continue;
			snprintf(nm, sizeof nm, "acc%d%d", r, v);
			acc[r][v] = var(g, wide ? t16 : g->t_v8f, 1, nm);
			store(g,
			      wide ? load(g, t16, y_ptr[r][0], "")
				   : vload_cols(g, y_ptr[r][v], lanes[v], ""),
			      acc[r][v]);
		}
	}
	LLVMValueRef pbase =
	    LLVMBuildNSWMul(b, p, ci64(g, (int64_t)ge->width * MOE_NR), "panel.off");
	struct loop k;
	loop_open(g, &k, ci64(g, 0), ci64(g, ge->width), 1, "k");
	LLVMValueRef off =
	    LLVMBuildNSWAdd(b, pbase, LLVMBuildNSWMul(b, k.iv, ci64(g, MOE_NR), ""), "");
	LLVMValueRef wv[2];
	if (wide)
		wv[0] = load_row16w(g, panels, off);
	else
		load_row16(g, panels, off, wv, nv);
	for (int r = 0; r < mr; r++) {
		LLVMValueRef a = load(g, g->t_f32, gep(g, g->t_f32, a_row[r], k.iv, ""), "");
		if (wide) {
			store(g, fma3(g, splat16(g, a), wv[0], load(g, t16, acc[r][0], ""), ""),
			      acc[r][0]);
			continue;
		}
		a = splat(g, a, "");
		for (int v = 0; v < nv; v++)
			store(g, fma3(g, a, wv[v], load(g, g->t_v8f, acc[r][v], ""), ""),
			      acc[r][v]);
	}
	loop_close(g, &k);

	for (int r = 0; r < mr; r++) {
		LLVMValueRef w = NULL;
		if (f->bias && f->down_bias_w) {
			LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, ci64(g, r), "");
			w = splat(g, load(g, g->t_f32, gep(g, g->t_f32, rw, ri, ""), "w"), "");
		}
		for (int v = 0; v < nv; v++) {
			LLVMValueRef o = wide ? half16(g, load(g, t16, acc[r][0], ""), v)
					      : load(g, g->t_v8f, acc[r][v], "");
			if (f->bias) {
				LLVMValueRef c = LLVMBuildNSWAdd(b, c0, ci64(g, v * MOE_VW), "");
				LLVMValueRef bv =
				    load(g, g->t_v8f, gep(g, g->t_f32, bd, c, ""), "bd");
				if (w)
					bv = LLVMBuildFMul(b, bv, w, "");
				o = LLVMBuildFAdd(b, o, bv, "");
			}
			vstore_cols(g, o, y_ptr[r][v], lanes[v]);
		}
	}
}

/* Loop over row blocks of MOE_MR, dispatching the remainder to a tile
 * specialized for its row count. */
typedef void tile_fn(struct cg *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
		     LLVMValueRef p);

static void up_tile_adapter(struct cg *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
			    LLVMValueRef p)
{
	(void)ncols;
	up_tile(g, f, mr, r0, p);
}

static void row_blocks(struct cg *g, const struct ffn *f, tile_fn *tile, int ncols, LLVMValueRef p,
		       LLVMValueRef n)
{
	LLVMBuilderRef b = g->b;
	struct loop r;
	char nm[32];
	loop_open(g, &r, ci64(g, 0), n, MOE_MR, "r0");
	LLVMValueRef left = LLVMBuildNSWSub(b, n, r.iv, "left");
	LLVMValueRef full = LLVMBuildICmp(b, LLVMIntSGE, left, ci64(g, MOE_MR), "");
	LLVMValueRef mr = LLVMBuildSelect(b, full, ci64(g, MOE_MR), left, "mr");
	LLVMBasicBlockRef done = block(g, "tile.done");
	LLVMBasicBlockRef cases[MOE_MR + 1];
	for (int m = 1; m <= MOE_MR; m++) {
		snprintf(nm, sizeof nm, "tile.mr%d", m);
		cases[m] = block(g, nm);
	}
	LLVMValueRef sw = LLVMBuildSwitch(b, mr, cases[MOE_MR], MOE_MR - 1);
	for (int m = 1; m < MOE_MR; m++)
		LLVMAddCase(sw, ci64(g, m), cases[m]);
	LLVMBasicBlockRef after = cases[MOE_MR];
	for (int m = MOE_MR; m >= 1; m--) {
		LLVMPositionBuilderAtEnd(b, cases[m]);
		tile(g, f, m, ncols, r.iv, p);
		LLVMBuildBr(b, done);
		if (m != MOE_MR) {
			LLVMMoveBasicBlockAfter(cases[m], after);
		}
		after = LLVMGetInsertBlock(b);
	}
	LLVMMoveBasicBlockAfter(done, after);
	LLVMPositionBuilderAtEnd(b, done);
	loop_close(g, &r);
}

static void gen_up(struct cg *g, const char *name, const struct ffn *f)
{
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, P, I, P, P, P, P, I, I};
	static const char *const pn[] = {"x",  "rows", "rw", "n",  "panels",
					 "bg", "bu",   "h",  "p0", "p1"};
	LLVMValueRef fnv = fn_open(g, name, params, pn, 10);
	for (unsigned i = 0; i < 8; i++)
		if (i != 3)
			attr(g, fnv, i + 1, "noalias");
	struct loop p;
	loop_open(g, &p, arg(g, 8), arg(g, 9), 1, "p");
	row_blocks(g, f, up_tile_adapter, MOE_NR, p.iv, arg(g, 3));
	loop_close(g, &p);
	fn_close(g);
}

static void gen_down(struct cg *g, const char *name, const struct ffn *f)
{
	LLVMBuilderRef b = g->b;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, P, I, P, P, P, I, I};
	static const char *const pn[] = {"h", "rows", "rw", "n", "panels", "bd", "y", "p0", "p1"};
	LLVMValueRef fnv = fn_open(g, name, params, pn, 9);
	for (unsigned i = 0; i < 7; i++)
		if (i != 3)
			attr(g, fnv, i + 1, "noalias");
	const struct moe_geom *ge = f->geom;
	int last = (int)(ge->hidden - (ge->down_panels - 1) * MOE_NR);
	int64_t n_full = last == MOE_NR ? ge->down_panels : ge->down_panels - 1;
	LLVMValueRef p0 = arg(g, 7), p1 = arg(g, 8);
	LLVMValueRef end = LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, p1, ci64(g, n_full), ""),
					   p1, ci64(g, n_full), "end");
	struct loop p;
	loop_open(g, &p, p0, end, 1, "p");
	row_blocks(g, f, down_tile, MOE_NR, p.iv, arg(g, 3));
	loop_close(g, &p);
	if (n_full != ge->down_panels) {
		/* the partial last panel: masked loads and stores of y */
		LLVMValueRef in =
		    LLVMBuildAnd(b, LLVMBuildICmp(b, LLVMIntSLE, p0, ci64(g, n_full), ""),
				 LLVMBuildICmp(b, LLVMIntSGT, p1, ci64(g, n_full), ""), "has_last");
		LLVMBasicBlockRef e = if_open(g, in, "last");
		row_blocks(g, f, down_tile, last, ci64(g, n_full), arg(g, 3));
		if_close(g, e);
	}
	fn_close(g);
}

/* The router ------------------------------------------------------------- */

/* logits[t, e] for router panel blocks [pb0, pb0 + nb): nb independent
 * accumulation chains so the adds overlap; each lane sums x[h] * W[e, h] in
 * order h = 0..H-1 (multiply then add, no contraction), the same arithmetic
 * as a plain C loop. */
static void route_logits_block(struct cg *g, LLVMValueRef xrow, LLVMValueRef wr, LLVMValueRef l,
			       LLVMValueRef pb0, int nb)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden;
	LLVMValueRef acc[8];
	char nm[32];
	for (int j = 0; j < nb; j++) {
		snprintf(nm, sizeof nm, "lacc%d", j);
		acc[j] = var(g, g->t_v8f, 1, nm);
		store(g, vconst(g, 0.0), acc[j]);
	}
	struct loop h;
	loop_open(g, &h, ci64(g, 0), ci64(g, H), 1, "hh");
	LLVMValueRef a = splat(g, load(g, g->t_f32, gep(g, g->t_f32, xrow, h.iv, ""), "xh"), "");
	for (int j = 0; j < nb; j++) {
		LLVMValueRef pb = LLVMBuildNSWAdd(b, pb0, ci64(g, j), "");
		LLVMValueRef off = LLVMBuildNSWMul(b, pb, ci64(g, (int64_t)H * MOE_RB), "");
		off = LLVMBuildNSWAdd(b, off, LLVMBuildNSWMul(b, h.iv, ci64(g, MOE_RB), ""), "");
		LLVMValueRef w = load(g, g->t_v8f, gep(g, g->t_f32, wr, off, ""), "wr");
		LLVMValueRef m = LLVMBuildFMul(b, a, w, "");
		store(g, LLVMBuildFAdd(b, load(g, g->t_v8f, acc[j], ""), m, ""), acc[j]);
	}
	loop_close(g, &h);
	for (int j = 0; j < nb; j++) {
		LLVMValueRef pb = LLVMBuildNSWAdd(b, pb0, ci64(g, j), "");
		LLVMValueRef dst =
		    gep(g, g->t_f32, l, LLVMBuildNSWMul(b, pb, ci64(g, MOE_RB), ""), "");
		store(g, load(g, g->t_v8f, acc[j], ""), dst);
	}
}

/* top-n of score[0..n) (ties: the lower index), marking chosen entries in
 * taken[] (i8) and calling emit(j, idx) for rank j. */
typedef void topk_emit(struct cg *g, void *ctx, LLVMValueRef j, LLVMValueRef idx);

static void gen_topk(struct cg *g, LLVMValueRef score, LLVMValueRef taken, uint32_t n, uint32_t k,
		     topk_emit *emit, void *ctx, const char *name)
{
	LLVMBuilderRef b = g->b;
	char nm[48];
	struct loop e0;
	snprintf(nm, sizeof nm, "%s.clr", name);
	loop_open(g, &e0, ci64(g, 0), ci64(g, n), 1, nm);
	store(g, LLVMConstInt(g->t_i8, 0, 0), gep(g, g->t_i8, taken, e0.iv, ""));
	loop_close(g, &e0);
	LLVMValueRef best = var(g, g->t_i64, 1, "best");
	LLVMValueRef bestv = var(g, g->t_f32, 1, "bestv");
	struct loop j, e;
	snprintf(nm, sizeof nm, "%s.j", name);
	loop_open(g, &j, ci64(g, 0), ci64(g, k), 1, nm);
	store(g, ci64(g, -1), best);
	store(g, cf32(g, -INFINITY), bestv);
	snprintf(nm, sizeof nm, "%s.e", name);
	loop_open(g, &e, ci64(g, 0), ci64(g, n), 1, nm);
	LLVMValueRef v = load(g, g->t_f32, gep(g, g->t_f32, score, e.iv, ""), "s");
	LLVMValueRef tk = load(g, g->t_i8, gep(g, g->t_i8, taken, e.iv, ""), "");
	LLVMValueRef free_ = LLVMBuildICmp(b, LLVMIntEQ, tk, LLVMConstInt(g->t_i8, 0, 0), "");
	LLVMValueRef bi = load(g, g->t_i64, best, "");
	LLVMValueRef none = LLVMBuildICmp(b, LLVMIntSLT, bi, ci64(g, 0), "");
	LLVMValueRef gt = LLVMBuildFCmp(b, LLVMRealOGT, v, load(g, g->t_f32, bestv, ""), "");
	LLVMValueRef take = LLVMBuildAnd(b, free_, LLVMBuildOr(b, none, gt, ""), "take");
	store(g, LLVMBuildSelect(b, take, e.iv, bi, ""), best);
	store(g, LLVMBuildSelect(b, take, v, load(g, g->t_f32, bestv, ""), ""), bestv);
	loop_close(g, &e);
	LLVMValueRef bi2 = load(g, g->t_i64, best, "chosen");
	store(g, LLVMConstInt(g->t_i8, 1, 0), gep(g, g->t_i8, taken, bi2, ""));
	emit(g, ctx, j.iv, bi2);
	loop_close(g, &j);
}

struct route_ctx {
	LLVMValueRef s, ids_row, w_row, gsel;
};

static void emit_expert(struct cg *g, void *vctx, LLVMValueRef j, LLVMValueRef idx)
{
	struct route_ctx *c = vctx;
	LLVMValueRef i32 = LLVMBuildTrunc(g->b, idx, g->t_i32, "");
	store(g, i32, gep(g, g->t_i32, c->ids_row, j, ""));
	LLVMValueRef sv = load(g, g->t_f32, gep(g, g->t_f32, c->s, idx, ""), "");
	store(g, sv, gep(g, g->t_f32, c->w_row, j, ""));
}

static void emit_group(struct cg *g, void *vctx, LLVMValueRef j, LLVMValueRef idx)
{
	struct route_ctx *c = vctx;
	(void)j;
	store(g, LLVMConstInt(g->t_i8, 1, 0), gep(g, g->t_i8, c->gsel, idx, ""));
}

/* score[e] = f(l[e]), with the reference's formulas: exp in double rounded
 * to f32, the softmax sum in f32 in index order. */
static void gen_score(struct cg *g, LLVMValueRef l, LLVMValueRef s)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts;
	LLVMTypeRef dt = LLVMDoubleTypeInContext(g->ctx);
	struct loop e;
	if (d->score == MOE_SCORE_SOFTMAX) {
		LLVMValueRef m = var(g, g->t_f32, 1, "lmax");
		store(g, cf32(g, -INFINITY), m);
		loop_open(g, &e, ci64(g, 0), ci64(g, E), 1, "smax");
		LLVMValueRef v = load(g, g->t_f32, gep(g, g->t_f32, l, e.iv, ""), "");
		store(g, fmax2(g, v, load(g, g->t_f32, m, ""), ""), m);
		loop_close(g, &e);
		LLVMValueRef mx = load(g, g->t_f32, m, "max");
		LLVMValueRef sum = var(g, g->t_f32, 1, "sum");
		store(g, cf32(g, 0.0), sum);
		loop_open(g, &e, ci64(g, 0), ci64(g, E), 1, "sexp");
		v = load(g, g->t_f32, gep(g, g->t_f32, l, e.iv, ""), "");
		LLVMValueRef ex = libm_d(g, "exp", LLVMBuildFSub(b, v, mx, ""), "");
		ex = LLVMBuildFPTrunc(b, ex, g->t_f32, "ex");
		store(g, ex, gep(g, g->t_f32, s, e.iv, ""));
		store(g, LLVMBuildFAdd(b, load(g, g->t_f32, sum, ""), ex, ""), sum);
		loop_close(g, &e);
		LLVMValueRef tot = load(g, g->t_f32, sum, "total");
		loop_open(g, &e, ci64(g, 0), ci64(g, E), 1, "sdiv");
		LLVMValueRef ps = gep(g, g->t_f32, s, e.iv, "");
		store(g, LLVMBuildFDiv(b, load(g, g->t_f32, ps, ""), tot, ""), ps);
		loop_close(g, &e);
		return;
	}
	loop_open(g, &e, ci64(g, 0), ci64(g, E), 1, "score");
	LLVMValueRef v = load(g, g->t_f32, gep(g, g->t_f32, l, e.iv, ""), "l");
	LLVMValueRef vd = LLVMBuildFPExt(b, v, dt, "");
	LLVMValueRef one = LLVMConstReal(dt, 1.0), o;
	if (d->score == MOE_SCORE_SIGMOID) {
		LLVMValueRef ex = libm_d(g, "exp", LLVMBuildFNeg(b, vd, ""), "");
		o = LLVMBuildFDiv(b, one, LLVMBuildFAdd(b, one, ex, ""), "");
		o = LLVMBuildFPTrunc(b, o, g->t_f32, "sig");
	} else {
		/* sqrt(softplus(l)), softplus(l) = l above 20 */
		LLVMValueRef sp = libm_d(g, "log1p", libm_d(g, "exp", vd, ""), "");
		sp = fsel_gt(g, vd, LLVMConstReal(dt, 20.0), vd, sp, "");
		sp = LLVMBuildFPTrunc(b, sp, g->t_f32, "softplus");
		sp = LLVMBuildFPExt(b, sp, dt, "");
		o = LLVMBuildFPTrunc(b, unary_intr(g, "llvm.sqrt", sp, ""), g->t_f32, "ssp");
	}
	store(g, o, gep(g, g->t_f32, s, e.iv, ""));
	loop_close(g, &e);
}

/* Group-limited routing: mask (-inf) the selection scores of every expert
 * outside the group_top best groups. */
static void gen_groups(struct cg *g, LLVMValueRef c, LLVMValueRef gs, LLVMValueRef gsel,
		       LLVMValueRef gtaken)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t G = d->n_groups, Eg = d->n_experts / G;
	LLVMValueRef m1 = var(g, g->t_f32, 1, "m1"), m2 = var(g, g->t_f32, 1, "m2");
	struct loop gr, i;
	loop_open(g, &gr, ci64(g, 0), ci64(g, G), 1, "grp");
	LLVMValueRef base = LLVMBuildNSWMul(b, gr.iv, ci64(g, Eg), "gbase");
	store(g, cf32(g, -INFINITY), m1);
	store(g, cf32(g, -INFINITY), m2);
	loop_open(g, &i, ci64(g, 0), ci64(g, Eg), 1, "gi");
	LLVMValueRef v =
	    load(g, g->t_f32, gep(g, g->t_f32, c, LLVMBuildNSWAdd(b, base, i.iv, ""), ""), "c");
	LLVMValueRef a = load(g, g->t_f32, m1, ""), bb = load(g, g->t_f32, m2, "");
	LLVMValueRef gt1 = LLVMBuildFCmp(b, LLVMRealOGT, v, a, "");
	LLVMValueRef n2 = LLVMBuildSelect(b, gt1, a, fmax2(g, v, bb, ""), "");
	store(g, LLVMBuildSelect(b, gt1, v, a, ""), m1);
	store(g, n2, m2);
	loop_close(g, &i);
	LLVMValueRef sc = load(g, g->t_f32, m1, "");
	if (d->group_score == MOE_GROUP_SCORE_SUM_TOP2 && Eg > 1)
		sc = LLVMBuildFAdd(b, sc, load(g, g->t_f32, m2, ""), "top2");
	store(g, sc, gep(g, g->t_f32, gs, gr.iv, ""));
	store(g, LLVMConstInt(g->t_i8, 0, 0), gep(g, g->t_i8, gsel, gr.iv, ""));
	loop_close(g, &gr);

	struct route_ctx rc = {.gsel = gsel};
	gen_topk(g, gs, gtaken, G, d->group_top, emit_group, &rc, "gtop");

	loop_open(g, &gr, ci64(g, 0), ci64(g, G), 1, "gmask");
	LLVMValueRef sel = load(g, g->t_i8, gep(g, g->t_i8, gsel, gr.iv, ""), "");
	LLVMValueRef off = LLVMBuildICmp(b, LLVMIntEQ, sel, LLVMConstInt(g->t_i8, 0, 0), "");
	base = LLVMBuildNSWMul(b, gr.iv, ci64(g, Eg), "");
	loop_open(g, &i, ci64(g, 0), ci64(g, Eg), 1, "gm");
	LLVMValueRef pc = gep(g, g->t_f32, c, LLVMBuildNSWAdd(b, base, i.iv, ""), "");
	store(g, LLVMBuildSelect(b, off, cf32(g, -INFINITY), load(g, g->t_f32, pc, ""), ""), pc);
	loop_close(g, &i);
	loop_close(g, &gr);
}

/* Normalize and scale the n weights of one token: w /= max(S + eps, min)
 * (left alone when that is not positive), then w *= scale. */
static void gen_normalize(struct cg *g, LLVMValueRef w, uint32_t n)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	LLVMTypeRef dt = LLVMDoubleTypeInContext(g->ctx);
	struct loop j;
	if (d->norm != MOE_NORM_NONE) {
		int lp = d->norm == MOE_NORM_LP;
		LLVMTypeRef at = lp ? dt : g->t_f32;
		LLVMValueRef sum = var(g, at, 1, "wsum");
		store(g, LLVMConstReal(at, 0.0), sum);
		loop_open(g, &j, ci64(g, 0), ci64(g, n), 1, "nsum");
		LLVMValueRef v = load(g, g->t_f32, gep(g, g->t_f32, w, j.iv, ""), "");
		if (lp) {
			v = unary_intr(g, "llvm.fabs", LLVMBuildFPExt(b, v, dt, ""), "");
			LLVMValueRef args[2] = {v, LLVMConstReal(dt, d->norm_p)};
			v = call_intr(g, "llvm.pow", &dt, 1, args, 2, "");
		}
		LLVMValueRef acc = LLVMBuildFAdd(b, load(g, at, sum, ""), v, "");
		LLVMSetAlignment(LLVMBuildStore(b, acc, sum), lp ? 8 : 4);
		loop_close(g, &j);
		LLVMValueRef den = LLVMBuildLoad2(b, at, sum, "");
		LLVMSetAlignment(den, lp ? 8 : 4);
		if (lp) {
			LLVMValueRef args[2] = {den, LLVMConstReal(dt, 1.0 / (double)d->norm_p)};
			den = call_intr(g, "llvm.pow", &dt, 1, args, 2, "");
			den = LLVMBuildFPTrunc(b, den, g->t_f32, "");
		}
		den = LLVMBuildFAdd(b, den, cf32(g, d->norm_eps), "");
		den = fmax2(g, den, cf32(g, d->norm_min), "den");
		LLVMValueRef pos = LLVMBuildFCmp(b, LLVMRealOGT, den, cf32(g, 0.0), "");
		den = LLVMBuildSelect(b, pos, den, cf32(g, 1.0), "");
		loop_open(g, &j, ci64(g, 0), ci64(g, n), 1, "ndiv");
		LLVMValueRef pw = gep(g, g->t_f32, w, j.iv, "");
		store(g, LLVMBuildFDiv(b, load(g, g->t_f32, pw, ""), den, ""), pw);
		loop_close(g, &j);
	}
	if (d->scale != 1.0f) {
		loop_open(g, &j, ci64(g, 0), ci64(g, n), 1, "nscale");
		LLVMValueRef pw = gep(g, g->t_f32, w, j.iv, "");
		store(g, LLVMBuildFMul(b, load(g, g->t_f32, pw, ""), cf32(g, d->scale), ""), pw);
		loop_close(g, &j);
	}
}

/* Top-p: of the n ranked slots keep the fewest whose weights (the softmax
 * probabilities), summed in f32 in rank order, reach top_p; the rest become
 * id -1, weight 0. Branch-free: a running flag selects. */
static void gen_top_p_cut(struct cg *g, LLVMValueRef ids, LLVMValueRef w, uint32_t n)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef cum = var(g, g->t_f32, 1, "cum"), done = var(g, g->t_i8, 1, "done");
	store(g, cf32(g, 0.0), cum);
	store(g, LLVMConstInt(g->t_i8, 0, 0), done);
	struct loop j;
	loop_open(g, &j, ci64(g, 0), ci64(g, n), 1, "topp");
	LLVMValueRef pw = gep(g, g->t_f32, w, j.iv, ""), pi = gep(g, g->t_i32, ids, j.iv, "");
	LLVMValueRef dn = LLVMBuildICmp(b, LLVMIntNE, load(g, g->t_i8, done, ""),
					LLVMConstInt(g->t_i8, 0, 0), "dn");
	LLVMValueRef wv = load(g, g->t_f32, pw, ""), c0 = load(g, g->t_f32, cum, "");
	LLVMValueRef c = LLVMBuildFAdd(b, c0, wv, "c");
	store(g, LLVMBuildSelect(b, dn, c0, c, ""), cum);
	store(g, LLVMBuildSelect(b, dn, ci32(g, -1), load(g, g->t_i32, pi, ""), ""), pi);
	store(g, LLVMBuildSelect(b, dn, cf32(g, 0.0), wv, ""), pw);
	LLVMValueRef reach = LLVMBuildFCmp(b, LLVMRealOGE, c, cf32(g, g->d->top_p), "reach");
	store(g, LLVMBuildZExt(b, LLVMBuildOr(b, dn, reach, ""), g->t_i8, ""), done);
	loop_close(g, &j);
}

static void gen_route(struct cg *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, H = d->hidden, W = g->p->route_width;
	uint32_t nblk = moe_router_blocks(E);
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, I, I, P, P, P, P, P, P, P, P, P};
	static const char *const pn[] = {
	    "x",      "t0",  "t1",      "router", "router_bias", "select_bias", "shared_gate_w",
	    "logits", "ids", "weights", "sgate",  "prio"};
	fn_open(g, "moe_route", params, pn, 12);
	LLVMValueRef x = arg(g, 0), wr = arg(g, 3), br = arg(g, 4), bs = arg(g, 5);
	LLVMValueRef wsg = arg(g, 6), logits = arg(g, 7), ids = arg(g, 8), wts = arg(g, 9);
	LLVMValueRef sg = arg(g, 10);
	LLVMValueRef l = var(g, g->t_f32, (uint64_t)nblk * MOE_RB, "l");
	LLVMValueRef s = var(g, g->t_f32, E, "s");
	LLVMValueRef c = var(g, g->t_f32, E, "c");
	LLVMValueRef taken = var(g, g->t_i8, E, "taken");

	struct loop t, e;
	loop_open(g, &t, arg(g, 1), arg(g, 2), 1, "t");
	LLVMValueRef xrow = gep(g, g->t_f32, x, LLVMBuildNSWMul(b, t.iv, ci64(g, H), ""), "xrow");

	/* logits, 8 router panels (64 experts) at a time */
	uint32_t nfull = nblk / 8, rem = nblk % 8;
	if (nfull) {
		struct loop pb;
		loop_open(g, &pb, ci64(g, 0), ci64(g, (int64_t)nfull * 8), 8, "pb");
		route_logits_block(g, xrow, wr, l, pb.iv, 8);
		loop_close(g, &pb);
	}
	if (rem)
		route_logits_block(g, xrow, wr, l, ci64(g, (int64_t)nfull * 8), (int)rem);

	LLVMValueRef lrow =
	    gep(g, g->t_f32, logits, LLVMBuildNSWMul(b, t.iv, ci64(g, E), ""), "lrow");
	loop_open(g, &e, ci64(g, 0), ci64(g, E), 1, "lb");
	LLVMValueRef pl = gep(g, g->t_f32, l, e.iv, "");
	LLVMValueRef v = load(g, g->t_f32, pl, "");
	if (d->router_bias) {
		v = LLVMBuildFAdd(b, v, load(g, g->t_f32, gep(g, g->t_f32, br, e.iv, ""), ""), "");
		store(g, v, pl);
	}
	store(g, v, gep(g, g->t_f32, lrow, e.iv, ""));
	loop_close(g, &e);

	gen_score(g, l, s);

	LLVMValueRef woff = LLVMBuildNSWMul(b, t.iv, ci64(g, W), "");
	struct route_ctx rc = {.s = s,
			       .ids_row = gep(g, g->t_i32, ids, woff, "ids_row"),
			       .w_row = gep(g, g->t_f32, wts, woff, "w_row")};
	if (d->mode == MOE_MODE_DENSE) {
		loop_open(g, &e, ci64(g, 0), ci64(g, E), 1, "dense");
		emit_expert(g, &rc, e.iv, e.iv);
		loop_close(g, &e);
	} else {
		/* selection scores: + selection bias, group mask */
		loop_open(g, &e, ci64(g, 0), ci64(g, E), 1, "sel");
		LLVMValueRef sv = load(g, g->t_f32, gep(g, g->t_f32, s, e.iv, ""), "");
		if (d->select_bias)
			sv = LLVMBuildFAdd(
			    b, sv, load(g, g->t_f32, gep(g, g->t_f32, bs, e.iv, ""), ""), "");
		store(g, sv, gep(g, g->t_f32, c, e.iv, ""));
		loop_close(g, &e);
		if (d->n_groups > 1) {
			LLVMValueRef gs = var(g, g->t_f32, d->n_groups, "gscore");
			LLVMValueRef gsel = var(g, g->t_i8, d->n_groups, "gsel");
			LLVMValueRef gtk = var(g, g->t_i8, d->n_groups, "gtaken");
			gen_groups(g, c, gs, gsel, gtk);
		}
		gen_topk(g, c, taken, E, d->top_k, emit_expert, &rc, "top");
		if (d->mode == MOE_MODE_TOP_P)
			gen_top_p_cut(g, rc.ids_row, rc.w_row, W);
		LLVMValueRef first = load(g, g->t_i32, rc.ids_row, "first");
		first = LLVMBuildSExt(b, first, g->t_i64, "");
		LLVMValueRef pv = load(g, g->t_f32, gep(g, g->t_f32, c, first, ""), "prio");
		store(g, pv, gep(g, g->t_f32, arg(g, 11), t.iv, ""));
	}
	gen_normalize(g, rc.w_row, W);

	if (d->shared_count && d->shared_gate == MOE_SHARED_GATE_SIGMOID) {
		LLVMValueRef z = var(g, g->t_f32, 1, "z");
		store(g, cf32(g, 0.0), z);
		struct loop h;
		loop_open(g, &h, ci64(g, 0), ci64(g, H), 1, "sgh");
		LLVMValueRef m =
		    LLVMBuildFMul(b, load(g, g->t_f32, gep(g, g->t_f32, xrow, h.iv, ""), ""),
				  load(g, g->t_f32, gep(g, g->t_f32, wsg, h.iv, ""), ""), "");
		store(g, LLVMBuildFAdd(b, load(g, g->t_f32, z, ""), m, ""), z);
		loop_close(g, &h);
		LLVMValueRef ex =
		    libm(g, "expf", LLVMBuildFNeg(b, load(g, g->t_f32, z, ""), ""), "");
		LLVMValueRef o =
		    LLVMBuildFDiv(b, cf32(g, 1.0), LLVMBuildFAdd(b, cf32(g, 1.0), ex, ""), "");
		store(g, o, gep(g, g->t_f32, sg, t.iv, ""));
	}
	loop_close(g, &t);
	fn_close(g);
}

/* Constants and the table ------------------------------------------------- */

static LLVMValueRef cstring(struct cg *g, const char *name, const char *s)
{
	LLVMValueRef init = LLVMConstStringInContext2(g->ctx, s, strlen(s), 0);
	LLVMValueRef gv = LLVMAddGlobal(g->mod, LLVMTypeOf(init), name);
	LLVMSetInitializer(gv, init);
	LLVMSetGlobalConstant(gv, 1);
	LLVMSetLinkage(gv, LLVMPrivateLinkage);
	LLVMSetUnnamedAddress(gv, LLVMGlobalUnnamedAddr);
	return gv;
}

/* The moe_gen table (moe_kernels.h): the description, the plan's op list and
 * the kernels, indexed by enum moe_kernel. */
static void gen_table(struct cg *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	const struct moe_desc *d = g->d;
	const struct moe_plan *p = g->p;
	/* The description as bytes: plain data by design (moe_desc.h). */
	LLVMValueRef dinit = LLVMConstStringInContext2(g->ctx, (const char *)d, sizeof *d, 1);
	LLVMValueRef dgv = LLVMAddGlobal(g->mod, LLVMTypeOf(dinit), "moe_gen_desc");
	LLVMSetInitializer(dgv, dinit);
	LLVMSetGlobalConstant(dgv, 1);
	LLVMSetLinkage(dgv, LLVMPrivateLinkage);
	LLVMSetAlignment(dgv, 16);

	uint8_t ops[MOE_MAX_OPS];
	for (uint32_t i = 0; i < p->n_ops; i++)
		ops[i] = (uint8_t)p->ops[i].op;
	LLVMValueRef oinit = LLVMConstStringInContext2(g->ctx, (const char *)ops, p->n_ops, 1);
	LLVMValueRef ogv = LLVMAddGlobal(g->mod, LLVMTypeOf(oinit), "moe_gen_ops");
	LLVMSetInitializer(ogv, oinit);
	LLVMSetGlobalConstant(ogv, 1);
	LLVMSetLinkage(ogv, LLVMPrivateLinkage);

	LLVMValueRef null = LLVMConstNull(g->t_ptr), kv[MOE_KERNEL_COUNT];
	for (int i = 0; i < MOE_KERNEL_COUNT; i++)
		kv[i] = k[i] ? k[i] : null;
	char hash[65];
	moe_desc_hash(d, hash);
	LLVMValueRef vals[] = {
	    ci32(g, MOE_KERNELS_ABI),
	    ci32(g, (int32_t)sizeof *d),
	    dgv,
	    cstring(g, "moe_gen_hash", hash),
	    cstring(g, "moe_gen_cpu", g->cpu_name),
	    cstring(g, "moe_gen_triple", g->triple),
	    ci32(g, (int32_t)p->n_ops),
	    ogv,
	    LLVMConstArray2(g->t_ptr, kv, MOE_KERNEL_COUNT),
	};
	LLVMValueRef init = LLVMConstStructInContext(g->ctx, vals, sizeof vals / sizeof *vals, 0);
	LLVMValueRef gv = LLVMAddGlobal(g->mod, LLVMTypeOf(init), "moe_gen_model");
	LLVMSetInitializer(gv, init);
	LLVMSetGlobalConstant(gv, 1);
	LLVMSetVisibility(gv, LLVMHiddenVisibility);
	LLVMSetAlignment(gv, 8);
}

/* The router emitters, one per mode family (the family column of
 * moe_modes.def). Each emits the router kernels of its plan. */
typedef void route_emit(struct cg *g, LLVMValueRef k[MOE_KERNEL_COUNT]);

static void emit_topk(struct cg *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	if (moe_plan_has(g->p, MOE_OP_ROUTE)) {
		gen_route(g);
		k[MOE_KERNEL_ROUTE] = g->fn;
	} else {
		moe_cpu_research_build(g->ctx, g->mod, g->b, g->p, k);
	}
	if (moe_plan_has(g->p, MOE_OP_JITTER))
		moe_cpu_jitter_build(g->ctx, g->mod, g->b, g->p, k);
}

static void emit_expert_choice(struct cg *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	if (moe_plan_has(g->p, MOE_OP_JITTER))
		moe_cpu_jitter_build(g->ctx, g->mod, g->b, g->p, k);
	moe_cpu_ecsoft_build(g->ctx, g->mod, g->b, g->p, k);
}

static void emit_product_key(struct cg *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	moe_cpu_peer_build(g->ctx, g->mod, g->b, g->p, k);
}

static void emit_soft(struct cg *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	moe_cpu_soft_build(g->ctx, g->mod, g->b, g->p, k);
}

#define emit_sparsemixer emit_topk
#define emit_top_p emit_topk
#define emit_hierarchical emit_topk
static route_emit *const route_emitters[MOE_MODE_COUNT] = {
#define MOE_MODE(v, s, targets, family, pack) [MOE_MODE_##v] = emit_##family,
#include "moe_modes.def"
#undef MOE_MODE
};

static void build_module(struct cg *g)
{
	const struct moe_desc *d = g->d;
	const struct moe_plan *p = g->p;
	LLVMValueRef k[MOE_KERNEL_COUNT] = {0};

	route_emitters[d->mode](g, k);
	if (moe_plan_has(p, MOE_OP_EXPERT_UP)) {
		struct ffn routed = {
		    .geom = &p->routed,
		    .act = d->act,
		    .alpha = d->act_alpha,
		    .limit = d->act_limit,
		    .bias = d->expert_bias,
		    .scale_in = d->apply_to == MOE_APPLY_INPUT,
		    .scale_out = d->apply_to == MOE_APPLY_OUTPUT,
		    .down_bias_w = d->apply_to == MOE_APPLY_OUTPUT,
		};
		gen_up(g, "moe_up", &routed);
		k[MOE_KERNEL_UP] = g->fn;
		gen_down(g, "moe_down", &routed);
		k[MOE_KERNEL_DOWN] = g->fn;
	}
	if (moe_plan_has(p, MOE_OP_SHARED_UP)) {
		struct ffn shared = {
		    .geom = &p->shared,
		    .act = d->shared_act,
		    .alpha = d->act_alpha,
		    .limit = d->act_limit,
		    .scale_out = d->shared_gate == MOE_SHARED_GATE_SIGMOID,
		};
		gen_up(g, "moe_shared_up", &shared);
		k[MOE_KERNEL_SHARED_UP] = g->fn;
		gen_down(g, "moe_shared_down", &shared);
		k[MOE_KERNEL_SHARED_DOWN] = g->fn;
	}
	gen_table(g, k);
}

/* Target machine and emission -------------------------------------------- */

static void errf(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t cap, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	if (err && cap)
		vsnprintf(err, cap, fmt, ap);
	va_end(ap);
}

/* LLVM only warns about an unknown CPU or feature, and may then abort deep in
 * code generation. Probe the combination in a child process first: emit a
 * trivial module there and watch its stderr. 1: usable. */
static int cpu_probe(LLVMTargetRef target, const char *triple, const char *cpu,
		     const char *features, char *why, size_t cap)
{
	int fds[2];
	if (pipe(fds) != 0)
		return 1;
	fflush(stderr);
	pid_t pid = fork();
	if (pid < 0) {
		close(fds[0]), close(fds[1]);
		return 1;
	}
	if (pid == 0) {
		dup2(fds[1], 2);
		close(fds[0]);
		LLVMTargetMachineRef tm =
		    LLVMCreateTargetMachine(target, triple, cpu, features, LLVMCodeGenLevelNone,
					    LLVMRelocPIC, LLVMCodeModelDefault);
		if (!tm)
			_exit(3);
		LLVMContextRef c = LLVMContextCreate();
		LLVMModuleRef m = LLVMModuleCreateWithNameInContext("probe", c);
		LLVMSetTarget(m, triple);
		LLVMTypeRef ft = LLVMFunctionType(LLVMVoidTypeInContext(c), NULL, 0, 0);
		LLVMValueRef f = LLVMAddFunction(m, "probe", ft);
		LLVMBuilderRef b = LLVMCreateBuilderInContext(c);
		LLVMPositionBuilderAtEnd(b, LLVMAppendBasicBlockInContext(c, f, "entry"));
		LLVMBuildRetVoid(b);
		char *msg = NULL;
		LLVMMemoryBufferRef mb = NULL;
		_exit(LLVMTargetMachineEmitToMemoryBuffer(tm, m, LLVMObjectFile, &msg, &mb) ? 4
											    : 0);
	}
	close(fds[1]);
	char buf[4096];
	size_t n = 0;
	ssize_t r;
	while ((r = read(fds[0], buf + n, sizeof buf - 1 - n)) > 0 && n < sizeof buf - 1)
		n += (size_t)r;
	while (r > 0)
		r = read(fds[0], (char[256]){0}, 256);
	buf[n] = 0;
	close(fds[0]);
	int st = 0;
	waitpid(pid, &st, 0);
	int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0 && !strstr(buf, "is not a recognized");
	if (!ok) {
		char *nl = strchr(buf, '\n');
		if (nl)
			*nl = 0;
		snprintf(why, cap, "%.400s", buf[0] ? buf : "the code generator failed");
	}
	return ok;
}

/* Whether the target has AVX-512F (32 vector registers, 16-lane FMAs with a
 * folded broadcast): from the feature string, else the CPU's name. */
static int has_avx512(const char *triple, const char *cpu, const char *features)
{
	static const char *const cpus[] = {
	    "x86-64-v4",  "znver4",         "znver5",         "skylake-avx512", "cascadelake",
	    "cooperlake", "cannonlake",     "icelake-client", "icelake-server", "tigerlake",
	    "rocketlake", "sapphirerapids", "emeraldrapids",  "graniterapids",  "graniterapids-d",
	};
	if (strncmp(triple, "x86_64", 6) != 0)
		return 0;
	for (const char *f = features; (f = strstr(f, "avx512f")) != NULL; f += 7)
		if (f > features && (f[-1] == '+' || f[-1] == '-') && (f[7] == ',' || f[7] == 0))
			return f[-1] == '+';
	for (size_t i = 0; i < sizeof cpus / sizeof *cpus; i++)
		if (cpu && strcmp(cpu, cpus[i]) == 0)
			return 1;
	return 0;
}

int moe_cpu_generate(const struct moe_plan *p, const struct moe_cpu_target *t, enum moe_emit kind,
		     char **out, size_t *len, char *err, size_t cap)
{
	static int inited;
	if (!inited) {
		LLVMInitializeAllTargetInfos();
		LLVMInitializeAllTargets();
		LLVMInitializeAllTargetMCs();
		LLVMInitializeAllAsmPrinters();
		inited = 1;
	}
	*out = NULL;
	*len = 0;
	int rc = -1;
	char *msg = NULL;
	char *triple =
	    t->triple ? LLVMNormalizeTargetTriple(t->triple) : LLVMGetDefaultTargetTriple();
	int native = !t->cpu || strcmp(t->cpu, "native") == 0;
	char *cpu = native ? LLVMGetHostCPUName() : NULL;
	char *feat = native && !t->features ? LLVMGetHostCPUFeatures() : NULL;
	const char *cpu_name = native ? cpu : t->cpu;
	const char *features = t->features ? t->features : feat ? feat : "";
	LLVMTargetRef target;
	LLVMTargetMachineRef tm = NULL;
	struct cg g = {0};

	if (LLVMGetTargetFromTriple(triple, &target, &msg)) {
		errf(err, cap, "unknown target triple '%s': %s", triple, msg);
		goto out;
	}
	if (!native || t->features) {
		char why[512];
		if (!cpu_probe(target, triple, cpu_name, features, why, sizeof why)) {
			errf(err, cap, "cpu '%s'%s%s is not usable for %s: %s", cpu_name,
			     *features ? " with features " : "", features, triple, why);
			goto out;
		}
	}
	int level = t->opt_level;
	tm = LLVMCreateTargetMachine(target, triple, cpu_name, features,
				     level >= 3   ? LLVMCodeGenLevelAggressive
				     : level == 0 ? LLVMCodeGenLevelNone
						  : LLVMCodeGenLevelDefault,
				     LLVMRelocPIC, LLVMCodeModelDefault);
	if (!tm) {
		errf(err, cap, "cannot create a target machine for %s (cpu %s)", triple, cpu_name);
		goto out;
	}

	g.ctx = LLVMContextCreate();
	g.mod = LLVMModuleCreateWithNameInContext(p->desc->name, g.ctx);
	g.b = LLVMCreateBuilderInContext(g.ctx);
	g.p = p;
	g.d = p->desc;
	g.cpu_name = cpu_name;
	g.triple = triple;
	g.wide = has_avx512(triple, cpu_name, features);
	g.t_void = LLVMVoidTypeInContext(g.ctx);
	g.t_i1 = LLVMInt1TypeInContext(g.ctx);
	g.t_i8 = LLVMInt8TypeInContext(g.ctx);
	g.t_i16 = LLVMInt16TypeInContext(g.ctx);
	g.t_i32 = LLVMInt32TypeInContext(g.ctx);
	g.t_i64 = LLVMInt64TypeInContext(g.ctx);
	g.t_f32 = LLVMFloatTypeInContext(g.ctx);
	g.t_half = LLVMHalfTypeInContext(g.ctx);
	g.t_ptr = LLVMPointerTypeInContext(g.ctx, 0);
	g.t_v8f = LLVMVectorType(g.t_f32, MOE_VW);
	g.t_v8i16 = LLVMVectorType(g.t_i16, MOE_VW);
	g.t_v8i32 = LLVMVectorType(g.t_i32, MOE_VW);
	g.t_v8h = LLVMVectorType(g.t_half, MOE_VW);
	g.t_v8i1 = LLVMVectorType(g.t_i1, MOE_VW);
	char src[MOE_NAME_MAX + 8];
	snprintf(src, sizeof src, "%s.moe", p->desc->name);
	LLVMSetSourceFileName(g.mod, src, strlen(src));
	LLVMSetTarget(g.mod, triple);
	LLVMTargetDataRef td = LLVMCreateTargetDataLayout(tm);
	LLVMSetModuleDataLayout(g.mod, td);
	LLVMDisposeTargetData(td);

	build_module(&g);

	if (LLVMVerifyModule(g.mod, LLVMReturnStatusAction, &msg)) {
		errf(err, cap, "internal error: generated module does not verify: %s", msg);
		goto out;
	}
	if (msg) {
		LLVMDisposeMessage(msg);
		msg = NULL;
	}
	if (kind == MOE_EMIT_LL) {
		char *s = LLVMPrintModuleToString(g.mod);
		*len = strlen(s);
		*out = malloc(*len + 1);
		if (*out)
			memcpy(*out, s, *len + 1);
		LLVMDisposeMessage(s);
		rc = *out ? 0 : -1;
		if (rc)
			errf(err, cap, "out of memory");
		goto out;
	}
	LLVMPassBuilderOptionsRef po = LLVMCreatePassBuilderOptions();
	char pipeline[32];
	snprintf(pipeline, sizeof pipeline, "default<O%d>", level < 0 ? 0 : level > 3 ? 3 : level);
	LLVMErrorRef e = LLVMRunPasses(g.mod, pipeline, tm, po);
	LLVMDisposePassBuilderOptions(po);
	if (e) {
		char *em = LLVMGetErrorMessage(e);
		errf(err, cap, "optimization failed: %s", em);
		LLVMDisposeErrorMessage(em);
		goto out;
	}
	LLVMMemoryBufferRef mb = NULL;
	if (LLVMTargetMachineEmitToMemoryBuffer(
		tm, g.mod, kind == MOE_EMIT_ASM ? LLVMAssemblyFile : LLVMObjectFile, &msg, &mb)) {
		errf(err, cap, "code generation failed: %s", msg);
		goto out;
	}
	*len = LLVMGetBufferSize(mb);
	*out = malloc(*len + 1);
	if (*out) {
		memcpy(*out, LLVMGetBufferStart(mb), *len);
		(*out)[*len] = 0;
		rc = 0;
	} else {
		errf(err, cap, "out of memory");
	}
	LLVMDisposeMemoryBuffer(mb);
out:
	if (msg)
		LLVMDisposeMessage(msg);
	if (g.b)
		LLVMDisposeBuilder(g.b);
	if (g.mod)
		LLVMDisposeModule(g.mod);
	if (g.ctx)
		LLVMContextDispose(g.ctx);
	if (tm)
		LLVMDisposeTargetMachine(tm);
	LLVMDisposeMessage(triple);
	if (cpu)
		LLVMDisposeMessage(cpu);
	if (feat)
		LLVMDisposeMessage(feat);
	return rc;
}
