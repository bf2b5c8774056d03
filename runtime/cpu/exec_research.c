/* exec_research.c: scheduling around the research routers. Training-mode
 * input jitter runs the generated moe_jitter over token blocks before
 * anything else (the router and the experts see the jittered input); the
 * forward options are handed to the generated router for its noise draws. */
#include "moe_kernels.h"
#include "pool.h"

#include <stdlib.h>
#include <string.h>

#define JITTER_TOKENS_PER_TASK 32

struct jitter_run {
	const struct moe_model *m;
	const float *x;
	float *xj;
	size_t T;
};

static void jitter_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct jitter_run *r = ctx;
	int64_t t0 = (int64_t)task * JITTER_TOKENS_PER_TASK, t1 = t0 + JITTER_TOKENS_PER_TASK;
	if (t1 > (int64_t)r->T)
		t1 = (int64_t)r->T;
	r->m->gen->jitter(r->x, r->xj, t0, t1, r->m->fwd.seed, r->m->fwd.layer);
}

enum moe_status moe_exec_research(struct moe_model *m, const struct moe_layer_w *lw, const float *x,
				  float *y, size_t T, struct moe_routing *rt,
				  const struct moe_fwd_opts *opts)
{
	const struct moe_desc *d = m->d;
	if (m->gen->pk_route)
		return moe_exec_peer(m, lw, x, y, T, rt);
	memset(&m->fwd, 0, sizeof m->fwd);
	if (opts && opts->training && d->noise != MOE_NOISE_NONE)
		m->fwd = *opts;
	/* training is set only where the description has noise to draw */
	if (m->fwd.training && d->noise == MOE_NOISE_LEARNED_GAUSSIAN && !lw->noise) {
		moe_set_error("moe_forward: training with learned_gaussian noise needs the '%s' "
			      "weights, which were not loaded",
			      moe_role_names[MOE_ROLE_NOISE]);
		return MOE_ERR_WEIGHTS;
	}
	if (!(m->fwd.training && d->noise == MOE_NOISE_JITTER))
		return moe_exec_cpu(m, lw, x, y, T, rt);
	float *xj = malloc(T * d->hidden * sizeof *xj);
	if (!xj) {
		moe_set_error("moe_forward: out of memory");
		return MOE_ERR_NOMEM;
	}
	struct jitter_run jr = {.m = m, .x = x, .xj = xj, .T = T};
	moe_pool_run(m->pool, (T + JITTER_TOKENS_PER_TASK - 1) / JITTER_TOKENS_PER_TASK,
		     jitter_task, &jr);
	enum moe_status st = moe_exec_cpu(m, lw, xj, y, T, rt);
	free(xj);
	return st;
}
