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
for name in ("kafka", "kafka-init", "postgres", "sandbox", "consumer-1", "consumer-2", "webhooks"):
    if name not in services:
        errors.append(f"service {name!r} missing")
for name, svc in services.items():
    image = svc.get("image", "")
    m = re.fullmatch(r"apache/kafka:(.+)", image)
    if m and m.group(1) != pom_version:
        errors.append(f"{name}: image {image} but kafka/pom.xml has kafka.version {pom_version}")
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):  # short form: no conditions
        deps = {d: {} for d in deps}
    for dep, cond in deps.items():
        if dep not in services:
            errors.append(f"{name}: depends on unknown service {dep!r}")
        wanted = cond.get("condition") if isinstance(cond, dict) else None
        if wanted == "service_healthy" and "healthcheck" not in services.get(dep, {}):
            errors.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")

# Every IDV_* variable a consumer gets must be a setting the daemon knows (a typo would be ignored).
sys.path.insert(0, ".")
from consumer.settings import PREFIX, Settings  # noqa: E402

known = set(Settings(provider_api_key="x").env_names())
known |= set(Settings.secret_file_names())
for name, svc in services.items():
    if not name.startswith("consumer"):
        continue
    for var in svc.get("environment") or {}:
        if var.startswith(PREFIX) and var not in known:
            errors.append(f"{name}: {var} is not a consumer setting (docs/configuration.md)")

# The same for the webhook intake's own settings.
from consumer.webhooks.settings import WebhookSettings  # noqa: E402

known_webhooks = set(WebhookSettings(webhook_secret="x").env_names()) | set(WebhookSettings.secret_file_names())
for var in services.get("webhooks", {}).get("environment") or {}:
    if var.startswith(PREFIX) and var not in known_webhooks:
        errors.append(f"webhooks: {var} is not a webhook intake setting (docs/configuration.md)")

if errors:
    for e in errors:
        print(f"check-compose: {e}", file=sys.stderr)
    sys.exit(1)
print(f"check-compose: structure ok, apache/kafka tag matches kafka/pom.xml ({pom_version})")
EOF
