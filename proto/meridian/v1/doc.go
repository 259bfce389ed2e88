// Package meridianv1 is the Go code generated from proto/meridian/v1: the
// replication protocol between Meridian nodes (ReplicationService). See
// replication.proto for the protocol itself. Regenerate with `make proto`;
// only this file is written by hand.
package meridianv1
