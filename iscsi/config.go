package iscsi

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/iscsi/scsi"
)

// CHAP holds the secrets of one target (or of discovery). The JSON names
// are those of a CHAP secrets file (ReadCHAPSecrets).
type CHAP struct {
	// User and Secret authenticate the initiator to the target.
	User   string `json:"user"`
	Secret string `json:"secret"`
	// MutualUser and MutualSecret, when set, authenticate the target to
	// an initiator that asks for mutual CHAP. An initiator that asks while
	// they are empty fails to log in.
	MutualUser   string `json:"mutual_user,omitempty"`
	MutualSecret string `json:"mutual_secret,omitempty"`
}

// Errors.
var (
	// ErrServerClosed is returned by Serve after Close.
	ErrServerClosed = errors.New("iscsi: server closed")
	// ErrInvalidConfig is returned by NewServer for an unusable Config.
	ErrInvalidConfig = errors.New("iscsi: invalid config")
)

// DefaultIQNPrefix is the prefix of target names: a volume v is exported
// as DefaultIQNPrefix + ":" + v.
const DefaultIQNPrefix = "iqn.2026-11.io.cairn"

// DefaultAddr is the address ListenAndServe uses when Config.Addr is empty.
const DefaultAddr = "127.0.0.1:3260"

// Config configures a Server. Zero values select the defaults noted.
type Config struct {
	// Exports lists and opens the volumes, one target each. Required. An
	// Open that fails with an error wrapping blockdev.ErrNotFound fails the
	// login with "target not found".
	Exports blockdev.Catalog
	// Addr is the listen address of ListenAndServe (default 127.0.0.1:3260).
	Addr string
	// IQNPrefix prefixes target names (default DefaultIQNPrefix).
	IQNPrefix string
	// CHAP maps a volume name to the CHAP secrets its target requires.
	// Targets without an entry accept AuthMethod None.
	CHAP map[string]CHAP
	// CHAPFor, when set, is consulted for volumes not in CHAP (for secrets
	// kept elsewhere). ok=false means no authentication.
	CHAPFor func(volume string) (c CHAP, ok bool)
	// DiscoveryCHAP, when set, is required of discovery sessions.
	DiscoveryCHAP *CHAP
	// NopInterval is how long a connection may be idle before the target
	// pings the initiator with a NOP-In (default 10s; negative disables).
	NopInterval time.Duration
	// NopTimeout is how long the target waits for the answer to a ping
	// before it drops the connection (default 30s).
	NopTimeout time.Duration
	// LoginTimeout bounds the login phase (default 15s).
	LoginTimeout time.Duration
	// CloseTimeout is how long Close waits for initiators to log out after
	// asking them to, before it drops their connections (default 2s).
	CloseTimeout time.Duration
	// QueueDepth is the CmdSN window of a session: how many commands it
	// may have in flight (default 128). It is lowered when the window's
	// unsolicited data would not fit in half of MaxSessionBuffer (see
	// there).
	QueueDepth int
	// MaxRecvDataSegmentLength is the largest data segment the target
	// accepts (default 262144).
	MaxRecvDataSegmentLength int
	// MaxBurstLength is the target's offer for the largest solicited or
	// Data-In sequence (default 1 MiB).
	MaxBurstLength int
	// FirstBurstLength is the target's offer for unsolicited data
	// (default 256 KiB).
	FirstBurstLength int
	// MaxOutstandingR2T is the target's offer for R2Ts in flight per
	// command (default 8).
	MaxOutstandingR2T int
	// MaxSessionBuffer bounds, in bytes, the data buffers a session (that
	// is, its one connection) holds at once: immediate and unsolicited
	// data-out, solicited data-out, and data-in from the moment a command
	// runs until its last Data-In PDU is sent (default
	// DefaultMaxSessionBuffer, 64 MiB; at least 4 MiB and twice
	// FirstBurstLength times 9). Half of it is reserved for the unsolicited data the
	// initiator may send without asking: the CmdSN window is at most
	// that half divided by FirstBurstLength (less immediateDataSlots
	// commands), so the initiator cannot send more. The other half holds
	// solicited data and read buffers: a command whose buffers do not fit
	// waits (a write gets no R2T, a read does not start) until others
	// complete, and a command needing more than that half is refused.
	// The reader never waits for memory, so the initiator's flow control
	// is the window and the R2Ts.
	MaxSessionBuffer int64
	// InitialR2T makes the target require an R2T before any data-out
	// beyond immediate data (default false: unsolicited data allowed).
	InitialR2T bool
	// DisableImmediateData refuses immediate data (default: accepted).
	DisableImmediateData bool
	// Unit customises the logical units (vendor, product, block size);
	// Backend and Name are filled in per volume.
	Unit scsi.Config
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger
	// TestingKnobs are hooks for tests; zero in production.
	TestingKnobs TestingKnobs
}

// TestingKnobs are hooks for tests.
type TestingKnobs struct {
	// OnBufferBytes, when set, is called with a connection's data buffer
	// bytes (everything MaxSessionBuffer counts) each time they grow.
	OnBufferBytes func(int64)
}

// bufferLimits are the per-session numbers derived from MaxSessionBuffer.
type bufferLimits struct {
	depth    int   // CmdSN window
	unsol    int64 // bytes of unsolicited data a command may carry (0 when none is allowed)
	reserved int64 // bytes reserved for unsolicited data: (depth + immediateDataSlots) * unsol
	charged  int64 // budget of solicited data and read buffers: MaxSessionBuffer - reserved
	maxData  int   // largest transfer of one command
	// maxXferBlocks is the logical unit's MAXIMUM TRANSFER LENGTH: a
	// command that reads the medium and moves data-out (ORWRITE, VERIFY
	// with BYTCHK) needs twice it in buffers.
	maxXferBlocks uint32
}

// limits derives the buffer limits from the config.
func (c *Config) limits() bufferLimits {
	l := bufferLimits{depth: c.QueueDepth}
	if !c.DisableImmediateData || !c.InitialR2T {
		l.unsol = int64(c.FirstBurstLength)
		l.depth = int(min(int64(l.depth), c.MaxSessionBuffer/2/l.unsol-immediateDataSlots))
	}
	l.reserved = int64(l.depth+immediateDataSlots) * l.unsol
	l.charged = c.MaxSessionBuffer - l.reserved
	l.maxData = int(min(maxCommandData, l.charged))
	bs := int64(c.Unit.BlockSize)
	if bs == 0 {
		bs = 512
	}
	l.maxXferBlocks = c.Unit.MaxTransferBlocks
	if l.maxXferBlocks == 0 {
		l.maxXferBlocks = uint32(min(scsi.MaxTransferBytes, l.charged/2) / bs)
	}
	return l
}

// maxCommandData caps the expected data transfer length of one command:
// anything larger is refused before data moves. The buffer budget may lower
// it (see Server.limits).
const maxCommandData = 64 << 20

// DefaultMaxSessionBuffer is the default of Config.MaxSessionBuffer.
const DefaultMaxSessionBuffer = 64 << 20

// minSessionBuffer is the smallest MaxSessionBuffer: its charged half must
// hold the largest buffer one command allocates besides its transfer (the
// 1 MiB scan of GET LBA STATUS, the 1 MiB pattern of WRITE SAME).
const minSessionBuffer = 4 << 20

// immediateDataSlots is how many immediate SCSI commands (I bit, outside
// the CmdSN window) carrying data-out a session may have at once; more are
// rejected ("too many immediate commands").
const immediateDataSlots = 8

func (c *Config) setDefaults() error {
	if c.Exports == nil {
		return fmt.Errorf("%w: Exports is required", ErrInvalidConfig)
	}
	if c.Addr == "" {
		c.Addr = DefaultAddr
	}
	if c.IQNPrefix == "" {
		c.IQNPrefix = DefaultIQNPrefix
	}
	if strings.ContainsAny(c.IQNPrefix, ": ") {
		return fmt.Errorf("%w: IQN prefix %q", ErrInvalidConfig, c.IQNPrefix)
	}
	if c.NopInterval == 0 {
		c.NopInterval = 10 * time.Second
	}
	if c.NopTimeout <= 0 {
		c.NopTimeout = 30 * time.Second
	}
	if c.LoginTimeout <= 0 {
		c.LoginTimeout = 15 * time.Second
	}
	if c.CloseTimeout <= 0 {
		c.CloseTimeout = 2 * time.Second
	}
	if c.QueueDepth <= 0 {
		c.QueueDepth = 128
	}
	if c.MaxRecvDataSegmentLength == 0 {
		c.MaxRecvDataSegmentLength = 262144
	}
	if c.MaxBurstLength == 0 {
		c.MaxBurstLength = 1 << 20
	}
	if c.FirstBurstLength == 0 {
		c.FirstBurstLength = 256 << 10
	}
	if c.MaxSessionBuffer <= 0 {
		c.MaxSessionBuffer = DefaultMaxSessionBuffer
	}
	if c.MaxOutstandingR2T == 0 {
		c.MaxOutstandingR2T = 8
	}
	for _, v := range []struct {
		name string
		v    int
	}{{"MaxRecvDataSegmentLength", c.MaxRecvDataSegmentLength}, {"MaxBurstLength", c.MaxBurstLength}, {"FirstBurstLength", c.FirstBurstLength}} {
		if v.v < 512 || v.v > 1<<24-1 {
			return fmt.Errorf("%w: %s %d outside 512..16777215", ErrInvalidConfig, v.name, v.v)
		}
	}
	if c.FirstBurstLength > c.MaxBurstLength {
		return fmt.Errorf("%w: FirstBurstLength above MaxBurstLength", ErrInvalidConfig)
	}
	if least := max(2*int64(c.FirstBurstLength)*(immediateDataSlots+1), minSessionBuffer); c.MaxSessionBuffer < least {
		return fmt.Errorf("%w: MaxSessionBuffer %d below %d (%d bytes, and twice FirstBurstLength for %d commands)", ErrInvalidConfig,
			c.MaxSessionBuffer, least, minSessionBuffer, immediateDataSlots+1)
	}
	if c.MaxOutstandingR2T < 1 || c.MaxOutstandingR2T > 65535 {
		return fmt.Errorf("%w: MaxOutstandingR2T %d", ErrInvalidConfig, c.MaxOutstandingR2T)
	}
	if c.QueueDepth > 1<<16 {
		return fmt.Errorf("%w: QueueDepth %d", ErrInvalidConfig, c.QueueDepth)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if l := c.limits(); c.Unit.MaxTransferBlocks != 0 && 2*int64(l.maxXferBlocks)*int64(max(c.Unit.BlockSize, 512)) > l.charged {
		return fmt.Errorf("%w: Unit.MaxTransferBlocks %d needs twice its bytes in buffers, more than MaxSessionBuffer leaves (%d bytes)",
			ErrInvalidConfig, c.Unit.MaxTransferBlocks, l.charged)
	}
	return nil
}

// chapFor returns the CHAP secrets a target requires.
func (c *Config) chapFor(volume string) (CHAP, bool) {
	if s, ok := c.CHAP[volume]; ok {
		return s, true
	}
	if c.CHAPFor != nil {
		return c.CHAPFor(volume)
	}
	return CHAP{}, false
}
