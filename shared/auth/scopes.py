"""Which scope each RPC of the mesh needs: one table, for every method of every service.

A token grants scopes; a call is allowed when its token has the scope of the method it calls,
or ``admin``, which grants them all. The health and reflection services stay open. A method
missing from the table needs ``admin`` (so a new RPC is never open by accident), and a test
fails until the table names its scope.

A token for a service of the mesh itself needs ``logs:read`` (to follow the other services'
logs), ``tokens:verify`` (to check its callers' tokens) and what it calls: features and
activation read profiles (``profiles:read``), activation reads models (``models:read``), and
erasure runs between services (identity asks ingestion to suppress and purge, the others report
back: ``privacy:admin``). ``profilemesh up`` gives every service one ``admin`` token.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

ADMIN = "admin"
EVENTS_WRITE = "events:write"
SOURCES_ADMIN = "sources:admin"
PROFILES_READ = "profiles:read"
PROFILES_WRITE = "profiles:write"
PRIVACY_ADMIN = "privacy:admin"
IDENTITY_ADMIN = "identity:admin"
FEATURES_ADMIN = "features:admin"
MODELS_ADMIN = "models:admin"
MODELS_READ = "models:read"
SEGMENTS_ADMIN = "segments:admin"
SEGMENTS_READ = "segments:read"
LOGS_READ = "logs:read"
TOKENS_VERIFY = "tokens:verify"
AUDIT_READ = "audit:read"

SCOPES: Mapping[str, str] = {
    EVENTS_WRITE: "send events and customer records to ingestion",
    SOURCES_ADMIN: "run source connectors and manage tracking plans",
    PROFILES_READ: "read profiles, identifiers, features, scores and segment members",
    PROFILES_WRITE: "merge and unmerge profiles, match records, record consent",
    PRIVACY_ADMIN: "delete profiles, suppress identifiers, purge a person's data",
    IDENTITY_ADMIN: "read and change the identity rules",
    FEATURES_ADMIN: "define and delete features, run backfills",
    MODELS_ADMIN: "train and promote models, discover clusters",
    MODELS_READ: "read models, training runs and clusterings",
    SEGMENTS_ADMIN: "manage segments and destinations, retry dead letters",
    SEGMENTS_READ: "read segments, their evaluations and member counts",
    LOGS_READ: "follow another service's logs (services of the mesh)",
    TOKENS_VERIFY: "verify callers' tokens (services of the mesh)",
    AUDIT_READ: "read the audit logs",
    ADMIN: "everything, including creating and revoking tokens",
}
"""Every scope, with what it allows."""

_BY_SERVICE: Mapping[str, Mapping[str, str]] = {
    "profilemesh.ingestion.v1.IngestionService": {
        "SendEvent": EVENTS_WRITE,
        "SendEvents": EVENTS_WRITE,
        "StreamEvents": EVENTS_WRITE,
        "ImportRecords": EVENTS_WRITE,
        "CreateTrackingPlan": SOURCES_ADMIN,
        "GetTrackingPlan": SOURCES_ADMIN,
        "ListTrackingPlans": SOURCES_ADMIN,
        "UpdateTrackingPlan": SOURCES_ADMIN,
        "DeleteTrackingPlan": SOURCES_ADMIN,
        "ListConnectors": SOURCES_ADMIN,
        "StartSourceRun": SOURCES_ADMIN,
        "GetSourceRun": SOURCES_ADMIN,
        "ListSourceRuns": SOURCES_ADMIN,
        "CancelSourceRun": SOURCES_ADMIN,
        "SuppressIdentifiers": PRIVACY_ADMIN,
        "UnsuppressIdentifiers": PRIVACY_ADMIN,
        "PurgeIdentifiers": PRIVACY_ADMIN,
        # Counts only, but part of running erasure: it goes with the other privacy calls.
        "GetSuppressionStats": PRIVACY_ADMIN,
    },
    "profilemesh.identity.v1.IdentityService": {
        "GetProfile": PROFILES_READ,
        "ResolveIdentifiers": PROFILES_READ,
        "ListMerges": PROFILES_READ,
        "MergeProfiles": PROFILES_WRITE,
        "UnmergeProfile": PROFILES_WRITE,
        "MatchRecords": PROFILES_WRITE,
        "UpdateConsent": PROFILES_WRITE,
        "GetIdentityRules": IDENTITY_ADMIN,
        "UpdateIdentityRules": IDENTITY_ADMIN,
        "DeleteProfile": PRIVACY_ADMIN,
        "GetDeletion": PRIVACY_ADMIN,
        "SuppressIdentifiers": PRIVACY_ADMIN,
        "UnsuppressIdentifiers": PRIVACY_ADMIN,
        "ReportDeletionProgress": PRIVACY_ADMIN,
    },
    "profilemesh.features.v1.FeaturesService": {
        "GetFeatures": PROFILES_READ,
        "BatchGetFeatures": PROFILES_READ,
        "GetHistoricalFeatures": PROFILES_READ,
        # Whoever reads features needs to know which exist: reading definitions goes with it.
        "GetFeatureDefinition": PROFILES_READ,
        "ListFeatureDefinitions": PROFILES_READ,
        "CreateFeatureDefinition": FEATURES_ADMIN,
        "DeleteFeatureDefinition": FEATURES_ADMIN,
        "StartBackfill": FEATURES_ADMIN,
        "GetBackfill": FEATURES_ADMIN,
        "GetLifetimeValueModel": MODELS_READ,
    },
    "profilemesh.scoring.v1.ScoringService": {
        "TrainModel": MODELS_ADMIN,
        "PromoteModel": MODELS_ADMIN,
        "DiscoverClusters": MODELS_ADMIN,
        "GetTrainingRun": MODELS_READ,
        "ListModels": MODELS_READ,
        "GetModel": MODELS_READ,
        "GetClustering": MODELS_READ,
        "Score": PROFILES_READ,
        "ScoreBatch": PROFILES_READ,
        "ScoreLookalikes": PROFILES_READ,
    },
    "profilemesh.activation.v1.ActivationService": {
        "CreateSegment": SEGMENTS_ADMIN,
        "UpdateSegment": SEGMENTS_ADMIN,
        "DeleteSegment": SEGMENTS_ADMIN,
        "EvaluateSegments": SEGMENTS_ADMIN,
        "GetSegment": SEGMENTS_READ,
        "ListSegments": SEGMENTS_READ,
        "GetSegmentEvaluation": SEGMENTS_READ,
        # A count says nothing about any one person; a member list does.
        "CountMembers": SEGMENTS_READ,
        "ListActivators": SEGMENTS_READ,
        "ListMembers": PROFILES_READ,
        "GetMembership": PROFILES_READ,
        "GetMembershipHistory": PROFILES_READ,
        "GetUnifiedProfile": PROFILES_READ,
        # Destinations hold credentials and dead letters hold profile data.
        "CreateDestination": SEGMENTS_ADMIN,
        "GetDestination": SEGMENTS_ADMIN,
        "ListDestinations": SEGMENTS_ADMIN,
        "UpdateDestination": SEGMENTS_ADMIN,
        "DeleteDestination": SEGMENTS_ADMIN,
        "ListDeadLetters": SEGMENTS_ADMIN,
        "RetryDeadLetters": SEGMENTS_ADMIN,
    },
    "profilemesh.common.v1.LogService": {
        "Subscribe": LOGS_READ,
        "GetOffsets": LOGS_READ,
    },
    "profilemesh.common.v1.AuthService": {
        "CreateToken": ADMIN,
        "RevokeToken": ADMIN,
        "ListTokens": ADMIN,
        "VerifyToken": TOKENS_VERIFY,
    },
    "profilemesh.common.v1.AuditService": {
        "ListAuditEntries": AUDIT_READ,
        "VerifyAuditChain": AUDIT_READ,
    },
}

METHOD_SCOPES: Mapping[str, str] = {
    f"/{service}/{method}": scope
    for service, methods in _BY_SERVICE.items()
    for method, scope in methods.items()
}
"""Full method name (``/package.Service/Method``) -> the scope a call to it needs."""

OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
"""Services anyone may call without a token: probes and tooling must work before any token."""

UNAUDITED_METHODS = frozenset(
    {
        "/profilemesh.common.v1.LogService/Subscribe",
        "/profilemesh.common.v1.LogService/GetOffsets",
        "/profilemesh.common.v1.AuthService/VerifyToken",
    }
)
"""Calls the services make to each other all the time, about no one in particular; recording
them would bury the calls people make. Open services are not recorded either."""


def is_open(method: str) -> bool:
    """Whether ``method`` may be called without a token."""
    service = method.removeprefix("/").partition("/")[0]
    return service in OPEN_SERVICES


def required_scope(method: str) -> str:
    """The scope a call to ``method`` needs; ``admin`` for a method the table does not know."""
    return METHOD_SCOPES.get(method, ADMIN)


def is_audited(method: str) -> bool:
    """Whether a call to ``method`` is recorded in the audit log."""
    return not is_open(method) and method not in UNAUDITED_METHODS


def grants(scopes: Collection[str], needed: str) -> bool:
    """Whether a token with ``scopes`` may make a call that needs ``needed``."""
    return needed in scopes or ADMIN in scopes


def unknown_scopes(scopes: Collection[str]) -> list[str]:
    """The entries of ``scopes`` that are not scopes of the mesh."""
    return [scope for scope in scopes if scope not in SCOPES]
