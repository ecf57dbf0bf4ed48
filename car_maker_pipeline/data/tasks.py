"""The two questions a model can be asked about a picture: who made the car (`maker`), or which Stanford
Cars class it is, make, model and year (`class`).

Both read the same maker dataset: the maker task answers its `maker` column, the class task its
`source_class` column. Everything that differs between them is here, so evaluation, training and serving
ask the task instead of spelling a column or a prompt themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from car_maker_pipeline.data.makers import makers_for_class_names
from car_maker_pipeline.model_inputs.prompt import DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_PROMPT, PromptTemplate

CLASS_SYSTEM_PROMPT = "You excel at identifying cars from pictures: their make, model and year."
CLASS_USER_PROMPT = (
    "What car is in this picture? Answer with its make, model and year, like 'BMW M3 Coupe 2012'. "
    "Its maker is one of: {makers}"
)


class TaskError(ValueError):
    """A task name, answer or model that does not fit the task asked for; the message names both sides."""


@dataclass(frozen=True)
class Task:
    name: str  # the partition key and the word in registered model names
    label_column: str  # the maker dataset's column holding the right answer
    noun: str  # what one answer is: predictions carry true_<noun> and predicted_<noun>
    system_prompt: str  # the prompt a run uses unless its config gives another
    user_prompt: str  # lists the makers where it says {makers}

    @property
    def true_column(self) -> str:
        return f"true_{self.noun}"

    @property
    def predicted_column(self) -> str:
        return f"predicted_{self.noun}"

    def prompt(self, answers: Sequence[str], system: str | None = None, user: str | None = None) -> PromptTemplate:
        """The prompt for these answers; `system` / `user` replace the task's defaults (the maker task's
        user prompt lists the answers, the class task's lists the makers of its answers)."""
        system, user = system or self.system_prompt, user or self.user_prompt
        if self.name == MAKER.name:
            return PromptTemplate(system=system, user=user)
        makers = tuple(sorted(set(makers_for_class_names(list(answers)))))
        return PromptTemplate(system=system, user=user, listing=makers)

    def partition(self, model_key: str) -> str:
        """The store folder of one model's results for this task (`<asset>/<folder>`). The maker task keeps the
        bare model key, where stores written before tasks existed hold their results; the others add `@<task>`."""
        return model_key if self.name == MAKER.name else f"{model_key}@{self.name}"

    def answers(self, makers: Sequence[str], class_names: Iterable[str]) -> list[str]:
        """What a model of this task may answer: the dataset's makers, or the class names its rows carry
        (`source_class` of every split, sorted; 196 on Stanford Cars). A class that only test shows is still
        a possible answer, so every test image's class is one."""
        if self.name == MAKER.name:
            return list(makers)
        classes = sorted({str(name) for name in class_names if name})
        if not classes:
            raise TaskError("the dataset has no class names (source_class is empty); rebuild car_maker_dataset")
        return classes


MAKER = Task("maker", "maker", "maker", DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_PROMPT)
CLASS = Task("class", "source_class", "class", CLASS_SYSTEM_PROMPT, CLASS_USER_PROMPT)
TASKS: dict[str, Task] = {task.name: task for task in (MAKER, CLASS)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(
            f"unknown task {name!r}; the tasks are {sorted(TASKS)} (maker: who made the car; class: make, model and year)"
        )
    return TASKS[name]


def check_same_task(trained_for: str, asked_for: str, what: str) -> None:
    """A model answers only the task it was trained (or registered) for: its answers are the other task's
    wrong kind of label, and its thresholds were certified for them."""
    if trained_for != asked_for:
        raise TaskError(
            f"{what} answers the {trained_for!r} task but the {asked_for!r} task was asked for; use a model of the "
            f"{asked_for!r} task, or ask for the {trained_for!r} task"
        )


def check_known_answers(task: Task, names: Iterable[str], answers: Sequence[str], where: str) -> None:
    """Every name an addition or an override gives must be one of the task's answers; the message lists both."""
    known = set(answers)
    unknown = sorted({str(name) for name in names} - known)
    if unknown:
        shown = ", ".join(sorted(known)[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        raise TaskError(
            f"{where} names {task.noun} answers {unknown} that the dataset does not have; its {task.noun} answers are: "
            f"{shown}. Fix the names, or add images of the new {task.noun} to the dataset first"
        )


def dataset_answers(task: Task, makers: Sequence[str], dataset) -> list[str]:
    """`task.answers` of a loaded maker dataset (a DatasetDict): its makers, or the class names of every split."""
    if task.name == MAKER.name:
        return list(makers)
    missing = [split for split, rows in dataset.items() if task.label_column not in rows.column_names]
    if missing:
        raise TaskError(
            f"the {task.name!r} task needs the {task.label_column!r} column, which splits {missing} of car_maker_dataset "
            "lack (it was built before class names were kept); materialize car_maker_dataset again"
        )
    return task.answers(makers, (name for rows in dataset.values() for name in rows[task.label_column]))
