package mds

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sort"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/mds/schedule"
)

// leaderState is what the MDS holds while it leads: the topology, copysets
// and operators cached from etcd (this MDS is their only writer while it
// leads), the heartbeat state of chunkservers, and the background work.
// Volumes, segments and sessions are read from etcd on every call.
type leaderState struct {
	s      *Server
	st     *store
	consts *mdspb.ClusterConstants
	log    *slog.Logger
	since  time.Time // when this MDS became leader
	// prevLease is the longest epoch lease an earlier leader may have
	// granted (as recorded in etcd when this one took over).
	prevLease time.Duration

	ctx    context.Context // cancelled when leadership ends
	cancel context.CancelFunc
	wg     sync.WaitGroup
	kick   chan struct{} // wakes the background loop
	// schedKick wakes the schedulers.
	schedKick chan struct{}
	// stepDown is closed when this leader must give up its leadership.
	stepDown     chan struct{}
	stepDownOnce sync.Once

	// topoWrite serialises topology and copyset writes to etcd (registration,
	// pool creation, copyset updates from heartbeats, operators).
	topoWrite sync.Mutex
	// epochWrite serialises volume epoch bumps (they share the epoch table
	// version counter).
	epochWrite sync.Mutex
	// volLocks serialises segment allocation per volume.
	volLocks keyedMutex
	chunkIDs idBatcher

	mu struct {
		sync.Mutex
		physPools    map[uint32]*mdspb.PhysicalPool
		zones        map[uint32]*mdspb.Zone
		servers      map[uint32]*mdspb.Server
		chunkServers map[uint64]*csEntry
		logicalPools map[uint32]*mdspb.LogicalPool
		copysets     map[uint64]*mdspb.Copyset // by copysetKey
		operators    map[uint64]*mdspb.Operator
		// unsaved are operators queued in memory whose etcd write has not
		// finished: nobody is handed them (or shown them) before they are
		// durable, so that a new MDS leader knows every operator under way.
		unsaved  map[*mdspb.Operator]bool
		rebuilds map[uint64]*rebuild    // broken replicas being rebuilt, by copysetKey
		avoid    map[uint64]avoid       // targets that did not take a copyset's replica in time
		blocked  []schedule.Blocked     // copysets the schedulers cannot repair now
		moved    []movedBytes           // replicas filled in the last minute
		pinned   map[uint64]time.Time   // copysets whose leader an operator chose, until when
		progress map[uint64]addProgress // adds whose new replica is still being filled
		// prepared are the add operators whose target holds the empty
		// replica they fill, by copysetKey; preparing, those being
		// created (prepare.go).
		prepared  map[uint64]*mdspb.Operator
		preparing map[uint64]bool
		// inherited are the operators loaded from etcd at the start of
		// this leadership; reported, the copysets whose leader has
		// reported to it since (prepare.go).
		inherited    map[uint64]*mdspb.Operator
		reported     map[uint64]bool
		epochVersion uint64
		// fences are epoch raises whose fenceEpoch has not completed yet,
		// by volume id: a retried unpublish finds the publication gone and
		// must still wait for the fence the first attempt began.
		fences   map[uint64]pendingFence
		rr       map[uint32]int // next copyset index per logical pool
		segments int64          // allocated segments of every volume
	}
}

// csEntry is a chunkserver: its stored record plus what heartbeats tell.
type csEntry struct {
	rec      *mdspb.ChunkServer // as stored (no live fields)
	token    string
	physPool uint32
	lastHB   time.Time // zero until the first heartbeat to this leader
	// epochVersion is the epoch table version the chunkserver reported in
	// its last heartbeat to this leader.
	epochVersion uint64
	capacity     *mdspb.Capacity
	// features are what its last heartbeat to this leader said it
	// understands (HeartbeatRequest.features).
	features []string
}

func newLeaderState(s *Server, st *store) *leaderState {
	ctx, cancel := context.WithCancel(context.Background())
	l := &leaderState{
		s: s, st: st, consts: s.consts, log: s.log, since: time.Now(),
		ctx: ctx, cancel: cancel, kick: make(chan struct{}, 1), schedKick: make(chan struct{}, 1), stepDown: make(chan struct{}),
	}
	st.uncertain = func(err error) {
		l.stepDownOnce.Do(func() {
			l.log.Error("stepping down: an etcd write has an unknown outcome", "err", err)
			close(l.stepDown)
		})
	}
	l.chunkIDs = idBatcher{st: st, kind: counterChunk, batch: 4096}
	l.mu.rr = map[uint32]int{}
	l.mu.fences = map[uint64]pendingFence{}
	return l
}

// load reads the topology, copysets, operators and counters from etcd.
func (l *leaderState) load(ctx context.Context) error {
	pps, err := list[mdspb.PhysicalPool](ctx, l.st, l.st.k.physicalPools())
	if err != nil {
		return err
	}
	zones, err := list[mdspb.Zone](ctx, l.st, l.st.k.zones())
	if err != nil {
		return err
	}
	servers, err := list[mdspb.Server](ctx, l.st, l.st.k.servers())
	if err != nil {
		return err
	}
	css, err := list[mdspb.ChunkServer](ctx, l.st, l.st.k.chunkServers())
	if err != nil {
		return err
	}
	lps, err := list[mdspb.LogicalPool](ctx, l.st, l.st.k.logicalPools())
	if err != nil {
		return err
	}
	copysets, err := list[mdspb.Copyset](ctx, l.st, l.st.k.copysets())
	if err != nil {
		return err
	}
	ops, err := list[mdspb.Operator](ctx, l.st, l.st.k.operators())
	if err != nil {
		return err
	}
	epochVersion, err := l.st.readCounter(ctx, counterEpochTable)
	if err != nil {
		return err
	}
	segments, err := l.st.count(ctx, l.st.k.segments())
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.mu.physPools = map[uint32]*mdspb.PhysicalPool{}
	for _, p := range pps {
		l.mu.physPools[p.Id] = p
	}
	l.mu.zones = map[uint32]*mdspb.Zone{}
	for _, z := range zones {
		l.mu.zones[z.Id] = z
	}
	l.mu.servers = map[uint32]*mdspb.Server{}
	for _, sv := range servers {
		l.mu.servers[sv.Id] = sv
	}
	l.mu.chunkServers = map[uint64]*csEntry{}
	for _, cs := range css {
		tok, _, err := l.st.getRaw(ctx, l.st.k.token(cs.Id))
		if err != nil {
			return err
		}
		e := &csEntry{rec: cs, token: tok, capacity: cs.Capacity}
		if z := l.mu.zones[cs.ZoneId]; z != nil {
			e.physPool = z.PhysicalPoolId
		}
		l.mu.chunkServers[cs.Id] = e
	}
	l.mu.logicalPools = map[uint32]*mdspb.LogicalPool{}
	for _, p := range lps {
		l.mu.logicalPools[p.Id] = p
		l.mu.rr[p.Id] = rand.IntN(1 << 20)
	}
	l.mu.copysets = map[uint64]*mdspb.Copyset{}
	for _, c := range copysets {
		l.mu.copysets[c.Id.Key()] = c
	}
	l.mu.operators = map[uint64]*mdspb.Operator{}
	l.mu.unsaved = map[*mdspb.Operator]bool{}
	l.mu.rebuilds = map[uint64]*rebuild{}
	l.mu.avoid = map[uint64]avoid{}
	l.mu.pinned = map[uint64]time.Time{}
	l.mu.progress = map[uint64]addProgress{}
	l.mu.prepared = map[uint64]*mdspb.Operator{}
	l.mu.preparing = map[uint64]bool{}
	l.mu.inherited = map[uint64]*mdspb.Operator{}
	l.mu.reported = map[uint64]bool{}
	for _, o := range ops {
		l.mu.operators[o.Copyset.Key()] = o
		l.mu.inherited[o.Copyset.Key()] = o
	}
	l.mu.epochVersion = epochVersion
	l.mu.segments = segments
	l.log.Info("leader state loaded", "chunkservers", len(css), "logical_pools", len(lps),
		"copysets", len(copysets), "operators", len(ops), "segments", segments)
	return l.recordEpochLease(ctx)
}

// stop ends the background work of this leadership.
func (l *leaderState) stop() {
	l.cancel()
	l.wg.Wait()
}

// wake asks the background loop to run soon.
func (l *leaderState) wake() {
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// onlineStateLocked derives a chunkserver's state from its heartbeat age. A
// chunkserver not heard from since this MDS became leader is UNKNOWN until
// the offline timeout has passed since then.
func (l *leaderState) onlineStateLocked(e *csEntry, now time.Time) mdspb.OnlineState {
	cfg := &l.s.cfg
	if e.lastHB.IsZero() {
		if now.Sub(l.since) > cfg.OfflineTimeout {
			return mdspb.OnlineState_ONLINE_STATE_OFFLINE
		}
		return mdspb.OnlineState_ONLINE_STATE_UNKNOWN
	}
	switch age := now.Sub(e.lastHB); {
	case age <= cfg.UnstableTimeout:
		return mdspb.OnlineState_ONLINE_STATE_ONLINE
	case age <= cfg.OfflineTimeout:
		return mdspb.OnlineState_ONLINE_STATE_UNSTABLE
	default:
		return mdspb.OnlineState_ONLINE_STATE_OFFLINE
	}
}

// chunkServerViewLocked is the API view of a chunkserver with live fields.
func (l *leaderState) chunkServerViewLocked(e *csEntry, now time.Time, counts map[uint64][2]uint32) *mdspb.ChunkServer {
	v := proto.CloneOf(e.rec)
	v.OnlineState = l.onlineStateLocked(e, now)
	v.Capacity = proto.CloneOf(e.capacity)
	if !e.lastHB.IsZero() {
		v.LastHeartbeatUnix = e.lastHB.Unix()
	}
	c := counts[e.rec.Id]
	v.CopysetCount, v.LeaderCount = c[0], c[1]
	return v
}

// copysetCountsLocked counts copysets and leaderships per chunkserver.
func (l *leaderState) copysetCountsLocked() map[uint64][2]uint32 {
	counts := map[uint64][2]uint32{}
	for _, c := range l.mu.copysets {
		for _, p := range c.Peers {
			x := counts[p.ChunkserverId]
			x[0]++
			if p.ChunkserverId == c.LeaderId {
				x[1]++
			}
			counts[p.ChunkserverId] = x
		}
	}
	return counts
}

// copysetViewLocked is the API view of a copyset, with its members' current
// addresses.
func (l *leaderState) copysetViewLocked(c *mdspb.Copyset) *mdspb.Copyset {
	v := proto.CloneOf(c)
	for _, p := range v.Peers {
		if e := l.mu.chunkServers[p.ChunkserverId]; e != nil {
			p.Address = e.rec.Address
		}
	}
	return v
}

// poolCopysetsLocked returns the copysets of a logical pool in id order.
func (l *leaderState) poolCopysetsLocked(pool uint32) []*mdspb.Copyset {
	var out []*mdspb.Copyset
	for _, c := range l.mu.copysets {
		if c.Id.GetLogicalPoolId() == pool {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Id.CopysetId < out[j].Id.CopysetId })
	return out
}

// keyedMutex is a set of mutexes by uint64 key, created on demand.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[uint64]*keyedLock
}

type keyedLock struct {
	sync.Mutex
	refs int
}

func (k *keyedMutex) lock(key uint64) func() {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[uint64]*keyedLock{}
	}
	l := k.locks[key]
	if l == nil {
		l = &keyedLock{}
		k.locks[key] = l
	}
	l.refs++
	k.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		k.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}

// idBatcher hands out ids reserved from an etcd counter in batches, so that
// allocating a segment's chunk ids rarely costs an etcd write.
type idBatcher struct {
	st    *store
	kind  string
	batch uint64

	mu         sync.Mutex
	next, last uint64 // next id to hand out; last reserved id
}

// take returns n consecutive fresh ids (the first of them).
func (b *idBatcher) take(ctx context.Context, n uint64) (uint64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.next == 0 || b.next+n-1 > b.last {
		size := max(b.batch, n)
		first, err := b.st.reserveIDs(ctx, b.kind, size)
		if err != nil {
			return 0, fmt.Errorf("reserve %s ids: %w", b.kind, err)
		}
		b.next, b.last = first, first+size-1
	}
	id := b.next
	b.next += n
	return id, nil
}
