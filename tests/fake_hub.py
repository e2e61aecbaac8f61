"""A small in-process stand-in for the Hugging Face Hub API, enough for huggingface_hub's
create_repo / create_commit with "regular" (base64-in-commit) uploads.

Routes (what huggingface_hub 1.x calls for HfApi.whoami, create_repo and create_commit):
  GET  /api/whoami-v2
  POST /api/repos/create                              JSON {name, organization, visibility|private, type}
  POST /api/validate-yaml                             README.md front matter check before a commit
  POST /api/models/{ns}/{name}/preupload/{rev}        answers uploadMode "regular" for every file
  POST /api/models/{ns}/{name}/commit/{rev}           NDJSON: header line, then {"key": "file", value: {path,
                                                      content (base64), encoding}} per file
  GET  /api/models/{ns}/{name}[/revision/{rev}]       repo_info (create_repo(exist_ok) calls it after 401/403)
Anything else is recorded in `unknown` and answered 404, so a test can see new client routes.

mode "ok" checks the bearer token; "unauthorized" answers every request 401 (as the Hub does for a bad
token), "forbidden" answers create/commit 403.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "repo_info"),
]


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    route: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)


class FakeHub:
    def __init__(self, token: str = "hf_fake_token", user: str = "tester", mode: str = "ok") -> None:
        self.token = token
        self.user = user
        self.mode = mode
        self.requests: list[Request] = []
        self.unknown: list[tuple[str, str]] = []
        self.repos: dict[str, Repo] = {}
        self.create_payloads: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # lifecycle
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # request handling
    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload, extra = hub.dispatch(self.command, self.path, dict(self.headers.items()), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        return Handler

    def dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes):
        parts = urlsplit(raw_path)
        route, match = None, None
        for m, pattern, name in ROUTES:
            found = pattern.fullmatch(parts.path)
            if m == method and found:
                route, match = name, found
                break
        with self._lock:
            self.requests.append(Request(method, parts.path, parts.query, headers, body, route))
            if route is None:
                self.unknown.append((method, parts.path))
        if route is None:
            return 404, {"error": f"fake hub: no route {method} {parts.path}"}, {}
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        if self.mode == "unauthorized" or auth != f"Bearer {self.token}":
            message = "Invalid credentials in Authorization header"
            return 401, {"error": message}, {"X-Error-Message": message}
        if self.mode == "forbidden" and route in ("create_repo", "commit", "preupload"):
            message = "You don't have the rights to create a model under the namespace"
            return 403, {"error": message}, {"X-Error-Message": message}
        return getattr(self, f"_{route}")(match, body)

    def _whoami(self, match, body):
        return 200, {"type": "user", "name": self.user, "fullname": "Test User", "orgs": [],
                     "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}, {}

    def _create_repo(self, match, body):
        payload = json.loads(body)
        self.create_payloads.append(payload)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}, {}
            self.repos[repo_id] = Repo(repo_id, private)
        return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}, {}

    def _validate_yaml(self, match, body):
        return 200, {"errors": [], "warnings": []}, {}

    def _repo_info(self, match, body):
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        return 200, {"id": repo.repo_id, "private": repo.private, "sha": "0" * 40, "siblings": [
            {"rfilename": name} for name in repo.files]}, {}

    def _preupload(self, match, body):
        if match["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                               for f in files]}, {}

    def _commit(self, match, body):
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        header, files = None, {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                value = item["value"]
                assert value["encoding"] == "base64", value
                files[value["path"]] = base64.b64decode(value["content"])
            else:
                return 400, {"error": f"fake hub: unsupported commit entry {item['key']}"}, {}
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            repo.files.update(files)
            repo.commits.append({"header": header, "files": sorted(files), "oid": oid, "revision": match["rev"]})
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}"}, {}

    # helpers for tests
    def routes_called(self) -> list[str]:
        return [r.route or f"?{r.method} {r.path}" for r in self.requests]
