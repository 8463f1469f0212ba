// Package ops is cairn-ops, the operator's command line for a Cairn cluster:
// the counterpart of Curve's curve_ops_tool and `curve bs`.
//
// It is a cobra verb-noun tree (status, list, query, create, extend, delete,
// update, check) over the MDS's gRPC services, reached through
// mdsclient.Conn so that every call follows the elected MDS leader, and over
// the chunkservers' ChunkService and CopysetService for the checks that need
// the replicas' own view (check copyset, check consistency).
//
// Every command builds one result value. The shared output layer prints it
// either as a table for people (the default) or, with -o json, as JSON whose
// snake_case field names are part of the tool's contract (docs/ops.md lists
// them). Exit codes say what happened without parsing any output: 0 success
// or healthy, 1 a failed command, 2 bad usage, 3 not healthy, 4 replicas
// differ, 5 a server could not be reached, 6 an unknown name.
//
// Run is the whole program: cmd/cairn-ops is a thin wrapper around it, and
// tests call it in-process against a live cluster.
package ops
