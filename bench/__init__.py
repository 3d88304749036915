"""The benchmark: ceiling, naive faust and stream-infer on one broker, model and event stream.

Run it with ``python3 dev.py bench`` (or ``python -m bench``); see bench/README.md.
"""
