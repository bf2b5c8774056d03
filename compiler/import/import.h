/* import.h: `moegen import`, a Hugging Face config.json turned into an explicit
 * moegen spec (every MoE layer listed, weight names and layouts filled in, the
 * family's exact router semantics). docs/import.md lists the families. */
#ifndef MOE_IMPORT_H
#define MOE_IMPORT_H

#include <stdio.h>

#include "moegen.h"

/* Which stack of an encoder-decoder model (switch_transformers, nllb_moe) to
 * import; one spec describes one stack. Decoder-only families ignore it. */
enum moe_import_stack {
	MOE_IMPORT_ENCODER = 0,
	MOE_IMPORT_DECODER = 1,
};

struct moe_import_opts {
	enum moe_import_stack stack;
};

/* Read the config.json at json_path and write the spec text to out. Nothing is
 * written unless the whole import succeeds. Errors (unreadable file, malformed
 * JSON, unsupported model_type, a missing or mistyped field, a value the spec
 * language cannot express) go to d, each naming the file and the field;
 * facts the spec cannot record (e.g. a quantized checkpoint) are warnings.
 * Returns MOE_EXIT_OK, MOE_EXIT_SPEC (the config) or MOE_EXIT_IO. */
int moe_import(const char *json_path, FILE *out, struct moe_diag *d);
/* The same with options; o may be NULL (encoder stack). */
int moe_import_with(const char *json_path, const struct moe_import_opts *o, FILE *out,
		    struct moe_diag *d);

/* The model card of the imported spec, as JSON on out: "config", "family"
 * (the model_type), "stack", "notes" (the spec's comments: the semantics
 * chosen and what the spec cannot record), then every field of
 * moe_info_json (the model, "parameters" by part, "per_token" FLOPs and
 * weight bytes by format, "semantics"). Same errors as moe_import_with. */
int moe_import_card(const char *json_path, const struct moe_import_opts *o, FILE *out,
		    struct moe_diag *d);

/* The `moegen import CONFIG [-o SPEC] [--decoder]` command; argv[0] is
 * "import". -o writes to a temporary file beside SPEC and renames it, so a
 * failed import never leaves a partial spec. Returns an enum moe_exit code. */
int moe_cmd_import(int argc, char **argv);

/* `moegen gguf FILE.gguf [--tensor NAME -o OUT.f32]`: list a GGUF file, or
 * write one tensor's values as moegen reads them (cmd_gguf.c). */
int moe_cmd_gguf(int argc, char **argv);

#endif
