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
