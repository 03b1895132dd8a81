"""The job launcher: the small program between the agent and a job's command.

The process runner starts ``python -I -S launch.py CONFIG_FD STATUS_FD`` in a new session, with an
almost empty environment. The launcher reads its JSON configuration from ``CONFIG_FD`` (a memfd,
so the job's environment never appears on a command line), then, in this order:

1. joins the job's cgroups (it is still root, and nothing has forked yet, so every process the
   job ever creates is inside them);
2. sets the resource limits (RLIMIT_*);
3. drops privileges to the job's uid/gid (supplementary groups cleared) and, unless bubblewrap
   follows (it does this itself), sets no_new_privs;
4. asks the kernel to SIGKILL it when the agent dies (``PR_SET_PDEATHSIG``, set after the
   user switch, which clears it): a job never outlives an agent that was killed or crashed;
5. restores default handling of SIGPIPE and SIGXFSZ (Python ignores them, and an ignored signal
   stays ignored across exec) and sets umask 077;
6. changes into the work dir and ``execvpe``\\s the command with the job's environment.

If any step fails it writes one line to ``STATUS_FD`` and exits 127; after a successful exec the
status pipe closes empty (it is close-on-exec), which is how the runner tells "could not start"
from "started and failed". Doing this in a separate program rather than a ``preexec_fn`` keeps it
safe in a multi-threaded agent (code between fork and exec in a threaded process can deadlock).

This file imports nothing outside the standard library: it runs with ``-S`` (no site-packages).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


def main(argv: list[str]) -> None:
    config_fd, status_fd = int(argv[1]), int(argv[2])
    agent = os.getppid()
    os.set_inheritable(status_fd, False)
    step = "reading the launcher configuration"
    try:
        with os.fdopen(config_fd, "rb") as config_file:
            config: dict[str, Any] = json.loads(config_file.read())
        step = "joining the job's cgroups"
        for procs_file in config["cgroup_procs"]:
            with open(procs_file, "w") as handle:
                handle.write(str(os.getpid()))
        step = "setting resource limits"
        for name, soft, hard in config["rlimits"]:
            _set_rlimit(getattr(resource, name), soft, hard)
        step = "switching to the job's user"
        if config["gid"] is not None:
            os.setgroups([])
            os.setgid(config["gid"])
        if config["uid"] is not None:
            os.setuid(config["uid"])
        if config["no_new_privs"]:
            step = "setting no_new_privs"
            _set_no_new_privs()
        step = "binding the job to the agent's life"
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != agent:  # the agent died before the binding: nobody waits for us
            os._exit(137)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        os.umask(0o077)
        step = f"entering the work dir {config['workdir']}"
        os.chdir(config["workdir"])
        argv_job: list[str] = config["argv"]
        step = f"starting {argv_job[0]!r}"
        os.execvpe(argv_job[0], argv_job, config["env"])
    except Exception as error:  # every failure is reported the same way
        _report(status_fd, f"{step}: {_describe(error)}")
        os._exit(127)


def _set_no_new_privs() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS): exec can never again raise privileges (setuid binaries, file
    capabilities). bubblewrap sets this itself for its sandboxed command."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _set_rlimit(which: int, soft: int, hard: int) -> None:
    """Set a limit, never above the current hard limit (raising it needs privileges)."""
    infinity = resource.RLIM_INFINITY
    soft = infinity if soft < 0 else soft
    hard = infinity if hard < 0 else hard
    _, current_hard = resource.getrlimit(which)
    if current_hard != infinity and os.geteuid() != 0:
        soft = current_hard if soft == infinity else min(soft, current_hard)
        hard = current_hard if hard == infinity else min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def _describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno == errno.EAGAIN:
        return "the job's user already has as many processes as its limit allows (RLIMIT_NPROC)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {error}"


def _report(status_fd: int, message: str) -> None:
    try:
        os.write(status_fd, message.encode("utf-8", "replace")[:4000])
    except OSError:
        pass


if __name__ == "__main__":
    main(sys.argv)
