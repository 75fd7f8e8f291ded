# Convenience targets; each delegates to a script that needs nothing but Python 3.11 and bash.
.PHONY: demo test model bench clean

demo:
	./scripts/demo.sh

test:
	./scripts/test.sh

model:  ## train two members + quantise into models/mnist-int8 (about 25 minutes on 2 cores)
	./scripts/model.sh

bench:  ## benchmarks side by side into build/bench/bench-<date>.{json,md} (~15 min); BENCH_ARGS=--quick: ~1 min
	bash -c 'source scripts/venv.sh && ensure_venv .venv-test "[train,dev]" && cd "$$ROOT" && exec .venv-test/bin/python benchmarks/bench.py $(BENCH_ARGS)'

clean:
	rm -rf build .venv .venv-test .venv-train .pytest_cache
