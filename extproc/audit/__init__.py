"""The tamper-evident session record: sealed originals, a hash chain and signed checkpoints."""
