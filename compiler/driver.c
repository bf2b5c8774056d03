/* driver.c: the front half of every command: load the spec, apply --set
 * overrides, check and resolve it into a description. */
#include "moegen.h"

#include <stdlib.h>

int moe_front(const char *path, const char *const *sets, int n_sets, struct moe_desc *out,
	      struct moe_diag *d)
{
	char *text;
	size_t len;
	if (moe_spec_read(path, &text, &len, d) != 0)
		return MOE_EXIT_IO;
	struct moe_spec *s = moe_spec_load_string(path, text, len, d);
	free(text);
	if (!s)
		return MOE_EXIT_SPEC;
	int bad = 0;
	for (int i = 0; i < n_sets; i++)
		if (moe_spec_set(s, sets[i], d) != 0)
			bad = 1;
	if (!bad && moe_spec_check(s, out, d) != 0)
		bad = 1;
	moe_spec_free(s);
	return bad ? MOE_EXIT_SPEC : MOE_EXIT_OK;
}
