/*
 * request_ia32: asks for a key through the kernel's ia32 entry (int 0x80,
 * request_key = 287), as a 32-bit program would, then reads it with the
 * native keyctl(2).
 *
 *   request_ia32 DESCRIPTION CALLOUT
 *
 * Built with gcc -static -no-pie: a static, non-PIE x86-64 program, whose
 * data (where the strings are copied) lies below 4 GiB, so 32-bit pointers
 * reach it. Prints the result line of outcome.h.
 */
#include <errno.h>
#include <linux/keyctl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "outcome.h"

static char type[] = "user";
static char desc[4096];
static char callout[4096];

int main(int argc, char **argv)
{
	if (argc != 3 || strlen(argv[1]) >= sizeof desc || strlen(argv[2]) >= sizeof callout) {
		fprintf(stderr, "usage: request_ia32 DESCRIPTION CALLOUT\n");
		return 2;
	}
	strcpy(desc, argv[1]);
	strcpy(callout, argv[2]);
	long ret;
	unsigned int dest = (unsigned int)KEY_SPEC_PROCESS_KEYRING;
	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "a"(287), "b"((unsigned int)(unsigned long)type),
			   "c"((unsigned int)(unsigned long)desc),
			   "d"((unsigned int)(unsigned long)callout), "S"(dest)
			 : "memory");
	print_outcome(ret, (int)-ret);
	return 0;
}
