#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Get tokens from the Glean OAuth Authorization Server with a static OAuth client.

The Python counterpart of Glean's "Get tokens with a static OAuth client" example:
the authorization code flow with PKCE, a loopback redirect URI and client_secret_post,
printing every step, then a Chat API call with the access token, a local look at the
token's claims, and the refresh_token grant.

The flow at a glance: main() runs the doc's ten steps, and below it each step is one
function, in this order (main() calls each, or sign_in() does, for steps 3 to 7):

     1. configuration from the environment ............ load_config()
     2. RFC 8414 metadata discovery ................... discover()
     3. PKCE S256 and state ........................... make_pkce()
     4. a loopback listener for the browser's redirect  open_receiver()
     5. the authorization URL ......................... build_authorization_url()
     6. the callback: state, error and code checks .... parse_callback()
     7. the code for tokens, with client_secret_post .. exchange_code()
     8. POST /rest/api/v1/chat with the bearer token .. chat_step(), which calls call_chat_api()
     9. the access token's JWT claims, decoded ........ jwt_step(), which calls print_jwt()
    10. the refresh_token grant ....................... refresh_step(), which calls refresh_tokens()

The example's own helpers have theirs in the core too: its placeholder check
(check_required), fetchJson (fetch_json) and waitForOAuthCallback's handler
(handle_callback). The steps lean on these from below the line, each named for what
it guarantees:

    parse_args, read_client_secret, read_more_settings .. the flags and settings, checked
    Results ........... what a run obtained, delivered (--json, --token-file) even on failure
    http_request ...... one request on the kept-alive connection, in time, never redirected
    secret_forms ...... every form of a secret a server could echo, to redact
    hinted ............ an error with the hint that leads to its fix
    check_metadata .... metadata this flow can use safely
    CallbackListener .. the loopback listener's sockets, stray clients and a paste
    open_browser ...... a browser, where there is a graphical one
    ChatStream ........ the chat call's deadline, its waiting note and --stream
    SignatureCheck .... --verify's Signature: line

Below the line that says "beyond the documented flow" is everything else: --refresh, the
token store, the subcommands, doctor, inspect, the command line and the machinery.

Standard library only; runs on CPython 3.6 and newer. Copy this one file anywhere. Where
the doc's example has fetch and node:http, this file has http.client and a select() loop:
one kept-alive connection serves every request of a run (after the callback, 0.58x the
example's time; `make bench`), and the listener waits on the browser and a paste at once
and outlasts stray and slow clients, which urllib.request and http.server do not.

    CLIENT_ID=... CLIENT_SECRET=... GLEAN_BACKEND_URL=https://acme-be.glean.com \\
        python3 glean_oauth.py
"""

import sys

# Before the imports an old Python lacks. The file stays parseable by Python 2.7 (no
# f-strings, no keyword-only arguments) so that this line, not a SyntaxError, is what it says.
if sys.version_info < (3, 6):
    sys.stderr.write("glean_oauth.py needs Python 3.6 or newer; this is Python {}.{}.\n".format(
        *sys.version_info[:2]))
    sys.exit(2)

import argparse
import base64
import errno
import functools
import io
import json
import os
import re
import threading
import time
import urllib.parse

__version__ = "1.0.0"
__all__ = ["main", "cli", "TokenProvider", "SignInNeeded", "FlowError", "load_config", "discover", "make_pkce",
           "open_receiver", "build_authorization_url", "parse_callback", "exchange_code", "chat_step", "call_chat_api",
           "jwt_step", "print_jwt", "refresh_step", "refresh_tokens"]

DEFAULT_REDIRECT_URI = "http://127.0.0.1:9090/oauth/callback"
# The doc's placeholders: a value still equal to one of these was never set.
PLACEHOLDERS = {
    "CLIENT_ID": "YOUR_STATIC_CLIENT_ID",
    "CLIENT_SECRET": "YOUR_STATIC_CLIENT_SECRET",
    "GLEAN_BACKEND_URL": "https://your-instance-be.glean.com",
}
METADATA_PATH = "/.well-known/oauth-authorization-server"  # RFC 8414 §3
ISSUER_PATH = "/oauth"  # Glean's issuer is {backend}/oauth: the RFC 8414 §3.1 path form appends it
CHAT_PATH = "/rest/api/v1/chat"
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")  # RFC 6750 §2.1 b64token, with no line end after it
CHAT_QUESTION = "Who is on the executive team?"
CODE_PREFIX_LENGTH = 16  # how much of the authorization code is ever printed
STATE_BYTES = 32
CODE_VERIFIER_BYTES = 64  # 86 base64url characters: inside RFC 7636 §4.1's 43..128
HTTP_TIMEOUT_SECONDS = 30
CHAT_TIMEOUT_SECONDS = 300  # agent answers can take minutes (glean-cli allows 10 for a stream)
CALLBACK_TIMEOUT_SECONDS = 300
# Python 3.6 in a C locale reads the bytes of a non-ASCII variable as surrogates; encoding
# them back with this sends the bytes the user set, instead of failing.
ENV_ERRORS = "surrogateescape"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OFFLINE_ACCESS_HINT = "Glean issues a refresh token when the offline_access scope is requested (--scope)."


class FlowError(Exception):
    """The flow cannot go on. The message is for the user: one line, no secrets.

    `status` is the HTTP status when a server's answer was the problem.
    """

    headers = body = None  # the server's answer, when that was the problem

    def __init__(self, message, exit_code=EXIT_FAILURE, status=None, oauth_error=None):
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status
        self.oauth_error = oauth_error  # the RFC 6749 §5.2 error code, e.g. invalid_grant


# --- The flow -----------------------------------------------------------------------------


def main(argv, environ, console, stdin):
    """The documented flow, step by step: the bare command. Returns the exit code; raises
    FlowError. What it obtains goes into `results` as it comes, and --json and
    --token-file deliver it even when a later step fails."""
    # 1. Configuration: CLIENT_ID, CLIENT_SECRET, GLEAN_BACKEND_URL, REDIRECT_URI (a flag wins).
    config = load_config(argv, environ, ask_secret=_ask_secret if _isatty(stdin) else None, console=console)
    with Results(config, console) as results:  # delivered (--json, --token-file) whatever happens next
        # 2. Discover the authorization server's metadata (RFC 8414).
        metadata = results.sections["metadata"] = discover(config, console)

        # 3.-7. PKCE and state, the listener, the authorization URL, the callback, the code for tokens.
        token_response = results.sections["token_response"] = sign_in(config, console, metadata, stdin, environ)
        results.got_tokens(token_response)
        console.section("Token response", token_response)

        # 8. Call the Chat API with the access token.
        exit_code = chat_step(config, console, results, token_response) if config.chat else EXIT_OK

        # 9. Decode the access token locally (--verify: and check its signature).
        exit_code = max(exit_code, jwt_step(config, console, results, metadata, token_response["access_token"]))

        # 10. Use the refresh token.
        if not token_response.get("refresh_token"):
            console.line("\nNo refresh token was returned")
            console.note(OFFLINE_ACCESS_HINT)
            return exit_code
        refresh_step(config, console, results, metadata, token_response, spent_section="token_response")
        return exit_code


def sign_in(config, console, metadata, stdin, environ):
    """Doc steps 3 to 7, for the flow and for `login`: PKCE and state, the listener, the
    authorization URL, the callback's code, and the code traded for tokens. Returns the
    token response."""
    # 3. PKCE (RFC 7636) and state.
    state, code_verifier, code_challenge = make_pkce()

    # 4.-6. Listen, show the authorization URL, and take the callback.
    code, redirect_uri = authorize(config, console, metadata, state, code_challenge, stdin, environ)
    console.line("\nCaptured auth code prefix: " + code[:CODE_PREFIX_LENGTH])

    # 7. Exchange the code for tokens (client_secret_post unless --auth-method says otherwise).
    return exchange_code(metadata["token_endpoint"], config.client, code, code_verifier, redirect_uri)


# --- Step 1: configuration ----------------------------------------------------------------


def load_config(argv, environ, ask_secret=None, command=None, console=None):
    """Doc step 1: the run's Settings, from the flags in `argv`, then `environ`, then the
    defaults. `ask_secret(prompt)` is called for the client secret when CLIENT_SECRET is
    unset, the auth method needs one, and all else is right. Raises FlowError (exit 2)
    naming what to fix, before any traffic."""
    flags = parse_args(command, argv)
    backend_url, backend_source = backend_setting(environ, flags.backend_url)
    config = Settings(
        client_id=_setting(flags.client_id, environ, "CLIENT_ID"),
        client_secret=read_client_secret(environ, flags.client_secret_file, console),  # or CLIENT_SECRET_FILE
        backend_url=backend_url,
        redirect_uri=_setting(flags.redirect_uri, environ, "REDIRECT_URI", DEFAULT_REDIRECT_URI),
        auth_method=flags.auth_method,
    )
    ask = check_required(config, ask_secret, backend_source)
    read_more_settings(config, flags, environ, command)  # the backend's origin; the redirect URI; scopes, timeouts...
    if ask:
        config.client_secret = ask_secret("Client secret for {}: ".format(config.client_id)).strip()
        if not config.client_secret:
            raise FlowError("Set CLIENT_SECRET before you run this script (see --help).", EXIT_USAGE)
    return config


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed stream
        return False


def _ask_secret(prompt):
    import getpass  # only when there is a terminal to ask on

    return getpass.getpass(prompt)


def _setting(flag_value, environ, name, default=""):
    """The flag's value, else `environ[name]`, stripped; `default` when that is empty."""
    value = (environ.get(name, "") if flag_value is None else flag_value).strip()
    return value or default


BACKEND_SOURCES = ("--backend-url", "GLEAN_BACKEND_URL", "GLEAN_SERVER_URL")  # in the order they win


def backend_setting(environ, flag_value=None):
    """The backend URL as given and what gave it: --backend-url, else GLEAN_BACKEND_URL,
    else GLEAN_SERVER_URL (what Glean's newer tools read); ("", None) when none does."""
    for name, value in zip(BACKEND_SOURCES, (flag_value or "", environ.get("GLEAN_BACKEND_URL", ""),
                                             environ.get("GLEAN_SERVER_URL", ""))):
        if value.strip():
            return value.strip().rstrip("/"), name
    return "", None


# What a value still equal to the doc's placeholder (or "...") should be set to instead.
WANTED = {"CLIENT_ID": "your static OAuth client's id", "CLIENT_SECRET": "its secret (or unset it, to be asked)",
          "GLEAN_BACKEND_URL": "your backend, e.g. https://acme-be.glean.com"}


def unset(kind, value):
    """True when `value` was never set: empty, "...", or still the doc's placeholder for
    `kind` (CLIENT_ID, CLIENT_SECRET or GLEAN_BACKEND_URL). The one placeholder rule."""
    return value in ("", "...", PLACEHOLDERS[kind])


def placeholder_problem(name, value):
    kind = "GLEAN_BACKEND_URL" if name in BACKEND_SOURCES else name
    shown = "" if kind == "CLIENT_SECRET" and value != "..." else " " + value  # a secret's value is never shown
    return "{} is still the {}placeholder{}: set it to {}".format(
        name, "doc's " if value == PLACEHOLDERS[kind] else "", shown, WANTED[kind])


def check_required(config, ask_secret, backend_source="GLEAN_BACKEND_URL"):
    """FlowError (exit 2) naming what to set, and each value still a placeholder; True when
    only the secret is missing and can be asked for."""
    needs_secret = config.auth_method != "none"  # a public client has none
    values = [("CLIENT_ID", "CLIENT_ID", config.client_id), ("CLIENT_SECRET", "CLIENT_SECRET", config.client_secret),
              (backend_source or "GLEAN_BACKEND_URL", "GLEAN_BACKEND_URL", config.backend_url)]
    missing = [(name, value) for name, kind, value in values
               if unset(kind, value) and (needs_secret or kind != "CLIENT_SECRET")]
    if missing == [("CLIENT_SECRET", "")] and ask_secret:  # the secret alone, once all else is known to be right
        return True
    empty = [name for name, value in missing if not value]
    problems = (["Set {} before you run this script".format(", ".join(empty))] if empty else []) + [
        placeholder_problem(name, value) for name, value in missing if value]
    if problems:
        raise FlowError("; ".join(problems) + " (see --help).", EXIT_USAGE)
    return False


class Settings:
    """What load_config reads: one attribute a setting, each set in one place."""

    __slots__ = ("client_id", "client_secret", "backend_url", "redirect_uri", "auth_method", "scope",
                 "http_timeout", "callback_timeout", "chat_timeout", "open_browser", "manual", "message", "chat",
                 "stream", "json", "refresh", "refresh_token", "token_file", "store", "force", "verify",
                 "save_secret", "default", "secret_file")

    def __init__(self, **values):
        for name in self.__slots__:
            setattr(self, name, values.get(name))

    @property
    def client(self):
        """The client, as every request to the token endpoint authenticates it."""
        return Client(self.client_id, self.client_secret, self.auth_method, self.http_timeout)


class Client:
    """The static OAuth client at the token endpoint: the one value that the code exchange,
    the refresh and the revocation all authenticate with."""

    def __init__(self, client_id, client_secret, auth_method="client_secret_post", http_timeout=HTTP_TIMEOUT_SECONDS):
        self.client_id, self.client_secret = client_id, client_secret
        self.auth_method, self.http_timeout = auth_method, http_timeout

    def authentication(self):
        """The form fields and headers that authenticate this client (CLIENT_AUTH)."""
        return CLIENT_AUTH[self.auth_method](self.client_id, self.client_secret)

    def secret_forms(self, *also):
        """What an answer must never show: the secret in every form, and each of `also`'s."""
        return secret_forms(self.client_id, self.client_secret, *also)


# --- Step 2: discovery --------------------------------------------------------------------


def discover(config, console, show=True):
    """Doc step 2: fetch, print (unless not `show`) and check the metadata; return it."""
    try:
        metadata = discover_metadata(config, console)
    except FlowError as error:  # https://acme.glean.com is likely the web host: say which backend was meant
        raise hinted(error, config)
    if show:
        print_metadata(metadata, console)
    check_metadata(metadata, config.auth_method, config.backend_url)
    return metadata


def discover_metadata(config, console):
    """Fetch the RFC 8414 authorization server metadata of the backend (doc step 2).

    The doc's URL first; when it answers 404, once more at the RFC 8414 §3.1 path form
    for Glean's issuer `{backend}/oauth`, as Glean's own tools look, saying so on
    stderr. When both answer 404, the doc URL's error stands."""
    url = config.backend_url + METADATA_PATH
    try:
        return fetch_json(url, config.http_timeout)
    except FlowError as error:
        if error.status != 404:
            raise
        fallback = url + ISSUER_PATH
        try:
            metadata = fetch_json(fallback, config.http_timeout)
        except FlowError as second:
            raise error if second.status == 404 else second
    if console:
        console.note("The metadata came from {} ({} answered 404).".format(fallback, url))
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
        values = metadata.get(key)
        for method in values if isinstance(values, list) else [] if values is None else [values]:
            console.line(one_line(str(method)))


# --- Step 3: PKCE and state ---------------------------------------------------------------


def base64url(data):
    """base64url without padding (RFC 7636 Appendix A)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def code_challenge_for(code_verifier):
    """The S256 code_challenge of `code_verifier` (RFC 7636 §4.2)."""
    import hashlib  # here: only a sign-in needs it

    return base64url(hashlib.sha256(code_verifier.encode("ascii")).digest())


def make_pkce():
    """Return fresh `(state, code_verifier, code_challenge)` (doc step 3)."""
    import secrets  # here: only a sign-in needs it

    state = base64url(secrets.token_bytes(STATE_BYTES))
    code_verifier = base64url(secrets.token_bytes(CODE_VERIFIER_BYTES))
    return state, code_verifier, code_challenge_for(code_verifier)


# --- Step 4: the loopback listener --------------------------------------------------------


def authorize(config, console, metadata, state, code_challenge, stdin, environ):
    """Doc steps 4 to 6: listen (before the URL is shown, so a fast browser cannot
    arrive first), show and open the authorization URL, and return the code of the one
    callback that carries this run's state, with the redirect URI the listener really
    has (with port 0, the system picked its port)."""
    with open_receiver(config, console, stdin) as receiver:
        console.line("\n" + receiver.announcement)
        receiver.say_how_to_reach(console, environ)  # a paste, or over SSH a tunnel

        # 5. The authorization URL.
        authorize_url = build_authorization_url(metadata["authorization_endpoint"], config.client_id,
                                                receiver.redirect_uri, state, code_challenge, config.scope)
        console.line("\nOpen this URL in your browser:\n")
        console.line(authorize_url)
        if config.open_browser and not config.manual:
            opened = open_browser(authorize_url, environ)
            if opened is not None:
                console.note(opened)

        # 6. The callback: state, then issuer, error and code checks.
        iss_required = metadata.get("authorization_response_iss_parameter_supported") is True
        try:
            code = receiver.wait(lambda query: parse_callback(query, state, metadata.get("issuer"), iss_required),
                                 config.callback_timeout, on_stray=console.problem)
        except FlowError as error:  # invalid_scope: say which scopes the server does not list
            raise hinted(error, config, metadata)
        return code, receiver.redirect_uri


def open_receiver(config, console, stdin):
    """Doc step 4, as waitForOAuthCallback starts: listen on the redirect URI's host and port
    (loopback only), before the URL is shown. Each request it receives is answered by
    handle_callback. On a terminal a pasted redirect is taken too; with --manual, only that."""
    return CallbackListener(config.redirect_uri, stdin, console, listen=not config.manual)


def handle_callback(method, path, query, callback_path, check, on_stray=None):
    """waitForOAuthCallback's request handler: `(status, page, outcome)` for one request.
    Another path is 404, a method other than GET 405; at the callback path, `check(query)`
    (parse_callback) gives the code: 200 and the done page. A StrayCallback gets the
    failed page and `on_stray(message)`, and the wait goes on (outcome None); any other
    FlowError gets the failed page and is the outcome, which ends the wait."""
    if path != callback_path:
        return "404 Not Found", "Not found\n", None
    if method != "GET":
        return "405 Method Not Allowed", "Method not allowed\n", None
    try:
        return "200 OK", CALLBACK_DONE_PAGE, check(query)
    except StrayCallback as error:
        if on_stray:
            on_stray("Ignored a callback that is not the answer to this run's request ({}); still "
                     "waiting.".format(str(error).split(":", 1)[0]))
        return "400 Bad Request", CALLBACK_FAILED_PAGE, None
    except FlowError as error:
        return "400 Bad Request", CALLBACK_FAILED_PAGE, error


CALLBACK_DONE_PAGE = "OAuth callback captured. You can return to the terminal.\n"
CALLBACK_FAILED_PAGE = "OAuth callback failed. Check the terminal for details.\n"


# --- Step 5: the authorization URL --------------------------------------------------------


def build_authorization_url(authorization_endpoint, client_id, redirect_uri, state, code_challenge, scope=""):
    """The endpoint with the authorization request's parameters set (RFC 6749 §4.1.1).

    A query the endpoint already has is kept; names set here replace their old values,
    as URLSearchParams.set does in the example. `scope` is sent only when given.
    """
    params = [("response_type", "code"), ("client_id", client_id), ("redirect_uri", redirect_uri), ("state", state),
              ("code_challenge", code_challenge), ("code_challenge_method", "S256")]
    params += [("scope", scope)] if scope else []
    parts = urllib.parse.urlsplit(authorization_endpoint)
    names = {name for name, _ in params}
    kept = [p for p in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if p[0] not in names]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept + params, errors=ENV_ERRORS)))


# --- Step 6: the callback -----------------------------------------------------------------


class StrayCallback(FlowError):
    """A request to the callback path without this run's state: not the answer to this
    run's request (another tab, an older run, or another local process), so it cannot end
    the run. The wait goes on."""


def parse_callback(query, expected_state, issuer=None, iss_required=False):
    """Return the authorization code from the callback's query string (doc step 6).

    The state is checked first (RFC 6749 §4.1.2.1 puts it in error responses too, and
    §10.12: a response without it is not ours): StrayCallback when it is missing or
    wrong. Then FlowError for a response from another issuer (RFC 9207 §2.4: an `iss`
    that is not `issuer`, compared as plain strings, or none when `iss_required`), an
    error response, or a missing code.
    """
    params = urllib.parse.parse_qs(query, keep_blank_values=True)

    def first(name):
        return params.get(name, [""])[0]

    if first("state") != expected_state:
        raise StrayCallback("State mismatch: the callback is not the answer to this run's request.")
    if "iss" in params and first("iss") != issuer:
        raise FlowError("Issuer mismatch: the callback's iss {} is not the metadata's issuer {} "
                        "(RFC 9207).".format(first("iss"), issuer))
    if "iss" not in params and iss_required:
        raise FlowError("The callback has no iss, though the metadata says the server sends it (RFC 9207).")
    if first("error"):
        description = first("error_description")
        raise FlowError("OAuth error: " + first("error") + (": " + description if description else ""),
                        oauth_error=first("error"))
    if not first("code"):
        raise FlowError("Missing authorization code in callback.")
    return first("code")


# --- Step 7: the code for tokens ----------------------------------------------------------


def exchange_code(token_endpoint, client, code, code_verifier, redirect_uri):
    """Trade the authorization code for tokens (doc step 7); return the token response.
    `redirect_uri` is the one the authorization request named (RFC 6749 §4.1.3)."""
    grant = [("grant_type", "authorization_code"), ("code", code), ("redirect_uri", redirect_uri)]
    return grant_request(token_endpoint, client, grant, [("code_verifier", code_verifier)])


def grant_request(token_endpoint, client, grant_fields, after_auth=()):
    """POST a grant to the token endpoint as a form, authenticated as the client's auth
    method says: its fields go between `grant_fields` and `after_auth`, where the doc puts
    them. Returns the token response (fetch_json checks that it holds an access token)."""
    auth_fields, headers = client.authentication()
    fields = list(grant_fields) + auth_fields + list(after_auth)
    # An error answer may echo what was sent: the secret, and the code or token spent.
    redact = client.secret_forms(*[value for name, value in fields if name in ("code", "code_verifier",
                                                                             "refresh_token")])
    return fetch_json(token_endpoint, client.http_timeout, fields, headers, redact, oauth=True)


def _client_secret_post(client_id, client_secret):
    """The doc's method: id and secret in the form body (RFC 6749 §2.3.1)."""
    return [("client_id", client_id), ("client_secret", client_secret)], {}


def _client_secret_basic(client_id, client_secret):
    """HTTP Basic, each part form-urlencoded first, as RFC 6749 §2.3.1 requires."""
    pair = "{}:{}".format(urllib.parse.quote_plus(client_id, errors=ENV_ERRORS),
                          urllib.parse.quote_plus(client_secret, errors=ENV_ERRORS))
    return [], {"Authorization": "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")}


def _no_client_auth(client_id, client_secret):
    """A public client: it only names itself (RFC 6749 §3.2.1)."""
    return [("client_id", client_id)], {}


# Token endpoint authentication, one row a method (RFC 7591 §2 names them).
CLIENT_AUTH = {
    "client_secret_post": _client_secret_post,
    "client_secret_basic": _client_secret_basic,
    "none": _no_client_auth,
}


# --- Step 8: the Chat API -----------------------------------------------------------------


def chat_step(config, console, results, token_response):
    """Doc step 8. A failure (401/403 without the CHAT scope is common) is reported and
    the run goes on, so the tokens already obtained are still decoded and refreshed.
    Returns the exit code this step calls for."""
    granted = chat_scope_missing(token_response)
    if granted is not None:
        console.note('The token was not granted the chat scope (granted: {}); the Chat API will likely refuse '
                     'it. Ask for it with --scope "{}".'.format(granted, " ".join(
                         _scope_union(config.scope.split() + ["chat", "offline_access"]))))
    try:
        chat_response = results.sections["chat_response"] = call_chat_api(
            config, token_response["access_token"], console, granted_scope(token_response))
    except FlowError as error:
        console.problem("Chat API call failed: {}".format(error))
        return EXIT_FAILURE
    console.section("Chat response", chat_response)
    answer = chat_answer(chat_response)
    if answer and not config.stream:  # a stream has shown it already, as it came
        console.note("\nAnswer: " + set_off(answer))
    return EXIT_OK


def call_chat_api(config, access_token, console, granted=None):
    """POST one question to the Chat API with the access token as a bearer token; return
    the ChatResponse (with --stream, the stream's lines merged into one).

    The whole call is bounded by GLEAN_CHAT_TIMEOUT (agent answers can take minutes);
    a stream, also by GLEAN_HTTP_TIMEOUT between two lines. A 401 or 403 says why, as far
    as the answer and the scopes `granted` tell.
    """
    if not BEARER_TOKEN.match(access_token):  # nor could it go in a header safely
        raise FlowError("The access token holds characters a bearer token cannot (RFC 6750 §2.1); not sending it.")
    url = config.backend_url + CHAT_PATH
    headers = {"Authorization": "Bearer " + access_token, "Content-Type": "application/json"}
    body = chat_request_body(config.message, config.stream)
    redact = config.client.secret_forms(access_token)  # an error answer may echo the token it refused
    with ChatStream(console, config, redact) as stream:  # --stream: shown as it comes; else a note while it waits
        try:
            answer = fetch_json(url, stream.deadline, body, headers, redact, on_line=stream.on_line)
        except FlowError as error:
            raise hinted(error, config, granted=granted)  # a 401 or 403: the scope or sign-in it needs
    return stream.finish() if config.stream else answer


def chat_request_body(question=CHAT_QUESTION, stream=False):
    """The example's request body, serialized as JSON.stringify does (no spaces);
    `"stream": true` is added only for --stream."""
    body = {"messages": [{"fragments": [{"text": question}]}]}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


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


def chat_scope_missing(token_response):
    """The scopes granted when they visibly lack chat (compared case-insensitively), else None."""
    granted = granted_scope(token_response)
    if granted is None or "chat" in granted.lower().split():
        return None
    return granted


def granted_scope(saved):
    """The scopes granted: the token response's scope, else the JWT's scope or scp."""
    claims = jwt_claims(saved.get("access_token"))
    for value in (saved.get("scope"), claims.get("scope"), claims.get("scp")):
        if isinstance(value, list):
            value = " ".join(str(item) for item in value)
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())
    return None


def jwt_claims(access_token):
    """The access token's claims when it is a JWT, else {}."""
    try:
        return decode_jwt(access_token)[1]
    except (ValueError, AttributeError):
        return {}


def _scope_union(scopes):
    """`scopes` without repeats, compared case-insensitively (Glean writes CHAT, sends chat)."""
    seen, union = set(), []
    for scope in scopes:
        if scope.lower() not in seen:
            seen.add(scope.lower())
            union.append(scope)
    return union


# --- Step 9: the access token's claims ----------------------------------------------------


JWT_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")  # base64url, no padding (RFC 7515 §2)


def decode_jwt_part(part):
    """Decode one JWT segment to its JSON object; ValueError when it is not that."""
    if not JWT_SEGMENT.match(part):
        raise ValueError("not base64url")
    value = parse_json(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode("utf-8"))
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


def print_jwt(access_token, console, verify=None):
    """Print the access token's header and claims (doc step 9), or say there are none.
    `verify(access_token)`, when given, returns the line that replaces the doc's last one.
    Returns `(header, claims)`, or `(None, None)` for a token that is not a JWT."""
    try:
        header, claims = decode_jwt(access_token)
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSON errors are ValueErrors
        console.line("\nThe access token is not a JWT, nothing to decode.")
        return None, None
    console.section("JWT header", header)
    console.section("JWT claims", claims)
    console.line("\n" + (verify(access_token) if verify else "This does not verify the signature."))
    return header, claims


def jwt_step(config, console, results, metadata, access_token):
    """Doc step 9 as the flow runs it: print_jwt, and with --verify the Signature: line
    in place of the one that says it is not checked. Returns 1 when it is INVALID."""
    check = SignatureCheck.of_metadata(metadata, config.backend_url, config.http_timeout) if config.verify else None
    results.sections["jwt_header"], results.sections["jwt_claims"] = print_jwt(access_token, console, check)
    if check is None:
        return EXIT_OK
    if check.verdict is None:  # not a JWT: print_jwt said so, and there is no signature line to print
        check(access_token)
        console.line(check.verdict.line)
    results.sections["signature"] = {"status": check.verdict.status, "detail": check.verdict.detail}
    return check.exit_code


# --- Step 10: the refresh token -----------------------------------------------------------


def refresh_step(config, console, results, metadata, tokens, spent_section=None):
    """Doc step 10: the refresh_token grant with the refresh token of `tokens`, printed and
    recorded (what the answer leaves out is kept from `tokens`)."""
    refresh_response = results.sections["refresh_response"] = refresh_tokens(
        metadata["token_endpoint"], config.client, tokens["refresh_token"])
    results.got_tokens(refresh_response, tokens, spent_section)
    console.section("Refresh response", refresh_response)


def refresh_tokens(token_endpoint, client, refresh_token):
    """Use the refresh_token grant (RFC 6749 §6; doc step 10); return the refresh response."""
    return grant_request(token_endpoint, client, [("grant_type", "refresh_token"), ("refresh_token", refresh_token)])


# --- The example's fetchJson ----------------------------------------------------------------


def fetch_json(url, deadline=None, body=None, headers=None, redact=(), oauth=False, on_line=None, limit=None):
    """The example's fetchJson: GET `url`, or POST `body` (bytes, or fields sent as a form);
    return the answer's JSON object. Any status but 2xx raises `Request to <url> failed
    (<status>): <body>`, less `redact`; with `oauth`, an RFC 6749 §5.2 error is `token request
    failed (<status>): <error>: <description>`, and an answer needs an access_token. With
    `on_line` (a stream), each line goes there as it comes, and None is returned."""
    response = http_request(url, *form_body(body, headers), deadline=deadline, on_line=on_line, limit=limit)
    if not 200 <= response.status < 300:
        raise response.failed(redact, oauth=oauth)
    return None if on_line else response.json_object(redact, oauth)


def form_body(body, headers):
    """`(body, headers)` for a request: a list of fields as an application/x-www-form-urlencoded form."""
    if not isinstance(body, list):
        return body, headers
    headers = dict(headers or {}, **{"Content-Type": "application/x-www-form-urlencoded"})
    return urllib.parse.urlencode(body, errors=ENV_ERRORS).encode("ascii"), headers


MAX_JSON_DEPTH = 64  # Glean's answers nest a few levels; deeper is an attack


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


# --- What the steps print, made safe ---------------------------------------------------------


def printable(text, keep=""):
    """`text` with control and other unprintable characters (but those in `keep`) made spaces.

    Text from a server or a browser goes through here before it reaches a terminal, so
    it cannot move the cursor, recolour, or hide what follows (escape injection).
    """
    return "".join(c if c.isprintable() or c in keep else " " for c in text)


def one_line(text):
    """`text` made printable, on one line."""
    return " ".join(printable(text).split())


def set_off(answer):
    """The chat answer with each of its lines after the first indented, so that no line of
    it can pass for the tool's own output (a fake "Token response:")."""
    return re.sub(r"\r\n?|\n", "\n  ", answer)


# ==========================================================================================
# Beyond the documented flow: everything below serves the steps above, and nothing below
# calls back into their order. New features go here.
# ==========================================================================================


# --- Keeping what a run obtained: --json, --token-file and --refresh ----------------------


class Results:
    """What a run obtained, kept for --json and --token-file even when a later step fails:
    `sections` by name (metadata, token_response, ...), the newest `tokens` and when they
    came, and the sections whose refresh token a later refresh has spent. As a context
    manager around the flow, it delivers them on the way out."""

    def __init__(self, config=None, console=None):
        self.config, self.console = config, console
        self.sections, self.spent = {}, []  # spent: sections whose refresh_token the run's own refresh spent
        self.tokens = self.obtained_at = None
        self.saved = False  # the token file was written already (under its lock)

    def __enter__(self):
        """Around the flow: the secret's forms known to the console, and stdout kept for --json."""
        self.console.secrets = secret_forms(self.config.client_id, self.config.client_secret)
        if self.config.json:
            self.console.claim_stdout()
            self.console.tokens_shortened = True  # stderr is a terminal or a CI log: the JSON carries them whole
        return self

    def __exit__(self, kind, error, traceback):
        """Whatever happened, hand over what the run obtained: the --json object, then the
        token file. Its own problem is reported, not raised over the flow's; a save that
        failed (and said so) when the flow did not makes the run fail (exit 1)."""
        if self.tokens is None:
            return
        unprinted, saved = None, True
        if self.config.json:
            try:
                self.console.result(self.as_json())
            except OutputError as failed:  # the file is still written: the tokens are not lost
                unprinted = failed
        if self.config.store and not self.saved:
            try:
                with self.config.store.locked(self.config.http_timeout + LOCK_MARGIN_SECONDS):
                    saved = self.save()
            except FlowError as failed:
                self.console.problem(str(failed))
                saved = False
        if unprinted:
            raise unprinted
        if not saved and kind is None:
            raise FlowError("")  # said already

    def save(self):
        """Write what a refresh needs to the token store, whose lock the caller holds; False
        (and a line) when it cannot."""
        settings = settings_of(self.config, self.sections.get("metadata") or {})
        try:
            self.config.store.write(store_contents(self.tokens, self.obtained_at, settings), self.console.secrets)
        except FlowError as error:
            self.console.problem(str(error))
            return False
        self.saved = True
        self.console.note("Saved the tokens to {}.".format(self.config.store.path))
        return True

    def got_tokens(self, response, previous=None, spent_section=None):
        """Record a token response; what it leaves out is kept from `previous` (kept_tokens)."""
        self.tokens = kept_tokens(response, previous or {})
        self.obtained_at = time.time()
        if spent_section:
            self.spent.append(spent_section)

    def as_json(self):
        """What --json prints: the sections (a spent refresh token marked as such), and
        `tokens`, the ones the run ends with, so that .tokens.refresh_token is the live one."""
        value = dict(self.sections)
        for name in self.spent:
            value[name] = dict(value[name], refresh_token_spent=True)
        if self.tokens is not None:
            value["tokens"] = store_contents(self.tokens, self.obtained_at, {})
        return value


def kept_tokens(response, previous):
    """A refresh response with what it leaves out kept from the tokens it replaces: an
    absent refresh_token or scope means unchanged (RFC 6749 §5.1, §6)."""
    import copy  # here: only a grant's answer is kept

    tokens = copy.copy(response)  # an Answer stays one: its clock_offset is kept with the tokens
    for kept in ("refresh_token", "scope"):
        if not tokens.get(kept) and previous.get(kept):
            tokens[kept] = previous[kept]
    return tokens


def refresh_later(argv, environ, console, stdin):
    """The bare command with --refresh: discover the token endpoint, then refresh
    REFRESH_TOKEN or the one in the token file (doc steps 2 and 10); no sign-in. The file's
    token is read, spent and replaced under the store's lock, so that no other run spends it too."""
    config = load_config(argv, environ, ask_secret=_ask_secret if _isatty(stdin) else None, console=console)
    with Results(config, console) as results:
        if not config.refresh_token:
            stored_tokens(config.store, console)  # its problems before any traffic
        metadata = results.sections["metadata"] = discover(config, console)
        if config.refresh_token:
            refresh_step(config, console, results, metadata, {"refresh_token": config.refresh_token})
            return EXIT_OK
        with config.store.locked(config.http_timeout + LOCK_MARGIN_SECONDS, console):
            saved = stored_tokens(config.store)  # again, under the lock: another run may have rotated it
            with config.store.refreshing():
                refresh_step(config, console, results, metadata, saved)
                results.save()
    return EXIT_OK


def stored_tokens(store, console=None):
    """What `store` holds, after the checks a file of secrets needs; FlowError when it
    holds no refresh token, or one the server has refused (it is never sent again)."""
    saved = store.read(console)
    if saved is None:
        raise FlowError("Cannot read the token file {}: No such file or directory.".format(store.path), EXIT_USAGE)
    refused_sign_in(saved, store)
    if not saved.get("refresh_token"):
        raise FlowError("The token file {} has no refresh_token; run the full flow first.".format(store.path),
                        EXIT_USAGE)
    return saved


# --- The token store ----------------------------------------------------------------------


# One JSON file, shared by --token-file and the subcommands; this section alone opens it.
# It holds the token response, when it was obtained and expires, and what a refresh needs
# without discovery. Never the client secret.
STORE_FIELDS = ("backend_url", "client_id", "auth_method", "issuer", "token_endpoint", "revocation_endpoint",
                "requested_scope")

ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
MAX_EXPIRES_IN = 10 * 365 * 24 * 3600  # beyond this an expires_in is nonsense: treated as absent
LOCK_POLL_SECONDS = 0.02
MAX_TIMESTAMP = 253402300800  # 10000-01-01: later times cannot be written in ISO_FORMAT


WINDOWS_PROFILE_VARIABLES = ("APPDATA", "LOCALAPPDATA", "USERPROFILE")  # in the order tried
SHARING_RETRY_SECONDS = 0.05  # Windows has no way to wait for another process to close a file


def token_file_path(flag_value, environ):
    """--token-file, else GLEAN_TOKEN_FILE, else the per-user default
    ($XDG_CONFIG_HOME/glean-oauth/tokens.json; %APPDATA%\\glean-oauth\\tokens.json on Windows)."""
    path = (flag_value or environ.get("GLEAN_TOKEN_FILE", "")).strip()
    if path:
        return path
    if os.name == "nt":  # ~ would come from USERPROFILE, and with none set be a folder named ~
        base = next((environ[name] for name in WINDOWS_PROFILE_VARIABLES
                     if os.path.isabs(environ.get(name, "").strip())), None)
        if base is None:
            raise FlowError("Cannot tell where your token store goes: none of {} is set to a full path. Set "
                            "APPDATA, or give --token-file.".format(", ".join(WINDOWS_PROFILE_VARIABLES)), EXIT_USAGE)
    else:
        xdg = environ.get("XDG_CONFIG_HOME", "")
        # The XDG Base Directory spec: a relative path is invalid and must be ignored.
        base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "glean-oauth", "tokens.json")


def open_store(flag_value, environ):
    """The Tenants of the token store that --token-file, GLEAN_TOKEN_FILE or the default names."""
    named_by = "--token-file" if (flag_value or "").strip() else \
        "GLEAN_TOKEN_FILE" if environ.get("GLEAN_TOKEN_FILE", "").strip() else None
    return Tenants(TokenStore(token_file_path(flag_value, environ), named_by))


def tenant_store(flag_value, environ, backend_flag=None):
    """The store of the tenant a command is for (Tenants.select), with the backend that
    named it: --backend-url, GLEAN_BACKEND_URL or GLEAN_SERVER_URL, else the default one."""
    named = named_backend(environ, backend_flag)
    return open_store(flag_value, environ).select(*named), named


class Tenants:
    """The tenants kept under one store name (--token-file, GLEAN_TOKEN_FILE or the default):
    the first in that very file, as a store of one tenant always was; each other one in a
    file beside it named after its backend (tenant_file_name). Each is a TokenStore of its
    own, with its own lock and journal, so refreshing one never waits on another. Only such
    files are tenants: a lock, a journal, a backup or another store beside them never is."""

    def __init__(self, base):
        self.base = base

    def files(self):
        """The stores of the tenants there are, the named file first; each knows whether it
        shares the name with other tenants (`shared`: a secret from the environment is then
        used only for the client CLIENT_ID names)."""
        import glob

        root, ext = os.path.splitext(self.base.path)
        others = [path for path in sorted(glob.glob(glob.escape(root) + ".*" + glob.escape(ext)))
                  if path != self.base.path and self.is_tenant(path)]
        stores = ([self.base] if os.path.lexists(self.base.path) else []) + [
            TokenStore(path, self.base.named_by) for path in others]
        for store in stores:
            store.shared, store.named_path = len(stores) > 1, self.base.path
        return stores

    def is_tenant(self, path):
        """A file this program made for a tenant: its name is the one its backend gets (a
        digest in it: one that cannot be read is still reported), or the name an earlier
        version gave it, checked against the backend inside."""
        label = path[len(os.path.splitext(self.base.path)[0]) + 1:len(path) - len(os.path.splitext(self.base.path)[1])]
        backend = self.backend_of(TokenStore(path))
        if re.match(r"^[a-z0-9._-]+-[0-9a-f]{10}$", label):
            return backend is None or path == self.tenant_file_name(backend)
        return backend is not None and label == re.sub(r"[^A-Za-z0-9.-]", "_", urllib.parse.urlsplit(backend).netloc)

    def tenant_file_name(self, backend):
        """Where a tenant other than the first goes: its host, shortened, and a digest of its
        origin, so that no two backends share a file and no name grows long."""
        import hashlib

        root, ext = os.path.splitext(self.base.path)
        host = re.sub(r"[^a-z0-9.-]", "_", urllib.parse.urlsplit(backend).hostname or "backend")[:40]
        return "{}.{}-{}{}".format(root, host, hashlib.sha256(backend.encode("utf-8")).hexdigest()[:10], ext)

    def backend_of(self, store):
        return backend_of(store.peek())

    def select(self, named=None, named_by=None):
        """The store of the tenant a command is for: the one `named`, else the default one.
        With one stored for another backend, that one (its reader says so); with several,
        none named and no default, a usage error that lists them."""
        files = self.files()
        wanted = named or (self.default() if len(files) > 1 else None)
        for store in files if wanted else []:
            if self.backend_of(store) == wanted:
                store.backend = named if named_by == "--backend-url" else None  # hints repeat the flag
                return store
        if named and len(files) > 1:
            self.base.backend = named
            raise SignInNeeded("No tokens are stored for {} ({}) at {}: there are tokens for {}.".format(
                named, named_by, self.base.path, self.listed(files)), self.base)
        if len(files) <= 1:
            store = files[0] if files else self.base
            store.backend = named if named_by == "--backend-url" else None
            return store
        raise FlowError("Tokens for several backends are stored at {}: {}. Name one with --backend-url, "
                        "GLEAN_BACKEND_URL or GLEAN_SERVER_URL, or make one the default with login "
                        "--default.".format(self.base.path, self.listed(files)), EXIT_USAGE)

    def default(self):
        """The default tenant's backend: the one `login --default` named, else the first
        signed in (the named file's); None when there is neither."""
        backends = [self.backend_of(store) for store in self.files()]
        named = self.backend_of(self.default_store())
        return named if named in backends else self.backend_of(self.base)

    def default_store(self):
        """The file that names the default tenant (login --default), beside the named file."""
        return TokenStore(self.base.path + ".default", self.base.named_by)

    def listed(self, files):
        return ", ".join(str(self.backend_of(store)) for store in files)

    def store_for(self, backend):
        """Where a sign-in for `backend` goes: its tenant's file, else the named file when
        that holds no other tenant's tokens, else a file of its own beside it. Decided again
        under the named file's lock when the tokens are written (login), so that two sign-ins
        at once for two backends never pick the same file."""
        for store in self.files():
            if self.backend_of(store) == backend:
                return store
        if self.backend_of(self.base) is None:
            return self.base  # none there, or one that cannot be read: the sign-in replaces it
        store = TokenStore(self.tenant_file_name(backend), self.base.named_by)
        store.named_path, store.backend = self.base.path, backend
        return store


def backend_of(saved):
    """The backend the stored tokens are for, as backend_origin reads it (a store written
    by an earlier version may differ in case or a trailing /), or None."""
    value = saved.get("backend_url")
    try:
        return backend_origin(value) if value else None
    except FlowError:
        return value  # not a backend's origin: never the one named


def settings_of(config, metadata):
    """What a later refresh or revocation needs without discovery (STORE_FIELDS)."""
    return {"backend_url": config.backend_url, "client_id": config.client_id, "auth_method": config.auth_method,
            "issuer": metadata.get("issuer"), "token_endpoint": metadata.get("token_endpoint"),
            "revocation_endpoint": metadata.get("revocation_endpoint"), "requested_scope": config.scope}


def store_contents(tokens, obtained_at, settings):
    """The token response, `obtained_at` and `expires_at` (UTC, ISO 8601), the server's
    clock lead when its answer said (`clock_offset_seconds`), and the `settings` a later
    refresh needs."""
    contents = {key: value for key, value in tokens.items() if key not in STORE_FIELDS + ("clock_offset_seconds",)}
    contents["obtained_at"] = iso_time(obtained_at)
    if getattr(tokens, "clock_offset", None) is not None:
        contents["clock_offset_seconds"] = tokens.clock_offset
    expires_in = tokens.get("expires_in")
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and 0 <= expires_in <= MAX_EXPIRES_IN:
        contents["expires_at"] = iso_time(obtained_at + expires_in)
    else:
        contents.pop("expires_at", None)
    contents.update((key, value) for key, value in settings.items() if isinstance(value, str) and value)
    return contents


def iso_time(timestamp):
    return time.strftime(ISO_FORMAT, time.gmtime(int(timestamp)))


ISO_TIME = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)Z$")


def parse_iso_time(text):
    """Seconds since the epoch of an ISO_FORMAT time, or None. Worked out here rather than
    with time.strptime and calendar, whose imports would double the time `token` takes."""
    match = ISO_TIME.match(text) if isinstance(text, str) else None
    if not match:
        return None
    year, month, day, hour, minute, second = map(int, match.groups())
    # Days since 1970-01-01 in the proleptic Gregorian calendar, counting years from March
    # so that the leap day comes last (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
    year -= month <= 2
    era_day = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    days = 365 * year + year // 4 - year // 100 + year // 400 + era_day - 719468
    return days * 86400 + hour * 3600 + minute * 60 + second


class TokenStore:
    """The token file at `path` (a ~ the shell left alone is expanded): its checks, its
    lock, its refresh journal and its atomic write. Nothing else opens it."""

    def __init__(self, path, named_by="--token-file"):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.lock_path = self.path + ".lock"
        self.journal_path = self.path + ".refreshing"  # a refresh in flight: its grant was sent
        self.named_by = named_by  # "--token-file", "GLEAN_TOKEN_FILE" or None (the default place)
        self.shared = False  # other tenants' stores beside it (Tenants.files)
        self.backend = None  # the backend a command named for it: its hints name it too
        self.named_path = self.path  # the store the user named: a tenant's hints name that one

    def command(self, subcommand):
        """The command that runs `subcommand` on this store, to paste as it is: the program as
        it was run, and the flags that chose the store and the tenant."""
        line = program_command() + " " + subcommand
        if self.named_by == "--token-file":
            line += " --token-file " + _shell_word(self.named_path)
        backend = self.backend or self.shared and Tenants(self).backend_of(self)  # one of several: which one
        if backend:
            line += " --backend-url " + _shell_word(backend)
        if self.named_by == "GLEAN_TOKEN_FILE":
            return "GLEAN_TOKEN_FILE=" + _shell_word(self.named_path) + " " + line
        return line

    def check_writable(self):
        """FlowError (exit 2) when the file could not be replaced, before any traffic: a
        sign-in or a rotated refresh token that cannot be saved is lost for good."""
        import stat

        folder = os.path.dirname(self.path)
        problem = None
        try:
            info = os.lstat(self.path)
        except OSError:
            info = None
        if info and stat.S_ISLNK(info.st_mode):
            problem = "it is a symlink, and tokens are never written through one; give the real path"
        elif info and stat.S_ISDIR(info.st_mode):
            problem = "it is a folder"
        elif info and not stat.S_ISREG(info.st_mode):
            problem = "it is not a regular file"
        elif info and os.name == "posix" and info.st_uid != os.getuid():
            problem = "it belongs to another user, so it cannot be replaced"
        elif not os.path.isdir(folder) and self.path.endswith(os.path.join("glean-oauth", "tokens.json")):
            try:
                os.makedirs(folder, 0o700)  # the default place: made for the user alone
            except OSError as error:
                problem = "its folder cannot be made ({})".format(_why(error))
        elif not os.path.isdir(folder):
            problem = "its folder {} does not exist".format(folder)
        elif len(os.path.basename(self.journal_path).encode("utf-8", ENV_ERRORS)) > 255:
            problem = "its name is too long for a file name beside it (its journal, {}.refreshing)".format(
                os.path.basename(self.path))
        if problem:
            raise FlowError("Cannot use the token file {}: {}.".format(self.path, problem), EXIT_USAGE)
        check_folder(self.path, "the token file")
        try:  # the proof: a file can be made, and so renamed, there
            import tempfile  # here: only a write needs it

            fd, probe = tempfile.mkstemp(prefix=".glean-oauth-probe-", suffix=".tmp", dir=folder)
            os.close(fd)
            _remove(probe)
        except OSError as error:
            raise FlowError("Cannot use the token file {}: its folder {} is not writable by you ({}).".format(
                self.path, folder, _why(error)), EXIT_USAGE)

    def read(self, console=None):
        """The saved contents (a dict), or None when there is no file. The checks run on the
        open file, not on its path, so a file swapped in between is never what is read; a
        warning goes to `console` when others can read it."""
        data = read_private_file(self.path, "the token file", [_uid()], console)
        if data is None:
            return None
        try:
            saved = parse_json(data.decode("utf-8"))
        except ValueError as error:  # also UnicodeDecodeError
            raise self.unusable("it is not JSON ({})".format(error))
        if not isinstance(saved, dict):
            raise self.unusable("it does not hold a JSON object")
        for key in TEXT_FIELDS:
            if saved.get(key) is not None and not isinstance(saved[key], str):
                raise self.unusable("its {} is not text".format(key))
        return saved

    def peek(self):
        """What it holds, or {} when nothing, or nothing that can be read (the command that
        reads it says why)."""
        try:
            return self.read() or {}
        except FlowError:
            return {}

    def unusable(self, problem):
        """The error for a file that cannot be read as a store, with the way to start over."""
        return FlowError("The token file {} cannot be used: {}. Start over with: {}, then {}.".format(
            self.path, problem, self.command("logout --local"), self.command("login")), EXIT_USAGE)

    def write(self, contents, secrets=()):
        """Write `contents` as JSON: owner-only from the start (0600), atomically (a
        temporary file in the same folder, flushed, fsynced, renamed), never through a
        symlink, and with each of `secrets` redacted (a server could echo the client
        secret into a token response). A crash mid-write leaves the old file whole."""
        contents = redacted(contents, secrets)
        if os.path.islink(self.path):
            raise FlowError("Not writing tokens through the symlink {}; give the real path.".format(self.path))
        folder = os.path.dirname(self.path)
        try:
            import tempfile  # here: only a write needs it

            fd, temporary = tempfile.mkstemp(prefix=self.temporary_prefix(), suffix=".tmp", dir=folder)  # 0600
        except OSError as error:
            raise FlowError("Cannot write the token file {}: {}.".format(self.path, _why(error)))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(contents, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            _while_shared(lambda: os.replace(temporary, self.path))
        except BaseException as error:
            _remove(temporary)
            if isinstance(error, (OSError, ValueError)):
                raise FlowError("Cannot write the token file {}: {}.".format(
                    self.path, _why(error)))
            raise
        _fsync_folder(folder)

    def delete(self):
        """Remove the file, and what goes with it: the secret kept for it, its journal and
        its lock (held by the caller: removed last). True when there was a file."""
        existed = True
        try:
            _while_shared(lambda: os.unlink(self.path))
        except FileNotFoundError:
            existed = False
        except OSError as error:
            raise FlowError("Cannot remove the token file {}: {}.".format(self.path, _why(error)))
        for path in (self.secret_store().path, self.journal_path, self.lock_path):
            try:
                _remove(path)
            except OSError:  # Windows: the lock, still open here
                pass
        _fsync_folder(os.path.dirname(self.path))
        return existed

    def secret_store(self):
        """Where `login --save-secret` keeps the client secret (or its file's path) for this
        tenant alone: a file beside it, with the token file's protections."""
        return TokenStore(self.path + ".secret", self.named_by)

    def locked(self, timeout, console=None):
        """The store's lock, for every read -> change -> write, so that runs in parallel
        never spend one refresh token twice or undo each other's write. Once it is held, a
        refresh that an earlier run left interrupted is reported to `console` and cleaned up.
        FlowError when it cannot be had in `timeout` s."""
        return _StoreLock(self, timeout, console)

    def refreshing(self):
        """Around a refresh grant and the write of its answer: the journal says, while the
        grant is in flight, that the stored refresh token may be spent (it holds no token)."""
        return _RefreshJournal(self)

    def temporary_prefix(self):
        """Its temporary files are named after it (.tokens.json.<8 random>.tmp): each store
        cleans up its own, never another's that is being written."""
        return "." + os.path.basename(self.path) + "."

    def interrupted_refresh(self):
        """When a refresh whose answer was never saved was started (ISO time), or None. The
        journal gets the store's own checks: no FIFO or symlink can hang or flood the read."""
        try:
            data = read_private_file(self.journal_path, "the refresh journal", [_uid()])
        except FlowError:  # a folder, or another user's: no journal of ours
            return None
        if data is None:
            return None
        try:
            record = parse_json(data.decode("utf-8"))
        except ValueError:  # cut short by the crash that interrupted the refresh
            record = None
        started = record.get("started_at") if isinstance(record, dict) else None
        return started if isinstance(started, str) else "at an unknown time"

    def recover(self, console=None):
        """After an interrupted refresh: say what it means, and clear its leftovers."""
        started = self.interrupted_refresh()
        if started is None:
            return
        if console:
            console.problem("The last refresh of the tokens at {} was interrupted after it was sent ({}): the "
                            "server has probably spent that refresh token. If the next refresh is refused, sign in "
                            "again with: {}".format(self.path, started, self.command("login")))
        import glob

        # Under the lock every writer of this store is gone: what it left is removed, and only that.
        pattern = glob.escape(os.path.join(os.path.dirname(self.path), self.temporary_prefix())) + "?" * 8 + ".tmp"
        for leftover in glob.glob(pattern):
            _remove(leftover)
        _remove(self.journal_path)


TEXT_FIELDS = STORE_FIELDS + ("access_token", "refresh_token", "token_type", "obtained_at", "expires_at",
                               "refresh_refused_at", "refresh_refused")


def program_command():
    """This program as it was run, for a hint to paste anywhere: the interpreter as typed
    when PATH finds it (python3), else its absolute path; then `-m glean_oauth` when run with
    -m, else the script's absolute path as typed (a symlink stays one)."""
    import shutil  # here: only a hint needs it

    typed = (getattr(sys, "orig_argv", None) or [""])[0]  # Python 3.10+; before, the absolute path
    python = _shell_word(typed if typed and os.sep not in typed and shutil.which(typed) else
                         sys.executable or "python3")
    if __name__ == "__main__" and getattr(sys.modules["__main__"], "__spec__", None) is not None:  # run by -m
        return python + " -m glean_oauth"
    return python + " " + _shell_word(os.path.abspath(sys.argv[0] if __name__ == "__main__" else __file__))


def _uid():
    return os.getuid() if os.name == "posix" else None


def _shell_word(text):
    """`text` quoted for the shell where it needs to be: a POSIX shell's single quotes, or
    on Windows double quotes (and a path's backslashes as they are)."""
    if re.match(r"^[A-Za-z0-9_./:@%+=,\\-]+\Z" if os.name == "nt" else r"^[A-Za-z0-9_./:@%+=,-]+\Z", text):
        return text
    return '"' + text + '"' if os.name == "nt" else _sh(text)


def _sh(text):
    """`text` in single quotes for a POSIX shell's eval."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _while_shared(action, patience=None):
    """`action()`. On Windows, a file another process has open (a reader, an antivirus, a
    backup tool) cannot be replaced, removed or, while it is replaced, opened: the
    PermissionError is retried for up to `patience` seconds (the lock's margin), since a
    rotated refresh token that cannot be saved is lost. Elsewhere it is tried once."""
    deadline = time.monotonic() + (LOCK_MARGIN_SECONDS if patience is None else patience)
    while True:
        try:
            return action()
        except PermissionError:
            if os.name != "nt" or time.monotonic() > deadline:
                raise
            time.sleep(SHARING_RETRY_SECONDS)


def _why(error):
    """An OSError's reason in words (its strerror), else what it says."""
    return getattr(error, "strerror", None) or error


def _remove(path):
    """Remove the file at `path`; one already gone is no error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def check_folder(path, what):
    """Refuse a file whose folder another user owns, or its group or others can write to:
    they could swap in, plant or delete the file, or put a FIFO or a lock of theirs beside
    it (OpenSSH refuses such folders too). Root's folders are fine; a missing one is left
    to the caller. One check, for the token store, its lock and journal, and the secret file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(folder)
    except OSError:
        return
    problem = None
    if os.name == "posix" and info.st_uid not in (os.getuid(), 0):
        problem = "its folder {} belongs to another user".format(folder)
    elif os.name == "posix" and info.st_mode & 0o022:
        problem = "{} can write to its folder {} (mode {:o}); keep it in a folder only you can write to".format(
            "other users" if info.st_mode & 0o002 else "its group", folder, info.st_mode & 0o7777)
    if problem:
        raise FlowError("Not using {} {}: {}.".format(what, path, problem), EXIT_USAGE)


MAX_PRIVATE_FILE_BYTES = 1024 * 1024  # a token store or a secret: a few kilobytes


def read_private_file(path, what, owners, console=None):
    """The bytes of the file at `path`, or None when there is none. The file is opened
    first, never through a symlink and without blocking (a FIFO cannot hang the read), and
    checked on the open descriptor: a regular file, owned by one of `owners` (uids), that
    others cannot change, as ssh checks a private key. A warning to `console` when others
    can read it; FlowError (exit 2) naming the problem."""
    import stat

    check_folder(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if os.name == "nt" and os.path.isdir(path):  # Windows cannot open a folder to look at it
        raise FlowError("Not using {} {}: it is a folder.".format(what, path), EXIT_USAGE)
    try:
        if not hasattr(os, "O_NOFOLLOW") and os.path.islink(path):
            raise OSError(errno.ELOOP, "symlink")
        fd = _while_shared(lambda: os.open(path, flags))
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FlowError("Not using {} {}: it is a symlink; give the real path.".format(what, path), EXIT_USAGE)
        raise FlowError("Cannot read {} {}: {}.".format(what, path, _why(error)), EXIT_USAGE)
    try:
        info = os.fstat(fd)
        mode = info.st_mode & 0o777
        problem = None
        if stat.S_ISDIR(info.st_mode):
            problem = "it is a folder"
        elif not stat.S_ISREG(info.st_mode):
            problem = "it is not a regular file"
        elif os.name == "posix" and info.st_uid not in owners:
            problem = "it belongs to another user"
        elif os.name == "posix" and mode & 0o022:
            problem = "other users can change it (mode {:o}); run chmod 600 {}".format(mode, _shell_word(path))
        if problem:
            raise FlowError("Not using {} {}: {}.".format(what, path, problem), EXIT_USAGE)
        if console and os.name == "posix" and mode & 0o044:
            console.problem("Other users can read {} {} (mode {:o}); run chmod 600 {}.".format(
                what, path, mode, _shell_word(path)))
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 65536)
            size += len(chunk)
            if not chunk or size > MAX_PRIVATE_FILE_BYTES:
                break
            chunks.append(chunk)
        if size > MAX_PRIVATE_FILE_BYTES:
            raise FlowError("Not using {} {}: it is over {} bytes.".format(what, path, MAX_PRIVATE_FILE_BYTES),
                            EXIT_USAGE)
        return b"".join(chunks)
    except OSError as error:
        raise FlowError("Cannot read {} {}: {}.".format(what, path, _why(error)), EXIT_USAGE)
    finally:
        os.close(fd)


def _fsync_folder(folder):
    """Make a rename or removal in `folder` durable, where the system can; never raises."""
    if os.name != "posix":
        return
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the data itself is already synced


class _StoreLock:
    """TokenStore.locked: the file lock, then recovery from an interrupted refresh."""

    def __init__(self, store, timeout, console):
        self.store, self.console = store, console
        self.lock = _FileLock(store.lock_path, timeout)

    def __enter__(self):
        check_folder(self.store.path, "the token file")  # no lock file of another's can be planted there
        try:
            self.lock.__enter__()
        except OSError as error:  # the folder has gone, or cannot be written
            raise FlowError("Cannot write the token file {}: {}.".format(self.store.path, _why(error)))
        try:
            self.store.recover(self.console)
        except BaseException:
            self.lock.__exit__()
            raise
        return self.store

    def __exit__(self, *exc):
        self.lock.__exit__()


class _RefreshJournal:
    """TokenStore.refreshing: the journal is written (and synced) before the grant is sent,
    and removed once its answer is saved, or once the server has answered with an error
    (nothing was spent). A break with no answer leaves it, for the next run to report."""

    def __init__(self, store):
        self.store = store

    def __enter__(self):
        record = json.dumps({"started_at": iso_time(time.time()), "pid": os.getpid()})
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.store.journal_path, flags, 0o600)
            try:
                os.write(fd, record.encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            raise FlowError("Cannot write the refresh journal {}: {}.".format(
                self.store.journal_path, _why(error)))
        _fsync_folder(os.path.dirname(self.store.path))
        return self

    def __exit__(self, kind, error, traceback):
        answered = kind is None or isinstance(error, FlowError) and error.status is not None
        if answered:
            _remove(self.store.journal_path)


class _FileLock:
    """fcntl.flock on POSIX, msvcrt.locking on Windows, on a 0600 file never followed
    through a symlink. Waits by polling, within a bound."""

    def __init__(self, path, timeout):
        self.path, self.timeout = path, timeout

    def __enter__(self):
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        self.fd = os.open(self.path, flags, 0o600)  # OSError for the caller to name the store
        deadline = time.monotonic() + self.timeout
        while not self._try():
            if time.monotonic() > deadline:
                os.close(self.fd)
                raise FlowError("Another run has held the lock {} for {:g} s; try again, or remove it if no "
                                "run is going on.".format(self.path, self.timeout))
            time.sleep(LOCK_POLL_SECONDS)  # flock has no timeout of its own
        return self

    def _try(self):
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(self.fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def __exit__(self, *exc):
        if os.name != "nt":  # unlocked, not only closed: a child forked meanwhile shares the open file
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)  # on Windows, closing releases the lock


# --- The subcommands: tokens that stay usable ---------------------------------------------


# login signs in once; token, exec and TokenProvider then serve a valid access token from
# the token store, refreshing it (under a lock, so parallel runs refresh once) when it
# expires within --min-valid seconds; status shows what is stored; logout ends it.
EXIT_SIGN_IN = 3

EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND = 126, 127  # as shells have them
LOCK_MARGIN_SECONDS = 10  # a run holding the lock may take the HTTP timeout, and a little more

# What a child of `exec` never needs: the client's secret and a refresh token.
EXEC_DROPPED = ("CLIENT_SECRET", "CLIENT_SECRET_FILE", "REFRESH_TOKEN")
EXEC_MIN_VALID = "300"  # exec's --min-valid default, in seconds: token's is 60


class SignInNeeded(FlowError):
    """Nothing usable is stored: the user must run `login` (exit code 3)."""

    def __init__(self, message, store=None):
        command = store.command("login") if store else program_command() + " login"
        super().__init__(message + " Sign in with: " + command, EXIT_SIGN_IN)


def login_command(argv, environ, console, stdin):
    """`login`: sign in as the flow does (doc steps 2 to 7), then save the tokens and say
    who signed in, where the tokens are and until when. Nothing on stdout."""
    config = load_config(argv, environ, ask_secret=_ask_secret if _isatty(stdin) else None, command="login",
                         console=console)
    console.secrets = secret_forms(config.client_id, config.client_secret)
    console.out = console.err  # the URL is for a person; stdout never carries a token
    saved = None if config.force else current_sign_in(config)
    if saved:
        console.note("Already signed in as {} at {}; {}. To sign in again: {}".format(
            one_line(user_of(saved) or "an unknown user"), config.backend_url, expiry_text(saved, time.time()),
            config.store.command("login --force")))
    else:
        config.store = sign_in_and_save(config, environ, console, stdin)
    if config.save_secret and config.auth_method != "none":
        with config.store.locked(config.http_timeout + LOCK_MARGIN_SECONDS):
            config.store.secret_store().write(secret_kept(config, environ))
    if config.default:
        tenants = open_store(config.token_file, environ)
        with tenants.base.locked(config.http_timeout + LOCK_MARGIN_SECONDS):
            tenants.default_store().write({"backend_url": config.backend_url})
    if config.auth_method != "none":
        where = kept_secret(config.store, config.client_id)[1]
        console.note("Later refreshes take the client secret from {}.".format(where) if where else
                     "Later refreshes need the client secret where they run (CLIENT_SECRET or CLIENT_SECRET_FILE); "
                     "to keep it with the tokens instead: " + config.store.command("login --save-secret"))
    return EXIT_OK


def secret_kept(config, environ):
    """What login --save-secret keeps: the secret file's absolute path when the secret came
    from a file (--client-secret-file, CLIENT_SECRET_FILE), else the secret itself."""
    path = secret_file_named(environ, config.secret_file)
    kept = {"client_id": config.client_id}
    kept.update({"client_secret_file": os.path.abspath(os.path.expanduser(path))} if path else
                {"client_secret": config.client_secret})
    return kept


def sign_in_and_save(config, environ, console, stdin):
    """login's sign-in: doc steps 2 to 7, the tokens saved, and what they are; returns the store."""
    before = config.store.peek().get("refresh_token")
    metadata = discover(config, console, show=False)
    token_response = sign_in(config, console, metadata, stdin, environ)
    contents = store_contents(token_response, time.time(), settings_of(config, metadata))
    config.store = save_sign_in(config, open_store(config.token_file, environ), contents, before, console)
    console.note("Signed in as {}; saved the tokens to {}; {}.".format(
        one_line(user_of(contents) or "an unknown user"), config.store.path, expiry_text(contents, time.time())))
    granted = set((granted_scope(contents) or "").lower().split())
    missing = [scope for scope in config.scope.split() if scope.lower() not in granted
               and not (scope.lower() == "offline_access" and token_response.get("refresh_token"))]
    if granted and missing:
        console.note("Not granted: {} (asked for {}): what needs {} will be refused. A Glean admin can give the "
                     "static client {}.".format(" ".join(missing), config.scope, "it" if len(missing) == 1 else "them",
                                                "that scope" if len(missing) == 1 else "those scopes"))
    if not token_response.get("refresh_token"):
        console.note("No refresh token came back, so `token` can serve this one only until it expires: you will "
                     "sign in again in about {}. {}".format(expiry_text(contents, time.time(), relative_only=True),
                                                            OFFLINE_ACCESS_HINT))
    return config.store


def save_sign_in(config, tenants, contents, before, console):
    """Write a sign-in to its tenant's file, chosen again under the named file's lock (and
    written under its own): two logins at once for two backends each get a file of their
    own. For one backend the later one is kept; tokens another sign-in stored meanwhile (a
    refresh token other than `before`) are revoked, or said to stay valid. Returns the store."""
    import contextlib

    timeout = config.http_timeout + LOCK_MARGIN_SECONDS
    with contextlib.ExitStack() as held:
        held.enter_context(tenants.base.locked(timeout))  # one tenant made at a time
        store = tenants.store_for(config.backend_url)
        if store.path != tenants.base.path:
            held.enter_context(store.locked(timeout))  # not in the middle of its refresh
        replaced = store.peek().get("refresh_token")
        store.write(contents, console.secrets)
        if replaced not in (None, before) and replaced != contents.get("refresh_token"):
            console.note("Another sign-in for {} saved its tokens while this one ran; this one's replaced them, "
                         "and {}.".format(config.backend_url, revoke_replaced(store, replaced, config.client)))
    return store


def revoke_replaced(store, refresh_token, client):
    """Revoke a refresh token no store holds any more; say what became of it."""
    endpoint = (store.read() or {}).get("revocation_endpoint")
    if not endpoint:
        return "its refresh token stays valid until it expires (the server advertises no revocation endpoint)"
    try:
        revoke_token(endpoint, client, refresh_token, "refresh_token")
    except FlowError as error:
        return "its refresh token could not be revoked: " + str(error).rstrip(".")
    return "its refresh token was revoked"


def current_sign_in(config):
    """The stored sign-in when it serves this `login` as it is: the same tenant and client,
    requested scopes that include the ones asked for now (compared case-insensitively),
    and an access token that is valid or can be renewed; else None."""
    saved = config.store.peek()  # what cannot be read, the sign-in replaces
    if not saved or (backend_of(saved), saved.get("client_id")) != (config.backend_url, config.client_id):
        return None
    asked, had = (set((scope or "").lower().split()) for scope in (config.scope, saved.get("requested_scope")))
    renewable = not saved.get("refresh_refused_at") and (valid_for(saved, 0, time.time()) or saved.get("refresh_token"))
    return saved if asked <= had and renewable else None


def token_command(argv, environ, console, stdin):
    """`token`: print a valid access token and nothing else; never a browser, never a prompt.
    The token is printed as it is: redaction never rewrites it (one that holds the client
    secret is refused instead)."""
    args = parse_args("token", argv)
    chosen = [flag for flag, value in (("--format", args.format), ("--json", args.json), ("--header", args.header))
              if value]
    if len(chosen) > 1:
        raise FlowError("{} and {} both choose what token prints; give one.".format(*chosen[:2]), EXIT_USAGE)
    tokens = fresh_tokens_for(args, environ, console)
    if any(form in tokens["access_token"] for form in console.secrets):
        raise FlowError("The stored access token holds the client secret; not printing it.")
    output = args.format or ("json" if args.json else "header" if args.header else "raw")
    if output == "json":  # --json as it always was; --format json adds the expiry in seconds
        value = token_json(tokens, time.time())
        console.result({key: value[key] for key in list(value)[:4]} if not args.format else value, verbatim=True)
    else:
        console.verbatim(TOKEN_FORMATS[output](tokens["access_token"], tokens.get("backend_url") or ""))
    return EXIT_OK


def token_json(tokens, now):
    """`token --format json`: the token, its type, scope and expiry, also as whole seconds
    left (expires_in) and as epoch seconds (expires_on), as tools that cache tokens read them."""
    when = expires_at(tokens)
    value = {key: tokens.get(key) for key in ("access_token", "token_type", "expires_at", "scope")}
    value.update(expires_in=None if when is None else int(when - now), expires_on=None if when is None else int(when))
    return value


# The ways `token` prints a token, one row each: name -> (access token, backend) -> text. The
# token never goes on a command line: each is read from a pipe or an eval.
TOKEN_FORMATS = {
    "raw": lambda token, server: token,
    "header": lambda token, server: "Authorization: Bearer " + token,
    "json": None,  # token_json, printed as JSON
    "headers-json": lambda token, server: json.dumps({"Authorization": "Bearer " + token}),  # MCP header helpers
    "curl": lambda token, server: 'header = "Authorization: Bearer {}"'.format(token),  # curl -K -
    "env": lambda token, server: "export GLEAN_API_TOKEN={}\nexport GLEAN_SERVER_URL={}".format(
        _sh(token), _sh(server)),
}


def exec_command(argv, environ, console, stdin):
    """`exec -- CMD [ARGS...]`: run CMD with a valid token as GLEAN_API_TOKEN and the
    backend as GLEAN_SERVER_URL, in its environment only: never on a command line, where
    ps would show it, and without the client secret or a refresh token, which it never
    needs. Exits with CMD's exit code (126: it cannot be run, 127: not found)."""
    args = parse_args("exec", argv)
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command or not command[0]:
        raise FlowError("exec needs a command: glean_oauth.py exec -- CMD [ARGS...]", EXIT_USAGE)
    tokens = fresh_tokens_for(args, environ, console)
    server = tokens.get("backend_url") or named_backend(environ)[0]
    child_environ = {name: value for name, value in environ.items() if name not in EXEC_DROPPED}
    child_environ.update(GLEAN_API_TOKEN=tokens["access_token"], GLEAN_SERVER_URL=server)
    try:
        if os.name == "posix":  # CMD takes this process's place: its exit code and signals are its own
            for stream in (sys.stdout, sys.stderr):
                if stream:
                    stream.flush()
            os.execvpe(command[0], command, child_environ)
        import subprocess

        return subprocess.call(command, env=child_environ)
    except (OSError, ValueError) as error:  # ValueError: a NUL in the command or the environment
        found = not isinstance(error, FileNotFoundError)
        raise FlowError("Cannot run {}: {}.".format(one_line(command[0]), _why(error) if found else "not found"),
                        EXIT_CANNOT_EXECUTE if found else EXIT_NOT_FOUND)


def status_command(argv, environ, console, stdin):
    """`status`: what is stored, never a token: the tenant named, else every one, as lines or
    as {"tenants": [...]} (one shape always). Exits with the worst tenant's code: 1 a store
    that cannot be read, over 3 a sign-in needed, over 2 no secret here to renew, over 0."""
    args = parse_args("status", argv)
    tenants = open_store(args.token_file, environ)
    backend, named_by = named_backend(environ, args.backend_url)
    try:
        stores = [tenants.select(backend, named_by)] if backend else tenants.files()
    except SignInNeeded as error:  # the tenant named is not stored: none to show, in the one shape
        console.problem(str(error))
        stores = []
    default, now, infos, codes = tenants.default(), time.time(), [], [EXIT_OK]
    for store in stores:
        try:
            saved = store.read(console)
        except FlowError as error:
            console.problem(str(error))
            codes.append(EXIT_FAILURE)
            continue
        if saved is not None:
            infos.append(status_of(saved, store, now, environ, default))
            codes.append(tenant_problem(infos[-1], saved, store, backend, named_by, console))
    if len(codes) == 1 and not infos:
        codes.append(EXIT_SIGN_IN)
        store = stores[0] if stores else tenants.base
        if not backend or stores:  # (else select said which are stored)
            console.problem("No tokens are stored at {}. Sign in with: {}".format(store.path, store.command("login")))
    one = len(infos) == 1 and (bool(backend) or len(stores) == 1)
    if args.json:
        console.result({"tenants": infos})
    elif one:
        show_status(infos[0], console)
    for info in [] if args.json or one else infos:
        console.line("  ".join(one_line(str(info[key] or "(unknown)")) for key in ("backend_url", "user", "scope"))
                     + "  " + info_expiry(info) + ("  (default)" if info["default"] else ""))
    return max(codes, key=[EXIT_OK, EXIT_USAGE, EXIT_SIGN_IN, EXIT_FAILURE].index)


def tenant_problem(info, saved, store, backend, named_by, console):
    """The exit code of one tenant's status, with a line saying why when it is not 0."""
    if backend and backend_of(saved) != backend:
        console.problem("{} names {}, but these tokens are for {}. Sign in there with: {}".format(
            named_by, backend, one_line(str(saved.get("backend_url"))), store.command("login")))
        return EXIT_SIGN_IN
    if info["refresh_refused_at"]:
        console.problem("The refresh token was refused at {}: the sign-in is spent. Sign in again with: {}".format(
            info["refresh_refused_at"], store.command("login")))
        return EXIT_SIGN_IN
    if info["access_token_valid"] or info["renewable"]:
        return EXIT_OK
    if info["refresh_token"]:
        console.problem("The access token has expired, and its refresh token needs the client secret, which is not "
                        "here: set CLIENT_SECRET or CLIENT_SECRET_FILE, or keep it with: " + store.command(
                            "login --save-secret"))
        return EXIT_USAGE
    console.problem("The access token has expired and there is no refresh token to renew it. Sign in with: "
                    + store.command("login"))
    return EXIT_SIGN_IN


def show_status(info, console):
    """One tenant's status, a line a fact."""
    refresh = "refused at {} ({}): sign in again".format(info["refresh_refused_at"], info["refresh_refused"]) \
        if info["refresh_refused_at"] else "none (sign in again once the access token expires)" \
        if not info["refresh_token"] else "present; renews with the secret from " + info["secret"] \
        if info["renewable"] else "present, but no client secret here to use it (CLIENT_SECRET, " \
        "CLIENT_SECRET_FILE, or login --save-secret)"
    for label, value in (("Token file", info["token_file"]), ("Backend", info["backend_url"]),
                         ("Client", info["client_id"]), ("Auth method", info["auth_method"]),
                         ("Signed in as", info["user"]), ("Scopes", info["scope"]),
                         ("Access token", info_expiry(info)), ("Refresh token", refresh)):
        console.line("{:<14} {}".format(label + ":", one_line(str(value if value not in (None, "") else "(unknown)"))))
    if info["refresh_interrupted"]:
        console.line("{:<14} interrupted after it was sent ({}): the refresh token may be spent".format(
            "Last refresh:", info["refresh_interrupted"]))
    if abs(info["clock_offset_seconds"] or 0) > CLOCK_WARN_SECONDS:
        console.line("{:<14} {} (at the last token response); set it right (NTP)".format(
            "Clock:", clock_text(info["clock_offset_seconds"])))


def logout_command(argv, environ, console, stdin):
    """`logout`: revoke the tokens at the metadata's revocation_endpoint when there is one
    (RFC 7009), then delete them, saying what the server did with each. `--local` forgets
    them without revoking (a corrupt file, no secret, a server that is down)."""
    args = parse_args("logout", argv)
    if not args.all:
        log_out(tenant_store(args.token_file, environ, args.backend_url)[0], args, environ, console)
        return EXIT_OK
    tenants = open_store(args.token_file, environ)
    codes = [EXIT_OK]
    for store in tenants.files() or [tenants.base]:  # each tried, whatever became of the others
        console.note("{} ({}):".format(tenants.backend_of(store) or "A tenant", store.path))
        try:
            log_out(store, args, environ, console)
        except FlowError as error:
            console.problem("  " + str(error))
            codes.append(error.exit_code)
    return max(codes)


def log_out(store, args, environ, console):
    """Revoke and delete the tokens of one tenant (only delete them, with --local)."""
    with store.locked(http_timeout_setting(args, environ) + LOCK_MARGIN_SECONDS):
        if args.local:
            if not store.delete():
                console.note("Nothing is stored at {}; nothing to do.".format(store.path))
                return
            console.note("Deleted {}; nothing was revoked: the refresh token stays valid until it expires or you "
                         "remove the app in Glean's settings.".format(store.path))
            return
        try:
            revoked = revoke_stored(store, args, environ, console)
        except FlowError as error:
            raise FlowError("{} To forget the tokens without revoking them: {}".format(
                error, store.command("logout --local")), error.exit_code)
        if revoked is None:
            store.delete()  # its lock, which this run made
            console.note("Nothing is stored at {}; nothing to do.".format(store.path))
            return
        store.delete()
    console.note("Deleted {}.".format(store.path))


def revoke_stored(store, args, environ, console):
    """Revoke what `store` holds, the refresh token first (it is the lasting one), saying
    per token what the server did; None when nothing is stored. FlowError, the file kept,
    when the refresh token could not be revoked."""
    saved = store.read(console)
    if saved is None:
        return None
    endpoint = saved.get("revocation_endpoint")
    if not endpoint:
        console.note("The server advertises no revocation endpoint, so the tokens were not revoked there: the "
                     "refresh token stays valid until it expires or you remove the app in Glean's settings.")
        return []
    check_endpoint(endpoint, "The token file's revocation_endpoint", saved.get("backend_url") or "")
    client = stored_client(saved, environ, http_timeout_setting(args, environ), store,
                           getattr(args, "client_secret_file", None), console)
    console.secrets = client.secret_forms()
    said = []
    for kind in ("refresh_token", "access_token"):
        if saved.get(kind):
            refusal = revoke_token(endpoint, client, saved[kind], kind)
            name = kind.replace("_", " ")
            if refusal is None:
                said.append(name + " revoked")
            else:
                when = expires_at(saved)
                said.append("the server refused to revoke the {} ({}): it stays valid until {}".format(
                    name, refusal, until_text(when, time.time()) if when else "it expires"))
    console.note("At {}: {}.".format(endpoint, "; ".join(said) or "nothing to revoke"))
    return said


class TokenProvider:
    """A valid access token for Python programs, refreshed as `token` does:

        from glean.api_client import Glean
        provider = TokenProvider()
        glean = Glean(api_token=provider, server_url=provider.server_url)

    Each call returns the access token string. Raises SignInNeeded (exit_code 3) when
    `login` must be run first, FlowError for any other failure. A refresh for a
    confidential client takes CLIENT_SECRET (or CLIENT_SECRET_FILE) from the environment.
    Threads that call while a refresh runs get its result, or its error: one refresh
    per expiry, however many wait.
    """

    def __init__(self, token_file=None, min_valid=60, environ=None, backend_url=None):
        self.environ = os.environ if environ is None else environ
        # The tenant: backend_url, else GLEAN_BACKEND_URL or GLEAN_SERVER_URL, else the default one.
        self.store, self.named = tenant_store(token_file, self.environ, backend_url)
        self.min_valid = min_valid
        self.pid = None
        self._this_process()

    def _this_process(self):
        """The provider's state, made anew in a forked child: a lock another thread held at
        the fork, or a refresh it had in flight, would never be let go there."""
        if self.pid != os.getpid():
            self.pid, self.lock = os.getpid(), threading.Lock()  # guards tokens, refused and flight
            self.tokens, self.refused = None, None  # refused: an access token never served again (invalidate)
            self.flight = None  # the refresh in progress: its outcome goes to every caller that waits

    @property
    def server_url(self):
        """The backend the stored tokens belong to: the server_url to give Glean's SDK."""
        self._this_process()
        with self.lock:
            tokens = self.tokens
        return (tokens or load_store(self.store, self.environ, named=self.named)).get("backend_url")

    def invalidate(self, token=None):
        """The server answered 401 to `token` (default: the current one): the next call
        refreshes, unless another process has stored a new token meanwhile, which it then
        uses. A token that is no longer the current one changes nothing: however many calls
        report it, it costs one refresh. Before any call, nothing to drop."""
        self._this_process()
        with self.lock:
            if self.tokens is not None and token in (None, self.tokens["access_token"]):
                self.refused, self.tokens = self.tokens["access_token"], None

    def __call__(self):
        self._this_process()
        with self.lock:
            if self.tokens is not None and valid_for(self.tokens, self.min_valid, time.time()):
                return self.tokens["access_token"]
            flight, leading = self.flight or _Flight(), self.flight is None
            self.flight = flight
        http_timeout = http_timeout_setting(None, self.environ)
        if leading:
            try:
                flight.tokens = fresh_tokens(self.store, self.environ, self.min_valid, http_timeout,
                                             refused=self.refused, named=self.named)
            except FlowError as error:
                flight.error = error
            finally:
                with self.lock:
                    self.flight = None
                    self.tokens = flight.tokens or self.tokens
                    self.refused = None if flight.tokens else self.refused
                flight.done.set()
        if not flight.done.wait(http_timeout + 2 * LOCK_MARGIN_SECONDS):  # the lock's wait, then the refresh
            raise FlowError("The refresh this call waited for took over {:g} s.".format(
                http_timeout + 2 * LOCK_MARGIN_SECONDS))
        if flight.error is not None or flight.tokens is None:  # None: the refreshing call was interrupted
            raise flight.error or FlowError("The refresh this call waited for was interrupted.")
        return flight.tokens["access_token"]


class _Flight:
    """One TokenProvider refresh: its tokens or its error, once `done` is set."""

    def __init__(self):
        self.done = threading.Event()
        self.tokens, self.error = None, None


def fresh_tokens_for(args, environ, console):
    """fresh_tokens with the flags of `token` or `exec`, for the tenant they select."""
    store, named = tenant_store(args.token_file, environ, args.backend_url)
    min_valid = seconds(args.min_valid, {}, "--min-valid", 60, zero=True)
    refused = refused_sign_in(load_store(store, environ, console, named), store).get("access_token") \
        if getattr(args, "force_refresh", False) else None  # refreshed as if refused: once, under the lock
    tokens = fresh_tokens(store, environ, min_valid, http_timeout_setting(args, environ), console,
                          getattr(args, "client_secret_file", None), refused, named)
    expires, obtained = expires_at(tokens), parse_iso_time(tokens.get("obtained_at"))
    if None not in (expires, obtained) and min_valid >= expires - obtained:
        console.note("--min-valid {:g} is at or beyond the token's lifetime ({:g} s): every call refreshes.".format(
            min_valid, expires - obtained))
    return tokens


def http_timeout_setting(args, environ):
    """--http-timeout, else GLEAN_HTTP_TIMEOUT, else the default."""
    return seconds(getattr(args, "http_timeout", None), environ, "GLEAN_HTTP_TIMEOUT", HTTP_TIMEOUT_SECONDS)


def fresh_tokens(store, environ, min_valid, http_timeout, console=None, secret_file=None, refused=None, named=None):
    """The stored tokens, refreshed first when the access token expires within
    `min_valid` seconds or is the `refused` one. A token still valid is read without the
    lock (every write is an atomic rename); a refresh happens under it, after reading
    again, so parallel runs refresh once."""
    def usable(saved):
        return valid_for(saved, min_valid, time.time()) and saved.get("access_token") != refused

    saved = refused_sign_in(load_store(store, environ, console, named), store)
    if not usable(saved):
        with store.locked(http_timeout + LOCK_MARGIN_SECONDS, console):
            saved = refused_sign_in(load_store(store, environ, named=named), store)
            if not usable(saved):
                saved = refresh_saved(saved, environ, http_timeout, store, console, secret_file)
    if not isinstance(saved.get("access_token"), str) or not BEARER_TOKEN.match(saved["access_token"]):
        raise SignInNeeded("The token file {} holds no usable access token.".format(store.path), store)
    return saved


def load_store(store, environ, console=None, named=None):
    """The stored tokens, after the safety checks; SignInNeeded when nothing is stored for
    the backend `named` ((url, what named it); default: GLEAN_BACKEND_URL or GLEAN_SERVER_URL)."""
    saved = store.read(console)
    if saved is None:
        raise SignInNeeded("No tokens are stored at {}.".format(store.path), store)
    backend, named_by = named or named_backend(environ)
    if backend and backend_of(saved) != backend:  # a store that names no backend serves none that is named
        raise SignInNeeded("The tokens at {} are for {}, not for {} {}.".format(
            store.path, one_line(str(backend_of(saved) or "no backend named")), named_by, backend), store)
    return saved


def refused_sign_in(saved, store):
    """`saved`, unless its refresh token was refused: then the whole sign-in is spent
    (servers that detect reuse revoke its access token too), and SignInNeeded, with no
    request sent and no token handed out."""
    if saved.get("refresh_refused_at"):
        raise SignInNeeded("The refresh token at {} was refused at {} ({}): the sign-in is spent.".format(
            store.path, saved["refresh_refused_at"], one_line(saved.get("refresh_refused") or "invalid_grant")), store)
    return saved


def refresh_saved(saved, environ, http_timeout, store, console=None, secret_file=None, again=True):
    """The refresh_token grant with what the store holds (no discovery), under the store's
    lock, the journal around it; the new tokens are saved before they are returned. From
    the grant's sending to its answer's save, a CLI run (`console` given) holds SIGTERM,
    SIGINT and SIGHUP. invalid_grant reads the file again: a token another run rotated
    meanwhile is used (once); else the refusal is recorded, and SignInNeeded."""
    if not saved.get("refresh_token"):
        raise SignInNeeded("The access token at {} has expired and there is no refresh token to renew it "
                           "(ask for offline_access when you sign in).".format(store.path), store)
    client = stored_client(saved, environ, http_timeout, store, secret_file, console)
    if console:
        console.secrets = _longest_first(console.secrets + client.secret_forms())
    check_endpoint(saved["token_endpoint"], "The token file's token_endpoint", saved.get("backend_url") or "")
    with SignalsHeld(console is not None):
        try:
            with store.refreshing():
                response = refresh_tokens(saved["token_endpoint"], client, saved["refresh_token"])
                contents = store_contents(kept_tokens(response, saved), time.time(),
                                          {key: saved.get(key) for key in STORE_FIELDS})
                store.write(contents, client.secret_forms())
        except FlowError as error:
            if error.oauth_error != "invalid_grant":
                raise
            current = store.read()
            if again and current and current.get("refresh_token") not in (None, saved["refresh_token"]):
                return current if valid_for(current, 0, time.time()) else refresh_saved(
                    current, environ, http_timeout, store, console, secret_file, again=False)
            store.write(dict(current or saved, refresh_refused_at=iso_time(time.time()),
                             refresh_refused=excerpt(str(error).encode("utf-8"))), client.secret_forms())
            raise SignInNeeded("The refresh token was refused ({}).".format(error), store)
    return contents


class SignalsHeld:
    """SIGTERM, SIGINT and SIGHUP held (when `active`, in the main thread) while a refresh
    grant is out and its answer unsaved: a helper killed there would lose the rotated
    refresh token. The first one caught is then delivered, as the signal asks."""

    NAMES = ("SIGTERM", "SIGINT", "SIGHUP")

    def __init__(self, active):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.caught, self.previous = [], {}

    def __enter__(self):
        import signal

        for number in [getattr(signal, name) for name in self.NAMES if hasattr(signal, name)] if self.active else []:
            self.previous[number] = signal.signal(number, lambda caught, frame: self.caught.append(caught))
        return self

    def __exit__(self, *exc):
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if self.caught and self.caught[0] == signal.SIGINT:
            raise KeyboardInterrupt
        if self.caught:
            os.kill(os.getpid(), self.caught[0])  # now with its own handler: the default ends the process


def stored_client(saved, environ, http_timeout, store, secret_file=None, console=None):
    """The client the tokens were issued to, with its secret from the environment (it is
    never stored) when its auth method needs one: a usage error when there is none, or
    when CLIENT_ID names another client (its secret is not this client's). With several
    tenants stored, a secret is used only for the one whose client CLIENT_ID names: one
    tenant's secret never goes to another's server."""
    missing = [key for key in ("client_id", "token_endpoint") if not saved.get(key)]
    if missing:
        raise SignInNeeded("The token file lacks what a refresh needs ({}).".format(", ".join(missing)), store)
    auth_method = saved.get("auth_method") or "client_secret_post"
    if auth_method not in CLIENT_AUTH:
        raise store.unusable("it names an unknown auth method {}".format(one_line(auth_method)))
    named = environ.get("CLIENT_ID", "").strip()
    if not unset("CLIENT_ID", named) and named != saved["client_id"]:
        raise FlowError("CLIENT_ID is {}, but the tokens at {} were issued to the client {}: its secret is not "
                        "this one's. Unset CLIENT_ID, or sign in as {} with: {}".format(
                            named, store.path, one_line(saved["client_id"]), named, store.command("login")),
                        EXIT_USAGE)
    secret = "" if auth_method == "none" else read_client_secret(environ, secret_file, console)
    borrowed = store.shared and unset("CLIENT_ID", named)  # several tenants: the environment's may be another's
    if auth_method != "none" and (unset("CLIENT_SECRET", secret) or borrowed):
        kept = kept_secret(store, saved["client_id"], console)[0]  # the tenant's own
        if borrowed and not kept and not unset("CLIENT_SECRET", secret):
            raise FlowError("Tokens for several backends are stored, and the secret in {} is one client's: to use it "
                            "for {}, set CLIENT_ID={} (that backend's client), or keep its secret with: {}".format(
                                secret_source(environ, secret_file), one_line(str(saved.get("backend_url"))),
                                _shell_word(saved["client_id"]), store.command("login --save-secret")),
                            EXIT_USAGE)
        secret = kept
    if auth_method != "none" and unset("CLIENT_SECRET", secret):
        raise FlowError("Set CLIENT_SECRET or CLIENT_SECRET_FILE: the client {} authenticates with {}, and its "
                        "secret was not kept at login (keep it with: {}).".format(
                            one_line(saved["client_id"]), auth_method, store.command("login --save-secret")),
                        EXIT_USAGE)
    return Client(saved["client_id"], secret, auth_method, http_timeout)


def kept_secret(store, client_id, console=None):
    """(the secret `login --save-secret` kept for `store`'s client, where from), or ("", None)."""
    kept = store.secret_store().read(console) or {}
    if kept.get("client_id") != client_id or not all(isinstance(value, str) for value in kept.values()):
        return "", None
    if kept.get("client_secret_file"):
        return read_client_secret({"CLIENT_SECRET_FILE": kept["client_secret_file"]}, None, console), \
            "the file {} (named at login)".format(kept["client_secret_file"])
    return kept.get("client_secret") or "", "{} (kept at login)".format(store.secret_store().path)


def secret_source(environ, flag_path=None):
    """Where client_secret takes the secret from: --client-secret-file, CLIENT_SECRET or CLIENT_SECRET_FILE."""
    return "--client-secret-file" if (flag_path or "").strip() else \
        "CLIENT_SECRET" if environ.get("CLIENT_SECRET", "").strip() else "CLIENT_SECRET_FILE"


def secret_file_named(environ, flag_path=None):
    """The secret file client_secret reads: --client-secret-file, else CLIENT_SECRET_FILE
    when CLIENT_SECRET is unset; "" when the secret does not come from a file."""
    return (flag_path or "").strip() or (
        "" if environ.get("CLIENT_SECRET", "").strip() else environ.get("CLIENT_SECRET_FILE", "").strip())


def read_client_secret(environ, flag_path=None, console=None):
    """The client secret: the first line of --client-secret-file, else CLIENT_SECRET, else
    the first line of CLIENT_SECRET_FILE (Docker's _FILE convention, for cron jobs and
    containers). The file gets the token file's checks, but may also be root's."""
    path = secret_file_named(environ, flag_path)
    if not path:
        return environ.get("CLIENT_SECRET", "").strip()
    path = os.path.abspath(os.path.expanduser(path))
    data = read_private_file(path, "the client secret file", [_uid(), 0], console)
    if data is None:
        raise FlowError("Cannot read the client secret file {}: No such file or directory.".format(path), EXIT_USAGE)
    return data.decode("utf-8", ENV_ERRORS).split("\n", 1)[0].rstrip("\r").strip()


def revoke_token(endpoint, client, value, kind):
    """RFC 7009 §2.1: ask the server to revoke one token, with the client's authentication.
    Returns None when it did, else the reason it refused. A refusal to revoke the refresh
    token raises FlowError (the tokens are kept); the access token's is only reported
    (§2.2.1: servers need not revoke it)."""
    auth_fields, headers = client.authentication()
    fields = [("token", value), ("token_type_hint", kind)] + auth_fields
    answer = http_request(endpoint, *form_body(fields, headers), deadline=client.http_timeout)
    if 200 <= answer.status < 300:
        return None
    redact = client.secret_forms(value)
    if kind == "refresh_token":
        raise FlowError("Revoking the refresh token failed ({}): {}. The tokens were kept; try again.".format(
            answer.status, excerpt(answer.body, redact)))
    code, _ = _oauth_error(answer.body, redact)
    return one_line(code) if code else str(answer.status)


def valid_for(saved, min_valid, now):
    """True when the access token will still be valid in `min_valid` seconds (an expiry
    that cannot be known counts as valid)."""
    expires = expires_at(saved)
    return bool(saved.get("access_token")) and (expires is None or expires - now > min_valid)


def expires_at(saved):
    """When the access token expires by this machine's clock: the store's expires_at
    (counted from receipt), else the JWT's exp, a time of the server's clock, less the
    server's lead when it is known, else None."""
    when = parse_iso_time(saved.get("expires_at"))
    if when is None:
        claims = jwt_claims(saved.get("access_token"))
        exp = claims.get("exp")
        plausible = isinstance(exp, (int, float)) and not isinstance(exp, bool) and 0 <= exp < MAX_TIMESTAMP
        when = exp - stored_offset(saved) if plausible else None
    return when


def stored_offset(saved):
    """The server's clock lead stored with the tokens, in seconds; 0 when unknown, or when
    over a day: a Date that far off is a broken header (a proxy's, say), not a clock."""
    offset = whole_seconds(saved.get("clock_offset_seconds"))
    return offset if offset is not None and abs(offset) <= MAX_CLOCK_CORRECTION else 0


def whole_seconds(value):
    """`value` when it is a whole number (what the store keeps seconds as), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def user_of(saved):
    """Who the tokens belong to: the JWT's email or sub claim, or None."""
    claims = jwt_claims(saved.get("access_token"))
    for claim in ("email", "sub"):
        if isinstance(claims.get(claim), str) and claims[claim]:
            return claims[claim]
    return None


def expiry_text(saved, now, relative_only=False, subject="the access token "):
    """'the access token expires at <ISO> (in 59 min)', or that it expired, or is unknown
    (with `subject` "": 'expires at ...'); `relative_only`: '59 min'."""
    when = expires_at(saved)
    if when is None:
        return "an hour (its expiry is unknown)" if relative_only else \
            "the access token's expiry is unknown" if subject else "expiry unknown"
    minutes = int(abs(when - now) // 60)
    relative = "{} min".format(minutes) if minutes < 120 else "{} h".format(minutes // 60)
    if relative_only:
        return relative
    if when > now:
        return "{}expires at {} (in {})".format(subject, iso_time(when), relative)
    return "{}expired at {} ({} ago)".format(subject, iso_time(when), relative)


def until_text(when, now):
    """'05:17 UTC' today, '2026-12-08 05:17 UTC' on another day."""
    same_day = time.gmtime(when)[:3] == time.gmtime(now)[:3]
    return time.strftime("%H:%M UTC" if same_day else "%Y-%m-%d %H:%M UTC", time.gmtime(when))


def status_of(saved, store, now, environ, default=None):
    """What `status` shows of one tenant, the same fields always (never a token): the
    names `token --format json` uses, booleans for what is there, and where the secret a
    renewal needs would come from here (None: nowhere)."""
    when = expires_at(saved)
    secret = secret_where(saved, store, environ)
    return {
        "token_file": store.path, "backend_url": saved.get("backend_url"), "client_id": saved.get("client_id"),
        "auth_method": saved.get("auth_method"), "user": user_of(saved), "scope": granted_scope(saved),
        "default": bool(default) and backend_of(saved) == default,
        "expires_at": iso_time(when) if when is not None else None,
        "expires_in": int(when - now) if when is not None else None,
        "access_token_valid": valid_for(saved, 0, now) and not saved.get("refresh_refused_at"),
        "refresh_token": bool(saved.get("refresh_token")),
        "renewable": bool(saved.get("refresh_token")) and not saved.get("refresh_refused_at") and secret is not None,
        "secret": secret, "refresh_refused_at": saved.get("refresh_refused_at"),
        "refresh_refused": saved.get("refresh_refused"), "refresh_interrupted": store.interrupted_refresh(),
        "clock_offset_seconds": whole_seconds(saved.get("clock_offset_seconds")),
    }


def info_expiry(info):
    """'expires at <ISO> (in 59 min)' of a status_of entry, or 'expiry unknown'."""
    return expiry_text({"expires_at": info["expires_at"]}, time.time(), subject="")


def secret_where(saved, store, environ, flag_path=None):
    """Where a renewal of `saved` here would take the client secret from; "not needed" for
    a public client; None when it has none."""
    if saved.get("auth_method") == "none":
        return "not needed"
    try:
        client = stored_client(saved, environ, HTTP_TIMEOUT_SECONDS, store, flag_path)
    except FlowError:
        return None
    if client.client_secret == read_client_secret(environ, flag_path):
        return secret_source(environ, flag_path)
    return kept_secret(store, saved.get("client_id"))[1]


# --- Diagnosis: doctor, inspect, --verify and the clock -----------------------------------


MAX_JWKS_BYTES = 1024 * 1024  # a JWK Set holds a few keys: a few kilobytes
MAX_CLOCK_CORRECTION = 24 * 3600  # a server's Date further off than this is not believed
CLOCK_WARN_SECONDS, CLOCK_FAIL_SECONDS = 60, 300  # a clock that far off breaks exp and nbf checks
DOCTOR_CHECKS = ("python", "client_id", "client_secret", "backend_url", "metadata", "issuer", "pkce", "auth_method",
                 "redirect_uri", "proxy", "tls", "clock", "token_store", "scopes", "access_token", "refresh_token",
                 "signature")  # doctor's order; new ones go at the end, never between
# What a check needs that an earlier one finds: without it, the check is skipped (no warn,
# no fix of its own) and names the check to fix instead.
DOCTOR_NEEDS = {"metadata": ["backend_url"], "issuer": ["metadata"], "pkce": ["metadata"], "auth_method": ["metadata"],
                "proxy": ["backend_url"], "tls": ["backend_url"], "scopes": ["token_store"],
                "access_token": ["token_store"], "refresh_token": ["token_store"], "signature": ["access_token"],
                "reachable": ["backend_url"], "client_auth": ["metadata", "client_id", "client_secret"],
                "registration": ["metadata", "client_id"], "token_use": ["backend_url", "access_token"]}
PROBE_CHECKS = ("reachable", "client_auth", "registration", "token_use")  # doctor --probe's, after the others
PROBE_SURFACES = {  # scope -> (path, body): token_use's one cheap request, none that starts a chat
    "search": ("/rest/api/v1/search", {"query": "glean", "pageSize": 1}),
    "mcp": ("/mcp/{}", {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "glean_oauth.py doctor",
                                                                            "version": __version__}}}),
}
SKIPPED = "not checked: needs the {} check"
# The fix for a check that failed with a FlowError of the flow's own (its message says what is wrong).
DOCTOR_FIXES = {
    "backend_url": "Set GLEAN_BACKEND_URL to your backend's origin: the \"Server instance (QE)\" on Glean's About "
                   "page, usually https://<name>-be.glean.com.",
    "client_secret": "Make the secret file readable by you alone (chmod 600), or set CLIENT_SECRET.",
    "redirect_uri": "Set REDIRECT_URI to the loopback redirect URI registered on your client.",
    "proxy": "Set HTTPS_PROXY to http://HOST:PORT, or unset it.",
    "tls": "Point SSL_CERT_FILE at a PEM CA bundle, or unset it.",
}


def clock_offset(headers, received_at):
    """Whole seconds the server's clock is ahead of this one's (negative: behind), from an
    answer's Date header (RFC 9110 §6.6.1) received at `received_at`; None without one."""
    import email.utils  # http.client has imported it already

    value = headers.get("Date") if headers is not None else None
    try:
        parsed = email.utils.parsedate_tz(value) if isinstance(value, str) else None
        return None if parsed is None else int(round(email.utils.mktime_tz(parsed) - received_at))
    except (TypeError, ValueError, OverflowError):
        return None


def clock_text(offset):
    """'this machine's clock is 600 s behind the server's', or None within a second."""
    if not offset:
        return None
    return "this machine's clock is {} s {} the server's".format(abs(offset), "behind" if offset > 0 else "ahead of")


class SignatureCheck:
    """The Signature: line for a token, its keys loaded by `load_keys()` (which returns
    `(jwks, where from)`, or `(None, why there is none)`) only when the token's alg calls
    for a key. A failure to load them is reported in the line, and exits 1."""

    def __init__(self, load_keys):
        self.load_keys = load_keys
        self.verdict, self.exit_code = None, EXIT_OK

    def __call__(self, token):
        def keys():
            try:
                return self.load_keys()
            except FlowError as error:
                self.exit_code = EXIT_FAILURE
                return None, "its keys could not be fetched: " + str(error).rstrip(".")

        self.verdict = check_signature(token, keys)
        self.exit_code = max(self.exit_code, Verdict.EXIT_CODES[self.verdict.status])
        return self.verdict.line

    @classmethod
    def of_metadata(cls, metadata, backend_url, http_timeout):
        """The check with the keys at the metadata's jwks_uri."""
        return cls(lambda: metadata_keys(metadata, backend_url, http_timeout))


def metadata_keys(metadata, backend_url, http_timeout):
    """(jwks, url) from the metadata's jwks_uri, or (None, why not)."""
    url = (metadata or {}).get("jwks_uri")
    if not url:
        return None, "the metadata has no jwks_uri, and no --jwks was given"
    check_endpoint(url, "The metadata's jwks_uri", backend_url)
    return fetch_jwks(url, http_timeout), url


def fetch_jwks(url, http_timeout):
    """The JWK Set at `url`, over the kept connection, at most MAX_JWKS_BYTES."""
    check_transport(url, "The JWKS URL")
    return fetch_json(url, http_timeout, limit=MAX_JWKS_BYTES)


def jwks_file(path):
    """The JWK Set (or lone JWK) in the file at `path`; FlowError (exit 2) when it is none."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    except OSError as error:
        raise FlowError("Cannot read the JWKS file {}: {}.".format(path, _why(error)), EXIT_USAGE)
    try:
        value = parse_json(data.decode("utf-8")) if len(data) <= MAX_JWKS_BYTES else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise FlowError("The JWKS file {} is not a JSON object of at most {} bytes (a JWK Set, RFC 7517 §5).".format(
            path, MAX_JWKS_BYTES), EXIT_USAGE)
    return value


def inspect_command(argv, environ, console, stdin):
    """`inspect`: the access token's header and claims as step 9 prints them, then one
    Signature: line, then its iss, exp and nbf against the issuer and the clock. The token
    comes from the token store, or from stdin (`inspect -`): never from an argument,
    which ps and shell history would show. Exit 1 only when the signature is INVALID or
    its keys could not be fetched."""
    args = parse_args("inspect", argv)
    if args.token not in (None, "-"):
        raise FlowError("inspect takes a token on standard input (inspect -), never as an argument: ps and shell "
                        "history would show it.", EXIT_USAGE)
    local_keys = jwks_file(args.jwks) if args.jwks and not re.match(r"(?i)https?://", args.jwks) else None
    saved = {}
    if args.token == "-":
        try:
            token = stdin.read(MAX_JWKS_BYTES + 1).strip()
        except UnicodeDecodeError:  # no token is: base64url is ASCII
            raise FlowError("The input on standard input is not text, so no token.", EXIT_USAGE)
        if len(token) > MAX_JWKS_BYTES:
            raise FlowError("The token on standard input is over {} characters; no token is.".format(MAX_JWKS_BYTES),
                            EXIT_USAGE)
        if not token:
            raise FlowError("No token on standard input: pipe one in, e.g. ... token | glean_oauth.py inspect -",
                            EXIT_USAGE)
    else:
        store, named = tenant_store(args.token_file, environ, args.backend_url)
        saved = load_store(store, environ, console, named)
        token = saved.get("access_token") if isinstance(saved.get("access_token"), str) else ""
    backend = named_backend(environ, args.backend_url)[0] or saved.get("backend_url") or ""
    found = {"issuer": saved.get("issuer")}
    check = SignatureCheck(lambda: (local_keys, args.jwks) if local_keys else inspect_keys(args, backend, found,
                                                                                           console, environ))
    header, claims = print_jwt(token, console, check)
    if header is None:
        check(token)
        console.line(check.verdict.line)
    for line in claim_checks(claims or {}, found.get("issuer"), stored_offset(saved), time.time()):
        console.line(line)
    return check.exit_code


def inspect_keys(args, backend, found, console, environ):
    """inspect's keys from --jwks URL, else the jwks_uri of the backend's metadata. The
    metadata's issuer goes into `found`."""
    if args.jwks:
        return fetch_jwks(args.jwks, http_timeout_setting(args, environ)), args.jwks
    if not backend:
        return None, "no --jwks, and no backend to find the jwks_uri of: set GLEAN_BACKEND_URL or give --jwks"
    backend = backend_origin(backend)
    settings = Settings(backend_url=backend, http_timeout=http_timeout_setting(args, environ))
    metadata = discover_metadata(settings, console)
    found["issuer"] = metadata.get("issuer") if isinstance(metadata.get("issuer"), str) else found["issuer"]
    return metadata_keys(metadata, backend, settings.http_timeout)


def claim_checks(claims, issuer, offset, now):
    """Lines on the token's iss (against the metadata's issuer, when known), exp and nbf
    (server times: against this clock plus `offset`, the server's lead in seconds, 0 when unknown).
    Reported only: they never change the exit code."""
    lines = []
    iss = claims.get("iss")
    if issuer and iss is not None:
        lines.append("Issuer: " + ("matches the metadata's issuer" if iss == issuer else "{} is not the metadata's "
                                   "issuer {}".format(one_line(json.dumps(iss)), one_line(issuer))))
    by_server = " by the server's clock: {}".format(clock_text(offset)) if offset else ""
    for claim, label, before, after in (("exp", "Expires", "valid", "expired"), ("nbf", "Not before", "not yet valid",
                                                                                "in effect")):
        value = claims.get(claim)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < MAX_TIMESTAMP:
            minutes = int(round(abs(value - now - offset) / 60))
            relative = "in {} min".format(minutes) if value > now + offset else "{} min ago".format(minutes)
            lines.append("{}: {} ({}, {}{})".format(label, iso_time(value), before if value > now + offset else after,
                                                   relative, by_server))
    return lines


def doctor_command(argv, environ, console, stdin):
    """`doctor`: every check of DOCTOR_CHECKS that can be made (and with --probe, of
    PROBE_CHECKS), each ok, warn or fail with one line and a fix, as a block to paste into
    a support ticket. Never signs in, never refreshes (but --probe, once, after a 401),
    never shows a token, a code or the secret. Exit 1 when a check failed."""
    args = parse_args("doctor", argv)
    doctor = Doctor(args, environ, console)
    about = doctor.about()  # the time the checks started, for the ticket
    checks = [doctor.check(name) for name in DOCTOR_CHECKS + (PROBE_CHECKS if args.probe else ())]
    if args.json:
        console.result(dict(about, checks=checks))
    else:
        console.line("glean_oauth.py doctor: paste this block into a support ticket as it is; it holds no token "
                     "and no secret.")
        for label, key in (("Version", "version"), ("Python", "python"), ("OS", "os"), ("Time", "time")):
            console.line("{:<9} {}".format(label + ":", about[key]))
        console.line()
        for check in checks:
            console.line("{:<5} {:<14} {}".format(check["status"], check["check"], check["detail"]))
            if check["fix"]:
                console.line("{:<20} fix: {}".format("", check["fix"]))
        counts = [sum(check["status"] == status for check in checks) for status in ("ok", "warn", "fail", "skip")]
        console.line("\n{} checks: {} ok, {} warn, {} fail, {} skipped".format(len(checks), *counts))
    return EXIT_FAILURE if any(check["status"] == "fail" for check in checks) else EXIT_OK


class Doctor:
    """doctor's checks, one method each (`_<check>`), returning (status, detail, fix).
    What one finds (the settings, the metadata, the store) serves the ones after it."""

    def __init__(self, args, environ, console):
        self.args, self.environ, self.console = args, environ, console
        self.http_timeout = http_timeout_setting(args, environ)
        try:
            self.named, self.named_problem = named_backend(environ, args.backend_url), None
        except FlowError as error:  # two variables naming two backends: the backend_url check says so
            self.named, self.named_problem = ("", None), error
        self.backend = ""  # once the backend_url check has found it usable
        self.metadata, self.offset, self.failure = None, None, None  # failure: the metadata request's FlowError
        self._stored = self._client = None

    def check(self, name):
        """One check as doctor prints it: {"check", "status", "detail", "fix"}."""
        missing = [need for need in DOCTOR_NEEDS.get(name, []) if not self.found(need)]
        try:
            status, detail, fix = ("skip", SKIPPED.format(missing[0]), "") if missing \
                else getattr(self, "_" + name)()
        except FlowError as error:
            status, detail, fix = "fail", str(error), DOCTOR_FIXES.get(name, "Fix what it says, then run doctor again.")
        except Exception as error:  # a bug in one check must not cost the others
            status, detail, fix = "fail", "the check itself failed: {}: {}".format(type(error).__name__, error), \
                "A bug in glean_oauth.py: please report it, with this block."
        return {"check": name, "status": status, "detail": one_line(detail), "fix": one_line(fix)}

    def about(self):
        import platform

        return {"version": "glean_oauth.py " + __version__,
                "python": "{} {}".format(platform.python_implementation(), platform.python_version()),
                "os": "{} {} ({})".format(platform.system(), platform.release(), platform.machine()),
                "time": iso_time(time.time())}

    def found(self, need):
        """Whether an earlier check found what `need` (in DOCTOR_NEEDS) names."""
        saved, client = self.saved(), self.client()
        return {"backend_url": bool(self.backend), "metadata": self.metadata is not None, "token_store": bool(saved),
                "access_token": isinstance(saved.get("access_token"), str) and bool(saved["access_token"]),
                "client_id": not unset("CLIENT_ID", client.client_id),
                "client_secret": client.auth_method == "none" or not unset("CLIENT_SECRET", client.client_secret)}[need]

    def client(self):
        """The client as a sign-in here would authenticate it, read once: CLIENT_ID (else the
        stored one) and the secret from CLIENT_SECRET, its file or, failing those, the one
        kept at login."""
        if self._client is None:
            client_id = _setting(self.args.client_id, self.environ, "CLIENT_ID")
            client_id = self.saved().get("client_id") or "" if unset("CLIENT_ID", client_id) else client_id
            try:
                secret = read_client_secret(self.environ, self.args.client_secret_file)
                if unset("CLIENT_SECRET", secret) and self.saved():
                    secret = kept_secret(self.stored()[0], client_id)[0]
            except FlowError:  # the client_secret check says why
                secret = ""
            self._client = Client(client_id, secret, self.auth_method(), self.http_timeout)
        return self._client

    def redirect_uri(self):
        return _setting(self.args.redirect_uri, self.environ, "REDIRECT_URI", DEFAULT_REDIRECT_URI)

    def stored(self):
        """(store, saved or None, the problem reading it or None), read once."""
        if self._stored is None:
            store, saved, problem = None, None, None
            try:
                store = open_store(self.args.token_file, self.environ).select(*self.named)
                saved = store.read()
            except FlowError as error:
                problem = str(error)
            self._stored = (store, saved, problem)
        return self._stored

    def saved(self):
        return self.stored()[1] or {}

    def _python(self):
        return "ok", self.about()["python"] + " (3.6 or newer is needed)", ""

    def _client_id(self):
        value = _setting(self.args.client_id, self.environ, "CLIENT_ID")
        stored = self.saved().get("client_id")
        if unset("CLIENT_ID", value):
            if stored:
                return "ok", "{} (from the token store)".format(stored), ""
            return "fail", "not set", "Set CLIENT_ID to your static OAuth client's id, or give --client-id."
        where = "--client-id" if self.args.client_id else "CLIENT_ID"
        if stored and stored != value:
            return "warn", "{} ({}), but the stored tokens were issued to {}".format(value, where, stored), \
                "Unset CLIENT_ID, or sign in as {} with: {}".format(value, self.stored()[0].command("login"))
        return "ok", "{} ({})".format(value, where), ""

    def _client_secret(self):
        secret = read_client_secret(self.environ, self.args.client_secret_file)
        if self.auth_method() == "none":
            return "ok", "not needed: the auth method is none", ""
        if unset("CLIENT_SECRET", secret):
            return "warn", "not set: login, a refresh and logout need it", \
                "Set CLIENT_SECRET, or CLIENT_SECRET_FILE to a file only you can read."
        return "ok", "set ({}; never shown)".format(secret_source(self.environ, self.args.client_secret_file)), ""

    def _backend_url(self):
        if self.named_problem:
            raise self.named_problem
        backend, named_by = self.named
        if not backend:
            backend, named_by = self.saved().get("backend_url") or "", "from the token store"
        if not backend:
            return "fail", "not set", "Set GLEAN_BACKEND_URL to your Glean backend, e.g. https://acme-be.glean.com."
        self.backend = backend_origin(backend, "The token store's backend_url")
        return "ok", "{} ({})".format(backend, named_by), ""

    def _metadata(self):
        url, hint = self.backend + METADATA_PATH, be_host_hint(self.backend)
        try:  # the flow's own discovery, with its fallback to the path form
            metadata = discover_metadata(Settings(backend_url=self.backend, http_timeout=self.http_timeout), None)
        except FlowError as error:
            self.read_clock(getattr(error, "headers", None))
            if error.status == 404:
                return "fail", "{} and {} both answered 404: the tenant's OAuth authorization server may be turned " \
                    "off".format(url, url + ISSUER_PATH), (hint.strip() + " Else ask" if hint else "Ask") + \
                    " a Glean admin whether OAuth is enabled for this tenant, and check GLEAN_BACKEND_URL."
            self.failure = error
            return "fail", str(error), self.unreachable_fix(error) if error.status is None else \
                "Check GLEAN_BACKEND_URL: it must be the backend (…-be.glean.com), not the web app." + hint
        self.read_clock(metadata.headers)
        served = metadata.url
        for key in ENDPOINTS:
            if key in metadata or key != "revocation_endpoint":
                check_endpoint(metadata.get(key), "The metadata's " + key, self.backend)
        self.metadata = metadata
        return "ok", "served by {}{}".format(served, "" if served == url else " (the RFC 8414 path form; "
                                             "the root one answered 404)"), ""

    def unreachable_fix(self, error):
        """What to do when the metadata request got no answer, by what stopped it."""
        import socket

        source, cause = self.named[1] or "GLEAN_BACKEND_URL", error.__context__
        if "(HTTPS_PROXY)" in str(error):
            fix = "Check HTTPS_PROXY and NO_PROXY: the proxy must be reachable and let the backend through."
        elif "TLS certificate" in str(error):
            fix = "Behind a corporate proxy or CA, set SSL_CERT_FILE to its CA bundle (PEM)."
        elif isinstance(cause, socket.gaierror):
            fix = "The host name does not resolve: check the host in {}.".format(source)
        elif isinstance(cause, ConnectionRefusedError):
            fix = "Nothing answers there: check the host and port in {}, and that the backend is up.".format(source)
        else:
            fix = "Check {} and the network (GLEAN_HTTP_TIMEOUT sets how long to wait).".format(source)
        return fix + be_host_hint(self.backend)

    def read_clock(self, headers):
        """The server's clock, from an answer's Date."""
        offset = clock_offset(headers, time.time())
        self.offset = offset if offset is not None else self.offset

    def auth_method(self):
        return self.args.auth_method or self.saved().get("auth_method") or "client_secret_post"

    def _issuer(self):
        issuer, glean_shape = self.metadata.get("issuer"), self.backend + ISSUER_PATH
        if not isinstance(issuer, str) or not issuer:
            return "warn", "the metadata names no issuer (RFC 8414 §2 requires one)", "Ask Glean support."
        if issuer != glean_shape:
            return "warn", "{}: not {}, the shape of Glean's issuer".format(issuer, glean_shape), \
                "Check that GLEAN_BACKEND_URL is your tenant's backend."
        return "ok", "{} (Glean's {{backend}}/oauth)".format(issuer), ""

    def _pkce(self):
        return self.listed("code_challenge_methods_supported", "S256", "PKCE S256",
                           "This flow needs S256: ask a Glean admin or Glean support.")

    def _auth_method(self):
        offered = (self.metadata or {}).get("token_endpoint_auth_methods_supported")
        fix = "Choose one it offers with --auth-method ({}).".format(
            ", ".join(map(str, offered)) if isinstance(offered, list) else "")
        return self.listed("token_endpoint_auth_methods_supported", self.auth_method(),
                           "auth method " + self.auth_method(), fix)

    def listed(self, key, value, what, fix):
        """Whether the metadata's list `key` names `value`."""
        values = self.metadata.get(key)
        if values is None:
            return "warn", "the metadata has no {}: {} is not known to be supported".format(key, what), \
                "Nothing, if sign-in works; else ask Glean support."
        if not isinstance(values, list) or value not in values:
            return "fail", "{} is not in the metadata's {} ({})".format(what, key, one_line(json.dumps(values))), fix
        return "ok", "{} advertised".format(what), ""

    def _redirect_uri(self):
        uri = self.redirect_uri()
        check_redirect_uri(uri)
        parts = urllib.parse.urlsplit(uri)
        port = 80 if parts.port is None else parts.port
        if port == 0:
            return "ok", "{} (port 0: any free port, as registered loopback URIs allow)".format(uri), ""
        try:
            CallbackListener(uri).close()  # bound as the sign-in binds it, and let go
        except FlowError as error:
            return "fail", "{}: {}".format(uri, str(error).split(". ")[0]), "Stop what holds port {} (another " \
                "sign-in?), or register another loopback redirect URI on the client and set REDIRECT_URI to " \
                "it.".format(port)
        return "ok", "{} (loopback; port {} is free now)".format(uri, port), ""

    def _proxy(self):
        parts = urllib.parse.urlsplit(self.backend)
        proxy = _proxy_for(parts.scheme, parts.hostname)
        if proxy:
            return "ok", "{}:{} (HTTPS_PROXY), tunnelled with CONNECT".format(_bracketed(proxy.hostname),
                                                                            proxy.port or 80), ""
        if parts.scheme != "https" or is_loopback(parts.hostname):
            why = "the backend is on this machine"
        elif any(name.lower() == "https_proxy" and value.strip() for name, value in os.environ.items()):
            why = "NO_PROXY exempts {}".format(parts.hostname)
        else:
            why = "HTTPS_PROXY is not set"
        return "ok", "none: {}".format(why), ""

    def _tls(self):
        if not self.backend.startswith("https://"):
            return "ok", "not used: the backend is plain http on this machine", ""
        import ssl

        _tls_context()  # a SSL_CERT_FILE that cannot be used fails here
        paths = ssl.get_default_verify_paths()
        source = next(("{} {}".format(name, os.environ[name]) for name in ("SSL_CERT_FILE", "SSL_CERT_DIR")
                       if os.environ.get(name)), None) or "the system's ({})".format(
                           paths.cafile or paths.capath or "OpenSSL's default store")
        source += ", " + ssl.OPENSSL_VERSION
        if self.metadata is not None:
            return "ok", "the backend's certificate verified; trusted CAs from {}".format(source), ""
        if self.failure and "TLS certificate" in str(self.failure):
            return "fail", "the backend's certificate is not trusted; trusted CAs from {}".format(source), \
                "Behind a corporate proxy or CA, set SSL_CERT_FILE to its CA bundle (PEM)."
        return "skip", SKIPPED.format("metadata") + "; trusted CAs from " + source, ""

    def _clock(self):
        if self.offset is None:  # no answer with a Date
            return "skip", SKIPPED.format("metadata"), ""
        if abs(self.offset) <= CLOCK_WARN_SECONDS:
            return "ok", "within {} s of the server's (its Date header)".format(abs(self.offset)), ""
        fix = "Set this machine's clock right (turn on NTP): tokens' exp and nbf are the server's times."
        return ("fail" if abs(self.offset) > CLOCK_FAIL_SECONDS else "warn"), clock_text(self.offset), fix

    def _token_store(self):
        store, saved, problem = self.stored()
        if problem:
            return "fail", problem, "Fix what it says, or start over: logout --local, then login."
        if saved is None:
            return "warn", "no tokens at {} yet".format(store.path), "Sign in with: " + store.command("login")
        info = os.stat(store.path)
        owner = info.st_uid
        if os.name == "posix":
            import pwd

            try:
                owner = pwd.getpwuid(info.st_uid).pw_name
            except KeyError:
                pass
        detail = "{} (owner {}, mode {:o}, for {})".format(store.path, owner, info.st_mode & 0o777,
                                                           one_line(str(saved.get("backend_url"))))
        interrupted = store.interrupted_refresh()
        if interrupted:
            return "warn", "{}: a refresh was interrupted after it was sent ({})".format(detail, interrupted), \
                "Run {}: it says whether the refresh token still works.".format(store.command("token"))
        if os.name == "posix" and info.st_mode & 0o044:
            return "warn", detail + ": other users can read it", "Run chmod 600 " + _shell_word(store.path)
        if self.backend and backend_of(saved) != self.backend:
            return "warn", detail + ": not for " + self.backend, "Sign in there with: " + store.command("login")
        return "ok", detail, ""

    def _scopes(self):
        saved = self.saved()
        granted, requested = granted_scope(saved), saved.get("requested_scope") or ""
        have = set((granted or "").lower().split())
        detail = "granted: {}; requested: {}".format(granted or "(not said)", requested or "(none named)")
        if granted is None:
            return "warn", detail, "Nothing to do if the Chat API answers; the server did not say what it granted."
        detail += " (chat: {}, offline_access: {})".format(*("yes" if scope in have else "no"
                                                            for scope in ("chat", "offline_access")))
        # No offline_access but a refresh token all the same: nothing is missing that matters.
        renewable = saved.get("refresh_token") and "offline_access" not in have
        missing = [scope for scope in requested.split() if scope.lower() not in have
                   and not (renewable and scope.lower() == "offline_access")]
        detail += "; not granted: " + " ".join(missing) if missing else ""
        detail += "; a refresh token was issued anyway" if renewable else ""
        if missing or "chat" not in have:
            return "warn", detail, "Give the static client these scopes in Glean's admin console, then sign in " \
                "again with: " + self.stored()[0].command("login --force")
        if "offline_access" not in have and not saved.get("refresh_token"):
            return "warn", detail, "Sign in asking for offline_access: " + self.stored()[0].command(
                'login --force --scope "{}"'.format(" ".join(_scope_union(requested.split() + ["offline_access"]))))
        return "ok", detail, ""

    def _access_token(self):
        saved, store = self.saved(), self.stored()[0]
        if not saved.get("access_token"):
            return "fail", "the store holds no access token", "Sign in again with: " + store.command("login --force")
        if saved.get("refresh_refused_at"):
            return "fail", "spent: its refresh token was refused", "Sign in again with: " + store.command("login")
        now, when = time.time(), expires_at(saved)
        said = expiry_text(saved, now, subject="")
        if when is None:
            return "warn", "its expiry is unknown (no expires_in, not a JWT with exp)", "Nothing, if it works."
        if when > now:
            return "ok", said, ""
        if saved.get("refresh_token"):
            return "warn", said + "; the refresh token can renew it", \
                "Nothing: token, exec and TokenProvider refresh it when they need it."
        return "fail", said + ", and there is no refresh token", "Sign in again with: " + store.command("login")

    def _refresh_token(self):
        saved = self.saved()
        if saved.get("refresh_refused_at"):
            return "fail", "refused at {} ({}): the sign-in is spent".format(saved["refresh_refused_at"], one_line(
                saved.get("refresh_refused") or "")), "Sign in again with: " + self.stored()[0].command("login")
        if saved.get("refresh_token"):
            where = secret_where(saved, self.stored()[0], self.environ, self.args.client_secret_file)
            if where is None:
                return "warn", "present (never shown), but no client secret here to renew with", \
                    "Set CLIENT_SECRET or CLIENT_SECRET_FILE, or keep it with: " + self.stored()[0].command(
                        "login --save-secret")
            return "ok", "present (never shown); renews with the secret from " + where, ""
        return "warn", "none: the access token cannot be renewed", OFFLINE_ACCESS_HINT

    def _signature(self):
        check = SignatureCheck(lambda: metadata_keys(self.metadata, self.backend, self.http_timeout)
                               if self.metadata else (None, SKIPPED.format("metadata")))
        check(self.saved()["access_token"])
        if check.verdict.detail == SKIPPED.format("metadata"):
            return "skip", check.verdict.detail, ""
        status = {"valid": "ok", "INVALID": "fail"}.get(check.verdict.status, "warn")
        fixes = {"ok": "", "fail": "The token is not signed by a key its issuer publishes: sign in again, and "
                                   "check GLEAN_BACKEND_URL.", "warn": "Nothing, if the Chat API takes the token."}
        return status, check.verdict.line.replace("Signature: ", "", 1), fixes[status]


    # --- doctor --probe: what only the server can tell, asked without a sign-in

    def _reachable(self):
        url = self.backend + "/liveness_check"
        try:
            status = http_request(url, deadline=self.http_timeout).status
        except FlowError as error:
            return "fail", str(error), self.unreachable_fix(error)
        if 200 <= status < 300:
            return "ok", "{} answered {}".format(url, status), ""
        return "warn", "{} answered {}".format(url, status), "Nothing, if the metadata check is ok: not every " \
            "backend serves it."

    def _client_auth(self):
        """The token endpoint, asked to trade a code that cannot exist, authenticated as a
        real exchange is: invalid_grant means the client's id and secret were accepted."""
        client, (state, verifier, _) = self.client(), make_pkce()
        code = "glean-oauth-doctor-probe-not-a-code-" + state[:16]
        try:
            exchange_code(self.metadata["token_endpoint"], client, code, verifier, self.redirect_uri())
        except FlowError as error:
            if error.oauth_error == "invalid_grant":
                return "ok", "client id and secret accepted ({}; the made-up code was refused, as it must be)".format(
                    client.auth_method), ""
            if error.oauth_error != "invalid_client" and error.status != 401:
                return "warn", str(error), "Nothing, if sign-in works; else report this to Glean support."
            return "fail", "the server does not accept this client id and secret: {}".format(error), \
                "A rotated secret is the usual cause: set CLIENT_SECRET to the client's current secret, and check " \
                "that CLIENT_ID {} is the static client's id (auth method {}).".format(client.client_id,
                                                                                    client.auth_method)
        return "warn", "the token endpoint took a code that cannot exist", "Report this to Glean support."

    def _registration(self):
        """The authorization request a sign-in makes, never followed: a redirect elsewhere
        than the redirect URI (to sign in) means the client and its redirect URI are known."""
        client, uri, (state, _, challenge) = self.client(), self.redirect_uri(), make_pkce()
        scope = " ".join(_setting(self.args.scope, self.environ, "GLEAN_SCOPES").split()) or \
            self.saved().get("requested_scope") or ""
        url = build_authorization_url(self.metadata["authorization_endpoint"], client.client_id, uri, state, challenge,
                                      scope)
        try:
            answer = http_request(url, deadline=self.http_timeout)
        except FlowError as error:
            if error.headers is None:
                raise
            answer, location = None, urllib.parse.urlsplit(error.headers.get("Location") or "")
            said = urllib.parse.parse_qs(location.query)
            if location[:3] != urllib.parse.urlsplit(uri)[:3] or "error" not in said:
                return "ok", "the server knows the client {} and its redirect URI {} (it sends the browser to " \
                    "sign in)".format(client.client_id, uri), ""
            code = said.get("error", [""])[0]
            refusal = one_line(code + ": " + said.get("error_description", [""])[0]).rstrip(": ")
        if answer is not None and 200 <= answer.status < 300:
            return "ok", "the server answered the authorization request with a page ({})".format(answer.status), ""
        if answer is not None:
            code, refusal = _oauth_error(answer.body)
            refusal = refusal or "{}: {}".format(answer.status, excerpt(answer.body))
        fix = {"invalid_redirect_uri": "Register {} on the client exactly, or set REDIRECT_URI to a redirect URI "
                                       "registered there.".format(uri),
               "invalid_client": "Check CLIENT_ID: the server does not know the client {} (deleted, or another "
                                 "tenant's?).".format(client.client_id),
               "invalid_scope": "Ask only for scopes the client has: check --scope or GLEAN_SCOPES ({}).{}".format(
                   scope or "none", scope_refusal_hint(FlowError("", oauth_error=code), scope, self.metadata))}
        return "fail", "the server refused the authorization request ({})".format(refusal), fix.get(
            code, "Check CLIENT_ID and REDIRECT_URI against the client's registration in Glean's admin console.")

    def _token_use(self):
        """One request per surface the stored token's scopes cover (search, mcp), and none
        that starts a chat; after a 401, one refresh (under the lock) and one retry."""
        store, saved = self.stored()[:2]
        if not valid_for(saved, 0, time.time()):
            return "skip", SKIPPED.format("access_token") + " (it has expired)", ""
        granted = (granted_scope(saved) or "").lower().split()
        surfaces = [scope for scope in PROBE_SURFACES if scope in granted or scope == "mcp" and self.args.mcp_server]
        if not surfaces:
            return "skip", "nothing to try: the token has neither search nor mcp (chat is never tried: it would " \
                "start a chat; --mcp-server tries MCP)", ""
        token, refreshed, outcomes = saved["access_token"], False, []
        for scope in surfaces:
            path, body = PROBE_SURFACES[scope]
            url = self.backend + path.format(self.args.mcp_server or "default")
            while True:
                answer = http_request(url, json.dumps(body).encode("utf-8"), {
                    "Authorization": "Bearer " + token, "Content-Type": "application/json",
                    "Accept": "application/json, text/event-stream"}, deadline=self.http_timeout)
                if answer.status != 401 or refreshed or not saved.get("refresh_token"):
                    break
                refreshed, token = True, fresh_tokens(store, self.environ, 0, self.http_timeout, refused=token,
                                                      named=self.named)["access_token"]
            outcomes.append(self.used(scope, url, answer, saved, refreshed, token))
        worst = max(outcomes, key=lambda outcome: ("ok", "warn", "fail").index(outcome[0]))
        return worst[0], "; ".join(outcome[1] for outcome in outcomes), worst[2]

    def used(self, scope, url, answer, saved, refreshed, token):
        """(status, detail, fix) of one surface's answer, by Glean's meanings of its statuses."""
        said = "{} answered {}".format(url, answer.status)
        if 200 <= answer.status < 300:
            return "ok", said + " (the token works there)", ""
        sign_in = self.stored()[0].command('login --force --scope "{}"'.format(" ".join(_scope_union(
            (saved.get("requested_scope") or "").split() + [scope, "offline_access"]))))
        if answer.status == 401:
            return "fail", said + ": the token was refused" + (" after a refresh" if refreshed else ""), \
                "Sign in again with: " + sign_in
        if answer.status == 403:
            granted = granted_scope(saved)
            lacks = "the {} scope".format(scope) if granted and scope not in granted.lower().split() else "a scope"
            return "fail", said + ": the token lacks {} or a policy blocks it (granted: {})".format(
                lacks, granted or "not said"), "Sign in asking for {}: {}".format(scope, sign_in)
        if answer.status == 404:
            return "fail", said + ": not enabled on this tenant", "Ask a Glean admin to enable it" + (
                ", and check the server name (--mcp-server)." if scope == "mcp" else ".")
        return "warn", "{}: {}".format(said, excerpt(answer.body, credential_forms(token))), \
            "Nothing, if your tool works with the token; else report this to Glean support."


# --- Signatures: JWS checked in pure Python (inspect, doctor, --verify) -------------------


# A diagnostic, never a gate: RFC 9068 §6 has clients treat access tokens as opaque, so
# nothing here decides whether `token` hands one out. It answers an admin's question: is
# this token really from my tenant's issuer, and signed with which key?
JWS_ALGORITHMS = {  # RFC 7518 §3.1: alg -> (key type, hash, padding or curve)
    "RS256": ("RSA", "sha256", "PKCS1"), "RS384": ("RSA", "sha384", "PKCS1"), "RS512": ("RSA", "sha512", "PKCS1"),
    "PS256": ("RSA", "sha256", "PSS"), "PS384": ("RSA", "sha384", "PSS"), "PS512": ("RSA", "sha512", "PSS"),
    "ES256": ("EC", "sha256", "P-256"), "ES384": ("EC", "sha384", "P-384"), "ES512": ("EC", "sha512", "P-521"),
}
# RFC 8017 §9.2 note 1: DigestInfo's DER up to the hash value itself.
DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
MIN_RSA_BITS = 2048  # RFC 7518 §3.3 and §3.5: a smaller key must not be used
MAX_RSA_BITS = 16384  # beyond any real key; a JWKS's huge n or e would make one check take minutes
MAX_RSA_EXPONENT = 2 ** 32  # e is 65537 in practice; Go's crypto/rsa refuses more than 2^31 - 1
MAX_JWKS_KEYS = 50  # a JWK Set holds a few keys; more is refused unchecked
MAX_CHECK_SECONDS = 1.0  # the keys of one check are tried for this long at most


def _hex(*parts):
    return int("".join(parts), 16)


# The NIST curves of RFC 7518 §3.4 (FIPS 186-4 §D.1.2): p, b, the base point G and its
# order n. Their a is -3.
CURVES = {
    "P-256": (2 ** 256 - 2 ** 224 + 2 ** 192 + 2 ** 96 - 1,
              _hex("5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b"),
              (_hex("6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"),
               _hex("4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5")),
              _hex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551")),
    "P-384": (2 ** 384 - 2 ** 128 - 2 ** 96 + 2 ** 32 - 1,
              _hex("b3312fa7e23ee7e4988e056be3f82d19181d9c6efe8141120314088f5013875a",
                   "c656398d8a2ed19d2a85c8edd3ec2aef"),
              (_hex("aa87ca22be8b05378eb1c71ef320ad746e1d3b628ba79b9859f741e082542a38",
                    "5502f25dbf55296c3a545e3872760ab7"),
               _hex("3617de4a96262c6f5d9e98bf9292dc29f8f41dbd289a147ce9da3113b5f0b8c0",
                    "0a60b1ce1d7e819d7a431d7c90ea0e5f")),
              _hex("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf",
                   "581a0db248b0a77aecec196accc52973")),
    "P-521": (2 ** 521 - 1,
              _hex("0051953eb9618e1c9a1f929a21a0b68540eea2da725b99b315f3b8b489918ef1",
                   "09e156193951ec7e937b1652c0bd3bb1bf073573df883d2c34f1ef451fd46b503f00"),
              (_hex("00c6858e06b70404e9cd9e3ecb662395b4429c648139053fb521f828af606b4d",
                    "3dbaa14b5e77efe75928fe1dc127a2ffa8de3348b3c1856a429bf97e7e31c2e5bd66"),
               _hex("011839296a789a3bc0045c8a5fb42c7d1bd998f54449579b446817afbd17273e",
                    "662c97ee72995ef42640c550b9013fad0761353c7086a272c24088be94769fd16650")),
              _hex("01ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
                   "fa51868783bf2f966b7fcc0148f709a5d03bb5c9b8899c47aebb6fb71e91386409")),
}


def verify_pkcs1(n, e, hash_name, message, signature):
    """RSASSA-PKCS1-v1_5-VERIFY (RFC 8017 §8.2.2), by encode-then-compare: the expected
    encoding is built and compared whole, so no padding is ever parsed (the way
    Bleichenbacher's forgeries get in)."""
    import hashlib
    import hmac

    k = (n.bit_length() + 7) // 8
    s = int.from_bytes(signature, "big")
    if len(signature) != k or s >= n:
        return False
    digest_info = DIGEST_INFO[hash_name] + hashlib.new(hash_name, message).digest()
    expected = b"\x00\x01" + b"\xff" * (k - 3 - len(digest_info)) + b"\x00" + digest_info
    return hmac.compare_digest(pow(s, e, n).to_bytes(k, "big"), expected)


def verify_pss(n, e, hash_name, message, signature):
    """RSASSA-PSS-VERIFY (RFC 8017 §8.1.2, EMSA-PSS-VERIFY §9.1.2) with MGF1 on the same
    hash and a salt as long as the hash (RFC 7518 §3.5)."""
    import hashlib
    import hmac

    def digest(data):
        return hashlib.new(hash_name, data).digest()

    h_len = s_len = hashlib.new(hash_name).digest_size
    em_bits = n.bit_length() - 1
    em_len = (em_bits + 7) // 8
    s = int.from_bytes(signature, "big")
    if len(signature) != (n.bit_length() + 7) // 8 or s >= n or em_len < h_len + s_len + 2:
        return False
    m = pow(s, e, n)
    if m.bit_length() > em_bits:  # the leftmost 8emLen - emBits bits must be zero (step 6)
        return False
    em = m.to_bytes(em_len, "big")
    masked_db, h = em[:em_len - h_len - 1], em[em_len - h_len - 1:-1]
    if em[-1:] != b"\xbc":
        return False
    mask = b"".join(digest(h + counter.to_bytes(4, "big")) for counter in range(-(-len(masked_db) // h_len)))
    db = bytes(a ^ b for a, b in zip(masked_db, mask))
    db = bytes([db[0] & (0xff >> (8 * em_len - em_bits))]) + db[1:]
    padding, salt = db[:-s_len], db[-s_len:]
    if padding != b"\x00" * (len(padding) - 1) + b"\x01":
        return False
    return hmac.compare_digest(digest(b"\x00" * 8 + digest(message) + salt), h)


def verify_ecdsa(curve, x, y, hash_name, message, signature):
    """ECDSA verification (FIPS 186-4 §6.4.2, SEC 1 §4.1.4) of a JWS signature, which is
    R || S, each as long as the curve's size (RFC 7518 §3.4). The key must be a point on
    the curve and 0 < r, s < n."""
    import hashlib

    p, b, g, n = CURVES[curve]
    size = (p.bit_length() + 7) // 8
    if len(signature) != 2 * size or not (0 <= x < p and 0 <= y < p) or (y * y - x * x * x + 3 * x - b) % p:
        return False
    r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    if not (0 < r < n and 0 < s < n):
        return False
    digest = hashlib.new(hash_name, message).digest()
    e = int.from_bytes(digest, "big") >> max(0, 8 * len(digest) - n.bit_length())
    w = pow(s, n - 2, n)  # n is prime: Fermat's inverse (pow(s, -1, n) needs 3.8)
    point = _shamir(p, (e * w) % n, (g[0], g[1], 1), (r * w) % n, (x, y, 1))
    if point is None:
        return False
    z_inverse = pow(point[2], p - 2, p)
    return (point[0] * z_inverse * z_inverse) % p % n == r


def _shamir(p, u1, g, u2, q):
    """u1·G + u2·Q in Jacobian coordinates, one pass over the bits of both (Shamir's trick)."""
    both = _add(p, g, q)
    result = None
    for bit in range(max(u1.bit_length(), u2.bit_length()) - 1, -1, -1):
        result = _double(p, result)
        chosen = (both, q, g, None)[((u1 >> bit) & 1 ^ 1) + 2 * ((u2 >> bit) & 1 ^ 1)]
        result = _add(p, result, chosen)
    return result


def _double(p, point):
    """2·P on a curve with a = -3, in Jacobian coordinates; None is the point at infinity."""
    if point is None or point[1] == 0:
        return None
    x, y, z = point
    yy, zz = y * y % p, z * z % p
    s = 4 * x * yy % p
    m = 3 * (x - zz) * (x + zz) % p
    x3 = (m * m - 2 * s) % p
    return x3, (m * (s - x3) - 8 * yy * yy) % p, 2 * y * z % p


def _add(p, one, other):
    """P + Q in Jacobian coordinates; None is the point at infinity."""
    if one is None or other is None:
        return other if one is None else one
    (x1, y1, z1), (x2, y2, z2) = one, other
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    if u1 == u2:
        return _double(p, one) if s1 == s2 else None
    h, r = (u2 - u1) % p, (s2 - s1) % p
    hh = h * h % p
    hhh, v = h * hh % p, u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - s1 * hhh) % p, h * z1 * z2 % p


class Verdict:
    """What a signature check found: `status` "valid", "INVALID" or "not checked", and
    why (`detail`); `line` is the one line inspect and --verify print."""

    EXIT_CODES = {"valid": EXIT_OK, "INVALID": EXIT_FAILURE, "not checked": EXIT_OK}

    def __init__(self, status, detail):
        self.status, self.detail = status, detail

    @property
    def line(self):
        return "Signature: {} ({})".format(self.status, self.detail)


def check_signature(token, load_keys):
    """The Verdict on `token`'s signature. `load_keys()` returns `(jwks, where from)`, or
    `(None, why there are none)`; it is called only once the alg calls for a key. The
    rules, in this order: alg none is INVALID whatever the third part holds; an alg not
    implemented here is not checked; then the key: an unknown kid, a key of another type
    or one whose alg or curve forbids the token's alg is INVALID. A `crit` header is INVALID
    (RFC 7515 §4.1.11: no extension is implemented here). At most MAX_JWKS_KEYS keys, tried
    within MAX_CHECK_SECONDS: a hostile JWKS cannot make a check take long."""
    segments = token.split(".")
    try:
        header = decode_jwt_part(segments[0]) if len(segments) == 3 else None
    except ValueError:
        header = None
    if header is None:
        return Verdict("not checked", "the token is not a JWS: three base64url parts, a JSON header first")
    alg = header.get("alg")
    if not isinstance(alg, str):
        return Verdict("INVALID", "its alg is {}, not a name".format(shortened(json.dumps(alg))))
    if alg.lower() == "none":
        return Verdict("INVALID", "alg none: the token is not signed at all")
    if "crit" in header:
        return Verdict("INVALID", "its crit {} names extensions this check does not implement (RFC 7515 §4.1.11)"
                       .format(shortened(json.dumps(header["crit"]))))
    if alg not in JWS_ALGORITHMS:
        reason = "a shared-key MAC, which only its issuer can check" if str(alg).startswith("HS") else \
            "not one this file implements ({})".format(", ".join(JWS_ALGORITHMS))
        return Verdict("not checked", "alg {}: {}".format(one_line(json.dumps(alg)), reason))
    jwks, source = load_keys()
    if jwks is None:
        return Verdict("not checked", source)
    keys, source = signing_keys(jwks), shortened(source, 100)
    if not keys or len(keys) > MAX_JWKS_KEYS:
        return Verdict("not checked", "the JWKS from {} has {} signing keys".format(source, len(keys) or "no"))
    kid = header.get("kid")
    candidates = [key for key in keys if key.get("kid") == kid] if kid is not None else keys
    if not candidates:
        return Verdict("INVALID", "no key {} in the JWKS from {}".format(shortened(json.dumps(kid)), source))
    try:
        signature = _b64decode(segments[2])
    except ValueError:
        return Verdict("INVALID", "the signature is not base64url")
    message = (segments[0] + "." + segments[1]).encode("utf-8", "surrogatepass")
    problems, deadline = [], time.monotonic() + MAX_CHECK_SECONDS
    for key in candidates:
        if time.monotonic() > deadline:
            return Verdict("not checked", "its keys took over {:g} s to try ({} of {})".format(
                MAX_CHECK_SECONDS, len(problems), len(candidates)))
        problem = key_problem(key, alg) or (None if verify_with_key(key, alg, message, signature) else
                                            "the signature does not match {}".format(_key_name(key)))
        if problem is None:
            return Verdict("valid", "{}, {} from {}".format(alg, _key_name(key), source))
        problems.append(problem)
    return Verdict("INVALID", problems[0] if len(problems) == 1 else "no key in the JWKS from {} verifies it: {}{}"
                   .format(source, "; ".join(problems[:2]), "; and {} more".format(len(problems) - 2)
                           if len(problems) > 2 else ""))


def signing_keys(jwks):
    """The keys of a JWK Set that can sign: RSA and EC keys, with no `use` or `use` sig
    (RFC 7517 §4.2); the others are skipped. A lone JWK counts as a set of one."""
    keys = jwks.get("keys") if "keys" in jwks else [jwks]
    return [key for key in (keys if isinstance(keys, list) else [])
            if isinstance(key, dict) and key.get("kty") in ("RSA", "EC") and key.get("use", "sig") == "sig"]


def key_problem(key, alg):
    """Why `key` cannot have made an `alg` signature (RFC 7517 §4.4, RFC 7518 §6), or None."""
    kty, _, curve = JWS_ALGORITHMS[alg]
    name = _key_name(key)
    if key.get("kty") != kty:
        return "{} is an {} key, and {} needs an {} key".format(name, key.get("kty"), alg, kty)
    if "alg" in key and key["alg"] != alg:
        return "{} is for {}, not {}".format(name, shortened(json.dumps(key["alg"])), alg)
    if kty == "EC" and key.get("crv") != curve:
        return "{} is on the curve {}, and {} needs {}".format(name, shortened(json.dumps(key.get("crv"))), alg, curve)
    try:
        numbers = [_b64int(key.get(field)) for field in (("n", "e") if kty == "RSA" else ("x", "y"))]
    except ValueError:
        return "{} is malformed: its {} are not base64url numbers".format(name, "n and e" if kty == "RSA" else
                                                                         "x and y")
    if kty == "RSA" and not MIN_RSA_BITS <= numbers[0].bit_length() <= MAX_RSA_BITS:
        return "{} has {} bits, not the {} to {} RFC 7518 §3.3 allows here".format(
            name, numbers[0].bit_length(), MIN_RSA_BITS, MAX_RSA_BITS)
    if kty == "RSA" and not (3 <= numbers[1] <= MAX_RSA_EXPONENT and numbers[1] % 2):
        return "{} has an exponent e that no RSA key has (an odd number from 3 to 2^32)".format(name)
    return None


def verify_with_key(key, alg, message, signature):
    """True when `signature` is `key`'s `alg` signature of `message` (key_problem first)."""
    kty, hash_name, scheme = JWS_ALGORITHMS[alg]
    if kty == "EC":
        return verify_ecdsa(scheme, _b64int(key["x"]), _b64int(key["y"]), hash_name, message, signature)
    verify = verify_pkcs1 if scheme == "PKCS1" else verify_pss
    return verify(_b64int(key["n"]), _b64int(key["e"]), hash_name, message, signature)


def _key_name(key):
    return "key {}".format(shortened(json.dumps(key["kid"]))) if "kid" in key else "the key with no kid"


def shortened(text, limit=40):
    """`text` on one line, cut to `limit` characters (a server's value in a line about it)."""
    text = one_line(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _b64decode(text):
    """base64url without padding (RFC 7515 §2); ValueError for anything else."""
    if not isinstance(text, str) or not JWT_SEGMENT.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64int(text):
    return int.from_bytes(_b64decode(text), "big")


# --- The command line ---------------------------------------------------------------------


HELP_EPILOG = """\
environment variables (a flag wins over its variable):
  CLIENT_ID               the static OAuth client's id (--client-id)
  CLIENT_SECRET           its secret; never a flag, since flags end up in shell
                          history and ps. Unset on a terminal: asked for, hidden.
  CLIENT_SECRET_FILE      a file whose first line is the secret, yours alone
                          (--client-secret-file; for cron jobs and containers)
  GLEAN_BACKEND_URL       e.g. https://acme-be.glean.com (--backend-url)
  GLEAN_SERVER_URL        the same, as Glean's newer tools name it: used when
                          GLEAN_BACKEND_URL is unset
  REDIRECT_URI            default http://127.0.0.1:9090/oauth/callback (--redirect-uri);
                          must be registered on the client. Port 0: any free port.
  GLEAN_SCOPES            scopes to ask for, space-separated (--scope)
  GLEAN_HTTP_TIMEOUT      seconds one HTTP request may take, all of it, default 30
  GLEAN_CHAT_TIMEOUT      seconds the chat call may take, default 300
  GLEAN_CHAT_STREAM       1: stream the chat answer (--stream)
  GLEAN_CALLBACK_TIMEOUT  seconds to wait for the browser (or the paste), default 300
  REFRESH_TOKEN           the refresh token for --refresh (wins over --token-file's)
  GLEAN_TOKEN_FILE        the subcommands' token store, default
                          $XDG_CONFIG_HOME/glean-oauth/tokens.json (~/.config/...)
  HTTPS_PROXY, NO_PROXY   the proxy for https:// requests, and where not to use it
  SSL_CERT_FILE           a CA bundle to trust (a corporate CA), also SSL_CERT_DIR
  BROWSER                 the browser to open the URL with

examples:
  python3 glean_oauth.py                                  the documented flow
  python3 glean_oauth.py --scope "chat search offline_access" --token-file tokens.json
  python3 glean_oauth.py --refresh --token-file tokens.json
  python3 glean_oauth.py --manual                         on a machine with no browser
  python3 glean_oauth.py --stream --message "What is our PTO policy?"
  python3 glean_oauth.py --json --no-chat | jq -r .tokens.access_token
  python3 glean_oauth.py login --scope "chat offline_access"   then, any time:
  python3 glean_oauth.py exec -- python3 my_script.py     GLEAN_API_TOKEN set for it
  python3 glean_oauth.py doctor                           what is wrong, for a support ticket

exit codes: 0 done; 1 the flow failed (a request, the callback, the chat call);
2 bad configuration or usage; 3 sign-in needed (run login); 130 interrupted (Ctrl-C).
"""

SUBCOMMAND_EPILOG = """\
The token store is --token-file, else GLEAN_TOKEN_FILE, else
$XDG_CONFIG_HOME/glean-oauth/tokens.json (~/.config/glean-oauth/tokens.json;
%APPDATA%\\glean-oauth\\tokens.json on Windows); another tenant's tokens go beside it,
in tokens.<host>-<digest>.json. It never holds the client secret:
a refresh for a confidential client takes CLIENT_SECRET from the environment.
"""
SUBCOMMAND_EXIT_CODES = """
exit codes: 0 done; 1 a request failed; 2 bad configuration or usage;
3 sign-in needed (nothing stored, or the refresh token was refused: run login);
130 interrupted (Ctrl-C).
"""


class _Parser(argparse.ArgumentParser):
    def __init__(self, **options):
        super().__init__(allow_abbrev=False, **options)  # --form is no --format: a typo must not mean another flag

    def parse_args(self, args=None, namespace=None):
        flags, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = [option for action in self._actions for option in action.option_strings]
            self.error("unrecognized argument {}{}".format(one_line(unknown[0]), did_you_mean(unknown[0].split("=")[0],
                                                                                             known)))
        return flags

    def error(self, message):
        """One line and exit code 2, like every other configuration error, through the
        same redacting writer as everything else."""
        raise FlowError("{}: {} (see --help)".format(self.prog, message), EXIT_USAGE)


# The flags, one row each: name -> (argparse keywords). The bare command takes SIGN_IN_FLAGS
# and its own; each subcommand takes the rows its line in COMMANDS names.
FLAGS = {
    "--backend-url": dict(metavar="URL", help="the Glean backend (GLEAN_BACKEND_URL)"),
    "--client-id": dict(metavar="ID", help="the static client's id (CLIENT_ID)"),
    "--redirect-uri": dict(metavar="URI", help="the registered loopback redirect URI (REDIRECT_URI)"),
    "--auth-method": dict(default="client_secret_post",
                          help="how the client authenticates at the token endpoint (default: %(default)s, the doc's)"),
    "--scope": dict(metavar="SCOPES", help='scopes to ask for, e.g. "chat search offline_access" (GLEAN_SCOPES)'),
    "--no-browser": dict(dest="open_browser", action="store_false", help="only print the URL; do not open a browser"),
    "--manual": dict(action="store_true", help="no listener: open the URL anywhere, then paste the address the "
                                               "browser was redirected to (waits GLEAN_CALLBACK_TIMEOUT, but on "
                                               "Windows)"),
    "--message": dict(metavar="TEXT", default=CHAT_QUESTION, help="the question for the Chat API"),
    "--no-chat": dict(dest="chat", action="store_false", help="skip the Chat API call"),
    "--stream": dict(action="store_true", default=None,
                     help="stream the chat answer as it is written, on stderr (GLEAN_CHAT_STREAM=1)"),
    "--json": dict(action="store_true", help="print one JSON object on stdout; everything else goes to stderr"),
    "--token-file": dict(metavar="PATH", help="the token file: JSON, readable by you only (0600), written atomically"),
    "--refresh": dict(action="store_true",
                      help="skip sign-in: refresh the token in --token-file (or REFRESH_TOKEN) and save the result"),
    "--http-timeout": dict(metavar="SECONDS", help="seconds each HTTP request may take (GLEAN_HTTP_TIMEOUT)"),
    "--chat-timeout": dict(metavar="SECONDS", help="seconds the chat call may take (GLEAN_CHAT_TIMEOUT)"),
    "--callback-timeout": dict(metavar="SECONDS", help="seconds to wait for the browser (GLEAN_CALLBACK_TIMEOUT)"),
    "--min-valid": dict(metavar="SECONDS", default="60",
                        help="refresh first when the token expires within this many seconds (default: %(default)s)"),
    "--header": dict(action="store_true", help="print 'Authorization: Bearer <token>' (--format header)"),
    "--format": dict(choices=list(TOKEN_FORMATS),
                     help="raw (the default), header, json (with expires_in and expires_on), headers-json (for MCP "
                          "hosts' header helpers), curl (for curl -K -), env (export lines for eval)"),
    "--all": dict(action="store_true", help="every tenant's tokens, not one tenant's"),
    "--force": dict(action="store_true", help="sign in again even when a sign-in is stored that serves"),
    "--save-secret": dict(action="store_true", help="keep the client secret (or, when it came from a file, that "
                                                    "file's path) with this tenant's tokens, yours alone, so that "
                                                    "refreshes need no CLIENT_SECRET"),
    "--default": dict(action="store_true", help="make this tenant the one used when none is named"),
    "--force-refresh": dict(action="store_true", help="refresh now, even when the token is still valid"),
    "--local": dict(action="store_true", help="forget the tokens without revoking them (a corrupt file, no "
                                              "secret, a server that is down)"),
    "--client-secret-file": dict(metavar="PATH", help="read the client secret from the first line of this file, "
                                                      "yours and not writable by others (CLIENT_SECRET_FILE)"),
    "--verify": dict(action="store_true", help="step 9 also checks the access token's signature with the keys at "
                                               "the metadata's jwks_uri: a Signature: line instead of the doc's"),
    "--jwks": dict(metavar="URL_OR_FILE", help="the keys to check the signature with: a JWK Set's URL, or a file "
                                               "(then no configuration and no request); default: the jwks_uri"),
    "--probe": dict(action="store_true", help="also ask the server: GET /liveness_check; the token endpoint with a "
                                              "made-up code (the client's id and secret checked, nothing issued); the "
                                              "authorization endpoint, never followed (the client, redirect URI and "
                                              "scopes); and with a valid stored token, one search and one MCP "
                                              "initialize, as its scopes allow (one refresh after a 401)"),
    "--mcp-server": dict(metavar="NAME", help="with --probe: try the token on the MCP server /mcp/NAME (default: "
                                              "default, when the token has the mcp scope)"),
}

SIGN_IN_FLAGS = ["--backend-url", "--client-id", "--client-secret-file", "--redirect-uri", "--auth-method", "--scope",
                 "--no-browser", "--manual", "--http-timeout", "--callback-timeout"]

# Subcommands, one row each: name -> (function, what it does, its flags, its epilog).
COMMANDS = {
    "login": (login_command, "sign in and save the tokens to the token store (no chat call, no token on stdout)",
              SIGN_IN_FLAGS + ["--token-file", "--force", "--save-secret", "--default"],
              "A sign-in stored for the same backend and client, with the scopes asked for, whose access token\n"
              "is valid or can be renewed, is kept: login then says who is signed in, and opens no browser."),
    "token": (token_command, "print a valid access token, refreshed first when it expires within --min-valid s",
              ["--backend-url", "--token-file", "--min-valid", "--format", "--header", "--json", "--http-timeout",
               "--client-secret-file", "--force-refresh"],
              "examples:\n  ... token --format curl | curl -K - https://acme-be.glean.com/rest/api/v1/search ...\n"
              "  eval \"$(python3 glean_oauth.py token --format env)\""),
    "exec": (exec_command, "run a command with GLEAN_API_TOKEN and GLEAN_SERVER_URL in its environment",
             ["--backend-url", "--token-file", "--min-valid", "--http-timeout", "--client-secret-file"],
             "example: glean_oauth.py exec -- python3 my_script.py\n(CLIENT_SECRET, CLIENT_SECRET_FILE and "
             "REFRESH_TOKEN are not passed on to it)\n\nexit codes: the command's own; 1 a request failed; 2 bad "
             "configuration or usage;\n3 sign-in needed (run login); 126 the command cannot be run; 127 it was not "
             "found;\n130 interrupted (Ctrl-C)."),
    "status": (status_command, "show what is stored: backend, client, user, scopes, expiry (never a token)",
               ["--backend-url", "--token-file", "--json"],
               "exit codes: 0 the access token is valid or can be renewed here; 1 a store cannot be read;\n"
               "2 bad usage, or the secret a renewal needs is not here; 3 sign-in needed"),
    "logout": (logout_command, "revoke the tokens where the server can, and delete them (--local: only delete them)",
               ["--backend-url", "--token-file", "--http-timeout", "--local", "--all", "--client-secret-file"], None),
    "doctor": (doctor_command, "check the client's setup, the server and the store; a block for a support ticket",
               ["--backend-url", "--client-id", "--client-secret-file", "--redirect-uri", "--auth-method", "--scope",
                "--token-file", "--json", "--http-timeout", "--probe", "--mcp-server"],
               "Without --probe it sends two requests: the metadata and the JWKS. It never signs in, never\n"
               "refreshes (but --probe, once, after a 401), and never shows a token, a code or the secret.\n"
               "exit codes: 0 no check failed; 1 a check failed; 2 bad usage"),
    "inspect": (inspect_command, "show the stored access token's header and claims, and check its signature",
                ["--backend-url", "--token-file", "--jwks", "--http-timeout"],
                "examples:\n  python3 glean_oauth.py inspect\n"
                "  python3 glean_oauth.py token | python3 glean_oauth.py inspect - --jwks keys.json\n"
                "exit codes: 0 the signature is valid or was not checked; 1 it is INVALID, or its keys could not\n"
                "be fetched; 2 bad usage; 3 no token stored (run login)"),
}


def did_you_mean(word, known):
    """'; did you mean --format?' for a word close to one of `known`, else ""."""
    import difflib  # here: only a typo needs it

    close = difflib.get_close_matches(word, known, 1)
    return "; did you mean {}?".format(close[0]) if close else ""


def help_asked(argv):
    """`help`, `help CMD` and `-h CMD` as argparse takes them: `--help`, `CMD --help`."""
    if argv[:1] == ["help"] or argv[:1] in (["-h"], ["--help"]) and argv[1:2] and argv[1] in COMMANDS:
        return argv[1:2] + ["--help"]
    return argv


def build_parser(command=None):
    """The parser of the bare command (the documented flow) or of one subcommand."""
    if command is None:
        parser = _Parser(
            prog="glean_oauth.py", epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
            usage="%(prog)s [{}] [options]".format("|".join(list(COMMANDS) + ["help"])),
            description="Get tokens from the Glean OAuth Authorization Server with a static OAuth\n"
                        "client, printing every step, then call the Chat API with the access token.\n\n"
                        "subcommands (each has --help):\n" + "".join(
                            "  {:<8} {}\n".format(name, row[1]) for name, row in COMMANDS.items()),
        )
        parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
        flags = SIGN_IN_FLAGS + ["--message", "--no-chat", "--stream", "--chat-timeout", "--json", "--token-file",
                                 "--refresh", "--verify"]
    else:
        _, description, flags, epilog = COMMANDS[command]
        parser = _Parser(prog="glean_oauth.py " + command, description=description,
                         epilog=(epilog + "\n\n" if epilog else "") + SUBCOMMAND_EPILOG + (
                             "" if "exit codes:" in (epilog or "") else SUBCOMMAND_EXIT_CODES),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in flags:
        options = dict(FLAGS[flag], **({"choices": list(CLIENT_AUTH)} if flag == "--auth-method" else {}))
        if flag == "--min-valid" and command == "exec":
            options["default"] = EXEC_MIN_VALID  # a program may run a while: hand it a token with time left
        if flag == "--auth-method" and command == "doctor":
            options.update(default=None, help="the auth method to check for (default: the stored one, else "
                                              "client_secret_post, the doc's)")
        parser.add_argument(flag, **options)
    if command == "inspect":
        parser.add_argument("token", nargs="?", metavar="-", help="read the token from standard input")
    if command == "exec":
        parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]",
                            help="the command to run (put -- before it when it starts with -)")
    return parser


def parse_args(command, argv):
    """The flags of `command` (None: the bare command). The client secret is never a
    flag: one given as such is refused without being echoed."""
    for arg in argv:
        if arg == "--":
            break
        if re.match(r"--(client[-_])?secret(?![-_]file)", arg):
            raise FlowError("The client secret is taken only from CLIENT_SECRET, a file (--client-secret-file, "
                            "CLIENT_SECRET_FILE) or the prompt, never from a flag "
                            "(flags end up in shell history and ps).", EXIT_USAGE)
    return build_parser(command).parse_args(argv)


def cli(argv=None, environ=None, out=None, err=None, stdin=None):
    """Run from the command line: the documented flow, or a subcommand; turn whatever
    stops it into one line on stderr and an exit code."""
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else list(argv)
    real_stdout = out is None
    stdin = stdin or sys.stdin or io.StringIO()  # stdin closed (<&-): there is nothing to read
    console = Console(out or sys.stdout, err or sys.stderr or open(os.devnull, "w"), real_stdout)
    argv = help_asked(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        if argv and not command and not argv[0].startswith("-"):  # the bare command takes no word
            raise FlowError("glean_oauth.py: unknown command {}{} (see --help)".format(
                one_line(argv[0]), did_you_mean(argv[0], list(COMMANDS) + ["help"])), EXIT_USAGE)
        # Known before the flags are read, so that even a usage error cannot show it.
        console.secrets = secret_forms(environ.get("CLIENT_ID", ""), _secret_if_readable(environ))
        if console.out is None and command not in ("exec", "login", "logout"):
            raise FlowError("Standard output is closed, so nothing could be shown; run with it open "
                            "(redirect it to a file to keep it).", EXIT_USAGE)
        if command is None:  # the documented flow, or with --refresh only its steps 2 and 10
            return (refresh_later if "--refresh" in argv else main)(argv, environ, console, stdin)
        return COMMANDS[command][0](argv[1:], environ, console, stdin)
    except FlowError as error:
        if str(error):  # else said already
            console.problem(str(error))
        return error.exit_code
    except (OutputError, BrokenPipeError) as error:
        return _output_failed(getattr(error, "error", error), console)
    except SystemExit as done:  # --help or --version: argparse has printed to stdout
        try:
            if real_stdout and sys.stdout:
                sys.stdout.flush()
        except (OSError, ValueError) as error:
            return _output_failed(error, console)
        return done.code or EXIT_OK
    except KeyboardInterrupt:
        console.problem("Interrupted.")
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug: still one line, still no secret
        console.problem("Unexpected error: {}: {} (a bug in glean_oauth.py; please report it)".format(
            type(error).__name__, error))
        return EXIT_FAILURE


def _secret_if_readable(environ):
    """The client secret from the environment, for redaction before any flag is read; ""
    when the secret file cannot be read yet (the command that needs it says why)."""
    try:
        return read_client_secret(environ)
    except FlowError:
        return ""


def _output_failed(error, console):
    """Writing the output failed. A reader that has gone (a closed pipe) ends the run
    quietly, as command-line tools do; anything else (a full disk) is one line. Either
    way stdout is pointed at the null device, so Python's own last flush cannot fail."""
    if console.real_stdout:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        except OSError:
            pass
    # A reader that went away: a broken pipe, or on Windows EINVAL for a write to a closed one.
    gone = isinstance(error, BrokenPipeError) or os.name == "nt" and getattr(error, "errno", None) == errno.EINVAL
    if not gone:
        console.problem("Cannot write the output: {}.".format(_why(error)))
    return EXIT_FAILURE


# --- Checks: settings, URLs and metadata --------------------------------------------------


WEB_APP_HOSTS = ("app.glean.com", "glean.com", "www.glean.com")  # Glean's web app, never a backend


def named_backend(environ, flag_value=None):
    """The backend asked for, read by backend_origin, and what named it; ("", None) when
    none does. The two variables set to two backends is a usage error that names both."""
    backend, named_by = backend_setting(environ, flag_value)
    if named_by == "GLEAN_BACKEND_URL" and environ.get("GLEAN_SERVER_URL", "").strip():
        server = backend_origin(environ["GLEAN_SERVER_URL"], "GLEAN_SERVER_URL")
        if server != backend_origin(backend, named_by):
            raise FlowError("GLEAN_BACKEND_URL ({}) and GLEAN_SERVER_URL ({}) name different backends: unset one, or "
                            "give --backend-url.".format(backend_origin(backend, named_by), server), EXIT_USAGE)
    return (backend_origin(backend, named_by), named_by) if backend else ("", None)


def backend_origin(value, source="GLEAN_BACKEND_URL"):
    """The one reading of a backend URL, for the flow, every subcommand, doctor and
    TokenProvider: spaces and trailing slashes trimmed, https:// before a bare host (as
    Glean's tools do), the scheme and host in lower case, a default port dropped. FlowError
    (exit 2) naming `source` for the doc's placeholder, the web app's host, a path, query or
    fragment, a user:password, or credentials that would go over plain http."""
    value = value.strip().rstrip("/")
    if unset("GLEAN_BACKEND_URL", value):
        raise FlowError(placeholder_problem(source, value) + ".", EXIT_USAGE)
    url = value if re.match(r"(?i)^[a-z][a-z0-9+.-]*://", value) else "https://" + value
    parts = check_transport(url, source, EXIT_USAGE)
    host, scheme = parts.hostname, parts.scheme.lower()
    if "@" in parts.netloc:
        raise FlowError("{} must not hold a user name or password: {}.".format(source, _without_userinfo(url)),
                        EXIT_USAGE)
    origin = "{}://{}{}".format(scheme, _bracketed(host), "" if parts.port in (None, {"https": 443, "http": 80}[
        scheme]) else ":{}".format(parts.port))
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise FlowError("{} {} is not a backend's origin: use the origin only: {}.".format(source, value, origin),
                        EXIT_USAGE)
    if host in WEB_APP_HOSTS:
        raise FlowError("{} {} is Glean's web app, not your backend: use the \"Server instance (QE)\" value from the "
                        "About page in Glean, usually https://<name>-be.glean.com.".format(source, value), EXIT_USAGE)
    return origin


def hinted(error, config, metadata=None, granted=False):
    """`error` with what leads to its fix (the same exit code and status), or itself: after
    discovery, the -be host likely meant; after the callback (`metadata`), the scopes the
    server does not list; after the Chat API (`granted`: its scopes, or None), why it
    refused the token."""
    hint = scope_hint(error, config, granted) if granted is not False else \
        scope_refusal_hint(error, config.scope, metadata) if metadata is not None else be_host_hint(config.backend_url)
    text = str(error) + ("" if str(error).endswith(".") or hint.startswith(" (") else ".")
    return FlowError(text + hint, error.exit_code, error.status, error.oauth_error) if hint else error


def be_host_hint(backend_url):
    """For a https://<name>.glean.com backend (the web host, likely): " Did you mean
    https://<name>-be.glean.com?"; else ""."""
    match = re.match(r"^https://([a-z0-9-]+)\.glean\.com$", backend_url or "")
    if not match or match.group(1).endswith("-be"):
        return ""
    return " Did you mean https://{}-be.glean.com?".format(match.group(1))


def read_more_settings(config, flags, environ, command):
    """The backend URL read as an origin (https:// for a bare host), the redirect URI checked,
    and the settings beyond the doc's four variables; the token file is checked before any
    traffic, since a sign-in whose tokens cannot be kept is wasted."""
    config.backend_url = named_backend(environ, flags.backend_url)[0]
    check_redirect_uri(config.redirect_uri)
    config.scope = " ".join(_setting(flags.scope, environ, "GLEAN_SCOPES").split())
    config.http_timeout = seconds(flags.http_timeout, environ, "GLEAN_HTTP_TIMEOUT", HTTP_TIMEOUT_SECONDS)
    config.callback_timeout = seconds(flags.callback_timeout, environ, "GLEAN_CALLBACK_TIMEOUT",
                                      CALLBACK_TIMEOUT_SECONDS)
    config.chat_timeout = seconds(getattr(flags, "chat_timeout", None), environ, "GLEAN_CHAT_TIMEOUT",
                                  CHAT_TIMEOUT_SECONDS)
    config.stream = getattr(flags, "stream", None)
    if config.stream is None:
        config.stream = environ.get("GLEAN_CHAT_STREAM", "").strip().lower() in ("1", "true", "yes")
    for name in ("open_browser", "manual", "message", "chat", "json", "refresh", "token_file", "force", "verify",
                 "save_secret", "default"):
        setattr(config, name, getattr(flags, name, None))
    config.secret_file = flags.client_secret_file
    config.refresh_token = environ.get("REFRESH_TOKEN", "").strip()
    if command is not None:  # login: its tenant's file in the token store, where the subcommands find it
        config.store = open_store(config.token_file, environ).store_for(config.backend_url)
    elif config.token_file:
        config.store = TokenStore(config.token_file)
    if config.refresh and not (config.token_file or config.refresh_token):
        raise FlowError("--refresh needs a refresh token: give --token-file PATH, or set REFRESH_TOKEN.", EXIT_USAGE)
    if config.store:
        if config.refresh and not config.refresh_token:
            config.store.read()
        config.store.check_writable()


MAX_SECONDS = 7 * 24 * 3600  # a week: beyond any wait here, within what select and sockets take


def seconds(flag_value, environ, name, default, zero=False):
    """The positive number of seconds (or 0, with `zero`) in the flag, else `environ[name]`,
    else `default`."""
    text = (environ.get(name, "") if flag_value is None else flag_value).strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not (0 <= value if zero else 0 < value) or value > MAX_SECONDS:
        raise FlowError("{} must be a {} number of seconds, at most {}, not {!r}.".format(
            name, "positive (or 0)" if zero else "positive", MAX_SECONDS, text), EXIT_USAGE)
    return value


def is_loopback(host):
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    import ipaddress  # here: a token still valid needs no address checked

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_url(url, name, exit_code=EXIT_FAILURE):
    """`url` split, with its port checked; FlowError naming `name` for a URL that cannot
    be one (an unclosed [IPv6 address, a port that is not a number). The error never
    shows a password the URL holds."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError as error:
        raise FlowError("{} is not a usable URL ({}): {}.".format(name, error, _without_userinfo(url)), exit_code)
    return parts


def check_transport(url, name, exit_code=EXIT_FAILURE):
    """Refuse a URL that credentials must not be sent to (RFC 6749 §1.6, §3.1, §3.2).

    Secrets, codes and tokens go only over TLS, or over plain HTTP that never leaves
    this machine.
    """
    parts = split_url(url, name, exit_code)
    if parts.hostname and (parts.scheme == "https" or parts.scheme == "http" and is_loopback(parts.hostname)):
        return parts
    raise FlowError(
        "{} must be an https:// URL (http:// only for 127.0.0.1, [::1] or localhost), "
        "not {}.".format(name, _without_userinfo(url)),
        exit_code,
    )


def check_redirect_uri(redirect_uri):
    """Refuse a redirect URI this script cannot safely listen on (RFC 8252 §7.3, §8.3)."""
    try:
        parts = urllib.parse.urlsplit(redirect_uri)
    except ValueError:  # an unclosed [IPv6 address
        parts = None
    try:
        port_ok = parts is not None and (parts.port is None or parts.port >= 0)
    except ValueError:  # urllib raises for a port that is no number from 0 to 65535
        port_ok = False
    problem = None
    if parts is None:
        problem = "it is not a URL"
    elif parts.scheme != "http":
        problem = "it must start with http:// (the listener is plain HTTP on this machine)"
    elif not is_loopback(parts.hostname):
        problem = "its host must be 127.0.0.1, [::1] or localhost, so that only this machine can receive the code"
    elif not port_ok:
        problem = "its port is not a number from 0 to 65535"
    elif parts.fragment:
        problem = "it must not have a #fragment (RFC 6749 §3.1.2)"
    elif "@" in parts.netloc:
        problem = "it must not hold a user name or password"
    if problem:
        raise FlowError("REDIRECT_URI {} is refused: {}.".format(_without_userinfo(redirect_uri), problem),
                        EXIT_USAGE)


ENDPOINTS = ("authorization_endpoint", "token_endpoint", "revocation_endpoint")
METHOD_LISTS = ("code_challenge_methods_supported", "token_endpoint_auth_methods_supported")


def check_metadata(metadata, auth_method, backend_url):
    """Refuse metadata this flow cannot use: no endpoints, an endpoint that is no clean
    URL or would carry credentials in the clear (or over http when the backend is https),
    lists that are not lists of strings, no PKCE S256, or a list of token endpoint auth
    methods without `auth_method`. Glean's issuer may differ from the backend URL (it
    can be `{backend}/oauth`), so it is shown, not compared."""
    missing = [key for key in ENDPOINTS[:2] if not isinstance(metadata.get(key), str) or not metadata[key]]
    if missing:
        raise FlowError("The authorization server metadata has no {}.".format(" and no ".join(missing)))
    for key in ENDPOINTS:
        if key in metadata:
            check_endpoint(metadata[key], "The metadata's " + key, backend_url)
    for key in METHOD_LISTS:
        value = metadata.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise FlowError("The metadata's {} is not a list of names: {}.".format(key, excerpt(
                json.dumps(value).encode("utf-8"))))
    methods = metadata.get("code_challenge_methods_supported")
    if methods is not None and "S256" not in methods:
        raise FlowError("The authorization server does not offer PKCE S256 (its "
                        "code_challenge_methods_supported is {}); this flow needs it.".format(json.dumps(methods)))
    offered = metadata.get("token_endpoint_auth_methods_supported")
    if offered is not None and auth_method not in offered:
        raise FlowError("The token endpoint does not accept {} (it offers {}); choose one with "
                        "--auth-method.".format(auth_method, ", ".join(offered) or "none"))


def check_endpoint(url, name, backend_url):
    """Refuse an endpoint that is no clean URL, would carry credentials in the clear, or
    is plain http when the backend is https; `name` says where it came from."""
    if not isinstance(url, str) or any(not c.isprintable() or c.isspace() for c in url):
        raise FlowError("{} is not a clean URL (it holds control, space or bidi characters): {}.".format(
            name, one_line(json.dumps(url))))
    check_transport(url, name)
    if backend_url.startswith("https://") and not url.startswith("https://"):
        raise FlowError("{} must be https://, as GLEAN_BACKEND_URL is, not {}.".format(name, url))


# --- Answers: what a server says, parsed with care ----------------------------------------


EXCERPT_CHARACTERS = 300  # how much of an unexpected body an error message shows


def excerpt(body, redact=()):
    """The start of a response body, on one line, for an error message; each of `redact`
    is replaced first, since a secret cut in two by the excerpt could not be."""
    text = one_line(redacted(body.decode("utf-8", "replace"), redact))
    return text if len(text) <= EXCERPT_CHARACTERS else text[:EXCERPT_CHARACTERS] + "..."


class Answer(dict):
    """A JSON object a server answered, and where from: `url`, the answer's `headers` and
    `body`, and when it came. Printed and kept as the dict it is."""

    url = headers = body = received_at = None

    @property
    def clock_offset(self):
        """How far the server's clock (its Date) was ahead of this one's, in seconds, or None."""
        return clock_offset(self.headers, self.received_at) if self.headers is not None else None


def _oauth_error(body, redact=(), key=None):
    """`(error, "error: error_description")` from an RFC 6749 §5.2 error body, or (None, None).
    With `key`, Glean's RFC 9457 problem `code` (token_expired) counts when there is no error."""
    try:
        value = parse_json(body.decode("utf-8"))
    except ValueError:
        return None, None
    if isinstance(value, dict) and key and not isinstance(value.get("error"), str):
        value = dict(value, error=value.get(key), error_description=None)
    if not isinstance(value, dict) or not isinstance(value.get("error"), str):
        return None, None
    description = value.get("error_description")
    text = value["error"] + (": " + str(description) if description else "")
    return value["error"], excerpt(text.encode("utf-8"), redact)


# --- The chat step's details: scopes and streaming ----------------------------------------


WAITING_NOTE_SECONDS = 2
CHAT_SCOPE_HINT = " (the token may lack the CHAT scope: check the scopes of your static client)"


REFUSED_TOKEN_HINT = " (the server refused the token: it has expired or was revoked; sign in again)"


def scope_hint(response, config, granted=None):
    """For a 401 or 403, why the token was refused: the scope the answer's WWW-Authenticate
    asks for (RFC 6750 §3.1) and the command that asks for it; that it was expired or
    revoked (invalid_token, Glean's token_expired); else the general scope hint, unless the
    scopes `granted` include chat. "" for other statuses."""
    if response.status not in (401, 403):
        return ""
    challenge = (response.headers or {}).get("WWW-Authenticate") or ""
    wanted = re.search(r'\bscope="([^"]*)"', challenge)
    if wanted and wanted.group(1).split():
        scopes = [one_line(scope) for scope in wanted.group(1).split()]
        ask = _scope_union(config.scope.split() + scopes + ["offline_access"])
        return ' (the token lacks the scope {}: sign in again with --scope "{}")'.format(" ".join(scopes),
                                                                                          " ".join(ask))
    said = re.search(r'\berror="([^"]*)"', challenge)
    error = said.group(1) if said else _oauth_error(response.body or b"", key="code")[0]
    if error in ("invalid_token", "token_expired"):
        return REFUSED_TOKEN_HINT
    chat_granted = granted is not None and "chat" in granted.lower().split()
    return CHAT_SCOPE_HINT if error == "insufficient_scope" or not chat_granted else ""


def scope_refusal_hint(error, scope, metadata):
    """After an invalid_scope answer: the scopes asked for that the metadata's scopes_supported
    does not name, and the lower-case spelling of any asked in upper case; else ""."""
    if error.oauth_error != "invalid_scope":
        return ""
    supported = metadata.get("scopes_supported")
    known = {item.lower(): item for item in supported if isinstance(item, str)} if isinstance(supported, list) else {}
    unknown = [item for item in scope.split() if item not in known.values()]
    hint = " The server's scopes_supported does not name {} (it names {}).".format(
        " ".join(unknown), " ".join(known.values())) if known and unknown else ""
    if scope != scope.lower():
        hint += ' Glean takes scopes in lower case: --scope "{}".'.format(scope.lower())
    return hint


class ChatStream:
    """Around the Chat API call: its `deadline` (GLEAN_CHAT_TIMEOUT), and without --stream
    a note on a terminal when the answer is slow to come. With --stream (`on_line` set):
    Glean's NDJSON answer, one ChatResponse a line. Shows the stages (UPDATE messages) as
    short lines and the answer (CONTENT deltas) as it grows, on stderr, and merges the
    lines into one ChatResponse: messages in arrival order, one per messageId, each
    CONTENT message's text fragments joined into one."""

    def __init__(self, console, config, redact=()):
        self.console, self.silence, self.redact = console, config.http_timeout, redact
        self.deadline = Deadline(config.chat_timeout, "GLEAN_CHAT_TIMEOUT")
        self.on_line = self.add if config.stream else None
        self.count = 0  # lines so far
        self.response = {}  # the fields of the lines but messages, the last one winning
        self.messages = {}  # messageId (or the arrival number) -> merged message
        self.end = self.deadline.at  # the whole call's deadline
        self.writing = False  # an answer line on stderr is still open
        self.waiting = None

    def __enter__(self):
        if not self.on_line and _isatty(self.console.err):
            self.waiting = threading.Timer(WAITING_NOTE_SECONDS, self.console.note,
                                           ["Waiting for the Chat API answer..."])
            self.waiting.daemon = True
            self.waiting.start()
        return self

    def __exit__(self, *exc):
        if self.waiting:
            self.waiting.cancel()
        self.end_answer_line()

    def add(self, raw, deadline):
        """Take one line of the stream (http_request's on_line)."""
        self.count += 1
        # Once the first line has come, GLEAN_HTTP_TIMEOUT bounds the silence before the next.
        deadline.at = min(self.end, time.monotonic() + self.silence)
        deadline.setting = "GLEAN_HTTP_TIMEOUT" if deadline.at < self.end else "GLEAN_CHAT_TIMEOUT"
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            value = parse_json(text)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise FlowError("Line {} of the chat stream is not a JSON object: {}".format(
                self.count, excerpt(raw, self.redact)))
        for key, field in value.items():
            if key != "messages":
                self.response[key] = field
        messages = value.get("messages")
        for message in messages if isinstance(messages, list) else []:
            if isinstance(message, dict):
                self._merge(message)

    def _merge(self, message):
        key = message.get("messageId")
        key = key if isinstance(key, str) and key else len(self.messages)  # a server's value may be anything
        fragments = [f for f in message.get("fragments") or [] if isinstance(f, dict)] \
            if isinstance(message.get("fragments"), list) else []
        merged = self.messages.setdefault(key, dict(message, fragments=[]))
        merged.update((k, v) for k, v in message.items() if k != "fragments")
        merged["fragments"].extend(fragments)
        text = "".join(f["text"] for f in fragments if isinstance(f.get("text"), str))
        if message.get("author") == "USER" or not text:
            return
        if message.get("messageType", "CONTENT") == "CONTENT":
            if not self.writing:
                self.console.progress("\nAnswer: ")
                self.writing = True
            self.console.progress(set_off(text))
        else:
            self.end_answer_line()
            self.console.note("  " + one_line(text.replace("**", "")))

    def end_answer_line(self):
        """End the answer's line on stderr, if one is open, with what was held back."""
        if self.writing:
            self.console.progress("\n")
            self.console.end_progress()
            self.writing = False

    def finish(self):
        """The merged ChatResponse, once the stream has ended."""
        self.end_answer_line()
        for message in self.messages.values():
            if message.get("messageType", "CONTENT") == "CONTENT":
                message["fragments"] = _joined_text(message["fragments"])
        return dict(self.response, messages=list(self.messages.values()))


def _joined_text(fragments):
    """`fragments` with each run of text-only fragments joined into one."""
    joined = []
    for fragment in fragments:
        if set(fragment) == {"text"} and isinstance(fragment["text"], str) and joined \
                and set(joined[-1]) == {"text"}:
            joined[-1] = {"text": joined[-1]["text"] + fragment["text"]}
        else:
            joined.append(dict(fragment))
    return joined


# --- Output and redaction -----------------------------------------------------------------


def json_text(value, ascii_only=False):
    """`value` as JSON indented by 2, as the example prints it, with every unprintable
    character escaped (json.dumps leaves C1 controls and bidi overrides raw), and every
    non-ASCII one too with `ascii_only`."""
    text = json.dumps(value, indent=2, ensure_ascii=ascii_only)
    return "".join(c if c.isprintable() or c == "\n" else json.dumps(c)[1:-1] for c in text)


class Console:
    """Where the run's text goes: sections to `out`, problems to `err`.

    Every line passes through here, so this is the last guard that keeps the client
    secret (in every form in `secrets`) out of what is printed, whatever a server
    echoes back.
    """

    def __init__(self, out, err, real_stdout=False):
        self.out, self.err = out, err
        self.secrets = []  # every form of the client secret that a server could echo back
        self.json_out = out  # where --json's object goes, when `out` is moved to stderr
        self.real_stdout = real_stdout  # `out` is the process's own stdout (fd 1)
        self.held = ""  # the end of the streamed text so far that could begin a secret
        self.tokens_shortened = False

    def claim_stdout(self):
        """--json: keep stdout for the one JSON object. The sections go to stderr, and so
        does whatever else writes to fd 1 from now on (a browser started from here)."""
        self.out = self.err
        if self.real_stdout:
            sys.stdout.flush()
            json_fd = os.dup(1)
            os.dup2(2, 1)
            self.json_out = _FdWriter(json_fd, sys.stdout.encoding)

    def line(self, text=""):
        self._write(self.out, text, lambda text: printable(text, keep="\n"))

    def section(self, title, value):
        """A blank line, `title:`, then `value` as JSON indented by 2, as the example prints;
        with `tokens_shortened` (--json), each token only as its start, as the code is shown."""
        self.line("\n" + title + ":")
        if self.tokens_shortened and isinstance(value, dict):
            value = {key: item[:CODE_PREFIX_LENGTH] + "..." if key in TOKEN_KEYS and isinstance(item, str) else item
                     for key, item in value.items()}
        self._write(self.out, json_text(self.redact(value)))

    def problem(self, text):
        """One line on stderr. When even stderr cannot be written, there is nowhere left to say it."""
        try:
            self._write(self.err, text, one_line)
        except OutputError:
            pass

    def note(self, text):
        """Extra text for a person (a hint, the chat answer) on stderr, keeping its lines."""
        self._write(self.err, text, lambda text: printable(text, keep="\n\t"))

    def progress(self, text):
        """Text on stderr as it comes, with no line end added (a streamed answer). The text
        is redacted as a whole, however it was cut: its end that could be the start of a
        secret is held back until the next piece, or end_progress(), shows what follows."""
        text = redacted(self.held + text, self.secrets)
        cut = len(text) - _secret_start_length(text, self.secrets)
        self.held = text[cut:]
        self._write(self.err, text[:cut], lambda text: printable(text, keep="\n\t"), end="")

    def end_progress(self):
        """Show what progress() held back: the streamed text has ended."""
        held, self.held = self.held, ""
        self._write(self.err, held, lambda text: printable(text, keep="\n\t"), end="")

    def result(self, value, verbatim=False):
        """The one JSON object of --json, on stdout; `verbatim`: never redacted (a token
        printed on purpose, checked by the caller). ASCII with \\u escapes where stdout is
        not UTF-8 (a Windows pipe is cp1252), so that it is valid JSON whatever reads it."""
        value = value if verbatim else self.redact(value)
        encoding = (getattr(self.json_out, "encoding", None) or "utf-8").lower().replace("-", "").replace("_", "")
        self._write(self.json_out, json_text(value, ascii_only=encoding != "utf8"))

    def verbatim(self, text):
        """One line on stdout exactly as given: a token that `token` prints on purpose."""
        self._write(self.json_out, text, redact=False)

    def redact(self, value):
        """`value` (text, or parsed JSON) without the client secret, in any form."""
        return redacted(value, self.secrets)


    def _write(self, stream, text, sanitize=None, end="\n", redact=True):
        # Redacted before and after sanitizing: collapsing white space or blanking a
        # control character could otherwise turn the secret into a form not listed.
        text = self.redact(text) if redact else text
        if sanitize:
            text = self.redact(sanitize(text))
        text += end
        try:
            try:
                stream.write(text)
            except UnicodeEncodeError:  # a C locale on an old Python: keep going, escape
                encoding = stream.encoding or "ascii"
                stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
            stream.flush()  # piped output must show each step as it happens
        except (OSError, ValueError) as error:  # a full disk, a reader gone, a closed stream
            raise OutputError(error)


REDACTED = "[redacted]"
TOKEN_KEYS = ("access_token", "refresh_token", "id_token")


def redacted(value, secrets):
    """`value` (text, or parsed JSON) with each of `secrets` in every string replaced by
    [redacted]. JSON is redacted before it is serialized, since serializing escapes the
    secret's forms into yet other forms. One pass, longest secret first, and never inside
    a marker already there, so that redacting twice changes nothing."""
    if isinstance(value, str):
        if not secrets:
            return value
        pattern = _secrets_pattern(tuple(secrets))
        return REDACTED.join(pattern.sub(REDACTED, piece) for piece in value.split(REDACTED))
    if isinstance(value, list):
        return [redacted(item, secrets) for item in value]
    if isinstance(value, dict):
        return {redacted(key, secrets): redacted(item, secrets) for key, item in value.items()}
    return value


def _secret_start_length(text, secrets):
    """The length of the longest end of `text` that is the start of one of `secrets`
    (shorter than it): what a stream must hold back until it sees what follows."""
    longest = 0
    for secret in secrets:
        for length in range(min(len(secret) - 1, len(text)), longest, -1):
            if secret.startswith(text[-length:]):
                longest = length
                break
    return longest


@functools.lru_cache(maxsize=8)
def _secrets_pattern(secrets):
    return re.compile("|".join(re.escape(secret) for secret in sorted(secrets, key=len, reverse=True)))


class _FdWriter:
    """A text stream straight onto a file descriptor, with no buffer of its own, so a
    failed write leaves nothing behind for Python to fail on again at exit."""

    def __init__(self, fd, encoding):
        self.fd, self.encoding = fd, encoding or "utf-8"

    def write(self, text):
        data = text.encode(self.encoding)
        while data:
            data = data[os.write(self.fd, data):]

    def flush(self):
        pass


class OutputError(Exception):
    """Writing to stdout or stderr failed: `error` is the OSError (or ValueError of a
    closed stream). A broken pipe (the reader has gone) ends the run quietly."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


MIN_SECRET_CHARACTERS = 8  # shorter forms are not redacted: they would shred unrelated text


def secret_forms(client_id, client_secret, *also):
    """The client secret in every form a server could echo it back in (credential_forms),
    and inside the Basic credential, and each of `also` (a code, a token) in its forms.
    What must never be printed, longest first."""
    basic = [_client_secret_basic(client_id, client_secret)[1]["Authorization"].split(" ", 1)[1]] \
        if client_secret else []
    return _longest_first(basic + [form for value in (client_secret,) + also for form in credential_forms(value)])


def credential_forms(value):
    """`value` (a secret, a token, a code) in every form a server could echo it back in:
    as typed, as it goes on the wire (form-encoded), JSON-escaped, as repr writes it,
    with its white space collapsed; longest first, none under MIN_SECRET_CHARACTERS."""
    forms = set()
    # The value as a server decodes it: the bytes the user set, where Python 3.6 in a C
    # locale read them as surrogates.
    for secret in {value, value.encode("utf-8", ENV_ERRORS).decode("utf-8", "replace")} if value else ():
        encoded = {urllib.parse.quote_plus(secret, errors=ENV_ERRORS),
                   urllib.parse.quote(secret, safe="", errors=ENV_ERRORS)}
        forms |= {secret, printable(secret), one_line(secret), repr(secret)[1:-1], json.dumps(secret)[1:-1],
                  json_text(secret)[1:-1]}
        forms |= encoded | {re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), form) for form in encoded}
    return _longest_first(forms)


def _longest_first(forms):
    return sorted({form for form in forms if len(form) >= MIN_SECRET_CHARACTERS}, key=len, reverse=True)


# --- The listener's machinery -------------------------------------------------------------


WAIT_SLICE_SECONDS = 0.5  # how soon Ctrl-C is seen while waiting for the browser
MAX_CALLBACK_REQUEST_BYTES = 16 * 1024  # a browser's GET is a few hundred bytes
MAX_PENDING_CONNECTIONS = 64  # idle ones beyond this are dropped, oldest first (select's limits)


class CallbackListener:
    """Receives the browser's redirect on the host and port of the redirect URI (doc step 4).

    It listens on loopback only (RFC 8252 §8.3), so no other machine can send it a code.
    One thread and `select`: a connection that opens and sends nothing (a browser's
    pre-connect) just sits there, so it can never hold up the real callback. On a POSIX
    terminal it also takes the redirect pasted (the browser may be on another machine, as
    over SSH); with `listen` false (--manual) it takes only that.
    """

    def __init__(self, redirect_uri, stdin=None, console=None, listen=True):
        parts = urllib.parse.urlsplit(redirect_uri)
        self.path, self.sockets, self.redirect_uri = parts.path or "/", [], redirect_uri
        self.announcement = "No listener (--manual): the redirect is read from this terminal."
        if listen:
            self._listen(parts)
        can_paste = stdin is not None and (not listen or os.name == "posix" and _isatty(stdin))
        self.paste = Paste(stdin, self.redirect_uri, console) if can_paste else None

    def _listen(self, parts):
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
            parts._replace(netloc="{}:{}".format(_bracketed(parts.hostname), port)))
        self.announcement = "Listening for callback at " + self.redirect_uri

    def close(self):
        for sock in self.sockets:
            sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait(self, check, timeout=CALLBACK_TIMEOUT_SECONDS, on_stray=None):
        """Serve until a request to the callback path arrives (or a paste of it); return
        `check(query)`. Each request is answered as handle_callback says before this
        returns or raises. Where stdin cannot be waited on (--manual on Windows), the wait
        for a paste is unbounded; Ctrl-C ends it."""
        import select  # here: only a sign-in listens

        if not self.sockets:
            self.paste.console.note("\nPaste the address your browser was redirected to (the page will not load; "
                                    "that is expected), then press Enter:")
        deadline = time.monotonic() + timeout
        pending = {}  # connection -> the bytes of its request head so far
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not self.sockets:
                    raise FlowError("No address was pasted within {:g} s (GLEAN_CALLBACK_TIMEOUT sets the limit "
                                    "in seconds).".format(timeout))
                if remaining <= 0:
                    raise FlowError(
                        "No callback reached {} within {:g} s. Check that this redirect URI "
                        "is registered on your static client and that sign-in finished in "
                        "the browser (GLEAN_CALLBACK_TIMEOUT sets the limit in seconds)."
                        .format(self.redirect_uri, timeout)
                    )
                pasting = self.paste and not self.paste.ended
                if not self.sockets and not pasting:
                    raise FlowError("No address was pasted.")
                watched = self.sockets + list(pending) + ([self.paste] if pasting else [])
                # In slices: on Windows, Ctrl-C does not interrupt select() (CPython issue 79115).
                readable = [self.paste] if not self.sockets and (self.paste.fd is None or os.name != "posix") \
                    else select.select(watched, [], [], min(remaining, WAIT_SLICE_SECONDS))[0]
                for sock in readable:
                    if sock is self.paste:
                        code = self.paste.read(check)
                        if code is not None:
                            return code
                    elif sock in self.sockets:
                        _accept(sock, pending)
                    elif sock in pending:  # else dropped above, in this same pass, to make room
                        head = _read_head(sock, pending)
                        code = None if head is None else self._answer(sock, head, check, on_stray)
                        if code is not None:
                            return code
        finally:
            for conn in pending:
                conn.close()

    def _answer(self, conn, head, check, on_stray):
        """Answer one request as handle_callback says; return the code when it was the callback."""
        if b"\r\n\r\n" not in head:
            _respond(conn, "431 Request Header Fields Too Large", "Request too large\n")
            return None
        status, page, outcome = handle_callback(*_parse_request_head(head), callback_path=self.path, check=check,
                                                on_stray=on_stray)
        _respond(conn, status, page, "Allow: GET\r\n" if status.startswith("405") else "")
        if isinstance(outcome, FlowError):
            raise outcome
        return outcome

    def say_how_to_reach(self, console, environ):
        """On stderr: that the redirect can be pasted here too, and over SSH the one command
        that lets a browser on the user's own machine reach this listener."""
        if self.sockets and self.paste is not None:
            console.note("(Or paste here the address your browser was redirected to, if it cannot reach this "
                         "machine.)")
        if self.sockets and (environ.get("SSH_CONNECTION") or environ.get("SSH_TTY")):
            address, port = self.sockets[0].getsockname()[:2]  # the tunnel's far end: where the listener is
            fields = environ.get("SSH_CONNECTION", "").split()  # client address, client port, server address, port
            user = environ.get("USER") or environ.get("LOGNAME")
            host = (user + "@" if user else "") + (fields[2] if len(fields) == 4 else "THIS_HOST")
            ssh_port = " -p " + fields[3] if len(fields) == 4 and fields[3] != "22" else ""
            console.note("Over SSH: on the machine with the browser, run this first, then open the URL there:\n"
                         "  ssh -N -L {0}:{1}:{0}{2} {3}".format(port, _bracketed(address), ssh_port, host))


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
        raise FlowError("Cannot listen on {}: {}.".format(address, _why(error)))


def _accept(sock, pending):
    """Take a new connection into `pending`, dropping the oldest idle one over the bound."""
    try:
        conn, _ = sock.accept()
    except OSError:  # the peer gave up before we took it
        return
    conn.setblocking(False)
    if len(pending) >= MAX_PENDING_CONNECTIONS:
        oldest = next(iter(pending))  # dicts keep insertion order
        del pending[oldest]
        oldest.close()
    pending[conn] = b""


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


class Paste:
    """The redirect address, pasted: with --manual, and beside the listener when stdin is a
    terminal (the browser may be on another machine, as over SSH). A paste that is not this
    run's redirect says what is wrong, and the wait goes on."""

    def __init__(self, stdin, redirect_uri, console):
        self.stdin, self.redirect_uri, self.console = stdin, redirect_uri, console
        self.buffer, self.ended = b"", False
        try:
            self.fd = stdin.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):
            self.fd = None  # a stream of this process's own (a test's): read a line at a time

    def fileno(self):
        return self.fd

    def read(self, check):
        """Take what stdin has (select found it readable, or it cannot be waited on); return
        the code of the first complete line that is this run's redirect, else None. What is
        read is bytes, so a partial line never blocks and a paste that is not UTF-8 is only
        not an address."""
        data = os.read(self.fd, 4096) if self.fd is not None else self.stdin.readline().encode("utf-8", ENV_ERRORS)
        self.ended = not data
        self.buffer += data if data else b"\n"
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            code = self.take(line, check)
            if code is not None:
                return code
        return None

    def take(self, line, check):
        """The code from one pasted line, or None, after saying what was wrong with it."""
        try:
            pasted = line.decode("utf-8").strip().strip("'\"<>").strip()
            parts, expected = urllib.parse.urlsplit(pasted), urllib.parse.urlsplit(self.redirect_uri)
        except ValueError:  # not UTF-8, or an unclosed [IPv6 address
            pasted, parts = "?", None
        if not pasted:
            return None
        params = urllib.parse.parse_qs(parts.query) if parts else {}
        if not parts or parts.path != (expected.path or "/") or not ("state" in params or "error" in params):
            self.console.problem("That is not the address the browser was redirected to. Paste the whole address "
                                 "from the browser's address bar after sign-in: it starts with {}?".format(
                                     self.redirect_uri))
            return None
        try:
            return check(parts.query)
        except StrayCallback as error:
            self.console.problem("{} Still waiting.".format(error))
            return None


BROWSER_WAIT_SECONDS = 2  # long enough for a BROWSER command that fails at once to say so


def open_browser(url, environ):
    """Open `url` in the user's browser where there is a graphical one, or BROWSER says
    which, or on WSL in Windows' own (windows_browser); never a text browser in this
    terminal. Returns the note to show: that it was opened, or that the browser command
    failed; None when no browser was tried."""
    import webbrowser  # here: it is slow to import and only this step needs it

    opened = "(Opened it in your browser.)"
    release = os.uname().release.lower() if hasattr(os, "uname") else ""
    if not environ.get("BROWSER") and (environ.get("WSL_DISTRO_NAME") or "microsoft" in release):
        browser, url, name = windows_browser(webbrowser, url)
        if browser is None:
            return "(WSL: neither wslview nor powershell.exe is on PATH to open your Windows browser; open the URL " \
                   "above there: WSL2 forwards 127.0.0.1 to this listener. Or paste the address here.)"
        opened = "(Opened it in your Windows browser{}; WSL2 forwards 127.0.0.1, so its redirect reaches this " \
                 "listener.)".format(name)
    else:
        try:
            browser, name = webbrowser.get(), " with BROWSER=" + environ["BROWSER"] if environ.get("BROWSER") else ""
        except webbrowser.Error:
            return None
        if isinstance(browser, webbrowser.GenericBrowser) and not environ.get("BROWSER"):
            return None  # lynx, w3m and the like: they would take over the terminal
    # Some browsers (and BROWSER commands) only return when closed: wait a moment for a
    # verdict, not for them.
    outcome = []
    opener = threading.Thread(target=lambda: outcome.append(_open_quietly(browser, url)), daemon=True)
    opener.start()
    opener.join(BROWSER_WAIT_SECONDS)
    if outcome == [False]:
        return "(Could not open a browser{}; open the URL above yourself.)".format(name)
    return opened


def windows_browser(webbrowser, url):
    """On WSL, Windows' browser: `(browser, url as it must be given to it, " with <program>")`
    by wslview, else by powershell.exe's Start-Process, the URL in single quotes (where
    PowerShell reads '' as ' and nothing else specially); (None, url, "") with neither."""
    import shutil

    if shutil.which("wslview"):
        return webbrowser.GenericBrowser(["wslview", "%s"]), url, " with wslview"
    if shutil.which("powershell.exe"):
        command = ["powershell.exe", "-NoProfile", "-Command", "Start-Process '%s'"]
        return webbrowser.GenericBrowser(command), url.replace("'", "''"), " with powershell.exe"
    return None, url, ""


def _open_quietly(browser, url):
    try:
        return browser.open(url)
    except Exception:  # a browser that cannot start is only a missed convenience
        return False


# --- Plumbing: HTTP -----------------------------------------------------------------------


# Every request of a run goes through http_request, so the kept-alive connection, the
# deadline, the size limit, the no-redirect rule and the User-Agent live in one place.
class Response:
    """An HTTP answer from `url`: `status`, `headers` (case-insensitive `get`) and the `body` bytes."""

    def __init__(self, status, headers, body, url=None):
        self.status, self.headers, self.body, self.url = status, headers, body, url

    def failed(self, redact=(), oauth=False, what=None):
        """The example's fetchJson error, `Request to <url> failed (<status>): <body>` (the body
        less `redact`, on one line, cut short), or `Response from <url> (<status>) <what>:
        <body>`; with `oauth`, an RFC 6749 §5.2 error answer is `token request failed
        (<status>): <error>: <description>`. The error keeps the answer's headers and body."""
        code, said = _oauth_error(self.body, redact) if oauth else (None, None)
        error = FlowError("token request failed ({}): {}".format(self.status, said) if said else (
            "Response from {} ({}) {}: " if what else "Request to {} failed ({}){}: ").format(
                self.url, self.status, what or "") + excerpt(self.body, redact), status=self.status, oauth_error=code)
        error.headers, error.body = self.headers, self.body
        return error

    def json_object(self, redact=(), oauth=False):
        """The Response's body parsed as a JSON object (an Answer: it knows its url and headers);
        FlowError (showing it less `redact`, and keeping the headers) when it is anything else,
        or with `oauth`, a token response without an access_token."""
        try:
            value = parse_json(self.body.decode("utf-8"))
        except ValueError:  # also UnicodeDecodeError
            value = None
        if not isinstance(value, dict):
            raise self.failed(redact, what="is not a JSON object")
        if oauth and not (isinstance(value.get("access_token"), str) and value["access_token"]):
            raise FlowError("The token response from {} has no access_token: {}".format(self.url, excerpt(
                self.body, redact)))
        answer = Answer(value)
        answer.url, answer.headers, answer.body, answer.received_at = self.url, self.headers, self.body, time.time()
        return answer


MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # far above any token or chat answer
MAX_LINE_BYTES = 1024 * 1024  # one line of a streamed answer
MAX_STREAM_BYTES = 64 * 1024 * 1024  # a whole streamed answer: deltas repeat their envelope
USER_AGENT = "glean-oauth/{} Python/{}.{}".format(__version__, *sys.version_info[:2])


class Deadline:
    """When a request must be done by, and the setting that sets that limit (named in
    the error). Each read on the socket may only wait for what is left of it, so a
    server that drips one byte at a time cannot stretch a request past it."""

    def __init__(self, seconds, setting="GLEAN_HTTP_TIMEOUT"):
        self.setting = setting
        self.at = time.monotonic() + seconds

    def remaining(self, waiting_for="an answer"):
        """Seconds left; Expired(`waiting_for`) when there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise Expired(waiting_for)
        return left


class Expired(TimeoutError):
    """A request's deadline ran out while it waited for `waiting_for`: "name resolution",
    "connect" or "an answer"."""

    def __init__(self, waiting_for):
        super().__init__(waiting_for)
        self.waiting_for = waiting_for


def http_request(url, data=None, headers=None, deadline=None, on_line=None, limit=None):
    """Send one request (a POST when `data` is given) on the origin's kept-alive
    connection; return its Response.

    `deadline` (a Deadline, or seconds from now: default 30) bounds the
    whole request: connect, TLS, status line, headers and body. With `on_line`, the
    body is read a line at a time as it arrives and each line is handed to
    `on_line(line, deadline)`, which may move the deadline (a streamed answer); the
    Response's body is then empty.

    Any status comes back, except a redirect, which raises FlowError naming where it
    pointed. Raises FlowError when no answer comes in time, when the connection fails,
    or when the body is over `limit` bytes (default MAX_RESPONSE_BYTES).
    """
    deadline = deadline if isinstance(deadline, Deadline) else Deadline(deadline or HTTP_TIMEOUT_SECONDS)
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
        if 300 <= response.status < 400:  # its Location kept for doctor --probe, never followed
            redirected = FlowError(
                "Request to {} was redirected ({}) to {}; not following it, since no "
                "credential may go to another address. Check GLEAN_BACKEND_URL.".format(
                    url, response.status, one_line(response.getheader("Location") or "nowhere")),
                status=response.status)
            redirected.headers = response.headers
            raise redirected
        if on_line and 200 <= response.status < 300:
            _read_lines(response, url, deadline, on_line)
            body = b""
        else:
            body = _read_limited(response, url, limit or MAX_RESPONSE_BYTES)
        # Reused only when this answer was read to the end its framing gives (its length,
        # or its last chunk) and neither side asked to close: else the next request on it
        # could read the rest of this one as its answer.
        if response.isclosed() and not response.length and not response.will_close:
            _keep(origin, conn)
            conn = None
        return Response(response.status, response.headers, body, url)
    except (TimeoutError, OSError) as error:  # socket.timeout and ssl.SSLError are OSErrors
        raise FlowError("Request to {} failed: {}".format(url, _reason(error, deadline)))
    except (ValueError, UnicodeError):  # its message would echo the header value: a credential, maybe
        raise FlowError("Request to {} cannot be sent: a header holds characters HTTP does not allow.".format(url))
    except _http_client().HTTPException as error:
        raise FlowError("Request to {} failed: the answer is not valid HTTP ({}).".format(
            url, one_line(type(error).__name__ + (": " + str(error) if str(error) else ""))))
    finally:
        if conn is not None:
            conn.close()  # half-read or failed: never reused


def _http_client():
    import http.client  # here: a token still valid needs no network, and this costs 10 ms

    return http.client


class _Pool:
    """The kept-alive connections of one process: (scheme, host, port) -> idle connections."""

    def __init__(self):
        self.pid = os.getpid()
        self.idle = {}
        self.lock = threading.Lock()  # TokenProvider may be called from several threads


_pool = None


def _this_process_pool():
    """The pool of this process. After fork() the child starts an empty one: a connection
    its parent opened is one TLS stream, and two processes writing to it break it for both."""
    global _pool
    if _pool is None or _pool.pid != os.getpid():
        _pool = _Pool()  # the parent's connections are dropped here, never used or closed on the wire
    return _pool


def _keep(origin, conn):
    pool = _this_process_pool()
    with pool.lock:
        pool.idle.setdefault(origin, []).append(conn)


def _connection(origin, deadline):
    """An idle connection to `origin` that the server has not closed, else a new one."""
    pool = _this_process_pool()
    while True:
        with pool.lock:
            conn = pool.idle.get(origin, []) and pool.idle[origin].pop()
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
    conn._create_connection = functools.partial(_open_socket, deadline)  # what connect() calls
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


def _open_socket(deadline, address, *unused):
    """A TCP connection to `address` (host, port) within `deadline`: the name resolved in
    a thread joined with the time left (getaddrinfo has no timeout of its own), then
    each address tried with the time that is left, not the whole timeout each."""
    import socket

    host, port = address
    addresses = _resolve(host, port, deadline)
    error = OSError("{} has no address".format(host))
    for family, kind, proto, _, sockaddr in addresses:
        left = deadline.remaining("connect")
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(sockaddr)
            return sock
        except socket.timeout:
            sock.close()
            error = Expired("connect")
        except OSError as failed:  # refused, unreachable: the next address may answer
            sock.close()
            error = failed
    raise error


def _resolve(host, port, deadline):
    """getaddrinfo for `host`, bounded by `deadline`; at once for an IP address."""
    import socket

    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except (OSError, ValueError):
            continue
    outcome = []

    def resolve():
        try:
            outcome.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except Exception as error:  # gaierror, UnicodeError for a bad name: reported below
            outcome.append(error)

    resolver = threading.Thread(target=resolve, daemon=True)  # left behind when it takes too long
    resolver.start()
    resolver.join(deadline.remaining("name resolution"))
    if not outcome:
        raise Expired("name resolution")
    if isinstance(outcome[0], Exception):
        raise outcome[0] if isinstance(outcome[0], OSError) else OSError(str(outcome[0]))
    return outcome[0]


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
        raise FlowError("HTTPS_PROXY must be http://HOST:PORT (a plain-HTTP proxy that tunnels with CONNECT; "
                        "percent-encode / ? # @ in its user name or password), not {}.".format(
                            _without_userinfo(proxy)), EXIT_USAGE)
    return parts


def _proxy_headers(proxy):
    """Proxy-Authorization for a proxy URL with user:password (Basic, RFC 7617)."""
    if proxy.username is None:
        return {}
    pair = urllib.parse.unquote(proxy.username) + ":" + urllib.parse.unquote(proxy.password or "")
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")}


def _without_userinfo(url):
    """`url` for messages, with everything up to its last @ removed but the scheme: a
    password may hold / ? or #, so the userinfo cannot be told from a path with certainty,
    and no part of it may be shown."""
    head, at, rest = url.rpartition("@")
    if not at:
        return url
    return (head.split("//", 1)[0] + "//" if "//" in head else "") + rest


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
                else _why(error)
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
    return _response_class()(_TimedSocket(sock, deadline), *args, **kwargs)


MAX_INTERIM_ANSWERS = 16  # 1xx answers before the real one; servers send one or two


@functools.lru_cache(maxsize=None)
def _response_class():
    """http.client's response, but an interim answer (102 Processing, 103 Early Hints, any
    1xx: RFC 9110 §15.2) is read and dropped like 100 Continue, never taken as the answer
    (which would leave the real one to be read as the answer to the next request)."""
    http_client = _http_client()

    class InterimAnswersSkipped(http_client.HTTPResponse):
        def _read_status(self):
            for _ in range(MAX_INTERIM_ANSWERS):
                version, status, reason = super()._read_status()
                if status == 101:  # this client never asks to switch protocols
                    raise http_client.HTTPException("101 Switching Protocols, never asked for")
                if not 101 < status < 200:
                    return version, status, reason  # 100: begin() drops it itself
                http_client.parse_headers(self.fp)  # its headers, dropped with it
            raise http_client.HTTPException("over {} interim 1xx answers".format(MAX_INTERIM_ANSWERS))

    return InterimAnswersSkipped


def _reason(error, deadline):
    """What went wrong with a connection, in words, with what to do for the common cases."""
    import socket

    if isinstance(error, (TimeoutError, socket.timeout)):
        waiting_for = getattr(error, "waiting_for", "an answer")
        what = "no answer in time" if waiting_for == "an answer" else "{} took too long".format(waiting_for)
        return "{} ({} sets the limit in seconds)".format(what, deadline.setting)
    ssl = sys.modules.get("ssl")
    if ssl and isinstance(error, ssl.CertificateError) or "CERTIFICATE_VERIFY_FAILED" in str(error):
        return ("the server's TLS certificate is not trusted ({}); behind a corporate proxy or CA, "
                "set SSL_CERT_FILE to its CA bundle".format(getattr(error, "verify_message", None) or error))
    return one_line(str(_why(error)))


def _read_limited(response, url, limit):
    """The body of `response`, refusing one over `limit` bytes before it is all read."""
    if response.length is not None and response.length > limit:
        raise FlowError("Response from {} is {} bytes, over the {} byte limit.".format(url, response.length, limit))
    chunks, size = [], 0
    while True:
        chunk = response.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise FlowError("Response from {} is over the {} byte limit.".format(url, limit))
        chunks.append(chunk)


def _read_lines(response, url, deadline, on_line):
    """Hand each line of the body to `on_line` as it arrives, within the size limits."""
    size = 0
    while True:
        line = response.readline(MAX_LINE_BYTES + 1)
        if not line:
            if response.length:  # the connection closed before the Content-Length was reached
                raise _http_client().IncompleteRead(b"", response.length)
            response.read()  # a length-delimited body read to its end: Python < 3.13 leaves it open
            return
        size += len(line)
        if len(line) > MAX_LINE_BYTES:
            raise FlowError("A line from {} is over the {} byte limit.".format(url, MAX_LINE_BYTES))
        if size > MAX_STREAM_BYTES:
            raise FlowError("The stream from {} is over the {} byte limit.".format(url, MAX_STREAM_BYTES))
        on_line(line, deadline)


if __name__ == "__main__":
    sys.exit(cli())
