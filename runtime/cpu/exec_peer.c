/* exec_peer.c: PEER layers on the CPU: packing of the query, the sub-keys and
 * the neuron tables, and the forward, blocks of tokens per pool task, each
 * running the generated retrieval then the generated neuron gathers while
 * the block's routing is still in cache. */
#include "moe_kernels.h"
#include "pool.h"

#include <stdlib.h>
#include <string.h>

#define PEER_TOKENS_PER_TASK 8

static void *zalloc(size_t bytes)
{
	size_t n = (bytes + 63) / 64 * 64;
	void *p = aligned_alloc(64, n ? n : 64);
	if (p)
		memset(p, 0, n ? n : 64);
	return p;
}

enum moe_status moe_pack_peer(const struct moe_model *m, struct moe_ref_weights *w,
			      struct moe_layer_w *out)
{
	const struct moe_desc *d = m->d;
	uint32_t H = d->hidden, R = d->pk_sub_keys, h2 = d->pk_query_dim / 2;
	uint32_t Q = d->pk_heads * d->pk_query_dim, KB = moe_pk_key_blocks(R);
	size_t N = (size_t)R * R;
	memset(out, 0, sizeof *out);
	out->pk_query = moe_pack_router_panels(w->w[MOE_ROLE_PK_QUERY], Q, H);
	out->pk_qbias = zalloc((size_t)moe_router_blocks(Q) * MOE_RB * sizeof(float));
	out->pk_keys = zalloc(2 * (size_t)KB * h2 * MOE_VW * sizeof(float));
	if (!out->pk_query || !out->pk_qbias || !out->pk_keys)
		goto nomem;
	memcpy(out->pk_qbias, w->w[MOE_ROLE_PK_QUERY_BIAS], Q * sizeof(float));
	for (uint32_t s = 0; s < 2; s++)
		for (uint32_t r = 0; r < R; r++)
			for (uint32_t i = 0; i < h2; i++)
				out->pk_keys[(((size_t)s * KB + r / MOE_VW) * h2 + i) * MOE_VW +
					     r % MOE_VW] =
				    w->w[MOE_ROLE_PK_KEYS][((size_t)s * R + r) * h2 + i];
	if (d->weight_dtype == MOE_DTYPE_F32) {
		/* 2 N H f32 is the bulk of the model (8 GiB at N = 1024^2, H = 1024) */
		out->pk_u = w->w[MOE_ROLE_NEURON_U], w->w[MOE_ROLE_NEURON_U] = NULL;
		out->pk_v = w->w[MOE_ROLE_NEURON_V], w->w[MOE_ROLE_NEURON_V] = NULL;
		return MOE_OK;
	}
	uint16_t *u = malloc(N * H * sizeof *u), *v = malloc(N * H * sizeof *v);
	out->pk_u = u, out->pk_v = v;
	if (!u || !v)
		goto nomem;
	for (size_t i = 0; i < N * H; i++) {
		u[i] = moe_f32_to_bf16(w->w[MOE_ROLE_NEURON_U][i]);
		v[i] = moe_f32_to_bf16(w->w[MOE_ROLE_NEURON_V][i]);
	}
	return MOE_OK;
nomem:
	moe_layer_w_free(out);
	moe_set_error("out of memory packing the weights");
	return MOE_ERR_NOMEM;
}

struct peer_run {
	const struct moe_model *m;
	const struct moe_layer_w *lw;
	const float *x;
	float *y;
	size_t T;
	int32_t *ids;
	float *wts;
};

static void peer_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct peer_run *r = ctx;
	const struct moe_gen *g = r->m->gen;
	const struct moe_layer_w *lw = r->lw;
	int64_t t0 = (int64_t)task * PEER_TOKENS_PER_TASK, t1 = t0 + PEER_TOKENS_PER_TASK;
	if (t1 > (int64_t)r->T)
		t1 = (int64_t)r->T;
	g->pk_route(r->x, t0, t1, lw->pk_query, lw->pk_qbias, lw->pk_keys, r->ids, r->wts);
	g->pk_experts(r->x, t0, t1, r->ids, r->wts, lw->pk_u, lw->pk_v, r->y);
}

enum moe_status moe_exec_peer(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
			      float *y, size_t T, struct moe_routing *rt)
{
	const struct moe_desc *d = m->d;
	size_t W = moe_desc_route_width(d), E = d->n_experts;
	int32_t *ids = malloc(T * W * sizeof *ids);
	float *wts = malloc(T * W * sizeof *wts);
	if (!ids || !wts) {
		free(ids), free(wts);
		moe_set_error("moe_forward: out of memory");
		return MOE_ERR_NOMEM;
	}
	struct peer_run r = {.m = m, .lw = lw, .x = x, .y = y, .T = T, .ids = ids, .wts = wts};
	moe_pool_run(m->pool, (T + PEER_TOKENS_PER_TASK - 1) / PEER_TOKENS_PER_TASK, peer_task, &r);
	if (rt) {
		/* PEER has no router distribution over its N experts: no importance or
		 * losses, as in the reference */
		if (rt->expert_ids)
			memcpy(rt->expert_ids, ids, T * W * sizeof *ids);
		if (rt->weights)
			memcpy(rt->weights, wts, T * W * sizeof *wts);
		if (rt->counts) {
			memset(rt->counts, 0, E * sizeof *rt->counts);
			for (size_t s = 0; s < T * W; s++)
				rt->counts[ids[s]]++;
		}
		if (rt->importance)
			memset(rt->importance, 0, E * sizeof *rt->importance);
		rt->importance_cv2 = rt->lb_loss = rt->z_loss = 0.0f;
		rt->n_dropped = 0;
	}
	free(ids), free(wts);
	return MOE_OK;
}
