"""Kafka I/O with confluent-kafka (librdkafka): clients, the batch source, the publisher.

No faust here: faust's per-event path costs ~100 us an event, so records enter and leave
through librdkafka and faust sees one item per micro-batch (see runtime/).
"""
