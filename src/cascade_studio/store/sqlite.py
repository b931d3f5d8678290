"""The history store: SQLite (WAL) for records, PNG files (written atomically) under the output directory.

One store serves the studio, the CLI's server and the HTTP API, so a generation made anywhere shows up everywhere.
Paths never come from requests: file names are built from generated ids and seeds only.

Every write that fails (a read-only or full disk, a full database) raises `StoreError`, which names what could
not be written and why; the job queue fails that one job with it and reports the fault in its health.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from pydantic import BaseModel

from ..engine import GenerationRequest, GenerationResult
from ..engine.inputs import Picture
from ..metadata import ImageMetadata, save_png, write_atomically
from ..models import ModelIdentity

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created REAL NOT NULL, finished REAL, status TEXT NOT NULL, client TEXT NOT NULL,
    request TEXT NOT NULL, model TEXT NOT NULL, timings TEXT, prior_cached INTEGER, error TEXT
);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, seed INTEGER NOT NULL,
    path TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, created REAL NOT NULL, finished REAL, status TEXT NOT NULL,
    client TEXT NOT NULL, spec TEXT NOT NULL, result TEXT, error TEXT, traceback TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created DESC);
CREATE INDEX IF NOT EXISTS images_job ON images(job_id, idx);
"""
# Columns added after the first release; an older database gains them when it is opened.
LATER_COLUMNS = {"jobs": {"traceback": "TEXT", "warnings": "TEXT"}}
ACTIVE = ("queued", "running")
INTERRUPTED = "interrupted: the server stopped before this job finished"
# What save_result names its files: <day>/<first 12 of the job id>-<index>-<seed>.png
INPUTS = "inputs"  # input pictures, content-addressed: inputs/<sha256>.png
IMAGE_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}/[0-9a-f]{12}-\d+-\d+\.png$")


class StoreError(RuntimeError):
    """A write to the history (database or image file) failed; the message says which and why."""

    def __init__(self, what: str, exc: BaseException):
        super().__init__(f"{what}: {exc}")
        self.what = what  # "database" or "images"


class TaskRecord(BaseModel):
    """A job that is not a generation (a model switch, a LoRA training), as the store keeps it."""

    id: str
    kind: str
    created: float
    finished: float | None
    status: str
    client: str
    spec: dict
    result: dict | None
    error: str | None
    traceback: str | None = None


class ImageRecord(BaseModel):
    id: str
    job_id: str
    index: int
    seed: int
    path: Path


class JobRecord(BaseModel):
    id: str
    created: float
    finished: float | None
    status: str  # queued, running, done, failed, cancelled
    client: str
    request: GenerationRequest
    model: ModelIdentity
    timings: dict[str, float] | None
    prior_cached: bool | None
    error: str | None
    traceback: str | None = None
    warnings: list[str] = []
    images: list[ImageRecord] = []


def picture_path(output_dir: Path, sha256: str) -> Path:
    """Where an output folder keeps an input picture: <output_dir>/inputs/<sha256>.png."""
    return Path(output_dir) / INPUTS / f"{sha256}.png"


def keep_picture(output_dir: Path, picture: Picture) -> Path:
    """Write an input picture at its picture_path, atomically; the same picture twice is one file (the studio's
    store and the CLI's output folder keep them alike, so `reproduce` finds them)."""
    path = picture_path(output_dir, picture.sha256)
    return path if path.is_file() else write_atomically(path, lambda f: f.write(picture.png))


def find_pictures(hashes: list[str], folders: list[Path]) -> dict[str, Image.Image]:
    """The pictures of these hashes found in any of the folders (<sha256>.png), read whole."""
    out = {}
    for sha in hashes:
        path = next((f / f"{sha}.png" for f in folders if (f / f"{sha}.png").is_file()), None)
        if path is not None:
            with Image.open(path) as image:
                image.load()
                out[sha] = image
    return out


def new_id() -> str:
    return uuid.uuid4().hex


class HistoryStore:
    def __init__(self, db_path: Path, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.db_path = Path(db_path)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            for table, columns in LATER_COLUMNS.items():
                have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns.items():
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        self.recovered = self._fail_interrupted()
        self.removed = self._remove_leftovers()

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The database under the lock; any SQLite failure (disk full, read-only) becomes a StoreError."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite rolls back by itself when a statement of the transaction failed
                raise StoreError("database", exc) from exc

    def _fail_interrupted(self) -> int:
        """Jobs a crash left queued or running are marked failed: never silently lost, never 'running' forever."""
        count = 0
        with self._writing() as db:
            for table in ("jobs", "tasks"):
                sql = f"UPDATE {table} SET status='failed', error=?, finished=? WHERE status IN (?, ?)"
                count += db.execute(sql, (INTERRUPTED, time.time(), *ACTIVE)).rowcount
        return count

    def _remove_leftovers(self) -> list[Path]:
        """Files a crash left: temporary PNGs of an unfinished write, and images of jobs whose result was never
        recorded (the process died between writing the files and the database). Only names this store writes
        are considered, so other files in the output folder (the CLI's, the user's) are never touched."""
        with self._lock:
            known = {row["path"] for row in self._db.execute("SELECT path FROM images")}
        removed = []
        for path in self.output_dir.rglob("*.png"):
            relative = path.relative_to(self.output_dir).as_posix()
            if path.name.startswith(".tmp-") or (IMAGE_NAME.match(relative) and relative not in known):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError as exc:
                    log.warning("could not remove %s left by an earlier crash: %s", path, exc)
        if removed:
            log.info(
                "removed %d file(s) an earlier crash left unfinished: %s",
                len(removed),
                ", ".join(str(p.relative_to(self.output_dir)) for p in removed[:10]),
            )
        return removed

    def create_job(self, job_id: str, request: GenerationRequest, model: ModelIdentity, client: str) -> None:
        with self._writing() as db:
            db.execute(
                "INSERT INTO jobs (id, created, status, client, request, model) VALUES (?, ?, 'queued', ?, ?, ?)",
                (job_id, time.time(), client, request.model_dump_json(), model.model_dump_json()),
            )

    def set_status(
        self,
        job_id: str,
        status: str,
        error: str | None = None,
        traceback: str | None = None,
        model: ModelIdentity | None = None,
    ) -> None:
        finished = None if status in ACTIVE else time.time()
        with self._writing() as db:
            db.execute(
                "UPDATE jobs SET status=?, error=?, traceback=?, finished=? WHERE id=?",
                (status, error, traceback, finished, job_id),
            )
            if model is not None:
                db.execute("UPDATE jobs SET model=? WHERE id=?", (model.model_dump_json(), job_id))

    def save_result(self, job_id: str, result: GenerationResult) -> list[ImageRecord]:
        """Write every image (PNG with metadata, atomically), then record them and mark the job done. If any write
        fails, the images already written are removed again: a job is stored whole or not at all."""
        day = time.strftime("%Y-%m-%d")
        records: list[ImageRecord] = []
        try:
            for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
                relative = Path(day) / f"{job_id[:12]}-{i}-{seed}.png"
                save_png(image, self.output_dir / relative, ImageMetadata(result.request, i, result.model))
                records.append(ImageRecord(id=new_id(), job_id=job_id, index=i, seed=seed, path=relative))
        except OSError as exc:
            self._unlink(records)
            raise StoreError("images", exc) from exc
        try:
            with self._writing() as db:
                db.execute("BEGIN")
                db.executemany(
                    "INSERT INTO images (id, job_id, idx, seed, path, created) VALUES (?, ?, ?, ?, ?, ?)",
                    [(r.id, job_id, r.index, r.seed, r.path.as_posix(), time.time()) for r in records],
                )
                db.execute(
                    "UPDATE jobs SET status='done', finished=?, request=?, timings=?, prior_cached=?, "
                    "warnings=? WHERE id=?",
                    (
                        time.time(),
                        result.request.model_dump_json(),
                        json.dumps(result.timings),
                        int(result.prior_cached),
                        json.dumps(result.warnings),
                        job_id,
                    ),
                )
                db.execute("COMMIT")
        except StoreError:
            self._unlink(records)
            raise
        return records

    def save_picture(self, picture: Picture) -> str:
        """Keep an input picture (init image, mask, image prompt) under its hash; returns the hash a request names
        it by."""
        try:
            keep_picture(self.output_dir, picture)
        except OSError as exc:
            raise StoreError("images", exc) from exc
        return picture.sha256

    def picture_file(self, sha256: str) -> Path:
        return picture_path(self.output_dir, sha256)

    def pictures(self, hashes: list[str]) -> dict[str, Image.Image]:
        """The stored input pictures of these hashes (those on disk; the engine names any missing one)."""
        return find_pictures(hashes, [self.output_dir / INPUTS])

    def _unlink(self, records: list[ImageRecord]) -> None:
        for record in records:
            self.image_file(record).unlink(missing_ok=True)

    def create_task(self, task_id: str, kind: str, spec: dict, client: str) -> None:
        with self._writing() as db:
            db.execute(
                "INSERT INTO tasks (id, kind, created, status, client, spec) VALUES (?, ?, ?, 'queued', ?, ?)",
                (task_id, kind, time.time(), client, json.dumps(spec)),
            )

    def set_task_status(
        self,
        task_id: str,
        status: str,
        result: dict | None = None,
        error: str | None = None,
        traceback: str | None = None,
    ) -> None:
        finished = None if status in ACTIVE else time.time()
        result_json = json.dumps(result) if result is not None else None
        with self._writing() as db:
            db.execute(
                "UPDATE tasks SET status=?, result=?, error=?, traceback=?, finished=? WHERE id=?",
                (status, result_json, error, traceback, finished, task_id),
            )

    def get_task(self, task_id: str) -> TaskRecord | None:
        tasks = self._tasks("WHERE id=?", (task_id,))
        return tasks[0] if tasks else None

    def list_tasks(self, kind: str, limit: int = 50) -> list[TaskRecord]:
        """Newest first."""
        return self._tasks("WHERE kind=? ORDER BY created DESC LIMIT ?", (kind, limit))

    def _tasks(self, clause: str, args: tuple) -> list[TaskRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM tasks {clause}", args).fetchall()
        return [
            TaskRecord(
                id=r["id"],
                kind=r["kind"],
                created=r["created"],
                finished=r["finished"],
                status=r["status"],
                client=r["client"],
                spec=json.loads(r["spec"]),
                result=json.loads(r["result"]) if r["result"] else None,
                error=r["error"],
                traceback=r["traceback"],
            )
            for r in rows
        ]

    def image_file(self, record: ImageRecord) -> Path:
        return self.output_dir / record.path

    def job_ids_starting(self, prefix: str, limit: int = 2) -> list[str]:
        """Ids that start with `prefix` (hex only): the studio shows a job's first 8 characters."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE id >= ? AND id < ? LIMIT ?", (prefix, prefix + "g", limit)
            ).fetchall()
        return [row["id"] for row in rows]

    def get_job(self, job_id: str) -> JobRecord | None:
        jobs = self._jobs("WHERE id=?", (job_id,))
        return jobs[0] if jobs else None

    def list_jobs(
        self, limit: int = 20, offset: int = 0, status: str | None = "done", search: str = ""
    ) -> list[JobRecord]:
        """Newest first; `search` keeps jobs whose prompt contains it (any case)."""
        where, args = self._where(status, search)
        return self._jobs(f"{where} ORDER BY created DESC LIMIT ? OFFSET ?", (*args, limit, offset))

    def count_jobs(self, status: str | None = "done", search: str = "") -> int:
        where, args = self._where(status, search)
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]

    @staticmethod
    def _where(status: str | None, search: str) -> tuple[str, tuple]:
        clauses, args = [], []
        if status:
            clauses.append("status=?")
            args.append(status)
        if search:
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append("json_extract(request, '$.prompt') LIKE ? ESCAPE '\\'")
            args.append(f"%{escaped}%")
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)

    def delete_job(self, job_id: str) -> int:
        """Remove a finished job, its image records and its files; returns how many files were removed."""
        record = self.get_job(job_id)
        if record is None or record.status in ACTIVE:
            return 0
        with self._writing() as db:
            db.execute("BEGIN")
            db.execute("DELETE FROM images WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            db.execute("COMMIT")
        removed = 0
        for image in record.images:
            path = self.image_file(image)
            if path.is_file():
                path.unlink()
                removed += 1
        return removed

    def export_zip(self, target: Path, search: str = "") -> int:
        """Every finished image (or those whose prompt matches `search`) into one zip, newest first, each PNG with its
        metadata; returns how many images it holds."""
        import zipfile

        count, offset = 0, 0
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            while jobs := self.list_jobs(limit=200, offset=offset, search=search):
                for job in jobs:
                    for image in job.images:
                        path = self.image_file(image)
                        if path.is_file():
                            archive.write(path, image.path.as_posix())
                            count += 1
                offset += len(jobs)
        return count

    def get_image(self, image_id: str) -> ImageRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE id=?", (image_id,)).fetchone()
        return self._image(row) if row else None

    @staticmethod
    def _image(row: sqlite3.Row) -> ImageRecord:
        return ImageRecord(
            id=row["id"], job_id=row["job_id"], index=row["idx"], seed=row["seed"], path=Path(row["path"])
        )

    def _jobs(self, clause: str, args: tuple) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs {clause}", args).fetchall()
            ids = [r["id"] for r in rows]
            images = (
                self._db.execute(
                    f"SELECT * FROM images WHERE job_id IN ({','.join('?' * len(ids))}) ORDER BY idx", ids
                ).fetchall()
                if ids
                else []
            )
        by_job: dict[str, list[ImageRecord]] = {}
        for row in images:
            by_job.setdefault(row["job_id"], []).append(self._image(row))
        return [
            JobRecord(
                id=r["id"],
                created=r["created"],
                finished=r["finished"],
                status=r["status"],
                client=r["client"],
                request=GenerationRequest(**json.loads(r["request"])),
                model=ModelIdentity(**json.loads(r["model"])),
                timings=json.loads(r["timings"]) if r["timings"] else None,
                prior_cached=None if r["prior_cached"] is None else bool(r["prior_cached"]),
                error=r["error"],
                traceback=r["traceback"],
                warnings=json.loads(r["warnings"] or "[]"),
                images=by_job.get(r["id"], []),
            )
            for r in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
