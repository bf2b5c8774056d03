/* moe_router.cuh: the router, on the device: logits (tiled, or by chunk
 * partials for small T), the training noise, scores, selection bias, group
 * limits, top-k, top-p, sparsemixer, the hierarchical gates, expert choice,
 * normalized and scaled weights, the shared experts' gate. Needs the
 * generated constants (shapes, kMode, kScore, kNorm, kDense, kRouterRows,
 * the feature flags). */
#pragma once

/* routing weights: normalize (kNorm) over the kept slots in rank order;
 * keep null: every slot */
__device__ void normalize_w(float *w, const unsigned char *keep, int n)
{
	if constexpr (kNorm != norm_fn::none) {
		float S;
		if constexpr (kNorm == norm_fn::lp) { /* the p-norm */
			double acc = 0.0;
			for (int j = 0; j < n; j++)
				if (!keep || keep[j])
					acc += pow(fabs((double)w[j]), kNormP);
			S = (float)pow(acc, 1.0 / kNormP);
		} else { /* the sum */
			S = 0.0f;
			for (int j = 0; j < n; j++)
				if (!keep || keep[j])
					S += w[j];
		}
		float den = S + kNormEps;
		if (den < kNormMin)
			den = kNormMin;
		if (den > 0.0f)
			for (int j = 0; j < n; j++)
				if (!keep || keep[j])
					w[j] = w[j] / den;
	}
}

/* normalized, then scaled by kScale */
__device__ void normalize_scale(float *w, const unsigned char *keep, int n)
{
	normalize_w(w, keep, n);
	for (int j = 0; j < n; j++)
		if (!keep || keep[j])
			w[j] = w[j] * kScale;
}

/* scores of n logits by one thread, in index order: the reference's formulas
 * and summation order exactly (the small gates of the hierarchical router) */
__device__ void seq_score(const float *l, float *s, int n)
{
	if constexpr (kScore == score_fn::softmax) {
		float m = neg_inf();
		for (int i = 0; i < n; i++)
			m = l[i] > m ? l[i] : m;
		float z = 0.0f;
		for (int i = 0; i < n; i++) {
			s[i] = (float)exp((double)(l[i] - m));
			z += s[i];
		}
		for (int i = 0; i < n; i++)
			s[i] = s[i] / z;
	} else if constexpr (kScore == score_fn::sigmoid) {
		for (int i = 0; i < n; i++)
			s[i] = (float)(1.0 / (1.0 + exp(-(double)l[i])));
	} else {
		for (int i = 0; i < n; i++) {
			const double v = l[i];
			const float sp = (float)(v > 20.0 ? v : log1p(exp(v)));
			s[i] = (float)sqrt((double)sp);
		}
	}
}

/* softmax of n logits by the block: exp in double, block sums */
__device__ void block_softmax(const float *l, float *s, int n)
{
	float m = neg_inf();
	for (int e = threadIdx.x; e < n; e += blockDim.x)
		m = l[e] > m ? l[e] : m;
	m = block_max(m);
	float z = 0.0f;
	for (int e = threadIdx.x; e < n; e += blockDim.x) {
		const float v = (float)exp((double)(l[e] - m));
		s[e] = v;
		z += v;
	}
	z = block_sum(z);
	for (int e = threadIdx.x; e < n; e += blockDim.x)
		s[e] = s[e] / z;
	__syncthreads();
}

/* ---- router ----
 * A logit is the sum, in chunk order, of fma chains over K chunks of kRChunk
 * columns in column order. Both router kernels compute exactly that, so a
 * token's routing never depends on the batch size. The router matrix has
 * kRouterRows rows: the kExperts router rows, the group gate (hierarchical,
 * from kGroupRow), then the noise rows (learned noise, from kNoiseRow),
 * which only training computes. */

/* the router rows a call computes */
__device__ __forceinline__ int router_rows(const moe_args &a)
{
	return kLearnedNoise && a.training ? kRouterRows : kNoiseRow;
}

/* moe_route_logits: logits of 64 tokens x 64 experts per block, 4 x 4 per
 * thread; grid (T/64, E/64), 256 threads */
__device__ __forceinline__ void route_logits(const moe_args &a)
{
	__shared__ float xs[64][kRChunk + 1], rs[64][kRChunk + 1];
	const i64 t0 = blockIdx.x * 64LL;
	const int e0 = blockIdx.y * 64, tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
	const int rows = router_rows(a);
	const act_t *x = (const act_t *)a.x;
	float tot[4][4], acc[4][4];
	for (int i = 0; i < 4; i++)
		for (int j = 0; j < 4; j++)
			tot[i][j] = 0.0f;
	for (int h0 = 0; h0 < kHidden; h0 += kRChunk) {
		const int n = min(kRChunk, kHidden - h0);
		for (int i = threadIdx.x; i < 64 * kRChunk; i += 256) {
			const int r = i / kRChunk, k = i % kRChunk;
			const i64 t = t0 + r;
			const int e = e0 + r;
			xs[r][k] = t < a.T && k < n ? ld_act(x + t * kHidden + h0 + k) : 0.0f;
			rs[r][k] = e < rows && k < n ? a.router[(i64)e * kHidden + h0 + k] : 0.0f;
		}
		__syncthreads();
		for (int i = 0; i < 4; i++)
			for (int j = 0; j < 4; j++)
				acc[i][j] = 0.0f;
		for (int k = 0; k < n; k++)
			for (int i = 0; i < 4; i++)
				for (int j = 0; j < 4; j++)
					acc[i][j] = __fmaf_rn(xs[ty * 4 + i][k], rs[tx * 4 + j][k],
							      acc[i][j]);
		for (int i = 0; i < 4; i++)
			for (int j = 0; j < 4; j++)
				tot[i][j] = __fadd_rn(tot[i][j], acc[i][j]);
		__syncthreads();
	}
	for (int i = 0; i < 4; i++)
		for (int j = 0; j < 4; j++) {
			const i64 t = t0 + ty * 4 + i;
			const int e = e0 + tx * 4 + j;
			if (t < a.T && e < rows)
				a.logits[t * kRouterRows + e] = tot[i][j];
		}
}

/* Top-k of v[0, n) in rank order into ids[0, k) (thread 0 writes), plus
 * base: value descending, ties to the lower index. */
__device__ void block_topk(const float *v, int n, int k, int *ids, int base)
{
	int pk = -1;
	float pv = 0.0f;
	for (int j = 0; j < k; j++) {
		pk = block_next(v, n, pv, pk);
		pv = v[pk];
		if (threadIdx.x == 0)
			ids[j] = base + pk;
	}
	__syncthreads();
}

/* sparsemixer (inference): the first expert by logit, its weight the softmax
 * of the logits within 2 eps (relative) of it; then the same for the best of
 * the others with the first masked out. c is scratch of kExperts. */
__device__ void route_sparsemixer(const float *l, float *s, float *c, int *ids, float *wts)
{
	const int e1 = block_next(l, kExperts, 0.0f, -1);
	const float m1 = l[e1];
	for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
		const float den = fabsf(l[e]) > m1 ? fabsf(l[e]) : m1;
		c[e] = (m1 - l[e]) / den > kSparseEps2 ? neg_inf() : l[e];
	}
	__syncthreads();
	block_softmax(c, s, kExperts);
	const float w1 = s[e1];
	const int e2 = block_next(l, kExperts, m1, e1);
	const float m2 = l[e2];
	for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
		const float den = fabsf(l[e]) > m2 ? fabsf(l[e]) : m2;
		c[e] = e == e1 || (m2 - l[e]) / den > kSparseEps2 ? neg_inf() : l[e];
	}
	__syncthreads();
	block_softmax(c, s, kExperts);
	if (threadIdx.x == 0) {
		ids[0] = e1, ids[1] = e2;
		wts[0] = w1 * kScale, wts[1] = s[e2] * kScale;
	}
	__syncthreads();
}

/* hierarchical (two levels): a gate over kLevelGroups groups (the router rows
 * from kGroupRow), its top kLevelTop1 normalized; inside each chosen group a
 * gate over its experts, its top kLevelTop2 normalized; weight = product
 * times kScale. gw holds 3 kLevelGroups floats of scratch: the group
 * scores, the chosen groups, their weights. */
__device__ void route_hierarchical(const moe_args &a, const float *l, float *s, float *c, int *ids,
				   float *wts, float *gw)
{
	constexpr int n = kExperts / kLevelGroups;
	float *gs = gw, *gpick = gw + kLevelGroups, *g1 = gw + 2 * kLevelGroups;
	if (threadIdx.x == 0)
		seq_score(l + kGroupRow, gs, kLevelGroups);
	for (int g = threadIdx.x; g < kLevelGroups; g += blockDim.x)
		seq_score(l + g * n, s + g * n, n);
	__syncthreads();
	int pg = -1;
	float pv = 0.0f;
	for (int j = 0; j < kLevelTop1; j++) {
		pg = block_next(gs, kLevelGroups, pv, pg);
		pv = gs[pg];
		if (threadIdx.x == 0)
			gpick[j] = (float)pg, g1[j] = gs[pg];
	}
	if (threadIdx.x == 0)
		normalize_w(g1, nullptr, kLevelTop1);
	__syncthreads();
	for (int j = 0; j < kLevelTop1; j++) {
		const int g = (int)gpick[j];
		for (int i = threadIdx.x; i < n; i += blockDim.x)
			c[g * n + i] = kSelectBias
					   ? __fadd_rn(s[g * n + i], a.select_bias[g * n + i])
					   : s[g * n + i];
		__syncthreads();
		block_topk(c + g * n, n, kLevelTop2, ids + j * kLevelTop2, g * n);
		if (threadIdx.x == 0) {
			float *w = wts + j * kLevelTop2;
			for (int i = 0; i < kLevelTop2; i++)
				w[i] = s[ids[j * kLevelTop2 + i]];
			normalize_w(w, nullptr, kLevelTop2);
			for (int i = 0; i < kLevelTop2; i++)
				w[i] = g1[j] * w[i] * kScale;
		}
		__syncthreads();
	}
}

/* One block (256 threads) per token: logits -> noise -> scores ->
 * selection -> weights. */
__device__ void route_token(const moe_args &a, const i64 t)
{
	float *l = a.logits + t * kRouterRows, *s = a.scores + t * kExperts;
	float *c = a.sel + t * kExperts;
	int *ids = a.ids + t * kRoute;
	float *wts = a.wts + t * kRoute;

	for (int e = threadIdx.x; e < router_rows(a); e += blockDim.x) {
		float v;
		if (a.small) { /* the chunk partials, in chunk order */
			/* written by other blocks: volatile reads skip the L1 */
			const volatile float *p = a.partials + (t * kRouterRows + e) * kChunks;
			v = 0.0f;
			for (int k = 0; k < kChunks; k++)
				v = __fadd_rn(v, p[k]);
		} else {
			v = l[e];
		}
		if constexpr (kRouterBias)
			if (e < kExperts)
				v = __fadd_rn(v, a.router_bias[e]);
		l[e] = v;
	}
	__syncthreads();

	if constexpr (kLearnedNoise) {
		/* training: logit + N(0, 1) * (softplus(x . noise row) + eps), the
		 * draw the reference's for (seed, layer, token, expert) */
		if (a.training) {
			for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
				const double v = l[kNoiseRow + e];
				const float sp =
				    __fadd_rn((float)(v > 20.0 ? v : log1p(exp(v))), kNoiseEps);
				const float z = rng_normal(a.seed, a.layer, t, e);
				l[e] = __fadd_rn(l[e], __fmul_rn(z, sp));
			}
			__syncthreads();
		}
	}

	if constexpr (kMode == route_mode::sparsemixer) {
		route_sparsemixer(l, s, c, ids, wts);
	} else if constexpr (kMode == route_mode::hierarchical) {
		route_hierarchical(a, l, s, c, ids, wts, a.gscore + t * 3 * kLevelGroups);
	} else {
		if constexpr (kScore == score_fn::softmax) {
			/* softmax over every expert: exp in double, like the reference */
			block_softmax(l, s, kExperts);
		} else if constexpr (kScore == score_fn::sigmoid) {
			for (int e = threadIdx.x; e < kExperts; e += blockDim.x)
				s[e] = (float)(1.0 / (1.0 + exp(-(double)l[e])));
			__syncthreads();
		} else { /* sqrt softplus */
			for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
				const double v = l[e];
				const float sp = (float)(v > 20.0 ? v : log1p(exp(v)));
				s[e] = (float)sqrt((double)sp);
			}
			__syncthreads();
		}

		if constexpr (kMode == route_mode::expert_choice) {
			/* the experts choose their tokens: moe_ec_select */
		} else if constexpr (kDense) {
			/* dense: every expert, in order */
			for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
				c[e] = s[e];
				ids[e] = e;
			}
			__syncthreads();
		} else {
			/* selection scores: the selection bias is for selection only */
			for (int e = threadIdx.x; e < kExperts; e += blockDim.x)
				c[e] = kSelectBias ? __fadd_rn(s[e], a.select_bias[e]) : s[e];
			__syncthreads();

			if constexpr (kGroups > 1) {
				/* group-limited: keep the kGroupTop best groups
				 * (kGroupScore), mask the rest */
				float *gs = a.gscore + t * kGroups;
				for (int gi = threadIdx.x; gi < kGroups; gi += blockDim.x) {
					const float *cg = c + gi * kGroupSize;
					float b1 = neg_inf(), b2 = neg_inf();
					for (int i = 0; i < kGroupSize; i++) {
						if (cg[i] > b1)
							b2 = b1, b1 = cg[i];
						else if (cg[i] > b2)
							b2 = cg[i];
					}
					if constexpr (kGroupScore == group_score::sum_top2 &&
						      kGroupSize >= 2)
						gs[gi] = b1 + b2;
					else
						gs[gi] = b1;
				}
				__syncthreads();
				int pg = -1;
				float pgv = 0.0f;
				for (int j = 0; j < kGroupTop; j++) {
					pg = block_next(gs, kGroups, pgv, pg);
					pgv = gs[pg];
				}
				/* kept: the groups ranked up to the last one picked */
				for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
					const int gi = e / kGroupSize;
					if (gi != pg && !ranks_before(gs[gi], gi, pgv, pg))
						c[e] = neg_inf();
				}
				__syncthreads();
			}

			/* top-k in rank order: value descending, ties to the lower
			 * index */
			block_topk(c, kExperts, kRoute, ids, 0);
		}

		/* weights from the unbiased scores, normalized in rank order; with
		 * kNormAfterDrop normalized and scaled after the capacity, over the
		 * slots it keeps (moe_cap_normalize) */
		if constexpr (kMode == route_mode::top_p) {
			/* top-p: the fewest ranked experts whose scores, summed in
			 * rank order, reach kTopP; the other slots hold id -1 */
			if (threadIdx.x == 0) {
				int m = 0;
				float cum = 0.0f;
				while (m < kRoute) {
					cum += s[ids[m++]];
					if (cum >= kTopP)
						break;
				}
				for (int j = 0; j < m; j++)
					wts[j] = s[ids[j]];
				normalize_scale(wts, nullptr, m);
				for (int j = m; j < kRoute; j++)
					ids[j] = -1, wts[j] = 0.0f;
			}
		} else if constexpr (kMode != route_mode::expert_choice) {
			if (threadIdx.x == 0) {
				for (int j = 0; j < kRoute; j++)
					wts[j] = s[ids[j]];
				if constexpr (!kNormAfterDrop)
					normalize_scale(wts, nullptr, kRoute);
				if constexpr (kCapacity)
					a.prio[t] = c[ids[0]]; /* capacity priority */
			}
		}
	}

	if constexpr (kSharedGate) {
		/* the shared experts' gate: sigmoid(x . w) */
		const act_t *x = (const act_t *)a.x + t * kHidden;
		float dot = 0.0f;
		for (int h = threadIdx.x; h < kHidden; h += blockDim.x)
			dot = __fmaf_rn(ld_act(x + h), a.shared_gate_w[h], dot);
		dot = block_sum(dot);
		if (threadIdx.x == 0)
			a.sgate[t] = (float)(1.0 / (1.0 + exp(-(double)dot)));
	}
}

/* moe_ec_select (expert choice, after the router): each expert keeps the
 * a.capacity tokens of highest score (ties to the earlier token); a token
 * counts the tokens ranked before it in the expert's column. Slot (t, e)
 * holds e and its scaled score when kept, else -1. Grid (T/256, E), 256
 * threads. */
__device__ __forceinline__ void ec_select(const moe_args &a)
{
	const i64 t = blockIdx.x * 256LL + threadIdx.x;
	const int e = blockIdx.y;
	if (t >= a.T)
		return;
	const float v = a.scores[t * kExperts + e];
	i64 r = 0;
	for (i64 u = 0; u < a.T && r < a.capacity; u++)
		r += ranks_before(a.scores[u * kExperts + e], u, v, t);
	const bool keep = r < a.capacity;
	a.ids[t * kRoute + e] = keep ? e : -1;
	a.wts[t * kRoute + e] = keep ? v * kScale : 0.0f;
}

/* moe_jitter (training): x * U(1 - eps, 1 + eps) into the f32 a.xj, the
 * reference's draw for (seed, layer, token, column). Grid T*H/256. */
__device__ __forceinline__ void jitter(const moe_args &a)
{
	const i64 i = blockIdx.x * 256LL + threadIdx.x;
	if (i >= a.T * kHidden)
		return;
	const i64 t = i / kHidden, h = i % kHidden;
	const float u = rng_uniform(rng_hash(a.seed, a.layer, t, h));
	const float m = (float)__dadd_rn(1.0 - kJitterEps, __dmul_rn(2.0 * kJitterEps, (double)u));
	a.xj[i] = ld_act((const act_t *)a.x + i) * m;
}

/* moe_route_select: T > 32, after moe_route_logits; grid T, 256 threads */
__device__ __forceinline__ void route_select(const moe_args &a)
{
	route_token(a, blockIdx.x);
}

/* moe_route_small: T <= 32, the whole router in one launch: grid (blocks of
 * (expert, chunk) partials, T), 256 threads; the last block of a token to
 * finish routes it. */
__device__ __forceinline__ void route_small(const moe_args &a)
{
	__shared__ bool last;
	const i64 t = blockIdx.y;
	const int i = blockIdx.x * 256 + threadIdx.x;
	if (i < router_rows(a) * kChunks) {
		const int c = i % kChunks, e = i / kChunks;
		const act_t *x = (const act_t *)a.x + t * kHidden;
		const float *r = a.router + (i64)e * kHidden;
		const int h1 = min((c + 1) * kRChunk, kHidden);
		float acc = 0.0f;
		for (int h = c * kRChunk; h < h1; h++)
			acc = __fmaf_rn(ld_act(x + h), r[h], acc);
		a.partials[t * kRouterRows * kChunks + i] = acc;
	}
	__threadfence();
	__syncthreads();
	if (threadIdx.x == 0) {
		last = atomicAdd(&a.done[t], 1u) == gridDim.x - 1;
		if (last)
			a.done[t] = 0; /* ready for the next call */
	}
	__syncthreads();
	if (!last)
		return;
	__threadfence();
	route_token(a, t);
}
