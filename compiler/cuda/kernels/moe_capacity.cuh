/* moe_capacity.cuh: expert capacity on the device: the tokens' priority
 * order, the kept slots, the weights renormalized over what is kept. Needs
 * the generated constants kExperts, kRoute, kPriorityScore and moe_router.cuh
 * (normalize_scale). */
#pragma once

/* moe_cap_order: tokens by priority (top selection score, descending; ties to
 * the earlier token): each token counts the tokens ranked before it. Grid
 * T/256, 256 threads. */
__device__ __forceinline__ void cap_order(const moe_args &a)
{
	const i64 t = blockIdx.x * 256LL + threadIdx.x;
	if (t >= a.T)
		return;
	const float v = a.prio[t];
	i64 r = 0;
	for (i64 u = 0; u < a.T; u++)
		r += ranks_before(a.prio[u], u, v, t);
	a.order[r] = (int)t;
}

/* moe_capacity: each expert keeps its first a.capacity assignments, rank
 * outer and tokens inner in token (or, kPriorityScore, priority) order; the
 * rest overflow. One thread per expert: grid E/128, 128 threads. */
__device__ __forceinline__ void capacity(const moe_args &a)
{
	const int e = blockIdx.x * 128 + threadIdx.x;
	if (e >= kExperts)
		return;
	i64 fill = 0;
	for (int r = 0; r < kRoute; r++)
		for (i64 i = 0; i < a.T; i++) {
			const i64 s = (i64)(kPriorityScore ? a.order[i] : i) * kRoute + r;
			if (a.ids[s] != e)
				continue;
			a.kept[s] = fill < a.capacity;
			fill += fill < a.capacity;
		}
}

/* moe_cap_normalize: the weights the capacity kept, normalized and scaled per
 * token. Grid T/256, 256 threads. */
__device__ __forceinline__ void cap_normalize(const moe_args &a)
{
	const i64 t = blockIdx.x * 256LL + threadIdx.x;
	if (t < a.T)
		normalize_scale(a.wts + t * kRoute, a.kept + t * kRoute, kRoute);
}
