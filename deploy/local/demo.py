"""`make demo`: podcap end to end on one machine, on the embedded defaults, in well under a minute.

What a support engineer's first five minutes with podcap look like, with nothing but this machine: a simulated
two-node cluster in network namespaces, a real `podcap agent` in each node's namespace, a real `podcap controller`
on SQLite and a local directory store with a static inventory naming the pods, and two pods talking HTTP
(`shop/frontend-5c4b` calls the API of `shop/checkout-7d9f` a few times a second). Then the `podcap` CLI runs
exactly as a user runs it, each command printed before it runs: a 5 s capture of the checkout pod downloaded
for Wireshark, `podcap list`, `podcap get ID` (what is inside), `tshark -r` of the first packets, and a
label-selector capture of both pods merged into one pcapng.

The simulated cluster is the test suite's lab (`tests/support/lab.py`), imported rather than copied: the same
Calico- and flannel-style wiring the end-to-end tests capture on, and its teardown, which finds and kills
whatever runs in its namespaces. So this script runs from a checkout with the dev install (`make setup`), not
from an installed podcap package. The controller in the root namespace reaches each agent through a relay into
the node's namespace (like `kubectl port-forward`): the root namespace gets no route to the lab, and no demo
traffic leaves it.

Everything it writes goes into one directory (`--workdir`, default `./demo-output`), kept at the end so the
pcaps can be opened in Wireshark: the pcaps, `podcap.db`, the store, `inventory.yaml` and every process's log.
The agents' spools (a pcap leaves its spool once stored) live in a temporary directory that tcpdump can reach
after it drops root. Processes and namespaces are torn down at the end, on failure, on Ctrl-C and on SIGTERM;
`--keep-running` leaves the cluster up, with the PODCAP_SERVER to use from another shell, until Ctrl-C.
Needs root (namespaces, tcpdump), like the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the lab lives in the repository's tests/, which is not an installed package

try:
    import yaml

    from tests.support.lab import Lab, LabPod, build_lab, netns_problem, sweep_stale_namespaces
    from tests.support.processes import PODCAP, free_port, stop, wait_healthy
except ImportError as exc:  # run by a Python without podcap's dev install
    sys.exit(f"demo: {exc}; run `make demo`, or `make setup` and then .venv/bin/python {sys.argv[0]}")

WORKLOAD = Path(__file__).resolve().with_name("workload.py")
HTTP_PORT = 8080
SERVICE_IP = "10.96.0.10"  # the checkout Service's ClusterIP in the static inventory
AGENT_PORT = 7443  # what every node's agent listens on inside its node, as in a cluster
CONTROLLER_PORT = 7070  # the README's; another free port when it is taken
NAMESPACE = "shop"
DEMO_USER = "support-demo"
# name -> (node, IP, CNI wiring, labels)
PODS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "checkout-7d9f": ("node-1", "10.251.1.10", "calico", {"app": "checkout", "tier": "web"}),
    "frontend-5c4b": ("node-2", "10.251.2.20", "bridge", {"app": "frontend", "tier": "web"}),
}
CNI_NAMES = {"calico": "Calico", "bridge": "flannel/bridge", "cilium": "Cilium", "eni": "AWS VPC CNI"}
TOOLS = ("ip", "tc", "nsenter", "setpriv", "tcpdump", "tshark", "mergecap", "capinfos")
MARKER = ".podcap-demo"  # a directory holding this is a demo's output, which the next run may replace
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy"}


class DemoError(Exception):
    """Something the user can act on; printed without a traceback."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: tear down exactly as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def _shown(path: Path) -> str:
    """`path` as the user would type it: relative to where they are, when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _preflight() -> None:
    if os.geteuid() != 0:
        raise DemoError(
            "the demo builds network namespaces and runs tcpdump: run it as root (sudo make demo)"
        )
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise DemoError(
            f"missing {', '.join(missing)}: `make demo` installs them (bash .ci/install-system-packages)"
        )
    problem = netns_problem()
    if problem is not None:
        raise DemoError(f"network namespaces do not work here: {problem}")


def _prepare_workdir(workdir: Path) -> None:
    """An empty directory, or the output of an earlier demo, which is replaced; anything else is left alone."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise DemoError(f"{workdir} exists and is not an earlier demo's output; choose another --workdir")
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text(
        "written by deploy/local/demo.py; the next demo run replaces this directory\n"
    )
    (workdir / ".gitignore").write_text("*\n")  # demo output never shows up in `git status`


def _controller_address() -> str:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", CONTROLLER_PORT))
        except OSError:
            return f"127.0.0.1:{free_port()}"
    return f"127.0.0.1:{CONTROLLER_PORT}"


@dataclass(frozen=True)
class _Auth:
    """How the demo's controller authenticates callers, and what the CLI then presents."""

    controller_args: list[str]
    token: str
    shown: str


def _auth(workdir: Path) -> _Auth:
    """The strongest choice this build of podcap offers: a bearer token when the controller takes a token file
    and the CLI can present one, else the open mode the controller allows on a loopback address."""
    server_usage = _usage("controller")
    if "--auth-tokens" in server_usage and "PODCAP_TOKEN" in _usage("list"):
        # The token file format of `podcap controller --auth-tokens`: roles, and users with the sha256 of
        # their token and their grants. The token itself is never written down; it lives as long as the demo.
        token = secrets.token_urlsafe(32)
        path = workdir / "tokens.yaml"
        path.write_text(
            "# Written by the podcap demo: who may call the controller (`--auth-tokens`). Only the sha256 of\n"
            "# each token is stored; the demo hands its token to the CLI as PODCAP_TOKEN.\n"
            + yaml.safe_dump(
                {
                    "roles": {"support": ["capture", "read", "download", "stop"]},
                    "users": [
                        {
                            "name": DEMO_USER,
                            "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                            "grants": [{"role": "support", "namespaces": [NAMESPACE]}],
                        }
                    ],
                },
                sort_keys=False,
            )
        )
        shown = f"a bearer token of user {DEMO_USER} (role support in namespace {NAMESPACE}, {_shown(path)})"
        return _Auth(["--auth-tokens", str(path)], token, shown)
    if "--no-auth" in server_usage:
        return _Auth(["--no-auth"], "", "none (--no-auth: it listens on 127.0.0.1 only)")
    if "--auth-tokens" in server_usage:
        raise DemoError(
            "this controller requires --auth-tokens, but the podcap CLI has no PODCAP_TOKEN to send one"
        )
    return _Auth([], "", "none (this build of podcap has no authentication)")


def _usage(command: str) -> str:
    return subprocess.run(
        [PODCAP, command, "--help"], capture_output=True, text=True, timeout=60, check=False
    ).stdout


class Demo:
    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir = workdir
        self.stack = stack
        self.store_url = f"file://{workdir / 'store'}"
        self.lab: Lab
        self.spool = Path()
        self.pods: dict[str, LabPod] = {}
        self.agents: dict[str, tuple[subprocess.Popen[Any], str]] = {}  # node -> (process, address)
        self.controller: subprocess.Popen[bytes] | None = None
        self.server = ""
        self.auth = _Auth([], "", "")
        self.controller_argv: list[str] = []
        self.client_env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}

    # --- the cluster ----------------------------------------------------------------------------------------
    def build_cluster(self) -> None:
        swept = sweep_stale_namespaces()  # what an earlier run killed by SIGKILL left behind
        if swept:
            _say(f"(removed {len(swept)} namespaces left by an earlier run that was killed)")
        spool = Path(tempfile.mkdtemp(prefix="podcap-demo-spool-"))
        spool.chmod(0o711)  # tcpdump, after dropping root, writes its pcap below it
        self.stack.callback(shutil.rmtree, spool, ignore_errors=True)
        self.spool = spool
        self.lab = self.stack.enter_context(build_lab(nodes=2, default_pods=False))
        for name, (node, ip, cni, _) in PODS.items():
            self.pods[name] = self.lab.add_pod(node, NAMESPACE, name, ip, cni=cni)

    def start_workload(self) -> None:
        checkout, frontend = self.pods["checkout-7d9f"], self.pods["frontend-5c4b"]
        logs = self.workdir / "logs"
        self.lab.popen(
            checkout.netns,
            [sys.executable, str(WORKLOAD), "serve", str(HTTP_PORT)],
            stdin=subprocess.DEVNULL,
            stdout=(logs / "checkout-7d9f.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://{checkout.ip}:{HTTP_PORT}/api/cart"
        deadline = time.monotonic() + 15
        while True:  # the first request crosses both nodes and the fabric: the cluster's network works
            with contextlib.suppress(subprocess.CalledProcessError, ValueError):
                if self.lab.http_get(frontend.netns, url, timeout=2) == 200:
                    break
            if time.monotonic() > deadline:
                raise DemoError(f"the frontend pod never got an answer from {url}")
            time.sleep(0.1)
        self.lab.popen(
            frontend.netns,
            [sys.executable, str(WORKLOAD), "call", f"{checkout.ip}:{HTTP_PORT}"],
            stdin=subprocess.DEVNULL,
            stdout=(logs / "frontend-5c4b.log").open("wb"),
            stderr=subprocess.STDOUT,
        )

    def start_agents(self) -> None:
        """One agent per node, in the node's namespace, all starting at once."""
        for node in sorted(self.lab.nodes.values(), key=lambda n: n.name):
            process = self.lab.popen(
                node.netns,
                [
                    PODCAP,
                    "agent",
                    "--node-name",
                    node.name,
                    "--listen",
                    f"127.0.0.1:{AGENT_PORT}",
                    "--store",
                    self.store_url,
                    "--spool-dir",
                    str(self.spool / node.name),
                ],
                stdout=(self.workdir / "logs" / f"agent-{node.name}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            relay = self.lab.forward_out("127.0.0.1", 0, node.netns, "127.0.0.1", AGENT_PORT)
            self.agents[node.name] = (process, f"{relay.host}:{relay.port}")
        # Stopped before the lab tears down, with SIGTERM, so that they end their captures cleanly.
        self.stack.callback(self._stop_agents)
        for name, (process, address) in self.agents.items():
            try:
                wait_healthy(address, process, timeout=60)
            except (RuntimeError, TimeoutError) as exc:
                raise DemoError(
                    f"the agent of {name} did not start ({exc}); see {self._log(f'agent-{name}')}"
                ) from exc

    def _stop_agents(self) -> None:
        for process, _ in self.agents.values():
            process.terminate()
        for process, _ in self.agents.values():
            stop(process)

    def write_inventory(self) -> Path:
        inventory = {
            "pods": [
                {
                    "namespace": p.namespace,
                    "name": p.name,
                    "node": p.node,
                    "ips": [p.ip],
                    "labels": PODS[n][3],
                }
                for n, p in self.pods.items()
            ],
            "agents": {node: address for node, (_, address) in self.agents.items()},
            # The Service the frontend calls, for `podcap capture --between` and `podcap diagnose`.
            "services": [
                {
                    "namespace": NAMESPACE,
                    "name": "checkout",
                    "clusterIP": SERVICE_IP,
                    "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT, "protocol": "TCP"}],
                    "selector": {"app": "checkout"},
                }
            ],
        }
        path = self.workdir / "inventory.yaml"
        path.write_text(
            "# Written by the podcap demo: the simulated cluster's pods, for each node where its agent\n"
            "# listens (relays into the node namespaces), and its Service.\n"
            "# `podcap controller --inventory` reads it.\n" + yaml.safe_dump(inventory, sort_keys=False)
        )
        return path

    def start_controller(self, inventory: Path) -> None:
        self.server = _controller_address()
        self.auth = _auth(self.workdir)
        argv = [
            PODCAP,
            "controller",
            "--listen",
            self.server,
            "--db",
            f"sqlite:///{self.workdir / 'podcap.db'}",
            "--store",
            self.store_url,
            "--inventory",
            str(inventory),
            *self.auth.controller_args,
        ]
        # The lab's tag: should this demo be SIGKILLed, the next run's sweep also ends this controller.
        env = {**os.environ, "PODCAP_LAB": self.lab.id}
        with (self.workdir / "logs" / "controller.log").open("wb") as log:
            self.controller = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.stack.callback(stop, self.controller)
        try:
            wait_healthy(self.server, self.controller, timeout=60)
        except (RuntimeError, TimeoutError) as exc:
            raise DemoError(f"the controller did not start ({exc}); see {self._log('controller')}") from exc
        self.client_env["PODCAP_SERVER"] = self.server
        if self.auth.token:
            self.client_env["PODCAP_TOKEN"] = self.auth.token
        self.controller_argv = argv

    def describe(self, inventory: Path) -> None:
        _say(
            "Simulated cluster (network namespaces, wired like real CNIs; the root namespace has no route in):"
        )
        for node in sorted(self.lab.nodes.values(), key=lambda n: n.name):
            _say(f"  {node.name}  {node.ip:<12} netns {node.netns:<14} agent on :{AGENT_PORT}")
        for name, pod in self.pods.items():
            role = (
                "serves its HTTP API on :8080"
                if name.startswith("checkout")
                else "calls checkout ~5x a second"
            )
            wiring = f"{CNI_NAMES[pod.cni]} veth {pod.host_if}"
            _say(f"  {pod.namespace}/{name:<14} on {pod.node}  {pod.ip:<12} {wiring:<34} {role}")
        _say(f"  namespaces: {' '.join(self.lab.netns_names())}")
        _say()
        _say(f"Static inventory ({_shown(inventory)}), as the controller reads it:")
        for line in inventory.read_text().splitlines()[3:]:
            _say(f"  {line}")
        _say()
        shown = ["podcap", *(_shown(Path(a)) if a.startswith("/") else a for a in self.controller_argv[1:])]
        _say("Controller (SQLite + a local directory store), in the root namespace:")
        _say(f"  {shlex.join(shown)}")
        _say(f"  authentication: {self.auth.shown}")
        _say(f"  logs of every process: {_shown(self.workdir / 'logs')}/")

    # --- what a user runs -----------------------------------------------------------------------------------
    def podcap(self, *args: str) -> str:
        """One CLI command, printed first; its output shown as it would be in a terminal."""
        _say(f"\n$ podcap {shlex.join(args)}")
        done = subprocess.run(
            [PODCAP, *args], env=self.client_env, stdout=subprocess.PIPE, text=True, timeout=120, check=False
        )
        sys.stdout.write(done.stdout)
        sys.stdout.flush()
        if done.returncode != 0:
            raise DemoError(f"`podcap {shlex.join(args)}` failed with exit status {done.returncode}")
        return done.stdout

    def command(self, *argv: str, head: int = 0) -> None:
        """Any other command, printed first; with `head`, only its first lines are shown, as `| head` would."""
        _say(f"\n$ {shlex.join(argv)}" + (f" | head -{head}" if head else ""))
        done = subprocess.run(
            argv, env=self.client_env, stdout=subprocess.PIPE, text=True, timeout=120, check=False
        )
        lines = done.stdout.splitlines(keepends=True)
        sys.stdout.write("".join(lines[:head] if head else lines))
        sys.stdout.flush()
        if done.returncode != 0:
            raise DemoError(f"`{shlex.join(argv)}` failed with exit status {done.returncode}")

    def walkthrough(self) -> None:
        checkout = self.pods["checkout-7d9f"]
        pcap = _shown(self.workdir / "checkout.pcap")
        merged = _shown(self.workdir / "shop.pcapng")
        _say(f"\nA support engineer's first minutes (PODCAP_SERVER={self.server}):")
        shown = self.podcap(
            "capture",
            f"{NAMESPACE}/{checkout.name}",
            "--filter",
            f"tcp port {HTTP_PORT}",
            "--duration",
            "5s",
            "--download",
            pcap,
        )
        found = re.search(r"^\s*id: (\S+)$", shown, re.MULTILINE)
        if found is None:
            raise DemoError("the capture command printed no capture id")
        self.podcap("list")
        self.podcap("get", found[1])
        self.command("tshark", "-r", pcap, "-c", "10")
        _say(
            "\nEvery pod a label selector matches, at once, merged into one pcapng (interfaces named pod@node):"
        )
        self.podcap(
            "capture",
            "-n",
            NAMESPACE,
            "-l",
            "tier=web",
            "--filter",
            f"tcp port {HTTP_PORT}",
            "--duration",
            "3s",
            "--download",
            merged,
        )
        # Every packet is in the merged file twice, once from each pod's veth; Wireshark dissects the first copy
        # as HTTP (the second reads as a retransmission): requests seen leaving frontend, answers leaving checkout.
        self.command(
            "tshark",
            "-r",
            merged,
            "-Y",
            "http",
            "-T",
            "fields",
            "-e",
            "frame.interface_name",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "http.request.method",
            "-e",
            "http.request.uri",
            "-e",
            "http.response.code",
            head=8,
        )

    def keep_running(self) -> None:
        checkout = self.pods["checkout-7d9f"]
        node = self.lab.nodes[checkout.node]
        lines = [
            "",
            "The cluster stays up until Ctrl-C. From another shell:",
            f"  export PODCAP_SERVER={self.server}",
        ]
        if self.auth.token:
            lines.append(f"  export PODCAP_TOKEN={self.auth.token}   # valid while this demo runs")
        lines += [
            f"  {PODCAP} list",
            f"  {PODCAP} capture {NAMESPACE}/{checkout.name} --filter 'tcp port {HTTP_PORT}' --duration 10s "
            "--download /tmp/checkout.pcap",
            f"  sudo ip netns exec {node.netns} ip -br link   # node-1's devices: {checkout.name}'s is {checkout.host_if}",
        ]
        _say("\n".join(lines))
        processes = {f"agent-{n}": p for n, (p, _) in self.agents.items()}
        assert self.controller is not None
        processes["controller"] = self.controller
        while True:
            for name, process in processes.items():
                if process.poll() is not None:
                    raise DemoError(
                        f"the {name} exited with status {process.returncode}; see {self._log(name)}"
                    )
            time.sleep(1)

    def _log(self, name: str) -> str:
        return _shown(self.workdir / "logs" / f"{name}.log")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="podcap end to end on this machine: a simulated cluster in network namespaces, agents, "
        "a controller on SQLite and a local directory, and the CLI as a user runs it. Needs root."
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("demo-output"),
        help="where everything goes, kept at the end (default ./demo-output; an earlier demo's is replaced)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="after the walkthrough, leave the cluster up for your own podcap commands until Ctrl-C",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()
    workdir = args.workdir.resolve()
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGHUP, _terminated)
    try:
        _preflight()
        _prepare_workdir(workdir)
        with contextlib.ExitStack() as stack:
            try:
                demo = Demo(workdir, stack)
                demo.build_cluster()
                demo.start_workload()
                demo.start_agents()
                inventory = demo.write_inventory()
                demo.start_controller(inventory)
                demo.describe(inventory)
                demo.walkthrough()
                if args.keep_running:
                    demo.keep_running()
            finally:
                # A second Ctrl-C must not cut the teardown short and leave namespaces behind.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                _say("\nTearing down the simulated cluster (processes, relays, namespaces)...")
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
        reason = signal.Signals(signum).name if isinstance(exc, _Terminated) else "Ctrl-C"
        print(
            f"demo: stopped by {reason}; everything torn down, output kept in {_shown(workdir)}/", flush=True
        )
        return 128 + signum
    _say(
        f"\nDone in {time.monotonic() - started:.0f} s; the cluster is gone, the output stays in "
        f"{_shown(workdir)}/:\n"
        f"  checkout.pcap   the checkout pod's HTTP (wireshark {_shown(workdir / 'checkout.pcap')})\n"
        f"  shop.pcapng     both pods, merged by time\n"
        f"  podcap.db       the controller's SQLite; store/ holds the pcaps as stored, logs/ every log\n"
        f"Keep the cluster up for your own commands: make demo DEMO_ARGS=--keep-running"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
