/* cpu_llvm_peer.c: PEER (product-key retrieval over single-neuron experts) for
 * the CPU backend, emitted into the module cpu_llvm.c builds. moe_pk_route
 * repeats the reference's f32 arithmetic lane by lane so the selections agree
 * bit for bit; moe_pk_experts gathers the u/v rows of the chosen neurons. */
#include "cpu_llvm_util.h"

#include <llvm-c/Core.h>

#include <math.h>
#include <string.h>

#define PK_AHEAD 4 /* slots the neuron gathers prefetch ahead */

static LLVMValueRef ldv(struct moe_ll *g, LLVMValueRef base, LLVMValueRef i)
{
	return moe_ll_ld(g, g->t_v8f, moe_ll_at(g, g->t_f32, base, i));
}

enum { Q_X, Q_T0, Q_T1, Q_B0, Q_B1, Q_QUERY, Q_QBIAS, Q_OUT, Q_COUNT };

/* q[t] = Q x_t + b for tokens [t0, t1) and query-row blocks [b0, b1). Each
 * value is the reference's fused sum in ascending h, whatever tile computes
 * it. */
static void gen_pk_query(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	int64_t H = d->hidden, QB = moe_router_blocks((uint32_t)(d->pk_heads * d->pk_query_dim));
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[Q_COUNT] = {P, I, I, I, I, P, P, P};
	static const char *const pn[Q_COUNT] = {"x", "t0", "t1", "b0", "b1", "query", "qbias", "q"};
	moe_ll_fn_begin(g, "moe_pk_query", params, pn, Q_COUNT);
	LLVMValueRef t0 = moe_ll_prm(g, Q_T0);
	LLVMValueRef x0 = moe_ll_at(g, g->t_f32, moe_ll_prm(g, Q_X),
				    LLVMBuildNSWMul(b, t0, moe_ll_i64c(g, H), ""));
	LLVMValueRef q0 = moe_ll_at(g, g->t_f32, moe_ll_prm(g, Q_OUT),
				    LLVMBuildNSWMul(b, t0, moe_ll_i64c(g, QB * 8), ""));
	moe_ll_rows_panels(g, x0, H, LLVMBuildNSWSub(b, moe_ll_prm(g, Q_T1), t0, "n"),
			   moe_ll_prm(g, Q_QUERY), moe_ll_prm(g, Q_B0), moe_ll_prm(g, Q_B1), H,
			   moe_ll_prm(g, Q_QBIAS), q0, QB * 8, 1);
	moe_ll_fn_end(g);
}

enum { R_Q, R_T0, R_T1, R_KEYS, R_IDS, R_WEIGHTS, R_COUNT };

static void gen_pk_route(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	int64_t R = d->pk_sub_keys, k = d->pk_top_k, heads = d->pk_heads;
	int64_t dq = d->pk_query_dim, h2 = dq / 2, W = heads * k;
	int64_t QB = moe_router_blocks((uint32_t)(heads * dq));
	int64_t KB = moe_pk_key_blocks((uint32_t)R), ks = moe_desc_pk_sub_top_k(d);
	/* one key set of [2][KB][d/2][8] panels, or one per head */
	int64_t kset = d->pk_keys_per_head ? 2 * KB * h2 * 8 : 0;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[R_COUNT] = {P, I, I, P, P, P};
	static const char *const pn[R_COUNT] = {"q", "t0", "t1", "keys", "ids", "weights"};
	moe_ll_fn_begin(g, "moe_pk_route", params, pn, R_COUNT);
	/* the sub-key scores of a group of up to MOE_LL_ROWS heads (shared keys) or
	 * of one head (its own key set): [head of the group][KB * 8] per half */
	int64_t G = d->pk_keys_per_head ? 1 : heads < MOE_LL_ROWS ? heads : MOE_LL_ROWS;
	LLVMValueRef sab[2] = {moe_ll_alloca(g, g->t_f32, (uint64_t)(G * KB * 8), "sa"),
			       moe_ll_alloca(g, g->t_f32, (uint64_t)(G * KB * 8), "sb")};
	LLVMValueRef iab[2] = {moe_ll_alloca(g, g->t_i64, (uint64_t)ks, "ia"),
			       moe_ll_alloca(g, g->t_i64, (uint64_t)ks, "ib")};
	LLVMValueRef cv = moe_ll_alloca(g, g->t_f32, (uint64_t)(ks * ks), "cv");
	LLVMValueRef ck = moe_ll_alloca(g, g->t_i64, (uint64_t)(ks * ks), "ck");
	LLVMValueRef ic = moe_ll_alloca(g, g->t_i64, (uint64_t)k, "ic");
	LLVMValueRef gs = moe_ll_alloca(g, g->t_f32, (uint64_t)k, "g");
	LLVMValueRef kk = moe_ll_i64c(g, k), kks = moe_ll_i64c(g, ks);

	struct moe_ll_loop j, hg, hh, i, c;
	moe_ll_loop_open(g, &j, moe_ll_prm(g, R_T0), moe_ll_prm(g, R_T1), 1, "tok");
	LLVMValueRef t = j.iv;
	LLVMValueRef qs = moe_ll_at(g, g->t_f32, moe_ll_prm(g, R_Q),
				    LLVMBuildNSWMul(b, t, moe_ll_i64c(g, QB * 8), ""));
	moe_ll_loop_open(g, &hg, moe_ll_i64c(g, 0), moe_ll_i64c(g, heads), G, "hgroup");
	LLVMValueRef left = LLVMBuildNSWSub(b, moe_ll_i64c(g, heads), hg.iv, "");
	LLVMValueRef gn =
	    LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, left, moe_ll_i64c(g, G), ""), left,
			    moe_ll_i64c(g, G), "gn");
	for (int half = 0; half < 2; half++) {
		/* sub-key scores: the group's half queries against every key block */
		LLVMValueRef koff = moe_ll_i64c(g, half * KB * h2 * 8);
		if (kset) /* the head's own key set */
			koff = LLVMBuildNSWAdd(
			    b, LLVMBuildNSWMul(b, hg.iv, moe_ll_i64c(g, kset), ""), koff, "");
		LLVMValueRef qx =
		    moe_ll_at(g, g->t_f32, qs,
			      LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, hg.iv, moe_ll_i64c(g, dq), ""),
					      moe_ll_i64c(g, half * h2), ""));
		moe_ll_rows_panels(
		    g, qx, dq, gn, moe_ll_at(g, g->t_f32, moe_ll_prm(g, R_KEYS), koff),
		    moe_ll_i64c(g, 0), moe_ll_i64c(g, KB), h2, NULL, sab[half], KB * 8, 1);
	}
	moe_ll_loop_open(g, &hh, moe_ll_i64c(g, 0), gn, 1, "head");
	LLVMValueRef hd = LLVMBuildNSWAdd(b, hg.iv, hh.iv, "hd");
	LLVMValueRef sh[2];
	for (int half = 0; half < 2; half++) {
		sh[half] = moe_ll_at(g, g->t_f32, sab[half],
				     LLVMBuildNSWMul(b, hh.iv, moe_ll_i64c(g, KB * 8), ""));
		moe_ll_topk_vec(g, sh[half], NULL, moe_ll_i64c(g, R), ks, iab[half]);
	}
	/* the ks * ks candidates: score sums and expert indices i * R + j */
	moe_ll_loop_open(g, &i, moe_ll_i64c(g, 0), kks, 1, "ca");
	LLVMValueRef ia = moe_ll_ldi(g, iab[0], i.iv), sa = moe_ll_ldf(g, sh[0], ia);
	moe_ll_loop_open(g, &c, moe_ll_i64c(g, 0), kks, 1, "cb");
	LLVMValueRef ib = moe_ll_ldi(g, iab[1], c.iv);
	LLVMValueRef ci = LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, i.iv, kks, ""), c.iv, "");
	moe_ll_stf(g, LLVMBuildFAdd(b, sa, moe_ll_ldf(g, sh[1], ib), ""), cv, ci);
	moe_ll_st(g, LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, ia, moe_ll_i64c(g, R), ""), ib, ""),
		  moe_ll_at(g, g->t_i64, ck, ci));
	moe_ll_loop_close(g, &c);
	moe_ll_loop_close(g, &i);
	moe_ll_topk_vec(g, cv, ck, moe_ll_i64c(g, ks * ks), k, ic);
	/* scores of the k retrieved sums */
	moe_ll_loop_open(g, &c, moe_ll_i64c(g, 0), kk, 1, "gather");
	moe_ll_stf(g, moe_ll_ldf(g, cv, moe_ll_ldi(g, ic, c.iv)), gs, c.iv);
	moe_ll_loop_close(g, &c);
	if (d->pk_score_relu) { /* non-competing scores (PEER-pytorch): max(s, 0) */
		moe_ll_loop_open(g, &c, moe_ll_i64c(g, 0), kk, 1, "relu");
		LLVMValueRef s = moe_ll_ldf(g, gs, c.iv);
		LLVMValueRef pos = LLVMBuildFCmp(b, LLVMRealOGT, s, moe_ll_f32c(g, 0.0f), "");
		moe_ll_stf(g, LLVMBuildSelect(b, pos, s, moe_ll_f32c(g, 0.0f), ""), gs, c.iv);
		moe_ll_loop_close(g, &c);
	} else {
		moe_ll_scores(
		    g, d->pk_score == MOE_SCORE_SIGMOID ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX, gs,
		    gs, moe_ll_i64c(g, 0), (uint32_t)k);
	}
	LLVMValueRef wrow = LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, t, moe_ll_i64c(g, W), ""),
					    LLVMBuildNSWMul(b, hd, kk, ""), "");
	moe_ll_loop_open(g, &c, moe_ll_i64c(g, 0), kk, 1, "out");
	LLVMValueRef slot = LLVMBuildNSWAdd(b, wrow, c.iv, "");
	moe_ll_st(g, LLVMBuildTrunc(b, moe_ll_ldi(g, ck, moe_ll_ldi(g, ic, c.iv)), g->t_i32, ""),
		  moe_ll_at(g, g->t_i32, moe_ll_prm(g, R_IDS), slot));
	moe_ll_stf(g, LLVMBuildFMul(b, moe_ll_ldf(g, gs, c.iv), moe_ll_f32c(g, d->scale), ""),
		   moe_ll_prm(g, R_WEIGHTS), slot);
	moe_ll_loop_close(g, &c);
	moe_ll_loop_close(g, &hh);
	moe_ll_loop_close(g, &hg);
	moe_ll_loop_close(g, &j);
	moe_ll_fn_end(g);
}

/* Eight table elements at p (f32, or bf16 widened by a shift) as <8 x f32>. */
static LLVMValueRef ld_row8(struct moe_ll *g, LLVMValueRef row, LLVMValueRef i, int bf16)
{
	LLVMBuilderRef b = g->b;
	if (!bf16)
		return ldv(g, row, i);
	LLVMTypeRef v8i16 = LLVMVectorType(g->t_i16, 8), v8i32 = LLVMVectorType(g->t_i32, 8);
	LLVMValueRef v = LLVMBuildLoad2(b, v8i16, moe_ll_at(g, g->t_i16, row, i), "");
	LLVMSetAlignment(v, 2);
	LLVMValueRef sh[8];
	for (int l = 0; l < 8; l++)
		sh[l] = LLVMConstInt(g->t_i32, 16, 0);
	v = LLVMBuildShl(b, LLVMBuildZExt(b, v, v8i32, ""), LLVMConstVector(sh, 8), "");
	return LLVMBuildBitCast(b, v, g->t_v8f, "");
}

static LLVMValueRef ld_row1(struct moe_ll *g, LLVMValueRef row, LLVMValueRef i, int bf16)
{
	LLVMBuilderRef b = g->b;
	if (!bf16)
		return moe_ll_ldf(g, row, i);
	LLVMValueRef v =
	    LLVMBuildZExt(b, moe_ll_ld(g, g->t_i16, moe_ll_at(g, g->t_i16, row, i)), g->t_i32, "");
	return LLVMBuildBitCast(b, LLVMBuildShl(b, v, LLVMConstInt(g->t_i32, 16, 0), ""), g->t_f32,
				"");
}

/* The expert activation on the f32 pre-activation, as moe_ref_act. */
static LLVMValueRef act(struct moe_ll *g, LLVMValueRef x)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef v = LLVMBuildFPExt(b, x, g->t_f64, ""), r;
	switch (g->d->act) {
	case MOE_ACT_RELU:
		return LLVMBuildSelect(b, LLVMBuildFCmp(b, LLVMRealOGT, x, moe_ll_f32c(g, 0.0), ""),
				       x, moe_ll_f32c(g, 0.0), "");
	case MOE_ACT_SILU:
		r = LLVMBuildFDiv(b, v,
				  LLVMBuildFAdd(b, moe_ll_f64c(g, 1.0),
						moe_ll_libm(g, "exp", LLVMBuildFNeg(b, v, "")), ""),
				  "");
		break;
	case MOE_ACT_GELU:
		r = moe_ll_libm(g, "erf", LLVMBuildFDiv(b, v, moe_ll_f64c(g, sqrt(2.0)), ""));
		r = LLVMBuildFMul(b, LLVMBuildFMul(b, moe_ll_f64c(g, 0.5), v, ""),
				  LLVMBuildFAdd(b, moe_ll_f64c(g, 1.0), r, ""), "");
		break;
	default: { /* gelu_tanh */
		LLVMValueRef c3 = LLVMBuildFMul(
		    b, LLVMBuildFMul(b, LLVMBuildFMul(b, moe_ll_f64c(g, 0.044715), v, ""), v, ""),
		    v, "");
		r = LLVMBuildFMul(b, moe_ll_f64c(g, sqrt(2.0 / M_PI)), LLVMBuildFAdd(b, v, c3, ""),
				  "");
		r = LLVMBuildFAdd(b, moe_ll_f64c(g, 1.0), moe_ll_libm(g, "tanh", r), "");
		r = LLVMBuildFMul(b, LLVMBuildFMul(b, moe_ll_f64c(g, 0.5), v, ""), r, "");
		break;
	}
	}
	return LLVMBuildFPTrunc(b, r, g->t_f32, "");
}

enum { E_X, E_T0, E_T1, E_IDS, E_WEIGHTS, E_U, E_V, E_Y, E_COUNT };

/* y_t = sum over the heads' slots in rank order of w * act(u_e . x_t) * v_e,
 * accumulated in double like the reference's combine. */
static void gen_pk_experts(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	int64_t H = d->hidden, W = (int64_t)d->pk_heads * d->pk_top_k, H8 = H / 8 * 8;
	int bf16 = d->weight_dtype == MOE_DTYPE_BF16;
	LLVMTypeRef et = bf16 ? g->t_i16 : g->t_f32;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[E_COUNT] = {P, I, I, P, P, P, P, P};
	static const char *const pn[E_COUNT] = {"x", "t0", "t1", "ids", "weights", "u", "v", "y"};
	moe_ll_fn_begin(g, "moe_pk_experts", params, pn, E_COUNT);
	LLVMValueRef acc = moe_ll_alloca(g, g->t_f64, (uint64_t)H, "acc");
	LLVMValueRef xd = moe_ll_alloca(g, g->t_f64, (uint64_t)H, "xd"); /* x_t in double */
	/* four chains of 8 doubles over h (one when H is not a multiple of 32) */
	int nch = H8 % 32 == 0 && H8 ? 4 : 1;
	LLVMValueRef dacc[4];
	for (int c = 0; c < nch; c++)
		dacc[c] = moe_ll_alloca(g, g->t_v8d, 1, "dacc");
	LLVMValueRef dtail = moe_ll_alloca(g, g->t_f64, 1, "dtail");
	struct moe_ll_loop t, s, h;
	moe_ll_loop_open(g, &t, moe_ll_prm(g, E_T0), moe_ll_prm(g, E_T1), 1, "t");
	LLVMValueRef xr = moe_ll_at(g, g->t_f32, moe_ll_prm(g, E_X),
				    LLVMBuildNSWMul(b, t.iv, moe_ll_i64c(g, H), ""));
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "z");
	moe_ll_st(g, moe_ll_f64c(g, 0.0), moe_ll_at(g, g->t_f64, acc, h.iv));
	moe_ll_st(g, LLVMBuildFPExt(b, moe_ll_ldf(g, xr, h.iv), g->t_f64, ""),
		  moe_ll_at(g, g->t_f64, xd, h.iv));
	moe_ll_loop_close(g, &h);
	moe_ll_loop_open(g, &s, moe_ll_i64c(g, 0), moe_ll_i64c(g, W), 1, "slot");
	LLVMValueRef si =
	    LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, t.iv, moe_ll_i64c(g, W), ""), s.iv, "");
	/* the rows of the slot PK_AHEAD on (clamped to this call's tokens) toward
	 * L2: each is a scattered 4 KiB row that the hardware prefetchers do not
	 * see coming. Its u line by line as the dot reads u, its v as the axpy
	 * reads v, so the requests spread over the slot's time (T = 256 of the
	 * bench's PEER on a Zen 3 host: 9 % faster than both rows during the
	 * dot, two slots ahead). Not to L1: the rows of three slots (48 KiB)
	 * would evict the ones in use (23 ms with them fetched to L1, 17 ms to
	 * L2, on an AVX-512 host). */
	LLVMValueRef last =
	    LLVMBuildNSWSub(b, LLVMBuildNSWMul(b, moe_ll_prm(g, E_T1), moe_ll_i64c(g, W), ""),
			    moe_ll_i64c(g, 1), "");
	LLVMValueRef sn = LLVMBuildNSWAdd(b, si, moe_ll_i64c(g, PK_AHEAD), "");
	sn = LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, sn, last, ""), sn, last, "");
	LLVMValueRef en = moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i32, moe_ll_prm(g, E_IDS), sn));
	en = LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSGE, en, LLVMConstInt(g->t_i32, 0, 0), ""),
			     en, LLVMConstInt(g->t_i32, 0, 0), "");
	LLVMValueRef noff =
	    LLVMBuildNSWMul(b, LLVMBuildZExt(b, en, g->t_i64, ""), moe_ll_i64c(g, H), "");
	int64_t per_line = 64 / (bf16 ? 2 : 4);
	LLVMValueRef e = moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i32, moe_ll_prm(g, E_IDS), si));
	LLVMBasicBlockRef skip = moe_ll_when(
	    g, LLVMBuildICmp(b, LLVMIntSGE, e, LLVMConstInt(g->t_i32, 0, 0), ""), "slot");
	LLVMValueRef wt = moe_ll_ldf(g, moe_ll_prm(g, E_WEIGHTS), si);
	LLVMValueRef off =
	    LLVMBuildNSWMul(b, LLVMBuildZExt(b, e, g->t_i64, ""), moe_ll_i64c(g, H), "");
	LLVMValueRef ur = moe_ll_at(g, et, moe_ll_prm(g, E_U), off),
		     vr = moe_ll_at(g, et, moe_ll_prm(g, E_V), off);
	/* u . x: exact products summed in double, rounded once (a product of
	 * two f32 is exact in double, so the fused add rounds as the plain one) */
	for (int c = 0; c < nch; c++)
		moe_ll_st(g, LLVMConstNull(g->t_v8d), dacc[c]);
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H8), 8 * nch, "dot");
	for (int64_t l = 0; l < 8 * nch; l += per_line) {
		LLVMValueRef at =
		    LLVMBuildNSWAdd(b, noff, LLVMBuildNSWAdd(b, h.iv, moe_ll_i64c(g, l), ""), "");
		moe_ll_prefetch(g, moe_ll_at(g, et, moe_ll_prm(g, E_U), at), 2);
	}
	for (int c = 0; c < nch; c++) {
		LLVMValueRef hc = LLVMBuildNSWAdd(b, h.iv, moe_ll_i64c(g, 8 * c), "");
		LLVMValueRef xv = moe_ll_ld(g, g->t_v8d, moe_ll_at(g, g->t_f64, xd, hc));
		LLVMValueRef uv = LLVMBuildFPExt(b, ld_row8(g, ur, hc, bf16), g->t_v8d, "");
		moe_ll_st(g, moe_ll_fma(g, xv, uv, moe_ll_ld(g, g->t_v8d, dacc[c])), dacc[c]);
	}
	moe_ll_loop_close(g, &h);
	LLVMValueRef dv = moe_ll_ld(g, g->t_v8d, dacc[0]), dsum = moe_ll_f64c(g, 0.0);
	if (nch == 4)
		dv = LLVMBuildFAdd(b, LLVMBuildFAdd(b, dv, moe_ll_ld(g, g->t_v8d, dacc[1]), ""),
				   LLVMBuildFAdd(b, moe_ll_ld(g, g->t_v8d, dacc[2]),
						 moe_ll_ld(g, g->t_v8d, dacc[3]), ""),
				   "");
	for (int l = 0; l < 8; l++)
		dsum = LLVMBuildFAdd(
		    b, dsum, LLVMBuildExtractElement(b, dv, LLVMConstInt(g->t_i32, l, 0), ""), "");
	moe_ll_st(g, dsum, dtail);
	if (H8 < H) {
		moe_ll_loop_open(g, &h, moe_ll_i64c(g, H8), moe_ll_i64c(g, H), 1, "dtail");
		LLVMValueRef pr =
		    LLVMBuildFMul(b, LLVMBuildFPExt(b, moe_ll_ldf(g, xr, h.iv), g->t_f64, ""),
				  LLVMBuildFPExt(b, ld_row1(g, ur, h.iv, bf16), g->t_f64, ""), "");
		moe_ll_st(g, LLVMBuildFAdd(b, moe_ll_ld(g, g->t_f64, dtail), pr, ""), dtail);
		moe_ll_loop_close(g, &h);
	}
	LLVMValueRef a = act(g, LLVMBuildFPTrunc(b, moe_ll_ld(g, g->t_f64, dtail), g->t_f32, ""));
	/* acc += (double)(w * (a * v)) */
	LLVMValueRef av = moe_ll_splat(g, a, g->t_v8f), wv = moe_ll_splat(g, wt, g->t_v8f);
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H8), 8, "axpy");
	moe_ll_prefetch(g, moe_ll_at(g, et, moe_ll_prm(g, E_V), LLVMBuildNSWAdd(b, noff, h.iv, "")),
			2);
	LLVMValueRef o =
	    LLVMBuildFMul(b, wv, LLVMBuildFMul(b, av, ld_row8(g, vr, h.iv, bf16), ""), "");
	LLVMValueRef ap = moe_ll_at(g, g->t_f64, acc, h.iv);
	LLVMValueRef cur = LLVMBuildLoad2(b, g->t_v8d, ap, "");
	LLVMSetAlignment(cur, 8);
	moe_ll_st(g, LLVMBuildFAdd(b, cur, LLVMBuildFPExt(b, o, g->t_v8d, ""), ""), ap);
	moe_ll_loop_close(g, &h);
	if (H8 < H) {
		moe_ll_loop_open(g, &h, moe_ll_i64c(g, H8), moe_ll_i64c(g, H), 1, "atail");
		LLVMValueRef o1 =
		    LLVMBuildFMul(b, wt, LLVMBuildFMul(b, a, ld_row1(g, vr, h.iv, bf16), ""), "");
		LLVMValueRef p1 = moe_ll_at(g, g->t_f64, acc, h.iv);
		moe_ll_st(g,
			  LLVMBuildFAdd(b, moe_ll_ld(g, g->t_f64, p1),
					LLVMBuildFPExt(b, o1, g->t_f64, ""), ""),
			  p1);
		moe_ll_loop_close(g, &h);
	}
	moe_ll_when_end(g, skip);
	moe_ll_loop_close(g, &s);
	LLVMValueRef yr = moe_ll_at(g, g->t_f32, moe_ll_prm(g, E_Y),
				    LLVMBuildNSWMul(b, t.iv, moe_ll_i64c(g, H), ""));
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "y");
	moe_ll_st(g,
		  LLVMBuildFPTrunc(b, moe_ll_ld(g, g->t_f64, moe_ll_at(g, g->t_f64, acc, h.iv)),
				   g->t_f32, ""),
		  moe_ll_at(g, g->t_f32, yr, h.iv));
	moe_ll_loop_close(g, &h);
	moe_ll_loop_close(g, &t);
	moe_ll_fn_end(g);
}

void moe_cpu_peer_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	gen_pk_query(g);
	k[MOE_KERNEL_PK_QUERY] = g->fn;
	gen_pk_route(g);
	k[MOE_KERNEL_PK_ROUTE] = g->fn;
	gen_pk_experts(g);
	k[MOE_KERNEL_PK_EXPERTS] = g->fn;
}
