"""Identifiers: the nodes of the identity graph, written ``type:value``."""

from __future__ import annotations

from typing import NamedTuple

USER_ID = "user_id"
ANONYMOUS_ID = "anonymous_id"
EMAIL = "email"
PHONE = "phone"
DEVICE_ID = "device_id"
ADVERTISING_ID = "advertising_id"
CRM_ID = "crm_id"


class Identifier(NamedTuple):
    """One way of recognising a person, e.g. ``Identifier("email", "ada@example.com")``.

    Values held by the graph are normalised (see :mod:`.normalizers`); a tuple keeps them cheap
    as dictionary keys, which is what the graph does with them millions of times.
    """

    type: str
    value: str

    @property
    def key(self) -> str:
        """The identifier as one string, ``type:value``: how it is stored and shown."""
        return f"{self.type}:{self.value}"

    @classmethod
    def parse(cls, key: str) -> Identifier:
        """The identifier written as ``type:value`` (:attr:`key`).

        Types never contain a colon (they are lower_snake_case), so the first colon separates
        them from values that may (``crm_id:salesforce:0031``).
        """
        type_, separator, value = key.partition(":")
        if not separator or not type_:
            raise ValueError(f"not an identifier key (type:value): {key!r}")
        return cls(type_, value)
