package iscsi

import (
	"crypto/md5"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// chapChallengeLen is the length of the target's CHAP challenge.
const chapChallengeLen = 16

// errAuth is returned for every CHAP failure; the login answers
// "authentication failure" without telling the initiator why.
var errAuth = errors.New("iscsi: CHAP authentication failed")

// chapState is the target side of one CHAP exchange (RFC 1994 with MD5, as
// RFC 7143 section 12.1.3 uses it).
type chapState struct {
	secrets   CHAP
	id        byte
	challenge []byte
	sent      bool // CHAP_A answered with I and C
	done      bool
}

func newCHAP(secrets CHAP) (*chapState, error) {
	c := &chapState{secrets: secrets, challenge: make([]byte, chapChallengeLen)}
	var id [1]byte
	if _, err := rand.Read(id[:]); err != nil {
		return nil, fmt.Errorf("chap challenge: %w", err)
	}
	if _, err := rand.Read(c.challenge); err != nil {
		return nil, fmt.Errorf("chap challenge: %w", err)
	}
	c.id = id[0]
	return c, nil
}

// decodeBinary decodes a CHAP binary value: 0x-prefixed hex or 0b-prefixed
// base64 (RFC 7143 section 6.1).
func decodeBinary(v string) ([]byte, error) {
	if len(v) < 3 {
		return nil, fmt.Errorf("%w: short binary value", errAuth)
	}
	switch strings.ToLower(v[:2]) {
	case "0x":
		s := v[2:]
		if len(s)%2 == 1 {
			s = "0" + s
		}
		return hex.DecodeString(s)
	case "0b":
		return base64.StdEncoding.DecodeString(v[2:])
	}
	return nil, fmt.Errorf("%w: binary value without 0x or 0b prefix", errAuth)
}

func chapResponse(id byte, secret string, challenge []byte) []byte {
	h := md5.New()
	h.Write([]byte{id})
	h.Write([]byte(secret))
	h.Write(challenge)
	return h.Sum(nil)
}

// algorithm answers CHAP_A: only MD5 (5) is supported.
func (c *chapState) algorithm(list string) (map[string]string, error) {
	for _, a := range strings.Split(list, ",") {
		if strings.TrimSpace(a) == "5" {
			c.sent = true
			return map[string]string{
				"CHAP_A": "5",
				"CHAP_I": strconv.Itoa(int(c.id)),
				"CHAP_C": "0x" + hex.EncodeToString(c.challenge),
			}, nil
		}
	}
	return nil, fmt.Errorf("%w: no supported CHAP algorithm in %q", errAuth, list)
}

// verify checks the initiator's CHAP_N/CHAP_R and, when it sent CHAP_I and
// CHAP_C, computes the target's answer for mutual CHAP.
func (c *chapState) verify(keys map[string]string) (map[string]string, error) {
	if !c.sent {
		return nil, fmt.Errorf("%w: response before challenge", errAuth)
	}
	name, rsp := keys["CHAP_N"], keys["CHAP_R"]
	if name == "" || rsp == "" {
		return nil, fmt.Errorf("%w: CHAP_N and CHAP_R required", errAuth)
	}
	got, err := decodeBinary(rsp)
	if err != nil {
		return nil, fmt.Errorf("%w: CHAP_R: %v", errAuth, err)
	}
	want := chapResponse(c.id, c.secrets.Secret, c.challenge)
	userOK := subtle.ConstantTimeCompare([]byte(name), []byte(c.secrets.User)) == 1
	if !userOK || subtle.ConstantTimeCompare(got, want) != 1 {
		return nil, fmt.Errorf("%w: wrong name or response for user %q", errAuth, name)
	}
	mi, mc := keys["CHAP_I"], keys["CHAP_C"]
	if mi == "" && mc == "" {
		c.done = true
		return nil, nil
	}
	if mi == "" || mc == "" {
		return nil, fmt.Errorf("%w: mutual CHAP needs both CHAP_I and CHAP_C", errAuth)
	}
	if c.secrets.MutualSecret == "" {
		return nil, fmt.Errorf("%w: initiator asked for mutual CHAP, none configured", errAuth)
	}
	id, err := strconv.Atoi(mi)
	if err != nil || id < 0 || id > 255 {
		return nil, fmt.Errorf("%w: CHAP_I %q", errAuth, mi)
	}
	ch, err := decodeBinary(mc)
	if err != nil || len(ch) == 0 || len(ch) > 1024 {
		return nil, fmt.Errorf("%w: CHAP_C", errAuth)
	}
	if subtle.ConstantTimeCompare(ch, c.challenge) == 1 {
		return nil, fmt.Errorf("%w: initiator reflected the target's challenge", errAuth)
	}
	c.done = true
	return map[string]string{
		"CHAP_N": c.secrets.MutualUser,
		"CHAP_R": "0x" + hex.EncodeToString(chapResponse(byte(id), c.secrets.MutualSecret, ch)),
	}, nil
}
