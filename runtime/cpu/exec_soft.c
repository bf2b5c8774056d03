/* exec_soft.c: the ops of Soft MoE. The generated kernels normalize the
 * tokens, take the token-slot logits, the two softmaxes and the slot inputs;
 * the slots then run through the routed FFN's up and down ops (exec.c) as
 * the rows of their expert (weight 1), and a generated kernel mixes the slot
 * outputs back into the tokens. */
#include "moe_kernels.h"
#include "pool.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The Soft MoE buffers of one forward (S = E * slots per expert slots per
 * group of G tokens, ng groups; the last one may be shorter). Group g's
 * dispatch weights are Dt + S (g G + g MOE_SOFT_DT_PAD), [S, n_g + pad];
 * its slot inputs and outputs rows g S .. g S + S - 1 of xs and Y. */
struct moe_soft {
	uint32_t S, P;
	size_t G, ng;
	float *xn, *L, *C, *Dt, *xs, *Y, *ones, *h;
	int32_t *rows;    /* 0 .. S - 1 */
	int64_t *counts;  /* P per expert */
	int64_t *offsets; /* e * P */
};

enum moe_status moe_begin_soft_logits(struct moe_exec *x)
{
	const struct moe_desc *d = x->d;
	size_t T = x->T, H = d->hidden, E = d->n_experts;
	struct moe_soft *s = moe_exec_alloc(x, sizeof *s);
	if (!s)
		return MOE_ERR_NOMEM;
	s->P = d->soft_slots_per_expert;
	s->S = (uint32_t)(E * s->P);
	size_t S = s->S;
	if (T > SIZE_MAX / 8 / (S + H + 1)) {
		moe_set_error("moe_forward: too many tokens (%zu) for %zu soft slots", T, S);
		return MOE_ERR_ARG;
	}
	/* the workspace's buffers (moe_workspace) */
	const struct moe_ws *ws = &x->m->ws;
	s->xn = ws->soft_xn, s->L = ws->logits, s->C = ws->soft_c, s->Dt = ws->soft_d;
	s->xs = ws->soft_xs, s->Y = ws->soft_y, s->ones = ws->row_w, s->rows = ws->rows;
	s->counts = ws->counts, s->offsets = ws->offsets, s->h = ws->h;
	s->G = d->soft_group ? d->soft_group : (T ? T : 1);
	s->ng = (T + s->G - 1) / s->G;
	x->soft = s;
	x->n_slots = S;
	return MOE_OK;
}

void moe_run_soft_logits(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread)
{
	(void)thread;
	struct moe_soft *s = x->soft;
	MOE_KERNEL(x->m, SOFT_NORM)(x->x, s->xn, t0, t1);
	MOE_KERNEL(x->m, SOFT_LOGITS)(s->xn, x->lw->soft_slots, x->lw->soft_scale, t0, t1, s->L);
}

void moe_run_soft_combine(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread)
{
	(void)thread;
	MOE_KERNEL(x->m, SOFT_COMBINE)(x->soft->L, t0, t1, x->soft->C);
}

/* The tokens of group g: [g G, g G + n). */
static int64_t group_n(const struct moe_exec *x, size_t g)
{
	const struct moe_soft *s = x->soft;
	size_t t0 = g * s->G;
	return (int64_t)(x->T - t0 < s->G ? x->T - t0 : s->G);
}

static float *group_dt(const struct moe_soft *s, size_t g)
{
	return s->Dt + (size_t)s->S * (g * s->G + g * MOE_SOFT_DT_PAD);
}

void moe_run_soft_dispatch(struct moe_exec *x, int64_t s0, int64_t s1, unsigned thread)
{
	(void)thread;
	struct moe_soft *s = x->soft;
	for (size_t g = 0; g < s->ng; g++)
		MOE_KERNEL(x->m, SOFT_DISPATCH)
	(s->L + g * s->G * s->S, group_n(x, g), s0, s1, group_dt(s, g));
}

/* Column panels [p0, p1) of the slot inputs, every slot: each value is one
 * task's, whatever the thread count. */
void moe_run_soft_slot_in(struct moe_exec *x, int64_t p0, int64_t p1, unsigned thread)
{
	(void)thread;
	struct moe_soft *s = x->soft;
	size_t H = x->d->hidden;
	for (size_t g = 0; g < s->ng; g++)
		MOE_KERNEL(x->m, SOFT_SLOT_IN)
	(group_dt(s, g), x->x + g * s->G * H, group_n(x, g), p0, p1, s->xs + g * s->S * H);
}

/* The slots become the rows of the routed FFN: expert e's P slots of every
 * group, group by group, weight 1, outputs into Y. */
enum moe_status moe_begin_soft_slots(struct moe_exec *x)
{
	struct moe_soft *s = x->soft;
	uint32_t E = x->d->n_experts, P = s->P;
	size_t n = 0;
	for (uint32_t e = 0; e < E; e++)
		for (size_t g = 0; g < s->ng; g++)
			for (uint32_t j = 0; j < P; j++) {
				s->ones[n] = 1.0f;
				s->rows[n++] = (int32_t)(g * s->S + (size_t)e * P + j);
			}
	for (uint32_t e = 0; e <= E; e++) {
		if (e < E)
			s->counts[e] = (int64_t)(s->ng * P);
		s->offsets[e] = (int64_t)(e * s->ng * P);
	}
	x->ffn = (struct moe_ffn_rows){.in = s->xs,
				       .out = s->Y,
				       .out_rows = s->ng * s->S,
				       .rows = s->rows,
				       .row_w = s->ones,
				       .counts = s->counts,
				       .offsets = s->offsets,
				       .h = s->h};
	return MOE_OK;
}

void moe_run_soft_out(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread)
{
	(void)thread;
	struct moe_soft *s = x->soft;
	size_t H = x->d->hidden;
	for (size_t g = (size_t)t0 / s->G; g < s->ng && (int64_t)(g * s->G) < t1; g++) {
		int64_t a = (int64_t)(g * s->G), b = a + group_n(x, g);
		MOE_KERNEL(x->m, SOFT_OUT)
		(s->C, s->Y + g * s->S * H, x->lw->output_bias, a > t0 ? a : t0, b < t1 ? b : t1,
		 x->y);
	}
}

/* The reference's statistics for soft mode: counts = P, the probability of
 * expert e the f32 sum of its slots' combine weights, z-loss over the S
 * logits of each token. */
enum moe_status moe_begin_soft_stats(struct moe_exec *x)
{
	struct moe_routing *rt = x->rt;
	if (!rt)
		return MOE_OK;
	const struct moe_soft *r = x->soft;
	const struct moe_desc *d = x->d;
	uint32_t E = d->n_experts, S = r->S, P = r->P;
	size_t T = x->T;
	double *imp = calloc(E, sizeof *imp), *load = malloc(E * sizeof *load), zsum = 0.0;
	if (!imp || !load) {
		free(imp), free(load);
		return MOE_ERR_NOMEM;
	}
	for (size_t t = 0; t < T; t++) {
		const float *c = r->C + t * S, *l = r->L + t * S;
		for (uint32_t e = 0; e < E; e++) {
			float v = 0.0f;
			for (uint32_t j = 0; j < P; j++)
				v += c[(size_t)e * P + j];
			imp[e] += v;
		}
		double m = -INFINITY, sum = 0.0, z;
		for (uint32_t j = 0; j < S; j++)
			if (l[j] > m)
				m = l[j];
		if (isfinite(m)) {
			for (uint32_t j = 0; j < S; j++)
				sum += exp((double)l[j] - m);
			z = m + log(sum);
		} else {
			z = m;
		}
		zsum += z * z;
	}
	if (rt->counts)
		for (uint32_t e = 0; e < E; e++)
			rt->counts[e] = (int64_t)(P * r->ng);
	rt->n_dropped = 0;
	for (uint32_t e = 0; e < E; e++)
		load[e] = (double)(P * r->ng);
	moe_routing_losses(d, imp, load, T, zsum, rt);
	free(imp), free(load);
	return MOE_OK;
}

enum moe_status moe_pack_soft(const struct moe_model *m, const struct moe_ref_weights *w,
			      struct moe_layer_w *out)
{
	const struct moe_desc *d = m->d;
	uint32_t H = d->hidden, S = d->n_experts * d->soft_slots_per_expert;
	const float *phi = w->w[MOE_ROLE_SOFT_SLOTS];
	/* soft.scale scalar: SOFT_SCALE[0] multiplies each logit; channel:
	 * SOFT_GAMMA [H] multiplies the normalized slots once, here, as the
	 * reference does, and the logits take a scale of 1 (exact) */
	const float *sc = d->soft_gamma ? NULL : w->w[MOE_ROLE_SOFT_SCALE];
	const float *gamma = d->soft_gamma ? w->w[MOE_ROLE_SOFT_GAMMA] : NULL;
	moe_soft_norm_fn *norm = MOE_KERNEL(m, SOFT_NORM);
	if (!phi || !(sc || gamma) || !norm)
		return MOE_ERR_WEIGHTS;
	float *pn = malloc((size_t)S * H * sizeof *pn);
	if (!pn)
		return MOE_ERR_NOMEM;
	norm(phi, pn, 0, S);
	if (gamma)
		for (size_t s = 0; s < S; s++)
			for (size_t h = 0; h < H; h++)
				pn[s * H + h] *= gamma[h];
	/* panels of 16 slots, [ceil(S / 16)][H][16], the last one padded with 0:
	 * row h of panel p is the B row the logits tile reads at k = h */
	size_t np = ((size_t)S + MOE_NR - 1) / MOE_NR;
	float *pk = calloc(np * H * MOE_NR, sizeof *pk);
	if (pk)
		for (size_t s = 0; s < S; s++)
			for (size_t h = 0; h < H; h++)
				pk[(s / MOE_NR * H + h) * MOE_NR + s % MOE_NR] = pn[s * H + h];
	out->soft_slots = pk;
	out->soft_scale = gamma ? 1.0f : sc[0];
	free(pn);
	return out->soft_slots ? MOE_OK : MOE_ERR_NOMEM;
}
