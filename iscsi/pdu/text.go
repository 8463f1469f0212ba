package pdu

import (
	"bytes"
	"fmt"
)

// Text key limits (RFC 7143 section 6.1).
const (
	maxKeyLen   = 63
	maxValueLen = 8192
)

// KV is one key=value pair of a Login or Text data segment.
type KV struct {
	Key, Value string
}

// ParseText splits a data segment into its key=value pairs, in order.
// Pairs are NUL-terminated; a missing final NUL is tolerated (it may belong
// to a continuation PDU and callers join segments before parsing). Empty
// strings between NULs are skipped. A pair without '=' or with an invalid
// key is an error.
func ParseText(data []byte) ([]KV, error) {
	var kvs []KV
	for len(data) > 0 {
		var item []byte
		if i := bytes.IndexByte(data, 0); i >= 0 {
			item, data = data[:i], data[i+1:]
		} else {
			item, data = data, nil
		}
		if len(item) == 0 {
			continue
		}
		eq := bytes.IndexByte(item, '=')
		if eq <= 0 {
			return nil, fmt.Errorf("%w: text item %q has no key=value form", ErrMalformed, truncate(item))
		}
		key, val := item[:eq], item[eq+1:]
		if len(key) > maxKeyLen || !validKey(key) {
			return nil, fmt.Errorf("%w: invalid text key %q", ErrMalformed, truncate(key))
		}
		if len(val) > maxValueLen {
			return nil, fmt.Errorf("%w: value of %s longer than %d bytes", ErrMalformed, key, maxValueLen)
		}
		kvs = append(kvs, KV{Key: string(key), Value: string(val)})
	}
	return kvs, nil
}

func validKey(k []byte) bool {
	for _, c := range k {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == '.' || c == '-' || c == '+' || c == '@' || c == '_':
		default:
			return false
		}
	}
	return true
}

func truncate(b []byte) []byte {
	if len(b) > 32 {
		return b[:32]
	}
	return b
}

// EncodeText joins pairs into a data segment, each "key=value\x00".
func EncodeText(kvs []KV) []byte {
	n := 0
	for _, kv := range kvs {
		n += len(kv.Key) + len(kv.Value) + 2
	}
	b := make([]byte, 0, n)
	for _, kv := range kvs {
		b = append(b, kv.Key...)
		b = append(b, '=')
		b = append(b, kv.Value...)
		b = append(b, 0)
	}
	return b
}
