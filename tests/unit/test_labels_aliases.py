"""<Choice alias>: Label Studio writes the alias into results, so reading and writing labels must use it."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from asvp_backend.labelstudio.label_config import ClassificationSpec, LabelConfigError, parse_label_config
from asvp_backend.state import ProjectState
from tests.helpers import IMAGE_CONFIG

ALIAS_CONFIG = """<View>
  <Image name="image" value="$img"/>
  <Choices name="species" toName="image" choice="single">
    <Choice value="Cat" alias="c"/>
    <Choice value="Dog" alias="d"/>
    <Choice value="Bird"/>
  </Choices>
</View>"""


def annotation(choice: str, updated: str = "2024-01-01", ann_id: int = 1, **extra: object) -> dict:
    region = {"from_name": "species", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}
    return {"id": ann_id, "updated_at": updated, "result": [region], **extra}


def test_spec_keeps_shown_and_written_values() -> None:
    spec = parse_label_config(ALIAS_CONFIG)
    assert spec.labels == ("Cat", "Dog", "Bird")
    assert spec.result_values == ("c", "d", "Bird")  # alias, else value (Label Studio's rule)


def test_label_of_reads_the_alias_label_studio_wrote() -> None:
    spec = parse_label_config(ALIAS_CONFIG)
    assert spec.label_of({"annotations": [annotation("c")]}) == "Cat"
    assert spec.label_of({"annotations": [annotation("Bird")]}) == "Bird"
    assert spec.label_of({"annotations": [annotation("Dog")]}) == "Dog"  # shown value: Label Studio's findLabel
    assert spec.label_of({"annotations": [annotation("x")]}) is None


def test_pre_annotations_write_the_alias() -> None:
    spec = parse_label_config(ALIAS_CONFIG)
    assert spec.prediction_result("Cat") == [
        {"from_name": "species", "to_name": "image", "type": "choices", "value": {"choices": ["c"]}}
    ]
    assert spec.prediction_result("Bird")[0]["value"] == {"choices": ["Bird"]}


def test_prediction_result_refuses_labels_no_longer_in_the_config() -> None:
    spec = parse_label_config(ALIAS_CONFIG)
    assert spec.prediction_result("Fish") == []
    assert spec.prediction_result("c") == []  # an alias is not a label name
    assert spec.prediction_result("") == []


def test_duplicate_aliases_are_refused() -> None:
    xml = ALIAS_CONFIG.replace('alias="d"', 'alias="c"')
    with pytest.raises(LabelConfigError, match="alias"):
        parse_label_config(xml)


def test_spec_survives_the_state_json_and_old_states_still_load() -> None:
    spec = parse_label_config(ALIAS_CONFIG)
    state = ProjectState.new(7, ALIAS_CONFIG, spec)
    assert ProjectState.from_json(state.to_json()).spec == spec
    old = asdict(parse_label_config(IMAGE_CONFIG))
    del old["result_values"]  # a state saved before aliases were known
    loaded = ClassificationSpec(**json.loads(json.dumps(old)))
    assert loaded.result_values == loaded.labels == ("cat", "dog")
    with pytest.raises(ValueError, match="result_values"):
        ClassificationSpec("c", "i", "image", ("a", "b"), ("x",))


# ------------------------------------------------------------------ label_of: the newest non-cancelled annotation


@pytest.fixture()
def spec() -> ClassificationSpec:
    return parse_label_config(ALIAS_CONFIG)


def test_newest_non_cancelled_annotation_wins(spec: ClassificationSpec) -> None:
    task = {
        "annotations": [
            annotation("c", "2024-01-01", 1),
            annotation("d", "2024-03-01", 3, was_cancelled=True),
            annotation("Bird", "2024-02-01", 2),
        ]
    }
    assert spec.label_of(task) == "Bird"
    same_time = {"annotations": [annotation("d", "2024-01-01", 9), annotation("c", "2024-01-01", 4)]}
    assert spec.label_of(same_time) == "Dog"  # ties by id


def test_unusable_newest_annotation_falls_back_to_an_older_one(spec: ClassificationSpec) -> None:
    other_control = annotation("c", "2024-05-01", 5)
    other_control["result"][0]["from_name"] = "quality"
    two_choices = annotation("c", "2024-04-01", 4)
    two_choices["result"][0]["value"]["choices"] = ["c", "d"]
    unknown = annotation("Fish", "2024-03-01", 3)
    task = {"annotations": [other_control, two_choices, unknown, annotation("d", "2024-01-01", 1)]}
    assert spec.label_of(task) == "Dog"


@pytest.mark.parametrize("task", [{}, {"annotations": None}, {"annotations": []}, {"annotations": [{"result": []}]}])
def test_unlabelled_tasks(spec: ClassificationSpec, task: dict) -> None:
    assert spec.label_of(task) is None


def test_image_of_returns_the_raw_value(spec: ClassificationSpec) -> None:
    assert spec.image_of({"data": {"img": "s3://b/1.png"}}) == "s3://b/1.png"
    assert spec.image_of({"data": {"img": 5}}) == 5  # the caller validates
    assert spec.image_of({"data": {"image": "x"}}) is None
    assert spec.image_of({"data": None}) is None
    assert spec.image_of({}) is None
