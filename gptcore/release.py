"""Release a checkpoint as a version, list the versions, and load one back from Python.

    python -m gptcore.release gptcore-char v1.0.0                       # tag gptcore-char@v1.0.0, dvc push
    python -m gptcore.release gptcore-char gptcore-char-cutile v1.0.0   # several artifacts, one version
    python -m gptcore.release --list                                    # versions, sha256, MLflow run ids

A release is an annotated git tag `<artifact>@v<MAJOR>.<MINOR>.<PATCH>` on the current commit, the form
`dvc artifacts get <repo> <artifact> --rev v1.0.0` resolves, made only when

    - the artifact is declared in dvc.yaml (`artifacts:`),
    - git has no uncommitted change (and no untracked file that is not ignored: code that made the
      checkpoint but is not in the commit would make it unreproducible),
    - `dvc status` finds the artifact and its whole upstream pipeline as dvc.lock records them,
    - the artifact's file matches its manifest (out/ckpt.json, cutile/manifest.json),

after `dvc push` has stored every DVC-tracked file of the commit in the default remote (so the version
can be fetched, and reproduced with `dvc pull` + `dvc repro`, from another clone). The tag message holds
the sha256 and the MLflow run id of each file.

From Python: `load_version("gptcore-char", "v1.0.0", repo=...)` reads the checkpoint and its manifest
with `dvc.api` and refuses bytes that do not match the manifest's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

from gptcore.errors import CheckpointError, UserError
from gptcore.manifest import (
    Manifest,
    ManifestMismatch,
    manifest_candidates,
    mismatch_message,
    parse_manifest,
    verify_checkpoint,
)

VERSION_RE = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class ReleaseError(UserError, RuntimeError):
    """A release that cannot be made; the message says why and what to do."""


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ReleaseError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}".rstrip())
    return proc


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def git_root(cwd: Path) -> Path:
    proc = _run(["git", "rev-parse", "--show-toplevel"], cwd, check=False)
    if proc.returncode != 0:
        raise ReleaseError(f"{cwd} is not in a git repository: a release is a git tag")
    return Path(proc.stdout.strip())


def declared_artifacts(root: Path) -> dict[str, dict]:
    """{name: {"path": ..., "type": ..., ...}} of the artifacts in <root>/dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = repo.artifacts.read()
    return {name: a.to_dict() for name, a in found.get("dvc.yaml", {}).items()}


def first_ten(paths: list[str]) -> str:
    """Up to ten paths, comma-separated, with " ..." when there are more."""
    return ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")


def check_clean(root: Path, allow_untracked: bool = False) -> str:
    """The HEAD commit, after checking git has nothing uncommitted (nor untracked, unless allowed)."""
    head = _run(["git", "rev-parse", "HEAD"], root, check=False)
    if head.returncode != 0:
        raise ReleaseError("the repository has no commit yet: commit the code, params.yaml and dvc.lock first")
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], root).stdout.splitlines()
    changed = [line[3:] for line in status if not line.startswith("??")]
    untracked = [line[3:] for line in status if line.startswith("??")]
    if changed:
        raise ReleaseError(
            f"uncommitted changes: {first_ten(changed)}"
            + "\ncommit them (git add ... && git commit) so the version's commit holds the code, "
            "params.yaml and dvc.lock that made the checkpoint"
        )
    if untracked and not allow_untracked:
        raise ReleaseError(
            f"untracked files: {first_ten(untracked)}"
            + "\ncommit them or add them to .gitignore (or pass --allow-untracked if they played no "
            "part in making the checkpoint)"
        )
    return head.stdout.strip()


def producing_stages(root: Path, paths: list[str]) -> list[str]:
    """The DVC stages whose outputs the files are (a file no stage makes is an error)."""
    from dvc.exceptions import OutputNotFoundError
    from dvc.repo import Repo

    stages = []
    with Repo(str(root)) as repo:
        for path in paths:
            try:
                outs = repo.find_outs_by_path(str(root / path))
            except OutputNotFoundError:
                outs = []
            if not outs:
                raise ReleaseError(f"{path}: no stage in dvc.yaml writes it, so dvc.lock cannot record it")
            stages += [o.stage.addressing for o in outs if o.stage.addressing not in stages]
    return stages


def check_pipeline(root: Path, paths: list[str]) -> None:
    """`dvc status --with-deps` of the stages that made the artifacts' files: each, and everything upstream,
    must be as dvc.lock records, its outputs in the cache (a stage marked `always_changed` aside, which never
    settles)."""
    proc = _run(_dvc("status", "--json", "--with-deps", *producing_stages(root, paths)), root)
    try:
        status = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        raise ReleaseError(f"`dvc status` gave no JSON:\n{proc.stdout}{proc.stderr}") from None
    stale = {stage: changes for stage, changes in status.items() if changes != ["always changed"]}
    if stale:
        detail = "; ".join(f"{stage}: {json.dumps(changes)}" for stage, changes in stale.items())
        raise ReleaseError(
            f"the pipeline is not up to date for {', '.join(paths)} ({detail})\n"
            "run `dvc repro` (`dvc pull` for files not in the cache), commit dvc.lock, then release"
        )


def release(
    names: list[str],
    version: str,
    root: Path | None = None,
    message: str = "",
    push: bool = True,
    remote: str | None = None,
    allow_untracked: bool = False,
    push_tag: str | None = None,
    out=print,
) -> list[str]:
    """Check, `dvc push`, then tag each artifact `<name>@<version>` on HEAD; return the tags."""
    root = git_root(root or Path.cwd())
    if not VERSION_RE.match(version):
        raise ReleaseError(f"version {version!r}: expected vMAJOR.MINOR.PATCH, for example v1.0.0")
    declared = declared_artifacts(root)
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise ReleaseError(
            f"unknown artifact {', '.join(unknown)}: dvc.yaml declares " + (", ".join(sorted(declared)) or "none")
        )
    tags = [f"{n}@{version}" for n in names]
    existing = set(_run(["git", "tag", "--list"], root).stdout.split())
    taken = [t for t in tags if t in existing]
    if taken:
        raise ReleaseError(
            f"{', '.join(taken)} exists already: a version names one checkpoint forever; choose the next version"
        )
    commit = check_clean(root, allow_untracked)
    paths = [declared[n]["path"] for n in names]
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise ReleaseError(f"missing {', '.join(missing)}: run `dvc repro` (or `dvc pull`) first")
    check_pipeline(root, paths)
    manifests: dict[str, Manifest] = {}
    for name, path in zip(names, paths):
        try:
            manifests[name] = verify_checkpoint(root / path, require=True)
        except CheckpointError as e:
            raise ReleaseError(str(e)) from None

    if push:
        out(f"dvc push{' -r ' + remote if remote else ''}: storing the commit's DVC-tracked files in the remote")
        _run(_dvc("push", *(["-r", remote] if remote else [])), root)
    for name, tag, path in zip(names, tags, paths):
        m = manifests[name]
        body = (f"{message}\n\n" if message else "") + (
            f"artifact: {name}\npath: {path}\nsha256: {m.sha256}\nmlflow_run_id: {m.run_id}\n"
            f"made at git commit: {m.git_commit}\nreleased at git commit: {commit}\n"
        )
        _run(["git", "tag", "-a", tag, "-m", f"Release {tag}\n\n{body}"], root)
        out(f"tagged {tag} -> {commit[:12]}: {path} sha256 {m.sha256[:16]}..., MLflow run {m.run_id}")
    if push_tag:
        _run(["git", "push", push_tag, *tags], root)
        out(f"pushed {', '.join(tags)} to git remote {push_tag}")
    out(f"fetch: dvc artifacts get {root} {names[0]} --rev {version}")
    return tags


def list_versions(root: Path | None = None) -> list[dict]:
    """Every `<artifact>@vX.Y.Z` tag of the repo with its commit and, read from its manifest at that
    revision, the file's sha256 and the MLflow run that made it."""
    import dvc.api
    from gto.tag import parse_name

    root = git_root(root or Path.cwd())
    fmt = "%(refname:short)%09%(objecttype)%09%(*objectname)%09%(objectname)"
    lines = _run(["git", "for-each-ref", "--sort=creatordate", f"--format={fmt}", "refs/tags"], root).stdout
    versions = []
    for line in lines.splitlines():
        tag, kind, peeled, obj = line.split("\t")
        try:
            parsed = parse_name(tag)
        except Exception:  # gto raises its own errors for other tags
            continue
        if kind != "tag" or not parsed or "version" not in parsed:
            continue  # lightweight tags are not versions for gto/dvc
        row = {"tag": tag, "name": parsed["name"], "version": parsed["version"], "commit": peeled or obj}
        try:
            info = dvc.api.artifacts_show(parsed["name"], version=parsed["version"], repo=str(root))
            row["path"] = info["path"]
            manifest = _read_manifest_at(str(root), info["path"], tag)
            if manifest:
                row.update(sha256=manifest.sha256, mlflow_run_id=manifest.run_id, made_at=manifest.git_commit)
        except Exception as e:  # a version whose files the remote lacks: say so, keep listing
            row["error"] = f"{type(e).__name__}: {e}"
        versions.append(row)
    return versions


def _read_manifest_at(repo: str, path: str, rev: str) -> Manifest | None:
    import dvc.api

    for candidate in manifest_candidates(Path(path)):
        try:
            text = dvc.api.read(candidate.as_posix(), repo=repo, rev=rev)
        except Exception:  # not there at that revision
            continue
        strict = candidate.name == "manifest.json" and candidate.stem != Path(path).stem
        found = parse_manifest(json.loads(text), Path(path).name, f"{repo}:{candidate.as_posix()}@{rev}", strict)
        if found:
            return found
    return None


def read_version(name: str, version: str, repo: str | None = None) -> tuple[bytes, Manifest, str]:
    """The bytes of artifact `name` at `version`, its manifest and its path, through `dvc.api.open` (from
    the repo's cache or its DVC remote); raises ManifestMismatch when the bytes are not the ones the
    manifest records."""
    import dvc.api

    info = dvc.api.artifacts_show(name, version=version, repo=repo)
    manifest = _read_manifest_at(repo, info["path"], info["rev"])
    if manifest is None:
        raise CheckpointError(f"{name}@{version}: no manifest beside {info['path']} at {info['rev'][:12]}")
    with dvc.api.open(info["path"], repo=repo, rev=info["rev"], mode="rb") as f:
        data = f.read()
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.sha256:
        raise ManifestMismatch(
            mismatch_message(
                f"{repo}:{info['path']}@{name}@{version}",
                str(manifest.path),
                manifest.sha256,
                actual,
                manifest.size,
                len(data),
            )
        )
    return data, manifest, info["path"]


def load_version(name: str, version: str, repo: str | None = None, map_location="cpu") -> tuple[dict, Manifest]:
    """A released torch checkpoint (e.g. gptcore-char) as a dict, sha256-checked, loaded weights-only; or
    the state dict of a released safetensors file (gptcore-char-cutile)."""
    import torch

    data, manifest, path = read_version(name, version, repo)
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data), manifest
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True), manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="ARTIFACT", help="artifact names from dvc.yaml, then the version")
    ap.add_argument("--list", action="store_true", help="list the released versions")
    ap.add_argument("-m", "--message", default="", help="release notes for the tag message")
    ap.add_argument("--no-push", dest="push", action="store_false", help="tag without `dvc push`")
    ap.add_argument("-r", "--remote", help="DVC remote to push to (default: the default remote)")
    ap.add_argument("--push-tag", metavar="GIT_REMOTE", help="also `git push GIT_REMOTE <tags>`")
    ap.add_argument("--allow-untracked", action="store_true", help="release despite untracked files")
    ap.add_argument("-C", dest="root", type=Path, help="the repository (default: the current directory)")
    args = ap.parse_args(argv)
    try:
        if args.list:
            rows = list_versions(args.root)
            for r in rows:
                extra = (
                    f"sha256 {r['sha256']}  run {r['mlflow_run_id']}"
                    if "sha256" in r
                    else r.get("error", "no manifest")
                )
                print(f"{r['tag']:32s} {r['commit'][:12]}  {r.get('path', '?'):28s} {extra}")
            if not rows:
                print("no versions yet: python -m gptcore.release ARTIFACT vX.Y.Z")
            return 0
        if len(args.names) < 2:
            ap.error("give one or more artifact names and a version: gptcore-char v1.0.0")
        release(
            args.names[:-1],
            args.names[-1],
            args.root,
            args.message,
            args.push,
            args.remote,
            args.allow_untracked,
            args.push_tag,
        )
        return 0
    except ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
