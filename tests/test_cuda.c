/* test_cuda.c: the CUDA backend without a GPU: what it refuses, the
 * generated CUDA C (deterministic, shapes as constants, generated/cuda/ not
 * stale), NVRTC compiling every spec for sm_80 and sm_90 (skipped where
 * NVRTC is absent), the images file, image selection, and the runtime's
 * "no device" status on a machine without a GPU. MOE_REGEN=1 rewrites
 * generated/cuda/ instead of comparing. */
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
#include <unistd.h>

#include "cuda.h"

struct spec {
	char path[1024];
	struct moe_desc *d;
	int plannable; /* the CUDA plan accepts it */
	char refusal[1024];
};

static struct spec *specs;
static size_t n_specs;

static void sink_first(void *ctx, const char *line)
{
	char *buf = ctx;
	if (!buf[0])
		snprintf(buf, 1024, "%s", line);
}

static void sink_quiet(void *ctx, const char *line)
{
	(void)ctx;
	(void)line;
}

static int load_specs(void **state)
{
	(void)state;
	glob_t gl;
	if (glob("specs/*.yaml", 0, NULL, &gl) != 0 || gl.gl_pathc == 0) {
		fprintf(stderr, "test_cuda: no specs/*.yaml (run from the repository root)\n");
		return -1;
	}
	specs = calloc(gl.gl_pathc, sizeof *specs);
	for (size_t i = 0; specs && i < gl.gl_pathc; i++) {
		struct spec *s = &specs[n_specs];
		snprintf(s->path, sizeof s->path, "%s", gl.gl_pathv[i]);
		s->d = calloc(1, sizeof *s->d);
		struct moe_diag dq = {.sink = sink_quiet};
		if (!s->d || moe_front(s->path, NULL, 0, s->d, &dq) != 0) {
			free(s->d);
			continue; /* test_specs_all reports specs that do not check */
		}
		struct moe_plan p;
		struct moe_diag dg = {.sink = sink_first, .ctx = s->refusal};
		s->plannable = moe_plan_build(s->d, MOE_TARGET_CUDA, &p, &dg) == 0;
		n_specs++;
	}
	globfree(&gl);
	return specs && n_specs ? 0 : -1;
}

static int free_specs(void **state)
{
	(void)state;
	for (size_t i = 0; i < n_specs; i++)
		free(specs[i].d);
	free(specs);
	return 0;
}

static char *emit(const struct moe_desc *d, size_t *len)
{
	struct moe_plan p;
	struct moe_diag dq = {.sink = sink_quiet};
	assert_int_equal(moe_plan_build(d, MOE_TARGET_CUDA, &p, &dq), 0);
	char *src = NULL, err[1024];
	assert_int_equal(moe_cuda_emit_source(&p, &src, len, err, sizeof err), 0);
	assert_non_null(src);
	assert_int_equal(strlen(src), *len);
	return src;
}

static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *buf = malloc((size_t)n + 1);
	if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
		free(buf);
		buf = NULL;
	}
	fclose(f);
	if (buf) {
		buf[n] = 0;
		*len = (size_t)n;
	}
	return buf;
}

static int contains(const char *hay, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int contains(const char *hay, const char *fmt, ...)
{
	char needle[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(needle, sizeof needle, fmt, ap);
	va_end(ap);
	return strstr(hay, needle) != NULL;
}

/* The modes the backend generates, with ordinary experts; everything else
 * is refused with a message naming it. */
static int cuda_mode(enum moe_mode m)
{
	return m == MOE_MODE_TOKEN_CHOICE || m == MOE_MODE_DENSE || m == MOE_MODE_TOP_P ||
	       m == MOE_MODE_SPARSEMIXER || m == MOE_MODE_HIERARCHICAL ||
	       m == MOE_MODE_EXPERT_CHOICE;
}

static void test_refusals(void **state)
{
	(void)state;
	int refused = 0, accepted = 0;
	for (size_t i = 0; i < n_specs; i++) {
		const struct moe_desc *d = specs[i].d;
		int want = cuda_mode(d->mode) && d->kind != MOE_KIND_SINGLE_NEURON;
		if (want != specs[i].plannable)
			fail_msg("%s: plannable %d, expected %d (%s)", specs[i].path,
				 specs[i].plannable, want, specs[i].refusal);
		if (!want) {
			refused++;
			assert_non_null(strstr(specs[i].refusal, "not generated for target cuda"));
			if (!cuda_mode(d->mode))
				assert_true(contains(specs[i].refusal, "router.mode %s",
						     moe_mode_names[d->mode]));
		} else {
			accepted++;
		}
	}
	/* specs/ holds both kinds (exotic routers and real token-choice models) */
	assert_true(refused > 0);
	assert_true(accepted > 0);
}

/* A spec with several unsupported features reports each of them. */
static void test_refusal_reports_all(void **state)
{
	(void)state;
	struct moe_desc d;
	memset(&d, 0, sizeof d);
	d.mode = MOE_MODE_SOFT;
	d.kind = MOE_KIND_SINGLE_NEURON;
	d.act_dtype = MOE_DTYPE_F16;
	d.hidden = d.n_experts = d.intermediate = d.top_k = 4;
	struct moe_diag dg = {.sink = sink_quiet};
	assert_int_equal(moe_mode_supported(&d, MOE_TARGET_CUDA, &dg), 0);
	assert_int_equal(dg.n_errors, 3);
	/* a good description passes */
	d.mode = MOE_MODE_TOKEN_CHOICE;
	d.kind = MOE_KIND_GLU;
	d.act_dtype = MOE_DTYPE_F32;
	struct moe_diag ok = {.sink = sink_quiet};
	assert_int_equal(moe_mode_supported(&d, MOE_TARGET_CUDA, &ok), 1);
	assert_int_equal(ok.n_errors, 0);
	/* the sparse importance: both targets (the statistics are the host's) */
	d.importance_sparse = 1;
	struct moe_diag sp = {.sink = sink_quiet}, cpu = {.sink = sink_quiet};
	assert_int_equal(moe_mode_supported(&d, MOE_TARGET_CUDA, &sp), 1);
	assert_int_equal(sp.n_errors, 0);
	assert_int_equal(moe_mode_supported(&d, MOE_TARGET_CPU, &cpu), 1);
	assert_int_equal(cpu.n_errors, 0);
}

/* Shapes, k and the formulas are constants of the source, taken from the
 * description; the same description always gives the same bytes. */
static void test_source_constants(void **state)
{
	(void)state;
	int seen = 0;
	for (size_t i = 0; i < n_specs; i++) {
		if (!specs[i].plannable)
			continue;
		const struct moe_desc *d = specs[i].d;
		size_t n1, n2;
		char *a = emit(d, &n1), *b = emit(d, &n2);
		assert_int_equal(n1, n2);
		assert_memory_equal(a, b, n1);
		assert_true(contains(a, "the MoE layer '%s'", d->name));
		assert_true(contains(a, "constexpr int kHidden = %u;", d->hidden));
		assert_true(contains(a, "constexpr int kExperts = %u;", d->n_experts));
		assert_true(contains(a, "constexpr int kRoute = %u;", moe_desc_route_width(d)));
		assert_true(contains(a, "constexpr int kChunks = %u;", (d->hidden + 31) / 32));
		uint32_t ld_h = (d->intermediate + 63) / 64 * 64;
		assert_true(contains(a, "static constexpr int ld_h = %u;", ld_h));
		assert_true(contains(a, "static constexpr int up_rows = %u;",
				     d->kind == MOE_KIND_GLU ? 2 * ld_h : ld_h));
		int groups = d->mode == MOE_MODE_TOKEN_CHOICE && d->n_groups > 1;
		assert_true(contains(a, "constexpr int kGroups = %u;", groups ? d->n_groups : 1));
		/* the formulas and features the fixed code specializes on */
		assert_true(contains(a, "constexpr score_fn kScore = score_fn::%s;",
				     moe_score_names[d->score]));
		assert_true(
		    contains(a, "constexpr norm_fn kNorm = norm_fn::%s;", moe_norm_names[d->norm]));
		assert_true(contains(a, "constexpr dtype kWeightDtype = dtype::%s;",
				     moe_dtype_names[d->weight_dtype]));
		assert_true(contains(a, "constexpr dtype kActDtype = dtype::%s;",
				     moe_dtype_names[d->act_dtype]));
		assert_true(contains(a, "static constexpr act_fn act = act_fn::%s;",
				     moe_act_names[d->act]));
		assert_true(contains(a, "constexpr bool kDense = %s;",
				     d->mode == MOE_MODE_DENSE ? "true" : "false"));
		/* one kernel per op, the names the runtime looks up */
		static const char *const always[] = {
		    "moe_route_small",   "moe_route_logits",  "moe_route_select", "moe_group_mask",
		    "moe_group_offsets", "moe_group_scatter", "moe_up",           "moe_down",
		    "moe_combine",       "moe_pack"};
		for (size_t k = 0; k < sizeof always / sizeof *always; k++)
			assert_true(contains(a, " %s(const moe_", always[k]));
		int shared = d->shared_count && d->shared_intermediate;
		assert_int_equal(contains(a, " moe_shared_up(const moe_args"), shared);
		int cap = d->capacity != MOE_CAPACITY_NONE;
		assert_int_equal(contains(a, " moe_capacity(const moe_args"), cap);
		/* tensor cores exactly when the weights are 16-bit */
		assert_int_equal(contains(a, "mma.sync.aligned.m16n8k16"),
				 d->weight_dtype != MOE_DTYPE_F32);
		assert_true(contains(a, "constexpr bool kRouterBias = %s;",
				     d->router_bias ? "true" : "false"));
		assert_true(contains(a, "constexpr bool kSelectBias = %s;",
				     d->select_bias ? "true" : "false"));
		assert_true(contains(a, "constexpr bool kCapacity = %s;", cap ? "true" : "false"));
		assert_true(contains(a, "constexpr bool kShared = %s;", shared ? "true" : "false"));
		free(a), free(b);
		seen++;
	}
	assert_true(seen > 0);
}

/* --set reaches the generated constants (the GPU harness shrinks specs). */
static void test_source_follows_overrides(void **state)
{
	(void)state;
	const char *sets[] = {"model.hidden=96", "experts.intermediate=40", "router.top_k=3"};
	struct moe_desc *d = calloc(1, sizeof *d);
	assert_non_null(d);
	struct moe_diag dq = {.sink = sink_quiet};
	assert_int_equal(moe_front("specs/mixtral-8x7b.yaml", sets, 3, d, &dq), 0);
	size_t n;
	char *a = emit(d, &n);
	assert_true(contains(a, "constexpr int kHidden = 96;"));
	assert_true(contains(a, "constexpr int kRoute = 3;"));
	assert_true(contains(a, "static constexpr int width = 40;"));
	assert_true(contains(a, "static constexpr int ld_h = 64;"));
	assert_true(contains(a, "static constexpr int up_k = 96;"));
	assert_true(contains(a, "static constexpr int down_rows = 128;"));
	free(a);
	free(d);
}

/* The file's text without its `#pragma once` line, as the generator inlines
 * it (malloc'ed). */
static char *inlined_text(const char *text)
{
	static const char once[] = "#pragma once\n";
	const char *p = strstr(text, once);
	size_t n = strlen(text);
	char *r = malloc(n + 1);
	assert_non_null(r);
	if (!p) {
		memcpy(r, text, n + 1);
		return r;
	}
	size_t head = (size_t)(p - text);
	memcpy(r, text, head);
	memcpy(r + head, p + sizeof once - 1, n - head - (sizeof once - 1) + 1);
	return r;
}

/* The fixed device code is the .cuh files of compiler/cuda/kernels, each
 * embedded as it is on disk, and the generated source inlines exactly the
 * ones it needs: the tensor-core tiles for 16-bit weights, the CUDA-core
 * tiles for f32. */
static void test_kernel_files(void **state)
{
	(void)state;
	glob_t gl;
	assert_int_equal(glob("compiler/cuda/kernels/*.cuh", 0, NULL, &gl), 0);
	size_t n_files = 0;
	for (const struct moe_cuda_kernel_file *k = moe_cuda_kernel_files; k->name; k++)
		n_files++;
	assert_int_equal(n_files, gl.gl_pathc);
	for (size_t i = 0; i < gl.gl_pathc; i++) {
		const char *base = strrchr(gl.gl_pathv[i], '/') + 1;
		const struct moe_cuda_kernel_file *k = moe_cuda_kernel_files;
		while (k->name && strcmp(k->name, base))
			k++;
		if (!k->name)
			fail_msg("%s is not embedded", gl.gl_pathv[i]);
		size_t n;
		char *disk = read_file(gl.gl_pathv[i], &n);
		assert_non_null(disk);
		if (strcmp(disk, k->text))
			fail_msg("%s: the embedded copy is stale (rebuild)", gl.gl_pathv[i]);
		free(disk);
	}
	globfree(&gl);
	int seen[2] = {0, 0};
	for (size_t i = 0; i < n_specs; i++) {
		if (!specs[i].plannable)
			continue;
		int mma = specs[i].d->weight_dtype != MOE_DTYPE_F32;
		size_t n;
		char *src = emit(specs[i].d, &n);
		for (const struct moe_cuda_kernel_file *k = moe_cuda_kernel_files; k->name; k++) {
			char *body = inlined_text(k->text);
			int want =
			    strcmp(k->name, mma ? "moe_gemm_simt.cuh" : "moe_gemm_mma.cuh") != 0;
			if ((strstr(src, body) != NULL) != want)
				fail_msg("%s: %s is %sinlined", specs[i].path, k->name,
					 want ? "not " : "");
			free(body);
		}
		free(src);
		seen[mma] = 1;
	}
	/* specs/ has both weight kinds */
	assert_true(seen[0] && seen[1]);
}

static int regen(void)
{
	const char *r = getenv("MOE_REGEN");
	return r && *r && strcmp(r, "0") != 0;
}

/* generated/cuda/NAME.cu is what `moegen SPEC --target cuda --emit cu` writes
 * today, for every spec the backend generates, and nothing else is there. */
static void test_generated_not_stale(void **state)
{
	(void)state;
	int stale = 0;
	if (regen())
		mkdir("generated/cuda", 0755);
	for (size_t i = 0; i < n_specs; i++) {
		if (!specs[i].plannable)
			continue;
		char path[1200];
		snprintf(path, sizeof path, "generated/cuda/%s.cu", specs[i].d->name);
		size_t n, m = 0;
		char *want = emit(specs[i].d, &n);
		if (regen()) {
			FILE *f = fopen(path, "wb");
			assert_non_null(f);
			assert_int_equal(fwrite(want, 1, n, f), n);
			assert_int_equal(fclose(f), 0);
			free(want);
			continue;
		}
		char *have = read_file(path, &m);
		if (!have || m != n || memcmp(have, want, n) != 0) {
			fprintf(stderr,
				"stale: %s differs from the generator's output for %s "
				"(MOE_REGEN=1 ./test_cuda rewrites it)\n",
				path, specs[i].path);
			stale++;
		}
		free(have);
		free(want);
	}
	/* every committed file belongs to a spec the backend generates */
	glob_t gl;
	if (glob("generated/cuda/*.cu", 0, NULL, &gl) == 0) {
		for (size_t j = 0; j < gl.gl_pathc; j++) {
			int owned = 0;
			for (size_t i = 0; i < n_specs && !owned; i++) {
				char path[1200];
				snprintf(path, sizeof path, "generated/cuda/%s.cu",
					 specs[i].d->name);
				owned = specs[i].plannable && !strcmp(path, gl.gl_pathv[j]);
			}
			if (!owned) {
				fprintf(stderr, "stale: %s has no spec in specs/\n",
					gl.gl_pathv[j]);
				stale++;
			}
		}
		globfree(&gl);
	} else if (!regen()) {
		fprintf(stderr, "stale: generated/cuda/ is empty\n");
		stale++;
	}
	assert_int_equal(stale, 0);
}

static void test_parse_archs(void **state)
{
	(void)state;
	char st[256], err[256];
	const char *a[MOE_CUDA_MAX_ARCHS];
	assert_int_equal(
	    moe_cuda_parse_archs(NULL, st, sizeof st, a, MOE_CUDA_MAX_ARCHS, err, sizeof err), 2);
	assert_string_equal(a[0], "sm_80");
	assert_string_equal(a[1], "sm_90");
	assert_int_equal(
	    moe_cuda_parse_archs("sm_90a", st, sizeof st, a, MOE_CUDA_MAX_ARCHS, err, sizeof err),
	    1);
	static const char *const bad[] = {"",      "sm80",   "sm_",         "compute_80",
					  "sm_8x", "sm_80,", "sm_80,sm_80", "sm_a"};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		err[0] = 0;
		assert_int_equal(moe_cuda_parse_archs(bad[i], st, sizeof st, a, MOE_CUDA_MAX_ARCHS,
						      err, sizeof err),
				 -1);
		assert_true(strlen(err) > 0);
	}
}

/* Images: cubin of the same major and the highest minor not above the
 * device's; else PTX; else none. */
static void test_pick_image(void **state)
{
	(void)state;
	static const unsigned char z[1];
	const struct moe_cuda_image im[] = {{"sm_80", z, 1},
					    {"compute_80", z, 1},
					    {"sm_90", z, 1},
					    {"sm_90a", z, 1},
					    {"sm_86", z, 1}};
	struct moe_cuda_gen g = {MOE_CUDA_ABI, 0, NULL, "", "", 5, im};
	assert_ptr_equal(moe_cuda_pick_image(&g, 8, 0), &im[0]);
	assert_ptr_equal(moe_cuda_pick_image(&g, 8, 6), &im[4]);
	assert_ptr_equal(moe_cuda_pick_image(&g, 8, 9), &im[4]);
	assert_ptr_equal(moe_cuda_pick_image(&g, 9, 0), &im[2]);
	assert_ptr_equal(moe_cuda_pick_image(&g, 10, 0), &im[1]); /* JIT from PTX */
	assert_null(moe_cuda_pick_image(&g, 7, 5));
	g.n_images = 1;
	assert_null(moe_cuda_pick_image(&g, 9, 0)); /* no PTX to fall back on */
}

/* On this machine (no GPU), creating a CUDA model fails cleanly with "no
 * CUDA device" and MOE_ERR_DEVICE; where a device exists this is skipped. */
static void test_no_device(void **state)
{
	(void)state;
	char err[1024] = "";
	enum moe_status st = moe_cuda_probe(err, sizeof err);
	if (st == MOE_OK) {
		fprintf(stderr, "test_no_device: skipped, a CUDA device is present\n");
		skip();
	}
	assert_int_equal(st, MOE_ERR_DEVICE);
	assert_int_equal(strncmp(err, "no CUDA device: ", 16), 0);
	const struct moe_desc *d = NULL;
	for (size_t i = 0; i < n_specs && !d; i++)
		if (specs[i].plannable)
			d = specs[i].d;
	assert_non_null(d);
	static const unsigned char z[1];
	const struct moe_cuda_image im[] = {{"sm_80", z, 1}};
	struct moe_cuda_gen g = {MOE_CUDA_ABI, sizeof *d, d, "", "x.cu", 1, im};
	struct moe_cuda *c = (struct moe_cuda *)&g; /* must be cleared */
	err[0] = 0;
	assert_int_equal(moe_cuda_create(&g, d, NULL, &c, err, sizeof err), MOE_ERR_DEVICE);
	assert_null(c);
	assert_int_equal(strncmp(err, "no CUDA device: ", 16), 0);
	/* a model.so without images says so, whatever the machine */
	err[0] = 0;
	assert_int_equal(moe_cuda_create(NULL, d, NULL, &c, err, sizeof err), MOE_ERR_DEVICE);
	assert_non_null(strstr(err, "--target cuda"));
	/* mismatched images are refused before the driver is touched */
	g.abi = MOE_CUDA_ABI + 1;
	assert_int_equal(moe_cuda_create(&g, d, NULL, &c, err, sizeof err), MOE_ERR_INTERNAL);
	moe_cuda_destroy(NULL);
}

static int have_nvrtc(void)
{
	char err[2600];
	if (moe_nvrtc_open(err, sizeof err) != 0) {
		fprintf(stderr, "skipped: %s\n", err);
		return 0;
	}
	return 1;
}

/* NVRTC compiles every spec the backend generates, at its real shapes, into
 * a cubin for sm_80 and sm_90 and PTX. */
static void test_nvrtc_all_specs(void **state)
{
	(void)state;
	if (!have_nvrtc())
		skip();
	static const char *const archs[] = {"sm_80", "sm_90"};
	int compiled = 0;
	for (size_t i = 0; i < n_specs; i++) {
		if (!specs[i].plannable)
			continue;
		size_t n;
		char *src = emit(specs[i].d, &n), name[300], err[16384];
		moe_cuda_source_name(specs[i].d, name, sizeof name);
		for (size_t a = 0; a < 2; a++) {
			if (!moe_nvrtc_supports(archs[a])) {
				fprintf(stderr, "NVRTC cannot target %s: not checked\n", archs[a]);
				continue;
			}
			struct moe_nvrtc_out o;
			if (moe_nvrtc_compile(src, name, archs[a], 1, 1, &o, err, sizeof err) != 0)
				fail_msg("%s", err);
			/* no warnings: the generated code stays clean */
			if (o.log[0])
				fail_msg("%s for %s: NVRTC warnings:\n%s", name, archs[a], o.log);
			/* an ELF cubin and PTX with every kernel for this arch */
			assert_true(o.cubin_size > 4);
			assert_memory_equal(o.cubin, "\177ELF", 4);
			assert_true(contains(o.ptx, ".target %s", archs[a]));
			assert_true(contains(o.ptx, ".entry moe_route_select"));
			assert_true(contains(o.ptx, ".entry moe_up"));
			assert_true(contains(o.ptx, ".entry moe_combine"));
			assert_int_equal(contains(o.ptx, "mma.sync.aligned.m16n8k16"),
					 specs[i].d->weight_dtype != MOE_DTYPE_F32);
			moe_nvrtc_out_free(&o);
			compiled++;
		}
		free(src);
	}
	assert_true(compiled > 0);
}

/* A compile error comes back with the source's name and NVRTC's log. */
static void test_nvrtc_error_log(void **state)
{
	(void)state;
	if (!have_nvrtc())
		skip();
	struct moe_nvrtc_out o;
	char err[8192] = "";
	const char *src = "extern \"C\" __global__ void k(float *x) { x[0] = undefined_name; }\n";
	assert_int_equal(
	    moe_nvrtc_compile(src, "broken-model.cu", "sm_80", 1, 1, &o, err, sizeof err), -1);
	assert_non_null(strstr(err, "broken-model.cu"));
	assert_non_null(strstr(err, "undefined_name"));
	assert_null(o.cubin);
	assert_int_equal(moe_nvrtc_compile(src, "x.cu", "sm_xx", 1, 0, &o, err, sizeof err), -1);
	assert_non_null(strstr(err, "sm_xx"));
}

/* The images file is plain C: compiled with the system compiler next to a
 * reader, it holds the description, a cubin per arch and the PTX. */
static void test_images_file(void **state)
{
	(void)state;
	if (!have_nvrtc())
		skip();
	const struct moe_desc *d = NULL;
	for (size_t i = 0; i < n_specs && !d; i++)
		if (specs[i].plannable && specs[i].d->hidden <= 512)
			d = specs[i].d;
	assert_non_null(d);
	char dir[] = "/tmp/moegen-cuda-test.XXXXXX";
	assert_non_null(mkdtemp(dir));
	char img[512], rd[512], exe[512], cmd[4096], err[16384];
	snprintf(img, sizeof img, "%s/images.c", dir);
	snprintf(rd, sizeof rd, "%s/reader.c", dir);
	snprintf(exe, sizeof exe, "%s/reader", dir);
	const char *archs[] = {"sm_80", "sm_90"};
	if (moe_compile_cuda(d, archs, 2, MOE_CUDA_EMIT_IMAGES, img, err, sizeof err) != 0)
		fail_msg("%s", err);
	FILE *f = fopen(rd, "w");
	assert_non_null(f);
	fprintf(f,
		"#include <stdio.h>\n#include <string.h>\n#include \"cuda_rt.h\"\n"
		"int main(void) {\n"
		"\tconst struct moe_cuda_gen *g = &moe_cuda_gen_model;\n"
		"\tconst struct moe_desc *d = g->desc;\n"
		"\tprintf(\"%%u %%u %%s %%u %%s\\n\", g->abi, g->desc_bytes, d->name, d->hidden, "
		"g->source_name);\n"
		"\tfor (unsigned i = 0; i < g->n_images; i++)\n"
		"\t\tprintf(\"%%s %%d\\n\", g->images[i].arch, g->images[i].size > 4 && "
		"(!memcmp(g->images[i].data, \"\\177ELF\", 4) || strstr((const char "
		"*)g->images[i].data, \".entry moe_up\") != 0));\n"
		"\treturn 0;\n}\n");
	assert_int_equal(fclose(f), 0);
	const char *src = getenv("MOE_SOURCE_DIR");
	src = src ? src : ".";
	snprintf(cmd, sizeof cmd,
		 "cc -std=c11 -I%s/runtime -I%s/runtime/cuda -I%s/runtime/core -I%s/runtime/ref -o "
		 "%s %s %s && %s > %s/out.txt",
		 src, src, src, src, exe, rd, img, exe, dir);
	assert_int_equal(system(cmd), 0);
	char outp[600], want[1024];
	snprintf(outp, sizeof outp, "%s/out.txt", dir);
	size_t n;
	char *out = read_file(outp, &n);
	assert_non_null(out);
	char name[300];
	moe_cuda_source_name(d, name, sizeof name);
	snprintf(want, sizeof want, "%d %zu %s %u %s\nsm_80 1\ncompute_80 1\nsm_90 1\n",
		 MOE_CUDA_ABI, sizeof(struct moe_desc), d->name, d->hidden, name);
	assert_string_equal(out, want);
	free(out);
	unlink(img), unlink(rd), unlink(exe), unlink(outp);
	rmdir(dir);
}

/* --emit cu writes the source through a temporary name; an unwritable
 * output is an I/O error and leaves nothing behind. */
static void test_compile_cuda_cu(void **state)
{
	(void)state;
	const struct moe_desc *d = NULL, *bad = NULL;
	for (size_t i = 0; i < n_specs; i++) {
		if (specs[i].plannable && !d)
			d = specs[i].d;
		if (!specs[i].plannable && !bad)
			bad = specs[i].d;
	}
	assert_non_null(d);
	char path[] = "/tmp/moegen-cuda-cu.XXXXXX", err[1024];
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	close(fd);
	assert_int_equal(moe_compile_cuda(d, NULL, 0, MOE_CUDA_EMIT_CU, path, err, sizeof err), 0);
	size_t n, m;
	char *have = read_file(path, &n), *want = emit(d, &m);
	assert_non_null(have);
	assert_int_equal(n, m);
	assert_memory_equal(have, want, n);
	free(have), free(want);
	unlink(path);
	assert_int_equal(moe_compile_cuda(d, NULL, 0, MOE_CUDA_EMIT_CU, "/nonexistent-dir/model.cu",
					  err, sizeof err),
			 MOE_EXIT_IO);
	assert_non_null(strstr(err, "/nonexistent-dir/model.cu"));
	if (bad) {
		err[0] = 0;
		assert_int_equal(
		    moe_compile_cuda(bad, NULL, 0, MOE_CUDA_EMIT_CU, path, err, sizeof err),
		    MOE_EXIT_BACKEND);
		assert_non_null(strstr(err, "target cuda"));
		assert_int_equal(access(path, F_OK), -1);
	}
}

/* The packed geometry, from its definition in cuda_rt.h. */
static void test_geometry(void **state)
{
	(void)state;
	struct moe_cuda_geom g;
	moe_cuda_geom_init(&g, 2880, 2880, 1);
	assert_int_equal(g.ld_h, 2880); /* 45 * 64 */
	assert_int_equal(g.up_rows, 5760);
	assert_int_equal(g.up_k, 2880);
	assert_int_equal(g.down_rows, 2880);
	moe_cuda_geom_init(&g, 100, 70, 0);
	assert_int_equal(g.ld_h, 128);
	assert_int_equal(g.up_rows, 128);
	assert_int_equal(g.up_k, 128);
	assert_int_equal(g.down_rows, 128);
	moe_cuda_geom_init(&g, 64, 192, 1);
	assert_int_equal(g.ld_h, 192);
	assert_int_equal(g.up_rows, 384);
	assert_int_equal(g.up_k, 64);
	assert_int_equal(g.down_rows, 64);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_refusals),
	    cmocka_unit_test(test_refusal_reports_all),
	    cmocka_unit_test(test_source_constants),
	    cmocka_unit_test(test_source_follows_overrides),
	    cmocka_unit_test(test_generated_not_stale),
	    cmocka_unit_test(test_parse_archs),
	    cmocka_unit_test(test_pick_image),
	    cmocka_unit_test(test_no_device),
	    cmocka_unit_test(test_geometry),
	    cmocka_unit_test(test_kernel_files),
	    cmocka_unit_test(test_compile_cuda_cu),
	    cmocka_unit_test(test_nvrtc_error_log),
	    cmocka_unit_test(test_images_file),
	    cmocka_unit_test(test_nvrtc_all_specs),
	};
	return cmocka_run_group_tests(tests, load_specs, free_specs);
}
