/* moegen.h: the compiler's one internal header. Sections follow the pipeline,
 * one per file: diag.c -> spec_load.c -> spec_check.c -> info.c -> plan.c ->
 * backends -> link.c, called in order by main.c. */
#ifndef MOEGEN_H
#define MOEGEN_H

#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "moe_desc.h"

/* Exit codes of the moegen command (docs/cli.md). */
enum moe_exit {
	MOE_EXIT_OK = 0,
	MOE_EXIT_SPEC = 1,     /* the spec (or an override) is invalid */
	MOE_EXIT_USAGE = 2,    /* bad command line */
	MOE_EXIT_IO = 3,       /* a file could not be read or written */
	MOE_EXIT_BACKEND = 4,  /* code generation, linking or the runtime failed */
	MOE_EXIT_CHECK = 5,    /* run --check found a mismatch with the reference */
	MOE_EXIT_INTERNAL = 70 /* a broken invariant (a moegen bug) */
};

/* Broken invariants only; user input never reaches these. moe_die prints
 * the C location, removes the temporaries and exits with MOE_EXIT_INTERNAL. */
#define MOE_ASSERT(c) ((c) ? (void)0 : moe_die(__FILE__, __LINE__, "assertion failed: %s", #c))
__attribute__((noreturn, format(printf, 3, 4))) void moe_die(const char *file, int line,
							     const char *fmt, ...);

/* diag.c ---------------------------------------------------------------- */

struct moe_loc {
	const char *file;   /* NULL: no location */
	uint32_t line, col; /* 1-based */
};

/* A diagnostic sink. Messages are whole lines without the trailing newline:
 * "FILE:LINE:COL: error: MESSAGE", "...: note: ...", or "moegen: error: ...".
 * With no callback they go to stderr. */
struct moe_diag {
	int n_errors;
	int n_warnings;
	void (*sink)(void *ctx, const char *line);
	void *ctx;
	/* When set, called instead of sink with the parts of the line: kind is
	 * "error", "warning" or "note"; loc.file is NULL when unlocated. */
	void (*sink_at)(void *ctx, const char *kind, struct moe_loc loc, const char *msg);
};

__attribute__((format(printf, 3, 4))) void moe_diag_error_at(struct moe_diag *d, struct moe_loc loc,
							     const char *fmt, ...);
__attribute__((format(printf, 3, 4))) void
moe_diag_warning_at(struct moe_diag *d, struct moe_loc loc, const char *fmt, ...);
__attribute__((format(printf, 3, 4))) void moe_diag_note_at(struct moe_diag *d, struct moe_loc loc,
							    const char *fmt, ...);
__attribute__((format(printf, 2, 3))) void moe_diag_error(struct moe_diag *d, const char *fmt, ...);
/* Levenshtein distance, for did-you-mean. */
int moe_edit_distance(const char *a, const char *b);
/* The closest of n candidates within a small distance, or NULL. */
const char *moe_closest(const char *word, const char *const *cands, int n);

/* spec_load.c ----------------------------------------------------------- */

/* The spec as written: a YAML document (libyaml document API) with the file
 * name and every node's line:col. Overrides from --set edit it in place. */
struct moe_spec;

/* Read a spec file whole (a regular file, opened without blocking, at most
 * 64 MiB) into *text (malloc'd, the caller frees). -1 with the error in d: a
 * file error (exit code MOE_EXIT_IO), not a spec error. */
int moe_spec_read(const char *path, char **text, size_t *len, struct moe_diag *d);
/* Parse a file / a buffer. Malformed YAML is reported located; NULL on failure. */
struct moe_spec *moe_spec_load(const char *path, struct moe_diag *d);
struct moe_spec *moe_spec_load_string(const char *name, const char *text, size_t len,
				      struct moe_diag *d);
/* Apply "a.b.c=VALUE" (VALUE is parsed as YAML: scalar, [list] or {map}).
 * Intermediate mappings are created as needed. 0 on success. */
int moe_spec_set(struct moe_spec *s, const char *assignment, struct moe_diag *d);
/* Canonical YAML text of the document (`moegen -d spec`). */
void moe_spec_dump(const struct moe_spec *s, FILE *out);
void moe_spec_free(struct moe_spec *s);
/* The document behind a spec, for spec_check.c (nodes are libyaml's
 * yaml_node_t; include <yaml.h> to use them). */
struct yaml_node_s;
const struct yaml_node_s *moe_spec_root(const struct moe_spec *s);
const struct yaml_node_s *moe_spec_node(const struct moe_spec *s, int id); /* 1-based */
struct moe_loc moe_spec_loc(const struct moe_spec *s, const struct yaml_node_s *n);

/* spec_check.c ---------------------------------------------------------- */

/* Validate and resolve the spec into a description: defaults applied, split
 * applied, layer list materialized. Every error of the stage is reported
 * before it returns. 0 on success. */
int moe_spec_check(const struct moe_spec *s, struct moe_desc *out, struct moe_diag *d);

/* info.c ---------------------------------------------------------------- */

/* Parameter accounting, in parameters (not bytes). */
struct moe_counts {
	double routed_total, routed_active; /* all MoE layers */
	double shared;                      /* shared experts, all MoE layers */
	double router;                      /* router, biases, noise, keys, queries */
	double dense_ffn;                   /* non-MoE layers' FFNs */
	double attention, embedding, norms; /* when the spec describes them */
	double total, active;
	double flops_per_token; /* 2 * active multiply-adds of the MoE layers' FFN + router */
	double weight_bytes_per_token; /* bytes of MoE-layer weights read per token at T = 1 */
	double weights_per_token;      /* those weights, counted (bytes in any format / size) */
	/* Conventions and breakdowns (docs/models.md). */
	double active_no_embed_in; /* active less the input embedding table (not when tied) */
	double experts_per_token;  /* routed expert applications per token, per mode */
	double layer_flops;        /* flops_per_token of one MoE layer */
	double layer_weight_bytes; /* weight_bytes_per_token of one MoE layer */
	double model_flops;        /* 2 * active matmul multiply-adds of the whole model per
				      token, attention scores excluded; 0 without attention */
};

void moe_info_count(const struct moe_desc *d, struct moe_counts *c);
void moe_info_print(const struct moe_desc *d, FILE *out);
/* The router in words ("softmax top-8", "capacity factor 2", ...), cap bytes. */
void moe_info_router(const struct moe_desc *d, char *buf, size_t cap);
/* report.c: `moegen --version`, and check / info as JSON (cJSON objects the
 * caller prints and deletes). */
struct cJSON;
void moe_version_print(FILE *out);
struct cJSON *moe_info_json(const struct moe_desc *d);
struct cJSON *moe_check_json(const char *spec, const struct moe_desc *d);

/* driver.c ------------------------------------------------------------- */

/* The front half every command shares: load SPEC, apply the --set overrides
 * in order, check. Diagnostics go to d. Returns MOE_EXIT_OK, MOE_EXIT_SPEC or
 * MOE_EXIT_IO. */
int moe_front(const char *path, const char *const *sets, int n_sets, struct moe_desc *out,
	      struct moe_diag *d);

/* output.c ------------------------------------------------------------- */

/* Open an input file (a spec, a config.json) for reading: without blocking
 * (a FIFO with no writer fails instead of hanging) and only when it is a
 * regular file. Returns the descriptor, or -1 with the error in d. */
int moe_input_open(const char *path, struct moe_diag *d);

/* An output file. moe_output_open resolves `path` through symlinks (the
 * target is what gets replaced), refuses a final file that exists and is not
 * a regular file (directory, device, FIFO, socket) or that is one of the
 * inputs[0, n_inputs) (same device and inode: symlinks and hard links
 * included), and creates a temporary beside it. Write through fd (or
 * moe_output_stream, or by path: tmp), then moe_output_commit renames it over
 * the final file with `mode` less the umask, or moe_output_abort removes it.
 * The temporary is removed if a signal ends the process meanwhile. Errors go
 * to err as "cannot write 'PATH': ..." / "refusing to write 'PATH': ...". */
struct moe_output {
	char shown[PATH_MAX]; /* the path as given, for messages */
	char path[PATH_MAX];  /* the file that is replaced */
	char tmp[PATH_MAX];   /* the temporary beside it; "" once committed or aborted */
	int fd;
	FILE *f;
	unsigned mode;
};
int moe_output_open(struct moe_output *o, const char *path, const char *const *inputs, int n_inputs,
		    unsigned mode, char *err, size_t cap);
/* Only the checks of moe_output_open, to refuse before a long computation. */
int moe_output_check(const char *path, const char *const *inputs, int n_inputs, char *err,
		     size_t cap);
FILE *moe_output_stream(struct moe_output *o);
int moe_output_write(struct moe_output *o, const void *data, size_t n, char *err, size_t cap);
int moe_output_commit(struct moe_output *o, char *err, size_t cap);
void moe_output_abort(struct moe_output *o);

/* Temporaries removed on SIGINT, SIGTERM, SIGHUP and SIGPIPE (the handlers are
 * installed with the first one; the signal then ends the process as usual).
 * moe_temp_file / moe_temp_dir create "$TMPDIR/PREFIX.XXXXXX" (default /tmp)
 * into buf and track it; moe_temp_track tracks a file about to be created;
 * moe_temp_remove deletes and forgets; moe_temp_forget only forgets.
 * moe_temp_child names the process group of a running tool (the linker), which
 * the handler terminates first; 0 when none. Create, then track, with the
 * signals blocked (moe_temp_block/unblock) so that no moment leaks. */
int moe_temp_file(char *buf, size_t cap, const char *prefix, char *err, size_t ecap);
int moe_temp_dir(char *buf, size_t cap, const char *prefix, char *err, size_t ecap);
int moe_temp_track(const char *path);
void moe_temp_remove(const char *path);
void moe_temp_forget(const char *path);
/* Remove every tracked temporary (moe_die calls it before exiting). */
void moe_temp_remove_all(void);
void moe_temp_child(pid_t pgid);
void moe_temp_block(sigset_t *old);
void moe_temp_unblock(const sigset_t *old);

#endif
