"""Pictures in API requests: every way a client gives one becomes the hash of a picture kept in the store.

A client sends a picture as base64 (or a data: URL), as the id of an image in the history (what `images[].id` of a
finished generation says), or as the sha256 of a picture it sent before. Each is decoded and checked once, here
(engine/inputs.py says what is refused and what is converted), kept content-addressed by the store, and the request
that goes in the queue names it by hash: small, storable, and what the PNG's metadata records.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..engine import RequestError
from ..engine.inputs import Picture, decode
from ..store import HistoryStore

SHA256 = re.compile(r"[0-9a-f]{64}")
IMAGE_ID = re.compile(r"[0-9a-f]{32}")
log = logging.getLogger(__name__)
PICTURE = "a picture: base64 PNG/JPEG/WebP (or a data: URL), the id of an image in the history, or a stored sha256"


def keep_pictures(fields: dict[str, Any], store: HistoryStore) -> dict[str, Any]:
    """The request fields with `init_image`, `mask` and each `image_prompts[].image` as the hash of a stored
    picture; what was done to them (an animation's first frame, an EXIF rotation...) goes to the log. Thread pool
    only.

    Raises:
        RequestError: one message per picture that cannot be used, naming its field.
    """
    out, notes, problems = dict(fields), [], []

    def keep(value: Any, name: str, mask: bool = False) -> Any:
        try:
            picture = _picture(value, name, mask, store)
        except RequestError as exc:
            problems.extend(exc.messages)
            return value
        if picture is None:
            return value
        notes.extend(picture.notes)
        return store.save_picture(picture)

    for name in ("init_image", "mask"):
        if out.get(name) is not None:
            out[name] = keep(out[name], name, mask=name == "mask")
    if isinstance(out.get("image_prompts"), list):
        out["image_prompts"] = [
            p | {"image": keep(p["image"], f"image_prompts.{i}.image")} if isinstance(p, dict) and "image" in p else p
            for i, p in enumerate(out["image_prompts"])
        ]
    if problems:
        raise RequestError(problems)
    for note in notes:
        log.info("%s", note)
    return out


def _picture(value: Any, name: str, mask: bool, store: HistoryStore) -> Picture | None:
    """The picture a field gives; None when it already names a stored one by hash."""
    if isinstance(value, bytes):  # a file of a multipart form
        return decode(value, name, mask=mask)
    if not isinstance(value, str):
        raise RequestError([f"{name}: must be {PICTURE}"])
    if SHA256.fullmatch(value):
        if store.picture_file(value).is_file():
            return None
        raise RequestError([f"{name}: no stored picture has sha256 {value}"])
    if IMAGE_ID.fullmatch(value):
        record = store.get_image(value)
        if record is None:
            raise RequestError([f"{name}: no image {value} in the history"])
        try:
            return decode(store.image_file(record).read_bytes(), name, mask=mask)
        except OSError:
            raise RequestError([f"{name}: the file of image {value} is gone from the output folder"]) from None
    return decode(value, name, mask=mask)
