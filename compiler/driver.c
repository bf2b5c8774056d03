/* driver.c: the front half of every command: load the spec, apply --set
 * overrides, check and resolve it into a description. */
#include "moegen.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

int moe_front(const char *path, const char *const *sets, int n_sets, struct moe_desc *out,
	      struct moe_diag *d)
{
	if (access(path, R_OK) != 0) {
		moe_diag_error(d, "cannot read '%s': %s", path, strerror(errno));
		return MOE_EXIT_IO;
	}
	struct moe_spec *s = moe_spec_load(path, d);
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
