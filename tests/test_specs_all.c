/* test_specs_all.c: every spec under specs/ loads and checks cleanly, and the real
 * models' `moegen info` counts reproduce their published total and active
 * parameters (docs/models.md explains each convention and gap). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <glob.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moegen.h"

/* How a vendor counts "active": with both embedding tables, or without the
 * input table (a token reads one row of it). */
enum active_conv { ALL, NO_EMBED_IN };

/* Published figures. `gap` is what the spec language cannot express (counted
 * in the total and the active figure), as a formula of the real config. */
struct published {
	const char *name;
	double total, active; /* 0: not published */
	enum active_conv conv;
	double gap;
	double tol_total, tol_active;
};

#define TOL 0.015

static const struct published models[] = {
    {"mixtral-8x7b", 46.7e9, 12.9e9, ALL, 0, TOL, TOL},
    /* q, k, v biases of the attention */
    {"qwen1.5-moe-a2.7b", 14.3e9, 2.7e9, ALL, 24.0 * 3 * 2048, TOL, TOL},
    /* per-head q and k RMSNorms; "3.3B" is 3.35B truncated, not rounded */
    {"qwen3-30b-a3b", 30.5e9, 3.3e9, ALL, 48.0 * 2 * 128, TOL, 0.02},
    /* q and k RMSNorms over the full width */
    {"olmoe-1b-7b", 6.9e9, 1.3e9, ALL, 16.0 * 2 * 2048, TOL, TOL},
    /* "2.4B" is 2.45B truncated */
    {"deepseek-v2-lite", 15.7e9, 2.4e9, NO_EMBED_IN, 0, TOL, 0.025},
    {"deepseek-v3", 671e9, 37e9, NO_EMBED_IN, 0, TOL, TOL},
    {"dbrx", 132e9, 36e9, ALL, 0, TOL, TOL},
    /* the decoder's cross-attention (q, k, v, o) and its norm, the
     * decoder's final norm, two relative-position tables (32 x 12) */
    {"switch-base-8", 0.62e9, 0, ALL, 12.0 * (4 * 768 * 768 + 768) + 768 + 2 * 32 * 12, TOL, TOL},
    /* attention biases (q 4096, k 512, v 512, o 2880) and 64 sinks per layer */
    {"gpt-oss-20b", 20.9e9, 3.6e9, NO_EMBED_IN, 24.0 * (4096 + 512 + 512 + 2880 + 64), TOL, TOL},
    /* the published 109B includes the vision encoder */
    {"llama4-scout", 109e9, 17e9, ALL, 0, TOL, TOL},
    /* LayerNorm biases (two per layer and the final one) */
    {"phi-3.5-moe", 41.9e9, 6.6e9, ALL, (2.0 * 32 + 1) * 4096, TOL, TOL},
};

#define N_MODELS (sizeof models / sizeof *models)

struct capture {
	char text[8192];
	size_t len;
};

static void sink(void *ctx, const char *line)
{
	struct capture *c = ctx;
	int n = snprintf(c->text + c->len, sizeof c->text - c->len, "%s\n", line);
	if (n > 0)
		c->len +=
		    (size_t)n < sizeof c->text - c->len ? (size_t)n : sizeof c->text - c->len - 1;
}

struct spec_file {
	char path[1024];
	char stem[256];
};

static struct spec_file *files;
static size_t n_files;

static int find_specs(void **state)
{
	(void)state;
	const char *root = getenv("MOE_SOURCE_DIR");
	char pattern[1024];
	snprintf(pattern, sizeof pattern, "%s/specs/*.yaml", root && *root ? root : ".");
	glob_t g;
	if (glob(pattern, 0, NULL, &g) != 0) {
		fprintf(stderr, "no specs match %s\n", pattern);
		return -1;
	}
	files = calloc(g.gl_pathc, sizeof *files);
	if (!files) {
		globfree(&g);
		return -1;
	}
	for (size_t i = 0; i < g.gl_pathc; i++) {
		snprintf(files[i].path, sizeof files[i].path, "%s", g.gl_pathv[i]);
		const char *base = strrchr(g.gl_pathv[i], '/');
		base = base ? base + 1 : g.gl_pathv[i];
		snprintf(files[i].stem, sizeof files[i].stem, "%.*s", (int)(strlen(base) - 5),
			 base);
	}
	n_files = g.gl_pathc;
	globfree(&g);
	return 0;
}

static int free_specs(void **state)
{
	(void)state;
	free(files);
	return 0;
}

/* Load and check one spec; fails the test with the diagnostics otherwise. */
static void resolve(const char *path, struct moe_desc *d)
{
	struct capture cap = {{0}, 0};
	struct moe_diag diag = {.sink = sink, .ctx = &cap};
	struct moe_spec *s = moe_spec_load(path, &diag);
	if (!s)
		fail_msg("%s does not load:\n%s", path, cap.text);
	int rc = moe_spec_check(s, d, &diag);
	moe_spec_free(s);
	if (rc != 0 || diag.n_errors != 0)
		fail_msg("%s does not check:\n%s", path, cap.text);
	if (diag.n_warnings)
		fprintf(stderr, "%s: warnings:\n%s", path, cap.text);
}

static void test_every_spec_checks(void **state)
{
	(void)state;
	assert_true(n_files >= N_MODELS);
	struct moe_desc *d = calloc(1, sizeof *d);
	assert_non_null(d);
	for (size_t i = 0; i < n_files; i++) {
		resolve(files[i].path, d);
		/* each file is named after its model */
		assert_string_equal(d->name, files[i].stem);
		assert_true(d->n_moe_layers >= 1);
		struct moe_counts c;
		moe_info_count(d, &c);
		assert_true(c.total > 0 && c.active > 0 && c.active <= c.total);
		assert_true(c.routed_active <= c.routed_total);
		assert_true(c.flops_per_token > 0 && c.weight_bytes_per_token > 0);
		FILE *f = fopen("/dev/null", "w");
		assert_non_null(f);
		moe_info_print(d, f);
		fclose(f);
	}
	free(d);
}

static const struct spec_file *spec_named(const char *name)
{
	for (size_t i = 0; i < n_files; i++)
		if (strcmp(files[i].stem, name) == 0)
			return &files[i];
	return NULL;
}

static void check_close(const char *name, const char *what, double got, double want, double tol)
{
	double err = fabs(got - want) / want;
	fprintf(stderr, "  %-20s %-6s computed %8.3fB published %8.3fB  (%+.2f%%)\n", name, what,
		got / 1e9, want / 1e9, 100 * (got / want - 1));
	if (err > tol)
		fail_msg("%s: %s %.0f vs published %.0f: off by %.2f%% (> %.2f%%)", name, what, got,
			 want, 100 * err, 100 * tol);
}

static void test_published_counts(void **state)
{
	(void)state;
	struct moe_desc *d = calloc(1, sizeof *d);
	assert_non_null(d);
	for (size_t i = 0; i < N_MODELS; i++) {
		const struct published *p = &models[i];
		const struct spec_file *f = spec_named(p->name);
		if (!f)
			fail_msg("specs/%s.yaml is missing", p->name);
		resolve(f->path, d);
		struct moe_counts c;
		moe_info_count(d, &c);
		check_close(p->name, "total", c.total + p->gap, p->total, p->tol_total);
		if (p->active > 0) {
			double a = p->conv == ALL ? c.active : c.active_no_embed_in;
			check_close(p->name, "active", a + p->gap, p->active, p->tol_active);
		}
	}
	free(d);
}

/* The research designs resolve to the shapes their comments promise. */
static void test_research_shapes(void **state)
{
	(void)state;
	struct moe_desc *d = calloc(1, sizeof *d);
	assert_non_null(d);
	struct moe_counts c;
	const struct spec_file *f;

	if (!(f = spec_named("peer-1m")))
		fail_msg("specs/peer-1m.yaml is missing");
	resolve(f->path, d);
	assert_int_equal(d->mode, MOE_MODE_PRODUCT_KEY);
	assert_int_equal(d->kind, MOE_KIND_SINGLE_NEURON);
	assert_int_equal(moe_desc_pk_experts(d), 1024u * 1024u);
	assert_int_equal(d->n_experts, 1024u * 1024u);
	moe_info_count(d, &c);
	assert_true(c.experts_per_token == 8.0 * 16.0);

	if (!(f = spec_named("fine-grained-split")))
		fail_msg("specs/fine-grained-split.yaml is missing");
	resolve(f->path, d);
	assert_int_equal(d->split, 4);
	assert_int_equal(d->n_experts, 16 * 4);
	assert_int_equal(d->top_k, 2 * 4);
	assert_int_equal(d->intermediate, 3584 / 4);

	if (!(f = spec_named("shazeer-hierarchical")))
		fail_msg("specs/shazeer-hierarchical.yaml is missing");
	resolve(f->path, d);
	assert_int_equal(d->mode, MOE_MODE_HIERARCHICAL);
	assert_int_equal(d->n_levels, 2);
	assert_int_equal(d->kind, MOE_KIND_MLP);
	assert_int_equal(d->intermediate, 1024);
	assert_int_equal(d->hidden, 512);

	if (!(f = spec_named("mixtral-mini")))
		fail_msg("specs/mixtral-mini.yaml is missing");
	resolve(f->path, d);
	assert_int_equal(d->weight_dtype, MOE_DTYPE_F32);
	assert_int_equal(d->n_experts, 8);
	assert_int_equal(d->top_k, 2);
	assert_true(d->hidden >= 64 && d->hidden <= 128);
	assert_true(d->intermediate >= 2 * d->hidden && d->intermediate <= 4 * d->hidden);
	free(d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_every_spec_checks),
	    cmocka_unit_test(test_published_counts),
	    cmocka_unit_test(test_research_shapes),
	};
	return cmocka_run_group_tests(tests, find_specs, free_specs);
}
