"""ml_collections config files for the experiment binaries (`file.py:preset`)."""
