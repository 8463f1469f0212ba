// Package units reads and writes byte sizes the way Cairn's commands and
// config files spell them: a number, whole or decimal, with an optional unit
// of any case, all powers of 1024 (10GiB, 10gb, 10G, 1.5GiB and 4096 all
// parse; see ParseBytes); written back with a binary suffix (FormatBytes).
package units

import (
	"fmt"
	"math/big"
	"strconv"
	"strings"
)

var suffixes = []struct {
	suffix string
	mult   uint64
}{
	{"PiB", 1 << 50}, {"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
}

// ParseBytes reads a byte size: a number, whole or with a decimal fraction,
// and a unit whose case does not matter: B, K/KB/KiB, M/MB/MiB, G/GB/GiB,
// T/TB/TiB or P/PB/PiB, all powers of 1024 ("10gb", "1.5GiB" and "4096"
// all parse). The result must be a whole number of bytes.
func ParseBytes(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	i := len(t)
	for i > 0 && !(t[i-1] >= '0' && t[i-1] <= '9' || t[i-1] == '.') {
		i--
	}
	num, unit := strings.TrimSpace(t[:i]), strings.ToLower(strings.TrimSpace(t[i:]))
	if num == "" {
		return 0, fmt.Errorf("invalid size %q: want a number of bytes, optionally with a unit such as KiB, MiB, GiB or TiB", s)
	}
	mult, ok := units[unit]
	if !ok {
		return 0, fmt.Errorf("size %q: unknown unit %q (use B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB or P/PB/PiB, powers of 1024)", s, t[i:])
	}
	r, ok := new(big.Rat).SetString(num)
	if !ok || num == "" || strings.ContainsAny(num, "+-eE/") {
		return 0, fmt.Errorf("invalid size %q: want a number of bytes, optionally with a unit such as KiB, MiB, GiB or TiB", s)
	}
	r.Mul(r, new(big.Rat).SetUint64(mult))
	if !r.IsInt() {
		return 0, fmt.Errorf("size %q is not a whole number of bytes", s)
	}
	n := r.Num()
	if !n.IsUint64() {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n.Uint64(), nil
}

// units maps the accepted unit spellings, lower-cased, to their multiples.
var units = map[string]uint64{
	"": 1, "b": 1,
	"k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
	"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
	"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
	"t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
	"p": 1 << 50, "pb": 1 << 50, "pib": 1 << 50,
}

// FormatBytes writes a byte size with the largest binary suffix that keeps
// it exact, or with one decimal when it is not a whole number of any.
func FormatBytes(n uint64) string {
	for _, u := range suffixes {
		if n >= u.mult && n%u.mult == 0 {
			return strconv.FormatUint(n/u.mult, 10) + u.suffix
		}
	}
	for _, u := range suffixes {
		if n >= u.mult {
			return strconv.FormatFloat(float64(n)/float64(u.mult), 'f', 1, 64) + u.suffix
		}
	}
	return strconv.FormatUint(n, 10) + "B"
}

// Bytes is a flag.Value for byte sizes.
type Bytes uint64

// String implements flag.Value.
func (b *Bytes) String() string { return FormatBytes(uint64(*b)) }

// Set implements flag.Value.
func (b *Bytes) Set(s string) error {
	n, err := ParseBytes(s)
	if err != nil {
		return err
	}
	*b = Bytes(n)
	return nil
}
