"""Project-wide exception types.

Every error a *user* can cause (a bad file, a bad argument, an incompatible
spec) is raised as :class:`DunetError` with a one-line, self-contained message,
so the command-line tools can print it as ``error: <message>`` without a
traceback. Programming errors keep their ordinary Python types.
"""

from __future__ import annotations


class DunetError(Exception):
    """Base class for all user-facing errors of dunet-deploy.

    The message must be a single line that names the offending thing (file,
    field, case) and says what is wrong with it.
    """


def one_line(message: object, limit: int = 300) -> str:
    """Collapse a message onto one line (library exceptions are often multi-line).

    Newlines and runs of spaces become one space; the result is cut to ``limit``
    characters so a huge library message cannot flood a terminal.
    """
    text = " ".join(str(message).split()) or "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

