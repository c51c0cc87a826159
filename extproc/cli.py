"""Command line: ``extproc serve | dev | envoy | demo | token | rules | scan | policy | reload | audit |
approvals``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extproc import __version__
from extproc.errors import ConfigError
from extproc.settings import (
    CONFIG_ENV,
    LogSettings,
    Settings,
    approver_token,
    load_settings,
    require_identity_choice,
)

if TYPE_CHECKING:
    from extproc.approvals.client import ApprovalsClient
    from extproc.approvals.v1.approvals_pb2 import Approval as ApprovalMessage

log = logging.getLogger("extproc.cli")


def _settings(args: argparse.Namespace) -> Settings:
    server: dict[str, object] = {}
    if getattr(args, "grpc_address", None):
        server["grpc_address"] = args.grpc_address
    if getattr(args, "admin_address", None):
        server["admin_address"] = args.admin_address
    if getattr(args, "workers", None) is not None:
        server["workers"] = args.workers
    overrides: dict[str, Any] = {"server": server} if server else {}
    if getattr(args, "approvals_address", None) is not None:  # empty: not served
        overrides["approvals"] = {"api_address": args.approvals_address}
    settings = load_settings(args.config, **overrides)
    worker = getattr(args, "worker", None)
    if worker is not None and settings.audit.record_path:
        # A worker of `serve --workers N` keeps a session record of its own (its own hash chain).
        from extproc.supervisor import worker_record_path

        audit = settings.audit.model_copy(
            update={"record_path": worker_record_path(settings.audit.record_path, worker)}
        )
        settings = settings.model_copy(update={"audit": audit})
    return settings


class _StopRequested(Exception):
    """SIGTERM or SIGINT before the server's own handlers are in place (while the rules compile)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal = signal.Signals(signum).name


def _stop_requested(signum: int, _frame: object) -> None:
    raise _StopRequested(signum)


def cmd_serve(args: argparse.Namespace) -> int:
    """Every way out is logged: a stop signal (exit 0), bad settings, a file or an address that cannot be
    used (exit 2, as for other commands), or any other failure at start-up or while serving (exit 1, with
    its traceback), each as one structured line."""
    from extproc import logs
    from extproc.server import sighup_before_serving

    # The defaults until the settings are read, so that a failure to read them is a log line too.
    logs.configure(LogSettings())
    # Until the server's own handlers take over: a stop signal is logged, a SIGHUP ignored.
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _stop_requested),
        signal.SIGINT: signal.signal(signal.SIGINT, _stop_requested),
        signal.SIGHUP: signal.signal(signal.SIGHUP, lambda _signum, _frame: sighup_before_serving()),
    }
    try:
        return _serve(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logs.shutdown()  # every line logged reaches stderr before the process ends


def _serve(args: argparse.Namespace) -> int:
    from extproc import logs
    from extproc.runtime import Runtime, build_snapshot, fingerprint
    from extproc.server import Server
    from extproc.supervisor import Supervisor, WorkerFailed, require_shared_approvals

    try:
        settings = _settings(args)
        fields = {"worker": args.worker} if args.worker is not None else None
        logs.configure(settings.log, background=True, fields=fields)
        require_identity_choice(settings)  # before the rules compile: a missing choice fails at once
        require_shared_approvals(settings)
        if settings.server.workers > 1 and args.worker is None:
            _warn_cpus(settings.server.workers)
            serve_args = ["--config", args.config] if args.config else []
            return asyncio.run(Supervisor(settings, serve_args).run())
        config_path = args.config or os.environ.get(CONFIG_ENV) or None
        snapshot = build_snapshot(settings, fingerprint(settings, config_path))
        server = Server(
            settings,
            Runtime(snapshot),
            load_settings=lambda: _settings(args),
            config_path=config_path,
            worker=args.worker,
            admin_socket=args.worker_admin,
        )
        asyncio.run(server.run_until_signal(args.supervisor_fd))
    except WorkerFailed as failed:  # logged by the supervisor as workers_failed, with the reason
        log.error(
            "serve_failed",
            extra={"error": str(failed), "error_type": "WorkerFailed", "exit_code": failed.exit_code},
        )
        return failed.exit_code
    except _StopRequested as stopped:
        log.info("signal_received", extra={"signal": stopped.signal, "detail": "before serving began"})
        log.info("stopped")
        return 0
    except (ConfigError, OSError) as exc:  # bad settings, a file or an address the server was given
        log.error("serve_failed", extra={"error": str(exc), "error_type": type(exc).__name__, "exit_code": 2})
        return 2
    except Exception as exc:
        log.critical(
            "serve_failed",
            exc_info=True,
            extra={"error": str(exc) or type(exc).__name__, "error_type": type(exc).__name__, "exit_code": 1},
        )
        return 1
    return 0


def _warn_cpus(workers: int) -> None:
    cpus = len(os.sched_getaffinity(0))
    if workers > cpus:
        log.warning(
            "workers_above_cpus",
            extra={"workers": workers, "cpus": cpus, "detail": "workers beyond the CPUs only add memory"},
        )


def cmd_demo(args: argparse.Namespace) -> int:
    from extproc import logs
    from extproc.demo.server import run

    logs.configure(LogSettings(level="info", format="json"))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.host, args.port, Path(args.api_key_file) if args.api_key_file else None))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from extproc.identity.dev import DEV_ISSUER, default_dir, mint_dev_token

    if not 0 < args.ttl <= 86400:
        print("extproc token: --ttl must be between 1 and 86400 seconds", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    foreign = sorted(i.issuer for i in settings.identity.issuers if i.issuer != DEV_ISSUER)
    if foreign:
        print(
            f"extproc token: refused: these settings trust {', '.join(foreign)}. extproc token mints "
            f"development tokens of {DEV_ISSUER} only; get tokens for a real issuer from that issuer.",
            file=sys.stderr,
        )
        return 2
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    folder = Path(args.dev_dir) if args.dev_dir else default_dir()
    print(mint_dev_token(folder, args.subject, groups, args.ttl))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from extproc.devenv import REPO_ENVOY_CONFIG, Stack, Upstream
    from extproc.identity.dev import default_dir, mint_dev_token

    dev_dir = Path(args.dev_dir) if args.dev_dir else default_dir()
    stack = Stack(
        envoy_port=args.port,
        envoy_admin_port=args.envoy_admin_port,
        extproc_port=args.extproc_port,
        admin_port=args.admin_port,
        approvals_port=args.approvals_port,
        demo_port=args.demo_port,
        upstream=Upstream.parse(args.upstream) if args.upstream else None,
        settings_file=args.config,
        envoy_config=Path(args.envoy_config) if args.envoy_config else REPO_ENVOY_CONFIG,
        # The dev identity unless --no-auth, or the settings file chooses another mode itself.
        dev_identity=None if args.no_auth else dev_dir,
        otlp_endpoint=args.otlp,
        extra_env={"EXTPROC_IDENTITY__MODE": "none"} if args.no_auth else {},
    )

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Installed explicitly: a process started in the background inherits SIGINT as ignored.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        stack.start()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"extproc dev: {exc}", file=sys.stderr)
        return 1
    model = "demo-small" if args.upstream is None else "<your model>"
    auth = tokens = ""
    approvals = f"127.0.0.1:{stack.approvals_port}"
    if stack.dev_identity is not None:
        token = mint_dev_token(stack.dev_identity, "dev-user", [], 12 * 3600)
        auth = f" -H 'authorization: Bearer {token}'"
        tokens = f"""
Callers need a token of the dev issuer; mint one per group to try the policies:
  .venv/bin/extproc token --dev-dir {stack.dev_identity} --groups fraud-investigators

A support agent's prompt with an SSN waits for a security reviewer (policy support-ssn-approval):
  .venv/bin/extproc token --dev-dir {stack.dev_identity} --groups support
Reviewers decide on the page http://127.0.0.1:{stack.admin_port}/approvals with a token of their own,
or through the approvers' API:
  export EXTPROC_APPROVER_TOKEN=$(.venv/bin/extproc token --dev-dir {stack.dev_identity} \\
    --subject reviewer --groups security-reviewers)
  .venv/bin/extproc approvals watch --address {approvals}
"""
    traces = f"Spans from Envoy and extproc go to {args.otlp}.\n" if args.otlp else ""
    print(
        f"""
extproc dev is up:
  Envoy        {stack.url}   (admin {stack.envoy_admin_url})
  extproc      gRPC 127.0.0.1:{stack.extproc_port}, admin http://127.0.0.1:{stack.admin_port}/readyz
  approvals    gRPC {approvals}   (the approvers' API: extproc approvals --help)
  model        {stack.upstream.host if stack.upstream else ""}:{stack.upstream.port if stack.upstream else ""}

Try it (the card number and the address come back masked):
  curl -s {stack.url}/v1/chat/completions -H 'content-type: application/json'{auth} \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": \
"my card is 4111 1111 1111 1111, mail me at jane@example.com"}}]}}'
  Ollama's native API, streamed as NDJSON lines:
  curl -s {stack.url}/api/chat -H 'content-type: application/json'{auth} \
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "my card is 4111 1111 1111 1111"}}]}}'
{tokens}
{traces}Ctrl-C stops all three.
""",
        file=sys.stderr,
        flush=True,
    )
    try:
        exited = stack.wait()
        print(f"extproc dev: {exited} exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


def cmd_audit_keygen(args: argparse.Namespace) -> int:
    from extproc.audit.keys import generate_keys

    written = generate_keys(Path(args.directory))
    print(
        f"""wrote {", ".join(str(p) for p in written.values())}

For the sidecar (settings `audit:`):
  sealing_key_file: {written["auditor_pub"]}   # the auditor's public key: originals are sealed to it
  signing_key_file: {written["signing_key"]}   # signs checkpoints
Keep away from the sidecar:
  {written["auditor_key"]}   opens sealed originals: `extproc audit replay --key`
  {written["signing_pub"]}   checks checkpoints: `extproc audit verify --public-key`""",
        file=sys.stderr,
    )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from extproc.audit.keys import load_verify_key

    keys = [load_verify_key(Path(p)) for p in args.public_key or ()]
    anchors: dict[int, str] = {}
    for anchor in args.anchor or ():
        seq, _, digest = anchor.partition(":")
        if not seq.isdigit() or len(digest) != 64 or digest.strip("0123456789abcdefABCDEF"):
            raise ConfigError(
                f"--anchor {anchor!r}: expected SEQ:HASH (an audit_checkpoint log line's values)"
            )
        anchors[int(seq)] = digest.lower()
    if anchors and len(args.file) > 1:
        raise ConfigError("--anchor names a record of one file: verify the file it came from alone")
    # Several files (one per worker of `serve --workers N`): each is a chain of its own, checked alone.
    broken = 0
    for file in args.file:
        broken += _verify_one(file, keys, args.strict, anchors)
    return 1 if broken else 0


def _verify_one(file: str, keys: list[Any], strict: bool, anchors: dict[int, str]) -> int:
    """Verifies one record file and prints its summary (or its first break); 1 when it does not verify."""
    from extproc.audit.record import verify

    report = verify(Path(file), keys, strict=strict, anchors=anchors)
    for warning in report.warnings:
        print(f"{file}: warning: {warning}", file=sys.stderr)
    if report.first_break is not None:
        print(f"{file}: {report.first_break.describe()}", file=sys.stderr)
        return 1
    summary = f"{file}: {report.records} records, {report.checkpoints} checkpoints, hash chain intact"
    if not keys:
        summary += "; signatures NOT checked (give --public-key): nothing is authenticated"
    else:
        summary += f"; signed through seq {report.signed_through}"
        if report.unsigned:
            summary += f"; {report.unsigned} records protected by the chain only"
            if report.unsigned_tail:
                summary += f" ({report.unsigned_tail} after the last checkpoint)"
    if report.anchors_checked:
        summary += f"; {report.anchors_checked} anchors match"
    print(summary)
    return 0


def _record_paths(args: argparse.Namespace) -> list[Path]:
    """--file, or the record files the settings write: ``audit.record_path``, or one per worker."""
    from extproc.supervisor import record_files

    if args.file:
        return [Path(args.file)]
    paths = record_files(load_settings(args.config))
    if not paths:
        raise ConfigError("no session record: give --file, or set audit.record_path")
    return paths


def cmd_audit_show(args: argparse.Namespace) -> int:
    from extproc.audit.record import find

    paths = _record_paths(args)
    for path in paths:
        if not path.exists() and len(paths) > 1:
            continue  # a worker that has not written yet
        record = find(path, args.id)
        if record is not None:
            break
    else:
        where = ", ".join(str(path) for path in paths)
        print(f"extproc audit show: no record {args.id!r} in {where}", file=sys.stderr)
        return 1
    sealed = record.pop("sealed", None)
    if sealed is not None:  # the ciphertext means nothing to a reader: say what it is instead
        kid = sealed.get("kid") if isinstance(sealed, dict) else None
        record["sealed"] = f"original bodies, sealed to auditor key {kid}"
    print(json.dumps(record, indent=2, ensure_ascii=False))
    return 0


# `audit replay` exit statuses: a CI gate tells "the rules change decisions" from "the gate could not
# judge" from "the record was altered". 2 is every command's usage, settings or unreadable-file error.
REPLAY_CHANGED = 1  # --fail-on-change: an exchange was decided differently
REPLAY_NOT_REPLAYED = 3  # --fail-on-change: an exchange could not be replayed (wrong key, no originals...)
REPLAY_UNVERIFIED = 4  # the file's chain does not verify: nothing replayed (--no-verify replays it anyway)
REPLAY_EXIT_CODES = f"""exit status:
  0  replayed; with --fail-on-change, every exchange with a body was replayed and none changed
  {REPLAY_CHANGED}  --fail-on-change: an exchange was decided differently
  2  bad arguments or settings, a key or record file that cannot be read
  {REPLAY_NOT_REPLAYED}  --fail-on-change: an exchange could not be replayed (sealed to another auditor key,
     no or altered sealed originals, a damaged record); it wins over {REPLAY_CHANGED}
  {REPLAY_UNVERIFIED}  the file's hash chain (or, with --public-key, its signatures) does not verify: nothing
     was replayed; --no-verify replays it anyway"""


class _Unverified(Exception):
    """The record does not verify; the message is its first break."""


def _verified_lines(args: argparse.Namespace, file: str) -> tuple[int | None, str]:
    """The chain check replay starts with: the last line of ``file`` verified (None: not checked) and what
    the summary says about it. Raises _Unverified when the file does not verify."""
    from extproc.audit.keys import load_verify_key
    from extproc.audit.record import RecordError, verify

    keys = [load_verify_key(Path(p)) for p in args.public_key or ()]
    if args.no_verify:
        print(
            f"{file}: warning: hash chain NOT verified (--no-verify): the records replayed may have "
            "been altered, removed or added",
            file=sys.stderr,
        )
        return None, "hash chain NOT verified"
    path = Path(file)
    if path.is_fifo():  # verify and replay each read the file; a pipe can be read once
        raise RecordError(f"{path}: a pipe: replay verifies the file, then reads it again (give a file)")
    report = verify(path, keys)
    for warning in report.warnings:
        print(f"{file}: warning: {warning}", file=sys.stderr)
    if report.first_break is not None:
        raise _Unverified(report.first_break.describe())
    said = "hash chain verified"
    if keys:
        said += f", signed through seq {report.signed_through}"
    else:
        said += ", signatures NOT checked (give --public-key)"
    return report.records, said


def cmd_audit_replay(args: argparse.Namespace) -> int:
    from extproc.audit.keys import load_opening_key
    from extproc.replay import Tally, replay
    from extproc.runtime import build_snapshot

    key = load_opening_key(Path(args.key))
    files: list[str] = args.file
    # Every file is verified before any is replayed (one per worker of `serve --workers N`, each its own
    # chain): a gate that replays part of the traffic must not pass for one that replayed it all.
    verified: dict[str, tuple[int | None, str]] = {}
    for file in files:
        try:
            verified[file] = _verified_lines(args, file)
        except _Unverified as exc:
            print(f"{file}: {exc}", file=sys.stderr)
            print(
                f"{file}: does not verify: nothing replayed (`extproc audit verify` says more; "
                "--no-verify replays it anyway)",
                file=sys.stderr,
            )
            return REPLAY_UNVERIFIED
    overrides: dict[str, Any] = {"detect": {"rules": list(args.rules)}, "audit": {"record_path": None}}
    if args.policies:
        overrides["policy"] = {"paths": list(args.policies)}
    # The callers were verified when the exchanges happened: their recorded identity is used as is.
    overrides["identity"] = {"mode": "none"}
    # One process replays: the settings' worker count is not this command's.
    overrides["server"] = {"workers": 1}
    settings = load_settings(args.config, **overrides)
    snapshot = build_snapshot(settings)
    tally = Tally()
    for file in files:
        through_line = verified[file][0]
        where = f"{file}: " if len(files) > 1 else ""
        for result in replay(Path(file), key, snapshot, through_line=through_line):
            tally.add(result)
            if args.json:
                shown = {**asdict(result), "changed": result.changed}
                if len(files) > 1:
                    shown["file"] = file
                print(json.dumps(shown, ensure_ascii=False))
            elif result.changed or (result.after is None and result.bodies) or not result.comparable:
                print(f"{where}line {result.line}  {result.record_id}  {result.summary}")
                for line in result.changes + [f"note: {n}" for n in result.notes]:
                    print(f"  {line}")
    chains = {said for _, said in verified.values()}
    chain = (
        chains.pop() if len(chains) == 1 else "; ".join(f"{f}: {said}" for f, (_, said) in verified.items())
    )
    print(
        f"{', '.join(files)}: {chain}; {tally.total} exchanges, replayed with {', '.join(args.rules)}: "
        f"{tally.describe()}",
        file=sys.stderr,
    )
    if not args.fail_on_change:
        return 0
    if tally.not_replayed:
        return REPLAY_NOT_REPLAYED
    return REPLAY_CHANGED if tally.changed else 0


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def cmd_envoy(args: argparse.Namespace) -> int:  # noqa: RET503 - ends in os.execv
    import os
    import tempfile

    import yaml

    from extproc.devenv import REPO_ENVOY_CONFIG, Upstream, envoy_binary, render_envoy_config

    source = Path(args.envoy_config) if args.envoy_config else REPO_ENVOY_CONFIG
    (listen_host, listen_port), (extproc_host, extproc_port) = args.listen, args.extproc
    config = render_envoy_config(
        yaml.safe_load(source.read_text(encoding="utf-8")),
        listen_address=listen_host,
        listen_port=listen_port,
        admin_port=args.admin_port,
        extproc_host=extproc_host,
        extproc_port=extproc_port,
        upstream=Upstream.parse(args.upstream),
        otlp=Upstream.parse(args.otlp, "--otlp") if args.otlp else None,
        model_paths=args.model_paths,
    )
    text = yaml.safe_dump(config, sort_keys=False)
    if args.print:
        sys.stdout.write(text)
        return 0
    handle, rendered = tempfile.mkstemp(prefix="envoy-", suffix=".yaml")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    argv = [envoy_binary(), "-c", rendered, *args.envoy_args]
    os.execv(argv[0], argv)  # noqa: S606 - Envoy replaces this process, as a container entry point expects


def _cache_dir(settings: Settings) -> str:
    """Where compiled rule packs are kept: ``detect.cache_dir``, or the user's cache folder, so a command
    run again starts in a fraction of a second (entries are keyed by the pack's content and Hyperscan's
    version, so an edited pack compiles afresh)."""
    from extproc.identity.dev import default_dir

    return settings.detect.cache_dir or str(default_dir() / "hyperscan")


def _rule_paths(args: argparse.Namespace, settings: Settings) -> list[str]:
    return list(args.paths or args.rules or settings.detect.rules)


def _edm_key(settings: Settings) -> bytes | None:
    from extproc.runtime import read_key

    return read_key(settings.detect.edm_key_file, "exact-match") if settings.detect.edm_key_file else None


def cmd_rules_check(args: argparse.Namespace) -> int:
    from extproc.detect.check import check_rules

    settings = load_settings(args.config)
    paths = _rule_paths(args, settings)
    cache_dir = Path(_cache_dir(settings))
    report = check_rules(
        paths,
        edm_key=_edm_key(settings),
        max_match_chars=settings.detect.max_match_chars,
        cache_dir=cache_dir,
    )
    for problem in report.problems:
        print(problem, file=sys.stderr)
    if not report.ok:
        print(f"rules check: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    note = f"; Hyperscan prefilter mode: {', '.join(report.prefiltered)}" if report.prefiltered else ""
    print(f"rules check: {report.rules} rules, {report.samples} samples OK{note}")
    return 0


def cmd_rules_hash_list(args: argparse.Namespace) -> int:
    from extproc.detect.engine import hash_value
    from extproc.runtime import read_key

    key = read_key(args.key_file, "exact-match")
    source = sys.stdin if args.file in (None, "-") else open(args.file, encoding="utf-8")  # noqa: SIM115
    with source:
        for line in source:
            value = line.strip()
            if value and not value.startswith("#"):
                print(hash_value(key, value if args.case_sensitive else value.lower()))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from extproc import logs
    from extproc.runtime import build_inspector

    overrides = {"detect": {"rules": list(args.rules)}} if args.rules else {}
    settings = load_settings(args.config, **overrides)
    detect = settings.detect.model_copy(update={"cache_dir": _cache_dir(settings)})
    settings = settings.model_copy(update={"detect": detect})
    logs.configure(LogSettings(level="warning", format="text"))
    inspector = build_inspector(settings)
    data = sys.stdin.buffer.read() if args.file in (None, "-") else Path(args.file).read_bytes()
    text = data.decode("utf-8", "surrogateescape")
    if args.mask:
        masked, found = inspector.mask_text(text)
        sys.stdout.buffer.write(masked.encode("utf-8", "surrogateescape"))
        return 1 if found else 0
    rules = {r.id: r.rule for r in inspector.detector.rules}
    findings = inspector.detector.scan(text)
    for finding in findings:
        rule = rules[finding.rule_id]
        entry: dict[str, object] = {
            "rule": finding.rule_id,
            "entity": finding.entity,
            "category": rule.category,
            "severity": rule.severity,
            "start": finding.start,
            "end": finding.end,
        }
        if args.values:
            entry["value"] = text[finding.start : finding.end]
        if args.json:
            print(json.dumps(entry, ensure_ascii=False))
        else:
            value = f"  {entry['value']!r}" if args.values else ""
            where = f"{finding.start}-{finding.end}"
            print(f"{where}  {finding.entity}  {finding.rule_id} ({rule.category}, {rule.severity}){value}")
    return 1 if findings else 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Asks the running sidecar to reload (POST /reload on its admin address, from this host). Exit 0
    when it reloaded (or nothing changed), 1 when it refused the change (the problems are printed, the
    old rules keep serving), 2 when it cannot be reached."""
    import urllib.error
    import urllib.request

    address = args.admin_address or load_settings(args.config).server.admin_address
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "", "::", "[::]"):  # a wildcard listener is reached on loopback
        host = "127.0.0.1"
    request = urllib.request.Request(f"http://{host}:{port}/reload", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as answer:  # noqa: S310
            result = json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        result = json.loads(refused.read() or b"{}")
        if refused.code != 422:
            print(f"reload: {refused.code} {result.get('message', '')}".rstrip(), file=sys.stderr)
            return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"reload: cannot reach the sidecar's admin address {address}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif result.get("result") == "refused":
        print(f"reload refused; snapshot {result.get('version')} keeps serving:", file=sys.stderr)
        for problem in result.get("problems", []):
            print(f"  {problem}", file=sys.stderr)
    else:
        print(f"reload: {result.get('result')}, snapshot {result.get('version')}")
    return 1 if result.get("result") == "refused" else 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    import yaml

    from extproc.detect.rules import RuleError, load_rules
    from extproc.policy import Facts, KnownNames, PolicyError, describe, load_policies

    settings = load_settings(args.config)
    try:
        pack = load_rules(settings.detect.rules, settings.detect.max_match_chars)
    except RuleError as exc:
        raise ConfigError("invalid rules:\n" + "\n".join(exc.problems)) from exc
    known = KnownNames(frozenset(r.id for r in pack.rules), frozenset(r.rule.entity for r in pack.rules))
    try:
        policies = load_policies(args.policies or settings.policy.paths, known)
    except PolicyError as exc:
        raise ConfigError("invalid policies:\n" + "\n".join(exc.problems)) from exc
    for warning in policies.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    groups = frozenset(g.strip() for g in (args.groups or "").split(",") if g.strip())
    shown = describe(policies, Facts(groups, args.route or "", args.model))
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        print(
            yaml.safe_dump(shown, sort_keys=False, allow_unicode=True, width=110, default_flow_style=None),
            end="",
        )
    return 0


APPROVALS_EXIT_CODES = """exit status:
  0  done
  1  refused by the approval rules; the code says why (approval_self, approval_not_approver,
     approval_closed, approval_already_voted, approval_not_found)
  2  bad arguments or settings, no token or one the server does not accept, no server at the address,
     the approval store unavailable"""


def _approvals_address(args: argparse.Namespace) -> str:
    """--address, or ``approvals.api_address`` from the settings, as an address to connect to."""
    address: str = args.address or load_settings(args.config).approvals.api_address
    if not address:
        raise ConfigError("approvals.api_address is empty (the approvers' API is not served): give --address")
    host, _, port = address.rpartition(":")
    if port == "0":
        raise ConfigError(
            f"{address}: port 0 lets the server choose; give --address with the port its ready line names"
        )
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}  # listens everywhere: this host
    return f"{wildcard.get(host, host)}:{port}"


def cmd_approvals(args: argparse.Namespace) -> int:
    """Every approvals command: one call (or one stream) to the approvers' API as the token's holder."""
    from extproc.approvals.client import ApiError, ApprovalsClient

    token = args.token or approver_token()
    if not token:
        raise ConfigError("no approver token: give --token, or set $EXTPROC_APPROVER_TOKEN")
    address = _approvals_address(args)
    try:
        with ApprovalsClient(address, token) as client:
            result: int = args.approvals(client, args)
            return result
    except ApiError as exc:
        where = "" if exc.code else f" (the approvers' API at {address})"
        print(f"extproc approvals: {exc}{where}", file=sys.stderr)
        return 1 if exc.refused else 2


def _shown(approval: ApprovalMessage, args: argparse.Namespace, brief: bool) -> str:
    """An approval as a command prints it: --json's object, or one line (brief), or every detail."""
    from extproc.approvals.client import as_json, details, line

    if args.json:
        return json.dumps(as_json(approval), ensure_ascii=False)
    return line(approval) if brief else details(approval)


def _approvals_list(client: ApprovalsClient, args: argparse.Namespace) -> int:
    pending = client.list_pending()
    for approval in pending:
        print(_shown(approval, args, brief=True))
    if not pending and not args.json:
        print("no pending approvals of your approver groups", file=sys.stderr)
    return 0


def _approvals_show(client: ApprovalsClient, args: argparse.Namespace) -> int:
    print(_shown(client.get(args.id), args, brief=False))
    return 0


def _approvals_vote(client: ApprovalsClient, args: argparse.Namespace) -> int:
    from extproc.approvals.client import status_name

    if args.approvals_command == "approve":
        decided = client.approve(args.id, args.reason or "")
    else:
        decided = client.deny(args.id, args.reason)
    if args.json:
        print(_shown(decided, args, brief=False))
        return 0
    approving = sum(1 for v in decided.votes if v.approve)
    waiting = f", {approving} of {decided.request.min_approvals} approvals" if approving else ""
    print(f"{args.id}: {status_name(decided)}{waiting}")
    return 0


def _approvals_watch(client: ApprovalsClient, args: argparse.Namespace) -> int:
    try:
        for approval in client.watch():
            print(_shown(approval, args, brief=True), flush=True)
    except KeyboardInterrupt:
        return 0
    print("extproc approvals watch: the server ended the stream", file=sys.stderr)
    return 0


def _add_approvals(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address", help="HOST:PORT of the approvers' API (default: approvals.api_address of the settings)"
    )
    common.add_argument("--token", help="your own JWT, as an approver (default: $EXTPROC_APPROVER_TOKEN)")
    common.add_argument("--config", help="settings YAML file (for approvals.api_address)")
    common.add_argument("--json", action="store_true", help="JSON: one object per approval per line")
    approvals = sub.add_parser(
        "approvals",
        help="list, show, approve, deny and watch approvals (the approvers' gRPC API)",
        description="Call the approvers' gRPC API as the approver the token names. You see, and decide, "
        "the approvals of the approver groups you belong to.",
        epilog=APPROVALS_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    approvals_sub = approvals.add_subparsers(dest="approvals_command", required=True)
    listed = approvals_sub.add_parser("list", parents=[common], help="the pending approvals you may see")
    listed.set_defaults(func=cmd_approvals, approvals=_approvals_list)
    show = approvals_sub.add_parser("show", parents=[common], help="one approval, with its masked prompt")
    show.add_argument("id", help="the approval id")
    show.set_defaults(func=cmd_approvals, approvals=_approvals_show)
    approve = approvals_sub.add_parser("approve", parents=[common], help="vote to approve")
    approve.add_argument("id", help="the approval id")
    approve.add_argument("--reason", help="why, for the record (optional)")
    approve.set_defaults(func=cmd_approvals, approvals=_approvals_vote)
    deny = approvals_sub.add_parser("deny", parents=[common], help="deny: one denial closes the approval")
    deny.add_argument("id", help="the approval id")
    deny.add_argument("--reason", required=True, help="why: recorded, and shown to the requester")
    deny.set_defaults(func=cmd_approvals, approvals=_approvals_vote)
    watch = approvals_sub.add_parser(
        "watch", parents=[common], help="the pending approvals, then every change (Ctrl-C ends)"
    )
    watch.set_defaults(func=cmd_approvals, approvals=_approvals_watch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc", description="DLP sidecar for model servers (Envoy ext_proc)"
    )
    parser.add_argument("--version", action="version", version=f"extproc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_proc gRPC server")
    serve.add_argument("--config", help="settings YAML file (default: $EXTPROC_CONFIG)")
    serve.add_argument("--grpc-address", help="HOST:PORT for the ext_proc gRPC server")
    serve.add_argument("--admin-address", help="HOST:PORT for the admin HTTP endpoints")
    serve.add_argument(
        "--approvals-address", help="HOST:PORT for the approvers' gRPC API (empty: not served)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes on the one gRPC address (server.workers; default 1)",
    )
    # Set by the supervisor of `serve --workers N` for each worker it starts; not for people.
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-admin", help=argparse.SUPPRESS)
    serve.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    dev = sub.add_parser("dev", help="run Envoy + extproc + the demo model server together")
    dev.add_argument("--config", help="settings YAML file for the extproc server")
    dev.add_argument("--port", type=int, default=8080, help="Envoy listener port (default 8080)")
    dev.add_argument("--envoy-admin-port", type=int, default=9901, help="Envoy admin port (default 9901)")
    dev.add_argument("--extproc-port", type=int, default=50051, help="extproc gRPC port (default 50051)")
    dev.add_argument("--admin-port", type=int, default=9090, help="extproc admin port (default 9090)")
    dev.add_argument(
        "--approvals-port", type=int, default=50052, help="the approvers' gRPC API port (default 50052)"
    )
    dev.add_argument("--demo-port", type=int, default=9000, help="demo model port (default 9000)")
    dev.add_argument("--upstream", help="front this model server (http://HOST:PORT) instead of the demo")
    dev.add_argument("--envoy-config", help="Envoy config to run (default: envoy/envoy.yaml)")
    dev.add_argument("--dev-dir", help="folder of the dev signing key (default ~/.cache/extproc)")
    dev.add_argument(
        "--no-auth", action="store_true", help="no caller tokens (identity mode none, the default policy)"
    )
    dev.add_argument(
        "--otlp", help="send Envoy's and extproc's spans to this OTLP/gRPC collector (http://HOST:4317)"
    )
    dev.set_defaults(func=cmd_dev)

    token = sub.add_parser("token", help="mint a development token for `extproc dev` (dev key only)")
    token.add_argument("--subject", default="dev-user", help="the token's sub (default dev-user)")
    token.add_argument("--groups", default="", help="comma-separated groups, e.g. engineering,pilot")
    token.add_argument(
        "--ttl", type=int, default=3600, help="seconds it is valid (default 3600, at most 86400)"
    )
    token.add_argument("--dev-dir", help="folder of the dev signing key (default ~/.cache/extproc)")
    token.add_argument("--config", help="settings YAML file: refused unless it trusts the dev issuer only")
    token.set_defaults(func=cmd_token)

    envoy = sub.add_parser("envoy", help="run Envoy with the repo's config for the given addresses")
    envoy.add_argument("--listen", type=_address, default=("0.0.0.0", 8080), help="HOST:PORT (0.0.0.0:8080)")
    envoy.add_argument("--admin-port", type=int, default=9901, help="admin port, loopback only (9901)")
    envoy.add_argument("--extproc", type=_address, default=("127.0.0.1", 50051), help="extproc HOST:PORT")
    envoy.add_argument("--upstream", default="http://127.0.0.1:8000", help="model server URL")
    envoy.add_argument("--envoy-config", help="Envoy config to render (default: envoy/envoy.yaml)")
    envoy.add_argument(
        "--otlp", help="OTLP/gRPC collector for Envoy's spans (http://HOST:4317); without it, no tracing"
    )
    envoy.add_argument(
        "--model-path",
        dest="model_paths",
        action="append",
        help="a path forwarded to the model, scanned: /api/chat, or a prefix ending in '/' (repeat it; the"
        " same list as the setting routes.model; default: the Envoy config's routes)",
    )
    envoy.add_argument("--print", action="store_true", help="print the rendered config instead of running")
    envoy.add_argument("envoy_args", nargs="*", help="extra Envoy arguments, after --")
    envoy.set_defaults(func=cmd_envoy)

    rules = sub.add_parser("rules", help="check detection rules, hash exact-match lists")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate, compile and run every rule's samples")
    check.add_argument("paths", nargs="*", help="rule files or folders (default: detect.rules)")
    check.add_argument("--config", help="settings YAML file (for detect.* settings)")
    check.set_defaults(func=cmd_rules_check, rules=None)
    hash_list = rules_sub.add_parser("hash-list", help="turn a list of values into a hashed exact-match list")
    hash_list.add_argument("file", nargs="?", help="values, one per line (default: stdin)")
    hash_list.add_argument("--key-file", required=True, help="the key named by detect.edm_key_file")
    hash_list.add_argument(
        "--case-sensitive", action="store_true", help="for rules with case_sensitive: true"
    )
    hash_list.set_defaults(func=cmd_rules_hash_list)

    scan = sub.add_parser("scan", help="scan a file (or stdin) with the rules and print the findings")
    scan.add_argument("file", nargs="?", help="file to scan (default: stdin)")
    scan.add_argument(
        "--rules", action="append", help="rule file or folder (repeatable; default: detect.rules)"
    )
    scan.add_argument("--config", help="settings YAML file")
    output = scan.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per finding per line")
    output.add_argument("--mask", action="store_true", help="print the text, masked")
    scan.add_argument("--values", action="store_true", help="include the matched values in the output")
    scan.set_defaults(func=cmd_scan)

    reload = sub.add_parser("reload", help="make the running sidecar reload its rules, policies and settings")
    reload.add_argument("--admin-address", help="the sidecar's admin address (default: server.admin_address)")
    reload.add_argument("--config", help="settings YAML file (for server.admin_address)")
    reload.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the reload")
    reload.add_argument("--json", action="store_true", help="the sidecar's answer as JSON")
    reload.set_defaults(func=cmd_reload)

    policy = sub.add_parser("policy", help="what the policies decide for a caller")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    show_policy = policy_sub.add_parser(
        "show", help="print the effective policy (base included) for a caller's groups, route and model"
    )
    show_policy.add_argument("--groups", help="the caller's groups, comma-separated (default: none)")
    show_policy.add_argument("--route", help="the request path, e.g. /v1/chat/completions")
    show_policy.add_argument("--model", help="the model the request names")
    show_policy.add_argument(
        "--policies", action="append", help="policy file or folder (default: policy.paths)"
    )
    show_policy.add_argument("--config", help="settings YAML file")
    show_policy.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show_policy.set_defaults(func=cmd_policy_show)

    audit = sub.add_parser("audit", help="keys, verification, views and replay of the session record")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    keygen = audit_sub.add_parser("keygen", help="make the auditor's and the checkpoint signing key pairs")
    keygen.add_argument("directory", help="folder for auditor.key/.pub and signing.key/.pub")
    keygen.set_defaults(func=cmd_audit_keygen)
    verify = audit_sub.add_parser("verify", help="check the hash chain and the signed checkpoints")
    verify.add_argument(
        "file", nargs="+", help="the session record (JSON Lines); several: one per worker, each checked alone"
    )
    verify.add_argument(
        "--public-key", action="append", help="signing.pub that checkpoints must verify with (repeatable)"
    )
    verify.add_argument(
        "--strict", action="store_true", help="records after the last checkpoint are an error"
    )
    verify.add_argument(
        "--anchor",
        action="append",
        help="SEQ:HASH from the sidecar's logs (audit_checkpoint or audit_resumed): the file must still "
        "hold that record, unchanged, which shows truncation and rewriting (repeatable)",
    )
    verify.set_defaults(func=cmd_audit_verify)
    show = audit_sub.add_parser("show", help="print one exchange's record (masked bodies only)")
    show.add_argument("id", help="the decision id (x-dlp-decision-id)")
    show.add_argument("--file", help="the session record (default: audit.record_path)")
    show.add_argument("--config", help="settings YAML file")
    show.set_defaults(func=cmd_audit_show)
    replay = audit_sub.add_parser(
        "replay",
        help="decide recorded exchanges again with other rules; print what changes",
        description="Verify the record's hash chain, then decide its exchanges again with other rules "
        "and print what changes.",
        epilog=REPLAY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument(
        "file", nargs="+", help="the session record (JSON Lines); several: one per worker, all verified first"
    )
    replay.add_argument("--key", required=True, help="the auditor's private key (auditor.key)")
    replay.add_argument(
        "--rules", action="append", required=True, help="rule file or folder to decide with (repeatable)"
    )
    replay.add_argument("--policies", action="append", help="policy file or folder (default: policy.paths)")
    replay.add_argument("--config", help="settings YAML file for everything else")
    replay.add_argument("--json", action="store_true", help="one JSON object per exchange")
    replay.add_argument(
        "--fail-on-change",
        action="store_true",
        help=f"exit {REPLAY_CHANGED} when any decision differs, {REPLAY_NOT_REPLAYED} when any exchange "
        "could not be replayed",
    )
    replay.add_argument(
        "--public-key",
        action="append",
        help="signing.pub that checkpoints must verify with, as for `audit verify` (repeatable)",
    )
    replay.add_argument(
        "--no-verify",
        action="store_true",
        help="replay a file whose chain is not checked (or does not verify), with a warning",
    )
    replay.set_defaults(func=cmd_audit_replay)

    _add_approvals(sub)

    demo = sub.add_parser("demo", help="run the OpenAI-compatible demo model server")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9000)
    demo.add_argument("--api-key-file", help="require the key in this file on /v1/ (401 otherwise)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from extproc.audit.record import RecordError

    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    except (RecordError, OSError) as exc:  # a session record or a file the command was given
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    return result
