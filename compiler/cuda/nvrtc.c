/* nvrtc.c: NVRTC, opened with dlopen (moegen never links against CUDA):
 * compiles the generated CUDA C into a cubin for one sm_XY plus its PTX,
 * and always reads the program log, shown with the source's name on
 * failure. */
#include "cuda.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvrtcResult; /* 0: NVRTC_SUCCESS */
typedef struct _nvrtcProgram *nvrtcProgram;

/* The entry points moegen uses: name, return, parameters. */
#define MOE_NVRTC_FUNCS(X)                                                                         \
	X(nvrtcVersion, (int *major, int *minor))                                                  \
	X(nvrtcGetErrorString, (nvrtcResult r))                                                    \
	X(nvrtcCreateProgram, (nvrtcProgram * p, const char *src, const char *name, int n,         \
			       const char *const *headers, const char *const *include_names))      \
	X(nvrtcDestroyProgram, (nvrtcProgram * p))                                                 \
	X(nvrtcCompileProgram, (nvrtcProgram p, int n, const char *const *opts))                   \
	X(nvrtcGetPTXSize, (nvrtcProgram p, size_t * n))                                           \
	X(nvrtcGetPTX, (nvrtcProgram p, char *ptx))                                                \
	X(nvrtcGetCUBINSize, (nvrtcProgram p, size_t * n))                                         \
	X(nvrtcGetCUBIN, (nvrtcProgram p, char *cubin))                                            \
	X(nvrtcGetProgramLogSize, (nvrtcProgram p, size_t * n))                                    \
	X(nvrtcGetProgramLog, (nvrtcProgram p, char *log))                                         \
	X(nvrtcGetNumSupportedArchs, (int *n))                                                     \
	X(nvrtcGetSupportedArchs, (int *archs))

/* nvrtcGetErrorString returns a string, every other entry a result. */
#define RET_nvrtcGetErrorString const char *
#define FIELD_(name, params) RET_##name(*name) params;
#define RET_nvrtcVersion nvrtcResult
#define RET_nvrtcCreateProgram nvrtcResult
#define RET_nvrtcDestroyProgram nvrtcResult
#define RET_nvrtcCompileProgram nvrtcResult
#define RET_nvrtcGetPTXSize nvrtcResult
#define RET_nvrtcGetPTX nvrtcResult
#define RET_nvrtcGetCUBINSize nvrtcResult
#define RET_nvrtcGetCUBIN nvrtcResult
#define RET_nvrtcGetProgramLogSize nvrtcResult
#define RET_nvrtcGetProgramLog nvrtcResult
#define RET_nvrtcGetNumSupportedArchs nvrtcResult
#define RET_nvrtcGetSupportedArchs nvrtcResult

static struct {
	MOE_NVRTC_FUNCS(FIELD_)
} nv;

static pthread_once_t open_once = PTHREAD_ONCE_INIT;
static int open_ok;
static char open_err[2560];
static int archs[64], n_archs;

/* Where NVRTC is looked for, in order. The handle stays open for the life of
 * the process (its state must stay reachable). */
static void *try_open(char *tried, size_t cap)
{
	char path[4096];
	const char *env = getenv("MOE_NVRTC");
	const char *home = getenv("CUDA_HOME");
	const char *cands[4];
	int n = 0;
	static char homebuf[4096];
	if (env && *env)
		cands[n++] = env;
	if (home && *home) {
		snprintf(homebuf, sizeof homebuf, "%s/lib64/libnvrtc.so", home);
		cands[n++] = homebuf;
	}
	cands[n++] = "/usr/local/cuda/lib64/libnvrtc.so";
	cands[n++] = "libnvrtc.so";
	size_t used = 0;
	tried[0] = 0;
	for (int i = 0; i < n; i++) {
		snprintf(path, sizeof path, "%s", cands[i]);
		void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
		if (h)
			return h;
		/* versioned sonames next to an unversioned name that is missing */
		for (int v = 13; v >= 11 && !h; v--) {
			char vp[4200];
			snprintf(vp, sizeof vp, "%s.%d", path, v);
			h = dlopen(vp, RTLD_NOW | RTLD_LOCAL);
		}
		if (h)
			return h;
		int w = snprintf(tried + used, cap - used, "%s%s", used ? ", " : "", cands[i]);
		if (w > 0 && (size_t)w < cap - used)
			used += (size_t)w;
	}
	return NULL;
}

static void do_open(void)
{
	char tried[2048];
	void *h = try_open(tried, sizeof tried);
	if (!h) {
		snprintf(open_err, sizeof open_err,
			 "NVRTC not found (tried %s; set CUDA_HOME or MOE_NVRTC)", tried);
		return;
	}
#define LOAD_(name, params)                                                                        \
	*(void **)&nv.name = dlsym(h, #name);                                                      \
	if (!nv.name) {                                                                            \
		snprintf(open_err, sizeof open_err, "NVRTC lacks the symbol %s", #name);           \
		return;                                                                            \
	}
	MOE_NVRTC_FUNCS(LOAD_)
#undef LOAD_
	int n = 0;
	if (nv.nvrtcGetNumSupportedArchs(&n) == 0 && n > 0 &&
	    n <= (int)(sizeof archs / sizeof *archs) && nv.nvrtcGetSupportedArchs(archs) == 0)
		n_archs = n;
	open_ok = 1;
}

int moe_nvrtc_open(char *err, size_t cap)
{
	pthread_once(&open_once, do_open);
	if (open_ok)
		return 0;
	if (err && cap)
		snprintf(err, cap, "%s", open_err);
	return -1;
}

void moe_nvrtc_version(char *buf, size_t cap)
{
	int ma = 0, mi = 0;
	if (cap)
		buf[0] = 0;
	if (moe_nvrtc_open(NULL, 0) == 0 && nv.nvrtcVersion(&ma, &mi) == 0)
		snprintf(buf, cap, "%d.%d", ma, mi);
}

/* "sm_90" / "compute_90" -> 90; -1 when malformed. */
static int arch_number(const char *arch)
{
	const char *p = !strncmp(arch, "sm_", 3)        ? arch + 3
			: !strncmp(arch, "compute_", 8) ? arch + 8
							: NULL;
	if (!p || !*p)
		return -1;
	int v = 0;
	for (; *p; p++) {
		if (*p < '0' || *p > '9' || v > 10000)
			return -1;
		v = v * 10 + (*p - '0');
	}
	return v;
}

int moe_nvrtc_supports(const char *arch)
{
	int v = arch_number(arch);
	if (v < 0 || moe_nvrtc_open(NULL, 0) != 0)
		return 0;
	if (!n_archs)
		return 1; /* cannot tell: let the compile decide */
	for (int i = 0; i < n_archs; i++)
		if (archs[i] == v)
			return 1;
	return 0;
}

void moe_nvrtc_out_free(struct moe_nvrtc_out *o)
{
	free(o->cubin);
	free(o->ptx);
	free(o->log);
	memset(o, 0, sizeof *o);
}

int moe_nvrtc_compile(const char *src, const char *name, const char *arch, int want_cubin,
		      int want_ptx, struct moe_nvrtc_out *out, char *err, size_t cap)
{
	memset(out, 0, sizeof *out);
	if (moe_nvrtc_open(err, cap) != 0)
		return -1;
	if (arch_number(arch) < 0) {
		snprintf(err, cap, "unknown CUDA arch '%s' (expected sm_XY, e.g. sm_90)", arch);
		return -1;
	}
	nvrtcProgram prog = NULL;
	nvrtcResult r = nv.nvrtcCreateProgram(&prog, src, name, 0, NULL, NULL);
	if (r != 0) {
		snprintf(err, cap, "%s: nvrtcCreateProgram failed: %s", name,
			 nv.nvrtcGetErrorString(r));
		return -1;
	}
	char archopt[64];
	snprintf(archopt, sizeof archopt, "--gpu-architecture=%s", arch);
	/* no fast math: the kernels promise the reference's formulas */
	const char *opts[] = {archopt, "--std=c++17"};
	r = nv.nvrtcCompileProgram(prog, (int)(sizeof opts / sizeof *opts), opts);
	size_t ln = 0;
	if (nv.nvrtcGetProgramLogSize(prog, &ln) != 0)
		ln = 0;
	out->log = malloc(ln + 1);
	if (!out->log) {
		snprintf(err, cap, "out of memory");
		goto fail;
	}
	out->log[0] = 0;
	if (ln && nv.nvrtcGetProgramLog(prog, out->log) != 0)
		out->log[0] = 0;
	out->log[ln] = 0;
	if (r != 0) {
		snprintf(err, cap, "%s: NVRTC compilation for %s failed (%s):\n%s", name, arch,
			 nv.nvrtcGetErrorString(r), out->log);
		goto fail;
	}
	if (want_cubin) {
		size_t n = 0;
		if ((r = nv.nvrtcGetCUBINSize(prog, &n)) != 0 || n == 0) {
			snprintf(err, cap, "%s: NVRTC produced no cubin for %s (%s)", name, arch,
				 r ? nv.nvrtcGetErrorString(r) : "empty");
			goto fail;
		}
		out->cubin = malloc(n);
		if (!out->cubin || nv.nvrtcGetCUBIN(prog, (char *)out->cubin) != 0) {
			snprintf(err, cap, "%s: cannot read the cubin for %s", name, arch);
			goto fail;
		}
		out->cubin_size = n;
	}
	if (want_ptx) {
		size_t n = 0;
		if ((r = nv.nvrtcGetPTXSize(prog, &n)) != 0 || n == 0) {
			snprintf(err, cap, "%s: NVRTC produced no PTX for %s (%s)", name, arch,
				 r ? nv.nvrtcGetErrorString(r) : "empty");
			goto fail;
		}
		out->ptx = malloc(n + 1);
		if (!out->ptx || nv.nvrtcGetPTX(prog, out->ptx) != 0) {
			snprintf(err, cap, "%s: cannot read the PTX for %s", name, arch);
			goto fail;
		}
		out->ptx[n] = 0;
		/* the size counts the NUL NVRTC wrote */
		out->ptx_size = strlen(out->ptx) + 1;
	}
	nv.nvrtcDestroyProgram(&prog);
	return 0;
fail:
	nv.nvrtcDestroyProgram(&prog);
	moe_nvrtc_out_free(out);
	return -1;
}
