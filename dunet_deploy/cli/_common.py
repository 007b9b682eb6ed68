"""Shared command-line plumbing: user errors become one line and exit code 2.

Usage in any CLI module::

    @click.command(cls=DunetCommand)      # one-line errors for bad arguments
    @click.argument(...)
    @handle_errors                        # one-line errors from the library
    def main(...): ...

Set ``DUNET_DEBUG=1`` to get the full traceback instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from dunet_deploy.errors import DunetError, exit_code_for, one_line, sigterm_interrupts

__all__ = ["EXIT_USER_ERROR", "DunetCommand", "fail", "handle_errors", "one_line"]

EXIT_USER_ERROR = 2
#: Exceptions reported as one-line user errors by :func:`handle_errors`.
USER_ERRORS: tuple[type[BaseException], ...] = (DunetError, OSError)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: object) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with code 2."""
    click.echo(f"error: {one_line(message)}", err=True)
    raise click.exceptions.Exit(EXIT_USER_ERROR)


def _debug() -> bool:
    return os.environ.get("DUNET_DEBUG", "") not in ("", "0")


def handle_errors(func: F) -> F:
    """Decorator: report :data:`USER_ERRORS` as one line on stderr, exit 2.

    SIGTERM is turned into an :class:`~dunet_deploy.errors.Interrupted` inside
    the command; an interrupt prints one line and exits 130 (SIGINT) or 143
    (SIGTERM) after the command's own clean-up.

    ``DunetError`` messages are printed as they are; an ``OSError`` (a file
    system problem: disk full, permission denied) names its file. Anything
    else is a bug in our code and keeps its traceback (exit 1).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_interrupts():
                return func(*args, **kwargs)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: what was complete is kept
            if _debug():
                raise
            signame = "SIGTERM" if exit_code_for(exc) == 143 else "SIGINT"
            click.echo(f"error: interrupted ({signame})", err=True)
            raise click.exceptions.Exit(exit_code_for(exc)) from None
        except USER_ERRORS as exc:
            if _debug():
                raise
            if isinstance(exc, DunetError):
                fail(exc)
            if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
                fail(f"{exc.filename}: {exc.strerror}")
            fail(f"{exc} ({type(exc).__name__})")

    return wrapper  # type: ignore[return-value]


class DunetCommand(click.Command):
    """A click command whose usage errors are one line (``error: ...``), exit 2.

    Click normally prints the usage block plus a hint; scripts and users of
    this project get one greppable line instead. ``--help`` is unchanged.
    """

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            if _debug():
                raise
            fail(exc.format_message())
