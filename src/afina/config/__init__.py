"""Run configuration: strict pydantic models loaded from YAML with `key=value` overrides."""

from afina.config.loading import load_config, parse_overrides
from afina.config.schema import RunConfig

__all__ = ["RunConfig", "load_config", "parse_overrides"]
