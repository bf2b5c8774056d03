/* test_cli.c: the moegen command as a user runs it: exit codes, usage,
 * overrides and the outputs of check, info, -d and ref. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <cmocka.h>

/* Run `moegen ARGS` through the shell, capture stdout+stderr, return the
 * exit code. */
static int run(char *out, size_t cap, const char *fmt, ...)
{
	const char *bin = getenv("MOEGEN");
	char args[2048], cmd[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(args, sizeof args, fmt, ap);
	va_end(ap);
	snprintf(cmd, sizeof cmd, "%s %s 2>&1", bin ? bin : "build/moegen", args);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	size_t n = fread(out, 1, cap - 1, p);
	out[n] = 0;
	int st = pclose(p);
	assert_true(WIFEXITED(st));
	return WEXITSTATUS(st);
}

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

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_usage), cmocka_unit_test(test_check), cmocka_unit_test(test_dump),
	    cmocka_unit_test(test_info),  cmocka_unit_test(test_ref),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
