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

import argparse
import base64
import datetime
import errno
import functools
import hashlib
import io
import ipaddress
import json
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import urllib.parse

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
HTTP_TIMEOUT_SECONDS = 30
CALLBACK_TIMEOUT_SECONDS = 300
MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # far above any token or chat answer
MAX_LINE_BYTES = 1024 * 1024  # one line of a streamed answer
MAX_STREAM_BYTES = 64 * 1024 * 1024  # a whole streamed answer: deltas repeat their envelope
MAX_JSON_DEPTH = 64  # Glean's answers nest a few levels; deeper is an attack
MAX_CALLBACK_REQUEST_BYTES = 16 * 1024  # a browser's GET is a few hundred bytes
MAX_PENDING_CONNECTIONS = 64  # idle ones beyond this are dropped, oldest first (select's limits)
EXCERPT_CHARACTERS = 300  # how much of an unexpected body an error message shows
USER_AGENT = "glean-oauth/{} Python/{}.{}".format(__version__, *sys.version_info[:2])

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class FlowError(Exception):
    """The flow cannot go on. The message is for the user: one line, no secrets.

    `status` is the HTTP status when a server's answer was the problem.
    """

    def __init__(self, message, exit_code=EXIT_FAILURE, status=None):
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


def printable(text, keep=""):
    """`text` with control and other unprintable characters (but those in `keep`) made spaces.

    Text from a server or a browser goes through here before it reaches a terminal, so
    it cannot move the cursor, recolour, or hide what follows (escape injection).
    """
    return "".join(c if c.isprintable() or c in keep else " " for c in text)


def one_line(text):
    """`text` made printable, on one line."""
    return " ".join(printable(text).split())


def json_text(value):
    """`value` as JSON indented by 2, as the example prints it, with every unprintable
    character escaped (json.dumps leaves C1 controls and bidi overrides raw)."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return "".join(c if c.isprintable() or c == "\n" else json.dumps(c)[1:-1] for c in text)


# --- Output -----------------------------------------------------------------------------


class Console:
    """Where the run's text goes: sections to `out`, problems to `err`.

    Every line passes through here, so this is the last guard that keeps the client
    secret (in every form in `secrets`) out of what is printed, whatever a server
    echoes back.
    """

    def __init__(self, out, err):
        self.out, self.err = out, err
        self.secrets = []  # every form of the client secret that a server could echo back
        self.json_out = out  # where --json's object goes, when `out` is moved to stderr

    def line(self, text=""):
        self._write(self.out, text)

    def section(self, title, value):
        """A blank line, `title:`, then `value` as JSON indented by 2, as the example prints."""
        self.line("\n" + title + ":")
        self.line(json_text(value))

    def problem(self, text):
        self._write(self.err, one_line(text))

    def note(self, text):
        """Extra text for a person (a hint, the chat answer) on stderr, keeping its lines."""
        self._write(self.err, printable(text, keep="\n\t"))

    def result(self, value):
        """The one JSON object of --json, on stdout."""
        self._write(self.json_out, json_text(value))

    def _write(self, stream, text):
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        text += "\n"
        try:
            stream.write(text)
        except UnicodeEncodeError:  # a C locale on an old Python: keep going, escape
            encoding = stream.encoding or "ascii"
            stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        stream.flush()  # piped output must show each step as it happens


# --- Step 1: configuration --------------------------------------------------------------


HELP_EPILOG = """\
environment variables (a flag wins over its variable):
  CLIENT_ID               the static OAuth client's id (--client-id)
  CLIENT_SECRET           its secret; never a flag, since flags end up in shell
                          history and ps. Unset on a terminal: asked for, hidden.
  GLEAN_BACKEND_URL       e.g. https://acme-be.glean.com (--backend-url)
  REDIRECT_URI            default http://127.0.0.1:9090/oauth/callback (--redirect-uri);
                          must be registered on the client. Port 0: any free port.
  GLEAN_SCOPES            scopes to ask for, space-separated (--scope)
  GLEAN_HTTP_TIMEOUT      seconds each HTTP request may take, default 30
  GLEAN_CALLBACK_TIMEOUT  seconds to wait for the browser, default 300
  REFRESH_TOKEN           the refresh token for --refresh (wins over --token-file's)
  HTTPS_PROXY, NO_PROXY   the proxy for https:// requests, and where not to use it
  SSL_CERT_FILE           a CA bundle to trust (a corporate CA), also SSL_CERT_DIR
  BROWSER                 the browser to open the URL with

examples:
  python3 glean_oauth.py                                  the documented flow
  python3 glean_oauth.py --scope "chat search offline_access" --token-file tokens.json
  python3 glean_oauth.py --refresh --token-file tokens.json
  python3 glean_oauth.py --manual                         on a machine with no browser
  python3 glean_oauth.py --json --no-chat | jq -r .token_response.access_token

exit codes: 0 done; 1 the flow failed (a request, the callback, the chat call);
2 bad configuration or usage; 130 interrupted (Ctrl-C).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line and exit code 2, like every other configuration error."""
        self.exit(EXIT_USAGE, "{}: {} (see --help)\n".format(self.prog, message))


def build_parser():
    parser = _Parser(
        prog="glean_oauth.py",
        description="Get tokens from the Glean OAuth Authorization Server with a static OAuth\n"
                    "client, printing every step, then call the Chat API with the access token.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--version", action="version", version="%(prog)s " + __version__)
    add("--backend-url", metavar="URL", help="the Glean backend (GLEAN_BACKEND_URL)")
    add("--client-id", metavar="ID", help="the static client's id (CLIENT_ID)")
    add("--redirect-uri", metavar="URI", help="the registered loopback redirect URI (REDIRECT_URI)")
    add("--auth-method", choices=list(CLIENT_AUTH), default="client_secret_post",
        help="how the client authenticates at the token endpoint (default: %(default)s, the doc's)")
    add("--scope", metavar="SCOPES", help='scopes to ask for, e.g. "chat search offline_access" (GLEAN_SCOPES)')
    add("--no-browser", dest="open_browser", action="store_false", help="only print the URL; do not open a browser")
    add("--manual", action="store_true",
        help="no listener: open the URL anywhere, then paste the address the browser was redirected to")
    add("--message", metavar="TEXT", default=CHAT_QUESTION, help="the question for the Chat API")
    add("--no-chat", dest="chat", action="store_false", help="skip the Chat API call")
    add("--json", action="store_true", help="print one JSON object on stdout; everything else goes to stderr")
    add("--token-file", metavar="PATH",
        help="save the final tokens here as JSON, readable by you only (0600), written atomically")
    add("--refresh", action="store_true",
        help="skip sign-in: refresh the token in --token-file (or REFRESH_TOKEN) and save the result")
    add("--http-timeout", metavar="SECONDS", help="seconds each HTTP request may take (GLEAN_HTTP_TIMEOUT)")
    add("--callback-timeout", metavar="SECONDS", help="seconds to wait for the browser (GLEAN_CALLBACK_TIMEOUT)")
    return parser


def load_config(argv, environ, ask_secret=None):
    """Return the run's settings from `argv`, then `environ`, then the defaults (doc step 1).

    `ask_secret(prompt)` is called for the client secret when CLIENT_SECRET is unset and
    the auth method needs one. Raises FlowError (exit 2) naming what to fix.
    """
    config = build_parser().parse_args(argv)

    def setting(flag_value, name, default=""):
        value = (environ.get(name, "") if flag_value is None else flag_value).strip()
        return value or default

    config.client_id = setting(config.client_id, "CLIENT_ID")
    config.backend_url = setting(config.backend_url, "GLEAN_BACKEND_URL").rstrip("/")
    config.client_secret = environ.get("CLIENT_SECRET", "").strip()
    needs_secret = config.auth_method != "none"  # a public client has none
    unset = [name for name, value in (("CLIENT_ID", config.client_id), ("CLIENT_SECRET", config.client_secret),
                                      ("GLEAN_BACKEND_URL", config.backend_url))
             if value in ("", PLACEHOLDERS[name]) and (needs_secret or name != "CLIENT_SECRET")]
    # The secret alone can be asked for, once all else is known to be right.
    ask = unset == ["CLIENT_SECRET"] and ask_secret
    if unset and not ask:
        raise FlowError("Set {} before you run this script (see --help).".format(", ".join(unset)), EXIT_USAGE)
    check_transport(config.backend_url, "GLEAN_BACKEND_URL", EXIT_USAGE)
    config.redirect_uri = setting(config.redirect_uri, "REDIRECT_URI", DEFAULT_REDIRECT_URI)
    check_redirect_uri(config.redirect_uri)
    config.scope = " ".join(setting(config.scope, "GLEAN_SCOPES").split())
    config.http_timeout = seconds(config.http_timeout, environ, "GLEAN_HTTP_TIMEOUT", HTTP_TIMEOUT_SECONDS)
    config.callback_timeout = seconds(config.callback_timeout, environ, "GLEAN_CALLBACK_TIMEOUT",
                                      CALLBACK_TIMEOUT_SECONDS)
    config.refresh_token = environ.get("REFRESH_TOKEN", "").strip()
    if config.refresh and not (config.token_file or config.refresh_token):
        raise FlowError("--refresh needs a refresh token: give --token-file PATH, or set REFRESH_TOKEN.", EXIT_USAGE)
    if ask:
        config.client_secret = ask_secret("Client secret for {}: ".format(config.client_id)).strip()
        if not config.client_secret:
            raise FlowError("Set CLIENT_SECRET before you run this script (see --help).", EXIT_USAGE)
    return config


def seconds(flag_value, environ, name, default):
    """The positive number of seconds in the flag, else `environ[name]`, else `default`."""
    text = (environ.get(name, "") if flag_value is None else flag_value).strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value < float("inf"):
        raise FlowError("{} must be a positive number of seconds, not {!r}.".format(name, text), EXIT_USAGE)
    return value


def is_loopback(host):
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(url, name, exit_code=EXIT_FAILURE):
    """Refuse a URL that credentials must not be sent to (RFC 6749 §1.6, §3.1, §3.2).

    Secrets, codes and tokens go only over TLS, or over plain HTTP that never leaves
    this machine.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and (parts.scheme == "https" or parts.scheme == "http" and is_loopback(parts.hostname)):
        return
    raise FlowError(
        "{} must be an https:// URL (http:// only for 127.0.0.1, [::1] or localhost), "
        "not {}.".format(name, url),
        exit_code,
    )


def check_redirect_uri(redirect_uri):
    """Refuse a redirect URI this script cannot safely listen on (RFC 8252 §7.3, §8.3)."""
    parts = urllib.parse.urlsplit(redirect_uri)
    try:
        port_ok = parts.port is None or parts.port >= 0  # urllib raises for a bad one
    except ValueError:
        port_ok = False
    problem = None
    if parts.scheme != "http":
        problem = "it must start with http:// (the listener is plain HTTP on this machine)"
    elif not is_loopback(parts.hostname):
        problem = "its host must be 127.0.0.1, [::1] or localhost, so that only this machine can receive the code"
    elif not port_ok:
        problem = "its port is not a number from 0 to 65535"
    elif parts.fragment:
        problem = "it must not have a #fragment (RFC 6749 §3.1.2)"
    if problem:
        raise FlowError("REDIRECT_URI {} is refused: {}.".format(redirect_uri, problem), EXIT_USAGE)


# --- Answers: what a server says, parsed with care -------------------------------------


def parse_json(text):
    """JSON as RFC 8259 has it. ValueError for what Python's json takes but no JSON
    parser need (NaN, Infinity, numbers too large for a float, which --json could not
    print back as JSON) and for nesting deeper than MAX_JSON_DEPTH (which would crash
    the printing)."""
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply")
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError("nested deeper than {} levels".format(MAX_JSON_DEPTH))
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


def _not_json(name):
    raise ValueError("{} is not JSON".format(name))


def _finite(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("{} is too large a number".format(text))
    return value


def excerpt(body, redact=()):
    """The start of a response body, on one line, for an error message; each of `redact`
    is replaced first, since a secret cut in two by the excerpt could not be."""
    text = body.decode("utf-8", "replace")
    for secret in redact:
        text = text.replace(secret, "[redacted]")
    text = one_line(text)
    return text if len(text) <= EXCERPT_CHARACTERS else text[:EXCERPT_CHARACTERS] + "..."


def json_object(url, response, redact=()):
    """The Response's body parsed as a JSON object; FlowError (showing it less `redact`)
    when it is anything else."""
    try:
        value = parse_json(response.body.decode("utf-8"))
    except ValueError:  # also UnicodeDecodeError
        value = None
    if not isinstance(value, dict):
        raise FlowError("Response from {} ({}) is not a JSON object: {}".format(
            url, response.status, excerpt(response.body, redact)), status=response.status)
    return value


def fetch_json(url, data=None, headers=None, deadline=None):
    """Send one request and return its JSON object answer.

    A status other than 2xx raises FlowError `Request to <url> failed (<status>): <body>`,
    as the example's fetchJson does.
    """
    response = http_request(url, data, headers, deadline)
    if not 200 <= response.status < 300:
        raise FlowError("Request to {} failed ({}): {}".format(url, response.status, excerpt(response.body)),
                        status=response.status)
    return json_object(url, response)


def token_request(token_endpoint, fields, headers=None, timeout=HTTP_TIMEOUT_SECONDS, redact=()):
    """POST `fields` to the token endpoint as a form; return the token response.

    An RFC 6749 §5.2 error answer becomes `token request failed (400): invalid_grant:
    <error_description>`. An answer without an access token is an error too. Error
    messages show the answer with each of `redact` (the secret's forms) blanked out.
    """
    body = urllib.parse.urlencode(fields).encode("ascii")
    headers = dict(headers or {}, **{"Content-Type": "application/x-www-form-urlencoded"})
    answer = http_request(token_endpoint, body, headers, Deadline(timeout))
    if not 200 <= answer.status < 300:
        error = _oauth_error(answer.body, redact)
        if error:
            raise FlowError("token request failed ({}): {}".format(answer.status, error), status=answer.status)
        raise FlowError("Request to {} failed ({}): {}".format(
            token_endpoint, answer.status, excerpt(answer.body, redact)), status=answer.status)
    response = json_object(token_endpoint, answer, redact)
    if not isinstance(response.get("access_token"), str) or not response["access_token"]:
        raise FlowError("The token response from {} has no access_token: {}".format(
            token_endpoint, excerpt(answer.body, redact)))
    return response


def _oauth_error(body, redact=()):
    """`error: error_description` from an RFC 6749 §5.2 error body, or None."""
    try:
        value = parse_json(body.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("error"), str):
        return None
    description = value.get("error_description")
    return excerpt((value["error"] + (": " + str(description) if description else "")).encode("utf-8"), redact)


# --- Step 2: discovery ------------------------------------------------------------------


def discover_metadata(config):
    """Fetch the RFC 8414 authorization server metadata of the backend (doc step 2)."""
    return fetch_json(config.backend_url + METADATA_PATH, deadline=Deadline(config.http_timeout))


def check_metadata(metadata, auth_method="client_secret_post"):
    """Refuse metadata this flow cannot use: no endpoints, no PKCE S256, an endpoint
    that would carry credentials in the clear, or a list of token endpoint auth methods
    without `auth_method`. Glean's issuer may differ from the backend URL (it can be
    `{backend}/oauth`), so it is shown, not compared."""
    missing = [key for key in ("authorization_endpoint", "token_endpoint")
               if not isinstance(metadata.get(key), str) or not metadata[key]]
    if missing:
        raise FlowError("The authorization server metadata has no {}.".format(" and no ".join(missing)))
    methods = metadata.get("code_challenge_methods_supported")
    if methods is not None and "S256" not in methods:
        raise FlowError("The authorization server does not offer PKCE S256 (its "
                        "code_challenge_methods_supported is {}); this flow needs it.".format(json.dumps(methods)))
    for key in ("authorization_endpoint", "token_endpoint"):
        check_transport(metadata[key], "The metadata's " + key)
    offered = metadata.get("token_endpoint_auth_methods_supported")
    if offered is not None and auth_method not in offered:
        raise FlowError("The token endpoint does not accept {} (it offers {}); choose one with "
                        "--auth-method.".format(auth_method, ", ".join(map(str, offered)) or "none"))


def discover(config, console):
    """Doc step 2: fetch, print and check the metadata; return it."""
    metadata = discover_metadata(config)
    print_metadata(metadata, console)
    check_metadata(metadata, config.auth_method)
    return metadata


def print_metadata(metadata, console):
    """Print the metadata lines the example prints, one listed method a line."""
    for key in ("issuer", "authorization_endpoint", "token_endpoint"):
        console.line("{}={}".format(key, one_line(str(metadata.get(key)))))
    for title, key in (
        ("code challenge methods", "code_challenge_methods_supported"),
        ("token endpoint auth methods", "token_endpoint_auth_methods_supported"),
    ):
        console.line("\n" + title + ":")
        for method in metadata.get(key) or []:
            console.line(one_line(str(method)))


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

    It listens on loopback only (RFC 8252 §8.3), so no other machine can send it a code.
    One thread and `select`: a connection that opens and sends nothing (a browser's
    pre-connect) just sits there, so it can never hold up the real callback.
    """

    def __init__(self, redirect_uri):
        parts = urllib.parse.urlsplit(redirect_uri)
        self.path = parts.path or "/"
        port = 80 if parts.port is None else parts.port  # 0: the system picks one
        # Browsers may resolve localhost to either address, so listen on both.
        hosts = ["127.0.0.1", "::1"] if parts.hostname.lower() == "localhost" else [parts.hostname]
        self.sockets = [_listen(hosts[0], port)]
        port = self.sockets[0].getsockname()[1]
        try:
            for host in hosts[1:]:
                sock = _listen(host, port, optional=True)
                if sock:
                    self.sockets.append(sock)
        except FlowError:
            self.close()
            raise
        # With port 0 the system picked one: the redirect URI must name it.
        self.redirect_uri = urllib.parse.urlunsplit(
            parts._replace(netloc="{}:{}".format(_bracketed(parts.hostname), port))
        )
        self.announcement = "Listening for callback at " + self.redirect_uri

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
        import select  # here: only a sign-in listens

        deadline = time.monotonic() + timeout
        pending = {}  # connection -> the bytes of its request head so far
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FlowError(
                        "No callback reached {} within {:g} s. Check that this redirect URI "
                        "is registered on your static client and that sign-in finished in "
                        "the browser (GLEAN_CALLBACK_TIMEOUT sets the limit in seconds)."
                        .format(self.redirect_uri, timeout)
                    )
                readable, _, _ = select.select(self.sockets + list(pending), [], [], remaining)
                for sock in readable:
                    if sock in self.sockets:
                        try:
                            conn, _ = sock.accept()
                        except OSError:  # the peer gave up before we took it
                            continue
                        conn.setblocking(False)
                        if len(pending) >= MAX_PENDING_CONNECTIONS:
                            oldest = next(iter(pending))  # dicts keep insertion order
                            del pending[oldest]
                            oldest.close()
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
        if b"\r\n\r\n" not in head:
            _respond(conn, "431 Request Header Fields Too Large", "Request too large\n")
            return None
        method, path, query = _parse_request_head(head)
        if path != self.path:
            _respond(conn, "404 Not Found", "Not found\n")
            return None
        if method != "GET":
            _respond(conn, "405 Method Not Allowed", "Method not allowed\n", "Allow: GET\r\n")
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


def _listen(host, port, optional=False):
    """A listening socket on `host`:`port`.

    FlowError when the port is taken; with `optional`, None when this machine has no
    such address (no IPv6), since the other address is enough.
    """
    import socket  # here: only a sign-in listens

    address = "{}:{}".format(_bracketed(host), port)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        if optional:
            return None
        raise FlowError("Cannot listen on {}: this machine has no such address.".format(address))
    try:
        if os.name == "posix":  # elsewhere SO_REUSEADDR lets another process share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
        return sock
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise FlowError(
                "Port {} on {} is already in use (another run of this script?). Stop what "
                "holds it, or register another loopback redirect URI on your client and set "
                "REDIRECT_URI to it.".format(port, _bracketed(host)), EXIT_USAGE)
        if optional and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return None
        raise FlowError("Cannot listen on {}: {}.".format(address, error.strerror or error))


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


def _respond(conn, status, text, extra_headers=""):
    """Send a small fixed text/plain page and close `conn`.

    The page never echoes the request, is not cached (it follows a URL holding the
    code), and sends no Referer onward.
    """
    body = text.encode("utf-8")
    head = (
        "HTTP/1.1 {}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Length: {}\r\n"
        "Cache-Control: no-store\r\n"
        "Referrer-Policy: no-referrer\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "{}"
        "Connection: close\r\n\r\n".format(status, len(body), extra_headers)
    )
    try:
        conn.setblocking(True)
        conn.settimeout(5)
        conn.sendall(head.encode("ascii") + body)
    except OSError:
        pass  # the browser left; what matters is in the terminal
    finally:
        conn.close()


class PastedRedirect:
    """--manual: no listener. The user signs in on any machine and pastes the address the
    browser was sent to (it fails to load, which is expected); the same checks apply."""

    def __init__(self, redirect_uri, stdin, console):
        self.redirect_uri, self.stdin, self.console = redirect_uri, stdin, console
        self.announcement = "No listener (--manual): the redirect is read from this terminal."

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def wait(self, check, timeout=None):
        """Read one pasted address; return `check(its query)`."""
        self.console.note("\nPaste the address your browser was redirected to (the page will not load; "
                          "that is expected), then press Enter:")
        pasted = self.stdin.readline().strip()
        if not pasted:
            raise FlowError("No address was pasted.")
        return check(urllib.parse.urlsplit(pasted).query)


def open_receiver(config, console, stdin):
    """The receiver of the authorization response: the listener, or the paste (--manual)."""
    if config.manual:
        return PastedRedirect(config.redirect_uri, stdin, console)
    return CallbackListener(config.redirect_uri)


# --- Step 5: the authorization URL ------------------------------------------------------


def build_authorization_url(authorization_endpoint, client_id, redirect_uri, state, code_challenge, scope=""):
    """The endpoint with the authorization request's parameters set (RFC 6749 §4.1.1).

    A query the endpoint already has is kept; names set here replace their old values,
    as URLSearchParams.set does in the example. `scope` is sent only when given.
    """
    params = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("state", state),
        ("code_challenge", code_challenge),
        ("code_challenge_method", "S256"),
    ] + ([("scope", scope)] if scope else [])
    parts = urllib.parse.urlsplit(authorization_endpoint)
    names = {name for name, _ in params}
    kept = [p for p in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if p[0] not in names]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept + params)))


def open_browser(url, environ):
    """Open `url` in the user's browser where there is a graphical one, or BROWSER says
    which; never a text browser in this terminal. Returns True when one was started."""
    import webbrowser  # here: it is slow to import and only this step needs it

    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return False
    if isinstance(browser, webbrowser.GenericBrowser) and not environ.get("BROWSER"):
        return False  # lynx, w3m and the like: they would take over the terminal
    # Some browsers (and BROWSER commands) only return when closed: do not wait for them.
    threading.Thread(target=browser.open, args=(url,), daemon=True).start()
    return True


# --- Step 6: the callback ---------------------------------------------------------------


def parse_callback(query, expected_state, issuer=None, iss_required=False):
    """Return the authorization code from the callback's query string (doc step 6).

    Raises FlowError for a response from another issuer (RFC 9207 §2.4: an `iss` that
    is not `issuer`, compared as plain strings, or none when `iss_required`), an error
    response (RFC 6749 §4.1.2.1), a state that is not the one this run sent (§10.12:
    the response is not ours) or a missing code.
    """
    params = urllib.parse.parse_qs(query, keep_blank_values=True)

    def first(name):
        return params.get(name, [""])[0]

    if "iss" in params and first("iss") != issuer:
        raise FlowError("Issuer mismatch: the callback's iss {} is not the metadata's issuer {} "
                        "(RFC 9207).".format(first("iss"), issuer))
    if "iss" not in params and iss_required:
        raise FlowError("The callback has no iss, though the metadata says the server sends it (RFC 9207).")
    if first("error"):
        description = first("error_description")
        raise FlowError("OAuth error: " + first("error") + (": " + description if description else ""))
    if first("state") != expected_state:
        raise FlowError("State mismatch: the callback is not the answer to this run's request.")
    if not first("code"):
        raise FlowError("Missing authorization code in callback.")
    return first("code")


# --- Steps 7 and 10: the token endpoint -------------------------------------------------


def _client_secret_post(client_id, client_secret):
    """The doc's method: id and secret in the form body (RFC 6749 §2.3.1)."""
    return [("client_id", client_id), ("client_secret", client_secret)], {}


def _client_secret_basic(client_id, client_secret):
    """HTTP Basic, each part form-urlencoded first, as RFC 6749 §2.3.1 requires."""
    pair = "{}:{}".format(urllib.parse.quote_plus(client_id), urllib.parse.quote_plus(client_secret))
    return [], {"Authorization": "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")}


def _no_client_auth(client_id, client_secret):
    """A public client: it only names itself (RFC 6749 §3.2.1)."""
    return [("client_id", client_id)], {}


def secret_forms(client_id, client_secret):
    """The client secret as typed and as it goes on the wire (form-encoded, and inside
    the Basic credential): what must never be printed, longest first."""
    if not client_secret:
        return []
    forms = {client_secret, urllib.parse.quote_plus(client_secret), urllib.parse.quote(client_secret, safe="")}
    forms.add(_client_secret_basic(client_id, client_secret)[1]["Authorization"].split(" ", 1)[1])
    return sorted(forms, key=len, reverse=True)


# Token endpoint authentication, one row a method (RFC 7591 §2 names them).
CLIENT_AUTH = {
    "client_secret_post": _client_secret_post,
    "client_secret_basic": _client_secret_basic,
    "none": _no_client_auth,
}


def _grant(metadata, config, grant_fields, after_auth=()):
    """POST a grant to the token endpoint, authenticated as --auth-method says. The
    client's fields go between `grant_fields` and `after_auth`, where the doc puts them."""
    auth_fields, headers = CLIENT_AUTH[config.auth_method](config.client_id, config.client_secret)
    fields = list(grant_fields) + auth_fields + list(after_auth)
    return token_request(metadata["token_endpoint"], fields, headers, config.http_timeout,
                         redact=secret_forms(config.client_id, config.client_secret))


def exchange_code(metadata, config, code, code_verifier):
    """Trade the authorization code for tokens (doc step 7)."""
    grant = [("grant_type", "authorization_code"), ("code", code), ("redirect_uri", config.redirect_uri)]
    return _grant(metadata, config, grant, [("code_verifier", code_verifier)])


def refresh_tokens(metadata, config, refresh_token):
    """Use the refresh_token grant (RFC 6749 §6; doc step 10)."""
    return _grant(metadata, config, [("grant_type", "refresh_token"), ("refresh_token", refresh_token)])


# --- Step 8: the Chat API ---------------------------------------------------------------


def chat_request_body(question=CHAT_QUESTION):
    """The example's request body, serialized as JSON.stringify does (no spaces)."""
    body = {"messages": [{"fragments": [{"text": question}]}]}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def call_chat_api(config, access_token):
    """POST one question to the Chat API with the access token as a bearer token."""
    headers = {"Authorization": "Bearer " + access_token, "Content-Type": "application/json"}
    body = chat_request_body(config.message)
    return fetch_json(config.backend_url + CHAT_PATH, body, headers, Deadline(config.http_timeout))


def chat_answer(chat_response):
    """The text of the answer: the CONTENT fragments of the last message that is not the
    user's, or "" when there is none. Other message types and fragments without text
    (citations, query suggestions) are passed over."""
    messages = chat_response.get("messages")
    for message in reversed(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict) or message.get("author") == "USER" \
                or message.get("messageType", "CONTENT") != "CONTENT":
            continue
        fragments = message.get("fragments")
        return "".join(fragment["text"] for fragment in (fragments if isinstance(fragments, list) else [])
                       if isinstance(fragment, dict) and isinstance(fragment.get("text"), str))
    return ""


# --- Step 9: the access token's claims --------------------------------------------------


JWT_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")  # base64url, no padding (RFC 7515 §2)


def decode_jwt_part(part):
    """Decode one JWT segment to its JSON object; ValueError when it is not that."""
    if not JWT_SEGMENT.match(part):
        raise ValueError("not base64url")
    value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def decode_jwt(token):
    """Return the `(header, claims)` of a JWS-compact JWT, without verifying its signature.

    Raises ValueError when the token is not such a JWT (an opaque token, say).
    """
    segments = token.split(".")
    if len(segments) != 3:
        raise ValueError("not three segments")
    return decode_jwt_part(segments[0]), decode_jwt_part(segments[1])


def print_jwt(access_token, console):
    """Print the access token's header and claims (doc step 9), or say there are none.
    Returns `(header, claims)`, or `(None, None)` for a token that is not a JWT."""
    try:
        header, claims = decode_jwt(access_token)
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSON errors are ValueErrors
        console.line("\nThe access token is not a JWT, nothing to decode.")
        return None, None
    console.section("JWT header", header)
    console.section("JWT claims", claims)
    console.line("\nThis does not verify the signature.")
    return header, claims


# --- Keeping the tokens -----------------------------------------------------------------


class Results:
    """What a run obtained, kept for --json and --token-file even when a later step fails:
    `sections` by name (metadata, token_response, ...) and the newest `tokens`."""

    def __init__(self):
        self.sections = {}
        self.tokens = None

    def got_tokens(self, response, used_refresh_token=None):
        """Record a token response; one without a refresh token keeps the one used (RFC 6749 §6)."""
        self.tokens = dict(response)
        if not response.get("refresh_token") and used_refresh_token:
            self.tokens["refresh_token"] = used_refresh_token


def token_file_contents(tokens, obtained_at):
    """The tokens, when they were obtained and when the access token expires (UTC, ISO 8601)."""
    contents = dict(tokens, obtained_at=_iso(obtained_at))
    expires_in = tokens.get("expires_in")
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool):
        contents["expires_at"] = _iso(obtained_at + expires_in)
    return contents


def _iso(timestamp):
    return datetime.datetime.fromtimestamp(int(timestamp), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_token_file(path, contents):
    """Write `contents` as JSON to `path`: owner-only from the start (0600), atomically
    (a temporary file in the same folder, flushed, fsynced, renamed), never through a
    symlink. A crash mid-write leaves the old file whole."""
    if os.path.islink(path):
        raise FlowError("Not writing tokens through the symlink {}; give the real path.".format(path))
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".glean-oauth-", suffix=".tmp", dir=folder)  # mode 0600
    except OSError as error:
        raise FlowError("Cannot write the token file {}: {}.".format(path, error.strerror or error))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(contents, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        os.unlink(temporary)
        if isinstance(error, OSError):
            raise FlowError("Cannot write the token file {}: {}.".format(path, error.strerror or error))
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_refresh_token(path):
    """The refresh token saved in the token file at `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise FlowError("Cannot read the token file {}: {}.".format(path, getattr(error, "strerror", None) or error),
                        EXIT_USAGE)
    token = saved.get("refresh_token") if isinstance(saved, dict) else None
    if not isinstance(token, str) or not token:
        raise FlowError("The token file {} has no refresh_token; run the full flow first.".format(path), EXIT_USAGE)
    return token


def deliver(config, results, console):
    """Hand over what the run obtained: the --json object, then the token file.

    Runs after a failed flow too, so it reports its own problem instead of raising one
    that would hide the flow's. Returns False when the tokens could not be saved.
    """
    if results.tokens is None:
        return True
    if config.json:
        console.result(results.sections)
    if config.token_file:
        try:
            write_token_file(config.token_file, token_file_contents(results.tokens, time.time()))
        except FlowError as error:
            console.problem(str(error))
            return False
        console.note("Saved the tokens to {}.".format(config.token_file))
    return True


# --- The flow ---------------------------------------------------------------------------


def main(config, console, results, stdin, environ):
    """The documented flow, step by step. Returns the exit code; raises FlowError.

    What it obtains goes into `results` as it comes, so it outlives a later failure.
    """
    # 2. Discover the authorization server's metadata (RFC 8414).
    metadata = results.sections["metadata"] = discover(config, console)

    # 3. PKCE (RFC 7636) and state.
    state, code_verifier, code_challenge = make_pkce()

    # 4. Listen before the URL is shown, so a fast browser cannot arrive first.
    with open_receiver(config, console, stdin) as receiver:
        config.redirect_uri = receiver.redirect_uri  # with port 0, the port it really has
        console.line("\n" + receiver.announcement)

        # 5. The authorization URL.
        authorize_url = build_authorization_url(
            metadata["authorization_endpoint"], config.client_id, config.redirect_uri,
            state, code_challenge, config.scope,
        )
        console.line("\nOpen this URL in your browser:\n")
        console.line(authorize_url)
        if config.open_browser and not config.manual and open_browser(authorize_url, environ):
            console.note("(Opened it in your browser.)")

        # 6. The callback: issuer, error, state and code checks.
        iss_required = metadata.get("authorization_response_iss_parameter_supported") is True
        code = receiver.wait(
            lambda query: parse_callback(query, state, metadata.get("issuer"), iss_required),
            config.callback_timeout,
        )
    console.line("\nCaptured auth code prefix: " + one_line(code[:CODE_PREFIX_LENGTH]))

    # 7. Exchange the code for tokens (client_secret_post unless --auth-method says otherwise).
    token_response = results.sections["token_response"] = exchange_code(metadata, config, code, code_verifier)
    results.got_tokens(token_response)
    console.section("Token response", token_response)

    # 8. Call the Chat API with the access token.
    exit_code = chat(config, console, results, token_response["access_token"]) if config.chat else EXIT_OK

    # 9. Decode the access token locally.
    results.sections["jwt_header"], results.sections["jwt_claims"] = print_jwt(
        token_response["access_token"], console)

    # 10. Use the refresh token.
    if not token_response.get("refresh_token"):
        console.line("\nNo refresh token was returned")
        console.note(OFFLINE_ACCESS_HINT)
        return exit_code
    refresh(config, console, results, metadata, token_response["refresh_token"])
    return exit_code


CHAT_SCOPE_HINT = " (the token may lack the CHAT scope: check the scopes of your static client)"
OFFLINE_ACCESS_HINT = "Glean issues a refresh token when the offline_access scope is requested (--scope)."


def chat(config, console, results, access_token):
    """Doc step 8. A failure (401/403 without the CHAT scope is common) is reported and
    the run goes on, so the tokens already obtained are still decoded and refreshed.
    Returns the exit code this step calls for."""
    try:
        chat_response = results.sections["chat_response"] = call_chat_api(config, access_token)
    except FlowError as error:
        console.problem("Chat API call failed: {}{}".format(error, CHAT_SCOPE_HINT if error.status in (401, 403) else ""))
        return EXIT_FAILURE
    console.section("Chat response", chat_response)
    answer = chat_answer(chat_response)
    if answer:
        console.note("\nAnswer: " + answer)
    return EXIT_OK


def refresh(config, console, results, metadata, refresh_token):
    """Doc step 10: the refresh_token grant, printed and recorded."""
    refresh_response = results.sections["refresh_response"] = refresh_tokens(metadata, config, refresh_token)
    results.got_tokens(refresh_response, used_refresh_token=refresh_token)
    console.section("Refresh response", refresh_response)


def refresh_later(config, console, results):
    """--refresh: discover the token endpoint, then refresh REFRESH_TOKEN or the one in
    the token file; no sign-in."""
    refresh_token = config.refresh_token or read_refresh_token(config.token_file)
    metadata = results.sections["metadata"] = discover(config, console)
    refresh(config, console, results, metadata, refresh_token)
    return EXIT_OK


def cli(argv=None, environ=None, out=None, err=None, stdin=None):
    """Run from the command line: read the configuration, run the flow, and turn
    whatever stops it into one line on stderr and an exit code."""
    environ = os.environ if environ is None else environ
    stdin, err = stdin or sys.stdin, err or sys.stderr
    console = Console(out or sys.stdout, err)
    results = Results()
    try:
        # 1. Configuration: flags, then the environment.
        config = load_config(sys.argv[1:] if argv is None else argv, environ,
                             ask_secret=_ask_secret if stdin.isatty() else None)
        console.secrets = secret_forms(config.client_id, config.client_secret)
        if config.json:
            console.out = err  # stdout is for the one JSON object
            if out is None:
                console.json_out = _claim_stdout()
        delivered = False
        try:
            if config.refresh:
                exit_code = refresh_later(config, console, results)
            else:
                exit_code = main(config, console, results, stdin, environ)
        finally:
            delivered = deliver(config, results, console)  # even when a later step failed
        return exit_code if delivered else EXIT_FAILURE
    except FlowError as error:
        console.problem(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        console.problem("Interrupted.")
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug: still one line, still no secret
        console.problem("Unexpected error: {}: {} (a bug in glean_oauth.py; please report it)".format(
            type(error).__name__, error))
        return EXIT_FAILURE


def _claim_stdout():
    """Keep the process's stdout for --json's object alone: from now on whatever else
    writes to it (a browser started from here, say) writes to stderr instead."""
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(json_fd, "w", encoding=sys.stdout.encoding or "utf-8")


def _ask_secret(prompt):
    import getpass  # only when there is a terminal to ask on

    return getpass.getpass(prompt)


# --- Plumbing: HTTP -----------------------------------------------------------------------
#
# Every request of a run goes through http_request, so the kept-alive connection, the
# deadline, the size limit, the no-redirect rule and the User-Agent live in one place.


class Response:
    """An HTTP answer: `status`, `headers` (case-insensitive `get`) and the `body` bytes."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body


class Deadline:
    """When a request must be done by, and the setting that sets that limit (named in
    the error). Each read on the socket may only wait for what is left of it, so a
    server that drips one byte at a time cannot stretch a request past it."""

    def __init__(self, seconds, setting="GLEAN_HTTP_TIMEOUT"):
        self.seconds, self.setting = seconds, setting
        self.at = time.monotonic() + seconds

    def remaining(self):
        """Seconds left; TimeoutError when there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline")
        return left


def http_request(url, data=None, headers=None, deadline=None, on_line=None):
    """Send one request (a POST when `data` is given) on the origin's kept-alive
    connection; return its Response.

    `deadline` (a Deadline, default GLEAN_HTTP_TIMEOUT's 30 s from now) bounds the
    whole request: connect, TLS, status line, headers and body. With `on_line`, the
    body is read a line at a time as it arrives and each line is handed to
    `on_line(line, deadline)`, which may move the deadline (a streamed answer); the
    Response's body is then empty.

    Any status comes back, except a redirect, which raises FlowError naming where it
    pointed. Raises FlowError when no answer comes in time, when the connection fails,
    or when the body is over MAX_RESPONSE_BYTES.
    """
    deadline = deadline or Deadline(HTTP_TIMEOUT_SECONDS)
    parts = urllib.parse.urlsplit(url)
    origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    headers = dict(headers or {}, **{"User-Agent": USER_AGENT})
    conn = None
    try:
        conn = _connection(origin, deadline)
        conn.sock.settimeout(deadline.remaining())
        conn.request("POST" if data is not None else "GET", target, body=data, headers=headers)
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise FlowError(
                "Request to {} was redirected ({}) to {}; not following it, since no "
                "credential may go to another address. Check GLEAN_BACKEND_URL.".format(
                    url, response.status, one_line(response.getheader("Location") or "nowhere")),
                status=response.status,
            )
        if on_line:
            _read_lines(response, url, deadline, on_line)
            body = b""
        else:
            body = _read_limited(response, url)
        if not response.will_close:
            _keep(origin, conn)
            conn = None
        return Response(response.status, response.headers, body)
    except (TimeoutError, OSError) as error:  # socket.timeout and ssl.SSLError are OSErrors
        raise FlowError("Request to {} failed: {}".format(url, _reason(error, deadline)))
    except _http_client().HTTPException as error:
        raise FlowError("Request to {} failed: the answer is not valid HTTP ({}).".format(
            url, one_line(type(error).__name__ + (": " + str(error) if str(error) else ""))))
    finally:
        if conn is not None:
            conn.close()  # half-read or failed: never reused


def _http_client():
    import http.client  # here: a token still valid needs no network, and this costs 10 ms

    return http.client


_idle = {}  # (scheme, host, port) -> kept-alive connections waiting for the next request
_idle_lock = threading.Lock()  # TokenProvider may be called from several threads


def _keep(origin, conn):
    with _idle_lock:
        _idle.setdefault(origin, []).append(conn)


def _connection(origin, deadline):
    """An idle connection to `origin` that the server has not closed, else a new one."""
    while True:
        with _idle_lock:
            conn = _idle.get(origin, []) and _idle[origin].pop()
        if not conn:
            return _connect(origin, deadline)
        if _still_open(conn.sock):
            conn.response_class = functools.partial(_timed_response, deadline)
            return conn
        conn.close()


def _still_open(sock):
    """True when an idle connection can carry another request: the server has not closed
    it and has sent nothing unasked. It is checked before use because a request is never
    sent twice: an authorization code is good once, and so is a rotated refresh token."""
    import select

    try:
        pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS bytes already read
        if not pending and not select.select([sock], [], [], 0)[0]:
            return True
        sock.setblocking(False)
        try:
            sock.recv(1)  # b"": closed; bytes: unasked for; either way not reusable
        finally:
            sock.settimeout(None)
    except OSError as error:
        ssl = sys.modules.get("ssl")
        # Nothing to read after all (TLS records that carry no data, such as session tickets).
        return isinstance(error, BlockingIOError) or bool(ssl and isinstance(error, ssl.SSLWantReadError))
    return False


def _connect(origin, deadline):
    """A new connection to `origin`: through HTTPS_PROXY's CONNECT tunnel where that
    applies, TLS verified for https. A failure to reach the proxy names the proxy."""
    http_client = _http_client()
    scheme, host, port = origin
    proxy = _proxy_for(scheme, host)
    address = (proxy.hostname, proxy.port or 80) if proxy else (host, port)
    if scheme == "https":
        conn = http_client.HTTPSConnection(*address, timeout=deadline.remaining(), context=_tls_context())
    else:
        conn = http_client.HTTPConnection(*address, timeout=deadline.remaining())
    conn.response_class = functools.partial(_timed_response, deadline)
    if proxy:
        conn.set_tunnel(host, port, _proxy_headers(proxy))
    through_proxy = bool(proxy)
    try:
        # TCP (and the proxy's tunnel) first, then TLS: two steps, so that a failure of
        # the first can name the proxy.
        http_client.HTTPConnection.connect(conn)
        through_proxy = False
        if scheme == "https":
            conn.sock.settimeout(deadline.remaining())
            conn.sock = _tls_context().wrap_socket(conn.sock, server_hostname=host)
        return conn
    except (TimeoutError, OSError) as error:
        conn.close()
        if not through_proxy:
            raise
        where = "{}:{}".format(_bracketed(proxy.hostname), proxy.port or 80)
        text = str(error)
        if text.startswith("Tunnel connection failed: "):
            raise FlowError("The proxy {} (HTTPS_PROXY) refused the tunnel to {}:{}: {}.".format(
                where, host, port, one_line(text.split(": ", 1)[1])))
        raise FlowError("Cannot reach the proxy {} (HTTPS_PROXY): {}.".format(where, _reason(error, deadline)))


def _proxy_for(scheme, host):
    """HTTPS_PROXY as a split URL for an https request that NO_PROXY does not exempt;
    None for plain http (loopback only) and for loopback, which no proxy can reach."""
    if scheme != "https" or is_loopback(host) or not any(k.lower() == "https_proxy" for k in os.environ):
        return None
    import urllib.request  # here: only a proxy needs its environment rules, and it is slow to import

    proxy = urllib.request.getproxies_environment().get("https")
    if not proxy or urllib.request.proxy_bypass_environment(host):
        return None
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    try:
        parts.port
    except ValueError:
        parts = None
    if not parts or parts.scheme != "http" or not parts.hostname:
        raise FlowError("HTTPS_PROXY must be http://HOST:PORT (a plain-HTTP proxy that tunnels with "
                        "CONNECT), not {}.".format(_without_userinfo(proxy)), EXIT_USAGE)
    return parts


def _proxy_headers(proxy):
    """Proxy-Authorization for a proxy URL with user:password (Basic, RFC 7617)."""
    if proxy.username is None:
        return {}
    pair = urllib.parse.unquote(proxy.username) + ":" + urllib.parse.unquote(proxy.password or "")
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")}


def _without_userinfo(url):
    """`url` with any user:password@ removed, for messages."""
    return re.sub(r"//[^/@]*@", "//", url)


@functools.lru_cache(maxsize=None)
def _tls_context():
    """Certificates verified against the system's CAs, or SSL_CERT_FILE / SSL_CERT_DIR.

    Made once: loading the CA bundle costs tens of milliseconds. A SSL_CERT_FILE that
    cannot be used is named (OpenSSL would silently pass over it).
    """
    import ssl  # here: only https needs it, and importing it costs 10 ms

    context = ssl.create_default_context()
    cafile = os.environ.get("SSL_CERT_FILE")
    if cafile:
        try:
            context.load_verify_locations(cafile=cafile)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            problem = "it holds no PEM certificate" if isinstance(error, (ssl.SSLError, ValueError)) \
                else error.strerror or str(error)
            raise FlowError("SSL_CERT_FILE {} cannot be used: {}. Point it at a PEM CA bundle.".format(
                cafile, problem), EXIT_USAGE)
    return context


class _TimedSocket:
    """What http.client reads a response from: the socket, each read bounded by the deadline."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline

    def makefile(self, mode):
        # The socket's own reader (it keeps the socket open as long as the response needs it).
        return io.BufferedReader(_DeadlineReader(self.sock.makefile(mode, buffering=0), self.sock, self.deadline))


class _DeadlineReader(io.RawIOBase):
    def __init__(self, raw, sock, deadline):
        super().__init__()
        self.raw, self.sock, self.deadline = raw, sock, deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        self.sock.settimeout(self.deadline.remaining())
        return self.raw.readinto(buffer)

    def close(self):
        self.raw.close()
        super().close()


def _timed_response(deadline, sock, *args, **kwargs):
    return _http_client().HTTPResponse(_TimedSocket(sock, deadline), *args, **kwargs)


def _reason(error, deadline):
    """What went wrong with a connection, in words, with what to do for the common cases."""
    import socket

    if isinstance(error, (TimeoutError, socket.timeout)):
        return "no answer in time ({} sets the limit in seconds)".format(deadline.setting)
    ssl = sys.modules.get("ssl")
    if ssl and isinstance(error, ssl.CertificateError) or "CERTIFICATE_VERIFY_FAILED" in str(error):
        return ("the server's TLS certificate is not trusted ({}); behind a corporate proxy or CA, "
                "set SSL_CERT_FILE to its CA bundle".format(getattr(error, "verify_message", None) or error))
    return one_line(str(getattr(error, "strerror", None) or error))


def _read_limited(response, url):
    """The body of `response`, refusing one over MAX_RESPONSE_BYTES before it is all read."""
    if response.length is not None and response.length > MAX_RESPONSE_BYTES:
        raise FlowError("Response from {} is {} bytes, over the {} byte limit.".format(
            url, response.length, MAX_RESPONSE_BYTES))
    chunks, size = [], 0
    while True:
        chunk = response.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise FlowError("Response from {} is over the {} byte limit.".format(url, MAX_RESPONSE_BYTES))
        chunks.append(chunk)


def _read_lines(response, url, deadline, on_line):
    """Hand each line of the body to `on_line` as it arrives, within the size limits."""
    size = 0
    while True:
        line = response.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        size += len(line)
        if len(line) > MAX_LINE_BYTES:
            raise FlowError("A line from {} is over the {} byte limit.".format(url, MAX_LINE_BYTES))
        if size > MAX_STREAM_BYTES:
            raise FlowError("The stream from {} is over the {} byte limit.".format(url, MAX_STREAM_BYTES))
        on_line(line, deadline)


if __name__ == "__main__":
    sys.exit(cli())
