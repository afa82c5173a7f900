/*
 * The result line the tests read (`outcome` in tests/requester_attacks.rs):
 * "ok <hex payload>", "err <errno>" for a refused request, or
 * "readerr <errno>" for a key that could not be read. Written with
 * dprintf (write(2)): stdio's buffer is not flushed at exit once a child
 * has run on the program's memory (exe_spoof --shared-vm).
 */
#include <errno.h>
#include <linux/keyctl.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The line for a request that failed with `err`. */
static inline void print_err(int err)
{
	dprintf(1, "err %d\n", err);
}

/* The line for a read of `len` bytes into `buf` (-1: failed with `err`). */
static inline void print_read(long len, int err, const unsigned char *buf, long cap)
{
	if (len < 0) {
		dprintf(1, "readerr %d\n", err);
		return;
	}
	dprintf(1, "ok ");
	for (long i = 0; i < len && i < cap; i++)
		dprintf(1, "%02x", buf[i]);
	dprintf(1, "\n");
}

/* The line for request_key's result `key` (negative: failed with `err`),
 * reading the key if there is one. */
static inline void print_outcome(long key, int err)
{
	if (key < 0) {
		print_err(err);
		return;
	}
	unsigned char buf[2048];
	long len = syscall(SYS_keyctl, KEYCTL_READ, key, buf, sizeof buf);
	print_read(len, errno, buf, sizeof buf);
}
