/* test_load.c: loading a model's weights: a layer range (a pipeline stage
 * loads a checkpoint that holds only its layers; the other layers are refused
 * with a message), random initialization on threads (the same bits on any
 * thread count), and the progress line (nothing when stderr is not a
 * terminal, a line on a pseudo-terminal). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <pty.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "safetensors.h"

static int setup(void **state)
{
	(void)state;
	return h_setup("moe_test_load");
}

/* Four model layers, MoE at 1 and 3, every role named per expert. */
static void stage_desc(struct moe_desc *d)
{
	h_base_desc(d, 32, 4, 2, 16);
	d->n_layers = 4;
	d->moe_layers[0] = 1;
	d->moe_layers[1] = 3;
	snprintf(d->names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "l.{layer}.router");
	snprintf(d->names[MOE_ROLE_GATE], MOE_NAME_MAX, "l.{layer}.e.{expert}.gate");
	snprintf(d->names[MOE_ROLE_UP], MOE_NAME_MAX, "l.{layer}.e.{expert}.up");
	snprintf(d->names[MOE_ROLE_DOWN], MOE_NAME_MAX, "l.{layer}.e.{expert}.down");
}

/* A checkpoint with layer `layer`'s random weights (seed) and nothing else. */
static void write_layer(const struct moe_desc *d, uint32_t layer, uint64_t seed, const char *path)
{
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(d, &w), MOE_OK);
	moe_ref_weights_random(d, seed, layer, &w);
	static const enum moe_role roles[] = {MOE_ROLE_ROUTER, MOE_ROLE_GATE, MOE_ROLE_UP,
					      MOE_ROLE_DOWN};
	struct moe_st_tensor ts[1 + 3 * 4];
	char names[1 + 3 * 4][64];
	size_t n = 0;
	for (size_t k = 0; k < sizeof roles / sizeof *roles; k++) {
		uint64_t R, C;
		int pe;
		assert_true(moe_desc_role_shape(d, roles[k], &R, &C, &pe));
		for (uint32_t e = 0; e < (pe ? d->n_experts : 1); e++, n++) {
			char err[256];
			assert_int_equal(moe_st_expand(d->names[roles[k]], layer, pe ? (long)e : -1,
						       names[n], sizeof names[n], err, sizeof err),
					 MOE_OK);
			ts[n] = (struct moe_st_tensor){.name = names[n],
						       .dtype = MOE_ST_F32,
						       .ndim = 2,
						       .shape = {R, C},
						       .data = w.w[roles[k]] + e * R * C};
		}
	}
	char err[1024];
	assert_int_equal(moe_st_write(path, ts, n, err, sizeof err), MOE_OK);
	moe_ref_weights_free(&w);
}

/* A stage holding layers [2, 4) loads a checkpoint with layer 3 only and
 * computes what a model with every layer's random weights computes there;
 * without the range the same checkpoint is refused; layer 1 is refused on the
 * stage by the forward and the staged calls. */
static void test_layer_range(void **state)
{
	(void)state;
	struct moe_desc d;
	stage_desc(&d);
	char path[300], err[1024];
	snprintf(path, sizeof path, "%s/stage.safetensors", h_tmpdir);
	write_layer(&d, 3, 5, path);
	struct h_model m;
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	const char *files[] = {path};

	moe_model *all, *stage, *ref;
	assert_int_equal(m.create(&all, NULL), MOE_OK);
	assert_int_equal(m.load(all, files, 1), MOE_ERR_WEIGHTS);
	assert_non_null(strstr(m.last_error(), "'l.1.router'"));
	m.destroy(all);

	struct moe_create_opts so = {.threads = 2, .layer_begin = 2};
	assert_int_equal(m.create(&stage, &so), MOE_OK);
	enum moe_status st = m.load(stage, files, 1);
	if (st != MOE_OK)
		fprintf(stderr, "load: %s\n", m.last_error());
	assert_int_equal(st, MOE_OK);
	assert_int_equal(m.create(&ref, &(struct moe_create_opts){.threads = 2}), MOE_OK);
	assert_int_equal(m.init_random(ref, 5), MOE_OK);
	size_t T = 7, H = d.hidden;
	float x[7 * 32], ya[7 * 32], yb[7 * 32];
	h_fill_input(x, T * H, 3);
	assert_int_equal(m.forward(stage, 3, x, ya, T, NULL, NULL), MOE_OK);
	assert_int_equal(m.forward(ref, 3, x, yb, T, NULL, NULL), MOE_OK);
	assert_memory_equal(ya, yb, sizeof ya);
	assert_int_equal(m.forward(stage, 1, x, ya, T, NULL, NULL), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "layer 1 is outside the layers [2, 4)"));
	enum moe_status (*route)(moe_model *, uint32_t, const void *, size_t, int32_t *, float *,
				 const struct moe_fwd_opts *);
	*(void **)&route = dlsym(m.dl, "moe_route");
	assert_non_null(route);
	int32_t ids[7 * 2];
	float wts[7 * 2];
	assert_int_equal(route(stage, 1, x, T, ids, wts, NULL), MOE_ERR_ARG);
	assert_non_null(strstr(m.last_error(), "moe_route: layer 1 is outside"));
	assert_int_equal(route(stage, 3, x, T, ids, wts, NULL), MOE_OK);
	/* random weights fill the range only, with the same values */
	assert_int_equal(m.init_random(stage, 5), MOE_OK);
	assert_int_equal(m.forward(stage, 3, x, ya, T, NULL, NULL), MOE_OK);
	assert_memory_equal(ya, yb, sizeof ya);
	assert_int_equal(m.forward(stage, 1, x, ya, T, NULL, NULL), MOE_ERR_ARG);
	m.destroy(stage);
	m.destroy(ref);

	/* ranges without an MoE layer, or past the model, are refused */
	static const uint32_t bad[][2] = {{0, 1}, {2, 3}, {2, 5}, {3, 3}, {4, 0}};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		moe_model *b = (moe_model *)&m; /* overwritten with NULL on failure */
		struct moe_create_opts o = {.layer_begin = bad[i][0], .layer_end = bad[i][1]};
		assert_int_equal(m.create(&b, &o), MOE_ERR_ARG);
		assert_null(b);
		assert_non_null(strstr(m.last_error(), "layer range"));
	}
	h_model_close(&m);
}

/* moegen ARGS: stderr into err (run_moegen) or stdout into out (run_out) */
#define run_moegen(err, cap, ...) h_moegen(err, cap, H_STDERR, __VA_ARGS__)
#define run_out(out, cap, ...) h_moegen(out, cap, H_STDOUT, __VA_ARGS__)

/* moegen run --layers: the stage's checkpoint runs, the whole model refuses
 * it, a layer outside the range is refused. */
static void test_run_layers(void **state)
{
	(void)state;
	struct moe_desc d;
	stage_desc(&d);
	char path[300], err[4096];
	snprintf(path, sizeof path, "%s/run.safetensors", h_tmpdir);
	write_layer(&d, 3, 9, path);
	struct h_model m;
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	assert_int_equal(
	    run_moegen(err, sizeof err, "run %s --weights %s --layers 2:4 --reps 1", m.path, path),
	    0);
	assert_int_equal(run_moegen(err, sizeof err, "run %s --weights %s --reps 1", m.path, path),
			 4);
	assert_non_null(strstr(err, "'l.1.router'"));
	assert_int_equal(
	    run_moegen(err, sizeof err, "run %s --random 1 --layers 2:4 --layer 1", m.path), 4);
	assert_non_null(strstr(err, "outside the layers [2, 4)"));
	/* --random holds the layer it runs alone (by default the first MoE layer) */
	char out[4096];
	assert_int_equal(run_out(out, sizeof out, "run %s --random 1 --layer 3 --reps 1", m.path),
			 0);
	assert_non_null(strstr(out, "weights random in "));
	assert_non_null(strstr(out, " s, layers [3, 4)\n"));
	assert_int_equal(run_out(out, sizeof out, "run %s --random 1 --reps 1", m.path), 0);
	assert_non_null(strstr(out, " s, layers [1, 2)\n"));
	assert_int_equal(
	    run_out(out, sizeof out, "run %s --random 1 --layers 2:4 --reps 1", m.path), 0);
	assert_non_null(strstr(out, " s, layers [2, 4)\n"));
	assert_int_equal(run_moegen(err, sizeof err, "run %s --layers 4:2", m.path), 2);
	assert_non_null(strstr(err, "--layers needs A:B"));
	h_model_close(&m);
}

struct fill_job {
	const struct moe_desc *d;
	struct moe_ref_weights *w;
	size_t first, step, n_blocks;
};

static void *fill_part(void *arg)
{
	struct fill_job *j = arg;
	/* backwards, to show that the order does not matter either */
	for (size_t b = j->n_blocks; b-- > 0;)
		if (b % j->step == j->first)
			moe_ref_weights_random_block(j->d, 11, 1, j->w, b);
	return NULL;
}

/* The random weights in blocks over 2 and 3 threads are the serial fill's bit
 * for bit; models with 1 and 2 threads give the same output bits. */
static void test_random_threads(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 64, 16, 2, 96); /* 98304 elements per expert matrix: 2 blocks */
	d.shared_count = 1;
	d.shared_intermediate = 64;
	struct moe_ref_weights a, b;
	assert_int_equal(moe_ref_weights_alloc(&d, &a), MOE_OK);
	moe_ref_weights_random(&d, 11, 1, &a);
	size_t nb = moe_ref_weights_random_blocks(&d);
	assert_true(nb > 4);
	for (size_t n_thr = 2; n_thr <= 3; n_thr++) {
		assert_int_equal(moe_ref_weights_alloc(&d, &b), MOE_OK);
		pthread_t th[3];
		struct fill_job jobs[3];
		for (size_t t = 0; t < n_thr; t++) {
			jobs[t] = (struct fill_job){&d, &b, t, n_thr, nb};
			assert_int_equal(pthread_create(&th[t], NULL, fill_part, &jobs[t]), 0);
		}
		for (size_t t = 0; t < n_thr; t++)
			pthread_join(th[t], NULL);
		for (int r = 0; r < MOE_ROLE_COUNT; r++) {
			uint64_t R, C;
			int pe;
			if (!moe_desc_role_shape(&d, (enum moe_role)r, &R, &C, &pe))
				continue;
			size_t n = R * C * (pe ? d.n_experts : 1);
			assert_memory_equal(a.w[r], b.w[r], n * sizeof(float));
		}
		moe_ref_weights_free(&b);
	}
	moe_ref_weights_free(&a);

	char err[1024];
	struct h_model m;
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	size_t T = 5, H = d.hidden;
	float x[5 * 64], y1[5 * 64], y2[5 * 64];
	h_fill_input(x, T * H, 4);
	moe_model *m1, *m2;
	assert_int_equal(m.create(&m1, &(struct moe_create_opts){.threads = 1}), MOE_OK);
	assert_int_equal(m.create(&m2, &(struct moe_create_opts){.threads = 2}), MOE_OK);
	assert_int_equal(m.init_random(m1, 11), MOE_OK);
	assert_int_equal(m.init_random(m2, 11), MOE_OK);
	assert_int_equal(m.forward(m1, 1, x, y1, T, NULL, NULL), MOE_OK);
	assert_int_equal(m.forward(m2, 1, x, y2, T, NULL, NULL), MOE_OK);
	assert_memory_equal(y1, y2, sizeof y1);
	/* and a different seed gives different weights */
	assert_int_equal(m.init_random(m2, 12), MOE_OK);
	assert_int_equal(m.forward(m2, 1, x, y2, T, NULL, NULL), MOE_OK);
	assert_memory_not_equal(y1, y2, sizeof y1);
	m.destroy(m1);
	m.destroy(m2);
	h_model_close(&m);
}

/* With the threshold at 0 s the progress line would always be drawn: on a
 * pipe nothing comes, on a pseudo-terminal the line and its end. */
static void test_progress(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, 32, 4, 2, 16);
	char err[4096];
	struct h_model m;
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	const char *bin = getenv("MOEGEN");
	bin = bin ? bin : "build/moegen";
	setenv("MOE_PROGRESS_AFTER", "0", 1);
	assert_int_equal(run_moegen(err, sizeof err, "run %s --random 1 --reps 1", m.path), 0);
	assert_string_equal(err, "");

	int fd;
	pid_t pid = forkpty(&fd, NULL, NULL, NULL);
	assert_true(pid >= 0);
	if (pid == 0) {
		execl(bin, bin, "run", m.path, "--random", "1", "--layers", "0:2", "--reps", "1",
		      (char *)NULL);
		_exit(127);
	}
	size_t n = 0;
	for (;;) { /* until the child closes the terminal (EIO on Linux) */
		ssize_t k = read(fd, err + n, sizeof err - 1 - n);
		if (k > 0)
			n += (size_t)k;
		else if (k < 0 && errno == EINTR)
			continue;
		else
			break;
	}
	err[n] = 0;
	close(fd);
	int st;
	assert_int_equal(waitpid(pid, &st, 0), pid);
	unsetenv("MOE_PROGRESS_AFTER");
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 0);
	assert_non_null(strstr(err, "random weights: 0/2 (layer 0)"));
	assert_non_null(strstr(err, "random weights: done in "));
	h_model_close(&m);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_layer_range),
	    cmocka_unit_test(test_run_layers),
	    cmocka_unit_test(test_random_threads),
	    cmocka_unit_test(test_progress),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
