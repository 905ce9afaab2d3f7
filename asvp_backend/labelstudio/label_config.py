"""Parse a Label Studio label config into what an image classifier needs.

We serve exactly one thing: a single-choice <Choices> bound to an <Image>. Everything else is refused with
a message that Label Studio shows to the user when the backend is connected.

A ``<Choice value="Cat" alias="c"/>`` is shown as "Cat" but written into annotation results as "c": Label
Studio stores ``alias`` when present, else ``value`` (label-studio-sdk 2.1.2,
``label_studio_sdk/label_interface/label_tags.py`` line 65: ``tag.attrib.get("alias") or
tag.attrib.get("value")``; the editor's ``selectedValues``: ``c.alias ? c.alias : c.value``). So the spec
keeps both: ``labels`` (the canonical names our proxy and rankings use) and ``result_values`` (what results
hold). Reading results accepts either, as Label Studio's own ``findLabel`` does.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cached_property
from typing import Any


class LabelConfigError(ValueError):
    """The label config is valid for Label Studio but not one this backend can serve."""


@dataclass(frozen=True)
class ClassificationSpec:
    """The names a prediction must use, and the label list in the config's order.

    JSON: ``dataclasses.asdict`` and back with ``ClassificationSpec(**data)``; list fields are turned into
    tuples here, and states saved before ``result_values`` existed load with it defaulting to ``labels``.
    """

    from_name: str  # the <Choices name>
    to_name: str  # the <Image name>
    image_key: str  # the task data key of the image ($image -> "image")
    labels: tuple[str, ...]  # canonical label names: each <Choice>'s value (its alias if it has no value)
    result_values: tuple[str, ...] = ()  # aligned with labels: what Label Studio writes (alias, else value)

    def __post_init__(self) -> None:
        labels = tuple(self.labels)
        written = tuple(self.result_values) or labels
        if len(written) != len(labels):
            raise ValueError(f"result_values has {len(written)} entries for {len(labels)} labels")
        object.__setattr__(self, "labels", labels)  # frozen: JSON gives lists, equality needs tuples
        object.__setattr__(self, "result_values", written)

    @cached_property
    def _written_of(self) -> dict[str, str]:
        return dict(zip(self.labels, self.result_values, strict=True))

    @cached_property
    def _label_of_written(self) -> dict[str, str]:
        # what Label Studio writes wins; a result holding the shown value (written before an alias was
        # added, or imported) still counts, like the editor's findLabel (alias === v || value === v)
        shown = {label: label for label in self.labels}
        return shown | dict(zip(self.result_values, self.labels, strict=True))

    def result(self, label: str) -> dict[str, Any]:
        """One classification region in Label Studio's prediction format, writing the label's alias.

        Prefer ``prediction_result``, which also refuses labels the config no longer has; an unknown label
        is written as given here (the old behaviour, kept until every caller has moved).
        """
        return {
            "from_name": self.from_name,
            "to_name": self.to_name,
            "type": "choices",
            "value": {"choices": [self._written_of.get(label, label)]},
        }

    def prediction_result(self, label: str) -> list[dict[str, Any]]:
        """The ``result`` of a pre-annotation for ``label``: one region, or none when the config no longer
        has that label (edited since the round), so Label Studio is never offered a choice it cannot show."""
        return [self.result(label)] if label in self._written_of else []

    def label_of(self, task: dict[str, Any]) -> str | None:
        """The task's label: the newest non-cancelled annotation's single choice for our <Choices>, as a
        canonical name from ``labels``; None when unlabelled or the choice is not in the config."""
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        annotations.sort(key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id") or 0))
        for annotation in reversed(annotations):
            for region in annotation.get("result") or []:
                if region.get("from_name") != self.from_name or region.get("type") != "choices":
                    continue
                choices = (region.get("value") or {}).get("choices") or []
                if len(choices) == 1 and isinstance(choices[0], str) and choices[0] in self._label_of_written:
                    return self._label_of_written[choices[0]]
        return None

    def image_of(self, task: dict[str, Any]) -> object:
        """The raw value of the task's image key (None when absent); the caller validates it."""
        data = task.get("data")
        return data.get(self.image_key) if isinstance(data, dict) else None


def parse_label_config(xml: str) -> ClassificationSpec:
    """Find the <Image> and its single-choice <Choices>; raise LabelConfigError otherwise."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise LabelConfigError("label configs with DOCTYPE or ENTITY declarations are not accepted")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"the label config is not valid XML: {exc}") from None

    images = {name: el for el in root.iter() if el.tag == "Image" and (name := el.get("name"))}
    if not images:
        raise LabelConfigError("the label config has no <Image> object; this backend classifies images")
    choices = [el for el in root.iter() if el.tag == "Choices"]
    if not choices:
        raise LabelConfigError("the label config has no <Choices> control; this backend predicts one choice")

    bound = [c for c in choices if c.get("toName") in images]
    if not bound:
        raise LabelConfigError(
            "no <Choices> is bound to an <Image> (toName must name one of: " + ", ".join(sorted(images)) + ")"
        )
    single = [c for c in bound if (c.get("choice") or "single").lower() in {"single", "single-radio"}]
    if not single:
        raise LabelConfigError('the <Choices> bound to the image allows several choices; use choice="single"')
    if len(single) > 1:
        names = ", ".join(c.get("name", "?") for c in single)
        raise LabelConfigError(f"several single-choice <Choices> are bound to images ({names}); keep one")

    control = single[0]
    image_name = control.get("toName") or ""
    value = images[image_name].get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f'the <Image name="{image_name}"> needs value="$<task data key>"')
    pairs = [
        (el.get("value") or el.get("alias") or "", el.get("alias") or el.get("value") or "")
        for el in control.iter("Choice")
    ]
    pairs = [(shown, written) for shown, written in pairs if shown]
    labels = tuple(shown for shown, _ in pairs)
    written = tuple(w for _, w in pairs)
    if len(labels) < 2:
        raise LabelConfigError("the <Choices> needs at least two <Choice> labels")
    if len(set(labels)) != len(labels):
        raise LabelConfigError("the <Choices> has duplicate labels")
    if len(set(written)) != len(written):
        raise LabelConfigError("two <Choice> write the same value into results (duplicate alias); make them unique")
    from_name = control.get("name")
    if not from_name:
        raise LabelConfigError("the <Choices> has no name")
    return ClassificationSpec(
        from_name=from_name,
        to_name=image_name,
        image_key=value[1:],
        labels=labels,
        result_values=written,
    )
