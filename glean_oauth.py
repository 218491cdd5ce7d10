#!/usr/bin/env python3
"""Get tokens from the Glean OAuth Authorization Server with a static OAuth client.

The Python counterpart of Glean's "Get tokens with a static OAuth client" example:
the authorization code flow with PKCE, a loopback redirect URI and client_secret_post,
printing every step, then a Chat API call with the access token, a local look at the
token's claims, and the refresh_token grant.

Standard library only; runs on CPython 3.6 and newer. Copy this one file anywhere.

    CLIENT_ID=... CLIENT_SECRET=... GLEAN_BACKEND_URL=https://acme-be.glean.com \\
        python3 glean_oauth.py
"""

import base64
import hashlib
import json
import os
import secrets
import select
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

__version__ = "1.0.0"

DEFAULT_REDIRECT_URI = "http://127.0.0.1:9090/oauth/callback"
# The doc's placeholders: a value still equal to one of these was never set.
PLACEHOLDERS = {
    "CLIENT_ID": "YOUR_STATIC_CLIENT_ID",
    "CLIENT_SECRET": "YOUR_STATIC_CLIENT_SECRET",
    "GLEAN_BACKEND_URL": "https://your-instance-be.glean.com",
}
METADATA_PATH = "/.well-known/oauth-authorization-server"  # RFC 8414 §3
CHAT_PATH = "/rest/api/v1/chat"
CHAT_QUESTION = "Who is on the executive team?"
CODE_PREFIX_LENGTH = 16  # how much of the authorization code is ever printed
STATE_BYTES = 32
CODE_VERIFIER_BYTES = 64  # 86 base64url characters: inside RFC 7636 §4.1's 43..128
CALLBACK_TIMEOUT_SECONDS = 300
MAX_CALLBACK_REQUEST_BYTES = 16 * 1024  # a browser's GET is a few hundred bytes

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class FlowError(Exception):
    """The flow cannot go on. The message is for the user: one line, no secrets."""

    def __init__(self, message, exit_code=EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


# --- Output -----------------------------------------------------------------------------


class Console:
    """Where the run's text goes: sections to `out`, problems to `err`.

    Every line passes through here, so this is the one place that keeps the client
    secret out of what is printed, whatever a server echoes back.
    """

    def __init__(self, out, err, secret=""):
        self.out, self.err, self.secret = out, err, secret

    def line(self, text=""):
        self._write(self.out, text)

    def section(self, title, value):
        """A blank line, `title:`, then `value` as JSON indented by 2, as the example prints."""
        self.line("\n" + title + ":")
        self.line(json.dumps(value, indent=2, ensure_ascii=False))

    def problem(self, text):
        self._write(self.err, text)

    def _write(self, stream, text):
        if self.secret:
            text = text.replace(self.secret, "[redacted]")
        text += "\n"
        try:
            stream.write(text)
        except UnicodeEncodeError:  # a C locale on an old Python: keep going, escape
            encoding = stream.encoding or "ascii"
            stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        stream.flush()  # piped output must show each step as it happens


# --- Step 1: configuration --------------------------------------------------------------


class Config:
    """What one run needs, read from the environment (doc step 1)."""

    def __init__(self, client_id, client_secret, backend_url, redirect_uri):
        self.client_id = client_id
        self.client_secret = client_secret
        self.backend_url = backend_url
        self.redirect_uri = redirect_uri


def load_config(environ):
    """Return a Config from `environ`; raise FlowError (exit 2) naming what to set."""
    values = {name: environ.get(name, "").strip() for name in PLACEHOLDERS}
    unset = [name for name, value in values.items() if value in ("", PLACEHOLDERS[name])]
    if unset:
        raise FlowError(
            "Set {} before you run this script (see --help).".format(", ".join(unset)),
            EXIT_USAGE,
        )
    return Config(
        client_id=values["CLIENT_ID"],
        client_secret=values["CLIENT_SECRET"],
        backend_url=values["GLEAN_BACKEND_URL"].rstrip("/"),
        redirect_uri=environ.get("REDIRECT_URI", "").strip() or DEFAULT_REDIRECT_URI,
    )


# --- HTTP -------------------------------------------------------------------------------


def fetch_json(url, data=None, headers=None):
    """Send one request and return the response body parsed as JSON.

    `data` (bytes) makes it a POST. A status other than 2xx raises FlowError
    `Request to <url> failed (<status>): <body>`, as the example's fetchJson does.
    """
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")
        raise FlowError("Request to {} failed ({}): {}".format(url, error.code, text))
    except urllib.error.URLError as error:
        raise FlowError("Request to {} failed: {}".format(url, error.reason))
    return json.loads(body.decode("utf-8"))


def form_post(url, fields):
    """POST `fields` as application/x-www-form-urlencoded and return the JSON answer."""
    body = urllib.parse.urlencode(fields).encode("ascii")
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return fetch_json(url, data=body, headers=headers)


# --- Step 2: discovery ------------------------------------------------------------------


def discover_metadata(backend_url):
    """Fetch the RFC 8414 authorization server metadata of `backend_url` (doc step 2)."""
    return fetch_json(backend_url + METADATA_PATH)


def print_metadata(metadata, console):
    """Print the metadata lines the example prints, one listed method a line."""
    for key in ("issuer", "authorization_endpoint", "token_endpoint"):
        console.line("{}={}".format(key, metadata.get(key)))
    for title, key in (
        ("code challenge methods", "code_challenge_methods_supported"),
        ("token endpoint auth methods", "token_endpoint_auth_methods_supported"),
    ):
        console.line("\n" + title + ":")
        for method in metadata.get(key) or []:
            console.line(str(method))


# --- Step 3: PKCE and state -------------------------------------------------------------


def base64url(data):
    """base64url without padding (RFC 7636 Appendix A)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def code_challenge_for(code_verifier):
    """The S256 code_challenge of `code_verifier` (RFC 7636 §4.2)."""
    return base64url(hashlib.sha256(code_verifier.encode("ascii")).digest())


def make_pkce():
    """Return fresh `(state, code_verifier, code_challenge)` (doc step 3)."""
    state = base64url(secrets.token_bytes(STATE_BYTES))
    code_verifier = base64url(secrets.token_bytes(CODE_VERIFIER_BYTES))
    return state, code_verifier, code_challenge_for(code_verifier)


# --- Step 4: the loopback listener ------------------------------------------------------


class CallbackListener:
    """Receives the browser's redirect on the host and port of the redirect URI (doc step 4).

    One thread and `select`: a connection that opens and sends nothing (a browser's
    pre-connect) just sits there, so it can never hold up the real callback.
    """

    def __init__(self, redirect_uri):
        parts = urllib.parse.urlsplit(redirect_uri)
        self.path = parts.path or "/"
        port = 80 if parts.port is None else parts.port  # 0: the system picks one
        self.sockets = [_listen(parts.hostname, port)]
        port = self.sockets[0].getsockname()[1]
        # With port 0 the system picked one: the redirect URI must name it.
        self.redirect_uri = urllib.parse.urlunsplit(
            parts._replace(netloc="{}:{}".format(_bracketed(parts.hostname), port))
        )

    def close(self):
        for sock in self.sockets:
            sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait(self, check, timeout=CALLBACK_TIMEOUT_SECONDS):
        """Serve until a request to the callback path arrives; return `check(query)`.

        `check` turns the callback's query string into the authorization code or raises
        FlowError. Either way the browser gets its answer before this returns.
        """
        deadline = time.monotonic() + timeout
        pending = {}  # connection -> the bytes of its request head so far
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FlowError(
                        "No callback reached {} within {} s. Check that this redirect URI "
                        "is registered on your static client and that sign-in finished in "
                        "the browser.".format(self.redirect_uri, timeout)
                    )
                readable, _, _ = select.select(self.sockets + list(pending), [], [], remaining)
                for sock in readable:
                    if sock in self.sockets:
                        conn, _ = sock.accept()
                        conn.setblocking(False)
                        pending[conn] = b""
                        continue
                    head = _read_head(sock, pending)
                    if head is not None:
                        code = self._answer(sock, head, check)
                        if code is not None:
                            return code
        finally:
            for conn in pending:
                conn.close()

    def _answer(self, conn, head, check):
        """Answer one request; return the code when it was the callback, else None."""
        method, path, query = _parse_request_head(head)
        if path != self.path:
            _respond(conn, "404 Not Found", "Not found\n")
            return None
        try:
            code = check(query)
        except FlowError:
            _respond(conn, "400 Bad Request", CALLBACK_FAILED_PAGE)
            raise
        _respond(conn, "200 OK", CALLBACK_DONE_PAGE)
        return code


CALLBACK_DONE_PAGE = "OAuth callback captured. You can return to the terminal.\n"
CALLBACK_FAILED_PAGE = "OAuth callback failed. Check the terminal for details.\n"


def _listen(host, port):
    """A listening socket on `host`:`port`; FlowError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":  # elsewhere SO_REUSEADDR lets another process share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
    except OSError as error:
        sock.close()
        raise FlowError("Cannot listen on {}:{}: {}.".format(host, port, error.strerror))
    return sock


def _bracketed(host):
    return "[{}]".format(host) if ":" in host else host


def _read_head(conn, pending):
    """Add what `conn` sent to `pending`; return its request head once complete, else None."""
    try:
        chunk = conn.recv(4096)
    except OSError:
        chunk = b""
    if not chunk:  # the peer went away without a whole request
        del pending[conn]
        conn.close()
        return None
    pending[conn] += chunk
    head = pending[conn]
    if b"\r\n\r\n" not in head and len(head) <= MAX_CALLBACK_REQUEST_BYTES:
        return None
    del pending[conn]
    return head


def _parse_request_head(head):
    """Return `(method, path, query)` from an HTTP request head (bytes)."""
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    target = parts[1] if len(parts) == 3 else ""
    path, _, query = target.partition("?")
    return parts[0], path, query


def _respond(conn, status, text):
    """Send a small text/plain answer and close `conn`."""
    body = text.encode("utf-8")
    head = (
        "HTTP/1.1 {}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Length: {}\r\n"
        "Connection: close\r\n\r\n".format(status, len(body))
    )
    try:
        conn.setblocking(True)
        conn.settimeout(5)
        conn.sendall(head.encode("ascii") + body)
    except OSError:
        pass  # the browser left; what matters is in the terminal
    finally:
        conn.close()


# --- Step 5: the authorization URL ------------------------------------------------------


def build_authorization_url(authorization_endpoint, client_id, redirect_uri, state, code_challenge):
    """The endpoint with the authorization request's parameters set (RFC 6749 §4.1.1).

    A query the endpoint already has is kept; names set here replace their old values,
    as URLSearchParams.set does in the example.
    """
    params = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("state", state),
        ("code_challenge", code_challenge),
        ("code_challenge_method", "S256"),
    ]
    parts = urllib.parse.urlsplit(authorization_endpoint)
    names = {name for name, _ in params}
    kept = [p for p in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if p[0] not in names]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept + params)))


# --- Step 6: the callback ---------------------------------------------------------------


def parse_callback(query, expected_state):
    """Return the authorization code from the callback's query string (doc step 6).

    Raises FlowError for an error response (RFC 6749 §4.1.2.1), a state that is not the
    one this run sent (§10.12: the response is not ours) or a missing code.
    """
    params = urllib.parse.parse_qs(query, keep_blank_values=True)

    def first(name):
        return params.get(name, [""])[0]

    if first("error"):
        description = first("error_description")
        raise FlowError("OAuth error: " + first("error") + (": " + description if description else ""))
    if first("state") != expected_state:
        raise FlowError("State mismatch: the callback is not the answer to this run's request.")
    if not first("code"):
        raise FlowError("Missing authorization code in callback.")
    return first("code")


# --- Steps 7 and 10: the token endpoint -------------------------------------------------


def exchange_code(metadata, config, code, code_verifier):
    """Trade the authorization code for tokens with client_secret_post (doc step 7)."""
    return form_post(metadata["token_endpoint"], [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", config.redirect_uri),
        ("client_id", config.client_id),
        ("client_secret", config.client_secret),
        ("code_verifier", code_verifier),
    ])


def refresh_tokens(metadata, config, refresh_token):
    """Use the refresh_token grant (RFC 6749 §6; doc step 10)."""
    return form_post(metadata["token_endpoint"], [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("client_id", config.client_id),
        ("client_secret", config.client_secret),
    ])


# --- Step 8: the Chat API ---------------------------------------------------------------


def chat_request_body(question=CHAT_QUESTION):
    """The example's request body, serialized as JSON.stringify does (no spaces)."""
    body = {"messages": [{"fragments": [{"text": question}]}]}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def call_chat_api(backend_url, access_token):
    """POST one question to the Chat API with the access token as a bearer token."""
    headers = {"Authorization": "Bearer " + access_token, "Content-Type": "application/json"}
    return fetch_json(backend_url + CHAT_PATH, data=chat_request_body(), headers=headers)


# --- Step 9: the access token's claims --------------------------------------------------


def decode_jwt_part(part):
    """Decode one base64url JWT segment as JSON; ValueError when it is not that."""
    if not part:
        raise ValueError("Missing JWT segment")
    padded = part + "=" * (-len(part) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8"))


def decode_jwt(token):
    """Return the `(header, claims)` of a JWT without verifying its signature."""
    segments = token.split(".")
    return decode_jwt_part(segments[0]), decode_jwt_part(segments[1] if len(segments) > 1 else "")


# --- The flow ---------------------------------------------------------------------------


def main(config, console):
    """The documented flow, step by step. Returns the exit code; raises FlowError."""
    # 2. Discover the authorization server's metadata (RFC 8414).
    metadata = discover_metadata(config.backend_url)
    print_metadata(metadata, console)

    # 3. PKCE (RFC 7636) and state.
    state, code_verifier, code_challenge = make_pkce()

    # 4. Listen before the URL is shown, so a fast browser cannot arrive first.
    with CallbackListener(config.redirect_uri) as listener:
        config.redirect_uri = listener.redirect_uri
        console.line("\nListening for callback at " + config.redirect_uri)

        # 5. The authorization URL.
        authorize_url = build_authorization_url(
            metadata["authorization_endpoint"], config.client_id, config.redirect_uri,
            state, code_challenge,
        )
        console.line("\nOpen this URL in your browser:\n")
        console.line(authorize_url)

        # 6. The callback: error, state and code checks.
        code = listener.wait(lambda query: parse_callback(query, state))
    console.line("\nCaptured auth code prefix: " + code[:CODE_PREFIX_LENGTH])

    # 7. Exchange the code for tokens (client_secret_post).
    token_response = exchange_code(metadata, config, code, code_verifier)
    console.section("Token response", token_response)

    # 8. Call the Chat API with the access token.
    chat_response = call_chat_api(config.backend_url, token_response["access_token"])
    console.section("Chat response", chat_response)

    # 9. Decode the access token locally.
    header, claims = decode_jwt(token_response["access_token"])
    console.section("JWT header", header)
    console.section("JWT claims", claims)
    console.line("\nThis does not verify the signature.")

    # 10. Use the refresh token.
    if not token_response.get("refresh_token"):
        console.line("\nNo refresh token was returned")
        return EXIT_OK
    refresh_response = refresh_tokens(metadata, config, token_response["refresh_token"])
    console.section("Refresh response", refresh_response)
    return EXIT_OK


def cli(environ=None, out=None, err=None):
    """Run from the command line: read the configuration, run the flow, and turn
    whatever stops it into one line on stderr and an exit code."""
    console = Console(out or sys.stdout, err or sys.stderr)
    try:
        # 1. Configuration from the environment.
        config = load_config(os.environ if environ is None else environ)
        console.secret = config.client_secret
        return main(config, console)
    except FlowError as error:
        console.problem(str(error))
        return error.exit_code


if __name__ == "__main__":
    sys.exit(cli())
