# Run `make help` for the list.
# The project's virtualenv (made by `make install`, `make run` or `make test`; IDV_NO_VENV=1: none).
PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help install run run-workflow webhooks stop test test-fast lint typecheck bench chaos mutants broker-up broker-down postgres-up postgres-down compose-check alerts-check fuzz clean

help: ## This list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: ## Create .venv and pip install the package with test, PostgreSQL, encryption and dev extras
	bash scripts/venv.sh install '[dev]'

run: ## Set up everything and run the daemon on embedded defaults (Kafka, SQLite, sandbox, samples)
	bash scripts/quickstart.sh

run-workflow: ## One kyc_workflow end to end (didit-profile sandbox with a simulated applicant), then exit
	bash scripts/quickstart-workflow.sh

webhooks: ## Run the webhook intake (idv-webhooks) on 127.0.0.1:9410; needs IDV_WEBHOOK_SECRET[_FILE] (docs/webhooks.md)
	PYTHONPATH=$(CURDIR) $(PY) -m consumer.webhooks.cli

stop: ## Stop what run/test left running: broker, SASL test broker, sandbox; PostgreSQL only if they started it
	-bash scripts/kafka.sh stop
	-bash scripts/kafka-sasl.sh stop
	-@pid=$$(cat .run/sandbox.pid 2>/dev/null); \
	if [ -n "$$pid" ] && tr '\0' ' ' </proc/$$pid/cmdline 2>/dev/null | grep -q -- '-m sandbox'; then \
		kill $$pid && echo "sandbox: stopped (pid $$pid)"; else echo "sandbox: not running"; fi; rm -f .run/sandbox.pid
	-bash scripts/postgres.sh stop-if-ours

test: ## Set up everything (packages, Kafka, PostgreSQL) and run the whole test suite
	bash scripts/test.sh

test-fast: ## Run the tests without the set-up step (services must already run)
	$(PY) -m pytest -q

lint: ## ruff
	$(PY) -m ruff check .

typecheck: ## mypy --strict on the packages
	$(PY) -m mypy

bench: ## Dedupe-store micro-benchmark (prints a table)
	$(PY) bench/store_bench.py

chaos: ## Chaos run: 3 daemons, kills, broker restart, faults; own broker and PostgreSQL (SEED=…, MUTANT=…)
	$(PY) bench/chaos.py --seed $(or $(SEED),1) --messages 2000 --kills 4 --broker-restarts 1 --pg-restarts 0 $(if $(MUTANT),--mutant $(MUTANT))

mutants: ## Mutation checks: break one guarantee at a time, the tests must fail (MUTANTS="name …" for some)
	$(PY) tests/mutants.py $(MUTANTS)

fuzz: ## Record-level fuzz run through the daemon; needs kcat (RECORDS=10000, SEED=…, TXN=1)
	$(PY) -m tests.consumer.test_record_fuzz $(or $(RECORDS),10000) --seed $(or $(SEED),20261201) $(if $(TXN),--transactional)

broker-up: ## Start the local Apache Kafka broker
	bash scripts/kafka.sh start

broker-down: ## Stop the local Apache Kafka broker
	bash scripts/kafka.sh stop

postgres-up: ## Start the local PostgreSQL 15
	bash scripts/postgres.sh start

postgres-down: ## Stop the local PostgreSQL 15
	bash scripts/postgres.sh stop

compose-check: ## Validate docker-compose.yml with a compose parser
	bash scripts/check-compose.sh

alerts-check: ## promtool: check the alert rules and Prometheus config, run the alerts' unit tests
	promtool check config docker/prometheus.yml
	promtool test rules docker/prometheus/alerts.test.yml

clean: stop ## Stop services and remove local state (.run/, the brokers' data)
	-bash scripts/kafka.sh stop --wipe
	-bash scripts/kafka-sasl.sh stop --wipe
	rm -rf .run
