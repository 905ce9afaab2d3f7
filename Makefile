# asvp-backend: `make run` serves the backend, `make test` runs every test. Both set themselves up.
#
# Virtual environments live outside the clone, keyed by the requirements' hash, so a second clone (or CI)
# reuses them; a fresh machine builds them (about 5 minutes: torch is large).

PYTHON      ?= python3
VENV_ROOT   ?= $(HOME)/.cache/asvp-backend
REQ_HASH    := $(shell cat requirements-api.txt requirements.txt requirements-test.txt | sha256sum | cut -c1-12)
VENV        ?= $(VENV_ROOT)/venv-$(REQ_HASH)
LS_VERSION  := $(shell sed -n "s/^label-studio==//p" requirements-label-studio.txt)
LS_VENV     ?= $(VENV_ROOT)/label-studio-$(LS_VERSION)
LS_HASH     := $(shell sha256sum requirements-label-studio.txt | cut -c1-12)
BIN         := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test test-unit test-integration test-e2e lint venv venv-path ls-venv label-studio redis test-tools bench clean-venvs help

help:  ## show the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

run: venv  ## serve the backend on port 9090 (embedded mode unless REDIS_URL is set)
	$(BIN)/asvp-backend serve

venv-path:  ## print where the backend's virtual environment is (./asvp-backend uses it)
	@echo $(VENV)

venv: $(VENV)/.complete  ## create the backend's virtual environment
	@$(BIN)/pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true

$(VENV)/.complete:  # the hash in $(VENV) tracks the requirements; mtimes of a fresh clone must not
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-test.txt 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, torchvision, timm, fastapi, rq, label_studio_sdk"
	touch $@

ls-venv: $(LS_VENV)/.complete-$(LS_HASH)  ## Label Studio $(LS_VERSION) in its own environment (for the e2e tests)

LS_PORT     ?= 8080
label-studio: ls-venv  ## start Label Studio $(LS_VERSION) on port 8080 with the three settings a local backend needs
	LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false \
	  $(LS_VENV)/bin/label-studio start --no-browser --port $(LS_PORT)

$(LS_VENV)/.complete-$(LS_HASH):  # the marker names the pins' hash: changed pins rebuild the environment
	rm -rf $(LS_VENV)
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q -r requirements-label-studio.txt 2>&1 | grep -v "is ignored" || true
	$(LS_VENV)/bin/python -c "import label_studio, sys; sys.exit(label_studio.__version__ != '$(LS_VERSION)')"
	touch $@

redis:  ## make sure a Redis server answers on 127.0.0.1:6379
	scripts/ensure-redis.sh

test-tools:  ## Debian's chromium, chromium-driver and docker-compose, when missing (used by tests)
	scripts/ensure-test-tools.sh

lint: venv  ## ruff and mypy
	$(BIN)/ruff check asvp_backend tests bench
	$(BIN)/mypy

test: venv ls-venv redis test-tools lint  ## every test: unit, integration (Redis, rq), e2e (Label Studio)
	LS_VENV=$(LS_VENV) $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS) tests

test-unit: venv  ## unit tests only
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: venv redis
	$(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

test-e2e: venv ls-venv redis test-tools
	LS_VENV=$(LS_VENV) $(BIN)/python -m pytest -q -ra tests/e2e $(PYTEST_ARGS)

clean-venvs:  ## delete the cached environments
	rm -rf $(VENV_ROOT)/venv-* $(LS_VENV)
