/* moe_kernels.h: the contract between the code moegen generates for the CPU
 * and the runtime linked beside it: the packed weight layout, the signatures
 * of the generated tile functions and the table the generated object exports.
 * Both sides compute the geometry with moe_geom_init, so they cannot disagree. */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stdint.h>

#include "moe_desc.h"
#include "moe_ops.h"

#define MOE_KERNELS_ABI 9
#define MOE_VW 8  /* floats per vector (AVX2 ymm) */
#define MOE_MR 6  /* token rows per micro-tile */
#define MOE_NR 16 /* values per k in one weight panel: two vectors */
#define MOE_RB 8  /* router: expert columns per router panel */

/* Geometry of one FFN (the routed experts, or the fused shared experts).
 *
 * Up panels (gate and up projections, K = hidden): for GLU experts panel p
 * holds, for k = 0..hidden-1, gate rows 8p..8p+7 then up rows 8p..8p+7 at
 * column k (16 values), so one pass computes both halves and the activation
 * in registers; for MLP experts it holds up rows 16p..16p+15. Down panels
 * (K = width): panel p holds, for k = 0..width-1, down rows 16p..16p+15 at
 * column k. Rows past the end are zero. Elements have the weight dtype
 * (bf16/f16 stay 16-bit and are widened in registers). Every expert's panels
 * are contiguous: up_elems then (separately) down_elems per expert.
 *
 * bf16 panels pair the two vectors' lanes in 32-bit words (slot 2i: lane i of
 * the first vector, 2i+1: lane i of the second; moe_panel_slot): one 32-byte
 * load then a shift and a mask give both f32 vectors.
 *
 * bf16 compute (pairs = 1, the bf16 dot instructions) interleaves K in pairs
 * instead: for each k pair, the 16 columns' (k even, k odd) bf16 values, 32
 * values (64 bytes) per pair, K padded to even with zeros (moe_pair_index).
 * The panels are bf16 whatever the weight dtype. The up kernel then stores h
 * as bf16 (row r at the start of the f32 row r of the h buffer, ld_h bf16
 * values) for the down kernel to read in pairs. */
struct moe_geom {
	uint32_t hidden;      /* K of the up panels, N of the down panels */
	uint32_t width;       /* I: K of the down panels */
	uint32_t glu;         /* 1: gate and up interleaved */
	uint32_t up_cols;     /* h columns one up panel produces: 8 (glu) or 16 */
	uint32_t up_panels;   /* ceil(width / up_cols) */
	uint32_t ld_h;        /* row stride of the activation buffer h */
	uint32_t down_panels; /* ceil(hidden / 16) */
	uint32_t ld_bias;     /* padded length of down-bias vectors */
	uint64_t up_elems;    /* per expert: up_panels * hidden * 16 */
	uint64_t down_elems;  /* per expert: down_panels * width * 16 */
	uint32_t pairs;       /* 1: bf16 compute, K interleaved in pairs */
	uint32_t dot4;        /* 1: int8 compute, quantized codes in runs of 4 inputs */
	uint32_t elem_bytes;  /* bytes of one panel value (unquantized panels) */
	/* Kept-quantized panels (moe_geom_quant; kind none: elements as above).
	 * A panel of K inputs is K / group blocks, each: 16 f32 scales (one per
	 * column), for int4 16 f32 offsets, then the codes of its group inputs:
	 * int8 k-major rows of 16 signed bytes (byte j: column j); int4 16 bytes
	 * per pair of inputs (byte j: column j, input 2i in the low nibble, 2i + 1
	 * in the high one). With dot4 (int8 compute), 64 bytes per run: int8 per
	 * 4 inputs, byte 4j + i = code of input 4r + i, column j, plus 128 (an
	 * unsigned byte); int4 per 8 inputs, byte 4j + i holds input 8r + i in
	 * its low nibble and 8r + 4 + i in its high one. */
	struct moe_qfmt q_up, q_down;
	uint64_t up_bytes;   /* per expert */
	uint64_t down_bytes; /* per expert */
};

/* Bytes of one group block of a quantized panel. */
static inline uint64_t moe_qblock_bytes(const struct moe_qfmt *q)
{
	switch (q->kind) {
	case MOE_QFORMAT_INT4:
		return 2 * 64 + (uint64_t)q->group * 8;
	case MOE_QFORMAT_MXFP4:
		return 64 + (uint64_t)q->group * 8;
	default: /* one byte per code: int8, fp8 */
		return 64 + (uint64_t)q->group * MOE_NR;
	}
}

/* 1 when a format packs two codes per byte (int4, mxfp4). */
static inline int moe_qnibbles(const struct moe_qfmt *q)
{
	return q->kind == MOE_QFORMAT_INT4 || q->kind == MOE_QFORMAT_MXFP4;
}

/* The FFN geometry; pairs: bf16 compute (moe_gen.compute). */
static inline void moe_geom_init(struct moe_geom *g, uint32_t hidden, uint32_t width, int glu,
				 enum moe_dtype weights, int pairs)
{
	g->hidden = hidden;
	g->width = width;
	g->glu = glu != 0;
	g->up_cols = glu ? MOE_NR / 2 : MOE_NR;
	g->up_panels = (width + g->up_cols - 1) / g->up_cols;
	g->ld_h = g->up_panels * g->up_cols;
	g->down_panels = (hidden + MOE_NR - 1) / MOE_NR;
	g->ld_bias = g->down_panels * MOE_NR;
	g->pairs = pairs != 0;
	g->dot4 = 0;
	g->elem_bytes = pairs || weights != MOE_DTYPE_F32 ? 2 : 4;
	uint32_t ku = pairs ? hidden + (hidden & 1) : hidden,
		 kd = pairs ? width + (width & 1) : width;
	g->up_elems = (uint64_t)g->up_panels * ku * MOE_NR;
	g->down_elems = (uint64_t)g->down_panels * kd * MOE_NR;
	g->q_up = g->q_down = (struct moe_qfmt){MOE_QFORMAT_NONE, 0, 0};
	g->up_bytes = g->up_elems * g->elem_bytes;
	g->down_bytes = g->down_elems * g->elem_bytes;
}

/* Kept-quantized up and down panels (kind none leaves a side as it is). */
static inline void moe_geom_quant(struct moe_geom *g, const struct moe_qfmt *up,
				  const struct moe_qfmt *down)
{
	if (up->kind != MOE_QFORMAT_NONE) {
		g->q_up = *up;
		g->up_bytes =
		    (uint64_t)g->up_panels * (g->hidden / up->group) * moe_qblock_bytes(up);
	}
	if (down->kind != MOE_QFORMAT_NONE) {
		g->q_down = *down;
		g->down_bytes =
		    (uint64_t)g->down_panels * (g->width / down->group) * moe_qblock_bytes(down);
	}
}

/* The routed and (when there are shared experts, else zeroed) the shared FFN
 * geometry of a description for the FFNs' arithmetic c as resolved for the
 * target (auto: f32 panels). */
static inline void moe_geoms_init(const struct moe_desc *d, enum moe_compute c,
				  struct moe_geom *routed, struct moe_geom *shared)
{
	int pairs = c == MOE_COMPUTE_BF16;
	moe_geom_init(routed, d->hidden, d->intermediate, d->kind == MOE_KIND_GLU, d->weight_dtype,
		      pairs);
	moe_geom_quant(routed, &d->qfmt[MOE_QMAT_UP], &d->qfmt[MOE_QMAT_DOWN]);
	routed->dot4 = c == MOE_COMPUTE_INT8;
	uint32_t is = moe_desc_shared_width(d);
	*shared = (struct moe_geom){0};
	if (!is)
		return;
	moe_geom_init(shared, d->hidden, is, d->shared_kind == MOE_KIND_GLU, d->weight_dtype,
		      pairs);
	moe_geom_quant(shared, &d->qfmt[MOE_QMAT_SHARED_UP], &d->qfmt[MOE_QMAT_SHARED_DOWN]);
	shared->dot4 = c == MOE_COMPUTE_INT8;
}

/* bf16 compute: the index of (k, column j) in a panel of K (padded to even). */
static inline uint64_t moe_pair_index(uint32_t k, uint32_t j)
{
	return (uint64_t)(k / 2) * 2 * MOE_NR + 2 * j + k % 2;
}

/* Where value j (0..15: vector j / 8, lane j % 8) of one panel row lives. */
static inline uint32_t moe_panel_slot(enum moe_dtype t, uint32_t j)
{
	return t == MOE_DTYPE_BF16 ? 2 * (j % MOE_VW) + j / MOE_VW : j;
}

/* Router panels: expert columns in blocks of MOE_RB, [ceil(E/8)][hidden][8]
 * f32, padding experts zero. */
static inline uint32_t moe_router_blocks(uint32_t n_experts)
{
	return (n_experts + MOE_RB - 1) / MOE_RB;
}

/* The router for tokens [t0, t1): logits [T, E] (bias included), the chosen
 * expert ids and weights [T, route_width] (ranked; dense: all experts in
 * order), prio[T] (the selection score of the top choice: capacity priority)
 * and, when the shared experts are sigmoid-gated, sgate[T]. Pointers of roles
 * the description does not use may be NULL. */
typedef void moe_route_fn(const float *x, int64_t t0, int64_t t1, const float *router,
			  const float *router_bias, const float *select_bias,
			  const float *shared_gate_w, float *logits, int32_t *ids, float *weights,
			  float *sgate, float *prio);

/* Up tile: for rows r in [0, n) (token rows[r] of x) and up panels
 * [p0, p1): h[r, cols of p] = act(gate) * up, scaled by rw[r] (routed:
 * the routing weight, applied to the input or the output as the spec says;
 * shared: the sigmoid gate, or rw NULL). bg/bu: biases padded to ld_h, or
 * NULL when the experts have none. */
typedef void moe_up_fn(const float *x, const int32_t *rows, const float *rw, int64_t n,
		       const void *panels, const float *bg, const float *bu, float *h, int64_t p0,
		       int64_t p1);

/* Down tile: y[rows[r], cols of p] = h[r, :] . down for rows [0, n) and down
 * panels [p0, p1), K in a fixed order so every output element sees the same
 * arithmetic whatever the tile; then + rw[r] * bd (bias, padded to ld_bias;
 * rw NULL means 1). The routed DOWN writes (each of its output rows belongs to
 * one grouped row, summed later by the combine); SHARED_DOWN adds to y. */
typedef void moe_down_fn(const float *h, const int32_t *rows, const float *rw, int64_t n,
			 const void *panels, const float *bd, float *y, int64_t p0, int64_t p1);

/* The research routers (sparsemixer, hierarchical, token choice with learned
 * noise; compiler/cpu_llvm_research.c): moe_route_fn's outputs plus
 * prob[T, E], the router probability the statistics use. group: the
 * hierarchical level-1 router panels; noise: the noise projection panels (both
 * laid out like the router). The noise of (token t, expert e) is
 * moe_rng_normal(seed, layer, t, e) and is drawn only when training != 0. */
typedef void moe_route_x_fn(const float *x, int64_t t0, int64_t t1, const float *router,
			    const float *router_bias, const float *select_bias, const float *group,
			    const float *noise, uint64_t seed, uint64_t layer, int32_t training,
			    float *logits, int32_t *ids, float *weights, float *prob, float *prio);
/* Input jitter (training): xj = x * U(1 - eps, 1 + eps) for tokens [t0, t1),
 * U from moe_rng_hash(seed, layer, t, h). */
typedef void moe_jitter_fn(const float *x, float *xj, int64_t t0, int64_t t1, uint64_t seed,
			   uint64_t layer);
/* Expert choice (compiler/cpu_llvm_ecsoft.c): for experts [e0, e1), the top-C
 * tokens of score column e of weights[T, E] (route_x wrote the scores there):
 * ids[t, e] = e and weights[t, e] = S[t, e] * scale for the chosen, -1 for
 * the rest. pick: C int64 of scratch. */
typedef void moe_ec_select_fn(int64_t T, int64_t C, int64_t e0, int64_t e1, int32_t *ids,
			      float *weights, int64_t *pick);
/* PEER (compiler/cpu_llvm_peer.c). moe_pk_query: for tokens [t0, t1) and
 * query-row blocks [b0, b1), q[t, 8b .. 8b + 7] = the query rows of block b
 * (query: router-style panels of the heads * d rows, qbias padded to them)
 * times x_t plus the bias; q rows are moe_router_blocks(heads * d) * 8 long.
 * moe_pk_route: for tokens [t0, t1), per head the top_k of each half's
 * sub-key scores of q's query, the top_k of the k * k sums, scored: ids and
 * weights [T, heads * top_k]. keys: the sub-key sets as
 * [2][moe_pk_key_blocks(R)][d / 2][8] f32 panels, zero past R.
 * moe_pk_experts: y[t] = sum of w * act(u_e . x_t) * v_e over those slots, u
 * and v the [N, H] tables in the weight dtype (f32 or bf16). */
typedef void moe_pk_query_fn(const float *x, int64_t t0, int64_t t1, int64_t b0, int64_t b1,
			     const float *query, const float *qbias, float *q);
typedef void moe_pk_route_fn(const float *q, int64_t t0, int64_t t1, const float *keys,
			     int32_t *ids, float *weights);
typedef void moe_pk_experts_fn(const float *x, int64_t t0, int64_t t1, const int32_t *ids,
			       const float *weights, const void *u, const void *v, float *y);

/* Soft MoE (compiler/cpu_llvm_soft.c), S = E * slots_per_expert slots:
 * norm: l2-normalized rows [r0, r1) of [*, H]; logits: L[t, s] = scale *
 * xn_t . slot_s (slots: normalized, as panels [ceil(S / 16)][H][16],
 * moe_pack_soft); combine: per token softmax over slots; dispatch: per
 * slot softmax over the T tokens, stored Dt[S, T]; slot_in: the columns of
 * panels [p0, p1) (16 columns each) of xs[s] = sum_t Dt[s, t] x_t; out: y_t =
 * sum_s C[t, s] Y[s] (+ output bias). The three products are f32 fused
 * chains over their sum index ascending. */
typedef void moe_soft_norm_fn(const float *src, float *dst, int64_t r0, int64_t r1);
typedef void moe_soft_logits_fn(const float *xn, const float *slots, float scale, int64_t t0,
				int64_t t1, float *L);
typedef void moe_soft_combine_fn(const float *L, int64_t t0, int64_t t1, float *C);
typedef void moe_soft_dispatch_fn(const float *L, int64_t T, int64_t s0, int64_t s1, float *Dt);
typedef void moe_soft_slot_in_fn(const float *Dt, const float *x, int64_t T, int64_t p0, int64_t p1,
				 float *xs);
typedef void moe_soft_out_fn(const float *C, const float *Y, const float *bias, int64_t t0,
			     int64_t t1, float *y);

/* Sub-key panel blocks of R keys: ceil(R / 8) rounded up to the 4 (or fewer)
 * blocks the generated loop takes per pass. */
static inline uint32_t moe_pk_key_blocks(uint32_t R)
{
	uint32_t b = (R + MOE_VW - 1) / MOE_VW, u = b < 4 ? b : 4;
	return u ? (b + u - 1) / u * u : 0;
}

/* The generated kernels: value, field type. Every kernel is one function of
 * the object; which ones exist follows from the plan's ops. */
#define MOE_KERNELS(X)                                                                             \
	X(ROUTE, moe_route_fn)                                                                     \
	X(ROUTE_X, moe_route_x_fn)                                                                 \
	X(JITTER, moe_jitter_fn)                                                                   \
	X(UP, moe_up_fn)                                                                           \
	X(DOWN, moe_down_fn)                                                                       \
	X(SHARED_UP, moe_up_fn)                                                                    \
	X(SHARED_DOWN, moe_down_fn)                                                                \
	X(EC_SELECT, moe_ec_select_fn)                                                             \
	X(PK_QUERY, moe_pk_query_fn)                                                               \
	X(PK_ROUTE, moe_pk_route_fn)                                                               \
	X(PK_EXPERTS, moe_pk_experts_fn)                                                           \
	X(SOFT_NORM, moe_soft_norm_fn)                                                             \
	X(SOFT_LOGITS, moe_soft_logits_fn)                                                         \
	X(SOFT_COMBINE, moe_soft_combine_fn)                                                       \
	X(SOFT_DISPATCH, moe_soft_dispatch_fn)                                                     \
	X(SOFT_SLOT_IN, moe_soft_slot_in_fn)                                                       \
	X(SOFT_OUT, moe_soft_out_fn)

#define MOE_ENUM_X_MOE_KERNEL_(v, type) MOE_KERNEL_##v,
MOE_DEFINE_ENUM(moe_kernel, MOE_KERNEL_, MOE_KERNELS);

typedef void moe_kernel_fn(void);

/* What the generated object exports (hidden inside model.so): the
 * description, the plan's op list (enum moe_op values, in order) and the
 * kernels, indexed by enum moe_kernel (NULL where the plan needs none). */
struct moe_gen {
	uint32_t abi; /* MOE_KERNELS_ABI */
	uint32_t desc_bytes;
	const struct moe_desc *desc;
	const char *spec_hash; /* hex XXH3-128 of moe_desc_dump */
	const char *cpu;       /* CPU name the code was generated for */
	const char *triple;
	uint32_t compute; /* enum moe_compute as resolved for the target: F32, BF16 or INT8 */
	uint32_t n_ops;
	const uint8_t *ops;
	moe_kernel_fn *kernels[MOE_KERNEL_COUNT];
};

/* The kernel K of a model, as its own type: MOE_KERNEL(m, UP)(x, ...). */
#define MOE_KERNEL_TYPE_(K) MOE_KERNEL_TYPE_##K
#define MOE_KERNEL(m, K) ((MOE_KERNEL_TYPE_##K *)(m)->gen->kernels[MOE_KERNEL_##K])
#define MOE_KERNEL_TYPE_ROUTE moe_route_fn
#define MOE_KERNEL_TYPE_ROUTE_X moe_route_x_fn
#define MOE_KERNEL_TYPE_JITTER moe_jitter_fn
#define MOE_KERNEL_TYPE_UP moe_up_fn
#define MOE_KERNEL_TYPE_DOWN moe_down_fn
#define MOE_KERNEL_TYPE_SHARED_UP moe_up_fn
#define MOE_KERNEL_TYPE_SHARED_DOWN moe_down_fn
#define MOE_KERNEL_TYPE_EC_SELECT moe_ec_select_fn
#define MOE_KERNEL_TYPE_PK_QUERY moe_pk_query_fn
#define MOE_KERNEL_TYPE_PK_ROUTE moe_pk_route_fn
#define MOE_KERNEL_TYPE_PK_EXPERTS moe_pk_experts_fn
#define MOE_KERNEL_TYPE_SOFT_NORM moe_soft_norm_fn
#define MOE_KERNEL_TYPE_SOFT_LOGITS moe_soft_logits_fn
#define MOE_KERNEL_TYPE_SOFT_COMBINE moe_soft_combine_fn
#define MOE_KERNEL_TYPE_SOFT_DISPATCH moe_soft_dispatch_fn
#define MOE_KERNEL_TYPE_SOFT_SLOT_IN moe_soft_slot_in_fn
#define MOE_KERNEL_TYPE_SOFT_OUT moe_soft_out_fn

/* weak: a model.so built for cuda only has no CPU kernels */
extern const struct moe_gen moe_gen_model __attribute__((weak));
/* weak: the SVE vector length in bits the kernels were generated for, present
 * only in AArch64 code generated for a known length (moe_create checks it) */
extern const uint32_t moe_gen_sve_bits __attribute__((weak));

/* The runtime's side (moe.c, pack.c, exec_cpu.c) ---------------------------- */

#include <stdatomic.h>
#include <stddef.h>

#include "moe_ref.h"

/* One MoE layer's weights in the kernels' layout. */
struct moe_layer_w {
	float *router;        /* router panels, moe_router_blocks(E) * H * 8 */
	float *router_bias;   /* [E] */
	float *select_bias;   /* [E] */
	float *shared_gate_w; /* [H] */
	void *up, *down;      /* E * up_bytes, E * down_bytes */
	/* act-order up panels ([E, H]: their column k is input up_perm[e, k]; the
	 * rows reach the kernel gathered in that order), NULL when none */
	int32_t *up_perm;
	float *bg, *bu;      /* [E, ld_h] */
	float *bd;           /* [E, ld_bias] */
	void *s_up, *s_down; /* shared FFN panels */
	int32_t *s_up_perm;  /* [H] act-order shared up panels (as up_perm), or NULL */
	float *output_bias;  /* [H], added once after combining */
	float *group_router; /* hierarchical level 1, router panels of G rows */
	float *noise;        /* learned noise projection, router panels of E rows */
	float *pk_query, *pk_qbias, *pk_keys; /* PEER: see moe_pk_route_fn */
	void *pk_u, *pk_v;                    /* PEER: [N, H] neuron tables, weight dtype */
	float *soft_slots; /* Soft MoE: normalized slot parameters, panels [ceil(S/16)][H][16] */
	float soft_scale;
};

/* Per-call scratch, grown on demand. */
/* The workspace: the buffers of moe_workspace for cap_tokens tokens (grown,
 * never shrunk), then named by type. */
struct moe_ws {
	size_t cap_tokens;
	void *buf[MOE_BUF_COUNT]; /* NULL: not used by the plan's ops */
	float *xj, *logits, *prob, *wts, *sgate, *prio, *row_w, *h, *hs;
	int32_t *ids, *rows, *srows;
	int64_t *counts, *offsets;
	uint8_t *kept;
	float *soft_xn, *soft_c, *soft_d, *soft_xs, *soft_y;
	int64_t *slot_row;
	int32_t *drows;
	float *rows_y;
	/* act-order: the up input rows gathered per expert ([xp_rows, H]) and
	 * the identity rows over them; grown on demand */
	float *xp;
	int32_t *xp_id;
	size_t xp_rows;
	/* act-order shared up: the T input rows in its input order; grown on demand */
	float *xsp;
	size_t xsp_rows;
};

struct moe_pool;

struct moe_model {
	const struct moe_gen *gen;
	const struct moe_desc *d;
	struct moe_geom routed, shared; /* shared.width == 0: none */
	struct moe_pool *pool;
	struct moe_layer_w *layers; /* d->n_moe_layers */
	int loaded;
	atomic_int busy;
	struct moe_cuda *cuda; /* device state when created for MOE_DEVICE_CUDA */
	uint32_t e0, e1;       /* the routed experts it holds: [e0, e1) */
	uint32_t l0, l1;       /* the model layers it holds: [l0, l1) */
	struct moe_ws ws;
};

/* pack.c: canonical f32 weights of one layer -> the kernels' layout. Frees
 * what it allocated on failure. */
enum moe_status moe_pack_layer(const struct moe_model *m, const struct moe_ref_weights *w,
			       struct moe_layer_w *out);
void moe_layer_w_free(struct moe_layer_w *lw);
size_t moe_dtype_size(enum moe_dtype t);

/* exec.c: the executor. One forward walks m->gen->ops; each op is a row of
 * moe_op_execs. begin runs serially before the op's dispatch (SERIAL ops: it
 * is the op); run does one block: tokens, slots or experts [a, b), output
 * panels [a, b) for COLUMNS, or tile a for TILES. */
struct moe_tile {
	uint8_t op; /* the TILES op it belongs to */
	int32_t e;  /* expert (-1: the shared FFN) */
	uint32_t p0, p1;
	int64_t r0, r1;
};

/* The rows the routed FFN runs over: gathered token rows (token choice) or
 * the Soft MoE slots. */
struct moe_ffn_rows {
	const float *in; /* [*, H] rows gathered through rows[] */
	float *out;      /* [out_rows, H] the down tiles' output, written by them */
	size_t out_rows;
	const int32_t *rows;
	const int32_t *in_rows; /* the up tiles' input row of each row (NULL: rows) */
	const int32_t *out_map; /* the down tiles' output row of each row (NULL: rows) */
	const float *row_w;
	const int64_t *counts, *offsets; /* per expert */
	float *h;                        /* [rows, ld_h] */
};

struct moe_exec {
	struct moe_model *m;
	const struct moe_layer_w *lw;
	const struct moe_desc *d;
	const float *x;    /* the layer input as the ops see it (jittered in training) */
	const float *x_in; /* the caller's input */
	const float *s_x;  /* the shared up's input rows: x, or x in act order */
	float *y;
	size_t T;
	struct moe_routing *rt;
	struct moe_fwd_opts fwd;
	struct moe_ffn_rows ffn;
	/* the combine: y[t] = sum over slots k in order of w[t, k] * ry[slot_row[t, k]]
	 * (slot_row NULL: row t * W + k; a slot with id < 0 or row < 0 adds nothing;
	 * unit_w: every weight is 1, the routing weight scaled the input) */
	const float *c_ry;
	const int64_t *c_slot_row;
	const int32_t *c_ids;
	const float *c_w;
	int c_unit_w;
	int32_t *srows; /* the shared FFN's rows: 0..T-1 */
	int kept_set;   /* the capacity op marked ws.kept */
	int64_t n_dropped;
	int64_t *pass_t; /* passthrough: token and weight of each dropped slot */
	float *pass_w;
	size_t n_pass;
	float *xj;
	int64_t ec_C, *ec_pick;
	size_t n_slots;         /* Soft MoE: S */
	struct moe_soft *soft;  /* exec_soft.c */
	struct moe_tile *tiles; /* the current TILES dispatch */
	size_t n_tiles, cap_tiles;
	void *scratch[16]; /* freed after the forward */
	size_t n_scratch;
};

struct moe_op_exec {
	uint32_t block; /* TOKENS, SLOTS, EXPERTS: items per task */
	enum moe_status (*begin)(struct moe_exec *x);
	void (*run)(struct moe_exec *x, int64_t a, int64_t b, unsigned thread);
};
extern const struct moe_op_exec moe_op_execs[MOE_OP_COUNT];

/* One forward on f32 activations (checked by the caller). */
enum moe_status moe_exec_forward(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
				 float *y, size_t T, struct moe_routing *rt,
				 const struct moe_fwd_opts *opts);
/* The stages of the forward, each the ops of the plan that belong to it (the
 * forward runs them all, in plan order, with the same arithmetic): the
 * router into ids and weights [T, W]; the experts over rows grouped by expert
 * (counts[E], rows_w: the routing weight of each row where it scales the
 * input, else NULL) into rows_y; the combine of slot outputs (slot_row NULL:
 * rows_y is [T, W, H] in slot order), the shared FFN and the output bias.
 * The route adds the sums of the statistics into acc when it is not NULL. */
enum moe_status moe_exec_route(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
			       size_t T, int32_t *ids, float *w, const struct moe_fwd_opts *opts,
			       struct moe_route_sums *acc);
enum moe_status moe_exec_experts(struct moe_model *m, const struct moe_layer_w *lw,
				 const float *rows_x, size_t n_rows, const int64_t *counts,
				 const float *rows_w, float *rows_y);
enum moe_status moe_exec_combine(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
				 size_t T, const int32_t *ids, const float *w, const float *rows_y,
				 const int64_t *slot_row, float *y);
void moe_ws_free(struct moe_ws *ws);
int moe_gen_has_op(const struct moe_gen *g, enum moe_op op);
/* 64-byte aligned scratch freed after the forward; NULL when out of memory. */
void *moe_exec_alloc(struct moe_exec *x, size_t bytes);
/* The load-balancing statistics from per-expert importance and load. */
void moe_routing_losses(const struct moe_desc *d, const double *imp, const double *load, size_t T,
			double zsum, struct moe_routing *rt);

/* exec_peer.c: PEER's ops, and its packing (f32 neuron tables are moved out
 * of w, not copied). */
#define MOE_PEER_TOKENS_PER_TASK 8
/* Append one tile to the task list of the current TILES dispatch. */
enum moe_status moe_exec_add_tile(struct moe_exec *x, const struct moe_tile *t);
enum moe_status moe_begin_pk_query(struct moe_exec *x);
void moe_run_pk_query(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread);
void moe_run_pk_route(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread);
void moe_run_pk_experts(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread);
enum moe_status moe_begin_pk_stats(struct moe_exec *x);
enum moe_status moe_pack_peer(const struct moe_model *m, struct moe_ref_weights *w,
			      struct moe_layer_w *out);

/* exec_soft.c: Soft MoE's ops, and the packing of its slot parameters
 * (normalized by the generated moe_soft_norm). */
#define MOE_SOFT_TOKENS_PER_TASK 32
#define MOE_SOFT_SLOTS_PER_TASK 4
enum moe_status moe_begin_soft_logits(struct moe_exec *x);
void moe_run_soft_logits(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread);
void moe_run_soft_combine(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread);
void moe_run_soft_dispatch(struct moe_exec *x, int64_t s0, int64_t s1, unsigned thread);
void moe_run_soft_slot_in(struct moe_exec *x, int64_t p0, int64_t p1, unsigned thread);
enum moe_status moe_begin_soft_slots(struct moe_exec *x);
void moe_run_soft_out(struct moe_exec *x, int64_t t0, int64_t t1, unsigned thread);
enum moe_status moe_begin_soft_stats(struct moe_exec *x);
enum moe_status moe_pack_soft(const struct moe_model *m, const struct moe_ref_weights *w,
			      struct moe_layer_w *out);
/* pack.c: router-style panels [ceil(rows/8)][H][8] of a [rows, H] tensor. */
float *moe_pack_router_panels(const float *w, uint32_t rows, uint32_t H);

/* moe.c: the thread's last error. */
void moe_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
