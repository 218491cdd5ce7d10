"""Tests for glean_oauth.py, and the stand-in Glean server that `make demo` runs.

The stand-in is strict like a real authorization server: it checks the client's
credentials, PKCE, the exact redirect URI, single-use codes, refresh-token rotation and
the bearer token on the Chat API, and records every request so tests can assert on what
was sent. Everything listens on 127.0.0.1 with ports the system picks.

After the stand-in and the helpers, the tests follow glean_oauth.py's order: the flow,
its ten steps, then one section per part below its "beyond the documented flow" line.

    python3 -m pytest test_glean_oauth.py    # the suite
    python3 test_glean_oauth.py demo         # the whole flow against the stand-in
"""

import argparse
import atexit
import base64
import codecs
import contextlib
import errno
import functools
import glob
import hashlib
import http.client
import io
import json
import os
import pathlib
import queue
import re
import secrets
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer


class ThreadingHTTPServer(socketserver.ThreadingMixIn, HTTPServer):
    """http.server's own ThreadingHTTPServer, which Python 3.6 lacks."""

    daemon_threads = True

try:
    import pytest

    parametrize = pytest.mark.parametrize
except ImportError:  # the demo needs only the stand-in server, not pytest: every decorator
    pytest = None    # that runs at import goes through parametrize or skip_if

    def parametrize(names, values):
        return lambda test: test


def skip_if(condition, reason):
    """pytest.mark.skipif, or nothing where pytest is not there (the demo)."""
    return pytest.mark.skipif(condition, reason=reason) if pytest else (lambda test: test)


import glean_oauth

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "glean_oauth.py")
CLIENT_ID = "stand-in-client"
# Distinctive, so a test can prove it never reaches any output.
CLIENT_SECRET = "s3cret-NEVER-PRINT-9f2c1e7a"
EPHEMERAL_REDIRECT_URI = "http://127.0.0.1:0/oauth/callback"
RUN_TIMEOUT = 20  # seconds a whole script run may take before a test gives up on it


# --- The stand-in Glean server ---------------------------------------------------------


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(header, claims, key=None):
    """A JWT with a real header and claims, signed with `key` (a private JWK) by the
    header's alg; without one, random bytes for a signature."""
    def part(obj):
        return b64url(json.dumps(obj).encode("utf-8"))
    signing_input = part(header) + "." + part(claims)
    signature = sign(header["alg"], key, signing_input.encode("ascii")) if key else secrets.token_bytes(32)
    return signing_input + "." + b64url(signature)


# The signer: written apart from glean_oauth.py's verifier (affine points here, Jacobian
# there; a padding built here, compared whole there), so that one cannot share a mistake
# with the other. RFC 7515 Appendix A's vectors check the verifier on its own.
def b64int(text):
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def int64(number, size):
    return b64url(number.to_bytes(size, "big"))


RFC_7515_A2_KEY = {  # RFC 7515 Appendix A.2's RSA key
    "kty": "RSA", "e": "AQAB",
    "n": "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-"
         "pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2Ca"
         "pHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb5"
         "4h4FRWyuXpoQ",
    "p": "4BzEEOtIpmVdVEZNCqS7baC4crd0pqnRH_5IB3jw3bcxGn6QLvnEtfdUdiYrqBdss1l58BQ3KhooKeQTa9AB0Hw_Py5PJdTJNPY8cQn7ouZ2"
         "KKDcmnPGBY5t7yLc1QlQ5xHdwW1VhvKn-nXqhJTBgIPgtldC-KDV5z-y2XDwGUc",
    "q": "uQPEfgmVtjL0Uyyx88GZFF1fOunH3-7cepKmtH4pxhtCoHqpWmT8YAmZxaewHgHAjLYsp1ZSe7zFYHj7C6ul7TjeLQeZD_YwD66t62wDmpe_"
         "HlB-TnBA-njbglfIsRLtXlnDzQkv5dTltRJ11BKBBypeeF6689rjcJIDEz9RWdc",
}
RFC_7515_A2_JWS = (
    "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ."
    "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZ"
    "cAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eO"
    "kHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw")
RFC_7515_A3_KEY = {"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                   "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0", "d": "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI"}
RFC_7515_A3_JWS = (
    "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ."
    "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q")
RFC_7515_A4_KEY = {
    "kty": "EC", "crv": "P-521",
    "x": "AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk",
    "y": "ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDly79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2",
    "d": "AY5pb7A0UFiB3RELSD64fTLOSV_jazdF7fLYyuTw8lOfRhWg6Y6rUrPAxerEzgdRhajnu0ferB0d53vM9mE15j2C"}
RFC_7515_A4_JWS = (  # its payload is the text "Payload", no JSON: a JWS, not a JWT
    "eyJhbGciOiJFUzUxMiJ9.UGF5bG9hZA.AdwMgeerwtHoh-l192l60hp9wAHZFVJbLfD_UxMi70cwnZOYaRI1bKPWROc-mZZqwqT2SI-KGDKB34XO0aw_7"
    "XdtAG8GaSwFKdCAPZgoXD2YBJZCPEX3xKpRwcdOO8KpEHwJjyqOgzDO7iKvU8vcnwNrmxYbSW9ERBXukOXolLzeO_Jn")


def affine_add(curve, one, other):
    """P + Q on a NIST curve (a = -3), in affine coordinates; None is the point at infinity."""
    p = glean_oauth.CURVES[curve][0]
    if one is None or other is None:
        return other or one
    if one[0] == other[0] and (one[1] + other[1]) % p == 0:
        return None
    if one == other:
        slope = (3 * one[0] * one[0] - 3) * inverse(2 * one[1], p) % p
    else:
        slope = (other[1] - one[1]) * inverse(other[0] - one[0], p) % p
    x = (slope * slope - one[0] - other[0]) % p
    return x, (slope * (one[0] - x) - one[1]) % p


def affine_multiple(curve, k, point):
    """k·point, by doubling and adding."""
    result = None
    for bit in bin(k)[2:]:
        result = affine_add(curve, result, result)
        if bit == "1":
            result = affine_add(curve, result, point)
    return result


@functools.lru_cache(maxsize=None)
def doublings(curve):
    """G, 2G, 4G, ... on `curve`: k·G is then one addition per bit set in k."""
    _, _, g, n = glean_oauth.CURVES[curve]
    table = [g]
    for _ in range(n.bit_length()):
        table.append(affine_multiple(curve, 2, table[-1]))
    return table


def base_multiple(curve, k):
    """k·G on `curve`, from the table of doublings."""
    result = None
    for bit, point in zip(reversed(bin(k)[2:]), doublings(curve)):
        if bit == "1":
            result = affine_add(curve, result, point)
    return result


@functools.lru_cache(maxsize=None)
def ec_key(curve, seed):
    """A private EC JWK on `curve`, its d made from `seed`."""
    n = glean_oauth.CURVES[curve][3]
    size = (n.bit_length() + 7) // 8
    d = int.from_bytes(hashlib.sha512(seed.encode()).digest() * 2, "big") % (n - 1) + 1
    x, y = base_multiple(curve, d)
    return {"kty": "EC", "crv": curve, "x": int64(x, size), "y": int64(y, size), "d": int64(d, size)}


def sign(alg, key, message):
    """`alg`'s signature of `message` with the private JWK `key` (RFC 7518 §3)."""
    hash_name = "sha" + alg[2:]
    digest = hashlib.new(hash_name, message).digest()
    if alg.startswith("ES"):
        n = glean_oauth.CURVES[key["crv"]][3]
        size, d = (n.bit_length() + 7) // 8, b64int(key["d"])
        e = int.from_bytes(digest, "big") >> max(0, 8 * len(digest) - n.bit_length())
        while True:
            k = secrets.randbelow(n - 1) + 1
            r = base_multiple(key["crv"], k)[0] % n
            s = inverse(k, n) * (e + r * d) % n
            if r and s:
                return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    n, p, q = (b64int(key[name]) for name in ("n", "p", "q"))
    size, em_bits = (n.bit_length() + 7) // 8, n.bit_length() - 1
    if alg.startswith("RS"):  # EMSA-PKCS1-v1_5 (RFC 8017 §9.2)
        t = glean_oauth.DIGEST_INFO[hash_name] + digest
        encoded = b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t
    else:  # EMSA-PSS-ENCODE (RFC 8017 §9.1.1), a salt as long as the hash
        salt, em_len = secrets.token_bytes(len(digest)), (em_bits + 7) // 8
        h = hashlib.new(hash_name, b"\x00" * 8 + digest + salt).digest()
        db = b"\x00" * (em_len - 2 * len(digest) - 2) + b"\x01" + salt
        mask = b"".join(hashlib.new(hash_name, h + i.to_bytes(4, "big")).digest() for i in range(len(db) // len(h) + 1))
        masked = bytes(a ^ b for a, b in zip(db, mask))
        encoded = bytes([masked[0] & (0xff >> (8 * em_len - em_bits))]) + masked[1:] + h + b"\xbc"
    # The private operation by the Chinese remainder theorem, a prime at a time.
    m, primes = int.from_bytes(encoded, "big"), (p, q) + tuple(b64int(other["r"]) for other in key.get("oth", ()))
    return (sum(pow(m, d, r) * c for r, d, c in crt_parts(primes, b64int(key["e"]))) % n).to_bytes(size, "big")


@functools.lru_cache(maxsize=None)
def crt_parts(primes, e):
    """Per prime r of n: (r, d mod r-1, the CRT coefficient that is 1 mod r and 0 mod the others)."""
    n = functools.reduce(lambda a, b: a * b, primes)
    return [(r, inverse(e, r - 1), n // r * inverse(n // r, r)) for r in primes]


def inverse(a, m):
    """a⁻¹ mod m: pow(a, -1, m), or before Python 3.8 the extended Euclidean algorithm."""
    if sys.version_info >= (3, 8):
        return pow(a, -1, m)
    old, r, old_s, s_ = a % m, m, 1, 0
    while r:
        quotient = old // r
        old, r, old_s, s_ = r, old - quotient * r, s_, old_s - quotient * s_
    return old_s % m


def public(key):
    """The public JWK of a private one."""
    return {name: value for name, value in key.items() if name not in ("d", "p", "q", "dp", "dq", "qi", "oth")}


def multi_prime_key(*primes):
    """A private RSA JWK of several primes (RFC 7518 §6.3.2.7's oth). The stand-in signs
    every token it issues: a 2048-bit key of eight 256-bit primes signs ten times as fast
    as one of two, and is as good for testing a verifier, which sees n and e alone."""
    n = functools.reduce(lambda a, b: a * b, primes)
    encoded = [int64(prime, 32) for prime in primes]
    return {"kty": "RSA", "e": "AQAB", "n": int64(n, 256), "p": encoded[0], "q": encoded[1],
            "oth": [{"r": r} for r in encoded[2:]]}


STAND_IN_RSA_KEY = multi_prime_key(
    0xfefe9c75895d8b12174094953b5cde58ffff3ff5ef666389ffa8809ded79f379,
    0xff32891c09d40c7d13b5c264a5e93249c01a920f5daab0b00624174f06391737,
    0xfda4ef4b9e065c07020c253fae0bdb84d7d7e04d7f4e295439c807cee52898b1,
    0xfc40c05d4bb7a593b1ba4c4c90a29b1ce84db28fc50d619b40592460bee22697,
    0xffdc33f3ae1f95d46621ddbe32886024b19f019ed859e70161f26c2ba1abeb5b,
    0xfcf0519038ba51eae012dd6ba9a8770674ccb74dd48c510982a480b2baa86b6b,
    0xfdd33720ec9e364913d1bf1d16ca670a2f9ad5e222f3a7657b0b10d37dd9b2e9,
    0xfdccf475f9984bba5ba13114b6d2f71a354fb47e0ef16bbf99321d757ddcddd9)
STAND_IN_KEYS = {"RSA": ("rsa-1", STAND_IN_RSA_KEY), "P-256": ("p256-1", RFC_7515_A3_KEY),
                 "P-384": ("p384-1", None), "P-521": ("p521-1", RFC_7515_A4_KEY)}


def stand_in_key(alg):
    """(kid, private JWK) the stand-in signs `alg` with."""
    curve = glean_oauth.JWS_ALGORITHMS[alg][2] if alg.startswith("ES") else "RSA"
    kid, key = STAND_IN_KEYS[curve]
    return kid, key or ec_key(curve, "stand-in " + curve)


def stand_in_jwks():
    """The stand-in's JWK Set: one key of each kind it signs with, public parts only."""
    return {"keys": [dict(public(stand_in_key(alg)[1]), kid=stand_in_key(alg)[0], use="sig")
                     for alg in ("RS256", "ES256", "ES384", "ES512")]}


class Recorded:
    """One request the stand-in received."""

    def __init__(self, method, target, headers, body, connection=None):
        self.method, self.headers, self.body = method, headers, body
        self.connection = connection  # which of the stand-in's connections it came on (1, 2, ...)
        self.target = target
        self.path, _, query = target.partition("?")
        self.query = urllib.parse.parse_qs(query, keep_blank_values=True)
        self.form = {}
        if headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            self.form = urllib.parse.parse_qs(body.decode("ascii"), keep_blank_values=True)


class StandInGlean:
    """A Glean backend and OAuth authorization server on 127.0.0.1, strict like the real one.

    `overrides[path] = (status, headers, body)`, or a function of the Recorded request that
    returns one, answers that path instead, for fault tests. `registered_redirect` is the
    redirect URI registered on the client; a loopback one matches any port (RFC 8252 §7.3).
    With `tls`, it serves HTTPS with the test certificate.
    """

    def __init__(self, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                 registered_redirect="http://127.0.0.1/oauth/callback", tls=False):
        self.client_id, self.client_secret = client_id, client_secret
        self.registered_redirect = registered_redirect
        self.issue_refresh_token = True
        self.opaque_tokens = False  # access tokens that are not JWTs
        self.authorize_error = None  # e.g. "access_denied": the user said no
        self.known_scopes = None  # the scopes the server takes (None: any); another is invalid_scope
        self.error_description = None
        self.callback_iss = "issuer"  # what the redirect's iss is: "issuer", None or a string
        self.metadata_extra = {}
        self.public_client = False  # True: the client may authenticate with "none"
        self.client_auth_seen = []  # the method each token request authenticated with
        self.overrides = {}
        self.close_after = set()  # paths after whose answer the connection is closed, unannounced
        self.connections = 0  # TCP connections accepted so far
        self.requests = []
        self.codes = {}  # code -> what the authorization request bound it to
        self.access_tokens = {}  # access token -> the scope it was granted (None: none asked for)
        self.refresh_scopes = {}  # refresh token -> the scope it carries
        self.revoked = []  # (token_type_hint, token) of each revocation request that checked out
        self.refuse_access_token_revocation = False  # as oidc-provider does for a JWT: unsupported_token_type
        self.grant = lambda asked: asked  # the scope granted for the scope asked for
        self.lifetime = 3600  # seconds an access token lives
        self.answer = "The executive team is listed on the People page."
        self.chat_delay = 0  # seconds before the chat answer starts
        self.stream_pace = None  # with --stream: stream_pace(line index) runs before each line
        self.stream_framing = "chunked"  # or "length": the whole stream with a Content-Length, as a buffering proxy sends it
        self.answer_deltas = None  # with --stream: the answer's text deltas (default: a word each)
        self.interim = {}  # path -> the 1xx statuses sent before its answer (102 Processing, 103 Early Hints)
        self.signing_alg = "RS256"  # how access tokens are signed (None: random bytes for a signature)
        self.date_skew = 0  # seconds the Date header is ahead of the real time (negative: behind)
        self.refresh_tokens = set()
        self.presented_refresh_tokens = []  # every refresh token a refresh grant sent, in order
        self.issued = []  # every token response, in order
        self.chat_answers = []  # every non-streamed chat answer, in order
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_StandInHandler, self))
        self.httpd.daemon_threads = True
        # A client that hung up (a killed run, a timeout test) is no error of the stand-in's:
        # socketserver would print its traceback into whatever stderr a test is capturing.
        self.httpd.handle_error = lambda request, client_address: None
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificate_file(), certificate_file())
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = "{}://127.0.0.1:{}".format("https" if tls else "http", self.httpd.server_address[1])
        self.issuer = self.url + "/oauth"  # Glean's issuer need not be the backend URL

    def __enter__(self):
        # shutdown() waits for serve_forever to look at its flag, every poll_interval.
        serve = functools.partial(self.httpd.serve_forever, poll_interval=0.01)
        threading.Thread(target=serve, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def metadata(self):
        return dict({
            "issuer": self.issuer,
            "authorization_endpoint": self.url + "/oauth/authorize",
            "token_endpoint": self.url + "/oauth/token",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "jwks_uri": self.url + "/oauth/jwks",
        }, **self.metadata_extra)

    def paths(self, method=None):
        return [r.path for r in self.requests if method in (None, r.method)]

    def find(self, path):
        return [r for r in self.requests if r.path == path]

    # Each handler returns (status, headers, body); body is a dict (sent as JSON) or str.

    def authorize(self, request):
        q = {k: v[0] for k, v in request.query.items()}
        if q.get("client_id") != self.client_id:  # no redirect then (RFC 6749 §4.1.2.1)
            return _oauth_error(400, "invalid_client", "unknown client_id")
        if not _same_loopback_redirect(q.get("redirect_uri", ""), self.registered_redirect):
            return _oauth_error(400, "invalid_redirect_uri", "redirect_uri is not registered on this client")
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256" \
                or not q.get("code_challenge"):
            return 400, {}, "PKCE S256 and response_type=code are required\n"
        answer = {"state": q.get("state", "")}
        if self.callback_iss:
            answer["iss"] = self.issuer if self.callback_iss == "issuer" else self.callback_iss
        unknown = [scope for scope in (q.get("scope") or "").split()
                   if self.known_scopes is not None and scope not in self.known_scopes]
        if self.authorize_error or unknown:
            answer["error"] = self.authorize_error or "invalid_scope"
            if self.error_description or unknown:
                answer["error_description"] = self.error_description or "Unsupported scope: " + " ".join(unknown)
        else:
            code = secrets.token_urlsafe(32)
            with self._lock:
                self.codes[code] = (q["code_challenge"], q["redirect_uri"], self.grant(q.get("scope")))
            answer["code"] = code
        location = q["redirect_uri"] + "?" + urllib.parse.urlencode(answer)
        return 302, {"Location": location}, ""

    def token(self, request):
        form = request.form
        if any(len(values) > 1 for values in form.values()):  # RFC 6749 §3.2
            return _oauth_error(400, "invalid_request", "a parameter was repeated")
        f = {k: v[0] for k, v in form.items()}
        method = self._authenticate(f, request.headers.get("Authorization", ""))
        self.client_auth_seen.append(method)
        if method is None:
            return _oauth_error(401, "invalid_client", "client authentication failed")
        with self._lock:
            if f.get("grant_type") == "authorization_code":
                return self._grant_code(f)
            if f.get("grant_type") == "refresh_token":
                return self._grant_refresh(f)
        return _oauth_error(400, "unsupported_grant_type", "")

    def _authenticate(self, f, authorization):
        """The RFC 6749 §2.3 method the request used and that checked out, else None.
        Using more than one method at once is refused, as §2.3 says."""
        scheme, _, credentials = authorization.partition(" ")
        if scheme == "Basic":
            if "client_secret" in f:
                return None
            pair = base64.b64decode(credentials).decode("utf-8")
            client_id, _, secret = (urllib.parse.unquote_plus(p) for p in pair.partition(":"))
            ok = (client_id, secret) == (self.client_id, self.client_secret)
            return "client_secret_basic" if ok else None
        if "client_secret" in f:
            ok = (f.get("client_id"), f["client_secret"]) == (self.client_id, self.client_secret)
            return "client_secret_post" if ok else None
        return "none" if self.public_client and f.get("client_id") == self.client_id else None

    def _grant_code(self, f):
        bound = self.codes.pop(f.get("code", ""), None)  # a code is good once
        if bound is None:
            return _oauth_error(400, "invalid_grant", "unknown or used authorization code")
        challenge, redirect_uri, scope = bound
        if f.get("redirect_uri") != redirect_uri:
            return _oauth_error(400, "invalid_grant", "redirect_uri differs from the authorization request")
        verifier = f.get("code_verifier", "")
        if b64url(hashlib.sha256(verifier.encode("ascii")).digest()) != challenge:
            return _oauth_error(400, "invalid_grant", "PKCE verification failed")
        return 200, {}, self._issue(scope)

    def _grant_refresh(self, f):
        token = f.get("refresh_token", "")
        self.presented_refresh_tokens.append(token)
        if token not in self.refresh_tokens:
            return _oauth_error(400, "invalid_grant", "unknown refresh token")
        if self.issue_refresh_token:
            self.refresh_tokens.discard(token)  # rotation: the new one replaces it
        return 200, {}, self._issue(self.refresh_scopes.get(token))

    def _issue(self, scope=None):
        now = int(time.time())
        kid, key = stand_in_key(self.signing_alg or "RS256")
        access_token = secrets.token_urlsafe(32) if self.opaque_tokens else make_jwt(
            {"alg": self.signing_alg or "RS256", "kid": kid, "typ": "JWT"},
            {"iss": self.issuer, "sub": "demo.user@example.com", "aud": self.client_id,
             "iat": now, "exp": now + self.lifetime, "jti": secrets.token_hex(8)},
            key if self.signing_alg else None,
        )
        self.access_tokens[access_token] = scope
        response = {"access_token": access_token, "token_type": "Bearer", "expires_in": self.lifetime}
        self.issued.append(response)  # the same object: what is added below is in it too
        if scope:
            response["scope"] = scope
        if self.issue_refresh_token:
            response["refresh_token"] = secrets.token_urlsafe(32)
            self.refresh_tokens.add(response["refresh_token"])
            self.refresh_scopes[response["refresh_token"]] = scope
        return response

    def revoke(self, request):
        """RFC 7009: revoke a token of this client; 200 whether or not it was valid (§2.2)."""
        f = {k: v[0] for k, v in request.form.items()}
        if self._authenticate(f, request.headers.get("Authorization", "")) is None:
            return _oauth_error(401, "invalid_client", "client authentication failed")
        if self.refuse_access_token_revocation and f.get("token") in self.access_tokens:
            return _oauth_error(400, "unsupported_token_type", "JWT access tokens cannot be revoked")
        with self._lock:
            self.refresh_tokens.discard(f.get("token"))
            self.access_tokens.pop(f.get("token"), None)
            self.revoked.append((f.get("token_type_hint"), f.get("token")))
        return 200, {}, ""

    def _bearer(self, request, scope):
        """None when the request's bearer token is one this server issued with `scope` (or with
        no scope said); else the refusal, as Glean's meanings have it: 401 for a token it does
        not know, 403 for one that lacks the scope."""
        kind, _, token = request.headers.get("Authorization", "").partition(" ")
        if kind != "Bearer" or token not in self.access_tokens:
            return 401, {"WWW-Authenticate": "Bearer"}, {"error": "invalid_token"}
        granted = self.access_tokens[token]
        if granted is not None and scope not in granted.lower().split():
            return 403, {}, {"error": "insufficient_scope"}
        return None

    def search(self, request):
        """The Client API's search: one result."""
        return self._bearer(request, "search") or (200, {}, {"results": [{"title": "Glean"}], "hasMoreResults": True})

    def mcp(self, request):
        """The remote MCP server /mcp/default: JSON-RPC, initialize only."""
        if json.loads(request.body.decode("utf-8")).get("method") != "initialize":
            return 400, {}, {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "initialize first"}}
        return self._bearer(request, "mcp") or (200, {}, {"jsonrpc": "2.0", "id": 1, "result": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "glean-stand-in"}}})

    def chat(self, request):
        """Glean's Chat API: a stage (UPDATE) message, then the answer (CONTENT); with
        "stream": true, NDJSON lines: the stages, then the answer a word at a time."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or token not in self.access_tokens:
            return 401, {"WWW-Authenticate": "Bearer"}, {"error": "invalid_token"}
        scope = self.access_tokens[token]
        if scope is not None and "chat" not in scope.lower().split():
            return 401, {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="chat"'}, "Token lacks scope\n"
        body = json.loads(request.body.decode("utf-8"))
        question = body["messages"][-1]["fragments"][0]["text"]
        time.sleep(self.chat_delay)  # a slow answer, as agents give: the server's pace, not a test's wait
        words = [word + " " for word in self.answer.split(" ")]
        words[-1] = words[-1][:-1]
        words = self.answer_deltas or words
        head = [{"author": "USER", "messageType": "CONTENT", "messageId": "m-user", "fragments": [{"text": question}]},
                {"author": "GLEAN_AI", "messageType": "UPDATE", "messageId": "m-search",
                 "fragments": [{"text": "**Searching:** executive team"}]}]
        answer = {"author": "GLEAN_AI", "messageType": "CONTENT", "messageId": "m-answer", "hasMoreFragments": False}
        if not body.get("stream"):
            self.chat_answers.append({"chatId": "chat-1",
                                      "messages": head + [dict(answer, fragments=[{"text": self.answer}])]})
            return 200, {}, self.chat_answers[-1]
        lines = [{"chatId": "chat-1", "messages": head}] + [
            {"chatId": "chat-1", "messages": [dict(answer, hasMoreFragments=i < len(words) - 1,
                                                   fragments=[{"text": word}])]}
            for i, word in enumerate(words)]
        return 200, {}, Streamed(json.dumps(line) + "\n" for line in lines)


class Streamed:
    """A body sent in chunks as it is made (Transfer-Encoding: chunked), a line a chunk."""

    def __init__(self, lines):
        self.lines = lines


def _oauth_error(status, error, description):
    """An RFC 6749 §5.2 error response."""
    return status, {}, {"error": error, "error_description": description}


def _same_loopback_redirect(uri, registered):
    """RFC 8252 §7.3: for a loopback redirect URI, any port matches."""
    a, b = urllib.parse.urlsplit(uri), urllib.parse.urlsplit(registered)
    return (a.scheme, a.hostname, a.path, a.query) == (b.scheme, b.hostname, b.path, b.query)


class _StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as servers do: a small answer goes out whole, at once

    def __init__(self, glean, *args):
        self.glean = glean
        super().__init__(*args)

    def setup(self):
        super().setup()
        with self.glean._lock:
            self.glean.connections += 1
            self.number = self.glean.connections

    def log_message(self, *args):
        pass

    def do_GET(self):
        metadata = lambda r: (200, {}, self.glean.metadata())
        self._serve({"/.well-known/oauth-authorization-server": metadata,
                     "/.well-known/oauth-authorization-server/oauth": metadata,  # RFC 8414 §3.1's form
                     "/oauth/authorize": self.glean.authorize,
                     "/oauth/jwks": lambda r: (200, {}, stand_in_jwks()),
                     "/liveness_check": lambda r: (200, {}, "OK\n")})

    def date_time_string(self, timestamp=None):
        """The Date header, skewed as the test asks: a server whose clock is off."""
        return super().date_time_string((time.time() if timestamp is None else timestamp) + self.glean.date_skew)

    def do_POST(self):
        self._serve({"/oauth/token": self.glean.token, "/rest/api/v1/chat": self.glean.chat,
                     "/oauth/revoke": self.glean.revoke, "/rest/api/v1/search": self.glean.search,
                     "/mcp/default": self.glean.mcp})

    def _serve(self, routes):
        length = int(self.headers.get("Content-Length") or 0)
        request = Recorded(self.command, self.path, dict(self.headers), self.rfile.read(length), self.number)
        self.glean.requests.append(request)
        if request.path in self.glean.close_after:
            self.close_connection = True  # as a server closing an idle connection would: no header
        override = self.glean.overrides.get(request.path)
        if override:
            status, headers, body = override(request) if callable(override) else override
        elif request.path in routes:
            status, headers, body = routes[request.path](request)
        else:
            status, headers, body = 404, {}, "not found\n"
        self._send(status, headers, body, request.path)

    def _send(self, status, headers, body, path=None):
        try:
            for interim in self.glean.interim.get(path, []):
                self.wfile.write("HTTP/1.1 {} Interim\r\nLink: </a.css>; rel=preload\r\n\r\n".format(interim).encode())
            self._write(status, headers, body)
        except OSError:
            self.close_connection = True  # the client hung up first (a timeout test, say)

    def _write(self, status, headers, body):
        if isinstance(body, Streamed) and self.glean.stream_framing == "length":
            body = "".join(body.lines).encode("utf-8")
            headers = dict(headers, **{"Content-Type": "application/x-ndjson"})
        if isinstance(body, Streamed):
            self.send_response(status)
            self.send_header("Content-Type", "application/x-ndjson")  # Glean's own SDK asks for text/plain
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for index, line in enumerate(body.lines):
                    if self.glean.stream_pace:
                        self.glean.stream_pace(index)
                    data = line.encode("utf-8")
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                self.close_connection = True  # the client hung up mid-stream
            return
        if isinstance(body, (dict, list)):
            data, content_type = json.dumps(body).encode("utf-8"), "application/json"
        else:
            data = body if isinstance(body, bytes) else body.encode("utf-8")
            content_type = "text/plain; charset=utf-8"
        headers = dict(headers)
        content_type = headers.pop("Content-Type", content_type)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


# --- The browser, and the script as a person runs it ------------------------------------


def http_get(url, timeout=10):
    """GET `url` without following redirects; return (status, headers, body text)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":  # the stand-in's own certificate, trusted as a browser told to would
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=ssl.create_default_context(cafile=certificate_file()))
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""))
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode("utf-8")
    finally:
        conn.close()


def play_browser(authorize_url):
    """What the browser and the user do: sign in (the stand-in agrees at once), then follow
    the redirect to the listener. Returns the listener's (status, headers, body)."""
    status, headers, body = http_get(authorize_url)
    assert status == 302, "the authorization endpoint said {}: {}".format(status, body)
    return http_get(headers["Location"])


class ScriptRun:
    """glean_oauth.py running in its own process, its output read as it comes."""

    def __init__(self, env, args=(), python=sys.executable, echo=(None, None), command=None, stdin=subprocess.PIPE):
        self.proc = subprocess.Popen(
            (command or script_command(python)) + without_a_browser(args), env=env, stdin=stdin,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.stdout_lines, self.stderr_lines = [], []
        self._lines = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout_lines, echo[0], self._lines)),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr_lines, echo[1], self._lines)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    @staticmethod
    def _read(stream, lines, echo, notify):
        """Collect `stream`'s lines; echo its bytes as they come (a streamed answer has no line ends)."""
        decoder, pending = codecs.getincrementaldecoder("utf-8")("replace"), b""
        for chunk in iter(lambda: stream.read1(65536), b""):
            if echo:
                echo.write(decoder.decode(chunk))
                echo.flush()
            complete = (pending + chunk).split(b"\n")
            pending = complete.pop()
            for raw in complete:
                lines.append(raw.rstrip(b"\r").decode("utf-8", "replace"))  # CRLF on Windows
                if notify:
                    notify.put(lines[-1])
        if pending:
            lines.append(pending.decode("utf-8", "replace"))
            if notify:
                notify.put(lines[-1])
        if notify:
            notify.put(None)

    def wait_for_line(self, predicate, timeout=RUN_TIMEOUT):
        """Return the first line from now on, on stdout or stderr, that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        ended = 0
        while True:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                ended += 1
                if ended == len(self._readers):
                    raise AssertionError("the script ended first:\n" + self.output())
                continue
            if predicate(line):
                return line

    def authorize_url(self):
        self.wait_for_line(lambda line: line == "Open this URL in your browser:")
        return self.wait_for_line(lambda line: line.startswith("http"))

    def finish(self, timeout=RUN_TIMEOUT):
        """Wait for the exit; return the exit code."""
        if self.proc.stdin:
            self.proc.stdin.close()
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    @property
    def stdout(self):
        return "\n".join(self.stdout_lines) + "\n"

    @property
    def stderr(self):
        return "\n".join(self.stderr_lines) + "\n"

    def output(self):
        return self.stdout + self.stderr


def good_environ(backend, **overrides):
    """The settings of a run against `backend`, a StandInGlean (its client) or a URL (the
    test client), with an ephemeral port; an override of None removes the variable."""
    glean = None if isinstance(backend, str) else backend
    env = {"CLIENT_ID": glean.client_id if glean else CLIENT_ID,
           "CLIENT_SECRET": glean.client_secret if glean else CLIENT_SECRET,
           "GLEAN_BACKEND_URL": glean.url if glean else backend,
           "REDIRECT_URI": EPHEMERAL_REDIRECT_URI,
           # A run that waits for a browser that never comes fails within the test's bound.
           "GLEAN_CALLBACK_TIMEOUT": str(RUN_TIMEOUT - 5)}
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def script_env(backend, **overrides):
    """good_environ plus PATH: the whole, clean environment of a script run."""
    # UTF-8 output whatever the locale: Python 3.6 in a C locale would write ASCII escapes.
    # PYTHONPATH: where `python -m glean_oauth` finds the script (script_command).
    # SystemRoot: Windows' sockets need it in every process (Wine adds it silently).
    system = {name: os.environ[name] for name in ("SystemRoot",) if name in os.environ}
    return good_environ(backend, **dict(system, **dict({"PATH": os.environ.get("PATH", ""), "PYTHONIOENCODING": "utf-8",
                                                        "PYTHONPATH": HERE}, **overrides)))


def without_a_browser(args):
    """`args`, with --no-browser added on Windows for the commands that sign in: there,
    unlike on a test machine with no display, a flow would open a real browser tab."""
    args = list(args)
    signs_in = not args or args[0].startswith("-") or args[0] == "login"
    if os.name == "nt" and signs_in and "--no-browser" not in args and "--help" not in args:
        args.append("--no-browser")
    return args


def script_command(python=sys.executable):
    """How the tests start the script: `python -S -m glean_oauth`. As a module, it runs
    from its compiled bytecode instead of compiling 3,000 lines at every start; without
    site (-S), whose .pth files cost more here than the script's whole start. The script
    needs neither. The tests about how it is started (its shebang, Python 2, its import
    time, the benchmark) run it as a user types it: python3 glean_oauth.py."""
    return [python, "-S", "-m", "glean_oauth"]


class Flow:
    """The result of one whole run: exit code, output, and what the browser saw."""

    def __init__(self, run, code, browser):
        self.run, self.code, self.browser = run, code, browser
        self.stdout, self.stderr = run.stdout, run.stderr


def run_flow(glean, args=(), python=sys.executable, echo=(None, None), process=False, **env):
    """Run the script end to end against `glean`, playing the browser; return a Flow.
    With this interpreter, and unless `process` or `echo` asks for a process of its own,
    the run is in this process (InProcessRun), which saves a start of Python."""
    if python == sys.executable and not process and echo == (None, None):
        run = InProcessRun(script_env(glean, **env), without_a_browser(args))
    else:
        run = ScriptRun(script_env(glean, **env), args, python=python, echo=echo)
    try:
        browser = play_browser(run.authorize_url())
        flow = Flow(run, run.finish(), browser)
        flow.stdout, flow.stderr = as_documented(flow.stdout), as_documented(flow.stderr)
        assert_secret_absent(flow.stdout, flow.stderr)
        return flow
    finally:
        if run.proc.poll() is None:
            run.proc.kill()


def run_script(env, args=(), stdin=b"", python=sys.executable):
    """Run the script with no browser step, `env` its whole environment; return a
    CompletedProcess (bytes). With this interpreter the run is in this process, as a
    process would run it (run_in_process), which saves a start of Python; `exec`, which
    replaces the process it runs in, and other interpreters get a process of their own."""
    args = without_a_browser(args)
    if python == sys.executable and args[:1] != ["exec"]:
        proc = run_in_process(env, args, stdin)
    else:
        proc = subprocess.run(script_command(python) + args, env=env, input=stdin,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        proc.stdout, proc.stderr = (out.replace(b"\r\n", b"\n") for out in (proc.stdout, proc.stderr))
    assert_secret_absent(proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))
    proc.stdout, proc.stderr = (as_documented(out.decode("utf-8", "surrogateescape")).encode(
        "utf-8", "surrogateescape") for out in (proc.stdout, proc.stderr))
    return proc


def run_in_process(env, args, stdin=b"", out=None, err=None):
    """glean_oauth.cli(args) with `env` as the process's whole environment for the time of
    the run (HTTPS_PROXY and SSL_CERT_FILE are read from os.environ, as in a process), and
    sys.stdout and sys.stderr captured (argparse writes --help there)."""
    saved = dict(os.environ)
    out, err = out or io.StringIO(), err or io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    glean_oauth._tls_context.cache_clear()
    glean_oauth._pool = None  # a process of its own starts with no kept connection
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = glean_oauth.cli(args, environ=env, out=out, err=err,
                                   stdin=io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        glean_oauth._tls_context.cache_clear()
        glean_oauth._pool = None
    if not isinstance(out, io.StringIO):
        return code
    return subprocess.CompletedProcess(args, code, out.getvalue().encode("utf-8"), err.getvalue().encode("utf-8"))


class InProcessRun(ScriptRun):
    """A ScriptRun whose script runs in a thread of this process (run_in_process), its
    output read line by line as it is written; for the runs whose process adds nothing."""

    def __init__(self, env, args=()):
        self.stdout_lines, self.stderr_lines = [], []
        self._lines = queue.Queue()
        self._readers = [None, None]  # two streams, each ends with a None on the queue
        self.code = None
        out, err = _Lines(self.stdout_lines, self._lines), _Lines(self.stderr_lines, self._lines)

        def run():
            try:
                self.code = run_in_process(env, list(args), out=out, err=err)
            finally:
                out.end()
                err.end()

        self.thread = threading.Thread(target=run, daemon=True)
        self.proc = self  # what run_flow asks of a process: poll() and kill()
        self.thread.start()

    def finish(self, timeout=RUN_TIMEOUT):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not end:\n" + self.output()
        return self.code

    def poll(self):
        return None if self.thread.is_alive() else self.code

    def kill(self):
        pass  # a thread cannot be killed: the run ends at its own timeout


class _Lines:
    """A text stream that collects what is written as lines, each also put on `notify`."""

    encoding = "utf-8"

    def __init__(self, lines, notify):
        self.lines, self.notify, self.pending = lines, notify, ""

    def write(self, text):
        complete = (self.pending + text).split("\n")
        self.pending = complete.pop()
        for line in complete:
            self.lines.append(line)
            self.notify.put(line)
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False

    def end(self):
        if self.pending:
            self.lines.append(self.pending)
            self.notify.put(self.pending)
        self.notify.put(None)


def demo():
    """`make demo`: the real script, end to end, against the stand-in; the browser step is
    played automatically. Then once more with --stream, the answer coming a word at a time.
    Returns the script's exit code."""
    with StandInGlean() as glean:
        sys.stderr.write("demo: a stand-in Glean server is listening at {}\n".format(glean.url))
        sys.stderr.write("demo: running glean_oauth.py; the browser step is played for you\n\n")
        flow = run_flow(glean, echo=(sys.stdout, sys.stderr))  # echo: the real script, in a process
        sys.stderr.write("\ndemo: the browser was shown: {}".format(flow.browser[2]))
        sys.stderr.write("demo: glean_oauth.py exited with {}\n".format(flow.code))
        sys.stderr.write("\ndemo: again with --stream --no-browser: stages and the answer on stderr as they come\n\n")
        glean.stream_pace = lambda index: time.sleep(0.08)  # a word at a time, as Glean writes
        streamed = run_flow(glean, ["--stream", "--no-browser"], echo=(None, sys.stderr))
        sys.stderr.write("demo: glean_oauth.py --stream exited with {}\n".format(streamed.code))
        return flow.code or streamed.code


# --- Helpers the sections share ---------------------------------------------------------


def run_cli(environ, argv=(), stdin=""):
    """Call glean_oauth.cli in this process; return (exit code, stdout, stderr), the hints
    in them as_documented."""
    out, err = io.StringIO(), io.StringIO()
    code = glean_oauth.cli(list(argv), environ=environ, out=out, err=err, stdin=io.StringIO(stdin))
    assert_secret_absent(out.getvalue(), err.getvalue())
    return code, as_documented(out.getvalue()), as_documented(err.getvalue())


def as_documented(text):
    """`text` with the program its hints name (as it was run: an interpreter's path, the
    script's, -m) written as the README writes it, python3 glean_oauth.py. What a hint
    really says is tested on its own (test_every_hint_runs_when_pasted_into_a_shell_elsewhere)."""
    return re.sub(r'(?:python3|"[^"]*"|\S*python[^\s]*) (?:-m glean_oauth|"[^"]*glean_oauth\.py"|\S*glean_oauth\.py)',
                  "python3 glean_oauth.py", text)


def assert_secret_absent(*texts):
    for text in texts:
        assert CLIENT_SECRET not in text


# A self-signed certificate for 127.0.0.1 and glean.test, made for these tests only
# (openssl req -x509 -newkey ec -days 36500 ...); its key protects nothing.
TEST_CERTIFICATE = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgS+RgJQma9YILaSUq
3Euj5RNZDM3AGP+fSSc2Jx/81iqhRANCAAQNGMwpldcriEInnkOFEMnsl79HJJJT
ndqM6wdL5MxDaDyMBMkAQSYdJgdxQzwtqwr+6NxZES+BO+5A/4ejBIxV
-----END PRIVATE KEY-----
-----BEGIN CERTIFICATE-----
MIIBuzCCAWGgAwIBAgIUchqYEx0bUFTvK3e04bA9MuTbJb8wCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZ2xlYW4tb2F1dGgtdGVzdDAgFw0yNjExMjgxNjA5MDhaGA8y
MTI2MTEwNDE2MDkwOFowGzEZMBcGA1UEAwwQZ2xlYW4tb2F1dGgtdGVzdDBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABA0YzCmV1yuIQieeQ4UQyeyXv0ckklOd2ozr
B0vkzENoPIwEyQBBJh0mB3FDPC2rCv7o3FkRL4E77kD/h6MEjFWjgYAwfjAdBgNV
HQ4EFgQUZEXmvH6TLFUZtiPyKpyQWLCHyJQwHwYDVR0jBBgwFoAUZEXmvH6TLFUZ
tiPyKpyQWLCHyJQwGwYDVR0RBBQwEoIKZ2xlYW4udGVzdIcEfwAAATAPBgNVHRMB
Af8EBTADAQH/MA4GA1UdDwEB/wQEAwIChDAKBggqhkjOPQQDAgNIADBFAiEA9Qsj
5Y1CCjb/lPRwOSKPXfkQuRaHXbLnUw0Q97u6hYQCIFwpS3ndWk9mHzmof2TV/O46
jHdhJGQg60I3EElnQLgU
-----END CERTIFICATE-----
"""


@functools.lru_cache(maxsize=None)
def certificate_file():
    """A file holding TEST_CERTIFICATE (key and certificate), made once per process."""
    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as f:
        f.write(TEST_CERTIFICATE)
    atexit.register(os.remove, f.name)
    return f.name


class RawServer:
    """A TCP server on 127.0.0.1 whose `handle(conn)` runs in a thread per connection,
    for peers that HTTP servers do not play: silent ones, endless ones, proxies."""

    def __init__(self, handle):
        self.handle = handle
        self.accepted = threading.Event()
        self.connections = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:{}".format(self.port)

    def __enter__(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (POSIX)
        except OSError:
            pass  # Windows: a listening socket is not connected (WSAENOTCONN); close() wakes it
        self.sock.close()
        for conn in self.connections:
            conn.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.accepted.set()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()


def silent(conn):
    """Accept, and never answer."""


def read_head(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


PYTHONS = ["3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]


NO_PYENV = "pyenv's interpreters are POSIX's: on Windows the suite runs under its own Python only"


def find_python(version):
    """The pyenv CPython `version` (x.y) on this machine, or None (and always on Windows,
    where pyenv's are not)."""
    if os.name == "nt":
        return None
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(os.path.join(root, "versions", version + ".*", "bin", "python")))
    return found[-1] if found else None


def posix_only(reason):
    """Skip a test that is POSIX's by nature on Windows, saying why."""
    return skip_if(os.name != "posix", reason)


SIGNALS = "sending Ctrl-C (SIGINT) to another process is POSIX's"
SHELL = "it runs /bin/sh with its redirections"
FAKE_BROWSER = "its fake browser is a /bin/sh script"
MODES = "file modes mean nothing on Windows: the user profile's ACLs protect the file there"
SYMLINKS = "Wine makes no symlinks, and Windows needs a privilege to"


# A file or folder of "another user" is made with chown, which only root may do.
as_root = skip_if(os.name != "posix" or os.geteuid() != 0, "giving a file to another user takes root, on POSIX")


def login(glean, path, args=(), python=sys.executable, **env):
    """`login` against `glean`, the browser played; returns the Flow."""
    return run_flow(glean, ["login", "--token-file", str(path)] + list(args), python=python, **env)


def expire(path, seconds_left=0):
    """Make the stored access token expire `seconds_left` s from now, as time passing would."""
    saved = json.loads(path.read_text())
    saved["expires_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds_left))
    path.write_text(json.dumps(saved))
    return saved


def signed_in_and_expired(glean, path):
    """A store from a real login whose access token has just expired; no request recorded yet."""
    assert login(glean, path).code == 0
    expire(path)
    glean.requests.clear()


def stored(glean, path, scope=None, **fields):
    """A store as `login` writes it for `glean`'s client, made in this process (no browser)."""
    settings = {"backend_url": glean.url, "client_id": glean.client_id, "auth_method": "client_secret_post",
                "issuer": glean.issuer, "token_endpoint": glean.url + "/oauth/token",
                "revocation_endpoint": glean.metadata().get("revocation_endpoint"), "requested_scope": scope}
    with glean._lock:
        tokens = glean._issue(scope)
    contents = dict(glean_oauth.store_contents(tokens, time.time(), settings), **fields)
    glean_oauth.TokenStore(str(path)).write({k: v for k, v in contents.items() if v is not None})
    return contents


def held(glean, path):
    """Make the token endpoint hold each grant until released; returns (entered, release)."""
    entered, release = threading.Event(), threading.Event()

    def hold(request):
        entered.set()
        release.wait(RUN_TIMEOUT)
        return glean.token(request)
    glean.overrides["/oauth/token"] = hold
    return entered, release


def start(glean, args, **env):
    return subprocess.Popen(script_command() + args, env=script_env(glean, **env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def saved_refresh_token(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)["refresh_token"]


def refreshable_token_file(glean, path):
    """A token file from a real run against `glean`, mode 0600."""
    flow = run_flow(glean, ["--no-chat", "--token-file", str(path)])
    assert flow.code == 0, flow.run.output()
    glean.requests.clear()


def a_secret_file(tmp_path):
    """A file holding CLIENT_SECRET on its first line, yours alone (0600)."""
    path = tmp_path / "secret"
    path.write_text(CLIENT_SECRET + "\n")
    path.chmod(0o600)
    return path


def fake_program(tmp_path, name, script="printf '%s' \"$*\" > \"$0.args\""):
    """An executable `name` in tmp_path running the shell `script`; by default it writes its
    arguments to `name`.args."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


def shell(command, env, timeout=RUN_TIMEOUT):
    """Run a /bin/sh command line (for redirections of the script's own streams)."""
    return subprocess.run(["/bin/sh", "-c", command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)


# --- The flow: main(), the documented steps end to end ------------------------------------


def test_the_map_main_the_step_headers_and_the_readme_name_the_same_functions_in_step_order():
    import ast

    mapped = re.findall(r"^ +(\d+)\. .*?(\w+)\(\)(?:, which calls (\w+)\(\))?$", glean_oauth.__doc__, re.M)
    assert [int(step) for step, _, _ in mapped] == list(range(1, 11))
    source = open(SCRIPT, encoding="utf-8").read()
    lines = source.splitlines()
    markers = [number for number, line in enumerate(lines, 1)
               if re.match(r"\s*#.*beyond the documented flow", line, re.I)]
    assert len(markers) == 1, markers
    starts = [getattr(glean_oauth, name).__code__.co_firstlineno for _, name, _ in mapped]
    assert starts == sorted(starts) and starts[-1] < markers[0]  # each one defined, in step order, in the core
    # Each under its own "# --- Step N" header.
    headers = {int(m.group(1)): lines.index(m.group(0)) + 1 for m in re.finditer(r"^# --- Step (\d+):.*$", source, re.M)}
    for (step, name, _), start in zip(mapped, starts):
        assert headers[int(step)] < start < min([at for at in headers.values() if at > headers[int(step)]]
                                                + [markers[0]]), (step, name)
    # main() calls each (steps 3 to 7 through sign_in), and each calls the counterpart the map names.
    calls = {node.name: {call.func.id for call in ast.walk(node) if isinstance(call, ast.Call)
                         and isinstance(call.func, ast.Name)}
             for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.lineno < markers[0]}
    reached, todo = set(), ["main"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(calls.get(name, ()))
    for step, name, counterpart in mapped:
        assert name in reached, (step, name)
        assert not counterpart or counterpart in calls[name], (step, name, counterpart)
        assert {name, counterpart or name} <= set(glean_oauth.__all__), (step, name)  # the public names
    assert all(hasattr(glean_oauth, name) for name in glean_oauth.__all__)
    # The names from below the line that the core uses are the ones the map lists, and no more than 12.
    below = set()
    for node in ast.parse(source).body:
        if node.lineno > markers[0]:
            below |= {node.name} if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else {
                target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)}
    used = {name.id for node in ast.parse(source).body if node.lineno < markers[0]
            and not isinstance(node, ast.Expr) for name in ast.walk(node) if isinstance(name, ast.Name)} & below
    listed = {name for line in re.findall(r"^    ([\w, ]+) \.+ ", glean_oauth.__doc__, re.M) for name in line.split(", ")}
    assert used == listed and len(listed) <= 12, (used ^ listed)
    # README's step table names the same function first in each row.
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    table = re.findall(r"^\| (\d+)\. [^|]* \| .* \| `(\w+)`", readme, re.M)
    assert [(int(step), name) for step, name in table] == [(int(step), name) for step, name, _ in mapped]


def test_every_function_the_readme_names_is_defined():
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    named = set(re.findall(r"`(\w+)\(", readme)) | set(  # `name()`, and the step table's names
        name for row in re.findall(r"^\| \d+\..*\| (`.*`) \|$", readme, re.M) for name in re.findall(r"`(\w+)`", row))
    methods = re.findall(r"`provider\.(\w+)\(", readme)  # TokenProvider's, as the README calls them
    assert named and methods and not [name for name in named if not hasattr(glean_oauth, name)] + [
        name for name in methods if not hasattr(glean_oauth.TokenProvider, name)]


def test_functions_are_short_and_main_comes_early():
    lines = open(SCRIPT, encoding="utf-8").read().splitlines()
    markers = [number for number, line in enumerate(lines, 1)
               if re.match(r"\s*#.*beyond the documented flow", line, re.I)]
    assert glean_oauth.main.__code__.co_firstlineno <= 250 and markers[0] <= 800
    import ast

    longest = max((node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(ast.parse("\n".join(lines)))
                  if isinstance(node, ast.FunctionDef)) if sys.version_info >= (3, 8) else (0, "")
    assert longest[0] <= 60, longest  # each function short enough to read at once


def test_the_whole_flow_prints_every_section_and_sends_what_the_doc_sends():
    with StandInGlean() as glean:
        flow = run_flow(glean)
    assert flow.code == 0, flow.run.output()
    assert flow.browser[:1] == (200,)
    # The sections, in the example's order.
    titles = ["issuer=" + glean.issuer, "code challenge methods:", "token endpoint auth methods:",
              "Listening for callback at ", "Open this URL in your browser:",
              "Captured auth code prefix: ", "Token response:", "Chat response:", "JWT header:",
              "JWT claims:", "This does not verify the signature.", "Refresh response:"]
    positions = [flow.stdout.find("\n" + title) if i else flow.stdout.find(title)
                 for i, title in enumerate(titles)]
    assert -1 not in positions and positions == sorted(positions), flow.stdout
    assert flow.stdout == expected_stdout(glean)
    assert flow.stderr == "\n" + ANSWER_LINE
    assert_secret_absent(flow.stdout, flow.stderr)

    # What the server received, parameter for parameter.
    assert glean.paths() == ["/.well-known/oauth-authorization-server", "/oauth/authorize",
                             "/oauth/token", "/rest/api/v1/chat", "/oauth/token"]
    authorize, exchange, chat, refresh = glean.requests[1:]
    redirect_uri = authorize.query["redirect_uri"][0]
    assert sorted(authorize.query) == ["client_id", "code_challenge", "code_challenge_method",
                                       "redirect_uri", "response_type", "state"]
    assert [k for k in exchange.form] == ["grant_type", "code", "redirect_uri", "client_id",
                                         "client_secret", "code_verifier"]
    assert exchange.form["grant_type"] == ["authorization_code"]
    assert exchange.form["redirect_uri"] == [redirect_uri]
    assert exchange.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert chat.body == b'{"messages":[{"fragments":[{"text":"Who is on the executive team?"}]}]}'
    assert chat.headers["Content-Type"] == "application/json"
    token_response = json.loads(section(flow.stdout, "Token response"))
    assert chat.headers["Authorization"] == "Bearer " + token_response["access_token"]
    assert [k for k in refresh.form] == ["grant_type", "refresh_token", "client_id", "client_secret"]
    assert refresh.form["refresh_token"] == [token_response["refresh_token"]]
    # Only a prefix of the code is ever printed.
    code = exchange.form["code"][0]
    assert "Captured auth code prefix: {}\n".format(code[:16]) in flow.stdout
    assert code not in flow.stdout
    assert json.loads(section(flow.stdout, "JWT claims"))["iss"] == glean.issuer


ANSWER_LINE = "Answer: The executive team is listed on the People page.\n"


def expected_stdout(glean, run=0, chat_answer=None):
    """The stdout of the default run number `run` against `glean`, byte for byte, as the
    example prints it, made only from what the stand-in received and sent in that run:
    the metadata, the authorization request the browser made, the code, the token, chat
    and refresh answers (`chat_answer` for a streamed one), and the access token's own
    header and claims."""
    metadata = glean.metadata()
    authorize = glean.find("/oauth/authorize")[run]
    code = glean.find("/oauth/token")[2 * run].form["code"][0]
    token_response, refresh_response = glean.issued[2 * run:2 * run + 2]
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
                      for part in token_response["access_token"].split(".")[:2])

    def block(title, value):
        return "\n{}:\n{}\n".format(title, json.dumps(value, indent=2))
    return (
        "issuer={issuer}\nauthorization_endpoint={authorization_endpoint}\ntoken_endpoint={token_endpoint}\n"
        "\ncode challenge methods:\nS256\n"
        "\ntoken endpoint auth methods:\nclient_secret_post\nclient_secret_basic\n".format(**metadata)
        + "\nListening for callback at {}\n".format(authorize.query["redirect_uri"][0])
        + "\nOpen this URL in your browser:\n\n{}{}\n".format(glean.url, authorize.target)
        + "\nCaptured auth code prefix: {}\n".format(code[:16])
        + block("Token response", token_response)
        + block("Chat response", chat_answer or glean.chat_answers[run])
        + block("JWT header", header) + block("JWT claims", claims)
        + "\nThis does not verify the signature.\n"
        + block("Refresh response", refresh_response)
    )


def section(stdout, title):
    """The JSON printed after `title:` (up to the next blank line)."""
    return stdout.split("\n" + title + ":\n", 1)[1].split("\n\n", 1)[0]


def test_a_trailing_slash_on_the_backend_url_makes_no_double_slash():
    with StandInGlean() as glean:
        flow = run_flow(glean, GLEAN_BACKEND_URL=glean.url + "/")
    assert flow.code == 0, flow.run.output()
    assert all("//" not in path for path in glean.paths())


def test_without_a_refresh_token_the_run_says_so_and_succeeds():
    with StandInGlean() as glean:
        glean.issue_refresh_token = False
        flow = run_flow(glean)
    assert flow.code == 0, flow.run.output()
    assert flow.stdout.endswith("\nNo refresh token was returned\n")
    assert glean.paths("POST") == ["/oauth/token", "/rest/api/v1/chat"]


def test_a_failed_request_prints_the_example_message_and_exits_1():
    with StandInGlean() as glean:
        glean.overrides["/.well-known/oauth-authorization-server"] = (500, {}, "backend down")
        proc = run_script(script_env(glean))
    assert proc.returncode == 1
    assert proc.stderr.decode() == "Request to {}/.well-known/oauth-authorization-server failed (500): " \
                                   "backend down\n".format(glean.url)
    assert proc.stdout == b""


def test_an_authorization_error_ends_the_run_with_the_error():
    with StandInGlean() as glean:
        glean.authorize_error = "access_denied"
        flow = run_flow(glean)
    assert flow.code == 1
    assert flow.browser[0] == 400
    assert flow.stderr == "OAuth error: access_denied\n"
    assert glean.paths("POST") == []


_on_every_python = {}  # scenario name -> {version: ("done", its result) or ("failed", the exception)}


def on_every_python(scenario, version):
    """`scenario(python, folder)`'s result for CPython `version`. The first test that asks
    runs the scenario under every interpreter at once (each run is a process of its own,
    so side by side they take the time of the slowest); the others find their result."""
    if find_python(version) is None:
        pytest.skip(NO_PYENV if os.name == "nt" else "no CPython {} under pyenv on this machine".format(version))
    if scenario.__name__ not in _on_every_python:
        outcomes = _on_every_python[scenario.__name__] = {}

        def run(version, python):
            try:
                with tempfile.TemporaryDirectory() as folder:
                    outcomes[version] = ("done", scenario(python, folder))
            except BaseException as error:  # re-raised in the test of that version
                outcomes[version] = ("failed", error)

        threads = [threading.Thread(target=run, args=(v, find_python(v))) for v in PYTHONS if find_python(v)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    state, result = _on_every_python[scenario.__name__][version]
    if state == "failed":
        raise result
    return result


def whole_flow_scenario(python, folder):
    path = os.path.join(folder, "tokens.json")
    with StandInGlean() as glean:
        flow = run_flow(glean, python=python)
        keep = run_flow(glean, ["--json", "--auth-method", "client_secret_basic", "--token-file", path],
                        python=python)
        later = run_script(script_env(glean), ["--refresh", "--token-file", path], python=python)
        saved = json.loads(open(path).read()) if os.path.exists(path) else {}
    return glean, flow, keep, later, saved


@parametrize("version", PYTHONS)
def test_the_whole_flow_runs_on_every_python(version):
    glean, flow, keep, later, saved = on_every_python(whole_flow_scenario, version)
    assert flow.code == 0, flow.run.output()
    assert flow.stdout == expected_stdout(glean)
    assert keep.code == 0, keep.run.output()
    assert json.loads(keep.stdout)["refresh_response"]["access_token"] in glean.access_tokens
    assert later.returncode == 0, later.stderr
    assert saved["refresh_token"] in glean.refresh_tokens


# --- Step 1: configuration ----------------------------------------------------------------


def test_load_config_reads_the_environment_and_strips_trailing_slashes():
    config = glean_oauth.load_config([], {
        "CLIENT_ID": "id", "CLIENT_SECRET": "secret",
        "GLEAN_BACKEND_URL": "https://acme-be.glean.com//",
    })
    assert config.backend_url == "https://acme-be.glean.com"
    assert config.redirect_uri == "http://127.0.0.1:9090/oauth/callback"
    assert (config.client_id, config.client_secret) == ("id", "secret")


@parametrize("environ, message", [
    ({}, "Set CLIENT_ID, CLIENT_SECRET, GLEAN_BACKEND_URL before you run this script"),
    ({"CLIENT_ID": "YOUR_STATIC_CLIENT_ID", "CLIENT_SECRET": "x", "GLEAN_BACKEND_URL": "https://a"},
     "CLIENT_ID is still the doc's placeholder YOUR_STATIC_CLIENT_ID: set it to your static OAuth client's id"),
    ({"CLIENT_ID": "a", "CLIENT_SECRET": "YOUR_STATIC_CLIENT_SECRET", "GLEAN_BACKEND_URL": "https://a"},
     "CLIENT_SECRET is still the doc's placeholder: set it to its secret (or unset it, "
     "to be asked)"),
    ({"CLIENT_ID": "a", "CLIENT_SECRET": "x", "GLEAN_BACKEND_URL": "https://your-instance-be.glean.com/"},
     "GLEAN_BACKEND_URL is still the doc's placeholder https://your-instance-be.glean.com: set it to your backend, "
     "e.g. https://acme-be.glean.com"),
    ({"CLIENT_ID": "  ", "CLIENT_SECRET": "x", "GLEAN_SERVER_URL": "https://a"}, "Set CLIENT_ID before you run this script"),
    ({"CLIENT_ID": "a", "CLIENT_SECRET": "x", "GLEAN_SERVER_URL": "..."},
     "GLEAN_SERVER_URL is still the placeholder ...: set it to your backend, e.g. https://acme-be.glean.com"),
    # The README's own block, copied as it is: one line that names each value to change.
    ({"CLIENT_ID": "...", "CLIENT_SECRET": "...", "GLEAN_BACKEND_URL": "https://your-instance-be.glean.com"},
     "CLIENT_ID is still the placeholder ...: set it to your static OAuth client's id; CLIENT_SECRET is still the "
     "placeholder ...: set it to its secret (or unset it, to be asked); GLEAN_BACKEND_URL is still the doc's "
     "placeholder https://your-instance-be.glean.com: set it to your backend, e.g. https://acme-be.glean.com"),
])
def test_missing_or_placeholder_configuration_names_what_to_set(environ, message):
    with StandInGlean() as glean:
        code, out, err = run_cli(environ)
    assert (code, out, err) == (2, "", message + " (see --help).\n")
    assert glean.requests == []


def test_missing_configuration_exits_2_before_any_network_traffic():
    with StandInGlean() as glean:
        code, out, err = run_cli({"CLIENT_ID": "a", "GLEAN_BACKEND_URL": glean.url})
    assert code == 2
    assert err == "Set CLIENT_SECRET before you run this script (see --help).\n"
    assert out == ""
    assert glean.requests == []


def test_glean_server_url_names_the_backend_when_glean_backend_url_is_unset():
    environ = good_environ("https://acme-be.glean.com", GLEAN_BACKEND_URL=None, GLEAN_SERVER_URL="https://vanity.example/")
    assert glean_oauth.load_config([], environ).backend_url == "https://vanity.example"
    same = dict(environ, GLEAN_BACKEND_URL="https://vanity.example")
    assert glean_oauth.load_config([], same).backend_url == "https://vanity.example"
    flag = glean_oauth.load_config(["--backend-url", "https://flag.example"], dict(same, GLEAN_SERVER_URL="https://x.y"))
    assert flag.backend_url == "https://flag.example"  # the flag wins over both, even when they differ
    code, out, err = run_cli(dict(environ, GLEAN_BACKEND_URL="https://acme-be.glean.com"))
    assert (code, out) == (2, "")
    assert err == "GLEAN_BACKEND_URL (https://acme-be.glean.com) and GLEAN_SERVER_URL (https://vanity.example) name " \
                  "different backends: unset one, or give --backend-url.\n"


def test_flags_override_the_environment():
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--backend-url", glean.url, "--client-id", glean.client_id,
                                "--redirect-uri", EPHEMERAL_REDIRECT_URI],
                        GLEAN_BACKEND_URL="https://wrong-be.glean.com", CLIENT_ID="wrong",
                        REDIRECT_URI="http://127.0.0.1:1/wrong")
    assert flow.code == 0, flow.run.output()
    assert glean.requests[1].query["client_id"] == [glean.client_id]


def test_the_secret_is_asked_for_on_a_terminal_when_unset():
    asked = []

    def ask(prompt):
        asked.append(prompt)
        return " typed-secret "
    config = glean_oauth.load_config(["--client-id", "me"], {"GLEAN_BACKEND_URL": "https://a"}, ask)
    assert (config.client_secret, asked) == ("typed-secret", ["Client secret for me: "])
    config = glean_oauth.load_config([], good_environ("https://a"), ask)
    assert config.client_secret == CLIENT_SECRET and len(asked) == 1  # set: not asked
    glean_oauth.load_config(["--client-id", "me", "--auth-method", "none"], {"GLEAN_BACKEND_URL": "https://a"}, ask)
    assert len(asked) == 1  # a public client has no secret to ask for


def test_the_secret_is_asked_for_only_once_all_else_is_right():
    def ask(prompt):
        raise AssertionError("asked")
    for argv, environ, message in [
        ([], {}, "Set CLIENT_ID, CLIENT_SECRET, GLEAN_BACKEND_URL before"),
        ([], {"CLIENT_ID": "a", "GLEAN_BACKEND_URL": "http://acme"}, "GLEAN_BACKEND_URL must be an https:// URL"),
        (["--redirect-uri", "http://example.com/cb"], {"CLIENT_ID": "a", "GLEAN_BACKEND_URL": "https://a"},
         "REDIRECT_URI http://example.com/cb is refused"),
    ]:
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.load_config(argv, environ, ask)
        assert str(caught.value).startswith(message)
    with pytest.raises(glean_oauth.FlowError, match="^Set CLIENT_SECRET before"):
        glean_oauth.load_config([], {"CLIENT_ID": "a", "GLEAN_BACKEND_URL": "https://a"}, lambda prompt: " ")


def test_without_a_terminal_an_unset_secret_is_a_usage_error():
    code, out, err = run_cli({"CLIENT_ID": "a", "GLEAN_BACKEND_URL": "https://a"})  # stdin: not a tty
    assert (code, err) == (2, "Set CLIENT_SECRET before you run this script (see --help).\n")


# --- Step 2: discovery --------------------------------------------------------------------


def test_a_plain_http_token_endpoint_in_the_metadata_is_refused_before_the_browser_step():
    with StandInGlean() as glean:
        glean.metadata_extra["token_endpoint"] = "http://acme-be.glean.com/oauth/token"
        proc = run_script(script_env(glean))
    assert proc.returncode == 1
    assert proc.stderr.decode() == "The metadata's token_endpoint must be an https:// URL (http:// only " \
        "for 127.0.0.1, [::1] or localhost), not http://acme-be.glean.com/oauth/token.\n"
    assert b"Open this URL" not in proc.stdout


@parametrize("extra, message", [
    ({"token_endpoint": None}, "The authorization server metadata has no token_endpoint."),
    ({"authorization_endpoint": "", "token_endpoint": 5},
     "The authorization server metadata has no authorization_endpoint and no token_endpoint."),
    ({"code_challenge_methods_supported": ["plain"]},
     'The authorization server does not offer PKCE S256 (its code_challenge_methods_supported is '
     '["plain"]); this flow needs it.'),
])
def test_metadata_the_flow_cannot_use_is_refused(extra, message):
    with StandInGlean() as glean:
        glean.metadata_extra.update(extra)
        proc = run_script(script_env(glean))
    assert proc.returncode == 1
    assert proc.stderr.decode() == message + "\n"
    assert proc.stdout.startswith(b"issuer=")  # what the server said is still shown


def test_metadata_without_code_challenge_methods_is_accepted():
    metadata = {"authorization_endpoint": "https://a/authorize", "token_endpoint": "https://a/token"}
    glean_oauth.check_metadata(metadata, "client_secret_post", "https://acme-be.glean.com")


def test_an_auth_method_the_metadata_does_not_list_is_refused_before_the_browser_step():
    with StandInGlean() as glean:
        proc = run_script(script_env(glean), ["--auth-method", "none"])
    assert proc.returncode == 1
    assert proc.stderr.decode() == "The token endpoint does not accept none (it offers client_secret_post, " \
                                   "client_secret_basic); choose one with --auth-method.\n"
    assert b"Open this URL" not in proc.stdout


@parametrize("endpoint", ["https://glean/authorize\x1b[2J", "https://glean/a\x07", "https://glean/\u009b31m",
                          "https://glean/\u202egnp.exe", "https://glean/a b", "https://glean/a\r\nX: y"])
def test_metadata_endpoints_with_control_characters_are_refused(endpoint):
    with StandInGlean() as glean:
        glean.metadata_extra["authorization_endpoint"] = endpoint
        proc = run_script(script_env(glean))
    assert proc.returncode == 1
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert err.startswith("The metadata's authorization_endpoint is not a clean URL (it holds control, space or "
                          "bidi characters): ")
    assert all(c.isprintable() or c == "\n" for c in out + err)
    assert "Open this URL" not in out


def test_an_https_backend_needs_https_endpoints():
    with StandInGlean(tls=True) as glean:
        glean.metadata_extra["token_endpoint"] = "http://127.0.0.1:9/oauth/token"
        proc = run_script(script_env(glean, SSL_CERT_FILE=certificate_file()))
    assert proc.returncode == 1
    assert proc.stderr.decode() == "The metadata's token_endpoint must be https://, as GLEAN_BACKEND_URL is, " \
                                   "not http://127.0.0.1:9/oauth/token.\n"


@parametrize("extra, message", [
    ({"code_challenge_methods_supported": 5}, "The metadata's code_challenge_methods_supported is not a list of names: 5."),
    ({"token_endpoint_auth_methods_supported": "client_secret_post"},
     'The metadata\'s token_endpoint_auth_methods_supported is not a list of names: "client_secret_post".'),
    ({"revocation_endpoint": 7}, "The metadata's revocation_endpoint is not a clean URL (it holds control, space "
                                 "or bidi characters): 7."),
])
def test_metadata_fields_of_the_wrong_type_are_refused(extra, message):
    with StandInGlean() as glean:
        glean.metadata_extra.update(extra)
        proc = run_script(script_env(glean))
    assert (proc.returncode, proc.stderr.decode()) == (1, message + "\n")


def test_discovery_falls_back_to_the_rfc_8414_path_form():
    with StandInGlean() as glean:
        glean.overrides["/.well-known/oauth-authorization-server"] = (404, {}, "not here\n")
        flow = run_flow(glean)
        glean.overrides["/.well-known/oauth-authorization-server/oauth"] = (404, {}, "nor here\n")
        proc = run_script(script_env(glean))
    assert flow.code == 0, flow.run.output()
    assert flow.stderr.startswith("The metadata came from {0}/.well-known/oauth-authorization-server/oauth "
                                  "({0}/.well-known/oauth-authorization-server answered 404).\n".format(glean.url))
    assert flow.stdout.startswith("issuer=" + glean.issuer)
    assert proc.returncode == 1
    assert proc.stderr.decode() == "Request to {}/.well-known/oauth-authorization-server failed (404): " \
                                   "not here\n".format(glean.url)


# --- Step 3: PKCE and state ---------------------------------------------------------------


def test_code_challenge_matches_rfc_7636_appendix_b():
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert glean_oauth.code_challenge_for(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_make_pkce_gives_fresh_unpadded_base64url_values():
    unreserved = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    state, verifier, challenge = glean_oauth.make_pkce()
    assert len(state) == 43 and len(verifier) == 86 and len(challenge) == 43
    assert set(state + verifier + challenge) <= unreserved  # no padding, no + or /
    assert challenge == glean_oauth.code_challenge_for(verifier)
    assert glean_oauth.make_pkce()[:2] != (state, verifier)


# --- Step 4: the loopback listener --------------------------------------------------------


def test_waiting_for_the_browser_has_a_bound_that_says_what_to_check():
    with StandInGlean() as glean:
        proc = run_script(script_env(glean, GLEAN_CALLBACK_TIMEOUT="0.2"))
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith("No callback reached http://127.0.0.1:")
    assert "within 0.2 s. Check that this redirect URI is registered" in err
    assert glean.paths() == ["/.well-known/oauth-authorization-server"]


def listening_port(run):
    line = run.wait_for_line(lambda line: line.startswith("Listening for callback at "))
    return urllib.parse.urlsplit(line.split(" at ", 1)[1]).port


def test_the_wait_for_the_browser_wakes_at_least_every_half_second(monkeypatch):
    """On Windows Ctrl-C does not interrupt select(); waking often lets Python see it."""
    import select

    waits, real = [], select.select
    monkeypatch.setattr(select, "select", lambda r, w, x, timeout: (waits.append(timeout), real(r, w, x, 0))[1])
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        with pytest.raises(glean_oauth.FlowError, match="No callback reached"):
            listener.wait(lambda query: query, timeout=0.2)
    assert waits and max(waits) <= glean_oauth.WAIT_SLICE_SECONDS


def test_the_run_ends_without_waiting_on_connections_the_browser_keeps_open():
    """A real browser pre-connects and keeps idle keep-alive sockets; the TypeScript example
    waits about 5 s for them to close. Ours answers the callback and goes straight on."""
    with StandInGlean() as glean:
        run = ScriptRun(script_env(glean))
        port = listening_port(run)
        url = run.authorize_url()
        with socket.create_connection(("127.0.0.1", port)) as idle:
            status, headers, _ = http_get(url)
            parts = urllib.parse.urlsplit(headers["Location"])
            browser = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            browser.request("GET", parts.path + "?" + parts.query, headers={"Connection": "keep-alive"})
            assert browser.getresponse().status == 200  # and the browser keeps this socket too
            answered = time.monotonic()
            code = run.finish()
            elapsed = time.monotonic() - answered
            browser.close()
            assert idle.fileno() != -1
    assert code == 0, run.output()
    assert elapsed < 2, elapsed  # three HTTP requests to the stand-in, no waiting on sockets


@posix_only(SIGNALS)
def test_ctrl_c_while_waiting_exits_130_in_one_line_and_frees_the_port():
    with StandInGlean() as glean:
        run = ScriptRun(script_env(glean))
        port = listening_port(run)
        run.authorize_url()
        run.proc.send_signal(signal.SIGINT)
        assert run.finish() == 130
    assert run.stderr == "Interrupted.\n"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_port_in_use_is_a_clear_error_at_once():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with StandInGlean() as glean:
            code, out, err = run_cli(good_environ(glean, REDIRECT_URI="http://127.0.0.1:{}/cb".format(port)))
    assert code == 2
    assert err == "Port {} on 127.0.0.1 is already in use (another run of this script?). Stop what " \
                  "holds it, or register another loopback redirect URI on your client and set " \
                  "REDIRECT_URI to it.\n".format(port)


def test_manual_takes_the_pasted_redirect_address():
    with StandInGlean() as glean:
        run = ScriptRun(script_env(glean, REDIRECT_URI=None), ["--manual"])
        status, headers, _ = http_get(run.authorize_url())
        assert status == 302
        run.proc.stdin.write(b"not it\n" + headers["Location"].encode() + b"\n")  # one wrong paste first
        code = run.finish()
    assert code == 0, run.output()
    assert "That is not the address the browser was redirected to." in run.stderr
    assert "No listener (--manual)" in run.stdout and "Listening for callback" not in run.stdout
    assert "Paste the address your browser was redirected to" in run.stderr
    assert glean.find("/oauth/token")[0].form["redirect_uri"] == [glean_oauth.DEFAULT_REDIRECT_URI]


@parametrize("pasted, message", [
    ("", None),
    ("http://127.0.0.1:9090/oauth/callback?code=abc&state=forged",
     "State mismatch: the callback is not the answer to this run's request. Still waiting."),
    ("http://127.0.0.1:9090/oauth/callback?error=access_denied", "State mismatch: the callback is not the answer "
                                                                  "to this run's request. Still waiting."),
    ("abc123", "That is not the address the browser was redirected to. Paste the whole address from the "
               "browser's address bar after sign-in: it starts with http://127.0.0.1:0/oauth/callback?"),
    ("'https://glean/oauth/authorize?state=x'", "That is not the address the browser was redirected to. Paste the "
     "whole address from the browser's address bar after sign-in: it starts with http://127.0.0.1:0/oauth/callback?"),
])
def test_manual_applies_the_callback_checks_and_waits_for_the_next_paste(pasted, message):
    with StandInGlean() as glean:
        code, out, err = run_cli(good_environ(glean), ["--manual"], stdin=pasted + "\n")  # then the input ends
    assert code == 1
    assert err.endswith("\n" + (message + "\n" if message else "") + "No address was pasted.\n")
    assert glean.paths("POST") == []


def run_on_a_terminal(glean, args=(), **env):
    """The script with a pseudo-terminal as its stdin, as a person runs it; returns the
    ScriptRun and the terminal's end to type into."""
    import pty

    typing, terminal = pty.openpty()
    run = ScriptRun(script_env(glean, **env), args, stdin=terminal)
    os.close(terminal)
    return run, typing


@posix_only("a pseudo-terminal is POSIX's")
@parametrize("how", ["paste", "redirect", "wrong paste, then the right one"])
def test_on_a_terminal_the_redirect_can_come_by_the_listener_or_by_a_paste(how):
    with StandInGlean() as glean:
        run, typing = run_on_a_terminal(glean, SSH_CONNECTION="10.0.0.9 50000 10.0.0.2 22", USER="ana")
        try:
            port = listening_port(run)
            url = run.authorize_url()
            if how == "redirect":
                play_browser(url)
            else:
                status, headers, _ = http_get(url)  # a browser on another machine: it cannot reach the listener
                if how.startswith("wrong"):
                    os.write(typing, b"https://glean.example/nothing?x=1\n")
                    run.wait_for_line(lambda line: line.startswith("That is not the address"))
                os.write(typing, headers["Location"].encode() + b"\n")
            code = run.finish()
        finally:
            os.close(typing)
    assert code == 0, run.output()
    assert "(Or paste here the address your browser was redirected to, if it cannot reach this machine.)" in run.stderr
    assert "  ssh -N -L {0}:127.0.0.1:{0} ana@10.0.0.2\n".format(port) in run.stderr
    assert glean.find("/oauth/token")[0].form["redirect_uri"] == ["http://127.0.0.1:{}/oauth/callback".format(port)]


@posix_only("on Windows the paste has no time limit: its console cannot be waited on (documented)")
@parametrize("typed", [b"", b"http://127.0.0.1:9090/oauth/call"])  # nothing, or a line never ended
def test_manual_honours_the_callback_timeout_even_on_a_partial_line(typed):
    with StandInGlean() as glean:
        run = ScriptRun(script_env(glean, GLEAN_CALLBACK_TIMEOUT="0.3"), ["--manual"])
        run.authorize_url()
        run.proc.stdin.write(typed)
        run.proc.stdin.flush()
        started = time.monotonic()
        code = run.proc.wait(RUN_TIMEOUT)  # stdin stays open
        elapsed = time.monotonic() - started
        run.finish()
    assert code == 1
    assert run.stderr.endswith("No address was pasted within 0.3 s (GLEAN_CALLBACK_TIMEOUT sets the limit in seconds).\n")
    assert elapsed < 3, elapsed


def test_a_paste_that_is_not_utf_8_is_not_an_address_and_the_wait_goes_on():
    with StandInGlean() as glean:
        run = ScriptRun(script_env(glean, REDIRECT_URI=None), ["--manual"])
        status, headers, _ = http_get(run.authorize_url())
        run.proc.stdin.write(b"\xff\xfe\x80 garbage\n" + headers["Location"].encode() + b"\n")
        code = run.finish()
    assert code == 0, run.output()
    assert "That is not the address the browser was redirected to." in run.stderr and "Unexpected" not in run.stderr


@posix_only("a pseudo-terminal is POSIX's")
@parametrize("redirect_uri, forward", [("http://[::1]:0/oauth/callback", "[::1]"),
                                       ("http://127.0.0.2:0/oauth/callback", "127.0.0.2")])
def test_the_ssh_hint_forwards_to_the_listeners_own_address_and_the_ssh_port(redirect_uri, forward):
    with StandInGlean() as glean:
        glean.registered_redirect = redirect_uri.replace(":0", "")
        run, typing = run_on_a_terminal(glean, REDIRECT_URI=redirect_uri, SSH_CONNECTION="10.0.0.9 50000 10.0.0.2 2222",
                                        USER="ana")
        try:
            port = listening_port(run)
            run.authorize_url()
        finally:
            run.proc.kill()
            run.finish()
            os.close(typing)
    assert "  ssh -N -L {0}:{1}:{0} -p 2222 ana@10.0.0.2\n".format(port, forward) in run.stderr


# --- Step 5: the authorization URL --------------------------------------------------------


def test_authorization_url_keeps_the_endpoint_query_and_encodes_each_value():
    url = glean_oauth.build_authorization_url(
        "https://acme-be.glean.com/oauth/authorize?tenant=acme&state=old",
        "client id&x", "http://127.0.0.1:9090/oauth/callback", "st/ate+", "chal",
    )
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "acme-be.glean.com", "/oauth/authorize")
    assert urllib.parse.parse_qsl(parts.query) == [
        ("tenant", "acme"), ("response_type", "code"), ("client_id", "client id&x"),
        ("redirect_uri", "http://127.0.0.1:9090/oauth/callback"), ("state", "st/ate+"),
        ("code_challenge", "chal"), ("code_challenge_method", "S256"),
    ]
    assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A9090%2Foauth%2Fcallback" in parts.query


@parametrize("args, env", [(["--scope", " chat  search offline_access "], {}),
                           ([], {"GLEAN_SCOPES": "chat search offline_access"})])
def test_scopes_are_asked_for(args, env):
    with StandInGlean() as glean:
        flow = run_flow(glean, args, **env)
    assert flow.code == 0, flow.run.output()
    assert glean.requests[1].query["scope"] == ["chat search offline_access"]
    assert json.loads(section(flow.stdout, "Token response"))["scope"] == "chat search offline_access"


@posix_only(FAKE_BROWSER)
def test_the_url_is_opened_with_browser(tmp_path):
    browser = fake_program(tmp_path, "browser")
    with StandInGlean() as glean:
        flow = run_flow(glean, process=True, BROWSER=str(browser))
    assert flow.code == 0, flow.run.output()
    url = flow.stdout.split("Open this URL in your browser:\n\n", 1)[1].split("\n", 1)[0]
    assert (tmp_path / "browser.args").read_text() == url
    assert "(Opened it in your browser.)" in flow.stderr


@posix_only(FAKE_BROWSER)
def test_no_browser_only_prints_the_url(tmp_path):
    browser = fake_program(tmp_path, "browser")
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--no-browser"], process=True, BROWSER=str(browser))
    assert flow.code == 0 and "Open this URL in your browser:" in flow.stdout
    assert not (tmp_path / "browser.args").exists()


@posix_only(FAKE_BROWSER)
def test_a_text_browser_is_never_started_in_the_terminal(tmp_path):
    fake_program(tmp_path, "lynx")
    fake_program(tmp_path, "www-browser")
    with StandInGlean() as glean:
        flow = run_flow(glean, process=True, TERM="xterm", PATH=str(tmp_path) + os.pathsep + os.environ["PATH"])
    assert flow.code == 0, flow.run.output()
    assert list(tmp_path.glob("*.args")) == []


@posix_only(FAKE_BROWSER)
def test_json_stdout_stays_clean_when_the_browser_writes_to_stdout(tmp_path):
    browser = fake_program(tmp_path, "chatty-browser", "echo 'Opening in existing browser session.'")
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--json"], process=True, BROWSER=str(browser))
    assert flow.code == 0, flow.run.output()
    assert json.loads(flow.stdout)["token_response"]["access_token"] in glean.access_tokens
    assert "Opening in existing browser session." in flow.stderr


@posix_only(FAKE_BROWSER)
def test_a_browser_command_that_fails_is_not_reported_as_opened(tmp_path):
    browser = fake_program(tmp_path, "broken-browser", "exit 3")
    with StandInGlean() as glean:
        flow = run_flow(glean, process=True, BROWSER=str(browser))
    assert flow.code == 0, flow.run.output()
    assert "(Opened it in your browser.)" not in flow.stderr
    assert "(Could not open a browser with BROWSER={}; open the URL above yourself.)".format(browser) in flow.stderr


@posix_only(FAKE_BROWSER)
def test_on_wsl_login_hands_windows_the_exact_url_and_the_listener_still_takes_the_redirect(tmp_path):
    fake_program(tmp_path, "powershell.exe")
    with StandInGlean() as glean:
        glean.overrides["/oauth/it's%41"] = glean.authorize
        glean.metadata_extra["authorization_endpoint"] = glean.url + "/oauth/it's%41?tenant=a&b=%25"
        flow = run_flow(glean, ["login", "--token-file", str(tmp_path / "tokens.json")], process=True,
                        WSL_DISTRO_NAME="Ubuntu", PATH=str(tmp_path) + os.pathsep + os.environ["PATH"])
    assert flow.code == 0, flow.run.output()
    url = flow.stderr.split("Open this URL in your browser:\n\n", 1)[1].split("\n", 1)[0]
    assert "'" in url and "&" in url and "%" in url
    assert (tmp_path / "powershell.exe.args").read_text() == "-NoProfile -Command Start-Process '{}'".format(
        url.replace("'", "''"))
    assert "(Opened it in your Windows browser with powershell.exe; WSL2 forwards 127.0.0.1, so its redirect " \
        "reaches this listener.)" in flow.stderr
    assert flow.browser[0] == 200  # the redirect reached the listener


@posix_only(FAKE_BROWSER)
def test_on_wsl_wslview_opens_the_url_when_there_is_one(tmp_path):
    fake_program(tmp_path, "wslview")
    fake_program(tmp_path, "powershell.exe")
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--no-chat"], process=True, WSL_DISTRO_NAME="Ubuntu",
                        PATH=str(tmp_path) + os.pathsep + os.environ["PATH"])
    assert flow.code == 0, flow.run.output()
    url = flow.stdout.split("Open this URL in your browser:\n\n", 1)[1].split("\n", 1)[0]
    assert (tmp_path / "wslview.args").read_text() == url and not (tmp_path / "powershell.exe.args").exists()
    assert "(Opened it in your Windows browser with wslview; WSL2 forwards 127.0.0.1" in flow.stderr

@posix_only(FAKE_BROWSER)
def test_on_wsl_without_a_way_to_windows_the_url_is_left_to_the_user(tmp_path):
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--no-chat"], process=True, WSL_DISTRO_NAME="Ubuntu", PATH=str(tmp_path))
    assert flow.code == 0, flow.run.output()
    assert "(WSL: neither wslview nor powershell.exe is on PATH to open your Windows browser; open the URL above " \
        "there: WSL2 forwards 127.0.0.1 to this listener. Or paste the address here.)" in flow.stderr


# --- Step 6: the callback -----------------------------------------------------------------


def test_parse_callback_returns_the_code():
    assert glean_oauth.parse_callback("code=abc%2F1&state=s1", "s1") == "abc/1"


@parametrize("query, message", [
    ("error=access_denied&state=s1", "OAuth error: access_denied"),
    ("error=access_denied&error_description=User+said+no&state=s1", "OAuth error: access_denied: User said no"),
    ("code=abc&state=other", "State mismatch: the callback is not the answer to this run's request."),
    ("code=abc", "State mismatch: the callback is not the answer to this run's request."),
    ("state=s1", "Missing authorization code in callback."),
    ("code=&state=s1", "Missing authorization code in callback."),
])
def test_parse_callback_refuses_bad_callbacks(query, message):
    with pytest.raises(glean_oauth.FlowError) as caught:
        glean_oauth.parse_callback(query, "s1")
    assert str(caught.value) == message


def test_a_callback_with_this_runs_state_ends_the_run_with_its_error():
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s1"))
        status, _, body = http_get(listener.redirect_uri + "?error=access_denied&state=s1")
        assert (status, body) == (400, "OAuth callback failed. Check the terminal for details.\n")
        assert str(join()["error"]) == "OAuth error: access_denied"


def test_a_callback_from_another_issuer_is_refused():
    with pytest.raises(glean_oauth.FlowError) as caught:
        glean_oauth.parse_callback("code=c&state=s&iss=https%3A%2F%2Fevil.example", "s", "https://glean/oauth")
    assert str(caught.value) == "Issuer mismatch: the callback's iss https://evil.example is not the " \
                                "metadata's issuer https://glean/oauth (RFC 9207)."


def test_an_error_response_from_another_issuer_is_refused_as_such():
    with pytest.raises(glean_oauth.FlowError, match="^Issuer mismatch"):
        glean_oauth.parse_callback("error=access_denied&state=s&iss=https%3A%2F%2Fevil", "s", "https://glean")


def test_iss_is_compared_as_a_plain_string():
    with pytest.raises(glean_oauth.FlowError, match="^Issuer mismatch"):
        glean_oauth.parse_callback("code=c&state=s&iss=https%3A%2F%2Fglean%2F", "s", "https://glean")
    assert glean_oauth.parse_callback("code=c&state=s&iss=https%3A%2F%2Fglean", "s", "https://glean") == "c"
    assert glean_oauth.parse_callback("code=c&state=s", "s", "https://glean") == "c"


def test_a_callback_without_iss_is_refused_when_the_metadata_promises_it():
    with StandInGlean() as glean:
        glean.metadata_extra["authorization_response_iss_parameter_supported"] = True
        glean.callback_iss = None
        flow = run_flow(glean)
    assert flow.code == 1
    assert flow.stderr == "The callback has no iss, though the metadata says the server sends it (RFC 9207).\n"
    assert glean.paths("POST") == []


def test_a_callback_with_the_wrong_iss_ends_the_run_before_the_exchange():
    with StandInGlean() as glean:
        glean.callback_iss = "https://attacker.example"
        flow = run_flow(glean)
    assert flow.code == 1
    assert flow.stderr.startswith("Issuer mismatch: the callback's iss https://attacker.example")
    assert glean.paths("POST") == []


def test_a_stray_callback_with_an_error_cannot_end_the_run():
    with StandInGlean() as glean:
        run = ScriptRun(script_env(glean))
        port = listening_port(run)
        url = run.authorize_url()
        stray = http_get("http://127.0.0.1:{}/oauth/callback?error=access_denied&error_description="
                         "Your+account+is+locked.+Call+555-0100".format(port))
        run.wait_for_line(lambda line: line.startswith("Ignored a callback"))
        play_browser(url)
        code = run.finish()
    assert stray[0] == 400
    assert code == 0, run.output()
    assert "555-0100" not in run.output() and "access_denied" not in run.output()
    assert "Ignored a callback that is not the answer to this run's request (State mismatch); still waiting.\n" \
        in run.stderr


def test_invalid_scope_names_the_scopes_the_server_does_not_list_and_the_lower_case_spelling():
    with StandInGlean() as glean:
        glean.authorize_error = "invalid_scope"
        glean.metadata_extra["scopes_supported"] = ["chat", "search", "offline_access"]
        flow = run_flow(glean, ["--scope", "chat SEARCH bogus"])
    assert flow.code == 1
    assert flow.stderr.endswith("OAuth error: invalid_scope. The server's scopes_supported does not name SEARCH bogus "
                                "(it names chat search offline_access). Glean takes scopes in lower case: --scope "
                                '"chat search bogus".\n')


# --- Step 7: the code for tokens ----------------------------------------------------------


def test_a_token_error_in_rfc_6749_form_is_shown_as_such():
    with StandInGlean() as glean:
        glean.overrides["/oauth/token"] = (400, {}, {"error": "invalid_grant", "error_description": "code expired"})
        flow = run_flow(glean)
    assert flow.code == 1
    assert flow.stderr == "token request failed (400): invalid_grant: code expired\n"


def test_a_token_response_without_an_access_token_is_an_error():
    with StandInGlean() as glean:
        glean.overrides["/oauth/token"] = (200, {}, {"token_type": "Bearer"})
        flow = run_flow(glean)
    assert flow.code == 1
    assert flow.stderr == 'The token response from {}/oauth/token has no access_token: {{"token_type": ' \
                          '"Bearer"}}\n'.format(glean.url)


def test_client_secret_basic_encodes_each_part_as_rfc_6749_says():
    client_id, secret = "id:with space", CLIENT_SECRET + "+/:%"
    with StandInGlean(client_id=client_id, client_secret=secret) as glean:
        flow = run_flow(glean, ["--auth-method", "client_secret_basic"])
    assert flow.code == 0, flow.run.output()
    assert glean.client_auth_seen == ["client_secret_basic", "client_secret_basic"]
    exchange, refresh = glean.find("/oauth/token")
    assert exchange.headers["Authorization"] == "Basic " + base64.b64encode(
        b"id%3Awith+space:" + CLIENT_SECRET.encode() + b"%2B%2F%3A%25").decode()
    assert list(exchange.form) == ["grant_type", "code", "redirect_uri", "code_verifier"]
    assert list(refresh.form) == ["grant_type", "refresh_token"]


def test_auth_method_none_sends_no_secret_and_needs_none():
    with StandInGlean() as glean:
        glean.public_client = True
        glean.metadata_extra["token_endpoint_auth_methods_supported"] = ["none"]
        flow = run_flow(glean, ["--auth-method", "none"], CLIENT_SECRET=None)
    assert flow.code == 0, flow.run.output()
    assert glean.client_auth_seen == ["none", "none"]
    assert all("client_secret" not in r.form and "Authorization" not in r.headers for r in glean.find("/oauth/token"))


# --- Step 8: the Chat API -----------------------------------------------------------------


@parametrize("status", [401, 403])
def test_a_failed_chat_call_still_decodes_and_refreshes_then_exits_1(status):
    with StandInGlean() as glean:
        glean.overrides["/rest/api/v1/chat"] = (status, {}, {"error": "forbidden"})
        flow = run_flow(glean)
    assert flow.code == 1
    assert flow.stderr == 'Chat API call failed: Request to {}/rest/api/v1/chat failed ({}): {{"error": ' \
                          '"forbidden"}} (the token may lack the CHAT scope: check the scopes of your ' \
                          'static client)\n'.format(glean.url, status)
    assert "\nJWT claims:\n" in flow.stdout and "\nRefresh response:\n" in flow.stdout
    assert "Chat response:" not in flow.stdout


@parametrize("challenge, body, hint", [
    ('Bearer error="invalid_token"', {"error": "invalid_token"}, glean_oauth.REFUSED_TOKEN_HINT),
    ("Bearer", {"code": "token_expired", "status": 401}, glean_oauth.REFUSED_TOKEN_HINT),
    ('Bearer error="insufficient_scope"', "Forbidden", glean_oauth.CHAT_SCOPE_HINT),
    ("Bearer", "Unauthorized", ""),  # chat was granted, and the server says nothing more: no scope advice
])
def test_a_chat_refusal_blames_the_scope_only_when_the_grant_lacked_it_or_the_server_says_so(challenge, body, hint):
    with StandInGlean() as glean:
        glean.overrides["/rest/api/v1/chat"] = (403 if "insufficient" in challenge else 401,
                                                {"WWW-Authenticate": challenge}, body)
        flow = run_flow(glean, ["--scope", "chat offline_access"])
    assert flow.code == 1
    assert flow.stderr.startswith("Chat API call failed: Request to {}/rest/api/v1/chat failed".format(glean.url))
    assert flow.stderr.endswith(hint + "\n") and "scope" not in flow.stderr.replace(hint, "")


def test_message_asks_another_question_and_no_chat_skips_the_call():
    with StandInGlean() as glean:
        asked = run_flow(glean, ["--message", "What is our PTO policy?"])
        skipped = run_flow(glean, ["--no-chat"])
    assert asked.code == 0, asked.run.output()
    assert json.loads(glean.find("/rest/api/v1/chat")[0].body.decode()) == {
        "messages": [{"fragments": [{"text": "What is our PTO policy?"}]}]}
    assert skipped.code == 0 and "Chat response:" not in skipped.stdout
    assert len(glean.find("/rest/api/v1/chat")) == 1


def test_chat_answer_reads_the_last_content_message_and_tolerates_the_rest():
    response = {"messages": [
        {"author": "USER", "messageType": "CONTENT", "fragments": [{"text": "Q?"}]},
        {"author": "GLEAN_AI", "messageType": "CONTENT", "fragments": [{"text": "Old"}]},
        {"author": "GLEAN_AI", "messageType": "CONTENT", "fragments": [
            {"text": "The team: "}, {"citation": {"sourceDocument": {}}}, {"text": "Ann, Bo."}, "odd"]},
        {"author": "GLEAN_AI", "messageType": "UPDATE", "fragments": [{"text": "Searching..."}]},
        {"author": "GLEAN_AI", "messageType": "SOMETHING_NEW"},
        "not a message",
    ]}
    assert glean_oauth.chat_answer(response) == "The team: Ann, Bo."
    assert glean_oauth.chat_answer({}) == ""
    assert glean_oauth.chat_answer({"messages": "x"}) == ""
    assert glean_oauth.chat_answer({"messages": [{"author": "GLEAN_AI", "fragments": None}]}) == ""


def test_an_access_token_that_is_no_bearer_token_is_not_sent_and_the_run_goes_on():
    with StandInGlean() as glean:
        def odd_token(request):
            status, headers, body = glean.token(request)
            return status, headers, dict(body, access_token="caf\u00e9.tok\r\nX-Injected: 1")
        glean.overrides["/oauth/token"] = odd_token
        flow = run_flow(glean)
    assert flow.code == 1
    assert "Chat API call failed: The access token holds characters a bearer token cannot (RFC 6750 §2.1); " \
           "not sending it.\n" in flow.stderr
    assert "\nThe access token is not a JWT, nothing to decode.\n\nRefresh response:\n" in flow.stdout
    assert glean.find("/rest/api/v1/chat") == []


def test_the_chat_call_says_it_is_waiting_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(glean_oauth, "WAITING_NOTE_SECONDS", 0.05)
    with StandInGlean() as glean:
        glean.access_tokens["tok"] = None
        glean.chat_delay = 0.5
        config = glean_oauth.Settings(backend_url=glean.url, message="Q?", stream=False, chat_timeout=5,
                                      http_timeout=5, scope="", client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                      auth_method="client_secret_post")
        err = Terminal()
        answer = glean_oauth.call_chat_api(config, "tok", glean_oauth.Console(io.StringIO(), err))
    assert err.getvalue() == "Waiting for the Chat API answer...\n"
    assert glean_oauth.chat_answer(answer) == glean.answer


# --- Step 9: the access token's claims ----------------------------------------------------


def test_decode_jwt_restores_padding():
    token = make_jwt({"alg": "RS256"}, {"sub": "a"})  # lengths that need padding back
    assert glean_oauth.decode_jwt(token) == ({"alg": "RS256"}, {"sub": "a"})


@parametrize("token", [
    "opaque-token", "a.b", "a.b.c.d.e", "!!!.e30.sig", "e30.bm90IGpzb24.sig", "WzFd.e30.sig", "e30.e30x.sig",
])
def test_decode_jwt_refuses_what_is_not_a_jwt(token):
    with pytest.raises(ValueError):
        glean_oauth.decode_jwt(token)


def test_an_opaque_access_token_is_reported_and_the_run_goes_on():
    with StandInGlean() as glean:
        glean.opaque_tokens = True
        flow = run_flow(glean)
    assert flow.code == 0, flow.run.output()
    assert "\nThe access token is not a JWT, nothing to decode.\n\nRefresh response:\n" in flow.stdout
    assert "JWT claims:" not in flow.stdout


def test_verify_puts_the_signature_line_in_place_of_the_docs_and_fetches_the_keys_on_the_kept_connection():
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--verify", "--no-chat"])
        plain = run_flow(glean, ["--no-chat"])
    assert flow.code == 0, flow.run.output()
    expected = '\n\nSignature: valid (RS256, key "rsa-1" from {}/oauth/jwks)\n\nRefresh response:\n'.format(glean.url)
    assert '}' + expected in flow.stdout
    assert "This does not verify the signature." not in flow.stdout
    assert "\nThis does not verify the signature.\n" in plain.stdout and "Signature:" not in plain.stdout
    jwks, = glean.find("/oauth/jwks")
    assert jwks.connection == glean.find("/oauth/token")[0].connection  # the kept connection, no other


def test_verify_says_invalid_and_exits_1_after_the_whole_flow():
    other_key = dict(public(RFC_7515_A2_KEY), kid="rsa-1", n=b64url((b64int(RFC_7515_A2_KEY["n"]) - 2).to_bytes(256, "big")))
    with StandInGlean() as glean:
        glean.overrides["/oauth/jwks"] = (200, {}, {"keys": [other_key]})
        flow = run_flow(glean, ["--verify", "--no-chat", "--json"])
    assert flow.code == 1, flow.run.output()
    assert json.loads(flow.stdout)["signature"] == {"status": "INVALID",
                                                    "detail": 'the signature does not match key "rsa-1"'}
    assert "\nSignature: INVALID (the signature does not match key \"rsa-1\")\n" in flow.run.stderr
    assert "refresh_response" in json.loads(flow.stdout)  # step 10 still ran


def test_verify_of_an_opaque_token_says_so_once():
    with StandInGlean() as glean:
        glean.opaque_tokens = True
        flow = run_flow(glean, ["--verify", "--no-chat"])
    assert flow.code == 0, flow.run.output()
    assert "\nThe access token is not a JWT, nothing to decode.\nSignature: not checked (the token is not a JWS: " \
        "three base64url parts, a JSON header first)\n\nRefresh response:" in flow.stdout
    assert not glean.find("/oauth/jwks")

# --- Step 10: the refresh token -----------------------------------------------------------


def test_a_failed_refresh_keeps_the_tokens_already_printed():
    with StandInGlean() as glean:
        glean.overrides["/oauth/token"] = lambda request: (
            _oauth_error(400, "invalid_grant", "refresh token revoked")
            if request.form.get("grant_type") == ["refresh_token"] else glean.token(request))
        flow = run_flow(glean)
    assert flow.code == 1
    assert flow.stderr == "\n" + ANSWER_LINE + "token request failed (400): invalid_grant: refresh token revoked\n"
    assert "\nToken response:\n" in flow.stdout and "\nJWT claims:\n" in flow.stdout


def test_without_a_refresh_token_the_hint_names_offline_access():
    with StandInGlean() as glean:
        glean.issue_refresh_token = False
        flow = run_flow(glean)
    assert flow.stderr.endswith("Glean issues a refresh token when the offline_access scope is requested (--scope).\n")


def test_json_still_gives_the_tokens_when_the_refresh_fails():
    with StandInGlean() as glean:
        glean.overrides["/oauth/token"] = lambda request: (
            _oauth_error(400, "invalid_grant", "revoked")
            if request.form.get("grant_type") == ["refresh_token"] else glean.token(request))
        flow = run_flow(glean, ["--json"])
    assert flow.code == 1
    assert json.loads(flow.stdout)["token_response"]["access_token"] in glean.access_tokens


# --- Keeping what a run obtained: --json, --token-file and --refresh ----------------------


def run_flow_losing_folder(glean, folder, args):
    """A run whose token file folder vanishes while the user signs in."""
    run = ScriptRun(script_env(glean), args)
    try:
        url = run.authorize_url()
        os.rmdir(str(folder))
        play_browser(url)
        return Flow(run, run.finish(), None)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()


def test_a_token_file_that_cannot_be_written_costs_neither_the_json_nor_the_flow_error(tmp_path):
    folder = tmp_path / "gone"
    path = str(folder / "tokens.json")
    with StandInGlean() as glean:
        folder.mkdir()
        saved_late = run_flow_losing_folder(glean, folder, ["--json", "--token-file", path])
        glean.overrides["/oauth/token"] = lambda request: (
            _oauth_error(400, "invalid_grant", "revoked")
            if request.form.get("grant_type") == ["refresh_token"] else glean.token(request))
        folder.mkdir()
        both_failed = run_flow_losing_folder(glean, folder, ["--token-file", path])
    assert saved_late.code == 1
    assert json.loads(saved_late.stdout)["refresh_response"]["access_token"] in glean.access_tokens
    assert saved_late.stderr.endswith("Cannot write the token file {}: No such file or directory.\n".format(path))
    assert both_failed.code == 1
    assert both_failed.stderr.endswith("Cannot write the token file {}: No such file or directory.\n"
                                       "token request failed (400): invalid_grant: revoked\n".format(path))


@parametrize("name, problem", [
    (os.path.join("missing", "tokens.json"), "its folder {tmp}" + os.sep + "missing does not exist"),
    ("folder", "it is a folder"),
    ("link.json", "it is a symlink, and tokens are never written through one; give the real path"),
])
def test_a_token_file_that_cannot_be_written_is_refused_before_any_traffic(tmp_path, name, problem):
    if name == "link.json" and os.name != "posix":
        pytest.skip(SYMLINKS)
    (tmp_path / "folder").mkdir()
    if name == "link.json":
        (tmp_path / "link.json").symlink_to(tmp_path / "elsewhere.json")
    with StandInGlean() as glean:
        code, out, err = run_cli(good_environ(glean), ["--token-file", str(tmp_path / name)])
    assert (code, out) == (2, "")
    assert err == "Cannot use the token file {}: {}.\n".format(tmp_path / name, problem.format(tmp=tmp_path))
    assert glean.requests == []


def test_a_quoted_tilde_in_the_token_file_is_expanded(tmp_path):
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--no-chat", "--token-file", "~/tokens.json"], HOME=str(tmp_path),
                        USERPROFILE=str(tmp_path))  # where ~ comes from on Windows
    assert flow.code == 0, flow.run.output()
    assert json.loads((tmp_path / "tokens.json").read_text())["refresh_token"] in glean.refresh_tokens


def test_json_prints_one_object_on_stdout_and_the_rest_on_stderr():
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--json"])  # (without it, the whole flow test shows the tokens whole, as the doc does)
    assert flow.code == 0, flow.run.output()
    result = json.loads(flow.stdout)
    assert list(result) == ["metadata", "token_response", "chat_response", "jwt_header", "jwt_claims",
                            "refresh_response", "tokens"]
    assert result["metadata"]["issuer"] == glean.issuer
    assert result["token_response"]["access_token"] in glean.access_tokens
    assert result["jwt_claims"]["sub"] == "demo.user@example.com"
    assert "Open this URL in your browser:" in flow.stderr and "Refresh response:" in flow.stderr
    # stderr is a terminal or a CI log: no token whole there, each only as its start, as the code is
    for response in glean.issued:
        for kind in ("access_token", "refresh_token"):
            assert response[kind] not in flow.stderr and '"{}": "{}..."'.format(kind, response[kind][:16]) in flow.stderr


def test_token_file_keeps_the_final_tokens_for_the_owner_only(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--token-file", str(path)])
    assert flow.code == 0, flow.run.output()
    assert os.name != "posix" or oct(path.stat().st_mode & 0o777) == "0o600"
    saved = json.loads(path.read_text())
    refreshed = json.loads(section(flow.stdout, "Refresh response"))
    assert saved["access_token"] == refreshed["access_token"]
    assert saved["refresh_token"] == refreshed["refresh_token"]
    assert saved["expires_at"] > saved["obtained_at"] and saved["obtained_at"].endswith("Z")
    assert sorted(os.listdir(str(tmp_path))) == ["tokens.json", "tokens.json.lock"]  # no temporary file left
    assert "Saved the tokens to {}.".format(path) in flow.stderr


@posix_only(MODES)
def test_token_file_is_0600_from_the_moment_it_exists_whatever_the_umask(tmp_path):
    path = str(tmp_path / "tokens.json")
    old = os.umask(0)
    try:
        glean_oauth.TokenStore(path).write({"access_token": "a"})
    finally:
        os.umask(old)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_a_crash_mid_write_leaves_the_old_token_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "tokens.json"
    path.write_text('{"access_token": "old"}\n')

    def crash(obj, f, **kwargs):
        f.write('{"access_tok')
        raise KeyboardInterrupt
    monkeypatch.setattr(glean_oauth.json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        glean_oauth.TokenStore(str(path)).write({"access_token": "new"})
    assert path.read_text() == '{"access_token": "old"}\n'
    assert os.listdir(str(tmp_path)) == ["tokens.json"]


@posix_only(SYMLINKS)
def test_the_token_file_is_never_written_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    (tmp_path / "tokens.json").symlink_to(target)
    with pytest.raises(glean_oauth.FlowError) as caught:
        glean_oauth.TokenStore(str(tmp_path / "tokens.json")).write({"access_token": "a"})
    assert str(caught.value).startswith("Not writing tokens through the symlink ")
    assert target.read_text() == "precious"


def test_an_unwritable_token_file_is_a_clear_error(tmp_path):
    with pytest.raises(glean_oauth.FlowError, match=r"^Cannot write the token file .*" + re.escape(
            os.path.join("missing", "t.json")) + ": "):
        glean_oauth.TokenStore(str(tmp_path / "missing" / "t.json")).write({})


def test_refresh_later_uses_the_token_file_without_a_browser(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        run_flow(glean, ["--token-file", str(path)])
        first = json.loads(path.read_text())
        glean.requests.clear()
        proc = run_script(script_env(glean), ["--refresh", "--token-file", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert glean.paths() == ["/.well-known/oauth-authorization-server", "/oauth/token"]
    assert glean.requests[1].form["refresh_token"] == [first["refresh_token"]]
    assert b"\nRefresh response:\n" in proc.stdout and b"Open this URL" not in proc.stdout
    second = json.loads(path.read_text())
    assert second["refresh_token"] != first["refresh_token"] and second["refresh_token"] in glean.refresh_tokens


def test_refresh_later_keeps_the_old_refresh_token_when_none_comes_back(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.refresh_tokens.add("long-lived")
        glean.issue_refresh_token = False  # and so it does not rotate
        seeded = run_script(script_env(glean, REFRESH_TOKEN="long-lived"), ["--refresh", "--token-file", str(path)])
        first = json.loads(path.read_text())
        again = run_script(script_env(glean), ["--refresh", "--token-file", str(path)])
        second = json.loads(path.read_text())
    assert (seeded.returncode, again.returncode) == (0, 0), seeded.stderr + again.stderr
    assert [r.form["refresh_token"] for r in glean.find("/oauth/token")] == [["long-lived"], ["long-lived"]]
    assert first["refresh_token"] == second["refresh_token"] == "long-lived"
    assert first["access_token"] != second["access_token"] and second["access_token"] in glean.access_tokens


@parametrize("contents, message", [
    (None, "Cannot read the token file {}: No such file or directory."),
    ("not json", "The token file {0} cannot be used: it is not JSON (Expecting value: line 1 column 1 (char 0)). "
                 "Start over with: python3 glean_oauth.py logout --local --token-file {0}, then python3 "
                 "glean_oauth.py login --token-file {0}."),
    ('{"access_token": "a"}', "The token file {} has no refresh_token; run the full flow first."),
])
def test_refresh_later_needs_a_readable_token_file_with_a_refresh_token(tmp_path, contents, message):
    path = tmp_path / "tokens.json"
    if contents is not None:
        path.write_text(contents)
        path.chmod(0o600)
    code, out, err = run_cli(good_environ("https://acme-be.glean.com"), ["--refresh", "--token-file", str(path)])
    assert (code, err) == (2, message.format(path) + "\n")


def test_refresh_later_without_any_refresh_token_is_a_usage_error():
    code, out, err = run_cli(good_environ("https://acme-be.glean.com"), ["--refresh"])
    assert (code, err) == (2, "--refresh needs a refresh token: give --token-file PATH, or set REFRESH_TOKEN.\n")


@parametrize("expires_in", [1e20, -5, "soon", True])
def test_an_absurd_expires_in_is_stored_without_an_expiry(tmp_path, expires_in):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.overrides["/oauth/token"] = lambda request: (200, {}, dict(glean.token(request)[2], expires_in=expires_in))
        flow = run_flow(glean, ["--no-chat", "--token-file", str(path)])
    assert flow.code == 0, flow.run.output()
    saved = json.loads(path.read_text())
    assert "expires_at" not in saved and saved["refresh_token"] in glean.refresh_tokens


@parametrize("change, message", [
    (lambda path: os.chmod(str(path), 0o620), "other users can change it (mode 620); run chmod 600 {}"),
    (lambda path: os.chmod(str(path), 0o602), "other users can change it (mode 602); run chmod 600 {}"),
    (lambda path: os.chown(str(path), 4242, -1), "it belongs to another user"),
])
@posix_only(MODES)
def test_refresh_refuses_a_token_file_others_could_have_changed(tmp_path, change, message):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        refreshable_token_file(glean, path)
        if os.getuid() != 0 and "another user" in message:
            pytest.skip("only root can give a file to another user")
        change(path)
        before = path.read_text()
        proc = run_script(script_env(glean), ["--refresh", "--token-file", str(path)])
    assert proc.returncode == 2
    assert proc.stderr.decode() == "Not using the token file {}: {}.\n".format(path, message.format(path))
    assert glean.requests == [] and path.read_text() == before


@posix_only(SYMLINKS)
def test_refresh_refuses_a_symlinked_token_file(tmp_path):
    real = tmp_path / "real.json"
    with StandInGlean() as glean:
        refreshable_token_file(glean, real)
        (tmp_path / "tokens.json").symlink_to(real)
        proc = run_script(script_env(glean), ["--refresh", "--token-file", str(tmp_path / "tokens.json")])
    assert proc.returncode == 2
    assert glean.requests == []


@posix_only(MODES)
def test_refresh_warns_when_others_can_read_the_token_file(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        refreshable_token_file(glean, path)
        path.chmod(0o644)
        proc = run_script(script_env(glean), ["--refresh", "--token-file", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode().startswith("Other users can read the token file {} (mode 644); run chmod 600 "
                                           "{}.\n".format(path, path))


def test_json_says_which_refresh_token_is_live(tmp_path):
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--json"])
    result = json.loads(flow.stdout)
    assert result["token_response"]["refresh_token_spent"] is True
    assert result["tokens"]["refresh_token"] == result["refresh_response"]["refresh_token"]
    assert result["tokens"]["refresh_token"] in glean.refresh_tokens
    assert result["token_response"]["refresh_token"] not in glean.refresh_tokens
    assert result["tokens"]["access_token"] == result["refresh_response"]["access_token"]
    assert set(result["tokens"]) >= {"obtained_at", "expires_at"} and "backend_url" not in result["tokens"]


# --- The token store ----------------------------------------------------------------------


@skip_if(os.name != "posix", "a folder is synced on POSIX only")
def test_a_write_syncs_the_file_then_its_folder_and_a_folder_that_cannot_be_synced_is_passed_over(
        tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    glean_oauth.TokenStore(str(tmp_path / "tokens.json")).write({"access_token": "a"})
    assert synced == ["file", "folder"]

    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")  # file systems that cannot sync a folder
    monkeypatch.setattr(os, "fsync", refuse)
    glean_oauth._fsync_folder(str(tmp_path))  # raises nothing


def test_parallel_token_runs_refresh_once(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        signed_in_and_expired(glean, path)
        procs = [subprocess.Popen(script_command() + ["token", "--token-file", str(path)], env=script_env(glean),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(20)]
        outputs = [proc.communicate(timeout=RUN_TIMEOUT) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 20, outputs
    assert glean.paths() == ["/oauth/token"]
    assert {out.replace(b"\r\n", b"\n") for out, _ in outputs} == {
        json.loads(path.read_text())["access_token"].encode() + b"\n"}


@parametrize("change, problem", [
    (lambda path: os.chmod(str(path), 0o660), "other users can change it (mode 660); run chmod 600 {}"),
    (lambda path: os.chown(str(path), 4242, -1), "it belongs to another user"),
    ("symlink", "it is a symlink; give the real path"),
])
@posix_only(MODES)
def test_token_refuses_a_store_others_could_have_changed(tmp_path, change, problem):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        if change == "symlink":
            login(glean, tmp_path / "real.json")
            path.symlink_to(tmp_path / "real.json")
        else:
            login(glean, path)
            if os.getuid() != 0 and "another user" in problem:
                pytest.skip("only root can give a file to another user")
            change(path)
        proc = run_script(script_env(glean), ["token", "--token-file", str(path)])
    assert proc.returncode == 2
    assert proc.stderr.decode() == "Not using the token file {}: {}.\n".format(path, problem.format(path))
    assert proc.stdout == b""


@posix_only(MODES)
def test_the_default_store_is_per_user_in_a_private_folder(tmp_path):
    with StandInGlean() as glean:
        flow = run_flow(glean, ["login"], XDG_CONFIG_HOME=str(tmp_path / "config"))
        token = run_script(script_env(glean, XDG_CONFIG_HOME=str(tmp_path / "config")), ["token"])
    path = tmp_path / "config" / "glean-oauth" / "tokens.json"
    assert flow.code == 0, flow.run.output()
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700" and oct(path.stat().st_mode & 0o777) == "0o600"
    assert token.stdout.decode() == json.loads(path.read_text())["access_token"] + "\n"


def test_logout_waits_for_a_refresh_in_flight_and_revokes_what_it_saved(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
        stored(glean, path, expires_at="2000-01-01T00:00:00Z")
        entered, release = held(glean, path)
        refreshing = start(glean, ["token", "--token-file", str(path)])
        assert entered.wait(RUN_TIMEOUT)
        logout = start(glean, ["logout", "--token-file", str(path)])
        with pytest.raises(subprocess.TimeoutExpired):
            logout.wait(0.5)  # it waits on the lock the refresh holds (a wait on what must not happen)
        release.set()
        refreshed, _ = refreshing.communicate(timeout=RUN_TIMEOUT)
        _, said = logout.communicate(timeout=RUN_TIMEOUT)
    assert (refreshing.returncode, logout.returncode) == (0, 0), said
    assert not path.exists()
    assert glean.refresh_tokens == set()  # the rotated one was revoked too: nothing left alive
    assert ("access_token", refreshed.decode().strip()) in glean.revoked


@as_root
def test_a_file_swapped_in_is_checked_on_what_was_opened(tmp_path, monkeypatch):
    """The checks look at the descriptor that is read: a file swapped in after a path check
    (another user's, planted in a folder they can write to) is never what passes them."""
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path)
    planted = tmp_path / "planted.json"
    planted.write_text(path.read_text())
    os.chown(str(planted), 4242, -1)
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda name, *args: real_open(
        str(planted) if name == str(path) else name, *args))  # the swap, at the moment of the open
    with pytest.raises(glean_oauth.FlowError, match="it belongs to another user"):
        glean_oauth.TokenStore(str(path)).read()


@parametrize("make, problem", [
    (lambda folder: folder.chmod(0o777), "other users can write to its folder {folder} (mode 777); keep it in a "
                                         "folder only you can write to"),
    (lambda folder: folder.chmod(0o1777), "other users can write to its folder {folder} (mode 1777); keep it in a "
                                          "folder only you can write to"),
    (lambda folder: os.chown(str(folder), 4242, -1), "its folder {folder} belongs to another user"),
    (lambda folder: (os.chown(str(folder), -1, 4242), folder.chmod(0o770)), "its group can write to its folder "
                                                                          "{folder} (mode 770); keep it in a folder "
                                                                          "only you can write to"),
])
@as_root
def test_a_folder_others_can_use_is_refused(tmp_path, make, problem):
    folder = tmp_path / "glean-oauth"
    folder.mkdir(mode=0o700)
    path = folder / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path)
        make(folder)
        code, out, err = run_cli(good_environ(glean), ["token", "--token-file", str(path)])
        login_code, _, login_err = run_cli(good_environ(glean), ["login", "--token-file", str(path)])
    assert (code, out) == (2, "")
    assert err == "Not using the token file {}: {}.\n".format(path, problem.format(folder=folder))
    assert login_code == 2 and login_err == err and glean.requests == []


@posix_only("XDG_CONFIG_HOME is for POSIX systems")
def test_a_relative_xdg_config_home_is_ignored(tmp_path):
    home = str(tmp_path)
    environ = {"HOME": home, "XDG_CONFIG_HOME": "relative/config"}
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = home  # expanduser reads the process's HOME
    try:
        path = glean_oauth.token_file_path(None, environ)
    finally:
        os.environ["HOME"] = old_home
    assert path == os.path.join(home, ".config", "glean-oauth", "tokens.json")


@skip_if(not hasattr(os, "mkfifo"), "no FIFOs on this platform")
def test_a_fifo_is_refused_at_once(tmp_path):
    path = tmp_path / "tokens.json"
    os.mkfifo(str(path), 0o600)
    code, _, err = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["token"])
    assert (code, err) == (2, "Not using the token file {}: it is not a regular file.\n".format(path))


@skip_if(not hasattr(os, "mkfifo"), "no FIFOs on this platform")
def test_a_fifo_or_a_symlink_as_the_journal_neither_hangs_nor_floods_a_run(tmp_path):
    path = tmp_path / "tokens.json"
    journal = tmp_path / "tokens.json.refreshing"
    with StandInGlean() as glean:
        stored(glean, path)
        os.mkfifo(str(journal), 0o600)
        fifo = subprocess.run(script_command() + ["status", "--token-file", str(path)], env=script_env(glean),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        journal.unlink()
        journal.symlink_to("/dev/zero")
        zero = subprocess.run(script_command() + ["status", "--token-file", str(path)], env=script_env(glean),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
    assert fifo.returncode == zero.returncode == 0 and b"Last refresh:" not in fifo.stdout + zero.stdout


def test_a_folder_as_the_token_file_gets_no_chmod_advice(tmp_path):
    code, _, err = run_cli({}, ["token", "--token-file", str(tmp_path)])
    assert (code, err) == (2, "Not using the token file {}: it is a folder.\n".format(tmp_path))


@parametrize("field, value", [("token_endpoint", "http://127.0.0.1:9/oauth/token"),
                              ("revocation_endpoint", "http://127.0.0.1:9/oauth/revoke")])
def test_the_stores_endpoints_are_checked_like_the_metadatas(tmp_path, field, value):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, expires_at="2000-01-01T00:00:00Z", backend_url="https://acme-be.glean.com", **{field: value})
        args = ["token"] if field == "token_endpoint" else ["logout"]
        code, out, err = run_cli(good_environ(glean, GLEAN_BACKEND_URL=None), args + ["--token-file", str(path)])
    assert code == 1 and glean.requests == []
    assert err.startswith("The token file's {} must be https://, as GLEAN_BACKEND_URL is, not {}.".format(field, value))


def test_a_client_id_that_is_not_the_stored_client_is_refused(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, expires_at="2000-01-01T00:00:00Z")
        code, _, err = run_cli(good_environ(glean, CLIENT_ID="another-client"), ["token", "--token-file", str(path)])
    assert code == 2 and glean.requests == []
    assert err.startswith("CLIENT_ID is another-client, but the tokens at {} were issued to the client "
                          "stand-in-client".format(path))


@as_root
def test_login_over_a_file_it_cannot_replace_is_refused_before_any_traffic(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text("{}")
    os.chown(str(path), 4242, -1)
    with StandInGlean() as glean:
        code, _, err = run_cli(good_environ(glean), ["login", "--token-file", str(path)])
    assert (code, err) == (2, "Cannot use the token file {}: it belongs to another user, so it cannot be "
                              "replaced.\n".format(path))
    assert glean.requests == []


@parametrize("field, value", [("auth_method", ["client_secret_post"]), ("auth_method", {"a": 1}),
                              ("refresh_token", 7), ("backend_url", []), ("expires_at", 1)])
def test_any_type_in_any_store_field_is_one_line(tmp_path, field, value):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, expires_at="2000-01-01T00:00:00Z")
        saved = json.loads(path.read_text())
        saved[field] = value
        path.write_text(json.dumps(saved))
        results = [run_cli(good_environ(glean), [command, "--token-file", str(path)])
                   for command in ("token", "status", "logout")]
    for code, out, err in results:
        assert code in (1, 2) and "Unexpected error" not in err and err.count("\n") == 1, err
        assert "its {} is not text".format(field) in err


@posix_only(SIGNALS)
def test_a_refresh_sent_sigterm_in_flight_saves_its_answer_first(tmp_path):
    def lane(number, outcome):  # 10 refreshes of one store, each sent SIGTERM while its grant is held
        path = tmp_path / "tokens{}.json".format(number)
        with StandInGlean() as glean:
            stored(glean, path)
            for attempt in range(10):
                expire(path)
                entered, release = held(glean, path)
                refreshing = start(glean, ["token", "--token-file", str(path)])
                assert entered.wait(RUN_TIMEOUT)  # the grant is out: from now on its answer must be saved
                time.sleep(secrets.randbelow(10) / 1000)  # a moment at random while the server holds it
                refreshing.send_signal(signal.SIGTERM)
                release.set()
                outcome.put((refreshing.wait(RUN_TIMEOUT), saved_refresh_token(path) in glean.refresh_tokens))
            outcome.put(glean.presented_refresh_tokens)

    outcome = queue.Queue()
    lanes = [threading.Thread(target=lane, args=(number, outcome)) for number in range(5)]  # 50 in all
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join(RUN_TIMEOUT * 2)
    results = [outcome.get_nowait() for _ in range(55)]
    presented = [token for result in results if isinstance(result, list) for token in result]
    # Each ended as SIGTERM asks (143 in a shell), after saving the rotated token, still live at the server.
    assert [result for result in results if not isinstance(result, list)] == [(-signal.SIGTERM, True)] * 50
    assert len(presented) == len(set(presented)) == 50  # no refresh token sent twice


@posix_only(SHELL)
def test_an_hour_later_the_recipes_still_hand_out_tokens_with_the_secret_kept_at_login(tmp_path):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir(mode=0o700)
    elsewhere.mkdir()
    with StandInGlean() as glean:
        glean.lifetime = 1  # an hour, compressed: every access token has expired by the next call
        signed = run_flow(glean, ["login", "--save-secret"], process=True, HOME=str(home))
        assert signed.code == 0, signed.run.output()
        assert signed.stderr.endswith("Later refreshes take the client secret from {} (kept at login).\n".format(
            home / ".config" / "glean-oauth" / "tokens.json.secret"))
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": HERE}  # no CLIENT_SECRET*, no backend
        recipes = {
            "header helper": '"$PY" "$SCRIPT" token --format headers-json --http-timeout 5',
            "eval": 'env=$("$PY" "$SCRIPT" token --format env) && eval "$env" && printf %s "$GLEAN_API_TOKEN"',
            "TokenProvider": '"$PY" -c "import glean_oauth; print(glean_oauth.TokenProvider()())"'}
        served = []
        for _ in range(3):  # each call finds the token near its end (--min-valid 60 > its 1 s), so renews it
            for name, command in recipes.items():
                ran = subprocess.run(["/bin/sh", "-c", command], cwd=str(elsewhere), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, timeout=RUN_TIMEOUT,
                                     env=dict(env, PY=sys.executable, SCRIPT=SCRIPT))
                assert ran.returncode == 0, (name, ran.stderr)
                token = ran.stdout.decode().strip()
                token = json.loads(token)["Authorization"].split()[1] if name == "header helper" else token
                assert token in glean.access_tokens, name  # one the stand-in accepts
                served.append(token)
    assert len(set(served)) == len(served)  # each call found the last token expired, and renewed it
    assert CLIENT_SECRET not in (home / ".config" / "glean-oauth" / "tokens.json").read_text()
    assert oct((home / ".config" / "glean-oauth" / "tokens.json.secret").stat().st_mode & 0o777) == "0o600"


@posix_only(SHELL)
@parametrize("how", ["absolute path", "relative path", "-m", "symlink"])
def test_every_hint_runs_when_pasted_into_a_shell_elsewhere(tmp_path, how):
    here, there = tmp_path / "here", tmp_path / "there"
    for folder in (here, there):
        folder.mkdir()
    path = there / "tokens.json"
    path.write_text("{not json")
    path.chmod(0o600)
    os.symlink(SCRIPT, str(here / "g.py"))
    command = {"absolute path": [sys.executable, SCRIPT], "-m": [sys.executable, "-m", "glean_oauth"],
               "relative path": [sys.executable, os.path.relpath(SCRIPT, str(here))],
               "symlink": [sys.executable, "g.py"]}[how]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": HERE if how == "-m" else ""}
    said = subprocess.run(command + ["token", "--token-file", str(path)], cwd=str(here), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT).stderr.decode()
    hint = said.split("Start over with: ")[1].split(", then ")[0]
    pasted = subprocess.run(["/bin/sh", "-c", hint], cwd=str(there), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
    assert pasted.returncode == 0 and not path.exists(), (hint, pasted.stderr)
    assert ("-m glean_oauth" in hint) == (how == "-m") and ("g.py" in hint) == (how == "symlink")


@posix_only(MODES)
def test_a_secret_from_a_file_is_kept_as_its_path_and_logout_removes_what_goes_with_the_store(tmp_path):
    path, secret_file = tmp_path / "tokens.json", a_secret_file(tmp_path)
    with StandInGlean() as glean:
        glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
        signed = login(glean, path, ["--save-secret", "--client-secret-file", str(secret_file)], CLIENT_SECRET=None)
        kept = json.loads((tmp_path / "tokens.json.secret").read_text())
        expire(path)
        refreshed = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["token"])
        assert refreshed[0] == 0 and refreshed[1].strip() in glean.access_tokens  # renewed with the file's secret
        kept_path = tmp_path / "tokens.json.secret"
        kept_path.write_text(json.dumps(dict(kept, client_secret_file=["not", "a", "path"])))
        expire(path)
        mangled = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["token"])
        assert mangled[0] == 2 and mangled[2].startswith("Set CLIENT_SECRET or CLIENT_SECRET_FILE")  # no traceback
        kept_path.write_text(json.dumps(kept))
        logged_out = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["logout"])
        nothing = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["logout", "--local"])
    assert signed.code == 0 and signed.stderr.endswith(
        "Later refreshes take the client secret from the file {} (named at login).\n".format(secret_file))
    assert kept == {"client_id": CLIENT_ID, "client_secret_file": str(secret_file)}
    assert logged_out[0] == 0 and sorted(os.listdir(str(tmp_path))) == ["secret"]  # no secret, journal or lock left
    assert nothing == (0, "", "Nothing is stored at {}; nothing to do.\n".format(path))


@parametrize("args, message", [
    (["--format", "curl", "--json"], "--format and --json both choose what token prints; give one."),
    (["--header", "--json"], "--json and --header both choose what token prints; give one."),
    (["--header", "--format", "env"], "--format and --header both choose what token prints; give one."),
])
def test_one_output_flag_at_a_time(args, message):
    assert run_cli({}, ["token"] + args) == (2, "", message + "\n")


def test_min_valid_below_zero_is_a_usage_error(tmp_path):
    assert run_cli({"GLEAN_TOKEN_FILE": str(tmp_path / "tokens.json")}, ["token", "--min-valid", "-1"]) == (
        2, "", "--min-valid must be a positive (or 0) number of seconds, at most 604800, not '-1'.\n")


def test_min_valid_zero_force_refresh_and_a_min_valid_beyond_the_lifetime(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        saved = stored(glean, path)
        env = good_environ(glean, GLEAN_TOKEN_FILE=str(path))
        kept = run_cli(env, ["token", "--min-valid", "0"])
        assert glean.requests == []
        forced = run_cli(env, ["token", "--force-refresh"])
        beyond = run_cli(env, ["token", "--min-valid", "4000"])
    assert kept == (0, saved["access_token"] + "\n", "")
    assert forced[0] == 0 and forced[1].strip() not in ("", saved["access_token"]) and forced[2] == ""
    assert beyond[0] == 0 and beyond[1] != forced[1] and len(glean.find("/oauth/token")) == 2
    assert beyond[2] == "--min-valid 4000 is at or beyond the token's lifetime (3600 s): every call refreshes.\n"


def test_a_time_on_another_day_says_its_date():
    now = time.mktime((2026, 12, 7, 12, 0, 0, 0, 0, 0)) - time.timezone
    assert glean_oauth.until_text(now + 60, now) == "12:01 UTC"
    assert glean_oauth.until_text(now + 86400, now) == "2026-12-08 12:00 UTC"


def test_a_refresh_killed_in_flight_is_reported_by_the_next_run(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, expires_at="2000-01-01T00:00:00Z")
        entered, release = held(glean, path)
        refreshing = start(glean, ["token", "--token-file", str(path)])
        assert entered.wait(RUN_TIMEOUT)  # the grant has reached the server
        refreshing.kill()  # kill -9: no answer saved
        refreshing.wait(RUN_TIMEOUT)
        release.set()  # the server rotates: the stored refresh token is spent
        (tmp_path / ".tokens.json.k1ll3d_0.tmp").write_text("{}")  # what the killed run was writing
        (tmp_path / ".other.json.wr1t1ng0.tmp").write_text("{}")  # another store's, being written now
        glean.overrides.clear()
        shown = run_cli({}, ["status", "--token-file", str(path)])  # reports it, and leaves it for a refresh
        proc = run_script(script_env(glean), ["token", "--token-file", str(path)])
    assert re.search(r"\nLast refresh:  interrupted after it was sent \(\d{4}-\d\d-\d\dT[\d:]+Z\): the refresh "
                     r"token may be spent\n", shown[1]), shown
    assert proc.returncode == 3
    lines = proc.stderr.decode().splitlines()
    assert lines[0].startswith("The last refresh of the tokens at {} was interrupted after it was sent (".format(path))
    assert lines[0].endswith("the server has probably spent that refresh token. If the next refresh is refused, sign "
                             "in again with: python3 glean_oauth.py login --token-file {}".format(path))
    assert lines[1].startswith("The refresh token was refused") and len(lines) == 2
    assert sorted(os.listdir(str(tmp_path))) == [".other.json.wr1t1ng0.tmp", "tokens.json", "tokens.json.lock"]


def test_a_journal_cut_short_is_still_reported(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path)
        (tmp_path / "tokens.json.refreshing").write_text('{"started_at": "2026-')
        code, _, err = run_cli(good_environ(glean), ["token", "--min-valid", "99999", "--token-file", str(path)])
    assert code == 0
    assert err.startswith("The last refresh of the tokens at {} was interrupted after it was sent (at an unknown "
                          "time)".format(path))
    assert not (tmp_path / "tokens.json.refreshing").exists()


def test_a_journal_that_cannot_be_written_stops_the_refresh_before_it_is_sent(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, expires_at="2000-01-01T00:00:00Z")
        (tmp_path / "tokens.json.refreshing").mkdir()
        code, _, err = run_cli(good_environ(glean), ["token", "--token-file", str(path)])
    assert code == 1 and glean.requests == []
    assert err in ["Cannot write the refresh journal {}.refreshing: {}.\n".format(path, reason)
                   for reason in ("Is a directory", "Permission denied")]  # POSIX's, and Windows'


def test_a_store_held_open_by_a_reader_is_still_replaced_and_removed(tmp_path):
    """On Windows a file another process has open cannot be renamed over or removed: the
    write and the delete wait for it (a reader, an antivirus) within the lock's margin."""
    path = tmp_path / "tokens.json"
    store = glean_oauth.TokenStore(str(path))
    store.write({"access_token": "old"})
    for change in (lambda: store.write({"access_token": "new"}), store.delete):
        reader = open(str(path), "rb")
        closer = threading.Timer(0.3, reader.close)  # the reader's pace: it lets go in a moment
        closer.start()
        try:
            change()
        finally:
            closer.cancel()
            reader.close()
        if path.exists():
            assert json.loads(path.read_text())["access_token"] == "new"
    assert not path.exists()


def test_the_default_store_on_windows_is_in_the_profile_never_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "name", "nt")
    profile = os.path.abspath(str(tmp_path))
    path = glean_oauth.token_file_path(None, {"APPDATA": "relative", "LOCALAPPDATA": profile})
    assert path == os.path.join(profile, "glean-oauth", "tokens.json")
    with pytest.raises(glean_oauth.FlowError) as caught:
        glean_oauth.token_file_path(None, {"APPDATA": "", "USERPROFILE": "~"})
    assert str(caught.value) == "Cannot tell where your token store goes: none of APPDATA, LOCALAPPDATA, " \
                                "USERPROFILE is set to a full path. Set APPDATA, or give --token-file."


@posix_only(MODES)
def test_a_huge_store_is_refused_unread(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(" " * (glean_oauth.MAX_PRIVATE_FILE_BYTES + 1))
    path.chmod(0o600)
    code, _, err = run_cli({}, ["token", "--token-file", str(path)])
    assert (code, err) == (2, "Not using the token file {}: it is over 1048576 bytes.\n".format(path))


def test_parallel_mixed_runs_never_spend_a_refresh_token_twice(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
        stored(glean, path, expires_at="2000-01-01T00:00:00Z")
        mixes = [["token", "--min-valid", "99999"], ["exec", "--min-valid", "99999", "--", "true"],
                 ["--refresh", "--no-chat"], ["token"], ["logout"]]
        runs = [start(glean, mixes[i % len(mixes)] + ["--token-file", str(path)]) for i in range(16)]
        logins = [ScriptRun(script_env(glean), ["login", "--force", "--token-file", str(path)]) for _ in range(4)]
        for run in logins:
            play_browser(run.authorize_url())
        codes = [run.wait(RUN_TIMEOUT) for run in runs] + [run.finish() for run in logins]
        for run in runs:
            run.communicate()
    presented = glean.presented_refresh_tokens
    assert len(presented) == len(set(presented)), "a refresh token was sent twice"
    assert all(code in (0, 1, 2, 3) for code in codes)
    if path.exists():
        saved = json.loads(path.read_text())
        assert saved["refresh_token"] in glean.refresh_tokens, "the store holds a spent or revoked refresh token"


def test_stored_times_are_read_back_as_written():
    for timestamp in [0, 951782400, 1772323199, 4102444800, 1795893326]:  # 2000-02-29 and 2100-01-01 among them
        assert glean_oauth.parse_iso_time(glean_oauth.iso_time(timestamp)) == timestamp
    assert glean_oauth.parse_iso_time("2026-11-28 12:00:00") is None and glean_oauth.parse_iso_time(5) is None


def test_an_old_or_incomplete_store_means_sign_in_again(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        signed_in_and_expired(glean, path)
        saved = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in saved.items() if k != "token_endpoint"}))
        lacking = run_script(script_env(glean), ["token", "--token-file", str(path)])
        path.write_text(json.dumps({k: v for k, v in saved.items() if k != "refresh_token"}))
        no_refresh = run_script(script_env(glean), ["token", "--token-file", str(path)])
        path.write_text("[1, 2]")
        not_object = run_script(script_env(glean), ["token", "--token-file", str(path)])
    assert (lacking.returncode, lacking.stderr.decode()) == (3, "The token file lacks what a refresh needs "
                                                             "(token_endpoint). Sign in with: python3 glean_oauth.py "
                                                             "login --token-file {}\n".format(path))
    assert no_refresh.returncode == 3 and no_refresh.stderr.decode().startswith(
        "The access token at {} has expired and there is no refresh token to renew it".format(path))
    assert (not_object.returncode, not_object.stderr.decode()) == (
        2, "The token file {0} cannot be used: it does not hold a JSON object. Start over with: python3 "
           "glean_oauth.py logout --local --token-file {0}, then python3 glean_oauth.py login --token-file {0}.\n"
           .format(path))
    assert glean.requests == []


def test_the_lock_wait_is_bounded(tmp_path):
    store = glean_oauth.TokenStore(str(tmp_path / "tokens.json"))
    with glean_oauth._FileLock(store.lock_path, 1):  # another run, mid-refresh
        started = time.monotonic()
        with pytest.raises(glean_oauth.FlowError) as caught:
            with store.locked(0.2):
                pass
        assert 0.2 <= time.monotonic() - started < 2
    assert str(caught.value) == "Another run has held the lock {} for 0.2 s; try again, or remove it if no run " \
                                "is going on.".format(store.lock_path)
    with store.locked(0.2):  # free again
        pass


# --- The subcommands ----------------------------------------------------------------------


def signed_in(glean, path):
    """`login` with chat and offline_access, as a user runs it once; returns (Flow, store)."""
    glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
    flow = login(glean, path, ["--scope", "chat offline_access"])
    assert flow.code == 0, flow.run.output()
    glean.requests.clear()
    return flow, json.loads(path.read_text())


def test_login_saves_what_a_refresh_needs_and_prints_no_token(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        flow, saved = signed_in(glean, path)
    assert flow.stdout == "\n"  # nothing on stdout, no token
    assert saved["access_token"] not in flow.stderr
    assert "Open this URL in your browser:" in flow.stderr
    assert flow.stderr.endswith("Signed in as demo.user@example.com; saved the tokens to {0}; the access token "
                                "expires at {1} (in 59 min).\nLater refreshes need the client secret where they run "
                                "(CLIENT_SECRET or CLIENT_SECRET_FILE); to keep it with the tokens instead: python3 "
                                "glean_oauth.py login --save-secret --token-file {0}\n".format(path, saved["expires_at"]))
    assert "client_secret" not in saved and CLIENT_SECRET not in json.dumps(saved)
    assert {k: saved[k] for k in ("backend_url", "client_id", "auth_method", "issuer", "token_endpoint",
                                  "revocation_endpoint", "requested_scope")} == {
        "backend_url": glean.url, "client_id": CLIENT_ID, "auth_method": "client_secret_post", "issuer": glean.issuer,
        "token_endpoint": glean.url + "/oauth/token", "revocation_endpoint": glean.url + "/oauth/revoke",
        "requested_scope": "chat offline_access"}


def test_login_keeps_a_sign_in_that_serves_and_force_signs_in_again(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        _, saved = signed_in(glean, path)
        expire(path)  # expired, but renewable: still serves
        again = run_script(script_env(glean), ["login", "--scope", "CHAT", "--token-file", str(path)])
        assert glean.requests == []  # no discovery, no authorization request, no browser
        wider = login(glean, path, ["--scope", "chat search offline_access"])
        forced = login(glean, path, ["--scope", "chat", "--force"])
    assert again.returncode == 0 and again.stdout == b""
    assert again.stderr.decode().startswith("Already signed in as demo.user@example.com at {}; the access token "
                                            "expired at ".format(glean.url))
    assert "To sign in again: python3 glean_oauth.py login --force --token-file {}\n".format(path) in \
        again.stderr.decode()
    assert wider.code == forced.code == 0 and len(glean.find("/oauth/authorize")) == 2


def test_two_tenants_side_by_side(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as a, StandInGlean() as b:
        for glean in (a, b):
            glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
            assert login(glean, path).code == 0
        env = script_env(a, GLEAN_BACKEND_URL=None)  # the same client at both stand-ins; no backend named
        none_named = run_script(env, ["token", "--token-file", str(path)])
        token_a = run_script(env, ["token", "--backend-url", a.url, "--token-file", str(path)])
        token_b = run_script(dict(env, GLEAN_SERVER_URL=b.url), ["token", "--token-file", str(path)])
        listed = run_script(env, ["status", "--token-file", str(path)])
        listed_json = run_script(env, ["status", "--json", "--token-file", str(path)])
        third = run_script(env, ["token", "--backend-url", "https://third-be.glean.com", "--token-file", str(path)])
        stores = glean_oauth.Tenants(glean_oauth.TokenStore(str(path))).files()
        b_store = next(store for store in stores if store.path != str(path))
        expire(pathlib.Path(b_store.path))
        with glean_oauth._FileLock(str(path) + ".lock", 1):  # A's lock, held: B's refresh does not wait on it
            refreshed_b = run_script(env, ["token", "--backend-url", b.url, "--token-file", str(path)])
        provider = glean_oauth.TokenProvider(str(path), environ=good_environ(a), backend_url=b.url)
        provided = provider.server_url, provider()
        out_a = run_script(env, ["logout", "--backend-url", a.url, "--token-file", str(path)])
        only_b = run_script(env, ["token", "--token-file", str(path)])
        every = run_script(env, ["logout", "--all", "--token-file", str(path)])
    assert every.returncode == 0 and glean_oauth.Tenants(glean_oauth.TokenStore(str(path))).files() == []
    assert b.refresh_tokens == set()
    assert [tenant["backend_url"] for tenant in json.loads(listed_json.stdout)["tenants"]] == [a.url, b.url]
    assert third.returncode == 3 and third.stderr.decode().startswith(
        "No tokens are stored for https://third-be.glean.com (--backend-url) at {}: there are tokens for {}, {}. "
        "Sign in with: python3 glean_oauth.py login --token-file {} --backend-url https://third-be.glean.com".format(
            path, a.url, b.url, path))
    assert none_named.returncode == 0 and none_named.stdout == token_a.stdout  # the first signed in: the default
    assert token_a.stdout.decode().strip() == a.issued[0]["access_token"]
    assert token_b.stdout.decode().strip() == b.issued[0]["access_token"]
    assert [line.split("  ")[0] for line in listed.stdout.decode().splitlines()] == [a.url, b.url]
    assert listed.stdout.decode().splitlines()[0].endswith("  (default)")
    assert refreshed_b.returncode == 0 and refreshed_b.stdout != token_b.stdout
    assert provided == (b.url, refreshed_b.stdout.decode().strip())
    assert out_a.returncode == 0 and not path.exists() and a.refresh_tokens == set()
    assert only_b.stdout == refreshed_b.stdout  # B was left as it was, and is now the only tenant


def test_status_json_has_one_shape_with_none_one_or_two_tenants(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as a, StandInGlean() as b:
        shapes = [run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["status", "--json"])]
        stored(a, path)
        shapes.append(run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["status", "--json"]))
        stored(b, tenant_path(path, b), expires_at="2000-01-01T00:00:00Z")
        shapes.append(run_cli({"GLEAN_TOKEN_FILE": str(path), "CLIENT_ID": CLIENT_ID}, ["status", "--json"]))
    tenants = [json.loads(out)["tenants"] for _, out, _ in shapes]
    assert [len(listed) for listed in tenants] == [0, 1, 2] and [code for code, _, _ in shapes] == [3, 0, 2]
    keys = {"token_file", "backend_url", "client_id", "auth_method", "user", "scope", "default", "expires_at",
            "expires_in", "access_token_valid", "refresh_token", "renewable", "secret", "refresh_refused_at",
            "refresh_refused", "refresh_interrupted", "clock_offset_seconds"}
    assert [set(entry) for listed in tenants for entry in listed] == [keys] * 3
    assert [(entry["default"], entry["refresh_token"], entry["renewable"]) for entry in tenants[2]] == [
        (True, True, False), (False, True, False)]  # no secret here: not renewable, and said so
    named = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["status", "--json", "--backend-url", "https://third-be.glean.com"])
    assert named[:2] == (3, '{\n  "tenants": []\n}\n') and "No tokens are stored for https://third-be" in named[2]


def test_login_default_makes_a_tenant_the_one_used_when_none_is_named(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as a, StandInGlean() as b:
        saved_a, saved_b = stored(a, path), stored(b, tenant_path(path, b))
        env = script_env(a, GLEAN_BACKEND_URL=None, GLEAN_TOKEN_FILE=str(path))
        first = run_script(env, ["token"])
        made = run_script(dict(env, GLEAN_BACKEND_URL=b.url), ["login", "--default"])  # signed in already
        second = run_script(env, ["token"])
        listed = json.loads(run_script(env, ["status", "--json"]).stdout)["tenants"]
        assert a.requests == b.requests == []  # no browser, no sign-in, no refresh
        path.unlink()  # the first tenant gone, and no default named: with two left, none is the default
        os.unlink(str(path) + ".default")
        stored(a, tenant_path(path, a))
        neither = run_script(env, ["token"])
    assert first.stdout.decode().strip() == saved_a["access_token"]  # the first signed in
    assert made.returncode == 0 and second.stdout.decode().strip() == saved_b["access_token"]
    assert [(tenant["backend_url"], tenant["default"]) for tenant in listed] == [(a.url, False), (b.url, True)]
    assert neither.returncode == 2 and neither.stderr.decode().startswith("Tokens for several backends are stored at")


def tenant_path(path, glean):
    """Where a tenant other than the first is kept, beside the store `path`."""
    return pathlib.Path(glean_oauth.Tenants(glean_oauth.TokenStore(str(path))).tenant_file_name(glean.url))


def test_one_tenants_leftovers_never_cost_anothers_rotated_token(tmp_path, monkeypatch):
    path = tmp_path / "tokens.json"
    with StandInGlean() as a, StandInGlean() as b:
        stored(a, path, expires_at="2000-01-01T00:00:00Z")
        b_path = tenant_path(path, b)
        stored(b, b_path, expires_at="2000-01-01T00:00:00Z")
        (tmp_path / "tokens.json.refreshing").write_text('{"started_at": "2026-12-01T00:00:00Z", "pid": 1}')
        b_writing, a_done, real_replace = threading.Event(), threading.Event(), os.replace

        def slow_replace(source, target):  # B's write is slowed between its temporary file and the rename
            if target == str(b_path):
                b_writing.set()
                a_done.wait(RUN_TIMEOUT)
            return real_replace(source, target)
        monkeypatch.setattr(os, "replace", slow_replace)
        outcome = queue.Queue()
        refreshing_b = threading.Thread(target=lambda: outcome.put(glean_oauth.fresh_tokens(
            glean_oauth.TokenStore(str(b_path)), good_environ(b), 60, 5)))
        refreshing_b.start()
        assert b_writing.wait(RUN_TIMEOUT)
        code, out, err = run_cli(good_environ(a, GLEAN_TOKEN_FILE=str(path)), ["token"])  # A's recovery runs
        a_done.set()
        refreshing_b.join(RUN_TIMEOUT)
        assert code == 0 and "The last refresh of the tokens at {} was interrupted".format(path) in err
        assert outcome.get_nowait()["refresh_token"] == json.loads(b_path.read_text())["refresh_token"]
        assert json.loads(path.read_text())["refresh_token"] in a.refresh_tokens
        assert json.loads(b_path.read_text())["refresh_token"] in b.refresh_tokens


def test_a_tenant_file_an_earlier_version_made_is_still_a_tenant(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as a, StandInGlean() as b:
        stored(a, path)
        legacy = tmp_path / "tokens.127.0.0.1_{}.json".format(b.httpd.server_address[1])  # as be7c550 named it
        stored(b, legacy, expires_at="2000-01-01T00:00:00Z")
        (tmp_path / "tokens.127.0.0.1_1.json").write_text(legacy.read_text())  # the same backend, not its name
        listed = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["status", "--json"])
        token = run_cli(good_environ(b, GLEAN_TOKEN_FILE=str(path)), ["token"])
    assert [tenant["backend_url"] for tenant in json.loads(listed[1])["tenants"]] == [a.url, b.url]
    assert token[0] == 0 and json.loads(legacy.read_text())["access_token"] == token[1].strip()


def test_a_secret_from_the_environment_never_goes_to_another_tenants_server(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean(client_id="acme-client", client_secret="ACME-SECRET-4b1d") as a, \
            StandInGlean(client_id="partner-client", client_secret="PARTNER-SECRET-77e1") as b:
        for glean in (a, b):
            glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
        stored(a, path, expires_at="2000-01-01T00:00:00Z")
        stored(b, tenant_path(path, b), expires_at="2000-01-01T00:00:00Z")
        env = {"CLIENT_SECRET": a.client_secret, "GLEAN_TOKEN_FILE": str(path)}  # the README's recipe: no CLIENT_ID
        token = run_cli(dict(env, GLEAN_BACKEND_URL=b.url), ["token"])
        exec_code = run_script(dict(env, PATH=os.environ["PATH"]), ["exec", "--backend-url", b.url, "--", "true"])
        with pytest.raises(glean_oauth.FlowError) as provided:
            glean_oauth.TokenProvider(str(path), environ=env, backend_url=b.url)()
        logout = run_cli(env, ["logout", "--all"])
        assert b.requests == [] and a.requests == []  # before any request
        own = run_cli(dict(env, CLIENT_ID="acme-client", GLEAN_BACKEND_URL=a.url), ["token"])
    message = "Tokens for several backends are stored, and the secret in CLIENT_SECRET is one client's: to use it " \
              "for {0}, set CLIENT_ID=partner-client (that backend's client), or keep its secret with: " \
              "GLEAN_TOKEN_FILE={1} python3 glean_oauth.py login --save-secret --backend-url {0}".format(b.url, path)
    assert token == (2, "", message + "\n") and exec_code.returncode == 2 and str(provided.value).startswith(
        message.split(", or keep")[0])  # its hint names the file TokenProvider was given
    assert logout[0] == 2 and logout[2].count("is one client's") == 2  # each tenant tried, each named
    assert "{} ({}):\n".format(a.url, path) in logout[2] and "{} ({}):\n".format(b.url, tenant_path(path, b)) in logout[2]
    assert own[0] == 0 and [r.path for r in a.requests] == ["/oauth/token"]


@parametrize("name", ["glean-tokens", "tokens.json"])
def test_no_lock_journal_backup_or_temporary_file_is_taken_for_a_tenant(tmp_path, name):
    path = tmp_path / name
    with StandInGlean() as glean:
        signed_in_and_expired(glean, path)
        refreshed = run_cli(good_environ(glean, GLEAN_BACKEND_URL=None, GLEAN_TOKEN_FILE=str(path)), ["token"])
        shutil.copy(str(path), str(tmp_path / (name.replace(".json", "") + ".bak.json")))
        (tmp_path / (name + ".refreshing")).write_text("{}")
        again = [run_cli(good_environ(glean, GLEAN_BACKEND_URL=None, GLEAN_TOKEN_FILE=str(path)), [command])
                 for command in ("token", "status")]
        executed = run_script(script_env(glean, GLEAN_BACKEND_URL=None, GLEAN_TOKEN_FILE=str(path)),
                              ["exec", "--", sys.executable, "-c", "print('ran')"])
    assert refreshed[0] == 0 and sorted(os.listdir(str(tmp_path)))[:2] != []
    assert [code for code, _, _ in again] == [0, 0] and "Token file:    {}\n".format(path) in again[1][1]
    assert executed.returncode == 0 and executed.stdout == b"ran\n"


def test_two_logins_at_once_for_two_backends_both_end_stored_and_for_one_one_is_kept(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as a, StandInGlean() as b:
        both = threading.Barrier(2)
        for glean in (a, b):
            glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
            glean.overrides["/oauth/token"] = lambda request, glean=glean: (both.wait(RUN_TIMEOUT), glean.token(
                request))[1]  # both sign-ins reach the token endpoint, then both write at once
        flows = queue.Queue()
        threads = [threading.Thread(target=lambda glean=glean: flows.put(run_flow(
            glean, ["login", "--token-file", str(path)], process=True))) for glean in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RUN_TIMEOUT)
        codes = [flows.get_nowait().code for _ in threads]
        tenants = glean_oauth.Tenants(glean_oauth.TokenStore(str(path)))
        stored_backends = sorted(tenants.backend_of(store) for store in tenants.files())
        a.overrides["/oauth/token"] = lambda request: (both.wait(RUN_TIMEOUT), a.token(request))[1]
        one = tmp_path / "one.json"
        threads = [threading.Thread(target=lambda: flows.put(run_flow(
            a, ["login", "--force", "--token-file", str(one)], process=True))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RUN_TIMEOUT)
        same = [flows.get_nowait() for _ in threads]
        kept = json.loads(one.read_text())["refresh_token"]
        live = set(a.refresh_tokens)
    assert codes == [0, 0] and stored_backends == sorted([a.url, b.url])
    assert [flow.code for flow in same] == [0, 0]
    assert sum("Another sign-in for {} saved its tokens while this one ran; this one's replaced them, and its refresh "
               "token was revoked.".format(a.url) in flow.stderr for flow in same) == 1
    assert kept in live and len(live & {issued["refresh_token"] for issued in a.issued[-2:]}) == 1


def test_a_tenants_file_name_stays_short_and_a_store_name_too_long_is_refused_before_any_request(tmp_path):
    tenants = glean_oauth.Tenants(glean_oauth.TokenStore(str(tmp_path / "tokens.json")))
    long_backend = "https://" + "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + ".example"
    name = os.path.basename(tenants.tenant_file_name(long_backend))
    assert len(name) < 80 and name != os.path.basename(tenants.tenant_file_name(long_backend.replace("d", "e")))
    assert tenants.tenant_file_name("https://acme-be.glean.com") != tenants.tenant_file_name("https://acme-be.glean.com:444")
    with StandInGlean() as glean:
        code, out, err = run_cli(good_environ(glean), ["login", "--token-file", str(tmp_path / ("t" * 250 + ".json"))])
    assert (code, out) == (2, "") and "its name is too long" in err and glean.requests == []


def test_a_store_that_names_no_backend_serves_none_that_is_named(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        saved = stored(glean, path)
        del saved["backend_url"]
        path.write_text(json.dumps(saved))
        os.chmod(str(path), 0o600)
        token = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["token", "--backend-url", "https://other-be.glean.com"])
        executed = run_script({"GLEAN_TOKEN_FILE": str(path), "GLEAN_SERVER_URL": "https://other-be.glean.com",
                               "PATH": os.environ["PATH"]}, ["exec", "--", "true"])
        unnamed = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["token"])
    assert token[0] == 3 and "are for no backend named, not for --backend-url https://other-be.glean.com" in token[2]
    assert executed.returncode == 3 and unnamed[0] == 0


def test_status_with_several_tenants_exits_with_the_worst_of_theirs(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as a, StandInGlean() as b:
        stored(a, path)
        b.issue_refresh_token = False
        stored(b, tenant_path(path, b), expires_at="2000-01-01T00:00:00Z")
        needs_sign_in = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["status"])
        if os.name == "posix":
            os.chmod(str(path), 0o666)
            refused = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["status"])
            assert refused[0] == 1 and "other users can change it" in refused[2]
    assert needs_sign_in[0] == 3 and len(needs_sign_in[1].splitlines()) == 2


def test_token_serves_a_valid_token_without_a_request_and_refreshes_an_expired_one(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        _, saved = signed_in(glean, path)
        cached = run_script(script_env(glean), ["token", "--token-file", str(path)])
        assert glean.requests == []  # still valid: no request at all
        expire(path)
        refreshed = run_script(script_env(glean), ["token", "--token-file", str(path)])
        assert glean.paths() == ["/oauth/token"]  # one request, to the stored endpoint: no discovery
    after = json.loads(path.read_text())
    assert (cached.returncode, cached.stdout, cached.stderr) == (0, saved["access_token"].encode() + b"\n", b"")
    assert refreshed.returncode == 0 and refreshed.stderr == b""
    assert refreshed.stdout == after["access_token"].encode() + b"\n" != cached.stdout
    assert after["refresh_token"] != saved["refresh_token"] and after["refresh_token"] in glean.refresh_tokens
    assert after["scope"] == "chat offline_access" and after["backend_url"] == glean.url


def test_status_shows_who_and_until_when_and_never_a_token(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        _, saved = signed_in(glean, path)
        shown = run_script(script_env(glean), ["status", "--token-file", str(path)])
        shown_json = run_script(script_env(glean), ["status", "--json", "--token-file", str(path)])
    text = shown.stdout.decode()
    assert shown.returncode == 0 and saved["access_token"] not in text and saved["refresh_token"] not in text
    assert "Signed in as:  demo.user@example.com\n" in text and "Scopes:        chat offline_access\n" in text
    assert "Refresh token: present; renews with the secret from CLIENT_SECRET\n" in text
    assert "Backend:       {}\n".format(glean.url) in text
    status_json = json.loads(shown_json.stdout)["tenants"][0]
    assert status_json["user"] == "demo.user@example.com" and 3500 < status_json["expires_in"] <= 3600
    assert saved["access_token"] not in shown_json.stdout.decode()


def test_exec_hands_the_token_and_the_backend_to_the_command_in_its_environment_only(tmp_path):
    path = tmp_path / "tokens.json"
    child = "import os, sys; print(os.environ['GLEAN_API_TOKEN']); print(os.environ['GLEAN_SERVER_URL']); " \
            "print(open('/proc/self/cmdline').read() if os.path.exists('/proc/self/cmdline') else sys.argv)"
    with StandInGlean() as glean:
        _, saved = signed_in(glean, path)
        ran = run_script(script_env(glean), ["exec", "--token-file", str(path), "--", sys.executable, "-c", child])
    lines = ran.stdout.decode().splitlines()
    assert ran.returncode == 0, ran.stderr
    assert lines[:2] == [saved["access_token"], glean.url]
    assert saved["access_token"] not in lines[2]  # the command line ps would show


def test_logout_revokes_the_refresh_token_first_then_deletes_the_store(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        _, saved = signed_in(glean, path)
        out = run_script(script_env(glean), ["logout", "--token-file", str(path)])
    assert out.returncode == 0, out.stderr
    assert glean.revoked == [("refresh_token", saved["refresh_token"]), ("access_token", saved["access_token"])]
    assert not path.exists() and glean.refresh_tokens == set()
    assert out.stderr.decode() == "At {}/oauth/revoke: refresh token revoked; access token revoked.\nDeleted " \
                                  "{}.\n".format(glean.url, path)


def test_exec_hands_on_a_token_with_five_minutes_left_at_least(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path)
        expire(path, seconds_left=200)  # enough for `token` (60 s), not for a program `exec` starts
        glean.requests.clear()
        token = run_script(script_env(glean), ["token", "--token-file", str(path)])
        assert glean.requests == []
        ran = run_script(script_env(glean), ["exec", "--token-file", str(path), "--", sys.executable, "-c", "pass"])
    assert token.returncode == ran.returncode == 0
    assert glean.paths() == ["/oauth/token"]  # exec refreshed first
    assert "--min-valid SECONDS" in run_script({"PATH": os.environ.get("PATH", "")}, ["exec", "--help"]).stdout.decode()


def test_the_backend_named_by_glean_server_url_must_be_the_stored_one(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path)
        other = run_script(script_env(glean, GLEAN_BACKEND_URL=None, GLEAN_SERVER_URL="https://other-be.glean.com"),
                           ["token", "--token-file", str(path)])
        same = run_script(script_env(glean, GLEAN_BACKEND_URL=None, GLEAN_SERVER_URL=glean.url + "/"),
                          ["token", "--token-file", str(path)])
    assert other.returncode == 3 and other.stderr.decode().startswith(
        "The tokens at {} are for {}, not for GLEAN_SERVER_URL https://other-be.glean.com.".format(path, glean.url))
    assert same.returncode == 0


def test_exec_passes_the_exit_code_and_needs_a_command(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        login(glean, path)
        failed = run_script(script_env(glean), ["exec", "--token-file", str(path), sys.executable, "-c",
                                                "raise SystemExit(7)"])
        missing = run_script(script_env(glean), ["exec", "--token-file", str(path)])
        absent = run_script(script_env(glean), ["exec", "--token-file", str(path), "--", "no-such-program-here"])
    assert failed.returncode == 7
    assert (missing.returncode, missing.stderr) == (2, b"exec needs a command: glean_oauth.py exec -- CMD [ARGS...]\n")
    assert absent.returncode == 127 and absent.stderr.startswith(b"Cannot run no-such-program-here: ")


def test_token_header_and_json(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        login(glean, path, ["--scope", "chat offline_access"])
        header = run_script(script_env(glean), ["token", "--header", "--token-file", str(path)])
        as_json = run_script(script_env(glean), ["token", "--json", "--token-file", str(path)])
    saved = json.loads(path.read_text())
    assert header.stdout.decode() == "Authorization: Bearer {}\n".format(saved["access_token"])
    assert json.loads(as_json.stdout) == {"access_token": saved["access_token"], "token_type": "Bearer",
                                          "expires_at": saved["expires_at"], "scope": "chat offline_access"}


def test_token_formats_for_curl_mcp_hosts_and_shells(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        saved = stored(glean, path)
        outputs = {name: run_script(script_env(glean), ["token", "--format", name, "--token-file", str(path)])
                   for name in ("raw", "header", "json", "headers-json", "curl", "env")}
    token = saved["access_token"]
    assert all(proc.returncode == 0 and proc.stderr == b"" for proc in outputs.values())
    text = {name: proc.stdout.decode() for name, proc in outputs.items()}
    assert text["raw"] == token + "\n" and text["header"] == "Authorization: Bearer {}\n".format(token)
    as_json = json.loads(text["json"])
    assert as_json["access_token"] == token and as_json["expires_on"] == glean_oauth.parse_iso_time(saved["expires_at"])
    assert 3500 < as_json["expires_in"] <= 3600
    assert json.loads(text["headers-json"]) == {"Authorization": "Bearer " + token}
    assert text["curl"] == 'header = "Authorization: Bearer {}"\n'.format(token)
    assert text["env"] == "export GLEAN_API_TOKEN='{}'\nexport GLEAN_SERVER_URL='{}'\n".format(token, glean.url)
    if os.name == "posix":  # what eval of it sets, in a shell
        shell = subprocess.run(["/bin/sh", "-c", 'eval "$(cat)"; printf "%s\\n%s\\n" "$GLEAN_API_TOKEN" '
                                '"$GLEAN_SERVER_URL"'], input=outputs["env"].stdout, stdout=subprocess.PIPE)
        assert shell.stdout.decode() == "{}\n{}\n".format(token, glean.url)


@skip_if(not shutil.which("curl"), "no curl on this machine")
def test_curl_reads_the_token_from_its_config_on_stdin(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        saved = stored(glean, path, scope="chat")
        config = run_script(script_env(glean), ["token", "--format", "curl", "--token-file", str(path)]).stdout
        curl = subprocess.run(["curl", "-sS", "-o", os.devnull, "-w", "%{http_code}", "-K", "-", "-H",
                               "Content-Type: application/json", "-d", '{"messages":[{"fragments":[{"text":"hi"}]}]}',
                               glean.url + "/rest/api/v1/chat"], input=config, stdout=subprocess.PIPE,
                              timeout=RUN_TIMEOUT)
    assert curl.stdout == b"200"  # the token came through stdin, on no command line
    assert glean.find("/rest/api/v1/chat")[0].headers["Authorization"] == "Bearer " + saved["access_token"]


def test_min_valid_refreshes_a_token_that_expires_soon(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        login(glean, path)
        expire(path, 600)
        glean.requests.clear()
        kept = run_script(script_env(glean), ["token", "--token-file", str(path)])  # 600 s left > 60
        assert glean.requests == []
        renewed = run_script(script_env(glean), ["token", "--min-valid", "900", "--token-file", str(path)])
    assert kept.stdout != renewed.stdout and glean.paths() == ["/oauth/token"]


def test_a_refused_refresh_token_is_recorded_and_everything_says_sign_in_until_login(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        login(glean, path)
        expire(path)
        forgotten = saved_refresh_token(path)
        glean.refresh_tokens.clear()  # the server forgot it (or revoked the sign-in)
        glean.requests.clear()
        refused = run_script(script_env(glean), ["token", "--token-file", str(path)])
        assert glean.presented_refresh_tokens == [forgotten]  # sent once
        saved = json.loads(path.read_text())
        expire(path, 3000)  # even while the stored access token has not expired
        again = run_script(script_env(glean), ["token", "--token-file", str(path)])
        with pytest.raises(glean_oauth.SignInNeeded):
            glean_oauth.TokenProvider(str(path), environ=good_environ(glean))()
        bare = run_script(script_env(glean), ["--refresh", "--token-file", str(path)])  # the bare command's --refresh
        assert bare.returncode == 3 and b"the sign-in is spent" in bare.stderr
        assert glean.presented_refresh_tokens == [forgotten] and glean.paths() == ["/oauth/token"]  # nothing more
        status = run_script(script_env(glean), ["status", "--token-file", str(path)])
        _, checks, _ = doctor(glean, path)
        relogin = login(glean, path)  # no --force: a spent sign-in never "serves"
        after = [run_script(script_env(glean), [command, "--token-file", str(path)]).returncode
                 for command in ("token", "status")]
    assert refused.returncode == 3 and refused.stdout == b""
    assert refused.stderr.decode() == "The refresh token was refused (token request failed (400): invalid_grant: " \
                                      "unknown refresh token). Sign in with: python3 glean_oauth.py login " \
                                      "--token-file {}\n".format(path)
    assert saved["refresh_refused"] == "token request failed (400): invalid_grant: unknown refresh token"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", saved["refresh_refused_at"])
    assert again.returncode == 3 and again.stdout == b"" and again.stderr.decode().startswith(
        "The refresh token at {} was refused at {} (token request failed (400): invalid_grant: unknown refresh "
        "token): the sign-in is spent. Sign in with: ".format(path, saved["refresh_refused_at"]))
    assert status.returncode == 3 and "Refresh token: refused at " in status.stdout.decode()
    assert checks["refresh_token"][0] == "fail" and checks["access_token"][0] == "fail"
    assert relogin.code == 0 and after == [0, 0] and "refresh_refused_at" not in json.loads(path.read_text())


@parametrize("args, env, message", [
    (["token"], {}, "No tokens are stored at {path}. Sign in with: python3 glean_oauth.py login --token-file {path}"),
    (["status"], {}, "No tokens are stored at {path}. Sign in with: python3 glean_oauth.py login --token-file {path}"),
    (["token"], {"stored": True, "GLEAN_BACKEND_URL": "https://other-be.glean.com"},
     "The tokens at {path} are for {url}, not for GLEAN_BACKEND_URL https://other-be.glean.com. Sign in with: "
     "python3 glean_oauth.py login --token-file {path}"),
    (["token"], {"stored": True, "expired": True, "CLIENT_SECRET": None},
     "Set CLIENT_SECRET or CLIENT_SECRET_FILE: the client stand-in-client authenticates with client_secret_post, "
     "and its secret was not kept at login (keep it with: python3 glean_oauth.py login --save-secret --token-file "
     "{path})."),
])
def test_token_says_what_is_needed(tmp_path, args, env, message):
    path = tmp_path / "tokens.json"
    env = dict(env)
    with StandInGlean() as glean:
        if env.pop("stored", False):
            login(glean, path)
        if env.pop("expired", False):
            expire(path)
        glean.requests.clear()
        proc = run_script(script_env(glean, **env), args + ["--token-file", str(path)])
    assert proc.returncode == (2 if "CLIENT_SECRET" in message else 3)
    assert proc.stderr.decode() == message.format(path=path, url=glean.url) + "\n"
    assert glean.requests == []


def test_logout_without_a_revocation_endpoint_says_the_token_lives_on(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        login(glean, path)
        glean.requests.clear()
        proc = run_script(script_env(glean, CLIENT_SECRET=None), ["logout", "--token-file", str(path)])
        again = run_script(script_env(glean), ["logout", "--token-file", str(path)])
    assert proc.returncode == 0 and glean.requests == [] and not path.exists()
    assert proc.stderr.decode() == "The server advertises no revocation endpoint, so the tokens were " \
        "not revoked there: the refresh token stays valid until it expires or you remove the app in Glean's " \
        "settings.\nDeleted {}.\n".format(path)
    assert again.stderr.decode() == "Nothing is stored at {}; nothing to do.\n".format(path)


def test_login_says_what_was_not_granted_and_what_no_refresh_token_means(tmp_path):
    with StandInGlean() as glean:
        glean.issue_refresh_token = False
        flow = login(glean, tmp_path / "tokens.json")
        glean.issue_refresh_token = True
        glean.grant = lambda asked: "chat"  # the server grants less than asked
        fewer = login(glean, tmp_path / "fewer.json", ["--scope", "chat search offline_access"])
    assert flow.code == 0
    assert "\nNo refresh token came back, so `token` can serve this one only until it expires: you will sign in " \
        "again in about 59 min. Glean issues a refresh token when the offline_access scope is requested (--scope).\n" \
        in flow.stderr
    assert fewer.code == 0 and "\nNot granted: search (asked for chat search offline_access): what needs it will be " \
        "refused. A Glean admin can give the static client that scope.\n" in fewer.stderr  # no offline_access, a refresh token


def test_token_provider_serves_from_the_store_and_refreshes_when_needed(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        signed_in_and_expired(glean, path)
        provider = glean_oauth.TokenProvider(str(path), environ=good_environ(glean))
        first, second = provider(), provider()
        assert glean.paths() == ["/oauth/token"]  # the second call made no request
    assert first == second == json.loads(path.read_text())["access_token"]
    glean.refresh_tokens.clear()
    with pytest.raises(glean_oauth.SignInNeeded):
        glean_oauth.TokenProvider(str(tmp_path / "none.json"), environ={})()


def test_logout_says_what_the_server_did_with_each_token(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
        glean.refuse_access_token_revocation = True
        saved = stored(glean, path)
        code, _, err = run_cli(good_environ(glean), ["logout", "--token-file", str(path)])
    until = time.strftime("%H:%M UTC", time.gmtime(glean_oauth.parse_iso_time(saved["expires_at"])))
    assert code == 0 and not path.exists()
    assert err == "At {}/oauth/revoke: refresh token revoked; the server refused to revoke the access token " \
                  "(unsupported_token_type): it stays valid until {}.\nDeleted {}.\n".format(glean.url, until, path)


@parametrize("break_it, said", [
    (lambda glean, path: path.write_text("{not json"), "The token file {path} cannot be used: it is not JSON"),
    (lambda glean, path: None, "Set CLIENT_SECRET or CLIENT_SECRET_FILE"),
    (lambda glean, path: glean.overrides.update({"/oauth/revoke": (503, {}, "down")}), "Revoking the refresh token "
                                                                                      "failed (503)"),
])
def test_logout_that_cannot_revoke_names_logout_local_which_forgets(tmp_path, break_it, said):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
        stored(glean, path)
        break_it(glean, path)
        env = good_environ(glean, CLIENT_SECRET=None) if "CLIENT_SECRET" in said else good_environ(glean)
        code, _, err = run_cli(env, ["logout", "--token-file", str(path)])
        assert code in (1, 2) and path.exists()
        assert err.startswith(said.format(path=path))
        assert err.endswith("python3 glean_oauth.py logout --local --token-file {}\n".format(path))
        local = run_cli(env, ["logout", "--local", "--token-file", str(path)])
    assert local[0] == 0 and not path.exists()
    assert local[2].startswith("Deleted {}; nothing was revoked".format(path))


def test_hints_repeat_the_token_file_variable_in_use(tmp_path):
    path = tmp_path / "my tokens.json"
    code, _, err = run_cli({"GLEAN_TOKEN_FILE": str(path)}, ["token"])
    quote = '"' if os.name == "nt" else "'"  # as the platform's shell quotes
    assert (code, err) == (3, "No tokens are stored at {0}. Sign in with: GLEAN_TOKEN_FILE={1}{0}{1} python3 "
                              "glean_oauth.py login\n".format(path, quote))


@parametrize("state, code", [("valid", 0), ("renewable", 0), ("expired", 3), ("none", 3), ("corrupt", 1),
                              ("other backend", 3), ("no secret here", 2)])
def test_status_exit_codes_say_whether_a_sign_in_is_needed(tmp_path, state, code):
    path = tmp_path / "tokens.json"
    env = {"CLIENT_SECRET": CLIENT_SECRET} if state == "renewable" else {}
    with StandInGlean() as glean:
        if state != "none":
            stored(glean, path)
        if state in ("renewable", "expired", "no secret here"):
            expire(path)
        if state == "expired":
            saved = json.loads(path.read_text())
            del saved["refresh_token"]
            path.write_text(json.dumps(saved))
        if state == "corrupt":
            path.write_text("[")
        if state == "other backend":
            env["GLEAN_BACKEND_URL"] = "https://other-be.glean.com"
        result = run_cli(env, ["status", "--token-file", str(path)])
    assert result[0] == code, result
    if state == "no secret here":
        assert result[2].startswith("The access token has expired, and its refresh token needs the client secret, "
                                    "which is not here: set CLIENT_SECRET or CLIENT_SECRET_FILE, or keep it with: ")
    if state == "other backend":  # what is stored is still shown
        assert "Backend:       {}\n".format(glean.url) in result[1]
        assert result[2].startswith("GLEAN_BACKEND_URL names https://other-be.glean.com, but these tokens are for ")


def test_token_prints_the_token_as_it_is_whatever_the_secret(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean(client_secret="e") as glean:  # a secret too short to redact: never shreds the token
        saved = stored(glean, path)
        code, out, _ = run_cli(good_environ(glean), ["token", "--token-file", str(path)])
        json_code, json_out, _ = run_cli(good_environ(glean), ["token", "--json", "--token-file", str(path)])
    assert (code, out) == (0, saved["access_token"] + "\n")
    assert json.loads(json_out)["access_token"] == saved["access_token"] and json_code == 0


def test_a_stored_token_that_holds_the_secret_is_refused(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, access_token="abc" + CLIENT_SECRET + "xyz")
        code, out, err = run_cli(good_environ(glean), ["token", "--token-file", str(path)])
    assert (code, out, err) == (1, "", "The stored access token holds the client secret; not printing it.\n")


def test_a_token_with_a_line_end_is_no_bearer_token(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, access_token="abc\n")
        code, out, err = run_cli(good_environ(glean), ["token", "--token-file", str(path)])
    assert (code, out) == (3, "") and err.startswith("The token file {} holds no usable access token.".format(path))


@parametrize("command, code, said", [
    ([""], 2, "exec needs a command"),
    (["/nonexistent/program"], 127, "Cannot run /nonexistent/program: not found."),
    (["{not_executable}"], 126, "Cannot run {not_executable}: Permission denied."),
])
@posix_only(SHELL)
def test_exec_says_why_a_command_cannot_run_with_the_shells_codes(tmp_path, command, code, said):
    path = tmp_path / "tokens.json"
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("echo hi\n")
    with StandInGlean() as glean:
        stored(glean, path)
        argv = [part.format(not_executable=not_executable) for part in command]
        proc = run_script(script_env(glean), ["exec", "--token-file", str(path), "--"] + argv)
    assert proc.returncode == code
    assert proc.stderr.decode().startswith(said.format(not_executable=not_executable))


def test_exec_gives_the_child_no_secret_and_no_refresh_token(tmp_path):
    path, secret_file = tmp_path / "tokens.json", a_secret_file(tmp_path)
    with StandInGlean() as glean:
        stored(glean, path)
        proc = run_script(script_env(glean, REFRESH_TOKEN="rt-xyz", CLIENT_SECRET_FILE=str(secret_file)),
                          ["exec", "--token-file", str(path), "--", sys.executable, "-c",
                           "import os, json; print(json.dumps(sorted(os.environ)))"])
    names = json.loads(proc.stdout.decode())
    assert proc.returncode == 0 and "GLEAN_API_TOKEN" in names and "GLEAN_SERVER_URL" in names
    assert not {"CLIENT_SECRET", "CLIENT_SECRET_FILE", "REFRESH_TOKEN"} & set(names)


def test_server_and_store_text_stays_on_its_line(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        access_token = make_jwt({"alg": "RS256"}, {"email": "a@b.c\nToken response:\n{", "exp": time.time() + 3600})
        stored(glean, path, access_token=access_token, client_id="x\ny", scope="chat\nFAKE: line")
        code, out, _ = run_cli({}, ["status", "--token-file", str(path)])
        glean.answer = "Line one.\nToken response:\n{}"
        flow = run_flow(glean)
    assert code == 0
    assert "Signed in as:  a@b.c Token response: {\n" in out and "Client:        x y\n" in out
    assert "Scopes:        chat FAKE: line\n" in out and len(out.splitlines()) == 8
    assert "\nAnswer: Line one.\n  Token response:\n  {}\n" in flow.stderr


def test_token_provider_names_its_server_and_refreshes_once_after_invalidate(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path)
        provider = glean_oauth.TokenProvider(str(path), environ=good_environ(glean))
        provider.invalidate()  # before any call: nothing to drop
        first = provider()
        assert provider.server_url == glean.url and glean.requests == []
        provider.invalidate()  # the server answered 401 to `first`
        second, third = provider(), provider()
        assert glean.paths() == ["/oauth/token"] and first != second == third
        provider.invalidate()
        glean.requests.clear()
        renewed = run_script(script_env(glean), ["token", "--min-valid", "99999", "--token-file", str(path)])
        assert glean.paths() == ["/oauth/token"]  # another process refreshed meanwhile
        assert provider() == renewed.stdout.decode().strip() and glean.paths() == ["/oauth/token"]  # no second one


def test_token_provider_refreshes_once_for_all_the_threads_that_wait(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, expires_at="2000-01-01T00:00:00Z")
        entered, release = held(glean, path)  # a token endpoint that never answers in time
        provider = glean_oauth.TokenProvider(str(path), environ=good_environ(glean, GLEAN_HTTP_TIMEOUT="0.5"))
        outcomes = queue.Queue()

        def call():
            try:
                outcomes.put(provider())
            except glean_oauth.FlowError as error:
                outcomes.put(error)
        started = time.monotonic()
        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RUN_TIMEOUT)
        elapsed = time.monotonic() - started
        release.set()
    errors = [outcomes.get_nowait() for _ in threads]
    assert all(isinstance(error, glean_oauth.FlowError) and "no answer in time" in str(error) for error in errors)
    assert len(glean.find("/oauth/token")) == 1 and elapsed < 0.5 + 1.5, elapsed


def test_a_token_refused_by_many_threads_costs_one_refresh(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path)
        provider = glean_oauth.TokenProvider(str(path), environ=good_environ(glean))
        refused = provider()
        start, served = threading.Barrier(16), queue.Queue()

        def on_401():  # each thread's request was answered 401: it says so, and asks again
            start.wait(RUN_TIMEOUT)
            provider.invalidate(refused)
            served.put(provider())
        threads = [threading.Thread(target=on_401) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RUN_TIMEOUT)
        provider.invalidate(refused)  # a 401 that arrives late, for a token already replaced
        assert provider() == served.get_nowait()
    assert glean.paths() == ["/oauth/token"]
    assert {served.get_nowait() for _ in range(15)} == {provider.tokens["access_token"]} != {refused}


@skip_if(not hasattr(os, "fork"), "no fork() on this platform")
def test_a_fork_during_a_refresh_lets_go_of_the_lock_and_the_flight(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, expires_at="2000-01-01T00:00:00Z")
        entered, release = held(glean, path)
        provider = glean_oauth.TokenProvider(str(path), environ=good_environ(glean))
        outcome = queue.Queue()
        threading.Thread(target=lambda: outcome.put(provider()), daemon=True).start()
        assert entered.wait(RUN_TIMEOUT)  # a refresh in flight, the store's lock held
        said, told = os.pipe(), os.pipe()  # the child says its token; nothing is told it: it waits to be killed
        child = os.fork()
        if child == 0:  # a pre-forking server's worker: its first call must return
            try:
                os.write(said[1], provider().encode())
                os.read(told[0], 1)  # alive until the parent has refreshed once more, and kills it
            finally:
                os._exit(0)
        try:
            release.set()
            parents = outcome.get(timeout=RUN_TIMEOUT)
            import select

            childs = os.read(said[0], 4096).decode() if select.select([said[0]], [], [], RUN_TIMEOUT)[0] else None
            glean.overrides.pop("/oauth/token")
            expire(path)
            started = time.monotonic()  # another process refreshes while the child lives
            other = start(glean, ["token", "--token-file", str(path)], GLEAN_HTTP_TIMEOUT="2")
            out, err = (stream.decode() for stream in other.communicate(timeout=RUN_TIMEOUT))
            code, elapsed = other.returncode, time.monotonic() - started
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    assert childs == parents  # the child waited for the store, not for a flight no thread of its will finish
    assert (code, err) == (0, "") and out.strip() not in (parents, "") and elapsed < 2, elapsed


@posix_only(MODES)
def test_client_secret_file_serves_unattended_refreshes(tmp_path):
    path, secret_file = tmp_path / "tokens.json", a_secret_file(tmp_path)
    with StandInGlean() as glean:
        stored(glean, path, expires_at="2000-01-01T00:00:00Z")
        env = good_environ(glean, CLIENT_SECRET=None, CLIENT_SECRET_FILE=str(secret_file))
        code, out, _ = run_cli(env, ["token", "--token-file", str(path)])
        first = json.loads(path.read_text())["access_token"]
        flag = run_cli(good_environ(glean, CLIENT_SECRET=None), ["token", "--min-valid", "99999", "--client-secret-file",
                                                                 str(secret_file), "--token-file", str(path)])
        secret_file.chmod(0o644)
        warned = run_cli(env, ["token", "--min-valid", "99999", "--token-file", str(path)])
        secret_file.chmod(0o666)
        refused = run_cli(env, ["token", "--min-valid", "99999", "--token-file", str(path)])
    assert code == 0 and out.strip() == first
    assert flag[0] == 0 and warned[0] == 0
    assert "Other users can read the client secret file {}".format(secret_file) in warned[2]
    assert refused[0] == 2 and refused[2].startswith("Not using the client secret file {}: other users can change "
                                                     "it".format(secret_file))
    assert CLIENT_SECRET not in path.read_text()


def test_importing_the_module_has_no_side_effects():
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, {!r}); import glean_oauth; "
                           "print(sorted(m for m in ('ssl', 'http.client', 'urllib.request', 'socket') "
                           "if m in sys.modules))".format(HERE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert (proc.stdout.strip(), proc.stderr) == (b"[]", b"")


def test_a_valid_token_imports_no_network_module(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        login(glean, path)
    proc = subprocess.run([sys.executable, "-X", "importtime", SCRIPT, "token", "--token-file", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": os.environ["PATH"]})
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()}
    assert proc.returncode == 0
    assert imported & {"ssl", "http.client", "urllib.request", "socket", "select"} == set()


def lifecycle_scenario(python, folder):
    path = pathlib.Path(folder) / "tokens.json"
    with StandInGlean() as glean:
        glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
        glean.signing_alg = "ES256"  # the curve arithmetic, on each Python
        signed_in = login(glean, path, ["--scope", "chat offline_access"], python=python)
        expire(path)
        token = run_script(script_env(glean), ["token", "--token-file", str(path)], python=python)
        ran = run_script(script_env(glean), ["exec", "--token-file", str(path), "--", python, "-c",
                                             "import os; print(os.environ['GLEAN_API_TOKEN'])"], python=python)
        shown = run_script(script_env(glean), ["status", "--token-file", str(path)], python=python)
        # doctor: its HTTP, its platform facts and the ES256 check of the stored token's signature.
        diagnosed = run_script(script_env(glean), ["doctor", "--json", "--token-file", str(path)], python=python)
        out = run_script(script_env(glean), ["logout", "--token-file", str(path)], python=python)
    return glean, path.exists(), signed_in, token, ran, shown, out, diagnosed


@parametrize("version", PYTHONS)
def test_login_token_exec_doctor_on_every_python(version):
    glean, stored, signed_in, token, ran, shown, out, diagnosed = on_every_python(lifecycle_scenario, version)
    assert signed_in.code == 0, signed_in.run.output()
    assert token.returncode == 0 and token.stdout == ran.stdout, token.stderr + ran.stderr
    assert shown.returncode == 0 and out.returncode == 0 and not stored
    assert len(glean.revoked) == 2
    assert diagnosed.returncode == 0, diagnosed.stdout + diagnosed.stderr
    checks = json.loads(diagnosed.stdout.decode())["checks"]
    assert [c["status"] for c in checks] == ["ok"] * 17
    assert checks[-1]["detail"].startswith('valid (ES256, key "p256-1" from ')


def test_a_failed_revocation_keeps_the_tokens(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.metadata_extra["revocation_endpoint"] = glean.url + "/oauth/revoke"
        login(glean, path)
        glean.overrides["/oauth/revoke"] = (503, {}, "down for maintenance\n")
        proc = run_script(script_env(glean), ["logout", "--token-file", str(path)])
    assert proc.returncode == 1 and path.exists()
    assert proc.stderr.decode() == "Revoking the refresh token failed (503): down for maintenance. The tokens were " \
                                   "kept; try again. To forget the tokens without revoking them: python3 " \
                                   "glean_oauth.py logout --local --token-file {}\n".format(path)


def test_status_of_a_token_with_an_absurd_expiry():
    token = make_jwt({"alg": "none"}, {"sub": "u", "exp": 1e20})
    info = glean_oauth.status_of({"access_token": token}, glean_oauth.TokenStore("/x"), time.time(), {})
    assert info["expires_at"] is None and info["user"] == "u"
    assert glean_oauth.valid_for({"access_token": token}, 60, time.time())  # unknown counts as valid


# --- Diagnosis: doctor, inspect, --verify and the clock -----------------------------------


def doctor(glean, path=None, args=(), **env):
    """`doctor --json` in this process, with the store `path` (default: one not made yet, never
    the user's own); returns (exit code, {check: (status, detail, fix)}, the whole output)."""
    path = path or os.path.join(tempfile.mkdtemp(), "tokens.json")
    code, out, err = run_cli(good_environ(glean, **env), ["doctor", "--json", "--token-file", str(path)] + list(args))
    checks = json.loads(out)["checks"]
    assert [check["check"] for check in checks] == list(glean_oauth.DOCTOR_CHECKS) + list(
        glean_oauth.PROBE_CHECKS if "--probe" in args else ())
    for check in checks:  # every fail and warn says what to do; a skipped check names the one to fix
        assert bool(check["fix"]) == (check["status"] in ("warn", "fail")), check
    return code, {check["check"]: (check["status"], check["detail"], check["fix"]) for check in checks}, out + err


def test_doctor_on_a_healthy_setup_passes_every_check_and_shows_no_token_code_or_secret(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        assert login(glean, path, ["--scope", "chat offline_access"]).code == 0
        authorization_code = glean.find("/oauth/token")[0].form["code"][0]
        saved = json.loads(path.read_text())
        glean.requests.clear()
        code, checks, output = doctor(glean, path)
        text_code, text, err = run_cli(good_environ(glean), ["doctor", "--token-file", str(path)])
    assert code == 0 and text_code == 0, output
    assert [name for name, (status, _, _) in checks.items() if status != "ok"] == []
    assert glean.paths() == [glean_oauth.METADATA_PATH, "/oauth/jwks"] * 2  # no sign-in, no refresh
    for value in (saved["access_token"], saved["refresh_token"], CLIENT_SECRET, authorization_code):
        assert value not in output + text
    assert checks["signature"][1] == 'valid (RS256, key "rsa-1" from {}/oauth/jwks)'.format(glean.url)
    assert checks["metadata"][1] == "served by {}{}".format(glean.url, glean_oauth.METADATA_PATH)
    assert checks["client_secret"][1] == "set (CLIENT_SECRET; never shown)"
    # The text form: a block to paste as it is, the facts a support ticket needs on top.
    head = text.splitlines()
    assert [line.split(":")[0] for line in head[1:5]] == ["Version", "Python", "OS", "Time"]
    assert re.match(r"Time: +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", head[4])
    assert "ok    signature      valid (RS256" in text and text.endswith("\n17 checks: 17 ok, 0 warn, 0 fail, 0 skipped\n")


def test_doctor_works_before_login_and_without_the_secret(tmp_path):
    with StandInGlean() as glean:
        code, checks, output = doctor(glean, tmp_path / "tokens.json", CLIENT_SECRET=None)
    assert code == 0, output
    assert checks["client_secret"][:2] == ("warn", "not set: login, a refresh and logout need it")
    assert checks["token_store"][0] == "warn" and "login" in checks["token_store"][2]
    assert [checks[name] for name in ("scopes", "access_token", "refresh_token", "signature")] == [
        ("skip", "not checked: needs the token_store check", "")] * 3 + [
        ("skip", "not checked: needs the access_token check", "")]
    assert checks["metadata"][0] == checks["clock"][0] == "ok"


def test_doctor_says_the_authorization_server_may_be_off_when_both_metadata_urls_answer_404():
    with StandInGlean() as glean:
        for path in (glean_oauth.METADATA_PATH, glean_oauth.METADATA_PATH + "/oauth"):
            glean.overrides[path] = (404, {}, "not found\n")
        code, checks, output = doctor(glean)
    assert code == 1
    status, detail, fix = checks["metadata"]
    assert status == "fail" and "both answered 404: the tenant's OAuth authorization server may be turned off" in detail
    assert "Ask a Glean admin" in fix
    # What needs the metadata is skipped, naming the check to fix; no warn, no fix of its own.
    assert checks["issuer"] == checks["pkce"] == checks["auth_method"] == (
        "skip", "not checked: needs the metadata check", "")


def test_doctor_names_a_port_in_use_and_what_to_do():
    with StandInGlean() as glean, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, checks, _ = doctor(glean, REDIRECT_URI="http://127.0.0.1:{}/oauth/callback".format(port))
    assert code == 1
    status, detail, fix = checks["redirect_uri"]
    assert status == "fail" and "Port {} on 127.0.0.1 is already in use".format(port) in detail
    assert "REDIRECT_URI" in fix


@parametrize("skew, status, words", [(600, "fail", "600 s behind"), (-600, "fail", "600 s ahead of"),
                                      (120, "warn", "120 s behind"), (0, "ok", "within")])
def test_doctor_compares_the_clock_with_the_servers_date(skew, status, words):
    with StandInGlean() as glean:
        glean.date_skew = skew
        code, checks, _ = doctor(glean)
    assert checks["clock"][0] == status and re.search(words.replace("600", "(599|600|601)").replace(
        "120", "(119|120|121)"), checks["clock"][1]), checks["clock"]
    assert code == (1 if status == "fail" else 0)


def test_doctor_fails_an_expired_store_without_a_refresh_token(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.issue_refresh_token = False
        stored(glean, path, scope="chat")
        expire(path, -120)
        code, checks, _ = doctor(glean, path)
        glean.issue_refresh_token = True
        stored(glean, path, scope="chat")
        expire(path, -120)
        renewable_code, renewable, _ = doctor(glean, path)
    assert code == 1 and checks["access_token"][0] == "fail" and "no refresh token" in checks["access_token"][1]
    assert checks["refresh_token"][0] == "warn"
    assert renewable_code == 0 and renewable["access_token"][0] == "warn" and renewable["refresh_token"][0] == "ok"


def test_doctor_warns_of_what_is_not_glean_shaped_or_unsafe(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.metadata_extra.update(issuer=glean.url, code_challenge_methods_supported=None)
        stored(glean, path, scope="search offline_access")
        os.chmod(str(path), 0o644)
        code, checks, _ = doctor(glean, path)
    assert code == 0
    assert checks["issuer"][0] == "warn" and "not {}/oauth".format(glean.url) in checks["issuer"][1]
    assert checks["pkce"][0] == "warn"
    assert checks["scopes"][:2] == ("warn", "granted: search offline_access; requested: search offline_access "
                                            "(chat: no, offline_access: yes)")
    if os.name == "posix":
        assert checks["token_store"][0] == "warn" and "other users can read it" in checks["token_store"][1]


def test_doctor_fails_a_stored_token_its_issuers_keys_do_not_verify(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, scope="chat offline_access")
        glean.overrides["/oauth/jwks"] = (200, {}, {"keys": [dict(public(stand_in_key("ES256")[1]), kid="rsa-1")]})
        code, checks, _ = doctor(glean, path)
    assert code == 1
    assert checks["signature"][:2] == ("fail", 'INVALID (key "rsa-1" is an EC key, and RS256 needs an RSA key)')


def test_doctor_names_the_proxy_without_its_password_and_the_ca_it_trusts(monkeypatch, tmp_path):
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pa55word@127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    glean_oauth._tls_context.cache_clear()
    code, out, err = run_cli({"CLIENT_ID": CLIENT_ID, "GLEAN_BACKEND_URL": "https://acme-be.glean.com",
                              "GLEAN_TOKEN_FILE": str(tmp_path / "tokens.json")}, ["doctor"])
    checks = {line.split()[1]: line for line in out.splitlines() if line[:5].strip() in ("ok", "warn", "fail", "skip")}
    assert "pa55word" not in out + err and "user" not in checks["proxy"]
    assert checks["proxy"].split(None, 2)[2] == "127.0.0.1:9 (HTTPS_PROXY), tunnelled with CONNECT"
    assert checks["metadata"].startswith("fail") and "Cannot reach the proxy 127.0.0.1:9" in checks["metadata"]
    assert checks["tls"].startswith("skip") and "trusted CAs from" in checks["tls"]
    monkeypatch.setenv("NO_PROXY", "acme-be.glean.com")
    doctor = glean_oauth.Doctor(glean_oauth.parse_args("doctor", []), {}, None)
    doctor.backend = "https://acme-be.glean.com"
    assert doctor.check("proxy")["detail"] == "none: NO_PROXY exempts acme-be.glean.com"
    assert code == 1


def test_doctor_says_where_trusted_cas_come_from_and_whether_the_certificate_verified(tmp_path):
    def checks(env):
        proc = run_script(script_env(glean, GLEAN_TOKEN_FILE=str(tmp_path / "tokens.json"), **env),
                          ["doctor", "--json"])
        return proc.returncode, {c["check"]: (c["status"], c["detail"]) for c in json.loads(proc.stdout)["checks"]}

    with StandInGlean(tls=True) as glean:
        trusted_code, trusted = checks({"SSL_CERT_FILE": certificate_file()})
        untrusted_code, untrusted = checks({"SSL_CERT_FILE": None, "SSL_CERT_DIR": tempfile.mkdtemp()})
    assert trusted_code == 0 and trusted["tls"][0] == "ok"
    assert trusted["tls"][1].startswith("the backend's certificate verified; trusted CAs from SSL_CERT_FILE {}, "
                                        "OpenSSL".format(certificate_file()))
    assert untrusted_code == 1 and untrusted["tls"][0] == "fail" and untrusted["metadata"][0] == "fail"
    assert untrusted["tls"][1].startswith("the backend's certificate is not trusted; trusted CAs from SSL_CERT_DIR")


def test_doctor_names_the_metadata_url_that_served_and_an_auth_method_not_offered():
    with StandInGlean() as glean:
        glean.overrides[glean_oauth.METADATA_PATH] = (404, {}, "not found\n")
        code, checks, _ = doctor(glean, args=["--auth-method", "none"])
    assert checks["metadata"][:2] == ("ok", "served by {}{}/oauth (the RFC 8414 path form; the root one answered "
                                            "404)".format(glean.url, glean_oauth.METADATA_PATH))
    assert code == 1 and checks["auth_method"][0] == "fail"
    assert checks["auth_method"][2] == "Choose one it offers with --auth-method (client_secret_post, client_secret_basic)."


def test_a_check_that_breaks_costs_no_other_check(monkeypatch):
    monkeypatch.setattr(glean_oauth.Doctor, "_issuer", lambda self: 1 / 0)
    with StandInGlean() as glean:
        code, checks, _ = doctor(glean)
    assert code == 1 and checks["issuer"][:2] == ("fail", "the check itself failed: ZeroDivisionError: division by zero")
    assert checks["pkce"][0] == checks["clock"][0] == "ok"  # the checks after it still ran


def test_doctor_says_where_each_setting_comes_from_and_what_is_missing(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        code, unset, _ = doctor(glean, path, CLIENT_ID=None, GLEAN_BACKEND_URL=None)
        stored(glean, path, scope="chat offline_access")
        _, from_store, _ = doctor(glean, path, CLIENT_ID=None, GLEAN_BACKEND_URL=None, CLIENT_SECRET=None)
        _, other, _ = doctor(glean, path, CLIENT_ID="another-client", REDIRECT_URI=None)
        _, public_client, _ = doctor(glean, path, args=["--auth-method", "none"], CLIENT_SECRET=None)
        _, two, _ = doctor(glean, path, GLEAN_SERVER_URL="https://elsewhere-be.glean.com")
    assert code == 1 and unset["client_id"] == ("fail", "not set", "Set CLIENT_ID to your static OAuth client's id, "
                                                                      "or give --client-id.")
    assert unset["backend_url"][:2] == ("fail", "not set") and unset["metadata"] == ("skip", "not checked: needs "
                                                                                             "the backend_url check", "")
    assert from_store["client_id"][:2] == ("ok", "{} (from the token store)".format(CLIENT_ID))
    assert from_store["backend_url"][:2] == ("ok", "{} (from the token store)".format(glean.url))
    assert other["client_id"][:2] == ("warn", "another-client (CLIENT_ID), but the stored tokens were issued to "
                                              "{}".format(CLIENT_ID))
    assert other["redirect_uri"][1] in ("http://127.0.0.1:9090/oauth/callback (loopback; port 9090 is free now)",
                                        "http://127.0.0.1:9090/oauth/callback: Port 9090 on 127.0.0.1 is already in "
                                        "use (another run of this script?)")
    assert public_client["client_secret"][:2] == ("ok", "not needed: the auth method is none")
    assert two["backend_url"][0] == "fail" and "name different backends" in two["backend_url"][1]


def test_doctor_says_what_the_stored_tokens_lack(tmp_path):
    path, nowhere = tmp_path / "tokens.json", "http://127.0.0.1:9"  # a port that refuses at once
    with StandInGlean() as glean:
        glean.opaque_tokens = True
        saved = stored(glean, path, scope="chat", backend_url=nowhere)
        path.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("expires_at", "scope")}))
        _, opaque, _ = doctor(glean, path, GLEAN_BACKEND_URL=nowhere)
        glean.opaque_tokens, glean.issue_refresh_token = False, False
        stored(glean, path, scope="chat", backend_url=nowhere)
        _, unreachable, _ = doctor(glean, path, GLEAN_BACKEND_URL=nowhere)
        stored(glean, path, scope="chat", backend_url=nowhere, requested_scope="CHAT Search")
        _, fewer, _ = doctor(glean, path, GLEAN_BACKEND_URL=nowhere)
    assert opaque["scopes"][:2] == ("warn", "granted: (not said); requested: chat")
    assert opaque["access_token"][:2] == ("warn", "its expiry is unknown (no expires_in, not a JWT with exp)")
    assert opaque["signature"][:2] == ("warn", "not checked (the token is not a JWS: three base64url parts, a JSON "
                                               "header first)")
    assert unreachable["metadata"][0] == "fail"  # refused: the words are the system's
    assert unreachable["scopes"][:2] == ("warn", "granted: chat; requested: chat (chat: yes, offline_access: no)")
    assert unreachable["signature"] == ("skip", "not checked: needs the metadata check", "")
    assert fewer["scopes"] == ("warn", "granted: chat; requested: CHAT Search (chat: yes, offline_access: no); not "
                                       "granted: Search", "Give the static client these scopes in Glean's admin "
                                                          "console, then sign in again with: python3 glean_oauth.py "
                                                          "login --force --token-file " + str(path))
    assert unreachable["clock"] == ("skip", "not checked: needs the metadata check", "")


def test_doctor_shows_a_metadata_error_and_a_store_for_another_backend(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, scope="chat offline_access", backend_url="https://elsewhere-be.glean.com")
        glean.overrides[glean_oauth.METADATA_PATH] = (500, {}, "<html>oops</html>")
        code, checks, _ = doctor(glean, path, args=["--backend-url", glean.url])
    assert code == 1 and checks["metadata"][:2] == ("fail", "Request to {}{} failed (500): <html>oops</html>".format(
        glean.url, glean_oauth.METADATA_PATH))  # the flow's own discovery, in the flow's words
    assert checks["clock"][0] == "ok"  # read from that answer's Date all the same
    assert checks["token_store"][0] == "warn" and checks["token_store"][1].endswith(": not for " + glean.url)
    assert checks["token_store"][2] == "Sign in there with: python3 glean_oauth.py login --token-file {} " \
                                       "--backend-url {}".format(path, glean.url)  # the flags that chose them


def test_doctor_on_metadata_without_what_the_flow_needs_and_a_store_it_cannot_use(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.metadata = lambda: {k: v for k, v in StandInGlean.metadata(glean).items() if k != "issuer"}
        glean.metadata_extra.update(code_challenge_methods_supported=["plain"])
        path.write_text("{not json")
        os.chmod(str(path), 0o600)
        code, broken, _ = doctor(glean, path)
        glean.metadata_extra.update(code_challenge_methods_supported=None)
        stored(glean, path, scope="chat")
        saved = json.loads(path.read_text())
        del saved["access_token"]
        path.write_text(json.dumps(saved))
        _, tokenless, _ = doctor(glean, path)
        _, no_file, _ = doctor(glean, path, CLIENT_SECRET=None, CLIENT_SECRET_FILE=str(tmp_path / "secret"))
    assert code == 1
    assert no_file["client_secret"][:2] == ("fail", "Cannot read the client secret file {}: No such file or "
                                                    "directory.".format(tmp_path / "secret"))
    assert broken["issuer"][:2] == ("warn", "the metadata names no issuer (RFC 8414 §2 requires one)")
    assert broken["pkce"][:2] == ("fail", 'PKCE S256 is not in the metadata\'s code_challenge_methods_supported '
                                          '(["plain"])')
    assert broken["token_store"][0] == "fail" and str(path) in broken["token_store"][1]
    assert broken["token_store"][2] == "Fix what it says, or start over: logout --local, then login."
    assert tokenless["pkce"][:2] == ("warn", "the metadata has no code_challenge_methods_supported: PKCE S256 is "
                                             "not known to be supported")
    assert tokenless["access_token"][:2] == ("fail", "the store holds no access token")


def test_doctor_points_at_the_cause_when_the_backend_cannot_be_reached(monkeypatch, tmp_path):
    def no_such_name(host, port, deadline):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with StandInGlean() as glean:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            refused_url = "http://127.0.0.1:{}".format(closed.getsockname()[1])
        _, refused, _ = doctor(glean, GLEAN_BACKEND_URL=refused_url)
        monkeypatch.setattr(glean_oauth, "_resolve", no_such_name)  # no name is looked up for real
        _, unresolvable, _ = doctor(glean, GLEAN_BACKEND_URL="acme.glean.com")
        code, with_path, _ = doctor(glean, GLEAN_BACKEND_URL=glean.url + "/rest/api/v1")
        assert glean.requests == []
    assert unresolvable["backend_url"][:2] == ("ok", "https://acme.glean.com (GLEAN_BACKEND_URL)")
    assert unresolvable["metadata"][0] == "fail" and "Name or service not known" in unresolvable["metadata"][1]
    assert unresolvable["metadata"][2] == "The host name does not resolve: check the host in GLEAN_BACKEND_URL. " \
                                          "Did you mean https://acme-be.glean.com?"
    assert refused["metadata"][0] == "fail" and refused["metadata"][2] == \
        "Nothing answers there: check the host and port in GLEAN_BACKEND_URL, and that the backend is up."
    assert code == 1 and with_path["backend_url"] == (
        "fail", "GLEAN_BACKEND_URL {0}/rest/api/v1 is not a backend's origin: use the origin only: {0}.".format(
            glean.url), glean_oauth.DOCTOR_FIXES["backend_url"])
    assert [with_path[name][0] for name in ("metadata", "issuer", "clock")] == ["skip"] * 3


def test_the_flow_suggests_the_be_host_when_a_web_host_is_not_the_backend(monkeypatch):
    monkeypatch.setattr(glean_oauth, "_resolve", lambda host, port, deadline: (_ for _ in ()).throw(
        socket.gaierror(socket.EAI_NONAME, "Name or service not known")))  # no name is looked up for real
    code, out, err = run_cli(good_environ("https://acme.glean.com", CLIENT_SECRET=CLIENT_SECRET))
    assert (code, out) == (1, "")
    assert err == "Request to https://acme.glean.com/.well-known/oauth-authorization-server failed: Name or service " \
                  "not known. Did you mean https://acme-be.glean.com?\n"


def test_doctor_on_a_backend_that_never_answers_says_what_to_check():
    with RawServer(silent) as server, StandInGlean() as glean:
        _, checks, _ = doctor(glean, GLEAN_BACKEND_URL=server.url, GLEAN_HTTP_TIMEOUT="0.2")
    assert checks["metadata"][0] == "fail" and "no answer in time" in checks["metadata"][1]
    assert checks["metadata"][2] == "Check GLEAN_BACKEND_URL and the network (GLEAN_HTTP_TIMEOUT sets how long to wait)."


def test_doctor_asks_no_admin_for_offline_access_when_a_refresh_token_came_anyway(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, scope="chat", requested_scope="chat offline_access")
        code, checks, output = doctor(glean, path)
    assert code == 0 and checks["refresh_token"][0] == "ok"
    assert checks["scopes"] == ("ok", "granted: chat; requested: chat offline_access (chat: yes, offline_access: no); "
                                      "a refresh token was issued anyway", "")
    assert "Glean admin" not in output and "admin console" not in output


def test_doctor_reports_an_interrupted_refresh(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, scope="chat offline_access")
        (tmp_path / "tokens.json.refreshing").write_text(json.dumps({"at": time.time(), "pid": 1}))
        code, checks, _ = doctor(glean, path)
    assert checks["token_store"][0] == "warn" and "a refresh was interrupted after it was sent" in checks["token_store"][1]



def test_doctor_probe_asks_the_server_and_finds_a_right_setup_ok(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        saved = stored(glean, path, scope="chat search mcp offline_access")
        glean.requests.clear()
        code, checks, output = doctor(glean, path, ["--probe"])
        sent = list(glean.requests)
        text_code, text, err = run_cli(good_environ(glean), ["doctor", "--probe", "--token-file", str(path)])
    assert code == 0 and text_code == 0, output
    assert [checks[name][0] for name in glean_oauth.PROBE_CHECKS] == ["ok"] * 4, output
    assert [(r.method, r.path) for r in sent] == [("GET", glean_oauth.METADATA_PATH), ("GET", "/oauth/jwks"),
                                                  ("GET", "/liveness_check"), ("POST", "/oauth/token"),
                                                  ("GET", "/oauth/authorize"), ("POST", "/rest/api/v1/search"),
                                                  ("POST", "/mcp/default")]
    made_up = sent[3].form["code"][0]  # a code that cannot exist, and says so
    assert made_up.startswith("glean-oauth-doctor-probe-not-a-code-")
    assert sent[3].form["client_secret"] == [CLIENT_SECRET]
    assert sent[3].form["grant_type"] == ["authorization_code"] and sent[3].form["code_verifier"][0]
    assert {k: v[0] for k, v in sent[4].query.items() if k not in ("state", "code_challenge")} == {
        "response_type": "code", "client_id": CLIENT_ID, "redirect_uri": good_environ(glean)["REDIRECT_URI"],
        "code_challenge_method": "S256", "scope": "chat search mcp offline_access"}
    assert all(r.headers["Authorization"] == "Bearer " + saved["access_token"] for r in sent[5:])
    assert json.loads(sent[6].body)["method"] == "initialize"
    assert checks["client_auth"][1].startswith("client id and secret accepted (client_secret_post")
    assert "ok    token_use" in text and text.endswith("\n21 checks: 21 ok, 0 warn, 0 fail, 0 skipped\n")
    for value in (saved["access_token"], saved["refresh_token"], CLIENT_SECRET, made_up):
        assert value not in output + text + err


@parametrize("env, failing, named", [
    ({"CLIENT_SECRET": "not-the-secret-at-all"}, {"client_auth"}, "CLIENT_SECRET"),
    ({"CLIENT_ID": "no-such-client"}, {"client_auth", "registration"}, "no-such-client"),
    ({"REDIRECT_URI": "http://localhost:0/elsewhere"}, {"registration"}, "http://localhost:0/elsewhere"),
    ({"GLEAN_SCOPES": "CHAT OFFLINE_ACCESS"}, {"registration"}, '--scope "chat offline_access"'),
])
def test_doctor_probe_fails_exactly_the_check_a_wrong_setup_breaks_with_the_value_to_change(env, failing, named):
    with StandInGlean() as glean:
        glean.known_scopes = {"chat", "search", "mcp", "offline_access"}
        code, checks, output = doctor(glean, args=["--probe"], **env)
    assert code == 1, output
    assert {name for name, (status, _, _) in checks.items() if status == "fail"} == failing, output
    assert all(named in checks[name][2] for name in failing), output
    assert "not-the-secret-at-all" not in output


def test_doctor_probe_before_login_and_without_the_secret_asks_what_it_can():
    with StandInGlean() as glean:
        glean.overrides["/liveness_check"] = (404, {}, "not found\n")
        code, checks, output = doctor(glean, args=["--probe"], CLIENT_SECRET=None)
    assert code == 0, output
    assert checks["reachable"][0] == "warn" and checks["reachable"][1].endswith("/liveness_check answered 404")
    assert checks["client_auth"] == ("skip", "not checked: needs the client_secret check", "")
    assert checks["registration"][0] == "ok" and checks["token_use"][0] == "skip"
    assert [r.path for r in glean.requests if r.path == "/oauth/token"] == []  # nothing to authenticate with

def test_doctor_probe_authenticates_with_the_secret_kept_at_login(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, scope="chat offline_access")
        glean_oauth.TokenStore(str(path) + ".secret").write({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
        code, checks, output = doctor(glean, path, ["--probe"], CLIENT_SECRET=None)
    assert checks["client_auth"][0] == "ok", output
    assert glean.find("/oauth/token")[0].form["client_secret"] == [CLIENT_SECRET]

def test_doctor_probe_tries_the_token_where_its_scopes_say_and_names_the_one_it_lacks(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, scope="chat offline_access")
        _, lacking, _ = doctor(glean, path, ["--probe", "--mcp-server", "default"])
        _, untried, _ = doctor(glean, path, ["--probe"])
        stored(glean, path, scope="chat mcp offline_access")
        _, granted, _ = doctor(glean, path, ["--probe"])
        _, elsewhere, _ = doctor(glean, path, ["--probe", "--mcp-server", "sales"])
    status, detail, fix = lacking["token_use"]
    assert status == "fail" and "/mcp/default answered 403: the token lacks the mcp scope" in detail
    assert fix.startswith("Sign in asking for mcp: ") and 'login --force --scope "chat offline_access mcp"' in fix
    assert untried["token_use"][0] == "skip" and "chat is never tried" in untried["token_use"][1]
    assert granted["token_use"][:2] == ("ok", "{}/mcp/default answered 200 (the token works there)".format(glean.url))
    assert elsewhere["token_use"][0] == "fail" and "/mcp/sales answered 404: not enabled" in elsewhere["token_use"][1]
    assert "--mcp-server" in elsewhere["token_use"][2]


def test_doctor_probe_on_answers_it_cannot_place_warns_with_the_servers_words(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, scope="search offline_access")
        glean.overrides["/oauth/token"] = (400, {}, {"error": "invalid_request", "error_description": "odd"})
        glean.overrides["/oauth/authorize"] = (200, {}, "<html>Sign in</html>")
        glean.overrides["/rest/api/v1/search"] = (500, {}, "upstream down\n")
        glean.overrides["/liveness_check"] = lambda request: (_ for _ in ()).throw(OSError("no answer"))
        code, checks, output = doctor(glean, path, ["--probe"])
    assert checks["client_auth"][:2] == ("warn", "token request failed (400): invalid_request: odd")
    assert checks["registration"][:2] == ("ok", "the server answered the authorization request with a page (200)")
    assert checks["token_use"][:2] == ("warn", "{}/rest/api/v1/search answered 500: upstream down".format(glean.url))
    assert checks["reachable"][0] == "fail" and checks["reachable"][1].startswith("Request to {}/liveness_check "
                                                                                "failed".format(glean.url))

def test_doctor_probe_warns_of_a_token_endpoint_that_takes_any_code_and_names_an_unknown_refusal():
    with StandInGlean() as glean:
        glean.overrides["/oauth/token"] = (200, {}, {"access_token": "x" * 20, "token_type": "Bearer"})
        glean.overrides["/oauth/authorize"] = (400, {}, {"error": "temporarily_unavailable"})
        code, checks, output = doctor(glean, args=["--probe"])
    assert checks["client_auth"] == ("warn", "the token endpoint took a code that cannot exist",
                                     "Report this to Glean support.")
    assert checks["registration"] == ("fail", "the server refused the authorization request "
                                              "(temporarily_unavailable)",
                                      "Check CLIENT_ID and REDIRECT_URI against the client's registration in Glean's "
                                      "admin console.")

def test_doctor_probe_refreshes_once_after_a_401_and_tries_once_more_never_more(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        saved = stored(glean, path, scope="search offline_access")
        del glean.access_tokens[saved["access_token"]]  # revoked at the server: 401
        glean.requests.clear()
        _, renewed, _ = doctor(glean, path, ["--probe"])
        first = [(r.path, r.form.get("grant_type")) for r in glean.requests if r.method == "POST"]
        glean.overrides["/rest/api/v1/search"] = (401, {}, {"error": "invalid_token"})
        glean.requests.clear()
        _, refused, output = doctor(glean, path, ["--probe"])
        second = [(r.path, r.form.get("grant_type")) for r in glean.requests if r.method == "POST"]
    assert renewed["token_use"][0] == "ok" and json.loads(path.read_text())["refresh_token"] != saved["refresh_token"]
    search, refresh = ("/rest/api/v1/search", None), ("/oauth/token", ["refresh_token"])
    assert first == second == [("/oauth/token", ["authorization_code"]), search, refresh, search]
    assert refused["token_use"][0] == "fail" and "the token was refused after a refresh" in refused["token_use"][1]
    assert refused["token_use"][2].startswith("Sign in again with: ")

def test_a_token_response_says_how_far_the_servers_clock_is_and_status_shows_it(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        glean.date_skew = 600
        assert login(glean, path, ["--scope", "chat offline_access"]).code == 0
        code, out, _ = run_cli(good_environ(glean), ["status", "--token-file", str(path)])
        glean.date_skew = 0
        assert run_cli(good_environ(glean), ["token", "--token-file", str(path), "--min-valid", "99999"])[0] == 0
        _, after, _ = run_cli(good_environ(glean), ["status", "--token-file", str(path)])
    assert code == 0 and re.search(r"\nClock: +this machine's clock is (599|600|601) s behind the server's", out)
    assert abs(json.loads(path.read_text())["clock_offset_seconds"]) <= 1  # the refresh's answer: right again
    assert "Clock:" not in after


def test_clock_offset_reads_the_date_header_and_jwt_times_are_corrected_by_it():
    date = "Sun, 06 Nov 1994 08:49:37 GMT"  # RFC 9110 §5.6.7's example: 784111777
    assert glean_oauth.clock_offset({"Date": date}, 784111777 - 600.2) == 600
    assert glean_oauth.clock_offset({"Date": "yesterday"}, 0) is None and glean_oauth.clock_offset({}, 0) is None
    now = time.time()
    token = make_jwt({"alg": "RS256"}, {"exp": int(now) + 300})  # 5 min left by the server's clock
    assert glean_oauth.valid_for({"access_token": token}, 0, now)
    assert not glean_oauth.valid_for({"access_token": token, "clock_offset_seconds": 600}, 0, now)  # 5 min ago here
    far_off = {"access_token": token, "clock_offset_seconds": -3 * 86400}  # a broken Date: not believed
    assert glean_oauth.expires_at(far_off) == int(now) + 300
    lines = glean_oauth.claim_checks({"exp": int(now) + 300, "nbf": int(now) + 900}, None, 600, now)
    assert lines[0].startswith("Expires: ") and "(expired, 5 min ago by the server's clock: this machine's clock " \
        "is 600 s behind the server's)" in lines[0]
    assert "(not yet valid, in 5 min by" in lines[1]


# --- Signatures: JWS checked in pure Python -----------------------------------------------


def keys_of(*keys):
    return lambda: ({"keys": list(keys)}, "test keys")


def verdict(token, jwks=None, source="test keys"):
    result = glean_oauth.check_signature(token, lambda: (stand_in_jwks() if jwks is None else jwks, source))
    return result.status, result.detail


def test_rfc_7515_appendix_a_examples_verify():
    rsa, p256, p521 = (public(key) for key in (RFC_7515_A2_KEY, RFC_7515_A3_KEY, RFC_7515_A4_KEY))
    for token, key, alg in ((RFC_7515_A2_JWS, rsa, "RS256"), (RFC_7515_A3_JWS, p256, "ES256"),
                            (RFC_7515_A4_JWS, p521, "ES512")):
        assert verdict(token, {"keys": [key]}) == ("valid", "{}, the key with no kid from test keys".format(alg))
        header, payload, signature = token.split(".")
        assert verdict(header + "." + payload + "x." + signature, {"keys": [key]})[0] == "INVALID"
    # The curves themselves: G on each, of order n (checked with the tests' own arithmetic).
    for curve, (p, b, (x, y), n) in glean_oauth.CURVES.items():
        assert (y * y - x ** 3 + 3 * x - b) % p == 0 and affine_multiple(curve, n, (x, y)) is None, curve


@parametrize("alg", list(glean_oauth.JWS_ALGORITHMS))
def test_inspect_verifies_each_of_the_nine_algorithms_with_a_jwks_file_and_no_request(alg, tmp_path):
    kid, key = stand_in_key(alg)
    token = make_jwt({"alg": alg, "kid": kid}, {"sub": "u", "exp": int(time.time()) + 60}, key)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(stand_in_jwks()))
    code, out, err = run_cli({}, ["inspect", "-", "--jwks", str(jwks)], stdin=token + "\n")
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("Signature:")] == [
        'Signature: valid ({}, key "{}" from {})'.format(alg, kid, jwks)]
    assert out.startswith("\nJWT header:\n") and "\nJWT claims:\n" in out and "\nExpires: " in out


RFC_8037_A4_JWS = (  # RFC 8037 Appendix A.4: Ed25519, which no JWK this file uses can carry
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylG"
    "jg5BhVsPt9g7sVvpAr_MuM0KAg")
RFC_8037_A2_KEY = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}


def test_rfc_8037s_eddsa_example_is_not_checked_and_its_key_is_skipped():
    assert verdict(RFC_8037_A4_JWS, {"keys": [RFC_8037_A2_KEY]}) == (
        "not checked", 'alg "EdDSA": not one this file implements (RS256, RS384, RS512, PS256, PS384, PS512, ES256, '
                       'ES384, ES512)')
    kid, key = stand_in_key("ES256")
    token = make_jwt({"alg": "ES256", "kid": kid}, {}, key)
    assert verdict(token, {"keys": [dict(RFC_8037_A2_KEY, kid=kid)]}) == (
        "not checked", "the JWKS from test keys has no signing keys")
    assert verdict(token, {"keys": [dict(RFC_8037_A2_KEY, kid=kid)] + stand_in_jwks()["keys"]})[0] == "valid"


def tampered(part, token):
    header, payload, signature = token.split(".")
    if part == "header":
        header = b64url(json.dumps(dict(json.loads(base64.urlsafe_b64decode(header + "==")), typ="at+jwt")).encode())
    elif part == "payload":
        payload = b64url(json.dumps({"sub": "admin"}).encode())
    else:
        raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
        raw[len(raw) // 2] ^= 1
        signature = b64url(bytes(raw))
    return ".".join((header, payload, signature))


@parametrize("alg", ["RS256", "PS384", "ES256", "ES512"])
@parametrize("part", ["header", "payload", "signature"])
def test_a_tampered_token_is_invalid(alg, part):
    kid, key = stand_in_key(alg)
    token = make_jwt({"alg": alg, "kid": kid}, {"sub": "u"}, key)
    assert verdict(token)[0] == "valid"
    assert verdict(tampered(part, token)) == ("INVALID", 'the signature does not match key "{}"'.format(kid))


def test_the_rules_in_their_order():
    kid, key = stand_in_key("RS256")
    good = make_jwt({"alg": "RS256", "kid": kid}, {"sub": "u"}, key)
    body = good.split(".", 1)[1]
    unsigned = b64url(b'{"alg":"none"}') + "." + body.split(".")[0]
    for third in ("", good.split(".")[2], "!!"):  # alg none: INVALID whatever the third part holds
        assert verdict(unsigned + "." + third) == ("INVALID", "alg none: the token is not signed at all")
    assert verdict(b64url(b'{"alg":"HS256"}') + "." + body)[0] == "not checked"  # before any key is looked at
    assert "shared-key MAC" in verdict(b64url(b'{"alg":"HS256"}') + "." + body, jwks={"keys": []})[1]
    assert verdict(b64url(b'{"alg":"EdDSA"}') + "." + body) == ("not checked", 'alg "EdDSA": not one this file '
                                                                "implements (RS256, RS384, RS512, PS256, PS384, "
                                                                "PS512, ES256, ES384, ES512)")
    assert verdict(good.rsplit(".", 1)[0] + ".a+b") == ("INVALID", "the signature is not base64url")
    assert verdict("opaque-token")[0] == "not checked"
    assert verdict(good, {"keys": []}) == ("not checked", "the JWKS from test keys has no signing keys")
    assert verdict(make_jwt({"alg": "RS256", "kid": "gone"}, {}, key)) == (
        "INVALID", 'no key "gone" in the JWKS from test keys')
    es_kid = stand_in_key("ES256")[0]
    assert verdict(make_jwt({"alg": "RS256", "kid": es_kid}, {}, key)) == (
        "INVALID", 'key "{}" is an EC key, and RS256 needs an RSA key'.format(es_kid))
    forbidding = dict(public(key), kid=kid, alg="RS256")
    assert verdict(make_jwt({"alg": "PS256", "kid": kid}, {}, key), {"keys": [forbidding]}) == (
        "INVALID", 'key "{}" is for "RS256", not PS256'.format(kid))
    p384_kid = stand_in_key("ES384")[0]
    assert verdict(make_jwt({"alg": "ES256", "kid": p384_kid}, {}, stand_in_key("ES256")[1])) == (
        "INVALID", 'key "{}" is on the curve "P-384", and ES256 needs P-256'.format(p384_kid))
    small = {"kty": "RSA", "kid": kid, "n": RFC_7515_A2_KEY["p"], "e": "AQAB"}
    assert verdict(good, {"keys": [small]}) == ("INVALID", 'key "rsa-1" has 1024 bits, not the 2048 to 16384 RFC '
                                                           '7518 §3.3 allows here')


@parametrize("n, e", [(b"\xff" * 2049, b"\x01\x00\x01"), (None, b"\xff" * 4096), (None, b"\x01\x00\x00"),
                      (None, b"\x01")])
def test_a_hostile_jwks_cannot_make_the_check_take_long(n, e):
    kid, key = stand_in_key("RS256")
    token = make_jwt({"alg": "RS256", "kid": kid}, {}, key)
    hostile = dict(public(key), kid=kid, e=b64url(e), **({"n": b64url(n)} if n else {}))
    started = time.monotonic()
    status, detail = verdict(token, {"keys": [hostile]})
    assert time.monotonic() - started < 0.5
    assert status == "INVALID" and ("bits, not the 2048 to 16384" in detail or "an exponent e that no RSA" in detail)


def test_keys_that_cannot_sign_are_skipped_and_the_kid_picks_among_several():
    kid, key = stand_in_key("ES384")
    token = make_jwt({"alg": "ES384", "kid": kid}, {}, key)
    skipped = [{"kty": "oct", "kid": kid, "k": "c2VjcmV0"}, dict(public(key), kid=kid, use="enc")]
    assert verdict(token, {"keys": skipped}) == ("not checked", "the JWKS from test keys has no signing keys")
    several = {"keys": skipped + stand_in_jwks()["keys"]}
    assert verdict(token, several) == ("valid", 'ES384, key "{}" from test keys'.format(kid))
    no_kid = make_jwt({"alg": "ES384"}, {}, key)  # without a kid, any key that verifies it
    assert verdict(no_kid, several) == ("valid", 'ES384, key "{}" from test keys'.format(kid))
    others = {"keys": [dict(public(stand_in_key("ES384")[1]), kid="a", x="!"), stand_in_jwks()["keys"][0]]}
    assert verdict(no_kid, others) == ("INVALID", 'no key in the JWKS from test keys verifies it: key "a" is '
                                                  'malformed: its x and y are not base64url numbers; key "rsa-1" is '
                                                  'an RSA key, and ES384 needs an EC key')


def test_an_ecdsa_signature_or_key_out_of_range_is_refused_before_any_arithmetic(monkeypatch):
    kid, key = stand_in_key("ES256")
    token = make_jwt({"alg": "ES256", "kid": kid}, {}, key)
    head, signature = token.rsplit(".", 1)
    n = glean_oauth.CURVES["P-256"][3]
    raw = base64.urlsafe_b64decode(signature + "==")
    arithmetic = []
    monkeypatch.setattr(glean_oauth, "_shamir", lambda *args: arithmetic.append(args))
    for r, s in ((bytes(32), raw[32:]), (n.to_bytes(32, "big"), raw[32:]), (raw[:32], n.to_bytes(32, "big"))):
        assert verdict(head + "." + b64url(r + s))[0] == "INVALID"
    off_curve = dict(public(key), kid=kid, y=int64((b64int(key["y"]) + 1), 32))
    assert verdict(token, {"keys": [off_curve]})[0] == "INVALID"
    assert verdict(head + "." + b64url(raw[:40]))[0] == "INVALID"  # not r || s of the curve's size
    assert arithmetic == []


@parametrize("alg", ["RS256", "PS256"])
def test_an_rsa_signature_of_n_or_more_is_invalid_though_it_computes_the_same(alg):
    kid, key = stand_in_key(alg)
    n = b64int(key["n"])
    for attempt in range(512):  # a signature s with s + n still 256 bytes long: one in 16 (PS: at random)
        token = make_jwt({"alg": alg, "kid": kid}, {"sub": attempt}, key)
        head, signature = token.rsplit(".", 1)
        s = b64int(signature)
        if s + n < 2 ** 2048:
            break
    assert verdict(token)[0] == "valid"
    assert verdict(head + "." + b64url((s + n).to_bytes(256, "big"))) == (
        "INVALID", 'the signature does not match key "{}"'.format(kid))  # pow(s + n, e, n) == pow(s, e, n)


def test_inspect_checks_the_stored_token_with_its_issuers_keys(tmp_path):
    path = tmp_path / "tokens.json"
    with StandInGlean() as glean:
        stored(glean, path, scope="chat", clock_offset_seconds=600)
        code, out, err = run_cli(good_environ(glean, GLEAN_TOKEN_FILE=str(path)), ["inspect"])
        glean.metadata = lambda: {k: v for k, v in StandInGlean.metadata(glean).items() if k != "jwks_uri"}
        no_keys = run_cli(good_environ(glean, GLEAN_TOKEN_FILE=str(path)), ["inspect"])
    assert code == 0, err
    assert 'Signature: valid (RS256, key "rsa-1" from {}/oauth/jwks)\n'.format(glean.url) in out
    assert "\nIssuer: matches the metadata's issuer\n" in out
    assert "(valid, in 50 min by the server's clock: this machine's clock is 600 s behind the server's)" in out
    assert no_keys[0] == 0
    assert "Signature: not checked (the metadata has no jwks_uri, and no --jwks was given)\n" in no_keys[1]


def test_inspect_reports_the_issuer_and_times_without_changing_the_exit_code(tmp_path):
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(stand_in_jwks()))
    kid, key = stand_in_key("RS256")
    now = int(time.time())
    token = make_jwt({"alg": "RS256", "kid": kid}, {"iss": "https://evil.example/oauth", "exp": now - 120,
                                                      "nbf": now + 600}, key)
    with StandInGlean() as glean:
        code, out, err = run_cli(good_environ(glean), ["inspect", "-"], stdin=token)
    assert code == 0, err
    assert '\nIssuer: "https://evil.example/oauth" is not the metadata\'s issuer {}\n'.format(glean.issuer) in out
    assert "(expired, 2 min ago)" in out and "(not yet valid, in 10 min)" in out


def test_inspect_takes_a_token_only_on_stdin_and_says_so_without_echoing_it():
    token = make_jwt({"alg": "RS256"}, {"sub": "u"})
    code, out, err = run_cli({}, ["inspect", token])
    assert code == 2 and token not in out + err and "standard input (inspect -)" in err
    assert run_cli({}, ["inspect", "-"], stdin="\n")[:2] == (2, "")
    assert "No token on standard input" in run_cli({}, ["inspect", "-"], stdin="\n")[2]
    code, out, err = run_cli({}, ["inspect", "-"], stdin="e30." * (glean_oauth.MAX_JWKS_BYTES // 4 + 1))
    assert (code, out) == (2, "") and "over 1048576 characters" in err


def test_inspect_with_a_jwks_file_needs_no_configuration_and_imports_no_network_module(tmp_path):
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(stand_in_jwks()))
    kid, key = stand_in_key("RS256")
    token = make_jwt({"alg": "RS256", "kid": kid}, {"sub": "u"}, key)
    proc = subprocess.run([sys.executable, "-X", "importtime", SCRIPT, "inspect", "-", "--jwks", str(jwks)],
                          input=token.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={"PATH": os.environ["PATH"]})
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()}
    assert proc.returncode == 0 and b"Signature: valid (RS256" in proc.stdout
    assert imported & {"ssl", "http.client", "urllib.request", "socket", "select"} == set()


@parametrize("header, detail", [
    ({"alg": ["RS256"]}, 'its alg is ["RS256"], not a name'),
    ({"alg": {"RS256": 1}}, 'its alg is {"RS256": 1}, not a name'),
    ({"alg": "RS256", "kid": ["rsa-1"]}, 'no key ["rsa-1"] in the JWKS from test keys'),
    ({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]},
     'its crit ["exp"] names extensions this check does not implement (RFC 7515 §4.1.11)'),
    ({"alg": "RS256", "kid": "rsa-1", "crit": 7}, "its crit 7 names extensions this check does not implement (RFC 7515 "
                                                  "§4.1.11)"),
])
def test_a_header_that_is_not_what_it_should_be_is_invalid_and_one_clean_line(header, detail, tmp_path):
    token = make_jwt(header, {"sub": "u"}, stand_in_key("RS256")[1] if isinstance(header["alg"], str) else None)
    assert verdict(token) == ("INVALID", detail)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(stand_in_jwks()))
    code, out, err = run_cli({}, ["inspect", "-", "--jwks", str(jwks)], stdin=token)
    assert (code, err) == (1, "") and "\nSignature: INVALID (" in out


def test_input_that_is_not_text_is_one_line():
    proc = run_script({"PATH": os.environ.get("PATH", "")}, ["inspect", "-"], stdin=b"\xff\xfe.\x80")
    assert (proc.returncode, proc.stdout) == (2, b"")
    assert proc.stderr == b"The input on standard input is not text, so no token.\n"


def test_a_hostile_jwks_is_refused_or_checked_within_its_bounds_in_short_lines():
    kid, key = stand_in_key("ES512")
    token = make_jwt({"alg": "ES512"}, {"sub": "u"}, key)  # no kid: every key is a candidate
    other = public(ec_key("P-521", "another"))
    huge = {"keys": [dict(other, kid="k" * 200 + str(i)) for i in range(4000)]}  # about 1 MiB
    assert len(json.dumps(huge)) > 1000000
    many = {"keys": [dict(other, kid="k" * 200 + str(i)) for i in range(glean_oauth.MAX_JWKS_KEYS)]}
    rsa = {"keys": [{"kty": "RSA", "kid": str(i), "n": b64url(os.urandom(2048) + b"\x01"), "e": b64url(
        (2 ** 32 - 1).to_bytes(4, "big"))} for i in range(glean_oauth.MAX_JWKS_KEYS)]}
    rsa_token = make_jwt({"alg": "RS256"}, {"sub": "u"}, stand_in_key("RS256")[1])
    rsa_token = rsa_token.rsplit(".", 1)[0] + "." + b64url(os.urandom(2049))  # as long as those keys' n
    for token, jwks, status in ((token, huge, "not checked"), (token, many, None), (rsa_token, rsa, None)):
        started = time.monotonic()
        result = glean_oauth.check_signature(token, lambda: (jwks, "https://keys.example/" + "x" * 500))
        assert time.monotonic() - started < 2, result.line
        assert status in (None, result.status) and result.status != "valid"
        assert len(result.line) <= 400, result.line
        assert result.detail.endswith("has 4000 signing keys") if jwks is huge else re.match(
            r"(its keys took over 1 s to try \(\d+ of 50\)|no key in the JWKS from .* verifies it: .*; and \d+ more)$",
            result.detail), result.detail


def test_jwks_are_fetched_with_the_checks_every_url_gets(tmp_path):
    token = make_jwt({"alg": "RS256", "kid": "rsa-1"}, {}, RFC_7515_A2_KEY)
    code, out, err = run_cli({}, ["inspect", "-", "--jwks", "http://keys.example/jwks"], stdin=token)
    assert code == 1 and "Signature: not checked (its keys could not be fetched: The JWKS URL must be an " \
        "https:// URL" in out
    with StandInGlean() as glean:
        glean.overrides["/big"] = (200, {}, {"keys": [], "pad": "x" * glean_oauth.MAX_JWKS_BYTES})
        code, out, _ = run_cli({}, ["inspect", "-", "--jwks", glean.url + "/big"], stdin=token)
    assert code == 1 and "over the 1048576 byte limit" in out
    (tmp_path / "bad.json").write_text("[1]")
    code, out, err = run_cli({}, ["inspect", "-", "--jwks", str(tmp_path / "bad.json")], stdin=token)
    assert code == 2 and out == "" and "is not a JSON object" in err
    code, out, err = run_cli({}, ["inspect", "-", "--jwks", str(tmp_path / "none.json")], stdin=token)
    assert code == 2 and out == "" and err.startswith("Cannot read the JWKS file {}: ".format(tmp_path / "none.json"))
    code, out, err = run_cli({}, ["inspect", "-"], stdin=token)
    assert code == 0 and "Signature: not checked (no --jwks, and no backend to find the jwks_uri of: set " \
        "GLEAN_BACKEND_URL or give --jwks)\n" in out
    with StandInGlean() as glean:
        glean.overrides["/oauth/jwks"] = (503, {}, "busy")
        unavailable = run_cli(good_environ(glean), ["inspect", "-"], stdin=token)
        glean.metadata_extra["jwks_uri"] = "http://keys.example/jwks"
        plain = run_cli(good_environ(glean), ["inspect", "-"], stdin=token)
    assert unavailable[0] == 1 and "Signature: not checked (its keys could not be fetched: Request to {}/oauth/jwks " \
        "failed (503): busy)\n".format(glean.url) in unavailable[1]
    assert plain[0] == 1 and "Signature: not checked (its keys could not be fetched: The metadata's jwks_uri must " \
        "be an https:// URL" in plain[1]


# --- The command line ---------------------------------------------------------------------


@posix_only(SIGNALS)
def test_ctrl_c_during_a_request_exits_130_in_one_line():
    with RawServer(silent) as server:
        run = ScriptRun(script_env(server.url))
        assert server.accepted.wait(RUN_TIMEOUT)
        run.proc.send_signal(signal.SIGINT)
        assert run.finish() == 130
    assert run.stderr == "Interrupted.\n"


def test_an_unexpected_error_is_one_line_without_a_traceback(monkeypatch):
    def broken():
        raise RuntimeError("boom " + CLIENT_SECRET)
    monkeypatch.setattr(glean_oauth, "make_pkce", broken)
    with StandInGlean() as glean:
        code, out, err = run_cli(good_environ(glean))
    assert code == 1
    assert err == "Unexpected error: RuntimeError: boom [redacted] (a bug in glean_oauth.py; please report it)\n"


def test_help_explains_every_variable_flag_and_exit_code():
    proc = run_script({"PATH": os.environ.get("PATH", "")}, ["--help"])
    assert proc.returncode == 0
    text = proc.stdout.decode()
    for word in ["CLIENT_ID", "CLIENT_SECRET", "GLEAN_BACKEND_URL", "REDIRECT_URI", "GLEAN_SCOPES",
                 "GLEAN_HTTP_TIMEOUT", "GLEAN_CALLBACK_TIMEOUT", "REFRESH_TOKEN", "HTTPS_PROXY",
                 "SSL_CERT_FILE", "BROWSER", "--backend-url", "--client-id", "--redirect-uri",
                 "--auth-method", "--scope", "--no-browser", "--manual", "--message", "--no-chat",
                 "--json", "--token-file", "--refresh", "--http-timeout", "--callback-timeout",
                 "--version", "examples:", "exit codes: 0", "130 interrupted", "GLEAN_CHAT_TIMEOUT", "--stream",
                 "GLEAN_TOKEN_FILE", "3 sign-in needed", "login", "token", "exec", "status", "logout"]:
        assert word in text, word


@parametrize("command", ["login", "token", "exec", "status", "logout"])
def test_each_subcommand_explains_itself(command):
    proc = run_script({"PATH": os.environ.get("PATH", "")}, [command, "--help"])
    text = proc.stdout.decode()
    assert proc.returncode == 0 and text.startswith("usage: glean_oauth.py " + command)
    assert "--token-file" in text and "3 sign-in needed" in text and "CLIENT_SECRET" in text


def test_version():
    proc = run_script({"PATH": os.environ.get("PATH", "")}, ["--version"])
    assert proc.stdout.decode() == "glean_oauth.py {}\n".format(glean_oauth.__version__)


@parametrize("argv", [["--client-secret", "x"], ["--auth-method", "magic"], ["--bogus"], ["login", "--bogus"]])
def test_a_bad_flag_is_one_line_and_exit_2(argv):
    proc = run_script({"PATH": os.environ.get("PATH", "")}, argv)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.count("\n") == 1
    if argv[0] == "--client-secret":
        assert "x" not in err.replace("ps)", "")
        assert err == "The client secret is taken only from CLIENT_SECRET, a file (--client-secret-file, " \
                      "CLIENT_SECRET_FILE) or the prompt, never from a flag (flags end up in shell history and ps).\n"
    else:
        assert err.startswith("glean_oauth.py" + (" login: " if argv[0] == "login" else ": "))
        assert err.endswith(" (see --help)\n")


@parametrize("argv", [["--client-secret", CLIENT_SECRET], ["--client-secret=" + CLIENT_SECRET],
                      ["--secret", CLIENT_SECRET], ["login", "--client-secret", CLIENT_SECRET],
                      ["--no-chat", CLIENT_SECRET]])
def test_a_secret_on_the_command_line_is_never_echoed(argv):
    proc = run_script({"PATH": os.environ.get("PATH", ""), "CLIENT_SECRET": CLIENT_SECRET}, argv)
    assert proc.returncode == 2 and proc.stderr.count(b"\n") == 1  # run_script asserts the secret is absent
    if argv[0] != "--no-chat":  # a secret flag is refused whether or not CLIENT_SECRET is set
        assert run_script({"PATH": os.environ.get("PATH", "")}, argv).stderr.startswith(b"The client secret is taken")


@posix_only(SHELL)
def test_python_2_says_what_it_needs():
    python = find_python("2.7")
    if python is None:
        pytest.skip("no CPython 2.7 under pyenv on this machine")
    proc = subprocess.run([python, SCRIPT, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 2
    assert proc.stderr == b"glean_oauth.py needs Python 3.6 or newer; this is Python 2.7.\n"


@posix_only(SHELL)
def test_the_script_runs_by_its_shebang():
    assert os.access(SCRIPT, os.X_OK)
    proc = subprocess.run([SCRIPT, "--version"], stdout=subprocess.PIPE, env={"PATH": os.environ["PATH"]})
    assert proc.stdout == "glean_oauth.py {}\n".format(glean_oauth.__version__).encode()


@parametrize("command", list(glean_oauth.COMMANDS))
def test_each_subcommands_help_gives_its_exit_codes_once(command):
    proc = run_script({}, [command, "--help"])
    assert proc.returncode == 0 and proc.stdout.decode().count("exit codes:") == 1
    codes = proc.stdout.decode().split("exit codes:")[1]
    for used in {"exec": ["126", "127"], "status": ["3"], "inspect": ["3"], "token": ["3"]}.get(command, []):
        assert " {} ".format(used) in codes.replace("\n", " "), (command, used)


@parametrize("argv, message", [
    (["tokn"], "glean_oauth.py: unknown command tokn; did you mean token? (see --help)"),
    (["help", "bogus"], "glean_oauth.py: unknown command bogus (see --help)"),
    (["token", "--form", "json"], "glean_oauth.py token: unrecognized argument --form; did you mean --format? (see "
                                  "--help)"),
    (["--scop", "chat"], "glean_oauth.py: unrecognized argument --scop; did you mean --scope? (see --help)"),
    (["login", "--scop=chat"], "glean_oauth.py login: unrecognized argument --scop=chat; did you mean --scope? (see "
                               "--help)"),
])
def test_a_typo_is_no_other_flag_and_gets_a_suggestion(argv, message):
    code, out, err = run_cli({}, argv)
    assert (code, out, err) == (2, "", message + "\n")


def test_help_and_help_token_show_the_right_help():
    token_help = run_script({}, ["token", "--help"]).stdout
    assert token_help.startswith(b"usage: glean_oauth.py token ")
    assert run_script({}, ["help", "token"]).stdout == run_script({}, ["-h", "token"]).stdout == token_help
    general = run_script({}, ["help"])
    assert general.returncode == 0 and general.stdout == run_script({}, ["--help"]).stdout
    assert general.stdout.startswith(b"usage: glean_oauth.py [login|token|exec|status|logout|doctor|inspect|help] "
                                     b"[options]\n")


@posix_only(SHELL)
def test_help_with_stdin_closed_still_helps():
    proc = shell('"$PY" "$SCRIPT" --help <&-', dict(os.environ, PY=sys.executable, SCRIPT=SCRIPT))
    assert proc.returncode == 0 and b"exit codes:" in proc.stdout and proc.stderr == b""


@posix_only(SHELL)
def test_a_run_with_stdout_closed_is_a_usage_error_before_any_traffic():
    with StandInGlean() as glean:
        proc = shell('"$PY" "$SCRIPT" >&-', dict(script_env(glean), PY=sys.executable, SCRIPT=SCRIPT))
    assert proc.returncode == 2
    assert proc.stderr == b"Standard output is closed, so nothing could be shown; run with it open (redirect it " \
                          b"to a file to keep it).\n"
    assert glean.requests == []


def test_a_reader_gone_before_the_first_write_ends_the_run_quietly():
    proc = subprocess.Popen(script_command() + ["--help"], env=script_env("https://acme-be.glean.com"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    proc.stdout.close()  # gone before the script starts (on Windows a write then fails with EINVAL)
    err = proc.stderr.read()
    proc.wait(RUN_TIMEOUT)
    assert (proc.returncode, err) == (1, b"")


def test_a_closed_pipe_on_windows_is_a_reader_gone_too(monkeypatch):
    err = io.StringIO()
    console = glean_oauth.Console(io.StringIO(), err)
    monkeypatch.setattr(os, "name", "nt")
    assert glean_oauth._output_failed(OSError(errno.EINVAL, "Invalid argument"), console) == 1
    monkeypatch.setattr(os, "name", "posix")
    glean_oauth._output_failed(OSError(errno.EINVAL, "Invalid argument"), console)
    assert err.getvalue() == "Cannot write the output: Invalid argument.\n"  # elsewhere EINVAL is a real error


@parametrize("args", [["--help"], ["--version"], []])
@posix_only(SHELL)
def test_a_reader_that_goes_away_ends_the_run_quietly(args):
    reading, writing = os.pipe()
    os.close(reading)  # the reader is gone before the script starts: every write meets a broken pipe
    with StandInGlean() as glean:
        proc = subprocess.Popen(script_command() + args, env=script_env(glean, GLEAN_CALLBACK_TIMEOUT="0.5"),
                                stdin=subprocess.DEVNULL, stdout=writing, stderr=subprocess.PIPE)
        os.close(writing)
        err = proc.stderr.read()
        code = proc.wait(RUN_TIMEOUT)
    assert b"Traceback" not in err and b"Exception ignored" not in err and b"Unexpected" not in err
    assert (code, err) == (1, b"")  # the output was lost: a failure, but a quiet one


@posix_only(SHELL)
def test_a_full_disk_is_one_line_and_a_failure():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with StandInGlean() as glean:
        proc = shell('"$PY" "$SCRIPT" >/dev/full', dict(script_env(glean), PY=sys.executable, SCRIPT=SCRIPT))
    assert proc.returncode == 1
    assert proc.stderr == b"Cannot write the output: No space left on device.\n"


# --- Checks: settings, URLs and metadata --------------------------------------------------


@parametrize("name", ["GLEAN_HTTP_TIMEOUT", "GLEAN_CALLBACK_TIMEOUT"])
@parametrize("value", ["soon", "0", "-1", "inf", "nan", "1e10", "1e308", "1e400"])
def test_a_bad_timeout_is_a_usage_error(name, value):
    code, out, err = run_cli(dict(good_environ("https://acme-be.glean.com"), **{name: value}))
    assert (code, out) == (2, "")
    assert err == "{} must be a positive number of seconds, at most 604800, not {!r}.\n".format(name, value)


@parametrize("redirect_uri, reason", [
    ("https://127.0.0.1:9090/oauth/callback", "it must start with http://"),
    ("http://example.com:9090/oauth/callback", "its host must be 127.0.0.1, [::1] or localhost"),
    ("http://10.1.2.3:9090/oauth/callback", "its host must be 127.0.0.1, [::1] or localhost"),
    ("http://0.0.0.0:9090/oauth/callback", "its host must be 127.0.0.1, [::1] or localhost"),
    ("http://localhost.example.com:9090/cb", "its host must be 127.0.0.1, [::1] or localhost"),
    ("http://127.0.0.1:99999/oauth/callback", "its port is not a number from 0 to 65535"),
    ("http://127.0.0.1:9090/oauth/callback#x", "it must not have a #fragment"),
])
def test_a_redirect_uri_that_is_not_loopback_http_is_refused_before_any_traffic(redirect_uri, reason):
    with StandInGlean() as glean:
        code, out, err = run_cli(good_environ(glean, REDIRECT_URI=redirect_uri))
    assert (code, out) == (2, "")
    assert err.startswith("REDIRECT_URI {} is refused: {}".format(redirect_uri, reason))
    assert glean.requests == []


def test_loopback_redirect_uris_are_accepted():
    for uri in ["http://127.0.0.1:9090/oauth/callback", "http://[::1]:9090/cb", "http://localhost/cb",
                "http://LOCALHOST:1/cb"]:
        glean_oauth.check_redirect_uri(uri)


@parametrize("url, ok", [
    ("https://acme-be.glean.com", True), ("http://127.0.0.1:8080", True), ("http://[::1]:80", True),
    ("http://localhost", True), ("http://acme-be.glean.com", False), ("http://10.0.0.5", False),
    ("ftp://acme", False), ("https://", False), ("acme-be.glean.com", False),
])
def test_credentials_go_only_over_tls_or_to_loopback(url, ok):
    if ok:
        glean_oauth.check_transport(url, "X")
    else:
        with pytest.raises(glean_oauth.FlowError, match=r"^X must be an https:// URL"):
            glean_oauth.check_transport(url, "X")


def test_a_plain_http_backend_url_is_refused_before_any_traffic():
    code, out, err = run_cli(good_environ("http://acme-be.glean.com"))
    assert (code, out) == (2, "")
    assert err == "GLEAN_BACKEND_URL must be an https:// URL (http:// only for 127.0.0.1, [::1] or " \
                  "localhost), not http://acme-be.glean.com.\n"


@parametrize("name, value, message", [
    ("REDIRECT_URI", "http://[::1/cb", "REDIRECT_URI http://[::1/cb is refused: it is not a URL."),
    ("GLEAN_BACKEND_URL", "https://[::1", "GLEAN_BACKEND_URL is not a usable URL (Invalid IPv6 URL): https://[::1."),
    ("GLEAN_BACKEND_URL", "https://host:abc", "GLEAN_BACKEND_URL is not a usable URL (Port could not be cast to "
                                              "integer value as 'abc'): https://host:abc."),
    ("GLEAN_BACKEND_URL", "https://user:hunter2@host", "GLEAN_BACKEND_URL must not hold a user name or password: "
                                                       "https://host."),
    ("REDIRECT_URI", "http://u:hunter2@127.0.0.1/cb", "REDIRECT_URI http://127.0.0.1/cb is refused: it must not hold "
                                                      "a user name or password."),
])
def test_a_malformed_url_is_a_usage_error_that_shows_no_password(name, value, message):
    with StandInGlean() as glean:
        code, out, err = run_cli(good_environ(glean, **{name: value}))
    assert (code, out) == (2, "")
    assert err == message + "\n" or err.startswith(message.split(" (")[0]) and "hunter2" not in err
    assert "hunter2" not in err
    assert glean.requests == []


@parametrize("value, message", [
    ("https://acme-be.glean.com/?x=1", "GLEAN_BACKEND_URL https://acme-be.glean.com/?x=1 is not a backend's origin: "
                                       "use the origin only: https://acme-be.glean.com."),
    ("https://acme-be.glean.com/rest/api/v1", "GLEAN_BACKEND_URL https://acme-be.glean.com/rest/api/v1 is not a "
                                              "backend's origin: use the origin only: https://acme-be.glean.com."),
    ("https://app.glean.com", "GLEAN_BACKEND_URL https://app.glean.com is Glean's web app, not your backend: use the "
                              "\"Server instance (QE)\" value from the About page in Glean, usually "
                              "https://<name>-be.glean.com."),
    ("glean.com/", "GLEAN_BACKEND_URL glean.com is Glean's web app, not your backend: use the \"Server instance (QE)\" "
                   "value from the About page in Glean, usually https://<name>-be.glean.com."),
])
def test_a_backend_url_that_is_no_backends_origin_is_one_line_and_no_request(value, message):
    with StandInGlean() as glean:
        code, out, err = run_cli(good_environ(glean, GLEAN_BACKEND_URL=value))
    assert (code, out, err) == (2, "", message + "\n")
    assert glean.requests == []


@parametrize("given, source", [(["--backend-url", "acme.glean.com/x"], "--backend-url"),
                               ([], "GLEAN_SERVER_URL")])
def test_a_backend_error_names_where_the_value_came_from(given, source):
    environ = {"GLEAN_SERVER_URL": "acme.glean.com/x", "GLEAN_TOKEN_FILE": "/nonexistent/tokens.json",
               "CLIENT_ID": CLIENT_ID, "CLIENT_SECRET": CLIENT_SECRET}
    for command in ([], ["token"], ["status"], ["doctor"]):
        code, _, err = run_cli(environ, command + given)
        assert err.startswith(source + " acme.glean.com/x is not a backend's origin") or \
            "fail  backend_url    {} acme.glean.com/x is not".format(source) in err + _, (command, err + _)


@parametrize("value, origin", [
    ("acme-be.glean.com", "https://acme-be.glean.com"), (" HTTPS://Acme-BE.Glean.com:443/ ", "https://acme-be.glean.com"),
    ("127.0.0.1:18080", "https://127.0.0.1:18080"), ("http://[::1]:80", "http://[::1]"),
    ("https://vanity.example.com:8443", "https://vanity.example.com:8443"),
])
def test_one_reading_of_a_backend_url(value, origin):
    assert glean_oauth.backend_origin(value) == origin


def test_a_bare_host_is_https_end_to_end_and_finds_its_stored_tokens(tmp_path):
    # The scheme rule: a backend named without one is https://, loopback too (so the stand-in speaks TLS).
    path = tmp_path / "tokens.json"
    with StandInGlean(tls=True) as glean:
        bare = glean.url[len("https://"):]
        flow = login(glean, path, ["--backend-url", bare], SSL_CERT_FILE=certificate_file())
        assert flow.code == 0, flow.run.output()
        assert json.loads(path.read_text())["backend_url"] == glean.url
        for named in (bare, bare + "/", glean.url.upper().replace("HTTPS", "https")):
            code, out, err = run_cli({"GLEAN_TOKEN_FILE": str(path), "GLEAN_SERVER_URL": named}, ["token"])
            assert (code, err) == (0, ""), named
            assert out.strip() in glean.access_tokens


# --- Answers: what a server says, parsed with care ----------------------------------------


@parametrize("body, shown", [
    ("<html>Bad gateway</html>", "<html>Bad gateway</html>"),
    ("[1, 2]", "[1, 2]"),
    ("x" * 400, "x" * 300 + "..."),
    (b"\xff\xfe", "\ufffd\ufffd"),
])
def test_an_answer_that_is_not_a_json_object_is_a_clear_error(body, shown):
    with StandInGlean() as glean:
        glean.overrides["/.well-known/oauth-authorization-server"] = (200, {}, body)
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.fetch_json(glean.url + "/.well-known/oauth-authorization-server")
    assert str(caught.value) == "Response from {}/.well-known/oauth-authorization-server (200) is not a " \
                                "JSON object: {}".format(glean.url, shown)


def test_a_huge_declared_body_is_refused_without_reading_it():
    def huge(conn):
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n{")  # and then nothing

    with RawServer(huge) as server:
        started = time.monotonic()
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.fetch_json(server.url + "/big", deadline=glean_oauth.Deadline(10))
        assert time.monotonic() - started < 2
    assert str(caught.value) == "Response from {}/big is 1000000000 bytes, over the {} byte limit.".format(
        server.url, glean_oauth.MAX_RESPONSE_BYTES)


def test_an_endless_body_is_cut_off_at_the_limit():
    sent = []

    def endless(conn):
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        try:
            for _ in range(4 * glean_oauth.MAX_RESPONSE_BYTES // 65536):  # bounded: 4x the limit
                conn.sendall(chunk)
                sent.append(65536)
        except OSError:
            pass  # the client hung up, as it should

    with RawServer(endless) as server:
        with pytest.raises(glean_oauth.FlowError, match="is over the 4194304 byte limit"):
            glean_oauth.fetch_json(server.url + "/big", deadline=glean_oauth.Deadline(10))
    assert sum(sent) < 3 * glean_oauth.MAX_RESPONSE_BYTES


@parametrize("body", [b'{"issuer": NaN}', b'{"a": Infinity}', b'{"a": 1e400}', b"[" * 100000 + b"]" * 100000,
                      b'{"a": ' * 70 + b"1" + b"}" * 70])
def test_json_that_python_takes_but_json_is_not_is_refused(body):
    with StandInGlean() as glean:
        glean.overrides["/.well-known/oauth-authorization-server"] = (200, {}, body)
        proc = run_script(script_env(glean))
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("Response from {}/.well-known/oauth-authorization-server (200) is not "
                                           "a JSON object: ".format(glean.url))
    assert proc.stderr.count(b"\n") == 1


def test_json_is_valid_json_whatever_the_output_encoding():
    """A Windows pipe is cp1252: --json then escapes what it cannot carry, as JSON does."""
    with StandInGlean() as glean:
        glean.answer = "Caf\u00e9 \U0001f600 team"
        flow = run_flow(glean, ["--json", "--no-chat"], process=True, PYTHONIOENCODING="cp1252")
        chat = run_flow(glean, ["--json"], process=True, PYTHONIOENCODING="cp1252")
    assert flow.code == chat.code == 0, chat.run.output()
    assert all(ord(c) < 128 for c in chat.stdout)
    answer = json.loads(chat.stdout)["chat_response"]["messages"][-1]["fragments"][0]["text"]
    assert answer == "Caf\u00e9 \U0001f600 team"


def test_json_output_stays_valid_json_whatever_the_chat_answer_holds():
    with StandInGlean() as glean:
        glean.overrides["/rest/api/v1/chat"] = (200, {}, b'{"messages": [], "backendTimeMillis": NaN}')
        flow = run_flow(glean, ["--json"])
    assert flow.code == 1
    result = json.loads(flow.stdout, parse_constant=lambda name: pytest.fail("printed " + name))
    assert "chat_response" not in result and "refresh_response" in result
    assert "Chat API call failed: Response from " in flow.stderr


# --- The chat step's details: scopes and streaming ----------------------------------------


def test_a_stream_over_the_total_limit_is_refused(monkeypatch):
    monkeypatch.setattr(glean_oauth, "MAX_STREAM_BYTES", 1000)
    with StandInGlean() as glean:
        glean.overrides["/rest/api/v1/chat"] = (200, {}, Streamed(iter(["{}\n"] * 600)))
        with pytest.raises(glean_oauth.FlowError, match="The stream from .* is over the 1000 byte limit"):
            glean_oauth.http_request(glean.url + "/rest/api/v1/chat", b"{}", on_line=lambda line, d: None)


def test_a_streamed_answer_merges_into_what_the_plain_call_returns():
    with StandInGlean() as glean:
        plain = run_flow(glean)
        streamed = run_flow(glean, ["--stream"])
        by_env = run_flow(glean, ["--json"], GLEAN_CHAT_STREAM="1")
    assert plain.code == streamed.code == by_env.code == 0, streamed.run.output()
    assert json.loads(section(streamed.stdout, "Chat response")) == json.loads(section(plain.stdout, "Chat response"))
    assert json.loads(by_env.stdout)["chat_response"] == json.loads(section(plain.stdout, "Chat response"))
    assert json.loads(glean.find("/rest/api/v1/chat")[1].body) == {
        "messages": [{"fragments": [{"text": "Who is on the executive team?"}]}], "stream": True}
    assert glean.find("/rest/api/v1/chat")[0].body == \
        b'{"messages":[{"fragments":[{"text":"Who is on the executive team?"}]}]}'  # the doc's, unchanged
    assert streamed.stderr == "  Searching: executive team\n\nAnswer: The executive team is listed on the People page.\n"
    assert plain.stdout == expected_stdout(glean, 0)
    assert streamed.stdout == expected_stdout(glean, 1, chat_answer=glean.chat_answers[0])  # the doc's sections


def test_a_stream_with_odd_message_ids_is_still_merged():
    lines = [{"messages": [{"messageId": {"not": "a string"}, "messageType": "CONTENT", "fragments": [{"text": "a"}]}]},
             {"messages": [{"messageId": ["x"], "messageType": "CONTENT", "fragments": [{"text": "b"}]}]}]
    with StandInGlean() as glean:
        glean.overrides["/rest/api/v1/chat"] = (200, {}, Streamed(json.dumps(line) + "\n" for line in lines))
        flow = run_flow(glean, ["--stream"])
    assert flow.code == 0, flow.run.output()
    assert [m["fragments"] for m in json.loads(section(flow.stdout, "Chat response"))["messages"]] == [
        [{"text": "a"}], [{"text": "b"}]]


def test_the_stream_is_shown_while_it_is_still_open():
    release = threading.Event()
    with StandInGlean() as glean:
        glean.stream_pace = lambda index: index == 3 and release.wait(RUN_TIMEOUT)  # hold after "The executive "
        proc = subprocess.Popen(script_command() + without_a_browser(["--stream"]), env=script_env(glean),
                                stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for raw in iter(proc.stdout.readline, b""):
                if raw.startswith(b"http"):
                    play_browser_in_thread(raw.decode().strip())
                    break
            seen = b""
            while b"Answer: The executive " not in seen:
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, "stderr closed before the answer began"
                seen += chunk
            assert b"Searching: executive team" in seen and b"People" not in seen  # the stream is still open
            release.set()
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert (seen + err).decode().replace("\r\n", "\n").endswith(
        "Answer: The executive team is listed on the People page.\n")
    chat = json.loads(section(out.decode().replace("\r\n", "\n"), "Chat response"))
    assert "Searching" not in chat["messages"][-1]["fragments"][0]["text"]


def play_browser_in_thread(url):
    threading.Thread(target=play_browser, args=(url,), daemon=True).start()


def test_a_stream_that_goes_silent_ends_at_the_http_timeout_and_the_run_goes_on():
    with StandInGlean() as glean:
        glean.answer = " ".join(["word"] * 58)  # 60 lines in all
        glean.stream_pace = lambda index: time.sleep(2 if index == 30 else 0)  # the server's pace
        started = time.monotonic()
        flow = run_flow(glean, ["--stream"], GLEAN_HTTP_TIMEOUT="0.5")
        elapsed = time.monotonic() - started
    assert flow.code == 1
    assert "Chat API call failed: Request to {}/rest/api/v1/chat failed: no answer in time (GLEAN_HTTP_TIMEOUT " \
           "sets the limit in seconds)\n".format(glean.url) in flow.stderr
    assert "\nJWT claims:\n" in flow.stdout and "\nRefresh response:\n" in flow.stdout
    assert elapsed < 2 + 1.5, elapsed


def test_a_slow_but_steady_stream_may_take_longer_than_the_http_timeout():
    with StandInGlean() as glean:
        glean.stream_pace = lambda index: time.sleep(0.1)  # 12 lines over 1.2 s, each within 0.5 s
        flow = run_flow(glean, ["--stream"], GLEAN_HTTP_TIMEOUT="0.5")
    assert flow.code == 0, flow.run.output()


def test_a_slow_answer_is_bounded_by_the_chat_timeout_not_the_http_timeout():
    with StandInGlean() as glean:
        glean.chat_delay = 0.8
        slow = run_flow(glean, [], GLEAN_HTTP_TIMEOUT="0.4")
        too_slow = run_flow(glean, ["--chat-timeout", "0.4"])
    assert slow.code == 0, slow.run.output()
    assert too_slow.code == 1
    assert "Chat API call failed: Request to {}/rest/api/v1/chat failed: no answer in time (GLEAN_CHAT_TIMEOUT " \
           "sets the limit in seconds)\n".format(glean.url) in too_slow.stderr


@parametrize("line", [b"not json\n", b"[1]\n", b"{\"a\": NaN}\n"])
def test_a_stream_line_that_is_not_json_names_its_number(line):
    with StandInGlean() as glean:
        glean.overrides["/rest/api/v1/chat"] = (200, {}, Streamed(iter([json.dumps({"messages": []}) + "\n",
                                                                         line.decode()])))
        flow = run_flow(glean, ["--stream"])
    assert flow.code == 1
    assert "Chat API call failed: Line 2 of the chat stream is not a JSON object: " in flow.stderr


def test_a_stream_line_over_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(glean_oauth, "MAX_LINE_BYTES", 100)
    with StandInGlean() as glean:
        glean.overrides["/rest/api/v1/chat"] = (200, {}, Streamed(iter(["x" * 300 + "\n"])))
        with pytest.raises(glean_oauth.FlowError, match="A line from .* is over the 100 byte limit"):
            glean_oauth.http_request(glean.url + "/rest/api/v1/chat", b"{}", on_line=lambda line, d: None)


def test_insufficient_scope_names_the_scope_and_the_command():
    with StandInGlean() as glean:
        flow = run_flow(glean, ["--scope", "search offline_access"])
    assert flow.code == 1
    assert flow.stderr.startswith('The token was not granted the chat scope (granted: search offline_access); the '
                                  'Chat API will likely refuse it. Ask for it with --scope "search offline_access '
                                  'chat".\n')
    assert 'failed (401): Token lacks scope (the token lacks the scope chat: sign in again with --scope "search ' \
           'offline_access chat")\n' in flow.stderr
    assert "\nJWT claims:\n" in flow.stdout and "\nRefresh response:\n" in flow.stdout
    assert len(glean.find("/rest/api/v1/chat")) == 1  # the call is still made


def test_granted_scopes_are_compared_case_insensitively():
    assert glean_oauth.chat_scope_missing({"scope": "CHAT offline_access"}) is None
    assert glean_oauth.chat_scope_missing({"access_token": make_jwt({}, {"scp": ["Chat"]})}) is None
    assert glean_oauth.chat_scope_missing({"scope": "SEARCH"}) == "SEARCH"
    assert glean_oauth.chat_scope_missing({"access_token": "opaque"}) is None  # nothing visible: no claim


# --- Output and redaction -----------------------------------------------------------------


def test_control_characters_from_the_server_never_reach_the_terminal():
    with StandInGlean() as glean:
        glean.authorize_error = "access_denied\x1b[2J"
        glean.error_description = "go \x1b]0;pwned\x07away\r\nFAKE: all good \u202e"
        flow = run_flow(glean)
    assert flow.code == 1
    assert flow.stderr == "OAuth error: access_denied [2J: go ]0;pwned away FAKE: all good\n"


def test_json_sections_escape_what_a_terminal_would_act_on():
    with StandInGlean() as glean:
        glean.overrides["/rest/api/v1/chat"] = (200, {}, {"messages": [{"author": "GLEAN_AI", "fragments": [
            {"text": "caf\u00e9 \x1b[2J \u009b31m \u202egnp.exe \U000e0041"}]}]})
        flow = run_flow(glean)
    assert flow.code == 0, flow.run.output()
    assert '"text": "caf\u00e9 \\u001b[2J \\u009b31m \\u202egnp.exe \\udb40\\udc41"' in flow.stdout
    assert json.loads(section(flow.stdout, "Chat response"))["messages"][0]["fragments"][0]["text"].startswith(
        "caf\u00e9 \x1b[2J \u009b31m \u202e")
    assert "Answer: caf\u00e9  [2J  31m  gnp.exe  \n" in flow.stderr


def test_a_server_that_echoes_the_secret_gets_it_redacted():
    with StandInGlean() as glean:
        glean.overrides["/oauth/token"] = lambda request: (400, {}, request.body.decode())
        flow = run_flow(glean)  # run_flow itself asserts the secret is absent
    assert flow.code == 1
    assert "client_secret=[redacted]&code_verifier=" in flow.stderr


def test_the_secret_is_redacted_in_the_forms_it_travels_in():
    secret = CLIENT_SECRET + "+/ &="
    echo = lambda request: (400, {}, request.body.decode() + " " + request.headers.get("Authorization", ""))
    with StandInGlean(client_secret=secret) as glean:
        glean.overrides["/oauth/token"] = echo
        post = run_flow(glean)
        basic = run_flow(glean, ["--auth-method", "client_secret_basic"])
        glean.overrides["/oauth/token"] = lambda request: (200, {}, "x" * 290 + request.body.decode())
        not_json = run_flow(glean)  # the secret's start would fall inside the 300-character excerpt
    assert "client_secret=[redacted]&code_verifier=" in post.stderr
    assert basic.stderr.rstrip("\n").endswith(" Basic [redacted]")
    assert "Response from {}/oauth/token (200) is not a JSON object: ".format(glean.url) in not_json.stderr
    for flow in (post, basic, not_json):
        for form in glean_oauth.secret_forms(CLIENT_ID, secret):
            assert form not in flow.stdout + flow.stderr


def test_a_secret_split_over_streamed_deltas_never_reaches_stderr_whole():
    with StandInGlean() as glean:
        glean.answer = "The key is " + CLIENT_SECRET + " and more."
        glean.answer_deltas = ["The key is s3", "cret-NEV", "E", "R-PRINT-9f2c", "1e7a and more."]
        flow = run_flow(glean, ["--stream"])  # run_flow asserts the secret is absent
    assert flow.code == 0, flow.run.output()
    assert "\nAnswer: The key is [redacted] and more.\n" in flow.stderr


def test_streamed_text_is_redacted_as_a_whole_however_it_is_cut():
    text = "a " + CLIENT_SECRET + " b [redacted] " + CLIENT_SECRET[:9] + " c " + CLIENT_SECRET
    for first in range(len(text)):
        for second in range(first, len(text) + 1, 5):
            err = io.StringIO()
            console = glean_oauth.Console(io.StringIO(), err)
            console.secrets = glean_oauth.secret_forms(CLIENT_ID, CLIENT_SECRET)
            for piece in (text[:first], text[first:second], text[second:]):
                console.progress(piece)
            console.end_progress()
            assert err.getvalue() == text.replace(CLIENT_SECRET, "[redacted]"), (first, second)


def test_what_is_held_back_is_only_what_could_begin_a_secret():
    err = io.StringIO()
    console = glean_oauth.Console(io.StringIO(), err)
    console.secrets = glean_oauth.secret_forms(CLIENT_ID, CLIENT_SECRET)
    console.progress("The executive team is listed ")
    assert err.getvalue() == "The executive team is listed "  # nothing held: no secret starts so
    console.progress("here: s3cr")
    assert err.getvalue() == "The executive team is listed here: "


def test_redaction_skips_markers_and_forms_too_short_to_be_secrets():
    assert glean_oauth.redacted("a [redacted] b", ["redacted] b", "[redacted"]) == "a [redacted] b"
    assert glean_oauth.redacted("abcdefghij", ["abcdefgh", "cdefghij"]) == "[redacted]ij"  # one pass
    assert glean_oauth.credential_forms("short") == []
    assert glean_oauth.secret_forms("id", "abc") == ["aWQ6YWJj"]  # only the Basic credential is long enough
    assert "[redacted]" not in glean_oauth.redacted("token_type: Bearer", glean_oauth.credential_forms("Bearer"))


def test_an_error_answer_never_shows_the_refresh_token_it_was_sent():
    refresh_token = "rt-" + secrets.token_urlsafe(24)
    echo = lambda request: _oauth_error(400, "invalid_grant", "bad refresh_token {} for secret {}".format(
        request.form["refresh_token"][0], request.form["client_secret"][0]))
    with StandInGlean() as glean:
        glean.overrides["/oauth/token"] = echo
        code, out, err = run_cli(good_environ(glean, REFRESH_TOKEN=refresh_token), ["--refresh"])
    assert code == 1
    assert err == "token request failed (400): invalid_grant: bad refresh_token [redacted] for secret [redacted]\n"
    assert refresh_token not in out + err


def test_an_error_answer_never_shows_the_code_or_the_access_token_it_was_sent():
    with StandInGlean() as glean:
        glean.overrides["/rest/api/v1/chat"] = lambda request: (401, {}, "refused " + request.headers["Authorization"])
        chat = run_flow(glean)
        glean.overrides["/oauth/token"] = lambda request: (400, {}, request.body.decode())
        exchange = run_flow(glean)
    access_token = json.loads(section(chat.stdout, "Token response"))["access_token"]
    assert "failed (401): refused Bearer [redacted] (the token may lack" in chat.stderr
    assert access_token not in chat.stderr  # it is on stdout, in the section printed on purpose
    code = glean.find("/oauth/token")[-1].form["code"][0]
    assert "&code=[redacted]&" in exchange.stderr and code not in exchange.stderr


@parametrize("secret", [CLIENT_SECRET + '"\\q', CLIENT_SECRET + " \t two", CLIENT_SECRET + "\u00e9/\u202e"])
def test_an_echoed_secret_is_redacted_in_every_form(secret):
    lower_escapes = re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), urllib.parse.quote(secret, safe=""))
    forms = [secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], lower_escapes, " ".join(secret.split())]
    echo = lambda request: (200, {}, dict(glean.token(request)[2], echo=list(forms), text=" | ".join(forms)))
    with StandInGlean(client_secret=secret) as glean:
        glean.overrides["/oauth/token"] = echo
        flow = run_flow(glean, ["--json", "--no-chat"])
        path = os.path.join(tempfile.mkdtemp(), "tokens.json")
        kept = run_flow(glean, ["--no-chat", "--token-file", path])
    for run in (flow, kept):
        assert run.code == 0, run.run.output()
        for form in forms + [secret.strip()]:
            assert form not in run.stdout + run.stderr
    saved = open(path).read()
    assert all(form not in saved for form in forms) and '"[redacted]' in saved


# --- The listener's machinery -------------------------------------------------------------


def wait_in_thread(listener, check, timeout=RUN_TIMEOUT, on_stray=None):
    """Run listener.wait in a thread; return a function that joins it and gives the outcome."""
    outcome = {}

    def target():
        try:
            outcome["code"] = listener.wait(check, timeout=timeout, on_stray=on_stray)
        except glean_oauth.FlowError as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join():
        thread.join(timeout)
        assert not thread.is_alive(), "the listener is still waiting"
        return outcome
    return join


def test_listener_answers_other_paths_404_and_keeps_waiting_for_the_callback():
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s1"))
        base = listener.redirect_uri.rsplit("/oauth/", 1)[0]
        assert http_get(base + "/favicon.ico")[0] == 404
        assert http_get(base + "/")[0] == 404
        status, _, body = http_get(listener.redirect_uri + "?code=c0de&state=s1")
        assert (status, body) == (200, "OAuth callback captured. You can return to the terminal.\n")
        assert join() == {"code": "c0de"}


def test_a_stray_callback_gets_400_and_the_wait_goes_on_until_this_runs_state():
    strays = []
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s1"), on_stray=strays.append)
        for query in ["code=c0de&state=forged", "error=access_denied&error_description=pwned", "code=evil"]:
            status, _, body = http_get(listener.redirect_uri + "?" + query)
            assert (status, body) == (400, "OAuth callback failed. Check the terminal for details.\n")
        assert http_get(listener.redirect_uri + "?code=real&state=s1")[0] == 200
        assert join() == {"code": "real"}
    assert strays == ["Ignored a callback that is not the answer to this run's request (State mismatch); "
                      "still waiting."] * 3


def test_listener_closes_its_port_when_done():
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        port = listener.sockets[0].getsockname()[1]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_listener_names_the_redirect_uri_it_really_listens_on():
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        port = listener.sockets[0].getsockname()[1]
        assert port not in (0, 80)  # 0 means "pick one", not the default port
        assert listener.redirect_uri == "http://127.0.0.1:{}/oauth/callback".format(port)


def ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_localhost_listens_on_both_loopback_addresses_on_one_port():
    with glean_oauth.CallbackListener("http://localhost:0/cb") as listener:
        addresses = [sock.getsockname()[:2] for sock in listener.sockets]
        port = addresses[0][1]
        expected = [("127.0.0.1", port)] + ([("::1", port)] if ipv6_loopback_available() else [])
        assert addresses == expected
        assert listener.redirect_uri == "http://localhost:{}/cb".format(port)
        if len(addresses) == 2:  # a browser that resolves localhost to ::1 gets through
            join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s"))
            assert http_get("http://[::1]:{}/cb?code=c6&state=s".format(port))[0] == 200
            assert join() == {"code": "c6"}


def test_a_silent_preconnect_never_delays_the_callback():
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s1"))
        address = listener.sockets[0].getsockname()
        with socket.create_connection(address) as idle, socket.create_connection(address) as partial:
            partial.sendall(b"GET /oauth/callback?code=evil")  # and never the rest
            started = time.monotonic()
            status, _, _ = http_get(listener.redirect_uri + "?code=c0de&state=s1")
            outcome = join()
            elapsed = time.monotonic() - started
            assert idle.fileno() != -1
    assert (status, outcome) == (200, {"code": "c0de"})
    assert elapsed < 1, elapsed


def test_a_flood_of_idle_connections_is_bounded_and_the_callback_still_lands():
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s1"))
        address = listener.sockets[0].getsockname()
        idle = [socket.create_connection(address) for _ in range(glean_oauth.MAX_PENDING_CONNECTIONS + 20)]
        try:
            # While the listener still waits, the oldest are dropped to stay within the bound.
            idle[0].settimeout(5)
            assert idle[0].recv(1) == b""
            assert http_get(listener.redirect_uri + "?code=c0de&state=s1")[0] == 200
            assert join() == {"code": "c0de"}
        finally:
            for sock in idle:
                sock.close()


def test_another_method_on_the_callback_path_gets_405_and_the_wait_goes_on():
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s1"))
        parts = urllib.parse.urlsplit(listener.redirect_uri)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("POST", parts.path + "?code=c0de&state=s1", body=b"x")
        response = conn.getresponse()
        assert (response.status, response.getheader("Allow")) == (405, "GET")
        conn.close()
        assert http_get(listener.redirect_uri + "?code=c0de&state=s1")[0] == 200
        assert join() == {"code": "c0de"}


def test_an_oversized_request_gets_431_and_the_wait_goes_on():
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s1"))
        with socket.create_connection(listener.sockets[0].getsockname()) as flood:
            flood.sendall(b"GET /" + b"a" * (glean_oauth.MAX_CALLBACK_REQUEST_BYTES + 10))
            assert flood.recv(100).startswith(b"HTTP/1.1 431 ")
        assert http_get(listener.redirect_uri + "?code=c0de&state=s1")[0] == 200
        assert join() == {"code": "c0de"}


@parametrize("query, status", [("code=c0de&state=s1", 200), ("code=<b>hi</b>&state=<script>", 400),
                               ("error=<b>x</b>&state=s1", 400)])
def test_the_browser_page_is_plain_uncached_and_never_echoes_input(query, status):
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s1"))
        got, headers, body = http_get(listener.redirect_uri + "?" + query)
        if "state=s1" not in query:
            http_get(listener.redirect_uri + "?code=c0de&state=s1")  # a stray does not end the wait
        join()
    assert got == status
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body in (glean_oauth.CALLBACK_DONE_PAGE, glean_oauth.CALLBACK_FAILED_PAGE)


def test_a_flood_that_drops_a_connection_while_it_is_readable_does_not_crash_the_listener():
    release = threading.Event()

    def check(query):
        release.wait(RUN_TIMEOUT)  # holds the listener while the flood builds up behind it
        return glean_oauth.parse_callback(query, "s1")

    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, check)
        address = listener.sockets[0].getsockname()
        stray = socket.create_connection(address)
        stray.sendall(b"GET /oauth/callback?state=x HTTP/1.1\r\n\r\n")
        pending = [socket.create_connection(address) for _ in range(glean_oauth.MAX_PENDING_CONNECTIONS)]
        try:
            for sock in pending:
                sock.sendall(b"G")  # readable, and incomplete: they stay pending
            release.set()
            more = [socket.create_connection(address) for _ in range(5)]
            for sock in pending:
                sock.sendall(b"ET")  # readable again, in the pass that drops the oldest
            for sock in more:
                sock.sendall(b"G")
            assert http_get(listener.redirect_uri + "?code=c0de&state=s1")[0] == 200
            assert join() == {"code": "c0de"}
        finally:
            for sock in pending + more + [stray]:
                sock.close()


# --- Plumbing: HTTP -----------------------------------------------------------------------


def test_a_silent_server_ends_the_request_at_the_timeout_naming_the_url():
    with RawServer(silent) as server:
        started = time.monotonic()
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.http_request(server.url + "/x", deadline=glean_oauth.Deadline(0.3))
        assert time.monotonic() - started < 3
    assert str(caught.value) == "Request to {}/x failed: no answer in time " \
                                "(GLEAN_HTTP_TIMEOUT sets the limit in seconds)".format(server.url)


def test_a_refused_connection_says_so_in_one_line():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = "http://127.0.0.1:{}".format(closed.getsockname()[1])
        proc = run_script(script_env(url))
    assert proc.returncode == 1
    assert proc.stderr.decode() == "Request to {}/.well-known/oauth-authorization-server failed: " \
                                   "Connection refused\n".format(url)


def test_glean_http_timeout_applies_to_the_run():
    with RawServer(silent) as server:
        proc = run_script(dict(script_env(server.url), GLEAN_HTTP_TIMEOUT="0.3"))
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("Request to {}/.well-known/oauth-authorization-server "
                                           "failed: no answer in time".format(server.url))


def redirect_to(other):
    return lambda request: (307, {"Location": other.url + request.path}, "")


@parametrize("path", ["/oauth/token", "/rest/api/v1/chat"])
def test_a_request_with_credentials_never_follows_a_redirect(path):
    with StandInGlean() as glean, StandInGlean() as elsewhere:
        glean.overrides[path] = redirect_to(elsewhere)
        flow = run_flow(glean)
    assert flow.code == 1
    assert "Request to {}{} was redirected (307) to {}{}; not following it".format(
        glean.url, path, elsewhere.url, path) in flow.stderr
    assert elsewhere.requests == []


def test_discovery_does_not_follow_a_redirect_either():
    with StandInGlean() as glean, StandInGlean() as elsewhere:
        glean.overrides["/.well-known/oauth-authorization-server"] = redirect_to(elsewhere)
        proc = run_script(script_env(glean))
    assert proc.returncode == 1
    assert b"was redirected (307) to " + elsewhere.url.encode() in proc.stderr
    assert elsewhere.requests == []


def test_an_untrusted_certificate_is_refused_with_what_to_do():
    with StandInGlean(tls=True) as glean:
        proc = run_script(script_env(glean))
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith("Request to {}/.well-known/oauth-authorization-server failed: the server's "
                          "TLS certificate is not trusted".format(glean.url))
    assert err.endswith("set SSL_CERT_FILE to its CA bundle\n")
    assert glean.requests == []


def test_ssl_cert_file_adds_a_trusted_ca():
    with StandInGlean(tls=True) as glean:
        proc = run_script(script_env(glean, SSL_CERT_FILE=certificate_file(), GLEAN_CALLBACK_TIMEOUT="0.1"))
    assert b"issuer=" + glean.issuer.encode() + b"\n" in proc.stdout
    assert proc.stderr.startswith(b"No callback reached")  # discovery went through
    assert glean.paths() == ["/.well-known/oauth-authorization-server"]


def test_https_proxy_is_honoured():
    with StandInGlean(tls=True) as glean:
        def tunnel(conn):
            request_line = read_head(conn).split(b"\r\n", 1)[0]
            tunnels.append(request_line)
            upstream = socket.create_connection(("127.0.0.1", glean.httpd.server_address[1]))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
            pipe(conn, upstream)

        tunnels = []
        with RawServer(tunnel) as proxy:
            proc = run_script(dict(script_env("https://glean.test"), HTTPS_PROXY=proxy.url,
                                   SSL_CERT_FILE=certificate_file(), GLEAN_CALLBACK_TIMEOUT="0.1"))
    assert [line.split(b" ")[:2] for line in tunnels] == [[b"CONNECT", b"glean.test:443"]]
    assert b"issuer=" + glean.issuer.encode() in proc.stdout


def pipe(source, sink, log=None):
    try:
        for chunk in iter(lambda: source.recv(65536), b""):
            if log is not None:
                log.append(chunk)
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        sink.close()


def test_a_whole_run_makes_one_connection_to_the_backend():
    with StandInGlean() as glean:
        flow = run_flow(glean)
    assert flow.code == 0, flow.run.output()
    script = [r for r in glean.requests if r.path != "/oauth/authorize"]  # the browser's is its own
    assert [r.path for r in script] == ["/.well-known/oauth-authorization-server", "/oauth/token",
                                        "/rest/api/v1/chat", "/oauth/token"]
    assert len({r.connection for r in script}) == 1
    assert glean.connections == 2  # the script's one, and the browser's


def test_a_connection_the_server_closed_during_sign_in_is_replaced_and_nothing_is_sent_twice():
    with StandInGlean() as glean:
        glean.close_after.add("/.well-known/oauth-authorization-server")
        flow = run_flow(glean)
    assert flow.code == 0, flow.run.output()
    script = [r for r in glean.requests if r.path != "/oauth/authorize"]
    assert [r.path for r in script] == ["/.well-known/oauth-authorization-server", "/oauth/token",
                                        "/rest/api/v1/chat", "/oauth/token"]
    assert script[0].connection != script[1].connection == script[2].connection == script[3].connection


def test_a_connection_that_breaks_after_the_request_was_sent_is_not_retried():
    def answer_once_then_drop(conn):
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        heads.append(read_head(conn))  # the token request: taken, then the connection dies
        conn.close()

    heads = []
    with RawServer(answer_once_then_drop) as server:
        assert glean_oauth.fetch_json(server.url + "/.well-known/x") == {}
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.fetch_json(server.url + "/token", None, [("grant_type", "authorization_code")])
    assert str(caught.value).startswith("Request to {}/token failed: ".format(server.url))
    assert len(server.connections) == 1 and len(heads) == 1  # sent once, on the kept connection


@parametrize("version", ["3.6", PYTHONS[-1]])
def test_a_streamed_answer_with_a_content_length_is_read_to_its_end_and_the_refresh_still_lands(version, tmp_path):
    """Python 3.6 to 3.12 leave a length-delimited body open after readline() reaches its end;
    the refresh on the same connection then read nothing and the rotated token was lost."""
    python = find_python(version) or pytest.skip(NO_PYENV if os.name == "nt" else "no CPython {} here".format(version))
    path = str(tmp_path / "tokens.json")
    with StandInGlean() as glean:
        glean.stream_framing = "length"
        flow = run_flow(glean, ["--stream", "--token-file", path], python=python)
    assert flow.code == 0, flow.run.output()
    assert json.loads(section(flow.stdout, "Refresh response"))["refresh_token"] == saved_refresh_token(path)
    assert saved_refresh_token(path) in glean.refresh_tokens
    script = [r for r in glean.requests if r.path != "/oauth/authorize"]
    assert len({r.connection for r in script}) == 1  # still one kept connection


@parametrize("version", ["3.6", PYTHONS[-1]])
def test_interim_answers_are_dropped_and_the_real_answer_is_this_requests(version, tmp_path):
    """A 102 or 103 before the answer was taken as the answer; the real one was then read as
    the answer to the refresh, whose rotated token was lost."""
    python = find_python(version) or pytest.skip(NO_PYENV if os.name == "nt" else "no CPython {} here".format(version))
    path = str(tmp_path / "tokens.json")
    with StandInGlean() as glean:
        glean.interim = {"/rest/api/v1/chat": [102, 103], "/oauth/token": [103]}
        flow = run_flow(glean, ["--token-file", path], python=python)
    assert flow.code == 0, flow.run.output()
    assert json.loads(section(flow.stdout, "Chat response"))["chatId"] == "chat-1"
    assert saved_refresh_token(path) in glean.refresh_tokens


@parametrize("interim, message", [
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "101 Switching Protocols, never asked for"),
    (b"HTTP/1.1 103 Early Hints\r\n\r\n" * 17, "over 16 interim 1xx answers"),
])
def test_a_switch_or_endless_interim_answers_are_refused_and_the_connection_dropped(interim, message):
    def answer(conn):
        try:
            read_head(conn)
            conn.sendall(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            read_head(conn)  # the connection must not be used again: a new one comes instead
        except OSError:
            pass  # closed by the client, or by the server's exit

    with RawServer(answer) as server:
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.http_request(server.url + "/x")
        with pytest.raises(glean_oauth.FlowError):
            glean_oauth.http_request(server.url + "/y", deadline=glean_oauth.Deadline(1))
    assert str(caught.value) == "Request to {}/x failed: the answer is not valid HTTP (HTTPException: {}).".format(
        server.url, message)
    assert len(server.connections) == 2


def test_slow_name_resolution_ends_at_the_deadline(monkeypatch):
    resolved, real = threading.Event(), socket.getaddrinfo

    def slow(host, *args, **kwargs):
        if host == "slow.test":
            resolved.wait(RUN_TIMEOUT)  # a resolver that does not answer: released at the end
        return real("127.0.0.1" if host == "slow.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    started = time.monotonic()
    try:
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.http_request("http://slow.test:9/x", deadline=glean_oauth.Deadline(0.5))
        elapsed = time.monotonic() - started
    finally:
        resolved.set()
    assert str(caught.value) == "Request to http://slow.test:9/x failed: name resolution took too long " \
                                "(GLEAN_HTTP_TIMEOUT sets the limit in seconds)"
    assert 0.5 <= elapsed < 0.5 + 1.5, elapsed


def test_addresses_that_drop_syns_share_the_deadline_instead_of_taking_it_each(monkeypatch):
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # one connection fills its queue: Linux then drops further SYNs
        address = full.getsockname()
        with socket.create_connection(address):
            entry = (socket.AF_INET, socket.SOCK_STREAM, 6, "", address)
            monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [entry] * 3)
            started = time.monotonic()
            with pytest.raises(glean_oauth.FlowError) as caught:
                glean_oauth.http_request("http://three.test:{}/x".format(address[1]),
                                         deadline=glean_oauth.Deadline(0.5))
            elapsed = time.monotonic() - started
    assert str(caught.value).endswith("failed: connect took too long (GLEAN_HTTP_TIMEOUT sets the limit in seconds)")
    assert 0.5 <= elapsed < 0.5 + 1.5, elapsed


def test_a_refused_address_passes_the_time_left_to_the_next(monkeypatch):
    with StandInGlean() as glean, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # never listening: refused at once
        port = glean.httpd.server_address[1]
        entries = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", closed.getsockname()),
                   (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: entries)
        assert glean_oauth.fetch_json("http://two.test:{}/.well-known/oauth-authorization-server".format(port))


FORK_SCRIPT = """
import os, sys
sys.path.insert(0, {here!r})
import glean_oauth
glean_oauth._tls_context.cache_clear()
url = {url!r}
glean_oauth.fetch_json(url)  # a pooled TLS connection, then a fork
child = os.fork()
results = [glean_oauth.fetch_json(url) for _ in range(3)]
if child == 0:
    os._exit(0)
_, status = os.waitpid(child, 0)
print(os.WEXITSTATUS(status))
"""


@skip_if(not hasattr(os, "fork"), "no fork() on this platform")
def test_a_forked_child_never_uses_its_parents_connection():
    with StandInGlean(tls=True) as glean:
        url = glean.url + "/.well-known/oauth-authorization-server"
        proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT.format(here=HERE, url=url)],
                              env=dict(os.environ, SSL_CERT_FILE=certificate_file()),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"0\n", b"")
    by_connection = {}
    for request in glean.requests:
        by_connection[request.connection] = by_connection.get(request.connection, 0) + 1
    assert sorted(by_connection.values()) == [3, 4]  # the parent's 1 + 3 on one, the child's 3 on its own


def drip(head, body=b"", interval=0.05, count=200):
    """A server that sends `head` and then `body` one byte every `interval` s (bounded)."""
    def handle(conn):
        read_head(conn)
        try:
            conn.sendall(head)
            for byte in body[:count]:
                conn.sendall(bytes([byte]))
                time.sleep(interval)  # the misbehaving peer's pace, not a test waiting for something
        except OSError:
            pass  # the client hung up at its deadline
    return handle


@parametrize("head, body", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 100),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\nx\r\n" * 30),
    (b"", b"HTTP/1.1 200 OK\r\n" + b"X-Drip: " + b"y" * 100),
])
def test_a_server_that_drips_bytes_is_cut_off_at_the_deadline(head, body):
    with RawServer(drip(head, body)) as server:
        started = time.monotonic()
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.http_request(server.url + "/x", deadline=glean_oauth.Deadline(0.5))
        elapsed = time.monotonic() - started
    assert str(caught.value) == "Request to {}/x failed: no answer in time (GLEAN_HTTP_TIMEOUT sets " \
                                "the limit in seconds)".format(server.url)
    assert 0.5 <= elapsed < 1.5, elapsed


def test_a_server_that_drips_its_tls_handshake_is_cut_off_at_the_deadline():
    def handshake(conn):
        try:
            conn.recv(4096)  # the ClientHello
            for byte in b"\x16\x03\x03\x10\x00" + b"\x00" * 100:  # a record header, then its body slowly
                conn.sendall(bytes([byte]))
                time.sleep(0.05)  # the misbehaving peer's pace
        except OSError:
            pass

    with RawServer(handshake) as server:
        started = time.monotonic()
        with pytest.raises(glean_oauth.FlowError, match="no answer in time|took too long"):
            glean_oauth.http_request("https://127.0.0.1:{}/x".format(server.port), deadline=glean_oauth.Deadline(0.5))
        assert 0.5 <= time.monotonic() - started < 1.5


@parametrize("content_length", ["\u00b2", "-5", "1e3", "0x10"])
def test_a_content_length_that_is_not_ascii_digits_is_read_to_the_close(content_length):
    def odd(conn):
        read_head(conn)
        conn.sendall("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{}}".format(
            content_length).encode("utf-8"))
        conn.close()

    with RawServer(odd) as server:
        assert glean_oauth.fetch_json(server.url + "/x") == {}


@parametrize("head", [b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
                      b"HTTP/1.1 200 OK\r\nX-Long: " + b"y" * 70000 + b"\r\n\r\n"])
def test_header_lines_and_count_stay_bounded(head):
    def many(conn):
        read_head(conn)
        try:
            conn.sendall(head)
        except OSError:
            pass  # the client stopped reading at its limit

    with RawServer(many) as server:
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.http_request(server.url + "/x")
    assert str(caught.value).startswith("Request to {}/x failed: the answer is not valid HTTP (".format(server.url))


def tunnel_to(port, log):
    """A CONNECT proxy that tunnels every request to 127.0.0.1:`port` and logs what it saw."""
    def tunnel(conn):
        log.append(read_head(conn))
        upstream = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=pipe, args=(upstream, conn, log), daemon=True).start()
        pipe(conn, upstream, log)
    return tunnel


def test_the_proxy_tunnel_is_made_once_and_the_secret_never_crosses_it_in_clear(monkeypatch):
    log = []
    with StandInGlean(tls=True) as glean, RawServer(tunnel_to(glean.httpd.server_address[1], log)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("SSL_CERT_FILE", certificate_file())
        glean_oauth._tls_context.cache_clear()
        try:
            for _ in range(3):
                glean_oauth.fetch_json("https://glean.test/.well-known/oauth-authorization-server")
            with pytest.raises(glean_oauth.FlowError, match="invalid_client"):
                glean_oauth.fetch_json("https://glean.test/oauth/token", None, [("client_secret", CLIENT_SECRET)], oauth=True)
        finally:
            glean_oauth._tls_context.cache_clear()
    assert [head.split(b" ")[:2] for head in log if head.startswith(b"CONNECT")] == [[b"CONNECT", b"glean.test:443"]]
    assert len(proxy.connections) == 1 and glean.connections == 1
    assert [r.path for r in glean.requests] == ["/.well-known/oauth-authorization-server"] * 3 + ["/oauth/token"]
    assert all(CLIENT_SECRET.encode() not in chunk for chunk in log)


def test_a_proxy_that_refuses_the_tunnel_is_named():
    def refuse(conn):
        read_head(conn)
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    with RawServer(refuse) as proxy:
        proc = run_script(dict(script_env("https://glean.test"), HTTPS_PROXY=proxy.url))
    assert proc.returncode == 1
    assert proc.stderr.decode() == "The proxy 127.0.0.1:{} (HTTPS_PROXY) refused the tunnel to glean.test:443: " \
                                   "403 Forbidden.\n".format(proxy.port)


def test_a_proxy_that_cannot_be_reached_is_named():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        proc = run_script(dict(script_env("https://glean.test"), HTTPS_PROXY="http://user:pw@127.0.0.1:{}".format(port)))
    assert proc.returncode == 1
    assert proc.stderr.decode() == "Cannot reach the proxy 127.0.0.1:{} (HTTPS_PROXY): Connection refused.\n".format(port)


@parametrize("contents, problem", [(None, "No such file or directory"), ("not a certificate\n", "it holds no PEM certificate")])
def test_a_bad_ssl_cert_file_is_named(tmp_path, contents, problem):
    path = tmp_path / "ca.pem"
    if contents is not None:
        path.write_text(contents)
    proc = run_script(dict(script_env("https://glean.test"), SSL_CERT_FILE=str(path)))
    assert proc.returncode == 2
    assert proc.stderr.decode() == "SSL_CERT_FILE {} cannot be used: {}. Point it at a PEM CA bundle.\n".format(
        path, problem)


def test_user_agent_names_the_tool():
    with StandInGlean() as glean:
        run_flow(glean)
    agents = {r.headers.get("User-Agent") for r in glean.requests if r.path != "/oauth/authorize"}
    assert agents == {"glean-oauth/{} Python/{}.{}".format(glean_oauth.__version__, *sys.version_info[:2])}


def test_a_header_that_cannot_be_sent_is_a_clear_error():
    with StandInGlean() as glean:
        with pytest.raises(glean_oauth.FlowError) as caught:
            glean_oauth.http_request(glean.url + "/x", headers={"X-Bad": "a\r\nInjected: 1"})
    assert str(caught.value) == "Request to {}/x cannot be sent: a header holds characters HTTP does not " \
                                "allow.".format(glean.url)  # never the value, which could be a credential
    assert glean.requests == []


@parametrize("proxy, shown", [
    ("https://proxy.example:3128", "https://proxy.example:3128"),
    ("socks5://127.0.0.1:1080", "socks5://127.0.0.1:1080"),
    ("http://proxy:port", "http://proxy:port"),
    # A password holding a raw / ? # or @: no part of the userinfo is shown, whatever it holds.
    ("http://user:TOP/SECRETPW@proxy.example:3128", "http://proxy.example:3128"),
    ("http://user:TOP?SECRET#PW@proxy.example:3128", "http://proxy.example:3128"),
    ("user:TOP/SECRETPW@proxy.example:3128", "proxy.example:3128"),
])
def test_a_proxy_that_is_no_plain_http_proxy_is_a_usage_error(proxy, shown):
    proc = run_script(dict(script_env("https://glean.test"), HTTPS_PROXY=proxy))
    assert proc.returncode == 2
    assert proc.stderr.decode() == "HTTPS_PROXY must be http://HOST:PORT (a plain-HTTP proxy that tunnels with " \
                                   "CONNECT; percent-encode / ? # @ in its user name or password), " \
                                   "not {}.\n".format(shown)
    assert b"TOP" not in proc.stderr and b"SECRET" not in proc.stderr and b"user:" not in proc.stderr


# --- The benchmark (`make bench`) ---------------------------------------------------------
#
# The real script against the stand-in over TLS, through relays that delay every hop as a
# distant tenant would, side by side with the script as it was before kept-alive
# connections (from git) and the doc's TypeScript example (when node is here).

BASELINE_COMMIT = "5976b5e"  # the last glean_oauth.py with a connection per request


class DelayRelay(RawServer):
    """A TCP relay on 127.0.0.1 that delays each direction by half of `rtt`, and holds a new
    connection's first bytes one more `rtt`, as the TCP handshake that the kernel completes
    at once to a local relay would. Its `connections` are the ones it accepted."""

    def __init__(self, port, rtt):
        super().__init__(self._relay)
        self.target, self.rtt = port, rtt
        self.__enter__()

    def close(self):
        self.__exit__()

    def _relay(self, client):
        opened = time.monotonic()
        upstream = socket.create_connection(("127.0.0.1", self.target))
        for sock in (client, upstream):  # the relay adds its delay, and no other
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._forward(client, upstream, lambda now: max(now, opened + self.rtt) + self.rtt / 2)
        self._forward(upstream, client, lambda now: now + self.rtt / 2)

    @staticmethod
    def _forward(source, sink, due):
        chunks = queue.Queue()

        def read():
            while True:
                try:
                    data = source.recv(65536)
                except OSError:
                    data = b""
                chunks.put((due(time.monotonic()), data))
                if not data:
                    return

        def write():
            while True:
                at, data = chunks.get()
                time.sleep(max(0.0, at - time.monotonic()))  # the simulated link's delay
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    return

        for target in (read, write):
            threading.Thread(target=target, daemon=True).start()


# The doc's TypeScript example with its types taken out, so that node 18+ runs it as it is.
TYPESCRIPT_EXAMPLE = r"""
const { createHash, randomBytes } = require('node:crypto');
const { createServer } = require('node:http');
const CLIENT_ID = process.env.CLIENT_ID, CLIENT_SECRET = process.env.CLIENT_SECRET;
const GLEAN_BACKEND_URL = process.env.GLEAN_BACKEND_URL, REDIRECT_URI = process.env.REDIRECT_URI;
const base64Url = (input) => input.toString('base64url');
const decodeJwtPart = (part) => JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
async function fetchJson(url, init) {
  const response = await fetch(url, init);
  const text = await response.text();
  if (!response.ok) throw new Error(`Request to ${url} failed (${response.status}): ${text}`);
  return JSON.parse(text);
}
function waitForOAuthCallback(redirectUri, expectedState) {
  const redirectUrl = new URL(redirectUri);
  return new Promise((resolve, reject) => {
    const server = createServer((req, res) => {
      const callbackUrl = new URL(req.url ?? '/', `${redirectUrl.protocol}//${redirectUrl.host}`);
      if (callbackUrl.pathname !== redirectUrl.pathname) { res.writeHead(404).end('Not found\n'); return; }
      if (callbackUrl.searchParams.get('state') !== expectedState) { reject(new Error('State mismatch')); return; }
      res.writeHead(200, { 'Content-Type': 'text/plain; charset=utf-8' });
      res.end('OAuth callback captured. You can return to the terminal.\n');
      server.close(() => resolve(callbackUrl.searchParams.get('code')));
    });
    server.listen(Number.parseInt(redirectUrl.port || '80', 10), redirectUrl.hostname,
                  () => console.log(`Listening for callback at ${redirectUri}`));
  });
}
const form = (fields) => ({ method: 'POST', headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
                            body: new URLSearchParams(fields).toString() });
async function main() {
  const metadata = await fetchJson(`${GLEAN_BACKEND_URL}/.well-known/oauth-authorization-server`);
  console.log(`issuer=${metadata.issuer}`);
  const state = base64Url(randomBytes(32)), codeVerifier = base64Url(randomBytes(64));
  const codeChallenge = base64Url(createHash('sha256').update(codeVerifier).digest());
  const authorizeUrl = new URL(metadata.authorization_endpoint);
  for (const [k, v] of [['response_type', 'code'], ['client_id', CLIENT_ID], ['redirect_uri', REDIRECT_URI],
                        ['state', state], ['code_challenge', codeChallenge], ['code_challenge_method', 'S256']])
    authorizeUrl.searchParams.set(k, v);
  console.log('\nOpen this URL in your browser:\n');
  console.log(authorizeUrl.toString());
  const authCode = await waitForOAuthCallback(REDIRECT_URI, state);
  const tokenResponse = await fetchJson(metadata.token_endpoint, form({ grant_type: 'authorization_code',
    code: authCode, redirect_uri: REDIRECT_URI, client_id: CLIENT_ID, client_secret: CLIENT_SECRET,
    code_verifier: codeVerifier }));
  console.log('\nToken response:\n' + JSON.stringify(tokenResponse, null, 2));
  const chatResponse = await fetchJson(`${GLEAN_BACKEND_URL}/rest/api/v1/chat`, { method: 'POST',
    headers: { Authorization: `Bearer ${tokenResponse.access_token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ messages: [{ fragments: [{ text: 'Who is on the executive team?' }] }] }) });
  console.log('\nChat response:\n' + JSON.stringify(chatResponse, null, 2));
  const [headerB64, payloadB64] = tokenResponse.access_token.split('.');
  console.log(JSON.stringify(decodeJwtPart(headerB64)), JSON.stringify(decodeJwtPart(payloadB64)));
  if (!tokenResponse.refresh_token) return;
  const refreshResponse = await fetchJson(metadata.token_endpoint, form({ grant_type: 'refresh_token',
    refresh_token: tokenResponse.refresh_token, client_id: CLIENT_ID, client_secret: CLIENT_SECRET }));
  console.log('\nRefresh response:\n' + JSON.stringify(refreshResponse, null, 2));
}
main().catch((error) => { console.error(error.message); process.exit(1); });
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_client(command, glean, rtt, env):
    """One sign-in run of `command` against `glean` with every hop `rtt` s away; return
    its figures: connections, TLS handshakes, requests, wall and callback -> exit (s)."""
    backend = DelayRelay(glean.httpd.server_address[1], rtt)  # the script's way to Glean
    browser = DelayRelay(glean.httpd.server_address[1], rtt)  # the browser's own way there
    glean.url = "https://127.0.0.1:{}".format(backend.port)
    glean.issuer = glean.url + "/oauth"
    glean.requests.clear()
    connections_before = glean.connections
    redirect_uri = "http://127.0.0.1:{}/oauth/callback".format(free_port())
    run_env = dict(script_env(glean, REDIRECT_URI=redirect_uri, SSL_CERT_FILE=certificate_file(),
                              NODE_EXTRA_CA_CERTS=certificate_file()), **env)
    started = time.monotonic()
    run = ScriptRun(run_env, python=None, command=command)
    listener = None
    try:
        url = urllib.parse.urlsplit(run.authorize_url())
        if not any(line.startswith("Listening for callback") for line in run.stdout_lines):
            run.wait_for_line(lambda line: line.startswith("Listening for callback"))  # node: after the URL
        # The browser connects to the listener while the user signs in (browsers pre-connect);
        # the clock starts when it sends the callback.
        listener = DelayRelay(urllib.parse.urlsplit(redirect_uri).port, rtt)
        callback = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=RUN_TIMEOUT)
        callback.connect()
        context = ssl.create_default_context(cafile=certificate_file())
        conn = http.client.HTTPSConnection("127.0.0.1", browser.port, timeout=RUN_TIMEOUT, context=context)
        conn.request("GET", url.path + "?" + url.query)
        location = urllib.parse.urlsplit(conn.getresponse().getheader("Location"))
        conn.close()
        called_back = time.monotonic()
        callback.request("GET", location.path + "?" + location.query)
        assert callback.getresponse().status == 200
        callback.close()
        code = run.finish()
        ended = time.monotonic()
        assert code == 0, run.output()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    for relay in (backend, browser, listener):
        relay.close()
    return {"connections": len(backend.connections),
            "handshakes": glean.connections - connections_before - len(browser.connections),
            "requests": len([r for r in glean.requests if r.path != "/oauth/authorize"]),
            "wall": ended - started, "callback_to_exit": ended - called_back}


def bench_clients():
    """The clients to compare, by name: this script, the one before kept-alive connections
    (from git, when this is a checkout), the TypeScript example (when node is here)."""
    clients = {"glean_oauth.py": [sys.executable, SCRIPT]}
    baseline = subprocess.run(["git", "-C", HERE, "show", BASELINE_COMMIT + ":glean_oauth.py"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if baseline.returncode == 0:
        path = os.path.join(tempfile.mkdtemp(), "glean_oauth_before.py")
        with open(path, "wb") as f:
            f.write(baseline.stdout)
        clients["before ({})".format(BASELINE_COMMIT)] = [sys.executable, path]
    node = shutil.which("node")
    if node:
        path = os.path.join(tempfile.mkdtemp(), "oauth-static-client.js")
        with open(path, "w") as f:
            f.write(TYPESCRIPT_EXAMPLE)
        clients["TypeScript example (node)"] = [node, path]
    return clients


def median(values):
    return statistics.median(values)


def bench_token(rounds=21):
    """`token` from the store: a valid token (no request) beside `python3 -c pass` with the
    same interpreter, interleaved; an expired one (one refresh request)."""
    def timed(command, env=None):
        started = time.monotonic()
        proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.returncode == 0, proc.stderr
        return time.monotonic() - started

    path = os.path.join(tempfile.mkdtemp(), "tokens.json")
    with StandInGlean() as glean:
        assert login(glean, path).code == 0
        # Python may keep the module's bytecode (python3 -m glean_oauth); a script is compiled on every run.
        env = dict(script_env(glean), PYTHONPATH=HERE)
        script = [sys.executable, SCRIPT, "token", "--token-file", path]
        module = [sys.executable, "-m", "glean_oauth", "token", "--token-file", path]
        timed(module, env)  # writes the bytecode cache
        bare, as_script, as_module = [], [], []
        for _ in range(rounds):
            bare.append(timed([sys.executable, "-c", "pass"], env))
            as_script.append(timed(script, env))
            as_module.append(timed(module, env))
        glean.requests.clear()
        expired = []
        for _ in range(rounds):
            expire(pathlib.Path(path))
            expired.append(timed(module, env))
        requests = len(glean.requests)
    proc = subprocess.run([sys.executable, "-X", "importtime"] + script[1:], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()}
    network = sorted(imported & {"ssl", "http.client", "urllib.request", "socket", "select"})
    print("\n`token` from the store, medians of {} interleaved runs ({}):".format(rounds, sys.executable))
    print("  python3 -c pass                       {:6.1f} ms".format(median(bare) * 1000))
    for name, runs in (("python3 glean_oauth.py token", as_script), ("python3 -m glean_oauth token", as_module)):
        print("  {:<37} {:6.1f} ms  {:.2f}x".format(name + ", valid", median(runs) * 1000, median(runs) / median(bare)))
    print("  python3 -m glean_oauth token, expired {:6.1f} ms  ({} requests in {} runs)".format(
        median(expired) * 1000, requests, rounds))
    print("  network modules a valid token imports: {}".format(", ".join(network) or "none"), flush=True)


def bench_inspect(rounds=21):
    """`inspect -` of an RS256 token with --jwks FILE beside `glean_oauth.py --version`,
    interleaved: what checking a signature adds to starting the script."""
    def timed(command, token=b""):
        started = time.monotonic()
        proc = subprocess.run(command, input=token, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.returncode == 0 and (not token or b"Signature: valid (RS256" in proc.stdout), proc.stderr
        return time.monotonic() - started

    kid, key = stand_in_key("RS256")
    token = make_jwt({"alg": "RS256", "kid": kid}, {"sub": "u", "exp": int(time.time()) + 3600}, key).encode()
    jwks = os.path.join(tempfile.mkdtemp(), "jwks.json")
    with open(jwks, "w") as f:
        json.dump(stand_in_jwks(), f)
    version, inspect = [], []
    for _ in range(rounds):
        version.append(timed([sys.executable, SCRIPT, "--version"]))
        inspect.append(timed([sys.executable, SCRIPT, "inspect", "-", "--jwks", jwks], token))
    print("\n`inspect -` with --jwks FILE, medians of {} interleaved runs:".format(rounds))
    print("  glean_oauth.py --version              {:6.1f} ms".format(median(version) * 1000))
    print("  glean_oauth.py inspect - (RS256)      {:6.1f} ms  {:.2f}x".format(
        median(inspect) * 1000, median(inspect) / median(version)), flush=True)


def bench(rounds=5, rtts=(0.0, 0.02, 0.1)):
    """`make bench`: print, per round-trip time and client, the medians of `rounds` runs;
    then the `token` and `inspect` timings."""
    clients = bench_clients()
    print("Sign-in runs over TLS, every hop delayed; medians of {} runs each.".format(rounds))
    print("{:>6}  {:<28} {:>5} {:>5} {:>5} {:>9} {:>15}".format(
        "RTT", "client", "conns", "TLS", "reqs", "wall", "callback->exit"))
    with StandInGlean(tls=True) as glean:
        glean.registered_redirect = "http://127.0.0.1/oauth/callback"
        for rtt in rtts:
            for name, command in clients.items():
                runs = [bench_client(command, glean, rtt, {}) for _ in range(rounds)]
                figures = {key: median([run[key] for run in runs]) for key in runs[0]}
                print("{:>4.0f}ms  {:<28} {:>5g} {:>5g} {:>5g} {:>8.3f}s {:>14.3f}s".format(
                    rtt * 1000, name, figures["connections"], figures["handshakes"], figures["requests"],
                    figures["wall"], figures["callback_to_exit"]), flush=True)
    bench_token()
    bench_inspect()
    return 0


if __name__ == "__main__":
    commands = {"demo": demo, "bench": bench}
    if sys.argv[1:2] not in [[name] for name in commands]:
        sys.exit("usage: python3 test_glean_oauth.py demo|bench   (the tests run with pytest)")
    sys.exit(commands[sys.argv[1]]())
