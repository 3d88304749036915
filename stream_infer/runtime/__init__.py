"""The runtime: one worker. It wires the pure core (core/), the models (inference/, online/)
and the Kafka I/O (io/) into a faust app; ``app.py`` is the only module that imports faust.
``worker.py`` draws the parts and the threads they run on.
"""
