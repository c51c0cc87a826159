"""The approvers' gRPC API, version 1: modules generated from proto/extproc/approvals/v1/approvals.proto
by ``make proto`` (never edited by hand). ``extproc.approvals.grpc_api`` serves it and
``extproc.approvals.client`` calls it."""
