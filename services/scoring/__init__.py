"""The scoring service: trains, versions and serves LightGBM models, clusters and lookalikes."""
