"""Every profile as activation sees it: a :class:`ProfileView` kept up to date from the logs of
identity (identifiers, traits, consent, merges), features (values) and scoring (scores and
clusters), in memory and persisted with the consumers' offsets.

Segments are evaluated on these views, and the unified profile reads its features, scores,
clusters and segments from them, so both see the same thing. Besides the view itself, each
profile keeps the details the unified profile shows but segments do not read: a score's version
and reasons, a cluster assignment's distance and time (as serialised messages).

Merged profile ids redirect to the survivor, as everywhere in the mesh.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from profilemesh.common.v1 import profile_pb2
from profilemesh.services.activation.profile_view import ProfileView


def feature_value(value: profile_pb2.FeatureValue) -> Any:
    """A feature value as segments compare it: a number, a string, a bool or None."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "timestamp_value":
        return value.timestamp_value.ToNanoseconds() / 1e9
    return getattr(value, kind)


@dataclass(slots=True)
class Details:
    """What the unified profile shows beyond the view: full messages, by name."""

    scores: dict[str, bytes] = field(default_factory=dict)
    clusters: dict[str, bytes] = field(default_factory=dict)
    features: dict[str, bytes] = field(default_factory=dict)


class ViewTable:
    """Profile id -> view and details; changed only under the domain's lock."""

    def __init__(self) -> None:
        self._views: dict[str, ProfileView] = {}
        self._details: dict[str, Details] = {}
        self._redirects: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._redirected: set[str] = set()
        self._erased: set[str] = set()
        """Ids of deleted people. Features and scoring publish on their own logs, which can
        still carry a value for such an id after identity's deletion arrived here: it must not
        bring the view back. Cleared when identity creates a profile under the id again."""
        self._erased_changed: set[str] = set()

    # -- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._views)

    def canonical(self, profile_id: str) -> str:
        seen = 0
        while profile_id in self._redirects and seen < 1000:
            profile_id = self._redirects[profile_id]
            seen += 1
        return profile_id

    def get(self, profile_id: str) -> ProfileView | None:
        return self._views.get(self.canonical(profile_id))

    def details(self, profile_id: str) -> Details:
        return self._details.get(self.canonical(profile_id)) or Details()

    def all(self) -> Iterable[ProfileView]:
        return self._views.values()

    def ids(self) -> list[str]:
        return list(self._views)

    # -- changing -----------------------------------------------------------------------------

    def view(self, profile_id: str) -> ProfileView:
        """The live view of ``profile_id``, created empty if new; marked changed."""
        live = self.canonical(profile_id)
        found = self._views.get(live)
        if found is None:
            found = self._views[live] = ProfileView(profile_id=live)
            self._details[live] = Details()
            self._deleted.discard(live)
        self._dirty.add(live)
        return found

    def add_identifiers(self, profile_id: str, identifiers: Iterable[tuple[str, str]]) -> None:
        view = self.view(profile_id)
        for kind, value in identifiers:
            values = view.identifiers.setdefault(kind, [])
            if value not in values:
                values.append(value)

    def set_traits(self, profile_id: str, traits: Mapping[str, Any]) -> None:
        view = self.view(profile_id)
        view.traits = dict(traits)
        # Consent given as a trait (``consent: {email: true}``) counts until a consent
        # decision arrives on its own.
        consent = traits.get("consent")
        if isinstance(consent, Mapping):
            for purpose, granted in consent.items():
                if isinstance(granted, bool):
                    view.consent.setdefault(str(purpose), granted)

    def set_consent(self, profile_id: str, consents: Iterable[profile_pb2.ConsentState]) -> None:
        view = self.view(profile_id)
        for consent in consents:
            view.consent[consent.purpose] = consent.granted

    def is_erased(self, profile_id: str) -> bool:
        """Whether ``profile_id`` belongs to a deleted person (see :meth:`erase`)."""
        return self.canonical(profile_id) in self._erased

    def set_features(self, profile_id: str, values: Iterable[profile_pb2.FeatureValue]) -> None:
        if self.is_erased(profile_id):
            return
        view = self.view(profile_id)
        details = self._details[view.profile_id]
        for value in values:
            # Interned: every profile has the same few dozen names; without it, each keeps
            # its own copies (protobuf hands out a new string on every access).
            name = sys.intern(value.name)
            view.features[name] = feature_value(value)
            details.features[name] = value.SerializeToString()

    def set_score(self, profile_id: str, score: profile_pb2.ProfileScore) -> None:
        if self.is_erased(profile_id):
            return
        view = self.view(profile_id)
        view.scores[score.model] = score.score
        self._details[view.profile_id].scores[score.model] = score.SerializeToString()

    def set_cluster(self, profile_id: str, assignment: profile_pb2.ClusterAssignment) -> None:
        if self.is_erased(profile_id):
            return
        view = self.view(profile_id)
        view.clusters[assignment.clustering] = (assignment.cluster_id, assignment.persona)
        self._details[view.profile_id].clusters[assignment.clustering] = (
            assignment.SerializeToString()
        )

    def clear_scores(self, profile_id: str) -> None:
        # Only a profile still live under this id: a merged one's survivor keeps its own.
        live = profile_id
        view = self._views.get(live)
        if view is not None:
            view.scores.clear()
            view.clusters.clear()
            self._details[live].scores.clear()
            self._details[live].clusters.clear()
            self._dirty.add(live)

    def clear_features(self, profile_id: str) -> None:
        # Only a profile still live under this id: a merged one's survivor keeps its own.
        live = profile_id
        view = self._views.get(live)
        if view is not None:
            view.features.clear()
            self._details[live].features.clear()
            self._dirty.add(live)

    def merge(self, survivor: str, others: Iterable[str]) -> list[str]:
        """Fold ``others`` into ``survivor`` (identifiers and consent; traits, features and
        scores follow from their own logs) and redirect them; the ids actually absorbed."""
        target = self.view(survivor)
        absorbed = []
        for other in others:
            live = self.canonical(other)
            if live == target.profile_id:
                continue
            view = self._views.pop(live, None)
            self._details.pop(live, None)
            if view is not None:
                for kind, values in view.identifiers.items():
                    mine = target.identifiers.setdefault(kind, [])
                    mine.extend(v for v in values if v not in mine)
                for purpose, granted in view.consent.items():
                    target.consent.setdefault(purpose, granted)
            self._redirects[live] = target.profile_id
            self._redirected.add(live)
            self._dirty.discard(live)
            self._deleted.add(live)
            absorbed.append(live)
        return absorbed

    def split(self, original: str, resulting: Mapping[str, list[tuple[str, str]]]) -> None:
        """An unmerge: each resulting profile gets exactly its identifiers (ids an earlier merge
        retired come back)."""
        base = self._views.get(self.canonical(original))
        for profile_id, identifiers in resulting.items():
            if self._redirects.pop(profile_id, None) is not None:
                self._redirected.add(profile_id)
            view = self.view(profile_id)
            view.identifiers = {}
            for kind, value in identifiers:
                view.identifiers.setdefault(kind, []).append(value)
            if base is not None and view is not base:
                view.consent = dict(base.consent)

    def erase(self, profile_id: str) -> str:
        """A deleted person: drop the view and ignore late values for the id; the id erased."""
        live = self.delete(profile_id)
        self._erased.add(live)
        self._erased_changed.add(live)
        return live

    def revive(self, profile_id: str) -> None:
        """Identity created a profile under ``profile_id`` (again): values count for it."""
        if profile_id in self._erased:
            self._erased.discard(profile_id)
            self._erased_changed.add(profile_id)

    def delete(self, profile_id: str) -> str:
        live = self.canonical(profile_id)
        self._views.pop(live, None)
        self._details.pop(live, None)
        self._dirty.discard(live)
        self._deleted.add(live)
        return live

    # -- persistence --------------------------------------------------------------------------

    @staticmethod
    def _to_json(view: ProfileView, details: Details) -> str:
        return json.dumps(
            {
                "traits": view.traits,
                "features": view.features,
                "scores": view.scores,
                "clusters": {k: list(v) for k, v in view.clusters.items()},
                "consent": view.consent,
                "identifiers": view.identifiers,
                "details": {
                    "scores": {k: v.hex() for k, v in details.scores.items()},
                    "clusters": {k: v.hex() for k, v in details.clusters.items()},
                    "features": {k: v.hex() for k, v in details.features.items()},
                },
            },
            separators=(",", ":"),
            default=str,
        )

    def load(self, connection: sqlite3.Connection) -> None:
        for profile_id, text in connection.execute("SELECT profile_id, view FROM activation_views"):
            data = json.loads(text)
            self._views[profile_id] = ProfileView(
                profile_id=profile_id,
                traits=data["traits"],
                features=data["features"],
                scores=data["scores"],
                clusters={k: (int(v[0]), str(v[1])) for k, v in data["clusters"].items()},
                consent=data["consent"],
                identifiers=data["identifiers"],
            )
            stored = data["details"]
            self._details[profile_id] = Details(
                scores={k: bytes.fromhex(v) for k, v in stored["scores"].items()},
                clusters={k: bytes.fromhex(v) for k, v in stored["clusters"].items()},
                features={k: bytes.fromhex(v) for k, v in stored["features"].items()},
            )
        self._redirects = dict(
            connection.execute("SELECT profile_id, surviving_id FROM activation_redirects")
        )
        self._erased = {
            p for (p,) in connection.execute("SELECT profile_id FROM activation_erased")
        }

    def save(self, tx: sqlite3.Connection) -> None:
        tx.executemany(
            "INSERT OR REPLACE INTO activation_views (profile_id, view) VALUES (?, ?)",
            [
                (p, self._to_json(self._views[p], self._details[p]))
                for p in self._dirty
                if p in self._views
            ],
        )
        tx.executemany(
            "DELETE FROM activation_views WHERE profile_id = ?",
            [(p,) for p in self._deleted if p not in self._views],
        )
        for profile_id in self._redirected:
            target = self._redirects.get(profile_id)
            if target is None:
                tx.execute("DELETE FROM activation_redirects WHERE profile_id = ?", (profile_id,))
            else:
                tx.execute(
                    "INSERT OR REPLACE INTO activation_redirects VALUES (?, ?)",
                    (profile_id, target),
                )
        for profile_id in self._erased_changed:
            if profile_id in self._erased:
                tx.execute("INSERT OR IGNORE INTO activation_erased VALUES (?)", (profile_id,))
            else:
                tx.execute("DELETE FROM activation_erased WHERE profile_id = ?", (profile_id,))
        self._dirty.clear()
        self._deleted.clear()
        self._redirected.clear()
        self._erased_changed.clear()


def traits_of(struct: Any) -> dict[str, Any]:
    converted: dict[str, Any] = json_format.MessageToDict(struct)
    return converted
