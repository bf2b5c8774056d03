/* exec_soft.c: scheduling of Soft MoE. The generated kernels normalize the
 * tokens, take the token-slot logits, the two softmaxes and the slot inputs;
 * the slots then run through the usual up/down tiles as the rows of their
 * expert (weight 1), and a generated kernel mixes the slot outputs back into
 * the tokens. Every task's arithmetic is fixed by its index, not the thread. */
#include "moe_kernels.h"
#include "pool.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SOFT_TOKENS_PER_TASK 16
#define SOFT_SLOTS_PER_TASK 4
#define UP_PANELS_PER_TASK 16
#define UP_ROWS_PER_TASK (16 * MOE_MR)

struct up_task {
	int32_t e; /* -1: the shared FFN */
	uint32_t p0, p1;
	int64_t r0, r1;
};

struct soft_run {
	const struct moe_model *m;
	const struct moe_layer_w *lw;
	const float *x;
	float *y;
	size_t T;
	uint32_t S, P;
	float *xn, *L, *C, *Dt, *xs, *Y, *h, *hs, *ones;
	int32_t *rows; /* 0 .. max(S, T) - 1 */
	double *acc;   /* H per thread */
	struct up_task *ups;
	uint32_t down_chunk;
};

static void span(size_t task, size_t per, size_t n, int64_t *a, int64_t *b)
{
	*a = (int64_t)(task * per);
	*b = (int64_t)(task * per + per < n ? task * per + per : n);
}

static void norm_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct soft_run *r = ctx;
	int64_t t0, t1;
	span(task, SOFT_TOKENS_PER_TASK, r->T, &t0, &t1);
	r->m->gen->soft_norm(r->x, r->xn, t0, t1);
	r->m->gen->soft_logits(r->xn, r->lw->soft_slots, r->lw->soft_scale, t0, t1, r->L);
}

static void weights_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct soft_run *r = ctx;
	size_t nt = (r->T + SOFT_TOKENS_PER_TASK - 1) / SOFT_TOKENS_PER_TASK;
	int64_t a, b;
	if (task < nt) {
		span(task, SOFT_TOKENS_PER_TASK, r->T, &a, &b);
		r->m->gen->soft_combine(r->L, a, b, r->C);
	} else {
		span(task - nt, SOFT_SLOTS_PER_TASK, r->S, &a, &b);
		r->m->gen->soft_dispatch(r->L, (int64_t)r->T, a, b, r->Dt);
	}
}

static void slot_in_task(void *ctx, size_t task, unsigned thread)
{
	struct soft_run *r = ctx;
	int64_t s0, s1;
	span(task, SOFT_SLOTS_PER_TASK, r->S, &s0, &s1);
	r->m->gen->soft_slot_in(r->Dt, r->x, (int64_t)r->T, s0, s1, r->xs,
				r->acc + (size_t)thread * r->m->d->hidden);
}

static void up_task_run(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct soft_run *r = ctx;
	const struct moe_model *m = r->m;
	const struct moe_layer_w *lw = r->lw;
	const struct up_task *u = &r->ups[task];
	size_t es = moe_dtype_size(m->d->weight_dtype);
	if (u->e >= 0) {
		const struct moe_geom *g = &m->routed;
		int64_t base = (int64_t)u->e * r->P + u->r0;
		const char *panels = (const char *)lw->up + (size_t)u->e * g->up_elems * es;
		m->gen->up(r->xs, r->rows + base, r->ones, u->r1 - u->r0, panels,
			   lw->bg ? lw->bg + (size_t)u->e * g->ld_h : NULL,
			   lw->bu ? lw->bu + (size_t)u->e * g->ld_h : NULL,
			   r->h + (size_t)base * g->ld_h, u->p0, u->p1);
	} else {
		m->gen->shared_up(r->x, r->rows + u->r0, NULL, u->r1 - u->r0, lw->s_up, NULL, NULL,
				  r->hs + (size_t)u->r0 * m->shared.ld_h, u->p0, u->p1);
	}
}

/* Slot outputs Y[S, H]: threads own column blocks, experts in index order. */
static void down_task_run(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct soft_run *r = ctx;
	const struct moe_model *m = r->m;
	const struct moe_layer_w *lw = r->lw;
	const struct moe_geom *g = &m->routed;
	size_t es = moe_dtype_size(m->d->weight_dtype);
	int64_t p0 = (int64_t)task * r->down_chunk, p1 = p0 + r->down_chunk;
	if (p1 > g->down_panels)
		p1 = g->down_panels;
	for (uint32_t e = 0; e < m->d->n_experts; e++) {
		int64_t base = (int64_t)e * r->P;
		const char *panels = (const char *)lw->down + (size_t)e * g->down_elems * es;
		m->gen->down(r->h + (size_t)base * g->ld_h, r->rows + base, r->ones, r->P, panels,
			     lw->bd ? lw->bd + (size_t)e * g->ld_bias : NULL, r->Y, p0, p1);
	}
}

static void out_task(void *ctx, size_t task, unsigned thread)
{
	struct soft_run *r = ctx;
	int64_t t0, t1;
	span(task, SOFT_TOKENS_PER_TASK, r->T, &t0, &t1);
	r->m->gen->soft_out(r->C, r->Y, r->lw->output_bias, t0, t1, r->y,
			    r->acc + (size_t)thread * r->m->d->hidden);
}

/* The shared FFN added onto y, column blocks as the routed down tiles. */
static void shared_down_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct soft_run *r = ctx;
	const struct moe_model *m = r->m;
	int64_t p0 = (int64_t)task * r->down_chunk, p1 = p0 + r->down_chunk;
	if (p1 > m->shared.down_panels)
		p1 = m->shared.down_panels;
	m->gen->shared_down(r->hs, r->rows, NULL, (int64_t)r->T, r->lw->s_down, NULL, r->y, p0, p1);
}

static size_t add_ups(struct up_task *u, int32_t e, int64_t n, uint32_t np)
{
	size_t k = 0;
	for (int64_t r0 = 0; r0 < n; r0 += UP_ROWS_PER_TASK)
		for (uint32_t p0 = 0; p0 < np; p0 += UP_PANELS_PER_TASK, k++) {
			if (!u)
				continue;
			u[k].e = e;
			u[k].r0 = r0;
			u[k].r1 = r0 + UP_ROWS_PER_TASK < n ? r0 + UP_ROWS_PER_TASK : n;
			u[k].p0 = p0;
			u[k].p1 = p0 + UP_PANELS_PER_TASK < np ? p0 + UP_PANELS_PER_TASK : np;
		}
	return k;
}

static void run_downs(struct soft_run *r, uint32_t panels, moe_task_fn *fn)
{
	unsigned want = moe_pool_size(r->m->pool) * 4;
	r->down_chunk = (panels + want - 1) / want;
	if (!r->down_chunk)
		r->down_chunk = 1;
	moe_pool_run(r->m->pool, (panels + r->down_chunk - 1) / r->down_chunk, fn, r);
}

/* The reference's statistics for soft mode: counts = P, the probability of
 * expert e the f32 sum of its slots' combine weights, z-loss over the S
 * logits of each token. */
static void soft_stats(const struct soft_run *r, struct moe_routing *rt)
{
	const struct moe_desc *d = r->m->d;
	uint32_t E = d->n_experts, S = r->S, P = r->P;
	size_t T = r->T;
	double *imp = calloc(E, sizeof *imp), zsum = 0.0;
	for (size_t t = 0; t < T; t++) {
		const float *c = r->C + t * S, *l = r->L + t * S;
		for (uint32_t e = 0; imp && e < E; e++) {
			float v = 0.0f;
			for (uint32_t j = 0; j < P; j++)
				v += c[(size_t)e * P + j];
			imp[e] += v;
		}
		double m = -INFINITY, s = 0.0, z;
		for (uint32_t j = 0; j < S; j++)
			if (l[j] > m)
				m = l[j];
		if (isfinite(m)) {
			for (uint32_t j = 0; j < S; j++)
				s += exp((double)l[j] - m);
			z = m + log(s);
		} else {
			z = m;
		}
		zsum += z * z;
	}
	if (rt->counts)
		for (uint32_t e = 0; e < E; e++)
			rt->counts[e] = P;
	rt->n_dropped = 0;
	double mean = 0.0, var = 0.0, lb = 0.0, total = (double)E * P;
	for (uint32_t e = 0; imp && e < E; e++)
		mean += imp[e];
	mean /= E;
	for (uint32_t e = 0; imp && e < E; e++) {
		var += (imp[e] - mean) * (imp[e] - mean);
		lb += ((double)P / total) * (imp[e] / (double)T);
	}
	var /= E;
	if (rt->importance)
		for (uint32_t e = 0; e < E; e++)
			rt->importance[e] = imp ? (float)imp[e] : 0.0f;
	rt->importance_cv2 = mean > 0.0 ? (float)(var / (mean * mean)) : 0.0f;
	rt->lb_loss = (float)(E * lb);
	rt->z_loss = (float)(zsum / (double)T);
	free(imp);
}

enum moe_status moe_exec_soft(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
			      float *y, size_t T, struct moe_routing *rt)
{
	const struct moe_desc *d = m->d;
	size_t H = d->hidden, E = d->n_experts;
	struct soft_run r = {.m = m, .lw = lw, .x = x, .y = y, .T = T};
	r.P = d->soft_slots_per_expert;
	r.S = (uint32_t)(E * r.P);
	size_t S = r.S, nth = moe_pool_size(m->pool), nrows = S > T ? S : T;
	const struct moe_geom *g = &m->routed, *sg = &m->shared;
	enum moe_status st = MOE_ERR_NOMEM;
	if (T > SIZE_MAX / 8 / (S + H + 1)) {
		moe_set_error("moe_forward: too many tokens (%zu) for %zu soft slots", T, S);
		return MOE_ERR_ARG;
	}
	r.xn = malloc(T * H * sizeof(float));
	r.L = malloc(T * S * sizeof(float));
	r.C = malloc(T * S * sizeof(float));
	r.Dt = malloc(T * S * sizeof(float));
	r.xs = malloc(S * H * sizeof(float));
	r.Y = calloc(S * H, sizeof(float));
	r.h = malloc(S * g->ld_h * sizeof(float));
	r.hs = sg->width ? malloc(T * sg->ld_h * sizeof(float)) : NULL;
	r.ones = malloc(S * sizeof(float));
	r.rows = malloc(nrows * sizeof(int32_t));
	r.acc = malloc(nth * H * sizeof(double));
	size_t n_ups = E * add_ups(NULL, 0, r.P, g->up_panels) +
		       (sg->width ? add_ups(NULL, -1, (int64_t)T, sg->up_panels) : 0);
	r.ups = malloc((n_ups ? n_ups : 1) * sizeof *r.ups);
	if (!r.xn || !r.L || !r.C || !r.Dt || !r.xs || !r.Y || !r.h || (sg->width && !r.hs) ||
	    !r.ones || !r.rows || !r.acc || !r.ups) {
		moe_set_error("moe_forward: out of memory");
		goto out;
	}
	for (size_t i = 0; i < S; i++)
		r.ones[i] = 1.0f;
	for (size_t i = 0; i < nrows; i++)
		r.rows[i] = (int32_t)i;
	size_t nt = (T + SOFT_TOKENS_PER_TASK - 1) / SOFT_TOKENS_PER_TASK;
	size_t ns = (S + SOFT_SLOTS_PER_TASK - 1) / SOFT_SLOTS_PER_TASK;
	/* 1. normalized tokens and logits; 2. both softmaxes; 3. slot inputs */
	moe_pool_run(m->pool, nt, norm_task, &r);
	moe_pool_run(m->pool, nt + ns, weights_task, &r);
	moe_pool_run(m->pool, ns, slot_in_task, &r);
	/* 4. the slots through their experts (and the shared FFN over x) */
	size_t k = 0;
	for (uint32_t e = 0; e < E; e++)
		k += add_ups(r.ups + k, (int32_t)e, r.P, g->up_panels);
	if (sg->width)
		k += add_ups(r.ups + k, -1, (int64_t)T, sg->up_panels);
	moe_pool_run(m->pool, k, up_task_run, &r);
	run_downs(&r, g->down_panels, down_task_run);
	/* 5. y = C Y (+ output bias), then + shared */
	moe_pool_run(m->pool, nt, out_task, &r);
	if (sg->width)
		run_downs(&r, sg->down_panels, shared_down_task);
	if (rt)
		soft_stats(&r, rt);
	st = MOE_OK;
out:
	free(r.xn), free(r.L), free(r.C), free(r.Dt), free(r.xs), free(r.Y), free(r.h);
	free(r.hs), free(r.ones), free(r.rows), free(r.acc), free(r.ups);
	return st;
}

enum moe_status moe_pack_soft(const struct moe_model *m, const struct moe_ref_weights *w,
			      struct moe_layer_w *out)
{
	const struct moe_desc *d = m->d;
	uint32_t H = d->hidden, S = d->n_experts * d->soft_slots_per_expert;
	const float *phi = w->w[MOE_ROLE_SOFT_SLOTS], *sc = w->w[MOE_ROLE_SOFT_SCALE];
	if (!phi || !sc || !m->gen->soft_norm)
		return MOE_ERR_WEIGHTS;
	float *pn = malloc((size_t)S * H * sizeof *pn);
	if (!pn)
		return MOE_ERR_NOMEM;
	m->gen->soft_norm(phi, pn, 0, S);
	out->soft_slots = moe_pack_router_panels(pn, S, H);
	out->soft_scale = sc[0];
	free(pn);
	return out->soft_slots ? MOE_OK : MOE_ERR_NOMEM;
}
