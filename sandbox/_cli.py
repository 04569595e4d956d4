"""The ``model-sandbox`` command. The only module that prints.

Exit codes: 0 clean, 1 unsafe (suspicious or malicious), 2 error.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import _api
from .errors import PolicyError, SandboxError
from .policy import Policy, builtin_names
from .report import LoadReport

EXIT_CLEAN, EXIT_UNSAFE, EXIT_ERROR = 0, 1, 2


def _policy(value: str | None) -> Policy:
    if value is None:
        return Policy.default()
    if value in builtin_names():
        return Policy.builtin(value)
    return Policy.from_file(value)


def _emit(reports: list[LoadReport], fmt: str) -> None:
    if fmt == "json":
        data = [r.to_dict() for r in reports]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2, sort_keys=True, default=str))
    else:
        print("\n\n".join(r.to_text() for r in reports))


def _exit_code(reports: list[LoadReport]) -> int:
    return max((r.exit_code for r in reports), default=EXIT_CLEAN)


def cmd_scan(args: argparse.Namespace) -> int:
    policy = _policy(args.policy)
    reports = [_api.scan(p, policy=policy, expected_sha256=args.expect_sha256) for p in args.paths]
    _emit(reports, args.format)
    return _exit_code(reports)


def cmd_convert(args: argparse.Namespace) -> int:
    policy = _policy(args.policy)
    try:
        report = _api.convert(args.src, args.output, policy=policy,
                              expected_sha256=args.expect_sha256)
    except SandboxError as exc:
        if exc.report is None:
            raise
        report = exc.report
    _emit([report], args.format)
    return report.exit_code


def cmd_image_build(args: argparse.Namespace) -> int:
    from ._launch import DockerRunner

    def progress(msg: str) -> None:
        print(f"model-sandbox: {msg}", file=sys.stderr)

    tag, seconds, size = DockerRunner().build_image(force=args.force, progress=progress)
    if seconds == 0.0:
        print(f"{tag} is up to date ({size / 2**20:.0f} MiB)")
    else:
        print(f"built {tag} in {seconds:.1f} s ({size / 2**20:.0f} MiB)")
    return EXIT_CLEAN


def cmd_image_tag(args: argparse.Namespace) -> int:
    from ._image import image_tag

    print(image_tag())
    return EXIT_CLEAN


def cmd_policy_show(args: argparse.Namespace) -> int:
    policy = _policy(args.name)
    print(json.dumps({**policy.to_dict(), "digest": policy.digest}, indent=2))
    return EXIT_CLEAN


def cmd_policy_check(args: argparse.Namespace) -> int:
    try:
        policy = Policy.from_file(args.file)
    except PolicyError as exc:
        print(f"{args.file}: invalid", file=sys.stderr)
        for problem in exc.problems or [exc.message]:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.file}: valid policy {policy.name!r}")
    return EXIT_CLEAN


def cmd_report_render(args: argparse.Namespace) -> int:
    text = Path(args.file).read_text("utf-8")
    report = LoadReport.from_json(text)
    _emit([report], args.format)
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-sandbox",
        description="Open untrusted PyTorch checkpoints inside a locked-down container and get "
                    "SafeTensors plus a report. Exit codes: 0 clean, 1 unsafe, 2 error.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=("text", "json"), default="text",
                       help="report format (default: text)")
        p.add_argument("--policy", metavar="NAME|FILE",
                       help=f"load policy: one of {', '.join(builtin_names())} or a TOML file "
                            "(default: default)")
        p.add_argument("--expect-sha256", metavar="HEX",
                       help="refuse the input unless its sha256 is HEX")

    p = sub.add_parser("scan", help="load files in the sandbox without keeping weights; print reports",
                       description="Load each file in the sandbox, keep no weights, print the "
                                   "report. Exit code: the worst over all files.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    common(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("convert", help="convert a checkpoint to SafeTensors through the sandbox",
                       description="Load SRC in the sandbox and write DST (default: SRC with "
                                   "the suffix .safetensors) and DST.report.json. Nothing is "
                                   "written when the file is judged unsafe.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("-o", "--output", metavar="DST", help="output file")
    common(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("image", help="the worker image", description="Manage the worker image.")
    isub = p.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build the worker image offline from this environment",
                        description="Assemble the worker image from this Python environment "
                                    "(no registry needed) and import it into Docker.")
    b.add_argument("--force", action="store_true", help="rebuild even if it is up to date")
    b.set_defaults(func=cmd_image_build)
    t = isub.add_parser("tag", help="print the tag this version expects",
                        description="Print the content-derived tag of the worker image.")
    t.set_defaults(func=cmd_image_tag)

    p = sub.add_parser("policy", help="show or check load policies",
                       description="Show a built-in policy or check a policy file.")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    s = psub.add_parser("show", help="print a policy as JSON", description="Print a policy.")
    s.add_argument("name", metavar="NAME|FILE")
    s.set_defaults(func=cmd_policy_show)
    c = psub.add_parser("check", help="validate a policy file",
                        description="Validate a policy file and list every problem.")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(func=cmd_policy_check)

    p = sub.add_parser("report", help="render a saved report", description="Render a JSON report.")
    rsub = p.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    r = rsub.add_parser("render", help="print a saved JSON report as text or JSON",
                        description="Print a saved JSON report.")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--format", choices=("text", "json"), default="text")
    r.set_defaults(func=cmd_report_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _terminate_like_interrupt()
    try:
        code: int = args.func(args)
        return code
    except SandboxError as exc:
        if args.verbose:
            traceback.print_exc()
        print(exc.diagnostics(), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("model-sandbox: interrupted", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _terminate_like_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so every sandbox container is removed on the way out."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def run() -> None:
    sys.exit(main())


