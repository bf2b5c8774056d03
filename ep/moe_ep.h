/* moe_ep.h: expert parallelism over MPI for a model.so (libmoe_ep; never
 * linked into model.so). Each rank holds a contiguous range of the routed
 * experts (moe_ep_range) in a model created with that range, and its own
 * tokens. A layer is: route the local tokens; exchange the rows with
 * MPI_Alltoall (counts) and MPI_Ialltoallv (rows, ordered by destination rank
 * then local expert then token and slot); run moe_experts; send the rows back;
 * combine each token's slots in slot order at the token's own rank. The
 * tokens are cut into chunks: chunk i + 1 is in flight while chunk i's experts
 * compute. The combine order makes the output bit-identical to moe_forward in
 * one process. See docs/ep.md. */
#ifndef MOE_EP_H
#define MOE_EP_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "moe.h"

/* The entry points of the model.so (from dlsym, or the functions themselves). */
struct moe_ep_fns {
	const struct moe_info *(*info)(void);
	size_t (*describe)(char *, size_t);
	enum moe_status (*route)(moe_model *, uint32_t, const void *, size_t, int32_t *, float *,
				 const struct moe_fwd_opts *);
	enum moe_status (*experts)(moe_model *, uint32_t, const float *, size_t, const int64_t *,
				   const float *, float *);
	enum moe_status (*combine)(moe_model *, uint32_t, const void *, size_t, const int32_t *,
				   const float *, const float *, const int64_t *, void *);
	const char *(*last_error)(void);
	/* only for the routing statistics (moe_ep_forward's rt); else NULL */
	enum moe_status (*route_stats)(moe_model *, uint32_t, const void *, size_t, int32_t *,
				       float *, const struct moe_fwd_opts *,
				       struct moe_route_sums *);
	enum moe_status (*routing_from_sums)(moe_model *, uint32_t, const struct moe_route_sums *,
					     struct moe_routing *);
};

/* What one rank's forward did: bytes it sent to other ranks (counts, rows
 * out and rows back; nothing it keeps, and not the 2E + 2 doubles of the
 * statistics' reduction, whose traffic is MPI's choice), rows it computed,
 * and seconds spent routing, computing (experts and the row permutations),
 * waiting for the exchange (the reduction included), combining, in all. */
struct moe_ep_stats {
	uint64_t bytes_sent, rows_sent, rows_computed;
	double t_route, t_compute, t_wait, t_combine, t_total;
};

/* Experts [e0, e1) of rank r of P: contiguous, sizes differ by at most one. */
void moe_ep_range(uint32_t n_experts, int n_ranks, int rank, uint32_t *e0, uint32_t *e1);

/* One MoE layer over the ranks of comm (a collective call: every rank calls
 * it with the same layer and chunks, and rt NULL on all or none). m holds
 * moe_ep_range's experts of this rank; x and y are this rank's n_tokens rows
 * in the activation dtype. rt (optional; each pointer in it optional, as for
 * moe_forward): the routing statistics of the tokens of every rank, the
 * same on each rank — each routes with moe_route_stats, one MPI_Allreduce
 * (MPI_SUM) adds the sums, moe_routing_from_sums turns them into counts,
 * importance, importance_cv2, lb_loss and z_loss; expert_ids and weights
 * are this rank's tokens' [n_tokens, route_width]. Returns MOE_OK, or a
 * status with the message in err (on every rank where it happened; a
 * refusal of the staged calls happens on every rank alike). */
enum moe_status moe_ep_forward(MPI_Comm comm, const struct moe_ep_fns *f, moe_model *m,
			       uint32_t layer, const void *x, void *y, size_t n_tokens,
			       uint32_t chunks, struct moe_routing *rt, struct moe_ep_stats *stats,
			       char *err, size_t cap);

#endif
