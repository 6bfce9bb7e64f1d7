"""The pinned JVM parts of the Kafka path, fetched once by Maven into an ignored cache.

`connect/jvm/pom.xml` pins Apache Kafka (broker, tools, Connect runtime), Debezium's PostgreSQL
source and JDBC sink, and the PostgreSQL JDBC driver. `fetch()` runs
`mvn dependency:copy-dependencies` on it, which lays out

    <cache>/lib/                                   the brokers' and the Connect worker's classpath
    <cache>/plugins/debezium-connector-postgres/   one Connect plugin directory per plugin
    <cache>/plugins/debezium-connector-jdbc/

and writes a stamp of the manifests: a later call with the same manifests does nothing. The
cache (`.cache/jvm/` by default, `WTC_JVM_CACHE` to move it) sits outside the state folder, so
`make clean` and the tests' throwaway stacks keep it. Nothing else downloads anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from common.settings import PROJECT_ROOT
from ops.stack.process import StackError

log = logging.getLogger("ops.stack")

MANIFEST_DIR = PROJECT_ROOT / "connect" / "jvm"
MAVEN_SETTINGS = MANIFEST_DIR / "settings.xml"
DEFAULT_CACHE = PROJECT_ROOT / ".cache" / "jvm"
PLUGINS = ("debezium-connector-postgres", "debezium-connector-jdbc")
STAMP = ".manifest-sha256"

# How Maven 3 names an artifact it could not resolve, in its error lines.
UNRESOLVED = re.compile(
    r"(?:Could not find artifact|Failure to find|Could not transfer artifact|"
    r"Failed to read artifact descriptor for|Unable to get dependency information for|"
    r"in offline mode and the artifact)\s+"
    r"([\w.\-]+:[\w.\-]+:[\w.\-]+(?::[\w.\-]+)*)"
)


def cache_dir() -> Path:
    return Path(os.environ.get("WTC_JVM_CACHE") or DEFAULT_CACHE).resolve()


def manifest_digest(manifest_dir: Path = MANIFEST_DIR) -> str:
    digest = hashlib.sha256()
    for path in sorted(manifest_dir.rglob("*.xml")):
        digest.update(str(path.relative_to(manifest_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def is_fetched(cache: Path | None = None, manifest_dir: Path = MANIFEST_DIR) -> bool:
    cache = cache or cache_dir()
    stamp = cache / STAMP
    return stamp.exists() and stamp.read_text().strip() == manifest_digest(manifest_dir)


def java_available() -> bool:
    return shutil.which("java") is not None


def unresolved_artifacts(maven_output: str) -> list[str]:
    """The artifacts Maven names as unresolvable, in order, once each."""
    return list(dict.fromkeys(UNRESOLVED.findall(maven_output)))


def fetch(
    cache: Path | None = None, manifest_dir: Path = MANIFEST_DIR, offline: bool = False
) -> Path:
    """Fetch the pinned jars into `cache` unless they are there for these manifests already
    (`offline`: from the local Maven repository only)."""
    cache = cache or cache_dir()
    if is_fetched(cache, manifest_dir):
        log.info("JVM parts already fetched", extra={"path": str(cache)})
        return cache
    mvn = shutil.which("mvn")
    if mvn is None or not java_available():
        raise StackError(
            "the Kafka path needs a JDK (17 or later) and Maven: "
            "apt-get install openjdk-17-jdk maven"
        )
    log.info("fetching the pinned JVM parts with Maven", extra={"path": str(cache)})
    shutil.rmtree(cache, ignore_errors=True)
    result = subprocess.run(
        [
            mvn,
            "--batch-mode",
            "--no-transfer-progress",
            *(["--offline"] if offline else []),
            "-s",
            str(MAVEN_SETTINGS),
            "-f",
            str(manifest_dir / "pom.xml"),
            "dependency:copy-dependencies",
            f"-Dwtc.jvm.cache={cache}",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        missing = unresolved_artifacts(result.stdout + result.stderr)
        errors = [line for line in result.stdout.splitlines() if line.startswith("[ERROR]")]
        if missing:
            raise StackError(
                f"Maven cannot resolve {', '.join(missing)} (pinned in {manifest_dir}); "
                "the Kafka path cannot be set up without it"
            )
        raise StackError("Maven failed: " + " | ".join(errors[:3] or [result.stderr[-500:]]))
    if manifest_dir == MANIFEST_DIR:
        for plugin in PLUGINS:
            if not any((cache / "plugins" / plugin).glob(f"{plugin}-*.jar")):
                raise StackError(f"Maven left no {plugin} jar in {cache / 'plugins'}")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / STAMP).write_text(manifest_digest(manifest_dir) + "\n")
    log.info("JVM parts fetched", extra={"path": str(cache)})
    return cache
