/* progress.c: the progress line of long loads and benchmarks (progress.h):
 * stderr only, only on a terminal, only after the threshold. */
#include "progress.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void moe_progress_begin(struct moe_progress *p, const char *what)
{
	p->what = what;
	p->t0 = now_s();
	p->last = 0.0; /* the first step may draw */
	p->after = 1.0;
	const char *e = getenv("MOE_PROGRESS_AFTER");
	if (e && *e) {
		char *end;
		double v = strtod(e, &end);
		if (!*end && v >= 0.0)
			p->after = v;
	}
	p->tty = isatty(STDERR_FILENO) == 1;
	p->shown = 0;
}

static void draw(struct moe_progress *p, size_t done, size_t total, const char *item, double t)
{
	/* \r and clear-to-end-of-line: the line is redrawn in place */
	fprintf(stderr, "\r\033[K%s: %zu/%zu%s%s, %.1f s", p->what, done, total, item ? " " : "",
		item ? item : "", t - p->t0);
	fflush(stderr);
	p->shown = 1;
	p->last = t;
}

void moe_progress_step(struct moe_progress *p, size_t done, size_t total, const char *item)
{
	if (!p->tty)
		return;
	double t = now_s();
	if (t - p->t0 < p->after || t - p->last < 0.2)
		return;
	draw(p, done, total, item, t);
}

void moe_progress_clear(struct moe_progress *p)
{
	if (!p->tty || !p->shown)
		return;
	fputs("\r\033[K", stderr);
	fflush(stderr);
	p->shown = 0;
	p->last = 0.0; /* redraw at the next step */
}

void moe_progress_end(struct moe_progress *p)
{
	if (!p->tty || !p->shown)
		return;
	fprintf(stderr, "\r\033[K%s: done in %.1f s\n", p->what, now_s() - p->t0);
	fflush(stderr);
	p->shown = 0;
}
