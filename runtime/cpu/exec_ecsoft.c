/* exec_ecsoft.c: scheduling of expert choice. After the generated score
 * router has run over every token, each expert picks its top-C tokens of the
 * whole group with the generated moe_ec_select (one task per expert block);
 * the chosen (token, expert) slots become the kept rows of the usual grouping. */
#include "moe_kernels.h"
#include "pool.h"

#include <math.h>
#include <stdlib.h>

#define EC_EXPERTS_PER_TASK 4

struct ec_run {
	const struct moe_model *m;
	size_t T;
	int64_t C;
	int64_t *pick; /* C per task */
};

static void ec_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct ec_run *r = ctx;
	const struct moe_model *m = r->m;
	int64_t E = m->d->n_experts;
	int64_t e0 = (int64_t)task * EC_EXPERTS_PER_TASK, e1 = e0 + EC_EXPERTS_PER_TASK;
	if (e1 > E)
		e1 = E;
	m->gen->ec_select((int64_t)r->T, r->C, e0, e1, m->ws.ids, m->ws.wts,
			  r->pick + (size_t)task * (size_t)r->C);
}

int moe_exec_ec_select(struct moe_model *m, size_t T)
{
	const struct moe_desc *d = m->d;
	size_t E = d->n_experts;
	/* C = ceil(T * factor / E), at most T: the reference's formula */
	double cv = ceil((double)T * (double)d->ec_capacity_factor / (double)E);
	int64_t C = cv >= (double)T ? (int64_t)T : (int64_t)cv;
	if (C < 1)
		C = 1;
	size_t n_tasks = (E + EC_EXPERTS_PER_TASK - 1) / EC_EXPERTS_PER_TASK;
	struct ec_run r = {.m = m, .T = T, .C = C};
	r.pick = malloc(n_tasks * (size_t)C * sizeof *r.pick);
	if (!r.pick)
		return -1;
	moe_pool_run(m->pool, n_tasks, ec_task, &r);
	free(r.pick);
	for (size_t s = 0; s < T * E; s++)
		m->ws.kept[s] = m->ws.ids[s] >= 0;
	return 0;
}
