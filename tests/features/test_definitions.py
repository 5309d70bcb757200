"""Feature definitions: loading, validation naming the offending field, the contract's
message, expressions, and the feature set's versions, dependencies and shared sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import duration_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from profilemesh.common.v1 import event_type_pb2
from profilemesh.features.v1 import feature_definition_pb2 as pb
from profilemesh.services.features.definitions import (
    BUILTINS,
    Aggregation,
    FeatureDefinition,
    FeatureSet,
    Operator,
    PropertyFilter,
    ValueType,
    definition_from_proto,
    definition_to_proto,
    evaluate,
    load_definitions,
    parse_expression,
)
from profilemesh.services.features.events import FeatureEvent
from profilemesh.shared.errors import InvalidArgument

from .synthetic import EXTRA_DEFINITIONS


def _fields(error: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in error.value.violations}


def _rejected(yaml_text: str) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as error:
        FeatureSet(load_definitions(yaml_text))
    return _fields(error)


# -- loading ---------------------------------------------------------------------------------


def test_a_yaml_list_loads_with_defaults_filled_in() -> None:
    (orders,) = load_definitions(
        """
        - name: orders_7d
          aggregation: count
          event_names: [Order Completed]
          window_days: 7
        """
    )
    assert orders.version == 1
    assert orders.aggregation is Aggregation.COUNT
    assert orders.value_type is ValueType.INT64
    assert orders.event_types == ()
    assert not orders.builtin and not orders.hidden


def test_a_features_mapping_loads_from_a_file_path_or_text(tmp_path: Path) -> None:
    path = tmp_path / "features.yaml"
    path.write_text(EXTRA_DEFINITIONS)
    from_path = load_definitions(path)
    assert load_definitions(str(path)) == from_path
    assert load_definitions(EXTRA_DEFINITIONS) == from_path
    assert len(from_path) > 20
    assert load_definitions("") == ()


def test_first_and_last_default_to_strings_and_derived_features_to_doubles() -> None:
    first, ratio = load_definitions(
        """
        - {name: first_plan, aggregation: first, property: plan}
        - {name: ratio, expression: orders_lifetime / 2}
        """
    )
    assert first.value_type is ValueType.STRING
    assert ratio.value_type is ValueType.DOUBLE
    assert ratio.derived and ratio.aggregation is None


# -- validation names the field --------------------------------------------------------------


def test_a_bad_window_names_the_window_of_that_definition() -> None:
    fields = _rejected(
        """
        - {name: ok, aggregation: count}
        - {name: bad, aggregation: count, window_days: 0}
        """
    )
    assert list(fields) == ["definitions[1].window_days"]


def test_windows_longer_than_ten_years_are_refused() -> None:
    fields = _rejected("[{name: decade, aggregation: count, window_days: 4000}]")
    assert list(fields) == ["definitions[0].window_days"]


def test_sum_without_a_property_names_the_property() -> None:
    fields = _rejected("[{name: revenue, aggregation: sum}]")
    assert fields == {"definitions[0].property": "sum needs the property it aggregates"}


def test_an_unknown_aggregation_names_the_aggregation() -> None:
    fields = _rejected("[{name: median_revenue, aggregation: median, property: revenue}]")
    assert list(fields) == ["definitions[0].aggregation"]
    assert "count" in fields["definitions[0].aggregation"]


@pytest.mark.parametrize(
    ("expression", "complaint"),
    [
        ("orders_lifetime ** 2", "not allowed"),
        ("__import__('os').getcwd()", "unknown function"),
        ("log(orders_lifetime, 2)", "unknown function"),
        ("min(orders_lifetime)", "two or more"),
        ("max(a=orders_lifetime, b=1)", "positional"),
        ("'a' + orders_lifetime", "only numbers"),
        ("orders_lifetime if recency_days else 0", "not allowed"),
        ("orders_lifetime +", "not a valid expression"),
        ("True * orders_lifetime", "only numbers"),
        ("orders_lifetime.real", "not allowed"),
    ],
)
def test_an_expression_outside_the_language_names_the_expression(
    expression: str, complaint: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        load_definitions(yaml.safe_dump([{"name": "odd", "expression": expression}]))
    fields = _fields(error)
    assert list(fields) == ["definitions[0].expression"]
    assert complaint in fields["definitions[0].expression"]


def test_derived_features_that_depend_on_each_other_are_a_cycle() -> None:
    fields = _rejected(
        """
        - {name: a, expression: b + 1}
        - {name: b, expression: c * 2}
        - {name: c, expression: a - orders_lifetime}
        - {name: d, expression: d}
        """
    )
    assert set(fields) == {f"definitions[{i}].expression" for i in range(4)}
    assert "a -> b -> c -> a" in fields["definitions[0].expression"]
    assert "d -> d" in fields["definitions[3].expression"]


def test_a_derived_feature_must_read_known_numeric_features() -> None:
    fields = _rejected(
        """
        - {name: plan, aggregation: last, property: plan}
        - {name: x, expression: nowhere + plan}
        """
    )
    assert fields["definitions[1].expression"] in {
        "unknown feature 'nowhere'",
        "'plan' has string values; expressions need numbers",
    }
    assert len(_rejected("[{name: x, expression: nowhere + 1}]")) == 1


def test_every_problem_is_reported_at_once() -> None:
    fields = _rejected(
        """
        - name: Bad-Name
          aggregation: count
          value_type: string
          event_types: [click]
          colour: blue
        - name: derived
          expression: orders_lifetime + 1
          window_days: 7
          property: revenue
        - name: filtered
          aggregation: count
          filters:
            - {property: currency, operator: in, value: USD}
            - {property: context, operator: exists}
            - {property: score, operator: gt, value: true}
            - {property: coupon, operator: exists, value: yes}
        - name: first_plan
          aggregation: first
          property: a..b
        - {name: builtin_flag, aggregation: count, builtin: true}
        - not a mapping
        """
    )
    assert set(fields) == {
        "definitions[0].name",
        "definitions[0].value_type",
        "definitions[0].event_types",
        "definitions[0].colour",
        "definitions[1].property",
        "definitions[1].window_days",
        "definitions[2].filters[0].value",
        "definitions[2].filters[1].property",
        "definitions[2].filters[2].value",
        "definitions[2].filters[3].value",
        "definitions[3].property",
        "definitions[4].builtin",
        "definitions[5]",
    }
    assert fields["definitions[0].colour"] == "unknown field"
    assert fields["definitions[0].value_type"] == "count gives int64 values, not string"


def test_two_different_definitions_of_one_version_are_refused() -> None:
    fields = _rejected(
        """
        - {name: orders, aggregation: count, event_names: [Order Completed]}
        - {name: orders, aggregation: count, event_names: [Order Placed]}
        """
    )
    assert list(fields) == ["definitions[1].version"]
    assert "new version" in fields["definitions[1].version"]


def test_yaml_that_is_not_a_list_of_definitions_is_refused() -> None:
    with pytest.raises(InvalidArgument) as error:
        load_definitions("features: {name: x}")
    assert list(_fields(error)) == ["definitions"]
    with pytest.raises(InvalidArgument):
        load_definitions("[unclosed")


# -- the feature set -------------------------------------------------------------------------


def test_the_latest_version_of_a_name_is_in_force_even_over_a_builtin() -> None:
    definitions = load_definitions(
        """
        - {name: orders_30d, version: 2, aggregation: count, window_days: 30,
           event_names: [Order Completed, Order Refunded]}
        - {name: extra, aggregation: count}
        - {name: extra, version: 3, aggregation: count, window_days: 3}
        """
    )
    feature_set = FeatureSet(definitions)
    assert feature_set["orders_30d"].version == 2
    assert not feature_set["orders_30d"].builtin
    assert feature_set["extra"].window_days == 3
    assert [d.name for d in feature_set].count("extra") == 1


def test_derived_features_come_after_what_they_read() -> None:
    feature_set = FeatureSet(
        load_definitions(
            """
            - {name: twice_cadence, expression: 2 * purchase_cadence_days}
            - {name: orders_180d, aggregation: count, event_names: [Order Completed],
               window_days: 180}
            """
        )
    )
    order = [d.name for d in feature_set]
    assert order.index("purchase_cadence_days") < order.index("twice_cadence")
    assert order.index("orders_180d") < order.index("purchase_cadence_days")
    closure = [d.name for d in feature_set.closure(["twice_cadence"])]
    assert closure == [
        "recency_days",
        "orders_lifetime",
        "first_order_days",
        "purchase_cadence_days",
        "twice_cadence",
    ]


def test_definitions_reading_the_same_events_the_same_way_share_one_source() -> None:
    feature_set = FeatureSet(
        load_definitions(
            """
            - {name: max_revenue, aggregation: max, property: properties.revenue,
               event_types: [track], event_names: [Order Completed]}
            - {name: orders_count_with_property, aggregation: count, property: revenue,
               event_types: [track], event_names: [Order Completed]}
            """
        )
    )
    orders = feature_set.source_of("orders_30d")
    assert feature_set.source_of("recency_days") is orders
    assert feature_set.source_of("orders_count_with_property") is orders  # count ignores it
    revenue = feature_set.source_of("revenue_90d")
    assert feature_set.source_of("max_revenue") is revenue
    assert revenue is not orders
    assert revenue.max_window_days == 365
    assert feature_set.source_of("tenure_days").max_window_days is None
    assert len({s.key for s in feature_set.sources}) == len(feature_set.sources)


def test_unknown_names_are_refused_by_position() -> None:
    with pytest.raises(InvalidArgument) as error:
        FeatureSet().closure(["orders_30d", "nope"])
    assert list(_fields(error)) == ["names[1]"]


def test_the_builtins_are_flagged_documented_and_valid() -> None:
    feature_set = FeatureSet()
    names = [d.name for d in BUILTINS]
    assert len(set(names)) == len(names)
    assert all(d.builtin and d.description for d in BUILTINS)
    for name in [
        "recency_days",
        "frequency_365d",
        "monetary_365d",
        "purchase_cadence_days",
        "tenure_days",
        "mobile_event_share_90d",
        "web_event_share_90d",
        "nps_latest",
        "nps_trend",
        "csat_latest",
        "distinct_products_viewed_90d",
    ]:
        assert name in feature_set
    assert all(not d.hidden for d in feature_set.visible)
    assert {d.name for d in feature_set.definitions} - {d.name for d in feature_set.visible} == {
        "mobile_events_90d",
        "tablet_events_90d",
        "desktop_events_90d",
        "ios_events_90d",
        "android_events_90d",
        "web_events_90d",
        "nps_avg_lifetime",
        "nps_answers_lifetime",
    }


# -- expressions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "values", "expected"),
    [
        ("(a - b) / (c - 1)", {"a": 10, "b": 4, "c": 4}, 2.0),
        ("(a - b) / (c - 1)", {"a": 10, "b": 4, "c": 1}, None),
        ("a + b", {"a": 1, "b": None}, None),
        ("coalesce(a, b, 3)", {"a": None, "b": None}, 3.0),
        ("coalesce(a, b)", {"a": None, "b": 2}, 2.0),
        ("min(a, b)", {"a": 1, "b": None}, None),
        ("max(a, -b, 0.5)", {"a": 0.25, "b": -2}, 2.0),
        ("-a * 2", {"a": 3}, -6.0),
        ("a * a", {"a": 1e200}, None),
        ("a / 0.0", {"a": 0.0}, None),
    ],
)
def test_expressions_propagate_none_and_refuse_division_by_zero(
    expression: str, values: dict[str, Any], expected: float | None
) -> None:
    assert evaluate(parse_expression(expression), values) == expected


# -- the contract's message ------------------------------------------------------------------


def test_every_visible_definition_survives_the_contract_round_trip() -> None:
    definitions = [d for d in (*BUILTINS, *load_definitions(EXTRA_DEFINITIONS)) if not d.hidden]
    for definition in definitions:
        message = definition_to_proto(definition)
        assert pb.FeatureDefinition.FromString(message.SerializeToString()) == message
        assert definition_from_proto(message) == definition


def test_the_contract_carries_windows_types_and_expressions_as_documented() -> None:
    recency = definition_to_proto(FeatureSet()["recency_days"])
    assert recency.aggregation == pb.AGGREGATION_DAYS_SINCE
    assert list(recency.event_types) == [event_type_pb2.EVENT_TYPE_TRACK]
    assert not recency.HasField("window") and recency.builtin
    cadence = definition_to_proto(FeatureSet()["purchase_cadence_days"])
    assert cadence.aggregation == pb.AGGREGATION_BUILTIN
    assert cadence.property == "(first_order_days - recency_days) / (orders_lifetime - 1)"
    tenure = definition_to_proto(FeatureSet()["tenure_days"])
    assert list(tenure.event_types) == [event_type_pb2.EVENT_TYPE_UNSPECIFIED]
    orders = definition_to_proto(FeatureSet()["orders_90d"])
    assert orders.window == duration_pb2.Duration(seconds=90 * 86_400)


def test_a_message_without_event_types_means_track_events() -> None:
    message = pb.FeatureDefinition(
        name="signups", aggregation=pb.AGGREGATION_COUNT, event_names=["Signed Up"]
    )
    assert definition_from_proto(message).event_types == ("track",)


def test_a_message_with_a_partial_day_window_names_the_window() -> None:
    message = pb.FeatureDefinition(
        name="orders_36h",
        aggregation=pb.AGGREGATION_COUNT,
        window=duration_pb2.Duration(seconds=36 * 3600),
        filters=[pb.PropertyFilter(property="currency")],
    )
    with pytest.raises(InvalidArgument) as error:
        definition_from_proto(message, where="definition")
    assert set(_fields(error)) == {"definition.window", "definition.filters[0].operator"}


def test_a_record_definition_has_no_event_type_in_the_contract() -> None:
    (crm,) = load_definitions("[{name: crm_rows, aggregation: count, event_types: [record]}]")
    with pytest.raises(InvalidArgument) as error:
        definition_to_proto(crm)
    assert list(_fields(error)) == ["event_types[0]"]


# -- filters ---------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.5, -0.0, 2.0, 1e300]),
    st.sampled_from(["USD", "EUR", "2", "2.0", " 2", "1e0", "true", "", "é"]),
    st.just({"nested": 1}),
    st.just([1, 2]),
)
_OPERANDS = st.one_of(
    st.booleans(), st.integers(-3, 3), st.sampled_from([0.5, 2.0]), st.sampled_from(["USD", "2"])
)


@st.composite
def _filters(draw: st.DrawFn) -> PropertyFilter:
    op = draw(st.sampled_from(list(Operator)))
    value: Any = None
    if op in (Operator.IN, Operator.NOT_IN):
        value = draw(st.lists(_OPERANDS, min_size=1, max_size=4))
    elif op in (Operator.GT, Operator.GE, Operator.LT, Operator.LE):
        value = draw(st.one_of(st.integers(-3, 3), st.sampled_from(["EUR", "2", 0.5])))
    elif op in (Operator.EQ, Operator.NE):
        value = draw(_OPERANDS)
    return PropertyFilter(property="currency", operator=op, value=value)


@settings(max_examples=300, deadline=None)
@given(feature_filter=_filters(), value=_SCALARS)
def test_the_compiled_filter_agrees_with_the_filters_definition(
    feature_filter: PropertyFilter, value: Any
) -> None:
    assert feature_filter.predicate(value) == feature_filter.holds_for(value)


@pytest.mark.parametrize(
    ("operator", "operand", "value", "holds"),
    [
        (Operator.EQ, 10, "10", True),  # numeric strings compare as numbers
        (Operator.EQ, "10", 10, False),  # strings compare with strings only
        (Operator.EQ, 1, True, False),  # booleans are not numbers
        (Operator.EQ, True, True, True),
        (Operator.NE, "USD", None, True),  # missing passes ne
        (Operator.GT, "EUR", "GBP", True),
        (Operator.GT, 5, " 6", False),  # not a plain decimal number
        (Operator.LE, 5, "5e0", True),
        (Operator.NOT_IN, ["USD"], None, True),
        (Operator.IN, ["USD", 7], 7.0, True),
        (Operator.EXISTS, None, None, False),
        (Operator.NOT_EXISTS, None, None, True),
    ],
)
def test_filters_compare_as_the_contract_says(
    operator: Operator, operand: Any, value: Any, holds: bool
) -> None:
    feature_filter = PropertyFilter(property="x", operator=operator, value=operand)
    event = FeatureEvent("p", 0, "track", "e", {} if value is None else {"x": value}, {})
    assert feature_filter.matches(event) is holds


def test_definitions_compare_and_hash_by_value() -> None:
    one = FeatureDefinition(name="n", aggregation=Aggregation.COUNT)
    assert one == FeatureDefinition.model_validate({"name": "n", "aggregation": "count"})
    assert len({one, FeatureDefinition(name="n", aggregation=Aggregation.COUNT)}) == 1
