"""A small in-memory Hugging Face Hub for tests: only the endpoints the real `huggingface_hub`
client calls for create_repo / create_commit (regular + LFS "basic" transfer) / model_info /
list_repo_files / hf_hub_download. Threaded `http.server` on 127.0.0.1, random port.

Endpoints (as read from huggingface_hub's hf_api.py, _commit_api.py, lfs.py, file_download.py):
  POST   /api/repos/create                          create_repo (409 when it exists)
  DELETE /api/repos/delete                          delete_repo
  POST   /api/validate-yaml                         README.md metadata check before a commit
  GET    /api/models/{ns}/{name}[/revision/{rev}]   model_info / repo_info
  GET    /api/models/{ns}/{name}/tree/{rev}[/path]  list_repo_tree / list_repo_files
  POST   /api/models/{ns}/{name}/branch/{branch}    create_branch
  POST   /api/models/{ns}/{name}/preupload/{rev}    upload mode ("regular" | "lfs") per file
  POST   /{ns}/{name}.git/info/lfs/objects/batch    LFS batch API: where to PUT each object
  PUT    /lfs-upload/{oid}                          the "S3" upload (no auth, like a presigned URL)
  POST   /{ns}/{name}.git/info/lfs/objects/verify   LFS verify
  POST   /api/models/{ns}/{name}/commit/{rev}       NDJSON commit, applied all or nothing
  HEAD/GET /{ns}/{name}/resolve/{rev}/{path}        download

Tests inject failures with `server.faults["commit"] = 500` (endpoint name -> HTTP status) and read
`server.requests` to see what the client sent (method, path, whether it was authenticated).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

#: suffixes a model repo's default .gitattributes sends to LFS (a subset is enough here)
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".onnx", ".msgpack", ".npy",
                ".zip")


#: tokens the fake Hub accepts (a planted secret that must never appear in any output)
TOKEN = "hf_PLANTEDsecret123"
OTHER_TOKEN = "hf_bobsToken456"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the Hub reports: sha256 for LFS files, the git blob sha1 otherwise."""
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_sha1(self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # ref -> commit oid
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # oid -> snapshot
    prs: int = 0

    def snapshot(self, ref: str = "main") -> dict[str, StoredFile]:
        return self.commits[self.branches[ref]]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub(ThreadingHTTPServer):
    """The server: repos, LFS blobs, users' tokens, fault injection and a request log."""

    daemon_threads = True

    def __init__(self, tokens: dict[str, str], *, lfs_threshold: int = 10 * 1024 * 1024):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tokens = dict(tokens)  # token -> user name
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_blobs: dict[str, bytes] = {}  # sha256 -> content (uploaded and verified)
        self.faults: dict[str, int] = {}
        self.requests: list[tuple[str, str, bool]] = []
        self.lock = threading.Lock()
        self._n_commits = 0
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    # -- state helpers for tests ------------------------------------------------------------------
    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        """The files of a branch, path -> content."""
        return {p: f.data for p, f in self.repos[repo_id].snapshot(ref).items()}

    def new_commit(self, repo: Repo, parent: dict[str, StoredFile]) -> str:
        self._n_commits += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{self._n_commits}".encode()).hexdigest()
        repo.commits[oid] = parent
        return oid

    def create(self, repo_id: str, *, private: bool = False) -> Repo:
        """Create a repo the way the Hub does: an initial commit with a .gitattributes."""
        repo = Repo(repo_id, private)
        gitattributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
        repo.branches["main"] = self.new_commit(
            repo, {".gitattributes": StoredFile(gitattributes.encode(), False)})
        self.repos[repo_id] = repo
        return repo


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: tests read server.requests
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self._raw_body

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        return self.server.tokens.get(token) if token else None

    def _need_user(self) -> str:
        if not self.headers.get("Authorization"):
            raise HubError(401, "You must be authenticated to access this resource")
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        user = self._need_user() if write else self._user()
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            raise HubError(404 if self.headers.get("Authorization") else 401,
                           "Repository not found", "RepoNotFound")
        if write and user != repo_id.split("/")[0]:
            raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    def _fault(self, name: str) -> None:
        status = self.server.faults.get(name)
        if status is not None:
            raise HubError(status, f"injected failure at {name}")

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.server.requests.append((self.command, parts.path,
                                     bool(self.headers.get("Authorization"))))
        # read the whole body first, even when answering an error: keep-alive needs it off the wire
        self._raw_body = self._read_body()
        try:
            for method, pattern, handler in _ROUTES:
                if method == self.command or (method == "GET" and self.command == "HEAD"):
                    m = re.fullmatch(pattern, parts.path)
                    if m:
                        groups = {k: unquote(v) if v is not None else None
                                  for k, v in m.groupdict().items()}
                        with self.server.lock:
                            handler(self, query=query, path=path, **groups)
                        return
            raise HubError(404, f"no route for {self.command} {parts.path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message}, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- endpoints --------------------------------------------------------------------------------
    def create_repo(self, **_) -> None:
        user = self._need_user()
        self._fault("create")
        payload = json.loads(self._body())
        if payload.get("type", "model") != "model":
            raise HubError(400, "only model repos here")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, "You don't have the rights to create a repo in this namespace")
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id in self.server.repos:
            raise HubError(409, "You already created this model repo")
        self.server.create(repo_id, private=payload.get("visibility") == "private")
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def delete_repo(self, **_) -> None:
        user = self._need_user()
        payload = json.loads(self._body())
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        self._repo(repo_id, write=True)
        del self.server.repos[repo_id]
        self._json(200, {})

    def validate_yaml(self, **_) -> None:
        self._body()
        self._json(200, {"errors": [], "warnings": []})

    def model_info(self, ns: str, name: str, rev: str | None = None, **_) -> None:
        self._fault("model_info")
        repo = self._repo(f"{ns}/{name}")
        ref = rev or "main"
        if ref not in repo.branches:
            raise HubError(404, "Invalid rev id", "RevisionNotFound")
        sha = repo.branches[ref]
        self._json(200, {"_id": sha, "id": repo.repo_id, "modelId": repo.repo_id, "sha": sha,
                         "private": repo.private, "tags": [], "downloads": 0, "likes": 0,
                         "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]})

    def tree(self, ns: str, name: str, rev: str, sub: str | None = None, **_) -> None:
        repo = self._repo(f"{ns}/{name}")
        if rev not in repo.branches:
            raise HubError(404, "Invalid rev id", "RevisionNotFound")
        prefix = f"{sub.strip('/')}/" if sub else ""
        entries = []
        for p, f in sorted(repo.snapshot(rev).items()):
            if p.startswith(prefix):
                e = {"type": "file", "path": p, "size": len(f.data), "oid": git_sha1(f.data)}
                if f.lfs:
                    e["lfs"] = {"oid": f.oid, "size": len(f.data), "pointerSize": 134}
                entries.append(e)
        self._json(200, entries)

    def create_branch(self, ns: str, name: str, branch: str, **_) -> None:
        repo = self._repo(f"{ns}/{name}", write=True)
        start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: {branch}")
        repo.branches[branch] = repo.branches.get(start) or start
        self._json(200, {})

    def preupload(self, ns: str, name: str, rev: str, **_) -> None:
        repo = self._repo(f"{ns}/{name}", write=True)
        self._fault("preupload")
        payload = json.loads(self._body())
        existing = repo.snapshot(rev) if rev in repo.branches else {}
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = (f["size"] >= self.server.lfs_threshold or f["path"].endswith(LFS_SUFFIXES)
                   or b"\x00" in sample)
            old = existing.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": old.oid if old else None})
        self._json(200, {"files": files, "commitOid": repo.branches.get(rev)})

    def lfs_batch(self, ns: str, name: str, **_) -> None:
        self._repo(f"{ns}/{name}", write=True)
        self._fault("lfs-batch")
        payload = json.loads(self._body())
        objects = []
        for o in payload["objects"]:
            obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.server.lfs_blobs:
                obj["actions"] = {
                    "upload": {"href": f"{self.server.url}/lfs-upload/{o['oid']}", "header": {}},
                    "verify": {"href": f"{self.server.url}/{ns}/{name}.git/info/lfs/objects/verify",
                               "header": {}},
                }
            objects.append(obj)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str, **_) -> None:
        self._fault("lfs-upload")
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "sha256 mismatch")
        self.server.lfs_blobs[oid] = data
        self._send(200, b"")

    def lfs_verify(self, ns: str, name: str, **_) -> None:
        self._repo(f"{ns}/{name}", write=True)
        o = json.loads(self._body())
        blob = self.server.lfs_blobs.get(o["oid"])
        if blob is None or len(blob) != o["size"]:
            raise HubError(404, "object not found")
        self._json(200, {})

    def commit(self, ns: str, name: str, rev: str, query: dict, **_) -> None:
        repo = self._repo(f"{ns}/{name}", write=True)
        body = self._body()
        self._fault("commit")
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line must be the header")
        snapshot = dict(repo.snapshot(rev))  # applied only when every line is valid: all or nothing
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                snapshot[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                blob = self.server.lfs_blobs.get(value["oid"])
                if blob is None:
                    raise HubError(422, f"LFS object {value['oid']} was not uploaded")
                snapshot[value["path"]] = StoredFile(blob, True)
            elif key == "deletedFile":
                snapshot.pop(value["path"], None)
            elif key == "deletedFolder":
                snapshot = {p: f for p, f in snapshot.items()
                            if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, f"unknown commit operation {key}")
        oid = self.server.new_commit(repo, snapshot)
        out = {"success": True, "commitOid": oid,
               "commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{oid}"}
        if query.get("create_pr") == ["1"]:
            repo.prs += 1
            repo.branches[f"refs/pr/{repo.prs}"] = oid
            out["pullRequestUrl"] = f"{self.server.url}/{repo.repo_id}/discussions/{repo.prs}"
        else:
            repo.branches[rev] = oid
        self._json(200, out)

    def resolve(self, ns: str, name: str, rev: str, file: str, **_) -> None:
        repo = self._repo(f"{ns}/{name}")
        if rev not in repo.branches:
            raise HubError(404, "Invalid rev id", "RevisionNotFound")
        f = repo.snapshot(rev).get(file)
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        self._send(200, f.data, {"X-Repo-Commit": repo.branches[rev], "ETag": f'"{f.oid}"'},
                   content_type="application/octet-stream")


_NAME = r"(?P<ns>[\w.-]+)/(?P<name>[\w.-]+)"
_ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("DELETE", r"/api/repos/delete", _Handler.delete_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("GET", rf"/api/models/{_NAME}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", _Handler.tree),
    ("GET", rf"/api/models/{_NAME}(?:/revision/(?P<rev>[^/]+))?", _Handler.model_info),
    ("POST", rf"/api/models/{_NAME}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("POST", rf"/api/models/{_NAME}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_NAME}/commit/(?P<rev>[^/]+)", _Handler.commit),
    ("POST", rf"/{_NAME}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("POST", rf"/{_NAME}\.git/info/lfs/objects/verify", _Handler.lfs_verify),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload),
    ("GET", rf"/{_NAME}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", _Handler.resolve),
]
