/* test_spec.c: the spec stage. Good specs (tests/cases/good) resolve to the
 * fields asserted here; bad specs (tests/cases/bad) report exactly the
 * diagnostics annotated beside their lines; overrides; hostile input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moegen.h"

/* Captured diagnostics ------------------------------------------------------ */

#define MAX_DIAGS 256

struct diag_line {
	char file[256];
	unsigned line, col;
	char kind[16]; /* error, note, warning, or "" when unlocated */
	char msg[1024];
};

struct capture {
	struct diag_line d[MAX_DIAGS];
	int n, dropped;
	struct moe_diag sink;
};

/* Split "FILE:LINE:COL: KIND: MSG" (or "moegen: KIND: MSG"). */
static void on_diag(void *ctx, const char *text)
{
	struct capture *c = ctx;
	if (c->n == MAX_DIAGS) {
		c->dropped++;
		return;
	}
	struct diag_line *l = &c->d[c->n++];
	memset(l, 0, sizeof *l);
	static const char *const kinds[] = {"error", "note", "warning"};
	for (int i = 0; i < 3; i++) {
		char pat[32];
		snprintf(pat, sizeof pat, ": %s: ", kinds[i]);
		const char *p = strstr(text, pat);
		if (!p)
			continue;
		snprintf(l->kind, sizeof l->kind, "%s", kinds[i]);
		snprintf(l->msg, sizeof l->msg, "%s", p + strlen(pat));
		/* prefix: FILE:LINE:COL, numbers taken from the right */
		char pre[512];
		snprintf(pre, sizeof pre, "%.*s", (int)(p - text), text);
		char *c2 = strrchr(pre, ':');
		if (c2) {
			*c2 = 0;
			char *c1 = strrchr(pre, ':');
			if (c1) {
				*c1 = 0;
				l->line = (unsigned)atoi(c1 + 1);
				l->col = (unsigned)atoi(c2 + 1);
			}
		}
		snprintf(l->file, sizeof l->file, "%.255s", pre);
		return;
	}
	snprintf(l->msg, sizeof l->msg, "%s", text);
}

static void cap_init(struct capture *c)
{
	memset(c, 0, sizeof *c);
	c->sink.sink = on_diag;
	c->sink.ctx = c;
}

static void cap_print(const struct capture *c)
{
	for (int i = 0; i < c->n; i++)
		print_message("  %s:%u:%u: %s: %s\n", c->d[i].file, c->d[i].line, c->d[i].col,
			      c->d[i].kind, c->d[i].msg);
}

/* The first diagnostic of `kind` whose message contains `sub`, or NULL. */
static const struct diag_line *cap_find(const struct capture *c, const char *kind, const char *sub)
{
	for (int i = 0; i < c->n; i++)
		if (!strcmp(c->d[i].kind, kind) && strstr(c->d[i].msg, sub))
			return &c->d[i];
	return NULL;
}

static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	char *buf = NULL;
	size_t cap = 0, n = 0;
	for (;;) {
		if (n + 4096 > cap) {
			cap = cap ? cap * 2 : 8192;
			buf = realloc(buf, cap);
			assert_non_null(buf);
		}
		size_t r = fread(buf + n, 1, cap - n - 1, f);
		n += r;
		if (r == 0)
			break;
	}
	fclose(f);
	buf[n] = 0;
	if (len)
		*len = n;
	return buf;
}

/* Load and check a spec given as text; returns check's result, or -2 when
 * loading failed. */
static int check_text(const char *text, struct capture *c, struct moe_desc *out)
{
	struct moe_spec *s = moe_spec_load_string("t.yaml", text, strlen(text), &c->sink);
	if (!s)
		return -2;
	int rc = moe_spec_check(s, out, &c->sink);
	moe_spec_free(s);
	return rc;
}

static const char *case_dir(const char *sub, char *buf, size_t cap)
{
	const char *root = getenv("MOE_SOURCE_DIR");
	snprintf(buf, cap, "%s/tests/cases/%s", root ? root : ".", sub);
	return buf;
}

/* Sorted *.yaml names of a directory; returns the count. */
static int list_yaml(const char *dir, char names[][128], int cap)
{
	DIR *dp = opendir(dir);
	assert_non_null(dp);
	int n = 0;
	for (struct dirent *e; (e = readdir(dp));) {
		size_t l = strlen(e->d_name);
		if (l > 5 && l < 128 && !strcmp(e->d_name + l - 5, ".yaml") && n < cap)
			snprintf(names[n++], 128, "%.127s", e->d_name);
	}
	closedir(dp);
	qsort(names, (size_t)n, 128, (int (*)(const void *, const void *))strcmp);
	return n;
}

/* Good specs ------------------------------------------------------------------ */

static int role(const char *name)
{
	int r = moe_enum_lookup(moe_role_names, MOE_ROLE_COUNT, name);
	assert_true(r >= 0);
	return r;
}

static void good_mixtral(const struct moe_desc *d)
{
	assert_string_equal(d->name, "mixtral-8x7b");
	assert_true(d->noise_eps == 0.0f);
	assert_int_equal(d->importance_sparse, 0);
	assert_int_equal(d->hidden, 4096);
	assert_int_equal(d->n_layers, 32);
	assert_int_equal(d->n_moe_layers, 32);
	for (uint32_t i = 0; i < 32; i++)
		assert_int_equal(d->moe_layers[i], i);
	assert_int_equal(d->dense_intermediate, 0);
	assert_int_equal(d->vocab, 32000);
	assert_int_equal(d->attn, MOE_ATTN_MHA);
	assert_int_equal(d->attn_heads, 32);
	assert_int_equal(d->attn_kv_heads, 8);
	assert_int_equal(d->attn_head_dim, 128);
	assert_int_equal(d->weight_dtype, MOE_DTYPE_BF16);
	assert_int_equal(d->act_dtype, MOE_DTYPE_F32);
	assert_int_equal(d->mode, MOE_MODE_TOKEN_CHOICE);
	assert_int_equal(d->score, MOE_SCORE_SOFTMAX);
	assert_int_equal(d->top_k, 2);
	assert_int_equal(d->norm, MOE_NORM_SUM);
	assert_true(d->norm_eps == 0.0f && d->norm_min == 0.0f && d->norm_p == 1.0f);
	assert_true(d->scale == 1.0f);
	assert_int_equal(d->n_groups, 1);
	assert_int_equal(d->capacity, MOE_CAPACITY_NONE);
	assert_int_equal(d->kind, MOE_KIND_GLU);
	assert_int_equal(d->act, MOE_ACT_SILU);
	assert_int_equal(d->n_experts, 8);
	assert_int_equal(d->intermediate, 14336);
	assert_int_equal(d->split, 1);
	assert_int_equal(d->shared_count, 0);
	assert_string_equal(d->names[MOE_ROLE_GATE],
			    "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight");
	assert_string_equal(d->names[MOE_ROLE_ROUTER],
			    "model.layers.{layer}.block_sparse_moe.gate.weight");
	assert_string_equal(d->names[MOE_ROLE_GATE_UP], "");
	assert_int_equal(d->layouts[MOE_ROLE_GATE].orient, MOE_ORIENT_OUT_IN);
	assert_int_equal(d->layouts[MOE_ROLE_GATE].explicit_, 0);
}

static void good_deepseek_v3(const struct moe_desc *d)
{
	assert_int_equal(d->n_layers, 61);
	/* {first: 3} with every defaulting to 1: layers 3..60 */
	assert_int_equal(d->n_moe_layers, 61 - 3);
	assert_int_equal(d->moe_layers[0], 3);
	assert_int_equal(d->moe_layers[57], 60);
	assert_int_equal(d->dense_intermediate, 18432);
	assert_int_equal(d->dense_kind, MOE_KIND_GLU);
	assert_int_equal(d->dense_act, MOE_ACT_SILU);
	assert_int_equal(d->attn, MOE_ATTN_MLA);
	assert_int_equal(d->mla_q_lora_rank, 1536);
	assert_int_equal(d->mla_kv_lora_rank, 512);
	assert_int_equal(d->mla_qk_nope_dim, 128);
	assert_int_equal(d->mla_qk_rope_dim, 64);
	assert_int_equal(d->mla_v_dim, 128);
	assert_int_equal(d->score, MOE_SCORE_SIGMOID);
	assert_int_equal(d->select_bias, 1);
	assert_int_equal(d->n_groups, 8);
	assert_int_equal(d->group_top, 4);
	/* defaulted: a selection bias selects by the sum of the top two */
	assert_int_equal(d->group_score, MOE_GROUP_SCORE_SUM_TOP2);
	assert_int_equal(d->norm, MOE_NORM_SUM);
	assert_true(d->norm_eps == 1e-20f);
	assert_true(d->scale == 2.5f);
	assert_int_equal(d->top_k, 8);
	assert_int_equal(d->n_experts, 256);
	assert_int_equal(d->shared_count, 1);
	assert_int_equal(d->shared_intermediate, 2048);
	assert_int_equal(d->shared_kind, MOE_KIND_GLU);
	assert_int_equal(d->shared_act, MOE_ACT_SILU);
	assert_int_equal(d->shared_gate, MOE_SHARED_GATE_NONE);
	assert_string_equal(d->names[role("select_bias")],
			    "model.layers.{layer}.mlp.gate.e_score_correction_bias");
}

static void good_split(const struct moe_desc *d)
{
	/* declared 16 x 1024 top-2, split 4 */
	assert_int_equal(d->split, 4);
	assert_int_equal(d->n_experts, 16 * 4);
	assert_int_equal(d->intermediate, 1024 / 4);
	assert_int_equal(d->top_k, 2 * 4);
	assert_int_equal(d->n_groups, 4);
	assert_int_equal(d->group_top, 2);
	assert_int_equal(d->group_score, MOE_GROUP_SCORE_MAX);
	assert_int_equal(d->n_moe_layers, 3);
	assert_int_equal(d->moe_layers[0], 1);
	assert_int_equal(d->moe_layers[2], 3);
	assert_int_equal(d->dense_intermediate, 2048);
	/* shared experts are not split */
	assert_int_equal(d->shared_count, 2);
	assert_int_equal(d->shared_intermediate, 256);
}

static void good_qwen2(const struct moe_desc *d)
{
	assert_string_equal(d->name, "Qwen1.5-MoE-A2.7B");
	assert_int_equal(d->norm, MOE_NORM_NONE);
	assert_int_equal(d->attn, MOE_ATTN_MHA);
	assert_int_equal(d->attn_kv_heads, 16);        /* defaults to heads */
	assert_int_equal(d->attn_head_dim, 2048 / 16); /* defaults to hidden / heads */
	assert_int_equal(d->vocab, 151936);
	assert_int_equal(d->tied_embeddings, 0);
	assert_int_equal(d->shared_gate, MOE_SHARED_GATE_SIGMOID);
	assert_int_equal(d->shared_kind, MOE_KIND_GLU);
	assert_int_equal(d->shared_act, MOE_ACT_SILU);
	assert_int_equal(d->shared_intermediate, 5632);
	assert_int_equal(d->top_k, 4);
	assert_int_equal(d->n_experts, 60);
	assert_int_equal(d->expert_bias, 0);
	assert_string_equal(d->names[role("shared_expert_gate")],
			    "model.layers.{layer}.mlp.shared_expert_gate.weight");
}

static void good_gpt_oss(const struct moe_desc *d)
{
	assert_int_equal(d->router_bias, 1);
	assert_int_equal(d->norm, MOE_NORM_SUM);
	assert_int_equal(d->kind, MOE_KIND_GLU);
	assert_int_equal(d->act, MOE_ACT_SWIGLU_OAI);
	assert_true(d->act_alpha == 1.702f); /* defaulted */
	assert_true(d->act_limit == 7.0f);
	assert_int_equal(d->expert_bias, 1);
	int gu = role("gate_up"), gub = role("gate_up_bias"), dn = role("down");
	assert_int_equal(d->layouts[gu].fuse, MOE_FUSE_INTERLEAVE);
	assert_int_equal(d->layouts[gu].orient, MOE_ORIENT_IN_OUT);
	assert_int_equal(d->layouts[gu].explicit_, 1);
	assert_int_equal(d->layouts[gub].fuse, MOE_FUSE_INTERLEAVE);
	assert_int_equal(d->layouts[gub].orient, MOE_ORIENT_OUT_IN);
	assert_int_equal(d->layouts[dn].orient, MOE_ORIENT_IN_OUT);
	assert_int_equal(d->layouts[dn].fuse, MOE_FUSE_NONE);
	assert_string_equal(d->names[gu], "model.layers.{layer}.mlp.experts.gate_up_proj");
	assert_string_equal(d->names[MOE_ROLE_GATE], "");
	/* no moe_layers: every layer, so no dense FFN */
	assert_int_equal(d->n_moe_layers, 24);
}

static void good_dbrx(const struct moe_desc *d)
{
	assert_int_equal(d->weight_dtype, MOE_DTYPE_F16);
	assert_int_equal(d->norm, MOE_NORM_LP);
	assert_true(d->norm_p == 1.0f);
	assert_int_equal(d->noise, MOE_NOISE_JITTER);
	assert_true(d->jitter_eps == 0.01f);
	assert_int_equal(d->layouts[MOE_ROLE_GATE].row_blocked, 1);
	assert_int_equal(d->layouts[MOE_ROLE_UP].row_blocked, 1);
	assert_int_equal(d->layouts[MOE_ROLE_DOWN].row_blocked, 1);
	assert_int_equal(d->layouts[MOE_ROLE_DOWN].orient, MOE_ORIENT_IN_OUT);
	assert_int_equal(d->layouts[MOE_ROLE_ROUTER].row_blocked, 0);
}

static void good_llama4(const struct moe_desc *d)
{
	assert_int_equal(d->score, MOE_SCORE_SIGMOID);
	assert_int_equal(d->norm, MOE_NORM_NONE);
	assert_int_equal(d->apply_to, MOE_APPLY_INPUT);
	assert_int_equal(d->top_k, 1);
	/* {first: 1, every: 2} over 48 layers: 1, 3, ..., 47 */
	assert_int_equal(d->n_moe_layers, 24);
	for (uint32_t i = 0; i < 24; i++)
		assert_int_equal(d->moe_layers[i], 1 + 2 * i);
	assert_int_equal(d->dense_intermediate, 16384);
	assert_int_equal(d->shared_count, 1); /* count defaults to 1 */
	assert_int_equal(d->shared_intermediate, 8192);
	int gu = role("gate_up");
	assert_int_equal(d->layouts[gu].fuse, MOE_FUSE_CONCAT); /* the default fuse */
	assert_int_equal(d->layouts[gu].orient, MOE_ORIENT_IN_OUT);
}

static void good_switch(const struct moe_desc *d)
{
	assert_int_equal(d->kind, MOE_KIND_MLP);
	assert_int_equal(d->act, MOE_ACT_RELU);
	assert_int_equal(d->capacity, MOE_CAPACITY_PER_EXPERT);
	assert_int_equal(d->capacity_per_expert, 64);
	assert_int_equal(d->priority, MOE_PRIORITY_POSITION);
	assert_int_equal(d->overflow, MOE_OVERFLOW_PASSTHROUGH);
	assert_int_equal(d->noise, MOE_NOISE_NONE);
	assert_int_equal(d->n_moe_layers, 6);
	assert_int_equal(d->moe_layers[5], 11);
	assert_int_equal(d->dense_kind, MOE_KIND_MLP);
	assert_int_equal(d->dense_act, MOE_ACT_RELU);
}

static void good_vmoe(const struct moe_desc *d)
{
	assert_int_equal(d->act_dtype, MOE_DTYPE_BF16);
	assert_int_equal(d->tied_embeddings, 1);
	assert_int_equal(d->vocab, 1000);
	assert_int_equal(d->capacity, MOE_CAPACITY_FACTOR);
	assert_true(d->capacity_factor == 1.25f);
	assert_int_equal(d->priority, MOE_PRIORITY_SCORE);
	assert_int_equal(d->overflow, MOE_OVERFLOW_DROP);
	assert_int_equal(d->noise, MOE_NOISE_LEARNED_GAUSSIAN);
	assert_int_equal(d->norm, MOE_NORM_SUM);
	assert_true(d->norm_min == 1e-6f);
	assert_int_equal(d->kind, MOE_KIND_GLU);
	assert_int_equal(d->act, MOE_ACT_GELU);
	assert_string_equal(d->names[role("noise")], "layers.{layer}.moe.noise.weight");
}

static void good_dense(const struct moe_desc *d)
{
	assert_int_equal(d->mode, MOE_MODE_DENSE);
	assert_int_equal(d->n_experts, 4 * 2);
	assert_int_equal(d->intermediate, 512 / 2);
	assert_int_equal(d->top_k, 4 * 2); /* dense: every expert */
	assert_int_equal(d->kind, MOE_KIND_MLP);
	assert_int_equal(d->act, MOE_ACT_GELU_TANH);
}

static void good_expert_choice(const struct moe_desc *d)
{
	assert_int_equal(d->mode, MOE_MODE_EXPERT_CHOICE);
	assert_int_equal(d->top_k, 0);
	assert_true(d->ec_capacity_factor == 2.0f);
	assert_int_equal(d->kind, MOE_KIND_GLU);
	assert_int_equal(d->act, MOE_ACT_GELU); /* geglu */
}

static void good_soft(const struct moe_desc *d)
{
	assert_int_equal(d->mode, MOE_MODE_SOFT);
	assert_int_equal(d->top_k, 0);
	assert_int_equal(d->soft_slots_per_expert, 2);
	assert_int_equal(d->kind, MOE_KIND_MLP);
	/* scale: channel: a [H] gamma in place of the scalar scale */
	uint64_t rows, cols;
	assert_int_equal(d->soft_gamma, 1);
	assert_true(moe_desc_role_shape(d, MOE_ROLE_SOFT_GAMMA, &rows, &cols, NULL));
	assert_int_equal(rows, 1);
	assert_int_equal(cols, d->hidden);
	assert_false(moe_desc_role_shape(d, MOE_ROLE_SOFT_SCALE, NULL, NULL, NULL));
}

static void good_noisy(const struct moe_desc *d)
{
	assert_int_equal(d->mode, MOE_MODE_TOKEN_CHOICE);
	assert_int_equal(d->noise, MOE_NOISE_LEARNED_GAUSSIAN);
	assert_true(d->noise_eps == 0.05f);
	assert_int_equal(d->importance_sparse, 1);
	assert_int_equal(d->top_k, 4);
}

static void good_hierarchical(const struct moe_desc *d)
{
	assert_int_equal(d->mode, MOE_MODE_HIERARCHICAL);
	assert_int_equal(d->n_levels, 2);
	assert_int_equal(d->levels[0].groups, 4);
	assert_int_equal(d->levels[0].top_k, 2);
	assert_int_equal(d->levels[1].top_k, 2 * 2); /* split 2 */
	assert_int_equal(d->n_experts, 32 * 2);
	assert_int_equal(d->intermediate, 256 / 2);
	assert_int_equal(d->top_k, 2 * 2 * 2);
	assert_int_equal(d->noise, MOE_NOISE_LEARNED_GAUSSIAN);
	assert_true(d->noise_eps == 0.01f); /* tensor2tensor's default */
	assert_int_equal(d->importance_sparse, 0);
}

static void good_peer_pytorch(const struct moe_desc *d)
{
	uint64_t rows, cols;
	assert_int_equal(d->pk_keys_per_head, 1);
	assert_int_equal(d->pk_score_relu, 1);
	assert_int_equal(d->pk_sub_top_k, 8);
	assert_int_equal(moe_desc_pk_sub_top_k(d), 8);
	assert_int_equal(d->top_k, 4 * 16);
	assert_int_equal(d->pk_query_bn, 0);
	assert_true(moe_desc_role_shape(d, MOE_ROLE_PK_KEYS, &rows, &cols, NULL));
	assert_int_equal(rows, 4 * 64 * 2);
	assert_int_equal(cols, 128);
}

static void good_peer(const struct moe_desc *d)
{
	assert_int_equal(d->mode, MOE_MODE_PRODUCT_KEY);
	assert_int_equal(d->kind, MOE_KIND_SINGLE_NEURON);
	assert_int_equal(d->n_experts, 1024 * 1024);
	assert_int_equal(d->pk_sub_keys, 1024);
	assert_int_equal(d->pk_heads, 8);
	assert_int_equal(d->pk_top_k, 16);
	assert_int_equal(d->pk_query_dim, 256);
	assert_int_equal(d->pk_score, MOE_SCORE_SIGMOID);
	assert_int_equal(d->pk_query_bn, 1);
	assert_true(d->pk_bn_eps == 0.001f);
	assert_int_equal(d->pk_keys_per_head, 0);
	assert_int_equal(d->pk_score_relu, 0);
	assert_int_equal(moe_desc_pk_sub_top_k(d), 16);
	assert_string_equal(d->names[MOE_ROLE_PK_BN_VAR],
			    "layers.{layer}.peer.query_bn.running_var");
	assert_int_equal(d->top_k, 8 * 16);
	assert_int_equal(d->act, MOE_ACT_GELU);
	assert_int_equal(d->n_moe_layers, 1);
	assert_int_equal(d->moe_layers[0], 6);
	assert_int_equal(d->dense_kind, MOE_KIND_MLP);
	assert_int_equal(d->dense_act, MOE_ACT_GELU);
}

static void good_phimoe(const struct moe_desc *d)
{
	assert_int_equal(d->mode, MOE_MODE_SPARSEMIXER);
	assert_int_equal(d->top_k, 2);
	assert_true(d->sparsemixer_eps == 0.01f);
}

static void good_top_p(const struct moe_desc *d)
{
	assert_int_equal(d->mode, MOE_MODE_TOP_P);
	assert_int_equal(d->top_k, 3);
	assert_true(d->top_p == 0.4f);
	assert_int_equal(d->norm, MOE_NORM_SUM);
	assert_int_equal(moe_desc_route_width(d), 3);
}

static void good_minimal(const struct moe_desc *d)
{
	assert_int_equal(d->version, MOE_DESC_VERSION);
	assert_int_equal(d->n_moe_layers, 1);
	assert_int_equal(d->weight_dtype, MOE_DTYPE_F32);
	assert_int_equal(d->act_dtype, MOE_DTYPE_F32);
	assert_int_equal(d->mode, MOE_MODE_TOKEN_CHOICE);
	assert_int_equal(d->score, MOE_SCORE_SOFTMAX);
	assert_int_equal(d->norm, MOE_NORM_NONE);
	assert_true(d->scale == 1.0f && d->norm_p == 1.0f);
	assert_int_equal(d->router_bias, 0);
	assert_int_equal(d->select_bias, 0);
	assert_int_equal(d->n_groups, 1);
	assert_int_equal(d->group_top, 1);
	assert_int_equal(d->capacity, MOE_CAPACITY_NONE);
	assert_int_equal(d->noise, MOE_NOISE_NONE);
	assert_int_equal(d->apply_to, MOE_APPLY_OUTPUT);
	assert_int_equal(d->kind, MOE_KIND_GLU);
	assert_int_equal(d->act, MOE_ACT_SILU);
	assert_true(d->act_alpha == 0.0f && d->act_limit == 0.0f);
	assert_int_equal(d->split, 1);
	assert_int_equal(d->attn, MOE_ATTN_NONE);
	assert_int_equal(d->output_bias, 0);
	assert_int_equal(d->pk_query_bn, 0);
	assert_int_equal(d->capacity_min, 0);
	assert_int_equal(d->capacity_floor, 0);
	assert_int_equal(d->capacity_norm_after_drop, 0);
	for (int r = 0; r < MOE_ROLE_COUNT; r++) {
		assert_string_equal(d->names[r], "");
		assert_string_equal(d->scale_names[r], "");
		assert_int_equal(d->layouts[r].quant, MOE_QUANT_NONE);
	}
}

static void good_sqrtsoftplus(const struct moe_desc *d)
{
	assert_string_equal(d->name, "odd.style_spec-1");
	assert_int_equal(d->score, MOE_SCORE_SQRTSOFTPLUS);
	assert_int_equal(d->norm, MOE_NORM_LP);
	assert_true(d->norm_p == 2.0f && d->norm_eps == 1e-6f && d->norm_min == 0.5f);
	assert_true(d->scale == 1.5f);
	assert_int_equal(d->kind, MOE_KIND_MLP);
	assert_int_equal(d->act, MOE_ACT_SILU);
	assert_int_equal(d->shared_count, 3);
	assert_int_equal(d->shared_kind, MOE_KIND_MLP);
	assert_int_equal(d->shared_act, MOE_ACT_RELU);
	assert_string_equal(d->names[MOE_ROLE_UP], "blk.{layer}.ffn_up_exps.weight");
}

static void good_jetmoe(const struct moe_desc *d)
{
	assert_int_equal(d->output_bias, 1);
	assert_string_equal(d->names[role("output_bias")], "model.layers.{layer}.mlp.bias");
	/* the output bias is one [H] vector, not per expert */
	uint64_t rows = 0, cols = 0;
	int pe = 1;
	assert_true(moe_desc_role_shape(d, MOE_ROLE_OUTPUT_BIAS, &rows, &cols, &pe));
	assert_true(rows == 1 && cols == 2048 && pe == 0);
	assert_int_equal(d->expert_bias, 0);
	assert_int_equal(d->capacity, MOE_CAPACITY_NONE);
	assert_int_equal(d->layouts[role("gate_up")].fuse, MOE_FUSE_CONCAT);
}

static void good_nllb_capacity(const struct moe_desc *d)
{
	assert_int_equal(d->capacity, MOE_CAPACITY_TOKEN_FRACTION);
	assert_true(d->capacity_token_fraction == 0.25f);
	assert_true(d->capacity_factor == 0.0f);
	assert_int_equal(d->capacity_per_expert, 0);
	assert_int_equal(d->capacity_min, 0);
	assert_int_equal(d->capacity_floor, 0);
	assert_int_equal(d->capacity_norm_after_drop, 1);
	assert_int_equal(d->priority, MOE_PRIORITY_POSITION);
	assert_int_equal(d->overflow, MOE_OVERFLOW_DROP);
	assert_int_equal(d->norm, MOE_NORM_SUM);
	assert_true(d->norm_min == 1.1920929e-07f);
	assert_true(d->scale == 0.8f);
	assert_int_equal(d->n_moe_layers, 6); /* 3, 7, ..., 23 */
	assert_int_equal(d->moe_layers[5], 23);
	assert_int_equal(d->output_bias, 0);
}

static void good_hunyuan(const struct moe_desc *d)
{
	assert_int_equal(d->capacity, MOE_CAPACITY_FACTOR);
	assert_true(d->capacity_factor == 1.0f);
	assert_int_equal(d->capacity_floor, 1);
	assert_int_equal(d->capacity_min, 2);
	assert_true(d->capacity_token_fraction == 0.0f);
	assert_int_equal(d->capacity_norm_after_drop, 0);
	assert_int_equal(d->priority, MOE_PRIORITY_POSITION); /* the default */
	assert_int_equal(d->top_k, 2);
	assert_int_equal(d->shared_count, 1);
	assert_int_equal(d->shared_intermediate, 3072);
}

static void good_deepseek_v3_fp8(const struct moe_desc *d)
{
	static const char *const q[] = {"gate", "up", "down", "shared_down"};
	for (int i = 0; i < 4; i++) {
		const struct moe_layout *l = &d->layouts[role(q[i])];
		assert_int_equal(l->quant, MOE_QUANT_FP8_BLOCK);
		assert_int_equal(l->quant_block[0], 128);
		assert_int_equal(l->quant_block[1], 128);
		assert_int_equal(l->explicit_, 1);
		/* the scale template is the weight's name plus _scale_inv */
		char want[MOE_NAME_MAX + 16];
		snprintf(want, sizeof want, "%s_scale_inv", d->names[role(q[i])]);
		assert_string_equal(d->scale_names[role(q[i])], want);
	}
	/* `quant: none` and roles without a layout are not quantized */
	static const char *const plain[] = {"router", "select_bias", "shared_gate", "shared_up"};
	for (int i = 0; i < 4; i++) {
		assert_int_equal(d->layouts[role(plain[i])].quant, MOE_QUANT_NONE);
		assert_string_equal(d->scale_names[role(plain[i])], "");
	}
	assert_int_equal(d->layouts[role("shared_gate")].explicit_, 1);
	assert_int_equal(d->weight_dtype, MOE_DTYPE_BF16);
}

static void good_gpt_oss_mxfp4(const struct moe_desc *d)
{
	int gu = role("gate_up"), dn = role("down");
	assert_int_equal(d->layouts[gu].quant, MOE_QUANT_MXFP4);
	assert_int_equal(d->layouts[gu].fuse, MOE_FUSE_INTERLEAVE);
	assert_int_equal(d->layouts[gu].orient, MOE_ORIENT_OUT_IN);
	assert_int_equal(d->layouts[dn].quant, MOE_QUANT_MXFP4);
	/* one scale per 32 inputs of one row */
	assert_int_equal(d->layouts[dn].quant_block[0], 1);
	assert_int_equal(d->layouts[dn].quant_block[1], 32);
	assert_string_equal(d->names[gu], "model.layers.{layer}.mlp.experts.gate_up_proj_blocks");
	assert_string_equal(d->scale_names[gu],
			    "model.layers.{layer}.mlp.experts.gate_up_proj_scales");
	assert_string_equal(d->scale_names[dn],
			    "model.layers.{layer}.mlp.experts.down_proj_scales");
	assert_int_equal(d->layouts[role("gate_up_bias")].quant, MOE_QUANT_NONE);
	assert_true(d->act_alpha == 1.702f && d->act_limit == 7.0f);
}

static const struct {
	const char *file;
	void (*check)(const struct moe_desc *);
} good_cases[] = {
    {"dbrx.yaml", good_dbrx},
    {"deepseek-v3-fp8.yaml", good_deepseek_v3_fp8},
    {"deepseek-v3.yaml", good_deepseek_v3},
    {"deepseekmoe-split.yaml", good_split},
    {"dense.yaml", good_dense},
    {"expert-choice.yaml", good_expert_choice},
    {"gpt-oss-mxfp4.yaml", good_gpt_oss_mxfp4},
    {"gpt-oss.yaml", good_gpt_oss},
    {"hierarchical.yaml", good_hierarchical},
    {"hunyuan.yaml", good_hunyuan},
    {"jetmoe.yaml", good_jetmoe},
    {"llama4.yaml", good_llama4},
    {"minimal.yaml", good_minimal},
    {"mixtral.yaml", good_mixtral},
    {"nllb-capacity.yaml", good_nllb_capacity},
    {"noisy-top-k.yaml", good_noisy},
    {"peer-pytorch.yaml", good_peer_pytorch},
    {"peer.yaml", good_peer},
    {"phimoe.yaml", good_phimoe},
    {"qwen2-moe.yaml", good_qwen2},
    {"soft.yaml", good_soft},
    {"sqrtsoftplus.yaml", good_sqrtsoftplus},
    {"switch.yaml", good_switch},
    {"top-p.yaml", good_top_p},
    {"vmoe.yaml", good_vmoe},
};

static char *dump_spec(const struct moe_spec *s)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	assert_non_null(f);
	moe_spec_dump(s, f);
	fclose(f);
	return buf;
}

static char *dump_desc(const struct moe_desc *d)
{
	size_t n = moe_desc_dump(d, NULL, 0);
	char *buf = malloc(n + 1);
	assert_non_null(buf);
	assert_int_equal(moe_desc_dump(d, buf, n + 1), n);
	return buf;
}

static void test_good(void **state)
{
	(void)state;
	char dir[512], path[1024], names[128][128];
	int n = list_yaml(case_dir("good", dir, sizeof dir), names, 128);
	assert_true(n >= 10);
	/* Every good case has its assertions, and every assertion its file. */
	assert_int_equal(n, (int)(sizeof good_cases / sizeof *good_cases));
	struct capture *c = malloc(sizeof *c);
	struct moe_desc *a = malloc(sizeof *a), *b = malloc(sizeof *b);
	assert_non_null(c);
	assert_non_null(a);
	assert_non_null(b);
	for (int i = 0; i < n; i++) {
		assert_string_equal(names[i], good_cases[i].file);
		snprintf(path, sizeof path, "%.511s/%.127s", dir, names[i]);
		cap_init(c);
		struct moe_spec *s = moe_spec_load(path, &c->sink);
		int rc = s ? moe_spec_check(s, a, &c->sink) : -2;
		if (rc != 0 || c->n) {
			print_message("%s:\n", names[i]);
			cap_print(c);
		}
		assert_int_equal(rc, 0);
		assert_int_equal(c->n, 0); /* not even a warning */
		good_cases[i].check(a);

		/* Deterministic, including padding and unused bytes: check
		 * again over a differently dirtied buffer. */
		memset(b, 0xa5, sizeof *b);
		assert_int_equal(moe_spec_check(s, b, &c->sink), 0);
		assert_memory_equal(a, b, sizeof *a);

		/* The dump reads back as the same spec, and dumps the same. */
		char *t1 = dump_spec(s);
		struct moe_spec *s2 = moe_spec_load_string("dump.yaml", t1, strlen(t1), &c->sink);
		if (!s2)
			cap_print(c);
		assert_non_null(s2);
		assert_int_equal(moe_spec_check(s2, b, &c->sink), 0);
		assert_memory_equal(a, b, sizeof *a);
		char *t2 = dump_spec(s2);
		assert_string_equal(t1, t2);

		/* moe_desc_dump is stable and reflects the round trip. */
		char *d1 = dump_desc(a), *d2 = dump_desc(b);
		assert_string_equal(d1, d2);
		assert_non_null(strstr(d1, a->name));
		free(d1);
		free(d2);
		free(t1);
		free(t2);
		moe_spec_free(s2);
		moe_spec_free(s);
	}
	free(a);
	free(b);
	free(c);
}

/* Bad specs ------------------------------------------------------------------- */

struct expect {
	unsigned line;
	char kind[8];
	char sub[256];
	int seen;
};

/* Collect "# error: TEXT" and "# note: TEXT" annotations; TEXT runs to the
 * end of the line or to the next " # ". */
static int parse_expect(const char *text, struct expect *ex, int cap)
{
	int n = 0;
	unsigned line = 1;
	for (const char *p = text; *p; line++) {
		const char *eol = strchr(p, '\n');
		if (!eol)
			eol = p + strlen(p);
		static const char *const kinds[] = {"error", "note"};
		for (int k = 0; k < 2; k++) {
			char pat[16];
			snprintf(pat, sizeof pat, "# %s: ", kinds[k]);
			for (const char *q = p; (q = strstr(q, pat)) && q < eol; q++) {
				const char *s = q + strlen(pat), *e = s;
				while (e < eol && strncmp(e, " # ", 3))
					e++;
				while (e > s && (e[-1] == ' ' || e[-1] == '\r'))
					e--;
				assert_true(n < cap);
				ex[n].line = line;
				snprintf(ex[n].kind, sizeof ex[n].kind, "%s", kinds[k]);
				snprintf(ex[n].sub, sizeof ex[n].sub, "%.*s", (int)(e - s), s);
				ex[n].seen = 0;
				n++;
			}
		}
		p = *eol ? eol + 1 : eol;
	}
	return n;
}

/* Run one bad case; returns the number of mismatches (reported). */
static int run_bad(const char *dir, const char *name, struct capture *c, struct moe_desc *out)
{
	char path[1024];
	struct expect ex[64];
	snprintf(path, sizeof path, "%.511s/%.127s", dir, name);
	char *text = read_file(path, NULL);
	int n = parse_expect(text, ex, 64), bad = 0, n_err = 0;
	free(text);
	cap_init(c);
	struct moe_spec *s = moe_spec_load(path, &c->sink);
	int rc = s ? moe_spec_check(s, out, &c->sink) : -1;
	moe_spec_free(s);
	for (int i = 0; i < n; i++)
		n_err += !strcmp(ex[i].kind, "error");
	if (!n_err) {
		print_message("%s: no '# error:' annotation\n", name);
		bad++;
	}
	if (rc == 0) {
		print_message("%s: the spec was accepted\n", name);
		bad++;
	}
	for (int i = 0; i < n; i++) {
		for (int j = 0; j < c->n && !ex[i].seen; j++)
			ex[i].seen = c->d[j].line == ex[i].line &&
				     !strcmp(c->d[j].kind, ex[i].kind) &&
				     strstr(c->d[j].msg, ex[i].sub);
		if (!ex[i].seen) {
			print_message("%s:%u: expected %s containing '%s'\n", name, ex[i].line,
				      ex[i].kind, ex[i].sub);
			bad++;
		}
	}
	for (int j = 0; j < c->n; j++) {
		if (strcmp(c->d[j].kind, "error"))
			continue;
		int ok = 0;
		for (int i = 0; i < n && !ok; i++)
			ok = !strcmp(ex[i].kind, "error") && ex[i].line == c->d[j].line &&
			     strstr(c->d[j].msg, ex[i].sub);
		if (!ok) {
			print_message("%s:%u:%u: unexpected error: %s\n", name, c->d[j].line,
				      c->d[j].col, c->d[j].msg);
			bad++;
		}
	}
	if (bad)
		cap_print(c);
	return bad;
}

static void test_bad(void **state)
{
	(void)state;
	char dir[512], names[256][128];
	int n = list_yaml(case_dir("bad", dir, sizeof dir), names, 256), bad = 0;
	assert_true(n >= 30);
	struct capture *c = malloc(sizeof *c);
	struct moe_desc *d = malloc(sizeof *d);
	assert_non_null(c);
	assert_non_null(d);
	for (int i = 0; i < n; i++)
		bad += run_bad(dir, names[i], c, d);
	free(c);
	free(d);
	assert_int_equal(bad, 0);
}

/* The runner itself must be able to fail: a wrong line, a wrong text and a
 * missing annotation are all caught. */
static void test_bad_runner_fails(void **state)
{
	(void)state;
	struct expect ex[8];
	const char *t = "a: 1\nb: 2  # error: one # note: two\n# error: three\n";
	int n = parse_expect(t, ex, 8);
	assert_int_equal(n, 3);
	assert_int_equal(ex[0].line, 2);
	assert_string_equal(ex[0].kind, "error");
	assert_string_equal(ex[0].sub, "one");
	assert_int_equal(ex[1].line, 2);
	assert_string_equal(ex[1].kind, "note");
	assert_string_equal(ex[1].sub, "two");
	assert_int_equal(ex[2].line, 3);
	assert_string_equal(ex[2].sub, "three");
}

/* Locations and messages ----------------------------------------------------- */

static const char base[] = "moegen: 1\n"
			   "name: t\n"
			   "model:\n"
			   "  hidden: 64\n"
			   "  layers: 2\n"
			   "router:\n"
			   "  top_k: 2\n"
			   "experts:\n"
			   "  count: 4\n"
			   "  intermediate: 32\n";

static void test_locations(void **state)
{
	(void)state;
	struct capture c;
	struct moe_desc d;
	cap_init(&c);
	/* line 4 is "  hidden: abc": the value starts at column 11 */
	const char *t = "moegen: 1\nname: t\nmodel:\n  hidden: abc\n  layers: 2\n"
			"router: {top_k: 9}\nexperts: {count: 4, intermediate: 32}\n";
	assert_int_not_equal(check_text(t, &c, &d), 0);
	const struct diag_line *l =
	    cap_find(&c, "error", "model.hidden must be a positive integer");
	assert_non_null(l);
	assert_string_equal(l->file, "t.yaml");
	assert_int_equal(l->line, 4);
	assert_int_equal(l->col, strlen("  hidden: ") + 1);
	assert_non_null(strstr(l->msg, "got 'abc'"));
	/* top_k 9 > count 4: error at the value, note at the count key */
	l = cap_find(&c, "error", "router.top_k (9) exceeds experts.count (4)");
	assert_non_null(l);
	assert_int_equal(l->line, 6);
	assert_int_equal(l->col, strlen("router: {top_k: ") + 1);
	l = cap_find(&c, "note", "experts.count declared here");
	assert_non_null(l);
	assert_int_equal(l->line, 7);
	assert_int_equal(l->col, strlen("experts: {") + 1);
	assert_int_equal(c.sink.n_errors, 2);
}

static void test_unreadable(void **state)
{
	(void)state;
	struct capture c;
	char want[256];
	cap_init(&c);
	assert_null(moe_spec_load("/nonexistent/x.yaml", &c.sink));
	assert_int_equal(c.n, 1);
	snprintf(want, sizeof want, "cannot read '/nonexistent/x.yaml': %s", strerror(ENOENT));
	assert_string_equal(c.d[0].msg, want);
	assert_string_equal(c.d[0].file, "moegen");
	assert_int_equal(c.sink.n_errors, 1);
	/* a directory opens but cannot be read */
	cap_init(&c);
	assert_null(moe_spec_load("/", &c.sink));
	assert_non_null(cap_find(&c, "error", "cannot read '/'"));
}

/* Overrides ------------------------------------------------------------------- */

static struct moe_spec *load_base(struct capture *c)
{
	struct moe_spec *s = moe_spec_load_string("base.yaml", base, strlen(base), &c->sink);
	assert_non_null(s);
	return s;
}

static void test_set_replace(void **state)
{
	(void)state;
	struct capture c;
	struct moe_desc d;
	cap_init(&c);
	struct moe_spec *s = load_base(&c);
	assert_int_equal(moe_spec_set(s, "model.hidden=96", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "router.top_k=1", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "experts={count: 6, intermediate: 48, split: 2}", &c.sink),
			 0);
	assert_int_equal(moe_spec_check(s, &d, &c.sink), 0);
	assert_int_equal(c.n, 0);
	assert_int_equal(d.hidden, 96);
	assert_int_equal(d.n_experts, 6 * 2);
	assert_int_equal(d.intermediate, 48 / 2);
	assert_int_equal(d.top_k, 1 * 2);
	/* the replaced value is what the dump shows, in the original place */
	char *t = dump_spec(s);
	assert_non_null(strstr(t, "model:\n  hidden: 96\n  layers: 2\n"));
	assert_null(strstr(t, "hidden: 64"));
	free(t);
	moe_spec_free(s);
}

static void test_set_create(void **state)
{
	(void)state;
	struct capture c;
	struct moe_desc d;
	cap_init(&c);
	struct moe_spec *s = load_base(&c);
	/* shared_experts and router.groups do not exist yet */
	assert_int_equal(moe_spec_set(s, "shared_experts.intermediate=16", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "shared_experts.gate=sigmoid", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "router.groups.count=2", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "router.groups.top=1", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "model.moe_layers=[1]", &c.sink), 0);
	assert_int_equal(
	    moe_spec_set(s, "model.dense_ffn={intermediate: 128, activation: gelu}", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "weights.names.router='a.{layer}.b'", &c.sink), 0);
	assert_int_equal(moe_spec_check(s, &d, &c.sink), 0);
	assert_int_equal(c.n, 0);
	assert_int_equal(d.shared_count, 1);
	assert_int_equal(d.shared_intermediate, 16);
	assert_int_equal(d.shared_gate, MOE_SHARED_GATE_SIGMOID);
	assert_int_equal(d.n_groups, 2);
	assert_int_equal(d.group_top, 1);
	assert_int_equal(d.n_moe_layers, 1);
	assert_int_equal(d.moe_layers[0], 1);
	assert_int_equal(d.dense_intermediate, 128);
	assert_int_equal(d.dense_kind, MOE_KIND_MLP);
	assert_int_equal(d.dense_act, MOE_ACT_GELU);
	assert_string_equal(d.names[MOE_ROLE_ROUTER], "a.{layer}.b");
	char *t = dump_spec(s);
	assert_non_null(strstr(t, "shared_experts:\n  intermediate: 16\n  gate: sigmoid\n"));
	assert_non_null(strstr(t, "  groups:\n    count: 2\n    top: 1\n"));
	assert_non_null(strstr(t, "  moe_layers:\n    - 1\n"));
	assert_non_null(strstr(t, "    router: \"a.{layer}.b\"\n"));
	free(t);
	moe_spec_free(s);
}

/* Diagnostics about overridden values point into the assignment. */
static void test_set_located(void **state)
{
	(void)state;
	struct capture c;
	struct moe_desc d;
	cap_init(&c);
	struct moe_spec *s = load_base(&c);
	const char *a1 = "router.top_k=100", *a2 = "experts.activaton=relu",
		   *a3 = "router.groups={count: 3, top: 1}";
	assert_int_equal(moe_spec_set(s, a1, &c.sink), 0);
	assert_int_equal(moe_spec_set(s, a2, &c.sink), 0);
	assert_int_equal(moe_spec_set(s, a3, &c.sink), 0);
	assert_int_not_equal(moe_spec_check(s, &d, &c.sink), 0);
	const struct diag_line *l = cap_find(&c, "error", "router.top_k (100) exceeds");
	assert_non_null(l);
	assert_string_equal(l->file, "--set");
	assert_int_equal(l->line, 1);
	assert_int_equal(l->col, strchr(a1, '=') - a1 + 2);
	/* the note points back into the file */
	l = cap_find(&c, "note", "experts.count declared here");
	assert_non_null(l);
	assert_string_equal(l->file, "base.yaml");
	assert_int_equal(l->line, 9);
	/* a created key is located at its segment */
	l = cap_find(&c, "error",
		     "unknown key 'activaton' in experts (did you mean 'activation'?)");
	assert_non_null(l);
	assert_string_equal(l->file, "--set");
	assert_int_equal(l->col, strlen("experts.") + 1);
	/* a node inside a flow value is located at its own column */
	l = cap_find(&c, "error", "router.groups.count (3) does not divide experts.count (4)");
	assert_non_null(l);
	assert_int_equal(l->col, strstr(a3, "3,") - a3 + 1);
	assert_int_equal(c.sink.n_errors, 3);
	moe_spec_free(s);
}

static void test_set_errors(void **state)
{
	(void)state;
	static const struct {
		const char *a;
		const char *msg;
		unsigned col;
	} cases[] = {
	    {"noequals", "expected KEY=VALUE, got 'noequals'", 9},
	    {"=3", "empty key", 1},
	    {"model..hidden=3", "empty key segment", 7},
	    {"model.=3", "empty key segment", 7},
	    {".model=3", "empty key segment", 1},
	    {"model.hidden=", "missing value", 14},
	    {"model.hidden.x=1", "cannot set model.hidden.x: model.hidden is a scalar", 7},
	    {"model.hidden.x.y=1", "cannot set model.hidden.x.y: model.hidden is a scalar", 7},
	    {"experts.count=[1,", "did not find expected node content", 18},
	    {"experts.count={a: 1, a: 2}", "duplicate key 'a'", 22},
	    {"experts.count=*x", "aliases (*x) are not supported", 15},
	    {"experts.count=&x 3", "anchors (&x) are not supported", 15},
	    {"experts.count=!!int 3", "tags (!!int) are not supported", 15},
	    {"experts.count=1\n---\n2", "a second YAML document", 17},
	};
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		struct capture c;
		cap_init(&c);
		struct moe_spec *s = load_base(&c);
		assert_int_equal(moe_spec_set(s, cases[i].a, &c.sink), -1);
		const struct diag_line *l = cap_find(&c, "error", cases[i].msg);
		if (!l || l->col != cases[i].col) {
			print_message("--set '%s':\n", cases[i].a);
			cap_print(&c);
		}
		assert_non_null(l);
		assert_string_equal(l->file, "--set");
		assert_int_equal(l->col, cases[i].col);
		moe_spec_free(s);
	}
	/* a path through a sequence */
	struct capture c;
	cap_init(&c);
	struct moe_spec *s = load_base(&c);
	assert_int_equal(moe_spec_set(s, "model.moe_layers=[0, 1]", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "model.moe_layers.first=0", &c.sink), -1);
	assert_non_null(cap_find(&c, "error", "model.moe_layers is a sequence"));
	/* a failed set leaves the spec as it was */
	struct moe_desc d;
	assert_int_equal(moe_spec_check(s, &d, &c.sink), 0);
	assert_int_equal(d.n_moe_layers, 2);
	moe_spec_free(s);
}

/* Hostile values ------------------------------------------------------------- */

/* Check base with one override and return the first error message. */
static const struct diag_line *set_and_check(struct capture *c, const char *assignment)
{
	struct moe_desc d;
	cap_init(c);
	struct moe_spec *s = load_base(c);
	int rc = moe_spec_set(s, assignment, &c->sink);
	if (rc == 0)
		rc = moe_spec_check(s, &d, &c->sink);
	moe_spec_free(s);
	assert_int_not_equal(rc, 0);
	assert_true(c->n > 0);
	return &c->d[0];
}

static void test_integers(void **state)
{
	(void)state;
	static const struct {
		const char *a, *msg;
	} cases[] = {
	    {"model.hidden=99999999999999999999999999",
	     "model.hidden (99999999999999999999999999) is too large: at most 1048576"},
	    {"model.hidden=18446744073709551616", "is too large"},
	    {"model.hidden=4294967297", "is too large"},
	    {"model.hidden=1048577", "model.hidden (1048577) is too large: at most 1048576"},
	    {"model.hidden=-4096", "model.hidden must be a positive integer, got '-4096'"},
	    {"model.hidden=0", "model.hidden must be a positive integer, got '0'"},
	    {"model.hidden=-0", "model.hidden must be a positive integer, got '-0'"},
	    {"model.hidden=64.0", "model.hidden must be a positive integer, got '64.0'"},
	    {"model.hidden=0x40", "must be a positive integer, got '0x40'"},
	    {"model.hidden='64'", "must be a positive integer, got '64' (a quoted string)"},
	    {"model.hidden=", "missing value"},
	    {"model.hidden=[64]", "must be a positive integer, got a sequence"},
	    {"model.layers=513", "model.layers (513) is too large: at most 512"},
	    {"model.vocab=-1", "model.vocab must be a non-negative integer, got '-1'"},
	    {"experts.count=16777217", "experts.count (16777217) is too large"},
	    {"experts.split=2048", "experts.split (2048) is too large"},
	    {"moegen=4294967296", "moegen (4294967296) is too large"},
	    {"moegen=2", "unsupported spec version 2"},
	};
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		struct capture c;
		const struct diag_line *l = set_and_check(&c, cases[i].a);
		if (!strstr(l->msg, cases[i].msg)) {
			print_message("--set '%s':\n", cases[i].a);
			cap_print(&c);
		}
		assert_non_null(strstr(l->msg, cases[i].msg));
	}
	/* sizes whose product overflows are rejected, not wrapped */
	struct capture c;
	struct moe_desc d;
	cap_init(&c);
	struct moe_spec *s = load_base(&c);
	assert_int_equal(moe_spec_set(s, "model.hidden=1048576", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "experts.intermediate=1048576", &c.sink), 0);
	assert_int_equal(moe_spec_set(s, "experts.count=16777216", &c.sink), 0);
	assert_int_not_equal(moe_spec_check(s, &d, &c.sink), 0);
	assert_non_null(cap_find(&c, "error", "exceeds 2^48"));
	moe_spec_free(s);
}

static void test_floats(void **state)
{
	(void)state;
	static const struct {
		const char *a, *msg;
	} cases[] = {
	    {"router.scale=.nan", "router.scale must be a finite number, got '.nan'"},
	    {"router.scale=.inf", "router.scale must be a finite number, got '.inf'"},
	    {"router.scale=-.inf", "must be a finite number, got '-.inf'"},
	    {"router.scale=nan", "must be a finite number, got 'nan'"},
	    {"router.scale=inf", "must be a finite number, got 'inf'"},
	    {"router.scale=1e999", "must be a finite number, got '1e999'"},
	    {"router.scale=1e39", "must be a finite number, got '1e39'"},
	    {"router.scale=0", "router.scale must be > 0, got '0'"},
	    {"router.scale=-1.5", "router.scale must be > 0, got '-1.5'"},
	    {"router.scale=0x1p3", "router.scale must be a number, got '0x1p3'"},
	    {"router.scale=1.5x", "router.scale must be a number, got '1.5x'"},
	    {"router.scale=1..5", "router.scale must be a number, got '1..5'"},
	    {"router.normalize={kind: sum, eps: -1e-9}", "router.normalize.eps must be >= 0"},
	    {"router.capacity={factor: .NaN}", "router.capacity.factor must be a finite number"},
	    {"router.scale=2e6", "router.scale (2e6) is too large"},
	};
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		struct capture c;
		const struct diag_line *l = set_and_check(&c, cases[i].a);
		if (!strstr(l->msg, cases[i].msg)) {
			print_message("--set '%s':\n", cases[i].a);
			cap_print(&c);
		}
		assert_non_null(strstr(l->msg, cases[i].msg));
	}
}

static void test_long_strings(void **state)
{
	(void)state;
	size_t n = 100000;
	char *a = malloc(n + 64);
	assert_non_null(a);
	struct capture c;

	/* a 100 kB name */
	strcpy(a, "name=");
	memset(a + 5, 'x', n);
	a[5 + n] = 0;
	const struct diag_line *l = set_and_check(&c, a);
	assert_non_null(strstr(l->msg, "name is too long (100000 bytes): at most 255"));

	/* a 100 kB weight name */
	strcpy(a, "weights.names.router=");
	size_t p = strlen(a);
	memset(a + p, 'w', n);
	a[p + n] = 0;
	l = set_and_check(&c, a);
	assert_non_null(strstr(l->msg, "weights.names.router is too long (100000 bytes)"));

	/* a 100 kB key: unknown, shown truncated */
	memset(a, 'k', n);
	strcpy(a + n, "=1");
	l = set_and_check(&c, a);
	assert_non_null(strstr(l->msg, "unknown key 'kkkk"));
	assert_true(strlen(l->msg) < 200);

	/* the same in a file (an explicit key: libyaml limits implicit keys
	 * to 1024 characters) */
	size_t m = strlen(base);
	char *t = malloc(m + n + 16);
	assert_non_null(t);
	memcpy(t, base, m);
	memcpy(t + m, "? ", 2);
	memset(t + m + 2, 'q', n);
	strcpy(t + m + 2 + n, "\n: 1\n");
	struct moe_desc d;
	cap_init(&c);
	assert_int_not_equal(check_text(t, &c, &d), 0);
	l = cap_find(&c, "error", "unknown key 'qqq");
	assert_non_null(l);
	assert_int_equal(l->line, 11);
	free(t);
	free(a);
}

/* Random bytes, and random text made of YAML's special characters, never
 * crash, never leak and never produce a valid spec. */
static void test_garbage(void **state)
{
	(void)state;
	uint64_t x = 0x9e3779b97f4a7c15ull;
	static const char yamlish[] = "ab01:-[]{},#&*!|>'\"%@`? \n\n\t.=";
	char buf[600];
	struct capture *c = malloc(sizeof *c);
	struct moe_desc *d = malloc(sizeof *d);
	assert_non_null(c);
	assert_non_null(d);
	for (int i = 0; i < 400; i++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		size_t len = (size_t)(x >> 33) % sizeof buf;
		for (size_t j = 0; j < len; j++) {
			x = x * 6364136223846793005ull + 1442695040888963407ull;
			unsigned r = (unsigned)(x >> 40);
			buf[j] = i % 2 ? (char)r : yamlish[r % (sizeof yamlish - 1)];
		}
		cap_init(c);
		struct moe_spec *s = moe_spec_load_string("g.yaml", buf, len, &c->sink);
		int rc = s ? moe_spec_check(s, d, &c->sink) : -1;
		if (s) {
			char *t = dump_spec(s);
			free(t);
		}
		moe_spec_free(s);
		assert_int_not_equal(rc, 0);
		assert_true(c->sink.n_errors > 0);
	}
	free(c);
	free(d);
}

/* The canonical dump: block style, plain scalars as written, others
 * double-quoted with escapes, empty collections inline. */
static void test_dump_format(void **state)
{
	(void)state;
	struct capture c;
	cap_init(&c);
	const char *t = "b: {x: 1, 'y': \"q\\\"z\\n\"}\n"
			"a: [1, [2, 3], {k: v, l: w}, []]\n"
			"e: {}\n"
			"n:\n";
	struct moe_spec *s = moe_spec_load_string("d.yaml", t, strlen(t), &c.sink);
	assert_non_null(s);
	char *out = dump_spec(s);
	assert_string_equal(out, "b:\n"
				 "  x: 1\n"
				 "  \"y\": \"q\\\"z\\n\"\n"
				 "a:\n"
				 "  - 1\n"
				 "  -\n"
				 "    - 2\n"
				 "    - 3\n"
				 "  - k: v\n"
				 "    l: w\n"
				 "  - []\n"
				 "e: {}\n"
				 "n:\n");
	free(out);
	moe_spec_free(s);
}

/* Every error of the stage is reported, not just the first. */
static void test_all_errors(void **state)
{
	(void)state;
	struct capture c;
	struct moe_desc d;
	cap_init(&c);
	const char *t = "moegen: 1\nname: t\nmodel: {hidden: x, layers: y, hiden: 3}\n"
			"router: {top_k: z, score: softmx}\nexperts: {count: w, intermediate: v}\n";
	assert_int_not_equal(check_text(t, &c, &d), 0);
	assert_int_equal(c.sink.n_errors, 7);
	static const char *const subs[] = {
	    "model.hidden", "model.layers",  "unknown key 'hiden'", "router.top_k",
	    "router.score", "experts.count", "experts.intermediate"};
	for (size_t i = 0; i < sizeof subs / sizeof *subs; i++)
		assert_non_null(cap_find(&c, "error", subs[i]));
	/* the description is left zeroed on failure */
	struct moe_desc zero;
	memset(&zero, 0, sizeof zero);
	assert_memory_equal(&d, &zero, sizeof d);
}

/* The capacity forms and the quantization block resolve to the values
 * written, in the written order, and apply through --set overrides. */
static void test_capacity_and_quant(void **state)
{
	(void)state;
	struct capture c;
	struct moe_desc d;
	char t[1024];
	snprintf(t, sizeof t,
		 "%sweights:\n  names: {down: 'l.{layer}.down'}\n"
		 "  layout: {down: {quant: {kind: fp8_block, block: [64, 16], scales: "
		 "'l.{layer}.down_s'}}}\n",
		 base);
	cap_init(&c);
	assert_int_equal(check_text(t, &c, &d), 0);
	assert_int_equal(d.layouts[MOE_ROLE_DOWN].quant, MOE_QUANT_FP8_BLOCK);
	assert_int_equal(d.layouts[MOE_ROLE_DOWN].quant_block[0], 64);
	assert_int_equal(d.layouts[MOE_ROLE_DOWN].quant_block[1], 16);
	assert_string_equal(d.scale_names[MOE_ROLE_DOWN], "l.{layer}.down_s");

	struct moe_spec *s = moe_spec_load_string("t.yaml", base, strlen(base), &c.sink);
	assert_non_null(s);
	assert_int_equal(moe_spec_set(s, "router.capacity={token_fraction: 0.3, min: 5}", &c.sink),
			 0);
	assert_int_equal(moe_spec_check(s, &d, &c.sink), 0);
	assert_int_equal(d.capacity, MOE_CAPACITY_TOKEN_FRACTION);
	assert_true(d.capacity_token_fraction == 0.3f);
	assert_int_equal(d.capacity_min, 5);
	assert_int_equal(d.capacity_floor, 0);
	assert_int_equal(d.capacity_norm_after_drop, 0);
	/* rounding goes with factor only; the error is located at the override */
	assert_int_equal(moe_spec_set(s, "router.capacity.rounding=floor", &c.sink), 0);
	cap_init(&c);
	assert_int_not_equal(moe_spec_check(s, &d, &c.sink), 0);
	const struct diag_line *l = cap_find(&c, "error", "rounding applies only to factor");
	assert_non_null(l);
	assert_string_equal(l->file, "--set");
	assert_int_equal(l->col, strlen("router.capacity.") + 1); /* at the key */
	assert_int_equal(c.sink.n_errors, 1);
	assert_int_equal(
	    moe_spec_set(s, "router.capacity={factor: 1.0, rounding: floor, min: 2}", &c.sink), 0);
	assert_int_equal(moe_spec_check(s, &d, &c.sink), 0);
	assert_int_equal(d.capacity, MOE_CAPACITY_FACTOR);
	assert_int_equal(d.capacity_floor, 1);
	assert_int_equal(d.capacity_min, 2);
	assert_true(d.capacity_token_fraction == 0.0f);
	/* a second form: the first one in the mapping stands, one error */
	assert_int_equal(moe_spec_set(s, "router.capacity.per_expert=4", &c.sink), 0);
	cap_init(&c);
	assert_int_not_equal(moe_spec_check(s, &d, &c.sink), 0);
	assert_non_null(cap_find(&c, "error", "not both factor and per_expert"));
	assert_int_equal(c.sink.n_errors, 1);
	moe_spec_free(s);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_good),
	    cmocka_unit_test(test_bad),
	    cmocka_unit_test(test_bad_runner_fails),
	    cmocka_unit_test(test_locations),
	    cmocka_unit_test(test_unreadable),
	    cmocka_unit_test(test_set_replace),
	    cmocka_unit_test(test_set_create),
	    cmocka_unit_test(test_set_located),
	    cmocka_unit_test(test_set_errors),
	    cmocka_unit_test(test_integers),
	    cmocka_unit_test(test_floats),
	    cmocka_unit_test(test_long_strings),
	    cmocka_unit_test(test_garbage),
	    cmocka_unit_test(test_dump_format),
	    cmocka_unit_test(test_all_errors),
	    cmocka_unit_test(test_capacity_and_quant),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
