/* output.c: the files the commands read and write. An input is opened without
 * blocking and must be a regular file. An output is refused when it is one of
 * the command's inputs or exists and is not a regular file; it is written to
 * a temporary beside its final name (symlinks followed) and renamed over it.
 * Temporaries are removed when a signal ends the process. */
#include "moegen.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static void errf(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t cap, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	if (err && cap)
		vsnprintf(err, cap, fmt, ap);
	va_end(ap);
}

static const char *kind_name(mode_t m)
{
	if (S_ISDIR(m))
		return "a directory";
	if (S_ISCHR(m))
		return "a character device";
	if (S_ISBLK(m))
		return "a block device";
	if (S_ISFIFO(m))
		return "a FIFO";
	if (S_ISSOCK(m))
		return "a socket";
	return "not a regular file";
}

/* Temporaries ------------------------------------------------------------ */

/* The handler reads these; a slot's path is written before its kind is set.
 * One thread at a time creates and removes temporaries (a compile tracks at
 * most seven). */
#define MAX_TEMPS 32
enum { TEMP_FREE, TEMP_FILE, TEMP_DIR };
static char temp_path[MAX_TEMPS][PATH_MAX];
static volatile sig_atomic_t temp_kind[MAX_TEMPS];
static volatile sig_atomic_t temp_child; /* process group of a running tool, or 0 */
static int handlers_installed;

static const int caught[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE};
#define N_CAUGHT (int)(sizeof caught / sizeof *caught)

/* Only async-signal-safe calls: kill, waitpid, unlink, rmdir, signal, raise. */
static void on_signal(int sig)
{
	int saved = errno;
	pid_t child = (pid_t)temp_child;
	if (child > 0) {
		/* SIGINT: the signal the compiler driver and collect2 clean up after
		 * themselves on (collect2 leaves its files on SIGTERM) */
		kill(-child, SIGINT);
		while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
			;
	}
	for (int i = 0; i < MAX_TEMPS; i++)
		if (temp_kind[i] == TEMP_FILE)
			unlink(temp_path[i]);
	for (int i = MAX_TEMPS - 1; i >= 0; i--)
		if (temp_kind[i] == TEMP_DIR)
			rmdir(temp_path[i]);
	signal(sig, SIG_DFL);
	raise(sig); /* delivered when the handler returns: the usual death by sig */
	errno = saved;
}

static void install_handlers(void)
{
	if (handlers_installed)
		return;
	handlers_installed = 1;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	for (int i = 0; i < N_CAUGHT; i++)
		sigaddset(&sa.sa_mask, caught[i]);
	for (int i = 0; i < N_CAUGHT; i++) {
		struct sigaction old;
		/* a signal the caller ignores (nohup) stays ignored */
		if (sigaction(caught[i], NULL, &old) == 0 && old.sa_handler != SIG_IGN)
			sigaction(caught[i], &sa, NULL);
	}
}

void moe_temp_block(sigset_t *old)
{
	sigset_t set;
	sigemptyset(&set);
	for (int i = 0; i < N_CAUGHT; i++)
		sigaddset(&set, caught[i]);
	pthread_sigmask(SIG_BLOCK, &set, old);
}

void moe_temp_unblock(const sigset_t *old)
{
	pthread_sigmask(SIG_SETMASK, old, NULL);
}

static int temp_add(const char *path, int kind)
{
	install_handlers();
	for (int i = 0; i < MAX_TEMPS; i++)
		if (temp_kind[i] == TEMP_FREE) {
			snprintf(temp_path[i], sizeof temp_path[i], "%s", path);
			temp_kind[i] = kind;
			return 0;
		}
	MOE_ASSERT(!"too many temporaries");
	return -1;
}

int moe_temp_track(const char *path)
{
	return temp_add(path, TEMP_FILE);
}

void moe_temp_forget(const char *path)
{
	for (int i = 0; i < MAX_TEMPS; i++)
		if (temp_kind[i] != TEMP_FREE && !strcmp(temp_path[i], path))
			temp_kind[i] = TEMP_FREE;
}

void moe_temp_remove(const char *path)
{
	for (int i = 0; i < MAX_TEMPS; i++)
		if (temp_kind[i] != TEMP_FREE && !strcmp(temp_path[i], path)) {
			if (temp_kind[i] == TEMP_DIR)
				rmdir(path);
			else
				unlink(path);
			temp_kind[i] = TEMP_FREE;
		}
}

void moe_temp_remove_all(void)
{
	for (int i = 0; i < MAX_TEMPS; i++)
		if (temp_kind[i] == TEMP_FILE)
			moe_temp_remove(temp_path[i]);
	for (int i = MAX_TEMPS - 1; i >= 0; i--)
		if (temp_kind[i] == TEMP_DIR)
			moe_temp_remove(temp_path[i]);
}

void moe_temp_child(pid_t pgid)
{
	temp_child = pgid;
}

/* "$TMPDIR/PREFIX.XXXXXX" (TMPDIR unset or empty: /tmp). */
static int temp_template(char *buf, size_t cap, const char *prefix)
{
	const char *dir = getenv("TMPDIR");
	if (!dir || !*dir)
		dir = "/tmp";
	int n = snprintf(buf, cap, "%s/%s.XXXXXX", dir, prefix);
	return n > 0 && (size_t)n < cap ? 0 : -1;
}

int moe_temp_file(char *buf, size_t cap, const char *prefix, char *err, size_t ecap)
{
	if (temp_template(buf, cap, prefix) != 0) {
		errf(err, ecap, "cannot create a temporary file: %s", strerror(ENAMETOOLONG));
		return -1;
	}
	sigset_t old;
	moe_temp_block(&old);
	int fd = mkostemp(buf, O_CLOEXEC);
	int e = errno;
	if (fd >= 0)
		moe_temp_track(buf);
	moe_temp_unblock(&old);
	if (fd < 0)
		errf(err, ecap, "cannot create a temporary file '%s': %s", buf, strerror(e));
	return fd;
}

int moe_temp_dir(char *buf, size_t cap, const char *prefix, char *err, size_t ecap)
{
	if (temp_template(buf, cap, prefix) != 0) {
		errf(err, ecap, "cannot create a temporary directory: %s", strerror(ENAMETOOLONG));
		return -1;
	}
	sigset_t old;
	moe_temp_block(&old);
	int ok = mkdtemp(buf) != NULL;
	int e = errno;
	if (ok)
		temp_add(buf, TEMP_DIR);
	moe_temp_unblock(&old);
	if (!ok) {
		errf(err, ecap, "cannot create a temporary directory '%s': %s", buf, strerror(e));
		return -1;
	}
	return 0;
}

/* Inputs ----------------------------------------------------------------- */

int moe_input_open(const char *path, struct moe_diag *d)
{
	/* stat first: opening a device can have effects of its own */
	struct stat st;
	if (stat(path, &st) != 0) {
		moe_diag_error(d, "cannot read '%s': %s", path, strerror(errno));
		return -1;
	}
	if (!S_ISREG(st.st_mode)) {
		moe_diag_error(d, "cannot read '%s': it is %s, not a regular file", path,
			       kind_name(st.st_mode));
		return -1;
	}
	/* O_NONBLOCK: a FIFO put there since the stat must not block the open */
	int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	if (fd < 0) {
		moe_diag_error(d, "cannot read '%s': %s", path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		moe_diag_error(d, "cannot read '%s': it is %s, not a regular file", path,
			       kind_name(st.st_mode));
		close(fd);
		return -1;
	}
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
		moe_diag_error(d, "cannot read '%s': %s", path, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

/* Outputs ---------------------------------------------------------------- */

/* The file `path` names with symlinks followed: a canonical directory plus
 * the last name, which need not exist (a new file, or a dangling link's
 * target). */
static int resolve_output(const char *path, char *out, size_t cap, char *err, size_t ecap)
{
	char cur[PATH_MAX], target[PATH_MAX];
	if (!*path || strlen(path) >= sizeof cur) {
		errf(err, ecap, "cannot write '%s': %s", path,
		     *path ? strerror(ENAMETOOLONG) : "empty file name");
		return -1;
	}
	strcpy(cur, path);
	for (int hops = 0;; hops++) {
		struct stat st;
		if (lstat(cur, &st) != 0) {
			if (errno == ENOENT)
				break;
			errf(err, ecap, "cannot write '%s': %s", path, strerror(errno));
			return -1;
		}
		if (!S_ISLNK(st.st_mode))
			break;
		ssize_t n = hops < 40 ? readlink(cur, target, sizeof target - 1) : -1;
		if (n < 0) {
			errf(err, ecap, "cannot write '%s': %s", path,
			     strerror(hops < 40 ? errno : ELOOP));
			return -1;
		}
		target[n] = 0;
		const char *slash = strrchr(cur, '/');
		size_t keep = target[0] == '/' || !slash ? 0 : (size_t)(slash - cur) + 1;
		if (keep + (size_t)n >= sizeof cur) {
			errf(err, ecap, "cannot write '%s': %s", path, strerror(ENAMETOOLONG));
			return -1;
		}
		memcpy(cur + keep, target, (size_t)n + 1);
	}
	char dir[PATH_MAX], real[PATH_MAX];
	char *slash = strrchr(cur, '/');
	const char *base = slash ? slash + 1 : cur;
	if (!*base || !strcmp(base, ".") || !strcmp(base, "..")) {
		errf(err, ecap, "cannot write '%s': it names a directory", path);
		return -1;
	}
	if (!slash)
		strcpy(dir, ".");
	else if (slash == cur)
		strcpy(dir, "/");
	else
		snprintf(dir, sizeof dir, "%.*s", (int)(slash - cur), cur);
	if (!realpath(dir, real)) {
		if (errno == ENOENT)
			errf(err, ecap, "cannot write '%s': the directory '%s' does not exist",
			     path, dir);
		else
			errf(err, ecap, "cannot write '%s': %s: %s", path, dir, strerror(errno));
		return -1;
	}
	int n = snprintf(out, cap, "%s%s%s", real, strcmp(real, "/") ? "/" : "", base);
	if (n < 0 || (size_t)n >= cap) {
		errf(err, ecap, "cannot write '%s': %s", path, strerror(ENAMETOOLONG));
		return -1;
	}
	return 0;
}

/* The final file must be absent or a regular file that is none of the inputs. */
static int check_final(const char *shown, const char *final, const char *const *inputs,
		       int n_inputs, char *err, size_t ecap)
{
	struct stat st;
	if (stat(final, &st) != 0) {
		if (errno == ENOENT)
			return 0;
		errf(err, ecap, "cannot write '%s': %s", shown, strerror(errno));
		return -1;
	}
	struct stat ls;
	int via = lstat(shown, &ls) == 0 && S_ISLNK(ls.st_mode); /* name the link's target */
	if (!S_ISREG(st.st_mode)) {
		errf(err, ecap,
		     "refusing to write '%s'%s%s%s: it is %s; the output must be a "
		     "regular file or a new name",
		     shown, via ? " (" : "", via ? final : "", via ? ")" : "",
		     kind_name(st.st_mode));
		return -1;
	}
	for (int i = 0; i < n_inputs; i++) {
		struct stat in;
		if (!inputs[i] || stat(inputs[i], &in) != 0)
			continue;
		if (in.st_dev == st.st_dev && in.st_ino == st.st_ino) {
			errf(err, ecap, "refusing to write '%s': it is the input '%s'", shown,
			     inputs[i]);
			return -1;
		}
	}
	return 0;
}

int moe_output_check(const char *path, const char *const *inputs, int n_inputs, char *err,
		     size_t cap)
{
	char final[PATH_MAX];
	if (resolve_output(path, final, sizeof final, err, cap) != 0)
		return -1;
	return check_final(path, final, inputs, n_inputs, err, cap);
}

int moe_output_open(struct moe_output *o, const char *path, const char *const *inputs, int n_inputs,
		    unsigned mode, char *err, size_t cap)
{
	memset(o, 0, sizeof *o);
	o->fd = -1;
	o->mode = mode;
	snprintf(o->shown, sizeof o->shown, "%s", path);
	if (resolve_output(path, o->path, sizeof o->path, err, cap) != 0 ||
	    check_final(path, o->path, inputs, n_inputs, err, cap) != 0)
		return -1;
	/* Beside the final file, so the rename is atomic: "DIR/.NAME.XXXXXX". */
	const char *base = strrchr(o->path, '/') + 1;
	int n = snprintf(o->tmp, sizeof o->tmp, "%.*s.%.64s.XXXXXX", (int)(base - o->path), o->path,
			 base);
	if (n < 0 || (size_t)n >= sizeof o->tmp) {
		errf(err, cap, "cannot write '%s': %s", path, strerror(ENAMETOOLONG));
		return -1;
	}
	sigset_t old;
	moe_temp_block(&old);
	o->fd = mkostemp(o->tmp, O_CLOEXEC);
	int e = errno;
	if (o->fd >= 0)
		moe_temp_track(o->tmp);
	moe_temp_unblock(&old);
	if (o->fd < 0) {
		errf(err, cap, "cannot write '%s': %s", path, strerror(e));
		o->tmp[0] = 0;
		return -1;
	}
	return 0;
}

FILE *moe_output_stream(struct moe_output *o)
{
	if (!o->f && o->fd >= 0)
		o->f = fdopen(o->fd, "wb");
	return o->f;
}

int moe_output_write(struct moe_output *o, const void *data, size_t n, char *err, size_t cap)
{
	const char *p = data;
	while (n) {
		ssize_t w = write(o->fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			errf(err, cap, "cannot write '%s': %s", o->shown,
			     strerror(w < 0 ? errno : EIO));
			return -1;
		}
		p += w, n -= (size_t)w;
	}
	return 0;
}

static int close_streams(struct moe_output *o)
{
	int bad = 0;
	if (o->f) {
		bad = fclose(o->f) != 0;
		o->f = NULL;
		o->fd = -1;
	} else if (o->fd >= 0) {
		bad = close(o->fd) != 0;
		o->fd = -1;
	}
	return bad ? -1 : 0;
}

int moe_output_commit(struct moe_output *o, char *err, size_t cap)
{
	mode_t mask = umask(0);
	umask(mask);
	struct stat st;
	const char *why = NULL;
	int e = 0;
	if (close_streams(o) != 0)
		e = errno;
	else if (chmod(o->tmp, (mode_t)o->mode & ~mask) != 0)
		e = errno;
	/* what was refused at open must not have appeared since */
	else if (stat(o->path, &st) == 0 && !S_ISREG(st.st_mode))
		why = kind_name(st.st_mode);
	else if (rename(o->tmp, o->path) != 0)
		e = errno;
	if (e || why) {
		if (why)
			errf(err, cap, "refusing to write '%s': it is now %s", o->shown, why);
		else
			errf(err, cap, "cannot write '%s': %s", o->shown, strerror(e));
		moe_output_abort(o);
		return -1;
	}
	moe_temp_forget(o->tmp);
	o->tmp[0] = 0;
	return 0;
}

void moe_output_abort(struct moe_output *o)
{
	close_streams(o);
	if (o->tmp[0])
		moe_temp_remove(o->tmp);
	o->tmp[0] = 0;
}
