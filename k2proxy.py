#!/usr/bin/env python3
"""k2proxy: MBZUAI's K2 reasoning models, from the K2Think web site, IFM's API or a self-hosted server, behind the
APIs clients speak (OpenAI chat completions, OpenAI Responses, Anthropic Messages).

One module that reads top to bottom, in sections; each uses only those above it. Contents:

What a request is made of
    settings · errors · tool calls · requests and events (the dialect-neutral request, the Event union of its
    completion, the UpstreamKind seam) · documents (a PDF's text, read in a process of its own)
The upstream side
    upstream wire (what every kind's answers are made of) · site protocol · files · credentials · upstream
    client (one HTTP session, failover: the one driver of attempts) · upstream: the web site · upstream: the
    official API · accounts · models · upstream check
What a process keeps
    monitoring · API keys · stored responses · seals (what a client gives back unread and unchanged)
Replicas (REDIS_URL), a layer the code above does not know about
    shared state (the link to Redis) · replicas (the shared backends, the fleet)
Serving
    app state · request bodies · core (the one request path: Renderer and Writer seams) · dialect: OpenAI chat
    completions · dialect: Anthropic Messages · dialect: OpenAI Responses
Operating
    admin API · server · routes and middlewares · processes

aiohttp is the only dependency of the default path (redis, only with REDIS_URL; pypdf, only for PDFs).
"""

import argparse
import asyncio
import base64
import binascii
import bisect
import codecs
import collections
import contextlib
import difflib
import enum
import functools
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import stat
import sys
import tempfile
import time
import typing
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout, ServerDisconnectedError, TCPConnector, WSCloseCode, web

__version__ = "1.0.0"
log = logging.getLogger("k2proxy")
HERE = Path(__file__).resolve().parent


# ─── Settings ────────────────────────────────────────────────────────────────
# One table: defaults, descriptions, parsers. `--help`, the README table and
# `load_settings` all come from it.


class SettingsError(ValueError):
    """A setting that stops start-up; the message names it."""


WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")  # not str.isdigit(), which also takes "²" and "①", which int()
# refuses; at most 18 digits, as no count read here needs more (and int() refuses over 4,300, an upstream's
# header with more would be a 500)


def _text(value):
    return value.strip()


def _int_between(low, high):
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number
    return parse


def _positive(value):
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number") from None
    if not 0 < number < float("inf"):
        raise ValueError("must be a positive number")
    return number


def _boolean(value):
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _one_of(*choices):
    def parse(value):
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return lowered
    return parse


def _csv(value):
    return [item.strip() for item in value.split(",") if item.strip()]


def _pairs(value):
    """name=model-id pairs, comma-separated, as a dict."""
    pairs = {}
    for pair in _csv(value):
        name, sep, model = (part.strip() for part in pair.partition("="))
        if not (sep and name and model):
            raise ValueError(f"'{pair}' is not name=model-id")
        pairs[name] = model
    return pairs


def _model_map(value):
    """claude-id=model-id pairs, where a name may end in * to stand for every id it starts."""
    pairs = _pairs(value)
    for name in pairs:
        if "*" in name[:-1]:
            raise ValueError(f"'{name}': * may only end a name")
    return pairs


def _url(value):
    value = value.strip().rstrip("/")
    if value and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _url_path(value):
    value = value.strip()
    if not re.fullmatch(r"/[A-Za-z0-9_\-/]*", value) or "//" in value:
        raise ValueError("must be a path like /admin")
    return value.rstrip("/") or "/admin"


UPSTREAM_KINDS = ("site", "api")


def _upstream_order(value):
    """Upstream kinds in the order requests try them; empty: chosen at start-up."""
    kinds = _csv(value.lower())
    if any(kind not in UPSTREAM_KINDS for kind in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError("must be site, api, or both in an order such as api,site")
    return kinds


def _log_level(value):
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    parse: typing.Callable[[str], typing.Any]
    help: str
    secret: bool = False


MAX_REQUEST_LOG = 10000  # entries: a whole log is then a few MB of JSON, made in tens of milliseconds
BODY_MEMORY_FACTOR = 3   # what reading a body takes for each byte of it: its buffer with room to grow, its text

SETTINGS = (
    Setting("HOST", "0.0.0.0", _text, "Address to listen on"),
    Setting("PORT", "8001", _int_between(1, 65535), "Port to listen on"),
    Setting("VALID_API_KEY", "", _csv,
            "API keys clients must send, comma-separated; empty: a key is generated, kept in GENERATED_KEY_FILE "
            "and printed at start-up", True),
    Setting("ADMIN_KEY", "", _text, "Key for the admin page and API; empty: the first API key", True),
    Setting("GENERATED_KEY_FILE", "k2proxy_key.txt", _text,
            "Where the key generated when VALID_API_KEY is empty is kept (0600), so that it survives restarts"),
    Setting("COMPACTION_KEY", "", _text,
            "The secret that seals compaction items (at least 32 characters); empty: one is generated, kept in "
            "COMPACTION_KEY_FILE (0600) and, with REDIS_URL, shared by the replicas", True),
    Setting("COMPACTION_KEY_FILE", "k2proxy_compaction_key.txt", _text,
            "Where the compaction key generated when COMPACTION_KEY is empty is kept (0600)"),
    Setting("API_KEYS_FILE", "api_keys.txt", _text,
            "Named API keys with limits, one per line: name:key [rpm=N] [concurrent=N]; watched like the token file"),
    Setting("METRICS_KEY", "", _text,
            "Another key for GET /metrics (a Bearer token), for a scraper that should not hold the admin key; the "
            "admin key works too", True),
    Setting("REQUEST_LOG_SIZE", "500", _int_between(0, MAX_REQUEST_LOG),
            f"Requests kept in memory for GET /admin/requests and the admin page (at most {MAX_REQUEST_LOG})"),
    Setting("UPSTREAM", "", _upstream_order,
            "Which upstream serves: site (the K2Think web site), api (IFM's API or a self-hosted vLLM/SGLang server), "
            "or an order such as api,site, where each request takes the first with a usable credential; empty: api "
            "when an IFM key is configured, else site"),
    Setting("IFM_API_KEY", "", _csv, "Keys of IFM's API, comma-separated (more in IFM_KEYS_FILE)", True),
    Setting("IFM_KEYS_FILE", "ifm_keys.txt", _text,
            "Keys of IFM's API, one per line; watched like the token file, editable on the admin page"),
    Setting("IFM_BASE_URL", "https://api.ifm.ai/v1", _url,
            "The OpenAI-compatible API: IFM's, or a self-hosted vLLM or SGLang server (which may need no key)"),
    Setting("PROXY_MODE", "guest", _one_of("guest", "user"),
            "guest (no account) or user (account tokens from USER_TOKENS_FILE)"),
    Setting("K2THINK_BASE_URL", "https://chat.ifm.ai", _url,
            "Upstream site; every upstream path and the browser headers hang off it"),
    Setting("GUEST_API_URL", "", _url,
            "Full URL of the guest chat endpoint; empty: K2THINK_BASE_URL/api/guest/chat/completions"),
    Setting("USER_API_URL", "", _url,
            "Full URL of the user chat endpoint; empty: K2THINK_BASE_URL/api/chat/completions"),
    Setting("MODELS", "IFM/K2-Horizon-375B-A23B", _csv,
            "Model ids listed by /v1/models, comma-separated (each also as ID-nothink); the first is the default "
            "model"),
    Setting("REASONING_EFFORT", "high", _one_of("low", "medium", "high"),
            "How long the model thinks when a request does not say: low, medium or high"),
    Setting("THINKING_FORMAT", "reasoning_content", _one_of("reasoning_content", "think_tags"),
            "How reasoning reaches clients: the reasoning_content field, or think_tags inline in content"),
    Setting("TOOL_SUPPORT", "true", _boolean, "Emulate OpenAI function calling for requests with tools"),
    Setting("MAX_REQUEST_MB", "32", _positive, "Largest request body accepted, in MB"),
    Setting("MAX_FILE_MB", "10", _positive, "Largest image or file attached to a message, in MB"),
    Setting("MAX_PDF_PAGES", "100", _int_between(1, 100000),
            "Pages of a PDF read into the conversation; the text says where it stopped"),
    Setting("MAX_PDF_CHARS", "400000", _int_between(1000, 100000000),
            "Characters of a PDF's text kept; the text says where it stopped"),
    Setting("PDF_SECONDS", "30", _positive, "Seconds one PDF may take to read (its reader is stopped then: a 400)"),
    Setting("PDF_MEMORY_MB", "256", _positive,
            "Memory a PDF's reader (a process of its own) may take, in MB; counted in MEMORY_BUDGET_MB while it reads "
            "(at most half of it)"),
    Setting("IMAGES", "refuse", _one_of("refuse", "forward"),
            "Images in messages: refuse (a 400 that says the model reads text only) or forward (for an upstream that "
            "reads images)"),
    Setting("REPLAY_CACHE_MB", "16", _positive,
            "Memory for the reasoning of recent answers, sent back to the API for clients that drop it, in MB"),
    Setting("REQUEST_TIMEOUT", "120", _positive, "Seconds to wait for upstream's first byte, and between its frames"),
    Setting("COMPLETION_TIMEOUT", "900", _positive, "Seconds one completion may take in all, streams included"),
    Setting("MAX_ANSWER_MB", "16", _positive, "Largest answer kept for a non-streamed response, in MB"),
    Setting("MEMORY_BUDGET_MB", "384", _positive,
            f"Memory request bodies may take at once, in MB (each counts {BODY_MEMORY_FACTOR} times its size, and what "
            "parsing it takes); a body beyond it waits, then gets a 503"),
    Setting("HEADER_TIMEOUT", "10", _positive, "Seconds a new connection has to send its first request's headers"),
    Setting("BODY_TIMEOUT", "60", _positive,
            "Seconds a request body may take to arrive once its headers have; a slower upload gets a 408"),
    Setting("IDLE_TIMEOUT", "75", _positive, "Seconds an idle keep-alive connection stays open"),
    Setting("MAX_CONNECTIONS", "0", _int_between(0, 1000000),
            "Client connections open at once, more refused at once; 0: three quarters of the open-files limit"),
    Setting("SHUTDOWN_GRACE", "8", _positive,
            "Seconds the requests in flight get to finish after SIGTERM or SIGINT, new connections refused meanwhile; "
            "streams still running then end with an error event (docker stop waits 10 s)"),
    Setting("STALL_TIMEOUT", "60", _positive,
            "Seconds a streaming client may leave what it was sent unread before its stream is cut"),
    Setting("KEEPALIVE_SECONDS", "15", _positive, "Seconds of upstream silence before a stream gets an SSE comment"),
    Setting("USER_TOKENS_FILE", "tokens.txt", _text, "Token file of user mode, one JWT per line"),
    Setting("GUEST_TOKENS_FILE", "tokens_guest.txt", _text,
            "Token file of guest mode (optional; empty means no Authorization)"),
    Setting("MAX_RETRIES", "3", _int_between(0, 20),
            "Further tokens tried when upstream fails before the client got anything"),
    Setting("MAX_TOKEN_FAILURES", "3", _int_between(1, 1000), "Failures in a row that disable a token"),
    Setting("TOKEN_COOLDOWN", "300", _positive, "Seconds before a token disabled by upstream errors is tried again"),
    Setting("ACCOUNTS_FILE", "accounts.txt", _text,
            "Accounts to sign in with (email:password per line); their tokens join the user pool"),
    Setting("SIGNIN_INTERVAL", "2", _positive, "Seconds between two sign-ins, so the site sees no burst"),
    Setting("MODELS_REFRESH", "600", _positive, "Seconds between two model list fetches from upstream in user mode"),
    Setting("MODEL_ALIASES", "", _pairs,
            "More model names, comma-separated alias=model-id pairs (k2=IFM/K2-Horizon-375B-A23B); the old K2-Think "
            "ids are built in"),
    Setting("ANTHROPIC_MODEL_MAP", "", _model_map,
            "Which model serves each claude-... id on /v1/messages, comma-separated claude-id=model-id pairs (* ends "
            "a prefix: claude-haiku-*=IFM/K2-Horizon-375B-A23B-nothink); unmapped claude- ids get the default model"),
    Setting("RESPONSES_STORE_COUNT", "1000", _int_between(0, 1000000),
            "Responses kept for previous_response_id and GET /v1/responses/{id}; 0 keeps none"),
    Setting("RESPONSES_STORE_MB", "32", _positive, "Memory the kept responses may take, in MB; the oldest go first"),
    Setting("RESPONSES_STORE_TTL", "3600", _positive, "Seconds a kept response stays"),
    Setting("CORS_ORIGINS", "*", _csv, "Origins allowed to call /v1 from a browser, comma-separated, or *"),
    Setting("ADMIN_PAGE_PATH", "/admin", _url_path, "Path of the admin page"),
    Setting("LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    Setting("REDIS_URL", "", _text,
            "A Redis that replicas share (redis://host:6379/0; needs pip install -r requirements-redis.txt): key "
            "limits, stored responses, credential state, the request log and admin edits hold across them; empty: "
            "everything stays in this process", True),
    Setting("WORKERS", "1", _int_between(1, 64),
            "Processes serving the one port (SO_REUSEPORT), each a replica; more than 1 needs REDIS_URL"),
)


SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


class Settings:
    """Every setting, parsed once at start-up; attributes are the names in lower case."""

    def __init__(self, values):
        self.__dict__.update(values)

    def public(self):
        """The settings an admin may see: everything but secrets."""
        return {s.name: getattr(self, s.name.lower()) for s in SETTINGS if not s.secret}


def parse_dotenv(text):
    """Reads a .env file: KEY=value lines, comments, quoted values; raises SettingsError on a bad line."""
    values = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SettingsError(f".env line {number}: expected KEY=value")
        value = value.strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.find(quote, 1)
            while quote == '"' and end > 0 and value[end - 1] == "\\":
                end = value.find(quote, end + 1)
            if end < 0:
                raise SettingsError(f".env line {number}: {key} has no closing {quote}")
            value = value[1:end]
            if quote == '"':
                value = value.replace('\\"', '"').replace("\\n", "\n")
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        values[key] = value
    return values


def read_if_there(path):
    """A small file's text, or "" when it cannot be read: for defaults that depend on a file being there."""
    try:
        return Path(path).read_text(encoding="utf-8-sig", errors="replace")
    except OSError:
        return ""


def parse_tokens_file(text):
    """Tokens of a tokens file in order: one per line, blanks and # comments skipped, duplicates once."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            seen.setdefault(token, None)
    return list(seen)


EXAMPLE_KEY = "sk-change-me"  # the placeholder of .env.example, refused as a key


ENV_TYPO_CUTOFF, DOTENV_TYPO_CUTOFF = 0.88, 0.6  # how alike a name must be to a setting to be taken for a typo


def unknown_names(dotenv, environ):
    """Warnings for names that are not settings: every one in .env, and those of the environment (which holds many
    unrelated variables) that are a small edit away from a setting."""
    names = [s.name for s in SETTINGS]
    warnings = []
    for name, where, cutoff in [*((n, ".env", DOTENV_TYPO_CUTOFF) for n in dotenv),
                                *((n, "the environment", ENV_TYPO_CUTOFF) for n in environ)]:
        if name in names:
            continue
        closest = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
        if closest or where == ".env":
            hint = f"; did you mean {closest[0]}?" if closest else ""
            warnings.append(f"{where} sets {name}, which is not a setting{hint} (python k2proxy.py --help lists them)")
    return warnings


def new_key(values=None):
    """A key for one run, which nothing keeps."""
    return "sk-" + secrets.token_urlsafe(32)


def new_seal_key(values=None):
    """A compaction key for one run, which nothing keeps."""
    return secrets.token_urlsafe(SEAL_KEY_BYTES)


SEAL_KEY_BYTES = 32  # of randomness in a generated compaction key
SEAL_KEY_CHARS = 32  # the shortest COMPACTION_KEY taken


def kept_secret(path, fresh, valid, what):
    """The secret kept in `path`, or a `fresh()` one saved there readable by this user only; one for this run
    alone when the file cannot be written."""
    path = Path(path)
    secret = read_if_there(path).strip()
    if valid(secret):
        return secret
    secret = fresh()
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(secret + "\n")
    except OSError as exc:
        print(f"k2proxy: cannot keep the generated {what} in {path} ({exc.strerror}); it is good for this run only",
              file=sys.stderr)
    return secret


def kept_key(values):
    """The generated API key kept in GENERATED_KEY_FILE, or a new one saved there."""
    return kept_secret(values["generated_key_file"], new_key,
                       lambda key: key.startswith("sk-") and len(key.split()) == 1, "key")


def kept_seal_key(values):
    """The generated compaction key kept in COMPACTION_KEY_FILE, or a new one saved there."""
    return kept_secret(values["compaction_key_file"], new_seal_key,
                       lambda key: len(key) >= SEAL_KEY_CHARS and len(key.split()) == 1, "compaction key")


def load_settings(environ, dotenv_text=None, generate_key=new_key, generate_seal_key=new_seal_key):
    """Builds Settings from the environment over .env over defaults; the first bad value raises. Names that look
    like settings but are not are kept as `warnings`. An empty VALID_API_KEY takes `generate_key(settings values)`,
    an empty COMPACTION_KEY `generate_seal_key(settings values)`."""
    dotenv = parse_dotenv(dotenv_text) if dotenv_text else {}
    source = {**dotenv, **environ}
    values = {}
    for setting in SETTINGS:
        raw = source.get(setting.name, setting.default)
        try:
            values[setting.name.lower()] = setting.parse(raw)
        except ValueError as exc:
            shown = "(hidden)" if setting.secret else repr(raw)
            raise SettingsError(f"setting {setting.name}={shown} is invalid: {exc}") from None
    if not values["models"]:
        raise SettingsError("setting MODELS is invalid: needs at least one model id")
    if values["max_request_mb"] * BODY_MEMORY_FACTOR > values["memory_budget_mb"]:
        raise SettingsError(f"setting MEMORY_BUDGET_MB is invalid: a body of MAX_REQUEST_MB takes up to "
                            f"{values['max_request_mb'] * BODY_MEMORY_FACTOR:g} MB, more than the budget")
    for name, keys in (("VALID_API_KEY", values["valid_api_key"]), ("ADMIN_KEY", [values["admin_key"]])):
        if EXAMPLE_KEY in keys:
            raise SettingsError(f"setting {name} is still the placeholder of .env.example; choose a key "
                                "of your own (anyone who reads the example knows this one)")
    values["api_key_generated"] = not values["valid_api_key"]
    if values["api_key_generated"]:
        values["valid_api_key"] = [generate_key(values)]
    values["admin_key"] = values["admin_key"] or values["valid_api_key"][0]
    if values["compaction_key"] and len(values["compaction_key"]) < SEAL_KEY_CHARS:
        raise SettingsError(f"setting COMPACTION_KEY is invalid: it must be at least {SEAL_KEY_CHARS} characters "
                            "(or empty, for a generated one)")
    values["compaction_key_generated"] = not values["compaction_key"]
    values["compaction_key"] = values["compaction_key"] or generate_seal_key(values)
    if values["workers"] > 1 and not values["redis_url"]:
        raise SettingsError(f"setting WORKERS={values['workers']} needs REDIS_URL: the workers are replicas, which "
                            "share key limits, stored responses and credential state through Redis (see "
                            "docs/replicas.md); set REDIS_URL, or WORKERS=1")
    values["warnings"] = unknown_names(dotenv, environ)
    values["upstream"] = values["upstream"] or [
        "api" if values["ifm_api_key"] or parse_tokens_file(read_if_there(values["ifm_keys_file"])) else "site"]
    base = values["k2think_base_url"]
    values["guest_api_url"] = values["guest_api_url"] or base + "/api/guest/chat/completions"
    values["user_api_url"] = values["user_api_url"] or base + "/api/chat/completions"
    return Settings(values)


def settings_help():
    """The settings table printed by --help."""
    width = max(len(s.name) for s in SETTINGS)
    lines = ["settings (environment variables, or KEY=value lines in ./.env):"]
    for s in SETTINGS:
        lines.append(f"  {s.name:<{width}}  {s.help} (default: {s.default or 'empty'})")
    return "\n".join(lines)


# ─── Errors ──────────────────────────────────────────────────────────────────
# What goes wrong, named once. ApiError is what a client is told, in no dialect:
# each front door renders it in its own shape. UpstreamError is what the site
# did, and its Failure kind carries the policy: whether the token is charged,
# whether another token may do better, what status the client gets. The input
# checks every front door uses raise ApiError.

MB = 1024 * 1024


class ApiError(Exception):
    """An error answered to the client with a real HTTP status; `param` names the field at fault."""

    def __init__(self, status, message, param=None, code=None, retry_after=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True)
class Failure:
    """A kind of upstream failure and what follows from it."""
    name: str
    status: int                   # what the client gets
    code: str
    charge: bool                  # counts against the token (MAX_TOKEN_FAILURES disables it); unless refused, only
                                  # where another token is seen working: else it is upstream's outage
    fail_over: bool               # another token may do better, while the client has seen nothing
    retry_anonymous: bool = True  # without tokens, asking again is worth it
    cool_down: bool = False       # the credential rests for Retry-After instead of being charged
    refused: bool = False         # upstream refused the credential itself: its account signs in again
    disables: bool = False        # the credential is disabled at once (an API key that upstream refused)

    @property
    def maybe_upstreams(self):
        """Whether it may be upstream's doing rather than the credential's: charged, but not a refusal."""
        return self.charge and not self.refused


REFUSED_TOKEN = Failure("token refused", 502, "upstream_auth_failed", charge=True, fail_over=True, refused=True)
RATE_LIMITED = Failure("rate limited", 429, "rate_limited", charge=False, fail_over=True, cool_down=True,
                       retry_anonymous=False)
BROKEN = Failure("upstream broken", 502, "upstream_error", charge=True, fail_over=True)
UNREACHABLE = Failure("unreachable", 502, "upstream_unreachable", charge=False, fail_over=False)  # one endpoint
TIMED_OUT = Failure("timed out", 504, "upstream_timeout", charge=True, fail_over=True, retry_anonymous=False)
NO_CONTENT = Failure("no content", 502, "upstream_no_content", charge=True, fail_over=True)
BLOCKED = Failure("blocked", 502, "upstream_blocked", charge=False, fail_over=True)
REJECTED = Failure("bad request", 400, "upstream_rejected", charge=False, fail_over=False)
TOO_LARGE = Failure("too large", 413, "upstream_rejected", charge=False, fail_over=False)
MODEL_GONE = Failure("model not found", 404, "model_not_found", charge=False, fail_over=False)
NOT_AN_ANSWER = Failure("not an answer", 502, "upstream_error", charge=False, fail_over=False)
SHUTTING_DOWN = Failure("shutting down", 503, "shutting_down", charge=False, fail_over=False)
INVALID_JSON = Failure("invalid JSON", 502, "invalid_json_output", charge=False, fail_over=False)
ANSWER_TOO_LARGE = Failure("answer too large", 502, "upstream_answer_too_large", charge=False, fail_over=False)
KEY_REFUSED = Failure("key refused", 502, "upstream_auth_failed", charge=True, fail_over=True, refused=True,
                      disables=True)
BUDGET_SPENT = Failure("daily budget spent", 429, "rate_limited", charge=False, fail_over=True, cool_down=True,
                       retry_anonymous=False)
SERVER_FAILED = Failure("server failed", 502, "upstream_error", charge=False, fail_over=True)
SERVER_OVERLOADED = Failure("overloaded", 503, "upstream_overloaded", charge=False, fail_over=True)
TRUNCATED = Failure("truncated", 502, "upstream_truncated", charge=False, fail_over=True)
MODEL_RETIRED = Failure("model retired", 410, "model_deprecated", charge=False, fail_over=False)


class UpstreamError(Exception):
    """Upstream failed in the way its `failure` names; the message says what happened."""

    def __init__(self, failure, message, retry_after=None):
        super().__init__(message)
        self.failure = failure
        self.retry_after = retry_after

    def without(self, secret):
        """The same error, with `secret` (the credential it was sent with) blanked out of its message."""
        if not secret or secret not in str(self):
            return self
        return UpstreamError(self.failure, str(self).replace(secret, "[redacted]"), self.retry_after)

    def api_error(self):
        retry_after = max(1, round(self.retry_after)) if self.retry_after else None
        return ApiError(self.failure.status, str(self), code=self.failure.code, retry_after=retry_after)


MAX_JSON_DEPTH = 64


def json_depth(value):
    """How deeply a JSON value nests, found without recursion; it stops counting past MAX_JSON_DEPTH."""
    deepest, pending = 0, [(value, 1)]
    while pending and deepest <= MAX_JSON_DEPTH:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            pending += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def not_a_number(name):
    raise ValueError(f"{name} is not a JSON number")


JSON_INT_DIGITS = 4000  # below Python's 4,300-digit limit on int ⇄ str, so that a sum of two still prints


def bounded_int(text):
    """A JSON integer; ValueError for one too long to read or print (usage from a broken upstream)."""
    if len(text) > JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is longer than {JSON_INT_DIGITS}")
    return int(text)


def finite_float(text):
    """A JSON number with a fraction or an exponent as a float; ValueError for one beyond a float (1e400), which
    Python would read as infinity."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:20]} is beyond the largest number JSON values may hold here")
    return value


JSON_DECODER = json.JSONDecoder(parse_constant=not_a_number, parse_float=finite_float, parse_int=bounded_int)
# strict JSON: no NaN or Infinity, written or overflowing, and integers that can be printed


class TooDeep(ValueError):
    """JSON nested more than MAX_JSON_DEPTH levels."""


def loads(text):
    """The value of JSON text; ValueError, never a RecursionError, for text that is not strict JSON or that nests
    more than MAX_JSON_DEPTH levels (arguments a model or a client wrote, answers of upstream)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        value = JSON_DECODER.decode(text)
    except RecursionError:
        raise TooDeep(f"JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    if may_nest_too_deeply(text) and json_depth(value) > MAX_JSON_DEPTH:
        raise TooDeep(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def may_nest_too_deeply(text):
    """Whether JSON text has brackets enough to nest past MAX_JSON_DEPTH (text of a few, as nearly every chunk of
    an upstream's stream, cannot): the count is done in C, the walk of the value in Python."""
    return text.count("{") + text.count("[") > MAX_JSON_DEPTH


def check_arguments(arguments, where):
    """A 400 for a call's arguments (JSON text) nested deeper than a request body may be; other text passes."""
    if isinstance(arguments, str):
        try:
            loads(arguments)
        except TooDeep:
            raise ApiError(400, f"{where}: the arguments' JSON nests more than {MAX_JSON_DEPTH} levels deep",
                           param=where, code="json_too_deep") from None
        except ValueError:
            pass
    return arguments


CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def loggable(text):
    """Text a client chose, as it may stand in a log line: control characters escaped, so none starts a forged
    line."""
    return CONTROL_CHARACTERS.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def expect(condition, message, param, code="invalid_value"):
    """Raises a 400 naming the field when a request check fails."""
    if not condition:
        raise ApiError(400, message, param=param, code=code)


def object_in(value) -> dict:
    """`value` when it is a JSON object, else an empty one: for reading optional fields of what was sent."""
    return value if isinstance(value, dict) else {}


def list_in(value) -> list:
    """`value` when it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def is_number(value) -> typing.TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The field checks below read body[name]; `param` names the field in full when body is nested (thinking.type).

def number_field(body, name, low, high, param=None):
    """body[name] when it is a number in [low, high], None when absent; else a 400."""
    value, param = body.get(name), param or name
    if value is None:
        return None
    expect(is_number(value) and low <= value <= high, f"'{param}' must be a number between {low} and {high}", param)
    return value


def integer_field(body, name, low, param=None):
    """body[name] when it is an integer of at least `low`, None when absent; else a 400."""
    value, param = body.get(name), param or name
    if value is None:
        return None
    expect(isinstance(value, int) and not isinstance(value, bool) and value >= low,
           f"'{param}' must be an integer of at least {low}", param)
    return value


def object_field(body, name, param=None):
    """body[name] when it is an object, {} when absent; else a 400."""
    value, param = body.get(name), param or name
    if value is None:
        return {}
    expect(isinstance(value, dict), f"'{param}' must be an object", param, "invalid_type")
    return value


def one_of_field(body, name, choices, default=None, param=None):
    """body[name] when it is one of `choices`, `default` when absent; else a 400 listing them."""
    value, param = body.get(name), param or name
    if value is None:
        return default
    expect(isinstance(value, str) and value in choices, f"'{param}' must be one of {', '.join(choices)}", param)
    return value


# ─── Tool calls ──────────────────────────────────────────────────────────────
# The model has no native function calling: the proxy describes the tools in a
# system prompt, renders tool history as text, and finds calls in the answer
# as it streams. Text that cannot start a call is released at once. Offers the
# dialects a neutral Tool and ToolPlan to build from their own tool formats.

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_CALL_CHARS = 256 * 1024
TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class ToolPlan:
    """The tools of a request and the choice: "auto", "required", or the name of the tool to call."""
    tools: tuple
    choice: str

    @property
    def names(self):
        return frozenset(tool.name for tool in self.tools)

    @property
    def forced(self):
        """The tools one of which the answer must call: the one named, or all of them for "required"; () for auto."""
        if self.choice == "auto":
            return ()
        return self.tools if self.choice == "required" else tuple(t for t in self.tools if t.name == self.choice)


def check_tool(name, description, parameters, where, parameters_field="parameters"):
    """A Tool from a dialect's fields, or a 400 naming the field at fault."""
    expect(isinstance(name, str) and TOOL_NAME.fullmatch(name), f"{where}.name must be a name of letters, digits, "
           "_ . - (at most 64)", f"{where}.name")
    expect(description is None or isinstance(description, str), f"{where}.description must be a string",
           f"{where}.description", "invalid_type")
    expect(parameters is None or isinstance(parameters, dict), f"{where}.{parameters_field} must be an object",
           f"{where}.{parameters_field}", "invalid_type")
    return Tool(name, description or "", parameters or {"type": "object", "properties": {}})


JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
              "object": (dict,), "null": (type(None),)}


def fits(value, schema):
    """Whether a JSON value fits a tool's parameters as far as their top level says: an object with each required
    property, each property of its declared type (a bool is neither integer nor number) and among its enum values,
    and none other when additionalProperties is false."""
    if not isinstance(value, dict) or not isinstance(schema, dict):
        return False
    properties, required = object_in(schema.get("properties")), list_in(schema.get("required"))
    if any(name not in value for name in required if isinstance(name, str)):
        return False
    if schema.get("additionalProperties") is False and set(value) - set(properties):
        return False
    return all(fits_property(value[name], spec) for name, spec in properties.items() if name in value)


def fits_property(value, spec):
    spec = object_in(spec)
    kinds = spec.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list_in(kinds)
    typed = [JSON_TYPES[kind] for kind in kinds if kind in JSON_TYPES]
    if typed and not any(isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
                         for allowed in typed):
        return False
    return not isinstance(spec.get("enum"), list) or value in spec["enum"]


def tool_plan(tools, choice, enabled, param="tool_choice"):
    """The plan for checked tools and a choice of "auto", "none", "required" or a tool's name; None when no tool
    text is to be sent or parsed."""
    if choice not in ("auto", "none", "required"):
        expect(choice in {tool.name for tool in tools}, f"{param} names the tool '{choice}', which is not in the "
               "request's tools", param)
    if choice == "none" or not enabled or not tools:
        return None
    return ToolPlan(tuple(tools), choice)


def describe_parameters(schema):
    """One line per top-level parameter, with its type, whether it is required and its allowed values; parts of
    the schema that are not what JSON Schema says they are (a list of properties, say) are left out."""
    properties, required = schema.get("properties"), schema.get("required")
    required = {name for name in required if isinstance(name, str)} if isinstance(required, list) else set()
    lines = []
    for name, spec in (properties.items() if isinstance(properties, dict) else ()):
        spec = spec if isinstance(spec, dict) else {}
        kind = spec.get("type", "any")
        line = f"- {name} ({kind if isinstance(kind, str) else 'any'}{', required' if name in required else ''})"
        if isinstance(spec.get("description"), str) and spec["description"]:
            line += f": {spec['description']}"
        if isinstance(spec.get("enum"), list) and spec["enum"]:
            line += " One of: " + ", ".join(json.dumps(v, ensure_ascii=False) for v in spec["enum"])
        lines.append(line)
    return lines


def tool_prompt(plan):
    """The system text that teaches the model the tools and the one reply format the proxy reads."""
    parts = ["You can call tools (functions). These are the tools available:"]
    for tool in plan.tools:
        parts.append(f"\n### {tool.name}")
        if tool.description:
            parts.append(tool.description)
        parts.extend(describe_parameters(tool.parameters))
        parts.append("JSON Schema of the arguments: " + json.dumps(tool.parameters, ensure_ascii=False))
    parts.append(
        "\nTo call a tool, write this block in your answer, one block per call:\n"
        f"{TOOL_CALL_OPEN}\n{{\"name\": \"TOOL_NAME\", \"arguments\": {{...arguments as a JSON object...}}}}\n"
        f"{TOOL_CALL_CLOSE}\n"
        "Use only the tools listed above, with arguments that match their schema. You may call several "
        "tools, one block each. After your calls, stop: the results come back in the next message as "
        "<tool_result> blocks. If no tool is needed, answer normally without any tool_call block.")
    if plan.choice == "required":
        parts.append("In this reply you must call at least one tool.")
    elif plan.choice != "auto":
        parts.append(f"In this reply you must call the tool \"{plan.choice}\".")
    return "\n".join(parts)


def render_call(name, arguments):
    """A past call, written the way the model is told to write calls."""
    try:
        arguments = loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        pass
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def render_tool_result(name, call_id, content, failed=False):
    """A tool's result, as the model is told results come back."""
    error = ' is_error="true"' if failed else ""
    return f'<tool_result name="{name}" tool_call_id="{call_id}"{error}>\n{content}\n</tool_result>'


def normalise_call(item, names):
    """(name, arguments as a JSON string) of one call the model wrote, or None when it is not a valid call."""
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):
        item = item["function"]
    name, arguments = item.get("name"), item.get("arguments", item.get("parameters", {}))
    if name not in names:
        return None
    if isinstance(arguments, str):
        try:
            arguments = loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def calls_in(value, names):
    """The calls in a parsed block: one call, a list of calls, or {"tool_calls": [...]}; None if any is invalid."""
    if isinstance(value, dict) and "tool_calls" in value:
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    calls = [normalise_call(item, names) for item in items]
    return calls if calls and all(calls) else None


@dataclass(frozen=True)
class ToolCall:
    """A call found in the answer: the tool's name and its arguments as a JSON object's text."""
    name: str
    arguments: str


@dataclass(frozen=True)
class Opt:
    text: str


# Openings of the call forms models write, as steps: a literal, a tuple of alternatives, Opt(literal),
# WS (any blanks) or NAME (a tool name). They are matched against text that may still be incomplete.
WS, NAME = "ws", "name"
CALL_OPENINGS = {
    "tag": [TOOL_CALL_OPEN, WS, ("{", "[", "```")],  # prose that names the tag is not held back
    "fence": ["```", Opt("json"), WS, "{", WS, '"tool_calls"'],
    "inline": ["{", WS, '"tool_calls"'],
    "natural": ["调用函数", WS, (":", "："), WS, NAME, WS, "参数", WS, (":", "："), WS, "{"],
}
CALL_TRIGGERS = re.compile(r"[<`{调]")
FENCED_BODY = re.compile(r"\s*```[A-Za-z]*\s*(.*?)\s*```\s*", re.DOTALL)  # <tool_call>```json {...}```</tool_call>


def match_opening(text, start, steps):
    """('yes', end, name) when text[start:] opens a call, ('maybe', ...) when it still could, else ('no', ...)."""
    at, name = start, None
    for step in steps:
        if step == WS:
            while at < len(text) and text[at].isspace():
                at += 1
            if at == len(text):
                return "maybe", at, name
        elif step == NAME:
            end = at
            while end < len(text) and (text[end].isalnum() or text[end] in "_.-"):
                end += 1
            if end == len(text):
                return "maybe", end, name
            if end == at:
                return "no", at, name
            name, at = text[at:end], end
        else:
            options = (step.text,) if isinstance(step, Opt) else step if isinstance(step, tuple) else (step,)
            found = next((o for o in options if text.startswith(o, at)), None)
            if found:
                at += len(found)
            elif any(o.startswith(text[at:]) for o in options) and len(text) - at < max(map(len, options)):
                return "maybe", at, name
            elif not isinstance(step, Opt):
                return "no", at, name
    return "yes", at, name


@dataclass
class OpenCall:
    """A tool call the scanner saw open and reads on: its form and tool name, where its JSON body starts, how far
    the scan of that body has come (brace depth, inside a string, after a backslash), and where it ends."""
    kind: str
    name: str | None
    body: int
    scan: int
    depth: int = 0
    string: bool = False
    escape: bool = False
    end: int | None = None


class ToolCallScanner:
    """Finds tool calls in the streamed answer; yields text pieces and ToolCall objects in order."""

    def __init__(self, names):
        self.names = names
        self._buf = ""
        self._call: OpenCall | None = None

    def feed(self, text):
        self._buf += text
        out: list[str | ToolCall] = []
        while self._buf:
            if self._call is None and not self._scan_text(out):
                break
            if self._call is not None and not self._scan_call(out, self._call):
                break
        return out

    def finish(self):
        out: list[str | ToolCall] = []
        if self._call is not None:
            self._settle(out, self._call, len(self._buf), complete=False)
        if self._buf:
            out.append(self._buf)
            self._buf = ""
        return out

    def _scan_text(self, out):
        """Releases text up to the next possible call opening; False when the rest must wait."""
        position = 0
        while True:
            found = CALL_TRIGGERS.search(self._buf, position)
            if not found:
                out.append(self._buf)
                self._buf = ""
                return False
            start = found.start()
            verdicts = {kind: match_opening(self._buf, start, steps) for kind, steps in CALL_OPENINGS.items()}
            opened = next(((kind, end, name) for kind, (verdict, end, name) in verdicts.items()
                           if verdict == "yes"), None)
            if opened:
                out.append(self._buf[:start])
                self._buf = self._buf[start:]
                kind, end, name = opened
                body_start = {"tag": len(TOOL_CALL_OPEN), "natural": end - start - 1}.get(kind)
                if body_start is None:
                    body_start = self._buf.index("{")
                self._call = OpenCall(kind, name, body_start, body_start)
                return True
            if any(verdict == "maybe" for verdict, _, _ in verdicts.values()):
                out.append(self._buf[:start])
                self._buf = self._buf[start:]
                return False
            position = start + 1

    def _scan_call(self, out, call):
        if call.kind == "tag":
            index = self._buf.find(TOOL_CALL_CLOSE, call.scan)
            if index < 0:
                call.scan = max(call.body, len(self._buf) - len(TOOL_CALL_CLOSE) + 1)
                return self._too_long(out)
            body = self._buf[call.body:index]
            fenced = FENCED_BODY.fullmatch(body)
            return self._settle(out, call, index + len(TOOL_CALL_CLOSE), body=fenced.group(1) if fenced else body)
        if call.end is None and not self._balance(call):
            return self._too_long(out)
        if call.kind == "fence":
            verdict, end, _ = match_opening(self._buf, call.end, [WS, "```"])
            if verdict == "maybe":
                return False
            return self._settle(out, call, end if verdict == "yes" else call.end)
        return self._settle(out, call, call.end)

    def _balance(self, call):
        """Scans the JSON object for its closing brace, strings and escapes included; True once found."""
        text, at = self._buf, call.scan
        depth, string, escape = call.depth, call.string, call.escape
        while at < len(text):
            char = text[at]
            at += 1
            if string:
                if escape:
                    escape = False
                elif char == "\\":
                    escape = True
                elif char == '"':
                    string = False
            elif char == '"':
                string = True
            elif char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    call.end = at
                    return True
        call.scan, call.depth, call.string, call.escape = at, depth, string, escape
        return False

    def _too_long(self, out):
        if len(self._buf) > MAX_CALL_CHARS:
            out.append(self._buf)
            self._buf, self._call = "", None
        return False

    def _settle(self, out, call, consumed, body=None, complete=True):
        """Turns the call text into ToolCalls, or releases it as text when it is not a valid call."""
        raw = self._buf[:consumed]
        self._call, self._buf = None, self._buf[consumed:]
        if body is None:
            body = raw[call.body:call.end or consumed]
        try:
            value = loads(body)
        except ValueError:
            value = None
        if call.kind == "natural":
            value = {"name": call.name, "arguments": value}
        calls = calls_in(value, self.names) if value is not None else None
        if not calls:
            out.append(raw)
            return True
        for name, arguments in calls:
            out.append(ToolCall(name, arguments))
        return complete


# ─── Requests and events ─────────────────────────────────────────────────────
# A completion request in no client's dialect, and the events its completion
# produces. Offers the front doors: checks of what the model can read (images,
# text files), Transcript (a conversation's Turns, built turn by turn),
# sampling, AnswerFormat, CoreRequest; and the upstream kinds: the events they
# yield (Reasoning, Text, ToolCallStart, ToolArguments, Finish, and Attempt and
# Restart between attempts), and Answer for whole responses.

TEXT_FILE_EXTENSIONS = frozenset("""
    txt text md markdown rst csv tsv json jsonl ndjson yaml yml toml ini cfg conf env properties log xml html htm
    css scss js mjs cjs ts tsx jsx vue svelte py pyi ipynb java kt kts scala groovy gradle c h cc cpp cxx hpp cs
    go rs rb php pl pm lua r m swift dart sh bash zsh fish ps1 bat cmd sql graphql proto tex bib srt vtt diff
    patch dockerfile makefile cmake gitignore""".split())
TEXT_MEDIA_TYPES = re.compile(r"text/.*|application/(json|ld\+json|xml|x-yaml|yaml|toml|javascript|"
                              r"x-javascript|typescript|x-sh|x-python|sql|x-tex|csv|x-ndjson)")
DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[^;,]*)*(;base64)?,(.*)", re.S)
CHARS_PER_TOKEN = 4  # the estimate of usage when upstream gives none


def too_large(where, limit):
    return ApiError(413, f"{where} is larger than MAX_FILE_MB ({limit / MB:g} MB)", param=where, code="file_too_large")


def decode_base64(payload, where, limit):
    """The bytes of base64 text, with 413 over `limit` and 400 when it is not base64."""
    if len(payload) * 3 // 4 > limit + 3:
        raise too_large(where, limit)
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where} does not hold valid base64 data", param=where, code="invalid_base64") from None
    if len(raw) > limit:
        raise too_large(where, limit)
    return raw


def decode_data(data, where, limit) -> tuple[str, bytes]:
    """(media type, bytes) of a data: URL or bare base64, with 413 over `limit` and 400 for bad base64."""
    found = DATA_URL.fullmatch(data)
    if found and not found.group(2):
        raw = urllib.parse.unquote_to_bytes(found.group(3))
        if len(raw) > limit:
            raise too_large(where, limit)
        return (found.group(1) or "").lower(), raw
    media, payload = ((found.group(1) or ""), found.group(3)) if found else ("", data)
    return media.lower(), decode_base64(payload, where, limit)


@dataclass(frozen=True)
class FileLimit:
    """What a message may attach: files up to MAX_FILE_MB, and images only when IMAGES=forward."""
    bytes: int
    images: bool

    @classmethod
    def of(cls, settings):
        return cls(int(settings.max_file_mb * MB), settings.images == "forward")


def image_part(url, where, limit):
    """An image as upstream takes it: a valid image data: URL or an http(s) URL, passed as it is; refused unless
    IMAGES=forward, since K2 Horizon reads text only (and a chat template blanks what is not text)."""
    if not limit.images:
        raise ApiError(400, f"{where} is an image, and K2 Horizon reads text only: it cannot see images. Send the "
                            "text instead (an operator whose upstream reads images sets IMAGES=forward)",
                       param=where, code="images_not_supported")
    if url.startswith("data:"):
        media, raw = decode_data(url, where, limit.bytes)
        expect(media.startswith("image/"), f"{where} is a data: URL of '{media or 'no type'}', not an image",
               where, "invalid_image")
        expect(raw and re.match(r"data:[^,]*;base64,", url, re.IGNORECASE),
               f"{where} must be a data: URL holding the image in base64 (data:image/png;base64,...)", where,
               "invalid_image")
    else:
        expect(re.match(r"https?://\S+$", url), f"{where} must be a data: URL or an http(s) URL of an image",
               where, "invalid_image")
    return {"type": "image_url", "image_url": {"url": url}}


def text_file(name, media, raw, where):
    """A text file, inlined as a fenced block headed by its name; a PDF, a part to read (see Documents); another
    binary file is a 400 naming it."""
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else name.lower()
    if media == PDF_MEDIA or extension == "pdf":
        expect(PDF_HEADER in raw[:PDF_HEADER_ZONE], f"{where}: the file '{name}' is said to be a PDF, but it is not "
               "one (it does not open with %PDF-)", where, "invalid_pdf")
        return {"type": "pdf", "name": name, "data": raw, "where": where}
    text = None
    if extension in TEXT_FILE_EXTENSIONS or TEXT_MEDIA_TYPES.fullmatch(media):
        for encoding in ("utf-8-sig", "utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
            try:
                text = raw.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
    if text is None or "\x00" in text:  # NUL bytes: a binary file, whatever its name says
        raise ApiError(400, f"{where}: the file '{name}' ({media or 'unknown type'}) cannot be read by the model; "
                            "supported are text files in UTF-8 (txt, md, csv, json, code, ...), PDFs with a text "
                            "layer, and images", param=where, code="unsupported_file")
    fence = "`" * max(3, max(map(len, re.findall(r"`+", text)), default=0) + 1)
    return {"type": "text", "text": f"File: {name}\n{fence}\n{text}\n{fence}"}


PDF_MEDIA = "application/pdf"
PDF_HEADER, PDF_HEADER_ZONE = b"%PDF-", 1024  # a PDF opens with its header within its first kilobyte


def text_of(parts):
    return "\n".join(part["text"] for part in parts if part["type"] == "text")


def content_of(parts):
    """Message content as upstream takes it: a string when it is all text, else the list of parts."""
    if all(part["type"] == "text" for part in parts):
        return text_of(parts)
    return parts


@dataclass(frozen=True)
class Call:
    """A tool call in a conversation's history, as the client sent it back."""
    id: str
    name: str
    arguments: object  # the arguments' JSON text, or the object itself


@dataclass(frozen=True)
class Turn:
    """One message of a conversation, in no dialect: what it said (upstream parts) and, for the assistant, the
    reasoning it came with and the calls it made; for a tool's result, the call it answers."""
    role: str                 # system | user | assistant | tool
    parts: tuple = ()         # {"type": "text", ...} and {"type": "image_url", ...} parts
    reasoning: str | None = None     # assistant: its reasoning, when the client sent it back
    calls: tuple = ()         # assistant: its Calls
    call_id: str | None = None       # tool: the call it answers
    name: str | None = None          # tool: the tool's name
    failed: bool = False      # tool: the tool reported an error

    @property
    def text(self):
        return text_of(self.parts)


def text_part(text):
    return {"type": "text", "text": text}


class Transcript:
    """A conversation's Turns, built turn by turn from any dialect's history; a tool result learns its tool's
    name from the call it answers."""

    def __init__(self):
        self.turns = []
        self.call_names = {}

    def add(self, role, content):
        """A system or user turn; `content` is a string or a list of upstream parts."""
        parts = (text_part(content),) if isinstance(content, str) else tuple(content)
        self.turns.append(Turn(role, parts))

    def assistant(self, text, calls=(), reasoning=None):
        """An assistant turn: its text, the calls it made as (call id, name, arguments) triples, its reasoning."""
        calls = tuple(Call(*call) for call in calls)
        self.call_names.update((call.id, call.name) for call in calls)
        self.turns.append(Turn("assistant", (text_part(text),) if text else (), reasoning, calls))

    def tool_result(self, call_id, parts, name=None, failed=False):
        """A tool's result: its content parts (a screenshot stays an image)."""
        name = name or self.call_names.get(call_id) or "unknown"
        self.turns.append(Turn("tool", tuple(parts), call_id=call_id, name=name, failed=failed))

    def finish(self):
        """The Turns, with one system turn at most, first: K2's chat template reads a system message only at the
        start, so the system messages that open the conversation are joined, and one that comes later (Claude Code
        sends them mid-conversation) becomes a note the model reads in its place, rendered the same on every turn
        (the conversation's prefix stays as it was, for the API's prefix cache)."""
        opening = list(itertools.takewhile(lambda turn: turn.role == "system", self.turns))
        turns = [Turn("system", (text_part("\n\n".join(turn.text for turn in opening)),))] if opening else []
        for turn in self.turns[len(opening):]:
            turns.append(Turn("user", (text_part(SYSTEM_NOTE.format(turn.text)),)) if turn.role == "system" else turn)
        return tuple(turns)


SYSTEM_NOTE = "<system-reminder>\n{}\n</system-reminder>"  # a system message after the conversation's start


MAX_OUTPUT_TOKENS = 8192  # K2 Horizon writes at most this; asking for more only risks a refusal in long contexts
CONTEXT_TOKENS = 512 * 1024  # K2 Horizon's context (512K tokens; 128,000 is some clients' own preset)


MAX_STOP_SEQUENCES = 4  # what K2's API takes


UPSTREAM_NAMES = {"site": "the K2Think site", "api": "the API upstream (IFM's API, or a vLLM or SGLang server)"}


def no_probabilities(settings, name):
    """The refusal of a request for token probabilities, naming the upstream kinds in use."""
    names = [UPSTREAM_NAMES[kind] for kind in settings.upstream]
    said = names[0] + " does not" if len(names) == 1 else "neither " + " nor ".join(names) + " does"
    return ApiError(400, f"'{name}' is not supported: {said} report token probabilities through this proxy",
                    param=name, code="unsupported_parameter")


def sampling(temperature, top_p, max_tokens, stop, seed=None, stop_param="stop"):
    """The sampling options upstream understands, those given; max_tokens no more than the model can write."""
    expect(stop is None or len(stop) <= MAX_STOP_SEQUENCES, f"'{stop_param}' may hold at most {MAX_STOP_SEQUENCES} "
           "sequences", stop_param)
    params = {"temperature": temperature, "top_p": top_p,
              "max_tokens": min(max_tokens, MAX_OUTPUT_TOKENS) if max_tokens else None, "stop": stop, "seed": seed}
    return {name: value for name, value in params.items() if value is not None}


def prompt_chars(turns, tools, answer_format):
    """Characters of text in a conversation and what it is told of its tools and answer, for the usage estimate."""
    said = sum(len(turn.text) + sum(len(json_text(call.arguments)) for call in turn.calls) for turn in turns)
    return said + (len(tool_prompt(tools)) if tools else 0) + (len(answer_format.prompt()) if answer_format else 0)


def estimate_tokens(chars):
    return max(1, round(chars / CHARS_PER_TOKEN)) if chars else 0


@dataclass(frozen=True)
class AnswerFormat:
    """An answer that must be one JSON object (of `schema`, when given): passed on natively where upstream
    enforces it, else asked for in the prompt and taken out of whatever the model wrote around it."""
    schema: dict | None = None
    name: str = "answer"
    strict: bool | None = None

    def wire(self):
        """OpenAI's response_format for it."""
        if self.schema is None:
            return {"type": "json_object"}
        spec = {"name": self.name, "schema": self.schema}
        return {"type": "json_schema", "json_schema": spec if self.strict is None else {**spec, "strict": self.strict}}

    def prompt(self):
        schema = f" matching this JSON Schema: {json.dumps(self.schema, ensure_ascii=False)}" if self.schema else ""
        return (f"Answer with one JSON object{schema}, and nothing else: no prose before or after it, no code "
                "fence.")

    @staticmethod
    def extract(text):
        """The JSON object in an answer, as compact text: the whole answer, a fenced block, or the first object
        in it that parses; None when there is none."""
        candidates = itertools.chain([(text.strip(), 0)], ((found.group(1), 0) for found in FENCED_BODY.finditer(text)),
                                     ((text, match.start()) for match in re.finditer(r"\{", text)))
        for candidate, start in candidates:  # (text, where its object would start): tried lazily, nothing copied
            try:
                value, _ = JSON_DECODER.raw_decode(candidate, start)
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict) and json_depth(value) <= MAX_JSON_DEPTH:
                return json_text(value)
        return None


# Where clients name their conversation, when the body does not (prompt_cache_key)
SESSION_HINT_HEADERS = ("x-session-id", "session_id", "x-claude-code-session-id", "conversation_id")


def forced_call(plan, text):
    """A forced tool's call in an answer that is only its arguments, as JSON (a model under a forced choice may
    write just them): the first forced tool whose parameters the JSON fits; None when it fits none."""
    found = AnswerFormat.extract(text)
    value = json.loads(found) if found else None
    tool = next((tool for tool in plan.forced if fits(value, tool.parameters)), None)
    return ToolCall(tool.name, found) if tool and found else None


@dataclass(frozen=True)
class CoreRequest:
    """A completion request in no dialect: what goes upstream, and how the answer is to be shown."""
    model: str                # the id the client asked for, echoed in its answer
    upstream_model: str
    turns: tuple              # the conversation, as Turns
    params: dict              # temperature, top_p, max_tokens, stop
    effort: str
    stream: bool
    show_reasoning: bool
    tools: ToolPlan | None = None
    answer_format: AnswerFormat | None = None
    session_hint: str | None = None  # the client's own name for the conversation (prompt_cache_key, a session header)
    client: str | None = None        # who asks, as a digest of the API key it came with, set by the core

    @functools.cached_property
    def prompt_tokens(self):
        """The estimate of the prompt's tokens, counted once."""
        return estimate_tokens(prompt_chars(self.turns, self.tools, self.answer_format))


# The events of a completion. What arrived from upstream together is one list of events, and leaves in one write.

@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str       # without a dialect's prefix (call_, toolu_, fc_)
    name: str


@dataclass(frozen=True)
class ToolArguments:
    index: int
    text: str     # the next piece of the arguments' JSON


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self):
        return self.prompt_tokens + self.completion_tokens


def whole_number(value):
    """`value` when it is a whole number (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage_of(given, prompt_tokens, reasoning_chars, answer_chars):
    """Upstream's counts (OpenAI's usage object) where it gave them, else estimates from what was written."""
    given = given or {}
    details, cached = object_in(given.get("completion_tokens_details")), object_in(given.get("prompt_tokens_details"))
    prompt = whole_number(given.get("prompt_tokens"))
    completion = whole_number(given.get("completion_tokens"))
    reasoning = whole_number(details.get("reasoning_tokens"))
    return Usage(prompt_tokens if prompt is None else prompt,
                 estimate_tokens(reasoning_chars + answer_chars) if completion is None else completion,
                 estimate_tokens(reasoning_chars) if reasoning is None else reasoning,
                 whole_number(cached.get("cached_tokens")) or 0)


EFFORT_CLOSERS = tuple(f"<{slash}ifm|think{speed}>" for slash in ("/", "") for speed in ("", "_fast", "_faster"))
EFFORT_CLOSER = re.compile(r"</?ifm\|think(?:_fast(?:er)?)?>")
CLOSER_MAX = max(map(len, EFFORT_CLOSERS))


class CloserSplitter:
    """K2's reasoning as it streams, split at an effort closer: when a follow-up at low or medium effort closes its
    reasoning with the high-effort tag, the whole reply is filed as reasoning, and what follows the closer is the
    answer. Work per piece is in proportion to the piece."""

    def __init__(self):
        self.held = ""          # the end of the reasoning that may be the start of a closer
        self.closed = False
        self.answer_begun = False

    def feed(self, text):
        """(reasoning, answer) of the next piece of reasoning."""
        if self.closed:
            return "", self._answer(text)
        text = self.held + text
        found = EFFORT_CLOSER.search(text)
        if found:
            self.closed, self.held = True, ""
            return text[:found.start()], self._answer(text[found.end():])
        start = text.rfind("<", max(0, len(text) - CLOSER_MAX + 1))
        keep = start >= 0 and any(closer.startswith(text[start:]) for closer in EFFORT_CLOSERS)
        self.held = text[start:] if keep else ""
        return (text[:start] if keep else text), ""

    def finish(self):
        """The reasoning held back at the end."""
        held, self.held = self.held, ""
        return held

    def _answer(self, text):
        """The answer after the closer, without the blank lines that open it."""
        if not self.answer_begun:
            text = text.lstrip()
            self.answer_begun = bool(text)
        return text


def answer_too_large(limit):
    return UpstreamError(ANSWER_TOO_LARGE, f"upstream's answer is larger than MAX_ANSWER_MB ({limit / MB:g} MB); ask "
                                           "for a stream to receive it")


def answer_limit(settings, core):
    """The most characters a non-streamed answer may hold, reasoning the client does not see included; None for
    a stream, which holds none of it."""
    return None if core.stream else int(settings.max_answer_mb * MB)


class Counted:
    """What an attempt has written so far, counted, with its effort closer found: reasoning becomes events, or, when
    the client does not see it, counts against the answer's limit (the writer never sees it)."""

    def __init__(self, show_reasoning, limit):
        self.show_reasoning = show_reasoning
        self.limit = limit  # answer_limit
        self.closer = CloserSplitter()
        self.reasoning_chars = self.answer_chars = 0

    def _reasoning(self, text):
        if not text:
            return []
        self.reasoning_chars += len(text)
        if self.show_reasoning:
            return [Reasoning(text)]
        if self.limit and self.reasoning_chars + self.answer_chars > self.limit:
            raise answer_too_large(self.limit)
        return []


@dataclass(frozen=True)
class Finish:
    reason: str   # stop | length | tool_calls | content_filter
    usage: Usage


@dataclass(frozen=True)
class Failed:
    error: ApiError


@dataclass(frozen=True)
class Attempt:
    """An upstream kind begins an attempt with a credential: its number, and the credential's place in its pool."""
    number: int
    credential: int | None = None


@dataclass(frozen=True)
class Restart:
    """The attempt failed before its answer was whole, and another credential (or upstream kind) may do better:
    what came of the failed attempt is void, if the client has seen none of it; else `error` ends the completion."""
    error: Exception  # the UpstreamError, or the ApiError of a kind with no credential left


Event = Reasoning | Text | ToolCallStart | ToolArguments | Finish | Failed  # what a completion produces
Progressed = Attempt | Restart | list[Event]  # what an upstream kind yields: events of one read, between attempts


class UpstreamKind(typing.Protocol):
    """An upstream kind, as the core and the app state see it: its name, its credentials, and completions."""
    name: str

    @property
    def pool(self) -> "CredentialPool": ...

    def complete(self, core: "CoreRequest") -> typing.AsyncIterator[Progressed]: ...

    def describe(self) -> str: ...  # where it is and what credentials it has, for the start-up lines


UPSTREAM_FINISH_REASONS = ("length", "content_filter")  # the reasons of upstream's that a client is told


@dataclass
class Answer:
    """A whole completion, gathered from its events for a non-streamed response."""
    reasoning: str = ""
    text: str = ""
    calls: list["AnsweredCall"] = field(default_factory=list)
    finish: Finish | None = None


def unknown_event(event):
    """A renderer or writer met something that is no Event: a bug, never a failure to show a client."""
    return TypeError(f"not a completion event: {event!r}")


@dataclass(frozen=True)
class AnsweredCall:
    """A tool call of a whole answer: its id (without a dialect's prefix), its name, its arguments' JSON text."""
    id: str
    name: str
    arguments: str


@dataclass
class CallInParts:
    """A tool call whose arguments arrive in pieces: its index among the answer's calls, its id, its name."""
    index: int
    id: str
    name: str
    pieces: list[str] = field(default_factory=list)

    def whole(self):
        return AnsweredCall(self.id, self.name, "".join(self.pieces))


def json_text(value):
    return json.dumps(value, ensure_ascii=False)


DONE_LINE = b"data: [DONE]\n\n"  # the last line of an OpenAI stream, chat completions' and Responses' alike


def sse_event(name, data):
    """One named server-sent event, as the Anthropic and Responses streams send them."""
    return b"event: " + name.encode() + b"\ndata: " + json_text(data).encode() + b"\n\n"


def requested_model(body, default=None):
    """The model a completion request names (`default`, when it may name none); a 400 when the body is not an
    object or names none it must."""
    expect(isinstance(body, dict), "The request body must be a JSON object", None, "invalid_type")
    model = default if body.get("model") is None and default else body.get("model")
    expect(isinstance(model, str) and model, "'model' must be a non-empty string", "model", "invalid_type")
    return model


def default_effort(settings, show_reasoning):
    """How long the model thinks when a request does not say: REASONING_EFFORT, or low for a -nothink model."""
    return settings.reasoning_effort if show_reasoning else "low"


# ─── Documents ───────────────────────────────────────────────────────────────
# What a text-only model cannot read as it came: a PDF, whose text layer is
# read page by page in a process of its own (pypdf, from requirements-pdf.txt,
# imported only there), within PDF_SECONDS and PDF_MEMORY_MB (counted in the
# memory budget while it reads), so that a hostile file can neither stall the
# event loop, nor hold a core past its limit, nor grow the proxy. Offers
# read_documents, which puts each PDF's text in its place in a CoreRequest.

PDF_INSTALL = "pip install -r requirements-pdf.txt"
PDF_READER = """
import io, json, sys
try:
    from pypdf import PdfReader
except ImportError:
    print(json.dumps({"problem": "missing"}))
    raise SystemExit
pages_max, chars_max = int(sys.argv[1]), int(sys.argv[2])
try:
    reader = PdfReader(io.BytesIO(sys.stdin.buffer.read()))
    if reader.is_encrypted:
        try:
            readable = bool(reader.decrypt(""))
        except Exception:
            readable = False
        if not readable:
            print(json.dumps({"problem": "encrypted"}))
            raise SystemExit
    total, pages, chars, stopped = len(reader.pages), [], 0, ""
    for number in range(min(total, pages_max)):
        text = reader.pages[number].extract_text() or ""
        if chars + len(text) > chars_max:
            pages.append(text[:chars_max - chars])
            stopped = "chars"
            break
        pages.append(text)
        chars += len(text)
    else:
        stopped = "pages" if total > pages_max else ""
    print(json.dumps({"pages": pages, "total": total, "stopped": stopped}))
except SystemExit:
    raise
except MemoryError:
    print(json.dumps({"problem": "limits"}))
except Exception as exc:
    print(json.dumps({"problem": "broken", "detail": type(exc).__name__}))
"""  # the reader's own process: its stdin the PDF, its stdout one JSON line
PDF_PROBLEMS = {
    "missing": "reading PDFs needs the pypdf package, which is not installed: " + PDF_INSTALL,
    "encrypted": "is encrypted: send it without a password, or send its text",
    "broken": "cannot be read as a PDF: it is broken or cut short",
    "no text": "has no text layer (a scanned document, it seems), and K2 Horizon reads text only: send its text "
               "(run OCR on it first)",
    "limits": "could not be read within PDF_SECONDS ({seconds:g} s) and PDF_MEMORY_MB ({megabytes:g} MB): send "
              "its text, or fewer pages",
}
PDF_END = b"%%EOF"
PDF_END_ZONE = 2048  # a whole PDF ends with %%EOF within its last bytes; one cut short does not


def pdf_problem(name, where, problem, settings):
    message = PDF_PROBLEMS[problem].format(seconds=settings.pdf_seconds, megabytes=settings.pdf_memory_mb)
    return ApiError(400, f"{where}: the PDF '{name}' {message}", param=where,
                    code="pdf_reader_missing" if problem == "missing" else "unreadable_pdf")


def pdf_reader_limits(seconds, megabytes):
    """What the reader's process may take: its CPU seconds and its address space (run in the child, before exec)."""
    def limit():
        import resource  # here: the child's, and only where a PDF comes
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(seconds), math.ceil(seconds) + 1))
        memory = int(megabytes * MB)
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return limit


async def run_pdf_reader(data, settings):
    """The reader's answer for one PDF: its pages' text, or the problem it met."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PDF_READER, str(settings.max_pdf_pages), str(settings.max_pdf_chars),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=pdf_reader_limits(settings.pdf_seconds, settings.pdf_memory_mb))
    try:
        out, _ = await asyncio.wait_for(process.communicate(data), settings.pdf_seconds)
    except asyncio.TimeoutError:
        return {"problem": "limits"}
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    try:
        return json.loads(out)
    except ValueError:  # killed at a limit, or out of memory before it could say so
        return {"problem": "limits"}


def pdf_text(name, read):
    """A PDF's text as the model reads it: page by page, headed by its name, and where it stopped, if it did."""
    pages, total = read["pages"], read["total"]
    body = "\n\n".join(f"--- page {number} ---\n{text.strip()}" for number, text in enumerate(pages, 1))
    if read["stopped"] == "pages":
        body += f"\n\n[the text stops after page {len(pages)} of {total}: MAX_PDF_PAGES]"
    elif read["stopped"] == "chars":
        body += f"\n\n[the text stops in page {len(pages)} of {total}: MAX_PDF_CHARS]"
    fence = "`" * max(3, max(map(len, re.findall(r"`+", body)), default=0) + 1)
    return text_part(f"File: {name} (PDF, {total} page{'s' if total != 1 else ''})\n{fence}\n{body}\n{fence}")


async def read_pdf(part, settings, budget):
    """The text part of a PDF part, read within its limits; a 400 naming the file when it cannot be read."""
    name, where, data = part["name"], part["where"], part["data"]
    if PDF_END not in data[-PDF_END_ZONE:]:
        raise pdf_problem(name, where, "broken", settings)
    reserved = min(int(settings.pdf_memory_mb * MB), budget.limit // 2)  # the request's own body fits beside it
    await budget.admit(reserved)
    try:
        read = await run_pdf_reader(data, settings)
    finally:
        budget.release(reserved)
    if "problem" in read:
        raise pdf_problem(name, where, read["problem"], settings)
    if not any(text.strip() for text in read["pages"]):
        raise pdf_problem(name, where, "no text", settings)
    return pdf_text(name, read)


async def read_documents(core, settings, budget):
    """The request with each PDF of its conversation replaced by its text, in its place (one at a time)."""
    if not any(part["type"] == "pdf" for turn in core.turns for part in turn.parts):
        return core
    turns = []
    for turn in core.turns:
        parts = [await read_pdf(part, settings, budget) if part["type"] == "pdf" else part for part in turn.parts]
        turns.append(replace(turn, parts=tuple(parts)))
    return replace(core, turns=tuple(turns))


# ─── Upstream wire ───────────────────────────────────────────────────────────
# What every upstream kind's answers are made of, as pure code: bytes → SSE
# payloads, Delta (what one network read of an answer added), WholeText (text
# whose UTF-16 pairs a cut split), what upstream said in an error, its
# Retry-After, and the failures of the statuses every kind reads alike. Offers
# SSEDecoder, Delta, WholeText, error_text, safe_summary, error_detail,
# retry_after_seconds and status_failure.

MAX_FRAME_BYTES = 16 * MB
ERROR_TEXT_CHARS = 200  # of an error message quoted from upstream
SECRET_LOOKING = re.compile(r"(?i)bearer\s+\S+|eyJ[\w-]+\.[\w-]+\.[\w-]*|\b(?:sk|ifm)-[\w-]{6,}")


class SSEDecoder:
    """Splits upstream bytes into frames, whatever the TCP, line and UTF-8 cut points; `parse` reads each
    payload into the kind's frame, and what it gives as None or empty is noise."""

    def __init__(self, parse):
        self.parse = parse
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._partial = []
        self._partial_size = 0

    def feed(self, data, final=False):
        """The frames completed by `data`; `final` flushes the last line."""
        text = self._decode(data, final)
        self._partial.append(text)
        if "\n" not in text and not final:
            self._partial_size += len(text)
            if self._partial_size > MAX_FRAME_BYTES:
                raise UpstreamError(NOT_AN_ANSWER, f"upstream sent a frame larger than {MAX_FRAME_BYTES // MB} MB")
            return []
        lines = "".join(self._partial).split("\n")
        rest = "" if final else lines.pop()
        self._partial = [rest]
        self._partial_size = len(rest)
        return [frame for frame in map(self.parse, filter(None, map(sse_payload, filter(None, lines)))) if frame]


def sse_payload(line):
    """The payload of one SSE line, or '' for comments, other fields and blank lines."""
    line = line.strip()
    if line.startswith("data:"):
        return line[5:].strip()
    if line.startswith("{"):
        return line
    return ""


def error_text(problem):
    """A short human message out of whatever upstream put in an error field (see safe_summary)."""
    if isinstance(problem, dict):
        problem = problem.get("message") or problem.get("detail") or json.dumps(problem)
    elif isinstance(problem, list):
        problem = "; ".join(error_text(item) for item in problem)
    return safe_summary(str(problem))


def safe_summary(text):
    """What upstream said, as a client and the log may see it: one line of at most ERROR_TEXT_CHARS, with anything
    that looks like a credential (an echoed Authorization header, a JWT, a key) blanked out."""
    line = " ".join(text[:4 * ERROR_TEXT_CHARS].split())
    return loggable(SECRET_LOOKING.sub("[redacted]", line))[:ERROR_TEXT_CHARS]


def error_detail(body):
    """The message of an upstream error body, JSON or not."""
    try:
        return error_text(loads(body)) if body.strip() else ""
    except ValueError:
        return safe_summary(body)


RETRY_AFTER_MAX = 3600  # seconds: a longer Retry-After from upstream is taken as this


def retry_after_seconds(value):
    """Upstream's Retry-After in seconds, at most RETRY_AFTER_MAX; None when it gives none that is a number."""
    value = (value or "").strip()
    return min(int(value), RETRY_AFTER_MAX) if WHOLE_NUMBER.fullmatch(value) else None


STATUS_FAILURES = {400: REJECTED, 413: TOO_LARGE, 422: REJECTED}  # statuses every upstream kind reads alike


def status_failure(status, shown, retry_after=None):
    """The UpstreamError of a status that means the same from every upstream kind: the request refused, or a rate
    limit (with upstream's Retry-After); None for the others, which each kind reads in its own way."""
    if status in STATUS_FAILURES:
        return UpstreamError(STATUS_FAILURES[status], shown)
    if status == 429:
        return UpstreamError(RATE_LIMITED, shown, retry_after=retry_after_seconds(retry_after))
    return None


SURROGATE = re.compile("[\ud800-\udfff]")


class WholeText:
    """Text that streams in pieces, its UTF-16 surrogate pairs made whole again (JSON escapes may cut one between two
    frames) and any lone surrogate replaced, so that every piece can be encoded; work in proportion to the piece."""

    def __init__(self):
        self.held = ""  # a high surrogate at the end of the last piece, waiting for its pair

    def add(self, text):
        text, self.held = self.held + text, ""
        if not SURROGATE.search(text):
            return text
        if "\ud800" <= text[-1] <= "\udbff":
            text, self.held = text[:-1], text[-1]
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")

    def finish(self):
        return self.add("") + ("\ufffd" if self.held else "")


@dataclass
class Delta:
    """What one network read of an answer added, in any upstream's wire format, and whether the answer ended."""
    reasoning: str = ""
    text: str = ""
    usage: dict | None = None
    finish_reason: str | None = None
    ended: bool = False
    error: UpstreamError | None = None  # an error frame: what came before it in the read is still delivered
    calls: list = field(default_factory=list)  # pieces of native tool calls (CallPiece)


# ─── Site protocol ───────────────────────────────────────────────────────────
# The web site's wire format, as pure code with no I/O: bytes → SSE payloads →
# frames → (reasoning, answer) deltas, and an answer's status and body → an
# UpstreamError. Offers SSEDecoder, SiteReader (the one reading of the site's
# answers, for requests, --check and tests) and site_error. Every step does
# work proportional to what its input added.


class TextForm(enum.Enum):
    """How a frame carries text (k2think-protocol.md, "Where the frames come from"), which says how to read it."""
    WHOLE = "whole"          # a top-level content, or a done event's: the whole message so far, markup and all
    PIECE = "piece"          # choices[0].delta.content: a piece to append, or a snapshot when it starts with all so far
    REASONING = "reasoning"  # a Responses-style response.reasoning_text.delta: a piece of plain reasoning
    ANSWER = "answer"        # a Responses-style response.output_text.delta: a piece of the plain answer
    OUTPUT = "output"        # a done event's output items: the whole plain reasoning (`reasoning`) and answer


@dataclass
class Frame:
    text: str | None = None
    form: TextForm | None = None
    reasoning: str | None = None  # with OUTPUT: the whole reasoning (`text` is the whole answer)
    usage: dict | None = None
    finish_reason: str | None = None
    done: bool = False
    error: str | None = None
    fields: tuple = field(default=(), compare=False)  # the payload's top-level keys, or the end marker


END_MARKERS = frozenset(("[DONE]", "DONE", "done"))
RESPONSES_DELTAS = {"response.output_text.delta": TextForm.ANSWER,
                    "response.reasoning_text.delta": TextForm.REASONING}
STATUS_FIELDS = frozenset(("action", "description"))  # a status event: its `done` ends the status, not the stream


def parse_frame(payload):
    """Reads one upstream payload (SSE data or a whole JSON answer); None for noise such as -1 or a bare title."""
    if payload in END_MARKERS:
        return Frame(done=True, fields=(payload,))
    try:
        obj = loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    problem = obj.get("error") or obj.get("detail")
    if problem:
        return Frame(error=error_text(problem))
    frame = Frame(done=obj.get("done") is True and not STATUS_FIELDS & obj.keys(), fields=tuple(obj))
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        part = choice.get("delta") or choice.get("message")
        if isinstance(part, dict) and isinstance(part.get("content"), str):
            frame.text, frame.form = part["content"], TextForm.PIECE
        if isinstance(choice.get("finish_reason"), str):
            frame.finish_reason = choice["finish_reason"]
    elif isinstance(obj.get("content"), str):
        frame.text, frame.form = without_cut_pair(obj["content"]), TextForm.WHOLE
    elif obj.get("type") in RESPONSES_DELTAS and isinstance(obj.get("delta"), str):
        frame.text, frame.form = obj["delta"], RESPONSES_DELTAS[obj["type"]]
    elif frame.done and isinstance(obj.get("output"), list):
        frame.reasoning, frame.text = output_texts(obj["output"])
        frame.form = TextForm.OUTPUT
    if isinstance(obj.get("usage"), dict):
        frame.usage = obj["usage"]
    return frame


OUTPUT_PARTS = {"reasoning": "reasoning_text", "message": "output_text"}  # output item type -> its text parts' type


def output_texts(items):
    """The whole (reasoning, answer) held by Responses-style output items: reasoning items, then messages."""
    texts: dict[str, list[str]] = {"reasoning_text": [], "output_text": []}
    for item in map(object_in, items):
        kind, parts = OUTPUT_PARTS.get(str(item.get("type"))), item.get("content")
        if kind is None or not isinstance(parts, list):
            continue
        for part in parts:
            if isinstance(part, dict) and part.get("type") == kind and isinstance(part.get("text"), str):
                texts[kind].append(part["text"])
    return "".join(texts["reasoning_text"]), "".join(texts["output_text"])


def without_cut_pair(snapshot):
    """A snapshot cut inside a UTF-16 surrogate pair, without its first half: the next snapshot holds it whole."""
    return snapshot[:-1] if snapshot and "\ud800" <= snapshot[-1] <= "\udbff" else snapshot


def held_tag_prefix(text, tag):
    """Length of the end of `text` that could be the start of `tag`, to hold back until more arrives."""
    if text.find(tag[0], max(0, len(text) - len(tag) + 1)) < 0:
        return 0
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def text_digest(text):
    """A running SHA-256 of text (lone surrogates included: a JSON escape may carry one)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass"))


class KeptEnd:
    """Text that grows piece by piece, of which only the end is kept: the start it forgot is held as its length and
    digest, enough to tell whether a later text starts with it. The site's rule compares each snapshot with the text
    so far, which would otherwise keep every character a stream read for as long as it runs."""

    __slots__ = ("_digest", "_forgotten", "_parts", "length")

    def __init__(self, text=""):
        self._parts = collections.deque([text] if text else ())
        self.length = len(text)
        self._forgotten = 0  # characters at the start that only the digest holds
        self._digest = hashlib.sha256()

    def append(self, part):
        if part:
            self._parts.append(part)
            self.length += len(part)

    def reset(self, text):
        """Starts over as `text`, with nothing forgotten."""
        if self._forgotten:
            self._digest, self._forgotten = hashlib.sha256(), 0
        self._parts = collections.deque([text] if text else ())
        self.length = len(text)

    def _kept(self):
        if len(self._parts) > 1:
            self._parts = collections.deque(["".join(self._parts)])
        return self._parts[0] if self._parts else ""

    def text(self):
        """The whole text, when nothing of it was forgotten."""
        if self._forgotten:
            raise ValueError("the start of this text was forgotten")
        return self._kept()

    def since(self, offset):
        """The text after its first `offset` characters, which are not forgotten."""
        return self._kept()[offset - self._forgotten:]

    def cut(self, offset):
        """Ends the text after its first `offset` characters, which are not forgotten; returns what it cut off."""
        kept, keep = self._kept(), offset - self._forgotten
        self._parts = collections.deque([kept[:keep]] if keep else ())
        self.length = offset
        return kept[keep:]

    def forget(self, offset):
        """Keeps of the text only what follows its first `offset` characters, and the digest of those."""
        while self._parts and self._forgotten < offset:
            part = self._parts.popleft()
            size = min(len(part), offset - self._forgotten)
            if size < len(part):
                self._parts.appendleft(part[size:])
            self._fold(part[:size])

    def _fold(self, part):
        self._digest.update(part.encode("utf-8", "surrogatepass"))
        self._forgotten += len(part)

    def prefix_of(self, text):
        """Whether `text` starts with this text."""
        return len(text) >= self.length and self.starts_alike(text) and self.kept_prefix_of(text, self.length)

    def starts_alike(self, text):
        """Whether `text` starts with the part forgotten (by its digest: the one step whose work is all of it)."""
        return not self._forgotten or (len(text) >= self._forgotten and
                                       text_digest(text[:self._forgotten]).digest() == self._digest.digest())

    def kept_prefix_of(self, text, length):
        """Whether `text`, where it starts_alike, goes on with this text's kept characters up to `length`."""
        return (len(text) >= length >= self._forgotten
                and text.startswith(self._kept()[:length - self._forgotten], self._forgotten))

    def added_to(self, earlier):
        """What this text adds to `earlier`, when it starts with it, else None. `earlier` is either this text's own
        copy (the same start forgotten) or any text when this one forgot nothing."""
        if not self._forgotten:
            text = self._kept()
            return text[earlier.length:] if earlier.prefix_of(text) else None
        if earlier._forgotten != self._forgotten or earlier._digest.digest() != self._digest.digest():
            return None
        mine, theirs = self._kept(), earlier._kept()
        return mine[len(theirs):] if mine.startswith(theirs) else None

    def copy(self, length=None, more=""):
        """A copy of its first `length` characters (all by default; those past what it forgot) with `more` after
        them: what was sent, while the text read is behind it."""
        copy = KeptEnd()
        copy._parts, copy.length, copy._forgotten = collections.deque(self._parts), self.length, self._forgotten
        copy._digest = self._digest.copy()
        if length is not None:
            copy.cut(length)
        copy.append(more)
        return copy

    @property
    def kept_chars(self):
        """Characters of it kept as text."""
        return self.length - self._forgotten


class TrimmedText:
    """One side of the answer (reasoning or answer) as it streams, without leading or trailing blanks."""

    __slots__ = ("_held", "kept")

    def __init__(self):
        self.kept = KeptEnd()
        self._held = ""

    def add(self, text):
        """Takes raw text, returns what can be shown now; trailing blanks wait for more text."""
        if not text:
            return ""
        text = self._held + text if self.kept.length else text.lstrip()
        shown = text.rstrip()
        self._held = text[len(shown):]
        self.kept.append(shown)
        return shown

    def text(self):
        return self.kept.text()

    def mark(self):
        """Where this side stands: (characters shown, blanks held)."""
        return self.kept.length, self._held

    def since(self, mark):
        """The text shown after `mark`."""
        return self.kept.since(mark[0])

    def rewind(self, mark):
        """Goes back to `mark`; returns the text shown since, which is no longer counted."""
        self._held = mark[1]
        return self.kept.cut(mark[0])


# The splitter's states, and what moves it on (text it cannot place yet is held, never guessed):
#
#   start ─<think>──────────────────▶ think ───</think>───▶ after_reasoning ─<answer>──▶ answer
#     │                                                        ▲     └──other text──▶ answer
#     ├─<details type="reasoning">──▶ details ──</details>─────┘
#     ├─<answer>────────────────────────────────────────────────────────────────────────▶ answer
#     └─other text──▶ undecided ─</think>──▶ after_reasoning;  ─<answer>──▶ answer;  at the end: answer
#
# In `details`, <summary> is dropped and so is the "> " quoting at each line start (or "&gt; ", when Open WebUI
# html-escaped the block: that line is then unescaped); the block ends at a line that starts with </details>.

DETAILS_TAG_MAX = 512  # an opening <details ...> or <think ...> tag longer than this is no reasoning block
DETAILS_LINE_MARKERS = ("</details>", "<summary", "&gt; ", "&gt;", "> ", ">")  # what a reasoning line may open with
ESCAPES = (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&#x27;", "'"), ("&amp;", "&"))  # html.escape's, &amp; last
ENTITY_MAX = max(len(entity) for entity, _ in ESCAPES)
MARKS_KEPT = 4  # line ends in a reasoning block where a snapshot that changed after them is read on from


def unescaped(text):
    """Text that went through Python's html.escape, as it was."""
    if "&" not in text:
        return text
    for entity, character in ESCAPES:
        text = text.replace(entity, character)
    return text


def held_entity(text):
    """Length of the end of escaped text that may be the start of an entity, held until the entity is whole."""
    start = text.rfind("&", max(0, len(text) - ENTITY_MAX + 1))
    return len(text) - start if start >= 0 and ";" not in text[start:] else 0


@dataclass(frozen=True)
class SplitMark:
    """Where the splitter stood at the end of a reasoning line: a snapshot that changed only after it (Open WebUI
    moves the block's closer as the reasoning grows) is read on from here, not from the start."""
    offset: int          # characters of raw text read up to here
    escaped: bool        # the line is html-escaped
    reasoning: tuple     # TrimmedText.mark() of each side
    answer: tuple


class MarkupSplitter:
    """Separates the site's reasoning markup (<think>, <details>, <answer>) from the answer, piece by piece."""

    OPENERS = ("<think>", "<think ", "<answer>", "<details")

    def __init__(self):
        self.reasoning = TrimmedText()
        self.answer = TrimmedText()
        self._state = self._start
        self._pending = ""
        self._undecided = []
        self._line_start = True
        self._escaped = False    # the current reasoning line came html-escaped
        self._read = 0           # characters of raw text fed
        self.marks: collections.deque[SplitMark] = collections.deque(maxlen=MARKS_KEPT)
        self._out_reasoning = []
        self._out_answer = []

    def feed(self, text):
        """Adds raw text; returns the (reasoning, answer) text it completes."""
        self._read += len(text)
        self._pending += text
        while self._pending and self._state():
            pass
        return self._take()

    def texts(self):
        """The (reasoning, answer) shown so far."""
        return self.reasoning.text(), self.answer.text()

    def rewind(self, mark):
        """Goes back to `mark`, as if the raw text had ended there; returns the (reasoning, answer) shown since."""
        while self.marks and self.marks[-1].offset > mark.offset:
            self.marks.pop()
        self._state, self._pending, self._line_start, self._escaped = self._details, "", False, mark.escaped
        self._read = mark.offset
        return self.reasoning.rewind(mark.reasoning), self.answer.rewind(mark.answer)

    def since(self, mark):
        """The (reasoning, answer) shown after `mark`."""
        return self.reasoning.since(mark.reasoning), self.answer.since(mark.answer)

    def finish(self):
        """Ends the text: whatever was held back is settled."""
        rest = "".join(self._undecided) + self._pending
        self._undecided, self._pending = [], ""
        if self._state in (self._think, self._details):
            self._reason(rest)
        else:
            self._say(rest)
        self._state = self._answer
        return self._take()

    def _take(self):
        reasoning, answer = "".join(self._out_reasoning), "".join(self._out_answer)
        self._out_reasoning.clear()
        self._out_answer.clear()
        return reasoning, answer

    def _reason(self, text):
        self._out_reasoning.append(self.reasoning.add(text))

    def _say(self, text):
        self._out_answer.append(self.answer.add(text))

    def _consume(self, size, state):
        self._pending = self._pending[size:]
        self._state = state
        return True

    def _start(self):
        text = self._pending.lstrip()
        self._pending = text
        if not text:
            return False
        if text.startswith("<think>"):
            return self._consume(7, self._think)
        if text.startswith("<answer>"):
            return self._consume(8, self._answer)
        if text.startswith(("<details", "<think ")):
            end = text.find(">")
            if end < 0 and len(text) < DETAILS_TAG_MAX:
                return False
            if text.startswith("<think ") and end >= 0:  # <think duration="3">: attributes, then the reasoning
                return self._consume(end + 1, self._think)
            if 'type="reasoning"' in text[:end]:
                self._line_start = True
                return self._consume(end + 1, self._details)
        elif any(tag.startswith(text) for tag in self.OPENERS):
            return False
        self._state = self._undecided_text
        return True

    def _undecided_text(self):
        """Text with no opening marker: reasoning if a lone </think> or <answer> follows, else answer."""
        text = self._pending
        for tag, state in (("</think>", self._after_reasoning), ("<answer>", self._answer)):
            index = text.find(tag)
            if index >= 0:
                self._reason("".join(self._undecided) + text[:index])
                self._undecided = []
                return self._consume(index + len(tag), state)
        keep = max(held_tag_prefix(text, "</think>"), held_tag_prefix(text, "<answer>"))
        self._undecided.append(text[:len(text) - keep])
        self._pending = text[len(text) - keep:]
        return False

    def _think(self):
        return self._until("</think>", self._reason, self._after_reasoning)

    def _answer(self):
        return self._until("</answer>", self._say, self._answer)

    def _until(self, tag, emit, next_state):
        text = self._pending
        index = text.find(tag)
        if index >= 0:
            emit(text[:index])
            return self._consume(index + len(tag), next_state)
        keep = held_tag_prefix(text, tag)
        emit(text[:len(text) - keep])
        self._pending = text[len(text) - keep:]
        return False

    def _details(self):
        """Open WebUI's reasoning block: drops <summary> and the quoting of each line, unescapes an escaped line."""
        text = self._pending
        if self._line_start:
            for marker in DETAILS_LINE_MARKERS:  # the longer of two markers that share a start comes first
                if text.startswith(marker):
                    break
                if marker.startswith(text):
                    return False
            else:
                marker = ""
            if marker == "</details>":
                return self._consume(len(marker), self._after_reasoning)
            if marker == "<summary":
                return self._consume(len(marker), self._summary)
            self._pending, self._line_start, self._escaped = text[len(marker):], False, marker.startswith("&")
            return True
        newline = text.find("\n")
        line = text if newline < 0 else text[:newline]
        keep = held_entity(line) if self._escaped and newline < 0 else 0
        self._reason(unescaped(line[:len(line) - keep]) if self._escaped else line[:len(line) - keep])
        if newline < 0:
            self._pending = line[len(line) - keep:]
            return False
        self.marks.append(SplitMark(self._read - len(text) + newline, self._escaped, self.reasoning.mark(),
                                    self.answer.mark()))
        self._reason("\n")
        self._line_start, self._pending = True, text[newline + 1:]
        return True

    def _summary(self):
        """Open WebUI's <summary> inside a reasoning block: dropped as it arrives (only a possible start of its
        closing tag is held), so that one never closed costs no more than its length."""
        text = self._pending
        end = text.find("</summary>")
        if end >= 0:
            return self._consume(end + len("</summary>"), self._details)
        self._pending = text[len(text) - held_tag_prefix(text, "</summary>"):]
        return False

    def _after_reasoning(self):
        text = self._pending.lstrip()
        self._pending = text
        if text.startswith("<answer>"):
            return self._consume(8, self._answer)
        if not text or "<answer>".startswith(text):
            return False
        self._state = self._answer
        return True


SNAPSHOT_HEAD_CHARS = 16  # a piece that repeats this much of the text's start may be a rewritten snapshot


def grown(new, old):
    """Whether each of the (reasoning, answer) `new` starts with the same side of `old`."""
    return new[0].startswith(old[0]) and new[1].startswith(old[1])


def growth(new, old):
    """What each side of `new` adds to `old` (see grown)."""
    return new[0][len(old[0]):], new[1][len(old[1]):]


MARK_REACH = 65536  # characters: a mark further behind the markup or either side read is dropped, and the text
# before the oldest mark kept is forgotten, so that a stream holds about this much of what it read (issue 38)


class UpstreamText:
    """The message so far, from frames of every form, as the (reasoning, answer) each frame grew it by: a top-level
    content replaces the message, a piece is appended, a snapshot that shrinks or diverges from what was sent emits
    nothing (k2think-protocol.md, "The rule that never loses and never doubles text"). Of the text read it keeps
    only what a later frame may be read on from (KeptEnd); `keep` keeps all of it, for --check's report."""

    def __init__(self, keep=False):
        self.keep = keep
        self._raw = KeptEnd()
        self._pieces = 0        # of the raw text since it was last replaced by a whole message
        self._head = ""
        self.snapshots = False  # whether pieces have been whole-answer snapshots, as the older site sent
        self.forms = set()      # the TextForms seen
        self._repeats = 0
        self._repeated = ""     # the first piece, while it repeats
        self.splitter = MarkupSplitter()
        self._sent: tuple[KeptEnd, KeptEnd] | None = None  # what was sent, while the message read is behind it

    def read(self, frame):
        """The (reasoning, answer) a frame adds."""
        shown = self._read_frame(frame)
        self._forget()
        return shown

    def _read_frame(self, frame):
        if frame.form is None:
            return "", ""
        if frame.text or frame.reasoning:
            self.forms.add(frame.form)
        match frame.form:
            case TextForm.WHOLE:
                return self.replace(frame.text)
            case TextForm.PIECE:
                return self.feed(frame.text)
            case TextForm.REASONING:
                return self._emit((self.splitter.reasoning.add(frame.text), ""))
            case TextForm.ANSWER:
                return self._emit(("", self.splitter.answer.add(frame.text)))
            case TextForm.OUTPUT:
                whole = MarkupSplitter()
                whole.reasoning.add(frame.reasoning)
                whole.answer.add(frame.text)
                return self._adopt(whole, "")

    def _forget(self):
        """Once more than MARK_REACH characters are kept, forgets the text read before the oldest mark within
        MARK_REACH (all of it without one), unless the message read is behind what was sent, which is then compared
        with it whole."""
        sides = self.splitter.reasoning, self.splitter.answer
        if (self.keep or self._sent is not None
                or self._raw.kept_chars + sides[0].kept.kept_chars + sides[1].kept.kept_chars <= MARK_REACH):
            return
        marks = self.splitter.marks
        while marks and (marks[0].offset < self._raw.length - MARK_REACH
                         or marks[0].reasoning[0] < sides[0].kept.length - MARK_REACH
                         or marks[0].answer[0] < sides[1].kept.length - MARK_REACH):  # sides grow alone by deltas
            marks.popleft()
        if marks:
            self._raw.forget(marks[0].offset)
            for side, mark in zip(sides, (marks[0].reasoning, marks[0].answer)):
                side.kept.forget(mark[0])
        else:
            self._raw.forget(self._raw.length)
            for side in sides:
                side.kept.forget(side.kept.length)

    def replace(self, text):
        """A whole message so far: read on from where it stops sharing the text read, else read it anew."""
        self._repeats = 0
        if self._raw.starts_alike(text):
            if self._raw.kept_prefix_of(text, self._raw.length):
                return self._extend(text, self._raw.length)
            resumed = self._resume(text)
            if resumed is not None:
                return resumed
        fresh = MarkupSplitter()
        fresh.feed(text)
        return self._adopt(fresh, text)

    def feed(self, text):
        """A piece, or a snapshot when it starts with all text so far; a repeated first piece is both, so it waits
        for the next one: one that grows it makes the repeats snapshots, anything else pieces."""
        if not text:
            return "", ""
        if (not self.snapshots and self._pieces == 1 and len(text) == self._raw.length
                and self._raw.prefix_of(text)):
            self._repeats += 1
            self._repeated = text
            return "", ""
        if self._repeats:
            repeats, self._repeats = self._repeats, 0
            first, self._repeated = self._repeated, ""
            if not (len(text) > len(first) and text.startswith(first[:SNAPSHOT_HEAD_CHARS])):  # a snapshot
                parts = [self._append(first) for _ in range(repeats)] + [self._read(text)]
                return "".join(r for r, _ in parts), "".join(a for _, a in parts)
        return self._read(text)

    def _read(self, text):
        raw = self._raw
        if (self._pieces and (len(text) > raw.length or (self.snapshots and len(text) == raw.length))
                and raw.prefix_of(text)):
            self.snapshots = True
            return self._extend(text, raw.length)
        if self.snapshots or (len(self._head) == SNAPSHOT_HEAD_CHARS and len(text) >= raw.length
                               and text.startswith(self._head)):
            rewritten = self._rewritten(text)
            if rewritten is not None:
                return rewritten
        return self._append(text)

    def _append(self, text):
        self._raw.append(text)
        self._pieces += 1
        if len(self._head) < SNAPSHOT_HEAD_CHARS:
            self._head = (self._head + text)[:SNAPSHOT_HEAD_CHARS]
        return self._emit(self.splitter.feed(text))

    def _extend(self, text, read):
        """A message that starts with the `read` characters read so far: only the rest is parsed."""
        self._take_raw(text, read)
        return self._emit(self.splitter.feed(text[read:]))

    def _resume(self, text):
        """A message that shares the text read up to a mark (a line end in a reasoning block) is parsed on from
        there: the work is the text after the mark, not the whole message. None when it shares no mark (`text`
        starts_alike the text read)."""
        mark = next((m for m in reversed(self.splitter.marks) if self._raw.kept_prefix_of(text, m.offset)), None)
        if mark is None:
            return None
        dropped = self.splitter.rewind(mark)
        self.splitter.feed(text[mark.offset:])
        self._take_raw(text, mark.offset)
        again = self.splitter.since(mark)
        if self._sent is None and grown(again, dropped):
            return growth(again, dropped)
        if self._sent is None:  # what was sent: each side as it stood at the mark, and what it had shown since
            self._sent = (self.splitter.reasoning.kept.copy(mark.reasoning[0], dropped[0]),
                          self.splitter.answer.kept.copy(mark.answer[0], dropped[1]))
        return self._catch_up(self._sent)

    def _rewritten(self, text):
        """A snapshot in pieces' form whose markup changed (Open WebUI rewrites the reasoning tag), read anew: kept
        if its texts only grew, else None (it is a piece). Tried once pieces have been snapshots, or for one as
        long as the text so far that opens with the same SNAPSHOT_HEAD_CHARS characters (a rewrite can come as early
        as the second frame); an incremental piece does neither."""
        fresh = MarkupSplitter()
        fresh.feed(text)
        before = self._sent or self._sides()
        if not all(side.prefix_of(new) for side, new in zip(before, fresh.texts())):
            return None
        self.snapshots = True
        return self._adopt(fresh, text)

    def _sides(self):
        return self.splitter.reasoning.kept, self.splitter.answer.kept

    def _adopt(self, splitter, raw):
        """A message read anew takes the place of the one read: what it adds to what was sent."""
        reasoning, answer = self._sides()
        self._sent = sent = self._sent or (reasoning.copy(), answer.copy())
        self.splitter = splitter
        self._take_raw(raw)
        return self._catch_up(sent)

    def _take_raw(self, text, known=0):
        """The text read is now `text`, whose first `known` characters are those read already (whose digest is
        kept on when part of them was forgotten; else `text` itself is kept, not a copy)."""
        if known and self._raw.kept_chars < self._raw.length:
            self._raw.cut(known)
            self._raw.append(text[known:])
        else:
            self._raw.reset(text)
        self._pieces, self._head = 1 if text else 0, text[:SNAPSHOT_HEAD_CHARS]

    def _emit(self, shown):
        """What the parse showed, while it is level with what was sent; else what it now adds to that."""
        return shown if self._sent is None else self._catch_up(self._sent)

    def _catch_up(self, sent):
        """What the message read adds to `sent`, once it has grown past it (both texts from the start)."""
        added = [side.added_to(before) for side, before in zip(self._sides(), sent)]
        if None in added:
            return "", ""
        self._sent = None
        return added[0], added[1]

    def finish(self):
        return self._emit(self.splitter.finish())

    def raw_text(self):
        """The message as upstream sent it, markup and all (kept whole only with `keep`)."""
        return self._raw.text()

    def is_empty(self):
        """Whether the answer, once finished, held no reasoning and no answer at all."""
        return not (self.splitter.reasoning.kept.length or self.splitter.answer.kept.length)


def bare_task_id(fields):
    """Whether an answer held a task_id and no text frame at all: Open WebUI sent the answer over its websocket."""
    return "task_id" in fields and not fields & {"content", "choices", "delta", "output"}


def no_content_error(content_type, fields):
    """The error for an answer that held no text at all, saying what it did hold."""
    message = (f"upstream answered {content_type or 'no content type'} without any text "
               f"(it held: {', '.join(sorted(fields)) or 'nothing'})")
    if bare_task_id(fields):
        message += ("; a bare task_id means Open WebUI delivered the answer over its websocket instead, so the "
                    "site's protocol has changed: see 'The site moved again' in the README")
    else:
        message += "; check that the model in MODELS is still served (GET /v1/models in user mode)"
    return UpstreamError(NO_CONTENT, message)


HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def blocked_error(status, body):
    """The error for an HTML page where a chat answer belongs: a bot check or a maintenance page."""
    title = HTML_TITLE.search(body)
    named = f" titled '{safe_summary(title.group(1))}'" if title else ""
    return UpstreamError(BLOCKED, f"upstream answered an HTML page{named} (HTTP {status}) instead of a chat answer: "
                                  "a bot check or a maintenance page; open K2THINK_BASE_URL in a browser on this "
                                  "server to see it")


def site_error(status, detail, retry_after=None):
    """The UpstreamError for a failed answer, from its status and what it said (error_detail of its body)."""
    shown = f"upstream answered HTTP {status}" + (f": {detail}" if detail else "")
    if "model not found" in detail.lower():
        return UpstreamError(MODEL_GONE, shown)
    if status in (401, 403):
        return UpstreamError(REFUSED_TOKEN, shown + " (the account token was refused)")
    alike = status_failure(status, shown, retry_after)
    if alike:
        return alike
    if 300 <= status < 400:
        return UpstreamError(NOT_AN_ANSWER, shown + " (redirect not followed)")
    if status < 500:
        return UpstreamError(NOT_AN_ANSWER, shown)
    return UpstreamError(BROKEN, shown)


class SiteReader:
    """The site's frames, read by network read into Deltas: for requests, --check and tests alike."""

    def __init__(self, keep=False):
        self.text = UpstreamText(keep)
        self.whole_reasoning, self.whole_answer = WholeText(), WholeText()
        self.fields = set()  # the top-level keys of every frame: what an answer without text did hold
        self.frames = 0
        self.finished = False  # a finish reason came: only a done event (whose content is read) may follow

    def read(self, frames):
        """What frames that arrived together add; the answer has ended at a done event."""
        reasoning, answer, delta = [], [], Delta()
        for frame in frames:
            self.frames += 1
            self.fields.update(frame.fields)
            if frame.error:
                delta.error = site_error(502, frame.error)
                break
            more_reasoning, more_answer = self.text.read(frame)
            reasoning.append(more_reasoning)
            answer.append(more_answer)
            delta.usage = frame.usage or delta.usage
            delta.finish_reason = frame.finish_reason or delta.finish_reason
            self.finished = self.finished or frame.finish_reason is not None
            if frame.done:
                delta.ended = True
                break
        delta.reasoning = self.whole_reasoning.add("".join(reasoning))
        delta.text = self.whole_answer.add("".join(answer))
        return delta

    def finish(self):
        """The (reasoning, answer) held back until the end."""
        reasoning, answer = self.text.finish()
        reasoning = self.whole_reasoning.add(reasoning) + self.whole_reasoning.finish()
        return reasoning, self.whole_answer.add(answer) + self.whole_answer.finish()


# ─── Files ───────────────────────────────────────────────────────────────────
# The token, account and API key files: read by polling (which sees editors'
# renames and bind mounts alike), saved atomically, parsed by pure functions.


class WatchedFile:
    """A file polled for changes, which sees editors' renames and bind mounts alike; reads run in a thread."""

    def __init__(self, path):
        self.path = Path(path)
        self.state = "unread"
        self.seen = None  # a change seen at the last poll and not read yet: taken once the file stays as it is
        self.version = file_version("")  # of the text last read or saved, which what was loaded from it matches
        self._unreadable = "not yet"  # the state last reported unreadable, so that it is reported once
        self._open_mode_told = False  # the warning about a file others may read is given once

    def stat(self):
        try:
            found = self.path.stat()
        except OSError:
            return None
        return (found.st_ino, found.st_mtime_ns, found.st_size)

    def read(self):
        """The file's text and state; a missing file reads as empty, an unreadable one (a directory, no
        permission) as None, which keeps what was loaded and is tried again at the next poll. A byte-order
        mark (Windows Notepad) is dropped."""
        state = self.stat()
        try:
            text = self.path.read_text(encoding="utf-8-sig", errors="replace")
        except FileNotFoundError:
            return "", None
        except OSError as exc:
            if state != self._unreadable:
                log.error("%s cannot be read (%s); keeping what was loaded from it", self.path,
                          exc.strerror or type(exc).__name__)
            self._unreadable = state
            return None, self.state
        if self.stat() != state:  # written while it was read (half a file): the next poll reads it whole
            return None, self.state
        self.tell_open_mode()
        return text, state

    def tell_open_mode(self):
        """Warns once when others than its owner may read the file, which holds secrets."""
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
        except OSError:
            return
        if mode & 0o077 and not self._open_mode_told:
            self._open_mode_told = True
            log.warning("%s holds secrets but others may read it (mode %o): chmod 600 %s; k2proxy saves it 0600",
                        self.path, mode, self.path)

    async def changes(self, force=False):
        """The file's text when it changed since the last call and has stayed as it is since the poll that saw the
        change (a file rewritten in place is not taken cut inside a line), or at once at the first call or with
        `force`; else None."""
        found = await asyncio.to_thread(self.stat)
        if found == self.state and not force:
            return None
        if self.state != "unread" and found != self.seen and not force:
            self.seen = found
            return None
        text, self.state = await asyncio.to_thread(self.read)
        if text is not None:
            self.version = file_version(text)
        return text

    async def parsed_changes(self, parse, line_form):
        """What `parse` makes of the file when it changed, else None; a file with a line that does not parse (a
        half-written one, a typo) is not taken: what was loaded before stays, and the lines are named."""
        text = await self.changes()
        if text is None:
            return None
        entries, bad = parse(text)
        if bad:
            log.warning("%s: lines %s are not %s; keeping what was loaded before until the file is fixed",
                        self.path, ", ".join(map(str, bad)), line_form)
            return None
        return entries

    def rewrite(self, make_content, version=None):
        """Replaces the file's text with what `make_content` makes of it, unless it changed since `version`
        (FileChanged); lines another writer appends meanwhile are not lost, but added after (blocking: run it in a
        thread). The next poll sees no change. Returns the text written."""
        try:
            old = self.path.open("rb")
        except FileNotFoundError:
            old = None
        with old or contextlib.nullcontext():
            current = (old.read() if old else b"").decode("utf-8-sig", "replace")
            if version is not None and file_version(current) != version:
                raise FileChanged()
            content = make_content(current)
            write_atomically(self.path, content)
            appended = old.read() if old else b""  # written to the file this one replaced, after it was read
        self.state, self.version = self.stat(), file_version(content)
        if appended:
            text = appended.decode("utf-8", "replace")
            return self.rewrite(lambda now: now + ("" if now.endswith("\n") else "\n") + text)
        return content


class FileChanged(Exception):
    """A file changed since the version a save was based on."""


def write_atomically(path, content):
    """Saves a file so that a crash leaves the old one or the new one, never half: temporary file, fsync,
    rename; readable by its owner only (0600), as the files it saves hold secrets."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp makes it 0600
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def file_version(text):
    """A short fingerprint of a file's text, so a save can tell that the file changed since it was loaded;
    line endings and a byte-order mark do not count, as reading the file drops them."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def file_text(lines, old_text):
    """A file holding `lines` under the comment lines of the file it replaces."""
    comments = [line for line in old_text.splitlines() if line.strip().startswith("#")]
    return "\n".join(comments + list(lines)) + "\n"


def parse_accounts_file(text):
    """(email, password) pairs of an accounts file: email:password or JSON lines; bad lines are skipped by number."""
    accounts, bad = {}, []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                entry = json.loads(line)
                email, password = entry["email"], entry["password"]
            except (ValueError, KeyError, TypeError):
                email = password = None
        else:
            email, _, password = line.partition(":")
        if isinstance(email, str) and isinstance(password, str) and "@" in email and password:
            accounts[email.strip()] = password
        else:
            bad.append(number)
    return list(accounts.items()), bad


# ─── Credentials ─────────────────────────────────────────────────────────────
# A pool of credentials of one kind (the site's account JWTs, IFM API keys),
# taken round-robin; each failure's policy charges, rests or spares the
# credential; expired JWTs are never sent. Reading a pool's state never changes
# it. Offers the upstream kinds acquire(), succeed() and fail(), and the admin
# API the pool's state and each credential's last hour, minute by minute
# (Minutes, which the monitoring below uses too).

HOUR_MINUTES = 60


class Minutes:
    """Per-minute buckets of the last hour, each made by `new` when a minute is first written to."""

    def __init__(self, new):
        self.new = new
        self.buckets = collections.OrderedDict()  # minute → bucket, oldest first

    def at(self, now):
        """The bucket of the minute `now` (in epoch seconds) falls in."""
        minute = int(now // 60)
        bucket = self.buckets.get(minute)
        if bucket is None:
            bucket = self.buckets[minute] = self.new()
            while next(iter(self.buckets)) <= minute - HOUR_MINUTES:
                self.buckets.popitem(last=False)
        return bucket

    def last_hour(self, now):
        """(minute, bucket or None) for each of the 60 minutes up to `now`, oldest first."""
        minute = int(now // 60)
        return [(m, self.buckets.get(m)) for m in range(minute - HOUR_MINUTES + 1, minute + 1)]


@dataclass
class Uses:
    """A credential's minute: the requests it served and the failures charged to it."""
    requests: int = 0
    failures: int = 0


def jwt_expiry(token):
    """The `exp` of a JWT read without its key, or None when the token is not a JWT with one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = object_in(payload).get("exp")
    return float(exp) if is_number(exp) else None


def mask_token(token):
    """A token as shown anywhere but the token editor: enough to recognise, never enough to use."""
    if len(token) <= 12:
        return "…" + token[-2:]
    return f"{token[:4]}…{token[-3:]}"


class CredentialState(str, enum.Enum):
    ACTIVE = "active"
    COOLING = "cooling"     # resting after a rate limit, until cooling_until
    DISABLED = "disabled"
    EXPIRED = "expired"


class Disabled(str, enum.Enum):
    """Why a credential is disabled: failures (it comes back on probation after TOKEN_COOLDOWN) or refusal."""
    FAILURES = "failures"
    REFUSED = "auth"


@dataclass(eq=False)
class Credential:
    value: str = field(repr=False)
    expires_at: float | None = None
    failures: int = 0
    requests: int = 0
    successes: int = 0
    last_used: float | None = None
    last_error: str | None = None
    disabled: Disabled | None = None
    disabled_at: float | None = None
    cooling_until: float | None = None
    account: str | None = None
    refused: bool = False  # upstream refused it: its account is to sign in again
    errors: int = 0               # failed requests, in all
    day: int | None = None               # the UTC day tokens_today counts
    tokens_today: int = 0         # prompt and completion tokens of its answers on that day
    budget_left: int | None = None       # the daily budget upstream says is left (x-ratelimit-remaining-tokens-daily)
    answered: bool | None = None  # how its last request ended: answered, or failed; None before its first
    minutes: Minutes = field(default_factory=lambda: Minutes(Uses), repr=False)

    def health(self):
        """What of its state other processes serving the same pool may share."""
        return Health(self.cooling_until, self.disabled and self.disabled.value, self.disabled_at, self.budget_left,
                      self.last_error)

    def take_health(self, health):
        self.cooling_until, self.disabled_at = health.cooling_until, health.disabled_at
        self.budget_left, self.last_error = health.budget_left, health.last_error
        self.disabled = Disabled(health.disabled) if health.disabled else None

    def tokens_on(self, day):
        """Its tokens on that UTC day (counted from 0 on a new day)."""
        if self.day != day:
            self.day, self.tokens_today = day, 0
        return self.tokens_today

    def add_tokens(self, tokens):
        """Tokens counted elsewhere (another replica's answers) join today's count."""
        self.tokens_today += tokens


class Health(typing.NamedTuple):
    """The part of a credential's state that may be shared: its rest, why and since when it is disabled, the budget
    upstream says it has left, its last error."""
    cooling_until: float | None = None
    disabled: str | None = None
    disabled_at: float | None = None
    budget_left: int | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class Anonymous:
    """Who a request is without a credential (a guest, a keyless server): nothing to send, nothing to charge."""
    value: str = ""


NO_CREDENTIAL = Anonymous()
DAY_SECONDS = 86400
RATE_LIMIT_REST = 60  # seconds a rate-limited credential rests when upstream gives no Retry-After
LAST_ERROR_CHARS = 200


def article(noun):
    """'a token', 'an IFM key'."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


class CredentialPool:
    """The credentials of one file (and `fixed` ones of a setting), with their health; requests take them
    round-robin. `anonymous` pools serve without any credential while they hold none."""

    def __init__(self, name, path, settings, anonymous=False, fixed=(), noun="token", clock=time.time,
                 fixed_from=""):
        self.name = name
        self.noun = noun
        self.file = WatchedFile(path)
        self.anonymous = anonymous
        self.fixed = list(fixed)
        self.fixed_from = fixed_from  # the setting `fixed` comes from
        self.max_failures = settings.max_token_failures
        self.cooldown = settings.token_cooldown
        self.clock = clock
        self.credentials = []
        self._next = 0

    def load(self, text, readmit=False):
        """Replaces the file's credentials with those of `text`; credentials still present keep their stats."""
        known = {held.value: held for held in self.credentials if not held.account}
        values = dict.fromkeys([*self.fixed, *parse_tokens_file(text)])
        self.credentials = [known.get(value) or Credential(value, jwt_expiry(value))
                            for value in values] + [held for held in self.credentials if held.account]
        self._next = 0
        if readmit:
            for credential in self.credentials:
                self.reset(credential)

    def put_account_token(self, account, value, expires_at):
        """Gives an account its fresh token; the account's figures carry over."""
        held = next((c for c in self.credentials if c.account == account), None)
        if held is None:
            self.credentials.append(Credential(value, expires_at, account=account))
            return
        held.value, held.expires_at = value, expires_at
        self.reset(held)

    def drop_account(self, account):
        self.credentials = [c for c in self.credentials if c.account != account]
        self._next = 0

    def state(self, credential, now):
        """A credential's state, read without changing it: one disabled by failures is active again (on
        probation) once TOKEN_COOLDOWN has passed."""
        if credential.expires_at is not None and credential.expires_at <= now:
            return CredentialState.EXPIRED
        if credential.disabled and not self._probation_over(credential, now):
            return CredentialState.DISABLED
        if credential.cooling_until and credential.cooling_until > now:
            return CredentialState.COOLING
        return CredentialState.ACTIVE

    def _probation_over(self, credential, now):
        return credential.disabled is Disabled.FAILURES and now - credential.disabled_at >= self.cooldown

    def acquire(self, tried=()):
        """The next usable credential not yet tried, NO_CREDENTIAL for an empty anonymous pool, or None. One back
        from its cooldown is taken on probation: one more failure disables it again."""
        if not self.credentials:
            return NO_CREDENTIAL if self.anonymous else None
        now = self.clock()
        count = len(self.credentials)
        for step in range(count):
            credential = self.credentials[(self._next + step) % count]
            if credential not in tried and self.state(credential, now) is CredentialState.ACTIVE:
                if credential.disabled:
                    credential.disabled, credential.failures = None, self.max_failures - 1
                self._next = (self._next + step + 1) % count
                credential.requests += 1
                credential.last_used = now
                credential.minutes.at(now).requests += 1
                return credential
        return None

    def usable(self):
        """Some usable credential, for side requests (the model list) that should not disturb the rotation."""
        now = self.clock()
        return next((c for c in self.credentials if self.state(c, now) is CredentialState.ACTIVE), None)

    def succeed(self, credential):
        if credential is NO_CREDENTIAL:
            return
        credential.failures = 0
        credential.successes += 1
        credential.answered = True

    def fail(self, credential, error):
        """Applies the failure's policy: a rest for a rate limit, a charge when the credential was to blame. A failure
        that may be upstream's (a 5xx, a timeout, a broken answer) is charged only while another credential is seen
        working; else it is returned, for the caller to charge if another one answers the same request."""
        if credential is NO_CREDENTIAL:
            return None
        failure, now = error.failure, self.clock()
        credential.last_error = str(error)[:LAST_ERROR_CHARS]
        credential.errors += 1
        credential.answered = False
        credential.minutes.at(now).failures += 1
        if failure.cool_down:
            credential.cooling_until = now + (error.retry_after or RATE_LIMIT_REST)
        if not failure.charge:
            return None
        if failure.maybe_upstreams and not any(held.answered for held in self.credentials if held is not credential):
            return error
        self.charge(credential, error)
        return None

    def failing_everywhere(self):
        """Whether every usable credential's last request failed: upstream's outage, which a further attempt of the
        same request would only prolong (each request is one probe until something answers)."""
        now = self.clock()
        usable = [held for held in self.credentials if self.state(held, now) is CredentialState.ACTIVE]
        return bool(usable) and all(held.answered is False for held in usable)

    def charge(self, credential, error):
        """Counts a failure against the credential; MAX_TOKEN_FAILURES in a row (or one refusal) disables it."""
        failure, now = error.failure, self.clock()
        credential.failures += 1
        credential.refused = failure.refused and credential.account is not None
        if failure.disables:
            log.warning("%s %s disabled: %s", self.noun, mask_token(credential.value), error)
        if credential.failures >= self.max_failures or failure.disables:
            credential.disabled = Disabled.REFUSED if failure.refused else Disabled.FAILURES
            credential.disabled_at = now

    def refused_accounts(self):
        """The accounts whose token upstream refused since they last signed in."""
        return [held.account for held in self.credentials if held.refused]

    def forget_refusal(self, account):
        """The account signs in again: the refusal is answered, and a failed sign-in waits out its backoff."""
        for held in self.credentials:
            if held.account == account:
                held.refused = False

    def index_of(self, credential):
        """A credential's place in the pool; None for NO_CREDENTIAL, or for one the file no longer holds."""
        return next((index for index, held in enumerate(self.credentials) if held is credential), None)

    def reset(self, credential):
        credential.failures = 0
        credential.refused = False
        credential.disabled = credential.disabled_at = credential.cooling_until = credential.last_error = None

    def spent(self, credential, tokens, budget_left):
        """Counts an answer's tokens against today's, and notes the daily budget upstream says is left (a budget at
        0 rests the credential until the next UTC day); `tokens` is 0 for an answer that failed."""
        if credential is NO_CREDENTIAL:
            return
        day = int(self.clock() // DAY_SECONDS)
        if credential.day != day:
            credential.day, credential.tokens_today = day, 0
        credential.tokens_today += tokens
        if budget_left is not None:
            credential.budget_left = budget_left
            if budget_left <= 0:
                credential.cooling_until = (day + 1) * DAY_SECONDS

    def counts(self):
        now = self.clock()
        counts = dict.fromkeys(("total", *(state.value for state in CredentialState)), 0)
        for credential in self.credentials:
            counts[self.state(credential, now).value] += 1
        counts["total"] = len(self.credentials)
        return counts

    def stats(self):
        now = self.clock()
        rows = []
        for index, held in enumerate(self.credentials):
            state = self.state(held, now)
            rows.append({"index": index, "masked": mask_token(held.value), "status": state.value,
                         "account": held.account, "failures": held.failures, "errors": held.errors,
                         "requests": held.requests,
                         "successes": held.successes, "last_used": held.last_used, "last_error": held.last_error,
                         "expires_at": held.expires_at,
                         "cooling_until": held.cooling_until if state is CredentialState.COOLING else None,
                         "tokens_today": held.tokens_today if held.day == int(now // DAY_SECONDS) else 0,
                         "budget_left": held.budget_left,
                         "last_hour": [[bucket.requests, bucket.failures] if bucket else [0, 0]
                                       for _, bucket in held.minutes.last_hour(now)]})
        return rows

    def ready(self):
        """None when a request could be served now, else the error it would get."""
        if self.usable() or (not self.credentials and self.anonymous):
            return None
        return self.unavailable()

    def unavailable(self):
        """The error for a request that found no usable credential."""
        if not self.credentials:
            return ApiError(503, f"No tokens: put account tokens in {self.file.path.name}, one per line",
                            code="no_tokens")
        now = self.clock()
        states = [self.state(c, now) for c in self.credentials]
        cooling = [c.cooling_until - now for c, state in zip(self.credentials, states)
                   if state is CredentialState.COOLING]
        if cooling and all(state in (CredentialState.COOLING, CredentialState.ACTIVE) for state in states):
            return ApiError(429, f"Every {self.noun} is rate limited by upstream; try again later",
                            code="rate_limited", retry_after=max(1, round(min(cooling))))
        return ApiError(503, f"No usable {self.noun} left in {self.file.path.name} (disabled or expired); "
                             f"fix the file or reset them on the admin page", code="no_usable_tokens")

    async def reload(self, force=False, announce=True):
        """Loads the file if it changed, and says what it holds now unless `announce` is False; `force` reads it
        anyway and re-admits disabled credentials."""
        text = await self.file.changes(force)
        if text is None:
            return False
        self.load(text, readmit=force)
        if announce:
            log.log(logging.WARNING if self.missing() else logging.INFO, "%s pool: %s", self.name, self.held())
        return True

    def missing(self):
        """Whether the pool holds nothing while it needs a credential to serve."""
        return not self.credentials and not self.anonymous

    def held(self):
        """What the pool holds, in words: how many, and from where."""
        file = self.file.path.name
        if not self.credentials:
            return (f"no {self.noun} ({file} not found or empty): requests go without {article(self.noun)}"
                    if self.anonymous else f"no {self.noun} ({file} not found or empty): nothing can be served")
        from_file = len(self.credentials) - len(self.fixed) - sum(1 for held in self.credentials if held.account)
        sources = ([f"{len(self.fixed)} from {self.fixed_from}"] if self.fixed else []) + [f"{from_file} from {file}"]
        return f"{plural(len(self.credentials), self.noun)} ({', '.join(sources)})"


# ─── Upstream client ─────────────────────────────────────────────────────────
# What every upstream kind shares: one HTTP session for the process, an
# exchange that turns each way a connection fails into an UpstreamError, the
# answers in flight (ended at shutdown), failover (the one driver of attempts
# from credential to credential) and keep_polling, the one shape of every
# background loop (file watchers, sign-ins, model lists).

ERROR_BODY_BYTES = 64 * 1024  # of an error answer, a sign-in answer or an HTML page
DNS_CACHE_SECONDS = 300
TOKEN_FILE_POLL_SECONDS = 0.5  # edits to a watched file take effect within two polls: one sees the change, the
# next takes it, once the file has stayed as it is (well within the 2 s the README promises)


async def read_body(response, limit):
    """The body up to `limit` bytes, or what arrived before the connection broke; one `read(n)` returns only
    what has arrived, so read until the end."""
    parts, size = [], 0
    while size < limit:
        try:
            chunk = await response.content.read(limit - size)
        except ClientError:
            break
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


WAITING_CHUNKS_BYTES = 256 * 1024  # of an answer read ahead of its consumer, before reading pauses (then aiohttp
# buffers 128 KB more, and the network holds the rest: upstream waits, as the client does)


async def arrived_chunks(response):
    """The chunks of an answer's body, read by a task of its own as they arrive: aiohttp raises a broken
    connection before the data it still holds, so a consumer slower than the network (a WebSocket, a slow client)
    would lose an answer's end to a connection torn down after it, as the site's are. Reading pauses while
    WAITING_CHUNKS_BYTES wait."""
    waiting: collections.deque[bytes] = collections.deque()
    arrived, room = asyncio.Event(), asyncio.Event()
    ended: list[BaseException | None] = []  # [None] at the body's end, [the error] when reading it failed
    held = 0

    async def read():
        nonlocal held
        try:
            async for chunk in response.content.iter_any():
                waiting.append(chunk)
                held += len(chunk)
                arrived.set()
                while held > WAITING_CHUNKS_BYTES:
                    room.clear()
                    await room.wait()
            ended.append(None)
        except (ClientError, OSError, asyncio.TimeoutError) as exc:
            ended.append(exc)
        arrived.set()

    reader = asyncio.ensure_future(read())
    try:
        while True:
            while waiting:
                chunk = waiting.popleft()
                held -= len(chunk)
                room.set()
                yield chunk
            if ended:
                if ended[0] is not None:
                    raise ended[0]
                return
            arrived.clear()
            if not waiting and not ended:
                await arrived.wait()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def keep_polling(step, wake=None):
    """Runs `step` again and again, waiting the seconds it returns (or until `wake` is set); a step that fails
    unexpectedly is logged and tried again TOKEN_FILE_POLL_SECONDS later, so no background loop dies."""
    while True:
        if wake:
            wake.clear()  # before the step: a wake-up during it must still cut the next wait short
        try:
            seconds = await step()
        except Exception:
            log.exception("a background task failed; trying again in %g s", TOKEN_FILE_POLL_SECONDS)
            seconds = TOKEN_FILE_POLL_SECONDS
        if wake is None:
            await asyncio.sleep(seconds)
            continue
        try:
            await asyncio.wait_for(wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass


class HttpClient:
    """The process's HTTP session to upstream, and the answers in flight, which stop() ends."""

    def __init__(self, settings):
        self.request_timeout = settings.request_timeout
        self.timeout = ClientTimeout(total=None, sock_connect=settings.request_timeout,
                                     sock_read=settings.request_timeout)
        self.session: ClientSession | None = None
        self.responses = set()
        self.stopping = False
        self.unreachable = 0          # connection failures in a row, for /health
        self.unreachable_host = None

    async def open(self):
        self.session = ClientSession(connector=TCPConnector(limit=0, ttl_dns_cache=DNS_CACHE_SECONDS),
                                     timeout=self.timeout, auto_decompress=True)

    async def stop(self):
        """Ends every upstream answer in flight, so each client gets its stream's end, and closes the session:
        requests still waiting for upstream's first byte end too. The one place the session is closed."""
        self.stopping = True
        for response in list(self.responses):
            response.close()
        if self.session:
            await self.session.close()

    def stopped(self):
        return UpstreamError(SHUTTING_DOWN, "the proxy is shutting down")

    @contextlib.asynccontextmanager
    async def exchange(self, url, body, headers):
        """POSTs `body` and gives the response to read; a failure to connect, a silence past REQUEST_TIMEOUT or a
        connection broken mid-answer becomes the UpstreamError of its kind."""
        session = self.session
        if self.stopping or session is None:  # closed, or not opened yet
            raise self.stopped()
        try:
            response = await session.post(url, data=body, headers=headers, allow_redirects=False)
        except asyncio.TimeoutError:
            raise UpstreamError(TIMED_OUT, f"upstream did not answer within {self.request_timeout:g} s") from None
        except ServerDisconnectedError:  # reached, then dropped before its answer (a whole answer cut short)
            if self.stopping:
                raise self.stopped() from None
            raise UpstreamError(BROKEN, "upstream closed the connection before it answered") from None
        except (ClientError, OSError) as exc:
            if self.stopping:
                raise self.stopped() from None
            self.unreachable += 1
            self.unreachable_host = urllib.parse.urlsplit(url).netloc
            raise UpstreamError(UNREACHABLE, f"cannot reach upstream {self.unreachable_host} ({type(exc).__name__});"
                                " check the URL setting and this server's network: python k2proxy.py --check "
                                "says what fails") from None
        self.unreachable = 0
        self.responses.add(response)
        try:
            yield response
            if self.stopping:
                raise self.stopped()
        except asyncio.TimeoutError:
            raise UpstreamError(TIMED_OUT, f"upstream sent nothing for {self.request_timeout:g} s") from None
        except (ClientError, OSError) as exc:
            if self.stopping:
                raise self.stopped() from None
            raise UpstreamError(BROKEN, f"upstream connection broke mid-answer ({type(exc).__name__})") from None
        finally:
            self.responses.discard(response)
            response.close()


BACKOFF_FIRST, BACKOFF_MAX = 0.25, 4.0  # seconds before the next attempt after a server failure, doubling
OVERLOAD_BACKOFF = 4       # times longer after a 529


def backoff(failure, attempt):
    """Seconds to wait before attempt number `attempt + 1`, with jitter, after a server failure; 0 after others."""
    if failure not in (SERVER_FAILED, SERVER_OVERLOADED, TIMED_OUT):
        return 0
    base = BACKOFF_FIRST * (OVERLOAD_BACKOFF if failure is SERVER_OVERLOADED else 1)
    return min(BACKOFF_MAX, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


class AttemptProgress(typing.Protocol):
    """What one attempt has produced: the events each Delta adds, and the closing ones once its answer is whole."""
    finish_reason: str | None

    def events(self, delta: Delta) -> list[Event]: ...

    def closing(self, prompt_tokens: int) -> list[Event]: ...


class Attempts(typing.Protocol):
    """What an upstream kind gives `failover`: its credentials, how the log names one, a fresh progress, and one
    attempt with one credential (the kind's payload and headers are its own)."""

    @property
    def pool(self) -> "CredentialPool": ...

    def named(self, credential: "Credential") -> str: ...

    def progress(self, core: CoreRequest) -> AttemptProgress: ...

    def attempt(self, core: CoreRequest, body: bytes, credential: "Credential",
                progress: AttemptProgress) -> typing.AsyncIterator[list[Event]]: ...

    async def settle(self, core: CoreRequest, credential: "Credential", progress: AttemptProgress,
                     closing: list[Event]) -> None: ...


async def failover(kind, core, body, max_retries):
    """The completion's events, attempt by attempt, from one credential of the kind's pool to the next: each
    attempt opens with an Attempt; a failure another credential may do better on is charged as its policy says (one
    that may be upstream's once another credential answers), logged, and followed (unless every credential is
    failing) by a Restart (the core voids what the client has not seen) and, after a server's failure,
    a pause; an answer that came whole is the credential's success, then its closing events."""
    pool = kind.pool
    tried: list[Credential] = []
    uncharged: list[tuple[Credential, UpstreamError]] = []  # failures that may be upstream's, until one answers
    error: UpstreamError | None = None
    for _ in range(max_retries + 1):
        credential = pool.acquire(tried)
        if credential is None:
            break
        if error:  # a server that failed gets a moment before the next credential asks it again
            await asyncio.sleep(backoff(error.failure, len(tried)))
        tried.append(credential)
        yield Attempt(len(tried), pool.index_of(credential))
        progress = kind.progress(core)
        try:
            async with contextlib.aclosing(kind.attempt(core, body, credential, progress)) as read:
                async for events in read:
                    yield events
        except UpstreamError as caught:
            failure = caught.without(credential.value)
            if pool.fail(credential, failure):
                uncharged.append((credential, failure))
            log.info("upstream attempt %d failed (%s) %s: %s", len(tried), kind.named(credential),
                     failure.failure.code, failure)
            if not worth_another_try(failure.failure, credential) or (failure.failure.maybe_upstreams
                                                                        and pool.failing_everywhere()):
                raise failure from None
            error = failure
            yield Restart(failure)
            continue
        pool.succeed(credential)
        for failed, failure in uncharged:  # they failed where this one answered: their own failure
            pool.charge(failed, failure)
        closing = progress.closing(core.prompt_tokens)  # may still fail: an answer without the JSON asked for
        await kind.settle(core, credential, progress, closing)
        yield closing
        return
    raise error or pool.unavailable()


def worth_another_try(failure, credential):
    """Whether the next attempt may do better: the kind fails over, and without a credential (one identity),
    asking again is worth it for this kind (not after a timeout, which would only double the wait, nor a 429)."""
    return failure.fail_over and (credential is not NO_CREDENTIAL or failure.retry_anonymous)


# ─── Upstream: the web site ──────────────────────────────────────────────────
# The K2Think web site (an Open WebUI deployment) as an upstream kind: its two
# modes (guest, user) and their token pools, the browser-like headers it
# expects, the chat payload its working public clients send, and tool calling
# emulated in text (the site has no native function calling). Offers
# SiteUpstream, whose complete() yields a completion's events attempt by
# attempt, failing over from token to token as each failure's policy allows.

CHROME_VERSION = 142
BROWSER_USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
                      f"(KHTML, like Gecko) Chrome/{CHROME_VERSION}.0.0.0 Safari/537.36")
CLIENT_HINTS = {  # what this Chrome on Windows sends with every request
    "sec-ch-ua": f'"Chromium";v="{CHROME_VERSION}", "Google Chrome";v="{CHROME_VERSION}", "Not_A Brand";v="99"',
    "sec-ch-ua-mobile": "?0", "sec-ch-ua-platform": '"Windows"'}


SITE_PARAMS = ("temperature", "top_p", "max_tokens", "stop")  # the sampling options the site is known to read


def site_messages(core):
    """The conversation as the site takes it: tool calls and results become the text the model is told to write
    and read, every assistant turn carries the thinking field the site requires (never the reasoning a client sends
    back), and the tool prompt and the answer's format join the system message (or come first, when there is
    none)."""
    messages = []
    for turn in core.turns:
        if turn.role == "assistant":
            blocks = [render_call(call.name, call.arguments) for call in turn.calls]
            messages.append({"role": "assistant", "content": "\n".join(filter(None, [turn.text, *blocks])),
                             "reasoning": ""})
        elif turn.role == "tool":
            text = render_tool_result(turn.name, turn.call_id, turn.text, turn.failed)
            messages.append({"role": "user", "content": content_of(
                [text_part(text), *(part for part in turn.parts if part["type"] != "text")])})
        else:
            messages.append({"role": turn.role, "content": content_of(turn.parts)})
    prompt = "\n\n".join(filter(None, (core.tools and tool_prompt(core.tools),
                                       core.answer_format and core.answer_format.prompt())))
    if prompt:
        if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages


def site_payload(model, messages, params, effort):
    """The chat payload the site's working public clients send, with the effort also where the chat template reads
    it (top-level chat_template_kwargs: the clients' extra_body is an SDK wrapper that may never reach it). Never
    chat_id, id and session_id together: with those, Open WebUI answers over the browser's websocket and the HTTP
    answer holds no text."""
    effort_field = {"reasoning_effort": effort}
    return {"stream": True, "model": model, "messages": messages, "params": params,
            "features": {"web_search": False}, "chat_template_kwargs": effort_field,
            "extra_body": {"chat_template_kwargs": effort_field}}


async def site_frames(response):
    """The frames of a site answer, one list per network read; SSE or one JSON document, decided by the content
    type; an error status or an HTML page raises its UpstreamError."""
    kind = response.content_type
    if response.status != 200 or kind == "text/html":
        body = (await read_body(response, ERROR_BODY_BYTES)).decode("utf-8", "replace")
        if kind == "text/html" and response.status != 429:
            raise blocked_error(response.status, body)
        raise site_error(response.status, error_detail(body), response.headers.get("Retry-After"))
    if kind == "application/json":
        frame = parse_frame((await read_body(response, MAX_FRAME_BYTES)).decode("utf-8", "replace"))
        if frame is None:
            raise UpstreamError(BROKEN, "upstream answered JSON that is not a chat answer")
        yield [frame]
        return
    if kind != "text/event-stream":
        raise UpstreamError(NOT_AN_ANSWER, f"upstream answered {kind or 'no content type'}, not a stream")
    decoder = SSEDecoder(parse_frame)
    chunks = arrived_chunks(response)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield decoder.feed(chunk)
    yield decoder.feed(b"", final=True)


class Progress(Counted):
    """What one upstream attempt has produced, as events: a failed attempt's progress is dropped whole."""

    def __init__(self, tools, show_reasoning, answer_format=None, limit=None):
        super().__init__(show_reasoning, limit)
        self.tools = tools
        self.scanner = ToolCallScanner(tools.names) if tools else None
        self.answer_format = answer_format
        self.holds = bool(answer_format or (tools and tools.forced))  # the answer's text waits for the end
        self.held = []  # the answer's text, while it must be JSON taken out at the end, or may be a forced call
        self.calls = 0
        self.upstream_usage = None
        self.finish_reason = None

    def events(self, delta):
        """The events for what upstream added: reasoning (up to an effort closer: what follows it is the answer),
        then answer text and the tool calls found in it."""
        self.upstream_usage = delta.usage or self.upstream_usage
        self.finish_reason = delta.finish_reason or self.finish_reason
        reasoning, answer = delta.reasoning, delta.text
        if reasoning:
            reasoning, after_closer = self.closer.feed(reasoning)
            answer = after_closer + answer
        return self._reasoning(reasoning) + self._answer(self.scanner.feed(answer) if self.scanner and answer
                                                         else [answer])

    def closing(self, prompt_tokens):
        """The last events: what the tool-call scanner held back (the JSON answer, when one was asked for), and
        the finish with its usage."""
        events = self._reasoning(self.closer.finish()) + (self._answer(self.scanner.finish()) if self.scanner else [])
        forced = self.tools and self.tools.forced and not self.calls and forced_call(self.tools, "".join(self.held))
        if forced:
            events += self._answer([forced])
        elif self.tools and self.tools.forced and not self.calls:
            events += [Text(text) for text in self.held]  # no call in it: the answer as it was
        elif self.answer_format and not self.calls:
            found = AnswerFormat.extract("".join(self.held))
            if found is None:
                raise UpstreamError(INVALID_JSON, "the model answered without the JSON object asked for "
                                                  "(response_format); try again, or ask in the prompt more plainly")
            events.append(Text(found))
        reason = "tool_calls" if self.calls else (
            self.finish_reason if self.finish_reason in UPSTREAM_FINISH_REASONS else "stop")
        return events + [Finish(reason, self.usage(prompt_tokens))]

    def _answer(self, pieces):
        events = []
        for piece in pieces:
            if isinstance(piece, ToolCall):
                events += [ToolCallStart(self.calls, uuid.uuid4().hex[:24], piece.name),
                           ToolArguments(self.calls, piece.arguments)]
                self.answer_chars += len(piece.arguments)
                self.calls += 1
            elif piece:
                self.answer_chars += len(piece)
                if self.holds:
                    self.held.append(piece)
                else:
                    events.append(Text(piece))
        return events

    def usage(self, prompt_tokens):
        return usage_of(self.upstream_usage, prompt_tokens, self.reasoning_chars, self.answer_chars)


DONE_GRACE_SECONDS = 1.0  # how long a done event (which may hold the answer's tail) may follow the finish chunk


async def site_deltas(response, reader):
    """The Deltas of a site answer, network read by network read, to its end: a done event, or a finish chunk with
    no done event in DONE_GRACE_SECONDS; after the finish, a connection torn down is the end, not an error."""
    frames = site_frames(response)
    async with contextlib.aclosing(frames):
        while True:
            try:
                batch = await (asyncio.wait_for(anext(frames), DONE_GRACE_SECONDS) if reader.finished
                               else anext(frames))
            except StopAsyncIteration:
                return
            except (asyncio.TimeoutError, ClientError, OSError):
                if reader.finished:
                    return
                raise
            delta = reader.read(batch)
            yield delta
            if delta.error or delta.ended:
                return


def origin_of(url):
    """The scheme://host[:port] of a URL: the Origin a browser sends from its pages."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class SiteUpstream:
    """The web site: the token pool of each mode, the active mode, and completions that fail over from token to
    token."""

    name = "site"

    def __init__(self, settings, http):
        self.settings = settings
        self.http = http
        self.mode = settings.proxy_mode
        self.pools = {"guest": CredentialPool("guest", settings.guest_tokens_file, settings, anonymous=True),
                      "user": CredentialPool("user", settings.user_tokens_file, settings)}
        self.urls = {"guest": settings.guest_api_url, "user": settings.user_api_url}
        self.origin = origin_of(settings.k2think_base_url)
        self.browser_headers = {"Origin": self.origin, "User-Agent": BROWSER_USER_AGENT, **CLIENT_HINTS,
                                "Content-Type": "application/json", "Accept": "text/event-stream, application/json"}

    @property
    def pool(self):
        return self.pools[self.mode]

    @property
    def url(self):
        return self.urls[self.mode]

    def headers(self, credential, mode=None):
        """The browser-like headers the web site expects (for the active mode, or `mode`), with the token."""
        referer = f"{self.origin}/" if (mode or self.mode) == "user" else f"{self.origin}/guest"
        headers = {**self.browser_headers, "Referer": referer}
        if credential.value:
            headers["Authorization"] = f"Bearer {credential.value}"
        return headers

    async def watch_tokens(self):
        """Reads the active token file when it changed: edits, editor renames and bind mounts all show up."""
        await self.pool.reload()
        return TOKEN_FILE_POLL_SECONDS

    def complete(self, core):
        """The completion's events, attempt by attempt from token to token (see failover)."""
        params = {name: value for name, value in core.params.items() if name in SITE_PARAMS}
        body = json_text(site_payload(core.upstream_model, site_messages(core), params, core.effort)).encode()
        return failover(self, core, body, self.settings.max_retries)

    def named(self, credential):
        who = "anonymous" if credential is NO_CREDENTIAL else f"token {self.pool.index_of(credential)}"
        return f"{self.pool.name} mode, {who}"

    def describe(self):
        return f"the web site at {self.url}, {self.mode} mode, {self.pool.held()}"

    def progress(self, core):
        return Progress(core.tools, core.show_reasoning, core.answer_format, answer_limit(self.settings, core))

    async def attempt(self, core, body, credential, progress):
        """One attempt: the events of each network read, until the answer's end."""
        async with self.http.exchange(self.url, body, self.headers(credential)) as response:
            reader = SiteReader()
            async for delta in site_deltas(response, reader):
                events = progress.events(delta)
                if events:
                    yield events
                if delta.error:
                    raise delta.error
        reasoning, answer = reader.finish()
        if reader.text.is_empty():
            raise no_content_error(response.content_type, reader.fields)
        events = progress.events(Delta(reasoning, answer))
        if events:
            yield events

    async def settle(self, core, credential, progress, closing):
        """Nothing to keep of a site answer once it came whole."""


# ─── Upstream: the official API ──────────────────────────────────────────────
# IFM's keyed, OpenAI-compatible API (api.ifm.ai), and self-hosted vLLM or
# SGLang servers, which speak the same: chat completions with K2's own rules
# (reasoning replayed on every assistant turn, text-only content, effort in the
# chat template, a session id that routes to the node holding the
# conversation), native tool calls and structured output, a daily token budget
# per key. Offers ApiUpstream, whose complete() yields a completion's events
# attempt by attempt, failing over from key to key.

API_END = "[DONE]"
REPLAY_ENTRY_MAX = 4 * MB  # reasoning longer than this is not kept for replay
MINUTE_GUARD_CODE = "token_rate_limit"
TOOL_FORMATS = {"tool_presentation_format": "xml", "tool_call_format": "xml"}


def api_chunk(payload):
    """One payload of the API's stream: its JSON object, API_END for [DONE], None for noise."""
    if payload == API_END:
        return API_END
    try:
        value = loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class CallPiece:
    """A piece of a streamed tool call: the first of a call has its id and name, the rest more arguments."""
    index: int
    name: str | None = None
    arguments: str = ""


class ApiReader:
    """The API's stream chunks, read by network read into Deltas (texts made whole, as WholeText makes them); the
    finish reason, once one came."""

    def __init__(self):
        self.finish_reason = None
        self.whole = collections.defaultdict(WholeText)  # "reasoning", "text", and each call's index

    def read(self, chunks):
        reasoning, text, delta = [], [], Delta()
        for chunk in chunks:
            if chunk is API_END:
                delta.ended = True
                break
            if isinstance(chunk.get("error"), dict):
                delta.error = UpstreamError(SERVER_FAILED, "upstream reported an error mid-answer: "
                                            + error_text(chunk["error"]))
                break
            choices = chunk.get("choices")
            part = object_in(choices[0]) if isinstance(choices, list) and choices else {}
            said = object_in(part.get("delta"))
            thought = said.get("reasoning_content")
            thought = thought if isinstance(thought, str) else said.get("reasoning")  # the mirror, when alone
            reasoning.append(thought if isinstance(thought, str) else "")
            content = said.get("content")
            text.append(content if isinstance(content, str) else "")
            delta.calls += [replace(piece, arguments=self.whole[piece.index].add(piece.arguments))
                            for call in said.get("tool_calls") or () if (piece := call_piece(call))]
            if isinstance(part.get("finish_reason"), str):
                self.finish_reason = delta.finish_reason = part["finish_reason"]
            if isinstance(chunk.get("usage"), dict):
                delta.usage = chunk["usage"]
        delta.reasoning = self.whole["reasoning"].add("".join(reasoning))
        delta.text = self.whole["text"].add("".join(text))
        return delta


def answer_delta(body):
    """The Delta of a whole (non-streamed) answer of the API: its message's reasoning (or its mirror), content and
    tool calls, its finish reason and usage; an UpstreamError for a body that is not such an answer."""
    try:
        value = loads(body)
    except ValueError:
        raise UpstreamError(TRUNCATED, "upstream's answer ended before it was whole (not JSON)") from None
    choices = value.get("choices") if isinstance(value, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamError(NOT_AN_ANSWER, "upstream answered JSON that is not a chat completion")
    message = object_in(choices[0].get("message"))
    thought = message.get("reasoning_content")
    thought = thought if isinstance(thought, str) else message.get("reasoning")
    content, finish = message.get("content"), choices[0].get("finish_reason")
    calls = [piece for index, call in enumerate(message.get("tool_calls") or ())
             if (piece := call_piece({**call, "index": index} if isinstance(call, dict) else call))]
    return Delta(thought if isinstance(thought, str) else "", content if isinstance(content, str) else "",
                 object_in(value.get("usage")) or None, finish if isinstance(finish, str) else None, True, calls=calls)


def call_piece(call):
    """A CallPiece of a streamed tool call, or None when it is not one."""
    if not isinstance(call, dict) or whole_number(call.get("index")) is None:
        return None
    function = object_in(call.get("function"))
    name, arguments = function.get("name"), function.get("arguments")
    return CallPiece(call["index"], name if isinstance(name, str) and name else None,
                     arguments if isinstance(arguments, str) else "")


def seconds_to_midnight(now):
    """Seconds until 00:00 UTC, when a key's daily budget is back."""
    return (int(now // DAY_SECONDS) + 1) * DAY_SECONDS - now


def api_failure(status, body, headers, now):
    """The UpstreamError for a failed answer of the API: by the error's type and code (never its message), with
    a short summary of what it said."""
    try:
        error = loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    error = error if isinstance(error, dict) else {}
    kind, code = safe_summary(str(error.get("type") or "")), str(error.get("code") or "")
    shown = f"upstream answered HTTP {status}" + (f" {kind}" if kind else "") + (
        f": {error_text(error)}" if error.get("message") else "")
    daily = code != MINUTE_GUARD_CODE and (headers.get("x-ratelimit-remaining-tokens-daily") == "0"
                                           or "daily" in code)
    if status == 429 and daily:
        return UpstreamError(BUDGET_SPENT, shown + " (the key's daily budget is spent)",
                             retry_after=seconds_to_midnight(now))
    alike = status_failure(status, shown, headers.get("Retry-After"))
    if alike:
        return alike
    if status in (401, 403):
        return UpstreamError(KEY_REFUSED, shown + " (the IFM key was refused)")
    if status == 404:
        return UpstreamError(MODEL_GONE, shown)
    if status == 410:
        return UpstreamError(MODEL_RETIRED, shown + " (the model is retired: set MODELS to a served one)")
    if status == 529:
        return UpstreamError(SERVER_OVERLOADED, shown)
    if status == 408 or status >= 500:
        return UpstreamError(SERVER_FAILED, shown)
    return UpstreamError(NOT_AN_ANSWER, shown)


def session_id(secret, client, hint, turns):
    """The X-Session-ID of a conversation: a keyed hash of the client's key and the client's own session hint, or
    else of the conversation's opening turns; stable across its turns, never shared by two keys, unguessable, and
    nothing personal."""
    if not hint:
        opening = [turn for turn in turns if turn.role == "system"][:1] + [
            turn for turn in turns if turn.role == "user"][:1]
        hint = "opening:" + json_text([[turn.role, turn.text] for turn in opening])
    return hmac.digest(secret, f"{client}\0{hint}".encode("utf-8", "surrogatepass"), "sha256").hex()[:32]


def turn_digest(text, calls):
    """What identifies an assistant turn, whichever dialect carries it back: its text and its calls' names and
    arguments (not their ids, which each dialect prefixes)."""
    canonical = []
    for name, arguments in calls:
        try:
            arguments = loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass
        canonical.append([name, json.dumps(arguments, sort_keys=True, ensure_ascii=False)])
    return hashlib.sha256(json_text([text.strip(), canonical]).encode("utf-8", "surrogatepass")).digest()


def assistant_digest(turn):
    """The digest an assistant turn's reasoning is kept under: its text and its calls."""
    return turn_digest(turn.text, [(call.name, call.arguments) for call in turn.calls])


class ReplayCache:
    """The reasoning of the answers the proxy gave, by client key and turn digest, for clients that send an
    assistant turn back without it: bounded in bytes, and each client to a share of them, so that no key can
    push out the others' entries."""

    CLIENT_SHARE = 4  # a client holds at most a quarter of the cache

    def __init__(self, megabytes):
        self.limit = int(megabytes * MB)
        self.share = self.limit // self.CLIENT_SHARE  # the most one client holds
        self.entries = collections.OrderedDict()  # (client, digest) → reasoning, oldest first
        self.size = 0
        self.by_client: collections.Counter[str] = collections.Counter()    # client → bytes held

    async def put(self, client, digest, reasoning):
        """Keeps the reasoning of an answer; False when it is too long to keep."""
        size = len(reasoning)
        if not reasoning or size > min(REPLAY_ENTRY_MAX, self.share):
            return False
        self.drop((client, digest))
        while self.by_client[client] + size > self.share:
            self.drop(next(key for key in self.entries if key[0] == client))
        while self.size + size > self.limit:
            self.drop(next(iter(self.entries)))
        self.entries[client, digest] = reasoning
        self.size += size
        self.by_client[client] += size
        return True

    async def lookup(self, client, digests):
        """The reasoning kept for each of `digests` that is kept."""
        return {digest: self.entries[client, digest] for digest in digests if (client, digest) in self.entries}

    def drop(self, key):
        reasoning = self.entries.pop(key, None)
        if reasoning is not None:
            self.size -= len(reasoning)
            self.by_client[key[0]] -= len(reasoning)
            if not self.by_client[key[0]]:
                del self.by_client[key[0]]


def api_tool(tool):
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": tool.parameters}}


def api_tool_choice(choice):
    return choice if choice in ("auto", "required", "none") else {"type": "function", "function": {"name": choice}}


def api_content(parts):
    """A message's content as the API takes it: one string, or the parts when images are forwarded."""
    return text_of(parts) if all(part["type"] == "text" for part in parts) else list(parts)


def api_messages(core, replayed):
    """The conversation as the API takes it: content as strings, every assistant turn with its reasoning (the
    client's, else the one `replayed` holds by the turn's place, else ""), tool calls and results natively."""
    messages = []
    for place, turn in enumerate(core.turns):
        if turn.role == "assistant":
            message = {"role": "assistant", "content": turn.text, "reasoning_content": turn.reasoning
                       if turn.reasoning is not None else replayed.get(place, "")}
            if turn.calls:
                message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                    "name": call.name, "arguments": call.arguments if isinstance(call.arguments, str)
                    else json_text(call.arguments)}} for call in turn.calls]
            messages.append(message)
        elif turn.role == "tool":
            text = turn.text if not turn.failed else f"Error: {turn.text}"
            messages.append({"role": "tool", "tool_call_id": turn.call_id, "content": text})
        else:
            messages.append({"role": turn.role, "content": api_content(turn.parts)})
    return messages


def api_payload(core, messages):
    """The chat completion request the API takes: effort where the chat template reads it, native tools with K2's
    tool formats, native structured output; streamed with usage when the client streams, else one JSON answer."""
    streamed = {"stream": True, "stream_options": {"include_usage": True}} if core.stream else {"stream": False}
    payload = {"model": core.upstream_model, "messages": messages, **streamed, **core.params,
               "chat_template_kwargs": {"reasoning_effort": core.effort}}
    if core.tools:
        payload.update(tools=[api_tool(tool) for tool in core.tools.tools],
                       tool_choice=api_tool_choice(core.tools.choice), **TOOL_FORMATS)
    if core.answer_format:
        payload["response_format"] = core.answer_format.wire()
    return payload


class ApiProgress(Counted):
    """What one attempt at the API has produced, as events: reasoning (split at an effort closer when the answer
    was filed as reasoning), text and native tool calls, and what the replay cache keeps of it."""

    def __init__(self, core, limit=None):
        super().__init__(core.show_reasoning, limit)
        self.calls: dict[int, CallInParts] = {}  # by upstream's index
        self.reasoning = []      # kept for the replay cache while it stays under REPLAY_ENTRY_MAX
        self.text = []
        self.usage = None
        self.finish_reason = None
        self.budget = None       # the key's tokens left today, as upstream's answer said

    def events(self, delta):
        reasoning, answer = self.closer.feed(delta.reasoning) if delta.reasoning else ("", "")
        self.usage = delta.usage or self.usage
        self.finish_reason = delta.finish_reason or self.finish_reason
        events = self._reasoning(reasoning)
        for text in (answer, delta.text):
            if text:
                self.answer_chars += len(text)
                self.text.append(text)
                events.append(Text(text))
        for piece in delta.calls:
            call = self.calls.get(piece.index)
            if call is None:
                call = self.calls[piece.index] = CallInParts(len(self.calls), uuid.uuid4().hex[:24], piece.name or "")
                events.append(ToolCallStart(call.index, call.id, call.name))
            if piece.arguments:
                self.answer_chars += len(piece.arguments)
                call.pieces.append(piece.arguments)
                events.append(ToolArguments(call.index, piece.arguments))
        return events

    def _reasoning(self, text):
        if text and self.reasoning_chars + len(text) <= REPLAY_ENTRY_MAX:
            self.reasoning.append(text)
        return super()._reasoning(text)

    def closing(self, prompt_tokens):
        events = self._reasoning(self.closer.finish())
        finish_reason = self.finish_reason
        reason = "tool_calls" if self.calls else finish_reason if finish_reason in UPSTREAM_FINISH_REASONS else "stop"
        return [*events, Finish(reason, usage_of(self.usage, prompt_tokens, self.reasoning_chars, self.answer_chars))]

    def digest(self):
        """The digest of the assistant turn this answer becomes, as a client carries it back."""
        return turn_digest("".join(self.text), [(call.name, "".join(call.pieces)) for call in self.calls.values()])


class ApiUpstream:
    """The official API (or a self-hosted server): its keys, and completions that fail over from key to key."""

    name = "api"

    def __init__(self, settings, http, replay=None, clock=time.time):
        self.settings = settings
        self.http = http
        self.url = settings.ifm_base_url + "/chat/completions"
        self.models_url = settings.ifm_base_url + "/models"
        self.pool = CredentialPool("api", settings.ifm_keys_file, settings, anonymous=True,
                                   fixed=settings.ifm_api_key, noun="IFM key", clock=clock, fixed_from="IFM_API_KEY")
        self.replay = replay or ReplayCache(settings.replay_cache_mb)  # or the fleet's (see Replicas)
        self.clock = clock
        self.session_secret = hashlib.sha256(b"k2proxy X-Session-ID\0" + settings.admin_key.encode()).digest()

    async def watch_keys(self):
        """Reads the keys file when it changed, like the token file."""
        await self.pool.reload()
        return TOKEN_FILE_POLL_SECONDS

    def headers(self, credential, session, stream):
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json",
                   "X-Session-ID": session}
        if credential.value:
            headers["Authorization"] = f"Bearer {credential.value}"
        return headers

    async def replayed(self, core):
        """The reasoning the proxy gave with each assistant turn a client sent back without it, by the turn's place
        in the conversation."""
        digests = {place: assistant_digest(turn) for place, turn in enumerate(core.turns)
                   if turn.role == "assistant" and turn.reasoning is None}
        found = await self.replay.lookup(core.client, list(digests.values()))
        return {place: found[digest] for place, digest in digests.items() if digest in found}

    async def complete(self, core):
        """The completion's events, attempt by attempt from key to key (see failover); a stream cut before its
        finish is tried again on another key (with the same session id) while the client has seen nothing."""
        body = json_text(api_payload(core, api_messages(core, await self.replayed(core)))).encode()
        async with contextlib.aclosing(failover(self, core, body, self.settings.max_retries)) as events:
            async for item in events:
                yield item

    def named(self, credential):
        return "api, " + ("no key" if credential is NO_CREDENTIAL else f"key {mask_token(credential.value)}")

    def describe(self):
        return f"the API at {self.settings.ifm_base_url}, {self.pool.held()}"

    def progress(self, core):
        return ApiProgress(core, answer_limit(self.settings, core))

    def session_of(self, core):
        """The conversation's X-Session-ID: from the client's own hint, or else its opening turns."""
        return session_id(self.session_secret, core.client, core.session_hint, core.turns)

    async def attempt(self, core, body, credential, progress):
        """One attempt: the events of each network read, or of the one JSON answer of a request not streamed; an
        answer without a finish is truncated."""
        headers = self.headers(credential, self.session_of(core), core.stream)
        async with self.http.exchange(self.url, body, headers) as response:
            budget = response.headers.get("x-ratelimit-remaining-tokens-daily", "").strip()
            progress.budget = int(budget) if WHOLE_NUMBER.fullmatch(budget) else None
            if response.status != 200:
                text = (await read_body(response, ERROR_BODY_BYTES)).decode("utf-8", "replace")
                failure = api_failure(response.status, text, response.headers, self.clock())
                self.pool.spent(credential, 0, 0 if failure.failure is BUDGET_SPENT and progress.budget is None
                                else progress.budget)
                raise failure
            if response.content_type == "application/json" and not core.stream:
                limit = int(self.settings.max_answer_mb * MB)
                text = await read_body(response, limit + 1)
                if len(text) > limit:
                    raise answer_too_large(limit)
                delta = answer_delta(text)
                events = progress.events(delta)
                if events:
                    yield events
                if delta.finish_reason is None:
                    raise UpstreamError(TRUNCATED, "upstream's answer came without a finish reason")
                return
            if response.content_type != "text/event-stream":
                raise UpstreamError(NOT_AN_ANSWER, f"upstream answered {response.content_type or 'no content type'}"
                                                   ", not a stream")
            reader, decoder, chunks = ApiReader(), SSEDecoder(api_chunk), arrived_chunks(response)
            async with contextlib.aclosing(chunks):
                async for data in chunks:
                    delta = reader.read(decoder.feed(data))
                    events = progress.events(delta)
                    if events:
                        yield events
                    if delta.error:
                        raise delta.error
                    if delta.ended:
                        break
        if reader.finish_reason is None:
            raise UpstreamError(TRUNCATED, "upstream's stream ended before its answer did (no finish reason)")

    async def settle(self, core, credential, progress, closing):
        """What a whole answer leaves: the key's tokens spent, and the reasoning to replay when a client drops it."""
        self.pool.spent(credential, closing[-1].usage.total_tokens, progress.budget)
        await self.replay.put(core.client, progress.digest(), "".join(progress.reasoning))



# ─── Accounts ────────────────────────────────────────────────────────────────
# Accounts of ACCOUNTS_FILE sign in by themselves and keep a fresh token in the
# user pool: before it expires, and again when the site refuses it.

TOKEN_REFRESH_SHARE = 0.8           # of a token's lifetime, when its account signs in again
ASSUMED_TOKEN_LIFETIME = 6 * 3600   # seconds, for a token whose expiry cannot be read
SKEWED_RENEWAL = 600                # seconds between sign-ins while this machine's clock runs ahead
SIGNIN_BACKOFF_FIRST, SIGNIN_BACKOFF_MAX = 5, 600  # seconds between failing sign-ins, doubling
ACCOUNTS_POLL_SECONDS = 1.0         # how often the file and refused tokens are looked at
CLAIMED_SIGN_IN_WAIT = 5            # seconds an account another replica signs in waits for its token to arrive
SIGNIN_PATH = "/api/v1/auths/signin"


class SignedIn(str, enum.Enum):
    OK = "signed_in"
    REFUSED = "wrong_password"  # a wrong email or password
    FAILED = "failed"           # no answer, or an answer without a token


@dataclass(frozen=True)
class SignIn:
    """What came of one sign-in: the outcome, the token issued, and for a failure what happened."""
    outcome: SignedIn
    token: str | None = None
    reason: str = ""


async def sign_in(site, email, password):
    """Asks the site to sign an account in."""
    url = site.settings.k2think_base_url + SIGNIN_PATH
    try:
        async with site.http.session.post(url, json={"email": email, "password": password},
                                          headers=site.headers(NO_CREDENTIAL), allow_redirects=False) as response:
            body = await read_body(response, ERROR_BODY_BYTES)
            status = response.status
            token = issued_token(body, response.cookies.get("token")) if status == 200 else None
    except (ClientError, OSError, asyncio.TimeoutError) as exc:
        return SignIn(SignedIn.FAILED, reason=f"sign-in request failed ({type(exc).__name__})")
    if status in (400, 401):
        return SignIn(SignedIn.REFUSED, reason=error_detail(body.decode("utf-8", "replace")) or f"HTTP {status}")
    if not token:
        return SignIn(SignedIn.FAILED, reason=f"sign-in answered HTTP {status} without a token")
    return SignIn(SignedIn.OK, token)


def issued_token(body, cookie):
    """The JWT a sign-in answer carries: in its JSON body (`token`), or else in its `token` cookie."""
    try:
        token = json.loads(body).get("token")
    except (ValueError, AttributeError):
        token = None
    token = token or (cookie.value if cookie else None)
    return token if isinstance(token, str) and token else None


class AccountStatus(str, enum.Enum):
    PENDING = "pending"
    SIGNED_IN = "signed_in"
    WRONG_PASSWORD = "wrong_password"
    FAILING = "failing"


@dataclass(eq=False)
class Account:
    email: str
    password: str = field(repr=False)
    status: AccountStatus = AccountStatus.PENDING
    last_error: str | None = None
    signed_in_at: float | None = None
    expires_at: float | None = None
    next_signin: float = 0.0
    failures: int = 0


class Accounts:
    """Signs in with the accounts of ACCOUNTS_FILE and keeps each one's token fresh in the user pool."""

    def __init__(self, settings, site, on_sign_in=lambda: None, clock=time.time):
        self.settings = settings
        self.site = site
        self.on_sign_in = on_sign_in
        self.pool = site.pools["user"]
        self.file = WatchedFile(settings.accounts_file)
        self.clock = clock
        self.accounts = {}
        self.results: collections.Counter[str] = collections.Counter()  # sign-ins by result, for /metrics
        self.claim = None  # async (email) → whether this replica signs the account in now (replicas take turns)

    async def reload(self):
        pairs = await self.file.parsed_changes(parse_accounts_file, "email:password or JSON")
        if pairs is None:
            return
        old, self.accounts = self.accounts, {}
        for email, password in pairs:
            kept = old.get(email)
            self.accounts[email] = kept if kept and kept.password == password else Account(email, password)
        for email in old.keys() - self.accounts.keys():
            self.pool.drop_account(email)
        if self.file.state is not None:
            log.info("%d accounts in %s", len(self.accounts), self.file.path)

    def next_due(self, now):
        """The account to sign in now, or None: the one waiting longest among those whose time has come or
        whose token the site refused; a wrong password waits for its line to change."""
        refused = set(self.pool.refused_accounts())
        due = [a for a in self.accounts.values()
               if a.status is not AccountStatus.WRONG_PASSWORD and (a.next_signin <= now or a.email in refused)]
        return min(due, key=lambda a: a.next_signin, default=None)

    async def run(self):
        """Signs in whichever account is due, one at a time and spaced out; reads the file meanwhile. Returns the
        seconds until the next look, for keep_polling."""
        await self.reload()
        now = self.clock()
        account = self.next_due(now)
        if account and self.claim and not await self.claim(account.email):
            account.next_signin = now + CLAIMED_SIGN_IN_WAIT  # another replica signs it in, and hands its token over
        elif account:
            self.pool.forget_refusal(account.email)
            await self.sign_in(account)
            return self.settings.signin_interval
        soonest = min((a.next_signin for a in self.accounts.values() if a.status is not AccountStatus.WRONG_PASSWORD),
                      default=now + ACCOUNTS_POLL_SECONDS)
        return min(ACCOUNTS_POLL_SECONDS, soonest - now)

    async def sign_in(self, account):
        result = await sign_in(self.site, account.email, account.password)
        if result.outcome is SignedIn.OK:
            self._signed_in(account, result.token)
        elif result.outcome is SignedIn.REFUSED:
            self._refused(account, result.reason)
        else:
            self._failed(account, result.reason)

    def _refused(self, account, detail):
        """A wrong email or password: the account waits until its line changes."""
        self.results[SignedIn.REFUSED.value] += 1
        account.status, account.last_error = AccountStatus.WRONG_PASSWORD, f"sign-in refused: {detail}"
        self.pool.drop_account(account.email)
        log.warning("account %s: sign-in refused (wrong email or password); fix %s", account.email,
                    self.file.path.name)

    def adopt(self, email, token):
        """Takes the token another replica signed the account in with, as if this one had; False for an account
        this one does not have."""
        account = self.accounts.get(email)
        if account:
            self._signed_in(account, token, by_another=True)
        return account is not None

    def tokens(self):
        """The token each account holds in the user pool now, by email."""
        return {credential.account: credential.value for credential in self.pool.credentials if credential.account}

    def _signed_in(self, account, token, by_another=False):
        """Puts the new token in the pool and sets the next sign-in before it expires."""
        now = self.clock()
        account.status, account.last_error, account.failures = AccountStatus.SIGNED_IN, None, 0
        expires = jwt_expiry(token)
        if expires is None:
            delay = TOKEN_REFRESH_SHARE * ASSUMED_TOKEN_LIFETIME
        elif expires > now:
            delay = TOKEN_REFRESH_SHARE * (expires - now)
        else:
            log.warning("account %s: the new token expired before it arrived; is this machine's clock right? "
                        "Using it anyway and signing in again every %d minutes", account.email, SKEWED_RENEWAL // 60)
            expires, delay = None, SKEWED_RENEWAL
        account.signed_in_at, account.expires_at, account.next_signin = now, expires, now + delay
        self.pool.put_account_token(account.email, token, expires)
        self.on_sign_in()
        if by_another:
            log.info("account %s: took the token another replica signed in with", account.email)
            return
        self.results[SignedIn.OK.value] += 1
        log.info("account %s signed in; next sign-in in %.0f s", account.email, delay)

    def _failed(self, account, reason):
        """Retries with backoff: 5 s, 10 s, 20 s ... up to 10 minutes."""
        self.results[SignedIn.FAILED.value] += 1
        account.failures += 1
        account.status, account.last_error = AccountStatus.FAILING, reason
        account.next_signin = self.clock() + min(SIGNIN_BACKOFF_MAX, SIGNIN_BACKOFF_FIRST * 2 ** (account.failures - 1))
        log.warning("account %s: %s; retrying in %.0f s", account.email, reason, account.next_signin - self.clock())

    def stats(self):
        return [{"email": a.email, "status": a.status.value, "last_error": a.last_error,
                 "signed_in_at": a.signed_in_at, "expires_at": a.expires_at,
                 "next_signin": a.next_signin if a.status is not AccountStatus.WRONG_PASSWORD else None,
                 "failures": a.failures} for a in self.accounts.values()]


# ─── Models ──────────────────────────────────────────────────────────────────
# The model ids clients may ask for: upstream's own list in user mode, MODELS
# otherwise, the retired ids and MODEL_ALIASES. Offers resolve().

NOTHINK = "-nothink"
RETIRED_MODELS = ("MBZUAI-IFM/K2-Think", "MBZUAI-IFM/K2-Think-v2")  # clients still ask for them: the default serves
MODELS_RETRY_SECONDS = 30.0  # between model list fetches while upstream's list cannot be had
MODELS_PATH = "/api/models"
PREVIEW_CHARS = 80  # of a text quoted from upstream in a report


def model_ids(body):
    """The ids of a model list answer, {"data": [...]} or a bare list."""
    try:
        value = loads(body)
    except ValueError:
        return []
    entries = value.get("data") if isinstance(value, dict) else value
    if not isinstance(entries, list):
        return []
    return [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]


@dataclass(frozen=True)
class ModelList:
    """Upstream's model list, or why there is none."""
    ids: list
    problem: str = ""


async def fetch_model_list(http, url, headers):
    """Asks upstream which models it serves."""
    try:
        async with http.session.get(url, headers=headers, allow_redirects=False) as response:
            status, body = response.status, await read_body(response, MAX_FRAME_BYTES)
    except (ClientError, OSError, asyncio.TimeoutError) as exc:
        return ModelList([], f"no answer ({type(exc).__name__})")
    ids = model_ids(body) if status == 200 else []
    if ids:
        return ModelList(ids)
    detail = error_detail(body.decode("utf-8", "replace"))[:PREVIEW_CHARS]
    return ModelList([], f"HTTP {status} without a model list ({detail or 'nothing said'})")


def short_id(model):
    """A model id without its organisation (k2-horizon-375b-a23b), for clients that read IFM/ as a provider prefix
    (the OpenAI Agents SDK, LiteLLM)."""
    return model.rsplit("/", 1)[-1].lower() if "/" in model else model


class Models:
    """The model ids clients may ask for: upstream's own list in user mode, MODELS otherwise, and aliases."""

    def __init__(self, settings, site):
        self.settings = settings
        self.site = site
        self.ids = list(settings.models)
        self.source = "MODELS"
        self.aliases = settings.model_aliases
        self.wake = asyncio.Event()

    def token_arrived(self):
        """An account just signed in: if upstream's list is still unknown, ask now rather than in 30 s."""
        if self.source != "upstream":
            self.wake.set()

    def listed(self):
        """Every id a client may ask for: each model's, its slash-free short id, and both with -nothink."""
        return [name for model in self.ids for base in dict.fromkeys((model, short_id(model)))
                for name in (base, base + NOTHINK)]

    @property
    def default(self):
        """The model behind the retired ids: the first of MODELS while it is served, else the first served."""
        return self.settings.models[0] if self.settings.models[0] in self.ids else self.ids[0]

    def resolve(self, requested):
        """(upstream model, show reasoning) for a client's model id or alias, or a 404 naming the ids there are."""
        base = requested[:-len(NOTHINK)] if requested.endswith(NOTHINK) else requested
        short = {short_id(model): model for model in self.ids}
        model = base if base in self.ids else self.aliases.get(base) or short.get(base) or (
            self.default if base in RETIRED_MODELS else base)
        if model not in self.ids:
            raise ApiError(404, f"The model '{requested}' does not exist; available: {', '.join(self.listed())}",
                           param="model", code="model_not_found")
        return model, base == requested

    async def refresh(self):
        """Asks upstream which models it serves; keeps the current list when it cannot say."""
        token = self.site.pools["user"].usable()
        if token is None:
            return False
        found = await fetch_model_list(self.site.http, self.settings.k2think_base_url + MODELS_PATH,
                                       self.site.headers(token))
        if not found.ids:
            log.warning("model list not fetched (%s); serving %s", found.problem, ", ".join(self.ids))
            return False
        if found.ids != self.ids:
            log.info("models from upstream: %s", ", ".join(found.ids))
        self.ids, self.source = found.ids, "upstream"
        return True

    async def run(self):
        """Refreshes the list in user mode; the seconds until the next refresh (sooner while it cannot be had),
        for keep_polling, which a sign-in wakes."""
        fetched = self.site.mode == "user" and await self.refresh()
        return self.settings.models_refresh if fetched else min(MODELS_RETRY_SECONDS, self.settings.models_refresh)


# ─── Upstream check ──────────────────────────────────────────────────────────
# `python k2proxy.py --check` and POST /admin/check: a few tiny requests that
# tell the operator what the upstream speaks, what went wrong and what to set
# (one chat per mode, one model list, one sign-in per account). Nothing here
# touches the token pool or its figures. Offers check_upstream() and the
# report's text.

CHECK_PROMPT = [{"role": "user", "content": "Reply with the word OK."}]
CHECK_MAX_TOKENS = 64


class Verdict(str, enum.Enum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


MARKS = {Verdict.OK: "✓", Verdict.FAILED: "✗", Verdict.SKIPPED: "–"}
HTTP_PORTS = {"http": 80, "https": 443}

CHECK_PROBLEMS = {  # an upstream failure in a probe → (what went wrong, what to do)
    MODEL_GONE: ("model not found", "the site does not serve {model}: set MODELS to an id it offers (the model "
                                    "list shows them in user mode), or leave MODELS unset for the default, "
                                    f"{SETTINGS_BY_NAME['MODELS'].default}"),
    REFUSED_TOKEN: ("token refused", "the token has expired or was revoked: replace it in the token file, or let "
                                     "accounts.txt sign in"),
    RATE_LIMITED: ("rate limited", "the site asks to slow down: try again in a minute"),
    BLOCKED: ("a bot-check or maintenance page", "open {base} in a browser on this server: the site may block its "
                                                 "IP address, or be down for maintenance"),
    NO_CONTENT: ("an empty answer", "the site answered no answer text: check that {model} is still served, and "
                                    "try again"),
    TIMED_OUT: ("a timeout", "the site did not answer within REQUEST_TIMEOUT ({timeout:g} s): try again, or raise "
                             "REQUEST_TIMEOUT"),
    BROKEN: ("a failing site", "try again later; the message above says what the site answered"),
    UNREACHABLE: ("unreachable", "see the host line: the site cannot be reached from here"),
    REJECTED: ("a refused request", "the site refused the chat payload: its protocol may have changed; look for a "
                                    "k2proxy update"),
    TOO_LARGE: ("a refused request", "the site refused the chat payload as too large"),
    NOT_AN_ANSWER: ("not a chat answer", "set K2THINK_BASE_URL (or GUEST_API_URL / USER_API_URL) to where the site "
                                         "serves chat now"),
    SHUTTING_DOWN: ("shut down", "the proxy is stopping"),
}
TASK_ONLY = ("a websocket-only task_id answer", "the site sent the answer over its websocket, which k2proxy cannot "
             "read: its protocol has changed; look for a k2proxy update")
CUT = ("a stream cut before its end", "the connection broke mid-answer: try again; if it keeps breaking, the site "
       "or a proxy in between cuts long answers")
GONE = ("the chat endpoint is gone (HTTP 404)", "set K2THINK_BASE_URL (or GUEST_API_URL / USER_API_URL) to where the "
        "site serves chat now")


@dataclass
class Probe:
    """One line of the report: what was tried, what came of it, and for a failure what to do."""
    name: str
    verdict: Verdict
    summary: str
    hint: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class AnswerLook:
    """What a chat answer looked like: its status, its frames and markup, the text extracted, its timing."""
    status: int | None = None
    content_type: str = ""
    fields: set = field(default_factory=set)
    frames: int = 0
    ended: bool = False
    first_byte: float | None = None
    total: float | None = None
    reasoning: str = ""
    answer: str = ""
    raw: str = ""
    forms: str = "none"  # how the text came: snapshots, pieces, Responses-style deltas

    def seen(self, reader):
        """Takes in what the reader saw of the answer, the answer after an effort closer included (as requests
        read it)."""
        text = reader.text
        self.frames, self.fields = reader.frames, reader.fields
        reasoning, answer = text.splitter.texts()
        closer = CloserSplitter()
        before, after = closer.feed(reasoning)
        if closer.closed:
            reasoning, answer = before.strip(), after.strip() + answer
        self.reasoning, self.answer, self.raw = reasoning, answer, text.raw_text()
        self.forms = text_forms(text)
        return self

    def dialect(self):
        """Which site's dialect the answer speaks, as far as it shows."""
        if "task_id" in self.fields or ("<details" in self.raw and "<answer>" not in self.raw):
            return "the 2026 site (K2 Horizon): content snapshots, reasoning in <details>, the answer after it"
        if "choices" in self.fields or "<answer>" in self.raw or "<think>" in self.raw:
            return "the older site (K2-Think): OpenAI-style chunks, <think> and <answer> tags"
        return "unknown"

    def describe(self):
        timing = f"first byte {self.first_byte or 0:.2f} s, end {self.total or 0:.2f} s"
        if not self.frames:
            return f"HTTP {self.status} {self.content_type or '(no content type)'}; {timing}"
        markup = ("<details>" if "<details" in self.raw else "<think>" if "think>" in self.raw else "none")
        kind = "SSE" if self.content_type == "text/event-stream" else "JSON"
        return (f"HTTP {self.status} {self.content_type or '(no content type)'} ({kind}); frames: "
                f"{', '.join(sorted(self.fields)) or 'none'}; text as {self.forms}; "
                f"reasoning markup: {markup}; {'<answer> tags' if '<answer>' in self.raw else 'no <answer> tags'}; "
                + timing)

    def preview(self):
        return f'reasoning "{self.reasoning[:PREVIEW_CHARS]}", answer "{self.answer[:PREVIEW_CHARS]}"'

    def facts(self):
        """The look for --check --json."""
        return {"status": self.status, "content_type": self.content_type, "frames": self.frames,
                "frame_fields": sorted(self.fields), "text_forms": self.forms, "ended": self.ended,
                "first_byte_s": round(self.first_byte, 3) if self.first_byte is not None else None,
                "total_s": round(self.total, 3) if self.total is not None else None,
                "reasoning": self.reasoning[:PREVIEW_CHARS], "answer": self.answer[:PREVIEW_CHARS]}


def text_forms(text):
    """How an answer's text came, in words: snapshots of the whole message, pieces, or Responses-style deltas."""
    kinds = []
    if TextForm.WHOLE in text.forms or text.snapshots:
        kinds.append("snapshots")
    if TextForm.PIECE in text.forms and not text.snapshots:
        kinds.append("pieces")
    if text.forms & {TextForm.REASONING, TextForm.ANSWER, TextForm.OUTPUT}:
        kinds.append("Responses-style deltas")
    return " and ".join(kinds) or "none"


def empty_answer_error(look):
    """The error for an answer whose text was reasoning only, saying what came."""
    return UpstreamError(NO_CONTENT, f"upstream's answer held reasoning only ({len(look.reasoning)} characters: "
                                     f'"{look.reasoning[:PREVIEW_CHARS]}") and no answer text')


def first_token(path, now):
    """The first token of a token file that has not expired, or None."""
    text, _ = WatchedFile(path).read()
    for token in parse_tokens_file(text or ""):
        expiry = jwt_expiry(token)
        if expiry is None or expiry > now:
            return token
    return None


async def probe_host(settings, base_url=None, setting="K2THINK_BASE_URL", name="host"):
    """Reaches the host of the site (or of `base_url`): DNS, then TCP (and TLS for https), with the time each
    took."""
    url = urllib.parse.urlsplit(base_url or settings.k2think_base_url)
    host, port = url.hostname, url.port or HTTP_PORTS[url.scheme]
    connection = "connection and TLS" if url.scheme == "https" else "connection"
    async def connect():
        _, writer = await asyncio.open_connection(host, port, ssl=url.scheme == "https")
        writer.close()

    steps = (("DNS", lambda: asyncio.get_running_loop().getaddrinfo(host, port)), (connection, connect))
    took = []
    for step, attempt in steps:
        started = time.monotonic()
        try:
            await asyncio.wait_for(attempt(), settings.request_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = "no answer" if isinstance(exc, asyncio.TimeoutError) else exc.strerror or str(exc)
            return Probe(name, Verdict.FAILED, f"{host}:{port}: {step} failed ({reason})",
                         f"check the host name in {setting}, and this server's DNS, firewall and route to it")
        took.append(f"{step} {(time.monotonic() - started) * 1000:.0f} ms")
    return Probe(name, Verdict.OK, f"{host}:{port}: " + ", ".join(took))


def check_payload(model):
    return site_payload(model, CHECK_PROMPT, {"max_tokens": CHECK_MAX_TOKENS}, "low")


async def look_at_chat(site, token, mode, model, payload=None):
    """One tiny chat (or `payload`), read as the proxy reads answers; (what it looked like, the UpstreamError or
    None)."""
    look, reader, started = AnswerLook(), SiteReader(keep=True), time.monotonic()
    body = json_text(payload or check_payload(model)).encode()
    try:
        async with site.http.exchange(site.urls[mode], body, site.headers(token, mode)) as response:
            look.status, look.content_type = response.status, response.content_type
            look.first_byte = time.monotonic() - started
            async for delta in site_deltas(response, reader):
                if delta.error:
                    raise delta.error
                look.ended = reader.finished or delta.ended
    except UpstreamError as error:
        return look.seen(reader), error
    finally:
        look.total = time.monotonic() - started
    reader.finish()
    look.seen(reader)
    if reader.text.is_empty():
        return look, no_content_error(look.content_type, look.fields)
    return look, (empty_answer_error(look) if not look.answer else None)


def problem_of(error, look):
    """(what went wrong, what to do) for a failed chat probe."""
    if error.failure is NO_CONTENT and bare_task_id(look.fields):
        return TASK_ONLY
    if error.failure is BROKEN and look.frames and not look.ended:
        return CUT
    if error.failure is NOT_AN_ANSWER and look.status == 404:
        return GONE
    return CHECK_PROBLEMS[error.failure]


async def probe_chat(site, mode, token, model):
    """A tiny chat in `mode`, and what its answer looked like."""
    name = f"{mode} chat"
    look, error = await look_at_chat(site, Credential(token) if token else NO_CREDENTIAL, mode, model)
    details = {**look.facts(), "dialect": look.dialect() if not error else None}
    if error is None:
        summary = f"{look.describe()}\n{look.preview()}\nthe answer speaks {look.dialect()}"
        return Probe(name, Verdict.OK, summary, details=details)
    what, hint = problem_of(error, look)
    settings = site.settings
    hint = hint.format(model=model, base=settings.k2think_base_url, timeout=settings.request_timeout)
    seen = look.describe() if look.status else "no answer"
    return Probe(name, Verdict.FAILED, f"{what}: {error}\n{seen}", hint, details={**details, "problem": what})


UNKNOWN_EFFORT = "k2proxy-check"  # an effort no chat template knows: refused wherever the template reads it
EFFORT_FIELDS = {"chat_template_kwargs": "the top-level chat_template_kwargs",
                 "extra_body": "extra_body.chat_template_kwargs"}


async def probe_effort_field(site, mode, token, model):
    """Which effort field reaches the site's chat template: an unknown effort is refused where it is read."""
    read = []
    for place in EFFORT_FIELDS:
        payload = check_payload(model)
        (payload if place == "chat_template_kwargs" else payload["extra_body"])[
            "chat_template_kwargs"] = {"reasoning_effort": UNKNOWN_EFFORT}
        _, error = await look_at_chat(site, Credential(token) if token else NO_CREDENTIAL, mode, model, payload)
        if error and error.failure is REJECTED and "effort" in str(error).lower():
            read.append(place)
    if not read:
        return Probe("effort field", Verdict.SKIPPED, "cannot tell: the site refused an unknown effort in neither "
                     "field, so which one its template reads does not show (k2proxy sends both)",
                     details={"read": []})
    return Probe("effort field", Verdict.OK, "the site's template reads the effort from "
                 + " and ".join(EFFORT_FIELDS[place] for place in read), details={"read": read})


async def probe_sign_ins(site, settings):
    """Each account of ACCOUNTS_FILE signs in once: (its probes, the first token issued or None)."""
    text, _ = WatchedFile(settings.accounts_file).read()
    pairs, _ = parse_accounts_file(text or "")
    if not pairs:
        return [Probe("sign-in", Verdict.SKIPPED, f"no accounts in {settings.accounts_file}")], None
    probes, issued = [], None
    for email, password in pairs:
        result = await sign_in(site, email, password)
        if result.outcome is SignedIn.OK:
            issued = issued or result.token
            probes.append(Probe(f"sign-in {email}", Verdict.OK, "signed in"))
        elif result.outcome is SignedIn.REFUSED:
            probes.append(Probe(f"sign-in {email}", Verdict.FAILED, "refused: wrong email or password",
                                f"fix this account's line in {settings.accounts_file}"))
        else:
            probes.append(Probe(f"sign-in {email}", Verdict.FAILED, result.reason,
                                "the site may be down, or ask for a bot check: see the host line, or try again "
                                "later"))
    return probes, issued


async def probe_models(site, settings, token):
    """Upstream's model list, and whether the configured model is in it."""
    if token is None:
        return Probe("models", Verdict.SKIPPED, "the model list needs an account token: none in "
                                                f"{settings.user_tokens_file}, and no account signed in")
    found = await fetch_model_list(site.http, settings.k2think_base_url + MODELS_PATH,
                                   site.headers(Credential(token), "user"))
    if not found.ids:
        return Probe("models", Verdict.FAILED, found.problem,
                     "the token may be refused (see user chat), or the site has moved its model list")
    ids, model = found.ids, settings.models[0]
    if model in ids:
        return Probe("models", Verdict.OK, f"serves {model} (offers {len(ids)}: {', '.join(ids)})",
                     details={"ids": ids})
    return Probe("models", Verdict.FAILED, f"does not serve {model}; it offers {', '.join(ids)}",
                 f"set MODELS={','.join(ids)}", details={"ids": ids})


API_CHECK_PROMPT = "Reply with the word OK."
API_PROBLEMS = {  # an API failure in a probe → what to do
    KEY_REFUSED: "the API refused this key: remove it from IFM_API_KEY or IFM_KEYS_FILE, or make a new one at "
                 "platform.ifm.ai",
    BUDGET_SPENT: "this key's daily budget is spent: it is back at 00:00 UTC",
    RATE_LIMITED: "the per-minute guard: try again in a minute",
    MODEL_GONE: "the API does not serve {model}: set MODELS to an id it lists",
    MODEL_RETIRED: "the API retired {model}: set MODELS to an id it lists",
    UNREACHABLE: "see the api host line: IFM_BASE_URL cannot be reached from here",
}


CHECK_SESSION = "k2proxy-check"  # the session hint of the check's chats


async def probe_api_key(api, credential, model):
    """One key (or none, for a keyless server): the model list and a tiny chat, read as the proxy reads answers."""
    name = f"api key {mask_token(credential.value)}" if credential.value else "api (no key)"
    core = CoreRequest(model, model, (Turn("user", (text_part(API_CHECK_PROMPT),)),), {"max_tokens": CHECK_MAX_TOKENS},
                       "low", True, True, session_hint=CHECK_SESSION)
    listed = await fetch_model_list(api.http, api.models_url, api.headers(credential, api.session_of(core), False))
    body = json_text(api_payload(core, api_messages(core, {}))).encode()
    answer, progress = [], api.progress(core)
    try:
        async for events in api.attempt(core, body, credential, progress):
            answer += [event.text for event in events if isinstance(event, Text)]
        api.pool.spent(credential, progress.closing(core.prompt_tokens)[-1].usage.total_tokens, progress.budget)
    except UpstreamError as error:
        hint = API_PROBLEMS.get(error.failure, "the message says what the API answered").format(model=model)
        return Probe(name, Verdict.FAILED, f"{error.failure.name}: {error}", hint,
                     details={"models": listed.ids, "problem": error.failure.name})
    budget = f"; {credential.budget_left:,} tokens left today" if credential.budget_left is not None else ""
    models = f"serves {', '.join(listed.ids)}" if listed.ids else f"no model list ({listed.problem})"
    return Probe(name, Verdict.OK, f'{models}; chat answered "{"".join(answer)[:PREVIEW_CHARS]}"{budget}',
                 details={"models": listed.ids, "budget_left": credential.budget_left})


async def check_api(settings, api):
    """The API's host, then each key of IFM_API_KEY and IFM_KEYS_FILE (none for a keyless server)."""
    api.pool.load(await asyncio.to_thread(read_if_there, settings.ifm_keys_file))
    host = await probe_host(settings, settings.ifm_base_url, "IFM_BASE_URL", "api host")
    if host.verdict is not Verdict.OK:
        return [host, Probe("api keys", Verdict.SKIPPED, "not tried: the host cannot be reached")]
    return [host, *[await probe_api_key(api, credential, settings.models[0])
                    for credential in api.pool.credentials or [NO_CREDENTIAL]]]


async def check_site(settings, site):
    """The site's host, each account's sign-in, the model list, and a tiny chat in each mode."""
    now, model = time.time(), settings.models[0]
    probes = [await probe_host(settings)]
    if probes[0].verdict is Verdict.OK:
        sign_ins, issued = await probe_sign_ins(site, settings)
        user_token = first_token(settings.user_tokens_file, now) or issued
        guest_token = first_token(settings.guest_tokens_file, now)
        probes += [*sign_ins, await probe_models(site, settings, user_token),
                   await probe_chat(site, "guest", guest_token, model)]
        needed = (f"put an account's token in {settings.user_tokens_file}, or email:password lines in "
                  f"{settings.accounts_file}") if settings.proxy_mode == "user" else ""
        probes.append(await probe_chat(site, "user", user_token, model) if user_token else
                      Probe("user chat", Verdict.SKIPPED, f"no user token: none in {settings.user_tokens_file}, and "
                                                          "no account signed in", needed))
        mode, token = settings.proxy_mode, user_token if settings.proxy_mode == "user" else guest_token
        if next(p for p in probes if p.name == f"{mode} chat").verdict is Verdict.OK:
            probes.append(await probe_effort_field(site, mode, token, model))
    else:
        probes += [Probe(name, Verdict.SKIPPED, "not tried: the host cannot be reached")
                   for name in ("sign-in", "models", "guest chat", "user chat")]
    return probes


async def check_upstream(settings, http):
    """Runs every probe against each upstream kind of UPSTREAM (with `http`'s open session, and kinds of its own, so
    that nothing touches the running proxy's pools); the report, as JSON. Chat works when it works with one kind."""
    probes, works, dialect = [], False, None
    if "site" in settings.upstream:
        probes += await check_site(settings, SiteUpstream(settings, http))
        mode_probe = next((p for p in probes if p.name == f"{settings.proxy_mode} chat"), None)
        works = bool(mode_probe and mode_probe.verdict is Verdict.OK)
        dialect = mode_probe.details.get("dialect") if mode_probe else None
    if "api" in settings.upstream:
        api_probes = await check_api(settings, ApiUpstream(settings, http))
        works = works or any(p.verdict is Verdict.OK for p in api_probes[1:])
        probes += api_probes
    first = settings.upstream[0]
    checked = [f"the web site {settings.k2think_base_url} ({settings.proxy_mode} mode)" if kind == "site" else
               f"the API {settings.ifm_base_url}" for kind in settings.upstream]
    return {"version": __version__, "upstreams": settings.upstream, "checked": checked,
            "site_mode": settings.proxy_mode,
            "upstream": settings.k2think_base_url if first == "site" else settings.ifm_base_url,
            "mode": settings.proxy_mode if first == "site" else "api", "model": settings.models[0], "works": works,
            "dialect": dialect, "probes": [asdict(probe) for probe in probes]}


def report_text(report):
    """The report as the lines --check prints: one per probe, with ✓ ✗ –, and a hint under every ✗."""
    width = max(len(p["name"]) for p in report["probes"])
    lines = [f"k2proxy {report['version']} checks {', then '.join(report['checked'])}, model {report['model']}"]
    for probe in report["probes"]:
        first, *more = probe["summary"].split("\n")
        lines.append(f"{MARKS[probe['verdict']]} {probe['name']:<{width}}  {first}")
        lines += [f"  {'':<{width}}  {line}" for line in more]
        if probe["hint"]:
            lines.append(f"  {'':<{width}}  → {probe['hint']}")
    verdict = "works" if report["works"] else "does NOT work"
    kinds = {"site": f"the site in {report['site_mode']} mode", "api": "the API"}
    served = ", then ".join(kinds[kind] for kind in report["upstreams"])
    lines.append(f"chat {verdict} ({served})" if len(report["upstreams"]) > 1 else
                 f"chat {verdict} in {report['mode']} mode")
    return "\n".join(lines)


async def run_check(settings, as_json):
    """--check: the report on standard output; 0 when chat works in the configured mode, else 1."""
    http = HttpClient(settings)
    await http.open()
    try:
        report = await check_upstream(settings, http)
    finally:
        await http.stop()
    try:
        print(json.dumps(report, ensure_ascii=False, indent=2) if as_json else report_text(report), flush=True)
    except BrokenPipeError:  # `--check | head` stopped reading: the rest is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if report["works"] else 1


# ─── Monitoring ──────────────────────────────────────────────────────────────
# What the proxy has done, from each request's record (RequestRecord, which
# every request carries from its arrival to its log line) as it ends: the totals of
# the admin page, the last REQUEST_LOG_SIZE requests, the last hour minute by
# minute, and the counters and histograms of GET /metrics in Prometheus's text
# format. Nothing secret and no message text is kept.

@dataclass
class RequestRecord:
    """One request's facts, from its arrival to its log line and its share of the figures."""
    method: str
    path: str
    dialect: str
    counted: bool               # a completion: it counts in the figures
    started: float              # time.monotonic()
    model: str | None = None
    stream: bool | None = None
    outcome: "Outcome | None" = None   # how it ended, when not plainly
    reason: str | None = None          # the code of the error it ended with
    upstream_failed: bool = False  # the error was upstream's (or no token could serve), not the client's
    route: str = ""             # the route's path, as routed ("/v1/models/{model:.+}")
    key: str | None = None             # the name of the API key it came with ("" for VALID_API_KEY's)
    api_key: "ApiKey | None" = None    # that key, for a WebSocket's messages to count against its limits
    client: str = ""            # a digest of that key's value: who owns stored responses and replayed reasoning
    slot: "Slot | None" = None  # its Slot within its key's limits, while it holds one
    first_content: float | None = None  # seconds from arrival to the first content sent
    duration: float | None = None      # seconds from arrival to the end
    attempts: int = 0
    token_index: int | None = None     # the credential that answered, by its place in its pool
    usage: Usage | None = None
    reserved: int = 0           # bytes of MEMORY_BUDGET_MB its body holds

    @property
    def logged_path(self):
        """The path as the log line shows it: a stored response's id, which is a secret, as {id}."""
        return self.route if "{id}" in self.route else self.path


class Outcome(enum.Enum):
    """How a request ended when not plainly: as the log says it (the value), and as /metrics labels it."""
    CLIENT_GONE = "client gone"            # its client left before its end
    ENDED_WITH_ERROR = "ended with error"  # a started answer that ended with an error event

    @property
    def label(self):
        return self.name.lower()


RECORD = web.RequestKey("record", RequestRecord)
CLIENT_GONE_STATUS = 499     # what the log and the figures say a request whose client left ended with (nginx's
                             # "client closed request")


TIME_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)  # seconds, for the histograms
MINUTE_SAMPLES = 2000  # first-content times kept per minute, for its p50 and p95
REFUSED_CODES = frozenset(("upstream_auth_failed", "rate_limited", "no_tokens", "no_usable_tokens"))


def percentiles(ordered, shares):
    """The value below which each share of the sorted list `ordered` falls; None for each when it is empty."""
    return tuple(ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else None for share in shares)


@dataclass
class Minute:
    """One minute of requests: how many, how many failed and whose fault, how many clients left, and their
    times to first content."""
    requests: int = 0
    client_errors: int = 0
    upstream_failures: int = 0
    clients_gone: int = 0
    first_content: list = field(default_factory=list)
    sorted_count: int = 0                     # the samples p50_p95 was worked out from
    p50_p95: tuple = (None, None)

    def first_content_p50_p95(self):
        """Sorts the samples again only when one was added since: a past minute's are sorted once."""
        if self.sorted_count != len(self.first_content):
            self.sorted_count = len(self.first_content)
            self.p50_p95 = percentiles(sorted(self.first_content), (0.5, 0.95))
        return self.p50_p95


@dataclass
class KeyFigures:
    """What one named API key's completions did, for the admin page."""
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def key_label(name):
    """The `key` label of a request: its key's name, or a value no name can take (names have no parentheses)."""
    return {None: "(none)", "": "(VALID_API_KEY)"}.get(name, name)


class Histogram:
    """A Prometheus histogram: how many values fell in each bucket (added up at scrape time), their sum and count."""

    def __init__(self):
        self.in_bucket = [0] * (len(TIME_BUCKETS) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        self.in_bucket[bisect.bisect_left(TIME_BUCKETS, value)] += 1
        self.sum += value
        self.count += 1


def error_kind(record, status):
    """The kind of error a request ended with, for /metrics; None when it did not."""
    if record.outcome is Outcome.CLIENT_GONE:
        return Outcome.CLIENT_GONE.label
    if not record.upstream_failed and status < 500:
        return "client_error" if status >= 400 else None
    return {"upstream_timeout": "timeout", "upstream_no_content": "no_content"}.get(
        record.reason, "upstream_refused" if record.reason in REFUSED_CODES else "upstream_failed")


class Monitor:
    """The request figures: totals, the request log, the last hour, and the series of /metrics."""

    def __init__(self, settings, clock=time.time):
        self.clock = clock
        self.requests = self.client_errors = self.upstream_failures = self.in_flight = 0
        self.first_content_total, self.first_content_count = 0.0, 0
        self.log: collections.deque[dict] = collections.deque(maxlen=settings.request_log_size)
        self.logged = 0  # entries ever added to the log, so that a log elsewhere takes each one once
        self.minutes = Minutes(Minute)
        self.counters: collections.Counter[tuple] = collections.Counter()  # (name, labels) → value
        self.histograms = collections.defaultdict(Histogram)  # (name, labels) → Histogram
        self.keys = collections.defaultdict(KeyFigures)  # a named API key's name → its figures

    def begin(self, record):
        if record.counted:
            self.requests += 1
            self.in_flight += 1

    def request_log(self):
        """The request log, newest first."""
        return list(reversed(self.log))

    def logged_since(self, logged):
        """(the entries logged since the log held `logged` in all, that it still holds; how many it holds in all)."""
        new = min(self.logged - logged, len(self.log))
        return list(itertools.islice(self.log, len(self.log) - new, None)), self.logged

    def end(self, record, status):
        """Counts a completion that has ended; one whose client left counts as neither success nor error."""
        if not record.counted:
            return
        self.in_flight -= 1
        now, kind = self.clock(), error_kind(record, status)
        minute = self.minutes.at(now)
        minute.requests += 1
        self.log.append(log_entry(record, status, now))
        self.logged += 1
        self.count_series(record, status, kind)
        if record.key:
            self.count_key(self.keys[record.key], record, kind)
        if kind == Outcome.CLIENT_GONE.label:
            minute.clients_gone += 1
        elif kind == "client_error":
            self.client_errors += 1
            minute.client_errors += 1
        elif kind:
            self.upstream_failures += 1
            minute.upstream_failures += 1
        elif record.first_content is not None:
            self.first_content_total += record.first_content
            self.first_content_count += 1
            if len(minute.first_content) < MINUTE_SAMPLES:
                minute.first_content.append(record.first_content)

    @staticmethod
    def count_key(figures, record, kind):
        figures.requests += 1
        figures.errors += kind not in (None, Outcome.CLIENT_GONE.label)
        if record.usage:
            figures.prompt_tokens += record.usage.prompt_tokens
            figures.completion_tokens += record.usage.completion_tokens

    def count_series(self, record, status, kind):
        route, key = (("route", record.route),), (("key", key_label(record.key)),)
        outcome = "ok" if kind is None else kind
        self.counters["k2proxy_requests_total", route + (("status_class", f"{status // 100}xx"),
                                                          ("outcome", outcome)) + key] += 1
        if kind:
            self.counters["k2proxy_errors_total", (("kind", kind),)] += 1
        self.counters["k2proxy_upstream_attempts_total", route] += record.attempts
        self.counters["k2proxy_failovers_total", route] += max(0, record.attempts - 1)
        if record.usage:
            self.counters["k2proxy_prompt_tokens_total", key] += record.usage.prompt_tokens
            self.counters["k2proxy_completion_tokens_total", key] += record.usage.completion_tokens
        self.histograms["k2proxy_request_duration_seconds", route].observe(record.duration)
        if record.first_content is not None:
            self.histograms["k2proxy_first_content_seconds", route].observe(record.first_content)

    def summary(self):
        mean = self.first_content_total / self.first_content_count if self.first_content_count else None
        return {"requests": self.requests, "errors": self.client_errors + self.upstream_failures,
                "client_errors": self.client_errors, "upstream_failures": self.upstream_failures,
                "in_flight": self.in_flight, "avg_ttfb_ms": round(mean * 1000, 1) if mean is not None else None}

    def last_hour(self):
        """The last hour, a minute a row: requests, client errors, upstream failures, clients gone, first content
        p50 and p95."""
        rows = []
        for minute, bucket in self.minutes.last_hour(self.clock()):
            bucket = bucket or Minute()
            p50, p95 = bucket.first_content_p50_p95()
            rows.append({"minute": minute * 60, "requests": bucket.requests, "client_errors": bucket.client_errors,
                         "upstream_failures": bucket.upstream_failures, "clients_gone": bucket.clients_gone,
                         "first_content_p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
                         "first_content_p95_ms": round(p95 * 1000, 1) if p95 is not None else None})
        return rows


def requests_logged(entries, status_class=None, key=None):
    """The log `entries` (newest first) of one status class (2xx, 4xx, 5xx) and one key's name when given."""
    return (entry for entry in entries if (status_class is None or f"{entry['status'] // 100}xx" == status_class)
            and (key is None or entry["key"] == key))


def log_entry(record, status, now):
    """A request as the log keeps it: what happened, never a key, token or message text."""
    usage = record.usage
    return {"time": round(now, 3), "key": record.key, "route": record.route, "model": record.model,
            "stream": record.stream, "status": status, "outcome": record.outcome and record.outcome.value,
            "reason": record.reason,
            "first_content_ms": round(record.first_content * 1000, 1) if record.first_content is not None else None,
            "duration_ms": round(record.duration * 1000, 1), "token": record.token_index,
            "failovers": max(0, record.attempts - 1),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None}


METRIC_HELP = {
    "k2proxy_requests_total": ("counter", "Completion requests, by route, status class, outcome and API key name"),
    "k2proxy_errors_total": ("counter", "Completion requests that failed, by kind"),
    "k2proxy_upstream_attempts_total": ("counter", "Requests sent upstream, by route"),
    "k2proxy_failovers_total": ("counter", "Requests sent upstream again after a failed attempt (with the next "
                                           "token when there are tokens), by route"),
    "k2proxy_prompt_tokens_total": ("counter", "Prompt tokens (estimated where upstream gives none), by API key"),
    "k2proxy_completion_tokens_total": ("counter", "Completion tokens (estimated where upstream gives none), by "
                                                   "API key"),
    "k2proxy_first_content_seconds": ("histogram", "Time from a request's arrival to its first content"),
    "k2proxy_request_duration_seconds": ("histogram", "Time from a request's arrival to its end"),
    "k2proxy_in_flight_requests": ("gauge", "Completion requests under way"),
    "k2proxy_tokens": ("gauge", "Tokens of the active pool, by state"),
    "k2proxy_signins_total": ("counter", "Account sign-ins, by result"),
    "k2proxy_ifm_key_state": ("gauge", "Each IFM key (masked) in its state: 1"),
    "k2proxy_ifm_key_requests_total": ("counter", "Requests sent with each IFM key"),
    "k2proxy_ifm_key_failures_total": ("counter", "Failed requests sent with each IFM key"),
    "k2proxy_ifm_key_tokens_today": ("gauge", "Tokens each IFM key's answers took today (UTC)"),
    "k2proxy_ifm_key_budget_left": ("gauge", "The daily budget upstream says each IFM key has left"),
    "k2proxy_ifm_key_rested_until_seconds": ("gauge", "Until when (Unix time) each resting IFM key rests"),
}


def labels_text(labels):
    if not labels:
        return ""
    escaped = (str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, value in labels)
    return "{" + ",".join(f'{name}="{value}"' for (name, _), value in zip(labels, escaped)) + "}"


def key_series(ifm_keys):
    """The series of each IFM key, by its masked value, as (name, labels) → value."""
    series = {}
    for row in ifm_keys.stats():
        key = (("key", row["masked"]),)
        series.update({("k2proxy_ifm_key_state", (*key, ("state", row["status"]))): 1,
                       ("k2proxy_ifm_key_requests_total", key): row["requests"],
                       ("k2proxy_ifm_key_failures_total", key): row["errors"],
                       ("k2proxy_ifm_key_tokens_today", key): row["tokens_today"]})
        if row["budget_left"] is not None:
            series["k2proxy_ifm_key_budget_left", key] = row["budget_left"]
        if row["cooling_until"] is not None:
            series["k2proxy_ifm_key_rested_until_seconds", key] = round(row["cooling_until"])
    return series


def metrics_text(monitor, pool, sign_ins, ifm_keys, process=None):
    """Every series in Prometheus's text exposition format; with a `process` (one of several serving together), each
    labelled with its name as the replica (Prometheus adds them up)."""
    this = (("replica", process),) if process else ()
    gauges = {("k2proxy_in_flight_requests", ()): monitor.in_flight,
              **{("k2proxy_tokens", (("state", state),)): count for state, count in pool.counts().items()
                 if state != "total"}, **key_series(ifm_keys)}
    counters = {**monitor.counters, **{("k2proxy_signins_total", (("result", result),)): count
                                       for result, count in sign_ins.items()}}
    series_of = collections.defaultdict(list)  # metric name → its lines
    for (name, labels), value in sorted({**counters, **gauges}.items()):
        series_of[name].append(f"{name}{labels_text(this + labels)} {value}")
    for (name, labels), histogram in sorted(monitor.histograms.items()):
        series_of[name] += histogram_lines(name, this + labels, histogram)
    lines = []
    for name, (kind, help_text) in METRIC_HELP.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *series_of[name]]
    return "\n".join(lines) + "\n"


def histogram_lines(name, labels, histogram):
    bounds = [*(f"{bound:g}" for bound in TIME_BUCKETS), "+Inf"]
    counts = itertools.accumulate(histogram.in_bucket)
    buckets = [f"{name}_bucket{labels_text((*labels, ('le', bound)))} {count}" for bound, count in zip(bounds, counts)]
    return [*buckets, f"{name}_sum{labels_text(labels)} {histogram.sum}",
            f"{name}_count{labels_text(labels)} {histogram.count}"]


# ─── API keys ────────────────────────────────────────────────────────────────
# The keys clients may use: VALID_API_KEY's (unnamed, no limits) and those of
# API_KEYS_FILE (named, each with its requests per minute and completions at
# once), which the file's edits change within two seconds. Offers find() for
# the key check, admit() / done() for the limits, and KeyLimits: the limits as
# this process counts them, the backend ApiKeys is built with unless replicas
# count them together (Replicas).

KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
RATE_WINDOW = 60  # seconds: rpm counts the completions asked for in the last minute


@dataclass(eq=False)
class ApiKey:
    name: str                        # "" for VALID_API_KEY's keys
    value: str = field(repr=False)
    rpm: int | None = None                  # completions a minute, None: no limit
    concurrent: int | None = None           # completions at once, None: no limit
    recent: collections.deque = field(default_factory=collections.deque, repr=False)  # when each was asked for
    active: int = 0


def matching_key(given, keys, value_of=lambda key: key):
    """The one of `keys` whose value is `given`, or None; every key is compared in constant time, whichever
    matches, so timing tells nothing about any of them."""
    given = given.encode("utf-8", "surrogateescape")
    found = None
    for key in keys:
        if hmac.compare_digest(given, value_of(key).encode()):
            found = key
    return found


@dataclass(frozen=True)
class Slot:
    """A request's place within its key's limits; `ticket` is what a shared backend knows it by, None when only this
    process counts it."""
    key: ApiKey
    ticket: str | None = None


def over_rpm(key, wait):
    wait = max(1, math.ceil(wait))
    return ApiError(429, f"The key '{key.name}' may make {key.rpm} requests a minute; try again in {wait} s",
                    code="rate_limited", retry_after=wait)


def over_concurrent(key):
    return ApiError(429, f"The key '{key.name}' may make {key.concurrent} requests at once; try again when one has "
                         "ended", code="too_many_at_once", retry_after=1)


def parse_api_keys_file(text):
    """(ApiKeys, numbers of the lines that are not name:key [rpm=N] [concurrent=N]) of a keys file."""
    keys, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, *options = line.split()
        name, _, value = head.partition(":")
        limits = dict(option.partition("=")[::2] for option in options)
        if not (KEY_NAME.fullmatch(name) and value and set(limits) <= {"rpm", "concurrent"}
                and all(WHOLE_NUMBER.fullmatch(v) and int(v) > 0 for v in limits.values())):
            bad.append(number)
            continue
        keys.append(ApiKey(name, value, int(limits["rpm"]) if "rpm" in limits else None,
                           int(limits["concurrent"]) if "concurrent" in limits else None))
    return keys, bad


def api_key_line(key):
    """A key as a line of the keys file: name:key, then its limits."""
    return " ".join(filter(None, (f"{key.name}:{key.value}", key.rpm and f"rpm={key.rpm}",
                                  key.concurrent and f"concurrent={key.concurrent}")))


class KeyLimits:
    """Each key's limits as this process counts them: its requests in the last minute and its completions running."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock

    async def admit(self, key):
        """Counts a request against the key's limits, or refuses it with a 429 before anything is sent upstream;
        the Slot it takes is given back by done()."""
        return self.count(key, enforce=True)

    def count(self, key, enforce):
        """Counts a request here; refuses it over a limit when `enforce` (else another count has admitted it)."""
        now = self.clock()
        while key.recent and key.recent[0] <= now - RATE_WINDOW:
            key.recent.popleft()
        if enforce:
            if key.rpm is not None and len(key.recent) >= key.rpm:
                raise over_rpm(key, key.recent[0] + RATE_WINDOW - now)
            if key.concurrent is not None and key.active >= key.concurrent:
                raise over_concurrent(key)
        if key.rpm is not None:
            key.recent.append(now)
        key.active += 1
        return Slot(key)

    def done(self, slot):
        slot.key.active -= 1

    async def close(self):
        """Nothing is held elsewhere."""


class ApiKeys:
    """The keys clients may use, and the limits of the named ones, counted by `limits` (KeyLimits by default)."""

    def __init__(self, settings, limits=None):
        self.unnamed = [ApiKey("", value) for value in settings.valid_api_key]
        self.named = []
        self.file = WatchedFile(settings.api_keys_file)
        self.limits = limits or KeyLimits()

    def find(self, given):
        """The key `given` is, or None."""
        return matching_key(given, itertools.chain(self.unnamed, self.named), lambda key: key.value)

    async def admit(self, key):
        """Counts a request against the key's limits (a 429 when over one); done() gives its Slot back."""
        return await self.limits.admit(key)

    def done(self, slot):
        self.limits.done(slot)

    async def reload(self):
        """Reads the file if it changed; keys still present keep their counts."""
        keys = await self.file.parsed_changes(parse_api_keys_file, "name:key [rpm=N] [concurrent=N]")
        if keys is not None:
            self.take(keys)

    def take(self, keys):
        """Makes `keys` the named keys; one already known by its name stays the same ApiKey, with the new value and
        limits, so that the requests it is running still count, and end, against it, and a reload keeps its
        counts."""
        known = {key.name: key for key in self.named}
        for index, key in enumerate(keys):
            kept = known.get(key.name)
            if kept:
                kept.value, kept.rpm, kept.concurrent = key.value, key.rpm, key.concurrent
                keys[index] = kept
        self.named = keys

    async def watch(self):
        """Reads the file when it changed; polled every second, like the token file."""
        await self.reload()
        return TOKEN_FILE_POLL_SECONDS

    def listed(self, figures):
        """The named keys as the admin page shows them: masked, with their limits, the completions they are
        running and, from `figures` (the monitor's, by name), what they have done."""
        return [{"name": key.name, "masked": mask_token(key.value), "rpm": key.rpm, "concurrent": key.concurrent,
                 "active": key.active, **asdict(figures.get(key.name, KeyFigures()))} for key in self.named]


# ─── Stored responses ────────────────────────────────────────────────────────
# The Responses API's kept responses, and the conversation that led to each,
# for previous_response_id and GET/DELETE /v1/responses/{id}. Offers
# ResponseStore to the app state (kept in this process; the store replicas
# share is in Replicas, with the same methods).

@dataclass(frozen=True)
class StoredResponse:
    kept_at: float   # the store's clock
    owner: str       # the digest of the API key that stored it: only that key reads, continues or deletes it
    data: bytes      # the response and the items of its conversation, as compact JSON: its size is what it holds

    @property
    def size(self):
        return len(self.data)

    def response(self):
        return json.loads(self.data)["response"]

    def history(self):
        """The items of the conversation up to and including this response's output."""
        return json.loads(self.data)["history"]


def owned_by(kept, owner):
    """The kept response, when `owner` (an API key's digest) stored it; else None."""
    return kept if kept and hmac.compare_digest(kept.owner, owner) else None


class ResponseStore:
    """Kept responses and the conversation that led to each, for previous_response_id and GET/DELETE by the key
    that stored them: bounded by count and bytes (the oldest go first), each kept for RESPONSES_STORE_TTL seconds."""

    def __init__(self, settings, clock=time.monotonic):
        self.max_count = settings.responses_store_count
        self.max_bytes = settings.responses_store_mb * MB
        self.ttl = settings.responses_store_ttl
        self.clock = clock
        self.entries = collections.OrderedDict()  # id → StoredResponse, oldest first
        self.bytes = 0

    def stored(self, response, history, owner):
        """The StoredResponse a response becomes, now; None when it cannot be kept (larger than the store)."""
        data = json_text({"response": response, "history": history}).encode()
        if len(data) > self.max_bytes or not self.max_count:
            return None
        return StoredResponse(self.clock(), owner, data)

    async def put(self, response, history, owner):
        kept = self.stored(response, history, owner)
        if kept:
            self.keep(response["id"], kept)

    def keep(self, response_id, kept):
        """Keeps one, the oldest going first past the count or the bytes."""
        self.entries[response_id] = kept
        self.bytes += kept.size
        while len(self.entries) > self.max_count or self.bytes > self.max_bytes:
            self.drop(next(iter(self.entries)))

    def held(self, response_id):
        """The StoredResponse kept here under that id (whoever owns it), once the expired ones are gone; or None."""
        while self.entries and self.clock() - next(iter(self.entries.values())).kept_at > self.ttl:
            self.drop(next(iter(self.entries)))
        return self.entries.get(response_id)

    async def get(self, response_id, owner):
        """The StoredResponse, or None when it was never kept, has expired, was deleted, or is another key's."""
        return owned_by(self.held(response_id), owner)

    async def delete(self, response_id, owner):
        found = await self.get(response_id, owner) is not None
        if found:
            self.drop(response_id)
        return found

    def drop(self, response_id):
        kept = self.entries.pop(response_id, None)
        self.bytes -= kept.size if kept else 0

    def missing(self, response_id, param=None):
        return ApiError(404, f"No response with id '{response_id}': it was not stored (store: false), has been "
                             f"deleted, or has expired (responses are kept {self.ttl:g} s, the newest "
                             f"{self.max_count})", param=param, code="response_not_found")


# ─── Seals ───────────────────────────────────────────────────────────────────
# What the proxy hands a client to give back unread and unchanged (a
# compaction item's summary): authenticated encryption under COMPACTION_KEY,
# encrypt-then-MAC from the standard library. Offers Sealer to the app state
# (replicas share its key: see Replicas).

SEAL_PREFIX = b"k2s1."  # the format's version, authenticated with the rest
SEAL_NONCE_BYTES, SEAL_TAG_BYTES = 16, 32


class Sealer:
    """Seals a JSON object into text a client can neither read nor forge nor alter, and opens it again: a SHAKE-256
    keystream (keyed by a derived key and a fresh nonce) XORed with the JSON, then an HMAC-SHA256 of the prefix,
    nonce and ciphertext; both keys are derived from the one secret."""

    def __init__(self, secret):
        self.take(secret)

    def take(self, secret):
        """Seals from now on under this secret (a replica takes the one its replicas share)."""
        master = secret.encode()
        self.cipher_key = hmac.new(master, b"k2proxy seal: cipher", hashlib.sha256).digest()
        self.mac_key = hmac.new(master, b"k2proxy seal: mac", hashlib.sha256).digest()

    def _keystream(self, nonce, length):
        return hashlib.shake_256(self.cipher_key + nonce).digest(length)

    def seal(self, payload):
        plain = json_text(payload).encode()
        nonce = secrets.token_bytes(SEAL_NONCE_BYTES)
        cipher = (int.from_bytes(plain, "big") ^ int.from_bytes(self._keystream(nonce, len(plain)), "big")).to_bytes(
            len(plain), "big")
        tag = hmac.new(self.mac_key, SEAL_PREFIX + nonce + cipher, hashlib.sha256).digest()
        return (SEAL_PREFIX + base64.urlsafe_b64encode(nonce + cipher + tag).rstrip(b"=")).decode()

    def open(self, sealed):
        """The object sealed in `sealed`, or None when it is not something this key sealed, unchanged."""
        if not isinstance(sealed, str) or not sealed.startswith(SEAL_PREFIX.decode()):
            return None
        text = sealed[len(SEAL_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (ValueError, binascii.Error):
            return None
        nonce, cipher, tag = raw[:SEAL_NONCE_BYTES], raw[SEAL_NONCE_BYTES:-SEAL_TAG_BYTES], raw[-SEAL_TAG_BYTES:]
        if len(raw) < SEAL_NONCE_BYTES + SEAL_TAG_BYTES or not hmac.compare_digest(
                tag, hmac.new(self.mac_key, SEAL_PREFIX + nonce + cipher, hashlib.sha256).digest()):
            return None
        plain = (int.from_bytes(cipher, "big") ^ int.from_bytes(self._keystream(nonce, len(cipher)), "big")).to_bytes(
            len(cipher), "big")
        try:
            return loads(plain.decode())
        except (UnicodeDecodeError, ValueError):
            return None


# ─── Shared state ────────────────────────────────────────────────────────────
# Replicas that share one Redis (REDIS_URL; the redis package is imported only
# then), as a layer below all the local code, which knows nothing of it. The
# link to it: any failed command marks it down, and the shared backends below
# fall back on their local forms; /health says so, the log warns once a minute,
# and the heartbeat, which also tells the fleet this replica is up, brings it
# back and has each backend resync. Offers Shared, Unshared, the replicas the
# heartbeats show, and CappedStore, bounded like the stores above.

REDIS_TIMEOUT = 0.5          # seconds a Redis command may take before Redis counts as unreachable
HEARTBEAT_SECONDS = 0.5      # between two heartbeats: how soon a replica sees Redis back
REPLICA_GONE_SECONDS = 10    # a replica whose heartbeat is older is no longer listed
SILENT_SECONDS = 1.5         # a replica whose heartbeat is older (three beats) may be cut off from Redis
REDIS_WARNING_SECONDS = 60   # between two warnings that Redis cannot be reached
REDIS_PREFIX = "k2proxy:"    # of every key k2proxy keeps in Redis
REPLICAS_KEY = REDIS_PREFIX + "replicas"
EPOCH_KEY = REDIS_PREFIX + "epoch"  # when Redis's data began: the first heartbeat after a start that lost it
REFILL_SECONDS = 3 * HEARTBEAT_SECONDS  # after Redis lost its data, how long replicas take to put back their own


# A capped store in Redis: the entries under a prefix (their data, their order, their sizes and their bytes in all),
# bounded by count, bytes and age. Dropping one entry:
DROP_ENTRY_LUA = """
local function drop(prefix, id)
  redis.call('DEL', prefix .. 'data:' .. id)
  redis.call('ZREM', prefix .. 'order', id)
  local size = redis.call('HGET', prefix .. 'sizes', id)
  if size then
    redis.call('HDEL', prefix .. 'sizes', id)
    redis.call('DECRBY', prefix .. 'bytes', size)
  end
end
"""
DROP_ENTRY_SCRIPT = DROP_ENTRY_LUA + "drop(ARGV[1], ARGV[2])\nreturn 0"
# Keeping one (ARGV: prefix, id, data, its age, ttl, count and bytes allowed, times in ms): the expired and, past
# the count or the bytes, the oldest go first.
PUT_ENTRY_SCRIPT = DROP_ENTRY_LUA + """
local prefix, id, data = ARGV[1], ARGV[2], ARGV[3]
local age, ttl, count, bytes = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
for _, old in ipairs(redis.call('ZRANGEBYSCORE', prefix .. 'order', '-inf', now - ttl)) do drop(prefix, old) end
drop(prefix, id)
redis.call('SET', prefix .. 'data:' .. id, data, 'PX', ttl - age)
redis.call('ZADD', prefix .. 'order', now - age, id)
redis.call('HSET', prefix .. 'sizes', id, string.len(data))
redis.call('INCRBY', prefix .. 'bytes', string.len(data))
while redis.call('ZCARD', prefix .. 'order') > count or tonumber(redis.call('GET', prefix .. 'bytes')) > bytes do
  drop(prefix, redis.call('ZRANGE', prefix .. 'order', 0, 0)[1])
end
for _, part in ipairs({'order', 'sizes', 'bytes'}) do redis.call('PEXPIRE', prefix .. part, ttl) end
return 0
"""


class Unshared(Exception):
    """Redis cannot be reached: the caller serves from its local state."""


def redis_place(url):
    """Where a Redis URL points, without its password, for logs and /health."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path if parts.path not in ('', '/') else ''}"


class Shared:
    """The link to the Redis that replicas share: commands run through `run`, which turns any failure into
    Unshared; `up` says whether the last command worked."""

    def __init__(self, url, replica, clock=time.time):
        try:
            import redis.asyncio as redis_client  # optional: requirements-redis.txt
            from redis.exceptions import RedisError
        except ImportError:
            raise SettingsError("setting REDIS_URL needs the redis package: pip install -r requirements-redis.txt "
                                "(the Docker image: build it with --build-arg WITH_REDIS=1)") from None
        try:
            self.client = redis_client.from_url(url, socket_timeout=REDIS_TIMEOUT,
                                                socket_connect_timeout=REDIS_TIMEOUT)
        except ValueError:  # its message may quote the URL, password and all
            raise SettingsError("setting REDIS_URL is invalid: it must be a redis://, rediss:// or unix:// URL (with "
                                "its password URL-encoded)") from None
        self.failures = (RedisError, OSError, asyncio.TimeoutError)
        self.place = redis_place(url)
        self.replica = replica
        self.clock = clock
        self.started = clock()
        self.up = False
        self.down_since = self.started  # until the first heartbeat gets through
        self.reason = "not reached yet"
        self.warned_at = None
        self.epoch = None  # EPOCH_KEY as this replica last read it
        self.saw_data_lost = False  # the epoch changed under this replica: Redis lost the data it had seen
        self.resyncs = []  # async callables the sections below add: run when Redis is back, or lost its data
        self.put_entry, self.drop_entry = self.script(PUT_ENTRY_SCRIPT), self.script(DROP_ENTRY_SCRIPT)  # CappedStore's

    def script(self, text):
        """A Lua script run atomically in Redis, called as `await script(keys=[...], args=[...])`."""
        return self.client.register_script(text)

    async def run(self, command):
        """What `command(client)` gives; Unshared when Redis is down or the command fails (which marks it down)."""
        if not self.up:
            raise Unshared()
        try:
            return await command(self.client)
        except self.failures as exc:
            self.lost(exc)
            raise Unshared() from None

    def lost(self, exc):
        if self.up:
            self.up, self.down_since = False, self.clock()
            self.warned_at = None
        self.reason = loggable(str(exc) or type(exc).__name__)[:LAST_ERROR_CHARS]

    async def beat(self):
        """Tells the fleet this replica is up, which also tries Redis: when it is back, each section resyncs."""
        now = self.clock()
        entry = json_text({"started": self.started, "seen": now, "version": __version__})
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(REPLICAS_KEY, self.replica, entry)
                pipe.set(EPOCH_KEY, f"{now} {secrets.token_hex(8)}", nx=True)  # when, and which start of the data
                pipe.get(EPOCH_KEY)
                *_, epoch = await pipe.execute()
        except self.failures as exc:
            self.lost(exc)
        else:
            emptied = self.epoch is not None and epoch != self.epoch
            if emptied:
                self.saw_data_lost = True
                log.warning("Redis at %s lost its data (restarted without persistence, or flushed): this replica "
                            "puts back what it keeps", self.place)
            self.epoch = epoch
            if not self.up or emptied:
                if not self.up:
                    log.info("Redis at %s reached: key limits, stored responses, credential state, the request log "
                             "and admin edits are shared with the other replicas", self.place)
                self.up = True
                for resync in self.resyncs:
                    with contextlib.suppress(Unshared):
                        await resync()
        if not self.up and (self.warned_at is None or now - self.warned_at >= REDIS_WARNING_SECONDS):
            self.warned_at = now
            log.warning("Redis at %s cannot be reached (%s) for %.0f s: this replica serves from its own state "
                        "(see docs/replicas.md for what that means) and resyncs when Redis is back", self.place,
                        self.reason, self.clock() - self.down_since)
        return HEARTBEAT_SECONDS

    def problem(self):
        """What /health says while Redis is down, else None."""
        if self.up:
            return None
        return ApiError(503, f"Redis at {self.place} cannot be reached ({self.reason}) for "
                             f"{self.clock() - self.down_since:.0f} s: this replica serves from its own state",
                        code="redis_unreachable")

    async def heartbeats(self):
        """The last heartbeat of each replica that has not left, by name; those of a day ago are forgotten."""
        entries = await self.run(lambda redis: redis.hgetall(REPLICAS_KEY))
        beats = {name.decode(): json.loads(entry) for name, entry in entries.items()}
        forgotten = [name for name, beat in beats.items() if self.clock() - beat["seen"] > DAY_SECONDS]
        if forgotten:
            await self.run(lambda redis: redis.hdel(REPLICAS_KEY, *forgotten))
        return beats

    async def replicas(self):
        """The replicas whose heartbeat is recent: name, start and last heartbeat, in order of start."""
        now, seen = self.clock(), []
        for name, beat in (await self.heartbeats()).items():
            if now - beat["seen"] < REPLICA_GONE_SECONDS:
                seen.append({"name": name, "started": beat["started"], "seen": beat["seen"],
                             "uptime_s": int(now - beat["started"]), "version": beat["version"]})
        return sorted(seen, key=lambda entry: entry["started"])

    async def refilling(self):
        """Seconds since Redis lost data this replica had seen, while the replicas may still be putting back their own
        (REFILL_SECONDS), or None. (A Redis new to this replica is not one that lost data.)"""
        epoch = await self.run(lambda redis: redis.get(EPOCH_KEY))
        if self.epoch is None or (epoch == self.epoch and not self.saw_data_lost):
            return None
        age = self.clock() - float(epoch.split()[0]) if epoch else 0.0  # none: just lost, no heartbeat since
        return age if 0 <= age < REFILL_SECONDS else None  # (a replica whose clock is behind does not wait)

    async def silent_since(self, within):
        """Seconds since the oldest heartbeat of a replica that went silent, less than `within` seconds ago, without
        leaving (it may serve, cut off from Redis), or None."""
        now = self.clock()
        silent = [now - beat["seen"] for beat in (await self.heartbeats()).values()
                  if SILENT_SECONDS < now - beat["seen"] < within]
        return max(silent, default=None)

    async def leave(self):
        """Takes this replica off the list as it stops."""
        with contextlib.suppress(Unshared):
            await self.run(lambda redis: redis.hdel(REPLICAS_KEY, self.replica))
        await self.client.aclose()


class CappedStore:
    """Entries under one prefix in Redis, bounded by count, bytes and age (the oldest go first), for the stores that
    replicas share; every call raises Unshared while Redis cannot be reached."""

    def __init__(self, shared, prefix, count, max_bytes, ttl):
        self.shared, self.prefix = shared, prefix
        self.limits = [count, int(max_bytes), int(ttl * 1000)]

    async def put(self, entry_id, data, age=0.0):
        """Keeps `data`, which was made `age` seconds ago (its time to live runs from then)."""
        count, max_bytes, ttl = self.limits
        await self.shared.run(lambda redis: self.shared.put_entry(
            args=[self.prefix, entry_id, data, int(age * 1000), ttl, count, max_bytes]))

    async def get_many(self, entry_ids):
        """The data of each entry, None for one not kept."""
        return await self.shared.run(lambda redis: redis.mget([self.prefix + "data:" + entry for entry in entry_ids]))

    async def drop(self, entry_id):
        await self.shared.run(lambda redis: self.shared.drop_entry(args=[self.prefix, entry_id]))


# ─── Replicas ────────────────────────────────────────────────────────────────
# What replicas that share one Redis share, as a layer over the local code: the
# shared backends of the stores and counts above, each with the same methods as
# its local form, which it falls back on while Redis cannot be reached (the
# reasoning replayed to the API, the key limits, the stored responses); and
# Fleet, one exchange with Redis every half second for what else is kept in
# step (each credential's rest, disabling and daily budget, the tokens accounts
# signed in with, the files edited on the admin page, the request log), through
# methods the credentials, accounts and monitor offer. Each replica publishes
# what changed here since the last exchange and takes what the others
# published. Offers the shared backends and Fleet to the app state.

REPLAY_KEY = REDIS_PREFIX + "replay:"  # + client: its share of the replay cache, for every replica
REPLAY_SHARED_ENTRIES = 100000        # at most, in a client's share in Redis (its bytes are bounded too)
REPLAY_SHARED_SECONDS = DAY_SECONDS   # how long an answer's reasoning is kept there


class SharedReplayCache:
    """The replay cache with each client's share kept in Redis too, so that a client that drops reasoning gets it
    back whichever replica answered; `local`'s alone while Redis cannot be reached."""

    def __init__(self, local, shared):
        self.local, self.shared = local, shared

    def share_of(self, client):
        """The client's share of the cache in Redis."""
        return CappedStore(self.shared, f"{REPLAY_KEY}{client}:", REPLAY_SHARED_ENTRIES, self.local.share,
                           REPLAY_SHARED_SECONDS)

    async def put(self, client, digest, reasoning):
        kept = await self.local.put(client, digest, reasoning)
        data = reasoning.encode()
        if kept and len(data) <= self.local.share:
            with contextlib.suppress(Unshared):
                await self.share_of(client).put(digest.hex(), data)
        return kept

    async def lookup(self, client, digests):
        """The reasoning kept for each of `digests` that is kept, here or (for the others) in Redis."""
        found = await self.local.lookup(client, digests)
        wanted = [digest for digest in digests if digest not in found]
        if wanted:
            with contextlib.suppress(Unshared):
                kept = await self.share_of(client).get_many([digest.hex() for digest in wanted])
                found.update((digest, data.decode()) for digest, data in zip(wanted, kept) if data)
        return found


LEASE_SECONDS = 30        # a slot held in Redis is freed this long after its replica last renewed it
LEASE_RENEW_SECONDS = 10  # how often a replica renews the slots its requests hold
LIMITS_KEY = REDIS_PREFIX + "limits:"
# One atomic step per request: forget what left the minute and the leases that expired, then refuse (1: over rpm,
# with the milliseconds until a request leaves the minute; 2: over concurrent) or count it (0).
ADMIT_SCRIPT = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local rpm, concurrent, window, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  return {1, tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]) + window - now}
end
if concurrent > 0 and redis.call('ZCARD', KEYS[2]) >= concurrent then
  return {2, 0}
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
end
if concurrent > 0 then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], lease)
end
return {0, 0}
"""
# Renews this replica's leases: KEYS are the keys' lease sets, ARGV the lease of each, then the lease's length.
RENEW_SCRIPT = """
local clock = redis.call('TIME')
local expiry = clock[1] * 1000 + math.floor(clock[2] / 1000) + tonumber(ARGV[#ARGV])
for index, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', expiry, ARGV[index]) == 1 then redis.call('PEXPIRE', key, ARGV[#ARGV]) end
end
return 0
"""


class SharedKeyLimits:
    """Key limits the fleet counts in Redis: each key's minute, and its slots in use as leases that expire unless
    renewed (so that a replica that dies frees its slots). This replica counts too, and its counts decide while
    Redis cannot be reached."""

    def __init__(self, shared, local=None):
        self.shared, self.local = shared, local or KeyLimits()
        self.leases = {}      # lease → the key's lease set in Redis, for each slot this replica's requests hold
        self.freeing = set()  # the slots being given back to Redis
        self.admit_script, self.renew_script = shared.script(ADMIT_SCRIPT), shared.script(RENEW_SCRIPT)

    async def admit(self, key):
        """Counts a request against the key's limits; the fleet's counts decide while Redis is up."""
        lease = None
        if key.rpm or key.concurrent:
            with contextlib.suppress(Unshared):
                lease = await self.admit_shared(key)
        return replace(self.local.count(key, enforce=lease is None), ticket=lease)

    async def admit_shared(self, key):
        """The lease of a request the fleet's counts admit (a 429 when they do not)."""
        lease, names = uuid.uuid4().hex, [LIMITS_KEY + key.name + ":minute", LIMITS_KEY + key.name + ":slots"]
        if key.concurrent:  # a slot to renew and give back, also when the request is gone before Redis answers
            self.leases[lease] = names[1]
        try:
            refused, wait_ms = await self.shared.run(lambda redis: self.admit_script(
                keys=names, args=[key.rpm or 0, key.concurrent or 0, RATE_WINDOW * 1000, lease, LEASE_SECONDS * 1000]))
        except BaseException:
            self.give_back(lease)
            raise
        if refused:
            self.give_back(lease)
            raise over_rpm(key, wait_ms / 1000) if refused == 1 else over_concurrent(key)
        return lease

    def done(self, slot):
        """Gives a request's slot back: at once here, and in Redis as soon as it answers (else the lease expires)."""
        self.local.done(slot)
        self.give_back(slot.ticket)

    def give_back(self, lease):
        """Frees a slot this replica holds in Redis, in the background (a lease it no longer holds: nothing)."""
        name = self.leases.pop(lease, None)
        if name:
            freeing = asyncio.ensure_future(self.free(lease, name))
            self.freeing.add(freeing)
            freeing.add_done_callback(self.freeing.discard)

    async def free(self, lease, name):
        with contextlib.suppress(Unshared):
            await self.shared.run(lambda redis: redis.zrem(name, lease))

    async def renew_leases(self):
        """Renews the slots this replica's requests hold in Redis, so that they do not expire under them."""
        if self.leases:
            leases = list(self.leases.items())
            with contextlib.suppress(Unshared):
                await self.shared.run(lambda redis: self.renew_script(
                    keys=[name for _, name in leases], args=[*(lease for lease, _ in leases), LEASE_SECONDS * 1000]))
        return LEASE_RENEW_SECONDS

    async def close(self):
        """Once the last requests have ended: their slots given back to Redis."""
        await asyncio.gather(*self.freeing, return_exceptions=True)


RESPONSES_KEY = REDIS_PREFIX + "responses:"
STORE_UNREACHABLE = "Redis, where stored responses are kept, cannot be reached now"


def store_unreachable(why):
    """A stored response that may exist but cannot be had now: a 503 to try again, never a 404."""
    return ApiError(503, f"{why}; try again in a moment", code="store_unreachable", retry_after=1)


class SharedResponseStore:
    """Stored responses kept in Redis, for every replica, bounded there as here; while Redis cannot be reached they
    are kept in `local`, and moved to Redis when it is back: an id handed to a client is never dropped unsaid, and
    one that may exist somewhere is a 503, never a silent 404."""

    def __init__(self, local, shared):
        self.local, self.shared = local, shared
        self.kept_in_redis = CappedStore(shared, RESPONSES_KEY, local.max_count, local.max_bytes, local.ttl)
        self.clock = local.clock
        shared.resyncs.append(self.move_to_shared)

    async def put(self, response, history, owner):
        kept = self.local.stored(response, history, owner)
        if kept is None:
            return
        was_up = self.shared.up
        with contextlib.suppress(Unshared):
            return await self.put_shared(response["id"], kept)
        self.local.keep(response["id"], kept)
        if was_up:  # this put found Redis gone: one more try now (a blip), before the client may ask another replica
            await self.shared.beat()

    async def put_shared(self, response_id, kept):
        """Keeps a response in Redis as its owner, a space, and its data."""
        await self.kept_in_redis.put(response_id, kept.owner.encode() + b" " + kept.data, self.clock() - kept.kept_at)

    async def get(self, response_id, owner):
        """The StoredResponse, or None when it was never kept, has expired, was deleted, or is another key's; a
        503 when it could be in a Redis that cannot be reached."""
        kept = self.local.held(response_id)
        if kept is None:
            refilling = silent = None
            try:
                data, = await self.kept_in_redis.get_many([response_id])
                if data is None:
                    refilling = await self.shared.refilling()
                    silent = await self.shared.silent_since(self.local.ttl)
            except Unshared:
                raise store_unreachable(STORE_UNREACHABLE) from None
            if refilling is not None:
                raise store_unreachable(f"Redis lost its data {refilling:.1f} s ago and the replicas are putting back "
                                        "the responses they hold")
            if silent:  # it may be kept by that replica, to be moved to Redis when the two meet again
                raise store_unreachable(f"No response with this id in Redis, and a replica has not been heard from "
                                        f"for {silent:.0f} s: it may hold it")
            if data:
                owner_of, _, data = data.partition(b" ")
                kept = StoredResponse(self.clock(), owner_of.decode(), data)
        return owned_by(kept, owner)

    async def delete(self, response_id, owner):
        found = await self.get(response_id, owner) is not None
        local = found and response_id in self.local.entries
        if local:
            self.local.drop(response_id)
        if found:  # in Redis too, where a put that seemed to fail may have landed
            try:
                await self.kept_in_redis.drop(response_id)
            except Unshared:
                if not local:
                    raise store_unreachable(STORE_UNREACHABLE) from None
        return found

    async def move_to_shared(self):
        """Moves the responses kept here while Redis could not be reached to Redis, oldest first, with their age; one
        deleted meanwhile is deleted there too."""
        for response_id, kept in list(self.local.entries.items()):
            if self.clock() - kept.kept_at < self.local.ttl:
                await self.put_shared(response_id, kept)
                if response_id not in self.local.entries:
                    await self.kept_in_redis.drop(response_id)
            self.local.drop(response_id)

    def missing(self, response_id, param=None):
        return self.local.missing(response_id, param)

SYNC_SECONDS = 0.5
CREDENTIALS_KEY = REDIS_PREFIX + "credentials:"  # + pool: a hash of each credential's state, by fingerprint
CREDENTIAL_STATE_SECONDS = 2 * DAY_SECONDS  # a pool's shared state is forgotten after this long without a change
TOKENS_TODAY_KEY = REDIS_PREFIX + "tokens-today:"  # + pool:day: a hash of each credential's tokens that day
ACCOUNT_TOKENS_KEY = REDIS_PREFIX + "account-tokens"
SIGNING_IN_KEY = REDIS_PREFIX + "signing-in:"  # + email: the replica signing the account in
SIGN_IN_CLAIM_SECONDS = 60
# Claims the signing in of an account for this replica (ARGV[1]), unless another one holds the claim; its own claim
# it takes again, so its retries are not held up.
CLAIM_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) or redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
EDITS_KEY = REDIS_PREFIX + "edits"            # file name → the version of its last admin edit, and when it was saved
EDIT_TEXTS_KEY = REDIS_PREFIX + "edit-texts"  # file name → that edit's text, read only by a replica that lacks it
LOG_KEY = REDIS_PREFIX + "log"
def replica_name():
    """This process among the replicas: its host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fingerprint(value):
    """A credential's name in Redis: the same on every replica, and no use to whoever reads it."""
    return hashlib.sha256(b"k2proxy credential\0" + value.encode()).hexdigest()[:24]


NOTHING_SHARED = Health()  # of a credential nothing has happened to


@dataclass
class Synced:
    """What a replica knows of one credential's shared state."""
    fingerprint: str
    fields: Health = NOTHING_SHARED  # as this replica and the fleet last agreed on them
    entry: bytes | None = None       # the fleet's entry as last read, so that an unchanged one is not parsed again
    remote: Health | None = None     # that entry's state
    day: int | None = None           # the UTC day `tokens` counts
    tokens: int = 0           # its tokens that day, as last synced

    def agreed(self, fields):
        self.fields = fields

    def tokens_synced(self, credential, total, added):
        """The fleet counted `added` more tokens over `total`: this replica's count takes the others' too."""
        credential.add_tokens(total - self.tokens)
        self.tokens = total + added


def merged_state(local, agreed, remote):
    """Each shared field as this replica changed it since it last agreed with the fleet, else as the fleet has it,
    so that changes to different fields on two replicas at once are both kept."""
    return Health(*(mine if mine != before else theirs for mine, before, theirs in zip(local, agreed, remote)))


class Fleet:
    """Keeps this replica in step with the others through Redis, one exchange every SYNC_SECONDS."""

    def __init__(self, shared, settings, pools, accounts, edits, monitor, save_lock, clock=time.time):
        self.shared = shared
        self.save_lock = save_lock    # held by every save of a file the admin page edits
        self.pools = pools
        self.accounts = accounts
        self.edits = edits            # the name of each file the admin page edits → (its WatchedFile, load(text))
        self.monitor = monitor
        self.log_size = settings.request_log_size
        self.clock = clock
        self.synced = {}              # (pool name, credential value) → what is known of its shared state
        self.account_tokens = {}      # email → the account's token, as last published or taken
        self.edits_taken = {}         # file name → the version of the edit last taken
        self.log_pushed = 0           # the monitor's `logged` when the log was last pushed
        self.unpublished = {}         # file name → the text saved here while Redis could not be reached
        self.claim_script = shared.script(CLAIM_SCRIPT)
        shared.resyncs.append(self.publish_edits)

    async def sync(self):
        """One exchange, when Redis is up; a step of keep_polling."""
        if self.shared.up:
            with contextlib.suppress(Unshared):
                await self.shared.run(self.exchange)
        return SYNC_SECONDS

    async def exchange(self, redis):
        day = int(self.clock() // DAY_SECONDS)
        reading = redis.pipeline(transaction=False)
        for pool in self.pools:
            reading.hgetall(CREDENTIALS_KEY + pool.name)
            reading.hgetall(f"{TOKENS_TODAY_KEY}{pool.name}:{day}")
        reading.hgetall(ACCOUNT_TOKENS_KEY)
        reading.hgetall(EDITS_KEY)
        *pool_hashes, accounts, edits = await reading.execute()
        writing = redis.pipeline(transaction=False)
        written: list[typing.Callable[[], None]] = []  # what is published, once the writes went through
        synced = {}
        for place, pool in enumerate(self.pools):
            synced.update(self.sync_pool(pool, pool_hashes[2 * place], pool_hashes[2 * place + 1], writing, written,
                                         day))
        self.synced = synced  # of the credentials the pools hold now: one that left is forgotten
        self.sync_accounts(accounts, writing, written)
        self.push_log(writing, written)
        await writing.execute()
        for published in written:
            published()
        await self.take_edits(edits)

    def sync_pool(self, pool, states, totals, writing, written, day):
        """Publishes the state of the pool's credentials that changed here, takes what others published since;
        returns what is known of each credential the pool holds now."""
        known = {}
        for credential in pool.credentials:
            synced = self.synced.get((pool.name, credential.value)) or Synced(fingerprint(credential.value))
            known[pool.name, credential.value] = synced
            entry = states.get(synced.fingerprint.encode())
            if entry is not None and entry != synced.entry:
                synced.entry, synced.remote = entry, Health(*json.loads(entry)["fields"])
            remote = synced.remote if entry is not None else synced.fields
            local = credential.health()
            merged = merged_state(local, synced.fields, remote)
            if merged != local:
                credential.take_health(merged)
            if merged != remote:
                name = CREDENTIALS_KEY + pool.name
                writing.hset(name, synced.fingerprint, json_text({"fields": merged}))
                writing.expire(name, CREDENTIAL_STATE_SECONDS)
                written.append(functools.partial(synced.agreed, merged))
            else:
                synced.agreed(merged)
            self.sync_tokens_today(pool.name, credential, synced, int(totals.get(synced.fingerprint.encode(), 0)),
                                   writing, written, day)
        return known

    @staticmethod
    def sync_tokens_today(pool_name, credential, synced, total, writing, written, day):
        """Adds the tokens this replica counted since the last exchange to the fleet's count of the day, and takes
        the others' count."""
        counted = credential.tokens_on(day)
        if synced.day != day:
            synced.day, synced.tokens = day, 0
        added = counted - synced.tokens
        if added:
            name = f"{TOKENS_TODAY_KEY}{pool_name}:{day}"
            writing.hincrby(name, synced.fingerprint, added)
            writing.expire(name, 2 * DAY_SECONDS)
        written.append(functools.partial(synced.tokens_synced, credential, total, added))

    def sync_accounts(self, remote, writing, written):
        """Publishes the token an account signed in with here; takes the one another replica signed in with."""
        held = self.accounts.tokens()
        for email, token in held.items():
            entry = json.loads(remote[email.encode()]) if email.encode() in remote else None
            if token != self.account_tokens.get(email):
                writing.hset(ACCOUNT_TOKENS_KEY, email, json_text({"token": token}))
                writing.expire(ACCOUNT_TOKENS_KEY, DAY_SECONDS)
                written.append(functools.partial(self.token_published, email, token))
            elif entry and entry["token"] != token:
                self.account_tokens[email] = entry["token"]
                self.accounts.adopt(email, entry["token"])
        for email, entry in remote.items():
            email, token = email.decode(), json.loads(entry)["token"]
            if email not in held and email not in self.account_tokens and self.accounts.adopt(email, token):
                self.account_tokens[email] = token

    def token_published(self, email, token):
        self.account_tokens[email] = token

    def log_published(self, logged):
        self.log_pushed = logged

    async def claim_sign_in(self, email):
        """Whether this replica is to sign the account in now: no other is (while Redis is down, each signs in)."""
        try:
            return bool(await self.shared.run(lambda redis: self.claim_script(
                keys=[SIGNING_IN_KEY + email], args=[self.shared.replica, SIGN_IN_CLAIM_SECONDS])))
        except Unshared:
            return True

    def push_log(self, writing, written):
        """Adds the requests logged here since the last exchange to the fleet's log, which keeps REQUEST_LOG_SIZE."""
        entries, logged = self.monitor.logged_since(self.log_pushed)
        written.append(functools.partial(self.log_published, logged))
        if entries and self.log_size:
            writing.lpush(LOG_KEY, *(json_text({**entry, "replica": self.shared.replica}) for entry in entries))
            writing.ltrim(LOG_KEY, 0, self.log_size - 1)

    async def requests(self):
        """The fleet's request log, newest first; this replica's own while Redis cannot be reached."""
        try:
            entries = await self.shared.run(lambda redis: redis.lrange(LOG_KEY, 0, self.log_size - 1))
        except Unshared:
            return self.monitor.request_log()
        return sorted(map(json.loads, entries), key=lambda entry: entry["time"], reverse=True)

    async def publish_edit(self, name, content):
        """Hands a file saved on the admin page to the other replicas, which take it within SYNC_SECONDS; while
        Redis cannot be reached, when it is back."""
        version = file_version(content)
        self.edits_taken[name] = version
        self.unpublished[name] = content
        with contextlib.suppress(Unshared):
            await self.publish_edits()

    async def publish_edits(self):
        """Publishes the edits saved here that the others have not had yet."""
        if self.unpublished:
            sent = dict(self.unpublished)
            edits = {name: json_text({"version": file_version(content), "at": self.clock()})
                     for name, content in sent.items()}
            await self.shared.run(lambda redis: redis.pipeline().hset(EDIT_TEXTS_KEY, mapping=sent).hset(
                EDITS_KEY, mapping=edits).execute())
            for name, content in sent.items():
                if self.unpublished.get(name) == content:  # not saved again meanwhile
                    del self.unpublished[name]

    async def take_edits(self, edits):
        """Saves and loads each file another replica's admin page saved since the last exchange."""
        for name, entry in edits.items():
            name, entry = name.decode(), json.loads(entry)
            if name not in self.edits or self.edits_taken.get(name) == entry["version"]:
                continue
            self.edits_taken[name] = entry["version"]
            file, load = self.edits[name]
            found = await asyncio.to_thread(file.stat)
            if file.version != entry["version"] and not (found and found[1] / 1e9 > entry["at"]):
                await self.take_edit(name, file, load)

    async def take_edit(self, name, file, load):
        """Saves and loads a file as another replica's admin page saved it."""
        text = await self.shared.run(lambda redis: redis.hget(EDIT_TEXTS_KEY, name))
        if text is None:  # gone with a Redis that lost its data
            return
        content = text.decode()
        async with self.save_lock:
            try:
                await asyncio.to_thread(file.rewrite, lambda _: content)
            except OSError as exc:
                log.error("could not save %s as another replica's admin page edited it: %s", file.path, exc.strerror)
            load(content)
        log.info("%s: took the edit another replica's admin page saved", file.path)


SEAL_KEY = REDIS_PREFIX + "compaction-key"  # the generated compaction key the replicas share
SEAL_KEY_RECHECK_SECONDS = 60  # between two reads of it (a replica that started while Redis was down adopts it)


async def share_seal_key(shared, sealer, own):
    """Seals under the compaction key the replicas share: the first replica's generated key, which the others
    adopt, so that any replica opens a compaction item another made."""
    with contextlib.suppress(Unshared):
        await shared.run(lambda client: client.set(SEAL_KEY, own, nx=True))
        agreed = await shared.run(lambda client: client.get(SEAL_KEY))
        if agreed:
            sealer.take(agreed.decode() if isinstance(agreed, bytes) else agreed)
    return SEAL_KEY_RECHECK_SECONDS


# ─── App state ───────────────────────────────────────────────────────────────
# Everything a running proxy keeps, and its key in the aiohttp application:
# settings, the HTTP client and the upstream kinds, models, accounts, API keys,
# the monitor, stored responses and the memory budget of request bodies. Offers
# the sections below STATE, and finish(), where every request ends.

BODY_WAIT_SECONDS = 5           # how long a body waits for room in MEMORY_BUDGET_MB before a 503
POLLED_PATHS = ("/admin/", "/health", "/metrics")  # what the admin page and monitors poll: logged at DEBUG
TOOL_KINDS_NOTED, TOOL_KIND_CHARS = 64, 40  # tool types left out that are logged, and how much of each name


class MemoryBudget:
    """Memory that request bodies may take at once: a body is admitted when its share fits, else waits (bodies
    that fit go first), then is refused with a 503 and Retry-After. A limited key (one with rpm or concurrent
    limits) holds at most `key_share` of it, so that its uploads cannot starve the others."""

    def __init__(self, megabytes, key_share=None):
        self.limit = int(megabytes * MB)
        self.key_share = self.limit if key_share is None else key_share
        self.used = 0
        self.held: collections.Counter[str] = collections.Counter()  # by each limited key
        self.waiting: collections.deque[tuple[int, str | None, asyncio.Future]] = collections.deque()  # in order

    def fits(self, amount, holder):
        return self.used + amount <= self.limit and (holder is None or self.held[holder] + amount <= self.key_share)

    def take(self, amount, holder):
        self.used += amount
        if holder is not None:
            self.held[holder] += amount

    async def admit(self, amount, holder=None, wait=True):
        """Takes `amount` for `holder` (a limited key's name, or None); waits BODY_WAIT_SECONDS at most for it, or
        not at all without `wait` (a body already read, whose share of parsing must not wait on bodies still
        arriving, which may wait on it in turn)."""
        if self.fits(amount, holder):
            return self.take(amount, holder)
        busy = ApiError(503, "The proxy is busy reading other large requests; try again in a moment", code="busy",
                        retry_after=1)
        if not wait:
            raise busy
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append((amount, holder, waiter))
        try:
            await asyncio.wait_for(waiter, BODY_WAIT_SECONDS)
        except asyncio.TimeoutError:
            if waiter.done() and not waiter.cancelled():  # admitted in the very turn it gave up: give the share back
                self.release(amount, holder)
            raise busy from None

    def release(self, amount, holder=None):
        self.used -= amount
        if holder is not None:
            self.held[holder] -= amount
            if not self.held[holder]:
                del self.held[holder]
        for entry in list(self.waiting):
            wanted, whose, waiter = entry
            if waiter.done():
                self.waiting.remove(entry)
            elif self.fits(wanted, whose):
                self.waiting.remove(entry)
                self.take(wanted, whose)
                waiter.set_result(None)


class Alone:
    """What a proxy that shares no Redis has of a fleet: its own request log, every sign-in its own, nothing to
    publish or keep in step."""

    def __init__(self, monitor):
        self.monitor = monitor

    async def requests(self):
        return self.monitor.request_log()

    async def publish_edit(self, name, content):
        """No other replica to tell."""

    async def claim_sign_in(self, email):
        return True


class Handling:
    """The requests being handled, so that a drain (after SIGTERM) can wait for the last one; `draining` tells
    long-lived connections (WebSockets) to end once their work under way is done."""

    def __init__(self):
        self.count = 0
        self.none_left, self.draining = asyncio.Event(), asyncio.Event()
        self.none_left.set()

    @contextlib.contextmanager
    def one(self):
        self.count += 1
        self.none_left.clear()
        try:
            yield
        finally:
            self.count -= 1
            if not self.count:
                self.none_left.set()

    async def drain(self, seconds):
        """Until the requests in flight have ended, or `seconds` have passed."""
        self.draining.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.none_left.wait(), seconds)


KEY_BUDGET_SHARE = 0.5  # of MEMORY_BUDGET_MB, the most one limited key holds at once


def key_share(settings):
    """What one limited key may hold of the memory budget: KEY_BUDGET_SHARE of it, and never less than its largest
    body takes before it is parsed."""
    return int(max(settings.memory_budget_mb * KEY_BUDGET_SHARE, settings.max_request_mb * BODY_MEMORY_FACTOR) * MB)


def budget_holder(record):
    """Whose share of the memory budget a request takes: its key's when the key is limited, else nobody's."""
    key = record.api_key
    return key.name if key is not None and (key.rpm or key.concurrent) else None


class AppState:
    """Everything a running proxy keeps: settings, the upstream side, models, accounts, keys, the monitor; with
    REDIS_URL, the shared backends and the fleet, which the local code does not tell from the local ones."""

    def __init__(self, settings):
        self.settings = settings
        self.http = HttpClient(settings)
        self.site = SiteUpstream(settings, self.http)
        self.api = ApiUpstream(settings, self.http)
        kinds: dict[str, UpstreamKind] = {"site": self.site, "api": self.api}
        self.upstreams = [kinds[kind] for kind in settings.upstream]
        self.models = Models(settings, self.site)
        self.accounts = Accounts(settings, self.site, on_sign_in=self.models.token_arrived)
        self.monitor = Monitor(settings)
        self.keys = ApiKeys(settings)
        self.responses: ResponseStore | SharedResponseStore = ResponseStore(settings)
        self.sealer = Sealer(settings.compaction_key)
        self.save_lock = asyncio.Lock()
        self.shared: Shared | None = None
        self.fleet: Alone | Fleet = Alone(self.monitor)
        self.replica_steps: list[typing.Callable[[], typing.Awaitable[float]]] = []  # the replicas' background work
        self.steps_before_serving: list[typing.Callable[[], typing.Awaitable[float]]] = []  # of those, run first
        if settings.redis_url:
            self.share(Shared(settings.redis_url, replica_name()))
        self.accounts.claim = self.fleet.claim_sign_in
        self.budget = MemoryBudget(settings.memory_budget_mb, key_share(settings))
        self.handling = Handling()
        self.started = int(time.time())
        self.admin_page = None  # (body, headers), read at start-up by the admin section
        self.tasks = []
        self.tools_left_out = set()
        self.check_run = None  # the upstream check under way, which a second asker waits for

    def share(self, shared):
        """Puts the replicas' layer over the local state: each store and count on its shared backend, and the fleet."""
        self.shared = shared
        self.api.replay = SharedReplayCache(self.api.replay, shared)
        limits = self.keys.limits = SharedKeyLimits(shared, self.keys.limits)
        self.responses = SharedResponseStore(self.responses, shared)
        self.fleet = Fleet(shared, self.settings, [*self.site.pools.values(), self.api.pool], self.accounts,
                           self.edited_files(), self.monitor, self.save_lock)
        seal_key = [functools.partial(share_seal_key, shared, self.sealer, self.settings.compaction_key)
                    ] if self.settings.compaction_key_generated else []  # each replica seals under the first's key
        self.steps_before_serving = [shared.beat, self.fleet.sync, *seal_key]
        self.replica_steps = [*self.steps_before_serving, limits.renew_leases]

    def edited_files(self):
        """The files the admin page edits, by the name the fleet knows each by, with how each is loaded."""
        return {**{pool.name: (pool.file, pool.load) for pool in (*self.site.pools.values(), self.api.pool)},
                "api_keys": (self.keys.file, lambda content: self.keys.take(parse_api_keys_file(content)[0]))}

    def ready_upstreams(self):
        """The upstream kinds of UPSTREAM that could serve a request now, in order; else the first, which says why
        not."""
        return [kind for kind in self.upstreams if kind.pool.ready() is None] or self.upstreams[:1]

    def note_left_out_tools(self, kinds):
        """Logs, once per kind (up to TOOL_KINDS_NOTED kinds), the tools a client sent that the model cannot be told
        of (server tools): what clients send never grows a collection without bound."""
        for kind in {kind[:TOOL_KIND_CHARS] for kind in kinds} - self.tools_left_out:
            if len(self.tools_left_out) >= TOOL_KINDS_NOTED:
                return
            self.tools_left_out.add(kind)
            log.info("tools of type %s are left out of the prompt: the model cannot run them", loggable(kind))

    async def start(self):
        """Opens the upstream session and starts the background work."""
        await self.http.open()
        await self.site.pool.reload(announce=False)
        await self.api.pool.reload(announce=False)
        for place, kind in enumerate(self.upstreams, 1):
            log.info("upstream %d of %d: %s", place, len(self.upstreams), kind.describe())
        await self.keys.reload()
        for step in self.steps_before_serving:  # in step with the fleet (its heartbeat, its exchange, its seal key)
            await step()
        self.tasks = [asyncio.ensure_future(keep_polling(step)) for step in self.replica_steps]
        self.tasks += [asyncio.ensure_future(keep_polling(self.site.watch_tokens)),
                      asyncio.ensure_future(keep_polling(self.api.watch_keys)),
                      asyncio.ensure_future(keep_polling(self.accounts.run)),
                      asyncio.ensure_future(keep_polling(self.models.run, self.models.wake)),
                      asyncio.ensure_future(keep_polling(self.keys.watch))]

    async def stop(self):
        """Stops the background work first, so that nothing starts an upstream request once the session closes."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.http.stop()

    async def close(self):
        """Once the last requests have ended: their slots given back to Redis, and this replica off its list."""
        await self.keys.limits.close()
        if self.shared:
            await self.shared.leave()

    def finish(self, record, status):
        """A request's end: its share of the figures, its memory budget and its key's limits given back, and its
        log line; a request whose client left is logged as CLIENT_GONE_STATUS, whatever was sent."""
        status = CLIENT_GONE_STATUS if record.outcome is Outcome.CLIENT_GONE else status
        self.budget.release(record.reserved, budget_holder(record))
        record.reserved = 0
        if record.slot:
            self.keys.done(record.slot)
            record.slot = None
        record.duration = time.monotonic() - record.started
        self.monitor.end(record, status)
        first = f"{record.first_content * 1000:.0f}ms" if record.first_content is not None else "-"
        why = ", ".join(filter(None, (record.outcome and record.outcome.value, record.reason)))
        polled = record.method == "GET" and record.path.startswith(POLLED_PATHS) and status < 400
        log.log(logging.DEBUG if polled else logging.INFO, "%s %s model=%s stream=%s status=%s%s ttfb=%s total=%.0fms",
                record.method, loggable(record.logged_path), loggable(record.model or "-"),
                "-" if record.stream is None else str(record.stream).lower(), status, f" ({why})" if why else "",
                first, record.duration * 1000)


STATE = web.AppKey("state", AppState)


# ─── Request bodies ──────────────────────────────────────────────────────────
# A request's JSON body, read within MAX_REQUEST_MB and the memory budget, and
# parsed with limits on what parsing it may cost. Offers read_json (admin
# routes) and read_request (completions, whose model the log line names).

SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_EXPANSION = 12              # a body whose values would take more than this many times its size is refused
EXPANSION_FLOOR = MB            # smaller bodies are parsed whatever their shape
# What parsing takes at its peak, measured on CPython 3.11 to 3.13 (tests/test_limits.py holds the bound): for each
# value between commas (a number, a string, a list's slot), each object or list, each string and each key.
VALUE_BYTES, CONTAINER_BYTES, STRING_BYTES, ENTRY_BYTES = 110, 150, 60, 40
BACKSLASH = ord("\\")
STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+"', re.DOTALL)  # a JSON string after its opening quote
QUOTES_SCANNED = 20_000         # a body of more strings is counted as if its strings held structure too
THREAD_PARSE_BYTES = 256 * 1024  # larger bodies are measured and parsed off the event loop
FOUR_BYTE_UTF8 = re.compile(rb"[\xf0-\xf4]")        # the lead byte of a character beyond U+FFFF
TWO_BYTE_UTF8 = re.compile(rb"[\xc4-\xef]")          # of one beyond U+00FF
FOUR_BYTE_ESCAPE = re.compile(rb"\\u[dD][89abAB]")   # a surrogate pair's first half, escaped
TWO_BYTE_ESCAPE = re.compile(rb"\\u(?:0[1-9a-fA-F]|[1-9a-fA-F])")  # \u0100 and beyond
WIDENED_GROWTH, ESCAPED_GROWTH = 3, 1.5  # what building a string with escapes takes, in its own size: one an escape
                                         # makes wider than the text, any other


def widths(raw):
    """(bytes a character of the body's text takes once decoded, and of its widest string once parsed): CPython
    keeps a string at the width of its widest character, so one emoji makes a text of ASCII four times its size,
    and an escape (\\ud83d\\ude00) can widen a string of an ASCII body."""
    text = 1 if raw.isascii() else 4 if FOUR_BYTE_UTF8.search(raw) else 2 if TWO_BYTE_UTF8.search(raw) else 1
    if b"\\u" not in raw:
        return text, text
    return text, max(text, 4 if FOUR_BYTE_ESCAPE.search(raw) else 2 if TWO_BYTE_ESCAPE.search(raw) else 1)


def structure(raw):
    """(values, containers, strings, keys) of a body's JSON, counted from its commas, brackets, quotes and colons
    outside its strings in a large body (commas in a CSV pasted into a message are text); a small one, or one of
    more than QUOTES_SCANNED strings, is counted whole, which can only count more."""
    strings = (raw.count(b'"') - raw.count(b'\\"')) // 2
    if len(raw) <= THREAD_PARSE_BYTES or strings > QUOTES_SCANNED:
        return raw.count(b","), raw.count(b"{") + raw.count(b"["), strings, raw.count(b":")
    values = containers = strings = keys = start = 0
    while start < len(raw):
        opening = raw.find(b'"', start)
        end = len(raw) if opening < 0 else opening
        values += raw.count(b",", start, end)
        containers += raw.count(b"{", start, end) + raw.count(b"[", start, end)
        keys += raw.count(b":", start, end)
        if opening < 0:
            break
        start = string_end(raw, opening)
        strings += 1
    return values, containers, strings, keys


def string_end(raw, opening):
    """Where the JSON string opened at `opening` ends (past its closing quote), or the body's end."""
    closing = raw.find(b'"', opening + 1)
    if closing < 0:
        return len(raw)
    if raw[closing - 1] != BACKSLASH:
        return closing + 1
    rest = STRING_REST.match(raw, opening + 1)  # escapes: read by the regex engine, escaped quotes and all
    return rest.end() if rest else len(raw)


def parse_cost(raw):
    """What parsing a body takes besides the BODY_MEMORY_FACTOR counted for its bytes: its text beyond a byte a
    character, its strings at their width, and its values at their measured size; a 413 for a body built to expand
    (a list of millions of {}), whose values would take more than MAX_EXPANSION times its size."""
    text_width, string_width = widths(raw)
    values, containers, strings, keys = structure(raw)
    size = (VALUE_BYTES * values + CONTAINER_BYTES * containers + STRING_BYTES * strings + ENTRY_BYTES * keys)
    growth = WIDENED_GROWTH if string_width > text_width else ESCAPED_GROWTH if b"\\" in raw else 1
    cost = (text_width - 1) * len(raw) + int(string_width * growth * len(raw)) + size
    if len(raw) > EXPANSION_FLOOR and size > MAX_EXPANSION * len(raw):
        raise ApiError(413, f"The request body's JSON is made of so many small values that it would take over "
                            f"{MAX_EXPANSION} times its size once read; send fewer, larger values",
                       code="request_too_complex")
    return cost


def parse_body(raw):
    """A request body's JSON value; a 4xx for one not in UTF-8, not strict JSON (NaN and Infinity are not JSON),
    nested too deeply, or holding a lone surrogate."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid UTF-8", code="invalid_encoding") from None
    too_deep = ApiError(400, f"The request body's JSON nests more than {MAX_JSON_DEPTH} levels deep",
                        code="json_too_deep")
    try:
        value = JSON_DECODER.decode(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if may_nest_too_deeply(text) and json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    if SURROGATE_ESCAPE.search(text):  # rare, so the whole value is checked only then
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ApiError(400, "The request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not "
                                "text", code="invalid_encoding") from None
    return value


async def read_json(request):
    """The request body as JSON, read once MEMORY_BUDGET_MB has room for it, parsed off the event loop when large;
    a 4xx for anything that is not JSON in UTF-8."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, f"Compressed request bodies (Content-Encoding: {encoding[:40]}) are not accepted; "
                            "send the JSON uncompressed", code="unsupported_content_encoding")
    state = request.app[STATE]
    limit = int(state.settings.max_request_mb * MB)
    if (request.content_length or 0) > limit:
        raise body_too_large(state)
    await reserve(request, BODY_MEMORY_FACTOR * (request.content_length or limit))  # before any byte is read, so
    try:                                                                           # no upload waits holding a part
        raw = await asyncio.wait_for(read_body_within(request, limit, state), state.settings.body_timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"The request body did not arrive within BODY_TIMEOUT ({state.settings.body_timeout:g} "
                            "s); send it at once, or raise BODY_TIMEOUT", code="body_timeout") from None
    return await parsed_within(request, raw)


async def parsed_within(request, raw):
    """The JSON value of a body (or a WebSocket message) whose bytes are counted already, once the memory budget
    has room for what parsing it takes; parsed off the event loop when large."""
    state = request.app[STATE]
    cost = parse_cost(raw) if len(raw) <= THREAD_PARSE_BYTES else await asyncio.to_thread(parse_cost, raw)
    if request[RECORD].reserved + cost > state.budget.limit:
        raise ApiError(413, f"The request body would take about {(request[RECORD].reserved + cost) / MB:.0f} MB "
                            f"once read, more than MEMORY_BUDGET_MB ({state.settings.memory_budget_mb:g} MB) allows "
                            "(text with characters beyond U+FFFF takes four bytes a character, small values many "
                            "times their size); send a smaller body, or fewer, larger values",
                       code="request_too_complex")
    await reserve(request, cost, wait=False)
    return parse_body(raw) if len(raw) <= THREAD_PARSE_BYTES else await asyncio.to_thread(parse_body, raw)


async def read_body_within(request, limit, state):
    """The body, refused once it passes `limit`, gathered in one buffer. Read from the stream rather than by
    request.read(), which keeps a copy on the request: aiohttp holds a connection's last request while the
    connection idles."""
    body = bytearray()
    async for chunk in request.content.iter_any():
        if len(body) + len(chunk) > limit:
            raise body_too_large(state)
        body += chunk
    return body


def body_too_large(state):
    return ApiError(413, f"The request body is larger than MAX_REQUEST_MB ({state.settings.max_request_mb:g} MB)",
                    code="request_too_large")


MODEL_NAME_CHARS = 100  # of a model id in a log line


async def reserve(request, amount, wait=True):
    """Takes `amount` bytes of MEMORY_BUDGET_MB for the request until it ends, within its key's share (a 503 when
    none frees in time)."""
    record = request[RECORD]
    await request.app[STATE].budget.admit(amount, budget_holder(record), wait)
    record.reserved += amount


async def read_request(request):
    """A completion request's body, its model noted for the log line even when the request is then refused."""
    body = await read_json(request)
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        request[RECORD].model = body["model"][:MODEL_NAME_CHARS]
    return body


# ─── Core ────────────────────────────────────────────────────────────────────
# The one request path every dialect takes: a front door's Asked (the core
# request, and how its answer is written) runs through an upstream kind, whose
# events go to a writer: an EventStream for a stream, a Collector for one JSON
# body. Offers the dialects Dialect, Asked and completion_handler.

class ClientGone(Exception):
    """The client closed its connection; nothing is to be sent, and no token is to blame."""


class Renderer(typing.Protocol):
    """A dialect's stream: the bytes of its opening, of the events of one upstream read, and of a heartbeat."""

    def opening(self) -> bytes: ...

    def render(self, events: list[Event]) -> bytes: ...

    def heartbeat(self) -> bytes: ...


class Writer(typing.Protocol):
    """Where a completion's events go: a stream to the client, or a whole answer gathered for it."""
    response: web.StreamResponse | None

    @property
    def committed(self) -> bool: ...  # the client has seen something: no other attempt may take over

    def reset(self) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    async def write(self, events: list[Event]) -> None: ...

    async def close(self, events: list[Event]) -> web.StreamResponse | None: ...


class EventStream:
    """Writes a completion's events as server-sent events through a dialect's renderer. The response opens with
    the first bytes sent, so a failure before any is still a real HTTP error; silence gets heartbeats. A write
    waits while the client's buffers are full (so upstream is read no faster than the client reads), and a client
    that leaves it waiting STALL_TIMEOUT seconds is cut."""

    def __init__(self, request, renderer, keepalive_seconds, stall_timeout, settle=None):
        self.request = request
        self.renderer = renderer
        self.settle = settle
        self.response = None
        self._open_lock = asyncio.Lock()
        self._keepalive_every = keepalive_seconds
        self._stall_timeout = stall_timeout
        self._last_write = time.monotonic()
        self._waiting_since: float | None = None  # when the write under way began, while the client has not taken it
        self._heartbeat = None

    @property
    def committed(self):
        """Whether the client has seen anything: then no other credential may take over."""
        return self.response is not None

    def reset(self):
        """A failed attempt's events are void; none was sent (else the stream would be committed)."""

    def start(self):
        self._heartbeat = asyncio.ensure_future(self._beat())

    def stop(self):
        if self._heartbeat:
            self._heartbeat.cancel()

    async def write(self, events):
        await self._send(lambda: self.renderer.render(events))

    async def close(self, events):
        """Writes the last events (a Finish or a Failed) and ends the stream; raises a failure that comes
        before anything was sent, as an HTTP error."""
        self.stop()
        if isinstance(events[-1], Failed) and self.response is None:
            raise events[-1].error
        await self._send(lambda: self.renderer.render(events), last=True)
        return self.response

    async def _send(self, render, last=False):
        """Writes what `render` gives, rendered only now: after the response and its opening, so that the
        renderer's events go out in the order it numbered them."""
        opening = b""
        if self.response is None:
            async with self._open_lock:
                if self.response is None:
                    response = web.StreamResponse(headers={
                        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                        "X-Accel-Buffering": "no"})
                    await response.prepare(self.request)
                    self.response = response
                    opening = self.renderer.opening()
        data = opening + render()
        if last and self.settle:
            settle, self.settle = self.settle, None  # once: when it fails, the stream ends with a Failed instead
            try:
                await settle()
            except Exception:
                if opening:
                    await self.response.write(opening)
                raise
        self._last_write = self._waiting_since = time.monotonic()
        try:
            await (self.response.write_eof(data) if last else self.response.write(data))
        except (ConnectionError, RuntimeError):
            raise ClientGone() from None
        finally:
            self._waiting_since = None

    async def _beat(self):
        """Sends the dialect's heartbeat after each KEEPALIVE_SECONDS of silence, so proxies keep the stream, and
        cuts the stream of a client that has left a write waiting STALL_TIMEOUT seconds."""
        try:
            while True:
                now = time.monotonic()
                if self._waiting_since is not None:  # no heartbeat behind data the client has not read
                    stalled = now - self._waiting_since
                    if stalled >= self._stall_timeout:
                        return self._cut()
                    await asyncio.sleep(self._stall_timeout - stalled)
                elif now - self._last_write >= self._keepalive_every:
                    await self._send(self.renderer.heartbeat)
                else:
                    await asyncio.sleep(min(self._keepalive_every - (now - self._last_write), self._stall_timeout))
        except ClientGone:
            pass

    def _cut(self):
        """Ends the connection of a client that stopped reading: the waiting write fails, and the request ends."""
        self.request[RECORD].reason = "client_stalled"
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class Collector:
    """Gathers a completion's events into an Answer, which the dialect's `render` turns into the JSON body; an
    answer beyond MAX_ANSWER_MB is a failure, not a response of any size."""

    committed = False  # the client sees nothing until the end

    def __init__(self, render, limit, settle=None):
        self.render = render
        self.limit = limit
        self.settle = settle
        self.response = None
        self.reset()

    def reset(self):
        """Starts over: a failed attempt's events are forgotten."""
        self.size = 0
        self.reasoning, self.text = [], []  # pieces, joined once at the end (+= on a str would copy it each time)
        self.calls: list[CallInParts] = []
        self.finish = None

    def start(self):
        pass

    def stop(self):
        pass

    async def write(self, events):
        added = sum(len(event.text) for event in events if isinstance(event, (Reasoning, Text, ToolArguments)))
        self.size += added
        if added and self.size > self.limit:
            raise answer_too_large(self.limit)
        for event in events:
            match event:
                case Reasoning(text):
                    self.reasoning.append(text)
                case Text(text):
                    self.text.append(text)
                case ToolCallStart(index, id_, name):
                    self.calls.append(CallInParts(index, id_, name))
                case ToolArguments(index, text):
                    self.calls[index].pieces.append(text)
                case Finish():
                    self.finish = event
                case Failed(error):
                    raise error
                case _:
                    raise unknown_event(event)

    async def close(self, events):
        await self.write(events)
        answer = Answer("".join(self.reasoning), "".join(self.text), [call.whole() for call in self.calls],
                        self.finish)
        body = self.render(answer)
        if self.settle:
            await self.settle()
        self.response = web.json_response(body, dumps=json_text)
        return self.response


@dataclass(frozen=True)
class Asked:
    """What a front door made of a completion request: the core request, and how its answer is written."""
    core: CoreRequest
    stream_writer: typing.Callable[[], "Renderer"]    # a renderer of the core's events as the dialect's stream
    answer_body: typing.Callable[[Answer], dict]      # the dialect's JSON body of a whole response
    settle: typing.Callable[[], typing.Awaitable[None]] | None = None  # done before the client sees the end
    answered: typing.Callable[[web.Request], typing.Awaitable[web.StreamResponse]] | None = None  # made without
    # the model by the front door (a tool that cannot run here), instead of the core's answer


@dataclass(frozen=True)
class Dialect:
    """A client API: its name in logs, how it shapes an error, and how it reads a completion request."""
    name: str
    error_response: typing.Callable[[ApiError], web.Response]
    parse: typing.Callable[[dict, web.Request], typing.Awaitable[Asked]] | None = None


async def within_deadline(work, seconds):
    """Awaits `work`; past `seconds` it is cancelled and ends as an upstream timeout."""
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:
        raise UpstreamError(TIMED_OUT, f"the answer took longer than COMPLETION_TIMEOUT ({seconds:g} s)") from None


async def pull(events, writer, record):
    """Writes what an upstream kind yields, attempt by attempt, and ends with its Finish, once the upstream side is
    closed (the client sees the end of a request that is over); a Restart voids what the writer holds, unless the
    client has seen some of it."""
    last = None
    async with contextlib.aclosing(events):
        async for item in events:
            if isinstance(item, Attempt):
                record.attempts, record.token_index = item.number, item.credential
            elif isinstance(item, Restart):
                if writer.committed:
                    raise item.error
                writer.reset()
            elif isinstance(item[-1], Finish):
                record.usage, last = item[-1].usage, item
                break
            else:
                if record.first_content is None:
                    record.first_content = time.monotonic() - record.started
                await writer.write(item)
    if last is None:
        raise UpstreamError(NOT_AN_ANSWER, "upstream's answer ended without a finish")
    return await writer.close(last)


def in_conversation(request, core):
    """The core request with who asks (a digest of their API key) and the client's own name for the conversation
    (prompt_cache_key, else a session header), which an upstream kind may key its session by."""
    hint = core.session_hint or next(filter(None, map(request.headers.get, SESSION_HINT_HEADERS)), None)
    return replace(core, client=request[RECORD].client, session_hint=hint)


def hands_over(error):
    """Whether another upstream kind may serve what this one gave up on: its credentials all failed, rest or are
    spent, or it could not be reached; not a request it refused, which any kind would refuse."""
    if isinstance(error, UpstreamError):
        return error.failure.fail_over or error.failure in (UNREACHABLE, RATE_LIMITED, BUDGET_SPENT)
    return error.status in (429, 503)


async def through_upstreams(state, core):
    """The events of the first upstream kind that can serve; when it gives up and a later kind of UPSTREAM can
    serve now, that one takes over, as a Restart the core sees."""
    kinds = state.ready_upstreams()
    for place, kind in enumerate(kinds):
        try:
            async with contextlib.aclosing(kind.complete(core)) as events:
                async for item in events:
                    yield item
            return
        except (UpstreamError, ApiError) as error:
            if not (hands_over(error) and any(later.pool.ready() is None for later in kinds[place + 1:])):
                raise
            log.info("upstream %s gave up (%s); %s takes over", kind.name, error, kinds[place + 1].name)
            yield Restart(error)


async def serve_completion(request, asked, writer: Writer | None = None):
    """Runs the request's core through the upstream kind that can serve it into its writer (an SSE stream or a
    JSON body, unless one is given), and answers."""
    state, record = request.app[STATE], request[RECORD]
    core = in_conversation(request, asked.core)
    record.stream = core.stream  # its model is noted already, by read_request
    settings = state.settings
    writer = writer or (EventStream(request, asked.stream_writer(), settings.keepalive_seconds,
                                    settings.stall_timeout, asked.settle)
                        if core.stream else Collector(asked.answer_body, int(settings.max_answer_mb * MB),
                                                      asked.settle))
    writer.start()
    try:
        try:
            events = through_upstreams(state, core)
            return await within_deadline(pull(events, writer, record), settings.completion_timeout)
        except ClientGone:
            raise
        except Exception as failure:  # whatever went wrong, a started stream ends with an error event and its end
            if isinstance(failure, UpstreamError):
                error = failure.api_error()
            elif isinstance(failure, ApiError):
                error = failure
            else:
                log.exception("internal error in a completion of %s", loggable(request.path))
                error = ApiError(500, "Internal error; see the proxy's log", code="internal_error")
            record.upstream_failed, record.reason = True, error.code
            response = await writer.close([Failed(error)])
            record.outcome = Outcome.ENDED_WITH_ERROR
            return response
    except ClientGone:
        record.outcome = Outcome.CLIENT_GONE
        return writer.response or web.Response(status=CLIENT_GONE_STATUS)  # the latter for nobody: it left first
    finally:
        writer.stop()


async def answer_asked(request, asked, writer: Writer | None = None):
    """The answer to what a front door made of a request: its own (a tool that cannot run here), else the core's,
    for a prompt that fits K2's context, into `writer` when one is given."""
    if asked.answered:
        request[RECORD].stream = asked.core.stream
        return await asked.answered(request)
    tokens = asked.core.prompt_tokens
    expect(tokens <= CONTEXT_TOKENS, f"prompt is too long: about {tokens} tokens > {CONTEXT_TOKENS} maximum "
           "(K2 Horizon's context); shorten the conversation", "messages", "context_length_exceeded")
    return await serve_completion(request, asked, writer)


def completion_handler(dialect):
    """The handler of a dialect's completion route: its request, read and parsed, through the core."""
    async def complete(request):
        return await answer_asked(request, await dialect.parse(await read_request(request), request))
    return complete


# ─── Dialect: OpenAI chat completions ────────────────────────────────────────
# POST /v1/chat/completions and GET /v1/models: OpenAI's request becomes a
# CoreRequest; core events become chat.completion.chunk events or one
# chat.completion; errors are {"error": {message, type, param, code}}.

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
                      500: "server_error", 502: "upstream_error", 503: "service_unavailable", 504: "timeout_error"}
REQUEST_EFFORTS = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                   "xhigh": "high"}  # OpenAI's → K2's


def openai_error_body(error):
    kind = OPENAI_ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "server_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def openai_error_response(error):
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return web.json_response(openai_error_body(error), status=error.status, headers=headers)


def chat_part(part, where, limit):
    """One part of an OpenAI message's content, as an upstream part."""
    expect(isinstance(part, dict) and isinstance(part.get("type"), str), f"{where} must be an object with a 'type'",
           where, "invalid_type")
    kind = part["type"]
    if kind == "text":
        expect(isinstance(part.get("text"), str), f"{where}.text must be a string", where, "invalid_type")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        expect(isinstance(url, str) and url, f"{where}.image_url.url is missing", where, "invalid_type")
        return image_part(url, where, limit)
    if kind == "file":
        return chat_file(part.get("file"), where, limit)
    raise ApiError(400, f"{where} has type '{kind}', which is not supported (text, image_url, file)", param=where,
                   code="unsupported_content")


def chat_file(file, where, limit):
    """An OpenAI file part: a text file sent as file_data, inlined; a file id cannot be fetched."""
    expect(isinstance(file, dict), f"{where}.file must be an object with filename and file_data", where,
           "invalid_type")
    name = file.get("filename") if isinstance(file.get("filename"), str) and file.get("filename") else "file"
    data = file.get("file_data")
    if data is None and file.get("file_id"):
        raise ApiError(400, f"{where}: uploaded file ids cannot be fetched through this proxy; send the file "
                            "itself as file_data", param=where, code="unsupported_file")
    expect(isinstance(data, str) and data, f"{where}.file.file_data is missing", where, "invalid_type")
    return text_file(name, *decode_data(data, where, limit.bytes), where)


def chat_content(content, index, limit):
    """A message's content as a list of upstream parts."""
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content or ""}]
    expect(isinstance(content, list), f"messages[{index}].content must be a string or a list of parts",
           f"messages[{index}].content", "invalid_type")
    return [chat_part(part, f"messages[{index}].content[{number}]", limit) for number, part in enumerate(content)]


def chat_calls(calls, index):
    """An assistant message's tool_calls as (id, name, arguments) triples."""
    where = f"messages[{index}].tool_calls"
    expect(isinstance(calls, list) and all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                           and isinstance(c.get("id", ""), str)
                                           and isinstance(c["function"].get("name", ""), str) for c in calls),
           f"{where} must be a list of tool calls with string ids and names", where, "invalid_type")
    return [(call.get("id", ""), call["function"].get("name", ""),
             check_arguments(call["function"].get("arguments", {}), f"{where}[{number}].function.arguments"))
            for number, call in enumerate(calls)]


def chat_transcript(messages, limit):
    """OpenAI messages as upstream takes them: developer is system, tool history is text."""
    expect(isinstance(messages, list) and messages, "'messages' must be a non-empty list", "messages",
           "invalid_type" if not isinstance(messages, list) else "invalid_value")
    transcript = Transcript()
    for index, message in enumerate(messages):
        expect(isinstance(message, dict), f"messages[{index}] must be an object", f"messages[{index}]",
               "invalid_type")
        role = message.get("role")
        expect(role in CHAT_ROLES, f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}",
               f"messages[{index}].role")
        parts = chat_content(message.get("content"), index, limit)
        if role == "assistant":
            image = next((number for number, part in enumerate(parts) if part["type"] != "text"), None)
            where = f"messages[{index}].content[{image}]"
            expect(image is None, f"{where}: assistant messages hold text only, as on OpenAI; send images in user "
                   "messages", where, "unsupported_content")
            transcript.assistant(text_of(parts), chat_calls(message["tool_calls"], index)
                                 if message.get("tool_calls") else (), chat_reasoning(message, index))
        elif role in ("tool", "function"):
            call_id = message.get("tool_call_id", "")
            expect(isinstance(call_id, str), f"messages[{index}].tool_call_id must be a string",
                   f"messages[{index}].tool_call_id", "invalid_type")
            name = message.get("name")
            transcript.tool_result(call_id, parts, name if isinstance(name, str) else None)
        else:
            transcript.add("user" if role == "user" else "system", parts)
    return transcript


def chat_tools(body, enabled):
    """The request's tools and tool_choice as a ToolPlan (None: no tool text is to be sent or parsed)."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if tools is None:
        return None
    expect(isinstance(tools, list), "'tools' must be a list", "tools", "invalid_type")
    checked = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        expect(isinstance(tool, dict) and tool.get("type", "function") == "function"
               and isinstance(tool.get("function"), dict),
               f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", where, "invalid_type")
        function = tool["function"]
        checked.append(check_tool(function.get("name"), function.get("description"), function.get("parameters"),
                                  f"{where}.function"))
    if isinstance(choice, dict):
        named = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        expect(isinstance(named, str), "tool_choice must name a function: {\"type\": \"function\", \"function\": "
               "{\"name\": ...}}", "tool_choice")
        choice = named
    else:
        expect(choice in ("auto", "none", "required"),
               "'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", ...}", "tool_choice")
    return tool_plan(checked, choice, enabled)


def chat_reasoning(message, index):
    """The reasoning an assistant message carries back (reasoning_content, or its mirror reasoning), or None."""
    for name in ("reasoning_content", "reasoning"):
        value = message.get(name)
        if value is not None:
            expect(isinstance(value, str), f"messages[{index}].{name} must be a string", f"messages[{index}].{name}",
                   "invalid_type")
            return value
    return None


def chat_params(body):
    """The sampling options upstream understands, checked."""
    stop = body.get("stop")
    expect(stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)),
           "'stop' must be a string or a list of strings", "stop", "invalid_type")
    return sampling(number_field(body, "temperature", 0, 2), number_field(body, "top_p", 0, 1),
                    integer_field(body, "max_completion_tokens", 1) or integer_field(body, "max_tokens", 1),
                    [stop] if isinstance(stop, str) else stop, integer_field(body, "seed", -2 ** 63))


def session_hint(body):
    """The client's own key for a conversation, prompt_cache_key, which routes its turns alike."""
    hint = body.get("prompt_cache_key")
    expect(hint is None or isinstance(hint, str), "'prompt_cache_key' must be a string", "prompt_cache_key",
           "invalid_type")
    return hint or None


def chat_answer_format(response_format):
    """The AnswerFormat of OpenAI's response_format: json_object, or json_schema with its schema; None for text."""
    kind = one_of_field(response_format, "type", ("text", "json_object", "json_schema"), "text",
                        "response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return AnswerFormat()
    spec = object_field(response_format, "json_schema", "response_format.json_schema")
    return json_schema_format(spec, "response_format.json_schema")


def json_schema_format(spec, where):
    """The AnswerFormat of a json_schema format's name, schema and strict (`where` names them for a 400)."""
    schema = object_field(spec, "schema", f"{where}.schema")
    name = spec.get("name", "answer")
    expect(isinstance(name, str) and name, f"'{where}.name' must be a non-empty string", f"{where}.name",
           "invalid_type")
    strict = spec.get("strict")
    expect(strict is None or isinstance(strict, bool), f"'{where}.strict' must be true or false", f"{where}.strict",
           "invalid_type")
    return AnswerFormat(schema or None, name, strict)


def parse_chat_request(body, settings, models):
    """Checks an OpenAI chat request and translates it; every problem is a 400 naming the field. Returns the
    CoreRequest and whether the client asked for a usage chunk."""
    model = requested_model(body)
    upstream_model, show_reasoning = models.resolve(model)
    stream = body.get("stream", False)
    expect(stream is None or isinstance(stream, bool), "'stream' must be true or false", "stream", "invalid_type")
    n = integer_field(body, "n", 1)
    expect(n in (None, 1), "Only n=1 is supported", "n")
    options = object_field(body, "stream_options")
    for name in ("logprobs", "top_logprobs"):
        if body.get(name) not in (None, False):
            raise no_probabilities(settings, name)
    effort = REQUEST_EFFORTS[one_of_field(body, "reasoning_effort", tuple(REQUEST_EFFORTS),
                                          default_effort(settings, show_reasoning))]
    tools = chat_tools(body, settings.tool_support)
    answer_format = chat_answer_format(object_field(body, "response_format"))
    turns = chat_transcript(body.get("messages"), FileLimit.of(settings)).finish()
    core = CoreRequest(model, upstream_model, turns, chat_params(body), effort, bool(stream), show_reasoning,
                       tools, answer_format, session_hint(body))
    return core, bool(options.get("include_usage"))


def openai_usage(usage):
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}}


class ChatChunks:
    """Core events as OpenAI chat.completion.chunk events: reasoning as reasoning_content (never in the same
    delta as content, since many clients read one field per delta), or inline <think> tags."""

    def __init__(self, core, think_tags, include_usage):
        self.core = core
        self.think_tags = think_tags
        self.include_usage = include_usage
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        head = json.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": core.model}, ensure_ascii=False)
        self._chunk_head = b"data: " + head[:-1].encode() + b',"choices":[{"index":0,"delta":'
        self._role_sent = False
        self._in_think = False

    def opening(self):
        return b""

    def heartbeat(self):
        return b": keep-alive\n\n"

    def render(self, events):
        deltas: list[dict] = []
        content, tail = "", b""
        for event in events:
            match event:
                case Reasoning(text) if self.think_tags:
                    content += text if self._in_think else "<think>" + text
                    self._in_think = True
                case Reasoning(text):
                    deltas.append({"reasoning_content": text})
                case Text(text):
                    content += self._think_closed("</think>\n\n") + text
                case ToolCallStart(index, id_, name):
                    content += self._think_closed("</think>\n\n")
                    deltas += [{"content": content}] if content else []
                    content = ""
                    deltas.append({"tool_calls": [{"index": index, "id": "call_" + id_, "type": "function",
                                                   "function": {"name": name, "arguments": ""}}]})
                case ToolArguments(index, text):
                    deltas.append({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
                case Finish():
                    content += self._think_closed("</think>")
                    tail = self._ending(event)
                case Failed(error):
                    tail = b"data: " + json.dumps(openai_error_body(error)).encode() + b"\n\n" + DONE_LINE
                case _:
                    raise unknown_event(event)
        if content:
            deltas.append({"content": content})
        return b"".join(map(self._chunk, deltas)) + tail

    def _think_closed(self, closing):
        """The closing of an open <think> tag, once."""
        if not self._in_think:
            return ""
        self._in_think = False
        return closing

    def _ending(self, finish):
        data = self._chunk({}, finish.reason)
        if self.include_usage:
            usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.core.model, "choices": [], "usage": openai_usage(finish.usage)}
            data += b"data: " + json.dumps(usage).encode() + b"\n\n"
        return data + DONE_LINE

    def _chunk(self, delta, finish_reason=None):
        if not self._role_sent:
            self._role_sent = True
            delta = {"role": "assistant", **delta}
        finish = b"null" if finish_reason is None else b'"%s"' % finish_reason.encode()
        return (self._chunk_head + json.dumps(delta, ensure_ascii=False).encode()
                + b',"finish_reason":' + finish + b"}]}\n\n")


def chat_completion(core, answer, think_tags):
    """One chat.completion for a whole Answer."""
    content = answer.text
    if answer.reasoning and think_tags:
        content = f"<think>{answer.reasoning}</think>" + (f"\n\n{content}" if content or answer.calls else "")
    message = {"role": "assistant", "content": (content.strip() or None) if answer.calls else content}
    if answer.calls:
        message["tool_calls"] = [{"id": "call_" + call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}}
                                 for call in answer.calls]
    if answer.reasoning and not think_tags:
        message["reasoning_content"] = answer.reasoning
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": core.model, "choices": [{"index": 0, "message": message, "finish_reason": answer.finish.reason}],
            "usage": openai_usage(answer.finish.usage)}


async def chat_asked(body, request):
    state = request.app[STATE]
    core, include_usage = parse_chat_request(body, state.settings, state.models)
    core = await read_documents(core, state.settings, state.budget)
    think_tags = state.settings.thinking_format == "think_tags"
    return Asked(core, lambda: ChatChunks(core, think_tags, include_usage),
                 lambda answer: chat_completion(core, answer, think_tags))


OPENAI = Dialect("openai", openai_error_response, chat_asked)


def model_card(model_id, created):
    return {"id": model_id, "object": "model", "created": created, "owned_by": "MBZUAI-IFM",
            "context_length": CONTEXT_TOKENS}


def anthropic_model_card(model_id, models, created):
    """A model as Anthropic's Models API lists it, for Claude Code's gateway model discovery: named after the
    model it serves (K2 Horizon 375B A23B), with (no thinking) for a -nothink id."""
    served, thinks = models.resolve(model_id)
    name = served.rsplit("/", 1)[-1].replace("-", " ") + ("" if thinks else " (no thinking)")
    return {"type": "model", "id": model_id, "display_name": name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))}


def anthropic_page(cards, query):
    """One page of Anthropic's model list: limit (1 to 1000, 20 when not given), after_id or before_id."""
    limit = query.get("limit", str(ANTHROPIC_PAGE))
    expect(limit.isdigit() and 1 <= int(limit) <= ANTHROPIC_PAGE_MAX, f"'limit' must be an integer from 1 to "
           f"{ANTHROPIC_PAGE_MAX}", "limit")
    ids = [card["id"] for card in cards]
    after, before = query.get("after_id"), query.get("before_id")
    for name, value in (("after_id", after), ("before_id", before)):
        expect(value is None or value in ids, f"'{name}' names no model of the list", name)
    start = ids.index(after) + 1 if after else 0
    end = ids.index(before) if before else len(ids)
    if before and not after:
        start = max(start, end - int(limit))
    page = cards[start:end][:int(limit)]
    more = (start > 0) if before and not after else start + len(page) < end
    return {"data": page, "has_more": more, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


ANTHROPIC_PAGE, ANTHROPIC_PAGE_MAX = 20, 1000  # Anthropic's default and largest page of models


def asks_as_anthropic(request):
    """Whether a model route was called by an Anthropic client (it sends anthropic-version)."""
    return "anthropic-version" in request.headers


async def list_models(request):
    """The models, in OpenAI's shape, or in Anthropic's to an Anthropic client."""
    state = request.app[STATE]
    if asks_as_anthropic(request):
        cards = [anthropic_model_card(m, state.models, state.started) for m in state.models.listed()]
        return web.json_response(anthropic_page(cards, request.query))
    return web.json_response({"object": "list",
                              "data": [model_card(m, state.started) for m in state.models.listed()]})


async def get_model(request):
    state = request.app[STATE]
    model_id = request.match_info["model"]
    state.models.resolve(model_id)
    if asks_as_anthropic(request):
        return web.json_response(anthropic_model_card(model_id, state.models, state.started))
    return web.json_response(model_card(model_id, state.started))


# ─── Dialect: Anthropic Messages ─────────────────────────────────────────────
# POST /v1/messages and /v1/messages/count_tokens, for Claude Code and the
# Anthropic SDKs: a Messages request becomes a CoreRequest; core events become
# message_start … message_stop (signed thinking blocks, ping as the heartbeat)
# or one message; errors are {"type": "error", "error": {type, message}}.

ANTHROPIC_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                         504: "timeout_error"}
OVERLOADED = 529  # Anthropic's "try again soon", which Claude Code retries: what the proxy's 503s become
ANTHROPIC_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                          "content_filter": "refusal"}
ANTHROPIC_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}  # → K2's
SERVER_TOOLS = {  # Anthropic's server tools, which cannot run here: name → (its result block, the error in it)
    "web_search": ("web_search_tool_result", "web_search_tool_result_error"),
    "web_fetch": ("web_fetch_tool_result", "web_fetch_tool_result_error"),
    "code_execution": ("code_execution_tool_result", "code_execution_tool_result_error"),
    "advisor": ("advisor_tool_result", "advisor_tool_result_error"),
}
URL = re.compile(r"https?://\S+")
THINKING_BUDGET_EFFORTS = ((4000, "low"), (16000, "medium"))  # a budget under the bound thinks this hard; else high
BILLING_HEADER = "x-anthropic-billing-header:"  # Claude Code's bookkeeping, sent as a system block; not for the model


def anthropic_error_body(error):
    kind = ANTHROPIC_ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def anthropic_error_response(error):
    headers = {"retry-after": str(error.retry_after)} if error.retry_after else None
    return web.json_response(anthropic_error_body(error), status=OVERLOADED if error.status == 503 else error.status,
                             headers=headers)


def content_blocks(content, where):
    """A message's content as a list of blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    expect(isinstance(content, list) and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in content),
           f"{where} must be a string or a list of blocks with a 'type'", where, "invalid_type")
    return content


def block_text(block, where):
    expect(isinstance(block.get("text"), str), f"{where}.text must be a string", f"{where}.text", "invalid_type")
    return block["text"]


def block_source(block, where, kinds):
    """A block's source and its type, which must be one of `kinds`."""
    source = block.get("source")
    expect(isinstance(source, dict) and source.get("type") in kinds,
           f"{where}.source must be an object whose type is one of {', '.join(kinds)}", f"{where}.source")
    return source, source["type"]


def source_field(source, name, where):
    expect(isinstance(source.get(name), str) and source[name], f"{where}.source.{name} must be a non-empty string",
           f"{where}.source.{name}", "invalid_type")
    return source[name]


def anthropic_image(block, where, limit):
    source, kind = block_source(block, where, ("base64", "url"))
    if kind == "url":
        return image_part(source_field(source, "url", where), where, limit)
    media, data = source_field(source, "media_type", where), source_field(source, "data", where)
    return image_part(f"data:{media};base64,{data}", where, limit)


def anthropic_document(block, where, limit):
    """A document: text sources inlined like text files; a PDF or other binary source is a 400 naming it."""
    source, kind = block_source(block, where, ("text", "base64", "content"))
    name = block.get("title") if isinstance(block.get("title"), str) and block.get("title") else "document"
    if kind == "content":
        blocks = content_blocks(source.get("content"), f"{where}.source.content")
        text = "\n".join(block_text(b, f"{where}.source.content[{n}]") for n, b in enumerate(blocks))
        return text_file(name, "text/plain", text.encode(), where)
    media = source.get("media_type") if isinstance(source.get("media_type"), str) else "text/plain"
    data = source_field(source, "data", where)
    raw = data.encode() if kind == "text" else decode_base64(data, where, limit.bytes)
    return text_file(name, media, raw, where)


def anthropic_part(block, where, limit):
    """A text, image or document block as an upstream part."""
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": block_text(block, where)}
    if kind == "image":
        return anthropic_image(block, where, limit)
    if kind == "document":
        return anthropic_document(block, where, limit)
    raise ApiError(400, f"{where} has type '{kind}', which is not supported here (text, image, document, tool_use, "
                        "tool_result, thinking)", param=where, code="unsupported_content")


def anthropic_result(transcript, block, where, limit):
    """A tool_result block: its text and images, and whether the tool failed."""
    call_id = block.get("tool_use_id")
    expect(isinstance(call_id, str), f"{where}.tool_use_id must be a string", f"{where}.tool_use_id", "invalid_type")
    blocks = content_blocks(block.get("content", ""), f"{where}.content")
    parts = [anthropic_part(b, f"{where}.content[{n}]", limit) for n, b in enumerate(blocks)]
    transcript.tool_result(call_id, parts, failed=block.get("is_error") is True)


def anthropic_user(transcript, blocks, where, limit):
    """A user turn: each tool result on its own, then the rest (text, images, documents) as one message."""
    parts = []
    for number, block in enumerate(blocks):
        place = f"{where}[{number}]"
        if block["type"] == "tool_result":
            anthropic_result(transcript, block, place, limit)
        elif block["type"] not in ("thinking", "redacted_thinking"):
            parts.append(anthropic_part(block, place, limit))
    if parts:
        transcript.add("user", parts)


def anthropic_assistant(transcript, blocks, where):
    """An assistant turn: its text, tool_use blocks and the reasoning of its thinking blocks."""
    texts, calls, thoughts = [], [], []
    for number, block in enumerate(blocks):
        place, kind = f"{where}[{number}]", block["type"]
        if kind == "text":
            texts.append(block_text(block, place))
        elif kind == "tool_use":
            expect(isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
                   and isinstance(block.get("input", {}), dict), f"{place}: a tool_use block needs a string id "
                   "and name and an object input", place, "invalid_type")
            calls.append((block["id"], block["name"], block.get("input", {})))
        elif kind == "thinking":
            expect(isinstance(block.get("thinking"), str), f"{place}.thinking must be a string", f"{place}.thinking",
                   "invalid_type")
            thoughts.append(block["thinking"])
        else:  # what the model cannot read again: redacted thinking, a server tool's use and its result
            expect(kind in ("redacted_thinking", "server_tool_use") or kind.endswith("_tool_result"),
                   f"{place} has type '{kind}'; assistant turns hold text, tool_use and thinking blocks", place,
                   "unsupported_content")
    transcript.assistant("\n".join(texts), calls, "".join(thoughts) if any(thoughts) else None)


def anthropic_system(system):
    """The system prompt, a string or text blocks (cache_control and Claude Code's billing header left out)."""
    if system is None or isinstance(system, str):
        return system
    blocks = content_blocks(system, "system")
    texts = [block_text(block, f"system[{n}]") for n, block in enumerate(blocks)]
    return "\n".join(text for text in texts if not text.startswith(BILLING_HEADER))


def anthropic_transcript(body, limit):
    """(the conversation's Transcript, the effort its last directive asks for or None): a system message in
    `messages` joins it in its place; one with no text but an output_config (a directive) only sets the effort."""
    transcript, effort = Transcript(), None
    system = anthropic_system(body.get("system"))
    if system:
        transcript.add("system", system)
    messages = body.get("messages")
    expect(isinstance(messages, list) and messages, "'messages' must be a non-empty list", "messages", "invalid_type")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        expect(isinstance(message, dict) and message.get("role") in ("user", "assistant", "system"),
               f"{where} must be an object whose role is user, assistant or system", f"{where}.role")
        blocks = content_blocks(message.get("content", ""), f"{where}.content")
        if message["role"] == "assistant":
            anthropic_assistant(transcript, blocks, f"{where}.content")
        elif message["role"] == "user":
            anthropic_user(transcript, blocks, f"{where}.content", limit)
        else:  # Claude Code's mid-conversation system messages, and its directives
            effort = anthropic_effort(message, f"{where}.output_config") or effort
            text = "\n".join(block_text(b, f"{where}.content[{n}]") for n, b in enumerate(blocks))
            if text.strip():
                transcript.add("system", text)
    return transcript, effort


def anthropic_effort(holder, where="output_config"):
    """K2's effort for the output_config.effort of a request or a directive, or None when it names none."""
    asked = one_of_field(object_field(holder, "output_config", where), "effort", tuple(ANTHROPIC_EFFORTS), None,
                         f"{where}.effort")
    return ANTHROPIC_EFFORTS[asked] if asked else None


def anthropic_format(body):
    """The AnswerFormat of output_config.format (or the older top-level output_format): a json_schema's schema."""
    given = object_field(object_field(body, "output_config"), "format", "output_config.format")
    where = "output_config.format"
    if not given and "output_format" in body:
        given, where = object_field(body, "output_format"), "output_format"
    if not given:
        return None
    expect(given.get("type") == "json_schema", f"'{where}.type' must be json_schema", f"{where}.type")
    return AnswerFormat(object_field(given, "schema", f"{where}.schema") or None)


def server_tool(tool):
    """The name of an Anthropic server tool (web_search_20250305 → web_search), or None for another tool."""
    kind = tool.get("type")
    name = kind.rsplit("_", 1)[0] if isinstance(kind, str) else None
    return name if name in SERVER_TOOLS else None


def anthropic_tools(body, enabled):
    """(ToolPlan or None, the types of tools left out, the server tools asked for): tools with a `type` other
    than custom are server tools (web search, which cannot run here) or Anthropic-defined ones the model cannot be
    told of; they are left out, never refused, and never offered to the model as functions."""
    tools, choice = body.get("tools"), object_field(body, "tool_choice")
    if tools is None:
        return None, [], []
    expect(isinstance(tools, list) and all(isinstance(t, dict) for t in tools), "'tools' must be a list of objects",
           "tools", "invalid_type")
    checked, left_out, server = [], [], []
    for index, tool in enumerate(tools):
        if tool.get("type", "custom") != "custom":
            left_out.append(str(tool.get("type")))
            if server_tool(tool):
                server.append(server_tool(tool))
            continue
        checked.append(check_tool(tool.get("name"), tool.get("description"), tool.get("input_schema"),
                                  f"tools[{index}]", "input_schema"))
    kind = one_of_field(choice, "type", ("auto", "any", "tool", "none"), "auto", "tool_choice.type")
    if kind == "tool":
        expect(isinstance(choice.get("name"), str), "tool_choice.name must name a tool", "tool_choice.name")
        if choice["name"] in server and choice["name"] not in {tool.name for tool in checked}:
            return None, left_out, [choice["name"]]  # the server tool it must call, which cannot run here
    named = {"any": "required", "tool": choice.get("name")}.get(kind, kind)
    return tool_plan(checked, named, enabled, "tool_choice.name"), left_out, server


def anthropic_thinking(body):
    """(thinking on, its text shown, the effort it asks for or None) from `thinking` and `output_config`."""
    thinking = object_field(body, "thinking")
    kind = one_of_field(thinking, "type", ("enabled", "adaptive", "disabled"), "disabled", "thinking.type")
    display = thinking.get("display")
    expect(display is None or isinstance(display, str), "thinking.display must be a string", "thinking.display",
           "invalid_type")
    effort = None
    if kind == "enabled":
        budget = integer_field(thinking, "budget_tokens", 1, "thinking.budget_tokens")
        if budget is not None:
            effort = next((name for bound, name in THINKING_BUDGET_EFFORTS if budget < bound), "high")
    return kind != "disabled", display != "omitted", anthropic_effort(body) or effort


def mapped_model(model_map, asked):
    """The model ANTHROPIC_MODEL_MAP names for a claude- id: an exact name, else the longest matching prefix*."""
    if asked in model_map:
        return model_map[asked]
    prefixes = [name for name in model_map if name.endswith("*") and asked.startswith(name[:-1])]
    return model_map[max(prefixes, key=len)] if prefixes else None


def anthropic_model(asked, settings, models):
    """(upstream model, show reasoning): claude- ids through ANTHROPIC_MODEL_MAP, else the default model; any
    other id as on chat completions."""
    if asked.startswith("claude-"):
        target = mapped_model(settings.anthropic_model_map, asked)
        if target is None:
            return models.default, True
        asked = target
    return models.resolve(asked)


def parse_messages_request(body, settings, models, counting=False, session_hint=None):
    """Checks a Messages request (or a count_tokens one, which needs no max_tokens) and translates it. Returns
    the CoreRequest, whether thinking text is shown, the types of tools left out, and the server tools that are
    the request's only tools (answered without the model: they cannot run here)."""
    model = requested_model(body)
    upstream_model, show_reasoning = anthropic_model(model, settings, models)
    thinking, show_text, effort = anthropic_thinking(body)
    max_tokens = integer_field(body, "max_tokens", 1)
    expect(counting or max_tokens is not None, "'max_tokens' is required", "max_tokens", "missing")
    stream = body.get("stream", False)
    expect(isinstance(stream, bool), "'stream' must be true or false", "stream", "invalid_type")
    stop = body.get("stop_sequences")
    expect(stop is None or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)),
           "'stop_sequences' must be a list of strings", "stop_sequences", "invalid_type")
    params = sampling(number_field(body, "temperature", 0, 1), number_field(body, "top_p", 0, 1), max_tokens, stop,
                      stop_param="stop_sequences")
    tools, left_out, server = anthropic_tools(body, settings.tool_support)
    transcript, directed = anthropic_transcript(body, FileLimit.of(settings))
    effort = directed or effort or default_effort(settings, show_reasoning)
    core = CoreRequest(model, upstream_model, transcript.finish(), params, effort, stream, show_reasoning and thinking,
                       tools, anthropic_format(body), session_hint)
    return core, show_text, left_out, [] if tools else server


def anthropic_usage(usage):
    """Anthropic's usage, where input_tokens leaves out what was read from the cache."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens_details": {"thinking_tokens": usage.reasoning_tokens}}


def thinking_signature():
    """The opaque signature of a thinking block: clients that send blocks back need one, and it signs nothing."""
    return "k2proxy-" + secrets.token_urlsafe(32)


class MessageEvents:
    """Core events as Anthropic's stream: message_start, then each block's content_block_start, deltas and
    content_block_stop (a thinking block ends with its signature), then message_delta and message_stop."""

    def __init__(self, core, show_thinking_text):
        self.core = core
        self.show_thinking_text = show_thinking_text
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.block = None  # the type of the open block
        self.index = -1

    def opening(self):
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.core.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.core.prompt_tokens, "output_tokens": 0}}
        return sse_event("message_start", {"type": "message_start", "message": message}) + self.heartbeat()

    def heartbeat(self):
        return sse_event("ping", {"type": "ping"})

    def render(self, events):
        return b"".join(self._render(event) for event in events)

    def _render(self, event):
        match event:
            case Reasoning(text):
                opened = self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                return opened + (self._text_delta(b"thinking_delta", b"thinking", text)
                                 if self.show_thinking_text else b"")
            case Text(text):
                return self._open("text", {"type": "text", "text": ""}) + self._text_delta(b"text_delta", b"text",
                                                                                          text)
            case ToolCallStart(_, id_, name):
                return self._close() + self._open("tool_use", {"type": "tool_use", "id": "toolu_" + id_,
                                                               "name": name, "input": {}})
            case ToolArguments(_, text):
                return self._delta({"type": "input_json_delta", "partial_json": text})
            case Finish(reason, usage):
                delta = {"type": "message_delta", "usage": anthropic_usage(usage),
                         "delta": {"stop_reason": ANTHROPIC_STOP_REASONS[reason], "stop_sequence": None}}
                return self._close() + sse_event("message_delta", delta) + sse_event("message_stop",
                                                                                      {"type": "message_stop"})
            case Failed(error):
                return sse_event("error", anthropic_error_body(error))
        raise unknown_event(event)

    def _open(self, kind, block):
        if self.block == kind and kind != "tool_use":
            return b""
        closed = self._close()
        self.block, self.index = kind, self.index + 1
        return closed + sse_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                          "content_block": block})

    def _delta(self, delta):
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def _text_delta(self, kind, field, text):
        """The event a stream sends for nearly every frame, its fixed parts written as they are."""
        return (b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": %d, "delta": '
                b'{"type": "%s", "%s": ' % (self.index, kind, field) + json_text(text).encode() + b"}}\n\n")

    def _close(self):
        if self.block is None:
            return b""
        signed = b""
        if self.block == "thinking":
            signed = self._delta({"type": "signature_delta", "signature": thinking_signature()})
        self.block = None
        return signed + sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})


def tool_input(arguments):
    """A call's arguments as the object a tool_use block holds ({} when the model wrote something else)."""
    try:
        value = loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def anthropic_message(core, answer, show_thinking_text):
    """One Messages answer for a whole Answer."""
    content = []
    if answer.reasoning:
        content.append({"type": "thinking", "thinking": answer.reasoning if show_thinking_text else "",
                        "signature": thinking_signature()})
    text = answer.text.strip() if answer.calls else answer.text  # what led up to a call, without its blank end
    if text:
        content.append({"type": "text", "text": text})
    content += [{"type": "tool_use", "id": "toolu_" + call.id, "name": call.name, "input": tool_input(call.arguments)}
                for call in answer.calls]
    return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": core.model,
            "content": content, "stop_reason": ANTHROPIC_STOP_REASONS[answer.finish.reason], "stop_sequence": None,
            "usage": anthropic_usage(answer.finish.usage)}


def agent_session(request):
    """A subagent's own session: Claude Code names the agent in x-claude-code-agent-id, beside the session it runs
    in; the main thread's requests carry no agent, and keep the session's hint."""
    agent = request.headers.get("x-claude-code-agent-id")
    if not agent:
        return None
    session = next(filter(None, map(request.headers.get, SESSION_HINT_HEADERS)), "")
    return f"{session}\0agent:{agent}"


async def message_asked(body, request):
    state = request.app[STATE]
    core, show_text, left_out, server = parse_messages_request(body, state.settings, state.models,
                                                               session_hint=agent_session(request))
    core = await read_documents(core, state.settings, state.budget)
    state.note_left_out_tools(left_out)
    answered = functools.partial(server_tools_unavailable, core, server) if server else None
    return Asked(core, lambda: MessageEvents(core, show_text), lambda answer: anthropic_message(core, answer,
                                                                                                 show_text),
                 answered=answered)


def server_tool_input(name, turns):
    """What the model would have asked a server tool, as far as the last user turn says: its text as the query, its
    first URL to fetch."""
    said = next((turn.text for turn in reversed(turns) if turn.role == "user"), "")
    if name == "web_search":
        return {"query": said}
    if name == "web_fetch":
        found = URL.search(said)
        return {"url": found.group(0) if found else ""}
    return {"code": ""} if name == "code_execution" else {}


def server_tool_blocks(core, names):
    """Each server tool asked for, as Anthropic shows one that failed: its use, then its result holding the error."""
    blocks = []
    for name in names:
        use_id = "srvtoolu_" + uuid.uuid4().hex[:24]
        result, error = SERVER_TOOLS[name]
        use = {"type": "server_tool_use", "id": use_id, "name": name, "input": server_tool_input(name, core.turns)}
        failed = {"type": error, "error_code": "unavailable"}
        blocks += [use, {"type": result, "tool_use_id": use_id, "content": failed}]
    return blocks


async def server_tools_unavailable(core, names, request):
    """The answer to a request whose only tools are server tools (web search, fetch, code execution, the advisor):
    they cannot run here, so each is answered as failed, in Anthropic's own shape, without asking the model."""
    blocks = server_tool_blocks(core, names)
    usage = {**anthropic_usage(Usage(core.prompt_tokens, 0, 0)), "server_tool_use": {"web_search_requests": 0}}
    message = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": core.model,
               "content": blocks, "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}
    if not core.stream:
        return web.json_response(message, dumps=json_text)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    events = [sse_event("message_start", {"type": "message_start", "message": {**message, "content": [],
                                                                                 "stop_reason": None}})]
    for index, block in enumerate(blocks):
        if block["type"] == "server_tool_use":
            events += [sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                         "content_block": {**block, "input": {}}}),
                       sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                           "type": "input_json_delta", "partial_json": json_text(block["input"])}})]
        else:
            events.append(sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                            "content_block": block}))
        events.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    events += [sse_event("message_delta", {"type": "message_delta", "usage": usage,
                                           "delta": {"stop_reason": "end_turn", "stop_sequence": None}}),
               sse_event("message_stop", {"type": "message_stop"})]
    await response.write_eof(b"".join(events))
    return response


ANTHROPIC = Dialect("anthropic", anthropic_error_response, message_asked)


async def count_message_tokens(request):
    """What /v1/messages would send upstream, counted here with the usage estimate; upstream is not asked."""
    state = request.app[STATE]
    body = await read_request(request)
    core, _, _, _ = parse_messages_request(body, state.settings, state.models, counting=True)
    core = await read_documents(core, state.settings, state.budget)
    return web.json_response({"input_tokens": core.prompt_tokens})


# ─── Dialect: OpenAI Responses ───────────────────────────────────────────────
# POST /v1/responses, and GET and DELETE /v1/responses/{id}, for Codex CLI and
# the newer OpenAI SDK clients: input items become a CoreRequest; core events
# become output items (reasoning summary, message, function calls) streamed
# as response.* events with sequence numbers, or one response object; stored
# responses carry conversations on by previous_response_id; errors are in
# OpenAI's shape.

RESPONSE_EFFORTS = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                    "xhigh": "high"}  # OpenAI's → the site's
SUMMARIES = ("auto", "concise", "detailed")
COMPACTION_ITEMS = ("compaction", "compaction_summary")  # a sealed summary sent back in place of the history
COMPACTION_TRIGGER = "compaction_trigger"  # the last input item of a request that asks for a compaction
COMPACTION_PROMPT = (
    "Summarize the conversation so far for a handoff: it will go on from your summary alone, which replaces "
    "every turn above. Keep the user's requests and goals, the decisions made and why, what was done (files, "
    "commands, their results), what is still open and the next step, and every detail the next step needs. "
    "Write the summary only.")
COMPACTION_NOTE = "The conversation before this point was compacted. Its summary:"
FREEFORM_INPUT = "input"  # the one argument of a freeform (custom) tool offered to the model as a function
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}
SKIPPED_ITEMS = frozenset((  # items of history that say nothing the model could use: built-in tools
    "web_search_call", "file_search_call", "computer_call", "computer_call_output",
    "image_generation_call", "code_interpreter_call", "local_shell_call", "local_shell_call_output",
    "mcp_list_tools", "mcp_call", "mcp_approval_request", "mcp_approval_response", "item_reference"))
ECHO_DEFAULTS: dict[str, object] = {  # what a response repeats of its request; the specification's value if not given
    "instructions": None, "previous_response_id": None, "tools": [], "tool_choice": "auto", "truncation": "disabled",
    "parallel_tool_calls": True, "text": {"format": {"type": "text"}}, "top_p": 1, "presence_penalty": 0,
    "frequency_penalty": 0, "top_logprobs": 0, "temperature": 1, "user": None, "max_output_tokens": None,
    "max_tool_calls": None, "store": True, "metadata": {}, "safety_identifier": None, "prompt_cache_key": None}
SERVICE_TIER = "default"  # the one tier there is: a request's service_tier is taken and answered with this


def response_part(part, where, limit):
    """One part of a message item's content as an upstream part."""
    expect(isinstance(part, dict) and isinstance(part.get("type"), str), f"{where} must be an object with a 'type'",
           where, "invalid_type")
    kind = part["type"]
    if kind in ("input_text", "output_text", "text", "summary_text"):
        expect(isinstance(part.get("text"), str), f"{where}.text must be a string", where, "invalid_type")
        return {"type": "text", "text": part["text"]}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal", ""))}
    if kind == "input_image":
        url = part.get("image_url")
        expect(isinstance(url, str) and url, f"{where}.image_url must be an image's URL or data: URL (file ids cannot "
               "be fetched through this proxy)", where, "invalid_type")
        return image_part(url, where, limit)
    if kind == "input_file":
        data, name = part.get("file_data"), part.get("filename")
        expect(isinstance(data, str) and data, f"{where}.file_data is missing: send the file itself (file ids and "
               "URLs cannot be fetched through this proxy)", where, "invalid_type")
        return text_file(name if isinstance(name, str) and name else "file", *decode_data(data, where, limit.bytes),
                         where)
    raise ApiError(400, f"{where} has type '{kind}', which is not supported (input_text, input_image, input_file, "
                        "output_text)", param=where, code="unsupported_content")


def response_parts(content, where, limit):
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    expect(isinstance(content, list), f"{where} must be a string or a list of parts", where, "invalid_type")
    return [response_part(part, f"{where}[{number}]", limit) for number, part in enumerate(content)]


class TurnBuilder:
    """Builds a Transcript from Responses items: an assistant message and the calls after it are one turn."""

    def __init__(self, limit, unseal):
        self.transcript = Transcript()
        self.limit = limit
        self.unseal = unseal  # (encrypted_content, where) → the summary a compaction item holds, or a 400
        self.texts, self.calls, self.thoughts = [], [], []

    def add(self, item, where):
        kind = item.get("type", "message")
        expect(isinstance(kind, str), f"{where}.type must be a string", f"{where}.type", "invalid_type")
        if kind == "reasoning":
            self.thoughts.append(reasoning_text(item, where))
            return
        if kind in ("function_call", "custom_tool_call"):
            self.calls.append(self._call(item, where))
            return
        if kind == "message" and item.get("role") == "assistant":
            self.texts.append(text_of(response_parts(item.get("content"), f"{where}.content", self.limit)))
            return
        self._end_turn()
        if kind in ("function_call_output", "custom_tool_call_output"):
            self._result(item, where)
        elif kind in COMPACTION_ITEMS:
            summary = self.unseal(item.get("encrypted_content"), f"{where}.encrypted_content")
            self.transcript.add("user", f"{COMPACTION_NOTE}\n\n{summary}")
        elif kind == "message":
            role = item.get("role")
            expect(role in ("user", "system", "developer"), f"{where}.role must be user, assistant, system or "
                   "developer", f"{where}.role")
            parts = response_parts(item.get("content"), f"{where}.content", self.limit)
            self.transcript.add("user" if role == "user" else "system", parts)
        else:
            expect(kind in SKIPPED_ITEMS, f"{where} has type '{kind}', which is not supported", f"{where}.type")

    def finish(self):
        self._end_turn()
        return self.transcript.finish()

    def _call(self, item, where):
        call_id, name = item.get("call_id"), item.get("name")
        arguments = (item.get("arguments") if item.get("type") == "function_call"
                     else {FREEFORM_INPUT: item.get("input")})
        expect(isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, (str, dict)),
               f"{where} must have a string call_id and name and its arguments", where, "invalid_type")
        return call_id, name, check_arguments(arguments, f"{where}.arguments")

    def _result(self, item, where):
        call_id, output = item.get("call_id"), item.get("output", "")
        expect(isinstance(call_id, str), f"{where}.call_id must be a string", f"{where}.call_id", "invalid_type")
        parts = response_parts(output, f"{where}.output", self.limit)
        self.transcript.tool_result(call_id, parts)

    def _end_turn(self):
        """Ends the assistant turn under way: its messages, calls and the reasoning items before them."""
        if self.texts or self.calls:
            thoughts = "".join(self.thoughts)
            self.transcript.assistant("\n".join(self.texts), self.calls, thoughts or None)
        self.texts, self.calls, self.thoughts = [], [], []


def reasoning_text(item, where):
    """The text of a reasoning item: its reasoning content, else its summary (encrypted content is opaque)."""
    texts = []
    for field_name in ("content", "summary"):
        parts = item.get(field_name) or []
        expect(isinstance(parts, list) and all(isinstance(p, dict) for p in parts), f"{where}.{field_name} must be "
               "a list of parts", f"{where}.{field_name}", "invalid_type")
        texts = [p["text"] for p in parts if isinstance(p.get("text"), str)]
        if texts:
            break
    return "\n".join(texts)


BUILT_IN_TOOLS = ("web_search", "file_search", "code_interpreter", "image_generation", "computer", "mcp",
                  "local_shell", "tool_search")  # OpenAI runs these itself (their types start so): left out here


def freeform_tool(tool, where):
    """A freeform (custom) tool as a function of one string argument, its grammar (if any) told to the model."""
    answer_format = object_in(tool.get("format")) or {"type": "text"}
    kind = answer_format.get("type")
    expect(kind in ("text", "grammar"), f"{where}.format.type must be text or grammar", f"{where}.format.type")
    description = tool.get("description")
    expect(description is None or isinstance(description, str), f"{where}.description must be a string",
           f"{where}.description", "invalid_type")
    told = (description or "") + "\nThis tool takes raw text, not JSON: put all of it in the argument "
    told += f"'{FREEFORM_INPUT}'."
    if kind == "grammar":
        syntax, definition = answer_format.get("syntax"), answer_format.get("definition")
        expect(isinstance(syntax, str) and isinstance(definition, str), f"{where}.format needs a syntax and a "
               "definition (strings)", f"{where}.format", "invalid_type")
        told += f" The text must follow this {syntax} grammar:\n{definition}"
    parameters = {"type": "object", "properties": {FREEFORM_INPUT: {"type": "string", "description": "The raw "
                  "text input of the tool"}}, "required": [FREEFORM_INPUT]}
    return check_tool(tool.get("name"), told.strip(), parameters, where)


def freeform_input(arguments):
    """The raw text of a freeform tool's call from the arguments the model gave: its input argument, else the
    one string it gave, else the arguments as written."""
    try:
        given = loads(arguments)
    except ValueError:
        return arguments
    if isinstance(given, dict):
        texts = [value for value in given.values() if isinstance(value, str)]
        if isinstance(given.get(FREEFORM_INPUT), str):
            return given[FREEFORM_INPUT]
        if len(given) == 1 and texts:
            return texts[0]
    return arguments


def response_tools(body, enabled):
    """(ToolPlan or None, function name → its namespace, the freeform tools' names, built-in tool types left
    out). Namespaces are flattened into their functions, freeform tools become functions of one string;
    built-in tools (web search, …) are left out, as Codex always sends some; any other type is a 400."""
    tools, choice = body.get("tools") or [], body.get("tool_choice", "auto")
    expect(isinstance(tools, list) and all(isinstance(t, dict) for t in tools), "'tools' must be a list of objects",
           "tools", "invalid_type")
    checked, namespaces, freeform, left_out = [], {}, set(), []
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if kind == "custom":
            checked.append(freeform_tool(tool, f"tools[{index}]"))
            freeform.add(tool["name"])
            continue
        inner = tool.get("tools") if kind == "namespace" else [tool] if kind == "function" else None
        if inner is None:
            expect(isinstance(kind, str) and kind.startswith(BUILT_IN_TOOLS), f"tools[{index}] has type {kind!r}, "
                   "which cannot be served here (function, namespace and custom tools can)", f"tools[{index}].type",
                   "unsupported_tool")
            left_out.append(kind)
            continue
        expect(isinstance(inner, list) and all(isinstance(t, dict) for t in inner), f"tools[{index}].tools must be a "
               "list of functions", f"tools[{index}].tools", "invalid_type")
        for number, function in enumerate(inner):
            where = f"tools[{index}]" + (f".tools[{number}]" if kind == "namespace" else "")
            checked.append(check_tool(function.get("name"), function.get("description"), function.get("parameters"),
                                      where))
            if kind == "namespace":
                namespaces[function["name"]] = tool.get("name")
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        choice = choice.get("name")
    expect(isinstance(choice, str), "tool_choice must be \"auto\", \"none\", \"required\" or "
           "{\"type\": \"function\" or \"custom\", \"name\": ...}", "tool_choice")
    expect(choice != "required" or checked or not left_out, f"tool_choice is required, but the request's only tools "
           f"({', '.join(left_out)}) cannot run here", "tool_choice", "unsupported_tool")
    return tool_plan(checked, choice, enabled), namespaces, frozenset(freeform), left_out


def response_history(body, previous):
    """The items of the conversation so far: those of the response it continues, then this request's input."""
    items = body.get("input")
    items = [{"type": "message", "role": "user", "content": items}] if isinstance(items, str) else items
    expect(isinstance(items, list) and all(isinstance(item, dict) for item in items), "'input' must be a string or "
           "a list of items", "input", "invalid_type")
    return previous + items


async def continued(body, request):
    """The items of the response a previous_response_id names ([] without one): the key's own, read within the
    memory budget."""
    previous = body.get("previous_response_id") if isinstance(body, dict) else None
    if previous is None:
        return []
    expect(isinstance(previous, str), "'previous_response_id' must be a string", "previous_response_id",
           "invalid_type")
    store = request.app[STATE].responses
    kept = await store.get(previous, request[RECORD].client)
    if kept is None:
        raise store.missing(previous, "previous_response_id")
    await reserve(request, kept.size * BODY_MEMORY_FACTOR)
    return kept.history()


@dataclass(frozen=True)
class ResponsesAsked:
    """What a Responses request asked for beyond the core request: whether the response is kept, the history it
    continues, which namespace each function belongs to, and the fields the response object repeats."""
    store: bool
    history: list
    namespaces: dict
    freeform: frozenset  # the names of the freeform tools, whose calls are custom_tool_call items
    echo: dict
    compacting: bool = False  # the answer is one compaction item, K2's summary sealed


def refuse_sealed(encrypted_content, where):
    raise ApiError(400, f"{where}: compaction items cannot be opened here", param=where, code="invalid_compaction")


def parse_responses_request(body, settings, models, previous=(), unseal=refuse_sealed):
    """Checks a Responses request and translates it; every problem is a 400 naming the field (a 404 for an unknown
    previous_response_id). Returns the CoreRequest, what else was asked, and the built-in tool types left out. A
    compaction item of the input is opened by `unseal`; a compaction_trigger at its end asks K2 for the
    conversation's summary instead of an answer."""
    model = requested_model(body, models.default)  # the specification lets a request leave the model out
    upstream_model, show_reasoning = models.resolve(model)
    stream, stored = body.get("stream", False), body.get("store", True)
    expect(isinstance(stream, bool) and isinstance(stored, bool), "'stream' and 'store' must be true or false",
           "stream" if not isinstance(stream, bool) else "store", "invalid_type")
    reasoning = object_field(body, "reasoning")
    effort = one_of_field(reasoning, "effort", tuple(RESPONSE_EFFORTS), None, "reasoning.effort")
    summary = one_of_field(reasoning, "summary", SUMMARIES, None, "reasoning.summary")
    instructions = body.get("instructions")
    expect(instructions is None or isinstance(instructions, str), "'instructions' must be a string",
           "instructions", "invalid_type")
    tools, namespaces, freeform, left_out = response_tools(body, settings.tool_support)
    history = response_history(body, list(previous))
    compacting = bool(history) and history[-1].get("type") == COMPACTION_TRIGGER
    history = history[:-1] if compacting else history
    turns = TurnBuilder(FileLimit.of(settings), unseal)
    if instructions:
        turns.transcript.add("system", instructions)
    for index, item in enumerate(history):
        expect(item.get("type") != COMPACTION_TRIGGER, f"input[{index}]: a compaction_trigger comes last in the "
               "input", f"input[{index}].type")
        turns.add(item, f"input[{index}]")
    if compacting:
        expect(history, "there is nothing to compact: the input holds only the compaction_trigger", "input")
        turns.add({"role": "user", "content": COMPACTION_PROMPT}, "compaction")
        tools = None
    params = sampling(number_field(body, "temperature", 0, 2), number_field(body, "top_p", 0, 1),
                      integer_field(body, "max_output_tokens", 1), None)
    for name in ("presence_penalty", "frequency_penalty"):
        number_field(body, name, -2, 2)
    integer_field(body, "max_tool_calls", 1)
    if body.get("top_logprobs") not in (None, 0):
        raise no_probabilities(settings, "top_logprobs")
    expect(body.get("background") in (None, False), "'background' is not supported: a response is made while "
           "its request waits (stream it for a long one)", "background", "unsupported_parameter")
    effort = RESPONSE_EFFORTS[effort] if effort else default_effort(settings, show_reasoning)
    answer_format = None if compacting else response_format(body)
    core = CoreRequest(model, upstream_model, turns.finish(), params, effort, stream,
                       show_reasoning and summary is not None and not compacting, tools, answer_format,
                       session_hint(body))
    echo = {**ECHO_DEFAULTS, **{name: body[name] for name in ECHO_DEFAULTS if body.get(name) is not None},
            "tools": echoed_tools(body.get("tools") or []), "text": echoed_text(body),
            "reasoning": {"effort": reasoning.get("effort"), "summary": summary}, "background": False,
            "service_tier": SERVICE_TIER}
    return core, ResponsesAsked(stored, history, namespaces, freeform, echo, compacting), left_out


def echoed_tools(tools):
    """The tools as a response repeats them: a function with its description, parameters and strict (the
    specification's default, true) even when the request left them out; other tools as they came."""
    def echoed(tool):
        if tool.get("type") != "function":
            return tool
        return {"description": None, "parameters": None, **tool, "strict": tool.get("strict", True)}
    return [echoed(tool) for tool in tools]


def echoed_text(body):
    """The text options as a response repeats them: a json_schema format with its description, null when none."""
    text = body.get("text") or {}
    answer_format = text.get("format") or {"type": "text"}
    if answer_format.get("type") == "json_schema":
        answer_format = {"description": None, **answer_format, "strict": bool(answer_format.get("strict"))}
    return {**text, "format": answer_format}


def response_format(body):
    """The AnswerFormat of text.format: json_object, or json_schema with its name, schema and strict; None for
    text."""
    text = object_field(body, "text")
    answer_format = object_field(text, "format", "text.format")
    kind = one_of_field(answer_format, "type", ("text", "json_object", "json_schema"), "text", "text.format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return AnswerFormat()
    return json_schema_format(answer_format, "text.format")


def output_text_part(text):
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(item_id, text, status):
    return {"type": "reasoning", "id": item_id, "status": status,
            "summary": [] if text is None else [{"type": "summary_text", "text": text}]}


def message_item(item_id, text, status):
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [output_text_part(text)]}


def function_call_item(item_id, call_id, name, arguments, status, namespace):
    item = {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}
    return {**item, "namespace": namespace} if namespace else item


def responses_usage(usage):
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}, "total_tokens": usage.total_tokens}


class ResponseBuilder:
    """One response's id and fields, and its finished form once the completion ends, kept in the store when the
    request asked for it."""

    def __init__(self, core, asked, store, owner, sealer, remember=None):
        self.core = core
        self.asked = asked
        self.store = store
        self.owner = owner
        self.sealer = sealer
        self.remember = remember  # (id, conversation) → None: a WebSocket's memory of its last response
        self.id = "resp_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.kept = None  # (response, history) of the finished response, while it is to be stored

    def response(self, status, output, usage=None, error=None, incomplete=None):
        """The response object with every field the specification requires, whatever its status."""
        return {"id": self.id, "object": "response", "created_at": self.created,
                "completed_at": int(time.time()) if status == "completed" else None, "status": status,
                "error": error, "incomplete_details": incomplete, "model": self.core.model, "output": output,
                "usage": responses_usage(usage) if usage else None, **self.asked.echo}

    def finished(self, output, finish):
        """The response of a completion that ended: completed, or incomplete (the answer was cut short)."""
        cut = INCOMPLETE_REASONS.get(finish.reason)
        final = self.response("incomplete" if cut else "completed", output, finish.usage,
                              incomplete={"reason": cut} if cut else None)
        conversation = output if self.asked.compacting else self.asked.history + output  # a compaction stands
        if self.asked.store:                                                                 # for what was before
            self.kept = (final, conversation)
        if self.remember:
            self.remember(self.id, conversation)
        return final

    def compaction(self, summary):
        """The one output item of a compaction: K2's summary sealed, for this key alone to send back."""
        sealed = self.sealer.seal({"summary": summary, "client": self.owner, "model": self.core.model})
        return {"type": "compaction", "id": "cmp_" + uuid.uuid4().hex, "encrypted_content": sealed}

    async def settle(self):
        """Stores the finished response before the client sees its end, so that any replica can continue it."""
        if self.kept:
            await self.store.put(*self.kept, self.owner)

    def failed(self, error, output=()):
        code = "rate_limit_exceeded" if error.status == 429 else error.code or "server_error"
        return self.response("failed", list(output), error={"code": code, "message": error.message})

    def call(self, call_id, name, arguments, status):
        """The output item of a call: a custom_tool_call with its raw input for a freeform tool, else a
        function_call."""
        if name in self.asked.freeform:
            return {"type": "custom_tool_call", "id": "ctc_" + call_id, "call_id": "call_" + call_id, "name": name,
                    "input": freeform_input(arguments) if arguments else "", "status": status}
        return function_call_item("fc_" + call_id, "call_" + call_id, name, arguments, status,
                                  self.asked.namespaces.get(name))


def response_body(builder, answer):
    """One response object for a whole Answer (for a compaction, its one item)."""
    if builder.asked.compacting:
        return builder.finished([builder.compaction(answer.text)], answer.finish)
    output = []
    if answer.reasoning:
        output.append(reasoning_item("rs_" + uuid.uuid4().hex, answer.reasoning, "completed"))
    if answer.text or not answer.calls:
        output.append(message_item("msg_" + uuid.uuid4().hex, answer.text.strip() if answer.calls else answer.text,
                                   "completed"))
    output += [builder.call(call.id, call.name, call.arguments, "completed") for call in answer.calls]
    return builder.finished(output, answer.finish)


class ResponseEvents:
    """Core events as the Responses stream: response.created and .in_progress, each output item's added, deltas
    and done events, then response.completed (or .incomplete, or .failed); every event numbered in order."""

    def __init__(self, builder):
        self.builder = builder
        self.sequence = 0
        self.output = []     # the items done so far
        self.item: dict = {}  # the open item ({} while none is)
        self.pieces = []     # the text (or arguments) of the open item so far
        self.call = ("", "")  # (id, name) of the call whose item opens next

    def opening(self):
        started = self.builder.response("in_progress", [])
        return self._event("response.created", response=started) + self._event("response.in_progress",
                                                                                response=started)

    def heartbeat(self):
        return b": keep-alive\n\n"

    def render(self, events):
        return b"".join(self._render(event) for event in events)

    def _render(self, event):
        match event:
            case Reasoning(text):
                return self._open("reasoning") + self._delta(b"response.reasoning_summary_text.delta",
                                                             b"summary_index", text)
            case Text(text):
                return self._open("message") + self._delta(b"response.output_text.delta", b"content_index", text,
                                                           b', "logprobs": []}')
            case ToolCallStart(_, id_, name):
                self.call = (id_, name)
                return self._open("function_call")
            case ToolArguments(_, text):
                self.pieces.append(text)
                if self.item["type"] == "custom_tool_call":  # its raw input is known once the arguments are
                    return b""
                return self._event("response.function_call_arguments.delta", item_id=self.item["id"],
                                   output_index=len(self.output), delta=text)
            case Finish():
                closed, final = self._close(), self.builder.finished(self.output, event)
                kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
                return closed + self._event(kind, response=final) + DONE_LINE
            case Failed(error):  # what was streamed stays, its open item closed as incomplete
                closed = self._close("incomplete")
                return closed + self._event("response.failed", response=self.builder.failed(error, self.output)) \
                    + DONE_LINE
        raise unknown_event(event)

    def whole(self, item):
        """The added and done events of an item known whole at once (a compaction)."""
        place = len(self.output)
        self.output.append(item)
        return (self._event("response.output_item.added", output_index=place, item=item)
                + self._event("response.output_item.done", output_index=place, item=item))

    def _event(self, kind, **fields):
        self.sequence += 1
        return sse_event(kind, {"type": kind, "sequence_number": self.sequence - 1, **fields})

    def _delta(self, kind, index_name, text, tail=b"}"):
        """The event a stream sends for nearly every frame, its fixed parts written as they are."""
        self.pieces.append(text)
        self.sequence += 1
        head = (b'event: %s\ndata: {"type": "%s", "sequence_number": %d, "item_id": "%s", "output_index": %d, '
                b'"%s": 0, "delta": ' % (kind, kind, self.sequence - 1, self.item["id"].encode(), len(self.output),
                                         index_name))
        return head + json_text(text).encode() + tail + b"\n\n"

    def _open(self, kind):
        if self.item and self.item["type"] == kind and kind != "function_call":
            return b""
        closed = self._close()
        if kind == "reasoning":
            self.item = reasoning_item("rs_" + uuid.uuid4().hex, None, "in_progress")
        elif kind == "message":
            self.item = message_item("msg_" + uuid.uuid4().hex, None, "in_progress")
        else:
            self.item = self.builder.call(*self.call, "", "in_progress")
        added = self._event("response.output_item.added", output_index=len(self.output), item=self.item)
        return closed + added + self._part("added", "")

    def _part(self, stage, text):
        """The added or done event of the open item's one part (its text, or its reasoning summary)."""
        place = {"item_id": self.item["id"], "output_index": len(self.output)}
        if self.item["type"] == "message":
            return self._event(f"response.content_part.{stage}", **place, content_index=0, part=output_text_part(text))
        if self.item["type"] == "reasoning":
            return self._event(f"response.reasoning_summary_part.{stage}", **place, summary_index=0,
                               part={"type": "summary_text", "text": text})
        return b""

    def _close(self, status="completed"):
        """The done events of the open item; `status` incomplete when the response failed while it was open."""
        if not self.item:
            return b""
        text, kind, place = "".join(self.pieces), self.item["type"], {"item_id": self.item["id"],
                                                                      "output_index": len(self.output)}
        if kind == "message":
            ended = self._event("response.output_text.done", **place, content_index=0, text=text, logprobs=[])
            done = message_item(self.item["id"], text, status)
        elif kind == "reasoning":
            ended = self._event("response.reasoning_summary_text.done", **place, summary_index=0, text=text)
            done = reasoning_item(self.item["id"], text, status)
        elif kind == "custom_tool_call":
            done = {**self.item, "input": freeform_input(text) if text else "", "status": status}
            ended = self._event("response.custom_tool_call_input.delta", **place, delta=done["input"])
            ended += self._event("response.custom_tool_call_input.done", **place, input=done["input"])
        else:
            ended = self._event("response.function_call_arguments.done", **place, arguments=text)
            done = {**self.item, "arguments": text, "status": status}
        ended += self._part("done", text)
        ended += self._event("response.output_item.done", output_index=len(self.output), item=done)
        self.output.append(done)
        self.item, self.pieces = {}, []
        return ended


class CompactionEvents:
    """A compaction's stream: the response's opening, nothing while K2 writes the summary (it is sealed whole,
    within MAX_ANSWER_MB), then the compaction item's added and done events and the response's end."""

    def __init__(self, builder, limit):
        self.builder = builder
        self.events = ResponseEvents(builder)
        self.limit = limit
        self.summary: list[str] = []
        self.size = 0

    def opening(self):
        return self.events.opening()

    def heartbeat(self):
        return self.events.heartbeat()

    def render(self, events):
        return b"".join(self._render(event) for event in events)

    def _render(self, event):
        match event:
            case Text(text):
                self.size += len(text)
                if self.size > self.limit:
                    raise answer_too_large(self.limit)
                self.summary.append(text)
                return b""
            case Reasoning() | ToolCallStart() | ToolArguments():
                return b""
            case Finish():
                return self.events.whole(self.builder.compaction("".join(self.summary))) + self.events.render([event])
            case Failed():
                return self.events.render([event])
        raise unknown_event(event)


def opener(sealer, owner):
    """The unseal of a request by `owner`: the summary of a compaction item this proxy sealed for that key."""
    def unseal(encrypted_content, where):
        opened = sealer.open(encrypted_content)
        expect(isinstance(opened, dict) and opened.get("client") == owner and isinstance(opened.get("summary"), str),
               f"{where} is not a compaction item this proxy made for this key (it was changed, made elsewhere, or "
               "under another COMPACTION_KEY)", where, "invalid_compaction")
        return opened["summary"]
    return unseal


async def response_asked(body, request, answer_body=response_body, socket=None):
    """What a Responses request asks, and how its answer is written; on a WebSocket, `socket` is the connection's
    memory, whose last response previous_response_id may name even when it was not stored."""
    state, owner = request.app[STATE], request[RECORD].client
    if socket and socket.last and isinstance(body, dict) and body.get("previous_response_id") == socket.last[0]:
        previous = socket.last[1]
    else:
        previous = await continued(body, request)
    core, asked, left_out = parse_responses_request(body, state.settings, state.models, previous,
                                                    opener(state.sealer, owner))
    core = await read_documents(core, state.settings, state.budget)
    state.note_left_out_tools(left_out)
    builder = ResponseBuilder(core, asked, state.responses, owner, state.sealer, socket and socket.remember)
    limit = int(state.settings.max_answer_mb * MB)
    events = (lambda: CompactionEvents(builder, limit)) if asked.compacting else (lambda: ResponseEvents(builder))
    return Asked(core, events, lambda answer: answer_body(builder, answer), builder.settle)


RESPONSES = Dialect("responses", openai_error_response, response_asked)


COMPACTED_FIELDS = ("model", "input", "instructions", "previous_response_id", "prompt_cache_key", "reasoning")


def compacted_body(builder, answer):
    """The answer of POST /v1/responses/compact: the compacted response object, its one compaction item."""
    final = response_body(builder, answer)
    return {"id": final["id"], "object": "response.compaction", "created_at": final["created_at"],
            "output": final["output"], "usage": final["usage"]}


def compaction_failed(error):
    """A compaction's failure as a clear error: Codex does not fall back to compacting itself, and reads a 500 or
    503 as the service's high demand."""
    if error.status < 500:
        return error
    return ApiError(502, f"compaction failed, the conversation is unchanged: {error.message}", code="compaction_failed",
                    retry_after=error.retry_after)


async def compact_response(request):
    """POST /v1/responses/compact: K2's summary of the conversation, sealed in one compaction item that later
    requests send back in place of the history it replaces."""
    body = await read_request(request)
    expect(isinstance(body, dict), "The request body must be a JSON object", None, "invalid_type")
    expect(body.get("input") is not None or body.get("previous_response_id") is not None, "a compaction needs "
           "'input' (the conversation) or 'previous_response_id'", "input")
    items = body.get("input") or []
    items = [{"type": "message", "role": "user", "content": items}] if isinstance(items, str) else items
    expect(isinstance(items, list), "'input' must be a string or a list of items", "input", "invalid_type")
    asked_for = {name: body[name] for name in COMPACTED_FIELDS if name in body}
    asked = await response_asked({**asked_for, "input": [*items, {"type": COMPACTION_TRIGGER}], "stream": False,
                                  "store": False}, request, compacted_body)
    try:
        return await answer_asked(request, asked)
    except ApiError as error:
        raise compaction_failed(error) from None


async def get_response(request):
    store = request.app[STATE].responses
    kept = await store.get(request.match_info["id"], request[RECORD].client)
    if kept is None:
        raise store.missing(request.match_info["id"])
    await reserve(request, kept.size * BODY_MEMORY_FACTOR)
    return web.json_response(kept.response(), dumps=json_text)


async def delete_response(request):
    store, response_id = request.app[STATE].responses, request.match_info["id"]
    if not await store.delete(response_id, request[RECORD].client):
        raise store.missing(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


# WebSocket mode: GET /v1/responses with Upgrade: websocket. Each response.create message is a request of its own
# (its key's limits, its record and log line, the memory budget), answered with the same events as the stream, one
# JSON message each; the connection remembers its last response for previous_response_id.

SOCKET_ROUTE = "/v1/responses (WebSocket)"  # how the request log, /metrics and the admin page name its messages
WARM_UP = Finish("stop", Usage(0, 0, 0))  # the end of a response that asked for none (generate: false)
SOCKET_QUEUE = 8  # response.create messages a connection may send ahead of the one being answered
SOCKET_STREAM_FIELDS = ("stream", "stream_options")  # HTTP streaming's: the specification says a client leaves
                                                     # them out, Codex sends them; either way the answer streams


def socket_messages(data):
    """The JSON messages of rendered SSE bytes: each event's data, without its framing, the heartbeats' comments
    or the stream's [DONE]."""
    return [line[6:].decode() for block in data.split(b"\n\n") for line in block.split(b"\n")
            if line.startswith(b"data: ") and line != DONE_LINE.strip()]


def socket_error(error):
    """An error as the WebSocket mode sends it: its HTTP status beside OpenAI's error object."""
    return json_text({"type": "error", "status": error.status, **openai_error_body(error)})


class SocketStream:
    """Writes a completion's events to a WebSocket, one JSON message per event; a failure before anything was
    sent is raised, for the connection's error message."""

    response: web.StreamResponse | None = None  # the socket is the connection's, answered by its handler

    def __init__(self, ws, renderer):
        self.ws = ws
        self.renderer = renderer
        self.sent = False

    @property
    def committed(self):
        return self.sent

    def reset(self):
        """A failed attempt's events are void; none was sent (else the stream would be committed)."""

    def start(self):
        pass

    def stop(self):
        pass

    async def write(self, events):
        await self._send(events)

    async def close(self, events):
        if isinstance(events[-1], Failed) and not self.sent:
            raise events[-1].error
        await self._send(events)

    async def _send(self, events):
        """Sends the events, after the opening when they are the first: rendered in the order they are numbered."""
        opening = b"" if self.sent else self.renderer.opening()
        data, self.sent = opening + self.renderer.render(events), True
        try:
            for message in socket_messages(data):
                await self.ws.send_str(message)
        except (ConnectionError, RuntimeError):
            raise ClientGone() from None


class ResponseSocket:
    """One WebSocket connection in Responses' WebSocket mode: its messages answered one after another while
    reading goes on, so that a closed socket ends the response under way at once."""

    def __init__(self, request, ws):
        self.request = request
        self.ws = ws
        self.owner = request[RECORD]  # the connection's own record: who it is (key and client)
        self.last = None  # (id, conversation) of the last response answered here
        self.turn = asyncio.Lock()  # held while a response is answered

    def remember(self, response_id, conversation):
        self.last = (response_id, conversation)

    async def serve(self):
        waiting: asyncio.Queue[str] = asyncio.Queue(SOCKET_QUEUE)
        worker = asyncio.ensure_future(self.answer_each(waiting))
        closer = asyncio.ensure_future(self.close_when_draining())
        try:
            async for message in self.ws:
                if message.type is not web.WSMsgType.TEXT:
                    await self.ws.send_str(socket_error(ApiError(400, "Send response.create events as text "
                                                                      "messages of JSON", code="invalid_message")))
                elif waiting.full():
                    await self.ws.send_str(socket_error(ApiError(
                        429, f"At most {SOCKET_QUEUE} response.create events may wait on one connection",
                        code="too_many_waiting")))
                else:
                    waiting.put_nowait(message.data)
        finally:
            for task in (worker, closer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def answer_each(self, waiting):
        while True:
            text = await waiting.get()
            async with self.turn:
                await self.answer(text)

    async def close_when_draining(self):
        """After SIGTERM: the connection closes as "going away" once the response under way is answered, so that
        the client connects again, to a replica that stays."""
        await self.request.app[STATE].handling.draining.wait()
        async with self.turn:
            await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"the proxy is restarting; connect again")

    async def answer(self, text):
        """One response.create: a request of its own, from its record to its log line."""
        state, request = self.request.app[STATE], self.request
        record = RequestRecord("WS", request.path, RESPONSES.name, True, time.monotonic(), route=SOCKET_ROUTE,
                               key=self.owner.key, client=self.owner.client)
        state.monitor.begin(record)
        request[RECORD], status = record, 200
        try:
            key = state.keys.find(self.owner.api_key.value)  # still a key: the admin may have removed it since
            if key is None:
                raise ApiError(401, "This connection's API key is no longer valid", code="invalid_api_key")
            record.slot = await state.keys.admit(key)
            await reserve(request, BODY_MEMORY_FACTOR * len(text))
            body = await parsed_within(request, text.encode())
            body = self.create_event(body)
            if isinstance(body.get("model"), str):
                record.model = body["model"][:MODEL_NAME_CHARS]
            asked = await response_asked(body, request, socket=self)
            if body.get("generate") is False:  # Codex's warm-up: the connection made ready, no answer asked for
                record.stream = True
                await SocketStream(self.ws, asked.stream_writer()).close([WARM_UP])
            else:
                await answer_asked(request, asked, SocketStream(self.ws, asked.stream_writer()))
        except ApiError as error:
            status, record.reason = error.status, error.code
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_str(socket_error(error))
        except asyncio.CancelledError:
            record.outcome = Outcome.CLIENT_GONE
            raise
        finally:
            state.finish(record, status)

    @staticmethod
    def create_event(message):
        """The request body of a response.create event (its fields beside its type, or under "response")."""
        expect(isinstance(message, dict) and message.get("type") == "response.create", "A message must be a "
               "response.create event: {\"type\": \"response.create\", \"model\": ..., \"input\": ...}", "type")
        body = object_in(message.get("response")) or {k: v for k, v in message.items() if k != "type"}
        expect(body.get("stream") is not False, "'stream' cannot be false on a WebSocket: every response there is "
               "streamed (leave it out)", "stream")
        return {**{k: v for k, v in body.items() if k not in SOCKET_STREAM_FIELDS}, "stream": True}


async def responses_socket(request):
    """GET /v1/responses: Responses' WebSocket mode (a plain GET is told how to use it)."""
    settings = request.app[STATE].settings
    ws = web.WebSocketResponse(max_msg_size=int(settings.max_request_mb * MB), heartbeat=settings.keepalive_seconds)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "GET /v1/responses opens a WebSocket (send Upgrade: websocket); create a response "
                            "over HTTP with POST /v1/responses", code="websocket_expected")
    await ws.prepare(request)
    await ResponseSocket(request, ws).serve()
    return ws


# ─── Admin API ───────────────────────────────────────────────────────────────
# The admin page and its JSON API. Every route but the page needs the admin
# key. Only /admin/tokens/content returns whole tokens; everything else shows
# them masked. Errors are in OpenAI's shape.

def page_policy(html):
    """A Content-Security-Policy allowing the page's own inline script and style, by hash, and nothing else."""
    def hashes(tag):
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)) or "'none'"
    return (f"default-src 'self'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


ADMIN_PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


async def read_admin_page():
    """The admin page's body and headers, or None (logged) when admin.html cannot be read."""
    try:
        html = await asyncio.to_thread((HERE / "admin.html").read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.error("the admin page is off: %s/admin.html cannot be read (%s)", HERE, type(exc).__name__)
        return None
    return html.encode(), {**ADMIN_PAGE_HEADERS, "Content-Security-Policy": page_policy(html)}


class EditedPool(enum.Enum):
    """The pool a token admin route edits."""
    SITE = "site"  # the site's tokens of the active mode
    API = "api"    # the IFM keys




def ok(message, **extra):
    return web.json_response({"ok": True, "message": message, **extra})


async def admin_page(request):
    page = request.app[STATE].admin_page
    if page is None:
        raise ApiError(404, "admin.html is missing or unreadable next to k2proxy.py; see the log", code="not_found")
    return web.Response(body=page[0], content_type="text/html", charset="utf-8", headers=page[1])


async def admin_status(request):
    state = request.app[STATE]
    site = state.site
    return web.json_response({
        "mode": site.mode, "upstream_url": site.url, "tokens_file": str(site.pool.file.path),
        "counts": site.pool.counts(), "upstream": state.settings.upstream,
        "ifm": {"base_url": state.api.url.removesuffix("/chat/completions"), "keys_file": str(state.api.pool.file.path),
                "counts": state.api.pool.counts()},
        "version": __version__, "uptime_s": int(time.time()) - state.started,
        "models": {"ids": state.models.ids, "source": state.models.source},
        "accounts": state.accounts.stats(), "stats": state.monitor.summary(),
        "settings": state.settings.public(), "replicas": await replicas_seen(state),
        "redis": shared_status(state.shared)})


def shared_status(shared):
    """What the admin sees of Redis (where it is, and why it cannot be reached); None without REDIS_URL."""
    if shared is None:
        return None
    problem = shared.problem()
    return {"place": shared.place, "up": problem is None, "problem": problem and problem.message}


async def replicas_seen(state):
    """The replicas sharing this one's Redis, as their heartbeats show them; this one alone without Redis (or while
    it cannot be reached), `this` marking it."""
    uptime = int(time.time()) - state.started
    here = {"name": state.shared.replica if state.shared else replica_name(), "uptime_s": uptime}
    if state.shared:
        with contextlib.suppress(Unshared):
            return [{**seen, "this": seen["name"] == here["name"]} for seen in await state.shared.replicas()]
    return [{**here, "this": True}]


async def admin_token_stats(request, edited):
    pool = pool_of(request, edited)
    return web.json_response({"mode": pool.name, "tokens": pool.stats()})


def pool_of(request, edited):
    """The pool an admin route edits, as its route says: the IFM keys, or the active mode's tokens."""
    state = request.app[STATE]
    return state.api.pool if edited is EditedPool.API else state.site.pool


async def admin_reset_token(request, edited):
    pool = pool_of(request, edited)
    index = request.match_info["index"]
    expect(WHOLE_NUMBER.fullmatch(index) and int(index) < len(pool.credentials),
           f"No {pool.noun} {index}: indexes go from 0 to {len(pool.credentials) - 1}" if pool.credentials
           else f"No {pool.noun} {index}: the {pool.name} pool is empty", "index")
    token = pool.credentials[int(index)]
    pool.reset(token)
    if pool.state(token, pool.clock()) is CredentialState.EXPIRED:
        expired = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(token.expires_at))
        return ok(f"Token {index} reset, but it stays expired: its JWT expired at {expired}; replace it in the "
                  "file (or let its account sign in again)")
    return ok(f"{pool.noun[:1].upper()}{pool.noun[1:]} {index} reset")


async def admin_reset_all(request, edited):
    pool = pool_of(request, edited)
    for token in pool.credentials:
        pool.reset(token)
    expired = pool.counts()["expired"]
    stays = f"; {expired} stay expired (their JWTs have expired): replace them in the file" if expired else ""
    return ok(f"All {len(pool.credentials)} {pool.noun}s reset{stays}")


async def admin_reload(request, edited):
    pool = pool_of(request, edited)
    await pool.reload(force=True)
    return ok(f"Reloaded {len(pool.credentials)} {pool.noun}s from {pool.file.path.name}", counts=pool.counts())


async def admin_token_content(request, edited):
    pool = pool_of(request, edited)
    text, _ = await asyncio.to_thread(pool.file.read)
    if text is None:
        raise ApiError(409, f"{pool.file.path.name} cannot be read; see the proxy's log", code="token_file_unreadable")
    return web.json_response({"mode": pool.name, "file": str(pool.file.path), "content": text,
                              "tokens": parse_tokens_file(text), "version": file_version(text)})


async def save_unless_changed(state, file, body, new_content, take):
    """Saves what `new_content` makes of the file's text, unless the file changed since the page loaded the
    `version` in `body` (a 409), and has `take` load what was written; a file that cannot be written is a 500 that
    says why."""
    version = body.get("version")
    expect(version is None or isinstance(version, str), "'version' must be a string", "version", "invalid_type")
    async with state.save_lock:
        try:
            content = await asyncio.to_thread(file.rewrite, new_content, version)
        except FileChanged:
            raise ApiError(409, f"{file.path.name} changed since it was loaded; load it again, then save",
                           param="version", code="file_changed") from None
        except OSError as exc:
            raise ApiError(500, f"Could not save {file.path.name}: {exc.strerror}", code="save_failed") from None
    take(content)
    return content


async def admin_update_tokens(request, edited):
    state = request.app[STATE]
    pool = pool_of(request, edited)
    body = await read_json(request)
    expect(isinstance(body, dict) and ("tokens" in body or "content" in body),
           "Send {\"tokens\": [...]} or {\"content\": \"...\"}", None, "invalid_type")
    tokens, content = body.get("tokens"), body.get("content")
    if "tokens" in body:
        expect(isinstance(tokens, list) and all(isinstance(t, str) and "\n" not in t for t in tokens),
               "'tokens' must be a list of strings without line breaks", "tokens", "invalid_type")
    else:
        expect(isinstance(content, str), "'content' must be a string", "content", "invalid_type")

    def new_content(current):
        return file_text(parse_tokens_file("\n".join(tokens)), current) if "tokens" in body else content

    content = await save_unless_changed(state, pool.file, body, new_content, pool.load)
    await state.fleet.publish_edit(pool.name, content)
    warnings = not_jwt_warnings(content) if pool is not state.api.pool else []
    return ok(f"Saved {len(pool.credentials)} {pool.noun}s to {pool.file.path.name}", counts=pool.counts(),
              version=file_version(content), warnings=warnings)


def not_jwt_warnings(content):
    """A warning for each token of a saved file that is not a JWT: it is kept (an operator may know better), but
    its expiry cannot be read and the site is likely to refuse it."""
    return [f"line {number}: {mask_token(line.strip())} is not a JWT with an expiry; it is saved and used, but the "
            "site usually refuses such a token"
            for number, line in enumerate(content.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#") and jwt_expiry(line.strip()) is None]


async def admin_check(request):
    """Runs the upstream check (or waits for the one under way) and answers its report."""
    state = request.app[STATE]
    if state.check_run is None or state.check_run.done():
        state.check_run = asyncio.ensure_future(check_upstream(state.settings, state.http))
    return web.json_response(await asyncio.shield(state.check_run), dumps=json_text)


async def admin_requests(request):
    """The request log, newest first; ?status=4xx, ?key=name and ?limit=N narrow it."""
    status, key, limit = (request.query.get(name) for name in ("status", "key", "limit"))
    expect(status in (None, "2xx", "4xx", "5xx"), "'status' must be 2xx, 4xx or 5xx", "status")
    expect(limit is None or (WHOLE_NUMBER.fullmatch(limit) and int(limit) > 0),
           "'limit' must be a whole number above 0", "limit")
    state = request.app[STATE]
    entries = requests_logged(await state.fleet.requests(), status, key)
    return web.json_response({"requests": list(itertools.islice(entries, int(limit) if limit else None))})


async def admin_history(request):
    """The last hour, minute by minute, for the admin page's charts."""
    return web.json_response({"minutes": request.app[STATE].monitor.last_hour()})


async def metrics(request):
    state = request.app[STATE]
    return web.Response(text=metrics_text(state.monitor, state.site.pool, state.accounts.results, state.api.pool,
                                          state.shared and state.shared.replica),
                        content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


async def admin_keys(request):
    """The named keys as loaded, and the version of the file they were loaded from (no file read per poll)."""
    keys = request.app[STATE].keys
    return web.json_response({"file": str(keys.file.path), "keys": keys.listed(request.app[STATE].monitor.keys),
                              "version": keys.file.version})


async def admin_update_keys(request):
    """Saves the named keys: each as {"name", "rpm", "concurrent"} and, for a new key or a new value, "key" (an
    existing key keeps its value when none is sent, so the page never needs to hold it)."""
    state = request.app[STATE]
    body = await read_json(request)
    expect(isinstance(body, dict) and isinstance(body.get("keys"), list), "Send {\"keys\": [...], \"version\": ...}",
           "keys", "invalid_type")
    known = {key.name: key.value for key in state.keys.named}
    keys = [key_of(entry, known, f"keys[{index}]") for index, entry in enumerate(body["keys"])]
    names = [key.name for key in keys]
    expect(len(set(names)) == len(names), "two keys have the same name", "keys")
    content = await save_unless_changed(state, state.keys.file, body, lambda current: file_text(
        map(api_key_line, keys), current), lambda content: state.keys.take(parse_api_keys_file(content)[0]))
    await state.fleet.publish_edit("api_keys", content)
    return ok(f"Saved {len(keys)} keys to {state.keys.file.path.name}", keys=state.keys.listed(state.monitor.keys),
              version=file_version(content))


def key_of(entry, known, where):
    """An ApiKey from the admin page's entry; its value is the one sent, else the one it had."""
    expect(isinstance(entry, dict) and isinstance(entry.get("name"), str) and KEY_NAME.fullmatch(entry["name"]),
           f"{where}.name must be a name of letters, digits, _ . @ -", f"{where}.name")
    value = entry.get("key") or known.get(entry["name"])
    expect(isinstance(value, str) and value and not any(c.isspace() for c in value),
           f"{where}.key is needed for a new key, without spaces", f"{where}.key")
    limits = [entry.get(name) for name in ("rpm", "concurrent")]
    expect(all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0) for v in limits),
           f"{where}: rpm and concurrent must be whole numbers above 0, or null", where)
    return ApiKey(entry["name"], value, *limits)


async def admin_accounts(request):
    return web.json_response({"accounts": request.app[STATE].accounts.stats()})


async def admin_switch_mode(request):
    site = request.app[STATE].site
    body = await read_json(request)
    mode = body.get("mode") if isinstance(body, dict) else None
    expect(mode in ("guest", "user"), "'mode' must be \"guest\" or \"user\"", "mode")
    site.mode = mode
    await site.pool.reload()
    if mode == "user":
        await request.app[STATE].models.refresh()
    log.info("switched to %s mode (%s)", mode, site.url)
    problem = site.pool.ready()
    warning = f"; but no request can be served now: {problem.message}" if problem else ""
    return ok(f"Switched to {mode} mode{warning}", mode=mode, upstream_url=site.url,
              warnings=[problem.message] if problem else [])


# ─── Server ──────────────────────────────────────────────────────────────────
# The connection layer under aiohttp's application: a deadline for a new
# connection's headers, a cap on open connections (at which the one idle
# longest makes room), a short idle timeout for connections that showed no
# key, malformed HTTP answered without echo, running out of file descriptors
# logged once a minute, and serve(), which runs an application until SIGINT or
# SIGTERM, then drains it.

class Connections:
    """The client connections open, against the cap."""

    def __init__(self, cap):
        self.cap = cap
        self.open: set[ClientConnection] = set()

    def make_room(self):
        """Closes the connection that has waited longest for a request, so that idle sockets cannot lock clients
        out; False when every one is busy with a request."""
        waiting = [connection for connection in self.open if connection.waiting()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda connection: connection.heard)
        self.open.discard(oldest)
        oldest.force_close()
        return True


KEYLESS_IDLE_SECONDS = 2  # a connection idle this long is closed until a request on it has shown a valid key


BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class ClientConnection(web.RequestHandler):
    """aiohttp's handler of one client connection, with what aiohttp lacks: a deadline for the first request's
    headers (aiohttp's keep-alive timer covers the requests after it), a cap on open connections (at the cap the
    connection idle longest is closed; when all are busy, one more is answered 503 and closed at once, not queued),
    KEYLESS_IDLE_SECONDS between requests until one shows a valid key, and errors for malformed HTTP that echo none
    of its bytes."""

    def __init__(self, manager, connections, header_timeout, **handler_args):
        super().__init__(manager, loop=asyncio.get_running_loop(), **handler_args)
        self.connections = connections
        self.header_timeout = header_timeout
        self.refused = False
        self.deadline = None
        self.tail = b""  # the first request's last bytes so far, to find the end of its headers across reads
        self.keyed = False  # a request on it has shown a valid key: it may idle for IDLE_TIMEOUT
        self.heard = 0.0  # the loop's time when its last bytes arrived
        self.idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        connections = self.connections
        if len(connections.open) >= connections.cap and not connections.make_room():
            self.refused = True
            body = json.dumps(openai_error_body(ApiError(503, "Too many connections; try again in a moment",
                                                         code="too_many_connections"))).encode()
            transport.write(BUSY_ANSWER % (len(body), body))
            transport.close()
            return
        connections.open.add(self)
        super().connection_made(transport)
        self.heard = self._loop.time()
        self.deadline = self._loop.call_later(self.header_timeout, self.force_close)

    def data_received(self, data):
        self.heard = self._loop.time()
        if self.deadline:
            seen = self.tail + data
            if HEADERS_END in seen:
                self.deadline.cancel()
                self.deadline = None
            self.tail = seen[-len(HEADERS_END) + 1:]
        super().data_received(data)

    def connection_lost(self, exc):
        if self.refused:
            return
        self.connections.open.discard(self)
        for timer in (self.deadline, self.idle_timer):
            if timer:
                timer.cancel()
        super().connection_lost(exc)

    def waiting(self):
        """Whether it waits for a request (its first, or the next), by aiohttp's own test for an idle connection."""
        return self._waiter is not None and not self._messages

    def request_ended(self):
        """Until a request on it has shown a valid key, it is closed once idle for KEYLESS_IDLE_SECONDS."""
        if not self.keyed:
            if self.idle_timer:
                self.idle_timer.cancel()
            self.idle_timer = self._loop.call_later(KEYLESS_IDLE_SECONDS, self.close_if_waiting)

    def close_if_waiting(self):
        if self.waiting():
            self.force_close()

    def handle_error(self, request, status=500, exc=None, message=None):
        """Malformed HTTP: an OpenAI error naming the fault, without a byte of what was sent (aiohttp echoes it)."""
        what = MALFORMED.get(type(exc).__name__, "the request is not well-formed HTTP")
        error = ApiError(status, f"Malformed HTTP request: {what}", code="malformed_request")
        return web.json_response(openai_error_body(error), status=status, headers={"Connection": "close"})


HEADERS_END = b"\r\n\r\n"
MALFORMED = {"LineTooLong": "a line is too long", "BadStatusLine": "not an HTTP request line",
             "BadHttpMethod": "not an HTTP method", "InvalidHeader": "a header is not well-formed",
             "InvalidURLError": "the URL is not well-formed", "TransferEncodingError": "a bad chunked body",
             "ContentLengthError": "the body does not match its Content-Length"}
FD_LOG_INTERVAL = 60  # seconds between two log lines about running out of file descriptors


def connection_cap(settings):
    """MAX_CONNECTIONS, or three quarters of the open-files limit, which leaves room for upstream and files."""
    if settings.max_connections:
        return settings.max_connections
    try:
        import resource  # POSIX only
        return max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] * 3 // 4)
    except (ImportError, ValueError):
        return 1000


def quiet_accept_errors(loop, stopping):
    """Reports running out of file descriptors once a minute, not a traceback per refused accept; once `stopping`
    is set, what fails in callbacks (asyncio retrying accepts on the closed socket) is only shutdown noise."""
    last = [-FD_LOG_INTERVAL]

    def handle(loop, context):
        if stopping.is_set():
            return log.debug("after shutdown began: %s (%s)", context.get("message"), context.get("exception"))
        if not context.get("message", "").startswith("socket.accept() out of system resource"):
            return loop.default_exception_handler(context)
        if loop.time() - last[0] >= FD_LOG_INTERVAL:
            last[0] = loop.time()
            log.error("out of file descriptors: new connections wait (%s); raise `ulimit -n`, or lower "
                      "MAX_CONNECTIONS", context.get("exception"))
    loop.set_exception_handler(handle)


def reachable_url(settings):
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else "[::1]" if settings.host == "::" else settings.host
    return f"http://{host}:{settings.port}"


async def serve(app, settings):
    """Runs the app until SIGINT or SIGTERM, with ClientConnection's limits; says so once it listens."""
    loop, stopping = asyncio.get_running_loop(), asyncio.Event()
    quiet_accept_errors(loop, stopping)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    handlers = runner.server
    assert handlers is not None, "set by setup()"
    connections = Connections(connection_cap(settings))
    try:
        server = await loop.create_server(lambda: ClientConnection(
            handlers, connections, settings.header_timeout, keepalive_timeout=settings.idle_timeout,
            access_log=None, **HANDLER_ARGS), settings.host, settings.port, reuse_address=True,
            reuse_port=settings.workers > 1)
    except OSError:
        await runner.cleanup()
        raise
    listening = " (and on every address of this machine)" if settings.host in ("0.0.0.0", "::", "") else ""
    log.info("k2proxy %s listening on %s%s; admin page %s%s", __version__, reachable_url(settings), listening,
             reachable_url(settings), settings.admin_page_path)
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopping.set)
    await stopping.wait()
    state = app[STATE]
    log.info("k2proxy stopping: %d requests in flight get %g s to finish (SHUTDOWN_GRACE); new connections are "
             "refused", state.handling.count, settings.shutdown_grace)
    server.close()
    handlers.pre_shutdown()  # idle keep-alive connections close now, the others once their request ends
    await state.handling.drain(settings.shutdown_grace)
    if state.handling.count:
        log.info("k2proxy stopping: %d requests still running end now", state.handling.count)
    await runner.cleanup()  # the upstream side closes: streams still running get their error event
    log.info("k2proxy stopped")


SHUTDOWN_SECONDS = 5  # what streams still running after SHUTDOWN_GRACE get to write their end
# read_json refuses compressed bodies before anything is unpacked; a body left unread (an unknown key's, one
# over MAX_REQUEST_MB) is not drained afterwards, as aiohttp would for ten seconds: the connection just ends.
HANDLER_ARGS = {"auto_decompress": False, "lingering_time": 0}


# ─── Routes and middlewares ──────────────────────────────────────────────────
# The routes, each saying everything about itself: its handler, who may call it
# (its Auth), the dialect its errors are shaped in, how it counts, the pool a
# token admin route edits; the middlewares (keys, errors, the request's record
# and log line, CORS); make_app(settings), for main() and the tests.


async def describe_routes(request):
    state = request.app[STATE]
    return web.json_response({"name": "k2proxy", "version": __version__,
                              "description": "K2 Horizon behind the OpenAI chat completions, OpenAI Responses and "
                                             "Anthropic Messages APIs",
                              "endpoints": [f"{route.method} {route.shown_path or route.path}" for route in ROUTES
                                            if route.listed]
                              + [f"GET {state.settings.admin_page_path}"]})


async def health(request):
    """ok (200) when a request could be served now; degraded (503, for load balancers and Docker) when not; degraded
    but 200 while only Redis is missing, as this replica still serves."""
    state = request.app[STATE]
    problem = state.ready_upstreams()[0].pool.ready() or unreachable(state.http)
    shared_problem = state.shared and state.shared.problem()
    body = {"status": "degraded" if problem or shared_problem else "ok", "version": __version__,
            "upstream": state.settings.upstream, "mode": state.site.mode, "tokens": state.site.pool.counts()}
    if state.api in state.upstreams:
        body["ifm_keys"] = state.api.pool.counts()
    if state.shared:
        body["redis"] = "unreachable" if shared_problem else "ok"
    if problem or shared_problem:  # Redis's place and error are the admin's (GET /admin/status), not the public's
        body["reason"] = "; ".join(filter(None, (problem and problem.message, shared_problem and REDIS_DOWN_PUBLIC)))
    return web.json_response(body, status=503 if problem else 200)


REDIS_DOWN_PUBLIC = "Redis cannot be reached: this replica serves from its own state (details: GET /admin/status)"
UNREACHABLE_DEGRADED = 3  # connection failures in a row after which /health says degraded


def unreachable(http):
    """The problem of an upstream that refused the last connections, or None."""
    if http.unreachable < UNREACHABLE_DEGRADED:
        return None
    return ApiError(503, f"upstream {http.unreachable_host} cannot be reached ({http.unreachable} connection "
                         "failures in a row); run python k2proxy.py --check", code="upstream_unreachable")


class Auth(enum.Enum):
    """Who may call a route."""
    PUBLIC = "public"    # anyone
    API = "api"          # a client with an API key (a CORS preflight needs none)
    ADMIN = "admin"      # the admin, with ADMIN_KEY
    METRICS = "metrics"  # a scraper, with METRICS_KEY or the admin key


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: typing.Callable[[web.Request], typing.Awaitable[web.StreamResponse]]
    auth: Auth
    dialect: Dialect = OPENAI
    completion: bool = False  # counts in the request figures, and against its key's limits
    listed: bool = True       # named by GET /
    limited: bool = False     # counts against its key's rpm and concurrent limits, though no completion
    pool: EditedPool | None = None  # the pool a token admin route edits
    shown_path: str = ""      # how GET / names it, when not by its path

    @property
    def keyed_limits(self):
        return self.completion or self.limited


def admin_routes(prefix, pool):
    """The routes of one pool's tokens on the admin API, each handler told which pool it edits."""
    def route(method, path, handler):
        return Route(method, prefix + path, functools.partial(handler, edited=pool), Auth.ADMIN, listed=False,
                     pool=pool)
    return (route("GET", "/stats", admin_token_stats), route("GET", "/content", admin_token_content),
            route("POST", "/update", admin_update_tokens), route("POST", "/reset-all", admin_reset_all),
            route("POST", "/reset/{index}", admin_reset_token), route("POST", "/reload", admin_reload))


ROUTES = (
    Route("GET", "/", describe_routes, Auth.PUBLIC, listed=False),
    Route("GET", "/health", health, Auth.PUBLIC),
    Route("POST", "/v1/chat/completions", completion_handler(OPENAI), Auth.API, completion=True),
    Route("POST", "/v1/messages", completion_handler(ANTHROPIC), Auth.API, ANTHROPIC, completion=True),
    Route("POST", "/v1/messages/count_tokens", count_message_tokens, Auth.API, ANTHROPIC, limited=True),
    Route("POST", "/v1/responses", completion_handler(RESPONSES), Auth.API, RESPONSES, completion=True),
    Route("POST", "/v1/responses/compact", compact_response, Auth.API, RESPONSES, completion=True),
    Route("GET", "/v1/responses", responses_socket, Auth.API, RESPONSES, shown_path=SOCKET_ROUTE),
    Route("GET", "/v1/responses/{id}", get_response, Auth.API, RESPONSES, limited=True),
    Route("DELETE", "/v1/responses/{id}", delete_response, Auth.API, RESPONSES, limited=True),
    Route("GET", "/v1/models", list_models, Auth.API),
    Route("GET", "/v1/models/{model:.+}", get_model, Auth.API, shown_path="/v1/models/{id}"),
    Route("GET", "/admin/status", admin_status, Auth.ADMIN, listed=False),
    *admin_routes("/admin/tokens", EditedPool.SITE),
    Route("POST", "/admin/switch_mode", admin_switch_mode, Auth.ADMIN, listed=False),
    *admin_routes("/admin/ifm-keys", EditedPool.API),
    Route("GET", "/admin/accounts", admin_accounts, Auth.ADMIN, listed=False),
    Route("POST", "/admin/check", admin_check, Auth.ADMIN, listed=False),
    Route("GET", "/admin/requests", admin_requests, Auth.ADMIN, listed=False),
    Route("GET", "/admin/history", admin_history, Auth.ADMIN, listed=False),
    Route("GET", "/admin/keys", admin_keys, Auth.ADMIN, listed=False),
    Route("POST", "/admin/keys/update", admin_update_keys, Auth.ADMIN, listed=False),
    Route("GET", "/metrics", metrics, Auth.METRICS),
)
ROUTE_OF = web.AppKey("route_of", dict)  # (aiohttp's resource, method) → its Route, for the middlewares


async def unrouted(request):
    """The handler of no route: aiohttp answers an unknown path or method before any handler would run."""
    raise web.HTTPNotFound()


API_PREFIX, ADMIN_PREFIX = "/v1/", "/admin/"  # where an unknown path needs the API's key, or the admin's
UNROUTED_FAMILIES = {"/messages": ANTHROPIC, "/responses": RESPONSES}  # what clients of a path's family read


def route_of(request):
    """The route a request came by; for an unknown path or method, one whose errors its family's clients read
    (with or without /v1, or with it twice), and that needs the key of the routes it lies among."""
    method = "GET" if request.method == "HEAD" else request.method
    route = request.app[ROUTE_OF].get((request.match_info.route.resource, method))
    if route:
        return route
    path = request.path
    auth = Auth.API if path.startswith(API_PREFIX) else Auth.ADMIN if path.startswith(ADMIN_PREFIX) else Auth.PUBLIC
    while path.startswith(API_PREFIX):
        path = path[len(API_PREFIX) - 1:]
    dialect = next((d for prefix, d in UNROUTED_FAMILIES.items() if path.startswith(prefix)), OPENAI)
    return Route("", "", unrouted, auth, dialect)


def bearer(request):
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def presented_key(request):
    """The key a client sent: as a Bearer token, or in x-api-key as Anthropic's clients send it."""
    return bearer(request) or request.headers.get("x-api-key", "").strip()


HTTP_ERROR_MESSAGES = {404: "Unknown route: {method} {path}", 405: "Method {method} is not allowed on {path}"}
ROUTE_HINT_CUTOFF = 0.75  # how alike an unknown path must be to a route to be suggested


def route_hint(method, path):
    """What the client likely meant by an unknown path: a base URL without /v1, one with /v1 twice (Anthropic
    clients add /v1 themselves), or a path close to a route's; "" when nothing is close."""
    known = [route.path for route in ROUTES if route.method == method and "{" not in route.path]
    if path.startswith("/v1/v1/") and path[3:] in known:
        return (f"; did you mean {method} {path[3:]}? The client adds /v1 to a base URL that has it already: "
                "remove /v1 from the base URL (ANTHROPIC_BASE_URL is the proxy's address alone)")
    if not path.startswith("/v1/") and "/v1" + path in known:
        return (f"; did you mean {method} /v1{path}? Put /v1 at the end of the client's base URL "
                "(OpenAI clients: http://host:8001/v1)")
    close = difflib.get_close_matches(path, known, n=1, cutoff=ROUTE_HINT_CUTOFF)
    return f"; did you mean {method} {close[0]}?" if close else ""


@web.middleware
async def handle_errors(request, handler):
    """Opens the request's record, answers every failure in its route's dialect, and logs one line per request."""
    state = request.app[STATE]
    route = route_of(request)
    record = request[RECORD] = RequestRecord(request.method, request.path, route.dialect.name, route.completion,
                                             time.monotonic(), route=route.path)
    state.monitor.begin(record)
    try:
        with state.handling.one():
            response = await handler(request)
    except ApiError as error:
        response = route.dialect.error_response(error)
        record.reason = record.reason or error.code
    except web.HTTPException as exc:
        message = HTTP_ERROR_MESSAGES.get(exc.status, exc.reason).format(method=request.method, path=request.path)
        if exc.status == 404:
            message += route_hint(request.method, request.path)
        record.reason = exc.reason.lower().replace(" ", "_")
        response = route.dialect.error_response(ApiError(exc.status, message, code=record.reason))
    except asyncio.CancelledError:
        record.outcome = Outcome.CLIENT_GONE
        state.finish(record, CLIENT_GONE_STATUS)
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        record.reason = "internal_error"
        response = route.dialect.error_response(ApiError(500, "Internal error; see the proxy's log",
                                                         code=record.reason))
    state.finish(record, response.status)
    return response


@web.middleware
async def check_keys(request, handler):
    """Asks each request for the key its route's auth names (a CORS preflight of the API for none); a connection
    whose requests show none is closed sooner once idle."""
    # a ClientConnection under serve(); aiohttp's own in the tests' in-process servers
    connection = request.protocol if isinstance(request.protocol, ClientConnection) else None
    try:
        return await admitted(request, handler, connection)
    finally:
        if connection:
            connection.request_ended()


async def admitted(request, handler, connection):
    """The handler's answer, once the request has shown the key its route asks for (it marks the connection)."""
    settings, auth = request.app[STATE].settings, route_of(request).auth
    if auth is Auth.API and request.method == "OPTIONS":
        return preflight(request)
    if auth is Auth.API:
        await admit_key(request)
    elif auth is Auth.METRICS:
        if matching_key(bearer(request), [key for key in (settings.admin_key, settings.metrics_key) if key]) is None:
            raise ApiError(401, "Invalid or missing key: send Authorization: Bearer <METRICS_KEY> (or the admin key)",
                           code="invalid_metrics_key")
    elif auth is Auth.ADMIN and matching_key(bearer(request), [settings.admin_key]) is None:
        raise ApiError(401, "Invalid or missing admin key: send Authorization: Bearer <ADMIN_KEY>",
                       code="invalid_admin_key")
    if connection and auth is not Auth.PUBLIC:
        connection.keyed = True
    return await handler(request)


async def admit_key(request):
    """Finds the request's API key, and counts a request of a limited route against its limits (a 429 when over
    one), from its headers on: an upload under way holds one of its key's concurrent slots."""
    state, record = request.app[STATE], request[RECORD]
    key = state.keys.find(presented_key(request))
    if key is None:
        raise ApiError(401, "Invalid or missing API key: send Authorization: Bearer <key> (or x-api-key: <key>)",
                       code="invalid_api_key")
    record.key, record.api_key, record.client = key.name, key, hashlib.sha256(key.value.encode()).hexdigest()[:32]
    if route_of(request).keyed_limits:
        record.slot = await state.keys.admit(key)


def allowed_origin(request, origins):
    origin = request.headers.get("Origin")
    if not origin or route_of(request).auth is not Auth.API:
        return None
    return "*" if "*" in origins else origin if origin in origins else None


async def add_cors_headers(request, response):
    origin = allowed_origin(request, request.app[STATE].settings.cors_origins)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        if origin != "*":
            response.headers["Vary"] = "Origin"


CORS_REQUEST_HEADERS = re.compile(  # what a browser client of the API may send: its key, its dialect's own
    r"authorization|content-type|accept|x-api-key|anthropic-[a-z0-9-]+|openai-[a-z0-9-]+|x-stainless-[a-z0-9-]+"
    r"|x-session-id|session_id|conversation_id|x-claude-code-[a-z0-9-]+|x-request-id")
CORS_ASKED_CHARS = 4096  # of Access-Control-Request-Headers read


def preflight(request):
    """Answers a browser's CORS preflight for any /v1 path, before routing."""
    if not allowed_origin(request, request.app[STATE].settings.cors_origins):
        raise ApiError(403, "This origin may not call the API; see CORS_ORIGINS", code="origin_not_allowed")
    asked = request.headers.get("Access-Control-Request-Headers", "")[:CORS_ASKED_CHARS]
    allowed = [name.strip() for name in asked.split(",") if CORS_REQUEST_HEADERS.fullmatch(name.strip().lower())]
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": ", ".join(dict.fromkeys(allowed)) or "Authorization, Content-Type",
        "Access-Control-Max-Age": "86400"})


async def start_up(app):
    state = app[STATE]
    state.admin_page = await read_admin_page()
    await state.start()


async def shut_down(app):
    await app[STATE].stop()


async def clean_up(app):
    await app[STATE].close()


def make_app(settings):
    """The whole proxy as an aiohttp application, for `main()` and for tests."""
    app = web.Application(middlewares=[handle_errors, check_keys],
                          client_max_size=int(settings.max_request_mb * MB), handler_args=HANDLER_ARGS)
    app[STATE] = AppState(settings)
    admin = settings.admin_page_path
    if admin.startswith("/v1/") or any(route.path == admin for route in ROUTES):
        raise SettingsError(f"setting ADMIN_PAGE_PATH={admin!r} is a path the proxy already serves")
    routes = [*ROUTES, Route("GET", admin, admin_page, Auth.PUBLIC, listed=False)]
    app[ROUTE_OF] = {}
    for route in routes:
        if route.method == "GET":
            added = app.router.add_get(route.path, route.handler)  # HEAD too
        else:
            added = app.router.add_route(route.method, route.path, route.handler)
        app[ROUTE_OF][added.resource, route.method] = route
    app.on_response_prepare.append(add_cors_headers)
    app.on_startup.append(start_up)
    app.on_shutdown.append(shut_down)
    app.on_cleanup.append(clean_up)
    return app


# ─── Processes ───────────────────────────────────────────────────────────────
# What runs: main(), which only parses arguments and starts the proxy (or
# --check), in one process or in WORKERS of them on one port.


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="k2proxy.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="K2 Horizon behind the OpenAI chat completions, OpenAI Responses and Anthropic Messages APIs, "
                    "from the K2Think web site, IFM's API or a self-hosted server. Configure with environment "
                    "variables or ./.env.",
        epilog=settings_help())
    parser.add_argument("--env-file", help="file of KEY=value settings (default: ./.env when there is one)")
    parser.add_argument("--check", action="store_true", help="probe the upstream, print what works and what to set, "
                                                             "and exit: 0 when chat works, 1 when not")
    parser.add_argument("--json", action="store_true", help="with --check: the report as one JSON document")
    parser.add_argument("--version", action="version", version=f"k2proxy {__version__}")
    args = parser.parse_args(argv)
    env_file = Path(args.env_file or ".env")
    try:
        if args.env_file and not env_file.is_file():
            raise SettingsError(f"--env-file {args.env_file}: no such file")
        settings = load_settings(os.environ, env_file.read_text(encoding="utf-8") if env_file.is_file() else None,
                                 kept_key, kept_seal_key)
        app = make_app(settings)
    except (SettingsError, UnicodeDecodeError) as exc:
        print(f"k2proxy: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return asyncio.run(run_check(settings, args.json))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s " + (
        "[%(process)d] " if settings.workers > 1 else "") + "%(message)s")
    for warning in settings.warnings:
        log.warning("%s", warning)
    if settings.api_key_generated:
        print(f"WARNING: VALID_API_KEY is not set. Using the generated API key kept in {settings.generated_key_file} "
              f"(readable by you only), which is also the admin key of the admin page ({reachable_url(settings)}"
              f"{settings.admin_page_path}); set VALID_API_KEY to choose your own:\n  {settings.valid_api_key[0]}",
              file=sys.stderr, flush=True)
    return run_workers(settings) if settings.workers > 1 else run_server(app, settings)


def run_server(app, settings):
    """Serves until SIGINT or SIGTERM; 1 when the port cannot be listened on."""
    try:
        asyncio.run(serve(app, settings))
    except OSError as exc:  # the address is taken, or HOST is not an address of this machine
        print(f"k2proxy: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return CANNOT_LISTEN
    return 0


WORKER_RESTART_SECONDS = 1  # before a worker that died is started again
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
CANNOT_LISTEN, WORKER_FAILED = 1, 70  # exit codes: the port cannot be listened on; a worker failed otherwise


def run_workers(settings):
    """WORKERS processes, each a replica serving the one port (SO_REUSEPORT); this one hands SIGINT and SIGTERM on
    to them, starts again one that dies, and ends when they all have after a signal."""
    workers, stopping = {}, []

    def start_worker():
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until the worker has its own handlers
        pid = os.fork()
        if pid == 0:  # the worker: a whole proxy of its own, which never returns into this loop
            code = WORKER_FAILED
            try:
                for signal_number in STOP_SIGNALS:
                    signal.signal(signal_number, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                code = run_server(make_app(settings), settings)
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                os._exit(code)
        workers[pid] = True
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def stop(signal_number, _frame):
        stopping.append(signal_number)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, stop)
    log.info("k2proxy starting %d workers on port %d", settings.workers, settings.port)
    for _ in range(settings.workers):
        start_worker()
    failed = False
    while workers:
        pid, status = os.wait()
        workers.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if not stopping and code == CANNOT_LISTEN:  # another start would fail alike
            failed = True
            stop(signal.SIGTERM, None)
        elif not stopping:
            log.warning("worker %d ended (exit code %d); starting another in %d s", pid, code, WORKER_RESTART_SECONDS)
            time.sleep(WORKER_RESTART_SECONDS)
            if not stopping:  # a signal during the pause ends the workers instead
                start_worker()
    return CANNOT_LISTEN if failed else 0


if __name__ == "__main__":
    sys.exit(main())
