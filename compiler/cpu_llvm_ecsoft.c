/* cpu_llvm_ecsoft.c: expert-choice routing for the CPU backend, emitted into
 * the module cpu_llvm.c builds: a per-token score router (logits, scores,
 * statistics probability) and a per-expert top-C selection over the whole
 * token group, both copying the reference's arithmetic and tie rule. */
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

/* Expert choice ------------------------------------------------------------------ */

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

/* The token side of expert choice, with moe_route_x_fn's signature: logits
 * (+ bias), the scores S[t, :] into weights[t, E] (route width E) for the
 * selection, and the statistics' probability. No noise: refused at plan time. */
static void gen_ec_route(struct rg *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, H = d->hidden;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[A_COUNT] = {P, I, I, P, P, P, P, P, I, I, g->t_i32, P, P, P, P, P};
	static const char *const pn[A_COUNT] = {
	    "x",    "t0",    "t1",       "router", "router_bias", "select_bias", "group", "noise",
	    "seed", "layer", "training", "logits", "ids",         "weights",     "prob",  "prio"};
	fn_begin(g, "moe_route_x", params, pn, A_COUNT);
	LLVMValueRef l = alloca_(g, g->t_f32, E, "l");
	struct lp t, e;
	lp_open(g, &t, prm(g, A_T0), prm(g, A_T1), "t");
	LLVMValueRef xrow = at(g, g->t_f32, prm(g, A_X), LLVMBuildNSWMul(b, t.iv, i64c(g, H), ""));
	panel_dots(g, xrow, prm(g, A_ROUTER), E, l);
	LLVMValueRef rowE = LLVMBuildNSWMul(b, t.iv, i64c(g, E), "");
	LLVMValueRef lrow = at(g, g->t_f32, prm(g, A_LOGITS), rowE);
	LLVMValueRef srow = at(g, g->t_f32, prm(g, A_WTS), rowE);
	LLVMValueRef prow = at(g, g->t_f32, prm(g, A_PROB), rowE);
	lp_open(g, &e, i64c(g, 0), i64c(g, E), "lcopy");
	LLVMValueRef v = ldf(g, l, e.iv);
	if (d->router_bias)
		v = LLVMBuildFAdd(b, v, ldf(g, prm(g, A_RBIAS), e.iv), "");
	stf(g, v, lrow, e.iv);
	lp_close(g, &e);
	scores(g, d->score, lrow, srow, i64c(g, 0), E);
	probs(g, d->score, srow, prow, i64c(g, 0), E, NULL);
	stf(g, f32c(g, 0.0), prm(g, A_PRIO), t.iv);
	lp_close(g, &t);
	fn_end(g);
}

/* a (value va, later index) ranks before b (vb, earlier index): va is not
 * NaN and (vb is NaN or va > vb); equal values keep the earlier index first. */
static LLVMValueRef later_ranks_before(struct rg *g, LLVMValueRef va, LLVMValueRef vb)
{
	LLVMValueRef ord = LLVMBuildFCmp(g->b, LLVMRealORD, va, va, "");
	return LLVMBuildAnd(g->b, ord, LLVMBuildFCmp(g->b, LLVMRealUGT, va, vb, ""), "");
}

/* moe_ec_select(T, C, e0, e1, ids, weights, pick): for experts [e0, e1), the
 * top-C tokens of column e of the scores in weights[T, E] (value descending,
 * ties to the lower token, NaN last): ids[t, e] = e and weights[t, e] =
 * S * scale for the chosen, ids[t, e] = -1 for the rest. Insertion into the
 * sorted prefix pick[0..m) (C i64 of scratch), as the reference's top-k. */
static void gen_ec_select(struct rg *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {I, I, I, I, P, P, P};
	static const char *const pn[] = {"T", "C", "e0", "e1", "ids", "weights", "pick"};
	fn_begin(g, "moe_ec_select", params, pn, 7);
	LLVMValueRef T = prm(g, 0), C = prm(g, 1), ids = prm(g, 4), w = prm(g, 5), pick = prm(g, 6);
	LLVMValueRef m = alloca_(g, g->t_i64, 1, "m"), pos = alloca_(g, g->t_i64, 1, "pos");
	struct lp e, t, k;
	lp_open(g, &e, prm(g, 2), prm(g, 3), "e");
	LLVMValueRef e32 = LLVMBuildTrunc(b, e.iv, g->t_i32, "");
	st(g, i64c(g, 0), m);
	lp_open(g, &t, i64c(g, 0), T, "t");
	LLVMValueRef s = LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, t.iv, i64c(g, E), ""), e.iv, "");
	st(g, LLVMConstInt(g->t_i32, (unsigned long long)-1, 1), at(g, g->t_i32, ids, s));
	LLVMValueRef v = ldf(g, w, s);
	LLVMValueRef mv = ld(g, g->t_i64, m);
	st(g, mv, pos);
	/* while (pos > 0 && v ranks before the entry at pos - 1) pos-- */
	LLVMBasicBlockRef head = bb(g, "ins.head"), chk = bb(g, "ins.chk"), dec = bb(g, "ins.dec"),
			  done = bb(g, "ins.done");
	LLVMBuildBr(b, head);
	LLVMPositionBuilderAtEnd(b, head);
	LLVMValueRef p = ld(g, g->t_i64, pos);
	LLVMBuildCondBr(b, LLVMBuildICmp(b, LLVMIntSGT, p, i64c(g, 0), ""), chk, done);
	LLVMPositionBuilderAtEnd(b, chk);
	LLVMValueRef pm1 = LLVMBuildNSWSub(b, p, i64c(g, 1), "");
	LLVMValueRef q = ld(g, g->t_i64, at(g, g->t_i64, pick, pm1));
	LLVMValueRef vq =
	    ldf(g, w, LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, q, i64c(g, E), ""), e.iv, ""));
	LLVMBuildCondBr(b, later_ranks_before(g, v, vq), dec, done);
	LLVMPositionBuilderAtEnd(b, dec);
	st(g, pm1, pos);
	LLVMBuildBr(b, head);
	LLVMPositionBuilderAtEnd(b, done);
	p = ld(g, g->t_i64, pos);
	LLVMBasicBlockRef fits = when(g, LLVMBuildICmp(b, LLVMIntSLT, p, C, ""));
	/* shift pick[p .. last) up by one; last = min(m, C - 1) */
	LLVMValueRef cm1 = LLVMBuildNSWSub(b, C, i64c(g, 1), "");
	LLVMValueRef last =
	    LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, mv, cm1, ""), mv, cm1, "last");
	lp_open(g, &k, i64c(g, 0), LLVMBuildNSWSub(b, last, p, ""), "shift");
	LLVMValueRef j = LLVMBuildNSWSub(b, last, k.iv, "");
	LLVMValueRef prev =
	    ld(g, g->t_i64, at(g, g->t_i64, pick, LLVMBuildNSWSub(b, j, i64c(g, 1), "")));
	st(g, prev, at(g, g->t_i64, pick, j));
	lp_close(g, &k);
	st(g, t.iv, at(g, g->t_i64, pick, p));
	LLVMValueRef grow = LLVMBuildICmp(b, LLVMIntSLT, mv, C, "");
	st(g, LLVMBuildSelect(b, grow, LLVMBuildNSWAdd(b, mv, i64c(g, 1), ""), mv, ""), m);
	when_end(g, fits);
	lp_close(g, &t);
	lp_open(g, &k, i64c(g, 0), ld(g, g->t_i64, m), "mark");
	LLVMValueRef tk = ld(g, g->t_i64, at(g, g->t_i64, pick, k.iv));
	LLVMValueRef sk = LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, tk, i64c(g, E), ""), e.iv, "");
	st(g, e32, at(g, g->t_i32, ids, sk));
	stf(g, LLVMBuildFMul(b, ldf(g, w, sk), f32c(g, d->scale), ""), w, sk);
	lp_close(g, &k);
	lp_close(g, &e);
	fn_end(g);
}

/* Entry points ------------------------------------------------------------------- */

int moe_plan_ecsoft(const struct moe_desc *d, struct moe_diag *diag)
{
	if (d->mode != MOE_MODE_EXPERT_CHOICE)
		return 0;
	int bad = 0;
	if (!(d->ec_capacity_factor > 0.0f) || !isfinite(d->ec_capacity_factor)) {
		moe_diag_error(diag, "invalid expert_choice capacity_factor %g",
			       (double)d->ec_capacity_factor);
		bad = 1;
	}
	if (d->n_experts > INT32_MAX) {
		moe_diag_error(diag, "expert_choice with %u experts is too large", d->n_experts);
		bad = 1;
	}
	if (d->capacity != MOE_CAPACITY_NONE) {
		moe_diag_error(diag, "router.capacity with mode expert_choice is not generated for "
				     "target cpu");
		bad = 1;
	}
	if (d->noise == MOE_NOISE_LEARNED_GAUSSIAN) {
		moe_diag_error(diag, "learned_gaussian noise with mode expert_choice is not "
				     "generated for target cpu yet");
		bad = 1;
	}
	return bad ? -1 : 1;
}

int moe_cpu_ecsoft_route(const struct moe_desc *d)
{
	return d->mode == MOE_MODE_EXPERT_CHOICE;
}

void moe_cpu_ecsoft_build(struct LLVMOpaqueContext *ctx, struct LLVMOpaqueModule *mod,
			  struct LLVMOpaqueBuilder *b, const struct moe_plan *p,
			  struct LLVMOpaqueValue **route_x,
			  struct LLVMOpaqueValue *fns[MOE_ECSOFT_FNS])
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
	*route_x = NULL;
	for (int i = 0; i < MOE_ECSOFT_FNS; i++)
		fns[i] = NULL;
	if (g.d->mode == MOE_MODE_EXPERT_CHOICE) {
		gen_ec_route(&g);
		*route_x = g.fn;
		gen_ec_select(&g);
		fns[0] = g.fn;
	}
}
