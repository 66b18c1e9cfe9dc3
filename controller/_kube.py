"""The cluster through the official client: the inventory (pods, node agents, Services and their EndpointSlices)
and, optionally, access control delegated to Kubernetes (TokenReview for who a caller is, SubjectAccessReview for
what RBAC lets them do).

This is the only module that imports `kubernetes`. Everything the client can raise is turned here into the
controller's errors (PodNotFound, Forbidden, Unavailable, ...) with a message a support engineer can act on
and the client's exception chained, so no caller ever sees an `ApiException` or a urllib3 error.

Two client behaviours are corrected on the way:
- urllib3 would retry a refused or timed-out request three times; the controller answers a person waiting on
  a capture, so a request is tried once and an unreachable or hung API fails within `request_timeout`.
  (urllib3 still replaces a pooled connection the server has closed before reusing it.)
- `_request_timeout` given as a float is silently ignored by kubernetes' REST client (it only accepts an int
  or a (connect, read) tuple), so it is always passed as a tuple.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from podcap.controller._access import Action, Principal
from podcap.controller._errors import (
    Forbidden,
    InvalidRequest,
    NoAgentOnNode,
    NotFound,
    PodNotFound,
    Unauthenticated,
    Unavailable,
)
from podcap.controller._inventory import (
    AGENT_LABEL,
    ContainerStatus,
    Pod,
    Service,
    ServiceEndpoint,
    ServicePort,
)

_RETRIES = urllib3.Retry(total=0)
_RUNNING = "status.phase=Running"
# The label the EndpointSlice controller puts on every slice of a Service.
_SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class KubernetesInventory:
    """Blocking lookups through one `ApiClient`; safe to call from several worker threads."""

    def __init__(
        self,
        api_client: client.ApiClient,
        agent_namespace: str,
        agent_port: int,
        request_timeout: float = 5.0,
    ) -> None:
        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)
        self._discovery = client.DiscoveryV1Api(api_client)
        self._agent_namespace = agent_namespace
        self._agent_port = agent_port
        self._timeout = (request_timeout, request_timeout)
        self._host = str(api_client.configuration.host)

    @classmethod
    def from_kubeconfig(
        cls,
        path: str | Path,
        *,
        agent_namespace: str,
        agent_port: int,
        context: str | None = None,
        request_timeout: float = 5.0,
    ) -> KubernetesInventory:
        """From a kubeconfig file (its current context unless `context`); the global default is left alone.

        ValueError naming the file when it cannot be used.
        """
        return cls(_client_from_kubeconfig(path, context), agent_namespace, agent_port, request_timeout)

    @classmethod
    def in_cluster(
        cls, *, agent_namespace: str, agent_port: int, request_timeout: float = 5.0
    ) -> KubernetesInventory:
        """From the pod's service account; ValueError when not running in a cluster."""
        return cls(_client_in_cluster(), agent_namespace, agent_port, request_timeout)

    def close(self) -> None:
        """Close the client's connections (idle keep-alive sockets included)."""
        self._api_client.close()
        self._api_client.rest_client.pool_manager.clear()

    def get_pod(self, namespace: str, name: str) -> Pod:
        with self._translate_errors("get", namespace, name):
            pod = self._core.read_namespaced_pod(name, namespace, _request_timeout=self._timeout)
        return _to_pod(pod)

    def list_pods(self, namespace: str, label_selector: str) -> list[Pod]:
        with self._translate_errors("list", namespace):
            pods = self._core.list_namespaced_pod(
                namespace, label_selector=label_selector, _request_timeout=self._timeout
            )
        return [_to_pod(pod) for pod in pods.items]

    def running_pods(self, namespace: str) -> list[Pod]:
        # One request either way: /api/v1/namespaces/NS/pods, or /api/v1/pods across namespaces.
        with self._translate_errors("list", namespace):
            if namespace:
                pods = self._core.list_namespaced_pod(
                    namespace, field_selector=_RUNNING, _request_timeout=self._timeout
                )
            else:
                pods = self._core.list_pod_for_all_namespaces(
                    field_selector=_RUNNING, _request_timeout=self._timeout
                )
        found = [_to_pod(pod) for pod in pods.items]
        return sorted(found, key=lambda pod: (pod.namespace, pod.name))

    def agent_address(self, node: str) -> str:
        with self._translate_errors("list", self._agent_namespace):
            pods = self._core.list_namespaced_pod(
                self._agent_namespace,
                label_selector=AGENT_LABEL,
                field_selector=f"spec.nodeName={node}",
                _request_timeout=self._timeout,
            ).items
        if not pods:
            raise NoAgentOnNode(
                f"no podcap agent on node {node} (looked for pods labelled {AGENT_LABEL} "
                f"in namespace {self._agent_namespace})"
            )
        serving = sorted((pod for pod in pods if _serving(pod)), key=lambda pod: str(pod.metadata.name))
        if not serving:
            found = "; ".join(_describe(pod) for pod in pods)
            raise NoAgentOnNode(
                f"the podcap agent on node {node} is not Ready ({found}); "
                f"see kubectl -n {self._agent_namespace} describe pod {pods[0].metadata.name}"
            )
        ip = str(serving[0].status.pod_ip)
        host = f"[{ip}]" if ":" in ip else ip
        return f"{host}:{self._agent_port}"

    def get_service(self, namespace: str, name: str) -> Service:
        # Endpoints come from the EndpointSlices (discovery.k8s.io/v1), which replaced core/v1 Endpoints: a
        # Service may have several slices (one per address family, or past 100 endpoints).
        with self._translate_errors("get", namespace, name, resource="services"):
            service = self._core.read_namespaced_service(name, namespace, _request_timeout=self._timeout)
        with self._translate_errors("list", namespace, resource="endpointslices"):
            slices = self._discovery.list_namespaced_endpoint_slice(
                namespace, label_selector=f"{_SERVICE_NAME_LABEL}={name}", _request_timeout=self._timeout
            ).items
        return _to_service(service, slices)

    @contextmanager
    def _translate_errors(
        self, verb: str, namespace: str, name: str | None = None, resource: str = "pods"
    ) -> Iterator[None]:
        where = f"in namespace {namespace}" if namespace else "in all namespaces"
        what = f"{verb} {resource} {where}"
        try:
            yield
        except ApiException as error:
            raise self._api_error(error, what, namespace, name, resource) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            reason = error.reason if isinstance(error, urllib3.exceptions.MaxRetryError) else error
            raise Unavailable(f"Kubernetes API unreachable at {self._host}: {reason}") from error

    def _api_error(
        self, error: ApiException, what: str, namespace: str, name: str | None, resource: str = "pods"
    ) -> Exception:
        status = int(error.status or 0)
        message = _status_message(error)
        if status == 0:  # the client's own failure before any answer, e.g. TLS
            return Unavailable(f"Kubernetes API unreachable at {self._host}: {message}")
        if status == 404 and name is not None and resource == "services":
            return NotFound(f"service {namespace}/{name} not found")
        if status == 404 and name is not None:
            return PodNotFound(f"pod {namespace}/{name} not found")
        if status == 401:
            return Forbidden(
                f"the Kubernetes API at {self._host} rejected the controller's credentials "
                f"(401 Unauthorized; check its service account token or kubeconfig): {message}"
            )
        if status == 403:
            return Forbidden(f"the controller may not {what} (RBAC): {message}")
        if status in (400, 422):
            return InvalidRequest(f"the Kubernetes API refused to {what}: {message}")
        return Unavailable(
            f"Kubernetes API at {self._host} answered {status} {error.reason} to {what}: {message}"
        )


def _client_from_kubeconfig(path: str | Path, context: str | None = None) -> client.ApiClient:
    """A client from a kubeconfig file (ValueError naming the file); the global default is left alone."""
    configuration = client.Configuration()
    configuration.retries = _RETRIES
    try:
        return config.new_client_from_config(
            config_file=str(path),
            context=context,
            persist_config=False,
            client_configuration=configuration,
        )
    except (ConfigException, OSError, ValueError) as error:
        raise ValueError(f"kubeconfig {path}: {error}") from error


def _client_in_cluster() -> client.ApiClient:
    """A client from the pod's service account; ValueError when not running in a cluster."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except ConfigException as error:
        raise ValueError(f"in-cluster Kubernetes configuration unavailable: {error}") from error
    configuration.retries = _RETRIES
    return client.ApiClient(configuration)


# The RBAC verbs on the virtual subresource pods/capture that allow each action: a Role grants them as
#   rules: [{apiGroups: [""], resources: ["pods/capture"], verbs: ["create", "get", "download", ...]}]
RBAC_VERBS = {
    Action.CAPTURE: "create",
    Action.READ: "get",
    Action.DOWNLOAD: "download",
    Action.STOP: "stop",
    Action.DELETE: "delete",
}


class KubernetesAccess:
    """Authenticator and Authorizer that ask the API server: a caller presents a Kubernetes bearer token (a
    service account's, or an OIDC id token the cluster accepts); TokenReview names the user and groups, and a
    SubjectAccessReview per decision asks RBAC about the verb on `pods/capture` in the namespace.

    Answers are cached briefly (`cache_ttl`), so a burst of calls costs one review; a revoked token or role
    stops working within that time. The controller's service account needs `create` on tokenreviews and
    subjectaccessreviews (deploy/ grants it).
    """

    def __init__(
        self, api_client: client.ApiClient, request_timeout: float = 5.0, cache_ttl: float = 10.0
    ) -> None:
        self._api_client = api_client
        self._authn = client.AuthenticationV1Api(api_client)
        self._authz = client.AuthorizationV1Api(api_client)
        self._timeout = (request_timeout, request_timeout)
        self._host = str(api_client.configuration.host)
        self._ttl = cache_ttl
        self._tokens: dict[bytes, tuple[float, Principal]] = {}
        self._decisions: dict[tuple[Principal, str, str], tuple[float, bool]] = {}

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> KubernetesAccess:
        return cls(_client_from_kubeconfig(path))

    @classmethod
    def in_cluster(cls) -> KubernetesAccess:
        return cls(_client_in_cluster())

    async def authenticate(self, token: str) -> Principal:
        if not token:
            raise Unauthenticated("no credentials: send 'authorization: Bearer TOKEN' (a Kubernetes token)")
        key = hashlib.sha256(token.encode()).digest()  # never keep the token itself
        cached = self._tokens.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        answer = await asyncio.to_thread(
            self._call, "create tokenreviews", self._authn.create_token_review, review
        )
        status = answer.status
        if status is None or not status.authenticated or status.user is None:
            reason = (status and status.error) or "not authenticated"
            raise Unauthenticated(f"the Kubernetes API did not accept the token: {reason}")
        principal = Principal(str(status.user.username), tuple(status.user.groups or ()))
        self._remember(self._tokens, key, principal)
        return principal

    async def allowed(self, principal: Principal, action: Action, namespace: str) -> bool:
        verb = RBAC_VERBS[action]
        key = (principal, verb, namespace)
        cached = self._decisions.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=principal.name,
                groups=list(principal.groups),
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace or None, verb=verb, resource="pods", subresource="capture"
                ),
            )
        )
        answer = await asyncio.to_thread(
            self._call, "create subjectaccessreviews", self._authz.create_subject_access_review, review
        )
        allowed = bool(answer.status and answer.status.allowed)
        self._remember(self._decisions, key, allowed)
        return allowed

    async def namespaces(self, principal: Principal, action: Action) -> frozenset[str] | None:
        """Every namespace when RBAC allows the verb cluster-wide; otherwise none without naming one (RBAC
        cannot list where a user may do something, so such a user lists one namespace at a time)."""
        return None if await self.allowed(principal, action, "") else frozenset()

    def _remember(self, cache: dict[Any, tuple[float, Any]], key: Any, value: Any) -> None:
        if len(cache) > 10_000:  # bounded: forget everything rather than grow without end
            cache.clear()
        cache[key] = (time.monotonic() + self._ttl, value)

    def _call(self, what: str, method: Any, body: Any) -> Any:
        try:
            return method(body, _request_timeout=self._timeout)
        except ApiException as error:
            if error.status == 403:
                raise Forbidden(f"the controller may not {what} (RBAC): {_status_message(error)}") from error
            raise Unavailable(
                f"Kubernetes API at {self._host} answered {error.status} to {what}: {_status_message(error)}"
            ) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"Kubernetes API unreachable at {self._host}: {error}") from error


def _status_message(error: ApiException) -> str:
    """The `message` of the Status object the API server sends with an error, else what there is."""
    try:
        body = json.loads(error.body or "")
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(error.body or error.reason or "no details")


def _to_pod(pod: Any) -> Pod:
    metadata, spec, status = pod.metadata, pod.spec, pod.status
    # The generated model names this field pod_i_ps in some client releases and pod_ips in others.
    entries = (getattr(status, "pod_ips", None) or getattr(status, "pod_i_ps", None)) if status else None
    ips = tuple(str(entry.ip) for entry in entries or () if entry.ip)
    if not ips and status and status.pod_ip:
        ips = (str(status.pod_ip),)
    return Pod(
        namespace=str(metadata.namespace),
        name=str(metadata.name),
        node=str((spec and spec.node_name) or ""),
        ips=ips,
        phase=str((status and status.phase) or "Unknown"),
        host_network=bool(spec and spec.host_network),
        uid=str(metadata.uid or ""),
        labels={str(key): str(value) for key, value in (metadata.labels or {}).items()},
        containers=tuple(_to_container(entry) for entry in (status and status.container_statuses) or ()),
    )


def _to_service(service: Any, slices: list[Any]) -> Service:
    ports = []
    for port in service.spec.ports or ():
        ports.append(
            ServicePort(
                name=str(port.name or ""),
                port=int(port.port),
                target_port=_target_port(port, slices),
                protocol=str(port.protocol or "TCP"),
            )
        )
    endpoints: dict[str, ServiceEndpoint] = {}
    for endpoint_slice in slices:
        for endpoint in endpoint_slice.endpoints or ():
            # `ready` unset means ready (the API's own rule); a terminating or failing pod is not.
            if endpoint.conditions is not None and endpoint.conditions.ready is False:
                continue
            ref = endpoint.target_ref
            pod = str(ref.name) if ref is not None and ref.kind == "Pod" and ref.name else ""
            for ip in endpoint.addresses or ():
                endpoints.setdefault(str(ip), ServiceEndpoint(str(ip), pod, str(endpoint.node_name or "")))
    return Service(
        namespace=str(service.metadata.namespace),
        name=str(service.metadata.name),
        cluster_ip=str(service.spec.cluster_ip or ""),
        ports=tuple(ports),
        endpoints=tuple(sorted(endpoints.values(), key=lambda endpoint: (endpoint.pod, endpoint.ip))),
    )


def _target_port(port: Any, slices: list[Any]) -> int:
    """The endpoints' port number: a numeric targetPort as it is; a named one (or none) as the EndpointSlices
    resolved it, as their ports carry the Service port's name and the pods' number; 0 for a named one that no
    slice resolves (no endpoint has that port), and the Service port itself when targetPort is unset."""
    target = port.target_port
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for endpoint_slice in slices:
        for slice_port in endpoint_slice.ports or ():
            if (slice_port.name or "") == (port.name or "") and slice_port.port is not None:
                return int(slice_port.port)
    return int(port.port) if target is None else 0


def _to_container(entry: Any) -> ContainerStatus:
    return ContainerStatus(
        name=str(entry.name),
        ready=bool(entry.ready),
        restart_count=int(entry.restart_count or 0),
        state=_state(entry.state),
    )


def _state(state: Any) -> str:
    if state is None:
        return ""
    if state.running is not None:
        return "running"
    if state.waiting is not None:
        return f"waiting: {state.waiting.reason}" if state.waiting.reason else "waiting"
    if state.terminated is not None:
        terminated = state.terminated
        return f"terminated: {terminated.reason or f'exit code {terminated.exit_code}'}"
    return ""


def _ready(pod: Any) -> bool:
    conditions = (pod.status and pod.status.conditions) or ()
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _serving(pod: Any) -> bool:
    """Running, Ready, with an IP and not being deleted: an agent that can take a capture now."""
    return bool(
        pod.metadata.deletion_timestamp is None
        and pod.status
        and pod.status.phase == "Running"
        and pod.status.pod_ip
        and _ready(pod)
    )


def _describe(pod: Any) -> str:
    phase = (pod.status and pod.status.phase) or "Unknown"
    terminating = ", terminating" if pod.metadata.deletion_timestamp is not None else ""
    ip = "" if pod.status and pod.status.pod_ip else ", no pod IP"
    return f"pod {pod.metadata.name}: phase {phase}, Ready={_ready(pod)}{terminating}{ip}"
