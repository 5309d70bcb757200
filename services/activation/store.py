"""The activation service's tables, in its consumer store (one SQLite file).

Everything that must agree commits together: a batch of the logs activation follows, the
profile views it changed, the membership transitions those caused and the deliveries they
queued. Deliveries are the outbox: a row exists exactly when a transition that a destination
listens to happened, so nothing is sent that did not happen and nothing that happened is lost.

Columns added since a store could first have been made are also in :data:`ADDED_COLUMNS`:
:func:`prepare` adds them where they are missing.
"""

from __future__ import annotations

from profilemesh.shared.log.sqlite_store import SqliteConsumerStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS activation_views (
    profile_id TEXT PRIMARY KEY,
    view TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS activation_redirects (
    profile_id TEXT PRIMARY KEY,
    surviving_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments (
    segment_id TEXT PRIMARY KEY,
    segment BLOB NOT NULL,
    catalog TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS memberships (
    segment_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    entered_at INTEGER NOT NULL,
    PRIMARY KEY (segment_id, profile_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS memberships_by_profile ON memberships (profile_id);
CREATE TABLE IF NOT EXISTS membership_history (
    seq INTEGER PRIMARY KEY,
    profile_id TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    transition INTEGER NOT NULL,
    occurred_at INTEGER NOT NULL,
    message_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS membership_history_by_profile
    ON membership_history (profile_id, occurred_at);
CREATE INDEX IF NOT EXISTS membership_history_by_segment
    ON membership_history (segment_id, occurred_at);
CREATE TABLE IF NOT EXISTS destinations (
    destination_id TEXT PRIMARY KEY,
    destination BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    destination_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    trigger INTEGER NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT NOT NULL,
    fields TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    last_attempt_at INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    trace_context TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_destination ON deliveries (destination_id, state);
CREATE INDEX IF NOT EXISTS deliveries_by_profile_day
    ON deliveries (destination_id, profile_id, last_attempt_at);
CREATE TABLE IF NOT EXISTS activation_erased (
    profile_id TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS activation_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""

ADDED_COLUMNS = (
    # The trace context of the transaction that queued a delivery (JSON of its W3C headers),
    # so that sending it continues that trace; NULL when there was none.
    ("deliveries", "trace_context", "TEXT"),
)
"""(table, column, declaration) of the columns older stores were made without."""


def prepare(store: SqliteConsumerStore) -> None:
    """Create activation's tables in ``store``, or bring an older store's up to date."""
    store.schema(SCHEMA)
    for table, column, declaration in ADDED_COLUMNS:
        store.ensure_column(table, column, declaration)
