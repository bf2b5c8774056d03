/* exec_cpu.c: the CPU executor. Runs the generated router, groups the token
 * slots by expert (counts, offsets, row map, capacity), then schedules the
 * generated up tiles (expert x panel block x row block) and down tiles
 * (threads own output column blocks and walk the experts in index order, so
 * every output element sees the same arithmetic whatever T and the thread
 * count) on the pool. */
#include "moe_kernels.h"
#include "pool.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define UP_PANELS_PER_TASK 16
#define UP_ROWS_PER_TASK (16 * MOE_MR)
#define ROUTE_TOKENS_PER_TASK 16

void moe_ws_free(struct moe_ws *ws)
{
	free(ws->logits), free(ws->wts), free(ws->sgate), free(ws->prio), free(ws->row_w);
	free(ws->h), free(ws->hs), free(ws->x32), free(ws->y32);
	free(ws->ids), free(ws->rows);
	free(ws->counts), free(ws->offsets), free(ws->kept), free(ws->prob);
	memset(ws, 0, sizeof *ws);
}

static void *alloc64(size_t bytes)
{
	size_t n = (bytes + 63) / 64 * 64;
	return aligned_alloc(64, n ? n : 64);
}

static int ws_reserve(struct moe_model *m, size_t T)
{
	struct moe_ws *ws = &m->ws;
	if (T <= ws->cap_tokens && ws->logits)
		return 0;
	size_t cap = T < 16 ? 16 : T;
	if (cap < ws->cap_tokens * 2)
		cap = ws->cap_tokens * 2;
	moe_ws_free(ws);
	const struct moe_desc *d = m->d;
	size_t E = d->n_experts, W = moe_desc_route_width(d), H = d->hidden;
	ws->logits = alloc64(cap * E * sizeof(float));
	ws->wts = alloc64(cap * W * sizeof(float));
	ws->sgate = alloc64(cap * sizeof(float));
	ws->prio = alloc64(cap * sizeof(float));
	ws->row_w = alloc64(cap * W * sizeof(float));
	ws->h = alloc64(cap * W * m->routed.ld_h * sizeof(float));
	ws->hs = m->shared.width ? alloc64(cap * m->shared.ld_h * sizeof(float)) : NULL;
	ws->x32 = alloc64(cap * H * sizeof(float));
	ws->y32 = alloc64(cap * H * sizeof(float));
	ws->ids = alloc64(cap * W * sizeof(int32_t));
	ws->rows = alloc64(cap * (W + 1) * sizeof(int32_t)); /* routed rows, then shared */
	ws->counts = alloc64(E * sizeof(int64_t));
	ws->offsets = alloc64((E + 1) * sizeof(int64_t));
	ws->kept = alloc64(cap * W);
	ws->prob = m->gen->route_x ? alloc64(cap * E * sizeof(float)) : NULL;
	if (!ws->logits || !ws->wts || !ws->sgate || !ws->prio || !ws->row_w || !ws->h ||
	    (m->shared.width && !ws->hs) || !ws->x32 || !ws->y32 || !ws->ids || !ws->rows ||
	    !ws->counts || !ws->offsets || !ws->kept || (m->gen->route_x && !ws->prob)) {
		moe_ws_free(ws);
		return -1;
	}
	ws->cap_tokens = cap;
	return 0;
}

/* Phase tasks ------------------------------------------------------------- */

struct up_task {
	int32_t e; /* -1: the shared FFN */
	uint32_t p0, p1;
	int64_t r0, r1;
};

struct run {
	struct moe_model *m;
	const struct moe_layer_w *lw;
	const float *x;
	float *y;
	size_t T;
	struct up_task *ups;
	size_t n_ups;
	uint32_t down_chunk, n_down_tasks;
	int64_t *pass_t; /* capacity passthrough: token and weight of each dropped slot */
	float *pass_w;
	size_t n_pass;
};

static void route_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct run *r = ctx;
	struct moe_model *m = r->m;
	const struct moe_layer_w *lw = r->lw;
	int64_t t0 = (int64_t)task * ROUTE_TOKENS_PER_TASK, t1 = t0 + ROUTE_TOKENS_PER_TASK;
	if (t1 > (int64_t)r->T)
		t1 = (int64_t)r->T;
	if (m->gen->route_x) {
		m->gen->route_x(r->x, t0, t1, lw->router, lw->router_bias, lw->select_bias,
				lw->group_router, lw->noise, m->fwd.seed, m->fwd.layer,
				m->fwd.training, m->ws.logits, m->ws.ids, m->ws.wts, m->ws.prob,
				m->ws.prio);
		return;
	}
	m->gen->route(r->x, t0, t1, lw->router, lw->router_bias, lw->select_bias, lw->shared_gate_w,
		      m->ws.logits, m->ws.ids, m->ws.wts, m->ws.sgate, m->ws.prio);
}

static void up_task_run(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct run *r = ctx;
	struct moe_model *m = r->m;
	const struct moe_layer_w *lw = r->lw;
	const struct up_task *u = &r->ups[task];
	struct moe_ws *ws = &m->ws;
	size_t es = moe_dtype_size(m->d->weight_dtype);
	if (u->e >= 0) {
		const struct moe_geom *g = &m->routed;
		int64_t base = ws->offsets[u->e] + u->r0;
		const char *panels = (const char *)lw->up + (size_t)u->e * g->up_elems * es;
		m->gen->up(r->x, ws->rows + base, ws->row_w + base, u->r1 - u->r0, panels,
			   lw->bg ? lw->bg + (size_t)u->e * g->ld_h : NULL,
			   lw->bu ? lw->bu + (size_t)u->e * g->ld_h : NULL,
			   ws->h + (size_t)base * g->ld_h, u->p0, u->p1);
	} else {
		const struct moe_geom *g = &m->shared;
		m->gen->shared_up(r->x, ws->rows + r->T * moe_desc_route_width(m->d) + u->r0,
				  m->d->shared_gate == MOE_SHARED_GATE_SIGMOID ? ws->sgate + u->r0
									       : NULL,
				  u->r1 - u->r0, lw->s_up, NULL, NULL,
				  ws->hs + (size_t)u->r0 * g->ld_h, u->p0, u->p1);
	}
}

static void down_task_run(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct run *r = ctx;
	struct moe_model *m = r->m;
	const struct moe_desc *d = m->d;
	const struct moe_layer_w *lw = r->lw;
	struct moe_ws *ws = &m->ws;
	const struct moe_geom *g = &m->routed;
	size_t es = moe_dtype_size(d->weight_dtype);
	int64_t p0 = (int64_t)task * r->down_chunk, p1 = p0 + r->down_chunk;
	if (p1 > g->down_panels)
		p1 = g->down_panels;
	uint32_t H = d->hidden;
	int64_t c0 = p0 * MOE_NR, c1 = p1 * MOE_NR > H ? H : p1 * MOE_NR;
	for (size_t t = 0; t < r->T; t++)
		memset(r->y + t * H + c0, 0, (size_t)(c1 - c0) * sizeof(float));
	for (uint32_t e = 0; e < d->n_experts; e++) {
		int64_t n = ws->counts[e];
		if (!n)
			continue;
		int64_t base = ws->offsets[e];
		const char *panels = (const char *)lw->down + (size_t)e * g->down_elems * es;
		m->gen->down(ws->h + (size_t)base * g->ld_h, ws->rows + base, ws->row_w + base, n,
			     panels, lw->bd ? lw->bd + (size_t)e * g->ld_bias : NULL, r->y, p0, p1);
	}
	if (m->shared.width) {
		const int32_t *rows = ws->rows + r->T * moe_desc_route_width(d);
		m->gen->shared_down(ws->hs, rows, NULL, (int64_t)r->T, lw->s_down, NULL, r->y, p0,
				    p1);
	}
	for (size_t i = 0; i < r->n_pass; i++) {
		float w = r->pass_w[i];
		const float *xr = r->x + (size_t)r->pass_t[i] * H;
		float *yr = r->y + (size_t)r->pass_t[i] * H;
		for (int64_t c = c0; c < c1; c++)
			yr[c] += w * xr[c];
	}
	if (lw->output_bias)
		for (size_t t = 0; t < r->T; t++)
			for (int64_t c = c0; c < c1; c++)
				r->y[t * H + c] += lw->output_bias[c];
}

/* Grouping ------------------------------------------------------------------ */

struct prio_ent {
	float v;
	int64_t t;
};

static int cmp_prio(const void *pa, const void *pb)
{
	const struct prio_ent *a = pa, *b = pb;
	if (a->v != b->v)
		return a->v > b->v ? -1 : 1;
	return a->t < b->t ? -1 : a->t > b->t;
}

/* A description float as the decimal it was written as (0.3f -> 0.3), as
 * the reference reads capacity factors and fractions (docs/semantics.md). */
static double decimal_of(float v)
{
	char buf[32];
	for (int prec = 1; prec <= 9; prec++) {
		snprintf(buf, sizeof buf, "%.*g", prec, (double)v);
		double x = strtod(buf, NULL);
		if ((float)x == v)
			return x;
	}
	return (double)v;
}

/* Mark the kept slots: all, or those within each expert's capacity C in
 * the priority order (rank outer, tokens inner), like the reference. */
static int apply_capacity(struct moe_model *m, size_t T, int64_t *n_dropped)
{
	const struct moe_desc *d = m->d;
	struct moe_ws *ws = &m->ws;
	size_t W = moe_desc_route_width(d);
	*n_dropped = 0;
	memset(ws->kept, 1, T * W);
	if (d->capacity == MOE_CAPACITY_NONE)
		return 0;
	uint64_t C;
	if (d->capacity == MOE_CAPACITY_PER_EXPERT) {
		C = d->capacity_per_expert;
	} else {
		double v = d->capacity == MOE_CAPACITY_TOKEN_FRACTION
			       ? ceil((double)T * decimal_of(d->capacity_token_fraction))
			       : (double)d->top_k * (double)T * decimal_of(d->capacity_factor) /
				     (double)d->n_experts;
		if (d->capacity == MOE_CAPACITY_FACTOR)
			v = d->capacity_floor ? floor(v) : ceil(v);
		C = v >= 1.8e19 ? UINT64_MAX : (uint64_t)v;
	}
	if (C < d->capacity_min)
		C = d->capacity_min;
	uint64_t *fill = calloc(d->n_experts, sizeof *fill);
	struct prio_ent *ord = malloc(T * sizeof *ord);
	if (!fill || !ord) {
		free(fill), free(ord);
		return -1;
	}
	for (size_t t = 0; t < T; t++)
		ord[t] = (struct prio_ent){ws->prio[t], (int64_t)t};
	if (d->priority == MOE_PRIORITY_SCORE)
		qsort(ord, T, sizeof *ord, cmp_prio);
	for (size_t j = 0; j < W; j++)
		for (size_t i = 0; i < T; i++) {
			size_t s = (size_t)ord[i].t * W + j;
			int32_t e = ws->ids[s];
			if (fill[e] < C) {
				fill[e]++;
			} else {
				ws->kept[s] = 0;
				(*n_dropped)++;
			}
		}
	free(fill), free(ord);
	return 0;
}

/* The router probability of the statistics (docs/semantics.md): softmax, or
 * positive scores normalized to sum 1; and logsumexp for the z-loss. Same
 * formulas as the reference. */
static void token_stats(const struct moe_desc *d, const float *l, const float *p, double *imp,
			double *zsum, float *s)
{
	uint32_t E = d->n_experts;
	if (d->score == MOE_SCORE_SOFTMAX) {
		float m = -INFINITY, sum = 0.0f;
		for (uint32_t i = 0; i < E; i++)
			if (l[i] > m)
				m = l[i];
		for (uint32_t i = 0; i < E; i++) {
			s[i] = (float)exp((double)(l[i] - m));
			sum += s[i];
		}
		for (uint32_t i = 0; i < E; i++)
			s[i] /= sum;
	} else {
		float sum = 0.0f;
		for (uint32_t i = 0; i < E; i++) {
			double v = l[i];
			if (d->score == MOE_SCORE_SIGMOID)
				s[i] = (float)(1.0 / (1.0 + exp(-v)));
			else
				s[i] = (float)sqrt((double)(float)(v > 20.0 ? v : log1p(exp(v))));
			sum += s[i];
		}
		for (uint32_t i = 0; i < E; i++)
			s[i] = sum > 0.0f ? s[i] / sum : 0.0f;
	}
	const float *q = p ? p : s; /* research routers: the router's probability */
	for (uint32_t i = 0; i < E; i++)
		imp[i] += q[i];
	double m = -INFINITY, z = 0.0;
	for (uint32_t i = 0; i < E; i++)
		if (l[i] > m)
			m = l[i];
	if (isfinite(m)) {
		for (uint32_t i = 0; i < E; i++)
			z += exp((double)l[i] - m);
		z = m + log(z);
	}
	*zsum += z * z;
}

static int fill_routing(struct moe_model *m, size_t T, int64_t n_dropped, struct moe_routing *rt)
{
	const struct moe_desc *d = m->d;
	struct moe_ws *ws = &m->ws;
	uint32_t E = d->n_experts;
	size_t W = moe_desc_route_width(d);
	for (size_t s = 0; s < T * W; s++) {
		if (rt->expert_ids)
			rt->expert_ids[s] = ws->kept[s] ? ws->ids[s] : -1;
		if (rt->weights)
			rt->weights[s] = ws->kept[s] ? ws->wts[s] : 0.0f;
	}
	if (rt->counts)
		for (uint32_t e = 0; e < E; e++)
			rt->counts[e] = ws->counts[e];
	rt->n_dropped = n_dropped;
	double *imp = calloc(E, sizeof *imp);
	float *s = malloc(E * sizeof *s);
	if (!imp || !s) {
		free(imp), free(s);
		return -1;
	}
	double zsum = 0.0;
	for (size_t t = 0; t < T; t++)
		token_stats(d, ws->logits + t * E, ws->prob ? ws->prob + t * E : NULL, imp, &zsum,
			    s);
	double mean = 0.0, var = 0.0, total = 0.0, lb = 0.0;
	for (uint32_t e = 0; e < E; e++) {
		mean += imp[e];
		total += (double)ws->counts[e];
	}
	mean /= E;
	for (uint32_t e = 0; e < E; e++)
		var += (imp[e] - mean) * (imp[e] - mean);
	var /= E;
	for (uint32_t e = 0; e < E; e++)
		if (total > 0.0)
			lb += ((double)ws->counts[e] / total) * (imp[e] / (double)T);
	if (rt->importance)
		for (uint32_t e = 0; e < E; e++)
			rt->importance[e] = (float)imp[e];
	rt->importance_cv2 = mean > 0.0 ? (float)(var / (mean * mean)) : 0.0f;
	rt->lb_loss = (float)(E * lb);
	rt->z_loss = (float)(zsum / (double)T);
	free(imp), free(s);
	return 0;
}

enum moe_status moe_exec_cpu(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
			     float *y, size_t T, struct moe_routing *rt)
{
	if (m->gen->soft_logits)
		return moe_exec_soft(m, lw, x, y, T, rt);
	const struct moe_desc *d = m->d;
	uint32_t E = d->n_experts;
	size_t W = moe_desc_route_width(d);
	if (ws_reserve(m, T) != 0) {
		moe_set_error("out of memory for the workspace of %zu tokens", T);
		return MOE_ERR_NOMEM;
	}
	struct moe_ws *ws = &m->ws;
	struct run r = {.m = m, .lw = lw, .x = x, .y = y, .T = T};

	/* 1. route */
	moe_pool_run(m->pool, (T + ROUTE_TOKENS_PER_TASK - 1) / ROUTE_TOKENS_PER_TASK, route_task,
		     &r);

	/* 2. group: capacity, counts, offsets, rows sorted by token per expert */
	int64_t n_dropped = 0;
	if (apply_capacity(m, T, &n_dropped) != 0)
		goto nomem;
	if (m->gen->ec_select && moe_exec_ec_select(m, T) != 0)
		goto nomem;
	memset(ws->counts, 0, E * sizeof *ws->counts);
	for (size_t s = 0; s < T * W; s++)
		if (ws->kept[s])
			ws->counts[ws->ids[s]]++;
	ws->offsets[0] = 0;
	for (uint32_t e = 0; e < E; e++)
		ws->offsets[e + 1] = ws->offsets[e] + ws->counts[e];
	int64_t *fill = calloc(E, sizeof *fill);
	if (!fill)
		goto nomem;
	size_t n_pass = 0;
	for (size_t t = 0; t < T; t++)
		for (size_t j = 0; j < W; j++) {
			size_t s = t * W + j;
			if (!ws->kept[s]) {
				n_pass++;
				continue;
			}
			int32_t e = ws->ids[s];
			int64_t row = ws->offsets[e] + fill[e]++;
			ws->rows[row] = (int32_t)t;
			ws->row_w[row] = ws->wts[s];
		}
	free(fill);
	/* the shared FFN's rows: every token, after the routed rows */
	int32_t *srows = ws->rows + T * W;
	if (m->shared.width)
		for (size_t t = 0; t < T; t++)
			srows[t] = (int32_t)t;
	if (d->overflow == MOE_OVERFLOW_PASSTHROUGH && n_pass) {
		r.pass_t = malloc(n_pass * sizeof *r.pass_t);
		r.pass_w = malloc(n_pass * sizeof *r.pass_w);
		if (!r.pass_t || !r.pass_w) {
			free(r.pass_t), free(r.pass_w);
			goto nomem;
		}
		for (size_t s = 0; s < T * W; s++)
			if (!ws->kept[s]) {
				r.pass_t[r.n_pass] = (int64_t)(s / W);
				r.pass_w[r.n_pass++] = ws->wts[s];
			}
	}

	/* 3. up tiles */
	size_t n_tasks = 0, cap_tasks = 0;
	const struct moe_geom *g = &m->routed, *sg = &m->shared;
	for (uint32_t e = 0; e < E; e++)
		if (ws->counts[e])
			cap_tasks +=
			    ((size_t)(ws->counts[e] + UP_ROWS_PER_TASK - 1) / UP_ROWS_PER_TASK) *
			    ((g->up_panels + UP_PANELS_PER_TASK - 1) / UP_PANELS_PER_TASK);
	if (sg->width)
		cap_tasks += ((T + UP_ROWS_PER_TASK - 1) / UP_ROWS_PER_TASK) *
			     ((sg->up_panels + UP_PANELS_PER_TASK - 1) / UP_PANELS_PER_TASK);
	r.ups = malloc((cap_tasks ? cap_tasks : 1) * sizeof *r.ups);
	if (!r.ups) {
		free(r.pass_t), free(r.pass_w);
		goto nomem;
	}
	for (int32_t e = sg->width ? -1 : 0; e < (int32_t)E; e++) {
		int64_t n = e < 0 ? (int64_t)T : ws->counts[e];
		uint32_t np = e < 0 ? sg->up_panels : g->up_panels;
		for (int64_t r0 = 0; r0 < n; r0 += UP_ROWS_PER_TASK)
			for (uint32_t p0 = 0; p0 < np; p0 += UP_PANELS_PER_TASK) {
				struct up_task *u = &r.ups[n_tasks++];
				u->e = e;
				u->r0 = r0;
				u->r1 = r0 + UP_ROWS_PER_TASK < n ? r0 + UP_ROWS_PER_TASK : n;
				u->p0 = p0;
				u->p1 = p0 + UP_PANELS_PER_TASK < np ? p0 + UP_PANELS_PER_TASK : np;
			}
	}
	r.n_ups = n_tasks;
	moe_pool_run(m->pool, n_tasks, up_task_run, &r);

	/* 4. down tiles: threads own column blocks */
	unsigned nth = moe_pool_size(m->pool);
	uint32_t want = nth * 4;
	uint32_t chunk = (g->down_panels + want - 1) / want;
	r.down_chunk = chunk ? chunk : 1;
	r.n_down_tasks = (g->down_panels + r.down_chunk - 1) / r.down_chunk;
	moe_pool_run(m->pool, r.n_down_tasks, down_task_run, &r);
	free(r.ups);
	free(r.pass_t), free(r.pass_w);

	if (rt && fill_routing(m, T, n_dropped, rt) != 0)
		goto nomem;
	return MOE_OK;
nomem:
	moe_set_error("out of memory");
	return MOE_ERR_NOMEM;
}
