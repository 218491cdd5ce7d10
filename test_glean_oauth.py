"""Tests for glean_oauth.py, and the stand-in Glean server that `make demo` runs.

The stand-in is strict like a real authorization server: it checks the client's
credentials, PKCE, the exact redirect URI, single-use codes, refresh-token rotation and
the bearer token on the Chat API, and records every request so tests can assert on what
was sent. Everything listens on 127.0.0.1 with ports the system picks.

    python3 -m pytest test_glean_oauth.py    # the suite
    python3 test_glean_oauth.py demo         # the whole flow against the stand-in
"""

import base64
import functools
import glob
import hashlib
import http.client
import io
import json
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import pytest

    parametrize = pytest.mark.parametrize
except ImportError:  # the demo needs only the stand-in server, not pytest
    pytest = None

    def parametrize(names, values):
        return lambda test: test


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


def make_jwt(header, claims):
    """An unsigned-looking JWT: real header and claims, random bytes for a signature."""
    def part(obj):
        return b64url(json.dumps(obj).encode("utf-8"))
    return "{}.{}.{}".format(part(header), part(claims), b64url(secrets.token_bytes(32)))


class Recorded:
    """One request the stand-in received."""

    def __init__(self, method, target, headers, body):
        self.method, self.headers, self.body = method, headers, body
        self.path, _, query = target.partition("?")
        self.query = urllib.parse.parse_qs(query, keep_blank_values=True)
        self.form = {}
        if headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            self.form = urllib.parse.parse_qs(body.decode("ascii"), keep_blank_values=True)


class StandInGlean:
    """A Glean backend and OAuth authorization server on 127.0.0.1, strict like the real one.

    `overrides[path] = (status, headers, body)` answers that path with a canned response,
    for fault tests. `registered_redirect` is the redirect URI registered on the client; a
    loopback one matches any port (RFC 8252 §7.3).
    """

    def __init__(self, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                 registered_redirect="http://127.0.0.1/oauth/callback"):
        self.client_id, self.client_secret = client_id, client_secret
        self.registered_redirect = registered_redirect
        self.issue_refresh_token = True
        self.authorize_error = None  # e.g. "access_denied": the user said no
        self.overrides = {}
        self.requests = []
        self.codes = {}  # code -> what the authorization request bound it to
        self.access_tokens = set()
        self.refresh_tokens = set()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_StandInHandler, self))
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:{}".format(self.httpd.server_address[1])
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
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.url + "/oauth/authorize",
            "token_endpoint": self.url + "/oauth/token",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        }

    def paths(self, method=None):
        return [r.path for r in self.requests if method in (None, r.method)]

    def find(self, path):
        return [r for r in self.requests if r.path == path]

    # Each handler returns (status, headers, body); body is a dict (sent as JSON) or str.

    def authorize(self, request):
        q = {k: v[0] for k, v in request.query.items()}
        if q.get("client_id") != self.client_id:
            return 400, {}, "unknown client_id\n"
        if not _same_loopback_redirect(q.get("redirect_uri", ""), self.registered_redirect):
            return 400, {}, "redirect_uri is not registered on this client\n"
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256" \
                or not q.get("code_challenge"):
            return 400, {}, "PKCE S256 and response_type=code are required\n"
        answer = {"state": q.get("state", ""), "iss": self.issuer}
        if self.authorize_error:
            answer["error"] = self.authorize_error
        else:
            code = secrets.token_urlsafe(32)
            with self._lock:
                self.codes[code] = (q["code_challenge"], q["redirect_uri"], q["client_id"])
            answer["code"] = code
        location = q["redirect_uri"] + "?" + urllib.parse.urlencode(answer)
        return 302, {"Location": location}, ""

    def token(self, request):
        form = request.form
        if any(len(values) > 1 for values in form.values()):  # RFC 6749 §3.2
            return _oauth_error(400, "invalid_request", "a parameter was repeated")
        f = {k: v[0] for k, v in form.items()}
        if f.get("client_id") != self.client_id or f.get("client_secret") != self.client_secret:
            return _oauth_error(401, "invalid_client", "client authentication failed")
        with self._lock:
            if f.get("grant_type") == "authorization_code":
                return self._grant_code(f)
            if f.get("grant_type") == "refresh_token":
                return self._grant_refresh(f)
        return _oauth_error(400, "unsupported_grant_type", "")

    def _grant_code(self, f):
        bound = self.codes.pop(f.get("code", ""), None)  # a code is good once
        if bound is None:
            return _oauth_error(400, "invalid_grant", "unknown or used authorization code")
        challenge, redirect_uri, _ = bound
        if f.get("redirect_uri") != redirect_uri:
            return _oauth_error(400, "invalid_grant", "redirect_uri differs from the authorization request")
        verifier = f.get("code_verifier", "")
        if b64url(hashlib.sha256(verifier.encode("ascii")).digest()) != challenge:
            return _oauth_error(400, "invalid_grant", "PKCE verification failed")
        return 200, {}, self._issue()

    def _grant_refresh(self, f):
        token = f.get("refresh_token", "")
        if token not in self.refresh_tokens:
            return _oauth_error(400, "invalid_grant", "unknown refresh token")
        self.refresh_tokens.discard(token)  # rotation: the old one is spent
        return 200, {}, self._issue()

    def _issue(self):
        now = int(time.time())
        access_token = make_jwt(
            {"alg": "RS256", "kid": "stand-in", "typ": "JWT"},
            {"iss": self.issuer, "sub": "demo.user@example.com", "aud": self.client_id,
             "iat": now, "exp": now + 3600, "jti": secrets.token_hex(8)},
        )
        self.access_tokens.add(access_token)
        response = {"access_token": access_token, "token_type": "Bearer", "expires_in": 3600}
        if self.issue_refresh_token:
            response["refresh_token"] = secrets.token_urlsafe(32)
            self.refresh_tokens.add(response["refresh_token"])
        return response

    def chat(self, request):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or token not in self.access_tokens:
            return 401, {"WWW-Authenticate": "Bearer"}, {"error": "invalid_token"}
        question = json.loads(request.body.decode("utf-8"))["messages"][-1]["fragments"][0]["text"]
        return 200, {}, {"messages": [
            {"author": "USER", "messageType": "CONTENT", "fragments": [{"text": question}]},
            {"author": "GLEAN_AI", "messageType": "CONTENT",
             "fragments": [{"text": "The executive team is listed on the People page."}]},
        ]}


def _oauth_error(status, error, description):
    """An RFC 6749 §5.2 error response."""
    return status, {}, {"error": error, "error_description": description}


def _same_loopback_redirect(uri, registered):
    """RFC 8252 §7.3: for a loopback redirect URI, any port matches."""
    a, b = urllib.parse.urlsplit(uri), urllib.parse.urlsplit(registered)
    return (a.scheme, a.hostname, a.path, a.query) == (b.scheme, b.hostname, b.path, b.query)


class _StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, glean, *args):
        self.glean = glean
        super().__init__(*args)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._serve({"/.well-known/oauth-authorization-server": lambda r: (200, {}, self.glean.metadata()),
                     "/oauth/authorize": self.glean.authorize})

    def do_POST(self):
        self._serve({"/oauth/token": self.glean.token, "/rest/api/v1/chat": self.glean.chat})

    def _serve(self, routes):
        length = int(self.headers.get("Content-Length") or 0)
        request = Recorded(self.command, self.path, dict(self.headers), self.rfile.read(length))
        self.glean.requests.append(request)
        if request.path in self.glean.overrides:
            status, headers, body = self.glean.overrides[request.path]
        elif request.path in routes:
            status, headers, body = routes[request.path](request)
        else:
            status, headers, body = 404, {}, "not found\n"
        self._send(status, headers, body)

    def _send(self, status, headers, body):
        if isinstance(body, (dict, list)):
            data, content_type = json.dumps(body).encode("utf-8"), "application/json"
        else:
            data = body if isinstance(body, bytes) else body.encode("utf-8")
            content_type = "text/plain; charset=utf-8"
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

    def __init__(self, env, args=(), python=sys.executable, echo=(None, None)):
        self.proc = subprocess.Popen(
            [python, SCRIPT] + list(args), env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.stdout_lines, self.stderr_lines = [], []
        self._lines = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout_lines, echo[0], self._lines)),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr_lines, echo[1], None)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    @staticmethod
    def _read(stream, lines, echo, notify):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append(line)
            if echo:
                echo.write(line + "\n")
                echo.flush()
            if notify:
                notify.put(line)
        if notify:
            notify.put(None)

    def wait_for_line(self, predicate, timeout=RUN_TIMEOUT):
        """Return the first stdout line from now on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError("the script ended first:\n" + self.output())
            if predicate(line):
                return line

    def authorize_url(self):
        self.wait_for_line(lambda line: line == "Open this URL in your browser:")
        return self.wait_for_line(lambda line: line.startswith("http"))

    def finish(self, timeout=RUN_TIMEOUT):
        """Wait for the exit; return the exit code."""
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


def script_env(glean, **overrides):
    """A clean environment for the script: the stand-in's client and an ephemeral port."""
    env = {"PATH": os.environ.get("PATH", ""), "CLIENT_ID": glean.client_id,
           "CLIENT_SECRET": glean.client_secret, "GLEAN_BACKEND_URL": glean.url,
           "REDIRECT_URI": EPHEMERAL_REDIRECT_URI}
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


class Flow:
    """The result of one whole run: exit code, output, and what the browser saw."""

    def __init__(self, run, code, browser):
        self.run, self.code, self.browser = run, code, browser
        self.stdout, self.stderr = run.stdout, run.stderr


def run_flow(glean, args=(), python=sys.executable, echo=(None, None), **env):
    """Run the script end to end against `glean`, playing the browser; return a Flow."""
    run = ScriptRun(script_env(glean, **env), args, python=python, echo=echo)
    try:
        browser = play_browser(run.authorize_url())
        return Flow(run, run.finish(), browser)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()


def run_script(env, args=(), stdin=b"", python=sys.executable):
    """Run the script with no browser step; return the CompletedProcess (text)."""
    return subprocess.run([python, SCRIPT] + list(args), env=env, input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)


def demo():
    """`make demo`: the real script, end to end, against the stand-in; the browser step is
    played automatically. Returns the script's exit code."""
    with StandInGlean() as glean:
        sys.stderr.write("demo: a stand-in Glean server is listening at {}\n".format(glean.url))
        sys.stderr.write("demo: running glean_oauth.py; the browser step is played for you\n\n")
        flow = run_flow(glean, echo=(sys.stdout, sys.stderr))
        sys.stderr.write("\ndemo: the browser was shown: {}".format(flow.browser[2]))
        sys.stderr.write("demo: glean_oauth.py exited with {}\n".format(flow.code))
        return flow.code


# --- Helpers for in-process tests -------------------------------------------------------


def run_cli(environ):
    """Call glean_oauth.cli in this process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = glean_oauth.cli(environ=environ, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def good_environ(glean, **overrides):
    env = {"CLIENT_ID": glean.client_id, "CLIENT_SECRET": glean.client_secret,
           "GLEAN_BACKEND_URL": glean.url, "REDIRECT_URI": EPHEMERAL_REDIRECT_URI}
    env.update(overrides)
    return env


def assert_secret_absent(*texts):
    for text in texts:
        assert CLIENT_SECRET not in text


# --- Step 1: configuration --------------------------------------------------------------


def test_load_config_reads_the_environment_and_strips_trailing_slashes():
    config = glean_oauth.load_config({
        "CLIENT_ID": "id", "CLIENT_SECRET": "secret",
        "GLEAN_BACKEND_URL": "https://acme-be.glean.com//",
    })
    assert config.backend_url == "https://acme-be.glean.com"
    assert config.redirect_uri == "http://127.0.0.1:9090/oauth/callback"
    assert (config.client_id, config.client_secret) == ("id", "secret")


@parametrize("environ, named", [
    ({}, "CLIENT_ID, CLIENT_SECRET, GLEAN_BACKEND_URL"),
    ({"CLIENT_ID": "YOUR_STATIC_CLIENT_ID", "CLIENT_SECRET": "x", "GLEAN_BACKEND_URL": "https://a"},
     "CLIENT_ID"),
    ({"CLIENT_ID": "a", "CLIENT_SECRET": "YOUR_STATIC_CLIENT_SECRET", "GLEAN_BACKEND_URL": "https://a"},
     "CLIENT_SECRET"),
    ({"CLIENT_ID": "a", "CLIENT_SECRET": "x", "GLEAN_BACKEND_URL": "https://your-instance-be.glean.com"},
     "GLEAN_BACKEND_URL"),
    ({"CLIENT_ID": "  ", "CLIENT_SECRET": "x", "GLEAN_BACKEND_URL": "https://a"}, "CLIENT_ID"),
])
def test_missing_or_placeholder_configuration_names_what_to_set(environ, named):
    with pytest.raises(glean_oauth.FlowError) as caught:
        glean_oauth.load_config(environ)
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith("Set {} before".format(named))


def test_missing_configuration_exits_2_before_any_network_traffic():
    with StandInGlean() as glean:
        code, out, err = run_cli({"CLIENT_ID": "a", "GLEAN_BACKEND_URL": glean.url})
    assert code == 2
    assert err == "Set CLIENT_SECRET before you run this script (see --help).\n"
    assert out == ""
    assert glean.requests == []


# --- Step 3: PKCE and state -------------------------------------------------------------


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


# --- Step 5: the authorization URL ------------------------------------------------------


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


# --- Step 6: the callback ---------------------------------------------------------------


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


# --- Step 4: the listener ---------------------------------------------------------------


def wait_in_thread(listener, check, timeout=RUN_TIMEOUT):
    """Run listener.wait in a thread; return a function that joins it and gives the outcome."""
    outcome = {}

    def target():
        try:
            outcome["code"] = listener.wait(check, timeout=timeout)
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


def test_listener_answers_400_and_raises_on_a_failed_callback():
    with glean_oauth.CallbackListener(EPHEMERAL_REDIRECT_URI) as listener:
        join = wait_in_thread(listener, lambda q: glean_oauth.parse_callback(q, "s1"))
        status, _, body = http_get(listener.redirect_uri + "?code=c0de&state=forged")
        assert (status, body) == (400, "OAuth callback failed. Check the terminal for details.\n")
        assert "State mismatch" in str(join()["error"])


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


# --- Step 9: the access token's claims --------------------------------------------------


def test_decode_jwt_restores_padding():
    token = make_jwt({"alg": "RS256"}, {"sub": "a"})  # lengths that need padding back
    assert glean_oauth.decode_jwt(token) == ({"alg": "RS256"}, {"sub": "a"})


# --- The whole flow ---------------------------------------------------------------------


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
    assert flow.stderr.strip() == ""
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


PYTHONS = ["3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]


def find_python(version):
    """The pyenv CPython `version` (x.y) on this machine, or None."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(os.path.join(root, "versions", version + ".*", "bin", "python")))
    return found[-1] if found else None


@parametrize("version", PYTHONS)
def test_the_whole_flow_runs_on_every_python(version):
    python = find_python(version)
    if python is None:
        pytest.skip("no CPython {} under pyenv on this machine".format(version))
    with StandInGlean() as glean:
        flow = run_flow(glean, python=python)
    assert flow.code == 0, flow.run.output()
    assert "\nRefresh response:\n" in flow.stdout
    assert_secret_absent(flow.stdout, flow.stderr)


if __name__ == "__main__":
    if sys.argv[1:] != ["demo"]:
        sys.exit("usage: python3 test_glean_oauth.py demo   (the tests run with pytest)")
    sys.exit(demo())
