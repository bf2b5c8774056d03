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
	abort();
}

static void emit(struct moe_diag *d, struct moe_loc loc, const char *kind, const char *fmt,
		 va_list ap)
{
	char msg[2048];
	int n;
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

int moe_edit_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	if (la > 64 || lb > 64)
		return 1 << 20;
	int row[65];
	for (size_t j = 0; j <= lb; j++)
		row[j] = (int)j;
	for (size_t i = 1; i <= la; i++) {
		int diag = row[0];
		row[0] = (int)i;
		for (size_t j = 1; j <= lb; j++) {
			int up = row[j];
			int best = diag + (a[i - 1] != b[j - 1]);
			if (up + 1 < best)
				best = up + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			row[j] = best;
			diag = up;
		}
	}
	return row[lb];
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
