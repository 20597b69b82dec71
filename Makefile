# The two commands the README promises; both set everything up on a fresh machine.
.PHONY: demo test check lint setup docs

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/distsft launch

test: setup
	@scripts/test-hosts.sh
	.venv/bin/ruff check --no-cache distsft tests benchmarks scripts docs
	.venv/bin/ruff format --no-cache --check distsft tests benchmarks scripts docs
	.venv/bin/python -m pytest -q --durations=25

# the fast tier for contributors: lint and every test not marked slow (no Ray launch, no multi-host)
check: setup
	.venv/bin/ruff check --no-cache distsft tests benchmarks scripts docs
	.venv/bin/ruff format --no-cache --check distsft tests benchmarks scripts docs
	.venv/bin/python -m pytest -q -m "not slow" --durations=10

lint: setup
	.venv/bin/ruff check --fix distsft tests benchmarks scripts docs
	.venv/bin/ruff format distsft tests benchmarks scripts docs

# the docs site into site/ (reference pages generated from the code: docs/gen_reference.py)
docs: setup
	.venv/bin/mkdocs build --strict
