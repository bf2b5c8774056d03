/* cpu_llvm_soft.c: Soft MoE for the CPU backend, emitted into the module
 * cpu_llvm.c builds: l2-normalization of tokens and slot parameters, the
 * token-slot logits, the two softmaxes, the slot inputs D^T x and the output
 * C Y. Each repeats the reference's arithmetic order (route_soft in ref.c). */
#include "backend.h"

#include <llvm-c/Core.h>

#include <math.h>
#include <string.h>

struct sg {
	LLVMContextRef ctx;
	LLVMModuleRef mod;
	LLVMBuilderRef b;
	LLVMTypeRef t_void, t_i32, t_i64, t_f32, t_f64, t_ptr, t_v8f;
	LLVMValueRef fn;
	LLVMBasicBlockRef entry;
	const struct moe_desc *d;
	uint32_t S; /* slots: E * slots_per_expert */
};

/* Small builders ------------------------------------------------------------ */

static LLVMValueRef i64c(struct sg *g, int64_t v)
{
	return LLVMConstInt(g->t_i64, (unsigned long long)v, 1);
}

static LLVMValueRef f32c(struct sg *g, double v)
{
	return LLVMConstReal(g->t_f32, v);
}

static LLVMValueRef f64c(struct sg *g, double v)
{
	return LLVMConstReal(g->t_f64, v);
}

static LLVMValueRef at(struct sg *g, LLVMTypeRef t, LLVMValueRef base, LLVMValueRef i)
{
	return LLVMBuildInBoundsGEP2(g->b, t, base, &i, 1, "");
}

static unsigned align_of(struct sg *g, LLVMTypeRef t)
{
	return t == g->t_i64 || t == g->t_f64 ? 8 : 4;
}

static LLVMValueRef ld(struct sg *g, LLVMTypeRef t, LLVMValueRef p)
{
	LLVMValueRef v = LLVMBuildLoad2(g->b, t, p, "");
	LLVMSetAlignment(v, align_of(g, t));
	return v;
}

static void st(struct sg *g, LLVMValueRef v, LLVMValueRef p)
{
	LLVMSetAlignment(LLVMBuildStore(g->b, v, p), align_of(g, LLVMTypeOf(v)));
}

static LLVMValueRef ldf(struct sg *g, LLVMValueRef p, LLVMValueRef i)
{
	return ld(g, g->t_f32, at(g, g->t_f32, p, i));
}

static void stf(struct sg *g, LLVMValueRef v, LLVMValueRef p, LLVMValueRef i)
{
	st(g, v, at(g, g->t_f32, p, i));
}

static LLVMValueRef ldd(struct sg *g, LLVMValueRef p, LLVMValueRef i)
{
	return ld(g, g->t_f64, at(g, g->t_f64, p, i));
}

static void std_(struct sg *g, LLVMValueRef v, LLVMValueRef p, LLVMValueRef i)
{
	st(g, v, at(g, g->t_f64, p, i));
}

static LLVMValueRef mul(struct sg *g, LLVMValueRef a, int64_t k)
{
	return LLVMBuildNSWMul(g->b, a, i64c(g, k), "");
}

static LLVMValueRef add(struct sg *g, LLVMValueRef a, LLVMValueRef b)
{
	return LLVMBuildNSWAdd(g->b, a, b, "");
}

static LLVMValueRef slot(struct sg *g, LLVMTypeRef t, const char *name)
{
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMPositionBuilderAtEnd(g->b, g->entry);
	LLVMValueRef a = LLVMBuildAlloca(g->b, t, name);
	LLVMSetAlignment(a, 32);
	LLVMPositionBuilderAtEnd(g->b, cur);
	return a;
}

static LLVMBasicBlockRef bb(struct sg *g, const char *name)
{
	return LLVMAppendBasicBlockInContext(g->ctx, g->fn, name);
}

struct lp {
	LLVMBasicBlockRef head, exit;
	LLVMValueRef iv;
};

/* for (iv = from; iv < to; iv++) */
static void lp_open(struct sg *g, struct lp *l, LLVMValueRef from, LLVMValueRef to,
		    const char *name)
{
	LLVMBasicBlockRef pre = LLVMGetInsertBlock(g->b), body;
	l->head = bb(g, name);
	body = bb(g, name);
	l->exit = bb(g, name);
	LLVMBuildBr(g->b, l->head);
	LLVMPositionBuilderAtEnd(g->b, l->head);
	l->iv = LLVMBuildPhi(g->b, g->t_i64, name);
	LLVMAddIncoming(l->iv, &from, &pre, 1);
	LLVMBuildCondBr(g->b, LLVMBuildICmp(g->b, LLVMIntSLT, l->iv, to, ""), body, l->exit);
	LLVMPositionBuilderAtEnd(g->b, body);
}

static void lp_close(struct sg *g, struct lp *l)
{
	LLVMBasicBlockRef latch = LLVMGetInsertBlock(g->b);
	LLVMValueRef next = add(g, l->iv, i64c(g, 1));
	LLVMBuildBr(g->b, l->head);
	LLVMAddIncoming(l->iv, &next, &latch, 1);
	LLVMMoveBasicBlockAfter(l->exit, latch);
	LLVMPositionBuilderAtEnd(g->b, l->exit);
}

static void fn_begin(struct sg *g, const char *name, LLVMTypeRef *params, const char *const *pn,
		     unsigned n)
{
	LLVMTypeRef ft = LLVMFunctionType(g->t_void, params, n, 0);
	g->fn = LLVMAddFunction(g->mod, name, ft);
	LLVMSetVisibility(g->fn, LLVMHiddenVisibility);
	unsigned k = LLVMGetEnumAttributeKindForName("nounwind", 8);
	LLVMAddAttributeAtIndex(g->fn, LLVMAttributeFunctionIndex,
				LLVMCreateEnumAttribute(g->ctx, k, 0));
	for (unsigned i = 0; i < n; i++)
		LLVMSetValueName2(LLVMGetParam(g->fn, i), pn[i], strlen(pn[i]));
	g->entry = bb(g, "entry");
	LLVMPositionBuilderAtEnd(g->b, bb(g, "start"));
}

static void fn_end(struct sg *g)
{
	LLVMBuildRetVoid(g->b);
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMPositionBuilderAtEnd(g->b, g->entry);
	LLVMBuildBr(g->b, LLVMGetNextBasicBlock(g->entry));
	LLVMPositionBuilderAtEnd(g->b, cur);
}

static LLVMValueRef prm(struct sg *g, unsigned i)
{
	return LLVMGetParam(g->fn, i);
}

/* double f(double) from the C library, as the reference calls it */
static LLVMValueRef libm(struct sg *g, const char *fname, LLVMValueRef a)
{
	LLVMTypeRef ft = LLVMFunctionType(g->t_f64, &g->t_f64, 1, 0);
	LLVMValueRef f = LLVMGetNamedFunction(g->mod, fname);
	if (!f) {
		f = LLVMAddFunction(g->mod, fname, ft);
		unsigned k = LLVMGetEnumAttributeKindForName("nounwind", 8);
		LLVMAddAttributeAtIndex(f, LLVMAttributeFunctionIndex,
					LLVMCreateEnumAttribute(g->ctx, k, 0));
	}
	return LLVMBuildCall2(g->b, ft, f, &a, 1, "");
}

static LLVMValueRef ext(struct sg *g, LLVMValueRef v)
{
	return LLVMBuildFPExt(g->b, v, g->t_f64, "");
}

static LLVMValueRef trunc32(struct sg *g, LLVMValueRef v)
{
	return LLVMBuildFPTrunc(g->b, v, g->t_f32, "");
}

/* score_vec's softmax over n values l[off + i * stride] into
 * s[soff + i * sstride]: maximum, exp in double of the f32 difference rounded
 * to f32, f32 sum in index order, division. */
static void softmax(struct sg *g, LLVMValueRef l, LLVMValueRef off, int64_t stride, LLVMValueRef s,
		    LLVMValueRef soff, int64_t sstride, LLVMValueRef n)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef m = slot(g, g->t_f32, "smax"), sum = slot(g, g->t_f32, "ssum");
	struct lp i;
	st(g, f32c(g, -INFINITY), m);
	lp_open(g, &i, i64c(g, 0), n, "sm.max");
	LLVMValueRef v = ldf(g, l, add(g, off, mul(g, i.iv, stride)));
	LLVMValueRef mv = ld(g, g->t_f32, m);
	st(g, LLVMBuildSelect(b, LLVMBuildFCmp(b, LLVMRealOGT, v, mv, ""), v, mv, ""), m);
	lp_close(g, &i);
	LLVMValueRef mx = ld(g, g->t_f32, m);
	st(g, f32c(g, 0.0), sum);
	lp_open(g, &i, i64c(g, 0), n, "sm.exp");
	v = ldf(g, l, add(g, off, mul(g, i.iv, stride)));
	LLVMValueRef ex = trunc32(g, libm(g, "exp", ext(g, LLVMBuildFSub(b, v, mx, ""))));
	stf(g, ex, s, add(g, soff, mul(g, i.iv, sstride)));
	st(g, LLVMBuildFAdd(b, ld(g, g->t_f32, sum), ex, ""), sum);
	lp_close(g, &i);
	LLVMValueRef tot = ld(g, g->t_f32, sum);
	lp_open(g, &i, i64c(g, 0), n, "sm.div");
	LLVMValueRef k = add(g, soff, mul(g, i.iv, sstride));
	stf(g, LLVMBuildFDiv(b, ldf(g, s, k), tot, ""), s, k);
	lp_close(g, &i);
}

/* The kernels ------------------------------------------------------------------ */

/* moe_soft_norm(src, dst, r0, r1): rows [r0, r1) of [*, H]: dst = src * r,
 * r = (float)(1 / sqrt((double)ss + 1e-6)), ss the f32 sum of squares in
 * ascending h. */
static void gen_norm(struct sg *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden;
	LLVMTypeRef params[] = {g->t_ptr, g->t_ptr, g->t_i64, g->t_i64};
	static const char *const pn[] = {"src", "dst", "r0", "r1"};
	fn_begin(g, "moe_soft_norm", params, pn, 4);
	LLVMValueRef ss = slot(g, g->t_f32, "ss");
	struct lp r, h;
	lp_open(g, &r, prm(g, 2), prm(g, 3), "r");
	LLVMValueRef src = at(g, g->t_f32, prm(g, 0), mul(g, r.iv, H));
	LLVMValueRef dst = at(g, g->t_f32, prm(g, 1), mul(g, r.iv, H));
	st(g, f32c(g, 0.0), ss);
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "ss");
	LLVMValueRef v = ldf(g, src, h.iv);
	st(g, LLVMBuildFAdd(b, ld(g, g->t_f32, ss), LLVMBuildFMul(b, v, v, ""), ""), ss);
	lp_close(g, &h);
	LLVMValueRef den = LLVMBuildFAdd(b, ext(g, ld(g, g->t_f32, ss)), f64c(g, 1e-6), "");
	LLVMTypeRef t = g->t_f64;
	unsigned id = LLVMLookupIntrinsicID("llvm.sqrt", 9);
	LLVMValueRef sq =
	    LLVMBuildCall2(b, LLVMIntrinsicGetType(g->ctx, id, &t, 1),
			   LLVMGetIntrinsicDeclaration(g->mod, id, &t, 1), &den, 1, "");
	LLVMValueRef inv = trunc32(g, LLVMBuildFDiv(b, f64c(g, 1.0), sq, ""));
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "sc");
	stf(g, LLVMBuildFMul(b, ldf(g, src, h.iv), inv, ""), dst, h.iv);
	lp_close(g, &h);
	lp_close(g, &r);
	fn_end(g);
}

/* moe_soft_logits(xn, slots, scale, t0, t1, L): L[t, s] = scale * (xn_t .
 * slot_s), the slots as router panels [ceil(S/8)][H][8], each lane an f32 sum
 * in ascending h (multiply, then add), as dot_f32. */
static void gen_logits(struct sg *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, S = g->S, nb = moe_router_blocks(S);
	LLVMTypeRef params[] = {g->t_ptr, g->t_ptr, g->t_f32, g->t_i64, g->t_i64, g->t_ptr};
	static const char *const pn[] = {"xn", "slots", "scale", "t0", "t1", "L"};
	fn_begin(g, "moe_soft_logits", params, pn, 6);
	LLVMValueRef acc = slot(g, g->t_v8f, "acc"), scale = prm(g, 2);
	struct lp t, p, h;
	lp_open(g, &t, prm(g, 3), prm(g, 4), "t");
	LLVMValueRef xrow = at(g, g->t_f32, prm(g, 0), mul(g, t.iv, H));
	LLVMValueRef lrow = at(g, g->t_f32, prm(g, 5), mul(g, t.iv, S));
	lp_open(g, &p, i64c(g, 0), i64c(g, nb), "p");
	st(g, LLVMConstNull(g->t_v8f), acc);
	LLVMValueRef wb = at(g, g->t_f32, prm(g, 1), mul(g, p.iv, (int64_t)H * 8));
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "h");
	LLVMValueRef xv = LLVMBuildInsertElement(b, LLVMGetPoison(g->t_v8f), ldf(g, xrow, h.iv),
						 LLVMConstInt(g->t_i32, 0, 0), "");
	xv = LLVMBuildShuffleVector(b, xv, LLVMGetPoison(g->t_v8f),
				    LLVMConstNull(LLVMVectorType(g->t_i32, 8)), "");
	LLVMValueRef wv = ld(g, g->t_v8f, at(g, g->t_f32, wb, mul(g, h.iv, 8)));
	st(g, LLVMBuildFAdd(b, ld(g, g->t_v8f, acc), LLVMBuildFMul(b, xv, wv, ""), ""), acc);
	lp_close(g, &h);
	LLVMValueRef a = ld(g, g->t_v8f, acc);
	for (int j = 0; j < 8; j++) {
		LLVMValueRef s = add(g, mul(g, p.iv, 8), i64c(g, j));
		LLVMBasicBlockRef then = bb(g, "lane"), end = bb(g, "lane.end");
		LLVMBuildCondBr(b, LLVMBuildICmp(b, LLVMIntSLT, s, i64c(g, S), ""), then, end);
		LLVMPositionBuilderAtEnd(b, then);
		LLVMValueRef v =
		    LLVMBuildExtractElement(b, a, LLVMConstInt(g->t_i32, (unsigned)j, 0), "");
		stf(g, LLVMBuildFMul(b, scale, v, ""), lrow, s);
		LLVMBuildBr(b, end);
		LLVMPositionBuilderAtEnd(b, end);
	}
	lp_close(g, &p);
	lp_close(g, &t);
	fn_end(g);
}

/* moe_soft_combine(L, t0, t1, C): C[t, :] = softmax over the S slots of
 * L[t, :], per token. */
static void gen_combine(struct sg *g)
{
	LLVMTypeRef params[] = {g->t_ptr, g->t_i64, g->t_i64, g->t_ptr};
	static const char *const pn[] = {"L", "t0", "t1", "C"};
	fn_begin(g, "moe_soft_combine", params, pn, 4);
	struct lp t;
	lp_open(g, &t, prm(g, 1), prm(g, 2), "t");
	LLVMValueRef off = mul(g, t.iv, g->S);
	softmax(g, prm(g, 0), off, 1, prm(g, 3), off, 1, i64c(g, g->S));
	lp_close(g, &t);
	fn_end(g);
}

/* moe_soft_dispatch(L, T, s0, s1, Dt): per slot s in [s0, s1), the softmax
 * over the T tokens of column s of L[T, S], stored transposed: Dt[s, t]. */
static void gen_dispatch(struct sg *g)
{
	LLVMTypeRef params[] = {g->t_ptr, g->t_i64, g->t_i64, g->t_i64, g->t_ptr};
	static const char *const pn[] = {"L", "T", "s0", "s1", "Dt"};
	fn_begin(g, "moe_soft_dispatch", params, pn, 5);
	LLVMValueRef T = prm(g, 1);
	struct lp s;
	lp_open(g, &s, prm(g, 2), prm(g, 3), "s");
	softmax(g, prm(g, 0), s.iv, g->S, prm(g, 4), LLVMBuildNSWMul(g->b, s.iv, T, ""), 1, T);
	lp_close(g, &s);
	fn_end(g);
}

/* moe_soft_slot_in(Dt, x, T, s0, s1, xs, acc): xs[s, h] = (float) sum over t
 * ascending of (double)Dt[s, t] * x[t, h], acc: H doubles of scratch. */
static void gen_slot_in(struct sg *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, I, I, I, P, P};
	static const char *const pn[] = {"Dt", "x", "T", "s0", "s1", "xs", "acc"};
	fn_begin(g, "moe_soft_slot_in", params, pn, 7);
	LLVMValueRef T = prm(g, 2), acc = prm(g, 6);
	struct lp s, t, h;
	lp_open(g, &s, prm(g, 3), prm(g, 4), "s");
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "z");
	std_(g, f64c(g, 0.0), acc, h.iv);
	lp_close(g, &h);
	LLVMValueRef drow = at(g, g->t_f32, prm(g, 0), LLVMBuildNSWMul(b, s.iv, T, ""));
	lp_open(g, &t, i64c(g, 0), T, "t");
	LLVMValueRef dv = ext(g, ldf(g, drow, t.iv));
	LLVMValueRef xrow = at(g, g->t_f32, prm(g, 1), mul(g, t.iv, H));
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "h");
	LLVMValueRef pr = LLVMBuildFMul(b, dv, ext(g, ldf(g, xrow, h.iv)), "");
	std_(g, LLVMBuildFAdd(b, ldd(g, acc, h.iv), pr, ""), acc, h.iv);
	lp_close(g, &h);
	lp_close(g, &t);
	LLVMValueRef xs = at(g, g->t_f32, prm(g, 5), mul(g, s.iv, H));
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "o");
	stf(g, trunc32(g, ldd(g, acc, h.iv)), xs, h.iv);
	lp_close(g, &h);
	lp_close(g, &s);
	fn_end(g);
}

/* moe_soft_out(C, Y, bias, t0, t1, y, acc): y[t, h] = (float)(sum over slots
 * ascending of (double)(C[t, s] * Y[s, h]) + bias[h]); bias only when the
 * description has an output bias. acc: H doubles of scratch. */
static void gen_out(struct sg *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, S = g->S;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, P, I, I, P, P};
	static const char *const pn[] = {"C", "Y", "bias", "t0", "t1", "y", "acc"};
	fn_begin(g, "moe_soft_out", params, pn, 7);
	LLVMValueRef acc = prm(g, 6);
	struct lp t, s, h;
	lp_open(g, &t, prm(g, 3), prm(g, 4), "t");
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "z");
	std_(g, f64c(g, 0.0), acc, h.iv);
	lp_close(g, &h);
	LLVMValueRef crow = at(g, g->t_f32, prm(g, 0), mul(g, t.iv, S));
	lp_open(g, &s, i64c(g, 0), i64c(g, S), "s");
	LLVMValueRef c = ldf(g, crow, s.iv);
	LLVMValueRef yrow = at(g, g->t_f32, prm(g, 1), mul(g, s.iv, H));
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "h");
	LLVMValueRef pr = ext(g, LLVMBuildFMul(b, c, ldf(g, yrow, h.iv), ""));
	std_(g, LLVMBuildFAdd(b, ldd(g, acc, h.iv), pr, ""), acc, h.iv);
	lp_close(g, &h);
	lp_close(g, &s);
	LLVMValueRef out = at(g, g->t_f32, prm(g, 5), mul(g, t.iv, H));
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "o");
	LLVMValueRef v = ldd(g, acc, h.iv);
	if (g->d->output_bias)
		v = LLVMBuildFAdd(b, v, ext(g, ldf(g, prm(g, 2), h.iv)), "");
	stf(g, trunc32(g, v), out, h.iv);
	lp_close(g, &h);
	lp_close(g, &t);
	fn_end(g);
}

/* Entry points ------------------------------------------------------------------- */

int moe_plan_soft(const struct moe_desc *d, struct moe_diag *diag)
{
	if (d->mode != MOE_MODE_SOFT)
		return 0;
	int bad = 0;
	uint64_t S = (uint64_t)d->n_experts * d->soft_slots_per_expert;
	if (d->soft_slots_per_expert == 0 || S > (1u << 20)) {
		moe_diag_error(diag, "invalid soft slots_per_expert %u for %u experts",
			       d->soft_slots_per_expert, d->n_experts);
		bad = 1;
	}
	if (d->hidden > (1u << 20)) {
		moe_diag_error(diag, "soft with hidden %u is not generated for target cpu",
			       d->hidden);
		bad = 1;
	}
	if (d->capacity != MOE_CAPACITY_NONE) {
		moe_diag_error(diag,
			       "router.capacity with mode soft is not generated for target cpu");
		bad = 1;
	}
	if (d->noise != MOE_NOISE_NONE) {
		moe_diag_error(diag, "router.noise with mode soft is not generated for target cpu "
				     "yet");
		bad = 1;
	}
	if (d->shared_count && d->shared_gate == MOE_SHARED_GATE_SIGMOID) {
		moe_diag_error(diag, "shared_experts.gate sigmoid with mode soft is not generated "
				     "for target cpu yet");
		bad = 1;
	}
	return bad ? -1 : 1;
}

void moe_cpu_soft_build(struct LLVMOpaqueContext *ctx, struct LLVMOpaqueModule *mod,
			struct LLVMOpaqueBuilder *b, const struct moe_plan *p,
			struct LLVMOpaqueValue *fns[MOE_SOFT_FNS])
{
	struct sg g = {.ctx = ctx, .mod = mod, .b = b, .d = p->desc};
	for (int i = 0; i < MOE_SOFT_FNS; i++)
		fns[i] = NULL;
	if (g.d->mode != MOE_MODE_SOFT)
		return;
	g.S = g.d->n_experts * g.d->soft_slots_per_expert;
	g.t_void = LLVMVoidTypeInContext(ctx);
	g.t_i32 = LLVMInt32TypeInContext(ctx);
	g.t_i64 = LLVMInt64TypeInContext(ctx);
	g.t_f32 = LLVMFloatTypeInContext(ctx);
	g.t_f64 = LLVMDoubleTypeInContext(ctx);
	g.t_ptr = LLVMPointerTypeInContext(ctx, 0);
	g.t_v8f = LLVMVectorType(g.t_f32, 8);
	void (*gen[MOE_SOFT_FNS])(struct sg *) = {gen_norm,     gen_logits,  gen_combine,
						  gen_dispatch, gen_slot_in, gen_out};
	for (int i = 0; i < MOE_SOFT_FNS; i++) {
		gen[i](&g);
		fns[i] = g.fn;
	}
}
