"""Classify car images with a registered fine-tuned classifier.

    python -m car_maker_pipeline.classify car1.jpg car2.png            # the best champion of car-maker-*
    python -m car_maker_pipeline.classify --model car-maker-tiny-s car.jpg           # models:/car-maker-tiny-s@champion
    python -m car_maker_pipeline.classify --model car-maker-tiny-s --version 2 car.jpg
    python -m car_maker_pipeline.classify --model models:/car-maker-tiny-s@challenger car.jpg   # any models:/ URI
    python -m car_maker_pipeline.classify --adapter DIR car.jpg        # an adapter folder with its car_maker.json
    python -m car_maker_pipeline.classify --from-test 5                # the first 5 test images of car_maker_dataset

Prints one line per image: path, maker, probability; below the confidence threshold registered with
the model (certified on validation for a target precision), `unsure` and the three most probable
makers with their probabilities instead. A class-task model (`car-class-<model>`) answers the class, or
the maker when it is sure only of that, and says which level (`answer_text`). Before the answers, on stderr, it prints once what that
threshold promises (the registered card's certificate), or that nothing could be certified. A registered model is loaded as the MLflow
pyfunc model it was registered as, so the answers are the ones `mlflow.pyfunc.load_model` and
`mlflow models serve` give. The tracking store is MLFLOW_TRACKING_URI, or the pipeline's local
sqlite store under CAR_MAKER_HOME.

Only regular files are read (a named pipe, a device or a file over the 50 MiB limit is refused
before a byte of it is read, `serving/files.py`), every file is checked before any model loads, and
the images go to the model CHUNK_IMAGES at a time, so memory does not grow with their number.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from car_maker_pipeline.machine import heavy_imports
from car_maker_pipeline.serving.files import UnreadableFile, read_file
from car_maker_pipeline.serving.images import ImageInputError, decode_image
from car_maker_pipeline.serving.predictor import UNSURE

# Images per call of the model: one request's worth (the pyfunc model's own bound), so memory holds
# one chunk of file bytes and one batch of pixels however many files are named.
CHUNK_IMAGES = 32


class ClassifyError(RuntimeError):
    """Something the person running the command can fix; printed without a traceback."""


def check_images(paths: list[str]) -> list[int]:
    """Each file's size, after checking that it is a regular file under the size limit that decodes as an
    image by the rule the model applies (one file in memory at a time); the first that is not fails."""
    sizes = []
    for path in paths:
        try:
            data = read_file(path)
            with decode_image(data):
                pass
        except (UnreadableFile, ImageInputError) as error:
            raise ClassifyError(
                f"{path}: not a readable image ({error}). Pass a JPEG, PNG or other image file Pillow can open."
            ) from error
        sizes.append(len(data))
    return sizes


def chunks(sizes: list[int], limit_bytes: int | None = None) -> list[range]:
    """Consecutive ranges of at most CHUNK_IMAGES items and `limit_bytes` bytes (one item alone may exceed it)."""
    from car_maker_pipeline.serving.requests import MAX_REQUEST_BYTES

    limit_bytes = limit_bytes or MAX_REQUEST_BYTES
    ranges, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start == CHUNK_IMAGES or total + size > limit_bytes):
            ranges.append(range(start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        ranges.append(range(start, len(sizes)))
    return ranges


def read_chunk(paths: list[str], rows: range) -> list[bytes]:
    blobs = []
    for row in rows:
        try:
            blobs.append(read_file(paths[row]))
        except UnreadableFile as error:
            raise ClassifyError(f"{paths[row]}: changed while the images were classified ({error}).") from error
    return blobs


def test_split_images(count: int) -> tuple[list[str], Callable[[range], list[bytes]], dict[str, list[str]]]:
    """The first `count` images of the materialized car_maker_dataset's test split: names, a reader of
    PNG bytes for a range of them (encoded only when asked), and the right answers per task (the makers,
    and the class names where the dataset keeps them)."""
    from car_maker_pipeline.data.maker_dataset import MakerDataset, column
    from car_maker_pipeline.data.tasks import CLASS, MAKER
    from car_maker_pipeline.serving.images import encode_png
    from car_maker_pipeline.store import MissingUpstreamError, PipelineStore

    try:
        record = MakerDataset.current(PipelineStore.from_env())
    except MissingUpstreamError as error:
        raise ClassifyError(str(error)) from error
    test = record.load()["test"]
    rows = test.select(range(min(count, test.num_rows)))

    def encoded(chunk: range) -> list[bytes]:  # lossless: the model sees the stored pixels
        return [encode_png(image) for image in rows.select(chunk)["image"]]

    truth = {MAKER.name: column(rows, MAKER.label_column)}
    if CLASS.label_column in rows.column_names:
        truth[CLASS.name] = column(rows, CLASS.label_column)
    return [f"test[{i}]" for i in range(rows.num_rows)], encoded, truth


def model_uri(uri: str, model: str | None, version: str | None) -> str:
    """The models:/ URI to load: --model as given when it is one, else its version or champion, else the best champion."""
    from car_maker_pipeline.recording.registry import CHAMPION

    if model and model.startswith("models:/"):
        if version is not None:
            raise ClassifyError("--version goes with a registered model name, not with a models:/ URI.")
        return model
    if model:
        return f"models:/{model}/{version}" if version is not None else f"models:/{model}@{CHAMPION}"
    if version is not None:
        raise ClassifyError("--version needs --model (a registered model name such as car-maker-tiny-s).")
    return best_champion_uri(uri)


def best_champion_uri(uri: str) -> str:
    """Among the car-maker-* registered models, the champion with the best validation accuracy."""
    from mlflow import MlflowClient

    from car_maker_pipeline.recording.registry import CHAMPION, REGISTERED_MODEL_PREFIX
    from car_maker_pipeline.redaction import redact_uri

    client = MlflowClient(uri)
    champions = []
    for registered in client.search_registered_models(filter_string=f"name LIKE '{REGISTERED_MODEL_PREFIX}%'"):
        if CHAMPION in (registered.aliases or {}):
            version = client.get_model_version(registered.name, registered.aliases[CHAMPION])
            champions.append((float(version.tags.get("val_accuracy", "nan")), registered.name))
    if not champions:
        raise ClassifyError(
            f"No registered {REGISTERED_MODEL_PREFIX}* model has a @{CHAMPION} version in {redact_uri(uri)}. "
            "Materialize checkpoint_accuracy first, or pass --adapter."
        )
    return f"models:/{max(champions)[1]}@{CHAMPION}"


def describe(uri: str, tracking_uri: str) -> str:
    """`# <name> version <n> (...)` for a registry URI, for the person reading the output."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    reference = uri[len("models:/") :]
    client = MlflowClient(tracking_uri)
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = reference.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (MlflowException, ValueError):
        return f"# {uri}"
    return (
        f"# {version.name} version {version.version} ({uri}; step {version.tags.get('step')}, "
        f"val accuracy {version.tags.get('val_accuracy')})"
    )


def load_registered(uri: str, tracking_uri: str):
    """(`predict(blobs) -> DataFrame`, its task) of the registered model at `uri` (its pyfunc, or a bare
    adapter version)."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from car_maker_pipeline.redaction import redact_uri
    from car_maker_pipeline.serving.predictor import CARD_FILE, IMAGE_COLUMN

    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as error:
        raise ClassifyError(f"Cannot load {uri} from {redact_uri(tracking_uri)}: {error.message}") from error
    if (local / "MLmodel").exists():
        try:
            model = mlflow.pyfunc.load_model(str(local))
        except MlflowException as error:  # such as a version changed after registration
            raise ClassifyError(f"Cannot load {uri}: {error.message}") from error
        config = model.model_config or {}
        announce(config.get("certification"))
        return lambda blobs: model.predict(pd.DataFrame({IMAGE_COLUMN: blobs})), config.get("task", "maker")
    if (local / CARD_FILE).exists():  # a version registered before classifiers were pyfunc models
        return load_adapter(local)
    raise ClassifyError(f"{uri} is neither an MLflow model (no MLmodel) nor an adapter folder (no {CARD_FILE}).")


def load_adapter(adapter_dir: Path):
    from car_maker_pipeline.models.loading import ModelLoadError
    from car_maker_pipeline.serving.predictor import CARD_FILE, ClassifierCard, MakerPredictor

    if not (adapter_dir / CARD_FILE).exists():
        raise ClassifyError(f"{adapter_dir} has no {CARD_FILE}: it is not an adapter this pipeline registered.")
    try:
        predictor = MakerPredictor.load(ClassifierCard.read(adapter_dir), adapter_dir)
    except ModelLoadError as error:
        raise ClassifyError(str(error)) from error
    announce(predictor.card.certification)
    return predictor.predict_bytes, predictor.card.task


def announce(certification: str | None) -> None:
    """The model's promise, once, before any answer (on stderr: stdout stays one line per image)."""
    print(f"# {certification or 'no certified precision was registered with this model'}", file=sys.stderr)


def positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of images; give a whole number of 1 or more")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m car_maker_pipeline.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help="image files")
    parser.add_argument(
        "--from-test",
        type=positive_count,
        metavar="N",
        help="classify the first N images of the materialized car_maker_dataset's test split instead",
    )
    parser.add_argument(
        "--model",
        help="a registered model name (its @champion) or any models:/ URI (default: the best car-maker-* champion)",
    )
    parser.add_argument("--version", help="a version number of --model instead of its champion")
    parser.add_argument("--adapter", type=Path, help="an adapter folder (with car_maker.json) instead of the registry")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the local store)")
    args = parser.parse_args(argv)
    if not args.images and not args.from_test:
        parser.error("give image files, or --from-test N")
    truths, truth = {}, None
    try:
        if args.from_test:
            labels, read, truths = test_split_images(args.from_test)
            ranges = chunks([0] * len(labels))
        else:
            labels = args.images
            ranges = chunks(check_images(labels))  # an unreadable file fails before any model loads
            read = lambda rows: read_chunk(labels, rows)  # noqa: E731
        with heavy_imports():  # the model libraries and the model, kept for the whole command
            predict, task = load_predict(args)
        truth = truths.get(task)  # the right answer of the model's own task: a maker, or a class
        for rows in ranges:
            answers = predict(read(rows))
            for i, row in zip(rows, answers.to_dict("records")):
                print(f"{labels[i]}\t{answer_text(row)}" + (f"\ttrue: {truth[i]}" if truth else ""))
    except ClassifyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def load_predict(args):
    """(`predict(blobs)`, task) of the adapter folder or registered model the arguments name."""
    if args.adapter is not None:
        return load_adapter(args.adapter)
    from car_maker_pipeline.store import PipelineStore
    from car_maker_pipeline.tracking import TrackingUnavailableError, configured_tracking_uri, ensure_reachable

    configured = args.tracking_uri or configured_tracking_uri(PipelineStore.from_env().root)
    try:  # also takes user:password@ out of the URI, so no MLflow error below can print it
        tracking_uri = ensure_reachable(configured)
    except TrackingUnavailableError as error:
        raise ClassifyError(str(error)) from None
    uri = model_uri(tracking_uri, args.model, args.version)
    print(describe(uri, tracking_uri), file=sys.stderr)
    return load_registered(uri, tracking_uri)


def answer_text(row: dict) -> str:
    """`maker<TAB>probability`, or below the confidence threshold `unsure<TAB>(the top three and theirs)`.

    A class-task model's line says its level: `class<TAB>probability<TAB>class level` when sure of the class,
    `maker<TAB>maker level<TAB>(the top three classes and theirs)` when sure only of the maker, else unsure.
    """
    answer = row.get("answer", row["maker"])
    top = [
        (row[m], row[p])
        for m, p in (("maker", "probability"), ("maker_2", "probability_2"), ("maker_3", "probability_3"))
    ]
    runners = "(" + ", ".join(f"{name} {probability:.3f}" for name, probability in top if name) + ")"
    if answer == UNSURE:
        return f"{UNSURE}\t{runners}"
    if answer != row["maker"]:  # the class model climbed to the maker of its classes
        return f"{answer}\tmaker level\t{runners}"
    line = f"{row['maker']}\t{row['probability']:.3f}"
    return f"{line}\tclass level" if row.get("level") == "class" else line


if __name__ == "__main__":
    raise SystemExit(main())
