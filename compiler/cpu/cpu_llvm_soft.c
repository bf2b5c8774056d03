/* cpu_llvm_soft.c: Soft MoE for the CPU backend, emitted into the module
 * cpu_llvm.c builds: l2-normalization of tokens and slot parameters, the
 * token-slot logits, the two softmaxes, the slot inputs D^T x and the output
 * C Y, the three products as register-tiled GEMMs. Each repeats the
 * reference's arithmetic order (route_soft in ref.c). */
#include "cpu_llvm_util.h"

#include <llvm-c/Core.h>

#include <math.h>
#include <string.h>

/* Small builders ------------------------------------------------------------ */

/* slots: E * slots_per_expert */
static uint32_t n_slots(const struct moe_ll *g)
{
	return g->d->n_experts * g->d->soft_slots_per_expert;
}

static LLVMValueRef mul(struct moe_ll *g, LLVMValueRef a, int64_t k)
{
	return LLVMBuildNSWMul(g->b, a, moe_ll_i64c(g, k), "");
}

/* The products as GEMMs ---------------------------------------------------------
 *
 * The three products of Soft MoE (the logits, the slot inputs D^T x and the
 * output C Y) are each C[M, N] = A[M, K] B[K, N], and every value of C is
 * one f32 fused multiply-add chain over k ascending from 0: the reference's
 * order (route_soft in ref.c), whichever tile, thread or block computes it.
 * A tile is mr rows by one panel of up to 16 columns, its accumulators in
 * registers across the k loop: row r reads A at a[r] + k (unit stride), and
 * row k of B is the panel's columns, contiguous at b + k * bs. AVX-512
 * targets keep one <16 x float> per row and up to 16 rows, the others two
 * <8 x float> and 6 rows, as the expert tiles do. */

#define SOFT_MR_WIDE 16 /* rows of a tile with <16 x float> accumulators */

static int tile_rows(const struct moe_ll *g)
{
	return g->wide ? SOFT_MR_WIDE : MOE_MR;
}

/* The vectors of one tile row of ncols columns: nv vectors of vl lanes,
 * lanes[j] of them live in vector j. */
struct vshape {
	LLVMTypeRef t;
	int vl, nv, lanes[2];
};

static struct vshape vshape(const struct moe_ll *g, int ncols)
{
	struct vshape v = {.t = g->wide ? g->t_v16f : g->t_v8f,
			   .vl = g->wide ? 2 * MOE_VW : MOE_VW};
	v.nv = (ncols + v.vl - 1) / v.vl;
	for (int j = 0; j < 2; j++) {
		int n = ncols - j * v.vl;
		v.lanes[j] = n > v.vl ? v.vl : n < 0 ? 0 : n;
	}
	return v;
}

static LLVMValueRef lanes_mask(struct moe_ll *g, int vl, int n)
{
	LLVMValueRef e[2 * MOE_VW];
	for (int i = 0; i < vl; i++)
		e[i] = LLVMConstInt(g->t_i1, i < n, 0);
	return LLVMConstVector(e, (unsigned)vl);
}

/* The first n lanes of the vector at p; the others read nothing and are 0. */
static LLVMValueRef vld(struct moe_ll *g, const struct vshape *v, LLVMValueRef p, int n)
{
	if (n == v->vl)
		return moe_ll_ld(g, v->t, p);
	LLVMTypeRef tys[2] = {v->t, g->t_ptr};
	LLVMValueRef args[4] = {p, moe_ll_i32c(g, 4), lanes_mask(g, v->vl, n), LLVMConstNull(v->t)};
	return moe_ll_intr(g, "llvm.masked.load", tys, 2, args, 4);
}

static void vst(struct moe_ll *g, const struct vshape *v, LLVMValueRef x, LLVMValueRef p, int n)
{
	if (n == v->vl) {
		moe_ll_st(g, x, p);
		return;
	}
	LLVMTypeRef tys[2] = {v->t, g->t_ptr};
	LLVMValueRef args[4] = {x, p, moe_ll_i32c(g, 4), lanes_mask(g, v->vl, n)};
	moe_ll_intr(g, "llvm.masked.store", tys, 2, args, 4);
}

/* Rows of b (k steps) the slot-input tiles prefetch ahead: each k reads a
 * new line of x, H floats past the last, which no cache holds yet. */
#define SOFT_B_AHEAD 32
/* Tokens per block of the slot-input sums (x's rows a block holds in L1/L2
 * for every panel of the call). */
#define SOFT_T_BLOCK 64

/* One tile: acc[2 r + j] (allocas of v.t) = vector j of row r's sums over
 * k in [0, K) of a[r * ar + k * ak] * b[k * bs + column], continued from
 * the values at init[r] unless zero is true (init NULL: from 0); ahead > 0:
 * the row of b that many k later (the last one at the end) is prefetched. */
static void gemm_tile(struct moe_ll *g, int mr, int ncols, LLVMValueRef a, LLVMValueRef ar,
		      LLVMValueRef ak, LLVMValueRef b, LLVMValueRef bs, LLVMValueRef K,
		      LLVMValueRef *acc, int64_t ahead, const LLVMValueRef *init, LLVMValueRef zero)
{
	LLVMBuilderRef bd = g->b;
	struct vshape v = vshape(g, ncols);
	for (int r = 0; r < mr; r++)
		for (int j = 0; j < v.nv; j++) {
			acc[2 * r + j] = moe_ll_alloca(g, v.t, 1, "acc");
			LLVMValueRef a0 = LLVMConstNull(v.t);
			if (init)
				a0 = LLVMBuildSelect(
				    bd, zero, a0,
				    vld(g, &v,
					moe_ll_at(g, g->t_f32, init[r], moe_ll_i64c(g, j * v.vl)),
					v.lanes[j]),
				    "");
			moe_ll_st(g, a0, acc[2 * r + j]);
		}
	struct moe_ll_loop k;
	moe_ll_loop_open(g, &k, moe_ll_i64c(g, 0), K, 1, "k");
	LLVMValueRef brow = moe_ll_at(g, g->t_f32, b, LLVMBuildNSWMul(bd, k.iv, bs, ""));
	LLVMValueRef arow = moe_ll_at(g, g->t_f32, a, LLVMBuildNSWMul(bd, k.iv, ak, ""));
	if (ahead) {
		LLVMValueRef kn = LLVMBuildNSWAdd(bd, k.iv, moe_ll_i64c(g, ahead), "");
		LLVMValueRef last = LLVMBuildNSWSub(bd, K, moe_ll_i64c(g, 1), "");
		kn = LLVMBuildSelect(bd, LLVMBuildICmp(bd, LLVMIntSLT, kn, K, ""), kn, last, "");
		moe_ll_prefetch(g, moe_ll_at(g, g->t_f32, b, LLVMBuildNSWMul(bd, kn, bs, "")), 3);
	}
	LLVMValueRef bv[2];
	for (int j = 0; j < v.nv; j++)
		bv[j] =
		    vld(g, &v, moe_ll_at(g, g->t_f32, brow, moe_ll_i64c(g, j * v.vl)), v.lanes[j]);
	for (int r = 0; r < mr; r++) {
		LLVMValueRef ai = LLVMBuildNSWMul(bd, moe_ll_i64c(g, r), ar, "");
		LLVMValueRef av = moe_ll_splat(g, moe_ll_ldf(g, arow, ai), v.t);
		for (int j = 0; j < v.nv; j++)
			moe_ll_st(g, moe_ll_fma(g, av, bv[j], moe_ll_ld(g, v.t, acc[2 * r + j])),
				  acc[2 * r + j]);
	}
	moe_ll_loop_close(g, &k);
}

/* Store one tile row, its sums in acc[0 ..], at out: ncols columns, each
 * times scale and plus bias[column] when those are given. */
static void tile_store(struct moe_ll *g, int ncols, const LLVMValueRef *acc, LLVMValueRef scale,
		       LLVMValueRef bias, LLVMValueRef out)
{
	struct vshape v = vshape(g, ncols);
	for (int j = 0; j < v.nv; j++) {
		LLVMValueRef x = moe_ll_ld(g, v.t, acc[j]);
		LLVMValueRef at = moe_ll_i64c(g, j * v.vl);
		if (scale)
			x = LLVMBuildFMul(g->b, moe_ll_splat(g, scale, v.t), x, "");
		if (bias)
			x = LLVMBuildFAdd(
			    g->b, x, vld(g, &v, moe_ll_at(g, g->t_f32, bias, at), v.lanes[j]), "");
		vst(g, &v, x, moe_ll_at(g, g->t_f32, out, at), v.lanes[j]);
	}
}

/* A tile emitter: mr rows from r0, panel p of ncols columns; ctx: the
 * kernel's own (the slot inputs' token block), passed through. */
typedef void soft_tile_fn(struct moe_ll *g, int mr, int ncols, LLVMValueRef r0, LLVMValueRef p,
			  const void *ctx);

/* Every panel of n columns for the rows from r0: the full panels in a loop,
 * then the last one when n is not a multiple of 16. */
static void all_panels(struct moe_ll *g, soft_tile_fn *tile, uint32_t n, int mr, LLVMValueRef r0,
		       const void *ctx)
{
	uint32_t full = n / MOE_NR, tail = n % MOE_NR;
	if (full) {
		struct moe_ll_loop p;
		moe_ll_loop_open(g, &p, moe_ll_i64c(g, 0), moe_ll_i64c(g, full), 1, "p");
		tile(g, mr, MOE_NR, r0, p.iv, ctx);
		moe_ll_loop_close(g, &p);
	}
	if (tail)
		tile(g, mr, (int)tail, r0, moe_ll_i64c(g, full), ctx);
}

/* The tile rows mr from r0: panel p of ncols columns, or every panel of n
 * columns (all_panels) when p is NULL. */
static void tile_rows_at(struct moe_ll *g, soft_tile_fn *tile, uint32_t n, int ncols,
			 LLVMValueRef p, int mr, LLVMValueRef r0, const void *ctx)
{
	if (p)
		tile(g, mr, ncols, r0, p, ctx);
	else
		all_panels(g, tile, n, mr, r0, ctx);
}

/* Rows [lo, hi): full tiles of tile_rows(g) rows in a loop, then the rows
 * left as tiles of 8, 4, 2 and 1 rows (the binary digits of their count),
 * so a few tile shapes cover every count. */
static void row_tiles(struct moe_ll *g, soft_tile_fn *tile, uint32_t n, int ncols, LLVMValueRef p,
		      LLVMValueRef lo, LLVMValueRef hi, const void *ctx)
{
	LLVMBuilderRef b = g->b;
	int MR = tile_rows(g);
	LLVMValueRef mrc = moe_ll_i64c(g, MR);
	LLVMValueRef rows = LLVMBuildNSWSub(b, hi, lo, "rows");
	LLVMValueRef left = LLVMBuildSRem(b, rows, mrc, "left");
	LLVMValueRef end = LLVMBuildNSWSub(b, hi, left, "full.end");
	struct moe_ll_loop r;
	moe_ll_loop_open(g, &r, lo, end, MR, "r0");
	tile_rows_at(g, tile, n, ncols, p, MR, r.iv, ctx);
	moe_ll_loop_close(g, &r);
	int top = 1;
	while (2 * top < MR)
		top *= 2;
	for (int m = top; m >= 1; m /= 2) {
		LLVMValueRef bit = LLVMBuildAnd(b, left, moe_ll_i64c(g, m), "");
		LLVMBasicBlockRef e =
		    moe_ll_when(g, LLVMBuildICmp(b, LLVMIntNE, bit, moe_ll_i64c(g, 0), ""), "part");
		/* the pieces of more rows come first */
		LLVMValueRef done =
		    LLVMBuildAnd(b, left, moe_ll_i64c(g, ~(int64_t)(2 * m - 1)), "");
		tile_rows_at(g, tile, n, ncols, p, m, LLVMBuildNSWAdd(b, end, done, "r0"), ctx);
		moe_ll_when_end(g, e);
	}
}

/* The kernels ------------------------------------------------------------------ */

/* A fixed f32 tree over the lanes of the <8 x float> v: lanes j and j + 4
 * added, then j and j + 2, then the two left. */
static LLVMValueRef tree8(struct moe_ll *g, LLVMValueRef v)
{
	LLVMBuilderRef b = g->b;
	for (int w = 4; w >= 1; w /= 2) {
		LLVMValueRef lo[4], hi[4];
		for (int j = 0; j < w; j++)
			lo[j] = moe_ll_i32c(g, j), hi[j] = moe_ll_i32c(g, j + w);
		LLVMValueRef u = LLVMGetPoison(LLVMTypeOf(v));
		v = LLVMBuildFAdd(b, LLVMBuildShuffleVector(b, v, u, LLVMConstVector(lo, w), ""),
				  LLVMBuildShuffleVector(b, v, u, LLVMConstVector(hi, w), ""), "");
	}
	return LLVMBuildExtractElement(b, v, moe_ll_i32c(g, 0), "");
}

/* moe_soft_norm(src, dst, r0, r1): rows [r0, r1) of [*, H]: dst = src * r,
 * r = (float)(1 / sqrt((double)ss + 1e-6)), ss the sum of squares of the
 * row in 16 lanes: lane j the f32 fused chain over h = j, j + 16, ...
 * ascending, then the lanes added as a fixed tree (j and j + 8, j + 4,
 * j + 2, j + 1): the reference's sumsq16. */
static void gen_norm(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, full = H / MOE_NR, tail = H % MOE_NR;
	LLVMTypeRef params[] = {g->t_ptr, g->t_ptr, g->t_i64, g->t_i64};
	static const char *const pn[] = {"src", "dst", "r0", "r1"};
	moe_ll_fn_begin(g, "moe_soft_norm", params, pn, 4);
	struct vshape v8 = {.t = g->t_v8f, .vl = MOE_VW, .nv = 2, .lanes = {MOE_VW, MOE_VW}};
	LLVMValueRef acc[2] = {moe_ll_alloca(g, g->t_v8f, 1, "ss0"),
			       moe_ll_alloca(g, g->t_v8f, 1, "ss1")};
	struct moe_ll_loop r, h;
	moe_ll_loop_open(g, &r, moe_ll_prm(g, 2), moe_ll_prm(g, 3), 1, "r");
	LLVMValueRef src = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0), mul(g, r.iv, H));
	LLVMValueRef dst = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 1), mul(g, r.iv, H));
	for (int j = 0; j < 2; j++)
		moe_ll_st(g, LLVMConstNull(g->t_v8f), acc[j]);
	/* one block of 16 values at h0, n of them live (the rest read as 0 and
	 * add +0 to a sum of squares: no change) */
	for (int part = 0; part < 2; part++) {
		uint32_t n = part ? tail : MOE_NR;
		if (!n || (!part && !full))
			continue;
		if (!part)
			moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0),
					 moe_ll_i64c(g, (int64_t)full * MOE_NR), MOE_NR, "ss");
		LLVMValueRef h0 = part ? moe_ll_i64c(g, (int64_t)full * MOE_NR) : h.iv;
		for (int j = 0; j < 2; j++) {
			int lanes = (int)n - j * MOE_VW;
			if (lanes <= 0)
				continue;
			LLVMValueRef x =
			    vld(g, &v8,
				moe_ll_at(g, g->t_f32, src,
					  LLVMBuildNSWAdd(b, h0, moe_ll_i64c(g, j * MOE_VW), "")),
				lanes > MOE_VW ? MOE_VW : lanes);
			moe_ll_st(g, moe_ll_fma(g, x, x, moe_ll_ld(g, g->t_v8f, acc[j])), acc[j]);
		}
		if (!part)
			moe_ll_loop_close(g, &h);
	}
	LLVMValueRef ss = tree8(g, LLVMBuildFAdd(b, moe_ll_ld(g, g->t_v8f, acc[0]),
						 moe_ll_ld(g, g->t_v8f, acc[1]), ""));
	LLVMValueRef den = LLVMBuildFAdd(b, moe_ll_to_f64(g, ss), moe_ll_f64c(g, 1e-6), "");
	LLVMValueRef sq = moe_ll_intr1(g, "llvm.sqrt", den);
	LLVMValueRef inv = moe_ll_to_f32(g, LLVMBuildFDiv(b, moe_ll_f64c(g, 1.0), sq, ""));
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "sc");
	moe_ll_stf(g, LLVMBuildFMul(b, moe_ll_ldf(g, src, h.iv), inv, ""), dst, h.iv);
	moe_ll_loop_close(g, &h);
	moe_ll_loop_close(g, &r);
	moe_ll_fn_end(g);
}

/* moe_soft_logits(xn, slots, scale, t0, t1, L): L[t, s] = scale * (xn_t .
 * slot_s), the slots packed as panels of 16 [ceil(S / 16)][H][16]
 * (moe_pack_soft), rows t0 .. t1 in tiles, the slot panels inner. With
 * soft.scale channel the packed slots already hold gamma and the scale is
 * not applied (the reference's is exactly 1). */
static void logits_tile(struct moe_ll *g, int mr, int ncols, LLVMValueRef r0, LLVMValueRef p,
			const void *ctx)
{
	(void)ctx;
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, S = n_slots(g);
	LLVMValueRef acc[2 * SOFT_MR_WIDE];
	LLVMValueRef a = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0), mul(g, r0, H));
	LLVMValueRef panel =
	    moe_ll_at(g, g->t_f32, moe_ll_prm(g, 1), mul(g, p, (int64_t)H * MOE_NR));
	gemm_tile(g, mr, ncols, a, moe_ll_i64c(g, H), moe_ll_i64c(g, 1), panel,
		  moe_ll_i64c(g, MOE_NR), moe_ll_i64c(g, H), acc, 0, NULL, NULL);
	LLVMValueRef scale = g->d->soft_gamma ? NULL : moe_ll_prm(g, 2);
	for (int r = 0; r < mr; r++) {
		LLVMValueRef t = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		LLVMValueRef out =
		    moe_ll_at(g, g->t_f32, moe_ll_prm(g, 5),
			      LLVMBuildNSWAdd(b, mul(g, t, S), mul(g, p, MOE_NR), ""));
		tile_store(g, ncols, acc + 2 * r, scale, NULL, out);
	}
}

static void gen_logits(struct moe_ll *g)
{
	LLVMTypeRef params[] = {g->t_ptr, g->t_ptr, g->t_f32, g->t_i64, g->t_i64, g->t_ptr};
	static const char *const pn[] = {"xn", "slots", "scale", "t0", "t1", "L"};
	moe_ll_fn_begin(g, "moe_soft_logits", params, pn, 6);
	row_tiles(g, logits_tile, n_slots(g), 0, NULL, moe_ll_prm(g, 3), moe_ll_prm(g, 4), NULL);
	moe_ll_fn_end(g);
}

/* moe_soft_combine(L, t0, t1, C): C[t, :] = softmax over the S slots of
 * L[t, :], per token. */
static void gen_combine(struct moe_ll *g)
{
	LLVMTypeRef params[] = {g->t_ptr, g->t_i64, g->t_i64, g->t_ptr};
	static const char *const pn[] = {"L", "t0", "t1", "C"};
	moe_ll_fn_begin(g, "moe_soft_combine", params, pn, 4);
	struct moe_ll_loop t;
	moe_ll_loop_open(g, &t, moe_ll_prm(g, 1), moe_ll_prm(g, 2), 1, "t");
	LLVMValueRef off = mul(g, t.iv, n_slots(g));
	moe_ll_softmax(g, moe_ll_prm(g, 0), off, 1, moe_ll_prm(g, 3), off, 1,
		       moe_ll_i64c(g, n_slots(g)));
	moe_ll_loop_close(g, &t);
	moe_ll_fn_end(g);
}

/* The row stride of Dt: T + MOE_SOFT_DT_PAD floats. */
static LLVMValueRef dt_ld(struct moe_ll *g, LLVMValueRef T)
{
	return LLVMBuildNSWAdd(g->b, T, moe_ll_i64c(g, MOE_SOFT_DT_PAD), "dt.ld");
}

/* moe_soft_dispatch(L, T, s0, s1, Dt): per slot s in [s0, s1), the softmax
 * over the T tokens of column s of L[T, S], stored transposed: Dt[s, t], rows
 * T + MOE_SOFT_DT_PAD apart (a slot block's rows are its own). */
static void gen_dispatch(struct moe_ll *g)
{
	LLVMTypeRef params[] = {g->t_ptr, g->t_i64, g->t_i64, g->t_i64, g->t_ptr};
	static const char *const pn[] = {"L", "T", "s0", "s1", "Dt"};
	moe_ll_fn_begin(g, "moe_soft_dispatch", params, pn, 5);
	LLVMValueRef T = moe_ll_prm(g, 1);
	struct moe_ll_loop s;
	moe_ll_loop_open(g, &s, moe_ll_prm(g, 2), moe_ll_prm(g, 3), 1, "s");
	moe_ll_softmax(g, moe_ll_prm(g, 0), s.iv, n_slots(g), moe_ll_prm(g, 4),
		       LLVMBuildNSWMul(g->b, s.iv, dt_ld(g, T), ""), 1, T);
	moe_ll_loop_close(g, &s);
	moe_ll_fn_end(g);
}

/* moe_soft_slot_in(Dt, x, T, p0, p1, xs): the columns of panels [p0, p1) of
 * the slot inputs, xs[s, h] = the sum over t ascending of Dt[s, t] * x[t, h]
 * (f32 fused), for every slot: per panel, the slots in tiles, so a panel of
 * x is read once per tile of slots (once when S <= the tile's rows). */
/* The token block of the slot-input tiles: tokens [t0, t0 + kn). */
struct tblock {
	LLVMValueRef t0, kn;
};

static void slot_in_tile(struct moe_ll *g, int mr, int ncols, LLVMValueRef r0, LLVMValueRef p,
			 const void *ctx)
{
	LLVMBuilderRef b = g->b;
	const struct tblock *tb = ctx;
	uint32_t H = g->d->hidden;
	LLVMValueRef acc[2 * SOFT_MR_WIDE], out[SOFT_MR_WIDE], col = mul(g, p, MOE_NR);
	LLVMValueRef ld = dt_ld(g, moe_ll_prm(g, 2));
	for (int r = 0; r < mr; r++) {
		LLVMValueRef s = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		out[r] = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 5),
				   LLVMBuildNSWAdd(b, mul(g, s, H), col, ""));
	}
	LLVMValueRef a = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0),
				   LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, r0, ld, ""), tb->t0, ""));
	LLVMValueRef x = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 1),
				   LLVMBuildNSWAdd(b, mul(g, tb->t0, H), col, ""));
	LLVMValueRef first = LLVMBuildICmp(b, LLVMIntEQ, tb->t0, moe_ll_i64c(g, 0), "first");
	gemm_tile(g, mr, ncols, a, ld, moe_ll_i64c(g, 1), x, moe_ll_i64c(g, H), tb->kn, acc,
		  SOFT_B_AHEAD, out, first);
	for (int r = 0; r < mr; r++)
		tile_store(g, ncols, acc + 2 * r, NULL, NULL, out[r]);
}

static void gen_slot_in(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, full = H / MOE_NR, tail = H % MOE_NR;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, I, I, I, P};
	static const char *const pn[] = {"Dt", "x", "T", "p0", "p1", "xs"};
	moe_ll_fn_begin(g, "moe_soft_slot_in", params, pn, 6);
	LLVMValueRef p0 = moe_ll_prm(g, 3), p1 = moe_ll_prm(g, 4), S = moe_ll_i64c(g, n_slots(g));
	/* the full panels in [p0, min(p1, full)), then the last one if in range */
	LLVMValueRef nf = moe_ll_i64c(g, full);
	LLVMValueRef end = LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, p1, nf, ""), p1, nf, "");
	/* blocks of tokens outer, so the rows of x a block reads stay in cache
	 * (and their pages in the TLB) while every panel of the call passes;
	 * the sums continue from block to block in xs, in the same order */
	LLVMValueRef T = moe_ll_prm(g, 2), TB = moe_ll_i64c(g, SOFT_T_BLOCK);
	struct moe_ll_loop t, p;
	moe_ll_loop_open(g, &t, moe_ll_i64c(g, 0), T, SOFT_T_BLOCK, "tb");
	LLVMValueRef left = LLVMBuildNSWSub(b, T, t.iv, "");
	struct tblock tb = {
	    t.iv, LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, left, TB, ""), left, TB, "kn")};
	moe_ll_loop_open(g, &p, p0, end, 1, "p");
	row_tiles(g, slot_in_tile, 0, MOE_NR, p.iv, moe_ll_i64c(g, 0), S, &tb);
	moe_ll_loop_close(g, &p);
	if (tail) {
		LLVMBasicBlockRef e =
		    moe_ll_when(g, LLVMBuildICmp(b, LLVMIntSGT, p1, nf, ""), "tail");
		row_tiles(g, slot_in_tile, 0, (int)tail, nf, moe_ll_i64c(g, 0), S, &tb);
		moe_ll_when_end(g, e);
	}
	moe_ll_loop_close(g, &t);
	moe_ll_fn_end(g);
}

/* moe_soft_out(C, Y, bias, t0, t1, y): y[t, h] = the sum over slots
 * ascending of C[t, s] * Y[s, h] (f32 fused), + bias[h] (f32) when the
 * description has an output bias: rows t0 .. t1 in tiles, the H columns in
 * panels inner. */
static void out_tile(struct moe_ll *g, int mr, int ncols, LLVMValueRef r0, LLVMValueRef p,
		     const void *ctx)
{
	(void)ctx;
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, S = n_slots(g);
	LLVMValueRef acc[2 * SOFT_MR_WIDE], t[SOFT_MR_WIDE];
	LLVMValueRef col = mul(g, p, MOE_NR);
	for (int r = 0; r < mr; r++)
		t[r] = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
	gemm_tile(g, mr, ncols, moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0), mul(g, r0, S)),
		  moe_ll_i64c(g, S), moe_ll_i64c(g, 1),
		  moe_ll_at(g, g->t_f32, moe_ll_prm(g, 1), col), moe_ll_i64c(g, H),
		  moe_ll_i64c(g, S), acc, 0, NULL, NULL);
	LLVMValueRef bias =
	    g->d->output_bias ? moe_ll_at(g, g->t_f32, moe_ll_prm(g, 2), col) : NULL;
	for (int r = 0; r < mr; r++)
		tile_store(g, ncols, acc + 2 * r, NULL, bias,
			   moe_ll_at(g, g->t_f32, moe_ll_prm(g, 5),
				     LLVMBuildNSWAdd(b, mul(g, t[r], H), col, "")));
}

static void gen_out(struct moe_ll *g)
{
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, P, I, I, P};
	static const char *const pn[] = {"C", "Y", "bias", "t0", "t1", "y"};
	moe_ll_fn_begin(g, "moe_soft_out", params, pn, 6);
	row_tiles(g, out_tile, g->d->hidden, 0, NULL, moe_ll_prm(g, 3), moe_ll_prm(g, 4), NULL);
	moe_ll_fn_end(g);
}

/* Entry points ------------------------------------------------------------------- */

void moe_cpu_soft_build(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	static const struct {
		enum moe_kernel k;
		void (*gen)(struct moe_ll *);
	} fns[] = {
	    {MOE_KERNEL_SOFT_NORM, gen_norm},       {MOE_KERNEL_SOFT_LOGITS, gen_logits},
	    {MOE_KERNEL_SOFT_COMBINE, gen_combine}, {MOE_KERNEL_SOFT_DISPATCH, gen_dispatch},
	    {MOE_KERNEL_SOFT_SLOT_IN, gen_slot_in}, {MOE_KERNEL_SOFT_OUT, gen_out},
	};
	for (size_t i = 0; i < sizeof fns / sizeof *fns; i++) {
		fns[i].gen(g);
		k[fns[i].k] = g->fn;
	}
}
