/* pool.c: a fixed pthread pool with a caller-participating barrier run. A run
 * is published by bumping a generation counter; idle workers spin briefly on
 * it (runs come in quick succession during a forward) and then sleep on a
 * condition variable, so an idle pool costs no CPU. */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* Polls of the generation / completion counters before sleeping: a few tens
 * of microseconds, long enough to catch the next op of a forward. */
#define SPIN_POLLS 4096

struct moe_pool {
	unsigned n; /* threads including the caller */
	pthread_t *threads;
	unsigned n_started;

	pthread_mutex_t mu;
	pthread_cond_t wake;    /* a new generation or stop */
	pthread_cond_t done;    /* the last worker finished */
	pthread_mutex_t run_mu; /* serializes runs from different callers */

	/* The current run, written by the caller before the generation bump. */
	moe_task_fn *fn;
	void *ctx;
	size_t n_tasks;
	int is_static;

	atomic_size_t next;      /* dynamic runs: next task to hand out */
	atomic_uint active;      /* workers still in the current run */
	atomic_ulong generation; /* bumped once per run */
	atomic_int stop;
};

struct worker_arg {
	struct moe_pool *p;
	unsigned idx;
};

/* The pool (and thread index) whose task this thread is running, to run
 * nested calls inline instead of deadlocking. */
static _Thread_local struct moe_pool *tl_pool;
static _Thread_local unsigned tl_idx;

static void run_share(struct moe_pool *p, unsigned idx)
{
	moe_task_fn *fn = p->fn;
	void *ctx = p->ctx;
	size_t n = p->n_tasks;

	if (p->is_static) {
		for (size_t i = idx; i < n; i += p->n)
			fn(ctx, i, idx);
		return;
	}
	for (;;) {
		size_t i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
		if (i >= n)
			break;
		fn(ctx, i, idx);
	}
}

static void *worker(void *argp)
{
	struct worker_arg arg = *(struct worker_arg *)argp;
	struct moe_pool *p = arg.p;
	unsigned long seen = 0;

	free(argp);
	tl_pool = p;
	tl_idx = arg.idx;
	for (;;) {
		unsigned long g = seen;
		for (int i = 0; i < SPIN_POLLS; i++) {
			g = atomic_load_explicit(&p->generation, memory_order_acquire);
			if (g != seen || atomic_load_explicit(&p->stop, memory_order_relaxed))
				break;
			cpu_relax();
		}
		if (g == seen) {
			pthread_mutex_lock(&p->mu);
			while ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) ==
				   seen &&
			       !atomic_load_explicit(&p->stop, memory_order_relaxed))
				pthread_cond_wait(&p->wake, &p->mu);
			pthread_mutex_unlock(&p->mu);
		}
		if (atomic_load_explicit(&p->stop, memory_order_acquire))
			break;
		seen = g;
		run_share(p, arg.idx);
		if (atomic_fetch_sub_explicit(&p->active, 1, memory_order_acq_rel) == 1) {
			/* Taking the mutex orders this signal after the caller's check. */
			pthread_mutex_lock(&p->mu);
			pthread_cond_signal(&p->done);
			pthread_mutex_unlock(&p->mu);
		}
	}
	return NULL;
}

static void stop_workers(struct moe_pool *p)
{
	pthread_mutex_lock(&p->mu);
	atomic_store_explicit(&p->stop, 1, memory_order_release);
	pthread_cond_broadcast(&p->wake);
	pthread_mutex_unlock(&p->mu);
	for (unsigned i = 0; i < p->n_started; i++)
		pthread_join(p->threads[i], NULL);
	p->n_started = 0;
}

struct moe_pool *moe_pool_create(unsigned n_threads)
{
	if (n_threads == 0) {
		long c = sysconf(_SC_NPROCESSORS_ONLN);
		n_threads = c > 0 ? (unsigned)c : 1;
	}
	struct moe_pool *p = calloc(1, sizeof *p);
	if (!p)
		return NULL;
	p->n = n_threads;
	if (pthread_mutex_init(&p->mu, NULL) != 0)
		goto fail_mu;
	if (pthread_mutex_init(&p->run_mu, NULL) != 0)
		goto fail_run_mu;
	if (pthread_cond_init(&p->wake, NULL) != 0)
		goto fail_wake;
	if (pthread_cond_init(&p->done, NULL) != 0)
		goto fail_done;
	atomic_init(&p->next, 0);
	atomic_init(&p->active, 0);
	atomic_init(&p->generation, 0);
	atomic_init(&p->stop, 0);
	if (n_threads > 1) {
		p->threads = calloc(n_threads - 1, sizeof *p->threads);
		if (!p->threads)
			goto fail_threads;
		for (unsigned i = 1; i < n_threads; i++) {
			struct worker_arg *a = malloc(sizeof *a);
			if (!a)
				goto fail_threads;
			a->p = p;
			a->idx = i;
			if (pthread_create(&p->threads[i - 1], NULL, worker, a) != 0) {
				free(a);
				goto fail_threads;
			}
			p->n_started++;
		}
	}
	return p;

fail_threads:
	stop_workers(p);
	free(p->threads);
	pthread_cond_destroy(&p->done);
fail_done:
	pthread_cond_destroy(&p->wake);
fail_wake:
	pthread_mutex_destroy(&p->run_mu);
fail_run_mu:
	pthread_mutex_destroy(&p->mu);
fail_mu:
	free(p);
	return NULL;
}

void moe_pool_destroy(struct moe_pool *p)
{
	if (!p)
		return;
	stop_workers(p);
	free(p->threads);
	pthread_cond_destroy(&p->done);
	pthread_cond_destroy(&p->wake);
	pthread_mutex_destroy(&p->run_mu);
	pthread_mutex_destroy(&p->mu);
	free(p);
}

unsigned moe_pool_size(const struct moe_pool *p)
{
	return p ? p->n : 0;
}

static void run_inline(struct moe_pool *p, size_t n_tasks, moe_task_fn *fn, void *ctx,
		       int is_static, unsigned idx)
{
	for (size_t i = 0; i < n_tasks; i++)
		fn(ctx, i, is_static ? (unsigned)(i % p->n) : idx);
}

static void run(struct moe_pool *p, size_t n_tasks, moe_task_fn *fn, void *ctx, int is_static)
{
	if (n_tasks == 0)
		return;
	if (tl_pool == p) {
		/* A nested call: every thread of the pool may be busy in the outer
		 * run, so the tasks run here, as the calling thread. */
		run_inline(p, n_tasks, fn, ctx, 0, tl_idx);
		return;
	}
	pthread_mutex_lock(&p->run_mu);
	struct moe_pool *outer = tl_pool;
	unsigned outer_idx = tl_idx;
	tl_pool = p;
	tl_idx = 0;
	if (p->n == 1 || n_tasks == 1) {
		run_inline(p, n_tasks, fn, ctx, is_static, 0);
		goto out;
	}
	p->fn = fn;
	p->ctx = ctx;
	p->n_tasks = n_tasks;
	p->is_static = is_static;
	atomic_store_explicit(&p->next, 0, memory_order_relaxed);
	atomic_store_explicit(&p->active, p->n - 1, memory_order_relaxed);
	pthread_mutex_lock(&p->mu);
	atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
	pthread_cond_broadcast(&p->wake);
	pthread_mutex_unlock(&p->mu);

	run_share(p, 0);

	int finished = 0;
	for (int i = 0; i < SPIN_POLLS && !finished; i++) {
		finished = atomic_load_explicit(&p->active, memory_order_acquire) == 0;
		if (!finished)
			cpu_relax();
	}
	if (!finished) {
		pthread_mutex_lock(&p->mu);
		while (atomic_load_explicit(&p->active, memory_order_acquire) != 0)
			pthread_cond_wait(&p->done, &p->mu);
		pthread_mutex_unlock(&p->mu);
	}
out:
	tl_pool = outer;
	tl_idx = outer_idx;
	pthread_mutex_unlock(&p->run_mu);
}

void moe_pool_run(struct moe_pool *p, size_t n_tasks, moe_task_fn *fn, void *ctx)
{
	run(p, n_tasks, fn, ctx, 0);
}

void moe_pool_run_static(struct moe_pool *p, size_t n_tasks, moe_task_fn *fn, void *ctx)
{
	run(p, n_tasks, fn, ctx, 1);
}
