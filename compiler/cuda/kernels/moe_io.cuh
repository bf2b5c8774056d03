/* moe_io.cuh: the model's storage types (activations f32 or bf16; weights
 * and h bf16, f16 or f32), their loads and stores, the activation functions
 * and the load-time weight packing. Needs the generated constants kActDtype,
 * kWeightDtype, kHidden, kActAlpha and kActLimit. */
#pragma once

template <dtype D> struct storage {
	typedef bits16 type; /* bf16 or f16 */
};
template <> struct storage<dtype::f32> {
	typedef float type;
};
typedef storage<kActDtype>::type act_t;  /* activations */
typedef storage<kWeightDtype>::type w_t; /* weights and h */

/* activations: f32 or bf16 */
__device__ __forceinline__ float ld_act(const float *p)
{
	return *p;
}
__device__ __forceinline__ float ld_act(const bits16 *p)
{
	return bf16_to_f32(*p);
}
__device__ __forceinline__ void st_act(float *p, float v)
{
	*p = v;
}
__device__ __forceinline__ void st_act(bits16 *p, float v)
{
	*p = f32_to_bf16(v);
}

/* four consecutive activations (16-byte aligned rows, H % 4 == 0) */
__device__ __forceinline__ void ld_act4(const float *p, float (&v)[4])
{
	const float4 q = *(const float4 *)p;
	v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
__device__ __forceinline__ void ld_act4(const bits16 *p, float (&v)[4])
{
	const uint2 q = *(const uint2 *)p;
	v[0] = __uint_as_float(q.x << 16), v[1] = __uint_as_float(q.x & 0xffff0000u);
	v[2] = __uint_as_float(q.y << 16), v[3] = __uint_as_float(q.y & 0xffff0000u);
}

/* one value in the weight type */
template <dtype D = kWeightDtype> __device__ __forceinline__ typename storage<D>::type to_w(float v)
{
	if constexpr (D == dtype::bf16)
		return f32_to_bf16(v);
	else if constexpr (D == dtype::f16)
		return f32_to_f16(v);
	else
		return v;
}

/* two values in a 16-bit weight type packed for one 32-bit operand register:
 * lo first */
template <dtype D = kWeightDtype> __device__ __forceinline__ unsigned pack_w2(float lo, float hi)
{
#ifndef MOE_CUDA_EMULATION
	unsigned r;
	if constexpr (D == dtype::f16)
		asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
	else
		asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
	return r;
#else
	if constexpr (D == dtype::f16)
		return emu_f32_to_f16(lo) | (unsigned)emu_f32_to_f16(hi) << 16;
	else
		return emu_f32_to_bf16(lo) | (unsigned)emu_f32_to_bf16(hi) << 16;
#endif
}

/* act(v) of one activation, f32, the formulas of the reference */
template <act_fn A> __device__ __forceinline__ float apply_act(float v)
{
	if constexpr (A == act_fn::silu) {
		return v / (1.0f + expf(-v));
	} else if constexpr (A == act_fn::gelu) {
		return 0.5f * v * (1.0f + erff(v * 0.707106781f));
	} else if constexpr (A == act_fn::gelu_tanh) {
		return 0.5f * v * (1.0f + tanhf(0.797884561f * (v + 0.044715f * v * v * v)));
	} else if constexpr (A == act_fn::relu) {
		return v > 0.0f ? v : 0.0f;
	} else { /* swiglu_oai: the clamped gate */
		const float c = fminf(v, kActLimit);
		return c / (1.0f + expf(-kActAlpha * c));
	}
}

/* The activation of an FFN F (the generated routed_ffn, shared_ffn). */
template <class F> __device__ __forceinline__ float ffn_act(float v)
{
	return apply_act<F::act>(v);
}

/* the GLU output of one column of F from its gate and up values */
template <class F> __device__ __forceinline__ float ffn_glu_out(float gate, float up)
{
	if constexpr (F::act == act_fn::swiglu_oai) {
		const float u = fminf(fmaxf(up, -kActLimit), kActLimit);
		return apply_act<F::act>(gate) * (u + 1.0f);
	} else {
		return apply_act<F::act>(gate) * up;
	}
}

/* Gathered activation rows: thread rows (tid >> 3) + 16 i, columns 4 (tid & 7),
 * token tok[i] (< 0: none), scaled by sc[i]. */
__device__ __forceinline__ void fetch_x(float (&v)[4][4], const act_t *x, const i64 (&tok)[4],
					const float (&sc)[4], int k0)
{
	const int k = k0 + (threadIdx.x & 7) * 4;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if constexpr (kHidden % 4 == 0) {
			if (tok[i] >= 0 && k < kHidden)
				ld_act4(x + tok[i] * kHidden + k, v[i]);
			else
				v[i][0] = v[i][1] = v[i][2] = v[i][3] = 0.0f;
		} else {
			for (int j = 0; j < 4; j++)
				v[i][j] = tok[i] >= 0 && k + j < kHidden
					      ? ld_act(x + tok[i] * kHidden + k + j)
					      : 0.0f;
		}
#pragma unroll
		for (int j = 0; j < 4; j++)
			v[i][j] *= sc[i];
	}
}

/* ---- load: canonical f32 [rows, cols] -> packed [dst_rows, dst_cols] ----
 * glu: a = gate, b = up, interleaved by 8 rows; zero past rows and cols. */
__device__ __forceinline__ void pack(const moe_pack_args &p)
{
	const i64 n = p.dst_rows * p.dst_cols;
	for (i64 i = blockIdx.x * 256LL + threadIdx.x; i < n; i += (i64)gridDim.x * 256) {
		const i64 r = i / p.dst_cols, k = i % p.dst_cols;
		const float *src = p.a;
		i64 sr = r;
		if (p.glu) {
			sr = (r >> 4) * 8 + (r & 7);
			src = (r & 15) < 8 ? p.a : p.b;
		}
		const float v = sr < p.rows && k < p.cols ? src[sr * p.cols + k] : 0.0f;
		((w_t *)p.dst)[i] = to_w(v);
	}
}
