/* pool.h: the runtime's fixed thread pool. Generated kernels are single-threaded
 * tiles; the executor hands them to this pool. The calling thread takes part as
 * thread 0, so a pool of n threads starts n - 1 workers. */
#ifndef MOE_POOL_H
#define MOE_POOL_H

#include <stddef.h>

struct moe_pool;

/* A task: `task` in [0, n_tasks), `thread` in [0, moe_pool_size(p)) names the
 * thread running it (for per-thread scratch). */
typedef void moe_task_fn(void *ctx, size_t task, unsigned thread);

/* Start a pool of n_threads threads (0: all online cores). Returns NULL when
 * the threads or memory cannot be had; nothing is left running then. */
struct moe_pool *moe_pool_create(unsigned n_threads);
/* Stop and join the workers and free the pool. NULL is a no-op. */
void moe_pool_destroy(struct moe_pool *p);
unsigned moe_pool_size(const struct moe_pool *p);

/* Run fn for every task in [0, n_tasks) and return when all have finished
 * (a barrier; their writes are visible to the caller). Tasks are handed out one
 * at a time from a shared counter, so which thread runs a task is not fixed.
 * A pool of one thread runs the tasks in order on the caller. Runs from
 * several threads on one pool are serialized. A run started from inside a
 * task of the same pool runs all its tasks on that thread, with that
 * thread's index. */
void moe_pool_run(struct moe_pool *p, size_t n_tasks, moe_task_fn *fn, void *ctx);
/* Like moe_pool_run, but task i always runs on thread i % moe_pool_size(p), in
 * increasing order of i on each thread: for work whose result must not depend
 * on scheduling (thread-owned accumulators, reproducible reductions). */
void moe_pool_run_static(struct moe_pool *p, size_t n_tasks, moe_task_fn *fn, void *ctx);

#endif
