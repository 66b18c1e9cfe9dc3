"""A fake Kubernetes API server, so the real `kubernetes` client runs in tests and not a mock of it.

It speaks the REST paths, JSON and error `Status` objects of the core/v1 pod API closely enough that the
official client deserialises every answer with its own models and raises its own exceptions: what the tests
check is then what `KubernetesInventory` does against a real API server. It serves, on 127.0.0.1 and a free
port, from a daemon thread:

    GET /api/v1/namespaces/{ns}/pods/{name}      a Pod, or a 404 Status
    GET /api/v1/namespaces/{ns}/pods             a PodList; labelSelector and fieldSelector honoured
    GET /api/v1/pods                             the same across namespaces
    GET /api/v1/namespaces/{ns}/services/{name}  a Service, or a 404 Status
    GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices
                                                 an EndpointSliceList; labelSelector honoured
    GET /version, GET /api

Requests must carry the bearer token written by `write_kubeconfig` (else 401). Errors are injected with
`fail_next` / `set_error`, `stop()` makes the server unreachable, and `requests` records what the client sent.
Label selectors are matched with the controller's own parser (`podcap.controller._selectors`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import secrets
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
import yaml

from podcap.controller import _selectors

AGENT_LABELS = {"app.kubernetes.io/name": "podcap-agent"}
_CREATED = "2024-05-01T10:00:00Z"
_FIELDS = {
    "spec.nodeName": lambda pod: pod["spec"].get("nodeName", ""),
    "status.phase": lambda pod: pod["status"].get("phase", ""),
    "metadata.name": lambda pod: pod["metadata"]["name"],
    "metadata.namespace": lambda pod: pod["metadata"]["namespace"],
}
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    410: "Gone",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, str]


@dataclass
class _Error:
    path_prefix: str
    code: int
    reason: str | None
    message: str | None
    remaining: int | None  # None: until cleared


_REVIEWS = {
    "/apis/authentication.k8s.io/v1/tokenreviews": "TokenReview",
    "/apis/authorization.k8s.io/v1/subjectaccessreviews": "SubjectAccessReview",
}


@dataclass(frozen=True)
class AccessRule:
    subject: str
    verbs: frozenset[str]
    namespace: str


def status_object(code: int, message: str, reason: str | None = None, **details: str) -> dict[str, Any]:
    """A `Status` object as the API server sends it with an error."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, HTTPStatus(code).phrase.replace(" ", "")),
        "code": code,
    }
    if details:
        status["details"] = details
    return status


class FakeKube:
    """The fake API server and its state; every method is safe to call while the client is talking to it."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.requests: list[Request] = []
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.endpoint_slices: dict[tuple[str, str], dict[str, Any]] = {}
        # TokenReview: bearer token -> (username, groups); SubjectAccessReview: RBAC-like rules per user/group.
        self.users: dict[str, tuple[str, list[str]]] = {}
        self.rules: list[AccessRule] = []
        self.reviews: list[dict[str, Any]] = []
        self._errors: list[_Error] = []
        self._lock = threading.Lock()
        self._versions = itertools.count(1000)
        self._server = _Server(self)
        self.host = "127.0.0.1"
        self.port = int(self._server.server_address[1])
        self.url = f"http://{self.host}:{self.port}"
        # A short poll interval: `stop()` waits up to one interval for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="fake-kube", daemon=True
        )
        self._thread.start()
        self._running = True

    # -- state -----------------------------------------------------------------------------------------------

    def add_pod(
        self,
        namespace: str,
        name: str,
        node: str,
        ips: list[str],
        phase: str = "Running",
        labels: dict[str, str] | None = None,
        host_network: bool = False,
        ready: bool = True,
        container_statuses: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Add (or replace) a pod; returns its JSON object, which the test may change in place."""
        if container_statuses is None:
            state = {"running": {"startedAt": _CREATED}} if phase == "Running" else {"waiting": {}}
            container_statuses = [
                {
                    "name": "app",
                    "image": "registry.example/app:1",
                    "imageID": "registry.example/app@sha256:" + "0" * 64,
                    "containerID": "containerd://" + "1" * 64,
                    "ready": ready,
                    "started": phase == "Running",
                    "restartCount": 0,
                    "state": state,
                }
            ]
        ready_status = "True" if ready else "False"
        pod: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **self._metadata(name, namespace),
                "labels": dict(labels or {}),
            },
            "spec": {
                "nodeName": node,
                "hostNetwork": host_network,
                "containers": [
                    {"name": status["name"], "image": status["image"]} for status in container_statuses
                ],
            },
            "status": {
                "phase": phase,
                "podIP": ips[0] if ips else None,
                "podIPs": [{"ip": ip} for ip in ips],
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": _CREATED},
                    {"type": "Ready", "status": ready_status, "lastTransitionTime": _CREATED},
                    {"type": "ContainersReady", "status": ready_status, "lastTransitionTime": _CREATED},
                ],
                "containerStatuses": container_statuses,
            },
        }
        if not ips:
            del pod["status"]["podIP"]
        if not host_network:
            del pod["spec"]["hostNetwork"]  # the API server omits false booleans
        with self._lock:
            self.pods[(namespace, name)] = pod
        return pod

    def add_agent(
        self,
        node: str,
        ip: str,
        namespace: str = "podcap-system",
        ready: bool = True,
        name: str | None = None,
        phase: str = "Running",
    ) -> dict[str, Any]:
        """A capture agent pod on `node`, labelled as the DaemonSet labels it."""
        return self.add_pod(
            namespace,
            name or f"podcap-agent-{node}",
            node,
            [ip],
            phase=phase,
            labels=dict(AGENT_LABELS),
            ready=ready,
        )

    def _metadata(self, name: str, namespace: str) -> dict[str, Any]:
        """What every object's metadata starts with: its name, a fresh uid and the next resourceVersion."""
        return {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "resourceVersion": str(next(self._versions)),
            "creationTimestamp": _CREATED,
        }

    def add_service(
        self,
        namespace: str,
        name: str,
        ports: Sequence[dict[str, Any]],
        cluster_ip: str = "10.96.0.10",
        selector: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A Service; `ports` as in its spec ({"name", "port", "targetPort", "protocol"}). Its endpoints are
        EndpointSlices of their own (`add_endpoint_slice`), as the EndpointSlice controller would write them."""
        service: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                **self._metadata(name, namespace),
            },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": cluster_ip,
                "clusterIPs": [cluster_ip],
                "selector": dict(selector or {}),
                "ports": [{"protocol": "TCP", **port} for port in ports],
            },
            "status": {"loadBalancer": {}},
        }
        with self._lock:
            self.services[(namespace, name)] = service
        return service

    def add_endpoint_slice(
        self,
        namespace: str,
        service: str,
        endpoints: Sequence[dict[str, Any]],
        ports: Sequence[dict[str, Any]],
        name: str | None = None,
    ) -> dict[str, Any]:
        """An EndpointSlice of `service`; each endpoint {"ip", "pod", "node", "ready"} (pod "" for an endpoint
        that is no pod), each port {"name", "port", "protocol"} as the slice carries them."""
        slice_name = name or f"{service}-{secrets.token_hex(3)}"
        endpoint_slice: dict[str, Any] = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                **self._metadata(slice_name, namespace),
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv6" if any(":" in e["ip"] for e in endpoints) else "IPv4",
            "endpoints": [
                {
                    "addresses": [endpoint["ip"]],
                    "conditions": {
                        "ready": endpoint.get("ready", True),
                        "serving": endpoint.get("ready", True),
                        "terminating": False,
                    },
                    **({"nodeName": endpoint["node"]} if endpoint.get("node") else {}),
                    **(
                        {"targetRef": {"kind": "Pod", "namespace": namespace, "name": endpoint["pod"]}}
                        if endpoint.get("pod")
                        else {}
                    ),
                }
                for endpoint in endpoints
            ],
            "ports": [{"protocol": "TCP", **port} for port in ports],
        }
        with self._lock:
            self.endpoint_slices[(namespace, slice_name)] = endpoint_slice
        return endpoint_slice

    def add_user(self, token: str, username: str, groups: Sequence[str] = ()) -> None:
        """A token TokenReview authenticates as `username` (in `groups`)."""
        with self._lock:
            self.users[token] = (username, list(groups))

    def allow(self, subject: str, verbs: Sequence[str], namespace: str = "*") -> None:
        """RBAC as SubjectAccessReview sees it: `subject` (a user or group) may use `verbs` on pods/capture in
        `namespace` ("*": in every namespace, including the cluster-wide question with no namespace)."""
        with self._lock:
            self.rules.append(AccessRule(subject, frozenset(verbs), namespace))

    def remove_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            del self.pods[(namespace, name)]

    # -- errors and reachability -------------------------------------------------------------------------

    def fail_next(
        self,
        path_prefix: str,
        code: int,
        reason: str | None = None,
        message: str | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` requests whose path starts with `path_prefix` get a `code` Status."""
        with self._lock:
            self._errors.append(_Error(path_prefix, code, reason, message, times))

    def set_error(
        self, path_prefix: str, code: int, reason: str | None = None, message: str | None = None
    ) -> None:
        """Every request whose path starts with `path_prefix` gets a `code` Status until `clear_errors`."""
        with self._lock:
            self._errors.append(_Error(path_prefix, code, reason, message, None))

    def clear_errors(self) -> None:
        with self._lock:
            self._errors.clear()

    def stop(self) -> None:
        """Stop serving and drop every open connection: the API is unreachable from now on. Idempotent."""
        if not self._running:
            return
        self._running = False
        self._server.shutdown()
        self._server.drop_connections()
        self._server.server_close()
        self._thread.join()

    def write_kubeconfig(self, path: Path, token: str | None = None) -> Path:
        """A kubeconfig for this server: one cluster, one bearer-token user, one current context."""
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "podcap-controller", "user": {"token": token or self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "podcap-controller"}}],
            "current-context": "fake",
            "preferences": {},
        }
        path.write_text(yaml.safe_dump(kubeconfig), encoding="utf-8")
        return path

    # -- serving (handler threads) -----------------------------------------------------------------------

    def handle(
        self, method: str, target: str, authorization: str | None, body: bytes = b""
    ) -> tuple[int, dict[str, Any]]:
        url = urlsplit(target)
        path = unquote(url.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        with self._lock:
            self.requests.append(Request(method, path, query))
            if authorization != f"Bearer {self.token}":
                return 401, status_object(401, "Unauthorized")
            injected = self._injected_error(path)
        if injected is not None:
            return injected
        if method == "POST" and path in _REVIEWS:
            return 201, self._review(_REVIEWS[path], json.loads(body or b"{}"))
        if method != "GET":
            return 405, status_object(405, f"the server does not allow this method: {method}")
        try:
            return 200, self._get(path, query)
        except _StatusError as error:
            return error.code, error.status

    def _review(self, kind: str, review: dict[str, Any]) -> dict[str, Any]:
        """A TokenReview or SubjectAccessReview answered from `users` and `rules`, as the API server would."""
        spec = review.get("spec", {})
        with self._lock:
            self.reviews.append({**review, "kind": kind})  # the client does not always send its kind
            if kind == "TokenReview":
                user = self.users.get(spec.get("token", ""))
                status: dict[str, Any] = (
                    {"authenticated": True, "user": {"username": user[0], "groups": user[1]}}
                    if user
                    else {"authenticated": False, "error": "invalid bearer token"}
                )
            else:
                attributes = spec.get("resourceAttributes", {})
                subjects = {spec.get("user", ""), *spec.get("groups", [])}
                allowed = (
                    attributes.get("resource") == "pods"
                    and attributes.get("subresource") == "capture"
                    and any(
                        rule.subject in subjects
                        and attributes.get("verb") in rule.verbs
                        and rule.namespace in ("*", attributes.get("namespace", ""))
                        for rule in self.rules
                    )
                )
                status = {"allowed": allowed} | ({} if allowed else {"reason": "no RBAC rule allows it"})
        return {**review, "status": status}

    def _injected_error(self, path: str) -> tuple[int, dict[str, Any]] | None:
        for error in self._errors:
            if not path.startswith(error.path_prefix):
                continue
            if error.remaining is not None:
                error.remaining -= 1
                if error.remaining <= 0:
                    self._errors.remove(error)
            message = error.message or _default_message(error.code, path)
            return error.code, status_object(error.code, message, error.reason)
        return None

    def _get(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        parts = path.strip("/").split("/")
        if parts == ["version"]:
            return {
                "major": "1",
                "minor": "31",
                "gitVersion": "v1.31.0-fake",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": _CREATED,
                "goVersion": "go1.22.2",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if parts == ["api"]:
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                ],
            }
        if parts == ["api", "v1", "pods"]:
            return self._list(None, query)
        if len(parts) == 5 and parts[:2] == ["api", "v1"] and parts[2] == "namespaces" and parts[4] == "pods":
            return self._list(parts[3], query)
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "services":
            namespace, name = parts[3], parts[5]
            with self._lock:
                service = self.services.get((namespace, name))
                if service is not None:
                    return copy.deepcopy(service)
            raise _StatusError(
                404, status_object(404, f'services "{name}" not found', name=name, kind="services")
            )
        if (
            len(parts) == 6
            and parts[:4] == ["apis", "discovery.k8s.io", "v1", "namespaces"]
            and parts[5] == "endpointslices"
        ):
            return self._list_slices(parts[4], query)
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            namespace, name = parts[3], parts[5]
            with self._lock:
                pod = self.pods.get((namespace, name))
                if pod is not None:
                    return copy.deepcopy(pod)
            raise _StatusError(404, status_object(404, f'pods "{name}" not found', name=name, kind="pods"))
        raise _StatusError(404, status_object(404, "the server could not find the requested resource"))

    def _list(self, namespace: str | None, query: dict[str, str]) -> dict[str, Any]:
        try:
            labels = _selectors.parse(query.get("labelSelector", ""))
        except ValueError as error:
            raise _StatusError(400, status_object(400, f"unable to parse requirement: {error}")) from None
        fields = _field_selector(query.get("fieldSelector", ""))
        with self._lock:
            items = [
                copy.deepcopy(pod)
                for (pod_namespace, _), pod in sorted(self.pods.items())
                if namespace in (None, pod_namespace)
                and labels.matches(pod["metadata"].get("labels", {}))
                and all((_FIELDS[field](pod) == value) == equal for field, value, equal in fields)
            ]
        for item in items:  # list items carry no kind/apiVersion of their own
            item.pop("kind")
            item.pop("apiVersion")
        return {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "2000"},
            "items": items,
        }

    def _list_slices(self, namespace: str, query: dict[str, str]) -> dict[str, Any]:
        try:
            labels = _selectors.parse(query.get("labelSelector", ""))
        except ValueError as error:
            raise _StatusError(400, status_object(400, f"unable to parse requirement: {error}")) from None
        with self._lock:
            items = [
                copy.deepcopy(endpoint_slice)
                for (slice_namespace, _), endpoint_slice in sorted(self.endpoint_slices.items())
                if slice_namespace == namespace and labels.matches(endpoint_slice["metadata"]["labels"])
            ]
        for item in items:
            item.pop("kind")
            item.pop("apiVersion")
        return {
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": "2000"},
            "items": items,
        }


class _StatusError(Exception):
    def __init__(self, code: int, status: dict[str, Any]) -> None:
        super().__init__(status["message"])
        self.code = code
        self.status = status


def _field_selector(selector: str) -> list[tuple[str, str, bool]]:
    """`spec.nodeName=n,status.phase!=Failed` as (field, value, equal) triples; 400 for what it can't do."""
    terms: list[tuple[str, str, bool]] = []
    for term in filter(None, (part.strip() for part in selector.split(","))):
        for operator in ("!=", "==", "="):
            field, found, value = term.partition(operator)
            if found:
                break
        else:
            raise _StatusError(
                400, status_object(400, f"invalid selector: '{selector}'; can't understand '{term}'")
            )
        if field.strip() not in _FIELDS:
            raise _StatusError(
                400, status_object(400, f"field label not supported: {field.strip()}", reason="BadRequest")
            )
        terms.append((field.strip(), value.strip(), operator != "!="))
    return terms


def _default_message(code: int, path: str) -> str:
    """What the API server says, with the user and resource filled in from the path."""
    parts = path.strip("/").split("/")
    # /api/v1/... is the core group; /apis/GROUP/VERSION/... any other.
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1] if len(parts) > 1 else "", parts[3:])
    namespace = rest[1] if len(rest) > 2 and rest[0] == "namespaces" else ""
    rest = rest[2:] if namespace else rest
    resource = rest[0] if rest else "pods"
    verb, name = ("get", rest[1]) if len(rest) == 2 else ("list", "")
    if code == 403:
        scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        subject = f'{resource} "{name}"' if name else resource
        return (
            f'{subject} is forbidden: User "system:serviceaccount:podcap-system:podcap-controller" '
            f'cannot {verb} resource "{resource}" in API group "{group}"{scope}'
        )
    if code == 410:
        return "too old resource version: 1000 (2000)"
    if code == 429:
        return "Too many requests, please try again later."
    return "Internal error occurred: injected by the fake API server"


class _Server(ThreadingHTTPServer):
    """Tracks connections and their threads, so `stop()` can cut kept-alive connections and join the threads.

    The threads are daemons all the same: a test that dies before `stop()` must not hang the interpreter's exit.
    """

    def __init__(self, fake: FakeKube) -> None:
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._handlers: list[threading.Thread] = []
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="fake-kube-conn",
            daemon=True,
        )
        with self._connections_lock:
            self._connections.add(request)
            self._handlers = [handler for handler in self._handlers if handler.is_alive()]
            self._handlers.append(thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut every open connection and wait for the threads serving them."""
        with self._connections_lock:
            connections, handlers = list(self._connections), list(self._handlers)
        for connection in connections:
            with contextlib.suppress(OSError):  # the client closed it already
                connection.shutdown(socket.SHUT_RDWR)
        for handler in handlers:
            handler.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: _Server

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_DELETE(self) -> None:
        self._answer()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request_body = self.rfile.read(length) if length else b""
        code, body = self.server.fake.handle(
            self.command, self.path, self.headers.get("Authorization"), request_body
        )
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the tests read `requests` instead


@pytest.fixture
def fake_kube() -> Iterator[FakeKube]:
    fake = FakeKube()
    try:
        yield fake
    finally:
        fake.stop()
