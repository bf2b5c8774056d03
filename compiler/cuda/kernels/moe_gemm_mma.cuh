/* moe_gemm_mma.cuh: the grouped GEMM tiles on tensor cores, for bf16 and
 * f16 weights: the main loops of the up and down GEMMs and their epilogues
 * (activation, routing weight). Needs the generated constants kHidden, kBM,
 * kBN, kBK, kWeightDtype and moe_io.cuh. */
#pragma once

/* ---- grouped GEMM on tensor cores ----
 * 64 x 64 tiles, K steps of 32 double-buffered in shared memory (weights by
 * cp.async, activations through registers), four warps of 32 x 32, each a
 * 2 x 4 grid of mma.sync m16n8k16 with f32 accumulators. */
constexpr int kLds = kBK + 8; /* shared row stride: 80 bytes, no bank conflicts for ldmatrix */

#ifndef MOE_CUDA_EMULATION
__device__ __forceinline__ unsigned smem_u32(const void *p)
{
	return (unsigned)__cvta_generic_to_shared(p);
}

/* 16 bytes global -> shared; zero-filled when !full */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool full)
{
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src),
		     "r"(full ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit()
{
	asm volatile("cp.async.commit_group;");
}

template <int N> __device__ __forceinline__ void cp_async_wait()
{
	asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void *p)
{
	asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
		     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
		     : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
					  unsigned b1)
{
	if constexpr (kWeightDtype == dtype::f16)
		asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
			     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
			     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
			     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
	else
		asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
			     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
			     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
			     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#else /* the host emulation's warp-level versions */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool full)
{
	emu_cp_async16(dst, src, full);
}
__device__ __forceinline__ void cp_async_commit()
{
}
template <int N> __device__ __forceinline__ void cp_async_wait()
{
}
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void *p)
{
	emu_ldsm_x4(r, p);
}
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
					  unsigned b1)
{
	if constexpr (kWeightDtype == dtype::f16)
		emu_mma_16816_f16(c, a, b0, b1);
	else
		emu_mma_16816_bf16(c, a, b0, b1);
}
#endif

/* the f32 accumulators of a thread: the warp's 2 x 4 grid of m16n8 tiles */
typedef float gemm_acc[2][4][4];

__device__ __forceinline__ void acc_zero(gemm_acc &acc)
{
	for (int i = 0; i < 2; i++)
		for (int j = 0; j < 4; j++)
			for (int q = 0; q < 4; q++)
				acc[i][j][q] = 0.0f;
}

struct __align__(16) gemm_smem
{
	bits16 a[2][kBM * kLds]; /* [row][k] */
	bits16 b[2][kBN * kLds]; /* [packed weight row][k] */
};

/* One K step of the warp's 32 x 32 tile. */
__device__ __forceinline__ void mma_step(const bits16 *As, const bits16 *Bs, float (&acc)[2][4][4])
{
	const int lane = threadIdx.x & 31, wm = (threadIdx.x >> 5) & 1, wn = threadIdx.x >> 6;
#pragma unroll
	for (int kk = 0; kk < kBK; kk += 16) {
		unsigned af[2][4], bfr[2][4];
#pragma unroll
		for (int mi = 0; mi < 2; mi++)
			ldsm_x4(af[mi], As + (wm * 32 + mi * 16 + (lane & 15)) * kLds + kk +
					    (lane >> 4) * 8);
#pragma unroll
		for (int nj = 0; nj < 2; nj++) /* two n8 tiles per ldmatrix */
			ldsm_x4(bfr[nj],
				Bs + (wn * 32 + nj * 16 + (lane >> 4) * 8 + (lane & 7)) * kLds +
				    kk + ((lane >> 3) & 1) * 8);
#pragma unroll
		for (int mi = 0; mi < 2; mi++)
#pragma unroll
			for (int ni = 0; ni < 4; ni++)
				mma_16816(acc[mi][ni], af[mi], bfr[ni >> 1][(ni & 1) * 2],
					  bfr[ni >> 1][(ni & 1) * 2 + 1]);
	}
}

/* 64 packed weight rows x kBK from row stride ld, K offset k0 */
__device__ __forceinline__ void load_w(bits16 *Bs, const w_t *w, int ld, int k0)
{
#pragma unroll
	for (int i = 0; i < 2; i++) {
		const int c = threadIdx.x + i * 128, r = c >> 2, k = (c & 3) * 8;
		cp_async16(Bs + r * kLds + k, w + (i64)r * ld + k0 + k, true);
	}
}

/* rows [0, n) of h (contiguous grouped rows), zero past n */
__device__ __forceinline__ void load_h(bits16 *As, const w_t *h, int ld, int n, int k0)
{
#pragma unroll
	for (int i = 0; i < 2; i++) {
		const int c = threadIdx.x + i * 128, r = c >> 2, k = (c & 3) * 8;
		cp_async16(As + r * kLds + k, r < n ? h + (i64)r * ld + k0 + k : h, r < n);
	}
}

__device__ __forceinline__ void store_x(bits16 *As, const float (&v)[4][4])
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		const int r = (threadIdx.x >> 3) + 16 * i, k = (threadIdx.x & 7) * 4;
		*(uint2 *)(As + r * kLds + k) =
		    make_uint2(pack_w2(v[i][0], v[i][1]), pack_w2(v[i][2], v[i][3]));
	}
}

/* acc += X[tok] . W^T over K = F::up_k: the up GEMM main loop */
template <class F>
__device__ __forceinline__ void up_loop(gemm_smem &sm, const act_t *x, const i64 (&tok)[4],
					const float (&sc)[4], const w_t *w, float (&acc)[2][4][4])
{
	constexpr int KT = F::up_k / kBK;
	float v[4][4];
	fetch_x(v, x, tok, sc, 0);
	store_x(sm.a[0], v);
	load_w(sm.b[0], w, F::up_k, 0);
	cp_async_commit();
	for (int kt = 0; kt < KT; kt++) {
		const int cur = kt & 1;
		if (kt + 1 < KT) {
			load_w(sm.b[cur ^ 1], w, F::up_k, (kt + 1) * kBK);
			cp_async_commit();
			fetch_x(v, x, tok, sc, (kt + 1) * kBK);
			cp_async_wait<1>();
		} else {
			cp_async_wait<0>();
		}
		__syncthreads();
		mma_step(sm.a[cur], sm.b[cur], acc);
		if (kt + 1 < KT)
			store_x(sm.a[cur ^ 1], v);
		__syncthreads();
	}
}

/* acc += H[0, n) . W^T over K = F::ld_h: the down GEMM main loop */
template <class F>
__device__ __forceinline__ void down_loop(gemm_smem &sm, const w_t *h, int n, const w_t *w,
					  float (&acc)[2][4][4])
{
	constexpr int KT = F::ld_h / kBK;
	load_h(sm.a[0], h, F::ld_h, n, 0);
	load_w(sm.b[0], w, F::ld_h, 0);
	cp_async_commit();
	for (int kt = 0; kt < KT; kt++) {
		const int cur = kt & 1;
		if (kt + 1 < KT) {
			load_h(sm.a[cur ^ 1], h, F::ld_h, n, (kt + 1) * kBK);
			load_w(sm.b[cur ^ 1], w, F::ld_h, (kt + 1) * kBK);
			cp_async_commit();
			cp_async_wait<1>();
		} else {
			cp_async_wait<0>();
		}
		__syncthreads();
		mma_step(sm.a[cur], sm.b[cur], acc);
		__syncthreads();
	}
}

/* Up epilogue: h[row, col] = act(gate) * up (GLU: n8 tiles 2p, 2p+1 are the
 * gate and up of the same 8 columns) or act(up), biases added first. */
template <class F>
__device__ __forceinline__ void up_store(const float (&acc)[2][4][4], w_t *h, int n,
					 const float *bg, const float *bu)
{
	const int lane = threadIdx.x & 31, wm = (threadIdx.x >> 5) & 1, wn = threadIdx.x >> 6;
#pragma unroll
	for (int mi = 0; mi < 2; mi++)
#pragma unroll
		for (int half = 0; half < 2; half++) {
			const int r = wm * 32 + mi * 16 + (lane >> 2) + half * 8;
			if (r >= n)
				continue;
			w_t *hr = h + (i64)r * F::ld_h;
			if constexpr (F::glu) {
#pragma unroll
				for (int p = 0; p < 2; p++) {
					const int col = blockIdx.y * (kBN / 2) + wn * 16 + p * 8 +
							(lane & 3) * 2;
					float g0 = acc[mi][2 * p][half * 2],
					      g1 = acc[mi][2 * p][half * 2 + 1];
					float u0 = acc[mi][2 * p + 1][half * 2],
					      u1 = acc[mi][2 * p + 1][half * 2 + 1];
					if (bg)
						g0 += bg[col], g1 += bg[col + 1];
					if (bu)
						u0 += bu[col], u1 += bu[col + 1];
					*(unsigned *)(hr + col) =
					    pack_w2(ffn_glu_out<F>(g0, u0), ffn_glu_out<F>(g1, u1));
				}
			} else {
#pragma unroll
				for (int ni = 0; ni < 4; ni++) {
					const int col =
					    blockIdx.y * kBN + wn * 32 + ni * 8 + (lane & 3) * 2;
					float u0 = acc[mi][ni][half * 2],
					      u1 = acc[mi][ni][half * 2 + 1];
					if (bu)
						u0 += bu[col], u1 += bu[col + 1];
					*(unsigned *)(hr + col) =
					    pack_w2(ffn_act<F>(u0), ffn_act<F>(u1));
				}
			}
		}
}

/* Down epilogue: out[row, col] = scale[row] * (acc + bias[col]), f32 */
__device__ __forceinline__ void down_store(const float (&acc)[2][4][4], float *out, int n,
					   const float *scale, const float *bd)
{
	const int lane = threadIdx.x & 31, wm = (threadIdx.x >> 5) & 1, wn = threadIdx.x >> 6;
#pragma unroll
	for (int mi = 0; mi < 2; mi++)
#pragma unroll
		for (int half = 0; half < 2; half++) {
			const int r = wm * 32 + mi * 16 + (lane >> 2) + half * 8;
			if (r >= n)
				continue;
			const float w = scale ? scale[r] : 1.0f;
#pragma unroll
			for (int ni = 0; ni < 4; ni++)
#pragma unroll
				for (int q = 0; q < 2; q++) {
					const int col = blockIdx.y * kBN + wn * 32 + ni * 8 +
							(lane & 3) * 2 + q;
					if (col < kHidden)
						out[(i64)r * kHidden + col] =
						    w * (acc[mi][ni][half * 2 + q] +
							 (bd ? bd[col] : 0.0f));
				}
		}
}
