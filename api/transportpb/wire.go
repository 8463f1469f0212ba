package transportpb

import "cairn.io/cairn/internal/wire"

// WireRaftBatch is the wire method of a RaftBatch, a one-way message on a
// chunkserver's wire server. Chunk IO uses methods 1-3 (api/chunkpb).
const WireRaftBatch wire.Method = 16
