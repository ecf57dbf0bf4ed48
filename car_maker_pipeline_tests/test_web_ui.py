"""The pipeline as a team sees it: a real `dagster dev` (webserver + daemon), driven over GraphQL and
in headless Chromium, with the project's own `dagster.yaml` (gpu pool of 1, run monitoring, retries).

Slow: one `dagster dev` is shared by the module; every run it launches is a real run process.
The Chromium test needs Debian's `chromium` (`.ci/run` installs it); outside CI it is skipped with
the command to install it, in CI (`CI` set) a missing browser fails the test.
"""

import itertools
import os
import time

import pytest

from car_maker_pipeline_tests.support.cli import IN_PROCESS, SMALL_SOURCE
from car_maker_pipeline_tests.support.dagster_dev import DagsterDev, chromium_binary, listening_addresses

pytestmark = pytest.mark.slow

ASSETS = [
    "raw_stanford_cars",
    "labeled_additions",
    "car_maker_dataset",
    "baseline_evaluation",
    "lora_checkpoints",
    "lora_sweep",
    "checkpoint_accuracy",
    "merged_model",
    "maker_predictions",
    "review_queue",
]
LINEAGE = {
    ("raw_stanford_cars", "car_maker_dataset"),
    ("raw_stanford_cars", "labeled_additions"),
    ("labeled_additions", "car_maker_dataset"),
    ("maker_predictions", "review_queue"),
    ("car_maker_dataset", "review_queue"),
    ("car_maker_dataset", "baseline_evaluation"),
    ("car_maker_dataset", "lora_checkpoints"),
    ("car_maker_dataset", "lora_sweep"),
    ("baseline_evaluation", "checkpoint_accuracy"),
    ("lora_checkpoints", "checkpoint_accuracy"),
    ("checkpoint_accuracy", "merged_model"),
    ("checkpoint_accuracy", "maker_predictions"),
}
ASSET_GRAPH_QUERY = """
{ assetNodes {
    assetKey { path } dependencyKeys { path } groupName kinds description isPartitioned
    owners { ... on TeamAssetOwner { team } ... on UserAssetOwner { email } }
    partitionKeysByDimension { partitionKeys }
    assetChecksOrError { ... on AssetChecks { checks { name } } }
} }
"""
RUN_QUERY = """
query Run($runId: ID!) { runOrError(runId: $runId) { ... on Run {
    status tags { key value } stepStats { stepKey status startTime endTime } } } }
"""


def partition_tags(model: str, task: str = "maker") -> dict[str, str]:
    """The tags a launch from the UI gives a run of one (model, task) partition: the key and each dimension's."""
    return {"dagster/partition": f"{model}|{task}", "dagster/partition/model": model, "dagster/partition/task": task}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with DagsterDev(tmp_path_factory.mktemp("dagster_dev")) as running:
        yield running


@pytest.fixture(scope="module")
def data_run(server):
    """The data assets, materialized by a run launched through DagsterGraphQLClient (its steps in the run's
    own process, as every run here: one process start per run, not one per step)."""
    client = server.graphql_client()
    run_id = client.submit_job_execution("data_job", run_config={"resources": SMALL_SOURCE, **IN_PROCESS})
    status = server.wait_for_run(run_id, timeout=300)
    assert status == "SUCCESS", server.log_tail()
    return run_id


def test_the_web_ui_listens_on_loopback_only(server):
    assert listening_addresses(server.port) == {"127.0.0.1"}


def _asset_nodes(server) -> dict[str, dict]:
    nodes = server.graphql(ASSET_GRAPH_QUERY)["assetNodes"]
    return {"/".join(node["assetKey"]["path"]): node for node in nodes}


def test_data_run_over_graphql_and_the_lineage_it_reports(server, data_run):
    run = server.graphql(RUN_QUERY, {"runId": data_run})["runOrError"]
    assert run["status"] == "SUCCESS"
    assert {s["stepKey"] for s in run["stepStats"] if s["status"] == "SUCCESS"} >= {
        "raw_stanford_cars",
        "car_maker_dataset",
    }

    nodes = _asset_nodes(server)
    assert set(nodes) == set(ASSETS)
    edges = {("/".join(dep["path"]), key) for key, node in nodes.items() for dep in node["dependencyKeys"]}
    assert edges == LINEAGE

    groups = {key: node["groupName"] for key, node in nodes.items()}
    assert groups == {
        "raw_stanford_cars": "data",
        "car_maker_dataset": "data",
        "labeled_additions": "data",
        "review_queue": "labeling",
        "baseline_evaluation": "baseline",
        "lora_checkpoints": "training",
        "lora_sweep": "sweep",
        "checkpoint_accuracy": "evaluation",
        "merged_model": "serving",
        "maker_predictions": "serving",
    }
    for key, node in nodes.items():
        assert len(node["description"] or "") > 80, f"{key} needs a description a newcomer understands"
        assert node["owners"], f"{key} has no owner"
    assert {"huggingface"} <= set(nodes["raw_stanford_cars"]["kinds"])
    assert {"pytorch", "huggingface", "mlflow"} <= set(nodes["lora_checkpoints"]["kinds"])
    assert {"pytorch", "mlflow"} <= set(nodes["checkpoint_accuracy"]["kinds"])
    assert {"optuna", "pytorch", "mlflow"} <= set(nodes["lora_sweep"]["kinds"])
    for key, group in groups.items():  # the data is whole; every other asset is one partition per model
        assert nodes[key]["isPartitioned"] == (group != "data"), key
        if group != "data":
            models, tasks = (dimension["partitionKeys"] for dimension in nodes[key]["partitionKeysByDimension"])
            assert (models, tasks) == (["tiny-s", "tiny-m", "tiny-l"], ["maker", "class"]), key
    checks = {key: {c["name"] for c in node["assetChecksOrError"]["checks"]} for key, node in nodes.items()}
    assert "no_test_leakage" in checks["car_maker_dataset"]
    assert "best_checkpoint_beats_baseline" in checks["checkpoint_accuracy"]
    assert "merged_answers_equal_adapter" in checks["merged_model"]

    # The materialization is visible to the UI: the maker dataset has a latest event with its makers.
    data = server.graphql(
        '{ assetOrError(assetKey: {path: ["car_maker_dataset"]}) { ... on Asset { '
        "assetMaterializations(limit: 1) { runId metadataEntries { label } } } } }"
    )
    materialization = data["assetOrError"]["assetMaterializations"][0]
    assert materialization["runId"] == data_run
    assert "makers" in {entry["label"] for entry in materialization["metadataEntries"]}


def test_asset_graph_renders_in_headless_chromium(server, data_run, tmp_path):
    browser_path = chromium_binary()
    if browser_path is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    lineage = _lineage_of("checkpoint_accuracy")
    assert lineage == set(ASSETS) - {"lora_sweep"}  # a sibling, not in its lineage
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=browser_path,
            headless=True,
            # As root, with no display and no network but loopback (see the machine notes).
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            # checkpoint_accuracy's nearest neighbours, four deep, reach its whole lineage: the data and
            # training upstream, the serving assets downstream (a sibling such as lora_sweep is not in it).
            page.goto(f"{server.url}/assets/checkpoint_accuracy?view=lineage&lineageScope=neighbors&lineageDepth=4")
            node_names = page.locator('[class*="AssetNode_assetName"]')
            node_names.first.wait_for(state="attached", timeout=60_000)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                drawn = node_names.all_inner_texts()
                if all(any(_names_match(name, text) for text in drawn) for name in lineage):
                    break
                time.sleep(1)
            html = page.content()
            page.screenshot(path=str(tmp_path / "asset_graph.png"))
        finally:
            browser.close()
    for name in lineage:
        assert any(_names_match(name, text) for text in drawn), f"no node drawn for {name}: {drawn}"
    assert not any(_names_match("lora_sweep", text) for text in drawn), "a sibling drawn as lineage"
    for group in ("data", "baseline", "training", "evaluation", "serving"):
        assert f">{group}<" in html, f"group {group} is not drawn"


def _lineage_of(asset: str) -> set[str]:
    """The asset, its ancestors and its descendants by LINEAGE's edges."""
    found = {asset}
    for forwards in (True, False):
        frontier = {asset}
        while frontier:
            frontier = {(b if forwards else a) for a, b in LINEAGE if (a if forwards else b) in frontier} - found
            found |= frontier
    return found


def _names_match(name: str, drawn: str) -> bool:
    """A node's label is the asset name, middle-truncated ("checkpoi…_accuracy") when zoomed out."""
    drawn = drawn.strip()
    if "…" not in drawn:
        return drawn == name
    head, tail = drawn.split("…", 1)
    return len(head) + len(tail) < len(name) and name.startswith(head) and name.endswith(tail)


@pytest.mark.parametrize(
    ("name", "drawn", "matches"),
    [
        ("checkpoint_accuracy", "checkpoint_accuracy", True),
        ("checkpoint_accuracy", "checkpoi…_accuracy", True),
        ("baseline_evaluation", "checkpoi…_accuracy", False),
        ("merged_model", "merged_mode", False),
        ("merged_model", "mer…model", True),
    ],
)
def test_truncated_node_labels_match_only_their_asset(name, drawn, matches):
    assert _names_match(name, drawn) is matches


def _pool_intervals(server, run_ids: list[str], steps: set[str]) -> list[tuple[float, float, str, str]]:
    intervals = []
    for run_id in run_ids:
        run = server.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]
        assert run["status"] == "SUCCESS", f"run {run_id}: {run['status']}\n{server.log_tail()}"
        for step in run["stepStats"]:
            if step["stepKey"] in steps:
                intervals.append((step["startTime"], step["endTime"], step["stepKey"], run_id))
    return intervals


def test_gpu_pool_runs_one_heavy_step_at_a_time(server, data_run):
    """Four partitions launched at once (three fine-tunings, one baseline): their steps take turns."""
    client = server.graphql_client()
    # Steps in the run's own process (IN_PROCESS: one process start per run, not two): the gpu pool binds either way.
    training = {
        "ops": {
            "lora_checkpoints": {
                "config": {"max_steps": 4, "checkpoint_every_n_steps": 2, "per_device_train_batch_size": 4}
            }
        },
        "resources": SMALL_SOURCE,
        **IN_PROCESS,
    }
    baseline = {"ops": {"baseline_evaluation": {"config": {"max_images": 8}}}, "resources": SMALL_SOURCE, **IN_PROCESS}
    run_ids = [
        client.submit_job_execution(
            "training_job", run_config=training, asset_selection=["lora_checkpoints"], tags=partition_tags(model)
        )
        for model in ("tiny-s", "tiny-m", "tiny-l")
    ]
    run_ids.append(client.submit_job_execution("baseline_job", run_config=baseline, tags=partition_tags("tiny-s")))

    statuses = {run_id: server.wait_for_run(run_id, timeout=900) for run_id in run_ids}
    assert set(statuses.values()) == {"SUCCESS"}, f"{statuses}\n{server.log_tail()}"

    intervals = sorted(_pool_intervals(server, run_ids, {"lora_checkpoints", "baseline_evaluation"}))
    assert len(intervals) == 4
    for (start_a, end_a, step_a, run_a), (start_b, end_b, step_b, run_b) in itertools.pairwise(intervals):
        assert end_a <= start_b, (
            f"{step_a} of run {run_a} ({start_a:.1f}-{end_a:.1f}) overlaps "
            f"{step_b} of run {run_b} ({start_b:.1f}-{end_b:.1f})"
        )


@pytest.mark.serial  # its latency bound holds for this load alone, not beside another test's
def test_twenty_runs_at_once_all_complete_and_the_ui_stays_responsive(server, data_run):
    """Twenty baseline runs requested together: the queue (4 at a time) and the gpu pool (1 step at a
    time) work through them while GraphQL keeps answering within a second."""
    import statistics
    import threading

    client = server.graphql_client()
    config = {
        "ops": {"baseline_evaluation": {"config": {"max_images": 4, "batch_size": 4}}},
        "resources": SMALL_SOURCE,
        **IN_PROCESS,
    }
    latencies: list[tuple[float, float]] = []  # (seconds since the first request, seconds to answer)
    stop = threading.Event()
    started = time.monotonic()

    def probe():
        while not stop.is_set():
            sent = time.monotonic()
            server.graphql("{ runsOrError(limit: 5) { ... on Runs { results { runId status } } } }", timeout=30)
            latencies.append((sent - started, time.monotonic() - sent))
            stop.wait(0.5)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        partitions = itertools.islice(itertools.cycle(["tiny-s", "tiny-m", "tiny-l"]), 20)
        run_ids = [
            client.submit_job_execution("baseline_job", run_config=config, tags={**partition_tags(p), "load": "20"})
            for p in partitions
        ]
        statuses = {run_id: server.wait_for_run(run_id, timeout=1200) for run_id in run_ids}
    finally:
        stop.set()
        prober.join(timeout=60)
    wall = time.monotonic() - started
    assert list(statuses.values()) == ["SUCCESS"] * 20, f"{statuses}\n{server.log_tail()}"

    intervals = sorted(_pool_intervals(server, run_ids, {"baseline_evaluation"}))
    assert len(intervals) == 20
    for (_start_a, end_a, _, run_a), (start_b, _, _, run_b) in itertools.pairwise(intervals):
        assert end_a <= start_b, f"gpu steps of runs {run_a} and {run_b} overlap"

    answers = [seconds for _, seconds in latencies]
    print(
        f"\n20 runs in {wall:.0f}s; {len(answers)} GraphQL probes: first answered after {answers[0]:.3f}s, "
        f"median {statistics.median(answers):.3f}s, max {max(answers):.3f}s"
    )
    assert len(answers) >= wall / 2, "the probe stalled"  # one probe per ~0.5-1 s for the whole load
    assert max(answers) < 1.0, f"GraphQL took {max(answers):.2f}s under load"


STALE_QUERY = """
query Stale($path: [String!]!, $partition: String) { assetNodeOrError(assetKey: {path: $path}) {
    ... on AssetNode { staleStatus(partition: $partition)
        staleCauses(partition: $partition) { key { path } category reason dependency { path } } } } }
"""


def _staleness(server, asset: str, partition: str | None = None) -> tuple[str, list[dict]]:
    node = server.graphql(STALE_QUERY, {"path": [asset], "partition": partition})["assetNodeOrError"]
    return node["staleStatus"], node["staleCauses"]


def test_a_rebuilt_dataset_shows_the_models_trained_and_scored_on_the_old_one_as_stale(server, data_run):
    """| state                                   | baseline_evaluation [tiny-m] | car_maker_dataset |
    |-----------------------------------------|------------------------------|-------------------|
    | scored on the current dataset           | FRESH                        | FRESH             |
    | dataset rebuilt (other validation split) | STALE: car_maker_dataset data | FRESH             |
    | scored again on the new dataset         | FRESH                        | FRESH             |
    """
    client = server.graphql_client()
    baseline = {"ops": {"baseline_evaluation": {"config": {"max_images": 4}}}, "resources": SMALL_SOURCE, **IN_PROCESS}

    def run(job, config, partition=None):
        tags = partition_tags(partition) if partition else {}
        run_id = client.submit_job_execution(job, run_config=config, tags=tags)
        assert server.wait_for_run(run_id, timeout=600) == "SUCCESS", server.log_tail()

    run("baseline_job", baseline, "tiny-m")
    assert _staleness(server, "baseline_evaluation", "tiny-m|maker") == ("FRESH", [])
    rebuilt = {
        "ops": {"car_maker_dataset": {"config": {"validation_fraction": 0.2}}},
        "resources": SMALL_SOURCE,
        **IN_PROCESS,
    }
    run("data_job", rebuilt)
    assert _staleness(server, "car_maker_dataset")[0] == "FRESH"
    status, causes = _staleness(server, "baseline_evaluation", "tiny-m|maker")
    assert status == "STALE"
    assert {"key": {"path": ["car_maker_dataset"]}, "category": "DATA", "reason": "has a new data version"} in [
        {name: cause[name] for name in ("key", "category", "reason")} for cause in causes
    ], causes
    run("baseline_job", baseline, "tiny-m")
    assert _staleness(server, "baseline_evaluation", "tiny-m|maker")[0] == "FRESH"
