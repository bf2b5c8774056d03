/* fuzz_spec.c: the spec loader and checker on arbitrary text (what `moegen
 * check` does with a file). Diagnostics go to a sink that drops them. */
#include "fuzz_common.h"
#include "moegen.h"

static void drop(void *ctx, const char *line)
{
	(void)ctx, (void)line;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moe_diag d = {.sink = drop};
	struct moe_spec *s = moe_spec_load_string("fuzz.yaml", (const char *)data, size, &d);
	if (!s)
		return 0;
	struct moe_desc *desc = calloc(1, sizeof *desc);
	if (desc)
		moe_spec_check(s, desc, &d);
	free(desc);
	moe_spec_free(s);
	return 0;
}
