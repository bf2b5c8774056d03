/* plan.c: the backend-neutral kernel plan: which ops run in which order, the
 * workspace each needs per token and the packed-weight geometry of the FFNs.
 * It is also where a target refuses what it does not generate. */
#include "cuda.h"

#include <string.h>

#define NAME_(v, s) s,
const char *const moe_op_names[] = {MOE_OPS(NAME_)};
const char *const moe_target_names[] = {MOE_TARGETS(NAME_)};
const char *const moe_emit_names[] = {MOE_EMITS(NAME_)};
static const char *const buf_names[] = {MOE_BUFS(NAME_)};
#undef NAME_

_Static_assert(sizeof moe_op_names / sizeof *moe_op_names == MOE_OP_COUNT, "op table");
_Static_assert(sizeof buf_names / sizeof *buf_names == MOE_BUF_COUNT, "buffer table");

/* What the CPU backend generates. Anything else is an error naming the
 * feature, so an unsupported spec never silently runs some other code. */
static int check_cpu(const struct moe_desc *d, struct moe_diag *diag)
{
	int bad = 0;
	int research = moe_plan_research(d, diag);
	if (research == 0)
		research = moe_plan_ecsoft(d, diag);
	if (research == 0)
		research = moe_plan_peer(d, diag);
	if (research == 0)
		research = moe_plan_soft(d, diag);
	if (research < 0) {
		bad = 1;
	} else if (!research && d->mode != MOE_MODE_TOKEN_CHOICE && d->mode != MOE_MODE_DENSE) {
		moe_diag_error(diag, "router.mode %s is not generated for target cpu yet",
			       moe_mode_names[d->mode]);
		bad = 1;
	}
	if (d->kind == MOE_KIND_SINGLE_NEURON && d->mode != MOE_MODE_PRODUCT_KEY) {
		moe_diag_error(diag,
			       "experts.kind single_neuron is not generated for target cpu yet");
		bad = 1;
	}
	if (d->act == MOE_ACT_SWIGLU_OAI && d->kind != MOE_KIND_GLU) {
		moe_diag_error(diag, "experts.activation swiglu_oai needs glu experts");
		bad = 1;
	}
	if (d->shared_count && d->shared_act == MOE_ACT_SWIGLU_OAI &&
	    d->shared_kind != MOE_KIND_GLU) {
		moe_diag_error(diag, "shared_experts.activation swiglu_oai needs glu experts");
		bad = 1;
	}
	if (d->shared_count && d->shared_kind == MOE_KIND_SINGLE_NEURON) {
		moe_diag_error(diag, "shared_experts.kind single_neuron is not generated for "
				     "target cpu yet");
		bad = 1;
	}
	if (d->capacity != MOE_CAPACITY_NONE && d->capacity_norm_after_drop) {
		moe_diag_error(diag, "router.capacity.normalize_after_drop is not generated for "
				     "target cpu yet");
		bad = 1;
	}
	if (d->mode == MOE_MODE_DENSE && d->capacity != MOE_CAPACITY_NONE) {
		moe_diag_error(diag, "router.capacity with mode dense is not generated for target "
				     "cpu yet");
		bad = 1;
	}
	int tc = d->mode == MOE_MODE_TOKEN_CHOICE;
	if (!bad && (d->hidden == 0 || d->n_experts == 0 || d->intermediate == 0 ||
		     (tc && (d->top_k == 0 || d->top_k > d->n_experts)))) {
		moe_diag_error(diag,
			       "invalid model description (hidden %u, experts %u, "
			       "intermediate %u, top_k %u)",
			       d->hidden, d->n_experts, d->intermediate, d->top_k);
		bad = 1;
	}
	if (!bad && tc && d->n_groups > 1 &&
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

static void add(struct moe_plan *p, enum moe_op op, uint32_t in, uint32_t out)
{
	MOE_ASSERT(p->n_ops < sizeof p->ops / sizeof *p->ops);
	p->ops[p->n_ops++] = (struct moe_plan_op){op, in, out};
}

int moe_plan_build(const struct moe_desc *d, enum moe_target t, struct moe_plan *p,
		   struct moe_diag *diag)
{
	memset(p, 0, sizeof *p);
	p->desc = d;
	p->target = t;
	if (t == MOE_TARGET_CUDA)
		return moe_cuda_plan_build(d, p, diag);
	if (check_cpu(d, diag) != 0)
		return -1;
	p->route_width = moe_desc_route_width(d);
	moe_geom_init(&p->routed, d->hidden, d->intermediate, d->kind == MOE_KIND_GLU);
	uint32_t is = moe_desc_shared_width(d);
	if (is)
		moe_geom_init(&p->shared, d->hidden, is, d->shared_kind == MOE_KIND_GLU);

	const uint32_t io = MOE_BUF_COUNT;
	add(p, MOE_OP_ROUTE, io, MOE_BUF_WEIGHTS);
	add(p, MOE_OP_GROUP, MOE_BUF_WEIGHTS, MOE_BUF_ROWS);
	add(p, MOE_OP_EXPERT_UP, MOE_BUF_ROWS, MOE_BUF_H);
	add(p, MOE_OP_EXPERT_DOWN, MOE_BUF_H, io);
	if (is) {
		add(p, MOE_OP_SHARED_UP, io, MOE_BUF_H_SHARED);
		add(p, MOE_OP_SHARED_DOWN, MOE_BUF_H_SHARED, io);
	}
	if (d->capacity != MOE_CAPACITY_NONE && d->overflow == MOE_OVERFLOW_PASSTHROUGH)
		add(p, MOE_OP_PASSTHROUGH, MOE_BUF_ROWS, io);

	uint64_t w = p->route_width;
	p->buf_per_token[MOE_BUF_LOGITS] = 4ull * d->n_experts;
	p->buf_per_token[MOE_BUF_IDS] = 4 * w;
	p->buf_per_token[MOE_BUF_WEIGHTS] = 4 * w;
	p->buf_per_token[MOE_BUF_SGATE] = d->shared_gate == MOE_SHARED_GATE_SIGMOID ? 4 : 0;
	p->buf_per_token[MOE_BUF_ROWS] = 4 * w;
	p->buf_per_token[MOE_BUF_ROW_W] = 4 * w;
	p->buf_per_token[MOE_BUF_H] = 4 * w * p->routed.ld_h;
	p->buf_per_token[MOE_BUF_H_SHARED] = is ? 4ull * p->shared.ld_h : 0;
	return 0;
}

static void dump_geom(FILE *out, const char *what, const struct moe_geom *g)
{
	fprintf(out,
		"ffn %s %s hidden %u width %u up_panels %u x %u cols ld_h %u down_panels %u"
		" (K %u)\n",
		what, g->glu ? "glu" : "mlp", g->hidden, g->width, g->up_panels, g->up_cols,
		g->ld_h, g->down_panels, g->width);
}

void moe_plan_dump(const struct moe_plan *p, FILE *out)
{
	const struct moe_desc *d = p->desc;
	fprintf(out, "plan %s target %s\n", d->name, moe_target_names[p->target]);
	fprintf(out, "tile mr %d nr %d router_block %d\n", MOE_MR, MOE_NR, MOE_RB);
	dump_geom(out, "routed", &p->routed);
	if (p->shared.width)
		dump_geom(out, "shared", &p->shared);
	for (int b = 0; b < MOE_BUF_COUNT; b++)
		if (p->buf_per_token[b])
			fprintf(out, "buffer %s %llu bytes/token\n", buf_names[b],
				(unsigned long long)p->buf_per_token[b]);
	for (uint32_t i = 0; i < p->n_ops; i++) {
		const struct moe_plan_op *o = &p->ops[i];
		fprintf(out, "op %u %s %s -> %s\n", i, moe_op_names[o->op],
			o->in == MOE_BUF_COUNT ? "io" : buf_names[o->in],
			o->out == MOE_BUF_COUNT ? "io" : buf_names[o->out]);
	}
}
