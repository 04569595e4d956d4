"""Seccomp user notification, in pure ctypes: the kernel half of the monitor.

The loader (forked by the supervisor) installs the filter :func:`build_filter` describes, with
``SECCOMP_FILTER_FLAG_NEW_LISTENER`` and ``SECCOMP_FILTER_FLAG_TSYNC``. Every *interesting*
system call of the loader, of every thread it already has (numpy's import starts OpenBLAS's) and
of every thread it starts then stops in the kernel until the supervisor answers it through the
listener: it reads the arguments from ``/proc/<pid>/mem``, re-checks that the notification is
still valid (``SECCOMP_IOCTL_NOTIF_ID_VALID``: the caller may have died or been interrupted, and
its memory reused), records an event and answers either ``EPERM`` (the call never runs) or
``CONTINUE`` (the kernel runs it as asked). Everything else is allowed inside the kernel, so
threads, reads and memory management stay as cheap as without monitoring.

Handing over the listener
    The listener fd is created in the loader (only the task that installs a filter gets it) and
    must not stay there: a thread of the payload could otherwise receive and answer its own
    notifications and hide them. The loader, still single-threaded and before it has opened the
    input, sends the fd *number* over a pipe and waits. The supervisor takes a copy with
    ``pidfd_open`` + ``pidfd_getfd`` (which needs ptrace access: same uid, loader dumpable,
    loader a descendant), acknowledges, and the loader closes its copy. From then on the only
    listener is in the supervisor, which is not dumpable (``PR_SET_DUMPABLE 0``), so neither
    ``pidfd_getfd``, ``/proc/1/fd`` nor ``/proc/1/mem`` give the loader access to it; the filter
    itself answers ``pidfd_open``, ``pidfd_getfd``, ``ptrace`` and ``process_vm_*`` with
    ``EPERM``. Passing the fd with ``SCM_RIGHTS`` would need ``sendmsg`` from the filtered loader
    before anyone listens, which would deadlock. If the supervisor dies, the kernel answers every
    pending and future notification with ``ENOSYS``: the monitor fails closed.

Limits of the method (the kernel's, documented in seccomp_unotify(2))
    A ``CONTINUE`` answer is a time-of-check/time-of-use race: another thread may change the path
    between our read and the kernel's. Only opens (of files) and the creation of sockets and
    vfork children are continued, and what they can do is decided by the container (read-only
    root, no network, uid 65534, no capabilities). Monitoring gives evidence; the container
    enforces.

Processes
    Plain ``fork``, and ``clone`` without ``CLONE_THREAD`` or ``CLONE_VM|CLONE_VFORK``, are
    refused. A vfork-style child (``posix_spawn``, ``os.system``, ``subprocess``) is let through:
    it shares the loader's memory, the loader stays suspended until it execs or exits, it
    inherits the filter, and its ``execve`` is what carries the program and the argv we record
    (and refuse). Without it, an attempt to run a program would show up as an anonymous clone.

This module imports only the standard library.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _protocol as P

# -- kernel ABI (x86-64) -----------------------------------------------------------------------

AUDIT_ARCH_X86_64 = P.AUDIT_ARCH_X86_64
X32_SYSCALL_BIT = P.X32_SYSCALL_BIT

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 1 << 4  # with TSYNC and a listener: ESRCH when a thread fails
# Every thread of the loader gets the filter, not the installing one alone: numpy's import
# starts OpenBLAS's worker threads before the filter goes in, and a payload with ctypes can hand
# one of them a function (exec_blas) that then ran unmonitored. A thread that cannot be
# synchronised fails the install (ESRCH): the loader fails closed.
INSTALL_FLAGS = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_TSYNC_ESRCH

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = P.SECCOMP_RET_ERRNO
RET_USER_NOTIF = P.SECCOMP_RET_USER_NOTIF
RET_ALLOW = P.SECCOMP_RET_ALLOW

SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
NOTIF_SIZE = 80  # struct seccomp_notif
RESP_SIZE = 24  # struct seccomp_notif_resp


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


IOCTL_RECV = _iowr(0, NOTIF_SIZE)
IOCTL_SEND = _iowr(1, RESP_SIZE)
IOCTL_ID_VALID = (1 << 30) | (8 << 16) | (ord("!") << 8) | 2

PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22

CLONE_VM = 0x100
CLONE_VFORK = 0x4000
CLONE_THREAD = 0x10000
PROT_EXEC = 0x4
MAP_ANONYMOUS = 0x20
AT_FDCWD = -100

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
SYS_SECCOMP = 317

# Syscall numbers the filter sends to the supervisor (the rest are allowed in the kernel).
SYSCALLS: dict[str, int] = {
    # network
    "socket": 41,
    "connect": 42,
    "accept": 43,
    "sendto": 44,
    "sendmsg": 46,
    "bind": 49,
    "listen": 50,
    "socketpair": 53,
    "accept4": 288,
    "sendmmsg": 307,
    # processes and programs
    "fork": 57,
    "vfork": 58,
    "execve": 59,
    "execveat": 322,
    # files
    "open": 2,
    "openat": 257,
    "openat2": 437,
    "creat": 85,
    "rename": 82,
    "renameat": 264,
    "renameat2": 316,
    "unlink": 87,
    "unlinkat": 263,
    "link": 86,
    "linkat": 265,
    "symlink": 88,
    "symlinkat": 266,
    "chmod": 90,
    "fchmod": 91,
    "fchmodat": 268,
    "fchmodat2": 452,
    # a path's contents, existence or metadata changed without an open (see PATH_CHANGES)
    "truncate": 76,
    "mkdir": 83,
    "rmdir": 84,
    "mkdirat": 258,
    "mknod": 133,  # killed (see KILLED)
    "mknodat": 259,
    "chown": 92,
    "lchown": 94,
    "fchownat": 260,
    "utime": 132,
    "utimes": 235,
    "futimesat": 261,
    "utimensat": 280,
    # a file's metadata changed through a descriptor, or its extended attributes (see
    # METADATA_CHANGES); the *xattrat calls (Linux 6.13) are killed (see KILLED)
    "fchown": 93,
    "setxattr": 188,
    "lsetxattr": 189,
    "fsetxattr": 190,
    "removexattr": 197,
    "lremovexattr": 198,
    "fremovexattr": 199,
    "setxattrat": 463,
    "removexattrat": 466,
    # other processes, privileges, kernel surfaces
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "unshare": 272,
    "setns": 308,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "setuid": 105,
    "setgid": 106,
    "setreuid": 113,
    "setregid": 114,
    "setgroups": 116,
    "setresuid": 117,
    "setresgid": 119,
    "setfsuid": 122,
    "setfsgid": 123,
    "pidfd_open": SYS_PIDFD_OPEN,
    "pidfd_getfd": SYS_PIDFD_GETFD,
    "pidfd_send_signal": 424,
    "seccomp": SYS_SECCOMP,
    "memfd_create": 319,
    "rt_sigqueueinfo": 129,
    "tkill": 200,
    "rt_tgsigqueueinfo": 297,
}
# Calls the container profile refuses (with an errno, which outranks a notification: the
# supervisor would never see them) and that no load makes: the loader's filter kills the
# loader outright (SECCOMP_RET_KILL_PROCESS outranks the profile's errno and cannot be caught),
# and the supervisor records the kill (`seccomp_kill`). Before, io_uring, userfaultfd, a new
# namespace or a file made by mknod were refused without a trace. fchmodat2 (Linux 6.6) and the
# *xattrat calls (6.13) are newer than the container engine's libseccomp (Debian 12's 2.5.4):
# Docker's runc answers them ENOSYS and the bwrap profile leaves them out, so a payload's
# fchmodat2(fd, "", mode, AT_EMPTY_PATH) or setxattrat was refused with no trace either.
KILLED: frozenset[str] = frozenset(
    {
        "io_uring_setup",
        "userfaultfd",
        "unshare",
        "setns",
        "chroot",
        "pivot_root",
        "mknod",
        "mknodat",
        "fchmodat2",
        "setxattrat",
        "removexattrat",
    }
)
NR_IO_URING_ENTER, NR_IO_URING_REGISTER = 426, 427
# Calls that change a path without opening it: truncate(2) empties a file, mkdir/rmdir create
# or remove one, chown and the utime family change its metadata (a payload's way to hide
# a change). Decided like unlink and rename (:meth:`Decoder._path_op`): let through in the
# scratch space, refused elsewhere; before, none of them notified, so a payload's truncate of
# the user's files left no trace.
PATH_CHANGES = frozenset(P.PATH_CHANGES)
# Calls that change a file's metadata through a descriptor (fchmod, fchown: a read-only one is
# enough for the file's owner, so no open for writing recorded it) or its extended attributes
# (by path, link or descriptor): decided like chmod, the descriptor's file (/proc/<pid>/fd/<n>)
# standing for the path; before, fchown and the xattr calls were not notified (the container
# profile refused the xattr calls without a trace, fchown ran), and fchmod was refused everywhere
# with no path. ftruncate and fallocate need no notification: they need a descriptor open for
# writing, and every such open is recorded with its path.
METADATA_CHANGES = frozenset(P.METADATA_CHANGES)

# Conditionally reported: decided inside the filter from the arguments.
NR_CLONE, NR_CLONE3, NR_KILL, NR_TGKILL = 56, 435, 62, 234
NR_MPROTECT, NR_PKEY_MPROTECT, NR_MMAP, NR_PRCTL = 10, 329, 9, 157
NR_PRLIMIT64 = 302  # on another process: its limits (the supervisor's) are changed or read
# Scheduling another process needs only the same uid, like prlimit64: a loader could renice the
# supervisor, pin it to one busy core or demote it to SCHED_IDLE, and so delay every answer and
# sample it owes while the load spins. The target is argument 0 (a pid), or for setpriority and
# ioprio_set argument 1, whose kind (a process, a process group, a user) is argument 0.
SCHED_CALLS: dict[int, str] = {
    142: "sched_setparam",
    144: "sched_setscheduler",
    203: "sched_setaffinity",
    314: "sched_setattr",
}
NR_SETPRIORITY, NR_IOPRIO_SET = 141, 251
PRIO_PROCESS, PRIO_PGRP = 0, 1  # setpriority's kinds of target (else PRIO_USER)
IOPRIO_WHO_PROCESS, IOPRIO_WHO_PGRP = 1, 2  # ioprio_set's (else IOPRIO_WHO_USER)
NAMES: dict[int, str] = {nr: name for name, nr in SYSCALLS.items()}
NAMES.update(SCHED_CALLS)
NAMES.update({NR_SETPRIORITY: "setpriority", NR_IOPRIO_SET: "ioprio_set"})
NAMES.update(
    {
        NR_CLONE: "clone",
        NR_KILL: "kill",
        NR_TGKILL: "tgkill",
        NR_MPROTECT: "mprotect",
        NR_PKEY_MPROTECT: "pkey_mprotect",
        NR_MMAP: "mmap",
        NR_PRCTL: "prctl",
        NR_PRLIMIT64: "prlimit64",
    }
)

# -- classic BPF (the assembler is shared with the host, which compiles the container profile
# for the bwrap runner: it lives in the protocol module, the one module both sides import) ------

_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = (
    P.BPF_LD_W_ABS,
    P.BPF_JEQ_K,
    P.BPF_JGE_K,
    P.BPF_JSET_K,
    P.BPF_RET_K,
)
_OFF_NR, _OFF_ARCH = 0, 4
_arg_lo, _arg_hi = P.bpf_arg_lo, P.bpf_arg_hi
_Asm = P.BpfAsm


def _prologue(refuse: str) -> P.BpfAsm:
    """The start both filters share: another architecture or the x32 ABI jumps to ``refuse``;
    ``clone`` to label ``clone``, ``clone3`` to ``enosys``, ``kill``/``tgkill`` to ``kill``."""
    a = _Asm()
    a.ld(_OFF_ARCH)
    a.jmp(_JEQ_K, AUDIT_ARCH_X86_64, 0, refuse)
    a.ld(_OFF_NR)
    a.jmp(_JGE_K, X32_SYSCALL_BIT, refuse, 0)
    a.jmp(_JEQ_K, NR_CLONE, "clone", 0)
    a.jmp(_JEQ_K, NR_CLONE3, "enosys", 0)
    a.jmp(_JEQ_K, NR_KILL, "kill", 0)
    a.jmp(_JEQ_K, NR_TGKILL, "kill", 0)
    return a


def _epilogue(a: P.BpfAsm, refuse: str, refused: int) -> bytes:
    """The end both filters share, assembled: label ``prctl`` (``PR_SET_SECCOMP`` and
    ``PR_SET_DUMPABLE`` go to ``refuse``), then the answers ``allow``, ``refuse`` (returns
    ``refused``) and ``enosys``. They come last: classic BPF only jumps forward."""
    a.label("prctl")
    a.ld(_arg_lo(0))
    a.jmp(_JEQ_K, PR_SET_SECCOMP, refuse, 0)
    a.jmp(_JEQ_K, PR_SET_DUMPABLE, refuse, "allow")
    a.label("allow")
    a.ret(RET_ALLOW)
    a.label(refuse)
    a.ret(refused)
    a.label("enosys")
    a.ret(RET_ERRNO | errno.ENOSYS)
    return a.assemble()


def build_filter(self_pid: int) -> bytes:
    """The loader's filter as raw ``struct sock_filter`` records.

    * another architecture (i386 ``int 0x80``) or the x32 ABI: reported, then refused;
    * ``clone`` with ``CLONE_THREAD`` (threads): allowed; other clones reported;
    * ``clone3``: ``ENOSYS`` (its flags live in memory the filter cannot see; libc falls back);
    * ``kill``/``tgkill`` aimed at the loader itself: allowed; at anything else: reported;
    * ``prlimit64`` of the caller (pid 0) or of the loader: allowed; of any other process (the
      supervisor: the same uid may set its limits, dumpable or not): reported;
    * ``mprotect``/``pkey_mprotect`` adding ``PROT_EXEC``, anonymous executable ``mmap`` and
      ``prctl(PR_SET_SECCOMP | PR_SET_DUMPABLE)``: reported;
    * the calls of :data:`KILLED` and the rest of io_uring: the loader is killed (the supervisor
      records it);
    * every other call in :data:`SYSCALLS`: reported; everything else: allowed.
    """
    a = _prologue("notify")
    a.jmp(_JEQ_K, NR_MPROTECT, "prot2", 0)
    a.jmp(_JEQ_K, NR_PKEY_MPROTECT, "prot2", 0)
    a.jmp(_JEQ_K, NR_MMAP, "mmap", 0)
    a.jmp(_JEQ_K, NR_PRCTL, "prctl", 0)
    a.jmp(_JEQ_K, NR_PRLIMIT64, "prlimit", 0)
    for nr in sorted(SCHED_CALLS):
        a.jmp(_JEQ_K, nr, "prlimit", 0)  # the same test: pid 0 or the loader's own
    a.jmp(_JEQ_K, NR_SETPRIORITY, "setpriority", 0)
    a.jmp(_JEQ_K, NR_IOPRIO_SET, "ioprio_set", 0)
    for nr in sorted({SYSCALLS[n] for n in KILLED} | {NR_IO_URING_ENTER, NR_IO_URING_REGISTER}):
        a.jmp(_JEQ_K, nr, "kill_process", 0)
    for nr in sorted({nr for n, nr in SYSCALLS.items() if n not in KILLED}):
        a.jmp(_JEQ_K, nr, "notify", 0)
    a.ret(RET_ALLOW)
    a.label("kill_process")
    a.ret(RET_KILL_PROCESS)
    a.label("prlimit")  # the target pid is argument 0, an int (the kernel reads 32 bits)
    a.ld(_arg_lo(0))
    a.jmp(_JEQ_K, 0, "allow", 0)
    a.jmp(_JEQ_K, self_pid, "allow", "notify")
    a.label("setpriority")  # a process (else reported), then the same test on argument 1
    a.ld(_arg_lo(0))
    a.jmp(_JEQ_K, PRIO_PROCESS, "who", "notify")
    a.label("ioprio_set")
    a.ld(_arg_lo(0))
    a.jmp(_JEQ_K, IOPRIO_WHO_PROCESS, 0, "notify")
    a.label("who")
    a.ld(_arg_lo(1))
    a.jmp(_JEQ_K, 0, "allow", 0)
    a.jmp(_JEQ_K, self_pid, "allow", "notify")
    a.label("clone")
    a.ld(_arg_lo(0))
    a.jmp(_JSET_K, CLONE_THREAD, "allow", "notify")
    a.label("kill")  # target pid (kill) or thread group (tgkill) is argument 0, an int
    a.ld(_arg_lo(0))
    a.jmp(_JEQ_K, self_pid, 0, "notify")
    a.ld(_arg_hi(0))
    a.jmp(_JEQ_K, 0, "allow", "notify")
    a.label("prot2")
    a.ld(_arg_lo(2))
    a.jmp(_JSET_K, PROT_EXEC, "notify", "allow")
    a.label("mmap")
    a.ld(_arg_lo(2))
    a.jmp(_JSET_K, PROT_EXEC, 0, "allow")
    a.ld(_arg_lo(3))
    a.jmp(_JSET_K, MAP_ANONYMOUS, "notify", "allow")
    return _epilogue(a, "notify", RET_USER_NOTIF)


# Under gVisor (runsc) there is no seccomp user notification: the loader installs this filter
# instead, which refuses in the kernel what the supervisor refuses by default, with the same
# errno, and lets through what the supervisor would let through (opens, path operations, socket
# creation, vfork-style children: the container decides what they can do). Decisions that
# depend on a path (a write outside the scratch space) cannot be made in BPF: there the
# container answers (read-only root). gVisor's trace of the sandbox's system calls is the
# evidence; the host reads it (sandbox/_gvisor.py).
PLAIN_ALLOWED = frozenset(
    {
        "socket",
        "socketpair",
        "vfork",
        "open",
        "openat",
        "openat2",
        "creat",
        "rename",
        "renameat",
        "renameat2",
        "unlink",
        "unlinkat",
        "link",
        "linkat",
        "symlink",
        "symlinkat",
        "chmod",
        "fchmod",
        "fchmodat",
        "fchmodat2",
        *PATH_CHANGES,
        "fchown",
        "memfd_create",
    }
)
# signals: refused when aimed at the supervisor (pid 1) or at every process (-1), as the
# supervisor refuses them; any other target is allowed (it can only be a sandbox process)
PLAIN_SIGNAL_CALLS = frozenset({"tkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"})


def plain_refused() -> frozenset[str]:
    """The calls :func:`build_plain_filter` always refuses (for the host's trace reader too)."""
    return frozenset(SYSCALLS) - PLAIN_ALLOWED - PLAIN_SIGNAL_CALLS


def build_plain_filter(self_pid: int, refuse_errno: int) -> bytes:
    """The loader's filter where no notification exists: the decisions of :class:`Decoder`
    that do not depend on memory, made in BPF (see :data:`PLAIN_ALLOWED`):

    * another architecture or the x32 ABI: refused;
    * ``clone`` of a thread, or vfork-style (``CLONE_VM|CLONE_VFORK``): allowed; others refused;
    * ``clone3``: ``ENOSYS``, as in :func:`build_filter`;
    * ``kill``/``tgkill``/``tkill``/``rt_(tg)sigqueueinfo`` aimed at pid 1 or -1: refused;
    * ``prlimit64`` of pid 1 (the supervisor): refused;
    * ``prctl(PR_SET_SECCOMP | PR_SET_DUMPABLE)``: refused;
    * every other call of :data:`SYSCALLS` not in :data:`PLAIN_ALLOWED`: refused.
    """
    deny = RET_ERRNO | (refuse_errno & 0xFFFF)
    a = _prologue("deny")
    a.jmp(_JEQ_K, NR_PRCTL, "prctl", 0)
    for name in sorted(PLAIN_SIGNAL_CALLS):
        a.jmp(_JEQ_K, SYSCALLS[name], "kill", 0)
    a.jmp(_JEQ_K, NR_PRLIMIT64, "kill", 0)
    for nr in sorted(SCHED_CALLS):
        a.jmp(_JEQ_K, nr, "kill", 0)  # the same test: pid 1 or -1 is refused
    a.jmp(_JEQ_K, NR_SETPRIORITY, "setpriority", 0)
    a.jmp(_JEQ_K, NR_IOPRIO_SET, "ioprio_set", 0)
    for nr in sorted({SYSCALLS[n] for n in plain_refused()}):
        a.jmp(_JEQ_K, nr, "deny", 0)
    a.ret(RET_ALLOW)
    a.label("clone")
    a.ld(_arg_lo(0))
    a.jmp(_JSET_K, CLONE_THREAD, "allow", 0)
    a.and_k(CLONE_VM | CLONE_VFORK)
    a.jmp(_JEQ_K, CLONE_VM | CLONE_VFORK, "allow", "deny")
    a.label("kill")  # the target: pid 1 (the supervisor) or -1 (every process) is refused
    a.ld(_arg_lo(0))
    a.jmp(_JEQ_K, 1, "hi0", 0)
    a.jmp(_JEQ_K, 0xFFFFFFFF, "deny", "allow")
    a.label("hi0")
    a.ld(_arg_hi(0))
    a.jmp(_JEQ_K, 0, "deny", "allow")
    # setpriority/ioprio_set: a user's processes (the supervisor's among them) are refused; a
    # process or group is refused when it is 1 (the supervisor, and its group)
    a.label("setpriority")
    a.ld(_arg_lo(0))
    a.jmp(_JEQ_K, PRIO_PROCESS, "target1", 0)
    a.jmp(_JEQ_K, PRIO_PGRP, "target1", "deny")
    a.label("ioprio_set")
    a.ld(_arg_lo(0))
    a.jmp(_JEQ_K, IOPRIO_WHO_PROCESS, "target1", 0)
    a.jmp(_JEQ_K, IOPRIO_WHO_PGRP, "target1", "deny")
    a.label("target1")
    a.ld(_arg_lo(1))
    a.jmp(_JEQ_K, 1, "deny", "allow")
    return _epilogue(a, "deny", deny)


# -- libc ----------------------------------------------------------------------------------------

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
        lib.ioctl.restype = ctypes.c_int
        lib.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
        lib.prctl.restype = ctypes.c_int
        lib.inotify_init1.argtypes = (ctypes.c_int,)
        lib.inotify_init1.restype = ctypes.c_int
        lib.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        lib.inotify_add_watch.restype = ctypes.c_int
        _libc = lib
    return _libc


# -- inotify: the kernel's own record of every use of the canary files ---------------------------

IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_OPEN = 0x1, 0x2, 0x4, 0x20
IN_MOVE_SELF, IN_DELETE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x800, 0x400, 0x4000, 0x8000
_WATCHED = {
    IN_OPEN: "open",
    IN_ACCESS: "read",
    IN_MODIFY: "write",
    IN_ATTRIB: "attrib",
    IN_MOVE_SELF: "move",
    IN_DELETE_SELF: "delete",
}
_IN_NONBLOCK_CLOEXEC = os.O_NONBLOCK | os.O_CLOEXEC
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


class CanaryWatch:
    """inotify watches on the planted credential files, held by the supervisor alone. The
    kernel queues an event for every open, read, write, move or removal of a watched file by
    any path (a link, ``..``, ``/proc/self/fd``, a path rewritten while the monitor looked at
    it): evidence the loader can neither see nor drain, since it never holds this descriptor."""

    def __init__(self, paths: list[str]) -> None:
        c = _c()
        self.fd = _check(c.inotify_init1(_IN_NONBLOCK_CLOEXEC), "inotify_init1")
        self.paths: dict[int, str] = {}
        mask = sum(_WATCHED)
        for path in paths:
            wd = c.inotify_add_watch(self.fd, os.fsencode(path), mask)
            if wd >= 0:
                self.paths[wd] = path
        self.seen: set[tuple[str, str]] = set()

    def begin(self) -> None:
        """Forget what was queued so far (the warm-up: trusted code): what follows is the job's."""
        self.take()
        self.seen.clear()

    def take(self) -> list[tuple[str, str]]:
        """(path, what) of the events queued since the last call, each pair once per watch's
        life (a read loop makes one event, not a million); ``("*", "overflow")`` when the
        kernel's queue overflowed."""
        out: list[tuple[str, str]] = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            if not data:
                return out
            at = 0
            while at + _INOTIFY_EVENT.size <= len(data):
                wd, mask, _cookie, n = _INOTIFY_EVENT.unpack_from(data, at)
                at += _INOTIFY_EVENT.size + n
                found = [("*", "overflow")] if mask & IN_Q_OVERFLOW else []
                path = self.paths.get(wd)
                if path is not None:
                    found += [(path, what) for bit, what in _WATCHED.items() if mask & bit]
                for pair in found:
                    if pair not in self.seen:
                        self.seen.add(pair)
                        out.append(pair)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def prctl(option: int, arg: int = 0) -> None:
    _check(_c().prctl(option, arg, 0, 0, 0), f"prctl({option})")


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install(self_pid: int) -> int:
    """In the loader: no-new-privs, then the notifying filter on all its threads. Returns the
    listener fd."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    sizes = (ctypes.c_ushort * 3)()
    _check(
        _c().syscall(
            ctypes.c_long(SYS_SECCOMP), ctypes.c_long(SECCOMP_GET_NOTIF_SIZES), ctypes.c_long(0), sizes
        ),
        "seccomp(GET_NOTIF_SIZES)",
    )
    if sizes[0] != NOTIF_SIZE or sizes[1] != RESP_SIZE:
        raise OSError(errno.EINVAL, f"unexpected seccomp_notif sizes {list(sizes)}")
    code = build_filter(self_pid)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    return _check(
        _c().syscall(
            ctypes.c_long(SYS_SECCOMP),
            ctypes.c_long(SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(INSTALL_FLAGS),
            ctypes.byref(prog),
        ),
        "seccomp(SET_MODE_FILTER)",
    )


def install_plain(self_pid: int, refuse_errno: int) -> None:
    """In the loader, under gVisor: no-new-privs, then :func:`build_plain_filter` on all its
    threads (no listener: there is nothing to hand over)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    code = build_plain_filter(self_pid, refuse_errno)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    unsynced = _check(
        _c().syscall(
            ctypes.c_long(SYS_SECCOMP),
            ctypes.c_long(SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC),
            ctypes.byref(prog),
        ),
        "seccomp(SET_MODE_FILTER)",
    )
    if unsynced:  # TSYNC without a listener names the thread it could not synchronise
        raise OSError(errno.ESRCH, f"seccomp(SET_MODE_FILTER): thread {unsynced} kept its filters")


def take_fd(pid: int, fd: int) -> int:
    """In the supervisor: a copy of ``pid``'s descriptor ``fd`` (pidfd_open + pidfd_getfd)."""
    pidfd = _check(
        _c().syscall(ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_long(pid), ctypes.c_long(0)), "pidfd_open"
    )
    try:
        return _check(
            _c().syscall(
                ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_long(pidfd), ctypes.c_long(fd), ctypes.c_long(0)
            ),
            "pidfd_getfd",
        )
    finally:
        os.close(pidfd)


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int
    nr: int
    arch: int
    args: tuple[int, ...]


def recv(listener: int) -> Notification | None:
    """One pending notification, or None if it vanished (its caller died or was interrupted)."""
    buf = ctypes.create_string_buffer(NOTIF_SIZE)  # must be zeroed: the kernel checks
    if _c().ioctl(listener, IOCTL_RECV, buf) < 0:
        e = ctypes.get_errno()
        if e in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
            return None
        raise OSError(e, f"SECCOMP_IOCTL_NOTIF_RECV: {os.strerror(e)}")
    nid, pid, _flags, nr, arch, _ip, *args = struct.unpack("<QIIIIQ6Q", buf.raw)
    return Notification(nid, pid, nr, arch, tuple(args))


def id_valid(listener: int, nid: int) -> bool:
    v = ctypes.c_uint64(nid)
    return bool(_c().ioctl(listener, IOCTL_ID_VALID, ctypes.byref(v)) == 0)


def respond(listener: int, nid: int, *, deny: int | None) -> None:
    """Answer: ``deny=None`` lets the kernel run the call; otherwise fail it with that errno."""
    if deny is None:
        raw = struct.pack("<QqiI", nid, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
    else:
        raw = struct.pack("<QqiI", nid, 0, -deny, 0)
    buf = ctypes.create_string_buffer(raw, RESP_SIZE)
    _c().ioctl(listener, IOCTL_SEND, buf)  # ENOENT: the caller is gone; nothing to answer


# -- reading the caller's memory ----------------------------------------------------------------


class Memory:
    """Reads from ``/proc/<pid>/mem`` of notifying tasks. Every filtered task shares the loader's
    memory (processes that do not are refused), so one descriptor usually serves all; others are
    opened on demand."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def _fd(self, pid: int) -> int | None:
        fd = self._fds.get(pid)
        if fd is None:
            if len(self._fds) > 64:
                self.close()
            try:
                fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            self._fds[pid] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, pid: int, addr: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``addr``; shorter where memory is unmapped."""
        fd = self._fd(pid)
        if fd is None or addr <= 0 or addr >= 1 << 47 or size <= 0:
            return b""
        out = bytearray()
        while len(out) < size:
            want = min(size - len(out), 4096 - (addr + len(out)) % 4096)
            try:
                chunk = os.pread(fd, want, addr + len(out))
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if len(chunk) < want:
                break
        return bytes(out)

    def cstr(self, pid: int, addr: int, limit: int = 4096) -> str | None:
        out = bytearray()
        while len(out) < limit:
            page_left = 4096 - (addr + len(out)) % 4096
            chunk = self.read(pid, addr + len(out), min(page_left, limit - len(out)))
            if not chunk:
                return None if not out else out.decode("utf-8", "surrogateescape")
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                return out.decode("utf-8", "surrogateescape")
            out += chunk
        return out.decode("utf-8", "surrogateescape") + "…"

    def u64s(self, pid: int, addr: int, count: int) -> list[int]:
        raw = self.read(pid, addr, 8 * count)
        return list(struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))


# -- decoding ------------------------------------------------------------------------------------

_MAX_LINKS = 40  # the kernel's limit on links followed in one walk


def resolve(path: str, pid: int, readlink: Callable[[str], str] = os.readlink) -> str:
    """The absolute ``path`` as the kernel walks it for process ``pid``: each link followed
    where it stands (before a ``..`` after it), ``/proc/self`` and ``/proc/thread-self`` as
    ``pid``'s. Below ``/proc/<pid>/`` the walk stops (its links are the kernel's own and name
    files, not paths): the rest is joined lexically."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    out: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
        if out[0] == "proc" and len(out) == 2 and part in ("self", "thread-self"):
            out[1] = str(pid)
        if out[0] == "proc" and len(out) >= 2:
            if len(out) > 2 or not parts:
                return os.path.normpath("/" + "/".join(out + parts))
            continue
        try:
            target = readlink("/" + "/".join(out))
        except (OSError, ValueError):
            continue  # not a link, or not there: the name stands
        links += 1
        if links > _MAX_LINKS:
            return os.path.normpath("/" + "/".join(out + parts))
        out.pop()
        if target.startswith("/"):
            out = []
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return "/" + "/".join(out)


AF_NAMES = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK", 17: "AF_PACKET"}
SOCK_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 5: "SOCK_SEQPACKET"}
_O_FLAGS = (
    (0o1, "O_WRONLY"),
    (0o2, "O_RDWR"),
    (0o100, "O_CREAT"),
    (0o200, "O_EXCL"),
    (0o1000, "O_TRUNC"),
    (0o2000, "O_APPEND"),
    (0o200000, "O_DIRECTORY"),
    (0o400000, "O_NOFOLLOW"),
    (0o20000000, "O_TMPFILE"),
    (0o10000000, "O_PATH"),
)
WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000 | 0o20000000
MAX_PAYLOAD = 64 * 1024


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def open_flags(flags: int) -> str:
    names = [n for bit, n in _O_FLAGS if flags & bit == bit]
    if not flags & 0o3:
        names.insert(0, "O_RDONLY")
    return "|".join(names)


def sockaddr(raw: bytes) -> dict[str, Any]:
    if len(raw) < 2:
        return {"family": "unknown"}
    fam = struct.unpack_from("<H", raw)[0]
    out: dict[str, Any] = {"family": AF_NAMES.get(fam, str(fam))}
    if fam == 2 and len(raw) >= 8:
        out["port"] = struct.unpack_from(">H", raw, 2)[0]
        out["address"] = ".".join(str(b) for b in raw[4:8])
    elif fam == 10 and len(raw) >= 24:
        import ipaddress

        out["port"] = struct.unpack_from(">H", raw, 2)[0]
        out["address"] = str(ipaddress.IPv6Address(raw[8:24]))
    elif fam == 1:
        path = raw[2:]
        if path[:1] == b"\0":
            out["path"] = "@" + path[1:].split(b"\0")[0].decode("utf-8", "replace")
        else:
            out["path"] = path.split(b"\0")[0].decode("utf-8", "replace")
    return out


def describe_addr(addr: dict[str, Any]) -> str:
    fam = addr.get("family", "?")
    if "port" in addr:
        host = addr.get("address", "?")
        return f"{fam} [{host}]:{addr['port']}" if fam == "AF_INET6" else f"{fam} {host}:{addr['port']}"
    if "path" in addr:
        return f"{fam} {addr['path']}"
    return str(fam)


@dataclass
class Decision:
    """What the supervisor makes of one notification."""

    kind: str
    detail: dict[str, Any] = field(default_factory=dict)
    deny: int | None = errno.EPERM  # None: let the kernel run the call
    record: bool = True  # False: counted, not kept as an event
    payload: bytes = b""  # data the call would send (searched for canaries)


# Path classes (the tables are in the protocol module: the host classifies gVisor's trace with them)
QUIET_READ_PREFIXES = P.QUIET_READ_PREFIXES
QUIET_EXACT = P.QUIET_EXACT
PROBE_PATHS = P.PROBE_PATHS
PROBE_PREFIXES = P.PROBE_PREFIXES
WRITABLE_PREFIXES = P.WRITABLE_PREFIXES
SENSITIVE_PREFIXES = P.SENSITIVE_PREFIXES


class Decoder:
    """Turns notifications into :class:`Decision` s. ``loader`` is the loader's pid;
    ``canary_files`` are the planted credential files."""

    def __init__(
        self,
        mem: Memory,
        loader: int,
        canary_files: frozenset[str],
        extra_quiet: tuple[str, ...] = (),
        *,
        memfds: bool = True,
    ) -> None:
        self.mem = mem
        self.memfds = memfds  # False (bwrap: no control group bounds them): memfd_create refused
        self.loader = loader
        self.canary_files = canary_files
        # reads under these prefixes are expected (the policy's events.allow_read)
        self.quiet_prefixes = QUIET_READ_PREFIXES + tuple(p for p in extra_quiet if p.startswith("/"))
        self.via_proc = False  # the last path argument went through a /proc link
        self._table: dict[str, Callable[[Notification], Decision]] = {
            "open": self._open,
            "openat": self._open,
            "openat2": self._open,
            "creat": self._open,
            "execve": self._exec,
            "execveat": self._exec,
            "socket": self._socket,
            "socketpair": self._socket,
            "connect": self._addr_call,
            "bind": self._addr_call,
            "sendto": self._sendto,
            "sendmsg": self._sendmsg,
            "sendmmsg": self._sendmsg,
            "listen": self._plain,
            "accept": self._plain,
            "accept4": self._plain,
            "clone": self._clone,
            "fork": self._plain,
            "vfork": self._vfork,
            "kill": self._kill,
            "tgkill": self._kill,
            "tkill": self._kill,
            "rt_sigqueueinfo": self._kill,
            "rt_tgsigqueueinfo": self._kill,
            "ptrace": self._ptrace,
            "process_vm_readv": self._target_pid,
            "process_vm_writev": self._target_pid,
            "pidfd_open": self._target_pid,
            "prlimit64": self._target_pid,
            **dict.fromkeys((*SCHED_CALLS.values(), "setpriority", "ioprio_set"), self._sched),
            "mprotect": self._prot,
            "pkey_mprotect": self._prot,
            "mmap": self._prot,
            "memfd_create": self._memfd,
            "prctl": self._prctl,
            "unlink": self._path_op,
            "unlinkat": self._path_op,
            "rename": self._path_op,
            "renameat": self._path_op,
            "renameat2": self._path_op,
            "link": self._path_op,
            "linkat": self._path_op,
            "symlink": self._path_op,
            "symlinkat": self._path_op,
            "chmod": self._path_op,
            "fchmodat": self._path_op,
            "fchmodat2": self._path_op,
            **dict.fromkeys(PATH_CHANGES | METADATA_CHANGES, self._path_op),
        }

    def decide(self, n: Notification) -> Decision:
        if n.arch != AUDIT_ARCH_X86_64 or n.nr & X32_SYSCALL_BIT:
            abi = "x32" if n.arch == AUDIT_ARCH_X86_64 else f"arch 0x{n.arch:08x}"
            return Decision("foreign_abi", {"abi": abi, "nr": n.nr & ~X32_SYSCALL_BIT})
        name = NAMES.get(n.nr, f"syscall_{n.nr}")
        handler = self._table.get(name, self._plain)
        d = handler(n)
        if not d.kind:
            d.kind = name
        return d

    # -- helpers ------------------------------------------------------------------------------
    def _path(self, pid: int, dirfd: int, addr: int) -> tuple[str, str]:
        """(path as given, absolute normalised path) for a path argument relative to dirfd."""
        given = self.mem.cstr(pid, addr)
        if given is None:
            return "<unreadable>", "<unreadable>"
        path = given
        if not path.startswith("/"):
            base = f"/proc/{pid}/cwd" if _i32(dirfd) == AT_FDCWD else f"/proc/{pid}/fd/{_i32(dirfd)}"
            try:
                path = os.readlink(base) + "/" + path
            except OSError:
                path = "<unknown>/" + path
        raw = path  # as the kernel walks it: a link is followed before a ".." after it
        path = os.path.normpath(path) if path.startswith("/") else path
        for alias in ("/proc/self", "/proc/thread-self"):
            if path == alias or path.startswith(alias + "/"):
                path = f"/proc/{pid}" + path[len(alias) :]
        # Links can only be planted in the writable places; /proc links name other files. The
        # path is walked as the kernel walks it for the caller, not in its lexical normal form:
        # "/tmp/l/../.aws/credentials" with /tmp/l -> /home/user/.aws/ normalises to a /tmp
        # path but opens the canary, and /tmp/p -> /proc/self/fd names the caller's descriptors.
        if raw.startswith("/") and (path.startswith(("/tmp/", "/home/", "/proc/")) or ".." in raw.split("/")):
            path = resolve(raw, pid)
        # A /proc link may name a file of another mount (the input is the host's file): its
        # resolved name says nothing about where a write would land, so no write goes that way.
        self.via_proc = path.startswith("/proc/")
        if path in (f"/proc/{pid}/fd/{P.INPUT_FD}", f"/proc/{self.loader}/fd/{P.INPUT_FD}"):
            return given, P.INPUT_ALIAS  # the input, reopened through its descriptor
        return given, path

    def _classify(self, path: str, pid: int) -> str:
        return P.classify_path(
            path,
            canary_files=self.canary_files,
            own=(f"/proc/{pid}/", f"/proc/{self.loader}/"),
            quiet_prefixes=self.quiet_prefixes,
        )

    # -- handlers -----------------------------------------------------------------------------
    def _plain(self, n: Notification) -> Decision:
        return Decision("", {})

    def _open(self, n: Notification) -> Decision:
        name = NAMES[n.nr]
        if name in ("open", "creat"):
            dirfd, addr = AT_FDCWD, n.args[0]
            flags = 0o1101 if name == "creat" else n.args[1]
        elif name == "openat":
            dirfd, addr, flags = n.args[0], n.args[1], n.args[2]
        else:  # openat2: struct open_how {u64 flags; u64 mode; u64 resolve}
            dirfd, addr = n.args[0], n.args[1]
            how = self.mem.u64s(n.pid, n.args[2], 1)
            flags = how[0] if how else 0
        given, path = self._path(n.pid, dirfd, addr)
        cls = self._classify(path, n.pid)
        writing = bool(flags & WRITE_FLAGS)
        detail: dict[str, Any] = {"path": path, "flags": open_flags(flags), "class": cls}
        if given != path:
            detail["given"] = given
        if writing:
            ok = not self.via_proc and (path.startswith(WRITABLE_PREFIXES) or path in ("/dev/null", "/tmp"))
            detail["write"] = True
            if ok and path.startswith(P.LOADER_SCRATCH):
                detail["class"] = "loader_scratch"  # torch's own extraction of a legacy tar
            elif ok and path not in ("/dev/null", "/tmp"):
                detail["class"] = "scratch"
            # every write is kept: legitimate deserialisation writes nothing, and a write in the
            # sandbox's scratch space would land in the user's files under a plain torch.load
            return Decision(
                name, detail, deny=None if ok else errno.EPERM, record=path not in ("/dev/null", "/tmp")
            )
        return Decision(name, detail, deny=None, record=cls != "quiet")

    def _exec(self, n: Notification) -> Decision:
        name = NAMES[n.nr]
        if name == "execve":
            dirfd, addr, argv_p = AT_FDCWD, n.args[0], n.args[1]
        else:
            dirfd, addr, argv_p = n.args[0], n.args[1], n.args[2]
        given, path = self._path(n.pid, dirfd, addr)
        argv: list[str] = []
        total = 0
        for ptr in self.mem.u64s(n.pid, argv_p, 65):
            if ptr == 0 or len(argv) >= 64 or total > 16384:
                break
            s = self.mem.cstr(n.pid, ptr, 4096) or ""
            argv.append(s)
            total += len(s)
        blob = "\0".join(argv).encode("utf-8", "surrogateescape")
        return Decision(
            name, {"path": given if given != "<unreadable>" else path, "argv": argv}, payload=blob
        )

    def _socket(self, n: Notification) -> Decision:
        fam, typ = _i32(n.args[0]), _i32(n.args[1])
        detail = {
            "family": AF_NAMES.get(fam, str(fam)),
            "type": SOCK_TYPES.get(typ & 0xF, str(typ & 0xF)),
            "protocol": _i32(n.args[2]),
        }
        # Creating a socket is let through (there is no network to reach); using one is not.
        return Decision("", detail, deny=None)

    def _addr(self, pid: int, addr: int, length: int) -> dict[str, Any]:
        if not addr:
            return {}
        return sockaddr(self.mem.read(pid, addr, max(0, min(_i32(length), 128))))

    def _addr_call(self, n: Notification) -> Decision:
        a = self._addr(n.pid, n.args[1], n.args[2])
        payload = a.get("path", "").encode("utf-8", "surrogateescape")
        return Decision("", {"fd": _i32(n.args[0]), **a, "target": describe_addr(a)}, payload=payload)

    def _sendto(self, n: Notification) -> Decision:
        size = min(n.args[2], MAX_PAYLOAD)
        data = self.mem.read(n.pid, n.args[1], size)
        a = self._addr(n.pid, n.args[4], n.args[5])
        detail: dict[str, Any] = {"fd": _i32(n.args[0]), "bytes": n.args[2], **a, "preview": _preview(data)}
        if a:
            detail["target"] = describe_addr(a)
        return Decision("", detail, payload=data)

    def _sendmsg(self, n: Notification) -> Decision:
        # struct msghdr {void *name; u32 namelen; iovec *iov; size_t iovlen; ...}
        raw = self.mem.read(n.pid, n.args[1], 56)
        if len(raw) < 32:
            return Decision("", {"fd": _i32(n.args[0])})
        name_p, name_len, iov_p, iov_len = struct.unpack_from("<QI4xQQ", raw)
        a = self._addr(n.pid, name_p, name_len)
        data = bytearray()
        iov = self.mem.u64s(n.pid, iov_p, 2 * min(iov_len, 16))
        total = 0
        for base, length in zip(iov[::2], iov[1::2], strict=False):
            total += length
            if len(data) < MAX_PAYLOAD:
                data += self.mem.read(n.pid, base, min(length, MAX_PAYLOAD - len(data)))
        detail: dict[str, Any] = {
            "fd": _i32(n.args[0]),
            "bytes": total,
            **a,
            "preview": _preview(bytes(data)),
        }
        if a:
            detail["target"] = describe_addr(a)
        return Decision("", detail, payload=bytes(data))

    def _clone(self, n: Notification) -> Decision:
        flags = n.args[0]
        detail = {"flags": f"0x{flags:x}"}
        if flags & (CLONE_VM | CLONE_VFORK) == CLONE_VM | CLONE_VFORK:
            detail["style"] = "vfork"
            return Decision("", detail, deny=None)  # see the module docstring
        detail["style"] = "fork"
        return Decision("", detail)

    def _vfork(self, n: Notification) -> Decision:
        return Decision("", {"style": "vfork"}, deny=None)

    def _kill(self, n: Notification) -> Decision:
        name = NAMES[n.nr]
        target = _i32(n.args[0])
        sig = _i32(n.args[2] if name in ("tgkill", "rt_tgsigqueueinfo") else n.args[1])
        detail = {"target": target, "signal": sig}
        if name in ("tkill",):  # a thread id: allowed if it is a thread of the caller's process
            mine = os.path.exists(f"/proc/{n.pid}/task/{target}")
            return Decision(
                "", {**detail, "own_thread": mine}, deny=None if mine else errno.EPERM, record=not mine
            )
        if target in (1, -1):
            detail["supervisor"] = True
            return Decision("", detail)
        return Decision("", detail, deny=None)

    def _ptrace(self, n: Notification) -> Decision:
        return Decision(
            "", {"request": _i32(n.args[0]), "target": _i32(n.args[1]), "supervisor": _i32(n.args[1]) == 1}
        )

    def _target_pid(self, n: Notification) -> Decision:
        target = _i32(n.args[0])
        return Decision("", {"target": target, "supervisor": target == 1})

    def _sched(self, n: Notification) -> Decision:
        """Scheduling of a process other than the caller: refused (and an attack) when it
        reaches the supervisor (its pid or group, every process of the uid); a thread of the
        caller's own (``pthread_setaffinity_np`` names it by its thread id): allowed and only
        counted; another sandbox process (the loader's child): allowed and recorded."""
        name = NAMES[n.nr]
        supervisor = {1, os.getpid()}
        if name in ("setpriority", "ioprio_set"):
            process, group = (
                (PRIO_PROCESS, PRIO_PGRP) if name == "setpriority" else (IOPRIO_WHO_PROCESS, IOPRIO_WHO_PGRP)
            )
            which, who = _i32(n.args[0]), _i32(n.args[1])
            kind = {process: "process", group: "group"}.get(which, "user")
            detail: dict[str, Any] = {"which": kind, "target": who}
            if kind == "user":
                return Decision("", {**detail, "supervisor": True})
            if kind == "group":
                try:
                    ours = os.getpgid(0)
                    theirs = os.getpgid(n.pid) if who == 0 else who
                except OSError:
                    theirs = ours = -1
                if theirs == ours or who in supervisor:
                    return Decision("", {**detail, "supervisor": True})
                return Decision("", detail, deny=None)
            target = who
        else:
            target = _i32(n.args[0])
            detail = {"target": target}
        if target in supervisor or target == -1:
            return Decision("", {**detail, "supervisor": True})
        if target == 0 or os.path.exists(f"/proc/{n.pid}/task/{target}"):
            return Decision("", detail, deny=None, record=False)
        return Decision("", detail, deny=None)

    def _prot(self, n: Notification) -> Decision:
        name = NAMES[n.nr]
        prot = n.args[2]
        detail = {
            "length": n.args[1],
            "prot": "".join(c for b, c in ((1, "r"), (2, "w"), (4, "x")) if prot & b),
        }
        if name == "mmap":
            detail["anonymous"] = True
        # Recorded, not refused: JIT compilers and some libraries do this legitimately.
        return Decision("", detail, deny=None)

    def _memfd(self, n: Notification) -> Decision:
        detail = {"name": self.mem.cstr(n.pid, n.args[0], 256) or ""}
        if self.memfds:
            return Decision("", detail, deny=None)
        # no control group bounds a memfd's pages (RLIMIT_AS counts only those mapped): refused
        return Decision("", detail | {"reason": "no control group bounds its memory"})

    def _prctl(self, n: Notification) -> Decision:
        option = _i32(n.args[0])
        return Decision(
            "",
            {
                "option": {PR_SET_SECCOMP: "PR_SET_SECCOMP", PR_SET_DUMPABLE: "PR_SET_DUMPABLE"}.get(
                    option, str(option)
                ),
                "value": n.args[1],
            },
        )

    def _fd_path(self, pid: int, fd: int) -> str:
        """The file a descriptor of ``pid`` names (``/proc/<pid>/fd/<n>``): its path as the
        kernel keeps it (``... (deleted)`` once unlinked; a memfd or pipe names no path)."""
        self.via_proc = False
        try:
            return os.readlink(f"/proc/{pid}/fd/{_i32(fd)}")
        except OSError:
            return "<unknown>"

    def _path_op(self, n: Notification) -> Decision:
        name = NAMES[n.nr]
        # (dirfd index or None, path index) of each path argument; (fd index, None) for a call
        # on a descriptor's file
        spec: dict[str, list[tuple[int | None, int | None]]] = {
            "unlink": [(None, 0)],
            "rename": [(None, 0), (None, 1)],
            "link": [(None, 0), (None, 1)],
            "symlink": [(None, 1)],
            "chmod": [(None, 0)],
            "unlinkat": [(0, 1)],
            "renameat": [(0, 1), (2, 3)],
            "renameat2": [(0, 1), (2, 3)],
            "linkat": [(0, 1), (2, 3)],
            "symlinkat": [(1, 2)],
            "fchmodat": [(0, 1)],
            "fchmodat2": [(0, 1)],
            **{c: [(None, 0)] for c in ("truncate", "mkdir", "rmdir", "chown", "lchown", "utime", "utimes")},
            **{c: [(0, 1)] for c in ("mkdirat", "fchownat", "futimesat", "utimensat")},
            **{c: [(None, 0)] for c in ("setxattr", "lsetxattr", "removexattr", "lremovexattr")},
            **{c: [(0, None)] for c in ("fchmod", "fchown", "fsetxattr", "fremovexattr")},
        }
        paths = []
        for dfd, idx in spec[name]:
            if idx is None or (name in ("utimensat", "futimesat") and n.args[idx] == 0):
                # fchmod(fd), futimens(fd), futimesat(fd, NULL): the descriptor's file
                paths.append(self._fd_path(n.pid, n.args[0] if dfd is None else n.args[dfd]))
                continue
            paths.append(self._path(n.pid, AT_FDCWD if dfd is None else n.args[dfd], n.args[idx])[1])
        detail: dict[str, Any] = {"paths": paths}
        if name in METADATA_CHANGES and "xattr" in name:  # the attribute's name (argument 1)
            detail["attribute"] = self.mem.cstr(n.pid, n.args[1], 256) or ""
        if (
            name in ("mkdir", "mkdirat")
            and paths[0].startswith("/opt/python/")
            and paths[0].endswith("/__pycache__")
        ):
            # an import writing bytecode beside an installed module: the read-only root refuses
            return Decision(name, detail, deny=None, record=False)
        if name in ("symlink", "symlinkat"):
            detail["target"] = self.mem.cstr(n.pid, n.args[0]) or ""
        ok = all(p.startswith(WRITABLE_PREFIXES) for p in paths) and not self.via_proc
        detail["class"] = (
            "loader_scratch"
            if ok and all((p + "/").startswith(P.LOADER_SCRATCH) for p in paths)  # the directory too
            else "scratch"
            if ok
            else "outside"
        )
        return Decision(name, detail, deny=None if ok else errno.EPERM)


def _preview(data: bytes, limit: int = 256) -> str:
    return data[:limit].decode("latin-1")


def wait_readable(fds: list[int], timeout_s: float) -> set[int]:
    """The subset of ``fds`` that is readable (or hung up) within ``timeout_s``."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    try:
        return {fd for fd, _ in p.poll(max(0, int(timeout_s * 1000)))}
    except InterruptedError:
        return set()
