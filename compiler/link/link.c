/* link.c: the last stage: generated object + the runtime archive -> model.so
 * with the system C compiler driver as linker, plus the other --emit outputs
 * (obj, ll, asm, header). Every output goes through output.c: written under a
 * temporary name and renamed, so a failed or interrupted run never leaves a
 * broken file. */
#include "cuda.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <llvm-c/Core.h>
#include <llvm-c/TargetMachine.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static void errf(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t cap, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	if (err && cap)
		vsnprintf(err, cap, fmt, ap);
	va_end(ap);
}

/* The runtime a normalized LLVM triple links with ("x86_64-linux-gnu",
 * "aarch64-linux-gnu"), or NULL: the runtime needs Linux (pthreads, dlopen,
 * /proc) and hardware floating point. */
const char *moe_runtime_triple(const char *triple)
{
	static const char *const runtimes[] = {"x86_64-linux-gnu", "aarch64-linux-gnu"};
	size_t arch = strcspn(triple, "-");
	const char *os = strstr(triple, "-linux");
	if (!os || strstr(triple, "android") || strstr(triple, "musl") || strstr(triple, "eabi"))
		return NULL;
	for (size_t i = 0; i < sizeof runtimes / sizeof *runtimes; i++)
		if (strlen(runtimes[i]) > arch && !strncmp(runtimes[i], triple, arch) &&
		    runtimes[i][arch] == '-')
			return runtimes[i];
	return NULL;
}

/* Whether rt is the runtime of the machine moegen runs on. */
static int runtime_is_host(const char *rt)
{
#if defined(__x86_64__)
	return !strcmp(rt, "x86_64-linux-gnu");
#elif defined(__aarch64__)
	return !strcmp(rt, "aarch64-linux-gnu");
#else
	(void)rt;
	return 0;
#endif
}

int moe_find_beside(const char *rel, char *out, size_t cap)
{
	char exe[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n > 0) {
		exe[n] = 0;
		char *slash = strrchr(exe, '/');
		if (slash) {
			*slash = 0;
			snprintf(out, cap, "%s/%s", exe, rel);
			if (access(out, R_OK) == 0)
				return 0;
#ifdef MOE_INSTALL_LIBDIR
			/* installed: PREFIX/bin/moegen, PREFIX/LIBDIR/moegen/ */
			snprintf(out, cap, "%s/../%s/moegen/%s", exe, MOE_INSTALL_LIBDIR, rel);
			if (access(out, R_OK) == 0)
				return 0;
#endif
		}
	}
#ifdef MOE_BINARY_DIR
	snprintf(out, cap, "%s/%s", MOE_BINARY_DIR, rel);
	if (access(out, R_OK) == 0)
		return 0;
#endif
	return -1;
}

const char *moe_runtime_archive_for(const char *rt)
{
	static char path[PATH_MAX + 64];
	int host = !rt || runtime_is_host(rt);
	const char *env = getenv("MOE_RUNTIME_LIB");
	if (host && env && access(env, R_OK) == 0)
		return env;
	char rel[256];
	snprintf(rel, sizeof rel, "%s%slibmoe_runtime.a", host ? "" : rt, host ? "" : "/");
	return moe_find_beside(rel, path, sizeof path) == 0 ? path : NULL;
}

const char *moe_runtime_archive(void)
{
	return moe_runtime_archive_for(NULL);
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
static const char *const api_syms[] = {"moe_info",        "moe_describe",          "moe_create",
				       "moe_destroy",     "moe_load_safetensors",  "moe_load_gguf",
				       "moe_init_random", "moe_forward",           "moe_route",
				       "moe_route_stats", "moe_routing_from_sums", "moe_experts",
				       "moe_combine",     "moe_last_error"};
#define N_API (sizeof api_syms / sizeof *api_syms)

/* Run the linker: cc -shared -o out INPUTS... archive ... (objects, or C the
 * driver compiles), the exported names prefixed by prefix (aliases), the
 * SONAME soname. Captures its stderr into err on failure. */
static int run_linker(const char *rt, const char *const *inputs, int n_inputs, const char *vscript,
		      const char *prefix, const char *soname, const char *out, const char *logp,
		      char *err, size_t cap)
{
	int host = runtime_is_host(rt);
	const char *archive = moe_runtime_archive_for(rt);
	if (!archive && host) {
		errf(err, cap,
		     "cannot find the runtime archive libmoe_runtime.a next to moegen or in "
		     "the build directory (set MOE_RUNTIME_LIB)");
		return -1;
	}
	if (!archive) {
		errf(err, cap,
		     "no runtime archive for %s (%s/libmoe_runtime.a next to moegen, in the "
		     "build directory or the install): it is built when the cross compiler "
		     "%s-gcc is installed (scripts/deps.sh)",
		     rt, rt, rt);
		return -1;
	}
	/* the host's compiler driver, or the cross one of the target's runtime */
	char cross[64];
	snprintf(cross, sizeof cross, "%s-gcc", rt);
	const char *cc = getenv("MOE_CC");
	if (!host)
		cc = cross;
	else if (!cc || !*cc)
		cc = "cc";
	char vs[PATH_MAX + 64];
	snprintf(vs, sizeof vs, "-Wl,--version-script=%s", vscript);
	char und[N_API][64], def[N_API][2 * MOE_PREFIX_MAX + 64], so[PATH_MAX + 16];
	const char *argv[64];
	int a = 0;
	argv[a++] = cc;
	argv[a++] = "-shared";
	argv[a++] = "-o";
	argv[a++] = out;
	for (int i = 0; i < n_inputs; i++)
		argv[a++] = inputs[i];
	for (size_t i = 0; i < N_API; i++) {
		snprintf(und[i], sizeof und[i], "-Wl,--undefined=%s", api_syms[i]);
		argv[a++] = und[i];
		if (prefix && prefix[0]) { /* the exported name is an alias */
			snprintf(def[i], sizeof def[i], "-Wl,--defsym=%s%s=%s", prefix, api_syms[i],
				 api_syms[i]);
			argv[a++] = def[i];
		}
	}
	snprintf(so, sizeof so, "-Wl,-soname,%s", soname);
	argv[a++] = so;
	argv[a++] = archive;
	argv[a++] = vs;
	argv[a++] = "-Wl,-Bsymbolic";
	argv[a++] = "-Wl,-z,noexecstack";
#if defined(__SANITIZE_ADDRESS__)
	/* the host's runtime archive is instrumented in a sanitizer build */
	if (host)
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

/* runtime/moe.h, embedded at build time (CMakeLists.txt): the ABI part of the
 * headers moe_write_header writes. */
extern const char moe_abi_header[];

int moe_write_header(const struct moe_desc *d, const char *prefix, FILE *f)
{
	char hash[33], guard[MOE_NAME_MAX + 64], up[MOE_PREFIX_MAX + 1] = "";
	const char *pre = prefix ? prefix : "";
	for (size_t i = 0; pre[i] && i < MOE_PREFIX_MAX; i++)
		up[i] = (pre[i] >= 'a' && pre[i] <= 'z') ? (char)(pre[i] - 32) : pre[i],
		up[i + 1] = 0;
	moe_desc_hash(d, hash);
	size_t g = 0;
	g += (size_t)snprintf(guard, sizeof guard, "%sMOE_MODEL_", up);
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
	fprintf(f, "#ifndef %s\n#define %s\n\n", guard, guard);
	/* The ABI, runtime/moe.h verbatim (its own include guard), for users who
	 * do not have moegen's headers. */
	fputs(moe_abi_header, f);
	if (pre[0]) {
		fprintf(f, "\n/* This model's functions: moe.h's, named with the prefix '%s'. */\n",
			pre);
		for (size_t i = 0; i < N_API; i++)
			fprintf(f, "extern __typeof__(%s) %s%s;\n", api_syms[i], pre, api_syms[i]);
	}
	fprintf(f, "\n/* The constants of this model (moe_info() at compile time). */\n");
#define C_(name, fmt, ...) fprintf(f, "#define %sMOE_MODEL_" name " " fmt "\n", up, __VA_ARGS__)
	C_("NAME", "\"%s\"", d->name);
	C_("SPEC_HASH", "\"%s\"", hash);
	C_("HIDDEN", "%u", d->hidden);
	C_("LAYERS", "%u", d->n_layers);
	C_("N_MOE_LAYERS", "%u", d->n_moe_layers);
	C_("EXPERTS", "%u", d->n_experts);
	C_("TOP_K", "%u", d->top_k);
	C_("ROUTE_WIDTH", "%u", moe_desc_route_width(d));
	C_("INTERMEDIATE", "%u", d->intermediate);
	C_("SHARED_EXPERTS", "%u", d->shared_count);
	C_("SHARED_WIDTH", "%u", moe_desc_shared_width(d));
	static const char *const dtype_enum[MOE_DTYPE_COUNT] = {"F32", "BF16", "F16"};
	C_("WEIGHT_DTYPE", "MOE_DTYPE_%s", dtype_enum[d->weight_dtype]);
	C_("ACT_DTYPE", "MOE_DTYPE_%s", dtype_enum[d->act_dtype]);
	C_("ROUTER_MODE", "\"%s\"", moe_mode_names[d->mode]);
#undef C_
	fprintf(f, "static const uint32_t %smoe_model_moe_layers[%u] = {", pre,
		d->n_moe_layers ? d->n_moe_layers : 1);
	for (uint32_t i = 0; i < d->n_moe_layers; i++)
		fprintf(f, "%s%u", i ? ", " : "", d->moe_layers[i]);
	fprintf(f, "};\n\n#endif\n");
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
	struct moe_compile_opts o = {.cpu = t, .want_cpu = 1};
	return moe_compile_model(d, &o, kind, out, err, cap);
}

int moe_prefix_valid(const char *p)
{
	size_t n = strlen(p);
	if (n == 0 || n > MOE_PREFIX_MAX || (p[0] >= '0' && p[0] <= '9'))
		return 0;
	for (size_t i = 0; i < n; i++)
		if (!((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= 'A' && p[i] <= 'Z') ||
		      (p[i] >= '0' && p[i] <= '9') || p[i] == '_'))
			return 0;
	return 1;
}

int moe_compile_model(const struct moe_desc *d, const struct moe_compile_opts *o_,
		      enum moe_emit kind, const char *out, char *err, size_t cap)
{
	const struct moe_cpu_target *t = o_->cpu;
	int cpu = o_->want_cpu, n_archs = o_->n_archs;
	const char *const *archs = o_->archs;
	struct msgbuf mb = {err, cap};
	struct moe_diag diag = {.sink = capture, .ctx = &mb};
	if (err && cap)
		err[0] = 0;
	if (!cpu && kind != MOE_EMIT_SO) {
		errf(err, cap, "--emit %s needs --target cpu", moe_emit_names[kind]);
		return MOE_EXIT_USAGE;
	}
	/* The runtime the output links with: the host's, or a cross target's. */
	char *triple =
	    t && t->triple ? LLVMNormalizeTargetTriple(t->triple) : LLVMGetDefaultTargetTriple();
	const char *rt = moe_runtime_triple(triple);
	if (!rt) {
		errf(err, cap,
		     "target triple '%s' has no moegen runtime: models need Linux (pthreads, "
		     "dlopen) with hardware floating point; the runtimes are x86_64-linux-gnu "
		     "and aarch64-linux-gnu",
		     triple);
		LLVMDisposeMessage(triple);
		return MOE_EXIT_USAGE;
	}
	LLVMDisposeMessage(triple);
	/* The targets asked for, in table order; the CPU alone for the
	 * inspection outputs (obj, ll, asm) and none for the header. */
	int want[MOE_TARGET_COUNT] = {
	    [MOE_TARGET_CPU] = cpu, [MOE_TARGET_CUDA] = n_archs > 0 && kind == MOE_EMIT_SO};
	struct moe_backend_opts bo = {.cpu = t, .archs = archs, .n_archs = n_archs};
	struct moe_plan plan[MOE_TARGET_COUNT];
	for (int i = 0; i < MOE_TARGET_COUNT; i++) {
		if (want[i] && moe_plan_build(d, (enum moe_target)i, &plan[i], &diag) != 0) {
			if (err && cap && !err[0])
				errf(err, cap, "the spec is not supported for target %s",
				     moe_backends[i]->name);
			return MOE_EXIT_BACKEND;
		}
	}

	/* The output beside its final name (symlinks followed), refused when it
	 * is the runtime archive the link reads or not a regular file. */
	const char *inputs[1] = {kind == MOE_EMIT_SO ? moe_runtime_archive_for(rt) : NULL};
	struct moe_output o;
	if (moe_output_open(&o, out, inputs, 1, kind == MOE_EMIT_SO ? 0777 : 0666, err, cap) != 0)
		return MOE_EXIT_IO;

	if (kind == MOE_EMIT_HEADER) {
		FILE *f = moe_output_stream(&o);
		if (!f || moe_write_header(d, o_->prefix, f) != 0) {
			errf(err, cap, "cannot write '%s': %s", out, strerror(errno));
			moe_output_abort(&o);
			return MOE_EXIT_IO;
		}
		return moe_output_commit(&o, err, cap) == 0 ? 0 : MOE_EXIT_IO;
	}

	int rc = MOE_EXIT_IO;
	if (kind != MOE_EMIT_SO) { /* the CPU module as obj, ll or asm */
		char *buf = NULL;
		size_t len = 0;
		if (moe_cpu_generate(&plan[MOE_TARGET_CPU], t, kind, &buf, &len, err, cap) != 0)
			rc = MOE_EXIT_BACKEND;
		else if (moe_output_write(&o, buf, len, err, cap) == 0 &&
			 moe_output_commit(&o, err, cap) == 0)
			rc = 0;
		moe_output_abort(&o);
		free(buf);
		return rc;
	}

	/* model.so: each backend's link input in a work directory, then the link. */
	char dir[PATH_MAX];
	if (moe_temp_dir(dir, sizeof dir, "moegen", err, cap) != 0) {
		moe_output_abort(&o);
		return MOE_EXIT_IO;
	}
	const char *names[MOE_TARGET_COUNT + 2] = {"exports.map", "link.log"};
	char paths[MOE_TARGET_COUNT + 2][PATH_MAX + 32];
	const char *link_in[MOE_TARGET_COUNT];
	int n_names = 2, n_in = 0;
	snprintf(paths[0], sizeof paths[0], "%s/%s", dir, names[0]);
	snprintf(paths[1], sizeof paths[1], "%s/%s", dir, names[1]);
	moe_temp_track(paths[1]);
	char script[2048];
	/* the ABI's functions (prefixed when asked) in the version node of the
	 * ABI, everything else local */
	const char *pre = o_->prefix ? o_->prefix : "";
	size_t sl = (size_t)snprintf(script, sizeof script, "MOEGEN_ABI_%d {\n  global:\n",
				     MOE_ABI_VERSION);
	for (size_t i = 0; i < N_API; i++)
		sl += (size_t)snprintf(script + sl, sizeof script - sl, "    %s%s;\n", pre,
				       api_syms[i]);
	sl += (size_t)snprintf(script + sl, sizeof script - sl, "  local: *;\n};\n");
	int ok = write_all(paths[0], script, sl, err, cap) == 0;
	for (int i = 0; ok && i < MOE_TARGET_COUNT; i++) {
		if (!want[i])
			continue;
		const struct moe_backend *be = moe_backends[i];
		char *buf = NULL;
		size_t len = 0;
		if (be->generate(&plan[i], &bo, &buf, &len, err, cap) != 0) {
			rc = MOE_EXIT_BACKEND;
			ok = 0;
			break;
		}
		names[n_names] = be->link_name;
		snprintf(paths[n_names], sizeof paths[n_names], "%s/%s", dir, be->link_name);
		ok = write_all(paths[n_names], buf, len, err, cap) == 0;
		link_in[n_in++] = paths[n_names++];
		free(buf);
	}
	if (ok) {
		/* the linker writes the temporary by name */
		const char *base = strrchr(out, '/');
		if (run_linker(rt, link_in, n_in, paths[0], pre, base ? base + 1 : out, o.tmp,
			       paths[1], err, cap) != 0)
			rc = MOE_EXIT_BACKEND;
		else if (moe_output_commit(&o, err, cap) == 0)
			rc = 0;
	}
	moe_output_abort(&o);
	rm_work_dir(dir, names, n_names);
	return rc;
}
