"""The `podcap` command: support-staff commands over the public API, and the server entry points.

Client commands (`capture`, `diagnose`, `get`, `list`, `download`, `stop`) call CaptureService as any script would;
`controller` and `agent` build their process's settings once from the flags and run the server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from ._client import ClientError, Connection
from ._config import CA_ENV, NAMESPACE_ENV, SERVER_ENV, TOKEN_ENV, ClientSettings, ConfigError
from ._download import STDOUT
from ._output import print_capture, print_captures

# `podcap capture` is started by hand, mid-incident, and every module imported here delays it: what only some
# commands need (the servers, merging pcaps, TLS files) is imported where it is used (bench/cli_start.py).
if TYPE_CHECKING:
    from podcap.api.serving import TlsFiles
    from podcap.api.v1 import capture_pb2

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> timedelta:
    """`30s`, `1m30s`, `500ms`, `2h`, `30d`; a bare number is seconds."""
    text = text.strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return timedelta(seconds=float(text))
    if not text or _DURATION_PART.sub("", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 1m30s or 500ms")
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return timedelta(seconds=sum(float(n) * units[u] for n, u in _DURATION_PART.findall(text)))


def parse_size(text: str) -> int:
    """Bytes as people type them: `10k`, `64M`, `1.5G`, `512KiB`, `2GB`; a bare number is bytes. The units are
    powers of 1024 whichever way they are spelled (10k is 10240 bytes), as in tcpdump's -B and in ls -h."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 10k, 64M or 1G")
    number, unit = match.groups()
    size = float(number) * _SIZE_UNITS[unit.lower()]
    if size != int(size):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes")
    return int(size)


def _non_negative_duration(text: str) -> timedelta:
    duration = parse_duration(text)
    if duration < timedelta(0):
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return duration


def _positive_duration(text: str) -> timedelta:
    duration = parse_duration(text)
    if duration <= timedelta(0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return duration


def _capture_end(text: str) -> tuple[str, str, str]:
    """One --between end as (namespace, pod, service): NS/POD, NS/svc/NAME, POD or svc/NAME (namespace "": the
    default namespace)."""
    parts = text.split("/")
    if len(parts) == 3 and parts[1] == "svc" and parts[0] and parts[2]:
        return parts[0], "", parts[2]
    if len(parts) == 2 and parts[0] == "svc" and parts[1]:
        return "", "", parts[1]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1], ""
    if len(parts) == 1 and parts[0]:
        return "", parts[0], ""
    raise argparse.ArgumentTypeError(
        f"{text!r} is not NAMESPACE/POD, NAMESPACE/svc/SERVICE, POD or svc/SERVICE"
    )


def _host_port(text: str) -> tuple[str, int]:
    """HOST:PORT, with an IPv6 address in brackets ([fd00::1]:80); the controller judges the host."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: write an IPv6 address in brackets, as [fd00::1]:80")
    if not (sep and host and port.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, as in checkout:80 or 10.96.0.20:443")
    return host, int(port)


def _pod_ref(text: str) -> tuple[str, str]:
    """NAMESPACE/POD, or POD alone (namespace "": the default namespace, podcap config)."""
    namespace, sep, pod = text.rpartition("/")
    if (sep and not namespace) or not pod:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/POD or POD")
    return namespace, pod


def _parser(prog: str = "podcap") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Capture a Kubernetes pod's traffic to a pcap.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        # Defaults None: "not given", so that _config.resolve can fall back to the environment, then the file.
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--server", help=f"controller HOST:PORT (${SERVER_ENV}, config file; 127.0.0.1:7070)")
        p.add_argument(
            "--token",
            help=f"bearer token for the controller (${TOKEN_ENV}, config file; prefer those: flags show in ps)",
        )
        p.add_argument(
            "--ca",
            type=Path,
            metavar="FILE",
            help=f"TLS: the CA (PEM) that signs the controller's certificate (${CA_ENV}, config file); implies --tls",
        )
        p.add_argument("--tls", action="store_true", default=None, help="TLS with the system's trusted CAs")
        p.add_argument("-o", "--output", choices=["text", "json", "yaml"], default="text")
        return p

    p = client(
        "capture",
        "capture a pod's traffic, every running pod a label selector matches, or both ends of a conversation",
    )
    p.add_argument("pod", type=_pod_ref, metavar="NAMESPACE/POD", nargs="?")
    p.add_argument(
        "-n",
        "--namespace",
        help=f"the pod's namespace, for POD or --selector (${NAMESPACE_ENV}, config file)",
    )
    p.add_argument(
        "-l", "--selector", default="", help="label selector, e.g. app=checkout (one pcap per pod)"
    )
    p.add_argument(
        "--between",
        nargs="+",
        type=_capture_end,
        default=[],
        metavar="END",
        help="both (or more) ends of a conversation at once, on whatever nodes they run: each END is "
        "NAMESPACE/POD, NAMESPACE/svc/SERVICE (every ready endpoint pod), POD or svc/SERVICE (in -n)",
    )
    p.add_argument("--filter", default="", help="tcpdump capture filter, e.g. 'tcp port 443'")
    p.add_argument(
        "--duration", type=parse_duration, default=timedelta(seconds=30), help="e.g. 30s, 2m (default 30s)"
    )
    p.add_argument("--max-packets", type=int, default=0, help="stop after this many packets")
    p.add_argument(
        "--max-bytes", type=parse_size, default=0, metavar="SIZE", help="stop at this pcap size, e.g. 100M"
    )
    p.add_argument("--snaplen", type=int, default=0, help="bytes kept per packet (default: whole packets)")
    p.add_argument(
        "--buffer-size",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="kernel capture buffer, e.g. 128M, if the node's default drops packets (up to the node's cap)",
    )
    p.add_argument("--reason", default="", help="why, for the audit trail (a ticket number, say)")
    p.add_argument("--request-id", default="", help="makes a retried command return the same capture")
    p.add_argument(
        "--interface", default="", help="pod-side interface (e.g. a Multus net1); default: the pod IP's"
    )
    p.add_argument(
        "--host-network",
        action="store_true",
        help="for a hostNetwork pod: capture on the node interface holding its IP, filtered to that address",
    )
    p.add_argument("--wait", action="store_true", help="wait until the capture has ended, showing progress")
    p.add_argument(
        "--download",
        type=Path,
        metavar="PATH",
        help="wait, then save the pcap to PATH, - for standard output (several pods: one pcapng merged by time, "
        "interfaces named ns/pod@node)",
    )
    p.add_argument("--force", action="store_true", help="with --download: replace PATH if it exists")
    p.add_argument(
        "--one-copy",
        action="store_true",
        help="with --download of several pods: a packet captured on two of them is kept once",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="write the pcap to -w PATH as it is captured (about a second behind the wire); it is stored too",
    )
    p.add_argument(
        "-w",
        "--write",
        type=Path,
        metavar="PATH",
        help="with --live: where the live pcap goes, - for standard output (-w - | wireshark -k -i -)",
    )

    p = client(
        "diagnose",
        "check from inside a pod whether it reaches HOST:PORT (its resolver, DNS, a TCP connect, a Service's "
        "ClusterIP and an endpoint) while a short capture of the pod runs",
    )
    p.add_argument("pod", type=_pod_ref, metavar="NAMESPACE/POD")
    p.add_argument("-n", "--namespace", help=f"the pod's namespace, for POD (${NAMESPACE_ENV}, config file)")
    p.add_argument(
        "--to",
        type=_host_port,
        required=True,
        metavar="HOST:PORT",
        help="a Service name (checkout, checkout.shop, ...), any DNS name or an IP address, and a TCP port",
    )
    p.add_argument(
        "--duration",
        type=_positive_duration,
        default=timedelta(seconds=5),
        help="how long the capture runs; the checks end within it (default 5s)",
    )
    p.add_argument("--reason", default="", help="why, for the audit trail (a ticket number, say)")

    p = client("get", "show one capture")
    p.add_argument("id")
    p = client("list", "list captures, newest first")
    p.add_argument("-n", "--namespace", help="only this namespace (default: the configured one, else all)")
    p.add_argument("--pod", default="")
    p.add_argument("--state", default="", help="PENDING, RUNNING, UPLOADING, COMPLETED, FAILED or CANCELLED")
    p.add_argument("--requester", default="", help="only captures this caller created")
    p.add_argument("--since", type=parse_duration, help="only captures created within this long, e.g. 2h")
    p.add_argument("--limit", type=int, default=50)
    p = client("download", "save a completed capture's pcap")
    p.add_argument("id")
    p.add_argument(
        "-f",
        "--file",
        type=Path,
        required=True,
        metavar="PATH",
        help="where to save it; - for standard output",
    )
    p.add_argument("--force", action="store_true", help="replace PATH if it exists")
    p.add_argument(
        "--url",
        action="store_true",
        help="fetch from the store through a short-lived URL instead of through the controller (verified alike)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--target", type=int, help="one pod of a multi-pod capture, by its index in `podcap get`"
    )
    which.add_argument("--all", action="store_true", help="every pod's pcap into the directory PATH")
    which.add_argument(
        "--merge", action="store_true", help="every pod into one pcapng at PATH, merged by time"
    )
    p.add_argument(
        "--one-copy",
        action="store_true",
        help="with --merge: a packet captured on two pods (both ends of a conversation) is kept once",
    )
    p = client("url", "print a short-lived download URL for a completed capture")
    p.add_argument("id")
    p.add_argument("--target", type=int, default=0)
    p = client("delete", "remove a finished capture's pcaps (its record is kept, marked deleted)")
    p.add_argument("id")
    p = client("stop", "end a running capture early (what was captured is kept)")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait until the pcap is stored")
    p = client("open", "download a completed capture and open it in Wireshark (or say how to)")
    p.add_argument("id")
    p.add_argument("--target", type=int, help="one pod of a multi-pod capture (default: all, merged)")
    p = client("pods", "list the running pods you may capture (every namespace, or -n NAMESPACE)")
    p.add_argument(
        "-n", "--namespace", default="", help="only this namespace (default: every one you may capture in)"
    )
    p = sub.add_parser("extcap", help="the Wireshark extcap podcap-extcap: pods as capture interfaces")
    p.add_argument("action", choices=["install"], help="install: put it where this user's Wireshark looks")
    p.add_argument(
        "--dir", type=Path, metavar="DIR", help="another extcap folder (default: the personal one)"
    )
    p = client("config", "show the server, token, CA and namespace in effect, and where each comes from")
    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=["bash", "zsh"])

    sub.add_parser(
        "token", help="print a new random bearer token and the token_sha256 line for the token file"
    )

    p = sub.add_parser("controller", help="run the controller")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    auth = p.add_mutually_exclusive_group(required=True)
    auth.add_argument(
        "--auth-tokens",
        type=Path,
        metavar="FILE",
        help="callers present bearer tokens listed (as sha256) in FILE, with their grants (docs/security.md)",
    )
    auth.add_argument(
        "--auth-kubernetes",
        action="store_true",
        help="callers present Kubernetes tokens: TokenReview, then SubjectAccessReview on pods/capture",
    )
    auth.add_argument(
        "--no-auth",
        action="store_true",
        help="no authentication, everyone may do everything: only with a loopback --listen",
    )
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="TLS for the API: certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="TLS for the API: its private key (PEM)")
    p.add_argument(
        "--max-active-captures-per-user",
        type=int,
        default=0,
        metavar="N",
        help="quota: captures one caller may have running at once (default 0: no quota)",
    )
    p.add_argument(
        "--max-bytes-per-namespace-per-day",
        type=parse_size,
        default=0,
        metavar="BYTES",
        help="quota: pcap bytes a namespace's captures may store in 24 hours (default 0: no quota)",
    )
    p.add_argument("--db", required=True, metavar="SQLALCHEMY_URL", help="e.g. sqlite:///podcap.db")
    p.add_argument("--store", required=True, metavar="URL", help="s3://BUCKET/PREFIX or file:///DIR")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--kubeconfig", type=Path, metavar="PATH")
    source.add_argument("--inventory", type=Path, metavar="FILE", help="static YAML inventory (local runs)")
    source.add_argument("--in-cluster", action="store_true", help="use the pod's service account")
    p.add_argument("--agent-namespace", default="podcap-system")
    p.add_argument("--agent-port", type=int, default=7443)
    p.add_argument("--max-duration", type=parse_duration, default=timedelta(hours=1))
    p.add_argument("--download-url-ttl", type=parse_duration, default=timedelta(minutes=5))
    p.add_argument(
        "--lease-ttl",
        type=parse_duration,
        default=timedelta(seconds=15),
        help="how long another replica waits before following a silent replica's captures",
    )
    p.add_argument(
        "--replica-id", default="", help="this replica's name in leases (default: host-pid-random)"
    )
    p.add_argument(
        "--agent-lost-after",
        type=parse_duration,
        default=timedelta(seconds=60),
        help="how long a capture's agent may stay unreachable before the capture is FAILED",
    )
    p.add_argument(
        "--retention",
        type=_non_negative_duration,
        default=timedelta(0),
        metavar="DURATION",
        help="remove captures (pcaps and records, not the audit trail) this long after they ended, "
        "e.g. 30d (default 0: keep until deleted)",
    )
    p.add_argument(
        "--retention-sweep-interval",
        type=_positive_duration,
        default=timedelta(minutes=5),
        metavar="DURATION",
        help="how often expired captures are looked for (default 5m)",
    )
    p.add_argument(
        "--agent-call-timeout",
        type=parse_duration,
        default=timedelta(seconds=15),
        help="deadline of each StartCapture/StopCapture call to an agent (default 15s)",
    )
    p.add_argument(
        "--agent-ca", type=Path, metavar="FILE", help="mutual TLS to the agents: the CA (PEM) that signs them"
    )
    p.add_argument(
        "--agent-cert", type=Path, metavar="FILE", help="mutual TLS to the agents: our client certificate"
    )
    p.add_argument("--agent-key", type=Path, metavar="FILE", help="mutual TLS to the agents: its private key")
    p.add_argument(
        "--agent-server-name",
        default="podcap-agent",
        metavar="NAME",
        help="the name in the agents' certificates (they are dialled by pod IP; default podcap-agent)",
    )

    p = sub.add_parser("agent", help="run the capture agent of one node")
    p.add_argument("--node-name", required=True)
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--store", required=True, metavar="URL")
    p.add_argument("--spool-dir", type=Path, default=Path("/var/lib/podcap/spool"))
    p.add_argument("--tcpdump", default="tcpdump", help="tcpdump binary")
    p.add_argument(
        "--tcpdump-user",
        default="tcpdump",
        help="the unprivileged user tcpdump (with only CAP_NET_RAW) and tshark (with none) run as",
    )
    p.add_argument("--max-duration", type=parse_duration, default=timedelta(hours=1))
    p.add_argument("--max-concurrent", type=int, default=8, help="captures running at once on this node")
    p.add_argument(
        "--max-spool-bytes", type=parse_size, default=8 << 30, help="pcap bytes spooled and not yet uploaded"
    )
    p.add_argument(
        "--min-free-bytes", type=parse_size, default=1 << 30, help="refuse captures below this much free disk"
    )
    p.add_argument("--max-snaplen", type=int, default=262144)
    p.add_argument(
        "--buffer-size",
        type=parse_size,
        default=32 << 20,
        help="bytes of kernel capture buffer per capture, unless the request asks for another (tcpdump -B)",
    )
    p.add_argument(
        "--max-buffer-size",
        type=parse_size,
        default=256 << 20,
        help="the most capture buffer a request may ask for",
    )
    p.add_argument(
        "--summary-tsharks",
        type=int,
        default=2,
        help="tshark processes summarising pcaps at once on this node (~300 MB each at most)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=parse_duration,
        default=timedelta(seconds=20),
        help="how long uploads may run on SIGTERM before the spool keeps them for the next start",
    )
    p.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="serve mutual TLS only: the agent's certificate (PEM)"
    )
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="serve mutual TLS only: its private key")
    p.add_argument(
        "--client-ca",
        type=Path,
        metavar="FILE",
        help="serve mutual TLS only: the CA that signs the controller",
    )
    p.add_argument(
        "--controller-name",
        default="podcap-controller",
        metavar="NAME",
        help="with mutual TLS: the name the caller's certificate must carry (default podcap-controller)",
    )
    from ._help import add_examples

    add_examples(parser)
    return parser


def _tls_files(args: argparse.Namespace, cert: str, key: str, ca: str) -> TlsFiles | None:
    """The three TLS flags of a server command, all or none (`cert` etc. are their argparse dests)."""
    from podcap.api.serving import TlsFiles

    given = {name: getattr(args, name) for name in (cert, key, ca)}
    if not any(given.values()):
        return None
    if not all(given.values()):
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        missing = ", ".join("--" + name.replace("_", "-") for name, value in given.items() if not value)
        raise SystemExit(f"podcap {args.command}: {flags} go together; missing {missing}")
    return TlsFiles(cert=given[cert], key=given[key], ca=given[ca])


def _together(args: argparse.Namespace, first: str, second: str) -> Path | None:
    """The first of two flags that go together; both or neither."""
    a, b = getattr(args, first), getattr(args, second)
    if bool(a) != bool(b):
        flags = f"--{first.replace('_', '-')} and --{second.replace('_', '-')}"
        raise SystemExit(f"podcap {args.command}: {flags} go together")
    return a  # type: ignore[no-any-return]


def _new_token() -> int:
    from podcap.controller import new_token

    token, digest = new_token()
    print(f"token: {token}")
    print(f"token_sha256: {digest}")
    print(
        "(give the token to its user, e.g. as PODCAP_TOKEN; put the hash in the controller's token file)",
        file=sys.stderr,
    )
    return 0


def kubectl_main(argv: Sequence[str] | None = None) -> int:
    """`kubectl podcap`: the same commands, the default namespace from the current kubeconfig context."""
    return main(argv, kubectl=True)


def _settings(args: argparse.Namespace, kubectl: bool) -> ClientSettings:
    from ._config import resolve

    flags = {key: getattr(args, key, None) for key in ("server", "token", "ca", "tls", "namespace")}
    return resolve(flags, kubectl=kubectl)


def main(argv: Sequence[str] | None = None, *, kubectl: bool = False) -> int:
    parser = _parser("kubectl podcap" if kubectl else "podcap")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # alembic announces each of its plugins at INFO when it is imported: noise in every command's output.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    try:
        if args.command in ("controller", "agent"):
            return _run_server(args)
        if args.command == "token":
            return _new_token()
        if args.command == "extcap":
            from ._extcap import install_command

            return install_command(args.dir)
        if args.command == "completion":
            from ._completion import script

            print(script(parser, args.shell), end="")
            return 0
        settings = _settings(args, kubectl)
        if args.command == "config":
            from ._config import describe
            from ._output import print_config

            print_config(describe(settings), args.output)
            return 0
        try:
            return asyncio.run(_client_command(args, settings))
        except ClientError as exc:
            from ._advice import advise

            raise ClientError(advise(str(exc), settings)) from exc
    except ConfigError as exc:
        print(f"podcap: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"podcap: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `podcap list | head`: the reader left. Point stdout at /dev/null so the interpreter's final flush
        # does not fail again (the recipe in Python's signal documentation), and exit as `head` expects.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


async def _client_command(args: argparse.Namespace, settings: ClientSettings) -> int:
    json_output = args.output  # text, json or yaml
    async with Connection(settings.server, token=settings.token, tls=settings.tls, ca=settings.ca) as conn:
        if args.command == "capture":
            between = _between_ends(args, settings.namespace)
            namespace, pod = ("", "") if between else _capture_target(args, settings.namespace)
            if args.download and args.download != STDOUT and args.download.exists() and not args.force:
                raise ClientError(
                    f"{args.download} exists: give --force to replace it, or another --download PATH"
                )
            _check_live(args)
            capture = await conn.create(
                namespace=namespace,
                pod=pod,
                filter_expr=args.filter,
                duration=args.duration,
                max_packets=args.max_packets,
                max_bytes=args.max_bytes,
                snaplen=args.snaplen,
                buffer_size=args.buffer_size,
                reason=args.reason,
                request_id=args.request_id,
                label_selector=args.selector,
                pod_interface=args.interface,
                host_network=args.host_network,
                between=between,
            )
            if args.wait or args.download or args.live:
                capture = await _follow(
                    conn,
                    capture.id,
                    args.download,
                    force=args.force,
                    one_copy=args.one_copy,
                    live_to=args.write if args.live else None,
                )
            # With a pcap on standard output, what is said about it goes to stderr.
            on_stdout = STDOUT in (args.download, args.write if args.live else None)
            print_capture(capture, json_output, sys.stderr if on_stdout else sys.stdout)
            return 0 if capture.state != conn.failed else 1
        if args.command == "diagnose":
            from ._diagnose import print_diagnosis

            pod_namespace, pod = args.pod
            if not (pod_namespace or settings.namespace):
                raise ClientError(f"which namespace is pod {pod} in? Give NAMESPACE/{pod} or -n NAMESPACE")
            host, port = args.to
            diagnosis = await conn.diagnose(
                pod_namespace or settings.namespace, pod, host, port, args.duration, args.reason
            )
            print_diagnosis(diagnosis, json_output, pod)
            return 0 if all(step.ok for step in diagnosis.steps) else 1
        if args.command == "get":
            print_capture(await conn.get(args.id), json_output)
        elif args.command == "list":
            captures = await conn.list(
                settings.namespace, args.pod, args.state, args.limit, args.requester, args.since
            )
            print_captures(captures, json_output)
        elif args.command == "download":
            from ._download import download

            capture = await conn.get(args.id)
            await download(
                conn,
                capture,
                args.file,
                args.target,
                args.all,
                args.merge,
                via_url=args.url,
                force=args.force,
            )
        elif args.command == "url":
            print(await conn.download_url(args.id, args.target))
        elif args.command == "delete":
            await conn.delete(args.id)
            print(f"deleted capture {args.id}", file=sys.stderr)
        elif args.command == "stop":
            capture = await conn.stop(args.id)
            if args.wait:
                from ._live import Progress, follow

                capture = await follow(conn, capture.id, progress=Progress())
            print_capture(capture, json_output)
        elif args.command == "pods":
            from ._pods import print_pods

            print_pods(await conn.list_pods(args.namespace), args.output)
        elif args.command == "open":
            from ._open import open_capture

            await open_capture(conn, await conn.get(args.id), args.target)
    return 0


async def _follow(
    conn: Connection,
    capture_id: str,
    path: Path | None,
    *,
    force: bool,
    one_copy: bool,
    live_to: Path | None = None,
) -> capture_pb2.Capture:
    """Waits for the capture to settle, showing progress (Ctrl-C stops it); with `live_to`, writes the pcap there
    as it is captured; with `path`, saves the pcap the moment the capture has ended, while its summary is still
    being made on the node (the summary never holds the pcap back)."""
    from ._download import download
    from ._live import Progress, follow

    async def save(capture: capture_pb2.Capture) -> None:
        if path is not None and capture.state == conn.completed:
            merge = len(capture.targets) > 1
            await download(
                conn, capture, path, target=None, every=False, merge=merge, force=force, one_copy=one_copy
            )

    return await follow(conn, capture_id, progress=Progress(), live_to=live_to, force=force, on_ended=save)


def _check_live(args: argparse.Namespace) -> None:
    """--live and -w go together, for one pod, and never share standard output with --download."""
    if args.live != (args.write is not None):
        raise ClientError(
            "--live writes the pcap as it is captured to -w PATH (- for standard output): give both"
        )
    if not args.live:
        return
    if args.selector:
        raise ClientError("--live streams one pod's pcap: give NAMESPACE/POD, not --selector")
    if args.write == STDOUT and args.download == STDOUT:
        raise ClientError("-w - and --download - cannot both write to standard output")
    if args.write != STDOUT and args.write.exists() and not args.force:
        raise ClientError(f"{args.write} exists: give --force to replace it, or another -w PATH")


def _run_server(args: argparse.Namespace) -> int:
    """The controller or the agent; a configuration it refuses (a bad URL, file or combination of flags) is a
    message and exit code 2, not a traceback (which -v still logs)."""
    try:
        return _run_controller(args) if args.command == "controller" else _run_agent(args)
    except ValueError as exc:
        logging.getLogger("podcap").debug("refused configuration", exc_info=True)
        print(f"podcap {args.command}: {exc}", file=sys.stderr)
        return 2


def _between_ends(args: argparse.Namespace, namespace: str) -> list[tuple[str, str, str]]:
    """The --between ends with their namespaces filled in from -n (else the configured default)."""
    if not args.between:
        return []
    if args.pod or args.selector:
        raise ClientError("give NAMESPACE/POD, --selector or --between, only one of them")
    ends = []
    for end_namespace, pod, service in args.between:
        if not (end_namespace or namespace):
            shown = pod or f"svc/{service}"
            raise ClientError(
                f"which namespace is {shown} in? Give NAMESPACE/{shown}, -n NAMESPACE, ${NAMESPACE_ENV}, "
                "or 'namespace:' in the config file"
            )
        ends.append((end_namespace or namespace, pod, service))
    return ends


def _capture_target(args: argparse.Namespace, namespace: str) -> tuple[str, str]:
    """NAMESPACE/POD, POD in `namespace` (-n, else the configured default), or a namespace with -l SELECTOR."""
    if args.pod and args.selector:
        raise ClientError("give NAMESPACE/POD or --selector, not both")
    if args.pod:
        pod_namespace, pod = args.pod
        if not (pod_namespace or namespace):
            raise ClientError(
                f"which namespace is pod {pod} in? Give NAMESPACE/{pod}, -n NAMESPACE, ${NAMESPACE_ENV}, "
                "or 'namespace:' in the config file (podcap config shows where it is)"
            )
        return str(pod_namespace or namespace), str(pod)
    if not (args.selector and namespace):
        raise ClientError("give NAMESPACE/POD, or -n NAMESPACE with -l SELECTOR")
    return namespace, ""


def _run_controller(args: argparse.Namespace) -> int:
    from podcap.controller import (
        CaptureLimitsCaps,
        CaptureSettings,
        ControllerSettings,
        Quotas,
        RetentionSettings,
        serve,
    )

    settings = ControllerSettings(
        listen=args.listen,
        db_url=args.db,
        store_url=args.store,
        kubeconfig=args.kubeconfig,
        inventory_file=args.inventory,
        agent_namespace=args.agent_namespace,
        agent_port=args.agent_port,
        agent_call_timeout=args.agent_call_timeout.total_seconds(),
        agent_tls=_tls_files(args, "agent_cert", "agent_key", "agent_ca"),
        agent_server_name=args.agent_server_name,
        auth="tokens" if args.auth_tokens else "kubernetes" if args.auth_kubernetes else "none",
        token_file=args.auth_tokens,
        api_tls_cert=_together(args, "tls_cert", "tls_key"),
        api_tls_key=args.tls_key,
        captures=CaptureSettings(
            caps=CaptureLimitsCaps(max_duration=args.max_duration),
            quotas=Quotas(
                max_active_per_user=args.max_active_captures_per_user,
                max_bytes_per_namespace_per_day=args.max_bytes_per_namespace_per_day,
            ),
            download_url_ttl=args.download_url_ttl,
            lease_ttl=args.lease_ttl,
            agent_lost_after=args.agent_lost_after,
            **({"replica_id": args.replica_id} if args.replica_id else {}),
        ),
        retention=RetentionSettings(ttl=args.retention, sweep_interval=args.retention_sweep_interval),
    )
    asyncio.run(serve(settings))
    return 0


def _run_agent(args: argparse.Namespace) -> int:
    from podcap.agent import AgentSettings, Limits, serve

    settings = AgentSettings(
        node_name=args.node_name,
        listen=args.listen,
        store_url=args.store,
        spool_dir=args.spool_dir,
        tcpdump=args.tcpdump,
        tcpdump_user=args.tcpdump_user,
        limits=Limits(
            max_duration_s=args.max_duration.total_seconds(),
            max_snaplen=args.max_snaplen,
            default_snaplen=args.max_snaplen,
            default_buffer_size=args.buffer_size,
            max_buffer_size=args.max_buffer_size,
            summary_tsharks=args.summary_tsharks,
            max_concurrent=args.max_concurrent,
            max_spool_bytes=args.max_spool_bytes,
            min_free_bytes=args.min_free_bytes,
            shutdown_grace_s=args.shutdown_grace.total_seconds(),
        ),
        tls=_tls_files(args, "tls_cert", "tls_key", "client_ca"),
        controller_name=args.controller_name,
    )
    asyncio.run(serve(settings))
    return 0
