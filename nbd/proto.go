package nbd

import "fmt"

// Wire constants of the NBD protocol (doc/proto.md of the NBD project).
// Every number on the wire is big-endian.

// Magic numbers.
const (
	magicNBD             uint64 = 0x4e42444d41474943 // "NBDMAGIC", opens the handshake
	magicOpts            uint64 = 0x49484156454f5054 // "IHAVEOPT", newstyle handshake and every option
	magicOptReply        uint64 = 0x0003e889045565a9 // every option reply
	magicRequest         uint32 = 0x25609513         // every transmission request
	magicSimpleReply     uint32 = 0x67446698         // simple reply
	magicStructuredReply uint32 = 0x668e33ef         // structured reply chunk
)

// Handshake flags (server, 16 bits) and client flags (32 bits).
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	clientFlagFixedNewstyle uint32 = 1 << 0
	clientFlagNoZeroes      uint32 = 1 << 1
	clientFlagsKnown               = clientFlagFixedNewstyle | clientFlagNoZeroes
)

// Transmission flags (16 bits), sent with the export size.
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagReadOnly        uint16 = 1 << 1
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagRotational      uint16 = 1 << 4
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagSendDF          uint16 = 1 << 7
	tflagCanMultiConn    uint16 = 1 << 8
	tflagSendCache       uint16 = 1 << 10
	tflagSendFastZero    uint16 = 1 << 11
)

// Options a client sends during the handshake.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
)

// Option reply types. Errors have bit 31 set.
const (
	repAck             uint32 = 1
	repServer          uint32 = 2
	repInfo            uint32 = 3
	repErrUnsup        uint32 = 1<<31 + 1
	repErrPolicy       uint32 = 1<<31 + 2
	repErrInvalid      uint32 = 1<<31 + 3
	repErrPlatform     uint32 = 1<<31 + 4
	repErrTLSReqd      uint32 = 1<<31 + 5
	repErrUnknown      uint32 = 1<<31 + 6
	repErrShutdown     uint32 = 1<<31 + 7
	repErrBlockSizeReq uint32 = 1<<31 + 8
	repErrTooBig       uint32 = 1<<31 + 9
)

// Information types of NBD_REP_INFO replies to NBD_OPT_INFO and NBD_OPT_GO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Commands of the transmission phase.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4
)

// Structured reply chunk flags and types.
const (
	replyFlagDone uint16 = 1 << 0

	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeOffsetHole  uint16 = 2
	replyTypeError       uint16 = 1<<15 + 1
	replyTypeErrorOffset uint16 = 1<<15 + 2
)

// Error values of replies. They are the protocol's own numbers, not the host's errno.
const (
	errnoPerm     uint32 = 1
	errnoIO       uint32 = 5
	errnoNoMem    uint32 = 12
	errnoInval    uint32 = 22
	errnoNoSpc    uint32 = 28
	errnoOverflow uint32 = 75
	errnoNotSup   uint32 = 95
	errnoShutdown uint32 = 108
)

// Header sizes.
const (
	requestHdrSize = 28 // magic 4, flags 2, type 2, cookie 8, offset 8, length 4
	optionHdrSize  = 16 // magic 8, option 4, length 4
)

// Fixed size constraints. Cairn's IO granularity is 512 bytes, its efficient unit 4 KiB.
const (
	// MinBlockSize is the minimum block size advertised with NBD_INFO_BLOCK_SIZE: every offset and
	// length must be a multiple of it.
	MinBlockSize = 512
	// PreferredBlockSize is the preferred block size advertised with NBD_INFO_BLOCK_SIZE.
	PreferredBlockSize = 4096
	// DefaultMaxPayload is the default largest READ or WRITE payload a client may request.
	DefaultMaxPayload = 32 << 20
	// maxStringLen is the protocol's hard limit for export names and messages.
	maxStringLen = 4096
)

func commandName(t uint16) string {
	switch t {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disconnect"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write_zeroes"
	case cmdBlockStatus:
		return "block_status"
	}
	return fmt.Sprintf("command(%d)", t)
}

func optionName(o uint32) string {
	switch o {
	case optExportName:
		return "NBD_OPT_EXPORT_NAME"
	case optAbort:
		return "NBD_OPT_ABORT"
	case optList:
		return "NBD_OPT_LIST"
	case optStartTLS:
		return "NBD_OPT_STARTTLS"
	case optInfo:
		return "NBD_OPT_INFO"
	case optGo:
		return "NBD_OPT_GO"
	case optStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case optListMetaContext:
		return "NBD_OPT_LIST_META_CONTEXT"
	case optSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	}
	return fmt.Sprintf("option(%d)", o)
}

func errnoName(e uint32) string {
	switch e {
	case 0:
		return "ok"
	case errnoPerm:
		return "EPERM"
	case errnoIO:
		return "EIO"
	case errnoNoMem:
		return "ENOMEM"
	case errnoInval:
		return "EINVAL"
	case errnoNoSpc:
		return "ENOSPC"
	case errnoOverflow:
		return "EOVERFLOW"
	case errnoNotSup:
		return "ENOTSUP"
	case errnoShutdown:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("errno(%d)", e)
}
