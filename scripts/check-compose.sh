#!/usr/bin/env bash
# Validates docker-compose.yml without a Docker engine:
#   1. the Compose parser: `docker compose config -q` (plugin) or `docker-compose config -q` (v1,
#      Debian package `docker-compose`); when neither exists, a YAML parse only.
#   2. the apache/kafka image tag equals kafka.version in kafka/pom.xml (the broker the tests run on).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if docker compose version >/dev/null 2>&1; then
    docker compose -f docker-compose.yml config -q
    echo "check-compose: docker compose config: ok"
elif command -v docker-compose >/dev/null; then
    docker-compose -f docker-compose.yml config -q
    echo "check-compose: docker-compose config: ok"
else
    echo "check-compose: no Compose parser found (apt-get install -y docker-compose); YAML parse only" >&2
fi

python3 - <<'EOF'
import re
import sys
import xml.etree.ElementTree as ET

import yaml

with open("docker-compose.yml", encoding="utf-8") as f:
    compose = yaml.safe_load(f)

ns = {"m": "http://maven.apache.org/POM/4.0.0"}
pom_version = ET.parse("kafka/pom.xml").getroot().find("m:properties/m:kafka.version", ns).text.strip()

errors = []
services = compose.get("services", {})
for name in ("kafka", "kafka-init", "postgres", "sandbox", "consumer"):
    if name not in services:
        errors.append(f"service {name!r} missing")
for name, svc in services.items():
    image = svc.get("image", "")
    m = re.fullmatch(r"apache/kafka:(.+)", image)
    if m and m.group(1) != pom_version:
        errors.append(f"{name}: image {image} but kafka/pom.xml has kafka.version {pom_version}")
    for dep, cond in (svc.get("depends_on") or {}).items():
        if dep not in services:
            errors.append(f"{name}: depends on unknown service {dep!r}")
        wanted = cond.get("condition") if isinstance(cond, dict) else None
        if wanted == "service_healthy" and "healthcheck" not in services.get(dep, {}):
            errors.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")

if errors:
    for e in errors:
        print(f"check-compose: {e}", file=sys.stderr)
    sys.exit(1)
print(f"check-compose: structure ok, apache/kafka tag matches kafka/pom.xml ({pom_version})")
EOF
