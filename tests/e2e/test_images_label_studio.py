"""Image URLs as a real Label Studio 1.23.2 hands them out: uploads and local files, with and without
LOCAL_FILES_DOCUMENT_ROOT, authenticated through our client (label-studio-sdk)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from asvp_backend.labelstudio.client import LabelStudioClient
from asvp_backend.labelstudio.images import ImageFetcher, ImageFetchError
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, png_bytes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def image_tasks(label_studio):
    url, token = label_studio["url"], label_studio["token"]
    call = LabelStudioAPI(url, token).call

    project = call("POST", "/api/projects", json={"title": "images", "label_config": IMAGE_CONFIG})["id"]
    call("POST", f"/api/projects/{project}/import", files={"f": ("upload.png", png_bytes(1, size=40), "image/png")})
    folder = f"{label_studio['docroot']}/images"
    with open(f"{folder}/local.png", "wb") as fh:
        fh.write(png_bytes(2, size=48))
    storage = call("POST", "/api/storages/localfiles", json={
        "project": project, "path": folder, "regex_filter": r".*\.png", "use_blob_urls": True, "title": "local"})
    call("POST", f"/api/storages/localfiles/{storage['id']}/sync")
    tasks = call("GET", "/api/tasks", params={"project": project, "page_size": 10})["tasks"]
    by_kind = {}
    for task in tasks:
        image = task["data"]["image"]
        by_kind["upload" if image.startswith("/data/upload/") else "local"] = (task["id"], image)
    assert set(by_kind) == {"upload", "local"}, by_kind
    return by_kind


def test_uploads_and_local_files_download_with_our_token(label_studio, image_tasks):
    client = LabelStudioClient(label_studio["url"], label_studio["token"])
    fetcher = ImageFetcher(label_studio_url=label_studio["url"], auth_headers=client.auth_headers)
    upload = fetcher.load(image_tasks["upload"][1], task_id=image_tasks["upload"][0])
    local = fetcher.load(image_tasks["local"][1], task_id=image_tasks["local"][0])
    assert upload.size == (40, 40) and upload.mode == "RGB"
    assert local.size == (48, 48)
    assert Image.open(io.BytesIO(png_bytes(2, size=48))).convert("RGB").tobytes() == local.tobytes()


def test_local_files_read_from_the_document_root(label_studio, image_tasks):
    fetcher = ImageFetcher(label_studio_url=label_studio["url"], document_root=label_studio["docroot"])
    assert fetcher.load(image_tasks["local"][1]).size == (48, 48)  # no token needed: read from disk


def test_without_a_token_label_studio_refuses_and_the_reason_is_clean(label_studio, image_tasks):
    fetcher = ImageFetcher(label_studio_url=label_studio["url"],
                           auth_headers=lambda: {"Authorization": "Token wrong-token-123"})
    with pytest.raises(ImageFetchError) as caught:
        fetcher.load(image_tasks["upload"][1])
    assert "wrong-token-123" not in str(caught.value) and "401" in str(caught.value)
