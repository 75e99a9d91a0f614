"""Default configurations, one YAML file per strategy and per scenario (package data)."""
