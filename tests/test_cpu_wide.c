/* test_cpu_wide.c: wide experts (long K loops in the down tiles, 512 to
 * 1100) with biases and both places of the routing weight, f32 and bf16: the
 * layer matches the reference, and the output stays bit for bit independent
 * of the batch and the thread count. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "moe.h"

static char tmpdir[] = "/tmp/test_cpu_wide.XXXXXX";

struct model {
	void *dl;
	enum moe_status (*create)(moe_model **, const struct moe_create_opts *);
	void (*destroy)(moe_model *);
	enum moe_status (*init_random)(moe_model *, uint64_t);
	enum moe_status (*forward)(moe_model *, uint32_t, const void *, void *, size_t,
				   struct moe_routing *, const struct moe_fwd_opts *);
	char path[256];
};

/* H 20: one full and one partial down panel (the full one takes the 16-lane
 * tiles on AVX-512 hosts, the partial one the masked 8-lane tiles). */
static void desc_init(struct moe_desc *d, uint32_t I, enum moe_dtype wt, enum moe_apply apply)
{
	memset(d, 0, sizeof *d);
	d->version = MOE_DESC_VERSION;
	snprintf(d->name, sizeof d->name, "wide-test");
	d->hidden = 20;
	d->n_layers = 1;
	d->n_moe_layers = 1;
	d->weight_dtype = wt;
	d->compute = MOE_COMPUTE_F32; /* the f32 tiles: 16-bit weights widened */
	d->act_dtype = MOE_DTYPE_F32;
	d->mode = MOE_MODE_TOKEN_CHOICE;
	d->score = MOE_SCORE_SOFTMAX;
	d->top_k = 2;
	d->norm = MOE_NORM_SUM;
	d->scale = 1.0f;
	d->n_groups = 1;
	d->kind = MOE_KIND_GLU;
	d->n_experts = 5;
	d->intermediate = I;
	d->act = MOE_ACT_SILU;
	d->act_alpha = 1.702f;
	d->act_limit = 7.0f;
	d->split = 1;
	d->expert_bias = 1;
	d->apply_to = apply;
	d->shared_kind = MOE_KIND_GLU;
	d->shared_act = MOE_ACT_SILU;
}

static void model_open(const struct moe_desc *d, struct model *m, int n)
{
	char err[2048];
	memset(m, 0, sizeof *m);
	snprintf(m->path, sizeof m->path, "%s/m%d.so", tmpdir, n);
	struct moe_cpu_target t = {.cpu = "native", .opt_level = 2};
	int rc = moe_compile_cpu(d, &t, MOE_EMIT_SO, m->path, err, sizeof err);
	if (rc)
		fprintf(stderr, "compile: %s\n", err);
	assert_int_equal(rc, 0);
	m->dl = dlopen(m->path, RTLD_NOW | RTLD_LOCAL);
	assert_non_null(m->dl);
	*(void **)&m->create = dlsym(m->dl, "moe_create");
	*(void **)&m->destroy = dlsym(m->dl, "moe_destroy");
	*(void **)&m->init_random = dlsym(m->dl, "moe_init_random");
	*(void **)&m->forward = dlsym(m->dl, "moe_forward");
	assert_non_null(m->create);
	assert_non_null(m->destroy);
	assert_non_null(m->init_random);
	assert_non_null(m->forward);
}

static void model_close(struct model *m)
{
	dlclose(m->dl);
	unlink(m->path);
}

static void check_width(uint32_t I, enum moe_dtype wt, enum moe_apply apply, int n)
{
	struct moe_desc d;
	desc_init(&d, I, wt, apply);
	struct model m;
	model_open(&d, &m, n);
	size_t T = 23, H = d.hidden;
	float *x = malloc(T * H * 4), *y = malloc(T * H * 4), *y1 = malloc(T * H * 4);
	float *y2 = malloc(T * H * 4), *yr = malloc(T * H * 4);
	assert_true(x && y && y1 && y2 && yr);
	for (size_t i = 0; i < T * H; i++)
		x[i] = 2.0f * moe_rng_uniform(moe_rng_hash(7, 99, i, 0)) - 1.0f;
	moe_model *one, *two;
	struct moe_create_opts o1 = {.threads = 1}, o2 = {.threads = 2};
	assert_int_equal(m.create(&one, &o1), MOE_OK);
	assert_int_equal(m.create(&two, &o2), MOE_OK);
	assert_int_equal(m.init_random(one, 11), MOE_OK);
	assert_int_equal(m.init_random(two, 11), MOE_OK);
	assert_int_equal(m.forward(one, 0, x, y, T, NULL, NULL), MOE_OK);
	for (size_t t = 0; t < T; t++)
		assert_int_equal(m.forward(one, 0, x + t * H, y1 + t * H, 1, NULL, NULL), MOE_OK);
	assert_int_equal(m.forward(two, 0, x, y2, T, NULL, NULL), MOE_OK);
	assert_memory_equal(y, y1, T * H * 4);
	assert_memory_equal(y, y2, T * H * 4);

	struct moe_ref_weights w;
	char err[1024];
	assert_int_equal(moe_ref_weights_alloc(&d, &w), MOE_OK);
	moe_ref_weights_random(&d, 11, 0, &w);
	struct moe_fwd_opts fo = {.layer = 0};
	assert_int_equal(moe_ref_forward(&d, &w, x, yr, T, &fo, NULL, err, sizeof err), MOE_OK);
	double rmax = 0, emax = 0;
	for (size_t i = 0; i < T * H; i++) {
		rmax = fmax(rmax, fabs(yr[i]));
		emax = fmax(emax, fabs((double)y[i] - yr[i]));
	}
	if (!(emax <= 1e-5 * rmax))
		fprintf(stderr, "I %u dtype %d apply %d: max err %g, max |ref| %g\n", I, (int)wt,
			(int)apply, emax, rmax);
	assert_true(rmax > 0);
	assert_true(emax <= 1e-5 * rmax);
	moe_ref_weights_free(&w);
	m.destroy(one), m.destroy(two);
	model_close(&m);
	free(x), free(y), free(y1), free(y2), free(yr);
}

static void test_wide_experts(void **state)
{
	(void)state;
	int n = 0;
	check_width(610, MOE_DTYPE_F32, MOE_APPLY_OUTPUT, n++);
	check_width(512, MOE_DTYPE_F32, MOE_APPLY_INPUT, n++);
	check_width(610, MOE_DTYPE_BF16, MOE_APPLY_OUTPUT, n++);
	check_width(1100, MOE_DTYPE_BF16, MOE_APPLY_INPUT, n++);
}

int main(void)
{
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	const struct CMUnitTest tests[] = {cmocka_unit_test(test_wide_experts)};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	rmdir(tmpdir);
	return rc;
}
