"""Dataset versions: the registry written by ingest, tied to DVC's cache, and checkout by id.

The ingest stage appends one line per new version to `paths.versions` (id, date, counts,
source, parent, the ingest params). DVC holds the files: after the ingest stage is recorded
in dvc.lock, the version's line gets the DVC hash of data/ingest (`dvc_md5`), filled in here
the first time it is seen (so `dvc repro` and the flow both end up registered).

`checkout(version)` restores that version's data/ingest from DVC's cache (pulling from the
default remote when the cache lacks it), sets params.yaml's ingest section back to what
produced it, and records the stage, so `dvc repro` continues from that version.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from tasks.ingest import load_registry, save_registry
from tasks.io import read_json


class VersionError(LookupError):
    """An unknown version id, or one whose files are in neither the cache nor the remote."""


def _locked_ingest_md5(root: Path) -> str | None:
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("ingest", {})
    outs = stage.get("outs") or []
    return outs[0].get("md5") if outs else None


def sync_registry(params, root: Path | str = ".") -> list[dict]:
    """The registry, with the current version's DVC hash filled in when dvc.lock records it."""
    root = Path(root)
    registry = root / params.paths.versions
    entries = load_registry(registry)
    info_path = root / params.paths.data / "ingest" / "version.json"
    md5 = _locked_ingest_md5(root)
    if entries and md5 and info_path.is_file():
        current = read_json(info_path)["version"]
        for entry in entries:
            if entry["version"] == current and entry.get("dvc_md5") != md5:
                entry["dvc_md5"] = md5
                save_registry(registry, entries)
                break
    return entries


def list_versions(params, root: Path | str = ".") -> list[dict]:
    return sync_registry(params, root)


def _restore_tree(repo, md5: str, dest: Path) -> None:
    from dvc_data.hashfile.checkout import CheckoutError
    from dvc_data.hashfile.checkout import checkout as checkout_tree
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    odb = repo.cache.local
    try:
        tree = Tree.load(odb, HashInfo("md5", md5))
    except FileNotFoundError:
        raise VersionError(f"DVC's cache has no copy of tree {md5}: fetch it from the remote "
                           "(`git checkout <commit> dvc.lock && dvc pull ingest`) and retry") from None
    # DVC copies cache files without rehashing them: a corrupted object must not become the version.
    from pixelops.integrity import md5_file

    for key, _, hash_info in tree:
        obj = Path(odb.oid_to_path(hash_info.value))
        if obj.is_file() and (got := md5_file(obj)) != hash_info.value:
            raise VersionError(f"DVC's cache object {obj} (for {'/'.join(key)}) is corrupted: md5 {got}, expected "
                               f"{hash_info.value}. The current version is unchanged; run `pixelops verify --repair`, "
                               "then check out again")
    try:
        checkout_tree(str(dest), repo.fs, tree, odb, force=True, quiet=True)
    except CheckoutError as e:
        raise VersionError(f"DVC could not restore tree {md5} from its cache ({e}): run `pixelops verify --repair` "
                           "(it fetches missing objects from the remote), then check out again") from None


def checkout(version: str, params, root: Path | str = ".") -> dict:
    """Make `version` the project's current dataset version; return its registry entry."""
    from dvc.repo import Repo

    from pixelops.params_file import set_params_file

    root = Path(root)
    entries = sync_registry(params, root)
    matches = [e for e in entries if e["version"] == version]
    if not matches:
        known = ", ".join(e["version"] for e in entries[-10:]) or "none"
        raise VersionError(f"unknown dataset version {version!r}; known: {known}")
    entry = matches[-1]
    if entry.get("kind") == "curation":
        raise VersionError(
            f"{version} is a curated version of {entry['parent']}: check out {entry['parent']} and the git "
            f"commit holding {entry.get('decisions_file') or 'its rules in params.yaml'}, then `pixelops run` "
            f"rebuilds it (curation sha256 {entry['curation_sha256'][:12]})")
    if not entry.get("dvc_md5"):
        raise VersionError(f"{version} was never recorded in dvc.lock, so DVC holds no copy of it")
    out_dir = root / params.paths.data / "ingest"
    staging = out_dir.with_name(f".{out_dir.name}.checkout")
    shutil.rmtree(staging, ignore_errors=True)
    with Repo(str(root)) as repo:
        try:
            _restore_tree(repo, entry["dvc_md5"], staging)
        except VersionError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        got = json.loads((staging / "version.json").read_text())["version"]
        if got != version:
            shutil.rmtree(staging)
            raise VersionError(f"DVC tree {entry['dvc_md5']} holds {got}, not {version}")
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)  # the version appears all at once
        shutil.rmtree(old, ignore_errors=True)
        set_params_file([f"ingest.{k}={json.dumps(v)}" for k, v in _flat(entry["params"]).items()],
                        root / "params.yaml")
        repo.commit("ingest", force=True)
    return entry


def _flat(section: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in section.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
