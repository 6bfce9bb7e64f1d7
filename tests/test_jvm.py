"""The pinned JVM manifest and its fetch (ops/stack/jvm.py), with the real Maven, offline: no
test downloads anything."""

from __future__ import annotations

import re
import shutil

import pytest

from ops.stack import StackError
from ops.stack.jvm import MAVEN_SETTINGS, fetch, is_fetched, manifest_digest, unresolved_artifacts

MISSING_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>wtc-analytics</groupId>
  <artifactId>wtc-jvm-probe</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>wtc-analytics.nowhere</groupId>
      <artifactId>no-such-artifact</artifactId>
      <version>0.0.1</version>
    </dependency>
  </dependencies>
</project>
"""


@pytest.mark.skipif(shutil.which("mvn") is None, reason="Maven is not installed")
def test_fetch_stops_naming_the_artifact_maven_cannot_resolve(tmp_path):
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    (manifest / "pom.xml").write_text(MISSING_POM)
    shutil.copy(MAVEN_SETTINGS, manifest / "settings.xml")
    cache = tmp_path / "cache"
    with pytest.raises(
        StackError, match=re.escape("wtc-analytics.nowhere:no-such-artifact")
    ) as caught:
        fetch(cache, manifest_dir=manifest, offline=True)
    assert "cannot resolve" in str(caught.value)
    assert not is_fetched(cache, manifest)  # no stamp: the next setup tries again


def test_unresolved_artifacts_reads_mavens_error_lines():
    output = (
        "[ERROR] Failed to execute goal on project wtc-jvm-debezium-connector-jdbc: Could not "
        "resolve dependencies for project x:y:pom:1: Could not find artifact "
        "org.hibernate:hibernate-agroal:jar:7.2.6.Final in central-only (https://repo)\n"
        "[ERROR] Failed to read artifact descriptor for io.debezium:debezium-x:jar:3.6.1.Final\n"
    )
    assert unresolved_artifacts(output) == [
        "org.hibernate:hibernate-agroal:jar:7.2.6.Final",
        "io.debezium:debezium-x:jar:3.6.1.Final",
    ]


def test_manifest_digest_changes_with_a_pin(tmp_path):
    (tmp_path / "pom.xml").write_text("<kafka.version>4.3.0</kafka.version>")
    before = manifest_digest(tmp_path)
    (tmp_path / "pom.xml").write_text("<kafka.version>4.3.1</kafka.version>")
    assert manifest_digest(tmp_path) != before
