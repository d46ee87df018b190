"""User-facing errors: the CLI prints their message as one line and exits 2 (no traceback)."""
from __future__ import annotations

import re


class UserError(ValueError):
    """A mistake in the user's input (config, file, key, row): one-line message, exit code 2."""


class ConfigError(UserError):
    """A bad config: unknown key, wrong type, missing file."""


class DataError(UserError):
    """Bad input data that cannot be recorded row by row (no input files matched, an unreadable dataset)."""


# how a UserError raised in a Ray task or actor reads in the text of the error Ray raises where only the text
# survives (a Ray Data task's failure wraps the remote traceback as a string)
_REMOTE_USER_ERROR = re.compile(r"clipdense\.config\.errors\.(DataError|ConfigError|UserError): ([^\n]+)")
_KINDS = {"DataError": DataError, "ConfigError": ConfigError, "UserError": UserError}


def user_error_behind(exc: BaseException) -> UserError | None:
    """The UserError behind an exception, looking through Ray's wrappers (worker failures, task errors, causes),
    and last through their text for a remote one's line."""
    seen, todo, chain = set(), [exc], []
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            return cause
        if isinstance(e, UserError) and type(e).__module__.startswith("clipdense"):
            return e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures.values())
        todo.extend(x for x in (cause, e.__cause__, e.__context__) if isinstance(x, BaseException))
    for e in chain:
        found = _REMOTE_USER_ERROR.search(str(e))
        if found is not None:
            return _KINDS[found.group(1)](found.group(2).strip())
    return None


def raise_user_error_behind(exc: BaseException) -> None:
    """Raise the UserError behind `exc` as its one line (no Ray traceback); return when there is none or `exc`
    is that error itself (the caller re-raises it)."""
    user = user_error_behind(exc)
    if user is not None and user is not exc:
        raise type(user)(str(user).strip().splitlines()[0]) from None
