"""Tools for developing mla_patch: build checks, GPU-run orchestration, offline fetchers, the default model's
trainer, profiling and tuning."""
