/* moe_experts.cuh: the expert kernels (the grouped up and down GEMMs of the
 * routed experts, the shared FFN over every token) and the combine. Needs the
 * generated constants, moe_group.cuh (find_tile) and one of moe_gemm_mma.cuh
 * / moe_gemm_simt.cuh. F is an FFN's geometry and activation (the generated
 * routed_ffn or shared_ffn). */
#pragma once

/* ---- the expert kernels: grid (row tiles, column tiles), 128 threads ---- */

/* moe_up: h[rows of expert e] = act(x[tokens] . gate_e^T) * (x[tokens] .
 * up_e^T), the input scaled by the routing weight with kInputScaled */
template <class F> __device__ __forceinline__ void expert_up(const moe_args &a)
{
	tile tl;
	if (!find_tile(a, tl))
		return;
	__shared__ gemm_smem sm;
	i64 tok[4];
	float sc[4];
	for (int i = 0; i < 4; i++) {
		const int r = (threadIdx.x >> 3) + 16 * i;
		tok[i] = r < tl.n ? a.rows[tl.row0 + r] : -1;
		if constexpr (kInputScaled)
			sc[i] = r < tl.n ? a.row_w[tl.row0 + r] : 0.0f;
		else
			sc[i] = 1.0f;
	}
	gemm_acc acc;
	acc_zero(acc);
	const i64 wrow = (i64)tl.e * F::up_rows + blockIdx.y * kBN;
	const w_t *w = (const w_t *)a.up + wrow * F::up_k;
	up_loop<F>(sm, (const act_t *)a.x, tok, sc, w, acc);
	up_store<F>(acc, (w_t *)a.h + tl.row0 * F::ld_h, tl.n,
		    kExpertBias && F::glu ? a.bg + (i64)tl.e * F::ld_h : nullptr,
		    kExpertBias ? a.bu + (i64)tl.e * F::ld_h : nullptr);
}

/* moe_down: o[rows of expert e] = routing weight * (h . down_e^T + bias); the
 * weight left out with kInputScaled, the bias with !kExpertBias */
template <class F> __device__ __forceinline__ void expert_down(const moe_args &a)
{
	tile tl;
	if (!find_tile(a, tl))
		return;
	__shared__ gemm_smem sm;
	gemm_acc acc;
	acc_zero(acc);
	const i64 wrow = (i64)tl.e * F::down_rows + blockIdx.y * kBN;
	const w_t *w = (const w_t *)a.down + wrow * F::ld_h;
	down_loop<F>(sm, (const w_t *)a.h + tl.row0 * F::ld_h, tl.n, w, acc);
	down_store(acc, a.o + tl.row0 * kHidden, tl.n, kInputScaled ? nullptr : a.row_w + tl.row0,
		   kExpertBias ? a.bd + (i64)tl.e * F::down_rows : nullptr);
}

/* moe_shared_up: the shared FFN over every token: grid (token tiles, column
 * tiles) */
template <class F> __device__ __forceinline__ void shared_up(const moe_args &a)
{
	const i64 m0 = blockIdx.x * (i64)kBM;
	const int n = (int)min((i64)kBM, a.T - m0);
	__shared__ gemm_smem sm;
	i64 tok[4];
	const float sc[4] = {1.0f, 1.0f, 1.0f, 1.0f};
	for (int i = 0; i < 4; i++) {
		const int r = (threadIdx.x >> 3) + 16 * i;
		tok[i] = r < n ? m0 + r : -1;
	}
	gemm_acc acc;
	acc_zero(acc);
	const w_t *w = (const w_t *)a.s_up + (i64)blockIdx.y * kBN * F::up_k;
	up_loop<F>(sm, (const act_t *)a.x, tok, sc, w, acc);
	up_store<F>(acc, (w_t *)a.hs + m0 * F::ld_h, n, nullptr, nullptr);
}

/* moe_shared_down: os = shared(x), times the sigmoid gate with kSharedGate */
template <class F> __device__ __forceinline__ void shared_down(const moe_args &a)
{
	const i64 m0 = blockIdx.x * (i64)kBM;
	const int n = (int)min((i64)kBM, a.T - m0);
	__shared__ gemm_smem sm;
	gemm_acc acc;
	acc_zero(acc);
	const w_t *w = (const w_t *)a.s_down + (i64)blockIdx.y * kBN * F::ld_h;
	down_loop<F>(sm, (const w_t *)a.hs + m0 * F::ld_h, n, w, acc);
	down_store(acc, a.os + m0 * kHidden, n, kSharedGate ? a.sgate + m0 : nullptr, nullptr);
}

/* ---- combine: y[t] = the token's rows in rank order (kPassthrough: w * x[t]
 * for a dropped slot), then the shared FFN (kShared), then the output bias
 * (kOutputBias) ----
 * moe_combine: grid (tokens, column blocks of 256) */
__device__ __forceinline__ void combine(const moe_args &a)
{
	const i64 t = blockIdx.x;
	const int col = blockIdx.y * 256 + threadIdx.x;
	if (col >= kHidden)
		return;
	float acc = 0.0f;
	for (int j = 0; j < kRoute; j++) {
		const int r = a.slot_row[t * kRoute + j];
		if (r >= 0)
			acc += a.o[(i64)r * kHidden + col];
		else if (kPassthrough)
			acc +=
			    a.wts[t * kRoute + j] * ld_act((const act_t *)a.x + t * kHidden + col);
	}
	if constexpr (kShared)
		acc += a.os[t * kHidden + col];
	if constexpr (kOutputBias)
		acc += a.output_bias[col];
	st_act((act_t *)a.y + t * kHidden + col, acc);
}
