"""The log: durable, ordered, replayable streams of protobuf messages, partitioned by key.

``api`` defines the interface every backend implements; ``embedded`` stores it in files under
the data directory; ``servicer`` and ``client`` serve and read it over gRPC; ``consumer``
applies it to a consumer's state with the offset committed in the same transaction.
"""
