"""The offline journal: events of a run kept on local disk while the tracking server is unreachable, and
their replay into MLflow (by the tracker when the server answers again, or later from the shell with
``python -m orchestrator.tracking sync DIR --tracking-uri URI``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from orchestrator.tracking._mlflow import _apply, _client, _experiment_id, _server_reachable

__all__ = ["main", "pending_offline", "sync_command", "sync_offline"]

logger = logging.getLogger(__name__)

_META, _EVENTS, _SYNCED, _REJECTED = "meta.json", "events.jsonl", "synced.json", "rejected.jsonl"


def sync_command(offline_dir: str | Path, uri: str) -> str:
    """The shell command that replays ``offline_dir`` into ``uri`` (quoted for messages)."""
    return f"python -m orchestrator.tracking sync {offline_dir} --tracking-uri {uri}"


class _Journal:
    """Append-only event log of one run on local disk, with a replay cursor."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def create(cls, offline_dir: Path, key: str, meta: dict) -> _Journal:
        journal = cls(offline_dir / key)
        (journal.root / "artifacts").mkdir(parents=True, exist_ok=True)
        if not (journal.root / _META).exists():
            journal.write_meta(meta)
        return journal

    def meta(self) -> dict:
        return json.loads((self.root / _META).read_text())

    def write_meta(self, meta: dict) -> None:
        tmp = self.root / f"{_META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(self.root / _META)

    def append(self, event: dict) -> None:
        if event["kind"] == "artifact":  # keep a copy: the staging file is temporary
            src = Path(event["path"])
            rel = Path("artifacts") / uuid.uuid4().hex[:8] / src.name
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, self.root / rel)
            else:
                shutil.copy2(src, self.root / rel)
            event = {**event, "path": str(rel)}
        with open(self.root / _EVENTS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def events(self) -> list[dict]:
        path = self.root / _EVENTS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def synced(self) -> int:
        path = self.root / _SYNCED
        return json.loads(path.read_text())["events"] if path.exists() else 0

    def set_synced(self, n: int) -> None:
        (self.root / _SYNCED).write_text(json.dumps({"events": n}))

    def pending(self) -> int:
        return len(self.events()) - self.synced()

    def reject(self, event: dict, error: BaseException) -> None:
        with open(self.root / _REJECTED, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": event, "error": str(error)[:2000]}) + "\n")


def _replay(journal: _Journal, client: MlflowClient, uri: str, run_id: str) -> tuple[int, int]:
    """Apply the journal's unsynced events to ``run_id``; returns (applied, rejected).

    Stops (raising ``ConnectionError``) at the first failure while the server is unreachable, so the
    cursor never moves past an event that was not stored.
    """
    events, start = journal.events(), journal.synced()
    applied = rejected = 0
    for i in range(start, len(events)):
        try:
            _apply(client, run_id, events[i], root=journal.root)
            applied += 1
        except Exception as exc:  # noqa: BLE001 - classify below
            if not _server_reachable(uri, client):
                raise ConnectionError(f"tracking server {uri} unreachable during sync: {exc}") from exc
            journal.reject(events[i], exc)
            rejected += 1
            logger.warning("MLflow rejected a %s event (kept in %s): %s",
                           events[i]["kind"], journal.root / _REJECTED, exc)
        journal.set_synced(i + 1)
    return applied, rejected


def pending_offline(offline_dir: str | Path) -> int:
    """Events kept in ``offline_dir``'s journals that have not reached a server yet (0 if there is none)."""
    root = Path(offline_dir)
    if not root.is_dir():
        return 0
    roots = [root] if (root / _META).exists() else [p.parent for p in root.glob(f"*/{_META}")]
    return sum(_Journal(r).pending() for r in roots)


def sync_offline(offline_dir: str | Path, uri: str | None = None) -> list[dict]:
    """Replay every journal under ``offline_dir`` (or the journal ``offline_dir`` itself) into MLflow.

    A journal whose run exists on the server continues it; otherwise a new run is created in the
    journal's experiment with tag ``slak.offline_synced=true``. Safe to re-run: a cursor records what
    was sent. Returns one summary dict per journal.
    """
    root = Path(offline_dir)
    if not root.is_dir():
        raise ValueError(f"offline_dir={str(root)!r} is not a directory; pass the tracking.offline_dir of the job")
    roots = [root] if (root / _META).exists() else sorted(p.parent for p in root.glob(f"*/{_META}"))
    results = []
    for jroot in roots:
        journal = _Journal(jroot)
        meta = journal.meta()
        target = uri or meta["tracking_uri"]
        client = _client(target)
        summary = {"journal": str(jroot), "run_id": meta.get("run_id"), "applied": 0, "rejected": 0}
        if journal.pending() == 0:
            results.append({**summary, "pending": 0})
            continue
        run_id = meta.get("run_id")
        try:
            client.get_run(run_id) if run_id else None
        except mlflow.exceptions.MlflowException:
            run_id = None
        if run_id is None:
            tags = {**meta.get("tags", {}), "slak.offline_synced": "true", "slak.offline_journal": jroot.name}
            if meta.get("parent_run_id"):
                tags["mlflow.parentRunId"] = meta["parent_run_id"]
            if meta.get("run_id"):
                tags["slak.offline_original_run_id"] = meta["run_id"]
            exp_id = _experiment_id(client, target, meta["experiment"])
            run_id = client.create_run(exp_id, run_name=meta.get("run_name"), tags=tags).info.run_id
            journal.write_meta({**meta, "run_id": run_id, "tracking_uri": target})
        applied, rejected = _replay(journal, client, target, run_id)
        results.append({**summary, "run_id": run_id, "applied": applied, "rejected": rejected,
                        "pending": journal.pending()})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.tracking",
                                     description="Replay MLflow events kept offline by a training job.")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="send offline journals to a tracking server")
    sync.add_argument("offline_dir", help="the job's tracking.offline_dir (or one journal inside it)")
    sync.add_argument("--tracking-uri", default=None, help="target URI (default: the one the job used)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        results = sync_offline(args.offline_dir, args.tracking_uri)
    except (ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'journal':<40} {'run_id':<34} {'applied':>7} {'rejected':>8} {'pending':>7}")
    for r in results:
        print(f"{Path(r['journal']).name:<40} {str(r['run_id']):<34} {r['applied']:>7} {r['rejected']:>8} "
              f"{r['pending']:>7}")
    return 0 if all(r["pending"] == 0 for r in results) else 2
