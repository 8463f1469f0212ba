package gateway

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/internal/testtool"
	"cairn.io/cairn/test/cluster"
)

// hangingMDS listens on a loopback port, accepts connections and never
// answers on them: an MDS process that is paused (SIGSTOP) or wedged. It
// returns the address.
func hangingMDS(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

// refusingMDS returns a loopback address nothing listens on: an MDS that
// is down.
func refusingMDS(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// NBD handshake values (the NBD protocol's), for nbdOption.
const (
	nbdMagic          = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic       = 0x49484156454f5054 // "IHAVEOPT"
	nbdReplyMagic     = 0x3e889045565a9
	nbdOptList        = 3
	nbdOptGo          = 7
	nbdRepErrUnknown  = 1<<31 + 6
	nbdRepErrShutdown = 1<<31 + 7
)

// nbdOption sends one option in a fixed newstyle handshake with the NBD
// server at addr and returns the type and data of the first reply.
func nbdOption(t *testing.T, addr string, option uint32, data []byte) (uint32, string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	var greeting [18]byte
	if _, err := io.ReadFull(c, greeting[:]); err != nil {
		t.Fatalf("read NBD greeting: %v", err)
	}
	if binary.BigEndian.Uint64(greeting[:]) != nbdMagic || binary.BigEndian.Uint64(greeting[8:]) != nbdOptMagic {
		t.Fatalf("NBD greeting %x", greeting)
	}
	msg := binary.BigEndian.AppendUint32(nil, 1|2) // fixed newstyle, no zeroes
	msg = binary.BigEndian.AppendUint64(msg, nbdOptMagic)
	msg = binary.BigEndian.AppendUint32(msg, option)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	var hdr [20]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		t.Fatalf("read NBD option reply: %v", err)
	}
	if binary.BigEndian.Uint64(hdr[:]) != nbdReplyMagic || binary.BigEndian.Uint32(hdr[8:]) != option {
		t.Fatalf("NBD option reply header %x", hdr)
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[16:]))
	if _, err := io.ReadFull(c, body); err != nil {
		t.Fatalf("read NBD option reply data: %v", err)
	}
	return binary.BigEndian.Uint32(hdr[12:]), string(body)
}

// nbdGoData is NBD_OPT_GO's data for export name, asking for no
// information.
func nbdGoData(name string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	return binary.BigEndian.AppendUint16(b, 0)
}

// TestMDSUnansweredIsTransient: when the MDS hangs (accepts connections and
// never answers) or refuses connections, opening an existing volume or
// listing the exports fails within the gateway's MDS wait with an error that
// says the MDS does not answer, never "unknown export" or "target not
// found": NBD clients get NBD_REP_ERR_SHUTDOWN with that message, iSCSI
// initiators a "service unavailable" login failure.
func TestMDSUnansweredIsTransient(t *testing.T) {
	testtool.Need(t, "qemu-img", "iscsi-inq")
	const wait = 1500 * time.Millisecond
	const slack = 3 * time.Second
	for _, tc := range []struct {
		name string
		mds  func(*testing.T) string
	}{
		{"hung", hangingMDS},
		{"refused", refusingMDS},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mds := tc.mds(t)
			g, err := New(Config{MDSAddrs: []string{mds}, NBDAddr: "127.0.0.1:0", ISCSIAddr: "127.0.0.1:0",
				MetricsAddr: Disabled, MDSWait: wait, Logger: cluster.Logger()})
			if err != nil {
				t.Fatal(err)
			}
			if err := g.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := g.Stop(); err != nil {
					t.Errorf("stop gateway: %v", err)
				}
			})
			within := func(what string, f func()) {
				t.Helper()
				start := time.Now()
				f()
				if took := time.Since(start); took > wait+slack {
					t.Errorf("%s took %v, want about the MDS wait %v", what, took, wait)
				}
			}

			within("open", func() {
				_, err := (catalog{g}).Open(context.Background(), "vol0")
				if !errors.Is(err, blockdev.ErrUnavailable) || errors.Is(err, blockdev.ErrNotFound) {
					t.Fatalf("open with the MDS %s: %v, want blockdev.ErrUnavailable", tc.name, err)
				}
				if !strings.Contains(err.Error(), mds) || !strings.Contains(err.Error(), "MDS") {
					t.Errorf("open error %q does not name the MDS", err)
				}
			})
			for _, opt := range []struct {
				name   string
				option uint32
				data   []byte
			}{
				{"NBD_OPT_GO", nbdOptGo, nbdGoData("vol0")},
				{"NBD_OPT_LIST", nbdOptList, nil},
			} {
				within(opt.name, func() {
					typ, msg := nbdOption(t, g.NBDAddr(), opt.option, opt.data)
					if typ != nbdRepErrShutdown {
						t.Errorf("%s: reply %#x (%q), want NBD_REP_ERR_SHUTDOWN", opt.name, typ, msg)
					}
					if !strings.Contains(msg, "MDS") || !strings.Contains(msg, mds) || strings.Contains(msg, "unknown export") {
						t.Errorf("%s: message %q does not say that the MDS does not answer", opt.name, msg)
					}
				})
			}
			// What users of the common tools read.
			within("qemu-img info", func() {
				out, err := testtool.Run(t, time.Minute, "qemu-img", "info", nbdURL(g, "vol0"))
				if err == nil || strings.Contains(out, "unknown export") || !strings.Contains(out, mds) {
					t.Errorf("qemu-img info over NBD (err %v):\n%s", err, out)
				}
			})
			within("iscsi-inq", func() {
				out, err := testtool.Run(t, time.Minute, "iscsi-inq", iscsiURL(g, "vol0"))
				if err == nil || !strings.Contains(out, "Service unavailable") {
					t.Errorf("iscsi-inq (err %v):\n%s", err, out)
				}
			})
		})
	}
}
