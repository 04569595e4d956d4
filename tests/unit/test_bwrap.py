"""The bubblewrap runner's pure parts: its options, its limits and the seccomp profile compiled
to classic BPF (run here by a small interpreter of the instructions the compiler emits)."""

from __future__ import annotations

import errno
import json

import pytest

from sandbox import _bwrap, _launch
from sandbox._syscalls import X86_64
from sandbox._worker import _protocol as P
from sandbox._worker import _seccomp as S  # the constants the loader's filter uses
from sandbox.errors import PolicyError
from sandbox.policy import Policy, seccomp_profile
from tests.fakes import run_bpf

ARCH_I386 = 0x40000003


@pytest.fixture(scope="module")
def program() -> bytes:
    return _bwrap.compile_profile(seccomp_profile())


def test_the_profile_compiles_within_the_kernel_bound(program: bytes) -> None:
    assert len(program) % 8 == 0 and len(program) // 8 <= 4096  # BPF_MAXINSNS


def test_the_compiled_filter_answers_as_the_profile_says(program: bytes) -> None:
    profile = json.loads(seccomp_profile())
    deny = S.RET_ERRNO | errno.EPERM
    plain = {
        n
        for r in profile["syscalls"]
        if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
        for n in r["names"]
    }
    for name in plain:
        assert run_bpf(program, X86_64[name]) == S.RET_ALLOW, name
    for name, nr in X86_64.items():
        if not any(name in r["names"] for r in profile["syscalls"]):
            assert run_bpf(program, nr) == deny, name
    for name in (
        "unshare",
        "setns",
        "pivot_root",
        "chroot",
        "kexec_load",
        "init_module",
        "userfaultfd",
        "perf_event_open",
        "mknod",
        "open_by_handle_at",
    ):
        assert run_bpf(program, X86_64[name]) == deny, name
    assert run_bpf(program, X86_64["clone3"]) == S.RET_ERRNO | errno.ENOSYS


def test_argument_checks_are_compiled(program: bytes) -> None:
    clone = X86_64["clone"]
    assert run_bpf(program, clone, (0x3D0F00,)) == S.RET_ALLOW  # threads (glibc's flags)
    assert run_bpf(program, clone, (0x11,)) == S.RET_ALLOW  # a plain child (SIGCHLD)
    for ns_flag in (
        0x10000000,
        0x20000000,
        0x40000000,
        0x00020000,
        0x04000000,
        0x08000000,
        0x02000000,
    ):  # NEWUSER, NEWPID, NEWNET, NEWNS, NEWUTS, NEWIPC, NEWCGROUP
        assert run_bpf(program, clone, (0x11 | ns_flag,)) == S.RET_ERRNO | errno.EPERM
    pers = X86_64["personality"]
    assert run_bpf(program, pers, (0,)) == S.RET_ALLOW
    assert run_bpf(program, pers, (0xFFFFFFFF,)) == S.RET_ALLOW  # the query
    assert run_bpf(program, pers, (0x0040000,)) == S.RET_ERRNO | errno.EPERM  # ADDR_NO_RANDOMIZE
    assert run_bpf(program, pers, (1 << 32,)) == S.RET_ERRNO | errno.EPERM  # the high word counts


def test_foreign_abis_reach_the_loaders_filter_and_run_nowhere_else(program: bytes) -> None:
    # RET_TRACE ranks below the loader's USER_NOTIF (which reports and refuses) and, with no
    # tracer, fails the call with ENOSYS for a process without that filter
    assert run_bpf(program, 20, arch=ARCH_I386) == _bwrap.RET_TRACE
    assert run_bpf(program, S.X32_SYSCALL_BIT | 39) == _bwrap.RET_TRACE
    # the kernel applies the action with the lowest value of all filters: ERRNO, then the
    # loader's USER_NOTIF, then this TRACE
    assert S.RET_ERRNO < S.RET_USER_NOTIF < _bwrap.RET_TRACE < S.RET_ALLOW


def test_unsupported_profiles_are_refused() -> None:
    profile = json.loads(seccomp_profile())
    for change in (
        {"defaultAction": "SCMP_ACT_ALLOW"},
        {"syscalls": [{"names": ["read"], "action": "SCMP_ACT_TRACE"}]},
        {"syscalls": [{"names": ["no_such_call"], "action": "SCMP_ACT_ALLOW"}]},
        {
            "syscalls": [
                {
                    "names": ["read"],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_GT"}],
                }
            ]
        },
    ):
        with pytest.raises(ValueError):
            _bwrap.compile_profile(json.dumps({**profile, **change}))


def test_bwrap_options_carry_the_isolation_contract() -> None:
    spec = _launch.make_spec(Policy.default(), image="model-sandbox-worker:test")
    args = _bwrap.bwrap_args(
        spec,
        rootfs_fd=10,
        channel_fd=11,
        seccomp_fd=12,
        info_fd=13,
        hostname="ws-box12",
        etc_fds={"/etc/hostname": 14, "/etc/hosts": 15},
        prepare=False,
    )
    for flag in (
        "--unshare-all",
        "--unshare-user",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--clearenv",
    ):
        assert flag in args, flag
    assert "--share-net" not in args
    joined = " ".join(args)
    assert "--uid 65534 --gid 65534" in joined and "--cap-drop ALL" in joined
    assert "--ro-bind-fd 10 /" in joined  # read-only root
    assert f"--ro-bind-fd 11 {P.CHANNEL_DIR}" in joined  # the one host path, read-only
    # no other host path: every other mount is made fresh
    assert not {"--bind", "--ro-bind", "--dev-bind", "--bind-fd"} & set(args)
    assert f"--size {spec.tmp_bytes} --tmpfs /tmp" in joined
    assert f"--perms 0700 --size {2**20} --tmpfs {P.CANARY_HOME}" in joined
    assert "--seccomp 12" in joined and "--info-fd 13" in joined
    # an ordinary machine's /etc/hostname and /etc/hosts, copied in (not host paths)
    assert "--ro-bind-data 14 /etc/hostname" in joined and "--ro-bind-data 15 /etc/hosts" in joined
    assert "--hostname ws-box12" in joined
    assert _bwrap.etc_files("ws-box12")["/etc/hostname"] == b"ws-box12\n"
    tail = args[args.index("--") + 1 :]
    # the boot interpreter imports nothing and re-executes the supervisor with no environment
    # (bwrap's --clearenv still leaves PWD)
    assert tail == [
        "/opt/python/bin/python3",
        "-I",
        "-S",
        "-c",
        P.BOOT,
        f"{P.NPROC}{spec.pids}",
        P.SHMEM_UNBOUNDED,
        P.COLD,
    ]


def test_rlimits_follow_the_policy() -> None:
    policy = Policy.default()
    spec = _launch.make_spec(policy, image="x")
    limits = dict(_bwrap.rlimits(spec))
    assert limits["RLIMIT_AS"] == policy.limits.memory_mb * 2**20
    assert limits["RLIMIT_CPU"] == int(policy.limits.cpu_s) + 30
    assert limits["RLIMIT_FSIZE"] == policy.limits.output_mb * 2**20
    assert limits["RLIMIT_NOFILE"] == 1024 and limits["RLIMIT_CORE"] == 0
    assert "RLIMIT_NPROC" not in limits  # the supervisor's, inside the namespace
    assert set(_bwrap.LIMITS) >= {
        "memory",
        "pids",
        "cpu_time",
        "file_size",
        "open_files",
        "wall_clock",
        "cpus",
    }


def test_the_runner_is_chosen_by_name_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_launch.RUNNER_ENV, raising=False)
    assert _launch.runner_kind() == "auto"
    monkeypatch.setenv(_launch.RUNNER_ENV, "BWRAP")
    assert _launch.runner_kind() == "bwrap"
    assert _launch.runner_kind("docker") == "docker"
    assert isinstance(_launch.make_runner(), _bwrap.BwrapRunner)
    with pytest.raises(PolicyError, match="unknown runner 'podman'"):
        _launch.runner_kind("podman")


def test_auto_falls_back_to_bwrap_without_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/model-sandbox-test.sock")
    runner = _launch.make_runner("auto")
    assert isinstance(runner, _bwrap.BwrapRunner) and runner.name == "bwrap"


def test_the_userns_error_names_the_sysctls() -> None:
    err = _bwrap._userns_error("bwrap: No permissions to create new namespace")
    assert "kernel.unprivileged_userns_clone=" in err.message
    assert "user.max_user_namespaces=" in err.message
    assert "kernel.apparmor_restrict_unprivileged_userns=" in err.message
    assert "sysctl" in err.hint and err.reference == "engine-unavailable"


def test_the_root_filesystem_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/tmp")
    assert str(_bwrap.cache_root()) == "/var/tmp/model-sandbox/rootfs"
