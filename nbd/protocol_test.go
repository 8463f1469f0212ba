package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/internal/soon"
)

const testSize = 1 << 20

func TestHandshakeRefusesClientsWithoutFixedNewstyle(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, nil)
	for _, flags := range []uint32{0, clientFlagNoZeroes, 1 << 2, clientFlagFixedNewstyle | 1<<31} {
		t.Run(fmt.Sprintf("flags=%#x", flags), func(t *testing.T) {
			c := dial(t, env.addr, flags)
			c.expectClosed()
		})
	}
	// The server is still serving.
	c := connect(t, env.addr, "vol", false)
	if c.size != testSize {
		t.Fatalf("size %d", c.size)
	}
	if got := env.srv.Stats().ProtocolErrorsTotal; got != 4 {
		t.Fatalf("protocol errors %d, want 4", got)
	}
}

func TestOptionList(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("b-vol", testSize, nil)
	env.createExport("a-vol", testSize, nil)
	c := dial(t, env.addr, clientFlagFixedNewstyle)

	// Data on NBD_OPT_LIST is refused, and negotiation goes on.
	c.sendOption(optList, []byte("x"))
	if r := c.optionReply(); r.typ != repErrInvalid || r.option != optList {
		t.Fatalf("NBD_OPT_LIST with data: reply %#x", r.typ)
	}
	listNames := func() []string {
		c.sendOption(optList, nil)
		var names []string
		for _, r := range c.optionReplies(optList) {
			switch r.typ {
			case repServer:
				n := binary.BigEndian.Uint32(r.data)
				if int(n) != len(r.data)-4 {
					t.Fatalf("NBD_REP_SERVER name length %d in %d bytes", n, len(r.data))
				}
				names = append(names, string(r.data[4:]))
			case repAck:
			default:
				t.Fatalf("NBD_OPT_LIST reply %#x", r.typ)
			}
		}
		return names
	}
	if got := listNames(); !slices.Equal(got, []string{"a-vol", "b-vol"}) {
		t.Fatalf("list %q", got)
	}
	// Exports appear and disappear with the provider's set.
	env.createExport("c-vol", testSize, nil)
	env.exports.Remove("a-vol")
	if got := listNames(); !slices.Equal(got, []string{"b-vol", "c-vol"}) {
		t.Fatalf("list after create and delete %q", got)
	}
	replies := c.goExport(optInfo, "a-vol")
	if r := replies[len(replies)-1]; r.typ != repErrUnknown {
		t.Fatalf("NBD_OPT_INFO on a deleted export: reply %#x", r.typ)
	}
}

func TestOptionsUnsupportedAndAbort(t *testing.T) {
	env := newTestEnv(t)
	c := dial(t, env.addr, clientFlagFixedNewstyle)
	for _, opt := range []uint32{optStartTLS, 4, 11, 12345} {
		c.sendOption(opt, []byte("some data"))
		if r := c.optionReply(); r.typ != repErrUnsup || r.option != opt {
			t.Fatalf("option %d: reply %#x for option %d, want NBD_REP_ERR_UNSUP", opt, r.typ, r.option)
		}
	}
	c.sendOption(optStructuredReply, []byte{1})
	if r := c.optionReply(); r.typ != repErrInvalid {
		t.Fatalf("NBD_OPT_STRUCTURED_REPLY with data: reply %#x", r.typ)
	}
	c.sendOption(optAbort, nil)
	if r := c.optionReply(); r.typ != repAck || r.option != optAbort {
		t.Fatalf("NBD_OPT_ABORT: reply %#x", r.typ)
	}
	c.expectClosed()
	if got := env.srv.Stats().HandshakesFailedTotal; got != 0 {
		t.Fatalf("an abort counted as a failed handshake (%d)", got)
	}
}

func TestOptionInfoAndGo(t *testing.T) {
	for _, multiConn := range []bool{false, true} {
		t.Run(fmt.Sprintf("multiconn=%v", multiConn), func(t *testing.T) {
			env := newTestEnv(t, func(c *Config) { c.MultiConn = multiConn })
			env.createExport("vol", testSize+100, nil) // the unaligned tail is not exported
			c := dial(t, env.addr, clientFlagFixedNewstyle|clientFlagNoZeroes)
			for _, opt := range []uint32{optInfo, optGo} {
				replies := c.goExport(opt, "vol", infoName, infoDescription, infoBlockSize, 999)
				infos := map[uint16][]byte{}
				for _, r := range replies[:len(replies)-1] {
					if r.typ != repInfo {
						t.Fatalf("reply %#x before the final one", r.typ)
					}
					infos[binary.BigEndian.Uint16(r.data)] = r.data[2:]
				}
				if last := replies[len(replies)-1]; last.typ != repAck {
					t.Fatalf("final reply %#x", last.typ)
				}
				if c.size != testSize {
					t.Fatalf("export size %d, want %d", c.size, testSize)
				}
				want := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes
				if multiConn {
					want |= tflagCanMultiConn
				}
				if c.tflags != want {
					t.Fatalf("transmission flags %#x, want %#x", c.tflags, want)
				}
				if got := string(infos[infoName]); got != "vol" {
					t.Fatalf("NBD_INFO_NAME %q", got)
				}
				if got := string(infos[infoDescription]); got != "cairn volume vol" {
					t.Fatalf("NBD_INFO_DESCRIPTION %q", got)
				}
				bs := infos[infoBlockSize]
				if len(bs) != 12 {
					t.Fatalf("NBD_INFO_BLOCK_SIZE of %d bytes", len(bs))
				}
				if mn, pr, mx := binary.BigEndian.Uint32(bs), binary.BigEndian.Uint32(bs[4:]), binary.BigEndian.Uint32(bs[8:]); mn != 512 || pr != 4096 || mx != 32<<20 {
					t.Fatalf("block sizes %d/%d/%d", mn, pr, mx)
				}
				if _, ok := infos[999]; ok {
					t.Fatal("server answered an unknown information request")
				}
			}
			// In transmission now.
			c.writeAt(0, 0, pattern(4096, 1))
			if got := c.read(0, 4096); !bytes.Equal(got, pattern(4096, 1)) {
				t.Fatal("read back differs")
			}
		})
	}
}

func TestStructuredRepliesAdvertiseDF(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, nil)
	c := connect(t, env.addr, "vol", true)
	if c.tflags&tflagSendDF == 0 {
		t.Fatalf("flags %#x: NBD_FLAG_SEND_DF missing with structured replies", c.tflags)
	}
	c.writeAt(cmdFlagFUA, 8192, pattern(8192, 2))
	r := c.do(cmdFlagDF, cmdRead, 8192, 8192, nil)
	if r.errno != 0 || !bytes.Equal(r.data, pattern(8192, 2)) {
		t.Fatalf("DF read: %s", errnoName(r.errno))
	}
	if len(r.chunks) != 1 || r.chunks[0].typ != replyTypeOffsetData || r.chunks[0].flags&replyFlagDone == 0 {
		t.Fatalf("DF read answered with %d chunks", len(r.chunks))
	}
}

func TestMalformedInfoRequests(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, nil)
	c := dial(t, env.addr, clientFlagFixedNewstyle)
	valid := encodeInfoRequest("vol", []uint16{infoBlockSize})
	cases := map[string][]byte{
		"short":               {0, 0, 0},
		"name beyond data":    binary.BigEndian.AppendUint32(nil, 100),
		"name length huge":    append(binary.BigEndian.AppendUint32(nil, math.MaxUint32), 0, 0),
		"too few requests":    valid[:len(valid)-1],
		"trailing byte":       append(slices.Clone(valid), 0),
		"NUL in name":         encodeInfoRequest("v\x00l", nil),
		"not UTF-8":           encodeInfoRequest("\xff\xfe", nil),
		"name over 4096 byte": encodeInfoRequest(strings.Repeat("n", 4097), nil),
	}
	for name, data := range cases {
		for _, opt := range []uint32{optInfo, optGo} {
			c.sendOption(opt, data)
			if r := c.optionReply(); r.typ != repErrInvalid {
				t.Fatalf("%s (%s): reply %#x, want NBD_REP_ERR_INVALID", name, optionName(opt), r.typ)
			}
		}
	}
	replies := c.goExport(optGo, "vol")
	if last := replies[len(replies)-1]; last.typ != repAck {
		t.Fatalf("GO after malformed options: %#x", last.typ)
	}
}

// TestUnavailableExport: an export that cannot be opened now (its metadata
// server is unreachable) is answered "not now", never "no such export".
func TestUnavailableExport(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, nil)
	env.exports.OnOpen(func(context.Context, string) error {
		return fmt.Errorf("open volume %q: %w: metadata server 127.0.0.1:1 unreachable", "vol", blockdev.ErrUnavailable)
	})
	c := dial(t, env.addr, clientFlagFixedNewstyle)
	for _, opt := range []uint32{optInfo, optGo} {
		replies := c.goExport(opt, "vol", infoBlockSize)
		if len(replies) != 1 || replies[0].typ != repErrShutdown {
			t.Fatalf("%s: replies %v, want one NBD_REP_ERR_SHUTDOWN", optionName(opt), replies)
		}
		if !strings.Contains(string(replies[0].data), "metadata server 127.0.0.1:1 unreachable") {
			t.Fatalf("error message %q does not say why", replies[0].data)
		}
	}
}

// TestTimedOutExport: an export whose open outlasts the handshake timeout
// (a catalog waiting for a metadata server that hangs) is answered "not
// now" too: a timeout says nothing of whether the export exists.
func TestTimedOutExport(t *testing.T) {
	env := newTestEnv(t, func(cfg *Config) { cfg.HandshakeTimeout = 300 * time.Millisecond })
	env.createExport("vol", testSize, nil)
	env.exports.OnOpen(func(ctx context.Context, _ string) error {
		<-ctx.Done()
		return fmt.Errorf("wait for the metadata server: %w", ctx.Err())
	})
	c := dial(t, env.addr, clientFlagFixedNewstyle)
	replies := c.goExport(optGo, "vol", infoBlockSize)
	if len(replies) != 1 || replies[0].typ != repErrShutdown {
		t.Fatalf("replies %v, want one NBD_REP_ERR_SHUTDOWN", replies)
	}
	if !strings.Contains(string(replies[0].data), "deadline exceeded") {
		t.Fatalf("error message %q does not say why", replies[0].data)
	}
}

func TestUnknownExport(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, nil)

	c := dial(t, env.addr, clientFlagFixedNewstyle)
	for _, opt := range []uint32{optInfo, optGo} {
		for _, name := range []string{"nope", "", "../vol"} {
			replies := c.goExport(opt, name, infoBlockSize)
			if len(replies) != 1 || replies[0].typ != repErrUnknown {
				t.Fatalf("%s %q: replies %v, want one NBD_REP_ERR_UNKNOWN", optionName(opt), name, replies)
			}
			if !strings.Contains(string(replies[0].data), "unknown export") {
				t.Fatalf("error message %q", replies[0].data)
			}
		}
	}
	// NBD_OPT_EXPORT_NAME cannot carry an error: the server must hang up.
	c.sendOption(optExportName, []byte("nope"))
	c.expectClosed()
}

func TestDefaultExport(t *testing.T) {
	env := newTestEnv(t, func(c *Config) { c.DefaultExport = "vol" })
	env.createExport("vol", testSize, nil)
	c := dial(t, env.addr, clientFlagFixedNewstyle)
	replies := c.goExport(optGo, "", infoName)
	var gotName string
	for _, r := range replies {
		if r.typ == repInfo && binary.BigEndian.Uint16(r.data) == infoName {
			gotName = string(r.data[2:])
		}
	}
	if replies[len(replies)-1].typ != repAck || gotName != "vol" || c.size != testSize {
		t.Fatalf("default export: final %#x name %q size %d", replies[len(replies)-1].typ, gotName, c.size)
	}
}

func TestExportNameOption(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, pattern(4096, 3))
	for _, noZeroes := range []bool{false, true} {
		flags := clientFlagFixedNewstyle
		if noZeroes {
			flags |= clientFlagNoZeroes
		}
		c := dial(t, env.addr, flags)
		c.sendOption(optExportName, []byte("vol"))
		want := 10
		if !noZeroes {
			want += 124
		}
		b := make([]byte, want)
		if _, err := io.ReadFull(c.r, b); err != nil {
			t.Fatalf("read export info: %v", err)
		}
		if size := binary.BigEndian.Uint64(b); size != testSize {
			t.Fatalf("size %d", size)
		}
		if !bytes.Equal(b[10:], make([]byte, want-10)) {
			t.Fatal("padding is not zeros")
		}
		if got := c.read(0, 4096); !bytes.Equal(got, pattern(4096, 3)) {
			t.Fatalf("no_zeroes=%v: read after NBD_OPT_EXPORT_NAME differs", noZeroes)
		}
	}
}

func TestBadOptionHeaders(t *testing.T) {
	env := newTestEnv(t)
	c := dial(t, env.addr, clientFlagFixedNewstyle)
	b := binary.BigEndian.AppendUint64(nil, 0x1122334455667788)
	b = binary.BigEndian.AppendUint32(b, optList)
	c.write(binary.BigEndian.AppendUint32(b, 0))
	c.expectClosed()

	c = dial(t, env.addr, clientFlagFixedNewstyle)
	b = binary.BigEndian.AppendUint64(nil, magicOpts)
	b = binary.BigEndian.AppendUint32(b, optGo)
	c.write(binary.BigEndian.AppendUint32(b, maxOptionLength+1))
	c.expectClosed()
}

// TestMalformedRequests sends requests real clients never send and checks the protocol's answer,
// that the connection stays usable and that the export is unchanged.
func TestMalformedRequests(t *testing.T) {
	const maxPayload = 1 << 20
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			env := newTestEnv(t, func(c *Config) { c.MaxPayload = maxPayload })
			path := env.createExport("vol", testSize, pattern(testSize, 7))
			before := fileHash(t, path)
			c := connect(t, env.addr, "vol", structured)

			oversizedRead := errnoInval
			if structured {
				oversizedRead = errnoOverflow
			}
			cases := []struct {
				name    string
				flags   uint16
				typ     uint16
				off     uint64
				length  uint32
				payload bool
				want    uint32
			}{
				{"unaligned read offset", 0, cmdRead, 100, 512, false, errnoInval},
				{"unaligned read length", 0, cmdRead, 0, 100, false, errnoInval},
				{"unaligned write", 0, cmdWrite, 512, 1000, true, errnoInval},
				{"unaligned trim", 0, cmdTrim, 1, 512, false, errnoInval},
				{"unaligned write zeroes", 0, cmdWriteZeroes, 0, 511, false, errnoInval},
				{"read beyond end", 0, cmdRead, testSize - 512, 1024, false, errnoInval},
				{"read past end", 0, cmdRead, testSize + 512, 0, false, errnoInval},
				{"write beyond end", 0, cmdWrite, testSize - 512, 1024, true, errnoNoSpc},
				{"write past end", cmdFlagFUA, cmdWrite, testSize, 512, true, errnoNoSpc},
				{"write zeroes beyond end", 0, cmdWriteZeroes, testSize, 512, false, errnoNoSpc},
				{"trim beyond end", 0, cmdTrim, 0, testSize + 512, false, errnoInval},
				{"offset wraps around", 0, cmdWrite, math.MaxUint64 - 511, 1024, true, errnoNoSpc},
				{"oversized read", 0, cmdRead, 0, maxPayload + 512, false, oversizedRead},
				{"oversized write", 0, cmdWrite, 0, maxPayload + 512, true, errnoInval},
				{"unknown command", 0, 99, 0, 512, false, errnoInval},
				{"cache not offered", 0, cmdCache, 0, 512, false, errnoInval},
				{"block status without context", 0, cmdBlockStatus, 0, 512, false, errnoInval},
				{"unknown flag", 1 << 9, cmdRead, 0, 512, false, errnoInval},
				{"no hole on write", cmdFlagNoHole, cmdWrite, 0, 512, true, errnoInval},
				{"fast zero not offered", cmdFlagFastZero, cmdWriteZeroes, 0, 512, false, errnoInval},
				{"req one on read", cmdFlagReqOne, cmdRead, 0, 512, false, errnoInval},
				{"flush with range", 0, cmdFlush, 0, 512, false, errnoInval},
			}
			if !structured {
				cases = append(cases, struct {
					name    string
					flags   uint16
					typ     uint16
					off     uint64
					length  uint32
					payload bool
					want    uint32
				}{"DF without structured replies", cmdFlagDF, cmdRead, 0, 512, false, errnoInval})
			}
			for _, tc := range cases {
				var payload []byte
				if tc.payload {
					payload = bytes.Repeat([]byte{0xee}, int(tc.length))
				}
				r := c.do(tc.flags, tc.typ, tc.off, tc.length, payload)
				if r.errno != tc.want {
					t.Errorf("%s: %s, want %s", tc.name, errnoName(r.errno), errnoName(tc.want))
				}
				if structured && (r.simple || r.msg == "") {
					t.Errorf("%s: want a structured error chunk with a message", tc.name)
				}
				if r.data != nil && r.covered != 0 {
					t.Errorf("%s: refused read carried data", tc.name)
				}
			}
			// Still in step: a valid read after all that.
			if got := c.read(4096, 4096); !bytes.Equal(got, pattern(testSize, 7)[4096:8192]) {
				t.Fatal("read after refused requests differs")
			}
			c.send(0, cmdDisc, 0, 0, nil)
			c.expectClosed()
			if fileHash(t, path) != before {
				t.Fatal("refused requests changed the export")
			}
			st := env.srv.Stats()
			if st.RequestErrorsTotal != uint64(len(cases)) {
				t.Fatalf("request errors %d, want %d", st.RequestErrorsTotal, len(cases))
			}
		})
	}
}

func TestBadRequestMagicClosesOnlyThatConnection(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, pattern(8192, 4))
	other := connect(t, env.addr, "vol", false)

	c := connect(t, env.addr, "vol", false)
	b := encodeRequest(0, cmdRead, 1, 0, 512)
	binary.BigEndian.PutUint32(b, 0x12560953) // the historic request magic
	c.write(b)
	c.expectClosed()

	// A stream cut in the middle of a write payload.
	c = connect(t, env.addr, "vol", false)
	c.write(append(encodeRequest(0, cmdWrite, 2, 0, 4096), make([]byte, 100)...))
	if err := c.nc.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.expectClosed()

	if got := other.read(0, 8192); !bytes.Equal(got, pattern(8192, 4)) {
		t.Fatal("other connection broken")
	}
	soon.True(t, 20*time.Second, "protocol errors counted", func() bool { return env.srv.Stats().ProtocolErrorsTotal == 2 })
	if !bytes.Equal(readFile(t, filepath.Join(env.dir, "vol"))[:8192], pattern(8192, 4)) {
		t.Fatal("cut write changed the export")
	}
}

func TestReadWriteTrimZeroes(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			env := newTestEnv(t, func(c *Config) {})
			path := env.createExport("vol", testSize, nil)
			dev := env.device("vol")
			c := connect(t, env.addr, "vol", structured)

			data := pattern(256<<10, 9)
			c.writeAt(0, 0, data)
			c.writeAt(cmdFlagFUA, 256<<10, data)
			if dev.Count(blockdevtest.OpFlush) != 1 {
				t.Fatalf("FUA write: %d flushes, want 1", dev.Count(blockdevtest.OpFlush))
			}
			if got := c.read(0, 512<<10); !bytes.Equal(got, append(slices.Clone(data), data...)) {
				t.Fatal("read back differs")
			}
			if r := c.do(0, cmdRead, 0, 0, nil); r.errno != 0 || len(r.data) != 0 {
				t.Fatalf("zero-length read: %s", errnoName(r.errno))
			}

			// TRIM unmaps; the range reads as zeros.
			if r := c.do(0, cmdTrim, 4096, 8192, nil); r.errno != 0 {
				t.Fatalf("trim: %s", errnoName(r.errno))
			}
			// WRITE_ZEROES without NO_HOLE may unmap; with NO_HOLE it must write.
			unmapsBefore, writesBefore := dev.Count(blockdevtest.OpUnmap), dev.Count(blockdevtest.OpWrite)
			if r := c.do(0, cmdWriteZeroes, 65536, 65536, nil); r.errno != 0 {
				t.Fatalf("write zeroes: %s", errnoName(r.errno))
			}
			if dev.Count(blockdevtest.OpUnmap) != unmapsBefore+1 || dev.Count(blockdevtest.OpWrite) != writesBefore {
				t.Fatal("WRITE_ZEROES without NO_HOLE did not unmap")
			}
			if r := c.do(cmdFlagNoHole|cmdFlagFUA, cmdWriteZeroes, 3<<20/4, 3<<20/16, nil); r.errno != 0 {
				t.Fatalf("write zeroes no hole: %s", errnoName(r.errno))
			}
			if dev.Count(blockdevtest.OpUnmap) != unmapsBefore+1 || dev.Count(blockdevtest.OpWrite) == writesBefore {
				t.Fatal("WRITE_ZEROES with NO_HOLE unmapped instead of writing")
			}
			if r := c.do(0, cmdFlush, 0, 0, nil); r.errno != 0 {
				t.Fatalf("flush: %s", errnoName(r.errno))
			}

			want := append(slices.Clone(data), data...)
			clear(want[4096 : 4096+8192])
			clear(want[65536 : 65536+65536])
			want = append(want, make([]byte, testSize-len(want))...)
			if got := c.read(0, testSize); !bytes.Equal(got, want) {
				t.Fatal("export differs after trim and write zeroes")
			}
			c.send(0, cmdDisc, 0, 0, nil)
			c.expectClosed()
			if !bytes.Equal(readFile(t, path), want) {
				t.Fatal("backing file differs")
			}
			st := env.srv.Stats()
			if st.WritesTotal != 2 || st.WrittenBytesTotal != 512<<10 || st.TrimsTotal != 1 || st.WriteZeroesTotal != 2 || st.FlushesTotal != 1 || st.ReadsTotal != 3 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

// TestBackendErrors checks that backend failures reach the client as the protocol's errors, with
// structured replies reporting how much of a read succeeded, and that the connection goes on.
func TestBackendErrors(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			env := newTestEnv(t)
			env.createExport("vol", testSize, pattern(testSize, 5))
			env.device("vol").SetHook(faults)
			c := connect(t, env.addr, "vol", structured)

			// The faulty export fails reads that reach 64 KiB after reading up to 4096+100 bytes.
			r := c.do(0, cmdRead, 60<<10, 8192, nil)
			if r.errno != errnoIO {
				t.Fatalf("failing read: %s", errnoName(r.errno))
			}
			if structured {
				// One data chunk with the whole blocks read, then the error at the first block not read.
				if len(r.chunks) != 2 || r.chunks[0].typ != replyTypeOffsetData || r.chunks[0].flags&replyFlagDone != 0 ||
					r.chunks[1].typ != replyTypeErrorOffset || r.chunks[1].flags&replyFlagDone == 0 {
					t.Fatalf("chunks %+v", r.chunks)
				}
				if r.covered != 4096 || !bytes.Equal(r.data[:4096], pattern(testSize, 5)[60<<10:64<<10]) {
					t.Fatalf("partial read covered %d bytes", r.covered)
				}
				if !slices.Equal(r.errOffs, []int64{64 << 10}) {
					t.Fatalf("error offsets %v", r.errOffs)
				}
				if !strings.Contains(r.msg, "injected read fault") {
					t.Fatalf("message %q", r.msg)
				}
			} else if r.data != nil {
				t.Fatal("simple error reply carried data")
			}
			// Writes into the full region report ENOSPC, unmaps EIO.
			if r := c.do(0, cmdWrite, 128<<10, 512, make([]byte, 512)); r.errno != errnoNoSpc {
				t.Fatalf("write into full region: %s", errnoName(r.errno))
			}
			if r := c.do(0, cmdTrim, 128<<10, 512, nil); r.errno != errnoIO {
				t.Fatalf("failing unmap: %s", errnoName(r.errno))
			}
			// A panicking backend fails its request and the connection, not the process.
			if r := c.do(0, cmdRead, 256<<10, 512, nil); r.errno != errnoIO {
				t.Fatalf("panicking read: %s", errnoName(r.errno))
			}
			c.expectClosed()
			c = connect(t, env.addr, "vol", structured)
			if got := c.read(0, 4096); !bytes.Equal(got, pattern(4096, 5)) {
				t.Fatal("read on a new connection differs")
			}
		})
	}
}

// TestRepliesOutOfOrder: a slow request does not hold back the replies of faster ones.
func TestRepliesOutOfOrder(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, pattern(testSize, 6))
	gate := env.device("vol").Hold(atOffset(0))
	c := connect(t, env.addr, "vol", true)

	slow := c.send(0, cmdRead, 0, 4096, nil)
	<-gate.Entered()
	fast := c.send(0, cmdRead, 8192, 4096, nil)
	r, err := c.recv()
	if err != nil {
		t.Fatal(err)
	}
	if r.cookie != fast || !bytes.Equal(r.data, pattern(testSize, 6)[8192:12288]) {
		t.Fatalf("first reply for cookie %#x, want the fast read %#x", r.cookie, fast)
	}
	gate.Release()
	r, err = c.recv()
	if err != nil {
		t.Fatal(err)
	}
	if r.cookie != slow || !bytes.Equal(r.data, pattern(4096, 6)) {
		t.Fatalf("second reply for cookie %#x, want the slow read %#x", r.cookie, slow)
	}
}

// TestFlushWaitsForEarlierWrites: FLUSH reaches the backend only after every write received
// before it has completed, and does not wait for writes received after it.
func TestFlushWaitsForEarlierWrites(t *testing.T) {
	env := newTestEnv(t)
	path := env.createExport("vol", testSize, nil)
	dev := env.device("vol")
	dev.Record()
	early, late := dev.Hold(atOffset(0)), dev.Hold(atOffset(8192))
	c := connect(t, env.addr, "vol", false)

	w1 := c.send(0, cmdWrite, 0, 4096, pattern(4096, 1))
	<-early.Entered()
	flush := c.send(0, cmdFlush, 0, 0, nil)
	w2 := c.send(0, cmdWrite, 8192, 4096, pattern(4096, 2))
	<-late.Entered()
	// The reader has dispatched the flush (requests are read in order); it must be waiting.
	if n := dev.Count(blockdevtest.OpFlush); n != 0 {
		t.Fatalf("flush reached the backend while an earlier write was running (%d)", n)
	}
	early.Release()
	got := map[uint64]bool{}
	for range 2 {
		r, err := c.recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.errno != 0 {
			t.Fatalf("cookie %#x: %s", r.cookie, errnoName(r.errno))
		}
		got[r.cookie] = true
	}
	if !got[w1] || !got[flush] {
		t.Fatalf("replies %v: want the first write and the flush while the later write is blocked", got)
	}
	if events := dev.Events(); !slices.Equal(events, []string{"write 0", "flush"}) {
		t.Fatalf("backend saw %q", events)
	}
	late.Release()
	if r, err := c.recv(); err != nil || r.cookie != w2 {
		t.Fatalf("late write reply: %v", err)
	}
	c.send(0, cmdDisc, 0, 0, nil)
	c.expectClosed()
	b := readFile(t, path)
	if !bytes.Equal(b[:4096], pattern(4096, 1)) || !bytes.Equal(b[8192:12288], pattern(4096, 2)) {
		t.Fatal("file content")
	}
}

// TestDisconnectCompletesInFlight: NBD_CMD_DISC lets the requests before it finish and answer.
func TestDisconnectCompletesInFlight(t *testing.T) {
	env := newTestEnv(t)
	path := env.createExport("vol", testSize, nil)
	gate := env.device("vol").Hold(atOffset(0))
	c := connect(t, env.addr, "vol", false)
	w := c.send(0, cmdWrite, 0, 4096, pattern(4096, 8))
	<-gate.Entered()
	c.send(0, cmdDisc, 0, 0, nil)
	gate.Release()
	r, err := c.recv()
	if err != nil || r.cookie != w || r.errno != 0 {
		t.Fatalf("write before disconnect: %v %+v", err, r)
	}
	c.expectClosed()
	if !bytes.Equal(readFile(t, path)[:4096], pattern(4096, 8)) {
		t.Fatal("write before disconnect lost")
	}
}

// TestCloseCompletesInFlight: Close waits for the requests in flight and answers them.
func TestCloseCompletesInFlight(t *testing.T) {
	env := newTestEnv(t)
	path := env.createExport("vol", testSize, nil)
	gate := env.device("vol").Hold(atOffset(0))
	c := connect(t, env.addr, "vol", true)
	handshaking := dial(t, env.addr, clientFlagFixedNewstyle)

	w := c.send(cmdFlagFUA, cmdWrite, 0, 4096, pattern(4096, 9))
	<-gate.Entered()
	done := make(chan error)
	go func() { done <- env.srv.Close() }()
	handshaking.expectClosed()
	finishHeldWrite(t, env, "vol", c, w, gate, path, pattern(4096, 9))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if nc, err := net.Dial("tcp", env.addr); err == nil {
		nc.Close()
		t.Fatal("server still accepting after Close")
	}
}

// TestDropExportEndsItsConnections: DropExport ends the connections of one export after
// answering what they had in flight; other exports' connections carry on.
func TestDropExportEndsItsConnections(t *testing.T) {
	env := newTestEnv(t)
	path := env.createExport("gone", testSize, nil)
	env.createExport("stay", testSize, nil)
	gate := env.device("gone").Hold(atOffset(0))
	gone := connect(t, env.addr, "gone", true)
	stay := connect(t, env.addr, "stay", true)

	w := gone.send(cmdFlagFUA, cmdWrite, 0, 4096, pattern(4096, 5))
	<-gate.Entered()
	if n := env.srv.DropExport("gone"); n != 1 {
		t.Fatalf("DropExport stopped %d connections, want 1", n)
	}
	finishHeldWrite(t, env, "gone", gone, w, gate, path, pattern(4096, 5))
	rd := stay.send(0, cmdRead, 0, 4096, nil)
	if r, err := stay.recv(); err != nil || r.cookie != rd || r.errno != 0 {
		t.Fatalf("read on another export after the drop: %v %+v", err, r)
	}
	if n := env.srv.DropExport("unknown"); n != 0 {
		t.Errorf("DropExport of an export nobody uses stopped %d connections", n)
	}
}

func TestInFlightLimit(t *testing.T) {
	const limit = 4
	env := newTestEnv(t, func(c *Config) { c.MaxInFlight = limit })
	var mu sync.Mutex
	var running, peak int
	release := make(chan struct{})
	entered := make(chan struct{}, 16)
	env.createExport("vol", testSize, nil)
	env.device("vol").SetHook(func(_ context.Context, c *blockdevtest.Call) error {
		if c.Op != blockdevtest.OpRead {
			return nil
		}
		mu.Lock()
		running++
		peak = max(peak, running)
		mu.Unlock()
		entered <- struct{}{}
		<-release
		mu.Lock()
		running--
		mu.Unlock()
		return nil
	})
	c := connect(t, env.addr, "vol", false)
	for i := range 2 * limit {
		c.send(0, cmdRead, uint64(i)*4096, 4096, nil)
	}
	for range limit {
		<-entered
	}
	soon.True(t, 20*time.Second, "in-flight gauge", func() bool { return env.srv.Stats().InFlight == limit })
	close(release)
	for range 2 * limit {
		if r, err := c.recv(); err != nil || r.errno != 0 {
			t.Fatalf("read: %v", err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if peak != limit {
		t.Fatalf("peak concurrency %d, want %d", peak, limit)
	}
}

func TestOnRequestHook(t *testing.T) {
	var mu sync.Mutex
	var events []RequestEvent
	env := newTestEnv(t, func(c *Config) {
		c.OnRequest = func(e RequestEvent) {
			mu.Lock()
			events = append(events, e)
			mu.Unlock()
		}
	})
	env.createExport("vol", testSize, nil)
	c := connect(t, env.addr, "vol", false)
	c.writeAt(0, 4096, make([]byte, 4096))
	c.do(0, cmdRead, 1, 512, nil)
	// The hook runs after the reply is sent, possibly after the client
	// has read it, and requests finish in any order.
	soon.True(t, 20*time.Second, "two request events", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(events) >= 2
	})
	mu.Lock()
	defer mu.Unlock()
	byCommand := map[string]RequestEvent{}
	for _, e := range events {
		byCommand[e.Command] = e
	}
	w, r := byCommand["write"], byCommand["read"]
	if len(events) != 2 || w.Export != "vol" || w.Offset != 4096 || w.Length != 4096 || w.Errno != 0 ||
		r.Command != "read" || r.Errno != errnoInval {
		t.Fatalf("events %+v", events)
	}
}

func TestNewServerValidatesConfig(t *testing.T) {
	exports := memExports(nil)
	for name, cfg := range map[string]Config{
		"no exports":        {},
		"payload too small": {Exports: exports, MaxPayload: 1024},
		"payload unaligned": {Exports: exports, MaxPayload: 4097},
		"budget too small":  {Exports: exports, MaxPayload: 1 << 20, MaxInFlightBytes: 1 << 19},
		"negative inflight": {Exports: exports, MaxInFlight: -1},
		"bad default name":  {Exports: exports, DefaultExport: "a\x00b"},
	} {
		if _, err := NewServer(cfg); err == nil {
			t.Errorf("%s: NewServer accepted %+v", name, cfg)
		}
	}
	s, err := NewServer(Config{Exports: exports})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.ListenAndServe("127.0.0.1:0"); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("ListenAndServe after Close: %v", err)
	}
}

// --- helpers around the shared test device ---

// atOffset matches the reads and writes at off.
func atOffset(off int64) func(blockdevtest.Call) bool {
	return func(c blockdevtest.Call) bool {
		return (c.Op == blockdevtest.OpRead || c.Op == blockdevtest.OpWrite) && c.Off == off
	}
}

// finishHeldWrite checks, for a connection being ended while its write w (of want at offset 0 of
// the file at path) is held by hold, that the export stays open while the write is inside it;
// then it releases the write and expects its success answer, the connection's end, the export's
// close and the data on disk.
func finishHeldWrite(t *testing.T, env *testEnv, name string, c *testClient, w uint64, hold *blockdevtest.Hold, path string, want []byte) {
	t.Helper()
	if env.exports.Live(name) == 0 {
		t.Fatal("export closed while a request was in flight")
	}
	hold.Release()
	r, err := c.recv()
	if err != nil || r.cookie != w || r.errno != 0 {
		t.Fatalf("in-flight write: %v %+v", err, r)
	}
	c.expectClosed()
	soon.True(t, 20*time.Second, "export closed", func() bool { return env.exports.Live(name) == 0 })
	if !bytes.Equal(readFile(t, path)[:len(want)], want) {
		t.Fatal("in-flight write lost")
	}
}

// faults injects failures: reads reaching [64 KiB, 128 KiB) return 4096+100 bytes and EIO, writes
// at 128 KiB fail with ENOSPC, unmaps there with EIO, and a read at 256 KiB panics.
func faults(_ context.Context, c *blockdevtest.Call) error {
	switch c.Op {
	case blockdevtest.OpRead:
		if c.Off == 256<<10 {
			panic("injected backend panic")
		}
		if c.Off < 128<<10 && c.Off+c.Len > 64<<10 {
			c.Partial = 4096 + 100
			return fmt.Errorf("injected read fault: %w", syscall.EIO)
		}
	case blockdevtest.OpWrite:
		if c.Off == 128<<10 {
			return fmt.Errorf("injected: %w", syscall.ENOSPC)
		}
	case blockdevtest.OpUnmap:
		if c.Off == 128<<10 {
			return errors.New("injected unmap fault")
		}
	}
	return nil
}

// TestDeadConnectionWriteDoesNotOvertakeNewerWrite: a write of a connection that died while the
// write was inside the backend is cancelled, and a new connection to the same export reads no
// request until that write has returned, so the old data A cannot land on top of the newer B.
func TestDeadConnectionWriteDoesNotOvertakeNewerWrite(t *testing.T) {
	for _, how := range []string{"hang up", "hang up after a refused request"} {
		t.Run(how, func(t *testing.T) {
			env := newTestEnv(t)
			env.createExport("vol", testSize, nil)
			dev := env.device("vol")
			hold := dev.HoldAt(blockdevtest.OpWrite, 0)
			t.Cleanup(hold.Release) // runs before the server closes, also when the test fails
			a, b := bytes.Repeat([]byte{0xaa}, 4096), bytes.Repeat([]byte{0xbb}, 4096)

			old := connect(t, env.addr, "vol", true)
			old.send(0, cmdWrite, 0, 4096, a)
			<-hold.Entered()
			if how != "hang up" {
				if r := old.do(0, cmdRead, 1, 512, nil); r.errno != errnoInval {
					t.Fatalf("unaligned read: %s", errnoName(r.errno))
				}
			}
			old.nc.Close() // the client dies without NBD_CMD_DISC
			soon.True(t, 20*time.Second, "the held write's context cancelled", hold.Cancelled)
			if st := env.srv.Stats(); st.DeadConnections != 1 {
				t.Fatalf("dead connections %d, want 1", st.DeadConnections)
			}

			c := connect(t, env.addr, "vol", true)
			w := c.send(0, cmdWrite, 0, 4096, b)
			soon.True(t, 20*time.Second, "the new write reaching the backend or its connection waiting", func() bool {
				return dev.InFlight() > 1 || dev.Count(blockdevtest.OpWrite) > 0 || env.srv.Stats().WaitingConnections == 1
			})
			if n := dev.Count(blockdevtest.OpWrite); n != 0 || dev.InFlight() != 1 {
				t.Fatalf("the new connection's write reached the backend (%d writes performed, %d in flight) while the dead connection's write was held", n, dev.InFlight())
			}
			hold.Release() // the old write lands now, as a store that had it in hand would do
			<-hold.Returned()
			r, err := c.recv()
			if err != nil || r.cookie != w || r.errno != 0 {
				t.Fatalf("new write: %v %+v", err, r)
			}
			if got := dev.Contents(0, 4096); !bytes.Equal(got, b) {
				t.Fatalf("block 0 holds %#x..., want the newer write %#x...", got[0], b[0])
			}
			if st := env.srv.Stats(); st.DeadConnections != 0 || st.WaitingConnections != 0 {
				t.Fatalf("stats after the drain: %+v", st)
			}
		})
	}
}

// TestDisconnectWaitsWithoutCancelling: NBD_CMD_DISC is not a death: the requests before it run to
// completion with their contexts intact, and a new connection does not wait for them.
func TestDisconnectWaitsWithoutCancelling(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, nil)
	dev := env.device("vol")
	hold := dev.HoldAt(blockdevtest.OpWrite, 0)
	t.Cleanup(hold.Release)
	old := connect(t, env.addr, "vol", false)
	w := old.send(0, cmdWrite, 0, 4096, pattern(4096, 3))
	<-hold.Entered()
	old.send(0, cmdDisc, 0, 0, nil)
	c := connect(t, env.addr, "vol", false)
	if got := c.read(8192, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("read on the new connection")
	}
	if hold.Cancelled() || env.srv.Stats().DeadConnections != 0 {
		t.Fatal("a disconnect cancelled the requests before it")
	}
	hold.Release()
	if r, err := old.recv(); err != nil || r.cookie != w || r.errno != 0 {
		t.Fatalf("write before disconnect: %v %+v", err, r)
	}
	old.expectClosed()
}

// TestInFlightBytesStayWithinBudget: many large pipelined READs and WRITEs on one connection never
// hold more payload than MaxInFlightBytes; the server stops reading instead of failing them, and
// all complete with the right data.
func TestInFlightBytesStayWithinBudget(t *testing.T) {
	const payload, budget = 1 << 20, 2 << 20
	var mu sync.Mutex
	var peak int64
	env := newTestEnv(t, func(c *Config) {
		c.MaxPayload = payload
		c.MaxInFlightBytes = budget
		c.TestingKnobs.OnInFlightBytes = func(n int64) {
			mu.Lock()
			peak = max(peak, n)
			mu.Unlock()
		}
	})
	const n = 16
	env.createExport("vol", 2*n*payload, nil)
	env.device("vol").SetLatency(time.Millisecond)
	c := connect(t, env.addr, "vol", true)
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for i := range n {
			c.send(0, cmdWrite, uint64(i)*payload, payload, pattern(payload, byte(i)))
			c.send(0, cmdRead, uint64(n+i)*payload, payload, nil)
		}
	}()
	for range 2 * n {
		r, err := c.recv()
		if err != nil || r.errno != 0 {
			t.Fatalf("reply: %v %+v", err, r)
		}
		if r.req.typ == cmdRead && !bytes.Equal(r.data, make([]byte, payload)) {
			t.Fatal("read returned other data")
		}
	}
	<-sent
	for i := range n {
		if !bytes.Equal(env.device("vol").Contents(int64(i)*payload, payload), pattern(payload, byte(i))) {
			t.Fatalf("write %d not stored", i)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if peak > budget || peak < payload {
		t.Fatalf("peak payload in flight %d, budget %d", peak, budget)
	}
	soon.True(t, 20*time.Second, "no payload left in flight", func() bool { return env.srv.Stats().InFlightBytes == 0 })
}

func encodeMetaContextRequest(export string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// metaContexts sends a metadata context option and returns the names of
// the contexts the server replied with, or the error reply.
func (c *testClient) metaContexts(option uint32, export string, queries ...string) ([]string, uint32) {
	c.t.Helper()
	c.sendOption(option, encodeMetaContextRequest(export, queries...))
	var names []string
	for {
		r := c.optionReply()
		switch r.typ {
		case repMetaContext:
			if len(r.data) < 4 || binary.BigEndian.Uint32(r.data) != contextAllocationID {
				c.t.Fatalf("meta context reply %v", r.data)
			}
			names = append(names, string(r.data[4:]))
		case repAck:
			return names, 0
		default:
			return names, r.typ
		}
	}
}

// descriptors decodes a block status reply's (length, flags) pairs.
func descriptors(t *testing.T, r *reply) [][2]uint32 {
	t.Helper()
	if r.errno != 0 || len(r.chunks) != 1 || r.chunks[0].typ != replyTypeBlockStatus {
		t.Fatalf("block status reply: errno %d %q, chunks %v", r.errno, r.msg, r.chunks)
	}
	p := r.chunks[0].payload
	if id := binary.BigEndian.Uint32(p); id != contextAllocationID {
		t.Fatalf("context id %d", id)
	}
	var out [][2]uint32
	for p = p[4:]; len(p) >= 8; p = p[8:] {
		out = append(out, [2]uint32{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
	}
	return out
}

func TestBlockStatusNegotiationAndReplies(t *testing.T) {
	env := newTestEnv(t)
	content := make([]byte, 2*blockdevtest.MapGranularity)
	for i := range blockdevtest.MapGranularity {
		content[blockdevtest.MapGranularity+i] = 1
	}
	env.createExport("vol", 1<<20, content)
	env.createExport("other", 1<<20, nil)

	// Listing needs no structured replies; unknown queries select nothing.
	c := dial(t, env.addr, clientFlagFixedNewstyle)
	for _, q := range [][]string{nil, {"base:"}, {"base:allocation"}} {
		if names, e := c.metaContexts(optListMetaContext, "vol", q...); e != 0 || fmt.Sprint(names) != "[base:allocation]" {
			t.Fatalf("list %q: %v, error %#x", q, names, e)
		}
	}
	if names, e := c.metaContexts(optListMetaContext, "vol", "qemu:dirty-bitmap:x"); e != 0 || len(names) != 0 {
		t.Fatalf("list of an unknown context: %v, error %#x", names, e)
	}
	if _, e := c.metaContexts(optSetMetaContext, "vol", "base:allocation"); e != repErrInvalid {
		t.Fatalf("set before structured replies: error %#x, want NBD_REP_ERR_INVALID", e)
	}
	c.sendOption(optSetMetaContext, []byte{0, 0, 0, 9, 'v'})
	if r := c.optionReply(); r.typ != repErrInvalid {
		t.Fatalf("malformed set: reply %#x", r.typ)
	}

	// Set for vol, go to vol: holes and data at the device's granularity.
	c = dial(t, env.addr, clientFlagFixedNewstyle)
	c.structuredReplies()
	if names, e := c.metaContexts(optSetMetaContext, "vol", "base:allocation"); e != 0 || len(names) != 1 {
		t.Fatalf("set: %v, error %#x", names, e)
	}
	c.goExport(optGo, "vol")
	g := uint32(blockdevtest.MapGranularity)
	want := [][2]uint32{{g, stateHole | stateZero}, {g, 0}, {1<<20 - 2*g, stateHole | stateZero}}
	if got := descriptors(t, c.do(0, cmdBlockStatus, 0, 1<<20, nil)); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("block status: %v, want %v", got, want)
	}
	if got := descriptors(t, c.do(cmdFlagReqOne, cmdBlockStatus, uint64(g), 1<<20-g, nil)); fmt.Sprint(got) != fmt.Sprint([][2]uint32{{g, 0}}) {
		t.Fatalf("block status with REQ_ONE: %v", got)
	}
	for _, bad := range []struct {
		off uint64
		n   uint32
	}{{0, 0}, {1 << 20, 512}, {100, 512}} {
		if r := c.do(0, cmdBlockStatus, bad.off, bad.n, nil); r.errno != errnoInval {
			t.Fatalf("block status at %d length %d: errno %d, want EINVAL", bad.off, bad.n, r.errno)
		}
	}

	// A context set for another export does not carry over.
	c = dial(t, env.addr, clientFlagFixedNewstyle)
	c.structuredReplies()
	c.metaContexts(optSetMetaContext, "other", "base:allocation")
	c.goExport(optGo, "vol")
	if r := c.do(0, cmdBlockStatus, 0, 4096, nil); r.errno != errnoInval {
		t.Fatalf("block status with the context of another export: errno %d", r.errno)
	}
}
