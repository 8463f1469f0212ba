package nbd

// Fuzz targets for the parsers a client controls: option data, request headers, and whole client
// byte streams through the real handshake and transmission code. Seed corpora live in
// testdata/fuzz/<target>/; run one with, for example,
//
//	go test ./nbd -run '^$' -fuzz '^FuzzSession$' -fuzztime 60s

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

func FuzzParseInfoRequest(f *testing.F) {
	f.Add(encodeInfoRequest("vol", []uint16{infoName, infoDescription, infoBlockSize}))
	f.Add(encodeInfoRequest("", nil))
	f.Add([]byte{0, 0, 0, 9, 'v', 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := parseInfoRequest(data)
		if err != nil {
			if !errors.Is(err, errMalformedOption) {
				t.Fatalf("error %v does not wrap errMalformedOption", err)
			}
			return
		}
		// What parses re-encodes to the same bytes, and the name obeys the protocol's string rules.
		if got := encodeInfoRequest(req.name, req.infos); !bytes.Equal(got, data) {
			t.Fatalf("re-encoded %x, parsed from %x", got, data)
		}
		if err := checkExportName(req.name); err != nil {
			t.Fatalf("accepted name %q: %v", req.name, err)
		}
	})
}

func FuzzParseOptionHeader(f *testing.F) {
	f.Add(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, magicOpts), optGo), 7))
	f.Add(make([]byte, optionHdrSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseOptionHeader(b)
		if err != nil {
			return
		}
		if len(b) != optionHdrSize || binary.BigEndian.Uint64(b) != magicOpts ||
			h.option != binary.BigEndian.Uint32(b[8:]) || h.length != binary.BigEndian.Uint32(b[12:]) {
			t.Fatalf("parsed %+v from %x", h, b)
		}
	})
}

func FuzzCheckRequest(f *testing.F) {
	f.Add(encodeRequest(0, cmdRead, 1, 4096, 4096), uint64(1<<20), false)
	f.Add(encodeRequest(cmdFlagFUA, cmdWrite, 2, 1<<20-512, 512), uint64(1<<20), true)
	f.Add(encodeRequest(cmdFlagNoHole, cmdWriteZeroes, 3, 0, 1<<31), uint64(1<<32), false)
	f.Add(encodeRequest(cmdFlagDF, cmdRead, 4, 1<<63, 1<<30), uint64(1<<63), true)
	f.Add(encodeRequest(0, cmdFlush, 5, 0, 0), uint64(0), false)
	f.Fuzz(func(t *testing.T, hdr []byte, size uint64, structured bool) {
		req, err := parseRequestHeader(hdr)
		if err != nil {
			return
		}
		size -= size % MinBlockSize
		l := exportLimits{size: size, minBlock: MinBlockSize, maxPayload: DefaultMaxPayload, structured: structured}
		rej := l.check(req)
		if rej != nil {
			switch rej.errno {
			case errnoInval, errnoNoSpc, errnoOverflow:
			default:
				t.Fatalf("refused with %s", errnoName(rej.errno))
			}
			if rej.msg == "" {
				t.Fatal("refusal without a message")
			}
			return
		}
		// Whatever passes is a known command with documented flags, aligned and inside the export.
		switch req.typ {
		case cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes:
			if req.offset%MinBlockSize != 0 || req.length%MinBlockSize != 0 {
				t.Fatalf("unaligned request passed: %+v", req)
			}
			if req.offset > size || uint64(req.length) > size-req.offset {
				t.Fatalf("request beyond %d passed: %+v", size, req)
			}
			if (req.typ == cmdRead || req.typ == cmdWrite) && req.length > DefaultMaxPayload {
				t.Fatalf("oversized request passed: %+v", req)
			}
		case cmdFlush:
			if req.offset != 0 || req.length != 0 {
				t.Fatalf("flush with a range passed: %+v", req)
			}
		default:
			t.Fatalf("command %d passed", req.typ)
		}
		allowed := cmdFlagFUA | cmdFlagNoHole | cmdFlagDF
		if req.flags&^allowed != 0 || (req.flags&cmdFlagNoHole != 0 && req.typ != cmdWriteZeroes) ||
			(req.flags&cmdFlagDF != 0 && (req.typ != cmdRead || !structured)) {
			t.Fatalf("flags %#x passed for %s", req.flags, commandName(req.typ))
		}
	})
}

// sessionSeed is a well-formed client stream: options, then requests, then a disconnect.
func sessionSeed(structured bool, exportName bool) []byte {
	opt := func(b []byte, o uint32, data []byte) []byte {
		b = binary.BigEndian.AppendUint64(b, magicOpts)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	b := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	b = opt(b, optList, nil)
	b = opt(b, optInfo, encodeInfoRequest("mem", []uint16{infoName, infoDescription, infoBlockSize}))
	if structured {
		b = opt(b, optStructuredReply, nil)
	}
	if exportName {
		b = opt(b, optExportName, []byte("mem"))
	} else {
		b = opt(b, optGo, encodeInfoRequest("mem", []uint16{infoBlockSize}))
	}
	b = append(b, encodeRequest(cmdFlagFUA, cmdWrite, 1, 4096, 1024)...)
	b = append(b, bytes.Repeat([]byte{0x5a}, 1024)...)
	b = append(b, encodeRequest(0, cmdRead, 2, 4096, 1024)...)
	b = append(b, encodeRequest(0, cmdTrim, 3, 0, 512)...)
	b = append(b, encodeRequest(cmdFlagNoHole, cmdWriteZeroes, 4, 512, 512)...)
	b = append(b, encodeRequest(0, cmdFlush, 5, 0, 0)...)
	b = append(b, encodeRequest(0, cmdRead, 6, 1<<20, 512)...) // beyond the end
	return append(b, encodeRequest(0, cmdDisc, 7, 0, 0)...)
}

// FuzzSession feeds a client byte stream through the real server code over an in-memory pipe.
// Whatever the bytes, the connection must end (no hang, no panic) and every export it opened must
// be closed exactly once.
func FuzzSession(f *testing.F) {
	f.Add(sessionSeed(false, false))
	f.Add(sessionSeed(true, false))
	f.Add(sessionSeed(true, true))
	exports := memExports(map[string]int64{"mem": 64 << 10})
	srv, err := NewServer(Config{
		Exports:          exports,
		Logger:           discardLogger(),
		MaxPayload:       64 << 10,
		MaxInFlight:      4,
		HandshakeTimeout: 5 * time.Second,
		WriteTimeout:     5 * time.Second,
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { srv.Close() })
	f.Fuzz(func(t *testing.T, stream []byte) {
		client, server := net.Pipe()
		c := newServerConn(srv, server)
		if !srv.trackConn(c, true) {
			t.Fatal("server closed")
		}
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { // the client reads whatever the server says
			defer wg.Done()
			_, _ = io.Copy(io.Discard, client)
		}()
		go func() {
			defer wg.Done()
			_, _ = client.Write(stream)
			_ = client.Close()
		}()
		done := make(chan struct{})
		go func() {
			c.serve()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatal("connection did not end")
		}
		_ = client.Close()
		wg.Wait()
		if n := exports.Live("mem"); n != 0 {
			t.Fatalf("%d exports left open", n)
		}
	})
}
