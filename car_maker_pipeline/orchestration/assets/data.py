"""Data assets: the raw Stanford Cars source and the maker-level dataset, with their checks."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from car_maker_pipeline.data import quality
from car_maker_pipeline.data.maker_dataset import MakerDatasetParams, build_maker_dataset, load_stored_maker_dataset
from car_maker_pipeline.orchestration.resources import StanfordCarsSource, StoreResource
from car_maker_pipeline.store import CAR_MAKER_DATASET, RAW_STANFORD_CARS


class MakerDatasetConfig(dg.Config):
    validation_fraction: float = Field(
        default=0.1, gt=0.0, lt=0.5, description="Share of train carved out as validation, stratified by maker."
    )
    seed: int = Field(default=0, description="Seed of the validation split.")


@dg.asset(
    name=RAW_STANFORD_CARS,
    group_name="data",
    owners=["team:ml-platform"],
    kinds={"huggingface", "arrow"},
    description=(
        "Every split of Stanford Cars (train, test and the corrupted copies of test when present), "
        "pinned to a revision (Hub commit or local content fingerprint) and stored as Arrow. "
        "Re-materializing an unchanged source reuses the stored copy."
    ),
)
def raw_stanford_cars(
    context: dg.AssetExecutionContext, source: StanfordCarsSource, store: StoreResource
) -> dg.MaterializeResult:
    pipeline_store = store.get()
    raw = source.materialize(pipeline_store)
    pipeline_store.write_manifest(RAW_STANFORD_CARS, raw.to_json())
    context.log.info(
        f"{raw.source} at {raw.revision}: {raw.rows_per_split} ({'cache hit' if raw.cache_hit else 'stored'})"
    )
    return dg.MaterializeResult(
        metadata={
            "source": raw.source,
            "revision": raw.revision,
            "rows_per_split": dg.MetadataValue.json(raw.rows_per_split),
            "num_rows": sum(raw.rows_per_split.values()),
            "num_classes": len(raw.class_names),
            "cache_hit": raw.cache_hit,
            "path": dg.MetadataValue.path(raw.path),
        },
        data_version=dg.DataVersion(raw.revision),
    )


@dg.asset(
    name=CAR_MAKER_DATASET,
    group_name="data",
    owners=["team:ml-platform"],
    deps=[RAW_STANFORD_CARS],
    kinds={"huggingface", "arrow"},
    description=(
        "The 196 make/model/year classes collapsed to car makers (multi-word makers such as Aston Martin "
        "and Land Rover kept whole), every decodable image as RGB, undecodable ones dropped and counted, "
        "and a stratified validation split carved out of train. Test and corrupted splits are untouched."
    ),
)
def car_maker_dataset(
    context: dg.AssetExecutionContext, config: MakerDatasetConfig, store: StoreResource
) -> dg.MaterializeResult:
    pipeline_store = store.get()
    raw = pipeline_store.raw_dataset()
    params = MakerDatasetParams(validation_fraction=config.validation_fraction, seed=config.seed)
    out_dir = pipeline_store.asset_dir(CAR_MAKER_DATASET) / f"{raw.revision}-{params.fingerprint()}"
    built = load_stored_maker_dataset(out_dir) or build_maker_dataset(
        raw.load(), out_dir, params, source_revision=raw.revision
    )
    pipeline_store.write_manifest(CAR_MAKER_DATASET, built.to_json())
    context.log.info(f"{built.num_makers} makers, rows {built.rows_per_split}, dropped {built.dropped_total}")
    metadata = {
        "num_makers": built.num_makers,
        "makers": dg.MetadataValue.json(built.makers),
        "rows_per_split": dg.MetadataValue.json(built.rows_per_split),
        "dropped_count": built.dropped_total,
        "dropped_undecodable": dg.MetadataValue.json(built.dropped_undecodable),
        "dropped_bad_label": dg.MetadataValue.json(built.dropped_bad_label),
        "dropped_duplicate": dg.MetadataValue.json(built.dropped_duplicate),
        "dropped_rows": dg.MetadataValue.md(built.dropped_rows_markdown()),  # split, row, reason, detail
        "images_per_maker": dg.MetadataValue.md(built.counts_markdown()),
        "source_revision": built.source_revision,
        "cache_hit": built.cache_hit,
        "path": dg.MetadataValue.path(built.path),
    }
    metadata.update({f"rows_{split}": rows for split, rows in built.rows_per_split.items()})
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(Path(built.path).name))


MAKER_DATASET_CHECKS = {
    "no_test_leakage": (
        quality.check_no_test_leakage,
        "No test image (by decoded-pixel hash) is also in train or validation.",
    ),
    "test_makers_seen_in_train": (quality.check_test_makers_seen_in_train, "Every maker in test has training images."),
    "no_empty_split": (quality.check_no_empty_split, "No split is empty."),
    "maker_list_matches_data": (
        quality.check_maker_list_matches_data,
        "The maker label list is exactly the set of makers in the data.",
    ),
}


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(name, asset=CAR_MAKER_DATASET, blocking=True, description=description)
        for name, (_, description) in MAKER_DATASET_CHECKS.items()
    ],
)
def maker_dataset_checks(store: StoreResource):
    """All four checks in one step: the dataset is opened once and one process is spawned, not four."""
    dataset = store.get().maker_dataset().load()
    for name, (check, _) in MAKER_DATASET_CHECKS.items():
        passed, details = check(dataset)
        yield dg.AssetCheckResult(
            check_name=name,
            asset_key=dg.AssetKey(CAR_MAKER_DATASET),
            passed=passed,
            metadata={
                key: dg.MetadataValue.json(value) if isinstance(value, (list, dict)) else value
                for key, value in details.items()
            },
        )


data_assets = [raw_stanford_cars, car_maker_dataset]
data_checks = [maker_dataset_checks]
