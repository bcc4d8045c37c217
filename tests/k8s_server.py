"""An HTTP server on 127.0.0.1 that speaks the part of the Kubernetes API kubetune uses: create,
get, list (label/field selectors, watch streams), patch, delete for namespaced and cluster-scoped
objects, pod logs, the pod proxy subresource (to where a test serves the pod), Status bodies for 404/409/403/422 — so the real `kubernetes` client is tested
against real HTTP.

Server-side apply (PATCH application/apply-patch+yaml, ?fieldManager=, ?force=) follows the API
server's field ownership: each manager owns the fields it applied; a field it applied before and
leaves out now is removed (unless another manager owns it too); a field another manager owns with a
different value is a 409 Conflict naming the field (force=true takes it over). Lists are owned whole
(atomic), as the API server treats them for a single manager. A Job's pod template is immutable
(422, field spec.template). A merge patch naming metadata.resourceVersion is refused with 409 when
the object has moved on; every write bumps resourceVersion. /version, SelfSubjectAccessReview (allowed unless `denied`), nodes and
CRDs are served for `kubetune doctor`."""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))(?:/namespaces/(?P<ns>[^/]+))?"
                   r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")
APPLY = "application/apply-patch+yaml"
_PROXY = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/:]+):(?P<port>\d+)/proxy(?P<rest>/.*)?$")
_HOP = {"host", "authorization", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
_SERVER_SET = {("metadata", "uid"), ("metadata", "resourceVersion"), ("metadata", "creationTimestamp"),
               ("metadata", "namespace"), ("metadata", "managedFields"), ("status",)}


class FakeKubernetes:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.namespaces = {"default", "ml", "team-a"}
        self.forbidden: set[tuple[str, str]] = set()   # (HTTP method, plural)
        self.denied: set[tuple[str, str]] = set()      # (verb, resource[.group]) SelfSubjectAccessReview says no to
        self.managers: dict[tuple[str, str, str], dict[str, set[tuple[str, ...]]]] = {}  # key → manager → fields
        self.logs: dict[str, str] = {}
        self.pod_ports: dict[tuple[str, str, int], int] = {}  # (ns, pod, containerPort) → where a test serves it
        self.requests: list[tuple[str, str]] = []      # (method, path?query)
        self._lock = threading.Lock()
        self._uid = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                fake.requests.append((method, self.path))
                if url.path == "/version":
                    return self._send(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
                proxied = _PROXY.match(url.path)
                if proxied:
                    return self._proxy(method, proxied.groupdict(), url.query)
                m = _PATH.match(url.path)
                if not m:
                    return self._send(404, status(404, "NotFound", f"no route {url.path}"))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                code, payload, ctype = fake.dispatch(method, m.groupdict(), query, body,
                                                     self.headers.get("Content-Type", ""))
                if code == 200 and query.get("watch") == "true":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    for item in payload["items"]:
                        self.wfile.write((json.dumps({"type": "ADDED", "object": item}) + "\n").encode())
                    return
                self._send(code, payload, ctype)

            def _proxy(self, method: str, r: dict[str, str], query: str) -> None:
                """The pod proxy subresource: the request forwarded to the pod's IP and port, as the API
                server does (streamed both ways; its own Authorization header is not passed on). A pod not
                running, or nothing listening on the port, is a 503 Status."""
                import http.client

                if (method, "pods/proxy") in fake.forbidden:
                    return self._send(403, status(403, "Forbidden", f'pods "{r["name"]}" is forbidden: User "test" '
                                                                    'cannot get resource "pods/proxy"'))
                pod = fake.objects.get(("pods", r["ns"], r["name"]))
                if pod is None:
                    return self._send(404, status(404, "NotFound", f'pods "{r["name"]}" not found'))
                st = pod.get("status") or {}
                target = fake.pod_ports.get((r["ns"], r["name"], int(r["port"])))
                if st.get("phase") != "Running" or not st.get("podIP") or target is None:
                    return self._send(503, status(503, "ServiceUnavailable", "error trying to reach service: "
                                                                             "pod is not running or not listening"))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                length = int(self.headers.get("Content-Length") or 0)
                upstream = http.client.HTTPConnection(st["podIP"], target, timeout=60)
                try:
                    upstream.putrequest(method, (r["rest"] or "/") + (f"?{query}" if query else ""),
                                        skip_accept_encoding=True)
                    for k, v in headers.items():
                        upstream.putheader(k, v)
                    upstream.endheaders()
                    left = length
                    while left:
                        chunk = self.rfile.read(min(1 << 20, left))
                        if not chunk:
                            break
                        upstream.send(chunk)
                        left -= len(chunk)
                    answer = upstream.getresponse()
                except OSError:
                    return self._send(503, status(503, "ServiceUnavailable", "error trying to reach service: "
                                                                             "connection refused"))
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.end_headers()
                while chunk := answer.read(1 << 20):
                    self.wfile.write(chunk)
                upstream.close()

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_PUT(self) -> None:  # noqa: N802
                self._handle("PUT")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}]}))
        return path

    def put(self, plural: str, ns: str, obj: dict[str, Any], manager: str = "kubectl") -> None:
        key = (plural, ns, obj["metadata"]["name"])
        self.objects[key] = self._stamp(copy.deepcopy(obj), ns)
        self.managers[key] = {manager: set(_leaves(obj))}

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((plural, ns, name))

    def _stamp(self, obj: dict[str, Any], ns: str) -> dict[str, Any]:
        self._uid += 1
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", ns)
        meta.setdefault("uid", f"uid-{self._uid}")
        meta["resourceVersion"] = str(self._uid)
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        return obj

    def dispatch(self, method: str, r: dict[str, str], query: dict[str, str], body: Any,
                 content_type: str = "") -> tuple[int, Any, str]:
        plural, name, sub = r["plural"], r["name"], r["sub"]
        ns = r["ns"] or ""  # "": a cluster-scoped object (namespaces, nodes, CRDs, access reviews)
        if plural == "selfsubjectaccessreviews" and method == "POST":
            attrs = body["spec"]["resourceAttributes"]
            resource = attrs["resource"] + ("/" + attrs["subresource"] if attrs.get("subresource") else "") + \
                ("." + attrs["group"] if attrs.get("group") else "")
            allowed = (attrs["verb"], resource) not in self.denied
            return 201, {**body, "status": {"allowed": allowed}}, "application/json"
        if (method, plural) in self.forbidden:
            group = r["group"] or ""
            verb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch", "DELETE": "delete"}[method]
            return 403, status(403, "Forbidden", f'{plural}{"." + group if group else ""} is forbidden: User "test" '
                                                 f'cannot {verb} resource "{plural}" in API group "{group}" in the '
                                                 f'namespace "{ns}"'), "application/json"
        if plural == "namespaces" and name and method == "GET":
            if name in self.namespaces:
                return 200, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}, "application/json"
            return 404, status(404, "NotFound", f'namespaces "{name}" not found', {"name": name, "kind": "namespaces"}), \
                "application/json"
        if ns and ns not in self.namespaces:
            return 404, status(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"}), \
                "application/json"
        with self._lock:
            key = (plural, ns, name or "")
            if sub == "log":
                if (("pods", ns, name)) not in self.objects:
                    return 404, status(404, "NotFound", f'pods "{name}" not found'), "application/json"
                return 200, self.logs.get(name, ""), "text/plain"
            if method == "PATCH" and content_type.startswith(APPLY):
                return self._apply(key, body, query.get("fieldManager", ""), query.get("force") == "true")
            if method == "POST":
                key = (plural, ns, body["metadata"]["name"])
                if key in self.objects:
                    return 409, status(409, "AlreadyExists", f'{plural} "{key[2]}" already exists'), "application/json"
                if plural == "secrets" and "stringData" in body:  # the API server stores it as data, base64
                    import base64

                    strings = body.pop("stringData")
                    body["data"] = {**(body.get("data") or {}),
                                    **{k: base64.b64encode(v.encode()).decode() for k, v in strings.items()}}
                self.objects[key] = self._stamp(body, ns)
                return 201, self.objects[key], "application/json"
            if method == "GET" and not name:
                items = [o for (p, n, _), o in sorted(self.objects.items()) if p == plural and n == ns
                         and _matches(o, query.get("labelSelector"), query.get("fieldSelector"))]
                return 200, {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}, \
                    "application/json"
            if key not in self.objects:
                return 404, status(404, "NotFound", f'{plural} "{name}" not found', {"name": name, "kind": plural}), \
                    "application/json"
            if method == "GET":
                return 200, self.objects[key], "application/json"
            if method == "PATCH":
                # A patch that names a resourceVersion is a precondition (optimistic concurrency)
                wanted = (body.get("metadata") or {}).get("resourceVersion")
                if wanted is not None and wanted != self.objects[key]["metadata"]["resourceVersion"]:
                    return 409, status(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": the '
                                                        "object has been modified; please apply your changes to the "
                                                        "latest version and try again"), "application/json"
                _merge(self.objects[key], body)
                return 200, self._stamp(self.objects[key], ns), "application/json"
            if method == "DELETE":
                gone = self.objects.pop(key)
                self.managers.pop(key, None)
                if plural == "jobs":  # the Job's pods go with it (propagation)
                    for k in [k for k, o in self.objects.items() if k[0] == "pods" and k[1] == ns and
                              (o["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name") == name]:
                        del self.objects[k]
                return 200, gone, "application/json"
        return 405, status(405, "MethodNotAllowed", method), "application/json"


    def _apply(self, key: tuple[str, str, str], body: dict[str, Any], manager: str, force: bool) -> tuple[int, Any, str]:
        if not manager:
            return 400, status(400, "BadRequest", "PATCH is not supported (apply needs fieldManager)"), "application/json"
        plural, ns, name = key
        applied = {path: value for path, value in _leaves(body).items() if path[:2] not in _SERVER_SET
                   and path[:1] not in _SERVER_SET}
        if key not in self.objects:
            self.objects[key] = self._stamp(copy.deepcopy(body), ns) if ns else self._stamp_cluster(copy.deepcopy(body))
            self.managers[key] = {manager: set(applied)}
            return 201, self.objects[key], "application/json"
        current = self.objects[key]
        owners = self.managers.setdefault(key, {})
        if plural == "jobs" and _get(current, ("spec", "template")) != body.get("spec", {}).get("template"):
            return 422, status(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template: Invalid value: '
                                               'field is immutable', {"name": name, "kind": "Job", "causes": [
                {"reason": "FieldValueInvalid", "message": "field is immutable", "field": "spec.template"}]}), \
                "application/json"
        conflicts = sorted({(other, path) for path, value in applied.items() for other, fields in owners.items()
                            if other != manager and path in fields and _get(current, path) != value})
        if conflicts and not force:
            causes = [{"type": "FieldManagerConflict", "message": f'conflict with "{other}"',
                       "field": "." + ".".join(map(str, path))} for other, path in conflicts]
            return 409, status(409, "Conflict", f"Apply failed with {len(causes)} conflict(s): " + "; ".join(
                f'{c["message"]}: {c["field"]}' for c in causes), {"name": name, "causes": causes}), "application/json"
        for other, path in conflicts:  # force: the fields change hands
            owners[other].discard(path)
        for path in owners.get(manager, set()) - set(applied):
            if not any(path in fields for other, fields in owners.items() if other != manager):
                _delete(current, path)  # applied before, left out now: removed
        for path, value in applied.items():
            _set(current, path, copy.deepcopy(value))
        owners[manager] = set(applied)
        self._uid += 1
        current["metadata"]["resourceVersion"] = str(self._uid)
        return 200, current, "application/json"

    def _stamp_cluster(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._uid += 1
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{self._uid}")
        meta["resourceVersion"] = str(self._uid)
        if obj.get("kind") == "Namespace":
            self.namespaces.add(meta["name"])
        return obj


def _leaves(obj: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Field paths → values; maps are walked, lists and scalars are leaves (owned whole)."""
    if isinstance(obj, dict) and obj:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, (*prefix, k)))
        return out
    return {prefix: obj} if prefix else {}


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        obj = obj.setdefault(part, {})
    obj[path[-1]] = value


def _delete(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    parents = []
    for part in path[:-1]:
        if not isinstance(obj.get(part), dict):
            return
        parents.append((obj, part))
        obj = obj[part]
    obj.pop(path[-1], None)
    for parent, part in reversed(parents):  # maps left empty go too
        if parent[part] == {}:
            del parent[part]


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code, **({"details": details} if details else {})}


def _matches(obj: dict[str, Any], labels: str | None, fields: str | None) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (labels or "").split(",")):
        k, _, v = term.partition("=")
        if have.get(k) != v:
            return False
    for term in filter(None, (fields or "").split(",")):
        k, _, v = term.partition("=")
        cur: Any = obj
        for part in k.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur != v:
            return False
    return True


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v
