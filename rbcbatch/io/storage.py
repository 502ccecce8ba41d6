"""Storage options for object stores: from the AWS environment, safe to log, with clear errors.

Every reader and writer of rbcbatch goes through fsspec and takes `storage_options`. For s3://
URLs this module builds them from the usual AWS environment variables, merged under the options
a caller gives, and adds what a batch run needs from s3fs:

- a small read block, so random access (Zarr chunks, TIFF tiles) fetches kilobytes, not the
  default's 50 MiB readahead;
- retries of transient errors with backoff (botocore "standard" mode: throttling, 5xx, dropped
  and refused connections, timeouts), on top of s3fs's own retries of broken responses;
- no listings cache: a run folder is written by many processes, and a cached listing would hide
  their commits from the driver and the views.

The options are resolved once, on the driver, and travel to every Ray actor with the task, so
workers need no environment of their own. Credentials are never logged or written: use
`redacted` to show options, and `scrub` on any text that might quote them.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping

from rbcbatch.errors import RbcbatchError

S3_PROTOCOLS = ("s3", "s3a")

# Read block for s3 files opened with fsspec: 256 KiB. The s3fs default (50 MiB) made one
# 1024² region read of a tiled TIFF download 356 MB; whole-image reads are one request either way.
S3_BLOCK_SIZE = 256 * 1024
# Attempts per request, the first included. botocore's standard mode backs off exponentially with
# jitter (up to 1, 2, 4, 8 s): an endpoint that stays away failed a request after 2-10 s here.
S3_MAX_ATTEMPTS = 5
# Seconds to wait for a connection and for a response (botocore's defaults are 60 and 60).
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60

# Environment variable -> (path in the s3fs options). Later names lose to earlier ones.
S3_ENVIRONMENT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("AWS_ACCESS_KEY_ID", ("key",)),
    ("AWS_SECRET_ACCESS_KEY", ("secret",)),
    ("AWS_SESSION_TOKEN", ("token",)),
    ("AWS_ENDPOINT_URL_S3", ("client_kwargs", "endpoint_url")),
    ("AWS_ENDPOINT_URL", ("client_kwargs", "endpoint_url")),
    ("AWS_REGION", ("client_kwargs", "region_name")),
    ("AWS_DEFAULT_REGION", ("client_kwargs", "region_name")),
)

# Option names whose values are credentials (compared lower-case, as a whole name or a suffix).
SECRET_NAMES = (
    "key",
    "secret",
    "token",
    "password",
    "access_key_id",  # also matches aws_access_key_id, and so on
    "secret_access_key",
    "session_token",
    "sas_token",
    "account_key",
    "credentials",
)
REDACTED = "***"
# errno values of failed I/O: s3fs raises OSError(EREMOTEIO) for a 5xx answer, EIO for others.
IO_ERRNOS = (errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO))
# errno values that say the destination cannot take more writes (full, over quota, read-only):
# no slide can be committed until someone frees space, so the run stops instead of recording
# every remaining slide as failed.
FULL_OR_READ_ONLY_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class StorageError(RbcbatchError):
    """The object store could not be reached or refused access; nothing was lost."""


def protocol(url: str) -> str:
    """The fsspec protocol of a URL ("file" for plain paths)."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_s3(url: str) -> bool:
    return protocol(url) in S3_PROTOCOLS


def s3_defaults() -> dict:
    """The s3fs options every rbcbatch run uses unless the caller overrides them."""
    return {
        "default_block_size": S3_BLOCK_SIZE,
        "use_listings_cache": False,
        "config_kwargs": {
            "retries": {"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS},
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "read_timeout": S3_READ_TIMEOUT_S,
        },
    }


def s3_environment(env: Mapping[str, str] | None = None) -> dict:
    """s3fs options from AWS_* environment variables (the first one set of each kind wins)."""
    env = os.environ if env is None else env
    options: dict = {}
    for name, path in reversed(S3_ENVIRONMENT):
        if env.get(name):
            _set(options, path, env[name])
    return options


def merge(base: Mapping, override: Mapping) -> dict:
    """Nested merge: dictionaries merge key by key, any other value of `override` wins."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_options(
    explicit: Mapping | None, *urls: str, env: Mapping[str, str] | None = None
) -> dict:
    """The fsspec options for work touching these URLs.

    When any URL is s3://: rbcbatch's s3 defaults, then the AWS environment, then `explicit`
    (nested dictionaries merge; resolving twice changes nothing). Otherwise `explicit` alone:
    local paths need none.
    """
    explicit = dict(explicit or {})
    if not any(is_s3(u) for u in urls if u):
        return explicit
    return merge(merge(s3_defaults(), s3_environment(env)), explicit)


def parse_option(text: str) -> tuple[tuple[str, ...], object]:
    """`name=value` from the command line; dotted names nest, values are JSON when they parse.

    "client_kwargs.endpoint_url=http://127.0.0.1:9000" -> (("client_kwargs", "endpoint_url"), ...)
    "anon=true" -> (("anon",), True); "default_block_size=1048576" -> an int.
    """
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"storage option {text!r} is not name=value (e.g. anon=true)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return tuple(part.strip() for part in name.split(".")), value


def options_from_cli(pairs: list[str] | None) -> dict:
    """The explicit options of repeated `--storage-option name=value` arguments."""
    options: dict = {}
    for text in pairs or []:
        path, value = parse_option(text)
        _set(options, path, value)
    return options


def _set(options: dict, path: tuple[str, ...], value: object) -> None:
    for part in path[:-1]:
        options = options.setdefault(part, {})
    options[path[-1]] = value


def is_secret_name(name: str) -> bool:
    lowered = str(name).lower()
    return any(lowered == s or lowered.endswith("_" + s) for s in SECRET_NAMES)


def redacted(options: Mapping) -> dict:
    """A copy of the options fit for logs: every credential value replaced by ***."""
    out: dict = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out[key] = redacted(value)
        elif is_secret_name(key) and value not in (None, ""):
            out[key] = REDACTED
        else:
            out[key] = value
    return out


def secret_values(options: Mapping) -> list[str]:
    """The credential strings held in the options, longest first."""
    found: list[str] = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            found.extend(secret_values(value))
        elif is_secret_name(key) and isinstance(value, str) and value:
            found.append(value)
    return sorted(set(found), key=len, reverse=True)


def scrub(text: str | None, options: Mapping | None) -> str | None:
    """Text with any credential of the options replaced by ***, for messages that get stored."""
    if not text:
        return text
    for secret in secret_values(options or {}):
        text = text.replace(secret, REDACTED)
    return text


def storage_cause(exc: BaseException) -> BaseException | None:
    """The storage error behind an exception (through Ray's and Python's chaining), if any.

    Those are botocore's errors (no endpoint, no credentials, timeouts), aiohttp's connection
    errors, refused access (PermissionError, what s3fs raises for a 403), timeouts and failed
    I/O (EIO). A missing file is not one: callers report that themselves, with its name.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        inner = getattr(e, "cause", None)  # a Ray task error carries the worker's exception
        if isinstance(inner, BaseException):
            todo.append(inner)
            continue
        if _is_storage_error(e):
            return e
        todo.extend([e.__cause__, e.__context__])
    return None


def destination_unwritable(exc: BaseException) -> bool:
    """Whether an error means the run folder cannot be written at all (no space, over quota,
    read-only), through Ray's and Python's chaining: a reason to stop the run, not a slide's
    failure."""
    cause = storage_cause(exc)
    return cause is not None and _unwritable(cause)


def _unwritable(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT/EROFS, also where a library (pyarrow, zarr) kept only the errno's text."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in FULL_OR_READ_ONLY_ERRNOS or any(
        os.strerror(code) in str(exc) for code in FULL_OR_READ_ONLY_ERRNOS
    )


def _is_storage_error(exc: BaseException) -> bool:
    if isinstance(exc, PermissionError | TimeoutError):
        return True
    if _unwritable(exc):
        return True
    if isinstance(exc, OSError) and exc.errno in IO_ERRNOS:
        return True  # how s3fs reports a failed request (5xx after retries)
    module = type(exc).__module__ or ""
    return module.startswith(("botocore", "aiobotocore", "aiohttp"))


def explain(exc: BaseException, urls: list[str], options: Mapping | None = None) -> str:
    """A message a person can act on for an object-store error while working on `urls`."""
    where = ", ".join(urls)
    reason = scrub(f"{type(exc).__name__}: {exc}", options)
    refused = isinstance(exc, PermissionError) or "AccessDenied" in str(exc)
    text = str(exc)
    if os.strerror(errno.ENOSPC) in text or os.strerror(errno.EDQUOT) in text:
        hint = (
            "no space left on the device (or quota) holding the run folder: free space or move "
            "the run folder, then run the same command again; committed slides are kept"
        )
    elif os.strerror(errno.EROFS) in text:
        hint = "the run folder is on a read-only file system: give an --out that can be written"
    elif refused and any(is_s3(u) for u in urls):
        hint = (
            "the store refused the request: check that the credentials (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or --storage-option key=... secret=...) "
            "may read and write there"
        )
    elif refused:
        hint = "permission denied: check that this user may read and write there"
    elif "credential" in str(exc).lower():
        hint = "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    else:
        hint = (
            "the store failed or did not answer (after retries); nothing committed is lost: "
            "run the same command again when it is back"
        )
    return f"storage error on {where}: {reason}; {hint}"


def explains_storage_errors(*url_params: str) -> Callable:
    """Decorator: object-store errors leave the function as StorageError naming its URLs.

    `url_params` names the function's parameters holding the URLs worth naming in the message;
    a `storage_options` parameter, when present, is used to scrub credentials from it.
    """

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RbcbatchError:
                raise
            except Exception as exc:
                cause = storage_cause(exc)
                if cause is None:
                    raise
                bound = signature.bind_partial(*args, **kwargs).arguments
                urls = [str(bound[p]) for p in url_params if bound.get(p)]
                options = resolve_options(bound.get("storage_options"), *urls)
                raise StorageError(explain(cause, urls, options)) from exc

        return wrapper

    return decorate
