"""``awqconv publish OUT --repo NAMESPACE/NAME``: ship every verified artifact of OUT to the Hub.

Order of a run, so that a refusal leaves nothing behind:

1. local: every artifact matched to the verify record that checked it and re-hashed (``gate``);
   cards and manifests generated (``plan``, ``card``). Unverified, failed or changed artifacts stop
   the run here (``--force`` overrides), as does an empty OUT.
2. the token and the namespace (``whoami``), then what each repo already holds. ``--dry-run``
   stops here and prints the plan.
3. repos and branches created, every large file of every target uploaded (invisible until
   committed), then one commit per target, then the listing checked and the Collection updated.

A re-run sends only files whose sha256 differs from the Hub's, and LFS objects that a run cut
short already sent are not sent again (the Hub reports them present). ``--local-dir`` writes the
same files, one folder per target, with no network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError, UsageError
from ..outdir import fmt_bytes
from .gate import Artifact, collect
from .hub import Hub, PublishError, endpoint
from .plan import DEFAULT_TEMPLATES, Plan, Target, build, diff, parse_repo, parse_templates

__all__ = ["DEFAULT_TEMPLATES", "Artifact", "Plan", "PublishError", "PublishResult", "publish"]

LOCAL_INDEX = "awqconv-publish.json"


@dataclass
class PublishResult:
    plan: Plan
    dry_run: bool = False
    local_dir: Path | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)
    collection_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "local_dir": str(self.local_dir) if self.local_dir else None,
                "endpoint": self.plan.endpoint, "layout": self.plan.layout, "collection": self.collection_url,
                "targets": self.targets}


def publish(out_dir: str | Path, repo: str, *, layout: str = "repos", revision: str | None = None,
            private: bool = False, collection: str | None = None, only: list[str] | None = None,
            name_templates: list[str] | tuple[str, ...] = (), base_model: str | None = None,
            license: str | None = None, quantized_by: str | None = None, force: bool = False,
            dry_run: bool = False, local_dir: str | Path | None = None, overwrite: bool = False,
            verify_json: list[Path] | tuple[Path, ...] = (), progress: bool = True,
            echo: Callable[[str], None] | None = None) -> PublishResult:
    """See the module docstring. Raises InputError (refused locally), UsageError (bad options) or
    PublishError (the Hub). ``echo`` receives the plan and progress lines (the CLI prints them)."""
    echo = echo or (lambda line: None)
    if layout not in ("repos", "branches"):
        raise UsageError(f"--layout {layout!r}: choose repos or branches")
    if overwrite and local_dir is None:
        raise UsageError("--overwrite applies to --local-dir only")
    templates = parse_templates(list(name_templates))
    parse_repo(repo)  # bad options before any hashing
    out = Path(out_dir)
    if local_dir is not None and not dry_run:
        from ..outdir import check_output

        check_output(local_dir, overwrite=overwrite, inputs=[out])
    arts = collect(out, only=only, force=force, verify_json=[Path(p) for p in verify_json])
    plan = build(out, arts, repo=repo, layout=layout, revision=revision, private=private, collection=collection,
                 templates=templates, base_model=base_model, license=license, quantized_by=quantized_by)
    res = PublishResult(plan, dry_run=dry_run)
    if local_dir is not None:
        echo(plan.describe(files=True))
        if dry_run:
            echo(f"dry run: nothing was written to {local_dir}")
            return res
        res.local_dir = write_local(plan, Path(local_dir), overwrite)
        res.targets = [_row(t, None, "written") for t in plan.targets]
        echo(f"wrote {len(plan.targets)} folder(s) to {res.local_dir} (index: {LOCAL_INDEX}); nothing was uploaded")
        return res

    from huggingface_hub import get_token
    from huggingface_hub.errors import OIDCError

    end = endpoint()
    plan.endpoint = end
    try:
        token = get_token()
    except OIDCError as e:  # Trusted Publishing was asked for (HF_OIDC_RESOURCE) and failed
        raise PublishError(f"cannot get a Hugging Face token by OIDC: {str(e).strip().splitlines()[0]}") from None
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN to a write token or run `hf auth login` "
                           "(in GitHub Actions: a secret, or Trusted Publishing with HF_OIDC_RESOURCE); nothing was published")
    hub = Hub(end, token, progress=progress)
    hub.check_namespace(plan.namespace, hub.whoami())
    for t in plan.targets:
        diff(t, hub.remote_state(t.repo_id, t.revision))
    for t in plan.targets:
        card = next(u for u in t.files if u.path == "README.md")
        if card.status != "same" and card.content is not None:
            hub.validate_card(t.repo_id, card.content)
    echo(plan.describe(files=dry_run))
    if dry_run:
        echo("dry run: nothing was created or uploaded")
        res.targets = [_row(t, None, "would create" if not t.remote.exists else  # type: ignore[union-attr]
                            "up to date" if t.up_to_date else "would update") for t in plan.targets]
        return res

    created = {r: hub.ensure_repo(r, private) for r in plan.repo_ids}
    for r, new in created.items():
        if new:
            echo(f"created {r}{' (private)' if private else ''}")
    for t in plan.targets:
        hub.ensure_branch(t.repo_id, t.revision)
    work = [t for t in plan.targets if t.to_send or t.deletes]
    ops = {id(t): hub.operations(t.to_send, t.deletes) for t in work}
    for t in work:  # every large file of every target before any commit
        hub.upload(t.repo_id, t.revision, ops[id(t)])
    for t in plan.targets:
        if t not in work:
            echo(f"  {t.repo_id}@{t.revision}: up to date ({len(t.files)} files unchanged)")
            res.targets.append(_row(t, None, "up to date"))
            continue
        oid = hub.commit(t.repo_id, t.revision, ops[id(t)], _message(t), _description(t))
        sent = t.to_send
        echo(f"  {t.repo_id}@{t.revision}: committed {len(sent)} file(s) ({fmt_bytes(sum(u.size for u in sent))})"
             f", {len(t.files) - len(sent)} unchanged" + (f", {len(t.deletes)} deleted" if t.deletes else "")
             + f" -> {end}/{t.repo_id}/commit/{oid}")
        res.targets.append(_row(t, oid, "created" if created.get(t.repo_id) else "updated"))
    for t in work:
        hub.confirm(t.repo_id, t.revision, [u.path for u in t.files])
    if collection:
        res.collection_url = hub.collect(collection, plan.namespace, private, plan.repo_ids)
        echo(f"collection: {res.collection_url}")
    n = sum(len(t.to_send) for t in work)
    echo(f"published {len(plan.artifacts)} artifact(s) to {len(plan.repo_ids)} repo(s)"
         + (f"; {n} file(s) sent" if n else "; everything was already there, nothing sent"))
    return res


def _row(t: Target, oid: str | None, status: str) -> dict[str, Any]:
    sent = t.to_send if t.remote is not None else []
    return {"artifact": t.artifact.label if t.artifact else None, "repo": t.repo_id, "revision": t.revision,
            "folder": t.folder, "status": status, "commit": oid, "files": len(t.files),
            "sent_files": len(sent), "sent_bytes": sum(u.size for u in sent), "deleted": list(t.deletes),
            "verified": bool(t.artifact and t.artifact.verified) if t.artifact else None}


def _message(t: Target) -> str:
    a = t.artifact
    if a is None:
        return "awqconv publish: index card"
    fmt = a.fmt + (f":{a.variant}" if a.variant else "")
    src = (a.manifest.get("source") or {}).get("model") or "unknown source"
    return f"awqconv publish: {fmt} of {src}"


def _description(t: Target) -> str:
    from .. import __version__

    a = t.artifact
    if a is None:
        return f"awqconv {__version__}"
    state = f"NOT verified ({a.refused})" if a.refused else "verified by awqconv verify"
    return f"awqconv {__version__}; {state}; {len(t.files)} files, sha256 in awqconv-manifest.json"


def write_local(plan: Plan, local_dir: Path, overwrite: bool) -> Path:
    """Lay out exactly what would be uploaded: one folder per target, plus an index."""
    from ..outdir import check_output, staged_output

    check_output(local_dir, overwrite=overwrite, inputs=[plan.out])
    with staged_output(local_dir, overwrite=overwrite, inputs=[plan.out]) as tmp:
        for t in plan.targets:
            for u in t.files:
                dst = tmp / t.folder / u.path
                dst.parent.mkdir(parents=True, exist_ok=True)
                if u.content is not None:
                    dst.write_bytes(u.content)
                    continue
                assert u.source is not None
                if _copy_hashed(u.source, dst) != u.sha256:  # the copy must be what the gate checked
                    raise CorruptFileError(f"{u.source} changed while it was copied; nothing was written: re-run")
        index = {"format": "awqconv-publish", "layout": plan.layout, "namespace": plan.namespace,
                 "targets": [{"repo": t.repo_id, "revision": t.revision, "folder": t.folder,
                              "artifact": t.artifact.label if t.artifact else None,
                              "files": [{"path": u.path, "size": u.size, "sha256": u.sha256} for u in t.files]}
                             for t in plan.targets]}
        (tmp / LOCAL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return local_dir


def _copy_hashed(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(1 << 22):
            h.update(chunk)
            fo.write(chunk)
    shutil.copystat(src, dst)
    return h.hexdigest()
