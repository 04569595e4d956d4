"""Every hardening option of the container, asserted on the typed spec (no daemon needed)."""

from __future__ import annotations

import json

import pytest

from sandbox import Policy
from sandbox._launch import ContainerSpec, make_job, make_spec
from sandbox._worker import _protocol as P
from sandbox._worker import _seccomp
from sandbox.policy import seccomp_profile


@pytest.fixture
def spec() -> ContainerSpec:
    return make_spec(Policy.default(), image="model-sandbox-worker:test")


CHANNEL = "/tmp/model-sandbox-work-1-ch-x"


def test_network_capabilities_privileges(spec: ContainerSpec) -> None:
    cfg = spec.engine_config(CHANNEL)
    kw = cfg["HostConfig"]
    assert kw["NetworkMode"] == "none"
    assert kw["CapDrop"] == ["ALL"] and "CapAdd" not in kw
    assert kw["Privileged"] is False
    assert "no-new-privileges:true" in kw["SecurityOpt"]
    assert kw["IpcMode"] == "none"
    assert cfg["User"] == "65534:65534"
    # nothing of the engine's that would widen it
    assert not {"Binds", "Devices", "PidMode", "UsernsMode", "CgroupnsMode", "Sysctls"} & set(kw)


def test_filesystem(spec: ContainerSpec) -> None:
    cfg = spec.engine_config(CHANNEL)
    kw = cfg["HostConfig"]
    assert kw["ReadonlyRootfs"] is True
    assert set(kw["Tmpfs"]) <= {"/tmp", P.CANARY_HOME}
    for options in kw["Tmpfs"].values():
        assert {"noexec", "nosuid", "nodev"} <= set(options.split(","))
        assert "size=" in options
    # the one host path inside is the channel's directory, read-only: nothing of the host is
    # writable from the sandbox, and the input arrives as a descriptor, not a mount
    mounts = {m["Target"]: m for m in kw["Mounts"]}
    assert set(mounts) == {P.CHANNEL_DIR}
    assert mounts[P.CHANNEL_DIR]["ReadOnly"] is True and mounts[P.CHANNEL_DIR]["Source"] == CHANNEL
    assert mounts[P.CHANNEL_DIR]["Type"] == "bind"
    for m in kw["Mounts"]:
        assert "docker.sock" not in m["Source"] and not m["Source"].startswith(("/root", "/home"))
    assert "Binds" not in kw and "Volumes" not in cfg


def test_environment_is_empty(spec: ContainerSpec) -> None:
    assert spec.engine_config(CHANNEL)["Env"] == []


def test_limits(spec: ContainerSpec) -> None:
    kw = spec.engine_config(CHANNEL)["HostConfig"]
    lim = Policy.default().limits
    assert kw["Memory"] == kw["MemorySwap"] == lim.memory_mb * 2**20  # no swap
    assert kw["PidsLimit"] == lim.pids
    assert kw["NanoCpus"] == int(lim.cpus * 1e9)
    assert {u["Name"]: u["Hard"] for u in kw["Ulimits"]}["core"] == 0
    assert kw["LogConfig"]["Config"]["max-size"] == "1m"  # payload output cannot fill the disk
    job = make_job(Policy.default(), input_fd=3, input_size=10 * 2**20)
    cfg = json.loads(job.config.to_json())
    assert cfg["wall_clock_s"] == lim.wall_clock_s
    assert cfg["max_output_bytes"] == job.output_bytes == lim.output_bytes(10 * 2**20)
    assert P.JobConfig.from_json(job.config.to_json()) == job.config


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"[]",
        b"{",
        b"[" * 50_000,
        b'{"wall_clock_s": 1e999}',
        b'{"cpu_s": -1}',
        b'{"fatal": ["everything"]}',
        b'{"errno": true}',
        b'{"extra": 1}',
        b"\xff",
    ],
)
def test_job_config_parsing_is_total(junk: bytes) -> None:
    with pytest.raises(P.ProtocolError):
        P.JobConfig.from_json(junk)


def test_output_cap_scales_with_input_within_the_ceiling() -> None:
    lim = Policy.default().limits
    assert lim.output_bytes(0) == 256 * 2**20
    assert lim.output_bytes(2**30) == int(4.0 * 2**30) + 64 * 2**20
    assert lim.output_bytes(2**50) == lim.output_mb * 2**20


def test_seccomp_profile_is_ours_and_denies_by_default(spec: ContainerSpec) -> None:
    opts = [o for o in spec.engine_config(CHANNEL)["HostConfig"]["SecurityOpt"] if o.startswith("seccomp=")]
    assert len(opts) == 1
    profile = json.loads(opts[0].removeprefix("seccomp="))
    assert profile == json.loads(seccomp_profile())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    # foreign ABIs reach the loader's filter, which refuses and reports them all
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    allowed: set[str] = set()
    for rule in profile["syscalls"]:
        assert rule.get("comment"), f"uncommented group {rule['names']}"
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args"):
            allowed |= set(rule["names"])
    # never allowed at all
    for dangerous in (
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "perf_event_open",
        "kexec_load",
        "init_module",
        "finit_module",
        "delete_module",
        "reboot",
        "userfaultfd",
        "open_by_handle_at",
        "io_uring_setup",
        "mknod",
        "syslog",
        "clone",
        "swapon",
        "iopl",
        "ioperm",
    ):
        assert dangerous not in allowed, dangerous
    # allowed in the container only so that the loader's own filter reports them; the
    # supervisor refuses them (its default answer is EPERM)
    for watched in (
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "mount",
        "umount2",
        "bpf",
        "keyctl",
        "add_key",
        "request_key",
        "setuid",
        "setgid",
        "setresuid",
        "pidfd_open",
        "pidfd_getfd",
        "execve",
        "execveat",
        "connect",
        "sendto",
    ):
        assert watched in _seccomp.SYSCALLS, f"{watched} is allowed but not reported"
    clone = [r for r in profile["syscalls"] if "clone" in r["names"]]
    assert clone and all(
        r["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" for r in clone if r["action"] == "SCMP_ACT_ALLOW"
    )


def test_spec_is_frozen(spec: ContainerSpec) -> None:
    with pytest.raises(AttributeError):
        spec.image = "other"  # type: ignore[misc]
