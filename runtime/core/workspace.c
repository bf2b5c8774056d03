/* workspace.c: the workspace of a layer's ops, one layout for the plan that
 * prints it and the CPU runtime that allocates it. */
#include "moe_ops.h"

#include <string.h>

#define NAME_(v, s) s,
const char *const moe_buf_names[] = {MOE_BUFS(NAME_)};
#undef NAME_
_Static_assert(sizeof moe_buf_names / sizeof *moe_buf_names == MOE_BUF_COUNT, "buffer table");

void moe_workspace(const struct moe_desc *d, uint64_t ops, uint32_t ld_h, uint32_t ld_h_shared,
		   struct moe_buf_size b[MOE_BUF_COUNT])
{
	memset(b, 0, MOE_BUF_COUNT * sizeof *b);
#define HAS(op) ((ops & MOE_OP_BIT(MOE_OP_##op)) != 0)
	uint64_t E = d->n_experts, H = d->hidden, W = moe_desc_route_width(d);
	int routed = HAS(ROUTE) || HAS(ROUTE_X);
	if (HAS(JITTER))
		b[MOE_BUF_XJ].per_token = 4 * H;
	if (routed) {
		b[MOE_BUF_LOGITS].per_token = 4 * E;
		b[MOE_BUF_SGATE].per_token = 4;
		b[MOE_BUF_PRIO].per_token = 4;
	}
	if (HAS(ROUTE_X))
		b[MOE_BUF_PROB].per_token = 4 * E;
	if (HAS(PK_QUERY)) /* [T, heads * d] padded to the router's blocks of 8 */
		b[MOE_BUF_LOGITS].per_token = 4ull * ((d->pk_heads * d->pk_query_dim + 7) / 8 * 8);
	if (routed || HAS(PK_ROUTE)) {
		b[MOE_BUF_IDS].per_token = 4 * W;
		b[MOE_BUF_WEIGHTS].per_token = 4 * W;
	}
	if (HAS(GROUP)) {
		b[MOE_BUF_KEPT].per_token = W;
		b[MOE_BUF_COUNTS].fixed = 8 * E;
		b[MOE_BUF_OFFSETS].fixed = 8 * (E + 1);
		b[MOE_BUF_ROWS].per_token = 4 * W;
		b[MOE_BUF_ROW_W].per_token = 4 * W;
		b[MOE_BUF_H].per_token = 4 * W * ld_h;
	}
	if (HAS(COMBINE)) {
		b[MOE_BUF_SLOT_ROW].per_token = 8 * W;
		b[MOE_BUF_DROWS].per_token = 4 * W;
		b[MOE_BUF_ROWS_Y].per_token = 4 * W * H;
	}
	if (HAS(SHARED_UP)) {
		b[MOE_BUF_SROWS].per_token = 4;
		b[MOE_BUF_H_SHARED].per_token = 4ull * ld_h_shared;
	}
	if (HAS(SOFT_LOGITS)) {
		/* the S slots of each group are the routed FFN's rows: expert
		 * e's P slots of every group. With groups of G tokens a call of
		 * T tokens has at most T / G + 1 groups: per token 1 / G of a
		 * group's buffers (rounded up), and one group fixed */
		uint64_t S = E * d->soft_slots_per_expert, G = d->soft_group;
#define PER_GROUP(bytes) (G ? ((bytes) + G - 1) / G : 0)
#define AT_LEAST(v, n) ((v) = (v) > (n) ? (v) : (n))
		b[MOE_BUF_LOGITS].per_token = 4 * S;
		b[MOE_BUF_SOFT_XN].per_token = 4 * H;
		b[MOE_BUF_SOFT_C].per_token = 4 * S;
		b[MOE_BUF_SOFT_D].per_token = 4 * S + PER_GROUP(4 * S * MOE_SOFT_DT_PAD);
		b[MOE_BUF_SOFT_D].fixed = 4 * S * MOE_SOFT_DT_PAD;
		AT_LEAST(b[MOE_BUF_SOFT_XS].per_token, PER_GROUP(4 * S * H));
		b[MOE_BUF_SOFT_XS].fixed = 4 * S * H;
		AT_LEAST(b[MOE_BUF_SOFT_Y].per_token, PER_GROUP(4 * S * H));
		b[MOE_BUF_SOFT_Y].fixed = 4 * S * H;
		b[MOE_BUF_COUNTS].fixed = 8 * E;
		b[MOE_BUF_OFFSETS].fixed = 8 * (E + 1);
		AT_LEAST(b[MOE_BUF_ROWS].per_token, PER_GROUP(4 * S));
		b[MOE_BUF_ROWS].fixed = 4 * S;
		AT_LEAST(b[MOE_BUF_ROW_W].per_token, PER_GROUP(4 * S));
		b[MOE_BUF_ROW_W].fixed = 4 * S;
		AT_LEAST(b[MOE_BUF_H].per_token, PER_GROUP(4 * S * ld_h));
		b[MOE_BUF_H].fixed = 4 * S * ld_h;
#undef PER_GROUP
#undef AT_LEAST
	}
#undef HAS
}
