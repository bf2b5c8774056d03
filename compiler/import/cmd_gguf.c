/* cmd_gguf.c: `moegen gguf FILE.gguf`: what a GGUF file holds (version,
 * metadata, tensors with their ggml types and shapes), and one tensor's
 * values as moegen reads them (--tensor NAME -o OUT: raw little-endian f32,
 * the quantized types through the codes and scales they are kept as). */
#include "gguf.h"
#include "import.h"

#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: moegen gguf FILE.gguf [--tensor NAME -o OUT.f32]\n"
    "List a GGUF file's metadata keys and tensors (name, type, shape slowest axis\n"
    "first). With --tensor and -o, write the tensor's values as raw f32: F32, F16\n"
    "and BF16 converted, Q8_0, Q6_K, Q5_0, Q4_0, Q4_1 and Q4_K decoded to the\n"
    "codes, scales and offsets that experts are kept in and expanded\n"
    "(W = code * scale + offset).\n";

static int dump_values(const struct moe_gguf_tensor *t, const char *out)
{
	char err[1024];
	float *v = malloc(t->numel * sizeof *v);
	int rc = MOE_EXIT_IO;
	if (!v) {
		fprintf(stderr, "moegen: error: out of memory\n");
		return MOE_EXIT_IO;
	}
	struct moe_qfmt f;
	if (moe_gguf_qfmt(t->type, &f) == 0) {
		uint64_t K = t->ne[0], rows = t->numel / K;
		unsigned char *raw = malloc(t->bytes);
		uint8_t *codes = malloc(t->numel);
		float *s = malloc(t->numel / f.group * sizeof *s),
		      *o = malloc(t->numel / f.group * sizeof *o);
		if (!raw || !codes || !s || !o) {
			fprintf(stderr, "moegen: error: out of memory\n");
		} else if (moe_gguf_read(t, raw, err, sizeof err) != MOE_OK) {
			fprintf(stderr, "moegen: error: %s\n", err);
		} else {
			int64_t bad = moe_gguf_decode(t->type, raw, rows, K, codes, s, o);
			if (bad >= 0)
				fprintf(stderr,
					"moegen: warning: %s: tensor '%s': group %lld has a "
					"non-finite scale or offset\n",
					t->file, t->name, (long long)bad);
			moe_qdequant(&f, codes, s, f.kind == MOE_QFORMAT_INT8 ? NULL : o, rows, K,
				     v);
			rc = MOE_EXIT_OK;
		}
		free(raw), free(codes), free(s), free(o);
	} else if (moe_gguf_read_f32(t, v, t->numel, err, sizeof err) != MOE_OK) {
		fprintf(stderr, "moegen: error: %s\n", err);
	} else {
		rc = MOE_EXIT_OK;
	}
	if (rc == MOE_EXIT_OK) {
		FILE *fp = fopen(out, "wb");
		if (!fp || fwrite(v, sizeof *v, t->numel, fp) != t->numel) {
			fprintf(stderr, "moegen: error: cannot write '%s'\n", out);
			rc = MOE_EXIT_IO;
		}
		if (fp && fclose(fp) != 0)
			rc = MOE_EXIT_IO;
	}
	free(v);
	return rc;
}

int moe_cmd_gguf(int argc, char **argv)
{
	const char *path = NULL, *tensor = NULL, *out = NULL;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			fputs(usage, stdout);
			return MOE_EXIT_OK;
		} else if (!strcmp(argv[i], "--tensor") && i + 1 < argc) {
			tensor = argv[++i];
		} else if (!strcmp(argv[i], "-o") && i + 1 < argc) {
			out = argv[++i];
		} else if (argv[i][0] != '-' && !path) {
			path = argv[i];
		} else {
			fprintf(stderr, "moegen: error: unexpected argument '%s'\n%s", argv[i],
				usage);
			return MOE_EXIT_USAGE;
		}
	}
	if (!path || !tensor != !out) {
		fputs(usage, stderr);
		return MOE_EXIT_USAGE;
	}
	char err[1024];
	struct moe_gguf_file *f;
	enum moe_status st = moe_gguf_open(path, &f, err, sizeof err);
	if (st != MOE_OK) {
		fprintf(stderr, "moegen: error: %s\n", err);
		return st == MOE_ERR_IO ? MOE_EXIT_IO : MOE_EXIT_SPEC;
	}
	int rc = MOE_EXIT_OK;
	if (tensor) {
		const struct moe_gguf_tensor *t = moe_gguf_find(f, tensor);
		if (!t) {
			fprintf(stderr, "moegen: error: %s: no tensor '%s'\n", path, tensor);
			rc = MOE_EXIT_SPEC;
		} else {
			rc = dump_values(t, out);
		}
	} else {
		printf("GGUF version %u, alignment %llu, %zu keys, %zu tensors\n",
		       moe_gguf_version(f), (unsigned long long)moe_gguf_alignment(f),
		       moe_gguf_kv_count(f), moe_gguf_count(f));
		for (size_t i = 0; i < moe_gguf_kv_count(f); i++) {
			const struct moe_gguf_kv *kv = moe_gguf_kv_at(f, i);
			printf("key %s ", kv->key);
			if (kv->type == MOE_GGUF_STRING)
				printf("\"%.60s\"\n", kv->s);
			else if (kv->type == MOE_GGUF_ARRAY)
				printf("[%llu]\n", (unsigned long long)kv->arr_n);
			else if (kv->type == MOE_GGUF_F32 || kv->type == MOE_GGUF_F64)
				printf("%.9g\n", kv->f);
			else if (kv->type == MOE_GGUF_I8 || kv->type == MOE_GGUF_I16 ||
				 kv->type == MOE_GGUF_I32 || kv->type == MOE_GGUF_I64)
				printf("%lld\n", (long long)kv->i);
			else
				printf("%llu\n", (unsigned long long)kv->u);
		}
		for (size_t i = 0; i < moe_gguf_count(f); i++) {
			const struct moe_gguf_tensor *t = moe_gguf_at(f, i);
			printf("tensor %s %s [", t->name, moe_gguf_type_name(t->type));
			for (uint32_t k = 0; k < t->ndim; k++)
				printf("%s%llu", k ? ", " : "", (unsigned long long)t->shape[k]);
			printf("]\n");
		}
	}
	moe_gguf_close(f);
	return rc;
}
