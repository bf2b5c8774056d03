/* test_cuda_emu.c: the generated CUDA kernels and the device runtime, run
 * without a GPU: each spec's CUDA C is compiled for the host emulation of
 * tests/cuda_emu (fibers for threads, emulated mma.sync, ldmatrix and
 * shuffles), runtime/cuda_rt.c drives it through an emulated libcuda, and
 * the output and routing must match the reference forward. Needs cc and a
 * C++17 compiler (skipped with a message without them). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda.h"

static char dir[64];
static char driver_so[256];
static int ready;
static const char *srcdir = ".";

#if defined(__SANITIZE_ADDRESS__)
#define EMU_SAN " -fsanitize=address,undefined"
#else
#define EMU_SAN ""
#endif

static int run(const char *cmd)
{
	int rc = system(cmd);
	if (rc != 0)
		fprintf(stderr, "test_cuda_emu: command failed (%d): %s\n", rc, cmd);
	return rc;
}

static int setup(void **state)
{
	(void)state;
	const char *s = getenv("MOE_SOURCE_DIR");
	if (s && *s)
		srcdir = s;
	snprintf(dir, sizeof dir, "/tmp/moegen-cuda-emu.XXXXXX");
	if (!mkdtemp(dir))
		return -1;
	char cmd[2048];
	snprintf(driver_so, sizeof driver_so, "%s/libcuda_emu.so", dir);
	snprintf(cmd, sizeof cmd,
		 "cc -std=c11 -O1 -g -shared -fPIC%s -o %s %s/tests/cuda_emu/driver.c", EMU_SAN,
		 driver_so, srcdir);
	if (system("c++ --version >/dev/null 2>&1") != 0) {
		fprintf(stderr, "test_cuda_emu: no C++ compiler: emulation tests skipped\n");
		return 0;
	}
	if (run(cmd) != 0)
		return 0;
	/* before anything opens the driver: cuda_rt.c opens it once */
	setenv("MOE_LIBCUDA", driver_so, 1);
	ready = 1;
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	char cmd[256];
	snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
	return system(cmd) == 0 ? 0 : -1;
}

static long live_allocs(void)
{
	void *h = dlopen(driver_so, RTLD_NOW | RTLD_NOLOAD);
	assert_non_null(h);
	long (*f)(void);
	*(void **)&f = dlsym(h, "moe_emu_live_allocs");
	assert_non_null(f);
	long n = f();
	dlclose(h);
	return n;
}

static void quiet(void *ctx, const char *line)
{
	(void)ctx;
	fprintf(stderr, "%s\n", line);
}

struct ecase {
	const char *spec;
	const char *sets[10];
	size_t T;
	int dense;    /* turn the router into mode dense */
	int training; /* forward in training mode (the noise drawn) */
};

/* Compile d's kernels for the emulation into dir/NAME.so. */
static void build_module(const struct moe_desc *d, const char *tag, char *so, size_t cap)
{
	struct moe_plan p;
	struct moe_diag dg = {.sink = quiet};
	assert_int_equal(moe_plan_build(d, MOE_TARGET_CUDA, &p, &dg), 0);
	char *src = NULL, err[1024], cu[512], cmd[4096];
	size_t len;
	assert_int_equal(moe_cuda_emit_source(&p, &src, &len, err, sizeof err), 0);
	snprintf(cu, sizeof cu, "%s/%s.cu", dir, tag);
	FILE *f = fopen(cu, "w");
	assert_non_null(f);
	assert_int_equal(fwrite(src, 1, len, f), len);
	assert_int_equal(fclose(f), 0);
	free(src);
	snprintf(so, cap, "%s/%s.so", dir, tag);
	/* -Og -g -fno-var-tracking: line tables for the sanitizers' reports, in
	 * under half the compile time of -O1 -g (the variable tracking alone
	 * doubled it) */
	snprintf(cmd, sizeof cmd,
		 "c++ -std=c++17 -Og -g -fno-var-tracking -shared -fPIC -ffp-contract=off -w%s "
		 "-I%s/tests/cuda_emu "
		 "-DMOE_EMU_SOURCE='\"%s\"' -o %s %s/tests/cuda_emu/module.cpp",
		 EMU_SAN, srcdir, cu, so, srcdir);
	assert_int_equal(run(cmd), 0);
}

static float urand(uint64_t i)
{
	return 2.0f * moe_rng_uniform(moe_rng_hash(77, i, 0, 0)) - 1.0f;
}

/* One spec: reference vs the emulated device, output, routing, statistics. */
static void check_case(const struct ecase *ec, const char *tag)
{
	if (!ready)
		skip();
	int n_sets = 0;
	while (ec->sets[n_sets])
		n_sets++;
	char path[512];
	snprintf(path, sizeof path, "%s/%s", srcdir, ec->spec);
	struct moe_desc *d = calloc(1, sizeof *d);
	assert_non_null(d);
	struct moe_diag dg = {.sink = quiet};
	assert_int_equal(moe_front(path, ec->sets, n_sets, d, &dg), 0);
	if (ec->dense) {
		d->mode = MOE_MODE_DENSE;
		d->top_k = d->n_experts;
		d->capacity = MOE_CAPACITY_NONE;
	}
	char so[512];
	build_module(d, tag, so, sizeof so);

	size_t T = ec->T, H = d->hidden, W = moe_desc_route_width(d), E = d->n_experts;
	struct moe_ref_weights w;
	assert_int_equal(moe_ref_weights_alloc(d, &w), MOE_OK);
	moe_ref_weights_random(d, 5, d->moe_layers[0], &w);
	float *x = malloc(T * H * sizeof *x), *yref = malloc(T * H * sizeof *yref);
	float *y = malloc(T * H * sizeof *y);
	uint16_t *xb = malloc(T * H * 2), *yb = malloc(T * H * 2);
	int32_t *ids = malloc(T * W * 4), *ids_ref = malloc(T * W * 4);
	float *wt = malloc(T * W * 4), *wt_ref = malloc(T * W * 4);
	int64_t *cnt = malloc(E * 8), *cnt_ref = malloc(E * 8);
	float *imp = malloc(E * 4), *imp_ref = malloc(E * 4);
	assert_true(x && yref && y && xb && yb && ids && ids_ref && wt && wt_ref && cnt &&
		    cnt_ref && imp && imp_ref);
	int bf16 = d->act_dtype == MOE_DTYPE_BF16;
	for (size_t i = 0; i < T * H; i++) {
		x[i] = urand(i);
		if (bf16) {
			xb[i] = moe_f32_to_bf16(x[i]);
			x[i] = moe_bf16_to_f32(xb[i]);
		}
	}
	char err[4096] = "";
	struct moe_routing rr = {ids_ref, wt_ref, cnt_ref, imp_ref, 0, 0, 0, 0};
	struct moe_fwd_opts fo = {ec->training, 1234, d->moe_layers[0]};
	assert_int_equal(moe_ref_forward(d, &w, x, yref, T, &fo, &rr, err, sizeof err), MOE_OK);
	if (ec->training) { /* the noise changes the routing: the case tests it */
		struct moe_routing r0 = {ids, wt, cnt, imp, 0, 0, 0, 0};
		assert_int_equal(moe_ref_forward(d, &w, x, y, T, NULL, &r0, err, sizeof err),
				 MOE_OK);
		size_t changed = 0;
		for (size_t i = 0; i < T * W; i++)
			changed += ids[i] != ids_ref[i] || wt[i] != wt_ref[i];
		fprintf(stderr, "%s: the noise changes %zu of %zu slots\n", tag, changed, T * W);
		assert_true(changed > 0);
	}

	struct moe_cuda_image im = {"sm_90", (const unsigned char *)so, strlen(so) + 1};
	struct moe_cuda_gen g = {MOE_CUDA_ABI, sizeof *d, d, "", tag, 1, &im};
	struct moe_cuda *c = NULL;
	if (moe_cuda_create(&g, d, NULL, &c, err, sizeof err) != MOE_OK)
		fail_msg("create: %s", err);
	if (moe_cuda_load_layer(c, 0, &w, err, sizeof err) != MOE_OK)
		fail_msg("load: %s", err);
	/* x and y in device memory */
	size_t es = bf16 ? 2 : 4;
	char *dx = NULL, *dy = NULL;
	assert_int_equal(moe_cuda_mem_alloc(c, T * H * es, (void **)&dx, err, sizeof err), MOE_OK);
	assert_int_equal(moe_cuda_mem_alloc(c, T * H * es, (void **)&dy, err, sizeof err), MOE_OK);
	assert_int_equal(
	    moe_cuda_memcpy(c, dx, bf16 ? (void *)xb : (void *)x, T * H * es, 1, err, sizeof err),
	    MOE_OK);
	struct moe_routing rt = {ids, wt, cnt, imp, 0, 0, 0, 0};
	if (moe_cuda_forward(c, 0, dx, dy, T, &rt, &fo, err, sizeof err) != MOE_OK)
		fail_msg("forward: %s", err);
	assert_int_equal(
	    moe_cuda_memcpy(c, bf16 ? (void *)yb : (void *)y, dy, T * H * es, 0, err, sizeof err),
	    MOE_OK);
	if (bf16)
		for (size_t i = 0; i < T * H; i++)
			y[i] = moe_bf16_to_f32(yb[i]);

	/* routing: the same experts in the same order, the same weights */
	size_t diff_ids = 0, unused = 0;
	double werr = 0.0;
	for (size_t i = 0; i < T * W; i++) {
		diff_ids += ids[i] != ids_ref[i];
		unused += ids_ref[i] < 0;
		double e = fabs((double)wt[i] - wt_ref[i]) / (fabs((double)wt_ref[i]) + 1e-30);
		werr = e > werr ? e : werr;
	}
	for (size_t e = 0; e < E; e++)
		assert_int_equal(cnt[e], cnt_ref[e]);
	assert_int_equal(rt.n_dropped, rr.n_dropped);
	/* output: normalized max error; 16-bit weights also round x and h */
	double ymax = 0.0, emax = 0.0;
	for (size_t i = 0; i < T * H; i++) {
		ymax = fabs((double)yref[i]) > ymax ? fabs((double)yref[i]) : ymax;
		double e = fabs((double)y[i] - yref[i]);
		emax = e > emax ? e : emax;
	}
	double tol = d->weight_dtype == MOE_DTYPE_F32 ? 2e-5 : 2e-2;
	if (bf16)
		tol = 2e-2;
	fprintf(stderr,
		"%-28s T %4zu: ids differ %zu (%zu unused), weight rel err %.2e, output err %.2e "
		"of %.3g (tol %.0e), dropped %lld, lb %.4f/%.4f\n",
		tag, T, diff_ids, unused, werr, emax / ymax, ymax, tol, (long long)rt.n_dropped,
		(double)rt.lb_loss, (double)rr.lb_loss);
	assert_int_equal(diff_ids, 0);
	/* top-p and expert choice leave slots unused, the others none */
	if (d->mode == MOE_MODE_TOP_P || d->mode == MOE_MODE_EXPERT_CHOICE)
		assert_true(unused > 0 && unused < T * W);
	else
		assert_int_equal(unused, (size_t)rt.n_dropped);
	assert_true(werr < 1e-5);
	assert_true(ymax > 0.0);
	assert_true(emax <= tol * ymax);
	assert_true(fabs((double)rt.lb_loss - rr.lb_loss) <= 1e-4 * (fabs((double)rr.lb_loss) + 1));
	assert_true(fabs((double)rt.z_loss - rr.z_loss) <= 1e-4 * (fabs((double)rr.z_loss) + 1));
	assert_true(fabs((double)rt.importance_cv2 - rr.importance_cv2) <=
		    1e-4 * (fabs((double)rr.importance_cv2) + 1));
	for (size_t e = 0; e < E; e++)
		assert_true(fabs((double)imp[e] - imp_ref[e]) <=
			    1e-4 * (fabs((double)imp_ref[e]) + 1));

	/* batch invariance: every token alone gives the same row, bit for bit
	 * (no capacity or expert choice: tokens do not interact; not in training,
	 * where the noise draw depends on the token's index in the call) */
	if (d->capacity == MOE_CAPACITY_NONE && d->mode != MOE_MODE_EXPERT_CHOICE &&
	    !ec->training) {
		size_t t = T - 1;
		float *y1 = malloc(H * sizeof *y1);
		uint16_t *y1b = malloc(H * 2);
		assert_true(y1 && y1b);
		assert_int_equal(
		    moe_cuda_forward(c, 0, dx + t * H * es, dy, 1, NULL, &fo, err, sizeof err),
		    MOE_OK);
		assert_int_equal(moe_cuda_memcpy(c, bf16 ? (void *)y1b : (void *)y1, dy, H * es, 0,
						 err, sizeof err),
				 MOE_OK);
		if (bf16)
			assert_memory_equal(y1b, yb + t * H, H * 2);
		else
			assert_memory_equal(y1, y + t * H, H * sizeof *y1);
		free(y1), free(y1b);
	}
	moe_cuda_mem_free(c, dx);
	moe_cuda_mem_free(c, dy);
	moe_cuda_destroy(c);
	assert_int_equal(live_allocs(), 0);
	moe_ref_weights_free(&w);
	free(x), free(yref), free(y), free(xb), free(yb), free(ids), free(ids_ref), free(wt);
	free(wt_ref), free(cnt), free(cnt_ref), free(imp), free(imp_ref), free(d);
}

/* f32 weights: CUDA-core GEMMs, GLU, softmax + sum; T above the small-T
 * router path (the tiled logits kernel) */
static void test_mixtral_mini(void **state)
{
	(void)state;
	struct ecase c = {"specs/mixtral-mini.yaml", {NULL}, 70, 0, 0};
	check_case(&c, "mixtral-mini");
}

/* bf16 tensor cores, sigmoid, selection bias, sum-of-top-2 groups, scaling,
 * shared experts; the chunk-parallel small-T router */
static void test_deepseek_v3_small(void **state)
{
	(void)state;
	struct ecase c = {"specs/deepseek-v3.yaml",
			  {"model.hidden=128", "experts.count=16", "experts.intermediate=64",
			   "router.top_k=4", "router.groups={count: 4, top: 2, score: sum_top2}",
			   "shared_experts.intermediate=96", NULL},
			  19,
			  0,
			  0};
	check_case(&c, "deepseek-v3");
}

/* router and expert biases, clamped swiglu_oai, a width that is no multiple
 * of the tile (padding), T over two GEMM row tiles */
static void test_gpt_oss(void **state)
{
	(void)state;
	struct ecase c = {"specs/gpt-oss-20b.yaml",
			  {"model.hidden=96", "experts.count=8", "experts.intermediate=80",
			   "router.top_k=3", NULL},
			  150,
			  0,
			  0};
	check_case(&c, "gpt-oss-20b");
}

/* the routing weight scales the expert input; sigmoid on the chosen logit */
static void test_llama4(void **state)
{
	(void)state;
	struct ecase c = {"specs/llama4-scout.yaml",
			  {"model.hidden=64", "experts.count=4", "experts.intermediate=64",
			   "shared_experts.intermediate=64", NULL},
			  33,
			  0,
			  0};
	check_case(&c, "llama4-scout");
}

/* capacity per expert with passthrough of dropped tokens, mlp relu */
static void test_switch_capacity(void **state)
{
	(void)state;
	struct ecase c = {
	    "specs/switch-base-8.yaml",
	    {"model.hidden=64", "experts.intermediate=128",
	     "router.capacity={per_expert: 5, priority: position, overflow: passthrough}", NULL},
	    48,
	    0,
	    0};
	check_case(&c, "switch-base-8");
}

/* capacity factor, priority by score, dropped; f32 mlp */
static void test_capacity_score(void **state)
{
	(void)state;
	struct ecase c = {"specs/noisy-top-k.yaml",
			  {"model.hidden=64", "experts.intermediate=64",
			   "router.capacity={factor: 0.5, priority: score, overflow: drop}", NULL},
			  40,
			  0,
			  0};
	check_case(&c, "noisy-top-k");
}

/* a sigmoid-gated shared expert, no normalization, bf16 activations */
static void test_qwen15_bf16_act(void **state)
{
	(void)state;
	struct ecase c = {"specs/qwen1.5-moe-a2.7b.yaml",
			  {"model.hidden=64", "experts.count=12", "experts.intermediate=32",
			   "shared_experts.intermediate=64", "dtype.activations=bf16", NULL},
			  21,
			  0,
			  0};
	check_case(&c, "qwen1.5-moe-a2.7b");
}

/* lp normalization, f16 weights */
static void test_dbrx_f16(void **state)
{
	(void)state;
	struct ecase c = {"specs/dbrx.yaml",
			  {"model.hidden=64", "experts.intermediate=64", "dtype.weights=f16", NULL},
			  9,
			  0,
			  0};
	check_case(&c, "dbrx");
}

/* dense: every expert, in order */
static void test_dense(void **state)
{
	(void)state;
	struct ecase c = {"specs/mixtral-mini.yaml", {NULL}, 12, 1, 0};
	check_case(&c, "mixtral-mini-dense");
}

/* JetMoE: one output bias added after the experts */
static void test_output_bias(void **state)
{
	(void)state;
	struct ecase c = {"tests/cases/good/jetmoe.yaml",
			  {"model.hidden=64", "experts.intermediate=64", NULL},
			  10,
			  0,
			  0};
	check_case(&c, "jetmoe");
}

/* NLLB at inference: a token-fraction capacity, weights normalized over the
 * slots that survive it; relu mlp experts with biases */
static void test_norm_after_drop(void **state)
{
	(void)state;
	struct ecase c = {"tests/cases/good/nllb-capacity.yaml",
			  {"model.hidden=64", "experts.count=8", "experts.intermediate=64", NULL},
			  40,
			  0,
			  0};
	check_case(&c, "nllb-capacity");
}

/* Hunyuan: capacity rounded down with a minimum; shared expert */
static void test_capacity_floor_min(void **state)
{
	(void)state;
	struct ecase c = {
	    "tests/cases/good/hunyuan.yaml",
	    {"model.hidden=64", "experts.intermediate=64", "shared_experts.intermediate=64", NULL},
	    23,
	    0,
	    0};
	check_case(&c, "hunyuan");
}

/* top-p: a variable number of experts per token, unused slots -1; the
 * tiled router (T > 32) */
static void test_top_p(void **state)
{
	(void)state;
	struct ecase c = {"specs/top-p-dynamic.yaml",
			  {"model.hidden=64", "experts.intermediate=64", "router.top_p=0.2", NULL},
			  45,
			  0,
			  0};
	check_case(&c, "top-p-dynamic");
}

/* top-p with a threshold most tokens reach with one expert, normalized
 * weights, bf16 weights; the small-T router */
static void test_top_p_norm(void **state)
{
	(void)state;
	struct ecase c = {"specs/top-p-dynamic.yaml",
			  {"model.hidden=64", "experts.intermediate=64", "router.top_p=0.15",
			   "router.normalize=sum", "dtype.weights=bf16", NULL},
			  17,
			  0,
			  0};
	check_case(&c, "top-p-norm");
}

/* Phi-3.5's sparsemixer: two masked softmaxes, bf16 tensor cores; the tiled
 * router */
static void test_sparsemixer(void **state)
{
	(void)state;
	struct ecase c = {"specs/phi-3.5-moe.yaml",
			  {"model.hidden=64", "experts.intermediate=64", NULL},
			  40,
			  0,
			  0};
	check_case(&c, "phi-3.5-moe");
}

/* sparsemixer with a wide eps (more experts in each masked softmax), f32
 * weights; the small-T router */
static void test_sparsemixer_eps(void **state)
{
	(void)state;
	struct ecase c = {"specs/phi-3.5-moe.yaml",
			  {"model.hidden=64", "experts.intermediate=64", "sparsemixer.eps=0.5",
			   "dtype.weights=f32", NULL},
			  13,
			  0,
			  0};
	check_case(&c, "phi-3.5-moe-eps");
}

/* Shazeer's hierarchical gates: a softmax over groups, then inside each
 * chosen group; f32 relu experts; the tiled router */
static void test_hierarchical(void **state)
{
	(void)state;
	struct ecase c = {"specs/shazeer-hierarchical.yaml",
			  {"model.hidden=64", "experts.count=32", "experts.intermediate=64",
			   "hierarchical.levels=[{groups: 4, top_k: 2}, {top_k: 3}]", NULL},
			  40,
			  0,
			  0};
	check_case(&c, "shazeer-hierarchical");
}

/* hierarchical with sigmoid gates normalized to sum 1, a routed scale and
 * bf16 weights; the small-T router */
static void test_hierarchical_sigmoid(void **state)
{
	(void)state;
	struct ecase c = {"specs/shazeer-hierarchical.yaml",
			  {"model.hidden=64", "experts.count=24", "experts.intermediate=64",
			   "hierarchical.levels=[{groups: 3, top_k: 2}, {top_k: 2}]",
			   "router.score=sigmoid", "router.normalize=sum", "router.scale=2.5",
			   "dtype.weights=bf16", NULL},
			  11,
			  0,
			  0};
	check_case(&c, "hierarchical-sigmoid");
}

/* training: noisy top-k, logit + N(0, 1) (softplus(x . noise row) + eps),
 * the reference's draw for (seed, layer, token, expert); capacity by
 * position; the default eps (0.01) and a large one */
static void test_train_learned_noise(void **state)
{
	(void)state;
	struct ecase c = {"specs/noisy-top-k.yaml",
			  {"model.hidden=64", "experts.intermediate=64", NULL},
			  40,
			  0,
			  1};
	check_case(&c, "noisy-top-k-train");
	struct ecase c2 = {"specs/noisy-top-k.yaml",
			   {"model.hidden=64", "experts.intermediate=64",
			    "router.noise={kind: learned_gaussian, noise_epsilon: 1.5}", NULL},
			   40,
			   0,
			   1};
	check_case(&c2, "noisy-top-k-train-eps");
	/* Shazeer's importance: the sum of the kept sparse gates (capacity drops
	 * some), not of the softmax */
	struct ecase c3 = {
	    "specs/noisy-top-k.yaml",
	    {"model.hidden=64", "experts.intermediate=64", "router.importance=sparse", NULL},
	    40,
	    0,
	    1};
	check_case(&c3, "noisy-top-k-train-sparse-importance");
}

/* training: the learned noise on the hierarchical router's level 2; the
 * small-T router */
static void test_train_hierarchical(void **state)
{
	(void)state;
	struct ecase c = {"specs/shazeer-hierarchical.yaml",
			  {"model.hidden=64", "experts.count=32", "experts.intermediate=64",
			   "hierarchical.levels=[{groups: 4, top_k: 2}, {top_k: 2}]", NULL},
			  20,
			  0,
			  1};
	check_case(&c, "hierarchical-train");
}

/* training: the input jitter x * U(1 - eps, 1 + eps) that router and experts
 * see (sparsemixer, f32 weights, a wide eps) */
static void test_train_jitter(void **state)
{
	(void)state;
	struct ecase c = {"specs/phi-3.5-moe.yaml",
			  {"model.hidden=64", "experts.intermediate=64", "dtype.weights=f32",
			   "router.noise={kind: jitter, eps: 0.2}", NULL},
			  37,
			  0,
			  1};
	check_case(&c, "phi-3.5-moe-jitter");
}

/* expert choice: each expert its top C = ceil(2 T / E) tokens by softmax
 * score, f32 gelu experts; the tiled router */
static void test_expert_choice(void **state)
{
	(void)state;
	struct ecase c = {"specs/expert-choice.yaml",
			  {"model.hidden=64", "experts.count=16", "experts.intermediate=64", NULL},
			  50,
			  0,
			  0};
	check_case(&c, "expert-choice");
}

/* expert choice with sigmoid scores, a routed scale, bf16 weights; a
 * capacity of one token per expert at small T */
static void test_expert_choice_small(void **state)
{
	(void)state;
	struct ecase c = {"specs/expert-choice.yaml",
			  {"model.hidden=64", "experts.count=8", "experts.intermediate=64",
			   "router.score=sigmoid", "router.scale=1.5", "dtype.weights=bf16",
			   "expert_choice.capacity_factor=0.5", NULL},
			  9,
			  0,
			  0};
	check_case(&c, "expert-choice-small");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_mixtral_mini),
	    cmocka_unit_test(test_deepseek_v3_small),
	    cmocka_unit_test(test_gpt_oss),
	    cmocka_unit_test(test_llama4),
	    cmocka_unit_test(test_switch_capacity),
	    cmocka_unit_test(test_capacity_score),
	    cmocka_unit_test(test_qwen15_bf16_act),
	    cmocka_unit_test(test_dbrx_f16),
	    cmocka_unit_test(test_dense),
	    cmocka_unit_test(test_output_bias),
	    cmocka_unit_test(test_norm_after_drop),
	    cmocka_unit_test(test_capacity_floor_min),
	    cmocka_unit_test(test_top_p),
	    cmocka_unit_test(test_top_p_norm),
	    cmocka_unit_test(test_sparsemixer),
	    cmocka_unit_test(test_sparsemixer_eps),
	    cmocka_unit_test(test_hierarchical),
	    cmocka_unit_test(test_hierarchical_sigmoid),
	    cmocka_unit_test(test_train_learned_noise),
	    cmocka_unit_test(test_train_hierarchical),
	    cmocka_unit_test(test_train_jitter),
	    cmocka_unit_test(test_expert_choice),
	    cmocka_unit_test(test_expert_choice_small),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
