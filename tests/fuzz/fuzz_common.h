/* fuzz_common.h: what the fuzz targets share: a scratch file per process that
 * receives each input (the readers take paths), removed at exit. */
#ifndef MOE_FUZZ_COMMON_H
#define MOE_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_UNUSED __attribute__((unused))

static char fuzz_dir[64];

FUZZ_UNUSED static void fuzz_cleanup(void)
{
	char cmd[128];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", fuzz_dir);
	if (fuzz_dir[0] && system(cmd) != 0)
		fprintf(stderr, "cannot remove %s\n", fuzz_dir);
}

/* The per-process scratch directory, made on first use. */
FUZZ_UNUSED static const char *fuzz_scratch(void)
{
	if (!fuzz_dir[0]) {
		snprintf(fuzz_dir, sizeof fuzz_dir, "/tmp/moe_fuzz_XXXXXX");
		if (!mkdtemp(fuzz_dir))
			abort();
		atexit(fuzz_cleanup);
	}
	return fuzz_dir;
}

/* Write data to NAME in the scratch directory; returns its path (static). */
FUZZ_UNUSED static const char *fuzz_file(const char *name, const uint8_t *data, size_t size)
{
	static char path[160];
	snprintf(path, sizeof path, "%s/%s", fuzz_scratch(), name);
	FILE *f = fopen(path, "wb");
	if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0)
		abort();
	return path;
}

#endif
