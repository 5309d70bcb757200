"""The files: ``events.jsonl`` (Segment-spec JSON, one event a line, in time order), ``crm.csv``
and ``leads.csv``.

A million events through ``json.dumps`` one by one would take most of the generation's time.
Each event is instead assembled from fragments of JSON that many events share, each encoded
once: the device's ``anonymousId`` and ``context``, the person's ``userId``, a product's
properties, a page. Only orders and identifies, a few percent of the events, are encoded one
at a time. Every fragment comes from ``json.dumps``, so every line is valid JSON.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.catalog import (
    CATEGORIES,
    PAGES,
    PRICING_PAGE,
    SHOP_URL,
    WEBINARS,
    SitePage,
)
from profilemesh.services.generator.devices import DEVICE_KINDS
from profilemesh.services.generator.ids import uuids
from profilemesh.services.generator.sessions import Kind
from profilemesh.services.generator.signin import GIVEN, NOT_ASKED
from profilemesh.services.generator.world import World

LINES_PER_WRITE = 100_000
Fragment = Callable[[npt.NDArray[np.int64]], list[str]]
"""Builds the body fragments of the events at the given (sorted) positions."""


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def write_events(rng: np.random.Generator, world: World, path: Path) -> dict[str, int]:
    """Write every event to ``path`` in time order; returns the number of events per name
    (``page``, ``identify``, ``Order Completed`` ...)."""
    events, sessions = world.events, world.sessions
    order = np.argsort(events.timestamp_ms, kind="stable")
    visit = events.session[order]
    kind = events.kind[order]
    timestamps = np.datetime_as_string(
        events.timestamp_ms[order].astype("datetime64[ms]"), unit="ms", timezone="UTC"
    ).tolist()
    ids = np.array(_visit_ids(world), dtype=object)[visit].tolist()
    contexts = np.array(
        [f'"context":{world.devices.context_json(row)}' for row in range(len(world.devices))],
        dtype=object,
    )[sessions.device[visit]].tolist()
    app = np.array([k.app for k in DEVICE_KINDS])[world.devices.kind[sessions.device[visit]]]
    bodies = _bodies(world, order, visit, kind, app)
    message_ids = uuids(rng, len(order))
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for start in range(0, len(order), LINES_PER_WRITE):
            end = start + LINES_PER_WRITE
            file.write(
                "".join(
                    [
                        f'{{"messageId":"{m}","timestamp":"{t}",{i}{b},{c}}}\n'
                        for m, t, i, b, c in zip(
                            message_ids[start:end],
                            timestamps[start:end],
                            ids[start:end],
                            bodies[start:end],
                            contexts[start:end],
                            strict=True,
                        )
                    ]
                )
            )
    return _counts_by_name(kind, app)


def _visit_ids(world: World) -> list[str]:
    """Per visit, its ``userId`` (when signed in) and ``anonymousId`` members, comma-ended."""
    people, sessions, devices = world.people, world.sessions, world.devices
    anonymous = [f'"anonymousId":{_dumps(a)},' for a in devices.anonymous_id]
    return [
        (f'"userId":{_dumps(people.user_id[person])},' if signed_in else "") + anonymous[device]
        for person, device, signed_in in zip(
            sessions.person.tolist(),
            sessions.device.tolist(),
            sessions.identified.tolist(),
            strict=True,
        )
    ]


def _bodies(
    world: World,
    order: npt.NDArray[np.int64],
    visit: npt.NDArray[np.int64],
    kind: npt.NDArray[np.int64],
    app: npt.NDArray[np.bool_],
) -> list[str]:
    """The type-specific members of each event (``"type":"track","event":...``), in file
    order; ``app`` says which events come from an app (screens rather than pages)."""
    events, sessions = world.events, world.sessions
    detail = events.detail[order]
    person = sessions.person[visit]
    bodies = np.empty(len(order), dtype=object)
    builders: dict[Kind, Fragment] = {
        Kind.IDENTIFY: lambda at: _identify_bodies(world, person[at]),
        Kind.ALT_IDENTIFY: lambda at: _other_email_bodies(world, person[at]),
        Kind.PAGE: lambda at: _page_bodies(PAGES, detail[at], app[at]),
        Kind.PRICING: lambda at: _page_bodies(
            (PRICING_PAGE,), np.zeros(len(at), np.int64), app[at]
        ),
        Kind.WEBINAR: lambda at: _indexed(
            [_track("Webinar Attended", {"webinar": title}) for title in WEBINARS], detail[at]
        ),
        Kind.PRODUCT_VIEWED: lambda at: _indexed(
            [
                _track("Product Viewed", world.catalog.properties(p))
                for p in range(len(world.catalog.product_id))
            ],
            detail[at],
        ),
        Kind.ADDED_TO_CART: lambda at: _cart_bodies(world, detail[at], events.quantity[order[at]]),
        Kind.ORDER_COMPLETED: lambda at: _order_bodies(world, detail[at]),
        Kind.SURVEY_ANSWERED: lambda at: _indexed(
            [_track("Survey Answered", {"survey": "nps", "score": s}) for s in range(11)],
            detail[at],
        ),
        Kind.DEMO_BOOKED: lambda at: _demo_bodies(world, person[at]),
    }
    for event_kind, build in builders.items():
        at = np.flatnonzero(kind == event_kind)
        if len(at):
            bodies[at] = np.array(build(at), dtype=object)
    result: list[str] = bodies.tolist()
    return result


def _track(name: str, properties: Mapping[str, object]) -> str:
    return f'"type":"track","event":{_dumps(name)},"properties":{_dumps(properties)}'


def _indexed(fragments: Sequence[str], index: npt.NDArray[np.int64]) -> list[str]:
    result: list[str] = np.array(fragments, dtype=object)[index].tolist()
    return result


def _page_bodies(
    pages: Sequence[SitePage], page: npt.NDArray[np.int64], app: npt.NDArray[np.bool_]
) -> list[str]:
    """Page events from browsers, screen events from the apps."""
    fragments = [_page(p, screen=False) for p in pages] + [_page(p, screen=True) for p in pages]
    return _indexed(fragments, page + len(pages) * app.astype(np.int64))


def _page(page: SitePage, *, screen: bool) -> str:
    if screen:
        properties: dict[str, str] = {"category": page.category} if page.category else {}
        return f'"type":"screen","name":{_dumps(page.name)},"properties":{_dumps(properties)}'
    category = f',"category":{_dumps(page.category)}' if page.category else ""
    properties = {"path": page.path, "url": SHOP_URL + page.path, "title": page.title}
    return f'"type":"page","name":{_dumps(page.name)}{category},"properties":{_dumps(properties)}'


def _identify_bodies(world: World, person: npt.NDArray[np.int64]) -> list[str]:
    cache: dict[int, str] = {}
    bodies = []
    for p in person.tolist():
        if p not in cache:
            cache[p] = f'"type":"identify","traits":{_dumps(traits(world, p))}'
        bodies.append(cache[p])
    return bodies


def traits(world: World, person: int) -> dict[str, object]:
    """What the person's sign-up and sign-ins tell the shop: e-mail, name, and what they
    chose to share (phone, address, birthday, e-mail consent)."""
    people, accounts = world.people, world.accounts
    told: dict[str, object] = {
        "email": people.emails[person][0],
        "first_name": people.goes_by[person],
        "last_name": people.last_name[person],
    }
    if accounts.shares_phone[person]:
        told["phone"] = people.phone[person]
    if accounts.shares_address[person]:
        told["address"] = {
            "street": people.street[person],
            "city": people.city[person],
            "state": people.state[person],
            "postal_code": people.zip[person],
            "country": "US",
        }
    if accounts.shares_birthday[person]:
        told["birthday"] = str(people.dob[person])
    if accounts.email_consent[person] != NOT_ASKED:
        told["consent"] = {"email": bool(accounts.email_consent[person] == GIVEN)}
    return told


def _other_email_bodies(world: World, person: npt.NDArray[np.int64]) -> list[str]:
    """The identify that adds a person's other address: a lead's names their company."""
    lead_of = _lead_of_person(world)
    bodies = []
    for p in person.tolist():
        told: dict[str, object] = {"email": world.accounts.other_email[p]}
        lead = lead_of.get(p)
        if lead is not None and told["email"] == world.leads.work_email[lead]:
            told["company"] = {"name": world.leads.company[lead]}
            told["title"] = world.leads.job_title[lead]
        bodies.append(f'"type":"identify","traits":{_dumps(told)}')
    return bodies


def _lead_of_person(world: World) -> dict[int, int]:
    return {int(p): lead for lead, p in enumerate(world.leads.person)}


def _cart_bodies(
    world: World, product: npt.NDArray[np.int64], quantity: npt.NDArray[np.int64]
) -> list[str]:
    cache: dict[tuple[int, int], str] = {}
    bodies = []
    for key in zip(product.tolist(), quantity.tolist(), strict=True):
        if key not in cache:
            properties = {**world.catalog.properties(key[0]), "quantity": key[1]}
            cache[key] = _track("Added to Cart", properties)
        bodies.append(cache[key])
    return bodies


def _order_bodies(world: World, order: npt.NDArray[np.int64]) -> list[str]:
    """``Order Completed`` with Segment's e-commerce properties; its ``category`` is the one
    the most was spent on."""
    orders, catalog = world.events.orders, world.catalog
    bodies = []
    for o in order.tolist():
        lines = orders.products[o]
        spent: dict[int, float] = {}
        for product, units in lines:
            category = int(catalog.category[product])
            spent[category] = spent.get(category, 0.0) + float(catalog.price[product]) * units
        properties = {
            "order_id": orders.order_id[o],
            "revenue": float(orders.revenue[o]),
            "currency": "USD",
            "category": CATEGORIES[max(spent, key=lambda c: spent[c])].name,
            "products": [
                {**catalog.properties(product), "quantity": units} for product, units in lines
            ],
        }
        bodies.append(_track("Order Completed", properties))
    return bodies


def _demo_bodies(world: World, person: npt.NDArray[np.int64]) -> list[str]:
    lead_of = _lead_of_person(world)
    leads = world.leads
    return [
        _track(
            "Demo Booked",
            {
                "company": leads.company[lead_of[p]],
                "lead_source": leads.source_name(lead_of[p]),
            },
        )
        for p in person.tolist()
    ]


def _counts_by_name(kind: npt.NDArray[np.int64], app: npt.NDArray[np.bool_]) -> dict[str, int]:
    """Events per type (``identify``, ``page``, ``screen``) and per track event name."""
    views = (kind == Kind.PAGE) | (kind == Kind.PRICING)
    counts = {
        "identify": int(((kind == Kind.IDENTIFY) | (kind == Kind.ALT_IDENTIFY)).sum()),
        "page": int((views & ~app).sum()),
        "screen": int((views & app).sum()),
    }
    tracks = {
        Kind.PRODUCT_VIEWED: "Product Viewed",
        Kind.ADDED_TO_CART: "Added to Cart",
        Kind.ORDER_COMPLETED: "Order Completed",
        Kind.SURVEY_ANSWERED: "Survey Answered",
        Kind.WEBINAR: "Webinar Attended",
        Kind.DEMO_BOOKED: "Demo Booked",
    }
    for event_kind, name in tracks.items():
        counts[name] = int((kind == event_kind).sum())
    return counts


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> int:
    """Write ``rows`` under a header of ``columns``; returns the number of rows."""
    written = 0
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(column, "") for column in columns])
            written += 1
    return written
