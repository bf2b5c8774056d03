/* cmd_compile.c: `moegen SPEC [-o OUT]`: the whole pipeline, spec -> model ->
 * plan -> LLVM module -> model.so (or the object, IR, assembly or header the
 * --emit option asks for). */
#include "cuda.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(FILE *f)
{
	fprintf(f,
		"usage: moegen SPEC [-o OUT] [--set KEY=VALUE]... [--target cpu|cuda|cpu,cuda]\n"
		"              [--cpu native|x86-64-v3|znver3|...] [--triple TRIPLE]\n"
		"              [--features +f,-g] [--sve-bits N]\n"
		"              [--emit so|obj|ll|asm|header|cu|ptx] [-O0..3]\n"
		"              [--arch sm_80,sm_90] [--prefix NAME]\n"
		"Compile an MoE spec into model.so (default OUT: NAME.so, NAME from the "
		"spec).\n"
		"  --emit ll      the LLVM IR before optimization (deterministic)\n"
		"  --emit header  a C header with the ABI and the model's constants\n"
		"  --target cuda  CUDA kernels (NVRTC: a cubin per --arch plus PTX) in model.so;\n"
		"                 cpu,cuda carries both, the device is chosen at moe_create\n"
		"  --emit cu|ptx  the generated CUDA C / the PTX of the first --arch\n"
		"  --sve-bits N   AArch64: SVE code for vector length N (128, 256, 512,\n"
		"                 1024, 2048 bits; default: the --cpu's known length, a64fx\n"
		"                 512, neoverse-v1 256; 0: NEON only); the model then needs\n"
		"                 a CPU of exactly that length\n"
		"  --prefix NAME  export the functions as NAMEmoe_forward, ... (and name the\n"
		"                 header's constants NAME in upper case + MOE_MODEL_...), so\n"
		"                 several models link into one program\n"
		"  -o -           write ll, asm or header to stdout\n");
}

static const char *const exts[MOE_EMIT_COUNT] = {".so", ".o", ".ll", ".s", ".h"};

static int need(int argc, char **argv, int i)
{
	if (i + 1 >= argc) {
		fprintf(stderr, "moegen: error: option '%s' needs a value\n", argv[i]);
		return 0;
	}
	return 1;
}

/* Copy a file to stdout (for -o -). */
static int cat_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return -1;
	char buf[65536];
	size_t n;
	while ((n = fread(buf, 1, sizeof buf, f)) > 0)
		fwrite(buf, 1, n, stdout);
	fclose(f);
	return 0;
}

int moe_cmd_compile(int argc, char **argv)
{
	const char *spec = NULL, *out = NULL;
	const char **sets = calloc((size_t)argc + 1, sizeof *sets);
	int n_sets = 0;
	struct moe_cpu_target tgt = {.opt_level = 3};
	enum moe_emit kind = MOE_EMIT_SO;
	int want_cpu = 1, want_cuda = 0, cuda_kind = -1; /* cuda_kind: --emit cu|ptx */
	const char *arch_list = NULL, *prefix = NULL;
	int rc = MOE_EXIT_USAGE;
	if (!sets) {
		fprintf(stderr, "moegen: error: out of memory\n");
		return MOE_EXIT_INTERNAL;
	}
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			usage(stdout);
			rc = MOE_EXIT_OK;
			goto done;
		} else if (!strcmp(a, "-o")) {
			if (!need(argc, argv, i))
				goto done;
			out = argv[++i];
		} else if (!strcmp(a, "--set")) {
			if (!need(argc, argv, i))
				goto done;
			sets[n_sets++] = argv[++i];
		} else if (!strncmp(a, "--set=", 6)) {
			sets[n_sets++] = a + 6;
		} else if (!strcmp(a, "--target")) {
			if (!need(argc, argv, i))
				goto done;
			const char *t = argv[++i];
			want_cpu =
			    !strcmp(t, "cpu") || !strcmp(t, "cpu,cuda") || !strcmp(t, "cuda,cpu");
			want_cuda =
			    !strcmp(t, "cuda") || !strcmp(t, "cpu,cuda") || !strcmp(t, "cuda,cpu");
			if (!want_cpu && !want_cuda) {
				fprintf(
				    stderr,
				    "moegen: error: unknown target '%s' (cpu, cuda, cpu,cuda)\n",
				    t);
				goto done;
			}
		} else if (!strcmp(a, "--prefix")) {
			if (!need(argc, argv, i))
				goto done;
			prefix = argv[++i];
			if (!moe_prefix_valid(prefix)) {
				fprintf(stderr,
					"moegen: error: --prefix '%s' is not a C identifier of at "
					"most %d bytes\n",
					prefix, MOE_PREFIX_MAX);
				goto done;
			}
		} else if (!strcmp(a, "--arch")) {
			if (!need(argc, argv, i))
				goto done;
			arch_list = argv[++i];
		} else if (!strcmp(a, "--cpu")) {
			if (!need(argc, argv, i))
				goto done;
			tgt.cpu = argv[++i];
		} else if (!strcmp(a, "--triple")) {
			if (!need(argc, argv, i))
				goto done;
			tgt.triple = argv[++i];
		} else if (!strcmp(a, "--features")) {
			if (!need(argc, argv, i))
				goto done;
			tgt.features = argv[++i];
		} else if (!strcmp(a, "--sve-bits")) {
			if (!need(argc, argv, i))
				goto done;
			char *end;
			long n = strtol(argv[++i], &end, 10);
			if (*end || end == argv[i] ||
			    (n != 0 && (n < 128 || n > 2048 || (n & (n - 1))))) {
				fprintf(stderr,
					"moegen: error: --sve-bits '%s' is not 0, 128, 256, 512, "
					"1024 or 2048\n",
					argv[i]);
				goto done;
			}
			tgt.sve_bits = n ? (int)n : -1;
		} else if (!strcmp(a, "--emit")) {
			if (!need(argc, argv, i))
				goto done;
			int k = moe_enum_lookup(moe_emit_names, MOE_EMIT_COUNT, argv[++i]);
			cuda_kind = !strcmp(argv[i], "cu")    ? MOE_CUDA_EMIT_CU
				    : !strcmp(argv[i], "ptx") ? MOE_CUDA_EMIT_PTX
							      : -1;
			if (cuda_kind >= 0)
				continue;
			if (k < 0) {
				fprintf(stderr,
					"moegen: error: unknown --emit '%s' (so, obj, ll, asm, "
					"header)\n",
					argv[i]);
				goto done;
			}
			kind = (enum moe_emit)k;
		} else if (a[0] == '-' && a[1] == 'O' && a[2] >= '0' && a[2] <= '3' && !a[3]) {
			tgt.opt_level = a[2] - '0';
		} else if (a[0] == '-' && a[1]) {
			fprintf(stderr, "moegen: error: unknown option '%s'\n", a);
			usage(stderr);
			goto done;
		} else if (!spec) {
			spec = a;
		} else {
			fprintf(stderr, "moegen: error: unexpected argument '%s'\n", a);
			goto done;
		}
	}
	if (!spec) {
		fprintf(stderr, "moegen: error: missing SPEC\n");
		usage(stderr);
		goto done;
	}

	struct moe_desc *d = calloc(1, sizeof *d);
	if (!d) {
		rc = MOE_EXIT_INTERNAL;
		goto done;
	}
	struct moe_diag diag = {0};
	rc = moe_front(spec, sets, n_sets, d, &diag);
	if (rc != MOE_EXIT_OK) {
		free(d);
		goto done;
	}
	char def[MOE_NAME_MAX + 8], tmp[PATH_MAX] = "", arch_buf[256], err[16384];
	const char *archs[MOE_CUDA_MAX_ARCHS];
	int n_archs = 0;
	if (cuda_kind >= 0)
		want_cuda = 1, want_cpu = 0;
	if (want_cuda) {
		n_archs = moe_cuda_parse_archs(arch_list, arch_buf, sizeof arch_buf, archs,
					       MOE_CUDA_MAX_ARCHS, err, sizeof err);
		if (n_archs < 0) {
			fprintf(stderr, "moegen: error: %s\n", err);
			free(d);
			rc = MOE_EXIT_USAGE;
			goto done;
		}
	}
	int to_stdout = out && !strcmp(out, "-");
	if (to_stdout && cuda_kind < 0 && (kind == MOE_EMIT_SO || kind == MOE_EMIT_OBJ)) {
		fprintf(stderr, "moegen: error: -o - works only for ll, asm, header, cu and ptx\n");
		free(d);
		rc = MOE_EXIT_USAGE;
		goto done;
	}
	if (to_stdout) {
		int fd = moe_temp_file(tmp, sizeof tmp, "moegen-out", err, sizeof err);
		if (fd < 0) {
			fprintf(stderr, "moegen: error: %s\n", err);
			free(d);
			rc = MOE_EXIT_IO;
			goto done;
		}
		close(fd);
		out = tmp;
	} else {
		if (!out) {
			snprintf(def, sizeof def, "%s%s", d->name,
				 cuda_kind == MOE_CUDA_EMIT_CU    ? ".cu"
				 : cuda_kind == MOE_CUDA_EMIT_PTX ? ".ptx"
								  : exts[kind]);
			out = def;
		}
		/* Refuse to overwrite the spec (or a device, a directory) before
		 * any work; the link adds the runtime archive to the inputs. */
		const char *inputs[1] = {spec};
		if (moe_output_check(out, inputs, 1, err, sizeof err) != 0) {
			fprintf(stderr, "moegen: error: %s\n", err);
			free(d);
			rc = MOE_EXIT_IO;
			goto done;
		}
	}
	if (cuda_kind >= 0)
		rc = moe_compile_cuda(d, archs, n_archs, (enum moe_cuda_emit)cuda_kind, out, err,
				      sizeof err);
	else
		rc =
		    moe_compile_model(d,
				      &(struct moe_compile_opts){.cpu = &tgt,
								 .want_cpu = want_cpu,
								 .archs = archs,
								 .n_archs = want_cuda ? n_archs : 0,
								 .prefix = prefix},
				      kind, out, err, sizeof err);
	if (rc != 0)
		fprintf(stderr, "moegen: error: %s\n", err);
	else if (to_stdout && cat_file(out) != 0)
		rc = MOE_EXIT_IO;
	if (to_stdout)
		moe_temp_remove(tmp);
	free(d);
done:
	free(sets);
	return rc;
}
