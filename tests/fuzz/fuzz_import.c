/* fuzz_import.c: `moegen import` on an arbitrary config.json, both stacks;
 * whatever imports must load and check (the importer's own promise), or the
 * target aborts. */
#include "fuzz_common.h"
#include "import.h"
#include "moegen.h"

static void drop(void *ctx, const char *line)
{
	(void)ctx, (void)line;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *path = fuzz_file("config.json", data, size);
	for (int st = 0; st < 2; st++) {
		struct moe_diag d = {.sink = drop};
		char *out = NULL;
		size_t len = 0;
		FILE *mem = open_memstream(&out, &len);
		if (!mem)
			abort();
		struct moe_import_opts o = {st ? MOE_IMPORT_DECODER : MOE_IMPORT_ENCODER};
		int rc = moe_import_with(path, &o, mem, &d);
		fclose(mem);
		if (rc == MOE_EXIT_OK) {
			struct moe_diag c = {.sink = drop};
			struct moe_spec *s = moe_spec_load_string("imported.yaml", out, len, &c);
			struct moe_desc *desc = calloc(1, sizeof *desc);
			if (!s || !desc || moe_spec_check(s, desc, &c) != 0 || c.n_errors) {
				fprintf(stderr, "imported, but does not check:\n%s\n", out);
				abort();
			}
			free(desc);
			moe_spec_free(s);
		} else if (len) {
			fprintf(stderr, "failed import wrote %zu bytes\n", len);
			abort();
		}
		free(out);
	}
	return 0;
}
