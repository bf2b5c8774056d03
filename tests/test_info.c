/* test_info.c: parameter, FLOP and byte accounting (info.c) on descriptions
 * built by hand, checked against formulas written out here, and against the
 * published Mixtral-8x7B and DeepSeek-V3 figures. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moegen.h"

static struct moe_desc *desc_new(uint32_t H, uint32_t layers)
{
	struct moe_desc *d = calloc(1, sizeof *d);
	assert_non_null(d);
	d->version = MOE_DESC_VERSION;
	strcpy(d->name, "hand");
	d->hidden = H;
	d->n_layers = layers;
	d->n_moe_layers = layers;
	for (uint32_t i = 0; i < layers; i++)
		d->moe_layers[i] = i;
	d->split = 1;
	d->scale = 1;
	return d;
}

static void assert_close(double got, double want, double rel)
{
	double err = fabs(got - want) / fabs(want);
	if (err > rel)
		fail_msg("got %.0f, want %.0f (relative error %.4f > %.4f)", got, want, err, rel);
}

#define assert_exact(got, want) assert_close_exact(got, want, #got)
static void assert_close_exact(double got, double want, const char *what)
{
	if (got != want)
		fail_msg("%s: got %.0f, want %.0f", what, got, want);
}

/* GLU token choice, no shared experts, nothing outside the MoE layers. */
static void test_glu_token_choice(void **state)
{
	(void)state;
	double H = 8, E = 4, I = 6, k = 2, L = 3;
	struct moe_desc *d = desc_new(8, 3);
	d->n_experts = 4, d->intermediate = 6, d->top_k = 2;
	struct moe_counts c;
	moe_info_count(d, &c);

	double expert = 3 * I * H; /* gate, up, down */
	assert_exact(c.routed_total, L * E * expert);
	assert_exact(c.routed_active, L * k * expert);
	assert_exact(c.router, L * E * H);
	assert_exact(c.shared, 0);
	assert_exact(c.attention + c.embedding + c.norms + c.dense_ffn, 0);
	assert_exact(c.total, L * (E * expert + E * H));
	assert_exact(c.active, L * (k * expert + E * H));
	assert_exact(c.active_no_embed_in, c.active);
	assert_exact(c.experts_per_token, k);
	assert_exact(c.layer_flops, 2 * (E * H + k * 3 * I * H));
	assert_exact(c.flops_per_token, L * c.layer_flops);
	assert_exact(c.layer_weight_bytes, 4 * (E * H + k * expert));
	assert_exact(c.weight_bytes_per_token, L * 4 * (E * H + k * expert));
	assert_exact(c.model_flops, 0); /* no attention described */

	d->weight_dtype = MOE_DTYPE_BF16;
	moe_info_count(d, &c);
	assert_exact(c.weight_bytes_per_token, L * 2 * (E * H + k * expert));
	free(d);
}

/* Every optional part at once: MLP experts with biases, router bias,
 * selection bias, noise, a gated shared FFN, dense layers, GQA attention and
 * a tied embedding table. */
static void test_everything(void **state)
{
	(void)state;
	double H = 16, E = 8, I = 12, k = 3, L = 5, nm = 2, Id = 20, Is = 2 * 6;
	double heads = 4, kv = 2, hd = 8, V = 50;
	struct moe_desc *d = desc_new(16, 5);
	d->n_moe_layers = 2, d->moe_layers[0] = 1, d->moe_layers[1] = 3;
	d->dense_intermediate = 20, d->dense_kind = MOE_KIND_GLU;
	d->n_experts = 8, d->intermediate = 12, d->top_k = 3;
	d->kind = MOE_KIND_MLP, d->act = MOE_ACT_RELU, d->expert_bias = 1;
	d->router_bias = 1, d->select_bias = 1, d->noise = MOE_NOISE_LEARNED_GAUSSIAN;
	d->shared_count = 2, d->shared_intermediate = 6, d->shared_kind = MOE_KIND_GLU;
	d->shared_gate = MOE_SHARED_GATE_SIGMOID;
	d->attn = MOE_ATTN_MHA, d->attn_heads = 4, d->attn_kv_heads = 2, d->attn_head_dim = 8;
	d->vocab = 50, d->tied_embeddings = 1;
	struct moe_counts c;
	moe_info_count(d, &c);

	double expert = I * H + H * I + I + H; /* up, down, their biases */
	double router = E * H + E + E + E * H; /* weight, bias, select bias, noise */
	double shared = 3 * Is * H + H;        /* GLU plus the [1, H] gate */
	double dense = 3 * Id * H;
	double attn = H * heads * hd + 2 * H * kv * hd + heads * hd * H;
	assert_exact(c.routed_total, nm * E * expert);
	assert_exact(c.routed_active, nm * k * expert);
	assert_exact(c.router, nm * router);
	assert_exact(c.shared, nm * shared);
	assert_exact(c.dense_ffn, (L - nm) * dense);
	assert_exact(c.attention, L * attn);
	assert_exact(c.embedding, V * H);
	assert_exact(c.norms, (2 * L + 1) * H);
	double rest =
	    nm * (router + shared) + (L - nm) * dense + L * attn + V * H + (2 * L + 1) * H;
	assert_exact(c.total, nm * E * expert + rest);
	assert_exact(c.active, nm * k * expert + rest);
	/* tied: the output head reads the whole table */
	assert_exact(c.active_no_embed_in, c.active);

	/* inference: no noise projection, biases are additions */
	double layer_macs = E * H + k * 2 * I * H + (3 * Is * H + H);
	assert_exact(c.layer_flops, 2 * layer_macs);
	assert_exact(c.layer_weight_bytes, 4 * ((router - E * H) + k * expert + shared));
	assert_exact(c.model_flops, 2 * (nm * layer_macs + (L - nm) * dense + L * attn + V * H));

	d->tied_embeddings = 0;
	moe_info_count(d, &c);
	assert_exact(c.embedding, 2 * V * H);
	assert_exact(c.active_no_embed_in, c.active - V * H);
	free(d);
}

/* Multi-head latent attention, with and without the q compression. */
static void test_mla(void **state)
{
	(void)state;
	double H = 32, h = 4, qr = 12, kvr = 6, nope = 8, rope = 4, v = 5;
	struct moe_desc *d = desc_new(32, 1);
	d->n_experts = 2, d->intermediate = 4, d->top_k = 1;
	d->attn = MOE_ATTN_MLA, d->attn_heads = 4;
	d->mla_q_lora_rank = 12, d->mla_kv_lora_rank = 6;
	d->mla_qk_nope_dim = 8, d->mla_qk_rope_dim = 4, d->mla_v_dim = 5;
	struct moe_counts c;
	moe_info_count(d, &c);
	double q_a = H * qr, q_norm = qr, q_b = qr * h * (nope + rope);
	double kv_a = H * (kvr + rope), kv_norm = kvr, kv_b = kvr * h * (nope + v);
	double o = h * v * H;
	assert_exact(c.attention, q_a + q_norm + q_b + kv_a + kv_norm + kv_b + o);
	/* the norms are not matmuls */
	double moe_macs = 2 * H + 3 * 4 * H;
	assert_exact(c.model_flops, 2 * (moe_macs + q_a + q_b + kv_a + kv_b + o));

	d->mla_q_lora_rank = 0;
	moe_info_count(d, &c);
	assert_exact(c.attention, H * h * (nope + rope) + kv_a + kv_norm + kv_b + o);
	free(d);
}

/* Counts of a spec given as text; the description also reads back from its
 * dump (moe_desc_parse) to the same counts. */
static void count_text(const char *text, struct moe_counts *c)
{
	struct moe_diag d = {0};
	struct moe_spec *sp = moe_spec_load_string("t.yaml", text, strlen(text), &d);
	assert_non_null(sp);
	struct moe_desc *desc = calloc(1, sizeof *desc), *back = calloc(1, sizeof *back);
	assert_true(desc && back);
	assert_int_equal(moe_spec_check(sp, desc, &d), 0);
	moe_info_count(desc, c);
	char dump[8192], err[256];
	assert_true(moe_desc_dump(desc, dump, sizeof dump) < sizeof dump);
	if (moe_desc_parse(dump, back, err, sizeof err) != 0)
		fail_msg("%s", err);
	struct moe_counts c2;
	moe_info_count(back, &c2);
	assert_exact(c2.attention, c->attention);
	assert_exact(c2.norms, c->norms);
	free(back);
	free(desc);
	moe_spec_free(sp);
}

/* The attention keys beside the projections, from a spec through the
 * checker: biases, q/k norms, sinks, the output gate, LayerNorm, and the
 * linear-attention layers of a hybrid model. */
static void test_attention_variants(void **state)
{
	(void)state;
	static const char head[] = "moegen: 1\nname: t\nmodel:\n  hidden: 32\n  layers: 4\n"
				   "  vocab: 10\n  tied_embeddings: true\n";
	static const char tail[] = "router: {top_k: 1}\nexperts: {count: 2, intermediate: 4}\n";
	double H = 32, h = 4, kv = 2, hd = 8, L = 4;
	double plain = H * h * hd + 2 * H * kv * hd + h * hd * H;
	char text[1024];
	struct moe_counts c;

	snprintf(text, sizeof text,
		 "%s  attention: {heads: 4, kv_heads: 2, head_dim: 8, qkv_bias: true, "
		 "out_bias: true, sinks: true, qk_norm: full}\n  norm: layer\n%s",
		 head, tail);
	count_text(text, &c);
	assert_exact(c.attention,
		     L * (plain + (h * hd + 2 * kv * hd) + H + h + (h * hd + kv * hd)));
	assert_exact(c.norms, (2 * L + 1) * 2 * H);

	/* Qwen3-Next: gated full attention in layers 1 and 3, Gated DeltaNet in
	 * 0 and 2 (value heads 4 of dim 6, key heads 2 of dim 5, conv 3). */
	snprintf(text, sizeof text,
		 "%s  attention: {heads: 4, kv_heads: 2, head_dim: 8, qk_norm: head, "
		 "output_gate: true, linear: {kind: gated_deltanet, layers: [0, 2], heads: 4, "
		 "head_dim: 6, key_heads: 2, key_head_dim: 5, conv_kernel: 3}}\n%s",
		 head, tail);
	count_text(text, &c);
	double full = plain + H * h * hd + 2 * hd;
	double K = 2 * 5, V = 4 * 6;
	double deltanet = H * (2 * K + 2 * V) + H * 2 * 4 + (2 * K + V) * 3 + 2 * 4 + 6 + V * H;
	assert_exact(c.attention, 2 * full + 2 * deltanet);
	assert_exact(c.norms, (2 * L + 1) * H);

	/* MiniMax-01: lightning attention (heads and head_dim default to the
	 * attention's) in three of the four layers. */
	snprintf(text, sizeof text,
		 "%s  attention: {heads: 4, kv_heads: 2, head_dim: 8, linear: {kind: lightning, "
		 "layers: [0, 1, 3]}}\n%s",
		 head, tail);
	count_text(text, &c);
	double lightning = 3 * H * h * hd + H * h * hd + h * hd * H + h * hd;
	assert_exact(c.attention, plain + 3 * lightning);
}

static void test_hierarchical(void **state)
{
	(void)state;
	double H = 8, E = 16, G = 4, b = E / G, k1 = 2, k2 = 3, I = 4;
	struct moe_desc *d = desc_new(8, 1);
	d->mode = MOE_MODE_HIERARCHICAL, d->n_levels = 2;
	d->levels[0] = (struct moe_level){.groups = 4, .top_k = 2};
	d->levels[1] = (struct moe_level){.groups = 0, .top_k = 3};
	d->n_experts = 16, d->intermediate = 4, d->kind = MOE_KIND_MLP, d->act = MOE_ACT_RELU;
	d->top_k = 6;
	struct moe_counts c;
	moe_info_count(d, &c);
	double expert = 2 * I * H;
	assert_exact(c.experts_per_token, k1 * k2);
	assert_exact(c.router, G * H + E * H); /* gate over groups + a gate per group */
	assert_exact(c.routed_active, k1 * k2 * expert);
	/* a token evaluates the group gate and the gates of its k1 groups */
	double router_macs = G * H + k1 * b * H;
	assert_exact(c.layer_flops, 2 * (router_macs + k1 * k2 * expert));
	assert_exact(c.layer_weight_bytes, 4 * (router_macs + k1 * k2 * expert));
	free(d);
}

static void test_expert_choice(void **state)
{
	(void)state;
	double H = 8, E = 8, I = 4, f = 2;
	struct moe_desc *d = desc_new(8, 1);
	d->mode = MOE_MODE_EXPERT_CHOICE, d->ec_capacity_factor = 2;
	d->n_experts = 8, d->intermediate = 4;
	struct moe_counts c;
	moe_info_count(d, &c);
	double expert = 3 * I * H;
	/* E experts x ceil(T f / E) tokens = about f experts per token */
	assert_exact(c.experts_per_token, f);
	assert_exact(c.routed_active, f * expert);
	assert_exact(c.layer_flops, 2 * (E * H + f * expert));
	/* a lone token is taken by every expert */
	assert_exact(c.layer_weight_bytes, 4 * (E * H + E * expert));
	free(d);
}

static void test_soft(void **state)
{
	(void)state;
	double H = 8, E = 4, P = 2, S = E * P, I = 4;
	struct moe_desc *d = desc_new(8, 1);
	d->mode = MOE_MODE_SOFT, d->soft_slots_per_expert = 2;
	d->n_experts = 4, d->intermediate = 4, d->kind = MOE_KIND_MLP, d->act = MOE_ACT_GELU;
	struct moe_counts c;
	moe_info_count(d, &c);
	double expert = 2 * I * H;
	assert_exact(c.router, S * H + 1); /* slot parameters and the scale */
	/* every token's output mixes every expert's slots */
	assert_exact(c.routed_active, E * expert);
	assert_exact(c.active, c.total);
	/* at T = S one expert application per token; logits, dispatch and
	 * combine cost S H each */
	assert_exact(c.experts_per_token, 1);
	assert_exact(c.layer_flops, 2 * (3 * S * H + expert));
	assert_exact(c.layer_weight_bytes, 4 * (S * H + 1 + E * expert));
	free(d);
}

static void test_product_key(void **state)
{
	(void)state;
	double H = 8, R = 16, N = R * R, heads = 2, k = 3, dq = 8, Q = heads * dq;
	struct moe_desc *d = desc_new(8, 1);
	d->mode = MOE_MODE_PRODUCT_KEY, d->kind = MOE_KIND_SINGLE_NEURON, d->act = MOE_ACT_RELU;
	d->n_experts = 256, d->pk_sub_keys = 16, d->pk_heads = 2, d->pk_top_k = 3;
	d->pk_query_dim = 8;
	struct moe_counts c;
	moe_info_count(d, &c);
	assert_exact(c.routed_total, N * 2 * H);            /* u_i and v_i */
	assert_exact(c.router, Q * H + Q + 2 * R * dq / 2); /* query, bias, two sub-key sets */
	assert_exact(c.experts_per_token, heads * k);
	assert_exact(c.routed_active, heads * k * 2 * H);
	double macs = Q * H + heads * 2 * R * (dq / 2) + heads * k * 2 * H;
	assert_exact(c.layer_flops, 2 * macs);
	assert_exact(c.layer_weight_bytes, 4 * (Q * H + Q + 2 * R * dq / 2 + heads * k * 2 * H));
	free(d);
}

static void test_dense_mode(void **state)
{
	(void)state;
	double H = 8, E = 4, I = 4;
	struct moe_desc *d = desc_new(8, 1);
	d->mode = MOE_MODE_DENSE, d->n_experts = 4, d->intermediate = 4, d->top_k = 4;
	struct moe_counts c;
	moe_info_count(d, &c);
	assert_exact(c.routed_active, c.routed_total);
	assert_exact(c.layer_flops, 2 * (E * H + E * 3 * I * H));
	free(d);
}

/* Fine-grained split m keeps the expert parameters and compute, and
 * multiplies the router rows by m. */
static void test_split_invariance(void **state)
{
	(void)state;
	struct moe_desc *a = desc_new(16, 2), *b = desc_new(16, 2);
	a->n_experts = 4, a->intermediate = 8, a->top_k = 1;
	b->n_experts = 16, b->intermediate = 2, b->top_k = 4, b->split = 4;
	struct moe_counts ca, cb;
	moe_info_count(a, &ca);
	moe_info_count(b, &cb);
	assert_exact(cb.routed_total, ca.routed_total);
	assert_exact(cb.routed_active, ca.routed_active);
	assert_exact(cb.router, 4 * ca.router);
	assert_exact(cb.layer_flops - 2 * 16 * 16, ca.layer_flops - 2 * 4 * 16);
	free(a);
	free(b);
}

static struct moe_desc *mixtral(void)
{
	struct moe_desc *d = desc_new(4096, 32);
	strcpy(d->name, "mixtral-8x7b");
	d->vocab = 32000;
	d->attn = MOE_ATTN_MHA, d->attn_heads = 32, d->attn_kv_heads = 8, d->attn_head_dim = 128;
	d->weight_dtype = MOE_DTYPE_BF16;
	d->n_experts = 8, d->intermediate = 14336, d->top_k = 2, d->norm = MOE_NORM_SUM;
	return d;
}

/* Published: 46.7B total, 12.9B active (Mixtral paper), to three digits. */
static void test_mixtral_published(void **state)
{
	(void)state;
	struct moe_desc *d = mixtral();
	struct moe_counts c;
	moe_info_count(d, &c);
	assert_close(c.total, 46.7e9, 0.005);
	assert_close(c.active, 12.9e9, 0.005);
	assert_int_equal((long)lround(c.total / 1e8), 467);
	assert_int_equal((long)lround(c.active / 1e8), 129);
	free(d);
}

/* Published: 671B total, 37B active (DeepSeek-V3 report), MTP excluded.
 * DeepSeek leaves the input embedding out of "active". */
static void test_deepseek_v3_published(void **state)
{
	(void)state;
	double H = 7168, L = 61, nd = 3, nm = L - nd, E = 256, I = 2048, k = 8, V = 129280;
	struct moe_desc *d = desc_new(7168, 61);
	strcpy(d->name, "deepseek-v3");
	d->n_moe_layers = 58;
	for (uint32_t i = 0; i < 58; i++)
		d->moe_layers[i] = 3 + i;
	d->dense_intermediate = 18432, d->dense_kind = MOE_KIND_GLU;
	d->vocab = 129280;
	d->attn = MOE_ATTN_MLA, d->attn_heads = 128, d->mla_q_lora_rank = 1536;
	d->mla_kv_lora_rank = 512, d->mla_qk_nope_dim = 128, d->mla_qk_rope_dim = 64;
	d->mla_v_dim = 128;
	d->weight_dtype = MOE_DTYPE_BF16;
	d->score = MOE_SCORE_SIGMOID, d->select_bias = 1, d->n_groups = 8, d->group_top = 4;
	d->n_experts = 256, d->intermediate = 2048, d->top_k = 8;
	d->shared_count = 1, d->shared_intermediate = 2048;
	struct moe_counts c;
	moe_info_count(d, &c);

	assert_close(c.total, 671e9, 0.005);
	assert_close(c.active_no_embed_in, 37e9, 0.015);
	assert_int_equal((long)lround(c.active_no_embed_in / 1e9), 37);

	double mla =
	    H * 1536 + 1536 + 1536 * 128 * 192 + H * 576 + 512 + 512 * 128 * 256 + 128 * 128 * H;
	double expert = 3 * I * H;
	double fixed =
	    nm * (E * H + E + expert) + nd * 3 * 18432 * H + L * mla + 2 * V * H + (2 * L + 1) * H;
	assert_exact(c.total, nm * E * expert + fixed);
	assert_exact(c.active, nm * k * expert + fixed);
	free(d);
}

/* The printout: stable, aligned rows with the exact counts. */
static void test_print(void **state)
{
	(void)state;
	struct moe_desc *d = mixtral();
	char *a = NULL, *b = NULL;
	size_t na = 0, nb = 0;
	FILE *f = open_memstream(&a, &na);
	moe_info_print(d, f);
	fclose(f);
	f = open_memstream(&b, &nb);
	moe_info_print(d, f);
	fclose(f);
	assert_string_equal(a, b);

	double H = 4096, L = 32, expert = 3 * 14336 * H;
	double total =
	    L * (8 * expert + 8 * H + 2 * H * H + 2 * H * 1024) + 2 * 32000 * H + (2 * L + 1) * H;
	char want[64];
	snprintf(want, sizeof want, "%.0f", total);
	assert_non_null(strstr(a, want));
	snprintf(want, sizeof want, "%.1fB", total / 1e9); /* three digits: 46.7B */
	assert_non_null(strstr(a, want));
	assert_non_null(strstr(a, "mixtral-8x7b"));

	/* every parameter row has its label at column 2 and the same width */
	const char *labels[] = {"routed experts", "shared experts", "router", "dense ffn",
				"attention",      "embedding",      "norms",  "total"};
	const char *table = strstr(a, "\n  parameters");
	assert_non_null(table);
	size_t width = 0;
	for (size_t i = 0; i < sizeof labels / sizeof *labels; i++) {
		char key[64];
		snprintf(key, sizeof key, "\n  %s ", labels[i]);
		const char *p = strstr(table, key);
		assert_non_null(p);
		size_t w = strcspn(p + 1, "\n");
		if (i == 0)
			width = w;
		assert_int_equal(w, width);
	}
	free(a);
	free(b);
	free(d);
}

/* A zeroed description must not divide by zero or crash. */
static void test_degenerate(void **state)
{
	(void)state;
	struct moe_desc *d = calloc(1, sizeof *d);
	assert_non_null(d);
	struct moe_counts c;
	moe_info_count(d, &c);
	assert_exact(c.total, 0);
	d->mode = MOE_MODE_HIERARCHICAL;
	moe_info_count(d, &c);
	assert_exact(c.total, 0);
	char *a = NULL;
	size_t n = 0;
	FILE *f = open_memstream(&a, &n);
	moe_info_print(d, f);
	fclose(f);
	assert_true(n > 0);
	free(a);
	free(d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_glu_token_choice),
	    cmocka_unit_test(test_everything),
	    cmocka_unit_test(test_mla),
	    cmocka_unit_test(test_attention_variants),
	    cmocka_unit_test(test_hierarchical),
	    cmocka_unit_test(test_expert_choice),
	    cmocka_unit_test(test_soft),
	    cmocka_unit_test(test_product_key),
	    cmocka_unit_test(test_dense_mode),
	    cmocka_unit_test(test_split_invariance),
	    cmocka_unit_test(test_mixtral_published),
	    cmocka_unit_test(test_deepseek_v3_published),
	    cmocka_unit_test(test_print),
	    cmocka_unit_test(test_degenerate),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
