/* test_import.c: `moegen import`. Every family's fixture (tests/import/FAMILY/
 * config.json) imports to its hand-written expected.yaml byte for byte; layer
 * placement is recomputed here from each family's rule; bad configs fail with
 * a message naming the field; -o writes atomically; imported specs validate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <cjson/cJSON.h>
#include <dirent.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "import.h"
#include "moegen.h"

/* Diagnostics captured through the sink. */
struct capture {
	char text[16384];
	size_t len;
};

static void sink(void *ctx, const char *line)
{
	struct capture *c = ctx;
	int n = snprintf(c->text + c->len, sizeof c->text - c->len, "%s\n", line);
	if (n > 0 && c->len + (size_t)n < sizeof c->text)
		c->len += (size_t)n;
}

static char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *buf = malloc((size_t)n + 1);
	assert_non_null(buf);
	assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
	buf[n] = 0;
	fclose(f);
	if (len)
		*len = (size_t)n;
	return buf;
}

/* The result of one import into memory. */
struct run {
	int rc;
	char *out;
	size_t len;
	struct moe_diag d;
	struct capture cap;
};

static void run_import(struct run *r, const char *path, enum moe_import_stack stack)
{
	memset(r, 0, sizeof *r);
	r->d.sink = sink;
	r->d.ctx = &r->cap;
	FILE *mem = open_memstream(&r->out, &r->len);
	assert_non_null(mem);
	struct moe_import_opts o = {stack};
	r->rc = moe_import_with(path, &o, mem, &r->d);
	fclose(mem);
}

static void run_free(struct run *r)
{
	free(r->out);
	r->out = NULL;
}

static void fixture_path(char *buf, size_t n, const char *family, const char *file)
{
	snprintf(buf, n, "tests/import/%s/%s", family, file);
}

/* Golden: every family ------------------------------------------------- */

static const char *const goldens[] = {
    "dbrx",
    "deepseek_v2",
    "deepseek_v3",
    "dots1",
    "ernie4_5_moe",
    "flex_olmo",
    "glm4_moe",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "hunyuan_v1_moe",
    "hunyuan_v1_moe-top2",
    "jamba",
    "jetmoe",
    "llama4",
    "llama4_text",
    "minimax",
    "minimax_m2",
    "mixtral",
    "nllb_moe",
    "nllb_moe-capacity",
    "olmoe",
    "phimoe",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "switch_transformers",
};
#define N_GOLDENS ((int)(sizeof goldens / sizeof *goldens))

/* Families whose spec carries a fact the language cannot hold: a warning
 * (Granite's residual_multiplier, outside the MoE block; MiniMax's
 * mlp_alpha_factor alone scales the residual and is a comment only). */
static int expected_warnings(const char *family)
{
	return strcmp(family, "granitemoe") == 0 || strcmp(family, "granitemoeshared") == 0;
}

static void test_golden(void **state)
{
	const char *family = *state;
	char cfg[256], exp[256];
	fixture_path(cfg, sizeof cfg, family, "config.json");
	fixture_path(exp, sizeof exp, family, "expected.yaml");
	struct run r;
	run_import(&r, cfg, MOE_IMPORT_ENCODER);
	if (r.rc != MOE_EXIT_OK)
		fprintf(stderr, "%s", r.cap.text);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	assert_int_equal(r.d.n_errors, 0);
	assert_int_equal(r.d.n_warnings, expected_warnings(family));
	size_t elen = 0;
	char *want = slurp(exp, &elen);
	assert_non_null(want);
	if (elen != r.len || memcmp(want, r.out, elen) != 0) {
		/* show the first differing line */
		size_t i = 0, line = 1;
		while (i < elen && i < r.len && want[i] == r.out[i])
			line += want[i++] == '\n';
		fprintf(stderr, "%s: first difference at line %zu\n--- got:\n%s", exp, line, r.out);
		fail();
	}
	free(want);
	run_free(&r);
}

/* Layer placement, recomputed from each family's rule ---------------------- */

/* The moe_layers list of a written spec (flow sequence, possibly wrapped). */
static int parse_moe_layers(const char *yaml, int *out, int max)
{
	const char *p = strstr(yaml, "\n  moe_layers: [");
	assert_non_null(p);
	p += strlen("\n  moe_layers: [");
	int n = 0;
	while (*p && *p != ']') {
		char *end;
		long v = strtol(p, &end, 10);
		if (end == p) {
			p++;
			continue;
		}
		assert_true(n < max);
		out[n++] = (int)v;
		p = end;
	}
	return n;
}

static void check_layers(const char *family, enum moe_import_stack stack, int layers,
			 int (*is_moe)(int i))
{
	char cfg[256];
	fixture_path(cfg, sizeof cfg, family, "config.json");
	struct run r;
	run_import(&r, cfg, stack);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	int got[MOE_MAX_LAYERS];
	int n = parse_moe_layers(r.out, got, MOE_MAX_LAYERS);
	int k = 0;
	for (int i = 0; i < layers; i++)
		if (is_moe(i)) {
			assert_true(k < n);
			assert_int_equal(got[k], i);
			k++;
		}
	assert_int_equal(k, n);
	run_free(&r);
}

/* DeepSeek-V3: i >= first_k_dense_replace (3) and i % moe_layer_freq (1) == 0. */
static int rule_v3(int i)
{
	return i >= 3;
}
/* Switch: step = 12 / 6 = 2, sparse iff i % 2 == 1. */
static int rule_switch(int i)
{
	return i % 2 == 1;
}
/* NLLB: (i + 1) % 4 == 0. */
static int rule_nllb(int i)
{
	return (i + 1) % 4 == 0;
}
/* Jamba: i % 2 == 1 (period 2, offset 1). */
static int rule_jamba(int i)
{
	return i % 2 == 1;
}
/* Llama-4 step 2: range(1, 48, 2). */
static int rule_llama4_step2(int i)
{
	return i >= 1 && (i - 1) % 2 == 0;
}
/* ERNIE: (i + 1) % 1 == 0 and 1 <= i <= 27. */
static int rule_ernie(int i)
{
	return i >= 1 && i <= 27;
}
/* GLM-4.5-Air: i >= first_k_dense_replace (1). */
static int rule_glm(int i)
{
	return i >= 1;
}
static int rule_all(int i)
{
	(void)i;
	return 1;
}

static void test_layer_rules(void **state)
{
	(void)state;
	check_layers("deepseek_v3", MOE_IMPORT_ENCODER, 61, rule_v3);
	check_layers("switch_transformers", MOE_IMPORT_ENCODER, 12, rule_switch);
	check_layers("switch_transformers", MOE_IMPORT_DECODER, 12, rule_switch);
	check_layers("nllb_moe", MOE_IMPORT_ENCODER, 24, rule_nllb);
	check_layers("nllb_moe", MOE_IMPORT_DECODER, 24, rule_nllb);
	check_layers("jamba", MOE_IMPORT_ENCODER, 32, rule_jamba);
	check_layers("llama4_text", MOE_IMPORT_ENCODER, 48, rule_llama4_step2);
	check_layers("ernie4_5_moe", MOE_IMPORT_ENCODER, 28, rule_ernie);
	check_layers("glm4_moe", MOE_IMPORT_ENCODER, 46, rule_glm);
	check_layers("qwen3_moe", MOE_IMPORT_ENCODER, 48, rule_all);
}

/* The decoder stack of the encoder-decoder families uses the decoder names. */
static void test_decoder_stack(void **state)
{
	(void)state;
	struct run r;
	run_import(&r, "tests/import/switch_transformers/config.json", MOE_IMPORT_DECODER);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	assert_non_null(strstr(r.out, "    router: \"decoder.block.{layer}.layer.2.mlp.router."
				      "classifier.weight\"\n"));
	assert_null(strstr(r.out, "encoder.block"));
	run_free(&r);
	run_import(&r, "tests/import/nllb_moe/config.json", MOE_IMPORT_DECODER);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	assert_non_null(strstr(r.out, "    up: \"model.decoder.layers.{layer}.ffn.experts.expert_{"
				      "expert}.fc1.weight\"\n"));
	run_free(&r);
}

/* Bad configs --------------------------------------------------------- */

struct scratch {
	char dir[64];
};

static void scratch_open(struct scratch *s)
{
	snprintf(s->dir, sizeof s->dir, "/tmp/moe_import_XXXXXX");
	assert_non_null(mkdtemp(s->dir));
}

/* Remove the scratch directory and everything in it (flat). */
static void scratch_close(struct scratch *s)
{
	DIR *d = opendir(s->dir);
	assert_non_null(d);
	struct dirent *e;
	char p[512];
	while ((e = readdir(d)))
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
			snprintf(p, sizeof p, "%s/%s", s->dir, e->d_name);
			unlink(p);
		}
	closedir(d);
	rmdir(s->dir);
}

static int scratch_count(struct scratch *s)
{
	DIR *d = opendir(s->dir);
	assert_non_null(d);
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)))
		n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
	closedir(d);
	return n;
}

static void write_text(const char *path, const char *text, size_t len)
{
	FILE *f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(text, 1, len, f), len);
	fclose(f);
}

/* Write FAMILY's fixture with "key" (or "obj.key") set to the JSON text value,
 * or removed when value is NULL, to path. */
static void mutate(const char *family, const char *key, const char *value, const char *path)
{
	char cfg[256];
	fixture_path(cfg, sizeof cfg, family, "config.json");
	char *text = slurp(cfg, NULL);
	assert_non_null(text);
	cJSON *root = cJSON_Parse(text);
	free(text);
	assert_non_null(root);
	cJSON *obj = root;
	char k[128];
	snprintf(k, sizeof k, "%s", key);
	char *dot = strchr(k, '.');
	if (dot) {
		*dot = 0;
		obj = cJSON_GetObjectItemCaseSensitive(root, k);
		assert_non_null(obj);
		memmove(k, dot + 1, strlen(dot + 1) + 1);
	}
	cJSON_DeleteItemFromObjectCaseSensitive(obj, k);
	if (value) {
		cJSON *v = cJSON_Parse(value);
		assert_non_null(v);
		cJSON_AddItemToObject(obj, k, v);
	}
	char *out = cJSON_Print(root);
	write_text(path, out, strlen(out));
	cJSON_free(out);
	cJSON_Delete(root);
}

/* Import path; expect rc, n errors and every one of the NULL-terminated
 * substrings in the diagnostics; nothing may be written. */
static void expect_fail(const char *path, int rc, int n_errors, ...)
{
	struct run r;
	run_import(&r, path, MOE_IMPORT_ENCODER);
	assert_int_equal(r.rc, rc);
	assert_int_equal(r.d.n_errors, n_errors);
	assert_int_equal(r.len, 0);
	va_list ap;
	va_start(ap, n_errors);
	const char *want;
	while ((want = va_arg(ap, const char *))) {
		if (!strstr(r.cap.text, want))
			fprintf(stderr, "wanted '%s' in:\n%s", want, r.cap.text);
		assert_non_null(strstr(r.cap.text, want));
	}
	va_end(ap);
	run_free(&r);
}

static void mutate_fail(const char *family, const char *key, const char *value, const char *want1,
			const char *want2)
{
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	mutate(family, key, value, path);
	expect_fail(path, MOE_EXIT_SPEC, 1, want1, want2, (const char *)NULL);
	scratch_close(&s);
}

static void test_bad_json(void **state)
{
	(void)state;
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	/* the error is on line 3, after "hidden_size": */
	const char *bad = "{\n  \"model_type\": \"mixtral\",\n  \"hidden_size\": ,\n}\n";
	write_text(path, bad, strlen(bad));
	char where[160];
	snprintf(where, sizeof where, "%s:3:", path);
	expect_fail(path, MOE_EXIT_SPEC, 1, where, "malformed JSON", (const char *)NULL);
	write_text(path, "", 0);
	expect_fail(path, MOE_EXIT_SPEC, 1, "malformed JSON", (const char *)NULL);
	write_text(path, "{\"model_type\": \"mixtral\"} trailing", 34);
	expect_fail(path, MOE_EXIT_SPEC, 1, "malformed JSON", (const char *)NULL);
	write_text(path, "{\"a\":\0}", 7);
	expect_fail(path, MOE_EXIT_SPEC, 1, "NUL", (const char *)NULL);
	write_text(path, "[1, 2]", 6);
	expect_fail(path, MOE_EXIT_SPEC, 1, "must be a JSON object, not an array",
		    (const char *)NULL);
	write_text(path, "{\"hidden_size\": 8}", 18);
	expect_fail(path, MOE_EXIT_SPEC, 1, "needs 'model_type'", (const char *)NULL);
	write_text(path, "{\"model_type\": 7}", 17);
	expect_fail(path, MOE_EXIT_SPEC, 1, "'model_type' must be a string, not a number",
		    (const char *)NULL);
	scratch_close(&s);
	expect_fail("tests/import/no_such_family/config.json", MOE_EXIT_IO, 1, "cannot read",
		    (const char *)NULL);
	expect_fail("tests/import", MOE_EXIT_IO, 1, "cannot read", (const char *)NULL);
}

static void test_unknown_type(void **state)
{
	(void)state;
	mutate_fail(
	    "mixtral", "model_type", "\"foo\"", "unsupported model_type 'foo'",
	    "(supported: dbrx, deepseek_v2, deepseek_v3, deepseek_v32, dots1, ernie4_5_moe, "
	    "exaone_moe, flex_olmo, glm4_moe, glm4_moe_lite, gpt_oss, granitemoe, "
	    "granitemoeshared, hunyuan_v1_moe, jamba, jetmoe, llama4, llama4_text, minimax, "
	    "minimax_m2, mixtral, nllb_moe, olmoe, phimoe, qwen2_moe, qwen3_moe, qwen3_next, "
	    "solar_open, switch_transformers)");
	/* MoE types of transformers that are refused name what is missing */
	mutate_fail("mixtral", "model_type", "\"longcat_flash\"",
		    "model_type 'longcat_flash' is not imported: longcat_flash: zero-computation "
		    "(identity) experts are not described",
		    NULL);
	mutate_fail("mixtral", "model_type", "\"deepseek_v4\"",
		    "deepseek_v4: hash routing (experts chosen from the token id) is not described",
		    NULL);
	mutate_fail("mixtral", "model_type", "\"mixtrl\"", "unsupported model_type 'mixtrl'",
		    "did you mean 'mixtral'?");
}

static void test_missing_field(void **state)
{
	(void)state;
	mutate_fail("deepseek_v3", "n_routed_experts", NULL, "deepseek_v3 needs 'n_routed_experts'",
		    "/config.json: deepseek_v3");
	mutate_fail("dbrx", "ffn_config.moe_top_k", NULL, "dbrx needs 'ffn_config.moe_top_k'",
		    NULL);
	mutate_fail("llama4", "text_config", NULL, "llama4 needs 'text_config'", NULL);
	mutate_fail("llama4", "text_config.num_local_experts", NULL,
		    "llama4 needs 'text_config.num_local_experts'", NULL);
	/* null is how transformers writes None: as good as absent */
	mutate_fail("mixtral", "hidden_size", "null", "mixtral needs 'hidden_size'", NULL);
	/* dense layers exist, so their width is required */
	mutate_fail("deepseek_v2", "intermediate_size", NULL,
		    "deepseek_v2 needs 'intermediate_size'", NULL);
}

static void test_wrong_type(void **state)
{
	(void)state;
	mutate_fail("mixtral", "hidden_size", "\"4096\"",
		    "'hidden_size' must be an integer, not a string", NULL);
	mutate_fail("mixtral", "num_local_experts", "8.5",
		    "'num_local_experts' must be an integer >= 1 (got 8.5)", NULL);
	mutate_fail("mixtral", "num_experts_per_tok", "-2",
		    "'num_experts_per_tok' must be an integer >= 1", NULL);
	mutate_fail("qwen3_moe", "norm_topk_prob", "\"yes\"",
		    "'norm_topk_prob' must be a boolean, not a string", NULL);
	mutate_fail("qwen3_moe", "mlp_only_layers", "{}",
		    "'mlp_only_layers' must be a list of layer indices, not an object", NULL);
	mutate_fail("qwen3_moe", "mlp_only_layers", "[3, 48]",
		    "'mlp_only_layers' names layer 48, but the model has 48 layers", NULL);
	mutate_fail("deepseek_v3", "routed_scaling_factor", "[2.5]",
		    "'routed_scaling_factor' must be a number, not an array", NULL);
	mutate_fail("dbrx", "ffn_config", "7", "'ffn_config' must be an object, not a number",
		    NULL);
	mutate_fail("mixtral", "num_hidden_layers", "513", "513 layers exceed", "512");
	mutate_fail("mixtral", "num_experts_per_tok", "9",
		    "top-k (9) exceeds the number of experts (8)", NULL);
}

static void test_unsupported_values(void **state)
{
	(void)state;
	mutate_fail("deepseek_v2", "topk_method", "\"xyz\"",
		    "unsupported topk_method 'xyz' for deepseek_v2",
		    "greedy, group_limited_greedy");
	mutate_fail("deepseek_v3", "topk_method", "\"greedy\"",
		    "unsupported topk_method 'greedy' for deepseek_v3 (supported: noaux_tc)", NULL);
	mutate_fail("deepseek_v3", "scoring_func", "\"sqrtsoftplus\"",
		    "unsupported scoring_func 'sqrtsoftplus'", NULL);
	mutate_fail("mixtral", "hidden_act", "\"abc\"", "unsupported hidden_act 'abc'",
		    "(supported: silu, swish, gelu, gelu_new, gelu_pytorch_tanh, relu)");
	mutate_fail("dbrx", "ffn_config.ffn_act_fn", "{\"name\": \"tanh\"}",
		    "unsupported ffn_config.ffn_act_fn.name 'tanh'", NULL);
	mutate_fail("mixtral", "torch_dtype", "\"int8\"", "unsupported torch_dtype 'int8'", NULL);
	mutate_fail("deepseek_v3", "quantization_config", "{\"quant_method\": \"bitsandbytes\"}",
		    "unsupported quantization_config.quant_method 'bitsandbytes'",
		    "fp8, mxfp4, gptq, awq, compressed-tensors");
	/* int4 checkpoints: what is not 4-bit GPTQ / AWQ gemm / pack-quantized
	 * is refused naming the key and its value */
	mutate_fail("qwen3_moe", "quantization_config",
		    "{\"quant_method\": \"gptq\", \"bits\": 8, \"group_size\": 128}",
		    "unsupported quantization_config.bits 8 for quant_method gptq",
		    "(supported: 4)");
	mutate_fail("mixtral", "quantization_config",
		    "{\"quant_method\": \"awq\", \"bits\": 4, \"version\": \"gemv\"}",
		    "unsupported quantization_config.version 'gemv'", "(supported: gemm)");
	mutate_fail("qwen3_moe", "quantization_config",
		    "{\"quant_method\": \"compressed-tensors\", \"format\": \"int-quantized\"}",
		    "unsupported quantization_config.format 'int-quantized'", "pack-quantized");
	mutate_fail("qwen3_moe", "quantization_config",
		    "{\"quant_method\": \"compressed-tensors\", \"format\": \"pack-quantized\", "
		    "\"config_groups\": {\"g\": {\"targets\": [\"Linear\"], \"weights\": "
		    "{\"num_bits\": 4, \"type\": \"int\", \"strategy\": \"group\", "
		    "\"group_size\": 128}}}, \"ignore\": [\"lm_head\"]}",
		    "'model.layers.0.mlp.gate' (router) is not listed", NULL);
	mutate_fail("deepseek_v3", "n_group", "7", "'n_group' (7) must divide", "(256)");
	mutate_fail("phimoe", "num_experts_per_tok", "3", "sparsemixer",
		    "'num_experts_per_tok' is 3");
	mutate_fail("nllb_moe", "second_expert_policy", "\"sampling\"",
		    "unsupported second_expert_policy 'sampling'", NULL);
	mutate_fail("switch_transformers", "feed_forward_proj", "\"gated-gelu\"",
		    "unsupported feed_forward_proj 'gated-gelu'", NULL);
	mutate_fail("switch_transformers", "num_sparse_encoder_layers", "0",
		    "'num_sparse_encoder_layers' is 0", NULL);
	mutate_fail("ernie4_5_moe", "use_bias", "true", "unsupported use_bias true", NULL);
	mutate_fail("hunyuan_v1_moe", "num_experts", "[16, 16, 8]",
		    "'num_experts' differs between layers (16, 8)", NULL);
	mutate_fail("qwen3_moe", "decoder_sparse_step", "100", "has no MoE layer", NULL);
	mutate_fail("deepseek_v3", "quantization_config",
		    "{\"quant_method\": \"fp8\", \"fmt\": \"e5m2\"}",
		    "unsupported quantization_config.fmt 'e5m2'", "(supported: e4m3)");
	mutate_fail("deepseek_v3", "quantization_config",
		    "{\"quant_method\": \"fp8\", \"weight_block_size\": [128]}",
		    "'quantization_config.weight_block_size' must be a list of two integers", NULL);
	mutate_fail("deepseek_v3", "quantization_config", "{\"quant_method\": \"mxfp4\"}",
		    "unsupported quantization_config.quant_method mxfp4 for deepseek_v3",
		    "(supported for gpt_oss)");
	/* gpt-oss stores gate_up stacked and fused: not an fp8 nn.Linear */
	mutate_fail("gpt_oss", "quantization_config", "{\"quant_method\": \"fp8\"}",
		    "unsupported quantization_config.quant_method fp8 for gpt_oss",
		    "gate_up tensor 'model.layers.{layer}.mlp.experts.gate_up_proj'");
}

/* FAMILY's fixture with several "key": JSON-value edits (value NULL:
 * removed), written to path. */
static void mutate_many(const char *family, const char *const *kv, int n, const char *path)
{
	char cfg[256];
	fixture_path(cfg, sizeof cfg, family, "config.json");
	char *text = slurp(cfg, NULL);
	assert_non_null(text);
	cJSON *root = cJSON_Parse(text);
	free(text);
	assert_non_null(root);
	for (int i = 0; i < n; i++) {
		cJSON_DeleteItemFromObjectCaseSensitive(root, kv[2 * i]);
		if (kv[2 * i + 1]) {
			cJSON *v = cJSON_Parse(kv[2 * i + 1]);
			assert_non_null(v);
			cJSON_AddItemToObject(root, kv[2 * i], v);
		}
	}
	char *out = cJSON_Print(root);
	write_text(path, out, strlen(out));
	cJSON_free(out);
	cJSON_Delete(root);
}

/* Import FAMILY with the edits; expect success and each NULL-terminated
 * substring in the spec. */
static void expect_spec(const char *family, const char *const *kv, int n, ...)
{
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	mutate_many(family, kv, n, path);
	struct run r;
	run_import(&r, path, MOE_IMPORT_ENCODER);
	if (r.rc != MOE_EXIT_OK)
		fprintf(stderr, "%s", r.cap.text);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	/* comments joined back into one line each, so notes match whole */
	char *flat = malloc(r.len + 1);
	assert_non_null(flat);
	size_t o = 0;
	for (size_t i = 0; i < r.len; i++) {
		if (!strncmp(r.out + i, "\n#   ", 5)) {
			flat[o++] = ' ';
			i += 4;
			continue;
		}
		flat[o++] = r.out[i];
	}
	flat[o] = 0;
	va_list ap;
	va_start(ap, n);
	const char *want;
	while ((want = va_arg(ap, const char *))) {
		if (!strstr(flat, want))
			fprintf(stderr, "wanted '%s' in:\n%s", want, flat);
		assert_non_null(strstr(flat, want));
	}
	va_end(ap);
	free(flat);
	run_free(&r);
	scratch_close(&s);
}

/* NLLB's eval capacity (docs/semantics.md): ceil(fraction * T) when the fraction
 * is in (0, 1); expert_capacity when it is <= 0; batch_prioritized_routing
 * orders by the top-1 probability; the weights are normalized after the drop
 * unless normalize_router_prob_before_dropping. fp8 tiles from
 * weight_block_size. */
static void test_capacity_and_quant_variants(void **state)
{
	(void)state;
	const char *prio[] = {"batch_prioritized_routing", "true"};
	expect_spec("nllb_moe-capacity", prio, 1,
		    "capacity: {token_fraction: 0.3, priority: score, overflow: drop, "
		    "normalize_after_drop: true}",
		    "batch_prioritized_routing: tokens by their top-1 probability",
		    (const char *)NULL);
	const char *before[] = {"normalize_router_prob_before_dropping", "true"};
	expect_spec("nllb_moe-capacity", before, 1,
		    "capacity: {token_fraction: 0.3, priority: position, overflow: drop}\n",
		    "normalized before the drop", (const char *)NULL);
	const char *zero[] = {"moe_eval_capacity_token_fraction", "0", "expert_capacity", "32"};
	expect_spec("nllb_moe-capacity", zero, 2,
		    "capacity: {per_expert: 32, priority: position, overflow: drop, "
		    "normalize_after_drop: true}",
		    "C = expert_capacity", (const char *)NULL);
	const char *over[] = {"moe_eval_capacity_token_fraction", "1.5"};
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	mutate_many("nllb_moe-capacity", over, 1, path);
	struct run r;
	run_import(&r, path, MOE_IMPORT_ENCODER);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	assert_null(strstr(r.out, "capacity: {")); /* C >= T: nothing can drop */
	run_free(&r);
	const char *nul[] = {"moe_eval_capacity_token_fraction", "-1", "expert_capacity", "null"};
	mutate_many("nllb_moe-capacity", nul, 2, path);
	expect_fail(path, MOE_EXIT_SPEC, 1,
		    "unsupported moe_eval_capacity_token_fraction -1 with expert_capacity null",
		    (const char *)NULL);
	scratch_close(&s);

	const char *blk[] = {"quantization_config",
			     "{\"quant_method\": \"fp8\", \"weight_block_size\": [64, 32]}"};
	expect_spec("deepseek_v3", blk, 1, "        block: [64, 32]\n",
		    "one f32 scale per [64, 32] tile", (const char *)NULL);
	const char *dflt[] = {"quantization_config", "{\"quant_method\": \"fp8\"}"};
	expect_spec("deepseek_v3", dflt, 1, "        block: [128, 128]\n", (const char *)NULL);
	/* no quantization_config: the plain names, no quant */
	const char *none[] = {"quantization_config", NULL};
	struct scratch t;
	scratch_open(&t);
	snprintf(path, sizeof path, "%s/config.json", t.dir);
	mutate_many("gpt_oss", none, 1, path);
	run_import(&r, path, MOE_IMPORT_ENCODER);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	assert_null(strstr(r.out, "quant"));
	assert_non_null(strstr(r.out, "    gate_up: {fuse: interleave, orient: in_out}\n"));
	assert_non_null(
	    strstr(r.out, "    gate_up: \"model.layers.{layer}.mlp.experts.gate_up_proj\"\n"));
	run_free(&r);
	scratch_close(&t);
}

/* The imported specs resolve to the capacities, output bias and
 * quantizations of docs/semantics.md. */
static struct moe_desc *resolve_fixture(const char *family)
{
	char cfg[256];
	fixture_path(cfg, sizeof cfg, family, "config.json");
	struct run r;
	run_import(&r, cfg, MOE_IMPORT_ENCODER);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	struct capture cap = {{0}, 0};
	struct moe_diag d = {.sink = sink, .ctx = &cap};
	struct moe_spec *s = moe_spec_load_string(cfg, r.out, r.len, &d);
	struct moe_desc *desc = calloc(1, sizeof *desc);
	assert_non_null(desc);
	int rc = s ? moe_spec_check(s, desc, &d) : -1;
	if (rc != 0)
		fprintf(stderr, "%s", cap.text);
	assert_int_equal(rc, 0);
	moe_spec_free(s);
	run_free(&r);
	return desc;
}

static void test_resolved_extensions(void **state)
{
	(void)state;
	/* Hunyuan (transformers 5): w = p / sum of the top-k p, no clamp, no
	 * capacity at inference */
	struct moe_desc *d = resolve_fixture("hunyuan_v1_moe-top2");
	assert_int_equal(d->capacity, MOE_CAPACITY_NONE);
	assert_int_equal(d->norm, MOE_NORM_SUM);
	assert_true(d->norm_min == 0.0f && d->norm_eps == 0.0f);
	free(d);

	/* Switch: expert_capacity by position; transformers 5 zeroes what drops */
	d = resolve_fixture("switch_transformers");
	assert_int_equal(d->capacity, MOE_CAPACITY_PER_EXPERT);
	assert_int_equal(d->capacity_per_expert, 64);
	assert_int_equal(d->priority, MOE_PRIORITY_POSITION);
	assert_int_equal(d->overflow, MOE_OVERFLOW_DROP);
	free(d);

	d = resolve_fixture("nllb_moe-capacity");
	assert_int_equal(d->capacity, MOE_CAPACITY_TOKEN_FRACTION);
	assert_true(d->capacity_token_fraction == 0.3f);
	assert_int_equal(d->capacity_norm_after_drop, 1);
	assert_int_equal(d->capacity_min, 0);
	assert_int_equal(d->overflow, MOE_OVERFLOW_DROP);
	free(d);
	d = resolve_fixture("nllb_moe"); /* fraction 1: no capacity */
	assert_int_equal(d->capacity, MOE_CAPACITY_NONE);
	free(d);

	d = resolve_fixture("jetmoe");
	assert_int_equal(d->output_bias, 1);
	assert_string_equal(d->names[MOE_ROLE_OUTPUT_BIAS], "model.layers.{layer}.mlp.bias");
	assert_int_equal(d->layouts[MOE_ROLE_GATE_UP].fuse, MOE_FUSE_CONCAT);
	assert_int_equal(d->layouts[MOE_ROLE_GATE_UP].orient, MOE_ORIENT_OUT_IN);
	assert_int_equal(d->intermediate, 5632);
	free(d);

	/* DeepSeek-V3: every expert and shared matrix fp8 with [128, 128] tiles,
	 * the scale named X.weight_scale_inv; router and bias unquantized */
	d = resolve_fixture("deepseek_v3");
	static const enum moe_role q8[] = {MOE_ROLE_GATE,      MOE_ROLE_UP,
					   MOE_ROLE_DOWN,      MOE_ROLE_SHARED_GATE,
					   MOE_ROLE_SHARED_UP, MOE_ROLE_SHARED_DOWN};
	for (int i = 0; i < 6; i++) {
		const struct moe_layout *l = &d->layouts[q8[i]];
		assert_int_equal(l->quant, MOE_QUANT_FP8_BLOCK);
		assert_true(l->quant_block[0] == 128 && l->quant_block[1] == 128);
		char want[MOE_NAME_MAX];
		snprintf(want, sizeof want, "%.200s_scale_inv", d->names[q8[i]]);
		assert_string_equal(d->scale_names[q8[i]], want);
	}
	assert_int_equal(d->layouts[MOE_ROLE_ROUTER].quant, MOE_QUANT_NONE);
	assert_int_equal(d->layouts[MOE_ROLE_SELECT_BIAS].quant, MOE_QUANT_NONE);
	assert_int_equal(d->weight_dtype, MOE_DTYPE_BF16);
	free(d);

	/* gpt-oss: MXFP4 blocks, out-major, gate/up interleaved */
	d = resolve_fixture("gpt_oss");
	assert_string_equal(d->names[MOE_ROLE_GATE_UP],
			    "model.layers.{layer}.mlp.experts.gate_up_proj_blocks");
	assert_string_equal(d->scale_names[MOE_ROLE_GATE_UP],
			    "model.layers.{layer}.mlp.experts.gate_up_proj_scales");
	assert_string_equal(d->names[MOE_ROLE_DOWN],
			    "model.layers.{layer}.mlp.experts.down_proj_blocks");
	assert_string_equal(d->scale_names[MOE_ROLE_DOWN],
			    "model.layers.{layer}.mlp.experts.down_proj_scales");
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		int q = r == MOE_ROLE_GATE_UP || r == MOE_ROLE_DOWN;
		assert_int_equal(d->layouts[r].quant, q ? MOE_QUANT_MXFP4 : MOE_QUANT_NONE);
		if (q)
			assert_int_equal(d->layouts[r].orient, MOE_ORIENT_OUT_IN);
	}
	assert_int_equal(d->layouts[MOE_ROLE_GATE_UP].fuse, MOE_FUSE_INTERLEAVE);
	assert_int_equal(d->layouts[MOE_ROLE_GATE_UP_BIAS].fuse, MOE_FUSE_INTERLEAVE);
	free(d);
}

/* The import of a mutated fixture, which must succeed; free with run_free. */
static void import_mutated(struct run *r, const char *family, const char *const *kv, int n)
{
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	mutate_many(family, kv, n, path);
	run_import(r, path, MOE_IMPORT_ENCODER);
	if (r->rc != MOE_EXIT_OK)
		fprintf(stderr, "%s", r->cap.text);
	assert_int_equal(r->rc, MOE_EXIT_OK);
	scratch_close(&s);
}

/* The spec after its comments: the model itself. */
static const char *spec_body(const struct run *r)
{
	const char *b = strstr(r->out, "moegen: 1\n");
	assert_non_null(b);
	return b;
}

/* What transformers 5 writes or does differently from the fixtures' configs. */
static void test_transformers5(void **state)
{
	(void)state;
	struct run r, want;

	/* Hunyuan: the shared MLP exists whatever use_mixed_mlp_moe says, with
	 * the width of intermediate_size; no capacity even at top-4. */
	const char *k4[] = {"moe_topk", "4", "num_experts", "8", "use_mixed_mlp_moe", "false"};
	import_mutated(&r, "hunyuan_v1_moe-top2", k4, 3);
	assert_non_null(strstr(r.out, "\n  top_k: 4\n"));
	assert_non_null(strstr(r.out, "\n  count: 8\n"));
	assert_non_null(strstr(r.out, "normalize: {kind: sum, eps: 0.0, min: 0.0}\n"));
	assert_null(strstr(r.out, "\n  capacity:"));
	assert_non_null(strstr(r.out, "shared_experts:\n  count: 1\n  intermediate: 2048\n"));
	assert_non_null(strstr(
	    r.out, "    shared_down: \"model.layers.{layer}.mlp.shared_mlp.down_proj.weight\"\n"));
	run_free(&r);

	/* qwen3_moe and qwen2_moe: num_local_experts is the same count. */
	static const char *const qwen[] = {"qwen3_moe", "qwen2_moe"};
	for (int i = 0; i < 2; i++) {
		char cfg[256];
		fixture_path(cfg, sizeof cfg, qwen[i], "config.json");
		run_import(&want, cfg, MOE_IMPORT_ENCODER);
		assert_int_equal(want.rc, MOE_EXIT_OK);
		const char *local[] = {"num_experts", NULL, "num_local_experts", "96"};
		import_mutated(&r, qwen[i], local, 2);
		assert_non_null(strstr(r.out, "\n  count: 96\n"));
		assert_null(strstr(want.out, "\n  count: 96\n"));
		run_free(&r);
		/* renamed with its value kept: the same spec */
		cJSON *root = NULL;
		char *text = slurp(cfg, NULL);
		assert_non_null(text);
		root = cJSON_Parse(text);
		free(text);
		assert_non_null(root);
		char n[32];
		snprintf(n, sizeof n, "%d",
			 cJSON_GetObjectItemCaseSensitive(root, "num_experts")->valueint);
		cJSON_Delete(root);
		const char *same[] = {"num_experts", NULL, "num_local_experts", n};
		import_mutated(&r, qwen[i], same, 2);
		assert_string_equal(spec_body(&r), spec_body(&want));
		run_free(&r);
		run_free(&want);
	}

	/* NllbMoeConfig saves model_type "nllb-moe": the nllb_moe import. */
	char cfg[256];
	fixture_path(cfg, sizeof cfg, "nllb_moe", "config.json");
	run_import(&want, cfg, MOE_IMPORT_ENCODER);
	assert_int_equal(want.rc, MOE_EXIT_OK);
	const char *hyphen[] = {"model_type", "\"nllb-moe\""};
	import_mutated(&r, "nllb_moe", hyphen, 1);
	assert_string_equal(spec_body(&r), spec_body(&want));
	run_free(&r);
	run_free(&want);
}

/* A per-layer list with one value is the same model as the scalar. */
static void test_uniform_list(void **state)
{
	(void)state;
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	mutate("hunyuan_v1_moe", "num_experts", "[16, 16, 16]", path);
	struct run r;
	run_import(&r, path, MOE_IMPORT_ENCODER);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	assert_non_null(strstr(r.out, "\n  count: 16\n"));
	run_free(&r);
	scratch_close(&s);
}

/* Every error of a config is reported, not just the first. */
static void test_all_errors(void **state)
{
	(void)state;
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	const char *text = "{\"model_type\": \"mixtral\", \"hidden_size\": \"x\", "
			   "\"num_hidden_layers\": 4, \"num_experts_per_tok\": 2, "
			   "\"intermediate_size\": 64, \"hidden_act\": \"abc\"}";
	write_text(path, text, strlen(text));
	expect_fail(path, MOE_EXIT_SPEC, 3, "'hidden_size' must be an integer",
		    "needs 'num_local_experts'", "unsupported hidden_act 'abc'",
		    (const char *)NULL);
	scratch_close(&s);
}

/* A minimal config: defaults of the transformers config class fill the rest. */
static void test_minimal_defaults(void **state)
{
	(void)state;
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	const char *text = "{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, "
			   "\"num_hidden_layers\": 5, \"n_routed_experts\": 16, "
			   "\"num_experts_per_tok\": 4, \"moe_intermediate_size\": 32, "
			   "\"intermediate_size\": 128}";
	write_text(path, text, strlen(text));
	struct run r;
	run_import(&r, path, MOE_IMPORT_ENCODER);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	/* DeepseekV3Config defaults: first_k_dense_replace 3, n_group 8, topk_group 4,
	 * routed_scaling_factor 2.5, norm_topk_prob true, one shared expert */
	assert_non_null(strstr(r.out, "\n  moe_layers: [3, 4]\n"));
	assert_non_null(strstr(r.out, "\n  groups: {count: 8, top: 4, score: sum_top2}\n"));
	assert_non_null(strstr(r.out, "\n  scale: 2.5\n"));
	assert_non_null(strstr(r.out, "\n  normalize: {kind: sum, eps: 1.0e-20, min: 0.0}\n"));
	assert_non_null(strstr(r.out, "shared_experts:\n  count: 1\n  intermediate: 32\n"));
	/* no torch_dtype: f32, said in a comment */
	assert_non_null(strstr(r.out, "dtype: {weights: f32,"));
	assert_non_null(strstr(r.out, "# The config states no torch_dtype"));
	/* the name falls back to the model_type */
	assert_non_null(strstr(r.out, "\nname: \"deepseek_v3\"\n"));
	run_free(&r);
	scratch_close(&s);
}

/* The command --------------------------------------------------------- */

static int cmd(int argc, ...)
{
	char *argv[16];
	va_list ap;
	va_start(ap, argc);
	for (int i = 0; i < argc; i++)
		argv[i] = va_arg(ap, char *);
	va_end(ap);
	argv[argc] = NULL;
	return moe_cmd_import(argc, argv);
}

static void test_cmd(void **state)
{
	(void)state;
	struct scratch s;
	scratch_open(&s);
	char out[128];
	snprintf(out, sizeof out, "%s/spec.yaml", s.dir);

	/* -o writes the same bytes as the golden, and nothing else is left */
	assert_int_equal(cmd(4, "import", "tests/import/mixtral/config.json", "-o", out),
			 MOE_EXIT_OK);
	size_t n1 = 0, n2 = 0;
	char *got = slurp(out, &n1);
	char *want = slurp("tests/import/mixtral/expected.yaml", &n2);
	assert_non_null(got);
	assert_non_null(want);
	assert_int_equal(n1, n2);
	assert_memory_equal(got, want, n1);
	free(got);
	assert_int_equal(scratch_count(&s), 1);
	struct stat st;
	assert_int_equal(stat(out, &st), 0);
	assert_true(st.st_mode & S_IRUSR);

	/* a failed import keeps the old file intact and leaves no temporary */
	struct scratch bad;
	scratch_open(&bad);
	char badcfg[128];
	snprintf(badcfg, sizeof badcfg, "%s/config.json", bad.dir);
	mutate("ernie4_5_moe", "use_bias", "true", badcfg);
	assert_int_equal(cmd(4, "import", badcfg, "-o", out), MOE_EXIT_SPEC);
	scratch_close(&bad);
	got = slurp(out, &n1);
	assert_int_equal(n1, n2);
	assert_memory_equal(got, want, n1);
	free(got);
	assert_int_equal(scratch_count(&s), 1);
	free(want);

	/* a failed import into a new name creates nothing */
	char other[128];
	snprintf(other, sizeof other, "%s/other.yaml", s.dir);
	assert_int_equal(cmd(4, "import", "tests/import/none/config.json", "-o", other),
			 MOE_EXIT_IO);
	assert_int_equal(scratch_count(&s), 1);

	/* --decoder */
	assert_int_equal(
	    cmd(5, "import", "--decoder", "tests/import/nllb_moe/config.json", "-o", other),
	    MOE_EXIT_OK);
	got = slurp(other, NULL);
	assert_non_null(strstr(got, "model.decoder.layers.{layer}"));
	free(got);

	/* an unwritable destination */
	char nodir[160];
	snprintf(nodir, sizeof nodir, "%s/missing/spec.yaml", s.dir);
	assert_int_equal(cmd(4, "import", "tests/import/mixtral/config.json", "-o", nodir),
			 MOE_EXIT_IO);
	scratch_close(&s);

	/* usage */
	assert_int_equal(cmd(1, "import"), MOE_EXIT_USAGE);
	assert_int_equal(cmd(3, "import", "a.json", "b.json"), MOE_EXIT_USAGE);
	assert_int_equal(cmd(3, "import", "a.json", "--bogus"), MOE_EXIT_USAGE);
	assert_int_equal(cmd(3, "import", "a.json", "-o"), MOE_EXIT_USAGE);
	assert_int_equal(cmd(6, "import", "a.json", "-o", "x", "-o", "y"), MOE_EXIT_USAGE);
	assert_int_equal(cmd(2, "import", "--help"), MOE_EXIT_OK);
}

/* Imported specs validate, and resolve to the family's numbers ------------- */

struct resolved {
	const char *family;
	uint32_t n_moe_layers, n_experts, top_k, shared_width;
	enum moe_mode mode;
	enum moe_score score;
	enum moe_norm norm;
	float scale;
	int select_bias, router_bias, groups;
	enum moe_apply apply_to;
};

/* From docs/semantics.md and the fixtures, independently of the importer. */
static const struct resolved resolved[] = {
    {"dbrx", 40, 16, 4, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_LP, 1.0f, 0, 0, 1,
     MOE_APPLY_OUTPUT},
    {"deepseek_v2", 26, 64, 6, 2 * 1408, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_NONE,
     1.0f, 0, 0, 1, MOE_APPLY_OUTPUT},
    {"deepseek_v3", 58, 256, 8, 2048, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SIGMOID, MOE_NORM_SUM, 2.5f,
     1, 0, 8, MOE_APPLY_OUTPUT},
    {"dots1", 61, 128, 6, 2 * 1408, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SIGMOID, MOE_NORM_SUM, 2.5f, 1,
     0, 1, MOE_APPLY_OUTPUT},
    {"ernie4_5_moe", 27, 64, 6, 2 * 1536, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM,
     1.0f, 1, 0, 1, MOE_APPLY_OUTPUT},
    {"flex_olmo", 32, 7, 5, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_NONE, 1.0f, 0, 0,
     1, MOE_APPLY_OUTPUT},
    {"glm4_moe", 45, 128, 8, 1408, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SIGMOID, MOE_NORM_SUM, 1.0f, 1,
     0, 1, MOE_APPLY_OUTPUT},
    {"gpt_oss", 24, 32, 4, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM, 1.0f, 0, 1, 1,
     MOE_APPLY_OUTPUT},
    {"granitemoe", 32, 40, 8, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM, 1.0f, 0, 0,
     1, MOE_APPLY_OUTPUT},
    {"granitemoeshared", 24, 40, 8, 1024, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM,
     1.0f, 0, 0, 1, MOE_APPLY_OUTPUT},
    {"hunyuan_v1_moe", 64, 16, 1, 18304, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM,
     1.0f, 0, 0, 1, MOE_APPLY_OUTPUT},
    {"hunyuan_v1_moe-top2", 4, 16, 2, 2048, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM,
     1.0f, 0, 0, 1, MOE_APPLY_OUTPUT},
    {"jamba", 16, 16, 2, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_NONE, 1.0f, 0, 0, 1,
     MOE_APPLY_OUTPUT},
    {"jetmoe", 24, 8, 2, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM, 1.0f, 0, 0, 1,
     MOE_APPLY_OUTPUT},
    {"llama4", 48, 16, 1, 8192, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SIGMOID, MOE_NORM_NONE, 1.0f, 0, 0,
     1, MOE_APPLY_INPUT},
    {"llama4_text", 24, 128, 1, 8192, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SIGMOID, MOE_NORM_NONE, 1.0f,
     0, 0, 1, MOE_APPLY_INPUT},
    {"minimax", 80, 32, 2, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM, 1.0f, 0, 0, 1,
     MOE_APPLY_OUTPUT},
    {"minimax_m2", 62, 256, 8, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SIGMOID, MOE_NORM_SUM, 1.0f, 1,
     0, 1, MOE_APPLY_OUTPUT},
    {"mixtral", 32, 8, 2, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM, 1.0f, 0, 0, 1,
     MOE_APPLY_OUTPUT},
    {"nllb_moe", 6, 128, 2, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM, 0.8f, 0, 0,
     1, MOE_APPLY_OUTPUT},
    {"nllb_moe-capacity", 6, 128, 2, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM,
     0.8f, 0, 0, 1, MOE_APPLY_OUTPUT},
    {"olmoe", 16, 64, 8, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_NONE, 1.0f, 0, 0, 1,
     MOE_APPLY_OUTPUT},
    {"phimoe", 32, 16, 2, 0, MOE_MODE_SPARSEMIXER, MOE_SCORE_SOFTMAX, MOE_NORM_NONE, 1.0f, 0, 0, 1,
     MOE_APPLY_OUTPUT},
    {"qwen2_moe", 24, 60, 4, 5632, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_NONE, 1.0f, 0,
     0, 1, MOE_APPLY_OUTPUT},
    {"qwen3_moe", 48, 128, 8, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM, 1.0f, 0, 0,
     1, MOE_APPLY_OUTPUT},
    {"qwen3_next", 48, 512, 10, 512, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_SUM, 1.0f,
     0, 0, 1, MOE_APPLY_OUTPUT},
    {"switch_transformers", 6, 8, 1, 0, MOE_MODE_TOKEN_CHOICE, MOE_SCORE_SOFTMAX, MOE_NORM_NONE,
     1.0f, 0, 0, 1, MOE_APPLY_OUTPUT},
};

static void test_validates(void **state)
{
	(void)state;
	_Static_assert(sizeof resolved / sizeof *resolved == N_GOLDENS, "one row per golden");
	for (int i = 0; i < N_GOLDENS; i++) {
		const struct resolved *w = &resolved[i];
		char cfg[256];
		fixture_path(cfg, sizeof cfg, w->family, "config.json");
		struct run r;
		run_import(&r, cfg, MOE_IMPORT_ENCODER);
		assert_int_equal(r.rc, MOE_EXIT_OK);
		struct capture cap = {{0}, 0};
		struct moe_diag d = {.sink = sink, .ctx = &cap};
		struct moe_spec *s = moe_spec_load_string(cfg, r.out, r.len, &d);
		struct moe_desc *desc = calloc(1, sizeof *desc);
		assert_non_null(desc);
		int rc = s ? moe_spec_check(s, desc, &d) : -1;
		if (rc != 0)
			fprintf(stderr, "%s: the imported spec does not validate:\n%s", w->family,
				cap.text);
		assert_int_equal(rc, 0);
		assert_int_equal(d.n_errors, 0);
		assert_int_equal(desc->n_moe_layers, w->n_moe_layers);
		assert_int_equal(desc->n_experts, w->n_experts);
		assert_int_equal(desc->top_k, w->top_k);
		assert_int_equal(moe_desc_shared_width(desc), w->shared_width);
		assert_int_equal(desc->mode, w->mode);
		assert_int_equal(desc->score, w->score);
		assert_int_equal(desc->norm, w->norm);
		assert_true(fabsf(desc->scale - w->scale) <= 1e-6f);
		assert_int_equal(desc->select_bias, w->select_bias);
		assert_int_equal(desc->router_bias, w->router_bias);
		assert_int_equal(desc->n_groups <= 1 ? 1 : desc->n_groups, w->groups);
		assert_int_equal(desc->apply_to, w->apply_to);
		free(desc);
		moe_spec_free(s);
		run_free(&r);
	}
}

/* Self-validation -------------------------------------------------------- */

/* Well-formed UTF-8 throughout (no overlongs, surrogates or stray bytes). */
static int valid_utf8(const char *p, size_t n)
{
	const unsigned char *s = (const unsigned char *)p;
	for (size_t i = 0; i < n;) {
		unsigned c = s[i];
		size_t k = c < 0x80         ? 1
			   : (c >> 5) == 6  ? 2
			   : (c >> 4) == 14 ? 3
			   : (c >> 3) == 30 ? 4
					    : 0;
		if (!k || i + k > n || (k == 2 && c < 0xc2))
			return 0;
		uint32_t cp = k == 1 ? c : c & (0x7fu >> k);
		for (size_t j = 1; j < k; j++) {
			if ((s[i + j] & 0xc0) != 0x80)
				return 0;
			cp = cp << 6 | (s[i + j] & 0x3f);
		}
		if ((k == 3 && cp < 0x800) || (k == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
		    (cp >= 0xd800 && cp <= 0xdfff))
			return 0;
		i += k;
	}
	return 1;
}

/* The imported text loads and checks as `moegen check` would. */
static void assert_checks(const char *text, size_t len, const char *what)
{
	struct capture cap = {0};
	struct moe_diag d = {.sink = sink, .ctx = &cap};
	struct moe_spec *s = moe_spec_load_string("imported.yaml", text, len, &d);
	struct moe_desc *desc = calloc(1, sizeof *desc);
	assert_non_null(desc);
	if (s)
		moe_spec_check(s, desc, &d);
	if (!s || d.n_errors)
		fail_msg("%s imported, but its spec does not check:\n%s\n%s", what, cap.text, text);
	moe_spec_free(s);
	free(desc);
}

/* The importer refuses, naming the config file and key, and writes nothing. */
static void expect_refused(const char *family, const char *key, const char *value,
			   const char *want1, const char *want2)
{
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	mutate(family, key, value, path);
	struct run r;
	run_import(&r, path, MOE_IMPORT_ENCODER);
	if (r.rc != MOE_EXIT_SPEC || !strstr(r.cap.text, want1) ||
	    (want2 && !strstr(r.cap.text, want2)))
		fail_msg("%s with %s = %s: rc %d, wanted '%s' and '%s' in:\n%s", family, key, value,
			 r.rc, want1, want2 ? want2 : "", r.cap.text);
	assert_true(r.d.n_errors >= 1);
	assert_int_equal(r.len, 0);
	assert_non_null(strstr(r.cap.text, "does not pass `moegen check`"));
	run_free(&r);
	scratch_close(&s);
}

/* What the checker refuses, the importer refuses, located at the config key. */
static void test_self_check(void **state)
{
	(void)state;
	expect_refused("mixtral", "num_key_value_heads", "3",
		       "config.json: num_key_value_heads: model.attention.kv_heads (3) must divide",
		       NULL);
	expect_refused("ernie4_5_moe", "moe_norm_min", "2.0",
		       "config.json: moe_norm_min: router.normalize.min", "at most 1");
	expect_refused("mixtral", "hidden_size", "16777216",
		       "config.json: hidden_size: model.hidden", "too large");
	expect_refused("gpt_oss", "hidden_size", "2890",
		       "config.json: quantization_config:", "not a multiple of 32");
	expect_refused("qwen3_moe", "num_experts", "16777217", "config.json: num_experts:", NULL);
}

/* Every string is written quoted: a name that sanitizes to "-" stays a
 * string; a path that is not UTF-8 never reaches the spec raw. */
static void test_quoting(void **state)
{
	(void)state;
	struct scratch s;
	scratch_open(&s);
	char path[256];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	mutate("mixtral", "_name_or_path", "\"org/?\"", path);
	struct run r;
	run_import(&r, path, MOE_IMPORT_ENCODER);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	assert_non_null(strstr(r.out, "\nname: \"-\"\n"));
	assert_checks(r.out, r.len, "a name of '-'");
	run_free(&r);

	char odd[160];
	snprintf(odd, sizeof odd, "%s/bad\xff\xfe\xc3(dir", s.dir);
	assert_int_equal(mkdir(odd, 0700), 0);
	snprintf(path, sizeof path, "%s/config.json", odd);
	mutate("mixtral", "num_local_experts", "8", path);
	run_import(&r, path, MOE_IMPORT_ENCODER);
	assert_int_equal(r.rc, MOE_EXIT_OK);
	assert_true(valid_utf8(r.out, r.len));
	assert_non_null(strstr(r.out, "bad??"
				      "?(dir/config.json"));
	assert_checks(r.out, r.len, "a path that is not UTF-8");
	run_free(&r);
	unlink(path);
	rmdir(odd);
	scratch_close(&s);
}

static uint64_t rng_next(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static void collect(cJSON *o, cJSON **out, int *n, int cap)
{
	cJSON *e;
	cJSON_ArrayForEach(e, o)
	{
		if (*n < cap)
			out[(*n)++] = e;
		if (cJSON_IsObject(e) || cJSON_IsArray(e))
			collect(e, out, n, cap);
	}
}

/* Property: any config that imports yields a spec that checks. Every
 * fixture, mutated many times from a fixed seed: numbers replaced by edge
 * values, strings by odd ones, booleans flipped, keys removed. */
static void test_property_imports_check(void **state)
{
	(void)state;
	static const double nums[] = {0,    1,     2,     3,     5,      7,    31,   32,
				      33,   64,    96,    1000,  4097,   1e5,  1e6,  16777216,
				      -1,   0.5,   1.5,   2.0,   1e-12,  1e30, 2881, 65537,
				      1e20, 0.999, 1e-30, -1e30, 1048577};
	static const char *const strs[] = {"",     "-",          "silu", "gelu", "\xff\xfe",
					   "a: b", "[x]",        "null", "relu", "gelu_new",
					   "yes",  "org/\xc3(x", "true", "1",    "bfloat16",
					   "fp8",  "mxfp4",      "{}",   "\"q\""};
	uint64_t seed = 0x9e3779b97f4a7c15ull;
	struct scratch s;
	scratch_open(&s);
	char path[160];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	int ok = 0, refused = 0;
	for (int f = 0; f < N_GOLDENS; f++) {
		char cfg[256];
		fixture_path(cfg, sizeof cfg, goldens[f], "config.json");
		char *text = slurp(cfg, NULL);
		assert_non_null(text);
		for (int round = 0; round < 60; round++) {
			cJSON *root = cJSON_Parse(text);
			assert_non_null(root);
			cJSON *items[512];
			int n = 0;
			collect(root, items, &n, 512);
			int changes = 1 + (int)(rng_next(&seed) % 3);
			for (int c = 0; c < changes && n; c++) {
				cJSON *it = items[rng_next(&seed) % (uint64_t)n];
				uint64_t r = rng_next(&seed);
				if (cJSON_IsNumber(it)) {
					double v =
					    r % 4 ? nums[(r >> 8) % (sizeof nums / sizeof *nums)]
						  : (double)((r >> 8) % 5000);
					cJSON_SetNumberValue(it, v);
				} else if (cJSON_IsString(it)) {
					cJSON_SetValuestring(
					    it, strs[(r >> 8) % (sizeof strs / sizeof *strs)]);
				} else if (cJSON_IsBool(it)) {
					it->type = cJSON_IsTrue(it) ? cJSON_False : cJSON_True;
				} else if (cJSON_IsNull(it)) {
					it->type = cJSON_Number;
					cJSON_SetNumberValue(it, (double)(r % 64));
				}
			}
			if (rng_next(&seed) % 5 == 0 && n) { /* remove a top-level key */
				int k = (int)(rng_next(&seed) % (uint64_t)cJSON_GetArraySize(root));
				cJSON_DeleteItemFromArray(root, k);
			}
			char *out = cJSON_Print(root);
			write_text(path, out, strlen(out));
			cJSON_free(out);
			cJSON_Delete(root);
			for (int st = 0; st < 2; st++) {
				struct run r;
				run_import(&r, path, st ? MOE_IMPORT_DECODER : MOE_IMPORT_ENCODER);
				if (r.rc == MOE_EXIT_OK) {
					char what[300];
					snprintf(what, sizeof what, "%s round %d", goldens[f],
						 round);
					assert_true(valid_utf8(r.out, r.len));
					assert_checks(r.out, r.len, what);
					ok++;
				} else {
					assert_int_equal(r.rc, MOE_EXIT_SPEC);
					assert_int_equal(r.len, 0);
					refused++;
				}
				run_free(&r);
			}
		}
		free(text);
	}
	/* the mutations reach both sides */
	assert_true(ok > 100);
	assert_true(refused > 100);
	scratch_close(&s);
}

/* Bad configs of the six families added last: every error of a config is
 * reported at once, each naming its key; contradictory sizes are refused;
 * nothing is written and nothing crashes. */
static void test_new_family_errors(void **state)
{
	(void)state;
	struct scratch s;
	scratch_open(&s);
	char path[128];
	snprintf(path, sizeof path, "%s/config.json", s.dir);
	const char *m2 = "{\"model_type\": \"minimax_m2\", \"hidden_size\": 64, "
			 "\"num_hidden_layers\": 2, \"num_experts_per_tok\": \"two\", "
			 "\"intermediate_size\": 32, \"hidden_act\": \"tanh\", "
			 "\"scoring_func\": \"softmax\"}";
	write_text(path, m2, strlen(m2));
	expect_fail(path, MOE_EXIT_SPEC, 4, "needs 'num_local_experts'",
		    "'num_experts_per_tok' must be an integer", "unsupported hidden_act 'tanh'",
		    "unsupported scoring_func 'softmax' for minimax_m2 (supported: sigmoid)",
		    (const char *)NULL);
	const char *dots = "{\"model_type\": \"dots1\", \"hidden_size\": 64, "
			   "\"num_hidden_layers\": 3, \"n_routed_experts\": 8, "
			   "\"num_experts_per_tok\": 2, \"first_k_dense_replace\": 1, "
			   "\"norm_topk_prob\": \"yes\"}";
	write_text(path, dots, strlen(dots));
	expect_fail(path, MOE_EXIT_SPEC, 4, "needs 'moe_intermediate_size'",
		    "needs 'intermediate_size'", "needs 'n_shared_experts'",
		    "'norm_topk_prob' must be a boolean", (const char *)NULL);
	const char *gms = "{\"model_type\": \"granitemoeshared\", \"hidden_size\": 64, "
			  "\"num_hidden_layers\": 2, \"num_local_experts\": 8, "
			  "\"num_experts_per_tok\": 2, \"intermediate_size\": 32, "
			  "\"shared_intermediate_size\": -4, \"hidden_act\": \"gelu_fast\"}";
	write_text(path, gms, strlen(gms));
	expect_fail(path, MOE_EXIT_SPEC, 2, "'shared_intermediate_size' must be an integer >= 0",
		    "unsupported hidden_act 'gelu_fast'", (const char *)NULL);
	const char *qn =
	    "{\"model_type\": \"qwen3_next\", \"hidden_size\": 64, "
	    "\"num_hidden_layers\": 2, \"num_experts\": 8, \"num_experts_per_tok\": 2, "
	    "\"mlp_only_layers\": [5], \"hidden_act\": \"silu\"}";
	write_text(path, qn, strlen(qn));
	expect_fail(path, MOE_EXIT_SPEC, 3, "needs 'moe_intermediate_size'",
		    "needs 'shared_expert_intermediate_size'",
		    "'mlp_only_layers' names layer 5, but the model has 2 layers",
		    (const char *)NULL);
	scratch_close(&s);
	/* contradictory sizes */
	mutate_fail("minimax_m2", "num_experts_per_tok", "300",
		    "top-k (300) exceeds the number of experts (256)", NULL);
	mutate_fail("dots1", "n_group", "3",
		    "'n_group' (3) must divide the number of experts (128)", NULL);
	mutate_fail("flex_olmo", "num_experts_per_tok", "8",
		    "top-k (8) exceeds the number of experts (7)", NULL);
	/* The cross-key checks are reported beside the other errors, each
	 * naming its keys (not only when nothing else is wrong). */
	char *text = slurp("tests/import/dots1/config.json", NULL);
	assert_non_null(text);
	cJSON *root = cJSON_Parse(text);
	free(text);
	assert_non_null(root);
	cJSON_ReplaceItemInObject(root, "n_group", cJSON_CreateNumber(3));
	cJSON_ReplaceItemInObject(root, "num_experts_per_tok", cJSON_CreateNumber(500));
	cJSON_ReplaceItemInObject(root, "hidden_act", cJSON_CreateString("tanh"));
	cJSON_ReplaceItemInObject(root, "num_attention_heads", cJSON_CreateString("32"));
	char *out = cJSON_Print(root);
	struct scratch s2;
	scratch_open(&s2);
	char p2[128];
	snprintf(p2, sizeof p2, "%s/config.json", s2.dir);
	write_text(p2, out, strlen(out));
	expect_fail(p2, MOE_EXIT_SPEC, 4, "unsupported hidden_act 'tanh'",
		    "'num_attention_heads' must be an integer, not a string",
		    "'n_group' (3) must divide the number of experts (128)",
		    "top-k (500) exceeds the number of experts (128): 'num_experts_per_tok' "
		    "against 'n_routed_experts'",
		    (const char *)NULL);
	/* a placeholder expert count is not compared */
	cJSON_ReplaceItemInObject(root, "n_routed_experts", cJSON_CreateString("128"));
	free(out);
	out = cJSON_Print(root);
	write_text(p2, out, strlen(out));
	expect_fail(p2, MOE_EXIT_SPEC, 3, "'n_routed_experts' must be an integer",
		    (const char *)NULL);
	free(out);
	cJSON_Delete(root);
	scratch_close(&s2);
	expect_refused("qwen3_next", "num_key_value_heads", "3",
		       "config.json: num_key_value_heads: model.attention.kv_heads (3) must divide",
		       NULL);
	expect_refused("minimax", "head_dim", "100000",
		       "config.json: head_dim: model.attention.head_dim", NULL);
}

/* Published sizes, reproduced by `moegen info` on the imported fixtures
 * (docs/models.md: the table and each source) within 1%, or within the
 * rounding of a figure quoted to whole billions (DeepSeek-V3's "37B" is any
 * of 36.5B..37.5B). The convention of "active" is the vendor's: with both
 * embedding tables (no_embed 0), without the input one (1) or without both
 * (2, MiniMax-01). */
static const struct {
	const char *family;
	double total, active; /* active 0: not checked (see docs/models.md) */
	int no_embed;
} published[] = {
    {"mixtral", 46.7e9, 12.9e9, 0},   {"qwen2_moe", 14.3e9, 0, 0},
    {"qwen3_moe", 30.5e9, 0, 0},      {"olmoe", 6.9e9, 0, 0},
    {"deepseek_v2", 15.7e9, 0, 1},    {"deepseek_v3", 671e9, 37e9, 1},
    {"dbrx", 132e9, 36e9, 0},         {"gpt_oss", 20.9e9, 3.6e9, 1},
    {"phimoe", 41.9e9, 6.6e9, 0},     {"llama4_text", 400e9, 17e9, 0},
    {"glm4_moe", 106e9, 0, 0},        {"granitemoe", 3.3e9, 0, 0},
    {"dots1", 142e9, 14e9, 0},        {"minimax_m2", 230e9, 0, 0},
    {"qwen3_next", 80e9, 0, 0},       {"minimax", 456e9, 45.9e9, 2},
    {"deepseek_v32", 671e9, 37e9, 1},
};

static void test_published_sizes(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof published / sizeof *published; i++) {
		char cfg[256];
		fixture_path(cfg, sizeof cfg, published[i].family, "config.json");
		struct run r;
		run_import(&r, cfg, MOE_IMPORT_ENCODER);
		assert_int_equal(r.rc, MOE_EXIT_OK);
		struct moe_diag d = {0};
		struct moe_spec *sp = moe_spec_load_string(cfg, r.out, r.len, &d);
		struct moe_desc *desc = calloc(1, sizeof *desc);
		assert_non_null(sp);
		assert_non_null(desc);
		assert_int_equal(moe_spec_check(sp, desc, &d), 0);
		struct moe_counts c;
		moe_info_count(desc, &c);
		double dt = c.total / published[i].total - 1;
		double act = published[i].no_embed == 2   ? c.active - c.embedding
			     : published[i].no_embed == 1 ? c.active_no_embed_in
							  : c.active;
		double da = published[i].active ? act / published[i].active - 1 : 0;
		double ta =
		    published[i].active >= 10e9 ? fmax(0.01, 0.5e9 / published[i].active) : 0.01;
		if (fabs(dt) > 0.01 || fabs(da) > ta)
			fail_msg("%s: total %.0f (%+.2f%%), active %.0f (%+.2f%%)",
				 published[i].family, c.total, 100 * dt, act, 100 * da);
		free(desc);
		moe_spec_free(sp);
		run_free(&r);
	}
}

/* import --card: the family, the semantics chosen (the spec's notes and the
 * resolved router), the same counts as `moegen info`, bytes by format. */
static void test_card(void **state)
{
	(void)state;
	const char *cfg = "tests/import/dots1/config.json";
	char *text = NULL;
	size_t len = 0;
	FILE *mem = open_memstream(&text, &len);
	assert_non_null(mem);
	struct moe_diag d = {0};
	struct moe_import_opts o = {MOE_IMPORT_ENCODER};
	assert_int_equal(moe_import_card(cfg, &o, mem, &d), MOE_EXIT_OK);
	fclose(mem);
	cJSON *card = cJSON_Parse(text);
	assert_non_null(card);
	assert_string_equal(cJSON_GetObjectItem(card, "family")->valuestring, "dots1");
	assert_null(cJSON_GetObjectItem(card, "stack"));
	const cJSON *notes = cJSON_GetObjectItem(card, "notes");
	assert_true(cJSON_GetArraySize(notes) >= 2);
	assert_non_null(strstr(cJSON_GetArrayItem(notes, 0)->valuestring, "sigmoid"));
	const cJSON *sem = cJSON_GetObjectItem(card, "semantics");
	assert_string_equal(cJSON_GetObjectItem(sem, "score")->valuestring, "sigmoid");
	assert_true(cJSON_IsTrue(cJSON_GetObjectItem(sem, "select_bias")));
	assert_true(cJSON_GetObjectItem(sem, "scale")->valuedouble == 2.5);
	assert_string_equal(
	    cJSON_GetObjectItem(cJSON_GetObjectItem(sem, "normalize"), "kind")->valuestring, "sum");

	/* the counts are moe_info_count's on the imported spec */
	struct run r;
	run_import(&r, cfg, MOE_IMPORT_ENCODER);
	struct moe_spec *sp = moe_spec_load_string(cfg, r.out, r.len, &d);
	struct moe_desc *desc = calloc(1, sizeof *desc);
	assert_non_null(desc);
	assert_int_equal(moe_spec_check(sp, desc, &d), 0);
	struct moe_counts c;
	moe_info_count(desc, &c);
	const cJSON *p = cJSON_GetObjectItem(card, "parameters");
	const cJSON *all = cJSON_GetObjectItem(p, "all");
	assert_true(cJSON_GetObjectItem(all, "total")->valuedouble == c.total);
	assert_true(cJSON_GetObjectItem(all, "active")->valuedouble == c.active);
	const cJSON *t = cJSON_GetObjectItem(card, "per_token");
	const cJSON *f = cJSON_GetObjectItem(t, "moe_weight_bytes_by_format");
	double bf16 = cJSON_GetObjectItem(f, "bf16")->valuedouble;
	assert_true(bf16 == c.weight_bytes_per_token); /* the fixture's weights are bf16 */
	assert_true(cJSON_GetObjectItem(f, "f32")->valuedouble == 2 * bf16);
	double fp8 = cJSON_GetObjectItem(f, "fp8_block")->valuedouble;
	assert_true(fp8 > bf16 / 2 && fp8 < bf16 / 2 * 1.001);
	assert_true(cJSON_GetObjectItem(f, "mxfp4")->valuedouble < fp8);
	free(desc);
	moe_spec_free(sp);
	run_free(&r);
	cJSON_Delete(card);
	free(text);

	/* an encoder-decoder card says which stack; a bad config gives no card */
	mem = open_memstream(&text, &len);
	o.stack = MOE_IMPORT_DECODER;
	assert_int_equal(
	    moe_import_card("tests/import/switch_transformers/config.json", &o, mem, &d),
	    MOE_EXIT_OK);
	fclose(mem);
	card = cJSON_Parse(text);
	assert_string_equal(cJSON_GetObjectItem(card, "stack")->valuestring, "decoder");
	cJSON_Delete(card);
	free(text);
	struct capture cap = {{0}, 0};
	struct moe_diag bad = {.sink = sink, .ctx = &cap};
	mem = open_memstream(&text, &len);
	assert_int_equal(moe_import_card("tests/import", &o, mem, &bad), MOE_EXIT_IO);
	fclose(mem);
	assert_int_equal(len, 0);
	free(text);
}

int main(void)
{
	struct CMUnitTest tests[N_GOLDENS + 21];
	int n = 0;
	for (int i = 0; i < N_GOLDENS; i++)
		tests[n++] =
		    (struct CMUnitTest){goldens[i], test_golden, NULL, NULL, (void *)goldens[i]};
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_layer_rules);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_decoder_stack);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_bad_json);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_unknown_type);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_missing_field);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_wrong_type);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_unsupported_values);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_uniform_list);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_all_errors);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_minimal_defaults);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_cmd);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_validates);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_capacity_and_quant_variants);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_resolved_extensions);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_transformers5);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_self_check);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_quoting);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_property_imports_check);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_new_family_errors);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_published_sizes);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_card);
	if (n != (int)(sizeof tests / sizeof *tests))
		return 1;
	return cmocka_run_group_tests_name("import", tests, NULL, NULL);
}
