"""One-line errors: how exceptions become the single line a user reads.

- :func:`exception_line`: an exception's message squeezed onto one line (library messages that quote a cause).
- :func:`user_error_line` / :func:`is_user_error`: what the command-line tools print for an error the user can fix
  (bad input, bad config, a full disk), instead of a traceback from deep inside torch.
- :func:`one_line_errors` / :func:`config_errors_one_line`: the decorators every ``exem-*`` entry point wears
  (errors of the run, and Hydra's configuration errors).
- :func:`unknown_key_line`: a misspelt option names the options spelt alike ("did you mean 'input'?"); another
  command's config group is refused as such.
"""

from __future__ import annotations

import difflib
import errno
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Collection
from typing import Any

__all__ = [
    "USER_ERRORS",
    "OtherRankError",
    "config_error_line",
    "config_errors_one_line",
    "exception_line",
    "is_user_error",
    "one_line_errors",
    "unknown_key_line",
    "user_error",
    "user_error_line",
]

log = logging.getLogger("exem")

# An unknown config key with no key spelt alike lists the known ones, at most this many.
MAX_KNOWN_SHOWN = 20


class OtherRankError(RuntimeError):
    """Under DDP another rank failed and this one stopped too (:mod:`exem.inference.ranks`). Printed in one line:
    the failed rank prints its own error."""


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OtherRankError)
# OSErrors about the user's environment (space, quota, permissions, paths): reported in one line.
_ENV_ERRNOS = ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EISDIR")
USER_OS_ERRNOS = frozenset(getattr(errno, name) for name in _ENV_ERRNOS if hasattr(errno, name))
# Errors of other libraries that are the user's to fix, matched by class name: importing this module (volume.py
# does) then imports neither OmegaConf nor Lightning.
USER_ERROR_NAMES = frozenset(
    {
        "MisconfigurationException",  # Lightning: e.g. Trainer(devices=0)
        "MissingMandatoryValue",  # OmegaConf: a ??? value read
        "OutOfMemoryError",  # torch: the device's memory (a smaller batch or patch, or a freer device)
    }
)
# What an out-of-memory line adds, and where torch's allocator advice begins (cut: it is about fragmentation).
OOM_HINT = "use a smaller batch or patch, or a device with more free memory"
OOM_ADVICE = re.compile(r"\s(Of the allocated memory|If reserved but unallocated|See documentation)")


def exception_line(exc: BaseException, *, with_type: bool = False, limit: int | None = None) -> str:
    """``exc``'s message on one line (whitespace runs → one space).

    Args:
        exc: the exception.
        with_type: prefix the class name (``"OSError: …"``), for causes whose type says what went wrong.
        limit: cut longer messages at this many characters (``…`` appended).

    Returns:
        the line; the class name when the message is empty.
    """
    text = " ".join(str(exc).split())
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    if with_type:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` (itself, not its causes) is one the user can fix: :data:`USER_ERRORS`,
    :data:`USER_ERROR_NAMES`, or an OSError about the environment (:data:`USER_OS_ERRNOS`)."""
    if isinstance(err, USER_ERRORS) or type(err).__name__ in USER_ERROR_NAMES:
        return True
    return isinstance(err, OSError) and err.errno in USER_OS_ERRNOS


def user_error(exc: BaseException) -> BaseException | None:
    """``exc`` or the first exception in its ``__cause__`` / ``__context__`` chain that is a user error."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if is_user_error(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def user_error_line(err: BaseException) -> str:
    """The message of a user error on one line.

    Errors raised inside DataLoader workers come back with the worker's traceback in their message; only its
    last line (``VolumeError: ...``) is kept.
    """
    if type(err).__name__ == "MissingMandatoryValue":
        return f"missing mandatory config value {err.full_key}"
    if type(err).__name__ == "OutOfMemoryError":
        text = " ".join(OOM_ADVICE.split(str(err), maxsplit=1)[0].split()).rstrip(".")
        return f"{text}: {OOM_HINT}"
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    text = str(err)
    if "Original Traceback" in text:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def one_line_errors(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn user errors raised by a CLI body into ``<prog>: error: <message>`` on stderr and exit code 1; any other
    exception propagates with its traceback (a bug to report)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - we re-raise what is not a user error
                err = user_error(exc)
                if err is None:
                    raise
                sys.stderr.write(f"{prog}: error: {user_error_line(err)}\n")
                log.debug("full traceback", exc_info=exc)
                sys.exit(1)

        return wrapper

    return deco


def unknown_key_line(exc: BaseException, groups: Collection[str] = ()) -> str | None:
    """Hydra's "Could not override 'k'. To append to your config use +k=v (Key 'k' is not in struct)" as
    "unknown option 'k'; did you mean 'key'?", and its "Could not override 'g'. No match in the defaults list"
    (a config group of other commands, e.g. exem-train's ``experiment``) as "this command has no g= option";
    None for any other error.

    The suggestions are the keys beside ``k`` that are spelt alike, else the known keys there. At the top level
    they include the command's config ``groups`` (e.g. ``experiment``) and leave out the other ``_target_``
    nodes (the command's own plumbing, e.g. ``translate``). Only where the keys are the arguments of a
    ``_target_`` (e.g. ``trainer.*``, Lightning's Trainer) does a new key do something, so only there, and when
    nothing is spelt alike, is ``+k=…`` suggested.
    """
    foreign = re.match(r"Could not override '([^']+)'\.\s+No match in the defaults list", str(exc))
    if foreign is not None:  # Hydra would advise "+g=…", which merges another command's group in
        mine = f" (its config groups: {', '.join(groups)})" if groups else ""
        return f"this command has no {foreign.group(1)}= option{mine}"
    cause = exc.__cause__
    parent = getattr(cause, "parent_node", None)
    full = getattr(cause, "full_key", None)
    if parent is None or not isinstance(full, str) or "not in struct" not in str(cause):
        return None
    head, _, name = full.rpartition(".")
    try:
        children = {str(k): v for k, v in parent.items_ex(resolve=False)}  # (interpolations left as they are)
        known = {k for k in children if not k.startswith("_") and k != "hydra"}
        if not head:
            known = {k for k in known if k in groups or not _is_target_node(children[k])}
            known |= set(groups)
        target = parent.get("_target_")
    except Exception:  # noqa: BLE001 - a node we cannot read: keep Hydra's own message
        return None
    prefix = f"{head}." if head else ""
    text = f"unknown option {full!r}"
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    if close:
        text += "; did you mean " + " or ".join(repr(prefix + c) for c in close) + "?"
    elif known:
        shown = sorted(known)
        more = ", …" if len(shown) > MAX_KNOWN_SHOWN else ""
        text += f"; known {'under ' + repr(head) if head else 'options'}: {', '.join(shown[:MAX_KNOWN_SHOWN])}{more}"
    if isinstance(target, str) and not close:
        text += f" (a new argument of {target.rpartition('.')[2]}: +{full}=…)"
    return text


def _is_target_node(node: Any) -> bool:
    return hasattr(node, "keys") and "_target_" in node


def config_error_line(exc: BaseException, groups: Collection[str] = ()) -> str:
    """A Hydra / OmegaConf error (unknown key, bad override, missing config group option) on one line; ``groups``:
    the command's config groups (:func:`unknown_key_line`)."""
    unknown = unknown_key_line(exc, groups)
    if unknown is not None:
        return unknown
    text = str(exc).split("Config search path:")[0]  # (Hydra lists its search path after a missing option)
    text = " ".join(text.split())
    override = getattr(exc, "override", None)
    if isinstance(override, str) and override not in text:
        text = f"bad override {override!r}: {text}"
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0].strip()
        if first and first not in text:
            text = f"{text} ({first})"
    return text or type(exc).__name__


def config_errors_one_line(
    prog: str, config_name: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Around a ``hydra.main`` of ``conf/<config_name>.yaml``: configuration errors (unknown key, bad override, …)
    become one line and exit 1.

    Hydra prints these itself over several lines; here it re-raises them (``HYDRA_FULL_ERROR=1`` while the
    command runs) and they are printed as ``<prog>: error: <message>``. With ``HYDRA_FULL_ERROR=1`` set by the
    user, Hydra's full report is kept.
    """

    def deco(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            user_full = os.environ.get("HYDRA_FULL_ERROR") == "1"
            previous = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return main(*args, **kwargs)
            except (HydraException, OmegaConfBaseException) as exc:
                if user_full:
                    raise
                from exem.config import config_groups

                groups = config_groups(config_name) if config_name else ()
                sys.stderr.write(f"{prog}: error: {config_error_line(exc, groups)}\n")
                sys.exit(1)
            finally:
                if previous is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = previous

        return wrapper

    return deco
