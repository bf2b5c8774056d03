/* main.c: the moegen command. Parses the command line, then calls the
 * pipeline stages in order (driver.c's moe_front for load -> override ->
 * check), checking diagnostics between stages. */
#include "moegen.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "bench.h"
#include "import.h"
#include "moe_ref.h"

#include <cjson/cJSON.h>

#define MAX_SETS 256

/* Options common to every command that takes a spec. */
struct front_opts {
	const char *spec;
	const char *sets[MAX_SETS];
	int n_sets;
};

static void usage_main(FILE *out)
{
	fputs("usage: moegen COMMAND [ARGS]\n"
	      "\n"
	      "commands:\n"
	      "  check SPEC          validate a spec; errors are FILE:LINE:COL located\n"
	      "  info SPEC           parameters (total/active), FLOPs and weight bytes per token\n"
	      "  -d spec|model|plan SPEC  print a pipeline stage\n"
	      "  ref SPEC            reference forward pass on random weights\n"
	      "  import CONFIG.json  write a spec from a Hugging Face config.json (or a GGUF)\n"
	      "  gguf FILE.gguf      list a GGUF file, or write one tensor's values\n"
	      "  SPEC -o model.so    compile SPEC (also: compile SPEC ...)\n"
	      "  run MODEL.so        run a compiled model, optionally against the reference\n"
	      "  bench               benchmark the generated layer against peak and BLAS\n"
	      "  --version           version, git revision, LLVM version and targets\n"
	      "\n"
	      "Every command that takes a spec accepts --set KEY=VALUE (repeatable) to\n"
	      "override a spec key, e.g. --set model.hidden=128 --set experts.intermediate=64.\n"
	      "`moegen COMMAND --help` describes a command; docs/cli.md lists exit codes.\n",
	      out);
}

static const char *const usage_check =
    "usage: moegen check SPEC [--set KEY=VALUE]... [--json]\n"
    "Validate SPEC and report every error at once. --json: one JSON object on\n"
    "stdout, {\"ok\": true, the model's fields} or {\"ok\": false, \"diagnostics\": [...]}.\n";
static const char *const usage_info =
    "usage: moegen info SPEC [--set KEY=VALUE]... [--json]\n"
    "Print total and active parameters (routed experts, shared experts, router,\n"
    "dense parts), FLOPs and weight bytes per token. --json: as one JSON object.\n";
static const char *const usage_dump =
    "usage: moegen -d spec|model|plan SPEC [--set KEY=VALUE]...\n"
    "Print the spec as read (after overrides), the resolved model, or the CPU\n"
    "kernel plan.\n";
static const char *const usage_ref =
    "usage: moegen ref SPEC [--set KEY=VALUE]... [--random SEED] [--tokens N]\n"
    "                  [--layer L] [--training --noise-seed S]\n"
    "Run the reference forward pass of one MoE layer on random weights (SEED,\n"
    "default 1) and random input, and print the output statistics, per-expert\n"
    "token counts and the auxiliary losses. --layer picks the model layer (default:\n"
    "the first MoE layer).\n";

static int bad_usage(const char *usage, const char *fmt, const char *arg)
{
	fprintf(stderr, "moegen: error: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n%s", usage);
	return MOE_EXIT_USAGE;
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;
	if (!s || !*s || *s == '-')
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || *end)
		return -1;
	*out = v;
	return 0;
}

/* Parse "SPEC [--set K=V]..." plus command-specific options through `extra`,
 * which returns the number of argv entries it consumed (0: unknown, -1: bad). */
static int parse_front(int argc, char **argv, const char *usage, struct front_opts *fo,
		       int (*extra)(void *ctx, int argc, char **argv), void *ctx)
{
	memset(fo, 0, sizeof *fo);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			fputs(usage, stdout);
			return -1;
		}
		if (!strcmp(a, "--set") || !strncmp(a, "--set=", 6)) {
			const char *v = a[5] == '=' ? a + 6 : (i + 1 < argc ? argv[++i] : NULL);
			if (!v)
				return bad_usage(usage, "%s needs KEY=VALUE", "--set");
			if (fo->n_sets == MAX_SETS)
				return bad_usage(usage, "too many %s options", "--set");
			fo->sets[fo->n_sets++] = v;
			continue;
		}
		if (extra) {
			int n = extra(ctx, argc - i, argv + i);
			if (n < 0)
				return MOE_EXIT_USAGE;
			if (n > 0) {
				i += n - 1;
				continue;
			}
		}
		if (a[0] == '-' && a[1])
			return bad_usage(usage, "unknown option '%s'", a);
		if (fo->spec)
			return bad_usage(usage, "unexpected argument '%s'", a);
		fo->spec = a;
	}
	if (!fo->spec)
		return bad_usage(usage, "%s", "missing SPEC");
	return 0;
}

static int front(const struct front_opts *fo, struct moe_desc *d)
{
	struct moe_diag diag = {0};
	int rc = moe_front(fo->spec, fo->sets, fo->n_sets, d, &diag);
	if (rc != MOE_EXIT_OK && diag.n_errors)
		fprintf(stderr, "%d error%s\n", diag.n_errors, diag.n_errors == 1 ? "" : "s");
	return rc;
}

static int json_flag(void *ctx, int argc, char **argv)
{
	(void)argc;
	if (strcmp(argv[0], "--json"))
		return 0;
	*(int *)ctx = 1;
	return 1;
}

static void json_diag(void *ctx, const char *kind, struct moe_loc loc, const char *msg)
{
	cJSON *d = cJSON_CreateObject();
	if (loc.file) {
		cJSON_AddStringToObject(d, "file", loc.file);
		cJSON_AddNumberToObject(d, "line", loc.line);
		cJSON_AddNumberToObject(d, "column", loc.col);
	}
	cJSON_AddStringToObject(d, "severity", kind);
	cJSON_AddStringToObject(d, "message", msg);
	cJSON_AddItemToArray(ctx, d);
}

static int print_json(cJSON *o)
{
	char *text = o ? cJSON_Print(o) : NULL;
	cJSON_Delete(o);
	if (!text) {
		fprintf(stderr, "moegen: error: out of memory\n");
		return MOE_EXIT_INTERNAL;
	}
	puts(text);
	free(text);
	return MOE_EXIT_OK;
}

/* check and info: the front half, then the text or JSON report. With
 * --json the diagnostics go into the object too (stdout), the exit code is
 * the same. */
static int check_or_info(int argc, char **argv, const char *usage, int info)
{
	struct front_opts fo;
	int json = 0;
	int rc = parse_front(argc, argv, usage, &fo, json_flag, &json);
	if (rc)
		return rc < 0 ? MOE_EXIT_OK : rc;
	struct moe_desc *d = calloc(1, sizeof *d);
	if (!d)
		return MOE_EXIT_INTERNAL;
	if (!json) {
		rc = front(&fo, d);
		if (rc == MOE_EXIT_OK && info) {
			moe_info_print(d, stdout);
		} else if (rc == MOE_EXIT_OK) {
			char router[256];
			moe_info_router(d, router, sizeof router);
			printf("%s: ok (%s %s, %u experts, hidden %u)\n", fo.spec,
			       moe_mode_names[d->mode], router, d->n_experts, d->hidden);
		}
		free(d);
		return rc;
	}
	cJSON *diags = cJSON_CreateArray();
	struct moe_diag diag = {.sink_at = json_diag, .ctx = diags};
	rc = moe_front(fo.spec, fo.sets, fo.n_sets, d, &diag);
	cJSON *o;
	if (rc == MOE_EXIT_OK) {
		o = info ? moe_info_json(d) : moe_check_json(fo.spec, d);
		cJSON_AddItemToObject(o, "diagnostics", diags);
	} else {
		o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "spec", fo.spec);
		cJSON_AddBoolToObject(o, "ok", 0);
		cJSON_AddNumberToObject(o, "exit_code", rc);
		cJSON_AddItemToObject(o, "diagnostics", diags);
	}
	free(d);
	int prc = print_json(o);
	return rc != MOE_EXIT_OK ? rc : prc;
}

static int cmd_check(int argc, char **argv)
{
	return check_or_info(argc, argv, usage_check, 0);
}

static int cmd_info(int argc, char **argv)
{
	return check_or_info(argc, argv, usage_info, 1);
}

static int cmd_dump(int argc, char **argv)
{
	if (argc < 2 || (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
		fputs(usage_dump, argc < 2 ? stderr : stdout);
		return argc < 2 ? MOE_EXIT_USAGE : MOE_EXIT_OK;
	}
	const char *stage = argv[1];
	if (strcmp(stage, "spec") && strcmp(stage, "model") && strcmp(stage, "plan"))
		return bad_usage(usage_dump, "unknown stage '%s' (stages: spec, model, plan)",
				 stage);
	struct front_opts fo;
	int rc = parse_front(argc - 1, argv + 1, usage_dump, &fo, NULL, NULL);
	if (rc)
		return rc < 0 ? MOE_EXIT_OK : rc;
	if (!strcmp(stage, "spec")) {
		struct moe_diag diag = {0};
		char *text;
		size_t len;
		if (moe_spec_read(fo.spec, &text, &len, &diag) != 0)
			return MOE_EXIT_IO;
		struct moe_spec *s = moe_spec_load_string(fo.spec, text, len, &diag);
		free(text);
		if (!s)
			return MOE_EXIT_SPEC;
		for (int i = 0; i < fo.n_sets; i++)
			moe_spec_set(s, fo.sets[i], &diag);
		if (!diag.n_errors)
			moe_spec_dump(s, stdout);
		moe_spec_free(s);
		return diag.n_errors ? MOE_EXIT_SPEC : MOE_EXIT_OK;
	}
	struct moe_desc *d = calloc(1, sizeof *d);
	if (!d)
		return MOE_EXIT_INTERNAL;
	rc = front(&fo, d);
	if (rc == MOE_EXIT_OK && !strcmp(stage, "plan")) {
		struct moe_diag diag = {0};
		struct moe_plan p;
		if (moe_plan_build(d, MOE_TARGET_CPU, &p, &diag) == 0)
			moe_plan_dump(&p, stdout);
		else
			rc = MOE_EXIT_BACKEND;
	} else if (rc == MOE_EXIT_OK) {
		size_t n = moe_desc_dump(d, NULL, 0);
		char *buf = malloc(n + 1);
		if (!buf) {
			free(d);
			return MOE_EXIT_INTERNAL;
		}
		moe_desc_dump(d, buf, n + 1);
		fputs(buf, stdout);
		free(buf);
	}
	free(d);
	return rc;
}

struct ref_opts {
	uint64_t seed, tokens, layer, noise_seed;
	int have_layer, training;
};

static int ref_extra(void *ctx, int argc, char **argv)
{
	struct ref_opts *o = ctx;
	const char *a = argv[0];
	uint64_t *dst = NULL;
	if (!strcmp(a, "--random"))
		dst = &o->seed;
	else if (!strcmp(a, "--tokens"))
		dst = &o->tokens;
	else if (!strcmp(a, "--layer"))
		dst = &o->layer, o->have_layer = 1;
	else if (!strcmp(a, "--noise-seed"))
		dst = &o->noise_seed;
	else if (!strcmp(a, "--training")) {
		o->training = 1;
		return 1;
	} else
		return 0;
	if (argc < 2 || parse_u64(argv[1], dst)) {
		bad_usage(usage_ref, "%s needs a non-negative integer", a);
		return -1;
	}
	return 2;
}

static int cmd_ref(int argc, char **argv)
{
	struct ref_opts ro = {.seed = 1, .tokens = 8};
	struct front_opts fo;
	int rc = parse_front(argc, argv, usage_ref, &fo, ref_extra, &ro);
	if (rc)
		return rc < 0 ? MOE_EXIT_OK : rc;
	if (ro.tokens > (1u << 20))
		return bad_usage(usage_ref, "%s: at most 1048576 tokens", "--tokens");
	struct moe_desc *d = calloc(1, sizeof *d);
	if (!d)
		return MOE_EXIT_INTERNAL;
	rc = front(&fo, d);
	if (rc != MOE_EXIT_OK) {
		free(d);
		return rc;
	}
	uint32_t layer = d->n_moe_layers ? d->moe_layers[0] : 0;
	if (ro.have_layer) {
		int found = 0;
		for (uint32_t i = 0; i < d->n_moe_layers; i++)
			found |= d->moe_layers[i] == ro.layer;
		if (!found) {
			fprintf(stderr, "moegen: error: --layer %llu is not an MoE layer of %s\n",
				(unsigned long long)ro.layer, d->name);
			free(d);
			return MOE_EXIT_USAGE;
		}
		layer = (uint32_t)ro.layer;
	}

	size_t T = (size_t)ro.tokens, H = d->hidden, W = moe_desc_route_width(d);
	uint64_t E = d->mode == MOE_MODE_PRODUCT_KEY ? moe_desc_pk_experts(d) : d->n_experts;
	struct moe_ref_weights w;
	float *x = malloc((T * H + 1) * sizeof *x), *y = malloc((T * H + 1) * sizeof *y);
	int32_t *ids = malloc((T * W + 1) * sizeof *ids);
	float *wts = malloc((T * W + 1) * sizeof *wts);
	int64_t *counts = calloc(E, sizeof *counts);
	float *imp = calloc(E, sizeof *imp);
	enum moe_status st = moe_ref_weights_alloc(d, &w);
	if (!x || !y || !ids || !wts || !counts || !imp || st != MOE_OK) {
		fprintf(stderr, "moegen: error: out of memory for %s\n", d->name);
		rc = MOE_EXIT_BACKEND;
		goto out;
	}
	moe_ref_weights_random(d, ro.seed, layer, &w);
	for (size_t i = 0; i < T * H; i++)
		x[i] = 2.0f * moe_rng_uniform(moe_rng_hash(ro.seed, 0x78, layer, i)) - 1.0f;

	struct moe_fwd_opts opts = {.training = ro.training, .seed = ro.noise_seed, .layer = layer};
	struct moe_routing r = {
	    .expert_ids = ids, .weights = wts, .counts = counts, .importance = imp};
	char err[512] = "";
	st = moe_ref_forward(d, &w, x, y, T, &opts, &r, err, sizeof err);
	if (st != MOE_OK) {
		fprintf(stderr, "moegen: error: reference forward failed: %s: %s\n",
			moe_status_name(st), err);
		rc = MOE_EXIT_BACKEND;
		goto out;
	}
	double sum = 0, sq = 0, amax = 0;
	for (size_t i = 0; i < T * H; i++) {
		sum += y[i];
		sq += (double)y[i] * y[i];
		amax = fmax(amax, fabs(y[i]));
	}
	double n = (T * H) != 0 ? (double)(T * H) : 1.0;
	printf("%s: reference forward, layer %u, %zu tokens, hidden %zu, weights seed %llu\n",
	       d->name, layer, T, H, (unsigned long long)ro.seed);
	printf("output   mean %.6e  rms %.6e  max|y| %.6e\n", sum / n, sqrt(sq / n), amax);
	if (W && T) {
		size_t shown = T < 4 ? T : 4;
		for (size_t t = 0; t < shown; t++) {
			printf("token %zu ->", t);
			for (size_t j = 0; j < W && j < 16; j++)
				if (ids[t * W + j] >= 0)
					printf(" %d:%.4f", ids[t * W + j], (double)wts[t * W + j]);
			printf(W > 16 ? " ...\n" : "\n");
		}
	}
	if (E <= 64) {
		printf("counts  ");
		for (uint64_t e = 0; e < E; e++)
			printf(" %lld", (long long)counts[e]);
		printf("\n");
	}
	printf("load-balancing loss %.6f  z-loss %.6f  importance cv^2 %.6f  dropped %lld\n",
	       (double)r.lb_loss, (double)r.z_loss, (double)r.importance_cv2,
	       (long long)r.n_dropped);
	rc = MOE_EXIT_OK;
out:
	moe_ref_weights_free(&w);
	free(x);
	free(y);
	free(ids);
	free(wts);
	free(counts);
	free(imp);
	free(d);
	return rc;
}

struct command {
	const char *name;
	int (*fn)(int argc, char **argv);
};

static const struct command commands[] = {
    {"check", cmd_check},       {"info", cmd_info},           {"ref", cmd_ref},
    {"import", moe_cmd_import}, {"compile", moe_cmd_compile}, {"run", moe_cmd_run},
    {"bench", moe_cmd_bench},   {"gguf", moe_cmd_gguf},
};

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage_main(stderr);
		return MOE_EXIT_USAGE;
	}
	const char *cmd = argv[1];
	if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
		usage_main(stdout);
		return MOE_EXIT_OK;
	}
	if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
		moe_version_print(stdout);
		return MOE_EXIT_OK;
	}
	if (!strcmp(cmd, "-d"))
		return cmd_dump(argc - 1, argv + 1);
	for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
		if (!strcmp(cmd, commands[i].name))
			return commands[i].fn(argc - 1, argv + 1);
	/* `moegen SPEC -o model.so`: a spec file in command position compiles. */
	size_t len = strlen(cmd);
	if (cmd[0] != '-' &&
	    ((len > 5 && !strcmp(cmd + len - 5, ".yaml")) ||
	     (len > 4 && !strcmp(cmd + len - 4, ".yml")) || access(cmd, F_OK) == 0)) {
		argv[0] = (char *)"compile";
		return moe_cmd_compile(argc, argv);
	}
	const char *names[sizeof commands / sizeof *commands];
	for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
		names[i] = commands[i].name;
	const char *near = moe_closest(cmd, names, (int)(sizeof names / sizeof *names));
	fprintf(stderr, "moegen: error: unknown command '%s'", cmd);
	if (near)
		fprintf(stderr, " (did you mean '%s'?)", near);
	fputs("\n", stderr);
	usage_main(stderr);
	return MOE_EXIT_USAGE;
}
