"""A STAND-IN FOR THE HUGGING FACE HUB, for tests only: a local HTTP server (stdlib http.server in a
thread) speaking the part of the Hub API that ``huggingface_hub``'s client uses when awqconv
publishes (and ``export`` downloads): whoami, repo creation, refs, branches, tree listing (by branch
or commit), preupload, the commit API (NDJSON), the git-LFS batch API with basic PUT transfers and
verify, file downloads (resolve), YAML validation and collections. It is not the Hub: no Xet storage (tests set HF_HUB_DISABLE_XET), no
pagination, no pull requests, one in-memory store per server.

It records what it receives (LFS PUTs per object, commits, every request) so tests can check that a
second run sends nothing, and it can hold an LFS PUT open (``hold_after_puts``) so a test can kill
the client mid-upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"
DATE = "2026-12-07T00:00:00.000Z"
LICENSES = {"apache-2.0", "mit", "other", "llama3.1", "gemma", "cc-by-4.0", "bsd-3-clause"}  # a few of the Hub's


def _commit_of(repo: "Repo", rev: str) -> str | None:
    """A branch's head, or a commit id of the repo (snapshot downloads list and fetch by commit)."""
    return repo.branches.get(rev) or (rev if rev in repo.trees else None)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    size: int
    blob_id: str
    data: bytes | None = None  # regular files
    lfs_oid: str | None = None  # LFS files (bytes in HubState.lfs)


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit
    trees: dict[str, dict[str, Entry]] = field(default_factory=dict)  # commit -> path -> entry


class HubState:
    def __init__(self) -> None:
        # token -> (user, role)
        self.tokens = {"tok-alice": ("alice", "write"), "tok-alice-read": ("alice", "read")}
        self.orgs = {"alice-org": {"alice": "write"}, "read-org": {"alice": "read"}}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.puts: Counter[str] = Counter()  # completed LFS PUTs per object
        self.commits: list[tuple[str, str, list[str]]] = []  # (repo, branch, paths changed)
        self.requests: list[tuple[str, str]] = []
        self.collections: dict[str, dict[str, Any]] = {}
        self.hold_after_puts: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.RLock()
        self._n = 0

    # -- helpers for tests
    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        r = self.repos[repo_id]
        return {p: (e.data if e.data is not None else self.lfs[e.lfs_oid]) for p, e in r.trees[r.branches[branch]].items()}

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.requests if m in ("POST", "PUT") and "/validate-yaml" not in p
                and "/lfs/objects/batch" not in p and "/preupload/" not in p]

    # -- model
    def can_write(self, user: str | None, ns: str) -> bool:
        return user is not None and (user == ns or self.orgs.get(ns, {}).get(user) in ("write", "admin"))

    def can_read(self, user: str | None, repo: Repo) -> bool:
        return not repo.private or (user is not None and (user == repo.owner or user in self.orgs.get(repo.owner, {})))

    def new_commit(self, repo: Repo, branch: str, tree: dict[str, Entry]) -> str:
        self._n += 1
        oid = hashlib.sha1(f"{self._n}:{branch}:{sorted(tree)}".encode()).hexdigest()
        repo.trees[oid] = tree
        repo.branches[branch] = oid
        return oid


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass per server
    base: str

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # -- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, code: int, body: Any = None, headers: dict[str, str] | None = None, head: bool = False) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _err(self, code: int, msg: str, xcode: str | None = None) -> None:
        h = {"X-Error-Message": msg}
        if xcode:
            h["X-Error-Code"] = xcode
        self._send(code, {"error": msg}, h)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        tok = auth[7:] if auth.startswith("Bearer ") else None
        hit = self.state.tokens.get(tok) if tok else None
        return hit[0] if hit else None

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        r = self.state.repos.get(repo_id)
        user = self._user()
        if r is None or not self.state.can_read(user, r):
            self._err(404, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if write and not self.state.can_write(user, r.owner):
            self._err(403, f"You don't have write access to {repo_id}")
            return None
        return r

    def _route(self, method: str) -> None:
        u = urlsplit(self.path)
        path, query = u.path, parse_qs(u.query)
        st = self.state
        with st.lock:
            st.requests.append((method, path))
        body = self._body() if method in ("POST", "PUT") else b""
        try:
            self._dispatch(method, path, query, body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        if self.path.startswith("/lfs-upload/"):
            return self._put_lfs()
        self._route("PUT")

    # -- endpoints
    def _dispatch(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        st = self.state
        if path == "/api/whoami-v2":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body))
        if path.startswith("/api/collections"):
            return self._collections(method, path, body)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(refs|tree|branch|preupload|commit|revision)(?:/(.*))?)?", path)
        if m:
            repo_id, op, rest = m.group(1), m.group(2), unquote(m.group(3) or "")
            with st.lock:
                if op is None or op == "revision":
                    return self._info(repo_id, rest or "main")
                if op == "refs":
                    r = self._repo(repo_id)
                    if r:
                        self._send(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                                      for b, c in r.branches.items()], "tags": [], "converts": []})
                    return None
                if op == "tree":
                    return self._tree(repo_id, rest)
                if op == "branch":
                    return self._branch(repo_id, rest, json.loads(body or b"{}"))
                if op == "preupload":
                    return self._preupload(repo_id, rest, json.loads(body))
                if op == "commit":
                    return self._commit(repo_id, rest, body)
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", path)
        if m:
            with st.lock:
                return self._lfs_batch(m.group(1), json.loads(body)) if m.group(2) == "batch" else self._lfs_verify(json.loads(body))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            with st.lock:
                return self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)), head=method == "HEAD")
        return self._err(404, f"no such endpoint in the Hub stand-in: {method} {path}")

    def _whoami(self) -> None:
        tok = self.headers.get("Authorization", "")[7:]
        hit = self.state.tokens.get(tok)
        if hit is None:
            return self._err(401, "Invalid credentials in Authorization header")
        user, role = hit
        orgs = [{"name": o, "roleInOrg": m[user], "type": "org"} for o, m in self.state.orgs.items() if user in m]
        self._send(200, {"type": "user", "name": user, "fullname": user, "orgs": orgs,
                         "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": role}}})

    def _create(self, p: dict[str, Any]) -> None:
        st, user = self.state, self._user()
        ns = p.get("organization") or user
        repo_id = f"{ns}/{p['name']}"
        if user is None:
            return self._err(401, "Invalid credentials in Authorization header")
        with st.lock:
            if not st.can_write(user, ns) or st.tokens.get(self.headers["Authorization"][7:], ("", ""))[1] == "read":
                return self._err(403, f"You don't have the rights to create a model under the namespace \"{ns}\"")
            if repo_id in st.repos:
                return self._err(409, "You already created this model repo")
            r = Repo(ns, p.get("visibility") == "private" or bool(p.get("private")))
            st.repos[repo_id] = r
            st.new_commit(r, "main", {".gitattributes": Entry(len(GITATTRIBUTES), git_sha1(GITATTRIBUTES), GITATTRIBUTES)})
        self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id})

    def _info(self, repo_id: str, rev: str) -> None:
        r = self._repo(repo_id)
        if r is None:
            return
        if rev not in r.branches:
            return self._err(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        tree = r.trees[r.branches[rev]]
        card = None
        if "README.md" in tree and tree["README.md"].data is not None:
            mm = re.match(rb"^---\n(.*?)\n---\n", tree["README.md"].data, re.S)
            card = yaml.safe_load(mm.group(1)) if mm else None
        self._send(200, {"id": repo_id, "author": r.owner, "sha": r.branches[rev], "private": r.private,
                         "siblings": [{"rfilename": p} for p in sorted(tree)], **({"cardData": card} if card else {})})

    def _tree(self, repo_id: str, rest: str) -> None:
        r = self._repo(repo_id)
        if r is None:
            return
        rev, _, sub = rest.partition("/")
        commit = _commit_of(r, rev)
        if commit is None:
            return self._err(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        out = []
        for p, e in sorted(r.trees[commit].items()):
            if sub and not p.startswith(sub.rstrip("/") + "/"):
                continue
            item: dict[str, Any] = {"type": "file", "oid": e.blob_id, "size": e.size, "path": p}
            if e.lfs_oid:
                item["lfs"] = {"oid": e.lfs_oid, "size": e.size, "pointerSize": 134}
            out.append(item)
        self._send(200, out)

    def _branch(self, repo_id: str, name: str, p: dict[str, Any]) -> None:
        r = self._repo(repo_id, write=True)
        if r is None:
            return
        if name in r.branches:
            return self._err(409, f"Branch {name} already exists")
        start = p.get("startingPoint") or "main"
        head = r.branches.get(start, start)
        if head not in r.trees:
            return self._err(404, f"Invalid rev id: {start}", "RevisionNotFound")
        r.branches[name] = head
        self._send(200, {})

    def _preupload(self, repo_id: str, rev: str, p: dict[str, Any]) -> None:
        r = self._repo(repo_id, write=True)
        if r is None:
            return
        if rev not in r.branches:
            return self._err(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        tree = r.trees[r.branches[rev]]
        files = []
        for f in p["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            e = tree.get(f["path"])
            oid = None if e is None else (e.lfs_oid if e.lfs_oid else e.blob_id)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          **({"oid": oid} if oid else {})})
        self._send(200, {"files": files, "commitOid": r.branches[rev]})

    def _lfs_batch(self, repo_id: str, p: dict[str, Any]) -> None:
        r = self._repo(repo_id, write=True)
        if r is None:
            return
        objs = []
        for o in p["objects"]:
            item: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.state.lfs:  # present objects get no actions: the client skips them
                item["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{o['oid']}", "header": {}},
                                   "verify": {"href": f"{self.base}/{repo_id}.git/info/lfs/objects/verify"}}
            objs.append(item)
        self._send(200, {"transfer": "basic", "objects": objs})

    def _put_lfs(self) -> None:
        st = self.state
        oid = self.path.rsplit("/", 1)[1]
        with st.lock:
            st.requests.append(("PUT", self.path))
            hold = st.hold_after_puts is not None and sum(st.puts.values()) >= st.hold_after_puts
        if hold:  # a test kills the client now, mid-upload
            st.held.set()
            st.release.wait(120)
            self.close_connection = True
            return
        try:
            data = self._body()
        except OSError:
            return
        if hashlib.sha256(data).hexdigest() != oid:
            return self._err(400, "sha256 of the uploaded content does not match the object id")
        with st.lock:
            st.lfs[oid] = data
            st.puts[oid] += 1
        self._send(200, b"", {"ETag": '"x"'})

    def _lfs_verify(self, p: dict[str, Any]) -> None:
        ok = p["oid"] in self.state.lfs and len(self.state.lfs[p["oid"]]) == p["size"]
        self._send(200 if ok else 404, {} if ok else {"error": "object not found"})

    def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
        r = self._repo(repo_id, write=True)
        if r is None:
            return
        if rev not in r.branches:
            return self._err(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        tree = dict(r.trees[r.branches[rev]])
        changed = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, v = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(v["content"])
                tree[v["path"]] = Entry(len(data), git_sha1(data), data)
            elif key == "lfsFile":
                if v["oid"] not in self.state.lfs:
                    return self._err(422, f"LFS object {v['oid']} of {v['path']} was never uploaded")
                ptr = f"version https://git-lfs.github.com/spec/v1\noid sha256:{v['oid']}\nsize {v['size']}\n".encode()
                tree[v["path"]] = Entry(v["size"], git_sha1(ptr), lfs_oid=v["oid"])
            elif key == "deletedFile":
                tree.pop(v["path"], None)
            elif key == "deletedFolder":
                tree = {p: e for p, e in tree.items() if not p.startswith(v["path"].rstrip("/") + "/")}
            else:
                continue
            changed.append(v["path"])
        oid = self.state.new_commit(r, rev, tree)
        self.state.commits.append((repo_id, rev, changed))
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.base}/{repo_id}/commit/{oid}",
                         "hookOutput": ""})

    def _resolve(self, repo_id: str, rev: str, fpath: str, head: bool) -> None:
        r = self._repo(repo_id)
        if r is None:
            return
        commit = _commit_of(r, rev)
        if commit is None:
            return self._err(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        e = r.trees[commit].get(fpath)
        if e is None:
            return self._err(404, f"Entry {fpath} not found", "EntryNotFound")
        data = e.data if e.data is not None else self.state.lfs[e.lfs_oid]  # type: ignore[index]
        h = {"X-Repo-Commit": commit, "ETag": f'"{e.blob_id}"'}
        if e.lfs_oid:
            h.update({"X-Linked-Etag": f'"{e.lfs_oid}"', "X-Linked-Size": str(e.size)})
        self._send(200, data, h, head=head)

    def _validate_yaml(self, p: dict[str, Any]) -> None:
        m = re.match(r"^---\n(.*?)\n---\n", p["content"], re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as e:
            return self._send(400, {"errors": [{"message": str(e)}], "warnings": []})
        if meta is not None and not isinstance(meta, dict):
            return self._send(400, {"errors": [{"message": "metadata is not a mapping"}], "warnings": []})
        if meta and "license" in meta and meta["license"] not in LICENSES:
            return self._send(400, {"errors": [{"message": f'"license" must be one of [{", ".join(sorted(LICENSES))}]'}],
                                    "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def _collections(self, method: str, path: str, body: bytes) -> None:
        st, user = self.state, self._user()
        with st.lock:
            if path == "/api/collections" and method == "POST":
                p = json.loads(body)
                if not st.can_write(user, p["namespace"]):
                    return self._err(403, f"You cannot create a collection in {p['namespace']}")
                title_slug = re.sub(r"[^a-z0-9]+", "-", p["title"].lower()).strip("-")
                for c in st.collections.values():
                    if c["owner"]["name"] == p["namespace"] and c["title"] == p["title"]:
                        return self._send(409, {"error": "Collection already exists", "slug": c["slug"]})
                slug = f"{p['namespace']}/{title_slug}-{len(st.collections) + 1:024x}"
                st.collections[slug] = {"slug": slug, "title": p["title"], "owner": {"name": p["namespace"], "type": "user"},
                                        "items": [], "lastUpdated": DATE, "position": 0, "private": bool(p.get("private")),
                                        "theme": "default", "upvotes": 0, "description": p.get("description")}
                return self._send(200, st.collections[slug])
            m = re.fullmatch(r"/api/collections/(.+?)(/items)?", path)
            c = st.collections.get(m.group(1)) if m else None
            if c is None:
                return self._err(404, "Collection not found")
            if m.group(2) and method == "POST":  # type: ignore[union-attr]
                item = json.loads(body)["item"]
                if not st.can_write(user, c["owner"]["name"]):
                    return self._err(403, "You cannot edit this collection")
                if any(i["id"] == item["id"] for i in c["items"]):
                    return self._send(409, {"error": "Item already in the collection"})
                c["items"].append({"_id": f"{len(c['items']) + 1:024x}", "id": item["id"], "type": item["type"],
                                   "position": len(c["items"])})
            return self._send(200, c)


class HubStandIn:
    """``with HubStandIn() as hub: hub.url`` -- a stand-in Hub on 127.0.0.1, stopped on exit."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        handler.base = self.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.state.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
