# The two commands the README promises; both set everything up on a fresh machine.
.PHONY: demo test lint setup docs

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/distsft launch

test: setup
	@scripts/test-hosts.sh
	.venv/bin/ruff check --no-cache distsft tests benchmarks scripts
	.venv/bin/ruff format --no-cache --check distsft tests benchmarks scripts
	.venv/bin/python -m pytest -q -W ignore::FutureWarning -W ignore::DeprecationWarning --durations=25

lint: setup
	.venv/bin/ruff check --fix distsft tests benchmarks scripts
	.venv/bin/ruff format distsft tests benchmarks scripts

# the docs site into site/ (reference pages generated from the code: docs/gen_reference.py)
docs: setup
	.venv/bin/mkdocs build --strict
