"""The identity service: stitches identifiers into one profile per person and serves the
unified profile."""
