# Sourced (after `cd` to the repository) by the benchmarks that run transformers: sets PY to
# the virtual environment's python ($VENV, default .venv-hf), or stops saying how to make it.
PY=${VENV:-.venv-hf}/bin/python
if [ ! -x "$PY" ]; then
    echo "no $PY: python3 -m venv .venv-hf && .venv-hf/bin/pip install torch transformers==5.24.0" >&2
    exit 1
fi
