/* moe.c: the public ABI of every model.so (moe.h) over the generated kernels
 * (moe_gen_model, moe_kernels.h): metadata, create/destroy, weights (random or
 * safetensors, packed once), argument checks and the forward call. Nothing
 * here aborts on bad input: every failure is a status and a message. */
#include "moe.h"
#include "cuda_rt.h"
#include "dequant.h"
#include "gguf.h"
#include "moe_kernels.h"
#include "pool.h"
#include "progress.h"
#include "ref_quant.h"
#include "safetensors.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/prctl.h>
#endif

#define MOE_API __attribute__((visibility("default")))

static _Thread_local char last_error[1024];

void moe_set_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(last_error, sizeof last_error, fmt, ap);
	va_end(ap);
}

MOE_API const char *moe_last_error(void)
{
	return last_error;
}

static struct moe_info info;
static const struct moe_desc *info_desc; /* behind moe_info() and moe_describe() */
static pthread_once_t info_once = PTHREAD_ONCE_INIT;

static void info_init(void)
{
	const struct moe_gen *g = &moe_gen_model; /* NULL: built for cuda only */
	const struct moe_cuda_gen *cg = moe_cuda_gen();
	const struct moe_desc *d = g ? g->desc : (const struct moe_desc *)cg->desc;
	info_desc = d;
	info.size = sizeof info;
	info.abi_version = MOE_ABI_VERSION;
	info.name = d->name;
	info.spec_hash = g ? g->spec_hash : cg->spec_hash;
	info.hidden = d->hidden;
	info.intermediate = d->intermediate;
	info.n_experts = d->n_experts;
	info.top_k = d->top_k;
	info.route_width = moe_desc_route_width(d);
	info.n_shared_experts = d->shared_count;
	info.shared_intermediate = d->shared_count ? d->shared_intermediate : 0;
	info.n_layers = d->n_layers;
	info.n_moe_layers = d->n_moe_layers;
	info.weight_dtype = d->weight_dtype;
	info.act_dtype = d->act_dtype;
	info.targets = (g ? 1u << MOE_DEVICE_CPU : 0) | (cg ? 1u << MOE_DEVICE_CUDA : 0);
	info.moe_layers = d->moe_layers;
	info.cpu = g ? g->cpu : "";
}

MOE_API const struct moe_info *moe_info(void)
{
	pthread_once(&info_once, info_init);
	return &info;
}

MOE_API size_t moe_describe(char *buf, size_t cap)
{
	pthread_once(&info_once, info_init);
	return moe_desc_dump(info_desc, buf, buf ? cap : 0);
}

MOE_API enum moe_status moe_create(moe_model **out, const struct moe_create_opts *opts)
{
	if (!out) {
		moe_set_error("moe_create: the output handle pointer is NULL");
		return MOE_ERR_ARG;
	}
	*out = NULL;
	pthread_once(&info_once, info_init);
	uint32_t E = info_desc->n_experts;
	uint32_t e0 = opts ? opts->expert_begin : 0,
		 e1 = opts && opts->expert_end ? opts->expert_end : E;
	if (e0 >= e1 || e1 > E) {
		moe_set_error("moe_create: expert range [%u, %u) is not a non-empty part of the %u "
			      "experts",
			      e0, e1, E);
		return MOE_ERR_ARG;
	}
	const struct moe_desc *dd = info_desc;
	uint32_t l0 = opts ? opts->layer_begin : 0,
		 l1 = opts && opts->layer_end ? opts->layer_end : dd->n_layers;
	uint32_t held = 0;
	for (uint32_t i = 0; i < dd->n_moe_layers; i++)
		held += dd->moe_layers[i] >= l0 && dd->moe_layers[i] < l1;
	if (l0 >= l1 || l1 > dd->n_layers || !held) {
		moe_set_error("moe_create: layer range [%u, %u) is not a part of the %u layers "
			      "that holds an MoE layer",
			      l0, l1, dd->n_layers);
		return MOE_ERR_ARG;
	}
	if (opts && opts->device == MOE_DEVICE_CUDA && (e0 || e1 != E)) {
		moe_set_error(
		    "moe_create: an expert range is not supported on the cuda device yet");
		return MOE_ERR_UNSUPPORTED;
	}
	if (opts && opts->device == MOE_DEVICE_CUDA && (l0 || l1 != dd->n_layers)) {
		moe_set_error("moe_create: a layer range is not supported on the cuda device yet");
		return MOE_ERR_UNSUPPORTED;
	}
	if (opts && opts->device == MOE_DEVICE_CUDA) {
		pthread_once(&info_once, info_init);
		struct moe_model *m = calloc(1, sizeof *m);
		char err[1024];
		if (!m) {
			moe_set_error("moe_create: out of memory");
			return MOE_ERR_NOMEM;
		}
		m->d = info_desc;
		m->layers = NULL;
		m->e0 = 0;
		m->e1 = E;
		m->l0 = 0;
		m->l1 = m->d->n_layers;
		enum moe_status st =
		    moe_cuda_create(moe_cuda_gen(), m->d, opts->stream, &m->cuda, err, sizeof err);
		if (st != MOE_OK) {
			moe_set_error("moe_create: %s", err);
			free(m);
			return st;
		}
		atomic_init(&m->busy, 0);
		*out = m;
		return MOE_OK;
	}
	const struct moe_gen *g = &moe_gen_model;
	if (!g) {
		moe_set_error("moe_create: this model.so was built for cuda only (targets: cuda)");
		return MOE_ERR_DEVICE;
	}
	if (g->abi != MOE_KERNELS_ABI || g->desc_bytes != sizeof(struct moe_desc) ||
	    g->desc->version != MOE_DESC_VERSION) {
		moe_set_error("moe_create: the generated kernels (abi %u, %u-byte description) do "
			      "not match this runtime (abi %u, %zu bytes)",
			      g->abi, g->desc_bytes, MOE_KERNELS_ABI, sizeof(struct moe_desc));
		return MOE_ERR_INTERNAL;
	}
	const uint32_t *sve = &moe_gen_sve_bits; /* NULL: no fixed SVE length */
	if (sve && *sve) {
		unsigned bits = 0;
#if defined(__aarch64__) && defined(__linux__)
		int vl = prctl(PR_SVE_GET_VL);
		bits = vl < 0 ? 0 : (unsigned)(vl & PR_SVE_VL_LEN_MASK) * 8;
#endif
		if (bits != *sve) {
			char has[32] = "no SVE";
			if (bits)
				snprintf(has, sizeof has, "%u-bit SVE vectors", bits);
			moe_set_error("moe_create: the kernels were generated for %u-bit SVE "
				      "vectors and this process has %s (compile for its length "
				      "with --sve-bits, or --sve-bits 0 for NEON)",
				      *sve, has);
			return MOE_ERR_UNSUPPORTED;
		}
	}
	if (opts && opts->device != MOE_DEVICE_CPU) {
		moe_set_error("moe_create: unknown device %d", (int)opts->device);
		return MOE_ERR_ARG;
	}
	struct moe_model *m = calloc(1, sizeof *m);
	if (!m) {
		moe_set_error("moe_create: out of memory");
		return MOE_ERR_NOMEM;
	}
	m->gen = g;
	m->d = g->desc;
	m->e0 = e0;
	m->e1 = e1;
	m->l0 = l0;
	m->l1 = l1;
	moe_geoms_init(m->d, (enum moe_compute)g->compute, &m->routed, &m->shared);
	m->layers = calloc(m->d->n_moe_layers ? m->d->n_moe_layers : 1, sizeof *m->layers);
	m->pool = moe_pool_create(opts ? opts->threads : 0);
	if (!m->layers || !m->pool) {
		moe_set_error("moe_create: cannot start %u threads or out of memory",
			      opts ? opts->threads : 0);
		moe_destroy(m);
		return MOE_ERR_NOMEM;
	}
	atomic_init(&m->busy, 0);
	*out = m;
	return MOE_OK;
}

MOE_API void moe_destroy(moe_model *m)
{
	if (!m)
		return;
	moe_cuda_destroy(m->cuda);
	if (m->layers)
		for (uint32_t i = 0; i < m->d->n_moe_layers; i++)
			moe_layer_w_free(&m->layers[i]);
	free(m->layers);
	moe_pool_destroy(m->pool);
	moe_ws_free(&m->ws);
	free(m);
}

/* Take the model for one call, or refuse: one forward or load at a time. */
static int acquire(moe_model *m, const char *what)
{
	int expect = 0;
	if (!atomic_compare_exchange_strong(&m->busy, &expect, 1)) {
		moe_set_error("%s: the model is busy in another thread (one call at a time per "
			      "model; create one model per thread)",
			      what);
		return 0;
	}
	return 1;
}

static void release(moe_model *m)
{
	atomic_store(&m->busy, 0);
}

/* Whether the model holds MoE layer i (an index into moe_layers). */
static int holds(const moe_model *m, uint32_t i)
{
	return m->d->moe_layers[i] >= m->l0 && m->d->moe_layers[i] < m->l1;
}

static void free_layers(moe_model *m)
{
	for (uint32_t i = 0; m->layers && i < m->d->n_moe_layers; i++)
		moe_layer_w_free(&m->layers[i]);
	m->loaded = 0;
}

/* One layer's canonical weights into the model: packed for the CPU kernels,
 * or uploaded and packed on the device. */
static enum moe_status put_layer(moe_model *m, uint32_t i, const struct moe_ref_weights *w)
{
	if (!m->cuda)
		return moe_pack_layer(m, w, &m->layers[i]);
	char err[1024];
	enum moe_status st = moe_cuda_load_layer(m->cuda, i, w, err, sizeof err);
	if (st != MOE_OK)
		moe_set_error("loading layer %u on the device: %s", m->d->moe_layers[i], err);
	return st;
}

/* The MoE layers the model holds: the total of a progress line. */
static size_t n_held(const moe_model *m)
{
	size_t n = 0;
	for (uint32_t i = 0; i < m->d->n_moe_layers; i++)
		n += (size_t)holds(m, i);
	return n;
}

static void progress_layer(struct moe_progress *p, const moe_model *m, size_t done, uint32_t i)
{
	char item[48];
	snprintf(item, sizeof item, "(layer %u)", m->d->moe_layers[i]);
	moe_progress_step(p, done, n_held(m), item);
}

struct random_fill {
	const struct moe_desc *d;
	uint64_t seed;
	uint32_t layer;
	struct moe_ref_weights *w;
};

static void random_block(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct random_fill *f = ctx;
	moe_ref_weights_random_block(f->d, f->seed, f->layer, f->w, task);
}

static void random_qblock(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	const struct random_fill *f = ctx;
	moe_ref_quant_random_block(f->d, f->seed, f->layer, f->w, task);
}

MOE_API enum moe_status moe_init_random(moe_model *m, uint64_t seed)
{
	if (!m) {
		moe_set_error("moe_init_random: model is NULL");
		return MOE_ERR_ARG;
	}
	if (!acquire(m, "moe_init_random"))
		return MOE_ERR_BUSY;
	free_layers(m);
	enum moe_status st = MOE_OK;
	struct moe_progress pr;
	size_t done = 0;
	moe_progress_begin(&pr, "random weights");
	for (uint32_t i = 0; i < m->d->n_moe_layers && st == MOE_OK; i++) {
		if (!holds(m, i))
			continue;
		progress_layer(&pr, m, done, i);
		struct moe_ref_weights w;
		st = moe_ref_weights_alloc(m->d, &w);
		if (st != MOE_OK) {
			moe_set_error("moe_init_random: out of memory for layer %u",
				      m->d->moe_layers[i]);
			break;
		}
		/* each element is a function of (seed, layer, role, index) alone, so
		 * the blocks fill the same values on any number of threads */
		struct random_fill f = {m->d, seed, m->d->moe_layers[i], &w};
		size_t nb = moe_ref_weights_random_blocks(m->d);
		if (m->pool)
			moe_pool_run(m->pool, nb, random_block, &f);
		else
			for (size_t b = 0; b < nb; b++)
				random_block(&f, b, 0);
		size_t nq = moe_ref_quant_random_blocks(m->d);
		if (m->pool)
			moe_pool_run(m->pool, nq, random_qblock, &f);
		else
			for (size_t b = 0; b < nq; b++)
				random_qblock(&f, b, 0);
		st = put_layer(m, i, &w);
		moe_ref_weights_free(&w);
		done++;
	}
	if (st == MOE_OK) {
		m->loaded = 1;
		moe_progress_step(&pr, done, done, NULL);
	} else {
		free_layers(m);
	}
	moe_progress_end(&pr);
	release(m);
	return st;
}

/* Checkpoints ---------------------------------------------------------------- */

/* Read one canonical role of one layer from the set into w (f32), applying
 * the on-disk layout: per-expert names or one stacked tensor, out_in or
 * in_out orientation, fused gate_up (concat / interleave), row-blocked. */
struct st_ctx {
	const struct moe_desc *d;
	struct moe_st_set *set;
	uint32_t layer;
	uint32_t e0, e1; /* the experts the model holds: others are not read */
	int unsupported;
	/* a role kept quantized (moe_desc.qfmt): read_quant also puts its codes
	 * and scales in qt, from row qrow0 on (NULL: only the f32 values) */
	struct moe_ref_qtensor *qt;
	uint64_t qrow0;
	int fused; /* reading a fused gate_up tensor (no act-order there) */
	char err[1024];
};

static const struct moe_st_tensor *find(struct st_ctx *c, enum moe_role role, long expert,
					char *name, size_t cap)
{
	const char *tmpl = c->d->names[role];
	if (moe_st_expand(tmpl, c->layer, expert, name, cap, c->err, sizeof c->err) != MOE_OK)
		return NULL;
	const struct moe_st_tensor *t = moe_st_set_find(c->set, name);
	if (!t)
		snprintf(c->err, sizeof c->err, "tensor '%s' (%s, layer %u) not found", name,
			 moe_role_names[role], c->layer);
	return t;
}

/* Copy src (rows x cols as stored: out_in = [R, C], in_out = [C, R]) into
 * dst [R, C]. */
static void orient_copy(const float *src, float *dst, uint64_t R, uint64_t C, int in_out)
{
	if (!in_out) {
		memcpy(dst, src, R * C * sizeof *dst);
		return;
	}
	for (uint64_t c = 0; c < C; c++)
		for (uint64_t r = 0; r < R; r++)
			dst[r * C + c] = src[c * R + r];
}

/* Vector roles are stored 1-D ([C], a fused bias [2C]; one not stacked may
 * also be a row, [1, C]); every other role is a matrix, 2-D even with one
 * row (nn.Linear(H, 1).weight is [1, H]). */
static int is_vector(enum moe_role r)
{
	switch (r) {
	case MOE_ROLE_ROUTER_BIAS:
	case MOE_ROLE_SELECT_BIAS:
	case MOE_ROLE_GATE_BIAS:
	case MOE_ROLE_UP_BIAS:
	case MOE_ROLE_DOWN_BIAS:
	case MOE_ROLE_GATE_UP_BIAS:
	case MOE_ROLE_PK_QUERY_BIAS:
	case MOE_ROLE_OUTPUT_BIAS:
	case MOE_ROLE_SOFT_SCALE:
	case MOE_ROLE_PK_BN_WEIGHT:
	case MOE_ROLE_PK_BN_BIAS:
	case MOE_ROLE_PK_BN_MEAN:
	case MOE_ROLE_PK_BN_VAR:
	case MOE_ROLE_SOFT_GAMMA:
		return 1;
	default:
		return 0;
	}
}

/* "[2, 3, 4]" */
static void dims_str(const uint64_t *s, uint32_t nd, char *buf, size_t cap)
{
	size_t len = 0;
	buf[0] = 0;
	for (uint32_t i = 0; i <= nd && len < cap; i++) {
		int k = i == nd ? snprintf(buf + len, cap - len, "]")
				: snprintf(buf + len, cap - len, "%s%llu", i ? ", " : "[",
					   (unsigned long long)s[i]);
		len += k > 0 ? (size_t)k : 0;
	}
	if (!nd)
		snprintf(buf, cap, "[]");
}

/* The expected on-disk shape: dims (nd of them) for one matrix, with a
 * leading n_e axis when stacked, or the first axis times n_e when
 * row_blocked. Returns the rank. */
static uint32_t stored_shape(uint64_t *out, const uint64_t *dims, uint32_t nd, int stacked,
			     int row_blocked, uint64_t n_e)
{
	uint32_t k = 0;
	if (stacked && !row_blocked)
		out[k++] = n_e;
	for (uint32_t i = 0; i < nd; i++)
		out[k++] = dims[i] * (stacked && row_blocked && i == 0 ? n_e : 1);
	return k;
}

/* The tensor's full shape must be want (or alt, when alt_nd is not 0). */
static int check_shape(struct st_ctx *c, const struct moe_st_tensor *t, const char *what,
		       enum moe_role role, const uint64_t *want, uint32_t nd, const uint64_t *alt,
		       uint32_t alt_nd)
{
	int ok = t->ndim == nd && memcmp(t->shape, want, nd * sizeof *want) == 0;
	if (!ok && alt_nd)
		ok = t->ndim == alt_nd && memcmp(t->shape, alt, alt_nd * sizeof *alt) == 0;
	if (ok)
		return 0;
	char w[160], a[160], f[160];
	dims_str(want, nd, w, sizeof w);
	dims_str(alt, alt_nd, a, sizeof a);
	dims_str(t->shape, t->ndim, f, sizeof f);
	const struct moe_layout *l = &c->d->layouts[role];
	snprintf(c->err, sizeof c->err,
		 "%s: %s '%s' (%s, layer %u, orient %s%s): expected shape %s%s%s, found %s",
		 t->file ? t->file : "(memory)", what, t->name, moe_role_names[role], c->layer,
		 moe_orient_names[l->orient], l->row_blocked ? ", row_blocked" : "", w,
		 alt_nd ? " or " : "", alt_nd ? a : "", f);
	return -1;
}

/* A quantized role (layouts[role].quant): t holds n_e matrices of SR x SC as
 * stored, e4m3 (fp8_block) or packed E2M1 (mxfp4), with the scale tensor
 * named by scale_names[role] for the same layer and expert. Dequantized to
 * f32 in the stored order into out (n_e * SR * SC floats). */
/* The codes and scales of n_e [SR, SC] fp8_block or mxfp4 matrices as read
 * (q; fp8: sf [gr, gc] per matrix, mxfp4: su [SR, SC / 32]) into the kept
 * tensor c->qt from row c->qrow0: e4m3 bytes as they are, E2M1 one code per
 * byte, one f32 scale per (row, group) — the fp8 tile's scale repeated over
 * its rows, 2^(E8M0 - 127) for mxfp4. The group is the tile's width for fp8
 * (checked before loading) and 32 for mxfp4. */
static void keep_codes(struct st_ctx *c, int fp8, const uint8_t *q, const float *sf,
		       const uint8_t *su, uint64_t n_e, uint64_t SR, uint64_t SC, uint64_t gr,
		       uint64_t gc, uint64_t b0)
{
	struct moe_ref_qtensor *qt = c->qt;
	uint64_t G = fp8 ? SC / gc : 32, ng = SC / G;
	for (uint64_t e = 0; e < n_e; e++)
		for (uint64_t r = 0; r < SR; r++) {
			uint64_t row = c->qrow0 + e * SR + r;
			uint8_t *dst = qt->codes + row * SC;
			if (fp8) {
				memcpy(dst, q + (e * SR + r) * SC, SC);
			} else {
				const uint8_t *src = q + (e * SR + r) * SC / 2;
				for (uint64_t k = 0; k < SC; k += 2) {
					dst[k] = src[k / 2] & 15;
					dst[k + 1] = src[k / 2] >> 4;
				}
			}
			for (uint64_t g = 0; g < ng; g++)
				qt->scale[row * ng + g] =
				    fp8 ? sf[e * gr * gc + (r / b0) * gc + g]
					: ldexpf(1.0f, (int)su[(e * SR + r) * ng + g] - 127);
		}
}

static int read_quant(struct st_ctx *c, const struct moe_st_tensor *t, const char *name,
		      enum moe_role role, long expert, uint64_t n_e, uint64_t SR, uint64_t SC,
		      int stacked, float *out)
{
	const struct moe_layout *l = &c->d->layouts[role];
	int fp8 = l->quant == MOE_QUANT_FP8_BLOCK;
	char sname[MOE_NAME_MAX * 2];
	if (moe_st_expand(c->d->scale_names[role], c->layer, expert, sname, sizeof sname, c->err,
			  sizeof c->err) != MOE_OK)
		return -1;
	const struct moe_st_tensor *s = moe_st_set_find(c->set, sname);
	if (!s) {
		snprintf(c->err, sizeof c->err,
			 "scale tensor '%s' of '%s' (%s, layer %u) not found", sname, name,
			 moe_role_names[role], c->layer);
		return -1;
	}
	uint64_t gr = SR, gc = SC / 32; /* one scale matrix: mxfp4 [SR, SC/32] */
	if (fp8)
		moe_fp8_block_scale_shape(SR, SC, l->quant_block, &gr, &gc);
	uint64_t want_q = n_e * SR * (fp8 ? SC : SC / 2), want_s = n_e * gr * gc;
	enum moe_st_dtype qt = fp8 ? MOE_ST_F8_E4M3 : MOE_ST_U8;
	if (t->dtype != qt || t->numel != want_q || (!fp8 && SC % 32)) {
		snprintf(c->err, sizeof c->err,
			 "tensor '%s' (%s, %s) must be %s with %llu elements, got %s with %llu",
			 name, moe_role_names[role], moe_quant_names[l->quant],
			 moe_st_dtype_names[qt], (unsigned long long)want_q,
			 moe_st_dtype_names[t->dtype], (unsigned long long)t->numel);
		return -1;
	}
	if (s->numel != want_s || (!fp8 && s->dtype != MOE_ST_U8)) {
		snprintf(c->err, sizeof c->err,
			 "scale tensor '%s' (%s) must have %llu %s elements, got %s with %llu",
			 sname, moe_role_names[role], (unsigned long long)want_s,
			 fp8 ? "float" : "U8", moe_st_dtype_names[s->dtype],
			 (unsigned long long)s->numel);
		return -1;
	}
	uint64_t want[MOE_ST_MAX_DIMS], sw[MOE_ST_MAX_DIMS];
	uint64_t qd[3] = {SR, fp8 ? SC : SC / 32, 16}, sd[2] = {gr, gc};
	int rb = l->row_blocked;
	uint32_t nq = stored_shape(want, qd, fp8 ? 2 : 3, stacked, rb, n_e);
	uint32_t ns = stored_shape(sw, sd, 2, stacked, rb, n_e);
	if (check_shape(c, t, "tensor", role, want, nq, NULL, 0) ||
	    check_shape(c, s, "scale tensor", role, sw, ns, NULL, 0))
		return -1;
	float *sf = NULL;
	uint8_t *q = malloc(t->bytes + 1), *su = fp8 ? NULL : malloc(s->bytes + 1);
	if (!q || (!fp8 && !su)) {
		free(q), free(su);
		snprintf(c->err, sizeof c->err, "out of memory");
		return -1;
	}
	if (moe_st_read_bytes(t, q, c->err, sizeof c->err) != MOE_OK ||
	    (!fp8 && moe_st_read_bytes(s, su, c->err, sizeof c->err) != MOE_OK)) {
		free(q), free(su);
		return -1;
	}
	if (fp8) {
		sf = malloc(want_s * sizeof *sf);
		if (!sf) {
			free(q);
			snprintf(c->err, sizeof c->err, "out of memory");
			return -1;
		}
		if (moe_st_read_f32(s, sf, want_s, c->err, sizeof c->err) != MOE_OK) {
			free(sf), free(q);
			return -1;
		}
	}
	if (c->qt)
		keep_codes(c, fp8, q, sf, su, n_e, SR, SC, gr, gc, l->quant_block[0]);
	int64_t bad = 0;
	for (uint64_t e = 0; e < n_e && bad >= 0; e++) {
		int64_t b = fp8 ? moe_dequant_fp8_block(q + e * SR * SC, sf + e * gr * gc, SR, SC,
							l->quant_block, out + e * SR * SC)
				: moe_dequant_mxfp4(q + e * SR * SC / 2, su + e * gr * gc, SR, SC,
						    out + e * SR * SC);
		bad = b < 0 ? -1 : bad + b;
	}
	free(sf), free(q), free(su);
	if (bad < 0) {
		snprintf(c->err, sizeof c->err, "tensor '%s' (%s): invalid %s geometry", name,
			 moe_role_names[role], moe_quant_names[l->quant]);
		return -1;
	}
	if (bad > 0) {
		snprintf(c->err, sizeof c->err,
			 "tensor '%s' (%s): %lld values dequantize to NaN or infinity", name,
			 moe_role_names[role], (long long)bad);
		return -1;
	}
	return 0;
}

/* An int4 checkpoint tensor (layouts[role].quant gptq, gptq_v2, awq or
 * pack_quantized; moe_unpack_int4 has the layouts): the codes `name`
 * (PREFIX.qweight or PREFIX.weight_packed) of one [N, K] matrix, the scales
 * named by scale_names[role], and beside the codes PREFIX.qzeros (gptq, awq),
 * PREFIX.g_idx (gptq, optional; act_order has its forms),
 * PREFIX.weight_zero_point (optional) and PREFIX.weight_shape (pack_quantized,
 * optional). Shapes, dtypes and scales (finite, nonzero) are checked before
 * anything is kept; the codes go to c->qt from row c->qrow0 when the role is
 * kept (act-order: in group order, with the permutation), and out gets W =
 * code * s + offset in input order. */
struct int4_buf {
	const struct moe_st_tensor *t;
	void *data;
};

static const struct moe_st_tensor *beside(struct st_ctx *c, const char *name, const char *suffix,
					  const char *with, char *out, size_t cap)
{
	size_t n = strlen(name), k = strlen(suffix);
	snprintf(out, cap, "%.*s%s", (int)(n - k), name, with);
	return moe_st_set_find(c->set, out);
}

static int int4_check(struct st_ctx *c, const struct moe_st_tensor *t, enum moe_role role,
		      const char *what, int f32, enum moe_st_dtype dt, const uint64_t *dims,
		      uint32_t nd)
{
	const char *file = t->file ? t->file : "(memory)";
	int ok = f32 ? (t->dtype == MOE_ST_F16 || t->dtype == MOE_ST_BF16 || t->dtype == MOE_ST_F32)
		     : t->dtype == dt;
	if (!ok) {
		snprintf(c->err, sizeof c->err,
			 "%s: %s '%s' (%s, layer %u, %s) must be %s, found %s", file, what, t->name,
			 moe_role_names[role], c->layer, moe_quant_names[c->d->layouts[role].quant],
			 f32 ? "F16, BF16 or F32" : moe_st_dtype_names[dt],
			 moe_st_dtype_names[t->dtype]);
		return -1;
	}
	if (t->ndim == nd && memcmp(t->shape, dims, nd * sizeof *dims) == 0)
		return 0;
	char w[160], f[160];
	dims_str(dims, nd, w, sizeof w);
	dims_str(t->shape, t->ndim, f, sizeof f);
	snprintf(c->err, sizeof c->err,
		 "%s: %s '%s' (%s, layer %u, %s): expected shape %s, found %s", file, what, t->name,
		 moe_role_names[role], c->layer, moe_quant_names[c->d->layouts[role].quant], w, f);
	return -1;
}

/* A GPTQ g_idx [K] (group of input k): k / gs (*perm = NULL), or act-order
 * (desc_act): any assignment that gives each of the G groups gs inputs, read
 * through *perm, the inputs sorted by group (input order within a group). */
static int act_order(struct st_ctx *c, const struct moe_st_tensor *x, const uint8_t *xb,
		     enum moe_role role, uint64_t K, uint64_t gs, int32_t **perm)
{
	uint64_t G = K / gs;
	int32_t *v = malloc(K * sizeof *v), *p = malloc(K * sizeof *p);
	uint64_t *fill = calloc(G, sizeof *fill);
	const char *file = x->file ? x->file : "(memory)";
	int trivial = 1, rc = -1;
	*perm = NULL;
	if (!v || !p || !fill) {
		snprintf(c->err, sizeof c->err, "out of memory");
		goto done;
	}
	for (uint64_t k = 0; k < K; k++) {
		memcpy(&v[k], xb + 4 * k, 4); /* little-endian I32, like every reader here */
		if (v[k] < 0 || (uint64_t)v[k] >= G) {
			snprintf(c->err, sizeof c->err,
				 "%s: tensor '%s' (%s, layer %u): g_idx[%llu] is %d, not a group "
				 "(0..%llu)",
				 file, x->name, moe_role_names[role], c->layer,
				 (unsigned long long)k, v[k], (unsigned long long)(G - 1));
			goto done;
		}
		trivial &= (uint64_t)v[k] == k / gs;
		fill[v[k]]++;
	}
	for (uint64_t g = 0; g < G; g++)
		if (fill[g] != gs) {
			snprintf(
			    c->err, sizeof c->err,
			    "%s: tensor '%s' (%s, layer %u): g_idx gives group %llu %llu inputs, "
			    "not the group size %llu",
			    file, x->name, moe_role_names[role], c->layer, (unsigned long long)g,
			    (unsigned long long)fill[g], (unsigned long long)gs);
			goto done;
		}
	rc = 0;
	if (trivial)
		goto done;
	for (uint64_t g = 0; g < G; g++)
		fill[g] = g * gs;
	for (uint64_t k = 0; k < K; k++)
		p[fill[v[k]]++] = (int32_t)k;
	*perm = p, p = NULL;
done:
	free(v), free(p), free(fill);
	return rc;
}

/* Columns of the rows of [N, K] in group order (column j = input perm[j]),
 * or (back) in input order again. */
static int to_group_order(uint8_t *codes, uint64_t N, uint64_t K, const int32_t *perm)
{
	uint8_t *row = malloc(K);
	for (uint64_t n = 0; row && n < N; n++) {
		memcpy(row, codes + n * K, K);
		for (uint64_t j = 0; j < K; j++)
			codes[n * K + j] = row[perm[j]];
	}
	free(row);
	return row ? 0 : -1;
}

static int to_input_order(float *w, uint64_t N, uint64_t K, const int32_t *perm)
{
	float *row = malloc(K * sizeof *row);
	for (uint64_t n = 0; row && n < N; n++) {
		memcpy(row, w + n * K, K * sizeof *row);
		for (uint64_t j = 0; j < K; j++)
			w[n * K + perm[j]] = row[j];
	}
	free(row);
	return row ? 0 : -1;
}

/* The permutation of an act-order matrix, kept with the role's tensor
 * (whose codes are kept in group order). */
static int keep_act_order(struct st_ctx *c, enum moe_role role, const char *xname,
			  const int32_t *perm, uint64_t N, uint64_t K)
{
	uint64_t R, C;
	int pe;
	moe_desc_role_shape(c->d, role, &R, &C, &pe);
	if (c->fused) {
		snprintf(c->err, sizeof c->err,
			 "tensor '%s' (%s, layer %u): act-order (a g_idx other than k / group) is "
			 "read from separate gate, up and down tensors, not from a fused gate_up",
			 xname, moe_role_names[role], c->layer);
		return -1;
	}
	struct moe_ref_qtensor *qt = c->qt;
	if (!qt->perm) {
		uint64_t mats = pe ? c->d->n_experts : 1;
		if (!(qt->perm = malloc(mats * K * sizeof *qt->perm))) {
			snprintf(c->err, sizeof c->err, "out of memory");
			return -1;
		}
		for (uint64_t i = 0; i < mats * K; i++)
			qt->perm[i] = (int32_t)(i % K);
	}
	memcpy(qt->perm + c->qrow0 / N * K, perm, K * sizeof *perm);
	return 0;
}

static int read_int4(struct st_ctx *c, const struct moe_st_tensor *t, const char *name,
		     enum moe_role role, long expert, uint64_t N, uint64_t K, float *out)
{
	const struct moe_layout *l = &c->d->layouts[role];
	enum moe_quant kind = l->quant;
	int ct = kind == MOE_QUANT_PACK_QUANTIZED;
	uint64_t gs = l->quant_block[1] ? l->quant_block[1] : K, G = K / gs;
	const char *file = t->file ? t->file : "(memory)";
	if (K % 8 || K % gs || (!ct && N % 8)) {
		snprintf(c->err, sizeof c->err,
			 "%s: tensor '%s' (%s, layer %u, %s): the matrix is [%llu, %llu]: its "
			 "inputs must be a multiple of 8 and of the group (%llu)%s",
			 file, name, moe_role_names[role], c->layer, moe_quant_names[kind],
			 (unsigned long long)N, (unsigned long long)K, (unsigned long long)gs,
			 ct ? "" : ", its outputs a multiple of 8");
		return -1;
	}
	char sname[MOE_NAME_MAX * 2], zname[MOE_NAME_MAX * 2], xname[MOE_NAME_MAX * 2];
	if (moe_st_expand(c->d->scale_names[role], c->layer, expert, sname, sizeof sname, c->err,
			  sizeof c->err) != MOE_OK)
		return -1;
	const char *suf = ct ? ".weight_packed" : ".qweight";
	const struct moe_st_tensor *s = moe_st_set_find(c->set, sname);
	const struct moe_st_tensor *z =
	    beside(c, name, suf, ct ? ".weight_zero_point" : ".qzeros", zname, sizeof zname);
	const struct moe_st_tensor *x =
	    beside(c, name, suf, ct ? ".weight_shape" : ".g_idx", xname, sizeof xname);
	if (!s || (!z && !ct)) {
		snprintf(c->err, sizeof c->err,
			 "%s tensor '%s' of '%s' (%s, layer %u, %s) not found",
			 s ? "zero-point" : "scale", s ? zname : sname, name, moe_role_names[role],
			 c->layer, moe_quant_names[kind]);
		return -1;
	}
	uint64_t qd[2] = {ct ? N : (kind == MOE_QUANT_AWQ ? K : K / 8),
			  ct ? K / 8 : (kind == MOE_QUANT_AWQ ? N / 8 : N)};
	uint64_t sd[2] = {ct ? N : G, ct ? G : N}, zd[2] = {ct ? N / 8 : G, ct ? G : N / 8};
	int z8 = 0;
	if (ct && z && z->dtype == MOE_ST_I8) { /* one signed zero point per group */
		z8 = 1, zd[0] = N, zd[1] = G;
	} else if (ct && z && N % 8) {
		snprintf(c->err, sizeof c->err,
			 "%s: tensor '%s' (%s, layer %u): packed zero points need outputs a "
			 "multiple of 8, the matrix has %llu",
			 file, zname, moe_role_names[role], c->layer, (unsigned long long)N);
		return -1;
	}
	if (z && c->qt && !moe_ref_role_qfmt(c->d, role).zero) {
		snprintf(c->err, sizeof c->err,
			 "%s: tensor '%s' (%s, layer %u): the checkpoint has zero points but "
			 "quant: keeps %s with zero: false (symmetric)",
			 file, zname, moe_role_names[role], c->layer, moe_role_names[role]);
		return -1;
	}
	uint64_t xd[1] = {ct ? 2 : K};
	if (int4_check(c, t, role, "tensor", 0, MOE_ST_I32, qd, 2) ||
	    int4_check(c, s, role, "scale tensor", 1, MOE_ST_F32, sd, 2) ||
	    (z &&
	     int4_check(c, z, role, "zero-point tensor", 0, z8 ? MOE_ST_I8 : MOE_ST_I32, zd, 2)) ||
	    (x && int4_check(c, x, role, ct ? "shape tensor" : "g_idx tensor", 0,
			     ct && x->dtype == MOE_ST_I64 ? MOE_ST_I64 : MOE_ST_I32, xd, 1)))
		return -1;
	uint8_t *q = malloc(t->bytes + 1), *zb = z ? malloc(z->bytes + 1) : NULL,
		*xb = x ? malloc(x->bytes + 1) : NULL, *codes = malloc(N * K);
	int32_t *perm = NULL;
	float *sc = malloc(N * G * sizeof *sc), *ks = malloc(N * G * sizeof *ks),
	      *ko = malloc(N * G * sizeof *ko);
	int rc = -1;
	if (!q || (z && !zb) || (x && !xb) || !codes || !sc || !ks || !ko) {
		snprintf(c->err, sizeof c->err, "out of memory");
		goto done;
	}
	if (moe_st_read_bytes(t, q, c->err, sizeof c->err) != MOE_OK ||
	    moe_st_read_f32(s, sc, N * G, c->err, sizeof c->err) != MOE_OK ||
	    (z && moe_st_read_bytes(z, zb, c->err, sizeof c->err) != MOE_OK) ||
	    (x && moe_st_read_bytes(x, xb, c->err, sizeof c->err) != MOE_OK))
		goto done;
	for (uint64_t k = 0; ct && x && k < xd[0]; k++) {
		/* weight_shape: [N, K] */
		uint64_t w = 0, nb = x->dtype == MOE_ST_I64 ? 8 : 4;
		for (uint64_t b = 0; b < nb; b++)
			w |= (uint64_t)xb[nb * k + b] << (8 * b);
		int64_t v = nb == 8 ? (int64_t)w : (int64_t)(int32_t)(uint32_t)w;
		if (v != (int64_t)(k ? K : N)) {
			snprintf(c->err, sizeof c->err,
				 "%s: tensor '%s' (%s, layer %u): weight_shape says [%s], the "
				 "matrix is [%llu, %llu]",
				 file, xname, moe_role_names[role], c->layer, k ? "?, K" : "N, ?",
				 (unsigned long long)N, (unsigned long long)K);
			goto done;
		}
	}
	if (!ct && x && act_order(c, x, xb, role, K, gs, &perm) != 0)
		goto done;
	for (uint64_t i = 0; z8 && i < N * G; i++)
		if ((int8_t)zb[i] < -8 || (int8_t)zb[i] > 7) {
			snprintf(
			    c->err, sizeof c->err,
			    "%s: tensor '%s' (%s, layer %u): zero point %d at index %llu is out "
			    "of the int4 range -8..7",
			    file, zname, moe_role_names[role], c->layer, (int8_t)zb[i],
			    (unsigned long long)i);
			goto done;
		}
	struct moe_int4_src src = {
	    kind, N, K, gs, q, sc, z8 ? NULL : zb, z8 ? (const int8_t *)zb : NULL};
	int64_t bad = moe_unpack_int4(&src, codes, ks, ko);
	if (bad >= 0) {
		uint64_t b = (uint64_t)bad;
		float v = sc[ct ? b : (b % G) * N + b / G];
		snprintf(c->err, sizeof c->err,
			 "%s: scale tensor '%s' (%s, layer %u): %s scale for output %llu, group "
			 "%llu (inputs %llu..%llu)",
			 s->file ? s->file : "(memory)", sname, moe_role_names[role], c->layer,
			 isnan(v)    ? "NaN"
			 : v == 0.0f ? "zero"
				     : "infinite",
			 (unsigned long long)(b / G), (unsigned long long)(b % G),
			 (unsigned long long)(b % G * gs),
			 (unsigned long long)(b % G * gs + gs - 1));
		goto done;
	}
	if (perm && c->qt && keep_act_order(c, role, xname, perm, N, K) != 0)
		goto done;
	if (perm && to_group_order(codes, N, K, perm) != 0) {
		snprintf(c->err, sizeof c->err, "out of memory");
		goto done;
	}
	struct moe_qfmt f = {MOE_QFORMAT_INT4, (uint32_t)gs, 1};
	moe_qdequant(&f, codes, ks, ko, N, K, out); /* act-order: then in input order */
	if (perm && to_input_order(out, N, K, perm) != 0) {
		snprintf(c->err, sizeof c->err, "out of memory");
		goto done;
	}
	if (c->qt) {
		struct moe_ref_qtensor *qt = c->qt;
		memcpy(qt->codes + c->qrow0 * K, codes, N * K);
		memcpy(qt->scale + c->qrow0 * G, ks, N * G * sizeof *ks);
		memcpy(qt->offset + c->qrow0 * G, ko, N * G * sizeof *ko);
	}
	rc = 0;
done:
	free(q), free(zb), free(xb), free(codes), free(sc), free(ks), free(ko), free(perm);
	return rc;
}

/* Read a tensor expected to hold n_e blocks of R x C canonical values. */
/* Read a tensor expected to hold n_e blocks of R x C canonical values (one
 * axis more, n_e first, when stacked). Its full shape is checked against the
 * layout (orientation, stacking, row blocks; a vector role is 1-D), and its
 * values must be finite. */
static int read_blocks(struct st_ctx *c, const struct moe_st_tensor *t, const char *name,
		       enum moe_role role, long expert, uint64_t n_e, uint64_t R, uint64_t C,
		       int stacked, float *dst)
{
	uint64_t want = n_e * R * C;
	const struct moe_layout *l = &c->d->layouts[role];
	int quant = l->quant != MOE_QUANT_NONE;
	int in_out = l->orient == MOE_ORIENT_IN_OUT;
	if (moe_quant_int4(l->quant)) /* one [R, C] matrix per tensor (spec check) */
		return read_int4(c, t, name, role, expert, R, C, dst);
	if (!quant) {
		uint64_t ws[MOE_ST_MAX_DIMS], alt[MOE_ST_MAX_DIMS];
		uint32_t nd, alt_nd = 0;
		if (is_vector(role)) {
			uint64_t v = R * C, row[2] = {1, R * C};
			nd = stored_shape(ws, &v, 1, stacked, 0, n_e);
			if (!stacked) /* a row vector (Ernie 4.5 stores [1, E]) */
				alt_nd = stored_shape(alt, row, 2, 0, 0, 1);
		} else if (role == MOE_ROLE_PK_KEYS) {
			/* the two sub-key sets: [2, R/2, D/2], or flat [R, D/2] */
			uint64_t k3[3] = {2, R / 2, C};
			nd = stored_shape(ws, k3, 3, 0, 0, 1);
			uint64_t k2[2] = {R, C};
			alt_nd = stored_shape(alt, k2, 2, 0, 0, 1);
		} else {
			uint64_t m[2] = {in_out ? C : R, in_out ? R : C};
			nd = stored_shape(ws, m, 2, stacked, l->row_blocked, n_e);
		}
		if (check_shape(c, t, "tensor", role, ws, nd, alt, alt_nd))
			return -1;
	}
	float *tmp = in_out ? malloc(want * sizeof *tmp) : dst;
	if (!tmp) {
		snprintf(c->err, sizeof c->err, "out of memory");
		return -1;
	}
	if (quant ? read_quant(c, t, name, role, expert, n_e, in_out ? C : R, in_out ? R : C,
			       stacked, tmp) != 0
		  : moe_st_read_f32(t, tmp, want, c->err, sizeof c->err) != MOE_OK) {
		if (in_out)
			free(tmp);
		return -1;
	}
	for (uint64_t i = 0; !quant && i < want; i++)
		if (!isfinite(tmp[i])) {
			snprintf(c->err, sizeof c->err,
				 "%s: tensor '%s' (%s, layer %u): non-finite value (%s) at index "
				 "%llu",
				 t->file ? t->file : "(memory)", t->name, moe_role_names[role],
				 c->layer, isnan(tmp[i]) ? "NaN" : "infinity",
				 (unsigned long long)i);
			if (in_out)
				free(tmp);
			return -1;
		}
	if (in_out) {
		for (uint64_t e = 0; e < n_e; e++)
			orient_copy(tmp + e * R * C, dst + e * R * C, R, C, 1);
		free(tmp);
	}
	return 0;
}

static int load_role(struct st_ctx *c, enum moe_role role, float *dst)
{
	uint64_t R, C;
	int pe;
	if (!moe_desc_role_shape(c->d, role, &R, &C, &pe))
		return 0;
	char name[MOE_NAME_MAX * 2];
	uint64_t n_e = pe ? c->d->n_experts : 1;
	c->qrow0 = 0;
	if (!strstr(c->d->names[role], "{expert}")) {
		const struct moe_st_tensor *t = find(c, role, -1, name, sizeof name);
		return t ? read_blocks(c, t, name, role, -1, n_e, R, C, pe, dst) : -1;
	}
	for (uint64_t e = pe ? c->e0 : 0; e < (pe ? c->e1 : n_e); e++) {
		const struct moe_st_tensor *t = find(c, role, (long)e, name, sizeof name);
		c->qrow0 = e * R;
		if (!t || read_blocks(c, t, name, role, (long)e, 1, R, C, 0, dst + e * R * C) != 0)
			return -1;
	}
	return 0;
}

/* gate and up from one fused tensor per expert (or stacked): [2I, H] with
 * gate rows first (concat) or alternating (interleave); qg and qu: their kept
 * tensors when the experts are kept quantized (else NULL). */
static int load_fused(struct st_ctx *c, enum moe_role fused, enum moe_role up_r, float *gate,
		      float *up, struct moe_ref_qtensor *qg, struct moe_ref_qtensor *qu)
{
	uint64_t R, C;
	int pe;
	if (!moe_desc_role_shape(c->d, up_r, &R, &C, &pe))
		return 0;
	uint64_t n_e = pe ? c->d->n_experts : 1;
	float *tmp = calloc(n_e * 2 * R * C, sizeof *tmp);
	if (!tmp) {
		snprintf(c->err, sizeof c->err, "out of memory");
		return -1;
	}
	char name[MOE_NAME_MAX * 2];
	int rc = 0;
	/* kept quantized: the fused rows' codes and scales, split like the rows */
	struct moe_ref_qtensor fq = {0};
	uint64_t G = qu ? moe_ref_role_qfmt(c->d, up_r).group : 1;
	if (qu) {
		fq.codes = calloc(n_e * 2 * R * C, 1);
		fq.scale = calloc(n_e * 2 * R * (C / G), sizeof *fq.scale);
		if (!fq.codes || !fq.scale) {
			free(fq.codes), free(fq.scale), free(tmp);
			snprintf(c->err, sizeof c->err, "out of memory");
			return -1;
		}
		c->qt = &fq;
	}
	c->qrow0 = 0;
	c->fused = 1;
	if (!strstr(c->d->names[fused], "{expert}")) {
		const struct moe_st_tensor *t = find(c, fused, -1, name, sizeof name);
		rc = t ? read_blocks(c, t, name, fused, -1, n_e, 2 * R, C, pe, tmp) : -1;
	} else {
		for (uint64_t e = pe ? c->e0 : 0; e < (pe ? c->e1 : n_e) && rc == 0; e++) {
			const struct moe_st_tensor *t = find(c, fused, (long)e, name, sizeof name);
			c->qrow0 = e * 2 * R;
			rc = t ? read_blocks(c, t, name, fused, (long)e, 1, 2 * R, C, 0,
					     tmp + e * 2 * R * C)
			       : -1;
		}
	}
	int inter = c->d->layouts[fused].fuse == MOE_FUSE_INTERLEAVE;
	if (qu) {
		for (uint64_t e = 0; rc == 0 && e < n_e; e++)
			for (uint64_t r = 0; r < R; r++) {
				uint64_t gs = e * 2 * R + (inter ? 2 * r : r),
					 us = e * 2 * R + (inter ? 2 * r + 1 : R + r),
					 dr = e * R + r;
				memcpy(qg->codes + dr * C, fq.codes + gs * C, C);
				memcpy(qu->codes + dr * C, fq.codes + us * C, C);
				memcpy(qg->scale + dr * (C / G), fq.scale + gs * (C / G),
				       C / G * sizeof *fq.scale);
				memcpy(qu->scale + dr * (C / G), fq.scale + us * (C / G),
				       C / G * sizeof *fq.scale);
			}
		free(fq.codes), free(fq.scale);
		c->qt = NULL;
	}
	c->fused = 0;
	/* a fused bias is one [2I] vector per expert: interleaving alternates
	 * its elements, not rows */
	if (rc == 0 && R == 1) {
		for (uint64_t e = 0; e < n_e; e++)
			for (uint64_t i = 0; i < C; i++) {
				const float *s = tmp + e * 2 * C;
				gate[e * C + i] = inter ? s[2 * i] : s[i];
				up[e * C + i] = inter ? s[2 * i + 1] : s[C + i];
			}
		free(tmp);
		return 0;
	}
	for (uint64_t e = 0; rc == 0 && e < n_e; e++)
		for (uint64_t r = 0; r < R; r++) {
			const float *gs = tmp + (e * 2 * R + (inter ? 2 * r : r)) * C;
			const float *us = tmp + (e * 2 * R + (inter ? 2 * r + 1 : R + r)) * C;
			memcpy(gate + (e * R + r) * C, gs, C * sizeof *gate);
			memcpy(up + (e * R + r) * C, us, C * sizeof *up);
		}
	free(tmp);
	return rc;
}

/* gate and up share the up kernel's input, so act-order ones must share
 * their input order too (GPTQ gives both the same: it orders by the
 * statistics of that input); matrices [e0, e1) of the two roles. */
static int gate_up_order(struct st_ctx *c, const struct moe_ref_weights *w, enum moe_role gate,
			 enum moe_role up, uint64_t e0, uint64_t e1)
{
	const int32_t *pg = w->q[gate].perm, *pu = w->q[up].perm;
	if (!pg && !pu)
		return 0;
	uint64_t H = c->d->hidden;
	for (uint64_t e = e0; e < e1; e++)
		for (uint64_t k = 0; k < H; k++) {
			int32_t a = pg ? pg[e * H + k] : (int32_t)k,
				b = pu ? pu[e * H + k] : (int32_t)k;
			if (a != b) {
				char who[48];
				if (gate == MOE_ROLE_GATE)
					snprintf(who, sizeof who, "expert %llu",
						 (unsigned long long)e);
				else
					snprintf(who, sizeof who, "the shared experts");
				snprintf(c->err, sizeof c->err,
					 "layer %u, %s: the act-order g_idx of gate and up differ "
					 "(their inputs in group order differ at position %llu: %d "
					 "and %d); the kernels read both with one order",
					 c->layer, who, (unsigned long long)k, a, b);
				return -1;
			}
		}
	return 0;
}

static int load_layer(struct st_ctx *c, struct moe_ref_weights *w)
{
	const struct moe_desc *d = c->d;
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		if (!w->w[r])
			continue;
		int fused_gu =
		    (r == MOE_ROLE_GATE || r == MOE_ROLE_UP) && d->names[MOE_ROLE_GATE_UP][0];
		int fused_s = (r == MOE_ROLE_SHARED_GATE || r == MOE_ROLE_SHARED_UP) &&
			      d->names[MOE_ROLE_SHARED_GATE_UP][0];
		int fused_b = (r == MOE_ROLE_GATE_BIAS || r == MOE_ROLE_UP_BIAS) &&
			      d->names[MOE_ROLE_GATE_UP_BIAS][0];
		if (fused_gu || fused_s || fused_b)
			continue;
		if (!d->names[r][0]) {
			snprintf(c->err, sizeof c->err,
				 "the spec names no tensor for role '%s' (weights.names.%s)",
				 moe_role_names[r], moe_role_names[r]);
			return -1;
		}
		c->qt = w->q[r].codes ? &w->q[r] : NULL;
		int rc = load_role(c, (enum moe_role)r, w->w[r]);
		c->qt = NULL;
		if (rc != 0)
			return -1;
	}
	struct moe_ref_qtensor *q = w->q;
	int ku = q[MOE_ROLE_UP].codes != NULL, ks = q[MOE_ROLE_SHARED_UP].codes != NULL;
	if (d->names[MOE_ROLE_GATE_UP][0] &&
	    load_fused(c, MOE_ROLE_GATE_UP, MOE_ROLE_UP, w->w[MOE_ROLE_GATE], w->w[MOE_ROLE_UP],
		       ku ? &q[MOE_ROLE_GATE] : NULL, ku ? &q[MOE_ROLE_UP] : NULL) != 0)
		return -1;
	if (d->names[MOE_ROLE_SHARED_GATE_UP][0] &&
	    load_fused(c, MOE_ROLE_SHARED_GATE_UP, MOE_ROLE_SHARED_UP, w->w[MOE_ROLE_SHARED_GATE],
		       w->w[MOE_ROLE_SHARED_UP], ks ? &q[MOE_ROLE_SHARED_GATE] : NULL,
		       ks ? &q[MOE_ROLE_SHARED_UP] : NULL) != 0)
		return -1;
	if (d->names[MOE_ROLE_GATE_UP_BIAS][0] && w->w[MOE_ROLE_UP_BIAS] &&
	    load_fused(c, MOE_ROLE_GATE_UP_BIAS, MOE_ROLE_UP_BIAS, w->w[MOE_ROLE_GATE_BIAS],
		       w->w[MOE_ROLE_UP_BIAS], NULL, NULL) != 0)
		return -1;
	if (gate_up_order(c, w, MOE_ROLE_GATE, MOE_ROLE_UP, c->e0, c->e1) != 0 ||
	    gate_up_order(c, w, MOE_ROLE_SHARED_GATE, MOE_ROLE_SHARED_UP, 0, 1) != 0)
		return -1;
	/* the kernels see what a bf16/f16 checkpoint holds: round like the
	 * reference does for random weights */
	if (d->weight_dtype != MOE_DTYPE_F32)
		for (int r = 0; r < MOE_ROLE_COUNT; r++) {
			uint64_t R, C;
			int pe;
			if (!w->w[r] || !moe_desc_role_shape(d, (enum moe_role)r, &R, &C, &pe))
				continue;
			uint64_t n = R * C * (pe ? d->n_experts : 1);
			for (uint64_t i = 0; i < n; i++)
				w->w[r][i] = d->weight_dtype == MOE_DTYPE_BF16
						 ? moe_bf16_round(w->w[r][i])
						 : moe_f16_round(w->w[r][i]);
		}
	return 0;
}

/* Experts kept quantized load from a checkpoint that stores them in that
 * format: fp8 from fp8_block tensors whose tile is as wide as the group,
 * mxfp4 from mxfp4 ones, as stored (out_in); anything else (quantizing f32
 * or bf16 tensors at load, int8/int4 from safetensors) is refused up front.
 * Returns 0, or 1 with the reason in err. */
static int kept_unsupported(const struct moe_desc *d, char *err, size_t cap)
{
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		struct moe_qfmt f = moe_ref_role_qfmt(d, (enum moe_role)r);
		if (f.kind == MOE_QFORMAT_NONE || !d->names[r][0])
			continue;
		const struct moe_layout *l = &d->layouts[r];
		const char *kn = moe_qformat_names[f.kind], *rn = moe_role_names[r];
		if (f.kind == MOE_QFORMAT_FP8 && l->quant == MOE_QUANT_FP8_BLOCK &&
		    l->quant_block[1] == f.group && l->orient == MOE_ORIENT_OUT_IN)
			continue;
		if (f.kind == MOE_QFORMAT_MXFP4 && l->quant == MOE_QUANT_MXFP4)
			continue;
		uint64_t R = 0, K = 0;
		moe_desc_role_shape(d, (enum moe_role)r, &R, &K, NULL);
		if (f.kind == MOE_QFORMAT_INT4 && moe_quant_int4(l->quant) &&
		    f.group == (l->quant_block[1] ? l->quant_block[1] : K) &&
		    (f.zero || l->quant == MOE_QUANT_PACK_QUANTIZED))
			continue;
		if (moe_quant_int4(l->quant)) {
			snprintf(
			    err, cap,
			    "%s is kept %s (quant:, group %u%s) but the checkpoint stores it as "
			    "%s int4 with group %u (weights.layout.%s.quant, 0: per channel): "
			    "keep it as {kind: int4, group: %llu, zero: true}",
			    rn, kn, f.group,
			    f.kind == MOE_QFORMAT_INT4 && !f.zero ? ", zero: false" : "",
			    moe_quant_names[l->quant], l->quant_block[1], rn,
			    (unsigned long long)(l->quant_block[1] ? l->quant_block[1] : K));
			return 1;
		}
		if (l->quant == MOE_QUANT_NONE)
			snprintf(err, cap,
				 "%s is kept %s (quant:) but the checkpoint stores it unquantized: "
				 "quantizing at load is not generated; load it without quant: or "
				 "from a %s checkpoint",
				 rn, kn, kn);
		else
			snprintf(err, cap,
				 "%s is kept %s (quant:, group %u) but the checkpoint stores it as "
				 "%s (weights.layout.%s.quant, tile %ux%u, %s): loading it kept is "
				 "generated for fp8 from fp8_block tiles as wide as the group "
				 "(out_in) and mxfp4 from mxfp4",
				 rn, kn, f.group, moe_quant_names[l->quant], rn, l->quant_block[0],
				 l->quant_block[1], moe_orient_names[l->orient]);
		return 1;
	}
	return 0;
}

MOE_API enum moe_status moe_load_safetensors(moe_model *m, const char *const *files, size_t n_files)
{
	if (!m || (!files && n_files)) {
		moe_set_error("moe_load_safetensors: %s is NULL", m ? "files" : "model");
		return MOE_ERR_ARG;
	}
	if (!n_files) {
		moe_set_error("moe_load_safetensors: no files given");
		return MOE_ERR_ARG;
	}
	char kerr[512];
	if (kept_unsupported(m->d, kerr, sizeof kerr)) {
		moe_set_error("moe_load_safetensors: %s", kerr);
		return MOE_ERR_UNSUPPORTED;
	}
	if (!acquire(m, "moe_load_safetensors"))
		return MOE_ERR_BUSY;
	free_layers(m);
	struct st_ctx c = {.d = m->d, .e0 = m->e0, .e1 = m->e1};
	enum moe_status st = moe_st_set_open(files, n_files, &c.set, c.err, sizeof c.err);
	if (st != MOE_OK) {
		moe_set_error("moe_load_safetensors: %s", c.err);
		release(m);
		return st;
	}
	struct moe_progress pr;
	size_t done = 0;
	moe_progress_begin(&pr, "loading weights");
	for (uint32_t i = 0; i < m->d->n_moe_layers && st == MOE_OK; i++) {
		if (!holds(m, i))
			continue;
		progress_layer(&pr, m, done++, i);
		struct moe_ref_weights w;
		c.layer = m->d->moe_layers[i];
		if (moe_ref_weights_alloc(m->d, &w) != MOE_OK) {
			moe_set_error("moe_load_safetensors: out of memory");
			st = MOE_ERR_NOMEM;
			break;
		}
		if (load_layer(&c, &w) != 0) {
			moe_set_error("moe_load_safetensors: %s", c.err);
			st = c.unsupported ? MOE_ERR_UNSUPPORTED : MOE_ERR_WEIGHTS;
		} else {
			st = put_layer(m, i, &w);
		}
		moe_ref_weights_free(&w);
	}
	moe_st_set_close(c.set);
	if (st == MOE_OK) {
		m->loaded = 1;
		moe_progress_step(&pr, done, done, NULL);
	} else {
		free_layers(m);
	}
	moe_progress_end(&pr);
	release(m);
	return st;
}

/* GGUF ---------------------------------------------------------------------- */

/* A quantized tensor of a kept type, decoded and expanded to f32 (exactly
 * ggml's dequantization); a non-finite scale or offset is an error naming
 * the group. */
static int gguf_dequant(const struct moe_gguf_tensor *t, const char *name, enum moe_role role,
			uint32_t layer, const struct moe_qfmt *f, uint64_t rows, uint64_t K,
			float *out, char *err, size_t cap)
{
	uint64_t ng = rows * (K / f->group);
	unsigned char *raw = malloc(t->bytes ? (size_t)t->bytes : 1);
	uint8_t *codes = malloc((size_t)(rows * K) + 1);
	float *s = malloc((size_t)ng * sizeof *s + 1), *o = malloc((size_t)ng * sizeof *o + 1);
	int rc = -1;
	if (!raw || !codes || !s || !o) {
		snprintf(err, cap, "%s: tensor '%s': out of memory", t->file, name);
	} else if (moe_gguf_read(t, raw, err, cap) == MOE_OK) {
		int64_t bad = moe_gguf_decode(t->type, raw, rows, K, codes, s, o);
		if (bad >= 0) {
			snprintf(err, cap,
				 "%s: tensor '%s' (%s, layer %u): non-finite scale or offset in "
				 "group %lld",
				 t->file, name, moe_role_names[role], layer, (long long)bad);
		} else {
			moe_qdequant(f, codes, s, f->kind == MOE_QFORMAT_INT4 ? o : NULL, rows, K,
				     out);
			rc = 0;
		}
	}
	free(raw), free(codes), free(s), free(o);
	return rc;
}

/* One role of one layer from a GGUF file: llama.cpp stores every weight
 * [out, in] (ne0 = in, fastest) and the experts stacked ([E][out][in]); a
 * role the spec keeps quantized must be of the type that keeps its format
 * (Q8_0, Q6_K, Q5_0, Q4_0, Q4_1, Q4_K) and fills w->q; a role it does not
 * keep quantized is F32, F16 or BF16, or one of those types dequantized. */
static int gguf_role(const struct moe_desc *d, struct moe_gguf_file *f, uint32_t layer,
		     enum moe_role role, struct moe_ref_weights *w, char *err, size_t cap)
{
	uint64_t R, C;
	int pe;
	if (!moe_desc_role_shape(d, role, &R, &C, &pe))
		return 0;
	const struct moe_layout *l = &d->layouts[role];
	if (strstr(d->names[role], "{expert}") || l->orient != MOE_ORIENT_OUT_IN ||
	    l->row_blocked || l->quant != MOE_QUANT_NONE) {
		snprintf(err, cap,
			 "weights.names.%s: a GGUF file holds experts stacked, [out, in], "
			 "unquantized or in a ggml type: no {expert}, orient, row_blocked or "
			 "layout quant",
			 moe_role_names[role]);
		return -1;
	}
	char name[MOE_NAME_MAX * 2];
	if (moe_st_expand(d->names[role], layer, -1, name, sizeof name, err, cap) != MOE_OK)
		return -1;
	const struct moe_gguf_tensor *t = moe_gguf_find(f, name);
	if (!t) {
		snprintf(err, cap, "%s: tensor '%s' (%s, layer %u) not found", moe_gguf_path(f),
			 name, moe_role_names[role], layer);
		return -1;
	}
	uint64_t n_e = pe ? d->n_experts : 1, want[3];
	uint32_t nd = 0;
	if (pe)
		want[nd++] = n_e;
	if (!is_vector(role))
		want[nd++] = R;
	want[nd++] = is_vector(role) ? R * C : C;
	/* a single row (qwen2moe's shared-expert gate, [1, H]) is stored 1-D */
	const uint64_t *have = want;
	if (nd == 2 && !pe && want[0] == 1 && t->ndim == 1)
		have = want + 1, nd = 1;
	if (t->ndim != nd || memcmp(t->shape, have, nd * sizeof *have) != 0) {
		char a[160], b[160];
		dims_str(have, nd, a, sizeof a);
		dims_str(t->shape, t->ndim, b, sizeof b);
		snprintf(err, cap,
			 "%s: tensor '%s' (%s, layer %u): expected shape %s (slowest axis first), "
			 "found %s",
			 t->file, name, moe_role_names[role], layer, a, b);
		return -1;
	}
	uint64_t n = n_e * R * C;
	struct moe_qfmt q = moe_ref_role_qfmt(d, role), tq;
	const char *tn = moe_gguf_type_name(t->type);
	if (q.kind == MOE_QFORMAT_NONE) {
		if (moe_gguf_qfmt(t->type, &tq) == 0) {
			/* a kept type the spec does not keep (a matrix set whose
			 * type changes between layers): dequantized exactly */
			if (gguf_dequant(t, name, role, layer, &tq, n_e * R, C, w->w[role], err,
					 cap) != 0)
				return -1;
		} else if (moe_gguf_read_f32(t, w->w[role], n, err, cap) != MOE_OK) {
			return -1;
		}
		for (uint64_t i = 0; i < n; i++)
			if (!isfinite(w->w[role][i])) {
				snprintf(err, cap,
					 "%s: tensor '%s' (%s, layer %u): non-finite value (%s) at "
					 "index %llu",
					 t->file, name, moe_role_names[role], layer,
					 isnan(w->w[role][i]) ? "NaN" : "infinity",
					 (unsigned long long)i);
				return -1;
			}
		if (d->weight_dtype != MOE_DTYPE_F32)
			for (uint64_t i = 0; i < n; i++)
				w->w[role][i] = d->weight_dtype == MOE_DTYPE_BF16
						    ? moe_bf16_round(w->w[role][i])
						    : moe_f16_round(w->w[role][i]);
		return 0;
	}
	if (moe_gguf_qfmt(t->type, &tq) != 0 || tq.kind != q.kind || tq.group != q.group ||
	    tq.zero != q.zero) {
		snprintf(err, cap,
			 "%s: tensor '%s' (%s, layer %u) is %s, but the spec keeps %s as {kind: "
			 "%s, group: %u%s} (Q8_0 and Q5_0 are {int8, 32}, Q6_K {int8, 16}, Q4_0 "
			 "{int4, 32, zero: false}, Q4_1 and Q4_K {int4, 32, zero: true})",
			 t->file, name, moe_role_names[role], layer, tn ? tn : "?",
			 moe_role_names[role], moe_qformat_names[q.kind], q.group,
			 q.kind != MOE_QFORMAT_INT4 ? ""
			 : q.zero                   ? ", zero: true"
						    : ", zero: false");
		return -1;
	}
	unsigned char *raw = malloc(t->bytes ? (size_t)t->bytes : 1);
	if (!raw) {
		snprintf(err, cap, "%s: tensor '%s': out of memory", t->file, name);
		return -1;
	}
	struct moe_ref_qtensor *qt = &w->q[role];
	int64_t bad = -1;
	if (moe_gguf_read(t, raw, err, cap) != MOE_OK) {
		free(raw);
		return -1;
	}
	bad = moe_gguf_decode(t->type, raw, n_e * R, C, qt->codes, qt->scale, qt->offset);
	free(raw);
	if (bad >= 0) {
		uint64_t ng = C / q.group;
		snprintf(err, cap,
			 "%s: tensor '%s' (%s, layer %u): non-finite %s in group %lld (row %llu, "
			 "inputs %llu..%llu)",
			 t->file, name, moe_role_names[role], layer,
			 isfinite(qt->scale[bad]) ? "offset (min)" : "scale", (long long)bad,
			 (unsigned long long)((uint64_t)bad / ng),
			 (unsigned long long)((uint64_t)bad % ng * q.group),
			 (unsigned long long)((uint64_t)bad % ng * q.group + q.group - 1));
		return -1;
	}
	moe_qdequant(&q, qt->codes, qt->scale, qt->offset, n_e * R, C, w->w[role]);
	return 0;
}

MOE_API enum moe_status moe_load_gguf(moe_model *m, const char *path)
{
	if (!m || !path) {
		moe_set_error("moe_load_gguf: %s is NULL", m ? "path" : "model");
		return MOE_ERR_ARG;
	}
	if (!acquire(m, "moe_load_gguf"))
		return MOE_ERR_BUSY;
	free_layers(m);
	char err[1024];
	struct moe_gguf_file *f;
	enum moe_status st = moe_gguf_open(path, &f, err, sizeof err);
	if (st != MOE_OK) {
		moe_set_error("moe_load_gguf: %s", err);
		release(m);
		return st;
	}
	struct moe_progress pr;
	size_t done = 0;
	moe_progress_begin(&pr, "loading weights");
	for (uint32_t i = 0; i < m->d->n_moe_layers && st == MOE_OK; i++) {
		if (!holds(m, i))
			continue;
		progress_layer(&pr, m, done++, i);
		struct moe_ref_weights w;
		if (moe_ref_weights_alloc(m->d, &w) != MOE_OK) {
			moe_set_error("moe_load_gguf: out of memory");
			st = MOE_ERR_NOMEM;
			break;
		}
		for (int r = 0; r < MOE_ROLE_COUNT && st == MOE_OK; r++) {
			if (!w.w[r])
				continue;
			if (!m->d->names[r][0]) {
				moe_set_error("moe_load_gguf: the spec names no tensor for role "
					      "'%s' (weights.names.%s)",
					      moe_role_names[r], moe_role_names[r]);
				st = MOE_ERR_WEIGHTS;
			} else if (gguf_role(m->d, f, m->d->moe_layers[i], (enum moe_role)r, &w,
					     err, sizeof err) != 0) {
				moe_set_error("moe_load_gguf: %s", err);
				st = MOE_ERR_WEIGHTS;
			}
		}
		if (st == MOE_OK)
			st = put_layer(m, i, &w);
		moe_ref_weights_free(&w);
	}
	moe_gguf_close(f);
	if (st == MOE_OK) {
		m->loaded = 1;
		moe_progress_step(&pr, done, done, NULL);
	} else {
		free_layers(m);
	}
	moe_progress_end(&pr);
	release(m);
	return st;
}

/* Forward ---------------------------------------------------------------- */

static int layer_index(const struct moe_desc *d, uint32_t layer)
{
	for (uint32_t i = 0; i < d->n_moe_layers; i++)
		if (d->moe_layers[i] == layer)
			return (int)i;
	return -1;
}

static void zero_routing(const struct moe_desc *d, struct moe_routing *rt)
{
	if (rt->counts)
		memset(rt->counts, 0, d->n_experts * sizeof *rt->counts);
	if (rt->importance)
		memset(rt->importance, 0, d->n_experts * sizeof *rt->importance);
	rt->importance_cv2 = rt->lb_loss = rt->z_loss = 0.0f;
	rt->n_dropped = 0;
}

static const char not_held_fmt[] =
    "%s: layer %u is outside the layers [%u, %u) this model was created with (its weights "
    "are not loaded)";

/* Finite input, non-finite output: the values overflowed (docs/abi.md). */
/* The index of the first NaN or infinity of v[0, n), or n: a branch-free
 * pass over the exponent bits first (the compiler vectorizes it; T·H values
 * per call, which a test per value made a tenth of a cheap layer's time),
 * the position only when there is one. */
static size_t first_nonfinite(const float *v, size_t n)
{
	uint32_t any = 0;
	for (size_t i = 0; i < n; i++) {
		uint32_t b;
		memcpy(&b, v + i, sizeof b);
		any |= (~b & 0x7f800000u) == 0;
	}
	size_t i = 0;
	while (any && isfinite(v[i]))
		i++;
	return any ? i : n;
}

/* The same for bf16 values. */
static size_t first_nonfinite_bf16(const uint16_t *v, size_t n)
{
	uint32_t any = 0;
	for (size_t i = 0; i < n; i++)
		any |= (v[i] & 0x7f80u) == 0x7f80u;
	size_t i = 0;
	while (any && (v[i] & 0x7f80u) != 0x7f80u)
		i++;
	return any ? i : n;
}

static enum moe_status overflow(size_t i, size_t H)
{
	moe_set_error("moe_forward: non-finite output at token %zu, column %zu from finite "
		      "input (the values overflow: input or weights out of range)",
		      i / H, i % H);
	return MOE_ERR_INPUT;
}

MOE_API enum moe_status moe_forward(moe_model *m, uint32_t layer, const void *x, void *y,
				    size_t n_tokens, struct moe_routing *routing,
				    const struct moe_fwd_opts *opts)
{
	if (!m) {
		moe_set_error("moe_forward: model is NULL");
		return MOE_ERR_ARG;
	}
	const struct moe_desc *d = m->d;
	int li = layer_index(d, layer);
	if (li < 0) {
		moe_set_error("moe_forward: layer %u is not an MoE layer of '%s' (%u MoE layers, "
			      "first %u)",
			      layer, d->name, d->n_moe_layers,
			      d->n_moe_layers ? d->moe_layers[0] : 0);
		return MOE_ERR_ARG;
	}
	if (!holds(m, (uint32_t)li)) {
		moe_set_error(not_held_fmt, "moe_forward", layer, m->l0, m->l1);
		return MOE_ERR_ARG;
	}
	if (n_tokens && (!x || !y)) {
		moe_set_error("moe_forward: %s is NULL with %zu tokens", x ? "y" : "x", n_tokens);
		return MOE_ERR_ARG;
	}
	if (m->e0 != 0 || m->e1 != d->n_experts) {
		moe_set_error(
		    "moe_forward: the model holds experts [%u, %u) of %u only; a part runs "
		    "the staged calls (moe_route, moe_experts, moe_combine)",
		    m->e0, m->e1, d->n_experts);
		return MOE_ERR_ARG;
	}
	if (m->cuda) { /* x and y are device pointers, on the model's stream */
		if (!acquire(m, "moe_forward"))
			return MOE_ERR_BUSY;
		enum moe_status cst = MOE_ERR_WEIGHTS;
		char err[1024];
		if (!m->loaded)
			moe_set_error("moe_forward: no weights loaded (call moe_init_random or "
				      "moe_load_safetensors first)");
		else if ((cst = moe_cuda_forward(m->cuda, (uint32_t)li, x, y, n_tokens, routing,
						 opts, err, sizeof err)) != MOE_OK)
			moe_set_error("moe_forward: %s", err);
		release(m);
		return cst;
	}
	if (opts && opts->training && d->noise != MOE_NOISE_NONE &&
	    !moe_gen_has_op(m->gen,
			    d->noise == MOE_NOISE_JITTER ? MOE_OP_JITTER : MOE_OP_ROUTE_X)) {
		moe_set_error("moe_forward: training-mode noise (%s) is not generated for target "
			      "cpu yet",
			      moe_noise_names[d->noise]);
		return MOE_ERR_UNSUPPORTED;
	}
	size_t H = d->hidden;
	if (n_tokens > (size_t)INT32_MAX / (moe_desc_route_width(d) + 1) ||
	    n_tokens > SIZE_MAX / 4 / H / (m->routed.ld_h + 1)) {
		moe_set_error("moe_forward: too many tokens (%zu)", n_tokens);
		return MOE_ERR_ARG;
	}
	if (!acquire(m, "moe_forward"))
		return MOE_ERR_BUSY;
	enum moe_status st = MOE_OK;
	if (!m->loaded) {
		moe_set_error("moe_forward: no weights loaded (call moe_init_random or "
			      "moe_load_safetensors first)");
		st = MOE_ERR_WEIGHTS;
		goto out;
	}
	if (n_tokens == 0) {
		if (routing)
			zero_routing(d, routing);
		goto out;
	}
	int bf16 = d->act_dtype == MOE_DTYPE_BF16;
	const float *xf = x;
	if (bf16) {
		float *buf = malloc(n_tokens * H * sizeof *buf);
		if (!buf) {
			moe_set_error("moe_forward: out of memory");
			st = MOE_ERR_NOMEM;
			goto out;
		}
		const uint16_t *xb = x;
		for (size_t i = 0; i < n_tokens * H; i++)
			buf[i] = moe_bf16_to_f32(xb[i]);
		xf = buf;
	}
	size_t bad = first_nonfinite(xf, n_tokens * H);
	if (bad < n_tokens * H) {
		moe_set_error("moe_forward: non-finite input at token %zu, column %zu", bad / H,
			      bad % H);
		st = MOE_ERR_INPUT;
		goto conv_out;
	}
	if (bf16) {
		float *yf = malloc(n_tokens * H * sizeof *yf);
		if (!yf) {
			moe_set_error("moe_forward: out of memory");
			st = MOE_ERR_NOMEM;
			goto conv_out;
		}
		st = moe_exec_forward(m, &m->layers[li], xf, yf, n_tokens, routing, opts);
		if (st == MOE_OK) {
			uint16_t *yb = y;
			for (size_t i = 0; i < n_tokens * H; i++)
				yb[i] = moe_f32_to_bf16(yf[i]);
			if ((bad = first_nonfinite_bf16(yb, n_tokens * H)) < n_tokens * H)
				st = overflow(bad, H);
		}
		free(yf);
	} else {
		st = moe_exec_forward(m, &m->layers[li], xf, y, n_tokens, routing, opts);
		if (st == MOE_OK && (bad = first_nonfinite(y, n_tokens * H)) < n_tokens * H)
			st = overflow(bad, H);
	}
conv_out:
	if (bf16)
		free((void *)xf);
out:
	release(m);
	return st;
}

/* The staged calls ---------------------------------------------------------- */

/* The checks every stage shares: the model, the layer, the weights, a mode
 * whose forward is route -> group -> experts -> combine. Takes the model. */
static enum moe_status stage_begin(moe_model *m, uint32_t layer, const char *what, int *li)
{
	if (!m) {
		moe_set_error("%s: model is NULL", what);
		return MOE_ERR_ARG;
	}
	const struct moe_desc *d = m->d;
	if ((*li = layer_index(d, layer)) < 0) {
		moe_set_error("%s: layer %u is not an MoE layer of '%s'", what, layer, d->name);
		return MOE_ERR_ARG;
	}
	if (!holds(m, (uint32_t)*li)) {
		moe_set_error(not_held_fmt, what, layer, m->l0, m->l1);
		return MOE_ERR_ARG;
	}
	if (m->cuda) {
		moe_set_error("%s: the staged calls run on the cpu device only", what);
		return MOE_ERR_UNSUPPORTED;
	}
	if (!moe_gen_has_op(m->gen, MOE_OP_COMBINE) || d->mode == MOE_MODE_EXPERT_CHOICE ||
	    d->capacity != MOE_CAPACITY_NONE) {
		moe_set_error("%s: router mode %s%s is not staged (its routing needs every token "
			      "of the batch or it has no slots): use moe_forward",
			      what, moe_mode_names[d->mode],
			      d->capacity != MOE_CAPACITY_NONE ? " with capacity" : "");
		return MOE_ERR_ARG;
	}
	if (!acquire(m, what))
		return MOE_ERR_BUSY;
	if (!m->loaded) {
		moe_set_error("%s: no weights loaded (call moe_init_random or "
			      "moe_load_safetensors first)",
			      what);
		release(m);
		return MOE_ERR_WEIGHTS;
	}
	return MOE_OK;
}

/* x in the activation dtype as f32 (*buf: allocated, or NULL when x is
 * f32), every value finite. */
static enum moe_status input_f32(const struct moe_desc *d, const void *x, size_t T,
				 const char *what, const float **xf, float **buf)
{
	size_t H = d->hidden;
	*buf = NULL;
	*xf = x;
	if (d->act_dtype == MOE_DTYPE_BF16) {
		if (!(*buf = malloc(T * H * sizeof **buf))) {
			moe_set_error("%s: out of memory", what);
			return MOE_ERR_NOMEM;
		}
		const uint16_t *xb = x;
		for (size_t i = 0; i < T * H; i++)
			(*buf)[i] = moe_bf16_to_f32(xb[i]);
		*xf = *buf;
	}
	size_t i = first_nonfinite(*xf, T * H);
	if (i < T * H) {
		moe_set_error("%s: non-finite input at token %zu, column %zu", what, i / H, i % H);
		free(*buf);
		*buf = NULL;
		return MOE_ERR_INPUT;
	}
	return MOE_OK;
}

/* moe_route, and moe_route_stats when acc is not NULL. */
static enum moe_status route(moe_model *m, uint32_t layer, const void *x, size_t n_tokens,
			     int32_t *ids, float *weights, const struct moe_fwd_opts *opts,
			     struct moe_route_sums *acc, const char *what)
{
	int li;
	if (m && n_tokens && (!x || !ids || !weights)) {
		moe_set_error("%s: x, ids or weights is NULL with %zu tokens", what, n_tokens);
		return MOE_ERR_ARG;
	}
	if (m && n_tokens > (size_t)INT32_MAX / (moe_desc_route_width(m->d) + 1)) {
		moe_set_error("%s: too many tokens (%zu)", what, n_tokens);
		return MOE_ERR_ARG;
	}
	if (m && opts && opts->training && m->d->noise == MOE_NOISE_JITTER) {
		moe_set_error("%s: training with input jitter is not staged (the experts "
			      "see the jittered input): use moe_forward",
			      what);
		return MOE_ERR_UNSUPPORTED;
	}
	if (m && opts && opts->training && m->d->noise != MOE_NOISE_NONE && !m->cuda &&
	    !moe_gen_has_op(m->gen, MOE_OP_ROUTE_X)) {
		moe_set_error("%s: training-mode noise (%s) is not generated for target cpu "
			      "yet",
			      what, moe_noise_names[m->d->noise]);
		return MOE_ERR_UNSUPPORTED;
	}
	enum moe_status st = stage_begin(m, layer, what, &li);
	if (st != MOE_OK || !n_tokens) {
		if (st == MOE_OK)
			release(m);
		return st;
	}
	const float *xf;
	float *buf;
	st = input_f32(m->d, x, n_tokens, what, &xf, &buf);
	if (st == MOE_OK) {
		struct moe_fwd_opts o = opts ? *opts : (struct moe_fwd_opts){0};
		o.layer = layer;
		st = moe_exec_route(m, &m->layers[li], xf, n_tokens, ids, weights, &o, acc);
	}
	free(buf);
	release(m);
	return st;
}

MOE_API enum moe_status moe_route(moe_model *m, uint32_t layer, const void *x, size_t n_tokens,
				  int32_t *ids, float *weights, const struct moe_fwd_opts *opts)
{
	return route(m, layer, x, n_tokens, ids, weights, opts, NULL, "moe_route");
}

MOE_API enum moe_status moe_route_stats(moe_model *m, uint32_t layer, const void *x,
					size_t n_tokens, int32_t *ids, float *weights,
					const struct moe_fwd_opts *opts, struct moe_route_sums *acc)
{
	if (m && (!acc || !acc->importance || !acc->load)) {
		moe_set_error("moe_route_stats: acc, acc->importance or acc->load is NULL");
		return MOE_ERR_ARG;
	}
	return route(m, layer, x, n_tokens, ids, weights, opts, acc, "moe_route_stats");
}

MOE_API enum moe_status moe_routing_from_sums(moe_model *m, uint32_t layer,
					      const struct moe_route_sums *acc,
					      struct moe_routing *routing)
{
	if (!m || !acc || !routing || !acc->importance || !acc->load) {
		moe_set_error("moe_routing_from_sums: model, acc, acc->importance, acc->load or "
			      "routing is NULL");
		return MOE_ERR_ARG;
	}
	const struct moe_desc *d = m->d;
	if (layer_index(d, layer) < 0) {
		moe_set_error("moe_routing_from_sums: layer %u is not an MoE layer of '%s'", layer,
			      d->name);
		return MOE_ERR_ARG;
	}
	zero_routing(d, routing);
	if (!acc->n_tokens)
		return MOE_OK;
	for (uint32_t e = 0; e < d->n_experts; e++)
		if (!(acc->load[e] >= 0.0 && acc->load[e] <= 9007199254740992.0)) {
			moe_set_error("moe_routing_from_sums: load[%u] = %g is not a count", e,
				      acc->load[e]);
			return MOE_ERR_ARG;
		}
	if (routing->counts)
		for (uint32_t e = 0; e < d->n_experts; e++)
			routing->counts[e] = (int64_t)acc->load[e];
	moe_routing_losses(d, acc->importance, acc->load, (size_t)acc->n_tokens, acc->z_sum,
			   routing);
	return MOE_OK;
}

MOE_API enum moe_status moe_experts(moe_model *m, uint32_t layer, const float *rows_x,
				    size_t n_rows, const int64_t *counts, const float *rows_w,
				    float *rows_y)
{
	int li;
	if (m && (!counts || (n_rows && (!rows_x || !rows_y)))) {
		moe_set_error("moe_experts: counts, rows_x or rows_y is NULL");
		return MOE_ERR_ARG;
	}
	if (m && m->d->apply_to == MOE_APPLY_INPUT && n_rows && !rows_w) {
		moe_set_error("moe_experts: '%s' applies the routing weight to the expert input: "
			      "rows_w is needed",
			      m->d->name);
		return MOE_ERR_ARG;
	}
	if (m && n_rows > (size_t)INT32_MAX / 2) {
		moe_set_error("moe_experts: too many rows (%zu)", n_rows);
		return MOE_ERR_ARG;
	}
	enum moe_status st = stage_begin(m, layer, "moe_experts", &li);
	if (st != MOE_OK)
		return st;
	const struct moe_desc *d = m->d;
	int64_t *all = calloc(d->n_experts, sizeof *all);
	uint64_t sum = 0;
	if (!all) {
		moe_set_error("moe_experts: out of memory");
		st = MOE_ERR_NOMEM;
		goto out;
	}
	for (uint32_t j = 0; j < m->e1 - m->e0; j++) {
		if (counts[j] < 0 || (uint64_t)counts[j] > n_rows) {
			moe_set_error("moe_experts: counts[%u] = %lld is out of range", j,
				      (long long)counts[j]);
			st = MOE_ERR_ARG;
			goto out;
		}
		all[m->e0 + j] = counts[j];
		sum += (uint64_t)counts[j];
	}
	if (sum != n_rows) {
		moe_set_error("moe_experts: the counts of the %u local experts sum to %llu, not "
			      "n_rows %zu",
			      m->e1 - m->e0, (unsigned long long)sum, n_rows);
		st = MOE_ERR_ARG;
		goto out;
	}
	size_t bad = first_nonfinite(rows_x, n_rows * d->hidden);
	if (bad < n_rows * d->hidden) {
		moe_set_error("moe_experts: non-finite input at row %zu, column %zu",
			      bad / d->hidden, bad % d->hidden);
		st = MOE_ERR_INPUT;
		goto out;
	}
	if (n_rows)
		st = moe_exec_experts(m, &m->layers[li], rows_x, n_rows, all,
				      d->apply_to == MOE_APPLY_INPUT ? rows_w : NULL, rows_y);
out:
	free(all);
	release(m);
	return st;
}

MOE_API enum moe_status moe_combine(moe_model *m, uint32_t layer, const void *x, size_t n_tokens,
				    const int32_t *ids, const float *weights, const float *rows_y,
				    const int64_t *slot_rows, void *y)
{
	int li;
	if (m && n_tokens && (!ids || !weights || !rows_y || !y || (!x && m->shared.width))) {
		moe_set_error("moe_combine: ids, weights, rows_y, y or (with shared experts) x is "
			      "NULL with %zu tokens",
			      n_tokens);
		return MOE_ERR_ARG;
	}
	if (m && n_tokens > (size_t)INT32_MAX / (moe_desc_route_width(m->d) + 1)) {
		moe_set_error("moe_combine: too many tokens (%zu)", n_tokens);
		return MOE_ERR_ARG;
	}
	enum moe_status st = stage_begin(m, layer, "moe_combine", &li);
	if (st != MOE_OK || !n_tokens) {
		if (st == MOE_OK)
			release(m);
		return st;
	}
	const struct moe_desc *d = m->d;
	size_t H = d->hidden, n = n_tokens * H;
	const float *xf = NULL;
	float *xbuf = NULL, *yf = d->act_dtype == MOE_DTYPE_BF16 ? malloc(n * sizeof *yf) : y;
	if (!yf) {
		moe_set_error("moe_combine: out of memory");
		st = MOE_ERR_NOMEM;
		goto out;
	}
	if (m->shared.width)
		st = input_f32(d, x, n_tokens, "moe_combine", &xf, &xbuf);
	if (st == MOE_OK)
		st = moe_exec_combine(m, &m->layers[li], xf, n_tokens, ids, weights, rows_y,
				      slot_rows, yf);
	if (st == MOE_OK && d->act_dtype == MOE_DTYPE_BF16) {
		uint16_t *yb = y;
		for (size_t i = 0; i < n; i++)
			yb[i] = moe_f32_to_bf16(yf[i]);
		size_t bad = first_nonfinite_bf16(yb, n);
		if (bad < n)
			st = overflow(bad, H);
	} else if (st == MOE_OK) {
		size_t bad = first_nonfinite(yf, n);
		if (bad < n)
			st = overflow(bad, H);
	}
out:
	if (yf != y)
		free(yf);
	free(xbuf);
	release(m);
	return st;
}
