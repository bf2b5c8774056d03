/* cpu_llvm_soft.c: Soft MoE for the CPU backend, emitted into the module
 * cpu_llvm.c builds: l2-normalization of tokens and slot parameters, the
 * token-slot logits, the two softmaxes, the slot inputs D^T x and the output
 * C Y. Each repeats the reference's arithmetic order (route_soft in ref.c). */
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

static LLVMValueRef ldd(struct moe_ll *g, LLVMValueRef p, LLVMValueRef i)
{
	return moe_ll_ld(g, g->t_f64, moe_ll_at(g, g->t_f64, p, i));
}

static void std_(struct moe_ll *g, LLVMValueRef v, LLVMValueRef p, LLVMValueRef i)
{
	moe_ll_st(g, v, moe_ll_at(g, g->t_f64, p, i));
}

static LLVMValueRef mul(struct moe_ll *g, LLVMValueRef a, int64_t k)
{
	return LLVMBuildNSWMul(g->b, a, moe_ll_i64c(g, k), "");
}

/* The kernels ------------------------------------------------------------------ */

/* moe_soft_norm(src, dst, r0, r1): rows [r0, r1) of [*, H]: dst = src * r,
 * r = (float)(1 / sqrt((double)ss + 1e-6)), ss the f32 sum of squares in
 * ascending h. */
static void gen_norm(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden;
	LLVMTypeRef params[] = {g->t_ptr, g->t_ptr, g->t_i64, g->t_i64};
	static const char *const pn[] = {"src", "dst", "r0", "r1"};
	moe_ll_fn_begin(g, "moe_soft_norm", params, pn, 4);
	LLVMValueRef ss = moe_ll_alloca(g, g->t_f32, 1, "ss");
	struct moe_ll_loop r, h;
	moe_ll_loop_open(g, &r, moe_ll_prm(g, 2), moe_ll_prm(g, 3), 1, "r");
	LLVMValueRef src = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0), mul(g, r.iv, H));
	LLVMValueRef dst = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 1), mul(g, r.iv, H));
	moe_ll_st(g, moe_ll_f32c(g, 0.0), ss);
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "ss");
	LLVMValueRef v = moe_ll_ldf(g, src, h.iv);
	moe_ll_st(g, LLVMBuildFAdd(b, moe_ll_ld(g, g->t_f32, ss), LLVMBuildFMul(b, v, v, ""), ""),
		  ss);
	moe_ll_loop_close(g, &h);
	LLVMValueRef den = LLVMBuildFAdd(b, moe_ll_to_f64(g, moe_ll_ld(g, g->t_f32, ss)),
					 moe_ll_f64c(g, 1e-6), "");
	LLVMValueRef sq = moe_ll_intr1(g, "llvm.sqrt", den);
	LLVMValueRef inv = moe_ll_to_f32(g, LLVMBuildFDiv(b, moe_ll_f64c(g, 1.0), sq, ""));
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "sc");
	moe_ll_stf(g, LLVMBuildFMul(b, moe_ll_ldf(g, src, h.iv), inv, ""), dst, h.iv);
	moe_ll_loop_close(g, &h);
	moe_ll_loop_close(g, &r);
	moe_ll_fn_end(g);
}

/* moe_soft_logits(xn, slots, scale, t0, t1, L): L[t, s] = scale * (xn_t .
 * slot_s), the slots as router panels of the S slots (moe_ll_panel_dots).
 * With soft.scale channel the packed slots already hold gamma and the scale
 * is not applied (the reference's is exactly 1). */
static void gen_logits(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, S = n_slots(g);
	LLVMTypeRef params[] = {g->t_ptr, g->t_ptr, g->t_f32, g->t_i64, g->t_i64, g->t_ptr};
	static const char *const pn[] = {"xn", "slots", "scale", "t0", "t1", "L"};
	moe_ll_fn_begin(g, "moe_soft_logits", params, pn, 6);
	LLVMValueRef l = moe_ll_alloca(g, g->t_f32, (uint64_t)moe_router_blocks(S) * MOE_RB, "l");
	struct moe_ll_loop t, s;
	moe_ll_loop_open(g, &t, moe_ll_prm(g, 3), moe_ll_prm(g, 4), 1, "t");
	LLVMValueRef xrow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0), mul(g, t.iv, H));
	LLVMValueRef lrow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 5), mul(g, t.iv, S));
	moe_ll_panel_dots(g, xrow, moe_ll_prm(g, 1), S, l);
	moe_ll_loop_open(g, &s, moe_ll_i64c(g, 0), moe_ll_i64c(g, S), 1, "s");
	LLVMValueRef v = moe_ll_ldf(g, l, s.iv);
	if (!g->d->soft_gamma)
		v = LLVMBuildFMul(b, moe_ll_prm(g, 2), v, "");
	moe_ll_stf(g, v, lrow, s.iv);
	moe_ll_loop_close(g, &s);
	moe_ll_loop_close(g, &t);
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

/* moe_soft_dispatch(L, T, s0, s1, Dt): per slot s in [s0, s1), the softmax
 * over the T tokens of column s of L[T, S], stored transposed: Dt[s, t]. */
static void gen_dispatch(struct moe_ll *g)
{
	LLVMTypeRef params[] = {g->t_ptr, g->t_i64, g->t_i64, g->t_i64, g->t_ptr};
	static const char *const pn[] = {"L", "T", "s0", "s1", "Dt"};
	moe_ll_fn_begin(g, "moe_soft_dispatch", params, pn, 5);
	LLVMValueRef T = moe_ll_prm(g, 1);
	struct moe_ll_loop s;
	moe_ll_loop_open(g, &s, moe_ll_prm(g, 2), moe_ll_prm(g, 3), 1, "s");
	moe_ll_softmax(g, moe_ll_prm(g, 0), s.iv, n_slots(g), moe_ll_prm(g, 4),
		       LLVMBuildNSWMul(g->b, s.iv, T, ""), 1, T);
	moe_ll_loop_close(g, &s);
	moe_ll_fn_end(g);
}

/* moe_soft_slot_in(Dt, x, T, s0, s1, xs, acc): xs[s, h] = (float) sum over t
 * ascending of (double)Dt[s, t] * x[t, h], acc: H doubles of scratch. */
static void gen_slot_in(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden;
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, I, I, I, P, P};
	static const char *const pn[] = {"Dt", "x", "T", "s0", "s1", "xs", "acc"};
	moe_ll_fn_begin(g, "moe_soft_slot_in", params, pn, 7);
	LLVMValueRef T = moe_ll_prm(g, 2), acc = moe_ll_prm(g, 6);
	struct moe_ll_loop s, t, h;
	moe_ll_loop_open(g, &s, moe_ll_prm(g, 3), moe_ll_prm(g, 4), 1, "s");
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "z");
	std_(g, moe_ll_f64c(g, 0.0), acc, h.iv);
	moe_ll_loop_close(g, &h);
	LLVMValueRef drow =
	    moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0), LLVMBuildNSWMul(b, s.iv, T, ""));
	moe_ll_loop_open(g, &t, moe_ll_i64c(g, 0), T, 1, "t");
	LLVMValueRef dv = moe_ll_to_f64(g, moe_ll_ldf(g, drow, t.iv));
	LLVMValueRef xrow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 1), mul(g, t.iv, H));
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "h");
	LLVMValueRef pr = LLVMBuildFMul(b, dv, moe_ll_to_f64(g, moe_ll_ldf(g, xrow, h.iv)), "");
	std_(g, LLVMBuildFAdd(b, ldd(g, acc, h.iv), pr, ""), acc, h.iv);
	moe_ll_loop_close(g, &h);
	moe_ll_loop_close(g, &t);
	LLVMValueRef xs = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 5), mul(g, s.iv, H));
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "o");
	moe_ll_stf(g, moe_ll_to_f32(g, ldd(g, acc, h.iv)), xs, h.iv);
	moe_ll_loop_close(g, &h);
	moe_ll_loop_close(g, &s);
	moe_ll_fn_end(g);
}

/* moe_soft_out(C, Y, bias, t0, t1, y, acc): y[t, h] = (float)(sum over slots
 * ascending of (double)(C[t, s] * Y[s, h]) + bias[h]); bias only when the
 * description has an output bias. acc: H doubles of scratch. */
static void gen_out(struct moe_ll *g)
{
	LLVMBuilderRef b = g->b;
	uint32_t H = g->d->hidden, S = n_slots(g);
	LLVMTypeRef P = g->t_ptr, I = g->t_i64;
	LLVMTypeRef params[] = {P, P, P, I, I, P, P};
	static const char *const pn[] = {"C", "Y", "bias", "t0", "t1", "y", "acc"};
	moe_ll_fn_begin(g, "moe_soft_out", params, pn, 7);
	LLVMValueRef acc = moe_ll_prm(g, 6);
	struct moe_ll_loop t, s, h;
	moe_ll_loop_open(g, &t, moe_ll_prm(g, 3), moe_ll_prm(g, 4), 1, "t");
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "z");
	std_(g, moe_ll_f64c(g, 0.0), acc, h.iv);
	moe_ll_loop_close(g, &h);
	LLVMValueRef crow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 0), mul(g, t.iv, S));
	moe_ll_loop_open(g, &s, moe_ll_i64c(g, 0), moe_ll_i64c(g, S), 1, "s");
	LLVMValueRef c = moe_ll_ldf(g, crow, s.iv);
	LLVMValueRef yrow = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 1), mul(g, s.iv, H));
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "h");
	LLVMValueRef pr = moe_ll_to_f64(g, LLVMBuildFMul(b, c, moe_ll_ldf(g, yrow, h.iv), ""));
	std_(g, LLVMBuildFAdd(b, ldd(g, acc, h.iv), pr, ""), acc, h.iv);
	moe_ll_loop_close(g, &h);
	moe_ll_loop_close(g, &s);
	LLVMValueRef out = moe_ll_at(g, g->t_f32, moe_ll_prm(g, 5), mul(g, t.iv, H));
	moe_ll_loop_open(g, &h, moe_ll_i64c(g, 0), moe_ll_i64c(g, H), 1, "o");
	LLVMValueRef v = ldd(g, acc, h.iv);
	if (g->d->output_bias)
		v = LLVMBuildFAdd(b, v, moe_ll_to_f64(g, moe_ll_ldf(g, moe_ll_prm(g, 2), h.iv)),
				  "");
	moe_ll_stf(g, moe_ll_to_f32(g, v), out, h.iv);
	moe_ll_loop_close(g, &h);
	moe_ll_loop_close(g, &t);
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
