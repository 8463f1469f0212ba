package transportpb

import "cairn.io/cairn/internal/wire"

// WireRaftBatch is the wire method of a RaftBatch, a one-way message on a
// chunkserver's wire server. Chunk IO uses methods 1-3 (api/chunkpb).
const WireRaftBatch wire.Method = 16

// WireRaftBatchName is the name a RaftBatch is registered (and authorized)
// under on the wire server.
const WireRaftBatchName = "/cairn.transport.v1.RaftTransport/RaftBatch"
