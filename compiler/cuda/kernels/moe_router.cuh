/* moe_router.cuh: the router, on the device: logits (tiled, or by chunk
 * partials for small T), scores, selection bias, group limits, top-k,
 * normalized and scaled weights, the shared experts' gate. Needs the
 * generated constants (shapes, kScore, kNorm, kDense, the feature flags). */
#pragma once

/* routing weights: normalize (kNorm) over the kept slots in rank order, then
 * scale; keep null: every slot */
__device__ void normalize_scale(float *w, const unsigned char *keep, int n)
{
	if constexpr (kNorm == norm_fn::none) {
		for (int j = 0; j < n; j++)
			if (!keep || keep[j])
				w[j] = w[j] * kScale;
	} else {
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
		for (int j = 0; j < n; j++) {
			if (keep && !keep[j])
				continue;
			if (den > 0.0f)
				w[j] = w[j] / den;
			w[j] = w[j] * kScale;
		}
	}
}

/* ---- router ----
 * A logit is the sum, in chunk order, of fma chains over K chunks of kRChunk
 * columns in column order. Both router kernels compute exactly that, so a
 * token's routing never depends on the batch size. */

/* moe_route_logits: logits of 64 tokens x 64 experts per block, 4 x 4 per
 * thread; grid (T/64, E/64), 256 threads */
__device__ __forceinline__ void route_logits(const moe_args &a)
{
	__shared__ float xs[64][kRChunk + 1], rs[64][kRChunk + 1];
	const i64 t0 = blockIdx.x * 64LL;
	const int e0 = blockIdx.y * 64, tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
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
			rs[r][k] =
			    e < kExperts && k < n ? a.router[(i64)e * kHidden + h0 + k] : 0.0f;
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
			if (t < a.T && e < kExperts)
				a.logits[t * kExperts + e] = tot[i][j];
		}
}

/* One block (256 threads) per token: logits -> scores -> selection ->
 * weights. */
__device__ void route_token(const moe_args &a, const i64 t)
{
	float *l = a.logits + t * kExperts, *s = a.scores + t * kExperts;
	float *c = a.sel + t * kExperts;
	int *ids = a.ids + t * kRoute;
	float *wts = a.wts + t * kRoute;

	for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
		float v;
		if (a.small) { /* the chunk partials, in chunk order */
			/* written by other blocks: volatile reads skip the L1 */
			const volatile float *p = a.partials + (t * kExperts + e) * kChunks;
			v = 0.0f;
			for (int k = 0; k < kChunks; k++)
				v = __fadd_rn(v, p[k]);
		} else {
			v = l[e];
		}
		if constexpr (kRouterBias)
			v = __fadd_rn(v, a.router_bias[e]);
		l[e] = v;
	}
	__syncthreads();

	if constexpr (kScore == score_fn::softmax) {
		/* softmax over every expert: exp in double, like the reference */
		float m = neg_inf();
		for (int e = threadIdx.x; e < kExperts; e += blockDim.x)
			m = l[e] > m ? l[e] : m;
		m = block_max(m);
		float z = 0.0f;
		for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
			const float v = (float)exp((double)(l[e] - m));
			s[e] = v;
			z += v;
		}
		z = block_sum(z);
		for (int e = threadIdx.x; e < kExperts; e += blockDim.x)
			s[e] = s[e] / z;
	} else if constexpr (kScore == score_fn::sigmoid) {
		for (int e = threadIdx.x; e < kExperts; e += blockDim.x)
			s[e] = (float)(1.0 / (1.0 + exp(-(double)l[e])));
	} else { /* sqrt softplus */
		for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
			const double v = l[e];
			const float sp = (float)(v > 20.0 ? v : log1p(exp(v)));
			s[e] = (float)sqrt((double)sp);
		}
	}

	if constexpr (kDense) {
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
			/* group-limited: keep the kGroupTop best groups (kGroupScore),
			 * mask the rest */
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

		/* top-k in rank order: value descending, ties to the lower index */
		int pk = -1;
		float pv = 0.0f;
		for (int j = 0; j < kRoute; j++) {
			pk = block_next(c, kExperts, pv, pk);
			pv = c[pk];
			if (threadIdx.x == 0)
				ids[j] = pk;
		}
		__syncthreads();
	}

	/* weights from the unbiased scores, normalized in rank order; with
	 * kNormAfterDrop normalized and scaled after the capacity, over the slots
	 * it keeps (moe_cap_normalize) */
	if (threadIdx.x == 0) {
		for (int j = 0; j < kRoute; j++)
			wts[j] = s[ids[j]];
		if constexpr (!kNormAfterDrop)
			normalize_scale(wts, nullptr, kRoute);
		if constexpr (kCapacity)
			a.prio[t] = c[ids[0]]; /* capacity priority */
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
	if (i < kExperts * kChunks) {
		const int c = i % kChunks, e = i / kChunks;
		const act_t *x = (const act_t *)a.x + t * kHidden;
		const float *r = a.router + (i64)e * kHidden;
		const int h1 = min((c + 1) * kRChunk, kHidden);
		float acc = 0.0f;
		for (int h = c * kRChunk; h < h1; h++)
			acc = __fmaf_rn(ld_act(x + h), r[h], acc);
		a.partials[t * kExperts * kChunks + i] = acc;
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
