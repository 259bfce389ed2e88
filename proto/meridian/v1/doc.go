// Package meridianv1 is the Go code generated from proto/meridian/v1: the
// messages of the replication protocol between Meridian nodes. See
// replication.proto for the protocol itself; its gRPC service is package
// rpcv1. Regenerate with `make proto`; only this file is written by hand.
package meridianv1
