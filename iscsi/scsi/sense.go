package scsi

import "encoding/binary"

// SCSI status codes (SAM-5).
const (
	StatusGood                = 0x00
	StatusCheckCondition      = 0x02
	StatusConditionMet        = 0x04
	StatusBusy                = 0x08
	StatusReservationConflict = 0x18
	StatusTaskSetFull         = 0x28
	StatusTaskAborted         = 0x40
)

// Sense keys (SPC-4 table 27).
const (
	KeyNoSense        = 0x0
	KeyRecoveredError = 0x1
	KeyNotReady       = 0x2
	KeyMediumError    = 0x3
	KeyHardwareError  = 0x4
	KeyIllegalRequest = 0x5
	KeyUnitAttention  = 0x6
	KeyDataProtect    = 0x7
	KeyAbortedCommand = 0xb
	KeyMiscompare     = 0xe
)

// Sense describes one error condition: sense key, additional sense code and
// qualifier, and an optional information field.
type Sense struct {
	Key       byte
	ASC, ASCQ byte
	// Info is reported in the INFORMATION field when InfoValid is set
	// (the offset of the first miscompare, for example).
	Info      uint64
	InfoValid bool
	// Field, when FieldValid is set, is the sense-key specific field
	// pointer of an ILLEGAL REQUEST: the byte of the CDB (FieldInCDB) or
	// of the parameter list that holds the invalid value.
	Field      uint16
	FieldInCDB bool
	FieldValid bool
}

// invalidCDBField is INVALID FIELD IN CDB pointing at byte i of the CDB.
func invalidCDBField(i uint16) Sense {
	s := senseInvalidFieldInCDB
	s.Field, s.FieldInCDB, s.FieldValid = i, true, true
	return s
}

// sksByte is the first byte of the sense-key specific field pointer:
// SKSV, and C/D when the pointer names a CDB byte.
func (s Sense) sksByte() byte {
	b := byte(0x80)
	if s.FieldInCDB {
		b |= 0x40
	}
	return b
}

// Additional sense codes used by the unit, as (ASC, ASCQ) pairs.
var (
	senseInvalidOpcode          = Sense{Key: KeyIllegalRequest, ASC: 0x20, ASCQ: 0x00}
	senseLBAOutOfRange          = Sense{Key: KeyIllegalRequest, ASC: 0x21, ASCQ: 0x00}
	senseInvalidFieldInCDB      = Sense{Key: KeyIllegalRequest, ASC: 0x24, ASCQ: 0x00}
	senseLUNotSupported         = Sense{Key: KeyIllegalRequest, ASC: 0x25, ASCQ: 0x00}
	senseInvalidFieldInParam    = Sense{Key: KeyIllegalRequest, ASC: 0x26, ASCQ: 0x00}
	senseParamListLength        = Sense{Key: KeyIllegalRequest, ASC: 0x1a, ASCQ: 0x00}
	senseSavingNotSupported     = Sense{Key: KeyIllegalRequest, ASC: 0x39, ASCQ: 0x00}
	senseInvalidFieldInIU       = Sense{Key: KeyIllegalRequest, ASC: 0x0e, ASCQ: 0x03}
	senseWriteError             = Sense{Key: KeyMediumError, ASC: 0x0c, ASCQ: 0x00}
	senseReadError              = Sense{Key: KeyMediumError, ASC: 0x11, ASCQ: 0x00}
	senseWriteProtected         = Sense{Key: KeyDataProtect, ASC: 0x27, ASCQ: 0x00}
	senseMiscompare             = Sense{Key: KeyMiscompare, ASC: 0x1d, ASCQ: 0x00}
	sensePowerOn                = Sense{Key: KeyUnitAttention, ASC: 0x29, ASCQ: 0x00}
	senseBusDeviceReset         = Sense{Key: KeyUnitAttention, ASC: 0x29, ASCQ: 0x03}
	senseCapacityChanged        = Sense{Key: KeyUnitAttention, ASC: 0x2a, ASCQ: 0x09}
	senseModeParamsChanged      = Sense{Key: KeyUnitAttention, ASC: 0x2a, ASCQ: 0x01}
	senseReservationsPreempted  = Sense{Key: KeyUnitAttention, ASC: 0x2a, ASCQ: 0x03}
	senseReservationsReleased   = Sense{Key: KeyUnitAttention, ASC: 0x2a, ASCQ: 0x04}
	senseRegistrationsPreempted = Sense{Key: KeyUnitAttention, ASC: 0x2a, ASCQ: 0x05}
)

// Encode returns the sense data in fixed (0x70) or descriptor (0x72) format.
func (s Sense) Encode(descriptor bool) []byte {
	if descriptor {
		b := make([]byte, 8, 28)
		b[0] = 0x72
		b[1] = s.Key & 0x0f
		b[2] = s.ASC
		b[3] = s.ASCQ
		if s.InfoValid {
			// Information sense data descriptor (SPC-4 4.5.2.2).
			d := make([]byte, 12)
			d[0] = 0x00
			d[1] = 0x0a
			d[2] = 0x80
			binary.BigEndian.PutUint64(d[4:], s.Info)
			b = append(b, d...)
		}
		if s.FieldValid {
			// Sense key specific sense data descriptor (SPC-4 4.5.2.4).
			d := make([]byte, 8)
			d[0] = 0x02
			d[1] = 0x06
			d[4] = s.sksByte()
			binary.BigEndian.PutUint16(d[5:7], s.Field)
			b = append(b, d...)
		}
		b[7] = byte(len(b) - 8)
		return b
	}
	b := make([]byte, 18)
	b[0] = 0x70
	if s.InfoValid && s.Info <= 0xffffffff {
		b[0] |= 0x80
		binary.BigEndian.PutUint32(b[3:7], uint32(s.Info))
	}
	b[2] = s.Key & 0x0f
	b[7] = 10
	b[12] = s.ASC
	b[13] = s.ASCQ
	if s.FieldValid {
		b[15] = s.sksByte()
		binary.BigEndian.PutUint16(b[16:18], s.Field)
	}
	return b
}
