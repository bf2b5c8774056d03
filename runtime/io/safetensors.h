/* safetensors.h: the checkpoint reader (pread, strict header validation, lookup
 * across sharded sets, conversion to f32), name templates, and a writer for
 * tests and tools. Errors name the file and the tensor. */
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "moe_ref.h" /* enum moe_status */

#define MOE_ST_MAX_DIMS 8
/* The largest JSON header (and index file) accepted. */
#define MOE_ST_MAX_HEADER (100u * 1000u * 1000u)

/* Element types: value, name in the file, size in bytes. */
#define MOE_ST_DTYPES(X)                                                                           \
	X(F64, "F64", 8)                                                                           \
	X(F32, "F32", 4)                                                                           \
	X(F16, "F16", 2)                                                                           \
	X(BF16, "BF16", 2)                                                                         \
	X(F8_E4M3, "F8_E4M3", 1)                                                                   \
	X(F8_E5M2, "F8_E5M2", 1)                                                                   \
	X(I64, "I64", 8)                                                                           \
	X(I32, "I32", 4)                                                                           \
	X(I16, "I16", 2)                                                                           \
	X(I8, "I8", 1)                                                                             \
	X(U64, "U64", 8)                                                                           \
	X(U32, "U32", 4)                                                                           \
	X(U16, "U16", 2)                                                                           \
	X(U8, "U8", 1)                                                                             \
	X(BOOL, "BOOL", 1)

#define MOE_ST_ENUM_(v, s, n) MOE_ST_##v,
enum moe_st_dtype { MOE_ST_DTYPES(MOE_ST_ENUM_) MOE_ST_DTYPE_COUNT };
#undef MOE_ST_ENUM_

extern const char *const moe_st_dtype_names[MOE_ST_DTYPE_COUNT];
extern const uint8_t moe_st_dtype_sizes[MOE_ST_DTYPE_COUNT];

/* One tensor. As returned by lookups it describes bytes of an open file
 * (`src`, at `offset` from the start of the data section: data_offsets[0]);
 * nothing is read until moe_st_read_bytes or moe_st_read_f32 (pread: no
 * mapping, so a file truncated meanwhile is an error, never a SIGBUS); `data`
 * is NULL and `file` is the path of the file holding it. For moe_st_write and
 * in-memory tensors the caller fills name, dtype, ndim, shape and data
 * (bytes and numel may be 0: they are computed) and leaves src NULL. */
struct moe_st_file;
struct moe_st_tensor {
	const char *name;
	const char *file;
	enum moe_st_dtype dtype;
	uint32_t ndim;
	uint64_t shape[MOE_ST_MAX_DIMS];
	uint64_t numel;
	const void *data;
	size_t bytes;
	uint64_t offset;
	const struct moe_st_file *src;
};

struct moe_st_file;

/* Open and validate one .safetensors file: opened O_NONBLOCK | O_CLOEXEC and
 * refused unless fstat says it is a regular file (a FIFO never hangs), the
 * header read with pread; the descriptor stays open until moe_st_close. On
 * failure *out is NULL and err (cap bytes, may be NULL) holds "PATH: ...".
 * MOE_ERR_IO when the file cannot be read, MOE_ERR_WEIGHTS when it is
 * malformed. Messages never quote the file's bytes before its header has
 * parsed as JSON. */
enum moe_status moe_st_open(const char *path, struct moe_st_file **out, char *err, size_t cap);
void moe_st_close(struct moe_st_file *f); /* NULL is a no-op */

const char *moe_st_path(const struct moe_st_file *f);
/* Tensors in name order; i < moe_st_count(f). */
size_t moe_st_count(const struct moe_st_file *f);
const struct moe_st_tensor *moe_st_at(const struct moe_st_file *f, size_t i);
/* The tensor called name, or NULL. */
const struct moe_st_tensor *moe_st_find(const struct moe_st_file *f, const char *name);
/* A string value of the header's __metadata__, or NULL. */
const char *moe_st_metadata(const struct moe_st_file *f, const char *key);

/* A set of checkpoint files searched as one. A path ending in ".index.json"
 * is a sharded checkpoint: its weight_map names the shard of every tensor.
 * Shard names are confined to the index's directory: relative, without ".."
 * components, and, symlinks resolved (realpath), still inside it; anything
 * else is MOE_ERR_WEIGHTS. Every file is opened once: names of one file
 * ("a.safetensors", "./a.safetensors", a link to it) are the same file (by
 * device and inode). Every tensor the index lists must exist in its shard.
 * A tensor name found in two files is an error. */
struct moe_st_set;

enum moe_status moe_st_set_open(const char *const *paths, size_t n, struct moe_st_set **out,
				char *err, size_t cap);
void moe_st_set_close(struct moe_st_set *s); /* NULL is a no-op */
const struct moe_st_tensor *moe_st_set_find(const struct moe_st_set *s, const char *name);
size_t moe_st_set_count(const struct moe_st_set *s);
/* Tensors of all files in name order. */
const struct moe_st_tensor *moe_st_set_at(const struct moe_st_set *s, size_t i);

/* Convert n elements of type dt at src (any alignment) to f32. F64, F32, F16,
 * BF16, F8_E4M3 (e4m3fn: no infinities) and F8_E5M2 convert; F8 values are
 * taken as stored, without any scale. Returns MOE_ERR_WEIGHTS for other types. */
enum moe_status moe_st_convert_f32(enum moe_st_dtype dt, const void *src, size_t n, float *dst);
/* The tensor's bytes as stored (t->bytes of them) into dst. A file that ends
 * before the tensor (truncated after it was opened) is MOE_ERR_WEIGHTS, a
 * read error MOE_ERR_IO; err as for moe_st_open. */
enum moe_status moe_st_read_bytes(const struct moe_st_tensor *t, void *dst, char *err, size_t cap);
/* Convert a whole tensor; n must equal t->numel. err as for moe_st_open,
 * naming the file and the tensor. */
enum moe_status moe_st_read_f32(const struct moe_st_tensor *t, float *dst, size_t n, char *err,
				size_t cap);

/* Expand a name template: "{layer}" and "{expert}" become the decimal numbers.
 * A negative index means "none applies", and then its key is an error, as is
 * any other "{...}" or an unterminated brace. Returns MOE_OK, or MOE_ERR_ARG
 * for a bad template or a name longer than out_cap - 1 (message in err). */
enum moe_status moe_st_expand(const char *tmpl, long layer, long expert, char *out, size_t out_cap,
			      char *err, size_t err_cap);

/* Write a valid file: tensors sorted by name, each data range starting at a
 * multiple of 8 (zero bytes fill the gap after a tensor whose size is not a
 * multiple of 8; none follow the last), the header padded with spaces to a
 * multiple of 8, __metadata__ {"format": "pt"}. tensors[i].data holds
 * numel * size bytes (it may be NULL when that is 0). The file is written
 * under a temporary name and renamed, so a failure leaves no partial file. */
enum moe_status moe_st_write(const char *path, const struct moe_st_tensor *tensors, size_t n,
			     char *err, size_t cap);

#endif
