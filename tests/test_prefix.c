/* test_prefix.c: two models in one program. model.so files built with
 * different --prefix values and their headers link into one executable,
 * each model answering for itself; model.so carries its SONAME and the
 * ABI's version node. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "moe.h"

/* A model.so of a sanitizer build carries the sanitizer runtime: so must the
 * program that links it. */
#if defined(__SANITIZE_ADDRESS__)
#define CONSUMER_SAN " -fsanitize=address,undefined"
#else
#define CONSUMER_SAN ""
#endif

static char dir[] = "/tmp/moegen-prefix-XXXXXX";

static int sh(char *out, size_t cap, const char *fmt, ...)
{
	char cmd[8192];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof cmd, fmt, ap);
	va_end(ap);
	char full[8400];
	snprintf(full, sizeof full, "timeout 300 sh -c '%s' 2>&1", cmd);
	FILE *p = popen(full, "r");
	assert_non_null(p);
	size_t n = out ? fread(out, 1, cap - 1, p) : 0;
	if (out)
		out[n] = 0;
	else
		while (fgetc(p) != EOF)
			;
	int st = pclose(p);
	assert_true(WIFEXITED(st));
	return WEXITSTATUS(st);
}

static const char *moegen(void)
{
	const char *b = getenv("MOEGEN");
	return b ? b : "build/moegen";
}

static char out[1 << 16];

static const char consumer[] =
    "#include \"a.h\"\n"
    "#include \"b.h\"\n"
    "#include <stdio.h>\n"
    "#include <string.h>\n"
    "static int one(const struct moe_info *i, moe_model *m, unsigned hidden,\n"
    "               enum moe_status (*fwd)(moe_model *, uint32_t, const void *, void *,\n"
    "                                      size_t, struct moe_routing *,\n"
    "                                      const struct moe_fwd_opts *)) {\n"
    "  float x[4 * 128], y[4 * 128];\n"
    "  if (i->hidden != hidden) return 1;\n"
    "  for (unsigned j = 0; j < 4 * hidden; j++) x[j] = (float)(j % 7) * 0.25f - 0.5f;\n"
    "  if (fwd(m, 0, x, y, 4, NULL, NULL) != MOE_OK) return 2;\n"
    "  double s = 0; for (unsigned j = 0; j < 4 * hidden; j++) s += y[j] * y[j];\n"
    "  printf(\"%s hidden %u sumsq %.6g\\n\", i->name, i->hidden, s);\n"
    "  return s > 0 ? 0 : 3;\n"
    "}\n"
    "int main(void) {\n"
    "  moe_model *a, *b;\n"
    "  struct moe_create_opts o = {.threads = 1};\n"
    "  if (pa_moe_create(&a, &o) || pb_moe_create(&b, &o)) return 10;\n"
    "  if (pa_moe_init_random(a, 1) || pb_moe_init_random(b, 1)) return 11;\n"
    "  int r = one(pa_moe_info(), a, PA_MOE_MODEL_HIDDEN, pa_moe_forward);\n"
    "  r = r ? r : one(pb_moe_info(), b, PB_MOE_MODEL_HIDDEN, pb_moe_forward);\n"
    "  pa_moe_destroy(a); pb_moe_destroy(b);\n"
    "  return r;\n"
    "}\n";

static void test_two_models(void **state)
{
	(void)state;
	assert_non_null(mkdtemp(dir));
	const char *m = moegen();
	/* one spec, two sizes: the models differ in hidden */
	assert_int_equal(sh(out, sizeof out,
			    "%s specs/mixtral-mini.yaml --prefix pa_ -o %s/libpa.so && "
			    "%s specs/mixtral-mini.yaml --prefix pa_ --emit header -o %s/a.h && "
			    "%s specs/mixtral-mini.yaml --set model.hidden=96 --prefix pb_ -o "
			    "%s/libpb.so && "
			    "%s specs/mixtral-mini.yaml --set model.hidden=96 --prefix pb_ --emit "
			    "header -o %s/b.h",
			    m, dir, m, dir, m, dir, m, dir),
			 0);
	char c[512];
	snprintf(c, sizeof c, "%s/consumer.c", dir);
	FILE *f = fopen(c, "w");
	assert_non_null(f);
	fputs(consumer, f);
	fclose(f);
	int rc = sh(out, sizeof out,
		    "cd %s && cc -std=c11 -Wall -Wextra -Werror" CONSUMER_SAN
		    " -o consumer consumer.c -L. -lpa -lpb -Wl,-rpath,%s && ./consumer",
		    dir, dir);
	if (rc != 0)
		fail_msg("consumer: %s", out);
	assert_non_null(strstr(out, "hidden 64 "));
	assert_non_null(strstr(out, "hidden 96 "));

	/* SONAME, the version node, and nothing but the ABI exported */
	assert_int_equal(sh(out, sizeof out, "readelf -d %s/libpa.so", dir), 0);
	assert_non_null(strstr(out, "Library soname: [libpa.so]"));
	assert_int_equal(sh(out, sizeof out, "nm -D --defined-only %s/libpa.so", dir), 0);
	char want[64];
	snprintf(want, sizeof want, "pa_moe_forward@@MOEGEN_ABI_%d", MOE_ABI_VERSION);
	assert_non_null(strstr(out, want));
	assert_null(strstr(out, " T moe_forward"));
	int n_text = 0;
	for (const char *p = out; (p = strstr(p, " T ")); p += 3)
		n_text++;
	assert_int_equal(n_text, 14); /* the functions of moe.h */
}

static void test_bad_prefix(void **state)
{
	(void)state;
	assert_int_equal(
	    sh(out, sizeof out, "%s specs/mixtral-mini.yaml --prefix 9x -o %s/x.so", moegen(), dir),
	    2);
	assert_non_null(strstr(out, "not a C identifier"));
	assert_int_equal(sh(out, sizeof out,
			    "%s specs/mixtral-mini.yaml --prefix \"a-b\" -o %s/x.so", moegen(),
			    dir),
			 2);
	assert_int_equal(access("x.so", F_OK), -1);
}

static int cleanup(void **state)
{
	(void)state;
	char cmd[256];
	snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
	return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_two_models),
	    cmocka_unit_test(test_bad_prefix),
	};
	return cmocka_run_group_tests(tests, NULL, cleanup);
}
