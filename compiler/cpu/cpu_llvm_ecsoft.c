/* cpu_llvm_ecsoft.c: expert-choice routing for the CPU backend, emitted into
 * the module cpu_llvm.c builds: a per-token score router (logits, scores,
 * statistics probability) and a per-expert top-C selection over the whole
 * token group, both copying the reference's arithmetic and tie rule. */
#include "backend.h"
#include "cpu_llvm_util.h"

#include <llvm-c/Core.h>

#include <math.h>
#include <string.h>

/* Router pieces ----------------------------------------------------------------- */

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
static void gen_ec_route(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, H = d->hidden;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[A_COUNT] = {P, I, I, P, P, P, P, P, I, I, g->t_i32, P, P, P, P, P};
	static const char *const pn[A_COUNT] = {
	    "x",    "t0",    "t1",       "router", "router_bias", "select_bias", "group", "noise",
	    "seed", "layer", "training", "logits", "ids",         "weights",     "prob",  "prio"};
	moe_ll_fn_begin(g, "moe_route_x", params, pn, A_COUNT);
	LLVMValueRef l = moe_ll_alloca(g, g->t_f32, E, "l");
	struct moe_ll_loop t, e;
	moe_ll_loop_open(g, &t, moe_ll_prm(g, A_T0), moe_ll_prm(g, A_T1), "t");
	LLVMValueRef xrow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, A_X),
				      LLVMBuildNSWMul(b, t.iv, moe_ll_i64c(g, H), ""));
	moe_ll_panel_dots(g, xrow, moe_ll_prm(g, A_ROUTER), E, l);
	LLVMValueRef rowE = LLVMBuildNSWMul(b, t.iv, moe_ll_i64c(g, E), "");
	LLVMValueRef lrow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, A_LOGITS), rowE);
	LLVMValueRef srow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, A_WTS), rowE);
	LLVMValueRef prow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, A_PROB), rowE);
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, E), "lcopy");
	LLVMValueRef v = moe_ll_ldf(g, l, e.iv);
	if (d->router_bias)
		v = LLVMBuildFAdd(b, v, moe_ll_ldf(g, moe_ll_prm(g, A_RBIAS), e.iv), "");
	moe_ll_stf(g, v, lrow, e.iv);
	moe_ll_loop_close(g, &e);
	moe_ll_scores(g, d->score, lrow, srow, moe_ll_i64c(g, 0), E);
	moe_ll_probs(g, d->score, srow, prow, moe_ll_i64c(g, 0), E, NULL);
	moe_ll_stf(g, moe_ll_f32c(g, 0.0), moe_ll_prm(g, A_PRIO), t.iv);
	moe_ll_loop_close(g, &t);
	moe_ll_fn_end(g);
}

/* a (value va, later index) ranks before b (vb, earlier index): va is not
 * NaN and (vb is NaN or va > vb); equal values keep the earlier index first. */
static LLVMValueRef later_ranks_before(struct moe_ll *g, LLVMValueRef va, LLVMValueRef vb)
{
	LLVMValueRef ord = LLVMBuildFCmp(g->b, LLVMRealORD, va, va, "");
	return LLVMBuildAnd(g->b, ord, LLVMBuildFCmp(g->b, LLVMRealUGT, va, vb, ""), "");
}

/* moe_ec_select(T, C, e0, e1, ids, weights, pick): for experts [e0, e1), the
 * top-C tokens of column e of the scores in weights[T, E] (value descending,
 * ties to the lower token, NaN last): ids[t, e] = e and weights[t, e] =
 * S * scale for the chosen, ids[t, e] = -1 for the rest. Insertion into the
 * sorted prefix pick[0..m) (C i64 of scratch), as the reference's top-k. */
static void gen_ec_select(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {I, I, I, I, P, P, P};
	static const char *const pn[] = {"T", "C", "e0", "e1", "ids", "weights", "pick"};
	moe_ll_fn_begin(g, "moe_ec_select", params, pn, 7);
	LLVMValueRef T = moe_ll_prm(g, 0), C = moe_ll_prm(g, 1), ids = moe_ll_prm(g, 4),
		     w = moe_ll_prm(g, 5), pick = moe_ll_prm(g, 6);
	LLVMValueRef m = moe_ll_alloca(g, g->t_i64, 1, "m"),
		     pos = moe_ll_alloca(g, g->t_i64, 1, "pos");
	struct moe_ll_loop e, t, k;
	moe_ll_loop_open(g, &e, moe_ll_prm(g, 2), moe_ll_prm(g, 3), "e");
	LLVMValueRef e32 = LLVMBuildTrunc(b, e.iv, g->t_i32, "");
	moe_ll_st(g, moe_ll_i64c(g, 0), m);
	moe_ll_loop_open(g, &t, moe_ll_i64c(g, 0), T, "t");
	LLVMValueRef s =
	    LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, t.iv, moe_ll_i64c(g, E), ""), e.iv, "");
	moe_ll_st(g, LLVMConstInt(g->t_i32, (unsigned long long)-1, 1),
		  moe_ll_at(g, g->t_i32, ids, s));
	LLVMValueRef v = moe_ll_ldf(g, w, s);
	LLVMValueRef mv = moe_ll_ld(g, g->t_i64, m);
	moe_ll_st(g, mv, pos);
	/* while (pos > 0 && v ranks before the entry at pos - 1) pos-- */
	LLVMBasicBlockRef head = moe_ll_bb(g, "ins.head"), chk = moe_ll_bb(g, "ins.chk"),
			  dec = moe_ll_bb(g, "ins.dec"), done = moe_ll_bb(g, "ins.done");
	LLVMBuildBr(b, head);
	LLVMPositionBuilderAtEnd(b, head);
	LLVMValueRef p = moe_ll_ld(g, g->t_i64, pos);
	LLVMBuildCondBr(b, LLVMBuildICmp(b, LLVMIntSGT, p, moe_ll_i64c(g, 0), ""), chk, done);
	LLVMPositionBuilderAtEnd(b, chk);
	LLVMValueRef pm1 = LLVMBuildNSWSub(b, p, moe_ll_i64c(g, 1), "");
	LLVMValueRef q = moe_ll_ld(g, g->t_i64, moe_ll_at(g, g->t_i64, pick, pm1));
	LLVMValueRef vq = moe_ll_ldf(
	    g, w, LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, q, moe_ll_i64c(g, E), ""), e.iv, ""));
	LLVMBuildCondBr(b, later_ranks_before(g, v, vq), dec, done);
	LLVMPositionBuilderAtEnd(b, dec);
	moe_ll_st(g, pm1, pos);
	LLVMBuildBr(b, head);
	LLVMPositionBuilderAtEnd(b, done);
	p = moe_ll_ld(g, g->t_i64, pos);
	LLVMBasicBlockRef fits = moe_ll_when(g, LLVMBuildICmp(b, LLVMIntSLT, p, C, ""));
	/* shift pick[p .. last) up by one; last = min(m, C - 1) */
	LLVMValueRef cm1 = LLVMBuildNSWSub(b, C, moe_ll_i64c(g, 1), "");
	LLVMValueRef last =
	    LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, mv, cm1, ""), mv, cm1, "last");
	moe_ll_loop_open(g, &k, moe_ll_i64c(g, 0), LLVMBuildNSWSub(b, last, p, ""), "shift");
	LLVMValueRef j = LLVMBuildNSWSub(b, last, k.iv, "");
	LLVMValueRef prev =
	    moe_ll_ld(g, g->t_i64,
		      moe_ll_at(g, g->t_i64, pick, LLVMBuildNSWSub(b, j, moe_ll_i64c(g, 1), "")));
	moe_ll_st(g, prev, moe_ll_at(g, g->t_i64, pick, j));
	moe_ll_loop_close(g, &k);
	moe_ll_st(g, t.iv, moe_ll_at(g, g->t_i64, pick, p));
	LLVMValueRef grow = LLVMBuildICmp(b, LLVMIntSLT, mv, C, "");
	moe_ll_st(
	    g, LLVMBuildSelect(b, grow, LLVMBuildNSWAdd(b, mv, moe_ll_i64c(g, 1), ""), mv, ""), m);
	moe_ll_when_end(g, fits);
	moe_ll_loop_close(g, &t);
	moe_ll_loop_open(g, &k, moe_ll_i64c(g, 0), moe_ll_ld(g, g->t_i64, m), "mark");
	LLVMValueRef tk = moe_ll_ld(g, g->t_i64, moe_ll_at(g, g->t_i64, pick, k.iv));
	LLVMValueRef sk =
	    LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, tk, moe_ll_i64c(g, E), ""), e.iv, "");
	moe_ll_st(g, e32, moe_ll_at(g, g->t_i32, ids, sk));
	moe_ll_stf(g, LLVMBuildFMul(b, moe_ll_ldf(g, w, sk), moe_ll_f32c(g, d->scale), ""), w, sk);
	moe_ll_loop_close(g, &k);
	moe_ll_loop_close(g, &e);
	moe_ll_fn_end(g);
}

/* Entry points ------------------------------------------------------------------- */

void moe_cpu_ecsoft_build(struct LLVMOpaqueContext *ctx, struct LLVMOpaqueModule *mod,
			  struct LLVMOpaqueBuilder *b, const struct moe_plan *p,
			  struct LLVMOpaqueValue *k[MOE_KERNEL_COUNT])
{
	struct moe_ll g;
	moe_ll_init(&g, ctx, mod, b, p->desc);
	gen_ec_route(&g);
	k[MOE_KERNEL_ROUTE_X] = g.fn;
	gen_ec_select(&g);
	k[MOE_KERNEL_EC_SELECT] = g.fn;
}
