/* cpu_llvm.c: the CPU backend. Builds one LLVM module per plan through the
 * backend's IR builder (cpu_llvm_util.h): token choice's router, the expert up
 * (gate|up + activation) and down tiles for the routed and shared FFNs, the
 * model's constants and the moe_gen table the runtime calls
 * (runtime/moe_kernels.h); verifies, optimizes and emits. */
#include "backend.h"
#include "cpu_llvm_util.h"

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

/* Vector math ---------------------------------------------------------------- */

/* exp on <8 x float>: Cody-Waite range reduction and a degree-5 polynomial
 * (about 1 ulp), clamped so 2^n stays a normal float. */
static LLVMValueRef vexp(struct moe_ll *g, LLVMValueRef x)
{
	LLVMBuilderRef b = g->b;
	x = moe_ll_fmin(g, x, moe_ll_vf32c(g, 88.0));
	x = moe_ll_fmax(g, x, moe_ll_vf32c(g, -87.0));
	LLVMValueRef fx =
	    moe_ll_fma(g, x, moe_ll_vf32c(g, 1.44269504088896341), moe_ll_vf32c(g, 0.5));
	fx = moe_ll_intr1(g, "llvm.floor", fx);
	LLVMValueRef r = moe_ll_fma(g, fx, moe_ll_vf32c(g, -0.693359375), x);
	r = moe_ll_fma(g, fx, moe_ll_vf32c(g, 2.12194440e-4), r);
	static const double c[] = {1.9875691500E-4, 1.3981999507E-3, 8.3334519073E-3,
				   4.1665795894E-2, 1.6666665459E-1, 5.0000001201E-1};
	LLVMValueRef y = moe_ll_vf32c(g, c[0]);
	for (int i = 1; i < 6; i++)
		y = moe_ll_fma(g, y, r, moe_ll_vf32c(g, c[i]));
	LLVMValueRef z = LLVMBuildFMul(b, r, r, "");
	y = moe_ll_fma(g, y, z, r);
	y = LLVMBuildFAdd(b, y, moe_ll_vf32c(g, 1.0), "");
	LLVMValueRef n = LLVMBuildFPToSI(b, fx, g->t_v8i32, "");
	n = LLVMBuildAdd(b, n, moe_ll_vi32c(g, 127), "");
	n = LLVMBuildShl(b, n, moe_ll_vi32c(g, 23), "");
	LLVMValueRef p2 = LLVMBuildBitCast(b, n, g->t_v8f, "exp.2n");
	return LLVMBuildFMul(b, y, p2, "exp");
}

static LLVMValueRef vsigmoid(struct moe_ll *g, LLVMValueRef x)
{
	LLVMValueRef e = vexp(g, LLVMBuildFNeg(g->b, x, ""));
	return LLVMBuildFDiv(g->b, moe_ll_vf32c(g, 1.0),
			     LLVMBuildFAdd(g->b, e, moe_ll_vf32c(g, 1.0), ""), "sigmoid");
}

/* erf of 8 lanes without a library call per lane: erf(z) = sign(z) (1 -
 * exp(-t^2) R(t)), t = min(|z|, 3.92) (past it erf is +-1 in f32), with
 * R(t) = erfc(t) exp(t^2) as a degree-10 polynomial in u = t / (1 + t): a
 * least-squares fit on 4000 Chebyshev nodes of [0, 3.92], within 1.6e-7 of
 * erf in f32 arithmetic (2.5 ulp of 1; test_cpu sweeps it). Lane by lane,
 * the C library's erff took 12 % of an expert-choice GELU layer at T = 256. */
static LLVMValueRef verf(struct moe_ll *g, LLVMValueRef z)
{
	LLVMBuilderRef b = g->b;
	static const double c[] = {1.0,
				   -1.128381133,
				   -1.282851994e-1,
				   1.176056415e-1,
				   1.317841113e-1,
				   -3.705720603e-2,
				   3.349325955e-1,
				   -7.105188966e-1,
				   9.131350517e-1,
				   -7.182874680e-1,
				   2.251120806e-1};
	int n = (int)(sizeof c / sizeof *c);
	LLVMValueRef t = moe_ll_fmin(g, moe_ll_intr1(g, "llvm.fabs", z), moe_ll_vf32c(g, 3.92));
	LLVMValueRef u =
	    LLVMBuildFDiv(b, t, LLVMBuildFAdd(b, t, moe_ll_vf32c(g, 1.0), ""), "erf.u");
	LLVMValueRef r = moe_ll_vf32c(g, c[n - 1]);
	for (int k = n - 2; k >= 0; k--)
		r = moe_ll_fma(g, r, u, moe_ll_vf32c(g, c[k]));
	LLVMValueRef e = vexp(g, LLVMBuildFNeg(b, LLVMBuildFMul(b, t, t, ""), ""));
	LLVMValueRef a = LLVMBuildFSub(b, moe_ll_vf32c(g, 1.0), LLVMBuildFMul(b, e, r, ""), "");
	LLVMValueRef args[2] = {a, z};
	LLVMTypeRef vt = g->t_v8f;
	return moe_ll_intr(g, "llvm.copysign", &vt, 1, args, 2);
}

/* The elementwise activation (not swiglu_oai, which needs both halves). */
static LLVMValueRef vact(struct moe_ll *g, enum moe_act a, LLVMValueRef x)
{
	LLVMBuilderRef b = g->b;
	switch (a) {
	case MOE_ACT_SILU:
		return LLVMBuildFMul(b, x, vsigmoid(g, x), "silu");
	case MOE_ACT_RELU:
		return moe_ll_sel_gt(g, x, moe_ll_vf32c(g, 0.0), x, moe_ll_vf32c(g, 0.0));
	case MOE_ACT_GELU: {
		LLVMValueRef e = verf(g, LLVMBuildFMul(b, x, moe_ll_vf32c(g, M_SQRT1_2), ""));
		e = LLVMBuildFAdd(b, e, moe_ll_vf32c(g, 1.0), "");
		return LLVMBuildFMul(b, LLVMBuildFMul(b, x, moe_ll_vf32c(g, 0.5), ""), e, "gelu");
	}
	case MOE_ACT_GELU_TANH: {
		/* tanh(z) = 1 - 2 / (exp(2z) + 1) */
		LLVMValueRef x3 = LLVMBuildFMul(b, LLVMBuildFMul(b, x, x, ""), x, "");
		LLVMValueRef z = moe_ll_fma(g, x3, moe_ll_vf32c(g, 0.044715), x);
		z = LLVMBuildFMul(b, z, moe_ll_vf32c(g, 2.0 * 0.7978845608028654), "");
		LLVMValueRef e = LLVMBuildFAdd(b, vexp(g, z), moe_ll_vf32c(g, 1.0), "");
		LLVMValueRef t = LLVMBuildFSub(
		    b, moe_ll_vf32c(g, 1.0), LLVMBuildFDiv(b, moe_ll_vf32c(g, 2.0), e, ""), "tanh");
		t = LLVMBuildFAdd(b, t, moe_ll_vf32c(g, 1.0), "");
		return LLVMBuildFMul(b, LLVMBuildFMul(b, x, moe_ll_vf32c(g, 0.5), ""), t,
				     "gelu_tanh");
	}
	default:
		MOE_ASSERT(0);
	}
	return NULL;
}

/* act(gate) * up for GLU experts; swiglu_oai clamps both halves first. */
static LLVMValueRef vglu(struct moe_ll *g, enum moe_act a, float alpha, float limit,
			 LLVMValueRef gt, LLVMValueRef up)
{
	LLVMBuilderRef b = g->b;
	if (a != MOE_ACT_SWIGLU_OAI)
		return LLVMBuildFMul(b, vact(g, a, gt), up, "glu");
	LLVMValueRef gg = moe_ll_fmin(g, gt, moe_ll_vf32c(g, limit));
	LLVMValueRef u = moe_ll_fmin(g, up, moe_ll_vf32c(g, limit));
	u = moe_ll_fmax(g, u, moe_ll_vf32c(g, -limit));
	LLVMValueRef s = vsigmoid(g, LLVMBuildFMul(b, gg, moe_ll_vf32c(g, alpha), ""));
	LLVMValueRef t = LLVMBuildFMul(b, gg, s, "");
	return LLVMBuildFMul(b, t, LLVMBuildFAdd(b, u, moe_ll_vf32c(g, 1.0), ""), "oai");
}

/* Load 8 weights at element index idx of a panel and widen them to f32. */
static LLVMValueRef load_w8(struct moe_ll *g, LLVMValueRef base, LLVMValueRef idx, const char *name)
{
	LLVMBuilderRef b = g->b;
	switch (g->d->weight_dtype) {
	case MOE_DTYPE_F32:
		return moe_ll_ld(g, g->t_v8f, moe_ll_at(g, g->t_f32, base, idx));
	case MOE_DTYPE_BF16: {
		LLVMValueRef v = moe_ll_ld(g, g->t_v8i16, moe_ll_at(g, g->t_i16, base, idx));
		v = LLVMBuildZExt(b, v, g->t_v8i32, "");
		v = LLVMBuildShl(b, v, moe_ll_vi32c(g, 16), "");
		return LLVMBuildBitCast(b, v, g->t_v8f, name);
	}
	case MOE_DTYPE_F16: {
		LLVMValueRef v = moe_ll_ld(g, g->t_v8i16, moe_ll_at(g, g->t_i16, base, idx));
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
static void load_row16(struct moe_ll *g, LLVMValueRef base, LLVMValueRef idx, LLVMValueRef out[2],
		       int nv)
{
	LLVMBuilderRef b = g->b;
	if (g->d->weight_dtype == MOE_DTYPE_BF16) {
		LLVMValueRef w = moe_ll_ld(g, g->t_v8i32, moe_ll_at(g, g->t_i16, base, idx));
		out[0] = LLVMBuildBitCast(b, LLVMBuildShl(b, w, moe_ll_vi32c(g, 16), ""), g->t_v8f,
					  "b0");
		if (nv > 1)
			out[1] = LLVMBuildBitCast(
			    b, LLVMBuildAnd(b, w, moe_ll_vi32c(g, (int32_t)0xffff0000u), ""),
			    g->t_v8f, "b1");
		return;
	}
	out[0] = load_w8(g, base, idx, "b0");
	if (nv > 1)
		out[1] =
		    load_w8(g, base, LLVMBuildNSWAdd(b, idx, moe_ll_i64c(g, MOE_VW), ""), "b1");
}

/* Half h (0: lanes 0..7, 1: lanes 8..15) of a 16-lane vector. */
static LLVMValueRef half16(struct moe_ll *g, LLVMValueRef v, int h)
{
	LLVMValueRef m[MOE_VW];
	for (int i = 0; i < MOE_VW; i++)
		m[i] = moe_ll_i32c(g, h * MOE_VW + i);
	return LLVMBuildShuffleVector(g->b, v, LLVMGetPoison(LLVMTypeOf(v)),
				      LLVMConstVector(m, MOE_VW), "");
}

/* Two 8-lane vectors joined into one of 16. */
static LLVMValueRef join8(struct moe_ll *g, LLVMValueRef lo, LLVMValueRef hi)
{
	LLVMValueRef e[2 * MOE_VW];
	for (int i = 0; i < 2 * MOE_VW; i++)
		e[i] = moe_ll_i32c(g, i);
	return LLVMBuildShuffleVector(g->b, lo, hi, LLVMConstVector(e, 2 * MOE_VW), "");
}

/* The same panel row as one <16 x float> (AVX-512 targets). */
static LLVMValueRef load_row16w(struct moe_ll *g, LLVMValueRef base, LLVMValueRef idx)
{
	LLVMBuilderRef b = g->b;
	LLVMTypeRef t16 = LLVMVectorType(g->t_f32, 2 * MOE_VW);
	switch (g->d->weight_dtype) {
	case MOE_DTYPE_F32:
		return moe_ll_ld(g, t16, moe_ll_at(g, g->t_f32, base, idx));
	case MOE_DTYPE_F16: {
		LLVMTypeRef ti = LLVMVectorType(g->t_i16, 2 * MOE_VW);
		LLVMValueRef v = moe_ll_ld(g, ti, moe_ll_at(g, g->t_i16, base, idx));
		LLVMSetAlignment(v, 2);
		v = LLVMBuildBitCast(b, v, LLVMVectorType(g->t_half, 2 * MOE_VW), "");
		return LLVMBuildFPExt(b, v, t16, "w16");
	}
	default: {
		LLVMValueRef h[2];
		load_row16(g, base, idx, h, 2);
		return join8(g, h[0], h[1]);
	}
	}
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
	int store;       /* down writes its rows' columns (routed) instead of adding to them */
	/* bf16 and int8 compute: the rows of the current chunk converted to
	 * bf16 or quantized to int8 (xb, row stride xs values) and the chunk's
	 * first row; int8: the rows' scales (sx) and sums of codes per group
	 * (qs, ng per row) */
	LLVMValueRef xb, c0, sx, qs;
	uint32_t xs, ng;
	/* set by the row-block loop for its tiles (panel_prefetch): whether
	 * this row block prefetches a slice of the next panel, which (pf_j),
	 * and log2 of their count (pf_sh) */
	LLVMValueRef pf_on, pf_j, pf_sh;
	LLVMValueRef pf_multi; /* more than one row block: prefetch at all */
	/* K blocking (kblock_nest; k0 NULL: the tiles run the whole K): the
	 * row blocks start at row0; the tiles compute k in [k0, k0 + kc),
	 * starting from zero (kfirst) or from their partial sums, and finish
	 * (activation, biases) in the last block (klast) only; up keeps the
	 * partial sums in part ([KB_ROWS][KB_PANELS][16] from row row0 and
	 * panel pg0), down in y; a tile prefetches the slice pf_step bytes past
	 * its own when pf_next */
	LLVMValueRef row0, k0, kfirst, klast, part, pg0, pf_step, pf_next;
	int64_t kc;
};

/* Store 8 h values at column c of row hrow: f32, or bf16 for the bf16 down
 * kernel (the row keeps its f32 stride). */
static void store_h8(struct moe_ll *g, LLVMValueRef o, LLVMValueRef hrow, LLVMValueRef c)
{
	if (g->p->compute == MOE_COMPUTE_BF16) {
		LLVMTypeRef tb = LLVMVectorType(LLVMBFloatTypeInContext(g->ctx), MOE_VW);
		moe_ll_st(g, LLVMBuildFPTrunc(g->b, o, tb, "hb"), moe_ll_at(g, g->t_i16, hrow, c));
		return;
	}
	moe_ll_st(g, o, moe_ll_at(g, g->t_f32, hrow, c));
}

/* The up epilogue of row ri at panel p, its 16 sums in acc (one <16 x float>
 * when wide, else two <8 x float>): input scale, biases, activation, output
 * scale, store to h. */
static void up_store(struct moe_ll *g, const struct ffn *f, LLVMValueRef ri, LLVMValueRef p,
		     const LLVMValueRef acc[2], int wide)
{
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	LLVMValueRef rw = moe_ll_prm(g, 2), bg = moe_ll_prm(g, 5), bu = moe_ll_prm(g, 6),
		     h = moe_ll_prm(g, 7);
	LLVMValueRef w = NULL;
	if (f->scale_in || f->scale_out)
		w = moe_ll_splat(g, moe_ll_ld(g, g->t_f32, moe_ll_at(g, g->t_f32, rw, ri)),
				 g->t_v8f);
	LLVMValueRef hrow =
	    moe_ll_at(g, g->t_f32, h, LLVMBuildNSWMul(b, ri, moe_ll_i64c(g, ge->ld_h), ""));
	LLVMValueRef c0 = LLVMBuildNSWMul(b, p, moe_ll_i64c(g, ge->up_cols), "col");
	LLVMValueRef v[2];
	for (int j = 0; j < 2; j++) {
		v[j] = wide ? half16(g, moe_ll_ld(g, g->t_v16f, acc[0]), j)
			    : moe_ll_ld(g, g->t_v8f, acc[j]);
		if (f->scale_in)
			v[j] = LLVMBuildFMul(b, v[j], w, "");
	}
	if (ge->glu) {
		if (f->bias) {
			v[0] = LLVMBuildFAdd(
			    b, v[0], moe_ll_ld(g, g->t_v8f, moe_ll_at(g, g->t_f32, bg, c0)), "");
			v[1] = LLVMBuildFAdd(
			    b, v[1], moe_ll_ld(g, g->t_v8f, moe_ll_at(g, g->t_f32, bu, c0)), "");
		}
		LLVMValueRef o = vglu(g, f->act, f->alpha, f->limit, v[0], v[1]);
		if (f->scale_out)
			o = LLVMBuildFMul(b, o, w, "");
		store_h8(g, o, hrow, c0);
		return;
	}
	for (int j = 0; j < 2; j++) {
		LLVMValueRef c = LLVMBuildNSWAdd(b, c0, moe_ll_i64c(g, j * MOE_VW), "");
		if (f->bias)
			v[j] = LLVMBuildFAdd(
			    b, v[j], moe_ll_ld(g, g->t_v8f, moe_ll_at(g, g->t_f32, bu, c)), "");
		LLVMValueRef o = vact(g, f->act, v[j]);
		if (f->scale_out)
			o = LLVMBuildFMul(b, o, w, "");
		store_h8(g, o, hrow, c);
	}
}

/* Where a tile's K loop prefetches (struct pf): while the row blocks over
 * panel p compute, the first S of them (S the largest power of two, at most
 * 8, not above their count) each draw a 1/S slice of the next panel of the
 * call (when p + 1 < p1) toward L2, so the next panel's first row block finds
 * it there instead of waiting on memory for every line, and the reads are
 * spread over the panel's time rather than bunched. A tile at byte off of
 * its own panel prefetches base + (off >> sh): the next panel's slice
 * (base = pan + bytes + j * bytes / S, sh = log2 S) or, in the other tiles
 * (the row blocks past the first S, the last panel of the call), its own line
 * (base = pan, sh = 0). A single row block (decode: the hardware's stream
 * prefetch is enough) prefetches nothing (any = 0): its own line was three
 * instructions per line for nothing, 6 % of an int4 decode in cache on an
 * AVX-512 host; quantized panels on 256-bit targets are the exception
 * (row_blocks_mr). */
struct pf {
	LLVMValueRef base, sh, any;
};

/* The prefetches of a tile reading the bytes bytes at pan: when more, the
 * row block's slice of those at pan + step, else its own lines. */
static struct pf prefetch_to(struct moe_ll *g, const struct ffn *f, LLVMValueRef more,
			     LLVMValueRef pan, LLVMValueRef step, int64_t bytes)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef on = LLVMBuildAnd(b, f->pf_on, more, "pf.on");
	LLVMValueRef slice =
	    LLVMBuildLShr(b, LLVMBuildNSWMul(b, f->pf_j, moe_ll_i64c(g, bytes), ""), f->pf_sh, "");
	LLVMValueRef next = moe_ll_at(g, g->t_i8, pan, LLVMBuildNSWAdd(b, step, slice, ""));
	struct pf r = {LLVMBuildSelect(b, on, next, pan, "pf"),
		       LLVMBuildSelect(b, on, f->pf_sh, moe_ll_i64c(g, 0), "pf.sh"), f->pf_multi};
	return r;
}

static struct pf panel_prefetch(struct moe_ll *g, const struct ffn *f, LLVMValueRef p,
				LLVMValueRef p1, LLVMValueRef pan, int64_t bytes)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef more =
	    LLVMBuildICmp(b, LLVMIntSLT, LLVMBuildNSWAdd(b, p, moe_ll_i64c(g, 1), ""), p1, "");
	return prefetch_to(g, f, more, pan, moe_ll_i64c(g, bytes), bytes);
}

/* Prefetch toward L2 the line for byte off of the tile's panel. */
static void prefetch_at(struct moe_ll *g, struct pf pf, LLVMValueRef off)
{
	LLVMBasicBlockRef end = moe_ll_when(g, pf.any, "pf.any");
	moe_ll_prefetch(g, moe_ll_at(g, g->t_i8, pf.base, LLVMBuildLShr(g->b, off, pf.sh, "")), 2);
	moe_ll_when_end(g, end);
}

/* The prefetches of a quantized block at byte boff of the panel: its
 * header lines (scales, and offsets for int4: hdr bytes) here, its codes'
 * lines by the caller's K loop (quant_code_prefetch). */
static void quant_block_prefetch(struct moe_ll *g, struct pf pf, LLVMValueRef boff, int64_t hdr)
{
	for (int64_t o = 0; o < hdr; o += 64)
		prefetch_at(g, pf, LLVMBuildNSWAdd(g->b, boff, moe_ll_i64c(g, o), ""));
}

/* The prefetch of the codes at byte off past the header of that block. */
static void quant_code_prefetch(struct moe_ll *g, struct pf pf, LLVMValueRef boff, int64_t hdr,
				LLVMValueRef off)
{
	LLVMBuilderRef b = g->b;
	prefetch_at(g, pf,
		    LLVMBuildNSWAdd(b, boff, LLVMBuildNSWAdd(b, moe_ll_i64c(g, hdr), off, ""), ""));
}

/* panel_prefetch for the f32-compute tiles: panels holds f32, f16 or bf16
 * weights, the panel of K rows of 16 at element pbase. */
static struct pf panel_prefetch_w(struct moe_ll *g, const struct ffn *f, LLVMValueRef p,
				  LLVMValueRef p1, LLVMValueRef panels, LLVMValueRef pbase,
				  uint32_t K)
{
	int es = g->d->weight_dtype == MOE_DTYPE_F32 ? 4 : 2;
	return panel_prefetch(g, f, p, p1,
			      moe_ll_at(g, es == 4 ? g->t_f32 : g->t_i16, panels, pbase),
			      (int64_t)K * MOE_NR * es);
}

/* The prefetch of k's panel row in an f32-compute K loop. */
static void prefetch_k(struct moe_ll *g, struct pf pf, LLVMValueRef k)
{
	int es = g->d->weight_dtype == MOE_DTYPE_F32 ? 4 : 2;
	prefetch_at(g, pf, LLVMBuildNSWMul(g->b, k, moe_ll_i64c(g, (int64_t)es * MOE_NR), ""));
}

/* The f32 tiles' accumulator chains per output element: on AVX-512 targets
 * two, k even and k odd, added at the end, so a 1-row tile (decode) is not
 * bound by the FMA latency (one chain: one k per 4 cycles, 16 bytes of panel
 * a cycle, slower than the L3); every tile of the target uses the same
 * chains, so a row's sums do not depend on the tile it falls in. */
static int f32_chains(const struct moe_ll *g)
{
	return g->wide ? 2 : 1;
}

/* One k step of an f32 tile: panel row k (at element off) times a_row[r][k]
 * into the accumulators acc[r][0..nv) (one <16 x float> when wide). */
static void f32_k_step(struct moe_ll *g, int mr, int wide, int nv, const LLVMValueRef *a_row,
		       LLVMValueRef acc[][2], LLVMValueRef panels, LLVMValueRef off, LLVMValueRef k)
{
	LLVMTypeRef t16 = LLVMVectorType(g->t_f32, 2 * MOE_VW);
	LLVMValueRef wv[2];
	if (wide)
		wv[0] = load_row16w(g, panels, off);
	else
		load_row16(g, panels, off, wv, nv);
	for (int r = 0; r < mr; r++) {
		LLVMValueRef a = moe_ll_ld(g, g->t_f32, moe_ll_at(g, g->t_f32, a_row[r], k));
		if (wide) {
			a = moe_ll_splat(g, a, g->t_v16f);
			moe_ll_st(g, moe_ll_fma(g, a, wv[0], moe_ll_ld(g, t16, acc[r][0])),
				  acc[r][0]);
			continue;
		}
		a = moe_ll_splat(g, a, g->t_v8f);
		for (int v = 0; v < nv; v++)
			moe_ll_st(g, moe_ll_fma(g, a, wv[v], moe_ll_ld(g, g->t_v8f, acc[r][v])),
				  acc[r][v]);
	}
}

/* The K loop of an f32 tile over chains (f32_chains): k in pairs, k even
 * into chain 0 and k odd into chain 1, an odd K's last k into chain 0; then
 * chain 1 is added to chain 0. acc[c][r][v]: chain c of row r. */
static void f32_k_loop(struct moe_ll *g, int mr, int wide, int nv, int nch,
		       const LLVMValueRef *a_row, LLVMValueRef acc[][MOE_MR][2],
		       LLVMValueRef panels, LLVMValueRef pbase, struct pf pf, int64_t K)
{
	LLVMBuilderRef b = g->b;
	struct moe_ll_loop k;
	int64_t steps = K / nch;
	moe_ll_loop_open(g, &k, moe_ll_i64c(g, 0), moe_ll_i64c(g, steps), 1, "k");
	for (int c = 0; c < nch; c++) {
		LLVMValueRef kk = LLVMBuildNSWAdd(
		    b, LLVMBuildNSWMul(b, k.iv, moe_ll_i64c(g, nch), ""), moe_ll_i64c(g, c), "");
		prefetch_k(g, pf, kk);
		LLVMValueRef off = LLVMBuildNSWAdd(
		    b, pbase, LLVMBuildNSWMul(b, kk, moe_ll_i64c(g, MOE_NR), ""), "");
		f32_k_step(g, mr, wide, nv, a_row, acc[c], panels, off, kk);
	}
	moe_ll_loop_close(g, &k);
	for (int64_t kk = steps * nch; kk < K; kk++) {
		LLVMValueRef kv = moe_ll_i64c(g, kk);
		prefetch_k(g, pf, kv);
		f32_k_step(g, mr, wide, nv, a_row, acc[0], panels,
			   LLVMBuildNSWAdd(b, pbase, moe_ll_i64c(g, kk * MOE_NR), ""), kv);
	}
	LLVMTypeRef t = wide ? LLVMVectorType(g->t_f32, 2 * MOE_VW) : g->t_v8f;
	for (int c = 1; c < nch; c++)
		for (int r = 0; r < mr; r++)
			for (int v = 0; v < (wide ? 1 : nv); v++)
				moe_ll_st(g,
					  LLVMBuildFAdd(b, moe_ll_ld(g, t, acc[0][r][v]),
							moe_ll_ld(g, t, acc[c][r][v]), ""),
					  acc[0][r][v]);
}

/* K blocking of the f32-compute tiles on 256-bit targets (kblock_nest):
 * rows in chunks of KB_ROWS, panels in groups of KB_PANELS, K in blocks of
 * at most KB_K. */
#define KB_ROWS 96
#define KB_PANELS 16
#define KB_K 256

/* Under K blocking (f->k0), the 16 floats of row ri's partial sums at panel
 * p in f->part. */
static LLVMValueRef part_at(struct moe_ll *g, const struct ffn *f, LLVMValueRef ri, LLVMValueRef p)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef i = LLVMBuildNSWAdd(
	    b,
	    LLVMBuildNSWMul(b, LLVMBuildNSWSub(b, ri, f->row0, ""), moe_ll_i64c(g, KB_PANELS), ""),
	    LLVMBuildNSWSub(b, p, f->pg0, ""), "");
	return moe_ll_at(g, g->t_f32, f->part, LLVMBuildNSWMul(b, i, moe_ll_i64c(g, MOE_NR), ""));
}

/* The panel bytes per k of the f32-compute tiles. */
static int64_t panel_row_bytes(const struct moe_ll *g)
{
	return (g->d->weight_dtype == MOE_DTYPE_F32 ? 4 : 2) * (int64_t)MOE_NR;
}

/* The prefetches of a K-blocked tile (f->k0) whose slice of the panels
 * starts at element pbase: the slice pf_step bytes further when pf_next. */
static struct pf slice_prefetch(struct moe_ll *g, const struct ffn *f, LLVMValueRef panels,
				LLVMValueRef pbase)
{
	int es = g->d->weight_dtype == MOE_DTYPE_F32 ? 4 : 2;
	LLVMValueRef pan = moe_ll_at(g, es == 4 ? g->t_f32 : g->t_i16, panels, pbase);
	return prefetch_to(g, f, f->pf_next, pan, f->pf_step, f->kc * panel_row_bytes(g));
}

/* The K loop of an f32 tile over panel p of the call's panels (parameter
 * 4) with K values per column, or K-blocked (f->k0) its block [k0, k0 + kc);
 * p1 (the call's end panel) bounds the next-panel prefetch. */
static void f32_tile_k(struct moe_ll *g, const struct ffn *f, int mr, int wide, int nv,
		       const LLVMValueRef *a_row, LLVMValueRef acc[][MOE_MR][2], LLVMValueRef p,
		       LLVMValueRef p1, int64_t K)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef panels = moe_ll_prm(g, 4);
	LLVMValueRef pbase = LLVMBuildNSWMul(b, p, moe_ll_i64c(g, K * MOE_NR), "panel.off");
	if (f->k0)
		pbase = LLVMBuildNSWAdd(
		    b, pbase, LLVMBuildNSWMul(b, f->k0, moe_ll_i64c(g, MOE_NR), ""), "slice.off");
	struct pf pf = f->k0 ? slice_prefetch(g, f, panels, pbase)
			     : panel_prefetch_w(g, f, p, p1, panels, pbase, (uint32_t)K);
	f32_k_loop(g, mr, wide, nv, f32_chains(g), a_row, acc, panels, pbase, pf,
		   f->k0 ? f->kc : K);
}

/* One up tile of mr rows at row r0 and panel p, K = hidden (or, K-blocked,
 * its block [k0, k0 + kc)): the accumulators (12 at mr = 6 and AVX-512)
 * stay in registers across the K loop. */
static void up_tile(struct moe_ll *g, const struct ffn *f, int mr, LLVMValueRef r0, LLVMValueRef p)
{
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	LLVMValueRef x = moe_ll_prm(g, 0), rows = moe_ll_prm(g, 1);
	LLVMValueRef a_row[MOE_MR], acc[2][MOE_MR][2];
	LLVMTypeRef t16 = LLVMVectorType(g->t_f32, 2 * MOE_VW);
	int wide = g->wide, nch = f32_chains(g);
	LLVMValueRef k0 = f->k0 ? f->k0 : moe_ll_i64c(g, 0);
	char nm[48];

	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		LLVMValueRef tok = moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i32, rows, ri));
		tok = LLVMBuildSExt(b, tok, g->t_i64, "");
		a_row[r] = moe_ll_at(
		    g, g->t_f32, x,
		    LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, tok, moe_ll_i64c(g, ge->hidden), ""), k0,
				    ""));
		for (int c = 0; c < nch; c++)
			for (int v = 0; v < 2 - wide; v++) {
				LLVMTypeRef t = wide ? t16 : g->t_v8f;
				LLVMValueRef z = LLVMConstNull(t);
				snprintf(nm, sizeof nm, "acc%d%d%d", c, r, v);
				acc[c][r][v] = moe_ll_alloca(g, t, 1, nm);
				if (f->k0) /* one chain (kblock_kc) */
					z = LLVMBuildSelect(
					    b, f->kfirst, z,
					    moe_ll_ld(g, t,
						      moe_ll_at(g, g->t_f32, part_at(g, f, ri, p),
								moe_ll_i64c(g, v * MOE_VW))),
					    "");
				moe_ll_st(g, z, acc[c][r][v]);
			}
	}
	f32_tile_k(g, f, mr, wide, 2, a_row, acc, p, moe_ll_prm(g, 9), ge->hidden);

	/* Epilogue: scale, bias, activation, store to h; K-blocked, the
	 * blocks before the last store their partial sums. */
	LLVMBasicBlockRef end = NULL;
	if (f->k0) {
		end = moe_ll_when(g, LLVMBuildNot(b, f->klast, ""), "part");
		for (int r = 0; r < mr; r++) {
			LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
			for (int v = 0; v < 2; v++)
				moe_ll_st(g, moe_ll_ld(g, g->t_v8f, acc[0][r][v]),
					  moe_ll_at(g, g->t_f32, part_at(g, f, ri, p),
						    moe_ll_i64c(g, v * MOE_VW)));
		}
		moe_ll_when_end(g, end);
		end = moe_ll_when(g, f->klast, "last");
	}
	for (int r = 0; r < mr; r++)
		up_store(g, f, LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), ""), p, acc[0][r], wide);
	if (end)
		moe_ll_when_end(g, end);
}

/* Constant <8 x i1> mask of lanes [0, n). */
static LLVMValueRef lane_mask(struct moe_ll *g, int n)
{
	LLVMValueRef e[MOE_VW];
	for (int i = 0; i < MOE_VW; i++)
		e[i] = LLVMConstInt(g->t_i1, i < n, 0);
	return LLVMConstVector(e, MOE_VW);
}

static LLVMValueRef vload_cols(struct moe_ll *g, LLVMValueRef ptr, int n)
{
	if (n == MOE_VW)
		return moe_ll_ld(g, g->t_v8f, ptr);
	LLVMTypeRef tys[2] = {g->t_v8f, g->t_ptr};
	LLVMValueRef args[4] = {ptr, moe_ll_i32c(g, 4), lane_mask(g, n), moe_ll_vf32c(g, 0.0)};
	return moe_ll_intr(g, "llvm.masked.load", tys, 2, args, 4);
}

static void vstore_cols(struct moe_ll *g, LLVMValueRef v, LLVMValueRef ptr, int n)
{
	if (n == MOE_VW) {
		moe_ll_st(g, v, ptr);
		return;
	}
	LLVMTypeRef tys[2] = {g->t_v8f, g->t_ptr};
	LLVMValueRef args[4] = {v, ptr, moe_ll_i32c(g, 4), lane_mask(g, n)};
	moe_ll_intr(g, "llvm.masked.store", tys, 2, args, 4);
}

/* One down tile of mr rows at row r0 and panel p, K = width (or, K-blocked,
 * its block [k0, k0 + kc), the partial sums in y), accumulating into y;
 * ncols < 16 for the last panel of a hidden size that is not a
 * multiple of 16. */
static void down_tile(struct moe_ll *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
		      LLVMValueRef p)
{
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	LLVMValueRef hbuf = moe_ll_prm(g, 0), rows = moe_ll_prm(g, 1), rw = moe_ll_prm(g, 2);
	LLVMValueRef bd = moe_ll_prm(g, 5), y = moe_ll_prm(g, 6);
	int nv = ncols > MOE_VW ? 2 : 1;
	int lanes[2] = {ncols > MOE_VW ? MOE_VW : ncols, ncols - MOE_VW};
	int wide = g->wide && ncols == MOE_NR, nch = f32_chains(g);
	LLVMTypeRef t16 = LLVMVectorType(g->t_f32, 2 * MOE_VW);
	LLVMValueRef a_row[MOE_MR], y_ptr[MOE_MR][2], acc[2][MOE_MR][2];
	char nm[48];
	LLVMValueRef c0 = LLVMBuildNSWMul(b, p, moe_ll_i64c(g, MOE_NR), "col");
	LLVMValueRef k0 = f->k0 ? f->k0 : moe_ll_i64c(g, 0);

	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		a_row[r] =
		    moe_ll_at(g, g->t_f32, hbuf,
			      LLVMBuildNSWAdd(
				  b, LLVMBuildNSWMul(b, ri, moe_ll_i64c(g, ge->ld_h), ""), k0, ""));
		LLVMValueRef tok = moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i32, rows, ri));
		tok = LLVMBuildSExt(b, tok, g->t_i64, "");
		LLVMValueRef yrow = moe_ll_at(
		    g, g->t_f32, y, LLVMBuildNSWMul(b, tok, moe_ll_i64c(g, ge->hidden), ""));
		for (int v = 0; v < nv; v++) {
			y_ptr[r][v] =
			    moe_ll_at(g, g->t_f32, yrow,
				      LLVMBuildNSWAdd(b, c0, moe_ll_i64c(g, v * MOE_VW), ""));
			if (wide && v)
				continue;
			/* chain 0 starts from y when adding to it or past the first
			 * K block, the others from 0 */
			for (int c = 0; c < nch; c++) {
				LLVMTypeRef t = wide ? t16 : g->t_v8f;
				snprintf(nm, sizeof nm, "acc%d%d%d", c, r, v);
				acc[c][r][v] = moe_ll_alloca(g, t, 1, nm);
				LLVMValueRef a0 = c      ? LLVMConstNull(t)
						  : wide ? moe_ll_ld(g, t16, y_ptr[r][0])
							 : vload_cols(g, y_ptr[r][v], lanes[v]);
				if (!c && f->store)
					a0 = f->k0 ? LLVMBuildSelect(b, f->kfirst, LLVMConstNull(t),
								     a0, "")
						   : LLVMConstNull(t);
				moe_ll_st(g, a0, acc[c][r][v]);
			}
		}
	}
	f32_tile_k(g, f, mr, wide, nv, a_row, acc, p, moe_ll_prm(g, 8), ge->width);

	for (int r = 0; r < mr; r++) {
		LLVMValueRef w = NULL;
		if (f->bias && f->down_bias_w) {
			LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
			w = moe_ll_splat(g, moe_ll_ld(g, g->t_f32, moe_ll_at(g, g->t_f32, rw, ri)),
					 g->t_v8f);
		}
		for (int v = 0; v < nv; v++) {
			LLVMValueRef o = wide ? half16(g, moe_ll_ld(g, t16, acc[0][r][0]), v)
					      : moe_ll_ld(g, g->t_v8f, acc[0][r][v]);
			if (f->bias) {
				LLVMValueRef c =
				    LLVMBuildNSWAdd(b, c0, moe_ll_i64c(g, v * MOE_VW), "");
				LLVMValueRef bv =
				    moe_ll_ld(g, g->t_v8f, moe_ll_at(g, g->t_f32, bd, c));
				if (w)
					bv = LLVMBuildFMul(b, bv, w, "");
				LLVMValueRef ob = LLVMBuildFAdd(b, o, bv, "");
				o = f->k0 ? LLVMBuildSelect(b, f->klast, ob, o, "") : ob;
			}
			vstore_cols(g, o, y_ptr[r][v], lanes[v]);
		}
	}
}

/* Loop over row blocks of MR (MOE_MR, or BF_MR for bf16 compute),
 * dispatching the remainder to a tile specialized for its row count. */
#define MAX_MR 8 /* the most rows of any tile */
typedef void tile_fn(struct moe_ll *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
		     LLVMValueRef p);

static void up_tile_adapter(struct moe_ll *g, const struct ffn *f, int mr, int ncols,
			    LLVMValueRef r0, LLVMValueRef p)
{
	(void)ncols;
	up_tile(g, f, mr, r0, p);
}

/* quant: the tiles read quantized panels. On 256-bit targets a single row
 * block (decode) of those prefetches the next panel as several would: the
 * hardware's stream prefetch alone left a Zen 3 core's int4 decode waiting
 * on the codes (qwen3, one layer: 17 % faster in f32 compute, 20 % in int8;
 * f32 panels 8 % slower, so not them). */
static void row_blocks_mr(struct moe_ll *g, const struct ffn *f, tile_fn *tile, int ncols,
			  LLVMValueRef p, LLVMValueRef n, int MR, int quant)
{
	LLVMBuilderRef b = g->b;
	struct moe_ll_loop r;
	char nm[32];
	/* nrb = ceil(n / MR) blocks of balanced sizes (they differ by at most
	 * one row): block j covers rows [j n / nrb, (j + 1) n / nrb). 13 rows
	 * run as 5, 4, 4 rather than 6, 6, 1, whose 1-row tile waits on its
	 * accumulator chains and loads a panel vector per row. */
	LLVMValueRef nrb = LLVMBuildSDiv(b, LLVMBuildNSWAdd(b, n, moe_ll_i64c(g, MR - 1), ""),
					 moe_ll_i64c(g, MR), "nrb");
	moe_ll_loop_open(g, &r, moe_ll_i64c(g, 0), nrb, 1, "rb");
	LLVMValueRef r0 = LLVMBuildSDiv(b, LLVMBuildNSWMul(b, r.iv, n, ""), nrb, "r0");
	LLVMValueRef r1 = LLVMBuildSDiv(
	    b, LLVMBuildNSWMul(b, LLVMBuildNSWAdd(b, r.iv, moe_ll_i64c(g, 1), ""), n, ""), nrb,
	    "r1");
	LLVMValueRef mr = LLVMBuildNSWSub(b, r1, r0, "mr");
	if (f->row0)
		r0 = LLVMBuildNSWAdd(b, f->row0, r0, "r0");
	LLVMBasicBlockRef done = moe_ll_bb(g, "tile.done");
	LLVMBasicBlockRef cases[MAX_MR + 1];
	for (int m = 1; m <= MR; m++) {
		snprintf(nm, sizeof nm, "tile.mr%d", m);
		cases[m] = moe_ll_bb(g, nm);
	}
	struct ffn fr = *f;
	fr.pf_sh = moe_ll_i64c(g, 0);
	for (int sh = 1; sh <= 3; sh++)
		fr.pf_sh = LLVMBuildSelect(
		    b, LLVMBuildICmp(b, LLVMIntSGE, nrb, moe_ll_i64c(g, 1 << sh), ""),
		    moe_ll_i64c(g, sh), fr.pf_sh, "");
	fr.pf_j = r.iv;
	fr.pf_multi = quant && !g->wide
			  ? LLVMConstInt(g->t_i1, 1, 0)
			  : LLVMBuildICmp(b, LLVMIntSGT, nrb, moe_ll_i64c(g, 1), "pf.multi");
	fr.pf_on = LLVMBuildAnd(b, fr.pf_multi,
				LLVMBuildICmp(b, LLVMIntSLT, fr.pf_j,
					      LLVMBuildShl(b, moe_ll_i64c(g, 1), fr.pf_sh, ""), ""),
				"pf.on");
	LLVMValueRef sw = LLVMBuildSwitch(b, mr, cases[MR], (unsigned)MR - 1);
	for (int m = 1; m < MR; m++)
		LLVMAddCase(sw, moe_ll_i64c(g, m), cases[m]);
	LLVMBasicBlockRef after = cases[MR];
	for (int m = MR; m >= 1; m--) {
		LLVMPositionBuilderAtEnd(b, cases[m]);
		tile(g, &fr, m, ncols, r0, p);
		LLVMBuildBr(b, done);
		if (m != MR) {
			LLVMMoveBasicBlockAfter(cases[m], after);
		}
		after = LLVMGetInsertBlock(b);
	}
	LLVMMoveBasicBlockAfter(done, after);
	LLVMPositionBuilderAtEnd(b, done);
	moe_ll_loop_close(g, &r);
}

static void row_blocks(struct moe_ll *g, const struct ffn *f, tile_fn *tile, int ncols,
		       LLVMValueRef p, LLVMValueRef n)
{
	row_blocks_mr(g, f, tile, ncols, p, n, MOE_MR, 0);
}

/* The K block of the f32-compute tiles for a K loop of K, 0 for none: on
 * 256-bit targets (one accumulator chain, so the partial sums add in the
 * order of the unblocked loop: the same bits), the largest divisor of K
 * from 64 to KB_K when K is longer. A Zen 3 core's 512 KiB of L2 held
 * neither a Mixtral up panel (256 KiB) beside its prefetched successor and
 * the rows, nor a down panel (896 KiB), which every row block of the
 * unblocked loops reads again (Mixtral f32 at T = 256: 7 % faster). */
static int64_t kblock_kc(const struct moe_ll *g, int64_t K)
{
	if (g->wide || K <= KB_K)
		return 0;
	for (int64_t kc = KB_K; kc >= 64; kc--)
		if (K % kc == 0)
			return kc;
	return 0;
}

/* The K-blocked loops of an f32-compute call over rows [0, n) and panels
 * [p0, p1) of K = kc * nkb: for each chunk of KB_ROWS rows, each group of
 * KB_PANELS panels, each K block, each panel of the group, the row blocks.
 * A block's slice of a panel (kc rows of 16: 16 KiB of f32 at kc = 256)
 * stays in L1 across the row blocks, the chunk's rows of the block (96 KiB)
 * and the partial sums in L2 across the group's panels. Each tile
 * prefetches its row block's share of the next slice of the loop: the next
 * panel's, or the group's first panel's in the next block. */
static void kblock_nest(struct moe_ll *g, const struct ffn *f, tile_fn *tile, int ncols,
			LLVMValueRef p0, LLVMValueRef p1, LLVMValueRef n, int64_t K, int64_t kc,
			LLVMValueRef part)
{
	LLVMBuilderRef b = g->b;
	int64_t nkb = K / kc, pbytes = K * panel_row_bytes(g);
	struct moe_ll_loop rc, pg, kb, p;
	struct ffn fk = *f;
	fk.kc = kc;
	fk.part = part;
	moe_ll_loop_open(g, &rc, moe_ll_i64c(g, 0), n, KB_ROWS, "kb.rc");
	LLVMValueRef rn = LLVMBuildNSWSub(b, n, rc.iv, "");
	rn = LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, rn, moe_ll_i64c(g, KB_ROWS), ""), rn,
			     moe_ll_i64c(g, KB_ROWS), "kb.rn");
	fk.row0 = rc.iv;
	moe_ll_loop_open(g, &pg, p0, p1, KB_PANELS, "kb.pg");
	LLVMValueRef pg1 = LLVMBuildNSWAdd(b, pg.iv, moe_ll_i64c(g, KB_PANELS), "");
	pg1 = LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, pg1, p1, ""), pg1, p1, "kb.pg1");
	fk.pg0 = pg.iv;
	moe_ll_loop_open(g, &kb, moe_ll_i64c(g, 0), moe_ll_i64c(g, nkb), 1, "kb.k");
	fk.k0 = LLVMBuildNSWMul(b, kb.iv, moe_ll_i64c(g, kc), "k0");
	fk.kfirst = LLVMBuildICmp(b, LLVMIntEQ, kb.iv, moe_ll_i64c(g, 0), "kfirst");
	fk.klast = LLVMBuildICmp(b, LLVMIntEQ, kb.iv, moe_ll_i64c(g, nkb - 1), "klast");
	moe_ll_loop_open(g, &p, pg.iv, pg1, 1, "kb.p");
	LLVMValueRef pn = LLVMBuildNSWAdd(b, p.iv, moe_ll_i64c(g, 1), "");
	LLVMValueRef in_group = LLVMBuildICmp(b, LLVMIntSLT, pn, pg1, "");
	/* back to the group's first panel, one block on */
	LLVMValueRef back = LLVMBuildNSWSub(
	    b, moe_ll_i64c(g, kc * panel_row_bytes(g)),
	    LLVMBuildNSWMul(b, LLVMBuildNSWSub(b, p.iv, pg.iv, ""), moe_ll_i64c(g, pbytes), ""),
	    "");
	fk.pf_step = LLVMBuildSelect(b, in_group, moe_ll_i64c(g, pbytes), back, "pf.step");
	fk.pf_next = LLVMBuildOr(b, in_group, LLVMBuildNot(b, fk.klast, ""), "pf.next");
	row_blocks_mr(g, &fk, tile, ncols, p.iv, rn, MOE_MR, 0);
	moe_ll_loop_close(g, &p);
	moe_ll_loop_close(g, &kb);
	moe_ll_loop_close(g, &pg);
	moe_ll_loop_close(g, &rc);
}

/* The loops of an f32-compute call: K-blocked (kblock_kc) when it has
 * more than one row block, else (decode: one pass over each panel, which
 * the hardware's stream prefetch follows) over the panels, then the row
 * blocks. */
static void f32_call(struct moe_ll *g, const struct ffn *f, tile_fn *tile, int ncols,
		     LLVMValueRef p0, LLVMValueRef p1, LLVMValueRef n, int64_t K)
{
	LLVMBuilderRef b = g->b;
	int64_t kc = kblock_kc(g, K);
	LLVMBasicBlockRef end = NULL;
	if (kc) {
		LLVMValueRef part =
		    moe_ll_alloca(g, g->t_f32, (uint64_t)KB_ROWS * KB_PANELS * MOE_NR, "part");
		LLVMValueRef many = LLVMBuildICmp(b, LLVMIntSGT, n, moe_ll_i64c(g, MOE_MR), "");
		LLVMBasicBlockRef blk = moe_ll_bb(g, "kb"), flat = moe_ll_bb(g, "flat");
		end = moe_ll_bb(g, "call.end");
		LLVMBuildCondBr(b, many, blk, flat);
		LLVMPositionBuilderAtEnd(b, blk);
		kblock_nest(g, f, tile, ncols, p0, p1, n, K, kc, part);
		LLVMBuildBr(b, end);
		LLVMMoveBasicBlockAfter(flat, LLVMGetInsertBlock(b));
		LLVMPositionBuilderAtEnd(b, flat);
	}
	struct moe_ll_loop p;
	moe_ll_loop_open(g, &p, p0, p1, 1, "p");
	row_blocks(g, f, tile, ncols, p.iv, n);
	moe_ll_loop_close(g, &p);
	if (end) {
		LLVMBuildBr(b, end);
		LLVMMoveBasicBlockAfter(end, LLVMGetInsertBlock(b));
		LLVMPositionBuilderAtEnd(b, end);
	}
}

/* bf16 compute ------------------------------------------------------------ */

/* Rows per bf16 tile: two chains per row (even and odd k pairs) keep
 * 2 * BF_MR <16 x float> accumulators in the 32 zmm registers. */
#define BF_MR 6
/* The rows of x one up call converts at a time: at most this many bytes of
 * stack (and at most the runtime's tile of 96 rows). */
#define BF_CHUNK_BYTES (512 * 1024)
#define BF_CHUNK_ROWS 96

static LLVMTypeRef t_v32bf(struct moe_ll *g)
{
	return LLVMVectorType(LLVMBFloatTypeInContext(g->ctx), 4 * MOE_VW);
}

/* acc + the pair a (two bf16 in an i32, broadcast to every lane) times the 16
 * column pairs of w: vdpbf16ps. The broadcast is the last operand, the one
 * the instruction can read from memory itself (m32bcst): no separate
 * broadcast per row. Its products are exact and symmetric in the two
 * sources, so the order of w and a changes no bit. */
static LLVMValueRef dpbf16(struct moe_ll *g, LLVMValueRef acc, LLVMValueRef a, LLVMValueRef w)
{
	LLVMValueRef av = moe_ll_splat(g, a, LLVMVectorType(g->t_i32, 2 * MOE_VW));
	LLVMValueRef args[3] = {acc, w, LLVMBuildBitCast(g->b, av, t_v32bf(g), "")};
	return moe_ll_intr(g, "llvm.x86.avx512bf16.dpbf16ps.512", NULL, 0, args, 3);
}

/* Constant <16 x i1> mask of lanes [0, n). */
static LLVMValueRef lane_mask16(struct moe_ll *g, int n)
{
	LLVMValueRef e[2 * MOE_VW];
	for (int i = 0; i < 2 * MOE_VW; i++)
		e[i] = LLVMConstInt(g->t_i1, i < n, 0);
	return LLVMConstVector(e, 2 * MOE_VW);
}

static LLVMValueRef vload16(struct moe_ll *g, LLVMValueRef ptr, int n)
{
	if (n >= 2 * MOE_VW)
		return moe_ll_ld(g, g->t_v16f, ptr);
	if (n <= 0)
		return LLVMConstNull(g->t_v16f);
	LLVMTypeRef tys[2] = {g->t_v16f, g->t_ptr};
	LLVMValueRef args[4] = {ptr, moe_ll_i32c(g, 4), lane_mask16(g, n),
				LLVMConstNull(g->t_v16f)};
	return moe_ll_intr(g, "llvm.masked.load", tys, 2, args, 4);
}

static void vstore16(struct moe_ll *g, LLVMValueRef v, LLVMValueRef ptr, int n)
{
	if (n >= 2 * MOE_VW) {
		moe_ll_st(g, v, ptr);
		return;
	}
	LLVMTypeRef tys[2] = {g->t_v16f, g->t_ptr};
	LLVMValueRef args[4] = {v, ptr, moe_ll_i32c(g, 4), lane_mask16(g, n)};
	moe_ll_intr(g, "llvm.masked.store", tys, 2, args, 4);
}

/* acc0[r] += the mr rows of bf16 pairs at a_row[r] (kp pairs) times the pair
 * panel pan: per row one chain over the even pairs (acc0) and one over the
 * odd pairs (acc1, zeroed here), added at the end, whatever mr is. */
static void pair_tile(struct moe_ll *g, int mr, const LLVMValueRef *a_row, LLVMValueRef pan,
		      int64_t kp, const LLVMValueRef *acc0, struct pf pf)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef acc1[BF_MR] = {0};
	char nm[32];
	for (int r = 0; r < mr; r++) {
		snprintf(nm, sizeof nm, "acc%d1", r);
		acc1[r] = moe_ll_alloca(g, g->t_v16f, 1, nm);
		moe_ll_st(g, LLVMConstNull(g->t_v16f), acc1[r]);
	}
	struct moe_ll_loop k;
	for (int pass = 0; pass < 2; pass++) {
		/* pass 0: pairs [0, kp & ~1) two at a time; pass 1: the last odd one */
		int64_t n = pass ? kp & 1 : kp / 2;
		if (!n)
			continue;
		LLVMValueRef k0;
		if (pass) {
			k0 = moe_ll_i64c(g, kp - 1);
		} else {
			moe_ll_loop_open(g, &k, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), 1, "kp");
			k0 = LLVMBuildNSWMul(b, k.iv, moe_ll_i64c(g, 2), "kk");
		}
		for (int c = 0; c < 2 - pass; c++) {
			LLVMValueRef kk = c ? LLVMBuildNSWAdd(b, k0, moe_ll_i64c(g, 1), "") : k0;
			LLVMValueRef w = moe_ll_ld(
			    g, t_v32bf(g),
			    moe_ll_at(g, g->t_i16, pan,
				      LLVMBuildNSWMul(b, kk, moe_ll_i64c(g, 2 * MOE_NR), "")));
			const LLVMValueRef *acc = c ? acc1 : acc0;
			prefetch_at(g, pf, LLVMBuildNSWMul(b, kk, moe_ll_i64c(g, 4 * MOE_NR), ""));
			for (int r = 0; r < mr; r++) {
				LLVMValueRef a =
				    moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i32, a_row[r], kk));
				moe_ll_st(g, dpbf16(g, moe_ll_ld(g, g->t_v16f, acc[r]), a, w),
					  acc[r]);
			}
		}
		if (!pass)
			moe_ll_loop_close(g, &k);
	}
	for (int r = 0; r < mr; r++)
		moe_ll_st(g,
			  LLVMBuildFAdd(b, moe_ll_ld(g, g->t_v16f, acc0[r]),
					moe_ll_ld(g, g->t_v16f, acc1[r]), "sum"),
			  acc0[r]);
}

/* One bf16 up tile: mr converted rows from r0 of the chunk times panel p. */
static void up_pair_tile(struct moe_ll *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
			 LLVMValueRef p)
{
	(void)ncols;
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	uint32_t K = ge->hidden + (ge->hidden & 1);
	LLVMValueRef a_row[BF_MR] = {0}, acc[BF_MR] = {0};
	char nm[32];
	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		a_row[r] = moe_ll_at(g, g->t_i16, f->xb,
				     LLVMBuildNSWMul(b, ri, moe_ll_i64c(g, f->xs), ""));
		snprintf(nm, sizeof nm, "acc%d0", r);
		acc[r] = moe_ll_alloca(g, g->t_v16f, 1, nm);
		moe_ll_st(g, LLVMConstNull(g->t_v16f), acc[r]);
	}
	LLVMValueRef pan =
	    moe_ll_at(g, g->t_i16, moe_ll_prm(g, 4),
		      LLVMBuildNSWMul(b, p, moe_ll_i64c(g, (int64_t)K * MOE_NR), ""));
	pair_tile(g, mr, a_row, pan, K / 2, acc,
		  panel_prefetch(g, f, p, moe_ll_prm(g, 9), pan, (int64_t)K * MOE_NR * 2));
	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri =
		    LLVMBuildNSWAdd(b, f->c0, LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), ""), "");
		LLVMValueRef two[2] = {acc[r], NULL};
		up_store(g, f, ri, p, two, 1);
	}
}

/* Convert row tok of x (hidden f32) to bf16 at dst (xs values, zero past
 * hidden): 32 values per vcvtne2ps2bf16. */
static void convert_row(struct moe_ll *g, LLVMValueRef src, LLVMValueRef dst, uint32_t H)
{
	LLVMBuilderRef b = g->b;
	struct moe_ll_loop i;
	uint32_t full = H / 32, tail = H % 32;
	for (int pass = 0; pass < 2; pass++) {
		if (pass ? !tail : !full)
			continue;
		int lo_n = pass ? (int)tail : 16, hi_n = pass ? (int)tail - 16 : 16;
		if (!pass)
			moe_ll_loop_open(g, &i, moe_ll_i64c(g, 0), moe_ll_i64c(g, full), 1, "cvt");
		LLVMValueRef off = pass ? moe_ll_i64c(g, (int64_t)full * 32)
					: LLVMBuildNSWMul(b, i.iv, moe_ll_i64c(g, 32), "");
		LLVMValueRef lo = vload16(g, moe_ll_at(g, g->t_f32, src, off), lo_n);
		LLVMValueRef hi = vload16(
		    g, moe_ll_at(g, g->t_f32, src, LLVMBuildNSWAdd(b, off, moe_ll_i64c(g, 16), "")),
		    hi_n);
		LLVMValueRef args[2] = {hi, lo};
		LLVMValueRef c =
		    moe_ll_intr(g, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", NULL, 0, args, 2);
		moe_ll_st(g, c, moe_ll_at(g, g->t_i16, dst, off));
		if (!pass)
			moe_ll_loop_close(g, &i);
	}
}

/* moe_up for bf16 compute: chunks of rows are converted to bf16 once, then
 * every panel of [p0, p1) passes over the chunk's row blocks. */
static void gen_up_pairs(struct moe_ll *g, const char *name, const struct ffn *f0)
{
	LLVMBuilderRef b = g->b;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, P, I, P, P, P, P, I, I};
	static const char *const pn[] = {"x",  "rows", "rw", "n",  "panels",
					 "bg", "bu",   "h",  "p0", "p1"};
	moe_ll_fn_begin(g, name, params, pn, 10);
	for (unsigned i = 0; i < 8; i++)
		if (i != 3)
			moe_ll_noalias(g, i);
	struct ffn f = *f0;
	uint32_t H = f.geom->hidden;
	f.xs = (H + 31) / 32 * 32;
	int64_t cr = BF_CHUNK_BYTES / (2 * (int64_t)f.xs) / BF_MR * BF_MR;
	cr = cr < BF_MR ? BF_MR : cr > BF_CHUNK_ROWS ? BF_CHUNK_ROWS : cr;
	f.xb = moe_ll_alloca(g, g->t_i16, (uint64_t)cr * f.xs, "xb");
	LLVMSetAlignment(f.xb, 64);
	LLVMValueRef n = moe_ll_prm(g, 3);
	struct moe_ll_loop c, r, p;
	moe_ll_loop_open(g, &c, moe_ll_i64c(g, 0), n, cr, "chunk");
	f.c0 = c.iv;
	LLVMValueRef left = LLVMBuildNSWSub(b, n, c.iv, "");
	LLVMValueRef cn =
	    LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, left, moe_ll_i64c(g, cr), ""), left,
			    moe_ll_i64c(g, cr), "cn");
	moe_ll_loop_open(g, &r, moe_ll_i64c(g, 0), cn, 1, "cvt.r");
	LLVMValueRef tok =
	    moe_ll_ld(g, g->t_i32,
		      moe_ll_at(g, g->t_i32, moe_ll_prm(g, 1), LLVMBuildNSWAdd(b, c.iv, r.iv, "")));
	tok = LLVMBuildSExt(b, tok, g->t_i64, "");
	convert_row(
	    g,
	    moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0),
		      LLVMBuildNSWMul(b, tok, moe_ll_i64c(g, H), "")),
	    moe_ll_at(g, g->t_i16, f.xb, LLVMBuildNSWMul(b, r.iv, moe_ll_i64c(g, f.xs), "")), H);
	moe_ll_loop_close(g, &r);
	moe_ll_loop_open(g, &p, moe_ll_prm(g, 8), moe_ll_prm(g, 9), 1, "p");
	row_blocks_mr(g, &f, up_pair_tile, MOE_NR, p.iv, cn, BF_MR, 0);
	moe_ll_loop_close(g, &p);
	moe_ll_loop_close(g, &c);
	moe_ll_fn_end(g);
}

/* The 16 columns at c0 of y's row for grouped row ri: its token's row. */
static LLVMValueRef down_y_cols(struct moe_ll *g, const struct ffn *f, LLVMValueRef ri,
				LLVMValueRef c0)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef tok = moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i32, moe_ll_prm(g, 1), ri));
	tok = LLVMBuildSExt(b, tok, g->t_i64, "");
	return moe_ll_at(
	    g, g->t_f32, moe_ll_prm(g, 6),
	    LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, tok, moe_ll_i64c(g, f->geom->hidden), ""), c0,
			    ""));
}

/* Store the 16-lane tile row o of grouped row base + r to the ncols columns
 * at yp, plus the down bias at column c0 (times the row's routing weight
 * when the bias is scaled). */
static void down_store16(struct moe_ll *g, const struct ffn *f, LLVMValueRef base, int r,
			 LLVMValueRef c0, LLVMValueRef o, LLVMValueRef yp, int ncols)
{
	LLVMBuilderRef b = g->b;
	if (f->bias) {
		LLVMValueRef bv =
		    moe_ll_ld(g, g->t_v16f, moe_ll_at(g, g->t_f32, moe_ll_prm(g, 5), c0));
		if (f->down_bias_w) {
			LLVMValueRef ri = LLVMBuildNSWAdd(b, base, moe_ll_i64c(g, r), "");
			LLVMValueRef w =
			    moe_ll_ld(g, g->t_f32, moe_ll_at(g, g->t_f32, moe_ll_prm(g, 2), ri));
			bv = LLVMBuildFMul(b, bv, moe_ll_splat(g, w, g->t_v16f), "");
		}
		o = LLVMBuildFAdd(b, o, bv, "");
	}
	vstore16(g, o, yp, ncols);
}

/* One bf16 down tile: mr rows of bf16 h from r0 times panel p, accumulated
 * into y (ncols < 16: the last panel, masked). */
static void down_pair_tile(struct moe_ll *g, const struct ffn *f, int mr, int ncols,
			   LLVMValueRef r0, LLVMValueRef p)
{
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	uint32_t K = ge->width + (ge->width & 1);
	LLVMValueRef hbuf = moe_ll_prm(g, 0);
	LLVMValueRef a_row[BF_MR] = {0}, y_ptr[BF_MR] = {0}, acc[BF_MR] = {0};
	LLVMValueRef c0 = LLVMBuildNSWMul(b, p, moe_ll_i64c(g, MOE_NR), "col");
	char nm[32];
	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		a_row[r] = moe_ll_at(g, g->t_f32, hbuf,
				     LLVMBuildNSWMul(b, ri, moe_ll_i64c(g, ge->ld_h), ""));
		y_ptr[r] = down_y_cols(g, f, ri, c0);
		snprintf(nm, sizeof nm, "acc%d0", r);
		acc[r] = moe_ll_alloca(g, g->t_v16f, 1, nm);
		moe_ll_st(g, f->store ? LLVMConstNull(g->t_v16f) : vload16(g, y_ptr[r], ncols),
			  acc[r]);
	}
	LLVMValueRef pan =
	    moe_ll_at(g, g->t_i16, moe_ll_prm(g, 4),
		      LLVMBuildNSWMul(b, p, moe_ll_i64c(g, (int64_t)K * MOE_NR), ""));
	pair_tile(g, mr, a_row, pan, K / 2, acc,
		  panel_prefetch(g, f, p, moe_ll_prm(g, 8), pan, (int64_t)K * MOE_NR * 2));
	for (int r = 0; r < mr; r++) {
		down_store16(g, f, r0, r, c0, moe_ll_ld(g, g->t_v16f, acc[r]), y_ptr[r], ncols);
	}
}

/* Kept-quantized experts ------------------------------------------------- */

/* Rows per quantized tile: 4 rows x 4 chains of 16-lane accumulators (plus
 * the rows' sums and the codes) fit the 32 zmm registers. */
#define Q_MR 4

/* Chains per row of a quantized K loop: inputs k = c mod chains go to chain
 * c. The same for every tile height, so a row's arithmetic never depends on
 * the tile it falls in. */
static int q_chains(const struct moe_qfmt *f)
{
	return f->group % 4 == 0 ? 4 : f->group % 2 == 0 ? 2 : 1;
}

/* Sum of the n floats at p (n <= 16 per load, the rest masked), in a fixed
 * order: 16-lane partial sums, then halves added down to one lane. */
static LLVMValueRef q_rowsum(struct moe_ll *g, LLVMValueRef p, uint32_t n)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef v = LLVMConstNull(g->t_v16f);
	for (uint32_t i = 0; i < n; i += 2 * MOE_VW)
		v = LLVMBuildFAdd(b, v,
				  vload16(g, moe_ll_at(g, g->t_f32, p, moe_ll_i64c(g, i)),
					  (int)(n - i < 2 * MOE_VW ? n - i : 2 * MOE_VW)),
				  "");
	for (int w = MOE_VW; w >= 1; w /= 2) {
		LLVMValueRef lo[MOE_VW], hi[MOE_VW];
		for (int i = 0; i < w; i++)
			lo[i] = moe_ll_i32c(g, i), hi[i] = moe_ll_i32c(g, w + i);
		LLVMValueRef pz = LLVMGetPoison(LLVMTypeOf(v));
		v = LLVMBuildFAdd(b, LLVMBuildShuffleVector(b, v, pz, LLVMConstVector(lo, w), ""),
				  LLVMBuildShuffleVector(b, v, pz, LLVMConstVector(hi, w), ""), "");
	}
	return LLVMBuildExtractElement(b, v, moe_ll_i32c(g, 0), "xsum");
}

/* A splat <16 x float> constant. */
static LLVMValueRef moe_ll_vf16c(struct moe_ll *g, double v)
{
	return moe_ll_splat(g, moe_ll_f32c(g, v), g->t_v16f);
}

static LLVMValueRef vi16c(struct moe_ll *g, uint32_t v)
{
	return moe_ll_splat(g, moe_ll_i32c(g, (int32_t)v), LLVMVectorType(g->t_i32, 2 * MOE_VW));
}

/* int4: the low (h = 0) or high nibble of each zero-extended byte, as f32. */
static LLVMValueRef q_int4(struct moe_ll *g, LLVMValueRef ci, int h)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef v =
	    h ? LLVMBuildLShr(b, ci, vi16c(g, 4), "") : LLVMBuildAnd(b, ci, vi16c(g, 15), "");
	return LLVMBuildUIToFP(b, v, g->t_v16f, "q");
}

/* E2M1 (s e1 e0 m) to f32 times 2^-126, exactly: the sign to bit 31, e and m
 * to the exponent's two low bits and the mantissa's top bit — a normal f32
 * 2^(e - 127)(1 + m/2) for e > 0, the subnormal m 2^-127 for e = 0, each
 * 2^-126 of the E2M1 value. h: the byte's low or high nibble. */
static LLVMValueRef q_e2m1(struct moe_ll *g, LLVMValueRef ci, int h)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef v = LLVMBuildShl(b, ci, vi16c(g, h ? 24 : 28), "");
	v = LLVMBuildAShr(b, v, vi16c(g, 6), "");
	v = LLVMBuildAnd(b, v, vi16c(g, 0x81C00000u), "");
	return LLVMBuildBitCast(b, v, g->t_v16f, "e2m1");
}

/* e4m3 (sign-extended bytes) to f32 times 2^-120, exactly, the same way: the
 * exponent's four low bits and the mantissa's three top bits, the sign from
 * the extension. */
static LLVMValueRef q_e4m3(struct moe_ll *g, LLVMValueRef ci)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef v = LLVMBuildShl(b, ci, vi16c(g, 20), "");
	v = LLVMBuildAnd(b, v, vi16c(g, 0x87F00000u), "");
	return LLVMBuildBitCast(b, v, g->t_v16f, "e4m3");
}

/* The codes of inputs kk .. kk + n - 1 of a group (codes: its first code
 * byte; n = nch, even for the nibble formats) as <16 x float> w[0..n): the
 * code's value (fp8, E2M1: times 2^-120, 2^-126). */
static void q_unpack(struct moe_ll *g, const struct moe_qfmt *f, LLVMValueRef codes,
		     LLVMValueRef kk, int n, LLVMValueRef *w)
{
	LLVMBuilderRef b = g->b;
	int i4 = f->kind == MOE_QFORMAT_INT4, nib = moe_qnibbles(f);
	LLVMTypeRef t16 = g->t_v16f, vi8 = LLVMVectorType(g->t_i8, 2 * MOE_VW),
		    vi32 = LLVMVectorType(g->t_i32, 2 * MOE_VW);
	if (nib) {
		/* 16 bytes per input pair: the even input in the low nibbles */
		for (int c = 0; c < n; c += 2) {
			LLVMValueRef at =
			    LLVMBuildNSWMul(b, LLVMBuildNSWAdd(b, kk, moe_ll_i64c(g, c), ""),
					    moe_ll_i64c(g, 8), "");
			LLVMValueRef ci = LLVMBuildZExt(
			    b, moe_ll_ld(g, vi8, moe_ll_at(g, g->t_i8, codes, at)), vi32, "");
			for (int h = 0; h < 2; h++)
				w[c + h] = i4 ? q_int4(g, ci, h) : q_e2m1(g, ci, h);
		}
		return;
	}
	for (int c = 0; c < n; c++) {
		LLVMValueRef at = LLVMBuildNSWMul(b, LLVMBuildNSWAdd(b, kk, moe_ll_i64c(g, c), ""),
						  moe_ll_i64c(g, MOE_NR), "");
		LLVMValueRef ci =
		    LLVMBuildSExt(b, moe_ll_ld(g, vi8, moe_ll_at(g, g->t_i8, codes, at)), vi32, "");
		w[c] =
		    f->kind == MOE_QFORMAT_FP8 ? q_e4m3(g, ci) : LLVMBuildSIToFP(b, ci, t16, "q");
	}
}

/* The end of a group for one row: acc += (the row's chains accg[0..nch)
 * summed, (0 + 1) + (2 + 3)) * scale, then for int4 + (the row's sum of x
 * over the group, from a_row + k0) * offset; blk: the group's block. */
static void q_group_end(struct moe_ll *g, const struct moe_qfmt *f, int nch,
			const LLVMValueRef *accg, LLVMValueRef blk, LLVMValueRef a_row,
			LLVMValueRef k0, LLVMValueRef acc)
{
	LLVMBuilderRef b = g->b;
	LLVMTypeRef t16 = g->t_v16f;
	int i4 = f->kind == MOE_QFORMAT_INT4;
	LLVMValueRef sc = moe_ll_ld(g, t16, blk), of = NULL;
	if (i4)
		of = moe_ll_ld(g, t16, moe_ll_at(g, g->t_i8, blk, moe_ll_i64c(g, 64)));
	LLVMValueRef sum = moe_ll_ld(g, t16, accg[0]);
	if (nch == 4)
		sum = LLVMBuildFAdd(
		    b, LLVMBuildFAdd(b, sum, moe_ll_ld(g, t16, accg[1]), ""),
		    LLVMBuildFAdd(b, moe_ll_ld(g, t16, accg[2]), moe_ll_ld(g, t16, accg[3]), ""),
		    "");
	else if (nch == 2)
		sum = LLVMBuildFAdd(b, sum, moe_ll_ld(g, t16, accg[1]), "");
	if (f->kind == MOE_QFORMAT_FP8 || f->kind == MOE_QFORMAT_MXFP4)
		sum = LLVMBuildFMul(/* the codes' values were 2^-120 / 2^-126 of theirs */
				    b, sum,
				    moe_ll_vf16c(g, f->kind == MOE_QFORMAT_FP8 ? 0x1p120 : 0x1p126),
				    "");
	LLVMValueRef o = moe_ll_fma(g, sum, sc, moe_ll_ld(g, t16, acc));
	if (i4) {
		LLVMValueRef xs = q_rowsum(g, moe_ll_at(g, g->t_f32, a_row, k0), f->group);
		o = moe_ll_fma(g, moe_ll_splat(g, xs, t16), of, o);
	}
	moe_ll_st(g, o, acc);
}

/* acc[r] += the mr rows a_row[r] (K f32 inputs) times a quantized panel pan
 * (moe_kernels.h): per group, q_chains chains per row sum code * x, then acc
 * += (the chains' sum) * scale and, for int4, + (the group's sum of x) *
 * offset: W = code * s + o summed by parts. */
static void q_kloop(struct moe_ll *g, const struct moe_qfmt *f, uint32_t K, int mr,
		    const LLVMValueRef *a_row, LLVMValueRef pan, const LLVMValueRef *acc,
		    struct pf pf)
{
	LLVMBuilderRef b = g->b;
	int i4 = f->kind == MOE_QFORMAT_INT4, nib = moe_qnibbles(f), nch = q_chains(f);
	LLVMTypeRef t16 = g->t_v16f;
	LLVMValueRef accg[MAX_MR][4];
	char nm[32];
	for (int r = 0; r < mr; r++)
		for (int c = 0; c < nch; c++) {
			snprintf(nm, sizeof nm, "qacc%d%d", r, c);
			accg[r][c] = moe_ll_alloca(g, t16, 1, nm);
		}
	int64_t bb = (int64_t)moe_qblock_bytes(f);
	struct moe_ll_loop gl, kl;
	moe_ll_loop_open(g, &gl, moe_ll_i64c(g, 0), moe_ll_i64c(g, K / f->group), 1, "grp");
	LLVMValueRef boff = LLVMBuildNSWMul(b, gl.iv, moe_ll_i64c(g, bb), "blk.off");
	LLVMValueRef blk = moe_ll_at(g, g->t_i8, pan, boff);
	quant_block_prefetch(g, pf, boff, i4 ? 128 : 64);
	LLVMValueRef k0 = LLVMBuildNSWMul(b, gl.iv, moe_ll_i64c(g, f->group), "k0");
	for (int r = 0; r < mr; r++)
		for (int c = 0; c < nch; c++)
			moe_ll_st(g, LLVMConstNull(t16), accg[r][c]);
	LLVMValueRef codes = moe_ll_at(g, g->t_i8, blk, moe_ll_i64c(g, i4 ? 128 : 64));
	moe_ll_loop_open(g, &kl, moe_ll_i64c(g, 0), moe_ll_i64c(g, f->group), nch, "kq");
	quant_code_prefetch(g, pf, boff, i4 ? 128 : 64,
			    LLVMBuildNSWMul(b, kl.iv, moe_ll_i64c(g, nib ? 8 : 16), ""));
	LLVMValueRef w[4];
	q_unpack(g, f, codes, kl.iv, nch, w);
	LLVMValueRef k = LLVMBuildNSWAdd(b, k0, kl.iv, "k");
	for (int r = 0; r < mr; r++)
		for (int c = 0; c < nch; c++) {
			LLVMValueRef a = moe_ll_ld(
			    g, g->t_f32,
			    moe_ll_at(g, g->t_f32, a_row[r],
				      c ? LLVMBuildNSWAdd(b, k, moe_ll_i64c(g, c), "") : k));
			moe_ll_st(g,
				  moe_ll_fma(g, moe_ll_splat(g, a, t16), w[c],
					     moe_ll_ld(g, t16, accg[r][c])),
				  accg[r][c]);
		}
	moe_ll_loop_close(g, &kl);
	for (int r = 0; r < mr; r++)
		q_group_end(g, f, nch, accg[r], blk, a_row[r], k0, acc[r]);
	moe_ll_loop_close(g, &gl);
}

/* Rows per quantized tile on 256-bit targets, which unpack each group once
 * per tile (q_kloop_unpacked). */
#define QS_MR 8
/* The largest group unpacked whole: 256 inputs, 16 KiB of f32 codes. */
#define QS_MAX_GROUP 256

/* Whether the quantized tiles of format f unpack each group's codes once
 * for their rows (q_kloop_unpacked): on 256-bit targets, where the 4-row
 * tile's 16 chains of 16 lanes need 32 registers of the 16 there are. */
static int q_unpacks(const struct moe_ll *g, const struct moe_qfmt *f)
{
	return !g->wide && f->group <= QS_MAX_GROUP;
}

static int q_mr(const struct moe_ll *g, const struct moe_qfmt *f)
{
	return q_unpacks(g, f) ? QS_MR : Q_MR;
}

/* q_kloop for 2 or more rows on 256-bit targets: per group, the codes are
 * unpacked once into f32 values on the stack (the values q_kloop computes
 * in registers), then each row in turn runs the group's chains over them and
 * q_group_end: every row's arithmetic is q_kloop's, operation for operation,
 * so the bits are the same whatever the tile. The next panel (next, when
 * on) is prefetched block by block as the codes are unpacked. */
static void q_kloop_unpacked(struct moe_ll *g, const struct moe_qfmt *f, uint32_t K, int mr,
			     const LLVMValueRef *a_row, LLVMValueRef pan, const LLVMValueRef *acc,
			     LLVMValueRef next, LLVMValueRef on)
{
	LLVMBuilderRef b = g->b;
	int i4 = f->kind == MOE_QFORMAT_INT4, nib = moe_qnibbles(f), nch = q_chains(f);
	int64_t hdr = i4 ? 128 : 64, bb = (int64_t)moe_qblock_bytes(f), G = f->group;
	LLVMTypeRef t16 = g->t_v16f;
	LLVMValueRef cs = moe_ll_alloca(g, t16, (uint64_t)G, "qcodes"), accg[4];
	char nm[32];
	for (int c = 0; c < nch; c++) {
		snprintf(nm, sizeof nm, "qch%d", c);
		accg[c] = moe_ll_alloca(g, t16, 1, nm);
	}
	struct moe_ll_loop gl, ku, kl;
	moe_ll_loop_open(g, &gl, moe_ll_i64c(g, 0), moe_ll_i64c(g, K / f->group), 1, "grp");
	LLVMValueRef boff = LLVMBuildNSWMul(b, gl.iv, moe_ll_i64c(g, bb), "blk.off");
	LLVMValueRef blk = moe_ll_at(g, g->t_i8, pan, boff);
	LLVMValueRef k0 = LLVMBuildNSWMul(b, gl.iv, moe_ll_i64c(g, G), "k0");
	LLVMValueRef codes = moe_ll_at(g, g->t_i8, blk, moe_ll_i64c(g, hdr));
	/* the same block of the next panel, its own byte offsets (sh 0) */
	struct pf pf = {next, moe_ll_i64c(g, 0), on};
	quant_block_prefetch(g, pf, boff, hdr);
	moe_ll_loop_open(g, &ku, moe_ll_i64c(g, 0), moe_ll_i64c(g, G), nch, "qu");
	quant_code_prefetch(g, pf, boff, hdr,
			    LLVMBuildNSWMul(b, ku.iv, moe_ll_i64c(g, nib ? 8 : 16), ""));
	LLVMValueRef w[4];
	q_unpack(g, f, codes, ku.iv, nch, w);
	for (int c = 0; c < nch; c++)
		moe_ll_st(g, w[c],
			  moe_ll_at(g, t16, cs,
				    c ? LLVMBuildNSWAdd(b, ku.iv, moe_ll_i64c(g, c), "") : ku.iv));
	moe_ll_loop_close(g, &ku);
	for (int r = 0; r < mr; r++) {
		for (int c = 0; c < nch; c++)
			moe_ll_st(g, LLVMConstNull(t16), accg[c]);
		moe_ll_loop_open(g, &kl, moe_ll_i64c(g, 0), moe_ll_i64c(g, G), nch, "kq");
		LLVMValueRef k = LLVMBuildNSWAdd(b, k0, kl.iv, "k");
		for (int c = 0; c < nch; c++) {
			LLVMValueRef a = moe_ll_ld(
			    g, g->t_f32,
			    moe_ll_at(g, g->t_f32, a_row[r],
				      c ? LLVMBuildNSWAdd(b, k, moe_ll_i64c(g, c), "") : k));
			LLVMValueRef wc =
			    moe_ll_ld(g, t16,
				      moe_ll_at(g, t16, cs,
						c ? LLVMBuildNSWAdd(b, kl.iv, moe_ll_i64c(g, c), "")
						  : kl.iv));
			moe_ll_st(
			    g,
			    moe_ll_fma(g, moe_ll_splat(g, a, t16), wc, moe_ll_ld(g, t16, accg[c])),
			    accg[c]);
		}
		moe_ll_loop_close(g, &kl);
		q_group_end(g, f, nch, accg, blk, a_row[r], k0, acc[r]);
	}
	moe_ll_loop_close(g, &gl);
}

/* The K loop of a quantized tile: q_kloop_unpacked where the target unpacks
 * (q_unpacks) and the tile has 2 rows or more, else q_kloop. p1: the call's
 * panel end; pb: the panel's bytes. */
static void q_tile_kloop(struct moe_ll *g, const struct ffn *f, const struct moe_qfmt *q,
			 uint32_t K, int mr, const LLVMValueRef *a_row, LLVMValueRef pan,
			 const LLVMValueRef *acc, LLVMValueRef p, LLVMValueRef p1, int64_t pb)
{
	if (q_unpacks(g, q) && mr >= 2) {
		LLVMValueRef on =
		    LLVMBuildICmp(g->b, LLVMIntSLT, LLVMBuildNSWAdd(g->b, p, moe_ll_i64c(g, 1), ""),
				  p1, "qpf.on");
		q_kloop_unpacked(g, q, K, mr, a_row, pan, acc,
				 moe_ll_at(g, g->t_i8, pan, moe_ll_i64c(g, pb)), on);
		return;
	}
	q_kloop(g, q, K, mr, a_row, pan, acc, panel_prefetch(g, f, p, p1, pan, pb));
}

/* One quantized up tile of mr rows at row r0 and panel p. */
static void up_tile_q(struct moe_ll *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
		      LLVMValueRef p)
{
	(void)ncols;
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	LLVMValueRef x = moe_ll_prm(g, 0), rows = moe_ll_prm(g, 1);
	LLVMValueRef a_row[MAX_MR] = {0}, acc[MAX_MR][2] = {{0}};
	char nm[32];
	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		LLVMValueRef tok = moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i32, rows, ri));
		tok = LLVMBuildSExt(b, tok, g->t_i64, "");
		a_row[r] = moe_ll_at(g, g->t_f32, x,
				     LLVMBuildNSWMul(b, tok, moe_ll_i64c(g, ge->hidden), ""));
		snprintf(nm, sizeof nm, "acc%d", r);
		acc[r][0] = moe_ll_alloca(g, g->t_v16f, 1, nm);
		moe_ll_st(g, LLVMConstNull(g->t_v16f), acc[r][0]);
	}
	LLVMValueRef accs[MAX_MR] = {0};
	for (int r = 0; r < mr; r++)
		accs[r] = acc[r][0];
	int64_t pb = (int64_t)(ge->up_bytes / ge->up_panels);
	LLVMValueRef pan = moe_ll_at(g, g->t_i8, moe_ll_prm(g, 4),
				     LLVMBuildNSWMul(b, p, moe_ll_i64c(g, pb), "panel.off"));
	q_tile_kloop(g, f, &ge->q_up, ge->hidden, mr, a_row, pan, accs, p, moe_ll_prm(g, 9), pb);
	for (int r = 0; r < mr; r++)
		up_store(g, f, LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), ""), p, acc[r], 1);
}

/* One quantized down tile: mr rows of h from r0 times panel p, accumulated
 * into y (ncols < 16: the last panel, masked). */
static void down_tile_q(struct moe_ll *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
			LLVMValueRef p)
{
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	LLVMValueRef hbuf = moe_ll_prm(g, 0);
	LLVMValueRef a_row[MAX_MR] = {0}, y_ptr[MAX_MR] = {0}, acc[MAX_MR] = {0};
	LLVMValueRef c0 = LLVMBuildNSWMul(b, p, moe_ll_i64c(g, MOE_NR), "col");
	char nm[32];
	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		a_row[r] = moe_ll_at(g, g->t_f32, hbuf,
				     LLVMBuildNSWMul(b, ri, moe_ll_i64c(g, ge->ld_h), ""));
		y_ptr[r] = down_y_cols(g, f, ri, c0);
		snprintf(nm, sizeof nm, "acc%d", r);
		acc[r] = moe_ll_alloca(g, g->t_v16f, 1, nm);
		moe_ll_st(g, f->store ? LLVMConstNull(g->t_v16f) : vload16(g, y_ptr[r], ncols),
			  acc[r]);
	}
	int64_t pb = (int64_t)(ge->down_bytes / ge->down_panels);
	LLVMValueRef pan = moe_ll_at(g, g->t_i8, moe_ll_prm(g, 4),
				     LLVMBuildNSWMul(b, p, moe_ll_i64c(g, pb), "panel.off"));
	q_tile_kloop(g, f, &ge->q_down, ge->width, mr, a_row, pan, acc, p, moe_ll_prm(g, 8), pb);
	for (int r = 0; r < mr; r++) {
		down_store16(g, f, r0, r, c0, moe_ll_ld(g, g->t_v16f, acc[r]), y_ptr[r], ncols);
	}
}

/* int8 compute ------------------------------------------------------------ */

/* Rows per int8 tile: one int32 chain per row over the runs of a group,
 * and its f32 sum over the groups. */
#define I8_MR 8 /* 4 with 256-bit vectors (i8_mr) */
/* The quantized rows one call keeps at a time (as for bf16 compute). */
#define I8_CHUNK_BYTES (512 * 1024)
#define I8_CHUNK_ROWS 96

static LLVMTypeRef t_v16i(struct moe_ll *g)
{
	return LLVMVectorType(g->t_i32, 2 * MOE_VW);
}

/* int8 tiles keep 16 columns per row as <16 x ...> values: one register on
 * AVX-512 targets, two 256-bit ones elsewhere (AVX-VNNI, or AVX-512 VNNI
 * limited to 256-bit vectors), where a tile holds 4 rows instead of 8. */
static int i8_mr(const struct moe_ll *g)
{
	return g->wide ? I8_MR : I8_MR / 2;
}

/* Quantize the K f32 values at src (K a multiple of the group, the group of
 * 16): s = max |x| / 127 to *sx, the codes q = x * (127 / max |x|) rounded
 * to nearest even (all 0 when max |x| is 0) to dst, and each group's sum of
 * codes to qsum. The row alone decides them: the result of a row never
 * depends on the rows beside it. */
static void quant_row(struct moe_ll *g, LLVMValueRef src, uint32_t K, uint32_t group,
		      LLVMValueRef dst, LLVMValueRef sx, LLVMValueRef qsum)
{
	LLVMBuilderRef b = g->b;
	LLVMTypeRef t16 = g->t_v16f, ti = t_v16i(g);
	LLVMValueRef m = moe_ll_alloca(g, t16, 1, "amax");
	moe_ll_st(g, LLVMConstNull(t16), m);
	struct moe_ll_loop i, gl, j;
	moe_ll_loop_open(g, &i, moe_ll_i64c(g, 0), moe_ll_i64c(g, K / 16), 1, "qa");
	LLVMValueRef v = moe_ll_ld(
	    g, t16, moe_ll_at(g, g->t_f32, src, LLVMBuildNSWMul(b, i.iv, moe_ll_i64c(g, 16), "")));
	/* a compare and select (vmaxps), not maxnum's NaN-aware sequence: the
	 * inputs are finite, or the row's output is non-finite anyway */
	moe_ll_st(g, moe_ll_fmax(g, moe_ll_ld(g, t16, m), moe_ll_intr1(g, "llvm.fabs", v)), m);
	moe_ll_loop_close(g, &i);
	LLVMValueRef amax = moe_ll_ld(g, t16, m);
	amax = moe_ll_intr(g, "llvm.vector.reduce.fmax", &t16, 1, &amax, 1);
	LLVMValueRef pos = LLVMBuildFCmp(b, LLVMRealOGT, amax, moe_ll_f32c(g, 0.0), "");
	LLVMValueRef inv = LLVMBuildSelect(
	    b, pos, LLVMBuildFDiv(b, moe_ll_f32c(g, 127.0), amax, ""), moe_ll_f32c(g, 0.0), "inv");
	moe_ll_st(g, LLVMBuildFDiv(b, amax, moe_ll_f32c(g, 127.0), "sx"), sx);
	LLVMValueRef vinv = moe_ll_splat(g, inv, t16);
	LLVMValueRef vs = moe_ll_alloca(g, ti, 1, "qs");
	moe_ll_loop_open(g, &gl, moe_ll_i64c(g, 0), moe_ll_i64c(g, K / group), 1, "qg");
	moe_ll_st(g, LLVMConstNull(ti), vs);
	moe_ll_loop_open(g, &j, moe_ll_i64c(g, 0), moe_ll_i64c(g, group / 16), 1, "qj");
	LLVMValueRef off = LLVMBuildNSWAdd(b, LLVMBuildNSWMul(b, gl.iv, moe_ll_i64c(g, group), ""),
					   LLVMBuildNSWMul(b, j.iv, moe_ll_i64c(g, 16), ""), "");
	LLVMValueRef x = moe_ll_ld(g, t16, moe_ll_at(g, g->t_f32, src, off));
	/* vcvtps2dq, with its rounding in the instruction on 512-bit vectors
	 * (to nearest even, whatever MXCSR says): defined for every input — a
	 * row that overflowed to inf or NaN gives the byte 0 and a non-finite
	 * scale, so its output is non-finite and the runtime reports the
	 * overflow (int8 compute is generated for x86 targets only) */
	LLVMValueRef xs = LLVMBuildFMul(b, x, vinv, ""), q;
	if (g->wide) {
		LLVMValueRef cargs[4] = {xs, LLVMConstNull(ti), LLVMConstInt(g->t_i16, 0xffff, 0),
					 moe_ll_i32c(g, 8)};
		q = moe_ll_intr(g, "llvm.x86.avx512.mask.cvtps2dq.512", NULL, 0, cargs, 4);
	} else {
		/* 256-bit vcvtps2dq rounds as MXCSR says: to nearest even
		 * unless the caller changed it */
		LLVMValueRef h[2];
		for (int i = 0; i < 2; i++) {
			LLVMValueRef a = half16(g, xs, i);
			h[i] = moe_ll_intr(g, "llvm.x86.avx.cvt.ps2dq.256", NULL, 0, &a, 1);
		}
		q = join8(g, h[0], h[1]);
	}
	moe_ll_st(g, LLVMBuildTrunc(b, q, LLVMVectorType(g->t_i8, 16), ""),
		  moe_ll_at(g, g->t_i8, dst, off));
	moe_ll_st(g, LLVMBuildAdd(b, moe_ll_ld(g, ti, vs), q, ""), vs);
	moe_ll_loop_close(g, &j);
	LLVMValueRef sum = moe_ll_ld(g, ti, vs);
	sum = moe_ll_intr(g, "llvm.vector.reduce.add", &ti, 1, &sum, 1);
	moe_ll_st(g, sum, moe_ll_at(g, g->t_i32, qsum, gl.iv));
	moe_ll_loop_close(g, &gl);
}

/* acc + the 16 columns of 4 unsigned codes in w times the 4 signed codes in
 * a (broadcast), summed per column in int32: vpdpbusd. */
static LLVMValueRef dpbusd(struct moe_ll *g, LLVMValueRef acc, LLVMValueRef w, LLVMValueRef a)
{
	LLVMValueRef a16 = moe_ll_splat(g, a, t_v16i(g));
	if (g->wide) {
		LLVMValueRef args[3] = {acc, w, a16};
		return moe_ll_intr(g, "llvm.x86.avx512.vpdpbusd.512", NULL, 0, args, 3);
	}
	/* two 256-bit vpdpbusd: VEX (AVX-VNNI) or EVEX (AVX-512 VNNI and VL) */
	LLVMValueRef h[2];
	for (int i = 0; i < 2; i++) {
		LLVMValueRef args[3] = {half16(g, acc, i), half16(g, w, i), half16(g, a16, i)};
		h[i] = moe_ll_intr(g, "llvm.x86.avx512.vpdpbusd.256", NULL, 0, args, 3);
	}
	return join8(g, h[0], h[1]);
}

/* <8 x i32> v as the <32 x i8> or <16 x i16> the AVX2 multiply-adds take. */
static LLVMValueRef as_vec(struct moe_ll *g, LLVMValueRef v, LLVMTypeRef el, unsigned n)
{
	return LLVMBuildBitCast(g->b, v, LLVMVectorType(el, n), "");
}

static LLVMValueRef madd_ubsw(struct moe_ll *g, LLVMValueRef u8, LLVMValueRef s8)
{
	LLVMValueRef args[2] = {as_vec(g, u8, g->t_i8, 32), as_vec(g, s8, g->t_i8, 32)};
	return moe_ll_intr(g, "llvm.x86.avx2.pmadd.ub.sw", NULL, 0, args, 2);
}

/* the 8 sums of adjacent int16 pairs of t, each pair times (m, m) */
static LLVMValueRef madd_wd(struct moe_ll *g, LLVMValueRef t, int m)
{
	LLVMValueRef ms =
	    moe_ll_splat(g, LLVMConstInt(g->t_i16, (uint64_t)m, 0), LLVMVectorType(g->t_i16, 16));
	LLVMValueRef args[2] = {t, ms};
	return moe_ll_intr(g, "llvm.x86.avx2.pmadd.wd", NULL, 0, args, 2);
}

/* vpdpbusd on AVX2 (no VNNI), exactly: acc + for each of the 16 columns the
 * sum over a run of the unsigned codes in w times the signed activation
 * codes (|a| <= 127) broadcast from a[0] (and a[1]: an int4 run's second
 * half of 4 inputs, whose codes are in w[1]). vpmaddubsw sums two products
 * in int16 with saturation: int4 codes (<= 15) need none, so both halves of
 * an int4 run add in int16 (|sum| <= 4 * 15 * 127 = 7620) before one
 * vpmaddwd widens the pairs; int8 codes (stored plus 128, <= 255) are split
 * as 2 (u >> 1) + (u & 1), whose products stay under 2 * 127 * 127, and
 * widened by vpmaddwd with factors 2 and 1. */
static LLVMValueRef dot4_avx2(struct moe_ll *g, LLVMValueRef acc, const LLVMValueRef *w,
			      const LLVMValueRef *a, int i4)
{
	LLVMBuilderRef b = g->b;
	LLVMTypeRef v8i = g->t_v8i32;
	LLVMValueRef h[2], as[2];
	for (int j = 0; j < 1 + i4; j++)
		as[j] = moe_ll_splat(g, a[j], v8i);
	for (int i = 0; i < 2; i++) {
		LLVMValueRef d;
		if (i4) {
			LLVMValueRef t = LLVMBuildAdd(b, madd_ubsw(g, half16(g, w[0], i), as[0]),
						      madd_ubsw(g, half16(g, w[1], i), as[1]), "");
			d = madd_wd(g, t, 1);
		} else {
			LLVMValueRef u = half16(g, w[0], i);
			LLVMValueRef hi = LLVMBuildAnd(
			    b, LLVMBuildLShr(b, u, moe_ll_splat(g, moe_ll_i32c(g, 1), v8i), ""),
			    moe_ll_splat(g, moe_ll_i32c(g, 0x7f7f7f7f), v8i), "u.hi");
			LLVMValueRef lo = LLVMBuildAnd(
			    b, u, moe_ll_splat(g, moe_ll_i32c(g, 0x01010101), v8i), "u.lo");
			d = LLVMBuildAdd(b, madd_wd(g, madd_ubsw(g, hi, as[0]), 2),
					 madd_wd(g, madd_ubsw(g, lo, as[0]), 1), "");
		}
		h[i] = LLVMBuildAdd(b, half16(g, acc, i), d, "");
	}
	return join8(g, h[0], h[1]);
}

/* A quantized row's 4 activation codes at input k (h = 1: k + 4, an int4
 * run's second half) as one int32. */
static LLVMValueRef run_codes(struct moe_ll *g, LLVMValueRef xq, LLVMValueRef k, int h)
{
	LLVMValueRef kk = h ? LLVMBuildNSWAdd(g->b, k, moe_ll_i64c(g, 4), "") : k;
	return moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i8, xq, kk));
}

/* acc[r] += the mr quantized rows (xq[r]: K int8 codes, qs[r]: their sums
 * per group) times the dot4 panel pan (moe_kernels.h), in units of each
 * row's scale: per group the exact int32 sums P of code * q over its runs,
 * then acc += s * (P - 128 Q) for int8 (its codes are stored plus 128) and
 * acc += o * Q + s * P for int4 (W = code * s + o). */
static void dot4_kloop(struct moe_ll *g, const struct moe_qfmt *f, uint32_t K, int mr,
		       const LLVMValueRef *xq, const LLVMValueRef *qs, LLVMValueRef pan,
		       const LLVMValueRef *acc, struct pf pf)
{
	LLVMBuilderRef b = g->b;
	int i4 = f->kind == MOE_QFORMAT_INT4, run = i4 ? 8 : 4, halves = 1 + i4;
	LLVMTypeRef t16 = g->t_v16f, ti = t_v16i(g);
	/* Runs per step, each (and each int4 half) on its own chain, so a short
	 * tile still keeps about 8 sums in flight; the int32 sums are exact,
	 * so how they are split changes no bit. */
	uint32_t runs = f->group / (uint32_t)run, ru = 1;
	int fly = g->wide ? 8 : 4; /* 256-bit: each sum takes two registers */
	/* chains per run: on AVX2 an int4 run's halves share one (dot4_avx2) */
	int emu = g->dot8 == 2, cpr = emu ? 1 : halves;
	while (ru < 8 && (int)(2 * ru) * mr * cpr <= fly && runs % (2 * ru) == 0)
		ru *= 2;
	int nch = (int)ru * cpr;
	LLVMValueRef accg[I8_MR][16];
	char nm[32];
	for (int r = 0; r < mr; r++)
		for (int c = 0; c < nch; c++) {
			snprintf(nm, sizeof nm, "iacc%d%d", r, c);
			accg[r][c] = moe_ll_alloca(g, ti, 1, nm);
		}
	int64_t bb = (int64_t)moe_qblock_bytes(f);
	struct moe_ll_loop gl, kl;
	moe_ll_loop_open(g, &gl, moe_ll_i64c(g, 0), moe_ll_i64c(g, K / f->group), 1, "grp");
	LLVMValueRef boff = LLVMBuildNSWMul(b, gl.iv, moe_ll_i64c(g, bb), "blk.off");
	LLVMValueRef blk = moe_ll_at(g, g->t_i8, pan, boff);
	quant_block_prefetch(g, pf, boff, i4 ? 128 : 64);
	LLVMValueRef k0 = LLVMBuildNSWMul(b, gl.iv, moe_ll_i64c(g, f->group), "k0");
	for (int r = 0; r < mr; r++)
		for (int c = 0; c < nch; c++)
			moe_ll_st(g, LLVMConstNull(ti), accg[r][c]);
	LLVMValueRef codes = moe_ll_at(g, g->t_i8, blk, moe_ll_i64c(g, i4 ? 128 : 64));
	moe_ll_loop_open(g, &kl, moe_ll_i64c(g, 0), moe_ll_i64c(g, runs), ru, "kr");
	LLVMValueRef lo = moe_ll_splat(g, moe_ll_i32c(g, 0x0f0f0f0f), ti);
	for (uint32_t u = 0; u < ru; u++) {
		LLVMValueRef kr = LLVMBuildNSWAdd(b, kl.iv, moe_ll_i64c(g, u), "");
		LLVMValueRef coff = LLVMBuildNSWMul(b, kr, moe_ll_i64c(g, 64), "");
		LLVMValueRef w = moe_ll_ld(g, ti, moe_ll_at(g, g->t_i8, codes, coff));
		quant_code_prefetch(g, pf, boff, i4 ? 128 : 64, coff);
		LLVMValueRef ws[2] = {w, NULL};
		if (i4) {
			ws[0] = LLVMBuildAnd(b, w, lo, "lo");
			ws[1] = LLVMBuildAnd(b, LLVMBuildLShr(b, w, vi16c(g, 4), ""), lo, "hi");
		}
		LLVMValueRef k =
		    LLVMBuildNSWAdd(b, k0, LLVMBuildNSWMul(b, kr, moe_ll_i64c(g, run), ""), "k");
		for (int r = 0; emu && r < mr; r++) {
			LLVMValueRef a[2];
			for (int h = 0; h < halves; h++)
				a[h] = run_codes(g, xq[r], k, h);
			LLVMValueRef *c = &accg[r][u];
			moe_ll_st(g, dot4_avx2(g, moe_ll_ld(g, ti, *c), ws, a, i4), *c);
		}
		for (int h = 0; !emu && h < halves; h++)
			for (int r = 0; r < mr; r++) {
				LLVMValueRef a = run_codes(g, xq[r], k, h);
				LLVMValueRef *c = &accg[r][(int)u * halves + h];
				moe_ll_st(g, dpbusd(g, moe_ll_ld(g, ti, *c), ws[h], a), *c);
			}
	}
	moe_ll_loop_close(g, &kl);
	LLVMValueRef sc = moe_ll_ld(g, t16, blk), of = NULL;
	if (i4)
		of = moe_ll_ld(g, t16, moe_ll_at(g, g->t_i8, blk, moe_ll_i64c(g, 64)));
	for (int r = 0; r < mr; r++) {
		LLVMValueRef P = moe_ll_ld(g, ti, accg[r][0]);
		for (int c = 1; c < nch; c++)
			P = LLVMBuildAdd(b, P, moe_ll_ld(g, ti, accg[r][c]), "");
		LLVMValueRef Q = moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i32, qs[r], gl.iv));
		LLVMValueRef o = moe_ll_ld(g, t16, acc[r]);
		if (i4) {
			o = moe_ll_fma(g, moe_ll_splat(g, LLVMBuildSIToFP(b, Q, g->t_f32, ""), t16),
				       of, o);
		} else {
			LLVMValueRef c = LLVMBuildShl(b, Q, moe_ll_i32c(g, 7), "");
			P = LLVMBuildSub(b, P, moe_ll_splat(g, c, ti), "");
		}
		o = moe_ll_fma(g, LLVMBuildSIToFP(b, P, t16, ""), sc, o);
		moe_ll_st(g, o, acc[r]);
	}
	moe_ll_loop_close(g, &gl);
}

/* The quantized rows of chunk row ri: codes, group sums, scale. */
static void i8_row(struct moe_ll *g, const struct ffn *f, LLVMValueRef ri, LLVMValueRef *xq,
		   LLVMValueRef *qs)
{
	LLVMBuilderRef b = g->b;
	*xq = moe_ll_at(g, g->t_i8, f->xb, LLVMBuildNSWMul(b, ri, moe_ll_i64c(g, f->xs), ""));
	*qs = moe_ll_at(g, g->t_i32, f->qs, LLVMBuildNSWMul(b, ri, moe_ll_i64c(g, f->ng), ""));
}

static LLVMValueRef i8_scale(struct moe_ll *g, const struct ffn *f, LLVMValueRef ri)
{
	return moe_ll_splat(g, moe_ll_ld(g, g->t_f32, moe_ll_at(g, g->t_f32, f->sx, ri)),
			    g->t_v16f);
}

/* One int8 up tile: mr quantized rows from r0 of the chunk times panel p. */
static void up_tile_i8(struct moe_ll *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
		       LLVMValueRef p)
{
	(void)ncols;
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	LLVMValueRef xq[I8_MR] = {0}, qs[I8_MR] = {0}, acc[I8_MR] = {0};
	char nm[32];
	for (int r = 0; r < mr; r++) {
		i8_row(g, f, LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), ""), &xq[r], &qs[r]);
		snprintf(nm, sizeof nm, "acc%d", r);
		acc[r] = moe_ll_alloca(g, g->t_v16f, 1, nm);
		moe_ll_st(g, LLVMConstNull(g->t_v16f), acc[r]);
	}
	int64_t pb = (int64_t)(ge->up_bytes / ge->up_panels);
	LLVMValueRef pan = moe_ll_at(g, g->t_i8, moe_ll_prm(g, 4),
				     LLVMBuildNSWMul(b, p, moe_ll_i64c(g, pb), "panel.off"));
	dot4_kloop(g, &ge->q_up, ge->hidden, mr, xq, qs, pan, acc,
		   panel_prefetch(g, f, p, moe_ll_prm(g, 9), pan, pb));
	for (int r = 0; r < mr; r++) {
		LLVMValueRef ri = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		moe_ll_st(g,
			  LLVMBuildFMul(b, moe_ll_ld(g, g->t_v16f, acc[r]), i8_scale(g, f, ri), ""),
			  acc[r]);
		LLVMValueRef two[2] = {acc[r], NULL};
		up_store(g, f, LLVMBuildNSWAdd(b, f->c0, ri, ""), p, two, 1);
	}
}

/* One int8 down tile: mr quantized rows of h from r0 of the chunk times
 * panel p, added to y (ncols < 16: the last panel, masked). */
static void down_tile_i8(struct moe_ll *g, const struct ffn *f, int mr, int ncols, LLVMValueRef r0,
			 LLVMValueRef p)
{
	LLVMBuilderRef b = g->b;
	const struct moe_geom *ge = f->geom;
	LLVMValueRef xq[I8_MR] = {0}, qs[I8_MR] = {0}, y_ptr[I8_MR] = {0}, acc[I8_MR] = {0};
	LLVMValueRef c0 = LLVMBuildNSWMul(b, p, moe_ll_i64c(g, MOE_NR), "col");
	char nm[32];
	for (int r = 0; r < mr; r++) {
		LLVMValueRef rl = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		i8_row(g, f, rl, &xq[r], &qs[r]);
		LLVMValueRef ri = LLVMBuildNSWAdd(b, f->c0, rl, "");
		y_ptr[r] = down_y_cols(g, f, ri, c0);
		snprintf(nm, sizeof nm, "acc%d", r);
		acc[r] = moe_ll_alloca(g, g->t_v16f, 1, nm);
		moe_ll_st(g, LLVMConstNull(g->t_v16f), acc[r]);
	}
	int64_t pb = (int64_t)(ge->down_bytes / ge->down_panels);
	LLVMValueRef pan = moe_ll_at(g, g->t_i8, moe_ll_prm(g, 4),
				     LLVMBuildNSWMul(b, p, moe_ll_i64c(g, pb), "panel.off"));
	dot4_kloop(g, &ge->q_down, ge->width, mr, xq, qs, pan, acc,
		   panel_prefetch(g, f, p, moe_ll_prm(g, 8), pan, pb));
	for (int r = 0; r < mr; r++) {
		LLVMValueRef rl = LLVMBuildNSWAdd(b, r0, moe_ll_i64c(g, r), "");
		LLVMValueRef o =
		    moe_ll_fma(g, moe_ll_ld(g, g->t_v16f, acc[r]), i8_scale(g, f, rl),
			       f->store ? LLVMConstNull(g->t_v16f) : vload16(g, y_ptr[r], ncols));
		down_store16(g, f, LLVMBuildNSWAdd(b, f->c0, r0, ""), r, c0, o, y_ptr[r], ncols);
	}
}

/* The chunk buffers of an int8 call over inputs of K: codes (xb, row stride
 * xs), group sums (qs, ng per row) and scales (sx) of cr rows. */
static int64_t i8_chunk(struct moe_ll *g, struct ffn *f, uint32_t K, const struct moe_qfmt *q)
{
	f->xs = (K + 63) / 64 * 64;
	f->ng = K / q->group;
	int64_t cr = I8_CHUNK_BYTES / (int64_t)f->xs / I8_MR * I8_MR;
	cr = cr < I8_MR ? I8_MR : cr > I8_CHUNK_ROWS ? I8_CHUNK_ROWS : cr;
	f->xb = moe_ll_alloca(g, g->t_i8, (uint64_t)cr * f->xs, "xq");
	LLVMSetAlignment(f->xb, 64);
	f->qs = moe_ll_alloca(g, g->t_i32, (uint64_t)cr * f->ng, "xqs");
	f->sx = moe_ll_alloca(g, g->t_f32, (uint64_t)cr, "xsc");
	return cr;
}

/* Open the loop over chunks of cr of the n rows and quantize each chunk's
 * rows (row(ri) gives the f32 row of global row ri); returns the chunk's
 * row count, with the loop in c and f->c0 its first row. */
static LLVMValueRef i8_chunk_open(struct moe_ll *g, struct ffn *f, struct moe_ll_loop *c,
				  int64_t cr, uint32_t K, uint32_t group, int gathered)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef n = moe_ll_prm(g, 3);
	moe_ll_loop_open(g, c, moe_ll_i64c(g, 0), n, cr, "chunk");
	f->c0 = c->iv;
	LLVMValueRef left = LLVMBuildNSWSub(b, n, c->iv, "");
	LLVMValueRef cn =
	    LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, left, moe_ll_i64c(g, cr), ""), left,
			    moe_ll_i64c(g, cr), "cn");
	struct moe_ll_loop r;
	moe_ll_loop_open(g, &r, moe_ll_i64c(g, 0), cn, 1, "q.r");
	LLVMValueRef ri = LLVMBuildNSWAdd(b, c->iv, r.iv, "");
	LLVMValueRef src;
	if (gathered) {
		/* up: x's row of the token at rows[ri] */
		LLVMValueRef tok =
		    moe_ll_ld(g, g->t_i32, moe_ll_at(g, g->t_i32, moe_ll_prm(g, 1), ri));
		tok = LLVMBuildSExt(b, tok, g->t_i64, "");
		src = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0),
				LLVMBuildNSWMul(b, tok, moe_ll_i64c(g, K), ""));
	} else {
		/* down: h's row ri */
		src = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0),
				LLVMBuildNSWMul(b, ri, moe_ll_i64c(g, f->geom->ld_h), ""));
	}
	LLVMValueRef xq, qs;
	i8_row(g, f, r.iv, &xq, &qs);
	quant_row(g, src, K, group, xq, moe_ll_at(g, g->t_f32, f->sx, r.iv), qs);
	moe_ll_loop_close(g, &r);
	return cn;
}

/* moe_up for int8 compute: chunks of rows are quantized once, then every
 * panel of [p0, p1) passes over the chunk's row blocks. */
static void gen_up_i8(struct moe_ll *g, const char *name, const struct ffn *f0)
{
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, P, I, P, P, P, P, I, I};
	static const char *const pn[] = {"x",  "rows", "rw", "n",  "panels",
					 "bg", "bu",   "h",  "p0", "p1"};
	moe_ll_fn_begin(g, name, params, pn, 10);
	for (unsigned i = 0; i < 8; i++)
		if (i != 3)
			moe_ll_noalias(g, i);
	struct ffn f = *f0;
	const struct moe_qfmt *q = &f.geom->q_up;
	int64_t cr = i8_chunk(g, &f, f.geom->hidden, q);
	struct moe_ll_loop c, p;
	LLVMValueRef cn = i8_chunk_open(g, &f, &c, cr, f.geom->hidden, q->group, 1);
	moe_ll_loop_open(g, &p, moe_ll_prm(g, 8), moe_ll_prm(g, 9), 1, "p");
	row_blocks_mr(g, &f, up_tile_i8, MOE_NR, p.iv, cn, i8_mr(g), 1);
	moe_ll_loop_close(g, &p);
	moe_ll_loop_close(g, &c);
	moe_ll_fn_end(g);
}

static void gen_up(struct moe_ll *g, const char *name, const struct ffn *f)
{
	if (g->p->compute == MOE_COMPUTE_INT8) {
		gen_up_i8(g, name, f);
		return;
	}
	if (g->p->compute == MOE_COMPUTE_BF16) {
		gen_up_pairs(g, name, f);
		return;
	}
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, P, I, P, P, P, P, I, I};
	static const char *const pn[] = {"x",  "rows", "rw", "n",  "panels",
					 "bg", "bu",   "h",  "p0", "p1"};
	moe_ll_fn_begin(g, name, params, pn, 10);
	for (unsigned i = 0; i < 8; i++)
		if (i != 3)
			moe_ll_noalias(g, i);
	if (f->geom->q_up.kind == MOE_QFORMAT_NONE) {
		f32_call(g, f, up_tile_adapter, MOE_NR, moe_ll_prm(g, 8), moe_ll_prm(g, 9),
			 moe_ll_prm(g, 3), f->geom->hidden);
		moe_ll_fn_end(g);
		return;
	}
	struct moe_ll_loop p;
	moe_ll_loop_open(g, &p, moe_ll_prm(g, 8), moe_ll_prm(g, 9), 1, "p");
	row_blocks_mr(g, f, up_tile_q, MOE_NR, p.iv, moe_ll_prm(g, 3), q_mr(g, &f->geom->q_up), 1);
	moe_ll_loop_close(g, &p);
	moe_ll_fn_end(g);
}

static void gen_down(struct moe_ll *g, const char *name, const struct ffn *f)
{
	LLVMBuilderRef b = g->b;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, P, I, P, P, P, I, I};
	static const char *const pn[] = {"h", "rows", "rw", "n", "panels", "bd", "y", "p0", "p1"};
	moe_ll_fn_begin(g, name, params, pn, 9);
	for (unsigned i = 0; i < 7; i++)
		if (i != 3)
			moe_ll_noalias(g, i);
	const struct moe_geom *ge = f->geom;
	int last = (int)(ge->hidden - (ge->down_panels - 1) * MOE_NR);
	int64_t n_full = last == MOE_NR ? ge->down_panels : ge->down_panels - 1;
	LLVMValueRef p0 = moe_ll_prm(g, 7), p1 = moe_ll_prm(g, 8);
	LLVMValueRef end =
	    LLVMBuildSelect(b, LLVMBuildICmp(b, LLVMIntSLT, p1, moe_ll_i64c(g, n_full), ""), p1,
			    moe_ll_i64c(g, n_full), "end");
	int bf = g->p->compute == MOE_COMPUTE_BF16, i8 = g->p->compute == MOE_COMPUTE_INT8;
	tile_fn *tile = bf                                    ? down_pair_tile
			: i8                                  ? down_tile_i8
			: ge->q_down.kind != MOE_QFORMAT_NONE ? down_tile_q
							      : down_tile;
	int mr = bf                                    ? BF_MR
		 : i8                                  ? i8_mr(g)
		 : ge->q_down.kind != MOE_QFORMAT_NONE ? q_mr(g, &ge->q_down)
						       : MOE_MR;
	int quant = i8 || (!bf && ge->q_down.kind != MOE_QFORMAT_NONE);
	struct ffn fc = *f;
	struct moe_ll_loop c, p;
	LLVMValueRef n = moe_ll_prm(g, 3);
	if (i8) /* chunks of h's rows quantized, then the panels over each */
		n = i8_chunk_open(g, &fc, &c, i8_chunk(g, &fc, ge->width, &ge->q_down), ge->width,
				  ge->q_down.group, 0);
	if (tile == down_tile) {
		f32_call(g, &fc, tile, MOE_NR, p0, end, n, ge->width);
	} else {
		moe_ll_loop_open(g, &p, p0, end, 1, "p");
		row_blocks_mr(g, &fc, tile, MOE_NR, p.iv, n, mr, quant);
		moe_ll_loop_close(g, &p);
	}
	if (n_full != ge->down_panels) {
		/* the partial last panel: masked loads and stores of y */
		LLVMValueRef in = LLVMBuildAnd(
		    b, LLVMBuildICmp(b, LLVMIntSLE, p0, moe_ll_i64c(g, n_full), ""),
		    LLVMBuildICmp(b, LLVMIntSGT, p1, moe_ll_i64c(g, n_full), ""), "has_last");
		LLVMBasicBlockRef e = moe_ll_when(g, in, "last");
		row_blocks_mr(g, &fc, tile, last, moe_ll_i64c(g, n_full), n, mr, quant);
		moe_ll_when_end(g, e);
	}
	if (i8)
		moe_ll_loop_close(g, &c);
	moe_ll_fn_end(g);
}

/* The router ------------------------------------------------------------- */

/* Group-limited routing (the reference's group_limit): mask (-inf) the
 * selection scores c of every expert outside the group_top best groups. */
static void gen_groups(struct moe_ll *g, LLVMValueRef c)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t G = d->n_groups, Eg = d->n_experts / G;
	LLVMValueRef gs = moe_ll_alloca(g, g->t_f32, G, "gscore");
	LLVMValueRef gsel = moe_ll_alloca(g, g->t_i8, G, "gsel");
	LLVMValueRef keep = moe_ll_alloca(g, g->t_i64, d->group_top, "gkeep");
	LLVMValueRef m1 = moe_ll_alloca(g, g->t_f32, 1, "m1"),
		     m2 = moe_ll_alloca(g, g->t_f32, 1, "m2");
	struct moe_ll_loop gr, i;
	moe_ll_loop_open(g, &gr, moe_ll_i64c(g, 0), moe_ll_i64c(g, G), 1, "grp");
	LLVMValueRef base = LLVMBuildNSWMul(b, gr.iv, moe_ll_i64c(g, Eg), "gbase");
	moe_ll_st(g, moe_ll_f32c(g, -INFINITY), m1);
	moe_ll_st(g, moe_ll_f32c(g, -INFINITY), m2);
	moe_ll_loop_open(g, &i, moe_ll_i64c(g, 0), moe_ll_i64c(g, Eg), 1, "gi");
	LLVMValueRef v = moe_ll_ldf(g, c, LLVMBuildNSWAdd(b, base, i.iv, ""));
	LLVMValueRef a = moe_ll_ld(g, g->t_f32, m1), bb = moe_ll_ld(g, g->t_f32, m2);
	LLVMValueRef gt1 = LLVMBuildFCmp(b, LLVMRealOGT, v, a, "");
	LLVMValueRef n2 = LLVMBuildSelect(b, gt1, a, moe_ll_fmax(g, v, bb), "");
	moe_ll_st(g, LLVMBuildSelect(b, gt1, v, a, ""), m1);
	moe_ll_st(g, n2, m2);
	moe_ll_loop_close(g, &i);
	LLVMValueRef sc = moe_ll_ld(g, g->t_f32, m1);
	if (d->group_score == MOE_GROUP_SCORE_SUM_TOP2 && Eg > 1)
		sc = LLVMBuildFAdd(b, sc, moe_ll_ld(g, g->t_f32, m2), "top2");
	moe_ll_stf(g, sc, gs, gr.iv);
	moe_ll_st(g, LLVMConstInt(g->t_i8, 0, 0), moe_ll_at(g, g->t_i8, gsel, gr.iv));
	moe_ll_loop_close(g, &gr);

	moe_ll_topk(g, gs, NULL, 1, NULL, moe_ll_i64c(g, G), moe_ll_i64c(g, d->group_top), keep);
	moe_ll_loop_open(g, &i, moe_ll_i64c(g, 0), moe_ll_i64c(g, d->group_top), 1, "gkeep");
	moe_ll_st(g, LLVMConstInt(g->t_i8, 1, 0),
		  moe_ll_at(g, g->t_i8, gsel, moe_ll_ldi(g, keep, i.iv)));
	moe_ll_loop_close(g, &i);

	moe_ll_loop_open(g, &gr, moe_ll_i64c(g, 0), moe_ll_i64c(g, G), 1, "gmask");
	LLVMValueRef sel = moe_ll_ld(g, g->t_i8, moe_ll_at(g, g->t_i8, gsel, gr.iv));
	LLVMValueRef off = LLVMBuildICmp(b, LLVMIntEQ, sel, LLVMConstInt(g->t_i8, 0, 0), "");
	base = LLVMBuildNSWMul(b, gr.iv, moe_ll_i64c(g, Eg), "");
	moe_ll_loop_open(g, &i, moe_ll_i64c(g, 0), moe_ll_i64c(g, Eg), 1, "gm");
	LLVMValueRef pc = moe_ll_at(g, g->t_f32, c, LLVMBuildNSWAdd(b, base, i.iv, ""));
	moe_ll_st(
	    g, LLVMBuildSelect(b, off, moe_ll_f32c(g, -INFINITY), moe_ll_ld(g, g->t_f32, pc), ""),
	    pc);
	moe_ll_loop_close(g, &i);
	moe_ll_loop_close(g, &gr);
}

/* Top-p: of the n ranked slots keep the fewest whose weights (the softmax
 * probabilities), summed in f32 in rank order, reach top_p; the rest become
 * id -1, weight 0. Branch-free: a running flag selects. */
static void gen_top_p_cut(struct moe_ll *g, LLVMValueRef ids, LLVMValueRef w, uint32_t n)
{
	LLVMBuilderRef b = g->b;
	LLVMValueRef cum = moe_ll_alloca(g, g->t_f32, 1, "cum"),
		     done = moe_ll_alloca(g, g->t_i8, 1, "done");
	moe_ll_st(g, moe_ll_f32c(g, 0.0), cum);
	moe_ll_st(g, LLVMConstInt(g->t_i8, 0, 0), done);
	struct moe_ll_loop j;
	moe_ll_loop_open(g, &j, moe_ll_i64c(g, 0), moe_ll_i64c(g, n), 1, "topp");
	LLVMValueRef pw = moe_ll_at(g, g->t_f32, w, j.iv), pi = moe_ll_at(g, g->t_i32, ids, j.iv);
	LLVMValueRef dn = LLVMBuildICmp(b, LLVMIntNE, moe_ll_ld(g, g->t_i8, done),
					LLVMConstInt(g->t_i8, 0, 0), "dn");
	LLVMValueRef wv = moe_ll_ld(g, g->t_f32, pw), c0 = moe_ll_ld(g, g->t_f32, cum);
	LLVMValueRef c = LLVMBuildFAdd(b, c0, wv, "c");
	moe_ll_st(g, LLVMBuildSelect(b, dn, c0, c, ""), cum);
	moe_ll_st(g, LLVMBuildSelect(b, dn, moe_ll_i32c(g, -1), moe_ll_ld(g, g->t_i32, pi), ""),
		  pi);
	moe_ll_st(g, LLVMBuildSelect(b, dn, moe_ll_f32c(g, 0.0), wv, ""), pw);
	LLVMValueRef reach = LLVMBuildFCmp(b, LLVMRealOGE, c, moe_ll_f32c(g, g->d->top_p), "reach");
	moe_ll_st(g, LLVMBuildZExt(b, LLVMBuildOr(b, dn, reach, ""), g->t_i8, ""), done);
	moe_ll_loop_close(g, &j);
}

/* moe_router: token choice, dense, top-p (route_topk, route_top_p). */
static void gen_route(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	const struct moe_desc *d = g->d;
	uint32_t E = d->n_experts, H = d->hidden, W = g->p->route_width;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, I, I, P, P, P, P, P, P, P, P, P};
	static const char *const pn[] = {
	    "x",      "t0",  "t1",      "router", "router_bias", "select_bias", "shared_gate_w",
	    "logits", "ids", "weights", "sgate",  "prio"};
	moe_ll_fn_begin(g, "moe_router", params, pn, 12);
	LLVMValueRef x = moe_ll_prm(g, 0), wr = moe_ll_prm(g, 3), br = moe_ll_prm(g, 4);
	LLVMValueRef bs = moe_ll_prm(g, 5), wsg = moe_ll_prm(g, 6), logits = moe_ll_prm(g, 7);
	/* the logits of a group of tokens per panel pass (moe_ll_tgroup) */
	int64_t LB = (int64_t)moe_router_blocks(E) * MOE_RB, G = moe_ll_tgroup_size(LB);
	LLVMValueRef lt = moe_ll_alloca(g, g->t_f32, (uint64_t)(G * LB), "lt");
	LLVMValueRef s = moe_ll_alloca(g, g->t_f32, E, "s");
	LLVMValueRef c = moe_ll_alloca(g, g->t_f32, E, "c");
	LLVMValueRef idx = moe_ll_alloca(g, g->t_i64, d->top_k ? d->top_k : 1, "idx");

	struct moe_ll_tgroup tg;
	struct moe_ll_loop e;
	moe_ll_tgroup_open(g, &tg, moe_ll_prm(g, 1), moe_ll_prm(g, 2), G);
	moe_ll_tgroup_logits(g, &tg, x, wr, E, lt);
	moe_ll_tgroup_rows(g, &tg);
	LLVMValueRef tv = tg.t, l = moe_ll_tgroup_row(g, &tg, lt, E);
	LLVMValueRef xrow =
	    moe_ll_at(g, g->t_f32, x, LLVMBuildNSWMul(b, tv, moe_ll_i64c(g, H), ""));

	LLVMValueRef lrow =
	    moe_ll_at(g, g->t_f32, logits, LLVMBuildNSWMul(b, tv, moe_ll_i64c(g, E), ""));
	moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, E), 1, "lb");
	LLVMValueRef pl = moe_ll_at(g, g->t_f32, l, e.iv);
	LLVMValueRef v = moe_ll_ld(g, g->t_f32, pl);
	if (d->router_bias) {
		v = LLVMBuildFAdd(b, v, moe_ll_ldf(g, br, e.iv), "");
		moe_ll_st(g, v, pl);
	}
	moe_ll_stf(g, v, lrow, e.iv);
	moe_ll_loop_close(g, &e);

	moe_ll_scores(g, d->score, l, s, moe_ll_i64c(g, 0), E);

	LLVMValueRef woff = LLVMBuildNSWMul(b, tv, moe_ll_i64c(g, W), "");
	LLVMValueRef ids_row = moe_ll_at(g, g->t_i32, moe_ll_prm(g, 8), woff);
	LLVMValueRef w_row = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 9), woff);
	if (d->mode == MOE_MODE_DENSE) {
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, E), 1, "dense");
		moe_ll_st(g, LLVMBuildTrunc(b, e.iv, g->t_i32, ""),
			  moe_ll_at(g, g->t_i32, ids_row, e.iv));
		moe_ll_stf(g, moe_ll_ldf(g, s, e.iv), w_row, e.iv);
		moe_ll_loop_close(g, &e);
	} else {
		/* selection scores: + selection bias, group mask */
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, E), 1, "sel");
		LLVMValueRef sv = moe_ll_ldf(g, s, e.iv);
		if (d->select_bias)
			sv = LLVMBuildFAdd(b, sv, moe_ll_ldf(g, bs, e.iv), "");
		moe_ll_stf(g, sv, c, e.iv);
		moe_ll_loop_close(g, &e);
		if (d->n_groups > 1)
			gen_groups(g, c);
		moe_ll_topk(g, c, NULL, 1, NULL, moe_ll_i64c(g, E), moe_ll_i64c(g, d->top_k), idx);
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, d->top_k), 1, "top");
		LLVMValueRef id = moe_ll_ldi(g, idx, e.iv);
		moe_ll_st(g, LLVMBuildTrunc(b, id, g->t_i32, ""),
			  moe_ll_at(g, g->t_i32, ids_row, e.iv));
		moe_ll_stf(g, moe_ll_ldf(g, s, id), w_row, e.iv);
		moe_ll_loop_close(g, &e);
		if (d->mode == MOE_MODE_TOP_P)
			gen_top_p_cut(g, ids_row, w_row, W);
		LLVMValueRef pv = moe_ll_ldf(g, c, moe_ll_ldi(g, idx, moe_ll_i64c(g, 0)));
		moe_ll_stf(g, pv, moe_ll_prm(g, 11), tv);
	}
	moe_ll_normalize(g, w_row, W);
	if (d->scale != 1.0f) {
		moe_ll_loop_open(g, &e, moe_ll_i64c(g, 0), moe_ll_i64c(g, W), 1, "nscale");
		moe_ll_stf(
		    g, LLVMBuildFMul(b, moe_ll_ldf(g, w_row, e.iv), moe_ll_f32c(g, d->scale), ""),
		    w_row, e.iv);
		moe_ll_loop_close(g, &e);
	}

	if (d->shared_count && d->shared_gate == MOE_SHARED_GATE_SIGMOID) {
		LLVMValueRef z = moe_ll_alloca(g, g->t_f32, 1, "z");
		moe_ll_st(g, moe_ll_f32c(g, 0.0), z);
		struct moe_ll_loop h;
		moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "sgh");
		LLVMValueRef m =
		    LLVMBuildFMul(b, moe_ll_ldf(g, xrow, h.iv), moe_ll_ldf(g, wsg, h.iv), "");
		moe_ll_st(g, LLVMBuildFAdd(b, moe_ll_ld(g, g->t_f32, z), m, ""), z);
		moe_ll_loop_close(g, &h);
		LLVMValueRef ex =
		    moe_ll_libmf(g, "expf", LLVMBuildFNeg(b, moe_ll_ld(g, g->t_f32, z), ""));
		LLVMValueRef o = LLVMBuildFDiv(b, moe_ll_f32c(g, 1.0),
					       LLVMBuildFAdd(b, moe_ll_f32c(g, 1.0), ex, ""), "");
		moe_ll_stf(g, o, moe_ll_prm(g, 10), tv);
	}
	moe_ll_tgroup_close(g, &tg);
	moe_ll_fn_end(g);
}

/* Constants and the table ------------------------------------------------- */

static LLVMValueRef cstring(struct moe_ll *g, const char *name, const char *s)
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
static void gen_table(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT], const char *cpu_name,
		      const char *triple)
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
	    moe_ll_i32c(g, MOE_KERNELS_ABI),
	    moe_ll_i32c(g, (int32_t)sizeof *d),
	    dgv,
	    cstring(g, "moe_gen_hash", hash),
	    cstring(g, "moe_gen_cpu", cpu_name),
	    cstring(g, "moe_gen_triple", triple),
	    moe_ll_i32c(g, (int32_t)p->compute),
	    moe_ll_i32c(g, (int32_t)p->n_ops),
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
typedef void route_emit(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT]);

static void emit_topk(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	if (moe_plan_has(g->p, MOE_OP_ROUTE)) {
		gen_route(g);
		k[MOE_KERNEL_ROUTE] = g->fn;
	} else {
		moe_cpu_research_build(g, k);
	}
	if (moe_plan_has(g->p, MOE_OP_JITTER))
		moe_cpu_jitter_build(g, k);
}

static void emit_expert_choice(struct moe_ll *g, LLVMValueRef k[MOE_KERNEL_COUNT])
{
	if (moe_plan_has(g->p, MOE_OP_JITTER))
		moe_cpu_jitter_build(g, k);
	moe_cpu_ecsoft_build(g, k);
}

#define emit_product_key moe_cpu_peer_build
#define emit_soft moe_cpu_soft_build
#define emit_sparsemixer emit_topk
#define emit_top_p emit_topk
#define emit_hierarchical emit_topk
static route_emit *const route_emitters[MOE_MODE_COUNT] = {
#define MOE_MODE(v, s, targets, family, pack) [MOE_MODE_##v] = emit_##family,
#include "moe_modes.def"
#undef MOE_MODE
};

static void build_module(struct moe_ll *g, const char *cpu_name, const char *triple)
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
		    .store = 1,
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
	gen_table(g, k, cpu_name, triple);
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

/* The sign of feature name in an LLVM feature string ("+avx512f,-avx512bf16"):
 * 1 enabled, -1 disabled, 0 not mentioned. */
static int feature(const char *features, const char *name)
{
	size_t n = strlen(name);
	for (const char *f = features; (f = strstr(f, name)) != NULL; f += n)
		if (f > features && (f[-1] == '+' || f[-1] == '-') && (f[n] == ',' || f[n] == 0))
			return f[-1] == '+' ? 1 : -1;
	return 0;
}

static int cpu_in(const char *cpu, const char *const *cpus, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (cpu && strcmp(cpu, cpus[i]) == 0)
			return 1;
	return 0;
}

/* Whether the target has AVX-512F (32 vector registers, 16-lane FMAs with a
 * folded broadcast): from the feature string, else the CPU's name; not with
 * -evex512 (AVX-512 instructions on 256-bit vectors only). */
static int has_avx512(const char *triple, const char *cpu, const char *features)
{
	static const char *const cpus[] = {
	    "x86-64-v4",  "znver4",         "znver5",         "skylake-avx512", "cascadelake",
	    "cooperlake", "cannonlake",     "icelake-client", "icelake-server", "tigerlake",
	    "rocketlake", "sapphirerapids", "emeraldrapids",  "graniterapids",  "graniterapids-d",
	};
	if (strncmp(triple, "x86_64", 6) != 0 || feature(features, "evex512") < 0)
		return 0;
	int f = feature(features, "avx512f");
	return f ? f > 0 : cpu_in(cpu, cpus, sizeof cpus / sizeof *cpus);
}

/* Whether an x86-64 target has AVX2: from the feature string, else the
 * CPU's name (those of LLVM 19 with it; AVX-512 implies it). */
static int has_avx2(const char *cpu, const char *features)
{
	static const char *const cpus[] = {
	    "x86-64-v3",        "x86-64-v4",      "core-avx2",      "haswell",
	    "broadwell",        "skylake",        "skylake-avx512", "cascadelake",
	    "cooperlake",       "cannonlake",     "icelake-client", "icelake-server",
	    "tigerlake",        "rocketlake",     "alderlake",      "raptorlake",
	    "meteorlake",       "arrowlake",      "arrowlake-s",    "lunarlake",
	    "pantherlake",      "gracemont",      "sierraforest",   "grandridge",
	    "clearwaterforest", "sapphirerapids", "emeraldrapids",  "graniterapids",
	    "graniterapids-d",  "diamondrapids",  "znver1",         "znver2",
	    "znver3",           "znver4",         "znver5",         "bdver4",
	};
	int f = feature(features, "avx2");
	return f ? f > 0 : cpu_in(cpu, cpus, sizeof cpus / sizeof *cpus);
}

/* The target's int8 dot product: 1, vpdpbusd on 512-bit vectors (AVX-512
 * VNNI), or on 256-bit ones, where the int8 kernels then run on halves:
 * AVX-VNNI (VEX; Alder Lake and the later cores without AVX-512), or
 * AVX-512 VNNI and VL with -evex512; 2, none of those but AVX2, whose
 * vpmaddubsw and vpmaddwd the 256-bit kernels use instead (dot4_avx2); 0,
 * none (f32 compute; AVX-512 without VNNI too). From the feature string,
 * else the CPU's name. */
static int has_int8_dot(const char *triple, const char *cpu, const char *features)
{
	static const char *const cpus[] = {
	    "cascadelake",   "cooperlake",      "icelake-client", "icelake-server",
	    "tigerlake",     "rocketlake",      "sapphirerapids", "emeraldrapids",
	    "graniterapids", "graniterapids-d", "diamondrapids",  "znver4",
	    "znver5",
	};
	static const char *const vex[] = {
	    "alderlake",    "raptorlake", "meteorlake",       "arrowlake",
	    "arrowlake-s",  "lunarlake",  "pantherlake",      "gracemont",
	    "sierraforest", "grandridge", "clearwaterforest",
	};
	if (strncmp(triple, "x86_64", 6) != 0)
		return 0;
	int f = feature(features, "avx512vnni");
	int evex = f ? f > 0 : cpu_in(cpu, cpus, sizeof cpus / sizeof *cpus);
	if (has_avx512(triple, cpu, features))
		return evex;
	if (evex && feature(features, "avx512vl") >= 0 && feature(features, "evex512") < 0)
		return 1;
	f = feature(features, "avxvnni");
	if (f ? f > 0 : cpu_in(cpu, vex, sizeof vex / sizeof *vex))
		return 1;
	return has_avx2(cpu, features) ? 2 : 0;
}

/* Whether the target has the AVX-512 bf16 dot product (vdpbf16ps) and
 * conversions: avx512bf16 in the feature string, else the CPU's name; and
 * AVX-512F (and VL for the 8-lane conversion of h). */
static int has_bf16_dot(const char *triple, const char *cpu, const char *features)
{
	static const char *const cpus[] = {
	    "cooperlake",      "sapphirerapids", "emeraldrapids", "graniterapids",
	    "graniterapids-d", "diamondrapids",  "znver4",        "znver5",
	};
	if (!has_avx512(triple, cpu, features) || feature(features, "avx512vl") < 0)
		return 0;
	int f = feature(features, "avx512bf16");
	return f ? f > 0 : cpu_in(cpu, cpus, sizeof cpus / sizeof *cpus);
}

/* The SVE vector length in bits that AArch64 code is generated for (0:
 * none, NEON only), or -1 with a message in err. want is the target's
 * sve_bits: 0 takes the CPU's length from the table below, when the CPU
 * (or "+sve" in the features) has SVE. LLVM knows these lengths only as a
 * tuning hint, not as a fact the code may rely on, hence the table;
 * neoverse-512tvb and "+sve" on another CPU have SVE of no fixed length,
 * which --sve-bits gives. */
static int sve_bits(const char *triple, const char *cpu, const char *features, int want, char *err,
		    size_t cap)
{
	static const struct {
		const char *cpu;
		int bits;
	} cpus[] = {
	    {"a64fx", 512},       {"neoverse-v1", 256},   {"neoverse-512tvb", 0},
	    {"neoverse-n2", 128}, {"neoverse-v2", 128},   {"neoverse-n3", 128},
	    {"neoverse-v3", 128}, {"neoverse-v3ae", 128}, {"cortex-a510", 128},
	    {"cortex-a520", 128}, {"cortex-a520ae", 128}, {"cortex-a710", 128},
	    {"cortex-a715", 128}, {"cortex-a720", 128},   {"cortex-a720ae", 128},
	    {"cortex-a725", 128}, {"cortex-x2", 128},     {"cortex-x3", 128},
	    {"cortex-x4", 128},   {"cortex-x925", 128},
	};
	if (want < 0)
		return 0;
	if (strncmp(triple, "aarch64", 7) != 0) {
		if (want)
			errf(err, cap, "--sve-bits is for AArch64 targets, not %s", triple);
		return want ? -1 : 0;
	}
	int known = -1; /* -1: the CPU has no SVE */
	for (size_t i = 0; i < sizeof cpus / sizeof *cpus; i++)
		if (!strcmp(cpu, cpus[i].cpu))
			known = cpus[i].bits;
	int f = feature(features, "sve");
	if (f == 0 && feature(features, "sve2") > 0)
		f = 1;
	if (f < 0 || (f == 0 && known < 0)) {
		if (want)
			errf(err, cap,
			     "--sve-bits %d: cpu '%s'%s%s has no SVE (name an SVE CPU, or add "
			     "--features +sve)",
			     want, cpu, *features ? " with features " : "", features);
		return want ? -1 : 0;
	}
	return want ? want : known > 0 ? known : 0;
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
	/* the host's CPU and features only for the host's architecture: another
	 * triple without --cpu gets LLVM's generic CPU for it */
	char *host = LLVMGetDefaultTargetTriple();
	size_t arch = strcspn(triple, "-");
	int foreign = strncmp(triple, host, arch) != 0 || (host[arch] != '-' && host[arch]);
	LLVMDisposeMessage(host);
	if (foreign && t->cpu && strcmp(t->cpu, "native") == 0) {
		errf(err, cap,
		     "--cpu native means the CPU of this machine, which cannot run %s: name a "
		     "CPU of that target, or leave --cpu out for its generic one",
		     triple);
		LLVMDisposeMessage(triple);
		return -1;
	}
	int native = !foreign && (!t->cpu || strcmp(t->cpu, "native") == 0);
	char *cpu = native ? LLVMGetHostCPUName() : NULL;
	char *feat = native && !t->features ? LLVMGetHostCPUFeatures() : NULL;
	const char *cpu_name = native ? cpu : t->cpu ? t->cpu : "generic";
	const char *features = t->features ? t->features : feat ? feat : "";
	LLVMTargetRef target;
	LLVMTargetMachineRef tm = NULL;
	struct moe_ll g = {0};

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

	int sve = sve_bits(triple, cpu_name, features, t->sve_bits, err, cap);
	if (sve < 0)
		goto out;

	/* the plan's compute format for this target machine */
	struct moe_plan q = *p;
	int dot8 = has_int8_dot(triple, cpu_name, features);
	moe_plan_set_compute(&q, has_bf16_dot(triple, cpu_name, features), dot8);
	LLVMContextRef ctx = LLVMContextCreate();
	/* 16-lane tile rows where one register holds them: AVX-512, SVE of
	 * 512 bits or more (docs/cpu.md) */
	moe_ll_init(&g, ctx, LLVMModuleCreateWithNameInContext(p->desc->name, ctx),
		    LLVMCreateBuilderInContext(ctx), &q,
		    has_avx512(triple, cpu_name, features) || sve >= 512);
	g.vscale = (unsigned)sve / 128;
	g.dot8 = dot8;
	char src[MOE_NAME_MAX + 8];
	snprintf(src, sizeof src, "%s.moe", p->desc->name);
	LLVMSetSourceFileName(g.mod, src, strlen(src));
	LLVMSetTarget(g.mod, triple);
	LLVMTargetDataRef td = LLVMCreateTargetDataLayout(tm);
	LLVMSetModuleDataLayout(g.mod, td);
	LLVMDisposeTargetData(td);

	build_module(&g, cpu_name, triple);
	if (sve) {
		/* the length the code relies on, checked by moe_create */
		LLVMValueRef sv = LLVMAddGlobal(g.mod, g.t_i32, "moe_gen_sve_bits");
		LLVMSetInitializer(sv, moe_ll_i32c(&g, sve));
		LLVMSetGlobalConstant(sv, 1);
		LLVMSetVisibility(sv, LLVMHiddenVisibility);
	}

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
	/* AArch64: no partial unrolling. Unrolled twice (a64fx), the 6-row up
	 * tile's K loop needs more than the 32 NEON registers and spills its
	 * accumulators; once, it holds them (docs/cpu.md). */
	if (!strncmp(triple, "aarch64", 7))
		LLVMPassBuilderOptionsSetLoopUnrolling(po, 0);
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
