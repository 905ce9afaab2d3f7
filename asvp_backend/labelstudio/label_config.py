"""Parse a Label Studio label config into what an image classifier needs.

We serve exactly one thing: a single-choice <Choices> bound to an <Image>. Everything else is refused with
a message that Label Studio shows to the user when the backend is connected.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass


class LabelConfigError(ValueError):
    """The label config is valid for Label Studio but not one this backend can serve."""


@dataclass(frozen=True)
class ClassificationSpec:
    """The names a prediction must use, and the label list in the config's order."""

    from_name: str  # the <Choices name>
    to_name: str  # the <Image name>
    image_key: str  # the task data key of the image ($image -> "image")
    labels: tuple[str, ...]

    def result(self, label: str) -> dict:
        """One classification region in Label Studio's prediction format."""
        return {
            "from_name": self.from_name,
            "to_name": self.to_name,
            "type": "choices",
            "value": {"choices": [label]},
        }


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

    images = {el.get("name"): el for el in root.iter() if el.tag == "Image" and el.get("name")}
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
    image = images[control.get("toName")]
    value = image.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f'the <Image name="{image.get("name")}"> needs value="$<task data key>"')
    labels = tuple(el.get("value") or el.get("alias") or "" for el in control.iter("Choice"))
    labels = tuple(label for label in labels if label)
    if len(labels) < 2:
        raise LabelConfigError("the <Choices> needs at least two <Choice> labels")
    if len(set(labels)) != len(labels):
        raise LabelConfigError("the <Choices> has duplicate labels")
    if not control.get("name"):
        raise LabelConfigError("the <Choices> has no name")
    return ClassificationSpec(
        from_name=control.get("name"),
        to_name=image.get("name"),
        image_key=value[1:],
        labels=labels,
    )
