package iscsi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/iscsi/scsi"
)

// Server is an iSCSI target portal serving every volume of its Exports.
type Server struct {
	cfg Config
	lim bufferLimits // derived from cfg.MaxSessionBuffer
	log *slog.Logger

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	targets   map[string]*target
	sessions  map[uint16]*session
	nextTSIH  uint16
	wg        sync.WaitGroup

	stats struct {
		commands, nopOuts, pings, dropped atomic.Uint64
		reinstating                       atomic.Int64
	}
}

// Stats are counters of a server's activity, for metrics and tests.
type Stats struct {
	// Sessions is the number of sessions logged in now.
	Sessions int
	// Commands counts SCSI commands executed.
	Commands uint64
	// NopOuts counts NOP-Outs received (initiator pings and answers to
	// the target's pings).
	NopOuts uint64
	// Pings counts NOP-In pings the target sent to idle initiators.
	Pings uint64
	// DeadInitiators counts connections dropped because the initiator
	// did not answer a ping within NopTimeout.
	DeadInitiators uint64
	// Reinstating is the number of logins waiting, before full feature
	// phase, for the commands of the session they reinstate to return
	// from the backend.
	Reinstating int64
}

// Stats returns the current counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	n := len(s.sessions)
	s.mu.Unlock()
	return Stats{
		Sessions:       n,
		Commands:       s.stats.commands.Load(),
		NopOuts:        s.stats.nopOuts.Load(),
		Pings:          s.stats.pings.Load(),
		DeadInitiators: s.stats.dropped.Load(),
		Reinstating:    s.stats.reinstating.Load(),
	}
}

// target is one open volume with its logical unit, shared by the sessions
// logged in to it.
type target struct {
	name  string
	iqn   string
	ready chan struct{} // closed once vol/lu/err are set
	vol   blockdev.Device
	lu    *scsi.LogicalUnit
	err   error
	refs  int // sessions holding the target, guarded by Server.mu
	// dropped is set by DropTarget (guarded by Server.mu): the target is
	// out of Server.targets and no further session may join it.
	dropped bool
}

// NewServer validates cfg and returns a server that is not yet listening.
func NewServer(cfg Config) (*Server, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	return &Server{
		cfg:       cfg,
		lim:       cfg.limits(),
		log:       cfg.Logger.With("component", "iscsi"),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
		targets:   make(map[string]*target),
		sessions:  make(map[uint16]*session),
	}, nil
}

// snapInfix stands for the "@" of a device name VOLUME@SNAPSHOT in its
// target name: initiators' iSCSI URLs (libiscsi's, qemu's) read an "@" as
// the end of a user name.
const snapInfix = ":snap:"

// TargetName returns the IQN of a device's target (see TargetNameOf).
func (s *Server) TargetName(volume string) string { return TargetNameOf(s.cfg.IQNPrefix, volume) }

// TargetNameOf is the IQN of a device's target under prefix: the prefix,
// ":" and the device's name, a snapshot VOLUME@SNAPSHOT as
// VOLUME:snap:SNAPSHOT.
func TargetNameOf(prefix, device string) string {
	if i := strings.LastIndexByte(device, '@'); i > 0 {
		device = device[:i] + snapInfix + device[i+1:]
	}
	return prefix + ":" + device
}

// volumeOf returns the device a target name refers to.
func (s *Server) volumeOf(iqn string) (string, bool) {
	p := s.cfg.IQNPrefix + ":"
	if len(iqn) <= len(p) || !strings.EqualFold(iqn[:len(p)], p) {
		return "", false
	}
	name := iqn[len(p):]
	if i := strings.LastIndex(name, snapInfix); i > 0 && i+len(snapInfix) < len(name) {
		name = name[:i] + "@" + name[i+len(snapInfix):]
	}
	return name, true
}

// ListenAndServe listens on Config.Addr and serves until Close.
func (s *Server) ListenAndServe() error {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("iscsi: listen %s: %w", s.cfg.Addr, err)
	}
	return s.Serve(ln)
}

// Serve accepts connections on ln until Close; it always returns a non-nil
// error, ErrServerClosed after Close. Serve may be called for several
// listeners (portals) at once.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("iscsi: accept: %w", err)
		}
		delay = 0
		c := newConn(s, nc)
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			return ErrServerClosed
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			c.serve()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// Close stops accepting connections, asks every logged-in initiator to log
// out, waits up to Config.CloseTimeout for them to do so, then drops the
// remaining connections once their commands in flight have completed, and
// closes the volumes.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.requestLogout(s.cfg.CloseTimeout)
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(s.cfg.CloseTimeout):
		for _, c := range conns {
			c.keepIO.Store(true)
			c.close()
		}
		<-done
	}
	return nil
}

// NotifyResize tells the target of a volume that its size changed; the
// next command of every session reports CAPACITY DATA HAS CHANGED. (The
// unit also notices a changed Size on its own at the next command.)
func (s *Server) NotifyResize(volume string) {
	s.mu.Lock()
	t := s.targets[volume]
	s.mu.Unlock()
	if t == nil {
		return
	}
	<-t.ready
	if t.lu != nil {
		t.lu.NotifyResize()
	}
}

// DropTarget ends every session of a volume's target (for a volume that was
// deleted or must be detached); the volume is closed once they are gone. A
// login already under way cannot join the dropped target, and later logins
// open the volume afresh through Exports.Open, which refuses a volume that is
// gone.
func (s *Server) DropTarget(volume string) {
	s.mu.Lock()
	if t := s.targets[volume]; t != nil {
		t.dropped = true
		delete(s.targets, volume)
	}
	var victims []*conn
	for _, ss := range s.sessions {
		if ss.target != nil && ss.target.name == volume {
			victims = append(victims, ss.conn)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		c.close()
	}
}

// acquireTarget opens (or shares) the target of a volume.
func (s *Server) acquireTarget(ctx context.Context, volume string) (*target, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrServerClosed
	}
	t := s.targets[volume]
	if t != nil {
		t.refs++
		s.mu.Unlock()
		<-t.ready
		if t.err != nil {
			s.releaseTarget(t)
			return nil, t.err
		}
		return t, nil
	}
	t = &target{name: volume, iqn: s.TargetName(volume), ready: make(chan struct{}), refs: 1}
	s.targets[volume] = t
	s.mu.Unlock()

	vol, err := s.cfg.Exports.Open(ctx, volume)
	if err == nil {
		ucfg := s.cfg.Unit
		ucfg.Backend = vol
		ucfg.Name = volume
		ucfg.MaxTransferBlocks = s.lim.maxXferBlocks
		ucfg.ReadOnly = ucfg.ReadOnly || blockdev.IsReadOnly(vol) // a snapshot
		if ucfg.Logger == nil {
			ucfg.Logger = s.log
		}
		t.lu, err = scsi.New(ucfg)
		if err != nil {
			vol.Close()
		} else {
			t.vol = vol
		}
	}
	if err != nil {
		t.err = fmt.Errorf("open volume %q: %w", volume, err)
	}
	close(t.ready)
	if t.err != nil {
		s.releaseTarget(t)
		return nil, t.err
	}
	return t, nil
}

// releaseTarget drops one reference; the last one closes the volume.
func (s *Server) releaseTarget(t *target) {
	s.mu.Lock()
	t.refs--
	last := t.refs == 0
	if last && s.targets[t.name] == t {
		delete(s.targets, t.name)
	}
	s.mu.Unlock()
	if last && t.vol != nil {
		if err := t.vol.Close(); err != nil {
			s.log.Error("close volume", "volume", t.name, "err", err)
		}
	}
}

// errTargetDropped refuses a login whose target was dropped while it ran.
var errTargetDropped = errors.New("iscsi: target removed")

// registerSession assigns a TSIH and performs session reinstatement: an
// existing session of the same initiator port (name and ISID) to the same
// target is ended first (RFC 7143 section 6.3.5). It refuses a session of a
// target that DropTarget removed meanwhile.
func (s *Server) registerSession(ss *session) (uint16, []*session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ss.target != nil && ss.target.dropped {
		return 0, nil, fmt.Errorf("%w: %s", errTargetDropped, ss.target.name)
	}
	var old []*session
	for tsih, o := range s.sessions {
		if o.initiatorName == ss.initiatorName && o.isid == ss.isid && o.targetIQN == ss.targetIQN {
			old = append(old, o)
			delete(s.sessions, tsih)
		}
	}
	for {
		s.nextTSIH++
		if s.nextTSIH == 0 {
			continue
		}
		if _, used := s.sessions[s.nextTSIH]; !used {
			break
		}
	}
	s.sessions[s.nextTSIH] = ss
	return s.nextTSIH, old, nil
}

func (s *Server) unregisterSession(ss *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sessions[ss.tsih] == ss {
		delete(s.sessions, ss.tsih)
	}
}

// sessionsOf returns the live sessions of a target.
func (s *Server) sessionsOf(t *target) []*session {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*session
	for _, ss := range s.sessions {
		if ss.target == t {
			out = append(out, ss)
		}
	}
	return out
}
