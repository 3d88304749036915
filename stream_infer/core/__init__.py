"""The pure per-batch core: no Kafka client, no faust, no torch.

Data flows one way: bytes -> decode/validate -> batch -> route -> infer -> encode. Every module
here is plain Python (numpy, orjson) and is tested in microseconds with fake clocks and lists.

    events.py     wire types: FeatureBatch, OutRecord, DeadLetter, BatchResult, ModelVersion.
    serde.py      bytes <-> events: decode splits good rows from dead letters with a reason.
    batching.py   MicroBatcher: bounded size and wait, injected monotonic clock.
    routing.py    Route: a sticky weighted split (stable hash of the key) and a shadow.
    control.py    control commands: parse, validate, sign, the RoutingTable the log implies.
    watchdog.py   Watchdog: a model call bounded in time on its own thread.
    pipeline.py   Pipeline: one batch decoded, routed, scored (Predictor protocol), encoded.
    rollout.py    anytime-valid confidence sequences on versions' losses and the rollout step
                  machine of label-driven rollouts (driven by stream_infer.online.rollout).
"""
