/* harness.c: the shared part of the generated-CPU-model tests (harness.h):
 * compile a description to model.so in a temporary directory, open it, and
 * compare its forward pass with the reference. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dlfcn.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

char h_tmpdir[64];
int h_opt_level = 1;
const char *h_features;
double h_last_rel;
static int n_models;

/* A small valid token-choice description: callers change fields. */
void h_base_desc(struct moe_desc *d, uint32_t H, uint32_t E, uint32_t k, uint32_t I)
{
	memset(d, 0, sizeof *d);
	d->version = MOE_DESC_VERSION;
	snprintf(d->name, sizeof d->name, "cpu-test");
	d->hidden = H;
	d->n_layers = 2;
	d->n_moe_layers = 2;
	d->moe_layers[0] = 0;
	d->moe_layers[1] = 1;
	d->weight_dtype = MOE_DTYPE_F32;
	d->act_dtype = MOE_DTYPE_F32;
	d->mode = MOE_MODE_TOKEN_CHOICE;
	d->score = MOE_SCORE_SOFTMAX;
	d->top_k = k;
	d->norm = MOE_NORM_SUM;
	d->scale = 1.0f;
	d->n_groups = 1;
	d->kind = MOE_KIND_GLU;
	d->n_experts = E;
	d->intermediate = I;
	d->act = MOE_ACT_SILU;
	d->act_alpha = 1.702f;
	d->act_limit = 7.0f;
	d->split = 1;
	d->shared_kind = MOE_KIND_GLU;
	d->shared_act = MOE_ACT_SILU;
}

/* The models this process compiled. A test that compiles the same
 * description for the same target again (h_assert_invariant's three runs,
 * h_compare at several token counts) opens the file it already has: LLVM's
 * code generation is most of the suite's time. The key is the description
 * byte for byte (it holds no pointers), the features and the optimization
 * level; the files go with the temporary directory (h_teardown). */
struct h_built {
	struct moe_desc d;
	char features[256];
	int opt_level;
	char path[256];
};

static struct h_built *built;
static size_t n_built, cap_built;

static struct h_built *h_built_find(const struct moe_desc *d, const char *features)
{
	for (size_t i = 0; i < n_built; i++)
		if (built[i].opt_level == h_opt_level && !strcmp(built[i].features, features) &&
		    !memcmp(&built[i].d, d, sizeof *d))
			return &built[i];
	return NULL;
}

static void h_built_add(const struct moe_desc *d, const char *features, const char *path)
{
	if (strlen(features) >= sizeof built->features)
		return;
	if (n_built == cap_built) {
		size_t cap = cap_built ? 2 * cap_built : 16;
		struct h_built *b = realloc(built, cap * sizeof *b);
		if (!b)
			return;
		built = b, cap_built = cap;
	}
	struct h_built *b = &built[n_built++];
	memcpy(&b->d, d, sizeof *d);
	snprintf(b->features, sizeof b->features, "%s", features);
	b->opt_level = h_opt_level;
	snprintf(b->path, sizeof b->path, "%s", path);
}

/* Compile d into model.so (or reuse this process's build of it) and open
 * it. Returns 0 or the compile exit code (err holds the message). */
int h_model_open(const struct moe_desc *d, struct h_model *m, char *err, size_t cap)
{
	memset(m, 0, sizeof *m);
	const char *features = h_features ? h_features : "";
	const struct h_built *b = h_built_find(d, features);
	if (b) {
		snprintf(m->path, sizeof m->path, "%s", b->path);
	} else {
		snprintf(m->path, sizeof m->path, "%s/m%d.so", h_tmpdir, n_models++);
		struct moe_cpu_target t = {
		    .cpu = "native", .features = h_features, .opt_level = h_opt_level};
		int rc = moe_compile_cpu(d, &t, MOE_EMIT_SO, m->path, err, cap);
		if (rc)
			return rc;
		h_built_add(d, features, m->path);
	}
	m->dl = dlopen(m->path, RTLD_NOW | RTLD_LOCAL);
	if (!m->dl)
		fprintf(stderr, "dlopen: %s\n", dlerror());
	assert_non_null(m->dl);
	*(void **)&m->info = dlsym(m->dl, "moe_info");
	*(void **)&m->create = dlsym(m->dl, "moe_create");
	*(void **)&m->destroy = dlsym(m->dl, "moe_destroy");
	*(void **)&m->load = dlsym(m->dl, "moe_load_safetensors");
	*(void **)&m->init_random = dlsym(m->dl, "moe_init_random");
	*(void **)&m->forward = dlsym(m->dl, "moe_forward");
	*(void **)&m->last_error = dlsym(m->dl, "moe_last_error");
	*(void **)&m->describe = dlsym(m->dl, "moe_describe");
	assert_non_null(m->info);
	assert_non_null(m->create);
	assert_non_null(m->destroy);
	assert_non_null(m->load);
	assert_non_null(m->init_random);
	assert_non_null(m->forward);
	assert_non_null(m->last_error);
	assert_non_null(m->describe);
	/* only the ABI is exported */
	assert_null(dlsym(m->dl, "moe_ref_forward"));
	assert_null(dlsym(m->dl, "moe_gen_model"));
	return 0;
}

moe_model *h_model_open_loaded(const struct moe_desc *d, struct h_model *m, const char *path)
{
	char err[2048];
	int rc = h_model_open(d, m, err, sizeof err);
	if (rc)
		fprintf(stderr, "compile: %s\n", err);
	assert_int_equal(rc, 0);
	moe_model *mm;
	assert_int_equal(m->create(&mm, NULL), MOE_OK);
	const char *files[] = {path};
	enum moe_status st = m->load(mm, files, 1);
	if (st)
		fprintf(stderr, "load: %s\n", m->last_error());
	assert_int_equal(st, MOE_OK);
	return mm;
}

/* The file stays for the next h_model_open of the same description. */
void h_model_close(struct h_model *m)
{
	dlclose(m->dl);
}

int h_sign_inputs;

void h_fill_input(float *x, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++) {
		x[i] = 2.0f * moe_rng_uniform(moe_rng_hash(seed, 99, i, 0)) - 1.0f;
		if (h_sign_inputs)
			x[i] = x[i] < 0.0f ? -1.0f : 1.0f;
	}
}

enum moe_status h_forward(const struct moe_desc *d, const float *x, size_t T, uint32_t threads,
			  uint64_t seed, float *y)
{
	struct h_model m;
	char err[512];
	assert_int_equal(h_model_open(d, &m, err, sizeof err), 0);
	moe_model *mm;
	struct moe_create_opts co = {.threads = threads};
	assert_int_equal(m.create(&mm, &co), MOE_OK);
	assert_int_equal(m.init_random(mm, 7), MOE_OK);
	float *xf = NULL;
	if (!x) {
		xf = malloc(T * d->hidden * sizeof *xf);
		assert_non_null(xf);
		h_fill_input(xf, T * d->hidden, seed);
		x = xf;
	}
	enum moe_status st = m.forward(mm, d->moe_layers[0], x, y, T, NULL, NULL);
	free(xf);
	m.destroy(mm);
	h_model_close(&m);
	return st;
}

void h_assert_invariant(const struct moe_desc *d, size_t T)
{
	size_t H = d->hidden;
	float *ya = malloc(T * H * sizeof *ya), *yb = malloc(T * H * sizeof *yb);
	assert_true(ya && yb);
	assert_int_equal(h_forward(d, NULL, T, 2, 4, ya), MOE_OK);
	assert_int_equal(h_forward(d, NULL, T, 1, 4, yb), MOE_OK);
	assert_memory_equal(ya, yb, T * H * sizeof *ya);
	assert_int_equal(h_forward(d, NULL, 1, 1, 4, yb), MOE_OK);
	assert_memory_equal(ya, yb, H * sizeof *ya);
	free(ya), free(yb);
}

/* Forward T tokens through the generated model and the reference (same
 * weights, same options): identical expert ids in rank order, weights and
 * statistics within f32 rounding, outputs within H_TOL. y_out (optional)
 * receives the model's output. */
void h_compare(const struct moe_desc *d, size_t T, uint32_t threads, uint64_t seed,
	       const struct moe_fwd_opts *opts, float *y_out)
{
	struct h_model m;
	char err[2048];
	int rc = h_model_open(d, &m, err, sizeof err);
	if (rc)
		fprintf(stderr, "compile: %s\n", err);
	assert_int_equal(rc, 0);
	moe_model *mm;
	struct moe_create_opts co = {.threads = threads};
	assert_int_equal(m.create(&mm, &co), MOE_OK);
	assert_int_equal(m.init_random(mm, seed), MOE_OK);
	size_t H = d->hidden, W = moe_desc_route_width(d), E = d->n_experts;
	uint32_t layer = d->moe_layers[d->n_moe_layers - 1];
	float *x = malloc(T * H * 4), *y = malloc(T * H * 4), *yr = malloc(T * H * 4);
	float *mag = malloc(T * H * 4);
	int32_t *ids = malloc(T * W * 4), *idr = malloc(T * W * 4);
	float *wg = malloc(T * W * 4), *wr = malloc(T * W * 4);
	int64_t *cnt = malloc(E * 8), *cntr = malloc(E * 8);
	float *imp = malloc(E * 4), *impr = malloc(E * 4);
	h_fill_input(x, T * H, seed + 1);
	struct moe_fwd_opts fo = opts ? *opts : (struct moe_fwd_opts){0};
	fo.layer = layer;
	struct moe_routing rt = {ids, wg, cnt, imp, 0, 0, 0, 0};
	struct moe_routing rr = {idr, wr, cntr, impr, 0, 0, 0, 0};
	enum moe_status st = m.forward(mm, layer, x, y, T, &rt, &fo);
	if (st)
		fprintf(stderr, "forward: %s\n", m.last_error());
	assert_int_equal(st, MOE_OK);

	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(d, &w), MOE_OK);
	moe_ref_weights_random(d, seed, layer, &w);
	st = moe_ref_forward_mag(d, &w, x, yr, mag, T, &fo, &rr, err, sizeof err);
	if (st)
		fprintf(stderr, "reference: %s\n", err);
	assert_int_equal(st, MOE_OK);
	double rel = moe_ref_out_err(y, yr, moe_desc_compute_tol(d, 0) > 0 ? mag : NULL, T * H, 0);
	double tol = h_tol(d);
	h_last_rel = rel;
	size_t bad_ids = 0;
	for (size_t i = 0; i < T * W; i++)
		bad_ids += ids[i] != idr[i];
	if (bad_ids || !(rel <= tol)) {
		char dump[8192];
		moe_desc_dump(d, dump, sizeof dump);
		fprintf(stderr, "mismatch: rel %g, %zu ids differ, T %zu\n%s", rel, bad_ids, T,
			dump);
	}
	assert_int_equal(bad_ids, 0);
	assert_true(rel <= tol);
	for (size_t i = 0; i < T * W; i++)
		assert_true(fabs(wg[i] - wr[i]) <= 1e-6 * fmax(1.0, fabs(wr[i])));
	for (size_t i = 0; i < E; i++) {
		assert_int_equal(cnt[i], cntr[i]);
		assert_true(fabs(imp[i] - impr[i]) <= 1e-5 * fmax(1.0, fabs(impr[i])));
	}
	assert_int_equal(rt.n_dropped, rr.n_dropped);
	assert_true(fabs(rt.lb_loss - rr.lb_loss) <= 1e-5 * fmax(1.0, fabs(rr.lb_loss)));
	assert_true(fabs(rt.z_loss - rr.z_loss) <= 1e-5 * fmax(1.0, fabs(rr.z_loss)));
	assert_true(fabs(rt.importance_cv2 - rr.importance_cv2) <=
		    1e-4 * fmax(1.0, fabs(rr.importance_cv2)));
	if (y_out)
		memcpy(y_out, y, T * H * 4);
	moe_ref_weights_free(&w);
	free(x), free(y), free(yr), free(mag), free(ids), free(idr), free(wg), free(wr);
	free(cnt), free(cntr), free(imp), free(impr);
	m.destroy(mm);
	h_model_close(&m);
}

int h_moegen(char *out, size_t cap, const char *redirect, const char *fmt, ...)
{
	const char *bin = getenv("MOEGEN");
	char args[2048], cmd[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(args, sizeof args, fmt, ap);
	va_end(ap);
	/* a hang fails the test (124) instead of stopping the suite */
	snprintf(cmd, sizeof cmd, "timeout 120 %s %s %s", bin ? bin : "build/moegen", args,
		 redirect);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	size_t n = fread(out, 1, cap - 1, p);
	out[n] = 0;
	int st = pclose(p);
	assert_true(WIFEXITED(st));
	return WEXITSTATUS(st);
}

int h_setup(const char *name)
{
	snprintf(h_tmpdir, sizeof h_tmpdir, "/tmp/%s.XXXXXX", name);
	return mkdtemp(h_tmpdir) ? 0 : -1;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb, (void)flag, (void)ftw;
	return remove(path);
}

/* Also after a failed test, whose models were left behind. */
int h_teardown(void **state)
{
	(void)state;
	free(built);
	built = NULL;
	n_built = cap_built = 0;
	return nftw(h_tmpdir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
}
