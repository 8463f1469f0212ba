package mds

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// errNotLeader is returned by guarded writes when this MDS no longer holds
// the election: the write was not made.
var errNotLeader = errors.New("mds: leadership lost")

// maxTxnOps bounds the operations of one etcd transaction (etcd's default
// limit is 128).
const maxTxnOps = 100

// keys names every key the MDS keeps in etcd; docs/mds.md lists the layout.
type keys struct{ p string }

func (k keys) constants() string          { return k.p + "constants" }
func (k keys) election() string           { return k.p + "election/" }
func (k keys) counter(kind string) string { return k.p + "ids/" + kind }
func (k keys) epochLease() string         { return k.p + "epoch_lease_ms" }
func (k keys) physicalPools() string      { return k.p + "topo/physical_pool/" }
func (k keys) physicalPool(id uint32) string {
	return fmt.Sprintf("%s%08d", k.physicalPools(), id)
}
func (k keys) zones() string         { return k.p + "topo/zone/" }
func (k keys) zone(id uint32) string { return fmt.Sprintf("%s%08d", k.zones(), id) }
func (k keys) servers() string       { return k.p + "topo/server/" }
func (k keys) server(id uint32) string {
	return fmt.Sprintf("%s%08d", k.servers(), id)
}
func (k keys) chunkServers() string { return k.p + "topo/chunkserver/" }
func (k keys) chunkServer(id uint64) string {
	return fmt.Sprintf("%s%016d", k.chunkServers(), id)
}
func (k keys) tokens() string { return k.p + "topo/chunkserver_token/" }
func (k keys) token(id uint64) string {
	return fmt.Sprintf("%s%016d", k.tokens(), id)
}
func (k keys) logicalPools() string { return k.p + "topo/logical_pool/" }
func (k keys) logicalPool(id uint32) string {
	return fmt.Sprintf("%s%08d", k.logicalPools(), id)
}
func (k keys) copysets() string { return k.p + "copyset/" }
func (k keys) poolCopysets(pool uint32) string {
	return fmt.Sprintf("%s%08d/", k.copysets(), pool)
}
func (k keys) copyset(pool, id uint32) string {
	return fmt.Sprintf("%s%08d", k.poolCopysets(pool), id)
}
func (k keys) operators() string { return k.p + "operator/" }
func (k keys) operator(pool, id uint32) string {
	return fmt.Sprintf("%s%08d/%08d", k.operators(), pool, id)
}
func (k keys) volumes() string { return k.p + "volume/id/" }
func (k keys) volume(id uint64) string {
	return fmt.Sprintf("%s%016d", k.volumes(), id)
}
func (k keys) volumeNames() string           { return k.p + "volume/name/" }
func (k keys) volumeName(name string) string { return k.volumeNames() + name }
func (k keys) segments() string              { return k.p + "segment/" }
func (k keys) volumeSegments(vol uint64) string {
	return fmt.Sprintf("%s%016d/", k.segments(), vol)
}
func (k keys) segment(vol, index uint64) string {
	return fmt.Sprintf("%s%016d", k.volumeSegments(vol), index)
}
func (k keys) sessions() string        { return k.p + "session/" }
func (k keys) nodes() string           { return k.p + "node/" }
func (k keys) node(name string) string { return k.nodes() + name }
func (k keys) volumeSessions(vol uint64) string {
	return fmt.Sprintf("%s%016d/", k.sessions(), vol)
}
func (k keys) session(vol uint64, id string) string { return k.volumeSessions(vol) + id }

// Counter kinds (keys.counter).
const (
	counterPhysicalPool = "physical_pool"
	counterZone         = "zone"
	counterServer       = "server"
	counterChunkServer  = "chunkserver"
	counterLogicalPool  = "logical_pool"
	counterVolume       = "volume"
	counterChunk        = "chunk"
	counterEpochTable   = "epoch_table"
)

// store reads and writes the MDS's records in etcd. Every write is guarded by
// the leader's election key, so a deposed leader can change nothing.
type store struct {
	cli   *clientv3.Client
	k     keys
	guard clientv3.Cmp
	// uncertain is called when a write's outcome is unknown (etcd did not
	// answer): the caches may no longer match etcd, so the leader steps down
	// and the next leader reloads everything.
	uncertain func(error)
}

// txnTimeout bounds one guarded write. Writes do not follow the caller's
// cancellation: once sent, a write completes or its outcome is unknown.
const txnTimeout = 10 * time.Second

func putOp(key string, m proto.Message) clientv3.Op {
	b, err := proto.Marshal(m)
	if err != nil {
		// Marshalling our own well-formed messages cannot fail.
		panic(fmt.Sprintf("mds: marshal %T: %v", m, err))
	}
	return clientv3.OpPut(key, string(b))
}

// get reads one record; found is false when the key does not exist. rev is
// the key's mod revision (0 when missing).
func (s *store) get(ctx context.Context, key string, m proto.Message) (found bool, rev int64, err error) {
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return false, 0, fmt.Errorf("etcd get %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return false, 0, nil
	}
	if err := proto.Unmarshal(resp.Kvs[0].Value, m); err != nil {
		return false, 0, fmt.Errorf("decode %s: %w", key, err)
	}
	return true, resp.Kvs[0].ModRevision, nil
}

// getRaw reads a key's value as a string.
func (s *store) getRaw(ctx context.Context, key string) (value string, found bool, err error) {
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return "", false, fmt.Errorf("etcd get %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return "", false, nil
	}
	return string(resp.Kvs[0].Value), true, nil
}

// list decodes every record under prefix, in key order.
func list[T any, P interface {
	*T
	proto.Message
}](ctx context.Context, s *store, prefix string) ([]P, error) {
	resp, err := s.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("etcd list %s: %w", prefix, err)
	}
	out := make([]P, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		m := P(new(T))
		if err := proto.Unmarshal(kv.Value, m); err != nil {
			return nil, fmt.Errorf("decode %s: %w", kv.Key, err)
		}
		out = append(out, m)
	}
	return out, nil
}

// count returns the number of keys under prefix.
func (s *store) count(ctx context.Context, prefix string) (int64, error) {
	resp, err := s.cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0, fmt.Errorf("etcd count %s: %w", prefix, err)
	}
	return resp.Count, nil
}

// txn applies ops when every cmp holds and this MDS still leads. ok is false
// when a cmp failed (nothing was written); errNotLeader is returned when the
// leadership guard failed.
func (s *store) txn(ctx context.Context, cmps []clientv3.Cmp, ops ...clientv3.Op) (ok bool, err error) {
	if len(ops) > maxTxnOps {
		return false, fmt.Errorf("etcd txn: %d operations exceed %d", len(ops), maxTxnOps)
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), txnTimeout)
	defer cancel()
	resp, err := s.cli.Txn(wctx).If(s.guard).Then(clientv3.OpTxn(cmps, ops, nil)).Commit()
	if err != nil {
		err = fmt.Errorf("etcd txn: %w", err)
		if s.uncertain != nil {
			s.uncertain(err)
		}
		return false, err
	}
	if !resp.Succeeded {
		return false, errNotLeader
	}
	return resp.Responses[0].GetResponseTxn().GetSucceeded(), nil
}

// reserveIDs takes n consecutive ids of a kind and returns the first. Ids
// start at 1 and are never reused; ids taken by a write that then fails are
// skipped.
func (s *store) reserveIDs(ctx context.Context, kind string, n uint64) (uint64, error) {
	key := s.k.counter(kind)
	for attempt := 0; attempt < 10; attempt++ {
		v, found, err := s.getRaw(ctx, key)
		if err != nil {
			return 0, err
		}
		var old uint64
		cmp := clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
		if found {
			old, err = strconv.ParseUint(v, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("counter %s holds %q: %w", key, v, err)
			}
			cmp = clientv3.Compare(clientv3.Value(key), "=", v)
		}
		ok, err := s.txn(ctx, []clientv3.Cmp{cmp}, clientv3.OpPut(key, strconv.FormatUint(old+n, 10)))
		if err != nil {
			return 0, err
		}
		if ok {
			return old + 1, nil
		}
	}
	return 0, fmt.Errorf("counter %s: too much contention", key)
}

// readCounter returns a counter's value (0 when it was never used).
func (s *store) readCounter(ctx context.Context, kind string) (uint64, error) {
	v, found, err := s.getRaw(ctx, s.k.counter(kind))
	if err != nil || !found {
		return 0, err
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("counter %s holds %q: %w", kind, v, err)
	}
	return n, nil
}
