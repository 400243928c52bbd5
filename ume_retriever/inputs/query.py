"""Query building: text and/or an image as one query ``Item`` (what every search surface takes)."""

from __future__ import annotations

from typing import Any

from .item import Item, as_item


def build_query(query: Any = None, image: Any = None) -> Item:
    """A query ``Item`` from text (or any input ``as_item`` accepts) and/or an image.

    ``image`` (a path, PIL image or bytes) joins the text as one multimodal query.
    """
    if image is None:
        if query is None:
            raise ValueError("a query needs text, an image, or both")
        return as_item(query)
    if query is None:
        return Item(image=image)
    item = as_item(query)
    if item.image is not None or item.images:
        raise ValueError("the query already holds an image: pass image= only with a text query")
    return Item(**{**item.__dict__, "image": image})
