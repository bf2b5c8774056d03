/* diag.c: the diagnostic sink (located errors, notes, warnings), did-you-mean
 * and the abort for broken invariants. */
#include "moegen.h"

#include <stdlib.h>
#include <string.h>

void moe_die(const char *file, int line, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "moegen: internal error at %s:%d: ", file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	moe_temp_remove_all();
	exit(MOE_EXIT_INTERNAL); /* docs/cli.md: 70, a broken invariant */
}

static void emit(struct moe_diag *d, struct moe_loc loc, const char *kind, const char *fmt,
		 va_list ap)
{
	char msg[2048];
	int n;
	if (d && d->sink_at) {
		vsnprintf(msg, sizeof msg, fmt, ap);
		d->sink_at(d->ctx, kind, loc, msg);
		return;
	}
	if (loc.file)
		n = snprintf(msg, sizeof msg, "%s:%u:%u: %s: ", loc.file, loc.line, loc.col, kind);
	else
		n = snprintf(msg, sizeof msg, "moegen: %s: ", kind);
	if (n < 0 || (size_t)n >= sizeof msg)
		n = 0;
	vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
	if (d && d->sink)
		d->sink(d->ctx, msg);
	else
		fprintf(stderr, "%s\n", msg);
}

void moe_diag_error_at(struct moe_diag *d, struct moe_loc loc, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	emit(d, loc, "error", fmt, ap);
	va_end(ap);
	if (d)
		d->n_errors++;
}

void moe_diag_warning_at(struct moe_diag *d, struct moe_loc loc, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	emit(d, loc, "warning", fmt, ap);
	va_end(ap);
	if (d)
		d->n_warnings++;
}

void moe_diag_note_at(struct moe_diag *d, struct moe_loc loc, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	emit(d, loc, "note", fmt, ap);
	va_end(ap);
}

void moe_diag_error(struct moe_diag *d, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	emit(d, (struct moe_loc){0}, "error", fmt, ap);
	va_end(ap);
	if (d)
		d->n_errors++;
}

/* Optimal string alignment distance: Levenshtein plus adjacent swaps, so
 * "dwon" is one edit from "down". */
int moe_edit_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	if (la > 64 || lb > 64)
		return 1 << 20;
	int rows[3][65];
	int *prev2 = rows[0], *prev = rows[1], *cur = rows[2];
	for (size_t j = 0; j <= lb; j++)
		prev[j] = (int)j;
	for (size_t i = 1; i <= la; i++) {
		cur[0] = (int)i;
		for (size_t j = 1; j <= lb; j++) {
			int best = prev[j - 1] + (a[i - 1] != b[j - 1]);
			if (prev[j] + 1 < best)
				best = prev[j] + 1;
			if (cur[j - 1] + 1 < best)
				best = cur[j - 1] + 1;
			if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
			    prev2[j - 2] + 1 < best)
				best = prev2[j - 2] + 1;
			cur[j] = best;
		}
		int *t = prev2;
		prev2 = prev;
		prev = cur;
		cur = t;
	}
	return prev[lb];
}

const char *moe_closest(const char *word, const char *const *cands, int n)
{
	const char *best = NULL;
	int best_d = 1 << 20;
	int len = (int)strlen(word);
	int limit = len <= 4 ? 1 : len <= 8 ? 2 : 3;
	for (int i = 0; i < n; i++) {
		int dist = moe_edit_distance(word, cands[i]);
		if (dist < best_d) {
			best_d = dist;
			best = cands[i];
		}
	}
	return best_d <= limit ? best : NULL;
}
