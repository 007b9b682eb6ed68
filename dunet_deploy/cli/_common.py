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

__all__ = [
    "EXIT_USER_ERROR",
    "TRAIN_INSTALL",
    "DunetCommand",
    "fail",
    "handle_errors",
    "one_line",
    "require_torch",
]

EXIT_USER_ERROR = 2
#: How to add what the runtime-only install lacks (torch for train/export/bench/demo).
TRAIN_INSTALL = "pip install 'dunet-deploy[train]' torch==2.13.0"
#: Exceptions reported as one-line user errors by :func:`handle_errors`.
USER_ERRORS: tuple[type[BaseException], ...] = (DunetError, OSError)

F = TypeVar("F", bound=Callable[..., Any])


#: Longest error line: our messages name up to two paths and end with the fix, which a
#: 300-character cut lost on real-world paths; library text inside is already cut shorter.
ERROR_LINE_LIMIT = 1000


def fail(message: object) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with code 2."""
    click.echo(f"error: {one_line(message, limit=ERROR_LINE_LIMIT)}", err=True)
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
                fail(exc.for_command())
            if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
                fail(f"{exc.filename}: {exc.strerror}")
            fail(f"{exc} ({type(exc).__name__})")

    return wrapper  # type: ignore[return-value]


def _no_torch(command: str) -> DunetError:
    return DunetError(f"{command} needs PyTorch, which is not installed (a runtime-only "
                      f"install): {TRAIN_INSTALL}")


def require_torch(command: str) -> None:
    """Fail with one line naming the extra when PyTorch is not importable.

    Commands that train, export or benchmark need torch; a runtime-only
    install (``dunet-deploy[cpu]``) lacks it.

    Raises:
        DunetError: ``<command> needs PyTorch ...: pip install ...``.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise _no_torch(command) from None


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from dunet_deploy import __version__

    click.echo(f"{ctx.info_name or 'dunet-deploy'} (dunet-deploy) {__version__}")
    ctx.exit()


class DunetCommand(click.Command):
    """A click command whose usage errors are one line (``error: ...``), exit 2.

    Click normally prints the usage block plus a hint; scripts and users of
    this project get one greppable line instead. ``-h``/``--help`` print the
    help and ``--version`` the package version, on every command.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = dict(kwargs.pop("context_settings", None) or {})
        settings.setdefault("help_option_names", ["-h", "--help"])
        kwargs["context_settings"] = settings
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(
            ["--version"], is_flag=True, expose_value=False, is_eager=True,
            callback=_print_version, help="Show the version and exit."))

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
        except ModuleNotFoundError as exc:
            # An option callback that needs torch (dunet-export --opset) on a runtime-only
            # install; any other missing module is a bug and keeps its traceback.
            if exc.name != "torch" or _debug():
                raise
            fail(_no_torch(info_name or "this command"))
