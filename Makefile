# The verbs people expect. Every target installs what it needs first, so a fresh clone needs only make.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install lint typecheck schemas check-schemas dashboard check-deploy test test-fast demo bench mock clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

schemas: install
	$(BIN)/python -m contracts.generate

check-schemas: install
	$(BIN)/python -m contracts.generate --check
	$(BIN)/python -m deploy.grafana.build_dashboard --check

dashboard: install
	$(BIN)/python -m deploy.grafana.build_dashboard

# Alert rules: syntax, then their unit tests (firing and not firing).
check-deploy:
	scripts/ensure-prometheus.sh
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts.test.yml

# The whole suite: lint, types, schema freshness, then every test against a real RabbitMQ and real servers.
# The whole suite on the machine's RabbitMQ, then the integration suite again on RabbitMQ 4.0 (a node the
# tests start in a Debian 13 root, every deprecated feature denied), then the cluster tests on a
# three-node RabbitMQ 4.0 cluster the tests start (a node SIGKILLed while jobs flow).
test: lint typecheck check-schemas check-deploy
	scripts/ensure-rabbitmq.sh
	scripts/ensure-tinyproxy.sh
	scripts/ensure-rabbitmq4.sh
	$(BIN)/pytest --ignore=tests/cluster
	SEEDANCE_TEST_BROKER=rabbitmq4 $(BIN)/pytest tests/integration
	SEEDANCE_TEST_BROKER=rabbitmq4 $(BIN)/pytest -s tests/cluster

# The cluster tests on a three-node cluster of the machine's RabbitMQ (3.10 here: see the README's
# cluster section for what its dead-lettering does on a node loss).
test-cluster: install
	$(BIN)/pytest -s tests/cluster

# Tests that need neither a broker nor a server process.
test-fast: install
	$(BIN)/pytest -m "not broker and not server" -q

demo: install
	scripts/demo.sh

bench: install
	scripts/ensure-rabbitmq.sh
	$(BIN)/python -m scripts.bench

mock: install
	$(BIN)/seedance-mock --time-scale 0.05

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .demo .bench
