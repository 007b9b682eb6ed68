"""The fork server's first preload: ignore SIGINT and SIGTERM, then unblock them.

:func:`dunet_deploy.runtime.workers._context` starts the fork server with both
signals blocked, not ignored, so that one arriving in the main process
meanwhile waits there instead of being dropped. The fork server inherits that
mask. Imported first in it, this module makes it ignore both (every worker
forked from it inherits that) and only then unblocks them: a signal sent to
the process group while the server was starting is discarded, not acted on.
Python's resource tracker starts the same way (bpo-33613).

Only a process that starts with both signals blocked changes; anywhere else,
importing this module does nothing.
"""

from __future__ import annotations

import signal

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _ignore_if_blocked() -> bool:
    if not hasattr(signal, "pthread_sigmask"):
        return False
    if not _SIGNALS <= signal.pthread_sigmask(signal.SIG_BLOCK, []):
        return False
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # discards one already pending
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    return True


#: Whether this process was changed (the fork server: ``True``).
IGNORED = _ignore_if_blocked()
