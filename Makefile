# Convenience targets; each delegates to a script that needs nothing but Python 3.11 and bash.
.PHONY: demo test model bench clean

demo:
	./scripts/demo.sh

test:
	./scripts/test.sh

model:  ## train + quantise into models/mnist-int8 (about 10 minutes on 2 cores)
	./scripts/model.sh

bench:
	./scripts/test.sh -q -m bench benchmarks

clean:
	rm -rf build .venv .venv-test .venv-train .pytest_cache
