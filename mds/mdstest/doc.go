// Package mdstest holds test doubles for exercising the MDS before real
// chunkservers exist.
//
// ChunkServerDouble is NOT a chunkserver: it stores no data and runs no Raft.
// It is a small gRPC server on loopback that implements the two services the
// MDS calls on chunkservers (CopysetService.CreateCopysets and
// ChunkService.UpdateEpoch / DeleteChunk), records every call so that tests
// can assert what the MDS asked for, and sends the registration and heartbeat
// calls a chunkserver would, with copyset reports the test controls.
package mdstest
