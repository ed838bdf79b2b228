"""YAML files for humans: a duplicated key is an error, and errors name the file and line.

Used by the relay's config and by tokenhsi/run.py; needs only PyYAML.
"""
from __future__ import annotations

import yaml

from relay.errors import RelayError


class ConfigError(RelayError, ValueError):
    """A configuration the relay refuses; the message names the source and the key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader for which a duplicated key is an error, not a silent overwrite."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError("duplicate key %r at line %d" % (key, key_node.start_mark.line + 1))
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str) -> dict:
    """Read a YAML mapping with duplicate keys refused; errors name the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise ConfigError("cannot read config file %s: %s" % (path, exc.strerror)) from exc
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError("config file %s: %s" % (path, exc)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config file %s must hold a mapping of keys, not %s" % (path, type(data).__name__))
    return data
