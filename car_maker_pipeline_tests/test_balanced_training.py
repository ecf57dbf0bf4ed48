"""Maker-balanced sampling and read-time augmentation of the training rows (sampling.py, augmentation.py).

Balanced draws, 20,000 of them (whole epochs of `TrainDraws`), per training split:

| rows per maker                                | natural share per maker       | balanced share per maker   |
|-----------------------------------------------|-------------------------------|----------------------------|
| 161 : 12                                      | 93.1% : 6.9%                  | 50% each (+-2 points)      |
| demo at stanford balance (145:68:45:33:22:11) | its counts / 324              | 1/6 each (+-2 points)      |
| 100 : 10 : 1                                  | 90.1% : 9.0% : 0.9%           | 1/3 each (+-2 points)      |
| 5 : 5 (already balanced)                      | 50% each                      | 50% each (+-2 points)      |

| behaviour                                     | expected                                                       |
|-----------------------------------------------|----------------------------------------------------------------|
| the real trainer (build_trainer), balanced    | its training dataloader draws from the balanced `TrainDraws`  |
| the real trainer, defaults                    | transformers' own sampler, untouched                           |
| balanced + group_by_image_tokens              | combined: still balanced, batches sorted by image tokens       |
| augmentation on                               | same rows in the same order, other pixels; validation and the |
|                                               | stored dataset's bytes unchanged; same seed -> same pixels     |
| killed after a checkpoint (balanced + augm.)  | the resumed run ends with the uninterrupted run's adapter      |
| new fields at their defaults                  | folder names (fingerprints) as before the fields existed       |
| unknown sampling / non-bool augmentation      | rejected naming the field and what it accepts                  |
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from car_maker_pipeline.training.augmentation import COLOUR_CHANGE, augment_picture, draw_rng
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
from car_maker_pipeline.training.sampling import Draw, TrainDraws
from car_maker_pipeline.training.trainer import build_trainer, train_lora
from car_maker_pipeline_tests.support.checkpoints import marked_checkpoint

DRAWS = 20_000
TOLERANCE = 0.02  # the binomial sd of a 1/6 share over 20,000 draws is 0.26 points: 2 points is ~8 sd


def _makers(counts: dict[str, int]) -> list[str]:
    """One maker label per row, makers interleaved the way a shuffled split holds them."""
    labels = [maker for maker, count in counts.items() for _ in range(count)]
    return [labels[i] for i in np.random.default_rng(0).permutation(len(labels))]


def _shares(draws: TrainDraws, total: int = DRAWS) -> dict[str, float]:
    seen: Counter = Counter()
    epochs = -(-total // len(draws))
    for epoch in range(epochs):
        draws.set_epoch(epoch)
        seen.update(draws.makers[row] for row in draws)
    drawn = sum(seen.values())
    return {maker: count / drawn for maker, count in seen.items()}


SPLITS = [
    {"BMW": 161, "AM General": 12},
    {"BMW": 145, "Mercedes-Benz": 68, "Aston Martin": 45, "Rolls-Royce": 33, "Land Rover": 22, "AM General": 11},
    {"A": 100, "B": 10, "C": 1},
    {"A": 5, "B": 5},
]


@pytest.mark.parametrize("counts", SPLITS, ids=["2-makers", "demo-stanford", "1-to-100", "balanced-already"])
def test_balanced_draws_make_every_maker_equally_likely(counts):
    shares = _shares(TrainDraws(_makers(counts), balanced=True, seed=0))
    assert set(shares) == set(counts)
    for maker, share in shares.items():
        assert share == pytest.approx(1 / len(counts), abs=TOLERANCE), (maker, shares)


@pytest.mark.parametrize("counts", SPLITS, ids=["2-makers", "demo-stanford", "1-to-100", "balanced-already"])
def test_natural_draws_keep_the_data_proportions(counts):
    draws = TrainDraws(_makers(counts), balanced=False, seed=0)
    for epoch in (0, 1):  # every row exactly once per epoch, in another order each epoch
        draws.set_epoch(epoch)
        assert sorted(draws) == list(range(len(draws)))
    assert list(draws.rows(0)) != list(draws.rows(1))
    total = sum(counts.values())
    shares = _shares(draws)
    assert shares == {maker: pytest.approx(count / total, abs=1e-3) for maker, count in counts.items()}


def test_draws_are_a_function_of_seed_and_epoch():
    makers = _makers(SPLITS[1])
    first, again = TrainDraws(makers, balanced=True, seed=3), TrainDraws(makers, balanced=True, seed=3)
    assert [first.rows(epoch) for epoch in range(3)] == [again.rows(epoch) for epoch in range(3)]
    assert first.rows(0) != first.rows(1)
    assert TrainDraws(makers, balanced=True, seed=4).rows(0) != first.rows(0)
    first.set_epoch(2)
    keyed = TrainDraws(makers, balanced=True, seed=3, keyed=True)
    keyed.set_epoch(2)
    assert [draw.row for draw in keyed] == list(first) and next(iter(keyed)) == Draw(first.rows(2)[0], 2, 0)


def test_balanced_draws_grouped_by_image_tokens_stay_balanced():
    makers = _makers(SPLITS[1])
    lengths = [int(n) for n in np.random.default_rng(1).integers(16, 2000, len(makers))]
    draws = TrainDraws(makers, balanced=True, seed=0, lengths=lengths, group_size=8)
    assert all(share == pytest.approx(1 / 6, abs=TOLERANCE) for share in _shares(draws).values())
    order = [lengths[row] for row in draws.rows(0)]
    assert order[0] == max(order)  # the longest batch first, as transformers' grouped sampler does
    batches = [order[i : i + 8] for i in range(8, len(order) - 8, 8)]  # the first holds the swapped-in maximum
    spread = np.mean([max(b) - min(b) for b in batches])
    shuffled = [lengths[row] for row in TrainDraws(makers, balanced=True, seed=0).rows(0)]
    assert spread < 0.25 * np.mean([max(b) - min(b) for b in (shuffled[i : i + 8] for i in range(0, 320, 8))])


# --------------------------------------------------------------------------------------------
# Through the real trainer on tiny-s
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory):
    """(train, validation, makers, stored_dir): a stanford-balance demo task, train saved to disk and reloaded."""
    from car_maker_pipeline.data.classes import stanford_cars_class_names
    from car_maker_pipeline.data.makers import maker_of
    from car_maker_pipeline.offline.demo_source import generate_demo_source

    root = tmp_path_factory.mktemp("unbalanced")
    source = generate_demo_source(
        root / "source", train_per_maker=8, test_per_maker=2, corruptions=(), balance="stanford", seed=5
    )
    raw = datasets.load_dataset(str(source), cache_dir=str(root / "cache"))
    names = stanford_cars_class_names()

    def to_makers(part):
        return part.remove_columns(["label"]).add_column("maker", [maker_of(names[i]) for i in part["label"]])

    to_makers(raw["train"]).save_to_disk(str(root / "train"))
    train = datasets.load_from_disk(str(root / "train"))
    validation = to_makers(raw["test"])
    makers = sorted(set(train["maker"]))
    assert len(makers) == 6 and min(Counter(train["maker"]).values()) == 2  # AM General: 2 of 48
    return train, validation, makers, root / "train"


def _config(**values) -> LoraHyperparameters:
    return LoraHyperparameters(
        **{"per_device_train_batch_size": 8, "max_steps": 4, "checkpoint_every_n_steps": 2, **values}
    )


def _trainer(model_dir, task, out: Path, **values):
    train, validation, makers, _ = task
    trainer, _ = build_trainer(model_dir, train, validation, makers, out, _config(**values))
    return trainer


def _first_batches(trainer, count: int = 2) -> list[dict]:
    loader = trainer.get_train_dataloader()
    loader.set_epoch(0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


def test_the_real_trainer_draws_balanced_only_when_configured(tiny_model_dir, unbalanced, tmp_path):
    from accelerate.data_loader import SeedableRandomSampler

    default = _trainer(tiny_model_dir, unbalanced, tmp_path / "natural")
    assert isinstance(default.get_train_dataloader().batch_sampler.sampler, SeedableRandomSampler)
    assert default.train_draws is None

    trainer = _trainer(tiny_model_dir, unbalanced, tmp_path / "balanced", sampling="balanced")
    sampler = trainer.get_train_dataloader().batch_sampler.sampler
    assert sampler is trainer.train_draws and isinstance(sampler, TrainDraws) and sampler.balanced
    assert sampler.seed == trainer.args.data_seed == 0 and len(sampler) == len(trainer.train_dataset)
    train = unbalanced[0]
    assert sampler.makers == list(train["maker"])
    assert all(share == pytest.approx(1 / 6, abs=TOLERANCE) for share in _shares(sampler).values())
    # What the dataloader yields is what the sampler drew: the answers of its first batch are those rows' makers.
    first = next(iter(trainer.get_train_dataloader()))
    rows = trainer.train_draws.rows(0)[:8]
    answers = [trainer.processing_class.tokenizer.decode(ids[ids != -100][:-2]) for ids in first["labels"]]
    assert answers == [train[row]["maker"] for row in rows]

    grouped = _trainer(
        tiny_model_dir, unbalanced, tmp_path / "grouped", sampling="balanced", group_by_image_tokens=True
    )
    grouped_sampler = grouped.get_train_dataloader().batch_sampler.sampler
    assert grouped_sampler.balanced and grouped_sampler.lengths == [48] * len(train)  # 128x96 demo pictures
    assert grouped_sampler.group_size == 8


def _stored_bytes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_augmentation_changes_training_pictures_only(tiny_model_dir, unbalanced, tmp_path):
    stored_before = _stored_bytes(unbalanced[3])
    plain = _trainer(tiny_model_dir, unbalanced, tmp_path / "plain")
    augmented = _trainer(tiny_model_dir, unbalanced, tmp_path / "augmented", augmentation=True)
    for ours, theirs in zip(_first_batches(augmented), _first_batches(plain)):
        assert torch.equal(ours["labels"], theirs["labels"])  # the same rows in the same order ...
        assert torch.equal(ours["input_ids"], theirs["input_ids"])  # ... and the same image-token counts
        per_row = (ours["pixel_values"] - theirs["pixel_values"]).abs().flatten(1).mean(1)
        assert (per_row > 0.01).all(), per_row  # ... but every picture changed
    plain_eval = next(iter(plain.get_eval_dataloader()))
    augmented_eval = next(iter(augmented.get_eval_dataloader()))
    assert torch.equal(plain_eval["pixel_values"], augmented_eval["pixel_values"])  # validation untouched
    assert _stored_bytes(unbalanced[3]) == stored_before
    assert augmented.train_dataset[0]["image"].tobytes() == plain.train_dataset[0]["image"].tobytes()


def test_augmentation_is_reproducible_with_a_seed(tiny_model_dir, unbalanced, tmp_path):
    def pixels(seed, **values):
        trainer = _trainer(tiny_model_dir, unbalanced, tmp_path / f"s{seed}", seed=seed, augmentation=True, **values)
        return _first_batches(trainer, 1)[0]["pixel_values"]

    assert torch.equal(pixels(1), pixels(1))
    assert not torch.equal(pixels(1), pixels(2))
    assert torch.equal(pixels(1, sampling="balanced"), pixels(1, sampling="balanced"))


def test_augment_picture_is_mild_and_keeps_size_and_mode():
    gradient = np.linspace(0, 255, 128 * 96 * 3).reshape(96, 128, 3).astype(np.uint8)
    picture = Image.fromarray(gradient, "RGB")
    changed = [augment_picture(picture, draw_rng(0, Draw(0, 0, position))) for position in range(20)]
    assert all(c.size == picture.size and c.mode == "RGB" for c in changed)
    assert len({c.tobytes() for c in changed}) == 20
    means = [np.asarray(c, dtype=float).mean() / np.asarray(picture, dtype=float).mean() for c in changed]
    assert all(abs(m - 1) < 2 * COLOUR_CHANGE for m in means)  # mild: never a different picture
    again = augment_picture(picture, draw_rng(0, Draw(0, 0, 3)))
    assert again.tobytes() == changed[3].tobytes()


@pytest.mark.slow  # two short training runs: 3-20 s on 2 idle cores, a minute or more when they are busy
def test_resume_continues_a_balanced_augmented_run_exactly(tiny_model_dir, unbalanced, tmp_path):
    from safetensors.torch import load_file

    train, validation, makers, _ = unbalanced
    # 48 rows in batches of 8: 6 steps an epoch, so resuming from step 8 skips 2 batches of epoch 1.
    config = _config(max_steps=12, checkpoint_every_n_steps=4, sampling="balanced", augmentation=True)
    reference = train_lora(tiny_model_dir, train, validation, makers, tmp_path / "reference", config)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "reference", crashed)
    shutil.rmtree(crashed / "checkpoint-12")  # killed before the last save
    resumed = train_lora(tiny_model_dir, train, validation, makers, crashed, config)
    assert resumed.resumed_from == crashed / "checkpoint-8" and resumed.global_step == 12
    expected = load_file(str(reference.final_checkpoint / "adapter_model.safetensors"))
    got = load_file(str(resumed.final_checkpoint / "adapter_model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4)
    assert resumed.val_loss[-1] == (12, pytest.approx(reference.val_loss[-1][1], rel=1e-4))


# --------------------------------------------------------------------------------------------
# The schema: fingerprints, records, bad values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "num_processes", "before_the_fields"),
    [  # computed before `sampling` and `augmentation` existed
        ({}, 1, "ecd59c2dd8"),
        ({}, 2, "d3648834f4"),
        ({"max_steps": 200, "checkpoint_every_n_steps": 50, "group_by_image_tokens": True}, 1, "038922c1a9"),
        ({"seed": 2, "max_steps": 200}, 1, "da3af535a6"),
    ],
)
def test_folder_names_are_unchanged_while_the_new_fields_keep_their_defaults(values, num_processes, before_the_fields):
    assert LoraHyperparameters(**values).legacy_fingerprint(num_processes=num_processes) == before_the_fields
    explicit = LoraHyperparameters(**values, sampling="natural", augmentation=False)
    assert explicit.legacy_fingerprint(num_processes=num_processes) == before_the_fields
    changed = {
        LoraHyperparameters(**values, **new).legacy_fingerprint(num_processes=num_processes)
        for new in ({"sampling": "balanced"}, {"augmentation": True}, {"sampling": "balanced", "augmentation": True})
    }
    assert len(changed) == 3 and before_the_fields not in changed


def test_the_new_fields_are_recorded_and_an_earlier_folder_resumes_only_with_their_defaults(tmp_path):
    import json

    from car_maker_pipeline.training.checkpoints import RUN_SETTINGS_FILE, check_run_settings

    config = LoraHyperparameters(sampling="balanced", augmentation=True)
    assert config.to_json()["sampling"] == "balanced" and config.to_json()["augmentation"] is True  # MLflow params
    out = tmp_path / "run"
    marked_checkpoint(out, 4)
    earlier = LoraHyperparameters().to_json()
    del earlier["sampling"], earlier["augmentation"]  # a folder started before the fields existed
    (out / RUN_SETTINGS_FILE).write_text(json.dumps({"config": earlier, "makers": ["A"], "model": "m"}))
    check_run_settings(out, LoraHyperparameters(), ["A"], "m")
    with pytest.raises(LoraTrainingError, match=r"different settings \(sampling, augmentation\)"):
        check_run_settings(out, config, ["A"], "m")


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"sampling": "oversample"}, ["sampling", "'natural'", "'balanced'"]),
        ({"sampling": "Balanced"}, ["sampling", "'natural'", "'balanced'"]),
        ({"augmentation": "sometimes"}, ["augmentation", "bool"]),
        ({"augmentation": "yes"}, ["augmentation", "bool"]),  # strict: no truthy strings
    ],
)
def test_bad_values_are_rejected_naming_the_field(values, named):
    from pydantic import ValidationError

    from car_maker_pipeline.orchestration.assets.training import LoraTrainingConfig

    for schema in (LoraHyperparameters, LoraTrainingConfig):  # the plain functions and the Dagster run config
        with pytest.raises(ValidationError) as error:
            schema(**values)
        message = str(error.value)
        assert all(word in message for word in named), message


def test_a_trainer_built_without_the_row_makers_says_what_to_do(tiny_model_dir, unbalanced, tmp_path):
    from car_maker_pipeline.training.trainer import LoraSFTTrainer

    trainer = _trainer(tiny_model_dir, unbalanced, tmp_path / "run")
    with pytest.raises(LoraTrainingError, match="needs train_makers.*build_trainer"):
        LoraSFTTrainer(
            model=trainer.model,
            args=_config().to_sft_config(str(tmp_path / "other"), evaluate=False),
            train_dataset=trainer.train_dataset,
            processing_class=trainer.processing_class,
            sampling="balanced",
        )
