/* test_pool.c: the runtime thread pool: every task runs exactly once, static
 * ownership, real parallelism, nested and concurrent runs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pool.h"

#define MAX_TASKS 1000
#define MAX_THREADS 4

struct count_ctx {
	atomic_int hits[MAX_TASKS + 1];
	atomic_int bad_thread;
	unsigned n_threads;
	int plain[MAX_TASKS + 1]; /* written without atomics, read after the run */
};

static void count_task(void *ctxp, size_t task, unsigned thread)
{
	struct count_ctx *c = ctxp;
	atomic_fetch_add(&c->hits[task], 1);
	if (thread >= c->n_threads)
		atomic_store(&c->bad_thread, 1);
	c->plain[task] = (int)task * 3 + 1;
}

static void every_task_once(void **state)
{
	(void)state;
	struct count_ctx *c = malloc(sizeof *c);
	assert_non_null(c);
	for (unsigned nt = 1; nt <= MAX_THREADS; nt++) {
		struct moe_pool *p = moe_pool_create(nt);
		assert_non_null(p);
		assert_int_equal(moe_pool_size(p), nt);
		for (size_t n = 0; n <= MAX_TASKS; n++) {
			for (size_t i = 0; i <= MAX_TASKS; i++) {
				atomic_init(&c->hits[i], 0);
				c->plain[i] = 0;
			}
			atomic_init(&c->bad_thread, 0);
			c->n_threads = nt;
			if (n % 2)
				moe_pool_run(p, n, count_task, c);
			else
				moe_pool_run_static(p, n, count_task, c);
			for (size_t i = 0; i < n; i++) {
				assert_int_equal(atomic_load(&c->hits[i]), 1);
				assert_int_equal(c->plain[i], (int)i * 3 + 1);
			}
			/* Nothing beyond n_tasks runs. */
			assert_int_equal(atomic_load(&c->hits[n]), 0);
			assert_int_equal(atomic_load(&c->bad_thread), 0);
		}
		moe_pool_destroy(p);
	}
	free(c);
}

struct sum_ctx {
	atomic_long sum;
};

static void sum_task(void *ctxp, size_t task, unsigned thread)
{
	(void)thread;
	struct sum_ctx *c = ctxp;
	atomic_fetch_add(&c->sum, (long)task + 1);
}

static void many_repeated_runs(void **state)
{
	(void)state;
	for (unsigned nt = 1; nt <= MAX_THREADS; nt++) {
		struct moe_pool *p = moe_pool_create(nt);
		assert_non_null(p);
		for (int r = 0; r < 20000; r++) {
			struct sum_ctx c;
			size_t n = (size_t)(r % 37);
			atomic_init(&c.sum, 0);
			moe_pool_run(p, n, sum_task, &c);
			/* 1 + 2 + ... + n */
			assert_int_equal(atomic_load(&c.sum), (long)(n * (n + 1) / 2));
		}
		moe_pool_destroy(p);
	}
}

struct own_ctx {
	unsigned thread_of[MAX_TASKS];
	/* Per thread: the tasks it ran, in order. Each thread writes only its own
	 * row, which is what static ownership promises. */
	size_t seq[MAX_THREADS][MAX_TASKS];
	size_t seq_len[MAX_THREADS];
};

static void own_task(void *ctxp, size_t task, unsigned thread)
{
	struct own_ctx *c = ctxp;
	c->thread_of[task] = thread;
	if (thread < MAX_THREADS)
		c->seq[thread][c->seq_len[thread]++] = task;
}

static void static_ownership(void **state)
{
	(void)state;
	struct own_ctx *c = malloc(sizeof *c);
	assert_non_null(c);
	for (unsigned nt = 1; nt <= MAX_THREADS; nt++) {
		struct moe_pool *p = moe_pool_create(nt);
		assert_non_null(p);
		for (int rep = 0; rep < 200; rep++) {
			size_t n = (size_t)(rep * 7 % MAX_TASKS) + 1;
			memset(c, 0xff, sizeof c->thread_of);
			memset(c->seq_len, 0, sizeof c->seq_len);
			moe_pool_run_static(p, n, own_task, c);
			for (size_t i = 0; i < n; i++)
				assert_int_equal(c->thread_of[i], i % nt);
			for (unsigned t = 0; t < nt; t++) {
				/* Thread t ran t, t + nt, t + 2 nt, ... in that order. */
				size_t expect_len = n > t ? (n - t + nt - 1) / nt : 0;
				assert_int_equal(c->seq_len[t], expect_len);
				for (size_t j = 0; j < c->seq_len[t]; j++)
					assert_int_equal(c->seq[t][j], t + j * nt);
			}
		}
		moe_pool_destroy(p);
	}
	free(c);
}

/* n tasks that each wait until all n have started: completes only if n
 * distinct threads run at once. The wait is bounded so that a broken pool
 * fails instead of hanging. */
struct meet_ctx {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	unsigned arrived, need;
	int timed_out;
	unsigned seen_mask;
};

static void meet_task(void *ctxp, size_t task, unsigned thread)
{
	(void)task;
	struct meet_ctx *c = ctxp;
	struct timespec dl;
	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 60;
	pthread_mutex_lock(&c->mu);
	c->arrived++;
	c->seen_mask |= 1u << thread;
	pthread_cond_broadcast(&c->cv);
	while (c->arrived < c->need && !c->timed_out)
		if (pthread_cond_timedwait(&c->cv, &c->mu, &dl) != 0)
			c->timed_out = 1;
	pthread_mutex_unlock(&c->mu);
}

static void runs_in_parallel(void **state)
{
	(void)state;
	for (unsigned nt = 2; nt <= MAX_THREADS; nt++) {
		struct moe_pool *p = moe_pool_create(nt);
		assert_non_null(p);
		for (int stat = 0; stat < 2; stat++) {
			struct meet_ctx c = {.need = nt};
			pthread_mutex_init(&c.mu, NULL);
			pthread_cond_init(&c.cv, NULL);
			if (stat)
				moe_pool_run_static(p, nt, meet_task, &c);
			else
				moe_pool_run(p, nt, meet_task, &c);
			assert_int_equal(c.timed_out, 0);
			assert_int_equal(c.arrived, nt);
			assert_int_equal(c.seen_mask, (1u << nt) - 1);
			pthread_cond_destroy(&c.cv);
			pthread_mutex_destroy(&c.mu);
		}
		moe_pool_destroy(p);
	}
}

struct nest_ctx {
	struct moe_pool *p;
	atomic_int inner_hits[8 * 5];
	atomic_int wrong_thread;
};

struct nest_inner {
	struct nest_ctx *c;
	size_t outer;
	unsigned outer_thread;
};

static void nest_inner_task(void *ctxp, size_t task, unsigned thread)
{
	struct nest_inner *in = ctxp;
	atomic_fetch_add(&in->c->inner_hits[in->outer * 5 + task], 1);
	if (thread != in->outer_thread)
		atomic_store(&in->c->wrong_thread, 1);
}

static void nest_outer_task(void *ctxp, size_t task, unsigned thread)
{
	struct nest_ctx *c = ctxp;
	struct nest_inner in = {c, task, thread};
	moe_pool_run(c->p, 5, nest_inner_task, &in);
}

static void nested_run_is_inline(void **state)
{
	(void)state;
	struct nest_ctx c;
	c.p = moe_pool_create(3);
	assert_non_null(c.p);
	for (int i = 0; i < 40; i++)
		atomic_init(&c.inner_hits[i], 0);
	atomic_init(&c.wrong_thread, 0);
	moe_pool_run(c.p, 8, nest_outer_task, &c);
	for (int i = 0; i < 40; i++)
		assert_int_equal(atomic_load(&c.inner_hits[i]), 1);
	assert_int_equal(atomic_load(&c.wrong_thread), 0);
	moe_pool_destroy(c.p);
}

/* Two outside threads share one pool: runs serialize, and each thread index
 * is in use by one task at a time (a per-thread busy flag never collides). */
struct share_ctx {
	struct moe_pool *p;
	atomic_int busy[MAX_THREADS];
	atomic_int collisions;
	atomic_long total;
};

static void share_task(void *ctxp, size_t task, unsigned thread)
{
	struct share_ctx *c = ctxp;
	if (atomic_exchange(&c->busy[thread], 1) != 0)
		atomic_store(&c->collisions, 1);
	atomic_fetch_add(&c->total, (long)task);
	atomic_store(&c->busy[thread], 0);
}

static void *share_caller(void *arg)
{
	struct share_ctx *c = arg;
	for (int r = 0; r < 2000; r++)
		moe_pool_run(c->p, (size_t)(r % 9) + 1, share_task, c);
	return NULL;
}

static void concurrent_callers(void **state)
{
	(void)state;
	struct share_ctx c;
	c.p = moe_pool_create(3);
	assert_non_null(c.p);
	for (int i = 0; i < MAX_THREADS; i++)
		atomic_init(&c.busy[i], 0);
	atomic_init(&c.collisions, 0);
	atomic_init(&c.total, 0);
	pthread_t a, b;
	assert_int_equal(pthread_create(&a, NULL, share_caller, &c), 0);
	assert_int_equal(pthread_create(&b, NULL, share_caller, &c), 0);
	pthread_join(a, NULL);
	pthread_join(b, NULL);
	/* Each caller: sum over r of (n-1)n/2 with n = r % 9 + 1. */
	long expect = 0;
	for (int r = 0; r < 2000; r++) {
		long n = r % 9 + 1;
		expect += n * (n - 1) / 2;
	}
	assert_int_equal(atomic_load(&c.total), 2 * expect);
	assert_int_equal(atomic_load(&c.collisions), 0);
	moe_pool_destroy(c.p);
}

static void default_size_and_null(void **state)
{
	(void)state;
	struct moe_pool *p = moe_pool_create(0);
	assert_non_null(p);
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	assert_int_equal(moe_pool_size(p), n > 0 ? (unsigned)n : 1u);
	moe_pool_destroy(p);
	moe_pool_destroy(NULL);
	assert_int_equal(moe_pool_size(NULL), 0);
	/* Create and destroy without ever running. */
	for (int i = 0; i < 50; i++)
		moe_pool_destroy(moe_pool_create(4));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(every_task_once),       cmocka_unit_test(many_repeated_runs),
	    cmocka_unit_test(static_ownership),      cmocka_unit_test(runs_in_parallel),
	    cmocka_unit_test(nested_run_is_inline),  cmocka_unit_test(concurrent_callers),
	    cmocka_unit_test(default_size_and_null),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
