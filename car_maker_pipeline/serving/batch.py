"""Batch predictions over a folder of incoming images, for other pipelines to consume.

Every entry of the folder but subfolders and hidden files (such as a copy still under a temporary
name) gets one row: the classifier's answer (a maker, or "unsure" below the registered confidence
threshold), the most probable makers with their probabilities, or, when it cannot be classified,
the reason in `error`. One bad file never fails the batch and is never dropped silently: a named
pipe, a device, a socket, a link out of the folder, a file over the size limit and a name that is
not UTF-8 are listed as refused without being read (`files.py`). A folder snapshot (names, sizes,
modification times) fingerprints the file set, so a sensor can launch one run per new set.

Files are read a batch at a time (at most `batch_size` files and MAX_REQUEST_BYTES of them), and
the model decodes one batch of pixels at a time, so memory holds one batch whatever the number of files.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from car_maker_pipeline.serving.files import Folder, UnreadableFile, display_name
from car_maker_pipeline.serving.images import ImageInputError, check_header
from car_maker_pipeline.serving.predictor import OUTPUT_COLUMNS
from car_maker_pipeline.serving.requests import MAX_REQUEST_BYTES
from car_maker_pipeline.storage import atomic_directory

INCOMING_FOLDER = "incoming_images"  # under CAR_MAKER_HOME unless configured otherwise
PREDICTION_COLUMNS = ["file_name", *OUTPUT_COLUMNS, "model_name", "model_version", "error"]
SETTLE_SECONDS = 30.0  # a file modified more recently may still be being copied in


@dataclass(frozen=True)
class FolderSnapshot:
    folder: Path
    files: tuple[str, ...]  # names, sorted
    fingerprint: str  # of names, sizes and modification times: a changed, added or removed file changes it
    newest_mtime: float

    def settling(self, now: float | None = None, settle_seconds: float = SETTLE_SECONDS) -> bool:
        """True while a file was modified within `settle_seconds`: wait for copies to finish."""
        return bool(self.files) and (now if now is not None else time.time()) - self.newest_mtime < settle_seconds


def snapshot(folder: Path) -> FolderSnapshot:
    """The folder's entries (names as the OS gives them; not followed, not opened) but subfolders and hidden ones."""
    digest = hashlib.sha256()
    files, newest = [], 0.0
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: os.fsencode(entry.name))
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed since the listing
            continue
        if entry.name.startswith(".") or stat.S_ISDIR(info.st_mode):
            continue
        digest.update(os.fsencode(entry.name) + f"\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        files.append(entry.name)
        newest = max(newest, info.st_mtime)
    return FolderSnapshot(Path(folder), tuple(files), "files-" + digest.hexdigest()[:16], newest)


def _read(folder: Folder, name: str) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None) when it is a regular file whose header is a usable image's, else (None, why)."""
    try:
        data = folder.read(name)
        check_header(data)  # the whole image is decoded by the model, one batch at a time
        return data, None
    except (UnreadableFile, ImageInputError) as error:
        return None, str(error)


def classify_folder(
    predict: Callable[[list[bytes]], pd.DataFrame],
    folder: Path,
    files: Sequence[str],
    *,
    model_name: str,
    model_version: str,
    batch_size: int = 32,
) -> pd.DataFrame:
    """One row per file of `files` (names in `folder`), in that order, in PREDICTION_COLUMNS.

    `predict` takes encoded images and returns `maker` and `probability` per image (the pyfunc model's
    contract). Files are read and classified a batch at a time. A batch that fails as a whole is
    retried image by image, so a failure stays with the image that caused it; when the model fails
    on every readable image, the model is what is broken and its error is raised instead.
    """
    try:
        opened = Folder(folder)
    except OSError as error:  # gone, or no folder, since it was listed: every file says so
        problem = f"the folder cannot be opened ({type(error).__name__}: {error.strerror or error})"
        return _table(files, {name: _failed(problem) for name in files}, model_name, model_version)
    rows: dict[str, dict] = {}
    failures: list[Exception] = []
    with opened:
        sent = _classify_batches(predict, opened, files, batch_size, rows, failures)
    if sent and len(failures) == sent:
        raise failures[0]
    return _table(files, rows, model_name, model_version)


def _classify_batches(predict, opened: Folder, files, batch_size: int, rows: dict, failures: list) -> int:
    """Read and classify `files` a batch at a time into `rows`; returns how many went to the model."""
    sent, chunk = 0, []
    for name in files:
        if len(chunk) == batch_size:  # classified before the next file is read, not beside it
            rows.update(_predict_chunk(predict, chunk, failures))
            chunk = []
        data, problem = _read(opened, name)
        if problem is not None:
            rows[name] = _failed(problem)
            continue
        if chunk and sum(len(blob) for _, blob in chunk) + len(data) > MAX_REQUEST_BYTES:
            rows.update(_predict_chunk(predict, chunk, failures))
            chunk = []
        chunk.append((name, data))
        sent += 1
    if chunk:
        rows.update(_predict_chunk(predict, chunk, failures))
    return sent


def _table(files, rows: dict, model_name: str, model_version: str) -> pd.DataFrame:
    frame = pd.DataFrame(
        [
            {"file_name": display_name(name), **rows[name], "model_name": model_name, "model_version": model_version}
            for name in files
        ],
        columns=PREDICTION_COLUMNS,
    )
    return frame.astype({"probability": "float64"})


@dataclass(frozen=True)
class BatchPredictions:
    path: str  # the parquet
    folder: str
    fingerprint: str  # of the file set classified (FolderSnapshot.fingerprint)
    files: int
    unreadable: int
    model: str  # <registered name>/<version>
    table: pd.DataFrame = field(repr=False, compare=False)

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "table"}


def predict_folder(
    load_predict: Callable[[], Callable[[list[bytes]], pd.DataFrame]],
    folder: Path,
    out_root: Path,
    *,
    model_name: str,
    model_version: str,
) -> BatchPredictions:
    """Classify the files in `folder` now and write `<out_root>/<fingerprint>/predictions.parquet`.

    `load_predict` is called only when there is a file to classify (an empty folder gives an empty table).
    """
    seen = snapshot(folder)
    predict = load_predict() if seen.files else None
    table = classify_folder(predict, folder, seen.files, model_name=model_name, model_version=model_version)
    out_dir = out_root / seen.fingerprint
    with atomic_directory(out_dir) as tmp:
        table.to_parquet(tmp / "predictions.parquet", index=False)
    return BatchPredictions(
        path=str(out_dir / "predictions.parquet"),
        folder=str(folder),
        fingerprint=seen.fingerprint,
        files=len(table),
        unreadable=int(table["error"].notna().sum()),
        model=f"{model_name}/{model_version}",
        table=table,
    )


def _failed(reason: str) -> dict:
    return {
        **{column: float("nan") if column.startswith("probability") else None for column in OUTPUT_COLUMNS},
        "error": reason,
    }


def _refused_input(error: Exception) -> str | None:
    """The reason when `predict` refused the image itself (MLflow's INVALID_PARAMETER_VALUE), not failed on it."""
    if isinstance(error, ImageInputError):
        return str(error)
    if getattr(error, "error_code", None) == "INVALID_PARAMETER_VALUE":
        return re.sub(r"^Unusable image in the request: row \d+(?: \(index [^)]*\))?: ", "", error.message)
    return None


def _predict_chunk(predict, chunk: list[tuple[str, bytes]], failures: list[Exception]) -> dict[str, dict]:
    try:
        answers = predict([blob for _, blob in chunk])
        rows = answers.to_dict("records")
        return {name: {**{c: row.get(c) for c in OUTPUT_COLUMNS}, "error": None} for (name, _), row in zip(chunk, rows)}
    except Exception as error:
        if len(chunk) == 1:
            refused = _refused_input(error)
            if refused is not None:
                return {chunk[0][0]: _failed(refused[:500])}
            failures.append(error)
            return {chunk[0][0]: _failed(f"the model failed on this image: {error}"[:500])}
    results = {}
    for name, blob in chunk:
        results.update(_predict_chunk(predict, [(name, blob)], failures))
    return results


def write_demo_images(folder: Path, dataset_record, count: int = 8) -> list[str]:
    """Seed an empty incoming folder with `count` test images and one cut-off JPEG (to show a reason row).

    A folder that already holds files is left alone: they are someone's incoming images.
    """
    if snapshot(folder).files:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    test = dataset_record.load()["test"]
    written = []
    for index in range(min(count, test.num_rows)):
        name = f"test-{index:03d}.jpg"
        test[index]["image"].convert("RGB").save(folder / name, format="JPEG", quality=95)
        written.append(name)
    if written:
        whole = (folder / written[0]).read_bytes()
        (folder / "cut-off-upload.jpg").write_bytes(whole[: len(whole) // 2])
        written.append("cut-off-upload.jpg")
    return written
