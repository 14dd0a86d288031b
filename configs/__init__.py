"""ml_collections job configs, one file per model/job; run with --config configs/NAME.py."""
