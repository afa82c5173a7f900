#!/usr/bin/env python3
"""An independent implementation of DERIVATION.md (derived-keys v1), written
from the specification with the Python standard library, and for the
Ed25519 purpose (section 7) pyca/cryptography's Ed25519 (OpenSSL's), an
implementation the project did not write. It recomputes every known-answer
vector from its inputs and checks every byte, signatures included (RFC 6979
deterministic ECDSA, its own code; RFC 8032 Ed25519 through cryptography),
and verifies each signature. Its ECDSA is first checked against RFC 6979
appendix A.2.5, its Ed25519 against RFC 8032 section 7.1.
Usage: derive_v1.py VECTORS.json
"""
import hashlib
import hmac
import json
import struct
import sys

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
except ImportError:  # pragma: no cover
    sys.exit("derive_v1.py: pyca/cryptography is needed for the Ed25519 vectors "
             "(Debian: python3-cryptography; scripts/install-deps.sh installs it)")

# P-256 domain parameters (SEC 2 / FIPS 186-4).
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
A = P - 3
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
     0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)
SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")


def lp(b):
    return struct.pack(">I", len(b)) + b


def opt(v):
    return b"\x00" if v is None else b"\x01" + lp(v.encode())


# DERIVATION.md, "Purposes": code, and the HKDF info of symmetric purposes.
PURPOSES = {"symmetric": 0x01, "p256": 0x02, "kernel-symmetric": 0x03, "ed25519": 0x04}
FIXED_LENGTH = {"p256": 32, "ed25519": 32}
HKDF_INFO = {
    "symmetric": b"derived-keys/v1/symmetric",
    "kernel-symmetric": b"derived-keys/v1/kernel-symmetric",
}
# DERIVATION.md section 7.
ED25519_SEED_INFO = b"derived-keys/v1/ed25519-seed"


def encode(inp, data):
    e = lp(b"derived-keys") + b"\x01"
    purpose = inp["purpose"]
    length = FIXED_LENGTH.get(purpose) or inp["length"]
    e += bytes([PURPOSES[purpose]]) + struct.pack(">I", length)
    e += lp(inp["name"].encode())
    b = inp["binding"]
    if b == "path":
        e += b"\x01" + struct.pack(">I", inp["uid"]) + lp(data)
    elif b == "csum":
        e += b"\x02" + struct.pack(">I", inp["uid"]) + lp(data)
    elif b == "user":
        e += b"\x03" + struct.pack(">I", inp["uid"])
    else:
        e += b"\x04"
    e += opt(inp.get("account")) + opt(inp.get("client"))
    return e + struct.pack(">I", inp.get("epoch", 0))


def hkdf_sha256(ikm, info, length):
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()  # no salt
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + t, i + 1
    return out[:length]


def expand_message_xmd(msg, dst, length):
    """RFC 9380 section 5.3.1 with SHA-256."""
    ell = (length + 31) // 32
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha256(b"\x00" * 64 + msg + length.to_bytes(2, "big") + b"\x00" + dst_prime).digest()
    bi = hashlib.sha256(b0 + b"\x01" + dst_prime).digest()
    out = bi
    for i in range(2, ell + 1):
        bi = hashlib.sha256(bytes(x ^ y for x, y in zip(b0, bi)) + bytes([i]) + dst_prime).digest()
        out += bi
    return out[:length]


def ec_add(p1, p2):
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    if p1[0] == p2[0] and (p1[1] + p2[1]) % P == 0:
        return None
    if p1 == p2:
        lam = (3 * p1[0] * p1[0] + A) * pow(2 * p1[1], -1, P) % P
    else:
        lam = (p2[1] - p1[1]) * pow(p2[0] - p1[0], -1, P) % P
    x = (lam * lam - p1[0] - p2[0]) % P
    return (x, (lam * (p1[0] - x) - p1[1]) % P)


def ec_mul(k, pt):
    r = None
    while k:
        if k & 1:
            r = ec_add(r, pt)
        pt, k = ec_add(pt, pt), k >> 1
    return r


def rfc6979_k(d, h1):
    """RFC 6979 section 3.2 with HMAC-SHA256, q = N (qlen = hlen = 256, so
    bits2int is OS2IP), no additional data."""
    def mac(key, data):
        return hmac.new(key, data, hashlib.sha256).digest()
    x = d.to_bytes(32, "big")                          # int2octets(x)
    h = (int.from_bytes(h1, "big") % N).to_bytes(32, "big")  # bits2octets(h1)
    v, k = b"\x01" * 32, b"\x00" * 32                  # steps b, c
    k = mac(k, v + b"\x00" + x + h)                    # step d
    v = mac(k, v)                                      # step e
    k = mac(k, v + b"\x01" + x + h)                    # step f
    v = mac(k, v)                                      # step g
    while True:                                        # step h
        v = mac(k, v)
        cand = int.from_bytes(v, "big")
        if 1 <= cand < N:
            return cand
        k = mac(k, v + b"\x00")
        v = mac(k, v)


def der_int(i):
    b = i.to_bytes((i.bit_length() + 8) // 8, "big")   # minimal, positive
    return b"\x02" + bytes([len(b)]) + b


def ecdsa_sign(d, h1):
    """DERIVATION.md section 5: z = OS2IP(h1) mod n for the nonce and the
    equation, s not normalized, DER ECDSA-Sig-Value."""
    z = int.from_bytes(h1, "big") % N
    k = rfc6979_k(d, h1)
    r = ec_mul(k, G)[0] % N
    s = pow(k, -1, N) * (z + r * d) % N
    assert r != 0 and s != 0
    body = der_int(r) + der_int(s)
    return k, bytes([0x30, len(body)]) + body


def rfc6979_self_test():
    """RFC 6979 A.2.5, P-256 with SHA-256: k, r, s for "sample" and "test"."""
    x = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
    for msg, k, r, s in [
        (b"sample", 0xA6E3C57DD01ABE90086538398355DD4C3B17AA873382B0F24D6129493D8AAD60,
         0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
         0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8),
        (b"test", 0xD16B6AE827F17175E040871A1C7EC3500192C4C92677336EC2537ACAEE0008E0,
         0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
         0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083),
    ]:
        got_k, sig = ecdsa_sign(x, hashlib.sha256(msg).digest())
        if (got_k, der_ints(sig)) != (k, [r, s]):
            print(f"FAIL RFC 6979 A.2.5 {msg!r}")
            return False
    return True


def der_ints(sig):
    """(r, s) from a DER ECDSA-Sig-Value."""
    assert sig[0] == 0x30 and sig[1] == len(sig) - 2
    vals, i = [], 2
    for _ in range(2):
        assert sig[i] == 0x02
        n = sig[i + 1]
        vals.append(int.from_bytes(sig[i + 2:i + 2 + n], "big"))
        i += 2 + n
    assert i == len(sig)
    return vals


def ed25519(seed, message):
    """RFC 8032 Ed25519 (pure) from the 32-byte seed, by pyca/cryptography:
    the RFC 8410 SubjectPublicKeyInfo DER and the signature over message.
    The signature is verified with the public key parsed back from that DER."""
    key = Ed25519PrivateKey.from_private_bytes(seed)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    sig = key.sign(message)
    serialization.load_der_public_key(spki).verify(sig, message)
    return spki, sig


def ed25519_verify(spki, message, sig):
    try:
        serialization.load_der_public_key(spki).verify(sig, message)
        return True
    except InvalidSignature:
        return False


def rfc8032_self_test():
    """RFC 8032 section 7.1, TEST 1 and TEST 2: public key and signature."""
    for seed, public, msg, sig in [
        ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
         "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
         "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
        ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
         "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
         "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ]:
        spki, got = ed25519(bytes.fromhex(seed), bytes.fromhex(msg))
        if (spki.hex(), got.hex()) != ("302a300506032b6570032100" + public, sig):
            print(f"FAIL RFC 8032 7.1 seed {seed[:8]}...")
            return False
    return True


def ecdsa_verify(q, digest, sig):
    r, s = der_ints(sig)
    if not (0 < r < N and 0 < s < N):
        return False
    w = pow(s, -1, N)
    z = int.from_bytes(digest, "big")
    pt = ec_add(ec_mul(z * w % N, G), ec_mul(r * w % N, q))
    return pt is not None and pt[0] % N == r


def main(path):
    if not (rfc6979_self_test() and rfc8032_self_test()):
        return 1
    doc = json.load(open(path))
    prf_key = bytes.fromhex(doc["prf_key"])
    count = 0
    for v in doc["vectors"]:
        case, inp, data = v["case"], v["input"], bytes.fromhex(v["data"])
        e = encode(inp, data)
        m = hashlib.sha256(e).digest()
        prk = hmac.new(prf_key, m, hashlib.sha256).digest()
        got = {"encoding": e.hex(), "message": m.hex(), "prk": prk.hex()}
        if inp["purpose"] in HKDF_INFO:
            got["key"] = hkdf_sha256(prk, HKDF_INFO[inp["purpose"]], inp["length"]).hex()
        elif inp["purpose"] == "ed25519":
            seed = hkdf_sha256(prk, ED25519_SEED_INFO, 32)
            message = bytes.fromhex(v["sign_message"])
            if not 1 <= len(message) <= 1024:
                print(f"FAIL {case}: a message of {len(message)} bytes")
                return 1
            spki, sig = ed25519(seed, message)
            got["seed"] = seed.hex()
            got["spki"] = spki.hex()
            got["signature"] = sig.hex()
            if not ed25519_verify(bytes.fromhex(v["spki"]), message, bytes.fromhex(v["signature"])):
                print(f"FAIL {case}: signature does not verify")
                return 1
        elif inp["purpose"] == "p256":
            u = expand_message_xmd(prk, b"derived-keys/v1/p256-scalar", 48)
            d = int.from_bytes(u, "big") % N
            assert d != 0
            q = ec_mul(d, G)
            got["scalar"] = d.to_bytes(32, "big").hex()
            got["spki"] = (SPKI_PREFIX + b"\x04" + q[0].to_bytes(32, "big") + q[1].to_bytes(32, "big")).hex()
            digest = bytes.fromhex(v["sign_digest"])
            got["signature"] = ecdsa_sign(d, digest)[1].hex()
            if not ecdsa_verify(q, digest, bytes.fromhex(v["signature"])):
                print(f"FAIL {case}: signature does not verify")
                return 1
        else:
            print(f"FAIL {case}: unknown purpose {inp['purpose']}")
            return 1
        for field, value in got.items():
            if v[field] != value:
                print(f"FAIL {case}: {field}\n  vector {v[field]}\n  python {value}")
                return 1
        count += 1
    print(f"{count} vectors agree")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
