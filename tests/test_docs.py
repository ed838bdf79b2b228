"""The docs are held to the code: every relay configuration key is in docs/configuration.md with its
variable, every relative link in README.md, CHANGELOG.md and docs/ resolves, and the README stays
the short front door it is meant to be."""
from __future__ import annotations

import glob
import os
import re

import pytest

from harness import ROOT

DOCS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CHANGELOG.md")] + sorted(
    glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_configuration_key_is_documented_with_its_variable():
    from relay.config import RelayConfig

    table = open(os.path.join(ROOT, "docs", "configuration.md")).read()
    rows = {match.group(1): match.group(0) for match in re.finditer(r"^\| `(\w+)` \|.*$", table, re.MULTILINE)}
    assert sorted(rows) == sorted(RelayConfig.model_fields), "keys in the doc's table vs in RelayConfig"
    for key, row in rows.items():
        assert "`RELAY_%s`" % key.upper() in row, row


def test_cfg_relay_yaml_lists_every_key():
    from relay.config import RelayConfig

    text = open(os.path.join(ROOT, "cfg", "relay.yaml")).read()
    listed = set(re.findall(r"^#?\s?(\w+):", text, re.MULTILINE))
    assert set(RelayConfig.model_fields) <= listed, set(RelayConfig.model_fields) - listed


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(open(path).read()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        file_part = target.split("#", 1)[0]
        if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), file_part))):
            broken.append(target)
    assert broken == []


def test_readme_is_the_short_front_door():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert len(lines) <= 200, "README.md has %d lines; depth belongs in docs/" % len(lines)
    text = "\n".join(lines)
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
