"""lm-eval task definitions that read the harness's bundled data (offline). See bundled.py."""
