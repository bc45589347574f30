#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/TARGET/*): valid inputs of each kind,
so the fuzzer starts past the outer decoding. Run from the repository root:
`python3 fuzz/make_seeds.py` (needs openssl for the CSR and PEM seeds)."""
import json, os, pathlib, subprocess, struct, tempfile

ROOT = pathlib.Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"


def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(field, n):
    return varint(field << 3) + varint(n)


def f_bytes(field, b):
    if isinstance(b, str):
        b = b.encode()
    return varint(field << 3 | 2) + varint(len(b)) + b


def revocation(kind, value, reason="seed"):
    return f_bytes(kind, value) + f_bytes(7, reason)


REVOCATIONS = [
    revocation(1, "spiffe://fuzz.test/agent/eu/a"),
    revocation(2, "jti-1"),
    revocation(3, "0a1b2c"),
    revocation(4, f_bytes(1, "spiffe://fuzz.test/agent/eu/a") + f_varint(2, 1_800_000_000)),
    revocation(5, "spiffe://fuzz.test/cache/eu/c1"),
    revocation(6, bytes(range(32))),
    revocation(8, f_bytes(1, "openai") + f_varint(2, 2)),
]


def event(seq, body_field, body):
    return f_varint(1, seq) + f_varint(2, 1_765_000_000_000) + f_bytes(body_field, body)


def secret_events():
    sealed = (f_varint(1, 1) + f_bytes(2, bytes(40)) +
              f_bytes(3, f_bytes(1, "spiffe://fuzz.test/cache/eu/c1") + f_bytes(2, bytes(32)) + f_bytes(3, bytes(48))) +
              f_bytes(4, "fp") + f_varint(5, 1_765_000_000))
    state = f_varint(1, 1) + f_bytes(4, "spiffe://fuzz.test/cache/eu/c1")
    return [f_bytes(1, "openai") + f_bytes(2, sealed), f_bytes(1, "openai") + f_bytes(3, state)]


def bundle_files():
    d = ROOT.parent / "deploy" / "policies" / "example"
    files = b""
    for p in sorted(d.iterdir()):
        if p.suffix in (".cedar", ".cedarschema", ".json") and p.name != "tests.json":
            files += f_bytes(1, f_bytes(1, p.name) + f_bytes(2, p.read_text()))
    return files


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def main():
    events = [event(i + 1, 3, r) for i, r in enumerate(REVOCATIONS)]
    n = len(events)
    release = f_varint(1, 1) + f_bytes(2, bundle_files()) + f_bytes(3, bytes(32))
    events.append(event(n + 1, 4, f_bytes(1, release) + f_bytes(2, bytes(64)) + f_bytes(3, b"\x30\x03\x02\x01\x00")))
    for i, s in enumerate(secret_events()):
        events.append(event(n + 2 + i, 5, s))
    batch = b"".join(f_bytes(1, e) for e in events)
    write("event_batch", "all-kinds", batch)
    write("event_batch", "one-revocation", f_bytes(1, events[0]))
    for i, e in enumerate(events):
        write("stored_event", f"event-{i}", e)
    for i, r in enumerate(REVOCATIONS):
        write("revocation", f"kind-{i}", r)

    def delimited(m):
        return varint(len(m)) + m
    checkpoint = f_bytes(1, f_varint(1, 1) + f_varint(2, 1_765_000_000_000) + f_bytes(3, bytes(32))) + f_bytes(2, bytes(64)) + f_bytes(3, b"\x30\x00")
    pong = f_varint(1, 7) + f_varint(2, 1) + f_varint(3, 1) + f_bytes(4, checkpoint)
    down = (delimited(f_bytes(1, f_bytes(1, events[0]))) + delimited(f_bytes(2, pong)) +
            delimited(f_bytes(3, f_varint(1, 1))) + delimited(f_bytes(4, f_varint(1, 2))))
    write("sync_down", "session", down)

    recs = [
        {"kind": "issued", "agent": "spiffe://fuzz.test/agent/eu/a", "at_unix_ms": 1, "jti": "j", "scope": "read"},
        {"kind": "leased", "agent": "spiffe://fuzz.test/agent/eu/a", "secret": "openai", "fingerprint": "fp"},
        {"kind": "refused", "agent": "spiffe://fuzz.test/agent/us/b", "reason": "policy"},
        {"kind": "outbox_pressure", "held": 10, "max": 100},
    ]
    audit = f_varint(1, 1) + b"".join(f_bytes(2, json.dumps(r)) for r in recs)
    write("sync_up", "audit", b"\x00" + f_bytes(4, audit))
    write("sync_up", "hello", b"\x00" + f_bytes(1, f_varint(1, 3) + f_varint(2, 9) + f_varint(3, 5000)))

    write("policy_bundle", "example", bundle_files())

    claims = {"iss": "spiffe://fuzz.test/cache/eu/c1", "sub": "spiffe://fuzz.test/agent/eu/a",
              "aud": "https://api.fuzz.test", "scope": "read", "jti": "j1", "iat": 0, "nbf": 0,
              "exp": 4_000_000_000, "parent_jtis": [],
              "act": {"sub": "spiffe://fuzz.test/agent/eu/a/planner"},
              "cnf": {"x5t#S256": "AAAA"}}
    write("jwt", "signed-claims", b"\x01" + json.dumps(claims).encode())
    write("jwt", "compact", b"\x00eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCIsImtpZCI6ImsifQ.eyJzdWIiOiJ4In0.AAAA")

    write("proxy_target", "origin", b"GET\n/v1/chat/completions?x=1\napi.openai.com")
    write("proxy_target", "absolute", b"POST\nhttp://api.anthropic.com:80/v1/messages\n")
    write("proxy_target", "connect", b"CONNECT\napi.openai.com:443\n")

    table = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
             "   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0 20 4 30 10 -1\n")
    head = bytes([127, 0, 0, 1]) + struct.pack(">H", 8080) + bytes([127, 0, 0, 1]) + struct.pack(">H", 0xD431)
    write("proc_net_tcp", "v4", head + table.encode())

    with tempfile.TemporaryDirectory() as t:
        key, csr, crt = (os.path.join(t, n) for n in ("k.pem", "r.der", "c.pem"))
        for alg in (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"], ["-newkey", "ed25519"]):
            subprocess.run(["openssl", "req", "-new", *alg, "-nodes", "-keyout", key, "-subj", "/CN=a",
                            "-addext", "subjectAltName=DNS:a.fuzz.test,IP:127.0.0.1", "-outform", "DER", "-out", csr],
                           check=True, capture_output=True)
            write("csr", f"csr-{alg[1]}", pathlib.Path(csr).read_bytes())
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-subj", "/CN=root", "-addext", "subjectAltName=URI:spiffe://fuzz.test/cp/main",
                        "-days", "1", "-out", crt], check=True, capture_output=True)
        pem = pathlib.Path(crt).read_bytes()
        write("pem", "one", pem)
        write("pem", "two", pem + pem)
        der = subprocess.run(["openssl", "x509", "-in", crt, "-outform", "DER"], check=True, capture_output=True).stdout
        write("csr", "certificate", der)


if __name__ == "__main__":
    main()
