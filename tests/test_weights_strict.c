/* test_weights_strict.c: what moe_load_safetensors refuses and what
 * moe_forward reports: every tensor's full shape against the layout
 * (transposed, flattened, 3-D, a stacked tensor in the wrong orientation),
 * non-finite f32 / bf16 / f16 weights (named, with the index), a FIFO given as
 * a checkpoint (refused, not waited on), and a finite input whose output
 * overflows (an error status, never MOE_OK). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"
#include "moe_ref.h"
#include "safetensors.h"

enum { H = 24, E = 4, K = 2, I = 12 };

static struct moe_desc d;
static struct moe_ref_weights w;
static struct h_model m;
static moe_model *model;
static char path[300];

/* The checkpoint of w: router [E, H] and per-expert gate and up [I, H]
 * (out_in), down stacked and in_out: [E, I, H]. */
static float down_io[E * I * H];
static char enames[2 * E][48];
static struct moe_st_tensor ts[2 + 2 * E];
static size_t n_ts;

static void build_tensors(void)
{
	for (size_t e = 0; e < E; e++) /* canonical [H, I] -> stored [I, H] */
		for (size_t h = 0; h < H; h++)
			for (size_t i = 0; i < I; i++)
				down_io[(e * I + i) * H + h] =
				    w.w[MOE_ROLE_DOWN][(e * H + h) * I + i];
	n_ts = 0;
	ts[n_ts++] = (struct moe_st_tensor){.name = "l.0.router",
					    .dtype = MOE_ST_F32,
					    .ndim = 2,
					    .shape = {E, H},
					    .data = w.w[MOE_ROLE_ROUTER]};
	ts[n_ts++] = (struct moe_st_tensor){.name = "l.0.down",
					    .dtype = MOE_ST_F32,
					    .ndim = 3,
					    .shape = {E, I, H},
					    .data = down_io};
	for (size_t e = 0; e < E; e++)
		for (int g = 0; g < 2; g++) {
			snprintf(enames[2 * e + g], sizeof enames[0], "l.0.e.%zu.%s", e,
				 g ? "up" : "gate");
			ts[n_ts++] = (struct moe_st_tensor){
			    .name = enames[2 * e + g],
			    .dtype = MOE_ST_F32,
			    .ndim = 2,
			    .shape = {I, H},
			    .data = w.w[g ? MOE_ROLE_UP : MOE_ROLE_GATE] + e * I * H};
		}
}

static struct moe_st_tensor *tensor(const char *name)
{
	for (size_t i = 0; i < n_ts; i++)
		if (strcmp(ts[i].name, name) == 0)
			return &ts[i];
	fail_msg("no tensor %s", name);
	return NULL;
}

static enum moe_status load_written(void)
{
	char err[1024];
	assert_int_equal(moe_st_write(path, ts, n_ts, err, sizeof err), MOE_OK);
	const char *files[] = {path};
	return m.load(model, files, 1);
}

/* The load fails with st and a message holding every fragment. */
static void expect_refused(enum moe_status st, ...)
{
	enum moe_status got = load_written();
	if (got == MOE_OK)
		fail_msg("loaded, expected an error");
	assert_int_equal(got, st);
	const char *msg = m.last_error();
	va_list ap;
	va_start(ap, st);
	for (const char *frag; (frag = va_arg(ap, const char *));)
		if (!strstr(msg, frag))
			fail_msg("message lacks '%s': %s", frag, msg);
	va_end(ap);
	build_tensors(); /* undo the change */
}

static int setup(void **state)
{
	if (h_setup("test_weights_strict"))
		return -1;
	h_base_desc(&d, H, E, K, I);
	d.n_layers = 1;
	d.n_moe_layers = 1;
	snprintf(d.names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "l.{layer}.router");
	snprintf(d.names[MOE_ROLE_GATE], MOE_NAME_MAX, "l.{layer}.e.{expert}.gate");
	snprintf(d.names[MOE_ROLE_UP], MOE_NAME_MAX, "l.{layer}.e.{expert}.up");
	snprintf(d.names[MOE_ROLE_DOWN], MOE_NAME_MAX, "l.{layer}.down");
	d.layouts[MOE_ROLE_DOWN].orient = MOE_ORIENT_IN_OUT;
	if (moe_ref_weights_alloc(&d, &w) != MOE_OK)
		return -1;
	moe_ref_weights_random(&d, 7, 0, &w);
	for (int r = 0; r < MOE_ROLE_COUNT; r++)
		if (w.w[r] && r != MOE_ROLE_ROUTER && r != MOE_ROLE_GATE && r != MOE_ROLE_UP &&
		    r != MOE_ROLE_DOWN)
			return -1; /* the checkpoint above would be incomplete */
	char err[1024];
	if (h_model_open(&d, &m, err, sizeof err) != 0) {
		fprintf(stderr, "%s\n", err);
		return -1;
	}
	if (m.create(&model, NULL) != MOE_OK)
		return -1;
	snprintf(path, sizeof path, "%s/w.safetensors", h_tmpdir);
	build_tensors();
	return 0;
	(void)state;
}

static int teardown(void **state)
{
	m.destroy(model);
	h_model_close(&m);
	moe_ref_weights_free(&w);
	return h_teardown(state);
}

/* The well-formed checkpoint loads, and computes what the same weights do. */
static void good_checkpoint(void **state)
{
	(void)state;
	assert_int_equal(load_written(), MOE_OK);
	moe_model *r;
	assert_int_equal(m.create(&r, NULL), MOE_OK);
	assert_int_equal(m.init_random(r, 7), MOE_OK);
	float x[5 * H], ya[5 * H], yb[5 * H];
	h_fill_input(x, 5 * H, 3);
	assert_int_equal(m.forward(model, 0, x, ya, 5, NULL, NULL), MOE_OK);
	assert_int_equal(m.forward(r, 0, x, yb, 5, NULL, NULL), MOE_OK);
	assert_memory_equal(ya, yb, sizeof ya);
	m.destroy(r);
}

/* The element count is right in every case below; only the shape is not. */
static void wrong_shapes(void **state)
{
	(void)state;
	struct moe_st_tensor *t = tensor("l.0.router");
	t->shape[0] = H, t->shape[1] = E; /* transposed */
	expect_refused(MOE_ERR_WEIGHTS, path, "'l.0.router'", "router", "expected shape [4, 24]",
		       "found [24, 4]", NULL);
	t = tensor("l.0.router");
	t->ndim = 1, t->shape[0] = E * H; /* flattened */
	expect_refused(MOE_ERR_WEIGHTS, "'l.0.router'", "expected shape [4, 24]", "found [96]",
		       NULL);
	t = tensor("l.0.router");
	t->ndim = 3, t->shape[0] = 1, t->shape[1] = E, t->shape[2] = H; /* 3-D */
	expect_refused(MOE_ERR_WEIGHTS, "'l.0.router'", "found [1, 4, 24]", NULL);
	t = tensor("l.0.down"); /* stacked, stored out_in where the layout says in_out */
	t->shape[1] = H, t->shape[2] = I;
	expect_refused(MOE_ERR_WEIGHTS, "'l.0.down'", "orient in_out", "expected shape [4, 12, 24]",
		       "found [4, 24, 12]", NULL);
	t = tensor("l.0.down"); /* experts not stacked on their own axis */
	t->ndim = 2, t->shape[0] = E * I, t->shape[1] = H;
	expect_refused(MOE_ERR_WEIGHTS, "'l.0.down'", "found [48, 24]", NULL);
	t = tensor("l.0.e.2.gate"); /* one expert transposed */
	t->shape[0] = H, t->shape[1] = I;
	expect_refused(MOE_ERR_WEIGHTS, "'l.0.e.2.gate'", "expected shape [12, 24]",
		       "found [24, 12]", NULL);
	/* a failed load leaves no weights */
	float x[H], y[H];
	h_fill_input(x, H, 1);
	assert_int_equal(m.forward(model, 0, x, y, 1, NULL, NULL), MOE_ERR_WEIGHTS);
}

/* NaN and infinity in f32, bf16 and f16 tensors are refused at load, naming
 * the tensor and the index of the value. */
static void non_finite_weights(void **state)
{
	(void)state;
	float up1[I * H];
	memcpy(up1, tensor("l.0.e.1.up")->data, sizeof up1);
	up1[37] = NAN;
	tensor("l.0.e.1.up")->data = up1;
	expect_refused(MOE_ERR_WEIGHTS, path, "'l.0.e.1.up'", "NaN", "index 37", NULL);
	up1[37] = 0.5f;
	up1[200] = -INFINITY;
	tensor("l.0.e.1.up")->data = up1;
	expect_refused(MOE_ERR_WEIGHTS, "'l.0.e.1.up'", "infinity", "index 200", NULL);

	uint16_t bf[E * H], hf[E * H];
	for (size_t i = 0; i < E * H; i++) {
		bf[i] = 0x3f80; /* 1.0 */
		hf[i] = 0x3c00; /* 1.0 */
	}
	bf[50] = 0x7f80; /* +inf */
	struct moe_st_tensor *t = tensor("l.0.router");
	t->dtype = MOE_ST_BF16, t->data = bf;
	expect_refused(MOE_ERR_WEIGHTS, "'l.0.router'", "infinity", "index 50", NULL);
	hf[95] = 0x7e00; /* NaN */
	t = tensor("l.0.router");
	t->dtype = MOE_ST_F16, t->data = hf;
	expect_refused(MOE_ERR_WEIGHTS, "'l.0.router'", "NaN", "index 95", NULL);
	/* the same tensors without the bad value load */
	hf[95] = 0x3c00;
	t = tensor("l.0.router");
	t->dtype = MOE_ST_F16, t->data = hf;
	assert_int_equal(load_written(), MOE_OK);
	build_tensors();
}

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = "test_weights_strict: hung on a FIFO\n";
	if (write(2, msg, sizeof msg - 1) < 0)
		_exit(2);
	_exit(1);
}

static void fifo_checkpoint(void **state)
{
	(void)state;
	char fifo[320];
	snprintf(fifo, sizeof fifo, "%s/pipe.safetensors", h_tmpdir);
	assert_int_equal(mkfifo(fifo, 0600), 0);
	signal(SIGALRM, on_alarm);
	alarm(20);
	const char *files[] = {fifo};
	assert_int_equal(m.load(model, files, 1), MOE_ERR_IO);
	assert_non_null(strstr(m.last_error(), "not a regular file"));
	alarm(0);
	unlink(fifo);
}

/* Finite input whose output is not finite: MOE_ERR_INPUT, never MOE_OK. */
static void overflowing_output(void **state)
{
	(void)state;
	assert_int_equal(load_written(), MOE_OK);
	float x[3 * H], y[3 * H];
	h_fill_input(x, 3 * H, 5);
	assert_int_equal(m.forward(model, 0, x, y, 3, NULL, NULL), MOE_OK);
	for (size_t i = 0; i < 3 * H; i++)
		assert_true(isfinite(y[i]));
	for (size_t h = 0; h < H; h++)
		x[H + h] = h % 2 ? 3e38f : -3e38f; /* token 1: finite, far too large */
	assert_int_equal(m.forward(model, 0, x, y, 3, NULL, NULL), MOE_ERR_INPUT);
	assert_non_null(strstr(m.last_error(), "non-finite output at token 1"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(good_checkpoint),    cmocka_unit_test(wrong_shapes),
	    cmocka_unit_test(non_finite_weights), cmocka_unit_test(fifo_checkpoint),
	    cmocka_unit_test(overflowing_output),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
