/* cpu_llvm_research.c: the research routers of the CPU backend, emitted into
 * the module cpu_llvm.c builds: sparsemixer, hierarchical gating and noisy
 * top-k (learned gaussian noise from a counter-based generator, input jitter).
 * Every step copies the reference's arithmetic so the choices agree bit for bit. */
#include "backend.h"

#include <llvm-c/Core.h>

#include <math.h>
#include <string.h>

struct rg {
	LLVMContextRef ctx;
	LLVMModuleRef mod;
	LLVMBuilderRef b;
	LLVMTypeRef t_void, t_i8, t_i32, t_i64, t_f32, t_f64, t_ptr, t_v8f;
	LLVMValueRef fn;
	LLVMBasicBlockRef entry;
	const struct moe_desc *d;
};

/* Small builders ------------------------------------------------------------ */

static LLVMValueRef i64c(struct rg *g, int64_t v)
{
	return LLVMConstInt(g->t_i64, (unsigned long long)v, 1);
}

static LLVMValueRef u64c(struct rg *g, uint64_t v)
{
	return LLVMConstInt(g->t_i64, v, 0);
}

static LLVMValueRef f32c(struct rg *g, double v)
{
	return LLVMConstReal(g->t_f32, v);
}

static LLVMValueRef f64c(struct rg *g, double v)
{
	return LLVMConstReal(g->t_f64, v);
}

static LLVMValueRef at(struct rg *g, LLVMTypeRef t, LLVMValueRef base, LLVMValueRef i)
{
	return LLVMBuildInBoundsGEP2(g->b, t, base, &i, 1, "");
}

static LLVMValueRef ld(struct rg *g, LLVMTypeRef t, LLVMValueRef p)
{
	LLVMValueRef v = LLVMBuildLoad2(g->b, t, p, "");
	LLVMSetAlignment(v, t == g->t_i8 ? 1 : t == g->t_i64 || t == g->t_f64 ? 8 : 4);
	return v;
}

static void st(struct rg *g, LLVMValueRef v, LLVMValueRef p)
{
	LLVMTypeRef t = LLVMTypeOf(v);
	LLVMSetAlignment(LLVMBuildStore(g->b, v, p), t == g->t_i8                     ? 1
						     : t == g->t_i64 || t == g->t_f64 ? 8
										      : 4);
}

/* f32 element i of array p */
static LLVMValueRef ldf(struct rg *g, LLVMValueRef p, LLVMValueRef i)
{
	return ld(g, g->t_f32, at(g, g->t_f32, p, i));
}

static void stf(struct rg *g, LLVMValueRef v, LLVMValueRef p, LLVMValueRef i)
{
	st(g, v, at(g, g->t_f32, p, i));
}

static LLVMValueRef alloca_(struct rg *g, LLVMTypeRef t, uint64_t n, const char *name)
{
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMPositionBuilderAtEnd(g->b, g->entry);
	LLVMValueRef a = n == 1 ? LLVMBuildAlloca(g->b, t, name)
				: LLVMBuildAlloca(g->b, LLVMArrayType2(t, n), name);
	LLVMSetAlignment(a, 32);
	LLVMPositionBuilderAtEnd(g->b, cur);
	return a;
}

struct lp {
	LLVMBasicBlockRef head, body, exit;
	LLVMValueRef iv;
};

static LLVMBasicBlockRef bb(struct rg *g, const char *name)
{
	return LLVMAppendBasicBlockInContext(g->ctx, g->fn, name);
}

/* for (iv = from; iv < to; iv++) */
static void lp_open(struct rg *g, struct lp *l, LLVMValueRef from, LLVMValueRef to,
		    const char *name)
{
	LLVMBasicBlockRef pre = LLVMGetInsertBlock(g->b);
	l->head = bb(g, name);
	l->body = bb(g, name);
	l->exit = bb(g, name);
	LLVMBuildBr(g->b, l->head);
	LLVMPositionBuilderAtEnd(g->b, l->head);
	l->iv = LLVMBuildPhi(g->b, g->t_i64, name);
	LLVMAddIncoming(l->iv, &from, &pre, 1);
	LLVMBuildCondBr(g->b, LLVMBuildICmp(g->b, LLVMIntSLT, l->iv, to, ""), l->body, l->exit);
	LLVMPositionBuilderAtEnd(g->b, l->body);
}

static void lp_close(struct rg *g, struct lp *l)
{
	LLVMBasicBlockRef latch = LLVMGetInsertBlock(g->b);
	LLVMValueRef next = LLVMBuildNSWAdd(g->b, l->iv, i64c(g, 1), "");
	LLVMBuildBr(g->b, l->head);
	LLVMAddIncoming(l->iv, &next, &latch, 1);
	LLVMMoveBasicBlockAfter(l->exit, latch);
	LLVMPositionBuilderAtEnd(g->b, l->exit);
}

static LLVMBasicBlockRef when(struct rg *g, LLVMValueRef c)
{
	LLVMBasicBlockRef then = bb(g, "then"), end = bb(g, "endif");
	LLVMBuildCondBr(g->b, c, then, end);
	LLVMPositionBuilderAtEnd(g->b, then);
	return end;
}

static void when_end(struct rg *g, LLVMBasicBlockRef end)
{
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMBuildBr(g->b, end);
	LLVMMoveBasicBlockAfter(end, cur);
	LLVMPositionBuilderAtEnd(g->b, end);
}

static void fn_begin(struct rg *g, const char *name, LLVMTypeRef *params, const char *const *pnames,
		     unsigned n)
{
	LLVMTypeRef ft = LLVMFunctionType(g->t_void, params, n, 0);
	g->fn = LLVMAddFunction(g->mod, name, ft);
	LLVMSetVisibility(g->fn, LLVMHiddenVisibility);
	unsigned k = LLVMGetEnumAttributeKindForName("nounwind", 8);
	LLVMAddAttributeAtIndex(g->fn, LLVMAttributeFunctionIndex,
				LLVMCreateEnumAttribute(g->ctx, k, 0));
	for (unsigned i = 0; i < n; i++)
		LLVMSetValueName2(LLVMGetParam(g->fn, i), pnames[i], strlen(pnames[i]));
	g->entry = bb(g, "entry");
	LLVMPositionBuilderAtEnd(g->b, bb(g, "start"));
}

static void fn_end(struct rg *g)
{
	LLVMBuildRetVoid(g->b);
	LLVMBasicBlockRef cur = LLVMGetInsertBlock(g->b);
	LLVMPositionBuilderAtEnd(g->b, g->entry);
	LLVMBuildBr(g->b, LLVMGetNextBasicBlock(g->entry));
	LLVMPositionBuilderAtEnd(g->b, cur);
}

static LLVMValueRef prm(struct rg *g, unsigned i)
{
	return LLVMGetParam(g->fn, i);
}

/* double f(double) from the C library: the reference's formulas. */
static LLVMValueRef cm(struct rg *g, const char *fname, LLVMValueRef a)
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

/* pow(a, e) from the C library, a double. */
static LLVMValueRef pow_d(struct rg *g, LLVMValueRef a, double e)
{
	LLVMTypeRef two[2] = {g->t_f64, g->t_f64};
	LLVMTypeRef ft = LLVMFunctionType(g->t_f64, two, 2, 0);
	LLVMValueRef f = LLVMGetNamedFunction(g->mod, "pow");
	if (!f)
		f = LLVMAddFunction(g->mod, "pow", ft);
	LLVMValueRef args[2] = {a, f64c(g, e)};
	return LLVMBuildCall2(g->b, ft, f, args, 2, "");
}

static LLVMValueRef intr1(struct rg *g, const char *name, LLVMValueRef a)
{
	LLVMTypeRef t = LLVMTypeOf(a);
	unsigned id = LLVMLookupIntrinsicID(name, strlen(name));
	MOE_ASSERT(id != 0);
	LLVMValueRef f = LLVMGetIntrinsicDeclaration(g->mod, id, &t, 1);
	return LLVMBuildCall2(g->b, LLVMIntrinsicGetType(g->ctx, id, &t, 1), f, &a, 1, "");
}

static LLVMValueRef sel_gt(struct rg *g, LLVMValueRef a, LLVMValueRef b, LLVMValueRef x,
			   LLVMValueRef y)
{
	return LLVMBuildSelect(g->b, LLVMBuildFCmp(g->b, LLVMRealOGT, a, b, ""), x, y, "");
}

static LLVMValueRef to_f32(struct rg *g, LLVMValueRef v)
{
	return LLVMBuildFPTrunc(g->b, v, g->t_f32, "");
}

/* Counter-based random numbers: moe_rng_hash, moe_rng_uniform, moe_rng_normal. */

static LLVMValueRef mix64(struct rg *g, LLVMValueRef z)
{
	LLVMBuilderRef b = g->b;
	z = LLVMBuildAdd(b, z, u64c(g, 0x9e3779b97f4a7c15ull), "");
	z = LLVMBuildMul(b, LLVMBuildXor(b, z, LLVMBuildLShr(b, z, u64c(g, 30), ""), ""),
			 u64c(g, 0xbf58476d1ce4e5b9ull), "");
	z = LLVMBuildMul(b, LLVMBuildXor(b, z, LLVMBuildLShr(b, z, u64c(g, 27), ""), ""),
			 u64c(g, 0x94d049bb133111ebull), "");
	return LLVMBuildXor(b, z, LLVMBuildLShr(b, z, u64c(g, 31), ""), "");
}

static LLVMValueRef rng_hash(struct rg *g, LLVMValueRef seed, LLVMValueRef a, LLVMValueRef b_,
			     LLVMValueRef c)
{
	LLVMValueRef h = mix64(g, seed);
	h = mix64(g, LLVMBuildXor(g->b, h, a, ""));
	h = mix64(g, LLVMBuildXor(g->b, h, b_, ""));
	return mix64(g, LLVMBuildXor(g->b, h, c, ""));
}

static LLVMValueRef rng_uniform(struct rg *g, LLVMValueRef h)
{
	LLVMValueRef top = LLVMBuildLShr(g->b, h, u64c(g, 40), "");
	return LLVMBuildFMul(g->b, LLVMBuildUIToFP(g->b, top, g->t_f32, ""), f32c(g, 0x1p-24), "u");
}

static LLVMValueRef rng_normal(struct rg *g, LLVMValueRef seed, LLVMValueRef a, LLVMValueRef b_,
			       LLVMValueRef c)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef u1 = rng_uniform(g, rng_hash(g, seed, a, b_, c));
	LLVMValueRef c2 = LLVMBuildXor(b, c, u64c(g, 1ull << 63), "");
	LLVMValueRef u2 = rng_uniform(g, rng_hash(g, seed, a, b_, c2));
	u1 = LLVMBuildFPExt(b, u1, g->t_f64, "");
	u2 = LLVMBuildFPExt(b, u2, g->t_f64, "");
	LLVMValueRef lg = cm(g, "log", LLVMBuildFSub(b, f64c(g, 1.0), u1, ""));
	LLVMValueRef r = intr1(g, "llvm.sqrt", LLVMBuildFMul(b, f64c(g, -2.0), lg, ""));
	LLVMValueRef cs = cm(g, "cos", LLVMBuildFMul(b, f64c(g, 2.0 * M_PI), u2, ""));
	return to_f32(g, LLVMBuildFMul(b, r, cs, ""));
}

/* Router pieces ----------------------------------------------------------------- */

/* out[0..n) = rows of panel weights . xrow: [ceil(n/8)][H][8] f32 panels,
 * each lane an f32 sum in ascending h (multiply then add), like dot_f32. */
static void panel_dots(struct rg *g, LLVMValueRef xrow, LLVMValueRef w, uint32_t n,
		       LLVMValueRef out)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, nb = moe_router_blocks(n);
	LLVMValueRef acc = alloca_(g, g->t_v8f, 1, "acc");
	struct lp p, h;
	lp_open(g, &p, i64c(g, 0), i64c(g, nb), "pd.b");
	st(g, LLVMConstNull(g->t_v8f), acc);
	LLVMValueRef wb = at(g, g->t_f32, w, LLVMBuildNSWMul(b, p.iv, i64c(g, (int64_t)H * 8), ""));
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "pd.h");
	LLVMValueRef xv = ldf(g, xrow, h.iv);
	LLVMValueRef v = LLVMBuildInsertElement(b, LLVMGetPoison(g->t_v8f), xv,
						LLVMConstInt(g->t_i32, 0, 0), "");
	v = LLVMBuildShuffleVector(b, v, LLVMGetPoison(g->t_v8f),
				   LLVMConstNull(LLVMVectorType(g->t_i32, 8)), "");
	LLVMValueRef wv =
	    ld(g, g->t_v8f, at(g, g->t_f32, wb, LLVMBuildNSWMul(b, h.iv, i64c(g, 8), "")));
	st(g, LLVMBuildFAdd(b, ld(g, g->t_v8f, acc), LLVMBuildFMul(b, v, wv, ""), ""), acc);
	lp_close(g, &h);
	/* store the lanes that exist */
	LLVMValueRef a = ld(g, g->t_v8f, acc);
	for (int j = 0; j < 8; j++) {
		LLVMValueRef e =
		    LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, p.iv, i64c(g, 8), ""), i64c(g, j), "");
		LLVMBasicBlockRef end = when(g, LLVMBuildICmp(b, LLVMIntSLT, e, i64c(g, n), ""));
		stf(g, LLVMBuildExtractElement(b, a, LLVMConstInt(g->t_i32, (unsigned)j, 0), ""),
		    out, e);
		when_end(g, end);
	}
	lp_close(g, &p);
}

/* Scores s[off + i] = f(l[off + i]) for i in [0, n), as score_vec. */
static void scores(struct rg *g, enum moe_score sc, LLVMValueRef l, LLVMValueRef s,
		   LLVMValueRef off, uint32_t n)
{
	LLVMBuilderRef b = g->b;
	struct lp e;
	if (sc == MOE_SCORE_SOFTMAX) {
		LLVMValueRef m = alloca_(g, g->t_f32, 1, "smax"),
			     sum = alloca_(g, g->t_f32, 1, "ssum");
		st(g, f32c(g, -INFINITY), m);
		lp_open(g, &e, i64c(g, 0), i64c(g, n), "sm.max");
		LLVMValueRef v = ldf(g, l, LLVMBuildNSWAdd(b, off, e.iv, ""));
		LLVMValueRef mv = ld(g, g->t_f32, m);
		st(g, sel_gt(g, v, mv, v, mv), m);
		lp_close(g, &e);
		LLVMValueRef mx = ld(g, g->t_f32, m);
		st(g, f32c(g, 0.0), sum);
		lp_open(g, &e, i64c(g, 0), i64c(g, n), "sm.exp");
		LLVMValueRef i = LLVMBuildNSWAdd(b, off, e.iv, "");
		LLVMValueRef ex = to_f32(g, cm(g, "exp", LLVMBuildFSub(b, ldf(g, l, i), mx, "")));
		stf(g, ex, s, i);
		st(g, LLVMBuildFAdd(b, ld(g, g->t_f32, sum), ex, ""), sum);
		lp_close(g, &e);
		LLVMValueRef tot = ld(g, g->t_f32, sum);
		lp_open(g, &e, i64c(g, 0), i64c(g, n), "sm.div");
		i = LLVMBuildNSWAdd(b, off, e.iv, "");
		stf(g, LLVMBuildFDiv(b, ldf(g, s, i), tot, ""), s, i);
		lp_close(g, &e);
		return;
	}
	lp_open(g, &e, i64c(g, 0), i64c(g, n), "sc");
	LLVMValueRef i = LLVMBuildNSWAdd(b, off, e.iv, "");
	LLVMValueRef vd = LLVMBuildFPExt(b, ldf(g, l, i), g->t_f64, "");
	LLVMValueRef o;
	if (sc == MOE_SCORE_SIGMOID) {
		LLVMValueRef ex = cm(g, "exp", LLVMBuildFNeg(b, vd, ""));
		o = to_f32(
		    g, LLVMBuildFDiv(b, f64c(g, 1.0), LLVMBuildFAdd(b, f64c(g, 1.0), ex, ""), ""));
	} else {
		LLVMValueRef sp = cm(g, "log1p", cm(g, "exp", vd));
		sp = to_f32(g, sel_gt(g, vd, f64c(g, 20.0), vd, sp));
		o = to_f32(g, intr1(g, "llvm.sqrt", LLVMBuildFPExt(b, sp, g->t_f64, "")));
	}
	stf(g, o, s, i);
	lp_close(g, &e);
}

/* p[off..off+n) = the statistics' router probability of scores s (prob_vec):
 * the softmax itself, or the scores normalized to sum 1; times mul (NULL: 1). */
static void probs(struct rg *g, enum moe_score sc, LLVMValueRef s, LLVMValueRef p, LLVMValueRef off,
		  uint32_t n, LLVMValueRef mul)
{
	LLVMBuilderRef b = g->b;
	struct lp e;
	LLVMValueRef sum = NULL;
	if (sc != MOE_SCORE_SOFTMAX) {
		LLVMValueRef acc = alloca_(g, g->t_f32, 1, "psum");
		st(g, f32c(g, 0.0), acc);
		lp_open(g, &e, i64c(g, 0), i64c(g, n), "p.sum");
		st(g,
		   LLVMBuildFAdd(b, ld(g, g->t_f32, acc),
				 ldf(g, s, LLVMBuildNSWAdd(b, off, e.iv, "")), ""),
		   acc);
		lp_close(g, &e);
		sum = ld(g, g->t_f32, acc);
	}
	lp_open(g, &e, i64c(g, 0), i64c(g, n), "p.set");
	LLVMValueRef i = LLVMBuildNSWAdd(b, off, e.iv, "");
	LLVMValueRef v = ldf(g, s, i);
	if (sum)
		v = sel_gt(g, sum, f32c(g, 0.0), LLVMBuildFDiv(b, v, sum, ""), f32c(g, 0.0));
	if (mul)
		v = LLVMBuildFMul(b, v, mul, "");
	stf(g, v, p, i);
	lp_close(g, &e);
}

/* top-k of c[off..off+n) into idx[0..k) (i64, relative to off), ranked: the
 * larger value first, ties to the lower index; taken[] is i8 scratch. */
static void topk(struct rg *g, LLVMValueRef c, LLVMValueRef off, uint32_t n, uint32_t k,
		 LLVMValueRef taken, LLVMValueRef idx)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef best = alloca_(g, g->t_i64, 1, "best"), bv = alloca_(g, g->t_f32, 1, "bv");
	struct lp e, j;
	lp_open(g, &e, i64c(g, 0), i64c(g, n), "tk.clr");
	st(g, LLVMConstInt(g->t_i8, 0, 0), at(g, g->t_i8, taken, e.iv));
	lp_close(g, &e);
	lp_open(g, &j, i64c(g, 0), i64c(g, k), "tk.j");
	st(g, i64c(g, -1), best);
	st(g, f32c(g, -INFINITY), bv);
	lp_open(g, &e, i64c(g, 0), i64c(g, n), "tk.e");
	LLVMValueRef v = ldf(g, c, LLVMBuildNSWAdd(b, off, e.iv, ""));
	LLVMValueRef fr = LLVMBuildICmp(b, LLVMIntEQ, ld(g, g->t_i8, at(g, g->t_i8, taken, e.iv)),
					LLVMConstInt(g->t_i8, 0, 0), "");
	LLVMValueRef bi = ld(g, g->t_i64, best), bvv = ld(g, g->t_f32, bv);
	LLVMValueRef none = LLVMBuildICmp(b, LLVMIntSLT, bi, i64c(g, 0), "");
	LLVMValueRef gt = LLVMBuildFCmp(b, LLVMRealOGT, v, bvv, "");
	LLVMValueRef take = LLVMBuildAnd(b, fr, LLVMBuildOr(b, none, gt, ""), "");
	st(g, LLVMBuildSelect(b, take, e.iv, bi, ""), best);
	st(g, LLVMBuildSelect(b, take, v, bvv, ""), bv);
	lp_close(g, &e);
	LLVMValueRef ch = ld(g, g->t_i64, best);
	st(g, LLVMConstInt(g->t_i8, 1, 0), at(g, g->t_i8, taken, ch));
	st(g, ch, at(g, g->t_i64, idx, j.iv));
	lp_close(g, &j);
}

/* w[0..n) /= max(S + eps, min) (the reference's normalize), no scale. */
static void normalize(struct rg *g, LLVMValueRef w, uint32_t n)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	if (d->norm == MOE_NORM_NONE)
		return;
	int lpn = d->norm == MOE_NORM_LP;
	LLVMTypeRef t = lpn ? g->t_f64 : g->t_f32;
	LLVMValueRef acc = alloca_(g, t, 1, "nsum");
	st(g, LLVMConstReal(t, 0.0), acc);
	struct lp j;
	lp_open(g, &j, i64c(g, 0), i64c(g, n), "n.sum");
	LLVMValueRef v = ldf(g, w, j.iv);
	if (lpn) {
		v = intr1(g, "llvm.fabs", LLVMBuildFPExt(b, v, g->t_f64, ""));
		v = pow_d(g, v, d->norm_p);
	}
	st(g, LLVMBuildFAdd(b, ld(g, t, acc), v, ""), acc);
	lp_close(g, &j);
	LLVMValueRef den = ld(g, t, acc);
	if (lpn)
		den = to_f32(g, pow_d(g, den, 1.0 / (double)d->norm_p));
	den = LLVMBuildFAdd(b, den, f32c(g, d->norm_eps), "");
	LLVMValueRef mn = f32c(g, d->norm_min);
	den = LLVMBuildSelect(b, LLVMBuildFCmp(b, LLVMRealOLT, den, mn, ""), mn, den, "");
	LLVMValueRef pos = LLVMBuildFCmp(b, LLVMRealOGT, den, f32c(g, 0.0), "");
	LLVMBasicBlockRef end = when(g, pos);
	lp_open(g, &j, i64c(g, 0), i64c(g, n), "n.div");
	stf(g, LLVMBuildFDiv(b, ldf(g, w, j.iv), den, ""), w, j.iv);
	lp_close(g, &j);
	when_end(g, end);
}

/* The research router ------------------------------------------------------------ */

enum {
	A_X,
	A_T0,
	A_T1,
	A_ROUTER,
	A_RBIAS,
	A_SBIAS,
	A_GROUP,
	A_NOISE,
	A_SEED,
	A_LAYER,
	A_TRAIN,
	A_LOGITS,
	A_IDS,
	A_WTS,
	A_PROB,
	A_PRIO,
	A_COUNT
};

/* Logits of one token: router panels . x (+ bias), plus the learned gaussian
 * noise z * softplus(noise . x) when training. */
static void logits(struct rg *g, LLVMValueRef xrow, LLVMValueRef t, LLVMValueRef l, LLVMValueRef nl)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts;
	panel_dots(g, xrow, prm(g, A_ROUTER), E, l);
	struct lp e;
	if (d->router_bias) {
		lp_open(g, &e, i64c(g, 0), i64c(g, E), "bias");
		stf(g, LLVMBuildFAdd(b, ldf(g, l, e.iv), ldf(g, prm(g, A_RBIAS), e.iv), ""), l,
		    e.iv);
		lp_close(g, &e);
	}
	if (d->noise != MOE_NOISE_LEARNED_GAUSSIAN)
		return;
	LLVMValueRef tr =
	    LLVMBuildICmp(b, LLVMIntNE, prm(g, A_TRAIN), LLVMConstInt(g->t_i32, 0, 0), "training");
	LLVMBasicBlockRef end = when(g, tr);
	panel_dots(g, xrow, prm(g, A_NOISE), E, nl);
	lp_open(g, &e, i64c(g, 0), i64c(g, E), "noise");
	LLVMValueRef z = rng_normal(g, prm(g, A_SEED), prm(g, A_LAYER), t, e.iv);
	LLVMValueRef vd = LLVMBuildFPExt(b, ldf(g, nl, e.iv), g->t_f64, "");
	LLVMValueRef sp = cm(g, "log1p", cm(g, "exp", vd));
	sp = to_f32(g, sel_gt(g, vd, f64c(g, 20.0), vd, sp));
	stf(g, LLVMBuildFAdd(b, ldf(g, l, e.iv), LLVMBuildFMul(b, z, sp, ""), ""), l, e.iv);
	lp_close(g, &e);
	when_end(g, end);
}

static void put_slot(struct rg *g, LLVMValueRef base, int64_t j, LLVMValueRef id, LLVMValueRef w)
{
	LLVMValueRef s = LLVMBuildNSWAdd(g->b, base, i64c(g, j), "");
	st(g, LLVMBuildTrunc(g->b, id, g->t_i32, ""), at(g, g->t_i32, prm(g, A_IDS), s));
	stf(g, w, prm(g, A_WTS), s);
}

/* Sparsemixer (Phi-3.5, inference): argmax, mask logits whose relative gap
 * to it exceeds 2 eps, softmax; then the same without the first choice. */
static void sparsemixer(struct rg *g, LLVMValueRef l, LLVMValueRef m, LLVMValueRef s,
			LLVMValueRef wbase)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts;
	LLVMValueRef eps2 = f32c(g, 2.0f * d->sparsemixer_eps), ninf = f32c(g, -INFINITY);
	LLVMValueRef arg = alloca_(g, g->t_i64, 1, "arg"), e1v = NULL;
	LLVMValueRef w[2], ids[2];
	for (int pass = 0; pass < 2; pass++) {
		struct lp e;
		st(g,
		   pass == 0 ? i64c(g, 0)
			     : LLVMBuildZExt(b, LLVMBuildICmp(b, LLVMIntEQ, e1v, i64c(g, 0), ""),
					     g->t_i64, ""),
		   arg);
		lp_open(g, &e, i64c(g, pass == 0 ? 1 : 0), i64c(g, E), "sx.arg");
		LLVMValueRef a = ld(g, g->t_i64, arg);
		LLVMValueRef gt = LLVMBuildFCmp(b, LLVMRealOGT, ldf(g, l, e.iv), ldf(g, l, a), "");
		if (pass == 1)
			gt = LLVMBuildAnd(b, gt, LLVMBuildICmp(b, LLVMIntNE, e.iv, e1v, ""), "");
		st(g, LLVMBuildSelect(b, gt, e.iv, a, ""), arg);
		lp_close(g, &e);
		LLVMValueRef ei = ld(g, g->t_i64, arg);
		LLVMValueRef mv = ldf(g, l, ei);
		lp_open(g, &e, i64c(g, 0), i64c(g, E), "sx.mask");
		LLVMValueRef v = ldf(g, l, e.iv);
		LLVMValueRef av = intr1(g, "llvm.fabs", v);
		LLVMValueRef den = sel_gt(g, av, mv, av, mv);
		LLVMValueRef gap =
		    LLVMBuildFCmp(b, LLVMRealOGT,
				  LLVMBuildFDiv(b, LLVMBuildFSub(b, mv, v, ""), den, ""), eps2, "");
		if (pass == 1)
			gap = LLVMBuildOr(b, gap, LLVMBuildICmp(b, LLVMIntEQ, e.iv, e1v, ""), "");
		stf(g, LLVMBuildSelect(b, gap, ninf, v, ""), m, e.iv);
		lp_close(g, &e);
		scores(g, MOE_SCORE_SOFTMAX, m, s, i64c(g, 0), E);
		ids[pass] = ei;
		w[pass] = LLVMBuildFMul(b, ldf(g, s, ei), f32c(g, d->scale), "");
		if (pass == 0)
			e1v = ei;
	}
	put_slot(g, wbase, 0, ids[0], w[0]);
	put_slot(g, wbase, 1, ids[1], w[1]);
}

/* Hierarchical (Shazeer 2017): gate over groups (level-1 router, no noise),
 * a gate inside each chosen group over the level-2 logits; weight = product
 * of the normalized gates, times scale. */
static void hierarchical(struct rg *g, LLVMValueRef xrow, LLVMValueRef l, LLVMValueRef s,
			 LLVMValueRef c, LLVMValueRef prow, LLVMValueRef wbase)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, G = d->levels[0].groups, n = E / G;
	uint32_t k1 = d->levels[0].top_k, k2 = d->levels[1].top_k;
	LLVMValueRef gl = alloca_(g, g->t_f32, G, "gl"), gs = alloca_(g, g->t_f32, G, "gs");
	LLVMValueRef gp = alloca_(g, g->t_f32, G, "gp");
	LLVMValueRef gw = alloca_(g, g->t_f32, k1, "gw"), w2 = alloca_(g, g->t_f32, k2, "w2");
	LLVMValueRef gidx = alloca_(g, g->t_i64, k1, "gidx"), idx = alloca_(g, g->t_i64, k2, "idx");
	LLVMValueRef gtk = alloca_(g, g->t_i8, G, "gtaken"), tk = alloca_(g, g->t_i8, n, "taken");
	LLVMValueRef zero = i64c(g, 0);
	panel_dots(g, xrow, prm(g, A_GROUP), G, gl);
	scores(g, d->score, gl, gs, zero, G);
	topk(g, gs, zero, G, k1, gtk, gidx);
	struct lp j, i, gr;
	lp_open(g, &j, zero, i64c(g, k1), "h.gw");
	stf(g, ldf(g, gs, ld(g, g->t_i64, at(g, g->t_i64, gidx, j.iv))), gw, j.iv);
	lp_close(g, &j);
	normalize(g, gw, k1);
	lp_open(g, &gr, zero, i64c(g, G), "h.s2");
	scores(g, d->score, l, s, LLVMBuildNSWMul(b, gr.iv, i64c(g, n), ""), n);
	lp_close(g, &gr);
	lp_open(g, &j, zero, i64c(g, k1), "h.j");
	LLVMValueRef grp = ld(g, g->t_i64, at(g, g->t_i64, gidx, j.iv));
	LLVMValueRef off = LLVMBuildNSWMul(b, grp, i64c(g, n), "goff");
	lp_open(g, &i, zero, i64c(g, n), "h.c");
	LLVMValueRef ei = LLVMBuildNSWAdd(b, off, i.iv, "");
	LLVMValueRef v = ldf(g, s, ei);
	if (d->select_bias)
		v = LLVMBuildFAdd(b, v, ldf(g, prm(g, A_SBIAS), ei), "");
	stf(g, v, c, ei);
	lp_close(g, &i);
	topk(g, c, off, n, k2, tk, idx);
	lp_open(g, &i, zero, i64c(g, k2), "h.w2");
	LLVMValueRef e = LLVMBuildNSWAdd(b, off, ld(g, g->t_i64, at(g, g->t_i64, idx, i.iv)), "");
	stf(g, ldf(g, s, e), w2, i.iv);
	lp_close(g, &i);
	normalize(g, w2, k2);
	LLVMValueRef g1 = ldf(g, gw, j.iv);
	LLVMValueRef sbase =
	    LLVMBuildNSWAdd(b, wbase, LLVMBuildNSWMul(b, j.iv, i64c(g, k2), ""), "");
	lp_open(g, &i, zero, i64c(g, k2), "h.out");
	LLVMValueRef e2 = LLVMBuildNSWAdd(b, off, ld(g, g->t_i64, at(g, g->t_i64, idx, i.iv)), "");
	LLVMValueRef wv =
	    LLVMBuildFMul(b, LLVMBuildFMul(b, g1, ldf(g, w2, i.iv), ""), f32c(g, d->scale), "");
	LLVMValueRef slot = LLVMBuildNSWAdd(b, sbase, i.iv, "");
	st(g, LLVMBuildTrunc(b, e2, g->t_i32, ""), at(g, g->t_i32, prm(g, A_IDS), slot));
	stf(g, wv, prm(g, A_WTS), slot);
	lp_close(g, &i);
	lp_close(g, &j);
	/* statistics: level-1 probability times the in-group probability */
	probs(g, d->score, gs, gp, zero, G, NULL);
	lp_open(g, &gr, zero, i64c(g, G), "h.p");
	probs(g, d->score, s, prow, LLVMBuildNSWMul(b, gr.iv, i64c(g, n), ""), n,
	      ldf(g, gp, gr.iv));
	lp_close(g, &gr);
}

/* Noisy token choice: scores, selection bias, top-k, normalize, scale. */
static void noisy_topk(struct rg *g, LLVMValueRef l, LLVMValueRef s, LLVMValueRef c,
		       LLVMValueRef prow, LLVMValueRef t, LLVMValueRef wbase)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, k = d->top_k;
	LLVMValueRef zero = i64c(g, 0);
	LLVMValueRef idx = alloca_(g, g->t_i64, k, "idx"), tk = alloca_(g, g->t_i8, E, "taken");
	LLVMValueRef w = alloca_(g, g->t_f32, k, "w");
	scores(g, d->score, l, s, zero, E);
	struct lp e;
	lp_open(g, &e, zero, i64c(g, E), "n.c");
	LLVMValueRef v = ldf(g, s, e.iv);
	if (d->select_bias)
		v = LLVMBuildFAdd(b, v, ldf(g, prm(g, A_SBIAS), e.iv), "");
	stf(g, v, c, e.iv);
	lp_close(g, &e);
	topk(g, c, zero, E, k, tk, idx);
	lp_open(g, &e, zero, i64c(g, k), "n.w");
	stf(g, ldf(g, s, ld(g, g->t_i64, at(g, g->t_i64, idx, e.iv))), w, e.iv);
	lp_close(g, &e);
	normalize(g, w, k);
	lp_open(g, &e, zero, i64c(g, k), "n.out");
	LLVMValueRef slot = LLVMBuildNSWAdd(b, wbase, e.iv, "");
	st(g, LLVMBuildTrunc(b, ld(g, g->t_i64, at(g, g->t_i64, idx, e.iv)), g->t_i32, ""),
	   at(g, g->t_i32, prm(g, A_IDS), slot));
	LLVMValueRef wv = ldf(g, w, e.iv);
	if (d->scale != 1.0f)
		wv = LLVMBuildFMul(b, wv, f32c(g, d->scale), "");
	stf(g, wv, prm(g, A_WTS), slot);
	lp_close(g, &e);
	LLVMValueRef first = ld(g, g->t_i64, idx);
	stf(g, ldf(g, c, first), prm(g, A_PRIO), t);
	probs(g, d->score, s, prow, zero, E, NULL);
}

static void gen_route_x(struct rg *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, H = d->hidden, W = moe_desc_route_width(d);
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[A_COUNT] = {P, I, I, P, P, P, P, P, I, I, g->t_i32, P, P, P, P, P};
	static const char *const pn[A_COUNT] = {
	    "x",    "t0",    "t1",       "router", "router_bias", "select_bias", "group", "noise",
	    "seed", "layer", "training", "logits", "ids",         "weights",     "prob",  "prio"};
	fn_begin(g, "moe_route_x", params, pn, A_COUNT);
	LLVMValueRef l = alloca_(g, g->t_f32, E, "l"), nl = alloca_(g, g->t_f32, E, "nl");
	LLVMValueRef s = alloca_(g, g->t_f32, E, "s"), c = alloca_(g, g->t_f32, E, "c");
	struct lp t, e;
	lp_open(g, &t, prm(g, A_T0), prm(g, A_T1), "t");
	LLVMValueRef xrow = at(g, g->t_f32, prm(g, A_X), LLVMBuildNSWMul(b, t.iv, i64c(g, H), ""));
	logits(g, xrow, t.iv, l, nl);
	LLVMValueRef rowE = LLVMBuildNSWMul(b, t.iv, i64c(g, E), "");
	LLVMValueRef lrow = at(g, g->t_f32, prm(g, A_LOGITS), rowE);
	LLVMValueRef prow = at(g, g->t_f32, prm(g, A_PROB), rowE);
	lp_open(g, &e, i64c(g, 0), i64c(g, E), "lcopy");
	stf(g, ldf(g, l, e.iv), lrow, e.iv);
	lp_close(g, &e);
	LLVMValueRef wbase = LLVMBuildNSWMul(b, t.iv, i64c(g, W), "wbase");
	if (d->mode == MOE_MODE_SPARSEMIXER) {
		sparsemixer(g, l, c, s, wbase);
		scores(g, MOE_SCORE_SOFTMAX, l, prow, i64c(g, 0), E);
		stf(g, f32c(g, 0.0), prm(g, A_PRIO), t.iv);
	} else if (d->mode == MOE_MODE_HIERARCHICAL) {
		hierarchical(g, xrow, l, s, c, prow, wbase);
		stf(g, f32c(g, 0.0), prm(g, A_PRIO), t.iv);
	} else {
		noisy_topk(g, l, s, c, prow, t.iv, wbase);
	}
	lp_close(g, &t);
	fn_end(g);
}

/* Input jitter: xj = x * (float)(1 - eps + 2 eps u), u uniform per
 * (seed, layer, token, column). */
static void gen_jitter(struct rg *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t H = d->hidden;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, I, I, I, I};
	static const char *const pn[] = {"x", "xj", "t0", "t1", "seed", "layer"};
	fn_begin(g, "moe_jitter", params, pn, 6);
	double eps = d->jitter_eps;
	struct lp t, h;
	lp_open(g, &t, prm(g, 2), prm(g, 3), "t");
	LLVMValueRef row = LLVMBuildNSWMul(b, t.iv, i64c(g, H), "");
	lp_open(g, &h, i64c(g, 0), i64c(g, H), "h");
	LLVMValueRef u = rng_uniform(g, rng_hash(g, prm(g, 4), prm(g, 5), t.iv, h.iv));
	LLVMValueRef m =
	    LLVMBuildFMul(b, f64c(g, 2.0 * eps), LLVMBuildFPExt(b, u, g->t_f64, ""), "");
	m = to_f32(g, LLVMBuildFAdd(b, f64c(g, 1.0 - eps), m, ""));
	LLVMValueRef i = LLVMBuildNSWAdd(b, row, h.iv, "");
	stf(g, LLVMBuildFMul(b, ldf(g, prm(g, 0), i), m, ""), prm(g, 1), i);
	lp_close(g, &h);
	lp_close(g, &t);
	fn_end(g);
}

int moe_plan_research(const struct moe_desc *d, struct moe_diag *diag)
{
	int mode = d->mode;
	int noisy_tc = mode == MOE_MODE_TOKEN_CHOICE && d->noise != MOE_NOISE_NONE;
	if (mode != MOE_MODE_SPARSEMIXER && mode != MOE_MODE_HIERARCHICAL && !noisy_tc)
		return 0;
	int bad = 0;
	uint32_t E = d->n_experts;
	if (mode == MOE_MODE_SPARSEMIXER &&
	    (d->top_k != 2 || E < 2 || !(d->sparsemixer_eps >= 0.0f) ||
	     !isfinite(d->sparsemixer_eps))) {
		moe_diag_error(diag, "invalid sparsemixer (top_k %u, %u experts, eps %g)", d->top_k,
			       E, (double)d->sparsemixer_eps);
		bad = 1;
	}
	if (mode == MOE_MODE_HIERARCHICAL) {
		uint32_t G = d->levels[0].groups, k1 = d->levels[0].top_k, k2 = d->levels[1].top_k;
		if (d->n_levels != 2 || G == 0 || E % G || k1 == 0 || k1 > G || k2 == 0 ||
		    k2 > E / G || d->top_k != k1 * k2) {
			moe_diag_error(diag,
				       "invalid hierarchical levels (%u groups, top_k %u and %u) "
				       "for %u experts",
				       G, k1, k2, E);
			bad = 1;
		}
	}
	if (mode != MOE_MODE_TOKEN_CHOICE && d->capacity != MOE_CAPACITY_NONE) {
		moe_diag_error(diag, "router.capacity with mode %s is not generated for target cpu",
			       moe_mode_names[mode]);
		bad = 1;
	}
	if (d->noise == MOE_NOISE_LEARNED_GAUSSIAN && mode == MOE_MODE_TOKEN_CHOICE) {
		if (d->n_groups > 1) {
			moe_diag_error(diag, "router.groups with learned_gaussian noise is not "
					     "generated for target cpu yet");
			bad = 1;
		}
		if (d->capacity != MOE_CAPACITY_NONE && d->capacity_norm_after_drop) {
			moe_diag_error(diag, "capacity normalize_after_drop with learned_gaussian "
					     "noise is not generated for target cpu yet");
			bad = 1;
		}
	}
	if (d->noise == MOE_NOISE_JITTER && !(isfinite(d->jitter_eps) && d->jitter_eps >= 0.0f)) {
		moe_diag_error(diag, "invalid jitter eps %g", (double)d->jitter_eps);
		bad = 1;
	}
	return bad ? -1 : 1;
}

int moe_cpu_research_route(const struct moe_desc *d)
{
	return d->mode == MOE_MODE_SPARSEMIXER || d->mode == MOE_MODE_HIERARCHICAL ||
	       (d->mode == MOE_MODE_TOKEN_CHOICE && d->noise == MOE_NOISE_LEARNED_GAUSSIAN);
}

void moe_cpu_research_build(struct LLVMOpaqueContext *ctx, struct LLVMOpaqueModule *mod,
			    struct LLVMOpaqueBuilder *b, const struct moe_plan *p,
			    struct LLVMOpaqueValue *fns[MOE_RESEARCH_FNS])
{
	struct rg g = {.ctx = ctx, .mod = mod, .b = b, .d = p->desc};
	g.t_void = LLVMVoidTypeInContext(ctx);
	g.t_i8 = LLVMInt8TypeInContext(ctx);
	g.t_i32 = LLVMInt32TypeInContext(ctx);
	g.t_i64 = LLVMInt64TypeInContext(ctx);
	g.t_f32 = LLVMFloatTypeInContext(ctx);
	g.t_f64 = LLVMDoubleTypeInContext(ctx);
	g.t_ptr = LLVMPointerTypeInContext(ctx, 0);
	g.t_v8f = LLVMVectorType(g.t_f32, 8);
	for (int i = 0; i < MOE_RESEARCH_FNS; i++)
		fns[i] = NULL;
	if (moe_cpu_research_route(g.d)) {
		gen_route_x(&g);
		fns[0] = g.fn;
	}
	if (g.d->noise == MOE_NOISE_JITTER) {
		gen_jitter(&g);
		fns[1] = g.fn;
	}
}
