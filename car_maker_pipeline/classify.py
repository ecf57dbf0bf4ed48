"""Classify car images with a registered fine-tuned checkpoint.

    python -m car_maker_pipeline.classify car1.jpg car2.png            # best registered version
    python -m car_maker_pipeline.classify --model car-maker-tiny-s --version 2 car.jpg
    python -m car_maker_pipeline.classify --adapter DIR car.jpg        # a best_adapter folder
    python -m car_maker_pipeline.classify --from-test 5                # the first 5 test images of car_maker_dataset

Prints one line per image: path, maker, score. The tracking store is MLFLOW_TRACKING_URI, or the
pipeline's local sqlite store under CAR_MAKER_HOME.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ClassifyError(RuntimeError):
    """Something the person running the command can fix; printed without a traceback."""


def read_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                opened.load()
                images.append(opened.convert("RGB"))
        except FileNotFoundError as error:
            raise ClassifyError(f"{path}: no such file.") from error
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ClassifyError(
                f"{path}: not a readable image ({error}). Pass a JPEG, PNG or other image Pillow can open."
            ) from error
    return images


def test_split_images(count: int) -> tuple[list[str], list[Image.Image], list[str]]:
    """The first `count` images of the materialized car_maker_dataset's test split: names, images, true makers."""
    from car_maker_pipeline.data.maker_dataset import column
    from car_maker_pipeline.store import MissingUpstreamError, PipelineStore

    try:
        record = PipelineStore.from_env().maker_dataset()
    except MissingUpstreamError as error:
        raise ClassifyError(str(error)) from error
    test = record.load()["test"]
    rows = test.select(range(min(count, test.num_rows)))
    images = list(rows["image"])  # the classifier makes them model-ready (RGB, not too elongated)
    return [f"test[{i}]" for i in range(len(images))], images, column(rows, "maker")


def pick_version(uri: str, name: str | None, version: str | None):
    from car_maker_pipeline.evaluation.registration import registered_versions
    from car_maker_pipeline.redaction import redact_uri

    versions = registered_versions(uri, name)
    if version is not None:
        versions = [v for v in versions if str(v.version) == str(version)]
    if not versions:
        wanted = f"{name or 'car-maker-*'}" + (f" version {version}" if version else "")
        raise ClassifyError(
            f"No registered model {wanted} in {redact_uri(uri)}. Materialize checkpoint_accuracy first, "
            "or pass --adapter."
        )
    if version is not None or name is not None:
        return max(versions, key=lambda v: int(v.version))
    # The best across models, by the validation accuracy it was selected on.
    return max(versions, key=lambda v: (float(v.tags.get("val_accuracy", "nan")), int(v.version)))


def load_classifier(adapter_dir: Path, batch_size: int = 16):
    from car_maker_pipeline.evaluation.classifier import MakerClassifier
    from car_maker_pipeline.evaluation.registration import CARD_FILE
    from car_maker_pipeline.models.loading import ModelLoadError, attach_adapter, load_model_and_processor

    card_path = adapter_dir / CARD_FILE
    if not card_path.exists():
        raise ClassifyError(f"{adapter_dir} has no {CARD_FILE}: it is not an adapter this pipeline registered.")
    card = json.loads(card_path.read_text())
    try:
        loaded = load_model_and_processor(card["base_model"])
        model = attach_adapter(loaded.model, adapter_dir).eval()
    except ModelLoadError as error:
        raise ClassifyError(str(error)) from error
    return MakerClassifier(model, loaded.processor, card["makers"], batch_size=batch_size), card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m car_maker_pipeline.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help="image files")
    parser.add_argument(
        "--from-test",
        type=int,
        metavar="N",
        help="classify the first N images of the materialized car_maker_dataset's test split instead",
    )
    parser.add_argument("--model", help="registered model name (default: the best car-maker-* version)")
    parser.add_argument("--version", help="registered version (default: the latest of --model)")
    parser.add_argument("--adapter", type=Path, help="a best_adapter folder instead of the registry")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the local store)")
    args = parser.parse_args(argv)
    if not args.images and not args.from_test:
        parser.error("give image files, or --from-test N")
    truth: list[str] | None = None
    try:
        if args.from_test:
            labels, images, truth = test_split_images(args.from_test)
        else:
            labels, images = args.images, read_images(args.images)  # an unreadable file fails before any model loads
        adapter_dir = args.adapter
        if adapter_dir is None:
            import mlflow

            from car_maker_pipeline.store import PipelineStore
            from car_maker_pipeline.tracking import TrackingUnavailableError, configured_tracking_uri, ensure_reachable

            try:  # also takes user:password@ out of the URI, so no MLflow error below can print it
                uri = ensure_reachable(args.tracking_uri or configured_tracking_uri(PipelineStore.from_env().root))
            except TrackingUnavailableError as error:
                raise ClassifyError(str(error)) from None
            chosen = pick_version(uri, args.model, args.version)
            mlflow.set_tracking_uri(uri)
            adapter_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=chosen.source))
            print(
                f"# {chosen.name} version {chosen.version} (step {chosen.tags.get('step')}, "
                f"val accuracy {chosen.tags.get('val_accuracy')})",
                file=sys.stderr,
            )
        classifier, _ = load_classifier(adapter_dir)
    except ClassifyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for i, (label, prediction) in enumerate(zip(labels, classifier.classify(images))):
        print(f"{label}\t{prediction.maker}\t{prediction.score:.3f}" + (f"\ttrue: {truth[i]}" if truth else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
