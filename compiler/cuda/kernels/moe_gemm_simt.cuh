/* moe_gemm_simt.cuh: the grouped GEMM tiles on CUDA cores, for f32 weights
 * (exact f32 products): the main loops of the up and down GEMMs and their
 * epilogues (activation, routing weight). Needs the generated constants
 * kHidden, kBM, kBN, kBK and moe_io.cuh. */
#pragma once

/* ---- grouped GEMM, f32 weights, on CUDA cores ----
 * 64 x 64 tiles, K steps of 32 double-buffered through registers into
 * transposed shared tiles; each thread owns 4 rows x 8 packed columns (GLU:
 * 4 gate columns and the 4 up columns of the same outputs). */
constexpr int kLdt = kBM + 4; /* [k][row] stride */

/* the f32 accumulators of a thread: 4 rows x 8 packed columns */
typedef float gemm_acc[4][8];

__device__ __forceinline__ void acc_zero(gemm_acc &acc)
{
	for (int i = 0; i < 4; i++)
		for (int j = 0; j < 8; j++)
			acc[i][j] = 0.0f;
}

struct __align__(16) gemm_smem
{
	float a[2][kBK * kLdt];
	float b[2][kBK * kLdt];
};

/* the thread's two groups of 4 packed columns */
template <bool GLU> __device__ __forceinline__ int col_a()
{
	const int tn = threadIdx.x & 7;
	return GLU ? 16 * (tn >> 1) + 4 * (tn & 1) : 8 * tn;
}

template <bool GLU> __device__ __forceinline__ int col_b()
{
	return col_a<GLU>() + (GLU ? 8 : 4);
}

__device__ __forceinline__ void store_t(float *S, const float (&v)[4][4])
{
#pragma unroll
	for (int i = 0; i < 4; i++)
#pragma unroll
		for (int j = 0; j < 4; j++)
			S[((threadIdx.x & 7) * 4 + j) * kLdt + (threadIdx.x >> 3) + 16 * i] =
			    v[i][j];
}

/* 64 rows of a row-major f32 matrix (row stride ld), all valid below n */
__device__ __forceinline__ void fetch_rows(float (&v)[4][4], const float *m, int ld, int n, int k0)
{
	const int k = k0 + (threadIdx.x & 7) * 4;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		const int r = (threadIdx.x >> 3) + 16 * i;
		if (r < n) {
			const float4 q = *(const float4 *)(m + (i64)r * ld + k);
			v[i][0] = q.x, v[i][1] = q.y, v[i][2] = q.z, v[i][3] = q.w;
		} else {
			v[i][0] = v[i][1] = v[i][2] = v[i][3] = 0.0f;
		}
	}
}

template <bool GLU>
__device__ __forceinline__ void fma_step(const float *As, const float *Bs, float (&acc)[4][8])
{
	const int tm = threadIdx.x >> 3, ca = col_a<GLU>(), cb = col_b<GLU>();
#pragma unroll 8
	for (int k = 0; k < kBK; k++) {
		const float4 av = *(const float4 *)(As + k * kLdt + tm * 4);
		const float4 b0 = *(const float4 *)(Bs + k * kLdt + ca);
		const float4 b1 = *(const float4 *)(Bs + k * kLdt + cb);
		const float ar[4] = {av.x, av.y, av.z, av.w};
		const float br[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
		for (int i = 0; i < 4; i++)
#pragma unroll
			for (int j = 0; j < 8; j++)
				acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
	}
}

template <class F>
__device__ __forceinline__ void up_loop(gemm_smem &sm, const act_t *x, const i64 (&tok)[4],
					const float (&sc)[4], const w_t *w, float (&acc)[4][8])
{
	constexpr int KT = F::up_k / kBK;
	float va[4][4], vb[4][4];
	fetch_x(va, x, tok, sc, 0);
	fetch_rows(vb, w, F::up_k, kBN, 0);
	store_t(sm.a[0], va);
	store_t(sm.b[0], vb);
	__syncthreads();
	for (int kt = 0; kt < KT; kt++) {
		const int cur = kt & 1;
		if (kt + 1 < KT) {
			fetch_x(va, x, tok, sc, (kt + 1) * kBK);
			fetch_rows(vb, w, F::up_k, kBN, (kt + 1) * kBK);
		}
		fma_step<F::glu>(sm.a[cur], sm.b[cur], acc);
		if (kt + 1 < KT) {
			store_t(sm.a[cur ^ 1], va);
			store_t(sm.b[cur ^ 1], vb);
		}
		__syncthreads();
	}
}

template <class F>
__device__ __forceinline__ void down_loop(gemm_smem &sm, const w_t *h, int n, const w_t *w,
					  float (&acc)[4][8])
{
	constexpr int KT = F::ld_h / kBK;
	float va[4][4], vb[4][4];
	fetch_rows(va, h, F::ld_h, n, 0);
	fetch_rows(vb, w, F::ld_h, kBN, 0);
	store_t(sm.a[0], va);
	store_t(sm.b[0], vb);
	__syncthreads();
	for (int kt = 0; kt < KT; kt++) {
		const int cur = kt & 1;
		if (kt + 1 < KT) {
			fetch_rows(va, h, F::ld_h, n, (kt + 1) * kBK);
			fetch_rows(vb, w, F::ld_h, kBN, (kt + 1) * kBK);
		}
		fma_step<false>(sm.a[cur], sm.b[cur], acc);
		if (kt + 1 < KT) {
			store_t(sm.a[cur ^ 1], va);
			store_t(sm.b[cur ^ 1], vb);
		}
		__syncthreads();
	}
}

template <class F>
__device__ __forceinline__ void up_store(const float (&acc)[4][8], w_t *h, int n, const float *bg,
					 const float *bu)
{
	const int tm = threadIdx.x >> 3, tn = threadIdx.x & 7;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		const int r = tm * 4 + i;
		if (r >= n)
			continue;
		w_t *hr = h + (i64)r * F::ld_h;
		if constexpr (F::glu) {
#pragma unroll
			for (int j = 0; j < 4; j++) {
				const int col =
				    blockIdx.y * (kBN / 2) + 8 * (tn >> 1) + 4 * (tn & 1) + j;
				float gv = acc[i][j], uv = acc[i][4 + j];
				if (bg)
					gv += bg[col];
				if (bu)
					uv += bu[col];
				hr[col] = ffn_glu_out<F>(gv, uv);
			}
		} else {
#pragma unroll
			for (int j = 0; j < 8; j++) {
				const int col = blockIdx.y * kBN + 8 * tn + j;
				hr[col] = ffn_act<F>(acc[i][j] + (bu ? bu[col] : 0.0f));
			}
		}
	}
}

__device__ __forceinline__ void down_store(const float (&acc)[4][8], float *out, int n,
					   const float *scale, const float *bd)
{
	const int tm = threadIdx.x >> 3, tn = threadIdx.x & 7;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		const int r = tm * 4 + i;
		if (r >= n)
			continue;
		const float w = scale ? scale[r] : 1.0f;
#pragma unroll
		for (int j = 0; j < 8; j++) {
			const int col = blockIdx.y * kBN + 8 * tn + j;
			if (col < kHidden)
				out[(i64)r * kHidden + col] =
				    w * (acc[i][j] + (bd ? bd[col] : 0.0f));
		}
	}
}
