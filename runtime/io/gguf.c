/* gguf.c: reading GGUF files the way llama.cpp writes them: "GGUF", a u32
 * version (2 or 3), u64 tensor and key/value counts, the key/values, the
 * tensor infos, padding to the alignment (general.alignment, default 32),
 * then the data, each tensor at an aligned offset from the data's start. The
 * header is read through a small buffer over pread, every length checked
 * against what is left of the file before anything is allocated. */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct moe_gguf_file {
	char *path;
	int fd;
	uint32_t version;
	uint64_t size, alignment, data_pos;
	struct moe_gguf_kv *kv;
	size_t n_kv;
	struct moe_gguf_tensor *t; /* sorted by name */
	size_t n;
};

struct type_row {
	uint32_t type;
	const char *name;
	uint32_t block, bytes;
};

#define ROW_(v, s, n, b, z) {n, s, b, z},
static const struct type_row type_rows[] = {MOE_GGUF_TYPES(ROW_)};
#undef ROW_
#define N_TYPES (sizeof type_rows / sizeof *type_rows)

static const struct type_row *type_row(uint32_t type)
{
	for (size_t i = 0; i < N_TYPES; i++)
		if (type_rows[i].type == type)
			return &type_rows[i];
	return NULL;
}

const char *moe_gguf_type_name(uint32_t type)
{
	const struct type_row *r = type_row(type);
	return r ? r->name : NULL;
}

int moe_gguf_qfmt(uint32_t type, struct moe_qfmt *out)
{
	struct moe_qfmt f = {MOE_QFORMAT_NONE, 32, 0};
	if (type == MOE_GGML_Q8_0 || type == MOE_GGML_Q5_0)
		f.kind = MOE_QFORMAT_INT8;
	else if (type == MOE_GGML_Q6_K)
		f.kind = MOE_QFORMAT_INT8, f.group = 16;
	else if (type == MOE_GGML_Q4_0)
		f.kind = MOE_QFORMAT_INT4;
	else if (type == MOE_GGML_Q4_K || type == MOE_GGML_Q4_1)
		f.kind = MOE_QFORMAT_INT4, f.zero = 1;
	else
		return -1;
	*out = f;
	return 0;
}

const char *moe_gguf_not_kept(uint32_t type)
{
	switch (type) {
	case MOE_GGML_Q5_1:
	case MOE_GGML_Q5_K:
		return "5-bit codes with a per-group minimum: int4 holds 4 bits and int8 is "
		       "symmetric (no offset), and moving the minimum into the codes is not "
		       "exact";
	case MOE_GGML_Q2_K:
	case MOE_GGML_Q3_K:
		return "not decoded (its 2- and 3-bit codes would fit int4 groups of 16; not "
		       "done)";
	case MOE_GGML_Q8_1:
	case MOE_GGML_Q8_K:
		return "an activation type of llama.cpp, not a weight type";
	case MOE_GGML_I8:
	case MOE_GGML_I16:
	case MOE_GGML_I32:
	case MOE_GGML_I64:
	case MOE_GGML_F64:
		return "not a weight type";
	default:
		return NULL;
	}
}

__attribute__((format(printf, 4, 5))) static enum moe_status
fail(char *err, size_t cap, enum moe_status s, const char *fmt, ...)
{
	if (err && cap) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err, cap, fmt, ap);
		va_end(ap);
	}
	return s;
}

/* Read exactly n bytes at off: 0, or -1 with errno (0 when the file ended). */
static int pread_full(int fd, void *buf, size_t n, uint64_t off)
{
	unsigned char *p = buf;
	while (n) {
		ssize_t r = pread(fd, p, n, (off_t)off);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			if (r == 0)
				errno = 0;
			return -1;
		}
		p += r, n -= (size_t)r, off += (uint64_t)r;
	}
	return 0;
}

/* The header cursor: pos in the file, a buffer over it. */
struct cur {
	struct moe_gguf_file *f;
	uint64_t pos;
	unsigned char buf[65536];
	uint64_t buf_pos; /* file offset of buf[0] */
	size_t buf_len;
	char *err;
	size_t cap;
	enum moe_status st; /* the first failure */
	const char *where;  /* what is being read, for messages */
};

static int cur_fail(struct cur *c, enum moe_status s, const char *what)
{
	if (c->st == MOE_OK)
		c->st = fail(c->err, c->cap, s, "%s: %s at byte %llu (%s)", c->f->path, what,
			     (unsigned long long)c->pos, c->where);
	return -1;
}

static int get(struct cur *c, void *dst, uint64_t n)
{
	if (c->st != MOE_OK)
		return -1;
	if (n > c->f->size || c->pos > c->f->size - n)
		return cur_fail(c, MOE_ERR_WEIGHTS, "the file ends (truncated header)");
	unsigned char *d = dst;
	while (n) {
		if (c->pos < c->buf_pos || c->pos >= c->buf_pos + c->buf_len) {
			uint64_t left = c->f->size - c->pos;
			size_t k = left < sizeof c->buf ? (size_t)left : sizeof c->buf;
			if (pread_full(c->f->fd, c->buf, k, c->pos) != 0)
				return cur_fail(c, errno ? MOE_ERR_IO : MOE_ERR_WEIGHTS,
						errno ? strerror(errno) : "the file shrank");
			c->buf_pos = c->pos, c->buf_len = k;
		}
		size_t at = (size_t)(c->pos - c->buf_pos), k = c->buf_len - at;
		if (k > n)
			k = (size_t)n;
		memcpy(d, c->buf + at, k);
		d += k, n -= k, c->pos += k;
	}
	return 0;
}

static uint64_t le(const unsigned char *p, int n)
{
	uint64_t v = 0;
	for (int i = n - 1; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static int get_u32(struct cur *c, uint32_t *v)
{
	unsigned char b[4];
	if (get(c, b, 4))
		return -1;
	*v = (uint32_t)le(b, 4);
	return 0;
}

static int get_u64(struct cur *c, uint64_t *v)
{
	unsigned char b[8];
	if (get(c, b, 8))
		return -1;
	*v = le(b, 8);
	return 0;
}

static uint64_t left(const struct cur *c)
{
	return c->f->size - c->pos;
}

/* A string: u64 length, bytes; NUL-terminated copy in *out. */
static int get_str(struct cur *c, char **out)
{
	uint64_t n;
	if (get_u64(c, &n))
		return -1;
	if (n > left(c))
		return cur_fail(c, MOE_ERR_WEIGHTS, "a string longer than the rest of the file");
	char *s = malloc((size_t)n + 1);
	if (!s)
		return cur_fail(c, MOE_ERR_NOMEM, "out of memory");
	if (get(c, s, n)) {
		free(s);
		return -1;
	}
	s[n] = 0;
	*out = s;
	return 0;
}

static const uint8_t vsize[MOE_GGUF_VTYPE_COUNT] = {
    [MOE_GGUF_U8] = 1,  [MOE_GGUF_I8] = 1,  [MOE_GGUF_U16] = 2, [MOE_GGUF_I16] = 2,
    [MOE_GGUF_U32] = 4, [MOE_GGUF_I32] = 4, [MOE_GGUF_F32] = 4, [MOE_GGUF_BOOL] = 1,
    [MOE_GGUF_U64] = 8, [MOE_GGUF_I64] = 8, [MOE_GGUF_F64] = 8};

static double f32_of(uint32_t u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}

/* One scalar of a numeric type from its little-endian bytes into kv. */
static void set_scalar(struct moe_gguf_kv *kv, enum moe_gguf_vtype t, const unsigned char *b)
{
	uint64_t u = le(b, vsize[t]);
	switch (t) {
	case MOE_GGUF_I8:
		kv->i = (int8_t)u;
		break;
	case MOE_GGUF_I16:
		kv->i = (int16_t)u;
		break;
	case MOE_GGUF_I32:
		kv->i = (int32_t)u;
		break;
	case MOE_GGUF_I64:
		kv->i = (int64_t)u;
		break;
	case MOE_GGUF_F32:
		kv->f = f32_of((uint32_t)u);
		break;
	case MOE_GGUF_F64:
		memcpy(&kv->f, &u, 8);
		break;
	default:
		kv->u = u;
		break;
	}
}

static int skip_array(struct cur *c, int depth);

/* The elements of an array of type t, n of them; kept in kv when kv. */
static int get_array(struct cur *c, struct moe_gguf_kv *kv, int depth)
{
	uint32_t t;
	uint64_t n;
	if (get_u32(c, &t) || get_u64(c, &n))
		return -1;
	if (t >= MOE_GGUF_VTYPE_COUNT) {
		char m[64];
		snprintf(m, sizeof m, "unknown array element type %u", t);
		return cur_fail(c, MOE_ERR_WEIGHTS, m);
	}
	/* every element takes at least one byte (a string: eight) */
	uint64_t least = t == MOE_GGUF_STRING ? 8 : t == MOE_GGUF_ARRAY ? 12 : vsize[t];
	if (n > left(c) / least)
		return cur_fail(c, MOE_ERR_WEIGHTS, "an array longer than the rest of the file");
	if (kv)
		kv->arr_type = (enum moe_gguf_vtype)t, kv->arr_n = n;
	if (t == MOE_GGUF_ARRAY) {
		if (depth >= 8)
			return cur_fail(c, MOE_ERR_WEIGHTS, "arrays nested deeper than 8");
		for (uint64_t i = 0; i < n; i++)
			if (skip_array(c, depth + 1))
				return -1;
		return 0;
	}
	if (t == MOE_GGUF_STRING) {
		char **s = kv ? calloc(n ? (size_t)n : 1, sizeof *s) : NULL;
		if (kv && !s)
			return cur_fail(c, MOE_ERR_NOMEM, "out of memory");
		if (kv)
			kv->arr = s;
		for (uint64_t i = 0; i < n; i++) {
			char *x;
			if (get_str(c, &x))
				return -1;
			if (s)
				s[i] = x;
			else
				free(x);
		}
		return 0;
	}
	uint64_t bytes = n * vsize[t];
	void *a = malloc(bytes ? (size_t)bytes : 1);
	if (!a)
		return cur_fail(c, MOE_ERR_NOMEM, "out of memory");
	if (get(c, a, bytes)) {
		free(a);
		return -1;
	}
	if (kv)
		kv->arr = a;
	else
		free(a);
	if (t == MOE_GGUF_BOOL)
		for (uint64_t i = 0; kv && i < n; i++)
			if (((unsigned char *)a)[i] > 1)
				return cur_fail(c, MOE_ERR_WEIGHTS, "a bool that is not 0 or 1");
	return 0;
}

static int skip_array(struct cur *c, int depth)
{
	return get_array(c, NULL, depth);
}

static int get_kv(struct cur *c, struct moe_gguf_kv *kv)
{
	uint32_t t;
	if (get_str(c, (char **)&kv->key) || get_u32(c, &t))
		return -1;
	c->where = kv->key;
	if (t >= MOE_GGUF_VTYPE_COUNT) {
		char m[64];
		snprintf(m, sizeof m, "unknown value type %u", t);
		return cur_fail(c, MOE_ERR_WEIGHTS, m);
	}
	kv->type = (enum moe_gguf_vtype)t;
	if (t == MOE_GGUF_STRING)
		return get_str(c, (char **)&kv->s);
	if (t == MOE_GGUF_ARRAY)
		return get_array(c, kv, 0);
	unsigned char b[8];
	if (get(c, b, vsize[t]))
		return -1;
	if (t == MOE_GGUF_BOOL && b[0] > 1)
		return cur_fail(c, MOE_ERR_WEIGHTS, "a bool that is not 0 or 1");
	set_scalar(kv, (enum moe_gguf_vtype)t, b);
	return 0;
}

static void kv_free(struct moe_gguf_kv *kv)
{
	if (kv->arr_type == MOE_GGUF_STRING && kv->arr)
		for (uint64_t i = 0; i < kv->arr_n; i++)
			free(((char **)kv->arr)[i]);
	free(kv->arr);
	free((char *)kv->key);
	free((char *)kv->s);
}

void moe_gguf_close(struct moe_gguf_file *f)
{
	if (!f)
		return;
	if (f->fd >= 0)
		close(f->fd);
	for (size_t i = 0; f->kv && i < f->n_kv; i++)
		kv_free(&f->kv[i]);
	for (size_t i = 0; f->t && i < f->n; i++)
		free((char *)f->t[i].name);
	free(f->kv);
	free(f->t);
	free(f->path);
	free(f);
}

static int mul_ok(uint64_t a, uint64_t b, uint64_t *out)
{
	if (a && b > UINT64_MAX / a)
		return 0;
	*out = a * b;
	return 1;
}

static int get_tensor(struct cur *c, struct moe_gguf_tensor *t)
{
	uint32_t nd, type;
	if (get_str(c, (char **)&t->name))
		return -1;
	c->where = t->name;
	t->file = c->f->path;
	t->src = c->f;
	if (get_u32(c, &nd))
		return -1;
	if (nd < 1 || nd > MOE_GGUF_MAX_DIMS) {
		char m[64];
		snprintf(m, sizeof m, "tensor with %u dimensions (1 to %d)", nd, MOE_GGUF_MAX_DIMS);
		return cur_fail(c, MOE_ERR_WEIGHTS, m);
	}
	t->ndim = nd;
	uint64_t numel = 1;
	for (uint32_t i = 0; i < nd; i++) {
		if (get_u64(c, &t->ne[i]))
			return -1;
		if (!t->ne[i] || !mul_ok(numel, t->ne[i], &numel) || numel > INT64_MAX)
			return cur_fail(c, MOE_ERR_WEIGHTS,
					"a zero dimension or an element count over 2^63");
		t->shape[nd - 1 - i] = t->ne[i];
	}
	t->numel = numel;
	if (get_u32(c, &type) || get_u64(c, &t->offset))
		return -1;
	t->type = type;
	const struct type_row *r = type_row(type);
	if (!r) {
		char m[64];
		snprintf(m, sizeof m, "unknown tensor type %u", type);
		return cur_fail(c, MOE_ERR_WEIGHTS, m);
	}
	if (t->ne[0] % r->block) {
		char m[128];
		snprintf(m, sizeof m, "%s rows of %llu elements (not a multiple of its block, %u)",
			 r->name, (unsigned long long)t->ne[0], r->block);
		return cur_fail(c, MOE_ERR_WEIGHTS, m);
	}
	if (!mul_ok(numel / r->block, r->bytes, &t->bytes))
		return cur_fail(c, MOE_ERR_WEIGHTS, "a tensor size over 2^64");
	return 0;
}

static int by_name(const void *a, const void *b)
{
	return strcmp(((const struct moe_gguf_tensor *)a)->name,
		      ((const struct moe_gguf_tensor *)b)->name);
}

int moe_gguf_is_gguf(const char *path)
{
	int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return -1;
	struct stat sb;
	unsigned char m[4];
	int r = fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && pread_full(fd, m, 4, 0) == 0 &&
		memcmp(m, "GGUF", 4) == 0;
	close(fd);
	return r;
}

static enum moe_status parse(struct cur *c)
{
	struct moe_gguf_file *f = c->f;
	unsigned char magic[4];
	uint64_t n_t, n_kv;
	c->where = "header";
	if (get(c, magic, 4))
		return c->st;
	if (memcmp(magic, "GGUF", 4) != 0)
		return fail(c->err, c->cap, MOE_ERR_WEIGHTS, "%s: not a GGUF file (no GGUF magic)",
			    f->path);
	if (get_u32(c, &f->version))
		return c->st;
	if (f->version != 2 && f->version != 3)
		return fail(c->err, c->cap, MOE_ERR_WEIGHTS,
			    "%s: GGUF version %u (versions 2 and 3 are read)", f->path, f->version);
	if (get_u64(c, &n_t) || get_u64(c, &n_kv))
		return c->st;
	/* a key/value takes at least 8 + 4 + 1 bytes, a tensor info 8 + 4 + 8 + 4 + 8 */
	if (n_kv > left(c) / 13 || n_t > left(c) / 32)
		return fail(c->err, c->cap, MOE_ERR_WEIGHTS,
			    "%s: %llu tensors and %llu key/values cannot fit in %llu bytes",
			    f->path, (unsigned long long)n_t, (unsigned long long)n_kv,
			    (unsigned long long)f->size);
	f->kv = calloc(n_kv ? (size_t)n_kv : 1, sizeof *f->kv);
	f->t = calloc(n_t ? (size_t)n_t : 1, sizeof *f->t);
	if (!f->kv || !f->t)
		return fail(c->err, c->cap, MOE_ERR_NOMEM, "%s: out of memory", f->path);
	for (uint64_t i = 0; i < n_kv; i++) {
		c->where = "key/value";
		f->n_kv = (size_t)i + 1;
		if (get_kv(c, &f->kv[i]))
			return c->st;
		for (uint64_t j = 0; j < i; j++)
			if (!strcmp(f->kv[j].key, f->kv[i].key))
				return fail(c->err, c->cap, MOE_ERR_WEIGHTS,
					    "%s: key '%s' appears twice", f->path, f->kv[i].key);
	}
	f->alignment = MOE_GGUF_DEFAULT_ALIGNMENT;
	const struct moe_gguf_kv *al = moe_gguf_kv_find(f, "general.alignment");
	if (al) {
		if (al->type != MOE_GGUF_U32 || !al->u || (al->u & (al->u - 1)))
			return fail(c->err, c->cap, MOE_ERR_WEIGHTS,
				    "%s: general.alignment must be a u32 power of two", f->path);
		f->alignment = al->u;
	}
	for (uint64_t i = 0; i < n_t; i++) {
		c->where = "tensor info";
		f->n = (size_t)i + 1;
		if (get_tensor(c, &f->t[i]))
			return c->st;
	}
	uint64_t pad = (f->alignment - c->pos % f->alignment) % f->alignment;
	if (pad > left(c))
		return fail(c->err, c->cap, MOE_ERR_WEIGHTS,
			    "%s: the file ends before its data section (truncated)", f->path);
	f->data_pos = c->pos + pad;
	uint64_t data = f->size - f->data_pos;
	for (size_t i = 0; i < f->n; i++) {
		struct moe_gguf_tensor *t = &f->t[i];
		if (t->offset % f->alignment)
			return fail(c->err, c->cap, MOE_ERR_WEIGHTS,
				    "%s: tensor '%s': offset %llu is not a multiple of the "
				    "alignment %llu",
				    f->path, t->name, (unsigned long long)t->offset,
				    (unsigned long long)f->alignment);
		if (t->offset > data || t->bytes > data - t->offset)
			return fail(c->err, c->cap, MOE_ERR_WEIGHTS,
				    "%s: tensor '%s': bytes [%llu, %llu) of the data section "
				    "beyond its end (%llu bytes; truncated file?)",
				    f->path, t->name, (unsigned long long)t->offset,
				    (unsigned long long)(t->offset + t->bytes),
				    (unsigned long long)data);
		t->offset += f->data_pos;
	}
	qsort(f->t, f->n, sizeof *f->t, by_name);
	for (size_t i = 1; i < f->n; i++)
		if (!strcmp(f->t[i - 1].name, f->t[i].name))
			return fail(c->err, c->cap, MOE_ERR_WEIGHTS,
				    "%s: tensor '%s' appears twice", f->path, f->t[i].name);
	return MOE_OK;
}

enum moe_status moe_gguf_open(const char *path, struct moe_gguf_file **out, char *err, size_t cap)
{
	if (!out || !path)
		return fail(err, cap, MOE_ERR_ARG, "moe_gguf_open: NULL argument");
	*out = NULL;
	struct moe_gguf_file *f = calloc(1, sizeof *f);
	struct cur *c = calloc(1, sizeof *c);
	if (!f || !c || !(f->path = strdup(path))) {
		free(c);
		if (f)
			free(f->path);
		free(f);
		return fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", path);
	}
	f->fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	struct stat sb;
	enum moe_status st = MOE_OK;
	if (f->fd < 0 || fstat(f->fd, &sb) != 0)
		st = fail(err, cap, MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
	else if (!S_ISREG(sb.st_mode))
		st = fail(err, cap, MOE_ERR_IO, "%s: not a regular file", path);
	if (st == MOE_OK) {
		int fl = fcntl(f->fd, F_GETFL);
		if (fl >= 0)
			(void)fcntl(f->fd, F_SETFL, fl & ~O_NONBLOCK);
		f->size = (uint64_t)sb.st_size;
		*c = (struct cur){.f = f, .err = err, .cap = cap, .st = MOE_OK};
		st = parse(c);
	}
	free(c);
	if (st != MOE_OK) {
		moe_gguf_close(f);
		return st;
	}
	*out = f;
	return MOE_OK;
}

const char *moe_gguf_path(const struct moe_gguf_file *f)
{
	return f->path;
}

uint32_t moe_gguf_version(const struct moe_gguf_file *f)
{
	return f->version;
}

uint64_t moe_gguf_alignment(const struct moe_gguf_file *f)
{
	return f->alignment;
}

size_t moe_gguf_count(const struct moe_gguf_file *f)
{
	return f->n;
}

const struct moe_gguf_tensor *moe_gguf_at(const struct moe_gguf_file *f, size_t i)
{
	return i < f->n ? &f->t[i] : NULL;
}

const struct moe_gguf_tensor *moe_gguf_find(const struct moe_gguf_file *f, const char *name)
{
	struct moe_gguf_tensor key = {.name = name};
	return bsearch(&key, f->t, f->n, sizeof *f->t, by_name);
}

size_t moe_gguf_kv_count(const struct moe_gguf_file *f)
{
	return f->n_kv;
}

const struct moe_gguf_kv *moe_gguf_kv_at(const struct moe_gguf_file *f, size_t i)
{
	return i < f->n_kv ? &f->kv[i] : NULL;
}

const struct moe_gguf_kv *moe_gguf_kv_find(const struct moe_gguf_file *f, const char *key)
{
	for (size_t i = 0; i < f->n_kv; i++)
		if (f->kv[i].key && !strcmp(f->kv[i].key, key))
			return &f->kv[i];
	return NULL;
}

int moe_gguf_kv_uint(const struct moe_gguf_file *f, const char *key, uint64_t *out)
{
	const struct moe_gguf_kv *kv = moe_gguf_kv_find(f, key);
	if (!kv)
		return -1;
	switch (kv->type) {
	case MOE_GGUF_U8:
	case MOE_GGUF_U16:
	case MOE_GGUF_U32:
	case MOE_GGUF_U64:
	case MOE_GGUF_BOOL:
		*out = kv->u;
		return 0;
	case MOE_GGUF_I8:
	case MOE_GGUF_I16:
	case MOE_GGUF_I32:
	case MOE_GGUF_I64:
		if (kv->i < 0)
			return -1;
		*out = (uint64_t)kv->i;
		return 0;
	default:
		return -1;
	}
}

int moe_gguf_kv_num(const struct moe_gguf_file *f, const char *key, double *out)
{
	const struct moe_gguf_kv *kv = moe_gguf_kv_find(f, key);
	uint64_t u;
	if (!kv)
		return -1;
	if (kv->type == MOE_GGUF_F32 || kv->type == MOE_GGUF_F64) {
		*out = kv->f;
		return 0;
	}
	if (kv->type == MOE_GGUF_I8 || kv->type == MOE_GGUF_I16 || kv->type == MOE_GGUF_I32 ||
	    kv->type == MOE_GGUF_I64) {
		*out = (double)kv->i;
		return 0;
	}
	if (moe_gguf_kv_uint(f, key, &u))
		return -1;
	*out = (double)u;
	return 0;
}

const char *moe_gguf_kv_str(const struct moe_gguf_file *f, const char *key)
{
	const struct moe_gguf_kv *kv = moe_gguf_kv_find(f, key);
	return kv && kv->type == MOE_GGUF_STRING ? kv->s : NULL;
}

enum moe_status moe_gguf_read(const struct moe_gguf_tensor *t, void *dst, char *err, size_t cap)
{
	if (!t || !t->src || (!dst && t->bytes))
		return fail(err, cap, MOE_ERR_ARG, "moe_gguf_read: NULL argument");
	if (t->bytes > SIZE_MAX)
		return fail(err, cap, MOE_ERR_NOMEM, "%s: tensor '%s' does not fit in memory",
			    t->file, t->name);
	if (pread_full(t->src->fd, dst, (size_t)t->bytes, t->offset) != 0) {
		if (errno)
			return fail(err, cap, MOE_ERR_IO, "%s: tensor '%s': %s", t->file, t->name,
				    strerror(errno));
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: tensor '%s': the file ends before its data (truncated)", t->file,
			    t->name);
	}
	return MOE_OK;
}

static float bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}

enum moe_status moe_gguf_read_f32(const struct moe_gguf_tensor *t, float *dst, size_t n, char *err,
				  size_t cap)
{
	if (!t || !dst || n != t->numel)
		return fail(err, cap, MOE_ERR_ARG, "moe_gguf_read_f32: bad arguments");
	if (t->type != MOE_GGML_F32 && t->type != MOE_GGML_F16 && t->type != MOE_GGML_BF16) {
		const char *nm = moe_gguf_type_name(t->type);
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: tensor '%s' is %s; F32, F16 or BF16 was expected here", t->file,
			    t->name, nm ? nm : "of an unknown type");
	}
	unsigned char *raw = malloc(t->bytes ? (size_t)t->bytes : 1);
	if (!raw)
		return fail(err, cap, MOE_ERR_NOMEM, "%s: tensor '%s': out of memory", t->file,
			    t->name);
	enum moe_status st = moe_gguf_read(t, raw, err, cap);
	for (size_t i = 0; st == MOE_OK && i < n; i++) {
		if (t->type == MOE_GGML_F32)
			dst[i] = bits_f32((uint32_t)le(raw + 4 * i, 4));
		else if (t->type == MOE_GGML_BF16)
			dst[i] = moe_bf16_to_f32((uint16_t)le(raw + 2 * i, 2));
		else
			dst[i] = moe_f16_to_f32((uint16_t)le(raw + 2 * i, 2));
	}
	free(raw);
	return st;
}

/* ggml's 6-bit scale and min of sub-block j (0..7) of a Q4_K super-block,
 * packed in 12 bytes: j < 4 in the low 6 bits of q[j] and q[j + 4]; j >= 4
 * the low 4 bits from q[j + 4] (scale: low nibble, min: high nibble) and
 * the high 2 bits from the top of q[j - 4] (scale) and q[j] (min). */
static void q4k_scale_min(int j, const unsigned char *q, unsigned *sc, unsigned *m)
{
	if (j < 4) {
		*sc = q[j] & 63u;
		*m = q[j + 4] & 63u;
	} else {
		*sc = (q[j + 4] & 15u) | (unsigned)(q[j - 4] >> 6) << 4;
		*m = (unsigned)(q[j + 4] >> 4) | (unsigned)(q[j] >> 6) << 4;
	}
}

static float f16_at(const unsigned char *p)
{
	return moe_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

/* Bits b..b+1 of byte v. */
static unsigned two_bits(unsigned v, int b)
{
	return v >> b & 3u;
}

int64_t moe_gguf_decode(uint32_t type, const void *src, uint64_t rows, uint64_t K, uint8_t *codes,
			float *scale, float *offset)
{
	const unsigned char *p = src;
	struct moe_qfmt f;
	if (moe_gguf_qfmt(type, &f) != 0)
		return -2;
	uint64_t ng = rows * (K / f.group);
	if (type == MOE_GGML_Q8_0) {
		/* 34 bytes per 32: f16 d, 32 int8 */
		for (uint64_t g = 0; g < ng; g++, p += 34) {
			scale[g] = f16_at(p);
			memcpy(codes + g * 32, p + 2, 32);
		}
	} else if (type == MOE_GGML_Q5_0) {
		/* 22 bytes per 32: f16 d, u32 qh (bit l: the fifth bit of
		 * element l), 16 bytes of nibbles as Q4_0's; W = (q - 16) d */
		for (uint64_t g = 0; g < ng; g++, p += 22) {
			scale[g] = f16_at(p);
			uint32_t qh = (uint32_t)le(p + 2, 4);
			for (int l = 0; l < 16; l++) {
				unsigned lo = p[6 + l] & 15u, hi = p[6 + l] >> 4;
				lo |= (qh >> l & 1u) << 4;
				hi |= (qh >> (l + 16) & 1u) << 4;
				codes[g * 32 + (uint64_t)l] = (uint8_t)(int8_t)((int)lo - 16);
				codes[g * 32 + 16 + (uint64_t)l] = (uint8_t)(int8_t)((int)hi - 16);
			}
		}
	} else if (type == MOE_GGML_Q4_0 || type == MOE_GGML_Q4_1) {
		/* Q4_0: 18 bytes per 32: f16 d, 16 bytes: low nibbles are
		 * elements 0..15, high nibbles 16..31; Q4_1: 20 bytes, f16 d
		 * and f16 m before the same nibbles, W = q d + m */
		int q1 = type == MOE_GGML_Q4_1, hdr = q1 ? 4 : 2;
		for (uint64_t g = 0; g < ng; g++, p += hdr + 16) {
			float d = f16_at(p);
			scale[g] = d;
			offset[g] = q1 ? f16_at(p + 2) : -8.0f * d;
			for (int l = 0; l < 16; l++) {
				codes[g * 32 + (uint64_t)l] = p[hdr + l] & 15u;
				codes[g * 32 + 16 + (uint64_t)l] = p[hdr + l] >> 4;
			}
		}
	} else if (type == MOE_GGML_Q4_K) {
		/* 144 bytes per 256: f16 d, f16 dmin, 12 bytes of scales and
		 * mins, 128 bytes of nibbles; each 32 bytes hold two sub-blocks
		 * (low nibbles the first, high the second) */
		for (uint64_t b = 0; b < ng / 8; b++, p += 144) {
			float d = f16_at(p), dmin = f16_at(p + 2);
			const unsigned char *sm = p + 4, *q = p + 16;
			for (int j = 0; j < 8; j++) {
				unsigned sc, m;
				q4k_scale_min(j, sm, &sc, &m);
				uint64_t g = b * 8 + (uint64_t)j;
				scale[g] = d * (float)sc;
				offset[g] = -(dmin * (float)m);
				const unsigned char *qq = q + (j / 2) * 32;
				for (int l = 0; l < 32; l++)
					codes[g * 32 + (uint64_t)l] =
					    j % 2 ? qq[l] >> 4 : qq[l] & 15u;
			}
		}
	} else {
		/* Q6_K: 210 bytes per 256: ql[128] (low 4 bits), qh[64] (high
		 * 2 bits), 16 int8 scales, f16 d. Each half of 128 elements
		 * reads 64 bytes of ql and 32 of qh: element e = 32 k + l
		 * (k 0..3, l 0..31) has low bits ql[l + 32 (k & 1)] (low nibble
		 * for k < 2, high for k >= 2) and high bits (qh[l] >> 2k) & 3;
		 * its scale is scales[e / 16]; W = (q - 32) fl(d sc). */
		for (uint64_t b = 0; b < ng / 16; b++, p += 210) {
			const unsigned char *ql = p, *qh = p + 128;
			const signed char *sc = (const signed char *)(p + 192);
			float d = f16_at(p + 208);
			for (int j = 0; j < 16; j++)
				scale[b * 16 + (uint64_t)j] = d * (float)sc[j];
			uint8_t *c = codes + b * 256;
			for (int h = 0; h < 2; h++, ql += 64, qh += 32, c += 128)
				for (int k = 0; k < 4; k++)
					for (int l = 0; l < 32; l++) {
						unsigned lo = ql[l + 32 * (k & 1)];
						lo = k < 2 ? lo & 15u : lo >> 4;
						unsigned q = lo | two_bits(qh[l], 2 * k) << 4;
						c[32 * k + l] = (uint8_t)(int8_t)((int)q - 32);
					}
		}
	}
	int has_o = f.kind == MOE_QFORMAT_INT4;
	for (uint64_t g = 0; g < ng; g++)
		if (!isfinite(scale[g]) || (offset && has_o && !isfinite(offset[g])))
			return (int64_t)g;
	return -1;
}
