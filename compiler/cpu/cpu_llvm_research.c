/* cpu_llvm_research.c: the research routers of the CPU backend, emitted into
 * the module cpu_llvm.c builds: sparsemixer, hierarchical gating and noisy
 * top-k (learned gaussian noise from a counter-based generator, input jitter).
 * Every step copies the reference's arithmetic so the choices agree bit for bit. */
#include "cpu_llvm_util.h"

#include <llvm-c/Core.h>

#include <math.h>
#include <string.h>

/* Small builders ------------------------------------------------------------ */

static LLVMValueRef u64c(struct moe_ll *g, uint64_t v)
{
	return LLVMConstInt(g->t_i64, v, 0);
}

/* Counter-based random numbers: moe_rng_hash, moe_rng_uniform, moe_rng_normal. */

static LLVMValueRef mix64(struct moe_ll *g, LLVMValueRef z)
{
	LLVMBuilderRef b = g->b;
	z = LLVMBuildAdd(b, z, u64c(g, 0x9e3779b97f4a7c15ull), "");
	z = LLVMBuildMul(b, LLVMBuildXor(b, z, LLVMBuildLShr(b, z, u64c(g, 30), ""), ""),
			 u64c(g, 0xbf58476d1ce4e5b9ull), "");
	z = LLVMBuildMul(b, LLVMBuildXor(b, z, LLVMBuildLShr(b, z, u64c(g, 27), ""), ""),
			 u64c(g, 0x94d049bb133111ebull), "");
	return LLVMBuildXor(b, z, LLVMBuildLShr(b, z, u64c(g, 31), ""), "");
}

static LLVMValueRef rng_hash(struct moe_ll *g, LLVMValueRef seed, LLVMValueRef a, LLVMValueRef b_,
			     LLVMValueRef c)
{
	LLVMValueRef h = mix64(g, seed);
	h = mix64(g, LLVMBuildXor(g->b, h, a, ""));
	h = mix64(g, LLVMBuildXor(g->b, h, b_, ""));
	return mix64(g, LLVMBuildXor(g->b, h, c, ""));
}

static LLVMValueRef rng_uniform(struct moe_ll *g, LLVMValueRef h)
{
	LLVMValueRef top = LLVMBuildLShr(g->b, h, u64c(g, 40), "");
	return LLVMBuildFMul(g->b, LLVMBuildUIToFP(g->b, top, g->t_f32, ""),
			     moe_ll_f32c(g, 0x1p-24), "u");
}

static LLVMValueRef rng_normal(struct moe_ll *g, LLVMValueRef seed, LLVMValueRef a, LLVMValueRef b_,
			       LLVMValueRef c)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef u1 = rng_uniform(g, rng_hash(g, seed, a, b_, c));
	LLVMValueRef c2 = LLVMBuildXor(b, c, u64c(g, 1ull << 63), "");
	LLVMValueRef u2 = rng_uniform(g, rng_hash(g, seed, a, b_, c2));
	u1 = LLVMBuildFPExt(b, u1, g->t_f64, "");
	u2 = LLVMBuildFPExt(b, u2, g->t_f64, "");
	LLVMValueRef lg = moe_ll_libm(g, "log", LLVMBuildFSub(b, moe_ll_f64c(g, 1.0), u1, ""));
	LLVMValueRef r =
	    moe_ll_intr1(g, "llvm.sqrt", LLVMBuildFMul(b, moe_ll_f64c(g, -2.0), lg, ""));
	LLVMValueRef cs =
	    moe_ll_libm(g, "cos", LLVMBuildFMul(b, moe_ll_f64c(g, 2.0 * M_PI), u2, ""));
	return moe_ll_to_f32(g, LLVMBuildFMul(b, r, cs, ""));
}

/* Router pieces ----------------------------------------------------------------- */

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

/* Logits of one token from its router dots l (router panels . x, the
 * group's pass): + bias, plus the learned gaussian noise z * (softplus(nl) +
 * noise_eps) when training, nl its noise dots (noise panels . x). */
static void logits(struct moe_ll *g, LLVMValueRef t, LLVMValueRef l, LLVMValueRef nl)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts;
	struct moe_ll_loop e;
	if (d->router_bias) {
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, E), 1, "bias");
		moe_ll_stf(g,
			   LLVMBuildFAdd(b, moe_ll_ldf(g, l, e.iv),
					 moe_ll_ldf(g, moe_ll_prm(g, A_RBIAS), e.iv), ""),
			   l, e.iv);
		moe_ll_loop_close(g, &e);
	}
	if (d->noise != MOE_NOISE_LEARNED_GAUSSIAN)
		return;
	LLVMValueRef tr = LLVMBuildICmp(b, LLVMIntNE, moe_ll_prm(g, A_TRAIN),
					LLVMConstInt(g->t_i32, 0, 0), "training");
	LLVMBasicBlockRef end = moe_ll_when(g, tr, "training");
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, E), 1, "noise");
	LLVMValueRef z = rng_normal(g, moe_ll_prm(g, A_SEED), moe_ll_prm(g, A_LAYER), t, e.iv);
	LLVMValueRef vd = LLVMBuildFPExt(b, moe_ll_ldf(g, nl, e.iv), g->t_f64, "");
	LLVMValueRef sp = moe_ll_libm(g, "log1p", moe_ll_libm(g, "exp", vd));
	sp = moe_ll_to_f32(g, moe_ll_sel_gt(g, vd, moe_ll_f64c(g, 20.0), vd, sp));
	if (d->noise_eps != 0.0f) /* the standard deviation's floor, an f32 add */
		sp = LLVMBuildFAdd(b, sp, moe_ll_f32c(g, d->noise_eps), "sd");
	moe_ll_stf(g, LLVMBuildFAdd(b, moe_ll_ldf(g, l, e.iv), LLVMBuildFMul(b, z, sp, ""), ""), l,
		   e.iv);
	moe_ll_loop_close(g, &e);
	moe_ll_when_end(g, end);
}

static void put_slot(struct moe_ll *g, LLVMValueRef base, int64_t j, LLVMValueRef id,
		     LLVMValueRef w)
{
	LLVMValueRef s = LLVMBuildNSWAdd(g->b, base, moe_ll_i64c(g, j), "");
	moe_ll_st(g, LLVMBuildTrunc(g->b, id, g->t_i32, ""),
		  moe_ll_at(g, g->t_i32, moe_ll_prm(g, A_IDS), s));
	moe_ll_stf(g, w, moe_ll_prm(g, A_WTS), s);
}

/* Sparsemixer (Phi-3.5, inference): argmax, mask logits whose relative gap
 * to it exceeds 2 eps, softmax; then the same without the first choice. */
static void sparsemixer(struct moe_ll *g, LLVMValueRef l, LLVMValueRef m, LLVMValueRef s,
			LLVMValueRef wbase)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts;
	LLVMValueRef eps2 = moe_ll_f32c(g, 2.0f * d->sparsemixer_eps),
		     ninf = moe_ll_f32c(g, -INFINITY);
	LLVMValueRef arg = moe_ll_alloca(g, g->t_i64, 1, "arg"), e1v = NULL;
	LLVMValueRef w[2], ids[2];
	for (int pass = 0; pass < 2; pass++) {
		struct moe_ll_loop e;
		moe_ll_st(
		    g,
		    pass == 0
			? moe_ll_i64c(g, 0)
			: LLVMBuildZExt(b, LLVMBuildICmp(b, LLVMIntEQ, e1v, moe_ll_i64c(g, 0), ""),
					g->t_i64, ""),
		    arg);
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, pass == 0 ? 1 : 0), moe_ll_i64c(g, E), 1,
				 "sx.arg");
		LLVMValueRef a = moe_ll_ld(g, g->t_i64, arg);
		LLVMValueRef gt =
		    LLVMBuildFCmp(b, LLVMRealOGT, moe_ll_ldf(g, l, e.iv), moe_ll_ldf(g, l, a), "");
		if (pass == 1)
			gt = LLVMBuildAnd(b, gt, LLVMBuildICmp(b, LLVMIntNE, e.iv, e1v, ""), "");
		moe_ll_st(g, LLVMBuildSelect(b, gt, e.iv, a, ""), arg);
		moe_ll_loop_close(g, &e);
		LLVMValueRef ei = moe_ll_ld(g, g->t_i64, arg);
		LLVMValueRef mv = moe_ll_ldf(g, l, ei);
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, E), 1, "sx.mask");
		LLVMValueRef v = moe_ll_ldf(g, l, e.iv);
		LLVMValueRef av = moe_ll_intr1(g, "llvm.fabs", v);
		LLVMValueRef den = moe_ll_sel_gt(g, av, mv, av, mv);
		LLVMValueRef gap =
		    LLVMBuildFCmp(b, LLVMRealOGT,
				  LLVMBuildFDiv(b, LLVMBuildFSub(b, mv, v, ""), den, ""), eps2, "");
		if (pass == 1)
			gap = LLVMBuildOr(b, gap, LLVMBuildICmp(b, LLVMIntEQ, e.iv, e1v, ""), "");
		moe_ll_stf(g, LLVMBuildSelect(b, gap, ninf, v, ""), m, e.iv);
		moe_ll_loop_close(g, &e);
		moe_ll_scores(g, MOE_SCORE_SOFTMAX, m, s, moe_ll_i64c(g, 0), E);
		ids[pass] = ei;
		w[pass] = LLVMBuildFMul(b, moe_ll_ldf(g, s, ei), moe_ll_f32c(g, d->scale), "");
		if (pass == 0)
			e1v = ei;
	}
	put_slot(g, wbase, 0, ids[0], w[0]);
	put_slot(g, wbase, 1, ids[1], w[1]);
}

/* Hierarchical (Shazeer 2017): gate over groups (level-1 router, no noise),
 * a gate inside each chosen group over the level-2 logits; weight = product
 * of the normalized gates, times scale. */
static void hierarchical(struct moe_ll *g, LLVMValueRef gl, LLVMValueRef l, LLVMValueRef s,
			 LLVMValueRef c, LLVMValueRef prow, LLVMValueRef wbase)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, G = d->levels[0].groups, n = E / G;
	uint32_t k1 = d->levels[0].top_k, k2 = d->levels[1].top_k;
	LLVMValueRef gs = moe_ll_alloca(g, g->t_f32, G, "gs");
	LLVMValueRef gp = moe_ll_alloca(g, g->t_f32, G, "gp");
	LLVMValueRef gw = moe_ll_alloca(g, g->t_f32, k1, "gw"),
		     w2 = moe_ll_alloca(g, g->t_f32, k2, "w2");
	LLVMValueRef gidx = moe_ll_alloca(g, g->t_i64, k1, "gidx"),
		     idx = moe_ll_alloca(g, g->t_i64, k2, "idx");
	LLVMValueRef zero = moe_ll_i64c(g, 0);
	moe_ll_scores(g, d->score, gl, gs, zero, G);
	moe_ll_topk(g, gs, NULL, 1, NULL, moe_ll_i64c(g, G), moe_ll_i64c(g, k1), gidx);
	struct moe_ll_loop j, i, gr;
	moe_ll_loop_open(g, &j, zero, moe_ll_i64c(g, k1), 1, "h.gw");
	moe_ll_stf(g, moe_ll_ldf(g, gs, moe_ll_ld(g, g->t_i64, moe_ll_at(g, g->t_i64, gidx, j.iv))),
		   gw, j.iv);
	moe_ll_loop_close(g, &j);
	moe_ll_normalize(g, gw, k1);
	moe_ll_loop_open(g, &gr, zero, moe_ll_i64c(g, G), 1, "h.s2");
	moe_ll_scores(g, d->score, l, s, LLVMBuildNSWMul(b, gr.iv, moe_ll_i64c(g, n), ""), n);
	moe_ll_loop_close(g, &gr);
	moe_ll_loop_open(g, &j, zero, moe_ll_i64c(g, k1), 1, "h.j");
	LLVMValueRef grp = moe_ll_ld(g, g->t_i64, moe_ll_at(g, g->t_i64, gidx, j.iv));
	LLVMValueRef off = LLVMBuildNSWMul(b, grp, moe_ll_i64c(g, n), "goff");
	moe_ll_loop_open(g, &i, zero, moe_ll_i64c(g, n), 1, "h.c");
	LLVMValueRef ei = LLVMBuildNSWAdd(b, off, i.iv, "");
	LLVMValueRef v = moe_ll_ldf(g, s, ei);
	if (d->select_bias)
		v = LLVMBuildFAdd(b, v, moe_ll_ldf(g, moe_ll_prm(g, A_SBIAS), ei), "");
	moe_ll_stf(g, v, c, ei);
	moe_ll_loop_close(g, &i);
	moe_ll_topk(g, c, off, 1, NULL, moe_ll_i64c(g, n), moe_ll_i64c(g, k2), idx);
	moe_ll_loop_open(g, &i, zero, moe_ll_i64c(g, k2), 1, "h.w2");
	LLVMValueRef e =
	    LLVMBuildNSWAdd(b, off, moe_ll_ld(g, g->t_i64, moe_ll_at(g, g->t_i64, idx, i.iv)), "");
	moe_ll_stf(g, moe_ll_ldf(g, s, e), w2, i.iv);
	moe_ll_loop_close(g, &i);
	moe_ll_normalize(g, w2, k2);
	LLVMValueRef g1 = moe_ll_ldf(g, gw, j.iv);
	LLVMValueRef sbase =
	    LLVMBuildNSWAdd(b, wbase, LLVMBuildNSWMul(b, j.iv, moe_ll_i64c(g, k2), ""), "");
	moe_ll_loop_open(g, &i, zero, moe_ll_i64c(g, k2), 1, "h.out");
	LLVMValueRef e2 =
	    LLVMBuildNSWAdd(b, off, moe_ll_ld(g, g->t_i64, moe_ll_at(g, g->t_i64, idx, i.iv)), "");
	LLVMValueRef wv = LLVMBuildFMul(b, LLVMBuildFMul(b, g1, moe_ll_ldf(g, w2, i.iv), ""),
					moe_ll_f32c(g, d->scale), "");
	LLVMValueRef slot = LLVMBuildNSWAdd(b, sbase, i.iv, "");
	moe_ll_st(g, LLVMBuildTrunc(b, e2, g->t_i32, ""),
		  moe_ll_at(g, g->t_i32, moe_ll_prm(g, A_IDS), slot));
	moe_ll_stf(g, wv, moe_ll_prm(g, A_WTS), slot);
	moe_ll_loop_close(g, &i);
	moe_ll_loop_close(g, &j);
	/* statistics: level-1 probability times the in-group probability */
	moe_ll_probs(g, d->score, gs, gp, zero, G, NULL);
	moe_ll_loop_open(g, &gr, zero, moe_ll_i64c(g, G), 1, "h.p");
	moe_ll_probs(g, d->score, s, prow, LLVMBuildNSWMul(b, gr.iv, moe_ll_i64c(g, n), ""), n,
		     moe_ll_ldf(g, gp, gr.iv));
	moe_ll_loop_close(g, &gr);
}

/* Noisy token choice: scores, selection bias, top-k, normalize, scale. */
static void noisy_topk(struct moe_ll *g, LLVMValueRef l, LLVMValueRef s, LLVMValueRef c,
		       LLVMValueRef prow, LLVMValueRef t, LLVMValueRef wbase)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, k = d->top_k;
	LLVMValueRef zero = moe_ll_i64c(g, 0);
	LLVMValueRef idx = moe_ll_alloca(g, g->t_i64, k, "idx");
	LLVMValueRef w = moe_ll_alloca(g, g->t_f32, k, "w");
	moe_ll_scores(g, d->score, l, s, zero, E);
	struct moe_ll_loop e;
	moe_ll_loop_open(g, &e, zero, moe_ll_i64c(g, E), 1, "n.c");
	LLVMValueRef v = moe_ll_ldf(g, s, e.iv);
	if (d->select_bias)
		v = LLVMBuildFAdd(b, v, moe_ll_ldf(g, moe_ll_prm(g, A_SBIAS), e.iv), "");
	moe_ll_stf(g, v, c, e.iv);
	moe_ll_loop_close(g, &e);
	moe_ll_topk(g, c, NULL, 1, NULL, moe_ll_i64c(g, E), moe_ll_i64c(g, k), idx);
	moe_ll_loop_open(g, &e, zero, moe_ll_i64c(g, k), 1, "n.w");
	moe_ll_stf(g, moe_ll_ldf(g, s, moe_ll_ld(g, g->t_i64, moe_ll_at(g, g->t_i64, idx, e.iv))),
		   w, e.iv);
	moe_ll_loop_close(g, &e);
	moe_ll_normalize(g, w, k);
	moe_ll_loop_open(g, &e, zero, moe_ll_i64c(g, k), 1, "n.out");
	LLVMValueRef slot = LLVMBuildNSWAdd(b, wbase, e.iv, "");
	moe_ll_st(g,
		  LLVMBuildTrunc(b, moe_ll_ld(g, g->t_i64, moe_ll_at(g, g->t_i64, idx, e.iv)),
				 g->t_i32, ""),
		  moe_ll_at(g, g->t_i32, moe_ll_prm(g, A_IDS), slot));
	LLVMValueRef wv = moe_ll_ldf(g, w, e.iv);
	if (d->scale != 1.0f)
		wv = LLVMBuildFMul(b, wv, moe_ll_f32c(g, d->scale), "");
	moe_ll_stf(g, wv, moe_ll_prm(g, A_WTS), slot);
	moe_ll_loop_close(g, &e);
	LLVMValueRef first = moe_ll_ld(g, g->t_i64, idx);
	moe_ll_stf(g, moe_ll_ldf(g, c, first), moe_ll_prm(g, A_PRIO), t);
	moe_ll_probs(g, d->score, s, prow, zero, E, NULL);
}

static void gen_route_x(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, W = moe_desc_route_width(d);
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[A_COUNT] = {P, I, I, P, P, P, P, P, I, I, g->t_i32, P, P, P, P, P};
	static const char *const pn[A_COUNT] = {
	    "x",    "t0",    "t1",       "router", "router_bias", "select_bias", "group", "noise",
	    "seed", "layer", "training", "logits", "ids",         "weights",     "prob",  "prio"};
	moe_ll_fn_begin(g, "moe_route_x", params, pn, A_COUNT);
	/* the router, noise (training) and group dots of a group of tokens per
	 * panel pass (moe_ll_tgroup), then each token on its rows */
	int hier = d->mode == MOE_MODE_HIERARCHICAL, noise = d->noise == MOE_NOISE_LEARNED_GAUSSIAN;
	uint32_t NG = hier ? d->levels[0].groups : 0;
	int64_t LE = (int64_t)moe_router_blocks(E) * MOE_RB,
		LG = hier ? (int64_t)moe_router_blocks(NG) * MOE_RB : 0;
	int64_t G = moe_ll_tgroup_size(LE * (noise ? 2 : 1) + LG);
	LLVMValueRef lb = moe_ll_alloca(g, g->t_f32, (uint64_t)(G * LE), "lb");
	LLVMValueRef nlb = noise ? moe_ll_alloca(g, g->t_f32, (uint64_t)(G * LE), "nlb") : NULL;
	LLVMValueRef glb = hier ? moe_ll_alloca(g, g->t_f32, (uint64_t)(G * LG), "glb") : NULL;
	LLVMValueRef s = moe_ll_alloca(g, g->t_f32, E, "s"), c = moe_ll_alloca(g, g->t_f32, E, "c");
	struct moe_ll_tgroup tg;
	struct moe_ll_loop e;
	moe_ll_tgroup_open(g, &tg, moe_ll_prm(g, A_T0), moe_ll_prm(g, A_T1), G);
	moe_ll_tgroup_logits(g, &tg, moe_ll_prm(g, A_X), moe_ll_prm(g, A_ROUTER), E, lb);
	if (noise) { /* the noise dots only when training */
		LLVMBasicBlockRef end =
		    moe_ll_when(g,
				LLVMBuildICmp(b, LLVMIntNE, moe_ll_prm(g, A_TRAIN),
					      LLVMConstInt(g->t_i32, 0, 0), "training"),
				"gtraining");
		moe_ll_tgroup_logits(g, &tg, moe_ll_prm(g, A_X), moe_ll_prm(g, A_NOISE), E, nlb);
		moe_ll_when_end(g, end);
	}
	if (hier)
		moe_ll_tgroup_logits(g, &tg, moe_ll_prm(g, A_X), moe_ll_prm(g, A_GROUP), NG, glb);
	moe_ll_tgroup_rows(g, &tg);
	LLVMValueRef tv = tg.t, l = moe_ll_tgroup_row(g, &tg, lb, E);
	logits(g, tv, l, noise ? moe_ll_tgroup_row(g, &tg, nlb, E) : NULL);
	LLVMValueRef rowE = LLVMBuildNSWMul(b, tv, moe_ll_i64c(g, E), "");
	LLVMValueRef lrow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, A_LOGITS), rowE);
	LLVMValueRef prow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, A_PROB), rowE);
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, E), 1, "lcopy");
	moe_ll_stf(g, moe_ll_ldf(g, l, e.iv), lrow, e.iv);
	moe_ll_loop_close(g, &e);
	LLVMValueRef wbase = LLVMBuildNSWMul(b, tv, moe_ll_i64c(g, W), "wbase");
	if (d->mode == MOE_MODE_SPARSEMIXER) {
		sparsemixer(g, l, c, s, wbase);
		moe_ll_scores(g, MOE_SCORE_SOFTMAX, l, prow, moe_ll_i64c(g, 0), E);
		moe_ll_stf(g, moe_ll_f32c(g, 0.0), moe_ll_prm(g, A_PRIO), tv);
	} else if (hier) {
		hierarchical(g, moe_ll_tgroup_row(g, &tg, glb, NG), l, s, c, prow, wbase);
		moe_ll_stf(g, moe_ll_f32c(g, 0.0), moe_ll_prm(g, A_PRIO), tv);
	} else {
		noisy_topk(g, l, s, c, prow, tv, wbase);
	}
	moe_ll_tgroup_close(g, &tg);
	moe_ll_fn_end(g);
}

/* Input jitter: xj = x * (float)(1 - eps + 2 eps u), u uniform per
 * (seed, layer, token, column). */
static void gen_jitter(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t H = d->hidden;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, I, I, I, I};
	static const char *const pn[] = {"x", "xj", "t0", "t1", "seed", "layer"};
	moe_ll_fn_begin(g, "moe_jitter", params, pn, 6);
	double eps = d->jitter_eps;
	struct moe_ll_loop t, h;
	moe_ll_loop_open(g, &t, moe_ll_prm(g, 2), moe_ll_prm(g, 3), 1, "t");
	LLVMValueRef row = LLVMBuildNSWMul(b, t.iv, moe_ll_i64c(g, H), "");
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "h");
	LLVMValueRef u =
	    rng_uniform(g, rng_hash(g, moe_ll_prm(g, 4), moe_ll_prm(g, 5), t.iv, h.iv));
	LLVMValueRef m =
	    LLVMBuildFMul(b, moe_ll_f64c(g, 2.0 * eps), LLVMBuildFPExt(b, u, g->t_f64, ""), "");
	m = moe_ll_to_f32(g, LLVMBuildFAdd(b, moe_ll_f64c(g, 1.0 - eps), m, ""));
	LLVMValueRef i = LLVMBuildNSWAdd(b, row, h.iv, "");
	moe_ll_stf(g, LLVMBuildFMul(b, moe_ll_ldf(g, moe_ll_prm(g, 0), i), m, ""), moe_ll_prm(g, 1),
		   i);
	moe_ll_loop_close(g, &h);
	moe_ll_loop_close(g, &t);
	moe_ll_fn_end(g);
}

void moe_cpu_research_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	gen_route_x(g);
	k[MOE_KERNEL_ROUTE_X] = g->fn;
}

void moe_cpu_jitter_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	gen_jitter(g);
	k[MOE_KERNEL_JITTER] = g->fn;
}
