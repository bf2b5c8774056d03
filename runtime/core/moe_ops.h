/* moe_ops.h: the ops of a kernel plan. The compiler's plan stage builds the
 * op list of a layer (compiler/plan/plan.c), each backend emits the kernels
 * of those ops, and model.so carries the list: the CPU runtime walks it
 * (runtime/cpu/exec.c), so what `moegen -d plan` prints is what runs.
 *
 * Each op has a shape, the unit its work is split into. The runtime runs a
 * maximal run of consecutive ops of one shape as one parallel dispatch: for
 * TOKENS, SLOTS, EXPERTS and COLUMNS each task applies every op of the run,
 * in order, to its block (so PK_ROUTE then PK_EXPERTS see a token block
 * while it is in cache, and the down ops accumulate an output column block
 * in a fixed order); for TILES the tiles of every op of the run are one
 * task list; SERIAL ops run alone on the calling thread. */
#ifndef MOE_OPS_H
#define MOE_OPS_H

#include "moe_desc.h"

#define MOE_SHAPES(X)                                                                              \
	X(SERIAL, "serial")                                                                        \
	X(TOKENS, "tokens")   /* blocks of tokens */                                               \
	X(SLOTS, "slots")     /* blocks of Soft MoE slots */                                       \
	X(EXPERTS, "experts") /* blocks of experts */                                              \
	X(TILES, "tiles")     /* (expert, row block, panel block) tiles of a grouped GEMM */       \
	X(COLUMNS, "columns") /* blocks of output columns, every token */

#define MOE_ENUM_X_MOE_SHAPE_(v, s) MOE_SHAPE_##v,
MOE_DEFINE_ENUM(moe_shape, MOE_SHAPE_, MOE_SHAPES);

/* value, spelling, shape */
#define MOE_OPS(X)                                                                                 \
	X(JITTER, "jitter", TOKENS)            /* training: x * U(1 - eps, 1 + eps) */             \
	X(ROUTE, "route", TOKENS)              /* logits, score, bias, groups, top-k, weights */   \
	X(ROUTE_X, "route_x", TOKENS)          /* research routers: + probability, noise */        \
	X(EC_SELECT, "ec_select", EXPERTS)     /* expert choice: each expert's top-C tokens */     \
	X(CAPACITY, "capacity", SERIAL)        /* slots kept within each expert's capacity */      \
	X(GROUP, "group", SERIAL)              /* counts, offsets, rows grouped by expert */       \
	X(EXPERT_UP, "expert_up", TILES)       /* gathered rows x [gate|up], activation */         \
	X(SHARED_UP, "shared_up", TILES)       /* every token x the shared [gate|up] */            \
	X(EXPERT_DOWN, "expert_down", COLUMNS) /* x down: one output row per grouped row */        \
	X(SHARED_DOWN, "shared_down", COLUMNS) /* + the shared FFN */                              \
	X(PASSTHROUGH, "passthrough", COLUMNS) /* + w x for slots over capacity */                 \
	X(OUTPUT_BIAS, "output_bias", COLUMNS) /* + the layer's output bias */                     \
	X(STATS, "stats", SERIAL)              /* routing outputs and auxiliary statistics */      \
	X(PK_QUERY, "pk_query", TILES)         /* PEER: the queries, query-row blocks x tokens */  \
	X(PK_ROUTE, "pk_route", TOKENS)        /* PEER: sub-key top-k, product top-k */            \
	X(PK_EXPERTS, "pk_experts", TOKENS)    /* PEER: single-neuron experts, into y */           \
	X(PK_STATS, "pk_stats", SERIAL)                                                            \
	X(SOFT_LOGITS, "soft_logits", TOKENS)    /* Soft MoE: normalized tokens x slots */         \
	X(SOFT_COMBINE, "soft_combine", TOKENS)  /* per-token softmax over slots */                \
	X(SOFT_DISPATCH, "soft_dispatch", SLOTS) /* per-slot softmax over tokens */                \
	X(SOFT_SLOT_IN, "soft_slot_in", COLUMNS) /* slot inputs, in column blocks */               \
	X(SOFT_SLOTS, "soft_slots", SERIAL)      /* the slots become the experts' rows */          \
	X(SOFT_OUT, "soft_out", TOKENS)          /* y = combine x slot outputs */                  \
	X(SOFT_STATS, "soft_stats", SERIAL)                                                        \
	X(COMBINE, "combine", COLUMNS) /* y = each token's weighted rows, in slot order */

#define MOE_ENUM_X_MOE_OP_(v, s, shape) MOE_OP_##v,
MOE_DEFINE_ENUM(moe_op, MOE_OP_, MOE_OPS);

/* The most ops one plan holds. */
#define MOE_MAX_OPS 24

/* The workspace buffers of a layer's ops. A buffer's size for T tokens is
 * per_token * T + fixed bytes, from moe_workspace (runtime/cpu/workspace.c),
 * which the plan prints and the CPU runtime allocates: one layout for both.
 * T: tokens, E: experts, W: route width, H: hidden, S: Soft MoE slots. */
#define MOE_BUFS(X)                                                                                \
	X(XJ, "x_jitter")       /* [T, H] f32 the jittered input (training) */                     \
	X(LOGITS, "logits")     /* [T, E] f32 (Soft MoE: [T, S]; PEER: the queries) */             \
	X(PROB, "prob")         /* [T, E] f32 router probability (route_x) */                      \
	X(IDS, "ids")           /* [T, W] i32 */                                                   \
	X(WEIGHTS, "weights")   /* [T, W] f32 */                                                   \
	X(SGATE, "sgate")       /* [T] f32 shared-expert gate */                                   \
	X(PRIO, "prio")         /* [T] f32 token priority for capacity */                          \
	X(KEPT, "kept")         /* [T, W] u8 slots within capacity */                              \
	X(COUNTS, "counts")     /* [E] i64 rows per expert */                                      \
	X(OFFSETS, "offsets")   /* [E + 1] i64 first row of each expert */                         \
	X(ROWS, "rows")         /* [T * W] i32 token of each grouped row (Soft: [S]) */            \
	X(ROW_W, "row_w")       /* [T * W] f32 weight of each grouped row (Soft: [S]) */           \
	X(SROWS, "srows")       /* [T] i32 the shared FFN's rows */                                \
	X(H, "h")               /* [T * W, ld_h] f32 expert activations (Soft: [S, ..]) */         \
	X(H_SHARED, "h_shared") /* [T, ld_h shared] f32 */                                         \
	X(SOFT_XN, "soft_xn")   /* [T, H] f32 normalized tokens */                                 \
	X(SOFT_C, "soft_c")     /* [T, S] f32 combine weights */                                   \
	X(SOFT_D, "soft_d")     /* [S, T + pad] f32 dispatch weights (MOE_SOFT_DT_PAD) */          \
	X(SOFT_XS, "soft_xs")   /* [S, H] f32 slot inputs */                                       \
	X(SOFT_Y, "soft_y")     /* [S, H] f32 slot outputs */                                      \
	X(SLOT_ROW, "slot_row") /* [T, W] i64 row of rows_y of each slot (-1: none) */             \
	X(DROWS, "drows")       /* [T * W] i32 the slot of each grouped row: its row of rows_y */  \
	X(ROWS_Y, "rows_y")     /* [T * W, H] f32 each slot's expert output, in slot order */

/* Floats past T in each row of soft_d: a row stride of T floats, a multiple
 * of 4 KiB for T a multiple of 1024, put every slot's row in the same L1
 * set, and the slot-input tiles read 16 of them at once. */
#define MOE_SOFT_DT_PAD 16

#define MOE_ENUM_X_MOE_BUF_(v, s) MOE_BUF_##v,
MOE_DEFINE_ENUM(moe_buf, MOE_BUF_, MOE_BUFS);
extern const char *const moe_buf_names[MOE_BUF_COUNT];

struct moe_buf_size {
	uint64_t per_token, fixed; /* bytes */
};

/* The workspace of d's layer when it runs ops (bit i: op i is in the plan),
 * with the routed and shared FFN's activation strides (0: the target keeps
 * no activation buffer). Buffers the ops do not use are zero. Scratch that
 * depends on the thread count or on the routing (expert choice's per-thread
 * picks, the dropped slots' list) is not in it. */
void moe_workspace(const struct moe_desc *d, uint64_t ops, uint32_t ld_h, uint32_t ld_h_shared,
		   struct moe_buf_size b[MOE_BUF_COUNT]);
#define MOE_OP_BIT(op) (1ull << (op))
_Static_assert(MOE_OP_COUNT <= 64, "an op set is a 64-bit mask");

extern const char *const moe_op_names[MOE_OP_COUNT];
extern const char *const moe_shape_names[MOE_SHAPE_COUNT];
extern const enum moe_shape moe_op_shapes[MOE_OP_COUNT];

#endif
