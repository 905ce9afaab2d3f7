import pytest

from asvp_backend.labelstudio.label_config import LabelConfigError, parse_label_config
from tests.helpers import IMAGE_CONFIG


def test_parses_the_standard_image_classification_config():
    spec = parse_label_config(IMAGE_CONFIG)
    assert (spec.from_name, spec.to_name, spec.image_key, spec.labels) == (
        "label",
        "image",
        "image",
        ("cat", "dog"),
    )
    assert spec.result("dog") == {
        "from_name": "label",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": ["dog"]},
    }


def test_any_names_and_value_keys():
    xml = """<View><Header value="Pick"/><Image name="photo_obj" value="$photo" zoom="true"/>
      <Text name="t" value="$caption"/>
      <Choices name="sentiment" toName="t"><Choice value="pos"/><Choice value="neg"/></Choices>
      <Choices name="species" toName="photo_obj"><Choice value="A"/><Choice value="B"/><Choice value="C"/></Choices>
    </View>"""
    spec = parse_label_config(xml)
    assert (spec.from_name, spec.to_name, spec.image_key) == ("species", "photo_obj", "photo")
    assert spec.labels == ("A", "B", "C")


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "empty"),
        ("<View><Image", "not valid XML"),
        (
            '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/>'
            '<Choice value="b"/></Choices></View>',
            "no <Image>",
        ),
        ('<View><Image name="i" value="$image"/></View>', "no <Choices>"),
        (
            '<View><Image name="i" value="$image"/><Choices name="c" toName="i" choice="multiple">'
            '<Choice value="a"/><Choice value="b"/></Choices></View>',
            "several choices",
        ),
        (
            '<View><Image name="i" value="$image"/><Text name="t" value="$x"/><Choices name="c" toName="t">'
            '<Choice value="a"/><Choice value="b"/></Choices></View>',
            "bound to an <Image>",
        ),
        (
            '<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/><Choice value="b"/>'
            '</Choices><Choices name="d" toName="i"><Choice value="x"/><Choice value="y"/></Choices></View>',
            "several",
        ),
        (
            '<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
            "at least two",
        ),
        (
            '<View><Image name="i" value="image"/><Choices name="c" toName="i"><Choice value="a"/><Choice value="b"/>'
            "</Choices></View>",
            "value=",
        ),
        ('<!DOCTYPE x [<!ENTITY a "b">]><View/>', "DOCTYPE"),
    ],
)
def test_refusals_name_the_problem(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)
