"""The distributed scripts' last line: leave without interpreter finalization."""

import os
import sys


def exit_without_finalization() -> None:
    """Skips interpreter finalization once every result is on disk: gloo's C++ worker threads can still hold
    work items then, and tearing them down aborts a rank now and again ("terminate called without an active
    exception"; pytorch/pytorch#179291 describes the race)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
