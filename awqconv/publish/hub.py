"""The Hugging Face Hub side of ``awqconv publish``, through ``huggingface_hub``'s own client.

Token: ``HF_TOKEN``, the standard login, or Trusted Publishing (``HF_OIDC_RESOURCE``), as the client
resolves it. Endpoint: ``HF_ENDPOINT`` (read when publish runs). Every client or network error
becomes one PublishError line naming the repo and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from ..errors import AwqconvError
from .plan import RemoteFile, RemoteState, Upload

DEFAULT_ENDPOINT = "https://huggingface.co"
_CHUNK = 1 << 22


class PublishError(AwqconvError):
    """The Hub refused or could not be reached; nothing further was sent."""


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def git_blob_sha1(u: Upload) -> str:
    """The git object id of a file as the Hub reports it for non-LFS files."""
    h = hashlib.sha1(b"blob %d\0" % u.size)
    if u.content is not None:
        h.update(u.content)
    else:
        assert u.source is not None
        with open(u.source, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _first_line(text: Any) -> str:
    s = str(text or "").strip()
    return s.splitlines()[0].strip() if s else ""


@contextlib.contextmanager
def hub_errors(doing: str, repo_id: str | None, end: str, user: str | None = None) -> Iterator[None]:
    """Turn what the client raises into one PublishError line."""
    import httpx2
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f" {repo_id}" if repo_id else ""
    try:
        yield
    except PublishError:
        raise
    except OfflineModeIsEnabled:
        raise PublishError("HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it to publish, or lay the "
                           "upload out with --local-dir") from None
    except RevisionNotFoundError:
        raise PublishError(f"{doing}{where}: the revision does not exist on the Hub") from None
    except RepositoryNotFoundError as e:
        if e.response is not None and e.response.status_code == 401 and "whoami" in str(e.response.request.url):
            raise PublishError("the Hub refused the token (401: invalid or expired); set HF_TOKEN to a write token "
                               "or run `hf auth login`") from None
        raise PublishError(f"{doing}{where}: the repo does not exist or this token cannot see it") from None
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else None
        msg = _first_line(e.server_message) or _first_line(str(e))
        if code == 401:
            raise PublishError("the Hub refused the token (401: invalid or expired); set HF_TOKEN to a write token "
                               "or run `hf auth login`") from None
        if code == 403:
            who = f"{user}'s token" if user else "this token"
            raise PublishError(f"{doing}{where}: {who} may not write there (403 Forbidden: {msg}); the namespace "
                               "belongs to someone else or the token is read-only: publish under your own user or "
                               "organization with a write token") from None
        raise PublishError(f"{doing}{where}: the Hub answered {code} ({msg})") from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as e:
        raise PublishError(f"cannot reach the Hub at {end} while {doing}{where} ({_first_line(e) or type(e).__name__}); "
                           "check the network or HF_ENDPOINT and re-run: files already sent are not sent again") from None
    except RuntimeError as e:  # the client wraps a failed LFS upload; the cause says why
        if e.__cause__ is not None:
            with hub_errors(doing, repo_id, end, user):
                raise e.__cause__ from None
        raise


class Hub:
    """One session with the Hub for one publish run."""

    def __init__(self, end: str, token: str, progress: bool = True) -> None:
        from huggingface_hub import HfApi

        self.endpoint = end
        self.api = HfApi(endpoint=end, token=token)
        self.user: str | None = None
        if not progress:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()

    def _err(self, doing: str, repo_id: str | None = None):
        return hub_errors(doing, repo_id, self.endpoint, self.user)

    def whoami(self) -> dict[str, Any]:
        with self._err("checking the token"):
            who = self.api.whoami()
        self.user = who.get("name")
        return who

    def check_namespace(self, namespace: str, who: dict[str, Any]) -> None:
        """Refuse a namespace that is neither the token's user nor one of its organizations, and a
        read-only token, before anything is created."""
        role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise PublishError(f"the token of {who.get('name')} is read-only; create a write token "
                               "(huggingface.co/settings/tokens) and set HF_TOKEN to it")
        mine = {who.get("name")} | {o.get("name") for o in who.get("orgs") or [] if isinstance(o, dict)}
        if role != "fineGrained" and namespace not in mine:
            raise PublishError(f"--repo namespace {namespace} belongs to someone else: the token is {who.get('name')}'s "
                               f"(organizations: {', '.join(sorted(str(m) for m in mine - {who.get('name')})) or 'none'}); "
                               "publish under your own user or organization")

    def remote_state(self, repo_id: str, revision: str) -> RemoteState:
        from huggingface_hub import RepoFile, hf_hub_download
        from huggingface_hub.errors import RepositoryNotFoundError

        st = RemoteState()
        with self._err("reading", repo_id):
            try:
                refs = self.api.list_repo_refs(repo_id)
            except RepositoryNotFoundError:
                return st
            st.exists = True
            branches = {b.name for b in refs.branches}
            st.branch_exists = revision in branches
            base = revision if st.branch_exists else "main"  # a new branch starts from main
            if base not in branches:
                return st
            for f in self.api.list_repo_tree(repo_id, revision=base, recursive=True):
                if isinstance(f, RepoFile):
                    st.files[f.path] = RemoteFile(f.size, f.lfs.sha256 if f.lfs else None, f.blob_id)
            if "awqconv-manifest.json" in st.files:
                with tempfile.TemporaryDirectory() as tmp:
                    p = hf_hub_download(repo_id, "awqconv-manifest.json", revision=base, cache_dir=tmp,
                                        endpoint=self.endpoint, token=self.api.token)
                    try:
                        m = json.loads(open(p, encoding="utf-8").read())
                        st.owned = {str(e["path"]) for e in m.get("files", [])} | {"README.md", "awqconv-manifest.json"}
                    except (ValueError, TypeError, KeyError, AttributeError):
                        st.owned = set()  # not ours to judge: delete nothing
        return st

    def validate_card(self, repo_id: str, card: bytes) -> None:
        """The Hub's own check of a card's metadata, before anything is sent: create_commit runs it
        too, but only after the large files went up."""
        check = getattr(self.api, "_validate_yaml", None)
        if check is None:  # a client without it: create_commit still checks
            return
        with self._err("checking the card of", repo_id):
            try:
                check(card.decode("utf-8"), repo_type="model")
            except ValueError as e:
                why = "; ".join(ln.strip("- ").strip() for ln in str(e).splitlines()[1:] if ln.strip()) or str(e)
                raise PublishError(f"the Hub rejects the card metadata of {repo_id}: {why} (check --license and "
                                   "--base-model)") from None

    def ensure_repo(self, repo_id: str, private: bool) -> bool:
        """Create the repo; False when it already existed."""
        from huggingface_hub.errors import HfHubHTTPError

        with self._err("creating", repo_id):
            try:
                self.api.create_repo(repo_id, private=private, repo_type="model")
                return True
            except HfHubHTTPError as e:
                if e.response is not None and e.response.status_code == 409:
                    return False
                raise

    def ensure_branch(self, repo_id: str, branch: str) -> None:
        if branch == "main":
            return
        with self._err(f"creating branch {branch} of", repo_id):
            self.api.create_branch(repo_id, branch=branch, exist_ok=True)

    def operations(self, t_files: list[Upload], deletes: list[str]) -> list[Any]:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list[Any] = []
        for u in t_files:
            op = CommitOperationAdd(u.path, u.content if u.content is not None else str(u.source))
            op.upload_info.sha256 = bytes.fromhex(u.sha256)  # hashed (and checked) by the gate just now
            ops.append(op)
        ops += [CommitOperationDelete(p) for p in deletes]
        return ops

    def upload(self, repo_id: str, revision: str, ops: list[Any]) -> None:
        """Send the large files ahead of every commit (they are invisible until committed)."""
        from huggingface_hub import CommitOperationAdd

        adds = [op for op in ops if isinstance(op, CommitOperationAdd)]
        if adds:
            with self._err("uploading to", repo_id):
                self.api.preupload_lfs_files(repo_id, additions=adds, revision=revision, free_memory=False)

    def commit(self, repo_id: str, revision: str, ops: list[Any], message: str, description: str) -> str:
        with self._err("committing to", repo_id):
            info = self.api.create_commit(repo_id, ops, commit_message=message, commit_description=description,
                                          revision=revision)
        return info.oid

    def confirm(self, repo_id: str, revision: str, paths: list[str]) -> None:
        with self._err("listing", repo_id):
            there = set(self.api.list_repo_files(repo_id, revision=revision))
        missing = [p for p in paths if p not in there]
        if missing:
            raise PublishError(f"{repo_id}@{revision}: the Hub does not list {', '.join(missing[:3])} after the commit; "
                               "re-run publish")

    def collect(self, title: str, namespace: str, private: bool, repo_ids: list[str]) -> str:
        with self._err(f"adding to collection '{title}' of", namespace):
            c = self.api.create_collection(title, namespace=namespace, private=private, exists_ok=True)
            have = {i.item_id for i in c.items}
            for r in repo_ids:
                if r not in have:
                    c = self.api.add_collection_item(c.slug, r, "model", exists_ok=True)
        return c.url
