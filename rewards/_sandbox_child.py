"""The in-process half of :mod:`rewards.sandbox`: run as ``python -I -S -B -c <this source> CFG``.

It sets the resource limits, starts a wall-clock watchdog, removes a few unaudited dangerous
functions, installs a PEP 578 audit hook and only then executes ``main.py`` from its working
directory. Any forbidden operation ends the process at once with exit code ``FORBIDDEN`` and a
``sandbox: blocked ...`` line on stderr; the user code never sees an exception it could catch, so
it never gets hold of a frame of the hook either. Everything the hook calls is bound when the
hook is made, so monkeypatching ``os``, ``posixpath`` or ``builtins`` afterwards does not reach it.

Importing this module does nothing: the work happens only when it runs as ``__main__``.
"""

from __future__ import annotations

FORBIDDEN, MEMORY, WALL = 211, 212, 213  # exit codes, read by rewards.sandbox

_READ_FILES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_STD_FILES = ("/dev/stdin", "/dev/stdout", "/dev/stderr", "/dev/fd/0", "/dev/fd/1", "/dev/fd/2")
_FATAL = {
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
    "os.startfile", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    "os.link", "os.symlink", "os.chown", "os.chflags", "os.lchflags", "os.lchmod",
    "resource.setrlimit", "resource.prlimit", "sys.settrace", "sys.setprofile",
    "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys.remote_exec",
}
_FATAL_PREFIXES = ("socket.", "ctypes.", "winreg.", "webbrowser.")
_NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "posix", "_signal", "cffi", "_cffi_backend",
              "_xxsubinterpreters", "_xxinterpchannels"}
# event -> (indices of path arguments, index of the dir_fd argument or None)
_MUTATIONS = {
    "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), 2), "os.chmod": ((0,), 2), "os.utime": ((0,), 3),
    "os.truncate": ((0,), None), "os.setxattr": ((0,), None), "os.removexattr": ((0,), None),
    "shutil.rmtree": ((0,), 1),
}
# unaudited functions a solution never needs: processes outside our group, odd files, namespaces
_REMOVE = {"posix": ("pidfd_open", "mknod", "mkfifo", "chroot", "setns", "unshare"),
           "_signal": ("pidfd_send_signal",)}


def _make_hook(workdir: str, read_roots: tuple[str, ...]):
    """The audit hook, closed over its own references to everything it uses."""
    import posix

    lstat, readlink, getcwd, write, exit_ = (posix.lstat, posix.readlink, posix.getcwd,
                                             posix.write, posix._exit)
    str_, bytes_, int_, type_, repr_, any_ = str, bytes, int, type, repr, any
    exc_ = BaseException
    fatal, prefixes, no_import, mutations = (frozenset(_FATAL), _FATAL_PREFIXES,
                                             frozenset(_NO_IMPORT), dict(_MUTATIONS))
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    read_files, std_files = frozenset(_READ_FILES), frozenset(_STD_FILES)

    def deny(event, detail=""):
        write(2, ("\nsandbox: blocked " + event + " " + detail + "\n").encode("utf-8", "replace"))
        exit_(FORBIDDEN)

    def resolve(path):
        """Absolute, normalised, symlinks resolved (like os.path.realpath); None if unusable."""
        if type_(path) is bytes_:
            path = bytes_.decode(path, "utf-8", "surrogateescape")
        if type_(path) is not str_ or "\0" in path:
            return None
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        todo, parts, links = path.split("/")[::-1], [], 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            cur = "/" + "/".join(parts + [part])
            try:
                mode = lstat(cur).st_mode
            except exc_:
                mode = 0
            if mode & 0o170000 == 0o120000:
                links += 1
                if links > 40:
                    return None
                target = readlink(cur)
                if target.startswith("/"):
                    parts = []
                todo.extend(target.split("/")[::-1])
            else:
                parts.append(part)
        return "/" + "/".join(parts)

    def under(path, roots):
        return path is not None and any_(path == r or path.startswith(r + "/") for r in roots)

    def check_open(path, mode, flags):
        if type_(path) is int_ or (type_(path) is str_ and path in std_files):
            return  # an already open descriptor
        if type_(path) not in (str_, bytes_):
            deny("open", "of a non-str path " + repr_(type_(path)))
        writing = type_(flags) is int_ and flags & write_flags
        if mode is None:  # os.open: a dir_fd would not show in the event
            text = path if type_(path) is str_ else bytes_.decode(path, "utf-8", "replace")
            if writing and not text.startswith("/"):
                deny("open", "os.open for writing needs an absolute path")
            if ".." in text.split("/") and not text.startswith("/"):
                deny("open", "os.open with a relative '..' path")
        real = resolve(path)
        if real in read_files:
            return
        if writing:
            if not under(real, (workdir,)):
                deny("open", "for writing outside the working directory: " + repr_(path))
        elif not under(real, read_roots):
            deny("open", "for reading outside the working directory and stdlib: " + repr_(path))

    def check(event, args):
        if event == "open":
            check_open(*args[:3])
        elif event in mutations:
            paths, dir_fd = mutations[event]
            if dir_fd is not None and args[dir_fd] not in (None, -1):
                deny(event, "with dir_fd")
            for i in paths:
                if event == "os.truncate" and type_(args[i]) is int_:
                    continue
                if not under(resolve(args[i]), (workdir,)):
                    deny(event, "outside the working directory: " + repr_(args[i]))
        elif event == "import":
            name = args[0]  # an extension module may also be loaded under another package
            if name in no_import or name.rpartition(".")[2] in no_import or \
                    name.startswith("ctypes."):
                deny(event, name)
        elif event in fatal or event.startswith(prefixes):
            deny(event)

    def hook(event, args):
        try:
            check(event, args)
        except exc_:  # never let an exception (and with it a frame of ours) reach user code
            deny(event, "(the sandbox could not check it)")

    return hook


def _no_fork_exec(*_args, **_kwargs):
    """Stands in for ``_posixsubprocess.fork_exec``, which forks without an audit event."""
    import sys

    sys.audit("os.fork")  # fatal in the hook
    raise PermissionError("sandbox: no new processes")


def _start_watchdog(seconds: float, code: int) -> None:
    """End the process after `seconds` of wall time, even if the parent is gone."""
    import _thread
    import posix
    import time

    sleep, exit_ = time.sleep, posix._exit

    def watch():
        sleep(seconds)
        exit_(code)

    _thread.stack_size(256 * 1024)
    _thread.start_new_thread(watch, ())
    _thread.stack_size(0)


def _main() -> None:
    import json
    import os
    import resource
    import sys
    import types

    cfg = json.loads(sys.argv[1])
    workdir = os.path.realpath(cfg["workdir"])
    limits = [(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)),
              (resource.RLIMIT_FSIZE, (cfg["file_bytes"],) * 2), (resource.RLIMIT_CORE, (0, 0)),
              (resource.RLIMIT_NOFILE, (64, 64))]
    if cfg["max_processes"] is not None:
        limits.append((resource.RLIMIT_NPROC, (cfg["max_processes"],) * 2))
    _start_watchdog(cfg["wall_s"] + 1.0, WALL)  # before RLIMIT_NPROC/AS could stop the thread
    limits.append((resource.RLIMIT_AS, (cfg["memory_bytes"],) * 2))
    for what, value in limits:
        resource.setrlimit(what, value)

    import _posixsubprocess  # so `import subprocess` works, with no way left to fork through it
    import _signal
    import posix
    import signal

    aliases = {"posix": os, "_signal": signal}  # modules that re-export the same functions
    for name, attrs in _REMOVE.items():
        for mod in (sys.modules[name], aliases.get(name, sys.modules[name])):
            for attr in attrs:
                mod.__dict__.pop(attr, None)
    _posixsubprocess.fork_exec = _no_fork_exec
    del _posixsubprocess, _signal, posix, aliases

    roots = [workdir] + [os.path.realpath(p) for p in sys.path if p]
    sys.addaudithook(_make_hook(workdir, tuple(dict.fromkeys(roots))))

    with open(os.path.join(workdir, cfg["main"]), encoding="utf-8") as f:
        code = compile(f.read(), cfg["main"], "exec")
    module = types.ModuleType("__main__")
    module.__file__ = cfg["main"]
    sys.modules["__main__"] = module
    sys.argv = [cfg["main"]]
    del cfg, f, roots, limits
    try:
        exec(code, module.__dict__)
    except MemoryError:
        os.write(2, b"\nMemoryError\n")
        os._exit(MEMORY)


if __name__ == "__main__":
    _main()
