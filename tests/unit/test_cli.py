"""The command line without a sandbox: its parser, help texts, pins, exit codes, the commands
that never start one (--static-only scans, policy, lock, image tag) and how errors are shown."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import _cli, _files, _image
from sandbox._cli import EXIT_CLEAN, EXIT_ERROR, EXIT_UNSAFE
from tests import checkpoints as ck

COMMANDS = [
    ["scan"],
    ["convert"],
    ["bom"],
    ["lock"],
    ["image"],
    ["image", "build"],
    ["image", "tag"],
    ["policy"],
    ["policy", "show"],
    ["policy", "check"],
    ["patch"],
    ["patch", "install"],
    ["patch", "uninstall"],
    ["report"],
    ["report", "render"],
]


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_every_command_has_help(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli.main([*words, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: model-sandbox {' '.join(words)}")


def test_help_names_every_subcommand_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _cli.main(["--help"])
    out = capsys.readouterr().out
    assert "0 clean, 1 unsafe, 2 error" in out
    for word in ("scan", "convert", "bom", "lock", "image", "policy", "patch", "report"):
        assert word in out


def test_runner_choices_are_checked_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli.main(["scan", "--runner", "podman", "x.pt"])
    assert exc.value.code == 2
    assert "invalid choice: 'podman'" in capsys.readouterr().err


def test_pins_are_hex_or_file_colon_hex() -> None:
    h = "AB" * 32
    assert _cli._pin(h) == (None, h.lower())
    assert _cli._pin(f"dir/a:b.pt:{h}") == ("dir/a:b.pt", h.lower())  # the last colon splits
    for bad in ("", "abc", f":{h}", f"x.pt:{h[:-1]}", f"x.pt{h}"):
        with pytest.raises(argparse.ArgumentTypeError):
            _cli._pin(bad)


def test_report_shorthand() -> None:
    assert _cli._shorthand(["report", "r.json"]) == ["report", "render", "r.json"]
    assert _cli._shorthand(["-v", "report", "r.json", "--html", "o"]) == [
        "-v",
        "report",
        "render",
        "r.json",
        "--html",
        "o",
    ]
    assert _cli._shorthand(["report", "render", "r.json"]) == ["report", "render", "r.json"]
    assert _cli._shorthand(["scan", "report"]) == ["scan", "report"]  # a file named report


def test_static_only_scan_exit_codes_and_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    benign = ck.save(ck.state_dict(), tmp_path / "benign.pt")
    hostile = ck.save(ck.hostile_checkpoint(ck.exec_payload("pass")), tmp_path / "hostile.pt")
    assert _cli.main(["scan", "--static-only", str(benign)]) == EXIT_CLEAN
    assert "benign.pt" in capsys.readouterr().out
    assert _cli.main(["scan", "--static-only", "--format", "json", str(benign), str(hostile)]) == EXIT_UNSAFE
    reports = json.loads(capsys.readouterr().out)
    assert [r["verdict"] for r in reports] == ["clean", "malicious"]
    assert _cli.main(["scan", "--static-only", "--format", "sarif", str(hostile)]) == EXIT_UNSAFE
    sarif = json.loads(capsys.readouterr().out)
    assert sarif["version"] == "2.1.0" and sarif["runs"][0]["results"]


def test_static_only_scan_needs_no_engine(tmp_path: Path) -> None:
    import pickle

    import torch

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (eval, ("1 + 1",))

    torch.save({"w": torch.ones(2)}, tmp_path / "good.pt")
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"x": Payload()}))
    env = {**__import__("os").environ, "DOCKER_HOST": "unix:///nonexistent.sock"}
    run = [sys.executable, "-m", "sandbox", "scan", "--static-only", "--format", "json"]
    good = subprocess.run(
        [*run, str(tmp_path / "good.pt")], capture_output=True, text=True, env=env, check=False
    )
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["static"]["format"] == "torch-zip"
    bad = subprocess.run(
        [*run, str(tmp_path / "bad.pkl")], capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["verdict"] == "malicious" and "builtins.eval" in report["static"]["dangerous"]


def test_errors_are_one_clean_message_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["scan", "--static-only", str(tmp_path / "missing.pt")]) == EXIT_ERROR
    assert _cli.main(["convert", str(tmp_path / "missing.pt")]) == EXIT_ERROR
    out = capsys.readouterr()
    assert out.out.count("error[input-not-found]") == 2 and "Traceback" not in out.out + out.err
    # a policy that cannot be read: one message on stderr, nothing started
    assert _cli.main(["scan", "--static-only", "x.pt", "--policy", str(tmp_path / "nope.toml")]) == EXIT_ERROR
    out = capsys.readouterr()
    assert "nope.toml" in out.err and "Traceback" not in out.err and not out.out
    # a control character in a name reaches the terminal escaped, never raw
    odd = tmp_path / "a\x1b[31mred.pt"
    assert _cli.main(["scan", "--static-only", str(odd)]) == EXIT_ERROR
    out = capsys.readouterr()
    assert "red.pt" in out.out and "\x1b" not in out.out + out.err


def test_pinning_a_directory_with_plain_hex_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        _cli.main(["convert", str(tmp_path), "-o", str(tmp_path / "out"), "--expect-sha256", "0" * 64])
        == EXIT_ERROR
    )
    assert "FILE:HEX" in capsys.readouterr().err


def test_policy_show_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["policy", "show", "default"]) == 0
    assert json.loads(capsys.readouterr().out)
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmemory_mb = -1\nno_such_key = 1\n")
    assert _cli.main(["policy", "check", str(bad)]) != 0
    out = capsys.readouterr()
    assert "bad.toml" in out.out + out.err


def test_policy_cli_check_and_show(tmp_path: Path) -> None:
    good = tmp_path / "p.toml"
    good.write_text('name = "mine"\ndescription = "for tests"\n[limits]\nwall_clock_s = 10\n')
    run = [sys.executable, "-m", "sandbox", "policy"]
    out = subprocess.run([*run, "check", str(good)], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "valid policy 'mine'" in out.stdout
    (tmp_path / "bad.toml").write_text("name = 3\n")
    out = subprocess.run(
        [*run, "check", str(tmp_path / "bad.toml")], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and "'name' is required" in out.stderr
    out = subprocess.run([*run, "show", "strict"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["fail_on"] == "suspicious"


def test_lock_prints_sha256sum_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ck.save(ck.state_dict(), tmp_path / "m.pt")
    (tmp_path / "notes.txt").write_text("not a model")
    monkeypatch.chdir(tmp_path)
    assert _cli.main(["lock", "."]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    digest = _files.sha256_file(str(tmp_path / "m.pt"))[0]
    assert lines == [f"{digest}  m.pt"]


def test_image_tag_is_the_content_derived_tag(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["image", "tag"]) == 0
    assert capsys.readouterr().out.strip() == _image.image_tag()
