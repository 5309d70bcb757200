"""The default configuration: person records with names, birth date, address, phone, email and
national id, whatever their columns are called.

One configuration for every file: comparisons on attributes a file does not have are skipped,
and column synonyms (:mod:`~profilemesh.services.identity.matching.attributes`) map FEBRL's
``given_name``/``surname``/``soc_sec_id`` and a CRM's ``first_name``/``last_name``/``zip`` onto
the same attributes. Nothing here is tuned to one data set.
"""

from __future__ import annotations

from profilemesh.services.identity.matching.library import (
    address_comparison,
    block_on,
    block_on_swapped,
    damerau_levenshtein_at_thresholds,
    date_comparison,
    identifier_comparison,
    key,
    name_comparison,
)
from profilemesh.services.identity.matching.settings import BlockingTransform, MatchSettings

DEFAULT_COMPARISONS = (
    name_comparison(
        "first_name",
        swapped_with="last_name",
        nicknames=True,
        in_other_field="last_name",
        term_frequency_adjustments=True,
    ),
    name_comparison("last_name", swapped_with="first_name", term_frequency_adjustments=True),
    date_comparison("dob"),
    identifier_comparison("national_id"),
    damerau_levenshtein_at_thresholds("email", (1,)),
    damerau_levenshtein_at_thresholds("phone", (1,)),
    # One comparison for the whole address: its parts are one fact, shared by a household.
    address_comparison("full_address"),
)

# Each rule joins on two fields (or one identifier), selective enough for large files; together
# they still find pairs with errors in several fields. Surname's first three letters survive a
# typo near its end. A rule too broad for a given file is skipped there (see blocking).
DEFAULT_BLOCKING_RULES = (
    block_on("first_name", "last_name"),
    block_on_swapped("first_name", "last_name"),
    block_on("dob"),
    block_on("national_id"),
    block_on("email"),
    block_on("phone"),
    block_on("postcode", "street_number"),
    block_on("street", "street_number"),
    block_on("street", "city"),
    block_on("city", "postcode"),
    block_on("first_name", key("last_name", BlockingTransform.PREFIX, prefix_length=3)),
)

DEFAULT = MatchSettings(
    blocking_rules=DEFAULT_BLOCKING_RULES,
    comparisons=DEFAULT_COMPARISONS,
    match_threshold=0.95,
)
"""Settings for person records that work without configuration."""
