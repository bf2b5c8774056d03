/* pack.c: weights are packed once, at load, from the canonical f32 tensors
 * (moe_desc.h roles) into the panels the generated micro-kernels stream
 * (layout in moe_kernels.h); bf16/f16 weights stay 16-bit. */
#include "moe_kernels.h"
#include "moe_mem.h"

#include <stdlib.h>
#include <string.h>

size_t moe_dtype_size(enum moe_dtype t)
{
	return t == MOE_DTYPE_F32 ? 4 : 2;
}

/* 64-byte aligned, zeroed (padding rows and columns must be zero); huge
 * pages for the panels the kernels stream. */
static void *zalloc(size_t bytes)
{
	return moe_big_alloc(bytes, 1);
}

static void put(void *dst, size_t i, float v, enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_BF16:
		((uint16_t *)dst)[i] = moe_f32_to_bf16(v);
		break;
	case MOE_DTYPE_F16:
		((uint16_t *)dst)[i] = moe_f32_to_f16(v);
		break;
	default:
		((float *)dst)[i] = v;
		break;
	}
}

/* Where (k, column j) of panel p lives in a panel of K values per column:
 * k-major rows of 16 (moe_panel_slot), or k pairs for bf16 compute. */
static size_t panel_index(const struct moe_geom *g, enum moe_dtype t, uint32_t K, uint32_t p,
			  uint32_t k, uint32_t j)
{
	if (g->pairs)
		return (size_t)p * (K + (K & 1)) * MOE_NR + moe_pair_index(k, j);
	return ((size_t)p * K + k) * MOE_NR + moe_panel_slot(t, j);
}

/* The gate/up row of each h column: down's act-order input order (rp, [n_e,
 * width]; NULL: in order), so that h comes out in the order of down's
 * codes. */
static uint32_t h_row(const int32_t *rp, uint32_t e, uint32_t W, uint32_t row)
{
	return rp ? (uint32_t)rp[(size_t)e * W + row] : row;
}

/* Up panels of one FFN for experts [0, n_e): gate [n_e, width, H] (NULL for
 * mlp) and up [n_e, width, H], rows in h's order (rp). bf16 compute packs
 * bf16 pairs. */
static void *pack_up(const struct moe_geom *g, uint32_t n_e, const float *gate, const float *up,
		     enum moe_dtype t, const int32_t *rp)
{
	if (g->pairs)
		t = MOE_DTYPE_BF16;
	size_t es = g->elem_bytes;
	char *out = zalloc((size_t)n_e * g->up_elems * es);
	if (!out)
		return NULL;
	uint32_t H = g->hidden, W = g->width;
	for (uint32_t e = 0; e < n_e; e++) {
		char *pe = out + (size_t)e * g->up_elems * es;
		for (uint32_t p = 0; p < g->up_panels; p++)
			for (uint32_t j = 0; j < MOE_NR; j++) {
				const float *src;
				uint32_t row;
				if (g->glu) {
					row = p * (MOE_NR / 2) + j % (MOE_NR / 2);
					src = j < MOE_NR / 2 ? gate : up;
				} else {
					row = p * MOE_NR + j;
					src = up;
				}
				if (row >= W)
					continue;
				const float *s = src + ((size_t)e * W + h_row(rp, e, W, row)) * H;
				for (uint32_t k = 0; k < H; k++)
					put(pe, panel_index(g, t, H, p, k, j), s[k], t);
			}
	}
	return out;
}

/* Down panels: down [n_e, H, width]. */
static void *pack_down(const struct moe_geom *g, uint32_t n_e, const float *down, enum moe_dtype t)
{
	if (g->pairs)
		t = MOE_DTYPE_BF16;
	size_t es = g->elem_bytes;
	char *out = zalloc((size_t)n_e * g->down_elems * es);
	if (!out)
		return NULL;
	uint32_t H = g->hidden, W = g->width;
	for (uint32_t e = 0; e < n_e; e++) {
		char *pe = out + (size_t)e * g->down_elems * es;
		for (uint32_t p = 0; p < g->down_panels; p++)
			for (uint32_t j = 0; j < MOE_NR; j++) {
				uint32_t row = p * MOE_NR + j;
				if (row >= H)
					continue;
				const float *s = down + ((size_t)e * H + row) * W;
				for (uint32_t k = 0; k < W; k++)
					put(pe, panel_index(g, t, W, p, k, j), s[k], t);
			}
	}
	return out;
}

/* Kept-quantized panels (layout in moe_kernels.h). src(j) gives the tensor
 * and row of panel column j (NULL: padding), over matrices of K inputs. */
struct qsrc {
	const struct moe_ref_qtensor *t;
	uint64_t row; /* global row of the stacked [rows, K] matrices */
};

static void pack_qpanel(const struct moe_qfmt *f, uint32_t K, int dot4,
			const struct qsrc src[MOE_NR], unsigned char *out)
{
	uint64_t ng = K / f->group, bb = moe_qblock_bytes(f);
	int i4 = moe_qnibbles(f), off = f->kind == MOE_QFORMAT_INT4;
	for (uint64_t gi = 0; gi < ng; gi++) {
		unsigned char *blk = out + gi * bb;
		float *sc = (float *)blk, *of = (float *)(blk + 64);
		unsigned char *codes = blk + (off ? 128 : 64);
		for (uint32_t j = 0; j < MOE_NR; j++) {
			if (!src[j].t)
				continue; /* zero scale, offset and codes */
			const struct moe_ref_qtensor *t = src[j].t;
			uint64_t g = src[j].row * ng + gi;
			sc[j] = t->scale[g];
			if (off)
				of[j] = t->offset[g];
			const uint8_t *c = t->codes + src[j].row * K + gi * f->group;
			for (uint32_t k = 0; k < f->group; k++) {
				if (dot4 && !i4)
					codes[(size_t)(k / 4) * 64 + 4 * j + k % 4] =
					    (unsigned char)(c[k] ^ 0x80);
				else if (dot4)
					codes[(size_t)(k / 8) * 64 + 4 * j + k % 4] |=
					    (unsigned char)((c[k] & 15) << (4 * (k % 8 / 4)));
				else if (!i4)
					codes[(size_t)k * MOE_NR + j] = c[k];
				else
					codes[(size_t)(k / 2) * MOE_NR + j] |=
					    (unsigned char)((c[k] & 15) << (4 * (k & 1)));
			}
		}
	}
}

/* Up panels from quantized gate (NULL for mlp) and up tensors, rows in h's
 * order (rp). */
static void *pack_up_q(const struct moe_geom *g, uint32_t n_e, const struct moe_ref_qtensor *gate,
		       const struct moe_ref_qtensor *up, const int32_t *rp)
{
	uint64_t pb = g->up_bytes / g->up_panels;
	unsigned char *out = zalloc((size_t)n_e * g->up_bytes);
	if (!out)
		return NULL;
	for (uint32_t e = 0; e < n_e; e++)
		for (uint32_t p = 0; p < g->up_panels; p++) {
			struct qsrc src[MOE_NR] = {{0}};
			for (uint32_t j = 0; j < MOE_NR; j++) {
				uint32_t row =
				    g->glu ? p * (MOE_NR / 2) + j % (MOE_NR / 2) : p * MOE_NR + j;
				if (row >= g->width)
					continue;
				src[j].t = g->glu && j < MOE_NR / 2 ? gate : up;
				src[j].row = (uint64_t)e * g->width + h_row(rp, e, g->width, row);
			}
			pack_qpanel(&g->q_up, g->hidden, (int)g->dot4, src,
				    out + (size_t)e * g->up_bytes + (size_t)p * pb);
		}
	return out;
}

static void *pack_down_q(const struct moe_geom *g, uint32_t n_e, const struct moe_ref_qtensor *down)
{
	uint64_t pb = g->down_bytes / g->down_panels;
	unsigned char *out = zalloc((size_t)n_e * g->down_bytes);
	if (!out)
		return NULL;
	for (uint32_t e = 0; e < n_e; e++)
		for (uint32_t p = 0; p < g->down_panels; p++) {
			struct qsrc src[MOE_NR] = {{0}};
			for (uint32_t j = 0; j < MOE_NR; j++) {
				uint32_t row = p * MOE_NR + j;
				if (row >= g->hidden)
					continue;
				src[j].t = down;
				src[j].row = (uint64_t)e * g->hidden + row;
			}
			pack_qpanel(&g->q_down, g->width, (int)g->dot4, src,
				    out + (size_t)e * g->down_bytes + (size_t)p * pb);
		}
	return out;
}

/* One FFN's up and down panels, kept quantized where its geometry says;
 * act-order down codes (q[down].perm) order the up panels' rows. */
static int pack_ffn_panels(const struct moe_geom *g, uint32_t n_e, const struct moe_ref_weights *w,
			   enum moe_role gate, enum moe_role up, enum moe_role down,
			   enum moe_dtype t, void **pu, void **pd)
{
	const struct moe_ref_qtensor *q = w->q;
	const int32_t *rp = q[down].perm;
	int glu = g->glu;
	*pu = g->q_up.kind != MOE_QFORMAT_NONE
		  ? pack_up_q(g, n_e, glu ? &q[gate] : NULL, &q[up], rp)
		  : pack_up(g, n_e, glu ? w->w[gate] : NULL, w->w[up], t, rp);
	*pd = g->q_down.kind != MOE_QFORMAT_NONE ? pack_down_q(g, n_e, &q[down])
						 : pack_down(g, n_e, w->w[down], t);
	return *pu && *pd;
}

/* Per-expert bias vectors [n_e, n] padded to [n_e, ld], in h's order (rp;
 * NULL for the down bias). */
static float *pack_bias(const float *b, uint32_t n_e, uint32_t n, uint32_t ld, const int32_t *rp)
{
	float *out = zalloc((size_t)n_e * ld * sizeof *out);
	if (!out)
		return NULL;
	for (uint32_t e = 0; e < n_e; e++)
		for (uint32_t i = 0; i < n; i++)
			out[(size_t)e * ld + i] = b[(size_t)e * n + h_row(rp, e, n, i)];
	return out;
}

static float *copy_f32(const float *src, size_t n)
{
	float *out = zalloc(n * sizeof *out);
	if (out)
		memcpy(out, src, n * sizeof *out);
	return out;
}

float *moe_pack_router_panels(const float *w, uint32_t rows, uint32_t H)
{
	float *out = zalloc((size_t)moe_router_blocks(rows) * H * MOE_RB * sizeof(float));
	if (!out)
		return NULL;
	for (uint32_t e = 0; e < rows; e++)
		for (uint32_t h = 0; h < H; h++)
			out[(size_t)(e / MOE_RB) * H * MOE_RB + (size_t)h * MOE_RB + e % MOE_RB] =
			    w[(size_t)e * H + h];
	return out;
}

void moe_layer_w_free(struct moe_layer_w *lw)
{
	if (!lw)
		return;
	free(lw->router), free(lw->router_bias), free(lw->select_bias);
	free(lw->shared_gate_w), free(lw->up), free(lw->down), free(lw->up_perm);
	free(lw->bg), free(lw->bu), free(lw->bd), free(lw->s_up), free(lw->s_down),
	    free(lw->s_up_perm);
	free(lw->output_bias);
	free(lw->group_router), free(lw->noise);
	free(lw->pk_query), free(lw->pk_qbias), free(lw->pk_keys), free(lw->pk_u), free(lw->pk_v);
	free(lw->soft_slots);
	memset(lw, 0, sizeof *lw);
}

/* The routed and shared FFNs and the router (every mode but PEER). */
static enum moe_status pack_ffn(const struct moe_model *m, struct moe_ref_weights *w,
				struct moe_layer_w *out)
{
	const struct moe_desc *d = m->d;
	const struct moe_geom *rg = &m->routed, *sg = &m->shared;
	uint32_t E = d->n_experts, H = d->hidden, I = d->intermediate;
	enum moe_dtype t = d->weight_dtype;
	float *const *W = w->w;
	memset(out, 0, sizeof *out);

	/* router panels: [block][h][8] */
	uint32_t nb = moe_router_blocks(E);
	out->router = zalloc((size_t)nb * H * MOE_RB * sizeof(float));
	if (!out->router)
		goto nomem;
	for (uint32_t e = 0; W[MOE_ROLE_ROUTER] && e < E; e++) { /* soft: none */
		const float *r = W[MOE_ROLE_ROUTER] + (size_t)e * H;
		float *dst = out->router + (size_t)(e / MOE_RB) * H * MOE_RB + e % MOE_RB;
		for (uint32_t h = 0; h < H; h++)
			dst[(size_t)h * MOE_RB] = r[h];
	}
	if (d->router_bias && !(out->router_bias = copy_f32(W[MOE_ROLE_ROUTER_BIAS], E)))
		goto nomem;
	if (d->select_bias && !(out->select_bias = copy_f32(W[MOE_ROLE_SELECT_BIAS], E)))
		goto nomem;

	int glu = d->kind == MOE_KIND_GLU;
	if (!pack_ffn_panels(rg, E, w, MOE_ROLE_GATE, MOE_ROLE_UP, MOE_ROLE_DOWN, t, &out->up,
			     &out->down))
		goto nomem;
	const int32_t *up_perm =
	    w->q[MOE_ROLE_UP].perm ? w->q[MOE_ROLE_UP].perm : w->q[MOE_ROLE_GATE].perm;
	if (up_perm) {
		if (!(out->up_perm = malloc((size_t)E * H * sizeof *out->up_perm)))
			goto nomem;
		memcpy(out->up_perm, up_perm, (size_t)E * H * sizeof *out->up_perm);
	}
	if (d->expert_bias) {
		const int32_t *rp = w->q[MOE_ROLE_DOWN].perm;
		if (glu && !(out->bg = pack_bias(W[MOE_ROLE_GATE_BIAS], E, I, rg->ld_h, rp)))
			goto nomem;
		if (!(out->bu = pack_bias(W[MOE_ROLE_UP_BIAS], E, I, rg->ld_h, rp)))
			goto nomem;
		if (!(out->bd = pack_bias(W[MOE_ROLE_DOWN_BIAS], E, H, rg->ld_bias, NULL)))
			goto nomem;
	}
	/* research routers: hierarchical level 1, the learned noise projection */
	if (d->mode == MOE_MODE_HIERARCHICAL && W[MOE_ROLE_GROUP_ROUTER] &&
	    !(out->group_router =
		  moe_pack_router_panels(W[MOE_ROLE_GROUP_ROUTER], d->levels[0].groups, H)))
		goto nomem;
	if (d->noise == MOE_NOISE_LEARNED_GAUSSIAN && W[MOE_ROLE_NOISE] &&
	    !(out->noise = moe_pack_router_panels(W[MOE_ROLE_NOISE], E, H)))
		goto nomem;
	if (d->output_bias && !(out->output_bias = copy_f32(W[MOE_ROLE_OUTPUT_BIAS], H)))
		goto nomem;
	if (sg->width) {
		if (!pack_ffn_panels(sg, 1, w, MOE_ROLE_SHARED_GATE, MOE_ROLE_SHARED_UP,
				     MOE_ROLE_SHARED_DOWN, t, &out->s_up, &out->s_down))
			goto nomem;
		const int32_t *sp = w->q[MOE_ROLE_SHARED_UP].perm ? w->q[MOE_ROLE_SHARED_UP].perm
								  : w->q[MOE_ROLE_SHARED_GATE].perm;
		if (sp) {
			if (!(out->s_up_perm = malloc((size_t)H * sizeof *out->s_up_perm)))
				goto nomem;
			memcpy(out->s_up_perm, sp, (size_t)H * sizeof *out->s_up_perm);
		}
		if (d->shared_gate == MOE_SHARED_GATE_SIGMOID &&
		    !(out->shared_gate_w = copy_f32(W[MOE_ROLE_SHARED_EXPERT_GATE], H)))
			goto nomem;
	}
	return MOE_OK;
nomem:
	moe_layer_w_free(out);
	moe_set_error("out of memory packing the weights");
	return MOE_ERR_NOMEM;
}

/* Soft MoE: the FFNs, then the normalized slot parameters. */
static enum moe_status pack_soft(const struct moe_model *m, struct moe_ref_weights *w,
				 struct moe_layer_w *out)
{
	enum moe_status st = pack_ffn(m, w, out);
	if (st == MOE_OK && (st = moe_pack_soft(m, w, out)) != MOE_OK) {
		moe_layer_w_free(out);
		moe_set_error("out of memory packing the weights");
	}
	return st;
}

#define pack_peer moe_pack_peer
typedef enum moe_status pack_fn(const struct moe_model *m, struct moe_ref_weights *w,
				struct moe_layer_w *out);
/* The pack column of moe_modes.def. */
static pack_fn *const pack_mode[MOE_MODE_COUNT] = {
#define MOE_MODE(v, s, targets, family, pack) [MOE_MODE_##v] = pack_##pack,
#include "moe_modes.def"
#undef MOE_MODE
};

/* PEER's pack takes the caller's w, its own copy freed right after, so the f32
 * neuron tables move instead of being copied. */
enum moe_status moe_pack_layer(const struct moe_model *m, const struct moe_ref_weights *w,
			       struct moe_layer_w *out)
{
	return pack_mode[m->d->mode](m, (struct moe_ref_weights *)w, out);
}
