"""Command line: ``toolcell serve | call | tools | mcp | profiles check | images build|mcp | secrets | health |
reload | config show | client setup|list | sbom | bench | version``.

Exit codes: 0 ok; 1 the tool ran and its status is not ok; 2 usage error; 3 rejected (bad config,
bad arguments, unknown tool ...); 4 the supervisor or the engine is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from toolcell import __version__
from toolcell.errors import ConfigError, EngineUnavailable, ToolcellError

EXIT_OK, EXIT_STATUS, EXIT_USAGE, EXIT_REJECTED, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4
UNAVAILABLE_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


def _fail(message: str, code: int) -> int:
    print(f"toolcell: {message}", file=sys.stderr)
    return code


async def _serve(args: argparse.Namespace) -> int:
    from toolcell.server.lifecycle import serve

    return await serve(args.config, args.listen, verbose=args.verbose)


def _health(args: argparse.Namespace) -> int:
    """Exit 0 SERVING (--live: or NOT_SERVING), 1 otherwise, 4 unreachable: for HEALTHCHECK and probes."""
    from toolcell.control import ControlError, check_health
    from toolcell.settings import default_target

    try:
        status = check_health(args.target or default_target(), args.service, args.timeout)
    except ControlError as exc:
        return _fail(f"health: {exc}", EXIT_UNAVAILABLE)
    print(status)
    return EXIT_OK if status == "SERVING" or (args.live and status == "NOT_SERVING") else EXIT_STATUS


def _reload(args: argparse.Namespace) -> int:
    from toolcell.control import ControlError, request_reload
    from toolcell.settings import default_target

    state_file = args.state_file
    if state_file is None:
        target = args.target or default_target()
        if not target.startswith("unix:"):
            return _fail("--state-file is needed when the supervisor is not on a Unix socket", EXIT_USAGE)
        state_file = target.removeprefix("unix://").removeprefix("unix:") + ".state"
    try:
        state = request_reload(state_file, args.timeout)
    except ControlError as exc:
        return _fail(f"reload: {exc}", EXIT_UNAVAILABLE)
    if not state.last_reload_ok:
        return _fail(f"reload refused, the running config stays: {state.last_reload_error}", EXIT_REJECTED)
    print(f"reloaded {state.config} (reload #{state.reloads}, pid {state.pid})")
    return EXIT_OK


def _config_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from toolcell.configview import effective
    from toolcell.settings import ENV_CONFIG, load_config

    config = load_config(args.config)
    path = args.config or os.environ.get(ENV_CONFIG)
    document = yaml.safe_load(Path(path).read_text()) if path else None  # valid: load_config parsed it
    view = effective(config, document if isinstance(document, dict) else None)
    if args.json:
        print(json.dumps(view, indent=2))
    else:  # itself a config: `toolcell profiles check` accepts it
        print(f"# effective configuration of {config.source} (defaults filled in, secrets masked)")
        print(yaml.safe_dump(view, sort_keys=False), end="")
    return EXIT_OK


def _version(args: argparse.Namespace) -> int:
    if not args.json:
        print(f"toolcell {__version__}")
        return EXIT_OK
    import platform
    from importlib.metadata import version

    print(json.dumps({"toolcell": __version__, "python": platform.python_version(),
                      **{name: version(name) for name in ("grpcio", "opentelemetry-sdk", "docker", "protobuf")}}))
    return EXIT_OK


def _result_dict(result: Any) -> dict[str, Any]:
    d = dataclasses.asdict(result)
    d["status"] = result.status.value
    return d


async def _call(args: argparse.Namespace) -> int:
    from toolcell.client import ClientError
    from toolcell.clisession import FileArgumentError, read_inputs, write_outputs
    from toolcell.model import OutputChunk, Progress, Result, Started
    from toolcell.quoting import printable

    try:
        json.loads(args.args)
    except json.JSONDecodeError as exc:
        return _fail(f"--args is not valid JSON: {exc.msg} at column {exc.colno}", EXIT_USAGE)
    try:
        files = read_inputs(args.file or [])
    except FileArgumentError as exc:
        return _fail(str(exc), EXIT_USAGE)
    async with _client(args) as client:
        try:
            async for event in client.execute(args.tool, args.args, timeout=args.timeout, session=args.session or "",
                                              files=files or None):
                if isinstance(event, Started) and not args.json:
                    # Docker's 64-hex ids are known by their first 12; other backends' ids are short already.
                    shown = event.sandbox_id[:12] if len(event.sandbox_id) == 64 else event.sandbox_id
                    print(f"toolcell: started {event.invocation_id} in {shown} "
                          f"(profile {event.profile})", file=sys.stderr, flush=True)
                elif isinstance(event, OutputChunk) and not args.json:
                    stream = sys.stdout if event.stream == "stdout" else sys.stderr
                    stream.write(event.text)
                    stream.flush()
                elif isinstance(event, Progress) and not args.json:  # a tool from an MCP server
                    done = f"{event.progress:g}" + (f"/{event.total:g}" if event.total is not None else "")
                    print(f"toolcell: progress {done}" + (f" {printable(event.message, 200)}" if event.message
                                                          else ""), file=sys.stderr, flush=True)
                elif isinstance(event, Result):
                    if event.files and args.out:
                        try:
                            for path in write_outputs(args.out, event.files):
                                print(f"toolcell: wrote {path}", file=sys.stderr)
                        except (FileArgumentError, OSError) as exc:
                            return _fail(str(exc), EXIT_STATUS)
                    elif event.files and not args.json:
                        print(f"toolcell: {len(event.files)} output file(s): "
                              + ", ".join(printable(f.path, 80) for f in event.files[:20])
                              + " (save them with --out DIR)", file=sys.stderr)
                    if args.json:
                        print(json.dumps(_result_dict(event), indent=None))
                    elif event.content:  # an MCP server's tool streams no stdout: its blocks' texts, then a count
                        if event.output:
                            sys.stdout.write(event.output + ("" if event.output.endswith("\n") else "\n"))
                        if others := sum(1 for b in event.content if b.get("type") != "text"):
                            print(f"toolcell: {others} non-text content block(s), shown by --json",
                                  file=sys.stderr)
                    if not args.json:
                        print(f"toolcell: status={event.status.value} exit_code={event.exit_code} "
                              f"duration_ms={event.duration_ms} truncated={str(event.truncated).lower()} "
                              f"peak_memory_bytes={event.usage.peak_memory_bytes} "
                              f"trace_id={event.trace_id}" + (" is_error=true" if event.is_error else "")
                              + (f" ({event.message})" if event.message else ""),
                              file=sys.stderr)
                    return EXIT_OK if event.status.value == "ok" else EXIT_STATUS
        except ClientError as exc:
            code = EXIT_UNAVAILABLE if exc.code in UNAVAILABLE_CODES else EXIT_REJECTED
            return _fail(f"{exc.code}: {exc.details}", code)
    return _fail("stream ended without a result", EXIT_UNAVAILABLE)


async def _session(args: argparse.Namespace) -> int:
    from toolcell.client import ClientError

    async with _client(args) as client:
        try:
            if args.session_command == "open":
                info = await client.open_session(args.tool)
                if args.json:
                    print(json.dumps(dataclasses.asdict(info)))
                else:
                    print(info.session_id)
                    print(f"toolcell: session of {info.tool}: ends after {info.idle_ttl_s:g}s idle, "
                          f"{info.max_lifetime_s:g}s in all or {info.max_calls} calls; "
                          f"call with --session {info.session_id}", file=sys.stderr)
            else:
                calls = await client.close_session(args.session_id)
                print(f"toolcell: session closed after {calls} call(s); its sandbox is removed", file=sys.stderr)
        except ClientError as exc:
            code = EXIT_UNAVAILABLE if exc.code in UNAVAILABLE_CODES else EXIT_REJECTED
            return _fail(f"{exc.code}: {exc.details}", code)
    return EXIT_OK


async def _tools(args: argparse.Namespace) -> int:
    from toolcell.client import ClientError

    async with _client(args) as client:
        try:
            tools = await client.list_tools()
        except ClientError as exc:
            code = EXIT_UNAVAILABLE if exc.code in UNAVAILABLE_CODES else EXIT_REJECTED
            return _fail(f"{exc.code}: {exc.details}", code)
    if args.json:
        print(json.dumps([{"name": t.name, "title": t.title, "description": t.description,
                           "inputSchema": t.input_schema, "annotations": dict(t.annotations)} for t in tools]))
    else:
        for t in tools:
            print(f"{t.name:24} {t.description}")
    return EXIT_OK


async def _mcp(args: argparse.Namespace) -> int:
    import os

    from toolcell.mcp.bridge import access_problem, http_access, parse_listen

    if args.transport == "http":
        try:
            host, _ = parse_listen(args.listen)
        except ValueError as exc:
            return _fail(f"--listen: {exc}", EXIT_USAGE)
        if args.metrics_listen:
            from toolcell.probehttp import parse_listen as parse_metrics_listen

            try:
                parse_metrics_listen(args.metrics_listen)
            except ValueError as exc:
                return _fail(f"--metrics-listen: {exc}", EXIT_USAGE)
        try:
            args.access = http_access(args.allowed_host, args.allowed_origin, args.config, args.insecure_open,
                                      os.environ)
        except ValueError as exc:
            return _fail(str(exc), EXIT_USAGE)
        problem = access_problem(host, args.access)
        if problem:
            return _fail(problem, EXIT_USAGE)
    elif args.allowed_host or args.allowed_origin or args.config or args.insecure_open:
        return _fail("--allowed-host, --allowed-origin, --config and --insecure-open apply to --transport http",
                     EXIT_USAGE)
    provider = _bridge_tracing(args)
    try:
        return await _serve_mcp(args)
    finally:
        if provider is not None:
            provider.shutdown()


def _bridge_tracing(args: argparse.Namespace) -> Any:
    """The bridge's own spans (its gRPC client spans parent the supervisor's): OTLP from the standard
    OTEL_EXPORTER_OTLP_ENDPOINT variable, and/or a JSON-lines file."""
    import os

    from toolcell.settings import TelemetrySettings
    from toolcell.telemetry import setup_tracing

    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint and not args.span_file:
        return None
    return setup_tracing(TelemetrySettings(service_name="toolcell-mcp", otlp_endpoint=endpoint,
                                           span_file=args.span_file))


async def _serve_mcp(args: argparse.Namespace) -> int:
    from toolcell.client import ClientError
    from toolcell.mcp.adapter import SandboxedTools
    from toolcell.mcp.bridge import serve_http, serve_stdio
    from toolcell.mcp.httpguard import caller_token

    # With bearer authentication each caller's own token is forwarded: the bridge's own identity only
    # probes that the supervisor answers, and which tools exist is the supervisor's answer to each caller.
    forwarding = args.transport == "http" and args.access.jwt is not None
    async with _client(args) as client:
        try:  # fail fast and clearly, before an MCP client sees a server that cannot work
            names = {t.name for t in await client.list_tools(timeout=10.0)}
        except ClientError as exc:
            if not (forwarding and exc.code in ("UNAUTHENTICATED", "PERMISSION_DENIED")):
                code = EXIT_UNAVAILABLE if exc.code in UNAVAILABLE_CODES else EXIT_REJECTED
                return _fail(f"supervisor at {client.target}: {exc.code}: {exc.details}", code)
            names = set()
        if forwarding and names:
            logging.getLogger("toolcell.mcp").warning(
                "the supervisor grants this bridge's own identity (no caller token) %d tool(s): every authenticated "
                "MCP caller gets at least those; grant tools by token identity (subject, scope, group) instead",
                len(names))
        unknown = sorted(set(args.tool or ()) - names)
        if unknown and not forwarding:
            return _fail(f"unknown tool(s) {', '.join(unknown)}; the supervisor has {', '.join(sorted(names))}",
                         EXIT_REJECTED)
        tools = SandboxedTools(client, tools=args.tool or None, caller_token=caller_token if forwarding else None)
        if args.transport == "stdio":
            await serve_stdio(tools)
        else:
            try:
                await serve_http(tools, args.listen, args.path, args.access, metrics_listen=args.metrics_listen)
            except OSError as exc:
                return _fail(f"cannot listen on {args.listen}: {exc.strerror}", EXIT_USAGE)
    return EXIT_OK


def _profiles_check(args: argparse.Namespace) -> int:
    from toolcell.settings import load_config

    config = load_config(args.file)
    servers = f", {len(config.sources)} MCP servers (their tools are found at start-up)" if config.sources else ""
    print(f"{args.file}: ok ({len(config.profiles)} profiles, {len(config.tools)} tools{servers})")
    return EXIT_OK


async def _doctor(args: argparse.Namespace) -> int:
    from toolcell.backends.factory import open_backend
    from toolcell.doctor import Level, evaluate_oci, oci_facts, render, run_doctor
    from toolcell.settings import load_config

    config = load_config(args.config)
    runtimes = {p.runtime for p in config.profiles.values()}
    backend = open_backend(config)  # the same factory as serve and bench
    try:
        if config.engine.kind == "oci":
            facts = await asyncio.to_thread(oci_facts, config.engine.oci_runtime, config.engine.oci_rootfs_dir)
            findings = evaluate_oci(facts, {t.image for t in config.tools.values()}, runtimes)
        else:
            from toolcell.backends.docker import DEFAULT_BASE_URL, DockerBackend

            assert isinstance(backend, DockerBackend)  # nosec B101 - engine.kind docker builds one
            findings = await run_doctor(config.engine.docker_host or DEFAULT_BASE_URL, backend.info, runtimes)
    finally:
        await backend.close()
    if args.json:
        print(json.dumps([{"check": f.check, "level": f.level.value.lower(), "detail": f.detail, "fix": f.fix}
                          for f in findings]))
    else:
        print(render(findings))
    return EXIT_STATUS if any(f.level is Level.FAIL for f in findings) else EXIT_OK


def _client(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from toolcell.client import Client, ClientTls
    from toolcell.settings import client_token

    token = Path(args.token_file).read_text().strip() if args.token_file else client_token()
    tls = None
    if args.tls_ca:
        tls = ClientTls(ca_pem=Path(args.tls_ca).read_bytes(),
                        cert_pem=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
                        key_pem=Path(args.tls_key).read_bytes() if args.tls_key else None)
    return Client(args.target, token=token, tls=tls)


def _audit_verify(args: argparse.Namespace) -> int:
    from toolcell.audit import verify, with_rotated

    try:
        verdict = verify(with_rotated(args.files))
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}", EXIT_USAGE)
    if verdict.ok:
        print(verdict.describe())
        return EXIT_OK
    return _fail(f"audit chain broken at {verdict.describe()}", EXIT_STATUS)


def _secrets(args: argparse.Namespace) -> int:
    """Manage the encrypted store; values are read from stdin or a prompt, never echoed or taken from argv."""
    import getpass

    from toolcell.secretstore import SecretStore, generate_key, write_key_file
    from toolcell.settings import load_config

    if args.subcommand == "keygen":
        if args.out is None:
            print(generate_key())
            return EXIT_OK
        try:
            path = write_key_file(args.out, generate_key(), force=args.force)
        except OSError as exc:
            return _fail(f"cannot write {args.out}: {exc.strerror}", EXIT_USAGE)
        print(f"wrote a new key to {path} (mode 0600)")
        return EXIT_OK
    config = load_config(args.config)
    if config.secrets is None:
        return _fail(f"{config.source} has no 'secrets' section (store, key_file or key_env)", EXIT_REJECTED)
    store = SecretStore.open(config.secrets.store, config.environ)
    if args.subcommand == "list":
        granted: dict[str, list[str]] = {}
        for tool in config.tools.values():
            for grant in tool.secrets:
                granted.setdefault(grant.name, []).append(tool.name)
        for name in store.names():
            print(f"{name:32} granted to: {', '.join(sorted(granted.get(name, []))) or '-'}")
        return EXIT_OK
    if args.subcommand == "rm":
        if not store.remove(args.name):
            return _fail(f"no secret named {args.name!r}", EXIT_REJECTED)
        print(f"removed {args.name}")
        return EXIT_OK
    value = getpass.getpass(f"value for {args.name}: ") if sys.stdin.isatty() else sys.stdin.read()
    value = value.removesuffix("\n")
    if not value:
        return _fail("empty value; nothing stored", EXIT_USAGE)
    store.set(args.name, value)
    print(f"stored {args.name} ({len(value)} characters)")
    return EXIT_OK


def _client_config(args: argparse.Namespace) -> int:
    """``client setup``: add ``toolcell mcp --target ...`` to a client's file; ``client list``: where they are."""
    import shutil
    from pathlib import Path

    from toolcell.clientsetup import (
        CLIENTS,
        ClientFileError,
        client_paths,
        has_entry,
        merge,
        read_document,
        render,
        server_entry,
        toolcell_command,
        write_atomic,
    )
    from toolcell.settings import ENV_LISTEN, default_socket

    def paths(name: str) -> dict[str, Path]:
        return client_paths(CLIENTS[name], home=Path.home(), cwd=Path.cwd(), environ=os.environ)

    if args.subcommand == "list":
        for name, client in CLIENTS.items():
            for scope, path in paths(name).items():
                try:
                    document = read_document(path)
                    state = ("no file" if document is None else
                             f"{args.name}: yes" if has_entry(document, client, args.name) else f"{args.name}: no")
                except ClientFileError as exc:
                    state = f"unreadable: {exc}"
                print(f"{name:7} {scope:9} {path}  ({state})")
        return EXIT_OK
    client = CLIENTS[args.client]
    path = Path(args.file) if args.file else paths(args.client)["user" if args.user or args.client != "vscode"
                                                                 else "workspace"]
    # Clients start servers with their own environment: the supervisor's address is written out in full.
    target = args.target or os.environ.get(ENV_LISTEN) or f"unix://{default_socket().absolute()}"
    command = toolcell_command(sys.argv[0], sys.executable, shutil.which("toolcell"))
    try:
        document = read_document(path)
        merged = merge(document or {}, client, args.name, server_entry(client, command, target))
    except ClientFileError as exc:
        return _fail(f"{path}: {exc}; not changed", EXIT_REJECTED)
    if args.dry_run:
        print(f"# {path} would be:", file=sys.stderr)
        print(render(merged), end="")
        return EXIT_OK
    try:
        write_atomic(path, render(merged))
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc.strerror}", EXIT_USAGE)
    verb = "replaced" if document is not None and has_entry(document, client, args.name) else "added"
    print(f"{verb} {args.name!r} in {path} ({client.title}): {' '.join(command)} mcp --target {target}")
    return EXIT_OK


def _sbom(args: argparse.Namespace) -> int:
    """CycloneDX 1.5 JSON of the Python environment and of images; ``--list``: the images to cover."""
    from toolcell.sbom import SbomError, build_bom, image_present, images_in_use, python_packages, read_image, render
    from toolcell.settings import load_config

    used = images_in_use(load_config(args.config))
    if args.list:
        for image, users in used.items():
            state = "present" if image_present(image) else "missing (build or pull it first)"
            print(f"{image:40} {state:10}  {', '.join(users)}")
        return EXIT_OK
    images = list(args.image or [])
    python = args.python or not images
    if not args.image and not args.python:  # everything: the environment and every image present
        images = [image for image in used if image_present(image)]
        for image in (i for i in used if i not in images):
            print(f"toolcell: sbom: {image} is not in the local engine; not included", file=sys.stderr)
    try:
        contents = [read_image(image) for image in images]
    except SbomError as exc:
        return _fail(f"sbom: {exc}", EXIT_REJECTED)
    text = render(build_bom(python_packages() if python else None, contents))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text)
        counts = ", ".join(f"{c.reference}: {len(c.packages)}" for c in contents)
        print(f"wrote {args.out} (CycloneDX 1.5{'; ' + counts if counts else ''})", file=sys.stderr)
    else:
        print(text)
    return EXIT_OK


def _images(args: argparse.Namespace) -> int:
    from toolcell.images import build_images

    if args.subcommand == "build":
        return build_images()
    if args.subcommand == "mcp":
        from toolcell.mcpimages.cli import run

        return run(pypi=args.pypi, npm=args.npm, from_file=args.from_file, name=args.name, command=args.mcp_command,
                   force=args.force, store=args.store or None)
    from toolcell.backends.oci.rootfs import RootfsStore

    store = RootfsStore(args.store)
    if args.subcommand == "unpack":
        for image in args.image:
            digest = store.unpack_docker_image(image)
            print(f"{image}: {digest} in {store.directory}")
        return EXIT_OK
    references = store.references()
    for reference, digest in sorted(references.items()):
        if reference != digest:
            print(f"{reference}\t{digest}")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toolcell", description="Sandboxed tool-execution supervisor for MCP servers.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the supervisor")
    s.add_argument("--config", help="YAML config file (default: $TOOLCELL_CONFIG or built-in)")
    s.add_argument("--listen", help="gRPC address to listen on: unix:///path.sock or host:port")
    s.add_argument("-v", "--verbose", action="store_true")
    c = sub.add_parser("call", help="call a tool through a running supervisor")
    c.add_argument("tool")
    c.add_argument("--args", default="{}", help="arguments as one JSON object")
    c.add_argument("--target", help="supervisor address (default: the built-in socket)")
    c.add_argument("--json", action="store_true", help="print the result as one JSON object")
    c.add_argument("--timeout", type=float, help="gRPC deadline in seconds")
    c.add_argument("--session", help="run in this open session (toolcell session open TOOL)")
    c.add_argument("--file", action="append", metavar="LOCAL[=PATH]",
                   help="an input file for the tool's workspace (repeatable)")
    c.add_argument("--out", metavar="DIR", help="write the files the tool returns under DIR")
    sn = sub.add_parser("session", help="open or close a session: one sandbox kept for your calls")
    sns = sn.add_subparsers(dest="session_command", required=True)
    so = sns.add_parser("open", help="open a session of a tool that allows them; prints its id")
    so.add_argument("tool")
    so.add_argument("--json", action="store_true")
    sc = sns.add_parser("close", help="close a session: its sandbox is removed")
    sc.add_argument("session_id")
    t = sub.add_parser("tools", help="list the tools a caller may use")
    t.add_argument("--target")
    t.add_argument("--json", action="store_true")
    au = sub.add_parser("audit", help="the audit trail")
    aus = au.add_subparsers(dest="subcommand", required=True)
    av = aus.add_parser("verify", help="check the hash chain; report the first broken record")
    av.add_argument("files", nargs="+", metavar="FILE", help="files in chain order: rotated (FILE.000001 ...) first")
    m = sub.add_parser("mcp", help="run an MCP server (stdio or Streamable HTTP) backed by the supervisor")
    m.add_argument("--target", help="supervisor address (default: the built-in socket)")
    m.add_argument("--transport", choices=("stdio", "http"), default="stdio",
                   help="stdio (default; for MCP clients that start the server) or Streamable HTTP")
    m.add_argument("--listen", default="127.0.0.1:8765",
                   help="HTTP address HOST:PORT (default 127.0.0.1:8765; port 0 picks a free one)")
    m.add_argument("--path", default="/mcp", help="HTTP endpoint path (default /mcp)")
    m.add_argument("--metrics-listen", metavar="HOST:PORT", default=os.environ.get("TOOLCELL_MCP_METRICS_LISTEN"),
                   help="HTTP: serve the bridge's /metrics, /healthz and /livez on this address, a port of their own "
                        "(default $TOOLCELL_MCP_METRICS_LISTEN, else none; /healthz is also on the MCP port)")
    m.add_argument("--tool", action="append", metavar="NAME", help="serve only this tool (repeatable)")
    m.add_argument("--allowed-host", action="append", metavar="HOST[:PORT]",
                   help="HTTP: also accept this Host header (repeatable; NAME:* = any port; also "
                        "$TOOLCELL_MCP_ALLOWED_HOSTS, comma-separated). Always allowed: the listen address and "
                        "127.0.0.1, localhost, [::1], with the port")
    m.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                   help="HTTP: also accept this Origin header, e.g. https://app.example (repeatable; also "
                        "$TOOLCELL_MCP_ALLOWED_ORIGINS). Always allowed: http:// + each default Host")
    m.add_argument("--config", metavar="FILE",
                   help="HTTP: require a bearer JWT from callers, verified with this toolcell config's auth.jwt "
                        "section; each caller's token is forwarded to the supervisor, whose rules decide")
    m.add_argument("--insecure-open", action="store_true",
                   help="HTTP: UNSAFE: serve a non-loopback address without authentication (anyone who can reach "
                        "it runs the tools with the bridge's credentials)")
    m.add_argument("--span-file", help="also write the bridge's spans as JSON lines here "
                                       "(OTLP export: set OTEL_EXPORTER_OTLP_ENDPOINT)")
    m.add_argument("-v", "--verbose", action="store_true")
    for cmd in (so, sc):
        cmd.add_argument("--target", help="supervisor address (default: the built-in socket)")
    for cmd in (c, t, m, so, sc):
        cmd.add_argument("--token-file", help="file with a bearer JWT (default: $TOOLCELL_TOKEN)")
        cmd.add_argument("--tls-ca", help="PEM CA of the server's certificate (TCP + TLS)")
        cmd.add_argument("--tls-cert", help="PEM client certificate (mTLS)")
        cmd.add_argument("--tls-key", help="PEM client key (mTLS)")
    pr = sub.add_parser("profiles", help="isolation profiles")
    prs = pr.add_subparsers(dest="subcommand", required=True)
    chk = prs.add_parser("check", help="validate a config file completely, as the supervisor would")
    chk.add_argument("file")
    im = sub.add_parser("images", help="runner images")
    ims = im.add_subparsers(dest="subcommand", required=True)
    ims.add_parser("build", help="build the runner images offline (debootstrap + docker import/build) and unpack "
                   "their root filesystems for the oci engine")
    store_help = "rootfs store of the oci engine (default $TOOLCELL_ROOTFS_DIR or /var/lib/toolcell/rootfs)"
    unp = ims.add_parser("unpack", help="unpack images from the local Docker engine into the oci engine's rootfs "
                         "store (content-addressed; skipped when present)")
    unp.add_argument("image", nargs="+")
    unp.add_argument("--store", default=os.environ.get("TOOLCELL_ROOTFS_DIR", "/var/lib/toolcell/rootfs"),
                     help=store_help)
    mcp = ims.add_parser("mcp", help="build toolcell/mcp-<name>:<version> for a stock MCP server from PyPI or npm "
                         "(fetched on the host, built with no network) and unpack it for the oci engine")
    mcp_source = mcp.add_mutually_exclusive_group(required=True)
    mcp_source.add_argument("--pypi", metavar="PACKAGE[==VERSION]", help="e.g. mcp-server-time==2026.10.19")
    mcp_source.add_argument("--npm", metavar="PACKAGE[@VERSION]",
                            help="e.g. @modelcontextprotocol/server-everything@2026.8.31")
    mcp_source.add_argument("--from", dest="from_file", metavar="FILE",
                            help="every server listed in FILE (lines: SOURCE SPEC [NAME [COMMAND]]; "
                                 "see images/mcp-servers.txt)")
    mcp.add_argument("--name", help="short name: the image is toolcell/mcp-NAME (default: from the package)")
    mcp.add_argument("--command", dest="mcp_command", metavar="EXECUTABLE",
                     help="which of the package's executables the servers: entry runs (default: the only one, or "
                          "the one named like the package)")
    mcp.add_argument("--force", action="store_true", help="fetch and rebuild even when the image is up to date")
    mcp.add_argument("--store", default=os.environ.get("TOOLCELL_ROOTFS_DIR", "/var/lib/toolcell/rootfs"),
                     help=store_help + "; empty: do not unpack")
    lst = ims.add_parser("list", help="images in the oci engine's rootfs store")
    lst.add_argument("--store", default=os.environ.get("TOOLCELL_ROOTFS_DIR", "/var/lib/toolcell/rootfs"),
                     help=store_help)
    d = sub.add_parser("doctor", help="check the host: engine, seccomp, cgroups, runtimes, socket, sysctls")
    d.add_argument("--config", help="YAML config file (its engine address and profiles' runtimes)")
    d.add_argument("--json", action="store_true")
    se = sub.add_parser("secrets", help="manage the encrypted secret store (values are never echoed)")
    ses = se.add_subparsers(dest="subcommand", required=True)
    for name, text in (("set", "store a secret; the value is read from stdin (or a prompt)"),
                       ("rm", "remove a secret"), ("list", "list secret names and the tools granted them")):
        cmd = ses.add_parser(name, help=text)
        cmd.add_argument("--config", help="YAML config file with the 'secrets' section")
        if name != "list":
            cmd.add_argument("name")
    kg = ses.add_parser("keygen", help="a new random key (for key_file or the key variable): printed, or written "
                        "with --out")
    kg.add_argument("--out", metavar="FILE", help="write it to FILE, mode 0600 (missing directories are made 0700); "
                    "an existing FILE is kept unless --force")
    kg.add_argument("--force", action="store_true", help="with --out: replace an existing key file (secrets sealed "
                    "with the old key can no longer be read)")
    b = sub.add_parser("bench", help="measure no-op gRPC, raw docker-py, cold, warm, throughput, a stdout flood "
                       "and stock MCP servers")
    b.add_argument("--quick", action="store_true", help="a small iteration count (the CI smoke check)")
    b.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    v = sub.add_parser("version", help="print the version")
    v.add_argument("--json", action="store_true", help="also the versions of the main dependencies")
    h = sub.add_parser("health", help="ask a running supervisor for its gRPC health (exit 0 when SERVING)")
    h.add_argument("--target", help="supervisor address (default: the built-in socket)")
    h.add_argument("--service", default="", help="health service name (default: the whole server)")
    h.add_argument("--timeout", type=float, default=5.0)
    h.add_argument("--live", action="store_true", help="liveness: any answer (also NOT_SERVING) counts as alive")
    r = sub.add_parser("reload", help="make a running supervisor reload its config file (SIGHUP) and report")
    r.add_argument("--target", help="the supervisor's socket; its state file is <socket>.state")
    r.add_argument("--state-file", help="the supervisor's state file (server.state_file)")
    r.add_argument("--timeout", type=float, default=15.0)
    sb = sub.add_parser("sbom", help="a CycloneDX 1.5 JSON bill of materials: the Python environment and images "
                        "(Debian, Python and npm packages); default: the environment and every image --list shows")
    sb.add_argument("--image", action="append", metavar="IMAGE", help="an image in the local engine (repeatable; "
                    "never pulled)")
    sb.add_argument("--python", action="store_true", help="the Python environment toolcell runs in (default "
                    "without --image)")
    sb.add_argument("--out", metavar="FILE", help="write the document here (default: stdout)")
    sb.add_argument("--list", action="store_true", help="the images the config uses and the runner images, and "
                    "whether the local engine has them")
    sb.add_argument("--config", help="YAML config file whose images --list and the default cover")
    cl = sub.add_parser("client", help="MCP clients' configuration files (Claude Desktop, Cursor, VS Code)")
    cls = cl.add_subparsers(dest="subcommand", required=True)
    cset = cls.add_parser("setup", help="add toolcell (toolcell mcp --target ADDRESS) to a client's file, keeping "
                          "its other entries; a file that is not valid JSON is left alone (exit 3)")
    cset.add_argument("client", choices=("claude", "cursor", "vscode"))
    cset.add_argument("--target", help="the supervisor's address written into the entry (default: "
                      "$TOOLCELL_LISTEN or the default socket, as an absolute unix:// address)")
    cset.add_argument("--file", help="the client's file (default: its usual place; see toolcell client list)")
    cset.add_argument("--user", action="store_true", help="vscode: the user profile's mcp.json, not "
                      "./.vscode/mcp.json")
    cset.add_argument("--name", default="toolcell", help="the server's name in the client (default toolcell)")
    cset.add_argument("--dry-run", action="store_true", help="print the file as it would be; write nothing")
    clist = cls.add_parser("list", help="each client's file and whether it has toolcell")
    clist.add_argument("--name", default="toolcell", help="the server name to look for (default toolcell)")
    cf = sub.add_parser("config", help="configuration")
    cfs = cf.add_subparsers(dest="subcommand", required=True)
    show = cfs.add_parser("show", help="print the effective configuration, secrets masked")
    show.add_argument("--config", help="YAML config file (default: $TOOLCELL_CONFIG or built-in)")
    show.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
        if args.command == "call":
            return asyncio.run(_call(args))
        if args.command == "session":
            return asyncio.run(_session(args))
        if args.command == "tools":
            return asyncio.run(_tools(args))
        if args.command == "mcp":
            return asyncio.run(_mcp(args))
        if args.command == "profiles":
            return _profiles_check(args)
        if args.command == "doctor":
            return asyncio.run(_doctor(args))
        if args.command == "audit":
            return _audit_verify(args)
        if args.command == "images":
            return _images(args)
        if args.command == "secrets":
            return _secrets(args)
        if args.command == "bench":
            from toolcell.bench import main as bench

            return bench(args.quick, args.json)
        if args.command == "health":
            return _health(args)
        if args.command == "reload":
            return _reload(args)
        if args.command == "config":
            return _config_show(args)
        if args.command == "client":
            return _client_config(args)
        if args.command == "sbom":
            return _sbom(args)
        return _version(args)
    except ConfigError as exc:
        return _fail(f"invalid configuration: {exc}", EXIT_REJECTED)
    except EngineUnavailable as exc:
        return _fail(f"container engine unavailable: {exc}", EXIT_UNAVAILABLE)
    except ToolcellError as exc:
        return _fail(str(exc), EXIT_REJECTED)
    except KeyboardInterrupt:
        return 130
