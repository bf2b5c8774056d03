/* cuda_emit.c: the CUDA backend's code generator. Writes readable CUDA C
 * from the plan: the model's shapes, k and formulas as constants, one kernel
 * per op (router, grouping, grouped GEMMs on tensor cores, combine, pack),
 * and the images file that embeds what NVRTC compiled into model.so. */
#include "cuda.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NAME_(v, s) s,
const char *const moe_cuda_emit_names[] = {MOE_CUDA_EMITS(NAME_)};
#undef NAME_

/* A growable text buffer; running out of memory is remembered, not fatal. */
struct ebuf {
	char *p;
	size_t len, cap;
	int oom;
};

static void grow(struct ebuf *b, size_t n)
{
	if (b->oom || b->len + n + 1 <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 65536;
	while (cap < b->len + n + 1)
		cap *= 2;
	char *p = realloc(b->p, cap);
	if (!p) {
		b->oom = 1;
		return;
	}
	b->p = p;
	b->cap = cap;
}

static void raw(struct ebuf *b, const char *s)
{
	size_t n = strlen(s);
	grow(b, n);
	if (b->oom)
		return;
	memcpy(b->p + b->len, s, n + 1);
	b->len += n;
}

__attribute__((format(printf, 2, 3))) static void put(struct ebuf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0) {
		b->oom = 1;
		return;
	}
	grow(b, (size_t)n);
	if (b->oom)
		return;
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

/* A float as a C++ literal that reads back to the same value. */
static const char *flit(float v, char buf[48])
{
	if (isnan(v))
		return "__int_as_float(0x7fc00000)";
	if (isinf(v))
		return v > 0 ? "__int_as_float(0x7f800000)" : "__int_as_float(0xff800000)";
	char t[40];
	for (int prec = 6; prec <= 9; prec++) { /* the shortest that reads back exactly */
		snprintf(t, sizeof t, "%.*g", prec, (double)v);
		if (strtof(t, NULL) == v)
			break;
	}
	int dot = strpbrk(t, ".e") != NULL;
	snprintf(buf, 48, "%s%sf", t, dot ? "" : ".0");
	return buf;
}

/* Checks ------------------------------------------------------------------ */

int moe_cuda_check(const struct moe_desc *d, struct moe_diag *diag)
{
	int bad = 0;
	if (d->mode != MOE_MODE_TOKEN_CHOICE && d->mode != MOE_MODE_DENSE) {
		moe_diag_error(diag, "router.mode %s is not generated for target cuda yet",
			       moe_mode_names[d->mode]);
		bad = 1;
	}
	if (d->kind == MOE_KIND_SINGLE_NEURON ||
	    (moe_cuda_has_shared(d) && d->shared_kind == MOE_KIND_SINGLE_NEURON)) {
		moe_diag_error(diag, "experts.kind single_neuron is not generated for target cuda "
				     "yet");
		bad = 1;
	}
	if ((d->act == MOE_ACT_SWIGLU_OAI && d->kind != MOE_KIND_GLU) ||
	    (moe_cuda_has_shared(d) && d->shared_act == MOE_ACT_SWIGLU_OAI &&
	     d->shared_kind != MOE_KIND_GLU)) {
		moe_diag_error(diag, "activation swiglu_oai needs glu experts");
		bad = 1;
	}
	if (d->act_dtype != MOE_DTYPE_F32 && d->act_dtype != MOE_DTYPE_BF16) {
		moe_diag_error(diag,
			       "dtype.activations %s is not generated for target cuda (f32, "
			       "bf16)",
			       moe_dtype_names[d->act_dtype]);
		bad = 1;
	}
	if (d->mode == MOE_MODE_DENSE && d->capacity != MOE_CAPACITY_NONE) {
		moe_diag_error(diag, "router.capacity with mode dense is not generated for target "
				     "cuda yet");
		bad = 1;
	}
	if (!bad &&
	    (d->hidden == 0 || d->n_experts == 0 || d->intermediate == 0 || d->top_k == 0 ||
	     d->top_k > d->n_experts || d->n_experts > INT32_MAX / 2 || d->hidden > INT32_MAX / 2 ||
	     d->intermediate > INT32_MAX / 4 || moe_desc_shared_width(d) > INT32_MAX / 4)) {
		moe_diag_error(diag,
			       "invalid model description for target cuda (hidden %u, "
			       "experts %u, intermediate %u, top_k %u)",
			       d->hidden, d->n_experts, d->intermediate, d->top_k);
		bad = 1;
	}
	if (!bad && d->mode == MOE_MODE_TOKEN_CHOICE && d->n_groups > 1 &&
	    (d->n_experts % d->n_groups || d->group_top == 0 || d->group_top > d->n_groups ||
	     (uint64_t)d->group_top * (d->n_experts / d->n_groups) < d->top_k)) {
		moe_diag_error(diag,
			       "invalid router.groups (%u groups, top %u) for %u experts, "
			       "top_k %u",
			       d->n_groups, d->group_top, d->n_experts, d->top_k);
		bad = 1;
	}
	return bad ? -1 : 0;
}

static void add_op(struct moe_plan *p, enum moe_op op, uint32_t in, uint32_t out)
{
	MOE_ASSERT(p->n_ops < sizeof p->ops / sizeof *p->ops);
	p->ops[p->n_ops++] = (struct moe_plan_op){op, in, out};
}

int moe_cuda_plan_build(const struct moe_desc *d, struct moe_plan *p, struct moe_diag *diag)
{
	memset(p, 0, sizeof *p);
	p->desc = d;
	p->target = MOE_TARGET_CUDA;
	if (moe_cuda_check(d, diag) != 0)
		return -1;
	p->route_width = moe_desc_route_width(d);
	moe_geom_init(&p->routed, d->hidden, d->intermediate, d->kind == MOE_KIND_GLU);
	uint32_t is = moe_desc_shared_width(d);
	if (is)
		moe_geom_init(&p->shared, d->hidden, is, d->shared_kind == MOE_KIND_GLU);
	const uint32_t io = MOE_BUF_COUNT;
	add_op(p, MOE_OP_ROUTE, io, MOE_BUF_WEIGHTS);
	add_op(p, MOE_OP_GROUP, MOE_BUF_WEIGHTS, MOE_BUF_ROWS);
	add_op(p, MOE_OP_EXPERT_UP, MOE_BUF_ROWS, MOE_BUF_H);
	add_op(p, MOE_OP_EXPERT_DOWN, MOE_BUF_H, io);
	if (is) {
		add_op(p, MOE_OP_SHARED_UP, io, MOE_BUF_H_SHARED);
		add_op(p, MOE_OP_SHARED_DOWN, MOE_BUF_H_SHARED, io);
	}
	if (d->capacity != MOE_CAPACITY_NONE && d->overflow == MOE_OVERFLOW_PASSTHROUGH)
		add_op(p, MOE_OP_PASSTHROUGH, MOE_BUF_ROWS, io);
	uint64_t w = p->route_width;
	p->buf_per_token[MOE_BUF_LOGITS] = 4ull * d->n_experts;
	p->buf_per_token[MOE_BUF_IDS] = 4 * w;
	p->buf_per_token[MOE_BUF_WEIGHTS] = 4 * w;
	p->buf_per_token[MOE_BUF_SGATE] = d->shared_gate == MOE_SHARED_GATE_SIGMOID ? 4 : 0;
	p->buf_per_token[MOE_BUF_ROWS] = 4 * w;
	p->buf_per_token[MOE_BUF_ROW_W] = 4 * w;
	return 0;
}

void moe_cuda_source_name(const struct moe_desc *d, char *buf, size_t cap)
{
	snprintf(buf, cap, "%s.cu", d->name[0] ? d->name : "model");
}

/* The generated source, section by section ---------------------------------- */

struct gen {
	struct ebuf b;
	const struct moe_desc *d;
	struct moe_cuda_geom rg, sg; /* routed, shared (sg.width 0: none) */
	uint32_t W;                  /* route width */
	int mma;                     /* 16-bit weights: tensor cores; f32: CUDA cores */
	int cap, after_drop, shared, dense, input_scaled;
	const char *wname; /* "bf16" | "f16" (mma operand type) */
};

static void emit_header(struct gen *g)
{
	const struct moe_desc *d = g->d;
	char hash[65], f[48];
	moe_desc_hash(d, hash);
	put(&g->b,
	    "/* %s.cu: the CUDA kernels of the MoE layer '%s', generated by moegen from\n"
	    " * its spec (spec hash %.16s). Do not edit: regenerate with\n"
	    " *     moegen SPEC --target cuda --emit cu\n",
	    d->name, d->name, hash);
	put(&g->b,
	    " * hidden %u, %u experts, route width %u (%s), experts of width %u\n"
	    " * (%s %s%s), weights %s, activations %s, router %s, normalize %s,\n"
	    " * scale %s.\n",
	    d->hidden, d->n_experts, g->W, moe_mode_names[d->mode], d->intermediate,
	    moe_kind_names[d->kind], moe_act_names[d->act], d->expert_bias ? " with biases" : "",
	    moe_dtype_names[d->weight_dtype], moe_dtype_names[d->act_dtype],
	    moe_score_names[d->score], moe_norm_names[d->norm], flit(d->scale, f));
	if (g->shared)
		put(&g->b, " * Shared experts: one FFN of width %u %s %s, gate %s.\n",
		    moe_desc_shared_width(d), moe_kind_names[d->shared_kind],
		    moe_act_names[d->shared_act], moe_shared_gate_names[d->shared_gate]);
	raw(&g->b, " *\n"
		   " * Launch order (runtime/cuda_rt.c), all on one stream, no host round trip:\n"
		   " *   moe_route_small      T <= 32: the whole router in one launch, or\n"
		   " *   moe_route_logits, moe_route_select   logits, then scores, selection and\n"
		   " *                        weights (one block per token)\n");
	if (g->cap)
		put(&g->b, " *   %smoe_capacity%s   capacity: kept slots\n",
		    d->priority == MOE_PRIORITY_SCORE ? "moe_cap_order, " : "",
		    g->after_drop ? ", moe_cap_normalize" : "");
	raw(&g->b, " *   moe_group_mask, moe_group_offsets, moe_group_scatter\n"
		   " *                        rows grouped by expert (bitmaps, prefix sums)\n"
		   " *   moe_up, moe_down     grouped GEMMs: activation fused into the first,\n"
		   " *                        routing weight into the second\n");
	if (g->shared)
		raw(&g->b, " *   moe_shared_up, moe_shared_down   the shared FFN on every token\n");
	raw(&g->b,
	    " *   moe_combine          y = sum of a token's rows in rank order (no atomics)\n"
	    " * moe_pack converts canonical f32 weights to the packed layout at load.\n"
	    " * Needs no header: NVRTC compiles it with no include path. */\n\n");
}

/* One named constant; the comments line up. */
__attribute__((format(printf, 3, 4))) static void konst(struct ebuf *b, const char *comment,
							const char *fmt, ...)
{
	char decl[192];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(decl, sizeof decl, fmt, ap);
	va_end(ap);
	if (*comment)
		put(b, "%-38s /* %s */\n", decl, comment);
	else
		put(b, "%s\n", decl);
}

static void emit_constants(struct gen *g)
{
	const struct moe_desc *d = g->d;
	char f[48];
	struct ebuf *b = &g->b;
	raw(b, "/* ---- shapes and constants of this model ---- */\n");
	konst(b, "H", "constexpr int kHidden = %u;", d->hidden);
	konst(b, "E", "constexpr int kExperts = %u;", d->n_experts);
	konst(b, g->dense ? "route width: dense, every expert" : "route width: top-k",
	      "constexpr int kRoute = %u;", g->W);
	if (d->mode == MOE_MODE_TOKEN_CHOICE && d->n_groups > 1) {
		konst(b, "expert groups", "constexpr int kGroups = %u;", d->n_groups);
		konst(b, "experts per group", "constexpr int kGroupSize = %u;",
		      d->n_experts / d->n_groups);
		konst(b, "groups kept per token", "constexpr int kGroupTop = %u;", d->group_top);
	}
	konst(b, "router K chunk", "constexpr int kRChunk = %d;", MOE_CUDA_RCHUNK);
	konst(b, "router K chunks", "constexpr int kChunks = %u;",
	      (d->hidden + MOE_CUDA_RCHUNK - 1) / MOE_CUDA_RCHUNK);
	konst(b, "routed scaling factor", "constexpr float kScale = %s;", flit(d->scale, f));
	if (d->norm != MOE_NORM_NONE) {
		konst(b, "w /= max(S + eps, min)", "constexpr float kNormEps = %s;",
		      flit(d->norm_eps, f));
		konst(b, "", "constexpr float kNormMin = %s;", flit(d->norm_min, f));
	}
	if (d->norm == MOE_NORM_LP)
		konst(b, "S = the p-norm", "constexpr double kNormP = %s;", flit(d->norm_p, f));
	if (d->act == MOE_ACT_SWIGLU_OAI || (g->shared && d->shared_act == MOE_ACT_SWIGLU_OAI)) {
		konst(b, "swiglu_oai", "constexpr float kActAlpha = %s;", flit(d->act_alpha, f));
		konst(b, "", "constexpr float kActLimit = %s;", flit(d->act_limit, f));
	}
	konst(b, "GEMM tiles (runtime/cuda_rt.h)", "constexpr int kBM = %d, kBN = %d, kBK = %d;",
	      MOE_CUDA_BM, MOE_CUDA_BN, MOE_CUDA_BK);
	raw(b, "\n");
}

static void emit_types(struct gen *g)
{
	const struct moe_desc *d = g->d;
	struct ebuf *b = &g->b;
	raw(b, "/* ---- storage types and conversions (round to nearest even) ---- */\n"
	       "typedef unsigned short bits16; /* bf16 or f16 */\n"
	       "typedef long long i64;\n\n"
	       "__device__ __forceinline__ float bf16_to_f32(bits16 h)\n{\n"
	       "\treturn __uint_as_float((unsigned)h << 16);\n}\n\n"
	       "/* PTX helpers have a host version (MOE_CUDA_EMULATION, tests/cuda_emu) */\n"
	       "__device__ __forceinline__ bits16 f32_to_bf16(float f)\n{\n"
	       "#ifndef MOE_CUDA_EMULATION\n"
	       "\tbits16 r;\n\tasm(\"cvt.rn.bf16.f32 %0, %1;\" : \"=h\"(r) : \"f\"(f));\n"
	       "\treturn r;\n"
	       "#else\n\treturn emu_f32_to_bf16(f);\n#endif\n}\n\n");
	if (d->weight_dtype == MOE_DTYPE_F16)
		raw(b, "__device__ __forceinline__ bits16 f32_to_f16(float f)\n{\n"
		       "#ifndef MOE_CUDA_EMULATION\n"
		       "\tbits16 r;\n\tasm(\"cvt.rn.f16.f32 %0, %1;\" : \"=h\"(r) : \"f\"(f));\n"
		       "\treturn r;\n"
		       "#else\n\treturn emu_f32_to_f16(f);\n#endif\n}\n\n");
	if (d->act_dtype == MOE_DTYPE_BF16)
		raw(b, "typedef bits16 act_t; /* activations: bf16 */\n"
		       "__device__ __forceinline__ float ld_act(const act_t *p)\n{\n"
		       "\treturn bf16_to_f32(*p);\n}\n"
		       "__device__ __forceinline__ void st_act(act_t *p, float v)\n{\n"
		       "\t*p = f32_to_bf16(v);\n}\n\n");
	else
		raw(b, "typedef float act_t; /* activations: f32 */\n"
		       "__device__ __forceinline__ float ld_act(const act_t *p)\n{\n"
		       "\treturn *p;\n}\n"
		       "__device__ __forceinline__ void st_act(act_t *p, float v)\n{\n"
		       "\t*p = v;\n}\n\n");
	if (d->act_dtype == MOE_DTYPE_BF16)
		raw(b, "/* four consecutive activations (16-byte aligned rows, H % 4 == 0) */\n"
		       "__device__ __forceinline__ void ld_act4(const act_t *p, float (&v)[4])\n{\n"
		       "\tconst uint2 q = *(const uint2 *)p;\n"
		       "\tv[0] = __uint_as_float(q.x << 16), v[1] = __uint_as_float(q.x & "
		       "0xffff0000u);\n"
		       "\tv[2] = __uint_as_float(q.y << 16), v[3] = __uint_as_float(q.y & "
		       "0xffff0000u);\n}\n\n");
	else
		raw(b, "/* four consecutive activations (16-byte aligned rows, H % 4 == 0) */\n"
		       "__device__ __forceinline__ void ld_act4(const act_t *p, float (&v)[4])\n{\n"
		       "\tconst float4 q = *(const float4 *)p;\n"
		       "\tv[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;\n}\n\n");
	switch (d->weight_dtype) {
	case MOE_DTYPE_BF16:
		raw(b, "typedef bits16 w_t; /* weights and h: bf16 */\n"
		       "__device__ __forceinline__ w_t to_w(float v)\n{\n"
		       "\treturn f32_to_bf16(v);\n}\n"
		       "/* two values packed for one 32-bit operand register: lo first */\n"
		       "__device__ __forceinline__ unsigned pack_w2(float lo, float hi)\n{\n"
		       "#ifndef MOE_CUDA_EMULATION\n"
		       "\tunsigned r;\n"
		       "\tasm(\"cvt.rn.bf16x2.f32 %0, %1, %2;\" : \"=r\"(r) : \"f\"(hi), "
		       "\"f\"(lo));\n"
		       "\treturn r;\n"
		       "#else\n"
		       "\treturn emu_f32_to_bf16(lo) | (unsigned)emu_f32_to_bf16(hi) << 16;\n"
		       "#endif\n}\n\n");
		break;
	case MOE_DTYPE_F16:
		raw(b, "typedef bits16 w_t; /* weights and h: f16 */\n"
		       "__device__ __forceinline__ w_t to_w(float v)\n{\n"
		       "\treturn f32_to_f16(v);\n}\n"
		       "/* two values packed for one 32-bit operand register: lo first */\n"
		       "__device__ __forceinline__ unsigned pack_w2(float lo, float hi)\n{\n"
		       "#ifndef MOE_CUDA_EMULATION\n"
		       "\tunsigned r;\n"
		       "\tasm(\"cvt.rn.f16x2.f32 %0, %1, %2;\" : \"=r\"(r) : \"f\"(hi), "
		       "\"f\"(lo));\n"
		       "\treturn r;\n"
		       "#else\n"
		       "\treturn emu_f32_to_f16(lo) | (unsigned)emu_f32_to_f16(hi) << 16;\n"
		       "#endif\n}\n\n");
		break;
	default:
		raw(b, "typedef float w_t; /* weights and h: f32 */\n"
		       "__device__ __forceinline__ w_t to_w(float v)\n{\n"
		       "\treturn v;\n}\n\n");
		break;
	}
	raw(b, "__device__ __forceinline__ float neg_inf()\n{\n"
	       "\treturn __int_as_float(0xff800000);\n}\n\n");
}

static void emit_args(struct gen *g)
{
	raw(&g->b,
	    "/* The one argument of every forward kernel: struct moe_cuda_args of\n"
	    " * runtime/cuda_rt.h, pointers then 64-bit integers. */\n"
	    "struct moe_args {\n"
	    "\tconst void *x;\n\tvoid *y;\n"
	    "\tconst float *router, *router_bias, *select_bias, *shared_gate_w;\n"
	    "\tconst void *up, *down;\n\tconst float *bg, *bu, *bd;\n"
	    "\tconst void *s_up, *s_down;\n"
	    "\tconst float *output_bias;\n"
	    "\tfloat *partials;\n\tunsigned *done;\n\tfloat *logits, *scores, *sel, *gscore;\n"
	    "\tint *ids;\n\tfloat *wts, *prio, *sgate;\n\tunsigned char *kept;\n"
	    "\tint *order;\n\tunsigned *mask;\n\tint *tbase, *counts, *offsets, *tstart;\n"
	    "\tint *rows;\n\tfloat *row_w;\n\tint *slot_row;\n"
	    "\tvoid *h, *hs;\n\tfloat *o, *os;\n"
	    "\ti64 T, small, capacity;\n};\n\n");
}

/* act(v) of one activation, f32, the formulas of moe_ref_act. */
static void emit_act_expr(struct ebuf *b, enum moe_act a)
{
	switch (a) {
	case MOE_ACT_SILU:
		raw(b, "\t\treturn v / (1.0f + expf(-v)); /* silu */\n");
		break;
	case MOE_ACT_GELU:
		raw(b, "\t\treturn 0.5f * v * (1.0f + erff(v * 0.707106781f)); /* gelu */\n");
		break;
	case MOE_ACT_GELU_TANH:
		raw(b, "\t\treturn 0.5f * v * (1.0f + tanhf(0.797884561f * (v + 0.044715f * v * v "
		       "* v)));\n");
		break;
	case MOE_ACT_RELU:
		raw(b, "\t\treturn v > 0.0f ? v : 0.0f; /* relu */\n");
		break;
	case MOE_ACT_SWIGLU_OAI:
		raw(b, "\t\tconst float c = fminf(v, kActLimit); /* swiglu_oai gate */\n"
		       "\t\treturn c / (1.0f + expf(-kActAlpha * c));\n");
		break;
	default:
		raw(b, "\t\treturn v;\n");
		break;
	}
}

static void emit_ffn(struct gen *g, const char *name, const struct moe_cuda_geom *geo,
		     enum moe_act act, const char *what)
{
	struct ebuf *b = &g->b;
	put(b, "/* %s */\nstruct %s {\n", what, name);
	put(b, "\tstatic constexpr int width = %u;   /* expert width */\n", geo->width);
	put(b, "\tstatic constexpr int ld_h = %u;    /* h row stride: width padded to kBN */\n",
	    geo->ld_h);
	put(b, "\tstatic constexpr int up_rows = %u; /* packed up rows%s */\n", geo->up_rows,
	    geo->glu ? ": gate and up interleaved by 8" : "");
	put(b, "\tstatic constexpr int up_k = %u;    /* up GEMM K: hidden padded to kBK */\n",
	    geo->up_k);
	put(b,
	    "\tstatic constexpr int down_rows = %u; /* packed down rows: hidden padded to "
	    "kBN */\n",
	    geo->down_rows);
	put(b, "\tstatic constexpr bool glu = %s;\n", geo->glu ? "true" : "false");
	raw(b, "\tstatic __device__ __forceinline__ float act(float v)\n\t{\n");
	emit_act_expr(b, act);
	raw(b, "\t}\n");
	if (geo->glu) {
		raw(b, "\t/* the GLU output of one column from its gate and up values */\n"
		       "\tstatic __device__ __forceinline__ float glu_out(float gate, float up)\n"
		       "\t{\n");
		if (act == MOE_ACT_SWIGLU_OAI)
			raw(b, "\t\tconst float u = fminf(fmaxf(up, -kActLimit), kActLimit);\n"
			       "\t\treturn act(gate) * (u + 1.0f);\n");
		else
			raw(b, "\t\treturn act(gate) * up;\n");
		raw(b, "\t}\n");
	}
	raw(b, "};\n\n");
}

static void emit_reductions(struct gen *g)
{
	raw(&g->b,
	    "/* ---- block reductions (256 threads), in a fixed order: deterministic ---- */\n"
	    "__device__ __forceinline__ float block_sum(float v)\n{\n"
	    "\t__shared__ float part[8];\n"
	    "\tfor (int o = 16; o > 0; o >>= 1)\n"
	    "\t\tv += __shfl_xor_sync(0xffffffffu, v, o);\n"
	    "\tif ((threadIdx.x & 31) == 0) /* lane 0's order of the warp's sum */\n"
	    "\t\tpart[threadIdx.x >> 5] = v;\n"
	    "\t__syncthreads();\n"
	    "\tfloat s = part[0];\n"
	    "\tfor (int w = 1; w < 8; w++)\n\t\ts += part[w];\n"
	    "\t__syncthreads();\n"
	    "\treturn s;\n}\n\n"
	    "/* the maximum, NaN ignored like `if (v > m) m = v` */\n"
	    "__device__ __forceinline__ float block_max(float v)\n{\n"
	    "\t__shared__ float part[8];\n"
	    "\tfor (int o = 16; o > 0; o >>= 1) {\n"
	    "\t\tconst float u = __shfl_xor_sync(0xffffffffu, v, o);\n"
	    "\t\tv = u > v ? u : v;\n\t}\n"
	    "\tif ((threadIdx.x & 31) == 0)\n\t\tpart[threadIdx.x >> 5] = v;\n"
	    "\t__syncthreads();\n"
	    "\tfloat m = part[0];\n"
	    "\tfor (int w = 1; w < 8; w++)\n\t\tm = part[w] > m ? part[w] : m;\n"
	    "\t__syncthreads();\n"
	    "\treturn m;\n}\n\n"
	    "/* a ranks before b: larger value, then smaller key; NaN ranks last */\n"
	    "__device__ __forceinline__ bool ranks_before(float va, i64 ka, float vb, i64 kb)\n{\n"
	    "\tconst bool na = va != va, nb = vb != vb;\n"
	    "\tif (na != nb)\n\t\treturn nb;\n"
	    "\tif (!na && va != vb)\n\t\treturn va > vb;\n"
	    "\treturn ka < kb;\n}\n\n"
	    "/* The entry of v[0, n) that comes right after (pv, pk) in the ranking (pk < 0:\n"
	    " * the first): one pass of the block, so k rounds give the top k in order\n"
	    " * without marking anything. */\n"
	    "__device__ int block_next(const float *v, int n, float pv, int pk)\n{\n"
	    "\t__shared__ float sv[8];\n\t__shared__ int sk[8];\n"
	    "\tfloat bv = 0.0f;\n\tint bk = -1;\n"
	    "\tfor (int i = threadIdx.x; i < n; i += blockDim.x) {\n"
	    "\t\tconst float x = v[i];\n"
	    "\t\tif (pk >= 0 && !ranks_before(pv, pk, x, i))\n\t\t\tcontinue;\n"
	    "\t\tif (bk < 0 || ranks_before(x, i, bv, bk))\n\t\t\tbv = x, bk = i;\n\t}\n"
	    "\tfor (int o = 16; o > 0; o >>= 1) {\n"
	    "\t\tconst float ov = __shfl_xor_sync(0xffffffffu, bv, o);\n"
	    "\t\tconst int ok = __shfl_xor_sync(0xffffffffu, bk, o);\n"
	    "\t\tif (ok >= 0 && (bk < 0 || ranks_before(ov, ok, bv, bk)))\n"
	    "\t\t\tbv = ov, bk = ok;\n\t}\n"
	    "\tif ((threadIdx.x & 31) == 0)\n"
	    "\t\tsv[threadIdx.x >> 5] = bv, sk[threadIdx.x >> 5] = bk;\n"
	    "\t__syncthreads();\n"
	    "\tfloat rv = sv[0];\n\tint rk = sk[0];\n"
	    "\tfor (int w = 1; w < 8; w++)\n"
	    "\t\tif (sk[w] >= 0 && (rk < 0 || ranks_before(sv[w], sk[w], rv, rk)))\n"
	    "\t\t\trv = sv[w], rk = sk[w];\n"
	    "\t__syncthreads();\n"
	    "\treturn rk;\n}\n\n");
}

/* w[j] /= max(S + eps, min) with S the sum or the p-norm in rank order (a
 * non-positive denominator leaves w), then w[j] *= scale; keep (or null for
 * all) picks the slots that take part. */
static void emit_normalize(struct gen *g)
{
	const struct moe_desc *d = g->d;
	struct ebuf *b = &g->b;
	put(b,
	    "/* routing weights: normalize (%s) over the kept slots in rank order, then\n"
	    " * scale; keep null: every slot */\n"
	    "__device__ void normalize_scale(float *w, const unsigned char *keep, int n)\n{\n",
	    moe_norm_names[d->norm]);
	switch (d->norm) {
	case MOE_NORM_SUM:
		raw(b, "\tfloat S = 0.0f;\n"
		       "\tfor (int j = 0; j < n; j++)\n"
		       "\t\tif (!keep || keep[j])\n\t\t\tS += w[j];\n");
		break;
	case MOE_NORM_LP:
		raw(b, "\tdouble acc = 0.0;\n"
		       "\tfor (int j = 0; j < n; j++)\n"
		       "\t\tif (!keep || keep[j])\n"
		       "\t\t\tacc += pow(fabs((double)w[j]), kNormP);\n"
		       "\tconst float S = (float)pow(acc, 1.0 / kNormP);\n");
		break;
	default:
		break;
	}
	if (d->norm != MOE_NORM_NONE)
		raw(b, "\tfloat den = S + kNormEps;\n"
		       "\tif (den < kNormMin)\n\t\tden = kNormMin;\n"
		       "\tfor (int j = 0; j < n; j++) {\n"
		       "\t\tif (keep && !keep[j])\n\t\t\tcontinue;\n"
		       "\t\tif (den > 0.0f)\n\t\t\tw[j] = w[j] / den;\n"
		       "\t\tw[j] = w[j] * kScale;\n\t}\n}\n\n");
	else
		raw(b, "\tfor (int j = 0; j < n; j++)\n"
		       "\t\tif (!keep || keep[j])\n\t\t\tw[j] = w[j] * kScale;\n}\n\n");
}

static void emit_router(struct gen *g)
{
	const struct moe_desc *d = g->d;
	struct ebuf *b = &g->b;
	emit_normalize(g);
	raw(b, "/* ---- router ----\n"
	       " * A logit is the sum, in chunk order, of fma chains over K chunks of kRChunk\n"
	       " * columns in column order. Both router kernels compute exactly that, so a\n"
	       " * token's routing never depends on the batch size. */\n\n"
	       "/* logits of 64 tokens x 64 experts per block, 4 x 4 per thread */\n"
	       "extern \"C\" __global__ void __launch_bounds__(256) moe_route_logits(const "
	       "moe_args a)\n{\n"
	       "\t__shared__ float xs[64][kRChunk + 1], rs[64][kRChunk + 1];\n"
	       "\tconst i64 t0 = blockIdx.x * 64LL;\n"
	       "\tconst int e0 = blockIdx.y * 64, tx = threadIdx.x & 15, ty = threadIdx.x >> 4;\n"
	       "\tconst act_t *x = (const act_t *)a.x;\n"
	       "\tfloat tot[4][4], acc[4][4];\n"
	       "\tfor (int i = 0; i < 4; i++)\n\t\tfor (int j = 0; j < 4; j++)\n"
	       "\t\t\ttot[i][j] = 0.0f;\n"
	       "\tfor (int h0 = 0; h0 < kHidden; h0 += kRChunk) {\n"
	       "\t\tconst int n = min(kRChunk, kHidden - h0);\n"
	       "\t\tfor (int i = threadIdx.x; i < 64 * kRChunk; i += 256) {\n"
	       "\t\t\tconst int r = i / kRChunk, k = i % kRChunk;\n"
	       "\t\t\tconst i64 t = t0 + r;\n"
	       "\t\t\tconst int e = e0 + r;\n"
	       "\t\t\txs[r][k] = t < a.T && k < n ? ld_act(x + t * kHidden + h0 + k) : 0.0f;\n"
	       "\t\t\trs[r][k] = e < kExperts && k < n ? a.router[(i64)e * kHidden + h0 + k] : "
	       "0.0f;\n"
	       "\t\t}\n"
	       "\t\t__syncthreads();\n"
	       "\t\tfor (int i = 0; i < 4; i++)\n\t\t\tfor (int j = 0; j < 4; j++)\n"
	       "\t\t\t\tacc[i][j] = 0.0f;\n"
	       "\t\tfor (int k = 0; k < n; k++)\n"
	       "\t\t\tfor (int i = 0; i < 4; i++)\n\t\t\t\tfor (int j = 0; j < 4; j++)\n"
	       "\t\t\t\t\tacc[i][j] = __fmaf_rn(xs[ty * 4 + i][k], rs[tx * 4 + j][k], "
	       "acc[i][j]);\n"
	       "\t\tfor (int i = 0; i < 4; i++)\n\t\t\tfor (int j = 0; j < 4; j++)\n"
	       "\t\t\t\ttot[i][j] = __fadd_rn(tot[i][j], acc[i][j]);\n"
	       "\t\t__syncthreads();\n"
	       "\t}\n"
	       "\tfor (int i = 0; i < 4; i++)\n\t\tfor (int j = 0; j < 4; j++) {\n"
	       "\t\t\tconst i64 t = t0 + ty * 4 + i;\n"
	       "\t\t\tconst int e = e0 + tx * 4 + j;\n"
	       "\t\t\tif (t < a.T && e < kExperts)\n"
	       "\t\t\t\ta.logits[t * kExperts + e] = tot[i][j];\n"
	       "\t\t}\n}\n\n");

	raw(b, "/* One block (256 threads) per token: logits -> scores -> selection ->\n"
	       " * weights. */\n"
	       "__device__ void route_token(const moe_args &a, const i64 t)\n{\n"
	       "\tfloat *l = a.logits + t * kExperts, *s = a.scores + t * kExperts;\n"
	       "\tfloat *c = a.sel + t * kExperts;\n"
	       "\tint *ids = a.ids + t * kRoute;\n"
	       "\tfloat *wts = a.wts + t * kRoute;\n\n"
	       "\tfor (int e = threadIdx.x; e < kExperts; e += blockDim.x) {\n"
	       "\t\tfloat v;\n"
	       "\t\tif (a.small) { /* the chunk partials, in chunk order */\n"
	       "\t\t\t/* written by other blocks: volatile reads skip the L1 */\n"
	       "\t\t\tconst volatile float *p = a.partials + (t * kExperts + e) * kChunks;\n"
	       "\t\t\tv = 0.0f;\n"
	       "\t\t\tfor (int k = 0; k < kChunks; k++)\n"
	       "\t\t\t\tv = __fadd_rn(v, p[k]);\n"
	       "\t\t} else {\n\t\t\tv = l[e];\n\t\t}\n");
	if (d->router_bias)
		raw(b, "\t\tv = __fadd_rn(v, a.router_bias[e]);\n");
	raw(b, "\t\tl[e] = v;\n\t}\n\t__syncthreads();\n\n");

	switch (d->score) {
	case MOE_SCORE_SOFTMAX:
		raw(b, "\t/* softmax over every expert: exp in double, like the reference */\n"
		       "\tfloat m = neg_inf();\n"
		       "\tfor (int e = threadIdx.x; e < kExperts; e += blockDim.x)\n"
		       "\t\tm = l[e] > m ? l[e] : m;\n"
		       "\tm = block_max(m);\n"
		       "\tfloat z = 0.0f;\n"
		       "\tfor (int e = threadIdx.x; e < kExperts; e += blockDim.x) {\n"
		       "\t\tconst float v = (float)exp((double)(l[e] - m));\n"
		       "\t\ts[e] = v;\n\t\tz += v;\n\t}\n"
		       "\tz = block_sum(z);\n"
		       "\tfor (int e = threadIdx.x; e < kExperts; e += blockDim.x)\n"
		       "\t\ts[e] = s[e] / z;\n");
		break;
	case MOE_SCORE_SIGMOID:
		raw(b, "\tfor (int e = threadIdx.x; e < kExperts; e += blockDim.x) /* sigmoid */\n"
		       "\t\ts[e] = (float)(1.0 / (1.0 + exp(-(double)l[e])));\n");
		break;
	default:
		raw(b, "\tfor (int e = threadIdx.x; e < kExperts; e += blockDim.x) { /* sqrt "
		       "softplus */\n"
		       "\t\tconst double v = l[e];\n"
		       "\t\tconst float sp = (float)(v > 20.0 ? v : log1p(exp(v)));\n"
		       "\t\ts[e] = (float)sqrt((double)sp);\n\t}\n");
		break;
	}

	if (g->dense) {
		raw(b, "\t/* dense: every expert, in order */\n"
		       "\tfor (int e = threadIdx.x; e < kExperts; e += blockDim.x) {\n"
		       "\t\tc[e] = s[e];\n\t\tids[e] = e;\n\t}\n"
		       "\t__syncthreads();\n");
	} else {
		raw(b, "\t/* selection scores */\n"
		       "\tfor (int e = threadIdx.x; e < kExperts; e += blockDim.x)\n");
		if (d->select_bias)
			raw(b, "\t\tc[e] = __fadd_rn(s[e], a.select_bias[e]); /* selection only "
			       "*/\n");
		else
			raw(b, "\t\tc[e] = s[e];\n");
		raw(b, "\t__syncthreads();\n");
		if (d->n_groups > 1) {
			put(b,
			    "\n\t/* group-limited: keep the kGroupTop best groups (%s score), "
			    "mask the rest */\n",
			    d->group_score == MOE_GROUP_SCORE_SUM_TOP2 ? "sum of the top two"
								       : "max");
			raw(b, "\tfloat *gs = a.gscore + t * kGroups;\n"
			       "\tfor (int gi = threadIdx.x; gi < kGroups; gi += blockDim.x) {\n"
			       "\t\tconst float *cg = c + gi * kGroupSize;\n"
			       "\t\tfloat b1 = neg_inf(), b2 = neg_inf();\n"
			       "\t\tfor (int i = 0; i < kGroupSize; i++) {\n"
			       "\t\t\tif (cg[i] > b1)\n\t\t\t\tb2 = b1, b1 = cg[i];\n"
			       "\t\t\telse if (cg[i] > b2)\n\t\t\t\tb2 = cg[i];\n\t\t}\n");
			if (d->group_score == MOE_GROUP_SCORE_SUM_TOP2 &&
			    d->n_experts / d->n_groups >= 2)
				raw(b, "\t\tgs[gi] = b1 + b2;\n");
			else
				raw(b, "\t\tgs[gi] = b1;\n");
			raw(b, "\t}\n\t__syncthreads();\n"
			       "\tint pg = -1;\n\tfloat pgv = 0.0f;\n"
			       "\tfor (int j = 0; j < kGroupTop; j++) {\n"
			       "\t\tpg = block_next(gs, kGroups, pgv, pg);\n"
			       "\t\tpgv = gs[pg];\n\t}\n"
			       "\t/* kept: the groups ranked up to the last one picked */\n"
			       "\tfor (int e = threadIdx.x; e < kExperts; e += blockDim.x) {\n"
			       "\t\tconst int gi = e / kGroupSize;\n"
			       "\t\tif (gi != pg && !ranks_before(gs[gi], gi, pgv, pg))\n"
			       "\t\t\tc[e] = neg_inf();\n\t}\n"
			       "\t__syncthreads();\n");
		}
		raw(b, "\n\t/* top-k in rank order: value descending, ties to the lower index */\n"
		       "\tint pk = -1;\n\tfloat pv = 0.0f;\n"
		       "\tfor (int j = 0; j < kRoute; j++) {\n"
		       "\t\tpk = block_next(c, kExperts, pv, pk);\n"
		       "\t\tpv = c[pk];\n"
		       "\t\tif (threadIdx.x == 0)\n\t\t\tids[j] = pk;\n\t}\n"
		       "\t__syncthreads();\n");
	}

	if (g->after_drop)
		raw(b, "\n\t/* weights from the unbiased scores; normalized and scaled after the\n"
		       "\t * capacity, over the slots it keeps (moe_cap_normalize) */\n"
		       "\tif (threadIdx.x == 0) {\n"
		       "\t\tfor (int j = 0; j < kRoute; j++)\n"
		       "\t\t\twts[j] = s[ids[j]];\n");
	else
		raw(b, "\n\t/* weights from the unbiased scores, normalized in rank order */\n"
		       "\tif (threadIdx.x == 0) {\n"
		       "\t\tfor (int j = 0; j < kRoute; j++)\n"
		       "\t\t\twts[j] = s[ids[j]];\n"
		       "\t\tnormalize_scale(wts, nullptr, kRoute);\n");
	if (g->cap)
		raw(b, "\t\ta.prio[t] = c[ids[0]]; /* capacity priority */\n");
	raw(b, "\t}\n");
	if (g->shared && d->shared_gate == MOE_SHARED_GATE_SIGMOID)
		raw(b, "\n\t/* the shared experts' gate: sigmoid(x . w) */\n"
		       "\tconst act_t *x = (const act_t *)a.x + t * kHidden;\n"
		       "\tfloat dot = 0.0f;\n"
		       "\tfor (int h = threadIdx.x; h < kHidden; h += blockDim.x)\n"
		       "\t\tdot = __fmaf_rn(ld_act(x + h), a.shared_gate_w[h], dot);\n"
		       "\tdot = block_sum(dot);\n"
		       "\tif (threadIdx.x == 0)\n"
		       "\t\ta.sgate[t] = (float)(1.0 / (1.0 + exp(-(double)dot)));\n");
	raw(b, "}\n\n");

	raw(b, "/* T > 32: after moe_route_logits, grid T */\n"
	       "extern \"C\" __global__ void __launch_bounds__(256) moe_route_select(const "
	       "moe_args a)\n{\n"
	       "\troute_token(a, blockIdx.x);\n}\n\n"
	       "/* T <= 32, the whole router in one launch: grid (blocks of (expert, chunk)\n"
	       " * partials, T); the last block of a token to finish routes it. */\n"
	       "extern \"C\" __global__ void __launch_bounds__(256) moe_route_small(const "
	       "moe_args a)\n{\n"
	       "\t__shared__ bool last;\n"
	       "\tconst i64 t = blockIdx.y;\n"
	       "\tconst int i = blockIdx.x * 256 + threadIdx.x;\n"
	       "\tif (i < kExperts * kChunks) {\n"
	       "\t\tconst int c = i % kChunks, e = i / kChunks;\n"
	       "\t\tconst act_t *x = (const act_t *)a.x + t * kHidden;\n"
	       "\t\tconst float *r = a.router + (i64)e * kHidden;\n"
	       "\t\tconst int h1 = min((c + 1) * kRChunk, kHidden);\n"
	       "\t\tfloat acc = 0.0f;\n"
	       "\t\tfor (int h = c * kRChunk; h < h1; h++)\n"
	       "\t\t\tacc = __fmaf_rn(ld_act(x + h), r[h], acc);\n"
	       "\t\ta.partials[t * kExperts * kChunks + i] = acc;\n\t}\n"
	       "\t__threadfence();\n"
	       "\t__syncthreads();\n"
	       "\tif (threadIdx.x == 0) {\n"
	       "\t\tlast = atomicAdd(&a.done[t], 1u) == gridDim.x - 1;\n"
	       "\t\tif (last)\n\t\t\ta.done[t] = 0; /* ready for the next call */\n\t}\n"
	       "\t__syncthreads();\n"
	       "\tif (!last)\n\t\treturn;\n"
	       "\t__threadfence();\n"
	       "\troute_token(a, t);\n}\n\n");
}

static void emit_capacity(struct gen *g)
{
	const struct moe_desc *d = g->d;
	struct ebuf *b = &g->b;
	int score = d->priority == MOE_PRIORITY_SCORE;
	raw(b, "/* ---- capacity ---- */\n");
	if (score)
		raw(b, "/* Tokens by priority (top selection score, descending; ties to the\n"
		       " * earlier token): each token counts the tokens ranked before it. */\n"
		       "extern \"C\" __global__ void __launch_bounds__(256) moe_cap_order(const "
		       "moe_args a)\n{\n"
		       "\tconst i64 t = blockIdx.x * 256LL + threadIdx.x;\n"
		       "\tif (t >= a.T)\n\t\treturn;\n"
		       "\tconst float v = a.prio[t];\n"
		       "\ti64 r = 0;\n"
		       "\tfor (i64 u = 0; u < a.T; u++)\n"
		       "\t\tr += ranks_before(a.prio[u], u, v, t);\n"
		       "\ta.order[r] = (int)t;\n}\n\n");
	put(b,
	    "/* Each expert keeps its first a.capacity assignments, rank outer and tokens\n"
	    " * inner in %s order; the rest overflow (%s). One thread per expert. */\n"
	    "extern \"C\" __global__ void __launch_bounds__(128) moe_capacity(const moe_args a)\n"
	    "{\n"
	    "\tconst int e = blockIdx.x * 128 + threadIdx.x;\n"
	    "\tif (e >= kExperts)\n\t\treturn;\n"
	    "\ti64 fill = 0;\n"
	    "\tfor (int r = 0; r < kRoute; r++)\n"
	    "\t\tfor (i64 i = 0; i < a.T; i++) {\n"
	    "\t\t\tconst i64 s = (i64)%s * kRoute + r;\n"
	    "\t\t\tif (a.ids[s] != e)\n\t\t\t\tcontinue;\n"
	    "\t\t\ta.kept[s] = fill < a.capacity;\n"
	    "\t\t\tfill += fill < a.capacity;\n"
	    "\t\t}\n}\n\n",
	    score ? "priority" : "token", moe_overflow_names[d->overflow],
	    score ? "a.order[i]" : "i");
	if (g->after_drop)
		raw(b,
		    "/* The weights the capacity kept, normalized and scaled per token. */\n"
		    "extern \"C\" __global__ void __launch_bounds__(256) moe_cap_normalize(const "
		    "moe_args a)\n{\n"
		    "\tconst i64 t = blockIdx.x * 256LL + threadIdx.x;\n"
		    "\tif (t < a.T)\n"
		    "\t\tnormalize_scale(a.wts + t * kRoute, a.kept + t * kRoute, kRoute);\n}\n\n");
}

static void emit_group(struct gen *g)
{
	struct ebuf *b = &g->b;
	raw(b, "/* ---- grouping by expert, on the device ----\n"
	       " * mask[blk][e] has bit i set when token 32*blk + i chose expert e. A row's\n"
	       " * place is its block's base plus the earlier tokens of the block: rows of\n"
	       " * an expert are sorted by token, deterministically, without a sort. */\n"
	       "extern \"C\" __global__ void __launch_bounds__(256) moe_group_mask(const "
	       "moe_args a)\n{\n"
	       "\tconst i64 s = blockIdx.x * 256LL + threadIdx.x;\n"
	       "\tif (s >= a.T * kRoute)\n\t\treturn;\n");
	if (g->cap)
		raw(b, "\tif (!a.kept[s])\n\t\treturn;\n");
	raw(b, "\tconst i64 t = s / kRoute;\n"
	       "\tatomicOr(&a.mask[(t >> 5) * kExperts + a.ids[s]], 1u << (t & 31));\n}\n\n");

	put(b, "/* Counts, offsets and GEMM row tiles per expert, the base row of every token\n"
	       " * block: one block of 1024 threads, experts in chunks of 1024. */\n"
	       "extern \"C\" __global__ void __launch_bounds__(1024) moe_group_offsets(const "
	       "moe_args a)\n{\n"
	       "\t__shared__ int wsum[32][2], carry[2];\n"
	       "\tconst i64 nb = (a.T + 31) >> 5;\n"
	       "\tconst int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n"
	       "\tif (threadIdx.x == 0)\n\t\tcarry[0] = carry[1] = 0;\n"
	       "\t__syncthreads();\n"
	       "\tfor (int e0 = 0; e0 < kExperts; e0 += 1024) {\n"
	       "\t\tconst int e = e0 + threadIdx.x;\n"
	       "\t\tint n = 0;\n"
	       "\t\tif (e < kExperts)\n"
	       "\t\t\tfor (i64 blk = 0; blk < nb; blk++)\n"
	       "\t\t\t\tn += __popc(a.mask[blk * kExperts + e]);\n"
	       "\t\tconst int tiles = (n + kBM - 1) / kBM;\n"
	       "\t\t/* exclusive scan of (n, tiles) over the block */\n"
	       "\t\tint sn = n, st = tiles;\n"
	       "\t\tfor (int o = 1; o < 32; o <<= 1) {\n"
	       "\t\t\tconst int un = __shfl_up_sync(0xffffffffu, sn, o);\n"
	       "\t\t\tconst int ut = __shfl_up_sync(0xffffffffu, st, o);\n"
	       "\t\t\tif (lane >= o)\n\t\t\t\tsn += un, st += ut;\n\t\t}\n"
	       "\t\tif (lane == 31)\n\t\t\twsum[warp][0] = sn, wsum[warp][1] = st;\n"
	       "\t\t__syncthreads();\n"
	       "\t\tif (warp == 0) {\n"
	       "\t\t\tint vn = wsum[lane][0], vt = wsum[lane][1];\n"
	       "\t\t\tfor (int o = 1; o < 32; o <<= 1) {\n"
	       "\t\t\t\tconst int un = __shfl_up_sync(0xffffffffu, vn, o);\n"
	       "\t\t\t\tconst int ut = __shfl_up_sync(0xffffffffu, vt, o);\n"
	       "\t\t\t\tif (lane >= o)\n\t\t\t\t\tvn += un, vt += ut;\n\t\t\t}\n"
	       "\t\t\twsum[lane][0] = vn, wsum[lane][1] = vt;\n\t\t}\n"
	       "\t\t__syncthreads();\n"
	       "\t\tconst int bn = carry[0] + sn - n + (warp ? wsum[warp - 1][0] : 0);\n"
	       "\t\tconst int bt = carry[1] + st - tiles + (warp ? wsum[warp - 1][1] : 0);\n"
	       "\t\tif (e < kExperts) {\n"
	       "\t\t\ta.counts[e] = n;\n\t\t\ta.offsets[e] = bn;\n\t\t\ta.tstart[e] = bt;\n"
	       "\t\t\tint run = bn;\n"
	       "\t\t\tfor (i64 blk = 0; blk < nb; blk++) {\n"
	       "\t\t\t\ta.tbase[blk * kExperts + e] = run;\n"
	       "\t\t\t\trun += __popc(a.mask[blk * kExperts + e]);\n\t\t\t}\n\t\t}\n"
	       "\t\t__syncthreads();\n"
	       "\t\tif (threadIdx.x == 0)\n"
	       "\t\t\tcarry[0] += wsum[31][0], carry[1] += wsum[31][1];\n"
	       "\t\t__syncthreads();\n"
	       "\t}\n"
	       "\tif (threadIdx.x == 0)\n"
	       "\t\ta.offsets[kExperts] = carry[0], a.tstart[kExperts] = carry[1];\n}\n\n");

	raw(b, "extern \"C\" __global__ void __launch_bounds__(256) moe_group_scatter(const "
	       "moe_args a)\n{\n"
	       "\tconst i64 s = blockIdx.x * 256LL + threadIdx.x;\n"
	       "\tif (s >= a.T * kRoute)\n\t\treturn;\n");
	if (g->cap)
		raw(b, "\tif (!a.kept[s]) {\n\t\ta.slot_row[s] = -1;\n\t\treturn;\n\t}\n");
	raw(b, "\tconst i64 t = s / kRoute;\n"
	       "\tconst i64 m = (t >> 5) * kExperts + a.ids[s];\n"
	       "\tconst int row = a.tbase[m] + __popc(a.mask[m] & ((1u << (t & 31)) - 1u));\n"
	       "\ta.rows[row] = (int)t;\n"
	       "\ta.row_w[row] = a.wts[s];\n"
	       "\ta.slot_row[s] = row;\n}\n\n");

	raw(b, "/* The GEMM row tile of this block: expert e, its rows [m0, m0 + n), which\n"
	       " * are grouped rows row0 + [0, n). Blocks past the last tile have none. */\n"
	       "struct tile {\n\tint e, m0, n;\n\ti64 row0;\n};\n\n"
	       "__device__ __forceinline__ bool find_tile(const moe_args &a, tile &tl)\n{\n"
	       "\tconst int blk = blockIdx.x;\n"
	       "\tif (blk >= a.tstart[kExperts])\n\t\treturn false;\n"
	       "\tint lo = 0, hi = kExperts - 1; /* the last expert starting at or before blk "
	       "*/\n"
	       "\twhile (lo < hi) {\n"
	       "\t\tconst int mid = (lo + hi + 1) >> 1;\n"
	       "\t\tif (a.tstart[mid] <= blk)\n\t\t\tlo = mid;\n\t\telse\n\t\t\thi = mid - 1;\n"
	       "\t}\n"
	       "\ttl.e = lo;\n"
	       "\ttl.m0 = (blk - a.tstart[lo]) * kBM;\n"
	       "\ttl.n = min(kBM, a.counts[lo] - tl.m0);\n"
	       "\ttl.row0 = (i64)a.offsets[lo] + tl.m0;\n"
	       "\treturn true;\n}\n\n");
}

/* Tensor-core GEMMs (16-bit weights). */
static void emit_gemm_mma(struct gen *g)
{
	const struct moe_desc *d = g->d;
	struct ebuf *b = &g->b;
	raw(b, "/* ---- grouped GEMM on tensor cores ----\n"
	       " * 64 x 64 tiles, K steps of 32 double-buffered in shared memory (weights by\n"
	       " * cp.async, activations through registers), four warps of 32 x 32, each a\n"
	       " * 2 x 4 grid of mma.sync m16n8k16 with f32 accumulators. */\n"
	       "constexpr int kLds = kBK + 8; /* shared row stride: 80 bytes, no bank "
	       "conflicts for ldmatrix */\n\n"
	       "#ifndef MOE_CUDA_EMULATION\n"
	       "__device__ __forceinline__ unsigned smem_u32(const void *p)\n{\n"
	       "\treturn (unsigned)__cvta_generic_to_shared(p);\n}\n\n"
	       "/* 16 bytes global -> shared; zero-filled when !full */\n"
	       "__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool "
	       "full)\n{\n"
	       "\tasm volatile(\"cp.async.cg.shared.global [%0], [%1], 16, %2;\" ::\"r\"("
	       "smem_u32(dst)),\n"
	       "\t\t     \"l\"(src), \"r\"(full ? 16 : 0));\n}\n\n"
	       "__device__ __forceinline__ void cp_async_commit()\n{\n"
	       "\tasm volatile(\"cp.async.commit_group;\");\n}\n\n"
	       "template <int N> __device__ __forceinline__ void cp_async_wait()\n{\n"
	       "\tasm volatile(\"cp.async.wait_group %0;\" ::\"n\"(N));\n}\n\n"
	       "__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void *p)\n{\n"
	       "\tasm volatile(\"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, "
	       "[%4];\"\n"
	       "\t\t     : \"=r\"(r[0]), \"=r\"(r[1]), \"=r\"(r[2]), \"=r\"(r[3])\n"
	       "\t\t     : \"r\"(smem_u32(p)));\n}\n\n");
	put(b,
	    "__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], "
	    "unsigned b0,\n"
	    "\t\t\t\t\t  unsigned b1)\n{\n"
	    "\tasm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.%s.%s.f32 \"\n"
	    "\t\t     \"{%%0, %%1, %%2, %%3}, {%%4, %%5, %%6, %%7}, {%%8, %%9}, {%%0, %%1, "
	    "%%2, %%3};\"\n"
	    "\t\t     : \"+f\"(c[0]), \"+f\"(c[1]), \"+f\"(c[2]), \"+f\"(c[3])\n"
	    "\t\t     : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b0), "
	    "\"r\"(b1));\n}\n"
	    "#else /* the host emulation's warp-level versions */\n"
	    "__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool full)\n"
	    "{\n\temu_cp_async16(dst, src, full);\n}\n"
	    "__device__ __forceinline__ void cp_async_commit()\n{\n}\n"
	    "template <int N> __device__ __forceinline__ void cp_async_wait()\n{\n}\n"
	    "__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void *p)\n{\n"
	    "\temu_ldsm_x4(r, p);\n}\n"
	    "__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], "
	    "unsigned b0,\n"
	    "\t\t\t\t\t  unsigned b1)\n{\n"
	    "\temu_mma_16816_%s(c, a, b0, b1);\n}\n"
	    "#endif\n\n",
	    g->wname, g->wname, g->wname);
	raw(b, "struct __align__(16) gemm_smem {\n"
	       "\tbits16 a[2][kBM * kLds]; /* [row][k] */\n"
	       "\tbits16 b[2][kBN * kLds]; /* [packed weight row][k] */\n};\n\n"
	       "/* One K step of the warp's 32 x 32 tile. */\n"
	       "__device__ __forceinline__ void mma_step(const bits16 *As, const bits16 *Bs, "
	       "float (&acc)[2][4][4])\n{\n"
	       "\tconst int lane = threadIdx.x & 31, wm = (threadIdx.x >> 5) & 1, wn = "
	       "threadIdx.x >> 6;\n"
	       "#pragma unroll\n"
	       "\tfor (int kk = 0; kk < kBK; kk += 16) {\n"
	       "\t\tunsigned af[2][4], bfr[2][4];\n"
	       "#pragma unroll\n"
	       "\t\tfor (int mi = 0; mi < 2; mi++)\n"
	       "\t\t\tldsm_x4(af[mi], As + (wm * 32 + mi * 16 + (lane & 15)) * kLds + kk + "
	       "(lane >> 4) * 8);\n"
	       "#pragma unroll\n"
	       "\t\tfor (int nj = 0; nj < 2; nj++) /* two n8 tiles per ldmatrix */\n"
	       "\t\t\tldsm_x4(bfr[nj], Bs + (wn * 32 + nj * 16 + (lane >> 4) * 8 + (lane & 7)) * "
	       "kLds + kk +\n"
	       "\t\t\t\t\t\t ((lane >> 3) & 1) * 8);\n"
	       "#pragma unroll\n"
	       "\t\tfor (int mi = 0; mi < 2; mi++)\n"
	       "#pragma unroll\n"
	       "\t\t\tfor (int ni = 0; ni < 4; ni++)\n"
	       "\t\t\t\tmma_16816(acc[mi][ni], af[mi], bfr[ni >> 1][(ni & 1) * 2],\n"
	       "\t\t\t\t\t  bfr[ni >> 1][(ni & 1) * 2 + 1]);\n\t}\n}\n\n"
	       "/* 64 packed weight rows x kBK from row stride ld, K offset k0 */\n"
	       "__device__ __forceinline__ void load_w(bits16 *Bs, const w_t *w, int ld, int k0)\n"
	       "{\n"
	       "#pragma unroll\n"
	       "\tfor (int i = 0; i < 2; i++) {\n"
	       "\t\tconst int c = threadIdx.x + i * 128, r = c >> 2, k = (c & 3) * 8;\n"
	       "\t\tcp_async16(Bs + r * kLds + k, w + (i64)r * ld + k0 + k, true);\n\t}\n}\n\n"
	       "/* rows [0, n) of h (contiguous grouped rows), zero past n */\n"
	       "__device__ __forceinline__ void load_h(bits16 *As, const w_t *h, int ld, int n, "
	       "int k0)\n{\n"
	       "#pragma unroll\n"
	       "\tfor (int i = 0; i < 2; i++) {\n"
	       "\t\tconst int c = threadIdx.x + i * 128, r = c >> 2, k = (c & 3) * 8;\n"
	       "\t\tcp_async16(As + r * kLds + k, r < n ? h + (i64)r * ld + k0 + k : h, r < n);\n"
	       "\t}\n}\n\n"
	       "/* Gathered activation rows: thread rows (tid >> 3) + 16 i, columns 4 (tid & 7),\n"
	       " * token tok[i] (< 0: none), scaled by sc[i]; converted to the weight type. */\n"
	       "__device__ __forceinline__ void fetch_x(float (&v)[4][4], const act_t *x, const "
	       "i64 (&tok)[4],\n"
	       "\t\t\t\t\tconst float (&sc)[4], int k0)\n{\n"
	       "\tconst int k = k0 + (threadIdx.x & 7) * 4;\n"
	       "#pragma unroll\n"
	       "\tfor (int i = 0; i < 4; i++) {\n");
	if (d->hidden % 4 == 0)
		raw(b, "\t\tif (tok[i] >= 0 && k < kHidden)\n"
		       "\t\t\tld_act4(x + tok[i] * kHidden + k, v[i]);\n"
		       "\t\telse\n"
		       "\t\t\tv[i][0] = v[i][1] = v[i][2] = v[i][3] = 0.0f;\n");
	else
		raw(b, "\t\tfor (int j = 0; j < 4; j++)\n"
		       "\t\t\tv[i][j] = tok[i] >= 0 && k + j < kHidden ? ld_act(x + tok[i] * "
		       "kHidden + k + j) : 0.0f;\n");
	raw(b, "#pragma unroll\n"
	       "\t\tfor (int j = 0; j < 4; j++)\n\t\t\tv[i][j] *= sc[i];\n\t}\n}\n\n"
	       "__device__ __forceinline__ void store_x(bits16 *As, const float (&v)[4][4])\n{\n"
	       "#pragma unroll\n"
	       "\tfor (int i = 0; i < 4; i++) {\n"
	       "\t\tconst int r = (threadIdx.x >> 3) + 16 * i, k = (threadIdx.x & 7) * 4;\n"
	       "\t\t*(uint2 *)(As + r * kLds + k) = make_uint2(pack_w2(v[i][0], v[i][1]), "
	       "pack_w2(v[i][2], v[i][3]));\n"
	       "\t}\n}\n\n"
	       "/* acc += X[tok] . W^T over K = F::up_k: the up GEMM main loop */\n"
	       "template <class F>\n"
	       "__device__ __forceinline__ void up_loop(gemm_smem &sm, const act_t *x, const i64 "
	       "(&tok)[4],\n"
	       "\t\t\t\t\tconst float (&sc)[4], const w_t *w, float (&acc)[2][4][4])\n{\n"
	       "\tconstexpr int KT = F::up_k / kBK;\n"
	       "\tfloat v[4][4];\n"
	       "\tfetch_x(v, x, tok, sc, 0);\n"
	       "\tstore_x(sm.a[0], v);\n"
	       "\tload_w(sm.b[0], w, F::up_k, 0);\n"
	       "\tcp_async_commit();\n"
	       "\tfor (int kt = 0; kt < KT; kt++) {\n"
	       "\t\tconst int cur = kt & 1;\n"
	       "\t\tif (kt + 1 < KT) {\n"
	       "\t\t\tload_w(sm.b[cur ^ 1], w, F::up_k, (kt + 1) * kBK);\n"
	       "\t\t\tcp_async_commit();\n"
	       "\t\t\tfetch_x(v, x, tok, sc, (kt + 1) * kBK);\n"
	       "\t\t\tcp_async_wait<1>();\n"
	       "\t\t} else {\n\t\t\tcp_async_wait<0>();\n\t\t}\n"
	       "\t\t__syncthreads();\n"
	       "\t\tmma_step(sm.a[cur], sm.b[cur], acc);\n"
	       "\t\tif (kt + 1 < KT)\n\t\t\tstore_x(sm.a[cur ^ 1], v);\n"
	       "\t\t__syncthreads();\n\t}\n}\n\n"
	       "/* acc += H[0, n) . W^T over K = F::ld_h: the down GEMM main loop */\n"
	       "template <class F>\n"
	       "__device__ __forceinline__ void down_loop(gemm_smem &sm, const w_t *h, int n, "
	       "const w_t *w,\n"
	       "\t\t\t\t\t  float (&acc)[2][4][4])\n{\n"
	       "\tconstexpr int KT = F::ld_h / kBK;\n"
	       "\tload_h(sm.a[0], h, F::ld_h, n, 0);\n"
	       "\tload_w(sm.b[0], w, F::ld_h, 0);\n"
	       "\tcp_async_commit();\n"
	       "\tfor (int kt = 0; kt < KT; kt++) {\n"
	       "\t\tconst int cur = kt & 1;\n"
	       "\t\tif (kt + 1 < KT) {\n"
	       "\t\t\tload_h(sm.a[cur ^ 1], h, F::ld_h, n, (kt + 1) * kBK);\n"
	       "\t\t\tload_w(sm.b[cur ^ 1], w, F::ld_h, (kt + 1) * kBK);\n"
	       "\t\t\tcp_async_commit();\n"
	       "\t\t\tcp_async_wait<1>();\n"
	       "\t\t} else {\n\t\t\tcp_async_wait<0>();\n\t\t}\n"
	       "\t\t__syncthreads();\n"
	       "\t\tmma_step(sm.a[cur], sm.b[cur], acc);\n"
	       "\t\t__syncthreads();\n\t}\n}\n\n"
	       "/* Up epilogue: h[row, col] = act(gate) * up (GLU: n8 tiles 2p, 2p+1 are the\n"
	       " * gate and up of the same 8 columns) or act(up), biases added first. */\n"
	       "template <class F>\n"
	       "__device__ __forceinline__ void up_store(const float (&acc)[2][4][4], w_t *h, "
	       "int n, const float *bg,\n"
	       "\t\t\t\t\t const float *bu)\n{\n"
	       "\tconst int lane = threadIdx.x & 31, wm = (threadIdx.x >> 5) & 1, wn = "
	       "threadIdx.x >> 6;\n"
	       "#pragma unroll\n"
	       "\tfor (int mi = 0; mi < 2; mi++)\n"
	       "#pragma unroll\n"
	       "\t\tfor (int half = 0; half < 2; half++) {\n"
	       "\t\t\tconst int r = wm * 32 + mi * 16 + (lane >> 2) + half * 8;\n"
	       "\t\t\tif (r >= n)\n\t\t\t\tcontinue;\n"
	       "\t\t\tw_t *hr = h + (i64)r * F::ld_h;\n"
	       "\t\t\tif constexpr (F::glu) {\n"
	       "#pragma unroll\n"
	       "\t\t\t\tfor (int p = 0; p < 2; p++) {\n"
	       "\t\t\t\t\tconst int col = blockIdx.y * (kBN / 2) + wn * 16 + p * 8 + (lane & "
	       "3) * 2;\n"
	       "\t\t\t\t\tfloat g0 = acc[mi][2 * p][half * 2], g1 = acc[mi][2 * p][half * 2 + "
	       "1];\n"
	       "\t\t\t\t\tfloat u0 = acc[mi][2 * p + 1][half * 2], u1 = acc[mi][2 * p + 1][half "
	       "* 2 + 1];\n"
	       "\t\t\t\t\tif (bg)\n\t\t\t\t\t\tg0 += bg[col], g1 += bg[col + 1];\n"
	       "\t\t\t\t\tif (bu)\n\t\t\t\t\t\tu0 += bu[col], u1 += bu[col + 1];\n"
	       "\t\t\t\t\t*(unsigned *)(hr + col) = pack_w2(F::glu_out(g0, u0), "
	       "F::glu_out(g1, u1));\n"
	       "\t\t\t\t}\n"
	       "\t\t\t} else {\n"
	       "#pragma unroll\n"
	       "\t\t\t\tfor (int ni = 0; ni < 4; ni++) {\n"
	       "\t\t\t\t\tconst int col = blockIdx.y * kBN + wn * 32 + ni * 8 + (lane & 3) * "
	       "2;\n"
	       "\t\t\t\t\tfloat u0 = acc[mi][ni][half * 2], u1 = acc[mi][ni][half * 2 + 1];\n"
	       "\t\t\t\t\tif (bu)\n\t\t\t\t\t\tu0 += bu[col], u1 += bu[col + 1];\n"
	       "\t\t\t\t\t*(unsigned *)(hr + col) = pack_w2(F::act(u0), F::act(u1));\n"
	       "\t\t\t\t}\n\t\t\t}\n\t\t}\n}\n\n"
	       "/* Down epilogue: out[row, col] = scale[row] * (acc + bias[col]), f32 */\n"
	       "__device__ __forceinline__ void down_store(const float (&acc)[2][4][4], float "
	       "*out, int n,\n"
	       "\t\t\t\t\t   const float *scale, const float *bd)\n{\n"
	       "\tconst int lane = threadIdx.x & 31, wm = (threadIdx.x >> 5) & 1, wn = "
	       "threadIdx.x >> 6;\n"
	       "#pragma unroll\n"
	       "\tfor (int mi = 0; mi < 2; mi++)\n"
	       "#pragma unroll\n"
	       "\t\tfor (int half = 0; half < 2; half++) {\n"
	       "\t\t\tconst int r = wm * 32 + mi * 16 + (lane >> 2) + half * 8;\n"
	       "\t\t\tif (r >= n)\n\t\t\t\tcontinue;\n"
	       "\t\t\tconst float w = scale ? scale[r] : 1.0f;\n"
	       "#pragma unroll\n"
	       "\t\t\tfor (int ni = 0; ni < 4; ni++)\n"
	       "#pragma unroll\n"
	       "\t\t\t\tfor (int q = 0; q < 2; q++) {\n"
	       "\t\t\t\t\tconst int col = blockIdx.y * kBN + wn * 32 + ni * 8 + (lane & 3) * 2 "
	       "+ q;\n"
	       "\t\t\t\t\tif (col < kHidden)\n"
	       "\t\t\t\t\t\tout[(i64)r * kHidden + col] =\n"
	       "\t\t\t\t\t\t    w * (acc[mi][ni][half * 2 + q] + (bd ? bd[col] : 0.0f));\n"
	       "\t\t\t\t}\n\t\t}\n}\n\n");
}

/* CUDA-core GEMMs (f32 weights: exact f32 products). */
static void emit_gemm_simt(struct gen *g)
{
	const struct moe_desc *d = g->d;
	struct ebuf *b = &g->b;
	raw(b, "/* ---- grouped GEMM, f32 weights, on CUDA cores ----\n"
	       " * 64 x 64 tiles, K steps of 32 double-buffered through registers into\n"
	       " * transposed shared tiles; each thread owns 4 rows x 8 packed columns (GLU:\n"
	       " * 4 gate columns and the 4 up columns of the same outputs). */\n"
	       "constexpr int kLdt = kBM + 4; /* [k][row] stride */\n\n"
	       "struct __align__(16) gemm_smem {\n"
	       "\tfloat a[2][kBK * kLdt];\n\tfloat b[2][kBK * kLdt];\n};\n\n"
	       "/* the thread's two groups of 4 packed columns */\n"
	       "template <bool GLU> __device__ __forceinline__ int col_a()\n{\n"
	       "\tconst int tn = threadIdx.x & 7;\n"
	       "\treturn GLU ? 16 * (tn >> 1) + 4 * (tn & 1) : 8 * tn;\n}\n\n"
	       "template <bool GLU> __device__ __forceinline__ int col_b()\n{\n"
	       "\treturn col_a<GLU>() + (GLU ? 8 : 4);\n}\n\n"
	       "__device__ __forceinline__ void store_t(float *S, const float (&v)[4][4])\n{\n"
	       "#pragma unroll\n"
	       "\tfor (int i = 0; i < 4; i++)\n"
	       "#pragma unroll\n"
	       "\t\tfor (int j = 0; j < 4; j++)\n"
	       "\t\t\tS[((threadIdx.x & 7) * 4 + j) * kLdt + (threadIdx.x >> 3) + 16 * i] = "
	       "v[i][j];\n}\n\n"
	       "/* 64 rows of a row-major f32 matrix (row stride ld), all valid below n */\n"
	       "__device__ __forceinline__ void fetch_rows(float (&v)[4][4], const float *m, int "
	       "ld, int n, int k0)\n{\n"
	       "\tconst int k = k0 + (threadIdx.x & 7) * 4;\n"
	       "#pragma unroll\n"
	       "\tfor (int i = 0; i < 4; i++) {\n"
	       "\t\tconst int r = (threadIdx.x >> 3) + 16 * i;\n"
	       "\t\tif (r < n) {\n"
	       "\t\t\tconst float4 q = *(const float4 *)(m + (i64)r * ld + k);\n"
	       "\t\t\tv[i][0] = q.x, v[i][1] = q.y, v[i][2] = q.z, v[i][3] = q.w;\n"
	       "\t\t} else {\n"
	       "\t\t\tv[i][0] = v[i][1] = v[i][2] = v[i][3] = 0.0f;\n\t\t}\n\t}\n}\n\n"
	       "__device__ __forceinline__ void fetch_x(float (&v)[4][4], const act_t *x, const "
	       "i64 (&tok)[4],\n"
	       "\t\t\t\t\tconst float (&sc)[4], int k0)\n{\n"
	       "\tconst int k = k0 + (threadIdx.x & 7) * 4;\n"
	       "#pragma unroll\n"
	       "\tfor (int i = 0; i < 4; i++) {\n");
	if (d->hidden % 4 == 0)
		raw(b, "\t\tif (tok[i] >= 0 && k < kHidden)\n"
		       "\t\t\tld_act4(x + tok[i] * kHidden + k, v[i]);\n"
		       "\t\telse\n"
		       "\t\t\tv[i][0] = v[i][1] = v[i][2] = v[i][3] = 0.0f;\n");
	else
		raw(b, "\t\tfor (int j = 0; j < 4; j++)\n"
		       "\t\t\tv[i][j] = tok[i] >= 0 && k + j < kHidden ? ld_act(x + tok[i] * "
		       "kHidden + k + j) : 0.0f;\n");
	raw(b, "#pragma unroll\n"
	       "\t\tfor (int j = 0; j < 4; j++)\n\t\t\tv[i][j] *= sc[i];\n\t}\n}\n\n"
	       "template <bool GLU>\n"
	       "__device__ __forceinline__ void fma_step(const float *As, const float *Bs, float "
	       "(&acc)[4][8])\n{\n"
	       "\tconst int tm = threadIdx.x >> 3, ca = col_a<GLU>(), cb = col_b<GLU>();\n"
	       "#pragma unroll 8\n"
	       "\tfor (int k = 0; k < kBK; k++) {\n"
	       "\t\tconst float4 av = *(const float4 *)(As + k * kLdt + tm * 4);\n"
	       "\t\tconst float4 b0 = *(const float4 *)(Bs + k * kLdt + ca);\n"
	       "\t\tconst float4 b1 = *(const float4 *)(Bs + k * kLdt + cb);\n"
	       "\t\tconst float ar[4] = {av.x, av.y, av.z, av.w};\n"
	       "\t\tconst float br[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};\n"
	       "#pragma unroll\n"
	       "\t\tfor (int i = 0; i < 4; i++)\n"
	       "#pragma unroll\n"
	       "\t\t\tfor (int j = 0; j < 8; j++)\n"
	       "\t\t\t\tacc[i][j] = fmaf(ar[i], br[j], acc[i][j]);\n\t}\n}\n\n"
	       "template <class F>\n"
	       "__device__ __forceinline__ void up_loop(gemm_smem &sm, const act_t *x, const i64 "
	       "(&tok)[4],\n"
	       "\t\t\t\t\tconst float (&sc)[4], const w_t *w, float (&acc)[4][8])\n{\n"
	       "\tconstexpr int KT = F::up_k / kBK;\n"
	       "\tfloat va[4][4], vb[4][4];\n"
	       "\tfetch_x(va, x, tok, sc, 0);\n"
	       "\tfetch_rows(vb, w, F::up_k, kBN, 0);\n"
	       "\tstore_t(sm.a[0], va);\n\tstore_t(sm.b[0], vb);\n"
	       "\t__syncthreads();\n"
	       "\tfor (int kt = 0; kt < KT; kt++) {\n"
	       "\t\tconst int cur = kt & 1;\n"
	       "\t\tif (kt + 1 < KT) {\n"
	       "\t\t\tfetch_x(va, x, tok, sc, (kt + 1) * kBK);\n"
	       "\t\t\tfetch_rows(vb, w, F::up_k, kBN, (kt + 1) * kBK);\n\t\t}\n"
	       "\t\tfma_step<F::glu>(sm.a[cur], sm.b[cur], acc);\n"
	       "\t\tif (kt + 1 < KT) {\n"
	       "\t\t\tstore_t(sm.a[cur ^ 1], va);\n\t\t\tstore_t(sm.b[cur ^ 1], vb);\n\t\t}\n"
	       "\t\t__syncthreads();\n\t}\n}\n\n"
	       "template <class F>\n"
	       "__device__ __forceinline__ void down_loop(gemm_smem &sm, const w_t *h, int n, "
	       "const w_t *w,\n"
	       "\t\t\t\t\t  float (&acc)[4][8])\n{\n"
	       "\tconstexpr int KT = F::ld_h / kBK;\n"
	       "\tfloat va[4][4], vb[4][4];\n"
	       "\tfetch_rows(va, h, F::ld_h, n, 0);\n"
	       "\tfetch_rows(vb, w, F::ld_h, kBN, 0);\n"
	       "\tstore_t(sm.a[0], va);\n\tstore_t(sm.b[0], vb);\n"
	       "\t__syncthreads();\n"
	       "\tfor (int kt = 0; kt < KT; kt++) {\n"
	       "\t\tconst int cur = kt & 1;\n"
	       "\t\tif (kt + 1 < KT) {\n"
	       "\t\t\tfetch_rows(va, h, F::ld_h, n, (kt + 1) * kBK);\n"
	       "\t\t\tfetch_rows(vb, w, F::ld_h, kBN, (kt + 1) * kBK);\n\t\t}\n"
	       "\t\tfma_step<false>(sm.a[cur], sm.b[cur], acc);\n"
	       "\t\tif (kt + 1 < KT) {\n"
	       "\t\t\tstore_t(sm.a[cur ^ 1], va);\n\t\t\tstore_t(sm.b[cur ^ 1], vb);\n\t\t}\n"
	       "\t\t__syncthreads();\n\t}\n}\n\n"
	       "template <class F>\n"
	       "__device__ __forceinline__ void up_store(const float (&acc)[4][8], w_t *h, int n, "
	       "const float *bg,\n"
	       "\t\t\t\t\t const float *bu)\n{\n"
	       "\tconst int tm = threadIdx.x >> 3, tn = threadIdx.x & 7;\n"
	       "#pragma unroll\n"
	       "\tfor (int i = 0; i < 4; i++) {\n"
	       "\t\tconst int r = tm * 4 + i;\n"
	       "\t\tif (r >= n)\n\t\t\tcontinue;\n"
	       "\t\tw_t *hr = h + (i64)r * F::ld_h;\n"
	       "\t\tif constexpr (F::glu) {\n"
	       "#pragma unroll\n"
	       "\t\t\tfor (int j = 0; j < 4; j++) {\n"
	       "\t\t\t\tconst int col = blockIdx.y * (kBN / 2) + 8 * (tn >> 1) + 4 * (tn & 1) "
	       "+ j;\n"
	       "\t\t\t\tfloat gv = acc[i][j], uv = acc[i][4 + j];\n"
	       "\t\t\t\tif (bg)\n\t\t\t\t\tgv += bg[col];\n"
	       "\t\t\t\tif (bu)\n\t\t\t\t\tuv += bu[col];\n"
	       "\t\t\t\thr[col] = F::glu_out(gv, uv);\n\t\t\t}\n"
	       "\t\t} else {\n"
	       "#pragma unroll\n"
	       "\t\t\tfor (int j = 0; j < 8; j++) {\n"
	       "\t\t\t\tconst int col = blockIdx.y * kBN + 8 * tn + j;\n"
	       "\t\t\t\thr[col] = F::act(acc[i][j] + (bu ? bu[col] : 0.0f));\n"
	       "\t\t\t}\n\t\t}\n\t}\n}\n\n"
	       "__device__ __forceinline__ void down_store(const float (&acc)[4][8], float *out, "
	       "int n,\n"
	       "\t\t\t\t\t   const float *scale, const float *bd)\n{\n"
	       "\tconst int tm = threadIdx.x >> 3, tn = threadIdx.x & 7;\n"
	       "#pragma unroll\n"
	       "\tfor (int i = 0; i < 4; i++) {\n"
	       "\t\tconst int r = tm * 4 + i;\n"
	       "\t\tif (r >= n)\n\t\t\tcontinue;\n"
	       "\t\tconst float w = scale ? scale[r] : 1.0f;\n"
	       "#pragma unroll\n"
	       "\t\tfor (int j = 0; j < 8; j++) {\n"
	       "\t\t\tconst int col = blockIdx.y * kBN + 8 * tn + j;\n"
	       "\t\t\tif (col < kHidden)\n"
	       "\t\t\t\tout[(i64)r * kHidden + col] = w * (acc[i][j] + (bd ? bd[col] : "
	       "0.0f));\n"
	       "\t\t}\n\t}\n}\n\n");
}

static void emit_gemm_kernels(struct gen *g)
{
	const struct moe_desc *d = g->d;
	struct ebuf *b = &g->b;
	const char *acc = g->mma ? "float acc[2][4][4]" : "float acc[4][8]";
	const char *zero = g->mma ? "\tfor (int i = 0; i < 2; i++)\n"
				    "\t\tfor (int j = 0; j < 4; j++)\n"
				    "\t\t\tfor (int q = 0; q < 4; q++)\n"
				    "\t\t\t\tacc[i][j][q] = 0.0f;\n"
				  : "\tfor (int i = 0; i < 4; i++)\n"
				    "\t\tfor (int j = 0; j < 8; j++)\n"
				    "\t\t\tacc[i][j] = 0.0f;\n";
	raw(b, "/* ---- the expert kernels: grid (row tiles, column tiles), 128 threads ---- "
	       "*/\n");
	put(b,
	    "/* h[rows of expert e] = act(x[tokens] . gate_e^T) * (x[tokens] . up_e^T)%s */\n"
	    "extern \"C\" __global__ void __launch_bounds__(128) moe_up(const moe_args a)\n{\n"
	    "\ttile tl;\n\tif (!find_tile(a, tl))\n\t\treturn;\n"
	    "\t__shared__ gemm_smem sm;\n"
	    "\ti64 tok[4];\n\tfloat sc[4];\n"
	    "\tfor (int i = 0; i < 4; i++) {\n"
	    "\t\tconst int r = (threadIdx.x >> 3) + 16 * i;\n"
	    "\t\ttok[i] = r < tl.n ? a.rows[tl.row0 + r] : -1;\n"
	    "\t\tsc[i] = %s;\n\t}\n"
	    "\t%s;\n%s"
	    "\tconst i64 wrow = (i64)tl.e * routed_ffn::up_rows + blockIdx.y * kBN;\n"
	    "\tconst w_t *w = (const w_t *)a.up + wrow * routed_ffn::up_k;\n"
	    "\tup_loop<routed_ffn>(sm, (const act_t *)a.x, tok, sc, w, acc);\n",
	    g->input_scaled ? ", the input scaled by the routing weight" : "",
	    g->input_scaled ? "r < tl.n ? a.row_w[tl.row0 + r] : 0.0f" : "1.0f", acc, zero);
	if (d->expert_bias)
		put(b,
		    "\tup_store<routed_ffn>(acc, (w_t *)a.h + tl.row0 * routed_ffn::ld_h, tl.n,\n"
		    "\t\t\t     %s, a.bu + (i64)tl.e * routed_ffn::ld_h);\n}\n\n",
		    d->kind == MOE_KIND_GLU ? "a.bg + (i64)tl.e * routed_ffn::ld_h" : "nullptr");
	else
		raw(b, "\tup_store<routed_ffn>(acc, (w_t *)a.h + tl.row0 * routed_ffn::ld_h, tl.n, "
		       "nullptr, nullptr);\n}\n\n");
	put(b,
	    "/* o[rows of expert e] = %s(h . down_e^T%s) */\n"
	    "extern \"C\" __global__ void __launch_bounds__(128) moe_down(const moe_args a)\n{\n"
	    "\ttile tl;\n\tif (!find_tile(a, tl))\n\t\treturn;\n"
	    "\t__shared__ gemm_smem sm;\n"
	    "\t%s;\n%s"
	    "\tconst i64 wrow = (i64)tl.e * routed_ffn::down_rows + blockIdx.y * kBN;\n"
	    "\tconst w_t *w = (const w_t *)a.down + wrow * routed_ffn::ld_h;\n"
	    "\tdown_loop<routed_ffn>(sm, (const w_t *)a.h + tl.row0 * routed_ffn::ld_h, tl.n, w, "
	    "acc);\n"
	    "\tdown_store(acc, a.o + tl.row0 * kHidden, tl.n, %s, %s);\n}\n\n",
	    g->input_scaled ? "" : "routing weight * ", d->expert_bias ? " + bias" : "", acc, zero,
	    g->input_scaled ? "nullptr" : "a.row_w + tl.row0",
	    d->expert_bias ? "a.bd + (i64)tl.e * routed_ffn::down_rows" : "nullptr");
	if (!g->shared)
		return;
	int gated = d->shared_gate == MOE_SHARED_GATE_SIGMOID;
	put(b,
	    "/* the shared FFN over every token: grid (token tiles, column tiles) */\n"
	    "extern \"C\" __global__ void __launch_bounds__(128) moe_shared_up(const moe_args "
	    "a)\n{\n"
	    "\tconst i64 m0 = blockIdx.x * (i64)kBM;\n"
	    "\tconst int n = (int)min((i64)kBM, a.T - m0);\n"
	    "\t__shared__ gemm_smem sm;\n"
	    "\ti64 tok[4];\n\tconst float sc[4] = {1.0f, 1.0f, 1.0f, 1.0f};\n"
	    "\tfor (int i = 0; i < 4; i++) {\n"
	    "\t\tconst int r = (threadIdx.x >> 3) + 16 * i;\n"
	    "\t\ttok[i] = r < n ? m0 + r : -1;\n\t}\n"
	    "\t%s;\n%s"
	    "\tconst w_t *w = (const w_t *)a.s_up + (i64)blockIdx.y * kBN * shared_ffn::up_k;\n"
	    "\tup_loop<shared_ffn>(sm, (const act_t *)a.x, tok, sc, w, acc);\n"
	    "\tup_store<shared_ffn>(acc, (w_t *)a.hs + m0 * shared_ffn::ld_h, n, nullptr, "
	    "nullptr);\n}\n\n"
	    "/* os = %sshared(x) */\n"
	    "extern \"C\" __global__ void __launch_bounds__(128) moe_shared_down(const moe_args "
	    "a)\n{\n"
	    "\tconst i64 m0 = blockIdx.x * (i64)kBM;\n"
	    "\tconst int n = (int)min((i64)kBM, a.T - m0);\n"
	    "\t__shared__ gemm_smem sm;\n"
	    "\t%s;\n%s"
	    "\tconst w_t *w = (const w_t *)a.s_down + (i64)blockIdx.y * kBN * shared_ffn::ld_h;\n"
	    "\tdown_loop<shared_ffn>(sm, (const w_t *)a.hs + m0 * shared_ffn::ld_h, n, w, acc);\n"
	    "\tdown_store(acc, a.os + m0 * kHidden, n, %s, nullptr);\n}\n\n",
	    acc, zero, gated ? "sigmoid gate * " : "", acc, zero,
	    gated ? "a.sgate + m0" : "nullptr");
}

static void emit_combine(struct gen *g)
{
	const struct moe_desc *d = g->d;
	struct ebuf *b = &g->b;
	int pass = g->cap && d->overflow == MOE_OVERFLOW_PASSTHROUGH;
	raw(b, "/* ---- combine: y[t] = the token's rows in rank order");
	if (pass)
		raw(b, ", w * x[t] for a dropped slot");
	if (g->shared)
		raw(b, ", then the shared FFN");
	if (d->output_bias)
		raw(b, ", then the output bias");
	raw(b, " ----\n * grid (tokens, column blocks of 256) */\n"
	       "extern \"C\" __global__ void __launch_bounds__(256) moe_combine(const moe_args "
	       "a)\n{\n"
	       "\tconst i64 t = blockIdx.x;\n"
	       "\tconst int col = blockIdx.y * 256 + threadIdx.x;\n"
	       "\tif (col >= kHidden)\n\t\treturn;\n"
	       "\tfloat acc = 0.0f;\n"
	       "\tfor (int j = 0; j < kRoute; j++) {\n"
	       "\t\tconst int r = a.slot_row[t * kRoute + j];\n"
	       "\t\tif (r >= 0)\n"
	       "\t\t\tacc += a.o[(i64)r * kHidden + col];\n");
	if (pass)
		raw(b,
		    "\t\telse\n"
		    "\t\t\tacc += a.wts[t * kRoute + j] * ld_act((const act_t *)a.x + t * kHidden "
		    "+ col);\n");
	raw(b, "\t}\n");
	if (g->shared)
		raw(b, "\tacc += a.os[t * kHidden + col];\n");
	if (d->output_bias)
		raw(b, "\tacc += a.output_bias[col];\n");
	raw(b, "\tst_act((act_t *)a.y + t * kHidden + col, acc);\n}\n\n");
}

static void emit_pack(struct gen *g)
{
	raw(&g->b,
	    "/* ---- load: canonical f32 [rows, cols] -> packed [dst_rows, dst_cols] ----\n"
	    " * glu: a = gate, b = up, interleaved by 8 rows; zero past rows and cols. */\n"
	    "struct moe_pack_args {\n"
	    "\tconst float *a, *b;\n\tvoid *dst;\n"
	    "\ti64 rows, cols, dst_rows, dst_cols, glu;\n};\n\n"
	    "extern \"C\" __global__ void __launch_bounds__(256) moe_pack(const moe_pack_args "
	    "p)\n{\n"
	    "\tconst i64 n = p.dst_rows * p.dst_cols;\n"
	    "\tfor (i64 i = blockIdx.x * 256LL + threadIdx.x; i < n; i += (i64)gridDim.x * 256) "
	    "{\n"
	    "\t\tconst i64 r = i / p.dst_cols, k = i % p.dst_cols;\n"
	    "\t\tconst float *src = p.a;\n"
	    "\t\ti64 sr = r;\n"
	    "\t\tif (p.glu) {\n"
	    "\t\t\tsr = (r >> 4) * 8 + (r & 7);\n"
	    "\t\t\tsrc = (r & 15) < 8 ? p.a : p.b;\n\t\t}\n"
	    "\t\tconst float v = sr < p.rows && k < p.cols ? src[sr * p.cols + k] : 0.0f;\n"
	    "\t\t((w_t *)p.dst)[i] = to_w(v);\n\t}\n}\n");
}

int moe_cuda_emit_source(const struct moe_plan *p, char **out, size_t *len, char *err, size_t cap)
{
	const struct moe_desc *d = p->desc;
	struct gen g = {.d = d};
	*out = NULL;
	*len = 0;
	if (p->target != MOE_TARGET_CUDA) {
		snprintf(err, cap, "the plan is not for target cuda");
		return -1;
	}
	g.W = moe_desc_route_width(d);
	g.mma = d->weight_dtype != MOE_DTYPE_F32;
	g.wname = d->weight_dtype == MOE_DTYPE_F16 ? "f16" : "bf16";
	g.cap = moe_cuda_has_capacity(d);
	g.after_drop = g.cap && d->capacity_norm_after_drop;
	g.shared = moe_cuda_has_shared(d);
	g.dense = d->mode == MOE_MODE_DENSE;
	g.input_scaled = d->apply_to == MOE_APPLY_INPUT;
	moe_cuda_geom_init(&g.rg, d->hidden, d->intermediate, d->kind == MOE_KIND_GLU);
	if (g.shared)
		moe_cuda_geom_init(&g.sg, d->hidden, moe_desc_shared_width(d),
				   d->shared_kind == MOE_KIND_GLU);

	emit_header(&g);
	emit_constants(&g);
	emit_types(&g);
	emit_args(&g);
	emit_ffn(&g, "routed_ffn", &g.rg, d->act, "the routed experts");
	if (g.shared)
		emit_ffn(&g, "shared_ffn", &g.sg, d->shared_act,
			 "the shared experts, fused into one FFN");
	emit_reductions(&g);
	emit_router(&g);
	if (g.cap)
		emit_capacity(&g);
	emit_group(&g);
	if (g.mma)
		emit_gemm_mma(&g);
	else
		emit_gemm_simt(&g);
	emit_gemm_kernels(&g);
	emit_combine(&g);
	emit_pack(&g);
	if (g.b.oom) {
		free(g.b.p);
		snprintf(err, cap, "out of memory generating CUDA C");
		return -1;
	}
	*out = g.b.p;
	*len = g.b.len;
	return 0;
}

/* Arch lists and images ------------------------------------------------------ */

int moe_cuda_parse_archs(const char *list, char *storage, size_t storage_cap, const char **archs,
			 int max, char *err, size_t cap)
{
	if (!list)
		list = MOE_CUDA_DEFAULT_ARCHS;
	if (strlen(list) + 1 > storage_cap) {
		snprintf(err, cap, "--arch list too long");
		return -1;
	}
	memcpy(storage, list, strlen(list) + 1);
	int n = 0;
	for (char *tok = storage, *next; tok; tok = next) {
		next = strchr(tok, ',');
		if (next)
			*next++ = 0;
		const char *p = tok;
		int ok = !strncmp(p, "sm_", 3) && p[3] && strlen(p) <= 8;
		for (p += 3; ok && *p; p++)
			ok = (*p >= '0' && *p <= '9') || (p[1] == 0 && *p == 'a' && p > tok + 4);
		if (!ok) {
			snprintf(err, cap,
				 "unknown CUDA arch '%s' (expected sm_XY, e.g. sm_80,sm_90)", tok);
			return -1;
		}
		for (int i = 0; i < n; i++)
			if (!strcmp(archs[i], tok)) {
				snprintf(err, cap, "CUDA arch '%s' given twice", tok);
				return -1;
			}
		if (n == max) {
			snprintf(err, cap, "too many CUDA archs (at most %d)", max);
			return -1;
		}
		archs[n++] = tok;
	}
	return n;
}

/* bytes as a C array body, 16 per line */
static void emit_bytes(struct ebuf *b, const unsigned char *p, size_t n)
{
	char line[16 * 6 + 4];
	for (size_t i = 0; i < n; i += 16) {
		size_t m = n - i < 16 ? n - i : 16, o = 0;
		line[o++] = '\t';
		for (size_t j = 0; j < m; j++)
			o += (size_t)snprintf(line + o, sizeof line - o, "%u,", p[i + j]);
		line[o++] = '\n';
		line[o] = 0;
		raw(b, line);
	}
	if (!n)
		raw(b, "\t0\n");
}

struct image {
	char arch[32];
	unsigned char *data;
	size_t size;
};

/* The images file: plain C, no includes, defines moe_cuda_gen_model. */
static int emit_images(const struct moe_plan *p, const char *src_name, const struct image *img,
		       int n_img, char **out, size_t *len, char *err, size_t cap)
{
	const struct moe_desc *d = p->desc;
	struct ebuf b = {0};
	char hash[65];
	moe_desc_hash(d, hash);
	put(&b,
	    "/* The CUDA images of the MoE model '%s' (spec hash %s),\n"
	    " * generated by moegen from %s: a cubin per arch and PTX. Compiled\n"
	    " * into model.so; runtime/cuda_rt.c loads the best image for the device. */\n"
	    "#ifndef MOE_CUDA_RT_H\n"
	    "struct moe_cuda_image {\n\tconst char *arch;\n\tconst unsigned char *data;\n"
	    "\tunsigned long size;\n};\n"
	    "struct moe_cuda_gen {\n\tunsigned abi;\n\tunsigned desc_bytes;\n\tconst void *desc;\n"
	    "\tconst char *spec_hash;\n\tconst char *source_name;\n\tunsigned n_images;\n"
	    "\tconst struct moe_cuda_image *images;\n};\n"
	    "#endif\n\n",
	    d->name, hash, src_name);
	put(&b, "static const unsigned char desc_bytes[%zu] __attribute__((aligned(16))) = {\n",
	    sizeof *d);
	emit_bytes(&b, (const unsigned char *)d, sizeof *d);
	raw(&b, "};\n\n");
	for (int i = 0; i < n_img; i++) {
		put(&b,
		    "static const unsigned char image_%d[%zu] __attribute__((aligned(16))) = "
		    "{ /* %s */\n",
		    i, img[i].size ? img[i].size : 1, img[i].arch);
		emit_bytes(&b, img[i].data, img[i].size);
		raw(&b, "};\n\n");
	}
	put(&b, "static const struct moe_cuda_image images[%d] = {\n", n_img);
	for (int i = 0; i < n_img; i++)
		put(&b, "\t{\"%s\", image_%d, %zuul},\n", img[i].arch, i, img[i].size);
	raw(&b, "};\n\n");
	put(&b,
	    "__attribute__((visibility(\"hidden\"))) const struct moe_cuda_gen moe_cuda_gen_model "
	    "= {\n"
	    "\t%d, %zu, desc_bytes, \"%s\", \"%s\", %d, images\n};\n",
	    MOE_CUDA_ABI, sizeof *d, hash, src_name, n_img);
	if (b.oom) {
		free(b.p);
		snprintf(err, cap, "out of memory writing the CUDA images");
		return -1;
	}
	*out = b.p;
	*len = b.len;
	return 0;
}

int moe_cuda_generate(const struct moe_plan *p, const char *const *archs, int n_archs,
		      enum moe_cuda_emit kind, char **out, size_t *len, char *err, size_t cap)
{
	*out = NULL;
	*len = 0;
	char *src = NULL, name[MOE_NAME_MAX + 8];
	size_t src_len = 0;
	moe_cuda_source_name(p->desc, name, sizeof name);
	if (moe_cuda_emit_source(p, &src, &src_len, err, cap) != 0)
		return -1;
	if (kind == MOE_CUDA_EMIT_CU) {
		*out = src;
		*len = src_len;
		return 0;
	}
	if (n_archs < 1 || n_archs > MOE_CUDA_MAX_ARCHS) {
		snprintf(err, cap, "no CUDA arch to compile for");
		free(src);
		return -1;
	}
	struct image img[MOE_CUDA_MAX_ARCHS + 1];
	int n_img = 0, rc = -1;
	memset(img, 0, sizeof img);
	for (int i = 0; i < n_archs; i++) {
		struct moe_nvrtc_out o;
		int first = i == 0;
		int want_cubin = kind == MOE_CUDA_EMIT_IMAGES;
		if (moe_nvrtc_compile(src, name, archs[i], want_cubin, first, &o, err, cap) != 0)
			goto done;
		if (kind == MOE_CUDA_EMIT_PTX) {
			*out = o.ptx;
			*len = o.ptx_size - 1;
			o.ptx = NULL;
			moe_nvrtc_out_free(&o);
			rc = 0;
			goto done;
		}
		snprintf(img[n_img].arch, sizeof img[n_img].arch, "%s", archs[i]);
		img[n_img].data = o.cubin;
		img[n_img++].size = o.cubin_size;
		o.cubin = NULL;
		if (first) {
			/* the PTX of the lowest arch, for GPUs newer than every cubin */
			snprintf(img[n_img].arch, sizeof img[n_img].arch, "compute_%s",
				 archs[i] + 3);
			img[n_img].data = (unsigned char *)o.ptx;
			img[n_img++].size = o.ptx_size;
			o.ptx = NULL;
		}
		moe_nvrtc_out_free(&o);
	}
	rc = emit_images(p, name, img, n_img, out, len, err, cap);
done:
	for (int i = 0; i < n_img; i++)
		free(img[i].data);
	free(src);
	return rc;
}

struct capture_buf {
	char *buf;
	size_t cap;
};

static void capture_first(void *ctx, const char *line)
{
	struct capture_buf *m = ctx;
	static const char pre[] = "moegen: error: ";
	if (!m->buf || !m->cap || m->buf[0])
		return;
	if (!strncmp(line, pre, sizeof pre - 1))
		line += sizeof pre - 1;
	snprintf(m->buf, m->cap, "%s", line);
}

int moe_compile_cuda(const struct moe_desc *d, const char *const *archs, int n_archs,
		     enum moe_cuda_emit kind, const char *out, char *err, size_t cap)
{
	struct moe_plan plan;
	struct capture_buf cb = {err, cap};
	struct moe_diag diag = {.sink = capture_first, .ctx = &cb};
	if (cap)
		err[0] = 0;
	if (moe_cuda_plan_build(d, &plan, &diag) != 0) {
		if (cap && !err[0])
			snprintf(err, cap, "the spec is not supported for target cuda");
		return MOE_EXIT_BACKEND;
	}
	char *buf = NULL;
	size_t len = 0;
	if (moe_cuda_generate(&plan, archs, n_archs, kind, &buf, &len, err, cap) != 0)
		return MOE_EXIT_BACKEND;
	struct moe_output o;
	int bad = moe_output_open(&o, out, NULL, 0, 0666, err, cap) != 0 ||
		  moe_output_write(&o, buf, len, err, cap) != 0 ||
		  moe_output_commit(&o, err, cap) != 0;
	moe_output_abort(&o);
	free(buf);
	return bad ? MOE_EXIT_IO : 0;
}
