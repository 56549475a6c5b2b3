#!/usr/bin/env bash
# The packages bench/serve_load.py needs beyond what the GPU machine has (its server: fastapi, uvicorn; its clients:
# the official openai client), as wheels for CPython 3.12 on x86-64 Linux, into .whl/ at the repository's root
# (ignored by git: .gitignore; ~7 MB). Run here, where pip reaches the package index; then the device
# call names `.whl` in carry, and bench/decode_kernels_gpu.sh's servespec stage installs them (into /tmp/site).
#
#     bash bench/server_wheels.sh
#
# The list is every dependency of those three, none skipped (pip download --no-deps fetches none of them itself):
# openai 3.x goes through httpx2 (and its httpcore2, truststore), fastapi through starlette, opentelemetry-api and
# annotated-doc, uvicorn through click and h11.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    openai httpx2 httpcore2 truststore httpx httpcore anyio sniffio distro jiter h11 certifi idna tqdm pydantic \
    pydantic_core annotated_types typing_inspection typing_extensions fastapi starlette uvicorn click annotated-doc \
    opentelemetry-api
ls .whl
