/* test_gguf.c: the GGUF reader (runtime/io/gguf.c) on files written here
 * byte by byte: every metadata type and arrays, the alignment, the decoders
 * against values worked out by hand from ggml's block layouts, and bad input
 * (truncated at every length, an unknown type, offsets out of bounds); then
 * moe_load_gguf into a model that keeps its experts quantized: a good file
 * loads and runs, and a wrong shape, a NaN scale, a type the spec does not
 * keep, a missing tensor are located errors that leave nothing loaded. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"
#include "harness.h"
#include "import.h"
#include "moe_ref.h"

/* A growing byte buffer: the file being written. */
struct buf {
	unsigned char *p;
	size_t n, cap;
};

static void put(struct buf *b, const void *src, size_t n)
{
	if (b->n + n > b->cap) {
		b->cap = (b->n + n) * 2 + 64;
		b->p = realloc(b->p, b->cap);
		assert_non_null(b->p);
	}
	memcpy(b->p + b->n, src, n);
	b->n += n;
}

static void put_le(struct buf *b, uint64_t v, int n)
{
	unsigned char x[8];
	for (int i = 0; i < n; i++)
		x[i] = (unsigned char)(v >> (8 * i));
	put(b, x, (size_t)n);
}

static void put_str(struct buf *b, const char *s)
{
	put_le(b, strlen(s), 8);
	put(b, s, strlen(s));
}

static void kv_head(struct buf *b, const char *key, uint32_t type)
{
	put_str(b, key);
	put_le(b, type, 4);
}

struct tinfo {
	const char *name;
	uint32_t type, ndim;
	uint64_t ne[5]; /* one more than GGUF allows: the 5-D case */
	const void *data;
	size_t bytes;
};

/* header + kvs (already serialized, n_kv of them) + tensor infos + data,
 * aligned to align */
static void write_file(const char *path, const struct buf *kvs, uint64_t n_kv,
		       const struct tinfo *t, size_t n_t, uint64_t align)
{
	struct buf b = {0};
	put(&b, "GGUF", 4);
	put_le(&b, 3, 4);
	put_le(&b, n_t, 8);
	put_le(&b, n_kv, 8);
	if (kvs->n)
		put(&b, kvs->p, kvs->n);
	uint64_t off = 0;
	for (size_t i = 0; i < n_t; i++) {
		put_str(&b, t[i].name);
		put_le(&b, t[i].ndim, 4);
		for (uint32_t k = 0; k < t[i].ndim; k++)
			put_le(&b, t[i].ne[k], 8);
		put_le(&b, t[i].type, 4);
		put_le(&b, off, 8);
		off += (t[i].bytes + align - 1) / align * align;
	}
	while (b.n % align)
		put_le(&b, 0, 1);
	for (size_t i = 0; i < n_t; i++) {
		put(&b, t[i].data, t[i].bytes);
		while (b.n % align)
			put_le(&b, 0, 1);
	}
	FILE *f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(b.p, 1, b.n, f), b.n);
	assert_int_equal(fclose(f), 0);
	free(b.p);
}

static void path_of(char *p, size_t cap, const char *name)
{
	snprintf(p, cap, "%s/%s", h_tmpdir, name);
}

/* Every metadata type, arrays (numbers, strings, nested), alignment 64. */
static void test_metadata_and_tensors(void **state)
{
	(void)state;
	struct buf kv = {0};
	kv_head(&kv, "general.architecture", MOE_GGUF_STRING);
	put_str(&kv, "qwen3moe");
	kv_head(&kv, "general.alignment", MOE_GGUF_U32);
	put_le(&kv, 64, 4);
	kv_head(&kv, "a.u8", MOE_GGUF_U8);
	put_le(&kv, 200, 1);
	kv_head(&kv, "a.i8", MOE_GGUF_I8);
	put_le(&kv, (uint8_t)-5, 1);
	kv_head(&kv, "a.u16", MOE_GGUF_U16);
	put_le(&kv, 60000, 2);
	kv_head(&kv, "a.i16", MOE_GGUF_I16);
	put_le(&kv, (uint16_t)-300, 2);
	kv_head(&kv, "a.i32", MOE_GGUF_I32);
	put_le(&kv, (uint32_t)-70000, 4);
	kv_head(&kv, "a.f32", MOE_GGUF_F32);
	float f = 0.25f;
	uint32_t fu;
	memcpy(&fu, &f, 4);
	put_le(&kv, fu, 4);
	kv_head(&kv, "a.bool", MOE_GGUF_BOOL);
	put_le(&kv, 1, 1);
	kv_head(&kv, "a.u64", MOE_GGUF_U64);
	put_le(&kv, 1ull << 40, 8);
	kv_head(&kv, "a.i64", MOE_GGUF_I64);
	put_le(&kv, (uint64_t)-3, 8);
	kv_head(&kv, "a.f64", MOE_GGUF_F64);
	double dv = -1.5;
	uint64_t du;
	memcpy(&du, &dv, 8);
	put_le(&kv, du, 8);
	kv_head(&kv, "a.arr_i32", MOE_GGUF_ARRAY);
	put_le(&kv, MOE_GGUF_I32, 4);
	put_le(&kv, 3, 8);
	for (int i = 0; i < 3; i++)
		put_le(&kv, (uint32_t)(i * 10), 4);
	kv_head(&kv, "a.arr_str", MOE_GGUF_ARRAY);
	put_le(&kv, MOE_GGUF_STRING, 4);
	put_le(&kv, 2, 8);
	put_str(&kv, "x");
	put_str(&kv, "yz");
	kv_head(&kv, "a.arr_arr", MOE_GGUF_ARRAY);
	put_le(&kv, MOE_GGUF_ARRAY, 4);
	put_le(&kv, 2, 8);
	for (int i = 0; i < 2; i++) {
		put_le(&kv, MOE_GGUF_U8, 4);
		put_le(&kv, 2, 8);
		put_le(&kv, 7, 1), put_le(&kv, 8, 1);
	}
	uint16_t h[6] = {0x3C00, 0xC000, 0x3800, 0, 0x3C00, 0x4000}; /* 1, -2, .5, 0, 1, 2 */
	uint16_t bf[3] = {0x3F80, 0xC040, 0x0000};                   /* 1, -3, 0 */
	float fl[2] = {1.5f, -0.125f};
	struct tinfo t[] = {
	    {"w.f16", MOE_GGML_F16, 2, {3, 2}, h, sizeof h},
	    {"w.bf16", MOE_GGML_BF16, 1, {3}, bf, sizeof bf},
	    {"w.f32", MOE_GGML_F32, 1, {2}, fl, sizeof fl},
	};
	char p[128];
	path_of(p, sizeof p, "meta.gguf");
	write_file(p, &kv, 15, t, 3, 64);
	free(kv.p);

	char err[512];
	struct moe_gguf_file *g;
	assert_int_equal(moe_gguf_open(p, &g, err, sizeof err), MOE_OK);
	assert_int_equal(moe_gguf_version(g), 3);
	assert_int_equal(moe_gguf_alignment(g), 64);
	assert_int_equal(moe_gguf_kv_count(g), 15);
	assert_string_equal(moe_gguf_kv_str(g, "general.architecture"), "qwen3moe");
	uint64_t u;
	double x;
	assert_int_equal(moe_gguf_kv_uint(g, "a.u8", &u), 0), assert_int_equal(u, 200);
	assert_int_equal(moe_gguf_kv_uint(g, "a.u16", &u), 0), assert_int_equal(u, 60000);
	assert_int_equal(moe_gguf_kv_uint(g, "a.u64", &u), 0), assert_true(u == 1ull << 40);
	assert_int_equal(moe_gguf_kv_uint(g, "a.i8", &u), -1); /* negative */
	assert_int_equal(moe_gguf_kv_num(g, "a.i8", &x), 0), assert_true(x == -5);
	assert_int_equal(moe_gguf_kv_num(g, "a.i16", &x), 0), assert_true(x == -300);
	assert_int_equal(moe_gguf_kv_num(g, "a.i32", &x), 0), assert_true(x == -70000);
	assert_int_equal(moe_gguf_kv_num(g, "a.i64", &x), 0), assert_true(x == -3);
	assert_int_equal(moe_gguf_kv_num(g, "a.f32", &x), 0), assert_true(x == 0.25);
	assert_int_equal(moe_gguf_kv_num(g, "a.f64", &x), 0), assert_true(x == -1.5);
	assert_int_equal(moe_gguf_kv_uint(g, "a.bool", &u), 0), assert_int_equal(u, 1);
	assert_int_equal(moe_gguf_kv_uint(g, "absent", &u), -1);
	const struct moe_gguf_kv *a = moe_gguf_kv_find(g, "a.arr_i32");
	assert_non_null(a);
	assert_int_equal(a->arr_type, MOE_GGUF_I32);
	assert_int_equal(a->arr_n, 3);
	assert_int_equal(((int32_t *)a->arr)[2], 20);
	a = moe_gguf_kv_find(g, "a.arr_str");
	assert_int_equal(a->arr_n, 2);
	assert_string_equal(((char **)a->arr)[1], "yz");
	a = moe_gguf_kv_find(g, "a.arr_arr");
	assert_int_equal(a->arr_type, MOE_GGUF_ARRAY);
	assert_int_equal(a->arr_n, 2);

	assert_int_equal(moe_gguf_count(g), 3);
	assert_string_equal(moe_gguf_at(g, 0)->name, "w.bf16"); /* name order */
	const struct moe_gguf_tensor *tt = moe_gguf_find(g, "w.f16");
	assert_non_null(tt);
	assert_int_equal(tt->ndim, 2);
	assert_int_equal(tt->shape[0], 2), assert_int_equal(tt->shape[1], 3);
	assert_int_equal(tt->offset % 64, 0);
	float v[6];
	assert_int_equal(moe_gguf_read_f32(tt, v, 6, err, sizeof err), MOE_OK);
	float want[6] = {1, -2, .5f, 0, 1, 2};
	assert_memory_equal(v, want, sizeof want);
	assert_int_equal(moe_gguf_read_f32(moe_gguf_find(g, "w.bf16"), v, 3, err, sizeof err),
			 MOE_OK);
	assert_true(v[0] == 1 && v[1] == -3 && v[2] == 0);
	assert_int_equal(moe_gguf_read_f32(moe_gguf_find(g, "w.f32"), v, 2, err, sizeof err),
			 MOE_OK);
	assert_true(v[0] == 1.5f && v[1] == -0.125f);
	assert_null(moe_gguf_find(g, "w.none"));
	moe_gguf_close(g);
	assert_int_equal(moe_gguf_is_gguf(p), 1);
}

/* A file cut at any length is an error naming the file, never a crash. */
static void test_truncated_everywhere(void **state)
{
	(void)state;
	struct buf kv = {0};
	kv_head(&kv, "general.name", MOE_GGUF_STRING);
	put_str(&kv, "t");
	kv_head(&kv, "x.tokens", MOE_GGUF_ARRAY);
	put_le(&kv, MOE_GGUF_STRING, 4);
	put_le(&kv, 2, 8);
	put_str(&kv, "ab"), put_str(&kv, "c");
	unsigned char q[34 * 16] = {0}; /* a multiple of 32: no padding after it */
	unsigned char q6[210] = {0}, q5[22] = {0}, q41[20] = {0};
	struct tinfo t[] = {{"q6", MOE_GGML_Q6_K, 1, {256}, q6, sizeof q6},
			    {"q5", MOE_GGML_Q5_0, 1, {32}, q5, sizeof q5},
			    {"q41", MOE_GGML_Q4_1, 1, {32}, q41, sizeof q41},
			    {"q", MOE_GGML_Q8_0, 2, {32, 16}, q, sizeof q}};
	char p[128], cut[128];
	path_of(p, sizeof p, "full.gguf");
	path_of(cut, sizeof cut, "cut.gguf");
	write_file(p, &kv, 2, t, 4, 32);
	free(kv.p);
	FILE *f = fopen(p, "rb");
	assert_non_null(f);
	unsigned char all[4096];
	size_t n = fread(all, 1, sizeof all, f);
	fclose(f);
	assert_true(n > 100 && n < sizeof all);
	char err[512];
	for (size_t len = 0; len < n; len++) {
		f = fopen(cut, "wb");
		assert_int_equal(fwrite(all, 1, len, f), len);
		fclose(f);
		struct moe_gguf_file *g = (void *)1;
		enum moe_status st = moe_gguf_open(cut, &g, err, sizeof err);
		assert_int_equal(st, MOE_ERR_WEIGHTS);
		assert_null(g);
		assert_non_null(strstr(err, cut));
	}
	struct moe_gguf_file *g;
	assert_int_equal(moe_gguf_open(p, &g, err, sizeof err), MOE_OK);
	moe_gguf_close(g);
}

static void expect_bad(const char *name, const struct buf *kv, uint64_t n_kv, const struct tinfo *t,
		       size_t n_t, const char *want1, const char *want2)
{
	char p[128], err[512] = "";
	path_of(p, sizeof p, name);
	write_file(p, kv, n_kv, t, n_t, 32);
	struct moe_gguf_file *g = (void *)1;
	assert_int_equal(moe_gguf_open(p, &g, err, sizeof err), MOE_ERR_WEIGHTS);
	assert_null(g);
	if (!strstr(err, want1) || (want2 && !strstr(err, want2)))
		fail_msg("'%s' does not say '%s' / '%s'", err, want1, want2 ? want2 : "");
}

static void test_bad_files(void **state)
{
	(void)state;
	struct buf none = {0};
	unsigned char q[64] = {0};
	struct tinfo unk[] = {{"w.x", 99, 1, {4}, q, 16}};
	expect_bad("unk.gguf", &none, 0, unk, 1, "unknown tensor type 99", "w.x");
	struct tinfo blk[] = {{"w.q4", MOE_GGML_Q4_0, 1, {16}, q, 18}};
	expect_bad("blk.gguf", &none, 0, blk, 1, "not a multiple of its block", "w.q4");
	struct tinfo dup[] = {{"w", MOE_GGML_F32, 1, {4}, q, 16},
			      {"w", MOE_GGML_F32, 1, {4}, q, 16}};
	expect_bad("dup.gguf", &none, 0, dup, 2, "appears twice", "'w'");
	struct tinfo dims[] = {{"w.5d", MOE_GGML_F32, 5, {1, 1, 1, 1}, q, 4}};
	expect_bad("dims.gguf", &none, 0, dims, 1, "5 dimensions", "w.5d");
	struct buf kv = {0};
	kv_head(&kv, "general.alignment", MOE_GGUF_U32);
	put_le(&kv, 24, 4);
	expect_bad("align.gguf", &kv, 1, NULL, 0, "power of two", NULL);
	kv.n = 0;
	kv_head(&kv, "k", MOE_GGUF_U8);
	put_le(&kv, 1, 1);
	kv_head(&kv, "k", MOE_GGUF_U8);
	put_le(&kv, 1, 1);
	expect_bad("dupkey.gguf", &kv, 2, NULL, 0, "'k' appears twice", NULL);
	kv.n = 0;
	kv_head(&kv, "k", 13);
	expect_bad("vtype.gguf", &kv, 1, NULL, 0, "unknown value type 13", NULL);
	kv.n = 0;
	kv_head(&kv, "k", MOE_GGUF_ARRAY);
	put_le(&kv, MOE_GGUF_U32, 4);
	put_le(&kv, 1ull << 60, 8);
	expect_bad("arr.gguf", &kv, 1, NULL, 0, "array longer than the rest", NULL);
	free(kv.p);

	/* a tensor whose data range leaves the file, and a huge count */
	char p[128], err[512];
	path_of(p, sizeof p, "oob.gguf");
	struct buf b = {0};
	put(&b, "GGUF", 4);
	put_le(&b, 2, 4);
	put_le(&b, 1, 8), put_le(&b, 0, 8);
	put_str(&b, "w.far");
	put_le(&b, 1, 4), put_le(&b, 8, 8), put_le(&b, MOE_GGML_F32, 4), put_le(&b, 1u << 20, 8);
	while (b.n % 32)
		put_le(&b, 0, 1);
	put(&b, q, 32);
	FILE *f = fopen(p, "wb");
	fwrite(b.p, 1, b.n, f);
	fclose(f);
	struct moe_gguf_file *g;
	assert_int_equal(moe_gguf_open(p, &g, err, sizeof err), MOE_ERR_WEIGHTS);
	assert_non_null(strstr(err, "w.far"));
	assert_non_null(strstr(err, "beyond its end"));
	b.n = 0;
	put(&b, "GGUF", 4);
	put_le(&b, 1, 4);
	put_le(&b, 0, 8), put_le(&b, 0, 8);
	f = fopen(p, "wb");
	fwrite(b.p, 1, b.n, f);
	fclose(f);
	assert_int_equal(moe_gguf_open(p, &g, err, sizeof err), MOE_ERR_WEIGHTS);
	assert_non_null(strstr(err, "version 1"));
	b.n = 0;
	put(&b, "GGUF", 4);
	put_le(&b, 3, 4);
	put_le(&b, UINT64_MAX, 8), put_le(&b, 0, 8);
	f = fopen(p, "wb");
	fwrite(b.p, 1, b.n, f);
	fclose(f);
	assert_int_equal(moe_gguf_open(p, &g, err, sizeof err), MOE_ERR_WEIGHTS);
	assert_non_null(strstr(err, "cannot fit"));
	free(b.p);
	assert_int_equal(moe_gguf_is_gguf(p), 1);
	path_of(p, sizeof p, "nothere.gguf");
	assert_int_equal(moe_gguf_open(p, &g, err, sizeof err), MOE_ERR_IO);
}

/* The decoders on blocks worked out by hand from ggml's layouts. */
static void test_decoders_by_hand(void **state)
{
	(void)state;
	uint8_t codes[256];
	float s[16], o[16], w[256];
	/* Q8_0: d = 0.5 (f16 0x3800), codes -128, 3, ... */
	unsigned char q8[34] = {0x00, 0x38, 0x80, 0x03};
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q8_0, q8, 1, 32, codes, s, o), -1);
	struct moe_qfmt f8 = {MOE_QFORMAT_INT8, 32, 0};
	moe_qdequant(&f8, codes, s, NULL, 1, 32, w);
	assert_true(w[0] == -64.0f && w[1] == 1.5f && w[2] == 0.0f);
	/* Q4_0: d = 2 (0x4000); byte 0 = 0x9A: element 0 code 10, element 16
	 * code 9 */
	unsigned char q4[18] = {0x00, 0x40, 0x9A};
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q4_0, q4, 1, 32, codes, s, o), -1);
	assert_int_equal(codes[0], 10), assert_int_equal(codes[16], 9);
	assert_int_equal(codes[1], 0), assert_int_equal(codes[17], 0);
	struct moe_qfmt f4 = {MOE_QFORMAT_INT4, 32, 0};
	moe_qdequant(&f4, codes, s, o, 1, 32, w);
	assert_true(w[0] == 4.0f && w[16] == 2.0f && w[1] == -16.0f);
	/* Q4_K: d = 1, dmin = 0.5; sub-block 1: sc = 5, m = 3 (bytes 1 and
	 * 5); sub-block 6: sc = 0x2 | (0x40 >> 6) << 4 = 18 (byte 10 low,
	 * byte 2 top), m = 0x7 | (0x80 >> 6) << 4 = 39 (byte 10 high, byte 6
	 * top); nibbles: byte 16 + 0 = 0x4B (sub-block 0 element 0 = 11,
	 * sub-block 1 element 0 = 4); byte 16 + 96 = 0x0C (sub-block 6
	 * element 0 = 12) */
	unsigned char qk[144] = {0x00, 0x3C, 0x00, 0x38};
	qk[4 + 1] = 5, qk[4 + 5] = 3;
	qk[4 + 10] = 0x72, qk[4 + 2] = 0x40, qk[4 + 6] = 0x80;
	qk[16] = 0x4B, qk[16 + 96] = 0x0C;
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q4_K, qk, 1, 256, codes, s, o), -1);
	assert_true(s[1] == 5.0f && o[1] == -1.5f);
	assert_true(s[6] == 18.0f && o[6] == -19.5f);
	assert_int_equal(codes[0], 11), assert_int_equal(codes[32], 4);
	assert_int_equal(codes[192], 12);
	struct moe_qfmt fk = {MOE_QFORMAT_INT4, 32, 1};
	moe_qdequant(&fk, codes, s, o, 1, 256, w);
	assert_true(w[32] == 5.0f * 4 - 1.5f && w[192] == 18.0f * 12 - 19.5f);
	/* a NaN scale is reported with its group */
	unsigned char q4n[36] = {0};
	q4n[18] = 0x00, q4n[19] = 0x7E;
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q4_0, q4n, 1, 64, codes, s, o), 1);
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q5_K, qk, 1, 256, codes, s, o), -2);
	struct moe_qfmt g;
	assert_int_equal(moe_gguf_qfmt(MOE_GGML_Q4_K, &g), 0);
	assert_true(g.kind == MOE_QFORMAT_INT4 && g.group == 32 && g.zero == 1);
	assert_int_equal(moe_gguf_qfmt(MOE_GGML_Q5_K, &g), -1);
	assert_int_equal(moe_gguf_qfmt(MOE_GGML_Q5_1, &g), -1);
	assert_non_null(strstr(moe_gguf_not_kept(MOE_GGML_Q5_K), "offset"));
	assert_null(moe_gguf_not_kept(MOE_GGML_Q6_K));
	assert_null(moe_gguf_not_kept(99));

	/* Q5_0: d = 1; qh bits 0 and 17; qs[0] = 0x3A, qs[1] = 0x50:
	 * element 0 = 10 | 16 -> 26 - 16 = 10, element 16 = 3 - 16 = -13,
	 * element 1 = 0 - 16, element 17 = 5 | 16 -> 5 */
	unsigned char q5[22] = {0x00, 0x3C, 0x01, 0x00, 0x02, 0x00, 0x3A, 0x50};
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q5_0, q5, 1, 32, codes, s, o), -1);
	assert_int_equal(moe_gguf_qfmt(MOE_GGML_Q5_0, &g), 0);
	assert_true(g.kind == MOE_QFORMAT_INT8 && g.group == 32);
	moe_qdequant(&g, codes, s, NULL, 1, 32, w);
	assert_true(w[0] == 10.0f && w[16] == -13.0f && w[1] == -16.0f && w[17] == 5.0f);

	/* Q4_1: d = 0.5, m = -2; byte 0 = 0x7F: element 0 code 15, 16 code 7 */
	unsigned char q41[20] = {0x00, 0x38, 0x00, 0xC0, 0x7F};
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q4_1, q41, 1, 32, codes, s, o), -1);
	assert_int_equal(moe_gguf_qfmt(MOE_GGML_Q4_1, &g), 0);
	assert_true(g.kind == MOE_QFORMAT_INT4 && g.group == 32 && g.zero == 1);
	moe_qdequant(&g, codes, s, o, 1, 32, w);
	assert_true(w[0] == 5.5f && w[16] == 1.5f && w[1] == -2.0f);
	/* a NaN minimum is reported like a NaN scale */
	q41[2] = 0x00, q41[3] = 0x7E;
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q4_1, q41, 1, 32, codes, s, o), 0);

	/* Q6_K: ql[128], qh[64], int8 scales[16], d = 0.25 at byte 208.
	 * element 0: ql[0] low 15, qh[0] bits 0-1 = 2 -> 47 - 32 = 15, scale
	 * -3 d; element 64: ql[0] high 0, qh[0] bits 4-5 = 0 -> -32, scale 4
	 * (zero: valid); element 80: ql[16] high 9, qh[16] bits 4-5 = 3 ->
	 * 57 - 32 = 25, scale 5 = 7 d; element 160 (second half, k = 1):
	 * ql[64 + 32] low 1, qh[32] bits 2-3 = 1 -> 17 - 32 = -15, scale 10 = -d */
	unsigned char q6[210] = {0};
	q6[0] = 0x0F, q6[128] = 0x02;
	q6[16] = 0x90, q6[128 + 16] = 0x30;
	q6[96] = 0x01, q6[128 + 32] = 0x04;
	q6[192 + 0] = (unsigned char)-3, q6[192 + 5] = 7, q6[192 + 10] = 0xFF;
	q6[208] = 0x00, q6[209] = 0x34;
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q6_K, q6, 1, 256, codes, s, o), -1);
	assert_int_equal(moe_gguf_qfmt(MOE_GGML_Q6_K, &g), 0);
	assert_true(g.kind == MOE_QFORMAT_INT8 && g.group == 16);
	assert_int_equal((int8_t)codes[0], 15), assert_int_equal((int8_t)codes[64], -32);
	assert_int_equal((int8_t)codes[80], 25), assert_int_equal((int8_t)codes[160], -15);
	assert_true(s[0] == -0.75f && s[4] == 0.0f && s[5] == 1.75f && s[10] == -0.25f);
	moe_qdequant(&g, codes, s, NULL, 1, 256, w);
	assert_true(w[0] == -11.25f && w[64] == 0.0f && w[80] == 43.75f && w[160] == 3.75f);
	/* a NaN d makes every group of the block non-finite: the first is named */
	q6[209] = 0x7E;
	assert_int_equal(moe_gguf_decode(MOE_GGML_Q6_K, q6, 1, 256, codes, s, o), 0);
}

/* The loader ------------------------------------------------------------ */

enum { LH = 64, LE = 4, LK = 2, LI = 32 };

static void q8_blocks(unsigned char *dst, size_t n_groups, uint64_t seed, int nan_group)
{
	for (size_t g = 0; g < n_groups; g++) {
		unsigned char *b = dst + g * 34;
		uint16_t d = moe_f32_to_f16(0.002f * (1 + (float)(g % 5)));
		if ((int)g == nan_group)
			d = 0x7E00;
		b[0] = (unsigned char)d, b[1] = (unsigned char)(d >> 8);
		for (int i = 0; i < 32; i++)
			b[2 + i] = (unsigned char)(moe_rng_hash(seed, g, (uint64_t)i, 0) >> 56);
	}
}

/* Q5_0 blocks: d (0 when zero, NaN in nan_group), random fifth bits and
 * nibbles */
static void q5_blocks(unsigned char *dst, size_t n_groups, uint64_t seed, int nan_group, int zero)
{
	for (size_t g = 0; g < n_groups; g++) {
		unsigned char *b = dst + g * 22;
		uint16_t d = zero ? 0 : moe_f32_to_f16(0.004f * (1 + (float)(g % 3)));
		if ((int)g == nan_group)
			d = 0x7E00;
		b[0] = (unsigned char)d, b[1] = (unsigned char)(d >> 8);
		for (int i = 0; i < 20; i++)
			b[2 + i] = (unsigned char)(moe_rng_hash(seed, g, (uint64_t)i, 2) >> 56);
	}
}

struct lfile {
	float router[2][LE * LH];
	unsigned char up[2][LE * LI * LH / 32 * 34], gate[2][LE * LI * LH / 32 * 34],
	    down[2][LE * LH * LI / 32 * 34], down5[LE * LH * LI / 32 * 22];
};

/* Write a GGUF for the loader's model; what: 0 good, 1 wrong router shape,
 * 2 NaN scale in blk.1.ffn_down_exps, 3 gate stored as Q4_0, 4 missing
 * blk.1.ffn_up_exps, 5 blk.1.ffn_down_exps Q5_1, 6 it is Q5_0 (int8, 32)
 * with a NaN d in group 9, 7 Q5_0 with every d zero (valid), 8, 9, 10
 * general.architecture grok, llama (no expert_count), foo. */
static void add(struct tinfo *t, size_t *n, char (*names)[64], const char *fmt, int l,
		uint32_t type, uint64_t ne0, uint64_t ne1, uint64_t ne2, const void *data,
		size_t bytes)
{
	snprintf(names[*n], 64, fmt, l);
	t[*n] = (struct tinfo){names[*n], type, ne2 ? 3 : 2, {ne0, ne1, ne2}, data, bytes};
	(*n)++;
}

static void loader_file(const char *p, int what)
{
	static struct lfile L;
	struct tinfo t[8];
	char names[8][64];
	size_t n = 0, ng = LE * LI * LH / 32;
	for (int l = 0; l < 2; l++) {
		for (int i = 0; i < LE * LH; i++) {
			uint64_t h = moe_rng_hash(9, (uint64_t)l, (uint64_t)i, 1);
			L.router[l][i] = (float)((int)(h % 200) - 100) / 400.0f;
		}
		q8_blocks(L.gate[l], ng, 10 + (uint64_t)l, -1);
		q8_blocks(L.up[l], ng, 20 + (uint64_t)l, -1);
		q8_blocks(L.down[l], ng, 30 + (uint64_t)l, what == 2 && l == 1 ? 77 : -1);
		uint64_t er = what == 1 ? LE - 1 : LE;
		add(t, &n, names, "blk.%d.ffn_gate_inp.weight", l, MOE_GGML_F32, LH, er, 0,
		    L.router[l], er * LH * 4);
		if (what == 3)
			add(t, &n, names, "blk.%d.ffn_gate_exps.weight", l, MOE_GGML_Q4_0, LH, LI,
			    LE, L.gate[l], ng * 18);
		else
			add(t, &n, names, "blk.%d.ffn_gate_exps.weight", l, MOE_GGML_Q8_0, LH, LI,
			    LE, L.gate[l], sizeof L.gate[l]);
		if (!(what == 4 && l == 1))
			add(t, &n, names, "blk.%d.ffn_up_exps.weight", l, MOE_GGML_Q8_0, LH, LI, LE,
			    L.up[l], sizeof L.up[l]);
		add(t, &n, names, "blk.%d.ffn_down_exps.weight", l, MOE_GGML_Q8_0, LI, LH, LE,
		    L.down[l], sizeof L.down[l]);
	}
	struct buf kv = {0};
	kv_head(&kv, "general.architecture", MOE_GGUF_STRING);
	put_str(&kv, what == 8 ? "grok" : what == 9 ? "llama" : what == 10 ? "foo" : "qwen3moe");
	static const struct {
		const char *key;
		uint32_t v;
	} meta[] = {{"qwen3moe.block_count", 2},
		    {"qwen3moe.embedding_length", LH},
		    {"qwen3moe.expert_count", LE},
		    {"qwen3moe.expert_used_count", LK},
		    {"qwen3moe.expert_feed_forward_length", LI}};
	for (size_t i = 0; i < sizeof meta / sizeof *meta; i++) {
		kv_head(&kv, meta[i].key, MOE_GGUF_U32);
		put_le(&kv, meta[i].v, 4);
	}
	if (what == 5) /* layer 1's down in a type with no kept format */
		t[n - 1].type = MOE_GGML_Q5_1, t[n - 1].bytes = LE * LH * LI / 32 * 24;
	if (what == 6 || what == 7) { /* layer 1's down Q5_0 */
		q5_blocks(L.down5, ng, 31, what == 6 ? 9 : -1, what == 7);
		t[n - 1].type = MOE_GGML_Q5_0, t[n - 1].data = L.down5;
		t[n - 1].bytes = sizeof L.down5;
	}
	write_file(p, &kv, 6, t, n, 32);
	free(kv.p);
}

static void test_load(void **state)
{
	(void)state;
	struct moe_desc d;
	h_base_desc(&d, LH, LE, LK, LI);
	d.qfmt[MOE_QMAT_UP] = (struct moe_qfmt){MOE_QFORMAT_INT8, 32, 0};
	d.qfmt[MOE_QMAT_DOWN] = (struct moe_qfmt){MOE_QFORMAT_INT8, 32, 0};
	snprintf(d.names[MOE_ROLE_ROUTER], MOE_NAME_MAX, "blk.{layer}.ffn_gate_inp.weight");
	snprintf(d.names[MOE_ROLE_GATE], MOE_NAME_MAX, "blk.{layer}.ffn_gate_exps.weight");
	snprintf(d.names[MOE_ROLE_UP], MOE_NAME_MAX, "blk.{layer}.ffn_up_exps.weight");
	snprintf(d.names[MOE_ROLE_DOWN], MOE_NAME_MAX, "blk.{layer}.ffn_down_exps.weight");
	struct h_model m;
	char err[2048];
	if (h_model_open(&d, &m, err, sizeof err) != 0)
		fail_msg("%s", err);
	enum moe_status (*load_gguf)(moe_model *, const char *);
	*(void **)&load_gguf = dlsym(m.dl, "moe_load_gguf");
	assert_non_null(load_gguf);
	moe_model *mm;
	assert_int_equal(m.create(&mm, NULL), MOE_OK);
	float x[3 * LH], y[3 * LH];
	h_fill_input(x, 3 * LH, 5);
	char p[128];
	path_of(p, sizeof p, "load.gguf");
	loader_file(p, 0);
	assert_int_equal(load_gguf(mm, p), MOE_OK);
	assert_int_equal(m.forward(mm, 1, x, y, 3, NULL, NULL), MOE_OK);
	float amax = 0;
	for (int i = 0; i < 3 * LH; i++) {
		assert_true(isfinite(y[i]));
		amax = fmaxf(amax, fabsf(y[i]));
	}
	assert_true(amax > 0);

	static const struct {
		int what;
		const char *a, *b;
	} bad[] = {
	    {1, "blk.0.ffn_gate_inp.weight", "expected shape [4, 64]"},
	    {2, "blk.1.ffn_down_exps.weight", "non-finite scale in group 77"},
	    {3, "blk.0.ffn_gate_exps.weight", "is Q4_0, but the spec keeps gate as {kind: int8"},
	    {4, "blk.1.ffn_up_exps.weight", "not found"},
	    {6, "blk.1.ffn_down_exps.weight", "non-finite scale in group 9"},
	};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		loader_file(p, bad[i].what);
		assert_int_equal(load_gguf(mm, p), MOE_ERR_WEIGHTS);
		const char *e = m.last_error();
		if (!strstr(e, bad[i].a) || !strstr(e, bad[i].b) || !strstr(e, p))
			fail_msg("case %d: '%s'", bad[i].what, e);
		/* nothing half-loaded: the earlier weights are gone too */
		assert_int_equal(m.forward(mm, 0, x, y, 3, NULL, NULL), MOE_ERR_WEIGHTS);
	}
	/* Q5_0 is kept as int8 groups of 32, like Q8_0; a zero d is valid
	 * (ggml writes it for a block of zeros): layer 1's down is zero */
	loader_file(p, 7);
	assert_int_equal(load_gguf(mm, p), MOE_OK);
	assert_int_equal(m.forward(mm, 1, x, y, 3, NULL, NULL), MOE_OK);
	for (int i = 0; i < 3 * LH; i++)
		assert_true(y[i] == 0.0f);
	/* a file truncated after it was written is refused the same way */
	loader_file(p, 0);
	FILE *f = fopen(p, "r+b");
	assert_non_null(f);
	fseek(f, 0, SEEK_END);
	long size = ftell(f);
	fclose(f);
	assert_int_equal(truncate(p, size - 100), 0);
	assert_int_equal(load_gguf(mm, p), MOE_ERR_WEIGHTS);
	assert_non_null(strstr(m.last_error(), "truncated"));
	m.destroy(mm);
	h_model_close(&m);
}

static void keep_line(void *ctx, const char *line)
{
	snprintf(ctx, 1024, "%s", line);
}

/* moegen import of a GGUF file: the family from the metadata, llama.cpp's
 * names, weights.format gguf and quant: from the expert types; a type with
 * no kept format is an error naming the tensor. */
static void test_import(void **state)
{
	(void)state;
	char p[128], last[1024] = "", *text = NULL;
	size_t len = 0;
	path_of(p, sizeof p, "import.gguf");
	loader_file(p, 0);
	struct moe_diag d = {.sink = keep_line, .ctx = last};
	FILE *out = open_memstream(&text, &len);
	assert_int_equal(moe_import(p, out, &d), MOE_EXIT_OK);
	fclose(out);
	static const char *const want[] = {
	    "hidden: 64",
	    "moe_layers: [0, 1]",
	    "count: 4",
	    "intermediate: 32",
	    "top_k: 2",
	    "format: gguf",
	    "up: \"blk.{layer}.ffn_up_exps.weight\"",
	    "router: \"blk.{layer}.ffn_gate_inp.weight\"",
	    "quant:\n  gate: {kind: int8, group: 32}\n  up: {kind: int8, group: 32}\n  down: "
	    "{kind: int8, group: 32}\n"};
	for (size_t i = 0; i < sizeof want / sizeof *want; i++)
		if (!strstr(text, want[i]))
			fail_msg("'%s' not in:\n%s", want[i], text);
	/* Q8_0 in layer 0 and Q5_0 in layer 1: one kept format, int8 groups of
	 * 32 */
	free(text);
	text = NULL;
	loader_file(p, 7);
	out = open_memstream(&text, &len);
	assert_int_equal(moe_import(p, out, &d), MOE_EXIT_OK);
	fclose(out);
	if (!strstr(text, "  down: {kind: int8, group: 32}\n"))
		fail_msg("%s", text);
	free(text);
	text = NULL;
	loader_file(p, 5);
	out = open_memstream(&text, &len);
	assert_int_equal(moe_import(p, out, &d), MOE_EXIT_SPEC);
	fclose(out);
	assert_int_equal(len, 0); /* nothing written */
	if (!strstr(last, "blk.1.ffn_down_exps.weight' is Q5_1") ||
	    !strstr(last, "per-group minimum"))
		fail_msg("%s", last);
	/* architectures: refused by name with the reason, a dense llama, and
	 * an unknown one with the list */
	static const struct {
		int what;
		const char *a, *b;
	} archs[] = {{8, "'grok' is not imported", "no family"},
		     {9, "'llama' is not imported", "dense model"},
		     {10, "unsupported general.architecture 'foo'", "deepseek2"}};
	for (size_t i = 0; i < sizeof archs / sizeof *archs; i++) {
		free(text);
		text = NULL;
		loader_file(p, archs[i].what);
		out = open_memstream(&text, &len);
		assert_int_equal(moe_import(p, out, &d), MOE_EXIT_SPEC);
		fclose(out);
		assert_int_equal(len, 0);
		if (!strstr(last, archs[i].a) || !strstr(last, archs[i].b))
			fail_msg("%s", last);
	}
	free(text);
}

static int setup(void **state)
{
	(void)state;
	return h_setup("moe_test_gguf");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_metadata_and_tensors),
	    cmocka_unit_test(test_truncated_everywhere),
	    cmocka_unit_test(test_bad_files),
	    cmocka_unit_test(test_decoders_by_hand),
	    cmocka_unit_test(test_load),
	    cmocka_unit_test(test_import),
	};
	return cmocka_run_group_tests(tests, setup, h_teardown);
}
