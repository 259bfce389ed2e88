// Package rpcv1 is the Go code generated from proto/meridian/rpc/v1: the
// gRPC service of the replication protocol (ReplicationService), apart from
// its messages (package meridianv1) so that code handling the messages does
// not link gRPC. Regenerate with `make proto`; only this file is written by
// hand.
package rpcv1
