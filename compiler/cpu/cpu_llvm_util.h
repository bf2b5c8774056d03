/* cpu_llvm_util.h: small IR-building helpers shared by the CPU backend's
 * router and layer files (cpu_llvm_research.c, _ecsoft.c, _peer.c, _soft.c).
 * One context struct carries the module, builder, common types and the
 * function being built, so every helper emits exactly the same IR. */
#ifndef MOE_CPU_LLVM_UTIL_H
#define MOE_CPU_LLVM_UTIL_H

#include <llvm-c/Core.h>

#include "moe_desc.h"

#include <stdint.h>

struct moe_desc;

struct moe_ll {
	LLVMContextRef ctx;
	LLVMModuleRef mod;
	LLVMBuilderRef b;
	LLVMTypeRef t_void, t_i1, t_i8, t_i16, t_i32, t_i64, t_f32, t_f64, t_ptr, t_v8f, t_v8d;
	LLVMValueRef fn;         /* function being built */
	LLVMBasicBlockRef entry; /* its allocas; branches to the first real block */
	const struct moe_desc *d;
};

/* for (iv = from; iv < to; iv++): blocks head, body, exit in that order */
struct moe_ll_loop {
	LLVMBasicBlockRef head, body, exit;
	LLVMValueRef iv;
};

void moe_ll_init(struct moe_ll *g, LLVMContextRef ctx, LLVMModuleRef mod, LLVMBuilderRef b,
		 const struct moe_desc *d);

LLVMValueRef moe_ll_i64c(struct moe_ll *g, int64_t v);
LLVMValueRef moe_ll_f32c(struct moe_ll *g, double v);
LLVMValueRef moe_ll_f64c(struct moe_ll *g, double v);
LLVMValueRef moe_ll_at(struct moe_ll *g, LLVMTypeRef t, LLVMValueRef base, LLVMValueRef i);
LLVMValueRef moe_ll_ld(struct moe_ll *g, LLVMTypeRef t, LLVMValueRef p);
void moe_ll_st(struct moe_ll *g, LLVMValueRef v, LLVMValueRef p);
LLVMValueRef moe_ll_ldf(struct moe_ll *g, LLVMValueRef p, LLVMValueRef i);
void moe_ll_stf(struct moe_ll *g, LLVMValueRef v, LLVMValueRef p, LLVMValueRef i);
LLVMValueRef moe_ll_alloca(struct moe_ll *g, LLVMTypeRef t, uint64_t n, const char *name);
LLVMBasicBlockRef moe_ll_bb(struct moe_ll *g, const char *name);
void moe_ll_loop_open(struct moe_ll *g, struct moe_ll_loop *l, LLVMValueRef from, LLVMValueRef to,
		      const char *name);
void moe_ll_loop_close(struct moe_ll *g, struct moe_ll_loop *l);
LLVMBasicBlockRef moe_ll_when(struct moe_ll *g, LLVMValueRef c);
void moe_ll_when_end(struct moe_ll *g, LLVMBasicBlockRef end);
void moe_ll_fn_begin(struct moe_ll *g, const char *name, LLVMTypeRef *params,
		     const char *const *pnames, unsigned n);
void moe_ll_fn_end(struct moe_ll *g);
LLVMValueRef moe_ll_prm(struct moe_ll *g, unsigned i);
LLVMValueRef moe_ll_libm(struct moe_ll *g, const char *fname, LLVMValueRef a);
LLVMValueRef moe_ll_intr1(struct moe_ll *g, const char *name, LLVMValueRef a);
LLVMValueRef moe_ll_sel_gt(struct moe_ll *g, LLVMValueRef a, LLVMValueRef b, LLVMValueRef x,
			   LLVMValueRef y);
LLVMValueRef moe_ll_to_f32(struct moe_ll *g, LLVMValueRef v);

/* Router pieces: panel dot products (f32, ascending h), scores and the
 * statistics probability, in the reference's arithmetic. */
void moe_ll_panel_dots(struct moe_ll *g, LLVMValueRef xrow, LLVMValueRef w, uint32_t n,
		       LLVMValueRef out);
void moe_ll_scores(struct moe_ll *g, enum moe_score sc, LLVMValueRef l, LLVMValueRef s,
		   LLVMValueRef off, uint32_t n);
void moe_ll_probs(struct moe_ll *g, enum moe_score sc, LLVMValueRef s, LLVMValueRef p,
		  LLVMValueRef off, uint32_t n, LLVMValueRef mul);

#endif
