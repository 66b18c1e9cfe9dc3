"""The `podcap` command: support-staff commands over the public API, and the server entry points.

Client commands (`capture`, `get`, `list`, `download`, `stop`) call CaptureService exactly as any script would;
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

from ._client import ClientError, Connection
from ._download import download
from ._output import print_capture, print_captures

SERVER_ENV = "PODCAP_SERVER"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> timedelta:
    """`30s`, `1m30s`, `500ms`, `2h`; a bare number is seconds."""
    text = text.strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return timedelta(seconds=float(text))
    if not text or _DURATION_PART.sub("", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 1m30s or 500ms")
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return timedelta(seconds=sum(float(n) * units[u] for n, u in _DURATION_PART.findall(text)))


def _pod_ref(text: str) -> tuple[str, str]:
    namespace, sep, pod = text.partition("/")
    if not sep or not namespace or not pod:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/POD")
    return namespace, pod


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podcap", description="Capture a Kubernetes pod's traffic to a pcap."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--server",
            default=os.environ.get(SERVER_ENV, "127.0.0.1:7070"),
            help=f"controller HOST:PORT (${SERVER_ENV})",
        )
        p.add_argument("-o", "--output", choices=["text", "json"], default="text")
        return p

    p = client("capture", "capture a pod's traffic, or every running pod a label selector matches")
    p.add_argument("pod", type=_pod_ref, metavar="NAMESPACE/POD", nargs="?")
    p.add_argument("-n", "--namespace", default="", help="with --selector: the pods' namespace")
    p.add_argument(
        "-l", "--selector", default="", help="label selector, e.g. app=checkout (one pcap per pod)"
    )
    p.add_argument("--filter", default="", help="tcpdump capture filter, e.g. 'tcp port 443'")
    p.add_argument(
        "--duration", type=parse_duration, default=timedelta(seconds=30), help="e.g. 30s, 2m (default 30s)"
    )
    p.add_argument("--max-packets", type=int, default=0)
    p.add_argument("--max-bytes", type=int, default=0)
    p.add_argument("--snaplen", type=int, default=0, help="bytes kept per packet (default: whole packets)")
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
        help="wait, then save the pcap to PATH (several pods: one pcapng merged by time, interfaces named ns/pod@node)",
    )

    p = client("get", "show one capture")
    p.add_argument("id")
    p = client("list", "list captures, newest first")
    p.add_argument("-n", "--namespace", default="")
    p.add_argument("--pod", default="")
    p.add_argument("--state", default="", help="PENDING, RUNNING, UPLOADING, COMPLETED, FAILED or CANCELLED")
    p.add_argument("--requester", default="", help="only captures this caller created")
    p.add_argument("--since", type=parse_duration, help="only captures created within this long, e.g. 2h")
    p.add_argument("--limit", type=int, default=50)
    p = client("download", "save a completed capture's pcap")
    p.add_argument("id")
    p.add_argument("-f", "--file", type=Path, required=True, metavar="PATH")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--target", type=int, help="one pod of a multi-pod capture, by its index in `podcap get`"
    )
    which.add_argument("--all", action="store_true", help="every pod's pcap into the directory PATH")
    which.add_argument(
        "--merge", action="store_true", help="every pod into one pcapng at PATH, merged by time"
    )
    p = client("url", "print a short-lived download URL for a completed capture")
    p.add_argument("id")
    p.add_argument("--target", type=int, default=0)
    p = client("delete", "remove a finished capture's pcaps (its record is kept, marked deleted)")
    p.add_argument("id")
    p = client("stop", "end a running capture early (what was captured is kept)")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait until the pcap is stored")

    p = sub.add_parser("controller", help="run the controller")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
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

    p = sub.add_parser("agent", help="run the capture agent of one node")
    p.add_argument("--node-name", required=True)
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--store", required=True, metavar="URL")
    p.add_argument("--spool-dir", type=Path, default=Path("/var/lib/podcap/spool"))
    p.add_argument("--tcpdump", default="tcpdump", help="tcpdump binary")
    p.add_argument(
        "--tcpdump-user", default="tcpdump", help="user tcpdump drops to after opening the device (-Z)"
    )
    p.add_argument("--max-duration", type=parse_duration, default=timedelta(hours=1))
    p.add_argument("--max-concurrent", type=int, default=8, help="captures running at once on this node")
    p.add_argument(
        "--max-spool-bytes", type=int, default=8 << 30, help="pcap bytes spooled and not yet uploaded"
    )
    p.add_argument(
        "--min-free-bytes", type=int, default=1 << 30, help="refuse captures below this much free disk"
    )
    p.add_argument("--max-snaplen", type=int, default=262144)
    p.add_argument(
        "--shutdown-grace",
        type=parse_duration,
        default=timedelta(seconds=20),
        help="how long uploads may run on SIGTERM before the spool keeps them for the next start",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "controller":
            return _run_controller(args)
        if args.command == "agent":
            return _run_agent(args)
        return asyncio.run(_client_command(args))
    except ClientError as exc:
        print(f"podcap: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _client_command(args: argparse.Namespace) -> int:
    json_output = args.output == "json"
    async with Connection(args.server) as conn:
        if args.command == "capture":
            namespace, pod = _capture_target(args)
            capture = await conn.create(
                namespace=namespace,
                pod=pod,
                filter_expr=args.filter,
                duration=args.duration,
                max_packets=args.max_packets,
                max_bytes=args.max_bytes,
                snaplen=args.snaplen,
                reason=args.reason,
                request_id=args.request_id,
                label_selector=args.selector,
                pod_interface=args.interface,
                host_network=args.host_network,
            )
            if args.wait or args.download:
                capture = await conn.wait(capture.id, progress=True)
            if args.download and capture.state == conn.completed:
                merge = len(capture.targets) > 1
                await download(conn, capture, args.download, target=None, every=False, merge=merge)
            print_capture(capture, json_output)
            return 0 if capture.state != conn.failed else 1
        if args.command == "get":
            print_capture(await conn.get(args.id), json_output)
        elif args.command == "list":
            captures = await conn.list(
                args.namespace, args.pod, args.state, args.limit, args.requester, args.since
            )
            print_captures(captures, json_output)
        elif args.command == "download":
            await download(conn, await conn.get(args.id), args.file, args.target, args.all, args.merge)
        elif args.command == "url":
            print(await conn.download_url(args.id, args.target))
        elif args.command == "delete":
            await conn.delete(args.id)
            print(f"deleted capture {args.id}", file=sys.stderr)
        elif args.command == "stop":
            capture = await conn.stop(args.id)
            if args.wait:
                capture = await conn.wait(capture.id, progress=True)
            print_capture(capture, json_output)
    return 0


def _capture_target(args: argparse.Namespace) -> tuple[str, str]:
    """NAMESPACE/POD, or -n NAMESPACE with -l SELECTOR."""
    if args.pod and args.selector:
        raise ClientError("give NAMESPACE/POD or --selector, not both")
    if args.pod:
        namespace, pod = args.pod
        return str(namespace), str(pod)
    if not (args.selector and args.namespace):
        raise ClientError("give NAMESPACE/POD, or -n NAMESPACE with -l SELECTOR")
    return str(args.namespace), ""


def _run_controller(args: argparse.Namespace) -> int:
    from podcap.controller import CaptureLimitsCaps, CaptureSettings, ControllerSettings, serve

    settings = ControllerSettings(
        listen=args.listen,
        db_url=args.db,
        store_url=args.store,
        kubeconfig=args.kubeconfig,
        inventory_file=args.inventory,
        agent_namespace=args.agent_namespace,
        agent_port=args.agent_port,
        captures=CaptureSettings(
            caps=CaptureLimitsCaps(max_duration=args.max_duration),
            download_url_ttl=args.download_url_ttl,
            lease_ttl=args.lease_ttl,
            agent_lost_after=args.agent_lost_after,
            **({"replica_id": args.replica_id} if args.replica_id else {}),
        ),
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
            max_concurrent=args.max_concurrent,
            max_spool_bytes=args.max_spool_bytes,
            min_free_bytes=args.min_free_bytes,
            shutdown_grace_s=args.shutdown_grace.total_seconds(),
        ),
    )
    asyncio.run(serve(settings))
    return 0
