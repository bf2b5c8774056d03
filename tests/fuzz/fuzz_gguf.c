/* fuzz_gguf.c: the GGUF reader on an arbitrary file: open, every key/value
 * looked up, every tensor found by name, read, converted or decoded when
 * small enough. */
#include "fuzz_common.h"
#include "gguf.h"

static void read_all(const struct moe_gguf_tensor *t)
{
	char err[512];
	if (t->numel > (1u << 20) || t->bytes > (1u << 22))
		return;
	unsigned char *b = malloc((size_t)t->bytes + 1);
	float *f = malloc((size_t)t->numel * sizeof *f + 1);
	uint8_t *codes = malloc((size_t)t->numel + 1);
	float *s = malloc((size_t)t->numel / 16 * sizeof *s + 1); /* Q6_K: groups of 16 */
	float *o = malloc((size_t)t->numel / 16 * sizeof *o + 1);
	if (!b || !f || !codes || !s || !o)
		abort();
	moe_gguf_read_f32(t, f, (size_t)t->numel, err, sizeof err);
	struct moe_qfmt q;
	if (moe_gguf_read(t, b, err, sizeof err) == MOE_OK && moe_gguf_qfmt(t->type, &q) == 0)
		moe_gguf_decode(t->type, b, t->numel / t->ne[0], t->ne[0], codes, s, o);
	free(b), free(f), free(codes), free(s), free(o);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *path = fuzz_file("in.gguf", data, size);
	char err[512];
	struct moe_gguf_file *f;
	if (moe_gguf_open(path, &f, err, sizeof err) != MOE_OK)
		return 0;
	for (size_t i = 0; i < moe_gguf_kv_count(f); i++) {
		const struct moe_gguf_kv *kv = moe_gguf_kv_at(f, i);
		uint64_t u;
		double x;
		if (moe_gguf_kv_find(f, kv->key) != kv)
			abort();
		moe_gguf_kv_uint(f, kv->key, &u);
		moe_gguf_kv_num(f, kv->key, &x);
		moe_gguf_kv_str(f, kv->key);
	}
	for (size_t i = 0; i < moe_gguf_count(f); i++) {
		const struct moe_gguf_tensor *t = moe_gguf_at(f, i);
		if (moe_gguf_find(f, t->name) != t)
			abort();
		read_all(t);
	}
	moe_gguf_close(f);
	return 0;
}
