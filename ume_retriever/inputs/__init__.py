"""Inputs: the Item type and the readers that turn images and videos into PIL frames."""

from .item import Item, InputLike, as_item

__all__ = ["Item", "InputLike", "as_item"]
