/* test_cli.c: the moegen command as a user runs it: exit codes, usage,
 * overrides and the outputs of check, info, -d and ref. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "harness.h"
#include "moegen.h"

/* moegen ARGS, stdout and stderr into out */
#define run(out, cap, ...) h_moegen(out, cap, H_BOTH, __VA_ARGS__)

static char buf[1 << 16];

static void test_usage(void **state)
{
	(void)state;
	assert_int_equal(run(buf, sizeof buf, ""), 2);
	assert_non_null(strstr(buf, "usage: moegen"));
	assert_int_equal(run(buf, sizeof buf, "--help"), 0);
	assert_int_equal(run(buf, sizeof buf, "chekc specs/mixtral-mini.yaml"), 2);
	assert_non_null(strstr(buf, "did you mean 'check'"));
	static const char *const cmds[] = {"check", "info", "ref", "-d"};
	for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++) {
		assert_int_equal(run(buf, sizeof buf, "%s --help", cmds[i]), 0);
		assert_non_null(strstr(buf, "usage: moegen"));
	}
	assert_int_equal(run(buf, sizeof buf, "check"), 2);
	assert_non_null(strstr(buf, "missing SPEC"));
	assert_int_equal(run(buf, sizeof buf, "check specs/mixtral-mini.yaml --bogus"), 2);
	assert_non_null(strstr(buf, "unknown option '--bogus'"));
	assert_int_equal(run(buf, sizeof buf, "-d bogus specs/mixtral-mini.yaml"), 2);
	assert_int_equal(run(buf, sizeof buf, "ref specs/mixtral-mini.yaml --tokens x"), 2);
}

static void test_check(void **state)
{
	(void)state;
	assert_int_equal(run(buf, sizeof buf, "check specs/mixtral-mini.yaml"), 0);
	assert_non_null(strstr(buf, ": ok"));
	assert_int_equal(run(buf, sizeof buf, "check /nonexistent/x.yaml"), 3);
	assert_non_null(strstr(buf, "cannot read '/nonexistent/x.yaml'"));
	/* An override that breaks a cross-field rule is located at --set. */
	assert_int_equal(
	    run(buf, sizeof buf, "check specs/mixtral-mini.yaml --set router.top_k=100"), 1);
	assert_non_null(strstr(buf, "--set:1:"));
	assert_non_null(strstr(buf, "error:"));
	assert_int_equal(run(buf, sizeof buf, "check specs/mixtral-mini.yaml --set model.hiden=3"),
			 1);
	assert_non_null(strstr(buf, "did you mean 'hidden'"));
	assert_int_equal(run(buf, sizeof buf, "check specs/mixtral-mini.yaml --set noequals"), 1);
}

static void test_dump(void **state)
{
	(void)state;
	assert_int_equal(
	    run(buf, sizeof buf, "-d model specs/mixtral-mini.yaml --set model.hidden=96"), 0);
	assert_non_null(strstr(buf, "hidden 96\n"));
	assert_int_equal(
	    run(buf, sizeof buf, "-d spec specs/mixtral-mini.yaml --set model.hidden=96"), 0);
	assert_non_null(strstr(buf, "hidden: 96"));
	/* split m multiplies experts and top_k and divides the width */
	assert_int_equal(run(buf, sizeof buf,
			     "-d model specs/mixtral-mini.yaml --set experts.split=2 "
			     "--set experts.count=8 --set router.top_k=2 "
			     "--set experts.intermediate=128"),
			 0);
	assert_non_null(strstr(buf, "count 16 intermediate 64"));
	assert_non_null(strstr(buf, "top_k 4\n"));
}

static void test_info(void **state)
{
	(void)state;
	/* The published figures: 46.7B total, 12.9B active. */
	assert_int_equal(run(buf, sizeof buf, "info specs/mixtral-8x7b.yaml"), 0);
	assert_non_null(strstr(buf, "46.7B"));
	assert_non_null(strstr(buf, "12.9B"));
	assert_int_equal(run(buf, sizeof buf, "info specs/deepseek-v3.yaml"), 0);
	assert_non_null(strstr(buf, "671"));
	assert_int_equal(run(buf, sizeof buf, "info specs/mixtral-mini.yaml --set model.hidden=64"),
			 0);
}

static void test_ref(void **state)
{
	(void)state;
	char a[1 << 14];
	assert_int_equal(run(a, sizeof a, "ref specs/mixtral-mini.yaml --random 3 --tokens 5"), 0);
	assert_non_null(strstr(a, "5 tokens"));
	assert_non_null(strstr(a, "load-balancing loss"));
	/* Deterministic for a seed, different for another. */
	assert_int_equal(run(buf, sizeof buf, "ref specs/mixtral-mini.yaml --random 3 --tokens 5"),
			 0);
	assert_string_equal(a, buf);
	assert_int_equal(run(buf, sizeof buf, "ref specs/mixtral-mini.yaml --random 4 --tokens 5"),
			 0);
	assert_string_not_equal(a, buf);
	/* Zero tokens is valid. */
	assert_int_equal(run(buf, sizeof buf, "ref specs/mixtral-mini.yaml --tokens 0"), 0);
	assert_int_equal(run(buf, sizeof buf, "ref specs/mixtral-mini.yaml --layer 999"), 2);
	assert_non_null(strstr(buf, "not an MoE layer"));
}

/* Exit codes, one failure class at a time (docs/cli.md). */

static char tdir[256];

static int make_tdir(void)
{
	snprintf(tdir, sizeof tdir, "%s/moegen-test-cli.XXXXXX",
		 getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	return mkdtemp(tdir) ? 0 : -1;
}

static void rm_tdir(void)
{
	char cmd[512];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", tdir);
	assert_int_equal(system(cmd), 0);
}

/* 1: the spec or an override is invalid. */
static void test_exit_spec(void **state)
{
	(void)state;
	assert_int_equal(make_tdir(), 0);
	char p[512];
	snprintf(p, sizeof p, "%s/bad.yaml", tdir);
	FILE *f = fopen(p, "w");
	assert_non_null(f);
	fputs("moegen: 1\nname: [unclosed\n", f);
	fclose(f);
	static const char *const cmds[] = {"check", "info", "-d spec", "ref", "compile"};
	for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++) {
		assert_int_equal(run(buf, sizeof buf, "%s %s", cmds[i], p), 1);
		assert_non_null(strstr(buf, "bad.yaml:"));
	}
	assert_int_equal(run(buf, sizeof buf,
			     "specs/mixtral-mini.yaml --emit ll -o %s/x.ll "
			     "--set experts.count=0",
			     tdir),
			 1);
	rm_tdir();
}

/* Duplicate keys (found by sorting) are reported in file order, each pointing
 * at the first occurrence, in every mapping. */
static void test_duplicate_keys(void **state)
{
	(void)state;
	assert_int_equal(make_tdir(), 0);
	char p[512];
	snprintf(p, sizeof p, "%s/dup.yaml", tdir);
	FILE *f = fopen(p, "w");
	assert_non_null(f);
	fputs("moegen: 1\nb: 1\na: 2\nb: 3\nab: 4\na: 5\nm:\n  x: 1\n  x: 2\nb: 6\n", f);
	fclose(f);
	assert_int_equal(run(buf, sizeof buf, "-d spec %s", p), 1);
	static const char *const want[] = {
	    "dup.yaml:4:1: error: duplicate key 'b'",  "dup.yaml:2:1: note: 'b' first given here",
	    "dup.yaml:6:1: error: duplicate key 'a'",  "dup.yaml:3:1: note: 'a' first given here",
	    "dup.yaml:9:3: error: duplicate key 'x'",  "dup.yaml:8:3: note: 'x' first given here",
	    "dup.yaml:10:1: error: duplicate key 'b'",
	};
	const char *at = buf;
	for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
		const char *hit = strstr(at, want[i]);
		assert_non_null(hit);
		at = hit + strlen(want[i]);
	}
	assert_null(strstr(buf, "'ab'"));
	rm_tdir();
}

/* 2: bad command line, in every command. */
static void test_exit_usage(void **state)
{
	(void)state;
	static const char *const cmds[] = {
	    "check --bogus",
	    "info",
	    "-d",
	    "ref --tokens",
	    "import",
	    "import --bogus",
	    "compile",
	    "run",
	    "run x.so --tokens",
	    "bench --bogus",
	    "specs/mixtral-mini.yaml --emit exe",
	};
	for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++)
		assert_int_equal(run(buf, sizeof buf, "%s", cmds[i]), 2);
}

/* 3: a file could not be read or written: missing, a directory, a FIFO;
 * -o into a missing directory, onto a directory or onto the spec. */
static void test_exit_file(void **state)
{
	(void)state;
	assert_int_equal(make_tdir(), 0);
	assert_int_equal(run(buf, sizeof buf, "check /tmp"), 3);
	assert_non_null(strstr(buf, "cannot read '/tmp': it is a directory"));
	assert_int_equal(run(buf, sizeof buf, "info %s/missing.yaml", tdir), 3);
	assert_int_equal(run(buf, sizeof buf, "import %s/missing.json", tdir), 3);
	assert_int_equal(run(buf, sizeof buf, "import %s", tdir), 3);
	assert_int_equal(run(buf, sizeof buf, "run %s/missing.so", tdir), 3);
	assert_int_equal(run(buf, sizeof buf, "run %s", tdir), 3);
	char fifo[512];
	snprintf(fifo, sizeof fifo, "%s/fifo.so", tdir);
	assert_int_equal(mkfifo(fifo, 0600), 0);
	assert_int_equal(run(buf, sizeof buf, "run %s", fifo), 3);
	assert_non_null(strstr(buf, "a FIFO, not a regular file"));
	/* output errors: a clear message, never the linker's */
	assert_int_equal(run(buf, sizeof buf, "specs/mixtral-mini.yaml -o /missing/dir/m.so"), 3);
	assert_non_null(strstr(buf, "cannot write '/missing/dir/m.so': the directory "
				    "'/missing/dir' does not exist"));
	assert_null(strstr(buf, "link"));
	assert_int_equal(run(buf, sizeof buf, "specs/mixtral-mini.yaml --emit ll -o %s", tdir), 3);
	assert_non_null(strstr(buf, "it is a directory"));
	assert_int_equal(run(buf, sizeof buf, "specs/mixtral-mini.yaml -o specs/mixtral-mini.yaml"),
			 3);
	assert_non_null(strstr(buf, "it is the input"));
	rm_tdir();
}

/* 4: code generation or linking failed, or a feature is not generated. */
static void test_exit_backend(void **state)
{
	(void)state;
	assert_int_equal(make_tdir(), 0);
	assert_int_equal(run(buf, sizeof buf,
			     "specs/mixtral-mini.yaml --emit ll -o %s/x.ll "
			     "--set router.capacity.token_fraction=0.5 "
			     "--set router.capacity.normalize_after_drop=true",
			     tdir),
			 4);
	assert_non_null(strstr(buf, "is not generated for target cpu"));
	char cmd[1024];
	snprintf(cmd, sizeof cmd, "MOE_CC=false %s specs/mixtral-mini.yaml -o %s/m.so 2>&1",
		 getenv("MOEGEN") ? getenv("MOEGEN") : "build/moegen", tdir);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	size_t n = fread(buf, 1, sizeof buf - 1, p);
	buf[n] = 0;
	int st = pclose(p);
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 4);
	assert_non_null(strstr(buf, "linking failed"));
	/* the failed link left neither the output nor a temporary */
	char ls[512];
	snprintf(ls, sizeof ls, "test -z \"$(ls -A '%s')\"", tdir);
	assert_int_equal(system(ls), 0);
	rm_tdir();
}

/* 5: run --check found a mismatch. The model is a real one behind a wrapper
 * library that adds 1 to the first output value. */
static void test_exit_check(void **state)
{
	(void)state;
	assert_int_equal(make_tdir(), 0);
	assert_int_equal(run(buf, sizeof buf, "specs/mixtral-mini.yaml -O1 -o %s/real.so", tdir),
			 0);
	assert_int_equal(run(buf, sizeof buf, "run %s/real.so --check --tokens 4", tdir), 0);
	char src[512], cmd[2048];
	snprintf(src, sizeof src, "%s/off_by_one.c", tdir);
	FILE *f = fopen(src, "w");
	assert_non_null(f);
	fprintf(
	    f,
	    "#include <dlfcn.h>\n#include <stddef.h>\n#include <stdint.h>\n"
	    "static void *h;\n"
	    "static void *sym(const char *n) {\n"
	    "\tif (!h) h = dlopen(\"%s/real.so\", RTLD_NOW | RTLD_LOCAL);\n"
	    "\treturn dlsym(h, n);\n}\n"
	    "const void *moe_info(void) { return ((const void *(*)(void))sym(\"moe_info\"))(); }\n"
	    "int moe_create(void **m, const void *o) {\n"
	    "\treturn ((int (*)(void **, const void *))sym(\"moe_create\"))(m, o); }\n"
	    "void moe_destroy(void *m) { ((void (*)(void *))sym(\"moe_destroy\"))(m); }\n"
	    "int moe_load_safetensors(void *m, const char *const *f, size_t n) {\n"
	    "\treturn ((int (*)(void *, const char *const *, size_t))"
	    "sym(\"moe_load_safetensors\"))(m, f, n); }\n"
	    "int moe_init_random(void *m, uint64_t s) {\n"
	    "\treturn ((int (*)(void *, uint64_t))sym(\"moe_init_random\"))(m, s); }\n"
	    "size_t moe_describe(char *b, size_t c) {\n"
	    "\treturn ((size_t (*)(char *, size_t))sym(\"moe_describe\"))(b, c); }\n"
	    "const char *moe_last_error(void) {\n"
	    "\treturn ((const char *(*)(void))sym(\"moe_last_error\"))(); }\n"
	    "int moe_forward(void *m, uint32_t l, const void *x, void *y, size_t n, void *r,\n"
	    "\t\tconst void *o) {\n"
	    "\tint st = ((int (*)(void *, uint32_t, const void *, void *, size_t, void *,\n"
	    "\t\tconst void *))sym(\"moe_forward\"))(m, l, x, y, n, r, o);\n"
	    "\tif (st == 0 && n) ((float *)y)[0] += 1.0f;\n"
	    "\treturn st;\n}\n",
	    tdir);
	fclose(f);
	snprintf(cmd, sizeof cmd, "cc -shared -fPIC -o %s/wrapped.so %s -ldl", tdir, src);
	assert_int_equal(system(cmd), 0);
	assert_int_equal(run(buf, sizeof buf, "run %s/wrapped.so --check --tokens 4", tdir), 5);
	rm_tdir();
}

/* 70: a broken invariant (moe_die, through MOE_ASSERT) exits with 70 and
 * removes the temporaries it tracks. */
static void test_exit_internal(void **state)
{
	(void)state;
	assert_int_equal(make_tdir(), 0);
	char tmp[512];
	snprintf(tmp, sizeof tmp, "%s/partial", tdir);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		FILE *f = fopen(tmp, "w");
		if (f)
			fclose(f);
		moe_temp_track(tmp);
		int broken = 0;
		MOE_ASSERT(broken);
		_exit(0);
	}
	int st;
	assert_int_equal(waitpid(pid, &st, 0), pid);
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 70);
	assert_int_not_equal(access(tmp, F_OK), 0);
	rm_tdir();
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_usage),         cmocka_unit_test(test_check),
	    cmocka_unit_test(test_dump),          cmocka_unit_test(test_info),
	    cmocka_unit_test(test_ref),           cmocka_unit_test(test_exit_spec),
	    cmocka_unit_test(test_exit_usage),    cmocka_unit_test(test_exit_file),
	    cmocka_unit_test(test_exit_backend),  cmocka_unit_test(test_exit_check),
	    cmocka_unit_test(test_exit_internal), cmocka_unit_test(test_duplicate_keys),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
