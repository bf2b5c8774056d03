/* fuzz_index.c: a sharded checkpoint's model.safetensors.index.json, given
 * arbitrary text, beside two valid shards, a link to one of them, a link
 * leaving the directory and a subdirectory: the set opens or refuses; every
 * tensor of an opened set is read. */
#include <sys/stat.h>

#include "fuzz_common.h"
#include "safetensors.h"

static void shards(void)
{
	static int done;
	if (done)
		return;
	done = 1;
	char err[512], p[200];
	float a[4] = {1, 2, 3, 4}, b[2] = {5, 6};
	uint16_t c[3] = {0x3f80, 0x4000, 0x7fc0};
	struct moe_st_tensor s1[] = {
	    {.name = "m.a", .dtype = MOE_ST_F32, .ndim = 2, .shape = {2, 2}, .data = a},
	    {.name = "m.b", .dtype = MOE_ST_F32, .ndim = 1, .shape = {2}, .data = b},
	};
	struct moe_st_tensor s2[] = {
	    {.name = "m.c", .dtype = MOE_ST_BF16, .ndim = 1, .shape = {3}, .data = c},
	};
	snprintf(p, sizeof p, "%s/a.safetensors", fuzz_scratch());
	if (moe_st_write(p, s1, 2, err, sizeof err) != MOE_OK)
		abort();
	snprintf(p, sizeof p, "%s/b.safetensors", fuzz_scratch());
	if (moe_st_write(p, s2, 1, err, sizeof err) != MOE_OK)
		abort();
	snprintf(p, sizeof p, "%s/link.safetensors", fuzz_scratch());
	if (symlink("a.safetensors", p) != 0)
		abort();
	snprintf(p, sizeof p, "%s/out.safetensors", fuzz_scratch());
	if (symlink("/etc/hostname", p) != 0)
		abort();
	snprintf(p, sizeof p, "%s/sub", fuzz_scratch());
	if (mkdir(p, 0700) != 0)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	shards();
	const char *path = fuzz_file("model.safetensors.index.json", data, size);
	char err[512];
	struct moe_st_set *s;
	const char *paths[] = {path};
	if (moe_st_set_open(paths, 1, &s, err, sizeof err) == MOE_OK) {
		for (size_t i = 0; i < moe_st_set_count(s); i++) {
			const struct moe_st_tensor *t = moe_st_set_at(s, i);
			float v[8];
			if (t->numel <= 8)
				moe_st_read_f32(t, v, (size_t)t->numel, err, sizeof err);
		}
		moe_st_set_close(s);
	}
	return 0;
}
