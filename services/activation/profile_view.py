"""What segment evaluation sees of a profile: one cheap, flat structure per profile.

The activation service keeps a view of every profile up to date from the changes the other
services publish (traits from identity, feature values, champion scores, cluster assignments,
consent and identifiers), so that deciding whether a profile belongs to a segment reads a few
dictionaries and never calls another service. Values are plain Python, as decoded from JSON and
protobuf: numbers are ``int`` or ``float``, never ``bool`` or NumPy scalars, and an absent value
is either missing from its dictionary or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ProfileView:
    """One profile as segment expressions read it (see
    :mod:`profilemesh.services.activation.segment_expressions`)."""

    profile_id: str
    traits: dict[str, Any] = field(default_factory=dict)
    """The profile's traits: nested JSON values (``{"address": {"city": "Lyon"}}``)."""
    features: dict[str, Any] = field(default_factory=dict)
    """Feature name -> its value: a number, a string or None."""
    scores: dict[str, float] = field(default_factory=dict)
    """Model name -> its champion's score, between 0 and 1."""
    clusters: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Clustering name -> (cluster id, persona label) of the profile's cluster."""
    consent: dict[str, bool] = field(default_factory=dict)
    """Purpose -> whether the person granted it; a purpose not listed is not granted."""
    identifiers: dict[str, list[str]] = field(default_factory=dict)
    """Identifier type -> the profile's values of that type (``{"email": ["a@example.com"]}``)."""
