/* exec.c: the CPU executor. A forward walks the op list the plan embedded in
 * model.so (moe_gen.ops) and runs each op through its row of moe_op_execs:
 * consecutive ops of one shape become one parallel dispatch on the pool
 * (moe_ops.h). This file holds the walker and the ops of the routed and
 * shared FFNs (route, capacity, grouping, up tiles, down column blocks,
 * statistics); exec_peer.c and exec_soft.c hold those of PEER and Soft MoE.
 * Every task's arithmetic is fixed by its block, never by the thread, so
 * results do not depend on T or the thread count. */
#include "moe_kernels.h"
#include "pool.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROUTE_TOKENS_PER_TASK 16
#define EC_EXPERTS_PER_TASK 4
#define UP_PANELS_PER_TASK 16
#define UP_ROWS_PER_TASK (16 * MOE_MR)

/* Workspace ------------------------------------------------------------------ */

void moe_ws_free(struct moe_ws *ws)
{
	for (int i = 0; i < MOE_BUF_COUNT; i++)
		free(ws->buf[i]);
	free(ws->xp), free(ws->xp_id), free(ws->xsp);
	memset(ws, 0, sizeof *ws);
}

void *moe_exec_alloc(struct moe_exec *x, size_t bytes)
{
	if (x->n_scratch == sizeof x->scratch / sizeof *x->scratch)
		return NULL;
	size_t n = (bytes + 63) / 64 * 64;
	void *p = aligned_alloc(64, n ? n : 64);
	if (p)
		x->scratch[x->n_scratch++] = p;
	return p;
}

/* The workspace of the plan's ops for T tokens (grown, never shrunk): the
 * layout of moe_workspace, the one the plan prints. */
static int ws_reserve(struct moe_model *m, size_t T)
{
	struct moe_ws *ws = &m->ws;
	if (T <= ws->cap_tokens && ws->cap_tokens)
		return 0;
	size_t cap = T < 16 ? 16 : T;
	if (cap < ws->cap_tokens * 2)
		cap = ws->cap_tokens * 2;
	moe_ws_free(ws);
	const struct moe_gen *g = m->gen;
	uint64_t ops = 0;
	for (uint32_t i = 0; i < g->n_ops; i++)
		ops |= MOE_OP_BIT(g->ops[i]);
	struct moe_buf_size sz[MOE_BUF_COUNT];
	moe_workspace(m->d, ops, m->routed.ld_h, m->shared.width ? m->shared.ld_h : 0, sz);
	for (int i = 0; i < MOE_BUF_COUNT; i++) {
		if (!sz[i].per_token && !sz[i].fixed)
			continue;
		if (sz[i].per_token && cap > (SIZE_MAX / 2 - sz[i].fixed) / sz[i].per_token) {
			moe_ws_free(ws);
			return -1;
		}
		size_t n = (cap * sz[i].per_token + sz[i].fixed + 63) / 64 * 64;
		if (!(ws->buf[i] = aligned_alloc(64, n))) {
			moe_ws_free(ws);
			return -1;
		}
	}
#define B_(name, id) ws->name = ws->buf[MOE_BUF_##id]
	B_(xj, XJ), B_(logits, LOGITS), B_(prob, PROB), B_(ids, IDS), B_(wts, WEIGHTS);
	B_(sgate, SGATE), B_(prio, PRIO), B_(kept, KEPT), B_(counts, COUNTS);
	B_(offsets, OFFSETS), B_(rows, ROWS), B_(row_w, ROW_W), B_(srows, SROWS), B_(h, H);
	B_(hs, H_SHARED), B_(soft_xn, SOFT_XN), B_(soft_c, SOFT_C), B_(soft_d, SOFT_D);
	B_(soft_xs, SOFT_XS), B_(soft_y, SOFT_Y), B_(slot_row, SLOT_ROW), B_(drows, DROWS);
	B_(rows_y, ROWS_Y);
#undef B_
	ws->cap_tokens = cap;
	return 0;
}

int moe_gen_has_op(const struct moe_gen *g, enum moe_op op)
{
	for (uint32_t i = 0; i < g->n_ops; i++)
		if (g->ops[i] == op)
			return 1;
	return 0;
}

static void span(int64_t i, int64_t per, int64_t n, int64_t *a, int64_t *b)
{
	*a = i * per;
	*b = *a + per < n ? *a + per : n;
}

/* Route ---------------------------------------------------------------------- */

static void run_jitter(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread)
{
	(void)thread;
	if (x->xj)
		MOE_KERNEL(x->m, JITTER)(x->x_in, x->xj, t0, t1, x->fwd.seed, x->fwd.layer);
}

/* In training, the router and the experts see the jittered input. */
static enum moe_status begin_jitter(struct moe_exec *x)
{
	if (!x->fwd.training)
		return MOE_OK;
	x->xj = x->m->ws.xj;
	x->x = x->xj;
	return MOE_OK;
}

static void run_route(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread)
{
	(void)thread;
	const struct moe_layer_w *lw = x->lw;
	struct moe_ws *ws = &x->m->ws;
	MOE_KERNEL(x->m, ROUTE)
	(x->x, t0, t1, lw->router, lw->router_bias, lw->select_bias, lw->shared_gate_w, ws->logits,
	 ws->ids, ws->wts, ws->sgate, ws->prio);
}

static enum moe_status begin_route_x(struct moe_exec *x)
{
	if (x->fwd.training && x->d->noise == MOE_NOISE_LEARNED_GAUSSIAN && !x->lw->noise) {
		moe_set_error("moe_forward: training with learned_gaussian noise needs the '%s' "
			      "weights, which were not loaded",
			      moe_role_names[MOE_ROLE_NOISE]);
		return MOE_ERR_WEIGHTS;
	}
	return MOE_OK;
}

static void run_route_x(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread)
{
	(void)thread;
	const struct moe_layer_w *lw = x->lw;
	struct moe_ws *ws = &x->m->ws;
	/* noise is drawn only in training, and only where the description has it */
	int32_t training = x->fwd.training && x->d->noise != MOE_NOISE_NONE;
	MOE_KERNEL(x->m, ROUTE_X)
	(x->x, t0, t1, lw->router, lw->router_bias, lw->select_bias, lw->group_router, lw->noise,
	 x->fwd.seed, x->fwd.layer, training, ws->logits, ws->ids, ws->wts, ws->prob, ws->prio);
}

/* Expert choice: C = ceil(T * factor / E) exactly, at most T (the reference's
 * formula); scratch of C per thread. */
static enum moe_status begin_ec_select(struct moe_exec *x)
{
	uint64_t cv = moe_desc_scaled_count(x->d->ec_capacity_factor, x->T, x->d->n_experts, 0);
	x->ec_C = cv >= x->T ? (int64_t)x->T : (int64_t)cv;
	if (x->ec_C < 1)
		x->ec_C = 1;
	x->ec_pick =
	    moe_exec_alloc(x, moe_pool_size(x->m->pool) * (size_t)x->ec_C * sizeof(int64_t));
	return x->ec_pick ? MOE_OK : MOE_ERR_NOMEM;
}

static void run_ec_select(struct moe_exec *x, int64_t e0, int64_t e1, unsigned thread)
{
	struct moe_ws *ws = &x->m->ws;
	MOE_KERNEL(x->m, EC_SELECT)
	((int64_t)x->T, x->ec_C, e0, e1, ws->ids, ws->wts, x->ec_pick + (size_t)thread * x->ec_C);
}

/* Capacity and grouping --------------------------------------------------- */

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

/* Mark the kept slots: those within each expert's capacity C in the
 * priority order (rank outer, tokens inner), like the reference. */
static enum moe_status begin_capacity(struct moe_exec *x)
{
	const struct moe_desc *d = x->d;
	struct moe_ws *ws = &x->m->ws;
	size_t T = x->T, W = moe_desc_route_width(d);
	memset(ws->kept, 1, T * W);
	x->kept_set = 1;
	uint64_t C;
	if (d->capacity == MOE_CAPACITY_PER_EXPERT) {
		C = d->capacity_per_expert;
	} else if (d->capacity == MOE_CAPACITY_TOKEN_FRACTION) {
		C = moe_desc_scaled_count(d->capacity_token_fraction, T, 1, 0);
	} else {
		C = moe_desc_scaled_count(d->capacity_factor, (uint64_t)d->top_k * T, d->n_experts,
					  d->capacity_floor);
	}
	if (C < d->capacity_min)
		C = d->capacity_min;
	uint64_t *fill = calloc(d->n_experts, sizeof *fill);
	struct prio_ent *ord = malloc(T * sizeof *ord);
	if (!fill || !ord) {
		free(fill), free(ord);
		return MOE_ERR_NOMEM;
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
				x->n_dropped++;
			}
		}
	free(fill), free(ord);
	return MOE_OK;
}

/* Counts, offsets and the rows of each expert sorted by token, and the row
 * of each slot for the combine. A slot is kept unless the capacity dropped it
 * or the router left it empty (id -1: expert choice). Dropped slots feed the
 * passthrough. The rows' weights scale the up projection only where the
 * routing weight scales the input; otherwise they are 1 and the combine
 * weights each row's output, as the staged calls do. */
static enum moe_status begin_group(struct moe_exec *x)
{
	const struct moe_desc *d = x->d;
	struct moe_ws *ws = &x->m->ws;
	size_t T = x->T, W = moe_desc_route_width(d);
	uint32_t E = d->n_experts;
	if (!x->kept_set)
		for (size_t s = 0; s < T * W; s++)
			ws->kept[s] = ws->ids[s] >= 0;
	memset(ws->counts, 0, E * sizeof *ws->counts);
	for (size_t s = 0; s < T * W; s++)
		if (ws->kept[s])
			ws->counts[ws->ids[s]]++;
	ws->offsets[0] = 0;
	for (uint32_t e = 0; e < E; e++)
		ws->offsets[e + 1] = ws->offsets[e] + ws->counts[e];
	int64_t *fill = calloc(E, sizeof *fill);
	if (!fill)
		return MOE_ERR_NOMEM;
	size_t n_pass = 0;
	int w_in = d->apply_to == MOE_APPLY_INPUT;
	for (size_t t = 0; t < T; t++)
		for (size_t j = 0; j < W; j++) {
			size_t s = t * W + j;
			if (!ws->kept[s]) {
				n_pass++;
				if (ws->slot_row)
					ws->slot_row[s] = -1;
				continue;
			}
			int32_t e = ws->ids[s];
			int64_t row = ws->offsets[e] + fill[e]++;
			ws->rows[row] = (int32_t)t;
			ws->row_w[row] = !ws->slot_row || w_in ? ws->wts[s] : 1.0f;
			if (ws->slot_row) { /* the down writes the row as slot s */
				ws->slot_row[s] = (int64_t)s;
				ws->drows[row] = (int32_t)s;
			}
		}
	free(fill);
	if (d->overflow == MOE_OVERFLOW_PASSTHROUGH && n_pass && x->kept_set) {
		x->pass_t = moe_exec_alloc(x, n_pass * sizeof *x->pass_t);
		x->pass_w = moe_exec_alloc(x, n_pass * sizeof *x->pass_w);
		if (!x->pass_t || !x->pass_w)
			return MOE_ERR_NOMEM;
		for (size_t s = 0; s < T * W; s++)
			if (!ws->kept[s]) {
				x->pass_t[x->n_pass] = (int64_t)(s / W);
				x->pass_w[x->n_pass++] = ws->wts[s];
			}
	}
	x->ffn = (struct moe_ffn_rows){.in = x->x,
				       .out = x->y,
				       .out_rows = T,
				       .rows = ws->rows,
				       .row_w = ws->row_w,
				       .counts = ws->counts,
				       .offsets = ws->offsets,
				       .h = ws->h};
	if (ws->slot_row) {
		/* the down op writes each row's output as its slot's row of rows_y,
		 * [T, W, H] in slot order, so the combine reads it in order */
		x->ffn.out = ws->rows_y;
		x->ffn.out_rows = T * W;
		x->ffn.out_map = ws->drows;
		x->c_ry = ws->rows_y;
		x->c_slot_row = ws->slot_row;
		x->c_ids = ws->ids;
		x->c_w = ws->wts;
		x->c_unit_w = w_in;
	}
	return MOE_OK;
}

/* The FFN tiles ---------------------------------------------------------------- */

enum moe_status moe_exec_add_tile(struct moe_exec *x, const struct moe_tile *t)
{
	if (x->n_tiles == x->cap_tiles) {
		size_t cap = x->cap_tiles ? 2 * x->cap_tiles : 64;
		struct moe_tile *nt = realloc(x->tiles, cap * sizeof *nt);
		if (!nt)
			return MOE_ERR_NOMEM;
		x->tiles = nt, x->cap_tiles = cap;
	}
	x->tiles[x->n_tiles++] = *t;
	return MOE_OK;
}

static enum moe_status add_tiles(struct moe_exec *x, enum moe_op op, int32_t e, int64_t n,
				 uint32_t panels)
{
	/* int8 and bf16 compute quantize or convert a call's rows once per
	 * call: fewer, wider panel ranges (at least two per thread) repeat it
	 * less */
	uint32_t pp = UP_PANELS_PER_TASK;
	if (x->m->gen->compute == MOE_COMPUTE_INT8 || x->m->gen->compute == MOE_COMPUTE_BF16) {
		uint32_t w =
		    (panels + 2 * moe_pool_size(x->m->pool) - 1) / (2 * moe_pool_size(x->m->pool));
		pp = w > pp ? w : pp;
	}
	for (int64_t r0 = 0; r0 < n; r0 += UP_ROWS_PER_TASK)
		for (uint32_t p0 = 0; p0 < panels; p0 += pp) {
			struct moe_tile t = {
			    .op = (uint8_t)op,
			    .e = e,
			    .r0 = r0,
			    .r1 = r0 + UP_ROWS_PER_TASK < n ? r0 + UP_ROWS_PER_TASK : n,
			    .p0 = p0,
			    .p1 = p0 + pp < panels ? p0 + pp : panels,
			};
			if (moe_exec_add_tile(x, &t) != MOE_OK)
				return MOE_ERR_NOMEM;
		}
	return MOE_OK;
}

/* Act-order up panels: each expert's rows gathered in its input order
 * (up_perm), one task per expert. */
static void gather_task(void *ctx, size_t e, unsigned thread)
{
	(void)thread;
	struct moe_exec *x = ctx;
	size_t H = x->d->hidden;
	const int32_t *perm = x->lw->up_perm + e * H;
	for (int64_t r = x->ffn.offsets[e]; r < x->ffn.offsets[e] + x->ffn.counts[e]; r++) {
		const float *src = x->ffn.in + (size_t)x->ffn.rows[r] * H;
		float *dst = x->m->ws.xp + (size_t)r * H;
		for (size_t k = 0; k < H; k++)
			dst[k] = src[perm[k]];
	}
}

static enum moe_status gather_act_order(struct moe_exec *x)
{
	struct moe_ws *ws = &x->m->ws;
	size_t n = (size_t)x->ffn.offsets[x->d->n_experts], H = x->d->hidden;
	if (n > ws->xp_rows) {
		free(ws->xp), free(ws->xp_id);
		ws->xp_rows = 0;
		ws->xp = aligned_alloc(64, (n * H * sizeof *ws->xp + 63) / 64 * 64);
		ws->xp_id = malloc(n * sizeof *ws->xp_id);
		if (!ws->xp || !ws->xp_id)
			return MOE_ERR_NOMEM;
		for (size_t r = 0; r < n; r++)
			ws->xp_id[r] = (int32_t)r;
		ws->xp_rows = n;
	}
	moe_pool_run(x->m->pool, x->d->n_experts, gather_task, x);
	x->ffn.in = ws->xp;
	x->ffn.in_rows = ws->xp_id;
	return MOE_OK;
}

static enum moe_status begin_expert_up(struct moe_exec *x)
{
	if (x->lw->up_perm && gather_act_order(x) != MOE_OK)
		return MOE_ERR_NOMEM;
	for (uint32_t e = 0; e < x->d->n_experts; e++) {
		int64_t n = x->ffn.counts[e];
		if (n &&
		    add_tiles(x, MOE_OP_EXPERT_UP, (int32_t)e, n, x->m->routed.up_panels) != MOE_OK)
			return MOE_ERR_NOMEM;
	}
	return MOE_OK;
}

static void run_expert_up(struct moe_exec *x, int64_t i, int64_t i1, unsigned thread)
{
	(void)i1, (void)thread;
	const struct moe_tile *u = &x->tiles[i];
	const struct moe_layer_w *lw = x->lw;
	const struct moe_geom *g = &x->m->routed;
	int64_t base = x->ffn.offsets[u->e] + u->r0;
	const char *panels = (const char *)lw->up + (size_t)u->e * g->up_bytes;
	const int32_t *rows = x->ffn.in_rows ? x->ffn.in_rows : x->ffn.rows;
	MOE_KERNEL(x->m, UP)
	(x->ffn.in, rows + base, x->ffn.row_w + base, u->r1 - u->r0, panels,
	 lw->bg ? lw->bg + (size_t)u->e * g->ld_h : NULL,
	 lw->bu ? lw->bu + (size_t)u->e * g->ld_h : NULL, x->ffn.h + (size_t)base * g->ld_h, u->p0,
	 u->p1);
}

/* Act-order shared up panels: tokens [64 task, 64 task + 64) in its input
 * order (s_up_perm). */
static void gather_shared_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct moe_exec *x = ctx;
	size_t H = x->d->hidden, t1 = 64 * task + 64 < x->T ? 64 * task + 64 : x->T;
	const int32_t *perm = x->lw->s_up_perm;
	for (size_t t = 64 * task; t < t1; t++)
		for (size_t k = 0; k < H; k++)
			x->m->ws.xsp[t * H + k] = x->x[t * H + (size_t)perm[k]];
}

/* The shared FFN runs over every token of the layer input (rows 0..T-1). */
static enum moe_status begin_shared_up(struct moe_exec *x)
{
	struct moe_ws *ws = &x->m->ws;
	x->srows = ws->srows;
	for (size_t t = 0; t < x->T; t++)
		x->srows[t] = (int32_t)t;
	x->s_x = x->x;
	if (x->lw->s_up_perm) {
		size_t H = x->d->hidden;
		if (x->T > ws->xsp_rows) {
			free(ws->xsp);
			ws->xsp_rows = 0;
			if (!(ws->xsp =
				  aligned_alloc(64, (x->T * H * sizeof *ws->xsp + 63) / 64 * 64)))
				return MOE_ERR_NOMEM;
			ws->xsp_rows = x->T;
		}
		moe_pool_run(x->m->pool, (x->T + 63) / 64, gather_shared_task, x);
		x->s_x = ws->xsp;
	}
	return add_tiles(x, MOE_OP_SHARED_UP, -1, (int64_t)x->T, x->m->shared.up_panels);
}

static void run_shared_up(struct moe_exec *x, int64_t i, int64_t i1, unsigned thread)
{
	(void)i1, (void)thread;
	const struct moe_tile *u = &x->tiles[i];
	struct moe_ws *ws = &x->m->ws;
	const float *gate = x->d->shared_gate == MOE_SHARED_GATE_SIGMOID ? ws->sgate + u->r0 : NULL;
	MOE_KERNEL(x->m, SHARED_UP)
	(x->s_x, x->srows + u->r0, gate, u->r1 - u->r0, x->lw->s_up, NULL, NULL,
	 ws->hs + (size_t)u->r0 * x->m->shared.ld_h, u->p0, u->p1);
}

/* Column blocks: [p0, p1) down panels of 16 output columns. */
static void cols_of(const struct moe_exec *x, int64_t p0, int64_t p1, int64_t *c0, int64_t *c1)
{
	int64_t H = x->d->hidden;
	*c0 = p0 * MOE_NR;
	*c1 = p1 * MOE_NR > H ? H : p1 * MOE_NR;
}

static void run_expert_down(struct moe_exec *x, int64_t p0, int64_t p1, unsigned thread)
{
	(void)thread;
	const struct moe_layer_w *lw = x->lw;
	const struct moe_geom *g = &x->m->routed;
	for (uint32_t e = 0; e < x->d->n_experts; e++) {
		int64_t n = x->ffn.counts[e];
		if (!n)
			continue;
		int64_t base = x->ffn.offsets[e];
		const char *panels = (const char *)lw->down + (size_t)e * g->down_bytes;
		const int32_t *map = x->ffn.out_map ? x->ffn.out_map : x->ffn.rows;
		MOE_KERNEL(x->m, DOWN)
		(x->ffn.h + (size_t)base * g->ld_h, map + base, x->ffn.row_w + base, n, panels,
		 lw->bd ? lw->bd + (size_t)e * g->ld_bias : NULL, x->ffn.out, p0, p1);
	}
}

/* Tokens ahead of the one summed whose slot rows the combine prefetches: the
 * rows came from the down tiles of every expert, mostly out of cache. */
#define COMBINE_AHEAD 4

static void combine_prefetch(const struct moe_exec *x, size_t t, int64_t c0, int64_t c1)
{
	size_t H = x->d->hidden, W = moe_desc_route_width(x->d);
	for (size_t k = 0; k < W; k++) {
		size_t s = t * W + k;
		int64_t row = x->c_slot_row ? x->c_slot_row[s] : (int64_t)s;
		if (row < 0)
			continue;
		const float *r = x->c_ry + (size_t)row * H;
		for (int64_t c = c0; c < c1; c += 16)
			__builtin_prefetch(r + c, 0, 3);
	}
}

/* y = each token's slot outputs, weighted, summed in slot order k = 0..W-1
 * whatever expert, rank or thread computed them: the staged calls and the
 * forward share this op, so their results are the same bits. */
static void run_combine(struct moe_exec *x, int64_t p0, int64_t p1, unsigned thread)
{
	(void)thread;
	size_t H = x->d->hidden, W = moe_desc_route_width(x->d);
	int64_t c0, c1;
	cols_of(x, p0, p1, &c0, &c1);
	for (size_t t = 0; t < x->T; t++) {
		float *yr = x->y + t * H;
		for (int64_t c = c0; c < c1; c++)
			yr[c] = 0.0f;
		if (t + COMBINE_AHEAD < x->T)
			combine_prefetch(x, t + COMBINE_AHEAD, c0, c1);
		for (size_t k = 0; k < W; k++) {
			size_t s = t * W + k;
			int64_t row = x->c_slot_row ? x->c_slot_row[s] : (int64_t)s;
			if (x->c_ids[s] < 0 || row < 0)
				continue;
			float w = x->c_unit_w ? 1.0f : x->c_w[s];
			const float *r = x->c_ry + (size_t)row * H;
			for (int64_t c = c0; c < c1; c++)
				yr[c] += w * r[c];
		}
	}
}

static void run_shared_down(struct moe_exec *x, int64_t p0, int64_t p1, unsigned thread)
{
	(void)thread;
	MOE_KERNEL(x->m, SHARED_DOWN)
	(x->m->ws.hs, x->srows, NULL, (int64_t)x->T, x->lw->s_down, NULL, x->y, p0, p1);
}

static void run_passthrough(struct moe_exec *x, int64_t p0, int64_t p1, unsigned thread)
{
	(void)thread;
	size_t H = x->d->hidden;
	int64_t c0, c1;
	cols_of(x, p0, p1, &c0, &c1);
	for (size_t i = 0; i < x->n_pass; i++) {
		float w = x->pass_w[i];
		const float *xr = x->x + (size_t)x->pass_t[i] * H;
		float *yr = x->y + (size_t)x->pass_t[i] * H;
		for (int64_t c = c0; c < c1; c++)
			yr[c] += w * xr[c];
	}
}

static void run_output_bias(struct moe_exec *x, int64_t p0, int64_t p1, unsigned thread)
{
	(void)thread;
	size_t H = x->d->hidden;
	int64_t c0, c1;
	cols_of(x, p0, p1, &c0, &c1);
	for (size_t t = 0; t < x->T; t++)
		for (int64_t c = c0; c < c1; c++)
			x->y[t * H + c] += x->lw->output_bias[c];
}

/* Statistics ------------------------------------------------------------------ */

/* The router probability of the statistics: softmax, or positive scores
 * normalized to sum 1; and logsumexp for the z-loss. Same formulas as the
 * reference. */
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

void moe_routing_losses(const struct moe_desc *d, const double *imp, const double *load, size_t T,
			double zsum, struct moe_routing *rt)
{
	uint32_t E = d->n_experts;
	double mean = 0.0, var = 0.0, total = 0.0, lb = 0.0;
	for (uint32_t e = 0; e < E; e++) {
		mean += imp[e];
		total += load[e];
	}
	mean /= E;
	for (uint32_t e = 0; e < E; e++)
		var += (imp[e] - mean) * (imp[e] - mean);
	var /= E;
	for (uint32_t e = 0; e < E; e++)
		if (total > 0.0)
			lb += (load[e] / total) * (imp[e] / (double)T);
	if (rt->importance)
		for (uint32_t e = 0; e < E; e++)
			rt->importance[e] = (float)imp[e];
	rt->importance_cv2 = mean > 0.0 ? (float)(var / (mean * mean)) : 0.0f;
	rt->lb_loss = (float)(E * lb);
	rt->z_loss = (float)(zsum / (double)T);
}

/* The importance and z sums of T routed tokens (the router's logits and
 * probabilities in the workspace), added into imp[E] and *zsum. kept NULL:
 * every slot with an id is kept. */
static enum moe_status route_sums(const struct moe_desc *d, const struct moe_ws *ws, size_t T,
				  const uint8_t *kept, double *imp, double *zsum)
{
	uint32_t E = d->n_experts;
	size_t W = moe_desc_route_width(d);
	double *ti = calloc(E, sizeof *ti), z = 0.0;
	float *s = malloc(E * sizeof *s);
	if (!ti || !s) {
		free(ti), free(s);
		return MOE_ERR_NOMEM;
	}
	for (size_t t = 0; t < T; t++)
		token_stats(d, ws->logits + t * E, ws->prob ? ws->prob + t * E : NULL, ti, &z, s);
	if (d->importance_sparse) {
		/* Shazeer 2017: the sum of the sparse gates, the weights of the kept
		 * slots in slot order, as the reference */
		memset(ti, 0, E * sizeof *ti);
		for (size_t s2 = 0; s2 < T * W; s2++)
			if ((!kept || kept[s2]) && ws->ids[s2] >= 0)
				ti[ws->ids[s2]] += (double)ws->wts[s2];
	}
	for (uint32_t e = 0; e < E; e++)
		imp[e] += ti[e];
	*zsum += z;
	free(ti), free(s);
	return MOE_OK;
}

static enum moe_status begin_stats(struct moe_exec *x)
{
	struct moe_routing *rt = x->rt;
	if (!rt)
		return MOE_OK;
	const struct moe_desc *d = x->d;
	struct moe_ws *ws = &x->m->ws;
	uint32_t E = d->n_experts;
	size_t T = x->T, W = moe_desc_route_width(d);
	for (size_t s = 0; s < T * W; s++) {
		if (rt->expert_ids)
			rt->expert_ids[s] = ws->kept[s] ? ws->ids[s] : -1;
		if (rt->weights)
			rt->weights[s] = ws->kept[s] ? ws->wts[s] : 0.0f;
	}
	if (rt->counts)
		for (uint32_t e = 0; e < E; e++)
			rt->counts[e] = ws->counts[e];
	rt->n_dropped = x->n_dropped;
	double *imp = calloc(E, sizeof *imp), *load = malloc(E * sizeof *load), zsum = 0.0;
	enum moe_status st = MOE_ERR_NOMEM;
	if (imp && load && (st = route_sums(d, ws, T, ws->kept, imp, &zsum)) == MOE_OK) {
		for (uint32_t e = 0; e < E; e++)
			load[e] = (double)ws->counts[e];
		moe_routing_losses(d, imp, load, T, zsum, rt);
	}
	free(imp), free(load);
	return st;
}

/* The op table ------------------------------------------------------------------ */

const struct moe_op_exec moe_op_execs[MOE_OP_COUNT] = {
    [MOE_OP_JITTER] = {ROUTE_TOKENS_PER_TASK, begin_jitter, run_jitter},
    [MOE_OP_ROUTE] = {ROUTE_TOKENS_PER_TASK, NULL, run_route},
    [MOE_OP_ROUTE_X] = {ROUTE_TOKENS_PER_TASK, begin_route_x, run_route_x},
    [MOE_OP_EC_SELECT] = {EC_EXPERTS_PER_TASK, begin_ec_select, run_ec_select},
    [MOE_OP_CAPACITY] = {0, begin_capacity, NULL},
    [MOE_OP_GROUP] = {0, begin_group, NULL},
    [MOE_OP_EXPERT_UP] = {0, begin_expert_up, run_expert_up},
    [MOE_OP_SHARED_UP] = {0, begin_shared_up, run_shared_up},
    [MOE_OP_EXPERT_DOWN] = {0, NULL, run_expert_down},
    [MOE_OP_SHARED_DOWN] = {0, NULL, run_shared_down},
    [MOE_OP_PASSTHROUGH] = {0, NULL, run_passthrough},
    [MOE_OP_OUTPUT_BIAS] = {0, NULL, run_output_bias},
    [MOE_OP_STATS] = {0, begin_stats, NULL},
    [MOE_OP_PK_QUERY] = {0, moe_begin_pk_query, moe_run_pk_query},
    [MOE_OP_PK_ROUTE] = {MOE_PEER_TOKENS_PER_TASK, NULL, moe_run_pk_route},
    [MOE_OP_PK_EXPERTS] = {MOE_PEER_TOKENS_PER_TASK, NULL, moe_run_pk_experts},
    [MOE_OP_PK_STATS] = {0, moe_begin_pk_stats, NULL},
    [MOE_OP_SOFT_LOGITS] = {MOE_SOFT_TOKENS_PER_TASK, moe_begin_soft_logits, moe_run_soft_logits},
    [MOE_OP_SOFT_COMBINE] = {MOE_SOFT_TOKENS_PER_TASK, NULL, moe_run_soft_combine},
    [MOE_OP_SOFT_DISPATCH] = {MOE_SOFT_SLOTS_PER_TASK, NULL, moe_run_soft_dispatch},
    [MOE_OP_SOFT_SLOT_IN] = {0, NULL, moe_run_soft_slot_in},
    [MOE_OP_SOFT_SLOTS] = {0, moe_begin_soft_slots, NULL},
    [MOE_OP_SOFT_OUT] = {MOE_SOFT_TOKENS_PER_TASK, NULL, moe_run_soft_out},
    [MOE_OP_SOFT_STATS] = {0, moe_begin_soft_stats, NULL},
    [MOE_OP_COMBINE] = {0, NULL, run_combine},
};

/* The walker ---------------------------------------------------------------------- */

struct dispatch {
	struct moe_exec *x;
	const uint8_t *ops;
	uint32_t n_ops;
	enum moe_shape shape;
	int64_t per, n; /* items per task, items */
};

static void dispatch_task(void *ctx, size_t task, unsigned thread)
{
	struct dispatch *r = ctx;
	if (r->shape == MOE_SHAPE_TILES) {
		const struct moe_tile *t = &r->x->tiles[task];
		moe_op_execs[t->op].run(r->x, (int64_t)task, (int64_t)task + 1, thread);
		return;
	}
	int64_t a, b;
	span((int64_t)task, r->per, r->n, &a, &b);
	for (uint32_t i = 0; i < r->n_ops; i++)
		moe_op_execs[r->ops[i]].run(r->x, a, b, thread);
}

/* Run the plan's ops that are in the set `only` (bit per op), in plan order:
 * a maximal run of consecutive ops of one shape is one dispatch. */
static enum moe_status run_ops(struct moe_exec *x, uint64_t only)
{
	const struct moe_gen *g = x->m->gen;
	unsigned nth = moe_pool_size(x->m->pool);
	uint8_t ops[MOE_MAX_OPS];
	uint32_t n_ops = 0;
	for (uint32_t i = 0; i < g->n_ops && n_ops < MOE_MAX_OPS; i++)
		if (only & MOE_OP_BIT(g->ops[i]))
			ops[n_ops++] = g->ops[i];
	for (uint32_t i = 0; i < n_ops;) {
		enum moe_shape shape = moe_op_shapes[ops[i]];
		uint32_t j = i + 1;
		while (shape != MOE_SHAPE_SERIAL && j < n_ops && moe_op_shapes[ops[j]] == shape)
			j++;
		struct dispatch r = {.x = x, .ops = ops + i, .n_ops = j - i, .shape = shape};
		x->n_tiles = 0;
		for (uint32_t k = i; k < j; k++) {
			const struct moe_op_exec *e = &moe_op_execs[ops[k]];
			enum moe_status st = e->begin ? e->begin(x) : MOE_OK;
			if (st != MOE_OK)
				return st;
			if (e->block && (r.per == 0 || e->block < r.per))
				r.per = e->block;
		}
		switch (shape) {
		case MOE_SHAPE_SERIAL:
			break;
		case MOE_SHAPE_TOKENS:
			r.n = (int64_t)x->T;
			break;
		case MOE_SHAPE_SLOTS:
			r.n = (int64_t)x->n_slots;
			break;
		case MOE_SHAPE_EXPERTS:
			r.n = x->d->n_experts;
			break;
		case MOE_SHAPE_TILES:
			r.per = 1;
			r.n = (int64_t)x->n_tiles;
			break;
		case MOE_SHAPE_COLUMNS: {
			/* threads own column blocks: four per thread (int8 compute: one,
			 * since each task quantizes every row) */
			int64_t panels = x->m->routed.down_panels,
				want =
				    (x->m->gen->compute == MOE_COMPUTE_INT8 ? 1 : 4) * (int64_t)nth;
			r.per = (panels + want - 1) / want;
			r.n = panels;
			break;
		}
		case MOE_SHAPE_COUNT:
			break;
		}
		if (shape != MOE_SHAPE_SERIAL && r.n > 0 && r.per > 0) {
			moe_pool_run(x->m->pool, (size_t)((r.n + r.per - 1) / r.per), dispatch_task,
				     &r);
		}
		i = j;
	}
	return MOE_OK;
}

enum moe_status moe_exec_forward(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
				 float *y, size_t T, struct moe_routing *rt,
				 const struct moe_fwd_opts *opts)
{
	if (ws_reserve(m, T) != 0) {
		moe_set_error("moe_forward: out of memory for the workspace of %zu tokens", T);
		return MOE_ERR_NOMEM;
	}
	struct moe_exec ex = {
	    .m = m, .lw = lw, .d = m->d, .x = x, .x_in = x, .y = y, .T = T, .rt = rt};
	if (opts)
		ex.fwd = *opts;
	enum moe_status st = run_ops(&ex, ~0ull);
	if (st == MOE_ERR_NOMEM)
		moe_set_error("moe_forward: out of memory");
	for (size_t i = 0; i < ex.n_scratch; i++)
		free(ex.scratch[i]);
	free(ex.tiles);
	return st;
}

/* The stages ------------------------------------------------------------------- */

static enum moe_status stage_end(struct moe_exec *ex, enum moe_status st, const char *what)
{
	if (st == MOE_ERR_NOMEM)
		moe_set_error("%s: out of memory", what);
	for (size_t i = 0; i < ex->n_scratch; i++)
		free(ex->scratch[i]);
	free(ex->tiles);
	return st;
}

#define ROUTE_OPS (MOE_OP_BIT(MOE_OP_ROUTE) | MOE_OP_BIT(MOE_OP_ROUTE_X))

enum moe_status moe_exec_route(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
			       size_t T, int32_t *ids, float *w, const struct moe_fwd_opts *opts,
			       struct moe_route_sums *acc)
{
	if (ws_reserve(m, T) != 0) {
		moe_set_error("%s: out of memory for the workspace of %zu tokens",
			      acc ? "moe_route_stats" : "moe_route", T);
		return MOE_ERR_NOMEM;
	}
	struct moe_exec ex = {.m = m, .lw = lw, .d = m->d, .x = x, .x_in = x, .T = T};
	if (opts)
		ex.fwd = *opts;
	enum moe_status st = run_ops(&ex, ROUTE_OPS);
	if (st == MOE_OK) {
		size_t n = T * moe_desc_route_width(m->d);
		memcpy(ids, m->ws.ids, n * sizeof *ids);
		memcpy(w, m->ws.wts, n * sizeof *w);
	}
	/* the sums of the statistics: a staged mode keeps every slot with an id */
	if (st == MOE_OK && acc)
		st = route_sums(m->d, &m->ws, T, NULL, acc->importance, &acc->z_sum);
	if (st == MOE_OK && acc) {
		for (size_t s = 0; s < T * moe_desc_route_width(m->d); s++)
			if (ids[s] >= 0)
				acc->load[ids[s]] += 1.0;
		acc->n_tokens += T;
	}
	return stage_end(&ex, st, acc ? "moe_route_stats" : "moe_route");
}

enum moe_status moe_exec_experts(struct moe_model *m, const struct moe_layer_w *lw,
				 const float *rows_x, size_t n_rows, const int64_t *counts,
				 const float *rows_w, float *rows_y)
{
	/* the workspace of T tokens holds T * W grouped rows */
	size_t W = moe_desc_route_width(m->d), T = (n_rows + W - 1) / W;
	uint32_t E = m->d->n_experts;
	if (ws_reserve(m, T) != 0) {
		moe_set_error("moe_experts: out of memory for the workspace of %zu rows", n_rows);
		return MOE_ERR_NOMEM;
	}
	struct moe_ws *ws = &m->ws;
	ws->offsets[0] = 0;
	for (uint32_t e = 0; e < E; e++) {
		ws->counts[e] = counts[e];
		ws->offsets[e + 1] = ws->offsets[e] + counts[e];
	}
	for (size_t r = 0; r < n_rows; r++) {
		ws->drows[r] = (int32_t)r;
		ws->row_w[r] = rows_w ? rows_w[r] : 1.0f;
	}
	struct moe_exec ex = {.m = m, .lw = lw, .d = m->d, .T = T};
	ex.ffn = (struct moe_ffn_rows){.in = rows_x,
				       .out = rows_y,
				       .out_rows = n_rows,
				       .rows = ws->drows,
				       .row_w = ws->row_w,
				       .counts = ws->counts,
				       .offsets = ws->offsets,
				       .h = ws->h};
	enum moe_status st =
	    run_ops(&ex, MOE_OP_BIT(MOE_OP_EXPERT_UP) | MOE_OP_BIT(MOE_OP_EXPERT_DOWN));
	return stage_end(&ex, st, "moe_experts");
}

enum moe_status moe_exec_combine(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
				 size_t T, const int32_t *ids, const float *w, const float *rows_y,
				 const int64_t *slot_row, float *y)
{
	if (ws_reserve(m, T) != 0) {
		moe_set_error("moe_combine: out of memory for the workspace of %zu tokens", T);
		return MOE_ERR_NOMEM;
	}
	struct moe_exec ex = {.m = m, .lw = lw, .d = m->d, .x = x, .x_in = x, .y = y, .T = T};
	ex.c_ry = rows_y;
	ex.c_slot_row = slot_row;
	ex.c_ids = ids;
	ex.c_w = w;
	ex.c_unit_w = m->d->apply_to == MOE_APPLY_INPUT;
	uint64_t only = MOE_OP_BIT(MOE_OP_SHARED_UP) | MOE_OP_BIT(MOE_OP_COMBINE) |
			MOE_OP_BIT(MOE_OP_SHARED_DOWN) | MOE_OP_BIT(MOE_OP_OUTPUT_BIAS);
	/* a sigmoid-gated shared FFN takes its gate from the router kernel */
	if (m->shared.width && m->d->shared_gate == MOE_SHARED_GATE_SIGMOID)
		only |= ROUTE_OPS;
	enum moe_status st = run_ops(&ex, only);
	return stage_end(&ex, st, "moe_combine");
}
