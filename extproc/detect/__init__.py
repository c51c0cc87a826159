"""Detection: rules (``rules``), the Hyperscan engine (``engine``) and validators. Pure: no protobuf,
and no I/O after the rules are loaded."""
