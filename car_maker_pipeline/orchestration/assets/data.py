"""Data assets: the raw Stanford Cars source and the maker-level dataset, with its blocking checks."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from car_maker_pipeline.data import quality
from car_maker_pipeline.data.dataset_spec import MakerDatasetParams
from car_maker_pipeline.orchestration.deployment import OWNERS
from car_maker_pipeline.orchestration.metadata import typed_table
from car_maker_pipeline.orchestration.resources import StanfordCarsSource, StoreResource
from car_maker_pipeline.orchestration.versions import code_version
from car_maker_pipeline.redaction import redact_uri
from car_maker_pipeline.store import CAR_MAKER_DATASET, LABELED_ADDITIONS, RAW_STANFORD_CARS


class MakerDatasetConfig(dg.Config):
    validation_fraction: float = Field(
        default=0.1, gt=0.0, lt=0.5, description="Share of train carved out as validation, stratified by maker."
    )
    seed: int = Field(default=0, description="Seed of the validation split.")


@dg.asset(
    name=RAW_STANFORD_CARS,
    group_name="data",
    code_version=code_version(RAW_STANFORD_CARS),
    owners=OWNERS,
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
    with pipeline_store.lock(RAW_STANFORD_CARS):  # concurrent runs take turns; the second reuses the first's copy
        raw = source.materialize(pipeline_store)
        pipeline_store.write_manifest(RAW_STANFORD_CARS, raw.to_json())
    context.log.info(
        f"{redact_uri(raw.source)} at {raw.revision}: {raw.rows_per_split} "
        f"({'cache hit' if raw.cache_hit else 'stored'})"
    )
    return dg.MaterializeResult(
        metadata={
            "source": redact_uri(raw.source),
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
    code_version=code_version(CAR_MAKER_DATASET),
    owners=OWNERS,
    deps=[RAW_STANFORD_CARS, LABELED_ADDITIONS],
    kinds={"huggingface", "arrow"},
    check_specs=[
        dg.AssetCheckSpec(name, asset=CAR_MAKER_DATASET, blocking=True, description=description)
        for name, (_, description) in quality.BLOCKING_CHECKS.items()
    ],
    description=(
        "The 196 make/model/year classes collapsed to car makers (multi-word makers such as Aston Martin "
        "and Land Rover kept whole), every decodable image as RGB, undecodable ones dropped and counted, "
        "a stratified validation split carved out of train, then the accepted rows of labeled_additions joined to "
        "train or validation (column `provenance`: `source` or the batch id). Test and corrupted splits are untouched. "
        "It becomes current (what downstream assets read) only once its blocking checks pass."
    ),
)
def car_maker_dataset(context: dg.AssetExecutionContext, config: MakerDatasetConfig, store: StoreResource):
    # The checks run inside this step, before the dataset is made current: as a separate step they
    # would run after the manifest already pointed downstream assets at a dataset they then reject.
    from car_maker_pipeline.data.added_rows import before_after_table
    from car_maker_pipeline.data.promotion import build_and_promote_maker_dataset

    params = MakerDatasetParams(validation_fraction=config.validation_fraction, seed=config.seed)
    promotion = build_and_promote_maker_dataset(store.get(), params)
    check_results = [
        dg.AssetCheckResult(
            check_name=outcome.name,
            asset_key=dg.AssetKey(CAR_MAKER_DATASET),
            passed=outcome.passed,
            metadata={
                key: dg.MetadataValue.json(value) if isinstance(value, (list, dict)) else value
                for key, value in outcome.details.items()
            },
        )
        for outcome in promotion.outcomes
    ]
    if not promotion.promoted:
        yield from check_results  # recorded as failed check evaluations, then the step fails
        raise dg.Failure(description=promotion.refusal, allow_retries=False)
    built = promotion.dataset
    context.log.info(f"{built.num_makers} makers, rows {built.rows_per_split}, dropped {built.dropped_total}")
    metadata = {
        "num_makers": built.num_makers,
        "makers": dg.MetadataValue.json(built.makers),
        "rows_per_split": dg.MetadataValue.json(built.rows_per_split),
        "dropped_count": built.dropped_total,
        "dropped_undecodable": dg.MetadataValue.json(built.dropped_undecodable),
        "dropped_bad_label": dg.MetadataValue.json(built.dropped_bad_label),
        "dropped_duplicate": dg.MetadataValue.json(built.dropped_duplicate),
        "dropped_rows": typed_table(built.dropped_rows_table()),  # split, row, reason, detail
        "dropped_rows_note": built.dropped_rows_heading(),
        "images_per_maker": typed_table(built.counts_table()),
        "additions": dg.MetadataValue.json(built.additions),  # batch id, split, rows joined
        "rows_per_maker_before_after_additions": typed_table(before_after_table(built)),
        "source_revision": built.source_revision,
        "cache_hit": built.cache_hit,
        "path": dg.MetadataValue.path(built.path),
    }
    metadata.update({f"rows_{split}": rows for split, rows in built.rows_per_split.items()})
    yield dg.MaterializeResult(
        metadata=metadata, check_results=check_results, data_version=dg.DataVersion(Path(built.path).name)
    )


data_assets = [raw_stanford_cars, car_maker_dataset]
