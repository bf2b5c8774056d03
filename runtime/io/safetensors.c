/* safetensors.c: reading checkpoints the way Hugging Face writes them: an
 * 8-byte little-endian header length, a JSON header (cJSON), then the data.
 * Every field is validated before any data is read, and the data is read
 * with pread (no mapping), so a malformed file, or one truncated while it is
 * being read, is an error message, never a bad read or a SIGBUS. */
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NAME_(v, s, n) s,
const char *const moe_st_dtype_names[] = {MOE_ST_DTYPES(NAME_)};
#undef NAME_
#define SIZE_(v, s, n) n,
const uint8_t moe_st_dtype_sizes[] = {MOE_ST_DTYPES(SIZE_)};
#undef SIZE_
_Static_assert(sizeof moe_st_dtype_names / sizeof *moe_st_dtype_names == MOE_ST_DTYPE_COUNT,
	       "dtype names");

struct meta {
	char *key, *value;
};

struct moe_st_file {
	char *path;
	int fd;    /* open for the file's lifetime; -1 when closed */
	dev_t dev; /* identity, so one file named two ways is one file */
	ino_t ino;
	uint64_t data_pos; /* file offset of the data: 8 + header length */
	uint64_t data_size;
	struct moe_st_tensor *t; /* sorted by name */
	size_t n;
	struct meta *meta;
	size_t n_meta;
};

struct moe_st_set {
	struct moe_st_file **files;
	size_t n_files;
	const struct moe_st_tensor **t; /* all files, sorted by name */
	size_t n;
};

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

/* "[2, 3, 4]" */
static void shape_str(const struct moe_st_tensor *t, char *buf, size_t cap)
{
	size_t len = 0;
	int n = snprintf(buf, cap, "[");
	len = n > 0 ? (size_t)n : 0;
	for (uint32_t i = 0; i < t->ndim && len < cap; i++) {
		n = snprintf(buf + len, cap - len, "%s%llu", i ? ", " : "",
			     (unsigned long long)t->shape[i]);
		len += n > 0 ? (size_t)n : 0;
	}
	if (len < cap)
		snprintf(buf + len, cap - len, "]");
}

static int mul_overflows(uint64_t a, uint64_t b, uint64_t *out)
{
	return __builtin_mul_overflow(a, b, out);
}

/* Element count and byte size of a shape; -1 on overflow. */
static int tensor_size(const struct moe_st_tensor *t, uint64_t *numel, uint64_t *bytes)
{
	uint64_t n = 1;
	for (uint32_t i = 0; i < t->ndim; i++)
		if (mul_overflows(n, t->shape[i], &n))
			return -1;
	if (mul_overflows(n, moe_st_dtype_sizes[t->dtype], bytes))
		return -1;
	if (*bytes > SIZE_MAX)
		return -1;
	*numel = n;
	return 0;
}

/* A JSON number that is an exact non-negative integer below 2^53 (doubles are
 * exact up to there, and no real size gets near it). */
static int json_uint(const cJSON *j, uint64_t *out)
{
	if (!cJSON_IsNumber(j))
		return -1;
	double v = j->valuedouble;
	if (!(v >= 0) || v > 9007199254740992.0 || v != floor(v))
		return -1;
	*out = (uint64_t)v;
	return 0;
}

static int by_name(const void *a, const void *b)
{
	return strcmp(((const struct moe_st_tensor *)a)->name,
		      ((const struct moe_st_tensor *)b)->name);
}

static int by_begin(const void *a, const void *b)
{
	const struct moe_st_tensor *x = *(const struct moe_st_tensor *const *)a;
	const struct moe_st_tensor *y = *(const struct moe_st_tensor *const *)b;
	if (x->offset != y->offset)
		return x->offset < y->offset ? -1 : 1;
	return x->bytes < y->bytes ? -1 : x->bytes > y->bytes;
}

void moe_st_close(struct moe_st_file *f)
{
	if (!f)
		return;
	for (size_t i = 0; i < f->n; i++)
		free((char *)f->t[i].name);
	free(f->t);
	for (size_t i = 0; i < f->n_meta; i++) {
		free(f->meta[i].key);
		free(f->meta[i].value);
	}
	free(f->meta);
	if (f->fd >= 0)
		close(f->fd);
	free(f->path);
	free(f);
}

static enum moe_status parse_metadata(struct moe_st_file *f, const cJSON *m, char *err, size_t cap)
{
	if (!cJSON_IsObject(m))
		return fail(err, cap, MOE_ERR_WEIGHTS, "%s: __metadata__ is not an object",
			    f->path);
	size_t n = (size_t)cJSON_GetArraySize(m);
	f->meta = calloc(n ? n : 1, sizeof *f->meta);
	if (!f->meta)
		return fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", f->path);
	const cJSON *e;
	cJSON_ArrayForEach(e, m)
	{
		if (!cJSON_IsString(e))
			return fail(err, cap, MOE_ERR_WEIGHTS,
				    "%s: __metadata__ value '%s' is not a string", f->path,
				    e->string);
		struct meta *md = &f->meta[f->n_meta++];
		md->key = strdup(e->string);
		md->value = strdup(e->valuestring);
		if (!md->key || !md->value)
			return fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", f->path);
	}
	return MOE_OK;
}

/* Fill t from one header entry; the data range is checked here too. */
static enum moe_status parse_entry(struct moe_st_file *f, const cJSON *e, struct moe_st_tensor *t,
				   char *err, size_t cap)
{
	const char *p = f->path, *nm = t->name;
	if (!cJSON_IsObject(e))
		return fail(err, cap, MOE_ERR_WEIGHTS, "%s: tensor '%s': entry is not an object", p,
			    nm);
	const cJSON *k;
	cJSON_ArrayForEach(k, e)
	{
		if (strcmp(k->string, "dtype") && strcmp(k->string, "shape") &&
		    strcmp(k->string, "data_offsets"))
			return fail(err, cap, MOE_ERR_WEIGHTS,
				    "%s: tensor '%s': unexpected key '%s' (expected dtype, shape, "
				    "data_offsets)",
				    p, nm, k->string);
	}

	const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
	if (!dt)
		return fail(err, cap, MOE_ERR_WEIGHTS, "%s: tensor '%s': missing dtype", p, nm);
	if (!cJSON_IsString(dt))
		return fail(err, cap, MOE_ERR_WEIGHTS, "%s: tensor '%s': dtype is not a string", p,
			    nm);
	int d = -1;
	for (int i = 0; i < MOE_ST_DTYPE_COUNT; i++)
		if (strcmp(dt->valuestring, moe_st_dtype_names[i]) == 0)
			d = i;
	if (d < 0)
		return fail(err, cap, MOE_ERR_WEIGHTS, "%s: tensor '%s': unknown dtype '%s'", p, nm,
			    dt->valuestring);
	t->dtype = (enum moe_st_dtype)d;

	const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
	if (!sh)
		return fail(err, cap, MOE_ERR_WEIGHTS, "%s: tensor '%s': missing shape", p, nm);
	if (!cJSON_IsArray(sh))
		return fail(err, cap, MOE_ERR_WEIGHTS, "%s: tensor '%s': shape is not an array", p,
			    nm);
	int nd = cJSON_GetArraySize(sh);
	if (nd > MOE_ST_MAX_DIMS)
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: tensor '%s': shape has %d dimensions (at most %d)", p, nm, nd,
			    MOE_ST_MAX_DIMS);
	t->ndim = (uint32_t)nd;
	for (int i = 0; i < nd; i++)
		if (json_uint(cJSON_GetArrayItem(sh, i), &t->shape[i]))
			return fail(err, cap, MOE_ERR_WEIGHTS,
				    "%s: tensor '%s': shape[%d] is not a non-negative integer", p,
				    nm, i);
	uint64_t numel, bytes;
	char ss[160];
	shape_str(t, ss, sizeof ss);
	if (tensor_size(t, &numel, &bytes))
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: tensor '%s': shape %s is too large (size overflows)", p, nm, ss);
	t->numel = numel;
	t->bytes = (size_t)bytes;

	const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
	if (!off)
		return fail(err, cap, MOE_ERR_WEIGHTS, "%s: tensor '%s': missing data_offsets", p,
			    nm);
	uint64_t b, en;
	if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
	    json_uint(cJSON_GetArrayItem(off, 0), &b) || json_uint(cJSON_GetArrayItem(off, 1), &en))
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: tensor '%s': data_offsets must be [begin, end], two non-negative "
			    "integers",
			    p, nm);
	if (b > en)
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: tensor '%s': data_offsets [%llu, %llu] end before they begin", p,
			    nm, (unsigned long long)b, (unsigned long long)en);
	if (en > f->data_size)
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: tensor '%s': data_offsets [%llu, %llu] exceed the data size %llu "
			    "(truncated file?)",
			    p, nm, (unsigned long long)b, (unsigned long long)en,
			    (unsigned long long)f->data_size);
	if (en - b != bytes)
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes, but %s "
			    "%s needs %llu",
			    p, nm, (unsigned long long)b, (unsigned long long)en,
			    (unsigned long long)(en - b), moe_st_dtype_names[t->dtype], ss,
			    (unsigned long long)bytes);
	t->offset = b;
	t->src = f;
	return MOE_OK;
}

static enum moe_status parse_header(struct moe_st_file *f, const char *json, size_t len, char *err,
				    size_t cap)
{
	const char *end = NULL;
	cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
	if (!root) {
		size_t at = end && end >= json && end <= json + len ? (size_t)(end - json) : 0;
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: header is not valid JSON (near byte %zu)", f->path, at);
	}
	enum moe_status st = MOE_OK;
	for (const char *q = end; q < json + len; q++)
		if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r' && *q != '\0') {
			st = fail(err, cap, MOE_ERR_WEIGHTS,
				  "%s: header has trailing bytes after the JSON object (byte %zu)",
				  f->path, (size_t)(q - json));
			goto out;
		}
	if (!cJSON_IsObject(root)) {
		st = fail(err, cap, MOE_ERR_WEIGHTS, "%s: header is not a JSON object", f->path);
		goto out;
	}
	size_t n = (size_t)cJSON_GetArraySize(root);
	f->t = calloc(n ? n : 1, sizeof *f->t);
	if (!f->t) {
		st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", f->path);
		goto out;
	}
	const cJSON *e;
	cJSON_ArrayForEach(e, root)
	{
		if (strcmp(e->string, "__metadata__") == 0) {
			if (f->meta) {
				st = fail(err, cap, MOE_ERR_WEIGHTS,
					  "%s: __metadata__ appears twice in the header", f->path);
				goto out;
			}
			if ((st = parse_metadata(f, e, err, cap)) != MOE_OK)
				goto out;
			continue;
		}
		struct moe_st_tensor *t = &f->t[f->n];
		t->name = strdup(e->string);
		if (!t->name) {
			st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", f->path);
			goto out;
		}
		f->n++;
		t->file = f->path;
		if ((st = parse_entry(f, e, t, err, cap)) != MOE_OK)
			goto out;
	}
	qsort(f->t, f->n, sizeof *f->t, by_name);
	for (size_t i = 1; i < f->n; i++)
		if (strcmp(f->t[i - 1].name, f->t[i].name) == 0) {
			st = fail(err, cap, MOE_ERR_WEIGHTS,
				  "%s: tensor '%s': appears twice in the header", f->path,
				  f->t[i].name);
			goto out;
		}

	/* Overlap: sorted by start, each range must begin at or after the end of
	 * the ranges before it. Empty ranges overlap nothing. */
	const struct moe_st_tensor **by = malloc((f->n ? f->n : 1) * sizeof *by);
	if (!by) {
		st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", f->path);
		goto out;
	}
	size_t m = 0;
	for (size_t i = 0; i < f->n; i++)
		if (f->t[i].bytes)
			by[m++] = &f->t[i];
	qsort(by, m, sizeof *by, by_begin);
	for (size_t i = 1; i < m; i++) {
		const struct moe_st_tensor *a = by[i - 1], *b = by[i];
		if (b->offset < a->offset + a->bytes) {
			unsigned long long ab = (unsigned long long)a->offset;
			unsigned long long bb = (unsigned long long)b->offset;
			st = fail(err, cap, MOE_ERR_WEIGHTS,
				  "%s: tensor '%s': data_offsets [%llu, %llu] overlap tensor '%s' "
				  "[%llu, %llu]",
				  f->path, b->name, bb, bb + b->bytes, a->name, ab, ab + a->bytes);
			break;
		}
	}
	free(by);
out:
	cJSON_Delete(root);
	return st;
}

/* Open path for reading without blocking (a FIFO with no writer must not
 * hang), close-on-exec, and only if it is a regular file. */
static enum moe_status open_regular(const char *path, int *fd_out, struct stat *sb, char *err,
				    size_t cap)
{
	int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return fail(err, cap, MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
	if (fstat(fd, sb) != 0) {
		int e = errno;
		close(fd);
		return fail(err, cap, MOE_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
	}
	if (!S_ISREG(sb->st_mode)) {
		close(fd);
		return fail(err, cap, MOE_ERR_IO, "%s: not a regular file", path);
	}
	/* regular files never block; clear the flag for ordinary reads */
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0)
		(void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
	*fd_out = fd;
	return MOE_OK;
}

/* Read exactly n bytes at off. 0, or -1 with errno (0 when the file ended
 * first: it shrank, or lied about its size). */
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

enum moe_status moe_st_open(const char *path, struct moe_st_file **out, char *err, size_t cap)
{
	if (!out)
		return fail(err, cap, MOE_ERR_ARG, "moe_st_open: out is NULL");
	*out = NULL;
	if (!path)
		return fail(err, cap, MOE_ERR_ARG, "moe_st_open: path is NULL");
	struct moe_st_file *f = calloc(1, sizeof *f);
	if (!f || !(f->path = strdup(path))) {
		free(f);
		return fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", path);
	}
	f->fd = -1;
	char *json = NULL;
	struct stat sb;
	enum moe_status st = open_regular(path, &f->fd, &sb, err, cap);
	if (st != MOE_OK)
		goto bad;
	f->dev = sb.st_dev;
	f->ino = sb.st_ino;
	uint64_t size = (uint64_t)sb.st_size;
	if (size < 8) {
		st = fail(err, cap, MOE_ERR_WEIGHTS,
			  "%s: file is %llu bytes, too short for the 8-byte header length "
			  "(truncated file?)",
			  path, (unsigned long long)size);
		goto bad;
	}
	unsigned char b[8];
	if (pread_full(f->fd, b, 8, 0) != 0) {
		st = fail(err, cap, MOE_ERR_WEIGHTS, "%s: cannot read the header length: %s", path,
			  errno ? strerror(errno) : "the file ended (truncated?)");
		goto bad;
	}
	uint64_t hlen = 0;
	for (int i = 7; i >= 0; i--)
		hlen = hlen << 8 | b[i];
	/* hlen is whatever the first 8 bytes hold: never print it (the file may
	 * not be a checkpoint at all) */
	if (hlen > MOE_ST_MAX_HEADER || hlen > size - 8) {
		st = fail(err, cap, MOE_ERR_WEIGHTS,
			  "%s: not a safetensors file (bad header length for a file of %llu "
			  "bytes; truncated?)",
			  path, (unsigned long long)size);
		goto bad;
	}
	json = malloc((size_t)hlen + 1);
	if (!json) {
		st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", path);
		goto bad;
	}
	if (pread_full(f->fd, json, (size_t)hlen, 8) != 0) {
		st = fail(err, cap, MOE_ERR_WEIGHTS, "%s: cannot read the header: %s", path,
			  errno ? strerror(errno) : "the file ended (truncated?)");
		goto bad;
	}
	json[hlen] = 0;
	f->data_pos = 8 + hlen;
	f->data_size = size - 8 - hlen;
	if ((st = parse_header(f, json, (size_t)hlen, err, cap)) != MOE_OK)
		goto bad;
	free(json);
	*out = f;
	return MOE_OK;
bad:
	free(json);
	moe_st_close(f);
	return st;
}

enum moe_status moe_st_read_bytes(const struct moe_st_tensor *t, void *dst, char *err, size_t cap)
{
	if (!t || (!dst && t->bytes))
		return fail(err, cap, MOE_ERR_ARG, "moe_st_read_bytes: NULL argument");
	if (!t->bytes)
		return MOE_OK;
	if (!t->src) {
		if (!t->data)
			return fail(err, cap, MOE_ERR_ARG, "tensor '%s': no data", t->name);
		memcpy(dst, t->data, t->bytes);
		return MOE_OK;
	}
	const struct moe_st_file *f = t->src;
	if (pread_full(f->fd, dst, t->bytes, f->data_pos + t->offset) != 0)
		return fail(err, cap, errno ? MOE_ERR_IO : MOE_ERR_WEIGHTS,
			    "%s: tensor '%s': cannot read %zu bytes at offset %llu: %s", f->path,
			    t->name, t->bytes, (unsigned long long)(f->data_pos + t->offset),
			    errno ? strerror(errno) : "the file ended (truncated while loading?)");
	return MOE_OK;
}

const char *moe_st_path(const struct moe_st_file *f)
{
	return f->path;
}

size_t moe_st_count(const struct moe_st_file *f)
{
	return f ? f->n : 0;
}

const struct moe_st_tensor *moe_st_at(const struct moe_st_file *f, size_t i)
{
	return f && i < f->n ? &f->t[i] : NULL;
}

const struct moe_st_tensor *moe_st_find(const struct moe_st_file *f, const char *name)
{
	if (!f || !name)
		return NULL;
	struct moe_st_tensor key = {.name = name};
	return bsearch(&key, f->t, f->n, sizeof *f->t, by_name);
}

const char *moe_st_metadata(const struct moe_st_file *f, const char *key)
{
	if (!f || !key)
		return NULL;
	for (size_t i = 0; i < f->n_meta; i++)
		if (strcmp(f->meta[i].key, key) == 0)
			return f->meta[i].value;
	return NULL;
}

/* Sets -------------------------------------------------------------------- */

static int ends_with(const char *s, const char *suffix)
{
	size_t a = strlen(s), b = strlen(suffix);
	return a >= b && strcmp(s + a - b, suffix) == 0;
}

static enum moe_status set_add(struct moe_st_set *s, struct moe_st_file *f, char *err, size_t cap)
{
	struct moe_st_file **nf = realloc(s->files, (s->n_files + 1) * sizeof *nf);
	if (!nf) {
		fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", moe_st_path(f));
		moe_st_close(f);
		return MOE_ERR_NOMEM;
	}
	s->files = nf;
	s->files[s->n_files++] = f;
	return MOE_OK;
}

/* The open file that is path (same device and inode), or NULL. */
static struct moe_st_file *set_file(const struct moe_st_set *s, const char *path)
{
	struct stat sb;
	if (stat(path, &sb) != 0)
		return NULL;
	for (size_t i = 0; i < s->n_files; i++)
		if (s->files[i]->dev == sb.st_dev && s->files[i]->ino == sb.st_ino)
			return s->files[i];
	return NULL;
}

static char *read_small_file(const char *path, size_t *len, char *err, size_t cap,
			     enum moe_status *st)
{
	int fd;
	struct stat sb;
	if ((*st = open_regular(path, &fd, &sb, err, cap)) != MOE_OK)
		return NULL;
	if ((uint64_t)sb.st_size > MOE_ST_MAX_HEADER) {
		*st = fail(err, cap, MOE_ERR_WEIGHTS, "%s: index file larger than %u bytes", path,
			   MOE_ST_MAX_HEADER);
		close(fd);
		return NULL;
	}
	size_t n = (size_t)sb.st_size;
	char *buf = malloc(n + 1);
	if (!buf) {
		*st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", path);
		close(fd);
		return NULL;
	}
	if (pread_full(fd, buf, n, 0) != 0) {
		*st = fail(err, cap, errno ? MOE_ERR_IO : MOE_ERR_WEIGHTS, "%s: read error: %s",
			   path, errno ? strerror(errno) : "the file ended (truncated?)");
		close(fd);
		free(buf);
		return NULL;
	}
	close(fd);
	buf[n] = 0;
	*len = n;
	return buf;
}

/* Check a shard name of an index whose directory is dir (realpath'd):
 * relative, no ".." component, and its resolved path inside dir. Returns
 * NULL (message in err) or the path to open, malloc'd. */
static char *confine(const char *index, const char *dir, const char *shard, const char *tensor,
		     char *err, size_t cap, enum moe_status *st)
{
	*st = MOE_ERR_WEIGHTS;
	if (shard[0] == '/') {
		fail(err, cap, *st,
		     "%s: tensor '%s': shard '%s' is an absolute path (shards must "
		     "be inside the index's directory)",
		     index, tensor, shard);
		return NULL;
	}
	for (const char *p = shard; *p;) {
		size_t k = strcspn(p, "/");
		if (k == 2 && p[0] == '.' && p[1] == '.') {
			fail(err, cap, *st,
			     "%s: tensor '%s': shard '%s' has a '..' component (shards must be "
			     "inside the index's directory)",
			     index, tensor, shard);
			return NULL;
		}
		p += k;
		while (*p == '/')
			p++;
	}
	size_t need = strlen(dir) + strlen(shard) + 2;
	char *full = malloc(need);
	if (!full) {
		*st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", index);
		return NULL;
	}
	snprintf(full, need, "%s/%s", dir, shard);
	char *real = realpath(full, NULL);
	if (!real) {
		*st = fail(err, cap, MOE_ERR_IO, "%s: tensor '%s': shard '%s': cannot open: %s",
			   index, tensor, shard, strerror(errno));
		free(full);
		return NULL;
	}
	size_t dl = strlen(dir);
	int inside = strncmp(real, dir, dl) == 0 && (real[dl] == '/' || dl == 1);
	free(real);
	if (!inside) {
		fail(err, cap, *st,
		     "%s: tensor '%s': shard '%s' resolves outside the index's directory "
		     "(through a symbolic link)",
		     index, tensor, shard);
		free(full);
		return NULL;
	}
	*st = MOE_OK;
	return full;
}

static enum moe_status open_index(struct moe_st_set *s, const char *path, char *err, size_t cap)
{
	enum moe_status st = MOE_OK;
	size_t len;
	char *text = read_small_file(path, &len, err, cap, &st);
	if (!text)
		return st;
	cJSON *root = cJSON_ParseWithLength(text, len);
	free(text);
	if (!root)
		return fail(err, cap, MOE_ERR_WEIGHTS, "%s: not valid JSON", path);
	char *dir = NULL;
	const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
	if (!cJSON_IsObject(root) || !cJSON_IsObject(wm)) {
		st = fail(err, cap, MOE_ERR_WEIGHTS, "%s: no \"weight_map\" object", path);
		goto out;
	}
	/* Shard names are relative to the index's directory, resolved. */
	{
		const char *slash = strrchr(path, '/');
		char *d = slash ? strndup(path, (size_t)(slash - path) + 1) : strdup(".");
		dir = d ? realpath(d, NULL) : NULL;
		if (!dir) {
			st = fail(err, cap, d ? MOE_ERR_IO : MOE_ERR_NOMEM,
				  "%s: cannot resolve its directory: %s", path, strerror(errno));
			free(d);
			goto out;
		}
		free(d);
	}
	const cJSON *e;
	cJSON_ArrayForEach(e, wm)
	{
		if (!cJSON_IsString(e) || !e->valuestring[0]) {
			st = fail(err, cap, MOE_ERR_WEIGHTS,
				  "%s: tensor '%s': weight_map value is not a file name", path,
				  e->string);
			goto out;
		}
		const char *shard = e->valuestring;
		char *full = confine(path, dir, shard, e->string, err, cap, &st);
		if (!full)
			goto out;
		struct moe_st_file *f = set_file(s, full);
		if (!f) {
			char inner[512];
			st = moe_st_open(full, &f, inner, sizeof inner);
			if (st != MOE_OK) {
				fail(err, cap, st, "%s: tensor '%s': shard '%s': %s", path,
				     e->string, shard, inner);
				free(full);
				goto out;
			}
			if ((st = set_add(s, f, err, cap)) != MOE_OK) {
				free(full);
				goto out;
			}
		}
		free(full);
		if (!moe_st_find(f, e->string)) {
			st = fail(err, cap, MOE_ERR_WEIGHTS,
				  "%s: tensor '%s': listed in shard '%s' but missing from %s", path,
				  e->string, shard, moe_st_path(f));
			goto out;
		}
	}
out:
	free(dir);
	cJSON_Delete(root);
	return st;
}

static int by_name_ptr(const void *a, const void *b)
{
	return strcmp((*(const struct moe_st_tensor *const *)a)->name,
		      (*(const struct moe_st_tensor *const *)b)->name);
}

void moe_st_set_close(struct moe_st_set *s)
{
	if (!s)
		return;
	for (size_t i = 0; i < s->n_files; i++)
		moe_st_close(s->files[i]);
	free(s->files);
	free(s->t);
	free(s);
}

enum moe_status moe_st_set_open(const char *const *paths, size_t n, struct moe_st_set **out,
				char *err, size_t cap)
{
	if (!out)
		return fail(err, cap, MOE_ERR_ARG, "moe_st_set_open: out is NULL");
	*out = NULL;
	if (!paths && n)
		return fail(err, cap, MOE_ERR_ARG, "moe_st_set_open: paths is NULL");
	struct moe_st_set *s = calloc(1, sizeof *s);
	if (!s)
		return fail(err, cap, MOE_ERR_NOMEM, "out of memory");
	enum moe_status st = MOE_OK;
	for (size_t i = 0; i < n; i++) {
		if (!paths[i]) {
			st = fail(err, cap, MOE_ERR_ARG, "moe_st_set_open: paths[%zu] is NULL", i);
			goto bad;
		}
		if (ends_with(paths[i], ".index.json")) {
			if ((st = open_index(s, paths[i], err, cap)) != MOE_OK)
				goto bad;
			continue;
		}
		if (set_file(s, paths[i]))
			continue; /* the same file named twice */
		struct moe_st_file *f;
		if ((st = moe_st_open(paths[i], &f, err, cap)) != MOE_OK)
			goto bad;
		if ((st = set_add(s, f, err, cap)) != MOE_OK)
			goto bad;
	}
	size_t total = 0;
	for (size_t i = 0; i < s->n_files; i++)
		total += s->files[i]->n;
	s->t = malloc((total ? total : 1) * sizeof *s->t);
	if (!s->t) {
		st = fail(err, cap, MOE_ERR_NOMEM, "out of memory");
		goto bad;
	}
	for (size_t i = 0; i < s->n_files; i++)
		for (size_t j = 0; j < s->files[i]->n; j++)
			s->t[s->n++] = &s->files[i]->t[j];
	qsort(s->t, s->n, sizeof *s->t, by_name_ptr);
	for (size_t i = 1; i < s->n; i++)
		if (strcmp(s->t[i - 1]->name, s->t[i]->name) == 0) {
			st = fail(err, cap, MOE_ERR_WEIGHTS, "tensor '%s': found in both %s and %s",
				  s->t[i]->name, s->t[i - 1]->file, s->t[i]->file);
			goto bad;
		}
	*out = s;
	return MOE_OK;
bad:
	moe_st_set_close(s);
	return st;
}

const struct moe_st_tensor *moe_st_set_find(const struct moe_st_set *s, const char *name)
{
	if (!s || !name)
		return NULL;
	struct moe_st_tensor key = {.name = name};
	const struct moe_st_tensor *kp = &key;
	const struct moe_st_tensor *const *r = bsearch(&kp, s->t, s->n, sizeof *s->t, by_name_ptr);
	return r ? *r : NULL;
}

size_t moe_st_set_count(const struct moe_st_set *s)
{
	return s ? s->n : 0;
}

const struct moe_st_tensor *moe_st_set_at(const struct moe_st_set *s, size_t i)
{
	return s && i < s->n ? s->t[i] : NULL;
}

/* Conversion -------------------------------------------------------------- */

static float bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof f);
	return f;
}

static float f16_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
	if (e == 0x1f) /* inf, NaN (payload kept) */
		return bits_f32(sign | 0x7f800000u | m << 13);
	if (e == 0) { /* zero, subnormal: m * 2^-24, exact in f32 */
		float v = (float)m * 0x1p-24f;
		return sign ? -v : v;
	}
	return bits_f32(sign | (e + 112) << 23 | m << 13);
}

static float e4m3_f32(uint8_t b)
{
	/* e4m3fn: bias 7, no infinities, S.1111.111 is NaN. */
	uint32_t e = (b >> 3) & 0xf, m = b & 7;
	float v;
	if (e == 0xf && m == 7)
		return bits_f32(b & 0x80 ? 0xffc00000u : 0x7fc00000u);
	if (e == 0)
		v = (float)m * 0x1p-9f;
	else
		v = bits_f32((e + 120) << 23 | m << 20);
	return b & 0x80 ? -v : v;
}

static uint16_t rd16(const unsigned char *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t rd32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

enum moe_status moe_st_convert_f32(enum moe_st_dtype dt, const void *src, size_t n, float *dst)
{
	const unsigned char *p = src;
	switch (dt) {
	case MOE_ST_F32:
		for (size_t i = 0; i < n; i++)
			dst[i] = bits_f32(rd32(p + 4 * i));
		return MOE_OK;
	case MOE_ST_BF16:
		for (size_t i = 0; i < n; i++)
			dst[i] = bits_f32((uint32_t)rd16(p + 2 * i) << 16);
		return MOE_OK;
	case MOE_ST_F16:
		for (size_t i = 0; i < n; i++)
			dst[i] = f16_f32(rd16(p + 2 * i));
		return MOE_OK;
	case MOE_ST_F64:
		for (size_t i = 0; i < n; i++) {
			uint64_t u = (uint64_t)rd32(p + 8 * i) | (uint64_t)rd32(p + 8 * i + 4)
								     << 32;
			double d;
			memcpy(&d, &u, sizeof d);
			dst[i] = (float)d;
		}
		return MOE_OK;
	case MOE_ST_F8_E4M3: {
		float lut[256];
		for (int i = 0; i < 256; i++)
			lut[i] = e4m3_f32((uint8_t)i);
		for (size_t i = 0; i < n; i++)
			dst[i] = lut[p[i]];
		return MOE_OK;
	}
	case MOE_ST_F8_E5M2: /* the upper byte of an f16 */
		for (size_t i = 0; i < n; i++)
			dst[i] = f16_f32((uint16_t)(p[i] << 8));
		return MOE_OK;
	default:
		return MOE_ERR_WEIGHTS;
	}
}

enum moe_status moe_st_read_f32(const struct moe_st_tensor *t, float *dst, size_t n, char *err,
				size_t cap)
{
	if (!t || (!dst && n))
		return fail(err, cap, MOE_ERR_ARG, "moe_st_read_f32: NULL argument");
	const char *file = t->file ? t->file : "(memory)";
	if (n != t->numel)
		return fail(err, cap, MOE_ERR_ARG,
			    "%s: tensor '%s': has %llu elements, the destination holds %zu", file,
			    t->name, (unsigned long long)t->numel, n);
	if (moe_st_convert_f32(t->dtype, NULL, 0, NULL) != MOE_OK)
		return fail(err, cap, MOE_ERR_WEIGHTS,
			    "%s: tensor '%s': dtype %s cannot be converted to f32", file, t->name,
			    moe_st_dtype_names[t->dtype]);
	if (!t->src)
		return moe_st_convert_f32(t->dtype, t->data, n, dst);
	/* from the file, a bounded piece at a time */
	size_t es = moe_st_dtype_sizes[t->dtype], chunk = ((size_t)1 << 20) / es;
	unsigned char *buf = malloc((n < chunk ? n : chunk) * es + 1);
	if (!buf)
		return fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", file);
	struct moe_st_tensor piece = *t;
	enum moe_status st = MOE_OK;
	for (size_t i = 0; i < n && st == MOE_OK; i += chunk) {
		size_t k = n - i < chunk ? n - i : chunk;
		piece.offset = t->offset + (uint64_t)i * es;
		piece.bytes = k * es;
		st = moe_st_read_bytes(&piece, buf, err, cap);
		if (st == MOE_OK)
			moe_st_convert_f32(t->dtype, buf, k, dst + i);
	}
	free(buf);
	return st;
}

/* Templates --------------------------------------------------------------- */

enum moe_status moe_st_expand(const char *tmpl, long layer, long expert, char *out, size_t out_cap,
			      char *err, size_t err_cap)
{
	if (!tmpl || !out || !out_cap)
		return fail(err, err_cap, MOE_ERR_ARG, "moe_st_expand: NULL argument");
	size_t len = 0;
	for (const char *p = tmpl; *p;) {
		char num[32];
		const char *piece = p;
		size_t plen = 1;
		if (*p == '{') {
			const char *close = strchr(p, '}');
			if (!close)
				return fail(err, err_cap, MOE_ERR_ARG,
					    "name template '%s': unterminated '{'", tmpl);
			size_t klen = (size_t)(close - p - 1);
			long v;
			if (klen == 5 && strncmp(p + 1, "layer", 5) == 0)
				v = layer;
			else if (klen == 6 && strncmp(p + 1, "expert", 6) == 0)
				v = expert;
			else
				return fail(err, err_cap, MOE_ERR_ARG,
					    "name template '%s': unknown key '{%.*s}' (known: "
					    "{layer}, {expert})",
					    tmpl, (int)klen, p + 1);
			if (v < 0)
				return fail(err, err_cap, MOE_ERR_ARG,
					    "name template '%s': '{%.*s}' has no value here", tmpl,
					    (int)klen, p + 1);
			plen = (size_t)snprintf(num, sizeof num, "%ld", v);
			piece = num;
			p = close + 1;
		} else {
			p++;
		}
		if (len + plen >= out_cap)
			return fail(err, err_cap, MOE_ERR_ARG,
				    "name template '%s': the name exceeds %zu bytes", tmpl,
				    out_cap - 1);
		memcpy(out + len, piece, plen);
		len += plen;
	}
	out[len] = 0;
	return MOE_OK;
}

/* Writer ------------------------------------------------------------------ */

static int by_name_idx(const void *a, const void *b)
{
	return by_name_ptr(a, b);
}

static int write_all(FILE *fp, const void *p, size_t n)
{
	return n == 0 || fwrite(p, 1, n, fp) == n;
}

enum moe_status moe_st_write(const char *path, const struct moe_st_tensor *tensors, size_t n,
			     char *err, size_t cap)
{
	if (!path || (!tensors && n))
		return fail(err, cap, MOE_ERR_ARG, "moe_st_write: NULL argument");
	enum moe_status st = MOE_OK;
	const struct moe_st_tensor **ord = malloc((n ? n : 1) * sizeof *ord);
	uint64_t *bytes = malloc((n ? n : 1) * sizeof *bytes);
	cJSON *root = cJSON_CreateObject();
	char *json = NULL, *tmp = NULL;
	FILE *fp = NULL;
	if (!ord || !bytes || !root) {
		st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", path);
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		const struct moe_st_tensor *t = &tensors[i];
		uint64_t numel;
		if (!t->name || (unsigned)t->dtype >= MOE_ST_DTYPE_COUNT ||
		    t->ndim > MOE_ST_MAX_DIMS) {
			st = fail(err, cap, MOE_ERR_ARG, "%s: tensor %zu: bad name, dtype or rank",
				  path, i);
			goto out;
		}
		if (tensor_size(t, &numel, &bytes[i]) || (t->bytes && t->bytes != bytes[i]) ||
		    (bytes[i] && !t->data)) {
			st = fail(err, cap, MOE_ERR_ARG,
				  "%s: tensor '%s': size does not match its shape, or no data",
				  path, t->name);
			goto out;
		}
		ord[i] = t;
	}
	qsort(ord, n, sizeof *ord, by_name_idx);
	for (size_t i = 1; i < n; i++)
		if (strcmp(ord[i - 1]->name, ord[i]->name) == 0) {
			st = fail(err, cap, MOE_ERR_ARG, "%s: tensor '%s': given twice", path,
				  ord[i]->name);
			goto out;
		}
	cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
	if (!meta || !cJSON_AddStringToObject(meta, "format", "pt")) {
		st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", path);
		goto out;
	}
	uint64_t off = 0;
	for (size_t i = 0; i < n; i++) {
		const struct moe_st_tensor *t = ord[i];
		uint64_t sz = bytes[t - tensors];
		off = (off + 7) & ~(uint64_t)7;
		cJSON *e = cJSON_AddObjectToObject(root, t->name);
		cJSON *sh = e ? cJSON_AddArrayToObject(e, "shape") : NULL;
		cJSON *of = sh ? cJSON_AddArrayToObject(e, "data_offsets") : NULL;
		int ok = of && cJSON_AddStringToObject(e, "dtype", moe_st_dtype_names[t->dtype]);
		for (uint32_t d = 0; ok && d < t->ndim; d++)
			ok = cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t->shape[d]));
		ok = ok && cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off)) &&
		     cJSON_AddItemToArray(of, cJSON_CreateNumber((double)(off + sz)));
		if (!ok) {
			st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", path);
			goto out;
		}
		off += sz;
	}
	json = cJSON_PrintUnformatted(root);
	if (!json) {
		st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", path);
		goto out;
	}
	size_t jl = strlen(json), hl = (jl + 7) & ~(size_t)7;
	size_t tl = strlen(path) + 32;
	tmp = malloc(tl);
	if (!tmp) {
		st = fail(err, cap, MOE_ERR_NOMEM, "%s: out of memory", path);
		goto out;
	}
	snprintf(tmp, tl, "%s.tmp%ld", path, (long)getpid());
	fp = fopen(tmp, "wb");
	if (!fp) {
		st = fail(err, cap, MOE_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
		goto out;
	}
	unsigned char hdr[8];
	for (int i = 0; i < 8; i++)
		hdr[i] = (unsigned char)((uint64_t)hl >> (8 * i));
	static const char pad[8] = "        ";
	static const char zeros[8];
	int ok = write_all(fp, hdr, 8) && write_all(fp, json, jl) && write_all(fp, pad, hl - jl);
	/* Padding goes only before a tensor that would start unaligned, never after
	 * the last one: strict readers require the data to end with the file. */
	off = 0;
	for (size_t i = 0; ok && i < n; i++) {
		const struct moe_st_tensor *t = ord[i];
		uint64_t sz = bytes[t - tensors];
		uint64_t start = (off + 7) & ~(uint64_t)7;
		ok = write_all(fp, zeros, (size_t)(start - off)) &&
		     write_all(fp, t->data, (size_t)sz);
		off = start + sz;
	}
	int closed = fclose(fp) == 0;
	fp = NULL;
	if (!ok || !closed) {
		st = fail(err, cap, MOE_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
		unlink(tmp);
		goto out;
	}
	if (rename(tmp, path) != 0) {
		st = fail(err, cap, MOE_ERR_IO, "%s: cannot rename from %s: %s", path, tmp,
			  strerror(errno));
		unlink(tmp);
	}
out:
	if (fp)
		fclose(fp);
	free(tmp);
	free(json);
	cJSON_Delete(root);
	free(bytes);
	free(ord);
	return st;
}
