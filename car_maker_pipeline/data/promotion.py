"""car_maker_dataset becomes current only once its blocking checks pass.

Downstream assets (baseline_evaluation, lora_checkpoints, checkpoint_accuracy) read the dataset
through the store's manifest. Were the manifest written before the checks ran, a dataset that leaks
test images into train would be scored and trained on although its run failed; so building,
checking and promoting happen in one step here. A refused build leaves the previous dataset
current, and the store records why (`PipelineStore.record_rejection`).
"""

from __future__ import annotations

from dataclasses import dataclass

from car_maker_pipeline.data.added_rows import additions_digest, current_added_batches
from car_maker_pipeline.data.maker_dataset import (
    MakerDataset,
    MakerDatasetError,
    MakerDatasetParams,
    build_maker_dataset,
    load_stored_maker_dataset,
)
from car_maker_pipeline.data.quality import CheckOutcome, run_checks
from car_maker_pipeline.data.source import RawDataset
from car_maker_pipeline.store import CAR_MAKER_DATASET, MissingUpstreamError, PipelineStore


@dataclass(frozen=True)
class Promotion:
    dataset: MakerDataset
    outcomes: list[CheckOutcome]
    promoted: bool
    refusal: str = ""  # why it was not made current and what stays current; empty when promoted


def build_and_promote_maker_dataset(store: PipelineStore, params: MakerDatasetParams) -> Promotion:
    """Build (or reuse) the maker dataset of the current raw source, check it, and make it current if all pass.

    Concurrent runs take turns (`store.lock`): a second run finds the first's finished folder and
    reuses it instead of writing the same folder again under a reader's feet.
    """
    raw = RawDataset.current(store)
    added = current_added_batches(store)
    # The folder, and so the data version, names the source revision, the parameters and the added batches.
    suffix = f"-add-{additions_digest(added)}" if added else ""
    out_dir = store.asset_dir(CAR_MAKER_DATASET) / f"{raw.revision}-{params.fingerprint()}{suffix}"
    with store.lock(CAR_MAKER_DATASET):
        try:
            built = load_stored_maker_dataset(out_dir) or build_maker_dataset(
                raw.load(), out_dir, params, source_revision=raw.revision, additions=added
            )
        except MakerDatasetError as error:
            reason = f"The build from source revision {raw.revision} failed: {error}"
            store.record_rejection(CAR_MAKER_DATASET, reason, source_revision=raw.revision)
            raise MakerDatasetError(f"{reason} {_what_stays_current(store)}") from error
        return promote_if_checks_pass(store, built)


def promote_if_checks_pass(store: PipelineStore, built: MakerDataset) -> Promotion:
    """Run every blocking check on a built dataset; only a dataset passing all of them becomes current."""
    outcomes = run_checks(built.load())
    failed = [outcome for outcome in outcomes if not outcome.passed]
    if not failed:
        store.write_manifest(CAR_MAKER_DATASET, built.to_json())
        return Promotion(built, outcomes, promoted=True)
    reason = (
        f"The dataset built at {built.path} failed its blocking check(s) "
        f"{'; '.join(outcome.summary() for outcome in failed)}, so it was not made current."
    )
    store.record_rejection(
        CAR_MAKER_DATASET, reason, path=built.path, failed_checks=[outcome.name for outcome in failed]
    )
    return Promotion(built, outcomes, promoted=False, refusal=f"{reason} {_what_stays_current(store)}")


def _what_stays_current(store: PipelineStore) -> str:
    try:
        current = MakerDataset.current(store)
    except MissingUpstreamError:
        return (
            "No earlier build passed its checks, so no dataset is current and the assets reading it "
            "(baseline_evaluation, lora_checkpoints) will not run. Fix the source, then materialize "
            "car_maker_dataset again."
        )
    return (
        f"The previous dataset {current.path} (source revision {current.source_revision}) remains current; "
        "the assets reading it keep using it. Fix the source, then materialize car_maker_dataset again."
    )
