package nemesis

import (
	"fmt"
	"sort"
	"strings"
)

// Witness looks for a short explanation of why a key's history is not
// linearizable, among three patterns: a torn read; a stale read (a value
// read after an acknowledged write that followed its write in real time had
// returned); and a value that reappears (read, then a later write's value
// read, then the first value read again, although its one write cannot take
// effect twice). It returns the few operations that show it, or "".
func Witness(ops []Op, key Key) string {
	var reads []Op
	writes := map[uint64]Op{}
	for _, op := range ops {
		if op.Key != key {
			continue
		}
		if op.Write {
			writes[op.Value] = op
		} else {
			reads = append(reads, op)
		}
	}
	sort.Slice(reads, func(i, j int) bool { return reads[i].Call < reads[j].Call })
	for _, r := range reads {
		if r.Value == Torn {
			return "torn read: " + fmtOp(r)
		}
	}
	// Stale read: the value's write returned before an acknowledged write
	// was called, which returned before the read was called.
	for _, r := range reads {
		wv, ok := writes[r.Value]
		if r.Value != 0 && (!ok || wv.Return == Infinity) {
			continue
		}
		for _, u := range writes {
			if u.Return == Infinity || u.Value == r.Value || u.Return >= r.Call {
				continue
			}
			if r.Value == 0 || wv.Return < u.Call {
				return strings.Join([]string{"stale read:", fmtOpOr(wv, ok), fmtOp(u), fmtOp(r)}, "\n  ")
			}
		}
	}
	// Reappearing value: v read, then u (written after v was read) read,
	// then v read again.
	for i, r1 := range reads {
		for j := i + 1; j < len(reads); j++ {
			r2 := reads[j]
			wu, ok := writes[r2.Value]
			if r2.Value == r1.Value || r2.Call < r1.Return || !ok || wu.Call < r1.Return {
				continue
			}
			for _, r3 := range reads[j+1:] {
				if r3.Value == r1.Value && r3.Call > r2.Return {
					wv, ok := writes[r1.Value]
					return strings.Join([]string{"a value reappears (its write took effect twice):",
						fmtOpOr(wv, ok), fmtOp(r1), fmtOp(wu), fmtOp(r2), fmtOp(r3)}, "\n  ")
				}
			}
		}
	}
	return ""
}

func fmtOpOr(op Op, ok bool) string {
	if !ok {
		return "(the initial zero)"
	}
	return fmtOp(op)
}

func fmtOp(op Op) string {
	ret := "unknown"
	if op.Return != Infinity {
		ret = fmt.Sprintf("%.3fs", float64(op.Return)/1e9)
	}
	what := fmt.Sprintf("read -> %d", op.Value)
	if op.Value == Torn {
		what = "read -> TORN"
	}
	if op.Write {
		what = fmt.Sprintf("write %d", op.Value)
	}
	return fmt.Sprintf("client %d %s %s [%.3fs, %s]", op.Client, op.Key, what, float64(op.Call)/1e9, ret)
}
