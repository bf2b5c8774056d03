/* ref.c: the reference forward pass of one MoE layer, every router mode, on
 * canonical f32 weights. Clarity over speed: one token at a time, one expert
 * at a time. docs/semantics.md is the contract this file implements; the
 * numeric conventions (f32 router in a fixed order, double expert sums) are
 * stated there. */
#include "moe_ref.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Everything one forward call needs, so helpers take a single pointer. */
struct fwd {
	const struct moe_desc *d;
	const struct moe_ref_weights *w;
	const struct moe_fwd_opts *o;
	struct moe_fwd_opts o0; /* defaults when the caller passed none */
	size_t T;
	uint32_t H, E, I, Is, W; /* W: route width */
	const float *x;          /* the (possibly jittered) input [T, H] */
	float *y;
	float *mag; /* optional [T, H]: the sum of |term| of each output's combine */
	/* statistics, accumulated per token */
	double *imp; /* [E] */
	double z_sum;
	int64_t *counts; /* [E] */
	int64_t n_dropped;
	int want_stats;
	/* per-token routing [T, W]; dropped slots keep their weight in wts */
	int32_t *ids;
	float *wts;
	uint8_t *dropped;
	float *prio;          /* [T] priority score for capacity */
	enum moe_status fail; /* why a route failed, when not for memory (message set) */
	char *err;
	size_t err_cap;
};

__attribute__((format(printf, 2, 3))) static void seterr(struct fwd *f, const char *fmt, ...)
{
	if (!f->err || !f->err_cap)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(f->err, f->err_cap, fmt, ap);
	va_end(ap);
}

static void *xcalloc(size_t n, size_t size)
{
	if (n == 0)
		n = 1;
	return calloc(n, size);
}

/* Router dot product: f32, terms added in ascending h. Generated kernels may
 * sum in another order; the contract is this value within f32 rounding. */
static float dot_f32(const float *a, const float *b, uint32_t n)
{
	float s = 0.0f;
	for (uint32_t i = 0; i < n; i++)
		s += a[i] * b[i];
	return s;
}

/* Soft MoE's products: one f32 fused multiply-add per term, in ascending
 * index (the order of the generated GEMM tiles, each value one chain). */
static float dot_fma(const float *a, const float *b, uint32_t n)
{
	float s = 0.0f;
	for (uint32_t i = 0; i < n; i++)
		s = fmaf(a[i], b[i], s);
	return s;
}

/* Soft MoE's sum of squares of x[0..n): 16 f32 fused chains, lane j over
 * i = j, j + 16, ... ascending, then the lanes added pairwise as a fixed
 * tree (j and j + 8, then j + 4, j + 2, j + 1): the generated norm's order. */
static float sumsq16(const float *x, uint32_t n)
{
	float a[16] = {0};
	for (uint32_t i = 0; i < n; i++)
		a[i % 16] = fmaf(x[i], x[i], a[i % 16]);
	for (int w = 8; w >= 1; w /= 2)
		for (int j = 0; j < w; j++)
			a[j] += a[j + w];
	return a[0];
}

/* Expert dot product: exact products summed in double, rounded once. */
static float dot_f64(const float *a, const float *b, uint32_t n)
{
	double s = 0.0;
	for (uint32_t i = 0; i < n; i++)
		s += (double)a[i] * b[i];
	return (float)s;
}

static float sigmoidf_(float v)
{
	return (float)(1.0 / (1.0 + exp(-(double)v)));
}

static float softplusf_(float v)
{
	double d = v;
	return (float)(d > 20.0 ? d : log1p(exp(d)));
}

/* Scores of n logits. Softmax subtracts the maximum, exponentiates in double
 * (rounded to f32) and divides by the f32 sum taken in index order. */
static void score_vec(enum moe_score sc, const float *l, float *s, uint32_t n)
{
	switch (sc) {
	case MOE_SCORE_SOFTMAX: {
		float m = -INFINITY;
		for (uint32_t i = 0; i < n; i++)
			if (l[i] > m)
				m = l[i];
		float sum = 0.0f;
		for (uint32_t i = 0; i < n; i++) {
			s[i] = (float)exp((double)(l[i] - m));
			sum += s[i];
		}
		for (uint32_t i = 0; i < n; i++)
			s[i] /= sum;
		break;
	}
	case MOE_SCORE_SIGMOID:
		for (uint32_t i = 0; i < n; i++)
			s[i] = sigmoidf_(l[i]);
		break;
	default: /* sqrtsoftplus */
		for (uint32_t i = 0; i < n; i++)
			s[i] = (float)sqrt((double)softplusf_(l[i]));
		break;
	}
}

/* Router probability for the statistics: the softmax itself, or positive
 * scores normalized to sum 1. */
static void prob_vec(enum moe_score sc, const float *l, const float *s, float *p, uint32_t n)
{
	if (sc == MOE_SCORE_SOFTMAX) {
		if (s != p)
			memcpy(p, s, n * sizeof *p);
		return;
	}
	(void)l;
	float sum = 0.0f;
	for (uint32_t i = 0; i < n; i++)
		sum += s[i];
	for (uint32_t i = 0; i < n; i++)
		p[i] = sum > 0.0f ? s[i] / sum : 0.0f;
}

/* a ranks before b: larger value, then smaller key; NaN ranks last. */
static int ranks_before(float va, uint64_t ka, float vb, uint64_t kb)
{
	int na = isnan(va), nb = isnan(vb);
	if (na != nb)
		return nb;
	if (!na && va != vb)
		return va > vb;
	return ka < kb;
}

struct ranked {
	float v;
	uint64_t key;
	uint32_t pos;
};

static int cmp_ranked(const void *pa, const void *pb)
{
	const struct ranked *a = pa, *b = pb;
	if (ranks_before(a->v, a->key, b->v, b->key))
		return -1;
	if (ranks_before(b->v, b->key, a->v, a->key))
		return 1;
	return 0;
}

/* Positions of the k best of v[0..n) in rank order (value descending, ties to
 * the smaller key; keys NULL means key = position). tmp holds n entries when
 * k is large. Returns 0 on allocation failure. */
static int topk(const float *v, const uint64_t *keys, uint32_t n, uint32_t k, uint32_t *out)
{
	if (k > n)
		k = n;
	if (k <= 32) {
		uint32_t m = 0; /* insertion into the sorted prefix out[0..m) */
		for (uint32_t i = 0; i < n; i++) {
			uint64_t ki = keys ? keys[i] : i;
			uint32_t p = m;
			while (p > 0) {
				uint32_t q = out[p - 1];
				if (!ranks_before(v[i], ki, v[q], keys ? keys[q] : q))
					break;
				p--;
			}
			if (p >= k)
				continue;
			uint32_t last = m < k ? m : k - 1;
			for (uint32_t j = last; j > p; j--)
				out[j] = out[j - 1];
			out[p] = i;
			if (m < k)
				m++;
		}
		return 1;
	}
	struct ranked *r = malloc((size_t)n * sizeof *r);
	if (!r)
		return 0;
	for (uint32_t i = 0; i < n; i++)
		r[i] = (struct ranked){v[i], keys ? keys[i] : i, i};
	qsort(r, n, sizeof *r, cmp_ranked);
	for (uint32_t i = 0; i < k; i++)
		out[i] = r[i].pos;
	free(r);
	return 1;
}

/* w /= max(S + eps, min) with S the sum or the p-norm. A non-positive
 * denominator (all weights zero) leaves the weights as they are. */
static void normalize(const struct moe_desc *d, float *w, uint32_t k)
{
	if (d->norm == MOE_NORM_SUM || d->norm == MOE_NORM_LP) {
		float S;
		if (d->norm == MOE_NORM_SUM) {
			S = 0.0f;
			for (uint32_t j = 0; j < k; j++)
				S += w[j];
		} else {
			double acc = 0.0;
			for (uint32_t j = 0; j < k; j++)
				acc += pow(fabs((double)w[j]), (double)d->norm_p);
			S = (float)pow(acc, 1.0 / (double)d->norm_p);
		}
		float den = S + d->norm_eps;
		if (den < d->norm_min)
			den = d->norm_min;
		if (den > 0.0f)
			for (uint32_t j = 0; j < k; j++)
				w[j] /= den;
	}
}

/* ---- experts ---- */

/* One routed (e >= 0) or the shared (e < 0) expert on xin[H] into out[H];
 * a[] is scratch of the expert width. Hidden values are rounded to f32. */
static void expert_fwd(const struct fwd *f, int64_t e, const float *xin, float *out, float *a)
{
	const struct moe_desc *d = f->d;
	const float *const *W = (const float *const *)f->w->w;
	uint32_t H = f->H;
	if (e >= 0 && d->kind == MOE_KIND_SINGLE_NEURON) {
		const float *u = W[MOE_ROLE_NEURON_U] + (size_t)e * H;
		const float *v = W[MOE_ROLE_NEURON_V] + (size_t)e * H;
		float h = moe_ref_act(d->act, d->act_alpha, d->act_limit, dot_f64(u, xin, H));
		for (uint32_t i = 0; i < H; i++)
			out[i] = h * v[i];
		return;
	}
	int shared = e < 0;
	uint32_t I = shared ? f->Is : f->I;
	enum moe_kind kind = shared ? d->shared_kind : d->kind;
	enum moe_act act = shared ? d->shared_act : d->act;
	size_t eo = shared ? 0 : (size_t)e;
	const float *gate = W[shared ? MOE_ROLE_SHARED_GATE : MOE_ROLE_GATE];
	const float *up = W[shared ? MOE_ROLE_SHARED_UP : MOE_ROLE_UP];
	const float *down = W[shared ? MOE_ROLE_SHARED_DOWN : MOE_ROLE_DOWN];
	const float *bg = NULL, *bu = NULL, *bd = NULL;
	if (!shared && d->expert_bias) {
		bg = W[MOE_ROLE_GATE_BIAS] ? W[MOE_ROLE_GATE_BIAS] + eo * I : NULL;
		bu = W[MOE_ROLE_UP_BIAS] + eo * I;
		bd = W[MOE_ROLE_DOWN_BIAS] + eo * H;
	}
	up += eo * I * H;
	down += eo * H * I;
	if (kind == MOE_KIND_GLU)
		gate += eo * I * H;
	for (uint32_t i = 0; i < I; i++) {
		float u = dot_f64(up + (size_t)i * H, xin, H);
		if (bu)
			u += bu[i];
		if (kind != MOE_KIND_GLU) {
			a[i] = moe_ref_act(act, d->act_alpha, d->act_limit, u);
			continue;
		}
		float g = dot_f64(gate + (size_t)i * H, xin, H);
		if (bg)
			g += bg[i];
		if (act == MOE_ACT_SWIGLU_OAI) {
			float lim = d->act_limit;
			float uc = u < -lim ? -lim : u > lim ? lim : u;
			a[i] = moe_ref_act(act, d->act_alpha, lim, g) * (uc + 1.0f);
		} else {
			a[i] = moe_ref_act(act, d->act_alpha, d->act_limit, g) * u;
		}
	}
	for (uint32_t h = 0; h < H; h++) {
		out[h] = dot_f64(down + (size_t)h * I, a, I);
		if (bd)
			out[h] += bd[h];
	}
}

/* The output bias (JetMoE), once per token, the last term of the sum. */
static void add_output_bias(const struct fwd *f, double *acc)
{
	const float *ob = f->w->w[MOE_ROLE_OUTPUT_BIAS];
	if (f->d->output_bias)
		for (uint32_t h = 0; h < f->H; h++)
			acc[h] += ob[h];
}

/* y_t = sum over slots in rank order of the weighted expert outputs, plus the
 * shared expert, plus the output bias, summed in double. Dropped slots add 0
 * or, with passthrough, w * x_t. */
static int combine(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	uint32_t H = f->H, wmax = f->I > f->Is ? f->I : f->Is;
	double *acc = xcalloc(2 * (size_t)H, sizeof *acc), *mg = acc + H;
	float *xin = xcalloc(H, sizeof *xin), *out = xcalloc(H, sizeof *out);
	float *a = xcalloc(wmax, sizeof *a);
	if (!acc || !xin || !out || !a) {
		free(acc), free(xin), free(out), free(a);
		return 0;
	}
	const float *seg = f->w->w[MOE_ROLE_SHARED_EXPERT_GATE];
	for (size_t t = 0; t < f->T; t++) {
		const float *xt = f->x + t * H;
		memset(acc, 0, 2 * H * sizeof *acc);
		for (uint32_t j = 0; j < f->W; j++) {
			size_t s = t * f->W + j;
			int32_t e = f->ids[s];
			float wt = f->wts[s];
			if (e < 0) {
				if (f->dropped && f->dropped[s] &&
				    d->overflow == MOE_OVERFLOW_PASSTHROUGH)
					for (uint32_t h = 0; h < H; h++) {
						acc[h] += (double)(wt * xt[h]);
						mg[h] += fabs((double)(wt * xt[h]));
					}
				continue;
			}
			if (d->apply_to == MOE_APPLY_INPUT && d->mode != MOE_MODE_PRODUCT_KEY) {
				for (uint32_t h = 0; h < H; h++)
					xin[h] = wt * xt[h];
				expert_fwd(f, e, xin, out, a);
				for (uint32_t h = 0; h < H; h++) {
					acc[h] += out[h];
					mg[h] += fabs((double)out[h]);
				}
			} else {
				expert_fwd(f, e, xt, out, a);
				for (uint32_t h = 0; h < H; h++) {
					acc[h] += (double)(wt * out[h]);
					mg[h] += fabs((double)(wt * out[h]));
				}
			}
		}
		if (f->Is) {
			expert_fwd(f, -1, xt, out, a);
			float g = 1.0f;
			if (d->shared_gate == MOE_SHARED_GATE_SIGMOID)
				g = sigmoidf_(dot_f64(seg, xt, H));
			for (uint32_t h = 0; h < H; h++) {
				acc[h] += (double)(g * out[h]);
				mg[h] += fabs((double)(g * out[h]));
			}
		}
		add_output_bias(f, acc);
		for (uint32_t h = 0; h < H; h++)
			f->y[t * H + h] = (float)acc[h];
		if (f->mag) {
			const float *ob = f->w->w[MOE_ROLE_OUTPUT_BIAS];
			for (uint32_t h = 0; h < H; h++)
				f->mag[t * H + h] =
				    (float)(mg[h] +
					    (f->d->output_bias ? fabs((double)ob[h]) : 0.0));
		}
	}
	free(acc), free(xin), free(out), free(a);
	return 1;
}

/* ---- router pieces ---- */

/* Logits of token t for router rows [r0, r0 + n): x.W^T (+ bias), plus the
 * learned gaussian noise in training mode: z times the standard deviation
 * softplus(x . NOISE_e) + noise_eps, all f32. */
static void router_logits(const struct fwd *f, size_t t, uint32_t r0, uint32_t n, float *l)
{
	const struct moe_desc *d = f->d;
	const float *x = f->x + t * f->H;
	const float *R = f->w->w[MOE_ROLE_ROUTER], *rb = f->w->w[MOE_ROLE_ROUTER_BIAS];
	const float *N = f->w->w[MOE_ROLE_NOISE];
	for (uint32_t i = 0; i < n; i++) {
		uint32_t e = r0 + i;
		float v = dot_f32(R + (size_t)e * f->H, x, f->H);
		if (d->router_bias)
			v += rb[e];
		if (f->o->training && d->noise == MOE_NOISE_LEARNED_GAUSSIAN) {
			float z = moe_rng_normal(f->o->seed, f->o->layer, t, e);
			float sd =
			    softplusf_(dot_f32(N + (size_t)e * f->H, x, f->H)) + d->noise_eps;
			v += z * sd;
		}
		l[i] = v;
	}
}

static double logsumexp(const float *l, uint32_t n)
{
	double m = -INFINITY, s = 0.0;
	for (uint32_t i = 0; i < n; i++)
		if (l[i] > m)
			m = l[i];
	if (!isfinite(m))
		return m;
	for (uint32_t i = 0; i < n; i++)
		s += exp((double)l[i] - m);
	return m + log(s);
}

/* Per-token statistics: p = router probability over E (NULL: none), l =
 * logits whose logsumexp enters the z-loss (NULL: none). */
static void stats_token(struct fwd *f, const float *p, const float *l, uint32_t nl)
{
	if (!f->want_stats)
		return;
	if (p)
		for (uint32_t e = 0; e < f->E; e++)
			f->imp[e] += p[e];
	if (l) {
		double z = logsumexp(l, nl);
		f->z_sum += z * z;
	}
}

/* Masks (to -inf) the selection scores of experts outside the group_top best
 * groups. g[] has n_groups entries of scratch. */
static int group_limit(const struct moe_desc *d, float *c, uint32_t E, float *g, uint32_t *keep)
{
	uint32_t G = d->n_groups, n = E / G;
	for (uint32_t k = 0; k < G; k++) {
		const float *cg = c + (size_t)k * n;
		float b1 = -INFINITY, b2 = -INFINITY;
		for (uint32_t i = 0; i < n; i++) {
			if (cg[i] > b1)
				b2 = b1, b1 = cg[i];
			else if (cg[i] > b2)
				b2 = cg[i];
		}
		if (d->group_score == MOE_GROUP_SCORE_SUM_TOP2 && n >= 2)
			g[k] = b1 + b2;
		else
			g[k] = b1;
	}
	if (!topk(g, NULL, G, d->group_top, keep))
		return 0;
	for (uint32_t k = 0; k < G; k++) {
		int kept = 0;
		for (uint32_t j = 0; j < d->group_top; j++)
			kept |= keep[j] == k;
		if (!kept)
			for (uint32_t i = 0; i < n; i++)
				c[(size_t)k * n + i] = -INFINITY;
	}
	return 1;
}

struct tokbuf {
	float *l, *s, *c, *p, *g, *wk;
	uint32_t *idx, *keep;
};

static void tokbuf_free(struct tokbuf *b)
{
	free(b->l), free(b->s), free(b->c), free(b->p), free(b->g), free(b->wk);
	free(b->idx), free(b->keep);
}

static int tokbuf_alloc(struct tokbuf *b, uint32_t n)
{
	memset(b, 0, sizeof *b);
	b->l = xcalloc(n, sizeof(float));
	b->s = xcalloc(n, sizeof(float));
	b->c = xcalloc(n, sizeof(float));
	b->p = xcalloc(n, sizeof(float));
	b->g = xcalloc(n, sizeof(float));
	b->wk = xcalloc(n, sizeof(float));
	b->idx = xcalloc(n, sizeof(uint32_t));
	b->keep = xcalloc(n, sizeof(uint32_t));
	if (!b->l || !b->s || !b->c || !b->p || !b->g || !b->wk || !b->idx || !b->keep) {
		tokbuf_free(b);
		return 0;
	}
	return 1;
}

/* token_choice and dense: scores, selection, normalization per token. */
static int route_topk(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	uint32_t E = f->E, k = f->W;
	int dense = d->mode == MOE_MODE_DENSE;
	/* NLLB: normalize and scale what survives the capacity (apply_capacity) */
	int after_drop = d->capacity != MOE_CAPACITY_NONE && d->capacity_norm_after_drop && !dense;
	const float *sb = f->w->w[MOE_ROLE_SELECT_BIAS];
	struct tokbuf b;
	if (!tokbuf_alloc(&b, E))
		return 0;
	for (size_t t = 0; t < f->T; t++) {
		router_logits(f, t, 0, E, b.l);
		score_vec(d->score, b.l, b.s, E);
		if (dense) {
			for (uint32_t e = 0; e < E; e++)
				b.idx[e] = e, b.c[e] = b.s[e];
		} else {
			for (uint32_t e = 0; e < E; e++)
				b.c[e] = d->select_bias ? b.s[e] + sb[e] : b.s[e];
			if (d->n_groups > 1 && !group_limit(d, b.c, E, b.g, b.keep))
				goto fail;
			if (!topk(b.c, NULL, E, k, b.idx))
				goto fail;
		}
		for (uint32_t j = 0; j < k; j++)
			b.wk[j] = b.s[b.idx[j]];
		if (!after_drop)
			normalize(d, b.wk, k);
		for (uint32_t j = 0; j < k; j++) {
			f->ids[t * k + j] = (int32_t)b.idx[j];
			f->wts[t * k + j] = after_drop ? b.wk[j] : b.wk[j] * d->scale;
		}
		f->prio[t] = b.c[b.idx[0]];
		prob_vec(d->score, b.l, b.s, b.p, E);
		stats_token(f, b.p, b.l, E);
	}
	tokbuf_free(&b);
	return 1;
fail:
	tokbuf_free(&b);
	return 0;
}

/* Top-p dynamic routing: each token takes the fewest highest-probability
 * experts whose softmax probabilities, summed in f32 in rank order, reach
 * top_p, at most top_k of them (ranked, ties to the lower index). Their
 * weights are their probabilities (normalized over the chosen when the spec
 * says so) times the scale; the unused slots hold id -1. */
static int route_top_p(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	uint32_t E = f->E, k = f->W;
	struct tokbuf b;
	if (!tokbuf_alloc(&b, E))
		return 0;
	for (size_t t = 0; t < f->T; t++) {
		router_logits(f, t, 0, E, b.l);
		score_vec(d->score, b.l, b.s, E);
		if (!topk(b.s, NULL, E, k, b.idx)) {
			tokbuf_free(&b);
			return 0;
		}
		uint32_t m = 0;
		float cum = 0.0f;
		while (m < k) {
			cum += b.s[b.idx[m++]];
			if (cum >= d->top_p)
				break;
		}
		for (uint32_t j = 0; j < m; j++)
			b.wk[j] = b.s[b.idx[j]];
		normalize(d, b.wk, m);
		for (uint32_t j = 0; j < k; j++) {
			f->ids[t * k + j] = j < m ? (int32_t)b.idx[j] : -1;
			f->wts[t * k + j] = j < m ? b.wk[j] * d->scale : 0.0f;
		}
		f->prio[t] = b.s[b.idx[0]];
		prob_vec(d->score, b.l, b.s, b.p, E);
		stats_token(f, b.p, b.l, E);
	}
	tokbuf_free(&b);
	return 1;
}

static int cmp_prio_desc(const void *pa, const void *pb)
{
	const struct ranked *a = pa, *b = pb;
	return cmp_ranked(a, b);
}

/* The capacity C of each expert for a call of T tokens. */
static uint64_t capacity_of(const struct moe_desc *d, size_t T, uint32_t E)
{
	uint64_t C;
	if (d->capacity == MOE_CAPACITY_PER_EXPERT)
		C = d->capacity_per_expert;
	else if (d->capacity == MOE_CAPACITY_TOKEN_FRACTION)
		C = moe_desc_scaled_count(d->capacity_token_fraction, T, 1, 0);
	else
		C = moe_desc_scaled_count(d->capacity_factor, (uint64_t)d->top_k * T, E,
					  d->capacity_floor);
	return C < d->capacity_min ? d->capacity_min : C;
}

/* With capacity_norm_after_drop the routed weights are still the raw scores:
 * normalize each token's surviving ones (rank order) and scale them. */
static int normalize_kept(struct fwd *f)
{
	float *w = xcalloc(f->W, sizeof *w);
	if (!w)
		return 0;
	for (size_t t = 0; t < f->T; t++) {
		uint32_t n = 0;
		for (uint32_t j = 0; j < f->W; j++)
			if (f->ids[t * f->W + j] >= 0)
				w[n++] = f->wts[t * f->W + j];
		normalize(f->d, w, n);
		n = 0;
		for (uint32_t j = 0; j < f->W; j++)
			if (f->ids[t * f->W + j] >= 0)
				f->wts[t * f->W + j] = w[n++] * f->d->scale;
	}
	free(w);
	return 1;
}

/* Capacity: fill each expert up to C in priority order (rank outer, tokens
 * inner); later assignments overflow. */
static int apply_capacity(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	uint64_t C = capacity_of(d, f->T, f->E);
	uint64_t *fill = xcalloc(f->E, sizeof *fill);
	struct ranked *ord = xcalloc(f->T, sizeof *ord);
	if (!fill || !ord) {
		free(fill), free(ord);
		return 0;
	}
	for (size_t t = 0; t < f->T; t++)
		ord[t] = (struct ranked){f->prio[t], t, (uint32_t)t};
	if (d->priority == MOE_PRIORITY_SCORE)
		qsort(ord, f->T, sizeof *ord, cmp_prio_desc);
	for (uint32_t r = 0; r < f->W; r++) {
		for (size_t i = 0; i < f->T; i++) {
			size_t s = ord[i].key * f->W + r;
			int32_t e = f->ids[s];
			if (e < 0)
				continue;
			if (fill[e] < C) {
				fill[e]++;
				continue;
			}
			f->ids[s] = -1;
			f->dropped[s] = 1;
			f->n_dropped++;
		}
	}
	free(fill), free(ord);
	return d->capacity_norm_after_drop ? normalize_kept(f) : 1;
}

/* Phi-3.5 sparsemixer, inference: two masked softmaxes. */
static int route_sparsemixer(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	uint32_t E = f->E;
	float eps2 = 2.0f * d->sparsemixer_eps;
	struct tokbuf b;
	if (!tokbuf_alloc(&b, E))
		return 0;
	for (size_t t = 0; t < f->T; t++) {
		float *l = b.l, *m = b.c;
		router_logits(f, t, 0, E, l);
		uint32_t e1 = 0;
		for (uint32_t e = 1; e < E; e++)
			if (l[e] > l[e1])
				e1 = e;
		float m1 = l[e1];
		for (uint32_t e = 0; e < E; e++) {
			float den = fabsf(l[e]) > m1 ? fabsf(l[e]) : m1;
			m[e] = (m1 - l[e]) / den > eps2 ? -INFINITY : l[e];
		}
		score_vec(MOE_SCORE_SOFTMAX, m, b.s, E);
		float w1 = b.s[e1];
		uint32_t e2 = e1 == 0 ? 1 : 0;
		for (uint32_t e = 0; e < E; e++)
			if (e != e1 && l[e] > l[e2])
				e2 = e;
		float m2 = l[e2];
		for (uint32_t e = 0; e < E; e++) {
			float den = fabsf(l[e]) > m2 ? fabsf(l[e]) : m2;
			m[e] = e == e1 || (m2 - l[e]) / den > eps2 ? -INFINITY : l[e];
		}
		score_vec(MOE_SCORE_SOFTMAX, m, b.s, E);
		b.wk[0] = w1, b.wk[1] = b.s[e2];
		for (uint32_t j = 0; j < 2; j++)
			b.wk[j] *= d->scale;
		f->ids[t * 2] = (int32_t)e1, f->ids[t * 2 + 1] = (int32_t)e2;
		f->wts[t * 2] = b.wk[0], f->wts[t * 2 + 1] = b.wk[1];
		score_vec(MOE_SCORE_SOFTMAX, l, b.p, E);
		stats_token(f, b.p, l, E);
	}
	tokbuf_free(&b);
	return 1;
}

/* Shazeer 2017 two-level gating: a gate over G groups, then a gate inside each
 * chosen group; weight = product. */
static int route_hierarchical(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	uint32_t E = f->E, G = d->levels[0].groups, n = E / G;
	uint32_t k1 = d->levels[0].top_k, k2 = d->levels[1].top_k;
	const float *GR = f->w->w[MOE_ROLE_GROUP_ROUTER], *sb = f->w->w[MOE_ROLE_SELECT_BIAS];
	struct tokbuf b, b1;
	if (!tokbuf_alloc(&b, E))
		return 0;
	if (!tokbuf_alloc(&b1, G)) {
		tokbuf_free(&b);
		return 0;
	}
	for (size_t t = 0; t < f->T; t++) {
		const float *x = f->x + t * f->H;
		for (uint32_t g = 0; g < G; g++)
			b1.l[g] = dot_f32(GR + (size_t)g * f->H, x, f->H);
		score_vec(d->score, b1.l, b1.s, G);
		if (!topk(b1.s, NULL, G, k1, b1.idx))
			goto fail;
		for (uint32_t j = 0; j < k1; j++)
			b1.wk[j] = b1.s[b1.idx[j]];
		normalize(d, b1.wk, k1);
		/* level 2 over every group: the chosen ones route, all feed the stats */
		router_logits(f, t, 0, E, b.l);
		for (uint32_t g = 0; g < G; g++)
			score_vec(d->score, b.l + (size_t)g * n, b.s + (size_t)g * n, n);
		for (uint32_t j = 0; j < k1; j++) {
			uint32_t g = b1.idx[j];
			float *c = b.c + (size_t)g * n, *s = b.s + (size_t)g * n;
			for (uint32_t i = 0; i < n; i++)
				c[i] = d->select_bias ? s[i] + sb[g * n + i] : s[i];
			if (!topk(c, NULL, n, k2, b.idx))
				goto fail;
			for (uint32_t i = 0; i < k2; i++)
				b.wk[i] = s[b.idx[i]];
			normalize(d, b.wk, k2);
			for (uint32_t i = 0; i < k2; i++) {
				size_t slot = t * f->W + (size_t)j * k2 + i;
				f->ids[slot] = (int32_t)(g * n + b.idx[i]);
				f->wts[slot] = b1.wk[j] * b.wk[i] * d->scale;
			}
		}
		if (f->want_stats) {
			prob_vec(d->score, b1.l, b1.s, b1.p, G);
			for (uint32_t g = 0; g < G; g++) {
				float *p = b.p + (size_t)g * n;
				prob_vec(d->score, b.l + (size_t)g * n, b.s + (size_t)g * n, p, n);
				for (uint32_t i = 0; i < n; i++)
					p[i] *= b1.p[g];
			}
			stats_token(f, b.p, b.l, E);
		}
	}
	tokbuf_free(&b), tokbuf_free(&b1);
	return 1;
fail:
	tokbuf_free(&b), tokbuf_free(&b1);
	return 0;
}

/* Expert choice: each expert takes its top-C tokens by score. */
static int route_expert_choice(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	uint32_t E = f->E;
	size_t T = f->T;
	uint64_t cv = moe_desc_scaled_count(d->ec_capacity_factor, T, E, 0);
	uint32_t C = cv >= T ? (uint32_t)T : (uint32_t)cv;
	float *S = xcalloc(T * E, sizeof *S), *col = xcalloc(T, sizeof *col);
	uint32_t *pick = xcalloc(C, sizeof *pick);
	struct tokbuf b;
	if (!S || !col || !pick || !tokbuf_alloc(&b, E)) {
		free(S), free(col), free(pick);
		return 0;
	}
	for (size_t t = 0; t < T; t++) {
		router_logits(f, t, 0, E, b.l);
		score_vec(d->score, b.l, S + t * E, E);
		prob_vec(d->score, b.l, S + t * E, b.p, E);
		stats_token(f, b.p, b.l, E);
	}
	for (size_t s = 0; s < T * E; s++)
		f->ids[s] = -1;
	int ok = 1;
	for (uint32_t e = 0; e < E && ok; e++) {
		for (size_t t = 0; t < T; t++)
			col[t] = S[t * E + e];
		ok = topk(col, NULL, (uint32_t)T, C, pick);
		for (uint32_t i = 0; ok && i < C; i++) {
			size_t s = (size_t)pick[i] * E + e;
			f->ids[s] = (int32_t)e;
			f->wts[s] = S[s] * d->scale;
		}
	}
	free(S), free(col), free(pick), tokbuf_free(&b);
	return ok;
}

/* Soft MoE: slots are softmax mixtures of the tokens of their group (all the
 * tokens, or soft_group consecutive ones, the last group the rest); tokens
 * are softmax mixtures of their group's slot outputs. */
static int route_soft(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	const float *PHI = f->w->w[MOE_ROLE_SOFT_SLOTS];
	const float *seg = f->w->w[MOE_ROLE_SHARED_EXPERT_GATE];
	uint32_t H = f->H, P = d->soft_slots_per_expert, S = f->E * P;
	size_t T = f->T;
	/* soft.scale channel: gamma multiplies the normalized slots (the logit
	 * is the same bilinear form as x-hat * gamma . phi-hat), rounded once */
	const float *gamma = d->soft_gamma ? f->w->w[MOE_ROLE_SOFT_GAMMA] : NULL;
	float scale = gamma ? 1.0f : f->w->w[MOE_ROLE_SOFT_SCALE][0];
	uint32_t wmax = f->I > f->Is ? f->I : f->Is;
	float *xn = xcalloc(T * H, sizeof *xn), *pn = xcalloc((size_t)S * H, sizeof *pn);
	float *L = xcalloc(T * S, sizeof *L), *D = xcalloc(T * S, sizeof *D);
	float *Cm = xcalloc(T * S, sizeof *Cm), *col = xcalloc(T, sizeof *col);
	size_t G = d->soft_group ? d->soft_group : (T ? T : 1), ng = (T + G - 1) / G;
	float *cs = xcalloc(T, sizeof *cs), *Y = xcalloc(ng * S * H + 1, sizeof *Y);
	float *xs = xcalloc(H, sizeof *xs), *a = xcalloc(wmax, sizeof *a);
	float *p = xcalloc(f->E, sizeof *p), *out = xcalloc(H, sizeof *out);
	double *acc = xcalloc(H, sizeof *acc);
	int ok = xn && pn && L && D && Cm && col && cs && Y && xs && a && p && out && acc;
	if (ok) {
		/* x * rsqrt(sum x^2 + 1e-6), for tokens and for slot parameters */
		for (size_t r = 0; r < T + S; r++) {
			const float *src = r < T ? f->x + r * H : PHI + (r - T) * H;
			float *dst = r < T ? xn + r * H : pn + (r - T) * H;
			float ss = sumsq16(src, H);
			float inv = (float)(1.0 / sqrt((double)ss + 1e-6));
			for (uint32_t h = 0; h < H; h++)
				dst[h] = src[h] * inv;
			if (gamma && r >= T)
				for (uint32_t h = 0; h < H; h++)
					dst[h] *= gamma[h];
		}
		for (size_t t = 0; t < T; t++)
			for (uint32_t s = 0; s < S; s++)
				L[t * S + s] = scale * dot_fma(xn + t * H, pn + (size_t)s * H, H);
		for (size_t g0 = 0; g0 < T; g0 += G) {
			size_t n = T - g0 < G ? T - g0 : G;
			for (uint32_t s = 0; s < S; s++) {
				for (size_t t = 0; t < n; t++)
					col[t] = L[(g0 + t) * S + s];
				score_vec(MOE_SCORE_SOFTMAX, col, cs, (uint32_t)n);
				for (size_t t = 0; t < n; t++)
					D[(g0 + t) * S + s] = cs[t];
			}
		}
		for (size_t t = 0; t < T; t++) {
			score_vec(MOE_SCORE_SOFTMAX, L + t * S, Cm + t * S, S);
			if (f->want_stats) {
				for (uint32_t e = 0; e < f->E; e++) {
					float v = 0.0f;
					for (uint32_t j = 0; j < P; j++)
						v += Cm[t * S + (size_t)e * P + j];
					p[e] = v;
				}
				stats_token(f, p, L + t * S, S);
			}
		}
		/* the slot inputs x~_s = D^T x and the output C Y: f32 fused
		 * chains over t, then s, ascending (dot_fma's order) */
		for (size_t g0 = 0; g0 < T; g0 += G) {
			size_t n = T - g0 < G ? T - g0 : G;
			float *Yg = Y + g0 / G * S * H;
			for (uint32_t s = 0; s < S; s++) {
				for (uint32_t h = 0; h < H; h++) {
					float v = 0.0f;
					for (size_t t = g0; t < g0 + n; t++)
						v = fmaf(D[t * S + s], f->x[t * H + h], v);
					xs[h] = v;
				}
				expert_fwd(f, s / P, xs, Yg + (size_t)s * H, a);
			}
		}
		for (size_t t = 0; t < T; t++) {
			const float *xt = f->x + t * H, *Yg = Y + t / G * S * H;
			for (uint32_t h = 0; h < H; h++) {
				float v = 0.0f;
				for (uint32_t s = 0; s < S; s++)
					v = fmaf(Cm[t * S + s], Yg[(size_t)s * H + h], v);
				acc[h] = v;
			}
			if (f->Is) {
				expert_fwd(f, -1, xt, out, a);
				float g = 1.0f;
				if (d->shared_gate == MOE_SHARED_GATE_SIGMOID)
					g = sigmoidf_(dot_f64(seg, xt, H));
				for (uint32_t h = 0; h < H; h++)
					acc[h] += (double)(g * out[h]);
			}
			add_output_bias(f, acc);
			for (uint32_t h = 0; h < H; h++)
				f->y[t * H + h] = (float)acc[h];
		}
		for (uint32_t e = 0; e < f->E; e++)
			f->counts[e] = (int64_t)(P * ng);
	}
	free(xn), free(pn), free(L), free(D), free(Cm), free(col), free(cs), free(Y);
	free(xs), free(a), free(p), free(out), free(acc);
	return ok;
}

/* PEER: per head, product-key retrieval of top_k single-neuron experts. */
static int route_product_key(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	uint32_t H = f->H, R = d->pk_sub_keys, k = d->pk_top_k, dq = d->pk_query_dim, h2 = dq / 2;
	const float *Q = f->w->w[MOE_ROLE_PK_QUERY], *qb = f->w->w[MOE_ROLE_PK_QUERY_BIAS];
	const float *keys = f->w->w[MOE_ROLE_PK_KEYS];
	/* shared keys [2, R, d/2]; per head [heads, R, 2, d/2] (PEER-pytorch) */
	uint32_t ks = moe_desc_pk_sub_top_k(d), kph = d->pk_keys_per_head;
	size_t kstride = kph ? 2 * (size_t)h2 : (size_t)h2,
	       khalf = kph ? (size_t)h2 : (size_t)R * h2;
	float *Qbn = NULL, *qbbn = NULL;
	if (d->pk_query_bn) { /* the query BatchNorm, folded as the CPU packing folds it */
		size_t nq = (size_t)d->pk_heads * dq;
		Qbn = xcalloc(nq * H, sizeof *Qbn), qbbn = xcalloc(nq, sizeof *qbbn);
		if (!Qbn || !qbbn) {
			free(Qbn), free(qbbn);
			return 0;
		}
		int64_t bad = moe_pk_fold_bn(d, f->w, Qbn, qbbn);
		if (bad >= 0) {
			seterr(f, "pk_bn_var[%lld] + eps is not positive (or gamma not finite)",
			       (long long)bad);
			f->fail = MOE_ERR_WEIGHTS;
			free(Qbn), free(qbbn);
			return 0;
		}
		Q = Qbn, qb = qbbn;
	}
	float *q = xcalloc(dq, sizeof *q), *sa = xcalloc(R, sizeof *sa),
	      *sb = xcalloc(R, sizeof *sb);
	float *cv = xcalloc((size_t)ks * ks, sizeof *cv), *g = xcalloc(k, sizeof *g);
	uint64_t *ck = xcalloc((size_t)ks * ks, sizeof *ck);
	uint32_t *ia = xcalloc(ks, sizeof *ia), *ib = xcalloc(ks, sizeof *ib);
	uint32_t *ic = xcalloc(k, sizeof *ic);
	int ok = q && sa && sb && cv && g && ck && ia && ib && ic;
	for (size_t t = 0; ok && t < f->T; t++) {
		const float *x = f->x + t * H;
		for (uint32_t hd = 0; hd < d->pk_heads && ok; hd++) {
			for (uint32_t i = 0; i < dq; i++) {
				size_t row = (size_t)hd * dq + i;
				q[i] = dot_fma(Q + row * H, x, H) + qb[row];
			}
			const float *K1 = keys + (kph ? (size_t)hd * R * 2 * h2 : 0);
			for (uint32_t i = 0; i < R; i++) {
				sa[i] = dot_fma(q, K1 + (size_t)i * kstride, h2);
				sb[i] = dot_fma(q + h2, K1 + khalf + (size_t)i * kstride, h2);
			}
			ok = topk(sa, NULL, R, ks, ia) && topk(sb, NULL, R, ks, ib);
			for (uint32_t i = 0; ok && i < ks; i++)
				for (uint32_t j = 0; j < ks; j++) {
					cv[i * ks + j] = sa[ia[i]] + sb[ib[j]];
					ck[i * ks + j] = (uint64_t)ia[i] * R + ib[j];
				}
			ok = ok && topk(cv, ck, ks * ks, k, ic);
			if (!ok)
				break;
			for (uint32_t j = 0; j < k; j++)
				g[j] = cv[ic[j]];
			if (d->pk_score_relu) /* non-competing (PEER-pytorch) */
				for (uint32_t j = 0; j < k; j++)
					g[j] = g[j] > 0.0f ? g[j] : 0.0f;
			else if (d->pk_score == MOE_SCORE_SIGMOID)
				score_vec(MOE_SCORE_SIGMOID, g, g, k);
			else
				score_vec(MOE_SCORE_SOFTMAX, g, g, k);
			for (uint32_t j = 0; j < k; j++) {
				size_t slot = t * f->W + (size_t)hd * k + j;
				f->ids[slot] = (int32_t)ck[ic[j]];
				f->wts[slot] = g[j] * d->scale;
			}
		}
	}
	free(q), free(sa), free(sb), free(cv), free(g), free(ck), free(ia), free(ib), free(ic);
	free(Qbn), free(qbbn);
	return ok;
}

/* ---- validation ---- */

#define BAD(...)                                                                                   \
	do {                                                                                       \
		seterr(f, "invalid description: " __VA_ARGS__);                                    \
		return 0;                                                                          \
	} while (0)

static int finite_pos(float v)
{
	return isfinite(v) && v > 0.0f;
}

/* The reference must not crash on a description the checker would reject. */
static int check_desc(struct fwd *f)
{
	const struct moe_desc *d = f->d;
	uint32_t E = d->n_experts;
	if (d->hidden == 0 || E == 0)
		BAD("hidden (%u) and n_experts (%u) must be positive", d->hidden, E);
	if ((unsigned)d->mode >= MOE_MODE_COUNT || (unsigned)d->score >= MOE_SCORE_COUNT ||
	    (unsigned)d->norm >= MOE_NORM_COUNT || (unsigned)d->kind >= MOE_KIND_COUNT ||
	    (unsigned)d->act >= MOE_ACT_COUNT || (unsigned)d->capacity >= MOE_CAPACITY_COUNT ||
	    (unsigned)d->priority >= MOE_PRIORITY_COUNT ||
	    (unsigned)d->overflow >= MOE_OVERFLOW_COUNT || (unsigned)d->noise >= MOE_NOISE_COUNT ||
	    (unsigned)d->apply_to >= MOE_APPLY_COUNT ||
	    (unsigned)d->group_score >= MOE_GROUP_SCORE_COUNT ||
	    (unsigned)d->shared_gate >= MOE_SHARED_GATE_COUNT ||
	    (unsigned)d->shared_kind >= MOE_KIND_COUNT ||
	    (unsigned)d->shared_act >= MOE_ACT_COUNT || (unsigned)d->pk_score >= MOE_SCORE_COUNT)
		BAD("enum value out of range");
	if (E > INT32_MAX)
		BAD("n_experts (%u) too large", E);
	int pk = d->mode == MOE_MODE_PRODUCT_KEY;
	if (pk != (d->kind == MOE_KIND_SINGLE_NEURON))
		BAD("single_neuron experts go with product_key routing and only with it");
	if (pk && d->pk_query_bn && !(isfinite(d->pk_bn_eps) && d->pk_bn_eps >= 0.0f))
		BAD("product_key query BatchNorm eps must be finite and >= 0");
	if (d->noise == MOE_NOISE_LEARNED_GAUSSIAN &&
	    !(isfinite(d->noise_eps) && d->noise_eps >= 0.0f))
		BAD("learned_gaussian noise_epsilon must be finite and >= 0");
	if (d->importance_sparse && (d->mode == MOE_MODE_SOFT || pk))
		BAD("sparse importance needs a router with top-k slots");
	if (!pk && d->intermediate == 0)
		BAD("intermediate must be positive");
	if (d->act == MOE_ACT_SWIGLU_OAI && d->kind != MOE_KIND_GLU)
		BAD("swiglu_oai needs glu experts");
	if (!isfinite(d->scale))
		BAD("scale must be finite");
	if (d->norm != MOE_NORM_NONE && (!isfinite(d->norm_eps) || !isfinite(d->norm_min)))
		BAD("normalize eps/min must be finite");
	if (d->norm == MOE_NORM_LP && !finite_pos(d->norm_p))
		BAD("lp normalization needs p > 0");
	if (moe_desc_shared_width(d)) {
		if (d->shared_kind == MOE_KIND_SINGLE_NEURON)
			BAD("shared experts must be glu or mlp");
		if (d->shared_act == MOE_ACT_SWIGLU_OAI && d->shared_kind != MOE_KIND_GLU)
			BAD("swiglu_oai needs glu shared experts");
		if ((uint64_t)d->shared_count * d->shared_intermediate > UINT32_MAX)
			BAD("shared width too large");
	}
	switch (d->mode) {
	case MOE_MODE_TOKEN_CHOICE:
		if (d->top_k == 0 || d->top_k > E)
			BAD("top_k (%u) must be in 1..n_experts (%u)", d->top_k, E);
		if (d->n_groups > 1) {
			if (E % d->n_groups)
				BAD("groups (%u) must divide n_experts (%u)", d->n_groups, E);
			if (d->group_top == 0 || d->group_top > d->n_groups)
				BAD("group top (%u) must be in 1..groups (%u)", d->group_top,
				    d->n_groups);
			if (d->top_k > (uint64_t)d->group_top * (E / d->n_groups))
				BAD("top_k (%u) exceeds the experts of the kept groups", d->top_k);
		}
		if (d->capacity == MOE_CAPACITY_FACTOR && !finite_pos(d->capacity_factor))
			BAD("capacity factor must be positive");
		if (d->capacity == MOE_CAPACITY_TOKEN_FRACTION &&
		    !finite_pos(d->capacity_token_fraction))
			BAD("capacity token_fraction must be positive");
		if (d->capacity != MOE_CAPACITY_NONE && d->capacity_norm_after_drop &&
		    d->overflow == MOE_OVERFLOW_PASSTHROUGH)
			BAD("capacity normalize_after_drop cannot be combined with passthrough");
		break;
	case MOE_MODE_DENSE:
		break;
	case MOE_MODE_EXPERT_CHOICE:
		if (!finite_pos(d->ec_capacity_factor))
			BAD("expert_choice capacity factor must be positive");
		break;
	case MOE_MODE_SOFT:
		if (d->soft_slots_per_expert == 0 ||
		    (uint64_t)E * d->soft_slots_per_expert > UINT32_MAX)
			BAD("soft slots_per_expert (%u) out of range", d->soft_slots_per_expert);
		break;
	case MOE_MODE_HIERARCHICAL: {
		uint32_t G = d->levels[0].groups, k1 = d->levels[0].top_k, k2 = d->levels[1].top_k;
		if (d->n_levels != 2)
			BAD("hierarchical routing needs 2 levels, got %u", d->n_levels);
		if (G == 0 || E % G)
			BAD("hierarchical groups (%u) must divide n_experts (%u)", G, E);
		if (k1 == 0 || k1 > G || k2 == 0 || k2 > E / G)
			BAD("hierarchical top_k (%u, %u) out of range", k1, k2);
		if (d->top_k != k1 * k2)
			BAD("hierarchical top_k (%u) must be the product of the level top_k (%u)",
			    d->top_k, k1 * k2);
		break;
	}
	case MOE_MODE_PRODUCT_KEY: {
		uint32_t R = d->pk_sub_keys;
		if (R == 0 || d->pk_heads == 0 || d->pk_query_dim < 2 || d->pk_query_dim % 2)
			BAD("product_key sub_keys, heads and an even query_dim are required");
		uint32_t ks = moe_desc_pk_sub_top_k(d);
		if (d->pk_top_k == 0 || ks > R || (uint64_t)d->pk_top_k > (uint64_t)ks * ks)
			BAD("product_key top_k (%u) must be in 1..sub_top_k^2 (sub_top_k %u, at "
			    "most sub_keys %u)",
			    d->pk_top_k, ks, R);
		if ((uint64_t)R * R != E)
			BAD("product_key sub_keys^2 (%llu) must equal n_experts (%u)",
			    (unsigned long long)R * R, E);
		if (d->pk_score != MOE_SCORE_SOFTMAX && d->pk_score != MOE_SCORE_SIGMOID)
			BAD("product_key score must be softmax or sigmoid");
		if ((uint64_t)d->pk_heads * d->pk_top_k > INT32_MAX ||
		    (uint64_t)d->pk_heads * d->pk_query_dim > UINT32_MAX)
			BAD("product_key heads too large");
		break;
	}
	case MOE_MODE_TOP_P:
		if (d->top_k == 0 || d->top_k > E)
			BAD("top_k (%u) must be in 1..n_experts (%u)", d->top_k, E);
		if (!(d->top_p > 0.0f && d->top_p <= 1.0f))
			BAD("top_p (%g) must be in (0, 1]", (double)d->top_p);
		if (d->score != MOE_SCORE_SOFTMAX)
			BAD("top_p routing sums softmax probabilities");
		break;
	case MOE_MODE_SPARSEMIXER:
		if (d->top_k != 2 || E < 2)
			BAD("sparsemixer needs top_k 2 and at least 2 experts");
		if (!isfinite(d->sparsemixer_eps) || d->sparsemixer_eps < 0.0f)
			BAD("sparsemixer eps must be finite and non-negative");
		break;
	default:
		break;
	}
	if (d->noise == MOE_NOISE_JITTER && !(isfinite(d->jitter_eps) && d->jitter_eps >= 0.0f))
		BAD("jitter eps must be finite and non-negative");
	return 1;
}

#undef BAD

static int check_weights(struct fwd *f)
{
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		if (!moe_desc_role_shape(f->d, (enum moe_role)r, NULL, NULL, NULL))
			continue;
		/* the noise projection matters only when noise is drawn */
		if (r == MOE_ROLE_NOISE && !f->o->training)
			continue;
		if (!f->w->w[r]) {
			seterr(f, "missing weights for role '%s'", moe_role_names[r]);
			return 0;
		}
	}
	return 1;
}

static void zero_routing(struct moe_routing *rt, const struct moe_desc *d)
{
	if (rt->counts)
		memset(rt->counts, 0, (size_t)d->n_experts * sizeof *rt->counts);
	if (rt->importance)
		memset(rt->importance, 0, (size_t)d->n_experts * sizeof *rt->importance);
	rt->importance_cv2 = 0.0f;
	rt->lb_loss = 0.0f;
	rt->z_loss = 0.0f;
	rt->n_dropped = 0;
}

static void finish_stats(struct fwd *f, struct moe_routing *rt)
{
	uint32_t E = f->E;
	size_t W = f->W;
	const struct moe_desc *d = f->d;
	if (d->mode != MOE_MODE_SOFT) {
		memset(f->counts, 0, E * sizeof *f->counts);
		for (size_t s = 0; s < f->T * W; s++)
			if (f->ids[s] >= 0)
				f->counts[f->ids[s]]++;
	}
	if (rt->expert_ids)
		memcpy(rt->expert_ids, f->ids, f->T * W * sizeof *f->ids);
	if (rt->weights)
		for (size_t s = 0; s < f->T * W; s++)
			rt->weights[s] = f->ids[s] >= 0 ? f->wts[s] : 0.0f;
	if (rt->counts)
		memcpy(rt->counts, f->counts, E * sizeof *f->counts);
	rt->n_dropped = f->n_dropped;
	rt->importance_cv2 = rt->lb_loss = rt->z_loss = 0.0f;
	if (d->mode == MOE_MODE_PRODUCT_KEY) {
		if (rt->importance)
			memset(rt->importance, 0, E * sizeof *rt->importance);
		return;
	}
	if (d->importance_sparse) {
		/* Shazeer 2017: the sum of the sparse gates, the routing weights of the
		 * kept slots, in slot order */
		memset(f->imp, 0, E * sizeof *f->imp);
		for (size_t s = 0; s < f->T * W; s++)
			if (f->ids[s] >= 0)
				f->imp[f->ids[s]] += (double)f->wts[s];
	}
	double T = (double)f->T, mean = 0.0, var = 0.0, total = 0.0, lb = 0.0;
	for (uint32_t e = 0; e < E; e++) {
		mean += f->imp[e];
		total += (double)f->counts[e];
	}
	mean /= E;
	for (uint32_t e = 0; e < E; e++)
		var += (f->imp[e] - mean) * (f->imp[e] - mean);
	var /= E;
	for (uint32_t e = 0; e < E; e++)
		if (total > 0.0)
			lb += ((double)f->counts[e] / total) * (f->imp[e] / T);
	if (rt->importance)
		for (uint32_t e = 0; e < E; e++)
			rt->importance[e] = (float)f->imp[e];
	rt->importance_cv2 = mean > 0.0 ? (float)(var / (mean * mean)) : 0.0f;
	rt->lb_loss = (float)(E * lb);
	rt->z_loss = (float)(f->z_sum / T);
}

/* One router per mode: the family column of moe_modes.def. */
static int (*const route_fns[MOE_MODE_COUNT])(struct fwd *f) = {
#define MOE_MODE(v, s, targets, family, pack) [MOE_MODE_##v] = route_##family,
#include "moe_modes.def"
#undef MOE_MODE
};

static enum moe_status forward(const struct moe_desc *d, const struct moe_ref_weights *w,
			       const float *x, float *y, float *mag, size_t n_tokens,
			       const struct moe_fwd_opts *opts, struct moe_routing *routing,
			       char *err, size_t err_cap)
{
	struct fwd F, *f = &F;
	memset(f, 0, sizeof *f);
	f->err = err, f->err_cap = err_cap;
	if (err && err_cap)
		err[0] = 0;
	if (!d || !w) {
		seterr(f, "%s is NULL", d ? "weights" : "description");
		return MOE_ERR_ARG;
	}
	if (n_tokens && (!x || !y)) {
		seterr(f, "%s is NULL with %zu tokens", x ? "y" : "x", n_tokens);
		return MOE_ERR_ARG;
	}
	f->d = d, f->w = w, f->o = opts ? opts : &f->o0;
	if (!check_desc(f))
		return MOE_ERR_ARG;
	if (!check_weights(f))
		return MOE_ERR_WEIGHTS;
	f->T = n_tokens;
	f->H = d->hidden, f->E = d->n_experts, f->I = d->intermediate;
	f->Is = moe_desc_shared_width(d);
	f->W = moe_desc_route_width(d);
	if (n_tokens == 0) {
		if (routing)
			zero_routing(routing, d);
		return MOE_OK;
	}
	size_t H = f->H;
	if (n_tokens > SIZE_MAX / sizeof(float) / H || n_tokens > SIZE_MAX / 8 / (f->W + 1) ||
	    n_tokens > UINT32_MAX || n_tokens * f->E > SIZE_MAX / sizeof(float) / 4) {
		seterr(f, "too many tokens (%zu)", n_tokens);
		return MOE_ERR_ARG;
	}
	for (size_t t = 0; t < n_tokens; t++)
		for (size_t h = 0; h < H; h++)
			if (!isfinite(x[t * H + h])) {
				seterr(f, "non-finite input at token %zu, column %zu", t, h);
				return MOE_ERR_INPUT;
			}

	enum moe_status st = MOE_ERR_NOMEM;
	float *xj = NULL;
	f->x = x, f->y = y, f->mag = mag;
	if (f->o->training && d->noise == MOE_NOISE_JITTER) {
		/* jitter scales the hidden state itself: router and experts see it */
		xj = malloc(n_tokens * H * sizeof *xj);
		if (!xj)
			goto out;
		double eps = d->jitter_eps;
		for (size_t t = 0; t < n_tokens; t++)
			for (size_t h = 0; h < H; h++) {
				float u =
				    moe_rng_uniform(moe_rng_hash(f->o->seed, f->o->layer, t, h));
				float m = (float)(1.0 - eps + 2.0 * eps * (double)u);
				xj[t * H + h] = x[t * H + h] * m;
			}
		f->x = xj;
	}
	f->want_stats = routing != NULL;
	f->imp = xcalloc(f->E, sizeof *f->imp);
	f->counts = xcalloc(f->E, sizeof *f->counts);
	f->ids = xcalloc(n_tokens * f->W, sizeof *f->ids);
	f->wts = xcalloc(n_tokens * f->W, sizeof *f->wts);
	f->dropped = xcalloc(n_tokens * f->W, 1);
	f->prio = xcalloc(n_tokens, sizeof *f->prio);
	if (!f->imp || !f->counts || !f->ids || !f->wts || !f->dropped || !f->prio)
		goto out;

	/* the route column of moe_modes.def; capacity is token choice's alone */
	int ok = route_fns[d->mode](f);
	if (ok && d->capacity != MOE_CAPACITY_NONE)
		ok = apply_capacity(f);
	if (ok && d->mode != MOE_MODE_SOFT)
		ok = combine(f);
	if (!ok) {
		if (f->fail)
			st = f->fail;
		goto out;
	}
	if (routing)
		finish_stats(f, routing);
	for (size_t i = 0; mag && d->mode == MOE_MODE_SOFT && i < n_tokens * H; i++)
		mag[i] = fabsf(y[i]);
	st = MOE_OK;
out:
	if (st == MOE_ERR_NOMEM)
		seterr(f, "out of memory");
	free(xj), free(f->imp), free(f->counts), free(f->ids), free(f->wts);
	free(f->dropped), free(f->prio);
	return st;
}

enum moe_status moe_ref_forward(const struct moe_desc *d, const struct moe_ref_weights *w,
				const float *x, float *y, size_t n_tokens,
				const struct moe_fwd_opts *opts, struct moe_routing *routing,
				char *err, size_t err_cap)
{
	return forward(d, w, x, y, NULL, n_tokens, opts, routing, err, err_cap);
}

enum moe_status moe_ref_forward_mag(const struct moe_desc *d, const struct moe_ref_weights *w,
				    const float *x, float *y, float *mag, size_t n_tokens,
				    const struct moe_fwd_opts *opts, struct moe_routing *routing,
				    char *err, size_t err_cap)
{
	return forward(d, w, x, y, mag, n_tokens, opts, routing, err, err_cap);
}
