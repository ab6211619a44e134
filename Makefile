# Every install goes through constraints.txt: it pins torch==2.13.0 (CPU wheel
# here) so a fresh machine never downloads multi-GB CUDA builds.
PY ?= python
PIP = $(PY) -m pip install -q -c constraints.txt

.PHONY: install-dev install-demo test demo lint docs

install-dev:
	$(PIP) -e ".[dev,docs]"

install-demo:
	$(PIP) -e ".[demo]"

test: install-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: install-demo
	$(PY) -m demo_project

docs: install-dev
	$(PY) -m mkdocs build --strict
