/* emu.h: a host emulation of the CUDA subset that moegen's generated kernels
 * use, so tests can run them without a GPU: every CUDA thread is a fiber
 * of one OS thread, blocks run one after another, __syncthreads
 * and the warp-level operations (shuffles, ldmatrix, mma.sync m16n8k16)
 * are barriers over the fibers. Included before the generated source, with
 * MOE_CUDA_EMULATION defined, by module.cpp. */
#ifndef MOE_CUDA_EMU_H
#define MOE_CUDA_EMU_H

#define MOE_CUDA_EMULATION 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#ifdef EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) alignas(n)

struct emu_dim3 {
	unsigned x, y, z;
};

struct float4 {
	float x, y, z, w;
};

struct uint2 {
	unsigned x, y;
};

static inline uint2 make_uint2(unsigned x, unsigned y)
{
	return uint2{x, y};
}

/* Fibers ------------------------------------------------------------------- */

/* A fiber switch. On x86-64 it saves the callee-saved registers on the old
 * stack and its stack pointer in *save, then resumes the stack at next (the
 * kernels leave MXCSR and the x87 control word alone, so they are not
 * switched). glibc's swapcontext also saves the signal mask with two system
 * calls per switch: that cost 95 % of the emulation's time. Elsewhere,
 * ucontext. */
#if defined(__x86_64__)
#define EMU_FAST_SWITCH 1
extern "C" void emu_switch(void **save, void *next);
__asm__(".text\n"
	".p2align 4\n"
	".hidden emu_switch\n"
	".globl emu_switch\n"
	".type emu_switch, @function\n"
	"emu_switch:\n"
	"\tpushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n"
	"\tmovq %rsp, (%rdi)\n"
	"\tmovq %rsi, %rsp\n"
	"\tpopq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n"
	"\tret\n"
	".size emu_switch, .-emu_switch\n");
#endif

struct emu_bar {
	int count;
	unsigned gen;
};

struct emu_fiber {
#ifdef EMU_FAST_SWITCH
	void *sp;
#else
	ucontext_t ctx;
#endif
	emu_dim3 tid;
	int lane, warp, done;
};

enum { EMU_MAX_THREADS = 1024, EMU_STACK = 128 * 1024, EMU_SLOTS = 8 };

struct emu_state {
	emu_dim3 block_idx, block_dim, grid_dim;
	emu_fiber *cur;
	emu_fiber fib[EMU_MAX_THREADS];
	char *stacks;
#ifdef EMU_FAST_SWITCH
	void *sched_sp;
#else
	ucontext_t sched;
#endif
#ifdef EMU_ASAN
	void *fake_stack;         /* the scheduler's, while a fiber runs */
	const void *sched_bottom; /* the scheduler's stack, told by ASan */
	size_t sched_size;
#endif
	int n, live;
	emu_bar block_bar;
	emu_bar warp_bar[EMU_MAX_THREADS / 32];
	int warp_live[EMU_MAX_THREADS / 32];
	uint64_t slot[EMU_MAX_THREADS][EMU_SLOTS]; /* per-lane exchange words */
	const void *ptr[EMU_MAX_THREADS];
	void (*body)(void *);
	void *arg;
	int progress;
};

static emu_state emu;

#define threadIdx (emu.cur->tid)
#define blockIdx (emu.block_idx)
#define blockDim (emu.block_dim)
#define gridDim (emu.grid_dim)

static inline char *emu_stack(const emu_fiber *f)
{
	return emu.stacks + (size_t)(f - emu.fib) * EMU_STACK;
}

/* The scheduler resumes fiber f, until it yields or ends. */
static inline void emu_resume(emu_fiber *f)
{
	emu.cur = f;
#ifdef EMU_ASAN
	__sanitizer_start_switch_fiber(&emu.fake_stack, emu_stack(f), EMU_STACK);
#endif
#ifdef EMU_FAST_SWITCH
	emu_switch(&emu.sched_sp, f->sp);
#else
	swapcontext(&emu.sched, &f->ctx);
#endif
#ifdef EMU_ASAN
	__sanitizer_finish_switch_fiber(emu.fake_stack, NULL, NULL);
#endif
}

/* The running fiber returns to the scheduler (for good when it has ended). */
static inline void emu_to_sched(int ended)
{
#ifdef EMU_ASAN
	void *fake = NULL;
	__sanitizer_start_switch_fiber(ended ? NULL : &fake, emu.sched_bottom, emu.sched_size);
#else
	(void)ended;
#endif
#ifdef EMU_FAST_SWITCH
	emu_switch(&emu.cur->sp, emu.sched_sp);
#else
	swapcontext(&emu.cur->ctx, &emu.sched);
#endif
#ifdef EMU_ASAN
	__sanitizer_finish_switch_fiber(fake, &emu.sched_bottom, &emu.sched_size);
#endif
}

static inline void emu_yield()
{
	emu_to_sched(0);
}

/* Wait until n participants (n re-read: threads may exit) have arrived. */
static inline void emu_bar_wait(emu_bar &b, const int *n)
{
	unsigned g = b.gen;
	if (++b.count >= *n) {
		b.count = 0;
		b.gen++;
		emu.progress = 1;
		return;
	}
	while (b.gen == g) {
		if (b.count >= *n) { /* the others exited */
			b.count = 0;
			b.gen++;
			emu.progress = 1;
			break;
		}
		emu_yield();
	}
}

static inline void __syncthreads()
{
	emu_bar_wait(emu.block_bar, &emu.live);
}

static inline void emu_warp_sync()
{
	int w = emu.cur->warp;
	emu_bar_wait(emu.warp_bar[w], &emu.warp_live[w]);
}

static void emu_entry()
{
#ifdef EMU_ASAN
	__sanitizer_finish_switch_fiber(NULL, &emu.sched_bottom, &emu.sched_size);
#endif
	emu.body(emu.arg);
	emu.cur->done = 1;
	emu.live--;
	emu.warp_live[emu.cur->warp]--;
	emu.progress = 1;
	emu_to_sched(1); /* never resumed */
	abort();
}

/* the fiber stacks go with the module (dlclose) */
__attribute__((destructor)) static void emu_fini()
{
	free(emu.stacks);
	emu.stacks = NULL;
}

/* Run one block of the kernel body (called once per thread). */
static void emu_run_block(void (*body)(void *), void *arg)
{
	if (!emu.stacks) {
		emu.stacks = (char *)malloc((size_t)EMU_MAX_THREADS * EMU_STACK);
		if (!emu.stacks) {
			fprintf(stderr, "emu: out of memory\n");
			abort();
		}
	}
	int n = (int)(emu.block_dim.x * emu.block_dim.y * emu.block_dim.z);
	if (n > EMU_MAX_THREADS || emu.block_dim.y != 1 || emu.block_dim.z != 1) {
		fprintf(stderr, "emu: unsupported block shape\n");
		abort();
	}
	emu.n = emu.live = n;
	emu.body = body;
	emu.arg = arg;
	memset(&emu.block_bar, 0, sizeof emu.block_bar);
	memset(emu.warp_bar, 0, sizeof emu.warp_bar);
	for (int w = 0; w < (n + 31) / 32; w++)
		emu.warp_live[w] = n - 32 * w < 32 ? n - 32 * w : 32;
	for (int i = 0; i < n; i++) {
		emu_fiber *f = &emu.fib[i];
		f->tid = emu_dim3{(unsigned)i, 0, 0};
		f->lane = i & 31;
		f->warp = i >> 5;
		f->done = 0;
#ifdef EMU_FAST_SWITCH
		/* emu_switch pops six registers and returns into emu_entry, which
		 * then sees the stack a call would leave (rsp + 8 a multiple of 16) */
		void **top = (void **)(emu_stack(f) + EMU_STACK);
		top[-2] = (void *)emu_entry;
		for (int r = 3; r <= 8; r++)
			top[-r] = NULL;
		f->sp = top - 8;
#else
		getcontext(&f->ctx);
		f->ctx.uc_stack.ss_sp = emu_stack(f);
		f->ctx.uc_stack.ss_size = EMU_STACK;
		f->ctx.uc_link = NULL;
		makecontext(&f->ctx, emu_entry, 0);
#endif
	}
	while (emu.live > 0) {
		emu.progress = 0;
		for (int i = 0; i < n; i++) {
			if (emu.fib[i].done)
				continue;
			emu_resume(&emu.fib[i]);
		}
		if (!emu.progress && emu.live > 0) {
			fprintf(stderr, "emu: deadlock (threads wait at different barriers)\n");
			abort();
		}
	}
	emu.cur = NULL;
}

/* Builtins ------------------------------------------------------------------ */

static inline float __uint_as_float(unsigned u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}

static inline float __int_as_float(int i)
{
	return __uint_as_float((unsigned)i);
}

static inline unsigned emu_float_bits(float f)
{
	unsigned u;
	memcpy(&u, &f, 4);
	return u;
}

static inline float __fmaf_rn(float a, float b, float c)
{
	return fmaf(a, b, c);
}

static inline float __fadd_rn(float a, float b)
{
	volatile float r = a + b;
	return r;
}

static inline float __fmul_rn(float a, float b)
{
	volatile float r = a * b;
	return r;
}

static inline double __dadd_rn(double a, double b)
{
	volatile double r = a + b;
	return r;
}

static inline double __dmul_rn(double a, double b)
{
	volatile double r = a * b;
	return r;
}

static inline int min(int a, int b)
{
	return a < b ? a : b;
}

static inline long long min(long long a, long long b)
{
	return a < b ? a : b;
}

static inline int __popc(unsigned v)
{
	return __builtin_popcount(v);
}

static inline unsigned atomicOr(unsigned *p, unsigned v)
{
	unsigned o = *p;
	*p = o | v;
	return o;
}

static inline unsigned atomicAdd(unsigned *p, unsigned v)
{
	unsigned o = *p;
	*p = o + v;
	return o;
}

static inline void __threadfence()
{
}

/* round to nearest even, NaN kept quiet */
static inline unsigned short emu_f32_to_bf16(float f)
{
	unsigned u = emu_float_bits(f);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (unsigned short)((u >> 16) | 0x40);
	u += 0x7fffu + ((u >> 16) & 1);
	return (unsigned short)(u >> 16);
}

static inline float emu_bf16_to_f32(unsigned short h)
{
	return __uint_as_float((unsigned)h << 16);
}

static inline unsigned short emu_f32_to_f16(float f)
{
	_Float16 h = (_Float16)f;
	unsigned short r;
	memcpy(&r, &h, 2);
	return r;
}

static inline float emu_f16_to_f32(unsigned short v)
{
	_Float16 h;
	memcpy(&h, &v, 2);
	return (float)h;
}

template <class T> static inline T emu_exchange(T v, int src_lane)
{
	int base = emu.cur->warp * 32;
	uint64_t w = 0;
	memcpy(&w, &v, sizeof v);
	emu.slot[base + emu.cur->lane][0] = w;
	emu_warp_sync();
	T r = v;
	if (src_lane >= 0 && src_lane < 32)
		memcpy(&r, &emu.slot[base + src_lane][0], sizeof r);
	emu_warp_sync();
	return r;
}

template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int o)
{
	(void)mask;
	return emu_exchange(v, emu.cur->lane ^ o);
}

template <class T> static inline T __shfl_up_sync(unsigned mask, T v, int d)
{
	(void)mask;
	int src = emu.cur->lane - d;
	T r = emu_exchange(v, src < 0 ? emu.cur->lane : src);
	return r;
}

template <class T> static inline T __shfl_sync(unsigned mask, T v, int src)
{
	(void)mask;
	return emu_exchange(v, src);
}

/* cp.async done at once: a stricter order than the hardware's */
static inline void emu_cp_async16(void *dst, const void *src, bool full)
{
	if (full)
		memcpy(dst, src, 16);
	else
		memset(dst, 0, 16);
}

/* ldmatrix .x4: lanes 8j..8j+7 give the row addresses of matrix j; lane l
 * gets row l/4, columns 2(l%4), +1 of each matrix. */
static inline void emu_ldsm_x4(unsigned (&r)[4], const void *p)
{
	int base = emu.cur->warp * 32, l = emu.cur->lane;
	emu.ptr[base + l] = p;
	emu_warp_sync();
	for (int j = 0; j < 4; j++) {
		const unsigned short *row = (const unsigned short *)emu.ptr[base + 8 * j + l / 4];
		r[j] = row[2 * (l % 4)] | (unsigned)row[2 * (l % 4) + 1] << 16;
	}
	emu_warp_sync();
}

/* mma.sync m16n8k16, A row-major 16x16, B column 16x8, f32 accumulate, from
 * the fragment layouts of the PTX ISA (g = lane / 4, t = lane % 4):
 *   a0 (g, 2t..2t+1) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..)
 *   b0 (k 2t..2t+1, n g) b1 (k 2t+8.., n g)
 *   c0, c1 (g, 2t..2t+1) c2, c3 (g+8, 2t..2t+1) */
template <int F16>
static inline void emu_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
{
	int base = emu.cur->warp * 32, l = emu.cur->lane;
	uint64_t *s = emu.slot[base + l];
	s[0] = a[0], s[1] = a[1], s[2] = a[2], s[3] = a[3], s[4] = b0, s[5] = b1;
	emu_warp_sync();
	auto half = [](uint64_t w, int hi) {
		unsigned short v = (unsigned short)(hi ? w >> 16 : w);
		return F16 ? emu_f16_to_f32(v) : emu_bf16_to_f32(v);
	};
	auto A = [&](int row, int k) {
		int reg = (row >= 8) + 2 * (k >= 8), kk = k & 7;
		return half(emu.slot[base + (row & 7) * 4 + kk / 2][reg], kk & 1);
	};
	auto B = [&](int k, int n) {
		int kk = k & 7;
		return half(emu.slot[base + n * 4 + kk / 2][4 + (k >= 8)], kk & 1);
	};
	int g = l / 4, t = l % 4;
	float out[4];
	for (int q = 0; q < 4; q++) {
		int row = g + (q >= 2 ? 8 : 0), col = 2 * t + (q & 1);
		double acc = 0.0;
		for (int k = 0; k < 16; k++)
			acc += (double)A(row, k) * (double)B(k, col);
		out[q] = (float)(acc + (double)c[q]);
	}
	emu_warp_sync();
	for (int q = 0; q < 4; q++)
		c[q] = out[q];
}

static inline void emu_mma_16816_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0,
				      unsigned b1)
{
	emu_mma<0>(c, a, b0, b1);
}

static inline void emu_mma_16816_f16(float (&c)[4], const unsigned (&a)[4], unsigned b0,
				     unsigned b1)
{
	emu_mma<1>(c, a, b0, b1);
}

/* Launch: every block of the grid in order. */
static inline void emu_launch(void (*body)(void *), void *arg, emu_dim3 grid, emu_dim3 block)
{
	emu.grid_dim = grid;
	emu.block_dim = block;
	for (unsigned z = 0; z < grid.z; z++)
		for (unsigned y = 0; y < grid.y; y++)
			for (unsigned x = 0; x < grid.x; x++) {
				emu.block_idx = emu_dim3{x, y, z};
				emu_run_block(body, arg);
			}
}

#endif
