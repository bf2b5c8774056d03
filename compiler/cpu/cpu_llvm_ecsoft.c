/* cpu_llvm_ecsoft.c: expert-choice routing for the CPU backend, emitted into
 * the module cpu_llvm.c builds: a per-token score router (logits, scores,
 * statistics probability) and a per-expert top-C selection over the whole
 * token group, both copying the reference's arithmetic and tie rule. */
#include "cpu_llvm_util.h"

#include <llvm-c/Core.h>

#include <math.h>
#include <string.h>

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
	uint32_t E = d->n_experts;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[A_COUNT] = {P, I, I, P, P, P, P, P, I, I, g->t_i32, P, P, P, P, P};
	static const char *const pn[A_COUNT] = {
	    "x",    "t0",    "t1",       "router", "router_bias", "select_bias", "group", "noise",
	    "seed", "layer", "training", "logits", "ids",         "weights",     "prob",  "prio"};
	moe_ll_fn_begin(g, "moe_route_x", params, pn, A_COUNT);
	/* the router dots of a group of tokens per panel pass (moe_ll_tgroup) */
	int64_t LE = (int64_t)moe_router_blocks(E) * MOE_RB, G = moe_ll_tgroup_size(LE);
	LLVMValueRef lb = moe_ll_alloca(g, g->t_f32, (uint64_t)(G * LE), "lb");
	struct moe_ll_tgroup tg;
	struct moe_ll_loop e;
	moe_ll_tgroup_open(g, &tg, moe_ll_prm(g, A_T0), moe_ll_prm(g, A_T1), G);
	moe_ll_tgroup_logits(g, &tg, moe_ll_prm(g, A_X), moe_ll_prm(g, A_ROUTER), E, lb);
	moe_ll_tgroup_rows(g, &tg);
	LLVMValueRef tv = tg.t, l = moe_ll_tgroup_row(g, &tg, lb, E);
	LLVMValueRef rowE = LLVMBuildNSWMul(b, tv, moe_ll_i64c(g, E), "");
	LLVMValueRef lrow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, A_LOGITS), rowE);
	LLVMValueRef srow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, A_WTS), rowE);
	LLVMValueRef prow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, A_PROB), rowE);
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, E), 1, "lcopy");
	LLVMValueRef v = moe_ll_ldf(g, l, e.iv);
	if (d->router_bias)
		v = LLVMBuildFAdd(b, v, moe_ll_ldf(g, moe_ll_prm(g, A_RBIAS), e.iv), "");
	moe_ll_stf(g, v, lrow, e.iv);
	moe_ll_loop_close(g, &e);
	moe_ll_scores(g, d->score, lrow, srow, moe_ll_i64c(g, 0), E);
	moe_ll_probs(g, d->score, srow, prow, moe_ll_i64c(g, 0), E, NULL);
	moe_ll_stf(g, moe_ll_f32c(g, 0.0), moe_ll_prm(g, A_PRIO), tv);
	moe_ll_tgroup_close(g, &tg);
	moe_ll_fn_end(g);
}

/* moe_ec_select(T, C, e0, e1, ids, weights, pick): for experts [e0, e1), the
 * top-C tokens of column e of the scores in weights[T, E] (moe_ll_topk: value
 * descending, ties to the lower token, NaN last; pick: C i64 of scratch):
 * ids[t, e] = e and weights[t, e] = S * scale for the chosen, ids[t, e] = -1
 * for the rest. */
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
	struct moe_ll_loop e, t, k;
	moe_ll_loop_open(g, &e, moe_ll_prm(g, 2), moe_ll_prm(g, 3), 1, "e");
	LLVMValueRef e32 = LLVMBuildTrunc(b, e.iv, g->t_i32, "");
	moe_ll_loop_open(g, &t, moe_ll_i64c(g, 0), T, 1, "t");
	LLVMValueRef s =
	    LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, t.iv, moe_ll_i64c(g, E), ""), e.iv, "");
	moe_ll_st(g, moe_ll_i32c(g, -1), moe_ll_at(g, g->t_i32, ids, s));
	moe_ll_loop_close(g, &t);
	LLVMValueRef m = moe_ll_topk(g, w, e.iv, E, NULL, T, C, pick);
	moe_ll_loop_open(g, &k, moe_ll_i64c(g, 0), m, 1, "mark");
	LLVMValueRef sk = LLVMBuildNSWAdd(
	    b, LLVMBuildNSWMul(b, moe_ll_ldi(g, pick, k.iv), moe_ll_i64c(g, E), ""), e.iv, "");
	moe_ll_st(g, e32, moe_ll_at(g, g->t_i32, ids, sk));
	moe_ll_stf(g, LLVMBuildFMul(b, moe_ll_ldf(g, w, sk), moe_ll_f32c(g, d->scale), ""), w, sk);
	moe_ll_loop_close(g, &k);
	moe_ll_loop_close(g, &e);
	moe_ll_fn_end(g);
}

/* Entry points ------------------------------------------------------------------- */

void moe_cpu_ecsoft_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	gen_ec_route(g);
	k[MOE_KERNEL_ROUTE_X] = g->fn;
	gen_ec_select(g);
	k[MOE_KERNEL_EC_SELECT] = g->fn;
}
