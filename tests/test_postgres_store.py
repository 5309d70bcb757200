"""The PostgreSQL consumer store: the SQLite dialect translated faithfully (or refused, naming the
statement), migrations that run once however many replicas start together, write transactions
that exclude each other across replicas, and the services' own SQL giving the same results on
both backends — up to the whole mesh with every store in PostgreSQL.

The consumer contract (commit atomicity, rollback, skipping what was applied, resuming) runs on
both stores in ``tests/test_log_contract.py``; the identity graph's store tests in
``tests/test_identity_store.py``, the record matcher's and identity's privacy tables too.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from profilemesh.services.activation.store import SCHEMA as ACTIVATION_SCHEMA
from profilemesh.services.features.registry import Registry
from profilemesh.services.features.state import ProfileState
from profilemesh.services.features.state_table import StateTable
from profilemesh.services.identity import consent, deletions, suppression
from profilemesh.services.identity.record_matching import RecordMatcher
from profilemesh.services.identity.store import GraphStore
from profilemesh.services.scoring import rescoring
from profilemesh.shared import deletion_reports
from profilemesh.shared.log import outbox, partition_leases, stores
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.outbox import Outbox
from profilemesh.shared.log.postgres_store import PostgresConsumerStore, Row
from profilemesh.shared.log.sql_dialect import Dialect, Table, UntranslatableSql
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.settings import PostgresSettings, Settings
from tests.features.synthetic import by_profile, feature_set, history
from tests.log_backends import APPLIED_SCHEMA
from tests.postgres_server import PostgresServer
from tests.store_backends import StoreHarness

_schemas = itertools.count(1)


def translated(sql: str, *scripts: str) -> str:
    """``sql`` in PostgreSQL's dialect, after learning the tables of ``scripts``."""
    dialect = Dialect()
    for script in scripts:
        dialect.translate_script(script)
    result = dialect.translate(sql).sql
    assert result is not None
    return " ".join(result.split())


def refused(sql: str, *scripts: str) -> str:
    """Why ``sql`` has no translation (the error names the statement)."""
    dialect = Dialect()
    for script in scripts:
        dialect.translate_script(script)
    with pytest.raises(UntranslatableSql) as raised:
        dialect.translate(sql)
    assert " ".join(sql.split()) in str(raised.value)
    return raised.value.reason


KV = "CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL, n INTEGER NOT NULL DEFAULT 0)"


# -- the dialect ----------------------------------------------------------------------------------


def test_placeholders_become_psycopg_ones_and_percent_signs_are_doubled() -> None:
    assert (
        translated("SELECT v FROM kv WHERE k = ? AND v <> '?' AND v <> '50%' AND n % 2 = ?")
        == "SELECT v FROM kv WHERE k = %s AND v <> '?' AND v <> '50%%' AND n %% 2 = %s"
    )


def test_insert_or_ignore_does_nothing_on_any_conflict() -> None:
    assert (
        translated("INSERT OR IGNORE INTO kv (k, v) VALUES (?, ?)")
        == "INSERT INTO kv (k, v) VALUES (%s, %s) ON CONFLICT DO NOTHING"
    )


def test_insert_or_replace_upserts_on_the_primary_key_and_resets_the_columns_not_given() -> None:
    assert translated("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", KV) == (
        "INSERT INTO kv (k, v) VALUES (%s, %s)"
        " ON CONFLICT (k) DO UPDATE SET v = excluded.v, n = DEFAULT"
    )
    # Without a column list: every column, in declaration order.
    assert translated("REPLACE INTO kv VALUES (?, ?, ?)", KV) == (
        "INSERT INTO kv (k, v, n) VALUES (%s, %s, %s)"
        " ON CONFLICT (k) DO UPDATE SET v = excluded.v, n = excluded.n"
    )
    keys_only = "CREATE TABLE pairs (a TEXT, b TEXT, PRIMARY KEY (a, b)) WITHOUT ROWID"
    assert translated("INSERT OR REPLACE INTO pairs VALUES (?, ?)", keys_only) == (
        "INSERT INTO pairs (a, b) VALUES (%s, %s) ON CONFLICT (a, b) DO NOTHING"
    )


def test_insert_or_replace_is_refused_where_sqlite_would_do_something_else() -> None:
    assert "no schema script" in refused("INSERT OR REPLACE INTO nowhere VALUES (?)")
    unique = "CREATE TABLE u (id INTEGER PRIMARY KEY, email TEXT UNIQUE)"
    assert "unique constraints" in refused("INSERT OR REPLACE INTO u VALUES (?, ?)", unique)
    assert "OR FAIL" in refused("INSERT OR FAIL INTO kv VALUES (?, ?, ?)", KV)


def test_an_upsert_reads_bare_columns_as_the_existing_rows() -> None:
    assert translated(
        "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k)"
        " DO UPDATE SET n = n + 1, v = excluded.v WHERE n < 10",
        KV,
    ) == (
        "INSERT INTO kv (k, v) VALUES (%s, %s) ON CONFLICT (k)"
        " DO UPDATE SET n = kv.n + 1, v = excluded.v WHERE kv.n < 10"
    )


def test_tables_get_postgresql_types_and_sqlite_rowids_become_identity_columns() -> None:
    script = """
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        body BLOB NOT NULL,
        score REAL,
        name TEXT NOT NULL DEFAULT '',
        CHECK (score >= 0)
    );
    CREATE TABLE IF NOT EXISTS keyed (
        id INTEGER NOT NULL, label VARCHAR(20), PRIMARY KEY (id)
    );
    CREATE TABLE IF NOT EXISTS plain (id INTEGER PRIMARY KEY, x INT) WITHOUT ROWID;
    PRAGMA journal_mode = WAL;
    CREATE UNIQUE INDEX IF NOT EXISTS events_by_name ON events (name);
    """
    dialect = Dialect()
    statements = [" ".join(s.split()) for s in dialect.translate_script(script)]
    assert statements == [
        "CREATE TABLE IF NOT EXISTS events ("
        " id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        " body BYTEA NOT NULL,"
        " score DOUBLE PRECISION,"
        " name TEXT COLLATE \"C\" NOT NULL DEFAULT '',"
        " CHECK (score >= 0) )",
        # A table-level key on one INTEGER column is a rowid too...
        "CREATE TABLE IF NOT EXISTS keyed ("
        ' id BIGINT GENERATED BY DEFAULT AS IDENTITY NOT NULL, label TEXT COLLATE "C",'
        " PRIMARY KEY (id) )",
        # ... but not in a WITHOUT ROWID table, where SQLite assigns nothing.
        "CREATE TABLE IF NOT EXISTS plain ( id BIGINT PRIMARY KEY, x BIGINT )",
        "CREATE UNIQUE INDEX IF NOT EXISTS events_by_name ON events (name)",
    ]
    assert dialect.tables["events"] == Table(
        "events", ("id", "body", "score", "name"), ("id",), "id", (("name",),)
    )
    assert dialect.tables["keyed"].rowid_column == "id"
    assert dialect.tables["plain"].rowid_column is None
    # An INSERT into a rowid table can return the rowid it assigned (lastrowid).
    insert = dialect.translate("INSERT INTO keyed (label) VALUES (?)")
    assert insert.rowid_sql == "INSERT INTO keyed (label) VALUES (%s) RETURNING id"
    assert dialect.translate("INSERT INTO plain VALUES (1, 2)").rowid_sql is None


def test_definitions_without_an_exact_equivalent_are_refused() -> None:
    assert "type none" in refused("CREATE TABLE t (a)")
    assert "NUMERIC" in refused("CREATE TABLE t (a NUMERIC)")
    assert "reserved" in refused("CREATE TABLE t (user TEXT)")
    assert "ON CONFLICT" in refused("CREATE TABLE t (a TEXT PRIMARY KEY ON CONFLICT REPLACE)")
    assert "not supported" in refused("CREATE VIEW v AS SELECT k FROM kv")
    assert "COLLATE" in refused("CREATE TABLE t (a TEXT COLLATE NOCASE)")


def test_offset_is_a_column_name_or_the_keyword_after_limit() -> None:
    applied = APPLIED_SCHEMA
    assert translated("SELECT partition, offset FROM applied ORDER BY offset", applied) == (
        'SELECT partition, "offset" FROM applied ORDER BY "offset"'
    )
    assert translated("SELECT offset FROM applied WHERE offset > ? LIMIT ? OFFSET ?", applied) == (
        'SELECT "offset" FROM applied WHERE "offset" > %s LIMIT %s OFFSET %s'
    )
    assert translated(
        "INSERT INTO applied (partition, offset, payload, count) VALUES (?, ?, ?, 1)"
        " ON CONFLICT (partition, offset) DO UPDATE SET count = count + 1",
        applied,
    ) == (
        'INSERT INTO applied (partition, "offset", payload, count) VALUES (%s, %s, %s, 1)'
        ' ON CONFLICT (partition, "offset") DO UPDATE SET count = applied.count + 1'
    )


def test_limit_minus_one_is_limit_all_and_subqueries_in_from_get_an_alias() -> None:
    assert translated(
        "DELETE FROM kv WHERE k IN (SELECT k FROM (SELECT k FROM kv ORDER BY k LIMIT -1 OFFSET ?))"
    ) == (
        "DELETE FROM kv WHERE k IN"
        " (SELECT k FROM (SELECT k FROM kv ORDER BY k LIMIT ALL OFFSET %s) AS _subquery1)"
    )
    assert translated("SELECT x.k FROM (SELECT k FROM kv) x") == (
        "SELECT x.k FROM (SELECT k FROM kv) x"
    )
    assert "LIMIT offset, count" in refused("SELECT k FROM kv LIMIT 5, 10")


def test_functions_translate_when_they_mean_the_same_and_are_refused_otherwise() -> None:
    assert translated(
        "SELECT max(n, 1), min(n, ?, 3), max(n), ifnull(v, ''), count(*) FROM kv"
    ) == ("SELECT greatest(n, 1), least(n, %s, 3), max(n), coalesce(v, ''), count(*) FROM kv")
    assert translated("SELECT CAST(v AS INTEGER), CAST(n AS TEXT) FROM kv") == (
        "SELECT CAST(v AS BIGINT), CAST(n AS TEXT) FROM kv"
    )
    assert "sum()" in refused("SELECT sum(n) FROM kv")  # numeric in PostgreSQL
    assert "group_concat()" in refused("SELECT group_concat(v) FROM kv")
    assert "json_extract()" in refused("SELECT json_extract(v, '$.a') FROM kv")


def test_sqlite_only_operators_and_words_translate_or_are_refused() -> None:
    assert translated("SELECT k FROM kv WHERE n == 1 AND v = x'00ff' AND n = 0x10") == (
        "SELECT k FROM kv WHERE n = 1 AND v = '\\x00ff'::bytea AND n = 16"
    )
    assert translated("SELECT k FROM kv WHERE v IS NOT NULL") == (
        "SELECT k FROM kv WHERE v IS NOT NULL"
    )
    assert "IS NOT DISTINCT FROM" in refused("SELECT k FROM kv WHERE v IS ?")
    assert "LIKE" in refused("SELECT k FROM kv WHERE v LIKE 'a%'")
    assert "rowid" in refused("SELECT rowid FROM kv")
    assert "parameter :k" in refused("SELECT v FROM kv WHERE k = :k")
    assert "CURRENT_TIMESTAMP" in refused("SELECT CURRENT_TIMESTAMP")


def test_transaction_control_and_pragmas() -> None:
    dialect = Dialect()
    assert dialect.translate("BEGIN IMMEDIATE").control == "BEGIN"
    assert dialect.translate("END TRANSACTION").control == "COMMIT"
    assert dialect.translate("ROLLBACK").control == "ROLLBACK"
    assert dialect.translate("PRAGMA secure_delete=ON").sql is None
    assert "savepoints" in refused("ROLLBACK TO SAVEPOINT x")
    with pytest.raises(UntranslatableSql, match="own transaction"):
        dialect.translate_script("BEGIN; CREATE TABLE t (a TEXT); COMMIT;")


def test_columns_added_dropped_or_renamed_later_are_learned() -> None:
    dialect = Dialect()
    dialect.translate_script(KV)
    [added] = dialect.translate_script("ALTER TABLE kv ADD COLUMN note TEXT")
    assert added == 'ALTER TABLE kv ADD COLUMN note TEXT COLLATE "C"'
    assert dialect.tables["kv"].columns == ("k", "v", "n", "note")
    dialect.translate_script("ALTER TABLE kv RENAME COLUMN note TO remark")
    dialect.translate_script("ALTER TABLE kv DROP COLUMN n")
    assert dialect.tables["kv"].columns == ("k", "v", "remark")
    assert dialect.translate("INSERT OR REPLACE INTO kv (k) VALUES (?)").sql == (
        "INSERT INTO kv (k) VALUES (%s) ON CONFLICT (k) DO UPDATE SET v = DEFAULT, remark = DEFAULT"
    )
    dialect.translate_script("DROP TABLE IF EXISTS kv")
    assert "kv" not in dialect.tables


def test_translations_are_cached_per_statement() -> None:
    dialect = Dialect()
    dialect.translate_script(KV)
    first = dialect.translate("SELECT v FROM kv WHERE k = ?")
    assert dialect.translate("SELECT v FROM kv WHERE k = ?") is first


SERVICE_SCRIPTS = {
    "identity graph": GraphStore.schema(),
    "record matching": RecordMatcher.schema(),
    "suppressions": suppression.SCHEMA,
    "consent": consent.SCHEMA,
    "deletions": deletions.SCHEMA,
    "feature definitions": Registry.schema(),
    "feature states": StateTable.schema(),
    "activation": ACTIVATION_SCHEMA,
    "rescoring": rescoring.SCHEMA,
    "outbox": outbox.SCHEMA,
    "deletion reports": deletion_reports.SCHEMA,
    "partition leases": partition_leases.SCHEMA,
}


@pytest.mark.parametrize("script", SERVICE_SCRIPTS.values(), ids=SERVICE_SCRIPTS.keys())
def test_every_schema_of_the_services_translates(script: str) -> None:
    assert Dialect().translate_script(script)


# -- the store ------------------------------------------------------------------------------------


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> PostgresServer:
    return postgres_server


def new_schema(name: str = "store") -> str:
    return f"pgstore{next(_schemas)}_{name}"


@pytest.fixture
def store(postgres: PostgresServer) -> Iterator[PostgresConsumerStore]:
    opened = PostgresConsumerStore(postgres.dsn, new_schema(), pool_max=3)
    opened.schema(KV)
    yield opened
    opened.close()


def count_rows(store: PostgresConsumerStore, table: str) -> int:
    return int(store.read(lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]))


def test_a_script_runs_once_and_a_later_replica_still_learns_its_tables(
    postgres: PostgresServer,
) -> None:
    schema = new_schema()
    script = f"{KV};\nINSERT INTO kv (k, v) VALUES ('seeded', 'once');"
    first = PostgresConsumerStore(postgres.dsn, schema)
    first.schema(script)
    first.schema(script)
    second = PostgresConsumerStore(postgres.dsn, schema)  # another replica, or a restart
    second.schema(script)
    try:
        assert count_rows(second, "kv") == 1
        assert second.dialect.tables["kv"].primary_key == ("k",)
        with second.transaction() as tx:
            tx.execute("INSERT OR REPLACE INTO kv (k, v) VALUES ('seeded', 'replaced')")
        assert first.read(lambda c: c.execute("SELECT v, n FROM kv").fetchall()) == [
            ("replaced", 0)
        ]
        recorded = first.read(
            lambda c: c.connection.execute("SELECT script FROM schema_migrations").fetchall()
        )
        assert recorded == [(script,)]
    finally:
        first.close()
        second.close()


def test_replicas_starting_together_apply_a_script_exactly_once(postgres: PostgresServer) -> None:
    schema = new_schema()
    script = (
        "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, at INTEGER NOT NULL);\n"
        "INSERT INTO runs (at) VALUES (1);"
    )
    replicas = 6
    barrier = threading.Barrier(replicas)
    errors: list[BaseException] = []
    opened: list[PostgresConsumerStore] = []

    def start() -> None:
        try:
            store = PostgresConsumerStore(postgres.dsn, schema, pool_min=1, pool_max=2)
            opened.append(store)
            barrier.wait(timeout=30)
            store.schema(script)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert not errors
        assert count_rows(opened[0], "runs") == 1
        assert count_rows(opened[0], "schema_migrations") == 1
    finally:
        for store in opened:
            store.close()


def test_ensure_column_adds_a_column_once_and_upserts_then_know_it(
    store: PostgresConsumerStore,
) -> None:
    with store.transaction() as tx:
        tx.execute("INSERT INTO kv (k, v) VALUES ('a', 'old')")
    store.ensure_column("kv", "note", "TEXT")
    store.ensure_column("kv", "note", "TEXT")
    with store.transaction() as tx:
        tx.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", ("b", "new", 2, "noted"))
    rows = store.read(lambda c: c.execute("SELECT k, v, n, note FROM kv ORDER BY k").fetchall())
    assert rows == [("a", "old", 0, None), ("b", "new", 2, "noted")]


def test_a_write_transaction_waits_for_another_replicas_to_commit(
    postgres: PostgresServer, store: PostgresConsumerStore
) -> None:
    other = PostgresConsumerStore(postgres.dsn, store.schema_name)  # the same store elsewhere
    other.schema(KV)
    order: list[str] = []
    inside = threading.Event()

    def replica() -> None:
        inside.wait(timeout=10)
        with other.transaction() as tx:
            order.append("other began")
            value = tx.execute("SELECT v FROM kv WHERE k = 'x'").fetchone()
            order.append(f"other saw {value[0]}")

    thread = threading.Thread(target=replica)
    thread.start()
    try:
        with store.transaction() as tx:
            tx.execute("INSERT INTO kv (k, v) VALUES ('x', 'first')")
            inside.set()
            time.sleep(0.3)  # the other replica is waiting for the store's lock by now
            order.append("first commits")
        thread.join(timeout=10)
        assert order == ["first commits", "other began", "other saw first"]
    finally:
        other.close()


def test_a_failed_transaction_leaves_nothing_and_reads_cannot_write(
    store: PostgresConsumerStore,
) -> None:
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.execute("INSERT INTO kv (k, v) VALUES ('lost', 'x')")
        raise RuntimeError("the handler failed")
    assert count_rows(store, "kv") == 0
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        store.read(lambda c: c.execute("INSERT INTO kv (k, v) VALUES ('no', 'x')"))


def test_the_connection_answers_like_sqlite3(store: PostgresConsumerStore) -> None:
    store.schema("CREATE TABLE log (id INTEGER PRIMARY KEY, line TEXT NOT NULL)")
    with store.transaction() as tx:
        first = tx.execute("INSERT INTO log (line) VALUES (?)", ("one",)).lastrowid
        second = tx.execute("INSERT INTO log (line) VALUES (?)", ("two",)).lastrowid
        assert (first, second) == (1, 2)
        assert tx.execute("PRAGMA foreign_keys=ON").fetchall() == []
        many = tx.executemany("INSERT INTO kv (k, v, n) VALUES (?, ?, ?)", [("a", "x", True)])
        assert many.rowcount == 1
        with pytest.raises(UntranslatableSql, match="the store commits"):
            tx.execute("COMMIT")

    def rows(connection: Any) -> list[Any]:
        connection.row_factory = sqlite3.Row
        try:
            return connection.execute("SELECT k, n FROM kv").fetchall()
        finally:
            connection.row_factory = None

    [row] = store.read(rows)
    assert isinstance(row, Row)
    assert dict(row) == {"k": "a", "n": 1}  # a boolean is stored as 1, as SQLite does
    assert (row["k"], row[1]) == ("a", 1)
    cursor = store.read(lambda c: c.execute("SELECT line FROM log ORDER BY id"))
    assert [line for (line,) in cursor] == ["one", "two"]
    assert store.scrub()


def test_statements_without_a_translation_fail_with_the_statement(
    store: PostgresConsumerStore,
) -> None:
    with pytest.raises(UntranslatableSql, match=r"group_concat\(\).*SELECT group_concat"):
        store.read(lambda c: c.execute("SELECT group_concat(v) FROM kv"))
    with pytest.raises(UntranslatableSql, match="type none"):
        store.schema("CREATE TABLE loose (anything)")


def test_each_store_keeps_its_tables_in_a_schema_of_its_own(postgres: PostgresServer) -> None:
    one = PostgresConsumerStore(postgres.dsn, new_schema("one"))
    two = PostgresConsumerStore(postgres.dsn, new_schema("two"))
    try:
        for store, value in ((one, "1"), (two, "2")):
            store.schema(KV)
            with store.transaction() as tx:
                tx.execute("INSERT INTO kv (k, v) VALUES ('k', ?)", (value,))
                store.commit_offset(tx, "consumer", "events", 0, int(value))
        assert one.read(lambda c: c.execute("SELECT v FROM kv").fetchall()) == [("1",)]
        assert two.committed("consumer", "events") == {0: 2}
    finally:
        one.close()
        two.close()


def test_a_pool_too_small_for_a_transaction_and_a_read_is_refused(
    postgres: PostgresServer,
) -> None:
    with pytest.raises(ValueError, match="pool_max"):
        PostgresConsumerStore(postgres.dsn, new_schema(), pool_max=1)
    with pytest.raises(ValueError, match="schema name"):
        PostgresConsumerStore(postgres.dsn, "Bad-Name")


# -- choosing the store from the settings ---------------------------------------------------------


def test_the_settings_choose_the_store(tmp_path: Path, postgres: PostgresServer) -> None:
    embedded = Settings(data_dir=tmp_path)
    store = stores.open_store(embedded, "identity", "identity")
    assert isinstance(store, SqliteConsumerStore)
    assert store.path == tmp_path / "identity" / "identity.sqlite"
    store.close()

    scale_out = Settings(
        data_dir=tmp_path, backend="postgres", postgres=PostgresSettings(dsn=postgres.dsn)
    )
    opened: Any = stores.open_store(scale_out, "identity", "identity")
    assert isinstance(opened, PostgresConsumerStore)
    assert opened.schema_name == "profilemesh_identity"
    opened.close()
    assert stores.postgres_schema("scoring", "models") == "profilemesh_scoring_models"
    with pytest.raises(ValueError, match="PROFILEMESH_POSTGRES__DSN"):
        stores.open_store(Settings(backend="postgres"), "identity", "identity")


# -- the services' tables, on both stores ---------------------------------------------------------


def test_feature_states_round_trip_through_merges_splits_and_deletions(
    stores: StoreHarness,
) -> None:
    store = stores.open("features")
    store.schema(StateTable.schema())
    features = feature_set()
    table = StateTable()
    groups = by_profile(history(5, profiles=12))
    for events in groups.values():
        for event in events:
            table.apply(event, features)
    ids = sorted(groups)
    table.merge(ids[0], ids[1:3])
    table.delete(ids[3])
    with store.transaction() as tx:
        table.save(tx)
    revived = ProfileState()  # an unmerge revives a retired id, rebuilt from its events
    for event in groups[ids[1]]:
        revived.apply(event, features)
    table.rebuild({ids[1]: revived})
    with store.transaction() as tx:
        table.save(tx)

    loaded = StateTable()
    store.read(loaded.load)
    assert len(loaded) == len(table)
    now = 10**19
    for profile_id in ids:
        assert loaded.canonical(profile_id) == table.canonical(profile_id)
        assert loaded.values(profile_id, features, now) == table.values(profile_id, features, now)


def test_feature_definitions_are_replaced_by_key(stores: StoreHarness) -> None:
    store = stores.open("features")
    store.schema(Registry.schema())
    statement = "INSERT OR REPLACE INTO feature_definitions VALUES (?, ?, ?, ?, ?)"
    with store.transaction() as tx:
        tx.execute(statement, ("orders", 1, "{}", "BACKFILLING", 10))
        tx.execute(statement, ("orders", 1, "{}", "ACTIVE", 10))
        tx.execute(statement, ("orders", 2, "{}", "BACKFILLING", 20))
    rows = store.read(
        lambda c: c.execute(
            "SELECT name, version, state FROM feature_definitions ORDER BY version"
        ).fetchall()
    )
    assert [tuple(r) for r in rows] == [("orders", 1, "ACTIVE"), ("orders", 2, "BACKFILLING")]


def test_scores_and_clusters_are_replaced_per_profile_and_model(stores: StoreHarness) -> None:
    store = stores.open("scoring")
    store.schema(rescoring.SCHEMA)
    with store.transaction() as tx:
        for score in (0.25, 0.75):  # what Rescorer.rescore writes, twice
            tx.execute(
                "INSERT OR REPLACE INTO profile_scores VALUES (?, ?, ?, ?, ?, ?)",
                ("p1", "churn", "v1", score, 5, '[["recency", 0.5]]'),
            )
        tx.execute(
            "INSERT OR REPLACE INTO profile_clusters VALUES (?, ?, ?, ?)", ("p1", "rfm", "v1", 3)
        )
        tx.execute(
            "INSERT OR REPLACE INTO profile_clusters VALUES (?, ?, ?, ?)", ("p2", "rfm", "v1", 1)
        )
    [stored] = store.read(lambda c: rescoring.stored_scores(c, "p1"))
    assert (stored.model, stored.score, stored.reasons) == ("churn", 0.75, [("recency", 0.5)])
    assert [tuple(r) for r in store.read(lambda c: rescoring.stored_clusters(c, "p1"))] == [
        ("rfm", "v1", 3)
    ]
    with store.transaction() as tx:
        rescoring.forget(tx, "p1")
    assert store.read(lambda c: rescoring.stored_scores(c, "p1")) == []
    assert store.read(lambda c: rescoring.stored_clusters(c, "p2")) != []


def test_owed_deletion_reports_are_recorded_once_per_job(stores: StoreHarness) -> None:
    store = stores.open("scoring")
    store.schema(deletion_reports.SCHEMA)
    with store.transaction() as tx:
        deletion_reports.owe(tx, "del_1")
        deletion_reports.owe(tx, "del_1", "a later failure")
        deletion_reports.owe(tx, "")
    owed = store.read(lambda c: c.execute("SELECT job_id, error FROM deletion_reports").fetchall())
    assert [tuple(r) for r in owed] == [("del_1", "a later failure")]


async def test_the_outbox_publishes_in_order_what_committed_transactions_queued(
    stores: StoreHarness, tmp_path: Path
) -> None:
    store = stores.open("activation")
    log = await EmbeddedLog.open(tmp_path / "log", "activations", partitions=2)
    try:
        box = Outbox(store, log)
        with store.transaction() as tx:
            box.put(tx, [(f"k{i % 3}", f"m{i}".encode()) for i in range(10)])
        with pytest.raises(RuntimeError), store.transaction() as tx:
            box.put(tx, [("k0", b"rolled back")])
            raise RuntimeError
        assert await box.publish_pending() == 10
        assert await box.publish_pending() == 0
        payloads = [
            record.payload
            for partition in range(2)
            async for batch in log.subscribe(partition, 0, stop_at_end=True)
            for record in batch
        ]
        assert sorted(payloads) == sorted(f"m{i}".encode() for i in range(10))
    finally:
        await log.close()


# -- the whole mesh, every store in PostgreSQL ----------------------------------------------------


@pytest.fixture
def stores_in_postgresql(
    monkeypatch: pytest.MonkeyPatch, postgres: PostgresServer
) -> Iterator[list[PostgresConsumerStore]]:
    """Every service opens its stores in PostgreSQL (schemas of this test's own), as with
    ``backend: postgres``; the logs stay embedded, so that only the stores change."""
    prefix = f"mesh{next(_schemas)}"
    opened: list[PostgresConsumerStore] = []

    def open_store(settings: Settings, service: str, name: str) -> Any:
        schema = f"{prefix}_{stores.postgres_schema(service, name)}"
        store = PostgresConsumerStore(postgres.dsn, schema, pool_min=1, pool_max=4)
        opened.append(store)
        return store

    monkeypatch.setattr(stores, "open_store", open_store)
    yield opened


async def run_in_mesh(
    settings: Settings, test: Callable[[Any], Awaitable[None]], make_mesh: Callable[..., Any]
) -> None:
    mesh = make_mesh(settings)
    for service in mesh.services:
        await service.start()
    try:
        await test(mesh)
    finally:
        for service in reversed(mesh.services):
            if service.server is not None:
                await service.stop()


async def test_a_person_flows_through_all_five_services_with_their_stores_in_postgresql(
    stores_in_postgresql: list[PostgresConsumerStore], mesh_settings: Settings
) -> None:
    from tests import test_end_to_end

    await run_in_mesh(
        mesh_settings,
        test_end_to_end.test_a_person_flows_through_all_five_services,
        test_end_to_end.Mesh,
    )
    assert {s.schema_name.split("_", 1)[1] for s in stores_in_postgresql} >= {
        "profilemesh_identity",
        "profilemesh_features",
        "profilemesh_scoring",
        "profilemesh_activation",
        # What a restarted pod must not lose: models, tokens, every service's audit log.
        "profilemesh_scoring_registry",
        "profilemesh_identity_tokens",
        "profilemesh_identity_audit",
        "profilemesh_scoring_audit",
    }


async def test_consent_reaches_activation_with_the_stores_in_postgresql(
    stores_in_postgresql: list[PostgresConsumerStore], mesh_settings: Settings
) -> None:
    from tests import test_consent, test_end_to_end

    await run_in_mesh(
        mesh_settings,
        test_consent.test_consent_is_recorded_dated_and_seen_by_activation,
        test_end_to_end.Mesh,
    )


@pytest.fixture
async def features_mesh(
    stores_in_postgresql: list[PostgresConsumerStore],
    mesh_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Any]:
    from tests import test_features_service

    # Without partition leases, as one replica of each service: these tests expect identity to
    # see one partition's events before another's (the older profile survives a merge), which
    # holds when every partition is consumed from the start, not when each starts once leased.
    monkeypatch.setattr(PostgresConsumerStore, "shared", False)
    mesh = test_features_service.Mesh(mesh_settings)
    services = [mesh.ingestion, mesh.identity, mesh.features]
    for service in services:
        await service.start()
    yield mesh
    for service in reversed(services):
        if service.server is not None:
            await service.stop()


@pytest.mark.parametrize(
    "name",
    [
        "test_events_update_features_and_a_merge_combines_them_exactly",
        "test_an_unmerge_splits_the_state_by_identifier",
        "test_a_new_definition_is_backfilled_then_served",
        "test_state_survives_a_restart",
    ],
)
async def test_the_features_service_with_its_store_in_postgresql(
    features_mesh: Any, name: str
) -> None:
    from tests import test_features_service

    await getattr(test_features_service, name)(features_mesh)
