package iscsi

import (
	"strconv"
	"strings"

	"cairn.io/cairn/iscsi/pdu"
)

// params are a session's operational parameters (RFC 7143 section 13).
// Before negotiation they hold the RFC defaults.
type params struct {
	headerDigest, dataDigest bool
	// maxSendData is the initiator's MaxRecvDataSegmentLength: the
	// largest data segment the target may send.
	maxSendData       int
	maxBurst          int
	firstBurst        int
	initialR2T        bool
	immediateData     bool
	maxOutstandingR2T int
}

func defaultParams() params {
	return params{
		maxSendData:       8192,
		maxBurst:          262144,
		firstBurst:        65536,
		initialR2T:        true,
		immediateData:     true,
		maxOutstandingR2T: 1,
	}
}

// negotiator answers the operational keys of one login.
type negotiator struct {
	cfg  *Config
	p    params
	seen map[string]bool
}

func newNegotiator(cfg *Config) *negotiator {
	return &negotiator{cfg: cfg, p: defaultParams(), seen: make(map[string]bool)}
}

func boolVal(v string) (bool, bool) {
	switch v {
	case "Yes":
		return true, true
	case "No":
		return false, true
	}
	return false, false
}

func yesNo(b bool) string {
	if b {
		return "Yes"
	}
	return "No"
}

// numVal parses a numerical value within [lo, hi].
func numVal(v string, lo, hi int) (int, bool) {
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		return 0, false
	}
	return n, true
}

// declaratives and keys handled elsewhere (login, security).
var loginKeys = map[string]bool{
	"InitiatorName": true, "InitiatorAlias": true, "TargetName": true, "SessionType": true,
	"AuthMethod": true, "CHAP_A": true, "CHAP_I": true, "CHAP_C": true, "CHAP_N": true, "CHAP_R": true,
	"SendTargets": true, "TargetAlias": true, "TargetAddress": true, "TargetPortalGroupTag": true,
}

// negotiate answers one operational key. ok=false means no answer is due
// (declaratives). It never fails the login: a value it cannot accept is
// answered with Reject, as RFC 7143 section 6.2 allows.
func (n *negotiator) negotiate(kv pdu.KV) (reply pdu.KV, ok bool) {
	k, v := kv.Key, kv.Value
	if loginKeys[k] {
		return pdu.KV{}, false
	}
	switch v {
	case "NotUnderstood", "Irrelevant", "Reject":
		return pdu.KV{}, false
	}
	if n.seen[k] {
		return pdu.KV{}, false
	}
	n.seen[k] = true
	reject := pdu.KV{Key: k, Value: "Reject"}
	switch k {
	case "HeaderDigest", "DataDigest":
		for _, opt := range strings.Split(v, ",") {
			switch opt {
			case "CRC32C", "None":
				if k == "HeaderDigest" {
					n.p.headerDigest = opt == "CRC32C"
				} else {
					n.p.dataDigest = opt == "CRC32C"
				}
				return pdu.KV{Key: k, Value: opt}, true
			}
		}
		return reject, true
	case "MaxConnections":
		if _, ok := numVal(v, 1, 65535); !ok {
			return reject, true
		}
		return pdu.KV{Key: k, Value: "1"}, true
	case "InitialR2T":
		b, ok := boolVal(v)
		if !ok {
			return reject, true
		}
		n.p.initialR2T = b || n.cfg.InitialR2T
		return pdu.KV{Key: k, Value: yesNo(n.p.initialR2T)}, true
	case "ImmediateData":
		b, ok := boolVal(v)
		if !ok {
			return reject, true
		}
		n.p.immediateData = b && !n.cfg.DisableImmediateData
		return pdu.KV{Key: k, Value: yesNo(n.p.immediateData)}, true
	case "MaxRecvDataSegmentLength":
		x, ok := numVal(v, 512, 1<<24-1)
		if !ok {
			return reject, true
		}
		n.p.maxSendData = x
		return pdu.KV{}, false
	case "MaxBurstLength":
		x, ok := numVal(v, 512, 1<<24-1)
		if !ok {
			return reject, true
		}
		n.p.maxBurst = min(x, n.cfg.MaxBurstLength)
		return pdu.KV{Key: k, Value: strconv.Itoa(n.p.maxBurst)}, true
	case "FirstBurstLength":
		x, ok := numVal(v, 512, 1<<24-1)
		if !ok {
			return reject, true
		}
		n.p.firstBurst = min(x, n.cfg.FirstBurstLength)
		return pdu.KV{Key: k, Value: strconv.Itoa(n.p.firstBurst)}, true
	case "DefaultTime2Wait":
		x, ok := numVal(v, 0, 3600)
		if !ok {
			return reject, true
		}
		return pdu.KV{Key: k, Value: strconv.Itoa(max(x, 2))}, true
	case "DefaultTime2Retain":
		if _, ok := numVal(v, 0, 3600); !ok {
			return reject, true
		}
		// Error recovery level 0 keeps nothing after a connection fails.
		return pdu.KV{Key: k, Value: "0"}, true
	case "MaxOutstandingR2T":
		x, ok := numVal(v, 1, 65535)
		if !ok {
			return reject, true
		}
		n.p.maxOutstandingR2T = min(x, n.cfg.MaxOutstandingR2T)
		return pdu.KV{Key: k, Value: strconv.Itoa(n.p.maxOutstandingR2T)}, true
	case "DataPDUInOrder", "DataSequenceInOrder":
		if _, ok := boolVal(v); !ok {
			return reject, true
		}
		return pdu.KV{Key: k, Value: "Yes"}, true
	case "ErrorRecoveryLevel":
		if _, ok := numVal(v, 0, 2); !ok {
			return reject, true
		}
		return pdu.KV{Key: k, Value: "0"}, true
	case "IFMarker", "OFMarker":
		if _, ok := boolVal(v); !ok {
			return reject, true
		}
		return pdu.KV{Key: k, Value: "No"}, true
	case "IFMarkInt", "OFMarkInt":
		return pdu.KV{Key: k, Value: "Irrelevant"}, true
	case "iSCSIProtocolLevel":
		x, ok := numVal(v, 0, 31)
		if !ok {
			return reject, true
		}
		return pdu.KV{Key: k, Value: strconv.Itoa(min(x, 1))}, true
	case "TaskReporting":
		return pdu.KV{Key: k, Value: "RFC3720"}, true
	}
	return pdu.KV{Key: k, Value: "NotUnderstood"}, true
}

// finish settles values that depend on each other.
func (n *negotiator) finish() params {
	p := n.p
	if p.firstBurst > p.maxBurst {
		p.firstBurst = p.maxBurst
	}
	return p
}
