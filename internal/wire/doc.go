// Package wire is Cairn's framed protocol on TCP for the data path: chunk IO
// between clients and chunkservers, and Raft traffic between chunkservers.
// Control calls (the MDS, copyset management, snapshots, cairn-ops) stay on
// gRPC; wire carries the calls made thousands of times a second, where
// gRPC's per-call cost (HTTP/2 framing, header compression, flow control and
// a writer goroutine per connection) was most of the CPU of a 4 KiB write.
//
// # Connections
//
// A client opens a TCP connection and writes the 8-byte preface "CAIRNW01";
// the server answers with the same preface. A chunkserver serves gRPC and
// wire on one port: Split routes each accepted connection by its first
// bytes (gRPC's HTTP/2 preface never begins with "CAIRN").
//
// # Frames
//
// After the preface both sides exchange frames: a 20-byte header, then the
// payload (a protobuf message, or an error text):
//
//	offset  size  field
//	0       4     payload length, big-endian, at most the receiver's MaxFrame
//	4       1     kind: request, response, error, cancel, message
//	5       1     method (request and message frames)
//	6       2     zero
//	8       8     request id, chosen by the client, echoed by the response
//	16      4     request timeout in microseconds, 0 for none (request frames)
//
// A request is answered by exactly one response or error frame with its id,
// in any order: many calls share one connection. A cancel frame tells the
// server that the client gave up on a request (its context ends); a message
// frame is one-way and is handled in order by the connection's reader.
//
// # Costs
//
// Each connection has one reader goroutine; requests run on worker
// goroutines, bounded per connection (MaxConcurrent: the reader stops
// reading, and TCP pushes back, when that many are in flight). Workers stay
// for the next request, so that a handler's grown stack is not grown again
// for each one (workers.go); at most a few wait idle per connection. A
// method registered with HandleInline (the chunk read) runs on the reader
// itself when it is the connection's only request in progress and can
// answer without waiting (inline.go): handing it to a worker and the
// wake-up of a thread to run it cost more than a read from the page cache. There is no writer
// goroutine: whoever has a frame to send appends it to the connection's
// buffer and, if no other goroutine is writing, writes the buffer itself
// until it is empty, so that frames finished together leave in one write
// system call. Pending output is bounded in bytes; writers wait beyond it.
package wire
