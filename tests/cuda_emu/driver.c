/* driver.c: an emulated libcuda.so.1 for tests without a GPU: the entry
 * points runtime/cuda_rt.c opens, over host memory. A "module image" is the
 * path of a shared object built from module.cpp (or MOE_EMU_MODULE); launches
 * run its kernels in the fiber emulation. moe_emu_live_allocs() counts unfreed allocations. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;

struct module {
	void *so;
	int (*find)(const char *);
	void (*launch)(int, const unsigned *, const unsigned *, void *);
	struct function *fns;
};

struct function {
	struct module *m;
	int k;
	struct function *next;
};

static long live_allocs;
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
	if (!m->find || !m->launch) {
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

CUresult cuMemsetD32Async(uintptr_t p, unsigned v, size_t n, void *s)
{
	(void)s;
	unsigned *q = (unsigned *)p;
	for (size_t i = 0; i < n; i++)
		q[i] = v;
	return 0;
}

CUresult cuLaunchKernel(struct function *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
			unsigned by, unsigned bz, unsigned smem, void *s, void **params,
			void **extra)
{
	(void)smem, (void)s, (void)extra;
	if (!gx || !gy || !gz || !bx || !by || !bz || bx * by * bz > 1024)
		return 1; /* CUDA_ERROR_INVALID_VALUE */
	unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
	f->m->launch(f->k, grid, block, params[0]);
	return 0;
}

CUresult cuStreamSynchronize(void *s)
{
	(void)s;
	return 0;
}
