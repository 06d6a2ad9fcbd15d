"""absl-flag experiment binaries and the importable libraries behind them."""
