/* test_cli_json.c: what moegen says for tools: --version, and check and info
 * as JSON, against the compiler's own accounting of the same spec. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>
#include <glob.h>

#include "harness.h"
#include "moegen.h"

/* moegen ARGS, stdout into out */
#define run(out, cap, ...) h_moegen(out, cap, H_STDOUT, __VA_ARGS__)

static char buf[1 << 16];

static const cJSON *get(const cJSON *o, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	if (!v)
		fail_msg("missing key '%s'", key);
	return v;
}

static double num(const cJSON *o, const char *key)
{
	const cJSON *v = get(o, key);
	assert_true(cJSON_IsNumber(v));
	return v->valuedouble;
}

static void test_version(void **state)
{
	(void)state;
	assert_int_equal(run(buf, sizeof buf, "--version"), 0);
	assert_non_null(strstr(buf, "moegen "));
	assert_non_null(strstr(buf, "(git "));
	assert_non_null(strstr(buf, "LLVM 19."));
	assert_non_null(strstr(buf, "target cpu:"));
	assert_non_null(strstr(buf, "target cuda:"));
	assert_non_null(strstr(buf, "ABI "));
}

static void test_check_json(void **state)
{
	(void)state;
	assert_int_equal(run(buf, sizeof buf, "check --json specs/mixtral-mini.yaml"), 0);
	cJSON *o = cJSON_Parse(buf);
	assert_non_null(o);
	assert_true(cJSON_IsTrue(get(o, "ok")));
	assert_string_equal(get(o, "router_mode")->valuestring, "token_choice");
	assert_int_equal((int)num(o, "experts"), 8);
	assert_int_equal((int)num(o, "route_width"), 2);
	assert_int_equal(cJSON_GetArraySize(get(o, "diagnostics")), 0);
	cJSON_Delete(o);

	/* a broken override: the error located at --set, the note at the spec */
	assert_int_equal(
	    run(buf, sizeof buf, "check --json specs/mixtral-mini.yaml --set router.top_k=100"), 1);
	o = cJSON_Parse(buf);
	assert_non_null(o);
	assert_true(cJSON_IsFalse(get(o, "ok")));
	assert_int_equal((int)num(o, "exit_code"), 1);
	const cJSON *ds = get(o, "diagnostics");
	assert_true(cJSON_GetArraySize(ds) >= 2);
	const cJSON *e = cJSON_GetArrayItem(ds, 0);
	assert_string_equal(get(e, "severity")->valuestring, "error");
	assert_string_equal(get(e, "file")->valuestring, "--set");
	assert_int_equal((int)num(e, "line"), 1);
	assert_true(num(e, "column") > 1);
	assert_non_null(strstr(get(e, "message")->valuestring, "top_k"));
	const cJSON *n = cJSON_GetArrayItem(ds, 1);
	assert_string_equal(get(n, "severity")->valuestring, "note");
	assert_string_equal(get(n, "file")->valuestring, "specs/mixtral-mini.yaml");
	cJSON_Delete(o);

	/* a file error keeps its exit code, unlocated */
	assert_int_equal(run(buf, sizeof buf, "check --json /nonexistent/x.yaml"), 3);
	o = cJSON_Parse(buf);
	assert_non_null(o);
	assert_int_equal((int)num(o, "exit_code"), 3);
	e = cJSON_GetArrayItem(get(o, "diagnostics"), 0);
	assert_non_null(e);
	assert_null(cJSON_GetObjectItemCaseSensitive(e, "file"));
	cJSON_Delete(o);
}

/* Every spec: info --json reports what moe_info_count computes. */
static void test_info_json(void **state)
{
	(void)state;
	glob_t g;
	assert_int_equal(glob("specs/*.yaml", 0, NULL, &g), 0);
	for (size_t i = 0; i < g.gl_pathc; i++) {
		const char *spec = g.gl_pathv[i];
		assert_int_equal(run(buf, sizeof buf, "info --json %s", spec), 0);
		cJSON *o = cJSON_Parse(buf);
		assert_non_null(o);
		struct moe_desc *d = calloc(1, sizeof *d);
		struct moe_diag diag = {0};
		assert_int_equal(moe_front(spec, NULL, 0, d, &diag), MOE_EXIT_OK);
		struct moe_counts c;
		moe_info_count(d, &c);
		assert_string_equal(get(o, "name")->valuestring, d->name);
		assert_string_equal(get(o, "router_mode")->valuestring, moe_mode_names[d->mode]);
		const cJSON *all = get(get(o, "parameters"), "all");
		assert_true(num(all, "total") == c.total);
		assert_true(num(all, "active") == c.active);
		const cJSON *t = get(o, "per_token");
		assert_true(num(t, "moe_flops") == c.flops_per_token);
		assert_true(num(t, "moe_weight_bytes") == c.weight_bytes_per_token);
		assert_true(num(t, "routed_experts") == c.experts_per_token);
		/* the router in words: never a top-k where the mode has none */
		const char *r = get(o, "router")->valuestring;
		assert_true(r[0] != 0);
		assert_null(strstr(r, "top-0"));
		free(d);
		cJSON_Delete(o);
	}
	globfree(&g);
}

static void test_check_text(void **state)
{
	(void)state;
	assert_int_equal(run(buf, sizeof buf, "check specs/expert-choice.yaml"), 0);
	assert_null(strstr(buf, "top-0"));
	assert_non_null(strstr(buf, "capacity factor"));
	assert_int_equal(run(buf, sizeof buf, "check specs/mixtral-mini.yaml"), 0);
	assert_non_null(strstr(buf, "top-2"));
}

/* The options of a usage text: every "--word" token, sorted, one string. */
static void options_of(const char *text, char *out, size_t cap)
{
	char opts[64][32];
	int n = 0;
	for (const char *p = text; (p = strstr(p, "--")) && n < 64;) {
		size_t k = 2;
		while ((p[k] >= 'a' && p[k] <= 'z') || p[k] == '-')
			k++;
		if (k > 2 && k < sizeof opts[0]) {
			int dup = 0;
			for (int i = 0; i < n; i++)
				dup |= !strncmp(opts[i], p, k) && opts[i][k] == 0;
			if (!dup) {
				memcpy(opts[n], p, k);
				opts[n++][k] = 0;
			}
		}
		p += k;
	}
	qsort(opts, (size_t)n, sizeof opts[0], (int (*)(const void *, const void *))strcmp);
	out[0] = 0;
	for (int i = 0; i < n; i++)
		snprintf(out + strlen(out), cap - strlen(out), "%s ", opts[i]);
}

/* Run `moegen bench ARGS --json FILE` (its stdout in buf) and parse FILE;
 * skips the test where this moegen has no bench (built without OpenBLAS). */
static cJSON *bench_doc(const char *args)
{
	char path[] = "/tmp/moe_bench_json.XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	close(fd);
	int rc = run(buf, sizeof buf, "bench %s --json %s", args, path);
	if (rc == 2 && !strstr(buf, "probes")) { /* a moegen without OpenBLAS has no bench */
		unlink(path);
		skip();
	}
	assert_int_equal(rc, 0);
	FILE *f = fopen(path, "r");
	assert_non_null(f);
	static char text[1 << 16];
	size_t n = fread(text, 1, sizeof text - 1, f);
	text[n] = 0;
	fclose(f);
	unlink(path);
	cJSON *o = cJSON_Parse(text);
	assert_non_null(o);
	return o;
}

/* bench --json on the test-sized shape: one document with the machine, both
 * probe runs and one row per token count, each row's percentages those of
 * its rates against the machine's peaks. */
static void test_bench_json(void **state)
{
	(void)state;
	cJSON *o = bench_doc("--shapes tiny --tokens 1,3 --weights f32 --routing uniform --quick "
			     "--threads 1 --reps 3");
	const cJSON *m = get(o, "machine");
	assert_int_equal((int)num(m, "threads"), 1);
	double peak_f = num(m, "peak_gflops"), peak_b = num(m, "dram_gbps");
	assert_true(peak_f > 0 && peak_b > 0);
	const cJSON *probes = get(o, "probes");
	assert_int_equal(cJSON_GetArraySize(probes), 2);
	assert_string_equal(get(cJSON_GetArrayItem(probes, 1), "when")->valuestring, "at the end");
	const cJSON *rows = get(o, "rows");
	assert_int_equal(cJSON_GetArraySize(rows), 2);
	for (int i = 0; i < 2; i++) {
		const cJSON *r = cJSON_GetArrayItem(rows, i);
		assert_string_equal(get(r, "shape")->valuestring, "tiny");
		assert_string_equal(get(r, "weights")->valuestring, "f32");
		assert_string_equal(get(r, "routing")->valuestring, "uniform");
		assert_int_equal((int)num(r, "tokens"), i ? 3 : 1);
		double ms = num(r, "ms"), gf = num(r, "gflops");
		assert_true(ms > 0 && num(r, "baseline_ms") > 0);
		/* the rate is the row's flops over its time, the percentage of the peak */
		assert_float_equal(gf, num(r, "flops") / (ms * 1e-3) * 1e-9, gf * 1e-9);
		assert_float_equal(num(r, "pct_peak_flops"), 100 * gf / peak_f, 1e-6 * gf);
		assert_float_equal(num(r, "pct_peak_bw"), 100 * num(r, "gbps") / peak_b, 1e-6 * gf);
		/* a short row: a probe reading beside each run */
		assert_true(num(r, "pct_now_bw") > 0);
		assert_true(num(r, "check") < 1e-4); /* the generated layer vs the baseline */
	}
	cJSON_Delete(o);
}

/* bench --modes: a research mode is followed by its token-choice twin (the
 * same experts behind softmax top-k), each a row with routing "mode"; the
 * two run back to back in every repetition, and the mode's row gives its
 * GFLOP/s as a share of the twin's (with one repetition, the ratio of the
 * two rows). */
static void test_bench_twin(void **state)
{
	(void)state;
	cJSON *o = bench_doc("--modes ec --tokens 8 --quick --threads 1 --reps 1 --copies 1");
	assert_non_null(strstr(buf, "ec-tc (expert-choice, E 64 -> 16, token-choice twin): "
				    "token_choice"));
	const cJSON *rows = get(o, "rows");
	assert_int_equal(cJSON_GetArraySize(rows), 2);
	static const char *const names[2] = {"ec", "ec-tc"};
	for (int i = 0; i < 2; i++) {
		const cJSON *r = cJSON_GetArrayItem(rows, i);
		assert_string_equal(get(r, "shape")->valuestring, names[i]);
		assert_string_equal(get(r, "routing")->valuestring, "mode");
		assert_int_equal((int)num(r, "tokens"), 8);
		assert_true(num(r, "ms") > 0 && num(r, "flops") > 0);
	}
	const cJSON *m = cJSON_GetArrayItem(rows, 0), *t = cJSON_GetArrayItem(rows, 1);
	double pct = num(m, "pct_of_twin"), want = 100 * num(m, "gflops") / num(t, "gflops");
	assert_float_equal(pct, want, 1e-9 * want);
	assert_true(cJSON_IsNull(get(t, "pct_of_twin")));
	cJSON_Delete(o);
}

/* docs/cli.md's synopsis lists, per command, the options of its --help. */
static void test_synopsis_matches_help(void **state)
{
	(void)state;
	FILE *f = fopen("docs/cli.md", "r");
	assert_non_null(f);
	static char doc[1 << 16];
	size_t n = fread(doc, 1, sizeof doc - 1, f);
	doc[n] = 0;
	fclose(f);
	static const char *const cmds[][2] = {
	    {"check", "check"},   {"info", "info"},    {"-d", "-d"},   {"ref", "ref"},
	    {"import", "import"}, {"SPEC", "compile"}, {"run", "run"}, {"bench", "bench"},
	};
	for (size_t c = 0; c < sizeof cmds / sizeof *cmds; c++) {
		/* the synopsis entry: "    moegen CMD ..." plus deeper-indented lines */
		char key[32];
		snprintf(key, sizeof key, "\n    moegen %s ", cmds[c][0]);
		const char *a = strstr(doc, key);
		if (!a)
			fail_msg("docs/cli.md: no synopsis for '%s'", cmds[c][0]);
		const char *e = strchr(a + 1, '\n');
		while (e && !strncmp(e, "\n           ", 12))
			e = strchr(e + 1, '\n');
		char entry[1024];
		snprintf(entry, sizeof entry, "%.*s", (int)(e ? e - a : (long)strlen(a)), a);
		/* the usage of --help: the first line plus lines indented by 6 or more */
		assert_int_equal(run(buf, sizeof buf, "%s --help", cmds[c][1]), 0);
		char *u = strstr(buf, "usage:");
		assert_non_null(u);
		char *end = strchr(u, '\n');
		while (end && !strncmp(end, "\n      ", 7))
			end = strchr(end + 1, '\n');
		if (end)
			*end = 0;
		char want[1024], got[1024];
		options_of(u, want, sizeof want);
		options_of(entry, got, sizeof got);
		if (strcmp(want, got))
			fail_msg("'%s': --help has [%s], docs/cli.md has [%s]", cmds[c][1], want,
				 got);
	}
}

/* run --check with --weights is refused before anything runs. */
static void test_run_check_needs_random(void **state)
{
	(void)state;
	char so[] = "/tmp/moegen-cli-json-XXXXXX";
	int fd = mkstemp(so);
	assert_true(fd >= 0);
	close(fd);
	assert_int_equal(run(buf, sizeof buf, "specs/mixtral-mini.yaml -o %s", so), 0);
	assert_int_equal(
	    run(buf, sizeof buf, "run %s --weights /nonexistent.safetensors --check", so), 2);
	assert_null(strstr(buf, "forward"));
	unlink(so);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_version),
	    cmocka_unit_test(test_check_json),
	    cmocka_unit_test(test_info_json),
	    cmocka_unit_test(test_check_text),
	    cmocka_unit_test(test_synopsis_matches_help),
	    cmocka_unit_test(test_bench_json),
	    cmocka_unit_test(test_bench_twin),
	    cmocka_unit_test(test_run_check_needs_random),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
