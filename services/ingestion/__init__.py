"""The ingestion service: validates, deduplicates and durably stores events and records,
and runs source connectors."""
