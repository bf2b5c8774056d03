/* moe_base.cuh: the fixed ground of every generated CUDA source: storage
 * types and conversions, the formula enums the generated constants name, the
 * kernel arguments and the deterministic block reductions. Needs nothing of
 * the model; the generated constants come right after it. */
#pragma once

/* ---- storage types and conversions (round to nearest even) ---- */
typedef unsigned short bits16; /* bf16 or f16 */
typedef long long i64;

/* The formulas a model picks; the spellings of the spec (docs/spec.md). */
enum class dtype { f32, bf16, f16 };
enum class score_fn { softmax, sigmoid, sqrtsoftplus };
enum class norm_fn { none, sum, lp };
enum class group_score { max, sum_top2 };
enum class act_fn { silu, gelu, gelu_tanh, relu, swiglu_oai };
/* the router families of runtime/core/moe_modes.def this code generates */
enum class route_mode { topk, top_p, sparsemixer, hierarchical, expert_choice };

__device__ __forceinline__ float bf16_to_f32(bits16 h)
{
	return __uint_as_float((unsigned)h << 16);
}

/* PTX helpers have a host version (MOE_CUDA_EMULATION, tests/cuda_emu) */
__device__ __forceinline__ bits16 f32_to_bf16(float f)
{
#ifndef MOE_CUDA_EMULATION
	bits16 r;
	asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
	return r;
#else
	return emu_f32_to_bf16(f);
#endif
}

__device__ __forceinline__ bits16 f32_to_f16(float f)
{
#ifndef MOE_CUDA_EMULATION
	bits16 r;
	asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
	return r;
#else
	return emu_f32_to_f16(f);
#endif
}

__device__ __forceinline__ float neg_inf()
{
	return __int_as_float(0xff800000);
}

/* The one argument of every forward kernel: struct moe_cuda_args of
 * runtime/cuda/cuda_rt.h, pointers then 64-bit integers. */
struct moe_args {
	const void *x;
	void *y;
	const float *router, *router_bias, *select_bias, *shared_gate_w;
	const void *up, *down;
	const float *bg, *bu, *bd;
	const void *s_up, *s_down;
	const float *output_bias;
	float *partials;
	unsigned *done;
	float *logits, *scores, *sel, *gscore;
	int *ids;
	float *wts, *prio, *sgate;
	unsigned char *kept;
	int *order;
	unsigned *mask;
	int *tbase, *counts, *offsets, *tstart;
	int *rows;
	float *row_w;
	int *slot_row;
	void *h, *hs;
	float *o, *os;
	float *xj;
	i64 T, small, capacity;
	i64 training, seed, layer;
};

/* The argument of moe_pack: canonical f32 [rows, cols] -> packed
 * [dst_rows, dst_cols]; glu: a = gate, b = up, interleaved by 8 rows. */
struct moe_pack_args {
	const float *a, *b;
	void *dst;
	i64 rows, cols, dst_rows, dst_cols, glu;
};

/* ---- the counter-based random numbers of the reference (runtime/ref) ---- */
__device__ __forceinline__ unsigned long long mix64(unsigned long long z)
{
	z += 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

__device__ __forceinline__ unsigned long long
rng_hash(unsigned long long seed, unsigned long long a, unsigned long long b, unsigned long long c)
{
	return mix64(mix64(mix64(mix64(seed) ^ a) ^ b) ^ c);
}

/* [0, 1) from the 24 high bits */
__device__ __forceinline__ float rng_uniform(unsigned long long h)
{
	return __fmul_rn((float)(h >> 40), 0x1p-24f);
}

/* a standard normal draw (Box-Muller in double) for (seed, a, b, c) */
__device__ __forceinline__ float rng_normal(unsigned long long seed, unsigned long long a,
					    unsigned long long b, unsigned long long c)
{
	const double u1 = rng_uniform(rng_hash(seed, a, b, c));
	const double u2 = rng_uniform(rng_hash(seed, a, b, c ^ (1ull << 63)));
	const double r = sqrt(__dmul_rn(-2.0, log(1.0 - u1)));
	return (float)__dmul_rn(r, cos(__dmul_rn(2.0 * 3.14159265358979323846, u2)));
}

/* ---- block reductions (256 threads), in a fixed order: deterministic ---- */
__device__ __forceinline__ float block_sum(float v)
{
	__shared__ float part[8];
	for (int o = 16; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	if ((threadIdx.x & 31) == 0) /* lane 0's order of the warp's sum */
		part[threadIdx.x >> 5] = v;
	__syncthreads();
	float s = part[0];
	for (int w = 1; w < 8; w++)
		s += part[w];
	__syncthreads();
	return s;
}

/* the maximum, NaN ignored like `if (v > m) m = v` */
__device__ __forceinline__ float block_max(float v)
{
	__shared__ float part[8];
	for (int o = 16; o > 0; o >>= 1) {
		const float u = __shfl_xor_sync(0xffffffffu, v, o);
		v = u > v ? u : v;
	}
	if ((threadIdx.x & 31) == 0)
		part[threadIdx.x >> 5] = v;
	__syncthreads();
	float m = part[0];
	for (int w = 1; w < 8; w++)
		m = part[w] > m ? part[w] : m;
	__syncthreads();
	return m;
}

/* a ranks before b: larger value, then smaller key; NaN ranks last */
__device__ __forceinline__ bool ranks_before(float va, i64 ka, float vb, i64 kb)
{
	const bool na = va != va, nb = vb != vb;
	if (na != nb)
		return nb;
	if (!na && va != vb)
		return va > vb;
	return ka < kb;
}

/* The entry of v[0, n) that comes right after (pv, pk) in the ranking (pk < 0:
 * the first): one pass of the block, so k rounds give the top k in order
 * without marking anything. */
__device__ int block_next(const float *v, int n, float pv, int pk)
{
	__shared__ float sv[8];
	__shared__ int sk[8];
	float bv = 0.0f;
	int bk = -1;
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		const float x = v[i];
		if (pk >= 0 && !ranks_before(pv, pk, x, i))
			continue;
		if (bk < 0 || ranks_before(x, i, bv, bk))
			bv = x, bk = i;
	}
	for (int o = 16; o > 0; o >>= 1) {
		const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
		const int ok = __shfl_xor_sync(0xffffffffu, bk, o);
		if (ok >= 0 && (bk < 0 || ranks_before(ov, ok, bv, bk)))
			bv = ov, bk = ok;
	}
	if ((threadIdx.x & 31) == 0)
		sv[threadIdx.x >> 5] = bv, sk[threadIdx.x >> 5] = bk;
	__syncthreads();
	float rv = sv[0];
	int rk = sk[0];
	for (int w = 1; w < 8; w++)
		if (sk[w] >= 0 && (rk < 0 || ranks_before(sv[w], sk[w], rv, rk)))
			rv = sv[w], rk = sk[w];
	__syncthreads();
	return rk;
}
