"""The runtime: the only package that imports faust. It wires the pure core (decode, batch,
route, infer) and the Kafka I/O (io/) into a faust app: agents, timers, web endpoints and the
worker's lifecycle."""
