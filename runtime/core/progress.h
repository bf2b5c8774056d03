/* progress.h: a progress line on stderr for long loads and benchmarks. It
 * appears only when stderr is a terminal and the work has taken longer than a
 * second (MOE_PROGRESS_AFTER=SECONDS changes the threshold), is redrawn in
 * place at most a few times a second, and is ended with a newline. Quiet
 * otherwise: logs and pipes get nothing. */
#ifndef MOE_PROGRESS_H
#define MOE_PROGRESS_H

#include <stddef.h>

struct moe_progress {
	const char *what; /* "loading weights", "bench" */
	double t0, last;  /* start, last redraw (seconds, monotonic) */
	double after;     /* seconds before the first line */
	int tty, shown;
};

/* Start timing `what` (a static string). */
void moe_progress_begin(struct moe_progress *p, const char *what);
/* done of total steps finished; `item` (may be NULL) names the current step. */
void moe_progress_step(struct moe_progress *p, size_t done, size_t total, const char *item);
/* Wipe a shown line (before other output to the terminal); the next step
 * draws it again. */
void moe_progress_clear(struct moe_progress *p);
/* Finish: when a line was shown, a last one with the total time and a newline. */
void moe_progress_end(struct moe_progress *p);

#endif
