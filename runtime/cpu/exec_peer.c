/* exec_peer.c: PEER layers on the CPU: packing of the query, the sub-keys and
 * the neuron tables, and the forward, blocks of tokens per pool task, each
 * running the generated retrieval then the generated neuron gathers while
 * the block's routing is still in cache. */
#include "moe_kernels.h"
#include "moe_mem.h"
#include "pool.h"

#include <stdlib.h>
#include <string.h>

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
	const float *Wq = w->w[MOE_ROLE_PK_QUERY], *bq = w->w[MOE_ROLE_PK_QUERY_BIAS];
	float *Wbn = NULL, *bbn = NULL;
	if (d->pk_query_bn) { /* the query BatchNorm folded into the projection */
		Wbn = malloc((size_t)Q * H * sizeof *Wbn), bbn = malloc(Q * sizeof *bbn);
		if (!Wbn || !bbn) {
			free(Wbn), free(bbn);
			goto nomem;
		}
		int64_t bad = moe_pk_fold_bn(d, w, Wbn, bbn);
		if (bad >= 0) {
			free(Wbn), free(bbn);
			moe_set_error("pk_bn_var[%lld] + eps is not positive (or gamma not finite)",
				      (long long)bad);
			return MOE_ERR_WEIGHTS;
		}
		Wq = Wbn, bq = bbn;
	}
	out->pk_query = moe_pack_router_panels(Wq, Q, H);
	out->pk_qbias = zalloc((size_t)moe_router_blocks(Q) * MOE_RB * sizeof(float));
	/* per key set (one, or one per head) [2][KB][d/2][8] panels */
	uint32_t sets = d->pk_keys_per_head ? d->pk_heads : 1;
	size_t set_elems = 2 * (size_t)KB * h2 * MOE_VW;
	out->pk_keys = zalloc(sets * set_elems * sizeof(float));
	if (out->pk_query && out->pk_qbias)
		memcpy(out->pk_qbias, bq, Q * sizeof(float));
	free(Wbn), free(bbn);
	if (!out->pk_query || !out->pk_qbias || !out->pk_keys)
		goto nomem;
	/* canonical: shared [2, R, d/2]; per head [heads, R, 2, d/2] */
	for (uint32_t hs = 0; hs < sets; hs++)
		for (uint32_t s = 0; s < 2; s++)
			for (uint32_t r = 0; r < R; r++)
				for (uint32_t i = 0; i < h2; i++) {
					size_t src = d->pk_keys_per_head
							 ? (((size_t)hs * R + r) * 2 + s) * h2 + i
							 : ((size_t)s * R + r) * h2 + i;
					out->pk_keys[hs * set_elems +
						     (((size_t)s * KB + r / MOE_VW) * h2 + i) *
							 MOE_VW +
						     r % MOE_VW] = w->w[MOE_ROLE_PK_KEYS][src];
				}
	if (d->weight_dtype == MOE_DTYPE_F32) {
		/* 2 N H f32 is the bulk of the model (8 GiB at N = 1024^2, H = 1024) */
		out->pk_u = w->w[MOE_ROLE_NEURON_U], w->w[MOE_ROLE_NEURON_U] = NULL;
		out->pk_v = w->w[MOE_ROLE_NEURON_V], w->w[MOE_ROLE_NEURON_V] = NULL;
		return MOE_OK;
	}
	uint16_t *u = moe_big_alloc(N * H * sizeof *u, 0), *v = moe_big_alloc(N * H * sizeof *v, 0);
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

/* The queries of every token, as tiles of (token block, query-row blocks):
 * each query panel is read once per token block of the call, not once per
 * token, and both threads share the work whatever T is. */
#define PK_QUERY_TOKENS 64

enum moe_status moe_begin_pk_query(struct moe_exec *x)
{
	const struct moe_desc *d = x->d;
	int64_t QB = moe_router_blocks(d->pk_heads * d->pk_query_dim), T = (int64_t)x->T;
	int64_t tiles_t = (T + PK_QUERY_TOKENS - 1) / PK_QUERY_TOKENS;
	int64_t want = 4 * (int64_t)moe_pool_size(x->m->pool);
	int64_t per = tiles_t >= want ? QB : (QB * tiles_t + want - 1) / want;
	per = per < 4 ? 4 : per;
	for (int64_t t0 = 0; t0 < T; t0 += PK_QUERY_TOKENS)
		for (int64_t b0 = 0; b0 < QB; b0 += per) {
			struct moe_tile t = {
			    .op = MOE_OP_PK_QUERY,
			    .r0 = t0,
			    .r1 = t0 + PK_QUERY_TOKENS < T ? t0 + PK_QUERY_TOKENS : T,
			    .p0 = (uint32_t)b0,
			    .p1 = (uint32_t)(b0 + per < QB ? b0 + per : QB),
			};
			if (moe_exec_add_tile(x, &t) != MOE_OK)
				return MOE_ERR_NOMEM;
		}
	return MOE_OK;
}

void moe_run_pk_query(struct moe_exec *x, int64_t i, int64_t i1, unsigned thread)
{
	(void)i1, (void)thread;
	const struct moe_tile *t = &x->tiles[i];
	const struct moe_layer_w *lw = x->lw;
	MOE_KERNEL(x->m, PK_QUERY)
	(x->x, t->r0, t->r1, t->p0, t->p1, lw->pk_query, lw->pk_qbias, x->m->ws.logits);
}

/* Retrieval then the neuron gathers of a token block: consecutive TOKENS
 * ops, so one task runs both while the block's routing is still in cache. */
void moe_run_pk_route(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread)
{
	(void)thread;
	MOE_KERNEL(x->m, PK_ROUTE)
	(x->m->ws.logits, t0, t1, x->lw->pk_keys, x->m->ws.ids, x->m->ws.wts);
}

void moe_run_pk_experts(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread)
{
	(void)thread;
	MOE_KERNEL(x->m, PK_EXPERTS)
	(x->x, t0, t1, x->m->ws.ids, x->m->ws.wts, x->lw->pk_u, x->lw->pk_v, x->y);
}

/* PEER has no router distribution over its N experts: no importance or
 * losses, as in the reference. */
enum moe_status moe_begin_pk_stats(struct moe_exec *x)
{
	struct moe_routing *rt = x->rt;
	if (!rt)
		return MOE_OK;
	size_t T = x->T, W = moe_desc_route_width(x->d), E = x->d->n_experts;
	const int32_t *ids = x->m->ws.ids;
	if (rt->expert_ids)
		memcpy(rt->expert_ids, ids, T * W * sizeof *ids);
	if (rt->weights)
		memcpy(rt->weights, x->m->ws.wts, T * W * sizeof(float));
	if (rt->counts) {
		memset(rt->counts, 0, E * sizeof *rt->counts);
		for (size_t s = 0; s < T * W; s++)
			rt->counts[ids[s]]++;
	}
	if (rt->importance)
		memset(rt->importance, 0, E * sizeof *rt->importance);
	rt->importance_cv2 = rt->lb_loss = rt->z_loss = 0.0f;
	rt->n_dropped = 0;
	return MOE_OK;
}
