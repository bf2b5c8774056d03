/* test_safetensors.c: the checkpoint reader and writer: round trips per dtype,
 * every malformed-file error (message names the file and the tensor), sharded
 * sets, name templates, and the f16/bf16/f8 decoders against formulas. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"

static char dir[64];
static char errbuf[1024];

static int setup(void **state)
{
	(void)state;
	snprintf(dir, sizeof dir, "/tmp/moe_st_XXXXXX");
	return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
	(void)state;
	char cmd[128];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	return system(cmd) == 0 ? 0 : -1;
}

static const char *path_of(const char *name)
{
	static char bufs[4][256];
	static int k;
	char *b = bufs[k++ % 4];
	snprintf(b, 256, "%s/%s", dir, name);
	return b;
}

/* A file made of an 8-byte length, the given header text and `data` zero
 * bytes; hlen_override replaces the length field when non-zero. */
static void write_raw(const char *path, const char *header, size_t data, uint64_t hlen_override)
{
	FILE *fp = fopen(path, "wb");
	assert_non_null(fp);
	uint64_t n = hlen_override ? hlen_override : strlen(header);
	unsigned char len[8];
	for (int i = 0; i < 8; i++)
		len[i] = (unsigned char)(n >> (8 * i));
	assert_int_equal(fwrite(len, 1, 8, fp), 8);
	assert_int_equal(fwrite(header, 1, strlen(header), fp), strlen(header));
	for (size_t i = 0; i < data; i++)
		fputc(0, fp);
	assert_int_equal(fclose(fp), 0);
}

static void write_bytes(const char *path, const void *p, size_t n)
{
	FILE *fp = fopen(path, "wb");
	assert_non_null(fp);
	assert_int_equal(fwrite(p, 1, n, fp), n);
	assert_int_equal(fclose(fp), 0);
}

/* Opening path fails with status st and a message holding every given
 * fragment (NULL-terminated list). */
static void expect_open_error(const char *path, enum moe_status st, ...)
{
	struct moe_st_file *f = (struct moe_st_file *)1;
	errbuf[0] = 0;
	enum moe_status got = moe_st_open(path, &f, errbuf, sizeof errbuf);
	if (got == MOE_OK)
		fail_msg("%s: opened, expected an error", path);
	assert_null(f);
	assert_int_equal(got, st);
	if (!strstr(errbuf, path))
		fail_msg("message does not name the file: %s", errbuf);
	va_list ap;
	va_start(ap, st);
	for (const char *frag; (frag = va_arg(ap, const char *));)
		if (!strstr(errbuf, frag))
			fail_msg("message lacks '%s': %s", frag, errbuf);
	va_end(ap);
}

/* Round trips -------------------------------------------------------------- */

static void roundtrip_every_dtype(void **state)
{
	(void)state;
	struct moe_st_tensor t[MOE_ST_DTYPE_COUNT + 2];
	unsigned char *buf[MOE_ST_DTYPE_COUNT];
	char names[MOE_ST_DTYPE_COUNT][32];
	/* Names in reverse dtype order, so that sorting is visible. */
	for (int d = 0; d < MOE_ST_DTYPE_COUNT; d++) {
		size_t es = moe_st_dtype_sizes[d];
		uint64_t rows = 3, cols = (uint64_t)d + 1; /* odd sizes: exercise padding */
		size_t bytes = (size_t)(rows * cols * es);
		buf[d] = malloc(bytes);
		assert_non_null(buf[d]);
		for (size_t i = 0; i < bytes; i++)
			buf[d][i] = (unsigned char)(i * 31 + (size_t)d * 7 + 1);
		snprintf(names[d], sizeof names[d], "t%02d.%s", MOE_ST_DTYPE_COUNT - d,
			 moe_st_dtype_names[d]);
		t[d] = (struct moe_st_tensor){.name = names[d],
					      .dtype = (enum moe_st_dtype)d,
					      .ndim = 2,
					      .shape = {rows, cols},
					      .data = buf[d]};
	}
	static const float scalar = 2.5f;
	t[MOE_ST_DTYPE_COUNT] = (struct moe_st_tensor){
	    .name = "scalar", .dtype = MOE_ST_F32, .ndim = 0, .data = &scalar};
	t[MOE_ST_DTYPE_COUNT + 1] = (struct moe_st_tensor){
	    .name = "empty", .dtype = MOE_ST_BF16, .ndim = 2, .shape = {0, 5}};
	const char *p = path_of("all.safetensors");
	assert_int_equal(moe_st_write(p, t, MOE_ST_DTYPE_COUNT + 2, errbuf, sizeof errbuf), MOE_OK);

	struct moe_st_file *f;
	assert_int_equal(moe_st_open(p, &f, errbuf, sizeof errbuf), MOE_OK);
	assert_int_equal(moe_st_count(f), MOE_ST_DTYPE_COUNT + 2);
	assert_string_equal(moe_st_metadata(f, "format"), "pt");
	assert_null(moe_st_metadata(f, "nope"));
	for (size_t i = 1; i < moe_st_count(f); i++)
		assert_true(strcmp(moe_st_at(f, i - 1)->name, moe_st_at(f, i)->name) < 0);
	size_t total = 0;
	for (int d = 0; d < MOE_ST_DTYPE_COUNT; d++) {
		const struct moe_st_tensor *r = moe_st_find(f, names[d]);
		assert_non_null(r);
		assert_string_equal(r->name, names[d]);
		assert_string_equal(r->file, p);
		assert_int_equal(r->dtype, d);
		assert_int_equal(r->ndim, 2);
		assert_int_equal(r->shape[0], 3);
		assert_int_equal(r->shape[1], d + 1);
		assert_int_equal(r->numel, 3 * (d + 1));
		size_t bytes = (size_t)(3 * (d + 1)) * moe_st_dtype_sizes[d];
		assert_int_equal(r->bytes, bytes);
		assert_null(r->data); /* nothing is read before it is asked for */
		assert_ptr_equal(r->src, f);
		unsigned char *got = malloc(bytes + 1);
		assert_non_null(got);
		assert_int_equal(moe_st_read_bytes(r, got, errbuf, sizeof errbuf), MOE_OK);
		assert_memory_equal(got, buf[d], bytes);
		free(got);
		assert_int_equal(r->offset % 8, 0);
		total += bytes;
	}
	const struct moe_st_tensor *s = moe_st_find(f, "scalar");
	assert_non_null(s);
	assert_int_equal(s->ndim, 0);
	assert_int_equal(s->numel, 1);
	float v;
	assert_int_equal(moe_st_read_f32(s, &v, 1, errbuf, sizeof errbuf), MOE_OK);
	assert_true(v == 2.5f);
	const struct moe_st_tensor *e = moe_st_find(f, "empty");
	assert_non_null(e);
	assert_int_equal(e->numel, 0);
	assert_int_equal(e->bytes, 0);
	assert_null(moe_st_find(f, "missing"));
	assert_null(moe_st_find(f, ""));
	moe_st_close(f);

	/* The data ends with the file: no trailing padding. */
	struct stat sb;
	assert_int_equal(stat(p, &sb), 0);
	FILE *fp = fopen(p, "rb");
	unsigned char len[8];
	assert_int_equal(fread(len, 1, 8, fp), 8);
	fclose(fp);
	uint64_t hl = 0;
	for (int i = 7; i >= 0; i--)
		hl = hl << 8 | len[i];
	assert_int_equal(hl % 8, 0);
	assert_true((uint64_t)sb.st_size >= 8 + hl + total + 4);
	assert_true((uint64_t)sb.st_size < 8 + hl + total + 4 + 8 * (MOE_ST_DTYPE_COUNT + 2));
	for (int d = 0; d < MOE_ST_DTYPE_COUNT; d++)
		free(buf[d]);
}

static uint16_t bf16_bits(float x)
{
	uint32_t u;
	memcpy(&u, &x, 4);
	return (uint16_t)(u >> 16); /* exact for the values used below */
}

static void read_f32_converts(void **state)
{
	(void)state;
	static const float vals[] = {1.0f, -2.0f, 0.5f, 3.5f, -0.0f, 1024.0f};
	enum { N = 6 };
	uint16_t bf[N], hf[N];
	double dd[N];
	/* f16 of these values, by hand: sign | exp+15 << 10 | mantissa. */
	static const uint16_t f16_of[N] = {0x3c00, 0xc000, 0x3800, 0x4300, 0x8000, 0x6400};
	/* e4m3 (bias 7): 1.0 = 0x38, -2.0 = 0xc0, 0.5 = 0x30, 3.5 = 0x46
	 * (2^1 * 1.75 = 0 1000 110), -0 = 0x80, 448 = 0x7e (the largest). */
	static const uint8_t e4m3[N] = {0x38, 0xc0, 0x30, 0x46, 0x80, 0x7e};
	static const float e4m3_vals[N] = {1.0f, -2.0f, 0.5f, 3.5f, -0.0f, 448.0f};
	/* e5m2 is the upper byte of f16 (these values need at most 2 mantissa
	 * bits). */
	uint8_t e5m2[N];
	for (int i = 0; i < N; i++) {
		bf[i] = bf16_bits(vals[i]);
		hf[i] = f16_of[i];
		dd[i] = vals[i];
		e5m2[i] = (uint8_t)(f16_of[i] >> 8);
	}
	int32_t ints[N] = {0};
	struct moe_st_tensor t[] = {
	    {.name = "f32", .dtype = MOE_ST_F32, .ndim = 1, .shape = {N}, .data = vals},
	    {.name = "bf16", .dtype = MOE_ST_BF16, .ndim = 1, .shape = {N}, .data = bf},
	    {.name = "f16", .dtype = MOE_ST_F16, .ndim = 1, .shape = {N}, .data = hf},
	    {.name = "f64", .dtype = MOE_ST_F64, .ndim = 1, .shape = {N}, .data = dd},
	    {.name = "e4m3", .dtype = MOE_ST_F8_E4M3, .ndim = 1, .shape = {N}, .data = e4m3},
	    {.name = "e5m2", .dtype = MOE_ST_F8_E5M2, .ndim = 1, .shape = {N}, .data = e5m2},
	    {.name = "i32", .dtype = MOE_ST_I32, .ndim = 1, .shape = {N}, .data = ints},
	};
	const char *p = path_of("conv.safetensors");
	assert_int_equal(moe_st_write(p, t, 7, errbuf, sizeof errbuf), MOE_OK);
	struct moe_st_file *f;
	assert_int_equal(moe_st_open(p, &f, errbuf, sizeof errbuf), MOE_OK);
	static const char *const same[] = {"f32", "bf16", "f16", "f64", "e5m2"};
	float out[N];
	for (int k = 0; k < 5; k++) {
		const struct moe_st_tensor *r = moe_st_find(f, same[k]);
		assert_non_null(r);
		assert_int_equal(moe_st_read_f32(r, out, N, errbuf, sizeof errbuf), MOE_OK);
		for (int i = 0; i < N; i++) {
			assert_true(out[i] == vals[i]);
			assert_int_equal(!!signbit(out[i]), !!signbit(vals[i]));
		}
	}
	assert_int_equal(moe_st_read_f32(moe_st_find(f, "e4m3"), out, N, errbuf, sizeof errbuf),
			 MOE_OK);
	for (int i = 0; i < N; i++)
		assert_true(out[i] == e4m3_vals[i]);
	/* Integers are not weights; wrong destination sizes are refused. */
	const struct moe_st_tensor *ti = moe_st_find(f, "i32");
	assert_int_equal(moe_st_read_f32(ti, out, N, errbuf, sizeof errbuf), MOE_ERR_WEIGHTS);
	assert_non_null(strstr(errbuf, p));
	assert_non_null(strstr(errbuf, "'i32'"));
	assert_non_null(strstr(errbuf, "I32"));
	assert_int_equal(moe_st_read_f32(moe_st_find(f, "f32"), out, N - 1, errbuf, sizeof errbuf),
			 MOE_ERR_ARG);
	assert_non_null(strstr(errbuf, "'f32'"));
	moe_st_close(f);
}

/* A header whose length is not a multiple of 8 leaves the data unaligned:
 * the reader must still convert it correctly (and without misaligned loads,
 * which the sanitizer build would catch). */
static void unaligned_data(void **state)
{
	(void)state;
	const char *p = path_of("unaligned.safetensors");
	const char *hdr =
	    "{\"v\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 12]},"
	    " \"h\": {\"dtype\": \"F16\", \"shape\": [1], \"data_offsets\": [13, 15]}}";
	size_t hl = strlen(hdr);
	unsigned char buf[512];
	assert_true(hl % 4 != 0 && 8 + hl + 15 < sizeof buf);
	for (int i = 0; i < 8; i++)
		buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
	memcpy(buf + 8, hdr, hl);
	static const float v[3] = {1.5f, -2.25f, 1e-3f};
	memcpy(buf + 8 + hl, v, sizeof v);
	buf[8 + hl + 12] = 0;
	buf[8 + hl + 13] = 0x00; /* f16 0xc000 = -2, little-endian */
	buf[8 + hl + 14] = 0xc0;
	write_bytes(p, buf, 8 + hl + 15);
	struct moe_st_file *f;
	assert_int_equal(moe_st_open(p, &f, errbuf, sizeof errbuf), MOE_OK);
	const struct moe_st_tensor *t = moe_st_find(f, "v");
	assert_non_null(t);
	assert_int_equal(t->offset, 0); /* at file offset 8 + hl, not a multiple of 4 */
	float out[3];
	assert_int_equal(moe_st_read_f32(t, out, 3, errbuf, sizeof errbuf), MOE_OK);
	for (int i = 0; i < 3; i++)
		assert_true(out[i] == v[i]);
	assert_int_equal(moe_st_read_f32(moe_st_find(f, "h"), out, 1, errbuf, sizeof errbuf),
			 MOE_OK);
	assert_true(out[0] == -2.0f);
	moe_st_close(f);
}

/* Decoders, every bit pattern, against the textbook formulas -------------- */

static void f16_all_patterns(void **state)
{
	(void)state;
	for (uint32_t h = 0; h < 65536; h++) {
		uint16_t b = (uint16_t)h;
		float got;
		assert_int_equal(moe_st_convert_f32(MOE_ST_F16, &b, 1, &got), MOE_OK);
		int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
		double want;
		if (e == 31) {
			if (m) {
				assert_true(isnan(got));
				continue;
			}
			want = INFINITY;
		} else if (e == 0) {
			want = ldexp(m, -24);
		} else {
			want = ldexp(1024 + m, e - 25);
		}
		if (s)
			want = -want;
		if ((double)got != want || !!signbit(got) != s)
			fail_msg("f16 0x%04x: got %g want %g", h, (double)got, want);
	}
	/* Named cases. */
	static const uint16_t bits[] = {0x3c00, 0x7bff, 0x0001, 0x0400, 0xfc00, 0x8000};
	static const double want[] = {1.0, 65504.0, 0x1p-24, 0x1p-14, -INFINITY, -0.0};
	for (int i = 0; i < 6; i++) {
		float got;
		moe_st_convert_f32(MOE_ST_F16, &bits[i], 1, &got);
		assert_true((double)got == want[i]);
	}
}

static void bf16_all_patterns(void **state)
{
	(void)state;
	for (uint32_t h = 0; h < 65536; h++) {
		uint16_t b = (uint16_t)h;
		float got;
		assert_int_equal(moe_st_convert_f32(MOE_ST_BF16, &b, 1, &got), MOE_OK);
		int s = h >> 15, e = (h >> 7) & 255, m = h & 127;
		double want;
		if (e == 255) {
			if (m) {
				assert_true(isnan(got));
				continue;
			}
			want = INFINITY;
		} else if (e == 0) {
			want = ldexp(m, -126 - 7);
		} else {
			want = ldexp(128 + m, e - 127 - 7);
		}
		if (s)
			want = -want;
		if ((double)got != want || !!signbit(got) != s)
			fail_msg("bf16 0x%04x: got %g want %g", h, (double)got, want);
	}
}

static void e4m3_all_patterns(void **state)
{
	(void)state;
	for (uint32_t h = 0; h < 256; h++) {
		uint8_t b = (uint8_t)h;
		float got;
		assert_int_equal(moe_st_convert_f32(MOE_ST_F8_E4M3, &b, 1, &got), MOE_OK);
		int s = h >> 7, e = (h >> 3) & 15, m = h & 7;
		if (e == 15 && m == 7) { /* 0x7f, 0xff: the only NaNs, no infinities */
			assert_true(isnan(got));
			continue;
		}
		double want = e == 0 ? ldexp(m, -6 - 3) : ldexp(8 + m, e - 7 - 3);
		if (s)
			want = -want;
		if ((double)got != want || !!signbit(got) != s)
			fail_msg("e4m3 0x%02x: got %g want %g", h, (double)got, want);
		assert_false(isinf(got));
	}
	static const uint8_t bits[] = {0x7e, 0x01, 0x08, 0x07, 0xfe, 0x78};
	static const double want[] = {448.0, 0x1p-9, 0x1p-6, 7 * 0x1p-9, -448.0, 256.0};
	for (int i = 0; i < 6; i++) {
		float got;
		moe_st_convert_f32(MOE_ST_F8_E4M3, &bits[i], 1, &got);
		assert_true((double)got == want[i]);
	}
}

static void e5m2_all_patterns(void **state)
{
	(void)state;
	for (uint32_t h = 0; h < 256; h++) {
		uint8_t b = (uint8_t)h;
		float got;
		assert_int_equal(moe_st_convert_f32(MOE_ST_F8_E5M2, &b, 1, &got), MOE_OK);
		int s = h >> 7, e = (h >> 2) & 31, m = h & 3;
		double want;
		if (e == 31) {
			if (m) {
				assert_true(isnan(got));
				continue;
			}
			want = INFINITY;
		} else {
			want = e == 0 ? ldexp(m, -14 - 2) : ldexp(4 + m, e - 15 - 2);
		}
		if (s)
			want = -want;
		if ((double)got != want)
			fail_msg("e5m2 0x%02x: got %g want %g", h, (double)got, want);
	}
}

/* Malformed files ----------------------------------------------------------- */

static void err_short_file(void **state)
{
	(void)state;
	const char *p = path_of("short.safetensors");
	write_bytes(p, "\x10\0\0", 3);
	expect_open_error(p, MOE_ERR_WEIGHTS, "too short", NULL);
	write_bytes(p, "", 0);
	expect_open_error(p, MOE_ERR_WEIGHTS, "too short", NULL);
}

static void err_header_beyond_file(void **state)
{
	(void)state;
	const char *p = path_of("beyond.safetensors");
	write_raw(p, "{}", 40, 1000);
	/* the length field is file content: the message states the file size only */
	expect_open_error(p, MOE_ERR_WEIGHTS, "not a safetensors file", "bad header length",
			  "50 bytes", NULL);
	assert_null(strstr(errbuf, "1000"));
}

static void err_oversized_header(void **state)
{
	(void)state;
	const char *p = path_of("huge.safetensors");
	write_raw(p, "{}", 0, 200000000ull);
	expect_open_error(p, MOE_ERR_WEIGHTS, "not a safetensors file", NULL);
	assert_null(strstr(errbuf, "200000000"));
	write_raw(p, "{}", 0, UINT64_MAX);
	expect_open_error(p, MOE_ERR_WEIGHTS, "not a safetensors file", NULL);
}

static void err_bad_json(void **state)
{
	(void)state;
	const char *p = path_of("json.safetensors");
	write_raw(p, "{\"a\": {\"dtype\": \"F32\",", 0, 0);
	expect_open_error(p, MOE_ERR_WEIGHTS, "not valid JSON", NULL);
	write_raw(p, "[1, 2]", 0, 0);
	expect_open_error(p, MOE_ERR_WEIGHTS, "not a JSON object", NULL);
	write_raw(p, "{} xyz", 0, 0);
	expect_open_error(p, MOE_ERR_WEIGHTS, "trailing", NULL);
	write_raw(p, "{\"__metadata__\": [1]}", 0, 0);
	expect_open_error(p, MOE_ERR_WEIGHTS, "__metadata__", NULL);
	write_raw(p, "{\"__metadata__\": {\"k\": 3}}", 0, 0);
	expect_open_error(p, MOE_ERR_WEIGHTS, "__metadata__", "'k'", NULL);
	/* Padding with spaces is fine, and so is an empty checkpoint. */
	write_raw(p, "{\"__metadata__\": {\"k\": \"v\"}}      ", 0, 0);
	struct moe_st_file *f;
	assert_int_equal(moe_st_open(p, &f, errbuf, sizeof errbuf), MOE_OK);
	assert_int_equal(moe_st_count(f), 0);
	assert_string_equal(moe_st_metadata(f, "k"), "v");
	moe_st_close(f);
}

struct bad_case {
	const char *header;
	size_t data;
	const char *frag;
};

static void err_bad_entries(void **state)
{
	(void)state;
	static const struct bad_case cases[] = {
	    {"{\"x.w\": {\"shape\": [2], \"data_offsets\": [0, 8]}}", 8, "missing dtype"},
	    {"{\"x.w\": {\"dtype\": 4, \"shape\": [2], \"data_offsets\": [0, 8]}}", 8,
	     "dtype is not a string"},
	    {"{\"x.w\": {\"dtype\": \"F12\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 8,
	     "unknown dtype 'F12'"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 8]}}", 8, "missing shape"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": 2, \"data_offsets\": [0, 8]}}", 8,
	     "shape is not an array"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [2, -1], \"data_offsets\": [0, 8]}}", 8,
	     "shape[1] is not a non-negative integer"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 8]}}", 8,
	     "shape[0] is not a non-negative integer"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [\"2\"], \"data_offsets\": [0, 8]}}", 8,
	     "shape[0]"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], "
	     "\"data_offsets\": [0, 4]}}",
	     4, "9 dimensions"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296], "
	     "\"data_offsets\": [0, 8]}}",
	     8, "overflows"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [2]}}", 8, "missing data_offsets"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0]}}", 8,
	     "[begin, end]"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, -8]}}", 8,
	     "[begin, end]"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 0]}}", 8,
	     "end before they begin"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}", 8,
	     "hold 8 bytes, but F32 [3] needs 12"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8], "
	     "\"extra\": 1}}",
	     8, "unexpected key 'extra'"},
	    {"{\"x.w\": [1, 2]}", 8, "not an object"},
	    {"{\"x.w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
	     "\"x.w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}}",
	     16, "appears twice"},
	};
	const char *p = path_of("entry.safetensors");
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		write_raw(p, cases[i].header, cases[i].data, 0);
		expect_open_error(p, MOE_ERR_WEIGHTS, "tensor 'x.w'", cases[i].frag, NULL);
	}
}

static void err_offsets_out_of_range(void **state)
{
	(void)state;
	const char *p = path_of("model.safetensors");
	write_raw(
	    p, "{\"x.weight\": {\"dtype\": \"F32\", \"shape\": [25], \"data_offsets\": [0, 100]}}",
	    64, 0);
	expect_open_error(p, MOE_ERR_WEIGHTS, NULL);
	char want[512];
	snprintf(want, sizeof want,
		 "%s: tensor 'x.weight': data_offsets [0, 100] exceed the data size 64 "
		 "(truncated file?)",
		 p);
	assert_string_equal(errbuf, want);
}

static void err_overlap(void **state)
{
	(void)state;
	const char *p = path_of("overlap.safetensors");
	write_raw(p,
		  "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
		  " \"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}",
		  24, 0);
	expect_open_error(p, MOE_ERR_WEIGHTS, "overlap", "'a'", "'b'", NULL);
	/* Adjacent ranges and empty tensors anywhere are fine. */
	write_raw(p,
		  "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
		  " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [16, 24]},"
		  " \"c\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 4]}}",
		  24, 0);
	struct moe_st_file *f;
	assert_int_equal(moe_st_open(p, &f, errbuf, sizeof errbuf), MOE_OK);
	assert_int_equal(moe_st_count(f), 3);
	moe_st_close(f);
}

static void err_missing_and_dir(void **state)
{
	(void)state;
	expect_open_error(path_of("nonexistent.safetensors"), MOE_ERR_IO, "cannot open", NULL);
	expect_open_error(dir, MOE_ERR_IO, "not a regular file", NULL);
}

/* Truncating a valid file anywhere is an error, never a crash; flipping
 * header bytes never crashes. */
static void truncations_and_corruptions(void **state)
{
	(void)state;
	float a[6] = {1, 2, 3, 4, 5, 6};
	uint16_t b[3] = {1, 2, 3};
	struct moe_st_tensor t[] = {
	    {.name = "layer.0.a", .dtype = MOE_ST_F32, .ndim = 2, .shape = {2, 3}, .data = a},
	    {.name = "layer.0.b", .dtype = MOE_ST_BF16, .ndim = 1, .shape = {3}, .data = b},
	};
	const char *p = path_of("whole.safetensors");
	assert_int_equal(moe_st_write(p, t, 2, errbuf, sizeof errbuf), MOE_OK);
	FILE *fp = fopen(p, "rb");
	assert_non_null(fp);
	unsigned char whole[4096];
	size_t n = fread(whole, 1, sizeof whole, fp);
	fclose(fp);
	assert_true(n > 8 && n < sizeof whole);
	const char *q = path_of("cut.safetensors");
	for (size_t len = 0; len < n; len++) {
		write_bytes(q, whole, len);
		struct moe_st_file *f;
		enum moe_status st = moe_st_open(q, &f, errbuf, sizeof errbuf);
		if (st == MOE_OK)
			fail_msg("truncated to %zu of %zu bytes: opened", len, n);
		assert_non_null(strstr(errbuf, q));
	}
	unsigned char bad[4096];
	for (size_t i = 8; i < n; i++)
		for (int v = 0; v < 256; v += 17) {
			memcpy(bad, whole, n);
			bad[i] = (unsigned char)v;
			write_bytes(q, bad, n);
			struct moe_st_file *f;
			if (moe_st_open(q, &f, errbuf, sizeof errbuf) == MOE_OK)
				moe_st_close(f);
		}
}

/* Sets and sharded checkpoints --------------------------------------------- */

static void write_shards(void)
{
	float a[4] = {1, 2, 3, 4}, b[2] = {5, 6}, c[3] = {7, 8, 9};
	struct moe_st_tensor s1[] = {
	    {.name = "m.a", .dtype = MOE_ST_F32, .ndim = 1, .shape = {4}, .data = a},
	    {.name = "m.b", .dtype = MOE_ST_F32, .ndim = 1, .shape = {2}, .data = b},
	};
	struct moe_st_tensor s2[] = {
	    {.name = "m.c", .dtype = MOE_ST_F32, .ndim = 1, .shape = {3}, .data = c},
	};
	assert_int_equal(
	    moe_st_write(path_of("model-00001-of-00002.safetensors"), s1, 2, errbuf, sizeof errbuf),
	    MOE_OK);
	assert_int_equal(
	    moe_st_write(path_of("model-00002-of-00002.safetensors"), s2, 1, errbuf, sizeof errbuf),
	    MOE_OK);
}

static void write_text(const char *path, const char *text)
{
	write_bytes(path, text, strlen(text));
}

static void sharded_index(void **state)
{
	(void)state;
	write_shards();
	const char *idx = path_of("model.safetensors.index.json");
	write_text(idx, "{\"metadata\": {\"total_size\": 36}, \"weight_map\": {"
			"\"m.a\": \"model-00001-of-00002.safetensors\","
			"\"m.b\": \"model-00001-of-00002.safetensors\","
			"\"m.c\": \"model-00002-of-00002.safetensors\"}}");
	struct moe_st_set *s;
	const char *paths[] = {idx};
	assert_int_equal(moe_st_set_open(paths, 1, &s, errbuf, sizeof errbuf), MOE_OK);
	assert_int_equal(moe_st_set_count(s), 3);
	static const char *const names[] = {"m.a", "m.b", "m.c"};
	static const float first[] = {1, 5, 7};
	for (int i = 0; i < 3; i++) {
		const struct moe_st_tensor *t = moe_st_set_find(s, names[i]);
		assert_non_null(t);
		assert_ptr_equal(moe_st_set_at(s, (size_t)i), t);
		float v[4];
		assert_int_equal(moe_st_read_f32(t, v, t->numel, errbuf, sizeof errbuf), MOE_OK);
		assert_true(v[0] == first[i]);
		assert_non_null(strstr(t->file, i < 2 ? "00001-of" : "00002-of"));
	}
	assert_null(moe_st_set_find(s, "m.d"));
	moe_st_set_close(s);

	/* Plain files mixed in, and the same file twice, work too. */
	const char *two[] = {path_of("model-00002-of-00002.safetensors"),
			     path_of("model-00001-of-00002.safetensors")};
	const char *mixed[] = {two[0], two[1], two[0]};
	assert_int_equal(moe_st_set_open(mixed, 3, &s, errbuf, sizeof errbuf), MOE_OK);
	assert_int_equal(moe_st_set_count(s), 3);
	moe_st_set_close(s);
	assert_int_equal(moe_st_set_open(NULL, 0, &s, errbuf, sizeof errbuf), MOE_OK);
	assert_int_equal(moe_st_set_count(s), 0);
	moe_st_set_close(s);
}

static void expect_set_error(const char *const *paths, size_t n, enum moe_status st, ...)
{
	struct moe_st_set *s = (struct moe_st_set *)1;
	errbuf[0] = 0;
	enum moe_status got = moe_st_set_open(paths, n, &s, errbuf, sizeof errbuf);
	if (got == MOE_OK)
		fail_msg("set opened, expected an error");
	assert_null(s);
	assert_int_equal(got, st);
	va_list ap;
	va_start(ap, st);
	for (const char *frag; (frag = va_arg(ap, const char *));)
		if (!strstr(errbuf, frag))
			fail_msg("message lacks '%s': %s", frag, errbuf);
	va_end(ap);
}

static void sharded_errors(void **state)
{
	(void)state;
	write_shards();
	const char *idx = path_of("bad.safetensors.index.json");
	const char *paths[] = {idx};

	write_text(idx, "{\"weight_map\": {\"m.a\": \"model-00001-of-00002.safetensors\","
			"\"m.z\": \"model-00002-of-00002.safetensors\"}}");
	expect_set_error(paths, 1, MOE_ERR_WEIGHTS, idx, "tensor 'm.z'",
			 "model-00002-of-00002.safetensors", NULL);

	write_text(idx, "{\"weight_map\": {\"m.a\": \"model-00001-of-00002.safetensors\","
			"\"m.q\": \"gone.safetensors\"}}");
	expect_set_error(paths, 1, MOE_ERR_IO, idx, "tensor 'm.q'", "gone.safetensors",
			 "cannot open", NULL);

	write_text(idx, "{\"weight_map\": [1]}");
	expect_set_error(paths, 1, MOE_ERR_WEIGHTS, idx, "weight_map", NULL);
	write_text(idx, "{\"weight_map\": {\"m.a\": 3}}");
	expect_set_error(paths, 1, MOE_ERR_WEIGHTS, idx, "tensor 'm.a'", NULL);
	write_text(idx, "{\"weight_map\": {");
	expect_set_error(paths, 1, MOE_ERR_WEIGHTS, idx, "JSON", NULL);
	const char *gone[] = {path_of("none.safetensors.index.json")};
	expect_set_error(gone, 1, MOE_ERR_IO, gone[0], NULL);

	/* Duplicates across files name the tensor and both files. */
	float a[4] = {0};
	struct moe_st_tensor dup = {
	    .name = "m.b", .dtype = MOE_ST_F32, .ndim = 1, .shape = {4}, .data = a};
	const char *other = path_of("other.safetensors");
	assert_int_equal(moe_st_write(other, &dup, 1, errbuf, sizeof errbuf), MOE_OK);
	const char *two[] = {path_of("model-00001-of-00002.safetensors"), other};
	expect_set_error(two, 2, MOE_ERR_WEIGHTS, "tensor 'm.b'", two[0], other, NULL);

	/* A bad shard reports through the set with its own message. */
	const char *bad = path_of("broken.safetensors");
	write_raw(bad, "{\"k\": {\"dtype\": \"F32\", \"shape\": [9], \"data_offsets\": [0, 36]}}",
		  4, 0);
	const char *withbad[] = {two[0], bad};
	expect_set_error(withbad, 2, MOE_ERR_WEIGHTS, bad, "tensor 'k'", "exceed", NULL);
}

/* Templates and writer arguments -------------------------------------------- */

/* Hostile files -------------------------------------------------------------- */

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = "test_safetensors: hung on a FIFO\n";
	if (write(2, msg, sizeof msg - 1) < 0)
		_exit(2);
	_exit(1);
}

/* A FIFO with no writer, as a file, as an index and as a shard, is refused at
 * once (an alarm turns a hang into a failure). */
static void fifo_refused(void **state)
{
	(void)state;
	signal(SIGALRM, on_alarm);
	alarm(20);
	const char *fifo = path_of("pipe.safetensors");
	unlink(fifo);
	assert_int_equal(mkfifo(fifo, 0600), 0);
	expect_open_error(fifo, MOE_ERR_IO, "not a regular file", NULL);
	const char *one[] = {fifo};
	expect_set_error(one, 1, MOE_ERR_IO, "not a regular file", NULL);
	const char *fidx = path_of("pipe.safetensors.index.json");
	unlink(fidx);
	assert_int_equal(mkfifo(fidx, 0600), 0);
	const char *idx1[] = {fidx};
	expect_set_error(idx1, 1, MOE_ERR_IO, "not a regular file", NULL);
	const char *idx = path_of("fifo-shard.safetensors.index.json");
	write_text(idx, "{\"weight_map\": {\"m.a\": \"pipe.safetensors\"}}");
	const char *idx2[] = {idx};
	expect_set_error(idx2, 1, MOE_ERR_IO, "pipe.safetensors", "not a regular file", NULL);
	alarm(0);
	unlink(fifo), unlink(fidx), unlink(idx);
}

/* A file truncated after it was opened (header parsed, data not yet read):
 * reads fail cleanly with MOE_ERR_WEIGHTS; nothing was mapped, so no SIGBUS. */
static void truncated_while_open(void **state)
{
	(void)state;
	float a[1024];
	for (int i = 0; i < 1024; i++)
		a[i] = (float)i;
	struct moe_st_tensor t = {
	    .name = "w", .dtype = MOE_ST_F32, .ndim = 2, .shape = {32, 32}, .data = a};
	const char *p = path_of("shrinks.safetensors");
	assert_int_equal(moe_st_write(p, &t, 1, errbuf, sizeof errbuf), MOE_OK);
	struct moe_st_file *f;
	assert_int_equal(moe_st_open(p, &f, errbuf, sizeof errbuf), MOE_OK);
	const struct moe_st_tensor *w = moe_st_find(f, "w");
	assert_non_null(w);
	struct stat sb;
	assert_int_equal(stat(p, &sb), 0);
	assert_int_equal(truncate(p, sb.st_size - 4096 + 100), 0);
	float out[1024];
	errbuf[0] = 0;
	assert_int_equal(moe_st_read_f32(w, out, 1024, errbuf, sizeof errbuf), MOE_ERR_WEIGHTS);
	assert_non_null(strstr(errbuf, p));
	assert_non_null(strstr(errbuf, "tensor 'w'"));
	assert_non_null(strstr(errbuf, "truncated"));
	unsigned char raw[4096];
	assert_int_equal(moe_st_read_bytes(w, raw, errbuf, sizeof errbuf), MOE_ERR_WEIGHTS);
	/* and to nothing at all */
	assert_int_equal(truncate(p, 0), 0);
	assert_int_equal(moe_st_read_f32(w, out, 1024, errbuf, sizeof errbuf), MOE_ERR_WEIGHTS);
	moe_st_close(f);
}

/* Shards stay inside the index's directory; names of one file are one file;
 * a shard that is not a checkpoint never has its bytes printed. */
static void shard_confinement(void **state)
{
	(void)state;
	write_shards();
	char idx[300], sidx[300], link_out[300], link_in[300], pw[300];
	snprintf(idx, sizeof idx, "%s", path_of("conf.safetensors.index.json"));
	const char *paths[] = {idx};
	char sub[300], outside[300], text[1024];
	snprintf(sub, sizeof sub, "%s/sub", dir);
	mkdir(sub, 0700);
	/* a checkpoint outside the index's directory (sub/ holds the index) */
	snprintf(sidx, sizeof sidx, "%s", path_of("sub/model.safetensors.index.json"));
	const char *spaths[] = {sidx};
	snprintf(outside, sizeof outside, "%s/model-00001-of-00002.safetensors", dir);

	write_text(sidx, "{\"weight_map\": {\"m.a\": \"../model-00001-of-00002.safetensors\"}}");
	expect_set_error(spaths, 1, MOE_ERR_WEIGHTS, "'..'", "tensor 'm.a'", NULL);
	write_text(sidx,
		   "{\"weight_map\": {\"m.a\": \"x/../../model-00001-of-00002.safetensors\"}}");
	expect_set_error(spaths, 1, MOE_ERR_WEIGHTS, "'..'", NULL);
	snprintf(text, sizeof text, "{\"weight_map\": {\"m.a\": \"%s\"}}", outside);
	write_text(sidx, text);
	expect_set_error(spaths, 1, MOE_ERR_WEIGHTS, "absolute path", NULL);
	/* a symlink inside that points outside */
	snprintf(link_out, sizeof link_out, "%s", path_of("sub/escape.safetensors"));
	unlink(link_out);
	assert_int_equal(symlink(outside, link_out), 0);
	write_text(sidx, "{\"weight_map\": {\"m.a\": \"escape.safetensors\"}}");
	expect_set_error(spaths, 1, MOE_ERR_WEIGHTS, "resolves outside", NULL);

	/* a symlink inside to a file inside is fine, and it is the same file as
	 * its target: listed under three names, opened once, no duplicates */
	snprintf(link_in, sizeof link_in, "%s", path_of("alias.safetensors"));
	unlink(link_in);
	assert_int_equal(symlink("model-00001-of-00002.safetensors", link_in), 0);
	write_text(idx, "{\"weight_map\": {\"m.a\": \"model-00001-of-00002.safetensors\","
			"\"m.b\": \"./model-00001-of-00002.safetensors\","
			"\"m.c\": \"model-00002-of-00002.safetensors\"}}");
	struct moe_st_set *s;
	assert_int_equal(moe_st_set_open(paths, 1, &s, errbuf, sizeof errbuf), MOE_OK);
	assert_int_equal(moe_st_set_count(s), 3);
	moe_st_set_close(s);
	write_text(idx, "{\"weight_map\": {\"m.a\": \"alias.safetensors\","
			"\"m.b\": \".//model-00001-of-00002.safetensors\","
			"\"m.c\": \"model-00002-of-00002.safetensors\"}}");
	const char *with_plain[] = {idx, path_of("model-00001-of-00002.safetensors")};
	assert_int_equal(moe_st_set_open(with_plain, 2, &s, errbuf, sizeof errbuf), MOE_OK);
	assert_int_equal(moe_st_set_count(s), 3);
	moe_st_set_close(s);

	/* a text file as a shard: its first 8 bytes read as a length must not
	 * appear in the message */
	static const char passwd[] = "root:x:0:0:root:/root:/bin/bash\n";
	snprintf(pw, sizeof pw, "%s", path_of("passwd.safetensors"));
	write_text(pw, passwd);
	uint64_t as_len = 0;
	for (int i = 7; i >= 0; i--)
		as_len = as_len << 8 | (unsigned char)passwd[i];
	write_text(idx, "{\"weight_map\": {\"m.a\": \"passwd.safetensors\"}}");
	expect_set_error(paths, 1, MOE_ERR_WEIGHTS, "not a safetensors file", NULL);
	char num[32];
	snprintf(num, sizeof num, "%llu", (unsigned long long)as_len);
	assert_null(strstr(errbuf, num));
	assert_null(strstr(errbuf, "root"));
	unlink(link_out), unlink(link_in), unlink(pw), unlink(sidx), unlink(idx);
	rmdir(sub);
}

static void templates(void **state)
{
	(void)state;
	char out[64];
	assert_int_equal(moe_st_expand("model.layers.{layer}.mlp.experts.{expert}.w1.weight", 3, 17,
				       out, sizeof out, errbuf, sizeof errbuf),
			 MOE_OK);
	assert_string_equal(out, "model.layers.3.mlp.experts.17.w1.weight");
	assert_int_equal(
	    moe_st_expand("{expert}{layer}{expert}", 12, 0, out, sizeof out, errbuf, sizeof errbuf),
	    MOE_OK);
	assert_string_equal(out, "0120");
	assert_int_equal(moe_st_expand("plain}", -1, -1, out, sizeof out, errbuf, sizeof errbuf),
			 MOE_OK);
	assert_string_equal(out, "plain}");

	assert_int_equal(moe_st_expand("a.{layr}.b", 1, 2, out, sizeof out, errbuf, sizeof errbuf),
			 MOE_ERR_ARG);
	assert_non_null(strstr(errbuf, "unknown key '{layr}'"));
	assert_non_null(strstr(errbuf, "a.{layr}.b"));
	assert_int_equal(moe_st_expand("a.{layer", 1, 2, out, sizeof out, errbuf, sizeof errbuf),
			 MOE_ERR_ARG);
	assert_non_null(strstr(errbuf, "unterminated"));
	assert_int_equal(moe_st_expand("e.{expert}", 1, -1, out, sizeof out, errbuf, sizeof errbuf),
			 MOE_ERR_ARG);
	assert_non_null(strstr(errbuf, "{expert}"));
	char tiny[8];
	assert_int_equal(moe_st_expand("abcdefgh", 0, 0, tiny, sizeof tiny, errbuf, sizeof errbuf),
			 MOE_ERR_ARG);
	assert_int_equal(moe_st_expand("abcdefg", 0, 0, tiny, sizeof tiny, errbuf, sizeof errbuf),
			 MOE_OK);
	assert_string_equal(tiny, "abcdefg");
	assert_int_equal(
	    moe_st_expand("x{layer}", 1234567, 0, tiny, sizeof tiny, errbuf, sizeof errbuf),
	    MOE_ERR_ARG);
}

static void writer_refuses_bad_input(void **state)
{
	(void)state;
	float a[2] = {1, 2};
	const char *p = path_of("w.safetensors");
	struct moe_st_tensor dup[] = {
	    {.name = "x", .dtype = MOE_ST_F32, .ndim = 1, .shape = {2}, .data = a},
	    {.name = "x", .dtype = MOE_ST_F32, .ndim = 1, .shape = {2}, .data = a},
	};
	assert_int_equal(moe_st_write(p, dup, 2, errbuf, sizeof errbuf), MOE_ERR_ARG);
	assert_non_null(strstr(errbuf, "'x'"));
	struct moe_st_tensor wrong = {
	    .name = "y", .dtype = MOE_ST_F32, .ndim = 1, .shape = {2}, .data = a, .bytes = 4};
	assert_int_equal(moe_st_write(p, &wrong, 1, errbuf, sizeof errbuf), MOE_ERR_ARG);
	assert_non_null(strstr(errbuf, "'y'"));
	struct moe_st_tensor nodata = {.name = "z", .dtype = MOE_ST_F32, .ndim = 1, .shape = {2}};
	assert_int_equal(moe_st_write(p, &nodata, 1, errbuf, sizeof errbuf), MOE_ERR_ARG);
	/* Nothing was left behind by the failures. */
	assert_int_equal(access(p, F_OK), -1);
	assert_int_equal(
	    moe_st_write(path_of("nodir/x.safetensors"), &dup[0], 1, errbuf, sizeof errbuf),
	    MOE_ERR_IO);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(roundtrip_every_dtype),
	    cmocka_unit_test(read_f32_converts),
	    cmocka_unit_test(unaligned_data),
	    cmocka_unit_test(f16_all_patterns),
	    cmocka_unit_test(bf16_all_patterns),
	    cmocka_unit_test(e4m3_all_patterns),
	    cmocka_unit_test(e5m2_all_patterns),
	    cmocka_unit_test(err_short_file),
	    cmocka_unit_test(err_header_beyond_file),
	    cmocka_unit_test(err_oversized_header),
	    cmocka_unit_test(err_bad_json),
	    cmocka_unit_test(err_bad_entries),
	    cmocka_unit_test(err_offsets_out_of_range),
	    cmocka_unit_test(err_overlap),
	    cmocka_unit_test(err_missing_and_dir),
	    cmocka_unit_test(truncations_and_corruptions),
	    cmocka_unit_test(sharded_index),
	    cmocka_unit_test(sharded_errors),
	    cmocka_unit_test(fifo_refused),
	    cmocka_unit_test(truncated_while_open),
	    cmocka_unit_test(shard_confinement),
	    cmocka_unit_test(templates),
	    cmocka_unit_test(writer_refuses_bad_input),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
