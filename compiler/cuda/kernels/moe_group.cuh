/* moe_group.cuh: the slots grouped by expert, on the device, and the GEMM
 * row tile of a block. A slot with id -1 has no row. Needs the generated constants kExperts,
 * kRoute, kBM and kCapacity. */
#pragma once

/* ---- grouping by expert, on the device ----
 * mask[blk][e] has bit i set when token 32*blk + i chose expert e. A row's
 * place is its block's base plus the earlier tokens of the block: rows of
 * an expert are sorted by token, deterministically, without a sort. */

/* moe_group_mask: grid slots/256, 256 threads */
__device__ __forceinline__ void group_mask(const moe_args &a)
{
	const i64 s = blockIdx.x * 256LL + threadIdx.x;
	if (s >= a.T * kRoute)
		return;
	if constexpr (kCapacity)
		if (!a.kept[s])
			return;
	if (a.ids[s] < 0) /* no expert: top-p's unused slots, expert choice */
		return;
	const i64 t = s / kRoute;
	atomicOr(&a.mask[(t >> 5) * kExperts + a.ids[s]], 1u << (t & 31));
}

/* moe_group_offsets: counts, offsets and GEMM row tiles per expert, the base
 * row of every token block: one block of 1024 threads, experts in chunks of
 * 1024. */
__device__ __forceinline__ void group_offsets(const moe_args &a)
{
	__shared__ int wsum[32][2], carry[2];
	const i64 nb = (a.T + 31) >> 5;
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	if (threadIdx.x == 0)
		carry[0] = carry[1] = 0;
	__syncthreads();
	for (int e0 = 0; e0 < kExperts; e0 += 1024) {
		const int e = e0 + threadIdx.x;
		int n = 0;
		if (e < kExperts)
			for (i64 blk = 0; blk < nb; blk++)
				n += __popc(a.mask[blk * kExperts + e]);
		const int tiles = (n + kBM - 1) / kBM;
		/* exclusive scan of (n, tiles) over the block */
		int sn = n, st = tiles;
		for (int o = 1; o < 32; o <<= 1) {
			const int un = __shfl_up_sync(0xffffffffu, sn, o);
			const int ut = __shfl_up_sync(0xffffffffu, st, o);
			if (lane >= o)
				sn += un, st += ut;
		}
		if (lane == 31)
			wsum[warp][0] = sn, wsum[warp][1] = st;
		__syncthreads();
		if (warp == 0) {
			int vn = wsum[lane][0], vt = wsum[lane][1];
			for (int o = 1; o < 32; o <<= 1) {
				const int un = __shfl_up_sync(0xffffffffu, vn, o);
				const int ut = __shfl_up_sync(0xffffffffu, vt, o);
				if (lane >= o)
					vn += un, vt += ut;
			}
			wsum[lane][0] = vn, wsum[lane][1] = vt;
		}
		__syncthreads();
		const int bn = carry[0] + sn - n + (warp ? wsum[warp - 1][0] : 0);
		const int bt = carry[1] + st - tiles + (warp ? wsum[warp - 1][1] : 0);
		if (e < kExperts) {
			a.counts[e] = n;
			a.offsets[e] = bn;
			a.tstart[e] = bt;
			int run = bn;
			for (i64 blk = 0; blk < nb; blk++) {
				a.tbase[blk * kExperts + e] = run;
				run += __popc(a.mask[blk * kExperts + e]);
			}
		}
		__syncthreads();
		if (threadIdx.x == 0)
			carry[0] += wsum[31][0], carry[1] += wsum[31][1];
		__syncthreads();
	}
	if (threadIdx.x == 0)
		a.offsets[kExperts] = carry[0], a.tstart[kExperts] = carry[1];
}

/* moe_group_scatter: grid slots/256, 256 threads */
__device__ __forceinline__ void group_scatter(const moe_args &a)
{
	const i64 s = blockIdx.x * 256LL + threadIdx.x;
	if (s >= a.T * kRoute)
		return;
	if constexpr (kCapacity) {
		if (!a.kept[s]) {
			a.slot_row[s] = -1;
			return;
		}
	}
	if (a.ids[s] < 0) {
		a.slot_row[s] = -1;
		return;
	}
	const i64 t = s / kRoute;
	const i64 m = (t >> 5) * kExperts + a.ids[s];
	const int row = a.tbase[m] + __popc(a.mask[m] & ((1u << (t & 31)) - 1u));
	a.rows[row] = (int)t;
	a.row_w[row] = a.wts[s];
	a.slot_row[s] = row;
}

/* The GEMM row tile of this block: expert e, its rows [m0, m0 + n), which
 * are grouped rows row0 + [0, n). Blocks past the last tile have none. */
struct tile {
	int e, m0, n;
	i64 row0;
};

__device__ __forceinline__ bool find_tile(const moe_args &a, tile &tl)
{
	const int blk = blockIdx.x;
	if (blk >= a.tstart[kExperts])
		return false;
	int lo = 0, hi = kExperts - 1; /* the last expert starting at or before blk */
	while (lo < hi) {
		const int mid = (lo + hi + 1) >> 1;
		if (a.tstart[mid] <= blk)
			lo = mid;
		else
			hi = mid - 1;
	}
	tl.e = lo;
	tl.m0 = (blk - a.tstart[lo]) * kBM;
	tl.n = min(kBM, a.counts[lo] - tl.m0);
	tl.row0 = (i64)a.offsets[lo] + tl.m0;
	return true;
}
