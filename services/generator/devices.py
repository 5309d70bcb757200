"""The phones, computers and tablets people shop from, each with its anonymous id.

A person has one to three devices of their own. Half of the households of several customers
also share a "family tablet": one device id (the app's vendor id) that every member uses, each
signed in as themselves. That shared id is the classic trap of identity resolution: joining on
it would merge a family into one profile.

Apps (iOS, Android) send screens and a ``context.device.id``; browsers run analytics.js, which
sends pages and no device id. Every device row has its own ``anonymous_id``, the id an SDK
gives a visitor before they sign in; on the family tablet each member has their own, because
the app resets it when one signs out and another signs in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.catalog import APP_NAME
from profilemesh.services.generator.ids import hex_ids, uuids


@dataclass(frozen=True, slots=True)
class DeviceKind:
    """A kind of device and the SDK it runs: what lands in an event's ``context``."""

    label: str
    type: str
    """``context.device.type``: ``mobile``, ``desktop`` or ``tablet``."""
    os: str
    os_versions: tuple[str, ...]
    library: str
    library_version: str
    app: bool
    """An app (screens, a device id) rather than a browser (pages, a user agent)."""
    manufacturer: str = ""
    models: tuple[str, ...] = ()


DEVICE_KINDS = (
    DeviceKind(
        "iPhone app",
        "mobile",
        "iOS",
        ("17.6", "18.1", "18.3"),
        "analytics-ios",
        "4.1.8",
        True,
        "Apple",
        ("iPhone14,5", "iPhone15,2", "iPhone16,1"),
    ),
    DeviceKind(
        "Android phone app",
        "mobile",
        "Android",
        ("13", "14", "15"),
        "analytics-android",
        "4.11.3",
        True,
        "samsung",
        ("SM-S911B", "SM-A546B", "SM-G991U"),
    ),
    DeviceKind(
        "iPhone browser", "mobile", "iOS", ("17.6", "18.1"), "analytics.js", "2.11.1", False
    ),
    DeviceKind(
        "Android browser", "mobile", "Android", ("14", "15"), "analytics.js", "2.11.1", False
    ),
    DeviceKind(
        "Windows computer", "desktop", "Windows", ("10", "11"), "analytics.js", "2.11.1", False
    ),
    DeviceKind("Mac", "desktop", "Mac OS X", ("14.6", "15.1"), "analytics.js", "2.11.1", False),
    DeviceKind(
        "iPad app",
        "tablet",
        "iPadOS",
        ("17.6", "18.1"),
        "analytics-ios",
        "4.1.8",
        True,
        "Apple",
        ("iPad13,18", "iPad14,1"),
    ),
    DeviceKind(
        "Android tablet app",
        "tablet",
        "Android",
        ("13", "14"),
        "analytics-android",
        "4.11.3",
        True,
        "samsung",
        ("SM-X710", "SM-X200"),
    ),
)
_PERSONAL_WEIGHTS = np.array([0.24, 0.18, 0.08, 0.07, 0.22, 0.13, 0.05, 0.03])
_FAMILY_TABLETS = np.array([6, 7])
_FAMILY_TABLET_WEIGHTS = np.array([0.65, 0.35])
FAMILY_TABLET_SHARE = 0.5
"""Share of the households of two or more that share a tablet."""
_DEVICE_COUNTS = np.array([1, 2, 3])
_DEVICE_COUNT_WEIGHTS = np.array([0.45, 0.38, 0.17])
_USER_AGENTS = {
    "iOS": "Mozilla/5.0 (iPhone; CPU iPhone OS {u} like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/{v} Mobile/15E148 Safari/604.1",
    "Android": "Mozilla/5.0 (Linux; Android {v}) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36",
    "Windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like "
    "Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mac OS X": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Version/{v} Safari/605.1.15",
}


@dataclass(frozen=True, slots=True)
class Devices:
    """One row per (person, device); a family tablet has a row for each member using it."""

    person: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int64]
    """Index into :data:`DEVICE_KINDS`."""
    device_id: list[str]
    """``context.device.id``; empty for browsers, the same for every row of a family tablet."""
    anonymous_id: list[str]
    os_version: list[str]
    model: list[str]
    share: npt.NDArray[np.float64]
    """Share of the person's sessions on this device; a person's shares sum to 1."""
    family_tablet: npt.NDArray[np.bool_]
    first_row: npt.NDArray[np.int64]
    """Per person, their first row; a person's rows are consecutive."""
    row_count: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.person)

    def context(self, row: int) -> dict[str, object]:
        """The Segment ``context`` of the events sent from this row's device."""
        kind = DEVICE_KINDS[int(self.kind[row])]
        library = {"name": kind.library, "version": kind.library_version}
        if not kind.app:
            version = self.os_version[row]
            agent = _USER_AGENTS[kind.os].format(v=version, u=version.replace(".", "_"))
            return {
                "library": library,
                "device": {"type": kind.type},
                "userAgent": agent,
            }
        version = self.os_version[row]
        return {
            "app": {"name": APP_NAME, "version": "5.2.0"},
            "device": {
                "id": self.device_id[row],
                "type": kind.type,
                "manufacturer": kind.manufacturer,
                "model": self.model[row],
            },
            "library": library,
            "os": {"name": kind.os, "version": version},
        }

    def context_json(self, row: int) -> str:
        """:meth:`context` as compact JSON."""
        return json.dumps(self.context(row), separators=(",", ":"))


def build_devices(rng: np.random.Generator, household: npt.NDArray[np.int64]) -> Devices:
    """Each person's own devices, and the family tablets of some households."""
    count = len(household)
    own = rng.choice(_DEVICE_COUNTS, size=count, p=_DEVICE_COUNT_WEIGHTS)
    tablet_of_household = _family_tablets(rng, household)
    has_tablet = tablet_of_household[household] >= 0
    rows_per_person = own + has_tablet
    total = int(rows_per_person.sum())
    person = np.repeat(np.arange(count, dtype=np.int64), rows_per_person)
    first_row = np.concatenate(([0], np.cumsum(rows_per_person)[:-1])).astype(np.int64)
    # Within a person's rows, their own devices come first and the family tablet last.
    position = np.arange(total, dtype=np.int64) - first_row[person]
    family = position >= own[person]
    kind = rng.choice(len(DEVICE_KINDS), size=total, p=_PERSONAL_WEIGHTS)
    tablet_kind = rng.choice(
        _FAMILY_TABLETS, size=len(tablet_of_household), p=_FAMILY_TABLET_WEIGHTS
    )
    kind = np.where(family, tablet_kind[household[person]], kind)
    share = rng.gamma(2.0, 1.0, total) * np.where(family, 0.4, 1.0)
    share = share / np.bincount(person, weights=share, minlength=count)[person]
    device_id = _device_ids(rng, kind, family, household[person], len(tablet_of_household))
    versions, models = _versions_and_models(
        rng, kind, family, household[person], len(tablet_of_household)
    )
    return Devices(
        person=person,
        kind=kind.astype(np.int64),
        device_id=device_id,
        anonymous_id=uuids(rng, total),
        os_version=versions,
        model=models,
        share=share,
        family_tablet=family,
        first_row=first_row,
        row_count=rows_per_person.astype(np.int64),
    )


def _family_tablets(
    rng: np.random.Generator, household: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Per household number, 0 when it shares a tablet and -1 when not."""
    size = np.bincount(household)
    shares = (size >= 2) & (rng.random(len(size)) < FAMILY_TABLET_SHARE)
    return np.where(shares, 0, -1).astype(np.int64)


def _device_ids(
    rng: np.random.Generator,
    kind: npt.NDArray[np.int64],
    family: npt.NDArray[np.bool_],
    household: npt.NDArray[np.int64],
    households: int,
) -> list[str]:
    """iOS vendor ids (upper-case UUIDs), Android ids (16 hex digits), none for browsers;
    a family tablet's rows share their household's id."""
    apple = uuids(rng, len(kind), upper=True)
    android = hex_ids(rng, len(kind))
    tablet_apple = uuids(rng, households, upper=True)
    tablet_android = hex_ids(rng, households)
    ids = []
    for row, k in enumerate(kind):
        device = DEVICE_KINDS[int(k)]
        if not device.app:
            ids.append("")
        elif family[row]:
            h = int(household[row])
            ids.append(tablet_apple[h] if device.os == "iPadOS" else tablet_android[h])
        else:
            ids.append(apple[row] if device.library == "analytics-ios" else android[row])
    return ids


def _versions_and_models(
    rng: np.random.Generator,
    kind: npt.NDArray[np.int64],
    family: npt.NDArray[np.bool_],
    household: npt.NDArray[np.int64],
    households: int,
) -> tuple[list[str], list[str]]:
    """OS version and model of each row; a family tablet's rows describe the same tablet."""
    picks = rng.integers(0, 1 << 30, size=(len(kind) + households, 2))
    pick_of_row = np.where(family, len(kind) + household, np.arange(len(kind)))
    versions, models = [], []
    for row, k in enumerate(kind):
        device = DEVICE_KINDS[int(k)]
        version, model = picks[pick_of_row[row]]
        versions.append(device.os_versions[version % len(device.os_versions)])
        models.append(device.models[model % len(device.models)] if device.models else "")
    return versions, models
