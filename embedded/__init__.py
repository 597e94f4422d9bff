"""The embedded default, for a laptop or CI: a local S3-compatible server, a local Ray head and the
end-to-end demo. Never runs on a cluster and is not part of the installed package (see
pyproject.toml); the tests and ``make demo`` import it from the checkout."""
