"""Project-wide exception types.

Every error a *user* can cause (a bad file, a bad argument, an incompatible
spec) is raised as :class:`DunetError` with a one-line, self-contained message,
so the command-line tools can print it as ``error: <message>`` without a
traceback. Programming errors keep their ordinary Python types.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class DunetError(Exception):
    """Base class for all user-facing errors of dunet-deploy.

    The message must be a single line that names the offending thing (file,
    field, case) and says what is wrong with it.

    Args:
        message: The one-line message; a library message names a parameter
            (``batch_size 0: must be >= 1``), never a command-line flag.
        option: The parameter the message starts with, when it is about one:
            a command prints its flag instead (:meth:`for_command`).
    """

    def __init__(self, message: object = "", *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option

    def for_command(self, flags: dict[str, str] | None = None) -> str:
        """The message with its leading parameter name written as a command-line flag.

        ``batch_size 0: must be >= 1`` becomes ``--batch-size 0: must be >= 1``;
        ``flags`` maps a parameter to a flag of another spelling
        (``{"model": "--engine"}``).
        """
        text = str(self)
        name = self.option
        if not name or not text.startswith(name):
            return text
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        return flag + text[len(name):]


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



class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) received: stop cleanly, keep what is complete, exit ``128 + signum``.

    A :class:`KeyboardInterrupt`, so code that already cleans up on Ctrl-C does
    the same for ``timeout``, ``docker stop`` and batch schedulers.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def exit_code_for(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM: the shell's ``128 + signal``."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT))


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Interrupted` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
