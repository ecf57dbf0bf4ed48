"""What this Dagster instance knows of an earlier run: whether it can still go on, and whether its step
completed a given asset partition. The recording layer asks before it cleans up after killed steps
(`tracking.delete_orphaned_runs`), without importing Dagster itself."""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg

from car_maker_pipeline.tracking import COMMITTED, FINISHED, RUNNING, UNKNOWN

_MATERIALIZED, _SUCCEEDED = dg.DagsterEventType.ASSET_MATERIALIZATION, dg.DagsterEventType.STEP_SUCCESS


def completed(instance: dg.DagsterInstance, run_id: str, asset_key: dg.AssetKey, partition: str | None) -> bool:
    """Whether a step of run `run_id` materialized `asset_key` (`partition`, when partitioned) and then
    succeeded. A step killed (or failed) after Dagster stored its materialization did not: Dagster's
    retry from failure executes it again, and that execution's record supersedes the attempt's."""
    records = instance.get_records_for_run(run_id, of_type={_MATERIALIZED, _SUCCEEDED}).records
    steps = {
        record.event_log_entry.step_key
        for record in records
        if record.event_log_entry.dagster_event_type == _MATERIALIZED
        and record.asset_key == asset_key
        and record.partition_key == partition
    }
    return any(
        record.event_log_entry.dagster_event_type == _SUCCEEDED and record.event_log_entry.step_key in steps
        for record in records
    )


def run_status(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None
) -> Callable[[str | None], str]:
    """`status_of` for `delete_orphaned_runs`, about the partition a step is about to record: COMMITTED
    when a step of the run completed it, else FINISHED or RUNNING; UNKNOWN for a run of another instance."""

    def status_of(run_id: str | None) -> str:
        run = instance.get_run_by_id(run_id) if run_id else None
        if run is None:
            return UNKNOWN
        if completed(instance, run_id, asset_key, partition):
            return COMMITTED
        return FINISHED if run.is_finished else RUNNING

    return status_of
