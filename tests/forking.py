"""Run test code in forked children (what `meshgate serve --workers` does to the gateway)."""
from __future__ import annotations

import os
from collections.abc import Callable


def run_forked(children: list[Callable[[], None]]) -> list[int]:
    """Run each callable in a forked child, all at once; fail if any child fails. The pids, reaped."""
    pids = []
    for fn in children:
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                fn()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    return pids
