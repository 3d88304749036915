"""Kafka I/O with confluent-kafka (librdkafka): what reads and writes the topics.

No faust here: faust's per-event path costs ~100 us an event, so records enter and leave
through librdkafka and faust sees one item per micro-batch (see runtime/).

    clients.py      client configurations, group-less consumers and their partition
                    assignment, topic administration and checks.
    source.py       BatchSource: the consumer thread that hands out micro-batches.
    checkpoint.py   Checkpoint: which input offsets may be committed (pure).
    publisher.py    Publisher and Ticket: produce a batch's records, know when all are acked.
    access.py       AccessRefusals: the permissions (ACLs) Kafka refuses, each reported once.
    control_log.py  ControlLog: every worker reads every command, in log order.
    controller.py   Controller: the operator's side of the control topic (send, read acks).
    watch.py        OutputWatcher, assign_all, collect_acks: watching output and acks topics.
"""
