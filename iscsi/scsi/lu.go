package scsi

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"cairn.io/cairn/blockdev"
)

// Backend is the block store behind a logical unit: a blockdev.Device.
// Offsets and lengths are multiples of the logical block size. Calls may
// take milliseconds and are made concurrently, with the context of the
// command (Execute's), which the transport cancels when the command's
// connection dies. The unit never closes its Backend.
type Backend = blockdev.Device

// Config describes a logical unit.
type Config struct {
	// Backend stores the blocks. Required.
	Backend Backend
	// Name identifies the unit (the volume name); serial number and
	// designators are derived from it. Required.
	Name string
	// VendorID, ProductID and Revision fill the standard INQUIRY data
	// (8, 16 and 4 characters, space padded). Defaults: "CAIRN",
	// "VOLUME", "0001".
	VendorID, ProductID, Revision string
	// BlockSize is the logical block size in bytes; default 512.
	BlockSize int
	// PhysicalBlockExponent is log2(physical block / logical block);
	// default 3 (4 KiB physical blocks with 512-byte logical blocks).
	PhysicalBlockExponent uint8
	// MaxTransferBlocks caps the blocks of one READ or WRITE; default and
	// upper bound MaxTransferBytes worth of blocks (65536 with 512-byte
	// blocks).
	MaxTransferBlocks uint32
	// ReadOnly rejects every command that changes the medium.
	ReadOnly bool
	// Logger receives backend failures; default slog.Default().
	Logger *slog.Logger
}

// Nexus identifies an I_T nexus: one initiator port logged in to the
// target. Unit attentions and reservations are kept per nexus.
type Nexus struct {
	// ID is unique per initiator port ("<initiator name>,i,0x<ISID>").
	ID string
	// InitiatorName is the iSCSI initiator name, used in TransportIDs.
	InitiatorName string
	// ISID is the initiator session id in hex, used in TransportIDs.
	ISID string
	// RelativePort is the relative target port identifier the nexus came
	// through.
	RelativePort uint16
}

// Command is one SCSI command addressed to the unit.
type Command struct {
	// LUN is the logical unit number the initiator addressed. Only LUN 0
	// exists; INQUIRY and REPORT LUNS still answer for others.
	LUN uint64
	// Nexus is the initiator port the command arrived through.
	Nexus *Nexus
	// CDB is the command descriptor block (6 to 16 bytes).
	CDB []byte
	// Data is the data-out buffer the initiator sent (its expected data
	// transfer length; it may differ from what the CDB describes).
	Data []byte
}

// Response is the outcome of a command.
type Response struct {
	// Status is the SCSI status.
	Status byte
	// Sense is the sense data for CHECK CONDITION.
	Sense []byte
	// Data is the data-in buffer: everything the command produced; the
	// transport truncates it to the initiator's expected length.
	Data []byte
	// DataOutLen is the number of data-out bytes the CDB describes, so the
	// transport can compute residuals against its expected length.
	DataOutLen int
}

// Errors returned by New.
var (
	// ErrInvalidConfig is returned for a Config that cannot describe a unit.
	ErrInvalidConfig = errors.New("scsi: invalid logical unit config")
)

// LogicalUnit executes SCSI commands against one Backend. It is safe for
// concurrent use; see the package documentation for what is serialised.
type LogicalUnit struct {
	be        Backend
	mapper    blockdev.Mapper // the backend's map of holes, nil if it has none
	log       *slog.Logger
	name      string
	vendor    string
	product   string
	revision  string
	serial    string
	naa       uint64
	bs        int64
	bsShift   uint
	physExp   uint8
	maxXfer   uint32
	maxWS     uint32 // MAXIMUM WRITE SAME LENGTH in blocks
	readOnly  bool
	capBlocks atomic.Uint64 // capacity last reported, in blocks
	locks     rangeLock

	mu       sync.Mutex
	nexuses  map[string]*nexusState
	reserve6 string // nexus holding a RESERVE(6) reservation
	pr       persistentReservations
	modes    modeParams
}

type nexusState struct {
	nexus *Nexus
	ua    []Sense
}

// Limits reported in the block limits VPD page (B0h) and enforced on every
// command, so that no command asks the backend for an unbounded amount of
// work: READ, WRITE, VERIFY and ORWRITE move at most MaxTransferBlocks,
// COMPARE AND WRITE at most maxCompareAndWriteBlocks, WRITE SAME at most
// MaxWriteSameBytes (WSNZ is set: a WRITE SAME of zero blocks, which SBC-3
// otherwise reads as "to the end of the medium", is refused), one UNMAP at
// most maxUnmapBlocks over all its descriptors, GET LBA STATUS returns at
// most maxLBAStatusDescriptors (and reads at most zeroScanBytes of a
// backend without a map).
const (
	maxCompareAndWriteBlocks = 255
	maxUnmapDescriptors      = 256
	maxUnmapBlocks           = 1 << 20 // per UNMAP command: 512 MiB of 512-byte blocks
	optimalTransferBlocks    = 2048    // 1 MiB
	zeroScanBytes            = 1 << 20
	maxLBAStatusDescriptors  = 256

	// MaxTransferBytes bounds the data of one READ, WRITE, VERIFY or
	// ORWRITE (MAXIMUM TRANSFER LENGTH is this many bytes' worth of
	// blocks): 32 MiB.
	MaxTransferBytes = 32 << 20

	// MaxWriteSameBytes bounds one WRITE SAME (with or without UNMAP):
	// the MAXIMUM WRITE SAME LENGTH reported is this many bytes' worth
	// of logical blocks (65536 blocks of 512 bytes), or the MAXIMUM
	// TRANSFER LENGTH when that is smaller. An initiator that
	// wants to zero or deallocate more sends several commands, as Linux
	// does from the limit it reads.
	MaxWriteSameBytes = 32 << 20
)

// New returns a logical unit for cfg.
func New(cfg Config) (*LogicalUnit, error) {
	if cfg.Backend == nil || cfg.Name == "" {
		return nil, fmt.Errorf("%w: backend and name are required", ErrInvalidConfig)
	}
	bs := cfg.BlockSize
	if bs == 0 {
		bs = 512
	}
	if bs < 512 || bs > 65536 || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("%w: block size %d", ErrInvalidConfig, bs)
	}
	physExp := cfg.PhysicalBlockExponent
	if physExp == 0 && cfg.BlockSize == 0 {
		physExp = 3
	}
	if physExp > 15 {
		return nil, fmt.Errorf("%w: physical block exponent %d", ErrInvalidConfig, physExp)
	}
	shift := uint(0)
	for 1<<shift != bs {
		shift++
	}
	maxXfer := cfg.MaxTransferBlocks
	if maxXfer == 0 {
		maxXfer = uint32(MaxTransferBytes >> shift)
	}
	if uint64(maxXfer)<<shift > MaxTransferBytes {
		return nil, fmt.Errorf("%w: %d blocks of %d bytes exceed the %d-byte transfer limit", ErrInvalidConfig, maxXfer, bs, MaxTransferBytes)
	}
	lu := &LogicalUnit{
		be:       cfg.Backend,
		log:      cfg.Logger,
		name:     cfg.Name,
		vendor:   padASCII(orDefault(cfg.VendorID, "CAIRN"), 8),
		product:  padASCII(orDefault(cfg.ProductID, "VOLUME"), 16),
		revision: padASCII(orDefault(cfg.Revision, "0001"), 4),
		bs:       int64(bs),
		physExp:  physExp,
		maxXfer:  maxXfer,
		readOnly: cfg.ReadOnly,
		nexuses:  make(map[string]*nexusState),
	}
	lu.bsShift = shift
	lu.mapper, _ = cfg.Backend.(blockdev.Mapper)
	// Initiators (libiscsi's conformance suite among them) expect to be
	// able to write back what one WRITE SAME may cover.
	lu.maxWS = min(uint32(MaxWriteSameBytes>>lu.bsShift), maxXfer)
	if lu.log == nil {
		lu.log = slog.Default()
	}
	sum := sha256.Sum256([]byte(cfg.Name))
	lu.serial = fmt.Sprintf("%x", sum[:10])
	// NAA 3: locally assigned 60-bit identifier.
	lu.naa = 3<<60 | binary.BigEndian.Uint64(sum[10:18])&(1<<60-1)
	lu.capBlocks.Store(uint64(lu.be.Size()) >> lu.bsShift)
	lu.modes = defaultModeParams()
	return lu, nil
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func padASCII(s string, n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = ' '
	}
	for i := 0; i < len(s) && i < n; i++ {
		c := s[i]
		if c < 0x20 || c > 0x7e {
			c = '_'
		}
		b[i] = c
	}
	return string(b)
}

// BlockSize returns the logical block size in bytes.
func (lu *LogicalUnit) BlockSize() int { return int(lu.bs) }

// Blocks returns the capacity in logical blocks as last checked.
func (lu *LogicalUnit) Blocks() uint64 { return lu.capBlocks.Load() }

// AddNexus registers an initiator port; its first command reports the
// POWER ON, RESET OR BUS DEVICE RESET OCCURRED unit attention, as after a
// fresh login to any SCSI device.
func (lu *LogicalUnit) AddNexus(n *Nexus) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	lu.nexuses[n.ID] = &nexusState{nexus: n, ua: []Sense{sensePowerOn}}
}

// RemoveNexus forgets an initiator port (its session ended). A RESERVE(6)
// reservation it held is released; persistent reservations stay, as SPC-4
// requires.
func (lu *LogicalUnit) RemoveNexus(n *Nexus) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	delete(lu.nexuses, n.ID)
	if lu.reserve6 == n.ID {
		lu.reserve6 = ""
	}
}

// Reset performs a logical unit reset (LUN RESET, TARGET WARM RESET): it
// releases the RESERVE(6) reservation and raises BUS DEVICE RESET FUNCTION
// OCCURRED on every nexus. Aborting the tasks is the transport's job.
func (lu *LogicalUnit) Reset() {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	lu.reserve6 = ""
	for _, ns := range lu.nexuses {
		ns.ua = []Sense{senseBusDeviceReset}
	}
}

// NotifyResize re-reads the backend size and, if it changed, raises
// CAPACITY DATA HAS CHANGED on every nexus. Execute also notices a change
// on its own; this call makes it immediate.
func (lu *LogicalUnit) NotifyResize() {
	blocks := uint64(lu.be.Size()) >> lu.bsShift
	old := lu.capBlocks.Swap(blocks)
	if old == blocks {
		return
	}
	lu.uaAllLocked(senseCapacityChanged, "", true)
}

// uaAllLocked queues a unit attention on every nexus but except. lock says
// whether the caller needs lu.mu taken.
func (lu *LogicalUnit) uaAllLocked(s Sense, except string, lock bool) {
	if lock {
		lu.mu.Lock()
		defer lu.mu.Unlock()
	}
	for id, ns := range lu.nexuses {
		if id == except {
			continue
		}
		ns.addUA(s)
	}
}

func (ns *nexusState) addUA(s Sense) {
	for _, o := range ns.ua {
		if o.ASC == s.ASC && o.ASCQ == s.ASCQ {
			return
		}
	}
	if len(ns.ua) >= 8 {
		return
	}
	ns.ua = append(ns.ua, s)
}

// takeUA pops the oldest unit attention pending for the nexus.
func (lu *LogicalUnit) takeUA(id string) (Sense, bool) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	ns := lu.nexuses[id]
	if ns == nil || len(ns.ua) == 0 {
		return Sense{}, false
	}
	s := ns.ua[0]
	ns.ua = ns.ua[1:]
	return s, true
}

// checkCapacity raises the capacity unit attention when the backend grew
// or shrank since the last check.
func (lu *LogicalUnit) checkCapacity() uint64 {
	blocks := uint64(lu.be.Size()) >> lu.bsShift
	if lu.capBlocks.Load() != blocks {
		if old := lu.capBlocks.Swap(blocks); old != blocks {
			lu.uaAllLocked(senseCapacityChanged, "", true)
		}
	}
	return blocks
}

// opcode classes for unit attention and reservation checks.
const (
	opTestUnitReady     = 0x00
	opRequestSense      = 0x03
	opRead6             = 0x08
	opWrite6            = 0x0a
	opInquiry           = 0x12
	opModeSelect6       = 0x15
	opReserve6          = 0x16
	opRelease6          = 0x17
	opModeSense6        = 0x1a
	opStartStopUnit     = 0x1b
	opPreventAllow      = 0x1e
	opReadCapacity10    = 0x25
	opRead10            = 0x28
	opWrite10           = 0x2a
	opWriteVerify10     = 0x2e
	opVerify10          = 0x2f
	opPrefetch10        = 0x34
	opSyncCache10       = 0x35
	opWriteSame10       = 0x41
	opUnmap             = 0x42
	opModeSelect10      = 0x55
	opReserve10         = 0x56
	opRelease10         = 0x57
	opModeSense10       = 0x5a
	opPersistReserveIn  = 0x5e
	opPersistReserveOut = 0x5f
	opRead16            = 0x88
	opCompareAndWrite   = 0x89
	opWrite16           = 0x8a
	opOrWrite16         = 0x8b
	opWriteVerify16     = 0x8e
	opVerify16          = 0x8f
	opPrefetch16        = 0x90
	opSyncCache16       = 0x91
	opWriteSame16       = 0x93
	opServiceActionIn16 = 0x9e
	opReportLUNs        = 0xa0
	opMaintenanceIn     = 0xa3
	opRead12            = 0xa8
	opWrite12           = 0xaa
	opWriteVerify12     = 0xae
	opVerify12          = 0xaf

	saReadCapacity16  = 0x10
	saGetLBAStatus    = 0x12
	saReportOpcodes   = 0x0c
	cdbControlNACABit = 0x04
)

// cdbLen returns the CDB length implied by the opcode's group code.
func cdbLen(op byte) int {
	switch op >> 5 {
	case 0:
		return 6
	case 1, 2:
		return 10
	case 4:
		return 16
	case 5:
		return 12
	}
	return 0
}

// Execute runs one command and returns its outcome. It never panics on a
// malformed CDB; the result is a CHECK CONDITION with ILLEGAL REQUEST.
// Backend calls are made with ctx; when it ends they fail (the command then
// reports a medium error nobody will read) and Execute returns once they
// have returned.
func (lu *LogicalUnit) Execute(ctx context.Context, cmd *Command) Response {
	if len(cmd.CDB) == 0 {
		return lu.checkCondition(senseInvalidOpcode)
	}
	op := cmd.CDB[0]
	n := cdbLen(op)
	if n == 0 {
		return lu.checkCondition(senseInvalidOpcode)
	}
	if len(cmd.CDB) < n {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	cdb := cmd.CDB[:n]
	var resp Response
	resp.DataOutLen = lu.dataOutLen(cdb)
	r := lu.execute(ctx, cmd, cdb)
	r.DataOutLen = resp.DataOutLen
	return r
}

func (lu *LogicalUnit) execute(ctx context.Context, cmd *Command, cdb []byte) Response {
	op := cdb[0]
	id := ""
	if cmd.Nexus != nil {
		id = cmd.Nexus.ID
	}
	if cmd.LUN != 0 {
		switch op {
		case opInquiry:
			return lu.inquiryNoLUN(cdb)
		case opReportLUNs:
			return lu.reportLUNs(cdb)
		case opRequestSense:
			return lu.requestSenseData(cdb, senseLUNotSupported)
		}
		return lu.checkCondition(senseLUNotSupported)
	}
	if cdb[len(cdb)-1]&cdbControlNACABit != 0 {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	blocks := lu.checkCapacity()
	switch op {
	case opInquiry, opReportLUNs, opRequestSense:
	default:
		if s, ok := lu.takeUA(id); ok {
			return lu.checkCondition(s)
		}
	}
	if conflict := lu.reservationConflict(id, cdb); conflict {
		return Response{Status: StatusReservationConflict}
	}
	switch op {
	case opTestUnitReady:
		return good(nil)
	case opRequestSense:
		return lu.requestSense(cdb, id)
	case opInquiry:
		return lu.inquiry(cdb)
	case opReportLUNs:
		return lu.reportLUNs(cdb)
	case opReadCapacity10:
		return lu.readCapacity10(cdb, blocks)
	case opServiceActionIn16:
		switch cdb[1] & 0x1f {
		case saReadCapacity16:
			return lu.readCapacity16(cdb, blocks)
		case saGetLBAStatus:
			return lu.getLBAStatus(ctx, cdb, blocks)
		}
		return lu.checkCondition(senseInvalidFieldInCDB)
	case opMaintenanceIn:
		if cdb[1]&0x1f == saReportOpcodes {
			return lu.reportSupportedOpcodes(cdb)
		}
		return lu.checkCondition(senseInvalidFieldInCDB)
	case opModeSense6, opModeSense10:
		return lu.modeSense(cdb, blocks)
	case opModeSelect6, opModeSelect10:
		return lu.modeSelect(cdb, cmd.Data, id)
	case opStartStopUnit:
		return lu.startStopUnit(ctx, cdb)
	case opPreventAllow:
		if cdb[4]&0x03 > 1 {
			return lu.checkCondition(senseInvalidFieldInCDB)
		}
		return good(nil)
	case opRead6, opRead10, opRead12, opRead16:
		return lu.read(ctx, cdb, blocks)
	case opWrite6, opWrite10, opWrite12, opWrite16, opWriteVerify10, opWriteVerify12, opWriteVerify16:
		return lu.write(ctx, cdb, cmd.Data, blocks)
	case opVerify10, opVerify12, opVerify16:
		return lu.verify(ctx, cdb, cmd.Data, blocks)
	case opCompareAndWrite:
		return lu.compareAndWrite(ctx, cdb, cmd.Data, blocks)
	case opOrWrite16:
		return lu.orWrite(ctx, cdb, cmd.Data, blocks)
	case opWriteSame10, opWriteSame16:
		return lu.writeSame(ctx, cdb, cmd.Data, blocks)
	case opUnmap:
		return lu.unmap(ctx, cdb, cmd.Data, blocks)
	case opSyncCache10, opSyncCache16:
		return lu.syncCache(ctx, cdb)
	case opPrefetch10, opPrefetch16:
		return lu.prefetch(cdb, blocks)
	case opReserve6, opReserve10:
		return lu.reserve(cdb, id)
	case opRelease6, opRelease10:
		return lu.release(cdb, id)
	case opPersistReserveIn:
		return lu.persistentReserveIn(cdb)
	case opPersistReserveOut:
		return lu.persistentReserveOut(cdb, cmd.Data, cmd.Nexus)
	}
	return lu.checkCondition(senseInvalidOpcode)
}

func good(data []byte) Response { return Response{Status: StatusGood, Data: data} }

func (lu *LogicalUnit) checkCondition(s Sense) Response {
	lu.mu.Lock()
	d := lu.modes.dsense
	lu.mu.Unlock()
	return Response{Status: StatusCheckCondition, Sense: s.Encode(d)}
}

// allocate truncates data to the CDB's allocation length.
func allocate(data []byte, alloc int) Response {
	if len(data) > alloc {
		data = data[:alloc]
	}
	return good(data)
}

func (lu *LogicalUnit) requestSense(cdb []byte, id string) Response {
	if s, ok := lu.takeUA(id); ok {
		return lu.requestSenseData(cdb, s)
	}
	return lu.requestSenseData(cdb, Sense{Key: KeyNoSense})
}

func (lu *LogicalUnit) requestSenseData(cdb []byte, s Sense) Response {
	return allocate(s.Encode(cdb[1]&0x01 != 0), int(cdb[4]))
}

func (lu *LogicalUnit) startStopUnit(ctx context.Context, cdb []byte) Response {
	start := cdb[4]&0x01 != 0
	noFlush := cdb[4]&0x04 != 0
	pc := cdb[4] >> 4
	if pc == 0 && !start && !noFlush {
		if err := lu.be.Flush(ctx); err != nil {
			lu.log.Error("scsi: flush on stop failed", "unit", lu.name, "err", err)
			return lu.checkCondition(senseWriteError)
		}
	}
	return good(nil)
}
