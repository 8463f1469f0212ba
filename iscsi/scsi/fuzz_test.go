package scsi

import (
	"testing"
)

// FuzzExecute sends arbitrary CDBs and data-out buffers to a unit. It must
// never panic, answer with a known status, and attach sense data exactly to
// CHECK CONDITION.
func FuzzExecute(f *testing.F) {
	f.Add([]byte{opInquiry, 1, 0xb0, 0, 64, 0}, []byte{}, uint8(0))
	f.Add(cdb16(opWrite16, 1, 1, 0x08), make([]byte, 512), uint8(0))
	f.Add(caw(0, 1), make([]byte, 1024), uint8(0))
	f.Add([]byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0}, []byte{0, 22, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0}, uint8(0))
	f.Add([]byte{opModeSelect10, 0x10, 0, 0, 0, 0, 0, 0, 20, 0}, make([]byte, 20), uint8(1))
	f.Add(proutCDB(1, prExclusiveAccess), proutData(1, 0), uint8(1))
	f.Add([]byte{opMaintenanceIn, saReportOpcodes, 0x82, opPersistReserveOut, 0, 4, 0, 0, 1, 0, 0, 0}, []byte{}, uint8(0))
	f.Fuzz(func(t *testing.T, cdb, data []byte, lun uint8) {
		lu, _ := newUnit(t, 64<<10)
		lu.AddNexus(nexA)
		if n := lu.DataInLen(cdb); n < 0 || n > int(lu.maxXfer)*lu.BlockSize() {
			t.Fatalf("DataInLen %d", n)
		}
		for i := 0; i < 2; i++ { // the second run sees no unit attention
			r := lu.Execute(bg, &Command{LUN: uint64(lun % 2), Nexus: nexA, CDB: cdb, Data: data})
			switch r.Status {
			case StatusGood, StatusCheckCondition, StatusReservationConflict:
			default:
				t.Fatalf("status %#x", r.Status)
			}
			if (r.Status == StatusCheckCondition) != (len(r.Sense) > 0) {
				t.Fatalf("status %#x with %d bytes of sense", r.Status, len(r.Sense))
			}
			if r.Status != StatusGood && len(r.Data) > 0 {
				t.Fatalf("status %#x with data", r.Status)
			}
		}
	})
}
