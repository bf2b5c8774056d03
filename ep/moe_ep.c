/* moe_ep.c: expert parallelism over MPI (moe_ep.h). The exchange follows the
 * rows: a chunk's rows leave ordered by destination rank, then local expert,
 * then token and slot; a receiver regroups them by local expert (source rank
 * inner), runs moe_experts, and returns each row to the place it came from,
 * so the sender finds the output of its slot (t, k) where it put the row and
 * combines in slot order. */
#include "moe_ep.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void moe_ep_range(uint32_t n_experts, int n_ranks, int rank, uint32_t *e0, uint32_t *e1)
{
	uint64_t E = n_experts, P = (uint64_t)n_ranks, r = (uint64_t)rank;
	*e0 = (uint32_t)(E * r / P);
	*e1 = (uint32_t)(E * (r + 1) / P);
}

/* One chunk's exchange. Counts are per (rank, local expert): L slots per
 * rank, L the largest range. Rows going out carry H floats, plus the
 * routing weight when the model applies it to the input. */
struct chunk {
	size_t t0, t1;
	int64_t *slot_row;       /* [(t1 - t0) * W] row of each slot in `out` */
	int64_t *cnt_out;        /* [P * L] rows this rank sends to (q, j) */
	int64_t *cnt_in;         /* [P * L] rows this rank gets from q for its expert j */
	int *sc, *sd, *rc, *rd;  /* [P] MPI counts and displacements, in floats */
	int *bc, *bd, *gc, *gd;  /* [P] the same for the rows coming back */
	float *out, *in;         /* rows sent, rows received (stride R) */
	float *ret_out, *ret_in; /* outputs sent back (received order), received back */
	size_t n_out, n_in;
	MPI_Request req_go, req_back;
};

struct ep {
	MPI_Comm comm;
	int P, me;
	uint32_t E, H, W, L, R;
	int w_in;     /* the routing weight scales the input: it travels with the row */
	uint32_t *e0; /* [P + 1] first expert of each rank */
};

static void fail(char *err, size_t cap, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, cap, fmt, ap);
	va_end(ap);
}

static double now(void)
{
	return MPI_Wtime();
}

static int owner(const struct ep *p, int32_t e)
{
	int q = 0;
	while (q + 1 < p->P && (uint32_t)e >= p->e0[q + 1])
		q++;
	return q;
}

static void chunk_free(struct chunk *c)
{
	free(c->slot_row), free(c->cnt_out), free(c->cnt_in);
	free(c->sc), free(c->sd), free(c->rc), free(c->rd);
	free(c->bc), free(c->bd), free(c->gc), free(c->gd);
	free(c->out), free(c->in), free(c->ret_out), free(c->ret_in);
}

/* Counts and the slot -> row map of chunk c (before the count exchange). */
static int chunk_count(const struct ep *p, struct chunk *c, const int32_t *ids)
{
	size_t n = (c->t1 - c->t0) * p->W, PL = (size_t)p->P * p->L;
	c->slot_row = malloc((n ? n : 1) * sizeof *c->slot_row);
	c->cnt_out = calloc(PL, sizeof *c->cnt_out);
	c->cnt_in = calloc(PL, sizeof *c->cnt_in);
	if (!c->slot_row || !c->cnt_out || !c->cnt_in)
		return -1;
	for (size_t s = 0; s < n; s++) {
		int32_t e = ids[c->t0 * p->W + s];
		if (e < 0)
			continue;
		int q = owner(p, e);
		c->cnt_out[(size_t)q * p->L + ((uint32_t)e - p->e0[q])]++;
	}
	return 0;
}

/* After the count exchange: the MPI layouts and the rows to send. */
static int chunk_pack(const struct ep *p, struct chunk *c, const float *xf, const int32_t *ids,
		      const float *w)
{
	int P = p->P;
	c->sc = calloc((size_t)P, sizeof(int)), c->sd = calloc((size_t)P, sizeof(int));
	c->rc = calloc((size_t)P, sizeof(int)), c->rd = calloc((size_t)P, sizeof(int));
	c->bc = calloc((size_t)P, sizeof(int)), c->bd = calloc((size_t)P, sizeof(int));
	c->gc = calloc((size_t)P, sizeof(int)), c->gd = calloc((size_t)P, sizeof(int));
	if (!c->sc || !c->sd || !c->rc || !c->rd || !c->bc || !c->bd || !c->gc || !c->gd)
		return -1;
	/* first row of (q, j) in `out` */
	size_t PL = (size_t)P * p->L;
	int64_t *first = malloc(PL * sizeof *first);
	if (!first)
		return -1;
	size_t n_out = 0, n_in = 0;
	for (int q = 0; q < P; q++) {
		size_t a = n_out, b = n_in;
		for (uint32_t j = 0; j < p->L; j++) {
			first[(size_t)q * p->L + j] = (int64_t)n_out;
			n_out += (size_t)c->cnt_out[(size_t)q * p->L + j];
			n_in += (size_t)c->cnt_in[(size_t)q * p->L + j];
		}
		if (n_out * p->R > INT_MAX || n_in * p->R > INT_MAX) {
			free(first);
			return -2;
		}
		c->sd[q] = (int)(a * p->R), c->sc[q] = (int)((n_out - a) * p->R);
		c->rd[q] = (int)(b * p->R), c->rc[q] = (int)((n_in - b) * p->R);
		/* back: what arrived from q returns to q */
		c->bd[q] = (int)(b * p->H), c->bc[q] = (int)((n_in - b) * p->H);
		c->gd[q] = (int)(a * p->H), c->gc[q] = (int)((n_out - a) * p->H);
	}
	c->n_out = n_out, c->n_in = n_in;
	c->out = malloc((n_out ? n_out : 1) * p->R * sizeof(float));
	c->in = malloc((n_in ? n_in : 1) * p->R * sizeof(float));
	c->ret_out = malloc((n_in ? n_in : 1) * p->H * sizeof(float));
	c->ret_in = malloc((n_out ? n_out : 1) * p->H * sizeof(float));
	if (!c->out || !c->in || !c->ret_out || !c->ret_in) {
		free(first);
		return -1;
	}
	/* tokens in order, slots in order, within each (q, j) */
	size_t n = (c->t1 - c->t0) * p->W;
	for (size_t s = 0; s < n; s++) {
		size_t g = c->t0 * p->W + s;
		int32_t e = ids[g];
		c->slot_row[s] = -1;
		if (e < 0)
			continue;
		int q = owner(p, e);
		int64_t row = first[(size_t)q * p->L + ((uint32_t)e - p->e0[q])]++;
		float *dst = c->out + (size_t)row * p->R;
		memcpy(dst, xf + (g / p->W) * p->H, p->H * sizeof *dst);
		if (p->w_in)
			dst[p->H] = w[g];
		c->slot_row[s] = row;
	}
	free(first);
	return 0;
}

/* The received rows regrouped by local expert (source rank inner), the
 * experts, and their outputs put back in the received order. */
static enum moe_status chunk_compute(const struct ep *p, const struct moe_ep_fns *f, moe_model *m,
				     uint32_t layer, struct chunk *c, char *err, size_t cap)
{
	uint32_t nl = p->e0[p->me + 1] - p->e0[p->me];
	size_t n = c->n_in;
	if (!n)
		return MOE_OK;
	float *rx = malloc(n * p->H * sizeof *rx), *ry = malloc(n * p->H * sizeof *ry);
	float *rw = p->w_in ? malloc(n * sizeof *rw) : NULL;
	int64_t *counts = calloc(nl ? nl : 1, sizeof *counts);
	size_t *src = malloc(n * sizeof *src); /* received row of each grouped row */
	enum moe_status st = MOE_ERR_NOMEM;
	if (!rx || !ry || (p->w_in && !rw) || !counts || !src) {
		fail(err, cap, "out of memory");
		goto out;
	}
	size_t r = 0;
	for (uint32_t j = 0; j < nl; j++)
		for (int q = 0; q < p->P; q++) {
			/* rows from q for expert j start after q's rows for experts < j */
			size_t base = (size_t)c->rd[q] / p->R;
			for (uint32_t i = 0; i < j; i++)
				base += (size_t)c->cnt_in[(size_t)q * p->L + i];
			int64_t k = c->cnt_in[(size_t)q * p->L + j];
			for (int64_t i = 0; i < k; i++, r++) {
				const float *row = c->in + (base + (size_t)i) * p->R;
				memcpy(rx + r * p->H, row, p->H * sizeof *rx);
				if (rw)
					rw[r] = row[p->H];
				src[r] = base + (size_t)i;
			}
			counts[j] += k;
		}
	st = f->experts(m, layer, rx, n, counts, rw, ry);
	if (st != MOE_OK) {
		fail(err, cap, "moe_experts: %s", f->last_error());
		memset(c->ret_out, 0, n * p->H * sizeof(float));
		goto out;
	}
	for (size_t i = 0; i < n; i++)
		memcpy(c->ret_out + src[i] * p->H, ry + i * p->H, p->H * sizeof(float));
out:
	free(rx), free(ry), free(rw), free(counts), free(src);
	return st;
}

/* Every rank's status: the worst one (so that all stop together). */
static enum moe_status agree(const struct ep *p, enum moe_status st)
{
	int v = (int)st, all = 0;
	MPI_Allreduce(&v, &all, 1, MPI_INT, MPI_MAX, p->comm);
	return (enum moe_status)all;
}

enum moe_status moe_ep_forward(MPI_Comm comm, const struct moe_ep_fns *f, moe_model *m,
			       uint32_t layer, const void *x, void *y, size_t T, uint32_t chunks,
			       struct moe_routing *rt, struct moe_ep_stats *stats, char *err,
			       size_t cap)
{
	struct ep p = {.comm = comm};
	struct moe_ep_stats s = {0};
	double t_start = now();
	const struct moe_info *in = f->info();
	MPI_Comm_size(comm, &p.P);
	MPI_Comm_rank(comm, &p.me);
	p.E = in->n_experts, p.H = in->hidden, p.W = in->route_width;
	p.L = (p.E + (uint32_t)p.P - 1) / (uint32_t)p.P;
	/* the weight travels with a row only where it scales the input */
	{
		size_t n = f->describe(NULL, 0);
		char *text = malloc(n + 1);
		if (!text) {
			fail(err, cap, "out of memory");
			return MOE_ERR_NOMEM;
		}
		f->describe(text, n + 1);
		p.w_in = strstr(text, " apply_to input") != NULL;
		free(text);
	}
	p.R = p.H + (p.w_in ? 1 : 0);
	if (chunks == 0)
		chunks = 1;
	size_t es = in->act_dtype == MOE_DTYPE_BF16 ? 2 : 4, H = p.H, W = p.W;
	p.e0 = malloc(((size_t)p.P + 1) * sizeof *p.e0);
	int32_t *ids = malloc((T ? T : 1) * W * sizeof *ids);
	float *w = malloc((T ? T : 1) * W * sizeof *w), *xf = malloc((T ? T : 1) * H * sizeof *xf);
	struct chunk *c = calloc(chunks, sizeof *c);
	/* the statistics' sums: importance[E], load[E], z_sum, n_tokens */
	double *sums = rt ? calloc(2 * (size_t)p.E + 2, sizeof *sums) : NULL;
	int64_t *cs = NULL, *cr = NULL;
	enum moe_status st = MOE_ERR_NOMEM;
	if (!p.e0 || !ids || !w || !xf || !c || (rt && !sums)) {
		fail(err, cap, "out of memory");
		goto out;
	}
	for (int q = 0; q <= p.P; q++) {
		uint32_t a, b;
		moe_ep_range(p.E, p.P, q < p.P ? q : p.P - 1, &a, &b);
		p.e0[q] = q < p.P ? a : b;
	}
	/* route the local tokens */
	double t0 = now();
	struct moe_route_sums acc = {.importance = sums, .load = sums + (rt ? p.E : 0)};
	if (!rt) {
		st = f->route(m, layer, x, T, ids, w, NULL);
	} else if (!f->route_stats || !f->routing_from_sums) {
		st = MOE_ERR_ARG;
		fail(err, cap,
		     "the routing statistics need moe_route_stats and "
		     "moe_routing_from_sums (ABI 6)");
	} else {
		st = f->route_stats(m, layer, x, T, ids, w, NULL, &acc);
	}
	if (st != MOE_OK && !err[0])
		fail(err, cap, "%s", f->last_error());
	s.t_route = now() - t0;
	if ((st = agree(&p, st)) != MOE_OK) {
		if (!err[0])
			fail(err, cap, "another rank failed to route its tokens");
		goto out;
	}
	if (rt) {
		/* every rank's sums added, then the statistics of all the tokens */
		sums[2 * p.E] = acc.z_sum, sums[2 * p.E + 1] = (double)acc.n_tokens;
		t0 = now();
		MPI_Allreduce(MPI_IN_PLACE, sums, (int)(2 * p.E + 2), MPI_DOUBLE, MPI_SUM, comm);
		s.t_wait += now() - t0;
		acc.z_sum = sums[2 * p.E], acc.n_tokens = (uint64_t)sums[2 * p.E + 1];
		st = f->routing_from_sums(m, layer, &acc, rt);
		if (st != MOE_OK)
			fail(err, cap, "%s", f->last_error());
		if ((st = agree(&p, st)) != MOE_OK) {
			if (!err[0])
				fail(err, cap, "another rank failed to reduce the statistics");
			goto out;
		}
		if (rt->expert_ids)
			memcpy(rt->expert_ids, ids, T * W * sizeof *ids);
		if (rt->weights)
			memcpy(rt->weights, w, T * W * sizeof *w);
	}
	for (size_t i = 0; i < T * H; i++) {
		if (es == 2) {
			uint32_t b = (uint32_t)((const uint16_t *)x)[i] << 16;
			memcpy(&xf[i], &b, sizeof b);
		} else {
			xf[i] = ((const float *)x)[i];
		}
	}
	/* counts of every chunk in one exchange: [P][chunks][L] */
	size_t per = (size_t)chunks * p.L;
	cs = calloc((size_t)p.P * per, sizeof *cs);
	cr = calloc((size_t)p.P * per, sizeof *cr);
	st = MOE_ERR_NOMEM;
	int ok = cs && cr;
	for (uint32_t i = 0; ok && i < chunks; i++) {
		c[i].t0 = T * i / chunks, c[i].t1 = T * (i + 1) / chunks;
		ok = chunk_count(&p, &c[i], ids) == 0;
		for (int q = 0; ok && q < p.P; q++)
			memcpy(cs + (size_t)q * per + (size_t)i * p.L,
			       c[i].cnt_out + (size_t)q * p.L, p.L * sizeof *cs);
	}
	if (agree(&p, ok ? MOE_OK : MOE_ERR_NOMEM) != MOE_OK) {
		fail(err, cap, "out of memory");
		goto out;
	}
	t0 = now();
	MPI_Alltoall(cs, (int)per, MPI_INT64_T, cr, (int)per, MPI_INT64_T, comm);
	s.t_wait += now() - t0;
	s.bytes_sent += (uint64_t)(p.P - 1) * per * sizeof *cs;
	for (uint32_t i = 0; i < chunks; i++)
		for (int q = 0; q < p.P; q++)
			memcpy(c[i].cnt_in + (size_t)q * p.L,
			       cr + (size_t)q * per + (size_t)i * p.L, p.L * sizeof *cr);
	ok = 1;
	for (uint32_t i = 0; ok && i < chunks; i++)
		ok = chunk_pack(&p, &c[i], xf, ids, w) == 0;
	if (agree(&p, ok ? MOE_OK : MOE_ERR_NOMEM) != MOE_OK) {
		fail(err, cap, "out of memory, or a chunk of more than INT_MAX floats");
		goto out;
	}
	for (uint32_t i = 0; i < chunks; i++)
		for (int q = 0; q < p.P; q++)
			if (q != p.me) {
				s.bytes_sent += (uint64_t)c[i].sc[q] * 4 + (uint64_t)c[i].bc[q] * 4;
				s.rows_sent += (uint64_t)c[i].sc[q] / p.R;
			}
	/* the pipeline: chunk i + 1 travels while chunk i computes */
	MPI_Ialltoallv(c[0].out, c[0].sc, c[0].sd, MPI_FLOAT, c[0].in, c[0].rc, c[0].rd, MPI_FLOAT,
		       comm, &c[0].req_go);
	enum moe_status local = MOE_OK;
	for (uint32_t i = 0; i < chunks; i++) {
		t0 = now();
		MPI_Wait(&c[i].req_go, MPI_STATUS_IGNORE);
		s.t_wait += now() - t0;
		if (i + 1 < chunks)
			MPI_Ialltoallv(c[i + 1].out, c[i + 1].sc, c[i + 1].sd, MPI_FLOAT,
				       c[i + 1].in, c[i + 1].rc, c[i + 1].rd, MPI_FLOAT, comm,
				       &c[i + 1].req_go);
		t0 = now();
		enum moe_status cst = chunk_compute(&p, f, m, layer, &c[i], err, cap);
		if (local == MOE_OK)
			local = cst;
		s.rows_computed += c[i].n_in;
		s.t_compute += now() - t0;
		MPI_Ialltoallv(c[i].ret_out, c[i].bc, c[i].bd, MPI_FLOAT, c[i].ret_in, c[i].gc,
			       c[i].gd, MPI_FLOAT, comm, &c[i].req_back);
	}
	t0 = now();
	for (uint32_t i = 0; i < chunks; i++)
		MPI_Wait(&c[i].req_back, MPI_STATUS_IGNORE);
	s.t_wait += now() - t0;
	if ((st = agree(&p, local)) != MOE_OK) {
		if (local == MOE_OK)
			fail(err, cap, "another rank's experts failed");
		goto out;
	}
	/* combine each chunk's slots in slot order */
	t0 = now();
	for (uint32_t i = 0; i < chunks && st == MOE_OK; i++) {
		size_t a = c[i].t0, n = c[i].t1 - c[i].t0;
		if (!n)
			continue;
		st = f->combine(m, layer, (const char *)x + a * H * es, n, ids + a * W, w + a * W,
				c[i].ret_in, c[i].slot_row, (char *)y + a * H * es);
		if (st != MOE_OK)
			fail(err, cap, "%s", f->last_error());
	}
	s.t_combine = now() - t0;
out:
	for (uint32_t i = 0; c && i < chunks; i++)
		chunk_free(&c[i]);
	free(c), free(cs), free(cr), free(p.e0), free(ids), free(w), free(xf), free(sums);
	s.t_total = now() - t_start;
	if (stats)
		*stats = s;
	return st;
}
