"""Launch helpers: run the experiment binaries on TPU pods, GPU clusters, local processes."""
