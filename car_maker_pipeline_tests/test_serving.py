"""The fine-tuned classifier outside the pipeline, end to end on a really trained and registered tiny-s.

One module fixture trains and registers (data, baseline, 8 LoRA steps, checkpoint_accuracy); eight
demo test images are written to the incoming folder, as `make demo` does. Then:

| way out                                   | checked against                                       | test |
|-------------------------------------------|-------------------------------------------------------|------|
| the registered version                    | MLmodel: signature, input example, pinned requirements, model config; tags, aliases, the run's dataset inputs | test_the_registered_version_is_a_standard_mlflow_model |
| `mlflow.pyfunc.load_model(...@champion)` in a fresh process | `classify` on the same files               | test_pyfunc_in_a_fresh_process_predicts_what_classify_prints |
| `mlflow models serve` over HTTP           | `classify`; 7 bad requests each a 400 naming the problem, the server still answering, its peak RSS moved by < 100 MB (printed) | test_scoring_server_answers_like_classify_and_refuses_bad_requests |
| `merged_model` (plain transformers, fresh process, no PEFT imported) | the adapter, same evaluator, test split | test_merged_model_answers_like_the_adapter_without_peft |
| `maker_predictions` over the folder       | `classify`; unreadable files listed with the reason; the sensor | test_maker_predictions_classifies_the_folder_once_per_file_set |
| a second and third registration           | champion moves only to a better validation accuracy, and only once the registering run has finished | test_champion_moves_only_when_validation_accuracy_beats_it (last: it moves the alias) |
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.evaluation.settings import DEMO_TARGET_PRECISION
from car_maker_pipeline.serving.batch import write_demo_images
from car_maker_pipeline.store import PipelineStore
from car_maker_pipeline_tests.support.hostile_images import encoded, png_declaring, truncated
from car_maker_pipeline_tests.support.pipeline import demo_split_rows
from car_maker_pipeline_tests.support.serving import (
    MODEL,
    PARTITION,
    TEST_PER_MAKER,
    ScoringServer,
    command_env,
    peak_rss_kb,
    registered_classifier,
    tracking_uri,
)

pytestmark = pytest.mark.slow

NAME = f"car-maker-{MODEL}"
CHAMPION_URI = f"models:/{NAME}@champion"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    home = tmp_path_factory.mktemp("serving") / "home"
    resources, instance = registered_classifier(home)
    images = sorted(name for name in write_demo_images(home / "incoming", MakerDataset.current(PipelineStore(home))))
    good = [home / "incoming" / name for name in images if name.startswith("test-")]
    return home, resources, instance, good


def run(command: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def classify_answers(registered):
    """(answer, top maker's probability printed to 3 decimals) per good incoming image, from `classify`.

    The answer is the maker, or `unsure` (then the three most probable makers follow in brackets).
    """
    home, _, _, good = registered
    result = run([sys.executable, "-m", "car_maker_pipeline.classify", *map(str, good)], command_env(home))
    assert f"# {NAME} version 1 ({CHAMPION_URI}" in result.stderr
    promises = [line for line in result.stderr.splitlines() if line.startswith("# ") and "certified" in line]
    assert len(promises) == 1, result.stderr  # what the threshold promises, printed once before the answers
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == [str(path) for path in good]
    return [(answer, _printed_probability(rest)) for _, answer, rest in lines]


def _printed_probability(text: str) -> float:
    """`0.412`, or the first of `(BMW 0.412, Audi 0.300, Volvo 0.100)`."""
    return float(text.strip("()").split(",")[0].split()[-1])


def assert_same_answers(answers, expected):
    assert [maker for maker, _ in answers] == [maker for maker, _ in expected]
    assert [p for _, p in answers] == pytest.approx([p for _, p in expected], abs=6e-4)  # classify prints 3 decimals


def test_the_registered_version_is_a_standard_mlflow_model(registered):
    home, _, instance, _ = registered
    client = mlflow.MlflowClient(tracking_uri(home))
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "1" and set(champion.aliases) == {"champion", "challenger"}
    tags = champion.tags
    assert {"base_model_id", "base_model_revision", "step", "val_accuracy", "test_accuracy", "dagster_run_id"} <= set(
        tags
    )
    assert tags["champion_decision"] == "promoted" and tags["base_model_revision"].startswith("sha256-")

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=CHAMPION_URI, tracking_uri=tracking_uri(home)))
    model = mlflow.models.Model.load(str(local))
    assert model.signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert [(c["name"], c["type"]) for c in model.signature.outputs.to_dict()] == [
        ("maker", "string"),
        ("probability", "double"),
        ("answer", "string"),
        ("level", "string"),
        ("maker_2", "string"),
        ("probability_2", "double"),
        ("maker_3", "string"),
        ("probability_3", "double"),
    ]
    assert model.saved_input_example_info["type"] == "dataframe"
    config = model.flavors["python_function"]["config"]
    record = MakerDataset.current(PipelineStore(home))
    assert config["base_model_revision"] == tags["base_model_revision"] and config["base_model_id"] == "tiny-s-seed0"
    assert config["base_model_path"] == str(home / "demo_models" / "tiny-s-seed0")
    # The temperature and the confidence threshold chosen on validation travel in the model config.
    # The temperature, the certified threshold and what it promises travel in the model config.
    assert config["target_precision"] == DEMO_TARGET_PRECISION and config["temperature"] > 0 and config["delta"] == 0.05
    assert "confidence_threshold" in config and "precision" in config["certification"]
    assert config.get("certified_precision") in (None, DEMO_TARGET_PRECISION)
    assert json.loads((local / "artifacts" / "makers.json").read_text()) == record.makers
    assert (local / "artifacts" / "adapter" / "adapter_model.safetensors").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    pinned = {line.split("==")[0]: line.split("==")[1] for line in requirements}
    assert {"mlflow", "torch", "transformers", "peft", "pillow"} <= set(pinned) and all(pinned.values())

    inputs = client.get_run(champion.run_id).inputs.dataset_inputs
    seen = {(i.dataset.name, i.dataset.digest) for i in inputs}
    revision = record.source_revision[:36]
    assert seen == {(f"car_maker_dataset/{split}", revision) for split in ("train", "validation", "test")}

    event = instance.fetch_materializations(dg.AssetKey("checkpoint_accuracy"), limit=1).records[0]
    metadata = {key: value.value for key, value in event.asset_materialization.metadata.items()}
    assert metadata["champion_decision"].startswith("promoted: no champion yet")
    assert metadata["model_uri"] == f"models:/{NAME}/1" and metadata["champion_version"] == "1"
    assert metadata["challenger_val_accuracy"] == pytest.approx(float(tags["val_accuracy"]), abs=1e-4)


PYFUNC_IN_A_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    blobs = [open(path, "rb").read() for path in sys.argv[2:]]
    answers = model.predict(pd.DataFrame({"image": blobs}))
    print(json.dumps(list(zip(answers["answer"], answers["probability"]))))
    """
)


def test_pyfunc_in_a_fresh_process_predicts_what_classify_prints(registered, classify_answers):
    home, _, _, good = registered
    result = run([sys.executable, "-c", PYFUNC_IN_A_FRESH_PROCESS, CHAMPION_URI, *map(str, good)], command_env(home))
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert_same_answers(answers, classify_answers)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def frame(*blobs: bytes) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[b64(blob)] for blob in blobs]}}


BAD_REQUESTS = [
    ("not an image", frame(b"<html>a web page, not a car</html>"), "not an image"),
    ("empty body", b"", "valid JSON"),
    ("empty image", frame(b""), "empty (0 bytes)"),
    ("truncated JPEG", frame(truncated(encoded((320, 240)))), "truncated or corrupt"),
    ("bomb header", frame(png_declaring(100_000, 100_000)), "decompression bomb"),
    ("wrong column", {"dataframe_split": {"columns": ["picture"], "data": [[b64(encoded())]]}}, "missing inputs"),
    ("not base64", {"dataframe_split": {"columns": ["image"], "data": [["!!!notbase64"]]}}, "base64"),
]


def test_scoring_server_answers_like_classify_and_refuses_bad_requests(registered, classify_answers, tmp_path):
    home, _, _, good = registered
    with ScoringServer(CHAMPION_URI, command_env(home), tmp_path / "serve.log") as server:
        status, body = server.invoke(frame(*(path.read_bytes() for path in good)))
        assert status == 200, body
        assert_same_answers([(p["answer"], p["probability"]) for p in body["predictions"]], classify_answers)
        answering = peak_rss_kb(server.process.pid) / 1024
        for label, request, problem in BAD_REQUESTS:
            status, body = server.invoke(request)
            assert 400 <= status < 500 and problem in body["message"], (label, status, body)
            status, body = server.invoke(frame(good[0].read_bytes()))  # and it keeps answering
            assert status == 200 and body["predictions"][0]["answer"] == classify_answers[0][0], label
        hostile = peak_rss_kb(server.process.pid) / 1024
    print(f"scoring server peak RSS: {answering:.0f} MB answering, {hostile:.0f} MB after the bad requests")
    assert hostile - answering < 100  # a bad request is refused before it costs memory


ADAPTER_FREE_EVALUATION = textwrap.dedent(
    """
    import json, sys
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split
    from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget
    from car_maker_pipeline.model_inputs.prompt import PromptTemplate

    folder, maker_dataset = sys.argv[1], sys.argv[2]
    card = json.load(open(f"{folder}/car_maker_classifier.json"))
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    classifier = MakerClassifier(
        model,
        processor,
        card["makers"],
        prompt=PromptTemplate(system=card["system_prompt"], user=card["user_prompt"]),
        budget=ImageTokenBudget(**card["image_token_budget"]),
    )
    run = evaluate_split(classifier, datasets.load_from_disk(maker_dataset)["test"])
    peft_imported = any(name == "peft" or name.startswith("peft.") for name in sys.modules)
    print(json.dumps({"answers": run.predictions[["predicted_maker", "score"]].values.tolist(), "peft": peft_imported}))
    """
)


def test_merged_model_answers_like_the_adapter_without_peft(registered):
    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split
    from car_maker_pipeline.models.merging import weight_names
    from car_maker_pipeline.orchestration.assets.serving import merged_model
    from car_maker_pipeline.recording.registry import load_version

    home, resources, instance, _ = registered
    result = dg.materialize([merged_model], resources=resources, instance=instance, partition_key=PARTITION)
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("merged_model")[0].metadata.items()}
    folder = home / "merged_model" / MODEL / "v1"
    assert metadata["path"] == str(folder) and metadata["source_model"].startswith(f"{NAME} v1")
    assert metadata["agreement_with_adapter"] == 1.0 and metadata["num_images"] == demo_split_rows(TEST_PER_MAKER)
    assert result.get_asset_check_evaluations()[0].passed
    assert not any("lora" in name or "base_layer" in name for name in weight_names(folder))
    assert not list(folder.glob("adapter_*")) and list(folder.glob("*.safetensors"))

    record = MakerDataset.current(PipelineStore(home))
    fresh = run([sys.executable, "-c", ADAPTER_FREE_EVALUATION, str(folder), record.path], command_env(home))
    merged = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert merged["peft"] is False  # loaded and run as a plain transformers model

    adapter_model = load_version(tracking_uri(home), NAME, "1").unwrap_python_model().predictor.classifier
    test = record.load()["test"]
    adapter = evaluate_split(adapter_model, test).predictions
    assert [maker for maker, _ in merged["answers"]] == list(adapter["predicted_maker"])
    assert [score for _, score in merged["answers"]] == pytest.approx(list(adapter["score"]), abs=1e-4)
    correct = sum(maker == truth for (maker, _), truth in zip(merged["answers"], adapter["true_maker"]))
    assert metadata["accuracy"] == pytest.approx(correct / len(adapter))

    with adapter_model.model.disable_adapter():  # control: the comparison does tell the base model apart
        base = evaluate_split(MakerClassifier(adapter_model.model, adapter_model.processor, adapter_model.makers), test)
    assert (
        list(base.predictions["predicted_maker"]) != list(adapter["predicted_maker"])
        or max(abs(base.predictions["score"] - adapter["score"])) > 1e-2
    )


def test_maker_predictions_classifies_the_folder_once_per_file_set(registered, classify_answers):
    from car_maker_pipeline.orchestration.assets.serving import maker_predictions
    from car_maker_pipeline.orchestration.incoming import incoming_images_sensor
    from car_maker_pipeline.serving.batch import snapshot

    home, resources, instance, good = registered
    incoming = home / "incoming"
    (incoming / "readme.txt").write_text("not a car")
    for path in incoming.iterdir():  # older than the sensor's settling time (the fingerprint includes it)
        os.utime(path, (time.time() - 120, time.time() - 120))
    result = dg.materialize([maker_predictions], resources=resources, instance=instance, partition_key=PARTITION)
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("maker_predictions")[0].metadata.items()}
    table = pd.read_parquet(metadata["path"])
    assert list(table["file_name"]) == sorted(path.name for path in incoming.iterdir())
    assert metadata["num_files"] == len(good) + 2 and metadata["num_unreadable"] == 2
    errors = table.set_index("file_name")["error"]
    assert "truncated or corrupt" in errors["cut-off-upload.jpg"] and "not an image" in errors["readme.txt"]
    classified = table.set_index("file_name").loc[[path.name for path in good]]
    assert set(table["model_version"]) == {"1"} and set(table["model_name"]) == {NAME}
    assert_same_answers(list(zip(classified["answer"], classified["probability"])), classify_answers)

    sensor_resources = {key: resources[key] for key in ("store", "incoming_images")}
    with dg.build_sensor_context(resources=sensor_resources) as context:
        tick = incoming_images_sensor(context)
    assert tick.run_requests == []  # this file set was classified by the materialization above
    (incoming / "late-arrival.jpg").write_bytes(good[0].read_bytes())
    os.utime(incoming / "late-arrival.jpg", (time.time() - 120, time.time() - 120))
    with dg.build_sensor_context(cursor=tick.cursor, resources=sensor_resources) as context:
        tick = incoming_images_sensor(context)
    assert [r.partition_key for r in tick.run_requests] == [PARTITION]
    assert tick.cursor == snapshot(incoming).fingerprint != metadata["folder_fingerprint"]


def test_champion_moves_only_when_validation_accuracy_beats_it(registered):
    """Last in the module: it moves the champion alias the other tests load."""
    from car_maker_pipeline.orchestration.assets.evaluation import checkpoint_accuracy
    from car_maker_pipeline.recording.aliases import promote
    from car_maker_pipeline.recording.registry import Candidate, register_classifier
    from car_maker_pipeline.serving.predictor import ClassifierCard
    from car_maker_pipeline.tracking import mlflow_run

    home, resources, instance, _ = registered
    client = mlflow.MlflowClient(tracking_uri(home))
    again = dg.materialize(
        [checkpoint_accuracy],
        resources=resources,
        instance=instance,
        partition_key=PARTITION,
        run_config={"ops": {"checkpoint_accuracy": {"config": {"robustness": False}}}},
    )
    metadata = {k: v.value for k, v in again.asset_materializations_for_node("checkpoint_accuracy")[0].metadata.items()}
    assert metadata["model_uri"] == f"models:/{NAME}/2"
    assert (
        metadata["champion_decision"].startswith("kept: validation accuracy")
        and "does not beat" in (metadata["champion_decision"])
    )
    assert metadata["champion_version"] == "1" and metadata["previous_champion_version"] == "1"
    assert metadata["previous_champion_val_accuracy"] == metadata["challenger_val_accuracy"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    second = client.get_model_version(NAME, "2")
    assert second.tags["champion_decision"] == "kept" and second.tags["compared_with_version"] == "1"
    run_tags = client.get_run(second.run_id).data.tags
    assert run_tags["champion_decision"] == "kept" and run_tags["registered_model"] == f"{NAME}/2"

    # A version whose validation accuracy is higher (same adapter, same makers) takes the alias.
    champion = client.get_model_version(NAME, "1")
    adapter = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/1", tracking_uri=tracking_uri(home))
    )
    adapter /= "artifacts/adapter"
    better = float(champion.tags["val_accuracy_exact"]) + 0.1
    with mlflow_run(tracking_uri(home), home, "registration-test", {"stage": "registration-test"}):
        registered = register_classifier(
            Candidate(MODEL, adapter, ClassifierCard.read(adapter), better, 0.5),
            uri=tracking_uri(home),
            home=home,
            dataset_record=MakerDataset.current(PipelineStore(home)),
            tags={"dagster_run_id": "registration-test"},
        )
        assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"  # no alias while it runs
    registered_better = promote(registered, uri=tracking_uri(home), home=home)
    assert registered_better.version == "3" and registered_better.decision.promoted
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "3"
    assert client.get_model_version(NAME, "3").tags["champion_decision"] == "promoted"
