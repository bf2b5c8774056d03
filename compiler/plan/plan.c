/* plan.c: the backend-neutral kernel plan, built once for every target: the
 * op list of the spec's mode (from the mode table, modes.c, which also
 * refuses what the target does not generate), the workspace each op needs
 * per token, and the packed-weight geometry of the FFNs. */
#include "backend.h"

#include <string.h>

#define NAME_(v, s) s,
const char *const moe_target_names[] = {MOE_TARGETS(NAME_)};
const char *const moe_emit_names[] = {MOE_EMITS(NAME_)};
#undef NAME_

const struct moe_backend *const moe_backends[MOE_TARGET_COUNT] = {
    [MOE_TARGET_CPU] = &moe_backend_cpu,
    [MOE_TARGET_CUDA] = &moe_backend_cuda,
};

static void init_geoms(struct moe_plan *p)
{
	moe_geoms_init(p->desc, p->compute, &p->routed, &p->shared);
}

void moe_plan_set_compute(struct moe_plan *p, int bf16_dot, int int8_dot)
{
	p->compute = moe_desc_int8_compute(p->desc) && int8_dot   ? MOE_COMPUTE_INT8
		     : moe_desc_bf16_compute(p->desc) && bf16_dot ? MOE_COMPUTE_BF16
								  : MOE_COMPUTE_F32;
	init_geoms(p);
}

int moe_plan_build(const struct moe_desc *d, enum moe_target t, struct moe_plan *p,
		   struct moe_diag *diag)
{
	memset(p, 0, sizeof *p);
	p->desc = d;
	p->target = t;
	if (!moe_backends[t]->supports(d, diag))
		return -1;
	p->route_width = moe_desc_route_width(d);
	p->compute = moe_desc_bf16_compute(d) || moe_desc_int8_compute(d) ? MOE_COMPUTE_AUTO
									  : MOE_COMPUTE_F32;
	init_geoms(p);
	uint32_t is = moe_desc_shared_width(d);
	moe_mode_ops(d, p);

	/* the CPU keeps the FFN activations in packed panels; CUDA in its kernels */
	uint64_t ops = 0;
	for (uint32_t i = 0; i < p->n_ops; i++)
		ops |= MOE_OP_BIT(p->ops[i].op);
	int cpu = t == MOE_TARGET_CPU;
	moe_workspace(d, ops, cpu ? p->routed.ld_h : 0, cpu && is ? p->shared.ld_h : 0, p->bufs);
	return 0;
}

int moe_plan_has(const struct moe_plan *p, enum moe_op op)
{
	for (uint32_t i = 0; i < p->n_ops; i++)
		if (p->ops[i].op == op)
			return 1;
	return 0;
}

static void dump_geom(FILE *out, const char *what, const struct moe_geom *g)
{
	fprintf(out,
		"ffn %s %s hidden %u width %u up_panels %u x %u cols ld_h %u down_panels %u"
		" (K %u)%s\n",
		what, g->glu ? "glu" : "mlp", g->hidden, g->width, g->up_panels, g->up_cols,
		g->ld_h, g->down_panels, g->width, g->pairs ? " k_pairs" : "");
}

void moe_plan_dump(const struct moe_plan *p, FILE *out)
{
	const struct moe_desc *d = p->desc;
	fprintf(out, "plan %s target %s\n", d->name, moe_target_names[p->target]);
	fprintf(out, "tile mr %d nr %d router_block %d\n", MOE_MR, MOE_NR, MOE_RB);
	fprintf(out, "compute %s%s\n", moe_compute_names[p->compute],
		p->compute != MOE_COMPUTE_AUTO ? ""
		: moe_desc_int8_compute(d)
		    ? " (int8 where the target cpu has avx512vnni, avxvnni or avx2, else f32)"
		    : " (bf16 where the target cpu has avx512bf16)");
	dump_geom(out, "routed", &p->routed);
	if (p->shared.width)
		dump_geom(out, "shared", &p->shared);
	for (int b = 0; b < MOE_BUF_COUNT; b++) {
		const struct moe_buf_size *z = &p->bufs[b];
		if (!z->per_token && !z->fixed)
			continue;
		fprintf(out, "buffer %s", moe_buf_names[b]);
		if (z->per_token)
			fprintf(out, " %llu bytes/token", (unsigned long long)z->per_token);
		if (z->fixed)
			fprintf(out, "%s %llu bytes", z->per_token ? " +" : "",
				(unsigned long long)z->fixed);
		fputc('\n', out);
	}
	for (uint32_t i = 0; i < p->n_ops; i++) {
		const struct moe_plan_op *o = &p->ops[i];
		fprintf(out, "op %u %s (%s) %s -> %s\n", i, moe_op_names[o->op],
			moe_shape_names[moe_op_shapes[o->op]],
			o->in == MOE_BUF_COUNT ? "io" : moe_buf_names[o->in],
			o->out == MOE_BUF_COUNT ? "io" : moe_buf_names[o->out]);
	}
}
