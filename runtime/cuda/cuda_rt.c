/* cuda_rt.c: the device runtime of model.so. Opens libcuda.so.1 with dlopen
 * at first use (own declarations, the versioned _v2 entry points), loads the
 * kernels from the images embedded by moegen, uploads and packs the weights
 * on the device, and runs a forward on device pointers on the caller's
 * stream. Every driver failure is a status with the driver's message. */
#include "cuda_rt.h"

#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Minimal driver API declarations (ABI-stable since CUDA 4). */
typedef int CUresult; /* 0: CUDA_SUCCESS */
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef unsigned long long CUdeviceptr;

enum {
	CU_ERROR_OUT_OF_MEMORY = 2,
	CU_ATTR_CC_MAJOR = 75,
	CU_ATTR_CC_MINOR = 76,
	CU_JIT_ERROR_LOG_BUFFER = 5,
	CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6,
};

/* Entry points: field, exported symbol, parameters. */
#define MOE_CU_FUNCS(X)                                                                            \
	X(cuInit, "cuInit", (unsigned flags))                                                      \
	X(cuGetErrorName, "cuGetErrorName", (CUresult e, const char **s))                          \
	X(cuGetErrorString, "cuGetErrorString", (CUresult e, const char **s))                      \
	X(cuDeviceGetCount, "cuDeviceGetCount", (int *n))                                          \
	X(cuDeviceGet, "cuDeviceGet", (CUdevice * d, int ordinal))                                 \
	X(cuDeviceGetAttribute, "cuDeviceGetAttribute", (int *v, int attr, CUdevice d))            \
	X(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", (CUcontext * c, CUdevice d))       \
	X(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", (CUdevice d))                 \
	X(cuCtxGetCurrent, "cuCtxGetCurrent", (CUcontext * c))                                     \
	X(cuCtxGetDevice, "cuCtxGetDevice", (CUdevice * d))                                        \
	X(cuCtxPushCurrent, "cuCtxPushCurrent_v2", (CUcontext c))                                  \
	X(cuCtxPopCurrent, "cuCtxPopCurrent_v2", (CUcontext * c))                                  \
	X(cuModuleLoadDataEx, "cuModuleLoadDataEx",                                                \
	  (CUmodule * m, const void *image, unsigned n, int *opts, void **vals))                   \
	X(cuModuleUnload, "cuModuleUnload", (CUmodule m))                                          \
	X(cuModuleGetFunction, "cuModuleGetFunction", (CUfunction * f, CUmodule m, const char *n)) \
	X(cuMemAlloc, "cuMemAlloc_v2", (CUdeviceptr * p, size_t n))                                \
	X(cuMemFree, "cuMemFree_v2", (CUdeviceptr p))                                              \
	X(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2",                                               \
	  (CUdeviceptr dst, const void *src, size_t n, CUstream s))                                \
	X(cuMemcpyDtoH, "cuMemcpyDtoH_v2", (void *dst, CUdeviceptr src, size_t n))                 \
	X(cuMemsetD32Async, "cuMemsetD32Async", (CUdeviceptr p, unsigned v, size_t n, CUstream s)) \
	X(cuLaunchKernel, "cuLaunchKernel",                                                        \
	  (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,          \
	   unsigned bz, unsigned smem, CUstream s, void **params, void **extra))                   \
	X(cuStreamSynchronize, "cuStreamSynchronize", (CUstream s))

#define CU_FIELD_(f, sym, params) CUresult(*f) params;
static struct {
	MOE_CU_FUNCS(CU_FIELD_)
} cu;

static pthread_once_t cu_once = PTHREAD_ONCE_INIT;
static CUresult cu_init_rc;
static int cu_loaded;
static char cu_open_err[768];

/* The kernels of the generated source (cuda_emit.c names them). */
#define MOE_CUDA_KERNELS(X)                                                                        \
	X(JITTER, "moe_jitter")                                                                    \
	X(ROUTE_SMALL, "moe_route_small")                                                          \
	X(ROUTE_LOGITS, "moe_route_logits")                                                        \
	X(ROUTE_SELECT, "moe_route_select")                                                        \
	X(EC_SELECT, "moe_ec_select")                                                              \
	X(CAP_ORDER, "moe_cap_order")                                                              \
	X(CAPACITY, "moe_capacity")                                                                \
	X(CAP_NORMALIZE, "moe_cap_normalize")                                                      \
	X(GROUP_MASK, "moe_group_mask")                                                            \
	X(GROUP_OFFSETS, "moe_group_offsets")                                                      \
	X(GROUP_SCATTER, "moe_group_scatter")                                                      \
	X(UP, "moe_up")                                                                            \
	X(DOWN, "moe_down")                                                                        \
	X(SHARED_UP, "moe_shared_up")                                                              \
	X(SHARED_DOWN, "moe_shared_down")                                                          \
	X(COMBINE, "moe_combine")                                                                  \
	X(PACK, "moe_pack")
#define K_ENUM_(v, s) K_##v,
enum kernel { MOE_CUDA_KERNELS(K_ENUM_) K_COUNT };
#define K_NAME_(v, s) s,
static const char *const kernel_names[K_COUNT] = {MOE_CUDA_KERNELS(K_NAME_)};

struct dev_layer {
	CUdeviceptr router, rbias, sbias, segw, up, down, bg, bu, bd, s_up, s_down, obias;
	int loaded;
};

struct moe_cuda {
	struct moe_desc d;
	struct moe_cuda_geom rg, sg;      /* sg.width 0: no shared experts */
	uint32_t W, chunks, groups, rows; /* rows: of the router matrix */
	size_t es;                        /* bytes per packed weight */
	CUdevice dev;
	CUcontext ctx;
	int own_primary;
	int cc_major, cc_minor;
	char arch[32]; /* the image that was loaded */
	CUmodule mod;
	CUfunction fn[K_COUNT];
	CUstream stream;
	struct dev_layer *layers;
	CUdeviceptr ws;
	size_t ws_tokens;
	struct moe_cuda_args a; /* workspace pointers for ws_tokens */
};

__attribute__((format(printf, 3, 4))) static void seterr(char *err, size_t cap, const char *fmt,
							 ...)
{
	if (!err || !cap)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, cap, fmt, ap);
	va_end(ap);
}

/* Names of the results a broken setup gives, for drivers (and the toolkit's
 * stub library) that cannot name them. */
static const struct {
	CUresult r;
	const char *name, *msg;
} known_errors[] = {
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {34, "CUDA_ERROR_STUB_LIBRARY", "the CUDA driver is a stub library"},
    {35, "CUDA_ERROR_INSUFFICIENT_DRIVER", "the driver is older than the runtime needs"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {209, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for the device"},
    {218, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {222, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "the PTX is newer than the driver"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

/* "what failed: CUDA_ERROR_X (the driver's message)" */
static enum moe_status cu_fail(char *err, size_t cap, const char *what, CUresult r)
{
	const char *name = NULL, *msg = NULL;
	if (cu_loaded && cu.cuGetErrorName(r, &name) != 0)
		name = NULL;
	if (cu_loaded && cu.cuGetErrorString(r, &msg) != 0)
		msg = NULL;
	for (size_t i = 0; i < sizeof known_errors / sizeof *known_errors; i++)
		if (known_errors[i].r == r) {
			name = name ? name : known_errors[i].name;
			msg = msg ? msg : known_errors[i].msg;
		}
	seterr(err, cap, "%s failed: %s (%s)", what, name ? name : "CUDA error",
	       msg ? msg : "no message");
	if (!name) {
		size_t n = strlen(err);
		if (n + 16 < cap)
			snprintf(err + n, cap - n, " [code %d]", r);
	}
	return r == CU_ERROR_OUT_OF_MEMORY ? MOE_ERR_NOMEM : MOE_ERR_DEVICE;
}

static void cu_open(void)
{
	const char *path = getenv("MOE_LIBCUDA");
	if (!path || !*path)
		path = "libcuda.so.1";
	/* kept open for the life of the process: the driver owns threads */
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		const char *e = dlerror();
		snprintf(cu_open_err, sizeof cu_open_err, "no CUDA device: %s not found (%s)", path,
			 e ? e : "dlopen failed");
		return;
	}
#define CU_LOAD_(f, sym, params)                                                                   \
	*(void **)&cu.f = dlsym(h, sym);                                                           \
	if (!cu.f) {                                                                               \
		snprintf(cu_open_err, sizeof cu_open_err,                                          \
			 "no CUDA device: %s lacks the symbol %s (driver too old)", path, sym);    \
		return;                                                                            \
	}
	MOE_CU_FUNCS(CU_LOAD_)
#undef CU_LOAD_
	cu_loaded = 1;
	cu_init_rc = cu.cuInit(0);
	if (cu_init_rc != 0) {
		char m[512];
		cu_fail(m, sizeof m, "cuInit", cu_init_rc);
		snprintf(cu_open_err, sizeof cu_open_err, "no CUDA device: %s", m);
	}
}

enum moe_status moe_cuda_probe(char *err, size_t cap)
{
	pthread_once(&cu_once, cu_open);
	if (!cu_loaded || cu_init_rc != 0) {
		seterr(err, cap, "%s", cu_open_err);
		return MOE_ERR_DEVICE;
	}
	int n = 0;
	CUresult r = cu.cuDeviceGetCount(&n);
	if (r != 0) {
		char m[512];
		cu_fail(m, sizeof m, "cuDeviceGetCount", r);
		seterr(err, cap, "no CUDA device: %s", m);
		return MOE_ERR_DEVICE;
	}
	if (n < 1) {
		seterr(err, cap, "no CUDA device: the driver reports none");
		return MOE_ERR_DEVICE;
	}
	return MOE_OK;
}

extern const struct moe_cuda_gen moe_cuda_gen_model __attribute__((weak));

const struct moe_cuda_gen *moe_cuda_gen(void)
{
	const struct moe_cuda_gen *g = &moe_cuda_gen_model;
	return g;
}

/* Context of the model current on this thread, and back. */
static enum moe_status enter(struct moe_cuda *c, char *err, size_t cap)
{
	CUresult r = cu.cuCtxPushCurrent(c->ctx);
	return r ? cu_fail(err, cap, "cuCtxPushCurrent", r) : MOE_OK;
}

static void leave(void)
{
	CUcontext old;
	cu.cuCtxPopCurrent(&old);
}

/* The image for a device of compute capability maj.min: a cubin of the same
 * major and a minor not above it (the highest such), else PTX not above it. */
const struct moe_cuda_image *moe_cuda_pick_image(const struct moe_cuda_gen *g, int maj, int min)
{
	const struct moe_cuda_image *best = NULL, *ptx = NULL;
	int best_v = -1, ptx_v = -1, dev = maj * 10 + min;
	for (unsigned i = 0; i < g->n_images; i++) {
		const struct moe_cuda_image *im = &g->images[i];
		int cubin = !strncmp(im->arch, "sm_", 3);
		const char *num = im->arch + (cubin ? 3 : 8);
		char *end;
		long v = strtol(num, &end, 10);
		int family = *end == 'a'; /* sm_90a: that exact GPU only */
		if ((!cubin && strncmp(im->arch, "compute_", 8)) || v <= 0)
			continue;
		if (cubin && v / 10 == maj && v % 10 <= min && (!family || v == dev) && v > best_v)
			best = im, best_v = (int)v;
		if (!cubin && v <= dev && v > ptx_v)
			ptx = im, ptx_v = (int)v;
	}
	return best ? best : ptx;
}

static enum moe_status load_module(struct moe_cuda *c, const struct moe_cuda_gen *g, char *err,
				   size_t cap)
{
	const struct moe_cuda_image *im = moe_cuda_pick_image(g, c->cc_major, c->cc_minor);
	if (!im) {
		char list[256] = "";
		size_t n = 0;
		for (unsigned i = 0; i < g->n_images && n + 40 < sizeof list; i++)
			n += (size_t)snprintf(list + n, sizeof list - n, "%s%s", i ? ", " : "",
					      g->images[i].arch);
		seterr(err, cap,
		       "no image in this model.so runs on this GPU (sm_%d%d; images: %s); "
		       "recompile with --arch sm_%d%d",
		       c->cc_major, c->cc_minor, list, c->cc_major, c->cc_minor);
		return MOE_ERR_DEVICE;
	}
	snprintf(c->arch, sizeof c->arch, "%s", im->arch);
	char log[4096] = "";
	int opts[2] = {CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
	void *vals[2] = {log, (void *)(uintptr_t)sizeof log};
	CUresult r = cu.cuModuleLoadDataEx(&c->mod, im->data, 2, opts, vals);
	if (r != 0) {
		enum moe_status st = cu_fail(err, cap, "cuModuleLoadDataEx", r);
		size_t n = strlen(err);
		snprintf(err + n, cap - n, " loading the %s image of %s%s%s", im->arch,
			 g->source_name ? g->source_name : "the model", log[0] ? ": " : "", log);
		c->mod = NULL;
		return st;
	}
	const struct moe_desc *d = &c->d;
	for (int k = 0; k < K_COUNT; k++) {
		int want = 1;
		if (k == K_JITTER)
			want = d->noise == MOE_NOISE_JITTER;
		else if (k == K_EC_SELECT)
			want = d->mode == MOE_MODE_EXPERT_CHOICE;
		else if (k == K_CAP_ORDER)
			want = moe_cuda_has_capacity(d) && d->priority == MOE_PRIORITY_SCORE;
		else if (k == K_CAPACITY)
			want = moe_cuda_has_capacity(d);
		else if (k == K_CAP_NORMALIZE)
			want = moe_cuda_norm_after_drop(d);
		else if (k == K_SHARED_UP || k == K_SHARED_DOWN)
			want = moe_cuda_has_shared(d);
		if (!want)
			continue;
		r = cu.cuModuleGetFunction(&c->fn[k], c->mod, kernel_names[k]);
		if (r != 0) {
			char what[96];
			snprintf(what, sizeof what, "cuModuleGetFunction(%s)", kernel_names[k]);
			return cu_fail(err, cap, what, r);
		}
	}
	return MOE_OK;
}

enum moe_status moe_cuda_create(const struct moe_cuda_gen *g, const struct moe_desc *d,
				void *stream, struct moe_cuda **out, char *err, size_t cap)
{
	if (!out || !d) {
		seterr(err, cap, "moe_cuda_create: NULL argument");
		return MOE_ERR_ARG;
	}
	*out = NULL;
	if (!g) {
		seterr(err, cap,
		       "this model.so carries no CUDA kernels (compile it with --target "
		       "cuda or cpu,cuda)");
		return MOE_ERR_DEVICE;
	}
	if (g->abi != MOE_CUDA_ABI || g->desc_bytes != sizeof(struct moe_desc)) {
		seterr(err, cap,
		       "the CUDA images (abi %u, %u-byte description) do not match this runtime "
		       "(abi %d, %zu bytes)",
		       g->abi, g->desc_bytes, MOE_CUDA_ABI, sizeof(struct moe_desc));
		return MOE_ERR_INTERNAL;
	}
	if (d->mode >= MOE_MODE_COUNT || !moe_cuda_mode_ok(d->mode)) {
		seterr(err, cap, "router.mode %s is not generated for target cuda",
		       moe_mode_names[d->mode < MOE_MODE_COUNT ? d->mode : 0]);
		return MOE_ERR_UNSUPPORTED;
	}
	enum moe_status st = moe_cuda_probe(err, cap);
	if (st != MOE_OK)
		return st;
	struct moe_cuda *c = calloc(1, sizeof *c);
	if (!c) {
		seterr(err, cap, "out of memory");
		return MOE_ERR_NOMEM;
	}
	c->d = *d;
	d = &c->d;
	c->W = moe_desc_route_width(d);
	c->chunks = (d->hidden + MOE_CUDA_RCHUNK - 1) / MOE_CUDA_RCHUNK;
	c->groups = d->n_groups > 1 ? d->n_groups : 1;
	if (d->mode == MOE_MODE_HIERARCHICAL) /* scores, picks, weights of the groups */
		c->groups = 3 * d->levels[0].groups;
	c->rows = moe_cuda_router_rows(d);
	c->es = d->weight_dtype == MOE_DTYPE_F32 ? 4 : 2;
	c->stream = stream;
	moe_cuda_geom_init(&c->rg, d->hidden, d->intermediate, d->kind == MOE_KIND_GLU);
	if (moe_cuda_has_shared(d))
		moe_cuda_geom_init(&c->sg, d->hidden, moe_desc_shared_width(d),
				   d->shared_kind == MOE_KIND_GLU);
	if (c->rg.up_rows / MOE_CUDA_BN > 65535 || c->rg.down_rows / MOE_CUDA_BN > 65535 ||
	    c->sg.up_rows / MOE_CUDA_BN > 65535 || (d->hidden + 255) / 256 > 65535 ||
	    (c->rows + 63) / 64 > 65535 ||
	    (d->mode == MOE_MODE_EXPERT_CHOICE && d->n_experts > 65535)) {
		seterr(err, cap, "the model's widths exceed the CUDA grid limits");
		free(c);
		return MOE_ERR_UNSUPPORTED;
	}
	c->layers = calloc(d->n_moe_layers ? d->n_moe_layers : 1, sizeof *c->layers);
	if (!c->layers) {
		free(c);
		seterr(err, cap, "out of memory");
		return MOE_ERR_NOMEM;
	}
	/* the context current on this thread (a framework's), else device 0's
	 * primary context */
	CUcontext cur = NULL;
	CUresult r = cu.cuCtxGetCurrent(&cur);
	if (r == 0 && cur) {
		c->ctx = cur;
		r = cu.cuCtxGetDevice(&c->dev);
	} else {
		r = cu.cuDeviceGet(&c->dev, 0);
		if (r == 0) {
			r = cu.cuDevicePrimaryCtxRetain(&c->ctx, c->dev);
			c->own_primary = r == 0;
		}
	}
	if (r != 0) {
		st = cu_fail(err, cap, "selecting the CUDA device", r);
		moe_cuda_destroy(c);
		return st;
	}
	if ((r = cu.cuDeviceGetAttribute(&c->cc_major, CU_ATTR_CC_MAJOR, c->dev)) != 0 ||
	    (r = cu.cuDeviceGetAttribute(&c->cc_minor, CU_ATTR_CC_MINOR, c->dev)) != 0) {
		st = cu_fail(err, cap, "cuDeviceGetAttribute", r);
		moe_cuda_destroy(c);
		return st;
	}
	if ((st = enter(c, err, cap)) != MOE_OK) {
		moe_cuda_destroy(c);
		return st;
	}
	st = load_module(c, g, err, cap);
	leave();
	if (st != MOE_OK) {
		moe_cuda_destroy(c);
		return st;
	}
	*out = c;
	return MOE_OK;
}

static void free_ptr(CUdeviceptr *p)
{
	if (*p)
		cu.cuMemFree(*p);
	*p = 0;
}

static void layer_free(struct dev_layer *l)
{
	free_ptr(&l->router), free_ptr(&l->rbias), free_ptr(&l->sbias), free_ptr(&l->segw);
	free_ptr(&l->up), free_ptr(&l->down), free_ptr(&l->bg), free_ptr(&l->bu);
	free_ptr(&l->bd), free_ptr(&l->s_up), free_ptr(&l->s_down), free_ptr(&l->obias);
	l->loaded = 0;
}

void moe_cuda_destroy(struct moe_cuda *c)
{
	if (!c)
		return;
	if (c->ctx && cu.cuCtxPushCurrent(c->ctx) == 0) {
		/* nothing may still run on buffers about to be freed */
		cu.cuStreamSynchronize(c->stream);
		for (uint32_t i = 0; c->layers && i < c->d.n_moe_layers; i++)
			layer_free(&c->layers[i]);
		free_ptr(&c->ws);
		if (c->mod)
			cu.cuModuleUnload(c->mod);
		leave();
	}
	if (c->own_primary)
		cu.cuDevicePrimaryCtxRelease(c->dev);
	free(c->layers);
	free(c);
}

/* Weights ------------------------------------------------------------------ */

static enum moe_status dalloc(CUdeviceptr *p, size_t n, char *err, size_t cap)
{
	CUresult r = cu.cuMemAlloc(p, n ? n : 4);
	if (r != 0) {
		*p = 0;
		char what[64];
		snprintf(what, sizeof what, "cuMemAlloc(%zu bytes)", n);
		return cu_fail(err, cap, what, r);
	}
	return MOE_OK;
}

/* Host to device on the model's stream: ordered before the kernels that read
 * it, also on a stream that does not wait for the legacy default stream (a
 * pageable source is staged before the call returns). */
static CUresult copy_in(struct moe_cuda *c, CUdeviceptr dst, const void *src, size_t n)
{
	return cu.cuMemcpyHtoDAsync(dst, src, n, c->stream);
}

static enum moe_status upload(struct moe_cuda *c, CUdeviceptr *p, const void *src, size_t n,
			      char *err, size_t cap)
{
	enum moe_status st = dalloc(p, n, err, cap);
	if (st != MOE_OK)
		return st;
	CUresult r = copy_in(c, *p, src, n);
	return r ? cu_fail(err, cap, "cuMemcpyHtoDAsync", r) : MOE_OK;
}

/* The router matrix: the router rows, the noise rows, the group gate
 * (moe_cuda_router_rows). */
static enum moe_status upload_router(struct moe_cuda *c, CUdeviceptr *p, float *const *W, char *err,
				     size_t cap)
{
	const struct moe_desc *d = &c->d;
	size_t H = d->hidden, E = d->n_experts;
	float *tmp = malloc((size_t)c->rows * H * sizeof *tmp);
	if (!tmp) {
		seterr(err, cap, "out of memory");
		return MOE_ERR_NOMEM;
	}
	memcpy(tmp, W[MOE_ROLE_ROUTER], E * H * sizeof *tmp);
	if (d->mode == MOE_MODE_HIERARCHICAL)
		memcpy(tmp + moe_cuda_group_row(d) * H, W[MOE_ROLE_GROUP_ROUTER],
		       (size_t)d->levels[0].groups * H * sizeof *tmp);
	if (moe_cuda_learned_noise(d))
		memcpy(tmp + moe_cuda_noise_row(d) * H, W[MOE_ROLE_NOISE], E * H * sizeof *tmp);
	enum moe_status st = upload(c, p, tmp, (size_t)c->rows * H * sizeof *tmp, err, cap);
	free(tmp);
	return st;
}

/* rows [n, src_cols] f32 -> [n, dst_cols] with zero padding */
static enum moe_status upload_padded(struct moe_cuda *c, CUdeviceptr *p, const float *src, size_t n,
				     size_t src_cols, size_t dst_cols, char *err, size_t cap)
{
	float *tmp = calloc(n * dst_cols + 1, sizeof *tmp);
	if (!tmp) {
		seterr(err, cap, "out of memory");
		return MOE_ERR_NOMEM;
	}
	for (size_t i = 0; i < n; i++)
		memcpy(tmp + i * dst_cols, src + i * src_cols, src_cols * sizeof *tmp);
	enum moe_status st = upload(c, p, tmp, n * dst_cols * sizeof *tmp, err, cap);
	free(tmp);
	return st;
}

static enum moe_status launch(struct moe_cuda *c, enum kernel k, unsigned gx, unsigned gy,
			      unsigned threads, void *arg, char *err, size_t cap)
{
	void *params[] = {arg};
	CUresult r =
	    cu.cuLaunchKernel(c->fn[k], gx, gy, 1, threads, 1, 1, 0, c->stream, params, NULL);
	if (r != 0) {
		char what[96];
		snprintf(what, sizeof what, "cuLaunchKernel(%s, grid %u x %u)", kernel_names[k], gx,
			 gy);
		return cu_fail(err, cap, what, r);
	}
	return MOE_OK;
}

/* Pack n_e experts of one projection: canonical f32 (a, and b for glu)
 * blocks of rows x cols -> dst, through a device staging buffer. */
static enum moe_status pack(struct moe_cuda *c, CUdeviceptr dst, uint32_t n_e, const float *a,
			    const float *b, uint64_t rows, uint64_t cols, uint64_t dst_rows,
			    uint64_t dst_cols, int glu, CUdeviceptr stage, char *err, size_t cap)
{
	size_t blk = rows * cols * sizeof(float);
	for (uint32_t e = 0; e < n_e; e++) {
		CUresult r = cu.cuStreamSynchronize(c->stream); /* the stage is free again */
		if (!r)
			r = copy_in(c, stage, a + (size_t)e * rows * cols, blk);
		if (!r && glu)
			r = copy_in(c, stage + blk, b + (size_t)e * rows * cols, blk);
		if (r)
			return cu_fail(err, cap, "uploading weights", r);
		struct moe_cuda_pack_args pa = {
		    .a = (const float *)(uintptr_t)stage,
		    .b = (const float *)(uintptr_t)(stage + (glu ? blk : 0)),
		    .dst = (void *)(uintptr_t)(dst + (size_t)e * dst_rows * dst_cols * c->es),
		    .rows = (int64_t)rows,
		    .cols = (int64_t)cols,
		    .dst_rows = (int64_t)dst_rows,
		    .dst_cols = (int64_t)dst_cols,
		    .glu = glu};
		uint64_t n = dst_rows * dst_cols, blocks = (n + 255) / 256;
		enum moe_status st = launch(c, K_PACK, (unsigned)(blocks < 4096 ? blocks : 4096), 1,
					    256, &pa, err, cap);
		if (st != MOE_OK)
			return st;
	}
	CUresult r = cu.cuStreamSynchronize(c->stream);
	return r ? cu_fail(err, cap, "packing weights", r) : MOE_OK;
}

/* One FFN's up and down projections (n_e experts). */
static enum moe_status pack_ffn(struct moe_cuda *c, const struct moe_cuda_geom *g, uint32_t n_e,
				const float *gate, const float *up, const float *down,
				CUdeviceptr *dup, CUdeviceptr *ddown, CUdeviceptr stage, char *err,
				size_t cap)
{
	enum moe_status st;
	if ((st = dalloc(dup, (size_t)n_e * g->up_rows * g->up_k * c->es, err, cap)) != MOE_OK ||
	    (st = dalloc(ddown, (size_t)n_e * g->down_rows * g->ld_h * c->es, err, cap)) != MOE_OK)
		return st;
	if (g->glu)
		st = pack(c, *dup, n_e, gate, up, g->width, g->hidden, g->up_rows, g->up_k, 1,
			  stage, err, cap);
	else
		st = pack(c, *dup, n_e, up, NULL, g->width, g->hidden, g->up_rows, g->up_k, 0,
			  stage, err, cap);
	if (st == MOE_OK)
		st = pack(c, *ddown, n_e, down, NULL, g->hidden, g->width, g->down_rows, g->ld_h, 0,
			  stage, err, cap);
	return st;
}

enum moe_status moe_cuda_load_layer(struct moe_cuda *c, uint32_t li,
				    const struct moe_ref_weights *w, char *err, size_t cap)
{
	if (!c || !w || li >= c->d.n_moe_layers) {
		seterr(err, cap, "moe_cuda_load_layer: bad argument (layer index %u)", li);
		return MOE_ERR_ARG;
	}
	const struct moe_desc *d = &c->d;
	float *const *W = w->w;
	int glu = d->kind == MOE_KIND_GLU;
	if (!W[MOE_ROLE_ROUTER] || !W[MOE_ROLE_UP] || !W[MOE_ROLE_DOWN] ||
	    (glu && !W[MOE_ROLE_GATE]) || (d->router_bias && !W[MOE_ROLE_ROUTER_BIAS]) ||
	    (d->select_bias && !W[MOE_ROLE_SELECT_BIAS]) ||
	    (d->expert_bias && (!W[MOE_ROLE_UP_BIAS] || !W[MOE_ROLE_DOWN_BIAS])) ||
	    (c->sg.width && (!W[MOE_ROLE_SHARED_UP] || !W[MOE_ROLE_SHARED_DOWN] ||
			     (c->sg.glu && !W[MOE_ROLE_SHARED_GATE]))) ||
	    (c->sg.width && d->shared_gate == MOE_SHARED_GATE_SIGMOID &&
	     !W[MOE_ROLE_SHARED_EXPERT_GATE]) ||
	    (d->output_bias && !W[MOE_ROLE_OUTPUT_BIAS]) ||
	    (moe_cuda_learned_noise(d) && !W[MOE_ROLE_NOISE]) ||
	    (d->mode == MOE_MODE_HIERARCHICAL && !W[MOE_ROLE_GROUP_ROUTER])) {
		seterr(err, cap,
		       "moe_cuda_load_layer: a weight role of the description is missing");
		return MOE_ERR_WEIGHTS;
	}
	enum moe_status st = enter(c, err, cap);
	if (st != MOE_OK)
		return st;
	struct dev_layer *l = &c->layers[li];
	layer_free(l);
	size_t H = d->hidden, E = d->n_experts;
	size_t stage_bytes = 2 * (size_t)d->intermediate * H * sizeof(float);
	if (c->sg.width && 2 * (size_t)c->sg.width * H * sizeof(float) > stage_bytes)
		stage_bytes = 2 * (size_t)c->sg.width * H * sizeof(float);
	CUdeviceptr stage = 0;
	if ((st = upload_router(c, &l->router, W, err, cap)) != MOE_OK)
		goto fail;
	if (d->router_bias &&
	    (st = upload(c, &l->rbias, W[MOE_ROLE_ROUTER_BIAS], E * 4, err, cap)) != MOE_OK)
		goto fail;
	if (d->select_bias &&
	    (st = upload(c, &l->sbias, W[MOE_ROLE_SELECT_BIAS], E * 4, err, cap)) != MOE_OK)
		goto fail;
	if (c->sg.width && d->shared_gate == MOE_SHARED_GATE_SIGMOID &&
	    (st = upload(c, &l->segw, W[MOE_ROLE_SHARED_EXPERT_GATE], H * 4, err, cap)) != MOE_OK)
		goto fail;
	if (d->output_bias &&
	    (st = upload(c, &l->obias, W[MOE_ROLE_OUTPUT_BIAS], H * 4, err, cap)) != MOE_OK)
		goto fail;
	if (d->expert_bias) {
		if (glu && W[MOE_ROLE_GATE_BIAS] &&
		    (st = upload_padded(c, &l->bg, W[MOE_ROLE_GATE_BIAS], E, d->intermediate,
					c->rg.ld_h, err, cap)) != MOE_OK)
			goto fail;
		if ((st = upload_padded(c, &l->bu, W[MOE_ROLE_UP_BIAS], E, d->intermediate,
					c->rg.ld_h, err, cap)) != MOE_OK ||
		    (st = upload_padded(c, &l->bd, W[MOE_ROLE_DOWN_BIAS], E, H, c->rg.down_rows,
					err, cap)) != MOE_OK)
			goto fail;
	}
	if ((st = dalloc(&stage, stage_bytes, err, cap)) != MOE_OK)
		goto fail;
	st = pack_ffn(c, &c->rg, (uint32_t)E, W[MOE_ROLE_GATE], W[MOE_ROLE_UP], W[MOE_ROLE_DOWN],
		      &l->up, &l->down, stage, err, cap);
	if (st == MOE_OK && c->sg.width)
		st = pack_ffn(c, &c->sg, 1, W[MOE_ROLE_SHARED_GATE], W[MOE_ROLE_SHARED_UP],
			      W[MOE_ROLE_SHARED_DOWN], &l->s_up, &l->s_down, stage, err, cap);
	if (st != MOE_OK)
		goto fail;
	free_ptr(&stage);
	l->loaded = 1;
	leave();
	return MOE_OK;
fail:
	free_ptr(&stage);
	layer_free(l);
	leave();
	return st;
}

/* Workspace ----------------------------------------------------------------- */

/* Carve the workspace for T tokens out of base (0: only measure). Returns
 * the bytes needed, or 0 on overflow. */
static size_t carve(struct moe_cuda *c, size_t T, CUdeviceptr base, struct moe_cuda_args *a)
{
	const struct moe_desc *d = &c->d;
	size_t E = d->n_experts, W = c->W, H = d->hidden;
	size_t nb = (T + 31) / 32, off = 0,
	       small = T < MOE_CUDA_ROUTE_SMALL_T ? T : MOE_CUDA_ROUTE_SMALL_T;
	int ovf = 0;
#define SLOT(field, count, size)                                                                   \
	do {                                                                                       \
		size_t n_ = (count), s_ = (size);                                                  \
		if (n_ && s_ > SIZE_MAX / n_)                                                      \
			ovf = 1;                                                                   \
		size_t b_ = ovf ? 0 : (n_ * s_ + 255) / 256 * 256;                                 \
		if (off > SIZE_MAX - b_)                                                           \
			ovf = 1;                                                                   \
		if (base)                                                                          \
			a->field = (void *)(uintptr_t)(base + off);                                \
		off += ovf ? 0 : b_;                                                               \
	} while (0)
	SLOT(partials, small * c->rows, c->chunks * 4);
	SLOT(done, small, 4);
	SLOT(logits, T * c->rows, 4);
	SLOT(scores, T * E, 4);
	SLOT(sel, T * E, 4);
	SLOT(gscore, T * c->groups, 4);
	SLOT(ids, T * W, 4);
	SLOT(wts, T * W, 4);
	SLOT(prio, T, 4);
	SLOT(sgate, T, 4);
	SLOT(kept, T * W, 1);
	SLOT(order, T, 4);
	SLOT(mask, nb * E, 4);
	SLOT(tbase, nb * E, 4);
	SLOT(counts, E, 4);
	SLOT(offsets, E + 1, 4);
	SLOT(tstart, E + 1, 4);
	SLOT(rows, T * W, 4);
	SLOT(row_w, T * W, 4);
	SLOT(slot_row, T * W, 4);
	SLOT(h, T * W, (size_t)c->rg.ld_h * c->es);
	SLOT(hs, c->sg.width ? T : 0, (size_t)c->sg.ld_h * c->es);
	SLOT(o, T * W, H * 4);
	SLOT(os, c->sg.width ? T : 0, H * 4);
	SLOT(xj, d->noise == MOE_NOISE_JITTER ? T : 0, H * 4);
#undef SLOT
	return ovf ? 0 : off;
}

enum moe_status moe_cuda_reserve(struct moe_cuda *c, size_t T, char *err, size_t cap)
{
	if (!c) {
		seterr(err, cap, "moe_cuda_reserve: model is NULL");
		return MOE_ERR_ARG;
	}
	if (T <= c->ws_tokens && c->ws)
		return MOE_OK;
	size_t want = T < 64 ? 64 : T;
	if (want < 2 * c->ws_tokens && c->ws_tokens < SIZE_MAX / 2)
		want = 2 * c->ws_tokens;
	size_t bytes = carve(c, want, 0, &c->a);
	if (!bytes && want != T)
		bytes = carve(c, want = T, 0, &c->a);
	if (!bytes) {
		seterr(err, cap, "the workspace for %zu tokens overflows", T);
		return MOE_ERR_ARG;
	}
	enum moe_status st = enter(c, err, cap);
	if (st != MOE_OK)
		return st;
	CUresult r = cu.cuStreamSynchronize(c->stream);
	if (r != 0) {
		leave();
		return cu_fail(err, cap, "cuStreamSynchronize", r);
	}
	free_ptr(&c->ws);
	c->ws_tokens = 0;
	st = dalloc(&c->ws, bytes, err, cap);
	if (st == MOE_OK) {
		carve(c, want, c->ws, &c->a);
		/* the small-T router's counters start at zero and end every call there */
		r = cu.cuMemsetD32Async(
		    (CUdeviceptr)(uintptr_t)c->a.done, 0,
		    want < MOE_CUDA_ROUTE_SMALL_T ? want : MOE_CUDA_ROUTE_SMALL_T, c->stream);
		if (!r)
			r = cu.cuStreamSynchronize(c->stream);
		if (r) {
			st = cu_fail(err, cap, "clearing the workspace", r);
			free_ptr(&c->ws);
		} else {
			c->ws_tokens = want;
		}
	}
	leave();
	return st;
}

/* Forward ------------------------------------------------------------------- */

/* Tokens each expert keeps in a call of T tokens (the reference's formula). */
static int64_t capacity_of(const struct moe_desc *d, size_t T)
{
	uint64_t C;
	if (d->capacity == MOE_CAPACITY_PER_EXPERT)
		C = d->capacity_per_expert;
	else if (d->capacity == MOE_CAPACITY_TOKEN_FRACTION)
		C = moe_desc_scaled_count(d->capacity_token_fraction, T, 1, 0);
	else
		C = moe_desc_scaled_count(d->capacity_factor, (uint64_t)d->top_k * T, d->n_experts,
					  d->capacity_floor);
	if (C < d->capacity_min)
		C = d->capacity_min;
	return C > INT64_MAX ? INT64_MAX : (int64_t)C;
}

/* The router probability of n logits for the statistics (the reference's
 * prob_vec): the softmax, or the positive scores normalized to sum 1. */
static void host_prob(enum moe_score sc, const float *l, float *s, uint32_t n)
{
	if (sc == MOE_SCORE_SOFTMAX) {
		float m = -INFINITY, sum = 0.0f;
		for (uint32_t i = 0; i < n; i++)
			if (l[i] > m)
				m = l[i];
		for (uint32_t i = 0; i < n; i++) {
			s[i] = (float)exp((double)(l[i] - m));
			sum += s[i];
		}
		for (uint32_t i = 0; i < n; i++)
			s[i] /= sum;
		return;
	}
	float sum = 0.0f;
	for (uint32_t i = 0; i < n; i++) {
		double v = l[i];
		if (sc == MOE_SCORE_SIGMOID)
			s[i] = (float)(1.0 / (1.0 + exp(-v)));
		else
			s[i] = (float)sqrt((double)(float)(v > 20.0 ? v : log1p(exp(v))));
		sum += s[i];
	}
	for (uint32_t i = 0; i < n; i++)
		s[i] = sum > 0.0f ? s[i] / sum : 0.0f;
}

/* The router statistics on the host, the formulas of the CPU executor:
 * logits [T, rows] (the router rows first, the group gate at group_row);
 * s holds E + G floats of scratch. The sparse importance (Shazeer 2017) is
 * the sum of the kept slots' routing weights [T, W], in slot order. */
static void host_stats(const struct moe_desc *d, const float *logits, size_t rows, size_t T,
		       const int32_t *counts, const int32_t *ids, const float *wts,
		       const uint8_t *kept, size_t W, struct moe_routing *rt, double *imp, float *s)
{
	uint32_t E = d->n_experts;
	double zsum = 0.0;
	for (size_t t = 0; t < T; t++) {
		const float *l = logits + t * rows;
		if (d->mode == MOE_MODE_SPARSEMIXER) {
			host_prob(MOE_SCORE_SOFTMAX, l, s, E);
		} else if (d->mode == MOE_MODE_HIERARCHICAL) {
			/* p(group) x p(expert | group) */
			uint32_t G = d->levels[0].groups, n = E / G;
			float *pg = s + E;
			host_prob(d->score, l + moe_cuda_group_row(d), pg, G);
			for (uint32_t g = 0; g < G; g++) {
				host_prob(d->score, l + (size_t)g * n, s + (size_t)g * n, n);
				for (uint32_t i = 0; i < n; i++)
					s[g * n + i] *= pg[g];
			}
		} else {
			host_prob(d->score, l, s, E);
		}
		for (uint32_t i = 0; i < E; i++)
			imp[i] += s[i];
		double m = -INFINITY, z = 0.0;
		for (uint32_t i = 0; i < E; i++)
			if (l[i] > m)
				m = l[i];
		if (isfinite(m)) {
			for (uint32_t i = 0; i < E; i++)
				z += exp((double)l[i] - m);
			z = m + log(z);
		}
		zsum += z * z;
	}
	if (d->importance_sparse) {
		memset(imp, 0, E * sizeof *imp);
		for (size_t i = 0; i < T * W; i++)
			if (kept[i] && ids[i] >= 0)
				imp[ids[i]] += (double)wts[i];
	}
	double mean = 0.0, var = 0.0, total = 0.0, lb = 0.0;
	for (uint32_t e = 0; e < E; e++) {
		mean += imp[e];
		total += counts[e];
	}
	mean /= E;
	for (uint32_t e = 0; e < E; e++)
		var += (imp[e] - mean) * (imp[e] - mean);
	var /= E;
	for (uint32_t e = 0; e < E; e++)
		if (total > 0.0)
			lb += (counts[e] / total) * (imp[e] / (double)T);
	if (rt->importance)
		for (uint32_t e = 0; e < E; e++)
			rt->importance[e] = (float)imp[e];
	rt->importance_cv2 = mean > 0.0 ? (float)(var / (mean * mean)) : 0.0f;
	rt->lb_loss = (float)(E * lb);
	rt->z_loss = (float)(zsum / (double)T);
}

static enum moe_status read_routing(struct moe_cuda *c, size_t T, struct moe_routing *rt, char *err,
				    size_t cap)
{
	const struct moe_desc *d = &c->d;
	size_t E = d->n_experts, W = c->W, R = c->rows;
	CUresult r = cu.cuStreamSynchronize(c->stream);
	if (r != 0)
		return cu_fail(err, cap, "the forward pass", r);
	int32_t *ids = malloc(T * W * sizeof *ids), *counts = malloc(E * sizeof *counts);
	float *wts = malloc(T * W * sizeof *wts), *logits = malloc(T * R * sizeof *logits);
	uint8_t *kept = malloc(T * W);
	double *imp = calloc(E, sizeof *imp);
	float *s = malloc((E + c->groups) * sizeof *s);
	enum moe_status st = MOE_OK;
	if (!ids || !counts || !wts || !logits || !kept || !imp || !s) {
		seterr(err, cap, "out of memory");
		st = MOE_ERR_NOMEM;
		goto out;
	}
	if ((r = cu.cuMemcpyDtoH(ids, (CUdeviceptr)(uintptr_t)c->a.ids, T * W * 4)) ||
	    (r = cu.cuMemcpyDtoH(wts, (CUdeviceptr)(uintptr_t)c->a.wts, T * W * 4)) ||
	    (r = cu.cuMemcpyDtoH(counts, (CUdeviceptr)(uintptr_t)c->a.counts, E * 4)) ||
	    (r = cu.cuMemcpyDtoH(logits, (CUdeviceptr)(uintptr_t)c->a.logits, T * R * 4))) {
		st = cu_fail(err, cap, "reading the routing back", r);
		goto out;
	}
	if (moe_cuda_has_capacity(d)) {
		if ((r = cu.cuMemcpyDtoH(kept, (CUdeviceptr)(uintptr_t)c->a.kept, T * W))) {
			st = cu_fail(err, cap, "reading the routing back", r);
			goto out;
		}
	} else {
		memset(kept, 1, T * W);
	}
	int64_t dropped = 0;
	for (size_t i = 0; i < T * W; i++) {
		dropped += !kept[i];
		int on = kept[i] && ids[i] >= 0; /* -1: no expert (top-p, expert choice) */
		if (rt->expert_ids)
			rt->expert_ids[i] = on ? ids[i] : -1;
		if (rt->weights)
			rt->weights[i] = on ? wts[i] : 0.0f;
	}
	if (rt->counts)
		for (size_t e = 0; e < E; e++)
			rt->counts[e] = counts[e];
	rt->n_dropped = dropped;
	host_stats(d, logits, R, T, counts, ids, wts, kept, W, rt, imp, s);
out:
	free(ids), free(counts), free(wts), free(logits), free(kept), free(imp), free(s);
	return st;
}

enum moe_status moe_cuda_forward(struct moe_cuda *c, uint32_t li, const void *x, void *y, size_t T,
				 struct moe_routing *rt, const struct moe_fwd_opts *opts, char *err,
				 size_t cap)
{
	if (!c || li >= c->d.n_moe_layers) {
		seterr(err, cap, "moe_cuda_forward: bad argument (layer index %u)", li);
		return MOE_ERR_ARG;
	}
	const struct moe_desc *d = &c->d;
	int training = opts && opts->training && d->noise != MOE_NOISE_NONE;
	if (training && d->noise == MOE_NOISE_JITTER && d->act_dtype != MOE_DTYPE_F32) {
		/* the jittered input is f32, which the kernels read as activations */
		seterr(err, cap,
		       "training-mode jitter with %s activations is not generated for target cuda",
		       moe_dtype_names[d->act_dtype < MOE_DTYPE_COUNT ? d->act_dtype : 0]);
		return MOE_ERR_UNSUPPORTED;
	}
	if (!c->layers[li].loaded) {
		seterr(err, cap, "no weights loaded on the device for this layer");
		return MOE_ERR_WEIGHTS;
	}
	size_t W = c->W, E = d->n_experts;
	if (T > (size_t)INT32_MAX / (W + 1) || T > (size_t)INT32_MAX) {
		seterr(err, cap, "too many tokens (%zu)", T);
		return MOE_ERR_ARG;
	}
	if (T == 0) {
		if (rt) {
			if (rt->counts)
				memset(rt->counts, 0, E * sizeof *rt->counts);
			if (rt->importance)
				memset(rt->importance, 0, E * sizeof *rt->importance);
			rt->importance_cv2 = rt->lb_loss = rt->z_loss = 0.0f;
			rt->n_dropped = 0;
		}
		return MOE_OK;
	}
	if (!x || !y) {
		seterr(err, cap, "moe_cuda_forward: %s is NULL", x ? "y" : "x");
		return MOE_ERR_ARG;
	}
	enum moe_status st = moe_cuda_reserve(c, T, err, cap);
	if (st != MOE_OK)
		return st;
	if ((st = enter(c, err, cap)) != MOE_OK)
		return st;
	const struct dev_layer *l = &c->layers[li];
	struct moe_cuda_args a = c->a;
	a.x = x;
	a.y = y;
	a.router = (const float *)(uintptr_t)l->router;
	a.router_bias = (const float *)(uintptr_t)l->rbias;
	a.select_bias = (const float *)(uintptr_t)l->sbias;
	a.shared_gate_w = (const float *)(uintptr_t)l->segw;
	a.up = (const void *)(uintptr_t)l->up;
	a.down = (const void *)(uintptr_t)l->down;
	a.bg = (const float *)(uintptr_t)l->bg;
	a.bu = (const float *)(uintptr_t)l->bu;
	a.bd = (const float *)(uintptr_t)l->bd;
	a.s_up = (const void *)(uintptr_t)l->s_up;
	a.s_down = (const void *)(uintptr_t)l->s_down;
	a.output_bias = (const float *)(uintptr_t)l->obias;
	a.T = (int64_t)T;
	a.small = T <= MOE_CUDA_ROUTE_SMALL_T;
	if (moe_cuda_has_capacity(d))
		a.capacity = capacity_of(d, T);
	if (d->mode == MOE_MODE_EXPERT_CHOICE) {
		/* each expert's tokens: the reference's ceil(T cf / E), at most T */
		uint64_t cv = moe_desc_scaled_count(d->ec_capacity_factor, T, E, 0);
		a.capacity = cv >= T ? (int64_t)T : (int64_t)cv;
	}
	a.training = training;
	if (training) {
		a.seed = (int64_t)opts->seed;
		a.layer = (int64_t)opts->layer;
	}
	size_t nb = (T + 31) / 32, slots = T * W;
	/* row tiles: each expert's rows round up to at most one extra tile */
	size_t tiles = (slots + MOE_CUDA_BM - 1) / MOE_CUDA_BM + (E < slots ? E : slots);
	unsigned tb = (unsigned)((T + MOE_CUDA_BM - 1) / MOE_CUDA_BM);
#define RUN(k, gx, gy, th)                                                                         \
	do {                                                                                       \
		if (st == MOE_OK)                                                                  \
			st = launch(c, k, (unsigned)(gx), (unsigned)(gy), th, &a, err, cap);       \
	} while (0)
	if (training && d->noise == MOE_NOISE_JITTER) {
		/* the router and the experts see the jittered input */
		RUN(K_JITTER, (T * d->hidden + 255) / 256, 1, 256);
		a.x = a.xj;
	}
	/* the noise rows of the router only in training */
	size_t rows = training ? c->rows : moe_cuda_noise_row(d);
	if (a.small)
		RUN(K_ROUTE_SMALL, (rows * c->chunks + 255) / 256, T, 256);
	else
		RUN(K_ROUTE_LOGITS, (T + 63) / 64, (rows + 63) / 64, 256);
	RUN(K_ROUTE_SELECT, T, 1, MOE_CUDA_SELECT_THREADS);
	if (d->mode == MOE_MODE_EXPERT_CHOICE)
		RUN(K_EC_SELECT, (T + 255) / 256, E, 256);
	if (moe_cuda_has_capacity(d)) {
		if (d->priority == MOE_PRIORITY_SCORE)
			RUN(K_CAP_ORDER, (T + 255) / 256, 1, 256);
		RUN(K_CAPACITY, (E + 127) / 128, 1, 128);
		if (moe_cuda_norm_after_drop(d))
			RUN(K_CAP_NORMALIZE, (T + 255) / 256, 1, 256);
	}
	if (st == MOE_OK) {
		CUresult r =
		    cu.cuMemsetD32Async((CUdeviceptr)(uintptr_t)a.mask, 0, nb * E, c->stream);
		if (r)
			st = cu_fail(err, cap, "cuMemsetD32Async", r);
	}
	RUN(K_GROUP_MASK, (slots + 255) / 256, 1, 256);
	RUN(K_GROUP_OFFSETS, 1, 1, 1024);
	RUN(K_GROUP_SCATTER, (slots + 255) / 256, 1, 256);
	RUN(K_UP, tiles, c->rg.up_rows / MOE_CUDA_BN, MOE_CUDA_GEMM_THREADS);
	RUN(K_DOWN, tiles, c->rg.down_rows / MOE_CUDA_BN, MOE_CUDA_GEMM_THREADS);
	if (c->sg.width) {
		RUN(K_SHARED_UP, tb, c->sg.up_rows / MOE_CUDA_BN, MOE_CUDA_GEMM_THREADS);
		RUN(K_SHARED_DOWN, tb, c->sg.down_rows / MOE_CUDA_BN, MOE_CUDA_GEMM_THREADS);
	}
	RUN(K_COMBINE, T, (d->hidden + MOE_CUDA_COMBINE_THREADS - 1) / MOE_CUDA_COMBINE_THREADS,
	    MOE_CUDA_COMBINE_THREADS);
#undef RUN
	if (st == MOE_OK && rt)
		st = read_routing(c, T, rt, err, cap);
	leave();
	return st;
}

/* Device memory for tools ------------------------------------------------------ */

enum moe_status moe_cuda_mem_alloc(struct moe_cuda *c, size_t bytes, void **dptr, char *err,
				   size_t cap)
{
	if (!c || !dptr) {
		seterr(err, cap, "moe_cuda_mem_alloc: NULL argument");
		return MOE_ERR_ARG;
	}
	*dptr = NULL;
	enum moe_status st = enter(c, err, cap);
	if (st != MOE_OK)
		return st;
	CUdeviceptr p = 0;
	st = dalloc(&p, bytes, err, cap);
	leave();
	*dptr = (void *)(uintptr_t)p;
	return st;
}

void moe_cuda_mem_free(struct moe_cuda *c, void *dptr)
{
	if (!c || !dptr || cu.cuCtxPushCurrent(c->ctx) != 0)
		return;
	cu.cuMemFree((CUdeviceptr)(uintptr_t)dptr);
	leave();
}

enum moe_status moe_cuda_memcpy(struct moe_cuda *c, void *dst, const void *src, size_t bytes,
				int to_device, char *err, size_t cap)
{
	if (!c || !dst || !src) {
		seterr(err, cap, "moe_cuda_memcpy: NULL argument");
		return MOE_ERR_ARG;
	}
	enum moe_status st = enter(c, err, cap);
	if (st != MOE_OK)
		return st;
	CUresult r = cu.cuStreamSynchronize(c->stream);
	if (!r)
		r = to_device ? copy_in(c, (CUdeviceptr)(uintptr_t)dst, src, bytes)
			      : cu.cuMemcpyDtoH(dst, (CUdeviceptr)(uintptr_t)src, bytes);
	if (!r && to_device)
		r = cu.cuStreamSynchronize(c->stream);
	leave();
	return r ? cu_fail(err, cap, "moe_cuda_memcpy", r) : MOE_OK;
}

enum moe_status moe_cuda_sync(struct moe_cuda *c, char *err, size_t cap)
{
	if (!c) {
		seterr(err, cap, "moe_cuda_sync: model is NULL");
		return MOE_ERR_ARG;
	}
	enum moe_status st = enter(c, err, cap);
	if (st != MOE_OK)
		return st;
	CUresult r = cu.cuStreamSynchronize(c->stream);
	leave();
	return r ? cu_fail(err, cap, "cuStreamSynchronize", r) : MOE_OK;
}

const char *moe_cuda_image_arch(const struct moe_cuda *c)
{
	return c ? c->arch : "";
}

int moe_cuda_device_cc(const struct moe_cuda *c)
{
	return c ? c->cc_major * 10 + c->cc_minor : 0;
}
