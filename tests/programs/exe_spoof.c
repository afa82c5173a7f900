/*
 * exe_spoof: a requester that makes its /proc/self/exe name another file,
 * then asks for a key (issue 20, item 2). Run in a user namespace of its
 * own (unshare -Ur), where it holds CAP_CHECKPOINT_RESTORE.
 *
 *   exe_spoof [--shared-vm|--shared-vm-unshare] TARGET|- DESCRIPTION CALLOUT
 *
 * With --shared-vm the program stays in the initial user namespace and the
 * prctl is made by a child that shares its memory (clone with CLONE_VM and
 * CLONE_NEWUSER): the capability is checked in the child's namespace, and
 * the exe link belongs to the memory image both share, so the parent's
 * /proc/self/exe names TARGET once the child has exited. With
 * --shared-vm-unshare the child is cloned with CLONE_VM alone and calls
 * unshare(CLONE_NEWUSER) itself before the prctl.
 *
 * With TARGET, the program first moves every mapping of its own executable
 * to anonymous memory at the same address (the kernel refuses a new exe
 * file while the old one is still mapped: EBUSY), then points its exe link
 * at TARGET with prctl(PR_SET_MM, PR_SET_MM_MAP) and checks that
 * /proc/self/exe now names it. With "-" it changes nothing.
 *
 * Prints "exe <path>" (the link after the swap), then "ok <hex payload>" or
 * "err <errno>" for request_key("user", DESCRIPTION, CALLOUT) into its
 * process keyring. Exits 2 (with a message) if the spoof itself failed.
 * Built with gcc -static -O1: one file-backed executable, no loader.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/keyctl.h>
#include <linux/prctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include "outcome.h"

struct range {
	unsigned long start, end;
	int prot;
};

static int die(const char *what)
{
	fprintf(stderr, "exe_spoof: %s: %s\n", what, strerror(errno));
	exit(2);
}

/* Reads a whole small /proc file with read(2) only (no stdio buffers). */
static ssize_t slurp(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t n = 0;
	for (;;) {
		ssize_t r = read(fd, buf + n, cap - 1 - n);
		if (r < 0) {
			close(fd);
			return -1;
		}
		if (r == 0)
			break;
		n += (size_t)r;
		if (n == cap - 1)
			break;
	}
	close(fd);
	buf[n] = 0;
	return (ssize_t)n;
}

/* The mappings of the file `self` in /proc/self/maps. */
static int own_mappings(const char *self, struct range *out, int max)
{
	static char maps[1 << 16];
	if (slurp("/proc/self/maps", maps, sizeof maps) < 0)
		die("read /proc/self/maps");
	int n = 0;
	for (char *line = strtok(maps, "\n"); line; line = strtok(NULL, "\n")) {
		unsigned long start, end, off, inode;
		char perms[5], dev[16];
		int path_at = 0;
		if (sscanf(line, "%lx-%lx %4s %lx %15s %lu %n", &start, &end, perms, &off,
			   dev, &inode, &path_at) < 6 || path_at == 0)
			continue;
		if (strcmp(line + path_at, self) != 0)
			continue;
		if (n == max) {
			errno = E2BIG;
			die("too many mappings");
		}
		out[n].start = start;
		out[n].end = end;
		out[n].prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
			      (perms[2] == 'x' ? PROT_EXEC : 0);
		n++;
	}
	return n;
}

/*
 * Replaces each file mapping by an anonymous copy at the same address. The
 * copy is complete before the one mremap that swaps it in, so the code
 * running the swap (in the text being swapped) returns into identical
 * bytes. Nothing between a copy and its swap writes to the program's
 * file-backed data.
 */
static void unmap_own_file(const struct range *r, int n)
{
	for (int i = 0; i < n; i++) {
		size_t len = r[i].end - r[i].start;
		void *tmp = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (tmp == MAP_FAILED)
			die("mmap");
		if (r[i].prot & PROT_READ)
			memcpy(tmp, (void *)r[i].start, len);
		if (mprotect(tmp, len, r[i].prot) != 0)
			die("mprotect");
		if (mremap(tmp, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)r[i].start) ==
		    MAP_FAILED)
			die("mremap");
	}
}

/* The current mm fields, from /proc/self/stat (fields 26-28 and 45-51). */
static void mm_fields(struct prctl_mm_map *m)
{
	char stat[4096];
	if (slurp("/proc/self/stat", stat, sizeof stat) < 0)
		die("read /proc/self/stat");
	char *p = strrchr(stat, ')');
	if (!p) {
		errno = EINVAL;
		die("parse /proc/self/stat");
	}
	unsigned long long v[53] = {0};
	int field = 2;
	for (char *tok = strtok(p + 1, " "); tok && field < 52; tok = strtok(NULL, " ")) {
		field++;
		v[field] = strtoull(tok, NULL, 10);
	}
	if (field < 51) {
		errno = EINVAL;
		die("short /proc/self/stat");
	}
	m->start_code = v[26];
	m->end_code = v[27];
	m->start_stack = v[28];
	m->start_data = v[45];
	m->end_data = v[46];
	m->start_brk = v[47];
	m->arg_start = v[48];
	m->arg_end = v[49];
	m->env_start = v[50];
	m->env_end = v[51];
	m->brk = (unsigned long)syscall(SYS_brk, 0);
}

/* The prctl, in the child that shares our memory. */
static int swap_exe(void *map)
{
	struct prctl_mm_map *m = map;
	return prctl(PR_SET_MM, PR_SET_MM_MAP, (unsigned long)m, sizeof *m, 0) == 0 ? 0 : 1;
}

/* The same, after a user namespace of the child's own making: exit code
 * 100 + errno if unshare refuses. */
static int unshare_then_swap(void *map)
{
	if (unshare(CLONE_NEWUSER) != 0)
		return 100 + errno;
	return swap_exe(map);
}

int main(int argc, char **argv)
{
	int shared_vm = argc > 1 && strcmp(argv[1], "--shared-vm") == 0;
	int unshare_vm = argc > 1 && strcmp(argv[1], "--shared-vm-unshare") == 0;
	argc -= shared_vm + unshare_vm;
	argv += shared_vm + unshare_vm;
	if (argc != 4) {
		fprintf(stderr, "usage: exe_spoof [--shared-vm|--shared-vm-unshare] TARGET|- DESCRIPTION CALLOUT\n");
		return 2;
	}
	static char self[PATH_MAX], now[PATH_MAX], want[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
	if (n < 0)
		die("readlink /proc/self/exe");
	self[n] = 0;
	if (strcmp(argv[1], "-") != 0) {
		if (!realpath(argv[1], want))
			die("realpath TARGET");
		int fd = open(want, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			die("open TARGET");
		struct range r[16];
		int k = own_mappings(self, r, 16);
		if (k == 0) {
			errno = ENOENT;
			die("no mapping of our own executable");
		}
		unmap_own_file(r, k);
		static struct prctl_mm_map m;
		mm_fields(&m);
		m.auxv = NULL;
		m.auxv_size = 0;
		m.exe_fd = (unsigned)fd;
		if (unshare_vm) {
			static char stack[1 << 16];
			int st = 0;
			int pid = clone(unshare_then_swap, stack + sizeof stack, CLONE_VM | SIGCHLD, &m);
			if (pid < 0)
				die("clone(CLONE_VM)");
			if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) {
				errno = ECHILD;
				die("the child");
			}
			if (WEXITSTATUS(st) >= 100) {
				errno = WEXITSTATUS(st) - 100;
				die("unshare(CLONE_NEWUSER) in a child sharing our memory");
			}
			if (WEXITSTATUS(st) != 0) {
				errno = EPERM;
				die("prctl(PR_SET_MM_MAP) in the child");
			}
		} else if (shared_vm) {
			static char stack[1 << 16];
			int st = 0;
			int pid = clone(swap_exe, stack + sizeof stack,
					CLONE_VM | CLONE_NEWUSER | SIGCHLD, &m);
			if (pid < 0)
				die("clone(CLONE_VM | CLONE_NEWUSER)");
			if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
				errno = EPERM;
				die("prctl(PR_SET_MM_MAP) in the child");
			}
		} else if (prctl(PR_SET_MM, PR_SET_MM_MAP, (unsigned long)&m, sizeof m, 0) != 0) {
			die("prctl(PR_SET_MM_MAP)");
		}
		close(fd);
		n = readlink("/proc/self/exe", now, sizeof now - 1);
		if (n < 0)
			die("readlink /proc/self/exe after the swap");
		now[n] = 0;
		if (strcmp(now, want) != 0) {
			fprintf(stderr, "exe_spoof: /proc/self/exe is %s, not %s\n", now, want);
			return 2;
		}
	} else {
		strcpy(now, self);
	}
	printf("exe %s\n", now);
	fflush(stdout);
	long key = syscall(SYS_request_key, "user", argv[2], argv[3], KEY_SPEC_PROCESS_KEYRING);
	print_outcome(key, errno);
	return 0;
}
