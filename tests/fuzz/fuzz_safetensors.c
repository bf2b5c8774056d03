/* fuzz_safetensors.c: the safetensors reader on an arbitrary file: open,
 * look up, read and convert every tensor small enough, metadata, and the
 * same file as a one-file set. */
#include "fuzz_common.h"
#include "safetensors.h"

static void read_all(const struct moe_st_tensor *t)
{
	char err[512];
	if (t->numel > (1u << 20))
		return;
	float *f = malloc((size_t)t->numel * sizeof *f + 1);
	unsigned char *b = malloc(t->bytes + 1);
	if (!f || !b)
		abort();
	moe_st_read_f32(t, f, (size_t)t->numel, err, sizeof err);
	moe_st_read_bytes(t, b, err, sizeof err);
	free(f);
	free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *path = fuzz_file("in.safetensors", data, size);
	char err[512];
	struct moe_st_file *f;
	if (moe_st_open(path, &f, err, sizeof err) == MOE_OK) {
		for (size_t i = 0; i < moe_st_count(f); i++) {
			const struct moe_st_tensor *t = moe_st_at(f, i);
			if (moe_st_find(f, t->name) != t)
				abort();
			read_all(t);
		}
		moe_st_metadata(f, "format");
		moe_st_close(f);
	}
	struct moe_st_set *s;
	const char *paths[] = {path, path};
	if (moe_st_set_open(paths, 2, &s, err, sizeof err) == MOE_OK) {
		if (moe_st_set_count(s) && !moe_st_set_find(s, moe_st_set_at(s, 0)->name))
			abort();
		moe_st_set_close(s);
	}
	return 0;
}
