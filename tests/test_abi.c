/* test_abi.c: the public ABI stands alone. A program that sees only a copy of
 * runtime/moe.h (no other include path) compiles, links against a model.so
 * and reads moe_info() and the description text; the header that
 * `--emit header` writes does the same without moe.h. The description text
 * reads back (moe_desc_parse) to the same text and spec hash for every spec. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "harness.h"
#include "moegen.h"

/* A model.so of a sanitizer build carries the sanitizer runtime: so must the
 * probe that links it. */
#if defined(__SANITIZE_ADDRESS__)
#define PROBE_SAN " -fsanitize=address,undefined"
#else
#define PROBE_SAN ""
#endif

static int setup(void **state)
{
	(void)state;
	return h_setup("moe_test_abi");
}

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	assert_int_equal(fputs(text, f) >= 0, 1);
	assert_int_equal(fclose(f), 0);
}

/* Run a shell command; its output (stdout and stderr) into out. */
static int sh(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int sh(char *out, size_t cap, const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof cmd, fmt, ap);
	va_end(ap);
	strncat(cmd, " 2>&1", sizeof cmd - strlen(cmd) - 1);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	size_t n = fread(out, 1, cap - 1, p);
	out[n] = 0;
	int st = pclose(p);
	if (st != 0)
		fprintf(stderr, "%s\n%s", cmd, out);
	return st;
}

/* The probe: every field of moe_info, the description (sized with cap 0,
 * then truncated to 8 bytes) and one forward call, printed. */
static const char probe_src[] =
    "#include <stdio.h>\n"
    "#include <stdlib.h>\n"
    "#include HEADER\n"
    "int main(void)\n"
    "{\n"
    "\tconst struct moe_info *in = moe_info();\n"
    "\tprintf(\"size %u abi %u/%d\\n\", in->size, in->abi_version, MOE_ABI_VERSION);\n"
    "\tprintf(\"name %s hash %s\\n\", in->name, in->spec_hash);\n"
    "\tprintf(\"dims %u %u %u %u %u %u %u\\n\", in->hidden, in->intermediate, in->n_experts,\n"
    "\t       in->top_k, in->route_width, in->n_shared_experts, in->shared_intermediate);\n"
    "\tprintf(\"layers %u:\", in->n_layers);\n"
    "\tfor (uint32_t i = 0; i < in->n_moe_layers; i++)\n"
    "\t\tprintf(\" %u\", in->moe_layers[i]);\n"
    "\tprintf(\"\\ndtypes %d %d targets %u cpu %s\\n\", (int)in->weight_dtype,\n"
    "\t       (int)in->act_dtype, in->targets, in->cpu[0] ? \"yes\" : \"no\");\n"
    "\tchar small[8];\n"
    "\tsize_t n = moe_describe(NULL, 0);\n"
    "\tprintf(\"truncated %d '%s'\\n\", moe_describe(small, sizeof small) == n, small);\n"
    "\tchar *text = malloc(n + 1);\n"
    "\tif (!text || moe_describe(text, n + 1) != n)\n"
    "\t\treturn 1;\n"
    "\tmoe_model *m;\n"
    "\tstruct moe_create_opts co = {1, MOE_DEVICE_CPU, NULL, 0, 0, 0, 0};\n"
    "\tfloat x[3 * 16] = {0.5f}, y[3 * 16];\n"
    "\tint32_t ids[3 * 2];\n"
    "\tstruct moe_routing r = {ids, NULL, NULL, NULL, 0, 0, 0, 0};\n"
    "\tenum moe_status st = moe_create(&m, &co);\n"
    "\tif (st == MOE_OK)\n"
    "\t\tst = moe_init_random(m, 1);\n"
    "\tif (st == MOE_OK)\n"
    "\t\tst = moe_forward(m, in->moe_layers[0], x, y, 3, &r, NULL);\n"
    "\tprintf(\"forward %d %s\\n\", (int)st, moe_last_error());\n"
    "\tmoe_destroy(m);\n"
    "\tfputs(text, stdout);\n"
    "\tfree(text);\n"
    "\treturn 0;\n"
    "}\n";

/* What the probe must print for d. */
static void expected(const struct moe_desc *d, char *buf, size_t cap)
{
	char hash[33];
	moe_desc_hash(d, hash);
	int n =
	    snprintf(buf, cap,
		     "size %zu abi %d/%d\nname %s hash %s\ndims %u %u %u %u %u %u %u\n"
		     "layers %u:",
		     sizeof(struct moe_info), MOE_ABI_VERSION, MOE_ABI_VERSION, d->name, hash,
		     d->hidden, d->intermediate, d->n_experts, d->top_k, moe_desc_route_width(d),
		     d->shared_count, d->shared_intermediate, d->n_layers);
	for (uint32_t i = 0; i < d->n_moe_layers; i++)
		n += snprintf(buf + n, cap - (size_t)n, " %u", d->moe_layers[i]);
	char text[8192];
	moe_desc_dump(d, text, sizeof text);
	snprintf(buf + n, cap - (size_t)n,
		 "\ndtypes %d %d targets 1 cpu yes\ntruncated 1 '%.7s'\nforward 0 \n%s",
		 (int)d->weight_dtype, (int)d->act_dtype, text, text);
}

static void abi_desc(struct moe_desc *d)
{
	h_base_desc(d, 16, 4, 2, 8);
	snprintf(d->name, sizeof d->name, "abi-probe");
	d->n_layers = 3;
	d->moe_layers[0] = 1;
	d->moe_layers[1] = 2;
	d->weight_dtype = MOE_DTYPE_BF16;
	d->shared_count = 1;
	d->shared_intermediate = 12;
	d->scale = 2.5f;
}

/* A copy of moe.h alone in its own directory: the only include path. */
static void test_moe_h_alone(void **state)
{
	(void)state;
	struct moe_desc d;
	abi_desc(&d);
	struct h_model m;
	char err[2048], dir[128], out[16384], want[16384];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	snprintf(dir, sizeof dir, "%s/inc", h_tmpdir);
	assert_int_equal(mkdir(dir, 0700), 0);
	const char *src = getenv("MOE_SOURCE_DIR") ? getenv("MOE_SOURCE_DIR") : MOE_SOURCE_DIR;
	assert_int_equal(sh(out, sizeof out, "cp '%s/runtime/moe.h' '%s/moe.h'", src, dir), 0);
	/* C++ sees the same declarations (extern "C") */
	assert_int_equal(sh(out, sizeof out,
			    "echo '#include \"moe.h\"' | c++ -std=c++11 -Wall -Wextra -Werror "
			    "-fsyntax-only -x c++ -I'%s' -",
			    dir),
			 0);
	char probe[192];
	snprintf(probe, sizeof probe, "%s/probe.c", h_tmpdir);
	write_file(probe, probe_src);
	assert_int_equal(
	    sh(out, sizeof out,
	       "cc -std=c11 -pedantic -Wall -Wextra -Werror%s -DHEADER='\"moe.h\"' -I'%s' "
	       "'%s' '%s' -Wl,-rpath,'%s' -o '%s/probe' && '%s/probe'",
	       PROBE_SAN, dir, probe, m.path, h_tmpdir, h_tmpdir, h_tmpdir),
	    0);
	expected(&d, want, sizeof want);
	assert_string_equal(out, want);
	h_model_close(&m);
}

/* The header `--emit header` writes carries the ABI itself: the probe builds
 * against it alone, and its constants agree with moe_info(). */
static void test_emitted_header_alone(void **state)
{
	(void)state;
	struct moe_desc d;
	abi_desc(&d);
	struct h_model m;
	char err[2048], dir[128], path[192], out[16384], want[16384];
	assert_int_equal(h_model_open(&d, &m, err, sizeof err), 0);
	snprintf(dir, sizeof dir, "%s/hdr", h_tmpdir);
	assert_int_equal(mkdir(dir, 0700), 0);
	snprintf(path, sizeof path, "%s/abi_probe.h", dir);
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	assert_int_equal(moe_write_header(&d, NULL, f), 0);
	assert_int_equal(fclose(f), 0);
	char probe[192];
	snprintf(probe, sizeof probe, "%s/probe2.c", h_tmpdir);
	char src[sizeof probe_src + 1024];
	snprintf(src, sizeof src, "%s",
		 "#include \"abi_probe.h\"\n"
		 "_Static_assert(MOE_MODEL_HIDDEN == 16 && MOE_MODEL_EXPERTS == 4, \"dims\");\n"
		 "_Static_assert(MOE_MODEL_WEIGHT_DTYPE == MOE_DTYPE_BF16, \"dtype\");\n"
		 "_Static_assert(MOE_MODEL_SHARED_EXPERTS == 1, \"shared\");\n");
	strcat(src, probe_src);
	write_file(probe, src);
	assert_int_equal(
	    sh(out, sizeof out,
	       "cc -std=c11 -pedantic -Wall -Wextra -Werror%s -DHEADER='\"abi_probe.h\"' "
	       "-I'%s' '%s' '%s' -Wl,-rpath,'%s' -o '%s/probe2' && '%s/probe2'",
	       PROBE_SAN, dir, probe, m.path, h_tmpdir, h_tmpdir, h_tmpdir),
	    0);
	expected(&d, want, sizeof want);
	assert_string_equal(out, want);
	/* the hash the header carries is the library's */
	char hash[33];
	moe_desc_hash(&d, hash);
	assert_string_equal(m.info()->spec_hash, hash);
	h_model_close(&m);
}

static void capture(void *ctx, const char *line)
{
	fprintf(stderr, "%s: %s\n", (const char *)ctx, line);
}

/* dump -> parse -> dump is the identity, and so the hash is kept, for every
 * spec under specs/ (every router mode, layout and quantization there). */
static void test_description_reads_back(void **state)
{
	(void)state;
	glob_t g;
	assert_int_equal(glob("specs/*.yaml", 0, NULL, &g), 0);
	assert_true(g.gl_pathc >= 10);
	struct moe_desc *d = calloc(1, sizeof *d), *back = calloc(1, sizeof *back);
	char *a = malloc(65536), *b = malloc(65536), err[256];
	assert_true(d && back && a && b);
	for (size_t i = 0; i < g.gl_pathc; i++) {
		struct moe_diag diag = {.sink = capture, .ctx = g.gl_pathv[i]};
		assert_int_equal(moe_front(g.gl_pathv[i], NULL, 0, d, &diag), MOE_EXIT_OK);
		size_t n = moe_desc_dump(d, a, 65536);
		assert_true(n < 65536);
		if (moe_desc_parse(a, back, err, sizeof err) != 0)
			fail_msg("%s: %s", g.gl_pathv[i], err);
		assert_int_equal(moe_desc_dump(back, b, 65536), n);
		assert_string_equal(a, b);
		/* what the runtime and the kernels read is the same */
		assert_int_equal(back->mode, d->mode);
		assert_int_equal(back->n_experts, d->n_experts);
		assert_memory_equal(back->moe_layers, d->moe_layers, sizeof d->moe_layers);
		assert_memory_equal(back->names, d->names, sizeof d->names);
		assert_memory_equal(back->scale_names, d->scale_names, sizeof d->scale_names);
		char h1[33], h2[33];
		moe_desc_hash(d, h1);
		moe_desc_hash(back, h2);
		assert_string_equal(h1, h2);
		assert_int_equal(strlen(h1), 32);
		assert_int_equal(strspn(h1, "0123456789abcdef"), 32);
	}
	globfree(&g);
	free(d), free(back), free(a), free(b);
}

/* A float the dump prints is the float it holds; a text with an unknown key
 * or line is refused with its line number, not skipped. */
static void test_parse_exact_and_strict(void **state)
{
	(void)state;
	struct moe_desc d, back;
	char text[8192], err[256];
	h_base_desc(&d, 16, 4, 2, 8);
	d.scale = 0.1f + 1e-7f; /* more digits than %g prints */
	d.norm_eps = 1.0f / 3.0f;
	moe_desc_dump(&d, text, sizeof text);
	assert_int_equal(moe_desc_parse(text, &back, err, sizeof err), 0);
	assert_true(back.scale == d.scale && back.norm_eps == d.norm_eps);
	d.scale = 1.25f;
	moe_desc_dump(&d, text, sizeof text);
	assert_non_null(strstr(text, " scale 1.25\n")); /* and no more than needed */

	assert_int_equal(moe_desc_parse("name x\nhidden 8 width 3\n", &back, err, sizeof err), -1);
	assert_non_null(strstr(err, "line 2"));
	assert_non_null(strstr(err, "width"));
	assert_int_equal(
	    moe_desc_parse("name x\nrouter nosuch score softmax top_k 2\n", &back, err, sizeof err),
	    -1);
	assert_non_null(strstr(err, "nosuch"));
	assert_int_equal(moe_desc_parse("name x\nlasers 3\n", &back, err, sizeof err), -1);
	assert_non_null(strstr(err, "unknown line 'lasers'"));
	assert_int_equal(moe_desc_parse("hidden 8\n", &back, err, sizeof err), -1);
	assert_non_null(strstr(err, "name"));

	/* every prefix of a rich description: whole lines read, cut lines are
	 * read or refused, never overrun (the sanitizer build checks) */
	struct moe_desc *full = calloc(1, sizeof *full);
	assert_non_null(full);
	struct moe_diag diag = {.sink = capture, .ctx = "specs/deepseek-v3.yaml"};
	assert_int_equal(moe_front("specs/deepseek-v3.yaml", NULL, 0, full, &diag), MOE_EXIT_OK);
	size_t n = moe_desc_dump(full, text, sizeof text);
	assert_true(n < sizeof text);
	for (size_t cut = 1; cut <= n; cut++) {
		char c = text[cut];
		text[cut] = 0;
		int rc = moe_desc_parse(text, &back, err, sizeof err);
		if (text[cut - 1] == '\n')
			assert_int_equal(rc, 0);
		else
			assert_true(rc == 0 || rc == -1);
		text[cut] = c;
	}
	free(full);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_moe_h_alone),
	    cmocka_unit_test(test_emitted_header_alone),
	    cmocka_unit_test(test_description_reads_back),
	    cmocka_unit_test(test_parse_exact_and_strict),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
