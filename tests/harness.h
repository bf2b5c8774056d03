/* harness.h: what the generated-CPU-model tests share: a model.so compiled
 * from a description into a temporary directory and opened through its ABI,
 * a small base description, deterministic inputs and the comparison of one
 * forward pass against the reference. */
#ifndef MOE_TEST_HARNESS_H
#define MOE_TEST_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "moe.h"

/* outputs of h_compare agree with the reference within this relative error */
#define H_TOL 1e-5
/* The output bound of d's model against the reference: H_TOL, or the bf16
 * or int8 compute bound where the FFNs may compute in those (bf16 weights or
 * dtype.compute bf16 or int8, on a CPU with their dot instructions). */
#define h_tol(d) moe_desc_compute_tol(d, H_TOL)
/* the max relative error of the last h_compare */
extern double h_last_rel;

/* The temporary directory of this test run (h_setup creates it) and the
 * optimization level h_model_open compiles at (default 1). */
extern char h_tmpdir[64];
extern int h_opt_level;
/* The LLVM feature string h_model_open compiles with (NULL: the host's). */
extern const char *h_features;

/* A model.so opened with dlopen and its exported ABI. */
struct h_model {
	void *dl;
	const struct moe_info *(*info)(void);
	enum moe_status (*create)(moe_model **, const struct moe_create_opts *);
	void (*destroy)(moe_model *);
	enum moe_status (*load)(moe_model *, const char *const *, size_t);
	enum moe_status (*init_random)(moe_model *, uint64_t);
	enum moe_status (*forward)(moe_model *, uint32_t, const void *, void *, size_t,
				   struct moe_routing *, const struct moe_fwd_opts *);
	const char *(*last_error)(void);
	size_t (*describe)(char *, size_t);
	char path[256];
};

/* A small valid token-choice description: callers change fields. */
void h_base_desc(struct moe_desc *d, uint32_t H, uint32_t E, uint32_t k, uint32_t I);
/* Compile d into a fresh model.so under h_tmpdir and open it. Returns 0 or
 * the compile exit code (err holds the message). */
int h_model_open(const struct moe_desc *d, struct h_model *m, char *err, size_t cap);
/* h_model_open, then one model created on it with its weights loaded from the
 * checkpoint file path (each step asserted). */
moe_model *h_model_open_loaded(const struct moe_desc *d, struct h_model *m, const char *path);
void h_model_close(struct h_model *m);
/* x[i] uniform in [-1, 1), a function of (seed, i) only; with h_sign_inputs
 * set, its sign: -1 or 1. */
extern int h_sign_inputs;
void h_fill_input(float *x, size_t n, uint64_t seed);
/* Compile d, create it with threads, moe_init_random(7), and forward T tokens
 * of x (NULL: h_fill_input with seed) into y; the forward's status. */
enum moe_status h_forward(const struct moe_desc *d, const float *x, size_t T, uint32_t threads,
			  uint64_t seed, float *y);
/* Batch and thread invariance: T tokens (input seed 4) with 2 threads and
 * with 1 give the same bits, and the first token alone gives the first row's
 * bits. */
void h_assert_invariant(const struct moe_desc *d, size_t T);
/* Forward T tokens through the generated model and the reference (same
 * weights, same options): identical expert ids in rank order, weights and
 * statistics within f32 rounding, outputs within H_TOL. y_out (optional)
 * receives the model's output. */
void h_compare(const struct moe_desc *d, size_t T, uint32_t threads, uint64_t seed,
	       const struct moe_fwd_opts *opts, float *y_out);

/* Create the temporary directory /tmp/<name>.XXXXXX; remove it and all it
 * holds (cmocka group teardown). */
/* Run `$MOEGEN ARGS` (ARGS from fmt) through the shell; out receives the
 * streams redirect leaves on stdout: H_BOTH, H_STDOUT or H_STDERR. A hang
 * fails after 120 s (exit 124). Returns the exit code. */
#define H_BOTH "2>&1"
#define H_STDOUT "2>/dev/null"
#define H_STDERR "2>&1 >/dev/null"
int h_moegen(char *out, size_t cap, const char *redirect, const char *fmt, ...);

int h_setup(const char *name);
int h_teardown(void **state);

#endif
