import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from car_maker_pipeline.evaluation.metrics.accuracy import per_maker_table, summarize, wilson_interval
from car_maker_pipeline.evaluation.scoring.classifier import (
    ClassifierError,
    MakerClassifier,
    answer_token_ids,
    evaluate_split,
)
from car_maker_pipeline.evaluation.split_report import evaluate_to_dir
from car_maker_pipeline.model_inputs.prompt import PromptError, PromptTemplate
from car_maker_pipeline.models.loading import ModelLoadError, load_model_and_processor

MAKERS = ["AM General", "Aston Martin", "BMW", "Land Rover", "Mercedes-Benz", "Rolls-Royce"]


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(50, 50)[1] == 1.0 and wilson_interval(50, 50)[0] == pytest.approx(0.9287, abs=1e-4)


def test_summary_macro_accuracy_weights_makers_equally():
    predictions = pd.DataFrame(
        {
            "true_maker": ["BMW"] * 8 + ["Rolls-Royce"] * 2,
            "predicted_maker": ["BMW"] * 8 + ["BMW"] * 2,
        }
    )
    summary = summarize(predictions, ["BMW", "Rolls-Royce"])
    assert summary.accuracy == 0.8 and summary.macro_accuracy == 0.5
    table = per_maker_table(predictions, ["BMW", "Rolls-Royce"]).set_index("maker")
    assert table.loc["Rolls-Royce", "correct"] == 0 and table.loc["BMW", "accuracy"] == 1.0


def test_answer_tokens_round_trip_to_the_maker_names(tiny_model):
    _, answers = answer_token_ids(tiny_model.processor, PromptTemplate(), MAKERS)
    tokenizer = tiny_model.processor.tokenizer
    for maker, ids in answers.items():
        assert tokenizer.decode(ids[:-1]) == maker
        assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_every_image_gets_a_valid_maker(tiny_model, maker_dataset):
    data = maker_dataset.load()
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, maker_dataset.makers, batch_size=8)
    run = evaluate_split(classifier, data["test"])
    assert len(run.predictions) == data["test"].num_rows
    assert set(run.predictions["predicted_maker"]) <= set(maker_dataset.makers)
    assert run.predictions["score"].between(0, 1).all() and (run.predictions["score"] > 0).all()
    assert list(run.predictions["true_maker"]) == data["test"].with_format("arrow")["maker"].to_pylist()


def test_batched_left_padded_answers_equal_one_at_a_time(tiny_model, maker_dataset):
    """Different image sizes give different numbers of image tokens, so rows really are padded."""
    images = [
        image.resize(size)
        for image, size in zip(
            maker_dataset.load()["test"].select(range(4))["image"], [(128, 96), (64, 48), (200, 90), (96, 128)]
        )
    ]
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, MAKERS, batch_size=4)
    batched = classifier.classify_batch(images)
    single = [classifier.classify_batch([image])[0] for image in images]
    for alone, together in zip(single, batched):
        # The same distribution over the makers, to float32 rounding (padding changes the summation order).
        assert np.exp(together.log_probs) == pytest.approx(np.exp(alone.log_probs), abs=1e-4)
        # A random-weight model is nearly uniform: the same maker wherever rounding cannot decide it.
        first, second = sorted(np.exp(alone.log_probs))[-2:][::-1]
        if first - second > 1e-3:
            assert together.maker == alone.maker


def test_evaluation_writes_predictions_tables_and_figures(tiny_model, maker_dataset, tmp_path):
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, maker_dataset.makers, batch_size=16)
    report = evaluate_to_dir(classifier, maker_dataset.load(), "test", tmp_path / "eval", title="tiny-s", max_images=20)
    assert report.summary.num_images == 20 and report.sample_cap == 20
    predictions = pd.read_parquet(report.predictions_path)
    assert list(predictions.columns) == ["index", "true_maker", "predicted_maker", "score", "log_probs"]
    # Every maker's log-probability per image, normalised over the makers, in the classifier's maker order.
    assert all(len(row) == len(MAKERS) and np.exp(row).sum() == pytest.approx(1.0) for row in predictions["log_probs"])
    assert report.summary.ci_low <= report.summary.accuracy <= report.summary.ci_high
    assert set(report.per_maker()["maker"]) == set(maker_dataset.makers)
    for figure in (report.confusion_path, report.misclassified_path):
        assert Image.open(figure).format == "PNG"


GALLERY = [  # (misclassified rows, rows shown in the grid)
    (0, 1),  # one row saying there are none
    (3, 1),
    (4, 1),
    (5, 2),
    (16, 4),
    (23, 4),  # at most 16 pictures
]


@pytest.mark.parametrize(("wrong", "grid_rows"), GALLERY)
def test_the_misclassified_grid_shows_at_most_sixteen_pictures_shrunk_never_enlarged(tmp_path, wrong, grid_rows):
    from car_maker_pipeline.evaluation.metrics import figures

    right = 2
    predictions = pd.DataFrame(
        {
            "index": range(wrong + right),
            "true_maker": ["BMW"] * (wrong + right),
            "predicted_maker": ["Audi"] * wrong + ["BMW"] * right,
            "score": [0.9] * (wrong + right),
        }
    )
    # Solid pictures: a photo larger than a cell (red), a small one (blue); the right answers in green.
    images = [Image.new("RGB", (1200, 800), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))] * wrong
    images = images[:wrong] + [Image.new("RGB", (50, 50), (0, 255, 0))] * right
    path = figures.save_figure(figures.misclassified_figure(predictions, images, "gallery"), tmp_path / "grid.png")

    grid = np.asarray(Image.open(path).convert("RGB")).astype(int)
    cell_width, cell_height = figures.GRID_CELL
    rows_height = grid_rows * (figures.GRID_CAPTION + cell_height)
    assert grid.shape[:2] == (figures.GRID_TITLE + rows_height, figures.GRID_COLUMNS * cell_width)

    def pixels(colour) -> int:
        return int((np.abs(grid - colour).sum(axis=2) < 30).sum())

    shown = min(wrong, 16)
    large, small = -(-shown // 2), shown // 2
    shrunk = cell_width * round(800 * cell_width / 1200)  # 1200 x 800 fitted into the cell: 256 x 171
    assert pixels((255, 0, 0)) == pytest.approx(large * shrunk, rel=0.03)
    assert pixels((0, 0, 255)) == pytest.approx(small * 64 * 48, rel=0.03)
    assert pixels((0, 255, 0)) == 0  # a right answer is not misclassified


def test_empty_split_is_a_clear_error(tiny_model, maker_dataset):
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, MAKERS)
    with pytest.raises(ClassifierError, match="empty"):
        evaluate_split(classifier, maker_dataset.load()["test"].select([]))


@pytest.mark.parametrize("blank", ["", "   "])
def test_maker_that_tokenizes_to_nothing_is_rejected(tiny_model, blank):
    with pytest.raises(ClassifierError, match="blank|nothing"):
        MakerClassifier(tiny_model.model, tiny_model.processor, ["BMW", blank])


def test_prompt_without_the_maker_list_is_rejected():
    with pytest.raises(PromptError, match=r"\{makers\}"):
        PromptTemplate(user="Which car maker is this?")


def test_model_directory_missing_files_names_the_path(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=str(broken)) as error:
        load_model_and_processor(str(broken))
    assert "safetensors" in str(error.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_processor(str(tmp_path / "absent"))


def test_tokenizer_without_the_image_token_is_rejected(tiny_model_dir, tmp_path):
    broken = tmp_path / "no-image-token"
    shutil.copytree(tiny_model_dir, broken)
    spec = json.loads((broken / "tokenizer.json").read_text())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] != "<image>"]
    spec["model"]["vocab"].pop("<image>", None)
    (broken / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises((ModelLoadError, ValueError), match="image token|<image>"):
        load_model_and_processor(str(broken))
