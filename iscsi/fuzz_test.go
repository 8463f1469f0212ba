package iscsi

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/iscsi/pdu"
)

// memExports serves one in-memory volume "fuzz" of 1 MiB.
func memExports() *blockdevtest.Catalog {
	c := blockdevtest.NewCatalog()
	c.Add("fuzz", blockdevtest.New(1<<20))
	return c
}

// loginBytes is a complete login of a normal session to the fuzz target.
func loginBytes(t testing.TB) []byte {
	p := &pdu.PDU{Data: pdu.EncodeText([]pdu.KV{
		{Key: "InitiatorName", Value: "iqn.2026-11.io.cairn.test:fuzz"},
		{Key: "TargetName", Value: DefaultIQNPrefix + ":fuzz"},
		{Key: "InitialR2T", Value: "No"},
		{Key: "MaxBurstLength", Value: "8192"},
		{Key: "FirstBurstLength", Value: "4096"},
	})}
	p.BHS.SetOpcode(pdu.OpLoginReq)
	p.BHS[0] |= 0x40
	p.BHS[1] = 0x80 | 1<<2 | 3
	p.BHS[8] = 0x80
	p.BHS.SetU32(pdu.OffCmdSN, 1)
	var b bytes.Buffer
	if err := pdu.Write(&b, p, false, false); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func scsiCmdBytes(t testing.TB, cmdSN uint32, flags byte, edtl uint32, cdb []byte, data []byte) []byte {
	p := &pdu.PDU{Data: data}
	p.BHS.SetOpcode(pdu.OpSCSICommand)
	p.BHS[1] = flags
	p.BHS.SetITT(cmdSN)
	p.BHS.SetU32(pdu.OffEDTL, edtl)
	p.BHS.SetU32(pdu.OffCmdSN, cmdSN)
	copy(p.BHS[pdu.OffCDB:], cdb)
	var b bytes.Buffer
	if err := pdu.Write(&b, p, false, false); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// FuzzConnection logs in and then feeds arbitrary bytes to a connection in
// full feature phase (or, with login=false, straight to the login phase).
// Whatever arrives, the server must neither panic nor hang: the connection
// ends when the input does.
func FuzzConnection(f *testing.F) {
	f.Add(true, scsiCmdBytes(f, 1, 0xa1, 4096, cdbWrite16(0, 8), make([]byte, 1024)))
	f.Add(true, scsiCmdBytes(f, 1, 0xc1, 512, cdbRead16(0, 1), nil))
	f.Add(true, scsiCmdBytes(f, 1, 0x81, 0, []byte{0x12, 1, 0xb0, 0, 64, 0}, nil))
	// Regression: a variable-length CDB opcode (7Fh) with the R bit once
	// crashed the buffer accounting.
	f.Add(true, scsiCmdBytes(f, 1, 0xc1, 512, []byte{0x7f, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x09}, nil))
	f.Add(false, loginBytes(f))
	f.Add(false, []byte{0x43, 0x87, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0})
	srv, err := NewServer(Config{
		Exports:      memExports(),
		LoginTimeout: time.Second,
		NopInterval:  -1,
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		f.Fatal(err)
	}
	login := loginBytes(f)
	f.Fuzz(func(t *testing.T, doLogin bool, in []byte) {
		client, server := net.Pipe()
		c := newConn(srv, server)
		done := make(chan struct{})
		go func() {
			defer close(done)
			c.serve()
		}()
		go io.Copy(io.Discard, client)
		if doLogin {
			client.Write(login)
		}
		client.Write(in)
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("connection did not end after its input did")
		}
	})
}
