"""review_queue: the incoming images a model doubts most, ranked for a person to label.

Order: every image the champion answered `unsure` first, then the others; within each, by the
acquisition score, highest first:

    score = (1 - margin) * rarity,   margin = p(top maker) - p(second maker),
    rarity = sqrt(most training images of any maker / training images of the top maker)

`1 - margin` is margin sampling: an image whose two best makers are nearly tied is the one a label
moves the model most on. `rarity` (1 for the commonest maker, larger for rare ones) weights up the
images the model calls a rare maker, whose labels are scarcest. Unreadable files are left out.

Written three ways into one folder: `tasks.json` (Label Studio tasks, image inline, the model's top
maker pre-filled as a prediction, to import with `label_config.xml`), `queue.csv` with the scores,
and `contact_sheet.png`. A reviewed Label Studio export dropped into the additions folder is a batch;
so is the `spreadsheet/` subfolder (queue images and a `path,label` CSV) once its label column is filled.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from car_maker_pipeline.data.decoding import Refusal, decode_checked
from car_maker_pipeline.labeling import label_studio
from car_maker_pipeline.serving.files import Folder, UnreadableFile
from car_maker_pipeline.serving.predictor import UNSURE
from car_maker_pipeline.storage import atomic_directory, write_json_atomic

QUEUE_COLUMNS = [
    "rank",
    "file_name",
    "answer",
    "maker",
    "probability",
    "maker_2",
    "probability_2",
    "margin",
    "rarity",
    "score",
]
TASKS_FILE, CONFIG_FILE, CSV_FILE, SHEET_FILE = "tasks.json", "label_config.xml", "queue.csv", "contact_sheet.png"
SPREADSHEET = "spreadsheet"  # a ready CSV batch: images/ and labels.csv with an empty label column
SHEET_COLUMNS, THUMBNAIL = 6, 128  # pixels per thumbnail side in the contact sheet


@dataclass(frozen=True)
class ReviewQueue:
    path: str
    model: str  # <registered name>/<version>
    predictions: str  # the maker_predictions parquet it ranks
    queued: int
    unsure: int
    candidates: int  # classified images it chose from

    def to_json(self) -> dict:
        return asdict(self)


def rank(predictions: pd.DataFrame, train_counts: dict[str, int]) -> pd.DataFrame:
    """The classified rows of a maker_predictions table in review order, with margin, rarity and score."""
    table = predictions[predictions["error"].isna() & predictions["maker"].notna()].copy()
    top = max(train_counts.values(), default=1)
    table["margin"] = table["probability"] - table["probability_2"].fillna(0.0)
    table["rarity"] = [math.sqrt(top / max(train_counts.get(maker, 0), 1)) for maker in table["maker"]]
    table["score"] = (1.0 - table["margin"]) * table["rarity"]
    table["unsure_first"] = table["answer"] != UNSURE
    table = table.sort_values(["unsure_first", "score", "file_name"], ascending=[True, False, True], kind="stable")
    table["rank"] = range(1, len(table) + 1)
    return table[QUEUE_COLUMNS].reset_index(drop=True)


def write_review_queue(
    predictions: pd.DataFrame,
    incoming: Path,
    out_dir: Path,
    *,
    train_counts: dict[str, int],
    makers: list[str],
    model: str,
    predictions_path: str,
    max_items: int = 50,
) -> ReviewQueue:
    """Rank `predictions`, keep the first `max_items` whose files are still readable, and write the queue."""
    ranked = rank(predictions, train_counts)
    rows, images = [], []
    with Folder(incoming) as folder:
        for row in ranked.itertuples(index=False):
            if len(rows) == max_items:
                break
            try:
                decoded = decode_checked(folder.read(row.file_name))
            except UnreadableFile:
                continue
            if isinstance(decoded, Refusal):
                continue
            rows.append(row._asdict())
            images.append(decoded[0])
    queue = pd.DataFrame(rows, columns=QUEUE_COLUMNS)
    queue["rank"] = range(1, len(queue) + 1)
    with atomic_directory(out_dir) as tmp:
        tasks = [
            label_studio.task(
                label_studio.data_uri(data, _mime(data)),
                {"file_name": row["file_name"], "rank": row["rank"], "score": round(row["score"], 4)},
                row["maker"],
                row["probability"],
                model,
            )
            for row, data in zip(queue.to_dict("records"), images)
        ]
        write_json_atomic(tmp / TASKS_FILE, tasks)
        (tmp / CONFIG_FILE).write_text(label_studio.label_config(makers))
        queue.to_csv(tmp / CSV_FILE, index=False)
        _spreadsheet_batch(tmp / SPREADSHEET, queue, images)
        contact_sheet(queue, images).save(tmp / SHEET_FILE)
    return ReviewQueue(
        path=str(out_dir),
        model=model,
        predictions=predictions_path,
        queued=len(queue),
        unsure=int((queue["answer"] == UNSURE).sum()),
        candidates=len(ranked),
    )


def _mime(data: bytes) -> str:
    return "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"


def _spreadsheet_batch(folder: Path, queue: pd.DataFrame, images: list[bytes]) -> None:
    (folder / "images").mkdir(parents=True)
    paths = []
    for row, data in zip(queue.itertuples(index=False), images):
        name = f"{row.rank:04d}{'.jpg' if _mime(data) == 'image/jpeg' else '.png'}"
        (folder / "images" / name).write_bytes(data)
        paths.append(f"images/{name}")
    sheet = pd.DataFrame({"path": paths, "label": "", "suggestion": queue["maker"], "file_name": queue["file_name"]})
    sheet.to_csv(folder / "labels.csv", index=False)


def contact_sheet(queue: pd.DataFrame, images: list[bytes]) -> Image.Image:
    """Thumbnails in review order, each captioned with its rank, the model's answer and its probability."""
    count = max(len(images), 1)
    rows = math.ceil(count / SHEET_COLUMNS)
    cell = THUMBNAIL + 28
    sheet = Image.new("RGB", (min(count, SHEET_COLUMNS) * THUMBNAIL, rows * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for position, (row, data) in enumerate(zip(queue.itertuples(index=False), images)):
        x, y = (position % SHEET_COLUMNS) * THUMBNAIL, (position // SHEET_COLUMNS) * cell
        with Image.open(io.BytesIO(data)) as picture:
            picture = picture.convert("RGB")
            picture.thumbnail((THUMBNAIL - 4, THUMBNAIL - 4))
            sheet.paste(picture, (x + 2, y + 2))
        draw.text((x + 2, y + THUMBNAIL), f"#{row.rank} {row.answer}", fill="black")
        draw.text((x + 2, y + THUMBNAIL + 13), f"{row.maker} {row.probability:.2f}", fill="dimgray")
    return sheet
