/* test_output.c: no file is destroyed by surprise. Every command that writes
 * (compile in its --emit kinds, import) refuses an output that is one of its
 * inputs or not a regular file, writes through symlinks, and leaves no
 * temporary behind when a signal interrupts it; inputs that are not regular
 * files (FIFOs included) are refused without blocking. Device nodes, FIFOs,
 * sockets and links are made in a temporary directory, never /dev's. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "moegen.h"

static char dir[256];
static char buf[1 << 16];
static char spec_text[1 << 14];
/* A config.json that imports. */
static const char cfg[] = "{\"model_type\": \"mixtral\", \"hidden_size\": 64, "
			  "\"intermediate_size\": 128, \"num_local_experts\": 4, "
			  "\"num_experts_per_tok\": 2, \"num_hidden_layers\": 2}\n";
static size_t spec_len;

static const char *moegen(void)
{
	const char *bin = getenv("MOEGEN");
	return bin ? bin : "build/moegen";
}

/* Run `moegen ARGS` in dir (under a 60 s timeout: a hang fails the test
 * instead of stopping the suite), capture stdout+stderr, return the code. */
static int run(const char *fmt, ...)
{
	char args[2048], cmd[4096], cwd[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(args, sizeof args, fmt, ap);
	va_end(ap);
	assert_non_null(getcwd(cwd, sizeof cwd));
	snprintf(cmd, sizeof cmd, "cd '%s' && timeout 60 '%s%s%s' %s 2>&1", dir,
		 moegen()[0] == '/' ? "" : cwd, moegen()[0] == '/' ? "" : "/", moegen(), args);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	size_t n = fread(buf, 1, sizeof buf - 1, p);
	buf[n] = 0;
	int st = pclose(p);
	assert_true(WIFEXITED(st));
	return WEXITSTATUS(st);
}

static void path_in(char *out, size_t cap, const char *name)
{
	snprintf(out, cap, "%s/%s", dir, name);
}

static void write_file(const char *name, const char *text, size_t len)
{
	char p[512];
	path_in(p, sizeof p, name);
	FILE *f = fopen(p, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(text, 1, len, f), len);
	assert_int_equal(fclose(f), 0);
}

/* The file's bytes equal text[0, len). */
static int same_content(const char *name, const char *text, size_t len)
{
	char p[512];
	static char got[1 << 14];
	path_in(p, sizeof p, name);
	FILE *f = fopen(p, "rb");
	if (!f)
		return 0;
	size_t n = fread(got, 1, sizeof got, f);
	fclose(f);
	return n == len && memcmp(got, text, len) == 0;
}

static mode_t kind_of(const char *name)
{
	char p[512];
	struct stat st;
	path_in(p, sizeof p, name);
	assert_int_equal(lstat(p, &st), 0);
	return st.st_mode & S_IFMT;
}

/* The names in d other than . and .., joined by spaces (empty: none). */
static void list_dir(const char *d, char *out, size_t cap)
{
	DIR *dp = opendir(d);
	assert_non_null(dp);
	out[0] = 0;
	struct dirent *e;
	while ((e = readdir(dp)))
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			snprintf(out + strlen(out), cap - strlen(out), "%s ", e->d_name);
	closedir(dp);
}

static int setup(void **state)
{
	(void)state;
	snprintf(dir, sizeof dir, "%s/moegen-test-output.XXXXXX",
		 getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(dir))
		return -1;
	const char *src = getenv("MOE_SOURCE_DIR");
	char p[1024];
	snprintf(p, sizeof p, "%s/specs/mixtral-mini.yaml", src ? src : ".");
	FILE *f = fopen(p, "rb");
	if (!f)
		return -1;
	spec_len = fread(spec_text, 1, sizeof spec_text, f);
	fclose(f);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	char cmd[512];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	return system(cmd) == 0 ? 0 : -1;
}

/* A fresh s.yaml in dir, nothing else. */
static void fresh(void)
{
	char cmd[1024];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'/* '%s'/.[!.]*", dir, dir);
	assert_int_equal(system(cmd), 0);
	write_file("s.yaml", spec_text, spec_len);
}

/* The spec and the config are never overwritten: by name, through a symlink,
 * through a hard link, in every --emit kind. */
static void test_output_is_input(void **state)
{
	(void)state;
	static const char *const emits[] = {"so", "obj", "ll", "asm", "header", "cu"};
	fresh();
	char p[512], q[512];
	path_in(p, sizeof p, "s.yaml");
	path_in(q, sizeof q, "hard.yaml");
	assert_int_equal(link(p, q), 0);
	path_in(q, sizeof q, "sym.yaml");
	assert_int_equal(symlink("s.yaml", q), 0);
	static const char *const outs[] = {"s.yaml", "./s.yaml", "hard.yaml", "sym.yaml"};
	for (size_t e = 0; e < sizeof emits / sizeof *emits; e++)
		for (size_t i = 0; i < sizeof outs / sizeof *outs; i++) {
			assert_int_equal(run("s.yaml --emit %s -o %s", emits[e], outs[i]), 3);
			assert_non_null(strstr(buf, "refusing to write"));
			assert_non_null(strstr(buf, "it is the input 's.yaml'"));
			assert_true(same_content("s.yaml", spec_text, spec_len));
		}
	/* the spec given through a link, the output by its own name */
	assert_int_equal(run("sym.yaml --emit ll -o s.yaml"), 3);
	assert_true(same_content("s.yaml", spec_text, spec_len));
	assert_int_equal(kind_of("sym.yaml"), S_IFLNK);

	/* import: -o onto the config.json it reads */
	write_file("c.json", cfg, sizeof cfg - 1);
	path_in(p, sizeof p, "c.json");
	path_in(q, sizeof q, "c2.json");
	assert_int_equal(link(p, q), 0);
	path_in(q, sizeof q, "csym.json");
	assert_int_equal(symlink("c.json", q), 0);
	static const char *const couts[] = {"c.json", "c2.json", "csym.json"};
	for (size_t i = 0; i < sizeof couts / sizeof *couts; i++) {
		assert_int_equal(run("import c.json -o %s", couts[i]), 3);
		assert_non_null(strstr(buf, "it is the input 'c.json'"));
		assert_true(same_content("c.json", cfg, sizeof cfg - 1));
	}
	/* and the import itself works */
	assert_int_equal(run("import c.json -o out.yaml"), 0);
	assert_int_equal(run("check out.yaml"), 0);
}

/* -o onto a FIFO, a directory, a socket or a device node is refused and the
 * node stays what it was, also when -o names it through a symlink. */
static void test_output_not_regular(void **state)
{
	(void)state;
	fresh();
	char p[512], q[512];
	path_in(p, sizeof p, "fifo");
	assert_int_equal(mkfifo(p, 0600), 0);
	path_in(p, sizeof p, "subdir");
	assert_int_equal(mkdir(p, 0700), 0);
	path_in(p, sizeof p, "sock");
	int sfd = socket(AF_UNIX, SOCK_STREAM, 0);
	assert_true(sfd >= 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fits = snprintf(sa.sun_path, sizeof sa.sun_path, "%s", p) < (int)sizeof sa.sun_path;
	int have_sock = fits && bind(sfd, (struct sockaddr *)&sa, sizeof sa) == 0;
	close(sfd);
	/* device nodes need privilege: skip those with a message when mknod fails */
	path_in(p, sizeof p, "chardev");
	int have_chr = mknod(p, S_IFCHR | 0600, makedev(1, 3)) == 0;
	path_in(p, sizeof p, "blockdev");
	int have_blk = mknod(p, S_IFBLK | 0600, makedev(7, 0)) == 0;
	if (!have_chr || !have_blk)
		fprintf(stderr, "note: mknod failed (%s): device-node cases skipped\n",
			strerror(errno));
	struct {
		const char *name, *what;
		mode_t kind;
		int have;
	} nodes[] = {
	    {"fifo", "a FIFO", S_IFIFO, 1},
	    {"subdir", "a directory", S_IFDIR, 1},
	    {"sock", "a socket", S_IFSOCK, have_sock},
	    {"chardev", "a character device", S_IFCHR, have_chr},
	    {"blockdev", "a block device", S_IFBLK, have_blk},
	};
	static const char *const emits[] = {"so", "ll", "header"};
	write_file("c.json", cfg, sizeof cfg - 1);
	for (size_t i = 0; i < sizeof nodes / sizeof *nodes; i++) {
		if (!nodes[i].have)
			continue;
		char link_name[64];
		snprintf(link_name, sizeof link_name, "to-%s", nodes[i].name);
		path_in(q, sizeof q, link_name);
		assert_int_equal(symlink(nodes[i].name, q), 0);
		for (size_t e = 0; e < sizeof emits / sizeof *emits; e++) {
			assert_int_equal(run("s.yaml --emit %s -o %s", emits[e], nodes[i].name), 3);
			assert_non_null(strstr(buf, "refusing to write"));
			assert_non_null(strstr(buf, nodes[i].what));
			assert_int_equal(kind_of(nodes[i].name), nodes[i].kind);
			assert_int_equal(run("s.yaml --emit %s -o %s", emits[e], link_name), 3);
			assert_non_null(strstr(buf, nodes[i].what));
			assert_int_equal(kind_of(nodes[i].name), nodes[i].kind);
			assert_int_equal(kind_of(link_name), S_IFLNK);
		}
		assert_int_equal(run("import c.json -o %s", nodes[i].name), 3);
		assert_non_null(strstr(buf, nodes[i].what));
		assert_int_equal(kind_of(nodes[i].name), nodes[i].kind);
	}
	/* nothing else appeared: no temporary left beside the nodes */
	char names[2048];
	list_dir(dir, names, sizeof names);
	for (const char *s = names; *s; s++)
		assert_false(s[0] == '.' && (s == names || s[-1] == ' '));
}

/* A symlink is written through: the target is replaced, the link stays. */
static void test_output_symlink(void **state)
{
	(void)state;
	fresh();
	char p[512];
	write_file("target.ll", "old\n", 4);
	path_in(p, sizeof p, "link.ll");
	assert_int_equal(symlink("target.ll", p), 0);
	assert_int_equal(run("s.yaml --emit ll -o link.ll"), 0);
	assert_int_equal(kind_of("link.ll"), S_IFLNK);
	assert_int_equal(kind_of("target.ll"), S_IFREG);
	assert_false(same_content("target.ll", "old\n", 4));
	/* a chain of links, one of them relative to another directory */
	path_in(p, sizeof p, "sub");
	assert_int_equal(mkdir(p, 0700), 0);
	path_in(p, sizeof p, "sub/inner.so");
	assert_int_equal(symlink("../model.so", p), 0);
	path_in(p, sizeof p, "outer.so");
	assert_int_equal(symlink("sub/inner.so", p), 0);
	assert_int_equal(run("s.yaml -o outer.so"), 0);
	assert_int_equal(kind_of("outer.so"), S_IFLNK);
	assert_int_equal(kind_of("sub/inner.so"), S_IFLNK);
	assert_int_equal(kind_of("model.so"), S_IFREG);
	char elf[4];
	FILE *f = fopen((path_in(p, sizeof p, "model.so"), p), "rb");
	assert_non_null(f);
	assert_int_equal(fread(elf, 1, 4, f), 4);
	fclose(f);
	assert_memory_equal(elf, "\177ELF", 4);
	/* a dangling link creates its target */
	path_in(p, sizeof p, "dangling.h");
	assert_int_equal(symlink("made.h", p), 0);
	assert_int_equal(run("s.yaml --emit header -o dangling.h"), 0);
	assert_int_equal(kind_of("made.h"), S_IFREG);
	/* a link loop or a missing directory is a file error with a message */
	path_in(p, sizeof p, "loop1");
	assert_int_equal(symlink("loop2", p), 0);
	path_in(p, sizeof p, "loop2");
	assert_int_equal(symlink("loop1", p), 0);
	assert_int_equal(run("s.yaml --emit ll -o loop1"), 3);
	assert_non_null(strstr(buf, "cannot write 'loop1'"));
	assert_int_equal(run("s.yaml -o missing/dir/m.so"), 3);
	assert_non_null(strstr(buf, "the directory 'missing/dir' does not exist"));
	assert_null(strstr(buf, "linking failed"));
}

/* Inputs that are not regular files are refused at once, never waited on. */
static void test_input_not_regular(void **state)
{
	(void)state;
	fresh();
	char p[512];
	path_in(p, sizeof p, "fifo.yaml");
	assert_int_equal(mkfifo(p, 0600), 0);
	path_in(p, sizeof p, "fifo.json");
	assert_int_equal(mkfifo(p, 0600), 0);
	static const char *const cmds[] = {"check fifo.yaml",   "info fifo.yaml",
					   "-d spec fifo.yaml", "ref fifo.yaml",
					   "fifo.yaml -o m.so", "import fifo.json"};
	for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++) {
		assert_int_equal(run("%s", cmds[i]), 3);
		assert_non_null(strstr(buf, "a FIFO, not a regular file"));
	}
	assert_int_equal(run("check ."), 3);
	assert_non_null(strstr(buf, "a directory, not a regular file"));
	path_in(p, sizeof p, "chardev");
	if (mknod(p, S_IFCHR | 0600, makedev(1, 3)) == 0) {
		assert_int_equal(run("check chardev"), 3);
		assert_non_null(strstr(buf, "a character device"));
	} else {
		fprintf(stderr, "note: mknod failed (%s): device input case skipped\n",
			strerror(errno));
	}
}

/* A compile interrupted by SIGTERM, SIGINT or SIGHUP while the linker runs
 * leaves no temporary file or directory behind. The linker is a script that
 * says when it started, then waits: the signal always arrives while the
 * temporary output and the work directory exist. */
static void test_signal_cleanup(void **state)
{
	(void)state;
	static const int sigs[] = {SIGTERM, SIGINT, SIGHUP};
	char tmpd[512], cc[512], mark[512], out[512], names[2048], cwd[1024];
	assert_non_null(getcwd(cwd, sizeof cwd));
	for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) {
		fresh();
		path_in(tmpd, sizeof tmpd, "tmp");
		assert_int_equal(mkdir(tmpd, 0700), 0);
		path_in(mark, sizeof mark, "linker-started");
		path_in(cc, sizeof cc, "slow-cc.sh");
		char script[1024];
		int n =
		    snprintf(script, sizeof script, "#!/bin/sh\ntouch '%s'\nexec sleep 60\n", mark);
		write_file("slow-cc.sh", script, (size_t)n);
		assert_int_equal(chmod(cc, 0700), 0);
		path_in(out, sizeof out, "model.so");
		char spec[512];
		path_in(spec, sizeof spec, "s.yaml");
		char bin[2048];
		assert_true(snprintf(bin, sizeof bin, "%s%s%s", moegen()[0] == '/' ? "" : cwd,
				     moegen()[0] == '/' ? "" : "/", moegen()) < (int)sizeof bin);

		pid_t pid = fork();
		assert_true(pid >= 0);
		if (pid == 0) {
			setenv("MOE_CC", cc, 1);
			setenv("TMPDIR", tmpd, 1);
			/* a background job starts with SIGINT ignored */
			signal(SIGINT, SIG_DFL);
			signal(SIGHUP, SIG_DFL);
			signal(SIGTERM, SIG_DFL);
			execl(bin, bin, spec, "-o", out, (char *)NULL);
			_exit(127);
		}
		/* wait (at most 120 s) until the linker runs */
		struct timespec ts = {0, 20 * 1000 * 1000};
		int started = 0;
		for (int t = 0; t < 6000 && !started; t++) {
			started = access(mark, F_OK) == 0;
			if (!started)
				nanosleep(&ts, NULL);
		}
		assert_true(started);
		/* the temporaries exist now */
		list_dir(tmpd, names, sizeof names);
		assert_non_null(strstr(names, "moegen."));
		list_dir(dir, names, sizeof names);
		assert_non_null(strstr(names, ".model.so."));

		assert_int_equal(kill(pid, sigs[i]), 0);
		int st;
		assert_int_equal(waitpid(pid, &st, 0), pid);
		assert_true(WIFSIGNALED(st));
		assert_int_equal(WTERMSIG(st), sigs[i]);

		list_dir(tmpd, names, sizeof names);
		assert_string_equal(names, "");
		list_dir(dir, names, sizeof names);
		assert_null(strstr(names, "model.so"));
		assert_null(strstr(names, ".s.yaml"));
		/* exactly what the test made */
		int count = 0;
		for (const char *s = names; *s; s++)
			count += *s == ' ';
		assert_int_equal(count, 4); /* s.yaml tmp linker-started slow-cc.sh */
	}
}

/* The helper itself: abort leaves nothing, commit replaces, mode applies. */
static void test_output_helper(void **state)
{
	(void)state;
	fresh();
	char p[512], err[1024], names[2048];
	path_in(p, sizeof p, "a.txt");
	struct moe_output o;
	assert_int_equal(moe_output_open(&o, p, NULL, 0, 0600, err, sizeof err), 0);
	assert_int_equal(moe_output_write(&o, "x", 1, err, sizeof err), 0);
	moe_output_abort(&o);
	list_dir(dir, names, sizeof names);
	assert_string_equal(names, "s.yaml ");

	write_file("a.txt", "old", 3);
	assert_int_equal(moe_output_open(&o, p, NULL, 0, 0600, err, sizeof err), 0);
	FILE *f = moe_output_stream(&o);
	assert_non_null(f);
	fputs("new", f);
	assert_true(same_content("a.txt", "old", 3)); /* not before the commit */
	assert_int_equal(moe_output_commit(&o, err, sizeof err), 0);
	moe_output_abort(&o); /* after a commit: nothing to do */
	assert_true(same_content("a.txt", "new", 3));
	struct stat st;
	assert_int_equal(stat(p, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	list_dir(dir, names, sizeof names);
	assert_null(strstr(names, ".a.txt"));

	/* an input given by another name is refused before anything is created */
	char in[512];
	path_in(in, sizeof in, "./s.yaml");
	const char *inputs[] = {in};
	path_in(p, sizeof p, "s.yaml");
	assert_int_not_equal(moe_output_open(&o, p, inputs, 1, 0644, err, sizeof err), 0);
	assert_non_null(strstr(err, "it is the input"));
	moe_output_abort(&o);
	assert_true(same_content("s.yaml", spec_text, spec_len));
}

int main(void)
{
	/* the umask must not hide the mode checks */
	umask(022);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_output_is_input), cmocka_unit_test(test_output_not_regular),
	    cmocka_unit_test(test_output_symlink),  cmocka_unit_test(test_input_not_regular),
	    cmocka_unit_test(test_signal_cleanup),  cmocka_unit_test(test_output_helper),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
