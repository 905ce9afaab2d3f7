"""Generated label configs (issue 12, item 3): `parse_label_config` returns a spec or raises LabelConfigError,
never anything else, whatever the XML; and /setup answers such a config with a 400 that says why, never a 500."""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asvp_backend.labelstudio.label_config import ClassificationSpec, LabelConfigError, parse_label_config
from tests.helpers import IMAGE_CONFIG
from tests.unit.test_server import make_client

BOUNDED = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])
XML_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)  # what XML 1.0 can carry
NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,15}", fullmatch=True)
TAGS = ["Image", "Choices", "Choice", "View", "Text", "Labels", "Label", "Header", "RectangleLabels", "Style"]


def parse_or_refuse(xml: str) -> ClassificationSpec | None:
    try:
        return parse_label_config(xml)
    except LabelConfigError as exc:
        assert str(exc), "a refusal must say why"
        return None


def classification(image: str, control: str, key: str, choices: list[str], choice: str = "single") -> str:
    items = "".join(f"<Choice value={quoteattr(c)}/>" for c in choices)
    return (f"<View><Image name={quoteattr(image)} value={quoteattr('$' + key)}/>"
            f"<Choices name={quoteattr(control)} toName={quoteattr(image)} choice={quoteattr(choice)}>{items}</Choices>"
            "</View>")


@BOUNDED
@given(image=NAME, control=NAME, key=NAME, choices=st.lists(XML_TEXT, max_size=8))
def test_generated_classification_configs_are_parsed_exactly(image, control, key, choices):
    spec = parse_or_refuse(classification(image, control, key, choices))
    named = [c for c in choices if c]
    if len(named) >= 2 and len(set(named)) == len(named):
        assert spec is not None and spec.labels == tuple(named)
        assert (spec.from_name, spec.to_name, spec.image_key) == (control, image, key)
    else:
        assert spec is None


@st.composite
def element(draw: st.DrawFn, depth: int = 0) -> str:
    tag = draw(st.sampled_from(TAGS))
    attrs = draw(st.dictionaries(st.sampled_from(["name", "toName", "value", "alias", "choice"]),
                                 st.one_of(NAME, XML_TEXT, st.just("$image"), st.just("multiple")), max_size=4))
    body = " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items())
    children = draw(st.lists(element(depth + 1), max_size=3)) if depth < 3 else []
    return f"<{tag} {body}>{''.join(children)}{escape(draw(XML_TEXT))}</{tag}>"


@BOUNDED
@given(xml=element())
def test_random_trees_of_label_studio_tags_are_parsed_or_refused(xml):
    parse_or_refuse(xml)


@BOUNDED
@given(text=st.text(max_size=300), cut=st.integers(0, len(IMAGE_CONFIG)), insert=st.text(max_size=20))
@example(text="", cut=0, insert="\x00")
def test_arbitrary_and_mangled_text_is_parsed_or_refused(text, cut, insert):
    parse_or_refuse(text)
    parse_or_refuse(IMAGE_CONFIG[:cut] + insert + IMAGE_CONFIG[cut:])
    parse_or_refuse(IMAGE_CONFIG[:cut])


LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'
                    for i in range(1, 10))
          + ']><View><Image name="image" value="$image"/><Choices name="c" toName="image">'
            '<Choice value="&lol9;"/><Choice value="b"/></Choices></View>')
HOSTILE = {
    "billion laughs": LAUGHS,
    "external entity": '<!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]><View><Text value="&x;"/></View>',
    "parameter entity": '<!DOCTYPE v [<!ENTITY % p SYSTEM "http://169.254.169.254/">%p;]><View/>',
    "external DTD": '<!DOCTYPE View SYSTEM "http://169.254.169.254/x.dtd"><View/>',
    "undeclared entity": IMAGE_CONFIG.replace('value="cat"', 'value="&x;"'),
    "processing instruction": '<?xml-stylesheet href="http://169.254.169.254/"?>' + IMAGE_CONFIG,
    "xinclude": IMAGE_CONFIG.replace("<View>", '<View xmlns:xi="http://www.w3.org/2001/XInclude">'
                                               '<xi:include href="file:///etc/passwd" parse="text"/>'),
    "utf-16 declaration": '<?xml version="1.0" encoding="UTF-16"?>' + IMAGE_CONFIG,
    "unknown encoding": '<?xml version="1.0" encoding="x-no-such"?>' + IMAGE_CONFIG,
    "nested 100k deep": "<View>" * 100_000 + "</View>" * 100_000,
    "100k siblings": "<View>" + '<Choice value="x"/>' * 100_000 + "</View>",
    "nul byte": IMAGE_CONFIG.replace("cat", "c\x00t"),
    "two roots": IMAGE_CONFIG + IMAGE_CONFIG,
    "namespaced tags": IMAGE_CONFIG.replace("<Image", '<ns:Image xmlns:ns="urn:x"'),
    "cdata": IMAGE_CONFIG.replace('<Choice value="cat"/>', "<![CDATA[<Choice value='x'/>]]>"),
    "bom": "\ufeff" + IMAGE_CONFIG,
    "only whitespace": " \n\t ",
}


@pytest.mark.parametrize("xml", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_xml_is_parsed_or_refused_and_never_expanded(xml):
    spec = parse_or_refuse(xml)
    if spec is not None:
        assert all(len(label) < 1000 for label in spec.labels)  # no entity was expanded into a label


@pytest.mark.parametrize("xml", list(HOSTILE.values())[:8] + ["<View>" * 5000, "<", "<View><Image/></View>"],
                         ids=[*list(HOSTILE)[:8], "nested", "lone bracket", "nameless image"])
def test_setup_answers_a_bad_config_with_a_400_that_says_why(tmp_path, xml):
    client, _ = make_client(tmp_path)
    response = client.post("/setup", json={"project": 3, "schema": xml})
    assert response.status_code in (200, 400), response.text[:300]
    if response.status_code == 400:
        assert response.json()["detail"]
