package attach

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/iscsi"
	"cairn.io/cairn/iscsi/scsi"
)

// The iscsi attach: the attach process serves the volume with Cairn's own
// iSCSI target (package iscsi) on a portal of the node's loopback,
// 127.0.0.1:PORT, as a target of its own (a name with a random part) that
// only CHAP with random secrets opens, and logs the node's kernel
// initiator in with open-iscsi's iscsiadm (openiscsi.go): /dev/sdX. The
// session is the kernel's: when the process dies, the kernel queues the
// disk's IO for node.session.timeo.replacement_timeout
// (Spec.ReattachTimeout) while iscsid logs in again and again; a new
// attach process that listens on the same portal, with the same target
// name and secrets (kept in the record, which only root reads), takes it
// over: the kernel sees a connection that came back. The CHAP is mutual:
// the kernel checks the target's secret too, so a process that took the
// portal meanwhile can neither log in nor serve the kernel.

// iqnPrefix prefixes the target names of attachments: a target is
// iqnPrefix:<volume>.<random>.
const iqnPrefix = iscsi.DefaultIQNPrefix + ".csi"

// CHAP user names of attachments (the secrets are random).
const (
	chapUser       = "cairn-csi"
	chapTargetUser = "cairn-csi-target"
)

// portalHost is the address the attach's target listens on: only the
// node's own processes reach it.
const portalHost = "127.0.0.1"

// Ports of new portals are drawn from portalPortMin up to the start of the
// kernel's ephemeral port range (ip_local_port_range), so that while no
// attach process listens on a portal, no outgoing connection takes its
// port as its own and a new attach process can listen there again.
const (
	portalPortMin = 20000
	portalTries   = 64
)

// iscsiLoginTimeout bounds the login and the wait for the kernel's disk.
const iscsiLoginTimeout = 90 * time.Second

// iscsiLogoutTimeout bounds the logout at a stop.
const iscsiLogoutTimeout = time.Minute

// portalRebindWait is how long a takeover tries to listen on the portal
// again while its port is taken (a socket of the dead process's that the
// kernel has not released yet).
const portalRebindWait = 15 * time.Second

// serveISCSI is Serve for the iscsi attach.
func serveISCSI(ctx context.Context, spec Spec, dev blockdev.Device, ready io.Writer, log *slog.Logger) error {
	sector, err := sectorOf(dev)
	if err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	if spec.ReattachTimeout <= 0 {
		spec.ReattachTimeout = DefaultReattachTimeout
	}
	ini := newISCSIInitiator(spec.ISCSIAdm)
	var (
		node   iscsiNode
		device string
		ln     net.Listener
	)
	if t := spec.Takeover; t != nil {
		old, err := takeoverRecord(spec, t)
		if err != nil {
			return fmt.Errorf("attach %s: %w", spec.Volume, err)
		}
		if !ini.HasSession(old.Target) {
			return fmt.Errorf("attach %s: the kernel has no session with %s any more: nothing to take over", spec.Volume, old.Target)
		}
		node, device = old.iscsiNode(), old.Device
		if ln, err = listenAgain(ctx, old.Portal); err != nil {
			return fmt.Errorf("attach %s: %w", spec.Volume, err)
		}
	} else {
		if node, err = newISCSINode(spec.Volume); err != nil {
			return fmt.Errorf("attach %s: %w", spec.Volume, err)
		}
		if ln, err = listenNewPortal(); err != nil {
			return fmt.Errorf("attach %s: %w", spec.Volume, err)
		}
		node.Portal = ln.Addr().String()
	}
	node.ReplacementTimeout = spec.ReattachTimeout
	export := strings.TrimPrefix(node.Target, iqnPrefix+":")
	srv, err := iscsi.NewServer(iscsi.Config{
		Exports: oneExport{export, dev}, IQNPrefix: iqnPrefix,
		CHAP: map[string]iscsi.CHAP{export: node.CHAP}, DiscoveryCHAP: &node.CHAP,
		Unit:   scsi.Config{BlockSize: int(sector), PhysicalBlockExponent: physicalExponent(sector), ReadOnly: spec.ReadOnly},
		Logger: log,
	})
	if err != nil {
		ln.Close()
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer srv.Close()

	rec := Record{Spec: spec, Pid: os.Getpid(), Device: device, Portal: node.Portal, Target: node.Target, CHAP: &node.CHAP,
		BootID: bootID(), StartedUnix: time.Now().Unix()}
	rec.Takeover = nil
	// Failing from here on, a session this process logged in is logged
	// out; one it took over is left to the next takeover (file systems on
	// it hold their IO until then).
	abandon := func(err error) error {
		if spec.Takeover == nil {
			lctx, cancel := context.WithTimeout(context.Background(), iscsiLogoutTimeout)
			defer cancel()
			if lerr := ini.Logout(lctx, node); lerr != nil {
				log.Error("logging the kernel out after a failed attach", "target", node.Target, "err", lerr)
			}
		}
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	if spec.Takeover == nil {
		// Recorded before the login: should the process die while it
		// logs in, the node still finds the session and logs it out.
		if err := writeRecord(rec); err != nil {
			return abandon(err)
		}
		lctx, cancel := context.WithTimeout(ctx, iscsiLoginTimeout)
		rec.Device, err = ini.Login(lctx, node)
		cancel()
		if err != nil {
			return abandon(fmt.Errorf("log the kernel in to %s at %s: %w", node.Target, node.Portal, err))
		}
	} else {
		log.Info("took over the iscsi session: serving its portal again", "target", node.Target, "portal", node.Portal, "device", rec.Device)
	}
	resize := func(ctx context.Context) error {
		srv.NotifyResize(export)
		size := dev.Size() - dev.Size()%sector
		got, err := ini.Rescan(ctx, rec.Device)
		if err != nil {
			return err
		}
		if got < size {
			return fmt.Errorf("the kernel kept %s at %d bytes after a rescan, not the volume's %d", rec.Device, got, size)
		}
		return nil
	}
	ctl, err := serveControl(spec.Dir, rec, dev, sector, resize, log)
	if err != nil {
		return abandon(err)
	}
	defer ctl.Close()
	if err := announce(rec, ready, log); err != nil {
		return abandon(err)
	}
	select {
	case <-ctx.Done():
	case err := <-served:
		// The portal cannot accept connections: the kernel holds the IO
		// until a new attach process serves it.
		return fmt.Errorf("attach %s: the portal %s failed: %w", spec.Volume, node.Portal, err)
	}
	waitReleased(rec.Device, log)
	log.Info("logging the kernel out", "volume", spec.Volume, "device", rec.Device, "target", node.Target)
	lctx, cancel := context.WithTimeout(context.Background(), iscsiLogoutTimeout)
	defer cancel()
	if err := ini.Logout(lctx, node); err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	return nil
}

// physicalExponent makes the unit report 4 KiB physical blocks (or the
// logical block, when larger).
func physicalExponent(sector int64) uint8 {
	var e uint8
	for s := sector; s < 4096; s <<= 1 {
		e++
	}
	return e
}

// newISCSINode names a new attachment's target and draws its secrets.
func newISCSINode(volume string) (iscsiNode, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return iscsiNode{}, fmt.Errorf("target name: %w", err)
	}
	secret, err := newSecret()
	if err != nil {
		return iscsiNode{}, err
	}
	mutual, err := newSecret()
	if err != nil {
		return iscsiNode{}, err
	}
	return iscsiNode{
		Target: iscsi.TargetNameOf(iqnPrefix, iqnSafe(volume)+"."+hex.EncodeToString(b[:])),
		CHAP:   iscsi.CHAP{User: chapUser, Secret: secret, MutualUser: chapTargetUser, MutualSecret: mutual},
	}, nil
}

// newSecret is a random CHAP secret: 128 bits, as 32 hex digits.
func newSecret() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("CHAP secret: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// maxIQNVolume bounds the part of a target name taken from the volume's
// name (an iSCSI name has at most 223 bytes).
const maxIQNVolume = 160

// iqnSafe is volume as an iSCSI name allows it (RFC 3722: lower case
// letters, digits, '-' and '.'), other characters as '-'.
func iqnSafe(volume string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(volume) {
		if b.Len() >= maxIQNVolume {
			break
		}
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-', r == '.':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	return b.String()
}

// ephemeralPorts is the kernel's range of ports for outgoing connections.
func ephemeralPorts() (lo, hi int) {
	lo, hi = 32768, 60999
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return lo, hi
	}
	f := strings.Fields(string(b))
	if len(f) == 2 {
		l, err1 := strconv.Atoi(f[0])
		h, err2 := strconv.Atoi(f[1])
		if err1 == nil && err2 == nil {
			return l, h
		}
	}
	return lo, hi
}

// listenNewPortal listens on a free port of the loopback below the
// ephemeral range (any free port when the range leaves too few below it).
func listenNewPortal() (net.Listener, error) {
	lo, _ := ephemeralPorts()
	if lo-portalPortMin < 1000 {
		ln, err := net.Listen("tcp", net.JoinHostPort(portalHost, "0"))
		if err != nil {
			return nil, fmt.Errorf("listen on the loopback: %w", err)
		}
		return ln, nil
	}
	var last error
	for range portalTries {
		addr := net.JoinHostPort(portalHost, strconv.Itoa(portalPortMin+mrand.IntN(lo-portalPortMin)))
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			return ln, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("listen on %s: %w", addr, err)
		}
		last = err
	}
	return nil, fmt.Errorf("no free port for a portal among %d tried from %d to %d: %w", portalTries, portalPortMin, lo-1, last)
}

// listenAgain listens on the portal of an attach process that is gone,
// waiting a little while its port is still taken.
func listenAgain(ctx context.Context, portal string) (net.Listener, error) {
	deadline := time.Now().Add(portalRebindWait)
	for {
		ln, err := net.Listen("tcp", portal)
		if err == nil {
			return ln, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return nil, fmt.Errorf("listen on the portal %s again: %w (another process took its port; the kernel's session does not log in to it, which cannot answer the target's CHAP)", portal, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// takeoverRecord reads the record of the iscsi attach process that is
// gone, which a takeover serves again: it must be this volume's, of this
// boot, for the target named.
func takeoverRecord(spec Spec, t *Takeover) (*Record, error) {
	old, err := ReadRecord(spec.Dir)
	if err != nil {
		return nil, fmt.Errorf("the record of the session to take over: %w", err)
	}
	switch {
	case old.mode() != AttachISCSI || old.Volume != spec.Volume:
		return nil, fmt.Errorf("the record in %s is of a %s attach of %s, not an iscsi attach of %s", spec.Dir, old.mode(), old.Volume, spec.Volume)
	case old.Target != t.Target || old.Portal == "" || old.CHAP == nil:
		return nil, fmt.Errorf("the record in %s is of target %q, not %q", spec.Dir, old.Target, t.Target)
	case old.BootID == "" || old.BootID != bootID():
		return nil, errors.New("the machine restarted since the session was logged in")
	}
	return old, nil
}

// iscsiNode is the node record of an iscsi attachment.
func (r *Record) iscsiNode() iscsiNode {
	n := iscsiNode{Portal: r.Portal, Target: r.Target, ReplacementTimeout: r.ReattachTimeout}
	if r.CHAP != nil {
		n.CHAP = *r.CHAP
	}
	return n
}

// reattachableISCSI is Reattachable for the iscsi attach: the session is
// the kernel's until it is logged out, in the boot that logged it in.
func (r *Record) reattachableISCSI() error {
	if r.BootID == "" || r.BootID != bootID() {
		return errors.New("the machine restarted since the session was logged in")
	}
	if r.Target == "" || r.Portal == "" || r.CHAP == nil {
		return errors.New("the attach process was gone before it logged the kernel in")
	}
	if !newISCSIInitiator(r.ISCSIAdm).HasSession(r.Target) {
		return fmt.Errorf("the kernel has no session with %s any more", r.Target)
	}
	return nil
}

// cleanupISCSI logs out the session of an iscsi attachment whose process
// was killed and deletes its node record.
func (r *Record) cleanupISCSI(ctx context.Context) error {
	if r.Target == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, iscsiLogoutTimeout)
	defer cancel()
	if err := newISCSIInitiator(r.ISCSIAdm).Logout(ctx, r.iscsiNode()); err != nil {
		return fmt.Errorf("clean up the iscsi attach of %s: %w", r.Volume, err)
	}
	return nil
}
