/* cuda_rt.h: the contract between the CUDA C that moegen generates
 * (compiler/cuda_emit.c) and the device runtime linked into model.so
 * (cuda_rt.c): tile sizes, packed-weight geometry, the argument block every
 * kernel receives, the embedded images, and the runtime's entry points. */
#ifndef MOE_CUDA_RT_H
#define MOE_CUDA_RT_H

#include <stddef.h>
#include <stdint.h>

#include "moe_desc.h"
#include "moe_ref.h"

#define MOE_CUDA_ABI 1

/* Grouped GEMM tile: rows (gathered token slots) x packed weight rows x K
 * step, 128 threads. The up GEMM's K (hidden) is padded to MOE_CUDA_BK, the
 * down GEMM's K (expert width) to MOE_CUDA_BN so h rows are whole tiles. */
#define MOE_CUDA_BM 64
#define MOE_CUDA_BN 64
#define MOE_CUDA_BK 32
#define MOE_CUDA_GEMM_THREADS 128
/* Router: logits are sums of fma chains over K chunks of this many columns,
 * in chunk order, in both router paths (batch invariance). */
#define MOE_CUDA_RCHUNK 32
/* At most this many tokens use the chunk-parallel router; more use the
 * tiled one. Both give bit-identical logits. */
#define MOE_CUDA_ROUTE_SMALL_T 32
#define MOE_CUDA_SELECT_THREADS 256
#define MOE_CUDA_COMBINE_THREADS 256

/* Packed weights of one FFN on the device (per expert, contiguous):
 * up   [up_rows][up_k]: GLU experts interleave gate and up by 8 rows
 *      (packed row r: block r/16, gate row 8*(r/16) + r%8 when r%16 < 8,
 *      else the up row), so one mma tile holds both halves of 8 outputs;
 *      MLP experts hold the up rows; zero past width and hidden;
 * down [down_rows][ld_h]: down rows (hidden) padded to BN, K padded to ld_h;
 * h    [rows][ld_h]: the activations between the two GEMMs. */
struct moe_cuda_geom {
	uint32_t hidden, width, glu;
	uint32_t ld_h;      /* width rounded up to BN */
	uint32_t up_rows;   /* 2 * ld_h (glu) or ld_h */
	uint32_t up_k;      /* hidden rounded up to BK */
	uint32_t down_rows; /* hidden rounded up to BN */
};

static inline uint32_t moe_cuda_round_up(uint32_t v, uint32_t m)
{
	return (v + m - 1) / m * m;
}

static inline void moe_cuda_geom_init(struct moe_cuda_geom *g, uint32_t hidden, uint32_t width,
				      int glu)
{
	g->hidden = hidden;
	g->width = width;
	g->glu = glu != 0;
	g->ld_h = moe_cuda_round_up(width, MOE_CUDA_BN);
	g->up_rows = g->glu ? 2 * g->ld_h : g->ld_h;
	g->up_k = moe_cuda_round_up(hidden, MOE_CUDA_BK);
	g->down_rows = moe_cuda_round_up(hidden, MOE_CUDA_BN);
}

/* Which optional kernels a description has; the emitter and the runtime
 * both decide with these. */
static inline int moe_cuda_has_capacity(const struct moe_desc *d)
{
	return d->mode == MOE_MODE_TOKEN_CHOICE && d->capacity != MOE_CAPACITY_NONE;
}

static inline int moe_cuda_norm_after_drop(const struct moe_desc *d)
{
	return moe_cuda_has_capacity(d) && d->capacity_norm_after_drop;
}

static inline int moe_cuda_has_shared(const struct moe_desc *d)
{
	return d->shared_count && d->shared_intermediate;
}

/* The router modes the CUDA runtime runs (the targets column of
 * runtime/core/moe_modes.def). */
static inline int moe_cuda_mode_ok(enum moe_mode m)
{
	return m == MOE_MODE_TOKEN_CHOICE || m == MOE_MODE_DENSE || m == MOE_MODE_TOP_P ||
	       m == MOE_MODE_SPARSEMIXER || m == MOE_MODE_HIERARCHICAL ||
	       m == MOE_MODE_EXPERT_CHOICE;
}

/* The router matrix on the device: the E router rows, then the G group-gate
 * rows (hierarchical), then the E noise rows (learned gaussian noise, used
 * in training mode only: inference computes the rows before them). */
static inline int moe_cuda_learned_noise(const struct moe_desc *d)
{
	return d->noise == MOE_NOISE_LEARNED_GAUSSIAN;
}

static inline uint32_t moe_cuda_group_row(const struct moe_desc *d)
{
	return d->n_experts;
}

static inline uint32_t moe_cuda_noise_row(const struct moe_desc *d)
{
	return d->n_experts + (d->mode == MOE_MODE_HIERARCHICAL ? d->levels[0].groups : 0);
}

static inline uint32_t moe_cuda_router_rows(const struct moe_desc *d)
{
	return moe_cuda_noise_row(d) + (moe_cuda_learned_noise(d) ? d->n_experts : 0);
}

/* The one argument of every forward kernel (passed by value). Pointers
 * first, then 64-bit integers, so host C and device C++ lay it out alike.
 * Workspace buffers are sized for T tokens, W = route width. */
struct moe_cuda_args {
	const void *x; /* [T, H] activation dtype */
	void *y;       /* [T, H] activation dtype */
	/* one layer's weights */
	const float *router;        /* [E, H] */
	const float *router_bias;   /* [E] */
	const float *select_bias;   /* [E] */
	const float *shared_gate_w; /* [H] */
	const void *up, *down;      /* packed, weight dtype */
	const float *bg, *bu;       /* [E, ld_h] */
	const float *bd;            /* [E, down_rows] */
	const void *s_up, *s_down;  /* shared FFN, packed */
	const float *output_bias;   /* [H] */
	/* workspace */
	float *partials;   /* [T, E, chunks] small-T router */
	uint32_t *done;    /* [T] small-T router: blocks finished, kept zero */
	float *logits;     /* [T, E] (bias included) */
	float *scores;     /* [T, E] */
	float *sel;        /* [T, E] selection scores (bias, group mask) */
	float *gscore;     /* [T, groups] */
	int32_t *ids;      /* [T, W] */
	float *wts;        /* [T, W] */
	float *prio;       /* [T] capacity priority */
	float *sgate;      /* [T] shared-expert gate */
	uint8_t *kept;     /* [T, W] capacity: slot kept */
	int32_t *order;    /* [T] tokens in priority order */
	uint32_t *mask;    /* [ceil(T/32), E] token bitmaps per 32-token block */
	int32_t *tbase;    /* [ceil(T/32), E] first grouped row of each block */
	int32_t *counts;   /* [E] */
	int32_t *offsets;  /* [E + 1] */
	int32_t *tstart;   /* [E + 1] first GEMM row tile of each expert */
	int32_t *rows;     /* [T * W] token of each grouped row */
	float *row_w;      /* [T * W] routing weight of each grouped row */
	int32_t *slot_row; /* [T * W] grouped row of each slot, -1: dropped */
	void *h;           /* [T * W, ld_h] */
	void *hs;          /* [T, ld_h shared] */
	float *o;          /* [T * W, H] weighted expert outputs */
	float *os;         /* [T, H] shared-expert output */
	float *xj;         /* [T, H] f32 the jittered input (training) */
	int64_t T;
	int64_t small;       /* 1: the router took the chunk-parallel path */
	int64_t capacity;    /* tokens per expert (capacity, expert choice) */
	int64_t training;    /* 1: training mode, the noise is drawn */
	int64_t seed, layer; /* the noise's counter (struct moe_fwd_opts) */
};

/* The argument of the pack kernel: canonical f32 rows x cols (a; with glu,
 * a = gate and b = up) -> packed dst_rows x dst_cols in the weight dtype. */
struct moe_cuda_pack_args {
	const float *a, *b;
	void *dst;
	int64_t rows, cols, dst_rows, dst_cols, glu;
};

/* One embedded device image. The generated images file repeats these two
 * definitions (it includes no header), so keep them plain. */
struct moe_cuda_image {
	const char *arch;          /* "sm_80": cubin; "compute_80": PTX */
	const unsigned char *data; /* PTX is NUL-terminated */
	unsigned long size;        /* bytes */
};

struct moe_cuda_gen {
	unsigned abi;        /* MOE_CUDA_ABI */
	unsigned desc_bytes; /* sizeof(struct moe_desc) when generated */
	const void *desc;    /* the resolved description, as bytes */
	const char *spec_hash;
	const char *source_name; /* the generated source's name */
	unsigned n_images;
	const struct moe_cuda_image *images;
};

/* Defined by the generated images file; weak in the runtime so a CPU-only
 * model.so links and loads. */
extern const struct moe_cuda_gen moe_cuda_gen_model;

/* The runtime side (cuda_rt.c). Messages go to err (cap bytes). No call
 * links against CUDA: libcuda.so.1 is opened with dlopen at first use
 * (MOE_LIBCUDA overrides the path). ----------------------------------- */

struct moe_cuda;

/* The generated images of this model.so, or NULL when it carries none. */
const struct moe_cuda_gen *moe_cuda_gen(void);

/* The image for a GPU of compute capability major.minor: the cubin of the
 * same major with the highest minor not above it (sm_XYa only on sm_XY),
 * else the newest PTX not above it; NULL when none runs there. */
const struct moe_cuda_image *moe_cuda_pick_image(const struct moe_cuda_gen *g, int major,
						 int minor);

/* Open the driver and count devices: MOE_OK, or MOE_ERR_DEVICE with "no CUDA
 * device: ..." (libcuda.so.1 not found, cuInit failed, no device). */
enum moe_status moe_cuda_probe(char *err, size_t cap);

/* Device state of one model: the primary context of device 0 (or the
 * context current on the calling thread), the modules loaded from the best
 * image for the device, per-layer weight slots. stream (CUstream, may be
 * NULL: the default stream) is where every forward runs. */
enum moe_status moe_cuda_create(const struct moe_cuda_gen *g, const struct moe_desc *d,
				void *stream, struct moe_cuda **out, char *err, size_t cap);
void moe_cuda_destroy(struct moe_cuda *c); /* NULL is a no-op */

/* Upload and pack (on the device) the canonical weights of MoE layer index
 * li (0 .. n_moe_layers-1), replacing what it held. */
enum moe_status moe_cuda_load_layer(struct moe_cuda *c, uint32_t li,
				    const struct moe_ref_weights *w, char *err, size_t cap);

/* Make the workspace hold T tokens (so a later forward allocates nothing,
 * e.g. before CUDA graph capture). */
enum moe_status moe_cuda_reserve(struct moe_cuda *c, size_t T, char *err, size_t cap);

/* y = MoE layer li of x; x and y are device pointers (activation dtype,
 * 16-byte aligned). Asynchronous on the model's stream unless routing is
 * wanted (then it synchronizes and fills it like the CPU path). training
 * with noise is refused (MOE_ERR_UNSUPPORTED). */
enum moe_status moe_cuda_forward(struct moe_cuda *c, uint32_t li, const void *x, void *y, size_t T,
				 struct moe_routing *rt, const struct moe_fwd_opts *opts, char *err,
				 size_t cap);

/* Device memory in the model's context, for tools and tests that need
 * device pointers for moe_cuda_forward. */
enum moe_status moe_cuda_mem_alloc(struct moe_cuda *c, size_t bytes, void **dptr, char *err,
				   size_t cap);
void moe_cuda_mem_free(struct moe_cuda *c, void *dptr);
/* to_device: host src -> device dst; else device src -> host dst. Waits for
 * the model's stream first. */
enum moe_status moe_cuda_memcpy(struct moe_cuda *c, void *dst, const void *src, size_t bytes,
				int to_device, char *err, size_t cap);
enum moe_status moe_cuda_sync(struct moe_cuda *c, char *err, size_t cap);
/* The image the model runs ("sm_90", "compute_80") and the GPU's compute
 * capability as major * 10 + minor. */
const char *moe_cuda_image_arch(const struct moe_cuda *c);
int moe_cuda_device_cc(const struct moe_cuda *c);

#endif
