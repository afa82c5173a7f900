#!/usr/bin/python3
"""fscrypt-derived: v2 fscrypt policies whose master key is a derived key.

A small helper for docs/RECIPES.md ("fscrypt"). It only makes the three
ioctls Debian 12 has no shell tool for (the `fscrypt` package brings its own
metadata files, which a stateless host does not want). Python 3 standard
library only; run as root (or as the directory's owner for set-policy).

    fscrypt-derived.py add-key MOUNTPOINT --key-id SERIAL
        FS_IOC_ADD_ENCRYPTION_KEY with the `fscrypt-provisioning` key SERIAL
        (payload: u32 type = 2, u32 0, the raw key). The raw key is not in
        this process: the kernel copies it from the keyring. The key must be
        in a keyring this process possesses (a session keyring made with
        `keyctl session -`, or @p/@t of a parent does not count: use @s).
    fscrypt-derived.py add-key MOUNTPOINT
        The same with the raw key (16 to 64 bytes) read from standard input.
    fscrypt-derived.py set-policy DIR IDENTIFIER
        FS_IOC_SET_ENCRYPTION_POLICY, v2, AES-256-XTS contents, AES-256-CTS
        names, 32-byte name padding. DIR must be empty (or already have
        exactly this policy), and the key must have been added.
    fscrypt-derived.py remove-key MOUNTPOINT IDENTIFIER
        FS_IOC_REMOVE_ENCRYPTION_KEY: the files become unreadable and their
        names ciphertext. Prints a warning when files still in use keep the
        key partly present (exit 0, as the kernel succeeds).
    fscrypt-derived.py status MOUNTPOINT IDENTIFIER
        FS_IOC_GET_ENCRYPTION_KEY_STATUS: absent, present or incompletely
        removed.

add-key prints the key identifier (32 lowercase hex digits), which is
HKDF-SHA512 of the key: the same key always gives the same identifier, so
a recipe can compare it with the one it set the policy with. The
identifier is not secret. Exit status: 0 success, 1 the kernel refused
(the message names the errno), 2 usage.
"""

import argparse
import errno
import fcntl
import os
import struct
import sys

# <linux/fscrypt.h>
FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER = 2
FSCRYPT_KEY_IDENTIFIER_SIZE = 16
FSCRYPT_POLICY_V2 = 2
FSCRYPT_MODE_AES_256_XTS = 1
FSCRYPT_MODE_AES_256_CTS = 4
FSCRYPT_POLICY_FLAGS_PAD_32 = 0x03
FSCRYPT_MIN_KEY_SIZE = 16
FSCRYPT_MAX_KEY_SIZE = 64
FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY = 0x1
FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS = 0x2
KEY_STATUS = {1: "absent", 2: "present", 3: "incompletely removed"}


def _iowr(nr, size):
    # _IOC(_IOC_READ|_IOC_WRITE, 'f', nr, size)
    return (3 << 30) | (size << 16) | (ord("f") << 8) | nr


def _ior(nr, size):
    return (2 << 30) | (size << 16) | (ord("f") << 8) | nr


# struct fscrypt_key_specifier { u32 type; u32 reserved; u8 u[32]; }: 40 bytes
KEY_SPEC = struct.Struct("=II32s")
# struct fscrypt_add_key_arg { key_spec; u32 raw_size; u32 key_id;
#                              u32 flags; u32 reserved[7]; u8 raw[]; }: 80 + raw
ADD_KEY = struct.Struct("=40sIII28s")
# struct fscrypt_remove_key_arg { key_spec; u32 removal_status_flags;
#                                 u32 reserved[5]; }: 64 bytes
REMOVE_KEY = struct.Struct("=40sI20s")
# struct fscrypt_get_key_status_arg { key_spec; u32 reserved[6]; u32 status;
#                   u32 status_flags; u32 user_count; u32 out_reserved[13]; }
KEY_STATUS_ARG = struct.Struct("=40s24sIII52s")
# struct fscrypt_policy_v2 { u8 version, contents_mode, filenames_mode, flags,
#                            log2_data_unit_size, reserved[3]; u8 id[16]; }
POLICY_V2 = struct.Struct("=BBBBB3s16s")

FS_IOC_SET_ENCRYPTION_POLICY = _ior(19, 12)  # sized after struct fscrypt_policy_v1
FS_IOC_ADD_ENCRYPTION_KEY = _iowr(23, ADD_KEY.size)
FS_IOC_REMOVE_ENCRYPTION_KEY = _iowr(24, REMOVE_KEY.size)
FS_IOC_GET_ENCRYPTION_KEY_STATUS = _iowr(26, KEY_STATUS_ARG.size)


class Refused(Exception):
    pass


def identifier(text):
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != FSCRYPT_KEY_IDENTIFIER_SIZE:
        raise argparse.ArgumentTypeError("an identifier is 32 hex digits")
    return raw


def key_spec(ident=b""):
    return KEY_SPEC.pack(FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER, 0, ident)


def ioctl(path, request, arg, what):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = bytearray(arg)
        fcntl.ioctl(fd, request, buf, True)
        return bytes(buf)
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        raise Refused(f"{what} on {path}: {name}: {e.strerror}") from None
    finally:
        os.close(fd)


def add_key(mountpoint, key_id):
    if key_id is None:
        raw = bytearray(sys.stdin.buffer.read(FSCRYPT_MAX_KEY_SIZE + 1))
        if not FSCRYPT_MIN_KEY_SIZE <= len(raw) <= FSCRYPT_MAX_KEY_SIZE:
            raise Refused(f"the key on stdin must be 16 to 64 bytes, not {len(raw)}")
        arg = bytearray(ADD_KEY.pack(key_spec(), len(raw), 0, 0, b"")) + raw
    else:
        arg = bytearray(ADD_KEY.pack(key_spec(), 0, key_id, 0, b""))
    try:
        out = ioctl(mountpoint, FS_IOC_ADD_ENCRYPTION_KEY, arg, "FS_IOC_ADD_ENCRYPTION_KEY")
    finally:
        # Best effort: Python may have copied it, but do not keep it around.
        for i in range(len(arg)):
            arg[i] = 0
    _, _, ident = KEY_SPEC.unpack(out[: KEY_SPEC.size])
    return ident[:FSCRYPT_KEY_IDENTIFIER_SIZE].hex()


def set_policy(directory, ident):
    policy = POLICY_V2.pack(
        FSCRYPT_POLICY_V2,
        FSCRYPT_MODE_AES_256_XTS,
        FSCRYPT_MODE_AES_256_CTS,
        FSCRYPT_POLICY_FLAGS_PAD_32,
        0,
        b"",
        ident,
    )
    ioctl(directory, FS_IOC_SET_ENCRYPTION_POLICY, policy, "FS_IOC_SET_ENCRYPTION_POLICY")


def remove_key(mountpoint, ident):
    arg = REMOVE_KEY.pack(key_spec(ident), 0, b"")
    out = ioctl(mountpoint, FS_IOC_REMOVE_ENCRYPTION_KEY, arg, "FS_IOC_REMOVE_ENCRYPTION_KEY")
    _, flags, _ = REMOVE_KEY.unpack(out)
    if flags & FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY:
        print("fscrypt-derived: files still in use: the key stays until they are closed "
              "(run remove-key again then)", file=sys.stderr)
    if flags & FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS:
        print("fscrypt-derived: other users added this key too: only your claim is removed",
              file=sys.stderr)


def status(mountpoint, ident):
    arg = KEY_STATUS_ARG.pack(key_spec(ident), b"", 0, 0, 0, b"")
    out = ioctl(mountpoint, FS_IOC_GET_ENCRYPTION_KEY_STATUS, arg,
                "FS_IOC_GET_ENCRYPTION_KEY_STATUS")
    _, _, st, _, users = KEY_STATUS_ARG.unpack(out)[:5]
    return KEY_STATUS.get(st, f"unknown ({st})"), users


def main():
    p = argparse.ArgumentParser(prog="fscrypt-derived.py",
                                description="v2 fscrypt policies keyed by derived keys")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add-key", help="add a master key; prints its identifier")
    a.add_argument("mountpoint")
    a.add_argument("--key-id", type=int, metavar="SERIAL",
                   help="an fscrypt-provisioning key (else: the raw key on stdin)")
    s = sub.add_parser("set-policy", help="set a v2 policy on an empty directory")
    s.add_argument("dir")
    s.add_argument("identifier", type=identifier)
    r = sub.add_parser("remove-key", help="remove a master key")
    r.add_argument("mountpoint")
    r.add_argument("identifier", type=identifier)
    t = sub.add_parser("status", help="is a master key present?")
    t.add_argument("mountpoint")
    t.add_argument("identifier", type=identifier)
    args = p.parse_args()
    try:
        if args.cmd == "add-key":
            print(add_key(args.mountpoint, args.key_id))
        elif args.cmd == "set-policy":
            set_policy(args.dir, args.identifier)
        elif args.cmd == "remove-key":
            remove_key(args.mountpoint, args.identifier)
        else:
            st, users = status(args.mountpoint, args.identifier)
            print(st if st != "present" else f"present (users: {users})")
    except Refused as e:
        print(f"fscrypt-derived: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
