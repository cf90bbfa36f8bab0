"""Run a command as the terminal's foreground process group, so Ctrl-C reaches it alone.

``make run`` → bash → the daemon: Ctrl-C sends SIGINT to the terminal's whole foreground process group,
make included, and GNU make then dies of SIGINT (exit 130) even though the daemon drained, committed and
exited 0. Here the command gets its own process group, made the terminal's foreground group for its
lifetime, and the group of make and the quick-start script is given the terminal back afterwards; so the
daemon's exit code is the script's, and the summary after it is printed. Without a terminal (CI, a pipe)
the command simply runs. Exit code: the command's (128 + N when killed by signal N).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    try:
        tty = os.open("/dev/tty", os.O_RDWR)
        ours = os.tcgetpgrp(tty)
    except OSError:
        tty, ours = -1, -1
    if tty < 0 or ours != os.getpgrp():  # no terminal, or we are not in its foreground: nothing to hand over
        return _code(subprocess.call(argv))  # noqa: S603 - the command line quickstart.sh wrote
    child = subprocess.Popen(argv, process_group=0)  # noqa: S603 - as above
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # tcsetpgrp from what is then a background group
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the child reacts to Ctrl-C (it drains and exits)
    try:
        os.tcsetpgrp(tty, child.pid)
    except OSError:
        pass
    try:
        return _code(child.wait())
    finally:
        try:
            os.tcsetpgrp(tty, ours)
        except OSError:
            pass
        os.close(tty)


def _code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
