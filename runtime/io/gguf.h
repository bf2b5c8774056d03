/* gguf.h: a strict reader of GGUF files (versions 2 and 3, as llama.cpp
 * writes them): the header, every metadata key/value (all value types,
 * arrays), the tensor infos and the data offsets, each size and offset
 * bounds-checked before anything is read; and the decoders of the ggml block
 * types that experts are kept in (Q8_0, Q6_K, Q5_0, Q4_0, Q4_1, Q4_K) into
 * integer codes with a scale and an offset per group of 16 or 32 inputs. Errors name the file and
 * the tensor. */
#ifndef MOE_GGUF_H
#define MOE_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "moe_ref.h" /* enum moe_status, struct moe_qfmt */

/* The ggml tensor types whose layout is known: value, name, elements per
 * block, bytes per block. A tensor of another type is an error naming its
 * number. Only F32, F16, BF16, Q8_0, Q6_K, Q5_0, Q4_0, Q4_1 and Q4_K are
 * decoded. */
#define MOE_GGUF_TYPES(X)                                                                          \
	X(F32, "F32", 0, 1, 4)                                                                     \
	X(F16, "F16", 1, 1, 2)                                                                     \
	X(Q4_0, "Q4_0", 2, 32, 18)                                                                 \
	X(Q4_1, "Q4_1", 3, 32, 20)                                                                 \
	X(Q5_0, "Q5_0", 6, 32, 22)                                                                 \
	X(Q5_1, "Q5_1", 7, 32, 24)                                                                 \
	X(Q8_0, "Q8_0", 8, 32, 34)                                                                 \
	X(Q8_1, "Q8_1", 9, 32, 36)                                                                 \
	X(Q2_K, "Q2_K", 10, 256, 84)                                                               \
	X(Q3_K, "Q3_K", 11, 256, 110)                                                              \
	X(Q4_K, "Q4_K", 12, 256, 144)                                                              \
	X(Q5_K, "Q5_K", 13, 256, 176)                                                              \
	X(Q6_K, "Q6_K", 14, 256, 210)                                                              \
	X(Q8_K, "Q8_K", 15, 256, 292)                                                              \
	X(I8, "I8", 24, 1, 1)                                                                      \
	X(I16, "I16", 25, 1, 2)                                                                    \
	X(I32, "I32", 26, 1, 4)                                                                    \
	X(I64, "I64", 27, 1, 8)                                                                    \
	X(F64, "F64", 28, 1, 8)                                                                    \
	X(BF16, "BF16", 30, 1, 2)

#define MOE_GGUF_ENUM_(v, s, n, b, z) MOE_GGML_##v = n,
enum moe_ggml_type { MOE_GGUF_TYPES(MOE_GGUF_ENUM_) };
#undef MOE_GGUF_ENUM_

/* Metadata value types (the numbers in the file). */
enum moe_gguf_vtype {
	MOE_GGUF_U8 = 0,
	MOE_GGUF_I8 = 1,
	MOE_GGUF_U16 = 2,
	MOE_GGUF_I16 = 3,
	MOE_GGUF_U32 = 4,
	MOE_GGUF_I32 = 5,
	MOE_GGUF_F32 = 6,
	MOE_GGUF_BOOL = 7,
	MOE_GGUF_STRING = 8,
	MOE_GGUF_ARRAY = 9,
	MOE_GGUF_U64 = 10,
	MOE_GGUF_I64 = 11,
	MOE_GGUF_F64 = 12,
	MOE_GGUF_VTYPE_COUNT
};

#define MOE_GGUF_MAX_DIMS 4
#define MOE_GGUF_DEFAULT_ALIGNMENT 32

/* One metadata entry. Scalars: u (unsigned and bool), i (signed), f
 * (floating), s (string, NUL-terminated; the file's bytes, which may hold a
 * NUL). Arrays: arr_type and arr_n; arr holds the elements, numbers as stored
 * (little-endian, arr_n * size bytes) or strings as arr_n char pointers; an
 * array of arrays is checked and skipped (arr NULL). */
struct moe_gguf_kv {
	const char *key;
	enum moe_gguf_vtype type;
	uint64_t u;
	int64_t i;
	double f;
	const char *s;
	enum moe_gguf_vtype arr_type;
	uint64_t arr_n;
	void *arr;
};

/* One tensor: ne[0] is the fastest axis (ggml's order); shape is the same
 * dims slowest first (numpy's order: a 2-D weight [ne1 = out, ne0 = in] is
 * nn.Linear's [out, in]). offset is from the start of the file. */
struct moe_gguf_file;
struct moe_gguf_tensor {
	const char *name;
	const char *file;
	uint32_t type;
	uint32_t ndim;
	uint64_t ne[MOE_GGUF_MAX_DIMS];
	uint64_t shape[MOE_GGUF_MAX_DIMS];
	uint64_t numel, bytes, offset;
	const struct moe_gguf_file *src;
};

/* Open and validate a GGUF file (a regular file, read with pread: a file
 * truncated later is an error, never a SIGBUS). On failure *out is NULL and
 * err (cap bytes) holds "PATH: ...": MOE_ERR_IO when it cannot be read,
 * MOE_ERR_WEIGHTS when it is malformed. */
enum moe_status moe_gguf_open(const char *path, struct moe_gguf_file **out, char *err, size_t cap);
void moe_gguf_close(struct moe_gguf_file *f); /* NULL is a no-op */
/* Whether the file starts with GGUF's magic (-1 when it cannot be read). */
int moe_gguf_is_gguf(const char *path);

const char *moe_gguf_path(const struct moe_gguf_file *f);
uint32_t moe_gguf_version(const struct moe_gguf_file *f);
uint64_t moe_gguf_alignment(const struct moe_gguf_file *f);
size_t moe_gguf_count(const struct moe_gguf_file *f); /* tensors, in name order */
const struct moe_gguf_tensor *moe_gguf_at(const struct moe_gguf_file *f, size_t i);
const struct moe_gguf_tensor *moe_gguf_find(const struct moe_gguf_file *f, const char *name);
size_t moe_gguf_kv_count(const struct moe_gguf_file *f); /* in file order */
const struct moe_gguf_kv *moe_gguf_kv_at(const struct moe_gguf_file *f, size_t i);
const struct moe_gguf_kv *moe_gguf_kv_find(const struct moe_gguf_file *f, const char *key);
/* A scalar of any integer type (or bool) that fits, as uint64_t: 0 on
 * success, -1 when absent, negative or not an integer. */
int moe_gguf_kv_uint(const struct moe_gguf_file *f, const char *key, uint64_t *out);
/* A scalar of any numeric type as double: 0 or -1. */
int moe_gguf_kv_num(const struct moe_gguf_file *f, const char *key, double *out);
/* A string scalar, or NULL. */
const char *moe_gguf_kv_str(const struct moe_gguf_file *f, const char *key);

/* The type's name ("Q4_K"), or NULL when unknown. */
const char *moe_gguf_type_name(uint32_t type);
/* The format a quantized type is kept in without loss: Q8_0 -> {int8, 32},
 * Q6_K -> {int8, 16}, Q5_0 -> {int8, 32}, Q4_0 -> {int4, 32, zero 0}, Q4_1
 * and Q4_K -> {int4, 32, zero 1}; 0, or -1 for any other type. */
int moe_gguf_qfmt(uint32_t type, struct moe_qfmt *out);
/* Why a known quantized type has no kept format (a sentence for an error
 * message), or NULL for the types that have one and for unknown types. */
const char *moe_gguf_not_kept(uint32_t type);

/* The tensor's bytes as stored (t->bytes) into dst; a file that ends before
 * the tensor is MOE_ERR_WEIGHTS, a read error MOE_ERR_IO. */
enum moe_status moe_gguf_read(const struct moe_gguf_tensor *t, void *dst, char *err, size_t cap);
/* An F32, F16 or BF16 tensor as f32; n must be t->numel. Other types:
 * MOE_ERR_WEIGHTS naming the type. Values are not checked for finiteness. */
enum moe_status moe_gguf_read_f32(const struct moe_gguf_tensor *t, float *dst, size_t n, char *err,
				  size_t cap);
/* Decode rows x K elements (K a multiple of the type's block) of a tensor
 * of a type that moe_gguf_qfmt keeps into codes [rows * K] (one per byte:
 * the int8 codes signed, the int4 ones 0..15) and scale, offset [rows * K /
 * group] (offset is written for the int4 formats only), exactly as ggml's
 * dequantization: with W = fl(code * scale) + offset (moe_qdequant),
 *   Q8_0: scale d, W = q * d;
 *   Q6_K: code q - 32, scale fl(d * sc) per 16 (exact: an f16 times an int8);
 *   Q5_0: code q - 16, scale d;
 *   Q4_0: scale d, offset -8 d, W = (q - 8) * d;
 *   Q4_1: scale d, offset m, W = q * d + m;
 *   Q4_K: scale fl(d * sc), offset -fl(dmin * m) per sub-block of 32.
 * Returns -1, or the index of the first group whose scale or offset is not
 * finite (-2 for a type that is not decoded). A zero scale is valid (ggml
 * writes d = 0 for a block of zeros). */
int64_t moe_gguf_decode(uint32_t type, const void *src, uint64_t rows, uint64_t K, uint8_t *codes,
			float *scale, float *offset);

#endif
