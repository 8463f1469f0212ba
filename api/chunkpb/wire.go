package chunkpb

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/internal/wire"
)

// Methods of the chunk service's data path on the wire protocol (package
// internal/wire): the calls a client makes for every IO, and the map of
// which chunks exist (block status of NBD and iSCSI). The other calls of
// ChunkService are served by gRPC only.
const (
	WireWriteChunk  wire.Method = 1
	WireReadChunk   wire.Method = 2
	WireDeleteChunk wire.Method = 3
	WireChunksExist wire.Method = 4
)

// MaxChunksExist bounds the chunk ids of one ChunksExistRequest.
const MaxChunksExist = 1024

// RegisterWireServer serves the data-path calls of s on srv, each wrapped
// by intercept when it is set, as the gRPC server would wrap them (with the
// gRPC method name in info.FullMethod).
func RegisterWireServer(srv *wire.Server, s ChunkServiceServer, intercept grpc.UnaryServerInterceptor) {
	register := func(m wire.Method, fullMethod string, newReq func() proto.Message, call func(ctx context.Context, req proto.Message) (proto.Message, error)) {
		handle := srv.Handle
		if m == WireReadChunk && intercept == nil {
			// Reads served from the page cache under the leader's lease
			// take less time than a goroutine hand-off: the handler runs
			// on the connection's reader when it can answer at once
			// (wire.HandleInline). Interceptors (tests) may wait.
			handle = srv.HandleInline
		}
		h := wire.Handler(call)
		if intercept != nil {
			info := &grpc.UnaryServerInfo{Server: s, FullMethod: fullMethod}
			h = func(ctx context.Context, req proto.Message) (proto.Message, error) {
				resp, err := intercept(ctx, req, info, func(ctx context.Context, req any) (any, error) {
					return call(ctx, req.(proto.Message))
				})
				if err != nil {
					return nil, err
				}
				return resp.(proto.Message), nil
			}
		}
		handle(m, fullMethod, newReq, h)
	}
	register(WireWriteChunk, ChunkService_WriteChunk_FullMethodName, func() proto.Message { return &WriteChunkRequest{} },
		func(ctx context.Context, req proto.Message) (proto.Message, error) {
			return s.WriteChunk(ctx, req.(*WriteChunkRequest))
		})
	register(WireReadChunk, ChunkService_ReadChunk_FullMethodName, func() proto.Message { return &ReadChunkRequest{} },
		func(ctx context.Context, req proto.Message) (proto.Message, error) {
			return s.ReadChunk(ctx, req.(*ReadChunkRequest))
		})
	register(WireDeleteChunk, ChunkService_DeleteChunk_FullMethodName, func() proto.Message { return &DeleteChunkRequest{} },
		func(ctx context.Context, req proto.Message) (proto.Message, error) {
			return s.DeleteChunk(ctx, req.(*DeleteChunkRequest))
		})
	register(WireChunksExist, ChunkService_ChunksExist_FullMethodName, func() proto.Message { return &ChunksExistRequest{} },
		func(ctx context.Context, req proto.Message) (proto.Message, error) {
			return s.ChunksExist(ctx, req.(*ChunksExistRequest))
		})
}

// WireClient makes the data-path calls of the chunk service on one wire
// connection.
type WireClient struct {
	C *wire.Client
}

// WriteChunk writes a range of a chunk.
func (c WireClient) WriteChunk(ctx context.Context, req *WriteChunkRequest) (*WriteChunkResponse, error) {
	resp := &WriteChunkResponse{}
	if err := c.C.Call(ctx, WireWriteChunk, req, resp); err != nil {
		return nil, err
	}
	return resp, nil
}

// ReadChunk reads a range of a chunk.
func (c WireClient) ReadChunk(ctx context.Context, req *ReadChunkRequest) (*ReadChunkResponse, error) {
	resp := &ReadChunkResponse{}
	if err := c.C.Call(ctx, WireReadChunk, req, resp); err != nil {
		return nil, err
	}
	return resp, nil
}

// DeleteChunk deletes a chunk.
func (c WireClient) DeleteChunk(ctx context.Context, req *DeleteChunkRequest) (*DeleteChunkResponse, error) {
	resp := &DeleteChunkResponse{}
	if err := c.C.Call(ctx, WireDeleteChunk, req, resp); err != nil {
		return nil, err
	}
	return resp, nil
}

// ChunksExist asks which of a copyset's chunks exist.
func (c WireClient) ChunksExist(ctx context.Context, req *ChunksExistRequest) (*ChunksExistResponse, error) {
	resp := &ChunksExistResponse{}
	if err := c.C.Call(ctx, WireChunksExist, req, resp); err != nil {
		return nil, err
	}
	return resp, nil
}
