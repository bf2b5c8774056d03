/* link.c: the last stage: generated object + the runtime archive -> model.so
 * with the system C compiler driver as linker, plus the other --emit outputs
 * (obj, ll, asm, header). Every output goes through output.c: written under a
 * temporary name and renamed, so a failed or interrupted run never leaves a
 * broken file. */
#include "cuda.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

/* SHA-256 (FIPS 180-4) of the model dump: the spec hash in moe_info(). */
struct sha256 {
	uint32_t h[8];
	uint64_t len;
	uint8_t buf[64];
	size_t n;
};

static const uint32_t sha_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static uint32_t ror(uint32_t x, int n)
{
	return (x >> n) | (x << (32 - n));
}

static void sha_block(struct sha256 *s, const uint8_t *p)
{
	uint32_t w[64], a[8];
	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (int i = 16; i < 64; i++) {
		uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	memcpy(a, s->h, sizeof a);
	for (int i = 0; i < 64; i++) {
		uint32_t s1 = ror(a[4], 6) ^ ror(a[4], 11) ^ ror(a[4], 25);
		uint32_t ch = (a[4] & a[5]) ^ (~a[4] & a[6]);
		uint32_t t1 = a[7] + s1 + ch + sha_k[i] + w[i];
		uint32_t s0 = ror(a[0], 2) ^ ror(a[0], 13) ^ ror(a[0], 22);
		uint32_t mj = (a[0] & a[1]) ^ (a[0] & a[2]) ^ (a[1] & a[2]);
		memmove(a + 1, a, 7 * sizeof *a);
		a[4] += t1;
		a[0] = t1 + s0 + mj;
	}
	for (int i = 0; i < 8; i++)
		s->h[i] += a[i];
}

static void sha_init(struct sha256 *s)
{
	static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
				       0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
	memcpy(s->h, h0, sizeof h0);
	s->len = 0;
	s->n = 0;
}

static void sha_update(struct sha256 *s, const void *data, size_t n)
{
	const uint8_t *p = data;
	s->len += n;
	while (n) {
		size_t take = 64 - s->n < n ? 64 - s->n : n;
		memcpy(s->buf + s->n, p, take);
		s->n += take;
		p += take;
		n -= take;
		if (s->n == 64) {
			sha_block(s, s->buf);
			s->n = 0;
		}
	}
}

static void sha_final(struct sha256 *s, char hex[65])
{
	uint64_t bits = s->len * 8;
	uint8_t pad = 0x80, zero = 0, lenb[8];
	sha_update(s, &pad, 1);
	while (s->n != 56)
		sha_update(s, &zero, 1);
	for (int i = 0; i < 8; i++)
		lenb[i] = (uint8_t)(bits >> (56 - 8 * i));
	sha_update(s, lenb, 8);
	for (int i = 0; i < 8; i++)
		snprintf(hex + 8 * i, 9, "%08x", s->h[i]);
}

void moe_desc_hash(const struct moe_desc *d, char hex[65])
{
	size_t n = moe_desc_dump(d, NULL, 0);
	char *buf = malloc(n + 1);
	struct sha256 s;
	sha_init(&s);
	if (buf) {
		moe_desc_dump(d, buf, n + 1);
		sha_update(&s, buf, n);
		free(buf);
	}
	sha_final(&s, hex);
}

static void errf(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t cap, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	if (err && cap)
		vsnprintf(err, cap, fmt, ap);
	va_end(ap);
}

const char *moe_runtime_archive(void)
{
	static char path[PATH_MAX + 32];
	const char *env = getenv("MOE_RUNTIME_LIB");
	if (env && access(env, R_OK) == 0)
		return env;
	char exe[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n > 0) {
		exe[n] = 0;
		char *slash = strrchr(exe, '/');
		if (slash) {
			*slash = 0;
			snprintf(path, sizeof path, "%s/libmoe_runtime.a", exe);
			if (access(path, R_OK) == 0)
				return path;
		}
	}
#ifdef MOE_BINARY_DIR
	snprintf(path, sizeof path, "%s/libmoe_runtime.a", MOE_BINARY_DIR);
	if (access(path, R_OK) == 0)
		return path;
#endif
	return NULL;
}

/* A file of the work directory, tracked so that a signal removes it. */
static int write_all(const char *path, const void *data, size_t n, char *err, size_t cap)
{
	moe_temp_track(path);
	FILE *f = fopen(path, "wb");
	if (!f) {
		errf(err, cap, "cannot write '%s': %s", path, strerror(errno));
		return -1;
	}
	size_t w = n ? fwrite(data, 1, n, f) : 0;
	int bad = w != n;
	if (fclose(f) != 0)
		bad = 1;
	if (bad) {
		errf(err, cap, "cannot write '%s': %s", path, strerror(errno));
		return -1;
	}
	return 0;
}

/* The symbols of runtime/moe.h that model.so exports (and only those). */
static const char *const api_syms[] = {
    "moe_info",        "moe_create",  "moe_destroy",   "moe_load_safetensors",
    "moe_init_random", "moe_forward", "moe_last_error"};
#define N_API (sizeof api_syms / sizeof *api_syms)

/* Run the linker: cc -shared -o out obj archive ... Captures its stderr
 * into err on failure. */
static int run_linker(const char *obj, const char *images, const char *vscript, const char *out,
		      const char *logp, char *err, size_t cap)
{
	const char *archive = moe_runtime_archive();
	if (!archive) {
		errf(err, cap,
		     "cannot find the runtime archive libmoe_runtime.a next to moegen or in "
		     "the build directory (set MOE_RUNTIME_LIB)");
		return -1;
	}
	const char *cc = getenv("MOE_CC");
	if (!cc || !*cc)
		cc = "cc";
	char vs[PATH_MAX + 64];
	snprintf(vs, sizeof vs, "-Wl,--version-script=%s", vscript);
	char und[N_API][64];
	const char *argv[64];
	int a = 0;
	argv[a++] = cc;
	argv[a++] = "-shared";
	argv[a++] = "-o";
	argv[a++] = out;
	if (obj)
		argv[a++] = obj;
	if (images) /* the CUDA images, plain C */
		argv[a++] = images;
	for (size_t i = 0; i < N_API; i++) {
		snprintf(und[i], sizeof und[i], "-Wl,--undefined=%s", api_syms[i]);
		argv[a++] = und[i];
	}
	argv[a++] = archive;
	argv[a++] = vs;
	argv[a++] = "-Wl,-Bsymbolic";
	argv[a++] = "-Wl,-z,noexecstack";
#if defined(__SANITIZE_ADDRESS__)
	/* the runtime archive is instrumented in a sanitizer build */
	argv[a++] = "-fsanitize=address,undefined";
#endif
	argv[a++] = "-lcjson";
	argv[a++] = "-lm";
	argv[a++] = "-lpthread";
	argv[a++] = "-ldl";
	argv[a] = NULL;

	/* The linker runs in its own process group, which output.c's signal
	 * handler interrupts (and waits for the driver) before it removes the
	 * temporaries, so that the linker does not write after them. The signals
	 * stay blocked from the spawn until the group is recorded; the child
	 * starts with an empty mask. */
	posix_spawn_file_actions_t fa;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 1, logp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	posix_spawn_file_actions_adddup2(&fa, 1, 2);
	posix_spawnattr_t at;
	sigset_t none, dfl, old;
	sigemptyset(&none);
	sigemptyset(&dfl); /* SIGINT ends the linker even where moegen's caller ignores it */
	sigaddset(&dfl, SIGINT);
	posix_spawnattr_init(&at);
	posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK |
					  POSIX_SPAWN_SETSIGDEF);
	posix_spawnattr_setpgroup(&at, 0);
	posix_spawnattr_setsigmask(&at, &none);
	posix_spawnattr_setsigdefault(&at, &dfl);
	pid_t pid;
	moe_temp_block(&old);
	int rc = posix_spawnp(&pid, cc, &fa, &at, (char *const *)argv, environ);
	if (rc == 0)
		moe_temp_child(pid);
	moe_temp_unblock(&old);
	posix_spawnattr_destroy(&at);
	posix_spawn_file_actions_destroy(&fa);
	if (rc != 0) {
		errf(err, cap, "cannot run the linker '%s': %s", cc, strerror(rc));
		return -1;
	}
	int st;
	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR) {
			moe_temp_child(0);
			errf(err, cap, "waiting for the linker: %s", strerror(errno));
			return -1;
		}
	moe_temp_child(0);
	if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
		return 0;
	char log[1024] = "";
	FILE *f = fopen(logp, "r");
	if (f) {
		size_t n = fread(log, 1, sizeof log - 1, f);
		log[n] = 0;
		fclose(f);
	}
	errf(err, cap, "linking failed (%s): %s", cc, log);
	return -1;
}

static void rm_work_dir(const char *dir, const char *const *names, int n)
{
	char p[PATH_MAX + 32];
	for (int i = 0; i < n; i++) {
		snprintf(p, sizeof p, "%s/%s", dir, names[i]);
		moe_temp_remove(p);
		unlink(p);
	}
	moe_temp_remove(dir);
}

int moe_write_header(const struct moe_desc *d, FILE *f)
{
	char hash[65], guard[MOE_NAME_MAX + 16];
	moe_desc_hash(d, hash);
	size_t g = 0;
	g += (size_t)snprintf(guard, sizeof guard, "MOE_MODEL_");
	for (const char *s = d->name; *s && g + 3 < sizeof guard; s++)
		guard[g++] = (*s >= 'a' && *s <= 'z') ? (char)(*s - 32)
			     : ((*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9')) ? *s
										      : '_';
	guard[g++] = '_';
	guard[g++] = 'H';
	guard[g] = 0;
	fprintf(f, "/* The model '%s' generated by moegen (spec hash %s).\n", d->name, hash);
	fprintf(f, " * Link with the model.so built from the same spec, or with the object from\n"
		   " * `moegen SPEC --emit obj` plus the runtime archive libmoe_runtime.a. */\n");
	fprintf(f, "#ifndef %s\n#define %s\n\n#include <stddef.h>\n#include <stdint.h>\n\n", guard,
		guard);
	fprintf(f, "#define MOE_MODEL_NAME \"%s\"\n", d->name);
	fprintf(f, "#define MOE_MODEL_SPEC_HASH \"%s\"\n", hash);
	fprintf(f, "#define MOE_MODEL_HIDDEN %u\n", d->hidden);
	fprintf(f, "#define MOE_MODEL_LAYERS %u\n", d->n_layers);
	fprintf(f, "#define MOE_MODEL_N_MOE_LAYERS %u\n", d->n_moe_layers);
	fprintf(f, "#define MOE_MODEL_EXPERTS %u\n", d->n_experts);
	fprintf(f, "#define MOE_MODEL_TOP_K %u\n", d->top_k);
	fprintf(f, "#define MOE_MODEL_ROUTE_WIDTH %u\n", moe_desc_route_width(d));
	fprintf(f, "#define MOE_MODEL_INTERMEDIATE %u\n", d->intermediate);
	fprintf(f, "#define MOE_MODEL_SHARED_WIDTH %u\n", moe_desc_shared_width(d));
	fprintf(f, "#define MOE_MODEL_WEIGHT_DTYPE \"%s\"\n", moe_dtype_names[d->weight_dtype]);
	fprintf(f, "#define MOE_MODEL_ACT_DTYPE \"%s\"\n", moe_dtype_names[d->act_dtype]);
	fprintf(f, "#define MOE_MODEL_ROUTER_MODE \"%s\"\n", moe_mode_names[d->mode]);
	fprintf(f, "static const uint32_t moe_model_moe_layers[%u] = {",
		d->n_moe_layers ? d->n_moe_layers : 1);
	for (uint32_t i = 0; i < d->n_moe_layers; i++)
		fprintf(f, "%s%u", i ? ", " : "", d->moe_layers[i]);
	fprintf(f, "};\n\n");
	/* The ABI of runtime/moe.h, for users who do not have moegen's headers. */
	fprintf(f, "#ifndef MOE_REF_H\n"
		   "enum moe_status {\n\tMOE_OK = 0,\n\tMOE_ERR_ARG,\n\tMOE_ERR_INPUT,\n"
		   "\tMOE_ERR_NOMEM,\n\tMOE_ERR_WEIGHTS,\n\tMOE_ERR_IO,\n\tMOE_ERR_UNSUPPORTED,\n"
		   "\tMOE_ERR_DEVICE,\n\tMOE_ERR_BUSY,\n\tMOE_ERR_INTERNAL,\n"
		   "\tMOE_STATUS_COUNT\n};\n"
		   "struct moe_fwd_opts {\n\tint training;\n\tuint64_t seed;\n\tuint32_t layer;\n"
		   "};\n"
		   "struct moe_routing {\n\tint32_t *expert_ids;\n\tfloat *weights;\n"
		   "\tint64_t *counts;\n\tfloat *importance;\n\tfloat importance_cv2;\n"
		   "\tfloat lb_loss;\n\tfloat z_loss;\n\tint64_t n_dropped;\n};\n"
		   "struct moe_desc;\n"
		   "enum moe_dtype { MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16, "
		   "MOE_DTYPE_COUNT };\n"
		   "#endif\n\n");
	fprintf(f,
		"#ifndef MOE_H\n#define MOE_H\n#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
		"#define MOE_ABI_VERSION 1\n"
		"enum moe_device { MOE_DEVICE_CPU = 0, MOE_DEVICE_CUDA = 1 };\n"
		"struct moe_info {\n\tuint32_t abi_version;\n\tconst char *name;\n"
		"\tconst struct moe_desc *desc;\n"
		"\tuint32_t hidden, n_experts, top_k, route_width, n_layers, n_moe_layers;\n"
		"\tenum moe_dtype weight_dtype, act_dtype;\n\tuint32_t targets;\n"
		"\tconst char *spec_hash;\n\tconst char *cpu;\n};\n"
		"struct moe_create_opts {\n\tuint32_t threads;\n\tenum moe_device device;\n"
		"\tvoid *stream;\n};\n"
		"typedef struct moe_model moe_model;\n"
		"const struct moe_info *moe_info(void);\n"
		"enum moe_status moe_create(moe_model **m, const struct moe_create_opts *opts);\n"
		"void moe_destroy(moe_model *m);\n"
		"enum moe_status moe_load_safetensors(moe_model *m, const char *const *files, "
		"size_t n_files);\n"
		"enum moe_status moe_init_random(moe_model *m, uint64_t seed);\n"
		"enum moe_status moe_forward(moe_model *m, uint32_t layer, const void *x, void "
		"*y, size_t n_tokens,\n\t\t\t    struct moe_routing *routing, const struct "
		"moe_fwd_opts *opts);\n"
		"const char *moe_last_error(void);\n"
		"#ifdef __cplusplus\n}\n#endif\n#endif\n\n#endif\n");
	return ferror(f) ? -1 : 0;
}

struct msgbuf {
	char *buf;
	size_t cap;
};

/* Keep the first diagnostic, without its "moegen: error: " prefix. */
static void capture(void *ctx, const char *line)
{
	struct msgbuf *m = ctx;
	static const char pre[] = "moegen: error: ";
	if (!m->buf || !m->cap || m->buf[0])
		return;
	if (strncmp(line, pre, sizeof pre - 1) == 0)
		line += sizeof pre - 1;
	snprintf(m->buf, m->cap, "%s", line);
}

int moe_compile_cpu(const struct moe_desc *d, const struct moe_cpu_target *t, enum moe_emit kind,
		    const char *out, char *err, size_t cap)
{
	return moe_compile_model(d, t, 1, NULL, 0, kind, out, err, cap);
}

int moe_compile_model(const struct moe_desc *d, const struct moe_cpu_target *t, int cpu,
		      const char *const *archs, int n_archs, enum moe_emit kind, const char *out,
		      char *err, size_t cap)
{
	struct moe_plan plan, cplan;
	struct msgbuf mb = {err, cap};
	struct moe_diag diag = {.sink = capture, .ctx = &mb};
	if (err && cap)
		err[0] = 0;
	if (!cpu && kind != MOE_EMIT_SO) {
		errf(err, cap, "--emit %s needs --target cpu", moe_emit_names[kind]);
		return MOE_EXIT_USAGE;
	}
	if (cpu && moe_plan_build(d, MOE_TARGET_CPU, &plan, &diag) != 0) {
		if (err && cap && !err[0])
			errf(err, cap, "the spec is not supported for target cpu");
		return MOE_EXIT_BACKEND;
	}
	char *images = NULL;
	size_t images_len = 0;
	if (n_archs > 0 && kind == MOE_EMIT_SO) {
		if (moe_cuda_plan_build(d, &cplan, &diag) != 0) {
			if (err && cap && !err[0])
				errf(err, cap, "the spec is not supported for target cuda");
			return MOE_EXIT_BACKEND;
		}
		if (moe_cuda_generate(&cplan, archs, n_archs, MOE_CUDA_EMIT_IMAGES, &images,
				      &images_len, err, cap) != 0)
			return MOE_EXIT_BACKEND;
	}

	/* The output beside its final name (symlinks followed), refused when it
	 * is the runtime archive the link reads or not a regular file. */
	const char *inputs[1] = {kind == MOE_EMIT_SO ? moe_runtime_archive() : NULL};
	struct moe_output o;
	if (moe_output_open(&o, out, inputs, 1, kind == MOE_EMIT_SO ? 0777 : 0666, err, cap) != 0) {
		free(images);
		return MOE_EXIT_IO;
	}

	if (kind == MOE_EMIT_HEADER) {
		FILE *f = moe_output_stream(&o);
		if (!f || moe_write_header(d, f) != 0) {
			errf(err, cap, "cannot write '%s': %s", out, strerror(errno));
			moe_output_abort(&o);
			return MOE_EXIT_IO;
		}
		return moe_output_commit(&o, err, cap) == 0 ? 0 : MOE_EXIT_IO;
	}

	char *buf = NULL;
	size_t len = 0;
	enum moe_emit gk = kind == MOE_EMIT_SO ? MOE_EMIT_OBJ : kind;
	if (cpu && moe_cpu_generate(&plan, t, gk, &buf, &len, err, cap) != 0) {
		moe_output_abort(&o);
		free(images);
		return MOE_EXIT_BACKEND;
	}
	int rc = MOE_EXIT_IO;
	if (kind != MOE_EMIT_SO) {
		if (moe_output_write(&o, buf, len, err, cap) == 0 &&
		    moe_output_commit(&o, err, cap) == 0)
			rc = 0;
		moe_output_abort(&o);
		free(buf);
		return rc;
	}

	char dir[PATH_MAX];
	if (moe_temp_dir(dir, sizeof dir, "moegen", err, cap) != 0) {
		moe_output_abort(&o);
		free(buf);
		free(images);
		return MOE_EXIT_IO;
	}
	static const char *const names[] = {"model.o", "exports.map", "link.log", "cuda_images.c"};
	char obj[PATH_MAX + 16], vs[PATH_MAX + 16], logp[PATH_MAX + 16], img[PATH_MAX + 16];
	snprintf(obj, sizeof obj, "%s/%s", dir, names[0]);
	snprintf(vs, sizeof vs, "%s/%s", dir, names[1]);
	snprintf(logp, sizeof logp, "%s/%s", dir, names[2]);
	snprintf(img, sizeof img, "%s/%s", dir, names[3]);
	moe_temp_track(logp);
	char script[512];
	size_t sl = (size_t)snprintf(script, sizeof script, "{\n  global:\n");
	for (size_t i = 0; i < N_API; i++)
		sl += (size_t)snprintf(script + sl, sizeof script - sl, "    %s;\n", api_syms[i]);
	sl += (size_t)snprintf(script + sl, sizeof script - sl, "  local: *;\n};\n");
	if ((!cpu || write_all(obj, buf, len, err, cap) == 0) &&
	    (!images || write_all(img, images, images_len, err, cap) == 0) &&
	    write_all(vs, script, sl, err, cap) == 0) {
		/* the linker writes the temporary by name */
		if (run_linker(cpu ? obj : NULL, images ? img : NULL, vs, o.tmp, logp, err, cap) !=
		    0)
			rc = MOE_EXIT_BACKEND;
		else if (moe_output_commit(&o, err, cap) == 0)
			rc = 0;
	}
	moe_output_abort(&o);
	free(buf);
	free(images);
	rm_work_dir(dir, names, 4);
	return rc;
}
