/* driver.c: an emulated libcuda.so.1 for tests without a GPU: the entry
 * points runtime/cuda_rt.c opens, over host memory. A "module image" is the
 * path of a shared object built from module.cpp (or MOE_EMU_MODULE); launches
 * run its kernels in the fiber emulation. moe_emu_live_allocs() counts unfreed allocations. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* clock_gettime */
#endif
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;

struct module {
	void *so;
	int (*find)(const char *);
	void (*launch)(int, const unsigned *, const unsigned *, void *);
	size_t (*arg_size)(int);
	struct function *fns;
};

struct function {
	struct module *m;
	int k;
	struct function *next;
};

static atomic_long live_allocs;
/* one emulated launch at a time: the fiber emulation has global state, and
 * callers may initialize several models from several threads */
static pthread_mutex_t launch_mu = PTHREAD_MUTEX_INITIALIZER;
static int ctx_dummy;

long moe_emu_live_allocs(void)
{
	return live_allocs;
}

CUresult cuInit(unsigned flags)
{
	(void)flags;
	return 0;
}

CUresult cuGetErrorName(CUresult e, const char **s)
{
	*s = e == 500 ? "CUDA_ERROR_NOT_FOUND" : "CUDA_ERROR_EMULATED";
	return 0;
}

CUresult cuGetErrorString(CUresult e, const char **s)
{
	*s = e == 500 ? "named symbol not found" : "emulated failure";
	return 0;
}

CUresult cuDeviceGetCount(int *n)
{
	*n = 1;
	return 0;
}

CUresult cuDeviceGet(int *d, int ordinal)
{
	*d = ordinal;
	return ordinal == 0 ? 0 : 101;
}

CUresult cuDeviceGetAttribute(int *v, int attr, int d)
{
	(void)d;
	const char *cc = getenv("MOE_EMU_CC"); /* "90": compute capability 9.0 */
	int c = cc ? atoi(cc) : 90;
	*v = attr == 75 ? c / 10 : attr == 76 ? c % 10 : 0;
	return 0;
}

CUresult cuDevicePrimaryCtxRetain(void **c, int d)
{
	(void)d;
	*c = &ctx_dummy;
	return 0;
}

CUresult cuDevicePrimaryCtxRelease_v2(int d)
{
	(void)d;
	return 0;
}

CUresult cuCtxGetCurrent(void **c)
{
	*c = NULL;
	return 0;
}

CUresult cuCtxGetDevice(int *d)
{
	*d = 0;
	return 0;
}

CUresult cuCtxPushCurrent_v2(void *c)
{
	return c == &ctx_dummy ? 0 : 201;
}

CUresult cuCtxPopCurrent_v2(void **c)
{
	if (c)
		*c = &ctx_dummy;
	return 0;
}

CUresult cuModuleLoadDataEx(struct module **out, const void *image, unsigned n, int *opts,
			    void **vals)
{
	(void)n, (void)opts, (void)vals;
	struct module *m = calloc(1, sizeof *m);
	if (!m)
		return 2;
	/* MOE_EMU_MODULE stands in for every image (tools that embed real cubins) */
	const char *path = getenv("MOE_EMU_MODULE");
	m->so = dlopen(path && *path ? path : (const char *)image, RTLD_NOW | RTLD_LOCAL);
	if (!m->so) {
		fprintf(stderr, "emu driver: %s\n", dlerror());
		free(m);
		return 218;
	}
	*(void **)&m->find = dlsym(m->so, "moe_emu_find");
	*(void **)&m->launch = dlsym(m->so, "moe_emu_launch");
	*(void **)&m->arg_size = dlsym(m->so, "moe_emu_arg_size");
	if (!m->find || !m->launch || !m->arg_size) {
		dlclose(m->so);
		free(m);
		return 218;
	}
	*out = m;
	return 0;
}

CUresult cuModuleUnload(struct module *m)
{
	while (m->fns) {
		struct function *f = m->fns;
		m->fns = f->next;
		free(f);
	}
	dlclose(m->so);
	free(m);
	return 0;
}

CUresult cuModuleGetFunction(struct function **out, struct module *m, const char *name)
{
	int k = m->find(name);
	if (k < 0)
		return 500;
	struct function *f = calloc(1, sizeof *f);
	if (!f)
		return 2;
	f->m = m;
	f->k = k;
	f->next = m->fns;
	m->fns = f;
	*out = f;
	return 0;
}

CUresult cuMemAlloc_v2(uintptr_t *p, size_t n)
{
	void *q = aligned_alloc(256, (n + 255) / 256 * 256);
	if (!q)
		return 2;
	/* fresh device memory is garbage, not zeros: kernels must not rely on it */
	memset(q, 0xa5, (n + 255) / 256 * 256);
	live_allocs++;
	*p = (uintptr_t)q;
	return 0;
}

CUresult cuMemFree_v2(uintptr_t p)
{
	if (p) {
		live_allocs--;
		free((void *)p);
	}
	return 0;
}

CUresult cuMemcpyHtoD_v2(uintptr_t dst, const void *src, size_t n)
{
	memcpy((void *)dst, src, n);
	return 0;
}

CUresult cuMemcpyDtoH_v2(void *dst, uintptr_t src, size_t n)
{
	memcpy(dst, (const void *)src, n);
	return 0;
}

/* Streams: a stream is an int that says whether it is capturing; a graph
 * is the list of launches and memsets captured, replayed in order. */
struct node {
	struct function *f; /* NULL: a memset */
	unsigned grid[3], block[3];
	void *arg;
	uintptr_t p;
	unsigned v;
	size_t n;
	struct node *next;
};

struct stream {
	int capturing;
	struct node *head, **tail;
};

static int capture_add(void *s, struct node *nd)
{
	struct stream *st = s;
	if (!st || !st->capturing)
		return 0;
	*st->tail = nd;
	st->tail = &nd->next;
	return 1;
}

static void node_run(const struct node *nd)
{
	pthread_mutex_lock(&launch_mu);
	if (nd->f) {
		nd->f->m->launch(nd->f->k, nd->grid, nd->block, nd->arg);
	} else {
		unsigned *q = (unsigned *)nd->p;
		for (size_t i = 0; i < nd->n; i++)
			q[i] = nd->v;
	}
	pthread_mutex_unlock(&launch_mu);
}

CUresult cuMemsetD32Async(uintptr_t p, unsigned v, size_t n, void *s)
{
	struct node *nd = calloc(1, sizeof *nd);
	if (!nd)
		return 2;
	nd->p = p, nd->v = v, nd->n = n;
	if (!capture_add(s, nd)) {
		node_run(nd);
		free(nd);
	}
	return 0;
}

CUresult cuMemsetD8_v2(uintptr_t p, unsigned char v, size_t n)
{
	memset((void *)p, v, n);
	return 0;
}

CUresult cuMemcpyHtoDAsync_v2(uintptr_t dst, const void *src, size_t n, void *s)
{
	struct stream *st = s;
	if (st && st->capturing)
		return 900; /* CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED */
	memcpy((void *)dst, src, n);
	return 0;
}

CUresult cuLaunchKernel(struct function *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
			unsigned by, unsigned bz, unsigned smem, void *s, void **params,
			void **extra)
{
	(void)smem, (void)extra;
	if (!gx || !gy || !gz || !bx || !by || !bz || bx * by * bz > 1024)
		return 1; /* CUDA_ERROR_INVALID_VALUE */
	struct node *nd = calloc(1, sizeof *nd);
	if (!nd)
		return 2;
	nd->f = f;
	nd->grid[0] = gx, nd->grid[1] = gy, nd->grid[2] = gz;
	nd->block[0] = bx, nd->block[1] = by, nd->block[2] = bz;
	nd->arg = params[0];
	if (capture_add(s, nd)) { /* the driver copies the parameters at capture */
		size_t n = f->m->arg_size(f->k);
		nd->arg = malloc(n);
		if (!nd->arg)
			return 2;
		memcpy(nd->arg, params[0], n);
		return 0;
	}
	node_run(nd);
	free(nd);
	return 0;
}

CUresult cuStreamCreate(struct stream **s, unsigned flags)
{
	(void)flags;
	*s = calloc(1, sizeof **s);
	return *s ? 0 : 2;
}

CUresult cuStreamDestroy_v2(struct stream *s)
{
	free(s);
	return 0;
}

CUresult cuStreamBeginCapture_v2(struct stream *s, int mode)
{
	(void)mode;
	if (!s || s->capturing)
		return 1;
	s->capturing = 1;
	s->head = NULL;
	s->tail = &s->head;
	return 0;
}

CUresult cuStreamEndCapture(struct stream *s, struct node **graph)
{
	if (!s || !s->capturing)
		return 1;
	s->capturing = 0;
	*graph = s->head;
	return 0;
}

CUresult cuGraphInstantiateWithFlags(struct node **exec, struct node *graph,
				     unsigned long long flags)
{
	(void)flags;
	*exec = graph;
	return 0;
}

CUresult cuGraphLaunch(const struct node *exec, void *s)
{
	(void)s;
	for (const struct node *nd = exec; nd; nd = nd->next)
		node_run(nd);
	return 0;
}

CUresult cuGraphExecDestroy(struct node *exec)
{
	(void)exec; /* the graph owns the nodes */
	return 0;
}

CUresult cuGraphDestroy(struct node *graph)
{
	while (graph) {
		struct node *nd = graph;
		graph = nd->next;
		if (nd->f)
			free(nd->arg);
		free(nd);
	}
	return 0;
}

/* Events: host time when recorded (every call above is synchronous). */
CUresult cuEventCreate(double **e, unsigned flags)
{
	(void)flags;
	*e = calloc(1, sizeof **e);
	return *e ? 0 : 2;
}

CUresult cuEventDestroy_v2(double *e)
{
	free(e);
	return 0;
}

CUresult cuEventRecord(double *e, void *s)
{
	(void)s;
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	*e = (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
	return 0;
}

CUresult cuEventSynchronize(double *e)
{
	(void)e;
	return 0;
}

CUresult cuEventElapsedTime(float *ms, const double *a, const double *b)
{
	*ms = (float)((*b - *a) * 1e3);
	return 0;
}

CUresult cuCtxSynchronize(void)
{
	return 0;
}

CUresult cuDeviceGetName(char *name, int len, int d)
{
	(void)d;
	snprintf(name, (size_t)len, "emulated device");
	return 0;
}

CUresult cuStreamSynchronize(void *s)
{
	(void)s;
	return 0;
}
